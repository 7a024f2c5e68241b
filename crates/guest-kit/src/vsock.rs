//! A virtio-vsock driver (polling, split or packed rings, stream sockets only) and the vsock
//! tests' guest side. The host side (listeners, a `CONNECT` client, a slow reader) is run by
//! `cargo xtask e2e`; every stream carries [`pattern`] bytes so both ends check every byte.
//!
//! Flow control follows the protocol: the kit never sends more than the host's credit
//! (`buf_alloc - (tx_cnt - fwd_cnt)`), consumes what it receives at once and reports its
//! forward count back.

// Verdicts carry their text inline (no allocator), so `Result<_, Verdict>` is large.
#![allow(clippy::result_large_err)]

use crate::clock::Deadline;
use crate::tests::{Detail, Verdict, fail};
use crate::virtio::{Device, Options, VirtioError};

/// The device ID.
const DEVICE_ID: u16 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Header length.
const HDR: usize = 44;
/// Buffers per queue and their payload size.
const SLOTS: usize = 32;
const PAYLOAD: usize = 4096;
/// The kit's receive window (it consumes data at once, so any size works).
const BUF_ALLOC: u32 = 256 << 10;
/// Connections at once.
pub const MAX_CONNS: usize = 72;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// Byte `i` of every test stream (period 251, so a lost or repeated chunk shows).
pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// A packet header (written and read field by field: the layout is packed).
#[derive(Clone, Copy, Default, Debug)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }

    fn read(b: &[u8]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Free,
    Connecting,
    Established,
    /// Reset by the host (or refused).
    Reset,
}

/// One connection.
#[derive(Clone, Copy)]
pub struct Conn {
    pub state: State,
    pub local: u32,
    pub peer: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    reported: u32,
    /// SHUTDOWN flags the host sent.
    pub peer_shutdown: u32,
    /// Bytes received.
    pub received: usize,
}

const FREE: Conn = Conn {
    state: State::Free,
    local: 0,
    peer: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    tx_cnt: 0,
    fwd_cnt: 0,
    reported: 0,
    peer_shutdown: 0,
    received: 0,
};

/// What the driver counted.
#[derive(Default, Clone, Copy)]
pub struct Stats {
    /// Times a send found no host credit.
    pub credit_stalls: u64,
    /// RST packets that named no connection of the kit.
    pub orphan_rsts: u64,
    /// Credit updates from the host.
    pub credit_updates: u64,
}

/// A virtio-vsock device driven by polling.
pub struct Vsock {
    dev: Device,
    /// The guest's CID (from the device configuration).
    pub cid: u64,
    base: usize,
    rx_ids: [u16; SLOTS],
    tx_ids: [u16; SLOTS],
    tx_busy: [bool; SLOTS],
    /// Connections by index.
    pub conns: [Conn; MAX_CONNS],
    next_port: u32,
    listen: Option<u32>,
    /// Bench mode ([`Vsock::bulk_rx`]).
    bulk: bool,
    /// Counters.
    pub stats: Stats,
}

fn mem(a: usize, len: usize) -> &'static mut [u8] {
    // SAFETY: callers pass areas of the kit's MEMORY (identity-mapped, owned by the kit).
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}

fn skip(why: &str) -> Verdict {
    Verdict::Skip(Detail::from_str(why))
}

/// Data arriving for connection `i`: `(i, bytes)`.
pub type Sink<'a> = &'a mut dyn FnMut(usize, &[u8]);

impl Vsock {
    /// Brings up the vsock device: rings at `ring`, buffers at `base` (0x48000 bytes).
    pub fn open(ring: usize, base: usize, packed: bool) -> Result<Vsock, Verdict> {
        let opts = Options {
            features: crate::tests::ring_features(),
            queues: 3,
            packed,
            qsize: 64,
        };
        let dev = match Device::open(DEVICE_ID, ring, &opts) {
            Ok(d) => d,
            Err(VirtioError::NotFound) => return Err(skip("no virtio-vsock device")),
            Err(VirtioError::NotOffered(f)) => return Err(skip(f)),
            Err(e) => return Err(fail(format_args!("open {e:?}"))),
        };
        let Some(cid) = dev.config_u64(0) else {
            return Err(fail(format_args!("no device configuration")));
        };
        let mut v = Vsock {
            dev,
            cid,
            base,
            rx_ids: [0; SLOTS],
            tx_ids: [0; SLOTS],
            tx_busy: [false; SLOTS],
            conns: [FREE; MAX_CONNS],
            next_port: 40000,
            listen: None,
            bulk: false,
            stats: Stats::default(),
        };
        for q in 0..3 {
            v.dev.queue(q).set_interrupts(false);
        }
        for slot in 0..SLOTS {
            v.post_rx(slot);
        }
        v.dev.kick(0);
        // Event buffers (the device keeps them for TRANSPORT_RESET).
        for i in 0..4 {
            let a = (v.base + 0x46000 + i * 8) as u64;
            v.dev.queue(2).add(&[(a, 4, true)]);
        }
        v.dev.kick(2);
        Ok(v)
    }

    fn rx_hdr(&self, slot: usize) -> usize {
        self.base + slot * 64
    }
    fn rx_buf(&self, slot: usize) -> usize {
        if self.bulk {
            return self.bulk_buf();
        }
        self.base + 0x1000 + slot * PAYLOAD
    }
    fn tx_hdr(&self, slot: usize) -> usize {
        self.base + 0x21000 + slot * 64
    }
    fn tx_buf(&self, slot: usize) -> usize {
        self.base + 0x22000 + slot * PAYLOAD
    }

    fn post_rx(&mut self, slot: usize) {
        let (h, b) = (self.rx_hdr(slot) as u64, self.rx_buf(slot) as u64);
        // In bench mode every slot's payload is the whole shared sink, so packets can be as
        // large as the guest -> host ones.
        let len = if self.bulk { BULK } else { PAYLOAD };
        self.rx_ids[slot] = self
            .dev
            .queue(0)
            .add_slot(slot as u16, &[(h, HDR as u32, true), (b, len as u32, true)]);
    }

    fn reap_tx(&mut self) {
        while let Some((id, _)) = self.dev.queue(1).used() {
            if let Some(s) = (0..SLOTS).find(|&s| self.tx_busy[s] && self.tx_ids[s] == id) {
                self.tx_busy[s] = false;
            }
        }
    }

    /// Sends a raw packet: `h` (its `len` as given, which may lie) and `payload`.
    pub fn send_raw(&mut self, h: &Hdr, payload: &[u8]) -> bool {
        let deadline = Deadline::after_ms(2000);
        let slot = loop {
            self.reap_tx();
            if let Some(s) = (0..SLOTS).find(|&s| !self.tx_busy[s]) {
                break s;
            }
            if deadline.passed() {
                return false;
            }
        };
        let len = payload.len().min(PAYLOAD);
        h.write(mem(self.tx_hdr(slot), HDR));
        mem(self.tx_buf(slot), len).copy_from_slice(&payload[..len]);
        let (ha, ba) = (self.tx_hdr(slot) as u64, self.tx_buf(slot) as u64);
        self.tx_busy[slot] = true;
        self.tx_ids[slot] = if len > 0 {
            self.dev.queue(1).add_slot(
                slot as u16,
                &[(ha, HDR as u32, false), (ba, len as u32, false)],
            )
        } else {
            self.dev
                .queue(1)
                .add_slot(slot as u16, &[(ha, HDR as u32, false)])
        };
        self.dev.kick(1);
        true
    }

    fn hdr(&self, i: usize, op: u16, len: u32, flags: u32) -> Hdr {
        let c = &self.conns[i];
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local,
            dst_port: c.peer,
            len,
            type_: 1,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn control(&mut self, i: usize, op: u16, flags: u32) -> bool {
        let h = self.hdr(i, op, 0, flags);
        self.conns[i].reported = self.conns[i].fwd_cnt;
        self.send_raw(&h, &[])
    }

    /// Handles everything that arrived; data goes to `sink`.
    pub fn poll(&mut self, sink: Sink) {
        let mut reposted = false;
        while let Some((id, len)) = self.dev.queue(0).used() {
            let Some(slot) = (0..SLOTS).find(|&s| self.rx_ids[s] == id) else {
                continue;
            };
            let h = Hdr::read(mem(self.rx_hdr(slot), HDR));
            let n = (len as usize)
                .saturating_sub(HDR)
                .min(h.len as usize)
                .min(if self.bulk { BULK } else { PAYLOAD });
            self.receive(&h, slot, n, sink);
            self.post_rx(slot);
            reposted = true;
        }
        if reposted {
            self.dev.kick(0);
        }
        self.reap_tx();
    }

    fn find(&self, h: &Hdr) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.state != State::Free && c.local == h.dst_port && c.peer == h.src_port)
    }

    fn receive(&mut self, h: &Hdr, slot: usize, n: usize, sink: Sink) {
        if h.op == OP_REQUEST {
            let free = self.conns.iter().position(|c| c.state == State::Free);
            match (self.listen == Some(h.dst_port), free, self.find(h)) {
                (true, Some(i), None) => {
                    self.conns[i] = Conn {
                        state: State::Established,
                        local: h.dst_port,
                        peer: h.src_port,
                        peer_buf_alloc: h.buf_alloc,
                        peer_fwd_cnt: h.fwd_cnt,
                        ..FREE
                    };
                    self.control(i, OP_RESPONSE, 0);
                }
                _ => {
                    let r = Hdr {
                        src_cid: self.cid,
                        dst_cid: HOST_CID,
                        src_port: h.dst_port,
                        dst_port: h.src_port,
                        type_: 1,
                        op: OP_RST,
                        ..Hdr::default()
                    };
                    self.send_raw(&r, &[]);
                }
            }
            return;
        }
        let Some(i) = self.find(h) else {
            if h.op == OP_RST {
                self.stats.orphan_rsts += 1;
            }
            return;
        };
        let data_at = self.rx_buf(slot);
        let c = &mut self.conns[i];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == State::Connecting => c.state = State::Established,
            OP_RST => c.state = State::Reset,
            OP_SHUTDOWN => c.peer_shutdown |= h.flags,
            OP_CREDIT_UPDATE => self.stats.credit_updates += 1,
            OP_CREDIT_REQUEST => {
                self.control(i, OP_CREDIT_UPDATE, 0);
            }
            OP_RW => {
                let data = mem(data_at, n);
                c.received += n;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                let owe = c.fwd_cnt.wrapping_sub(c.reported) >= BUF_ALLOC / 4;
                sink(i, data);
                if owe {
                    self.control(i, OP_CREDIT_UPDATE, 0);
                }
            }
            _ => {}
        }
    }

    /// Starts a connection to host port `port`; returns its index.
    pub fn connect(&mut self, port: u32) -> Option<usize> {
        let i = self.conns.iter().position(|c| c.state == State::Free)?;
        self.next_port += 1;
        self.conns[i] = Conn {
            state: State::Connecting,
            local: self.next_port,
            peer: port,
            ..FREE
        };
        self.control(i, OP_REQUEST, 0).then_some(i)
    }

    /// Polls until connection `i` leaves `Connecting` (or `ms` pass); returns its state.
    pub fn wait_connected(&mut self, i: usize, ms: u64, sink: Sink) -> State {
        let d = Deadline::after_ms(ms);
        while self.conns[i].state == State::Connecting && !d.passed() {
            self.poll(sink);
        }
        self.conns[i].state
    }

    /// Accepts host connections to `port` from now on.
    pub fn listen(&mut self, port: u32) {
        self.listen = Some(port);
    }

    /// Host credit of connection `i`.
    fn credit(&self, i: usize) -> u32 {
        let c = &self.conns[i];
        c.peer_buf_alloc
            .saturating_sub(c.tx_cnt.wrapping_sub(c.peer_fwd_cnt))
    }

    /// Sends up to one buffer of stream bytes `at..at + n` of [`pattern`] on connection `i` if
    /// the host's credit allows; returns how many were sent (0: no credit now).
    pub fn send_pattern(&mut self, i: usize, at: usize, n: usize) -> usize {
        let n = n.min(PAYLOAD).min(self.credit(i) as usize);
        if n == 0 {
            return 0;
        }
        let mut buf = [0u8; PAYLOAD];
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(at + k);
        }
        let h = self.hdr(i, OP_RW, n as u32, 0);
        if !self.send_raw(&h, &buf[..n]) {
            return 0;
        }
        let c = &mut self.conns[i];
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        c.reported = c.fwd_cnt;
        n
    }

    /// Sends `total` bytes of [`pattern`] on connection `i`, polling (data to `sink`) while
    /// out of credit; fails after `ms` without progress or if the connection ends.
    pub fn send_stream(
        &mut self,
        i: usize,
        total: usize,
        ms: u64,
        sink: Sink,
    ) -> Result<(), Verdict> {
        let mut sent = 0;
        let mut stalled: Option<Deadline> = None;
        let mut asked = false;
        while sent < total {
            if self.conns[i].state != State::Established || self.conns[i].peer_shutdown != 0 {
                return Err(fail(format_args!(
                    "connection to port {} ended after {sent} bytes",
                    self.conns[i].peer
                )));
            }
            let n = self.send_pattern(i, sent, total - sent);
            if n > 0 {
                sent += n;
                stalled = None;
                asked = false;
            } else {
                let d = stalled.get_or_insert_with(|| {
                    self.stats.credit_stalls += 1;
                    Deadline::after_ms(ms)
                });
                if d.passed() {
                    return Err(fail(format_args!(
                        "no credit for {ms} ms after {sent} bytes"
                    )));
                }
                if !asked && self.credit(i) == 0 {
                    asked = true;
                    self.control(i, OP_CREDIT_REQUEST, 0);
                }
            }
            self.poll(sink);
        }
        Ok(())
    }

    /// Shuts connection `i` down in both directions and waits (up to `ms`) for the host's RST.
    pub fn close(&mut self, i: usize, ms: u64, sink: Sink) -> bool {
        if self.conns[i].state == State::Established {
            self.control(i, OP_SHUTDOWN, 3);
            let d = Deadline::after_ms(ms);
            while self.conns[i].state == State::Established && !d.passed() {
                self.poll(sink);
            }
        }
        let ok = self.conns[i].state == State::Reset;
        self.conns[i] = FREE;
        ok
    }
}

// ---- the tests' guest side (ports as `cargo xtask e2e` serves them) ----

/// Host port of the echo server.
pub const ECHO_PORT: u32 = 1000;
/// Guest port the host's `CONNECT` client (or socat) reaches.
pub const LISTEN_PORT: u32 = 2000;
/// Host port of the slow reader.
pub const SLOW_PORT: u32 = 3000;
/// Host port of the server that closes mid-stream.
pub const CLOSE_PORT: u32 = 4000;
/// Bytes the listen test receives and then sends.
pub const LISTEN_BYTES: usize = 256 << 10;
/// Bytes the slow-reader test sends.
pub const SLOW_BYTES: usize = 2 << 20;

/// Checks arriving bytes against [`pattern`], per connection.
struct Check {
    got: [usize; MAX_CONNS],
    bad: Option<(usize, usize)>,
}

impl Check {
    fn new() -> Check {
        Check {
            got: [0; MAX_CONNS],
            bad: None,
        }
    }

    fn take(&mut self, i: usize, d: &[u8]) {
        for (k, b) in d.iter().enumerate() {
            if *b != pattern(self.got[i] + k) && self.bad.is_none() {
                self.bad = Some((i, self.got[i] + k));
            }
        }
        self.got[i] += d.len();
    }
}

fn open(ring: usize, base: usize, packed: bool) -> Result<Vsock, Verdict> {
    Vsock::open(ring, base, packed)
}

fn establish(v: &mut Vsock, port: u32, sink: Sink) -> Result<usize, Verdict> {
    let Some(i) = v.connect(port) else {
        return Err(fail(format_args!("no free connection slot")));
    };
    match v.wait_connected(i, 5000, sink) {
        State::Established => Ok(i),
        s => Err(fail(format_args!("connect to host port {port}: {s:?}"))),
    }
}

/// Waits until `done` or `ms` pass, polling.
fn wait(v: &mut Vsock, ms: u64, sink: Sink, done: &dyn Fn(&Vsock) -> bool) -> bool {
    let d = Deadline::after_ms(ms);
    while !done(v) {
        if d.passed() {
            return false;
        }
        v.poll(sink);
    }
    true
}

/// `vsock-echo`: 1 MiB to the host's echo server and back, every byte checked.
pub fn echo(ring: usize, base: usize, packed: bool) -> Verdict {
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let total = 1 << 20;
    let mut check = Check::new();
    let mut sink = |i: usize, d: &[u8]| check.take(i, d);
    let i = match establish(&mut v, ECHO_PORT, &mut sink) {
        Ok(i) => i,
        Err(e) => return e,
    };
    if let Err(e) = v.send_stream(i, total, 5000, &mut sink) {
        return e;
    }
    let d = Deadline::after_ms(10000);
    while v.conns[i].received < total && !d.passed() {
        v.poll(&mut sink);
    }
    let received = v.conns[i].received;
    let closed = v.close(i, 5000, &mut sink);
    if let Some((_, at)) = check.bad {
        return fail(format_args!("echoed byte {at} differs"));
    }
    if received != total {
        return fail(format_args!("{received} of {total} bytes echoed"));
    }
    if !closed {
        return fail(format_args!("no RST after SHUTDOWN"));
    }
    Verdict::Pass(Detail::new(format_args!(
        "cid={} 1MiB echoed, {} credit updates",
        v.cid, v.stats.credit_updates
    )))
}

/// `vsock-many`: 64 connections open at once, 16 KiB echoed on each, interleaved.
pub fn many(ring: usize, base: usize, packed: bool) -> Verdict {
    const N: usize = 64;
    const EACH: usize = 16 << 10;
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut check = Check::new();
    let mut sink = |i: usize, d: &[u8]| check.take(i, d);
    let mut ids = [0usize; N];
    for id in &mut ids {
        match v.connect(ECHO_PORT) {
            Some(i) => *id = i,
            None => return fail(format_args!("no free connection slot")),
        }
    }
    let all_up = |v: &Vsock| ids.iter().all(|&i| v.conns[i].state != State::Connecting);
    if !wait(&mut v, 10000, &mut sink, &all_up) {
        return fail(format_args!("not all {N} connections answered"));
    }
    if let Some(&i) = ids
        .iter()
        .find(|&&i| v.conns[i].state != State::Established)
    {
        return fail(format_args!("connection {i}: {:?}", v.conns[i].state));
    }
    let mut sent = [0usize; N];
    let d = Deadline::after_ms(20000);
    while sent.iter().any(|&s| s < EACH) {
        for (k, &i) in ids.iter().enumerate() {
            if sent[k] < EACH {
                sent[k] += v.send_pattern(i, sent[k], (EACH - sent[k]).min(2048));
            }
        }
        v.poll(&mut sink);
        if d.passed() {
            return fail(format_args!("sending stalled"));
        }
    }
    let echoed = |v: &Vsock| ids.iter().all(|&i| v.conns[i].received >= EACH);
    if !wait(&mut v, 20000, &mut sink, &echoed) {
        let short = ids.iter().filter(|&&i| v.conns[i].received < EACH).count();
        return fail(format_args!("{short} connections not fully echoed"));
    }
    let mut unclean = 0;
    for &i in &ids {
        if !v.close(i, 5000, &mut sink) {
            unclean += 1;
        }
    }
    if let Some((i, at)) = check.bad {
        return fail(format_args!("connection {i}: byte {at} differs"));
    }
    if unclean > 0 {
        return fail(format_args!("{unclean} connections got no RST on close"));
    }
    Verdict::Pass(Detail::new(format_args!("{N} x 16KiB echoed")))
}

/// `vsock-listen`: the host connects to guest port 2000 (`CONNECT 2000`), sends 256 KiB, gets
/// 256 KiB back, and closes.
pub fn listen(ring: usize, base: usize, packed: bool) -> Verdict {
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    v.listen(LISTEN_PORT);
    let mut check = Check::new();
    let mut sink = |i: usize, d: &[u8]| check.take(i, d);
    let accepted = |v: &Vsock| v.conns.iter().any(|c| c.state == State::Established);
    if !wait(&mut v, 30000, &mut sink, &accepted) {
        return fail(format_args!("no host connection within 30 s"));
    }
    let Some(i) = v.conns.iter().position(|c| c.state == State::Established) else {
        return fail(format_args!("lost the connection"));
    };
    let all_in = |v: &Vsock| v.conns[i].received >= LISTEN_BYTES;
    if !wait(&mut v, 10000, &mut sink, &all_in) {
        return fail(format_args!(
            "{} of {LISTEN_BYTES} bytes from the host",
            v.conns[i].received
        ));
    }
    if let Err(e) = v.send_stream(i, LISTEN_BYTES, 5000, &mut sink) {
        return e;
    }
    // The host closes once it has checked everything.
    let closed = |v: &Vsock| v.conns[i].peer_shutdown == 3 || v.conns[i].state == State::Reset;
    if !wait(&mut v, 10000, &mut sink, &closed) {
        return fail(format_args!("the host did not close"));
    }
    v.close(i, 5000, &mut sink);
    if let Some((_, at)) = check.bad {
        return fail(format_args!("byte {at} from the host differs"));
    }
    Verdict::Pass(Detail::new(format_args!(
        "host port {}: 256KiB each way",
        v.conns[i].peer
    )))
}

/// `vsock-stall`: 2 MiB to a host reader that takes about 1 MB/s; the kit must run out of
/// credit (throttled, not buffered), and everything must arrive.
pub fn stall(ring: usize, base: usize, packed: bool) -> Verdict {
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut sink = |_: usize, _: &[u8]| {};
    let i = match establish(&mut v, SLOW_PORT, &mut sink) {
        Ok(i) => i,
        Err(e) => return e,
    };
    if let Err(e) = v.send_stream(i, SLOW_BYTES, 10000, &mut sink) {
        return e;
    }
    // The host closes after reading (and checking) everything.
    let closed = |v: &Vsock| v.conns[i].peer_shutdown == 3 || v.conns[i].state == State::Reset;
    if !wait(&mut v, 20000, &mut sink, &closed) {
        return fail(format_args!("the slow reader did not finish"));
    }
    v.close(i, 5000, &mut sink);
    if v.stats.credit_stalls == 0 {
        return fail(format_args!("never out of credit: the host buffered 2 MiB"));
    }
    Verdict::Pass(Detail::new(format_args!(
        "2MiB, {} credit stalls",
        v.stats.credit_stalls
    )))
}

/// `vsock-close`: the host closes mid-stream; the kit must hear SHUTDOWN or RST.
pub fn close(ring: usize, base: usize, packed: bool) -> Verdict {
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut sink = |_: usize, _: &[u8]| {};
    let i = match establish(&mut v, CLOSE_PORT, &mut sink) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let r = v.send_stream(i, 64 << 20, 10000, &mut sink);
    let c = v.conns[i];
    let ended = c.peer_shutdown == 3 || c.state == State::Reset;
    v.close(i, 5000, &mut sink);
    match (r, ended) {
        (Err(_), true) => Verdict::Pass(Detail::new(format_args!(
            "{:?}, shutdown flags {}",
            c.state, c.peer_shutdown
        ))),
        (Ok(()), _) => fail(format_args!("64 MiB went through a closed connection")),
        (Err(e), false) => e,
    }
}

/// `vsock-hostile`: packets that break the protocol get RST and the device keeps working.
pub fn hostile(ring: usize, base: usize, packed: bool) -> Verdict {
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut sink = |_: usize, _: &[u8]| {};
    let good = Hdr {
        src_cid: v.cid,
        dst_cid: HOST_CID,
        src_port: 100,
        dst_port: ECHO_PORT,
        type_: 1,
        op: OP_RW,
        buf_alloc: BUF_ALLOC,
        ..Hdr::default()
    };
    let bad: [(&str, Hdr, &[u8]); 5] = [
        ("unknown op", Hdr { op: 0x42, ..good }, &[]),
        (
            "wrong source CID",
            Hdr {
                src_cid: v.cid + 7,
                op: OP_REQUEST,
                ..good
            },
            &[],
        ),
        (
            "seqpacket",
            Hdr {
                type_: 2,
                op: OP_REQUEST,
                ..good
            },
            &[],
        ),
        (
            "len beyond the buffer",
            Hdr { len: 4000, ..good },
            b"0123456789",
        ),
        ("data for no connection", Hdr { len: 3, ..good }, b"abc"),
    ];
    for (what, h, payload) in bad {
        let before = v.stats.orphan_rsts;
        if !v.send_raw(&h, payload) {
            return fail(format_args!("{what}: transmit buffer not returned"));
        }
        let answered = |v: &Vsock| v.stats.orphan_rsts > before;
        if !wait(&mut v, 2000, &mut sink, &answered) {
            return fail(format_args!("{what}: no RST"));
        }
    }
    // Still working.
    let mut check = Check::new();
    let mut sink = |i: usize, d: &[u8]| check.take(i, d);
    let i = match establish(&mut v, ECHO_PORT, &mut sink) {
        Ok(i) => i,
        Err(e) => return e,
    };
    if let Err(e) = v.send_stream(i, 8192, 5000, &mut sink) {
        return e;
    }
    let echoed = |v: &Vsock| v.conns[i].received >= 8192;
    let ok = wait(&mut v, 5000, &mut sink, &echoed);
    v.close(i, 5000, &mut sink);
    if !ok || check.bad.is_some() {
        return fail(format_args!("the echo after the bad packets failed"));
    }
    Verdict::Pass(Detail::from_str("5 bad packets -> RST, then 8KiB echoed"))
}

// ---- the bench (`cargo xtask bench vsock`) ----

/// Host port the bench's guest -> host stream goes to (the host reads and discards).
pub const BENCH_SINK_PORT: u32 = 5000;
/// Host port the bench's host -> guest stream comes from (the host writes until the guest
/// closes).
pub const BENCH_SOURCE_PORT: u32 = 5001;
/// Payload per bench packet (Linux's largest, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
const BULK: usize = 64 << 10;

impl Vsock {
    /// Bench mode: receive buffers are a header slot plus one shared 64 KiB sink (the data is
    /// counted, not kept) and transmit payloads come from one shared 64 KiB buffer, so packets
    /// are as large as Linux makes them.
    fn bulk_rx(&mut self) {
        // Re-post every slot with the big layout as it comes back (see `poll_bulk`).
        self.bulk = true;
    }

    fn bulk_buf(&self) -> usize {
        self.base + 0x1000
    }

    /// Sends up to 64 KiB of the shared buffer on connection `i` within the host's credit.
    fn send_bulk(&mut self, i: usize) -> usize {
        let n = BULK.min(self.credit(i) as usize);
        if n == 0 {
            return 0;
        }
        let deadline = Deadline::after_ms(2000);
        let slot = loop {
            self.reap_tx();
            if let Some(s) = (0..SLOTS).find(|&s| !self.tx_busy[s]) {
                break s;
            }
            if deadline.passed() {
                return 0;
            }
        };
        let h = self.hdr(i, OP_RW, n as u32, 0);
        h.write(mem(self.tx_hdr(slot), HDR));
        let (ha, ba) = (self.tx_hdr(slot) as u64, (self.bulk_buf() + BULK) as u64);
        self.tx_busy[slot] = true;
        self.tx_ids[slot] = self.dev.queue(1).add_slot(
            slot as u16,
            &[(ha, HDR as u32, false), (ba, n as u32, false)],
        );
        self.dev.kick(1);
        let c = &mut self.conns[i];
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        n
    }
}

/// `vsock-bench` with `kit.bench=tx|rx,secs=S`: streams to (tx) or from (rx) the host for S
/// seconds in 64 KiB packets; prints `ALIOTH-KIT vsock-bench bytes=N ns=T`.
pub fn bench(
    out: &mut crate::serial::Com1,
    ring: usize,
    base: usize,
    packed: bool,
    spec: &[u8],
) -> Verdict {
    use core::fmt::Write;
    let (mut tx, mut secs) = (true, 3u64);
    for item in spec.split(|b| *b == b',') {
        match item {
            b"tx" => tx = true,
            b"rx" => tx = false,
            _ => {
                if let Some(v) = item.strip_prefix(b"secs=") {
                    secs = core::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(3)
                        .clamp(1, 60);
                }
            }
        }
    }
    let mut v = match open(ring, base, packed) {
        Ok(v) => v,
        Err(e) => return e,
    };
    v.bulk_rx();
    let mut sink = |_: usize, _: &[u8]| {};
    let port = if tx {
        BENCH_SINK_PORT
    } else {
        BENCH_SOURCE_PORT
    };
    let i = match establish(&mut v, port, &mut sink) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let start = crate::clock::now_ns();
    let end = Deadline::after_ms(secs * 1000);
    let mut bytes = 0usize;
    if tx {
        while !end.passed() {
            let n = v.send_bulk(i);
            bytes += n;
            if n == 0 {
                v.poll(&mut sink);
            } else {
                v.reap_tx();
            }
            if v.conns[i].state != State::Established {
                return fail(format_args!("the host closed the sink"));
            }
        }
    } else {
        while !end.passed() {
            v.poll(&mut sink);
        }
        bytes = v.conns[i].received;
    }
    let ns = crate::clock::now_ns() - start;
    v.close(i, 5000, &mut sink);
    let _ = writeln!(out, "ALIOTH-KIT vsock-bench bytes={bytes} ns={ns}");
    Verdict::Pass(Detail::new(format_args!(
        "{} MB/s",
        bytes as u64 * 1000 / ns.max(1)
    )))
}
