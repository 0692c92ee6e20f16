//! End to end on this machine's /dev/kvm: `cevm run` a guest, checkpoint it through
//! the API, SIGKILL the VMM, `cevm restore`, and compare the guest's result with an
//! undisturbed run's.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use cevm::api;
use cevm_testkit::*;
use serde_json::json;

/// run -> checkpoint after round 2 -> SIGKILL -> restore: same digest as undisturbed.
fn checkpoint_kill_restore(vcpus: u32) {
    let dir = workdir(&format!("ckr{vcpus}"));
    let sock = dir.join("api.sock");
    let ckpt = dir.join("ckpt");
    let args = "mib=1 rounds=6";
    let mut reference = run_guest("digest", args, "32M", vcpus, None);
    let mut victim = run_guest("digest", args, "32M", vcpus, Some(&sock));
    victim.wait_line(T, |l| l == "round 2/6").expect("victim never reached round 2");
    let report = checkpoint(&sock, &ckpt, false).unwrap();
    assert_eq!(report.strategy, "stop-and-save");
    assert!(report.memory.zero_pages > 0, "{report:?}");
    // The victim's guest keeps running after the checkpoint; then it dies hard.
    victim.wait_line(T, |l| l.starts_with("round ")).expect("guest did not go on after the checkpoint");
    victim.kill();

    let mut restored = restore(&ckpt, None);
    let restored_digest = digest_to_end(&mut restored);
    // The restored guest continues after round 2: it never prints rounds 1-2 again.
    assert!(!restored.seen.iter().any(|l| l == "round 1/6" || l == "round 2/6"), "{:?}", restored.seen);
    assert!(restored.seen.iter().any(|l| l == "round 6/6"), "{:?}", restored.seen);
    assert_eq!(restored_digest, digest_to_end(&mut reference), "restored digest differs from the undisturbed run's");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_sigkill_restore_gives_the_right_digest_on_one_vcpu() {
    checkpoint_kill_restore(1);
}

#[test]
fn checkpoint_sigkill_restore_gives_the_right_digest_on_two_vcpus() {
    checkpoint_kill_restore(2);
}

#[test]
fn two_checkpoints_in_one_run_and_the_first_restores_right() {
    let dir = workdir("twice");
    let sock = dir.join("api.sock");
    let (first, second) = (dir.join("first"), dir.join("second"));
    let args = "mib=1 rounds=5";
    let mut reference = run_guest("digest", args, "32M", 1, None);
    let mut vm = run_guest("digest", args, "32M", 1, Some(&sock));
    vm.wait_line(T, |l| l == "round 1/5").unwrap();
    checkpoint(&sock, &first, false).unwrap();
    vm.wait_line(T, |l| l == "round 3/5").unwrap();
    // The second checkpoint leaves the VM stopped: its VMM exits 0.
    let r = checkpoint(&sock, &second, true).unwrap();
    assert!(r.stopped);
    let st = vm.finish(T).expect("VMM did not exit after a --stop checkpoint");
    assert!(st.success(), "{st:?}");
    assert!(!vm.seen.iter().any(|l| l.starts_with("digest=")), "the stopped guest must not finish: {:?}", vm.seen);

    let expected = digest_to_end(&mut reference);
    for ckpt in [&first, &second] {
        assert_eq!(digest_to_end(&mut restore(ckpt, None)), expected, "restore of {}", ckpt.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn api_pause_resume_status_quit_on_a_0600_socket() {
    let dir = workdir("api");
    let sock = dir.join("api.sock");
    let mut vm = run_guest("digest", "mib=1 rounds=50", "32M", 1, Some(&sock));
    vm.wait_line(T, |l| l.starts_with("digest:")).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode");
    let s = api::client::call(&sock, "GET", "/v1/status", None, T).unwrap();
    assert_eq!((s["api_version"].as_u64(), s["state"].as_str()), (Some(1), Some("running")));
    assert_eq!(s["guest"]["boot"]["guest"], "digest");
    let p = api::client::call(&sock, "PUT", "/v1/pause", None, T).unwrap();
    assert_eq!(p["state"], "paused");
    // Paused: the guest prints nothing.
    assert!(vm.wait_line(Duration::from_secs(3), |l| l.starts_with("round ")).is_none(), "{:?}", vm.seen);
    api::client::call(&sock, "PUT", "/v1/resume", None, T).unwrap();
    vm.wait_line(T, |l| l.starts_with("round ")).expect("resumed guest goes on");
    let e = api::client::call(&sock, "PUT", "/v1/checkpoint", Some(&json!({ "out": "relative/dir" })), T).unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    let e = api::client::call(&sock, "GET", "/v2/status", None, T).unwrap_err();
    assert!(e.to_string().contains("API version 1"), "{e}");
    quit(&sock, &mut vm);
    assert!(!sock.exists(), "the socket file is removed when the VMM exits");
    let _ = std::fs::remove_dir_all(&dir);
}

/// CEVM checkpoint of the digest guest after round 2, to a new instance in the
/// same VMM (`to` = None) or in a `cevm run --incoming` process; the guest goes
/// on in the new instance, which is then SIGKILLed (`kill`) or left to finish
/// with the right digest. Either way the checkpoint restores to the right
/// digest, without redoing rounds 1-2. Requests the strategy cannot serve are
/// refused first, and the guest goes on.
fn cevm_checkpoint_then(process: bool, kill: bool) {
    let dir = workdir(&format!("cevm-{}-{}", if process { "proc" } else { "thread" }, kill));
    let (sock, ckpt, dst_sock) = (dir.join("api.sock"), dir.join("ckpt"), dir.join("dst.sock"));
    let args = "mib=1 rounds=6";
    let mut reference = run_guest("digest", args, "32M", 2, None);
    let want = digest_to_end(&mut reference);
    let mut vm = run_guest("digest", args, "32M", 2, Some(&sock));
    let mut dst = process.then(|| {
        let to = format!("unix:{}", dst_sock.display());
        cevm::child::CevmChild::spawn(bin(), &["run", "--incoming", &to], None).unwrap()
    });
    vm.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
    for (body, why) in [
        (json!({ "out": ckpt, "strategy": "cevm", "stop": true }), "stop-and-save"),
        (json!({ "out": ckpt, "strategy": "stop-and-save", "to": "local" }), "for the cevm strategy"),
        (json!({ "out": ckpt, "strategy": "cevm", "to": "ftp:nowhere" }), "--to"),
    ] {
        let e = api::client::call(&sock, "PUT", "/v1/checkpoint", Some(&body), T).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains("400"), "{body}: {e}");
    }
    let mut body = json!({ "out": ckpt, "strategy": "cevm" });
    if process {
        wait_for_file(&dst_sock);
        body["to"] = json!(format!("unix:{}", dst_sock.display()));
    }
    let report = api::client::call(&sock, "PUT", "/v1/checkpoint", Some(&body), T).unwrap();
    assert_eq!(report["strategy"], "cevm", "{report}");
    assert!(report["memory"]["data_pages"].as_u64().unwrap() > 256, "{report}");
    let pause = report["pause_ms"].as_f64().unwrap();
    assert!(pause > 0.0 && pause < report["total_ms"].as_f64().unwrap(), "{report}");
    if !process {
        let status = api::client::call(&sock, "GET", "/v1/status", None, T).unwrap();
        assert_eq!(status["checkpoints"], 1, "{status}");
    }
    // The guest runs in the new instance: this VMM's (thread-based) or the
    // other process's; a process-based source ends once the checkpoint is written.
    let runner = match dst.as_mut() {
        Some(d) => {
            assert!(vm.finish(T).expect("the source VMM did not end").success(), "{:?}", vm.seen);
            d
        }
        None => &mut vm,
    };
    if kill {
        runner.wait_line(T, |l| l.starts_with("round ")).expect("the guest did not go on after the switch");
        runner.kill();
    } else {
        assert_eq!(digest_to_end(runner), want, "the guest's digest after the CEVM switch differs");
    }
    verify_ok(&ckpt);
    let mut restored = restore(&ckpt, None);
    let digest = digest_to_end(&mut restored);
    assert!(!restored.seen.iter().any(|l| l == "round 1/6" || l == "round 2/6"), "{:?}", restored.seen);
    assert_eq!(digest, want, "the restored CEVM checkpoint's digest differs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cevm_checkpoint_the_guest_runs_on_right_and_the_checkpoint_restores_right() {
    cevm_checkpoint_then(false, false);
}

#[test]
fn cevm_thread_based_checkpoint_new_instance_sigkilled_the_checkpoint_restores_right() {
    cevm_checkpoint_then(false, true);
}

#[test]
fn cevm_process_based_checkpoint_the_guest_finishes_right_elsewhere_and_the_checkpoint_restores_right() {
    cevm_checkpoint_then(true, false);
}

#[test]
fn cevm_process_based_checkpoint_new_instance_sigkilled_the_checkpoint_restores_right() {
    cevm_checkpoint_then(true, true);
}

/// `--checkpoint-every 1s --keep 2`: the digest guest is checkpointed (cevm,
/// the default) again and again while it runs to the right digest; the
/// directory ends with the newest two, `latest` names the newest, and each of
/// them restores to the right digest.
#[test]
fn periodic_cevm_checkpoints_keep_the_newest_two_and_each_restores_right() {
    let dir = workdir("periodic");
    let series = dir.join("ckpts");
    let args = "mib=1 rounds=12";
    let want = digest_to_end(&mut run_guest("digest", args, "32M", 2, None));
    let a = [
        "run",
        "--guest",
        "digest",
        "--guest-args",
        args,
        "--mem",
        "32M",
        "--vcpus",
        "2",
        "--checkpoint-every",
        "1s",
        "--keep",
        "2",
        "--checkpoint-dir",
        series.to_str().unwrap(),
    ];
    let mut vm = cevm::child::CevmChild::spawn(bin(), &a, None).unwrap();
    assert_eq!(digest_to_end(&mut vm), want);
    // Numbers are never reused and every attempt committed (none failed), so
    // `latest` = ckpt-N says N were taken; N - 2 of them were removed.
    let latest = std::fs::read_link(series.join("latest")).unwrap().to_string_lossy().into_owned();
    let n: usize = latest.strip_prefix("ckpt-").and_then(|d| d.parse().ok()).unwrap_or(0);
    assert!(n >= 3, "too few periodic checkpoints ({latest}) to see one removed");
    let mut names: Vec<String> =
        std::fs::read_dir(&series).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let newest = [format!("ckpt-{:06}", n - 1), format!("ckpt-{n:06}")];
    assert_eq!(names, [newest[0].as_str(), newest[1].as_str(), "latest"]);
    for ck in [series.join(&newest[0]), series.join("latest")] {
        verify_ok(&ck);
        assert_eq!(digest_to_end(&mut restore(&ck, None)), want, "{}", ck.display());
    }
    // Bad policies are refused before anything runs.
    for (flags, why) in [
        (vec!["--checkpoint-every", "0s", "--checkpoint-dir", "/tmp/x"], "longer than zero"),
        (vec!["--checkpoint-every", "1s", "--checkpoint-dir", "/tmp/x", "--keep", "0"], "at least 1"),
        (vec!["--checkpoint-every", "5", "--checkpoint-dir", "/tmp/x"], "give a unit"),
    ] {
        let mut a = vec!["run", "--guest", "digest", "--mem", "32M"];
        a.extend(flags);
        let o = cevm(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why), "{a:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
