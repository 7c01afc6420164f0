//! What every boxlet backend's tests share: the fixtures (guest kernel, agent, busybox
//! tree, ext4 base disks with and without the agent, qcow2 overlays) and the end-to-end
//! box suite, written once against the `Hypervisor` trait and run by each backend's own
//! tests (the QEMU backend's on any host; the KVM backend's where KVM boots Linux, such
//! as inside the nested test machine).
//!
//! Needs the guest kernel (`boxlet kernel build`, or $BOXLET_KERNEL), the static agent
//! ($BOXLET_AGENT, from scripts/build-agent.sh) and busybox-static: `make setup`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use boxlet::{boot, BootError, BootSpec, Exec, ExecEvent, Hypervisor, Root, VmExit};
use sha2::{Digest, Sha256};

/// The repository's root (its scripts and fixtures): `$BOXLET_REPO`, else where this was
/// built (a rootless run copies them where its user may read them).
pub fn repo() -> PathBuf {
    std::env::var_os("BOXLET_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Run a repository script and take its one line of output (a path).
pub fn script_output(script: &str, env: &[(&str, &str)]) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join(script))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {} (run `make setup` first)",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The guest kernel: $BOXLET_KERNEL, else the cached build.
pub fn kernel() -> PathBuf {
    std::env::var_os("BOXLET_KERNEL").map_or_else(
        || {
            script_output(
                "fixtures/kernel/build.sh",
                &[("BOXLET_KERNEL_CACHED_ONLY", "1")],
            )
        },
        PathBuf::from,
    )
}

/// The static agent ($BOXLET_AGENT).
pub fn agent() -> PathBuf {
    let p = PathBuf::from(
        std::env::var_os("BOXLET_AGENT")
            .expect("BOXLET_AGENT: the static agent (scripts/build-agent.sh; `make test` sets it)"),
    );
    assert!(p.is_file(), "{}", p.display());
    p
}

pub mod hostile;
pub mod registry;
pub mod token_server;

/// The busybox OCI image (fixtures/oci/busybox-image.sh): `layout/` (an OCI layout, tag
/// `latest`, two layers) and `docker-archive.tar`.
pub fn busybox_image() -> PathBuf {
    script_output("fixtures/oci/busybox-image.sh", &[])
}

/// A boxlet home at `dir/home` with its store, the busybox image imported as `busybox:1`.
pub fn busybox_home(dir: &Path) -> (boxlet::rootfs::Home, std::sync::Arc<boxlet_cas::Store>) {
    let home = boxlet::rootfs::Home::new(dir.join("home"));
    let store = std::sync::Arc::new(boxlet_cas::Store::open(home.root()).unwrap());
    boxlet_oci::import_layout(&store, &busybox_image().join("layout"), Some("busybox:1")).unwrap();
    (home, store)
}

/// The debootstrap minbase OCI image (fixtures/oci/minbase-image.sh): `layout/`, one
/// layer made from [`reference_trees`]`/minbase` by umoci.
pub fn minbase_image() -> PathBuf {
    script_output("fixtures/oci/minbase-image.sh", &[])
}

/// The reference trees (fixtures/rootfs/make-trees.sh): `busybox/`, `minbase/` (debootstrap
/// --variant=minbase bookworm) and their layer tarballs.
pub fn reference_trees() -> PathBuf {
    script_output("fixtures/rootfs/make-trees.sh", &[])
}

/// The busybox test tree (fixtures/rootfs/busybox-box.sh).
pub fn box_tree() -> PathBuf {
    script_output("fixtures/rootfs/busybox-box.sh", &[])
}

/// An ext4 base disk of the busybox tree, with the agent unless told otherwise.
pub fn base_disk(dir: &Path, with_agent: bool) -> PathBuf {
    let mut tree = boxlet_ext4::Tree::from_dir(&box_tree()).unwrap();
    if with_agent {
        let agent = agent();
        let size = std::fs::metadata(&agent).unwrap().len();
        tree.put(
            "/boxlet/bin/boxlet-guest",
            boxlet_ext4::Node {
                kind: boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Host {
                    path: agent,
                    size,
                }),
                meta: boxlet_ext4::NodeMeta {
                    mode: 0o755,
                    ..Default::default()
                },
            },
        )
        .unwrap();
    }
    let img = dir.join("base.ext4");
    boxlet_ext4::build_file(&tree, &img, &boxlet_ext4::BuildOptions::default()).unwrap();
    img
}

/// A qcow2 overlay `name` in `dir` over the raw `base` beside it.
pub fn overlay(dir: &Path, base: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    boxlet_qcow2::create(
        &p,
        &boxlet_qcow2::CreateOptions::overlay(
            base.file_name().unwrap().to_str().unwrap(),
            boxlet_qcow2::BackingFormat::Raw,
        ),
    )
    .unwrap();
    p
}

/// A file's sha256.
pub fn sha256_file(p: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

/// `sh -c script`.
pub fn sh(script: &str) -> Exec {
    Exec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        ..Exec::default()
    }
}

/// Processes whose command line mentions `needle` (a VM's run directory).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                found.push(c);
            }
        }
    }
    found
}

/// Whether this test process is an ordinary user's (the rootless box suite).
pub fn rootless() -> bool {
    !rustix::process::geteuid().is_root()
}

/// Every process of the VM whose run directory is `run_dir` that serves the guest (all
/// but the jails' outer processes and `virtiofsd`, which serves files as their owners)
/// runs as one unprivileged VM identity, in every id, with no capability; and there is
/// at least one. Returns that identity. Only where the VM is jailed (the jail on); for
/// an ordinary user's VM ([`rootless`]), each of its processes, virtiofsd too, is in a
/// user namespace that is not this process's, as this user, and all but virtiofsd hold
/// no capability (`None`: no VM identity).
pub fn assert_vm_runs_unprivileged(run_dir: &Path) -> Option<u32> {
    if std::env::var_os("BOXLET_JAIL").is_some_and(|v| v == "off") {
        return None;
    }
    if rootless() {
        assert_vm_runs_in_user_namespaces(run_dir);
        return None;
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut seen = Vec::new();
    for (program, _, status) in vm_processes(run_dir) {
        if program == "boxlet-jail" || program == "virtiofsd" {
            continue;
        }
        let field = |key: &str| status_values(&status, key);
        let uids: Vec<u32> = field("Uid").iter().map(|u| u.parse().unwrap()).collect();
        let (base, count) = boxlet::jail::VM_IDS;
        assert!(
            uids.len() == 4
                && uids.iter().all(|&u| u == uids[0])
                && (base..base + count).contains(&uids[0]),
            "{program} runs as {uids:?}"
        );
        assert_eq!(field("Gid"), field("Uid"), "{program}'s group ids");
        for key in ["CapPrm", "CapEff"] {
            assert_eq!(field(key), ["0000000000000000"], "{program}: {key}");
        }
        ids.insert(uids[0]);
        seen.push(program);
    }
    assert_eq!(
        ids.len(),
        1,
        "one identity for the VM's processes {seen:?}: {ids:?}"
    );
    ids.first().copied()
}

/// The processes of the VM whose run directory is `run_dir`: (program name, pid
/// directory, `/proc/PID/status` field reader).
fn vm_processes(run_dir: &Path) -> Vec<(String, PathBuf, String)> {
    let name = run_dir.file_name().unwrap().to_str().unwrap();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let (Ok(cmdline), Ok(status)) = (
            std::fs::read(e.path().join("cmdline")),
            std::fs::read_to_string(e.path().join("status")),
        ) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.iter().any(|a| a.contains(name)) {
            continue;
        }
        let program = Path::new(&argv[0])
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        found.push((program, e.path(), status));
    }
    found
}

/// The whitespace-separated values of `key` in a `/proc/PID/status` text.
fn status_values(status: &str, key: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// [`assert_vm_runs_unprivileged`] for an ordinary user's VM.
fn assert_vm_runs_in_user_namespaces(run_dir: &Path) {
    let ours = std::fs::read_link("/proc/self/ns/user").unwrap();
    let uid = rustix::process::getuid().as_raw().to_string();
    let mut seen = Vec::new();
    for (program, pid_dir, status) in vm_processes(run_dir) {
        let Ok(ns) = std::fs::read_link(pid_dir.join("ns/user")) else {
            continue; // gone meanwhile
        };
        assert_ne!(ns, ours, "{program} runs in this process's user namespace");
        assert_eq!(
            status_values(&status, "Uid"),
            [uid.as_str(); 4],
            "{program}'s user ids"
        );
        if program != "boxlet-jail" && program != "virtiofsd" {
            for key in ["CapPrm", "CapEff"] {
                assert_eq!(
                    status_values(&status, key),
                    ["0000000000000000"],
                    "{program}: {key}"
                );
            }
        }
        seen.push(program);
    }
    assert!(
        seen.iter().any(|p| p != "boxlet-jail"),
        "no process of the VM found: {seen:?}"
    );
}

/// Nothing of a VM is left: no process mentions its run directory, which is gone.
pub fn assert_nothing_left(run_dir: &Path) {
    let name = run_dir.file_name().unwrap().to_str().unwrap().to_owned();
    for _ in 0..200 {
        if processes_mentioning(&name).is_empty() && !run_dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "left behind: processes {:?}, run dir exists: {}",
        processes_mentioning(&name),
        run_dir.exists()
    );
}

/// A boot spec named "testbox" with the test kernel and agent.
pub fn spec(root: Root) -> BootSpec {
    let mut s = BootSpec::new("testbox", kernel(), root);
    s.agent = Some(agent());
    s
}

/// A box on a qcow2 overlay of an ext4 base with the agent: exit codes, stderr, a
/// signal, stdin, 10 MiB of output by digest, 10 concurrent execs, files in and out, a
/// write that survives a reboot and never reaches the base.
pub async fn a_box_on_a_qcow2_overlay_runs_commands_and_keeps_its_writes(hv: &dyn Hypervisor) {
    let dir = tempfile::tempdir().unwrap();
    let base = base_disk(dir.path(), true);
    let base_sum = sha256_file(&base);
    let disk = overlay(dir.path(), &base, "box.qcow2");
    // The console outside the run directory: a failure shows it.
    let console = dir.path().join("console.log");
    let mut s = spec(Root::Disk {
        path: disk.clone(),
        read_only: false,
    });
    s.console_log = Some(console.clone());
    let vm = boot(hv, s).await.unwrap();
    let run_dir = vm.run_dir().to_path_buf();
    let a = vm.agent();
    let first_identity = assert_vm_runs_unprivileged(&run_dir);

    // echo, exit codes, stderr apart from stdout.
    let o = a
        .run(sh("echo hello; echo oops >&2; exit 4"), None)
        .await
        .unwrap();
    assert_eq!(
        (o.stdout.as_slice(), o.stderr.as_slice()),
        (&b"hello\n"[..], &b"oops\n"[..])
    );
    assert_eq!(o.status.code, Some(4));
    // The agent set the hostname and the clock.
    let o = a.run(sh("hostname; date +%Y"), None).await.unwrap();
    let year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        format!("testbox\n{year}\n")
    );

    // A kill by signal.
    let mut s = a.exec(sh("echo up; sleep 1000")).await.unwrap();
    assert_eq!(
        s.next().await.unwrap(),
        Some(ExecEvent::Stdout(b"up\n".to_vec()))
    );
    s.signal(9).await.unwrap();
    let mut last = None;
    while let Some(ev) = s.next().await.unwrap() {
        last = Some(ev);
    }
    match last {
        Some(ExecEvent::Exit(st)) => assert_eq!((st.code, st.signal), (None, Some(9))),
        other => panic!("{other:?}"),
    }

    // stdin through to the process.
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let o = a
        .run(
            Exec {
                args: vec!["cat".into()],
                ..Exec::default()
            },
            Some(&input),
        )
        .await
        .unwrap();
    assert!(o.stdout == input, "cat gave back {} bytes", o.stdout.len());

    // 10 MiB of output, checked by digest.
    let o = a
        .run(sh("yes 0123456789abcdef | head -c 10485760"), None)
        .await
        .unwrap();
    let want: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(10 << 20)
        .collect();
    assert_eq!(Sha256::digest(&o.stdout), Sha256::digest(&want));

    // 10 concurrent execs.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            a.run(sh(&format!("sleep 1; echo exec-{i}")), None).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(
            t.await.unwrap().unwrap().stdout,
            format!("exec-{i}\n").into_bytes()
        );
    }

    // Files in and out.
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(host.path().join("payload/sub")).unwrap();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 256) as u8).collect();
    std::fs::write(host.path().join("payload/sub/blob"), &blob).unwrap();
    a.copy_in(&host.path().join("payload"), "/root")
        .await
        .unwrap();
    let o = a
        .run(sh("sha256sum /root/payload/sub/blob | cut -d' ' -f1"), None)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim(),
        format!("{:x}", Sha256::digest(&blob))
    );
    a.run(
        sh("mkdir -p /srv/out && echo made-in-guest > /srv/out/note"),
        None,
    )
    .await
    .unwrap();
    a.copy_out("/srv/out", host.path()).await.unwrap();
    assert_eq!(
        std::fs::read(host.path().join("out/note")).unwrap(),
        b"made-in-guest\n"
    );

    // A write that must survive a shutdown, in the overlay only.
    let o = a
        .run(sh("echo persisted > /root/state && sync"), None)
        .await
        .unwrap();
    assert_eq!(o.status.code, Some(0));
    let exit = vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        exit,
        VmExit::Shutdown,
        "console:\n{}",
        boxlet::console::console_tail(&console, 40)
    );
    assert_nothing_left(&run_dir);
    assert_eq!(sha256_file(&base), base_sum, "the base disk never changes");

    let vm = boot(
        hv,
        spec(Root::Disk {
            path: disk.clone(),
            read_only: false,
        }),
    )
    .await
    .unwrap();
    let o = vm.agent().run(sh("cat /root/state"), None).await.unwrap();
    assert_eq!(o.stdout, b"persisted\n");
    // Its disk was written by a VM identity, through a descriptor opened before the
    // switch; its processes are a VM identity again.
    let second_identity = assert_vm_runs_unprivileged(vm.run_dir());
    assert_eq!(first_identity.is_some(), second_identity.is_some());
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(sha256_file(&base), base_sum);
    // The base, opened directly: no /root/state there.
    let fs = boxlet_ext4::Ext4::open(&base).unwrap();
    assert!(fs.stat("/root/state").is_err());
}

/// A box whose root is a host directory shared over virtio-fs; writes land there.
pub async fn a_directory_root_over_virtio_fs(hv: &dyn Hypervisor) {
    let dir = tempfile::tempdir().unwrap();
    // A copy: the box writes into its root.
    let root = dir.path().join("root");
    let st = Command::new("cp")
        .args(["-a", box_tree().to_str().unwrap(), root.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let vm = boot(
        hv,
        spec(Root::Dir {
            path: root.clone(),
            exclusive: false,
            ids: boxlet::ShareIds::Host,
        }),
    )
    .await
    .unwrap();
    let run_dir = vm.run_dir().to_path_buf();
    let o = vm
        .agent()
        .run(
            sh("cat /etc/motd; echo from-guest > /home/app/hello; id -u"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(o.stdout, b"boxlet test root\n0\n");
    let o = vm
        .agent()
        .run(
            Exec {
                user: Some("app".into()),
                ..sh("id -u; id -g; echo $HOME")
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(o.stdout, b"1000\n1000\n/home/app\n");
    // A directory of a user's (here root's): no set-ID file from the guest, which
    // whoever reaches the directory would run as its owner.
    let o = vm
        .agent()
        .run(
            sh(
                "cp /bin/busybox /planted && chmod 4755 /planted && echo set-uid; \
                chmod 2755 /planted && echo set-gid; chmod 755 /planted && echo plain",
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "plain\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("planted"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "{mode:o}");
    }
    assert_nothing_left(&run_dir);
    assert_eq!(
        std::fs::read(root.join("home/app/hello")).unwrap(),
        b"from-guest\n"
    );
    assert!(
        !root.join("boxlet").exists(),
        "the agent never lands in the directory"
    );
    if !rootless() {
        a_users_directory_root_reaches_nothing_of_host_roots(hv, &root).await;
    }
}

/// A root boxlet serving a user's directory: the guest's files land as that user, and
/// a file of host root's inside the directory is not the guest's to read or change (its
/// virtiofsd is root only of a user namespace mapping that user).
async fn a_users_directory_root_reaches_nothing_of_host_roots(hv: &dyn Hypervisor, root: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (uid, gid) = (61_777, 61_778);
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}"), root.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let secret = root.join("root/host-secret");
    std::fs::write(&secret, b"host root's\n").unwrap();
    std::os::unix::fs::chown(&secret, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let vm = boot(
        hv,
        spec(Root::Dir {
            path: root.to_path_buf(),
            exclusive: false,
            ids: boxlet::ShareIds::Host,
        }),
    )
    .await
    .unwrap();
    let o = vm
        .agent()
        .run(
            sh(
                "echo mine > /root/made; cat /root/host-secret 2>/dev/null && echo read-it; \
                echo x >> /root/host-secret 2>/dev/null && echo changed-it; \
                chmod 644 /root/host-secret 2>/dev/null && echo chmod-it; true",
            ),
            None,
        )
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    for bad in ["read-it", "changed-it", "chmod-it"] {
        assert!(!out.contains(bad), "{bad}: {out}");
    }

    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    let made = std::fs::metadata(root.join("root/made")).unwrap();
    assert_eq!(
        (made.uid(), made.gid()),
        (uid, gid),
        "the user's on the host"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), b"host root's\n");
    let kept = std::fs::metadata(&secret).unwrap();
    assert_eq!((kept.uid(), kept.mode() & 0o777), (0, 0o600));
}

/// Guest root, in a box on a directory root whose host side is `host_dir`, tries to
/// leave a block device anyone may open and a set-UID-root copy of busybox: the device is
/// refused, and the set-UID file, set-UID root in the guest, is set-UID to an id no host
/// process runs as.
pub async fn guest_plants_nothing_on_the_host(vm: &boxlet::RunningVm, host_dir: &Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let o = vm
        .agent()
        .run(
            sh(
                "mknod /planted-dev b 8 0 && chmod 666 /planted-dev && echo made-a-device; \
                cp /bin/busybox /planted-sh && chmod 4755 /planted-sh && \
                stat -c '%u %a' /planted-sh",
            ),
            None,
        )
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("made-a-device"), "{out}");
    assert_eq!(
        out.trim(),
        "0 4755",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    if let Ok(m) = std::fs::symlink_metadata(host_dir.join("planted-dev")) {
        assert!(
            !m.file_type().is_block_device(),
            "a device node on the host"
        );
    }
    let sh = std::fs::metadata(host_dir.join("planted-sh")).unwrap();
    assert_eq!(sh.mode() & 0o4000, 0o4000);
    if rootless() {
        // An ordinary user's box: set-UID to that user (in a home only it may reach).
        assert_eq!(sh.uid(), rustix::process::getuid().as_raw());
        return;
    }
    assert_eq!(
        sh.uid(),
        boxlet::rootfs::CACHE_IDS.base(),
        "set-UID to the shifted root, not to host root"
    );
}

/// Boxes from an OCI image through the rootfs strategies: Disk (the busybox image's ext4
/// with the agent injected into the versioned base, a qcow2 overlay per box, virtio-blk),
/// Extracted (a per-box copy of the extracted image, virtio-fs), OverlayMount (the layers
/// as overlayfs lowers under a per-box upper, virtio-fs) and Direct (the image unpacked
/// into a directory of the user's, virtio-fs). Each boots, runs, and is
/// cleaned up with nothing of the box left.
pub async fn rootfs_strategies_boot(hv: &dyn Hypervisor) {
    use boxlet::rootfs::{
        AgentBinary, DirectStrategy, DiskStrategy, ExtractedStrategy, OverlayStrategy,
        PrepareRequest,
    };
    use boxlet::RootfsStrategy;

    let dir = tempfile::tempdir().unwrap();
    let (home, store) = busybox_home(dir.path());
    let disk = DiskStrategy::new(
        home.clone(),
        store.clone(),
        AgentBinary {
            path: agent(),
            build_hash: None,
        },
    )
    .unwrap();
    let id = boxlet_cas::BoxId::mint();
    let req = PrepareRequest {
        image: Some("busybox:1".into()),
        box_id: id,
    };
    let rootfs = disk.prepare(&req).await.unwrap();
    let base = boxlet_qcow2::read_backing_file_path(&rootfs.path)
        .unwrap()
        .unwrap();
    // The base is a sparse 4 GiB file: compare its metadata, not its bytes.
    let stamp = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.size(), m.blocks(), m.mtime(), m.mtime_nsec())
    };
    let base_stamp = stamp(&base);
    let vm = boot(hv, spec(rootfs.root())).await.unwrap();
    let o = vm
        .agent()
        .run(
            sh("cat /etc/hostname; test -e /etc/motd || echo no-motd; echo kept > /root/note; cat /root/note"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        o.stdout,
        b"boxlet\nno-motd\nkept\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Room for files, not only bytes: the image's disk has inodes for its size (it once
    // had the content's count and a quarter more: a hundred new files filled it).
    let o = vm
        .agent()
        .run(
            sh("mkdir /root/many && cd /root/many && i=0; \
                while [ $i -lt 3000 ]; do : > f$i || exit 1; i=$((i+1)); done; ls | wc -l"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "3000",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        stamp(&base),
        base_stamp,
        "the box wrote into the shared base"
    );
    disk.cleanup(&rootfs).await.unwrap();
    assert!(!home.box_dir(id).exists(), "the box's directory stayed");

    // Extracted: the image's layers applied into a cached tree, a copy per box (with
    // the default quota, which needs root; without it, none).
    let quota = if rootless() {
        boxlet::rootfs::DiskQuota::Unlimited
    } else {
        boxlet::rootfs::DiskQuota::Default
    };
    let extracted = ExtractedStrategy::new(home.clone(), store.clone())
        .unwrap()
        .with_disk_quota(quota);
    let rootfs = extracted.prepare(&req).await.unwrap();
    let vm = boot(hv, spec(rootfs.root())).await.unwrap();
    let o = vm
        .agent()
        .run(sh("cat /etc/hostname; echo mine > /root/note"), None)
        .await
        .unwrap();
    assert_eq!(o.stdout, b"boxlet\n");
    guest_plants_nothing_on_the_host(&vm, &rootfs.path).await;
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        std::fs::read(rootfs.path.join("root/note")).unwrap(),
        b"mine\n"
    );
    extracted.cleanup(&rootfs).await.unwrap();
    assert!(!home.box_dir(id).exists(), "the box's directory stayed");

    // OverlayMount: the layers as overlayfs lowers under the box's upper (needs root:
    // without it, a clear error).
    let overlay = OverlayStrategy::new(home.clone(), store.clone(), false).unwrap();
    if rootless() {
        let e = overlay.prepare(&req).await.unwrap_err().to_string();
        assert!(e.contains("needs CAP_SYS_ADMIN"), "{e}");
    } else {
        overlay_boots(hv, &overlay, &req, &home).await;
    }

    // Direct: a directory of the user's, booted as is and left alone.
    let unpacked = dir.path().join("unpacked");
    boxlet_oci::unpack(
        &store,
        "busybox:1",
        &unpacked,
        &boxlet_oci::ApplyOptions::default(),
    )
    .unwrap();
    let direct = DirectStrategy::new(&unpacked);
    let rootfs = direct.prepare(&req).await.unwrap();
    let vm = boot(hv, spec(rootfs.root())).await.unwrap();
    let o = vm.agent().run(sh("cat /etc/hostname"), None).await.unwrap();
    assert_eq!(o.stdout, b"boxlet\n");
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    direct.cleanup(&rootfs).await.unwrap();
    assert!(
        unpacked.join("etc/hostname").is_file(),
        "Direct's cleanup touched the directory"
    );
}

/// The OverlayMount part of [`rootfs_strategies_boot`].
async fn overlay_boots(
    hv: &dyn Hypervisor,
    overlay: &boxlet::rootfs::OverlayStrategy,
    req: &boxlet::rootfs::PrepareRequest,
    home: &boxlet::rootfs::Home,
) {
    use boxlet::RootfsStrategy;
    let rootfs = overlay.prepare(req).await.unwrap();
    let vm = boot(hv, spec(rootfs.root())).await.unwrap();
    let o = vm
        .agent()
        .run(
            sh("cat /etc/hostname; test -e /etc/motd || echo no-motd; echo up > /root/note"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        o.stdout,
        b"boxlet\nno-motd\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let boxlet::rootfs::Strategy::OverlayMount { upper, .. } = &rootfs.strategy else {
        panic!("{:?}", rootfs.strategy)
    };
    guest_plants_nothing_on_the_host(&vm, upper).await;
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(std::fs::read(upper.join("root/note")).unwrap(), b"up\n");
    overlay.cleanup(&rootfs).await.unwrap();
    assert!(
        !home.box_dir(req.box_id).exists(),
        "the box's directory stayed"
    );
}

/// A guest writing until its root is full, on a directory root with a 64 MiB disk
/// quota (OverlayMount: the upper on the box's own file system), meets ENOSPC, and the
/// host gave the box at most its quota. Needs root (skipped otherwise).
pub async fn a_guest_filling_its_directory_root_meets_its_quota(hv: &dyn Hypervisor) {
    use boxlet::rootfs::{DiskQuota, OverlayStrategy, PrepareRequest};
    use boxlet::RootfsStrategy;
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: disk quotas need root");
        return;
    }
    const QUOTA: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (home, store) = busybox_home(dir.path());
    let strategy = OverlayStrategy::new(home.clone(), store, false)
        .unwrap()
        .with_disk_quota(DiskQuota::Bytes(QUOTA));
    let id = boxlet_cas::BoxId::mint();
    let rootfs = strategy
        .prepare(&PrepareRequest {
            image: Some("busybox:1".into()),
            box_id: id,
        })
        .await
        .unwrap();
    let vm = boot(hv, spec(rootfs.root())).await.unwrap();
    let o = vm
        .agent()
        .run(
            sh(
                "dd if=/dev/zero of=/fill bs=1M count=256 conv=fsync 2>&1; echo status $?; \
                ls -l /fill | awk '{print \"size\", $5}'",
            ),
            None,
        )
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("No space left on device"), "{out}");
    assert!(!out.contains("status 0"), "{out}");
    let size: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("size "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(size > QUOTA / 4 && size <= QUOTA, "{out}");
    // All the box holds on the host's file system is its own file system's sparse
    // file, allocated within the quota.
    let held = boxlet::rootfs::allocated_bytes(&home.box_dir(id));
    assert!(
        held <= QUOTA + (1 << 20),
        "the box holds {held} bytes on the host"
    );
    vm.shutdown(Duration::from_secs(30)).await.unwrap();
    strategy.cleanup(&rootfs).await.unwrap();
    assert!(!home.box_dir(id).exists());
}

/// A guest whose kernel panics (no init) fails the boot with the panic line.
pub async fn a_guest_kernel_panic_is_an_error_not_a_hang(hv: &dyn Hypervisor) {
    let dir = tempfile::tempdir().unwrap();
    // No agent at the init path: the kernel panics ("No working init found").
    let base = base_disk(dir.path(), false);
    let mut s = spec(Root::Disk {
        path: base,
        read_only: true,
    });
    s.console_log = Some(dir.path().join("console.log"));
    match boot(hv, s).await {
        Err(BootError::EndedEarly {
            exit: VmExit::GuestPanic(line),
            console,
        }) => {
            assert!(line.contains("Kernel panic"), "{line}");
            assert!(console.contains("Kernel panic"), "{console}");
        }
        other => panic!("expected a guest panic, got {other:?}"),
    }
}

/// A booted box on a read-only base disk: its scratch directory, the VM, its run
/// directory and that directory's name (which the VM's processes' command lines hold).
async fn read_only_box(
    hv: &dyn Hypervisor,
) -> (tempfile::TempDir, boxlet::RunningVm, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let base = base_disk(dir.path(), true);
    let vm = boot(
        hv,
        spec(Root::Disk {
            path: base,
            read_only: true,
        }),
    )
    .await
    .unwrap();
    let run_dir = vm.run_dir().to_path_buf();
    let name = run_dir.file_name().unwrap().to_str().unwrap().to_owned();
    (dir, vm, run_dir, name)
}

/// The VMM process (`vmm`, its program name) killed from outside: the running exec
/// fails, the VM reports the signal, nothing is left behind.
pub async fn a_killed_vmm_is_an_error_not_a_hang(hv: &dyn Hypervisor, vmm: &str) {
    let (_dir, vm, run_dir, name) = read_only_box(hv).await;
    let mut s = vm.agent().exec(sh("sleep 1000")).await.unwrap();
    // Kill the VMM from outside.
    let st = Command::new("pkill")
        .args(["-9", "-f", &format!("{vmm}.*{name}")])
        .status()
        .unwrap();
    assert!(st.success(), "pkill found {vmm}");
    // The exec's stream ends with an error, not a hang.
    let mut res = Ok(None);
    for _ in 0..10 {
        res = s.next().await;
        if res.is_err() {
            break;
        }
    }
    assert!(res.is_err(), "{res:?}");
    let exit = vm.wait().await.unwrap();
    assert!(
        matches!(exit, VmExit::VmmFailed(ref m) if m.contains("signal 9")),
        "{exit:?}"
    );
    assert_nothing_left(&run_dir);
}

/// A daemon of the VM (`daemon`, as its command line names it) that dies of SIGSYS, as
/// its seccomp filter kills it at a forbidden call, stops the whole VM, which reports a
/// sandbox violation naming it, and nothing of the VM is left. (The signal goes to the
/// daemon's jail, which ends that way when its program does: a jailed daemon is PID 1
/// of its namespace, where a SIGSYS from outside is ignored and only the kernel's own,
/// at a forbidden call, lands. The jail tests show a filtered program's SIGSYS death
/// reaching the jail's status.)
pub async fn a_daemon_killed_by_its_filter_stops_the_vm(hv: &dyn Hypervisor, daemon: &str) {
    let (_dir, vm, run_dir, name) = read_only_box(hv).await;
    // The oldest match is the jail's outer process (or the daemon, unjailed).
    let st = Command::new("pkill")
        .args(["-SYS", "-o", "-f", &format!("{daemon}.*{name}")])
        .status()
        .unwrap();
    assert!(st.success(), "pkill found {daemon}");
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), vm.wait())
        .await
        .expect("the VM was stopped")
        .unwrap();
    assert!(
        matches!(exit, VmExit::SandboxViolation(ref m) if m.contains(daemon)),
        "{exit:?}"
    );
    assert_nothing_left(&run_dir);
}

/// For a backend's own tests: point `$var` at the helper binary `name` that cargo built
/// into the target directory (test binaries run from `target/<profile>/deps`, binaries
/// sit one level up), unless `$var` is already set.
pub fn helper_beside_tests(var: &str, name: &str) {
    if std::env::var_os(var).is_none() {
        let exe = std::env::current_exe().unwrap();
        let helper = exe.parent().unwrap().parent().unwrap().join(name);
        std::env::set_var(var, helper);
    }
}

/// Run one suite test, failing it (instead of hanging the whole run) when it takes longer
/// than `limit`: a hang guard, not a speed check. Dropping the test's future drops its VM,
/// which stops the VMM and its helpers.
pub async fn hang_guarded<F: std::future::Future<Output = ()>>(limit: Duration, test: F) {
    if tokio::time::timeout(limit, test).await.is_err() {
        panic!("the test hung: still running after {limit:?}");
    }
}
