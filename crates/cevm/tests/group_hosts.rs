//! A job whose VMs run on two "hosts": network namespaces of this machine,
//! each with its own bridge and tap, joined by veths to one Ethernet (see
//! `cevm_testkit::net::Hosts`). Each member VMM serves its API to other hosts
//! only at `--control tcp:HOST:PORT` with the job's secret; the coordinator,
//! in the test's own namespace, checkpoints the group over TCP, and restores
//! it with each member on the other host than before. A coordinator without
//! the secret, with another one, or with one others can read, and a peer
//! that skips the handshake, are refused and change nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cevm::child::CevmChild;
use cevm_testkit::net::{netring_digest, netring_hop, server_pid, Hosts};
use cevm_testkit::{api, bin, cevm, workdir, T};

const MIB: u64 = 1;
const WORK: u64 = 100;
const HOPS: u64 = 2000;
const PORT: u16 = 7000;

/// Waits until the console of `vm` shows hop `hop` or a later one; returns it.
fn wait_hop(vm: &mut CevmChild, hop: u64) -> u64 {
    let line = vm.wait_line(T, |l| netring_hop(l).is_some_and(|j| j >= hop));
    netring_hop(&line.unwrap_or_else(|| panic!("hop {hop} never came: {:?}", vm.seen))).unwrap()
}

fn group(args: &[&str]) -> std::process::Output {
    let o = cevm(&[&["group"], args].concat());
    eprintln!("cevm group {}: {}\n{}", args.join(" "), o.status, String::from_utf8_lossy(&o.stderr));
    o
}

/// The group checkpoints committed in `series`.
fn committed(series: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(series)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| n.starts_with("ckpt-") && series.join(n).join("group.json").exists());
    v.sort();
    v
}

#[test]
fn a_group_on_two_hosts_is_checkpointed_over_tcp_with_the_secret_and_restored_on_swapped_hosts() {
    let dir = workdir("group-hosts");
    let hosts = Hosts::new(2);
    let (key, wrong, open) = (dir.join("job.key"), dir.join("other.key"), dir.join("open.key"));
    for k in [&key, &wrong, &open] {
        assert!(cevm(&["group", "secret", k.to_str().unwrap()]).status.success());
    }
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let control = |i: usize| format!("tcp:{}:{PORT}", hosts.hosts[i].addr);
    let sock = |name: &str| dir.join(format!("{name}.sock"));
    // Member i on host i, on that host's tap, controlled from other hosts only with the key.
    let mut vms: Vec<CevmChild> = (0..2)
        .map(|i| {
            let args = format!("id={i} count=2 hops={HOPS} mib={MIB} work={WORK} strict=1");
            let mut c = hosts.hosts[i].command(bin());
            c.args(["run", "--guest", "netring", "--guest-args", &args, "--mem", "32M"]);
            c.args(["--net", &format!("tap=t0,mac=52:54:00:ce:00:{i:02x}")]);
            c.arg("--api-sock").arg(sock(&format!("m{i}")));
            c.args(["--control", &control(i), "--control-secret", key.to_str().unwrap()]);
            CevmChild::spawn_cmd(c, Some(&format!("m{i}: "))).unwrap()
        })
        .collect();
    wait_hop(&mut vms[0], 3);
    let series = dir.join("series");
    let s = series.to_str().unwrap();
    let members: Vec<String> = (0..2).map(|i| format!("m{i}={}", control(i))).collect();
    let base = ["checkpoint", "--dir", s, "--member", &members[0], "--member", &members[1]];

    // Refused, changing nothing: no secret, another job's, one others can read.
    let o = group(&base);
    assert_eq!(o.status.code(), Some(2), "a tcp: member without --secret is a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--secret"));
    let o = group(&[&base[..], &["--secret", wrong.to_str().unwrap()]].concat());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refused this secret"), "the refusal is said");
    let o = group(&[&base[..], &["--secret", open.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"));
    // A peer that speaks HTTP at once, as to an unauthenticated endpoint.
    {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(format!("{}:{PORT}", hosts.hosts[0].addr)).unwrap();
        let req =
            "PUT /v1/quit HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n";
        let _ = raw.write_all(req.as_bytes());
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1"), "no answer of the API without the secret");
    }
    assert!(committed(&series).is_empty(), "nothing was committed: {:?}", committed(&series));
    let rx = |i: usize| api(&sock(&format!("m{i}"))).status().unwrap().nics[0].rx_frames;
    let before = [rx(0), rx(1)];
    for i in 0..2 {
        let st = api(&sock(&format!("m{i}"))).status().unwrap();
        assert_eq!(st.state, "running", "member {i} runs on, untouched");
        assert_eq!(st.checkpoints, 0, "member {i} took no checkpoint");
    }
    // The status shows counters at most a second old: the ring is seen to go on within a few.
    let t0 = Instant::now();
    while !(rx(0) > before[0] && rx(1) > before[1]) {
        assert!(t0.elapsed() < Duration::from_secs(10), "the ring goes on");
        std::thread::sleep(Duration::from_millis(100));
    }

    // With the secret: stop-and-save, then CEVM, each over TCP.
    let with_key = [&base[..], &["--secret", key.to_str().unwrap()]].concat();
    assert!(group(&with_key).status.success());
    assert!(group(&[&with_key[..], &["--strategy", "cevm"]].concat()).status.success());
    assert_eq!(committed(&series).len(), 2);
    let manifest = std::fs::read_to_string(series.join("latest/group.json")).unwrap();
    assert!(manifest.contains(&format!("\"control\": \"{}:{PORT}\"", hosts.hosts[1].addr)), "{manifest}");

    // Both hosts' VMMs die; each member comes back on the other host.
    for i in 0..2 {
        let pid = server_pid(&sock(&format!("m{i}"))).expect("member VMM");
        // SAFETY: kill(2) of a VMM process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    }
    for mut vm in vms.drain(..) {
        vm.finish(T);
    }
    let latest = series.join("latest").canonicalize().unwrap();
    let restored: Vec<CevmChild> = (0..2)
        .map(|i| {
            let host = 1 - i;
            let mut c = hosts.hosts[host].command(bin());
            c.arg("restore").arg(latest.join(format!("m{i}"))).args(["--paused", "--net", "tap=t0"]);
            c.arg("--api-sock").arg(sock(&format!("m{i}.r")));
            c.args(["--control", &control(host), "--control-secret", key.to_str().unwrap()]);
            CevmChild::spawn_cmd(c, Some(&format!("m{i}@h{host}: "))).unwrap()
        })
        .collect();
    let at: Vec<String> = (0..2).map(|i| format!("m{i}={}", control(1 - i))).collect();
    let mut g = CevmChild::spawn(
        bin(),
        &["group", "restore", s, "--at", &at[0], "--at", &at[1], "--secret", key.to_str().unwrap()],
        Some("group: "),
    )
    .unwrap();
    let want = format!("{:016x}", guests::netring_digest(2, HOPS, MIB, WORK));
    let t0 = Instant::now();
    for (i, mut vm) in restored.into_iter().enumerate() {
        let line = vm.wait_line(T, |l| netring_digest(l).is_some());
        let line = line.unwrap_or_else(|| panic!("member {i} gave no digest: {:?}", vm.seen));
        assert_eq!(netring_digest(&line).unwrap(), want, "member {i}, restored on the other host");
        assert!(vm.finish(T).expect("member ended").success());
    }
    assert!(g.finish(T).expect("the group restore ended").success(), "{:?}", g.seen);
    eprintln!("restored group ran to its end in {:.1} s", t0.elapsed().as_secs_f64());
    drop(hosts);
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
}

#[test]
fn a_group_restore_at_other_hosts_needs_the_secret_and_names_its_members() {
    let dir = workdir("group-hosts-flags");
    let s = dir.to_str().unwrap();
    let o = group(&["restore", s, "--at", "m0=tcp:10.0.0.1:7000"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--secret"));
    let o = group(&["restore", s, "--at", "m0=/run/m0.sock", "--secret", "/x"]);
    assert_eq!(o.status.code(), Some(2), "--at takes a tcp: endpoint");
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--control", "tcp:127.0.0.1:7000"]);
    assert_eq!(o.status.code(), Some(2), "--control needs --api-sock and a secret");
    let key = dir.join("k");
    std::fs::write(&key, "short\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sock = dir.join("a.sock");
    let a = ["run", "--guest", "hello", "--mem", "16M", "--api-sock", sock.to_str().unwrap()];
    let o = cevm(&[&a[..], &["--control", "tcp:127.0.0.1:7000", "--control-secret", key.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(2), "a short secret is refused before anything runs");
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 16"));
    assert!(!sock.exists(), "no socket left behind");
    let o = cevm(&[&a[..], &["--control", "127.0.0.1:7000", "--control-secret", key.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(2), "--control takes tcp:HOST:PORT");
}
