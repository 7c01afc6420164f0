//! The host<->guest protocol, version 1 (docs/agent-protocol.md).
//!
//! A connection carries one request. Every message is a frame: a 4-byte little-endian
//! payload length, a 1-byte kind, then the payload (JSON for control messages, raw bytes
//! for data). The host opens a connection (vsock port [`AGENT_PORT`], or the agent's Unix
//! socket), sends a [`Request`] frame, and the exchange that follows depends on it.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version; the agent reports it in [`Ready`] and in answers to `Ping`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 5000;
/// The vsock port on the host (CID 2) the agent connects to, once, when it is ready.
pub const READY_PORT: u32 = 1024;
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Data frames are at most this big when the agent or the client writes them.
pub const CHUNK: usize = 64 << 10;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host -> guest, first frame: a JSON [`Request`].
    Request = 1,
    /// Host -> guest: bytes for the process's stdin.
    Stdin = 2,
    /// Host -> guest: close the process's stdin.
    StdinEof = 3,
    /// Host -> guest: JSON [`Signal`] for the process group.
    Signal = 4,
    /// Guest -> host: JSON [`Started`].
    Started = 10,
    /// Guest -> host: stdout bytes.
    Stdout = 11,
    /// Guest -> host: stderr bytes.
    Stderr = 12,
    /// Guest -> host: JSON [`ExitStatus`]; the last frame of an exec.
    Exit = 13,
    /// Guest -> host: JSON [`Failure`]; the request failed, the connection ends.
    Error = 14,
    /// Guest -> host: JSON [`Done`]; the request succeeded.
    Done = 15,
    /// Either way: a piece of a tar stream (copy in and out).
    Data = 20,
    /// Either way: the end of a tar stream.
    DataEof = 21,
    /// Guest -> host on the ready connection: JSON [`Ready`].
    Ready = 30,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Stdin,
            3 => Self::StdinEof,
            4 => Self::Signal,
            10 => Self::Started,
            11 => Self::Stdout,
            12 => Self::Stderr,
            13 => Self::Exit,
            14 => Self::Error,
            15 => Self::Done,
            20 => Self::Data,
            21 => Self::DataEof,
            30 => Self::Ready,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame of `kind` with a JSON payload.
    pub fn json<T: Serialize>(kind: Kind, value: &T) -> Self {
        Self {
            kind,
            payload: serde_json::to_vec(value).expect("protocol messages serialize"),
        }
    }

    /// The payload as JSON of type `T`.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtocolError::BadPayload {
            kind: self.kind,
            msg: e.to_string(),
        })
    }

    /// The 5-byte header of a frame with this kind and payload length.
    pub fn header(kind: Kind, len: usize) -> [u8; 5] {
        let mut h = [0u8; 5];
        h[..4].copy_from_slice(&(len as u32).to_le_bytes());
        h[4] = kind as u8;
        h
    }

    /// Kind and payload length from a header, checked.
    pub fn parse_header(h: [u8; 5]) -> Result<(Kind, usize), ProtocolError> {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = Kind::from_u8(h[4]).ok_or(ProtocolError::UnknownKind(h[4]))?;
        if len > MAX_FRAME {
            return Err(ProtocolError::TooLarge(len));
        }
        Ok((kind, len))
    }
}

/// A protocol violation or a transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The transport failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// A frame kind this version does not know.
    #[error("agent protocol: unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame larger than [`MAX_FRAME`].
    #[error("agent protocol: frame of {0} bytes (at most {MAX_FRAME})")]
    TooLarge(usize),
    /// A JSON payload that does not parse.
    #[error("agent protocol: bad {kind:?} payload: {msg}")]
    BadPayload {
        /// The frame's kind.
        kind: Kind,
        /// Why.
        msg: String,
    },
    /// A frame that is not allowed at this point.
    #[error("agent protocol: unexpected {0:?} frame")]
    Unexpected(Kind),
}

/// Read one frame; `None` at a clean end of stream (before a header).
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut h = [0u8; 5];
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, len) = Frame::parse_header(h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame { kind, payload }))
}

/// Write one frame (header and payload in one write).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&Frame::header(kind, payload.len()));
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// What the host asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Defaults for later execs, the clock and the hostname (answered with `Done`).
    Setup(Setup),
    /// Run a process (answered with `Started`, output, then `Exit`).
    Exec(Exec),
    /// Unpack the tar stream that follows (in `Data` frames, then `DataEof`) at `path`.
    CopyIn {
        /// Directory in the guest to unpack into (created if missing).
        path: String,
    },
    /// Send `path` (a file or a tree) as a tar stream of `Data` frames, then `DataEof`.
    CopyOut {
        /// Path in the guest.
        path: String,
    },
    /// Sync the filesystems and power off (answered with `Done` first).
    Shutdown,
    /// Answered with `Done` carrying the protocol version.
    Ping,
}

/// Defaults for execs, and the guest's clock and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Wall-clock time to set, in nanoseconds since the epoch.
    #[serde(default)]
    pub unix_time_ns: Option<u64>,
    /// Hostname to set.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Environment (`KEY=VALUE`) every exec starts from.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory of execs that give none.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User of execs that give none (`name`, `uid` or `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
}

/// A process to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Program and arguments (the program is looked up in `PATH`).
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs over the setup's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// Whether `Stdin` frames follow; without it stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A signal for a running exec's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// The signal number.
    pub signal: i32,
}

/// The exec's process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Its pid in the guest.
    pub pid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Killed because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + the signal, as a process exit code
    /// (0-255; anything out of range, which no real process reports, is 255).
    pub fn shell_code(&self) -> i32 {
        let c = match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => s.saturating_add(128),
            (None, None) => 255,
        };
        if (0..=255).contains(&c) {
            c
        } else {
            255
        }
    }
}

/// A request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What went wrong, in words.
    pub message: String,
    /// For an exec: its program could not be run at all, and why (what a shell tells
    /// apart with exit codes 127 and 126).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cannot_run: Option<CannotRun>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            message,
            cannot_run: None,
        }
    }
}

/// Why an exec's program could not be run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CannotRun {
    /// No such program (in the exec's PATH, or at the path given).
    NotFound,
    /// It is there but may not be executed.
    NotExecutable,
}

impl CannotRun {
    /// The exit status a shell (and docker) gives it: 127 or 126.
    pub fn exit_code(self) -> i32 {
        match self {
            CannotRun::NotFound => 127,
            CannotRun::NotExecutable => 126,
        }
    }
}

/// A request succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The protocol version (answers to `Ping`).
    #[serde(default)]
    pub version: Option<u32>,
}

/// The agent is up (sent once on a connection it opens to the host's [`READY_PORT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Protocol version.
    pub protocol: u32,
    /// The agent's crate version.
    pub agent: String,
    /// Milliseconds since the guest kernel started (from /proc/uptime).
    pub uptime_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused() {
        let mut buf = Vec::new();
        let req = Request::Exec(Exec {
            args: vec!["echo".into(), "hi".into()],
            stdin: true,
            ..Exec::default()
        });
        let f = Frame::json(Kind::Request, &req);
        write_frame(&mut buf, f.kind, &f.payload).unwrap();
        write_frame(&mut buf, Kind::Stdin, b"data").unwrap();
        let mut r = &buf[..];
        let got = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(got.parse::<Request>().unwrap(), req);
        assert_eq!(read_frame(&mut r).unwrap().unwrap().payload, b"data");
        assert!(read_frame(&mut r).unwrap().is_none());

        let mut h = Frame::header(Kind::Stdout, 3).to_vec();
        h[4] = 99;
        assert!(matches!(
            read_frame(&mut &h[..]),
            Err(ProtocolError::UnknownKind(99))
        ));
        let big = Frame::header(Kind::Stdout, MAX_FRAME + 1);
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(ProtocolError::TooLarge(_))
        ));
        // A header cut short, a payload cut short.
        assert!(read_frame(&mut &[1u8, 0][..]).is_err());
        let short = [&Frame::header(Kind::Stdout, 10)[..], b"abc"].concat();
        assert!(read_frame(&mut &short[..]).is_err());
        let bad = Frame {
            kind: Kind::Request,
            payload: b"{\"op\":\"nope\"}".to_vec(),
        };
        assert!(bad.parse::<Request>().is_err());
    }

    #[test]
    fn shell_codes() {
        let s = |code, signal| ExitStatus {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(s(Some(3), None).shell_code(), 3);
        assert_eq!(s(None, Some(9)).shell_code(), 137);
        // Values only a lying guest would send.
        assert_eq!(s(None, Some(i32::MAX)).shell_code(), 255);
        assert_eq!(s(Some(256), None).shell_code(), 255);
        assert_eq!(s(Some(-1), None).shell_code(), 255);
    }
}
