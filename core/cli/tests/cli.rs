//! The `boxlet qcow2` commands as a script would use them.

use std::path::Path;
use std::process::{Command, Output};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_boxlet"))
        .args(["qcow2", "write", img.to_str().unwrap(), "--offset", "64K"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    assert!(child.wait().unwrap().success());
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
