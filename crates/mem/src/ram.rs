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

/// What [`RamBus::save_to`] wrote or [`RamBus::load_from`] read: bytes of data (pages the
/// guest ever wrote) and a hash of them with their offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamImage {
    /// Data bytes (holes excluded).
    pub bytes: u64,
    /// A 64-bit hash of every data extent and its offset (not cryptographic: it detects
    /// corruption and truncation).
    pub hash: u64,
}

/// A 64-bit FNV-1a variant over 8-byte words: fast enough to hash guest RAM on the way.
fn hash_words(mut h: u64, data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        h = (h ^ u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).wrapping_mul(PRIME);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash [`RamImage`] uses, of one buffer: for checking snapshot files.
pub fn content_hash(data: &[u8]) -> u64 {
    hash_words(HASH_SEED, data)
}

/// The data extents of `file` below `size`: (offset, length), found with SEEK_DATA/SEEK_HOLE.
fn extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on a descriptor we hold; the results are checked.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(size);
        out.push((data, end - data));
        at = end;
    }
    Ok(out)
}

/// Copies the data extents of `from` (below `size`) to the same offsets of `to`, hashing them.
fn copy_extents(from: &File, to: &File, size: u64) -> std::io::Result<RamImage> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut img = RamImage {
        bytes: 0,
        hash: HASH_SEED,
    };
    for (start, len) in extents(from, size)? {
        img.hash = hash_words(img.hash, &start.to_le_bytes());
        let mut off = start;
        while off < start + len {
            let n = ((start + len - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off)?;
            to.write_all_at(&buf[..n], off)?;
            img.hash = hash_words(img.hash, &buf[..n]);
            off += n as u64;
        }
        img.bytes += len;
    }
    Ok(img)
}

impl RamBus {
    /// Writes guest RAM to `file` (of which it sets the length) at the memfd's offsets, only
    /// the pages the guest ever wrote: `file` stays sparse. Guest RAM must not change meanwhile
    /// (vCPUs and devices paused).
    pub fn save_to(&self, file: &File) -> std::io::Result<RamImage> {
        let size = self.map.size();
        file.set_len(size)?;
        copy_extents(&self.file, file, size)
    }

    /// Reads guest RAM written by [`RamBus::save_to`] from `file`, before the VM runs. Fails if
    /// `file` is not exactly as large as this RAM.
    pub fn load_from(&self, file: &File) -> std::io::Result<RamImage> {
        let size = self.map.size();
        let len = file.metadata()?.len();
        if len != size {
            return Err(std::io::Error::other(format!(
                "the memory image holds {len} bytes; this VM has {size}"
            )));
        }
        copy_extents(file, &self.file, size)
    }
}

#[cfg(test)]
#[path = "ram_test.rs"]
mod tests;
