//! Descriptor chains: validated lists of guest buffers.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::{QueueError, Result};

/// One guest buffer of a chain: its guest-physical range and where it is mapped in this process.
///
/// Only a chain walk makes one, after checking the range against guest RAM, and nothing can
/// change it afterwards: backends hand the kernel exactly this range to read or write.
///
/// ```compile_fail
/// fn grow(iov: &mut alioth_queue::Iov) {
///     iov.len = u32::MAX; // private: a safe caller cannot widen what the kernel may write
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iov {
    // Private, so that only a chain walk (which checked them against guest RAM) makes one:
    // the backends hand `host`..`host + len` to the kernel to write into.
    gpa: u64,
    len: u32,
    host: *mut u8,
}

// SAFETY: an Iov is an address into guest RAM, which is shared with the guest and every device
// thread anyway; the pointer is only dereferenced by I/O submitted on behalf of the chain.
unsafe impl Send for Iov {}
// SAFETY: as above; the type has no interior state.
unsafe impl Sync for Iov {}

impl Iov {
    /// Guest-physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// The buffer's address in this process. Valid while the guest RAM mapping lives (Alioth
    /// never unmaps RAM while devices run).
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// Splits the buffer at byte `at` (which must be within it) into two.
    pub fn split(&self, at: u32) -> (Iov, Iov) {
        let at = at.min(self.len);
        let head = Iov {
            gpa: self.gpa,
            len: at,
            host: self.host,
        };
        let tail = Iov {
            gpa: self.gpa + u64::from(at),
            len: self.len - at,
            // SAFETY: `at` is within the buffer, so the result stays inside its mapping.
            host: unsafe { self.host.add(at as usize) },
        };
        (head, tail)
    }

    /// The buffer as an `iovec` for readv/writev/io_uring.
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.host.cast(),
            iov_len: self.len as usize,
        }
    }
}

/// The largest copy done byte by byte through [`host_range`].
const FAST_COPY: usize = 64;

/// Where `len` bytes of guest memory at `addr` are mapped in this process, when they lie in one
/// region of plain guest memory (no IOMMU in between): the fast path for the small, frequent
/// accesses of a chain walk (descriptors, headers, status bytes). `None` sends the caller to
/// vm-memory's general path, which also reports what is wrong.
///
/// The pointer is valid for `len` bytes while `mem` is borrowed (the region's mapping lives at
/// least that long).
pub(crate) fn host_range<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    len: usize,
) -> Option<*mut u8> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let pm = mem.physical_memory()?;
    let region = pm.find_region(GuestAddress(addr))?;
    let last = addr.checked_add((len as u64).checked_sub(1)?)?;
    if last > region.last_addr().0 {
        return None;
    }
    let offset = region.to_region_addr(GuestAddress(addr))?;
    region.get_host_address(offset).ok()
}

/// What a device needs to return a chain: its ID and how many descriptors it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainToken {
    /// Head index (split) or buffer ID (packed).
    pub id: u16,
    /// Ring descriptors the chain took (packed rings advance by this much).
    pub(crate) ndesc: u16,
}

/// A popped descriptor chain: readable buffers, then writable ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescChain {
    /// Buffers the device reads (driver -> device).
    pub readable: Vec<Iov>,
    /// Buffers the device writes (device -> driver).
    pub writable: Vec<Iov>,
    token: ChainToken,
}

impl DescChain {
    /// The chain's ID (head index or buffer ID).
    pub fn id(&self) -> u16 {
        self.token.id
    }

    /// The token that returns this chain.
    pub fn token(&self) -> ChainToken {
        self.token
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|i| u64::from(i.len)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|i| u64::from(i.len)).sum()
    }

    /// Copies readable bytes starting `offset` bytes into the chain into `buf`; returns how many
    /// (fewer than `buf.len()` when the chain ends first).
    pub fn read_at<M: GuestMemory>(&self, mem: &M, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        for (iov, skip) in span(&self.readable, offset) {
            let n = (iov.len as usize - skip).min(buf.len() - done);
            let at = iov.gpa + skip as u64;
            let dst = &mut buf[done..done + n];
            // Small reads (headers) take the fast path; bulk copies stay with vm-memory.
            if let Some(src) = host_range(mem, at, n).filter(|_| n <= FAST_COPY) {
                // Guest memory may change underneath (the guest runs): volatile loads.
                for (i, d) in dst.iter_mut().enumerate() {
                    // SAFETY: `host_range` checked that `n` bytes at `src` are guest RAM mapped
                    // while `mem` is borrowed, and `i < n`.
                    *d = unsafe { std::ptr::read_volatile(src.add(i)) };
                }
            } else {
                mem.read_slice(dst, GuestAddress(at))
                    .map_err(|_| QueueError::Memory(at))?;
            }
            done += n;
            if done == buf.len() {
                break;
            }
        }
        Ok(done)
    }

    /// Copies `data` into the writable buffers starting `offset` bytes in; returns how many
    /// bytes fit.
    pub fn write_at<M: GuestMemory>(&self, mem: &M, offset: u64, data: &[u8]) -> Result<usize> {
        let mut done = 0;
        for (iov, skip) in span(&self.writable, offset) {
            let n = (iov.len as usize - skip).min(data.len() - done);
            let at = iov.gpa + skip as u64;
            let src = &data[done..done + n];
            // Small writes (status bytes) take the fast path; a dirty bitmap needs vm-memory.
            if std::mem::size_of::<M::Bitmap>() == 0
                && n <= FAST_COPY
                && let Some(dst) = host_range(mem, at, n)
            {
                for (i, b) in src.iter().enumerate() {
                    // SAFETY: `host_range` checked that `n` bytes at `dst` are guest RAM mapped
                    // while `mem` is borrowed, and `i < n`.
                    unsafe { std::ptr::write_volatile(dst.add(i), *b) };
                }
            } else {
                mem.write_slice(src, GuestAddress(at))
                    .map_err(|_| QueueError::Memory(at))?;
            }
            done += n;
            if done == data.len() {
                break;
            }
        }
        Ok(done)
    }
}

impl DescChain {
    /// Records in `mem`'s dirty bitmap that the first `len` bytes of the writable buffers were
    /// written. Writes through [`Iov::host_ptr`] (readv, io_uring) bypass vm-memory, so whoever
    /// returns the chain calls this; [`crate::VirtQueue::push_used`] does.
    pub fn mark_written<M: GuestMemory>(&self, mem: &M, len: u32) {
        // A bitmap type without state (`()`, the default) records nothing: skip the region
        // lookups on this per-completion path. Decided at compile time.
        if std::mem::size_of::<M::Bitmap>() == 0 {
            return;
        }
        let mut left = u64::from(len);
        for iov in &self.writable {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(iov.len));
            left -= n;
            let Ok(slices) = mem.get_slices(GuestAddress(iov.gpa), n as usize, Permissions::Write)
            else {
                continue;
            };
            for slice in slices.flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
    }
}

/// The buffers of `iovs` from byte `offset` on, each with the bytes to skip at its start.
fn span(iovs: &[Iov], mut offset: u64) -> impl Iterator<Item = (&Iov, usize)> {
    iovs.iter().filter_map(move |iov| {
        if offset >= u64::from(iov.len) {
            offset -= u64::from(iov.len);
            None
        } else {
            let skip = offset as usize;
            offset = 0;
            Some((iov, skip))
        }
    })
}

/// Accumulates a chain's descriptors, enforcing the rules every ring format shares.
pub(crate) struct ChainBuilder {
    head: u16,
    limit: u16,
    count: u16,
    total: u32,
    readable: Vec<Iov>,
    writable: Vec<Iov>,
}

/// Buffer lists of returned chains, reused by the next ones: popping a chain then allocates
/// nothing once the queue has warmed up.
#[derive(Default)]
pub(crate) struct ChainPool(Vec<(Vec<Iov>, Vec<Iov>)>);

impl ChainPool {
    /// The most list pairs kept.
    const KEEP: usize = 256;

    /// Empty lists (reused when there are some).
    pub fn take(&mut self) -> (Vec<Iov>, Vec<Iov>) {
        self.0.pop().unwrap_or_default()
    }

    /// Keeps `chain`'s lists for a later chain.
    pub fn give(&mut self, chain: DescChain) {
        if self.0.len() < Self::KEEP {
            let (mut r, mut w) = (chain.readable, chain.writable);
            r.clear();
            w.clear();
            self.0.push((r, w));
        }
    }
}

impl ChainBuilder {
    /// A chain starting at `head` that may hold at most `limit` descriptors, built in the
    /// (empty) lists `bufs`.
    pub fn new(head: u16, limit: u16, bufs: (Vec<Iov>, Vec<Iov>)) -> Self {
        ChainBuilder {
            head,
            limit,
            count: 0,
            total: 0,
            readable: bufs.0,
            writable: bufs.1,
        }
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    /// Adds one buffer.
    pub fn push<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: u64,
        len: u32,
        write: bool,
    ) -> Result<()> {
        let head = self.head;
        self.count += 1;
        if self.count > self.limit {
            return Err(QueueError::TooLong { head });
        }
        self.total = self
            .total
            .checked_add(len)
            .ok_or(QueueError::LengthOverflow { head })?;
        if !write && !self.writable.is_empty() {
            return Err(QueueError::ReadableAfterWritable { head });
        }
        if len == 0 {
            return Ok(());
        }
        // Nearly every buffer lies in one region of plain RAM: one lookup, no slice iterator.
        if let Some(host) = host_range(mem, addr, len as usize) {
            let iov = Iov {
                gpa: addr,
                len,
                host,
            };
            if write {
                self.writable.push(iov);
            } else {
                self.readable.push(iov);
            }
            return Ok(());
        }
        let outside = QueueError::OutsideRam { head, addr, len };
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        // A buffer that spans two memory regions becomes two iovecs.
        let slices = mem
            .get_slices(GuestAddress(addr), len as usize, access)
            .map_err(|_| outside.clone())?;
        let mut gpa = addr;
        for slice in slices {
            let slice = slice.map_err(|_| outside.clone())?;
            let iov = Iov {
                gpa,
                len: slice.len() as u32,
                host: slice.ptr_guard_mut().as_ptr(),
            };
            gpa += slice.len() as u64;
            if write {
                self.writable.push(iov);
            } else {
                self.readable.push(iov);
            }
        }
        if gpa - addr != u64::from(len) {
            return Err(outside);
        }
        Ok(())
    }

    /// The finished chain with buffer `id`, which took `ndesc` ring descriptors.
    pub fn finish(self, id: u16, ndesc: u16) -> DescChain {
        DescChain {
            readable: self.readable,
            writable: self.writable,
            token: ChainToken { id, ndesc },
        }
    }
}

/// Checks that a ring area is aligned and inside guest RAM.
pub(crate) fn check_area<M: GuestMemory>(
    mem: &M,
    area: &'static str,
    addr: u64,
    len: u64,
    align: u64,
) -> Result<()> {
    let ok = addr.is_multiple_of(align)
        && addr.checked_add(len).is_some()
        && mem.check_range(GuestAddress(addr), len as usize, Permissions::ReadWrite);
    if ok {
        Ok(())
    } else {
        Err(QueueError::BadRing { area, addr })
    }
}

/// The chain IDs a queue has handed out and not yet taken back: a bit per possible ID, so a
/// device that returns a chain twice, or a driver that reuses an ID still in flight, is caught.
pub(crate) struct InFlight {
    bits: Vec<u64>,
    count: u16,
}

impl InFlight {
    /// Room for IDs `0..ids`.
    pub fn new(ids: usize) -> Self {
        InFlight {
            bits: vec![0; ids.div_ceil(64)],
            count: 0,
        }
    }

    /// Marks `id` in flight; false if it already was (or is out of range).
    pub fn insert(&mut self, id: u16) -> bool {
        let (w, b) = (usize::from(id) / 64, 1u64 << (id % 64));
        match self.bits.get_mut(w) {
            Some(word) if *word & b == 0 => {
                *word |= b;
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    /// Takes `id` back; false if it was not in flight.
    pub fn remove(&mut self, id: u16) -> bool {
        let (w, b) = (usize::from(id) / 64, 1u64 << (id % 64));
        match self.bits.get_mut(w) {
            Some(word) if *word & b != 0 => {
                *word &= !b;
                self.count -= 1;
                true
            }
            _ => false,
        }
    }
}
