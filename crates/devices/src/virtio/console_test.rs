use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::QueueFormat;
use alioth_queue::testing::TestDriver;
use alioth_test_util::wait_eventfd;
use alioth_virtio::{EventFdIrq, Worker};
use vmm_sys_util::eventfd::EventFd;

use super::*;

use crate::virtio::test_rig::{self, Kind};

struct Rig<'a> {
    worker: Worker,
    irq: Arc<EventFdIrq>,
    kicks: Vec<Arc<EventFd>>,
    rx: TestDriver<'a>,
    tx: TestDriver<'a>,
    counters: Arc<ConsoleCounters>,
}

fn start<'a>(ram: &'a RamBus, kind: Kind, format: QueueFormat, dev: VirtioConsole) -> Rig<'a> {
    let counters = dev.counters();
    let rx = TestDriver::new(ram.memory(), format, 64, 0x10_0000, 0);
    let tx = TestDriver::new(ram.memory(), format, 64, 0x20_0000, 0);
    let s = test_rig::start(dev, kind, ram, &[&rx, &tx]);
    Rig {
        worker: s.worker,
        irq: s.irq,
        kicks: s.kicks,
        rx,
        tx,
        counters,
    }
}

impl Rig<'_> {
    fn write(&mut self, data: &[u8]) {
        self.tx.add(&[data], &[]).unwrap();
        self.kicks[1].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.tx.used().is_none() {
            assert!(Instant::now() < deadline, "output chain not returned");
            wait_eventfd(&self.irq.queues[1], 10);
        }
    }

    fn post(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            self.rx.add(&[], &[size]).unwrap();
        }
        self.kicks[0].write(1).unwrap();
    }

    /// Input bytes that arrive within `ms`, up to `want`.
    fn read(&mut self, want: usize, ms: u64) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(ms);
        while got.len() < want && Instant::now() < deadline {
            match self.rx.used() {
                Some((id, len)) => {
                    got.extend_from_slice(&self.rx.written(id)[..len as usize]);
                    self.post(1, 512);
                }
                None => {
                    wait_eventfd(&self.irq.queues[0], 10);
                }
            }
        }
        got
    }
}

fn each_setup(f: impl Fn(Kind, QueueFormat)) {
    for kind in [Kind::Epoll, Kind::IoUring] {
        for format in [QueueFormat::Split, QueueFormat::Packed] {
            f(kind, format);
        }
    }
}

fn socket_console() -> (tempfile::TempDir, PathBuf, VirtioConsole) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.sock");
    let dev = VirtioConsole::new("virtio-console0", &ConsoleMode::Socket(p.clone()), None).unwrap();
    (dir, p, dev)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn socket_input_waits_for_guest_buffers_and_nothing_is_lost() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let (_dir, path, dev) = socket_console();
        let mut rig = start(&ram, kind, format, dev);
        let mut host = UnixStream::connect(&path).unwrap();
        // The guest posts nothing yet: 100 KB wait in the socket (the writer blocks).
        let data = pattern(100_000);
        let writer = {
            let mut h = host.try_clone().unwrap();
            let d = data.clone();
            std::thread::spawn(move || h.write_all(&d).unwrap())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(rig.rx.used().is_none());
        rig.post(32, 512);
        let got = rig.read(data.len(), 10_000);
        writer.join().unwrap();
        assert_eq!(got.len(), data.len(), "{kind:?} {format:?}");
        assert!(got == data, "{kind:?} {format:?}: input out of order");
        // Output reaches the client.
        rig.write(b"hello from the guest\n");
        let mut buf = [0u8; 21];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello from the guest\n");
        assert_eq!(
            rig.counters.rx_bytes.load(Ordering::Relaxed),
            data.len() as u64
        );
        rig.worker.shutdown();
    });
}

#[test]
fn socket_output_without_a_client_is_dropped_and_a_new_client_gets_what_follows() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let (_dir, path, dev) = socket_console();
    let mut rig = start(&ram, Kind::IoUring, QueueFormat::Split, dev);
    rig.write(b"nobody hears this");
    assert_eq!(rig.counters.tx_dropped.load(Ordering::Relaxed), 17);
    let host = UnixStream::connect(&path).unwrap();
    // A second client is refused while the first is attached.
    let mut second = UnixStream::connect(&path).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(second.read(&mut b).unwrap_or(0), 0, "closed");
    // The first goes away; the next one is the terminal.
    drop(host);
    std::thread::sleep(Duration::from_millis(50));
    rig.write(b"x"); // lets the device notice the hangup if it has not yet
    let mut third = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    rig.write(b"third\n");
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 6];
    third.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"third\n");
    rig.post(4, 64);
    third.write_all(b"in").unwrap();
    assert_eq!(rig.read(2, 5000), b"in");
    rig.worker.shutdown();
}

#[test]
fn a_reader_that_stops_loses_output_beyond_the_bound_but_the_guest_never_waits() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let (_dir, path, dev) = socket_console();
    let mut rig = start(&ram, Kind::Epoll, QueueFormat::Split, dev);
    let host = UnixStream::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let chunk = vec![b'o'; 4096];
    // Far more than the socket and the device's bound hold; every chain still comes back.
    for _ in 0..400 {
        rig.write(&chunk);
    }
    let dropped = rig.counters.tx_dropped.load(Ordering::Relaxed);
    assert!(dropped > 0, "nothing dropped");
    let written = rig.counters.tx_bytes.load(Ordering::Relaxed);
    assert!(
        written + dropped <= 400 * 4096,
        "{written} + {dropped} bytes"
    );
    drop(host);
    rig.worker.shutdown();
}

#[test]
fn pty_mode_carries_input_and_output_through_the_terminal() {
    each_setup(|kind, format| {
        let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
        let dev = VirtioConsole::new("virtio-console0", &ConsoleMode::Pty, None).unwrap();
        let path = dev.pty().unwrap().to_path_buf();
        assert!(path.starts_with("/dev/pts"), "{}", path.display());
        let mut rig = start(&ram, kind, format, dev);
        let mut term = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        rig.write(b"login: ");
        let mut buf = [0u8; 7];
        term.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"login: ");
        rig.post(4, 64);
        term.write_all(b"root\r").unwrap();
        assert_eq!(
            rig.read(5, 5000),
            b"root\r",
            "{kind:?} {format:?}: raw mode"
        );
        rig.worker.shutdown();
    });
}

#[test]
fn file_mode_appends_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.log");
    std::fs::write(&p, b"before\n").unwrap();
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let dev = VirtioConsole::new("virtio-console0", &ConsoleMode::File(p.clone()), None).unwrap();
    let mut rig = start(&ram, Kind::IoUring, QueueFormat::Packed, dev);
    rig.write(b"guest line\n");
    rig.worker.shutdown();
    assert_eq!(std::fs::read(&p).unwrap(), b"before\nguest line\n");
}

#[test]
fn the_socket_file_goes_with_the_device_and_bad_paths_are_refused() {
    let (_dir, path, dev) = socket_console();
    assert!(path.exists());
    assert!(matches!(
        VirtioConsole::new("c", &ConsoleMode::Socket(path.clone()), None),
        Err(ConsoleError::Io { .. })
    ));
    drop(dev);
    assert!(!path.exists());
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    for (mode, want) in [
        (ConsoleMode::Socket(plain.clone()), "not a socket"),
        (
            ConsoleMode::Socket(dir.path().join("no/dir/s")),
            "directory",
        ),
        (
            ConsoleMode::File(dir.path().to_path_buf()),
            "not a regular file",
        ),
        (ConsoleMode::File(dir.path().join("no/dir/f")), "directory"),
    ] {
        let e = validate(&mode).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
}

#[test]
fn the_escape_sequence_quits_and_doubled_escapes_pass_one_through() {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = events.clone();
    let sink: EventSink = Arc::new(move |e| log.lock().unwrap().push(e));
    let mut dev = VirtioConsole::new("c", &ConsoleMode::Stdio, Some(sink)).unwrap();
    dev.buf = vec![b'a', ESCAPE, ESCAPE, b'b', ESCAPE, b'c', ESCAPE];
    let n = dev.escape_filter(7);
    assert_eq!(&dev.buf[..n], &[b'a', ESCAPE, b'b', ESCAPE, b'c']);
    assert!(events.lock().unwrap().is_empty());
    // The carried escape and then `x`.
    dev.buf = vec![b'x', b'y'];
    let n = dev.escape_filter(2);
    assert_eq!(n, 0);
    assert_eq!(*events.lock().unwrap(), vec![VmEvent::UserQuit]);
}
