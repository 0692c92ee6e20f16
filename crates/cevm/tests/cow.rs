//! The copy-on-write strategy (`--strategy cow`) on this machine's /dev/kvm: the
//! guest is paused for the state and a `fork()`, then runs on in the same VMM
//! while the forked writer writes the frozen memory. A checkpoint taken mid-run
//! restores to the exact result after the VMM was SIGKILLed, its disk handed
//! over to a fresh overlay meanwhile; a full file system or a killed writer
//! fails that checkpoint only: the guest runs on, the previous checkpoint stays
//! intact and alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cevm::api::CheckpointRequest;
use cevm::child::CevmChild;
use cevm_testkit::*;

fn qemu_img(args: &[&str], dir: &Path) {
    let o = std::process::Command::new("qemu-img").args(args).current_dir(dir).output().expect("qemu-img");
    assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// `cevm run` of a built-in guest in private memory (what a fork freezes),
/// with the API at `sock` and the extra arguments `more`.
fn run_private(guest: &str, args: &str, mem: &str, sock: &Path, more: &[&str]) -> CevmChild {
    let mut a = vec!["run", "--guest", guest, "--guest-args", args, "--mem", mem, "--vcpus", "2"];
    a.extend(["--memory-backend", "private", "--api-sock", sock.to_str().unwrap()]);
    a.extend(more);
    CevmChild::spawn(bin(), &a, None).unwrap()
}

fn cow(out: &Path) -> CheckpointRequest {
    CheckpointRequest::new(out.to_path_buf(), "cow")
}

/// The files in `dir`.
fn names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    v.sort();
    v
}

#[test]
fn a_cow_checkpoint_with_a_disk_restores_to_the_exact_digest_after_sigkill() {
    let dir = workdir("cow-digest");
    // A disk the guest does not touch, holding known data: T until the first
    // checkpoint, then handed over to a fresh overlay at each.
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"], &dir);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2"], &dir);
    let o = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 1M 8M", "disk.qcow2"])
        .current_dir(&dir)
        .output()
        .expect("qemu-io");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::copy(dir.join("disk.qcow2"), dir.join("ref.qcow2")).unwrap();
    let same_as_ref = |image: &Path| {
        qemu_img(&["check", "-q", image.to_str().unwrap()], &dir);
        qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", "ref.qcow2", image.to_str().unwrap()], &dir);
    };

    let (sock, first, second) = (dir.join("api.sock"), dir.join("first"), dir.join("second"));
    let disk = dir.join("disk.qcow2");
    let mut vm = run_private("digest", "mib=1 rounds=6", "32M", &sock, &["--disk", disk.to_str().unwrap()]);
    vm.wait_line(T, |l| l == "round 2/6").expect("the guest never reached round 2");
    let r = api(&sock).checkpoint(&cow(&first)).expect("the first cow checkpoint");
    assert_eq!((r.strategy.as_str(), r.method), ("cow", checkpoint::Method::Cow), "{r:?}");
    assert!(r.memory.data_pages > 0 && r.memory.zero_pages > 0, "{r:?}");
    let handover = r.disk_handover.as_ref().expect("the disk was handed over");
    assert!(handover.linked && handover.error.is_none() && handover.clusters > 0, "{r:?}");
    // The guest runs on in the same VMM, and a second cow checkpoint follows
    // the first one's hand-over; then the VMM dies hard.
    vm.wait_line(T, |l| l == "round 3/6").expect("the guest did not go on after the cow checkpoint");
    let r = api(&sock).checkpoint(&cow(&second)).expect("the second cow checkpoint");
    assert!(r.disk_handover.as_ref().is_some_and(|h| h.linked && h.error.is_none()), "{r:?}");
    vm.kill();
    // Killed at any moment, the guest's disk is whole under its own name (T
    // until a hand-over ends, U from then on).
    same_as_ref(&disk);

    let want = format!("{:016x}", guests::digest(1, 6));
    for ckpt in [&first, &second] {
        verify_ok(ckpt);
        same_as_ref(&ckpt.join("disk.qcow2"));
    }
    let mut restored = restore(&second, None);
    assert_eq!(digest_to_end(&mut restored), want, "the restored guest's digest");
    assert!(
        !restored.seen.iter().any(|l| l == "round 2/6"),
        "restored from before the checkpoint: {:?}",
        restored.seen
    );
    same_as_ref(&dir.join("second.disk.qcow2"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_file_system_fails_the_cow_checkpoint_but_not_the_guest_nor_the_previous_checkpoint() {
    let base = workdir("cow-full");
    let fs = SmallFs::mount(base.join("fs"), "12m");
    let (sock, ckpt) = (base.join("api.sock"), fs.0.join("ckpt"));
    // 8 MiB of dirty pages: one checkpoint fits in 12 MiB, a second one beside it does not.
    let mut vm = run_private("dirtier", "mib=8 seconds=0", "16M", &sock, &[]);
    vm.wait_line(T, |l| l.starts_with("dirtier: t=1s")).expect("dirtier runs");
    api(&sock).checkpoint(&cow(&ckpt)).expect("the first checkpoint fits");
    let first = created(&ckpt);

    let msg = api(&sock).checkpoint(&cow(&ckpt)).unwrap_err().to_string();
    assert!(msg.contains("No space left on device") && msg.contains("the guest goes on"), "{msg}");
    let seen = vm.seen.len();
    vm.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the guest keeps running after the failed checkpoint");
    assert!(vm.seen.len() > seen);
    let st = api(&sock).status().unwrap();
    assert_eq!((st.state.as_str(), st.checkpoints), ("running", 1), "{st:?}");

    assert_eq!(created(&ckpt), first);
    assert_eq!(names(&fs.0), vec![std::ffi::OsString::from("ckpt")], "the failed attempt left files behind");
    verify_ok(&ckpt);
    quit(&sock, &mut vm);
    let mut restored = restore(&ckpt, Some(&sock));
    restored.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("restored dirtier runs");
    quit(&sock, &mut restored);
    drop(fs);
    let _ = std::fs::remove_dir_all(&base);
}

/// The pid of `vmm`'s child process named `name`, once there is one.
fn child_named(vmm: u32, name: &str, deadline: Instant) -> Option<i32> {
    while Instant::now() < deadline {
        for task in std::fs::read_dir(format!("/proc/{vmm}/task")).into_iter().flatten().flatten() {
            let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for pid in kids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim_end() == name {
                    return Some(pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn a_killed_cow_writer_fails_its_checkpoint_but_not_the_guest_nor_the_previous_checkpoint() {
    let dir = workdir("cow-killed");
    let (sock, ckpt) = (dir.join("api.sock"), dir.join("ckpt"));
    // 192 MiB of dirty pages: the writer runs for a while.
    let mut vm = run_private("dirtier", "mib=192 seconds=0", "256M", &sock, &[]);
    vm.wait_line(T, |l| l.starts_with("dirtier: t=1s")).expect("dirtier runs");
    api(&sock).checkpoint(&cow(&ckpt)).expect("the first checkpoint");
    let first = created(&ckpt);

    let req = cow(&ckpt);
    let s = sock.clone();
    let answer = std::thread::spawn(move || api(&s).checkpoint(&req).map_err(|e| e.to_string()));
    let writer = child_named(vm.pid(), "cevm-cow-writer", Instant::now() + T).expect("no writer process appeared");
    // SAFETY: kill only sends a signal to the writer found above.
    assert_eq!(unsafe { libc::kill(writer, libc::SIGKILL) }, 0, "{}", std::io::Error::last_os_error());
    let msg = answer.join().unwrap().expect_err("the checkpoint of a killed writer must fail");
    assert!(msg.contains("killed by signal 9") && msg.contains("the guest goes on"), "{msg}");

    let seen = vm.seen.len();
    vm.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the guest keeps running after the failed checkpoint");
    assert!(vm.seen.len() > seen);
    assert_eq!(api(&sock).status().unwrap().checkpoints, 1);
    assert_eq!(created(&ckpt), first);
    let left: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!left.iter().any(|p| p.to_string_lossy().contains(".ckpt.tmp-")), "the failed attempt left {left:?}");
    verify_ok(&ckpt);
    quit(&sock, &mut vm);
    let mut restored = restore(&ckpt, Some(&sock));
    restored.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("restored dirtier runs");
    quit(&sock, &mut restored);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn periodic_cow_checkpoints_restore_to_the_exact_digest() {
    let dir = workdir("cow-series");
    let (sock, series) = (dir.join("api.sock"), dir.join("series"));
    let every = ["--checkpoint-every", "1s", "--checkpoint-strategy", "cow", "--checkpoint-dir"];
    let mut vm =
        run_private("digest", "mib=1 rounds=6", "32M", &sock, &[&every[..], &[series.to_str().unwrap()]].concat());
    vm.wait_line(T, |l| l == "round 4/6").expect("the guest never reached round 4");
    let st = api(&sock).status().unwrap();
    assert!(st.checkpoints >= 2, "no periodic checkpoints by round 4: {st:?}");
    vm.kill();
    let latest = series.join("latest");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(latest.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["strategy"], "cow", "{m}");
    let mut restored = restore(&latest, None);
    assert_eq!(digest_to_end(&mut restored), format!("{:016x}", guests::digest(1, 6)));
    assert!(!restored.seen.iter().any(|l| l == "round 1/6"), "restored from the start: {:?}", restored.seen);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The VMM's guest memory mapped by huge pages (AnonHugePages of the process), KiB.
fn huge_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let line = rollup.lines().find(|l| l.starts_with("AnonHugePages:")).expect("AnonHugePages in smaps_rollup");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_huge_pages_a_guest_splits_during_a_cow_checkpoint_are_merged_again_once_it_is_written() {
    let dir = workdir("cow-huge");
    let sock = dir.join("api.sock");
    // A guest rewriting its 16 MiB (8 huge pages) page after page as fast as it
    // goes, for good: while the writer child lives, the first page it writes
    // in a huge page splits that huge page.
    let mut vm = run_private("dirtier", "mib=16 seconds=0", "64M", &sock, &[]);
    vm.wait_line(T, |l| l.starts_with("dirtier: t=2s")).expect("the dirtier runs");
    let pid = vm.pid();
    let before = huge_kib(pid);
    assert!(
        before >= 16 << 10,
        "the guest's working set is not in huge pages here (AnonHugePages {before} KiB): transparent huge pages \
         are off on this host (/sys/kernel/mm/transparent_hugepage/enabled)"
    );
    let r = api(&sock).checkpoint(&cow(&dir.join("ck"))).expect("the cow checkpoint");
    assert_eq!(r.strategy, "cow", "{r:?}");
    // khugepaged alone would take tens of seconds for 16 MiB (it scans 16 MiB
    // every 10 s by default); the VMM merges them as soon as the child is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = huge_kib(pid);
    while after < before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = huge_kib(pid);
    }
    // (One huge page of slack: the count is the whole process's, and a range
    // may be busy at the moment it is merged; the guest splits all eight.)
    assert!(after + 2048 >= before, "huge pages before the checkpoint {before} KiB, 5 s after it {after} KiB");
    // The guest ran on all along.
    let seen = vm.seen.len();
    vm.wait_line(T, |_| true).expect("the guest goes on");
    assert!(vm.seen.len() > seen);
    vm.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
