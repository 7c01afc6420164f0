//! A writer thread: chunks hashed on the ingesting thread are written to the file on
//! another, so ingest takes about as long as the slower of hashing and writing, not
//! their sum. Buffers come back to the ingesting thread to be filled again.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Chunks in flight between the two threads.
const DEPTH: usize = 4;

#[derive(Debug)]
pub(crate) struct WritePipe {
    tx: Option<SyncSender<Vec<u8>>>,
    back: Receiver<Vec<u8>>,
    handle: Option<JoinHandle<io::Result<File>>>,
    chunk: usize,
}

impl WritePipe {
    /// Start writing to `file` (at its current position) on a new thread.
    pub(crate) fn start(mut file: File, chunk: usize) -> io::Result<WritePipe> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(DEPTH);
        let (back_tx, back) = mpsc::sync_channel(DEPTH + 1);
        let handle = std::thread::Builder::new()
            .name("boxlet-ingest".into())
            .spawn(move || {
                for mut buf in rx {
                    file.write_all(&buf)?;
                    buf.clear();
                    let _ = back_tx.try_send(buf);
                }
                Ok(file)
            })?;
        Ok(WritePipe {
            tx: Some(tx),
            back,
            handle: Some(handle),
            chunk,
        })
    }

    /// An empty buffer to fill (a returned one when there is one).
    pub(crate) fn buffer(&self) -> Vec<u8> {
        self.back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.chunk))
    }

    /// Queue `buf` to be written. A failure is the writer thread's error.
    pub(crate) fn send(&mut self, buf: Vec<u8>) -> io::Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(buf).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread has stopped: its result says why.
        match self.join() {
            Ok(_) => Err(io::Error::other("the ingest writer stopped")),
            Err(e) => Err(e),
        }
    }

    /// Wait for everything queued to be written; the file back.
    pub(crate) fn finish(mut self) -> io::Result<File> {
        self.join()
    }

    fn join(&mut self) -> io::Result<File> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the ingest writer panicked"))),
            None => Err(io::Error::other("the ingest writer already stopped")),
        }
    }
}

impl Drop for WritePipe {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.join();
        }
    }
}
