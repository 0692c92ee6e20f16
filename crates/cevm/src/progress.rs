//! Progress bars on stderr for the long commands (`cevm migrate`, `checkpoint`,
//! `restore`, `verify`), drawn with `indicatif` only when stderr is a terminal:
//! in a pipe or a file (scripts, tests, log shippers) nothing is drawn.
//!
//! `verify` and `restore` read the checkpoint in this process and report each
//! step ([`Bytes::update`]); `migrate` and `checkpoint` ask the VMM, over a
//! second API connection, how far its migration or checkpoint has come
//! ([`migration`], [`checkpoint`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::Client;

/// Most redraws a second (indicatif skips updates in between).
const HZ: u8 = 50;
/// How often a bar asks the VMM for its progress.
const POLL: Duration = Duration::from_millis(100);

/// A bar with `template`, or a hidden one when stderr is no terminal.
fn bar(template: &str, prefix: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(HZ));
    // The templates are constants of this module; a bad one would be a bug shown as a plain bar.
    b.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    b.set_prefix(prefix.to_string());
    b
}

const BYTES: &str = "{prefix} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}";

/// A bar of bytes done of a total, updated by the work itself.
pub struct Bytes(ProgressBar);

impl Bytes {
    /// A bar for `what` (`verifying`, `restoring`).
    pub fn new(what: &str) -> Self {
        Bytes(bar(BYTES, what))
    }

    /// `done` of `total` bytes are done.
    pub fn update(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// A bar that a thread of its own updates from the VMM's API until dropped.
pub struct Polled {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls the VMM at `sock` with `show` every [`POLL`] into a bar of
/// `template`, until the returned guard is dropped. No terminal: no thread.
fn polled(sock: PathBuf, template: &str, show: fn(&Client, &ProgressBar)) -> Polled {
    let stop = Arc::new(AtomicBool::new(false));
    if !std::io::stderr().is_terminal() {
        return Polled { stop, thread: None };
    }
    let b = bar(template, "");
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let api = Client::new(sock, Duration::from_secs(2));
        while !s.load(Ordering::Relaxed) {
            show(&api, &b);
            std::thread::sleep(POLL);
        }
        b.finish_and_clear();
    });
    Polled { stop, thread: Some(thread) }
}

/// Whether a view in `phase` belongs on bar `b`: not the end (`done`,
/// `failed`) of an earlier run, still there before this one starts; once this
/// run showed a phase, its end too.
fn running(b: &ProgressBar, phase: &str) -> bool {
    !matches!(phase, "" | "done" | "failed") || !b.prefix().is_empty()
}

/// `cevm migrate`'s bar: pages sent of the guest's, the round, the dirty rate,
/// the bandwidth, the expected downtime and the throttle, from `GET /v1/migration`.
pub fn migration(sock: PathBuf) -> Polled {
    let template = "{prefix} [{bar:30}] {percent:>3}% {pos}/{len} pages, {msg}";
    polled(sock, template, |api, b| {
        let Ok(p) = api.migration() else { return };
        if running(b, &p.phase) {
            b.set_prefix(p.phase.clone());
            b.set_length(p.pages_total);
            b.set_position(p.pages_sent);
            b.set_message(format!(
                "round {}, dirty {:.0} pages/s, {:.0} MiB/s, expected downtime {:.1} ms, throttle {}%",
                p.round, p.dirty_pages_per_s, p.mib_per_s, p.expected_downtime_ms, p.throttle_pct
            ));
        }
    })
}

/// `cevm checkpoint`'s bar: the phase, and the guest memory done of its size
/// (written, or known to be zero), from `GET /v1/checkpoint`.
pub fn checkpoint(sock: PathBuf) -> Polled {
    let template = "{prefix} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} of memory, {msg}";
    polled(sock, template, |api, b| {
        let Ok(p) = api.checkpoint_progress() else { return };
        if running(b, &p.phase) {
            b.set_prefix(p.phase.clone());
            b.set_length(p.memory_bytes_total);
            b.set_position(p.memory_bytes_done);
            b.set_message(format!("{} MiB of data written", p.memory_bytes_written >> 20));
        }
    })
}
