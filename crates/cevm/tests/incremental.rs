//! Incremental checkpoints on this machine's /dev/kvm: each holds only the
//! pages written since its parent (KVM's dirty log kept on between them), and
//! restore follows the chain. Every link of a chain restores to the exact
//! result; retention merges a parent into its child, so the checkpoints kept
//! stay restorable; a damaged link is named by `verify` and `restore`, and
//! nothing runs from a broken chain.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cevm::api::CheckpointRequest;
use cevm::child::CevmChild;
use cevm_testkit::*;

/// `cevm run` of a built-in guest in private memory (cow needs it), API at `sock`.
fn run_private(guest: &str, args: &str, mem: &str, sock: &Path, more: &[&str]) -> CevmChild {
    let mut a = vec!["run", "--guest", guest, "--guest-args", args, "--mem", mem, "--vcpus", "2"];
    a.extend(["--memory-backend", "private", "--api-sock", sock.to_str().unwrap()]);
    a.extend(more);
    CevmChild::spawn(bin(), &a, None).unwrap()
}

fn incremental(out: &Path, strategy: &str) -> CheckpointRequest {
    CheckpointRequest { incremental: true, ..CheckpointRequest::new(out.to_path_buf(), strategy) }
}

/// Bytes the file system holds for `path` (a sparse image's data only).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// `n` incremental checkpoints of the digest guest, one per round from round
/// 1 on, stop-and-save and cow in turn; the fourth (cow) of a guest the user
/// paused, the others of a running one (whose dirty log is read ahead of the
/// pause); then the VMM is SIGKILLed. Returns the work directory and the
/// checkpoints, oldest first.
fn digest_chain(name: &str, n: usize) -> (PathBuf, Vec<PathBuf>) {
    let dir = workdir(name);
    let sock = dir.join("api.sock");
    let mut vm = run_private("digest", "mib=1 rounds=8", "32M", &sock, &[]);
    let mut links = Vec::new();
    for k in 1..=n {
        vm.wait_line(T, |l| l == format!("round {k}/8")).unwrap_or_else(|| panic!("no round {k}: {:?}", vm.seen));
        let out = dir.join(format!("c{k}"));
        let strategy = if k % 2 == 1 { "stop-and-save" } else { "cow" };
        let user_paused = k == 4;
        if user_paused {
            api(&sock).pause().unwrap();
        }
        let r = api(&sock).checkpoint(&incremental(&out, strategy)).unwrap();
        if user_paused {
            api(&sock).resume().unwrap();
        }
        assert_eq!(r.strategy, strategy);
        // The first holds all of memory; each later one names the one before.
        let want = (k > 1).then(|| format!("c{}", k - 1));
        assert_eq!(r.parent, want, "checkpoint {k}: {r:?}");
        assert_eq!(manifest(&out)["id"], r.id.as_str());
        links.push(out);
    }
    vm.kill();
    (dir, links)
}

#[test]
fn every_link_of_a_chain_of_five_restores_to_the_exact_digest() {
    let (dir, links) = digest_chain("inc-chain", 5);
    let want = format!("{:016x}", guests::digest(1, 8));
    // The increments hold what the guest wrote in a round: less than the full one.
    let full = allocated(&links[0].join("memory.img"));
    for l in &links[1..] {
        assert!(allocated(&l.join("memory.img")) < full, "{} holds as much as the full checkpoint", l.display());
        assert!(l.join("pages.bitmap").exists());
    }
    // All five restored at once (each runs the rest of the guest's rounds).
    let mut restored: Vec<CevmChild> = links
        .iter()
        .map(|l| {
            verify_ok(l);
            restore(l, None)
        })
        .collect();
    for (k, (l, r)) in links.iter().zip(&mut restored).enumerate() {
        assert_eq!(digest_to_end(r), want, "restore of {}", l.display());
        // It goes on after its own round, never from an earlier one.
        let round = format!("round {}/8", k + 1);
        assert!(!r.seen.contains(&round), "{} restored from before its round: {:?}", l.display(), r.seen);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_chain_of_the_dirtier_restores_at_every_link_and_finishes_its_work() {
    let dir = workdir("inc-dirtier");
    let sock = dir.join("api.sock");
    // 20000 pages over a 16 MiB working set, 4000 pages a second: 5 s of work.
    let mut vm = run_private("dirtier", "mib=16 rate=4000 work=20000", "64M", &sock, &[]);
    vm.wait_line(T, |l| l.starts_with("dirtier: t=1s")).expect("the dirtier runs");
    let mut links = Vec::new();
    for k in 1..=5 {
        let out = dir.join(format!("d{k}"));
        let strategy = if k % 2 == 1 { "cow" } else { "stop-and-save" };
        let r = api(&sock).checkpoint(&incremental(&out, strategy)).unwrap();
        assert_eq!(r.parent, (k > 1).then(|| format!("d{}", k - 1)), "{r:?}");
        links.push(out);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    vm.kill();
    let mut restored: Vec<CevmChild> = links
        .iter()
        .map(|l| {
            verify_ok(l);
            restore(l, None)
        })
        .collect();
    for (l, r) in links.iter().zip(&mut restored) {
        r.wait_line(T, |x| x.starts_with("dirtier: done")).unwrap_or_else(|| panic!("{}: {:?}", l.display(), r.seen));
        let st = r.finish(T).expect("the restored dirtier ends");
        assert!(st.success(), "{}: {st:?} {:?}", l.display(), r.seen);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn retention_merges_a_parent_into_its_child_and_keeps_k_restorable() {
    let dir = workdir("inc-keep");
    let (sock, series) = (dir.join("api.sock"), dir.join("series"));
    let periodic = [
        "--checkpoint-every",
        "1s",
        "--checkpoint-strategy",
        "cow",
        "--checkpoint-incremental",
        "--keep",
        "2",
        "--checkpoint-dir",
        series.to_str().unwrap(),
    ];
    let mut vm = run_private("digest", "mib=1 rounds=8", "32M", &sock, &periodic);
    vm.wait_line(T, |l| l == "round 5/8").expect("the guest never reached round 5");
    // Four committed: the retention after the third (which runs before the
    // fourth starts) removed the first and merged it into the second.
    let deadline = std::time::Instant::now() + T;
    while api(&sock).status().unwrap().checkpoints < 4 {
        assert!(std::time::Instant::now() < deadline, "too few periodic checkpoints for a merge");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    vm.kill();
    let mut kept: Vec<PathBuf> = std::fs::read_dir(&series)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("ckpt-"))
        .collect();
    kept.sort();
    // K kept, or K + 1 when the SIGKILL came between a commit and the
    // retention that follows it: a crash there loses nothing either.
    assert!((2..=3).contains(&kept.len()), "{kept:?}");
    assert!(!kept[0].ends_with("ckpt-000001"), "nothing was removed: {kept:?}");
    // The oldest was merged into (it held only its increment): now it is
    // full, and each newer one builds on the one before, by name and id.
    let oldest = manifest(&kept[0]);
    assert!(oldest.get("parent").is_none() && !kept[0].join("pages.bitmap").exists(), "{oldest}");
    for pair in kept.windows(2) {
        let (older, newer) = (manifest(&pair[0]), manifest(&pair[1]));
        assert_eq!(newer["parent"]["dir"], pair[0].file_name().unwrap().to_string_lossy().as_ref(), "{newer}");
        assert_eq!(newer["parent"]["id"], older["id"]);
    }
    let want = format!("{:016x}", guests::digest(1, 8));
    for k in &kept {
        verify_ok(k);
        assert_eq!(digest_to_end(&mut restore(k, None)), want, "restore of {}", k.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flips one bit of `file`'s first byte that holds data (or of byte 0).
fn flip_a_bit(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.iter().position(|&b| b != 0).unwrap_or(0);
    bytes[at] ^= 0x10;
    std::fs::write(file, bytes).unwrap();
}

/// Copies checkpoint directories (sparse files stay sparse) into `to`.
fn copy_chain(links: &[PathBuf], to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    links
        .iter()
        .map(|l| {
            let st = std::process::Command::new("cp").arg("-a").arg("--sparse=always").arg(l).arg(to).status().unwrap();
            assert!(st.success());
            to.join(l.file_name().unwrap())
        })
        .collect()
}

#[test]
fn a_damaged_link_is_named_by_verify_and_restore_and_nothing_runs() {
    let (dir, links) = digest_chain("inc-damage", 3);
    let links = &links[..];
    for (k, file) in [(0, "memory.img"), (1, "memory.img"), (2, "memory.img"), (1, "pages.bitmap"), (0, "state.json")] {
        let copy = copy_chain(links, &dir.join(format!("damaged-{k}-{file}")));
        let bad = copy[k].join(file);
        flip_a_bit(&bad);
        let leaf = copy.last().unwrap().to_str().unwrap();
        let v = cevm(&["verify", leaf]);
        let err = String::from_utf8_lossy(&v.stderr);
        assert!(!v.status.success() && err.contains(&bad.display().to_string()), "verify of {leaf}: {err}");
        let mut r = restore(Path::new(leaf), None);
        let st = r.finish(T).expect("a refused restore ends");
        assert!(!st.success(), "restore of a damaged chain ran: {:?}", r.seen);
        assert!(!r.seen.iter().any(|l| l.starts_with("round ")), "the guest ran: {:?}", r.seen);
    }
    // A link gone: the chain is broken there, and says which.
    let copy = copy_chain(links, &dir.join("missing"));
    std::fs::remove_dir_all(&copy[1]).unwrap();
    let v = cevm(&["verify", copy[2].to_str().unwrap()]);
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(!v.status.success() && err.contains("broken checkpoint chain") && err.contains("c2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_over_one_its_chain_needs_is_taken_whole() {
    let dir = workdir("inc-alternate");
    let sock = dir.join("api.sock");
    let mut vm = run_private("digest", "mib=1 rounds=8", "32M", &sock, &[]);
    let (a, b) = (dir.join("a"), dir.join("b"));
    // a (full), b on a, then a again: b needs a, so the new a is whole; then
    // b again builds on it.
    let mut parents = Vec::new();
    for (k, out) in [&a, &b, &a, &b].into_iter().enumerate() {
        vm.wait_line(T, |l| l == format!("round {}/8", k + 1)).expect("the guest runs");
        parents.push(api(&sock).checkpoint(&incremental(out, "cow")).unwrap().parent);
    }
    vm.kill();
    assert_eq!(parents, [None, Some("a".into()), None, Some("a".into())]);
    verify_ok(&a);
    verify_ok(&b);
    assert_eq!(digest_to_end(&mut restore(&b, None)), format!("{:016x}", guests::digest(1, 8)));
    let _ = std::fs::remove_dir_all(&dir);
}
