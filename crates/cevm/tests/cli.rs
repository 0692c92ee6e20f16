//! Bad command-line input: a clear message and exit code 2 (usage) or 1 (failure).

use std::process::Output;

use cevm_testkit::cevm;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let o = cevm(&["run", "--guest", "digest", "--frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unexpected argument '--frobnicate'"), "{}", stderr(&o));
}

#[test]
fn bad_memory_size_is_a_usage_error() {
    let o = cevm(&["run", "--guest", "digest", "--mem", "12Q"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("12Q") && e.contains("unknown size suffix"), "{e}");
}

#[test]
fn missing_api_socket_is_a_usage_error() {
    let o = cevm(&["checkpoint", "--api-sock", "/nonexistent/cevm.sock", "--out", "/tmp/x"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("/nonexistent/cevm.sock") && e.contains("cannot connect"), "{e}");
    let o = cevm(&["status", "--api-sock", "/nonexistent/cevm.sock"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn missing_required_flags_and_bad_values_are_usage_errors() {
    for args in [&["checkpoint", "--out", "/tmp/x"][..], &["run"], &["run", "--guest", "digest", "--vcpus", "0"]] {
        let o = cevm(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn unknown_guest_and_bad_memory_fail_clearly() {
    let o = cevm(&["run", "--guest", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown guest `nope` (built-in guests: digest, dirtier, hello)"), "{}", stderr(&o));
    let o = cevm(&["run", "--guest", "hello", "--mem", "1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("at least 8 MiB"), "{}", stderr(&o));
}

#[test]
fn guest_exit_status_becomes_the_exit_code() {
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello from cevm"));
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--guest-args", "code=9"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("guest exited with status 9"), "{}", stderr(&o));
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--guest-args", "crash=1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("triple fault"), "{}", stderr(&o));
}

#[test]
fn missing_or_bogus_kernels_are_clear_errors() {
    let o = cevm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("kernel /nonexistent/vmlinuz: No such file"), "{}", stderr(&o));
    // A file that is not a kernel: this test's own source.
    let me = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cli.rs");
    let o = cevm(&["run", "--kernel", me]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a bzImage"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    let o = cevm(&["run", "--initrd", "/x"]);
    assert_eq!(o.status.code(), Some(2), "--initrd needs --kernel: {}", stderr(&o));
}

#[test]
fn corrupt_and_missing_disk_images_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("cevm-test-baddisk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("corrupt.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xee; 4092]);
    std::fs::write(&bad, bytes).unwrap();
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--disk", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&format!("disk image {}", bad.display())), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    let o = cevm(&[
        "run",
        "--guest",
        "hello",
        "--mem",
        "16M",
        "--disk",
        "/nonexistent/base.qcow2",
        "--overlay",
        "/tmp/x.qcow2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/base.qcow2"), "{}", stderr(&o));
    let o = cevm(&["run", "--guest", "hello", "--overlay", "/tmp/x.qcow2"]);
    assert_eq!(o.status.code(), Some(2), "--overlay needs --disk: {}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
