//! `boxlet store verify|gc|du` on a store under $BOXLET_HOME.

use std::os::unix::fs::PermissionsExt;

mod common;

use boxlet_cas::{Algorithm, Store};
use common::json;

fn boxlet(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    common::boxlet(home, args, "")
}

#[test]
fn verify_gc_and_du_report_on_the_store() {
    let home = tempfile::tempdir().unwrap();
    let (kept, garbage) = {
        let store = Store::open(home.path()).unwrap();
        let lease = store.lease();
        let kept = store
            .ingest_bytes(&[1u8; 5000], Algorithm::Sha256, None, &lease)
            .unwrap();
        let garbage = store
            .ingest_bytes(b"garbage", Algorithm::Blake3, None, &lease)
            .unwrap();
        store
            .put_box(&boxlet_cas::BoxRecord {
                id: boxlet_cas::BoxId::mint(),
                name: Some("b".into()),
                image: None,
                config: serde_json::Value::Null,
                state: boxlet_cas::BoxState::Stopped,
                blobs: vec![kept.digest],
                created_at: 0,
            })
            .unwrap();
        (kept, garbage)
    };

    let du = boxlet(home.path(), &["store", "du", "--json"]);
    assert!(du.status.success());
    let du = json(&du);
    assert_eq!(du["blobs"], 2);
    assert_eq!(du["blob_bytes"], 5007);
    assert_eq!(du["boxes"], 1);

    let ok = boxlet(home.path(), &["store", "verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("2 blobs"));

    let gc = boxlet(home.path(), &["store", "gc", "--json"]);
    assert!(gc.status.success());
    let gc = json(&gc);
    assert_eq!(gc["blobs_removed"], 1);
    assert_eq!(gc["bytes_freed"], garbage.size);
    assert_eq!(gc["blobs_kept"], 1);

    // A damaged blob makes verify fail and name it.
    let path = home.path().join("blobs/sha256").join(kept.digest.hex());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, [2u8; 5000]).unwrap();
    let bad = boxlet(home.path(), &["store", "verify", "--json"]);
    assert!(!bad.status.success());
    let problems = json(&bad)["problems"].as_array().unwrap().clone();
    assert_eq!(problems.len(), 1);
    assert!(problems[0]
        .as_str()
        .unwrap()
        .contains(&kept.digest.to_string()));
}
