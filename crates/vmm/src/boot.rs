//! Boot of the built-in guests: 64-bit long mode set up by the VMM (GDT, identity
//! page tables, boot info block), every vCPU entered at the image's first byte.
//! The ABI is the one of `crates/guests/c/cevm_guest.h`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout::*;
use crate::memory::GuestMemory;

/// "CEVMBOOT", little-endian.
const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"CEVMBOOT");
/// Room for the guest's argument string, NUL included.
pub const GUEST_ARGS_MAX: usize = 256;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// GDT selectors.
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

/// A GDT descriptor from flags (access byte in bits 0..8, flags nibble in 12..16), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register a GDT descriptor describes.
fn segment(selector: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS (busy), required by VMX for a valid TR
    ]
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> Error {
    move |e| Error::Boot(format!("writing {what}: {e}"))
}

/// Writes the GDT and the identity page tables that [`long_mode_sregs`] points at:
/// every vCPU that enters a guest in long mode needs them (built-in guests and
/// Linux alike).
pub fn write_long_mode_tables(mem: &GuestMemory) -> Result<()> {
    let m = mem.mmap();
    for (i, e) in gdt().iter().enumerate() {
        m.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8)).map_err(mem_err("GDT"))?;
    }
    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
    m.write_obj(PDPT_ADDR | PTE_PRESENT | PTE_WRITE, GuestAddress(PML4_ADDR)).map_err(mem_err("PML4"))?;
    let pds = IDENTITY_MAP_SIZE >> 30;
    for i in 0..pds {
        let pd = PD_ADDR + i * PAGE_SIZE;
        m.write_obj(pd | PTE_PRESENT | PTE_WRITE, GuestAddress(PDPT_ADDR + i * 8)).map_err(mem_err("PDPT"))?;
        for j in 0..512u64 {
            let addr = (i << 30) | (j << 21);
            m.write_obj(addr | PTE_PRESENT | PTE_WRITE | PTE_HUGE, GuestAddress(pd + j * 8))
                .map_err(mem_err("page directory"))?;
        }
    }
    Ok(())
}

/// Writes the boot info block and the image of a built-in guest (after
/// [`write_long_mode_tables`]).
pub fn load_builtin_guest(mem: &GuestMemory, image: &[u8], vcpus: u32, tsc_khz: u32, args: &str) -> Result<()> {
    if image.len() as u64 > GUEST_IMAGE_MAX {
        return Err(Error::Boot(format!("guest image of {} bytes is larger than {GUEST_IMAGE_MAX}", image.len())));
    }
    if args.len() >= GUEST_ARGS_MAX {
        return Err(Error::Boot(format!(
            "guest arguments are {} bytes, at most {} fit",
            args.len(),
            GUEST_ARGS_MAX - 1
        )));
    }
    let m = mem.mmap();
    let mem_size = mem.size();
    let free_end = mem_size.min(LOW_RAM_END);
    let mut info = Vec::with_capacity(40 + GUEST_ARGS_MAX);
    info.extend_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
    info.extend_from_slice(&mem_size.to_le_bytes());
    info.extend_from_slice(&FREE_START.to_le_bytes());
    info.extend_from_slice(&free_end.to_le_bytes());
    info.extend_from_slice(&vcpus.to_le_bytes());
    info.extend_from_slice(&tsc_khz.to_le_bytes());
    let mut a = [0u8; GUEST_ARGS_MAX];
    a[..args.len()].copy_from_slice(args.as_bytes());
    info.extend_from_slice(&a);
    m.write_slice(&info, GuestAddress(BOOT_INFO_ADDR)).map_err(mem_err("boot info"))?;
    m.write_slice(image, GuestAddress(GUEST_IMAGE_ADDR)).map_err(mem_err("guest image"))?;
    Ok(())
}

/// Special registers of a vCPU entering a built-in guest in long mode.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let g = gdt();
    let code = segment(CODE_SEL, g[1]);
    let data = segment(DATA_SEL, g[2]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (g.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SEL, g[3]);
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers of vCPU `index` entering a built-in guest.
pub fn entry_regs(index: u32) -> kvm_regs {
    kvm_regs {
        rip: GUEST_IMAGE_ADDR,
        rsp: STACKS_ADDR + (u64::from(index) + 1) * STACK_SIZE,
        rdi: BOOT_INFO_ADDR,
        rsi: u64::from(index),
        rflags: 0x2,
        ..Default::default()
    }
}

/// The x87/SSE state after reset (FNINIT and MXCSR defaults).
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBackend;

    #[test]
    fn code_segment_is_64_bit() {
        let s = segment(CODE_SEL, gdt()[1]);
        assert_eq!((s.l, s.db, s.present, s.type_, s.s, s.g), (1, 0, 1, 0xb, 1, 1));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemory::new(16 << 20, MemoryBackend::Private).unwrap();
        write_long_mode_tables(&mem).unwrap();
        load_builtin_guest(&mem, &[0xe8, 0, 0, 0, 0], 2, 1000, "mib=1").unwrap();
        let m = mem.mmap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        // The PD entry for 3 GiB + 2 MiB maps exactly that address.
        let pd3: u64 = m.read_obj(GuestAddress(PDPT_ADDR + 3 * 8)).unwrap();
        let e: u64 = m.read_obj(GuestAddress((pd3 & !0xfff) + 8)).unwrap();
        assert_eq!(e & !0xfff, (3 << 30) + (2 << 20));
        let magic: u64 = m.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        assert_eq!(magic.to_le_bytes(), *b"CEVMBOOT");
        assert!(load_builtin_guest(&mem, &[0; 16], 1, 0, &"x".repeat(300)).is_err());
    }
}
