//! A hostile OCI image: what an attacker puts in a layer to reach the host through the
//! caches boxlet keeps of it (device nodes anyone may open, a set-UID-root shell, a file
//! capability, overlayfs control attributes).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What [`hostile_layout`] holds, by path in the image.
pub const BLOCK_DEVICE: &str = "dev/sda"; // 8:0, mode 0666
/// A character device (1:1, /dev/mem), mode 0666.
pub const CHAR_DEVICE: &str = "dev/mem";
/// A set-UID-root shell script, mode 04755, owner 0:0.
pub const SETUID_ROOT: &str = "bin/rootsh";
/// A set-GID file, mode 02755, group 0.
pub const SETGID_ROOT: &str = "bin/rootgrp";
/// A file with `security.capability` (all capabilities).
pub const FILE_CAPS: &str = "bin/capsh";
/// A directory with `trusted.overlay.opaque=y`, `user.overlay.opaque=y` and the harmless
/// `user.note=hello`; it holds `f`.
pub const OVERLAY_DIR: &str = "opaque";

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        b.append(&header(p, tar::EntryType::Directory, 0o755, 0), &[][..])
            .unwrap();
    };
    dir(&mut b, "bin/");
    dir(&mut b, "dev/");
    let script = b"#!/bin/sh\nid\n";
    for (p, mode) in [(SETUID_ROOT, 0o4755), (SETGID_ROOT, 0o2755)] {
        let h = header(p, tar::EntryType::Regular, mode, script.len() as u64);
        b.append(&h, &script[..]).unwrap();
    }
    // VFS_CAP_REVISION_2, every capability permitted and effective.
    let caps: Vec<u8> = [0x0200_0001u32, !0, !0, !0, !0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    b.append_pax_extensions([("SCHILY.xattr.security.capability", caps.as_slice())])
        .unwrap();
    let h = header(
        FILE_CAPS,
        tar::EntryType::Regular,
        0o755,
        script.len() as u64,
    );
    b.append(&h, &script[..]).unwrap();
    for (p, kind, major, minor) in [
        (BLOCK_DEVICE, tar::EntryType::Block, 8, 0),
        (CHAR_DEVICE, tar::EntryType::Char, 1, 1),
    ] {
        let mut h = header(p, kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
        ("SCHILY.xattr.user.overlay.opaque", b"y"),
        ("SCHILY.xattr.user.note", b"hello"),
    ])
    .unwrap();
    dir(&mut b, &format!("{OVERLAY_DIR}/"));
    let h = header(
        &format!("{OVERLAY_DIR}/f"),
        tar::EntryType::Regular,
        0o644,
        2,
    );
    b.append(&h, &b"f\n"[..]).unwrap();
    b.into_inner().unwrap()
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let hex = format!("{:x}", Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len() as u64)
}

/// Write the hostile image as an OCI layout at `dir/hostile` (tag `latest`, one
/// uncompressed layer) and return its path.
pub fn hostile_layout(dir: &Path) -> PathBuf {
    layout_with_layer(&dir.join("hostile"), &layer(), "/bin/rootsh")
}

/// Write an image of one uncompressed layer (`tar`, a tar stream) whose command is `cmd`
/// as an OCI layout at `layout` (tag `latest`) and return its path.
pub fn layout_with_layer(layout: &Path, tar: &[u8], cmd: &str) -> PathBuf {
    let layout = layout.to_path_buf();
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let (layer_digest, layer_size) = put_blob(&layout, tar);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": [cmd]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put_blob(&layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = put_blob(&layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    layout
}
