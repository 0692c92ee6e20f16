//! Jobs of several VMs: built-in `netring` guests in a ring (each in its own
//! cevm process, with a NIC on a tap of one host bridge) pass a token whose
//! value is a hash chain, under their own reliable protocol. A group
//! checkpoint must be a consistent cut: restored, the ring goes on and every
//! guest prints the digest of an undisturbed run. An inconsistent cut shows:
//! a token acknowledged in its sender's checkpoint but missing from its
//! receiver's is lost for good (the ring stops), and one received in the
//! receiver's checkpoint but unsent in its sender's changes the chain.
//!
//! The chain test takes group checkpoints at random moments of the exchange
//! (a seeded random number of hops after the last restore); each is followed
//! by SIGKILL of every member VMM and a `cevm group restore` of that
//! checkpoint, which must run on to the next one (every restore is seen to
//! make progress), and the last one to the end with the exact digest.

use std::path::{Path, PathBuf};
use std::process::Output;

use cevm::child::CevmChild;
use cevm_testkit::net::{netring_digest, netring_hop, server_pid, Bridge};
use cevm_testkit::{bin, cevm, workdir, T};

const MIB: u64 = 1;
const WORK: u64 = 100;

/// A ring of `count` netring guests on one bridge, members m0, m1, ... with
/// their API sockets in `dir`, and the series of group checkpoints `dir/series`.
struct Ring {
    dir: PathBuf,
    count: usize,
    hops: u64,
    socks: Vec<PathBuf>,
    _bridge: Bridge,
}

impl Ring {
    fn new(name: &str, count: usize, hops: u64) -> (Ring, Vec<CevmChild>) {
        let dir = workdir(name);
        let mut bridge = Bridge::new();
        let socks: Vec<PathBuf> = (0..count).map(|i| dir.join(format!("m{i}.sock"))).collect();
        let vms = (0..count)
            .map(|i| {
                let tap = bridge.tap(i);
                let args = format!("id={i} count={count} hops={hops} mib={MIB} work={WORK} strict=1");
                let net = format!("tap={tap},mac=52:54:00:ce:00:{i:02x}");
                let a = ["run", "--guest", "netring", "--guest-args", &args, "--mem", "32M", "--net", &net];
                let a = [&a[..], &["--api-sock", socks[i].to_str().unwrap()]].concat();
                CevmChild::spawn(bin(), &a, Some(&format!("m{i}: "))).unwrap()
            })
            .collect();
        (Ring { dir, count, hops, socks, _bridge: bridge }, vms)
    }

    fn series(&self) -> PathBuf {
        self.dir.join("series")
    }

    fn want(&self) -> String {
        format!("{:016x}", guests::netring_digest(self.count as u32, self.hops, MIB, WORK))
    }

    /// `cevm group checkpoint` of every member into the series.
    fn group_checkpoint(&self) -> Output {
        self.group_checkpoint_by("stop-and-save")
    }

    /// `cevm group checkpoint --strategy STRATEGY` of every member into the series.
    fn group_checkpoint_by(&self, strategy: &str) -> Output {
        self.group_checkpoint_with(strategy, &[])
    }

    /// The same, with `more` arguments.
    fn group_checkpoint_with(&self, strategy: &str, more: &[String]) -> Output {
        let series = self.series();
        let mut a = vec!["group".to_string(), "checkpoint".into(), "--dir".into(), series.display().to_string()];
        a.extend(["--strategy".into(), strategy.into()]);
        a.extend(more.iter().cloned());
        for (i, s) in self.socks.iter().enumerate() {
            a.extend(["--member".into(), format!("m{i}={}", s.display())]);
        }
        cevm(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// SIGKILL of every member VMM, found by its API socket.
    fn kill_all(&self) {
        self.kill_all_but(usize::MAX);
    }

    /// `cevm group restore` of the series' newest group checkpoint.
    fn group_restore(&self) -> CevmChild {
        let series = self.series();
        CevmChild::spawn(bin(), &["group", "restore", series.to_str().unwrap()], Some("group: ")).unwrap()
    }
}

/// A small seeded generator (the seed is printed, so that a failure can be replayed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Waits until a console of `vms` shows hop `hop` or a later one; returns the hop seen.
fn wait_hop(vms: &mut [CevmChild], hop: u64) -> u64 {
    let t0 = std::time::Instant::now();
    loop {
        for vm in vms.iter_mut() {
            let (mut seen, asked) = (None, std::time::Instant::now());
            vm.wait_line(std::time::Duration::from_millis(20), |l| {
                seen = netring_hop(l).filter(|j| *j >= hop);
                seen.is_some()
            });
            if let Some(j) = seen {
                return j;
            }
            // A console that closed answers at once: no spinning on it.
            std::thread::sleep(std::time::Duration::from_millis(20).saturating_sub(asked.elapsed()));
        }
        assert!(t0.elapsed() < T, "hop {hop} never came: {:?}", vms.iter().map(|v| &v.seen).collect::<Vec<_>>());
    }
}

/// Every member's digest, as the group restore's console shows them, then its exit.
fn digests(group: &mut CevmChild, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < count {
        let line = group
            .wait_line(T, |l| netring_digest(l).is_some())
            .unwrap_or_else(|| panic!("{} of {count} digests; console: {:?}", got.len(), group.seen));
        got.push(netring_digest(&line).unwrap().to_string());
    }
    let st = group.finish(T).expect("the group restore did not end");
    assert!(st.success(), "{st}");
    got
}

/// A `cevm run --incoming` for every member of `ring`, named by `tag`: the
/// endpoints `--to NAME=ENDPOINT` of a process-based group checkpoint (each
/// serving its API at `ring.dir/n{tag}-{i}.sock`).
fn destinations(ring: &Ring, tag: &str) -> (Vec<CevmChild>, Vec<String>) {
    (0..ring.count)
        .map(|i| {
            let sock = ring.dir.join(format!("d{tag}-{i}.sock"));
            let to = format!("unix:{}", sock.display());
            let api = ring.dir.join(format!("n{tag}-{i}.sock"));
            let a = ["run", "--incoming", &to, "--api-sock", api.to_str().unwrap()];
            let d = CevmChild::spawn(bin(), &a, Some(&format!("d{i}: "))).unwrap();
            cevm_testkit::wait_for_file(&sock);
            (d, format!("m{i}={to}"))
        })
        .unzip()
}

/// `rounds` group checkpoints by `strategy` of a ring of `count`, each at a
/// random moment, each followed by SIGKILL of every member and a group
/// restore. `cevm-process`: by CEVM into new VMMs (`--to`), which are the
/// ones killed.
fn chain(name: &str, count: usize, rounds: u64, strategy: &str) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("{name}: seed {seed}");
    let mut rng = Lcg(seed);
    // The ring runs on between the hop a round waits for and the cut, for as
    // long as the group checkpoint takes to start: about 13 hops a round here
    // alone, more on a loaded machine (a suite run once used up 12 a round
    // before its 100th round). 30 leave room; the hops left after the last
    // round are run through at the end (about 180 a second for two guests).
    let hops = rounds * 30 + 100;
    let (ring, mut vms) = Ring::new(name, count, hops);
    let mut at = wait_hop(&mut vms, 3);
    let mut group: Option<CevmChild> = None;
    for k in 0..rounds {
        let (c, dests) = if strategy == "cevm-process" {
            let (dests, to) = destinations(&ring, &k.to_string());
            let to: Vec<String> = to.iter().flat_map(|t| ["--to".to_string(), t.clone()]).collect();
            (ring.group_checkpoint_with("cevm", &to), dests)
        } else {
            (ring.group_checkpoint_by(strategy), Vec::new())
        };
        let err = String::from_utf8_lossy(&c.stderr);
        assert!(c.status.success(), "group checkpoint {k}: {err}");
        assert!(ring.series().join("latest/group.json").exists(), "{err}");
        if dests.is_empty() {
            ring.kill_all();
        } else {
            // The members' VMMs wrote their checkpoints and ended; the
            // ring ran on in the new ones, which die now.
            for i in 0..count {
                let pid = server_pid(&ring.dir.join(format!("n{k}-{i}.sock"))).expect("a new member VMM");
                // SAFETY: kill(2) of a VMM process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for mut vm in vms.drain(..).chain(group.take()).chain(dests) {
            vm.finish(T);
        }
        let mut g = ring.group_restore();
        // This restore runs on: a random number of hops (1 to 4) before the next cut.
        let next = at + 1 + rng.below(4);
        at = wait_hop(std::slice::from_mut(&mut g), next);
        group = Some(g);
    }
    assert!(ring.series().join(format!("ckpt-{rounds:06}/group.json")).exists(), "{rounds} group checkpoints");
    // What was restored last checks whole, every checksum.
    let v = cevm(&["group", "verify", ring.series().to_str().unwrap()]);
    let said = String::from_utf8_lossy(&v.stdout);
    let method = if strategy == "cevm" { "cevm-thread" } else { strategy };
    let whole = format!("a complete group checkpoint of {count} members ({method})");
    assert!(v.status.success() && said.contains(&whole), "{said}");
    let mut g = group.expect("at least one round");
    let want = ring.want();
    assert_eq!(digests(&mut g, count), vec![want; count], "after {rounds} group checkpoints and restores");
    let _ = std::fs::remove_dir_all(&ring.dir);
}

#[test]
fn two_guests_survive_group_checkpoints_each_followed_by_sigkill_and_group_restore() {
    chain("group-chain2", 2, 100, "stop-and-save");
}

#[test]
fn four_guests_in_a_ring_survive_group_checkpoints_each_followed_by_sigkill_and_group_restore() {
    chain("group-chain4", 4, 100, "stop-and-save");
}

#[test]
fn two_guests_survive_group_cevm_checkpoints_each_followed_by_sigkill_and_group_restore() {
    chain("group-cevm-chain2", 2, 100, "cevm");
}

#[test]
fn four_guests_in_a_ring_survive_group_cevm_checkpoints_each_followed_by_sigkill_and_group_restore() {
    chain("group-cevm-chain4", 4, 100, "cevm");
}

#[test]
fn two_guests_survive_process_based_group_cevm_checkpoints_each_followed_by_sigkill_and_group_restore() {
    chain("group-process-chain2", 2, 100, "cevm-process");
}

#[test]
fn four_guests_in_a_ring_survive_process_based_group_cevm_checkpoints_each_followed_by_sigkill_and_group_restore() {
    chain("group-process-chain4", 4, 100, "cevm-process");
}

/// The group checkpoint series of `ring` holds exactly `n` complete checkpoints.
fn committed(series: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(series)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_member_killed_during_a_group_checkpoint_aborts_it_the_others_run_on_and_the_previous_one_restores() {
    killed_during_a_group_checkpoint("group-abort", "stop-and-save");
}

#[test]
fn a_member_killed_during_a_group_cevm_checkpoint_aborts_it_the_others_run_on_and_the_previous_one_restores() {
    killed_during_a_group_checkpoint("group-cevm-abort", "cevm");
}

/// A group checkpoint by `strategy` during which member m1 is SIGKILLed:
/// stop-and-save, while m0 has paused and saved and m1's pause waits (m1 is
/// SIGSTOPped first); cevm, once m1's pre-copy is ready for the cut, or at
/// its cut or switch (the coordinator cuts as soon as both are ready: a
/// group checkpoint that went by before m1 was seen there is taken again).
fn killed_during_a_group_checkpoint(name: &str, strategy: &'static str) {
    let (ring, mut vms) = Ring::new(name, 2, 400);
    wait_hop(&mut vms, 3);
    let c = ring.group_checkpoint_by(strategy);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let m1 = server_pid(&ring.socks[1]).unwrap();
    let coordinate = || {
        let (series, socks) = (ring.series(), ring.socks.clone());
        std::thread::spawn(move || {
            let mut a = vec!["group".to_string(), "checkpoint".into(), "--dir".into(), series.display().to_string()];
            a.extend(["--strategy".into(), strategy.into()]);
            for (i, s) in socks.iter().enumerate() {
                a.extend(["--member".into(), format!("m{i}={}", s.display())]);
            }
            cevm(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let (first, out) = if strategy == "stop-and-save" {
        let first = committed(&ring.series());
        // SAFETY: signals to the VMM this test started.
        unsafe { libc::kill(m1, libc::SIGSTOP) };
        let coordinator = coordinate();
        std::thread::sleep(std::time::Duration::from_millis(500));
        // SAFETY: as above.
        unsafe { libc::kill(m1, libc::SIGKILL) };
        (first, coordinator.join().unwrap())
    } else {
        let api = cevm_testkit::api(&ring.socks[1]);
        let mut attempt = 0;
        loop {
            attempt += 1;
            assert!(attempt <= 20, "m1 was never seen between ready and switched in 20 group checkpoints");
            let first = committed(&ring.series());
            let coordinator = coordinate();
            let caught = loop {
                let b = api.barrier();
                let this = b.as_ref().is_ok_and(|b| !first.iter().any(|c| b.out.starts_with(ring.series().join(c))));
                if this && b.is_ok_and(|b| matches!(b.state.name(), "ready" | "cut" | "switched")) {
                    break true;
                }
                if coordinator.is_finished() {
                    break false;
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            };
            if caught {
                // SAFETY: as above.
                unsafe { libc::kill(m1, libc::SIGKILL) };
                break (first, coordinator.join().unwrap());
            }
            let missed = coordinator.join().unwrap();
            assert!(missed.status.success(), "{}", String::from_utf8_lossy(&missed.stderr));
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("group checkpoint aborted") && err.contains("member m1"), "{err}");
    // Nothing of the aborted one is left; `latest` still names the first.
    assert_eq!(committed(&ring.series()), first, "{err}");
    let latest = std::fs::read_link(ring.series().join("latest")).unwrap();
    assert_eq!(latest.to_str(), first.last().map(String::as_str));
    // m0 was resumed: its VMM still answers, running (its peer is gone, so
    // its guest resends into the void).
    let st = cevm_testkit::api(&ring.socks[0]).status().unwrap();
    assert_eq!(st.state, "running");
    ring.kill_all_but(1);
    for mut vm in vms {
        vm.finish(T);
    }
    // The first group checkpoint restores to the exact digest.
    let mut g = ring.group_restore();
    assert_eq!(digests(&mut g, 2), vec![ring.want(); 2]);
    let _ = std::fs::remove_dir_all(&ring.dir);
}

impl Ring {
    /// SIGKILL of every member VMM but member `skip` (already gone).
    fn kill_all_but(&self, skip: usize) {
        for (i, s) in self.socks.iter().enumerate().filter(|(i, _)| *i != skip) {
            let pid = server_pid(s).unwrap_or_else(|| panic!("no VMM serves m{i}"));
            // SAFETY: SIGKILL to a VMM this test started (or its group restore did).
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        }
    }
}

#[test]
fn a_paused_restore_needs_an_api_socket_to_be_resumed_through() {
    let o = cevm(&["restore", "/nonexistent-checkpoint", "--paused"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--api-sock"), "{err}");
}

#[test]
fn periodic_group_checkpoints_keep_the_newest_and_end_with_the_group() {
    periodic("group-periodic", "stop-and-save");
}

#[test]
fn periodic_group_cevm_checkpoints_keep_the_newest_and_end_with_the_group() {
    periodic("group-cevm-periodic", "cevm");
}

/// Group checkpoints by `strategy` every 300 ms, the newest 2 kept, until the
/// group is SIGKILLed; the newest restores to the exact digest.
fn periodic(name: &str, strategy: &str) {
    let (ring, mut vms) = Ring::new(name, 2, 400);
    wait_hop(&mut vms, 3);
    let series = ring.series();
    let mut a = vec!["group", "checkpoint", "--every", "300ms", "--keep", "2", "--dir", series.to_str().unwrap()];
    a.extend(["--strategy", strategy]);
    let members: Vec<String> = ring.socks.iter().enumerate().map(|(i, s)| format!("m{i}={}", s.display())).collect();
    for m in &members {
        a.extend(["--member", m]);
    }
    let coordinator = std::process::Command::new(bin()).args(&a).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Until at least four group checkpoints have been committed.
    let t0 = std::time::Instant::now();
    while !series.join("ckpt-000004/group.json").exists() {
        assert!(t0.elapsed() < T, "no fourth group checkpoint in {series:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The group ends (every member SIGKILLed): so do the periodic checkpoints.
    ring.kill_all();
    for mut vm in vms {
        vm.finish(T);
    }
    let out = coordinator.wait_with_output_timeout();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("no member of the group is left"), "{err}");
    // Only the newest two are kept, and `latest` is the newest.
    let kept = committed(&series);
    assert_eq!(kept.len(), 2, "{kept:?}");
    let latest = std::fs::read_link(series.join("latest")).unwrap();
    assert_eq!(latest.to_str(), kept.last().map(String::as_str));
    let mut g = ring.group_restore();
    assert_eq!(digests(&mut g, 2), vec![ring.want(); 2]);
    let _ = std::fs::remove_dir_all(&ring.dir);
}

/// Waiting for a child's end, with its output, within [`T`].
trait WaitTimeout {
    fn wait_with_output_timeout(self) -> std::process::Output;
}

impl WaitTimeout for std::process::Child {
    fn wait_with_output_timeout(mut self) -> std::process::Output {
        let t0 = std::time::Instant::now();
        while self.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < T, "the periodic group checkpoints did not end");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.wait_with_output().unwrap()
    }
}

#[test]
fn a_damaged_member_stops_the_group_restore_before_any_guest_runs() {
    let (ring, mut vms) = Ring::new("group-damaged", 2, 400);
    wait_hop(&mut vms, 3);
    let c = ring.group_checkpoint();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    ring.kill_all();
    for mut vm in vms {
        vm.finish(T);
    }
    // One flipped bit in member m1's memory image.
    let img = ring.series().join("latest/m1/memory.img");
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes.iter().position(|b| *b != 0).expect("a memory image with data");
    bytes[at] ^= 0x10;
    std::fs::write(&img, bytes).unwrap();
    let out = cevm(&["group", "restore", ring.series().to_str().unwrap()]);
    let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("member m1 could not be restored") && err.contains("no member of the group runs"), "{err}");
    assert!(err.contains("m1: ") && err.contains("memory.img"), "{err}");
    // Member m0 was restored and waited: not one line from its guest.
    assert!(!said.contains("netring"), "{said}");
    let _ = std::fs::remove_dir_all(&ring.dir);
}

/// Every console line that has come by now (a short wait for stragglers).
fn drain(vm: &mut CevmChild) {
    vm.wait_line(std::time::Duration::from_millis(300), |_| false);
}

/// A member's CEVM checkpoint held for a group's cut stops its guest from the
/// cut to go and no longer: its switch leaves the guest whole and paused in
/// the new instance (thread-based: in the member's VMM; process-based: in a
/// `cevm run --incoming`, over the migration stream's `Release`), not one
/// line comes from it meanwhile, and after go it runs on there and the
/// checkpoint is committed.
#[test]
fn a_held_switch_stops_the_guest_from_the_cut_until_go_thread_and_process_based() {
    use cevm::api::CheckpointRequest;
    for process_based in [false, true] {
        let dir = workdir(if process_based { "group-held-process" } else { "group-held-thread" });
        let (sock, dst, dst_api, out) =
            (dir.join("api.sock"), dir.join("dst.sock"), dir.join("dst-api.sock"), dir.join("ck"));
        let args = ["run", "--guest", "dirtier", "--guest-args", "mib=4 rate=500 seconds=0", "--mem", "32M"];
        let mut vm =
            CevmChild::spawn(bin(), &[&args[..], &["--api-sock", sock.to_str().unwrap()]].concat(), None).unwrap();
        vm.wait_line(T, |l| l.starts_with("dirtier: t=1s")).expect("the guest runs");
        let mut next = if process_based {
            let to = format!("unix:{}", dst.display());
            let a = ["run", "--incoming", &to, "--api-sock", dst_api.to_str().unwrap()];
            let d = CevmChild::spawn(bin(), &a, None).unwrap();
            cevm_testkit::wait_for_file(&dst);
            Some(d)
        } else {
            None
        };
        let req = CheckpointRequest {
            group_cut: true,
            to: process_based.then(|| format!("unix:{}", dst.display())),
            ..CheckpointRequest::new(out.clone(), "cevm")
        };
        let s = sock.clone();
        let taker = std::thread::spawn(move || cevm_testkit::api(&s).checkpoint(&req));
        let api = cevm_testkit::api(&sock);
        let t0 = std::time::Instant::now();
        while !api.barrier().is_ok_and(|b| b.state.name() == "ready") {
            assert!(t0.elapsed() < T, "the checkpoint was never ready for the cut");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(api.barrier_command("cut").unwrap().state.name(), "switched", "the cut is answered once switched");
        drain(&mut vm);
        next.iter_mut().for_each(drain);
        let mark = (vm.seen.len(), next.as_ref().map_or(0, |d| d.seen.len()));
        std::thread::sleep(std::time::Duration::from_millis(2500));
        drain(&mut vm);
        next.iter_mut().for_each(drain);
        let said: Vec<&String> = vm.seen[mark.0..].iter().chain(next.iter().flat_map(|d| &d.seen[mark.1..])).collect();
        assert!(said.iter().all(|l| !l.starts_with("dirtier: t=")), "the guest ran between the cut and go: {said:?}");
        assert_eq!(api.barrier_command("go").unwrap().state.name(), "released");
        let report = taker.join().unwrap().expect("the held checkpoint is committed");
        assert!(report.held_ms >= 2500.0 && report.pause_ms >= report.held_ms, "{report:?}");
        cevm_testkit::verify_ok(&out);
        // The guest runs on in the new instance.
        let runs_on = next.as_mut().unwrap_or(&mut vm);
        runs_on.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the guest runs on after go");
        if process_based {
            assert!(vm.finish(T).expect("the source VMM ends").success());
            cevm_testkit::quit(&dst_api, next.as_mut().unwrap());
        } else {
            cevm_testkit::quit(&sock, &mut vm);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A process-based group CEVM checkpoint: each member's guest goes on in the
/// `cevm run --incoming` given for it (`--to NAME=ENDPOINT`) and the members'
/// VMMs end once written; the ring runs on there to the exact digest, and
/// the group checkpoint restores to it too.
#[test]
fn a_process_based_group_cevm_checkpoint_moves_the_ring_into_new_vmms_and_restores_exact() {
    let (ring, mut vms) = Ring::new("group-cevm-process", 2, 300);
    wait_hop(&mut vms, 5);
    let (mut dests, to) = destinations(&ring, "");
    let series = ring.series();
    let to: Vec<String> = to.iter().flat_map(|t| ["--to".to_string(), t.clone()]).collect();
    let c = ring.group_checkpoint_with("cevm", &to);
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(c.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&c.stdout).contains("\"method\": \"cevm-process\""), "{err}");
    // The members' VMMs wrote and ended; the ring runs on in the new ones.
    for vm in &mut vms {
        assert!(vm.finish(T).expect("a member's VMM did not end").success());
    }
    let want = ring.want();
    for d in &mut dests {
        let line = d.wait_line(T, |l| netring_digest(l).is_some()).unwrap_or_else(|| panic!("{:?}", d.seen));
        assert_eq!(netring_digest(&line), Some(want.as_str()));
        d.finish(T);
    }
    let v = cevm(&["group", "verify", series.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("(cevm-process)"), "{}", String::from_utf8_lossy(&v.stderr));
    let mut g = ring.group_restore();
    assert_eq!(digests(&mut g, 2), vec![want; 2]);
    let _ = std::fs::remove_dir_all(&ring.dir);
}

#[test]
fn group_destinations_are_for_one_cevm_group_checkpoint_of_every_member() {
    for (args, why) in [
        (&["--member", "m0=/a", "--to", "m0=unix:/d"][..], "--strategy cevm"),
        (&["--strategy", "cevm", "--member", "m0=/a", "--member", "m1=/b", "--to", "m0=unix:/d"][..], "every member"),
        (&["--strategy", "cevm", "--member", "m0=/a", "--to", "m9=unix:/d"][..], "no member m9"),
        (&["--strategy", "cevm", "--member", "m0=/a", "--to", "m0=ftp:/d"][..], "ftp:/d"),
        (
            &["--strategy", "cevm", "--every", "1m", "--member", "m0=/a", "--to", "m0=unix:/d"][..],
            "one group checkpoint",
        ),
    ] {
        let o = cevm(&[&["group", "checkpoint", "--dir", "/tmp/cevm-no-series"][..], args].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!Path::new("/tmp/cevm-no-series").exists(), "a refused group checkpoint made its series");
    }
}
