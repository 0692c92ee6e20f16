//! Guest memory: where it lives (a shared memfd or private anonymous memory), how it
//! is split around the 32-bit hole, and how it is handed to KVM.

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd};

pub use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::layout::{HIGH_RAM_START, LOW_RAM_END, MEM_ALIGN, MIN_MEM_SIZE, PAGE_SIZE};

/// Where guest memory lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBackend {
    /// A memfd mapped shared: another instance or process can map the same pages.
    Shared,
    /// Private anonymous memory in transparent huge pages: a `fork()` of the VMM
    /// gets a copy-on-write view. The default, as in QEMU and Firecracker: it
    /// is what copy-on-write checkpoints need, and on a host whose shared
    /// memory gets no huge pages (`shmem_enabled` = never, as on the project's
    /// machines) it fills 2 MiB per fault instead of 4 KiB, which makes a
    /// migration's destination and a restore fill memory about 6x faster.
    #[default]
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

/// What [`GuestMemory::collapse_huge_pages`] did, in 2 MiB ranges whose
/// every page is mapped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Collapsed {
    /// In one huge page now (merged, or already).
    pub huge: usize,
    /// Left as they were (no free huge page, a page busy twice, a kernel
    /// without the call, ...).
    pub failed: usize,
    /// How long the whole pass took.
    pub took: std::time::Duration,
}

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub guest_addr: u64,
    pub size: u64,
}

/// Checks that a guest can have `mem_size` bytes of RAM: at least
/// [`MIN_MEM_SIZE`], in whole 2 MiB pages.
pub fn check_size(mem_size: u64) -> Result<()> {
    if mem_size < MIN_MEM_SIZE || mem_size % MEM_ALIGN != 0 {
        return Err(Error::MemorySize(mem_size));
    }
    Ok(())
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
    /// The memfd behind shared memory (range i at the sum of the sizes before it).
    memfd: Option<File>,
}

impl GuestMemory {
    /// Allocates `mem_size` bytes of zeroed guest memory.
    pub fn new(mem_size: u64, backend: MemoryBackend) -> Result<Self> {
        check_size(mem_size)?;
        let ranges = ram_ranges(mem_size);
        let mut memfd_file = None;
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
                memfd_file = Some(file);
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
        Ok(GuestMemory { mem, backend, ranges, memfd: memfd_file })
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
        self.set_slots(vm, 0)
    }

    /// Turns KVM's dirty page logging on or off for every slot (by setting each
    /// slot again with or without `KVM_MEM_LOG_DIRTY_PAGES`). Turning it on from off
    /// starts with a clean log: only writes from then on are reported. Setting
    /// it on again while on changes nothing (KVM keeps the log as it is).
    pub fn set_dirty_log(&self, vm: &VmFd, on: bool) -> Result<()> {
        self.set_slots(vm, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// The pages the guest wrote since the last call (or since logging started), one
    /// bitmap per range (bit i of word j = page 64 j + i of the range). KVM clears
    /// its log as it reports it.
    pub fn harvest_dirty_log(&self, vm: &VmFd) -> Result<Vec<Vec<u64>>> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                vm.get_dirty_log(slot as u32, region.len() as usize).map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))
            })
            .collect()
    }

    /// The pages the VMM itself wrote (devices, loaders) since the last call, one
    /// bitmap per range in the layout of [`harvest_dirty_log`](Self::harvest_dirty_log).
    pub fn harvest_vmm_writes(&self) -> Vec<Vec<u64>> {
        self.mem.iter().map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset()).collect()
    }

    fn set_slots(&self, vm: &VmFd, flags: u32) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
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

    /// Each range as (guest address, bytes), for writing the checkpoint of a
    /// paused instance. Memory the guest may be writing is read through
    /// [`mmap`](Self::mmap) and vm-memory's volatile accessors instead (a live
    /// migration's pre-copy does so).
    ///
    /// # Safety
    /// Nothing may write guest memory while the slices live: every vCPU of the
    /// instance paused, no device doing DMA, no other instance sharing the memory.
    pub unsafe fn slices(&self) -> Vec<(u64, &[u8])> {
        self.mem
            .iter()
            // SAFETY: the region maps `len` bytes at `as_ptr` for as long as `self`
            // lives, which bounds the slices' lifetime; the caller guarantees that
            // nothing writes them meanwhile, so a shared slice is sound.
            .map(|r| (r.start_addr().0, unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }))
            .collect()
    }

    /// Each range as (guest address, mutable bytes), for loading a checkpoint into
    /// an instance whose vCPUs have not started.
    ///
    /// # Safety
    /// Nothing else may read or write guest memory while the slices live: no vCPU
    /// started, no device processing requests, no other slice of this memory
    /// alive (from this or an earlier call).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slices_mut(&self) -> Vec<(u64, &mut [u8])> {
        self.mem
            .iter()
            // SAFETY: as in `slices`; the regions are disjoint, so the slices do not
            // alias one another, and the caller guarantees that nothing else
            // accesses the memory while they live.
            .map(|r| (r.start_addr().0, unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) }))
            .collect()
    }

    /// For each range, the byte ranges (relative to the range's start) that may hold
    /// data; everything else is known to read as zero. Shared memory asks its memfd
    /// (SEEK_DATA/SEEK_HOLE): pages the guest never touched are holes there, and
    /// skipping them spares reading (and allocating) them. Private memory asks
    /// this process's page tables (/proc/self/pagemap): a page never touched is
    /// neither present nor swapped out. Where the kernel cannot tell: all of it.
    pub fn data_extents(&self) -> Vec<Vec<Range<u64>>> {
        let mut file_off = 0;
        self.ranges
            .iter()
            .zip(self.mem.iter())
            .map(|(r, region)| {
                let whole = vec![Range { start: 0, end: r.size }];
                let extents = match &self.memfd {
                    Some(f) => file_extents(f, file_off, r.size).unwrap_or(whole),
                    None => mapped_extents(region.as_ptr() as u64, r.size).unwrap_or(whole),
                };
                file_off += r.size;
                extents
            })
            .collect()
    }

    /// Merges private guest memory that copy-on-write left in 4 KiB pages back
    /// into huge pages.
    ///
    /// After a `fork()` (a cow checkpoint), each huge page the guest writes
    /// while the child lives is split: the kernel copies the 4 KiB page written
    /// and maps the rest of that 2 MiB page by 4 KiB entries. Those entries stay
    /// once the child is gone, and the next fork copies every one of them (here:
    /// 0.4 ms for a fork of 1 GiB in huge pages, 1.5 ms after a 64 MiB working set
    /// was split). `MADV_COLLAPSE` (Linux 6.1) puts each such 2 MiB range back into
    /// one huge page at once instead of waiting for khugepaged, which scans a few
    /// MiB every 10 s. It changes no content: a guest writing meanwhile is safe.
    ///
    /// Only ranges whose every page is mapped (this process's page tables,
    /// `/proc/self/pagemap`), as a split huge page's are: the call ignores
    /// khugepaged's limit on empty entries and would fill a partly touched
    /// range with zeros, memory the guest never asked for. One call per
    /// 2 MiB: over a whole region the kernel gives up at the first range that
    /// fails for any but a few expected reasons (seen here: a call over all of
    /// a guest's memory returned after 3 ms and the next fork was as slow as
    /// without it), and the ranges after it stay split. A range busy for a
    /// moment (EAGAIN) is tried once more; one already in a huge page costs a
    /// page-table lookup.
    pub fn collapse_huge_pages(mem: &GuestMemoryMmap) -> Collapsed {
        const HUGE: u64 = 2 << 20;
        let t = std::time::Instant::now();
        let mut c = Collapsed::default();
        for region in mem.iter() {
            let start = region.as_ptr() as u64;
            let Ok(mapped) = mapped_extents(start, region.len()) else { continue };
            for e in mapped {
                let mut at = (start + e.start).next_multiple_of(HUGE);
                while at + HUGE <= start + e.end {
                    // SAFETY: the range lies inside a mapping that `mem` owns
                    // (and keeps mapped while it lives).
                    match unsafe { collapse_2mib(at) } {
                        Ok(()) => c.huge += 1,
                        Err(_) => c.failed += 1,
                    }
                    at += HUGE;
                }
            }
        }
        c.took = t.elapsed();
        c
    }

    /// Maps `extents` (as from [`data_extents`](Self::data_extents)) into this
    /// process's page tables in one call each (`MADV_POPULATE_READ`), instead of one
    /// page fault per page when a checkpoint reads them: faults cost ~8 µs each on
    /// the PVM machines, 2 s for 1 GiB. Best effort: older kernels lack the call and
    /// the pages then fault in as they are read.
    pub fn prefault(&self, extents: &[Vec<Range<u64>>]) {
        for (region, ext) in self.mem.iter().zip(extents) {
            for e in ext {
                if e.end > region.len() || e.start >= e.end {
                    continue;
                }
                // SAFETY: the range lies inside a mapping that `self.mem` owns;
                // MADV_POPULATE_READ only faults pages in, it changes no content.
                unsafe {
                    libc::madvise(
                        region.as_ptr().add(e.start as usize).cast(),
                        (e.end - e.start) as usize,
                        libc::MADV_POPULATE_READ,
                    );
                }
            }
        }
    }

    /// Each RAM range with where it is mapped in this process: (guest
    /// address, host address, size). For code that hands the mapping to the
    /// kernel by address (a userfaultfd that fills it on demand).
    pub fn host_ranges(&self) -> Vec<(u64, usize, u64)> {
        self.ranges
            .iter()
            .zip(self.mem.iter())
            .map(|(r, region)| (r.guest_addr, region.as_ptr() as usize, r.size))
            .collect()
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.size() / PAGE_SIZE
    }
}

/// Merges the 2 MiB range at address `at` into one huge page
/// (`MADV_COLLAPSE`), trying once more if it was busy for a moment (EAGAIN).
///
/// # Safety
/// `at..at + 2 MiB` lies inside a mapping that stays mapped during the call.
unsafe fn collapse_2mib(at: u64) -> std::io::Result<()> {
    let once = || {
        // SAFETY: the caller's; MADV_COLLAPSE changes no content.
        if unsafe { libc::madvise(at as *mut libc::c_void, 2 << 20, libc::MADV_COLLAPSE) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    once().or_else(|e| if e.raw_os_error() == Some(libc::EAGAIN) { once() } else { Err(e) })
}

/// Adds the pages of `from` to `into`: both are per-range dirty bitmaps in the
/// layout of [`GuestMemory::harvest_dirty_log`].
pub fn union_dirty(into: &mut [Vec<u64>], from: Vec<Vec<u64>>) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Pagemap entry bits: the page is present in memory, or swapped out.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// The byte ranges of this process's mapping [`addr`, `addr + len`) (page
/// aligned) whose pages are present or swapped out, relative to `addr`: the
/// rest was never touched and reads as zero. Read from /proc/self/pagemap, 8
/// bytes per page (2 MiB for 1 GiB; its flag bits need no privilege).
fn mapped_extents(addr: u64, len: u64) -> std::io::Result<Vec<Range<u64>>> {
    use std::os::unix::fs::FileExt;
    const BATCH: u64 = 32 * 1024;
    let f = File::open("/proc/self/pagemap")?;
    let pages = len / PAGE_SIZE;
    let mut buf = vec![0u8; (BATCH * 8) as usize];
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut page = 0;
    while page < pages {
        let n = BATCH.min(pages - page);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (addr / PAGE_SIZE + page) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("chunks of 8"));
            if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0 {
                continue;
            }
            let start = (page + i as u64) * PAGE_SIZE;
            match out.last_mut() {
                Some(last) if last.end == start => last.end = start + PAGE_SIZE,
                _ => out.push(start..start + PAGE_SIZE),
            }
        }
        page += n;
    }
    Ok(out)
}

/// The data extents of `file` within [start, start + len), relative to `start`.
fn file_extents(file: &File, start: u64, len: u64) -> std::io::Result<Vec<Range<u64>>> {
    let fd = file.as_raw_fd();
    let end = start + len;
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek takes no pointer, only `fd`, which `file` keeps open for
        // the whole call; it moves that file's offset and touches no memory of ours.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as the SEEK_DATA call above: no pointer, `fd` kept open by `file`.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push(data - start..hole - start);
        pos = hole;
    }
    Ok(out)
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
            let ext = m.data_extents();
            // Only the touched page (and whatever the kernel allocates around it,
            // a huge page at most) is data, in either backend.
            assert!(
                !ext[0].is_empty()
                    && ext[0].iter().all(|e| e.start <= 0x1000 && e.end >= 0x1004 && e.end - e.start < (4 << 20)),
                "{b:?}: {ext:?}"
            );
            m.prefault(&ext);
        }
        assert!(GuestMemory::new(1 << 20, MemoryBackend::Shared).is_err());
        assert!(GuestMemory::new((16 << 20) + 4096, MemoryBackend::Private).is_err());
    }
}
