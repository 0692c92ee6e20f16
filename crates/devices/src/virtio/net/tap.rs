//! A host tap interface, opened by name, that carries the virtio-net header
//! in front of every frame (`IFF_VNET_HDR`), so that checksum and segmentation
//! offloads pass between the guest and the host kernel untouched.
//!
//! Written here rather than taken from a tap crate: the ones on crates.io
//! (`tun-rs`, `tun-tap`) create interfaces and, with offloads, split and merge
//! segments themselves; a VMM needs the opposite: attach to an interface the
//! operator made, refuse one that does not exist (`TUNSETIFF` would create
//! it), hand the 12-byte header through as the guest wrote it and enable
//! exactly the offloads the guest's driver accepted. That is four ioctls.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of the virtio-net header in front of every frame (virtio 1.2 §5.1.6,
/// `struct virtio_net_hdr` with `num_buffers`, as every VERSION_1 driver uses).
pub const VNET_HDR_LEN: usize = 12;

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("`{0}` is not a valid interface name (1 to 15 characters, no '/', ':' or whitespace)")]
    BadName(String),
    #[error("tap `{0}` does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    Missing(String),
    #[error("`{0}` is a network interface but not a tap")]
    NotATap(String),
    #[error("tap `{0}` is in use by another process")]
    Busy(String),
    #[error(
        "cevm may not open tap `{name}`: {source} (run as root, or create the tap with `ip tuntap add dev {name} mode tap user USER`)"
    )]
    Denied { name: String, source: io::Error },
    #[error("tap `{name}`: {what}: {source}")]
    Io { name: String, what: &'static str, source: io::Error },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The offloads set last (see [`Tap::set_offload`]).
    offload: std::cell::Cell<Option<u32>>,
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags (the rest of
/// the kernel's union is padding here).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Whether `name` can name a network interface (what the kernel's
/// `dev_valid_name` accepts).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Checks that `name` can name an interface.
pub fn check_name(name: &str) -> Result<(), TapError> {
    if !valid_name(name) {
        return Err(TapError::BadName(name.into()));
    }
    Ok(())
}

/// Checks that `name` is an existing tap interface, without opening it: what a
/// command line is checked against before anything else happens.
pub fn check_exists(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    let sys = std::path::Path::new("/sys/class/net").join(name);
    if !sys.exists() {
        return Err(TapError::Missing(name.into()));
    }
    // Only tun/tap interfaces have `tun_flags`; IFF_TAP (2) tells a tap from a tun.
    let flags = std::fs::read_to_string(sys.join("tun_flags")).map_err(|_| TapError::NotATap(name.into()))?;
    let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    if flags & i64::from(libc::IFF_TAP) == 0 {
        return Err(TapError::NotATap(name.into()));
    }
    Ok(())
}

impl Tap {
    /// Attaches to the existing tap `name`, non-blocking, with the virtio-net
    /// header on every frame and no offload enabled yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_exists(name)?;
        let io = |what| move |source| TapError::Io { name: name.into(), what, source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| match source.kind() {
                io::ErrorKind::PermissionDenied => TapError::Denied { name: name.into(), source },
                _ => TapError::Io { name: name.into(), what: "opening /dev/net/tun", source },
            })?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is (name, flags, padding
        // to the kernel's size); the fd is the tun device we just opened.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Denied { name: name.into(), source },
                _ => TapError::Io { name: name.into(), what: "TUNSETIFF", source },
            });
        }
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(io("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        let tap = Tap { file, name: name.into(), offload: std::cell::Cell::new(None) };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads set last (`TUN_F_*`).
    pub fn offload(&self) -> Option<u32> {
        self.offload.get()
    }

    /// Enables the offloads `flags` (`TUN_F_*`) for frames the host sends the
    /// guest: what the guest's driver accepted (checksums left to it, TCP
    /// segments larger than the MTU).
    ///
    /// Flags already set are not set again: the ioctl takes the RTNL lock and
    /// recomputes the interface's features (and a bridge's), milliseconds
    /// nested.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        if self.offload.get() == Some(flags) {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(TapError::Io {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        self.offload.set(Some(flags));
        Ok(())
    }

    /// Reads one frame (header first) into `buf`; `WouldBlock` when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        (&self.file).read(buf)
    }

    /// Writes one frame (header first).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        use std::io::Write;
        (&self.file).write(frame)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_are_refused_before_anything_is_opened() {
        for bad in ["", "a/b", "a:b", "a b", ".", "..", "sixteen-chars-xx"] {
            assert!(matches!(check_exists(bad), Err(TapError::BadName(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_interface_and_one_that_is_not_a_tap_are_told_apart() {
        let e = Tap::open("cevm-nosuch0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("ip tuntap add dev cevm-nosuch0 mode tap"), "{e}");
        let e = Tap::open("lo").unwrap_err();
        assert!(matches!(e, TapError::NotATap(_)), "{e}");
    }
}
