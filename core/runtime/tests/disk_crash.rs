//! A Disk prepare failed or killed at every step: the next start finds a consistent home
//! (staging swept, no base file without a record, no record without a file) and builds
//! again what was not committed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use boxlet::rootfs::{
    AgentBinary, DiskStrategy, Home, PrepareHook, PrepareRequest, PrepareStep, RootfsError,
};
use boxlet::RootfsStrategy;
use boxlet_cas::{BoxId, Store};

const AGENT: &[u8] = b"#!/bin/sh\n# stands in for the agent\n";

/// A home with the busybox image imported, and an agent file.
fn fresh() -> (tempfile::TempDir, Home, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    // The store is closed again: each drill opens the home itself.
    let (home, _) = boxlet_testkit::busybox_home(dir.path());
    let agent = dir.path().join("agent");
    std::fs::write(&agent, AGENT).unwrap();
    (dir, home, agent)
}

/// Start again on `home`, check it is consistent, and prepare a box.
async fn restart_and_check(home: &Home, agent: &Path, drill: &str) {
    let store = Arc::new(Store::open(home.root()).unwrap());
    assert_eq!(
        std::fs::read_dir(home.tmp()).unwrap().count(),
        0,
        "{drill}: staging left in tmp/"
    );
    let disk = DiskStrategy::new(
        home.clone(),
        store.clone(),
        AgentBinary {
            path: agent.into(),
            build_hash: None,
        },
    )
    .unwrap();
    let check_bases = |when: &str| {
        let recorded: Vec<PathBuf> = store
            .all_base_disks()
            .unwrap()
            .iter()
            .map(|d| PathBuf::from(&d.disk_info.base_path))
            .collect();
        for p in &recorded {
            assert!(
                p.is_file(),
                "{drill} ({when}): a record names the missing {}",
                p.display()
            );
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(home.bases())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut want = recorded.clone();
        want.sort();
        assert_eq!(
            files, want,
            "{drill} ({when}): base files and records differ"
        );
    };
    check_bases("after restart");
    let id = BoxId::mint();
    let rootfs = disk
        .prepare(&PrepareRequest {
            image: Some("busybox:1".into()),
            box_id: id,
        })
        .await
        .unwrap();
    let base = boxlet_qcow2::read_backing_file_path(&rootfs.path)
        .unwrap()
        .unwrap();
    let fs = boxlet_ext4::Ext4::open(base.as_ref()).unwrap();
    let agent_inode = fs.resolve("/boxlet/bin/boxlet-guest", true).unwrap();
    assert_eq!(fs.read_inode(&agent_inode, 4096).unwrap(), AGENT, "{drill}");
    check_bases("after the next prepare");
    assert_eq!(
        store.all_base_disks().unwrap().len(),
        2,
        "{drill}: image disk and base"
    );
    assert!(store.verify().unwrap().problems.is_empty(), "{drill}");
}

#[tokio::test]
async fn a_failure_at_every_step_of_a_disk_prepare_recovers() {
    for step in PrepareStep::ALL {
        let (_dir, home, agent) = fresh();
        {
            let store = Arc::new(Store::open(home.root()).unwrap());
            let hook = PrepareHook::new(move |s| s != step);
            let disk = DiskStrategy::with_hook(
                home.clone(),
                store,
                AgentBinary {
                    path: agent.clone(),
                    build_hash: None,
                },
                hook,
            )
            .unwrap();
            let err = disk
                .prepare(&PrepareRequest {
                    image: Some("busybox:1".into()),
                    box_id: BoxId::mint(),
                })
                .await
                .unwrap_err();
            assert!(
                matches!(err, RootfsError::Fault(s) if s == step),
                "{step:?}: {err}"
            );
        }
        restart_and_check(&home, &agent, &format!("failing at {step:?}")).await;
    }
}

#[tokio::test]
async fn a_kill_at_every_step_of_a_disk_prepare_recovers() {
    let exe = std::env::current_exe().unwrap();
    let drill = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/rootfs_drill");
    assert!(
        drill.is_file(),
        "{} is missing: `cargo test -p boxlet` builds it",
        drill.display()
    );
    for step in PrepareStep::ALL {
        let (_dir, home, agent) = fresh();
        let status = Command::new(&drill)
            .arg(home.root())
            .args(["busybox:1", agent.to_str().unwrap(), &format!("{step:?}")])
            .status()
            .unwrap();
        assert!(!status.success(), "{step:?}: the drill was not killed");
        restart_and_check(&home, &agent, &format!("killed at {step:?}")).await;
    }
}
