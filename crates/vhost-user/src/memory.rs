//! The frontend's memory table: regions of its guest memory, passed as file descriptors and
//! mapped here, and the translation of its user addresses (which vring addresses are given in).

use std::fs::File;
use std::os::fd::AsRawFd;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::Error;

/// At most this many regions (what vhost-user's SET_MEM_TABLE can carry).
pub const MAX_REGIONS: usize = 8;

/// One region as the frontend described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the frontend has it mapped (vring addresses are in this space).
    pub user_addr: u64,
    /// Offset of the region in its file.
    pub mmap_offset: u64,
}

impl From<&VhostUserMemoryRegion> for Region {
    fn from(r: &VhostUserMemoryRegion) -> Self {
        Region {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
        }
    }
}

/// The frontend's guest memory, mapped in this process.
pub struct Memory {
    /// The regions, for vm-memory users (queues, devices).
    pub guest: GuestMemoryMmap,
    regions: Vec<Region>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::MemoryTable(reason.into())
}

impl Memory {
    /// Maps `regions`, the i-th from `files[i]`. Refuses empty, overflowing or overlapping
    /// regions (in guest-physical or frontend user space) and regions that do not lie inside
    /// a file whose size is known, rather than letting a later access fault.
    pub fn map(regions: &[Region], files: Vec<File>) -> Result<Memory, Error> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(bad(format!(
                "{} regions (1 to {MAX_REGIONS})",
                regions.len()
            )));
        }
        if files.len() != regions.len() {
            return Err(bad(format!(
                "{} regions but {} file descriptors",
                regions.len(),
                files.len()
            )));
        }
        for (i, r) in regions.iter().enumerate() {
            let ends = [
                r.gpa.checked_add(r.size),
                r.user_addr.checked_add(r.size),
                r.mmap_offset.checked_add(r.size),
            ];
            if r.size == 0 || ends.iter().any(Option::is_none) {
                return Err(bad(format!("region {i} ({r:x?}) is empty or wraps")));
            }
            for (j, o) in regions.iter().enumerate().take(i) {
                let overlap = |a: u64, b: u64| a < b + o.size && b < a + r.size;
                if overlap(r.gpa, o.gpa) || overlap(r.user_addr, o.user_addr) {
                    return Err(bad(format!("regions {j} and {i} overlap")));
                }
            }
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (i, (r, file)) in regions.iter().zip(files).enumerate() {
            check_within_file(&file, r).map_err(|e| bad(format!("region {i}: {e}")))?;
            let size =
                usize::try_from(r.size).map_err(|_| bad(format!("region {i}: too large")))?;
            let region = MmapRegionBuilder::new(size)
                .with_file_offset(FileOffset::new(file, r.mmap_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| bad(format!("region {i}: mmap: {e}")))?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or_else(|| bad(format!("region {i}: address overflow")))?;
            mapped.push(region);
        }
        let guest = GuestMemoryMmap::from_regions(mapped).map_err(|e| bad(e.to_string()))?;
        Ok(Memory {
            guest,
            regions: regions.to_vec(),
        })
    }

    /// The guest-physical address of frontend user address `ua` with `len` bytes after it in
    /// the same region.
    pub fn user_to_gpa(&self, ua: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = ua.checked_sub(r.user_addr)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }
}

/// A region must lie inside its file: a mapping past the end of a regular file (or memfd)
/// faults with SIGBUS on access. Files whose size does not say how much can be mapped
/// (devices such as /dev/shm-less hugetlbfs or DAX) are taken as they are.
fn check_within_file(file: &File, r: &Region) -> std::io::Result<()> {
    // SAFETY: fstat on a descriptor we own, into a zeroed stat buffer.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(file.as_raw_fd(), &mut st) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(());
    }
    let len = st.st_size as u64;
    match r.mmap_offset.checked_add(r.size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "offset {:#x} + size {:#x} is beyond the end of its file ({len:#x} bytes)",
            r.mmap_offset, r.size
        ))),
    }
}
