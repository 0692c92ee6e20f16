//! Guests on a network: two built-in `netring` guests, each in its own cevm
//! process with a NIC on a tap of one host bridge, pass a hash chain back and
//! forth in Ethernet frames under their own reliable protocol. Any frame lost
//! for good, delivered twice or taken from the wrong side of a switch changes
//! the digest both print at the end; it must be the one computed here.
//! Whatever is done to either VM mid-exchange (live migration, checkpoints,
//! SIGKILL and restore onto other taps) must leave that digest exact.

use std::path::Path;

use cevm::child::CevmChild;
use cevm_testkit::net::Bridge;
use cevm_testkit::{bin, checkpoint, workdir, T};
use serde_json::{json, Value};

const HOPS: u64 = 300;
const MIB: u64 = 1;
const WORK: u64 = 200;

fn mac(id: usize) -> String {
    format!("52:54:00:ce:00:{id:02x}")
}

fn guest_args(id: usize) -> String {
    format!("id={id} count=2 hops={HOPS} mib={MIB} work={WORK}")
}

/// The digest every guest must print.
fn want() -> String {
    format!("{:016x}", guests::netring_digest(2, HOPS, MIB, WORK))
}

/// `cevm run` of netring guest `id` on `tap`, with an API socket.
fn start(id: usize, tap: &str, sock: &Path) -> CevmChild {
    let args = guest_args(id);
    let net = format!("tap={tap},mac={}", mac(id));
    let a = ["run", "--guest", "netring", "--guest-args", &args, "--mem", "32M", "--net", &net, "--api-sock"];
    let mut a: Vec<&str> = a.to_vec();
    a.push(sock.to_str().unwrap());
    CevmChild::spawn(bin(), &a, Some(&format!("vm{id}: "))).unwrap()
}

/// A `cevm run --incoming` at `DIR/NAME.in` (its endpoint is returned), with
/// an API socket `DIR/NAME.sock` and its NIC bound to `tap` if given (else to
/// the tap the guest arrives with).
fn incoming(dir: &Path, name: &str, tap: Option<&str>) -> (CevmChild, String) {
    let to = format!("unix:{}", dir.join(format!("{name}.in")).display());
    let sock = dir.join(format!("{name}.sock"));
    let mut a = vec!["run".to_string(), "--incoming".into(), to.clone(), "--api-sock".into()];
    a.push(sock.to_str().unwrap().into());
    if let Some(t) = tap {
        a.extend(["--net".into(), format!("tap={t}")]);
    }
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let vm = CevmChild::spawn(bin(), &a, Some(&format!("{name}: "))).unwrap();
    cevm_testkit::wait_for_file(&dir.join(format!("{name}.in")));
    (vm, to)
}

/// Reads a guest's console to its digest line, then its exit (status 0).
fn digest(vm: &mut CevmChild) -> String {
    let line = vm
        .wait_line(T, |l| l.starts_with("netring: digest="))
        .unwrap_or_else(|| panic!("no digest; console: {:?}", vm.seen));
    let st = vm.finish(T).expect("cevm did not exit");
    assert!(st.success(), "{st}: {:?}", vm.seen);
    line.trim_start_matches("netring: digest=").trim().to_string()
}

/// Waits until the guest sends hop `hop` or a later one (each guest sends
/// every other hop).
fn wait_hop(vm: &mut CevmChild, hop: u64) {
    let reached = |l: &str| {
        l.strip_prefix("netring: hop ")
            .and_then(|r| r.split('/').next())
            .and_then(|j| j.parse::<u64>().ok())
            .is_some_and(|j| j >= hop)
    };
    vm.wait_line(T, reached).unwrap_or_else(|| panic!("never reached hop {hop}: {:?}", vm.seen));
}

fn migrate(sock: &Path, to: &str) -> Value {
    cevm::api::client::call(sock, "PUT", "/v1/migrate", Some(&json!({ "to": to })), T).unwrap()
}

fn status(sock: &Path) -> Value {
    cevm::api::client::call(sock, "GET", "/v1/status", None, T).unwrap()
}

/// The tap NIC 0 of the VMM at `sock` is bound to, once it is bound: a
/// destination binds a tap its source on this host held once the source lets
/// go of it, just after the guest runs there (the status is published again
/// within a second).
fn bound_tap(sock: &Path) -> Value {
    let t0 = std::time::Instant::now();
    loop {
        let tap = status(sock)["nics"][0]["tap"].clone();
        if !tap.is_null() || t0.elapsed() > std::time::Duration::from_secs(10) {
            return tap;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Two netring guests on a new bridge with `taps` taps (guest i on tap i),
/// in work directory `name`, each VMM with its API socket `DIR/i.sock`;
/// returns once guest 0 has sent hop 10.
struct Ring {
    dir: std::path::PathBuf,
    taps: Vec<String>,
    socks: [std::path::PathBuf; 2],
    vm0: CevmChild,
    vm1: CevmChild,
    _bridge: Bridge,
}

fn ring(name: &str, taps: usize) -> Ring {
    let dir = workdir(name);
    let mut bridge = Bridge::new();
    let taps: Vec<String> = (0..taps).map(|i| bridge.tap(i)).collect();
    let socks = [dir.join("0.sock"), dir.join("1.sock")];
    let mut vm0 = start(0, &taps[0], &socks[0]);
    let vm1 = start(1, &taps[1], &socks[1]);
    wait_hop(&mut vm0, 10);
    Ring { dir, taps, socks, vm0, vm1, _bridge: bridge }
}

#[test]
fn two_guests_on_a_bridge_finish_with_the_exact_digest_and_their_nics_show_in_the_status() {
    let dir = workdir("net-plain");
    let mut br = Bridge::new();
    let (t0, t1, t2) = (br.tap(0), br.tap(1), br.tap(2));
    let (s0, s1) = (dir.join("0.sock"), dir.join("1.sock"));
    let mut vm0 = start(0, &t0, &s0);
    // Guest 1 has a second NIC (its MAC made from its tap's name); the guest
    // uses the first, which its MAC check proves is NIC 0.
    let args = guest_args(1);
    let (n0, n1) = (format!("tap={t1},mac={}", mac(1)), format!("tap={t2}"));
    let a = ["run", "--guest", "netring", "--guest-args", &args, "--mem", "32M", "--net", &n0, "--net", &n1];
    let mut vm1 =
        CevmChild::spawn(bin(), &[&a[..], &["--api-sock", s1.to_str().unwrap()]].concat(), Some("vm1: ")).unwrap();
    wait_hop(&mut vm0, 10);
    // The counters are published once a second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let st = status(&s0);
    let nics = st["nics"].as_array().unwrap_or_else(|| panic!("{st}"));
    assert_eq!(nics.len(), 1, "{st}");
    assert_eq!(nics[0]["tap"], t0.as_str(), "{st}");
    assert_eq!(nics[0]["mac"], mac(0).as_str(), "{st}");
    assert!(nics[0]["rx_frames"].as_u64().unwrap() > 0 && nics[0]["tx_frames"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["guest"]["nics"][0]["tap"], t0.as_str(), "{st}");
    let st1 = status(&s1);
    let nics1 = st1["nics"].as_array().unwrap_or_else(|| panic!("{st1}"));
    assert_eq!(nics1.len(), 2, "{st1}");
    assert_eq!((nics1[0]["tap"].as_str(), nics1[1]["tap"].as_str()), (Some(t1.as_str()), Some(t2.as_str())), "{st1}");
    let mac2 = nics1[1]["mac"].as_str().unwrap();
    assert!(mac2.starts_with("52:54:00:") && mac2 != mac(1), "{st1}");
    // A tap takes one VMM: a second is refused before its guest boots.
    let o = cevm_testkit::cevm(&["run", "--guest", "hello", "--mem", "32M", "--net", &format!("tap={t0}")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("tap `{t0}` is in use by another process")), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("hello"), "{o:?}");
    assert_eq!(digest(&mut vm0), want());
    assert_eq!(digest(&mut vm1), want());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn either_side_migrated_thread_based_then_process_based_onto_another_tap_keeps_the_digest() {
    let Ring { dir, taps, socks: [s0, s1], mut vm0, mut vm1, _bridge } = ring("net-migrate", 3);
    let (t0, t2) = (&taps[0], &taps[2]);
    // Side 0: thread-based, in its own VMM, on the same tap.
    let r = migrate(&s0, "local");
    assert!(r["pages_sent"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(status(&s0)["nics"][0]["tap"], t0.as_str());
    wait_hop(&mut vm1, 100);
    // Side 1: to another VMM process, whose NIC binds another tap of the bridge.
    let (mut vm2, to) = incoming(&dir, "vm2", Some(t2));
    migrate(&s1, &to);
    assert!(vm1.finish(T).expect("the source VMM did not end").success());
    assert_eq!(status(&dir.join("vm2.sock"))["nics"][0]["tap"], t2.as_str());
    // And on to a third VMM on this host without --net: it binds the same tap,
    // which its source lets go of once the guest runs there.
    wait_hop(&mut vm2, 160);
    let (mut vm3, to) = incoming(&dir, "vm3", None);
    migrate(&dir.join("vm2.sock"), &to);
    assert!(vm2.finish(T).expect("the second VMM did not end").success());
    assert_eq!(bound_tap(&dir.join("vm3.sock")), t2.as_str());
    assert_eq!(digest(&mut vm0), want());
    assert_eq!(digest(&mut vm3), want());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn either_side_checkpointed_mid_exchange_stop_and_save_and_cevm_disturbs_nothing() {
    let Ring { dir, taps, socks: [s0, s1], mut vm0, mut vm1, _bridge } = ring("net-ckpt", 3);
    let (t1, t2) = (&taps[1], &taps[2]);
    let sas = dir.join("sas");
    let body = json!({ "out": sas.to_str().unwrap(), "strategy": "stop-and-save" });
    cevm::api::client::call(&s0, "PUT", "/v1/checkpoint", Some(&body), T).unwrap();
    wait_hop(&mut vm1, 100);
    let cevm_ckpt = dir.join("cevm");
    let body = json!({ "out": cevm_ckpt.to_str().unwrap(), "strategy": "cevm" });
    cevm::api::client::call(&s1, "PUT", "/v1/checkpoint", Some(&body), T).unwrap();
    assert_eq!(status(&s1)["nics"][0]["tap"], t1.as_str());
    // Side 0 again, CEVM process-based: the guest goes on in another VMM on
    // another tap while this one writes the checkpoint and ends.
    wait_hop(&mut vm0, 160);
    let (mut vm2, to) = incoming(&dir, "vm2", Some(t2));
    let away = dir.join("cevm-away");
    let body = json!({ "out": away.to_str().unwrap(), "strategy": "cevm", "to": to });
    cevm::api::client::call(&s0, "PUT", "/v1/checkpoint", Some(&body), T).unwrap();
    assert!(vm0.finish(T).expect("the old VMM did not end").success());
    assert_eq!(digest(&mut vm2), want());
    assert_eq!(digest(&mut vm1), want());
    for c in [&sas, &cevm_ckpt, &away] {
        cevm_testkit::verify_ok(c);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn both_paused_checkpointed_killed_and_restored_onto_other_taps_finish_with_the_exact_digest() {
    let Ring { dir, taps, socks: [s0, s1], mut vm0, mut vm1, _bridge } = ring("net-restore", 4);
    let (t2, t3) = (&taps[2], &taps[3]);
    wait_hop(&mut vm1, 21);
    let (c0, c1) = (dir.join("c0"), dir.join("c1"));
    for s in [&s0, &s1] {
        cevm::api::client::call(s, "PUT", "/v1/pause", None, T).unwrap();
    }
    for (s, c) in [(&s0, &c0), (&s1, &c1)] {
        let body = json!({ "out": c.to_str().unwrap(), "strategy": "stop-and-save" });
        cevm::api::client::call(s, "PUT", "/v1/checkpoint", Some(&body), T).unwrap();
    }
    vm0.kill();
    vm1.kill();
    let restored = |c: &Path, tap: &str, id: usize| {
        let net = format!("tap={tap}");
        CevmChild::spawn(bin(), &["restore", c.to_str().unwrap(), "--net", &net], Some(&format!("vm{id}'': "))).unwrap()
    };
    let mut r0 = restored(&c0, t2, 0);
    let mut r1 = restored(&c1, t3, 1);
    assert_eq!(digest(&mut r0), want());
    assert_eq!(digest(&mut r1), want());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restore_whose_tap_is_missing_is_refused_naming_it_and_the_override() {
    let dir = workdir("net-missing");
    let tap;
    let c = dir.join("c");
    {
        let mut br = Bridge::new();
        tap = br.tap(0);
        let s = dir.join("0.sock");
        let mut vm = start(0, &tap, &s);
        vm.wait_line(T, |l| l.starts_with("netring: id=0")).expect("the guest did not start");
        checkpoint(&s, &c, true).unwrap();
        assert!(vm.finish(T).expect("cevm did not end").success());
    } // the bridge and its tap are removed here
    let o = cevm_testkit::cevm(&["restore", c.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains(&format!("tap `{tap}` does not exist")), "{err}");
    assert!(err.contains("--net tap=NAME"), "{err}");
    // Nothing was made beside the checkpoint.
    let beside: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    // Bad --net lines are refused before anything runs.
    for bad in ["tap=", "tap=a/b", "mac=52:54:00:00:00:01", "tap=x,mac=zz", "tap=x,speed=10"] {
        let o = cevm_testkit::cevm(&["run", "--guest", "hello", "--mem", "32M", "--net", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {o:?}");
    }
    let o = cevm_testkit::cevm(&["restore", c.to_str().unwrap(), "--net", "tap=x,mac=52:54:00:00:00:01"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
