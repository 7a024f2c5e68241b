//! Identity mappings above 4 GiB, made from ring 3.
//!
//! The entry code maps the first 4 GiB. A VMM may put 64-bit BARs (and an ECAM window) far
//! above that, so the kit adds 2 MiB uncached identity mappings there on demand. The page
//! tables live in RAM that ring 3 may write, and only entries that were not present change, so
//! no TLB flush is needed (x86 does not cache not-present translations).

use core::sync::atomic::{AtomicUsize, Ordering};

unsafe extern "C" {
    /// The kit's PML4 (cpu.rs).
    static mut kit_pml4: [u64; 512];
}

/// Page-table pages handed out for new PDPTs and page directories.
const POOL_PAGES: usize = 16;

#[repr(C, align(4096))]
struct Pool([[u64; 512]; POOL_PAGES]);

static mut POOL: Pool = Pool([[0; 512]; POOL_PAGES]);
static POOL_USED: AtomicUsize = AtomicUsize::new(0);

/// Present, writable, user (for tables).
const TABLE: u64 = 0x7;
/// Present, writable, user, PWT | PCD (uncached), 2 MiB page.
const MMIO_2M: u64 = 0x9f;
/// The mapped physical address space: 47 bits (an identity map must stay canonical).
const LIMIT: u64 = 1 << 47;

/// Why a range could not be mapped.
#[derive(Debug, Clone, Copy)]
pub enum MapError {
    /// Above what a 4-level identity map can reach.
    TooHigh,
    /// The kit's page-table pool is used up.
    NoTables,
}

fn new_table() -> Result<u64, MapError> {
    let i = POOL_USED.fetch_add(1, Ordering::Relaxed);
    if i >= POOL_PAGES {
        return Err(MapError::NoTables);
    }
    // SAFETY: page `i` of the pool is handed out once (the counter only grows), is zeroed
    // (static), and is identity-mapped, so its address is its physical address.
    Ok(unsafe { (&raw mut POOL.0[i]) as u64 })
}

/// The table that entry `e` (a present table entry) points at.
fn table(e: u64) -> *mut u64 {
    (e & 0x000f_ffff_ffff_f000) as *mut u64
}

/// Returns the next-level table of `slot`, creating it if the slot is empty.
///
/// # Safety
/// `slot` points at an entry of one of the kit's page tables.
unsafe fn descend(slot: *mut u64) -> Result<*mut u64, MapError> {
    // SAFETY: per the caller; page tables are ordinary identity-mapped RAM.
    unsafe {
        let e = core::ptr::read_volatile(slot);
        if e & 1 != 0 {
            return Ok(table(e));
        }
        let t = new_table()?;
        core::ptr::write_volatile(slot, t | TABLE);
        Ok(t as *mut u64)
    }
}

/// Makes `[phys, phys + len)` accessible at the same virtual address, uncached.
pub fn map(phys: u64, len: u64) -> Result<(), MapError> {
    let end = phys.checked_add(len.max(1)).ok_or(MapError::TooHigh)?;
    if end > LIMIT {
        return Err(MapError::TooHigh);
    }
    let mut at = phys & !((2 << 20) - 1);
    while at < end {
        if at >= 4 << 30 {
            // SAFETY: indices are below 512; every table reached is the kit's own (the PML4
            // from cpu.rs, the rest from the pool), and only empty entries are written.
            unsafe {
                let pml4 = &raw mut kit_pml4 as *mut u64;
                let pdpt = descend(pml4.add((at >> 39) as usize & 511))?;
                let pd = descend(pdpt.add((at >> 30) as usize & 511))?;
                let slot = pd.add((at >> 21) as usize & 511);
                if core::ptr::read_volatile(slot) & 1 == 0 {
                    core::ptr::write_volatile(slot, at | MMIO_2M);
                }
            }
        }
        at += 2 << 20;
    }
    Ok(())
}
