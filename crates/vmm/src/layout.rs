//! Guest-physical memory layout and port numbers, in one place.
//!
//! ```text
//! 0x0000_0500  GDT (null, code64, data, tss)
//! 0x0000_7000  boot info block of the built-in guests (rdi at entry), or
//!              Linux's boot_params ("zero page", rsi at entry)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories
//!              (identity map of the first 4 GiB with 2 MiB pages)
//! 0x0002_0000  Linux command line
//! 0x0009_fc00  end of low RAM for Linux (EBDA and BIOS area above, reserved)
//! 0x000e_0000  ACPI tables (RSDP first), up to 1 MiB
//! 0x0010_0000  guest image (flat binary, at most 1 MiB), or the Linux kernel
//! 0x0020_0000  vCPU stacks, STACK_SIZE each, vCPU i's top at STACKS_ADDR + (i+1)*STACK_SIZE
//! 0x0040_0000  free RAM for the guest's own use, up to min(mem, LOW_RAM_END)
//! 0xc000_0000  32-bit hole, RAM above it continues at 4 GiB
//! 0xd000_0000  virtio-mmio register blocks: the disk, then NIC 0..7, 4 KiB each
//! ```

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Boot information block handed to built-in guests in `rdi`.
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table (one, covering 512 GiB).
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories (2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Size of the identity map set up for built-in guests.
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;
/// Where a built-in guest image is loaded and entered.
pub const GUEST_IMAGE_ADDR: u64 = 0x10_0000;
/// Largest built-in guest image.
pub const GUEST_IMAGE_MAX: u64 = 0x10_0000;
/// Base of the per-vCPU stacks.
pub const STACKS_ADDR: u64 = 0x20_0000;
/// Stack size of each vCPU of a built-in guest.
pub const STACK_SIZE: u64 = 0x4000;
/// Most vCPUs an instance may have (their stacks fill STACKS_ADDR..FREE_START).
pub const MAX_VCPUS: u32 = 64;
/// First byte of RAM a built-in guest may use freely.
pub const FREE_START: u64 = 0x40_0000;
/// Smallest guest memory accepted: the first FREE_START bytes hold the boot
/// tables, the built-in guest image and the vCPU stacks, and a guest needs room
/// of its own beyond them.
pub const MIN_MEM_SIZE: u64 = 8 << 20;
/// Guest memory comes in whole 2 MiB pages: the identity map of the built-in
/// guests uses 2 MiB pages, and private memory is backed by transparent huge pages.
pub const MEM_ALIGN: u64 = 2 << 20;
/// End of RAM below 4 GiB; the hole above is left for MMIO.
pub const LOW_RAM_END: u64 = 0xc000_0000;
/// Where RAM beyond LOW_RAM_END continues.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Three pages KVM needs for the TSS on Intel (`KVM_SET_TSS_ADDR`), inside the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Linux's boot_params (the "zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack of the boot vCPU while Linux sets up its own.
pub const LINUX_BOOT_STACK: u64 = 0x8ff0;
/// Linux command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest Linux command line, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: low RAM for Linux ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// The RSDP, where Linux also finds it by scanning the BIOS area.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the room for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// Where high memory starts (the Linux kernel is loaded here).
pub const HIMEM_START: u64 = 0x10_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// First virtio-mmio device (in the 32-bit hole); each takes VIRTIO_MMIO_SIZE.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of a virtio-mmio register block.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt (GSI) of the virtio block device.
pub const VIRTIO_BLK_GSI: u32 = 5;

/// Where a virtio-mmio device sits: its register block and its interrupt, as
/// the instance places it and the firmware tables (ACPI, Linux's command line)
/// describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// First guest-physical address of the register block.
    pub base: u64,
    /// Size of the register block.
    pub size: u64,
    /// The device's interrupt.
    pub gsi: u32,
}

/// The slot of the virtio block device.
pub const VIRTIO_BLK_SLOT: VirtioMmioSlot =
    VirtioMmioSlot { base: VIRTIO_MMIO_BASE, size: VIRTIO_MMIO_SIZE, gsi: VIRTIO_BLK_GSI };

/// Most NICs an instance may have.
pub const MAX_NICS: usize = 8;
/// Interrupt of NIC 0; NIC i has VIRTIO_NET_GSI + i (IOAPIC pins 16-23, clear
/// of the ISA interrupts).
pub const VIRTIO_NET_GSI: u32 = 16;

/// The slot of NIC `i`: right after the block device's (which stays reserved
/// when there is no disk, so a NIC's address never depends on the disk).
pub const fn virtio_net_slot(i: usize) -> VirtioMmioSlot {
    VirtioMmioSlot {
        base: VIRTIO_MMIO_BASE + (1 + i as u64) * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_NET_GSI + i as u32,
    }
}

/// ACPI sleep control register (hardware-reduced ACPI): a write with SLP_EN powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register.
pub const ACPI_RESET_PORT: u16 = 0x3c2;

/// COM1, the 8250 serial console.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports of an 8250.
pub const COM1_LEN: u16 = 8;
/// Interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;
/// The exit port: a 32-bit write ends the VM with that status.
pub const EXIT_PORT: u16 = 0xf4;

const _: () = assert!(STACKS_ADDR + MAX_VCPUS as u64 * STACK_SIZE <= FREE_START);
const _: () = assert!(GUEST_IMAGE_ADDR + GUEST_IMAGE_MAX <= STACKS_ADDR);
const _: () = assert!(VIRTIO_NET_GSI + MAX_NICS as u32 <= 24); // the IOAPIC's pins
