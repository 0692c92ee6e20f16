//! A checkpoint written by an older cevm (the fixture of commit f3e6526, whose
//! state has no version of its own: state version 1) restores with today's
//! `cevm restore`, and its guest finishes with the digest of an undisturbed run.

use std::path::Path;

use cevm_testkit::*;

/// What `cevm run --guest digest --guest-args "mib=1 rounds=6" --mem 8M` prints
/// at its end when nothing disturbs it (see fixtures/main-f3e6526.md).
const UNDISTURBED_DIGEST: &str = "30b963f3537e3f8a";

#[test]
fn a_checkpoint_written_by_main_f3e6526_restores_and_finishes_with_the_undisturbed_digest() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/main-f3e6526");
    verify_ok(&fixture);
    let mut restored = restore(&fixture, None);
    assert_eq!(digest_to_end(&mut restored), UNDISTURBED_DIGEST, "console: {:?}", restored.seen);
    // The fixture was taken after round 2: the restored guest goes on from round 3.
    assert_eq!(restored.seen.first().map(String::as_str), Some("round 3/6"), "console: {:?}", restored.seen);
}
