//! Bad command-line input: a clear message and exit code 2 (usage) or 1
//! (failure), nothing created on disk; the paths given are kept absolute; the
//! output survives a reader that goes away; completions and the man page.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cevm::child::CevmChild;
use cevm_testkit::*;

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
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("'nope'") && stderr(&o).contains("digest, dirtier, hello"), "{}", stderr(&o));
    let o = cevm(&["run", "--guest", "hello", "--mem", "1M"]);
    assert_eq!(o.status.code(), Some(2));
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

/// Asserts `cevm ARGS` is refused as a bad command line (exit 2), with a message
/// holding every one of `says`, and without a panic.
fn refused(args: &[&str], says: &[&str]) {
    let o = cevm(args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    for s in says {
        assert!(e.contains(s), "{args:?}: the message should say `{s}`: {e}");
    }
    assert!(!e.contains("panicked"), "{args:?}: {e}");
}

/// A 1 MiB raw image to use as a base disk.
fn base_disk(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    base
}

#[test]
fn memory_sizes_the_vmm_cannot_use_are_refused_before_anything_is_created() {
    let dir = workdir("cli-mem");
    let base = base_disk(&dir);
    let (overlay, series) = (dir.join("top.qcow2"), dir.join("series"));
    for (mem, says) in [
        ("0", "at least 8 MiB"),
        ("1", "at least 8 MiB"),
        ("3M", "at least 8 MiB"),
        ("9M", "a multiple of 2 MiB"),
        ("4097M", "a multiple of 2 MiB"),
    ] {
        let quoted = format!("'{mem}'");
        #[rustfmt::skip]
        let args = [
            "run", "--guest", "hello", "--mem", mem,
            "--disk", base.to_str().unwrap(), "--overlay", overlay.to_str().unwrap(),
            "--checkpoint-every", "1m", "--checkpoint-dir", series.to_str().unwrap(),
        ];
        refused(&args, &[&quoted, says]);
        assert!(!overlay.exists() && !series.exists(), "--mem {mem}: a refused run created files");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// MemTotal + SwapTotal of this host, in bytes.
fn host_ram_and_swap() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |key: &str| -> u64 {
        let line = info.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (kib("MemTotal:") + kib("SwapTotal:")) << 10
}

#[test]
fn more_memory_than_the_host_has_is_refused() {
    // 1 TiB, or twice the host's RAM and swap on a host that has that much.
    let mem =
        if host_ram_and_swap() < 1 << 40 { "1T".to_string() } else { format!("{}G", (host_ram_and_swap() >> 29) + 2) };
    refused(&["run", "--guest", "hello", "--mem", &mem], &["--mem", "this host has", "--overcommit"]);
    // Asked for explicitly, a guest that touches little of its memory runs.
    let o = cevm(&["run", "--guest", "hello", "--mem", &mem, "--overcommit", "--memory-backend", "private"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn unknown_or_empty_guest_names_are_usage_errors_listing_the_guests() {
    refused(&["run", "--guest", "nonexistent"], &["'nonexistent'", "digest, dirtier, hello"]);
    refused(&["run", "--guest", ""], &["a value is required for '--guest", "digest, dirtier, hello"]);
}

#[test]
fn guest_arguments_a_guest_does_not_take_are_refused_naming_the_ones_it_takes() {
    refused(&["run", "--guest", "hello", "--mem", "16M", "--guest-args", "cod=3"], &["`cod`", "code", "crash"]);
    refused(&["run", "--guest", "hello", "--mem", "16M", "--guest-args", "code=three"], &["code=three", "number"]);
    refused(&["run", "--guest", "digest", "--mem", "16M", "--guest-args", "mib=1.5"], &["mib=1.5", "number"]);
    refused(&["run", "--guest", "digest", "--mem", "16M", "--guest-args", "mib=2 mib=3"], &["`mib`", "twice"]);
    refused(&["run", "--guest", "digest", "--mem", "16M", "--guest-args", "rounds"], &["`rounds`", "key=value"]);
    // What a guest's working set needs: 4 MiB for the VMM's own, then the set.
    refused(&["run", "--guest", "digest", "--mem", "16M", "--guest-args", "mib=16"], &["mib=16", "--mem 20M"]);
    refused(&["run", "--guest", "dirtier", "--mem", "16M", "--guest-args", "data=64"], &["data=64", "--mem 68M"]);
    // Well-formed arguments still run.
    let o = cevm(&["run", "--guest", "hello", "--mem", "16M", "--guest-args", " code=0  crash=0 "]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn bad_periodic_checkpoint_settings_are_usage_errors_that_create_nothing() {
    let dir = workdir("cli-periodic");
    let series = dir.join("series");
    let s = series.to_str().unwrap();
    let run = ["run", "--guest", "hello", "--mem", "16M"];
    refused(&[&run[..], &["--checkpoint-every", "0s", "--checkpoint-dir", s]].concat(), &["'0s'", "longer than zero"]);
    refused(
        &[&run[..], &["--checkpoint-every", "1m", "--checkpoint-dir", s, "--keep", "0"]].concat(),
        &["'0'", "--keep", "at least 1"],
    );
    assert!(!series.exists(), "a refused run created {}", series.display());
    let file = dir.join("a-file");
    std::fs::write(&file, b"precious").unwrap();
    let f = file.to_str().unwrap();
    refused(&[&run[..], &["--checkpoint-every", "1m", "--checkpoint-dir", f]].concat(), &[f, "not a directory"]);
    let under = file.join("series");
    let u = under.to_str().unwrap();
    refused(&[&run[..], &["--checkpoint-every", "1m", "--checkpoint-dir", u]].concat(), &[f, "not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn strategies_and_memory_backends_outside_their_lists_are_usage_errors_listing_them() {
    refused(
        &["checkpoint", "--api-sock", "/nonexistent/s", "--out", "/tmp/x", "--strategy", "fast"],
        &["'fast'", "stop-and-save, cevm"],
    );
    refused(&["run", "--guest", "hello", "--memory-backend", "huge"], &["'huge'", "shared, private"]);
}

/// A checkpoint of the built-in fixture (see restore_fixture.rs).
fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/main-f3e6526")
}

/// The writing end of a pipe whose reading end is already closed.
fn pipe_without_reader() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe() just opened both descriptors, and nothing else owns them.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    writer
}

#[test]
fn inspect_into_a_pipe_nobody_reads_ends_quietly() {
    let fixture = fixture();
    for _ in 0..5 {
        // The reader is gone before cevm writes anything: every write fails with EPIPE.
        let writer = pipe_without_reader();
        let o = Command::new(bin())
            .args(["inspect", fixture.to_str().unwrap(), "--json"])
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    // `cevm inspect DIR --json | head -1`, many times: whenever the reader goes.
    for _ in 0..20 {
        let mut child = Command::new(bin())
            .args(["inspect", fixture.to_str().unwrap(), "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert_eq!(first, "{\n");
        let o = child.wait_with_output().unwrap();
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
}

/// The subcommands `cevm --help` lists.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(cevm(&["--help"]).stdout).unwrap();
    let list = help.split("Commands:").nth(1).expect("cevm --help lists its commands");
    let names: Vec<String> = list
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.strip_prefix("  ").filter(|l| !l.starts_with(' '))?.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    for n in ["run", "checkpoint", "restore", "migrate", "completions", "man"] {
        assert!(names.iter().any(|x| x == n), "`{n}` missing from {names:?}");
    }
    names
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_subcommand() {
    let subs = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let o = cevm(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", stderr(&o));
        let script = String::from_utf8(o.stdout).unwrap();
        for s in &subs {
            assert!(script.contains(s.as_str()), "{shell} completions miss `{s}`");
        }
        // Possible values reach the completions too.
        assert!(script.contains("stop-and-save") && script.contains("dirtier"), "{shell}: no possible values");
    }
    // The bash script is valid bash.
    let dir = workdir("cli-completions");
    let script = dir.join("cevm.bash");
    std::fs::write(&script, cevm(&["completions", "bash"]).stdout).unwrap();
    let st = Command::new("bash").arg("-n").arg(&script).status().unwrap();
    assert!(st.success(), "bash -n refused the completions");
    refused(&["completions", "tcsh"], &["'tcsh'", "bash"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Renders a man page with groff; returns the text, asserting groff warned of nothing.
fn render_man(page: &[u8]) -> String {
    let mut groff = Command::new("groff")
        // -P-cbou: plain text, no overstriking for bold or underline.
        .args(["-man", "-Tutf8", "-ww", "-rLL=200n", "-P-cbou"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("groff renders the man page (apt-get install groff-base)");
    std::io::Write::write_all(&mut groff.stdin.take().unwrap(), page).unwrap();
    let o = groff.wait_with_output().unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "groff: {}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn the_man_pages_render_and_describe_every_subcommand_and_its_options() {
    let page = cevm(&["man"]);
    assert_eq!(page.status.code(), Some(0), "{}", stderr(&page));
    let text = render_man(&page.stdout);
    assert!(text.contains("cevm - A KVM VMM with live checkpoint/restart"), "{text}");
    assert!(text.contains("EXIT STATUS") && text.contains("a bad command line"), "{text}");
    let subs = subcommands();
    for s in &subs {
        assert!(text.contains(&format!("cevm-{s}(1)")), "cevm(1) does not name `{s}`:\n{text}");
    }
    // One page a subcommand, with its options.
    let dir = workdir("cli-man");
    let o = cevm(&["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for s in &subs {
        let page = std::fs::read(dir.join(format!("cevm-{s}.1"))).unwrap_or_else(|e| panic!("cevm-{s}.1: {e}"));
        let text = render_man(&page);
        assert!(text.contains(&format!("NAME\n       cevm-{s} - ")), "cevm-{s}(1):\n{text}");
        assert!(text.contains("EXIT STATUS"), "cevm-{s}(1):\n{text}");
    }
    let run = render_man(&std::fs::read(dir.join("cevm-run.1")).unwrap());
    for opt in ["--guest", "--guest-args", "--mem", "--checkpoint-every", "--vcpu-cpus", "digest", "private"] {
        assert!(run.contains(opt), "cevm-run(1) does not describe `{opt}`:\n{run}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn relative_disk_and_overlay_paths_survive_a_migration_to_a_vmm_in_another_directory() {
    let dir = workdir("cli-reldisk");
    base_disk(&dir);
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let (sock, dst_sock) = (dir.join("api.sock"), dir.join("dst.sock"));
    let to = format!("unix:{}", dst_sock.display());
    // The destination runs in another directory, where `top.qcow2` means nothing.
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--incoming", &to]).current_dir(&elsewhere);
    let mut dst = CevmChild::spawn_cmd(cmd, None).unwrap();
    let mut cmd = Command::new(bin());
    #[rustfmt::skip]
    cmd.args([
        "run", "--guest", "digest", "--guest-args", "mib=1 rounds=6", "--mem", "32M",
        "--disk", "base.raw", "--overlay", "top.qcow2", "--api-sock", "api.sock",
    ])
    .current_dir(&dir);
    let mut src = CevmChild::spawn_cmd(cmd, None).unwrap();
    src.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
    wait_for_file(&dst_sock);
    let report = cevm(&["migrate", "--api-sock", sock.to_str().unwrap(), "--to", &to]);
    assert_eq!(report.status.code(), Some(0), "{}", stderr(&report));
    assert!(src.finish(T).expect("source did not exit").success());
    let want = digest_to_end(&mut run_guest("digest", "mib=1 rounds=6", "32M", 1, None));
    assert_eq!(digest_to_end(&mut dst), want, "console: {:?}", dst.seen);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vcpu_cpus_place_vcpu_i_on_the_i_th_cpu_as_written() {
    let dir = workdir("cli-vcpu-cpus");
    let sock = dir.join("api.sock");
    #[rustfmt::skip]
    let a = [
        "run", "--guest", "digest", "--guest-args", "mib=1 rounds=6", "--mem", "32M", "--vcpus", "2",
        "--vcpu-cpus", "1,0", "--api-sock", sock.to_str().unwrap(),
    ];
    let mut vm = CevmChild::spawn(bin(), &a, None).unwrap();
    vm.wait_line(T, |l| l == "round 2/6").expect("guest never reached round 2");
    // The migration report reads the source vCPUs' placement back.
    let o = cevm(&["migrate", "--api-sock", sock.to_str().unwrap(), "--to", "local"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["placement"]["source_vcpus"], serde_json::json!([[1], [0]]), "{report}");
    digest_to_end(&mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_placement_flags_reach_the_vmm() {
    let dir = workdir("cli-ckpt-cpus");
    let sock = dir.join("api.sock");
    // A guest that outlasts every request below however busy the machine is
    // (with 6 and then 24 rounds it once ended before the last checkpoint on
    // a loaded CI machine: HTTP 503); it is made to quit at the end.
    let mut vm = run_guest("digest", "mib=1 rounds=100000", "32M", 1, Some(&sock));
    vm.wait_line(T, |l| l == "round 2/100000").expect("guest never reached round 2");
    let s = sock.to_str().unwrap();
    let out = dir.join("ckpt");
    let o = out.to_str().unwrap();
    let ckpt = ["checkpoint", "--api-sock", s, "--out", o];
    // Placement is for the cevm strategy: a stop-and-save with it is this command line's mistake.
    refused(&[&ckpt[..], &["--writer-cpus", "1"]].concat(), &["cevm strategy"]);
    // A CPU the host does not have: the VMM refuses to place its thread there,
    // naming the flag, so the flag reached it.
    for flag in ["--writer-cpus", "--migration-cpus"] {
        let r = cevm(&[&ckpt[..], &["--strategy", "cevm", flag, "1000"]].concat());
        let what = flag.trim_start_matches("--").replace('-', "_");
        assert_eq!(r.status.code(), Some(1), "{flag}: {}", stderr(&r));
        assert!(stderr(&r).contains("1000"), "{flag}: {}", stderr(&r));
        assert!(stderr(&r).contains(&what) || stderr(&r).contains("place"), "{flag}: {}", stderr(&r));
    }
    let r = cevm(&[&ckpt[..], &["--strategy", "cevm", "--writer-cpus", "1", "--migration-cpus", "0"]].concat());
    assert_eq!(r.status.code(), Some(0), "{}", stderr(&r));
    verify_ok(&out);
    // It still runs after the checkpoints, refused or taken.
    let seen = vm.seen.len();
    vm.wait_line(T, |l| l.starts_with("round ")).expect("the guest runs on");
    assert!(vm.seen.len() > seen);
    quit(&sock, &mut vm);
    let _ = std::fs::remove_dir_all(&dir);
}
