//! Faults during a CEVM checkpoint of a guest with a disk (a qcow2 overlay T
//! over a base, holding data the guest does not touch, so its content is known):
//! the checkpoint's file system fills up, the process writing the checkpoint is
//! killed, the new instance is killed while the disk is handed over. The guest
//! keeps running where it can, the error is reported, the previous checkpoint
//! stays intact, and every image left behind checks clean and holds the data
//! it should.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cevm::api::CheckpointRequest;
use cevm::child::CevmChild;
use cevm_testkit::*;

fn qemu_img(args: &[&str], dir: &Path) -> String {
    let o = std::process::Command::new("qemu-img").args(args).current_dir(dir).output().expect("qemu-img");
    assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// In `dir`: base.qcow2 (256 MiB), disk.qcow2 over it with `mib` MiB written,
/// and ref.qcow2, a copy of disk.qcow2 to compare with. Returns disk.qcow2.
fn disk_with_data(dir: &Path, mib: u32) -> PathBuf {
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "256M"], dir);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "disk.qcow2"], dir);
    let o = std::process::Command::new("qemu-io")
        .args(["-c", &format!("write -P 0x5a 1M {mib}M"), "disk.qcow2"])
        .current_dir(dir)
        .output()
        .expect("qemu-io");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::copy(dir.join("disk.qcow2"), dir.join("ref.qcow2")).unwrap();
    dir.join("disk.qcow2")
}

/// Asserts `image` checks clean and reads the same as ref.qcow2 beside `dir`'s disk.
fn same_as_ref(image: &Path, dir: &Path) {
    qemu_img(&["check", "-q", image.to_str().unwrap()], dir);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", "ref.qcow2", image.to_str().unwrap()], dir);
}

/// `cevm run` of a built-in guest with `disk`.
fn run_with_disk(guest: &str, args: &str, mem: &str, disk: &Path, sock: &Path) -> CevmChild {
    let a = [
        "run",
        "--guest",
        guest,
        "--guest-args",
        args,
        "--mem",
        mem,
        "--vcpus",
        "2",
        "--disk",
        disk.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    CevmChild::spawn(bin(), &a, None).unwrap()
}

/// Waits until the new instance's overlay U holds more than `bytes`: the disk
/// hand-over is then under way (T holds far more, so it is not over yet).
fn wait_for_handover(u: &Path, bytes: u64) {
    let deadline = Instant::now() + T;
    while std::fs::metadata(u).map_or(0, |m| m.len()) <= bytes {
        assert!(Instant::now() < deadline, "the disk hand-over never started ({})", u.display());
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[test]
fn a_full_file_system_fails_the_cevm_checkpoint_but_not_the_guest_its_disk_nor_the_previous_checkpoint() {
    let dir = workdir("cevm-full");
    let disk = disk_with_data(&dir, 3);
    let fs = SmallFs::mount(dir.join("fs"), "16m");
    let (sock, ckpt) = (dir.join("api.sock"), fs.0.join("ckpt"));
    // 8 MiB of dirty pages and 3 MiB of disk: one checkpoint fits, a second beside it does not.
    let mut vm = run_with_disk("dirtier", "mib=8 seconds=0", "16M", &disk, &sock);
    vm.wait_line(T, |l| l.starts_with("dirtier: t=1s")).expect("dirtier runs");
    let req = CheckpointRequest::new(ckpt.clone(), "cevm");
    let first = api(&sock).checkpoint(&req).expect("the first checkpoint fits");
    // T went to another file system: copied, not linked.
    assert!(!first.disk_handover.as_ref().expect("a disk was handed over").linked, "{first:?}");
    let first = created(&ckpt);

    let msg = api(&sock).checkpoint(&req).unwrap_err().to_string();
    assert!(msg.contains("No space left on device") && msg.contains("the guest goes on"), "{msg}");
    // The guest goes on, and its disk (handed over twice) is whole.
    let seen = vm.seen.len();
    vm.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the guest keeps running after the failed checkpoint");
    assert!(vm.seen.len() > seen);
    let st = api(&sock).status().unwrap();
    assert_eq!((st.state.as_str(), st.checkpoints), ("running", 1), "{st:?}");
    quit(&sock, &mut vm);
    same_as_ref(&disk, &dir);
    assert!(!dir.join("disk.qcow2.cevm-next").exists());

    // The previous checkpoint is untouched, alone, and restores.
    assert_eq!(created(&ckpt), first);
    let names: Vec<_> = std::fs::read_dir(&fs.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")], "the failed attempt left files behind");
    verify_ok(&ckpt);
    same_as_ref(&ckpt.join("disk.qcow2"), &dir);
    let mut restored = restore(&ckpt, Some(&sock));
    restored.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("restored dirtier runs");
    quit(&sock, &mut restored);
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process-based CEVM checkpoint of the digest guest with a 128 MiB overlay,
/// over an earlier stop-and-save checkpoint in the same directory; `kill_new`
/// picks which process is SIGKILLed while the disk is handed over. Returns the
/// work directory, the two processes (ended), the checkpoint's path, the
/// earlier checkpoint's creation time and the API's answer.
struct Handover {
    dir: PathBuf,
    ckpt: PathBuf,
    earlier: u64,
    answer: Result<checkpoint::CheckpointReport, String>,
    src: CevmChild,
    dst: CevmChild,
    want: String,
}

fn kill_during_handover(kill_new: bool) -> Handover {
    let dir = workdir(if kill_new { "cevm-kill-new" } else { "cevm-kill-writer" });
    let disk = disk_with_data(&dir, 128);
    let (sock, dst_sock, ckpt) = (dir.join("api.sock"), dir.join("dst.sock"), dir.join("ckpt"));
    let args = "mib=1 rounds=6";
    let want = digest_to_end(&mut run_guest("digest", args, "32M", 2, None));
    let mut src = run_with_disk("digest", args, "32M", &disk, &sock);
    src.wait_line(T, |l| l == "round 1/6").expect("guest runs");
    checkpoint(&sock, &ckpt, false).expect("the earlier checkpoint");
    let earlier = created(&ckpt);
    let to = format!("unix:{}", dst_sock.display());
    let mut dst = CevmChild::spawn(bin(), &["run", "--incoming", &to], None).unwrap();
    wait_for_file(&dst_sock);
    let client = std::thread::spawn({
        let (sock, ckpt) = (sock.clone(), ckpt.clone());
        move || {
            let req = CheckpointRequest { to: Some(to), ..CheckpointRequest::new(ckpt, "cevm") };
            api(&sock).checkpoint(&req).map_err(|e| e.to_string())
        }
    });
    wait_for_handover(&dir.join("disk.qcow2.cevm-next"), 16 << 20);
    if kill_new {
        dst.kill();
    } else {
        src.kill();
    }
    let answer = client.join().unwrap();
    Handover { dir, ckpt, earlier, answer, src, dst, want }
}

#[test]
fn the_checkpoint_writer_killed_during_the_disk_hand_over_leaves_the_guest_running_with_its_whole_disk() {
    let mut h = kill_during_handover(false);
    assert!(h.answer.is_err(), "the killed VMM answered: {:?}", h.answer);
    // The guest runs on in the new instance, which read the rest of T itself.
    assert_eq!(digest_to_end(&mut h.dst), h.want, "the guest's digest after the switch differs");
    let disk = h.dir.join("disk.qcow2");
    same_as_ref(&disk, &h.dir);
    assert!(!h.dir.join("disk.qcow2.cevm-next").exists(), "U did not take the disk's name");
    // The earlier checkpoint is still there, whole.
    assert_eq!(created(&h.ckpt), h.earlier);
    verify_ok(&h.ckpt);
    same_as_ref(&h.ckpt.join("disk.qcow2"), &h.dir);
    drop(h.src);
    let _ = std::fs::remove_dir_all(&h.dir);
}

#[test]
fn the_new_instance_killed_during_the_disk_hand_over_still_leaves_a_whole_checkpoint() {
    let mut h = kill_during_handover(true);
    // The old instance finished its checkpoint: the disk of the switch, with
    // the hand-over's failure reported.
    let report = h.answer.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let why = report.disk_handover.as_ref().and_then(|d| d.error.as_deref()).unwrap_or_else(|| panic!("{report:?}"));
    assert!(why.contains("went away"), "{report:?}");
    assert!(h.src.finish(T).expect("the source VMM did not end").success());
    assert_ne!(created(&h.ckpt), h.earlier);
    verify_ok(&h.ckpt);
    let ck_disk = h.ckpt.join("disk.qcow2");
    same_as_ref(&ck_disk, &h.dir);
    // A file of its own: nothing written at the disk's path changes it.
    use std::os::unix::fs::MetadataExt;
    let disk = h.dir.join("disk.qcow2");
    assert_ne!(std::fs::metadata(&ck_disk).unwrap().ino(), std::fs::metadata(&disk).unwrap().ino());
    // T is still the disk at its path, whole and clean. The killed instance's
    // half-filled U holds nothing of any checkpoint (imago, killed mid-write,
    // can leave its refcounts behind its mappings, so it is not trusted): a new
    // cevm checkpoint of this disk is refused, naming it, until it is removed.
    same_as_ref(&disk, &h.dir);
    assert!(h.dir.join("disk.qcow2.cevm-next").exists());
    let o = cevm(&[
        "run",
        "--guest",
        "digest",
        "--mem",
        "32M",
        "--disk",
        disk.to_str().unwrap(),
        "--checkpoint-every",
        "1m",
        "--checkpoint-dir",
        h.dir.join("series").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("left over from an interrupted"), "{err}");
    // The checkpoint restores and the guest finishes right.
    assert_eq!(digest_to_end(&mut restore(&h.ckpt, None)), h.want);
    drop(h.dst);
    let _ = std::fs::remove_dir_all(&h.dir);
}
