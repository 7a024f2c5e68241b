//! The fuzz harness over vhost-user message handling (`fuzz/fuzz_targets/messages.rs`, and a
//! seeded replay in the unit tests): arbitrary bytes become a stream of frontend messages —
//! with a small memfd attached to memory-table messages and eventfds to vring-fd messages —
//! that one connection of the real backend (relay, `vhost` handler, [`VhostUserDevice`])
//! handles. Anything but a panic or a hang is fine: errors and closed connections are the
//! expected outcome for most inputs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alioth_queue::DescChain;
use alioth_virtio::{BufferAction, ChainHandler, DeviceId, EpollBackend, Virtio};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{VhostUserDevice, serve_connection};

/// A device that echoes readable bytes into writable ones.
pub struct Echo;

impl Virtio for Echo {
    fn name(&self) -> &str {
        "fuzz-echo"
    }
    fn device_id(&self) -> DeviceId {
        DeviceId::Console
    }
    fn device_features(&self) -> u64 {
        (1 << 32) | (1 << 29) | (1 << 34) | (1 << 28)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64, 64]
    }
    fn config(&self) -> &[u8] {
        &[1, 2, 3, 4, 5, 6, 7, 8]
    }
}

impl ChainHandler for Echo {
    fn handle(&mut self, _q: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        let mut buf = vec![0u8; chain.readable_len().min(4096) as usize];
        let n = chain.read_at(mem, 0, &mut buf).unwrap_or(0);
        BufferAction::Written(chain.write_at(mem, 0, &buf[..n]).unwrap_or(0) as u32)
    }
    fn complete(
        &mut self,
        _q: u16,
        _c: &DescChain,
        _m: &GuestMemoryMmap,
        _r: std::io::Result<usize>,
    ) -> u32 {
        0
    }
}

const SET_MEM_TABLE: u32 = 5;
const SET_LOG_FD: u32 = 7;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_BACKEND_REQ_FD: u32 = 21;

fn memfd() -> Option<File> {
    // SAFETY: a plain syscall with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vu-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(1 << 20).ok()?;
    Some(f)
}

/// Feeds `data` to one backend connection as messages: each is a 12-byte header from the
/// input (its size field capped at what is left) followed by that many payload bytes.
pub fn run_messages(data: &[u8]) {
    let Ok(dev) = VhostUserDevice::new(|| Ok(Echo), EpollBackend::default()) else {
        return;
    };
    let dev = Arc::new(Mutex::new(dev));
    let Ok((frontend, backend)) = UnixStream::pair() else {
        return;
    };
    let server = std::thread::spawn(move || serve_connection(&dev, backend));
    let _ = frontend.set_write_timeout(Some(Duration::from_secs(2)));
    let mut rest = data;
    while rest.len() >= 12 {
        let mut header = [0u8; 12];
        header.copy_from_slice(&rest[..12]);
        rest = &rest[12..];
        let req = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let size = (u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize)
            .min(rest.len());
        header[8..12].copy_from_slice(&(size as u32).to_le_bytes());
        let (payload, tail) = rest.split_at(size);
        rest = tail;
        let files: Vec<File> = match req {
            SET_MEM_TABLE => (0..payload.first().map_or(1, |n| (*n as usize).clamp(1, 8)))
                .filter_map(|_| memfd())
                .collect(),
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR | SET_LOG_FD | SET_BACKEND_REQ_FD => {
                eventfd().into_iter().collect()
            }
            _ => Vec::new(),
        };
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let bufs: [&[u8]; 2] = [&header, payload];
        if frontend.send_with_fds(&bufs, &raw).is_err() {
            break;
        }
        // Drain replies so the backend never blocks on a full socket.
        let mut sink = [0u8; 4096];
        // SAFETY: a non-blocking receive into our buffer.
        while unsafe {
            libc::recv(
                frontend.as_raw_fd(),
                sink.as_mut_ptr().cast(),
                sink.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }
    drop(frontend);
    let _ = server.join();
}

fn eventfd() -> Option<File> {
    // SAFETY: a plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    // SAFETY: a fresh descriptor we own.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

/// A well-formed session: the handshake, a memory table, one vring started, its base read
/// back, the config read. The seeds the replay test mutates.
pub fn seed_session() -> Vec<u8> {
    let mut out = Vec::new();
    let mut msg = |req: u32, flags: u32, payload: &[u8]| {
        out.extend_from_slice(&req.to_le_bytes());
        out.extend_from_slice(&(flags | 1).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
    };
    let u64s = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    msg(3, 0, &[]); // SET_OWNER
    msg(1, 0, &[]); // GET_FEATURES
    msg(2, 0, &u64s(&[(1 << 32) | (1 << 30)])); // SET_FEATURES
    msg(15, 0, &[]); // GET_PROTOCOL_FEATURES
    msg(16, 0, &u64s(&[0x2209])); // SET_PROTOCOL_FEATURES
    let mut table = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
    table.extend(u64s(&[0, 1 << 20, 0x7000_0000, 0]));
    msg(SET_MEM_TABLE, 8, &table);
    msg(8, 8, &[0, 0, 0, 0, 16, 0, 0, 0]); // SET_VRING_NUM 0 = 16
    let mut addr = vec![0u8; 8];
    addr.extend(u64s(&[0x7000_0000, 0x7000_1000, 0x7000_2000, 0]));
    msg(9, 8, &addr); // SET_VRING_ADDR
    msg(10, 8, &[0; 8]); // SET_VRING_BASE 0
    msg(SET_VRING_CALL, 8, &u64s(&[0]));
    msg(SET_VRING_KICK, 8, &u64s(&[0]));
    msg(18, 8, &[0, 0, 0, 0, 1, 0, 0, 0]); // SET_VRING_ENABLE
    msg(11, 0, &[0; 8]); // GET_VRING_BASE
    let mut cfg = vec![0u8; 12];
    cfg[4..8].copy_from_slice(&8u32.to_le_bytes());
    cfg.extend([0u8; 8]);
    msg(24, 0, &cfg); // GET_CONFIG
    out
}
