//! Lazy verified restore (`cevm restore --lazy`) on this machine's /dev/kvm:
//! the guest runs before its memory is read; each 2 MiB chunk is read and
//! checked against its checksum when first touched (or in the background);
//! a damaged chunk stops the VM before the guest reads it.

use std::path::Path;
use std::process::{Command, Stdio};

use cevm::api::CheckpointRequest;
use cevm::child::CevmChild;
use cevm_testkit::*;

/// `cevm restore DIR --lazy ARGS`, console captured, stderr into `err` if given.
fn restore_lazy(dir: &Path, args: &[&str], err: Option<&Path>) -> CevmChild {
    let mut cmd = Command::new(bin());
    cmd.args(["restore", dir.to_str().unwrap(), "--lazy"]).args(args);
    if let Some(e) = err {
        cmd.stderr(Stdio::from(std::fs::File::create(e).unwrap()));
    }
    CevmChild::spawn_cmd(cmd, None).unwrap()
}

/// With no background loading, memory comes only as the guest touches it: the
/// guest runs and is not all in place; a checkpoint then loads the rest first
/// and holds all of it. Both the lazily restored run and a restore of that
/// checkpoint end with the exact digest.
#[test]
fn memory_comes_on_demand_and_a_checkpoint_first_loads_the_rest() {
    let dir = workdir("lazy-demand");
    let (sock, sock2, c1, c2) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c1"), dir.join("c2"));
    let (args, want) = ("mib=4 rounds=8", format!("{:016x}", guests::digest(4, 8)));
    let mut vm = run_guest("digest", args, "64M", 2, Some(&sock));
    vm.wait_line(T, |l| l == "round 2/8").expect("the guest never reached round 2");
    checkpoint(&sock, &c1, false).unwrap();
    vm.kill();

    let mut lazy = restore_lazy(&c1, &["--lazy-bandwidth", "0", "--api-sock", sock2.to_str().unwrap()], None);
    lazy.wait_line(T, |l| l.starts_with("round ")).expect("the lazily restored guest never ran");
    let st = api(&sock2).status().unwrap().lazy_restore.expect("a lazy restore shows its progress");
    assert!(!st.done && st.loaded_bytes < st.total_bytes && st.on_demand_chunks > 0, "{st:?}");
    assert_eq!(st.total_bytes, 64 << 20);
    checkpoint(&sock2, &c2, false).unwrap();
    let st = api(&sock2).status().unwrap().lazy_restore.unwrap();
    assert!(st.done && st.loaded_bytes == st.total_bytes, "{st:?}");
    assert_eq!(digest_to_end(&mut lazy), want, "the lazily restored run");
    verify_ok(&c2);
    assert_eq!(digest_to_end(&mut restore(&c2, None)), want, "a checkpoint of the lazily restored guest");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every link of an incremental chain (private memory) restores lazily to the
/// exact digest: each chunk is the root's with the links' pages over it.
#[test]
fn each_link_of_an_incremental_chain_restores_lazily() {
    let dir = workdir("lazy-chain");
    let sock = dir.join("api.sock");
    let args = "mib=2 rounds=8";
    let a = ["run", "--guest", "digest", "--guest-args", args, "--mem", "32M", "--vcpus", "2"];
    let more = ["--memory-backend", "private", "--api-sock", sock.to_str().unwrap()];
    let mut vm = CevmChild::spawn(bin(), &[&a[..], &more[..]].concat(), None).unwrap();
    let mut links = Vec::new();
    for k in 1..=3 {
        vm.wait_line(T, |l| l == format!("round {k}/8")).expect("the guest stopped early");
        let out = dir.join(format!("c{k}"));
        let req = CheckpointRequest { incremental: true, ..CheckpointRequest::new(out.clone(), "stop-and-save") };
        let r = api(&sock).checkpoint(&req).unwrap();
        assert_eq!(r.parent, (k > 1).then(|| format!("c{}", k - 1)), "{r:?}");
        links.push(out);
    }
    vm.kill();
    let want = format!("{:016x}", guests::digest(2, 8));
    for l in &links[1..] {
        assert_eq!(digest_to_end(&mut restore_lazy(l, &[], None)), want, "lazy restore of {}", l.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flips a bit in the page of `img` whose first word is `n` (between pages
/// holding `n - 1` and `n + 1`: the dirtier's counters), and returns its offset.
fn damage_page_holding(img: &Path, n: u64) -> u64 {
    let bytes = std::fs::read(img).unwrap();
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let at = (4096..bytes.len() - 4096)
        .step_by(4096)
        .find(|&p| word(p) == n && word(p - 4096) == n - 1 && word(p + 4096) == n + 1)
        .expect("the dirtier's page is in the image");
    let mut b = bytes;
    b[at + 8] ^= 0x04;
    std::fs::write(img, b).unwrap();
    at as u64
}

/// A flipped bit in a chunk the guest only reaches later: the guest runs (it
/// reports its progress), then touches that chunk, and the VM stops with the
/// chunk named; the guest never got past it. Restored with the background
/// loading on, the same damage stops the VM too.
#[test]
fn a_damaged_chunk_stops_the_vm_before_the_guest_reads_it() {
    let dir = workdir("lazy-damage");
    let (sock, ck) = (dir.join("api.sock"), dir.join("ck"));
    // Writes page after page of 16 MiB, 250 pages a second, after filling
    // them all: page p holds p + 1 until the guest's second lap.
    let mut vm = run_guest("dirtier", "mib=16 rate=250 fill=1 seconds=0", "64M", 1, Some(&sock));
    vm.wait_line(T, |l| l.starts_with("dirtier: filled")).expect("the dirtier never filled its memory");
    checkpoint(&sock, &ck, false).unwrap();
    vm.kill();
    // Page 2560 (10 MiB in): reached about 10 s after the guest starts writing.
    let page = 2560;
    let at = damage_page_holding(&ck.join("memory.img"), page + 1);
    let chunk = at / (2 << 20);

    let err = dir.join("stderr");
    let mut lazy = restore_lazy(&ck, &["--lazy-bandwidth", "0"], Some(&err));
    let ran = lazy.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the lazily restored guest never ran");
    let st = lazy.finish(T).expect("the VM did not stop");
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert_eq!(st.code(), Some(1), "{stderr}");
    let named = format!("memory.img: chunk {chunk} (bytes {:#x}..", chunk * (2 << 20));
    assert!(stderr.contains(&named) && stderr.contains("does not match its checksum"), "{stderr}");
    assert!(stderr.contains("the VM is stopped before the guest could read that memory"), "{stderr}");
    // The guest ran after the restore, and never wrote past the damaged page.
    let totals: Vec<u64> =
        lazy.seen.iter().filter_map(|l| l.split(" total=").nth(1).and_then(|t| t.trim().parse().ok())).collect();
    assert!(!totals.is_empty(), "{ran}");
    assert!(totals.iter().all(|&t| t < page), "the guest went past page {page}: {totals:?}");

    let mut eager = restore_lazy(&ck, &[], Some(&err));
    let st = eager.finish(T).expect("the VM did not stop");
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert_eq!(st.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&named), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that ends while its memory is still being loaded (here: `quit`
/// right after the restore, 200 MiB of data behind) ends the VMM cleanly:
/// the loader stops before the memory it fills goes away.
#[test]
fn quitting_while_memory_is_loaded_ends_cleanly() {
    let dir = workdir("lazy-quit");
    let (sock, sock2, ck, err) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("ck"), dir.join("stderr"));
    let mut vm = run_guest("dirtier", "mib=16 data=200 idle=1", "512M", 1, Some(&sock));
    vm.wait_line(T, |l| l.starts_with("dirtier: filled")).expect("the dirtier never filled its memory");
    checkpoint(&sock, &ck, true).unwrap();
    assert!(vm.finish(T).expect("the VMM did not stop").success());
    for _ in 0..3 {
        let mut lazy = restore_lazy(&ck, &["--api-sock", sock2.to_str().unwrap()], Some(&err));
        wait_for_file(&sock2);
        // As soon as the VMM takes requests (its guest runs).
        while api(&sock2).status().is_err() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        api(&sock2).quit().unwrap();
        let st = lazy.finish(T).expect("the VMM did not end");
        let stderr = std::fs::read_to_string(&err).unwrap();
        assert!(st.success() && !stderr.contains("lazy restore:"), "{st:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
