//! virtio-console: one port (hvc0 in a Linux guest) on stdio, a file, a pseudo-terminal or a
//! Unix socket.
//!
//! Input reaches the guest only as fast as it posts receive buffers: the device reads from the
//! host side only into buffers it holds, so a slow guest leaves the bytes in the host's
//! terminal, pty or socket buffer (the writer waits) and nothing is lost. Output is written by
//! the worker, never a vCPU, and never makes the guest wait (Linux's console driver spins
//! until its buffer comes back): what a pty or socket reader does not take at once is kept up
//! to [`MAX_PENDING_OUTPUT`] bytes and the excess dropped and counted. Stdout and files take
//! plain writes, as the serial port's output does.
//!
//! Like virtio-vsock, the device's host descriptors sit in an edge-triggered epoll of its own
//! that the worker's backend waits on ([`ChainHandler::event_driven`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alioth_queue::DescChain;
use alioth_virtio::event_set::{READABLE, WRITABLE};
use alioth_virtio::{BufferAction, ChainHandler, DeviceId, EventSet, IoOp, RING_FEATURES, Virtio};
use vm_memory::GuestMemoryMmap;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::serial::ESCAPE;
use crate::{EventSink, LogLimiter, VmEvent};

/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 128;
/// Output a slow pty or socket reader may leave behind before more is dropped.
pub const MAX_PENDING_OUTPUT: usize = 64 << 10;
/// The most input bytes one read takes.
const MAX_READ: usize = 16 << 10;

const RX: u16 = 0;
const TX: u16 = 1;

/// The device configuration (virtio 1.2 §5.3.4); none of its features are offered, so the
/// guest reads zeros.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConsoleConfigSpace {
    /// Columns (VIRTIO_CONSOLE_F_SIZE).
    pub cols: u16,
    /// Rows (VIRTIO_CONSOLE_F_SIZE).
    pub rows: u16,
    /// Ports (VIRTIO_CONSOLE_F_MULTIPORT).
    pub max_nr_ports: u32,
    /// Emergency write (VIRTIO_CONSOLE_F_EMERG_WRITE).
    pub emerg_wr: u32,
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A new pseudo-terminal (its path is logged and available from [`VirtioConsole::pty`]).
    Pty,
    /// A Unix socket listening at the path; one client at a time is the terminal.
    Socket(PathBuf),
}

/// Errors creating a virtio-console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A setting is wrong.
    #[error("console: {0}")]
    Config(String),
    /// A host resource failed.
    #[error("console {what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Counters of a console (shared; readable while the device runs).
#[derive(Debug, Default)]
pub struct ConsoleCounters {
    /// Input bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Output bytes written to the host side.
    pub tx_bytes: AtomicU64,
    /// Output bytes dropped: no socket client, or a reader too slow.
    pub tx_dropped: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The host side.
enum Host {
    Stdio {
        input: OwnedFd,
        output: File,
        escape: Option<EventSink>,
        saw_escape: bool,
    },
    File(File),
    Pty {
        master: OwnedFd,
        // Kept open so the master never reports a hangup while no terminal is attached.
        _slave: OwnedFd,
        path: PathBuf,
    },
    Socket {
        listener: UnixListener,
        client: Option<UnixStream>,
        path: PathBuf,
    },
}

const TOKEN_INPUT: u64 = 1;
const TOKEN_LISTENER: u64 = 2;

/// A virtio-console device.
pub struct VirtioConsole {
    name: String,
    config_bytes: Vec<u8>,
    host: Host,
    epoll: EventSet,
    /// Reused by `drain_events`.
    evbuf: Vec<(u64, u32)>,
    /// The input may have bytes (its last edge has not been read dry).
    input_ready: bool,
    input_closed: bool,
    rx_chains: VecDeque<DescChain>,
    filled: Vec<(DescChain, u32)>,
    pending: VecDeque<u8>,
    buf: Vec<u8>,
    counters: Arc<ConsoleCounters>,
    log: LogLimiter,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConsoleError {
    let what = what.into();
    move |source| ConsoleError::Io { what, source }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; results are checked.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new pseudo-terminal in raw mode: (master, slave, slave path).
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd, PathBuf)> {
    // SAFETY: plain syscalls; every result is checked, and the descriptors are owned at once.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) < 0 || libc::unlockpt(m) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        let r = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        let path = std::ffi::CStr::from_ptr(name.as_ptr());
        let s = libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let slave = OwnedFd::from_raw_fd(s);
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(s, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(s, libc::TCSANOW, &t);
        }
        use std::os::unix::ffi::OsStrExt;
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(path.to_bytes()));
        Ok((master, slave, path))
    }
}

/// Checks a console mode's paths without creating anything.
pub fn validate(mode: &ConsoleMode) -> Result<(), ConsoleError> {
    let err = |s: String| Err(ConsoleError::Config(s));
    match mode {
        ConsoleMode::File(p) => {
            if let Ok(m) = std::fs::metadata(p)
                && !m.is_file()
            {
                return err(format!(
                    "file {} exists and is not a regular file",
                    p.display()
                ));
            }
            if !parent(p).is_dir() {
                return err(format!("the directory of {} does not exist", p.display()));
            }
        }
        ConsoleMode::Socket(p) => {
            if p.as_os_str().len() > 107 {
                return err(format!("socket path {} is over 107 bytes", p.display()));
            }
            if !parent(p).is_dir() {
                return err(format!("the directory of {} does not exist", p.display()));
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
        }
        ConsoleMode::Stdio | ConsoleMode::Pty => {}
    }
    Ok(())
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

impl VirtioConsole {
    /// Creates the console on `mode`. With [`ConsoleMode::Stdio`], `escape` (given when stdin is
    /// a terminal in raw mode) makes Ctrl-A `x` report [`VmEvent::UserQuit`] to it.
    pub fn new(
        name: &str,
        mode: &ConsoleMode,
        escape: Option<EventSink>,
    ) -> Result<Self, ConsoleError> {
        validate(mode)?;
        let epoll = EventSet::new().map_err(io_err("epoll"))?;
        let host = match mode {
            ConsoleMode::Stdio => {
                let input = dup(libc::STDIN_FILENO).map_err(io_err("stdin"))?;
                let output = dup(libc::STDOUT_FILENO).map_err(io_err("stdout"))?;
                Host::Stdio {
                    input,
                    output: File::from(output),
                    escape,
                    saw_escape: false,
                }
            }
            ConsoleMode::File(p) => Host::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io_err(format!("file {}", p.display())))?,
            ),
            ConsoleMode::Pty => {
                let (master, slave, path) = open_pty().map_err(io_err("pty"))?;
                set_nonblocking(master.as_raw_fd()).map_err(io_err("pty"))?;
                Host::Pty {
                    master,
                    _slave: slave,
                    path,
                }
            }
            ConsoleMode::Socket(p) => {
                let listener =
                    crate::bind_unix(p).map_err(io_err(format!("socket {}", p.display())))?;
                Host::Socket {
                    listener,
                    client: None,
                    path: p.clone(),
                }
            }
        };
        let mut dev = VirtioConsole {
            name: name.to_string(),
            config_bytes: ConsoleConfigSpace::default().as_bytes().to_vec(),
            host,
            epoll,
            evbuf: Vec::new(),
            input_ready: false,
            input_closed: false,
            rx_chains: VecDeque::new(),
            filled: Vec::new(),
            pending: VecDeque::new(),
            buf: Vec::new(),
            counters: Arc::new(ConsoleCounters::default()),
            log: LogLimiter::new(),
        };
        let (fd, token) = match &dev.host {
            Host::Stdio { input, .. } => (Some(input.as_raw_fd()), TOKEN_INPUT),
            Host::Pty { master, .. } => (Some(master.as_raw_fd()), TOKEN_INPUT),
            Host::Socket { listener, .. } => (Some(listener.as_raw_fd()), TOKEN_LISTENER),
            Host::File(_) => (None, 0),
        };
        if let Some(fd) = fd
            && let Err(e) = dev.epoll.add(fd, token)
        {
            // stdin redirected from a regular file or /dev/null cannot be polled: no input.
            if token == TOKEN_INPUT && e.raw_os_error() == Some(libc::EPERM) {
                log::info!("{name}: stdin cannot be polled; the console has no input");
                dev.input_closed = true;
            } else {
                return Err(io_err("epoll")(e));
            }
        }
        Ok(dev)
    }

    /// The pseudo-terminal's path (pty mode).
    pub fn pty(&self) -> Option<&Path> {
        match &self.host {
            Host::Pty { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<ConsoleCounters> {
        self.counters.clone()
    }

    /// The descriptor the guest's input comes from now, if any.
    fn input_fd(&self) -> Option<RawFd> {
        match &self.host {
            Host::Stdio { input, .. } => Some(input.as_raw_fd()),
            Host::Pty { master, .. } => Some(master.as_raw_fd()),
            Host::Socket { client, .. } => client.as_ref().map(|c| c.as_raw_fd()),
            Host::File(_) => None,
        }
    }

    fn drain_events(&mut self) {
        let mut evs = std::mem::take(&mut self.evbuf);
        self.epoll.drain(|token, bits| evs.push((token, bits)));
        for &(token, bits) in &evs {
            if token == TOKEN_LISTENER {
                self.accept();
                continue;
            }
            if bits & READABLE != 0 {
                self.input_ready = true;
            }
            if bits & WRITABLE != 0 {
                self.flush();
            }
        }
        evs.clear();
        self.evbuf = evs;
    }

    fn accept(&mut self) {
        let Host::Socket {
            listener, client, ..
        } = &mut self.host
        else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    if client.is_some() {
                        // One terminal at a time: a second one is closed at once.
                        self.log.warn(format_args!(
                            "{}: a second socket client was refused",
                            self.name
                        ));
                        continue;
                    }
                    if s.set_nonblocking(true).is_err()
                        || self.epoll.add(s.as_raw_fd(), TOKEN_INPUT).is_err()
                    {
                        continue;
                    }
                    *client = Some(s);
                    self.input_ready = true;
                    self.input_closed = false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// The host end went away (socket client closed): input stops until the next client.
    fn hang_up(&mut self) {
        self.input_ready = false;
        match &mut self.host {
            Host::Socket { client, .. } => {
                if let Some(c) = client.take() {
                    self.epoll.remove(c.as_raw_fd());
                }
                self.pending.clear();
            }
            _ => self.input_closed = true,
        }
    }

    /// Writes what the host side has not taken yet (pty and socket).
    fn flush(&mut self) {
        let fd = match &self.host {
            Host::Pty { master, .. } => master.as_raw_fd(),
            Host::Socket {
                client: Some(c), ..
            } => c.as_raw_fd(),
            _ => return,
        };
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            // SAFETY: `a` is a valid readable buffer; the descriptor is non-blocking (a closed
            // socket gives EPIPE: Rust programs ignore SIGPIPE).
            let r = unsafe { libc::write(fd, a.as_ptr().cast(), a.len()) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => return,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        // Nobody is reading (socket closed; pty without a terminal): drop it.
                        bump(&self.counters.tx_dropped, self.pending.len() as u64);
                        self.pending.clear();
                        if matches!(self.host, Host::Socket { .. }) {
                            self.hang_up();
                        }
                        return;
                    }
                }
            }
            bump(&self.counters.tx_bytes, r as u64);
            self.pending.drain(..r as usize);
        }
    }

    /// Guest output: written at once, or queued (bounded) for a pty or socket reader.
    fn output(&mut self, data: &[u8]) {
        match &mut self.host {
            Host::Stdio { output, .. } | Host::File(output) => {
                match output.write_all(data).and_then(|_| output.flush()) {
                    Ok(()) => bump(&self.counters.tx_bytes, data.len() as u64),
                    Err(e) => {
                        bump(&self.counters.tx_dropped, data.len() as u64);
                        self.log
                            .warn(format_args!("{}: output lost: {e}", self.name));
                    }
                }
            }
            Host::Socket { client: None, .. } => {
                // No terminal attached: like a serial line with nothing on it.
                bump(&self.counters.tx_dropped, data.len() as u64);
            }
            Host::Pty { .. } | Host::Socket { .. } => {
                let room = MAX_PENDING_OUTPUT - self.pending.len();
                let take = data.len().min(room);
                self.pending.extend(&data[..take]);
                if take < data.len() {
                    bump(&self.counters.tx_dropped, (data.len() - take) as u64);
                    self.log.warn(format_args!(
                        "{}: the reader is too slow; {} bytes of output dropped",
                        self.name,
                        data.len() - take
                    ));
                }
                self.flush();
            }
        }
    }

    /// Reads input into held receive chains; returns whether any was filled.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        while self.input_ready && !self.input_closed {
            let Some(chain) = self.rx_chains.front() else {
                break;
            };
            let Some(fd) = self.input_fd() else {
                self.input_ready = false;
                break;
            };
            let room = (chain.writable_len() as usize).min(MAX_READ);
            let mut want = room;
            let is_stdio = matches!(self.host, Host::Stdio { .. });
            if is_stdio {
                // stdin stays blocking (its open file is shared with the shell): read only
                // what is buffered; readable with nothing buffered is the end of input.
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
                    self.input_ready = false;
                    break;
                }
                let mut avail: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int.
                if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } != 0 {
                    avail = 1;
                }
                // With nothing buffered a read returns 0 (end of input) at once.
                want = want.min((avail.max(1)) as usize);
            }
            self.buf.resize(want, 0);
            // SAFETY: `buf` is valid for `want` bytes.
            let r = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), want) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => {
                        self.input_ready = false;
                        break;
                    }
                    _ => {
                        // EIO on a pty whose terminal went away, a reset socket...
                        self.hang_up();
                        break;
                    }
                }
            }
            if r == 0 {
                self.hang_up();
                break;
            }
            let n = r as usize;
            if n < want && !is_stdio {
                self.input_ready = false;
            }
            let len = self.escape_filter(n);
            if len == 0 {
                continue;
            }
            let Some(chain) = self.rx_chains.pop_front() else {
                break;
            };
            let written = chain.write_at(mem, 0, &self.buf[..len]).unwrap_or(0);
            bump(&self.counters.rx_bytes, written as u64);
            self.filled.push((chain, written as u32));
            any = true;
        }
        any
    }

    /// Stdio with an escape: Ctrl-A `x` quits, Ctrl-A Ctrl-A is one Ctrl-A, Ctrl-A and any
    /// other byte pass through. Filters the first `n` bytes of `buf`; returns how many remain
    /// (at the start of `buf`).
    fn escape_filter(&mut self, n: usize) -> usize {
        let Host::Stdio {
            escape: Some(sink),
            saw_escape,
            ..
        } = &mut self.host
        else {
            return n;
        };
        let mut out = Vec::with_capacity(n + 1);
        for &b in &self.buf[..n] {
            if *saw_escape {
                *saw_escape = false;
                match b {
                    b'x' | b'X' => {
                        sink(VmEvent::UserQuit);
                        break;
                    }
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                *saw_escape = true;
            } else {
                out.push(b);
            }
        }
        let len = out.len();
        self.buf.clear();
        self.buf.extend_from_slice(&out);
        len
    }
}

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        if let Host::Socket { path, .. } = &self.host {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An owned duplicate of one of this process's descriptors.
fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor (checked) that nothing else owns.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Virtio for VirtioConsole {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Console
    }

    fn device_features(&self) -> u64 {
        RING_FEATURES
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn config(&self) -> &[u8] {
        &self.config_bytes
    }

    fn reset(&mut self) {
        // Held buffers belong to the old rings; input stays in the host's buffers.
        self.rx_chains.clear();
        self.filled.clear();
        self.input_ready = true;
    }
}

impl ChainHandler for VirtioConsole {
    fn handle(&mut self, queue: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        match queue {
            RX => {
                if chain.writable_len() == 0 {
                    self.log.warn(format_args!(
                        "{}: receive buffer {} has no writable bytes",
                        self.name,
                        chain.id()
                    ));
                    return BufferAction::Written(0);
                }
                self.rx_chains.push_back(chain.clone());
                BufferAction::Hold
            }
            TX => {
                let len = chain.readable_len().min(1 << 20) as usize;
                let mut data = std::mem::take(&mut self.buf);
                data.resize(len, 0);
                let n = chain.read_at(mem, 0, &mut data).unwrap_or(0);
                self.output(&data[..n]);
                self.buf = data;
                BufferAction::Written(0)
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
        if queue != RX {
            return None;
        }
        self.drain_events();
        self.fill_rx(mem).then_some(IoOp::Nop)
    }

    fn io_done(
        &mut self,
        _queue: u16,
        _mem: &GuestMemoryMmap,
        _result: std::io::Result<usize>,
        used: &mut Vec<(DescChain, u32)>,
    ) {
        used.append(&mut self.filled);
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
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
#[path = "console_test.rs"]
mod tests;
