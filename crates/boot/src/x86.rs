//! The fixed low-memory layout of the boot structures, page tables and GDTs.

use alioth_arch::CpuMode;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// The boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (limit 7) so that early faults triple-fault instead of running garbage.
pub const IDT_ADDR: u64 = 0x520;
/// PVH start_info, then its memory map and module list.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// The initial stack pointer for the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories (2 MiB pages) identity-mapping the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Highest command-line size the layout has room for.
pub const CMDLINE_MAX: usize = 0x1_0000;

/// GDT indices used by both protocols.
pub const CODE_INDEX: u16 = 1;
/// Data segment index.
pub const DATA_INDEX: u16 = 2;
/// TSS index.
pub const TSS_INDEX: u16 = 3;

/// The GDT for `mode`: null, code (64-bit or 32-bit flat), flat data, and a TSS.
pub fn gdt(mode: CpuMode) -> Vec<u64> {
    let code = match mode {
        CpuMode::Long64 => 0x00af_9b00_0000_ffff,
        CpuMode::Protected32 => 0x00cf_9b00_0000_ffff,
    };
    vec![0, code, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff]
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    v: T,
    addr: u64,
    what: &'static str,
) -> Result<()> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|_| Error::GuestMemory { what, addr })
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<()> {
    for (i, d) in gdt.iter().enumerate() {
        write(mem, *d, GDT_ADDR + i as u64 * 8, "GDT")?;
    }
    write(mem, 0u64, IDT_ADDR, "IDT")
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    write(mem, PDPT_ADDR | 0x3, PML4_ADDR, "page tables")?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        write(mem, pd | 0x3, PDPT_ADDR + i * 8, "page tables")?;
        for j in 0..512u64 {
            let entry = (i << 30) | (j << 21) | 0x83; // present, writable, 2 MiB page
            write(mem, entry, pd + j * 8, "page tables")?;
        }
    }
    Ok(())
}
