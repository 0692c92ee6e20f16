//! A VMM killed at a random moment while it writes a checkpoint over an older one:
//! the older checkpoint (or, if the kill came after the commit, the newer one) is
//! complete, verifies and restores. Never a half-written directory.

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cevm::child::CevmChild;
use cevm_testkit::*;

/// Boots a dirtier with 120 MiB of dirty pages (a checkpoint takes a while to write).
fn dirty_vm(sock: &Path) -> CevmChild {
    let mut vm = run_guest("dirtier", "mib=120 seconds=0", "128M", 1, Some(sock));
    // One line per second; by the second one the working set has been covered.
    vm.wait_line(T, |l| l.starts_with("dirtier: t=2s")).expect("dirtier runs");
    vm
}

#[test]
fn killing_the_vmm_mid_write_leaves_the_previous_checkpoint_intact() {
    let dir = workdir("crash");
    let sock = dir.join("api.sock");
    let ckpt = dir.join("ckpt");

    // A first, complete checkpoint; time how long one takes to write.
    let mut vm = dirty_vm(&sock);
    let t = Instant::now();
    checkpoint(&sock, &ckpt, false).unwrap();
    let write_time = t.elapsed();
    vm.kill();
    verify_ok(&ckpt);
    // Which checkpoint is there? The manifest's creation time tells them apart.
    let mut current = created(&ckpt);

    let mut kills_before_commit = 0;
    for round in 0..4u32 {
        let mut vm = dirty_vm(&sock);
        // A moment spread over the write: 5-20 %, 25-40 %, 45-60 %, 65-80 % of it, with
        // pseudo-random jitter (from the clock; no RNG crate needed for this).
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let jitter = f64::from(nanos % 1000) / 1000.0;
        let delay = write_time.mul_f64(0.05 + 0.2 * f64::from(round) + 0.15 * jitter);
        let client = std::thread::spawn({
            let (sock, ckpt) = (sock.clone(), ckpt.clone());
            move || checkpoint(&sock, &ckpt, false)
        });
        std::thread::sleep(delay);
        vm.kill();
        let answered = client.join().unwrap().is_ok();
        verify_ok(&ckpt);
        let now = created(&ckpt);
        if now == current {
            assert!(!answered, "the checkpoint was reported committed but the directory still holds the old one");
            kills_before_commit += 1;
        }
        current = now;
    }
    assert!(kills_before_commit > 0, "no kill landed before the commit: the test did not test anything");

    // The surviving checkpoint restores and its guest runs on.
    let mut restored = restore(&ckpt, Some(&sock));
    restored.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("restored dirtier runs");
    quit(&sock, &mut restored);
    // Leftovers of the killed writers are temporary siblings, never the checkpoint itself.
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(name == "ckpt" || name.starts_with(".ckpt.tmp"), "unexpected entry {name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
