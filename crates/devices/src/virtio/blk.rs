//! virtio-blk on a raw image file.
//!
//! Requests: read, write, flush (`fdatasync`), get-id, discard (punch hole) and write-zeroes
//! (zero range), each checked against the disk's capacity. Read-only disks advertise
//! VIRTIO_BLK_F_RO and fail writes, discards and write-zeroes with IOERR. A read or write that
//! transfers less than asked is reported as IOERR, never as success.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use alioth_queue::{
    DescChain, Iov, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
};
use alioth_virtio::{BufferAction, ChainHandler, DeviceId, IoOp, Virtio};
use vm_memory::GuestMemoryMmap;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Sector size of the protocol.
pub const SECTOR_SIZE: u64 = 512;

const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_MQ: u32 = 12;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Length of the device ID string.
pub const ID_LEN: usize = 20;
/// Largest single data buffer advertised (size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// The most iovecs one readv/writev (and one io_uring readv/writev) takes.
pub const IOV_MAX: u32 = 1024;
/// Largest request in sectors for discard and write-zeroes.
pub const MAX_ZERO_SECTORS: u32 = (1 << 30) / 512;

/// The device configuration layout (virtio 1.2 §5.2.4), little-endian and unaligned as the
/// transport exposes it: 60 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkConfigSpace {
    /// Size in 512-byte sectors.
    pub capacity: U64,
    /// Largest single data buffer (SIZE_MAX).
    pub size_max: U32,
    /// Most data buffers per request (SEG_MAX).
    pub seg_max: U32,
    /// Cylinders, heads, sectors (GEOMETRY, not offered).
    pub geometry: [u8; 4],
    /// Block size (BLK_SIZE).
    pub blk_size: U32,
    /// physical_block_exp, alignment_offset, min_io_size, opt_io_size (TOPOLOGY, not offered).
    pub topology: [u8; 8],
    /// Write-back cache (CONFIG_WCE, not offered).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Request queues (MQ).
    pub num_queues: U16,
    /// Largest discard in sectors.
    pub max_discard_sectors: U32,
    /// Most discard segments per request.
    pub max_discard_seg: U32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: U32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: U32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: U32,
    /// Whether write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
}

/// The request header (virtio 1.2 §5.2.6): type, reserved, sector.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkReqHeader {
    /// Request type ([`req`]).
    pub kind: U32,
    /// Reserved.
    pub reserved: U32,
    /// Starting sector.
    pub sector: U64,
}

/// A discard / write-zeroes segment (virtio 1.2 §5.2.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BlkDiscardSegment {
    /// Starting sector.
    pub sector: U64,
    /// Sectors.
    pub num_sectors: U32,
    /// Bit 0: unmap (write-zeroes).
    pub flags: U32,
}

/// How to open the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Raw image.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Number of request queues.
    pub num_queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Take an OFD lock on the image (shared when read-only, exclusive otherwise), as QEMU and
    /// Cloud Hypervisor do, so that two VMs cannot write one image.
    pub lock: bool,
    /// Bandwidth and request limits (none by default); a limited request waits in its ring.
    pub rate_limit: alioth_virtio::RateLimit,
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image cannot be opened or sized.
    #[error("disk {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error(
        "disk {path}: the image is locked by another process ({held} lock; another VM using it?); lock=off overrides"
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// "a write" or "a read" lock.
        held: &'static str,
    },
    /// A setting is out of range.
    #[error("disk {path}: {reason}")]
    Config {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Counters of a virtio-blk device (shared; readable while the device runs).
#[derive(Debug, Default)]
pub struct BlkCounters {
    /// Reads completed.
    pub read_ops: std::sync::atomic::AtomicU64,
    /// Their bytes.
    pub read_bytes: std::sync::atomic::AtomicU64,
    /// Writes completed.
    pub write_ops: std::sync::atomic::AtomicU64,
    /// Their bytes.
    pub write_bytes: std::sync::atomic::AtomicU64,
    /// Requests that completed with an I/O error.
    pub errors: std::sync::atomic::AtomicU64,
}

/// A virtio-blk device.
pub struct VirtioBlk {
    name: String,
    file: File,
    read_only: bool,
    capacity: u64,
    num_queues: u16,
    queue_size: u16,
    id: [u8; ID_LEN],
    config: Vec<u8>,
    /// Requests whose I/O is in flight, by (queue, chain ID): what `complete` needs, parsed
    /// once when the chain was popped (the guest may rewrite the header meanwhile).
    pending: HashMap<(u16, u16), Pending, std::hash::BuildHasherDefault<IdHasher>>,
    /// Rate limit for what a guest can make us log.
    log: alioth_virtio::LogLimiter,
    counters: std::sync::Arc<BlkCounters>,
    limiter: alioth_virtio::RateLimiter,
    /// Buffer lists of finished reads and writes ([`ChainHandler::recycle_iovs`]), so that
    /// starting one allocates nothing.
    spare_iovs: Vec<Vec<Iov>>,
}

/// Hashes the in-flight map's (queue, chain ID) keys with one multiply. SipHash's protection
/// is not needed: the map never holds more than the queues' sizes, so a guest choosing colliding
/// IDs only lengthens a probe it bounds itself.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = (self.0 << 16) | u64::from(n);
    }
}

/// What completing an in-flight request needs.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: u32,
    sector: u64,
    /// Bytes the I/O must transfer to succeed.
    expected: u64,
    /// Bytes written to the chain on success (before the status byte).
    data: u64,
    status_at: u64,
    /// For write-zeroes: the byte range, should the filesystem lack FALLOC_FL_ZERO_RANGE.
    zero: Option<(u64, u64)>,
}

enum LockError {
    Held(&'static str),
    Os(std::io::Error),
}

fn flock(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value, the fields that matter are set.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = 0;
    l.l_len = 0; // the whole file
    l
}

/// Takes an OFD lock on the whole image: shared for reading, exclusive for writing. The lock
/// belongs to this open file description and goes with it.
fn lock_image(file: &File, read_only: bool) -> Result<(), LockError> {
    let mut l = flock(if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    });
    // SAFETY: fcntl on a descriptor `file` owns with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut l) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        return Err(LockError::Os(e));
    }
    // Which kind of lock is in the way (OFD locks do not name a process).
    let mut probe = flock(libc::F_WRLCK);
    // SAFETY: as above.
    let held = if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) } == 0
        && i32::from(probe.l_type) == libc::F_RDLCK
    {
        "a read"
    } else {
        "a write"
    };
    Err(LockError::Held(held))
}

impl VirtioBlk {
    /// The device's counters.
    pub fn counters(&self) -> std::sync::Arc<BlkCounters> {
        self.counters.clone()
    }

    /// Opens the image of `cfg` for the device called `name`.
    pub fn open(name: &str, cfg: &BlkConfig) -> Result<Self, BlkError> {
        let path = cfg.path.clone();
        let bad = |reason: &str| BlkError::Config {
            path: path.clone(),
            reason: reason.to_string(),
        };
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(bad("num_queues must be 1 to 64"));
        }
        if cfg.queue_size < 2 || !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(bad("queue_size must be a power of two from 2 to 32768"));
        }
        let mut o = OpenOptions::new();
        o.read(true).write(!cfg.read_only);
        if cfg.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let open_err = |source| BlkError::Open {
            path: path.clone(),
            source,
        };
        let file = o.open(&cfg.path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(bad("not a regular file (raw images only)"));
        }
        if cfg.lock {
            lock_image(&file, cfg.read_only).map_err(|e| match e {
                LockError::Held(held) => BlkError::Locked {
                    path: path.clone(),
                    held,
                },
                LockError::Os(source) => BlkError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        }
        let size = meta.len();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "{name}: {} is {size} bytes, not a multiple of 512; the last {} bytes are not visible",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let capacity = size / SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        let stem = Path::new(&cfg.path)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let src = format!("alioth-{stem}");
        let n = src.len().min(ID_LEN);
        id[..n].copy_from_slice(&src.as_bytes()[..n]);
        let mut dev = VirtioBlk {
            name: name.to_string(),
            file,
            read_only: cfg.read_only,
            capacity,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            id,
            config: Vec::new(),
            pending: HashMap::with_capacity_and_hasher(
                usize::from(cfg.queue_size) * usize::from(cfg.num_queues),
                Default::default(),
            ),
            log: alioth_virtio::LogLimiter::new(),
            counters: std::sync::Arc::default(),
            limiter: alioth_virtio::RateLimiter::new(&cfg.rate_limit),
            spare_iovs: Vec::new(),
        };
        dev.config = dev.build_config();
        Ok(dev)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn build_config(&self) -> Vec<u8> {
        // Data segments per request: bounded by the ring and by what preadv/io_uring take in
        // one call (IOV_MAX).
        let seg_max = (u32::from(self.queue_size) - 2).min(IOV_MAX);
        BlkConfigSpace {
            capacity: self.capacity.into(),
            size_max: SIZE_MAX.into(),
            seg_max: seg_max.into(),
            blk_size: (SECTOR_SIZE as u32).into(),
            num_queues: self.num_queues.into(),
            max_discard_sectors: MAX_ZERO_SECTORS.into(),
            max_discard_seg: 1.into(),
            discard_sector_alignment: 1.into(),
            max_write_zeroes_sectors: MAX_ZERO_SECTORS.into(),
            max_write_zeroes_seg: 1.into(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    }

    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        bytes.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(bytes / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity)
    }
}

/// A parsed request: lengths only; the buffer list an I/O needs is built once, when it is
/// started ([`VirtioBlk::take_iovs`]).
struct Request {
    /// The request type; `None` when the chain is too short for a header.
    kind: Option<u32>,
    sector: u64,
    /// Bytes of readable data after the header (OUT, DISCARD, WRITE_ZEROES).
    out_len: u64,
    /// Bytes of writable data before the status byte (IN, GET_ID).
    data_len: u64,
    /// Where the status byte goes (offset within the writable buffers).
    status_at: u64,
}

/// The header's size: type, reserved, sector.
const HEADER_LEN: u64 = 16;

/// Appends to `out` the bytes `from..from + len` of `iovs` (splitting the buffers at the ends).
fn sub_iovs(iovs: &[Iov], from: u64, len: u64, out: &mut Vec<Iov>) {
    let end = from.saturating_add(len);
    let mut pos = 0u64;
    for iov in iovs {
        let (start, stop) = (pos, pos + u64::from(iov.len()));
        pos = stop;
        if stop <= from {
            continue;
        }
        if start >= end {
            break;
        }
        // Both cuts are inside this buffer, so they fit in u32.
        let (_, tail) = iov.split(from.saturating_sub(start) as u32);
        let (part, _) = tail.split((end.min(stop) - start.max(from)) as u32);
        out.push(part);
    }
}

fn parse(chain: &DescChain, mem: &GuestMemoryMmap) -> Result<Request, String> {
    let wlen = chain.writable_len();
    if wlen == 0 {
        return Err("request has no writable status byte".into());
    }
    let mut hdr = BlkReqHeader::default();
    let n = chain
        .read_at(mem, 0, hdr.as_mut_bytes())
        .map_err(|e| e.to_string())?;
    let status_at = wlen - 1;
    if (n as u64) < HEADER_LEN {
        // Still answerable: the status byte exists.
        return Ok(Request {
            kind: None,
            sector: 0,
            out_len: 0,
            data_len: status_at,
            status_at,
        });
    }
    Ok(Request {
        kind: Some(hdr.kind.get()),
        sector: hdr.sector.get(),
        out_len: chain.readable_len() - HEADER_LEN,
        data_len: status_at,
        status_at,
    })
}

impl VirtioBlk {
    /// An empty buffer list for a read or write, reused from an earlier one when there is one.
    fn take_iovs(&mut self) -> Vec<Iov> {
        self.spare_iovs.pop().unwrap_or_default()
    }

    fn finish(
        &self,
        chain: &DescChain,
        mem: &GuestMemoryMmap,
        status_at: u64,
        st: u8,
        data: u64,
    ) -> u32 {
        if let Err(e) = chain.write_at(mem, status_at, &[st]) {
            self.log
                .warn(format_args!("{}: cannot write status: {e}", self.name));
        }
        (data + 1) as u32
    }

    /// Write-zeroes where the filesystem has no FALLOC_FL_ZERO_RANGE (tmpfs): punch a hole
    /// (it reads back as zeros), else write zeros. Synchronous; a rare path.
    fn zero_fallback(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on the image's descriptor; the result is checked.
        if unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) } == 0 {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn zero_range(
        &self,
        chain: &DescChain,
        mem: &GuestMemoryMmap,
        r: &Request,
        punch: bool,
    ) -> BufferAction {
        let mut seg = BlkDiscardSegment::default();
        if r.out_len != 16 {
            // One segment per request is what the config space advertises.
            return BufferAction::Written(self.finish(chain, mem, r.status_at, status::UNSUPP, 0));
        }
        if chain
            .read_at(mem, 16, seg.as_mut_bytes())
            .map(|n| n != 16)
            .unwrap_or(true)
        {
            return BufferAction::Written(self.finish(chain, mem, r.status_at, status::IOERR, 0));
        }
        let (sector, sectors, flags) = (seg.sector.get(), seg.num_sectors.get(), seg.flags.get());
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        if self.read_only || sectors > MAX_ZERO_SECTORS || !self.in_range(sector, bytes) {
            return BufferAction::Written(self.finish(chain, mem, r.status_at, status::IOERR, 0));
        }
        if sectors == 0 {
            // Nothing to do (fallocate would refuse a zero length).
            return BufferAction::Written(self.finish(chain, mem, r.status_at, status::OK, 0));
        }
        // Discard, or write-zeroes with the unmap flag: punch a hole (reads back as zeros).
        let unmap = punch || flags & 1 != 0;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        BufferAction::Io(IoOp::Fallocate {
            fd: self.file.as_raw_fd(),
            mode,
            offset: sector * SECTOR_SIZE,
            len: bytes,
        })
    }
}

impl Virtio for VirtioBlk {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Block
    }

    fn device_features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_PACKED,
            VIRTIO_F_EVENT_IDX,
            VIRTIO_F_INDIRECT_DESC,
            F_SIZE_MAX,
            F_SEG_MAX,
            F_BLK_SIZE,
            F_FLUSH,
            F_DISCARD,
            F_WRITE_ZEROES,
        ];
        if self.read_only {
            bits.push(F_RO);
        }
        if self.num_queues > 1 {
            bits.push(F_MQ);
        }
        bits.iter().fold(0, |f, b| f | (1u64 << b))
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn reset(&mut self) {
        // The worker drained every request first; anything left belongs to no chain now.
        self.pending.clear();
    }
}

impl ChainHandler for VirtioBlk {
    fn handle(&mut self, queue: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        let r = match parse(chain, mem) {
            Ok(r) => r,
            Err(e) => return BufferAction::Invalid(e),
        };
        // The limit counts the bytes a read or write moves, and every request; one that does
        // not fit now stays in the ring (nothing about it is kept here).
        if self.limiter.is_limited()
            && let Err(wait) = self.limiter.admit(r.data_len + r.out_len)
        {
            return BufferAction::Throttle(wait);
        }
        let fd = self.file.as_raw_fd();
        let done = |st| BufferAction::Written(self.finish(chain, mem, r.status_at, st, 0));
        let action = match r.kind {
            Some(req::IN) => {
                if !self.in_range(r.sector, r.data_len) {
                    return done(status::IOERR);
                }
                let mut iovs = self.take_iovs();
                sub_iovs(&chain.writable, 0, r.data_len, &mut iovs);
                BufferAction::Io(IoOp::Readv {
                    fd,
                    iovs,
                    offset: r.sector * SECTOR_SIZE,
                })
            }
            Some(req::OUT) => {
                if self.read_only || !self.in_range(r.sector, r.out_len) {
                    return done(status::IOERR);
                }
                let mut iovs = self.take_iovs();
                sub_iovs(&chain.readable, HEADER_LEN, r.out_len, &mut iovs);
                BufferAction::Io(IoOp::Writev {
                    fd,
                    iovs,
                    offset: r.sector * SECTOR_SIZE,
                })
            }
            Some(req::FLUSH) => {
                if self.read_only {
                    return done(status::OK);
                }
                BufferAction::Io(IoOp::Fsync { fd, datasync: true })
            }
            Some(req::GET_ID) => {
                let n = chain
                    .write_at(mem, 0, &self.id[..(r.data_len as usize).min(ID_LEN)])
                    .unwrap_or(0);
                BufferAction::Written(self.finish(chain, mem, r.status_at, status::OK, n as u64))
            }
            Some(req::DISCARD) => self.zero_range(chain, mem, &r, true),
            Some(req::WRITE_ZEROES) => self.zero_range(chain, mem, &r, false),
            None => done(status::IOERR),
            Some(_) => done(status::UNSUPP),
        };
        if let BufferAction::Io(_) = &action {
            let kind = r.kind.unwrap_or_default();
            let (expected, data) = match kind {
                req::IN => (r.data_len, r.data_len),
                req::OUT => (r.out_len, 0),
                _ => (0, 0),
            };
            let zero = match &action {
                BufferAction::Io(IoOp::Fallocate {
                    mode, offset, len, ..
                }) if mode & libc::FALLOC_FL_ZERO_RANGE != 0 => Some((*offset, *len)),
                _ => None,
            };
            let p = Pending {
                kind,
                sector: r.sector,
                expected,
                data,
                status_at: r.status_at,
                zero,
            };
            if self.pending.insert((queue, chain.id()), p).is_some() {
                return BufferAction::Invalid(format!(
                    "chain {} is in flight twice on queue {queue}",
                    chain.id()
                ));
            }
        }
        action
    }

    fn recycle_iovs(&mut self, mut iovs: Vec<Iov>) {
        // One list per request in flight at most is ever needed.
        if self.spare_iovs.len() < usize::from(self.queue_size) * usize::from(self.num_queues) {
            iovs.clear();
            self.spare_iovs.push(iovs);
        }
    }

    fn complete(
        &mut self,
        queue: u16,
        chain: &DescChain,
        mem: &GuestMemoryMmap,
        result: std::io::Result<usize>,
    ) -> u32 {
        let Some(p) = self.pending.remove(&(queue, chain.id())) else {
            self.log.warn(format_args!(
                "{}: completion for chain {} that is not in flight",
                self.name,
                chain.id()
            ));
            return 0;
        };
        let Pending {
            kind,
            sector,
            expected,
            data,
            status_at,
            zero,
        } = p;
        let result = match (result, zero) {
            (Err(e), Some((offset, len))) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.zero_fallback(offset, len).map(|()| 0)
            }
            (r, _) => r,
        };
        let st = match result {
            Ok(n) if n as u64 == expected => status::OK,
            Ok(n) => {
                self.log.warn(format_args!(
                    "{}: short transfer at sector {sector}: {n} of {expected} bytes",
                    self.name
                ));
                status::IOERR
            }
            Err(e) => {
                self.log.warn(format_args!(
                    "{}: request type {kind} at sector {sector}: {e}",
                    self.name
                ));
                status::IOERR
            }
        };
        let data = if st == status::OK { data } else { 0 };
        let c = &self.counters;
        let add = |a: &std::sync::atomic::AtomicU64, n: u64| {
            a.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        match (st, kind) {
            (status::OK, req::IN) => {
                add(&c.read_ops, 1);
                add(&c.read_bytes, expected);
            }
            (status::OK, req::OUT) => {
                add(&c.write_ops, 1);
                add(&c.write_bytes, expected);
            }
            (status::OK, _) => {}
            _ => add(&c.errors, 1),
        }
        self.finish(chain, mem, status_at, st, data)
    }
}

#[cfg(test)]
#[path = "blk_test.rs"]
mod tests;
