//! Blobs: ingest, verification against announced digests, duplicates, the temporary area,
//! exclusive opening.

mod common;

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;

use boxlet_cas::{Algorithm, CasError, Digest, Expected, Store};
use common::{entries, put, store};

/// A reader that fails the test if it is read at all.
struct MustNotRead;

impl Read for MustNotRead {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        panic!("the store read content it already held");
    }
}

/// A reader that yields `left` bytes of `b'x'` and counts what it gave.
struct Counting {
    left: u64,
    given: u64,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        buf[..n].fill(b'x');
        self.left -= n as u64;
        self.given += n as u64;
        Ok(n)
    }
}

#[test]
fn ingested_content_is_named_by_its_digest_read_only_and_indexed() {
    let (dir, store) = store();
    let data = b"hello, boxlet".repeat(1000);
    for alg in Algorithm::ALL {
        let lease = store.lease();
        let info = store.ingest_bytes(&data, alg, None, &lease).unwrap();
        assert_eq!(info.digest, Digest::of(alg, &data));
        assert_eq!(info.size, data.len() as u64);
        assert!(lease.holds(&info.digest));
        let path = store.blob_path(&info.digest);
        assert_eq!(
            path,
            dir.path()
                .join("blobs")
                .join(alg.name())
                .join(info.digest.hex())
        );
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o400, "blobs are read-only and private");
        assert_eq!(store.stat(&info.digest).unwrap(), Some(info.clone()));
        assert!(store.contains(&info.digest).unwrap());
        assert_eq!(store.read_blob(&info.digest, 1 << 20).unwrap(), data);
    }
    assert_eq!(store.list_blobs().unwrap().len(), 2);
    assert!(entries(&dir.path().join("tmp")).is_empty());
}

#[test]
fn a_stored_blob_announced_again_is_not_read() {
    let (_dir, store) = store();
    let info = put(&store, b"layer");
    let lease = store.lease();
    let again = store
        .ingest(
            &mut MustNotRead,
            Algorithm::Sha256,
            Some(Expected::new(info.digest, info.size)),
            &lease,
        )
        .unwrap();
    assert_eq!(again, info);
    assert!(lease.holds(&info.digest), "a duplicate is leased too");
}

#[test]
fn content_that_does_not_match_its_announcement_is_refused_and_not_kept() {
    let (dir, store) = store();
    let lease = store.lease();
    let claimed = Digest::of(Algorithm::Sha256, b"what was promised");

    let err = store
        .ingest_bytes(
            b"something else",
            Algorithm::Sha256,
            Some(Expected {
                digest: claimed,
                size: None,
            }),
            &lease,
        )
        .unwrap_err();
    match &err {
        CasError::DigestMismatch { expected, actual } => {
            assert_eq!(*expected, claimed);
            assert_eq!(*actual, Digest::of(Algorithm::Sha256, b"something else"));
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().contains(&claimed.to_string()));

    let short = store
        .ingest_bytes(
            b"12345",
            Algorithm::Sha256,
            Some(Expected::new(claimed, 6)),
            &lease,
        )
        .unwrap_err();
    assert!(
        matches!(
            short,
            CasError::SizeMismatch {
                expected: 6,
                actual: 5,
                truncated: false,
                ..
            }
        ),
        "{short}"
    );

    // Content longer than announced is cut off early, not read to its end.
    let mut endless = Counting {
        left: 1 << 30,
        given: 0,
    };
    let long = store
        .ingest(
            &mut endless,
            Algorithm::Sha256,
            Some(Expected::new(claimed, 10)),
            &lease,
        )
        .unwrap_err();
    assert!(
        matches!(
            long,
            CasError::SizeMismatch {
                truncated: true,
                ..
            }
        ),
        "{long}"
    );
    assert!(
        endless.given <= 2 << 20,
        "read {} bytes of an endless stream",
        endless.given
    );

    let wrong_alg = store
        .ingest_bytes(
            b"x",
            Algorithm::Blake3,
            Some(Expected::new(claimed, 1)),
            &lease,
        )
        .unwrap_err();
    assert!(
        matches!(wrong_alg, CasError::AlgorithmMismatch { .. }),
        "{wrong_alg}"
    );

    assert!(store.list_blobs().unwrap().is_empty());
    assert!(entries(&dir.path().join("tmp")).is_empty());
    assert!(entries(&dir.path().join("blobs/sha256")).is_empty());
}

#[test]
fn a_failing_source_stores_nothing_and_names_the_blob() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("connection reset"))
        }
    }
    let (dir, store) = store();
    let digest = Digest::of(Algorithm::Sha256, b"x");
    let err = store
        .ingest(
            &mut Broken,
            Algorithm::Sha256,
            Some(Expected::new(digest, 1)),
            &store.lease(),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&digest.to_string()) && msg.contains("connection reset"),
        "{msg}"
    );
    assert!(entries(&dir.path().join("tmp")).is_empty());
}

#[test]
fn a_writer_commits_pieces_and_a_dropped_writer_leaves_nothing() {
    let (dir, store) = store();
    let mut w = store.writer(Algorithm::Blake3, None).unwrap();
    for piece in [&b"ab"[..], b"", b"cdef"] {
        w.push(piece).unwrap();
    }
    assert_eq!(w.written(), 6);
    let info = w.commit(&store.lease()).unwrap();
    assert_eq!(info.digest, Digest::of(Algorithm::Blake3, b"abcdef"));

    let mut w = store.writer(Algorithm::Sha256, None).unwrap();
    w.push(b"abandoned").unwrap();
    assert_eq!(entries(&dir.path().join("tmp")).len(), 1);
    drop(w);
    assert!(entries(&dir.path().join("tmp")).is_empty());
    assert_eq!(store.list_blobs().unwrap().len(), 1);
}

#[test]
fn concurrent_ingests_of_the_same_content_store_it_once() {
    let (dir, store) = store();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let infos: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| put(&store, &data))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(infos.windows(2).all(|w| w[0].digest == w[1].digest));
    assert_eq!(store.list_blobs().unwrap().len(), 1);
    assert_eq!(
        std::fs::read(store.blob_path(&infos[0].digest)).unwrap(),
        data
    );
    assert!(entries(&dir.path().join("tmp")).is_empty());
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn leftovers_in_tmp_are_swept_at_open_and_blobs_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let info = {
        let store = Store::open(dir.path()).unwrap();
        put(&store, b"kept across opens")
    };
    std::fs::write(dir.path().join("tmp/ingest-deadbeef"), b"half a layer").unwrap();
    std::fs::create_dir_all(dir.path().join("tmp/stage-1/nested")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(entries(&dir.path().join("tmp")).is_empty());
    assert_eq!(
        store.read_blob(&info.digest, 100).unwrap(),
        b"kept across opens"
    );
}

#[test]
fn a_store_opened_twice_is_refused_with_its_index_named() {
    let (dir, _store) = store();
    let err = Store::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("boxlet.redb"), "{err}");
}

#[test]
fn an_orphan_file_is_replaced_by_the_next_ingest_of_its_content() {
    let (_dir, store) = store();
    let digest = Digest::of(Algorithm::Sha256, b"real content");
    let path = store.blob_path(&digest);
    std::fs::write(&path, b"torn write").unwrap();
    assert!(!store.contains(&digest).unwrap());
    let info = put(&store, b"real content");
    assert_eq!(info.digest, digest);
    assert_eq!(std::fs::read(&path).unwrap(), b"real content");
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn read_blob_refuses_content_that_no_longer_matches() {
    let (_dir, store) = store();
    let info = put(&store, b"{\"schemaVersion\":2}");
    let path = store.blob_path(&info.digest);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, b"{\"schemaVersion\":3}").unwrap();
    let err = store.read_blob(&info.digest, 100).unwrap_err();
    assert!(matches!(err, CasError::DigestMismatch { .. }), "{err}");
    let too_big = store.read_blob(&info.digest, 4).unwrap_err();
    assert!(
        matches!(too_big, CasError::SizeMismatch { .. }),
        "{too_big}"
    );
    let missing = Digest::of(Algorithm::Sha256, b"never stored");
    assert!(matches!(store.read_blob(&missing, 4), Err(CasError::NotFound(d)) if d == missing));
}

#[test]
fn another_local_user_can_read_neither_the_store_nor_a_blob() {
    if !rustix_is_root() {
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    let (dir, store) = store();
    let info = put(&store, b"a secret layer");
    let root_mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
    assert_eq!(root_mode & 0o777, 0o700);
    // Even with the root opened up, the blob itself is its owner's only.
    let as_nobody = |args: &[&std::path::Path]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .args(args)
            .output()
            .unwrap()
    };
    let blob = store.blob_path(&info.digest);
    let out = as_nobody(&[&blob]);
    assert!(
        !out.status.success(),
        "nobody read the blob through a 0700 root"
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    for d in [
        dir.path().join("blobs"),
        blob.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let out = as_nobody(&[&blob]);
    assert!(!out.status.success(), "nobody read a 0400 blob");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
}

fn rustix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false)
}
