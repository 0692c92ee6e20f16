//! Damaged checkpoints: `cevm verify` and `cevm restore` refuse them before any guest
//! code runs, exit non-zero, and name the file and the problem. Never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cevm_testkit::*;

/// One good checkpoint of a digest guest stopped mid-run, made once for all tests.
fn good_checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workdir("bad");
        let sock = dir.join("api.sock");
        let ckpt = dir.join("good");
        let mut vm = run_guest("digest", "mib=1 rounds=9", "16M", 1, Some(&sock));
        vm.wait_line(T, |l| l == "round 1/9").unwrap();
        checkpoint(&sock, &ckpt, true).unwrap();
        assert!(vm.finish(T).unwrap().success());
        verify_ok(&ckpt);
        ckpt
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh copy of the good checkpoint to damage.
fn copy(name: &str) -> PathBuf {
    let src = good_checkpoint();
    let dst = src.parent().unwrap().join(name);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        // `cp --sparse=always` keeps the memory image sparse, as cevm wrote it.
        let st = Command::new("cp").arg("--sparse=always").arg(e.path()).arg(dst.join(e.file_name())).status().unwrap();
        assert!(st.success());
    }
    dst
}

/// `cevm verify` and `cevm restore` both refuse `dir` with a message containing every
/// one of `needles`; restore prints no guest output.
fn assert_refused(dir: &Path, needles: &[&str]) {
    for cmd in ["verify", "restore"] {
        let out = cevm(&[cmd, dir.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "`cevm {cmd}` must fail with 1: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "`cevm {cmd}`: expected `{n}` in: {err}");
        }
        if cmd == "restore" {
            assert!(out.stdout.is_empty(), "guest code ran: {}", text(&out.stdout));
        }
    }
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn a_flipped_byte_in_any_file_is_refused() {
    let good = good_checkpoint();
    let manifest_len = std::fs::metadata(good.join("manifest.json")).unwrap().len();
    let state_len = std::fs::metadata(good.join("state.json")).unwrap().len();
    // The digest area starts at 4 MiB (data); 12 MiB into a 16 MiB guest is a hole.
    let cases: [(&str, u64, &str); 6] = [
        ("manifest.json", manifest_len / 2, "manifest.json"),
        ("manifest.json", 30, "manifest.json"),
        ("state.json", state_len / 3, "state.json"),
        ("state.json", state_len - 2, "state.json"),
        ("memory.img", (4 << 20) + 12345, "memory.img"),
        ("memory.img", 12 << 20, "memory.img"),
    ];
    for (i, (file, off, named)) in cases.iter().enumerate() {
        let d = copy(&format!("flip{i}"));
        flip(&d.join(file), *off);
        assert_refused(&d, &[named]);
    }
}

#[test]
fn a_truncated_memory_image_is_refused() {
    let d = copy("truncated");
    let f = std::fs::OpenOptions::new().write(true).open(d.join("memory.img")).unwrap();
    f.set_len(8 << 20).unwrap();
    assert_refused(&d, &["memory.img", "size"]);
}

#[test]
fn a_missing_file_is_refused() {
    for file in ["manifest.json", "state.json", "memory.img"] {
        let d = copy(&format!("missing-{file}"));
        std::fs::remove_file(d.join(file)).unwrap();
        assert_refused(&d, &[file, "missing"]);
    }
    assert_refused(Path::new("/nonexistent/checkpoint"), &["/nonexistent/checkpoint"]);
}

#[test]
fn an_unknown_format_version_is_refused_as_such() {
    let d = copy("version");
    let path = d.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("\"format_version\": 1,", "\"format_version\": 99,", 1);
    assert!(text.contains("\"format_version\": 99,"), "manifest layout changed: {text}");
    // Re-seal the manifest with a valid checksum, so only the version is wrong.
    std::fs::write(&path, snapshot::seal_manifest(&text)).unwrap();
    assert_refused(&d, &["manifest.json", "version 99"]);
}

#[test]
fn inspect_describes_a_good_checkpoint_for_humans_and_machines() {
    let good = good_checkpoint();
    let out = cevm(&["inspect", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let human = text(&out.stdout);
    for needle in [
        "format         version 1",
        "strategy       stop-and-save",
        "guest          digest \"mib=1 rounds=9\"",
        "machine        1 vCPU(s), 16 MiB RAM (shared memory)",
        "vcpu 0",
        "memory.img",
        "state.json",
        "zero pages left as holes",
    ] {
        assert!(human.contains(needle), "`{needle}` missing in:\n{human}");
    }
    let out = cevm(&["inspect", "--json", good.to_str().unwrap()]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON");
    assert_eq!(v["manifest"]["guest"]["boot"]["guest"], "digest");
    assert_eq!(v["manifest"]["format_version"], 1);
    assert_eq!(v["vcpus"].as_array().map(Vec::len), Some(1));
    assert!(v["manifest"]["memory_stats"]["data_pages"].as_u64().unwrap() > 256, "{v}");
    // A damaged checkpoint is not described as if it were fine.
    let d = copy("inspect-bad");
    flip(&d.join("state.json"), 10);
    let out = cevm(&["inspect", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("state.json: checksum mismatch"), "{}", text(&out.stderr));
}
