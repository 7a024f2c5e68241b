//! The kit's device tests. Each prints its verdict line and exits.

use core::fmt::Write;

use crate::serial::Com1;
use crate::virtio::Device;
use crate::{cpu, exit};

#[repr(C, align(4096))]
struct Pages([u8; 0x80000]);

/// Rings (16 KiB per queue) and buffers, identity-mapped (guest-physical = virtual).
static mut MEMORY: Pages = Pages([0; 0x80000]);

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
    let mut discard_zeroed = false;
    for (i, kind) in [DISCARD, WRITE_ZEROES].into_iter().enumerate() {
        fill(wbuf(), 4096, pattern);
        let w = request(&mut dev, 0, OUT, 8, Some((wbuf(), 4096, false)));
        segment(seg, 8, 8);
        let z = request(&mut dev, 0, kind, 0, Some((seg, 16, false)));
        fill(rbuf(), 4096, |_| 0xaa);
        let r = request(&mut dev, 0, IN, 8, Some((rbuf(), 4096, true)));
        let zeros = bytes(rbuf(), 4096).iter().all(|b| *b == 0);
        detail[i] = z.unwrap_or(0xff);
        // Only write-zeroes promises zeros (virtio 1.2 5.2.6.2); what a discarded range reads
        // back as is the device's choice, so it is reported, not required.
        if kind == DISCARD {
            discard_zeroed = zeros;
        }
        ok &= w == Some(0) && z == Some(0) && r == Some(0) && (kind == DISCARD || zeros);
    }
    verdict(
        out,
        "blk-discard",
        ok,
        format_args!(
            "discard={} write-zeroes={} discard-reads-zeros={discard_zeroed}",
            detail[0], detail[1]
        ),
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

fn cmos(reg: u8) -> u8 {
    // SAFETY: CMOS index/data port I/O (emulated by the #GP handler at CPL3).
    unsafe {
        cpu::outb(0x70, reg);
        cpu::inb(0x71)
    }
}

/// Seconds of the day from the RTC (BCD), the kit's only clock that needs no calibration.
fn rtc_seconds() -> u32 {
    let bcd = |v: u8| u32::from(v >> 4) * 10 + u32::from(v & 0xf);
    bcd(cmos(4)) * 3600 + bcd(cmos(2)) * 60 + bcd(cmos(0))
}

fn wait_second_edge() -> u32 {
    let s = rtc_seconds();
    loop {
        let t = rtc_seconds();
        if t != s {
            return t;
        }
    }
}

fn number(v: &[u8]) -> Option<u64> {
    core::str::from_utf8(v).ok()?.parse().ok()
}

/// `kit.bench=blk-randread,qd=N,bs=4k,secs=S`: 4 KiB random reads at queue depth N for S
/// seconds (RTC), printed as `ALIOTH-KIT bench blk-randread qd=N secs=S ios=X iops=Y`.
pub fn bench(out: &mut Com1, spec: &[u8]) -> ! {
    let mut qd = 1u64;
    let mut secs = 3u64;
    for item in spec.split(|b| *b == b',') {
        if item == b"blk-randread" || item.is_empty() {
            continue;
        }
        if let Some(v) = item.strip_prefix(b"bs=") {
            if v != b"4k" && v != b"4096" {
                verdict(out, "bench", false, format_args!("only bs=4k is supported"));
            }
        } else if let Some(v) = item.strip_prefix(b"qd=") {
            qd = number(v).unwrap_or(1).clamp(1, 64);
        } else if let Some(v) = item.strip_prefix(b"secs=") {
            secs = number(v).unwrap_or(3).clamp(1, 60);
        } else {
            verdict(out, "bench", false, format_args!("unknown bench parameter"));
        }
    }
    let mut dev = match Device::open_sized(
        2,
        memory(),
        1,
        PACKED.load(core::sync::atomic::Ordering::Relaxed),
        256,
    ) {
        Ok(d) => d,
        Err(e) => verdict(out, "bench", false, format_args!("open {e:?}")),
    };
    let blocks = dev.config_u64(0) / 8;
    if blocks == 0 {
        verdict(out, "bench", false, format_args!("disk too small"));
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
    for (slot, id) in ids.iter_mut().enumerate().take(qd as usize) {
        *id = submit(&mut dev, slot as u64, next(&mut rng));
    }
    dev.kick(0);
    let start = wait_second_edge();
    let mut ios = 0u64;
    let mut now = start;
    while now.wrapping_sub(start) < secs as u32 {
        let mut batch = 0;
        while let Some((id, _)) = dev.queue(0).used() {
            let Some(slot) = ids[..qd as usize].iter().position(|i| *i == id) else {
                verdict(out, "bench", false, format_args!("unknown chain {id}"));
            };
            ids[slot] = submit(&mut dev, slot as u64, next(&mut rng));
            batch += 1;
        }
        if batch > 0 {
            dev.kick(0);
            ios += batch;
            if ios % 1024 < batch {
                now = rtc_seconds();
            }
        } else {
            core::hint::spin_loop();
        }
    }
    let _ = writeln!(
        out,
        "ALIOTH-KIT bench blk-randread qd={qd} secs={secs} ios={ios} iops={}",
        ios / secs
    );
    verdict(out, "bench", ios > 0, format_args!("iops={}", ios / secs))
}
