//! `cevm demo`: the main job end to end. Boots the built-in `digest` guest twice:
//! once undisturbed, once with a live CEVM checkpoint taken mid-run (the guest
//! moves to a new instance in its VMM while the old one writes the checkpoint),
//! after which that VMM is killed with SIGKILL and the guest is restored from the checkpoint. The
//! restored run must print the same digest as the undisturbed one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::api::{CheckpointRequest, Client};
use crate::child::{digest_of, CevmChild};

/// Guest arguments of the demo: long enough to checkpoint mid-run, short enough to watch.
pub const DEMO_ARGS: &str = "mib=2 rounds=8";
/// The round after which the checkpoint is taken.
const CHECKPOINT_AFTER_ROUND: &str = "round 3/8";
const TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the demo in `workdir` (created; removed at the end unless `keep`).
/// Returns Ok(true) when the digests match.
pub fn run(bin: &Path, workdir: &Path, keep: bool) -> Result<bool, String> {
    std::fs::create_dir_all(workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let sock = workdir.join("api.sock");
    let ckpt = workdir.join("checkpoint");
    let sock_s = sock.to_string_lossy().to_string();
    let common = ["--guest", "digest", "--guest-args", DEMO_ARGS, "--mem", "64M", "--vcpus", "1"];
    let spawn =
        |args: &[&str], echo| CevmChild::spawn(bin, args, Some(echo)).map_err(|e| format!("cannot start cevm: {e}"));

    println!("== 1. boot the digest guest ({DEMO_ARGS}) twice: one undisturbed reference, one to checkpoint");
    let mut reference = spawn(&[&["run"], &common[..]].concat(), "  [reference] ")?;
    let mut victim = spawn(&[&["run"], &common[..], &["--api-sock", &sock_s]].concat(), "  [to-kill]   ")?;

    victim
        .wait_line(TIMEOUT, |l| l == CHECKPOINT_AFTER_ROUND)
        .ok_or("the guest to checkpoint never reached the checkpoint round")?;
    println!(
        "== 2. live CEVM checkpoint into {}: the guest moves to a new instance, the old one writes it",
        ckpt.display()
    );
    let report = Client::new(&sock, TIMEOUT)
        .checkpoint(&CheckpointRequest::new(ckpt.clone(), "cevm"))
        .map_err(|e| format!("checkpoint: {e}"))?;
    println!(
        "   committed: guest paused {:.2} ms (the switch), {} data pages written meanwhile in {:.0} ms, zero pages left as holes: {}",
        report.pause_ms, report.memory.data_pages, report.total_ms, report.memory.zero_pages
    );
    victim.wait_line(Duration::from_secs(5), |l| l.starts_with("round "));
    println!("== 3. SIGKILL the checkpointed VMM (pid {}) while its guest runs on", victim.id());
    victim.kill();

    println!("== 4. verify the checkpoint");
    let verified = checkpoint::verify(&ckpt).map_err(|e| format!("verify: {e}"))?;
    println!("   manifest and {} files, every size and checksum right", verified.files.len());

    println!("== 5. restore from the checkpoint in a new VMM process");
    let t = Instant::now();
    let ckpt_s = ckpt.to_string_lossy().to_string();
    let mut restored = spawn(&["restore", &ckpt_s], "  [restored]  ")?;
    let restored_digest =
        restored.wait_line(TIMEOUT, |l| digest_of(l).is_some()).ok_or("the restored guest printed no digest")?;
    let restored_status = restored.finish(TIMEOUT);
    let restore_run = t.elapsed();
    let reference_digest =
        reference.wait_line(TIMEOUT, |l| digest_of(l).is_some()).ok_or("the reference guest printed no digest")?;
    reference.finish(TIMEOUT);

    let a = digest_of(&reference_digest).unwrap_or_default();
    let b = digest_of(&restored_digest).unwrap_or_default();
    let restored_ok = restored_status.map(|s| s.success()).unwrap_or(false);
    println!("== 6. result");
    println!("   undisturbed run digest : {a}");
    println!(
        "   restored run digest    : {b}  (restored run took {:.1} s, exit {})",
        restore_run.as_secs_f64(),
        if restored_ok { "0" } else { "non-zero" }
    );
    let same = a == b && restored_ok;
    println!(
        "   {}",
        if same { "MATCH: the restored guest finished with exactly the right result" } else { "MISMATCH" }
    );
    if !keep {
        let _ = std::fs::remove_dir_all(workdir);
    } else {
        println!("   (kept {})", workdir.display());
    }
    Ok(same)
}

/// A fresh work directory for the demo under the system's temp dir.
pub fn default_workdir() -> PathBuf {
    std::env::temp_dir().join(format!("cevm-demo-{}", std::process::id()))
}
