//! The agent's request handling: one connection, one request (see [`crate::proto`]).
//!
//! The same code serves vsock connections inside a VM and Unix-socket connections on the
//! host (where the protocol and exec logic are tested fast). Processes are spawned and
//! waited for here; inside a VM, PID 1 is a separate reaper process (see `main.rs`), so
//! nothing else collects this process's children.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::proto::{
    read_frame, write_frame, CannotRun, Done, Exec, ExitStatus, Failure, Frame, Kind,
    ProtocolError, Request, Setup, Signal, Started, CHUNK, PROTOCOL_VERSION,
};
use crate::users;

/// A bidirectional stream the agent can serve (vsock or Unix socket).
pub trait Conn: Read + Write + Send + 'static {
    /// A second handle on the same stream (for a writer beside the reader).
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>>;
    /// Close both directions (wakes a reader blocked on the other handle).
    fn close(&self);
    /// Close the sending direction: the peer reads the end of the stream.
    fn close_write(&self);
}

impl Conn for std::os::unix::net::UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// What the agent does when asked to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Sync and power the VM off.
    PowerOff,
    /// Exit the agent process (the agent runs on the host).
    Exit,
}

/// The agent's state shared by its connections.
#[derive(Debug)]
pub struct Agent {
    defaults: Mutex<Setup>,
    shutdown: ShutdownMode,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Shared writer of a connection's frames (output threads and the main one).
type Writer = Arc<Mutex<Box<dyn Conn>>>;

fn send(w: &Writer, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
    write_frame(&mut *g, kind, payload)
}

fn send_json<T: serde::Serialize>(w: &Writer, kind: Kind, v: &T) -> io::Result<()> {
    let f = Frame::json(kind, v);
    send(w, kind, &f.payload)
}

fn fail(w: &Writer, failure: impl Into<Failure>) -> io::Result<()> {
    send_json(w, Kind::Error, &failure.into())
}

impl Agent {
    /// An agent with empty defaults.
    pub fn new(shutdown: ShutdownMode) -> Self {
        Self {
            defaults: Mutex::new(Setup::default()),
            shutdown,
        }
    }

    /// Serve one connection to its end. Errors are the connection's (the agent goes on).
    pub fn serve(&self, conn: Box<dyn Conn>) -> Result<(), ProtocolError> {
        let writer: Writer = Arc::new(Mutex::new(conn.try_clone_conn()?));
        let mut reader = conn;
        let first = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                // Tell the host why, if it still listens.
                let _ = fail(&writer, e.to_string());
                reader.close_write();
                return Err(e);
            }
        };
        if first.kind != Kind::Request {
            fail(&writer, format!("expected a request, got {:?}", first.kind))?;
            return Err(ProtocolError::Unexpected(first.kind));
        }
        let req: Request = match first.parse() {
            Ok(r) => r,
            Err(e) => {
                fail(&writer, e.to_string())?;
                return Err(e);
            }
        };
        let res = match req {
            Request::Ping => send_json(
                &writer,
                Kind::Done,
                &Done {
                    version: Some(PROTOCOL_VERSION),
                },
            )
            .map_err(Into::into),
            Request::Setup(s) => self.setup(&writer, s),
            Request::Exec(e) => self.exec(reader.as_mut(), &writer, e),
            Request::CopyIn { path } => copy_in(reader.as_mut(), &writer, &path),
            Request::CopyOut { path } => copy_out(&writer, &path),
            Request::Shutdown => {
                send_json(&writer, Kind::Done, &Done::default())?;
                // vsock sends asynchronously: a reset right after the write can lose the
                // answer. The host closes the connection once it has read it; wait for
                // that (boundedly) before going down.
                if let Ok(mut r) = reader.try_clone_conn() {
                    let (tx, rx) = mpsc::channel();
                    thread::spawn(move || {
                        let mut b = [0u8; 256];
                        while matches!(r.read(&mut b), Ok(n) if n > 0) {}
                        let _ = tx.send(());
                    });
                    let _ = rx.recv_timeout(SHUTDOWN_ACK_WAIT);
                }
                self.shut_down();
                Ok(())
            }
        };
        reader.close_write();
        res
    }

    fn setup(&self, w: &Writer, s: Setup) -> Result<(), ProtocolError> {
        let mut problems = Vec::new();
        if let Some(ns) = s.unix_time_ns {
            if let Err(e) = crate::sys::set_clock(ns) {
                problems.push(format!("setting the clock: {e}"));
            }
        }
        if let Some(h) = &s.hostname {
            if let Err(e) = crate::sys::set_hostname(h) {
                problems.push(format!("setting the hostname {h:?}: {e}"));
            }
        }
        *self.defaults.lock().unwrap_or_else(|e| e.into_inner()) = s;
        if problems.is_empty() {
            send_json(w, Kind::Done, &Done::default())?;
        } else {
            fail(w, problems.join("; "))?;
        }
        Ok(())
    }

    fn shut_down(&self) {
        match self.shutdown {
            ShutdownMode::PowerOff => crate::sys::power_off(),
            ShutdownMode::Exit => std::process::exit(0),
        }
    }

    /// The command an exec runs, with its environment, directory and user.
    fn command(&self, e: &Exec) -> Result<Command, Failure> {
        let d = self
            .defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(program) = e.args.first() else {
            return Err(String::from("exec without a program").into());
        };
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for kv in d.env.iter().chain(&e.env) {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    env.insert(k.to_owned(), v.to_owned());
                }
                _ => return Err(format!("environment entry {kv:?} is not KEY=VALUE").into()),
            }
        }
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        let user = e.user.as_ref().or(d.user.as_ref());
        let ids = match user {
            Some(u) => Some(users::resolve(u, Path::new("/etc"))?),
            None => None,
        };
        if let Some(ids) = &ids {
            env.entry("HOME".into())
                .or_insert_with(|| ids.home.clone().unwrap_or_else(|| "/".into()));
        } else {
            env.entry("HOME".into()).or_insert_with(|| "/root".into());
        }
        let cwd = e
            .cwd
            .as_ref()
            .or(d.cwd.as_ref())
            .map_or("/", |s| s.as_str());
        // Resolve the program in the exec's PATH (not the agent's).
        let resolved = resolve_program(program, &env["PATH"], cwd).map_err(|why| Failure {
            message: match why {
                CannotRun::NotFound => format!("{program}: command not found"),
                CannotRun::NotExecutable => format!("{program}: permission denied"),
            },
            cannot_run: Some(why),
        })?;
        let mut cmd = Command::new(resolved);
        cmd.arg0(program)
            .args(&e.args[1..])
            .env_clear()
            .envs(&env)
            .current_dir(cwd)
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if e.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(ids) = ids {
            cmd.uid(ids.uid).gid(ids.gid);
        }
        Ok(cmd)
    }

    fn exec(&self, reader: &mut dyn Conn, w: &Writer, e: Exec) -> Result<(), ProtocolError> {
        let mut cmd = match self.command(&e) {
            Ok(c) => c,
            Err(msg) => {
                fail(w, msg)?;
                return Ok(());
            }
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(err) => {
                // What a shell would say: an interpreter that is missing, a file the
                // kernel will not execute.
                let cannot_run = match err.kind() {
                    io::ErrorKind::NotFound => Some(CannotRun::NotFound),
                    io::ErrorKind::PermissionDenied => Some(CannotRun::NotExecutable),
                    _ => None,
                };
                fail(
                    w,
                    Failure {
                        message: format!("{}: {err}", e.args[0]),
                        cannot_run,
                    },
                )?;
                return Ok(());
            }
        };
        let pid = child.id();
        // From here on the process must be killed and reaped on every early return.
        let abandon = |mut child: std::process::Child| {
            crate::sys::kill_group(pid, SIGKILL);
            let _ = child.wait();
        };
        if let Err(err) = send_json(w, Kind::Started, &Started { pid }) {
            abandon(child);
            return Err(err.into());
        }
        let mut host = match reader.try_clone_conn() {
            Ok(h) => h,
            Err(err) => {
                abandon(child);
                return Err(err.into());
            }
        };

        // Output pumps. Once `Exit` is sent they stop forwarding (a daemon the process
        // left behind may hold the pipes open long after).
        let exited = Arc::new(AtomicBool::new(false));
        // Output read but not yet sent, by either pump.
        let in_hand = Arc::new(AtomicUsize::new(0));
        let (pumped_tx, pumped_rx) = mpsc::channel::<()>();
        // Second descriptors of the pipes' read ends: whether output is still waiting
        // in them decides how long the exit waits for the pumps.
        let mut probes = Vec::new();
        let pump = |src: Option<Box<dyn Read + Send>>, kind: Kind| {
            let w = Arc::clone(w);
            let exited = Arc::clone(&exited);
            let in_hand = Arc::clone(&in_hand);
            let done = pumped_tx.clone();
            thread::spawn(move || {
                if let Some(mut src) = src {
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        match src.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                in_hand.fetch_add(1, Ordering::SeqCst);
                                let stop = exited.load(Ordering::SeqCst)
                                    || send(&w, kind, &buf[..n]).is_err();
                                in_hand.fetch_sub(1, Ordering::SeqCst);
                                if stop {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                }
                let _ = done.send(());
            });
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in [
            stdout.as_ref().map(|s| s.as_fd()),
            stderr.as_ref().map(|s| s.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            if let Ok(p) = fd.try_clone_to_owned() {
                probes.push(p);
            }
        }
        pump(
            stdout.map(|s| Box::new(s) as Box<dyn Read + Send>),
            Kind::Stdout,
        );
        pump(
            stderr.map(|s| Box::new(s) as Box<dyn Read + Send>),
            Kind::Stderr,
        );
        drop(pumped_tx);

        // The host's frames: stdin, its end, signals. A host that goes away kills the
        // process group (unless the process has already exited).
        let mut stdin = child.stdin.take();
        let gone = Arc::clone(&exited);
        let signal = move |sig: i32| {
            if !gone.load(Ordering::SeqCst) {
                crate::sys::kill_group(pid, sig);
            }
        };
        let input = thread::spawn(move || loop {
            match read_frame(&mut host) {
                Ok(Some(f)) => match f.kind {
                    Kind::Stdin => {
                        if let Some(s) = stdin.as_mut() {
                            if s.write_all(&f.payload).is_err() {
                                stdin = None;
                            }
                        }
                    }
                    Kind::StdinEof => stdin = None,
                    // A malformed signal frame is ignored, as documented.
                    Kind::Signal => {
                        if let Ok(s) = f.parse::<Signal>() {
                            signal(s.signal);
                        }
                    }
                    _ => {
                        signal(SIGKILL);
                        return;
                    }
                },
                Ok(None) | Err(_) => {
                    signal(SIGKILL);
                    return;
                }
            }
        });

        // Wait, with the timeout if there is one.
        let (tx, rx) = mpsc::channel();
        let waiter = thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let mut timed_out = false;
        let status = match e.timeout_ms {
            Some(ms) => match rx.recv_timeout(Duration::from_millis(ms)) {
                Ok(s) => s,
                Err(_) => {
                    timed_out = true;
                    crate::sys::kill_group(pid, SIGKILL);
                    rx.recv()
                        .unwrap_or_else(|_| Err(io::Error::other("waiter gone")))
                }
            },
            None => rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("waiter gone"))),
        };
        let _ = waiter.join();
        // Output written before the exit comes first: wait for both pipes to end. While
        // output waits in a pipe or in a pump's hands the wait goes on (a busy guest may
        // run the pumps late); once the pipes have been quiet, yet open, for
        // OUTPUT_GRACE, it ends (a process that daemonized keeps them open).
        let mut ended = 0;
        let exit_seen = std::time::Instant::now();
        let mut quiet_since = exit_seen;
        while ended < 2 && exit_seen.elapsed() < OUTPUT_GRACE_MAX {
            match pumped_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => {
                    ended += 1;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let busy = in_hand.load(Ordering::SeqCst) > 0
                || probes.iter().any(|p| crate::sys::readable_now(p.as_fd()));
            if busy {
                quiet_since = std::time::Instant::now();
            } else if quiet_since.elapsed() >= OUTPUT_GRACE {
                break;
            }
        }
        drop(probes);
        exited.store(true, Ordering::SeqCst);
        let res = match status {
            Ok(status) => send_json(
                w,
                Kind::Exit,
                &ExitStatus {
                    code: status.code(),
                    signal: status.signal(),
                    timed_out,
                },
            ),
            Err(err) => fail(w, format!("waiting for {}: {err}", e.args[0])),
        };
        // The host reads the end of the stream and closes its side, which ends the
        // input thread.
        w.lock().unwrap_or_else(|e| e.into_inner()).close_write();
        let _ = input.join();
        res.map_err(Into::into)
    }
}

/// How long a shutdown waits for the host to take its answer.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);

/// How long the output pipes may stay open and quiet after the process exited (its
/// descendants may still write).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// How long output may keep flowing after the process exited (a daemon it left behind
/// that writes without end must not hold the exec open).
const OUTPUT_GRACE_MAX: Duration = Duration::from_secs(10);
const SIGKILL: i32 = 9;

/// `program` found the way execvp would, in `path` (relative entries against `cwd`).
fn resolve_program(program: &str, path: &str, cwd: &str) -> Result<std::path::PathBuf, CannotRun> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    // Found but not executable (a shell's 126), if nothing executable is found.
    let exists = |p: &Path| p.exists();
    let candidates: Vec<std::path::PathBuf> = if program.contains('/') {
        vec![Path::new(cwd).join(program)]
    } else {
        path.split(':')
            .map(|dir| {
                Path::new(cwd)
                    .join(if dir.is_empty() { "." } else { dir })
                    .join(program)
            })
            .collect()
    };
    if let Some(p) = candidates.iter().find(|p| is_exec(p)) {
        return Ok(p.clone());
    }
    if candidates.iter().any(|p| exists(p)) {
        Err(CannotRun::NotExecutable)
    } else {
        Err(CannotRun::NotFound)
    }
}

/// Frames of `Data` read as one stream, ending at `DataEof`.
struct DataReader<'a> {
    conn: &'a mut dyn Conn,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for DataReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() && !self.done {
            match read_frame(&mut self.conn).map_err(io::Error::other)? {
                Some(f) if f.kind == Kind::Data => {
                    self.buf = f.payload;
                    self.pos = 0;
                }
                Some(f) if f.kind == Kind::DataEof => self.done = true,
                Some(f) => {
                    return Err(io::Error::other(format!(
                        "unexpected {:?} frame in a data stream",
                        f.kind
                    )))
                }
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Bytes written become `Data` frames of at most [`CHUNK`] bytes.
struct DataWriter<'a> {
    w: &'a Writer,
    buf: Vec<u8>,
}

impl Write for DataWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        for c in self.buf.chunks(CHUNK) {
            send(self.w, Kind::Data, c)?;
        }
        self.buf.clear();
        Ok(())
    }
}

fn copy_in(reader: &mut dyn Conn, w: &Writer, path: &str) -> Result<(), ProtocolError> {
    let mut data = DataReader {
        conn: reader,
        buf: Vec::new(),
        pos: 0,
        done: false,
    };
    let res = std::fs::create_dir_all(path).and_then(|()| {
        let mut ar = tar::Archive::new(&mut data);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_overwrite(true);
        ar.unpack(path)
    });
    // Drain the rest of the stream so the connection stays in step.
    let _ = io::copy(&mut data, &mut io::sink());
    match res {
        Ok(()) => send_json(w, Kind::Done, &Done::default())?,
        Err(e) => fail(w, format!("copying into {path}: {e}"))?,
    }
    Ok(())
}

fn copy_out(w: &Writer, path: &str) -> Result<(), ProtocolError> {
    let p = Path::new(path);
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) => {
            fail(w, format!("{path}: {e}"))?;
            return Ok(());
        }
    };
    let name = p
        .file_name()
        .map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned());
    let mut out = DataWriter { w, buf: Vec::new() };
    let res = (|| {
        let mut b = tar::Builder::new(&mut out);
        b.follow_symlinks(false);
        if meta.is_dir() {
            b.append_dir_all(&name, p)?;
        } else {
            b.append_path_with_name(p, &name)?;
        }
        b.finish()
    })();
    out.flush()?;
    match res {
        Ok(()) => {
            send(w, Kind::DataEof, &[])?;
            send_json(w, Kind::Done, &Done::default())?;
        }
        Err(e) => fail(w, format!("copying {path} out: {e}"))?,
    }
    Ok(())
}
