//! Entry points for the cargo-fuzz targets in `fuzz/` and their replay in tests: the
//! host side of the agent protocol fed what a hostile guest sends.
//!
//! [`agent_client`] plays a guest agent that answers any request with the fuzzer's bytes
//! (after the vsock `CONNECT` handshake, so that line is fuzzed too), while the real
//! [`AgentClient`] makes one of its requests: `ping`, `run`, an `exec` read to its end,
//! or a `copy_out` into a scratch directory. Nothing may panic, and a copy out may
//! create nothing but its one destination.

use std::path::Path;
use std::time::Duration;

use boxlet_guest::proto::{Frame, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{AgentClient, Connector, CopyOutOptions};
use crate::Exec;

/// Which request the client makes, from the input's first byte.
#[derive(Debug, Clone, Copy)]
enum Op {
    Ping,
    Run,
    Exec,
    CopyOut,
    CopyOutWithLinks,
}

impl Op {
    fn from_byte(b: u8) -> Op {
        match b % 5 {
            0 => Op::Ping,
            1 => Op::Run,
            2 => Op::Exec,
            3 => Op::CopyOut,
            _ => Op::CopyOutWithLinks,
        }
    }
}

/// One exchange: `data[0]` picks the request, the rest is the guest's side of the
/// connection: its first line answers the client's `CONNECT`, the rest its request
/// frame. Returns how the
/// client's request ended (its error in words), so replays can tell the seeds reach it.
pub fn agent_client(data: &[u8]) -> Result<(), String> {
    let Some((&op, answer)) = data.split_first() else {
        return Err("no input".into());
    };
    let op = Op::from_byte(op);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = rt.block_on(exchange(dir.path(), op, answer));
    // Only the socket, the destination directory and (for a copy) at most the one name
    // the guest's path gives, which is a plain file or directory, never a link.
    let mut made: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    made.sort();
    assert!(
        made.is_empty() || made == [dir.path().join("out/tree")],
        "copy out made {made:?}"
    );
    for p in made {
        let meta = std::fs::symlink_metadata(&p).expect("what read_dir listed");
        assert!(!meta.file_type().is_symlink(), "{} is a link", p.display());
        check_tree(&p, &std::fs::canonicalize(&p).expect("the copy's top"));
    }
    result
}

/// Everything under `p` is a directory, a regular file with one link and no set-ID
/// bits, or a symlink whose target, read as a path from where the link is, stays inside
/// `top` (existing or not).
fn check_tree(p: &Path, top: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(p).expect("a listed entry");
    let t = meta.file_type();
    if t.is_symlink() {
        let target = std::fs::read_link(p).expect("a link's target");
        let mut at = p.parent().expect("a link has a directory").to_path_buf();
        for c in target.components() {
            match c {
                std::path::Component::Normal(n) => at.push(n),
                std::path::Component::ParentDir => {
                    at.pop();
                }
                std::path::Component::CurDir => {}
                _ => panic!(
                    "{} points at the absolute {}",
                    p.display(),
                    target.display()
                ),
            }
            assert!(
                at.starts_with(top),
                "{} leads out to {}",
                p.display(),
                at.display()
            );
        }
    } else if t.is_dir() {
        for e in std::fs::read_dir(p)
            .expect("a directory of the copy")
            .flatten()
        {
            check_tree(&e.path(), top);
        }
    } else {
        assert!(
            t.is_file(),
            "{} is neither file, directory nor link",
            p.display()
        );
        assert_eq!(
            meta.permissions().mode() & 0o6000,
            0,
            "{} is set-ID",
            p.display()
        );
        assert_eq!(meta.nlink(), 1, "{} is a hard link", p.display());
    }
}

async fn exchange(dir: &Path, op: Op, answer: &[u8]) -> Result<(), String> {
    let uds = dir.join("vsock.sock");
    let listener = tokio::net::UnixListener::bind(&uds).map_err(|e| e.to_string())?;
    let out = dir.join("out");
    std::fs::create_dir(&out).map_err(|e| e.to_string())?;
    let answer = answer.to_vec();
    let guest = tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        // The CONNECT line and the answer's first line (the VMM's "OK port"), then the
        // request frame and the rest of the answer, then the end.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' && line.len() < 64 {
            line.push(b[0]);
        }
        let split = answer
            .iter()
            .position(|&c| c == b'\n')
            .map_or(answer.len(), |i| i + 1);
        let (first, rest) = answer.split_at(split);
        if s.write_all(first).await.is_err() || rest.is_empty() {
            let _ = s.shutdown().await;
            return;
        }
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).await.is_err() {
            return;
        }
        let Ok((_, len)) = Frame::parse_header(head) else {
            return;
        };
        let mut req = vec![0u8; len];
        if s.read_exact(&mut req).await.is_err() {
            return;
        }
        let _ = s.write_all(rest).await;
        let _ = s.shutdown().await;
        // Whatever else the client sends (stdin, signals) is read and dropped.
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let client = AgentClient::new(Connector::Vsock {
        uds: uds.clone(),
        port: boxlet_guest::proto::AGENT_PORT,
    })
    .with_timeout(Duration::from_secs(2))
    .with_output_limit(1 << 20);
    let result = match op {
        Op::Ping => client.ping().await.map(drop),
        Op::Run => client.run(exec(), Some(b"input")).await.map(drop),
        Op::Exec => match client.exec(exec()).await {
            // Bounded by the answer's length: the guest side closes after it.
            Ok(mut session) => loop {
                match session.next().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            },
            Err(e) => Err(e),
        },
        Op::CopyOut | Op::CopyOutWithLinks => {
            let opts = CopyOutOptions {
                max_bytes: 1 << 20,
                max_entries: 1000,
                symlinks: matches!(op, Op::CopyOutWithLinks),
            };
            client
                .copy_out_with("/data/tree", &out, &opts)
                .await
                .map(drop)
        }
    };
    let _ = guest.await;
    result.map_err(|e| e.to_string())
}

fn exec() -> Exec {
    Exec {
        args: vec!["true".into()],
        ..Exec::default()
    }
}

/// Guest answers worth starting from (the corpus seeds): well-formed exchanges of each
/// kind, and the hostile ones the tests name (links out of the tree, a FIFO, a set-UID
/// file, a huge declared size, a top-level link).
pub fn agent_seeds() -> Vec<Vec<u8>> {
    let frame = |kind: Kind, payload: &[u8]| {
        let mut v = Frame::header(kind, payload.len()).to_vec();
        v.extend_from_slice(payload);
        v
    };
    let ok = b"OK 1024\n".to_vec();
    let done = frame(Kind::Done, br#"{"version":1}"#);
    let exit = frame(Kind::Exit, br#"{"code":0,"signal":null}"#);
    let mut seeds = Vec::new();
    let with = |op: u8, parts: &[&[u8]]| {
        let mut v = vec![op];
        v.extend_from_slice(&ok);
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    seeds.push(with(0, &[&done]));
    seeds.push(with(0, &[&frame(Kind::Error, br#"{"message":"no"}"#)]));
    let started = frame(Kind::Started, br#"{"pid":7}"#);
    let stdout = frame(Kind::Stdout, b"hello\n");
    let stderr = frame(Kind::Stderr, b"\x1b[31mred\n");
    seeds.push(with(1, &[&started, &stdout, &stderr, &exit]));
    seeds.push(with(2, &[&started, &stdout, &exit]));
    for (op, tar) in [(3, copy_tar(false)), (4, copy_tar(true))] {
        let mut parts = Vec::new();
        for chunk in tar.chunks(700) {
            parts.push(frame(Kind::Data, chunk));
        }
        parts.push(frame(Kind::DataEof, b""));
        parts.push(done.clone());
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        seeds.push(with(op, &refs));
    }
    seeds
}

/// A copy-out stream of `tree`: a file, a directory, links in and out of the tree, a
/// FIFO, a set-UID file, a file declaring far more than it holds; or (`top_link`) a
/// top-level link to /etc.
fn copy_tar(top_link: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            let _ = h.set_link_name(l);
        }
        let _ = b.append_data(&mut h, path, data);
    };
    if top_link {
        add("tree", tar::EntryType::Symlink, 0o777, Some("/etc"), b"");
    } else {
        add("tree", tar::EntryType::Directory, 0o755, None, b"");
        add(
            "tree/file",
            tar::EntryType::Regular,
            0o644,
            None,
            b"contents",
        );
        add(
            "tree/suid",
            tar::EntryType::Regular,
            0o4755,
            None,
            b"#!/bin/sh\n",
        );
        add("tree/in", tar::EntryType::Symlink, 0o777, Some("file"), b"");
        add(
            "tree/out",
            tar::EntryType::Symlink,
            0o777,
            Some("../../etc"),
            b"",
        );
        add(
            "tree/abs",
            tar::EntryType::Symlink,
            0o777,
            Some("/etc/passwd"),
            b"",
        );
        add("tree/fifo", tar::EntryType::Fifo, 0o644, None, b"");
        add(
            "tree/hard",
            tar::EntryType::Link,
            0o644,
            Some("/etc/shadow"),
            b"",
        );
    }
    b.into_inner().unwrap_or_default()
}
