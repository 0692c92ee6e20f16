//! cevm's fuzz targets, as plain functions of the fuzzer's bytes.
//!
//! Each target feeds untrusted bytes to one of cevm's parsers the way cevm
//! meets them (a migration peer's stream, a guest driving a virtio device,
//! ...) and asserts only that nothing panics, hangs or allocates without
//! bound: a parser answers bad bytes with an error. The cargo-fuzz binaries in
//! `fuzz/fuzz_targets/` are one line each around these functions (run them on
//! nightly: `cargo +nightly fuzz run NAME`), and `tests/corpus.rs` replays the
//! kept corpus in `fuzz/corpus/NAME/` on stable, in every test run.

pub mod api;
pub mod checkpoint_dir;
pub mod migration;
pub mod seeds;
pub mod virtio;

/// The targets by name (the names of `fuzz/fuzz_targets/*.rs` and of the
/// corpus directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("migration_stream", migration::stream),
    ("virtio_block", virtio::block),
    ("virtio_net", virtio::net),
    ("api_request", api::request),
    ("checkpoint_dir", checkpoint_dir::verify),
];

/// A fuzz target: bytes in, nothing out; a panic is a finding.
pub type Target = fn(&[u8]);
