//! The kit's device tests. Each prints its verdict line and exits.

use core::fmt::Write;

use crate::serial::Com1;
use crate::virtio::Device;
use crate::{cpu, exit};

#[repr(C, align(4096))]
struct Pages([u8; 0x20000]);

/// Rings (16 KiB per queue) and buffers, identity-mapped (guest-physical = virtual).
static mut MEMORY: Pages = Pages([0; 0x20000]);

fn memory() -> usize {
    &raw mut MEMORY as usize
}

/// Buffers start after the rings of four queues.
fn buffers() -> usize {
    memory() + 0x10000
}

fn verdict(out: &mut Com1, test: &str, pass: bool, detail: core::fmt::Arguments) -> ! {
    let _ = writeln!(
        out,
        "ALIOTH-KIT result {test} {} {detail}",
        if pass { "pass" } else { "fail" }
    );
    exit(if pass { 0 } else { 1 })
}

/// Whether the tests use packed rings (`kit.ring=packed`).
static PACKED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Selects the ring format for the device tests.
pub fn use_packed_rings(packed: bool) {
    PACKED.store(packed, core::sync::atomic::Ordering::Relaxed);
}

fn open(out: &mut Com1, test: &str, device_id: u16, nq: usize) -> Device {
    let packed = PACKED.load(core::sync::atomic::Ordering::Relaxed);
    match Device::open(device_id, memory(), nq, packed) {
        Ok(d) => d,
        Err(e) => verdict(out, test, false, format_args!("open {e:?}")),
    }
}

/// Waits (bounded) for the used ring of queue `q`.
fn wait_used(dev: &mut Device, q: usize) -> Option<(u16, u32)> {
    for _ in 0..50_000_000u64 {
        if let Some(u) = dev.queue(q).used() {
            return Some(u);
        }
        core::hint::spin_loop();
    }
    None
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

/// virtio-rng: 64 random bytes arrive through the ring, with an MSI-X interrupt.
pub fn rng(out: &mut Com1) -> ! {
    let buf = buffers();
    let mut dev = open(out, "rng", 4, 1);
    let irqs = cpu::irq_count(0);
    let head = dev.queue(0).add(&[(buf as u64, 64, true)]);
    dev.kick(0);
    let Some((id, len)) = wait_used(&mut dev, 0) else {
        verdict(
            out,
            "rng",
            false,
            format_args!("no completion, status {:#x}", dev.status()),
        );
    };
    let nonzero = bytes(buf, len as usize).iter().any(|b| *b != 0);
    let mut spins = 0u64;
    while cpu::irq_count(0) == irqs && spins < 10_000_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    let got_irq = cpu::irq_count(0) > irqs;
    verdict(
        out,
        "rng",
        id == head && len == 64 && nonzero && got_irq,
        format_args!("len={len} nonzero={nonzero} msix={got_irq}"),
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

/// virtio-blk: write a sector, flush, read it back and compare; reading past the end fails.
pub fn blk_rw(out: &mut Com1) -> ! {
    let mut dev = open(out, "blk-rw", 2, 1);
    let capacity = dev.config_u64(0);
    fill(wbuf(), 512, pattern);
    fill(rbuf(), 512, |_| 0);
    let w = request(&mut dev, 0, OUT, 1, Some((wbuf(), 512, false)));
    let f = request(&mut dev, 0, FLUSH, 0, None);
    let r = request(&mut dev, 0, IN, 1, Some((rbuf(), 512, true)));
    let same = bytes(wbuf(), 512) == bytes(rbuf(), 512);
    let beyond = request(&mut dev, 0, IN, capacity, Some((rbuf(), 512, true)));
    let pass = w == Some(0) && f == Some(0) && r == Some(0) && same && beyond == Some(1);
    verdict(
        out,
        "blk-rw",
        pass,
        format_args!(
            "capacity={capacity} write={w:?} flush={f:?} read={r:?} same={same} beyond-end={beyond:?}"
        ),
    )
}

/// virtio-blk read-only: reads work, writes fail with IOERR.
pub fn blk_ro(out: &mut Com1) -> ! {
    let mut dev = open(out, "blk-ro", 2, 1);
    fill(wbuf(), 512, pattern);
    let w = request(&mut dev, 0, OUT, 1, Some((wbuf(), 512, false)));
    let r = request(&mut dev, 0, IN, 1, Some((rbuf(), 512, true)));
    verdict(
        out,
        "blk-ro",
        w == Some(1) && r == Some(0),
        format_args!("write={w:?} read={r:?}"),
    )
}

/// virtio-blk flush: a write followed by a flush, both OK (the host checks sector 3).
pub fn blk_flush(out: &mut Com1) -> ! {
    let mut dev = open(out, "blk-flush", 2, 1);
    fill(wbuf(), 512, pattern);
    let w = request(&mut dev, 0, OUT, 3, Some((wbuf(), 512, false)));
    let f = request(&mut dev, 0, FLUSH, 0, None);
    verdict(
        out,
        "blk-flush",
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

/// virtio-blk discard and write-zeroes: written sectors read back as zeros.
pub fn blk_discard(out: &mut Com1) -> ! {
    let mut dev = open(out, "blk-discard", 2, 1);
    let seg = buffers() + 0x800;
    let mut ok = true;
    let mut detail = [0u8; 4];
    for (i, kind) in [DISCARD, WRITE_ZEROES].into_iter().enumerate() {
        fill(wbuf(), 4096, pattern);
        let w = request(&mut dev, 0, OUT, 8, Some((wbuf(), 4096, false)));
        segment(seg, 8, 8);
        let z = request(&mut dev, 0, kind, 0, Some((seg, 16, false)));
        fill(rbuf(), 4096, |_| 0xaa);
        let r = request(&mut dev, 0, IN, 8, Some((rbuf(), 4096, true)));
        let zeros = bytes(rbuf(), 4096).iter().all(|b| *b == 0);
        detail[i] = z.unwrap_or(0xff);
        ok &= w == Some(0) && z == Some(0) && r == Some(0) && zeros;
    }
    verdict(
        out,
        "blk-discard",
        ok,
        format_args!("discard={} write-zeroes={}", detail[0], detail[1]),
    )
}

/// virtio-blk with two queues: a request on each completes with its own interrupt.
pub fn blk_mq(out: &mut Com1) -> ! {
    let mut dev = open(out, "blk-mq", 2, 2);
    let before = [cpu::irq_count(0), cpu::irq_count(1)];
    fill(wbuf(), 512, pattern);
    let a = request(&mut dev, 0, OUT, 5, Some((wbuf(), 512, false)));
    let b = request(&mut dev, 1, IN, 5, Some((rbuf(), 512, true)));
    let same = bytes(wbuf(), 512) == bytes(rbuf(), 512);
    let mut spins = 0u64;
    while (cpu::irq_count(0) == before[0] || cpu::irq_count(1) == before[1]) && spins < 10_000_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    let irqs = cpu::irq_count(0) > before[0] && cpu::irq_count(1) > before[1];
    verdict(
        out,
        "blk-mq",
        a == Some(0) && b == Some(0) && same && irqs,
        format_args!("q0={a:?} q1={b:?} same={same} per-queue-msix={irqs}"),
    )
}

/// A cyclic descriptor chain: the device must report NEEDS_RESET, and the VMM must survive
/// (this test reports through the exit device afterwards).
pub fn hostile_chain(out: &mut Com1) -> ! {
    let mut dev = open(out, "hostile-chain", 2, 1);
    let buf = buffers() as u64;
    dev.queue(0).add_endless_chain(buf);
    dev.kick(0);
    const NEEDS_RESET: u8 = 0x40;
    let mut spins = 0u64;
    while dev.status() & NEEDS_RESET == 0 && spins < 50_000_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    let status = dev.status();
    verdict(
        out,
        "hostile-chain",
        status & NEEDS_RESET != 0,
        format_args!("status={status:#x}"),
    )
}
