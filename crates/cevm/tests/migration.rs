//! Live migration of a running guest on this machine's /dev/kvm: thread-based (a
//! new instance in the same process), process-based over a unix socket and over
//! TCP between two network namespaces, a guest that dirties memory faster than the
//! link, and faults (destination killed, corrupted frame, version mismatch): the
//! guest's result is always the one an undisturbed run computes.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cevm::api;
use cevm::child::{digest_of, CevmChild};
use cevm_testkit::*;
use migrate::protocol::{encode_header, encode_page_table, FrameKind, Hello, PageEntry, HEADER_LEN, PROTOCOL_VERSION};
use serde_json::{json, Value};

const ARGS: &str = "mib=1 rounds=6";

fn reference_digest(vcpus: u32) -> String {
    digest_to_end(&mut run_guest("digest", ARGS, "32M", vcpus, None))
}

fn migrate(sock: &Path, to: &str, params: Value) -> Result<Value, api::ClientError> {
    api::client::call(sock, "PUT", "/v1/migrate", Some(&json!({ "to": to, "params": params })), T)
}

#[test]
fn thread_based_migration_mid_run_keeps_the_digest_on_one_and_two_vcpus() {
    for vcpus in [1, 2] {
        let dir = workdir(&format!("mig-local{vcpus}"));
        let sock = dir.join("api.sock");
        let mut vm = run_guest("digest", ARGS, "32M", vcpus, Some(&sock));
        vm.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
        // Placement: the migration thread on CPU 0, the new vCPUs on CPU 1.
        let body = json!({ "to": "local", "migration_cpus": [0], "dest_vcpu_cpus": [1] });
        let report = api::client::call(&sock, "PUT", "/v1/migrate", Some(&body), T).unwrap();
        assert_eq!(report["to"], "the in-process destination", "{report}");
        assert_eq!(report["placement"]["migration_thread"], json!([0]), "{report}");
        assert_eq!(report["placement"]["destination_vcpus"], json!(vec![vec![1]; vcpus as usize]), "{report}");
        assert_eq!(report["placement"]["source_vcpus"].as_array().unwrap().len(), vcpus as usize, "{report}");
        assert!(report["pages_sent"].as_u64().unwrap() > 256, "{report}");
        // The same VMM process goes on with the new instance, API included.
        let status = api::client::call(&sock, "GET", "/v1/status", None, T).unwrap();
        assert_eq!(status["state"], "running", "{status}");
        let progress = api::client::call(&sock, "GET", "/v1/migration", None, T).unwrap();
        assert_eq!(progress["phase"], "done", "{progress}");
        let digest = digest_to_end(&mut vm);
        assert!(vm.seen.iter().any(|l| l == "round 6/6"), "{:?}", vm.seen);
        assert_eq!(digest, reference_digest(vcpus), "vcpus={vcpus}: migrated digest differs");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn process_based_migration_over_a_unix_socket_keeps_the_digest() {
    let dir = workdir("mig-unix");
    let sock = dir.join("api.sock");
    let dst_sock = dir.join("dst.sock");
    let to = format!("unix:{}", dst_sock.display());
    let mut dst = CevmChild::spawn(bin(), &["run", "--incoming", &to], None).unwrap();
    let mut src = run_guest("digest", ARGS, "32M", 2, Some(&sock));
    src.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
    wait_for_file(&dst_sock);
    let report = migrate(&sock, &to, json!({})).unwrap();
    assert_eq!(report["to"], to.as_str(), "{report}");
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0, "{report}");
    // The source VMM ends once the guest runs at the destination; its console stops
    // before the digest, the destination's carries on to it.
    assert!(src.finish(T).expect("source did not exit").success());
    assert!(!src.seen.iter().any(|l| digest_of(l).is_some()), "{:?}", src.seen);
    let digest = digest_to_end(&mut dst);
    assert!(!dst.seen.iter().any(|l| l == "round 1/6"), "the destination redid round 1: {:?}", dst.seen);
    assert_eq!(digest, reference_digest(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `ip` (network namespaces need root); panics with the reason if it fails.
fn ip(args: &str) {
    let o = Command::new("ip").args(args.split_whitespace()).output().expect("`ip` (iproute2) is needed");
    assert!(o.status.success(), "ip {args}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Two network namespaces joined by a veth pair, as two hosts; removed on drop.
struct TwoHosts(String, String);
impl TwoHosts {
    fn new() -> Self {
        let id = std::process::id();
        let (a, b) = (format!("cevm-a-{id}"), format!("cevm-b-{id}"));
        ip(&format!("netns add {a}"));
        ip(&format!("netns add {b}"));
        let h = TwoHosts(a.clone(), b.clone());
        ip(&format!("link add va{id} netns {a} type veth peer name vb{id} netns {b}"));
        ip(&format!("-n {a} addr add 10.77.0.1/24 dev va{id}"));
        ip(&format!("-n {b} addr add 10.77.0.2/24 dev vb{id}"));
        ip(&format!("-n {a} link set va{id} up"));
        ip(&format!("-n {b} link set vb{id} up"));
        ip(&format!("-n {a} link set lo up"));
        ip(&format!("-n {b} link set lo up"));
        h
    }
}
impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.1]).status();
    }
}

#[test]
fn tcp_migration_between_two_network_namespaces_keeps_the_digest() {
    let hosts = TwoHosts::new();
    let dir = workdir("mig-tcp");
    let sock = dir.join("api.sock");
    let bin = bin().to_str().unwrap();
    // Host B waits on its own address; host A runs the guest and migrates to B.
    let mut dst = CevmChild::spawn(
        Path::new("ip"),
        &["netns", "exec", &hosts.1, bin, "run", "--incoming", "tcp:10.77.0.2:4444"],
        None,
    )
    .unwrap();
    let s = sock.to_str().unwrap();
    let mut src = CevmChild::spawn(
        Path::new("ip"),
        &[
            "netns",
            "exec",
            &hosts.0,
            bin,
            "run",
            "--guest",
            "digest",
            "--guest-args",
            ARGS,
            "--mem",
            "32M",
            "--api-sock",
            s,
        ],
        None,
    )
    .unwrap();
    src.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
    // The API socket is a file: reachable from here whatever the network namespace.
    let mut report = migrate(&sock, "tcp:10.77.0.2:4444", json!({}));
    for _ in 0..50 {
        // The destination may still be starting up: connection refused, try again.
        match &report {
            Err(api::ClientError::Api { msg, .. }) if msg.contains("connecting") => {
                std::thread::sleep(Duration::from_millis(100));
                report = migrate(&sock, "tcp:10.77.0.2:4444", json!({}));
            }
            _ => break,
        }
    }
    let report = report.unwrap();
    assert_eq!(report["to"], "tcp:10.77.0.2:4444", "{report}");
    assert!(src.finish(T).expect("source did not exit").success());
    assert_eq!(digest_to_end(&mut dst), reference_digest(1));
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_dirtying_faster_than_the_link_fails_clearly_or_is_throttled_into_converging() {
    let dir = workdir("mig-dirty");
    let sock = dir.join("api.sock");
    // 1024 pages dirtied ~100 000 times a second; the link is capped at 16 MiB/s
    // (4096 pages/s): without throttling the pre-copy cannot converge.
    let mut vm = run_guest("dirtier", "mib=4 rate=0 seconds=25", "32M", 1, Some(&sock));
    vm.wait_line(T, |l| l.contains("t=1s")).expect("dirtier did not start");
    let capped =
        json!({ "max_bandwidth_mib_s": 16.0, "max_downtime_ms": 20.0, "auto_converge": false, "max_rounds": 4 });
    let e = migrate(&sock, "local", capped).unwrap_err().to_string();
    assert!(e.contains("did not converge after 4 rounds") && e.contains("the guest runs on here"), "{e}");
    // The guest ran on, unharmed.
    let status = api::client::call(&sock, "GET", "/v1/status", None, T).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    let seen = vm.seen.len();
    vm.wait_line(T, |l| l.starts_with("dirtier: t=")).expect("the guest stopped after a failed migration");
    // Auto-converge throttles the vCPUs until the rest fits the downtime limit.
    let report = migrate(&sock, "local", json!({ "max_bandwidth_mib_s": 16.0, "max_downtime_ms": 20.0 })).unwrap();
    assert!(report["max_throttle_pct"].as_u64().unwrap() >= 20, "{report}");
    vm.wait_line(T, |l| l.starts_with("dirtier: done")).expect("the migrated guest did not finish");
    assert!(vm.finish(T).unwrap().success());
    assert!(vm.seen[seen..].iter().any(|l| l.starts_with("dirtier: t=")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_destination_killed_mid_migration_leaves_the_source_running_unharmed() {
    let dir = workdir("mig-kill");
    let sock = dir.join("api.sock");
    let dst_sock = dir.join("dst.sock");
    let to = format!("unix:{}", dst_sock.display());
    let mut dst = CevmChild::spawn(bin(), &["run", "--incoming", &to], None).unwrap();
    let mut src = run_guest("digest", ARGS, "32M", 1, Some(&sock));
    src.wait_line(T, |l| l == "round 1/6").expect("guest never reached round 1");
    wait_for_file(&dst_sock);
    // At 1 MiB/s the first pass takes over a second: kill the destination in it.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        dst.kill();
    });
    let e = migrate(&sock, &to, json!({ "max_bandwidth_mib_s": 1.0 })).unwrap_err().to_string();
    killer.join().unwrap();
    assert!(e.contains("migration failed") && e.contains(&to), "{e}");
    assert_eq!(digest_to_end(&mut src), reference_digest(1));
    let _ = std::fs::remove_dir_all(&dir);
}

fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_header(kind, &[payload]).to_vec();
    f.extend_from_slice(payload);
    f
}

/// A fake source: connects to `cevm run --incoming` and sends `frames` after a
/// valid Hello (and its Ready); returns what the destination printed and its status.
fn fake_source(name: &str, after_hello: Vec<u8>, hello_version: Option<u32>) -> (i32, String) {
    let dir = workdir(name);
    let dst_sock = dir.join("dst.sock");
    let to = format!("unix:{}", dst_sock.display());
    let dst = Command::new(bin())
        .args(["run", "--incoming", &to])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&dst_sock);
    let mut s = UnixStream::connect(&dst_sock).unwrap();
    let config = vmm::InstanceConfig {
        boot: vmm::Boot::Builtin { guest: "digest".into(), args: ARGS.into() },
        mem_size: 32 << 20,
        vcpus: 1,
        memory_backend: vmm::MemoryBackend::Shared,
        disk: None,
        nics: vec![],
    };
    let hello =
        serde_json::to_vec(&Hello { cevm_version: "test".into(), config, cevm: false, nic_offloads: vec![] }).unwrap();
    let mut hello = frame(FrameKind::Hello, &hello);
    if let Some(v) = hello_version {
        hello[4..8].copy_from_slice(&v.to_le_bytes());
    }
    s.write_all(&hello).unwrap();
    if hello_version.is_none() {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_le_bytes([h[8], h[9], h[10], h[11]]), FrameKind::Ready as u32);
        s.write_all(&after_hello).unwrap();
    }
    // The source goes away (a partial state is all the destination ever gets).
    drop(s);
    let out = dst.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_destination_refuses_a_corrupted_frame_a_partial_state_and_another_version() {
    // A page frame with one byte flipped after its checksum was computed.
    let mut payload = encode_page_table(&[PageEntry { gpa: 0x40_0000, zero: false }]);
    payload.extend(std::iter::repeat_n(0x5a, 4096));
    let mut bad = frame(FrameKind::Pages, &payload);
    let n = bad.len();
    bad[n - 100] ^= 0x01;
    let (code, out) = fake_source("mig-crc", bad, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("incoming migration failed, nothing runs") && out.contains("fails its checksum"), "{out}");
    assert!(!out.contains("digest"), "guest code ran: {out}");
    // Pages, then the connection closes before any state: nothing may run.
    let good = frame(FrameKind::Pages, &payload);
    let (code, out) = fake_source("mig-partial", good, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nothing runs") && out.contains("closed the connection"), "{out}");
    // A source of another protocol version.
    let (code, out) = fake_source("mig-version", Vec::new(), Some(99));
    assert_eq!(code, 1, "{out}");
    let ours = format!("this cevm speaks version {PROTOCOL_VERSION}");
    assert!(out.contains("version 99") && out.contains(&ours), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_source_meeting_another_protocol_version_keeps_its_guest() {
    let dir = workdir("mig-peer-version");
    let sock = dir.join("api.sock");
    let fake = dir.join("fake.sock");
    let listener = UnixListener::bind(&fake).unwrap();
    // A "destination" that answers the Hello with a frame of version 99.
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let len = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let mut rest = vec![0u8; len as usize];
        s.read_exact(&mut rest).unwrap();
        let mut ready = frame(FrameKind::Ready, &[]);
        ready[4..8].copy_from_slice(&99u32.to_le_bytes());
        s.write_all(&ready).unwrap();
    });
    let mut src = run_guest("digest", ARGS, "32M", 1, Some(&sock));
    src.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
    let e = migrate(&sock, &format!("unix:{}", fake.display()), json!({})).unwrap_err().to_string();
    peer.join().unwrap();
    let ours = format!("this cevm speaks version {PROTOCOL_VERSION}");
    assert!(e.contains("protocol version 99") && e.contains(&ours), "{e}");
    assert_eq!(digest_to_end(&mut src), reference_digest(1));
    let _ = std::fs::remove_dir_all(&dir);
}
