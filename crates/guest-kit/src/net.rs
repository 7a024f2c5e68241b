//! A virtio-net driver (polling, split or packed rings, one or two queue pairs) and a tiny
//! IPv4 responder for the net tests: it answers ARP and ICMP echo for its address, echoes UDP
//! on port 7, sends datagrams to the host when asked on port 5 (`send N SIZE PORT`), and stops
//! when it gets `stop` on port 9. Every checksum that arrives is checked.

// Verdicts carry their text inline (no allocator), so `Result<_, Verdict>` is large.
#![allow(clippy::result_large_err)]

use core::fmt::Write;

use crate::clock::Deadline;
use crate::serial::Com1;
use crate::tests::{Detail, Verdict};
use crate::virtio::{Device, Options, VirtioError};

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;

/// The kit's address (documentation range, RFC 5737).
pub const KIT_IP: [u8; 4] = [192, 0, 2, 2];
/// Where `send` datagrams go.
pub const HOST_IP: [u8; 4] = [192, 0, 2, 1];

const HDR: usize = 12;
const QSIZE: usize = 16;
const BUF: usize = 2048;
const NEEDS_CSUM: u8 = 1;

/// What the responder saw.
#[derive(Default, Clone, Copy)]
pub struct Stats {
    /// Frames received per queue pair.
    pub rx: [u64; 2],
    /// Frames sent per queue pair.
    pub tx: [u64; 2],
    /// ARP requests answered.
    pub arp: u64,
    /// ICMP echo requests answered.
    pub icmp: u64,
    /// UDP datagrams echoed.
    pub echo: u64,
    /// Datagrams sent on request.
    pub sent: u64,
    /// Received packets whose checksum was partial (completed by the kit).
    pub partial: u64,
    /// Received packets with a wrong IPv4, ICMP or UDP checksum.
    pub bad_csum: u64,
    /// Received packets whose header said `num_buffers` != 1 in 2 KiB buffers.
    pub bad_num_buffers: u64,
    /// Times no transmit buffer came back within a second.
    pub tx_stalls: u64,
}

/// How a responder runs.
pub struct Mode {
    /// Two queue pairs (MQ and the control queue).
    pub mq: bool,
    /// Offload checksums (CSUM and GUEST_CSUM).
    pub csum: bool,
    /// Receive buffers kept posted per queue (at most 16).
    pub rx_buffers: usize,
    /// A pause after each received frame, in microseconds (a slow guest).
    pub rx_delay_us: u64,
}

/// A virtio-net device driven by polling.
pub struct Nic {
    dev: Device,
    mac: [u8; 6],
    pairs: usize,
    csum: bool,
    base: usize,
    rx_ids: [[u16; QSIZE]; 2],
    tx_ids: [[u16; QSIZE]; 2],
    tx_busy: [[bool; QSIZE]; 2],
    rx_posted: usize,
    /// Counters.
    pub stats: Stats,
}

fn rd(a: usize, len: usize) -> &'static mut [u8] {
    // SAFETY: callers pass areas of the kit's MEMORY (identity-mapped, owned by the kit).
    unsafe { core::slice::from_raw_parts_mut(a as *mut u8, len) }
}

/// The internet checksum's running sum of `data`.
fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < data.len() {
        acc += u32::from(u16::from_be_bytes([data[i], data[i + 1]]));
        i += 2;
    }
    if i < data.len() {
        acc += u32::from(data[i]) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// The UDP pseudo-header's sum.
fn pseudo(src: &[u8], dst: &[u8], len: usize) -> u32 {
    let mut acc = sum(0, src);
    acc = sum(acc, dst);
    acc + 17 + len as u32
}

impl Nic {
    /// Brings up device 1 with `mode`, memory at `base` (0x48000 bytes).
    pub fn open(ring: usize, base: usize, packed: bool, mode: &Mode) -> Result<Nic, Verdict> {
        let mut features =
            F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | crate::tests::ring_features();
        if mode.mq {
            features |= F_MQ;
        }
        if mode.csum {
            features |= F_CSUM | F_GUEST_CSUM;
        }
        let opts = |queues| Options {
            features,
            queues,
            packed,
            qsize: QSIZE as u16,
        };
        let dev = match Device::open(1, ring, &opts(if mode.mq { 5 } else { 3 })) {
            Ok(d) => d,
            Err(VirtioError::NotFound) => return Err(skip("no virtio-net device")),
            Err(VirtioError::NotOffered(f)) => return Err(skip(f)),
            Err(VirtioError::NoQueue(_)) if mode.mq => {
                return Err(skip("a second queue pair is not offered"));
            }
            Err(e) => return Err(fail(format_args!("open {e:?}"))),
        };
        if mode.mq && !dev.has(F_MQ | F_CTRL_VQ) {
            return Err(skip("VIRTIO_NET_F_MQ not offered"));
        }
        if mode.csum && !dev.has(F_CSUM | F_GUEST_CSUM) {
            return Err(skip("VIRTIO_NET_F_CSUM/GUEST_CSUM not offered"));
        }
        let mut mac = [0x02, 0, 0, 0, 0, 0x02];
        if dev.has(F_MAC) {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.config_u8(i).unwrap_or(0);
            }
        }
        let mut nic = Nic {
            dev,
            mac,
            pairs: if mode.mq { 2 } else { 1 },
            csum: mode.csum,
            base,
            rx_ids: [[0; QSIZE]; 2],
            tx_ids: [[0; QSIZE]; 2],
            tx_busy: [[false; QSIZE]; 2],
            rx_posted: mode.rx_buffers.clamp(1, QSIZE),
            stats: Stats::default(),
        };
        for p in 0..nic.pairs {
            nic.dev.queue(2 * p).set_interrupts(false);
            nic.dev.queue(2 * p + 1).set_interrupts(false);
        }
        if mode.mq {
            // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2 on the control queue (index 4).
            let cmd = base + 0x40000;
            rd(cmd, 4).copy_from_slice(&[4, 0, 2, 0]);
            rd(cmd + 8, 1)[0] = 0xff;
            nic.dev.queue(4).set_interrupts(false);
            nic.dev
                .queue(4)
                .add(&[(cmd as u64, 4, false), (cmd as u64 + 8, 1, true)]);
            nic.dev.kick(4);
            let d = Deadline::after_ms(5000);
            while nic.dev.queue(4).used().is_none() {
                if d.passed() {
                    return Err(fail(format_args!("no answer on the control queue")));
                }
            }
            let ack = rd(cmd + 8, 1)[0];
            if ack != 0 {
                return Err(fail(format_args!("VQ_PAIRS_SET 2 answered {ack}")));
            }
        }
        for p in 0..nic.pairs {
            for slot in 0..nic.rx_posted {
                nic.post_rx(p, slot);
            }
            nic.dev.kick((2 * p) as u16);
        }
        Ok(nic)
    }

    fn rx_buf(&self, p: usize, slot: usize) -> usize {
        self.base + p * 0x20000 + slot * BUF
    }

    fn tx_buf(&self, p: usize, slot: usize) -> usize {
        self.base + p * 0x20000 + 0x10000 + slot * BUF
    }

    fn post_rx(&mut self, p: usize, slot: usize) {
        let addr = self.rx_buf(p, slot) as u64;
        self.rx_ids[p][slot] = self
            .dev
            .queue(2 * p)
            .add_slot(slot as u16, &[(addr, BUF as u32, true)]);
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.dev.status()
    }

    /// Frees transmit buffers the device returned.
    fn reap_tx(&mut self, p: usize) {
        while let Some((id, _)) = self.dev.queue(2 * p + 1).used() {
            if let Some(slot) = (0..QSIZE).find(|&s| self.tx_busy[p][s] && self.tx_ids[p][s] == id)
            {
                self.tx_busy[p][slot] = false;
            }
        }
    }

    /// Sends a frame built by `build` into a buffer (it returns the frame's length) on pair `p`;
    /// `partial` marks it NEEDS_CSUM for a UDP checksum at 34 + 6.
    fn send(&mut self, p: usize, partial: bool, build: impl FnOnce(&mut [u8]) -> usize) {
        let deadline = Deadline::after_ms(1000);
        let slot = loop {
            self.reap_tx(p);
            if let Some(s) = (0..QSIZE).find(|&s| !self.tx_busy[p][s]) {
                break s;
            }
            if deadline.passed() {
                self.stats.tx_stalls += 1;
                return;
            }
        };
        let buf = rd(self.tx_buf(p, slot), BUF);
        buf[..HDR].fill(0);
        if partial {
            buf[0] = NEEDS_CSUM;
            buf[6..8].copy_from_slice(&34u16.to_le_bytes());
            buf[8..10].copy_from_slice(&6u16.to_le_bytes());
        }
        let len = build(&mut buf[HDR..]);
        let addr = self.tx_buf(p, slot) as u64;
        self.tx_busy[p][slot] = true;
        self.tx_ids[p][slot] = self
            .dev
            .queue(2 * p + 1)
            .add_slot(slot as u16, &[(addr, (HDR + len) as u32, false)]);
        self.dev.kick((2 * p + 1) as u16);
        self.stats.tx[p] += 1;
    }

    /// Handles what arrived; returns whether a `stop` datagram came.
    pub fn poll(&mut self, mode: &Mode) -> bool {
        let mut stop = false;
        for p in 0..self.pairs {
            let mut reposted = false;
            while let Some((id, len)) = self.dev.queue(2 * p).used() {
                let Some(slot) = (0..self.rx_posted).find(|&s| self.rx_ids[p][s] == id) else {
                    continue;
                };
                let len = (len as usize).min(BUF);
                stop |= self.receive(p, slot, len);
                if mode.rx_delay_us > 0 {
                    let d = Deadline::after_us(mode.rx_delay_us);
                    while !d.passed() {}
                }
                self.post_rx(p, slot);
                reposted = true;
            }
            if reposted {
                self.dev.kick((2 * p) as u16);
            }
            self.reap_tx(p);
        }
        stop
    }

    fn receive(&mut self, p: usize, slot: usize, len: usize) -> bool {
        self.stats.rx[p] += 1;
        if len < HDR + 14 {
            return false;
        }
        let buf = rd(self.rx_buf(p, slot), len);
        if u16::from_le_bytes([buf[10], buf[11]]) != 1 {
            self.stats.bad_num_buffers += 1;
        }
        let (flags, csum_start, csum_offset) = (
            buf[0],
            usize::from(u16::from_le_bytes([buf[6], buf[7]])),
            usize::from(u16::from_le_bytes([buf[8], buf[9]])),
        );
        let frame = &mut buf[HDR..];
        if flags & NEEDS_CSUM != 0 {
            // A partial checksum (GUEST_CSUM): the field holds the pseudo-header sum; finish it.
            self.stats.partial += 1;
            let at = csum_start + csum_offset;
            if at + 2 > frame.len() || csum_start > frame.len() {
                self.stats.bad_csum += 1;
                return false;
            }
            let c = checksum(&frame[csum_start..]);
            frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0806 => self.arp(p, frame),
            0x0800 => return self.ipv4(p, frame),
            _ => {}
        }
        false
    }

    fn arp(&mut self, p: usize, f: &[u8]) {
        // Ethernet/IPv4 request for our address.
        if f.len() < 42 || f[14..22] != [0, 1, 8, 0, 6, 4, 0, 1] || f[38..42] != KIT_IP {
            return;
        }
        let (mut sha, mut spa) = ([0u8; 6], [0u8; 4]);
        sha.copy_from_slice(&f[22..28]);
        spa.copy_from_slice(&f[28..32]);
        let mac = self.mac;
        self.send(p, false, |o| {
            o[0..6].copy_from_slice(&sha);
            o[6..12].copy_from_slice(&mac);
            o[12..14].copy_from_slice(&[8, 6]);
            o[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            o[22..28].copy_from_slice(&mac);
            o[28..32].copy_from_slice(&KIT_IP);
            o[32..38].copy_from_slice(&sha);
            o[38..42].copy_from_slice(&spa);
            42
        });
        self.stats.arp += 1;
    }

    fn ipv4(&mut self, p: usize, f: &[u8]) -> bool {
        if f.len() < 34 || f[14] >> 4 != 4 {
            return false;
        }
        let ihl = usize::from(f[14] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        if ihl < 20 || total < ihl || 14 + total > f.len() {
            return false;
        }
        if checksum(&f[14..14 + ihl]) != 0 {
            self.stats.bad_csum += 1;
            return false;
        }
        if f[30..34] != KIT_IP {
            return false;
        }
        let l4 = &f[14 + ihl..14 + total];
        match f[23] {
            1 => self.icmp(p, f, l4),
            17 => return self.udp(p, f, l4),
            _ => {}
        }
        false
    }

    fn icmp(&mut self, p: usize, f: &[u8], l4: &[u8]) {
        if l4.len() < 8 || l4[0] != 8 {
            return;
        }
        if checksum(l4) != 0 {
            self.stats.bad_csum += 1;
            return;
        }
        let (mut eth_src, mut ip_src) = ([0u8; 6], [0u8; 4]);
        eth_src.copy_from_slice(&f[6..12]);
        ip_src.copy_from_slice(&f[26..30]);
        let mac = self.mac;
        let n = l4.len();
        let mut payload = [0u8; 1480];
        let n = n.min(payload.len());
        payload[..n].copy_from_slice(&l4[..n]);
        self.send(p, false, |o| {
            ipv4_header(o, &mac, &eth_src, &ip_src, 1, n);
            let m = &mut o[34..34 + n];
            m.copy_from_slice(&payload[..n]);
            m[0] = 0; // echo reply
            m[2..4].fill(0);
            let c = checksum(m);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            34 + n
        });
        self.stats.icmp += 1;
    }

    fn udp(&mut self, p: usize, f: &[u8], l4: &[u8]) -> bool {
        if l4.len() < 8 {
            return false;
        }
        let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        if ulen < 8 || ulen > l4.len() {
            return false;
        }
        let l4 = &l4[..ulen];
        let field = u16::from_be_bytes([l4[6], l4[7]]);
        if field != 0 && !fold(sum(pseudo(&f[26..30], &f[30..34], ulen), l4)) != 0 {
            self.stats.bad_csum += 1;
            return false;
        }
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        let data = &l4[8..];
        let (mut eth_src, mut ip_src) = ([0u8; 6], [0u8; 4]);
        eth_src.copy_from_slice(&f[6..12]);
        ip_src.copy_from_slice(&f[26..30]);
        match dport {
            7 => {
                let mut copy = [0u8; 1472];
                let n = data.len().min(copy.len());
                copy[..n].copy_from_slice(&data[..n]);
                self.send_udp(p, &eth_src, &ip_src, 7, sport, &copy[..n]);
                self.stats.echo += 1;
            }
            5 => {
                // "send N SIZE PORT"
                let mut words = data.split(|b| *b == b' ');
                let _ = words.next();
                let mut num = || {
                    words
                        .next()
                        .and_then(|w| core::str::from_utf8(w).ok())
                        .and_then(|w| w.trim().parse::<usize>().ok())
                };
                let (Some(n), Some(size), Some(port)) = (num(), num(), num()) else {
                    return false;
                };
                let size = size.clamp(8, 1472);
                let mut payload = [0u8; 1472];
                for seq in 0..n.min(100_000) {
                    payload[..4].copy_from_slice(&(seq as u32).to_le_bytes());
                    for (i, b) in payload[4..size].iter_mut().enumerate() {
                        *b = (seq as u8).wrapping_add(i as u8);
                    }
                    self.send_udp(p, &eth_src, &HOST_IP, 5, port as u16, &payload[..size]);
                    self.stats.sent += 1;
                }
            }
            9 => return data.starts_with(b"stop"),
            _ => {}
        }
        false
    }

    fn send_udp(
        &mut self,
        p: usize,
        eth_dst: &[u8; 6],
        ip_dst: &[u8; 4],
        sport: u16,
        dport: u16,
        data: &[u8],
    ) {
        let mac = self.mac;
        let csum = self.csum;
        let n = data.len();
        self.send(p, csum, |o| {
            ipv4_header(o, &mac, eth_dst, ip_dst, 17, 8 + n);
            let u = &mut o[34..42 + n];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            u[4..6].copy_from_slice(&((8 + n) as u16).to_be_bytes());
            u[8..].copy_from_slice(data);
            let ps = pseudo(&KIT_IP, ip_dst, 8 + n);
            if csum {
                // Offloaded: the pseudo-header sum, the device finishes it.
                u[6..8].copy_from_slice(&fold(ps).to_be_bytes());
            } else {
                u[6..8].fill(0);
                let mut c = !fold(sum(ps, u));
                if c == 0 {
                    c = 0xffff;
                }
                u[6..8].copy_from_slice(&c.to_be_bytes());
            }
            42 + n
        });
    }

    /// Publishes a receive chain with no writable buffer (hostile).
    pub fn hostile_rx(&mut self) {
        let addr = self.rx_buf(0, QSIZE - 1) as u64;
        self.dev.queue(0).add(&[(addr, 64, false)]);
        self.dev.kick_now(0);
    }

    /// Publishes a transmit chain that never ends (hostile).
    pub fn hostile_tx(&mut self) {
        let addr = self.tx_buf(0, 0) as u64;
        self.dev.queue(1).add_endless_chain(addr);
        self.dev.kick_now(1);
    }
}

fn ipv4_header(
    o: &mut [u8],
    src_mac: &[u8; 6],
    dst_mac: &[u8; 6],
    dst: &[u8; 4],
    proto: u8,
    l4: usize,
) {
    o[0..6].copy_from_slice(dst_mac);
    o[6..12].copy_from_slice(src_mac);
    o[12..14].copy_from_slice(&[8, 0]);
    let ip = &mut o[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&KIT_IP);
    ip[16..20].copy_from_slice(dst);
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

fn skip(what: &str) -> Verdict {
    let mut d = Detail::default();
    let _ = write!(d, "{what} not offered");
    Verdict::Skip(d)
}

fn fail(args: core::fmt::Arguments) -> Verdict {
    let mut d = Detail::default();
    let _ = d.write_fmt(args);
    Verdict::Fail(d)
}

/// Runs the responder until `stop` (or `secs`); the verdict counts what happened.
pub fn respond(
    out: &mut Com1,
    ring: usize,
    base: usize,
    packed: bool,
    mode: &Mode,
    secs: u64,
) -> Verdict {
    let mut nic = match Nic::open(ring, base, packed, mode) {
        Ok(n) => n,
        Err(v) => return v,
    };
    let _ = writeln!(
        out,
        "ALIOTH-KIT net ready mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} pairs={}",
        nic.mac[0], nic.mac[1], nic.mac[2], nic.mac[3], nic.mac[4], nic.mac[5], nic.pairs
    );
    let deadline = Deadline::after_ms(secs * 1000);
    let mut stopped = false;
    while !deadline.passed() {
        if nic.poll(mode) {
            stopped = true;
            break;
        }
    }
    let s = nic.stats;
    let mut d = Detail::default();
    let _ = write!(
        d,
        "rx={}+{} tx={}+{} arp={} icmp={} echo={} sent={} partial={} bad-csum={} bad-num-buffers={} tx-stalls={} status={:#x}",
        s.rx[0],
        s.rx[1],
        s.tx[0],
        s.tx[1],
        s.arp,
        s.icmp,
        s.echo,
        s.sent,
        s.partial,
        s.bad_csum,
        s.bad_num_buffers,
        s.tx_stalls,
        nic.status()
    );
    let mut ok = stopped && s.bad_csum == 0 && s.bad_num_buffers == 0 && s.tx_stalls == 0;
    if mode.mq {
        ok &= s.rx[0] > 0 && s.rx[1] > 0 && s.tx[0] > 0 && s.tx[1] > 0;
    }
    if !stopped {
        let _ = write!(d, " (no stop within {secs} s)");
    }
    if ok {
        Verdict::Pass(d)
    } else {
        Verdict::Fail(d)
    }
}

/// `kit.test=net-bench kit.bench=tx|rx,size=N,secs=S`: frames through virtio-net as fast as
/// the kit can. `tx` sends `size`-byte frames (ethertype 0x88b5, IEEE local experimental, so
/// the host stack counts and drops them) in batches, one notification per batch; `rx` keeps
/// 256 buffers posted and counts what arrives. Prints `bench-window start`/`end` around the
/// measured window and `ALIOTH-KIT bench net-DIR size=N frames=X ns=Y`.
pub fn bench(
    out: &mut Com1,
    ring: usize,
    buf: usize,
    packed: bool,
    tx: bool,
    size: usize,
    secs: u64,
) -> Verdict {
    const Q: u16 = 256;
    let opts = Options {
        features: F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF | crate::tests::ring_features(),
        queues: 2,
        packed,
        qsize: Q,
    };
    let mut dev = match Device::open(1, ring, &opts) {
        Ok(d) => d,
        Err(VirtioError::NotFound) => return skip("virtio-net device"),
        Err(e) => return fail(format_args!("open {e:?}")),
    };
    dev.queue(0).set_interrupts(false);
    dev.queue(1).set_interrupts(false);
    let size = size.clamp(60, 1514);
    // One frame (or receive buffer) shared by every descriptor: the device only reads frames,
    // and the kit does not look at what it receives.
    let frame = rd(buf, HDR + size);
    frame.fill(0);
    frame[HDR..HDR + 6].fill(0xff);
    frame[HDR + 6..HDR + 12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame[HDR + 12..HDR + 14].copy_from_slice(&[0x88, 0xb5]);
    let q = if tx { 1 } else { 0 };
    let bufs = |_| {
        if tx {
            [(buf as u64, (HDR + size) as u32, false)]
        } else {
            [(buf as u64 + 4096, BUF as u32, true)]
        }
    };
    for slot in 0..Q {
        dev.queue(q).add_slot(slot, &bufs(slot));
    }
    let _ = writeln!(out, "ALIOTH-KIT bench-window start");
    let start = crate::clock::now_ns();
    let end = start + secs * 1_000_000_000;
    dev.kick(q as u16);
    let mut frames = 0u64;
    let mut now = start;
    let mut slot = 0u16;
    while now < end {
        let mut batch = 0;
        while dev.queue(q).used().is_some() {
            batch += 1;
        }
        if batch > 0 {
            frames += batch;
            for _ in 0..batch {
                dev.queue(q).add_slot(slot, &bufs(slot));
                slot = (slot + 1) % Q;
            }
            dev.kick(q as u16);
        }
        now = crate::clock::now_ns();
    }
    let ns = now - start;
    let _ = writeln!(out, "ALIOTH-KIT bench-window end");
    let _ = writeln!(
        out,
        "ALIOTH-KIT bench net-{} size={size} frames={frames} ns={ns}",
        if tx { "tx" } else { "rx" }
    );
    let mut d = Detail::default();
    let _ = write!(d, "frames={frames}");
    if frames > 0 {
        Verdict::Pass(d)
    } else {
        Verdict::Fail(d)
    }
}
