//! A minimal initramfs (cpio "newc") that carries the agent, for guests whose root is a
//! virtio-fs share: the kernel runs `/boxlet-guest` from it, and the agent mounts the
//! share and switches to it. The shared directory itself is never modified.

use std::io::{self, Write};

/// One archive member.
enum Member<'a> {
    Dir,
    File(&'a [u8]),
    CharDev(u32, u32),
}

fn put(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, m: &Member<'_>) {
    let (kind, data, rdev): (u32, &[u8], (u32, u32)) = match m {
        Member::Dir => (0o040000, &[], (0, 0)),
        Member::File(d) => (0o100000, d, (0, 0)),
        Member::CharDev(a, b) => (0o020000, &[], (*a, *b)),
    };
    let namesize = name.len() + 1;
    let fields = [
        ino,
        kind | mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        namesize as u32,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// An initramfs (newc cpio) made member by member.
#[derive(Debug, Default)]
pub struct Initramfs {
    out: Vec<u8>,
    ino: u32,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn member(&mut self, name: &str, mode: u32, m: &Member<'_>) -> &mut Self {
        self.ino += 1;
        put(&mut self.out, self.ino, name, mode, m);
        self
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.member(name, mode, &Member::Dir)
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.member(name, mode, &Member::File(data))
    }

    /// A character device.
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.member(name, mode, &Member::CharDev(major, minor))
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        put(&mut self.out, 0, "TRAILER!!!", 0, &Member::File(&[]));
        self.out
    }
}

/// An initramfs holding `agent` as `/boxlet-guest` (and `/dev/console`, so the agent's
/// messages reach the console log).
pub fn with_agent(agent: &[u8]) -> Vec<u8> {
    let mut i = Initramfs::new();
    i.dir("dev", 0o755)
        .char_dev("dev/console", 0o600, 5, 1)
        .dir("newroot", 0o755)
        .file("boxlet-guest", 0o755, agent);
    i.finish()
}

/// Write [`with_agent`] of the file `agent` to `path`.
pub fn write_with_agent(agent: &std::path::Path, path: &std::path::Path) -> io::Result<()> {
    let bytes = std::fs::read(agent)?;
    let mut f = std::fs::File::create(path)?;
    f.write_all(&with_agent(&bytes))?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpio_lists_its_members() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i.cpio");
        std::fs::write(dir.path().join("agent"), b"#!/bin/true\n").unwrap();
        super::write_with_agent(&dir.path().join("agent"), &img).unwrap();
        // GNU cpio reads it back (when installed), else check the raw layout.
        let bytes = std::fs::read(&img).unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        for name in ["dev/console", "newroot", "boxlet-guest", "TRAILER!!!"] {
            assert!(text.contains(name), "{name}");
        }
        if let Ok(out) = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::fs::File::open(&img).unwrap())
            .output()
        {
            if out.status.success() {
                let list = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    list.lines().collect::<Vec<_>>(),
                    ["dev", "dev/console", "newroot", "boxlet-guest"]
                );
            }
        }
    }
}
