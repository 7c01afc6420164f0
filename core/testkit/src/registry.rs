//! A real OCI registry for tests: Debian's docker-registry on 127.0.0.1, fed by skopeo.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A docker-registry serving on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// The token server, for a registry with bearer-token auth.
    pub tokens: Option<crate::token_server::TokenServer>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Start a registry; with `htpasswd`, it asks for basic auth with those lines.
    pub fn start(htpasswd: Option<&str>) -> Registry {
        Self::start_with(htpasswd, None)
    }

    /// Start a registry with bearer-token auth (Docker Hub's scheme) and its token server;
    /// with `credentials`, the token server hands out tokens only for them.
    pub fn start_with_tokens(credentials: Option<(&str, &str)>) -> Registry {
        Self::start_with(None, Some(credentials))
    }

    fn start_with(htpasswd: Option<&str>, tokens: Option<Option<(&str, &str)>>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokens.map(|creds| crate::token_server::TokenServer::start(dir.path(), creds));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(lines) = htpasswd {
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, lines).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: boxlet\n    path: {}\n",
                path.display()
            ));
        }
        if let Some(t) = &tokens {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                t.realm,
                crate::token_server::SERVICE,
                crate::token_server::ISSUER,
                t.cert.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let bin = ["docker-registry", "/usr/bin/docker-registry"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("docker-registry is not installed (scripts/setup.sh installs it)");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry {
            child,
            tokens,
            addr,
            _dir: dir,
        }
    }

    /// Push an image with skopeo (`src` in skopeo's transport syntax) to `repo:tag`.
    pub fn push(&self, src: &str, repo_tag: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--all", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let st = cmd
            .arg(src)
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .status()
            .unwrap();
        assert!(st.success(), "skopeo copy {src} failed");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
