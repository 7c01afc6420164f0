//! Fault injection in a Disk prepare: named steps where a hook may fail the prepare or end
//! the process, so tests prove that a crash at any step leaves a home the next start can
//! use.

use std::fmt;
use std::sync::Arc;

/// A step of a Disk prepare, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PrepareStep {
    /// Stage 1: the image's ext4 is built in `tmp/`.
    ImageBuilt,
    /// Stage 1: it is renamed into `bases/`, not yet recorded.
    ImageInstalled,
    /// Stage 1: its record is written.
    ImageRecorded,
    /// Stage 2: the copy with the agent injected is staged in `tmp/`.
    BaseStaged,
    /// Stage 2: it is renamed into `bases/`, not yet recorded.
    BaseInstalled,
    /// Stage 2: its record is written.
    BaseRecorded,
    /// The box's overlay exists.
    OverlayCreated,
}

impl PrepareStep {
    /// Every step, in order.
    pub const ALL: [PrepareStep; 7] = [
        PrepareStep::ImageBuilt,
        PrepareStep::ImageInstalled,
        PrepareStep::ImageRecorded,
        PrepareStep::BaseStaged,
        PrepareStep::BaseInstalled,
        PrepareStep::BaseRecorded,
        PrepareStep::OverlayCreated,
    ];

    /// The step named `name` (as `Debug` prints it).
    pub fn from_name(name: &str) -> Option<PrepareStep> {
        Self::ALL.into_iter().find(|s| format!("{s:?}") == name)
    }
}

/// A hook called at every step: `false` fails the prepare there; it may also end the
/// process.
#[derive(Clone, Default)]
pub struct PrepareHook(Option<Arc<dyn Fn(PrepareStep) -> bool + Send + Sync>>);

impl PrepareHook {
    /// A hook running `f`.
    pub fn new(f: impl Fn(PrepareStep) -> bool + Send + Sync + 'static) -> Self {
        PrepareHook(Some(Arc::new(f)))
    }

    pub(crate) fn check(&self, step: PrepareStep) -> Result<(), crate::rootfs::RootfsError> {
        match &self.0 {
            Some(f) if !f(step) => Err(crate::rootfs::RootfsError::Fault(step)),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for PrepareHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "PrepareHook(set)"
        } else {
            "PrepareHook(none)"
        })
    }
}
