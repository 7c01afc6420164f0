//! A bearer-token server for registry tests, the way Docker Hub's auth works: the
//! registry answers 401 with a `Bearer realm=...` challenge, the client asks this server
//! for a token for its scope (with basic credentials, when it has some), and presents the
//! token. Tokens are JWTs signed ES256 with a throwaway key whose self-signed certificate
//! the registry trusts (`x5c` header). Signing uses the `openssl` command.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// The issuer and service names the registry is configured with.
pub const ISSUER: &str = "boxlet-test-issuer";
/// The registry's service name in tokens.
pub const SERVICE: &str = "boxlet-test-registry";

/// A token server on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct TokenServer {
    /// The realm URL the registry sends clients to.
    pub realm: String,
    /// The certificate the registry must trust.
    pub cert: PathBuf,
    /// Tokens handed out.
    pub issued: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    addr: String,
}

fn openssl(args: &[&str], dir: &Path, stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is not installed (apt-get install openssl)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An ECDSA signature in DER (SEQUENCE of two INTEGERs) as JWS wants it: r || s, 32 bytes each.
fn der_to_raw(der: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 2; // SEQUENCE tag and (short) length
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "not an INTEGER");
        let len = der[i + 1] as usize;
        let int = &der[i + 2..i + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TokenServer {
    /// Start a server in `dir`; with `credentials`, token requests must carry them.
    pub fn start(dir: &Path, credentials: Option<(&str, &str)>) -> TokenServer {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.crt",
                "-subj",
                "/CN=boxlet-token",
                "-days",
                "2",
            ],
            dir,
            b"",
        );
        let cert_der = openssl(&["x509", "-in", "token.crt", "-outform", "DER"], dir, b"");
        let header =
            serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(cert_der)]});
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        let expected_auth =
            credentials.map(|(u, p)| format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))));

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let (stop2, issued2, key_dir) = (stop.clone(), issued.clone(), dir.to_path_buf());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = serve(
                    &mut conn,
                    &header,
                    expected_auth.as_deref(),
                    &key_dir,
                    &issued2,
                );
            }
        });
        TokenServer {
            realm: format!("http://{addr}/token"),
            cert: std::fs::canonicalize(dir.join("token.crt")).unwrap_or_default(),
            issued,
            stop,
            addr,
        }
    }
}

fn serve(
    conn: &mut TcpStream,
    header: &str,
    expected_auth: Option<&str>,
    dir: &Path,
    issued: &AtomicU64,
) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("");
    let authorization = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_string())
    });
    if expected_auth.is_some() && authorization.as_deref() != expected_auth {
        return conn.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .map(percent_decode)
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let n = issued.fetch_add(1, Ordering::SeqCst);
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "tester", "aud": SERVICE, "exp": now + 600, "nbf": now - 60,
        "iat": now, "jti": format!("boxlet-{now}-{n}"), "access": access,
    });
    let signing_input = format!(
        "{header}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let der = openssl(
        &["dgst", "-sha256", "-sign", "token.key"],
        dir,
        signing_input.as_bytes(),
    );
    let token = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(der_to_raw(&der))
    );
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 600}).to_string();
    conn.write_all(
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            .as_bytes(),
    )
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}
