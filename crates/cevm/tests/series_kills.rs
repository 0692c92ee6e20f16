//! Periodic checkpoints (`--checkpoint-every 1ms --keep K`) of VMMs SIGKILLed
//! at random moments, again and again, with the file system's renames, unlinks
//! and fsyncs slowed (by strace's fault injection) so that kills land inside a
//! commit, a `latest` update or a removal. After each kill the next start
//! sweeps the series: every checkpoint left is complete and verifies, at most K
//! remain, `latest` names the newest, and the job, restored from `latest` round
//! after round, ends with the digest of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cevm_testkit::*;

/// The job: the digest guest, long enough to be killed many times.
const GUEST_ARGS: &str = "mib=1 rounds=8";
/// The syscalls slowed, and by how much (µs each).
const SLOWED: &str = "rename,renameat,renameat2,unlink,unlinkat,rmdir,symlink,symlinkat,fsync,fdatasync";
const DELAY_US: u32 = 3000;

/// xorshift64*: the kill moments and policies, the same every run (fixed seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `cevm ARGS` under strace, its slowed syscalls delayed; the console goes
/// nowhere, its messages to `log`.
struct Slowed {
    strace: Child,
    cevm: u32,
}

impl Slowed {
    fn spawn(args: &[String], log: &Path) -> Slowed {
        let inject = format!("{SLOWED}:delay_enter={DELAY_US}");
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e"])
            .arg(format!("trace={SLOWED}"))
            .args(["-e", &format!("inject={inject}")])
            .arg(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run strace ({e}): this test slows the file system with it"));
        // The VMM is strace's child once it runs cevm (strace forks others
        // first, to probe the kernel, and the VMM's child runs strace's code
        // until its exec).
        let children = format!("/proc/{0}/task/{0}/children", strace.id());
        for _ in 0..5000 {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            for pid in text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
                if exe.as_deref() == Some(bin()) {
                    return Slowed { strace, cevm: pid };
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = strace.kill();
        let _ = strace.wait();
        panic!("strace started no VMM");
    }

    /// SIGKILLs the VMM (not strace) and waits for both.
    fn kill(mut self) {
        // SAFETY: kill() takes no pointer; the pid is our strace's child, which
        // is not reaped before strace ends (we wait for strace below).
        unsafe { libc::kill(self.cevm as i32, libc::SIGKILL) };
        let _ = self.strace.wait();
    }
}

fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The series' entries, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Checks a swept series: only complete checkpoints that verify, at most
/// `keep`, `latest` naming the newest once there is one, nothing else left.
fn assert_whole(dir: &Path, keep: usize, what: &str) -> Option<PathBuf> {
    let names = entries(dir);
    let ckpts: Vec<&String> = names.iter().filter(|n| n.starts_with("ckpt-")).collect();
    assert!(ckpts.len() <= keep, "{what}: more than {keep} left: {names:?}");
    for c in &ckpts {
        verify_ok(&dir.join(c));
    }
    let newest = ckpts.last()?;
    let latest = std::fs::read_link(dir.join("latest"))
        .unwrap_or_else(|e| panic!("{what}: no `latest` with {names:?}: {e}"))
        .to_string_lossy()
        .into_owned();
    assert_eq!(&&latest, newest, "{what}: `latest` is not the newest complete checkpoint: {names:?}");
    assert_eq!(names.len(), ckpts.len() + 1, "{what}: leftovers: {names:?}");
    Some(dir.join(newest))
}

/// Whether the series is as a commit leaves it: `latest` names the highest
/// checkpoint, at most `keep` of them, nothing hidden (no file content checked).
fn whole(dir: &Path, keep: usize) -> bool {
    let names = entries(dir);
    let ckpts: Vec<&String> = names.iter().filter(|n| n.starts_with("ckpt-")).collect();
    let latest = std::fs::read_link(dir.join("latest")).ok().map(|l| l.to_string_lossy().into_owned());
    ckpts.len() <= keep && ckpts.last().map(|n| n.as_str()) == latest.as_deref() && names.len() == ckpts.len() + 1
}

#[test]
fn sigkills_at_random_moments_leave_a_series_the_next_start_puts_right() {
    let work = workdir("series-kills");
    let dir = work.join("ckpts");
    let d = dir.to_str().unwrap().to_string();
    let want = digest_to_end(&mut run_guest("digest", GUEST_ARGS, "32M", 2, None));
    let mut rng = Rng(0x5eed_cafe_f00d_0015);
    let (mut broken, mut restored) = (0, 0);
    for round in 0..16 {
        let keep = 1 + rng.below(3) as usize;
        let strategy = if rng.below(2) == 0 { "cevm" } else { "stop-and-save" };
        let periodic = ["--checkpoint-every", "1ms", "--checkpoint-strategy", strategy, "--keep", &keep.to_string()];
        // Round after round the job goes on from `latest`, as a requeued batch
        // job would; or starts afresh.
        let latest = dir.join("latest");
        let mut args = if latest.exists() && rng.below(3) != 0 {
            restored += 1;
            strs(&["restore", latest.to_str().unwrap()])
        } else {
            strs(&["run", "--guest", "digest", "--guest-args", GUEST_ARGS, "--mem", "32M", "--vcpus", "2"])
        };
        args.extend(strs(&periodic));
        args.extend(strs(&["--checkpoint-dir", &d]));
        let vm = Slowed::spawn(&args, &work.join(format!("round-{round}.log")));
        let kill_ms = 150 + rng.below(600);
        std::thread::sleep(Duration::from_millis(kill_ms));
        vm.kill();
        let left_whole = whole(&dir, keep);
        broken += usize::from(!left_whole);
        eprintln!("round {round}: {strategy}, keep {keep}, killed after {kill_ms} ms; left whole: {left_whole}");
        // The next start sweeps the series: a restore of `latest` (which must
        // find it, whatever the kill left), or a run of a guest that ends at once.
        let keep_s = keep.to_string();
        let sweep_args = ["--checkpoint-every", "1h", "--keep", &keep_s, "--checkpoint-dir", &d];
        let any = entries(&dir).iter().any(|n| n.starts_with("ckpt-"));
        if any && rng.below(2) == 0 {
            let mut vm = cevm::child::CevmChild::spawn(
                bin(),
                &[&["restore", latest.to_str().unwrap()], &sweep_args[..]].concat(),
                None,
            )
            .unwrap();
            // It runs (prints), or its guest had ended and it exits at once.
            if vm.wait_line(T, |_| true).is_some() {
                vm.kill();
            } else {
                let st = vm.finish(T);
                assert!(st.is_some_and(|s| s.success()), "round {round}: the restore of `latest` failed: {st:?}");
            }
            assert_whole(&dir, keep, &format!("round {round} ({strategy}, keep {keep}; after a restore)"));
        } else {
            let o = cevm(&[&["run", "--guest", "hello", "--mem", "32M"], &sweep_args[..]].concat());
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "round {round}: the start after the kill failed: {err}");
            assert!(
                left_whole || err.contains("cevm: checkpoint series"),
                "round {round}: repairs not reported: {err}"
            );
            assert_whole(&dir, keep, &format!("round {round} ({strategy}, keep {keep}; after the sweep: {err})"));
        }
    }
    assert!(broken > 0, "no kill left anything to put right: the test did not test anything");
    assert!(restored > 0, "no round restored from `latest`");
    // The job, restored from `latest` once more, ends with the right digest.
    let newest = assert_whole(&dir, 3, "the end").expect("a checkpoint after all these rounds");
    assert_eq!(digest_to_end(&mut restore(&dir.join("latest"), None)), want, "{}", newest.display());
    let _ = std::fs::remove_dir_all(&work);
}

/// With `--checkpoint-every 1ms` and the cevm strategy a checkpoint is nearly
/// always being written, also when the guest ends: the one its writer commits
/// as the VMM ends is recorded too, so the run leaves `--keep` checkpoints and
/// `latest` on the newest (main left 3 and `latest` on the one before).
#[test]
fn a_run_that_ends_mid_checkpoint_leaves_keep_checkpoints_and_latest_on_the_newest() {
    let work = workdir("series-end");
    for round in 0..3 {
        let dir = work.join(format!("ckpts-{round}"));
        let a = [
            "run",
            "--guest",
            "digest",
            "--guest-args",
            "mib=1 rounds=3",
            "--mem",
            "32M",
            "--checkpoint-every",
            "1ms",
            "--checkpoint-strategy",
            "cevm",
            "--keep",
            "2",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
        ];
        let o = Command::new(bin()).args(a).stderr(Stdio::null()).output().unwrap();
        assert!(o.status.success(), "round {round}: {}", String::from_utf8_lossy(&o.stdout));
        assert!(whole(&dir, 2), "round {round}: {:?} -> {:?}", entries(&dir), std::fs::read_link(dir.join("latest")));
        assert_whole(&dir, 2, &format!("round {round}"));
    }
    let _ = std::fs::remove_dir_all(&work);
}
