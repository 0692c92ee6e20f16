//! ACPI tables for Linux guests, built with the `acpi_tables` crate: RSDP, XSDT, a
//! hardware-reduced FADT (power off and reset through two I/O ports, no PM
//! timer, no SCI), a DSDT with the `_S5_` sleep type, and a MADT listing every
//! vCPU's local APIC and the in-kernel IOAPIC (the Debian kernel has no MP-table
//! parser, so ACPI is how it finds the other vCPUs).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout::{
    VirtioMmioSlot, ACPI_END, ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, COM1_BASE, COM1_IRQ,
    COM1_LEN, IOAPIC_ADDR, LAPIC_ADDR, RSDP_ADDR,
};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"CEVM  ";
const OEM_TABLE: [u8; 8] = *b"CEVMTBL ";
const OEM_REV: u32 = 1;

/// The sleep type `_S5_` announces; the guest writes it to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// What the guest writes to the reset register to reboot.
pub const RESET_VALUE: u8 = 1;

/// IA-PC boot architecture flags: no VGA, no CMOS RTC (not emulated).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

fn io_register(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Writes all tables from RSDP_ADDR on; returns the RSDP's address.
pub fn create_tables(mem: &GuestMemory, vcpus: u32, virtio: &[VirtioMmioSlot]) -> Result<u64> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REV);
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]));
    dsdt.append_slice(&bytes(&s5));
    // Hardware-reduced ACPI means no legacy PIC, so Linux maps no ISA interrupt on
    // its own: COM1 must be a device here, with its interrupt as a GSI.
    let com1_io = aml::IO::new(COM1_BASE, COM1_BASE, 1, COM1_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    dsdt.append_slice(&bytes(&com1));
    // virtio-mmio devices: Linux's virtio_mmio driver binds to "LNRO0005".
    for (i, slot) in virtio.iter().enumerate() {
        let mem32 = aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, slot.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem32, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(i as u8));
        let crs = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.VR{i:02}");
        let dev = aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]);
        dsdt.append_slice(&bytes(&dev));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REV);
    fadt = fadt.flag(Flags::HwReducedAcpi).flag(Flags::ResetRegSup).flag(Flags::PwrButton).flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"CEVMCEVM").into();

    let mut madt = MADT::new(OEM_ID, OEM_TABLE, OEM_REV, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..vcpus {
        let id = u8::try_from(id).map_err(|_| Error::Boot(format!("vCPU {id} has no 8-bit APIC ID")))?;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));

    // Layout: RSDP, then each table 16-byte aligned after it.
    let align = |a: u64| (a + 15) & !15;
    let xsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);
    let dsdt_addr = align(xsdt_addr + 36 + 8 * 2);
    let dsdt_bytes = bytes(&dsdt);
    let fadt_addr = align(dsdt_addr + dsdt_bytes.len() as u64);
    let fadt_bytes = bytes(&fadt.dsdt_64(dsdt_addr).finalize());
    let madt_addr = align(fadt_addr + fadt_bytes.len() as u64);
    let madt_bytes = bytes(&madt);
    let end = madt_addr + madt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(Error::Boot(format!("ACPI tables for {vcpus} vCPUs do not fit below {ACPI_END:#x}")));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REV);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let m = mem.mmap();
    for (addr, data, what) in [
        (RSDP_ADDR, bytes(&rsdp), "RSDP"),
        (xsdt_addr, bytes(&xsdt), "XSDT"),
        (dsdt_addr, dsdt_bytes, "DSDT"),
        (fadt_addr, fadt_bytes, "FADT"),
        (madt_addr, madt_bytes, "MADT"),
    ] {
        m.write_slice(&data, GuestAddress(addr)).map_err(|e| Error::Boot(format!("writing the {what}: {e}")))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBackend;

    fn checksum_ok(m: &GuestMemory, addr: u64, len: usize) -> bool {
        let mut b = vec![0u8; len];
        m.mmap().read_slice(&mut b, GuestAddress(addr)).unwrap();
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_are_found_from_the_rsdp_and_checksum_right() {
        let mem = GuestMemory::new(16 << 20, MemoryBackend::Private).unwrap();
        let rsdp = create_tables(&mem, 4, &[VirtioMmioSlot { base: 0xd000_0000, size: 0x1000, gsi: 5 }]).unwrap();
        let m = mem.mmap();
        let mut sig = [0u8; 8];
        m.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!(checksum_ok(&mem, rsdp, 20) && checksum_ok(&mem, rsdp, 36));
        let xsdt: u64 = m.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let xlen: u32 = m.read_obj(GuestAddress(xsdt + 4)).unwrap();
        assert!(checksum_ok(&mem, xsdt, xlen as usize));
        let mut seen = Vec::new();
        for i in 0..(xlen as u64 - 36) / 8 {
            let t: u64 = m.read_obj(GuestAddress(xsdt + 36 + 8 * i)).unwrap();
            let mut s = [0u8; 4];
            m.read_slice(&mut s, GuestAddress(t)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(t + 4)).unwrap();
            assert!(checksum_ok(&mem, t, len as usize), "{:?}", std::str::from_utf8(&s));
            if &s == b"APIC" {
                // 44-byte header + 4 local APICs (8 bytes) + 1 IOAPIC (12 bytes).
                assert_eq!(len, 44 + 4 * 8 + 12);
            }
            seen.push(s);
        }
        assert_eq!(seen, vec![*b"FACP", *b"APIC"]);
    }
}
