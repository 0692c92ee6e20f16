//! A checkpoint written by an older cevm (the fixture of commit f3e6526, whose
//! state has no version of its own: state version 1) restores with today's code,
//! and its guest finishes with the digest of an undisturbed run.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::VmEvent;

/// What `cevm run --guest digest --guest-args "mib=1 rounds=6" --mem 8M` prints
/// at its end when nothing disturbs it (see the fixture's README).
const UNDISTURBED_DIGEST: &str = "digest=30b963f3537e3f8a";

/// The guest's console, kept for the assertions.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_checkpoint_written_by_main_f3e6526_restores_and_finishes_with_the_undisturbed_digest() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/main-f3e6526");
    let console = Console::default();
    let (events_tx, events) = mpsc::channel();
    let (mut instance, disk) =
        checkpoint::restore(&dir, None, Box::new(console.clone()), events_tx).expect("the fixture restores");
    assert!(disk.is_none(), "the fixture's guest has no disk");
    instance.start().unwrap();
    let event = events.recv_timeout(Duration::from_secs(300)).expect("the guest ends within 5 minutes");
    instance.shutdown();
    let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    assert_eq!(event, VmEvent::GuestExit { status: 0 }, "console:\n{out}");
    // The fixture was taken after round 2: the restored guest goes on from round 3.
    assert!(out.starts_with("round 3/6\n"), "console:\n{out}");
    assert!(out.contains(UNDISTURBED_DIGEST), "console:\n{out}");
}
