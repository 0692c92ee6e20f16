//! cevm's seccomp filters: one allowlist per kind of thread, as Firecracker and
//! Cloud Hypervisor install them, built with rust-vmm's `seccompiler`.
//!
//! A VMM process (`cevm run`, `cevm restore`, `cevm run --incoming`) calls
//! [`enable`] first thing: its main thread gets the [`Kind::Vmm`] filter, which
//! every thread created afterwards inherits. The threads most exposed to the
//! outside then narrow it further with [`confine`]: each vCPU thread (the guest
//! drives it) to [`Kind::Vcpu`], each API thread (clients drive it) to
//! [`Kind::Api`], each NIC's I/O thread (the guest and the network drive it)
//! to [`Kind::Net`], the remote control relay's threads (`--control`: the
//! network drives them) to [`Kind::Control`]. Filters stack in the kernel: a thread can only ever lose
//! system calls.
//!
//! A call outside a thread's list raises `SIGSYS`; the handler installed by
//! [`enable`] prints which thread made which call and ends the VMM with exit
//! status [`EXIT_FORBIDDEN`]. Two calls are answered with an error instead,
//! because the C library probes them and copes: `clone3` (`ENOSYS`: glibc
//! then creates threads with `clone`, whose flags a filter can check, so the
//! VMM can make threads, and no process but the one `fork` it allows) and, on vCPU and API threads,
//! `openat` (`EACCES`: glibc's malloc reads `/sys/devices/system/cpu/online`
//! once per thread and falls back when it cannot; those threads never open
//! files otherwise).
//!
//! The lists were taken from `strace -f` of the whole direct-path test suite
//! per thread name, then widened on the VMM list to whole families (every
//! file and socket call cevm's code paths could make), so that what the
//! filters take away is what a VMM never needs: new programs (`execve`), new
//! processes but the copy-on-write checkpoint's writer (a plain `fork`, the
//! `clone` flags glibc's `fork` uses, from a VMM thread only), other processes (`ptrace`, `process_vm_*`, `kill`
//! with a signal: `kill(pid, 0)`, which only asks whether a process lives, is
//! let through),
//! the system (`mount`, `reboot`, modules, `bpf`, `perf_event_open`, keys,
//! namespaces).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use syscalls::Sysno;

/// Exit status of a VMM that made a forbidden system call: 128 + SIGSYS, what
/// a shell shows for a process killed by that signal.
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

/// The kinds of threads, each with its own list of allowed calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread and the VMM's workers (migration, checkpoint writer,
    /// disk hand-over, events): files, sockets, KVM, threads.
    Vmm,
    /// A vCPU thread: KVM's ioctls, memory, writes to its eventfds and the
    /// console, and I/O on the disk images already open.
    Vcpu,
    /// An API thread: accepted connections only.
    Api,
    /// A NIC's I/O thread: waits on its tap and eventfds, reads and writes
    /// frames on the tap it was given.
    Net,
    /// The remote control relay's threads (`cevm run --control`): accepted
    /// TCP connections, and a connection to the VMM's own API socket for
    /// each authenticated request.
    Control,
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter for {kind:?} threads: {source}")]
    Filter { kind: Kind, source: seccompiler::Error },
    #[error("seccomp filter for {kind:?} threads: {source}")]
    Build { kind: Kind, source: seccompiler::BackendError },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether [`enable`] ran in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Confines this process: installs the SIGSYS handler and the [`Kind::Vmm`]
/// filter on the calling thread (call it before creating any thread, so every
/// thread inherits it), and makes [`confine`] install thread filters from now on.
pub fn enable() -> Result<(), Error> {
    install_handler()?;
    apply(Kind::Vmm)?;
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Narrows the calling thread to `kind`'s list, if [`enable`] ran in this
/// process (a library user of the VMM crates, such as the benchmarks, runs
/// unconfined).
pub fn confine(kind: Kind) -> Result<(), Error> {
    if enabled() {
        apply(kind)?;
    }
    Ok(())
}

/// Installs `kind`'s filters on the calling thread.
fn apply(kind: Kind) -> Result<(), Error> {
    for program in programs(kind)? {
        seccompiler::apply_filter(&program).map_err(|source| Error::Filter { kind, source })?;
    }
    Ok(())
}

/// The BPF programs of `kind`: the allowlist (trap on anything else) and the
/// calls answered with an error number (allowed by the list, so the error wins).
pub fn programs(kind: Kind) -> Result<Vec<BpfProgram>, Error> {
    let build = |rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch, matched| {
        let filter = SeccompFilter::new(rules, mismatch, matched, std::env::consts::ARCH.try_into().expect("x86_64"))
            .map_err(|source| Error::Build { kind, source })?;
        BpfProgram::try_from(filter).map_err(|source| Error::Build { kind, source })
    };
    let mut out = vec![build(allowlist(kind), SeccompAction::Trap, SeccompAction::Allow)?];
    out.push(build(only(&[Sysno::clone3]), SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))?);
    if kind != Kind::Vmm {
        out.push(build(only(&[Sysno::openat]), SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32))?);
    }
    Ok(out)
}

fn only(calls: &[Sysno]) -> BTreeMap<i64, Vec<SeccompRule>> {
    calls.iter().map(|s| (i64::from(s.id()), vec![])).collect()
}

/// A rule: argument `arg` (64 bits) compared with `value` by `op`.
fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).expect("argument index below 6");
    SeccompRule::new(vec![c]).expect("one condition")
}

/// Calls every thread makes: memory, its own life and signals, time, locks,
/// logging to stderr, and threads (`clone` with `CLONE_THREAD`; a VMM
/// thread may also fork the copy-on-write writer).
const COMMON: &[Sysno] = &[
    Sysno::mmap,
    Sysno::munmap,
    Sysno::mremap,
    Sysno::mprotect,
    Sysno::madvise,
    Sysno::brk,
    Sysno::futex,
    Sysno::exit,
    Sysno::exit_group,
    Sysno::rt_sigreturn,
    Sysno::rt_sigprocmask,
    Sysno::rt_sigaction,
    Sysno::sigaltstack,
    Sysno::set_robust_list,
    Sysno::rseq,
    Sysno::gettid,
    Sysno::getpid,
    Sysno::tgkill,
    Sysno::sched_yield,
    Sysno::sched_getaffinity,
    Sysno::prctl,
    Sysno::seccomp,
    Sysno::clock_gettime,
    Sysno::clock_nanosleep,
    Sysno::nanosleep,
    Sysno::getrandom,
    Sysno::restart_syscall,
    Sysno::close,
    Sysno::write,
    Sysno::writev,
    Sysno::clone3,
    Sysno::openat,
];

/// A vCPU thread's own calls besides [`COMMON`] (ioctls: KVM's only). cevm
/// serves a virtio-blk request on the vCPU thread that notified its queue
/// (crate `devices`), so these threads read, write and flush the disk images
/// the VMM opened for them (imago may also grow an image and stat it), and,
/// in a process-based CEVM checkpoint's disk hand-over, send the new
/// instance's requests for frozen clusters on the connection already open;
/// they still open nothing.
const VCPU: &[Sysno] = &[
    Sysno::read,
    Sysno::readv,
    Sysno::pread64,
    Sysno::preadv,
    Sysno::preadv2,
    Sysno::pwrite64,
    Sysno::pwritev,
    Sysno::pwritev2,
    Sysno::lseek,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::fallocate,
    Sysno::ftruncate,
    Sysno::fstat,
    Sysno::newfstatat,
    Sysno::statx,
    Sysno::sendto,
    Sysno::sendmsg,
];

/// An API thread's: its connections.
const API: &[Sysno] = &[
    Sysno::accept4,
    Sysno::accept,
    Sysno::read,
    Sysno::readv,
    Sysno::recvfrom,
    Sysno::recvmsg,
    Sysno::sendto,
    Sysno::sendmsg,
    Sysno::shutdown,
    Sysno::setsockopt,
    Sysno::getsockopt,
    Sysno::getsockname,
    Sysno::getpeername,
    Sysno::fcntl,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::epoll_pwait,
];

/// The remote control relay's: an API thread's, and a new unix socket
/// connected to the VMM's API for each request it forwards.
const CONTROL: &[Sysno] = &[Sysno::socket, Sysno::connect];

/// The VMM's: files and directories (checkpoints, disks, sockets), sockets
/// (migration, API), KVM, event file descriptors, CPU placement.
const NET: &[Sysno] = &[Sysno::read, Sysno::readv, Sysno::epoll_ctl, Sysno::epoll_wait, Sysno::epoll_pwait];

const VMM: &[Sysno] = &[
    // Files.
    Sysno::read,
    Sysno::pread64,
    Sysno::readv,
    Sysno::preadv,
    Sysno::preadv2,
    Sysno::pwrite64,
    Sysno::pwritev,
    Sysno::pwritev2,
    Sysno::lseek,
    Sysno::open,
    Sysno::fstat,
    Sysno::stat,
    Sysno::lstat,
    Sysno::newfstatat,
    Sysno::statx,
    Sysno::fstatfs,
    Sysno::statfs,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::sync_file_range,
    Sysno::fallocate,
    Sysno::ftruncate,
    Sysno::copy_file_range,
    Sysno::sendfile,
    Sysno::fadvise64,
    Sysno::getdents64,
    Sysno::mkdir,
    Sysno::mkdirat,
    Sysno::rmdir,
    Sysno::unlink,
    Sysno::unlinkat,
    Sysno::rename,
    Sysno::renameat,
    Sysno::renameat2,
    Sysno::link,
    Sysno::linkat,
    Sysno::symlink,
    Sysno::symlinkat,
    Sysno::readlink,
    Sysno::readlinkat,
    Sysno::chmod,
    Sysno::fchmod,
    Sysno::fchmodat,
    Sysno::umask,
    Sysno::access,
    Sysno::faccessat,
    Sysno::faccessat2,
    Sysno::getcwd,
    Sysno::flock,
    Sysno::fcntl,
    Sysno::dup,
    Sysno::dup2,
    Sysno::dup3,
    Sysno::pipe2,
    // A copy-on-write checkpoint's writer process: its end, and its check
    // that the VMM still lives.
    Sysno::wait4,
    Sysno::getppid,
    Sysno::close_range,
    Sysno::mincore,
    Sysno::msync,
    Sysno::memfd_create,
    Sysno::eventfd2,
    // A lazy restore's guest memory, filled as it is touched.
    Sysno::userfaultfd,
    Sysno::ioctl,
    // Sockets.
    Sysno::socket,
    Sysno::socketpair,
    Sysno::bind,
    Sysno::listen,
    Sysno::accept4,
    Sysno::accept,
    Sysno::connect,
    Sysno::getsockname,
    Sysno::getpeername,
    Sysno::setsockopt,
    Sysno::getsockopt,
    Sysno::sendto,
    Sysno::recvfrom,
    Sysno::sendmsg,
    Sysno::recvmsg,
    Sysno::shutdown,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::epoll_pwait,
    Sysno::timerfd_create,
    Sysno::timerfd_settime,
    // The process and its CPUs.
    Sysno::sched_setaffinity,
    Sysno::prlimit64,
    Sysno::getrusage,
    Sysno::uname,
    Sysno::sysinfo,
    Sysno::getuid,
    Sysno::geteuid,
    Sysno::getgid,
    Sysno::getegid,
    Sysno::set_tid_address,
    Sysno::arch_prctl,
    // The signals `--on-signal` takes, waited for by a thread of their own.
    Sysno::rt_sigtimedwait,
];

/// `_IOC_TYPE` of KVM's ioctls (`KVMIO`, linux/kvm.h), in bits 8-15 of the request.
const KVMIO: u64 = 0xAE;

fn allowlist(kind: Kind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let own: &[Sysno] = match kind {
        Kind::Vmm => VMM,
        Kind::Vcpu => VCPU,
        Kind::Api => API,
        Kind::Net => NET,
        Kind::Control => CONTROL,
    };
    // The relay's threads read and write connections as the API's do.
    let api: &[Sysno] = if kind == Kind::Control { API } else { &[] };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().chain(own).chain(api).map(|s| (i64::from(s.id()), vec![])).collect();
    // Threads, never processes (a thread shares the VM: CLONE_THREAD).
    rules.insert(
        i64::from(Sysno::clone.id()),
        vec![rule(0, SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64), libc::CLONE_THREAD as u64)],
    );
    match kind {
        // Whether a process still lives (`kill(pid, 0)`: a checkpoint series asks
        // whether the writer of a temporary directory it finds has ended), never a
        // signal sent to another process.
        //
        // A process: a copy-on-write checkpoint's writer, the VMM's own
        // `fork()` (glibc's `clone` flags for it exactly, so never a process
        // sharing memory, and never from a vCPU, API or NIC thread). It runs
        // cevm's code only, under this same filter: no `execve`.
        Kind::Vmm => {
            rules.insert(i64::from(Sysno::kill.id()), vec![rule(1, SeccompCmpOp::Eq, 0)]);
            let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
            rules.entry(i64::from(Sysno::clone.id())).or_default().push(rule(0, SeccompCmpOp::Eq, fork));
        }
        // The guest drives this thread: KVM's ioctls on its vCPU and VM, and the
        // one a NIC makes when the guest's driver starts it (the tap offloads the
        // driver accepted), nothing else.
        Kind::Vcpu => {
            rules.insert(
                i64::from(Sysno::ioctl.id()),
                vec![
                    rule(1, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8),
                    rule(1, SeccompCmpOp::Eq, libc::TUNSETOFFLOAD),
                ],
            );
        }
        // The offloads the guest accepted, set on a newly bound tap before
        // its first frame is read (see `devices::virtio::net::Net::set_tap`).
        Kind::Net => {
            rules.insert(i64::from(Sysno::ioctl.id()), vec![rule(1, SeccompCmpOp::Eq, libc::TUNSETOFFLOAD)]);
        }
        // Rust's std sets a socket's blocking mode with FIONBIO.
        Kind::Api | Kind::Control => {
            rules.insert(
                i64::from(Sysno::ioctl.id()),
                vec![rule(1, SeccompCmpOp::Eq, libc::FIONBIO), rule(1, SeccompCmpOp::Eq, libc::FIOCLEX)],
            );
        }
    }
    rules
}

/// Installs the SIGSYS handler that names a forbidden call.
fn install_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; we set the handler, flags and an empty mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is ours to initialise.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: installs a handler for SIGSYS only; `on_sigsys` is async-signal-safe.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64 (after signo,
/// errno, code and padding, then `_call_addr`): the libc crate does not expose
/// the field, so it is read by hand.
const SI_SYSCALL_OFFSET: usize = 24;

/// Writes "cevm: seccomp: thread `T` made the forbidden system call `NAME`
/// (N)" to stderr and ends the process. Only async-signal-safe calls: a stack
/// buffer, `prctl`, `write`, `_exit`.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for
    // SIGSYS from seccomp it holds the call's number at SI_SYSCALL_OFFSET.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
    let mut thread = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(16);
    let name = usize::try_from(nr).ok().and_then(Sysno::new).map_or("unknown", |s| s.name());
    let mut msg = Message::default();
    msg.push(b"cevm: seccomp: thread `");
    msg.push(&thread[..thread_len]);
    msg.push(b"` made the forbidden system call `");
    msg.push(name.as_bytes());
    msg.push(b"` (");
    msg.number(i64::from(nr));
    msg.push(b"); the VMM stops\n");
    // SAFETY: write to stderr from a buffer we own, then end the process at once
    // (no destructors, no locks: another thread may hold any of them).
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_FORBIDDEN);
    }
}

/// A fixed buffer for the handler's message (no allocation in a signal handler).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message { buf: [0; 256], len: 0 }
    }
}

impl Message {
    fn push(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_to_bpf() {
        for kind in [Kind::Vmm, Kind::Vcpu, Kind::Api, Kind::Net, Kind::Control] {
            let p = programs(kind).unwrap();
            assert!(p.len() >= 2, "{kind:?}");
            assert!(p.iter().all(|p| !p.is_empty()));
        }
    }

    #[test]
    fn the_message_spells_numbers() {
        let mut m = Message::default();
        for v in [0, 7, 59, -1, 1234567] {
            m.number(v);
            m.push(b" ");
        }
        assert_eq!(&m.buf[..m.len], b"0 7 59 -1 1234567 ");
    }
}
