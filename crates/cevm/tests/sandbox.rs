//! Every thread of a running VMM is confined by seccomp, and the threads the
//! guest and the clients drive (vCPUs, API, NICs) by a narrower filter than the VMM's own; a VMM
//! confined so still boots, checkpoints and restores its guest right.

use std::path::Path;

use cevm_testkit::*;

/// (thread id, name, number of seccomp filters) of every thread of process
/// `pid`, from /proc (`Seccomp: 2` is filter mode).
fn threads(pid: u32) -> Vec<(u32, String, u32)> {
    let mut out = vec![];
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let tid = t.file_name().to_string_lossy().parse().unwrap();
        let dir = t.path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else { continue };
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default()
        };
        assert_eq!(field("Seccomp:"), "2", "thread {} of the VMM is not in seccomp filter mode", field("Name:"));
        out.push((tid, field("Name:"), field("Seccomp_filters:").parse().unwrap()));
    }
    out
}

#[test]
fn every_thread_of_a_running_vmm_is_confined_and_the_vcpus_most() {
    let dir = workdir("sandbox");
    let sock = dir.join("api.sock");
    let ckpt = dir.join("ckpt");
    let args = "mib=1 rounds=4";
    let mut reference = run_guest("digest", args, "32M", 2, None);
    let mut vm = run_guest("digest", args, "32M", 2, Some(&sock));
    vm.wait_line(T, |l| l == "round 1/4").expect("the confined guest did not run");
    let seen = threads(vm.id());
    let main = seen.iter().find(|(tid, ..)| *tid == vm.id()).expect("the main thread").2;
    assert!(main > 0, "{seen:?}");
    let vcpus: Vec<u32> = seen.iter().filter(|(_, n, _)| n.starts_with("vcpu")).map(|t| t.2).collect();
    assert_eq!(vcpus.len(), 2, "{seen:?}");
    assert!(vcpus.iter().all(|&f| f > main), "vCPU threads add their own filter: {seen:?}");
    let api: Vec<u32> = seen.iter().filter(|(_, n, _)| n == "api").map(|t| t.2).collect();
    assert!(api.len() == 1 && api[0] > main, "the API thread adds its own filter: {seen:?}");

    // Confined, the VMM still checkpoints; the restored VMM is confined too,
    // and its guest ends right.
    checkpoint(&sock, &ckpt, true).unwrap();
    vm.finish(T);
    let mut restored = restore(&ckpt, None);
    restored.wait_line(T, |l| l.starts_with("round ")).expect("restored guest did not run");
    assert!(threads(restored.id()).iter().all(|t| t.2 > 0));
    assert_eq!(digest_to_end(&mut restored), digest_to_end(&mut reference));
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

#[test]
fn a_nics_io_thread_is_confined_more_narrowly_than_the_vmm() {
    let mut br = cevm_testkit::net::Bridge::new();
    let tap = br.tap(0);
    let net = format!("tap={tap}");
    let args = ["run", "--guest", "digest", "--guest-args", "mib=1 rounds=4", "--mem", "32M", "--net", &net];
    let mut vm = cevm::child::CevmChild::spawn(bin(), &args, None).unwrap();
    vm.wait_line(T, |l| l == "round 1/4").expect("the confined guest did not run");
    let seen = threads(vm.id());
    let main = seen.iter().find(|(tid, ..)| *tid == vm.id()).expect("the main thread").2;
    let nic: Vec<u32> = seen.iter().filter(|(_, n, _)| n == "net0").map(|t| t.2).collect();
    assert!(nic.len() == 1 && nic[0] > main, "the NIC's thread adds its own filter: {seen:?}");
    assert!(vm.finish(T).expect("cevm did not end").success(), "{:?}", vm.seen);
}
