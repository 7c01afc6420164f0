//! The `boxlet qcow2` commands as a script would use them.

use std::path::Path;
use std::process::{Command, Output};

mod common;

fn boxlet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_boxlet"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = boxlet(args);
    assert!(
        out.status.success(),
        "boxlet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with exactly one stderr line that names `file`.
fn fails_naming(args: &[&str], file: &Path, what: &str) {
    let out = boxlet(args);
    assert!(!out.status.success(), "boxlet {args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(file.to_str().unwrap()),
        "names the file: {err}"
    );
    assert!(err.contains(what), "says {what:?}: {err}");
}

#[test]
fn create_write_export_info_check_round_trip() {
    let dir = tempfile::TempDir::new().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    std::fs::write(d("base.raw"), vec![0xabu8; 1 << 20]).unwrap();
    ok(&[
        "qcow2",
        "create",
        &d("ov.qcow2"),
        "--backing",
        "base.raw",
        "--backing-format",
        "raw",
        "--cluster-size",
        "4K",
    ]);
    std::fs::write(d("data"), b"hello from the host").unwrap();
    ok(&[
        "qcow2",
        "write",
        &d("ov.qcow2"),
        "--offset",
        "4097",
        "--input",
        &d("data"),
    ]);
    ok(&["qcow2", "export", &d("ov.qcow2"), &d("out.raw")]);
    let raw = std::fs::read(d("out.raw")).unwrap();
    assert_eq!(raw.len(), 1 << 20);
    assert_eq!(&raw[4097..4097 + 19], b"hello from the host");
    assert_eq!(
        raw[4096], 0xab,
        "rest of the cluster comes from the backing file"
    );
    assert_eq!(raw[(1 << 20) - 1], 0xab);

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["qcow2", "info", &d("ov.qcow2"), "--json"])).unwrap();
    assert_eq!(json["virtual_size"], 1 << 20);
    assert_eq!(json["cluster_size"], 4096);
    assert_eq!(json["backing_file"], "base.raw");
    assert_eq!(json["backing_format"], "raw");
    assert_eq!(json["compat"], "1.1");
    let text = ok(&["qcow2", "info", &d("ov.qcow2")]);
    assert!(text.contains("backing file format: raw"), "{text}");
    let check = ok(&["qcow2", "check", &d("ov.qcow2")]);
    assert!(
        check.contains("0 corruptions, 0 leaked clusters"),
        "{check}"
    );
}

#[test]
fn write_reads_standard_input() {
    let dir = tempfile::TempDir::new().unwrap();
    let img = dir.path().join("a.qcow2");
    ok(&["qcow2", "create", img.to_str().unwrap(), "--size", "1M"]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_boxlet"));
    cmd.args(["qcow2", "write", img.to_str().unwrap(), "--offset", "64K"]);
    assert!(common::with_stdin(cmd, b"from stdin").status.success());
    let out = dir.path().join("a.raw");
    ok(&[
        "qcow2",
        "export",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(&std::fs::read(out).unwrap()[65536..65546], b"from stdin");
}

#[test]
fn bad_input_gives_one_line_naming_the_file() {
    let dir = tempfile::TempDir::new().unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "just some text, not a disk image. ".repeat(5)).unwrap();
    fails_naming(
        &["qcow2", "info", notes.to_str().unwrap()],
        &notes,
        "bad magic",
    );
    fails_naming(
        &["qcow2", "export", notes.to_str().unwrap(), "/dev/null"],
        &notes,
        "bad magic",
    );
    let missing = dir.path().join("missing.qcow2");
    fails_naming(
        &["qcow2", "info", missing.to_str().unwrap()],
        &missing,
        "cannot open",
    );

    let img = dir.path().join("small.qcow2");
    ok(&["qcow2", "create", img.to_str().unwrap(), "--size", "64K"]);
    fails_naming(
        &[
            "qcow2",
            "write",
            img.to_str().unwrap(),
            "--offset",
            "1M",
            "--input",
            notes.to_str().unwrap(),
        ],
        &img,
        "outside the virtual disk",
    );
    fails_naming(
        &["qcow2", "create", img.to_str().unwrap(), "--size", "1M"],
        &img,
        "exists",
    );
    let odd = dir.path().join("odd.qcow2");
    fails_naming(
        &[
            "qcow2",
            "create",
            odd.to_str().unwrap(),
            "--size",
            "1M",
            "--cluster-size",
            "3000",
        ],
        &odd,
        "power of two",
    );

    // A dirty image can be exported but not written.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[79] |= 1;
    std::fs::write(&img, bytes).unwrap();
    ok(&[
        "qcow2",
        "export",
        img.to_str().unwrap(),
        dir.path().join("x.raw").to_str().unwrap(),
    ]);
    fails_naming(
        &[
            "qcow2",
            "write",
            img.to_str().unwrap(),
            "--offset",
            "0",
            "--input",
            notes.to_str().unwrap(),
        ],
        &img,
        "incompatible feature bit 0 (dirty)",
    );
}

fn mke2fs_image(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "boxlet\n").unwrap();
    std::fs::write(src.join("big.bin"), vec![7u8; 200_000]).unwrap();
    std::os::unix::fs::symlink("hostname", src.join("etc/link")).unwrap();
    let img = dir.join("fs.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

#[test]
fn ext4_ls_cat_tree_info() {
    let dir = tempfile::TempDir::new().unwrap();
    let img = mke2fs_image(dir.path());
    let img = img.to_str().unwrap();
    let ls = ok(&["ext4", "ls", img, "/etc"]);
    assert!(ls.contains("-rw-r--r--"), "{ls}");
    assert!(
        ls.contains("hostname") && ls.contains("link -> hostname"),
        "{ls}"
    );
    let out = boxlet(&["ext4", "cat", img, "/etc/link"]);
    assert_eq!(out.stdout, b"boxlet\n");
    let out = boxlet(&["ext4", "cat", img, "/big.bin"]);
    assert_eq!(out.stdout, vec![7u8; 200_000]);

    let tree: serde_json::Value =
        serde_json::from_str(&ok(&["ext4", "tree", img, "--json"])).unwrap();
    let entries = tree.as_array().unwrap();
    let link = entries.iter().find(|e| e["path"] == "/etc/link").unwrap();
    assert_eq!(link["file_type"], "symlink");
    assert_eq!(link["link_target"], "hostname");
    let host = entries
        .iter()
        .find(|e| e["path"] == "/etc/hostname")
        .unwrap();
    assert_eq!(host["size"], 7);
    assert_eq!(host["mode"], 0o644);
    assert_eq!(host["uid"], 0);
    assert_eq!(host["links"], 1);
    assert!(host["xattrs"].as_array().unwrap().is_empty());

    let info: serde_json::Value =
        serde_json::from_str(&ok(&["ext4", "info", img, "--json"])).unwrap();
    assert!(info["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "metadata_csum"));
}

#[test]
fn ext4_errors_name_image_and_path() {
    let dir = tempfile::TempDir::new().unwrap();
    let img = mke2fs_image(dir.path());
    fails_naming(
        &["ext4", "cat", img.to_str().unwrap(), "/etc/nope"],
        &img,
        "/etc/nope: no such file or directory",
    );
    fails_naming(
        &["ext4", "cat", img.to_str().unwrap(), "/etc"],
        &img,
        "not a regular file",
    );
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "text ".repeat(500)).unwrap();
    fails_naming(
        &["ext4", "ls", notes.to_str().unwrap()],
        &notes,
        "bad superblock magic",
    );
}

#[test]
fn ext4_build_from_a_directory() {
    let dir = tempfile::TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "built\n").unwrap();
    let img = dir.path().join("out.img");
    ok(&[
        "ext4",
        "build",
        img.to_str().unwrap(),
        "--dir",
        src.to_str().unwrap(),
    ]);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        boxlet(&["ext4", "cat", img.to_str().unwrap(), "/etc/hostname"]).stdout,
        b"built\n"
    );
    // An existing output is never overwritten.
    fails_naming(
        &[
            "ext4",
            "build",
            img.to_str().unwrap(),
            "--dir",
            src.to_str().unwrap(),
        ],
        &img,
        "exists",
    );
    let missing = dir.path().join("nope");
    fails_naming(
        &[
            "ext4",
            "build",
            dir.path().join("x.img").to_str().unwrap(),
            "--dir",
            missing.to_str().unwrap(),
        ],
        &missing,
        "No such file",
    );
}

#[test]
fn ext4_inject_a_host_file() {
    let dir = tempfile::TempDir::new().unwrap();
    let img = mke2fs_image(dir.path());
    let agent = dir.path().join("agent");
    std::fs::write(&agent, b"#!agent").unwrap();
    ok(&[
        "ext4",
        "inject",
        img.to_str().unwrap(),
        agent.to_str().unwrap(),
        "/boxlet/bin/boxlet-guest",
        "--mode",
        "700",
    ]);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert_eq!(
        boxlet(&[
            "ext4",
            "cat",
            img.to_str().unwrap(),
            "/boxlet/bin/boxlet-guest"
        ])
        .stdout,
        b"#!agent"
    );
    assert!(ok(&["ext4", "ls", img.to_str().unwrap(), "/boxlet/bin"]).contains("-rwx------"));
    fails_naming(
        &[
            "ext4",
            "inject",
            img.to_str().unwrap(),
            agent.to_str().unwrap(),
            "/etc/hostname/x",
        ],
        &img,
        "not a directory",
    );
}

#[test]
fn ext4_build_from_layers() {
    let dir = tempfile::TempDir::new().unwrap();
    let mk = |name: &str, files: &[(&str, &[u8])]| {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_path(p).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        let path = dir.path().join(name);
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        path
    };
    let l1 = mk("l1.tar", &[("etc/a", b"one"), ("etc/b", b"two")]);
    let l2 = mk("l2.tar", &[("etc/.wh.a", b""), ("etc/c", b"three")]);
    let img = dir.path().join("out.img");
    ok(&[
        "ext4",
        "build",
        img.to_str().unwrap(),
        "--layer",
        l1.to_str().unwrap(),
        "--layer",
        l2.to_str().unwrap(),
    ]);
    let ls = ok(&["ext4", "ls", img.to_str().unwrap(), "/etc"]);
    assert!(
        !ls.contains(" a\n") && ls.contains(" b\n") && ls.contains(" c\n"),
        "{ls}"
    );
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, vec![0x1f, 0x8b, 0, 1, 2, 3]).unwrap();
    fails_naming(
        &[
            "ext4",
            "build",
            dir.path().join("x.img").to_str().unwrap(),
            "--layer",
            bad.to_str().unwrap(),
        ],
        &bad,
        "layer",
    );
}
