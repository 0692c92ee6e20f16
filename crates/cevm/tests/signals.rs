//! What a batch system's signals do to a VMM run with `--on-signal` (see
//! `cevm::signals`): the warning (SIGUSR1) and the kill (SIGTERM) each have
//! the VM checkpointed into its series and stopped, exit 75 (requeue me); the
//! job, restored from there each time, ends with the exact digest of an
//! undisturbed run, marks its series finished, and is never run again from it.

use std::path::Path;
use std::process::Command;

use cevm::child::CevmChild;
use cevm_testkit::*;

const ARGS: &str = "mib=1 rounds=6";

fn signal(vm: &CevmChild, sig: i32) {
    // SAFETY: kill(2) of a VMM process this test started.
    assert_eq!(unsafe { libc::kill(vm.id() as i32, sig) }, 0);
}

/// `cevm ARGS` with the series `series` and `--on-signal checkpoint`.
fn vmm(args: &[&str], series: &Path) -> CevmChild {
    let s = series.to_str().unwrap();
    let a = [args, &["--checkpoint-dir", s, "--on-signal", "checkpoint"]].concat();
    CevmChild::spawn(bin(), &a, Some("vm: ")).unwrap()
}

/// Waits for the guest's next round line (it runs), then for the VMM's end.
fn signalled(vm: &mut CevmChild, sig: i32) -> i32 {
    vm.wait_line(T, |l| l.starts_with("round ")).expect("the guest runs");
    signal(vm, sig);
    vm.finish(T).expect("the VMM ended").code().expect("an exit code")
}

#[test]
fn the_warning_and_the_kill_each_checkpoint_and_exit_75_and_the_job_ends_exact_and_finished() {
    let dir = workdir("signals");
    let series = dir.join("series");
    let want = digest_to_end(&mut run_guest("digest", ARGS, "32M", 1, None));
    let latest = series.join("latest");
    let l = latest.to_str().unwrap();

    let mut vm = vmm(&["run", "--guest", "digest", "--guest-args", ARGS, "--mem", "32M"], &series);
    assert_eq!(signalled(&mut vm, libc::SIGUSR1), 75, "checkpointed, requeue me");
    verify_ok(&latest);
    let first = std::fs::read_link(&latest).unwrap();
    let mut vm = vmm(&["restore", l], &series);
    assert_eq!(signalled(&mut vm, libc::SIGTERM), 75);
    assert_ne!(std::fs::read_link(&latest).unwrap(), first, "a newer checkpoint is the latest");
    assert!(!series.join("finished").exists(), "not finished yet");

    let mut vm = vmm(&["restore", l], &series);
    assert_eq!(digest_to_end(&mut vm), want, "restored twice, the job ends with the undisturbed digest");
    let marker: serde_json::Value = serde_json::from_slice(&std::fs::read(series.join("finished")).unwrap()).unwrap();
    assert_eq!(marker["exit_code"], 0, "{marker}");

    // Requeued once more: nothing runs, the job's status is the answer. (Its
    // checkpoints restored without the series still run, to be looked at.)
    for a in [&["restore", l][..], &["run", "--guest", "digest", "--guest-args", ARGS, "--mem", "32M"][..]] {
        let s = series.to_str().unwrap();
        let o =
            Command::new(bin()).args(a).args(["--checkpoint-dir", s, "--on-signal", "checkpoint"]).output().unwrap();
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(!out.contains("round"), "the finished guest did not run again: {out}");
        assert!(err.contains("already finished"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn on_signal_quit_stops_the_guest_with_128_plus_the_signal_and_checkpoint_needs_a_series() {
    let dir = workdir("signals-quit");
    let a = ["run", "--guest", "digest", "--guest-args", ARGS, "--mem", "32M", "--on-signal", "quit"];
    let mut vm = CevmChild::spawn(bin(), &a, Some("vm: ")).unwrap();
    assert_eq!(signalled(&mut vm, libc::SIGTERM), 128 + libc::SIGTERM);
    assert!(!vm.seen.iter().any(|l| l.starts_with("digest=")), "the guest did not run to its end");

    let o = cevm(&["run", "--guest", "digest", "--mem", "32M", "--on-signal", "checkpoint"]);
    assert_eq!(o.status.code(), Some(2), "--on-signal checkpoint needs --checkpoint-dir");
    let d = dir.join("s");
    let o = cevm(&["run", "--guest", "digest", "--mem", "32M", "--checkpoint-dir", d.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "a series for nothing is refused");
    assert!(!d.exists(), "nothing was made");
    let _ = std::fs::remove_dir_all(&dir);
}
