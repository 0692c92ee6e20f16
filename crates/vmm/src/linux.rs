//! Direct boot of a Linux bzImage (64-bit boot protocol) with `linux-loader`: the
//! kernel at 1 MiB, the command line, the initramfs at the top of low memory, the
//! boot_params with an e820 map, and the ACPI tables.
//!
//! The boot vCPU enters the kernel's 64-bit entry (load address + 0x200) in long
//! mode with the identity map of [`crate::boot`]; the other vCPUs wait for the
//! INIT/SIPI the kernel sends them through the in-kernel local APIC.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_lapic_state, kvm_regs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi;
use crate::error::{Error, Result};
use crate::layout::*;
use crate::memory::GuestMemory;

/// Command line when none is given: console on COM1, reboot through the ACPI
/// reset register, a panic ends the VM (reboot, which cevm turns into an exit), and
/// no PCI probing (cevm has no PCI bus).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 pci=off";

const E820_RAM: u32 = 1;
/// "HdrS": the setup header's magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot loader's type: "undefined", as for any loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;

/// LAPIC register offsets and delivery modes used at boot.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Loads kernel, initramfs, command line, boot_params and ACPI tables. Returns the
/// entry point of the boot vCPU.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u32,
    virtio: &[VirtioMmioSlot],
) -> Result<u64> {
    let m = mem.mmap();
    let mut kfile = File::open(kernel).map_err(|e| Error::Boot(format!("kernel {}: {e}", kernel.display())))?;
    let loaded = BzImage::load(m, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| Error::Boot(format!("kernel {}: not a bzImage this cevm can boot ({e})", kernel.display())))?;
    let mut hdr =
        loaded.setup_header.ok_or_else(|| Error::Boot(format!("kernel {}: no setup header", kernel.display())))?;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Boot(format!("command line: {e}")))?;
    cl.insert_str(cmdline).map_err(|e| Error::Boot(format!("command line `{cmdline}`: {e}")))?;
    load_cmdline(m, GuestAddress(CMDLINE_ADDR), &cl).map_err(|e| Error::Boot(format!("command line: {e}")))?;

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG_MAGIC;
    hdr.header = HDRS_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;

    let low_end = mem.ranges()[0].guest_addr + mem.ranges()[0].size;
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|e| Error::Boot(format!("initramfs {}: {e}", path.display())))?;
        // At the top of low RAM, below what the kernel says it can reach.
        let top = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
        let addr = top.checked_sub(data.len() as u64).map(|a| a & !(PAGE_SIZE - 1));
        let addr = match addr {
            Some(a) if a >= loaded.kernel_end => a,
            _ => {
                return Err(Error::Boot(format!(
                    "initramfs {} ({} bytes) does not fit in guest memory beside the kernel",
                    path.display(),
                    data.len()
                )))
            }
        };
        m.write_slice(&data, GuestAddress(addr)).map_err(|e| Error::Boot(format!("initramfs: {e}")))?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = data.len() as u32;
    }

    let mut params = boot_params { hdr, ..Default::default() };
    params.acpi_rsdp_addr = acpi::create_tables(mem, vcpus, virtio)?;
    let mut e820 = vec![(0, EBDA_START), (HIMEM_START, low_end - HIMEM_START)];
    if let Some(high) = mem.ranges().get(1) {
        e820.push((high.guest_addr, high.size));
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: E820_RAM };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<devices::GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        m,
    )
    .map_err(|e| Error::Boot(format!("boot_params: {e}")))?;
    Ok(loaded.kernel_load.0 + ENTRY_64_OFFSET)
}

/// General registers of the boot vCPU entering Linux at `entry`.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: LINUX_BOOT_STACK,
        rbp: LINUX_BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

fn set_lvt(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = lapic.regs[reg + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *x as i8;
    }
}

/// Wires the local APIC's LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as a PC's
/// firmware does, so that legacy interrupts reach the boot vCPU.
pub fn configure_lapic(lapic: &mut kvm_lapic_state) {
    set_lvt(lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(lapic, APIC_LVT1, APIC_MODE_NMI);
}
