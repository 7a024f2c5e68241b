//! ACPI tables for an x86 VM without firmware: RSDP, XSDT, a hardware-reduced FADT, a MADT with
//! one local APIC per vCPU, the IOAPIC and interrupt source overrides, an MCFG when PCI ECAM is
//! present, and a DSDT describing the legacy devices and the `_S5` sleep state.
//!
//! The tables are built with the rust-vmm `acpi_tables` crate and placed in the BIOS area
//! (0xE0000), where a kernel that is not told the RSDP address also finds it by scanning.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use alioth_mem::layout::{
    BIOS_START, HIGH_RAM_START, IOAPIC_BASE, LAPIC_BASE, PCI_MMIO_END, PCI_MMIO_START,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"ALIOTH";
const OEM_TABLE_ID: [u8; 8] = *b"ALIOTHVM";
const OEM_REVISION: u32 = 1;

/// A legacy device to describe in the DSDT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySerial {
    /// I/O base (e.g. 0x3f8).
    pub port: u16,
    /// ISA IRQ (e.g. 4).
    pub irq: u32,
}

/// I/O ports of the ACPI power-management device the FADT points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmPorts {
    /// Sleep control register (1 byte): SLP_TYP in bits 2-4, SLP_EN in bit 5.
    pub sleep_control: u16,
    /// Sleep status register (1 byte).
    pub sleep_status: u16,
    /// Reset register (1 byte).
    pub reset: u16,
    /// Value to write to `reset` to reset the machine.
    pub reset_value: u8,
    /// The 32-bit ACPI PM timer (4 bytes, 3.579545 MHz), if the machine has one.
    pub timer: Option<u16>,
}

/// The SLP_TYP value of `_S5` (soft off) in Alioth's DSDT.
pub const S5_SLP_TYP: u8 = 5;

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs 0..n).
    pub nr_vcpus: u32,
    /// Serial ports.
    pub serials: Vec<LegacySerial>,
    /// The power-management device.
    pub pm: PmPorts,
    /// PCI ECAM window (base, start bus, end bus), if there is a PCI host bridge.
    pub ecam: Option<(u64, u8, u8)>,
}

/// MADT interrupt source override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT local APIC NMI (type 4): LINT1 of every processor is the NMI input.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, s) in cfg.serials.iter().enumerate() {
        let uid = i as u8;
        let name = format!("_SB_.COM{}", i + 1);
        let irq = aml::Interrupt::new(true, true, false, false, s.irq);
        let io = aml::IO::new(s.port, s.port, 1, 8);
        let crs = aml::ResourceTemplate::new(vec![&irq, &io]);
        let hid = aml::EISAName::new("PNP0501");
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    if cfg.ecam.is_some() {
        pci_root(&mut body);
    }
    // \_S5: SLP_TYPa, SLP_TYPb for soft-off through the sleep control register.
    let s5 = S5_SLP_TYP;
    let zero = 0u8;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5, &zero])).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// The PCI root bridge: bus 0, configuration ports, the I/O space above them and the 32-bit
/// BAR window.
fn pci_root(body: &mut Vec<u8>) {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let zero = 0u8;
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &mem]);
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_CID".into(), &cid),
            &aml::Name::new("_SEG".into(), &zero),
            &aml::Name::new("_UID".into(), &zero),
            &aml::Name::new("_BBN".into(), &zero),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(body);
}

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // IA-PC boot architecture flags: 8042 present (bit 1), no VGA (bit 2).
    b.iapc_boot_arch = ((1u16 << 1) | (1 << 2)).into();
    b.reset_reg = io_gas(cfg.pm.reset);
    b.reset_value = cfg.pm.reset_value;
    b.sleep_control_reg = io_gas(cfg.pm.sleep_control);
    b.sleep_status_reg = io_gas(cfg.pm.sleep_status);
    if let Some(port) = cfg.pm.timer {
        b.pm_tmr_blk = u32::from(port).into();
        b.pm_tmr_len = 4;
        b.x_pm_tmr_blk = GAS::new(
            AddressSpace::SystemIo,
            32,
            0,
            AccessSize::DwordAccess,
            u64::from(port),
        );
        b = b.flag(Flags::TmrValExt);
    }
    bytes_of(&b.finalize())
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE as u32),
    );
    for id in 0..cfg.nr_vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_BASE as u32, 0));
    // The PIT's IRQ 0 is wired to IOAPIC pin 2, as on every PC.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    bytes_of(&madt)
}

fn mcfg(base: u64, start_bus: u8, end_bus: u8) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"MCFG", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&[0u8; 8]); // reserved
    let mut entry = Vec::with_capacity(16);
    entry.extend_from_slice(&base.to_le_bytes());
    entry.extend_from_slice(&0u16.to_le_bytes()); // segment group
    entry.push(start_bus);
    entry.push(end_bus);
    entry.extend_from_slice(&[0u8; 4]);
    sdt.append_slice(&entry);
    sdt.as_slice().to_vec()
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Builds the tables and writes them into the BIOS area. Returns the RSDP's address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<u64> {
    if cfg.nr_vcpus == 0 || cfg.nr_vcpus > 255 {
        return Err(Error::Acpi(format!(
            "{} vCPUs cannot be described with xAPIC IDs (1-255)",
            cfg.nr_vcpus
        )));
    }
    let rsdp_addr = BIOS_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // The XSDT's size is known up front: header + one pointer per table.
    let n_tables = 2 + u64::from(cfg.ecam.is_some());
    let mut next = align16(xsdt_addr + 36 + 8 * n_tables);

    let dsdt = dsdt(cfg);
    let dsdt_addr = next;
    next = align16(next + dsdt.len() as u64);
    let fadt = fadt(cfg, dsdt_addr);
    let fadt_addr = next;
    next = align16(next + fadt.len() as u64);
    let madt = madt(cfg);
    let madt_addr = next;
    next = align16(next + madt.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut tables = vec![(dsdt_addr, dsdt), (fadt_addr, fadt), (madt_addr, madt)];
    if let Some((base, start, end)) = cfg.ecam {
        let t = mcfg(base, start, end);
        xsdt.add_entry(next);
        tables.push((next, t.clone()));
        next = align16(next + t.len() as u64);
    }
    if next > HIGH_RAM_START {
        return Err(Error::Acpi(format!(
            "{:#x} bytes do not fit the BIOS area",
            next - BIOS_START
        )));
    }
    tables.push((xsdt_addr, bytes_of(&xsdt)));
    tables.push((rsdp_addr, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))));
    for (addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| Error::GuestMemory {
                what: "ACPI tables",
                addr,
            })?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
#[path = "acpi_test.rs"]
mod tests;
