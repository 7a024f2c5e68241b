use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::*;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const THR: u64 = 0;
const RBR: u64 = 0;
const IER: u64 = 1;
const LSR: u64 = 5;

#[test]
fn guest_output_reaches_the_writer_and_raises_the_interrupt_when_enabled() {
    let out = Shared::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let s = Serial::new("serial0", irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
    s.write(IER, &[0x02]); // THR empty interrupt
    for b in b"hi\n" {
        s.write(THR, &[*b]);
    }
    assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    assert!(irq.read().unwrap() >= 1);
}

fn read_all(s: &Serial, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        if lsr[0] & 1 != 0 {
            let mut b = [0u8];
            s.read(RBR, &mut b);
            got.push(b[0]);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    got
}

#[test]
fn input_larger_than_the_fifo_arrives_whole_and_in_order() {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let s = Arc::new(Serial::new("serial0", irq, Box::new(std::io::sink())).unwrap());
    let (mut tx, rx) = UnixStream::pair().unwrap();
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let sink: EventSink = Arc::new(|_| {});
    let h = s.spawn_input(rx, false, sink, stop.clone()).unwrap();
    let msg: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    tx.write_all(&msg).unwrap();
    let got = read_all(&s, msg.len());
    assert_eq!(got, msg);
    stop.write(1).unwrap();
    h.join().unwrap();
}

#[test]
fn escape_x_quits_and_double_escape_sends_one() {
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let s = Arc::new(Serial::new("serial0", irq, Box::new(std::io::sink())).unwrap());
    let (mut tx, rx) = UnixStream::pair().unwrap();
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let sink: EventSink = Arc::new(move |e| log.lock().unwrap().push(e));
    let h = s.spawn_input(rx, true, sink, stop).unwrap();
    tx.write_all(&[b'a', ESCAPE, ESCAPE, b'b', ESCAPE, b'x'])
        .unwrap();
    h.join().unwrap();
    assert_eq!(read_all(&s, 3), vec![b'a', ESCAPE, b'b']);
    assert_eq!(*events.lock().unwrap(), vec![VmEvent::UserQuit]);
}
