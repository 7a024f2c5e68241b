//! `cargo xtask bench blk`: 4 KiB random reads through virtio-blk, next to a plain io_uring
//! loop on the same file, at queue depths 1 and 32, for both backends.
//!
//! The device path is the one a guest drives: a split ring laid out in guest RAM by the test
//! driver (EVENT_IDX on), a kick through the queue's eventfd (what KVM's ioeventfd signals), the
//! worker and its backend, the used ring, and the interrupt eventfd (what an irqfd would be).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use alioth_devices::virtio::blk::{BlkConfig, VirtioBlk, req};
use alioth_io_uring::IoUringBackend;
use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::testing::TestDriver;
use alioth_queue::{QueueFormat, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
use alioth_virtio::{EpollBackend, EventFdIrq, QueueSetup, Virtio, WakeEvent, Worker};
use io_uring::{IoUring, opcode, types};
use vmm_sys_util::eventfd::EventFd;

const BLOCK: usize = 4096;
const FILE_SIZE: u64 = 256 << 20;

/// xorshift: cheap, reproducible offsets.
struct Rng(u64);
impl Rng {
    fn block(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % (FILE_SIZE / BLOCK as u64)
    }
}

fn baseline(path: &std::path::Path, qd: usize, secs: f64, direct: bool) -> f64 {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(path).unwrap();
    let mut ring = IoUring::new(64).unwrap();
    // One 4 KiB-aligned block per slot (O_DIRECT wants aligned buffers).
    let mut area = vec![0u8; (qd + 1) * BLOCK];
    let skip = area.as_ptr().align_offset(BLOCK);
    let mut bufs: Vec<&mut [u8]> = area[skip..].chunks_mut(BLOCK).take(qd).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let submit = |ring: &mut IoUring, buf: &mut [u8], i: usize, rng: &mut Rng| {
        let off = rng.block() * BLOCK as u64;
        let sqe = opcode::Read::new(types::Fd(f.as_raw_fd()), buf.as_mut_ptr(), BLOCK as u32)
            .offset(off)
            .build()
            .user_data(i as u64);
        // SAFETY: the buffer outlives the operation (it is only reused after its CQE).
        unsafe { ring.submission().push(&sqe).unwrap() };
    };
    for (i, b) in bufs.iter_mut().enumerate() {
        submit(&mut ring, b, i, &mut rng);
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        ring.submit_and_wait(1).unwrap();
        let cqes: Vec<_> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (i, res) in cqes {
            assert_eq!(res, BLOCK as i32);
            done += 1;
            submit(&mut ring, bufs[i as usize], i as usize, &mut rng);
        }
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    // Drain what is still in flight before the buffers go away.
    let mut left = qd;
    while left > 0 {
        ring.submit_and_wait(1).unwrap();
        left -= ring.completion().count();
    }
    rate
}

fn wait(fd: &EventFd) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 1000) };
    let _ = fd.read();
}

fn device(path: &std::path::Path, uring: bool, qd: usize, secs: f64) -> f64 {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    let cfg = BlkConfig {
        path: path.to_path_buf(),
        read_only: true,
        num_queues: 1,
        queue_size: 256,
        direct: false,
        lock: true,
        rate_limit: Default::default(),
    };
    let dev = VirtioBlk::open("virtio-blk0", &cfg).unwrap();
    let features = dev.device_features();
    let mem = ram.memory().clone();
    let worker = if uring {
        Worker::spawn(dev, IoUringBackend::new(256), mem)
    } else {
        Worker::spawn(dev, EpollBackend::default(), mem)
    }
    .unwrap();
    let mut d = TestDriver::new(
        ram.memory(),
        QueueFormat::Split,
        256,
        0x10_0000,
        1 << VIRTIO_F_EVENT_IDX,
    );
    let irq = Arc::new(EventFdIrq::new(1).unwrap());
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    worker.wake(WakeEvent::Start {
        features: features & (d.features() | (1 << VIRTIO_F_VERSION_1)),
        queues: vec![Some(QueueSetup {
            config: d.config(),
            ioeventfd: kick.clone(),
            base: 0,
        })],
        irq: irq.clone(),
    });
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut hdr = [0u8; 16];
    let mut add = |d: &mut TestDriver, rng: &mut Rng| {
        hdr[8..16].copy_from_slice(&(rng.block() * (BLOCK as u64 / 512)).to_le_bytes());
        hdr[0..4].copy_from_slice(&req::IN.to_le_bytes());
        d.add(&[&hdr], &[BLOCK as u32, 1]).unwrap();
    };
    for _ in 0..qd {
        add(&mut d, &mut rng);
    }
    if d.kick_needed() {
        kick.write(1).unwrap();
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let mut got = 0;
        while let Some((_, len)) = d.used() {
            assert_eq!(len as usize, BLOCK + 1);
            got += 1;
        }
        if got == 0 {
            // Ask for an interrupt at the next completion, then sleep on it.
            d.set_used_event(done);
            if d.used_pending() {
                continue;
            }
            wait(&irq.queues[0]);
            continue;
        }
        done += got;
        for _ in 0..got {
            add(&mut d, &mut rng);
        }
        if d.kick_needed() {
            kick.write(1).unwrap();
        }
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    worker.shutdown();
    rate
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: then only a short smoke
    // run proves the paths work.
    let smoke = !args.iter().any(|a| a == "--bench");
    let secs = if smoke { 0.05 } else { secs };
    // `--baseline FILE --qd N`: only the plain io_uring loop on FILE (for the in-guest table of
    // `cargo xtask bench blk`).
    if let Some(i) = args.iter().position(|a| a == "--baseline") {
        let file = std::path::PathBuf::from(&args[i + 1]);
        let qd: usize = args
            .iter()
            .position(|a| a == "--qd")
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        // `--direct`: O_DIRECT, straight from the disk; otherwise warm the page cache first.
        let direct = args.iter().any(|a| a == "--direct");
        if !direct {
            let _ = std::fs::read(&file).unwrap();
        }
        println!("baseline-iops {:.0}", baseline(&file, qd, secs, direct));
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("bench.img");
    {
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
        for _ in 0..FILE_SIZE >> 20 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    // Warm the page cache so every path reads the same cached file.
    let _ = std::fs::read(&path).unwrap();
    println!(
        "virtio-blk 4 KiB random read, {} MiB file (page cache), {secs} s per run",
        FILE_SIZE >> 20
    );
    println!(
        "{:<10} {:>4} {:>14} {:>14} {:>8}",
        "backend", "qd", "device IOPS", "io_uring IOPS", "ratio"
    );
    for qd in [1usize, 32] {
        let base = baseline(&path, qd, secs, false);
        for (name, uring) in [("io_uring", true), ("epoll", false)] {
            let dev = device(&path, uring, qd, secs);
            println!(
                "{name:<10} {qd:>4} {dev:>14.0} {base:>14.0} {:>8.2}",
                dev / base
            );
        }
    }
}
