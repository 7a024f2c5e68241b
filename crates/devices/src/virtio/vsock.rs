//! virtio-vsock (stream sockets) with a Unix-socket host side, as Firecracker and Cloud
//! Hypervisor lay it out, so host tools written for them work unchanged:
//!
//! - host-initiated: a host program connects to the VM's socket `uds`, writes
//!   `CONNECT <port>\n` and, once the guest accepts, reads `OK <host port>\n`; the stream is
//!   then the connection to guest port `<port>`;
//! - guest-initiated: a guest connection to CID 2 port P connects to `<uds>_P`.
//!
//! All the device's sockets (the listener, connections waiting for their `CONNECT` line, and
//! connections) sit in one edge-triggered epoll of its own, which is the device's only event
//! fd ([`ChainHandler::event_fds`], [`ChainHandler::event_driven`]); the worker's backend
//! (io_uring or epoll) waits on it, and the device then does non-blocking socket I/O on the
//! worker thread: no thread per connection.
//!
//! Flow control is the protocol's credit: host -> guest data is read from a socket straight
//! into the guest's receive buffers, and only as much as the guest's credit allows (a guest
//! that stops reading stops the host writer, and nothing is buffered here); guest -> host data
//! is written straight from the guest's buffers to the socket, and what the socket does not
//! take is kept, at most [`BUF_ALLOC`] bytes per connection (the credit the device grants), so
//! a slow host reader throttles the guest rather than growing memory. A guest that breaks the
//! protocol (unknown operation, wrong CIDs, a length beyond its buffer, data beyond its credit,
//! a packet for no connection) gets RST for that connection; the device keeps running.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use alioth_virtio::EventSet;
use alioth_virtio::event_set::{HANGUP, READABLE, WRITABLE};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alioth_queue::{DescChain, Iov};
use alioth_virtio::{BufferAction, ChainHandler, DeviceId, IoOp, RING_FEATURES, Virtio};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::LogLimiter;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The smallest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// The largest (CIDs are 32-bit in Linux's `sockaddr_vm`; `u32::MAX` is VMADDR_CID_ANY).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// Queue size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive credit the device grants each connection: guest -> host bytes it may hold
/// when the host reader is slower than the guest writer.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Connections per VM (both directions, including host connections that have not yet sent
/// their `CONNECT` line).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// The first port the host side uses for host-initiated connections (as Firecracker does).
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Room for the `_<port>` suffix of guest-initiated connections' socket paths.
const PORT_SUFFIX: usize = 11;
/// Send a credit update once the guest's unreported credit grows by this much.
const CREDIT_THRESHOLD: u32 = BUF_ALLOC / 4;
/// RST replies for packets that name no connection, kept while the guest posts no buffers.
const MAX_ORPHAN_REPLIES: usize = 256;

/// Queue indices.
const RX: u16 = 0;
const TX: u16 = 1;
const EVENT: u16 = 2;

/// `VIRTIO_VSOCK_F_STREAM`.
const F_STREAM: u32 = 0;

/// Packet operations (virtio 1.2 §5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, closed, or a protocol error).
    pub const RST: u16 = 3;
    /// No more data in one or both directions (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buffer space and forward count.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6), 44 bytes, little-endian, packed.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VsockHdr {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN's).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection.
    pub fwd_cnt: u32,
}

/// Header length.
pub const HDR_LEN: usize = std::mem::size_of::<VsockHdr>();

/// The device configuration (virtio 1.2 §5.10.4).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct VsockConfigSpace {
    /// The guest's CID.
    pub guest_cid: u64,
}

/// What a virtio-vsock device is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub cid: u64,
    /// The host socket: host programs connect here; guest connections to port P go to
    /// `<uds>_P`.
    pub uds: PathBuf,
    /// The most connections at once.
    pub max_connections: usize,
}

/// Errors creating a virtio-vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A setting is out of range.
    #[error("vsock: {0}")]
    Config(String),
    /// The host socket could not be set up.
    #[error("vsock socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl VsockConfig {
    /// A device for guest CID `cid` on host socket `uds`, with the default limits.
    pub fn new(cid: u64, uds: impl Into<PathBuf>) -> Self {
        VsockConfig {
            cid,
            uds: uds.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// Checks the settings without creating anything: the CID range, the socket path's length
    /// and directory, and that nothing but a socket is in the way.
    pub fn validate(&self) -> Result<(), VsockError> {
        let err = |s: String| Err(VsockError::Config(s));
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.cid) {
            return err(format!(
                "cid {} is reserved or out of range: use {MIN_GUEST_CID} to {MAX_GUEST_CID}",
                self.cid
            ));
        }
        if self.max_connections == 0 {
            return err("max_connections must be at least 1".into());
        }
        let p = &self.uds;
        let len = p.as_os_str().len();
        // sun_path holds 107 bytes and a NUL; guest connections append `_<port>`.
        if len == 0 || len + PORT_SUFFIX > 107 {
            return err(format!(
                "socket path {} must be 1 to {} bytes long (Unix socket paths are short)",
                p.display(),
                107 - PORT_SUFFIX
            ));
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return err(format!(
                "the directory of socket {} does not exist",
                p.display()
            ));
        }
        if let Ok(m) = std::fs::symlink_metadata(p) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return err(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

/// Counters of a virtio-vsock device (shared; readable while the device runs).
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Connections opened (both directions).
    pub connections: AtomicU64,
    /// Bytes host -> guest.
    pub rx_bytes: AtomicU64,
    /// Bytes guest -> host.
    pub tx_bytes: AtomicU64,
    /// RST sent to the guest for protocol errors or refused connections.
    pub resets: AtomicU64,
    /// Packets from the guest that broke the protocol.
    pub bad_packets: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// (host port, guest port).
type Key = (u32, u32);

/// Epoll tokens: the listener, the wake-up eventfd, host sockets waiting for their `CONNECT`
/// line (`PENDING | id`), and connections (their id, below `PENDING`).
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;
const PENDING: u64 = 1 << 63;
/// Ids (connections and pending sockets) stay below this.
const ID_MASK: u64 = (1 << 62) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or to send), waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// Control packets a connection owes the guest (at most one of each at a time).
#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    request: bool,
    response: bool,
    credit: bool,
    shutdown: bool,
    rst: bool,
}

struct Conn {
    stream: UnixStream,
    /// Its epoll token.
    id: u64,
    state: State,
    owed: Owed,
    /// In the ready list.
    queued: bool,
    /// The socket had data (or EOF) at its last edge and no read since has come back empty.
    readable: bool,
    /// Bytes sent to the guest; the guest's buffer size and forward count.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest -> host bytes written to the socket, and the count the guest last heard of.
    fwd_cnt: u32,
    reported_fwd: u32,
    /// Guest -> host bytes the socket has not taken yet (at most [`BUF_ALLOC`]).
    pending: VecDeque<u8>,
    /// The guest will send nothing more / take nothing more.
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    /// The host side reached EOF (or failed); SHUTDOWN owed or sent.
    host_eof: bool,
    /// Remove once `pending` is flushed (the guest shut down both directions).
    closing: bool,
}

impl Conn {
    fn new(stream: UnixStream, id: u64, state: State) -> Conn {
        Conn {
            stream,
            id,
            state,
            owed: Owed::default(),
            queued: false,
            readable: true,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            fwd_cnt: 0,
            reported_fwd: 0,
            pending: VecDeque::new(),
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_eof: false,
            closing: false,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_rx(&self) -> bool {
        let o = self.owed;
        o.request
            || o.response
            || o.credit
            || o.shutdown
            || o.rst
            || (self.state == State::Established
                && self.readable
                && !self.host_eof
                && !self.guest_shut_rcv
                && self.peer_credit() > 0)
    }
}

/// A host socket that has not yet said which guest port it wants.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A virtio-vsock device.
pub struct VirtioVsock {
    name: String,
    cid: u64,
    uds: PathBuf,
    max_conns: usize,
    config_bytes: Vec<u8>,
    listener: UnixListener,
    epoll: EventSet,
    /// Reused by `drain_events`.
    evbuf: Vec<(u64, u32)>,
    wake: EventFd,
    woken: bool,
    conns: HashMap<Key, Conn>,
    ids: HashMap<u64, Key>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    next_port: u32,
    ready: VecDeque<Key>,
    orphan_rsts: VecDeque<VsockHdr>,
    rx_chains: VecDeque<DescChain>,
    event_chains: Vec<DescChain>,
    /// A TRANSPORT_RESET event is owed (after a restore).
    reset_event: bool,
    /// Chains filled by the last `poll_io`, returned by `io_done`: receive and event queue.
    filled: Vec<(DescChain, u32)>,
    filled_events: Vec<(DescChain, u32)>,
    iovecs: Vec<libc::iovec>,
    counters: Arc<VsockCounters>,
    log: LogLimiter,
}

// SAFETY: `iovecs` only holds addresses into guest RAM between building and using them within
// one call on the worker thread; everything else is Send.
unsafe impl Send for VirtioVsock {}

/// A non-blocking connect to the Unix socket at `path`: a listener whose backlog is full
/// refuses rather than stalling the worker.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&raw const addr).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl VirtioVsock {
    /// Creates the device and its host socket (listening from now on; connections wait for
    /// the guest's driver).
    pub fn new(name: &str, config: &VsockConfig) -> Result<Self, VsockError> {
        config.validate()?;
        let sock_err = |source| VsockError::Socket {
            path: config.uds.clone(),
            source,
        };
        let epoll = EventSet::new().map_err(sock_err)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(sock_err)?;
        epoll.add(wake.as_raw_fd(), TOKEN_WAKE).map_err(sock_err)?;
        // Last: from here on a failure must remove the socket file.
        let listener = crate::bind_unix(&config.uds).map_err(sock_err)?;
        if let Err(e) = epoll.add(listener.as_raw_fd(), TOKEN_LISTENER) {
            let _ = std::fs::remove_file(&config.uds);
            return Err(sock_err(e));
        }
        let space = VsockConfigSpace {
            guest_cid: config.cid,
        };
        Ok(VirtioVsock {
            name: name.to_string(),
            cid: config.cid,
            uds: config.uds.clone(),
            max_conns: config.max_connections,
            config_bytes: space.as_bytes().to_vec(),
            listener,
            epoll,
            evbuf: Vec::new(),
            wake,
            woken: false,
            conns: HashMap::new(),
            ids: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            next_port: FIRST_HOST_PORT,
            ready: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            rx_chains: VecDeque::new(),
            event_chains: Vec::new(),
            reset_event: false,
            filled: Vec::new(),
            filled_events: Vec::new(),
            iovecs: Vec::new(),
            counters: Arc::new(VsockCounters::default()),
            log: LogLimiter::new(),
        })
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    /// The host socket.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    fn total_conns(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// A fresh epoll token id.
    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = (self.next_id + 1) & ID_MASK;
        id
    }

    /// Registers connection `k` on `stream` and owes the guest its first packet.
    fn add_conn(&mut self, k: Key, stream: UnixStream, state: State) -> Option<&mut Conn> {
        let id = self.new_id();
        self.epoll.add(stream.as_raw_fd(), id).ok()?;
        self.ids.insert(id, k);
        self.conns.insert(k, Conn::new(stream, id, state));
        bump(&self.counters.connections, 1);
        self.conns.get_mut(&k)
    }

    /// Wakes the worker's receive side (after the transmit side left work for it).
    fn poke(&mut self) {
        if !self.woken {
            self.woken = true;
            let _ = self.wake.write(1);
        }
    }

    fn enqueue(&mut self, k: Key) {
        if let Some(c) = self.conns.get_mut(&k)
            && !c.queued
            && c.wants_rx()
        {
            c.queued = true;
            self.ready.push_back(k);
        }
    }

    fn hdr(&self, k: Key, op: u16, len: u32, flags: u32, fwd_cnt: u32) -> VsockHdr {
        VsockHdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: k.0,
            dst_port: k.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Drops connection `k`: its socket closes (the host side sees EOF).
    fn remove(&mut self, k: Key) {
        if let Some(c) = self.conns.remove(&k) {
            self.ids.remove(&c.id);
            self.epoll.remove(c.stream.as_raw_fd());
        }
    }

    /// Ends connection `k` with an RST to the guest (the socket closes now).
    fn reset_conn(&mut self, k: Key) {
        if let Some(c) = self.conns.get_mut(&k) {
            c.owed = Owed {
                rst: true,
                ..Owed::default()
            };
            c.pending.clear();
            self.epoll.remove(c.stream.as_raw_fd());
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            c.readable = false;
            self.enqueue(k);
            self.poke();
        }
    }

    /// An RST for a packet that names no connection (or a refused one).
    fn reply_rst(&mut self, h: &VsockHdr) {
        bump(&self.counters.resets, 1);
        if self.orphan_rsts.len() >= MAX_ORPHAN_REPLIES {
            return;
        }
        self.orphan_rsts.push_back(VsockHdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
        self.poke();
    }

    fn bad(&self, what: std::fmt::Arguments) {
        bump(&self.counters.bad_packets, 1);
        self.log.warn(format_args!("{}: {what}", self.name));
    }

    // ---- host side ----

    /// Handles what the device's epoll reports.
    fn drain_events(&mut self) {
        let mut evs = std::mem::take(&mut self.evbuf);
        self.epoll.drain(|token, bits| evs.push((token, bits)));
        for &(token, bits) in &evs {
            match token {
                TOKEN_LISTENER => self.accept_all(),
                TOKEN_WAKE => {
                    let _ = self.wake.read();
                    self.woken = false;
                }
                t if t & PENDING != 0 => self.read_connect_line(t),
                t => {
                    if let Some(&k) = self.ids.get(&t) {
                        self.conn_event(k, bits);
                    }
                }
            }
        }
        evs.clear();
        self.evbuf = evs;
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log.warn(format_args!(
                        "{}: accept on {}: {e}",
                        self.name,
                        self.uds.display()
                    ));
                    return;
                }
            };
            if self.total_conns() >= self.max_conns {
                self.log.warn(format_args!(
                    "{}: {} connections open; refusing a host connection",
                    self.name, self.max_conns
                ));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.new_id();
            if self.epoll.add(stream.as_raw_fd(), PENDING | id).is_err() {
                continue;
            }
            self.pending.insert(
                id,
                Pending {
                    stream,
                    line: Vec::new(),
                },
            );
            // The line may already be there: edge-triggered, so read now.
            self.read_connect_line(PENDING | id);
        }
    }

    /// Reads a host connection's `CONNECT <port>\n` one byte at a time (whatever follows the
    /// line is the guest's data and stays in the socket).
    fn read_connect_line(&mut self, token: u64) {
        let id = token & !PENDING;
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        let mut byte = [0u8];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => {
                    let line = std::str::from_utf8(&p.line).unwrap_or("");
                    let port = line
                        .strip_prefix("CONNECT ")
                        .and_then(|s| s.trim_end_matches('\r').parse::<u32>().ok());
                    break port.ok_or("not `CONNECT <port>`");
                }
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err("line too long"),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.epoll.remove(p.stream.as_raw_fd());
        let guest_port = match port {
            Ok(port) => port,
            Err(why) => {
                self.log.warn(format_args!(
                    "{}: host connection dropped: {why}",
                    self.name
                ));
                return;
            }
        };
        // A host port no open connection to this guest port uses.
        let mut host_port = self.next_port;
        while self.conns.contains_key(&(host_port, guest_port)) {
            host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let k = (host_port, guest_port);
        let Some(c) = self.add_conn(k, p.stream, State::Connecting) else {
            return;
        };
        c.owed.request = true;
        self.enqueue(k);
    }

    fn conn_event(&mut self, k: Key, bits: u32) {
        let Some(c) = self.conns.get_mut(&k) else {
            return;
        };
        if c.state == State::Connecting && bits & HANGUP != 0 {
            // The host program gave up before the guest answered: withdraw the request.
            return self.reset_conn(k);
        }
        if bits & READABLE != 0 {
            c.readable = true;
        }
        if bits & WRITABLE != 0 && !c.pending.is_empty() {
            self.flush(k);
        }
        self.enqueue(k);
    }

    /// Writes what a connection holds for the host; on an error the connection is reset.
    fn flush(&mut self, k: Key) {
        let Some(c) = self.conns.get_mut(&k) else {
            return;
        };
        let mut wrote = 0usize;
        let mut failed = false;
        while !c.pending.is_empty() {
            let (a, _) = c.pending.as_slices();
            match send(c.stream.as_raw_fd(), a) {
                Ok(n) => {
                    c.pending.drain(..n);
                    wrote += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        self.credit_written(k, wrote);
        if failed {
            self.reset_conn(k);
            return;
        }
        self.after_flush(k);
    }

    /// Accounts `n` guest bytes as forwarded; owes the guest a credit update when enough
    /// accumulated.
    fn credit_written(&mut self, k: Key, n: usize) {
        let Some(c) = self.conns.get_mut(&k) else {
            return;
        };
        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
        bump(&self.counters.tx_bytes, n as u64);
        if c.fwd_cnt.wrapping_sub(c.reported_fwd) >= CREDIT_THRESHOLD {
            c.owed.credit = true;
            self.enqueue(k);
            self.poke();
        }
    }

    /// Once nothing is held: half-closes the socket after the guest's SHUTDOWN(SEND), ends the
    /// connection after SHUTDOWN of both directions.
    fn after_flush(&mut self, k: Key) {
        let Some(c) = self.conns.get_mut(&k) else {
            return;
        };
        if !c.pending.is_empty() {
            return;
        }
        if c.closing {
            // The guest is done in both directions: RST completes its close.
            self.reset_conn(k);
        } else if c.guest_shut_send {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    // ---- guest -> host ----

    /// Handles one transmit packet (parsed once: `h` and the payload buffers).
    fn transmit(&mut self, h: &VsockHdr, payload: &[Iov], mem: &GuestMemoryMmap) {
        if h.type_ != TYPE_STREAM {
            self.bad(format_args!("packet of type {} (only streams)", {
                h.type_
            }));
            return self.refuse(h);
        }
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.bad(format_args!(
                "packet from CID {} to CID {} (the guest is {}, the host {HOST_CID})",
                { h.src_cid },
                { h.dst_cid },
                self.cid
            ));
            return self.refuse(h);
        }
        let k = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            return self.connect_to_host(k, h);
        }
        let Some(c) = self.conns.get_mut(&k) else {
            if h.op != op::RST {
                self.reply_rst(h);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                // The host program learns its port. Nothing else was written to this fresh
                // socket, so its buffer takes the line whole; if not, the connection fails.
                let line = format!("OK {}\n", k.0);
                if !matches!(send(c.stream.as_raw_fd(), line.as_bytes()), Ok(n) if n == line.len())
                {
                    self.reset_conn(k);
                    return;
                }
            }
            op::RST => self.remove(k),
            op::SHUTDOWN => {
                c.guest_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                c.guest_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                if c.guest_shut_rcv && c.guest_shut_send {
                    c.closing = true;
                }
                self.after_flush(k);
            }
            op::RW if c.state == State::Established && !c.guest_shut_send => {
                self.forward(k, payload, mem);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => c.owed.credit = true,
            other => {
                let state = c.state;
                self.bad(format_args!(
                    "operation {other} on connection {}:{} in state {state:?}",
                    k.1, k.0
                ));
                self.reset_conn(k);
                return;
            }
        }
        // New credit may let data flow to the guest again.
        self.enqueue(k);
        if self.conns.get(&k).is_some_and(|c| c.queued) {
            self.poke();
        }
    }

    /// RST for a bad packet: the connection it names (if any) ends too.
    fn refuse(&mut self, h: &VsockHdr) {
        let k = (h.dst_port, h.src_port);
        if self.conns.contains_key(&k) && h.src_cid == self.cid {
            self.reset_conn(k);
        } else {
            self.reply_rst(h);
        }
    }

    fn connect_to_host(&mut self, k: Key, h: &VsockHdr) {
        if self.conns.contains_key(&k) {
            self.bad(format_args!("REQUEST for open connection {}:{}", k.1, k.0));
            return self.reset_conn(k);
        }
        if self.total_conns() >= self.max_conns {
            self.log.warn(format_args!(
                "{}: {} connections open; refusing guest port {} -> host port {}",
                self.name, self.max_conns, k.1, k.0
            ));
            return self.reply_rst(h);
        }
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), k.0));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("{}: connect {}: {e}", self.name, path.display());
                return self.reply_rst(h);
            }
        };
        let Some(c) = self.add_conn(k, stream, State::Established) else {
            return self.reply_rst(h);
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.owed.response = true;
        self.enqueue(k);
        self.poke();
    }

    /// Guest data for the host: straight to the socket while nothing is held, the rest held
    /// within the credit granted.
    fn forward(&mut self, k: Key, payload: &[Iov], mem: &GuestMemoryMmap) {
        let total: usize = payload.iter().map(|i| i.len() as usize).sum();
        let Some(c) = self.conns.get_mut(&k) else {
            return;
        };
        if c.pending.len() + total > BUF_ALLOC as usize {
            self.bad(format_args!(
                "connection {}:{} sent {total} bytes beyond its credit",
                k.1, k.0
            ));
            return self.reset_conn(k);
        }
        let mut sent = 0usize;
        if c.pending.is_empty() {
            self.iovecs.clear();
            self.iovecs.extend(payload.iter().map(Iov::as_iovec));
            match sendv(c.stream.as_raw_fd(), &self.iovecs) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return self.reset_conn(k),
            }
            self.iovecs.clear();
        }
        if sent < total {
            // Keep the rest (the guest's credit bounds it).
            let mut buf = vec![0u8; total - sent];
            let mut off = 0;
            let mut skip = sent;
            for iov in payload {
                let len = iov.len() as usize;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let want = len - skip;
                let at = vm_memory::GuestAddress(iov.gpa() + skip as u64);
                if vm_memory::Bytes::read_slice(mem, &mut buf[off..off + want], at).is_err() {
                    self.bad(format_args!("payload outside guest memory"));
                    return self.reset_conn(k);
                }
                off += want;
                skip = 0;
            }
            c.pending.extend(buf);
        }
        self.credit_written(k, sent);
    }

    // ---- host -> guest ----

    /// Fills the held receive chains with what connections owe the guest: control packets,
    /// then data the guest has credit for. Returns whether any chain was filled.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        while let Some(chain) = self.rx_chains.pop_front() {
            match self.next_packet(&chain, mem) {
                Some(n) => {
                    self.filled.push((chain, n));
                    any = true;
                }
                None => {
                    self.rx_chains.push_front(chain);
                    break;
                }
            }
        }
        any
    }

    /// Writes the next packet into `chain`; `None` if there is nothing to send.
    fn next_packet(&mut self, chain: &DescChain, mem: &GuestMemoryMmap) -> Option<u32> {
        if let Some(h) = self.orphan_rsts.pop_front() {
            return Some(self.write_hdr(chain, mem, &h, 0));
        }
        while let Some(k) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&k) else {
                continue;
            };
            c.queued = false;
            if let Some(n) = self.packet_for(k, chain, mem) {
                // More may follow for this connection.
                self.enqueue(k);
                return Some(n);
            }
        }
        None
    }

    fn write_hdr(&self, chain: &DescChain, mem: &GuestMemoryMmap, h: &VsockHdr, len: u32) -> u32 {
        match chain.write_at(mem, 0, h.as_bytes()) {
            Ok(n) if n == HDR_LEN => HDR_LEN as u32 + len,
            _ => {
                self.log.warn(format_args!(
                    "{}: receive buffer {} cannot take a header",
                    self.name,
                    chain.id()
                ));
                0
            }
        }
    }

    /// The packet connection `k` sends next, written into `chain`.
    fn packet_for(&mut self, k: Key, chain: &DescChain, mem: &GuestMemoryMmap) -> Option<u32> {
        let c = self.conns.get_mut(&k)?;
        let fwd = c.fwd_cnt;
        let control = if c.owed.rst {
            Some((op::RST, 0))
        } else if c.owed.request {
            c.owed.request = false;
            Some((op::REQUEST, 0))
        } else if c.owed.response {
            c.owed.response = false;
            Some((op::RESPONSE, 0))
        } else if c.owed.shutdown {
            c.owed.shutdown = false;
            Some((op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND))
        } else {
            None
        };
        if let Some((o, flags)) = control {
            c.reported_fwd = fwd;
            c.owed.credit = false;
            let h = self.hdr(k, o, 0, flags, fwd);
            if o == op::RST {
                self.remove(k);
                bump(&self.counters.resets, 1);
            }
            return Some(self.write_hdr(chain, mem, &h, 0));
        }
        if c.wants_rx() && c.state == State::Established && c.readable && !c.host_eof {
            let room = chain.writable_len().saturating_sub(HDR_LEN as u64);
            let want = (c.peer_credit() as u64).min(room).min(u32::MAX as u64) as usize;
            if want > 0 {
                self.iovecs.clear();
                let iovecs = &mut self.iovecs;
                sub_range(&chain.writable, HDR_LEN as u64, want as u64, |iov| {
                    iovecs.push(iov.as_iovec())
                });
                let r = recvv(c.stream.as_raw_fd(), &self.iovecs);
                self.iovecs.clear();
                match r {
                    Ok(0) => {
                        // The host closed its side: nothing more will come.
                        c.host_eof = true;
                        c.readable = false;
                        c.owed.shutdown = true;
                        return self.packet_for(k, chain, mem);
                    }
                    Ok(n) => {
                        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                        c.reported_fwd = fwd;
                        c.owed.credit = false;
                        bump(&self.counters.rx_bytes, n as u64);
                        let h = self.hdr(k, op::RW, n as u32, 0, fwd);
                        return Some(self.write_hdr(chain, mem, &h, n as u32));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => c.readable = false,
                    Err(_) => {
                        c.host_eof = true;
                        c.readable = false;
                        c.owed.shutdown = true;
                        return self.packet_for(k, chain, mem);
                    }
                }
            }
        }
        let c = self.conns.get_mut(&k)?;
        if c.owed.credit {
            c.owed.credit = false;
            c.reported_fwd = fwd;
            let h = self.hdr(k, op::CREDIT_UPDATE, 0, 0, fwd);
            return Some(self.write_hdr(chain, mem, &h, 0));
        }
        None
    }
}

/// Calls `f` with the parts of `iovs` that cover `len` bytes starting `skip` bytes in (as far
/// as the buffers go).
fn sub_range(iovs: &[Iov], mut skip: u64, mut len: u64, mut f: impl FnMut(Iov)) {
    for iov in iovs {
        if len == 0 {
            break;
        }
        let n = u64::from(iov.len());
        if skip >= n {
            skip -= n;
            continue;
        }
        // Both cuts are within the buffer, so they fit in u32.
        let (_, tail) = iov.split(skip as u32);
        let take = u64::from(tail.len()).min(len);
        f(tail.split(take as u32).0);
        len -= take;
        skip = 0;
    }
}

fn check(r: isize) -> std::io::Result<usize> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A non-blocking send without SIGPIPE.
fn send(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable buffer.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        match check(r) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn msghdr(iovecs: &[libc::iovec]) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iovecs.as_ptr().cast_mut();
    m.msg_iovlen = iovecs.len().min(libc::UIO_MAXIOV as usize) as _;
    m
}

/// A non-blocking gathered send without SIGPIPE.
fn sendv(fd: RawFd, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
    let m = msghdr(iovecs);
    loop {
        // SAFETY: the iovecs point into guest RAM, mapped for the VM's life; `m` is valid.
        let r = unsafe { libc::sendmsg(fd, &m, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        match check(r) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A non-blocking scattered receive.
fn recvv(fd: RawFd, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
    let mut m = msghdr(iovecs);
    loop {
        // SAFETY: the iovecs point into guest RAM buffers of a chain the device holds; `m` is
        // valid.
        let r = unsafe { libc::recvmsg(fd, &mut m, libc::MSG_DONTWAIT) };
        match check(r) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

impl Drop for VirtioVsock {
    fn drop(&mut self) {
        // The socket file goes with the device (the VM's clean exit).
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl Virtio for VirtioVsock {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Vsock
    }

    fn device_features(&self) -> u64 {
        RING_FEATURES | (1 << F_STREAM)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn config(&self) -> &[u8] {
        &self.config_bytes
    }

    fn restored(&mut self) {
        // The connections of the snapshot's process are gone: the guest must drop its own.
        self.reset_event = true;
    }

    fn reset(&mut self) {
        // Every connection ends (the host side sees EOF); the listener stays.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ready.clear();
        self.orphan_rsts.clear();
        self.rx_chains.clear();
        self.event_chains.clear();
        self.filled.clear();
        self.filled_events.clear();
        self.reset_event = false;
    }
}

impl ChainHandler for VirtioVsock {
    fn handle(&mut self, queue: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        match queue {
            RX => {
                if chain.writable_len() < HDR_LEN as u64 {
                    self.bad(format_args!(
                        "receive buffer {} is smaller than a header",
                        chain.id()
                    ));
                    return BufferAction::Written(0);
                }
                self.rx_chains.push_back(chain.clone());
                BufferAction::Hold
            }
            TX => {
                let mut h = VsockHdr::default();
                if !matches!(chain.read_at(mem, 0, h.as_mut_bytes()), Ok(HDR_LEN)) {
                    self.bad(format_args!("transmit chain {} has no header", chain.id()));
                    return BufferAction::Written(0);
                }
                // The payload: `len` bytes after the header, which must be in the chain.
                let avail = chain.readable_len() - HDR_LEN as u64;
                if u64::from(h.len) > avail {
                    self.bad(format_args!(
                        "packet says {} payload bytes, its buffers hold {avail}",
                        { h.len }
                    ));
                    self.refuse(&h);
                    return BufferAction::Written(0);
                }
                let mut payload = Vec::new();
                if h.op == op::RW {
                    sub_range(&chain.readable, HDR_LEN as u64, u64::from(h.len), |iov| {
                        payload.push(iov)
                    });
                }
                self.transmit(&h, &payload, mem);
                BufferAction::Written(0)
            }
            EVENT => {
                // Kept for TRANSPORT_RESET events (sent after a restore).
                self.event_chains.push(chain.clone());
                BufferAction::Hold
            }
            _ => BufferAction::Invalid(format!("{}: no queue {queue}", self.name)),
        }
    }

    fn complete(
        &mut self,
        _queue: u16,
        _chain: &DescChain,
        _mem: &GuestMemoryMmap,
        _result: std::io::Result<usize>,
    ) -> u32 {
        // `handle` never asks for I/O.
        0
    }

    fn poll_io(&mut self, queue: u16, mem: &GuestMemoryMmap) -> Option<IoOp> {
        if queue == EVENT && self.reset_event && !self.event_chains.is_empty() {
            self.reset_event = false;
            let chain = self.event_chains.remove(0);
            // struct virtio_vsock_event { le32 id; }: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is 0.
            let n = chain.write_at(mem, 0, &0u32.to_le_bytes()).unwrap_or(0);
            self.filled_events.push((chain, n as u32));
            return Some(IoOp::Nop);
        }
        if queue != RX {
            return None;
        }
        self.drain_events();
        if self.fill_rx(mem) {
            Some(IoOp::Nop)
        } else {
            None
        }
    }

    fn io_done(
        &mut self,
        queue: u16,
        _mem: &GuestMemoryMmap,
        _result: std::io::Result<usize>,
        used: &mut Vec<(DescChain, u32)>,
    ) {
        if queue == EVENT {
            used.append(&mut self.filled_events);
        } else {
            used.append(&mut self.filled);
        }
    }

    fn event_fds(&self) -> Vec<(RawFd, u16)> {
        vec![(self.epoll.as_raw_fd(), RX)]
    }

    fn event_driven(&self) -> bool {
        true
    }

    fn held(&self, queue: u16) -> Vec<alioth_queue::ChainToken> {
        match queue {
            RX => self.rx_chains.iter().map(|c| c.token()).collect(),
            EVENT => self.event_chains.iter().map(|c| c.token()).collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
#[path = "vsock_test.rs"]
mod tests;
