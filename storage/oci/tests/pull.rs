//! Pulls from a real registry (Debian's docker-registry on 127.0.0.1), with images pushed
//! by skopeo.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use boxlet_cas::Digest;
use boxlet_oci::{
    import_layout, pull, unpack, ApplyOptions, Credentials, OciError, PullOptions, PullProgress,
    Quiet, StoredImage,
};
use common::{busybox_fixture, multi_platform_layout, store, tree, Registry};

fn insecure() -> PullOptions {
    PullOptions {
        insecure: true,
        ..PullOptions::default()
    }
}

/// Plain HTTP to a test registry, credentials allowed over it.
fn insecure_with(credentials: Credentials) -> PullOptions {
    PullOptions {
        credentials,
        credentials_over_http: true,
        ..insecure()
    }
}

#[derive(Default)]
struct Counting {
    bytes: AtomicU64,
    reused: AtomicU64,
}

impl PullProgress for Counting {
    fn advanced(&self, _: &Digest, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    fn finished(&self, _: &Digest, reused: bool) {
        if reused {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test]
async fn a_pull_stores_verified_blobs_and_a_second_pull_fetches_nothing() {
    let fixture = busybox_fixture();
    let registry = Registry::start(None);
    registry.push(
        &format!("oci:{}:latest", fixture.join("layout").display()),
        "boxlet/busybox:latest",
        None,
    );
    let (dir, store) = store();
    let reference = format!("{}/boxlet/busybox:latest", registry.addr);

    let progress = Arc::new(Counting::default());
    let report = pull(&store, &reference, &insecure(), progress.clone())
        .await
        .unwrap();
    assert_eq!(report.image.reference, reference);
    assert_eq!(report.image.layers.len(), 2);
    assert_eq!(
        (report.fetched, report.reused),
        (3, 0),
        "config and two layers"
    );
    assert_eq!(progress.bytes.load(Ordering::Relaxed), report.fetched_bytes);
    assert!(store.verify().unwrap().problems.is_empty());

    // The same tree as importing the layout the registry was fed from.
    import_layout(&store, &fixture.join("layout"), Some("local")).unwrap();
    let pulled = StoredImage::open(&store, &reference).unwrap();
    let local = StoredImage::open(&store, "local").unwrap();
    assert_eq!(pulled.layers, local.layers);
    unpack(
        &store,
        &reference,
        &dir.path().join("pulled"),
        &ApplyOptions::default(),
    )
    .unwrap();
    unpack(
        &store,
        "local",
        &dir.path().join("local"),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(
        tree(&dir.path().join("pulled")),
        tree(&dir.path().join("local"))
    );

    let blobs = store.list_blobs().unwrap().len();
    let again = pull(&store, &reference, &insecure(), progress.clone())
        .await
        .unwrap();
    assert_eq!((again.fetched, again.reused), (0, 3));
    assert_eq!(again.image.manifest, report.image.manifest);
    assert_eq!(store.list_blobs().unwrap().len(), blobs);
    assert_eq!(progress.reused.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_multi_platform_image_is_pulled_for_linux_amd64() {
    let fixture = busybox_fixture();
    let registry = Registry::start(None);
    let (dir, store) = store();
    let layout = dir.path().join("multi");
    let multi = multi_platform_layout(&fixture.join("layout"), &layout);
    registry.push(
        &format!("oci:{}:1", layout.display()),
        "boxlet/multi:1",
        None,
    );
    let reference = format!("{}/boxlet/multi:1", registry.addr);
    let report = pull(&store, &reference, &insecure(), Arc::new(Quiet))
        .await
        .unwrap();
    assert_eq!(report.image.manifest, multi.amd64);
    assert_eq!(report.image.index, Some(multi.nested));
    assert_eq!(report.image.platform, "linux/amd64");
}

#[tokio::test]
async fn basic_auth_is_sent_when_given_and_its_absence_is_a_clear_error() {
    let fixture = busybox_fixture();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let registry = Registry::start(Some(&format!("boxlet:{hash}\n")));
    registry.push(
        &format!("oci:{}:latest", fixture.join("layout").display()),
        "private/busybox:latest",
        Some("boxlet:s3cret"),
    );
    let (_dir, store) = store();
    let reference = format!("{}/private/busybox:latest", registry.addr);

    let err = pull(&store, &reference, &insecure(), Arc::new(Quiet))
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Registry { .. }), "{err}");
    assert!(err.to_string().contains(&reference), "{err}");
    let wrong = insecure_with(Credentials::Basic {
        user: "boxlet".into(),
        password: "wrong".into(),
    });
    assert!(pull(&store, &reference, &wrong, Arc::new(Quiet))
        .await
        .is_err());

    let right = insecure_with(Credentials::Basic {
        user: "boxlet".into(),
        password: "s3cret".into(),
    });
    // Not over plain HTTP unless asked.
    let err = pull(
        &store,
        &reference,
        &PullOptions {
            credentials_over_http: false,
            ..right.clone()
        },
        Arc::new(Quiet),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, OciError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("--credentials-over-http"), "{err}");
    let report = pull(&store, &reference, &right, Arc::new(Quiet))
        .await
        .unwrap();
    assert_eq!(report.fetched, 3);
    assert!(store.list_blobs().unwrap().len() >= 4);
}

#[tokio::test]
async fn missing_images_and_unreachable_registries_are_errors_naming_the_reference() {
    let registry = Registry::start(None);
    let (_dir, store) = store();
    let missing = format!("{}/nobody/nothing:1", registry.addr);
    let err = pull(&store, &missing, &insecure(), Arc::new(Quiet))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");

    // Plain HTTP is refused unless asked for.
    let err = pull(&store, &missing, &PullOptions::default(), Arc::new(Quiet))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("127.0.0.1:{port}/x/y:1");
    let err = pull(&store, &nowhere, &insecure(), Arc::new(Quiet))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&nowhere), "{err}");
    assert!(store.list_blobs().unwrap().is_empty());
    assert!(store.images().unwrap().is_empty());
}

#[tokio::test]
async fn bearer_tokens_are_fetched_from_the_realm_the_registry_names() {
    let fixture = busybox_fixture();
    let src = format!("oci:{}:latest", fixture.join("layout").display());

    // Anonymous tokens, as public registries hand out.
    let public = Registry::start_with_tokens(None);
    public.push(&src, "boxlet/busybox:latest", None);
    let issued = || {
        public
            .tokens
            .as_ref()
            .unwrap()
            .issued
            .load(Ordering::SeqCst)
    };
    let before = issued();
    let (_dir, store) = store();
    let reference = format!("{}/boxlet/busybox:latest", public.addr);
    let report = pull(&store, &reference, &insecure(), Arc::new(Quiet))
        .await
        .unwrap();
    assert_eq!(report.fetched, 3);
    assert!(issued() > before, "no token was asked for");

    // Tokens only for a user's credentials: exchanged for a token, never sent to the
    // registry itself.
    let private = Registry::start_with_tokens(Some(("boxlet", "tok3n")));
    private.push(&src, "private/busybox:latest", Some("boxlet:tok3n"));
    let reference = format!("{}/private/busybox:latest", private.addr);
    let (_dir2, store) = common::store();
    let err = pull(&store, &reference, &insecure(), Arc::new(Quiet))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&reference), "{err}");
    let with_user = insecure_with(Credentials::Basic {
        user: "boxlet".into(),
        password: "tok3n".into(),
    });
    let report = pull(&store, &reference, &with_user, Arc::new(Quiet))
        .await
        .unwrap();
    assert_eq!(report.fetched, 3);
    assert!(store.verify().unwrap().problems.is_empty());

    // A realm on another host than the registry's (the registry reached as localhost,
    // its realm naming 127.0.0.1) does not get the password unless asked.
    let port = private.addr.rsplit_once(':').unwrap().1;
    let elsewhere = format!("localhost:{port}/private/busybox:latest");
    let (_dir3, store) = common::store();
    let err = pull(&store, &elsewhere, &with_user, Arc::new(Quiet))
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains("--credentials-to-any-realm"),
        "{err}"
    );
    let anywhere = PullOptions {
        credentials_to_any_realm: true,
        ..with_user
    };
    let report = pull(&store, &elsewhere, &anywhere, Arc::new(Quiet))
        .await
        .unwrap();
    assert_eq!(report.fetched, 3);
}

#[tokio::test]
async fn a_pulled_distribution_unpacks_to_the_tree_it_was_built_from() {
    let minbase = boxlet_testkit::minbase_image();
    let source = boxlet_testkit::reference_trees().join("minbase");
    let registry = Registry::start(None);
    registry.push(
        &format!("oci:{}:latest", minbase.join("layout").display()),
        "debian/minbase:bookworm",
        None,
    );
    let (dir, store) = store();
    let reference = format!("{}/debian/minbase:bookworm", registry.addr);
    pull(&store, &reference, &insecure(), Arc::new(Quiet))
        .await
        .unwrap();
    let root = dir.path().join("rootfs");
    let opts = ApplyOptions {
        devices: boxlet_oci::DevicePolicy::Create,
        owners: true,
        ..ApplyOptions::default()
    };
    let report = unpack(&store, &reference, &root, &opts).unwrap();
    assert!(report.files > 3000, "{report:?}");
    // Owners, modes (set-id bits too), contents, hard-link counts, symlinks and device
    // nodes, entry for entry, as debootstrap made them.
    let (want, got) = (tree(&source), tree(&root));
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} / {:?}", got.get(k)))
        .chain(
            got.keys()
                .filter(|k| !want.contains_key(*k))
                .map(|k| format!("{k}: extra")),
        )
        .take(20)
        .collect();
    assert!(
        differ.is_empty(),
        "{} entries, differing: {differ:#?}",
        want.len()
    );
}

/// A registry that answers `/v2/` and then serves every manifest as `body_len` bytes of
/// JSON-looking text (streamed, never held), with a Content-Length when `announce`.
async fn endless_manifest_registry(body_len: u64, announce: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req);
                if !head.contains("/manifests/") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                        )
                        .await;
                    return;
                }
                let length = if announce {
                    format!("Content-Length: {body_len}\r\n")
                } else {
                    String::new()
                };
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n{length}Connection: close\r\n\r\n"
                );
                if s.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 << 10];
                let mut sent = 0;
                while sent < body_len {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_manifest_past_four_mebibytes_is_refused_without_reading_it_whole() {
    for announce in [false, true] {
        let addr = endless_manifest_registry(1 << 30, announce).await;
        let (_dir, store) = store();
        let reference = format!("{addr}/huge/manifest:1");
        let err = pull(&store, &reference, &insecure(), Arc::new(Quiet))
            .await
            .unwrap_err();
        assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
        let e = err.to_string();
        assert!(e.contains(&reference) && e.contains("4194304"), "{e}");
        assert!(store.list_blobs().unwrap().is_empty());
    }
}
