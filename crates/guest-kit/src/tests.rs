//! The kit's device tests. Each prints its verdict line and exits.

use core::fmt::Write;

use crate::serial::Com1;
use crate::virtio::Device;
use crate::{cpu, exit};

#[repr(C, align(4096))]
struct Pages([u8; 65536]);

/// Rings and buffers, identity-mapped (guest-physical = virtual).
static mut MEMORY: Pages = Pages([0; 65536]);

fn memory() -> usize {
    &raw mut MEMORY as usize
}

fn verdict(out: &mut Com1, test: &str, pass: bool, detail: core::fmt::Arguments) -> ! {
    let _ = writeln!(
        out,
        "ALIOTH-KIT result {test} {} {detail}",
        if pass { "pass" } else { "fail" }
    );
    exit(if pass { 0 } else { 1 })
}

/// Waits (bounded) for the used ring of `dev`'s queue 0.
fn wait_used(dev: &mut Device) -> Option<(u16, u32)> {
    for _ in 0..50_000_000u64 {
        if let Some(u) = dev.queue.used() {
            return Some(u);
        }
        core::hint::spin_loop();
    }
    None
}

/// virtio-rng: 64 random bytes arrive through the ring, with an MSI-X interrupt.
pub fn rng(out: &mut Com1) -> ! {
    let ring = memory();
    let buf = ring + 0x4000;
    let mut dev = match Device::open(4, ring) {
        Ok(d) => d,
        Err(e) => verdict(out, "rng", false, format_args!("open {e:?}")),
    };
    let irqs = cpu::irq_count(0);
    let head = dev.queue.add(&[(buf as u64, 64, true)]);
    dev.kick();
    let Some((id, len)) = wait_used(&mut dev) else {
        verdict(
            out,
            "rng",
            false,
            format_args!("no completion, status {:#x}", dev.status()),
        );
    };
    // SAFETY: the device wrote `len` bytes at `buf`, inside MEMORY.
    let bytes = unsafe { core::slice::from_raw_parts(buf as *const u8, len as usize) };
    let nonzero = bytes.iter().any(|b| *b != 0);
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

/// The pattern `blk-rw` writes to sector 1 (the host checks the image for it afterwards).
const PATTERN: &[u8; 16] = b"ALIOTH-KIT-BLK-1";

fn blk_request(
    dev: &mut Device,
    hdr: usize,
    kind: u32,
    sector: u64,
    data: Option<(usize, u32, bool)>,
    status: usize,
) -> Option<u8> {
    // SAFETY: `hdr` and `status` point into MEMORY.
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
    dev.queue.add(&bufs[..n]);
    dev.kick();
    wait_used(dev)?;
    // SAFETY: inside MEMORY.
    Some(unsafe { core::ptr::read_volatile(status as *const u8) })
}

/// virtio-blk: write a sector, flush, read it back and compare.
pub fn blk_rw(out: &mut Com1) -> ! {
    let ring = memory();
    let hdr = ring + 0x4000;
    let status = ring + 0x4100;
    let wbuf = ring + 0x5000;
    let rbuf = ring + 0x6000;
    let mut dev = match Device::open(2, ring) {
        Ok(d) => d,
        Err(e) => verdict(out, "blk-rw", false, format_args!("open {e:?}")),
    };
    let capacity = dev.config_u64(0);
    // SAFETY: wbuf and rbuf are 512-byte areas inside MEMORY.
    unsafe {
        for i in 0..512 {
            let b = PATTERN[i % PATTERN.len()];
            core::ptr::write_volatile((wbuf + i) as *mut u8, b);
            core::ptr::write_volatile((rbuf + i) as *mut u8, 0);
        }
    }
    let w = blk_request(&mut dev, hdr, 1, 1, Some((wbuf, 512, false)), status);
    let f = blk_request(&mut dev, hdr, 4, 0, None, status);
    let r = blk_request(&mut dev, hdr, 0, 1, Some((rbuf, 512, true)), status);
    // SAFETY: both buffers are 512 bytes inside MEMORY.
    let same = unsafe {
        core::slice::from_raw_parts(wbuf as *const u8, 512)
            == core::slice::from_raw_parts(rbuf as *const u8, 512)
    };
    let beyond = blk_request(&mut dev, hdr, 0, capacity, Some((rbuf, 512, true)), status);
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
