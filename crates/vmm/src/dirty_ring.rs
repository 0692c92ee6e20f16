//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`), the alternative to the dirty
//! bitmap log: each vCPU pushes every page it dirties (in slots that log dirty
//! pages) onto a ring shared with the VMM; the VMM collects the entries, marks
//! them for reset, and `KVM_RESET_DIRTY_RINGS` gives them back to KVM. A vCPU
//! whose ring is full exits with `KVM_EXIT_DIRTY_RING_FULL` until the VMM
//! collects it.
//!
//! kvm-ioctls 0.25 enables the capability but neither maps the rings nor resets
//! them, so those two steps are written here.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::{Error, Result};

/// The exit reason of a vCPU whose ring is full.
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entry flags (include/uapi/linux/kvm.h): pushed by KVM, collected by the VMM.
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// Enables rings of `entries` entries per vCPU on `vm`; must come before any
/// vCPU is created. `entries` is a power of two within what KVM allows.
pub fn enable(kvm: &Kvm, vm: &VmFd, entries: u32) -> Result<()> {
    let max_bytes = kvm.check_extension_int(Cap::DirtyLogRing);
    if max_bytes <= 0 {
        return Err(Error::Config("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)".into()));
    }
    let bytes = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    if !entries.is_power_of_two() || bytes > max_bytes as u64 {
        return Err(Error::Config(format!(
            "dirty ring of {entries} entries: a power of two up to {} is allowed here",
            max_bytes as u64 / std::mem::size_of::<kvm_dirty_gfn>() as u64
        )));
    }
    let mut cap = kvm_enable_cap { cap: KVM_CAP_DIRTY_LOG_RING, ..Default::default() };
    cap.args[0] = bytes;
    vm.enable_cap(&cap).map_err(|e| Error::Kvm("KVM_ENABLE_CAP(DIRTY_LOG_RING)", e))
}

/// Hands every collected entry back to KVM (and lets vCPUs stopped on a full ring go on).
pub fn reset(vm: &VmFd) -> Result<()> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only KVM's own
    // rings, which this VM's vCPUs own.
    let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        return Err(Error::Kvm("KVM_RESET_DIRTY_RINGS", kvm_ioctls::Error::last()));
    }
    Ok(())
}

/// One vCPU's ring, mapped from its fd.
pub struct DirtyRing {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    /// Next entry to look at (KVM fills them in order, wrapping).
    next: u32,
}

// SAFETY: the mapping belongs to this struct alone on the VMM side (KVM writes
// the entries, synchronised through the flags word), so it may move threads.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu` (`entries` as given to [`enable`]).
    pub fn map(vcpu: &VcpuFd, entries: u32) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of the vCPU fd at KVM's documented ring
        // offset; its length is the ring size the VM was given. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Memory(format!("mapping the dirty ring: {}", std::io::Error::last_os_error())));
        }
        Ok(DirtyRing { gfns: p.cast(), entries, next: 0 })
    }

    /// Collects every entry KVM pushed since the last call: calls `page(slot,
    /// page index in the slot)` for each and marks it for reset. Returns how many.
    pub fn collect(&mut self, mut page: impl FnMut(u32, u64)) -> u64 {
        let mut n = 0;
        loop {
            let i = (self.next % self.entries) as usize;
            // SAFETY: `i < entries`, inside the mapping; `flags` is a u32 KVM and we
            // both access atomically (KVM publishes an entry by setting DIRTY
            // after writing slot and offset, with release semantics).
            let (flags, e) = unsafe {
                let e = self.gfns.add(i);
                (&*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32), e)
            };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return n;
            }
            // SAFETY: as above; the entry is published, KVM does not touch it until reset.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            page(slot & 0xffff, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.gfns.cast(), len) };
    }
}
