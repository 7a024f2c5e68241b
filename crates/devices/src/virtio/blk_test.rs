use std::sync::Arc;
use std::time::{Duration, Instant};

use alioth_io_uring::IoUringBackend;
use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::testing::TestDriver;
use alioth_queue::{
    QueueFormat, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtQueue,
};
use alioth_test_util::wait_eventfd;
use alioth_virtio::{EpollBackend, EventFdIrq, QueueSetup, WakeEvent, Worker};
use vmm_sys_util::eventfd::EventFd;

use super::*;

#[derive(Debug, Clone, Copy)]
enum Be {
    Epoll,
    IoUring(u32),
}

const BACKENDS: [Be; 2] = [Be::Epoll, Be::IoUring(64)];
const FORMATS: [QueueFormat; 2] = [QueueFormat::Split, QueueFormat::Packed];

fn image(sectors: u64, fill: u8) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![fill; (sectors * SECTOR_SIZE) as usize]).unwrap();
    f
}

fn cfg(path: &Path) -> BlkConfig {
    BlkConfig {
        path: path.to_path_buf(),
        read_only: false,
        num_queues: 1,
        queue_size: 64,
        direct: false,
        lock: true,
        rate_limit: Default::default(),
    }
}

fn hdr(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn seg(sector: u64, n: u32, flags: u32) -> Vec<u8> {
    let mut s = vec![0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

struct Rig<'a> {
    worker: Option<Worker>,
    irq: Arc<EventFdIrq>,
    kicks: Vec<Arc<EventFd>>,
    drivers: Vec<TestDriver<'a>>,
}

impl<'a> Rig<'a> {
    fn new(ram: &'a RamBus, dev: VirtioBlk, be: Be, format: QueueFormat, feats: u64) -> Rig<'a> {
        let nq = dev.queue_max_sizes().len();
        let size = dev.queue_max_sizes()[0];
        let features = dev.device_features();
        let mem = ram.memory().clone();
        let worker = match be {
            Be::Epoll => Worker::spawn(dev, EpollBackend::default(), mem),
            Be::IoUring(n) => Worker::spawn(dev, IoUringBackend::new(n), mem),
        }
        .unwrap();
        let irq = Arc::new(EventFdIrq::new(nq).unwrap());
        let mut drivers = Vec::new();
        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for q in 0..nq {
            let d = TestDriver::new(
                ram.memory(),
                format,
                size,
                0x10_0000 + q as u64 * 0x20_0000,
                feats,
            );
            let k = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            queues.push(Some(QueueSetup {
                config: d.config(),
                ioeventfd: k.clone(),
                base: 0,
            }));
            kicks.push(k);
            drivers.push(d);
        }
        let negotiated = (drivers[0].features() | (1 << VIRTIO_F_VERSION_1)) & features;
        worker.wake(WakeEvent::Start {
            features: negotiated,
            queues,
            irq: irq.clone(),
        });
        Rig {
            worker: Some(worker),
            irq,
            kicks,
            drivers,
        }
    }

    fn worker(&self) -> &Worker {
        self.worker.as_ref().unwrap()
    }

    fn shutdown(&mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown();
        }
    }

    /// Submits one request on queue `q` and waits for it: (status, data read).
    fn request(&mut self, q: usize, readable: &[&[u8]], data_len: u32) -> (u8, Vec<u8>) {
        let writable: Vec<u32> = if data_len > 0 {
            vec![data_len, 1]
        } else {
            vec![1]
        };
        let id = self.drivers[q].add(readable, &writable).unwrap();
        self.kicks[q].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((got, _)) = self.drivers[q].used() {
                assert_eq!(got, id);
                break;
            }
            assert!(Instant::now() < deadline, "request did not complete");
            wait_eventfd(&self.irq.queues[q], 100);
        }
        self.result(q, id)
    }

    fn result(&self, q: usize, id: u16) -> (u8, Vec<u8>) {
        let bufs = self.drivers[q].writable(id);
        let (sa, sl) = *bufs.last().unwrap();
        let status = self.drivers[q].read_mem(sa + u64::from(sl) - 1, 1)[0];
        let data = if bufs.len() > 1 {
            self.drivers[q].read_mem(bufs[0].0, bufs[0].1 as usize)
        } else {
            Vec::new()
        };
        (status, data)
    }
}

fn combos() -> Vec<(Be, QueueFormat, u64)> {
    let mut v = Vec::new();
    for be in BACKENDS {
        for f in FORMATS {
            for feats in [0, (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)] {
                v.push((be, f, feats));
            }
        }
    }
    v
}

#[test]
fn written_data_is_in_the_file_and_reads_back() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for (be, format, feats) in combos() {
        let img = image(64, 0);
        let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
        let mut rig = Rig::new(&ram, dev, be, format, feats);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let (st, _) = rig.request(0, &[&hdr(req::OUT, 8), &pattern], 0);
        assert_eq!(st, status::OK, "{be:?} {format:?}");
        let (st, data) = rig.request(0, &[&hdr(req::IN, 8)], 4096);
        assert_eq!(st, status::OK);
        assert_eq!(data, pattern, "{be:?} {format:?} {feats:#x}");
        let (st, _) = rig.request(0, &[&hdr(req::FLUSH, 0)], 0);
        assert_eq!(st, status::OK);
        rig.shutdown();
        let file = std::fs::read(img.path()).unwrap();
        assert_eq!(&file[4096..8192], &pattern[..], "host side sees the write");
        assert!(file[..4096].iter().all(|b| *b == 0));
    }
}

#[test]
fn flush_is_fdatasync_on_the_image() {
    let img = image(8, 0);
    let mut dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mem = ram.memory();
    let mut d = TestDriver::new(mem, QueueFormat::Split, 8, 0x10_0000, 0);
    let mut q = alioth_queue::new_queue(8, d.config(), d.features(), mem).unwrap();
    d.add(&[&hdr(req::FLUSH, 0)], &[1]).unwrap();
    let chain = q.pop(mem).unwrap().unwrap();
    match dev.handle(0, &chain, mem) {
        BufferAction::Io(IoOp::Fsync { fd, datasync }) => {
            assert_eq!(fd, dev.file.as_raw_fd());
            assert!(datasync);
        }
        other => panic!("flush must sync the image, got {other:?}"),
    }
}

#[test]
fn read_only_disk_rejects_writes_and_advertises_ro() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        let img = image(16, 0x5a);
        let mut c = cfg(img.path());
        c.read_only = true;
        let dev = VirtioBlk::open("virtio-blk0", &c).unwrap();
        assert_ne!(dev.device_features() & (1 << F_RO), 0);
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        let (st, _) = rig.request(0, &[&hdr(req::OUT, 0), &[0u8; 512]], 0);
        assert_eq!(st, status::IOERR);
        let (st, _) = rig.request(0, &[&hdr(req::DISCARD, 0), &seg(0, 1, 0)], 0);
        assert_eq!(st, status::IOERR);
        let (st, data) = rig.request(0, &[&hdr(req::IN, 0)], 512);
        assert_eq!((st, data), (status::OK, vec![0x5a; 512]));
        rig.shutdown();
        assert!(
            std::fs::read(img.path())
                .unwrap()
                .iter()
                .all(|b| *b == 0x5a)
        );
    }
}

#[test]
fn discard_and_write_zeroes_zero_only_their_range() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        for (kind, flags) in [
            (req::DISCARD, 0),
            (req::WRITE_ZEROES, 0),
            (req::WRITE_ZEROES, 1),
        ] {
            let img = image(32, 0xaa);
            let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
            let mut rig = Rig::new(&ram, dev, be, QueueFormat::Packed, 0);
            let (st, _) = rig.request(0, &[&hdr(kind, 0), &seg(8, 8, flags)], 0);
            assert_eq!(st, status::OK, "{be:?} type {kind}");
            let (_, data) = rig.request(0, &[&hdr(req::IN, 8)], 4096);
            assert_eq!(data, vec![0u8; 4096]);
            rig.shutdown();
            let file = std::fs::read(img.path()).unwrap();
            assert_eq!(file.len(), 32 * 512, "size kept");
            assert!(file[..4096].iter().all(|b| *b == 0xaa));
            assert!(file[4096..8192].iter().all(|b| *b == 0));
            assert!(file[8192..].iter().all(|b| *b == 0xaa));
        }
    }
}

#[test]
fn out_of_range_unknown_and_get_id_requests() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        let img = image(8, 0);
        let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
        assert_eq!(dev.capacity(), 8);
        assert_eq!(&dev.config()[0..8], &8u64.to_le_bytes());
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        assert_eq!(rig.request(0, &[&hdr(req::IN, 7)], 1024).0, status::IOERR);
        assert_eq!(
            rig.request(0, &[&hdr(req::IN, u64::MAX)], 512).0,
            status::IOERR
        );
        assert_eq!(
            rig.request(0, &[&hdr(req::IN, 0)], 100).0,
            status::IOERR,
            "not sectors"
        );
        assert_eq!(
            rig.request(0, &[&hdr(req::OUT, 8), &[1u8; 512]], 0).0,
            status::IOERR
        );
        assert_eq!(rig.request(0, &[&hdr(99, 0)], 0).0, status::UNSUPP);
        assert_eq!(
            rig.request(0, &[&[1u8, 2]], 0).0,
            status::IOERR,
            "truncated header"
        );
        let (st, id) = rig.request(0, &[&hdr(req::GET_ID, 0)], 20);
        assert_eq!(st, status::OK);
        assert!(id.starts_with(b"alioth-"), "{id:?}");
    }
}

#[test]
fn every_queue_of_a_multi_queue_disk_completes() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        let img = image(64, 0);
        let mut c = cfg(img.path());
        c.num_queues = 4;
        let dev = VirtioBlk::open("virtio-blk0", &c).unwrap();
        assert_eq!(u16::from_le_bytes([dev.config()[34], dev.config()[35]]), 4);
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 1 << VIRTIO_F_EVENT_IDX);
        for q in 0..4 {
            let data = vec![q as u8 + 1; 512];
            assert_eq!(rig.request(q, &[&hdr(req::OUT, q as u64), &data], 0).0, 0);
        }
        for q in 0..4 {
            let (st, data) = rig.request((q + 1) % 4, &[&hdr(req::IN, q as u64)], 512);
            assert_eq!((st, data), (status::OK, vec![q as u8 + 1; 512]), "{be:?}");
        }
    }
}

#[test]
fn more_requests_than_ring_slots_all_complete() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for format in FORMATS {
        let img = image(256, 0);
        let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
        let mut rig = Rig::new(&ram, dev, Be::IoUring(8), format, 0);
        let mut ids = Vec::new();
        // 20 three-descriptor requests fill the queue; the ring has 8 slots minus its polls.
        for i in 0..20u64 {
            let data = vec![i as u8; 512];
            ids.push((
                i,
                rig.drivers[0]
                    .add(&[&hdr(req::OUT, i), &data], &[1])
                    .unwrap(),
            ));
        }
        rig.kicks[0].write(1).unwrap();
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while done < ids.len() {
            assert!(
                Instant::now() < deadline,
                "{done} of {} completed",
                ids.len()
            );
            wait_eventfd(&rig.irq.queues[0], 100);
            while let Some((id, _)) = rig.drivers[0].used() {
                assert_eq!(rig.result(0, id).0, status::OK);
                done += 1;
            }
        }
        rig.shutdown();
        let file = std::fs::read(img.path()).unwrap();
        for (i, _) in ids {
            let s = (i * 512) as usize;
            assert!(file[s..s + 512].iter().all(|b| *b == i as u8), "sector {i}");
        }
    }
}

#[test]
fn reset_with_requests_in_flight_completes_every_one_and_keeps_every_write() {
    for be in BACKENDS {
        // Whether requests were still outstanding when the reset came is a race; io_uring
        // must show it at least once in a few attempts (epoll completes each chain before it
        // looks at its notifier, so there the reset waits for the queue).
        let in_flight = (0..10).filter(|_| reset_during_io(be)).count();
        if matches!(be, Be::IoUring(_)) {
            assert!(
                in_flight > 0,
                "io_uring: never anything in flight at the reset"
            );
        }
    }
}

/// One round: 40 writes and 40 flushes, a reset at the first interrupt; checks that every
/// request completed once with OK and every write is in the file. Returns whether some were
/// still outstanding when the reset was asked for.
fn reset_during_io(be: Be) -> bool {
    const N: u64 = 40;
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    {
        let img = image(256, 0);
        let config = BlkConfig {
            queue_size: 256,
            ..cfg(img.path())
        };
        let dev = VirtioBlk::open("virtio-blk0", &config).unwrap();
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        let mut sent = Vec::new();
        // Writes, each followed by a flush: enough work that the reset below arrives while
        // most of it is still outstanding.
        for i in 0..N {
            let data = vec![(i as u8) | 0x80; 512];
            let w = rig.drivers[0]
                .add(&[&hdr(req::OUT, i), &data], &[1])
                .unwrap();
            let f = rig.drivers[0].add(&[&hdr(req::FLUSH, 0)], &[1]).unwrap();
            sent.push((w, Some(i)));
            sent.push((f, None));
        }
        rig.kicks[0].write(1).unwrap();
        // Reset as soon as the first completions are signalled.
        assert!(
            wait_eventfd(&rig.irq.queues[0], 5000),
            "{be:?}: first completion"
        );
        let mut used = Vec::new();
        while let Some(u) = rig.drivers[0].used() {
            used.push(u);
        }
        let before = used.len();
        // The ring position where the worker stopped: how many chains it took (a backend out
        // of slots leaves the rest in the ring, which a reset discards unanswered).
        let stopped = rig.worker().reset();
        let taken = stopped.first().map_or(0, |q| q.1 as usize);
        rig.shutdown();
        while let Some(u) = rig.drivers[0].used() {
            used.push(u);
        }
        eprintln!(
            "{be:?}: {before} of {} requests were complete when the reset came",
            sent.len()
        );
        // Everything the device took is completed, once, with OK, and every acknowledged
        // write is in the file; what it never took left no trace.
        assert_eq!(used.len(), taken, "{be:?}: every request taken completes");
        let mut ids: Vec<u16> = used.iter().map(|u| u.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), used.len(), "{be:?}: no request completes twice");
        let file = std::fs::read(img.path()).unwrap();
        for (id, sector) in &sent {
            let done = ids.binary_search(id).is_ok();
            if done {
                assert_eq!(rig.result(0, *id).0, status::OK, "{be:?}: request {id}");
            }
            if let Some(sector) = sector {
                let s = (*sector * 512) as usize;
                let want = if done { (*sector as u8) | 0x80 } else { 0 };
                assert!(
                    file[s..s + 512].iter().all(|b| *b == want),
                    "{be:?}: sector {sector}: {} write",
                    if done {
                        "an acknowledged write is missing"
                    } else {
                        "a write the device never took is there"
                    }
                );
            }
        }
        before < taken
    }
}

#[test]
fn a_request_without_a_status_byte_sets_needs_reset() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        let img = image(8, 0);
        let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        rig.drivers[0].add(&[&hdr(req::IN, 0)], &[]).unwrap();
        rig.kicks[0].write(1).unwrap();
        assert!(
            wait_eventfd(&rig.irq.config, 5000),
            "{be:?}: config interrupt"
        );
        assert!(rig.worker().needs_reset());
    }
}

#[test]
fn bad_disk_settings_are_errors_naming_the_file() {
    let img = image(8, 0);
    let mut c = cfg(img.path());
    c.num_queues = 0;
    assert!(VirtioBlk::open("b", &c).is_err());
    let mut c = cfg(img.path());
    c.queue_size = 100;
    assert!(VirtioBlk::open("b", &c).is_err());
    let c = cfg(Path::new("/nonexistent/disk.img"));
    let e = VirtioBlk::open("b", &c).err().unwrap();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
}

#[test]
fn type_all_ones_is_unsupported_and_empty_discards_succeed() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        let img = image(8, 0);
        let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        // 0xFFFFFFFF is a request type like any unknown one, not a truncated header.
        assert_eq!(rig.request(0, &[&hdr(u32::MAX, 0)], 0).0, status::UNSUPP);
        for kind in [req::DISCARD, req::WRITE_ZEROES] {
            let st = rig.request(0, &[&hdr(kind, 0), &seg(3, 0, 0)], 0).0;
            assert_eq!(st, status::OK, "{be:?}: zero-sector type {kind}");
        }
    }
}

#[test]
fn seg_max_never_exceeds_what_one_readv_takes() {
    let img = image(8, 0);
    let mut c = cfg(img.path());
    c.queue_size = 32768;
    let dev = VirtioBlk::open("virtio-blk0", &c).unwrap();
    let seg_max = u32::from_le_bytes(dev.config()[12..16].try_into().unwrap());
    assert_eq!(seg_max, 1024);
}

#[test]
fn a_header_rewritten_while_the_io_is_in_flight_does_not_change_the_completion() {
    use alioth_queue::new_queue;
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mem = ram.memory();
    let img = image(8, 0x5a);
    let mut dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
    let mut d = TestDriver::new(mem, QueueFormat::Split, 16, 0x10_0000, 0);
    let mut q = new_queue(16, d.config(), d.features(), mem).unwrap();
    let h = hdr(req::IN, 1);
    d.add(&[&h], &[512, 1]).unwrap();
    let chain = q.pop(mem).unwrap().unwrap();
    let BufferAction::Io(op) = dev.handle(0, &chain, mem) else {
        panic!("a read needs I/O");
    };
    assert_eq!(op.transfer_len(), 512);
    // The guest turns its read into a write of nothing while the read is in flight.
    let at = chain.readable[0].gpa();
    d.write_mem(at, &hdr(req::OUT, 7));
    let written = dev.complete(0, &chain, mem, Ok(512));
    assert_eq!(written, 513, "the read's data and its status byte");
    assert_eq!(d.read_mem(chain.writable[1].gpa(), 1)[0], status::OK);
    // A completion for a chain that is not in flight writes nothing.
    assert_eq!(dev.complete(0, &chain, mem, Ok(512)), 0);
}

#[test]
fn write_zeroes_works_on_a_filesystem_without_zero_range() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE (EOPNOTSUPP); the device falls back.
    let Ok(f) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        eprintln!("SKIPPED: no /dev/shm here");
        return;
    };
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        std::fs::write(f.path(), vec![0xa5u8; 16 * SECTOR_SIZE as usize]).unwrap();
        let dev = VirtioBlk::open("virtio-blk0", &cfg(f.path())).unwrap();
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        // No unmap flag: the device must zero the range (not punch) -- ZERO_RANGE first.
        let st = rig
            .request(0, &[&hdr(req::WRITE_ZEROES, 0), &seg(2, 4, 0)], 0)
            .0;
        assert_eq!(st, status::OK, "{be:?}");
        rig.shutdown();
        let data = std::fs::read(f.path()).unwrap();
        let s = SECTOR_SIZE as usize;
        assert!(
            data[2 * s..6 * s].iter().all(|b| *b == 0),
            "{be:?}: range zeroed"
        );
        assert!(
            data[..2 * s]
                .iter()
                .chain(&data[6 * s..])
                .all(|b| *b == 0xa5)
        );
    }
}

#[test]
fn a_writable_image_is_locked_against_other_openers_and_readers_share() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let c = |read_only: bool, lock: bool| BlkConfig {
        rate_limit: Default::default(),
        read_only,
        lock,
        ..cfg(&path)
    };
    let rw = VirtioBlk::open("virtio-blk0", &c(false, true)).unwrap();
    for ro in [false, true] {
        let e = VirtioBlk::open("virtio-blk1", &c(ro, true)).err().unwrap();
        assert!(
            matches!(
                e,
                BlkError::Locked {
                    held: "a write",
                    ..
                }
            ),
            "read_only={ro}: {e}"
        );
        assert!(e.to_string().contains("lock=off"), "{e}");
    }
    // lock=off opens it anyway.
    VirtioBlk::open("virtio-blk1", &c(false, false)).unwrap();
    drop(rw);
    // Readers share; a writer is refused while they hold it.
    let r1 = VirtioBlk::open("virtio-blk0", &c(true, true)).unwrap();
    let _r2 = VirtioBlk::open("virtio-blk1", &c(true, true)).unwrap();
    let e = VirtioBlk::open("virtio-blk2", &c(false, true))
        .err()
        .unwrap();
    assert!(matches!(e, BlkError::Locked { held: "a read", .. }), "{e}");
    drop(r1);
}

#[test]
fn the_config_space_is_the_60_byte_layout_of_the_spec() {
    assert_eq!(std::mem::size_of::<BlkConfigSpace>(), 60);
    let img = image(8, 0);
    let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
    let c = dev.config();
    assert_eq!(c.len(), 60);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        8,
        "capacity"
    );
    assert_eq!(
        u32::from_le_bytes(c[20..24].try_into().unwrap()),
        512,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(c[34..36].try_into().unwrap()),
        1,
        "num_queues"
    );
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    let parsed = BlkConfigSpace::read_from_bytes(c).unwrap();
    assert_eq!(parsed.seg_max.get(), 62, "queue size 64 - 2");
}

#[test]
fn a_rate_limited_disk_holds_requests_in_the_ring_and_completes_them_at_the_rate() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for be in BACKENDS {
        let img = image(64, 0);
        let config = BlkConfig {
            rate_limit: alioth_virtio::RateLimit {
                ops: Some(200),
                ..Default::default()
            },
            queue_size: 256,
            ..cfg(img.path())
        };
        let dev = VirtioBlk::open("virtio-blk0", &config).unwrap();
        let mut rig = Rig::new(&ram, dev, be, QueueFormat::Split, 0);
        // 60 reads at 200/s: the first ~20 at once (the bucket), the rest over ~0.2 s.
        let start = std::time::Instant::now();
        let mut ids = Vec::new();
        for i in 0..60u64 {
            ids.push(
                rig.drivers[0]
                    .add(&[&hdr(req::IN, i % 64)], &[512, 1])
                    .unwrap(),
            );
        }
        rig.kicks[0].write(1).unwrap();
        let mut done = Vec::new();
        let deadline = start + std::time::Duration::from_secs(10);
        while done.len() < ids.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "{be:?}: {} done",
                done.len()
            );
            while let Some((id, _)) = rig.drivers[0].used() {
                done.push(id);
            }
            wait_eventfd(&rig.irq.queues[0], 50);
        }
        let took = start.elapsed();
        // 40 beyond the bucket's 20 at 200/s: at least 0.19 s; nothing lost or doubled.
        assert!(
            took >= std::time::Duration::from_millis(190),
            "{be:?}: {took:?}"
        );
        done.sort_unstable();
        ids.sort_unstable();
        assert_eq!(done, ids, "{be:?}");
        for id in ids {
            assert_eq!(rig.result(0, id).0, status::OK);
        }
        rig.shutdown();
    }
}

#[test]
fn header_data_and_status_sharing_descriptors_move_exactly_the_data() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    for (be, format, feats) in combos() {
        let img = image(64, 0xee);
        let dev = VirtioBlk::open("virtio-blk0", &cfg(img.path())).unwrap();
        let mut rig = Rig::new(&ram, dev, be, format, feats);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
        // The header split across two buffers, the second also holding the first 100 bytes of
        // data; the rest of the data in a third.
        let h = hdr(req::OUT, 8);
        let mid = [&h[10..], &pattern[..100]].concat();
        let (st, _) = rig.request(0, &[&h[..10], &mid, &pattern[100..]], 0);
        assert_eq!(st, status::OK, "{be:?} {format:?} {feats:#x}");
        // A read whose data and status byte share one buffer.
        let id = rig.drivers[0].add(&[&hdr(req::IN, 8)], &[4097]).unwrap();
        rig.kicks[0].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.drivers[0].used().is_none() {
            assert!(Instant::now() < deadline, "read did not complete");
            wait_eventfd(&rig.irq.queues[0], 100);
        }
        let (addr, _) = rig.drivers[0].writable(id)[0];
        let got = rig.drivers[0].read_mem(addr, 4097);
        assert_eq!(&got[..4096], &pattern[..], "{be:?} {format:?} {feats:#x}");
        assert_eq!(got[4096], status::OK);
        rig.shutdown();
        let file = std::fs::read(img.path()).unwrap();
        assert_eq!(&file[4096..8192], &pattern[..]);
        assert!(file[..4096].iter().chain(&file[8192..]).all(|b| *b == 0xee));
    }
}
