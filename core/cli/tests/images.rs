//! `boxlet import|pull|images|unpack|rmi` on a store under $BOXLET_HOME, with the busybox
//! fixture image and a real registry.

mod common;

use std::path::Path;

use common::boxlet;

use boxlet_testkit::registry::Registry;

fn ok(home: &Path, args: &[&str]) -> String {
    let out = boxlet(home, args, "");
    assert!(
        out.status.success(),
        "boxlet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn import_list_unpack_remove_and_collect() {
    let fixture = boxlet_testkit::busybox_image();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let layout = fixture.join("layout");
    let record: serde_json::Value = serde_json::from_str(&ok(
        h,
        &[
            "import",
            layout.to_str().unwrap(),
            "--name",
            "boxlet/busybox:1",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(record["reference"], "docker.io/boxlet/busybox:1");
    ok(
        h,
        &[
            "import",
            fixture.join("docker-archive.tar").to_str().unwrap(),
        ],
    );

    let images: serde_json::Value = serde_json::from_str(&ok(h, &["images", "--json"])).unwrap();
    let refs: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        refs,
        [
            "docker.io/boxlet/busybox:1",
            "docker.io/boxlet/busybox:latest"
        ]
    );
    assert!(ok(h, &["images"]).contains("linux/amd64"));

    let root = h.join("unpacked");
    let msg = ok(h, &["unpack", "boxlet/busybox:1", root.to_str().unwrap()]);
    assert!(msg.contains("1 whiteouts"), "{msg}");
    assert!(root.join("bin/busybox").is_file());

    let missing = boxlet(
        h,
        &["unpack", "nothing:here", h.join("x").to_str().unwrap()],
        "",
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nothing:here"));

    ok(h, &["rmi", "boxlet/busybox:1"]);
    ok(h, &["rmi", "boxlet/busybox:latest"]);
    let gc: serde_json::Value = serde_json::from_str(&ok(h, &["store", "gc", "--json"])).unwrap();
    assert!(gc["blobs_removed"].as_u64().unwrap() >= 4, "{gc}");
    let du: serde_json::Value = serde_json::from_str(&ok(h, &["store", "du", "--json"])).unwrap();
    assert_eq!(du["blobs"], 0);
}

#[test]
fn pull_from_a_registry_with_a_password_on_stdin() {
    let fixture = boxlet_testkit::busybox_image();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let registry = Registry::start(Some(&format!("me:{hash}\n")));
    let src = format!("oci:{}:latest", fixture.join("layout").display());
    registry.push(&src, "team/busybox:2", Some("me:pw"));
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/team/busybox:2", registry.addr);

    let denied = boxlet(home.path(), &["pull", "--insecure", &reference], "");
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains(&reference));

    // Credentials over plain HTTP only when asked for.
    let refused = boxlet(
        home.path(),
        &["pull", "--insecure", "--user", "me", &reference],
        "pw\n",
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--credentials-over-http"));
    // A token never on the command line.
    let token = boxlet(home.path(), &["pull", "--token", "t0k3n", &reference], "");
    assert!(!token.status.success());
    let out = boxlet(
        home.path(),
        &[
            "pull",
            "--insecure",
            "--credentials-over-http",
            "--user",
            "me",
            "--json",
            &reference,
        ],
        "pw\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["reference"], reference.as_str());
    assert_eq!(record["layers"].as_array().unwrap().len(), 2);
    let verify = ok(home.path(), &["store", "verify"]);
    assert!(verify.contains("0 problems"), "{verify}");
}

#[test]
fn an_import_of_a_directory_without_a_layout_names_it_and_its_cause_once() {
    let home = tempfile::tempdir().unwrap();
    // A directory, but no `oci-layout` in it.
    let missing = home.path().join("no-such-layout");
    std::fs::create_dir(&missing).unwrap();
    let out = boxlet(home.path(), &["import", missing.to_str().unwrap()], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-layout/oci-layout"), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );
}
