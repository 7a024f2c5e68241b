//! A relay between a frontend's socket and rust-vmm's vhost-user message handler that
//! normalizes what real frontends send but the `vhost` crate refuses.
//!
//! Linux's `virtio_uml` sends SET_MEM_TABLE with room for two regions (72 bytes) whatever
//! number it fills in; the `vhost` crate requires the payload to be exactly as long as the
//! regions counted, and answers "invalid message". The relay trims such a payload to the
//! counted regions. Everything else passes unchanged, file descriptors included, one message
//! at a time in each direction. Only the control path goes through it: rings and data never do.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes of a vhost-user message header: request, flags, size.
const HEADER: usize = 12;
/// The largest payload a vhost-user message may have.
const MAX_PAYLOAD: usize = 0x1000;
/// The most file descriptors one message carries.
const MAX_FDS: usize = 8;
/// VHOST_USER_SET_MEM_TABLE.
const SET_MEM_TABLE: u32 = 5;
/// Bytes of the memory table's own header (region count and padding), and of one region.
const MEM_TABLE_HEADER: usize = 8;
const MEM_REGION: usize = 32;

/// One message: header, payload and the descriptors that came with it.
struct Message {
    header: [u8; HEADER],
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn set_size(&mut self, size: usize) {
        self.header[8..12].copy_from_slice(&(size as u32).to_le_bytes());
        self.payload.truncate(size);
    }
}

/// Reads one message; `None` at a clean end of the stream.
fn read_message(s: &mut UnixStream) -> std::io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, which lives across the call and may take any bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw_fds) }?;
    // SAFETY: the first `nfds` descriptors were just received and are ours alone.
    let fds = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    s.read_exact(&mut header[n..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::other(format!(
            "message of {size} bytes (at most {MAX_PAYLOAD})"
        )));
    }
    let mut payload = vec![0u8; size];
    s.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

fn write_message(s: &UnixStream, m: &Message) -> std::io::Result<()> {
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let bufs: [&[u8]; 2] = [&m.header, &m.payload];
    let total = HEADER + m.payload.len();
    let sent = s.send_with_fds(&bufs, &raw)?;
    if sent < total {
        // The descriptors went with the first bytes; the rest is plain data.
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&m.header);
        rest.extend_from_slice(&m.payload);
        (&*s).write_all(&rest[sent..])?;
    }
    Ok(())
}

/// Trims a SET_MEM_TABLE payload longer than the regions it counts.
fn normalize(m: &mut Message) {
    if m.request() != SET_MEM_TABLE || m.payload.len() < MEM_TABLE_HEADER {
        return;
    }
    let count = u32::from_le_bytes([m.payload[0], m.payload[1], m.payload[2], m.payload[3]]);
    let Some(want) = (count as usize)
        .checked_mul(MEM_REGION)
        .and_then(|n| n.checked_add(MEM_TABLE_HEADER))
    else {
        return;
    };
    if want < m.payload.len() {
        m.set_size(want);
    }
}

/// Starts relaying `frontend`; returns the stream the vhost-user handler reads instead, and the
/// relay thread, which ends when either side closes.
pub fn spawn(frontend: UnixStream) -> std::io::Result<(UnixStream, JoinHandle<()>)> {
    let (handler_side, relay_side) = UnixStream::pair()?;
    let thread = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            if let Err(e) = relay(frontend, relay_side) {
                log::debug!("vhost-user relay ended: {e}");
            }
        })?;
    Ok((handler_side, thread))
}

/// Moves one message from `from` to `to` (normalized on the way to the handler); `false` at
/// the end of the stream.
fn forward(from: &mut UnixStream, to: &UnixStream, to_handler: bool) -> std::io::Result<bool> {
    let Some(mut m) = read_message(from)? else {
        return Ok(false);
    };
    if to_handler {
        normalize(&mut m);
    }
    write_message(to, &m)?;
    Ok(true)
}

fn relay(mut frontend: UnixStream, mut handler: UnixStream) -> std::io::Result<()> {
    let result = loop {
        let mut fds = [&frontend, &handler].map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        let step = |from: &mut UnixStream, to: &UnixStream, ready: bool, to_handler: bool| {
            if ready {
                forward(from, to, to_handler)
            } else {
                Ok(true)
            }
        };
        match step(&mut frontend, &handler, fds[0].revents != 0, true)
            .and_then(|go| Ok(go && step(&mut handler, &frontend, fds[1].revents != 0, false)?))
        {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Either side ending ends both: the handler sees the frontend go, and vice versa.
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = handler.shutdown(std::net::Shutdown::Both);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem_table(count: u32, slots: usize) -> Message {
        let mut payload = vec![0u8; MEM_TABLE_HEADER + slots * MEM_REGION];
        payload[..4].copy_from_slice(&count.to_le_bytes());
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&SET_MEM_TABLE.to_le_bytes());
        header[8..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload,
            fds: Vec::new(),
        }
    }

    #[test]
    fn a_memory_table_with_spare_slots_is_trimmed_to_its_regions() {
        let mut m = mem_table(1, 2);
        normalize(&mut m);
        assert_eq!(m.payload.len(), 40);
        assert_eq!(u32::from_le_bytes(m.header[8..].try_into().unwrap()), 40);
        // Exact, short (the handler refuses it) and absurd counts pass unchanged.
        for (count, slots) in [(2, 2), (3, 2), (u32::MAX, 1)] {
            let mut m = mem_table(count, slots);
            let before = m.payload.len();
            normalize(&mut m);
            assert_eq!(m.payload.len(), before);
        }
    }

    #[test]
    fn messages_and_descriptors_cross_the_relay_both_ways() {
        let (mut frontend, far) = UnixStream::pair().unwrap();
        let (mut handler, _t) = spawn(far).unwrap();
        let fd = File::open("/dev/null").unwrap();
        let mut m = mem_table(1, 2);
        m.fds.push(fd);
        write_message(&frontend, &m).unwrap();
        let got = read_message(&mut handler).unwrap().unwrap();
        assert_eq!(got.payload.len(), 40, "trimmed on the way");
        assert_eq!(got.fds.len(), 1, "the descriptor came along");
        let reply = Message {
            header: [5, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0],
            payload: vec![0; 8],
            fds: Vec::new(),
        };
        write_message(&handler, &reply).unwrap();
        let back = read_message(&mut frontend).unwrap().unwrap();
        assert_eq!(back.header, reply.header);
        // An oversized message ends the relay: the handler sees the end of the stream.
        let mut huge = [0u8; HEADER];
        huge[8..].copy_from_slice(&0x10_0000u32.to_le_bytes());
        frontend.write_all(&huge).unwrap();
        assert!(read_message(&mut handler).unwrap().is_none());
    }
}
