//! The agent's protocol and exec logic, tested fast: the agent serves a Unix socket in
//! this process (as `boxlet-guest --listen-unix` does), and the async client talks to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use boxlet::{AgentClient, Connector, Exec, ExecEvent};

struct Agent {
    _dir: tempfile::TempDir,
    sock: PathBuf,
}

fn agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let s = sock.clone();
    std::thread::spawn(move || boxlet_guest::serve::unix(&s));
    // The socket file appears at bind(), before listen(): wait until it accepts.
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Agent { _dir: dir, sock }
}

fn client(a: &Agent) -> AgentClient {
    AgentClient::new(Connector::Unix(a.sock.clone()))
}

fn sh(script: &str) -> Exec {
    Exec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        ..Exec::default()
    }
}

#[tokio::test]
async fn echo_exit_codes_and_stderr() {
    let a = agent();
    let c = client(&a);
    assert_eq!(
        c.ping().await.unwrap(),
        boxlet_guest::proto::PROTOCOL_VERSION
    );
    let out = c
        .run(sh("echo out; echo err >&2; exit 7"), None)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(7));
}

#[tokio::test]
async fn a_signal_kills_the_process_group_and_is_reported() {
    let a = agent();
    let c = client(&a);
    let mut s = c.exec(sh("echo started; sleep 100")).await.unwrap();
    assert!(s.pid() > 0);
    // Wait until the shell runs, then signal it.
    assert_eq!(
        s.next().await.unwrap(),
        Some(ExecEvent::Stdout(b"started\n".to_vec()))
    );
    s.signal(15).await.unwrap();
    let mut status = None;
    while let Some(ev) = s.next().await.unwrap() {
        if let ExecEvent::Exit(st) = ev {
            status = Some(st);
        }
    }
    let st = status.unwrap();
    assert_eq!((st.code, st.signal, st.timed_out), (None, Some(15), false));
    assert_eq!(st.shell_code(), 143);
}

#[tokio::test]
async fn stdin_is_piped_through() {
    let a = agent();
    let c = client(&a);
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = c
        .run(
            Exec {
                args: vec!["cat".into()],
                ..Exec::default()
            },
            Some(&input),
        )
        .await
        .unwrap();
    assert_eq!(out.status.code, Some(0));
    assert!(
        out.stdout == input,
        "cat returned {} bytes",
        out.stdout.len()
    );
}

#[tokio::test]
async fn ten_mib_of_output_arrives_intact() {
    use sha2::{Digest, Sha256};
    let a = agent();
    let c = client(&a);
    let out = c
        .run(sh("yes 0123456789abcdef | head -c 10485760"), None)
        .await
        .unwrap();
    let want: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(10 << 20)
        .collect();
    assert_eq!(out.stdout.len(), 10 << 20);
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&want));
}

#[tokio::test]
async fn ten_concurrent_execs() {
    let a = agent();
    let c = client(&a);
    let runs = (0..10).map(|i| {
        let c = c.clone();
        async move {
            c.run(sh(&format!("sleep 0.2; echo run-{i}; exit {i}")), None)
                .await
        }
    });
    let outs = futures_join_all(runs).await;
    for (i, o) in outs.into_iter().enumerate() {
        let o = o.unwrap();
        assert_eq!(o.stdout, format!("run-{i}\n").into_bytes());
        assert_eq!(o.status.code, Some(i as i32));
    }
}

/// `join_all` without another dependency: spawn each on the runtime.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn timeouts_kill_and_say_so() {
    let a = agent();
    let c = client(&a);
    let out = c
        .run(
            Exec {
                timeout_ms: Some(200),
                ..sh("sleep 30")
            },
            None,
        )
        .await
        .unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
}

#[tokio::test]
async fn setup_defaults_and_per_exec_overrides() {
    let a = agent();
    let c = client(&a);
    let dir = tempfile::tempdir().unwrap();
    c.setup(boxlet::Setup {
        env: vec!["A=from-setup".into(), "B=kept".into()],
        cwd: Some(dir.path().display().to_string()),
        ..boxlet::Setup::default()
    })
    .await
    .unwrap();
    let out = c
        .run(
            Exec {
                env: vec!["A=from-exec".into()],
                ..sh("echo $A $B; pwd")
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("from-exec kept\n{}\n", dir.path().display())
    );
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_agent_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = agent();
    let c = client(&a);
    let e = c
        .run(
            Exec {
                args: vec!["no-such-program-here".into()],
                ..Exec::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no-such-program-here: command not found"),
        "{e}"
    );
    let e = c
        .run(
            Exec {
                cwd: Some("/no/such/dir".into()),
                ..sh("true")
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("sh"), "{e}");
    let e = c.run(Exec::default(), None).await.unwrap_err();
    assert!(e.to_string().contains("without a program"), "{e}");

    // Garbage instead of a frame: an error frame back, then the connection ends.
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    s.write_all(&[0xff; 64]).await.unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    // A frame larger than the limit: refused the same way.
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    s.write_all(&boxlet_guest::proto::Frame::header(
        boxlet_guest::proto::Kind::Request,
        boxlet_guest::proto::MAX_FRAME + 1,
    ))
    .await
    .unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back).await;
    // A JSON request of the wrong shape gets an error frame.
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    let payload = br#"{"op":"exec","args":7}"#;
    let mut msg =
        boxlet_guest::proto::Frame::header(boxlet_guest::proto::Kind::Request, payload.len())
            .to_vec();
    msg.extend_from_slice(payload);
    s.write_all(&msg).await.unwrap();
    let f = boxlet::agent::read_frame(&mut s).await.unwrap().unwrap();
    assert_eq!(f.kind, boxlet_guest::proto::Kind::Error);

    // Still serving.
    assert_eq!(c.run(sh("echo ok"), None).await.unwrap().stdout, b"ok\n");
}

#[tokio::test]
async fn a_host_that_goes_away_kills_its_process() {
    let a = agent();
    let c = client(&a);
    let mut s = c.exec(sh("echo up; exec sleep 100")).await.unwrap();
    let pid = s.pid();
    assert!(matches!(
        s.next().await.unwrap(),
        Some(ExecEvent::Stdout(_))
    ));
    drop(s);
    // The agent notices the closed connection and kills the process group.
    let alive = |pid: u32| {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    };
    for _ in 0..500 {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pid {pid} still runs after its host went away");
}

#[tokio::test]
async fn files_and_trees_copy_in_and_out() {
    let a = agent();
    let c = client(&a);
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(src.join("sub/deeper/big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    // "Guest" side: another directory (the agent runs on this host).
    let guest = tempfile::tempdir().unwrap();
    let gdir = guest.path().join("in");
    c.copy_in(&src, gdir.to_str().unwrap()).await.unwrap();
    assert_eq!(
        std::fs::read(gdir.join("tree/sub/deeper/big.bin")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read_link(gdir.join("tree/link")).unwrap(),
        PathBuf::from("a.txt")
    );
    // A single file too.
    c.copy_in(&src.join("a.txt"), gdir.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(std::fs::read(gdir.join("a.txt")).unwrap(), b"alpha");

    let back = host.path().join("back");
    std::fs::create_dir(&back).unwrap();
    c.copy_out(gdir.join("tree").to_str().unwrap(), &back)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(back.join("tree/sub/deeper/big.bin")).unwrap(),
        big
    );
    assert_eq!(std::fs::read(back.join("tree/a.txt")).unwrap(), b"alpha");
    let e = c.copy_out("/no/such/path", &back).await.unwrap_err();
    assert!(e.to_string().contains("/no/such/path"), "{e}");
}

#[tokio::test]
async fn a_daemon_holding_the_pipes_does_not_hold_the_exec() {
    let a = agent();
    let c = client(&a);
    // The background sleep keeps stdout open for 30 s; the exec ends about a second
    // after the shell does. (The outer timeout only turns a hang into a failure.)
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        c.run(sh("sleep 30 & echo done"), None),
    )
    .await
    .expect("the exec hung on its daemon's pipes")
    .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.status.code),
        (&b"done\n"[..], Some(0))
    );
}

#[tokio::test]
async fn a_daemon_that_writes_without_end_does_not_hold_the_exec() {
    let a = agent();
    let c = client(&a);
    // Output keeps flowing after the shell exits; the agent waits for it a while (a busy
    // guest may pump late) but not without end. (The outer timeout turns a hang into a
    // failure.)
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        c.run(
            sh("(while :; do echo more; sleep 0.05; done) & echo first"),
            None,
        ),
    )
    .await
    .expect("the exec hung on its daemon's endless output")
    .unwrap();
    assert_eq!(out.status.code, Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l == "first"), "{text}");
    assert!(text.lines().all(|l| l == "first" || l == "more"), "{text}");
}

#[tokio::test]
async fn output_beyond_the_limit_is_refused() {
    let a = agent();
    let c = client(&a).with_output_limit(10_000);
    let e = c
        .run(sh("yes | head -c 50000; sleep 5"), None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("more than 10000 bytes of output"),
        "{e}"
    );
}

/// A hostile "agent": answers every connection with `reply` (raw frames).
fn fake_agent(reply: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("evil.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let _ = boxlet_guest::proto::read_frame(&mut conn);
            use std::io::Write;
            let _ = conn.write_all(&reply);
            // Then hold the connection open, saying nothing more.
            std::thread::sleep(Duration::from_secs(5));
        }
    });
    (dir, sock)
}

fn frame(kind: boxlet_guest::proto::Kind, payload: &[u8]) -> Vec<u8> {
    let mut v = boxlet_guest::proto::Frame::header(kind, payload.len()).to_vec();
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn a_silent_agent_times_out() {
    let (_d, sock) = fake_agent(Vec::new());
    let c = AgentClient::new(Connector::Unix(sock)).with_timeout(Duration::from_millis(300));
    let e = c.ping().await.unwrap_err();
    assert!(e.to_string().contains("no answer from the agent"), "{e}");
}

#[tokio::test]
async fn copy_out_keeps_a_hostile_tar_inside_its_one_name() {
    use boxlet_guest::proto::Kind;
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join(".bashrc"), b"mine").unwrap();
    // Entries for another name, and for the host file beside the destination.
    for bad in ["other/file", ".bashrc"] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, bad, &b"evil"[..]).unwrap();
        let tarball = b.into_inner().unwrap();
        let mut reply = frame(Kind::Data, &tarball);
        reply.extend(frame(Kind::DataEof, b""));
        reply.extend(frame(Kind::Done, b"{}"));
        let (_d, sock) = fake_agent(reply);
        let c = AgentClient::new(Connector::Unix(sock));
        let e = c.copy_out("/srv/data", host.path()).await.unwrap_err();
        assert!(e.to_string().contains("outside data"), "{e}");
        // Nothing changed beside it, nothing left over.
        let names: Vec<_> = std::fs::read_dir(host.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [".bashrc"]);
        assert_eq!(std::fs::read(host.path().join(".bashrc")).unwrap(), b"mine");
    }
    // An existing destination is never overwritten.
    std::fs::create_dir(host.path().join("data")).unwrap();
    let (_d, sock) = fake_agent(Vec::new());
    let e = AgentClient::new(Connector::Unix(sock))
        .copy_out("/srv/data", host.path())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
}

/// A guest's copy-out answer: `tar` in one Data frame, then the end (or, without
/// `finish`, nothing more).
fn copy_reply(tar: &[u8], finish: bool) -> Vec<u8> {
    use boxlet_guest::proto::Kind;
    let mut reply = frame(Kind::Data, tar);
    if finish {
        reply.extend(frame(Kind::DataEof, b""));
        reply.extend(frame(Kind::Done, b"{}"));
    }
    reply
}

/// What a copy out of `/srv/data` into `host` says to a guest that answers `reply`.
async fn copy_out_error(reply: Vec<u8>, opts: &boxlet::CopyOutOptions, host: &Path) -> String {
    let (_d, sock) = fake_agent(reply);
    AgentClient::new(Connector::Unix(sock))
        .with_timeout(Duration::from_secs(2))
        .copy_out_with("/srv/data", host, opts)
        .await
        .unwrap_err()
        .to_string()
}

/// A lone tar header for `path` of `kind` declaring `size` bytes (mode 0644), with no
/// data after it: what a guest sends to claim more than it holds.
fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    h
}

/// A tar of hostile entries under `data/`.
fn hostile_tree() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut put = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        if link.is_empty() {
            b.append_data(&mut h, path, data).unwrap();
        } else {
            b.append_link(&mut h, path, link).unwrap();
        }
    };
    put("data/", tar::EntryType::Directory, 0o755, b"", "");
    put("data/f", tar::EntryType::Regular, 0o644, b"file", "");
    put("data/suid", tar::EntryType::Regular, 0o4755, b"#!", "");
    put("data/fifo", tar::EntryType::Fifo, 0o666, b"", "");
    put("data/etc", tar::EntryType::Symlink, 0o777, b"", "/etc");
    put(
        "data/up",
        tar::EntryType::Symlink,
        0o777,
        b"",
        "../../outside",
    );
    put("data/ok", tar::EntryType::Symlink, 0o777, b"", "f");
    b.into_inner().unwrap()
}

#[tokio::test]
async fn copy_out_makes_only_files_and_directories_without_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let tree = hostile_tree();
    for symlinks in [false, true] {
        let host = tempfile::tempdir().unwrap();
        let (_d, sock) = fake_agent(copy_reply(&tree, true));
        let opts = boxlet::CopyOutOptions {
            symlinks,
            ..Default::default()
        };
        let r = AgentClient::new(Connector::Unix(sock))
            .copy_out_with("/srv/data", host.path(), &opts)
            .await
            .unwrap();
        let data = host.path().join("data");
        assert_eq!(std::fs::read(data.join("f")).unwrap(), b"file");
        let suid = std::fs::metadata(data.join("suid")).unwrap();
        assert_eq!(suid.permissions().mode() & 0o7000, 0, "set-ID bits dropped");
        assert!(data.join("fifo").symlink_metadata().is_err(), "no FIFO");
        assert!(
            data.join("etc").symlink_metadata().is_err(),
            "no link to /etc"
        );
        assert!(data.join("up").symlink_metadata().is_err(), "no link above");
        assert_eq!(data.join("ok").symlink_metadata().is_ok(), symlinks);
        assert_eq!((r.files, r.dirs, r.symlinks), (2, 1, u64::from(symlinks)));
        assert_eq!(r.skipped, if symlinks { 3 } else { 4 });
        // Only `data` beside it: the staging directory is gone.
        assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 1);
    }
}

#[tokio::test]
async fn copy_out_is_bounded_in_bytes_entries_time_and_refuses_a_top_level_link() {
    let host = tempfile::tempdir().unwrap();
    // A 10 GiB file declared: refused at its header, nothing written.
    let h = header("data", tar::EntryType::Regular, 10 << 30);
    let e = copy_out_error(
        copy_reply(h.as_bytes(), true),
        &Default::default(),
        host.path(),
    )
    .await;
    assert!(e.contains("more than 4294967296 bytes"), "{e}");
    // Too many entries.
    let opts = boxlet::CopyOutOptions {
        max_entries: 2,
        ..Default::default()
    };
    let e = copy_out_error(copy_reply(&hostile_tree(), true), &opts, host.path()).await;
    assert!(e.contains("more than 2 entries"), "{e}");
    // The top itself a symlink.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "data", "/etc").unwrap();
    let e = copy_out_error(
        copy_reply(&b.into_inner().unwrap(), true),
        &Default::default(),
        host.path(),
    )
    .await;
    assert!(e.contains("not a file or a directory"), "{e}");
    // A guest that starts and then says nothing.
    let (_d, sock) = fake_agent(copy_reply(&hostile_tree()[..512], false));
    let e = AgentClient::new(Connector::Unix(sock))
        .with_timeout(Duration::from_millis(300))
        .copy_out("/srv/data", host.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no answer from the agent"), "{e}");
    assert_eq!(
        std::fs::read_dir(host.path()).unwrap().count(),
        0,
        "nothing left"
    );
}

#[tokio::test]
async fn copy_out_cannot_be_fooled_by_pax_sizes_long_records_or_chained_links() {
    // A PAX size of 10 GiB over a header that says 0.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("size", &b"10737418240"[..])])
        .unwrap();
    let h = header("data", tar::EntryType::Regular, 0);
    b.append(&h, &[][..]).unwrap();
    let host = tempfile::tempdir().unwrap();
    let e = copy_out_error(
        copy_reply(&b.into_inner().unwrap(), true),
        &Default::default(),
        host.path(),
    )
    .await;
    assert!(e.contains("more than 4294967296 bytes"), "{e}");
    // A GNU long name claiming 1 GiB: refused at its header, never buffered.
    let h = header("././@LongLink", tar::EntryType::GNULongName, 1 << 30);
    let e = copy_out_error(
        copy_reply(h.as_bytes(), true),
        &Default::default(),
        host.path(),
    )
    .await;
    assert!(e.contains("long name record"), "{e}");
    // Links that each stay inside, chained to reach outside.
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o777);
    dir.set_size(0);
    b.append_data(&mut dir.clone(), "data/", &[][..]).unwrap();
    b.append_data(&mut dir, "data/d/", &[][..]).unwrap();
    let mut l = tar::Header::new_gnu();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_mode(0o777);
    l.set_size(0);
    b.append_link(&mut l.clone(), "data/d/up", "..").unwrap();
    b.append_link(&mut l, "data/d/up/d/esc", "../../etc")
        .unwrap();
    let opts = boxlet::CopyOutOptions {
        symlinks: true,
        ..Default::default()
    };
    let e = copy_out_error(
        copy_reply(&b.into_inner().unwrap(), true),
        &opts,
        host.path(),
    )
    .await;
    assert!(e.contains("lies under a symlink"), "{e}");
    assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn the_host_never_follows_a_link_put_in_place_of_the_vms_socket() {
    // The VM's processes own the directory of its socket: one that swaps the socket for
    // a link to another socket on the host gets no connection there from the runtime.
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = std::os::unix::net::UnixListener::bind(dir.path().join("host.sock")).unwrap();
    elsewhere.set_nonblocking(true).unwrap();
    let uds = dir.path().join("vsock.sock");
    std::os::unix::fs::symlink(dir.path().join("host.sock"), &uds).unwrap();
    let e = AgentClient::vsock(&uds)
        .ping()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a socket") && e.contains("vsock.sock"),
        "{e}"
    );
    assert_eq!(
        elsewhere.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the other socket was reached"
    );
    // A socket itself is reached (here: one that hangs up at once).
    std::fs::remove_file(&uds).unwrap();
    let real = std::os::unix::net::UnixListener::bind(&uds).unwrap();
    let hangs_up = std::thread::spawn(move || drop(real.accept().unwrap()));
    let e = AgentClient::vsock(&uds)
        .ping()
        .await
        .unwrap_err()
        .to_string();
    assert!(!e.contains("not a socket"), "{e}");
    hangs_up.join().unwrap();
}
