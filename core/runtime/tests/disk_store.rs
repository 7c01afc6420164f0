//! The `DiskStore` behaviours the base-disk manager relies on, on both implementations:
//! boxlet's redb store and the in-memory one.

use boxlet::disk_store::{BaseDisk, BaseDiskId, BaseDiskKind, DiskInfo};
use boxlet::{DiskStore, DiskStoreError, MemoryDiskStore};

const GLOBAL: &str = "__global__";

fn disk(
    id: &str,
    source: &str,
    name: Option<&str>,
    kind: BaseDiskKind,
    created_at: i64,
) -> BaseDisk {
    BaseDisk {
        id: BaseDiskId::parse(id).unwrap(),
        source_box_id: source.into(),
        name: name.map(str::to_string),
        kind,
        disk_info: DiskInfo {
            base_path: format!("/bases/{id}.ext4"),
            container_disk_bytes: 0,
            size_bytes: 100,
        },
        created_at,
        blob: None,
    }
}

fn ids(v: Vec<BaseDisk>) -> Vec<String> {
    v.into_iter().map(|d| d.id.to_string()).collect()
}

/// Every behaviour, on one store.
fn behaves(store: &dyn DiskStore) {
    // Nothing is found in an empty store.
    assert_eq!(store.find_by_name(GLOBAL, "nonexistent-key").unwrap(), None);
    assert!(store.list_by_source(GLOBAL, None).unwrap().is_empty());

    // A record is found by its source and name.
    let first = disk(
        "aB3xQ9mP",
        GLOBAL,
        Some("test-version"),
        BaseDiskKind::Rootfs,
        10,
    );
    store.insert(&first).unwrap();
    assert_eq!(
        store.find_by_name(GLOBAL, "test-version").unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.find_by_name("box00001", "test-version").unwrap(),
        None
    );

    // UNIQUE(source, name): the second insert of a name loses, and the first stays.
    let raced = disk(
        "second12",
        GLOBAL,
        Some("test-version"),
        BaseDiskKind::Rootfs,
        11,
    );
    assert!(matches!(
        store.insert(&raced),
        Err(DiskStoreError::Conflict(_))
    ));
    assert_eq!(
        store.find_by_name(GLOBAL, "test-version").unwrap(),
        Some(first.clone())
    );
    // ... and so does a second record with the same ID.
    let same_id = disk("aB3xQ9mP", "box00001", None, BaseDiskKind::Snapshot, 12);
    assert!(matches!(
        store.insert(&same_id),
        Err(DiskStoreError::Conflict(_))
    ));

    // Listing filters by source and kind, oldest first.
    for d in [
        disk(
            "zzzz0001",
            GLOBAL,
            Some("old-version"),
            BaseDiskKind::Rootfs,
            5,
        ),
        disk("imgdisk1", GLOBAL, Some("img"), BaseDiskKind::Image, 6),
        disk(
            "snap0001",
            "box00001",
            Some("test-version"),
            BaseDiskKind::Snapshot,
            7,
        ),
        disk("snap0002", "box00001", None, BaseDiskKind::Snapshot, 8),
    ] {
        store.insert(&d).unwrap();
    }
    assert_eq!(
        ids(store
            .list_by_source(GLOBAL, Some(BaseDiskKind::Rootfs))
            .unwrap()),
        ["zzzz0001", "aB3xQ9mP"]
    );
    assert_eq!(
        ids(store.list_by_source(GLOBAL, None).unwrap()),
        ["zzzz0001", "imgdisk1", "aB3xQ9mP"]
    );
    assert_eq!(
        ids(store.list_by_source("box00001", None).unwrap()),
        ["snap0001", "snap0002"]
    );

    // Deleting removes the record and frees its name.
    assert!(store.delete(first.id).unwrap());
    assert!(!store.delete(first.id).unwrap());
    assert_eq!(store.find_by_name(GLOBAL, "test-version").unwrap(), None);
    store.insert(&raced).unwrap();
    assert_eq!(
        store.find_by_name(GLOBAL, "test-version").unwrap(),
        Some(raced)
    );
}

#[test]
fn the_redb_store_keeps_every_disk_store_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let store = boxlet_cas::Store::open(dir.path()).unwrap();
    behaves(&store);
}

#[test]
fn the_memory_store_keeps_every_disk_store_behaviour() {
    behaves(&MemoryDiskStore::new());
}

#[test]
fn concurrent_inserts_of_one_name_have_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let redb_store = boxlet_cas::Store::open(dir.path()).unwrap();
    let memory = MemoryDiskStore::new();
    for store in [&redb_store as &dyn DiskStore, &memory] {
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..10)
                .map(|_| {
                    s.spawn(|| {
                        let d = disk(
                            BaseDiskId::mint().as_str(),
                            GLOBAL,
                            Some("hot-key"),
                            BaseDiskKind::Rootfs,
                            1,
                        );
                        match store.insert(&d) {
                            Ok(()) => 1,
                            Err(DiskStoreError::Conflict(_)) => 0,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(store.list_by_source(GLOBAL, None).unwrap().len(), 1);
    }
}
