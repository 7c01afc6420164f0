//! Guest consoles: a VMM's serial output copied into the console log without letting a
//! guest fill the host's disk, and the log's tail for errors and exit reasons.

use std::path::Path;

/// Console bytes written to the log at most; past it only the last [`CONSOLE_TAIL`]
/// bytes are kept, appended when the VM ends.
pub const CONSOLE_LIMIT: u64 = 16 << 20;
pub const CONSOLE_TAIL: usize = 64 << 10;

/// Copy QEMU's serial output into the console log, bounded.
pub async fn pump_console(from: impl tokio::io::AsyncRead + Unpin, file: std::fs::File) {
    pump_bounded(from, file, CONSOLE_LIMIT, CONSOLE_TAIL).await;
}

/// Copy `from` into `file`: the first `limit` bytes, then (at the end) a note of how much
/// was dropped and the last `tail_len` bytes.
pub async fn pump_bounded(
    mut from: impl tokio::io::AsyncRead + Unpin,
    file: std::fs::File,
    limit: u64,
    tail_len: usize,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut file = tokio::fs::File::from_std(file);
    let mut buf = vec![0u8; 16 << 10];
    let mut written = 0u64;
    let mut dropped = 0u64;
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let keep = (limit - written).min(n as u64) as usize;
        if keep > 0 {
            if file.write_all(&buf[..keep]).await.is_err() || file.flush().await.is_err() {
                break;
            }
            written += keep as u64;
        }
        for &b in &buf[keep..n] {
            if tail.len() == tail_len {
                tail.pop_front();
                dropped += 1;
            }
            tail.push_back(b);
        }
    }
    if !tail.is_empty() {
        let mut end = format!("\n[boxlet: {dropped} console bytes dropped]\n").into_bytes();
        end.extend(tail);
        let _ = file.write_all(&end).await;
        let _ = file.flush().await;
    }
}

/// The last `lines` lines of a console log (read from its last 64 KiB only, not through a
/// symlink, only from a regular file), made [`printable`].
pub fn console_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()));
    if let Some(mut f) = opened {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
        let _ = f.take(64 << 10).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    printable(&all[all.len().saturating_sub(lines)..].join("\n"), true)
}

/// Guest text made safe to show on the host's terminal or in a log: control characters
/// (C0 but tab and, when `newlines`, newline; DEL; C1) and the Unicode controls that
/// reorder or break lines are written as escapes, so a guest cannot move the cursor,
/// retitle the window, rewrite the screen or forge log lines with them.
pub fn printable(text: &str, newlines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        let unsafe_char = match ch {
            '\t' => false,
            '\n' => !newlines,
            '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}' => true,
            c => c.is_control(),
        };
        if unsafe_char {
            out.extend(ch.escape_unicode());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_console_log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 200) as u8).collect();
        pump_bounded(&data[..], std::fs::File::create(&path).unwrap(), 1000, 300).await;
        let log = std::fs::read(&path).unwrap();
        assert_eq!(&log[..1000], &data[..1000]);
        let note = b"\n[boxlet: 8700 console bytes dropped]\n";
        assert_eq!(&log[1000..1000 + note.len()], note);
        assert_eq!(&log[1000 + note.len()..], &data[10_000 - 300..]);
        // Under the limit: the whole stream, nothing added.
        pump_bounded(
            &data[..500],
            std::fs::File::create(&path).unwrap(),
            1000,
            300,
        )
        .await;
        assert_eq!(std::fs::read(&path).unwrap(), &data[..500]);
    }

    #[test]
    fn guest_text_cannot_drive_the_terminal() {
        let hostile = "ok\tdone\n\x1b]0;pwned\x07\x1b[2J\r\u{9b}31m\u{202e}txt.exe\x7f";
        let shown = printable(hostile, true);
        assert!(shown.starts_with("ok\tdone\n"), "{shown}");
        assert!(
            !shown
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{shown:?}"
        );
        assert!(!shown.contains('\u{202e}'));
        assert!(shown.contains("\\u{1b}]0;pwned\\u{7}"), "{shown}");
        // On one line, a newline cannot forge another.
        assert_eq!(printable("a\nb", false), "a\\u{a}b");
    }

    #[test]
    fn a_console_tail_is_printable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"boot\n\x1b[31mKernel panic\x1b[0m\n").unwrap();
        let tail = console_tail(&path, 5);
        assert_eq!(tail, "boot\n\\u{1b}[31mKernel panic\\u{1b}[0m");
    }
}
