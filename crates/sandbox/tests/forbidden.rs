//! What a confined process may and may not do, seen from outside: each case
//! runs in a child process (this test binary again, told by an environment
//! variable which case to play), and the parent reads its exit status and stderr.

use std::process::Command;

const CASE: &str = "SANDBOX_TEST_CASE";

/// Runs `case` in a child and returns (exit code, stderr).
fn child(case: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "play_the_case_named_in_the_environment", "--nocapture", "--test-threads=1"])
        .env(CASE, case)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The child's side: does what `SANDBOX_TEST_CASE` says (nothing without it).
#[test]
fn play_the_case_named_in_the_environment() {
    let Ok(case) = std::env::var(CASE) else { return };
    let parent = std::os::unix::process::parent_id() as i32;
    sandbox::enable().unwrap();
    match case.as_str() {
        // A VMM thread may open files and make threads...
        "vmm-files-and-threads" => {
            let f = std::fs::File::open("/proc/self/status").unwrap();
            drop(f);
            std::thread::Builder::new().name("worker".into()).spawn(|| 7).unwrap().join().unwrap();
            std::process::exit(0);
        }
        // ...and fork one process, a copy-on-write checkpoint's writer, which
        // runs on under the same filter...
        "vmm-fork" => {
            // SAFETY: the child only exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(7) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just made.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            std::process::exit(if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7 { 0 } else { 1 });
        }
        // ...which cannot start a program either...
        "fork-exec" => {
            // SAFETY: the child only tries execv, then exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: a valid path and argument vector.
                unsafe { libc::execv(c"/bin/true".as_ptr(), [c"true".as_ptr(), std::ptr::null()].as_ptr()) };
                // SAFETY: ends the child.
                unsafe { libc::_exit(1) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just made.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            std::process::exit(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 });
        }
        // ...while no other kind of thread makes a process.
        "vcpu-fork" => {
            std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(|| {
                    sandbox::confine(sandbox::Kind::Vcpu).unwrap();
                    // SAFETY: the child, if the call were let through, only exits.
                    if unsafe { libc::fork() } == 0 {
                        // SAFETY: ends the child at once.
                        unsafe { libc::_exit(0) };
                    }
                    panic!("fork on a vCPU thread was not stopped");
                })
                .unwrap()
                .join()
                .unwrap();
        }
        // ...nor start a program.
        "vmm-exec" => {
            let e = Command::new("/bin/true").status();
            panic!("spawning a process was not stopped: {e:?}");
        }
        // A vCPU thread may not open a socket.
        "vcpu-socket" => {
            std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(|| {
                    sandbox::confine(sandbox::Kind::Vcpu).unwrap();
                    let s = std::net::UdpSocket::bind("127.0.0.1:0");
                    panic!("a socket on a vCPU thread was not stopped: {s:?}");
                })
                .unwrap()
                .join()
                .unwrap();
        }
        // An API thread cannot open files: the call fails with EACCES.
        "api-open" => {
            let e = std::thread::Builder::new()
                .name("api".into())
                .spawn(|| {
                    sandbox::confine(sandbox::Kind::Api).unwrap();
                    std::fs::File::open("/etc/hostname").unwrap_err().raw_os_error()
                })
                .unwrap()
                .join()
                .unwrap();
            std::process::exit(if e == Some(libc::EACCES) { 0 } else { 1 });
        }
        // A VMM thread may ask whether a process lives (signal 0)...
        "vmm-probe-process" => {
            // SAFETY: signal 0 sends nothing.
            let alive = unsafe { libc::kill(parent, 0) };
            std::process::exit(if alive == 0 { 0 } else { 1 });
        }
        // ...but not signal one.
        "vmm-signal-process" => {
            // SAFETY: SIGCONT to the parent (the test), harmless if let through.
            unsafe { libc::kill(parent, libc::SIGCONT) };
            panic!("a signal to another process was not stopped");
        }
        // A NIC's thread may set a tap's offloads (here on a file that is
        // no tap: the call is let through and fails)...
        "net-offload" => {
            let e = net_thread(libc::TUNSETOFFLOAD);
            std::process::exit(if e == libc::ENOTTY || e == libc::EINVAL || e == libc::EBADFD { 0 } else { e });
        }
        // ...and make no other ioctl.
        "net-other-ioctl" => {
            net_thread(libc::FIONBIO);
            panic!("FIONBIO on a NIC's thread was not stopped");
        }
        other => panic!("unknown case {other}"),
    }
}

/// Makes ioctl `request` (argument 0) on /dev/null from a thread named `net0`
/// confined as a NIC's I/O thread; returns its errno.
fn net_thread(request: libc::c_ulong) -> i32 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open("/dev/null").unwrap();
    std::thread::Builder::new()
        .name("net0".into())
        .spawn(move || {
            sandbox::confine(sandbox::Kind::Net).unwrap();
            // SAFETY: both requests take their argument by value (0 here), on a file we own.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), request, 0 as libc::c_ulong) };
            if r < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            }
        })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn a_nic_thread_sets_tap_offloads_and_makes_no_other_ioctl() {
    let (code, err) = child("net-offload");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = child("net-other-ioctl");
    assert_eq!(code, Some(sandbox::EXIT_FORBIDDEN), "{err}");
    assert!(err.contains("thread `net0` made the forbidden system call `ioctl` (16)"), "{err}");
}

#[test]
fn a_vmm_thread_opens_files_and_makes_threads() {
    let (code, err) = child("vmm-files-and-threads");
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_vmm_thread_forks_a_writer_that_cannot_start_a_program() {
    let (code, err) = child("vmm-fork");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = child("fork-exec");
    assert_eq!(code, Some(sandbox::EXIT_FORBIDDEN), "{err}");
    assert!(err.contains("made the forbidden system call `execve` (59)"), "{err}");
}

#[test]
fn making_a_process_on_a_vcpu_thread_ends_the_vmm_naming_the_call() {
    let (code, err) = child("vcpu-fork");
    assert_eq!(code, Some(sandbox::EXIT_FORBIDDEN), "{err}");
    assert!(err.contains("thread `vcpu0` made the forbidden system call `clone` (56)"), "{err}");
}

#[test]
fn starting_a_program_ends_the_vmm() {
    // posix_spawn blocks every signal around its clone, so the kernel cannot
    // run the handler and ends the process with SIGSYS itself ("Bad system call").
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "play_the_case_named_in_the_environment", "--nocapture", "--test-threads=1"])
        .env(CASE, "vmm-exec")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?} {err}", out.status);
    assert!(!err.contains("not stopped"), "{err}");
}

#[test]
fn a_socket_on_a_vcpu_thread_ends_the_vmm_naming_the_thread_and_the_call() {
    let (code, err) = child("vcpu-socket");
    assert_eq!(code, Some(sandbox::EXIT_FORBIDDEN), "{err}");
    assert!(err.contains("thread `vcpu0` made the forbidden system call `socket` (41)"), "{err}");
}

#[test]
fn an_api_thread_cannot_open_files() {
    let (code, err) = child("api-open");
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_vmm_thread_may_ask_whether_a_process_lives_but_not_signal_it() {
    let (code, err) = child("vmm-probe-process");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = child("vmm-signal-process");
    assert_eq!(code, Some(sandbox::EXIT_FORBIDDEN), "{err}");
    assert!(err.contains("made the forbidden system call `kill` (62)"), "{err}");
}
