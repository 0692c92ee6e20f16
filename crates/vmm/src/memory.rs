//! Guest memory: where it lives (a shared memfd or private anonymous memory), how it
//! is split around the 32-bit hole, and how it is handed to KVM.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{HIGH_RAM_START, LOW_RAM_END, MIN_MEM_SIZE, PAGE_SIZE};
use crate::{Error, Result};

/// Where guest memory lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBackend {
    /// A memfd mapped shared: another instance or process can map the same pages.
    #[default]
    Shared,
    /// Private anonymous memory: a `fork()` of the VMM gets a copy-on-write view.
    Private,
}

impl std::str::FromStr for MemoryBackend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "shared" => Ok(MemoryBackend::Shared),
            "private" => Ok(MemoryBackend::Private),
            _ => Err(format!("unknown memory backend `{s}` (expected `shared` or `private`)")),
        }
    }
}

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub guest_addr: u64,
    pub size: u64,
}

/// The RAM ranges of a guest with `mem_size` bytes: up to LOW_RAM_END below 4 GiB,
/// the rest from 4 GiB on.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(LOW_RAM_END);
    let mut v = vec![RamRange { guest_addr: 0, size: low }];
    if mem_size > low {
        v.push(RamRange { guest_addr: HIGH_RAM_START, size: mem_size - low });
    }
    v
}

/// The guest's memory, mapped in this process.
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    backend: MemoryBackend,
    ranges: Vec<RamRange>,
}

impl GuestMemory {
    /// Allocates `mem_size` bytes of zeroed guest memory.
    pub fn new(mem_size: u64, backend: MemoryBackend) -> Result<Self> {
        if mem_size < MIN_MEM_SIZE || mem_size % (2 << 20) != 0 {
            return Err(Error::MemorySize(mem_size));
        }
        let ranges = ram_ranges(mem_size);
        let mem = match backend {
            MemoryBackend::Shared => {
                let file = memfd("cevm-guest-ram", mem_size)?;
                let mut offset = 0;
                let mut with_files = Vec::new();
                for r in &ranges {
                    let f = file.try_clone().map_err(|e| Error::Memory(format!("dup memfd: {e}")))?;
                    with_files.push((GuestAddress(r.guest_addr), r.size as usize, Some(FileOffset::new(f, offset))));
                    offset += r.size;
                }
                GuestMemoryMmap::from_ranges_with_files(with_files)
            }
            MemoryBackend::Private => {
                let plain: Vec<_> = ranges.iter().map(|r| (GuestAddress(r.guest_addr), r.size as usize)).collect();
                GuestMemoryMmap::from_ranges(&plain)
            }
        }
        .map_err(|e| Error::Memory(e.to_string()))?;
        if backend == MemoryBackend::Private {
            for region in mem.iter() {
                // Huge pages make a later fork() of the VMM (copy-on-write checkpoints) cheap.
                // SAFETY: the range is exactly a mapping that `mem` owns; madvise only sets a hint.
                unsafe {
                    libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_HUGEPAGE);
                }
            }
        }
        Ok(GuestMemory { mem, backend, ranges })
    }

    /// The vm-memory view, for loaders and devices.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Where the memory lives.
    pub fn backend(&self) -> MemoryBackend {
        self.backend
    }

    /// The RAM ranges, in address order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// Registers every range as a KVM memory slot (slot i = range i).
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping is owned by `self.mem`, which the instance keeps alive
            // as long as the VM exists, and the slots do not overlap.
            unsafe { vm.set_user_memory_region(r) }.map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }

    /// Each range as (guest address, bytes), for writing a checkpoint.
    ///
    /// # Safety
    /// The caller makes sure nothing writes guest memory while the slices live
    /// (every vCPU paused, no device doing DMA).
    pub unsafe fn slices(&self) -> Vec<(u64, &[u8])> {
        self.mem
            .iter()
            // SAFETY: the region maps `len` bytes at `as_ptr` for the lifetime of `self`;
            // the caller guarantees no concurrent writes.
            .map(|r| (r.start_addr().0, unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }))
            .collect()
    }

    /// Each range as (guest address, mutable bytes), for loading a checkpoint.
    ///
    /// # Safety
    /// The caller makes sure no vCPU runs and nothing else accesses guest memory while
    /// the slices live.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slices_mut(&self) -> Vec<(u64, &mut [u8])> {
        self.mem
            .iter()
            // SAFETY: as in `slices`; the regions are disjoint so the slices do not alias.
            .map(|r| (r.start_addr().0, unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) }))
            .collect()
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.size() / PAGE_SIZE
    }
}

/// Creates a memfd of `size` bytes.
fn memfd(name: &str, size: u64) -> Result<File> {
    let cname = std::ffi::CString::new(name).map_err(|e| Error::Memory(e.to_string()))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Memory(format!("memfd size {size}: {e}")))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![RamRange { guest_addr: 0, size: 64 << 20 }]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], RamRange { guest_addr: 0, size: LOW_RAM_END });
        assert_eq!(r[1], RamRange { guest_addr: HIGH_RAM_START, size: (4 << 30) - LOW_RAM_END });
    }

    #[test]
    fn both_backends_hold_bytes_and_reject_bad_sizes() {
        for b in [MemoryBackend::Shared, MemoryBackend::Private] {
            let m = GuestMemory::new(16 << 20, b).unwrap();
            m.mmap().write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
            // SAFETY: nothing else touches this memory in the test.
            let s = unsafe { m.slices() };
            assert_eq!(&s[0].1[0x1000..0x1004], &0xdead_beefu32.to_le_bytes());
            assert_eq!(m.pages(), 4096);
        }
        assert!(GuestMemory::new(1 << 20, MemoryBackend::Shared).is_err());
        assert!(GuestMemory::new((16 << 20) + 4096, MemoryBackend::Private).is_err());
    }
}
