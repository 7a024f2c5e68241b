//! Host tap devices through `/dev/net/tun`: multi-queue, with a 12-byte virtio-net header on
//! every packet, offloads set from what the guest accepted.
//!
//! Each queue is its own open of `/dev/net/tun` attached to the same interface (IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE). A tap is either attached by name (it may exist,
//! for example made with `ip tuntap add NAME mode tap multi_queue vnet_hdr`) or created from the
//! template `alioth%d`, in which case it disappears when the VM ends.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME_LEN: usize = 15;
/// The most queues a tap takes (the kernel's MAX_TAP_QUEUES).
pub const MAX_QUEUES: usize = 256;
/// Name template for taps Alioth creates.
pub const AUTO_NAME: &str = "alioth%d";
/// The virtio-net header size the tap is told (VIRTIO_NET_F_MRG_RXBUF/VERSION_1 layout).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// Offload flags of TUNSETOFFLOAD: what the tap may hand us (what the guest accepts).
pub mod offload {
    /// Packets may carry a partial checksum.
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segmentation offload.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segmentation offload.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name {name:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong {
        /// The name.
        name: String,
    },
    /// The queue count is out of range.
    #[error("tap {name}: {queues} queues requested; a tap takes 1 to {MAX_QUEUES}")]
    Queues {
        /// The tap.
        name: String,
        /// Requested.
        queues: usize,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {source}{hint}")]
    Open {
        /// What the user can do.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TUNSETIFF refused.
    #[error("tap {name}: {source}{hint}")]
    Attach {
        /// The tap.
        name: String,
        /// What the user can do.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another ioctl failed.
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        /// The tap.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut r = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        let n = name.len().min(MAX_NAME_LEN);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// A multi-queue tap: one descriptor per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    offloads_supported: bool,
    /// False for descriptors handed over by [`Tap::from_fds`]: no tap ioctls then.
    is_tap: bool,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> std::io::Result<()> {
    // SAFETY: `req` is one of the TUN ioctls above and `arg` points at the type it takes (an
    // ifreq or an int), valid for the call.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: `req` is a TUN ioctl that takes its argument by value (TUNSETOFFLOAD).
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens `queues` queues of the tap `name` (created if it does not exist; a name with `%d`
    /// is a template the kernel completes). `nonblocking` opens the descriptors O_NONBLOCK
    /// (for readiness-driven loops).
    pub fn open(name: &str, queues: usize, nonblocking: bool) -> Result<Tap, TapError> {
        if name.len() > MAX_NAME_LEN {
            return Err(TapError::NameTooLong { name: name.into() });
        }
        if queues == 0 || queues > MAX_QUEUES {
            return Err(TapError::Queues {
                name: name.into(),
                queues,
            });
        }
        let mut files = Vec::with_capacity(queues);
        let mut actual = name.to_string();
        for _ in 0..queues {
            let mut opts = OpenOptions::new();
            opts.read(true).write(true);
            if nonblocking {
                opts.custom_flags(libc::O_NONBLOCK);
            }
            let f = opts.open("/dev/net/tun").map_err(|source| TapError::Open {
                hint: match source.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EPERM) => {
                        " (opening it needs read-write access to /dev/net/tun)"
                    }
                    Some(libc::ENOENT) | Some(libc::ENODEV) => {
                        " (the tun module is not loaded: modprobe tun)"
                    }
                    _ => "",
                },
                source,
            })?;
            let mut req = IfReq::new(
                &actual,
                IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
            );
            ioctl_ptr(f.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::Attach {
                name: actual.clone(),
                hint: match source.raw_os_error() {
                    Some(libc::EPERM) => {
                        " (creating or attaching a tap needs CAP_NET_ADMIN, or a tap made for this user with `ip tuntap add ... user`)"
                    }
                    Some(libc::EINVAL) => {
                        " (the tap exists with different flags: Alioth needs `mode tap multi_queue vnet_hdr`, no packet information)"
                    }
                    Some(libc::EBUSY) => " (the tap is in use, or is a tun device)",
                    Some(libc::E2BIG) => " (the tap takes no more queues)",
                    _ => "",
                },
                source,
            })?;
            actual = req.name();
            let mut hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
            ioctl_ptr(f.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr).map_err(|source| {
                TapError::Ioctl {
                    name: actual.clone(),
                    what: "TUNSETVNETHDRSZ",
                    source,
                }
            })?;
            files.push(f);
        }
        // Can the guest be handed partial checksums and TSO segments? Probe, then turn off
        // until the guest accepts them.
        let all = offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN;
        let fd = files[0].as_raw_fd();
        let offloads_supported = ioctl_val(fd, TUNSETOFFLOAD, all.into()).is_ok();
        let tap = Tap {
            name: actual,
            queues: files,
            offloads_supported,
            is_tap: true,
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Packet descriptors that stand in for a tap's queues (one packet per read and write, each
    /// with a 12-byte virtio-net header), for example a SOCK_SEQPACKET socket pair in tests or
    /// queues a management stack opened: no offloads, no queue steering.
    pub fn from_fds(name: &str, fds: Vec<std::os::fd::OwnedFd>) -> Tap {
        Tap {
            name: name.to_string(),
            queues: fds.into_iter().map(File::from).collect(),
            offloads_supported: false,
            is_tap: false,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor of queue `i`.
    pub fn fd(&self, i: usize) -> Option<RawFd> {
        self.queues.get(i).map(|f| f.as_raw_fd())
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether the tap can hand over partial checksums and TSO segments.
    pub fn offloads_supported(&self) -> bool {
        self.offloads_supported
    }

    /// Sets what the tap may hand us ([`offload`] flags).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        if !self.is_tap {
            return Ok(());
        }
        for f in &self.queues {
            ioctl_val(f.as_raw_fd(), TUNSETOFFLOAD, flags.into()).map_err(|source| {
                TapError::Ioctl {
                    name: self.name.clone(),
                    what: "TUNSETOFFLOAD",
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Attaches queue `i` to the interface (the kernel steers packets to it) or detaches it.
    pub fn set_queue_attached(&self, i: usize, attached: bool) -> Result<(), TapError> {
        let Some(f) = self.queues.get(i).filter(|_| self.is_tap) else {
            return Ok(());
        };
        let flags = if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flags);
        match ioctl_ptr(f.as_raw_fd(), TUNSETQUEUE, &mut req) {
            Ok(()) => Ok(()),
            // Already in the state asked for.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(source) => Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETQUEUE",
                source,
            }),
        }
    }
}

#[cfg(test)]
#[path = "tap_test.rs"]
mod tests;
