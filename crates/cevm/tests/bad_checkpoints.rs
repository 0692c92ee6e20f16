//! Damaged checkpoints: `cevm verify` and `cevm restore` refuse them before any guest
//! code runs, exit non-zero, and name the file and the problem. Never a panic.
//! Forged ones too (re-sealed with a valid checksum): symbolic links, FIFOs,
//! unlisted or huge files, states no instance can take. Whatever verify accepts,
//! restore accepts; a refused restore leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

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
    copy_of(good_checkpoint(), name)
}

/// A fresh copy of checkpoint `src`, beside it, called `name`.
fn copy_of(src: &Path, name: &str) -> PathBuf {
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
        "machine        1 vCPU(s), 16 MiB RAM (private memory)",
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

/// A checkpoint of the digest guest with a 1 MiB raw disk, stopped mid-run, made
/// once for all tests; the disk's bytes are in disk.ref beside it.
fn disk_checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workdir("bad-disk");
        let sock = dir.join("api.sock");
        let disk = dir.join("guest.raw");
        let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&disk, &bytes).unwrap();
        std::fs::write(dir.join("disk.ref"), &bytes).unwrap();
        let args = ["run", "--guest", "digest", "--guest-args", "mib=1 rounds=9", "--mem", "16M"];
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--disk", disk.to_str().unwrap(), "--api-sock", sock.to_str().unwrap()]);
        let mut vm = cevm::child::CevmChild::spawn(bin(), &a, None).unwrap();
        vm.wait_line(T, |l| l == "round 1/9").unwrap();
        let ckpt = dir.join("good");
        checkpoint(&sock, &ckpt, true).unwrap();
        assert!(vm.finish(T).unwrap().success());
        verify_ok(&ckpt);
        assert_eq!(std::fs::read(ckpt.join("disk.raw")).unwrap(), bytes);
        ckpt
    })
}

/// Where `cevm restore DIR` puts the restored guest's disk by default.
fn restored_disk(dir: &Path) -> PathBuf {
    dir.with_file_name(format!("{}.disk.raw", dir.file_name().unwrap().to_string_lossy()))
}

/// Runs `cevm ARGS` with at most 1 GiB of address space, so a read of a file
/// without bound ends in an allocation failure instead of taking the host's
/// memory, and gives up after a minute (a read blocked on a FIFO would wait
/// forever; the limit only keeps such a failure from hanging the test run).
fn cevm_bounded(args: &[&str]) -> Output {
    let mut child = Command::new("prlimit")
        .arg("--as=1073741824")
        .arg("--")
        .arg(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`cevm {}` hung", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `cevm verify` and `cevm restore` both refuse `dir` (within bounded memory and
/// time), for the same reason in the same words, and that reason contains every
/// one of `needles`; restore runs no guest code and leaves no disk behind.
fn assert_refused_alike(dir: &Path, needles: &[&str]) {
    let mut reasons = Vec::new();
    for (cmd, prefix) in [("verify", "ERROR cevm: verify failed: "), ("restore", "ERROR cevm: cannot restore: ")] {
        let out = cevm_bounded(&[cmd, dir.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "`cevm {cmd}` must fail with 1: {err}");
        assert!(out.stdout.is_empty(), "`cevm {cmd}`: guest code ran: {}", text(&out.stdout));
        let reason =
            err.lines().find_map(|l| Some(l.split_once(prefix)?.1)).unwrap_or_else(|| panic!("`cevm {cmd}`: {err}"));
        for n in needles {
            assert!(reason.contains(n), "`cevm {cmd}`: expected `{n}` in: {reason}");
        }
        reasons.push(reason.to_string());
    }
    assert_eq!(reasons[0], reasons[1], "verify and restore refuse for different reasons");
    assert!(!restored_disk(dir).exists(), "a refused restore left {}", restored_disk(dir).display());
}

/// Sets the size and CRC of file `name` in a manifest (of every entry of that
/// name) to those of `bytes`.
fn set_entry(manifest: &mut Value, name: &str, bytes: &[u8]) {
    let files = manifest["files"].as_array_mut().unwrap();
    let mut entries = files.iter_mut().filter(|f| f["name"] == name).peekable();
    assert!(entries.peek().is_some(), "the manifest lists no {name}");
    for entry in entries {
        entry["size"] = bytes.len().into();
        entry["crc32"] = format!("{:08x}", crc32fast::hash(bytes)).into();
    }
}

/// Writes `manifest` into `dir`, sealed with a valid checksum.
fn write_manifest(dir: &Path, mut manifest: Value) {
    manifest.as_object_mut().unwrap().remove("manifest_crc32");
    let body = serde_json::to_string_pretty(&manifest).unwrap();
    let text = format!("{{\n  \"manifest_crc32\": \"00000000\",{}", &body[1..]);
    std::fs::write(dir.join("manifest.json"), snapshot::seal_manifest(&text)).unwrap();
}

/// A copy of `src` called `name` whose manifest and state `edit` changed, the
/// state re-checksummed and the manifest re-sealed: a forgery that only the checks
/// after the checksums can catch.
fn forge(src: &Path, name: &str, edit: impl FnOnce(&Path, &mut Value, &mut Value)) -> PathBuf {
    let d = copy_of(src, name);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    let mut state: Value = serde_json::from_slice(&std::fs::read(d.join("state.json")).unwrap()).unwrap();
    edit(&d, &mut manifest, &mut state);
    let state = serde_json::to_vec(&state).unwrap();
    std::fs::write(d.join("state.json"), &state).unwrap();
    set_entry(&mut manifest, "state.json", &state);
    write_manifest(&d, manifest);
    d
}

#[test]
fn entries_the_manifest_does_not_list_are_refused_by_name() {
    let d = copy("unlisted");
    std::fs::write(d.join("notes.txt"), b"x").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", d.join("link")).unwrap();
    let needles = ["not listed in the manifest", "`notes.txt` (a regular file)", "`sub` (a directory)"];
    assert_refused_alike(&d, &[needles.as_slice(), &["`link` (a symbolic link)"]].concat());
}

#[test]
fn a_symlinked_file_is_refused_and_never_followed() {
    for name in ["manifest.json", "state.json", "memory.img"] {
        // The link leads to the very bytes expected there: only following it passes.
        let d = copy(&format!("link-{name}"));
        let outside = d.with_file_name(format!("outside-{name}"));
        std::fs::rename(d.join(name), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, d.join(name)).unwrap();
        assert_refused_alike(&d, &[&format!("{name}: is a symbolic link, not a regular file")]);
    }
}

#[test]
fn a_disk_linked_to_a_host_file_is_refused_and_the_host_file_never_copied() {
    // The manifest, re-sealed, lists disk.raw with the size and CRC of the host
    // file it links to.
    let d = copy_of(disk_checkpoint(), "link-disk");
    let host = std::fs::read("/etc/hostname").unwrap();
    std::fs::remove_file(d.join("disk.raw")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", d.join("disk.raw")).unwrap();
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    set_entry(&mut manifest, "disk.raw", &host);
    write_manifest(&d, manifest);
    assert_refused_alike(&d, &["disk.raw: is a symbolic link, not a regular file"]);
}

#[test]
fn a_fifo_is_refused_without_hanging() {
    for name in ["manifest.json", "state.json", "memory.img"] {
        let d = copy(&format!("fifo-{name}"));
        std::fs::remove_file(d.join(name)).unwrap();
        let st = Command::new("mkfifo").arg(d.join(name)).status().unwrap();
        assert!(st.success());
        assert_refused_alike(&d, &[&format!("{name}: is a FIFO, not a regular file")]);
    }
}

#[test]
fn dev_zero_and_huge_files_are_refused_with_bounded_memory() {
    for name in ["manifest.json", "state.json"] {
        let d = copy(&format!("zero-{name}"));
        std::fs::remove_file(d.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join(name)).unwrap();
        assert_refused_alike(&d, &[&format!("{name}: is a symbolic link")]);
    }
    // A 3 GiB sparse manifest.
    let d = copy("huge-manifest");
    std::fs::OpenOptions::new().write(true).open(d.join("manifest.json")).unwrap().set_len(3 << 30).unwrap();
    assert_refused_alike(&d, &["manifest.json: 3221225472 bytes, more than the 1048576 bytes"]);
}

// Forged manifests and states (re-sealed): each is refused by `cevm verify`, not
// only by `cevm restore`, and by both in the same words.

#[test]
fn a_forged_memory_size_of_zero_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-mem0", |d, m, _| {
        m["guest"]["mem_size"] = 0.into();
        m["memory"]["regions"] = serde_json::json!([{ "guest_addr": 0, "size": 0 }]);
        for f in ["memory.img", "memory.chunks"] {
            std::fs::OpenOptions::new().write(true).open(d.join(f)).unwrap().set_len(0).unwrap();
            set_entry(m, f, b"");
        }
    });
    assert_refused_alike(&d, &["guest memory size 0 bytes"]);
}

#[test]
fn a_forged_guest_of_zero_vcpus_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-vcpus0", |_, m, s| {
        m["guest"]["vcpus"] = 0.into();
        s["vcpus"] = serde_json::json!([]);
    });
    assert_refused_alike(&d, &["0 vCPUs: between 1 and 64 are supported"]);
}

#[test]
fn a_forged_guest_of_65_vcpus_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-vcpus65", |_, m, s| {
        m["guest"]["vcpus"] = 65.into();
        let one = s["vcpus"][0].clone();
        s["vcpus"] = (0..65)
            .map(|i| {
                let mut v = one.clone();
                v["id"] = i.into();
                v
            })
            .collect();
    });
    assert_refused_alike(&d, &["65 vCPUs: between 1 and 64 are supported"]);
}

#[test]
fn a_forged_vcpu_of_100000_msrs_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-msrs", |_, _, s| {
        let msrs = s["vcpus"][0]["msrs"].as_array().unwrap().clone();
        s["vcpus"][0]["msrs"] = msrs.iter().cycle().take(100_000).cloned().collect();
    });
    assert_refused_alike(&d, &["vCPU 0: 100000 MSRs, a vCPU saves at most 256"]);
}

#[test]
fn a_forged_truncated_xsave_area_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-xsave", |_, _, s| {
        let xsave = s["vcpus"][0]["xsave"].as_array().unwrap().clone();
        assert_eq!(xsave.len(), 4096);
        s["vcpus"][0]["xsave"] = xsave[..1024].to_vec().into();
    });
    assert_refused_alike(&d, &["state.json", "kvm_xsave holds 1024 bytes, it must hold 4096"]);
}

#[test]
fn a_forged_state_without_its_serial_device_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-no-serial", |_, _, s| {
        s["devices"].as_object_mut().unwrap().remove("serial");
    });
    assert_refused_alike(&d, &["no section for device `serial`"]);
}

#[test]
fn a_forged_manifest_listing_a_file_twice_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-twice", |_, m, _| {
        let state = m["files"].as_array().unwrap().iter().find(|f| f["name"] == "state.json").unwrap().clone();
        m["files"].as_array_mut().unwrap().push(state);
    });
    assert_refused_alike(&d, &["lists `state.json` twice"]);
}

#[test]
fn a_forged_disk_without_its_image_is_refused_by_verify_as_by_restore() {
    let d = forge(good_checkpoint(), "forged-disk-no-file", |_, m, _| {
        m["guest"]["disk"] = serde_json::json!({ "path": "/nonexistent/disk.raw", "read_only": false });
    });
    assert_refused_alike(&d, &["the guest has a disk but the checkpoint holds no disk image"]);
}

#[test]
fn a_forged_disk_image_without_a_disk_is_refused_by_verify_as_by_restore() {
    let d = forge(disk_checkpoint(), "forged-file-no-disk", |_, m, _| {
        m["guest"]["disk"] = Value::Null;
    });
    assert_refused_alike(&d, &["the guest has no disk but the checkpoint holds disk.raw"]);
}

#[test]
fn a_refused_restore_of_a_guest_with_a_disk_leaves_nothing_and_the_next_one_works() {
    let d = copy_of(disk_checkpoint(), "refused-disk");
    // A damaged data page of memory.img: only its checksum, checked last, tells.
    let at = (4 << 20) + 4321;
    flip(&d.join("memory.img"), at);
    let out = cevm(&["restore", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let chunk = "memory.img: chunk 2 (bytes 0x400000..0x600000) does not match its checksum";
    assert!(text(&out.stderr).contains(chunk), "{}", text(&out.stderr));
    assert!(!restored_disk(&d).exists(), "the refused restore left {}", restored_disk(&d).display());
    let names: Vec<_> = std::fs::read_dir(d.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("refused-disk."))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
    // Repaired, it restores, runs to its end, and its disk is the checkpoint's.
    flip(&d.join("memory.img"), at);
    let mut restored = restore(&d, None);
    let digest = digest_to_end(&mut restored);
    let mut undisturbed = run_guest("digest", "mib=1 rounds=9", "16M", 1, None);
    assert_eq!(digest, digest_to_end(&mut undisturbed), "console: {:?}", restored.seen);
    let reference = std::fs::read(disk_checkpoint().with_file_name("disk.ref")).unwrap();
    assert_eq!(std::fs::read(restored_disk(&d)).unwrap(), reference);
}
