//! The host side of the agent protocol ([`boxlet_guest::proto`]), async.
//!
//! Each request opens its own connection: to the guest's vsock port through the VMM's
//! Unix socket (`CONNECT <port>` handshake), or to an agent serving a Unix socket on the
//! host. Many execs run at once by opening many connections.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boxlet_guest::proto::{
    Done, Exec, ExitStatus, Failure, Frame, Kind, ProtocolError, Ready, Request, Setup, Signal,
    Started, AGENT_PORT, CHUNK,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

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
    /// A host-side file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
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
#[derive(Debug, Clone)]
pub struct AgentClient {
    connector: Connector,
}

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
            Kind::Error => Err(AgentError::Failed(f.parse::<Failure>()?.message)),
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
        Kind::Error => return Err(AgentError::Failed(f.parse::<Failure>()?.message)),
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
        Self { connector }
    }

    /// The guest agent of a VM whose vsock Unix socket is `uds`.
    pub fn vsock(uds: impl Into<PathBuf>) -> Self {
        Self::new(Connector::Vsock {
            uds: uds.into(),
            port: AGENT_PORT,
        })
    }

    async fn connect(&self) -> Result<Conn, AgentError> {
        let (path, port) = match &self.connector {
            Connector::Vsock { uds, port } => (uds, Some(*port)),
            Connector::Unix(p) => (p, None),
        };
        let cerr = |msg: String| AgentError::Connect {
            path: path.clone(),
            msg,
        };
        let s = UnixStream::connect(path)
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
            tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
                .await
                .map_err(|_| cerr(format!("no answer to CONNECT {port}")))?
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

    /// Check the agent answers; returns its protocol version.
    pub async fn ping(&self) -> Result<u32, AgentError> {
        let d = self.request(&Request::Ping).await?.done().await?;
        Ok(d.version.unwrap_or(0))
    }

    /// Set the guest's clock, hostname and exec defaults.
    pub async fn setup(&self, setup: Setup) -> Result<(), AgentError> {
        self.request(&Request::Setup(setup)).await?.done().await?;
        Ok(())
    }

    /// Start a process; its output comes from the session.
    pub async fn exec(&self, exec: Exec) -> Result<ExecSession, AgentError> {
        let mut c = self.request(&Request::Exec(exec)).await?;
        let f = c.expect().await?;
        match f.kind {
            Kind::Started => {
                let s: Started = f.parse()?;
                Ok(ExecSession {
                    conn: c,
                    pid: s.pid,
                    finished: false,
                })
            }
            Kind::Error => Err(AgentError::Failed(f.parse::<Failure>()?.message)),
            k => Err(ProtocolError::Unexpected(k).into()),
        }
    }

    /// Run a process to its end with `stdin` as its input, collecting its output.
    pub async fn run(&self, mut exec: Exec, stdin: Option<&[u8]>) -> Result<Output, AgentError> {
        exec.stdin = stdin.is_some();
        let s = self.exec(exec).await?;
        let (mut out, mut input) = s.split();
        let feed = async {
            if let Some(data) = stdin {
                input.write_stdin(data).await?;
                input.close_stdin().await?;
            }
            Ok::<_, AgentError>(input)
        };
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
            }
            Ok::<_, AgentError>(o)
        };
        // Output is read while stdin is written, so neither side can block the other.
        let (fed, out) = tokio::join!(feed, collect);
        let out = out?;
        // A process may exit without reading all its input: that is not an error.
        drop(fed);
        Ok(out)
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
        c.done().await?;
        Ok(())
    }

    /// Copy a guest file or tree into the host directory `host_dir`.
    pub async fn copy_out(&self, guest: &str, host_dir: &Path) -> Result<(), AgentError> {
        let mut c = self
            .request(&Request::CopyOut {
                path: guest.to_owned(),
            })
            .await?;
        let mut tarball = Vec::new();
        loop {
            let f = c.expect().await?;
            match f.kind {
                Kind::Data => tarball.extend_from_slice(&f.payload),
                Kind::DataEof => break,
                Kind::Error => return Err(AgentError::Failed(f.parse::<Failure>()?.message)),
                k => return Err(ProtocolError::Unexpected(k).into()),
            }
        }
        c.done().await?;
        let dir = host_dir.to_path_buf();
        let what = format!("unpacking into {}", dir.display());
        tokio::task::spawn_blocking(move || {
            // The guest is not trusted: tar's unpack keeps every entry inside `dir`.
            tar::Archive::new(&tarball[..]).unpack(&dir)
        })
        .await
        .map_err(|e| AgentError::Io {
            what: what.clone(),
            source: io::Error::other(e),
        })?
        .map_err(|source| AgentError::Io { what, source })
    }

    /// Ask the guest to sync and power off.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.request(&Request::Shutdown).await?.done().await?;
        Ok(())
    }
}
