//! The `cevm` command: CLI, control API, control loop and demo. The binary is a
//! thin `main.rs` over these modules; the benchmarks (crate `cevm-bench`) and the
//! integration tests use [`child`] and [`api`].

pub mod api;
pub mod child;
pub mod controller;
pub mod demo;
pub mod host;
pub mod inspect;
pub mod plan;
pub mod runner;
pub mod size;

/// Exit codes of `cevm`.
pub mod exit_code {
    /// The guest exited with status 0, or the command succeeded.
    pub const OK: i32 = 0;
    /// The VMM failed (KVM, a checkpoint, a guest crash).
    pub const ERROR: i32 = 1;
    /// Bad command line, or the API socket is missing.
    pub const USAGE: i32 = 2;
    /// The guest exited with a non-zero status (printed on stderr).
    pub const GUEST_FAILED: i32 = 3;
}
