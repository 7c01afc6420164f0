//! Image, base-disk and box records, and the blob reference counts they keep.

mod common;

use boxlet_cas::{
    unix_now, Algorithm, BaseDisk, BaseDiskId, BaseDiskKind, BoxId, BoxRecord, BoxState, CasError,
    Digest, DiskInfo, Store,
};
use common::{image, put, store};

fn refs(store: &Store, d: &Digest) -> u64 {
    store.stat(d).unwrap().unwrap().references
}

#[test]
fn images_count_references_and_refuse_blobs_the_store_lacks() {
    let (_dir, store) = store();
    let a = image(&store, "a:1", &[b"base layer", b"app layer"]);
    let base = a.layers[0];
    assert_eq!(refs(&store, &base), 1);
    assert_eq!(store.image("a:1").unwrap(), Some(a.clone()));

    let b = image(&store, "b:1", &[b"base layer"]);
    assert_eq!(b.layers[0], base);
    assert_eq!(
        refs(&store, &base),
        2,
        "a shared layer is stored once, named twice"
    );

    // Replacing a reference moves its counts.
    let mut a2 = a.clone();
    a2.layers = vec![put(&store, b"new app layer").digest];
    store.put_image(&a2).unwrap();
    assert_eq!(refs(&store, &base), 1);
    assert_eq!(refs(&store, &a.layers[1]), 0);

    let missing = Digest::of(Algorithm::Sha256, b"never stored");
    let mut bad = b.clone();
    bad.reference = "bad:1".into();
    bad.layers.push(missing);
    let err = store.put_image(&bad).unwrap_err();
    assert!(
        matches!(&err, CasError::MissingBlob { what, digest } if what == "image bad:1" && *digest == missing),
        "{err}"
    );
    assert_eq!(
        store.image("bad:1").unwrap(),
        None,
        "nothing of a refused image is kept"
    );
    assert_eq!(refs(&store, &base), 1, "nor its reference counts");

    let removed = store.remove_image("b:1").unwrap();
    assert_eq!(removed, b);
    assert_eq!(refs(&store, &base), 0);
    assert!(matches!(
        store.remove_image("b:1"),
        Err(CasError::NoRecord(_))
    ));
    let refs_of: Vec<_> = store
        .images()
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(refs_of, ["a:1"]);
    assert!(store.verify().unwrap().problems.is_empty());
}

fn base_disk(
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

#[test]
fn base_disks_are_unique_per_source_and_name() {
    let (_dir, store) = store();
    let first = base_disk(
        "first123",
        "__global__",
        Some("abc-def"),
        BaseDiskKind::Rootfs,
        1,
    );
    store.insert_base_disk(&first).unwrap();
    assert_eq!(
        store.find_base_disk("__global__", "abc-def").unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.base_disk(first.id).unwrap(), Some(first.clone()));

    // The loser of a race gets a conflict, and the winner's record stays.
    let loser = base_disk(
        "second12",
        "__global__",
        Some("abc-def"),
        BaseDiskKind::Rootfs,
        2,
    );
    let err = store.insert_base_disk(&loser).unwrap_err();
    assert!(
        matches!(err, CasError::Conflict(ref m) if m.contains("first123")),
        "{err}"
    );
    assert_eq!(store.base_disk(loser.id).unwrap(), None);
    assert_eq!(
        store.find_base_disk("__global__", "abc-def").unwrap(),
        Some(first.clone())
    );

    // The same ID twice is a conflict too.
    let same_id = base_disk("first123", "box00001", None, BaseDiskKind::Snapshot, 3);
    assert!(matches!(
        store.insert_base_disk(&same_id),
        Err(CasError::Conflict(_))
    ));

    // The same name under another source, and unnamed disks, are fine.
    let other = base_disk(
        "other123",
        "box00001",
        Some("abc-def"),
        BaseDiskKind::Snapshot,
        4,
    );
    let unnamed1 = base_disk("unnamed1", "box00001", None, BaseDiskKind::Snapshot, 5);
    let unnamed2 = base_disk("unnamed2", "box00001", None, BaseDiskKind::Image, 6);
    for d in [&other, &unnamed1, &unnamed2] {
        store.insert_base_disk(d).unwrap();
    }
    let ids = |v: Vec<BaseDisk>| v.into_iter().map(|d| d.id.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_base_disks("box00001", None).unwrap()),
        ["other123", "unnamed1", "unnamed2"]
    );
    assert_eq!(
        ids(store
            .list_base_disks("box00001", Some(BaseDiskKind::Snapshot))
            .unwrap()),
        ["other123", "unnamed1"]
    );
    assert_eq!(
        ids(store
            .list_base_disks("__global__", Some(BaseDiskKind::Rootfs))
            .unwrap()),
        ["first123"]
    );
    assert!(store.list_base_disks("nobody", None).unwrap().is_empty());

    // Deleting frees the name.
    assert!(store.delete_base_disk(first.id).unwrap());
    assert!(!store.delete_base_disk(first.id).unwrap());
    assert_eq!(store.find_base_disk("__global__", "abc-def").unwrap(), None);
    store.insert_base_disk(&loser).unwrap();
    assert_eq!(
        store.find_base_disk("__global__", "abc-def").unwrap(),
        Some(loser)
    );
}

#[test]
fn base_disk_records_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let disk = base_disk(
        "keepMe01",
        "__global__",
        Some("v1"),
        BaseDiskKind::Rootfs,
        7,
    );
    Store::open(dir.path())
        .unwrap()
        .insert_base_disk(&disk)
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.find_base_disk("__global__", "v1").unwrap(),
        Some(disk)
    );
}

fn box_record(name: Option<&str>, blobs: Vec<Digest>) -> BoxRecord {
    BoxRecord {
        id: BoxId::mint(),
        name: name.map(str::to_string),
        image: Some("a:1".into()),
        config: serde_json::json!({"cpus": 1}),
        state: BoxState::Created,
        blobs,
        created_at: unix_now(),
    }
}

#[test]
fn boxes_have_unique_names_and_hold_references() {
    let (_dir, store) = store();
    let layer = put(&store, b"layer").digest;
    let mut web = box_record(Some("web"), vec![layer]);
    store.put_box(&web).unwrap();
    assert_eq!(refs(&store, &layer), 1);
    assert_eq!(store.find_box("web").unwrap(), Some(web.clone()));

    let clash = box_record(Some("web"), vec![]);
    let err = store.put_box(&clash).unwrap_err();
    assert!(
        matches!(err, CasError::Conflict(ref m) if m.contains("web")),
        "{err}"
    );
    assert_eq!(store.get_box(clash.id).unwrap(), None);

    // Updating the same box keeps its name; renaming frees the old one.
    web.state = BoxState::Running;
    store.put_box(&web).unwrap();
    assert_eq!(
        store.get_box(web.id).unwrap().unwrap().state,
        BoxState::Running
    );
    assert_eq!(refs(&store, &layer), 1, "an update does not count twice");
    web.name = Some("api".into());
    store.put_box(&web).unwrap();
    assert_eq!(store.find_box("web").unwrap(), None);
    store.put_box(&clash).unwrap();

    let missing = Digest::of(Algorithm::Sha256, b"absent");
    let err = store.put_box(&box_record(None, vec![missing])).unwrap_err();
    assert!(matches!(err, CasError::MissingBlob { .. }), "{err}");

    assert_eq!(store.boxes().unwrap().len(), 2);
    store.remove_box(web.id).unwrap();
    assert_eq!(refs(&store, &layer), 0);
    assert_eq!(store.find_box("api").unwrap(), None);
    assert!(matches!(
        store.remove_box(web.id),
        Err(CasError::NoRecord(_))
    ));
    assert!(store.verify().unwrap().problems.is_empty());
}
