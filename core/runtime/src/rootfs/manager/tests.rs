//! The seed's GuestRootfsManager behaviours, each on both `DiskStore`s (redb and memory).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use boxlet_cas::{BaseDisk, BaseDiskId, BaseDiskKind, DiskInfo};

use super::{AgentBinary, GuestRootfsManager, AGENT_IN_GUEST, GLOBAL_SOURCE};
use crate::disk_store::{DiskStore, DiskStoreError, MemoryDiskStore};
use crate::rootfs::RootfsError;

/// Both stores, each with the directory that keeps it alive.
fn stores() -> Vec<(Arc<dyn DiskStore>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let redb = boxlet_cas::Store::open(dir.path().join("store")).unwrap();
    vec![
        (Arc::new(redb) as Arc<dyn DiskStore>, dir),
        (
            Arc::new(MemoryDiskStore::new()),
            tempfile::tempdir().unwrap(),
        ),
    ]
}

fn agent(dir: &Path) -> AgentBinary {
    let path = dir.join("boxlet-guest");
    if !path.exists() {
        std::fs::write(&path, b"#!/bin/sh\necho pretend agent\n").unwrap();
    }
    AgentBinary {
        path,
        build_hash: None,
    }
}

fn manager(store: &Arc<dyn DiskStore>, dir: &Path) -> GuestRootfsManager {
    GuestRootfsManager::new(
        store.clone(),
        dir.join("bases"),
        dir.join("tmp"),
        agent(dir),
    )
}

fn record(store: &Arc<dyn DiskStore>, id: &str, version_key: &str, path: &Path) {
    store
        .insert(&BaseDisk {
            id: BaseDiskId::parse(id).unwrap(),
            source_box_id: GLOBAL_SOURCE.into(),
            name: Some(version_key.into()),
            kind: BaseDiskKind::Rootfs,
            disk_info: DiskInfo {
                base_path: path.display().to_string(),
                container_disk_bytes: 0,
                size_bytes: 100,
            },
            created_at: 0,
            blob: None,
        })
        .unwrap();
}

#[test]
fn version_keys() {
    let key = GuestRootfsManager::version_key;
    assert_eq!(
        key(
            "sha256:abcdef123456789012345678",
            "fedcba987654321012345678"
        ),
        "abcdef123456-fedcba987654"
    );
    assert_eq!(
        key("abcdef123456789012", "111222333444555666"),
        "abcdef123456-111222333444"
    );
    assert_eq!(key("abc", "def"), "abc-def");
}

#[test]
fn find_is_none_for_a_missing_key_and_the_base_for_a_recorded_one() {
    for (store, dir) in stores() {
        let mgr = manager(&store, dir.path());
        assert_eq!(mgr.find("nonexistent-key").unwrap(), None);
        let cached = dir.path().join("aB3xQ9mP.ext4");
        std::fs::write(&cached, "fake disk").unwrap();
        record(&store, "aB3xQ9mP", "test-version", &cached);
        assert_eq!(mgr.find("test-version").unwrap(), Some(cached));
    }
}

#[test]
fn find_drops_a_record_whose_file_is_gone() {
    for (store, dir) in stores() {
        record(
            &store,
            "aB3xQ9mP",
            "ghost-key",
            &dir.path().join("ghost.ext4"),
        );
        let mgr = manager(&store, dir.path());
        assert_eq!(mgr.find("ghost-key").unwrap(), None);
        assert_eq!(
            store.find_by_name(GLOBAL_SOURCE, "ghost-key").unwrap(),
            None
        );
    }
}

#[test]
fn install_creates_bases_and_records_the_file_under_a_base_disk_id() {
    for (store, dir) in stores() {
        let mgr = manager(&store, dir.path());
        let staged = dir.path().join("staged.ext4");
        std::fs::write(&staged, "staged disk content").unwrap();
        let path = mgr.install("ver-key", &staged).unwrap();
        assert!(path.starts_with(dir.path().join("bases")));
        assert_eq!(path.extension().unwrap(), "ext4");
        assert!(BaseDiskId::parse(&path.file_stem().unwrap().to_string_lossy()).is_ok());
        assert_eq!(std::fs::read(&path).unwrap(), b"staged disk content");
        assert!(!staged.exists());
        let rec = store
            .find_by_name(GLOBAL_SOURCE, "ver-key")
            .unwrap()
            .unwrap();
        assert_eq!(rec.kind, BaseDiskKind::Rootfs);
        assert_eq!(rec.disk_info.base_path, path.display().to_string());
    }
}

#[test]
fn install_returns_the_existing_base_when_another_installed_first() {
    for (store, dir) in stores() {
        let bases = dir.path().join("bases");
        std::fs::create_dir_all(&bases).unwrap();
        let existing = bases.join("first123.ext4");
        std::fs::write(&existing, "first install").unwrap();
        record(&store, "first123", "raced-key", &existing);
        let mgr = manager(&store, dir.path());
        let staged = dir.path().join("staged.ext4");
        std::fs::write(&staged, "second install").unwrap();
        let path = mgr.install("raced-key", &staged).unwrap();
        assert_eq!(path, existing);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first install");
    }
}

/// A store where another runtime records its base for every name just before ours.
#[derive(Debug)]
struct Racing {
    inner: Arc<dyn DiskStore>,
    winner: PathBuf,
}

impl DiskStore for Racing {
    fn insert(&self, disk: &BaseDisk) -> Result<(), DiskStoreError> {
        let mut theirs = disk.clone();
        theirs.id = BaseDiskId::mint();
        theirs.disk_info.base_path = self.winner.display().to_string();
        self.inner.insert(&theirs)?;
        self.inner.insert(disk)
    }
    fn find_by_name(&self, s: &str, n: &str) -> Result<Option<BaseDisk>, DiskStoreError> {
        self.inner.find_by_name(s, n)
    }
    fn list_by_source(
        &self,
        s: &str,
        k: Option<BaseDiskKind>,
    ) -> Result<Vec<BaseDisk>, DiskStoreError> {
        self.inner.list_by_source(s, k)
    }
    fn delete(&self, id: BaseDiskId) -> Result<bool, DiskStoreError> {
        self.inner.delete(id)
    }
}

#[test]
fn the_loser_of_an_insert_race_removes_its_file_and_returns_the_winners() {
    for (store, dir) in stores() {
        let winner = dir.path().join("winner.ext4");
        std::fs::write(&winner, "winner").unwrap();
        let racing: Arc<dyn DiskStore> = Arc::new(Racing {
            inner: store.clone(),
            winner: winner.clone(),
        });
        let mgr = manager(&racing, dir.path());
        let staged = dir.path().join("staged.ext4");
        std::fs::write(&staged, "loser").unwrap();
        assert_eq!(mgr.install("hot-key", &staged).unwrap(), winner);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("bases"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "the loser's file stayed: {left:?}");
        assert_eq!(store.list_by_source(GLOBAL_SOURCE, None).unwrap().len(), 1);
    }
}

fn two_stale(store: &Arc<dyn DiskStore>, bases: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(bases).unwrap();
    let (a, b) = (bases.join("aaa11111.ext4"), bases.join("bbb22222.ext4"));
    std::fs::write(&a, "old1").unwrap();
    std::fs::write(&b, "old2").unwrap();
    record(store, "aaa11111", "img123-oldguest1", &a);
    record(store, "bbb22222", "img456-oldguest2", &b);
    (a, b)
}

#[test]
fn gc_removes_entries_of_other_agent_versions() {
    for (store, dir) in stores() {
        let (a, b) = two_stale(&store, &dir.path().join("bases"));
        let boxes = dir.path().join("boxes");
        std::fs::create_dir_all(&boxes).unwrap();
        let mgr = manager(&store, dir.path());
        assert_eq!(mgr.gc_inner(&boxes, "-currentguest").unwrap(), 2);
        assert!(!a.exists() && !b.exists());
        assert!(store
            .list_by_source(GLOBAL_SOURCE, None)
            .unwrap()
            .is_empty());
    }
}

#[test]
fn gc_keeps_current_version_entries() {
    for (store, dir) in stores() {
        let bases = dir.path().join("bases");
        std::fs::create_dir_all(&bases).unwrap();
        let current = bases.join("ccc33333.ext4");
        let stale = bases.join("ddd44444.ext4");
        std::fs::write(&current, "current").unwrap();
        std::fs::write(&stale, "old").unwrap();
        record(&store, "ccc33333", "img123-currentguest", &current);
        record(&store, "ddd44444", "img123-oldguest", &stale);
        let mgr = manager(&store, dir.path());
        assert_eq!(
            mgr.gc_inner(&dir.path().join("boxes"), "-currentguest")
                .unwrap(),
            1
        );
        assert!(current.exists());
        assert!(!stale.exists());
    }
}

#[test]
fn gc_keeps_a_base_a_box_overlay_names() {
    for (store, dir) in stores() {
        let (used, unused) = two_stale(&store, &dir.path().join("bases"));
        let disks = dir.path().join("boxes/box00001/disks");
        std::fs::create_dir_all(&disks).unwrap();
        let opts = boxlet_qcow2::CreateOptions {
            size: Some(1 << 20),
            ..boxlet_qcow2::CreateOptions::overlay(
                used.display().to_string(),
                boxlet_qcow2::BackingFormat::Raw,
            )
        };
        boxlet_qcow2::create(&disks.join("guest-rootfs.qcow2"), &opts).unwrap();
        let mgr = manager(&store, dir.path());
        assert_eq!(
            mgr.gc_inner(&dir.path().join("boxes"), "-currentguest")
                .unwrap(),
            1
        );
        assert!(used.exists(), "a base a box uses was removed");
        assert!(!unused.exists());

        // An overlay that cannot be read stops GC rather than risk a base in use.
        std::fs::write(disks.join("guest-rootfs.qcow2"), b"garbage").unwrap();
        assert_eq!(
            mgr.gc_inner(&dir.path().join("boxes"), "-currentguest")
                .unwrap(),
            0
        );
        assert!(used.exists());
    }
}

#[test]
fn gc_without_records_or_boxes() {
    for (store, dir) in stores() {
        let mgr = manager(&store, dir.path());
        assert_eq!(mgr.gc_inner(dir.path(), "-anything").unwrap(), 0);
        let bases = dir.path().join("bases");
        std::fs::create_dir_all(&bases).unwrap();
        let stale = bases.join("ggg77777.ext4");
        std::fs::write(&stale, "orphan").unwrap();
        record(&store, "ggg77777", "img-oldguest", &stale);
        assert_eq!(
            mgr.gc_inner(&dir.path().join("no-boxes"), "-currentguest")
                .unwrap(),
            1
        );
    }
}

/// A small ext4 image of a directory with one file.
fn image_disk(dir: &Path) -> PathBuf {
    let tree_dir = dir.join("tree");
    std::fs::create_dir_all(tree_dir.join("etc")).unwrap();
    std::fs::write(tree_dir.join("etc/hostname"), "box\n").unwrap();
    let tree = boxlet_ext4::Tree::from_dir(&tree_dir).unwrap();
    let out = dir.join("image.ext4");
    boxlet_ext4::build_file_with_layers(
        &tree,
        &out,
        &boxlet_ext4::BuildOptions::default(),
        &mut |_| Err(std::io::Error::other("no layers")),
    )
    .unwrap();
    out
}

#[test]
fn get_or_create_injects_the_agent_once_per_version_key() {
    for (store, dir) in stores() {
        let image = image_disk(dir.path());
        let before = std::fs::read(&image).unwrap();
        let mgr = manager(&store, dir.path());
        let base = mgr
            .get_or_create("sha256:0123456789abcdef", &image)
            .unwrap();
        assert_eq!(
            std::fs::read(&image).unwrap(),
            before,
            "the image disk was changed"
        );
        let fs = boxlet_ext4::Ext4::open(&base).unwrap();
        let injected = fs.resolve(AGENT_IN_GUEST, true).unwrap();
        assert_eq!(
            fs.read_inode(&injected, 1 << 20).unwrap(),
            std::fs::read(dir.path().join("boxlet-guest")).unwrap()
        );
        assert_eq!(fs.stat("/etc/hostname").unwrap().size, 4);
        let key =
            GuestRootfsManager::version_key("sha256:0123456789abcdef", mgr.agent_hash().unwrap());
        assert_eq!(mgr.find(&key).unwrap(), Some(base.clone()));
        assert_eq!(
            mgr.get_or_create("sha256:0123456789abcdef", &image)
                .unwrap(),
            base,
            "a second call is a cache hit"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "staging left behind"
        );
    }
}

#[test]
fn an_agent_that_is_not_the_build_time_one_is_an_error() {
    for (store, dir) in stores() {
        let image = image_disk(dir.path());
        let mut agent = agent(dir.path());
        agent.build_hash = Some("feedfacefeedfacefeedface".into());
        let mgr = GuestRootfsManager::new(
            store.clone(),
            dir.path().join("bases"),
            dir.path().join("tmp"),
            agent,
        );
        let err = mgr
            .get_or_create("sha256:0123456789abcdef", &image)
            .unwrap_err();
        assert!(
            matches!(err, RootfsError::AgentMismatch { ref build, .. } if build == "feedfacefeedfacefeedface"),
            "{err}"
        );
        assert!(store
            .list_by_source(GLOBAL_SOURCE, None)
            .unwrap()
            .is_empty());
    }
}

#[test]
fn the_build_embeds_the_hash_of_the_agent_it_was_built_with() {
    let agent = std::env::var_os("BOXLET_AGENT")
        .expect("BOXLET_AGENT: the static agent (`make test` sets it)");
    let embedded = AgentBinary::new("anywhere").build_hash;
    assert_eq!(
        embedded,
        Some(super::sha256_file(Path::new(&agent)).unwrap())
    );
    // So a manager built from it agrees with the agent found at run time.
    let (store, dir) = stores().remove(1);
    let mgr = GuestRootfsManager::new(
        store,
        dir.path().join("bases"),
        dir.path().join("tmp"),
        AgentBinary::new(&agent),
    );
    assert_eq!(mgr.agent_hash().unwrap(), embedded.unwrap());
}
