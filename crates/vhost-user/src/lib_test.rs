use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use alioth_devices::virtio::blk::{BlkConfig, VirtioBlk};
use alioth_devices::virtio::rng::VirtioRng;
use alioth_queue::QueueFormat;
use alioth_queue::testing::TestDriver;
use alioth_virtio::EpollBackend;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::GuestMemoryBackend;
use vm_memory::mmap::MmapRegionBuilder;

use super::*;

const MEM_SIZE: u64 = 16 << 20;
const RING: u64 = 0x10_0000;

/// The frontend's guest memory: a memfd mapped here, as a VMM would have it.
struct FrontendMemory {
    file: File,
    guest: GuestMemoryMmap,
}

use vm_memory::GuestMemoryMmap;

fn frontend_memory() -> FrontendMemory {
    // SAFETY: a plain syscall with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vu-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).unwrap();
    let region = MmapRegionBuilder::new(MEM_SIZE as usize)
        .with_file_offset(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    let region = vm_memory::GuestRegionMmap::new(region, vm_memory::GuestAddress(0)).unwrap();
    let guest = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    FrontendMemory { file, guest }
}

impl FrontendMemory {
    fn host(&self) -> u64 {
        self.guest.iter().next().unwrap().as_ptr() as u64
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: self.host(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), Error>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start<D: ChainHandler, B: Backend<D> + Clone + Send>(dev: VhostUserDevice<D, B>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.sock");
        let listener = bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || serve(listener, dev, || s.load(Ordering::SeqCst)));
        Server {
            path,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn connect(&self) -> Frontend {
        let mut f = Frontend::connect(&self.path, 64).unwrap();
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        f.set_features(
            features & (VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
        )
        .unwrap();
        let pf = f.get_protocol_features().unwrap();
        assert!(
            pf.contains(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG)
        );
        f.set_protocol_features(pf).unwrap();
        f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        f
    }

    /// Ends serving after the current connection (whose frontend the caller drops first).
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // One more connection lets the accept loop see the flag.
        drop(Frontend::connect(&self.path, 1));
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

fn blk_device(image: &std::path::Path) -> VhostUserDevice<VirtioBlk, EpollBackend> {
    let cfg = BlkConfig {
        path: image.to_path_buf(),
        read_only: false,
        num_queues: 1,
        queue_size: 64,
        direct: false,
        lock: true,
        rate_limit: Default::default(),
    };
    VhostUserDevice::new(
        move || VirtioBlk::open("virtio-blk0", &cfg).map_err(std::io::Error::other),
        EpollBackend::default(),
    )
    .unwrap()
}

fn start_ring(
    f: &mut Frontend,
    m: &FrontendMemory,
    d: &TestDriver,
    base: u16,
) -> (EventFd, EventFd) {
    f.set_mem_table(&[m.region()]).unwrap();
    let c = d.config();
    f.set_vring_num(0, c.size).unwrap();
    f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 64,
            queue_size: c.size,
            flags: 0,
            desc_table_addr: m.host() + c.desc,
            used_ring_addr: m.host() + c.device,
            avail_ring_addr: m.host() + c.driver,
            log_addr: None,
        },
    )
    .unwrap();
    f.set_vring_base(0, base).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    f.set_vring_call(0, &call).unwrap();
    f.set_vring_kick(0, &kick).unwrap();
    f.set_vring_enable(0, true).unwrap();
    (call, kick)
}

fn wait(fd: &EventFd) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(n, 1, "no call within 5 s");
    fd.read().unwrap();
}

fn blk_request(d: &mut TestDriver, kind: u32, sector: u64, data: &[u8], read_len: u32) -> u16 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    let readable: Vec<&[u8]> = if data.is_empty() {
        vec![&h]
    } else {
        vec![&h, data]
    };
    let writable: Vec<u32> = if read_len > 0 {
        vec![read_len, 1]
    } else {
        vec![1]
    };
    d.add(&readable, &writable).unwrap()
}

#[test]
fn a_frontend_writes_and_reads_a_disk_and_reconnects_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let server = Server::start(blk_device(&image));
    let m = frontend_memory();
    let mut d = TestDriver::new(&m.guest, QueueFormat::Split, 64, RING, 0);

    let mut f = server.connect();
    assert_eq!(f.get_queue_num().unwrap(), 1);
    // The device's configuration: capacity in 512-byte sectors first.
    let (_, cfg) = f
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 2048);
    let (call, kick) = start_ring(&mut f, &m, &d, 0);
    let data = vec![0x5a; 512];
    let w = blk_request(&mut d, 1, 3, &data, 0);
    kick.write(1).unwrap();
    wait(&call);
    assert_eq!(d.used(), Some((w, 1)));
    assert_eq!(d.written(w), vec![0], "write: OK");
    assert_eq!(f.get_vring_base(0).unwrap(), 1, "one chain consumed");
    drop(f);

    // A new frontend connection continues the same ring from its base.
    let mut f = server.connect();
    let (call, kick) = start_ring(&mut f, &m, &d, 1);
    let r = blk_request(&mut d, 0, 3, &[], 512);
    kick.write(1).unwrap();
    wait(&call);
    assert_eq!(d.used(), Some((r, 513)));
    let back = d.written(r);
    assert_eq!((&back[..512], back[512]), (&data[..], 0));
    drop(f);
    server.finish();
    assert_eq!(&std::fs::read(&image).unwrap()[3 * 512..4 * 512], &data[..]);
}

/// The backend refused one message (an error reply, or the connection closed).
fn refused<T: std::fmt::Debug>(what: &str, r: vhost::Result<T>) {
    assert!(r.is_err(), "{what}: accepted: {r:?}");
}

#[test]
fn hostile_frontends_get_errors_and_the_server_keeps_serving() {
    let server = Server::start(
        VhostUserDevice::new(
            || Ok(VirtioRng::new("virtio-rng0")),
            EpollBackend::default(),
        )
        .unwrap(),
    );
    let m = frontend_memory();
    let region = m.region();

    // Each hostile message on its own connection, dropped before the next connects (the
    // server serves one frontend at a time).
    let attempt = |what: &str, op: &dyn Fn(&mut Frontend) -> vhost::Result<()>| {
        let mut f = server.connect();
        refused(what, op(&mut f));
    };
    let mut overlapping = region;
    overlapping.guest_phys_addr = MEM_SIZE / 2;
    overlapping.userspace_addr += MEM_SIZE / 2;
    attempt("overlapping regions", &|f| {
        f.set_mem_table(&[region, overlapping]).map(drop)
    });
    let mut past_eof = region;
    past_eof.mmap_offset = MEM_SIZE;
    attempt("region past the end of its file", &|f| {
        f.set_mem_table(&[past_eof]).map(drop)
    });
    let mut wraps = region;
    wraps.guest_phys_addr = u64::MAX - 4095;
    attempt("region that wraps", &|f| {
        f.set_mem_table(&[wraps]).map(drop)
    });
    let outside = VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: m.host() + MEM_SIZE + 0x1000,
        used_ring_addr: m.host(),
        avail_ring_addr: m.host(),
        log_addr: None,
    };
    attempt("vring outside guest memory", &|f| {
        f.set_mem_table(&[region])?;
        f.set_vring_addr(0, &outside)
    });
    attempt("a queue the device does not have", &|f| {
        f.set_vring_num(5, 64)
    });
    attempt("a queue size above the maximum", &|f| {
        f.set_vring_num(0, 4096)
    });
    attempt("config read past the end", &|f| {
        f.get_config(0, 4096, VhostUserConfigFlags::WRITABLE, &[0; 4096])
            .map(drop)
    });
    attempt("config write", &|f| {
        f.set_config(0, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
    });
    attempt("features that were not offered", &|f| {
        f.set_features(1 << 63 | VIRTIO_F_VERSION_1)
    });
    attempt("no VIRTIO_F_VERSION_1", &|f| f.set_features(0));

    // Still serving: a well-behaved frontend gets random bytes.
    let mut f = server.connect();
    let mut d = TestDriver::new(&m.guest, QueueFormat::Split, 64, RING, 0);
    let (call, kick) = start_ring(&mut f, &m, &d, 0);
    let id = d.add(&[], &[32]).unwrap();
    kick.write(1).unwrap();
    wait(&call);
    assert_eq!(d.used(), Some((id, 32)));
    drop(f);
    server.finish();
}

#[test]
fn a_socket_in_use_or_a_non_socket_path_is_refused_and_a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let e = bind(&file).unwrap_err().to_string();
    assert!(e.contains("not a socket"), "{e}");

    let sock = dir.path().join("s.sock");
    let live = bind(&sock).unwrap();
    let e = bind(&sock).unwrap_err().to_string();
    assert!(e.contains("in use"), "{e}");
    drop(live);
    // The listener is gone but its file stays: stale, so it is replaced.
    assert!(sock.exists());
    bind(&sock).unwrap();
}

#[test]
fn mutated_message_streams_never_panic_or_hang() {
    let seed = fuzzing::seed_session();
    // The clean session itself.
    fuzzing::run_messages(&seed);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..150 {
        let mut input = seed.clone();
        for _ in 0..1 + next() % 8 {
            let at = (next() as usize) % input.len();
            match next() % 4 {
                0 => input[at] = next() as u8,
                1 => input[at] ^= 1 << (next() % 8),
                2 => input.truncate(at.max(12)),
                _ => {
                    let v = (next() as u32).to_le_bytes();
                    let end = (at + 4).min(input.len());
                    input[at..end].copy_from_slice(&v[..end - at]);
                }
            }
        }
        fuzzing::run_messages(&input);
    }
}
