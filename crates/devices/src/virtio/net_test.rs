use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use alioth_io_uring::IoUringBackend;
use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::testing::TestDriver;
use alioth_queue::{QueueFormat, VIRTIO_F_VERSION_1};
use alioth_test_util::wait_eventfd;
use alioth_virtio::{EpollBackend, EventFdIrq, QueueSetup, WakeEvent, Worker};
use vmm_sys_util::eventfd::EventFd;

use super::*;

/// A SOCK_SEQPACKET pair: one end stands in for a tap queue (one packet per read and write).
fn packet_pair(nonblocking: bool) -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let mut ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: `fds` has room for the two descriptors socketpair returns.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: both are fresh descriptors owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn cfg() -> NetConfig {
    NetConfig {
        tap: "test".into(),
        mac: [2, 0, 0, 0, 0, 1],
        queue_pairs: 1,
        queue_size: 16,
        mtu: 1500,
        rate_limit: Default::default(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Epoll,
    IoUring,
}

struct Rig {
    worker: Worker,
    irq: Arc<EventFdIrq>,
    kicks: Vec<Arc<EventFd>>,
    peer: OwnedFd,
    counters: Arc<NetCounters>,
}

/// A one-pair device on a socket pair, started with `features` and the rings of `rx`, `tx`.
fn start(ram: &RamBus, kind: Kind, features: u64, rx: &TestDriver, tx: &TestDriver) -> Rig {
    start_with(ram, kind, features, rx, tx, cfg())
}

fn start_with(
    ram: &RamBus,
    kind: Kind,
    features: u64,
    rx: &TestDriver,
    tx: &TestDriver,
    config: NetConfig,
) -> Rig {
    let (dev_end, peer) = packet_pair(matches!(kind, Kind::Epoll));
    let dev = VirtioNet::with_tap("virtio-net0", &config, Tap::from_fds("test", vec![dev_end]));
    let counters = dev.counters();
    let mem = ram.memory().clone();
    let worker = match kind {
        Kind::Epoll => Worker::spawn(dev, EpollBackend::default(), mem),
        Kind::IoUring => Worker::spawn(dev, IoUringBackend::new(64), mem),
    }
    .unwrap();
    let irq = Arc::new(EventFdIrq::new(3).unwrap());
    let kicks: Vec<_> = (0..2)
        .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
        .collect();
    worker.wake(WakeEvent::Start {
        features: features | rx.features() | (1 << VIRTIO_F_VERSION_1),
        queues: vec![
            Some(QueueSetup {
                config: rx.config(),
                ioeventfd: kicks[0].clone(),
                base: 0,
            }),
            Some(QueueSetup {
                config: tx.config(),
                ioeventfd: kicks[1].clone(),
                base: 0,
            }),
        ],
        irq: irq.clone(),
    });
    Rig {
        worker,
        irq,
        kicks,
        peer,
        counters,
    }
}

fn hdr(flags: u8, gso_type: u8) -> Vec<u8> {
    VirtioNetHdr {
        flags,
        gso_type,
        ..Default::default()
    }
    .as_bytes()
    .to_vec()
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn peer_recv(peer: &OwnedFd, timeout_ms: i32) -> Option<Vec<u8>> {
    let mut p = libc::pollfd {
        fd: peer.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, timeout_ms) } <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 70000];
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

fn peer_send(peer: &OwnedFd, data: &[u8]) {
    // SAFETY: `data` is valid for its length.
    let n = unsafe { libc::send(peer.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(n, data.len() as isize);
}

fn wait_used(d: &mut TestDriver, irq: &EventFd, n: usize) -> Vec<(u16, u32)> {
    let mut got = Vec::new();
    while got.len() < n {
        while let Some(u) = d.used() {
            got.push(u);
        }
        if got.len() >= n {
            break;
        }
        assert!(wait_eventfd(irq, 5000), "no interrupt; got {got:?}");
    }
    got
}

fn each_setup(f: impl Fn(Kind, QueueFormat)) {
    for kind in [Kind::Epoll, Kind::IoUring] {
        for format in [QueueFormat::Split, QueueFormat::Packed] {
            f(kind, format);
        }
    }
}

#[test]
fn transmitted_packets_reach_the_tap_and_bad_ones_are_dropped_and_counted() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let rx = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
        let mut tx = TestDriver::new(ram.memory(), format, 16, 0x18_0000, 0);
        let rig = start(&ram, kind, 0, &rx, &tx);
        let good = frame(60, 1);
        let bad: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (hdr(0, 0), vec![]),                      // empty frame
            (hdr(0, 0), frame(8, 2)),                 // runt
            (hdr(0, gso::TCPV4), frame(200, 3)),      // GSO without HOST_TSO4
            (hdr(HDR_F_NEEDS_CSUM, 0), frame(60, 4)), // partial checksum without CSUM
            (hdr(0, 0x42), frame(60, 5)),             // unknown GSO type
            (hdr(0, 0), frame(1500 + 18 + 1, 6)),     // beyond the MTU
            (vec![0; 6], vec![]),                     // no room for the header
        ];
        for (h, f) in &bad {
            tx.add(&[h, f], &[]).unwrap();
        }
        tx.add(&[&hdr(0, 0), &good], &[]).unwrap();
        rig.kicks[1].write(1).unwrap();
        let used = wait_used(&mut tx, &rig.irq.queues[1], bad.len() + 1);
        assert!(used.iter().all(|(_, len)| *len == 0), "{used:?}");
        let got = peer_recv(&rig.peer, 5000).expect("the good packet");
        assert_eq!(&got[..VNET_HDR_LEN], &hdr(0, 0)[..]);
        assert_eq!(&got[VNET_HDR_LEN..], &good[..], "{kind:?} {format:?}");
        assert!(peer_recv(&rig.peer, 100).is_none(), "only the good packet");
        assert_eq!(
            rig.counters.tx_invalid.load(Ordering::Relaxed),
            bad.len() as u64
        );
        assert_eq!(rig.counters.tx_packets.load(Ordering::Relaxed), 1);
        assert!(!rig.worker.needs_reset());
        rig.worker.shutdown();
    });
}

#[test]
fn received_packets_wait_for_buffers_and_arrive_whole() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rx = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
        let tx = TestDriver::new(ram.memory(), format, 16, 0x18_0000, 0);
        let rig = start(&ram, kind, 0, &rx, &tx);
        // Sent before the guest posts anything: it must not be lost.
        let first = frame(100, 7);
        let second = frame(1514, 8);
        peer_send(&rig.peer, &[hdr(0, 0), first.clone()].concat());
        peer_send(&rig.peer, &[hdr(0, 0), second.clone()].concat());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rx.used().is_none());
        let a = rx.add(&[], &[1526]).unwrap();
        let b = rx.add(&[], &[1526]).unwrap();
        rig.kicks[0].write(1).unwrap();
        let used = wait_used(&mut rx, &rig.irq.queues[0], 2);
        assert_eq!(
            used,
            vec![(a, 112), (b, 1526)],
            "{kind:?} {format:?}: one packet per chain, in order"
        );
        let wa = rx.written(a);
        assert_eq!(&wa[VNET_HDR_LEN..112], &first[..]);
        assert_eq!(u16::from_le_bytes([wa[10], wa[11]]), 1, "num_buffers");
        assert_eq!(&rx.written(b)[VNET_HDR_LEN..], &second[..]);
        assert_eq!(rig.counters.rx_packets.load(Ordering::Relaxed), 2);
        rig.worker.shutdown();
    });
}

#[test]
fn mergeable_receive_spans_chains_and_sets_num_buffers() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rx = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
        let tx = TestDriver::new(ram.memory(), format, 16, 0x18_0000, 0);
        let rig = start(&ram, kind, bit(feature::MRG_RXBUF), &rx, &tx);
        // 2 x 512 bytes cannot take a 1530-byte packet: nothing is read yet.
        let mut ids: Vec<u16> = (0..2).map(|_| rx.add(&[], &[512]).unwrap()).collect();
        rig.kicks[0].write(1).unwrap();
        let data = frame(1200, 9);
        peer_send(&rig.peer, &[hdr(0, 0), data.clone()].concat());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            rx.used().is_none(),
            "read before the buffers could take any packet"
        );
        ids.push(rx.add(&[], &[512]).unwrap());
        let last = rx.add(&[], &[512]).unwrap();
        rig.kicks[0].write(1).unwrap();
        let used = wait_used(&mut rx, &rig.irq.queues[0], 3);
        assert_eq!(used, vec![(ids[0], 512), (ids[1], 512), (ids[2], 188)]);
        let mut got = Vec::new();
        for id in &ids {
            got.extend(rx.written(*id));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..VNET_HDR_LEN + 1200], &data[..]);
        // The fourth chain stays with the device for the next packet.
        peer_send(&rig.peer, &[hdr(0, 0), frame(20, 1)].concat());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            rx.used().is_none(),
            "512 bytes cannot take the largest packet"
        );
        for _ in 0..3 {
            rx.add(&[], &[512]).unwrap();
        }
        rig.kicks[0].write(1).unwrap();
        let used = wait_used(&mut rx, &rig.irq.queues[0], 1);
        assert_eq!(used, vec![(last, 32)], "{kind:?} {format:?}");
        rig.worker.shutdown();
    });
}

#[test]
fn a_receive_chain_without_room_for_the_header_needs_a_reset() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rx = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
        let tx = TestDriver::new(ram.memory(), format, 16, 0x18_0000, 0);
        let rig = start(&ram, kind, 0, &rx, &tx);
        rx.add(&[], &[8]).unwrap();
        rig.kicks[0].write(1).unwrap();
        assert!(wait_eventfd(&rig.irq.config, 5000), "{kind:?} {format:?}");
        assert!(rig.worker.needs_reset());
        rig.worker.reset();
        rig.worker.shutdown();
    });
}

#[test]
fn a_reset_cancels_a_read_waiting_for_packets() {
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rx = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
        let tx = TestDriver::new(ram.memory(), format, 16, 0x18_0000, 0);
        let rig = start(&ram, Kind::IoUring, 0, &rx, &tx);
        rx.add(&[], &[1526]).unwrap();
        rig.kicks[0].write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The read is in flight on a blocking descriptor; the reset must not wait for a packet.
        let (tx_done, rx_done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            rig.worker.reset();
            let _ = tx_done.send(());
        });
        assert!(
            rx_done
                .recv_timeout(std::time::Duration::from_secs(5))
                .is_ok(),
            "{format:?}: reset hung on the read in flight"
        );
        assert!(rx.used().is_none());
    }
}

#[test]
fn control_queue_sets_queue_pairs_and_refuses_what_it_does_not_know() {
    let (a, _pa) = packet_pair(true);
    let (b, _pb) = packet_pair(true);
    let mut c = cfg();
    c.queue_pairs = 2;
    let mut dev = VirtioNet::with_tap("virtio-net0", &c, Tap::from_fds("test", vec![a, b]));
    assert_ne!(dev.device_features() & bit(feature::MQ), 0);
    assert_eq!(dev.queue_max_sizes().len(), 5);
    let cfgspace = NetConfigSpace::read_from_bytes(dev.config()).unwrap();
    assert_eq!(cfgspace.max_virtqueue_pairs, 2);
    assert_eq!(cfgspace.mac, [2, 0, 0, 0, 0, 1]);
    dev.activate(dev.device_features()).unwrap();
    assert_eq!(
        dev.control(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &[2, 0]),
        ctrl::OK
    );
    assert_eq!(dev.active_pairs, 2);
    assert_eq!(
        dev.control(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &[3, 0]),
        ctrl::ERR
    );
    assert_eq!(
        dev.control(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &[0, 0]),
        ctrl::ERR
    );
    assert_eq!(
        dev.control(ctrl::CLASS_RX, 0, &[1]),
        ctrl::OK,
        "promiscuous"
    );
    assert_eq!(
        dev.control(ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, &[2, 1, 2, 3, 4, 5]),
        ctrl::OK
    );
    assert_eq!(&dev.config()[..6], &[2, 1, 2, 3, 4, 5]);
    assert_eq!(dev.control(9, 0, &[]), ctrl::ERR, "unknown class");
    assert_eq!(dev.role(4), Role::Ctrl);
    assert_eq!(dev.role(3), Role::Tx(1));
}

#[test]
fn bad_settings_are_refused() {
    for (f, what) in [
        (
            (|c: &mut NetConfig| c.queue_pairs = 0) as fn(&mut NetConfig),
            "queues",
        ),
        (|c| c.queue_pairs = MAX_QUEUE_PAIRS + 1, "queues"),
        (|c| c.queue_size = 100, "queue_size"),
        (|c| c.mtu = 20, "mtu"),
        (|c| c.mac = [1, 0, 0, 0, 0, 0], "multicast"),
    ] {
        let mut c = cfg();
        f(&mut c);
        let e = VirtioNet::check(&c).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
}

#[test]
fn rate_limited_packets_wait_in_the_rings_both_ways_and_all_arrive() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rx = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
        let mut tx = TestDriver::new(ram.memory(), format, 16, 0x18_0000, 0);
        let config = NetConfig {
            rate_limit: alioth_virtio::RateLimit {
                ops: Some(20),
                ..Default::default()
            },
            ..cfg()
        };
        let rig = start_with(&ram, kind, 0, &rx, &tx, config);
        // Transmit 7 packets at 20/s: the bucket takes 2 at once, the rest wait (0.25 s).
        let start = std::time::Instant::now();
        for i in 0..7u8 {
            tx.add(&[&hdr(0, 0), &frame(60, i)], &[]).unwrap();
        }
        rig.kicks[1].write(1).unwrap();
        for i in 0..7u8 {
            let got = peer_recv(&rig.peer, 5000).expect("a packet");
            assert_eq!(
                &got[VNET_HDR_LEN..],
                &frame(60, i)[..],
                "{kind:?} {format:?}"
            );
        }
        let took = start.elapsed();
        assert!(
            took >= std::time::Duration::from_millis(200),
            "{kind:?} {format:?}: {took:?}"
        );
        let used = wait_used(&mut tx, &rig.irq.queues[1], 7);
        assert_eq!(used.len(), 7);
        // Receive 7 packets: the receive side has a bucket of its own.
        for i in 0..7u8 {
            peer_send(&rig.peer, &[hdr(0, 0), frame(60, 100 + i)].concat());
        }
        let start = std::time::Instant::now();
        for _ in 0..7 {
            rx.add(&[], &[1526]).unwrap();
        }
        rig.kicks[0].write(1).unwrap();
        let got = wait_used(&mut rx, &rig.irq.queues[0], 7);
        assert_eq!(got.len(), 7, "{kind:?} {format:?}");
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(200),
            "{kind:?} {format:?}: {:?}",
            start.elapsed()
        );
        assert_eq!(rig.counters.rx_packets.load(Ordering::Relaxed), 7);
        rig.worker.shutdown();
    });
}
