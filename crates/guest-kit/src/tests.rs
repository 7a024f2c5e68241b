//! The kit's device tests. Each returns its verdict; `main` prints it and the summary.
//!
//! A test needs only what it checks: it negotiates the features the device offers, and a test
//! whose feature is not offered is skipped (`skip <feature> not offered`), not failed. Every
//! wait has a deadline.

// A verdict carries its detail text inline (the kit has no allocator to box it), so results
// holding one are large; they are returned once per test.
#![allow(clippy::result_large_err)]

use core::fmt::Write;

use crate::clock::{self, Deadline};
use crate::serial::Com1;
use crate::virtio::{Device, Options, VirtioError};
use crate::{cpu, pci};

#[repr(C, align(4096))]
struct Pages([u8; 0x100000]);

/// Rings (16 KiB per queue) and buffers, identity-mapped (guest-physical = virtual).
static mut MEMORY: Pages = Pages([0; 0x100000]);

pub(crate) fn memory() -> usize {
    &raw mut MEMORY as usize
}

/// Buffers start after the rings of eight queues and their indirect tables.
pub(crate) fn buffers() -> usize {
    memory() + 0x40000
}

/// A test's outcome, with what it saw.
pub enum Verdict {
    /// The device behaved as the spec requires.
    Pass(Detail),
    /// It did not.
    Fail(Detail),
    /// The test could not run here (a feature or device is missing).
    Skip(Detail),
}

/// A verdict's detail text (no allocator: a fixed buffer).
pub struct Detail {
    buf: [u8; 200],
    len: usize,
}

impl Default for Detail {
    fn default() -> Self {
        Detail {
            buf: [0; 200],
            len: 0,
        }
    }
}

impl Detail {
    /// A detail with fixed text.
    pub fn from_str(s: &str) -> Detail {
        let mut d = Detail::default();
        let _ = d.write_str(s);
        d
    }

    /// A detail with formatted text (cut at 200 bytes).
    pub fn new(args: core::fmt::Arguments) -> Detail {
        let mut d = Detail {
            buf: [0; 200],
            len: 0,
        };
        let _ = d.write_fmt(args);
        d
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Detail {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

fn pass(args: core::fmt::Arguments) -> Verdict {
    Verdict::Pass(Detail::new(args))
}

pub(crate) fn fail(args: core::fmt::Arguments) -> Verdict {
    Verdict::Fail(Detail::new(args))
}

pub(crate) fn skip(args: core::fmt::Arguments) -> Verdict {
    Verdict::Skip(Detail::new(args))
}

fn check(ok: bool, args: core::fmt::Arguments) -> Verdict {
    if ok { pass(args) } else { fail(args) }
}

/// Whether the tests use packed rings (`kit.ring=packed`).
static PACKED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Selects the ring format for the device tests.
pub fn use_packed_rings(packed: bool) {
    PACKED.store(packed, core::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn packed() -> bool {
    PACKED.load(core::sync::atomic::Ordering::Relaxed)
}

/// EVENT_IDX and INDIRECT_DESC, which the kit uses when offered unless `kit.event_idx=off` /
/// `kit.indirect=off` said not to.
static RING_FEATURES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(
    crate::virtio::VIRTIO_F_EVENT_IDX | crate::virtio::VIRTIO_F_INDIRECT_DESC,
);

/// Turns EVENT_IDX and indirect descriptors on or off for the tests.
pub fn use_ring_features(event_idx: bool, indirect: bool) {
    let mut f = 0;
    if event_idx {
        f |= crate::virtio::VIRTIO_F_EVENT_IDX;
    }
    if indirect {
        f |= crate::virtio::VIRTIO_F_INDIRECT_DESC;
    }
    RING_FEATURES.store(f, core::sync::atomic::Ordering::Relaxed);
}

/// The ring features the tests ask for.
pub fn ring_features() -> u64 {
    RING_FEATURES.load(core::sync::atomic::Ordering::Relaxed)
}

/// Opens a device for a test: a missing device or an unoffered ring format is a skip, any
/// other failure a fail.
fn open(device_id: u16, queues: usize, features: u64, qsize: u16) -> Result<Device, Verdict> {
    let opts = Options {
        features: features | ring_features(),
        queues,
        packed: packed(),
        qsize,
    };
    match Device::open(device_id, memory(), &opts) {
        Ok(d) => Ok(d),
        Err(VirtioError::NotFound) => Err(skip(format_args!(
            "no virtio device {device_id} (virtio-{})",
            match device_id {
                2 => "blk",
                4 => "rng",
                _ => "?",
            }
        ))),
        Err(VirtioError::NotOffered(f)) => Err(skip(format_args!("{f} not offered"))),
        Err(e) => Err(fail(format_args!("open {e:?}"))),
    }
}

/// How long a request may take before the test gives up on it.
const REQUEST_MS: u64 = 5000;

/// Waits (until a deadline) for the used ring of queue `q`.
fn wait_used(dev: &mut Device, q: usize) -> Option<(u16, u32)> {
    let deadline = Deadline::after_ms(REQUEST_MS);
    loop {
        if let Some(u) = dev.queue(q).used() {
            return Some(u);
        }
        if deadline.passed() {
            return None;
        }
        core::hint::spin_loop();
    }
}

/// Waits up to `ms` for `cond`.
fn wait_for(ms: u64, cond: impl Fn() -> bool) -> bool {
    let deadline = Deadline::after_ms(ms);
    while !cond() {
        if deadline.passed() {
            return cond();
        }
        core::hint::spin_loop();
    }
    true
}

fn fill(addr: usize, len: usize, f: impl Fn(usize) -> u8) {
    for i in 0..len {
        // SAFETY: callers pass areas inside MEMORY.
        unsafe { core::ptr::write_volatile((addr + i) as *mut u8, f(i)) };
    }
}

fn bytes(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: callers pass areas inside MEMORY.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// PCI: the buses hold at least one modern virtio device.
pub fn pci(out: &mut Com1) -> Verdict {
    let found = pci::scan(out);
    check(
        found.virtio > 0,
        format_args!(
            "devices={} virtio={} config={}",
            found.devices,
            found.virtio,
            pci::mechanism()
        ),
    )
}

/// virtio-rng: 64 random bytes arrive through the ring, with an MSI-X interrupt when the device
/// has MSI-X.
pub fn rng() -> Verdict {
    let buf = buffers();
    let mut dev = match open(4, 1, 0, 16) {
        Ok(d) => d,
        Err(v) => return v,
    };
    let irqs = cpu::irq_count(0);
    fill(buf, 64, |_| 0);
    let head = dev.queue(0).add(&[(buf as u64, 64, true)]);
    dev.kick(0);
    let Some((id, len)) = wait_used(&mut dev, 0) else {
        return fail(format_args!(
            "no completion after {REQUEST_MS} ms, status {:#x}",
            dev.status()
        ));
    };
    let nonzero = bytes(buf, 64).iter().any(|b| *b != 0);
    let msix = dev.msix[0];
    let got_irq = msix && wait_for(1000, || cpu::irq_count(0) > irqs);
    check(
        id == head && (1..=64).contains(&len) && nonzero && (got_irq || !msix),
        format_args!(
            "at={} len={len} nonzero={nonzero} msix={msix} interrupt={got_irq}",
            dev.bdf
        ),
    )
}

/// The pattern written to sector 1 by `blk-rw` and to sector 3 by `blk-flush` (the host
/// checks the image for it afterwards).
pub const PATTERN: &[u8; 16] = b"ALIOTH-KIT-BLK-1";

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;

const BLK_F_RO: u64 = 1 << 5;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Every virtio-blk feature the tests may use.
const BLK_FEATURES: u64 = BLK_F_RO | BLK_F_FLUSH | BLK_F_MQ | BLK_F_DISCARD | BLK_F_WRITE_ZEROES;

fn open_blk(queues: usize) -> Result<Device, Verdict> {
    open(2, queues, BLK_FEATURES, 16)
}

/// One request on queue `q`: header, optional data buffer, status byte. Returns the status.
fn request(
    dev: &mut Device,
    q: usize,
    kind: u32,
    sector: u64,
    data: Option<(usize, u32, bool)>,
) -> Option<u8> {
    let hdr = buffers() + 0x100 * q;
    let status = hdr + 0x80;
    // SAFETY: header and status are inside MEMORY.
    unsafe {
        core::ptr::write_volatile(hdr as *mut u32, kind);
        core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
        core::ptr::write_volatile((hdr + 8) as *mut u64, sector);
        core::ptr::write_volatile(status as *mut u8, 0xff);
    }
    let mut bufs = [(hdr as u64, 16u32, false); 3];
    let mut n = 1;
    if let Some((addr, len, write)) = data {
        bufs[n] = (addr as u64, len, write);
        n += 1;
    }
    bufs[n] = (status as u64, 1, true);
    n += 1;
    dev.queue(q).add(&bufs[..n]);
    dev.kick(q as u16);
    wait_used(dev, q)?;
    // SAFETY: inside MEMORY.
    Some(unsafe { core::ptr::read_volatile(status as *const u8) })
}

fn wbuf() -> usize {
    buffers() + 0x1000
}

fn rbuf() -> usize {
    buffers() + 0x3000
}

fn pattern(i: usize) -> u8 {
    PATTERN[i % PATTERN.len()]
}

/// The disk's capacity in sectors: a failed test if there is no configuration.
fn capacity(dev: &Device) -> Result<u64, Verdict> {
    dev.config_u64(0)
        .ok_or_else(|| fail(format_args!("no device-specific configuration (capacity)")))
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(verdict) => return verdict,
        }
    };
}

/// virtio-blk: write a sector, flush (when offered), read it back and compare.
pub fn blk_rw() -> Verdict {
    let mut dev = tri!(open_blk(1));
    let capacity = tri!(capacity(&dev));
    if dev.has(BLK_F_RO) {
        return skip(format_args!("the device is read-only"));
    }
    fill(wbuf(), 512, pattern);
    fill(rbuf(), 512, |_| 0);
    let w = request(&mut dev, 0, OUT, 1, Some((wbuf(), 512, false)));
    let f = if dev.has(BLK_F_FLUSH) {
        request(&mut dev, 0, FLUSH, 0, None)
    } else {
        Some(0)
    };
    let r = request(&mut dev, 0, IN, 1, Some((rbuf(), 512, true)));
    let same = bytes(wbuf(), 512) == bytes(rbuf(), 512);
    check(
        w == Some(0) && f == Some(0) && r == Some(0) && same,
        format_args!(
            "at={} offered={:#x} capacity={capacity} write={w:?} flush={f:?} read={r:?} same={same}",
            dev.bdf, dev.offered
        ),
    )
}

/// virtio-blk: a read at the capacity, and one straddling it, fail with IOERR (the device has
/// no such sectors) and leave the buffer unwritten past the end.
pub fn blk_beyond_end() -> Verdict {
    let mut dev = tri!(open_blk(1));
    let capacity = tri!(capacity(&dev));
    let at = request(&mut dev, 0, IN, capacity, Some((rbuf(), 512, true)));
    let across = request(&mut dev, 0, IN, capacity - 1, Some((rbuf(), 1024, true)));
    check(
        at == Some(1) && across == Some(1),
        format_args!(
            "capacity={capacity} read-at-end={at:?} read-across-end={across:?} (want Some(1) = IOERR)"
        ),
    )
}

/// virtio-blk read-only: reads work, writes fail with IOERR.
pub fn blk_ro() -> Verdict {
    let mut dev = tri!(open_blk(1));
    if !dev.has(BLK_F_RO) {
        return skip(format_args!("VIRTIO_BLK_F_RO not offered"));
    }
    fill(wbuf(), 512, pattern);
    let w = request(&mut dev, 0, OUT, 1, Some((wbuf(), 512, false)));
    let r = request(&mut dev, 0, IN, 1, Some((rbuf(), 512, true)));
    check(
        w == Some(1) && r == Some(0),
        format_args!("write={w:?} read={r:?}"),
    )
}

/// virtio-blk flush: a write followed by a flush, both OK (the host checks sector 3).
pub fn blk_flush() -> Verdict {
    let mut dev = tri!(open_blk(1));
    if !dev.has(BLK_F_FLUSH) {
        return skip(format_args!("VIRTIO_BLK_F_FLUSH not offered"));
    }
    fill(wbuf(), 512, pattern);
    let w = request(&mut dev, 0, OUT, 3, Some((wbuf(), 512, false)));
    let f = request(&mut dev, 0, FLUSH, 0, None);
    check(
        w == Some(0) && f == Some(0),
        format_args!("write={w:?} flush={f:?}"),
    )
}

fn segment(addr: usize, sector: u64, n: u32) {
    // SAFETY: a 16-byte area inside MEMORY.
    unsafe {
        core::ptr::write_volatile(addr as *mut u64, sector);
        core::ptr::write_volatile((addr + 8) as *mut u32, n);
        core::ptr::write_volatile((addr + 12) as *mut u32, 0);
    }
}

/// virtio-blk discard and write-zeroes (each when offered): written sectors read back as zeros
/// after write-zeroes.
pub fn blk_discard() -> Verdict {
    let mut dev = tri!(open_blk(1));
    let kinds = [
        (DISCARD, BLK_F_DISCARD, "discard"),
        (WRITE_ZEROES, BLK_F_WRITE_ZEROES, "write-zeroes"),
    ];
    if kinds.iter().all(|(_, f, _)| !dev.has(*f)) {
        return skip(format_args!(
            "neither VIRTIO_BLK_F_DISCARD nor VIRTIO_BLK_F_WRITE_ZEROES offered"
        ));
    }
    let seg = buffers() + 0x800;
    let mut ok = true;
    let mut status = [None; 2];
    let mut discard_zeroed = None;
    for (i, (kind, feature, _)) in kinds.into_iter().enumerate() {
        if !dev.has(feature) {
            continue;
        }
        fill(wbuf(), 4096, pattern);
        let w = request(&mut dev, 0, OUT, 8, Some((wbuf(), 4096, false)));
        segment(seg, 8, 8);
        let z = request(&mut dev, 0, kind, 0, Some((seg, 16, false)));
        fill(rbuf(), 4096, |_| 0xaa);
        let r = request(&mut dev, 0, IN, 8, Some((rbuf(), 4096, true)));
        let zeros = bytes(rbuf(), 4096).iter().all(|b| *b == 0);
        status[i] = z;
        // Only write-zeroes promises zeros (virtio 1.2 §5.2.6.2); what a discarded range reads
        // back as is the device's choice, so it is reported, not required.
        if kind == DISCARD {
            discard_zeroed = Some(zeros);
        }
        ok &= w == Some(0) && z == Some(0) && r == Some(0) && (kind == DISCARD || zeros);
    }
    check(
        ok,
        format_args!(
            "discard={:?} write-zeroes={:?} discard-reads-zeros={discard_zeroed:?}",
            status[0], status[1]
        ),
    )
}

/// virtio-blk with two queues: a request on each completes, each with its own interrupt when
/// the device has MSI-X.
pub fn blk_mq() -> Verdict {
    let mut dev = tri!(open_blk(2).map_err(|v| match v {
        Verdict::Fail(d) if d.as_str().contains("NoQueue") => {
            skip(format_args!("a second queue is not offered"))
        }
        v => v,
    }));
    if !dev.has(BLK_F_MQ) {
        return skip(format_args!("VIRTIO_BLK_F_MQ not offered"));
    }
    // num_queues (virtio 1.2 §5.2.4) must name at least the two queues in use.
    let num_queues = dev.config_u16(34);
    if num_queues.is_none_or(|n| n < 2) {
        return fail(format_args!(
            "VIRTIO_BLK_F_MQ with num_queues={num_queues:?}"
        ));
    }
    let before = [cpu::irq_count(0), cpu::irq_count(1)];
    fill(wbuf(), 512, pattern);
    let a = request(&mut dev, 0, OUT, 5, Some((wbuf(), 512, false)));
    let b = request(&mut dev, 1, IN, 5, Some((rbuf(), 512, true)));
    let same = bytes(wbuf(), 512) == bytes(rbuf(), 512);
    let msix = dev.msix[0] && dev.msix[1];
    let irqs = msix
        && wait_for(1000, || {
            cpu::irq_count(0) > before[0] && cpu::irq_count(1) > before[1]
        });
    check(
        a == Some(0) && b == Some(0) && same && (irqs || !msix),
        format_args!("q0={a:?} q1={b:?} same={same} msix={msix} per-queue-interrupts={irqs}"),
    )
}

/// How long the hostile-chain test waits for NEEDS_RESET.
const NEEDS_RESET_SECS: u64 = 10;

/// A descriptor chain with no end: the device must set NEEDS_RESET (virtio 1.2 §2.1.1), and the
/// VMM must survive to let the kit report.
pub fn hostile_chain() -> Verdict {
    let mut dev = tri!(open_blk(1));
    let buf = buffers() as u64;
    dev.queue(0).add_endless_chain(buf);
    dev.kick_now(0);
    needs_reset(|| dev.status())
}

/// Waits (until a deadline) for DEVICE_NEEDS_RESET in the status `status` reads.
fn needs_reset(status: impl Fn() -> u8) -> Verdict {
    const NEEDS_RESET: u8 = 0x40;
    let set = wait_for(NEEDS_RESET_SECS * 1000, || status() & NEEDS_RESET != 0);
    let status = status();
    if set {
        pass(format_args!("status={status:#x}"))
    } else {
        fail(format_args!(
            "no NEEDS_RESET after {NEEDS_RESET_SECS} s, status={status:#x}"
        ))
    }
}

/// virtio-blk reset: after I/O, a reset (status 0) completes, and the device comes up again with
/// fresh queues that work (virtio 1.2 §2.4, §4.1.4.3.2).
pub fn blk_reset() -> Verdict {
    let mut dev = tri!(open_blk(1));
    let r1 = request(&mut dev, 0, IN, 0, Some((rbuf(), 512, true)));
    if !dev.reset() {
        return fail(format_args!("status not 0 a second after the reset"));
    }
    let mut dev = tri!(open_blk(1));
    let r2 = request(&mut dev, 0, IN, 0, Some((rbuf(), 512, true)));
    check(
        r1 == Some(0) && r2 == Some(0),
        format_args!("before={r1:?} after-reset={r2:?}"),
    )
}

fn number(v: &[u8]) -> Option<u64> {
    core::str::from_utf8(v).ok()?.parse().ok()
}

/// `kit.bench=blk-randread,qd=N,bs=4k,secs=S`: 4 KiB random reads at queue depth N for S
/// seconds of the kit's clock, polling the used ring. Prints `ALIOTH-KIT bench-window start`
/// and `... end` around the measured window (so the host can time it too) and then
/// `ALIOTH-KIT bench blk-randread qd=N secs=S ios=X iops=Y ns=Z`.
pub fn bench(out: &mut Com1, spec: &[u8]) -> Verdict {
    let mut qd = 1u64;
    let mut secs = 3u64;
    for item in spec.split(|b| *b == b',') {
        if item == b"blk-randread" || item.is_empty() {
            continue;
        }
        if let Some(v) = item.strip_prefix(b"bs=") {
            if v != b"4k" && v != b"4096" {
                return fail(format_args!("only bs=4k is supported"));
            }
        } else if let Some(v) = item.strip_prefix(b"qd=") {
            qd = number(v).unwrap_or(1).clamp(1, 64);
        } else if let Some(v) = item.strip_prefix(b"secs=") {
            secs = number(v).unwrap_or(3).clamp(1, 60);
        } else {
            return fail(format_args!("unknown bench parameter"));
        }
    }
    let mut dev = tri!(open(2, 1, 0, 256));
    let blocks = tri!(capacity(&dev)) / 8;
    if blocks == 0 {
        return fail(format_args!("disk too small"));
    }
    let base = buffers();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let next = |rng: &mut u64| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % blocks
    };
    // Slot i: header at base + 32 i, status at base + 0x1000 + i, data at base + 0x2000 + 4 KiB i.
    let submit = |dev: &mut Device, slot: u64, block: u64| -> u16 {
        let hdr = base + 32 * slot as usize;
        let status = base + 0x1000 + slot as usize;
        let data = base + 0x2000 + 4096 * slot as usize;
        // SAFETY: inside MEMORY.
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, IN);
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, block * 8);
        }
        dev.queue(0).add_slot(
            slot as u16,
            &[
                (hdr as u64, 16, false),
                (data as u64, 4096, true),
                (status as u64, 1, true),
            ],
        )
    };
    // Polling mode: the loop below watches the used ring, so no interrupts.
    dev.queue(0).set_interrupts(false);
    let mut ids = [0u16; 64];
    let _ = writeln!(out, "ALIOTH-KIT bench-window start");
    let start = clock::now_ns();
    let end = start + secs * 1_000_000_000;
    for (slot, id) in ids.iter_mut().enumerate().take(qd as usize) {
        *id = submit(&mut dev, slot as u64, next(&mut rng));
    }
    dev.kick(0);
    let mut ios = 0u64;
    let mut now = start;
    let mut idle = Deadline::after_ms(REQUEST_MS);
    while now < end {
        let mut batch = 0;
        while let Some((id, _)) = dev.queue(0).used() {
            let Some(slot) = ids[..qd as usize].iter().position(|i| *i == id) else {
                return fail(format_args!("unknown chain {id}"));
            };
            ids[slot] = submit(&mut dev, slot as u64, next(&mut rng));
            batch += 1;
        }
        if batch > 0 {
            dev.kick(0);
            ios += batch;
            idle = Deadline::after_ms(REQUEST_MS);
        } else if idle.passed() {
            return fail(format_args!("no completion for {REQUEST_MS} ms"));
        } else {
            core::hint::spin_loop();
        }
        now = clock::now_ns();
    }
    let ns = now - start;
    let _ = writeln!(out, "ALIOTH-KIT bench-window end");
    let iops = u128::from(ios) * 1_000_000_000 / u128::from(ns.max(1));
    let _ = writeln!(
        out,
        "ALIOTH-KIT bench blk-randread qd={qd} secs={secs} ios={ios} iops={iops} ns={ns}"
    );
    check(ios > 0, format_args!("iops={iops}"))
}

/// The kit's own mappings above 4 GiB (where 64-bit BARs may sit) reach RAM there: needs a VM
/// with RAM above 4 GiB (Alioth: `--memory 3200M` puts 128 MiB at 4 GiB).
pub fn map_high() -> Verdict {
    let mut checked = 0;
    for addr in [0x1_0000_0000u64, 0x1_0400_0000, 0x1_07ff_f000] {
        if let Err(e) = crate::mm::map(addr, 4096) {
            return fail(format_args!("map {addr:#x}: {e:?}"));
        }
        let p = addr as *mut u64;
        for i in 0..512u64 {
            // SAFETY: just mapped; the VM this test runs in has RAM there (see above).
            unsafe { core::ptr::write_volatile(p.add(i as usize), addr ^ i) };
        }
        // SAFETY: as above.
        let ok =
            (0..512u64).all(|i| unsafe { core::ptr::read_volatile(p.add(i as usize)) } == addr ^ i);
        if !ok {
            return fail(format_args!(
                "{addr:#x} does not read back what was written"
            ));
        }
        checked += 1;
    }
    pass(format_args!(
        "{checked} pages above 4 GiB written and read back"
    ))
}

/// The net responder (`net`, `net-mq`, `net-starve`): answers the host until it says stop.
pub fn net(out: &mut Com1, mq: bool, starve: bool, csum: bool, secs: u64) -> Verdict {
    let mode = crate::net::Mode {
        mq,
        csum,
        rx_buffers: if starve { 2 } else { 16 },
        rx_delay_us: if starve { 2000 } else { 0 },
    };
    crate::net::respond(out, memory(), buffers(), packed(), &mode, secs)
}

/// A receive chain with no writable buffer, or a transmit chain with no end: virtio-net must
/// set NEEDS_RESET, and the VMM must survive.
pub fn net_hostile(rx: bool) -> Verdict {
    let mode = crate::net::Mode {
        mq: false,
        csum: false,
        rx_buffers: 4,
        rx_delay_us: 0,
    };
    let mut nic = match crate::net::Nic::open(memory(), buffers(), packed(), &mode) {
        Ok(n) => n,
        Err(v) => return v,
    };
    if rx {
        nic.hostile_rx();
    } else {
        nic.hostile_tx();
    }
    needs_reset(|| nic.status())
}

/// `kit.bench=tx|rx,size=N,secs=S` for `net-bench`.
pub fn net_bench(out: &mut Com1, spec: &[u8]) -> Verdict {
    let (mut tx, mut size, mut secs) = (true, 60usize, 3u64);
    for item in spec.split(|b| *b == b',') {
        match item {
            b"tx" => tx = true,
            b"rx" => tx = false,
            _ => {
                if let Some(v) = item.strip_prefix(b"size=") {
                    size = number(v).unwrap_or(60) as usize;
                } else if let Some(v) = item.strip_prefix(b"secs=") {
                    secs = number(v).unwrap_or(3).clamp(1, 60);
                } else if !item.is_empty() {
                    return fail(format_args!("unknown bench parameter"));
                }
            }
        }
    }
    crate::net::bench(out, memory(), buffers(), packed(), tx, size, secs)
}

/// The byte at offset `k` of the snapshot test's sector for iteration `i`.
fn snap_byte(i: usize, k: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (k as u8) ^ ((i >> 8) as u8)
}

/// First sector the snapshot test writes.
const SNAP_SECTOR: u64 = 16;

/// `snapshot` (`kit.iters=N`, at most 1024): iteration i writes sector 16 + i with a pattern of
/// i, reads it back, and re-reads one written earlier, printing `ALIOTH-KIT snapshot progress
/// i` every 25 iterations with about 10 ms between iterations, so a harness can pause,
/// snapshot and restore it mid-way; at the end every sector is read and checked.
pub fn snapshot(out: &mut Com1, iters: usize) -> Verdict {
    let mut dev = tri!(open_blk(1));
    let capacity = tri!(capacity(&dev));
    let iters = iters.clamp(1, 1024);
    if capacity < SNAP_SECTOR + iters as u64 {
        return fail(format_args!("the disk is too small"));
    }
    let check_sector = |dev: &mut Device, i: usize| -> Result<(), Verdict> {
        fill(rbuf(), 512, |_| 0);
        let r = request(
            dev,
            0,
            IN,
            SNAP_SECTOR + i as u64,
            Some((rbuf(), 512, true)),
        );
        if r != Some(0) {
            return Err(fail(format_args!("read of iteration {i}'s sector: {r:?}")));
        }
        let got = bytes(rbuf(), 512);
        if let Some(k) = (0..512).find(|&k| got[k] != snap_byte(i, k)) {
            return Err(fail(format_args!(
                "iteration {i}'s sector differs at byte {k}"
            )));
        }
        Ok(())
    };
    for i in 0..iters {
        fill(wbuf(), 512, |k| snap_byte(i, k));
        let w = request(
            &mut dev,
            0,
            OUT,
            SNAP_SECTOR + i as u64,
            Some((wbuf(), 512, false)),
        );
        if w != Some(0) {
            return fail(format_args!("write of iteration {i}: {w:?}"));
        }
        tri!(check_sector(&mut dev, i));
        tri!(check_sector(&mut dev, i / 2));
        if i % 25 == 0 {
            let _ = writeln!(out, "ALIOTH-KIT snapshot progress {i}");
        }
        let d = Deadline::after_ms(10);
        while !d.passed() {
            core::hint::spin_loop();
        }
    }
    for i in 0..iters {
        tri!(check_sector(&mut dev, i));
    }
    pass(format_args!("counted {iters}, every sector intact"))
}
