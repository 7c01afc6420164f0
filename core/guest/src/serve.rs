//! Accept loops: vsock inside a VM, a Unix socket on the host.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

use crate::agent::{Agent, Conn, ShutdownMode};
use crate::proto::{write_frame, Frame, Kind, Ready, PROTOCOL_VERSION, READY_PORT};

impl Conn for VsockStream {
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

fn spawn_conn(agent: &Arc<Agent>, conn: Box<dyn Conn>) {
    let agent = Arc::clone(agent);
    std::thread::spawn(move || {
        if let Err(e) = agent.serve(conn) {
            eprintln!("boxlet-guest: connection: {e}");
        }
    });
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

/// Tell the host the agent is up: one frame on a connection to its ready port. The host
/// listens before it starts the VM; retried briefly in case the device is not up yet.
fn announce() {
    let ready = Frame::json(
        Kind::Ready,
        &Ready {
            protocol: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: uptime_ms(),
        },
    );
    let start = Instant::now();
    loop {
        match VsockStream::connect(&VsockAddr::new(VMADDR_CID_HOST, READY_PORT)) {
            Ok(mut s) => {
                if let Err(e) = write_frame(&mut s, Kind::Ready, &ready.payload) {
                    eprintln!("boxlet-guest: announcing readiness: {e}");
                }
                return;
            }
            Err(e) if start.elapsed() > Duration::from_secs(5) => {
                eprintln!("boxlet-guest: cannot reach the host's ready port: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Serve vsock connections on `port` (inside a VM) forever.
pub fn vsock(port: u32) -> io::Result<()> {
    let listener = VsockListener::bind(&VsockAddr::new(VMADDR_CID_ANY, port))?;
    let agent = Arc::new(Agent::new(ShutdownMode::PowerOff));
    announce();
    for conn in listener.incoming() {
        match conn {
            Ok(c) => spawn_conn(&agent, Box::new(c)),
            Err(e) => eprintln!("boxlet-guest: accept: {e}"),
        }
    }
    Ok(())
}

/// Serve a Unix socket at `path` (the agent on the host) until asked to shut down.
pub fn unix(path: &std::path::Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let agent = Arc::new(Agent::new(ShutdownMode::Exit));
    for conn in listener.incoming() {
        match conn {
            Ok(c) => spawn_conn(&agent, Box::new(c)),
            Err(e) => eprintln!("boxlet-guest: accept: {e}"),
        }
    }
    Ok(())
}
