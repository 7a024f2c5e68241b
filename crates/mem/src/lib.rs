//! `alioth-mem`: guest memory and the address buses of an x86 VM.
//!
//! [`MemoryMap`] is the x86 layout (RAM below 640 KiB, RAM from 1 MiB up to the 32-bit PCI hole,
//! the rest above 4 GiB) and its e820 table. [`RamBus`] backs that RAM with one memfd (so it can
//! later be shared with another process, e.g. vhost-user) mapped through vm-memory. [`Bus`] maps
//! MMIO or port ranges to devices and rejects overlaps.
//!
//! ```
//! use alioth_mem::{MemoryMap, RamBus};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let ram = RamBus::new(MemoryMap::new(64 << 20)?)?;
//! ram.memory().write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//! # Ok::<(), alioth_mem::Error>(())
//! ```

mod bus;
pub mod layout;
mod ram;

pub use bus::{Bus, BusDevice};
pub use layout::{E820Entry, E820Kind, MemoryMap};
pub use ram::{RamBus, RamImage, RamRegion, content_hash};

/// Errors of guest memory and buses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested RAM size cannot be laid out.
    #[error("guest memory size {size:#x} is invalid: {reason}")]
    BadSize {
        /// The size asked for.
        size: u64,
        /// Why it cannot be used.
        reason: String,
    },
    /// Creating or sizing the memfd failed.
    #[error("cannot create {size:#x} bytes of guest memory: {source}")]
    Memfd {
        /// The size asked for.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping guest memory into the VMM failed.
    #[error("cannot map {size:#x} bytes of guest memory at {gpa:#x}: {source}")]
    Map {
        /// Guest-physical start of the region.
        gpa: u64,
        /// Region size.
        size: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A device range overlaps one already on the bus.
    #[error(
        "{bus} bus: range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x} ({other})"
    )]
    Overlap {
        /// The bus name.
        bus: &'static str,
        /// Start of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// Start of the range in the way.
        other_base: u64,
        /// Length of the range in the way.
        other_len: u64,
        /// Name of the device in the way.
        other: String,
    },
    /// A device range is empty or wraps around the address space.
    #[error("{bus} bus: invalid range {base:#x}+{len:#x}")]
    BadRange {
        /// The bus name.
        bus: &'static str,
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
