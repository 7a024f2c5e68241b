use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::QueueFormat;
use alioth_queue::testing::TestDriver;
use alioth_test_util::wait_eventfd;
use alioth_virtio::{EventFdIrq, WakeEvent, Worker};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const CID: u64 = 3;

use crate::virtio::test_rig::{self, Kind};

struct Rig<'a> {
    worker: Worker,
    irq: Arc<EventFdIrq>,
    kicks: Vec<Arc<EventFd>>,
    rx: TestDriver<'a>,
    tx: TestDriver<'a>,
    ev: TestDriver<'a>,
    counters: Arc<VsockCounters>,
    uds: PathBuf,
    _dir: tempfile::TempDir,
    /// Receive buffers posted and not yet used.
    posted: usize,
}

fn start(ram: &RamBus, kind: Kind, format: QueueFormat) -> Rig<'_> {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let dev = VirtioVsock::new("virtio-vsock0", &VsockConfig::new(CID, &uds)).unwrap();
    start_with(ram, kind, format, dev, uds, dir)
}

fn start_with(
    ram: &RamBus,
    kind: Kind,
    format: QueueFormat,
    dev: VirtioVsock,
    uds: PathBuf,
    dir: tempfile::TempDir,
) -> Rig<'_> {
    let counters = dev.counters();
    let rx = TestDriver::new(ram.memory(), format, 64, 0x10_0000, 0);
    let tx = TestDriver::new(ram.memory(), format, 64, 0x20_0000, 0);
    let ev = TestDriver::new(ram.memory(), format, 16, 0x30_0000, 0);
    let test_rig::Started { worker, irq, kicks } =
        test_rig::start(dev, kind, ram, &[&rx, &tx, &ev]);
    let mut rig = Rig {
        worker,
        irq,
        kicks,
        rx,
        tx,
        ev,
        counters,
        uds,
        _dir: dir,
        posted: 0,
    };
    rig.post_rx(16);
    rig
}

fn pkt(src_port: u32, dst_port: u32, op: u16, len: u32) -> VsockHdr {
    VsockHdr {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

impl Rig<'_> {
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx.add(&[], &[HDR_LEN as u32, 4096]).unwrap();
        }
        self.posted += n;
        self.kicks[0].write(1).unwrap();
    }

    fn send(&mut self, h: VsockHdr, payload: &[u8]) {
        self.tx.add(&[h.as_bytes(), payload], &[]).unwrap();
        self.kicks[1].write(1).unwrap();
        // Transmit chains always come back, with nothing written.
        for _ in 0..500 {
            if let Some((_, len)) = self.tx.used() {
                assert_eq!(len, 0);
                return;
            }
            wait_eventfd(&self.irq.queues[1], 10);
        }
        panic!("transmit chain not returned");
    }

    /// The next packet to the guest (header, payload), within `ms`.
    fn recv(&mut self, ms: u64) -> Option<(VsockHdr, Vec<u8>)> {
        let deadline = std::time::Instant::now() + Duration::from_millis(ms);
        loop {
            if let Some((id, len)) = self.rx.used() {
                self.posted -= 1;
                if self.posted < 8 {
                    self.post_rx(8);
                }
                let bytes = self.rx.written(id);
                let h = VsockHdr::read_from_bytes(&bytes[..HDR_LEN]).unwrap();
                assert_eq!(len as usize, HDR_LEN + h.len as usize);
                return Some((h, bytes[HDR_LEN..len as usize].to_vec()));
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            wait_eventfd(&self.irq.queues[0], 10);
        }
    }

    /// The next packet that is not a credit update.
    fn recv_op(&mut self, ms: u64) -> Option<(VsockHdr, Vec<u8>)> {
        loop {
            let p = self.recv(ms)?;
            if p.0.op != op::CREDIT_UPDATE {
                return Some(p);
            }
        }
    }

    /// Guest port `gport` connects to host port `hport` (whose listener must exist).
    fn connect(&mut self, gport: u32, hport: u32) {
        self.send(pkt(gport, hport, op::REQUEST, 0), &[]);
        let (h, _) = self.recv_op(2000).expect("an answer to REQUEST");
        assert_eq!(
            ({ h.op }, { h.src_port }, { h.dst_port }, { h.dst_cid }),
            (op::RESPONSE, hport, gport, CID)
        );
        assert_eq!({ h.buf_alloc }, BUF_ALLOC);
    }
}

fn each_setup(f: impl Fn(Kind, QueueFormat)) {
    for kind in [Kind::Epoll, Kind::IoUring] {
        for format in [QueueFormat::Split, QueueFormat::Packed] {
            f(kind, format);
        }
    }
}

fn listen(rig: &Rig, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", rig.uds.display())).unwrap()
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rig = start(&ram, kind, format);
        let l = listen(&rig, 1234);
        rig.connect(50000, 1234);
        let (mut host, _) = l.accept().unwrap();
        rig.send(pkt(50000, 1234, op::RW, 5), b"hello");
        assert_eq!(read_n(&mut host, 5), b"hello");
        host.write_all(b"world").unwrap();
        let (h, data) = rig.recv_op(2000).expect("data for the guest");
        assert_eq!(({ h.op }, { h.len }), (op::RW, 5), "{kind:?} {format:?}");
        assert_eq!(data, b"world");
        assert_eq!(rig.counters.tx_bytes.load(Ordering::Relaxed), 5);
        assert_eq!(rig.counters.rx_bytes.load(Ordering::Relaxed), 5);
        // The guest closes both directions: RST completes it, the host sees EOF.
        let mut sd = pkt(50000, 1234, op::SHUTDOWN, 0);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        rig.send(sd, &[]);
        let (h, _) = rig.recv_op(2000).expect("RST");
        assert_eq!({ h.op }, op::RST);
        let mut rest = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
        rig.worker.shutdown();
    });
}

#[test]
fn a_host_connect_line_reaches_the_guest_and_ok_names_the_host_port() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rig = start(&ram, kind, format);
        let mut host = UnixStream::connect(&rig.uds).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();
        let (h, _) = rig.recv_op(2000).expect("REQUEST");
        assert_eq!(({ h.op }, { h.dst_port }), (op::REQUEST, 5000));
        let hport = h.src_port;
        assert!(hport >= FIRST_HOST_PORT, "{kind:?} {format:?}");
        rig.send(pkt(5000, hport, op::RESPONSE, 0), &[]);
        let line = format!("OK {hport}\n");
        assert_eq!(read_n(&mut host, line.len()), line.as_bytes());
        host.write_all(b"ping").unwrap();
        let (h, data) = rig.recv_op(2000).expect("data");
        assert_eq!(({ h.op }, data.as_slice()), (op::RW, &b"ping"[..]));
        // The host closes: the guest hears SHUTDOWN of both directions.
        drop(host);
        let (h, _) = rig.recv_op(2000).expect("SHUTDOWN");
        assert_eq!(({ h.op }, { h.flags }), (op::SHUTDOWN, 3));
        rig.worker.shutdown();
    });
}

#[test]
fn malformed_connect_lines_are_dropped_without_reaching_the_guest() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mut rig = start(&ram, Kind::IoUring, QueueFormat::Split);
    for line in [&b"HELLO 5\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
        let mut host = UnixStream::connect(&rig.uds).unwrap();
        host.write_all(line).unwrap();
        let mut buf = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Closed: EOF, or a reset when bytes were left unread.
        match host.read_to_end(&mut buf) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert!(rig.recv(200).is_none());
    rig.worker.shutdown();
}

#[test]
fn a_request_to_a_port_nobody_listens_on_gets_rst() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rig = start(&ram, kind, format);
        rig.send(pkt(40000, 9999, op::REQUEST, 0), &[]);
        let (h, _) = rig.recv_op(2000).expect("RST");
        assert_eq!(
            ({ h.op }, { h.src_port }, { h.dst_port }),
            (op::RST, 9999, 40000),
            "{kind:?} {format:?}"
        );
        rig.worker.shutdown();
    });
}

#[test]
fn hostile_packets_get_rst_and_the_device_keeps_working() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rig = start(&ram, kind, format);
        let l = listen(&rig, 7);
        let mut wrong_cid = pkt(1, 7, op::REQUEST, 0);
        wrong_cid.src_cid = 99;
        let mut seqpacket = pkt(2, 7, op::REQUEST, 0);
        seqpacket.type_ = 2;
        let mut to_guest = pkt(3, 7, op::REQUEST, 0);
        to_guest.dst_cid = CID;
        for h in [
            pkt(4, 7, 0x42, 0),         // unknown operation, no connection
            wrong_cid,                  // not from the guest's CID
            seqpacket,                  // not a stream
            to_guest,                   // not to the host
            pkt(5, 7, op::RW, 3),       // data for no connection
            pkt(6, 7, op::RESPONSE, 0), // a response to nothing
        ] {
            rig.send(h, b"abc");
            let (r, _) = rig.recv_op(2000).expect("RST");
            assert_eq!({ r.op }, op::RST, "{kind:?} {format:?} {h:?}");
        }
        // A length beyond the buffers, on a live connection: RST, connection gone.
        rig.connect(8, 7);
        let (mut host, _) = l.accept().unwrap();
        rig.send(pkt(8, 7, op::RW, 4000), b"short");
        let (r, _) = rig.recv_op(2000).expect("RST");
        assert_eq!({ r.op }, op::RST);
        let mut rest = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            host.read_to_end(&mut rest).unwrap(),
            0,
            "closed, nothing sent"
        );
        // An unknown operation on a live connection, too.
        rig.connect(9, 7);
        let _host2 = l.accept().unwrap();
        rig.send(pkt(9, 7, 0x42, 0), &[]);
        assert_eq!({ rig.recv_op(2000).unwrap().0.op }, op::RST);
        // A chain without a header is dropped.
        rig.tx.add(&[&[1, 2, 3]], &[]).unwrap();
        rig.kicks[1].write(1).unwrap();
        // Still serving.
        rig.connect(10, 7);
        assert!(!rig.worker.needs_reset());
        assert!(rig.counters.bad_packets.load(Ordering::Relaxed) >= 5);
        rig.worker.shutdown();
    });
}

#[test]
fn data_beyond_the_granted_credit_resets_the_connection() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mut rig = start(&ram, Kind::Epoll, QueueFormat::Split);
    let l = listen(&rig, 80);
    rig.connect(1, 80);
    // The host never reads: the socket fills, then the device holds up to BUF_ALLOC.
    let (_host, _) = l.accept().unwrap();
    let chunk = vec![0x5a; 60000];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..200 {
        rig.send(pkt(1, 80, op::RW, chunk.len() as u32), &chunk);
        sent += chunk.len();
        while let Some((h, _)) = rig.recv(20) {
            if h.op == op::RST {
                reset = true;
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "no RST after {sent} bytes");
    rig.worker.shutdown();
}

#[test]
fn a_slow_host_reader_throttles_the_guest_through_credit() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rig = start(&ram, kind, format);
        let l = listen(&rig, 81);
        rig.connect(1, 81);
        let (mut host, _) = l.accept().unwrap();
        // A guest that honours credit: it sends while the device's window allows.
        let chunk: Vec<u8> = (0..4000).map(|i| i as u8).collect();
        // A whole number of chunks, so the reader knows where the stream ends.
        let total = 1024 * 4000;
        let (mut tx_cnt, mut fwd) = (0u32, 0u32);
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 8192];
            while got < total {
                std::thread::sleep(Duration::from_micros(200));
                let n = host.read(&mut buf).unwrap();
                assert!(n > 0);
                got += n;
            }
            got
        });
        while (tx_cnt as usize) < total {
            let window = BUF_ALLOC - tx_cnt.wrapping_sub(fwd);
            if window as usize >= chunk.len() {
                rig.send(pkt(1, 81, op::RW, chunk.len() as u32), &chunk);
                tx_cnt += chunk.len() as u32;
                continue;
            }
            // Out of credit: ask, and wait for the host to drain.
            rig.send(pkt(1, 81, op::CREDIT_REQUEST, 0), &[]);
            let (h, _) = rig.recv(5000).expect("a credit update");
            assert_eq!({ h.op }, op::CREDIT_UPDATE, "{kind:?} {format:?}");
            assert_eq!({ h.buf_alloc }, BUF_ALLOC);
            fwd = h.fwd_cnt;
        }
        assert_eq!(reader.join().unwrap(), total);
        rig.worker.shutdown();
    });
}

#[test]
fn host_data_waits_for_guest_credit() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mut rig = start(&ram, Kind::IoUring, QueueFormat::Split);
    let l = listen(&rig, 82);
    // The guest grants 1000 bytes.
    let mut req = pkt(1, 82, op::REQUEST, 0);
    req.buf_alloc = 1000;
    rig.send(req, &[]);
    assert_eq!({ rig.recv_op(2000).unwrap().0.op }, op::RESPONSE);
    let (mut host, _) = l.accept().unwrap();
    host.write_all(&[7u8; 3000]).unwrap();
    let mut got = 0;
    while let Some((h, d)) = rig.recv(300) {
        assert_eq!({ h.op }, op::RW);
        got += d.len();
    }
    assert_eq!(got, 1000, "no more than the guest's credit");
    // The guest consumed it all: 1000 more.
    let mut upd = pkt(1, 82, op::CREDIT_UPDATE, 0);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    rig.send(upd, &[]);
    let mut more = 0;
    while let Some((_, d)) = rig.recv(300) {
        more += d.len();
    }
    assert_eq!(more, 1000);
    rig.worker.shutdown();
}

#[test]
fn a_device_reset_closes_every_connection() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mut rig = start(&ram, Kind::IoUring, QueueFormat::Split);
    let l = listen(&rig, 83);
    rig.connect(1, 83);
    let (mut host, _) = l.accept().unwrap();
    rig.worker.reset();
    let mut buf = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
    rig.worker.shutdown();
}

#[test]
fn the_socket_file_goes_away_with_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let dev = VirtioVsock::new("v", &VsockConfig::new(3, &uds)).unwrap();
    assert!(uds.exists());
    // A second device cannot take a socket in use.
    assert!(matches!(
        VirtioVsock::new("w", &VsockConfig::new(4, &uds)),
        Err(VsockError::Socket { .. })
    ));
    drop(dev);
    assert!(!uds.exists());
    // A stale socket file (nobody listening) is replaced.
    drop(UnixListener::bind(&uds).unwrap());
    assert!(uds.exists());
    let dev = VirtioVsock::new("v", &VsockConfig::new(3, &uds)).unwrap();
    drop(dev);
}

#[test]
fn bad_configurations_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let cases = [
        (VsockConfig::new(2, dir.path().join("a")), "reserved"),
        (
            VsockConfig::new(1 << 32, dir.path().join("a")),
            "out of range",
        ),
        (
            VsockConfig::new(3, dir.path().join("no/such/dir/s")),
            "directory",
        ),
        (VsockConfig::new(3, &file), "not a socket"),
        (VsockConfig::new(3, "x".repeat(120)), "bytes long"),
    ];
    for (c, want) in cases {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "left alone");
}

#[test]
fn connections_beyond_the_limit_are_refused_both_ways() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut config = VsockConfig::new(CID, &uds);
    config.max_connections = 2;
    let dev = VirtioVsock::new("virtio-vsock0", &config).unwrap();
    let mut rig = start_with(&ram, Kind::IoUring, QueueFormat::Split, dev, uds, dir);
    let _l = listen(&rig, 90);
    rig.connect(1, 90);
    rig.connect(2, 90);
    rig.send(pkt(3, 90, op::REQUEST, 0), &[]);
    assert_eq!(
        { rig.recv_op(2000).unwrap().0.op },
        op::RST,
        "a third guest connection"
    );
    // A host connection is closed without reaching the guest.
    let mut host = UnixStream::connect(&rig.uds).unwrap();
    let _ = host.write_all(b"CONNECT 7\n");
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap_or(0), 0);
    assert!(rig.recv_op(200).is_none());
    // Closing one makes room again.
    rig.send(pkt(1, 90, op::RST, 0), &[]);
    rig.connect(4, 90);
    rig.worker.shutdown();
}

#[test]
fn a_restored_device_tells_the_guest_its_transport_was_reset() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let mut rig = start(&ram, kind, format);
        let id = rig.ev.add(&[], &[4]).unwrap();
        rig.ev.add(&[], &[4]).unwrap();
        rig.kicks[2].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(rig.ev.used().is_none(), "no event before a restore");
        rig.worker.wake(WakeEvent::Restored);
        rig.kicks[2].write(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let used = loop {
            if let Some(u) = rig.ev.used() {
                break u;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?} {format:?}: no event"
            );
            wait_eventfd(&rig.irq.queues[2], 10);
        };
        assert_eq!(used, (id, 4));
        assert_eq!(rig.ev.written(id), vec![0, 0, 0, 0], "TRANSPORT_RESET");
        assert!(rig.ev.used().is_none(), "one event");
        rig.worker.shutdown();
    });
}
