//! Fault injection: named steps of ingest and GC where a hook may fail the operation or
//! kill the process, so tests can prove that a crash at any step loses nothing committed.

use std::fmt;
use std::sync::Arc;

/// A step of a store operation, in the order the operation reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// Ingest: the temporary file exists in `tmp/`, empty.
    IngestCreated,
    /// Ingest: one chunk was hashed and written (reached once per chunk).
    IngestChunk,
    /// Ingest: all content is written and verified, not yet synced.
    IngestWritten,
    /// Ingest: the temporary file is fsynced.
    IngestSynced,
    /// Ingest: the file was renamed into `blobs/`; the directory is not yet synced.
    IngestRenamed,
    /// Ingest: the `blobs/<alg>` directory is fsynced; the index does not know the blob yet.
    IngestDirSynced,
    /// Ingest: the index transaction is committed.
    IngestCommitted,
    /// GC: the live set is marked; nothing is removed yet.
    GcMarked,
    /// GC: the index no longer lists the dead blobs; their files still exist.
    GcIndexSwept,
    /// GC: one dead or orphan file was removed (reached once per file).
    GcFileRemoved,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 10] = [
        Step::IngestCreated,
        Step::IngestChunk,
        Step::IngestWritten,
        Step::IngestSynced,
        Step::IngestRenamed,
        Step::IngestDirSynced,
        Step::IngestCommitted,
        Step::GcMarked,
        Step::GcIndexSwept,
        Step::GcFileRemoved,
    ];

    /// The step's name, as `ALL` lists it (for command lines of crash drills).
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// The step with this name.
    pub fn from_name(name: &str) -> Option<Step> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A hook called at every step: returning `false` fails the operation there with
/// [`CasError::Fault`](crate::CasError::Fault); a hook may also end the process.
#[derive(Clone, Default)]
pub struct FaultHook(Option<Arc<dyn Fn(Step) -> bool + Send + Sync>>);

impl FaultHook {
    /// A hook running `f`.
    pub fn new(f: impl Fn(Step) -> bool + Send + Sync + 'static) -> Self {
        FaultHook(Some(Arc::new(f)))
    }

    pub(crate) fn check(&self, step: Step) -> crate::Result<()> {
        match &self.0 {
            Some(f) if !f(step) => Err(crate::CasError::Fault(step)),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "FaultHook(set)"
        } else {
            "FaultHook(none)"
        })
    }
}
