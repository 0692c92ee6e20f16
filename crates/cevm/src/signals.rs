//! What a VMM does when a batch system warns it (`cevm run|restore
//! --on-signal checkpoint|quit`): Slurm sends `SIGUSR1` before a time limit
//! or a preemption (`--signal=B:USR1@SECONDS`, or `scancel --signal=USR1`),
//! and `SIGTERM` before it kills (`scontrol requeue`, KillWait).
//!
//! With `--on-signal`, both signals are blocked in every thread of the VMM
//! (the mask is set before the first thread is made, and threads inherit it)
//! and taken by one thread that waits for them (`sigwait`) and hands them to
//! the control loop: no vCPU's `KVM_RUN` is interrupted, no handler runs in
//! the middle of anything. Without it, they do what they always did (end the
//! process).
//!
//! `checkpoint`: one last stop-and-save checkpoint into the `--checkpoint-dir`
//! series (after a CEVM checkpoint still being written, if one is), then exit
//! with [`crate::exit_code::REQUEUE`]: "checkpointed, run me again". `quit`:
//! the guest is stopped at once, exit 128 + the signal's number.
//!
//! With `--on-signal` (a batch job), a guest that ends by itself while its
//! VMM keeps a series leaves the marker `DIR/finished` (its exit status): a
//! job requeued after that finds it and does not run the guest again (`cevm
//! run` and `cevm restore` with `--on-signal` and that series answer with the
//! guest's status, and restore nothing).

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

use crate::controller::Control;

/// What `--on-signal` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnSignal {
    /// A last checkpoint into --checkpoint-dir, then exit 75 (requeue me).
    Checkpoint,
    /// Stop the guest and exit 128 + the signal's number.
    Quit,
}

/// The signals `--on-signal` takes.
pub const SIGNALS: [i32; 2] = [libc::SIGUSR1, libc::SIGTERM];

fn set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise; sigemptyset
    // and sigaddset only write into it.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in SIGNALS {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// Blocks [`SIGNALS`] in this thread, and so in every thread it makes from
/// now on. Call it before the VMM makes any thread.
pub fn block() -> std::io::Result<()> {
    let s = set();
    // SAFETY: changes this thread's signal mask to add a valid set; no memory is handed over.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Starts the thread that takes [`SIGNALS`] (blocked by [`block`]) and hands
/// each to the control loop as [`Control::Signal`].
pub fn forward(to: Sender<Control>) -> std::io::Result<()> {
    on_each(move |sig| {
        tracing::info!("signal {} ({})", sig, name(sig));
        let _ = to.send(Control::Signal(sig));
    })
}

/// Starts a thread that takes [`SIGNALS`] (blocked by [`block`]) and calls
/// `f` with each.
pub fn on_each(mut f: impl FnMut(i32) + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let s = set();
            loop {
                let mut sig = 0;
                // SAFETY: waits for a signal of a valid set, written into `sig`.
                if unsafe { libc::sigwait(&s, &mut sig) } == 0 {
                    f(sig);
                }
            }
        })
        .map(drop)
}

/// A signal's name.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// The marker of a series whose guest ended by itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// What the VMM exited with for it (0: the guest exited with 0 or powered off).
    pub exit_code: i32,
    /// How it ended, in words.
    pub how: String,
    pub unix_ms: u64,
}

/// Where a series keeps its [`Finished`] marker.
pub fn marker(series: &Path) -> PathBuf {
    series.join("finished")
}

/// Writes the marker into `series` (made complete, then renamed into place).
pub fn mark_finished(series: &Path, f: &Finished) -> std::io::Result<()> {
    let tmp = series.join(".finished.tmp");
    let text = serde_json::to_string_pretty(f).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, marker(series))?;
    std::fs::File::open(series)?.sync_all()
}

/// The exit code of a job whose `series` says its guest finished (said in
/// the log: nothing is to run), or `None`; an unreadable marker is an error
/// ([`crate::exit_code::ERROR`]).
pub fn finished_exit_code(series: &Path) -> Option<i32> {
    match finished(series) {
        Ok(Some(f)) => {
            tracing::info!("the job of {} already finished ({}); nothing runs", series.display(), f.how);
            Some(f.exit_code)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!("cannot tell whether the job finished: {e}");
            Some(crate::exit_code::ERROR)
        }
    }
}

/// The marker of `series`, if its guest finished; an unreadable one is an error.
pub fn finished(series: &Path) -> Result<Option<Finished>, String> {
    let m = marker(series);
    match std::fs::read(&m) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| format!("{}: {e}", m.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", m.display())),
    }
}
