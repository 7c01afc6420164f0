//! The host side of the agent protocol ([`boxlet_guest::proto`]), async.
//!
//! Each request opens its own connection: to the guest's vsock port through the VMM's
//! Unix socket (`CONNECT <port>` handshake), or to an agent serving a Unix socket on the
//! host. Many execs run at once by opening many connections.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use boxlet_guest::proto::CannotRun as ProgramUnrunnable;
use boxlet_guest::proto::{
    CannotRun, Done, Exec, ExitStatus, Failure, Frame, Kind, ProtocolError, Ready, Request, Setup,
    Signal, Started, AGENT_PORT, CHUNK,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;

/// An agent error: transport, protocol, or a request the agent refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Connecting failed.
    #[error("connecting to the agent at {path}: {msg}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        msg: String,
    },
    /// The protocol broke.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Failed(String),
    /// An exec's program could not be run at all (not found, not executable).
    #[error("{message}")]
    CannotRun {
        /// Why.
        why: CannotRun,
        /// The agent's account.
        message: String,
    },
    /// A host-side file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

/// The agent's own account of a failure, as guest text: made printable, on one line.
fn failed(f: Failure) -> AgentError {
    let message = crate::console::printable(&f.message, false);
    match f.cannot_run {
        Some(why) => AgentError::CannotRun { why, message },
        None => AgentError::Failed(message),
    }
}

fn io_err(e: io::Error) -> AgentError {
    AgentError::Protocol(ProtocolError::Io(e))
}

/// How to reach an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connector {
    /// Through a VMM's vsock Unix socket to a guest port.
    Vsock {
        /// The VMM's host-side socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
    },
    /// An agent serving a Unix socket on the host.
    Unix(PathBuf),
}

/// A client for one agent.
///
/// The guest is not trusted: every wait for an answer that is not a process's output is
/// bounded by the request timeout, [`AgentClient::run`] refuses more output than its
/// limit, and copies out stream to disk.
#[derive(Debug, Clone)]
pub struct AgentClient {
    connector: Connector,
    timeout: Duration,
    output_limit: usize,
}

/// Bounds and policy of [`AgentClient::copy_out_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOutOptions {
    /// Bytes of file contents, at most (as the tar headers declare them).
    pub max_bytes: u64,
    /// Entries, at most.
    pub max_entries: u64,
    /// Make symlinks whose targets stay inside the copied tree (relative, never above
    /// it); others, and all symlinks without this, are left out.
    pub symlinks: bool,
}

impl Default for CopyOutOptions {
    /// 4 GiB, a million entries, no symlinks.
    fn default() -> Self {
        Self {
            max_bytes: 4 << 30,
            max_entries: 1 << 20,
            symlinks: false,
        }
    }
}

/// What a copy out made, and what it left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOutReport {
    /// Regular files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Entries left out: links pointing out, devices, FIFOs, sockets, sparse files, and
    /// symlinks unless asked for.
    pub skipped: u64,
}

/// Whether the symlink `link` (a path in the tree) to `target` stays inside the tree.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    use std::path::Component;
    let mut depth = link.components().count().saturating_sub(1) as i64;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                // The top directory's own parent is outside.
                if depth < 1 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Unpack a copy-out tar stream into `root`, every entry under `top`, by `opts`.
fn unpack_copy(
    from: impl io::Read,
    root: &Path,
    top: &Path,
    opts: &CopyOutOptions,
) -> io::Result<CopyOutReport> {
    // Metadata records capped before the tar parser reads them whole.
    let mut ar = tar::Archive::new(boxlet_ext4::TarGuard::new(
        from,
        boxlet_ext4::MAX_TAR_RECORD,
    ));
    ar.set_preserve_permissions(false);
    ar.set_mask(0o022);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_preserve_mtime(true);
    let mut r = CopyOutReport::default();
    let mut links: Vec<PathBuf> = Vec::new();
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::InvalidData, why));
    for (n, entry) in ar.entries()?.enumerate() {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path.components().next().map(|c| c.as_os_str()) != Some(top.as_os_str()) {
            return refuse(format!(
                "the guest sent {} outside {}",
                path.display(),
                top.display()
            ));
        }
        if n as u64 >= opts.max_entries {
            return refuse(format!("more than {} entries", opts.max_entries));
        }
        let is_top = path.components().count() == 1;
        // Nothing is written through a symlink this copy made (a chain of links that each
        // look inside could point anywhere).
        if links.iter().any(|l| path.starts_with(l) && path != *l) {
            return refuse(format!("{} lies under a symlink", path.display()));
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // The size the parser will read (a PAX `size` overrides the header's).
                r.bytes = r.bytes.saturating_add(entry.size());
                if r.bytes > opts.max_bytes {
                    return refuse(format!(
                        "more than {} bytes (at {})",
                        opts.max_bytes,
                        path.display()
                    ));
                }
                r.files += 1;
            }
            tar::EntryType::Directory => r.dirs += 1,
            tar::EntryType::Symlink if !is_top && opts.symlinks => {
                let target = entry.link_name()?.unwrap_or_default().into_owned();
                if !link_stays_inside(&path, &target) {
                    r.skipped += 1;
                    continue;
                }
                r.symlinks += 1;
                links.push(path.clone());
            }
            _ if is_top => {
                return refuse(format!(
                    "{} is a {kind:?}, not a file or a directory",
                    path.display()
                ))
            }
            _ => {
                r.skipped += 1;
                continue;
            }
        }
        // unpack_in keeps every entry inside `root` (no .., no symlink escapes).
        entry.unpack_in(root)?;
    }
    Ok(r)
}

/// How long a request may wait for its answer (not for a process to run).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much output [`AgentClient::run`] collects at most.
pub const OUTPUT_LIMIT: usize = 256 << 20;

/// One connection, framed.
#[derive(Debug)]
struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    async fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), AgentError> {
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.extend_from_slice(&Frame::header(kind, payload.len()));
        buf.extend_from_slice(payload);
        self.w.write_all(&buf).await.map_err(io_err)
    }

    async fn send_json<T: serde::Serialize>(
        &mut self,
        kind: Kind,
        v: &T,
    ) -> Result<(), AgentError> {
        let f = Frame::json(kind, v);
        self.send(kind, &f.payload).await
    }

    /// The next frame; `None` at the end of the stream.
    async fn recv(&mut self) -> Result<Option<Frame>, AgentError> {
        read_frame(&mut self.r).await
    }

    /// The next frame, which must be there.
    async fn expect(&mut self) -> Result<Frame, AgentError> {
        self.recv().await?.ok_or_else(|| {
            io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            ))
        })
    }

    /// Wait for `Done`, turning `Error` into [`AgentError::Failed`].
    async fn done(&mut self) -> Result<Done, AgentError> {
        let f = self.expect().await?;
        match f.kind {
            Kind::Done => Ok(f.parse()?),
            Kind::Error => Err(failed(f.parse::<Failure>()?)),
            k => Err(ProtocolError::Unexpected(k).into()),
        }
    }
}

/// Read one frame from an async reader; `None` at a clean end.
pub async fn read_frame(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<Frame>, AgentError> {
    let mut h = [0u8; 5];
    let mut got = 0;
    while got < h.len() {
        let n = r.read(&mut h[got..]).await.map_err(io_err)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io_err(io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let (kind, len) = Frame::parse_header(h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(io_err)?;
    Ok(Some(Frame { kind, payload }))
}

/// Wait on the ready listener (`<vsock uds>_<READY_PORT>`) for the agent's announcement.
pub async fn accept_ready(listener: &UnixListener) -> Result<Ready, AgentError> {
    let (mut s, _) = listener.accept().await.map_err(io_err)?;
    let f = read_frame(&mut s)
        .await?
        .ok_or_else(|| io_err(io::ErrorKind::UnexpectedEof.into()))?;
    if f.kind != Kind::Ready {
        return Err(ProtocolError::Unexpected(f.kind).into());
    }
    Ok(f.parse()?)
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes on stdout.
    Stdout(Vec<u8>),
    /// Bytes on stderr.
    Stderr(Vec<u8>),
    /// The end.
    Exit(ExitStatus),
}

/// A running exec.
#[derive(Debug)]
pub struct ExecSession {
    conn: Conn,
    pid: u32,
    finished: bool,
}

impl ExecSession {
    /// Its pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Send bytes to its stdin (requested with `stdin: true`).
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        for c in data.chunks(CHUNK) {
            self.conn.send(Kind::Stdin, c).await?;
        }
        Ok(())
    }

    /// Close its stdin.
    pub async fn close_stdin(&mut self) -> Result<(), AgentError> {
        self.conn.send(Kind::StdinEof, &[]).await
    }

    /// Send a signal to its process group.
    pub async fn signal(&mut self, signal: i32) -> Result<(), AgentError> {
        self.conn.send_json(Kind::Signal, &Signal { signal }).await
    }

    /// A handle that can send stdin and signals while this one reads output.
    pub fn split(self) -> (ExecOutput, ExecInput) {
        (
            ExecOutput {
                r: self.conn.r,
                finished: self.finished,
            },
            ExecInput { w: self.conn.w },
        )
    }

    /// The next event; after `Exit`, `None`.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.finished {
            return Ok(None);
        }
        let ev = next_event(&mut self.conn.r).await?;
        self.finished = matches!(ev, ExecEvent::Exit(_));
        Ok(Some(ev))
    }
}

async fn next_event(r: &mut BufReader<OwnedReadHalf>) -> Result<ExecEvent, AgentError> {
    let f = read_frame(r).await?.ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection before the exit status",
        ))
    })?;
    Ok(match f.kind {
        Kind::Stdout => ExecEvent::Stdout(f.payload),
        Kind::Stderr => ExecEvent::Stderr(f.payload),
        Kind::Exit => ExecEvent::Exit(f.parse()?),
        Kind::Error => return Err(failed(f.parse::<Failure>()?)),
        k => return Err(ProtocolError::Unexpected(k).into()),
    })
}

/// The reading half of a split [`ExecSession`].
#[derive(Debug)]
pub struct ExecOutput {
    r: BufReader<OwnedReadHalf>,
    finished: bool,
}

impl ExecOutput {
    /// The next event; after `Exit`, `None`.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.finished {
            return Ok(None);
        }
        let ev = next_event(&mut self.r).await?;
        self.finished = matches!(ev, ExecEvent::Exit(_));
        Ok(Some(ev))
    }
}

/// The writing half of a split [`ExecSession`].
#[derive(Debug)]
pub struct ExecInput {
    w: OwnedWriteHalf,
}

impl ExecInput {
    async fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), AgentError> {
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.extend_from_slice(&Frame::header(kind, payload.len()));
        buf.extend_from_slice(payload);
        self.w.write_all(&buf).await.map_err(io_err)
    }

    /// Send bytes to stdin.
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        for c in data.chunks(CHUNK) {
            self.send(Kind::Stdin, c).await?;
        }
        Ok(())
    }

    /// Close stdin.
    pub async fn close_stdin(&mut self) -> Result<(), AgentError> {
        self.send(Kind::StdinEof, &[]).await
    }

    /// Signal the process group.
    pub async fn signal(&mut self, signal: i32) -> Result<(), AgentError> {
        let f = Frame::json(Kind::Signal, &Signal { signal });
        self.send(Kind::Signal, &f.payload).await
    }
}

/// Everything an exec printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
    /// Its end.
    pub status: ExitStatus,
}

impl AgentClient {
    /// A client that reaches the agent through `connector`.
    pub fn new(connector: Connector) -> Self {
        Self {
            connector,
            timeout: REQUEST_TIMEOUT,
            output_limit: OUTPUT_LIMIT,
        }
    }

    /// Change the request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Change how much output [`AgentClient::run`] collects at most.
    pub fn with_output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// `fut`, failing with a timeout error after the request timeout.
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T, AgentError> {
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            io_err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: no answer from the agent in {:?}", self.timeout),
            ))
        })?
    }

    /// The guest agent of a VM whose vsock Unix socket is `uds`.
    pub fn vsock(uds: impl Into<PathBuf>) -> Self {
        Self::new(Connector::Vsock {
            uds: uds.into(),
            port: AGENT_PORT,
        })
    }

    async fn connect(&self) -> Result<Conn, AgentError> {
        self.bounded("connecting", self.connect_inner()).await
    }

    async fn connect_inner(&self) -> Result<Conn, AgentError> {
        let (path, port) = match &self.connector {
            Connector::Vsock { uds, port } => (uds, Some(*port)),
            Connector::Unix(p) => (p, None),
        };
        let cerr = |msg: String| AgentError::Connect {
            path: path.clone(),
            msg,
        };
        let s = crate::process::connect_no_follow(path)
            .await
            .map_err(|e| cerr(e.to_string()))?;
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        if let Some(port) = port {
            w.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(|e| cerr(e.to_string()))?;
            let mut line = String::new();
            // The answer is one short line; a VMM that cannot reach the port closes.
            let mut limited = (&mut r).take(64);
            limited
                .read_line(&mut line)
                .await
                .map_err(|e| cerr(e.to_string()))?;
            if !line.starts_with("OK ") {
                return Err(cerr(format!(
                    "CONNECT {port} answered {:?}",
                    line.trim_end()
                )));
            }
        }
        Ok(Conn { r, w })
    }

    async fn request(&self, req: &Request) -> Result<Conn, AgentError> {
        let mut c = self.connect().await?;
        c.send_json(Kind::Request, req).await?;
        Ok(c)
    }

    /// Send `req` and wait (bounded) for `Done`.
    async fn simple(&self, what: &str, req: &Request) -> Result<Done, AgentError> {
        let mut c = self.request(req).await?;
        self.bounded(what, c.done()).await
    }

    /// Check the agent answers; returns its protocol version.
    pub async fn ping(&self) -> Result<u32, AgentError> {
        let d = self.simple("ping", &Request::Ping).await?;
        Ok(d.version.unwrap_or(0))
    }

    /// Set the guest's clock, hostname and exec defaults.
    pub async fn setup(&self, setup: Setup) -> Result<(), AgentError> {
        self.simple("setup", &Request::Setup(setup)).await?;
        Ok(())
    }

    /// Start a process; its output comes from the session.
    pub async fn exec(&self, exec: Exec) -> Result<ExecSession, AgentError> {
        let mut c = self.request(&Request::Exec(exec)).await?;
        let f = self.bounded("exec", c.expect()).await?;
        match f.kind {
            Kind::Started => {
                let s: Started = f.parse()?;
                Ok(ExecSession {
                    conn: c,
                    pid: s.pid,
                    finished: false,
                })
            }
            Kind::Error => Err(failed(f.parse::<Failure>()?)),
            k => Err(ProtocolError::Unexpected(k).into()),
        }
    }

    /// Run a process to its end with `stdin` as its input, collecting its output (at
    /// most the output limit: beyond it the process group is killed and this fails).
    pub async fn run(&self, mut exec: Exec, stdin: Option<&[u8]>) -> Result<Output, AgentError> {
        exec.stdin = stdin.is_some();
        let s = self.exec(exec).await?;
        let (mut out, mut input) = s.split();
        let limit = self.output_limit;
        let collect = async {
            let mut o = Output {
                stdout: Vec::new(),
                stderr: Vec::new(),
                status: ExitStatus {
                    code: None,
                    signal: None,
                    timed_out: false,
                },
            };
            while let Some(ev) = out.next().await? {
                match ev {
                    ExecEvent::Stdout(b) => o.stdout.extend_from_slice(&b),
                    ExecEvent::Stderr(b) => o.stderr.extend_from_slice(&b),
                    ExecEvent::Exit(s) => o.status = s,
                }
                if o.stdout.len() + o.stderr.len() > limit {
                    return Err(AgentError::Failed(format!(
                        "more than {limit} bytes of output"
                    )));
                }
            }
            Ok::<_, AgentError>(o)
        };
        tokio::pin!(collect);
        // Output is read while stdin is written, so neither side can block the other; a
        // process that stops reading its input cannot hold up the result.
        if let Some(data) = stdin {
            let feed = async {
                input.write_stdin(data).await?;
                input.close_stdin().await
            };
            tokio::select! {
                r = &mut collect => {
                    if r.is_err() {
                        let _ = input.signal(9).await;
                    }
                    return r;
                }
                // A process may exit without reading all its input: not an error.
                _ = feed => {}
            }
        }
        let r = collect.await;
        if r.is_err() {
            let _ = input.signal(9).await;
        }
        r
    }

    /// Copy a host file or tree into the guest directory `guest_dir`.
    pub async fn copy_in(&self, host: &Path, guest_dir: &str) -> Result<(), AgentError> {
        let host = host.to_path_buf();
        let what = format!("archiving {}", host.display());
        let tarball = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let name = host
                .file_name()
                .ok_or_else(|| io::Error::other("a path without a name"))?
                .to_owned();
            let mut b = tar::Builder::new(Vec::new());
            b.follow_symlinks(false);
            if host.is_dir() {
                b.append_dir_all(&name, &host)?;
            } else {
                b.append_path_with_name(&host, &name)?;
            }
            b.into_inner()
        })
        .await
        .map_err(|e| AgentError::Io {
            what: what.clone(),
            source: io::Error::other(e),
        })?
        .map_err(|source| AgentError::Io { what, source })?;
        let mut c = self
            .request(&Request::CopyIn {
                path: guest_dir.to_owned(),
            })
            .await?;
        for chunk in tarball.chunks(CHUNK) {
            c.send(Kind::Data, chunk).await?;
        }
        c.send(Kind::DataEof, &[]).await?;
        self.bounded("copy in", c.done()).await?;
        Ok(())
    }

    /// Copy a guest file or tree into the host directory `host_dir` with the default
    /// [`CopyOutOptions`] (see [`AgentClient::copy_out_with`]).
    pub async fn copy_out(
        &self,
        guest: &str,
        host_dir: &Path,
    ) -> Result<CopyOutReport, AgentError> {
        self.copy_out_with(guest, host_dir, &CopyOutOptions::default())
            .await
    }

    /// Copy a guest file or tree into the host directory `host_dir`, as
    /// `host_dir/<last component of guest>`, which must not exist yet. The tar stream is
    /// unpacked as it arrives into a private (0700) directory beside it (entries outside
    /// that one name are refused), then renamed into place: nothing else in `host_dir`
    /// can change.
    ///
    /// The guest is hostile: each frame must come within the request timeout; the bytes
    /// and entries it may send are capped ([`CopyOutOptions`]); only regular files and
    /// directories are made (symlinks when asked, and only ones that stay inside the
    /// tree), anything else is left out and counted; the top may not be a link; modes
    /// lose their set-ID and sticky bits and everything belongs to the caller.
    pub async fn copy_out_with(
        &self,
        guest: &str,
        host_dir: &Path,
        opts: &CopyOutOptions,
    ) -> Result<CopyOutReport, AgentError> {
        let name = Path::new(guest)
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| AgentError::Failed(format!("{guest:?} names no file")))?;
        let dest = host_dir.join(&name);
        if dest.symlink_metadata().is_ok() {
            return Err(AgentError::Io {
                what: format!("copying {guest} out"),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", dest.display()),
                ),
            });
        }
        let staging = tempfile::Builder::new()
            .prefix(".boxlet-copy-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(host_dir)
            .map_err(|source| AgentError::Io {
                what: format!("staging in {}", host_dir.display()),
                source,
            })?;
        let mut c = self
            .request(&Request::CopyOut {
                path: guest.to_owned(),
            })
            .await?;
        // Frames flow through a bounded channel into a blocking unpacker.
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        let root = staging.path().to_path_buf();
        let top = name.clone();
        let opts = *opts;
        let unpack = tokio::task::spawn_blocking(move || {
            unpack_copy(
                ChannelReader {
                    rx,
                    buf: Vec::new(),
                    pos: 0,
                },
                &root,
                Path::new(&top),
                &opts,
            )
        });
        let received = async {
            loop {
                let f = self.bounded("copy out", c.expect()).await?;
                match f.kind {
                    Kind::Data => {
                        if tx.send(f.payload).await.is_err() {
                            break; // the unpacker stopped: its error says why
                        }
                    }
                    Kind::DataEof => break,
                    Kind::Error => return Err(failed(f.parse::<Failure>()?)),
                    k => return Err(ProtocolError::Unexpected(k).into()),
                }
            }
            drop(tx);
            Ok(())
        }
        .await;
        let unpacked = unpack.await.map_err(|e| AgentError::Io {
            what: "unpacking".into(),
            source: io::Error::other(e),
        })?;
        received?;
        let report = unpacked.map_err(|source| AgentError::Io {
            what: format!("unpacking {guest} into {}", host_dir.display()),
            source,
        })?;
        self.bounded("copy out", c.done()).await?;
        std::fs::rename(staging.path().join(&name), &dest).map_err(|source| AgentError::Io {
            what: format!("moving {} into place", dest.display()),
            source,
        })?;
        Ok(report)
    }

    /// Ask the guest to sync and power off.    /// Ask the guest to sync and power off.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.simple("shutdown", &Request::Shutdown).await?;
        Ok(())
    }
}

/// A blocking reader over chunks arriving on a channel (ends when the sender is gone).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
