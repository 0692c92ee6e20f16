//! Progress of the running (or last) checkpoint of a VMM: the strategy updates
//! it as it goes, the control API reads it from its own thread
//! (`GET /v1/checkpoint`), never waiting for the checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::Method;

/// What a checkpoint has done so far, as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    /// `migrating` (CEVM: the live migration to the new instance, whose own
    /// progress is `GET /v1/migration`), `state`, `memory`, `disk`, `commit`,
    /// then `done` or `failed`. Empty: no checkpoint has run.
    pub phase: String,
    /// The strategy (`stop-and-save`, `cevm`).
    pub strategy: String,
    /// The directory the checkpoint is committed to.
    pub dir: PathBuf,
    /// Bytes of guest memory the image covers.
    pub memory_bytes_total: u64,
    /// Of those, bytes done: written, or known or found to be zero.
    pub memory_bytes_done: u64,
    /// Bytes of data pages written so far.
    pub memory_bytes_written: u64,
    /// Since the checkpoint was asked for (until it ended, once it has).
    pub elapsed_ms: f64,
    /// Why it failed (phase `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The progress of one VMM's checkpoints, shared between threads.
#[derive(Debug, Default)]
pub struct Progress {
    view: Mutex<(ProgressView, Option<Instant>)>,
    memory: Arc<snapshot::MemoryProgress>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, (ProgressView, Option<Instant>)> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A checkpoint by `method` into `dir` starts, in `phase`.
    pub fn start(&self, method: Method, dir: &Path, phase: &str) {
        self.memory.done.store(0, Ordering::Relaxed);
        self.memory.written.store(0, Ordering::Relaxed);
        *self.lock() = (
            ProgressView {
                phase: phase.into(),
                strategy: method.strategy().into(),
                dir: dir.to_path_buf(),
                ..Default::default()
            },
            Some(Instant::now()),
        );
    }

    /// The checkpoint goes on with `phase`.
    pub fn phase(&self, phase: &str) {
        self.lock().0.phase = phase.into();
    }

    /// The memory image, of `total` bytes, is about to be written; its
    /// counters go to the writer ([`snapshot::CheckpointWriter::track`]).
    pub(crate) fn memory(&self, total: u64) -> Arc<snapshot::MemoryProgress> {
        let mut v = self.lock();
        v.0.phase = "memory".into();
        v.0.memory_bytes_total = total;
        self.memory.clone()
    }

    /// The checkpoint ended: committed, or failed with `error`.
    pub fn end(&self, error: Option<String>) {
        let now = self.view();
        let mut v = self.lock();
        v.0 = ProgressView { phase: if error.is_some() { "failed" } else { "done" }.into(), error, ..now };
        v.1 = None;
    }

    /// What the checkpoint has done so far.
    pub fn view(&self) -> ProgressView {
        let v = self.lock();
        let mut view = v.0.clone();
        if let Some(t0) = v.1 {
            view.elapsed_ms = t0.elapsed().as_secs_f64() * 1e3;
            view.memory_bytes_done = self.memory.done.load(Ordering::Relaxed);
            view.memory_bytes_written = self.memory.written.load(Ordering::Relaxed);
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_goes_through_its_phases_and_keeps_its_last_counts() {
        let p = Progress::default();
        assert_eq!(p.view().phase, "", "nothing ran yet");
        p.start(Method::StopAndSave, Path::new("/ck"), "state");
        let m = p.memory(1 << 20);
        m.done.store(4096, Ordering::Relaxed);
        m.written.store(4096, Ordering::Relaxed);
        let v = p.view();
        assert_eq!((v.phase.as_str(), v.memory_bytes_total, v.memory_bytes_done), ("memory", 1 << 20, 4096));
        m.done.store(1 << 20, Ordering::Relaxed);
        p.end(None);
        let v = p.view();
        assert_eq!((v.phase.as_str(), v.memory_bytes_done, v.memory_bytes_written), ("done", 1 << 20, 4096));
        p.start(Method::CevmThread, Path::new("/ck2"), "migrating");
        assert_eq!(p.view().memory_bytes_done, 0, "a new checkpoint starts from zero");
        p.end(Some("disk full".into()));
        assert_eq!((p.view().phase.as_str(), p.view().error.as_deref()), ("failed", Some("disk full")));
    }
}
