//! virtio-net on a host tap, one tap queue per queue pair.
//!
//! Transmit: each chain is one packet (12-byte virtio-net header, then the frame), checked once
//! (header flags and GSO type against the negotiated features, frame length against the MTU or
//! the GSO limit) and written to the pair's tap queue in one `writev`; a bad packet is dropped
//! and counted, never a reason to stall the queue.
//!
//! Receive: the device holds the receive chains the driver posts ([`BufferAction::Hold`]) and
//! reads from the tap only when they can take the largest packet the tap may hand over (one
//! chain, or with VIRTIO_NET_F_MRG_RXBUF as many as needed), so nothing is read that cannot be
//! delivered. The read goes straight into the chains' buffers ([`IoOp::Recv`]): the tap writes
//! the header into the first one, and the device then sets `num_buffers` and returns the
//! chains the packet filled. On io_uring the read stays in flight; on epoll it runs when the
//! tap is readable.
//!
//! The control queue answers VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (attaching and detaching tap
//! queues so the host steers packets only to active pairs), the RX mode and MAC table
//! commands (accepted: the tap delivers what its interface receives) and MAC_ADDR_SET.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alioth_queue::{
    DescChain, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use alioth_virtio::{BufferAction, ChainHandler, DeviceId, IoOp, Virtio};
use vm_memory::GuestMemoryMmap;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::LogLimiter;
use crate::tap::{Tap, TapError, VNET_HDR_LEN, offload};

/// Feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    /// The device handles packets with partial checksums.
    pub const CSUM: u32 = 0;
    /// The driver handles packets with partial checksums.
    pub const GUEST_CSUM: u32 = 1;
    /// The device reports its MTU.
    pub const MTU: u32 = 3;
    /// The device has a MAC address.
    pub const MAC: u32 = 5;
    /// The driver takes TSOv4 segments.
    pub const GUEST_TSO4: u32 = 7;
    /// The driver takes TSOv6 segments.
    pub const GUEST_TSO6: u32 = 8;
    /// The driver takes TSO with ECN.
    pub const GUEST_ECN: u32 = 9;
    /// The device takes TSOv4 segments.
    pub const HOST_TSO4: u32 = 11;
    /// The device takes TSOv6 segments.
    pub const HOST_TSO6: u32 = 12;
    /// The device takes TSO with ECN.
    pub const HOST_ECN: u32 = 13;
    /// Receive packets may span several buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// The configuration has a link status.
    pub const STATUS: u32 = 16;
    /// There is a control queue.
    pub const CTRL_VQ: u32 = 17;
    /// RX mode control.
    pub const CTRL_RX: u32 = 18;
    /// Several queue pairs.
    pub const MQ: u32 = 22;
    /// The MAC address can be set through the control queue.
    pub const CTRL_MAC_ADDR: u32 = 23;
}

/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The most queue pairs a device has.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Default MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU.
pub const MAX_MTU: u16 = 65535 - 14 - 4;
/// The largest GSO packet a tap hands over (64 KiB plus Ethernet and VLAN headers).
const MAX_GSO_FRAME: u64 = 65535 + 14 + 4;
/// Ethernet header plus a VLAN tag.
const L2_OVERHEAD: u64 = 14 + 4;
/// Smallest frame a tap accepts (an Ethernet header).
const MIN_FRAME: u64 = 14;
/// The most iovecs one read takes.
const IOV_MAX: usize = 1024;

/// `virtio_net_hdr` as VERSION_1 lays it out (virtio 1.2 §5.1.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VirtioNetHdr {
    /// NEEDS_CSUM (1), DATA_VALID (2), RSC_INFO (4).
    pub flags: u8,
    /// NONE (0), TCPV4 (1), UDP (3), TCPV6 (4), with ECN (0x80).
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers a received packet spans.
    pub num_buffers: u16,
}

/// Header flag: the checksum is partial.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// GSO types.
pub mod gso {
    /// Not a GSO packet.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP.
    pub const UDP: u8 = 3;
    /// TCP over IPv6.
    pub const TCPV6: u8 = 4;
    /// ECN bit.
    pub const ECN: u8 = 0x80;
}

/// The device configuration (virtio 1.2 §5.1.4), as far as the offered features use it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct NetConfigSpace {
    /// MAC address.
    pub mac: [u8; 6],
    /// VIRTIO_NET_S_LINK_UP (1).
    pub status: u16,
    /// Queue pairs.
    pub max_virtqueue_pairs: u16,
    /// MTU.
    pub mtu: u16,
}

/// Control queue classes and commands (virtio 1.2 §5.1.6.5).
mod ctrl {
    pub const CLASS_RX: u8 = 0;
    pub const CLASS_MAC: u8 = 1;
    pub const CLASS_MQ: u8 = 4;
    pub const MAC_TABLE_SET: u8 = 0;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
}

/// What a virtio-net device is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap's name, or a template with `%d` (see [`crate::tap::AUTO_NAME`]).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Queue pairs (tap queues).
    pub queue_pairs: u16,
    /// Size of every queue.
    pub queue_size: u16,
    /// MTU reported to the guest.
    pub mtu: u16,
    /// Bandwidth and packet limits, each direction on its own (none by default).
    pub rate_limit: alioth_virtio::RateLimit,
}

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A setting is out of range.
    #[error("net device on tap {tap}: {reason}")]
    Config {
        /// The tap.
        tap: String,
        /// What is wrong.
        reason: String,
    },
}

/// Counters of a virtio-net device (shared; readable while the device runs).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Packets delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Their bytes (frames, without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Packets the tap handed over that did not fit the guest's buffers.
    pub rx_dropped: AtomicU64,
    /// Tap read errors.
    pub rx_errors: AtomicU64,
    /// Packets written to the tap.
    pub tx_packets: AtomicU64,
    /// Their bytes (frames).
    pub tx_bytes: AtomicU64,
    /// Packets dropped before the tap: bad header, runt, empty or oversize frame.
    pub tx_invalid: AtomicU64,
    /// Tap write errors and short writes.
    pub tx_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What a queue index is, for a device with `pairs` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Rx(usize),
    Tx(usize),
    Ctrl,
    Unknown,
}

/// A receive queue's state.
#[derive(Debug, Default)]
struct Rx {
    /// Chains the driver posted, in order.
    held: VecDeque<DescChain>,
    /// Their writable bytes.
    held_bytes: u64,
    /// How many of the first held chains the read in flight covers (0: none).
    reading: usize,
    /// A tap error that a retry would repeat: no reads until the next reset or pair change.
    stopped: bool,
}

/// A virtio-net device.
pub struct VirtioNet {
    name: String,
    tap: Tap,
    offered: u64,
    acked: u64,
    config: NetConfigSpace,
    config_bytes: Vec<u8>,
    pairs: u16,
    queue_size: u16,
    mtu: u16,
    active_pairs: u16,
    rx: Vec<Rx>,
    counters: Arc<NetCounters>,
    log: LogLimiter,
    tx_limit: alioth_virtio::RateLimiter,
    rx_limit: alioth_virtio::RateLimiter,
    /// Why the last receive did not start: the wait for `rx_limit`.
    rx_wait: Option<std::time::Duration>,
}

fn bit(b: u32) -> u64 {
    1 << b
}

impl NetConfig {
    /// Checks the settings without touching the host: queue pairs, queue size, MTU, MAC, the
    /// tap name's length.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.tap.len() > crate::tap::MAX_NAME_LEN {
            return Err(TapError::NameTooLong {
                name: self.tap.clone(),
            }
            .into());
        }
        VirtioNet::check(self)
    }
}

impl VirtioNet {
    /// Opens the tap of `cfg` (blocking descriptors for io_uring, `nonblocking` ones for
    /// readiness-driven backends) for the device called `name`.
    pub fn open(name: &str, cfg: &NetConfig, nonblocking: bool) -> Result<Self, NetError> {
        cfg.validate()?;
        let tap = Tap::open(&cfg.tap, usize::from(cfg.queue_pairs), nonblocking)?;
        Ok(Self::with_tap(name, cfg, tap))
    }

    fn check(cfg: &NetConfig) -> Result<(), NetError> {
        let bad = |reason: String| NetError::Config {
            tap: cfg.tap.clone(),
            reason,
        };
        if cfg.queue_pairs == 0 || cfg.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(bad(format!(
                "queues = {}: a device has 1 to {MAX_QUEUE_PAIRS} queue pairs",
                cfg.queue_pairs
            )));
        }
        if !(2..=32768).contains(&cfg.queue_size) || !cfg.queue_size.is_power_of_two() {
            return Err(bad(format!(
                "queue_size = {}: a power of two from 2 to 32768",
                cfg.queue_size
            )));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&cfg.mtu) {
            return Err(bad(format!("mtu = {}: {MIN_MTU} to {MAX_MTU}", cfg.mtu)));
        }
        if cfg.mac[0] & 1 != 0 {
            return Err(bad("the MAC address is a multicast address".into()));
        }
        Ok(())
    }

    /// A device on an open `tap` (its queue count is the number of pairs).
    pub fn with_tap(name: &str, cfg: &NetConfig, tap: Tap) -> Self {
        let pairs = tap.queues().clamp(1, usize::from(MAX_QUEUE_PAIRS)) as u16;
        let mut offered = [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_PACKED,
            VIRTIO_F_EVENT_IDX,
            VIRTIO_F_INDIRECT_DESC,
        ]
        .iter()
        .fold(0, |f, b| f | bit(*b));
        for b in [
            feature::CSUM,
            feature::HOST_TSO4,
            feature::HOST_TSO6,
            feature::HOST_ECN,
            feature::MTU,
            feature::MAC,
            feature::MRG_RXBUF,
            feature::STATUS,
            feature::CTRL_VQ,
            feature::CTRL_RX,
            feature::CTRL_MAC_ADDR,
        ] {
            offered |= bit(b);
        }
        if tap.offloads_supported() {
            for b in [
                feature::GUEST_CSUM,
                feature::GUEST_TSO4,
                feature::GUEST_TSO6,
                feature::GUEST_ECN,
            ] {
                offered |= bit(b);
            }
        }
        if pairs > 1 {
            offered |= bit(feature::MQ);
        }
        let config = NetConfigSpace {
            mac: cfg.mac,
            status: 1,
            max_virtqueue_pairs: pairs,
            mtu: cfg.mtu,
        };
        VirtioNet {
            name: name.to_string(),
            tap,
            offered,
            acked: 0,
            config,
            config_bytes: config.as_bytes().to_vec(),
            pairs,
            queue_size: cfg.queue_size,
            mtu: cfg.mtu,
            active_pairs: 1,
            rx: (0..pairs).map(|_| Rx::default()).collect(),
            counters: Arc::new(NetCounters::default()),
            log: LogLimiter::new(),
            tx_limit: alioth_virtio::RateLimiter::new(&cfg.rate_limit),
            rx_limit: alioth_virtio::RateLimiter::new(&cfg.rate_limit),
            rx_wait: None,
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    fn has(&self, b: u32) -> bool {
        self.acked & bit(b) != 0
    }

    fn role(&self, queue: u16) -> Role {
        let q = usize::from(queue);
        let pairs = if self.has(feature::MQ) {
            usize::from(self.pairs)
        } else {
            1
        };
        if q < 2 * pairs {
            if q % 2 == 0 {
                Role::Rx(q / 2)
            } else {
                Role::Tx(q / 2)
            }
        } else if q == 2 * pairs && self.has(feature::CTRL_VQ) {
            Role::Ctrl
        } else {
            Role::Unknown
        }
    }

    /// The largest packet (header included) the tap may hand over, given what the guest took.
    fn max_rx_packet(&self) -> u64 {
        let gso = [feature::GUEST_TSO4, feature::GUEST_TSO6]
            .iter()
            .any(|b| self.has(*b));
        let frame = if gso {
            MAX_GSO_FRAME
        } else {
            u64::from(self.mtu) + L2_OVERHEAD
        };
        VNET_HDR_LEN as u64 + frame
    }

    fn warn(&mut self, msg: std::fmt::Arguments) {
        if let Some(suppressed) = self.log.allow() {
            if suppressed > 0 {
                log::warn!(
                    "{}: {msg} ({suppressed} similar messages suppressed)",
                    self.name
                );
            } else {
                log::warn!("{}: {msg}", self.name);
            }
        }
    }

    /// Why a transmit header cannot go to the tap, if it cannot.
    fn tx_problem(&self, hdr: &VirtioNetHdr, frame: u64) -> Option<&'static str> {
        if frame == 0 {
            return Some("empty frame");
        }
        if frame < MIN_FRAME {
            return Some("frame shorter than an Ethernet header");
        }
        if hdr.flags & HDR_F_NEEDS_CSUM != 0 {
            if !self.has(feature::CSUM) {
                return Some("partial checksum without VIRTIO_NET_F_CSUM");
            }
            let end = u64::from(hdr.csum_start) + u64::from(hdr.csum_offset) + 2;
            if end > frame {
                return Some("checksum position beyond the frame");
            }
        }
        let need = match hdr.gso_type & !gso::ECN {
            gso::NONE => None,
            gso::TCPV4 => Some(feature::HOST_TSO4),
            gso::TCPV6 => Some(feature::HOST_TSO6),
            _ => return Some("unsupported GSO type"),
        };
        match need {
            None => {
                if hdr.gso_type & gso::ECN != 0 {
                    return Some("ECN flag without GSO");
                }
                if frame > u64::from(self.mtu) + L2_OVERHEAD {
                    return Some("frame larger than the MTU");
                }
            }
            Some(f) => {
                if !self.has(f) {
                    return Some("GSO type not negotiated");
                }
                if hdr.gso_type & gso::ECN != 0 && !self.has(feature::HOST_ECN) {
                    return Some("ECN not negotiated");
                }
                if hdr.gso_size == 0 || hdr.flags & HDR_F_NEEDS_CSUM == 0 {
                    return Some("GSO packet without segment size or partial checksum");
                }
                if frame > MAX_GSO_FRAME {
                    return Some("GSO frame larger than 64 KiB");
                }
            }
        }
        None
    }

    fn handle_tx(&mut self, pair: usize, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        let total = chain.readable_len();
        if self.tx_limit.is_limited()
            && let Err(wait) = self
                .tx_limit
                .admit(total.saturating_sub(VNET_HDR_LEN as u64))
        {
            return BufferAction::Throttle(wait);
        }
        let mut hdr = VirtioNetHdr::default();
        let got = chain.read_at(mem, 0, hdr.as_mut_bytes());
        let problem = match got {
            Ok(n) if n == VNET_HDR_LEN => self.tx_problem(&hdr, total - VNET_HDR_LEN as u64),
            Ok(_) => Some("no room for the virtio-net header"),
            Err(_) => Some("header outside guest memory"),
        };
        if let Some(p) = problem {
            bump(&self.counters.tx_invalid, 1);
            self.warn(format_args!("transmit queue {pair}: dropped a packet: {p}"));
            return BufferAction::Written(0);
        }
        let Some(fd) = self.tap.fd(pair) else {
            return BufferAction::Written(0);
        };
        BufferAction::Io(IoOp::Send {
            fd,
            iovs: chain.readable.clone(),
        })
    }

    fn handle_ctrl(&mut self, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        if chain.writable_len() == 0 {
            return BufferAction::Invalid("control command without room for the ack".into());
        }
        let mut head = [0u8; 2];
        let mut data = [0u8; 8];
        let ack = match chain.read_at(mem, 0, &mut head) {
            Ok(2) => {
                let n = chain.read_at(mem, 2, &mut data).unwrap_or(0);
                self.control(head[0], head[1], &data[..n])
            }
            _ => ctrl::ERR,
        };
        match chain.write_at(mem, 0, &[ack]) {
            Ok(_) => BufferAction::Written(1),
            Err(e) => BufferAction::Invalid(e.to_string()),
        }
    }

    fn control(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        match (class, cmd) {
            // Promiscuous, all-multicast and the rest: the tap hands over what its interface
            // receives, which is what these modes ask for or more.
            (ctrl::CLASS_RX, 0..=5) if self.has(feature::CTRL_RX) && !data.is_empty() => ctrl::OK,
            (ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET) if self.has(feature::CTRL_RX) => ctrl::OK,
            (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET)
                if self.has(feature::CTRL_MAC_ADDR) && data.len() >= 6 =>
            {
                self.config.mac.copy_from_slice(&data[..6]);
                self.config_bytes = self.config.as_bytes().to_vec();
                ctrl::OK
            }
            (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET) if self.has(feature::MQ) && data.len() >= 2 => {
                let n = u16::from_le_bytes([data[0], data[1]]);
                if n == 0 || n > self.pairs {
                    return ctrl::ERR;
                }
                self.set_active_pairs(n);
                ctrl::OK
            }
            _ => ctrl::ERR,
        }
    }

    /// Steers the host's packets to the first `n` tap queues only.
    fn set_active_pairs(&mut self, n: u16) {
        self.active_pairs = n;
        for p in 0..usize::from(self.pairs) {
            if let Err(e) = self.tap.set_queue_attached(p, p < usize::from(n)) {
                self.warn(format_args!("{e}"));
            }
            self.rx[p].stopped = false;
        }
    }
}

impl Virtio for VirtioNet {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Net
    }

    fn device_features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; 2 * usize::from(self.pairs) + 1]
    }

    fn config(&self) -> &[u8] {
        &self.config_bytes
    }

    fn activate(&mut self, features: u64) -> alioth_virtio::Result<()> {
        self.acked = features & self.offered;
        let mut flags = 0;
        if self.has(feature::GUEST_CSUM) {
            flags |= offload::CSUM;
            if self.has(feature::GUEST_TSO4) {
                flags |= offload::TSO4;
            }
            if self.has(feature::GUEST_TSO6) {
                flags |= offload::TSO6;
            }
            if self.has(feature::GUEST_ECN) && flags & (offload::TSO4 | offload::TSO6) != 0 {
                flags |= offload::TSO_ECN;
            }
        }
        self.tap
            .set_offload(flags)
            .map_err(|e| alioth_virtio::Error::Io {
                what: format!("{}: tap offloads", self.name),
                source: std::io::Error::other(e.to_string()),
            })?;
        // One pair until the driver asks for more (virtio 1.2 §5.1.6.5.5).
        self.set_active_pairs(1);
        log::info!(
            "{}: started on tap {} with features {:#x} (tap offloads {flags:#x})",
            self.name,
            self.tap.name(),
            self.acked
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = 0;
        for rx in &mut self.rx {
            *rx = Rx::default();
        }
        if let Err(e) = self.tap.set_offload(0) {
            self.warn(format_args!("{e}"));
        }
        let pairs = self.pairs;
        self.set_active_pairs(pairs);
    }
}

impl ChainHandler for VirtioNet {
    fn handle(&mut self, queue: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        match self.role(queue) {
            Role::Rx(p) => {
                let room = chain.writable_len();
                if !chain.readable.is_empty() || room < VNET_HDR_LEN as u64 {
                    return BufferAction::Invalid(format!(
                        "receive queue {p}: a chain with {} readable and {room} writable bytes (receive buffers are device-writable and hold at least the {VNET_HDR_LEN}-byte header)",
                        chain.readable_len()
                    ));
                }
                let rx = &mut self.rx[p];
                rx.held_bytes += room;
                rx.held.push_back(chain.clone());
                BufferAction::Hold
            }
            Role::Tx(p) => self.handle_tx(p, chain, mem),
            Role::Ctrl => self.handle_ctrl(chain, mem),
            Role::Unknown => BufferAction::Invalid(format!("no queue {queue}")),
        }
    }

    fn complete(
        &mut self,
        queue: u16,
        chain: &DescChain,
        _mem: &GuestMemoryMmap,
        result: std::io::Result<usize>,
    ) -> u32 {
        // Only transmissions do I/O per chain; their used length is 0.
        let want = chain.readable_len();
        match result {
            Ok(n) if n as u64 == want => {
                bump(&self.counters.tx_packets, 1);
                bump(&self.counters.tx_bytes, want - VNET_HDR_LEN as u64);
            }
            Ok(n) => {
                bump(&self.counters.tx_errors, 1);
                self.warn(format_args!(
                    "queue {queue}: short write to the tap ({n} of {want} bytes)"
                ));
            }
            Err(e) => {
                bump(&self.counters.tx_errors, 1);
                self.warn(format_args!("queue {queue}: writing to the tap: {e}"));
            }
        }
        0
    }

    fn poll_io(&mut self, queue: u16, _mem: &GuestMemoryMmap) -> Option<IoOp> {
        let Role::Rx(p) = self.role(queue) else {
            return None;
        };
        if p >= usize::from(self.active_pairs) {
            return None;
        }
        let max = self.max_rx_packet();
        let mrg = self.has(feature::MRG_RXBUF);
        let queue_size = usize::from(self.queue_size);
        let fd = self.tap.fd(p)?;
        let rx = &mut self.rx[p];
        if rx.reading > 0 || rx.stopped || rx.held.is_empty() {
            return None;
        }
        // Without MRG_RXBUF a packet goes into one chain. With it, read only once the chains
        // held can take the largest packet (or the ring can give no more).
        if mrg && rx.held_bytes < max && rx.held.len() < queue_size {
            return None;
        }
        // A packet's size is known once it is read: the limit is checked before, charged after.
        if let Err(wait) = self.rx_limit.ready() {
            self.rx_wait = Some(wait);
            return None;
        }
        let rx = &mut self.rx[p];
        let mut iovs = Vec::new();
        let mut bytes = 0;
        let mut chains = 0;
        for c in &rx.held {
            if chains > 0 && (!mrg || bytes >= max || iovs.len() + c.writable.len() > IOV_MAX) {
                break;
            }
            iovs.extend_from_slice(&c.writable);
            bytes += c.writable_len();
            chains += 1;
        }
        rx.reading = chains;
        Some(IoOp::Recv { fd, iovs })
    }

    fn io_throttle(&mut self, queue: u16) -> Option<std::time::Duration> {
        match self.role(queue) {
            Role::Rx(_) => self.rx_wait.take(),
            _ => None,
        }
    }

    fn held(&self, queue: u16) -> Vec<alioth_queue::ChainToken> {
        match self.role(queue) {
            Role::Rx(p) => self.rx[p].held.iter().map(|c| c.token()).collect(),
            _ => Vec::new(),
        }
    }

    fn io_done(
        &mut self,
        queue: u16,
        mem: &GuestMemoryMmap,
        result: std::io::Result<usize>,
        used: &mut Vec<(DescChain, u32)>,
    ) {
        let Role::Rx(p) = self.role(queue) else {
            return;
        };
        let covered = std::mem::take(&mut self.rx[p].reading);
        let n = match result {
            Ok(n) if n >= VNET_HDR_LEN => n as u64,
            Ok(n) => {
                bump(&self.counters.rx_errors, 1);
                self.warn(format_args!(
                    "receive queue {p}: {n}-byte read from the tap"
                ));
                return;
            }
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::ECANCELED) | Some(libc::EINTR) => {}
                    // The packet did not fit the buffers: the tap consumed and dropped it.
                    Some(libc::EFAULT) | Some(libc::EMSGSIZE) | Some(libc::EINVAL) => {
                        bump(&self.counters.rx_dropped, 1);
                        self.warn(format_args!(
                            "receive queue {p}: a packet larger than the posted buffers was dropped"
                        ));
                    }
                    _ => {
                        bump(&self.counters.rx_errors, 1);
                        self.rx[p].stopped = true;
                        self.warn(format_args!(
                            "receive queue {p}: reading the tap: {e}; receiving stops until the driver resets the device or changes queue pairs"
                        ));
                    }
                }
                return;
            }
        };
        self.rx_limit.consume(n - VNET_HDR_LEN as u64);
        // Fill the covered chains in order; the packet's bytes end somewhere in the k-th.
        let rx = &mut self.rx[p];
        let mut left = n;
        let mut lens = Vec::new();
        for c in rx.held.iter().take(covered) {
            if left == 0 {
                break;
            }
            let take = left.min(c.writable_len());
            lens.push(take as u32);
            left -= take;
        }
        let count = lens.len() as u16;
        if let Some(first) = rx.held.front() {
            // num_buffers sits in the first buffer's header; the tap left it untouched.
            let _ = first.write_at(mem, 10, &count.to_le_bytes());
        }
        for len in lens {
            let Some(c) = rx.held.pop_front() else { break };
            rx.held_bytes -= c.writable_len();
            used.push((c, len));
        }
        bump(&self.counters.rx_packets, 1);
        bump(&self.counters.rx_bytes, n - VNET_HDR_LEN as u64);
    }

    fn event_fds(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        (0..usize::from(self.pairs))
            .filter_map(|p| Some((self.tap.fd(p)?, (2 * p) as u16)))
            .collect()
    }
}

#[cfg(test)]
#[path = "net_test.rs"]
mod tests;
