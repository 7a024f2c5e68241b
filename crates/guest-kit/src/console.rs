//! The virtio-console test's guest side: output and input round trip through the device, with
//! the host's input waiting (not lost) while the kit posts no receive buffers.

use crate::clock::Deadline;
use crate::tests::{Detail, Verdict, fail};
use crate::virtio::{Device, Options, VirtioError};

const DEVICE_ID: u16 = 3;
const QSIZE: usize = 16;
const BUF: usize = 4096;
/// Bytes the host sends and the kit echoes.
pub const ROUND_TRIP: usize = 64 << 10;
/// What the kit prints (repeatedly) until it reads input.
pub const READY: &[u8] = b"ALIOTH-KIT console ready\n";
/// What precedes the echo.
pub const ECHO: &[u8] = b"ALIOTH-KIT console echo\n";

fn mem(a: usize, len: usize) -> &'static mut [u8] {
    // SAFETY: callers pass areas of the kit's MEMORY (identity-mapped, owned by the kit).
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

struct Console {
    dev: Device,
    base: usize,
    rx_ids: [u16; QSIZE],
}

impl Console {
    fn rx_buf(&self, slot: usize) -> usize {
        self.base + slot * BUF
    }

    fn tx_buf(&self) -> usize {
        self.base + QSIZE * BUF
    }

    /// Writes `data` (at most 4 KiB) and waits for the device to return the buffer.
    fn write(&mut self, data: &[u8]) -> bool {
        let n = data.len().min(BUF);
        mem(self.tx_buf(), n).copy_from_slice(&data[..n]);
        let a = self.tx_buf() as u64;
        self.dev.queue(1).add(&[(a, n as u32, false)]);
        self.dev.kick(1);
        let d = Deadline::after_ms(2000);
        while self.dev.queue(1).used().is_none() {
            if d.passed() {
                return false;
            }
        }
        true
    }

    fn post(&mut self, slot: usize) {
        let a = self.rx_buf(slot) as u64;
        self.rx_ids[slot] = self
            .dev
            .queue(0)
            .add_slot(slot as u16, &[(a, BUF as u32, true)]);
    }
}

/// `console`: prints READY for a second (the host connects and sends 64 KiB meanwhile), posts
/// receive buffers only then, checks every byte, and echoes them after ECHO.
pub fn round_trip(ring: usize, base: usize, packed: bool) -> Verdict {
    let opts = Options {
        features: crate::tests::ring_features(),
        queues: 2,
        packed,
        qsize: QSIZE as u16,
    };
    let dev = match Device::open(DEVICE_ID, ring, &opts) {
        Ok(d) => d,
        Err(VirtioError::NotFound) => {
            return Verdict::Skip(Detail::from_str("no virtio-console device"));
        }
        Err(e) => return fail(format_args!("open {e:?}")),
    };
    let mut c = Console {
        dev,
        base,
        rx_ids: [0; QSIZE],
    };
    c.dev.queue(0).set_interrupts(false);
    c.dev.queue(1).set_interrupts(false);
    for _ in 0..10 {
        if !c.write(READY) {
            return fail(format_args!("output buffer not returned"));
        }
        let d = Deadline::after_ms(100);
        while !d.passed() {}
    }
    // Input has been waiting on the host side; nothing of it may be lost.
    let d = Deadline::after_ms(300);
    while !d.passed() {}
    for slot in 0..QSIZE {
        c.post(slot);
    }
    c.dev.kick(0);
    let mut got = 0usize;
    let d = Deadline::after_ms(20000);
    while got < ROUND_TRIP {
        if d.passed() {
            return fail(format_args!("{got} of {ROUND_TRIP} input bytes"));
        }
        let Some((id, len)) = c.dev.queue(0).used() else {
            continue;
        };
        let Some(slot) = (0..QSIZE).find(|&s| c.rx_ids[s] == id) else {
            continue;
        };
        let data = mem(c.rx_buf(slot), (len as usize).min(BUF));
        if let Some(k) = (0..data.len()).find(|&k| data[k] != pattern(got + k)) {
            return fail(format_args!("input byte {} differs", got + k));
        }
        got += data.len();
        c.post(slot);
        c.dev.kick(0);
    }
    if !c.write(ECHO) {
        return fail(format_args!("output buffer not returned"));
    }
    let mut chunk = [0u8; BUF];
    let mut sent = 0;
    while sent < ROUND_TRIP {
        for (k, b) in chunk.iter_mut().enumerate() {
            *b = pattern(sent + k);
        }
        if !c.write(&chunk) {
            return fail(format_args!("output buffer not returned"));
        }
        sent += BUF;
    }
    Verdict::Pass(Detail::from_str(
        "64KiB in (held while unposted) and echoed",
    ))
}
