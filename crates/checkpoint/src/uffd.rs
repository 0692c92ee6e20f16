//! The few userfaultfd calls a lazy restore makes (linux/userfaultfd.h).
//!
//! Written by hand rather than taken from the `userfaultfd` crate: its
//! `userfaultfd-sys` generates its bindings with bindgen at build time, which
//! needs libclang on every machine that builds cevm, for five ioctls whose
//! numbers and structures are a fixed kernel ABI (checked here against the
//! C header's values: `UFFDIO_API` = 0xc018aa3f, `UFFDIO_COPY` = 0xc028aa03...).

use std::fs::File;
use std::io::{Error, ErrorKind, Read, Result};
use std::os::fd::{AsRawFd, FromRawFd};

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;
/// `_IOWR(UFFDIO, nr, size)` and `_IOR(UFFDIO, nr, size)`.
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (UFFDIO << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `uffd_msg.event` of a page fault.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// A userfaultfd, non-blocking: page faults in the ranges registered with it
/// wait until they are resolved through it.
pub struct Uffd(File);

impl Uffd {
    /// A new userfaultfd that also takes faults the kernel makes on the
    /// process's behalf (KVM reading guest memory for a vCPU), which needs
    /// CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd = 1`.
    pub fn new() -> Result<Uffd> {
        // SAFETY: a system call that takes flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let u = Uffd(unsafe { File::from_raw_fd(fd as i32) });
        let mut api = Api { api: UFFD_API, features: 0, ioctls: 0 };
        u.ioctl(UFFDIO_API, &mut api)?;
        Ok(u)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> Result<()> {
        // SAFETY: `request` is one of the requests above, whose argument is
        // the `#[repr(C)]` structure `T` it is called with, valid for the call.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, arg as *mut T) };
        if r < 0 {
            return Err(Error::last_os_error());
        }
        Ok(())
    }

    /// Faults on missing pages of `[start, start + len)` go to this
    /// descriptor. Returns the ioctls the kernel offers on that range (a mask
    /// of `1 << _UFFDIO_*`; see [`can_copy_and_zero`]).
    pub fn register(&self, start: usize, len: u64) -> Result<u64> {
        let mut r =
            Register { range: Range { start: start as u64, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        self.ioctl(UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Faults there are the kernel's again (it wakes any still waiting).
    pub fn unregister(&self, start: usize, len: u64) -> Result<()> {
        let mut r = Range { start: start as u64, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Fills the missing pages `[dst, dst + src.len())` with `src` and wakes
    /// what waits on them. Returns the bytes filled and, if it stopped short,
    /// why: `EAGAIN` after a part (go on from there), `EEXIST` if the first
    /// page left is present already.
    pub fn copy(&self, dst: usize, src: &[u8]) -> (usize, Option<Error>) {
        let mut c = Copy { dst: dst as u64, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        match self.ioctl(UFFDIO_COPY, &mut c) {
            Ok(()) => (src.len(), None),
            Err(e) => (usize::try_from(c.copy).unwrap_or(0), Some(e)),
        }
    }

    /// Maps zero pages at `[dst, dst + len)` and wakes what waits on them.
    pub fn zero(&self, dst: usize, len: u64) -> Result<()> {
        let mut z = ZeroPage { range: Range { start: dst as u64, len }, mode: 0, zeropage: 0 };
        self.ioctl(UFFDIO_ZEROPAGE, &mut z)
    }

    /// Wakes what waits on `[start, start + len)` (the pages are present).
    pub fn wake(&self, start: usize, len: u64) -> Result<()> {
        let mut r = Range { start: start as u64, len };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// The address of the next page fault waiting, or `None` if none is.
    pub fn next_fault(&self) -> Result<Option<u64>> {
        // struct uffd_msg: event (u8), 7 reserved bytes, then for a page
        // fault: flags (u64), address (u64), thread id (u32) and padding.
        let mut msg = [0u8; 32];
        loop {
            match (&self.0).read(&mut msg) {
                Ok(32) if msg[0] == UFFD_EVENT_PAGEFAULT => {
                    return Ok(Some(u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes"))))
                }
                // No other event was asked for (features 0); skip anything else.
                Ok(32) => continue,
                Ok(n) => return Err(Error::new(ErrorKind::InvalidData, format!("a userfaultfd message of {n} bytes"))),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn raw_fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// Whether a range registered with these `ioctls` (from [`Uffd::register`])
/// can be filled by copies and zero pages.
pub fn can_copy_and_zero(ioctls: u64) -> bool {
    let need = (1 << 0x03) | (1 << 0x04);
    ioctls & need == need
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers are those of linux/userfaultfd.h (printed by a C
    /// program compiled against it on these machines).
    #[test]
    fn request_numbers_are_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(std::mem::size_of::<Copy>(), 40);
        assert_eq!(std::mem::size_of::<Register>(), 32);
    }

    /// A page of a registered mapping is filled on first touch by whoever
    /// serves the descriptor, and another is given zeros: what a lazy restore
    /// does, without KVM.
    #[test]
    fn a_touched_page_is_filled_by_the_server() {
        const PAGE: usize = 4096;
        // SAFETY: a fresh private anonymous mapping of two pages, ours alone.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let u = match Uffd::new() {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd: {e} (the tests run as root)"),
        };
        let at = base as usize;
        assert!(can_copy_and_zero(u.register(at, 2 * PAGE as u64).unwrap()));
        let reader = std::thread::spawn(move || {
            // SAFETY: both pages are mapped until the munmap below, after the join.
            unsafe { (*(at as *const u8).add(5), *(at as *const u8).add(PAGE + 5)) }
        });
        let mut served = 0;
        while served < 2 {
            let mut p = libc::pollfd { fd: u.raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd, valid for the call.
            assert!(unsafe { libc::poll(&mut p, 1, 10_000) } > 0, "no fault came");
            while let Some(addr) = u.next_fault().unwrap() {
                let page = addr as usize & !(PAGE - 1);
                if page == at {
                    assert_eq!(u.copy(page, &[7u8; PAGE]).0, PAGE);
                    // Present now: a second copy there is refused.
                    let (n, e) = u.copy(page, &[8u8; PAGE]);
                    assert_eq!((n, e.and_then(|e| e.raw_os_error())), (0, Some(libc::EEXIST)));
                } else {
                    u.zero(page, PAGE as u64).unwrap();
                }
                served += 1;
            }
        }
        assert_eq!(reader.join().unwrap(), (7, 0));
        u.unregister(at, 2 * PAGE as u64).unwrap();
        // SAFETY: the mapping made above; nothing uses it any more.
        unsafe { libc::munmap(base, 2 * PAGE) };
    }
}
