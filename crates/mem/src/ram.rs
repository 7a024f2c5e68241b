//! Guest RAM: one memfd, mapped once per RAM region.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::{Error, MemoryMap, Result};

/// One RAM region as KVM needs it for a memory slot.
#[derive(Debug, Clone, Copy)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the region is mapped in this process.
    pub host_addr: *mut u8,
    /// Offset of the region in the memfd ([`RamBus::fd`]).
    pub file_offset: u64,
}

/// Guest RAM backed by a memfd and described by a [`MemoryMap`].
pub struct RamBus {
    map: MemoryMap,
    memory: GuestMemoryMmap,
    file: File,
}

impl RamBus {
    /// Creates and maps the guest RAM of `map`. Pages are allocated on first touch.
    pub fn new(map: MemoryMap) -> Result<Self> {
        let size = map.size();
        let memfd_err = |source| Error::Memfd { size, source };
        // SAFETY: the name is a valid NUL-terminated string; the return value is checked.
        let fd = unsafe { libc::memfd_create(c"alioth-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(memfd_err(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(memfd_err)?;

        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (gpa, len) in map.ram_regions() {
            let map_err = |source| Error::Map {
                gpa,
                size: len,
                source,
            };
            let len_usize = usize::try_from(len)
                .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
            let fo = FileOffset::new(file.try_clone().map_err(map_err)?, offset);
            let region = MmapRegionBuilder::new(len_usize)
                .with_file_offset(fo)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| {
                    map_err(std::io::Error::from_raw_os_error(match e {
                        vm_memory::mmap::MmapRegionError::Mmap(e) => {
                            e.raw_os_error().unwrap_or(libc::ENOMEM)
                        }
                        _ => libc::EINVAL,
                    }))
                })?;
            let region = GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
            regions.push(region);
            offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map {
            gpa: 0,
            size,
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(RamBus { map, memory, file })
    }

    /// The memory map this RAM follows.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// The vm-memory view of guest RAM, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd behind guest RAM (region `i` starts at the sum of the sizes before it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The regions to register as KVM memory slots. The host addresses stay valid as long as
    /// this `RamBus` lives.
    pub fn regions(&self) -> Vec<RamRegion> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory
            .iter()
            .map(|r| RamRegion {
                gpa: r.start_addr().0,
                size: r.len(),
                host_addr: r.as_ptr(),
                file_offset: r.file_offset().map_or(0, |f| f.start()),
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "ram_test.rs"]
mod tests;
