//! The `cevm` command: CLI, control API, control loop and demo. The binary is a
//! thin `main.rs` over these modules; the benchmarks (crate `cevm-bench`) and the
//! integration tests use [`child`] and [`api`].

pub mod api;
pub mod args;
pub mod batch;
pub mod child;
pub mod controller;
pub mod demo;
pub mod group;
pub mod host;
pub mod inspect;
pub mod logging;
pub mod plan;
pub mod progress;
pub mod runner;
pub mod signals;
pub mod size;

/// Exit codes of `cevm` (`cevm --help` and the man page list them: [`exit_code::MEANINGS`]).
pub mod exit_code {
    /// The guest exited with status 0, or the command succeeded.
    pub const OK: i32 = 0;
    /// The VMM failed (KVM, a checkpoint, a guest crash).
    pub const ERROR: i32 = 1;
    /// Bad command line, or the API socket is missing.
    pub const USAGE: i32 = 2;
    /// The guest exited with a non-zero status (printed on stderr).
    pub const GUEST_FAILED: i32 = 3;
    /// A signal (`--on-signal checkpoint`) had the VM checkpointed and stopped:
    /// run it again from its newest checkpoint (sysexits' EX_TEMPFAIL).
    pub const REQUEUE: i32 = 75;
    /// What each exit code means, for `--help` and the man page.
    pub const MEANINGS: [(i32, &str); 6] = [
        (OK, "the guest exited with status 0, or the command succeeded"),
        (ERROR, "an error: KVM, a checkpoint, a migration, a guest crash, a file that cannot be read or written"),
        (
            USAGE,
            "a bad command line (a value out of its range or list, a guest argument the guest does not take, a \
             --checkpoint-dir that is a file...) or no VMM at the API socket; nothing was created",
        ),
        (GUEST_FAILED, "the guest exited with a non-zero status (printed on stderr)"),
        (
            REQUEUE,
            "--on-signal checkpoint: SIGUSR1 or SIGTERM had the VM checkpointed into --checkpoint-dir and stopped; \
             restore its newest checkpoint to go on (requeue the job)",
        ),
        (129, "and above: 128 + a signal's number; with --on-signal quit, the VM stopped for that signal"),
    ];
}
