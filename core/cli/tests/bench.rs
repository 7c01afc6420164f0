//! `boxlet bench strategies` reports what it measured, and never a time for a step that
//! failed in the guest: that cell is empty, the reason is given, and the bench exits
//! non-zero. Needs `make setup` and BOXLET_AGENT (`make test` sets it).

mod common;

use common::boxlet as run;

#[test]
fn a_step_that_fails_in_the_guest_gets_no_time_and_fails_the_bench() {
    assert!(
        std::env::var_os("BOXLET_AGENT").is_some(),
        "BOXLET_AGENT: `make test` sets it"
    );
    // The busybox box tree with a file where /root was: the write step cannot write.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(boxlet_testkit::box_tree())
        .arg(&tree)
        .status()
        .unwrap();
    assert!(cp.success());
    std::fs::remove_dir_all(tree.join("root")).unwrap();
    std::fs::write(tree.join("root"), b"not a directory\n").unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success(), "{tar:?}");
    let layout = boxlet_testkit::hostile::layout_with_layer(
        &dir.path().join("nodd"),
        &tar.stdout,
        "/bin/sh",
    );
    let home = dir.path().join("home");
    let out = run(
        &home,
        &["import", layout.to_str().unwrap(), "--name", "nodd:1"],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let out = run(
        &home,
        &[
            "bench",
            "strategies",
            "--image",
            "nodd:1",
            "--strategy",
            "disk",
            "--runs",
            "1",
            "--backend",
            "qemu",
            "--json",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let doc = common::json(&out);
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "only the strategy asked for: {doc}");
    let row = &rows[0];
    assert_eq!(row["strategy"], "disk");
    assert!(row["write_fsync_100m_ms"].is_null(), "{row}");
    let failed = row["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{row}");
    let why = failed[0].as_str().unwrap();
    assert!(
        why.starts_with("write+fsync 100M: exit 1 (dd: ") && why.contains("/root/boxlet-bench"),
        "{row}"
    );
    // The steps that ran have their times.
    assert!(row["read_usr_ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["find_ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["ready_ms"].as_f64().unwrap() > 0.0, "{row}");
}
