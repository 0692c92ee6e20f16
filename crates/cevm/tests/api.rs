//! The control API under a real VMM: the socket file is claimed without
//! losing anyone's file or socket, no client can hold up another, ambiguous
//! or malformed requests are refused, and status and progress are answered
//! while a migration runs.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use cevm::api::{client, Client, ClientError};
use cevm::child::CevmChild;
use cevm_testkit::*;
use serde_json::{json, Value};

/// A VMM whose guest runs until it is told to quit (16 MiB of data, then idle).
fn idle_vm(sock: &Path) -> CevmChild {
    let mut vm = run_guest("dirtier", "mib=16 fill=1 idle=1", "64M", 1, Some(sock));
    vm.wait_line(T, |l| l.starts_with("dirtier: filled")).expect("the guest never filled its memory");
    vm
}

/// Sends `raw` as one request and returns the status code and the JSON body.
fn raw(sock: &Path, raw: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(raw).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (code, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")))
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

#[test]
fn a_file_at_the_socket_path_is_kept_and_the_vmm_refused_before_it_creates_anything() {
    let dir = workdir("api-file");
    let file = dir.join("api.sock");
    std::fs::write(&file, b"not a socket, and precious").unwrap();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let overlay = dir.join("top.qcow2");
    let o = cevm(&[
        "run",
        "--guest",
        "hello",
        "--mem",
        "16M",
        "--disk",
        base.to_str().unwrap(),
        "--overlay",
        overlay.to_str().unwrap(),
        "--api-sock",
        file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is a regular file, not a socket; refusing to replace it"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket, and precious");
    assert!(!overlay.exists(), "a refused run created its overlay");
    // A directory that does not exist is refused the same way.
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--api-sock", dir.join("no/api.sock").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("its directory does not exist"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_vmm_on_a_live_socket_is_refused_and_the_first_keeps_its_api() {
    let dir = workdir("api-live");
    let sock = dir.join("api.sock");
    let mut vm = idle_vm(&sock);
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--api-sock", sock.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("another process is listening there"), "{err}");
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket(), "the live socket was removed");
    assert_eq!(api(&sock).status().unwrap().state, "running");
    quit(&sock, &mut vm);
    assert!(!sock.exists(), "the VMM removes its own socket when it ends");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = workdir("api-stale");
    let sock = dir.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut vm = idle_vm(&sock);
    assert_eq!(api(&sock).status().unwrap().state, "running");
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_that_never_finishes_its_body_holds_up_no_other() {
    let dir = workdir("api-slow");
    let sock = dir.join("api.sock");
    let mut vm = idle_vm(&sock);
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"PUT /v1/checkpoint HTTP/1.1\r\nContent-Length: 2000\r\n\r\n{").unwrap();
    let quick = Client::new(&sock, Duration::from_secs(20));
    for _ in 0..3 {
        let s = quick.status().expect("status is answered while another client holds its request open");
        assert_eq!(s.state, "running");
    }
    // The slow client is answered too once its time is up: 408, not a hang.
    slow.set_read_timeout(Some(T)).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hundreds_of_idle_connections_leave_status_answered_and_the_thread_count_bounded() {
    let dir = workdir("api-idle");
    let sock = dir.join("api.sock");
    let mut vm = idle_vm(&sock);
    assert_eq!(api(&sock).status().unwrap().state, "running");
    let before = threads(vm.id());
    let idle: Vec<UnixStream> = (0..400).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    let quick = Client::new(&sock, Duration::from_secs(20));
    assert_eq!(quick.status().expect("status is answered beside 400 idle connections").state, "running");
    let after = threads(vm.id());
    assert!(after <= before + 2, "{before} threads before 400 idle connections, {after} with them");
    drop(idle);
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ambiguous_malformed_and_oversized_requests_are_refused_and_do_nothing() {
    let dir = workdir("api-bad");
    let sock = dir.join("api.sock");
    let mut vm = idle_vm(&sock);
    let dup = b"PUT /v1/pause HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n";
    let (code, body) = raw(&sock, dup);
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Content-Length given more than once"), "{body}");
    assert_eq!(api(&sock).status().unwrap().state, "running", "a refused pause paused the guest");
    let chunked = b"PUT /v1/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(raw(&sock, chunked).0, 501);
    assert_eq!(raw(&sock, b"PUT /v1/pause HTTP/1.1\r\nContent-Length: 100000\r\n\r\n").0, 413);
    assert_eq!(raw(&sock, b"GET /v1/status\r\n\r\n").0, 400);
    assert_eq!(raw(&sock, b"GET /v1/status HTTP/3\r\n\r\n").0, 505);
    let mut long = b"GET /v1/status HTTP/1.1\r\nX: ".to_vec();
    long.resize(20_000, b'a');
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw(&sock, &long).0, 431);
    assert_eq!(api(&sock).status().unwrap().state, "running");
    // curl, as the API's doc says, with HTTP/1.0 too.
    for version in ["--http1.1", "--http1.0"] {
        let o = std::process::Command::new("curl")
            .args(["-sS", version, "--unix-socket", sock.to_str().unwrap(), "http://localhost/v1/status"])
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
        assert_eq!(v["state"], "running", "{v}");
    }
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_and_progress_are_answered_while_a_migration_runs() {
    let dir = workdir("api-mig");
    let sock = dir.join("api.sock");
    let mut vm = idle_vm(&sock);
    // 16 MiB of data at 2 MiB/s: a migration of several seconds.
    let s = sock.clone();
    let migration = std::thread::spawn(move || {
        let body = json!({ "to": "local", "params": { "max_bandwidth_mib_s": 2.0 } });
        client::call(&s, "PUT", "/v1/migrate", Some(&body), T)
    });
    let quick = Client::new(&sock, Duration::from_secs(30));
    let (mut progress_seen, mut status_seen) = (None, None);
    while !migration.is_finished() {
        match quick.migration() {
            Ok(p) if p.phase == "precopy" && p.pages_sent > 0 => progress_seen = Some(p),
            Ok(_) | Err(ClientError::Api { code: 404, .. }) => {}
            Err(e) => panic!("GET /v1/migration during a migration: {e}"),
        }
        let s = client::call(&sock, "GET", "/v1/status", None, Duration::from_secs(30)).expect("status");
        if s["operation"] == "migration" {
            status_seen = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = migration.join().unwrap().expect("the migration");
    let p = progress_seen.expect("no GET /v1/migration answered with the pre-copy under way");
    assert!(p.pages_sent <= p.pages_total, "{p:?}");
    let s = status_seen.expect("no status answered during the migration");
    assert_eq!(s["state"], "running", "{s}");
    assert!(report["pages_sent"].as_u64().unwrap() >= p.pages_sent, "{report}");
    assert_eq!(quick.migration().unwrap().phase, "done");
    let s = client::call(&sock, "GET", "/v1/status", None, T).unwrap();
    assert_eq!(s["state"], "running", "{s}");
    assert!(s.get("operation").is_none(), "{s}");
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_checkpoint_directory_is_refused_with_400_and_the_guest_runs_on() {
    let dir = workdir("api-out");
    let sock = dir.join("api.sock");
    let mut vm = idle_vm(&sock);
    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    for strategy in ["stop-and-save", "cevm"] {
        for out in [dir.join("missing/ck"), file.clone(), file.join("ck")] {
            let body = json!({ "out": out, "strategy": strategy });
            match client::call(&sock, "PUT", "/v1/checkpoint", Some(&body), T) {
                Err(ClientError::Api { code: 400, msg }) => {
                    assert!(msg.starts_with("bad checkpoint directory: "), "{msg}")
                }
                other => panic!("{strategy} into {}: {other:?}", out.display()),
            }
        }
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let s = api(&sock).status().unwrap();
    assert_eq!((s.state.as_str(), s.checkpoints), ("running", 0));
    // A good one then goes through, and its progress tells what it wrote.
    let ck = dir.join("ck");
    let report = checkpoint(&sock, &ck, false).unwrap();
    let p = client::call(&sock, "GET", "/v1/checkpoint", None, T).unwrap();
    assert_eq!(p["phase"], "done", "{p}");
    assert_eq!(p["dir"], json!(ck), "{p}");
    assert_eq!(p["memory_bytes_total"], 64 << 20, "{p}");
    assert_eq!(p["memory_bytes_done"], 64 << 20, "{p}");
    assert_eq!(p["memory_bytes_written"], report.memory.data_bytes, "{p}");
    assert!(report.memory.data_bytes >= 16 << 20, "{report:?}");
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_incoming_vmm_claims_its_socket_at_once_and_answers_503_until_a_guest_arrives() {
    let dir = workdir("api-incoming");
    let sock = dir.join("api.sock");
    let to = format!("unix:{}", dir.join("in.sock").display());
    let mut dst =
        CevmChild::spawn(bin(), &["run", "--incoming", &to, "--api-sock", sock.to_str().unwrap()], None).unwrap();
    wait_for_file(&sock);
    for call in [Client::status as fn(&Client) -> Result<_, _>, Client::pause] {
        match call(&api(&sock)) {
            Err(ClientError::Api { code: 503, msg }) => {
                assert!(msg.contains("waits for an incoming migration"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }
    dst.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
