//! `uml-io`: the I/O program of the User-Mode Linux test guest (`cargo xtask uml`), linked
//! statically so it runs from a busybox initramfs.
//!
//! - `uml-io verify DEV OPS QD`: QD threads write OPS distinct random 4 KiB blocks with O_DIRECT,
//!   each block stamped with its number, then read every block back and compare. Prints
//!   `UML-IO verify pass ops=N` or `UML-IO verify fail ...`.
//! - `uml-io randread DEV SECS QD`: 4 KiB O_DIRECT random reads for SECS seconds with QD of
//!   them always in flight (Linux AIO from one thread). Prints
//!   `UML-IO randread qd=N ops=N secs=S iops=N`.
//! - `uml-io zeroout DEV OFFSET LEN`: the BLKZEROOUT ioctl (busybox's blkdiscard has no `-z`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: usize = 4096;

/// A 4 KiB buffer aligned for O_DIRECT.
struct Block(*mut u8);

impl Block {
    fn new() -> Block {
        let layout = std::alloc::Layout::from_size_align(BS, BS).expect("a valid layout");
        // SAFETY: a non-zero-sized layout.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "out of memory");
        Block(p)
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: BS bytes owned by this block.
        unsafe { std::slice::from_raw_parts_mut(self.0, BS) }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(BS, BS).expect("a valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.0, layout) };
    }
}

fn open(dev: &str, write: bool) -> std::io::Result<OwnedFd> {
    let path = std::ffi::CString::new(dev).map_err(std::io::Error::other)?;
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), mode | libc::O_DIRECT | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn blocks(fd: &OwnedFd) -> std::io::Result<u64> {
    // SAFETY: lseek on our descriptor.
    let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64 / BS as u64)
}

fn pio(fd: &OwnedFd, b: &mut Block, block: u64, write: bool) -> std::io::Result<()> {
    let off = (block * BS as u64) as libc::off_t;
    // SAFETY: the buffer is BS bytes and ours for the call.
    let n = unsafe {
        if write {
            libc::pwrite(fd.as_raw_fd(), b.0.cast(), BS, off)
        } else {
            libc::pread(fd.as_raw_fd(), b.0.cast(), BS, off)
        }
    };
    match n {
        n if n == BS as isize => Ok(()),
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n => Err(std::io::Error::other(format!("short transfer: {n} bytes"))),
    }
}

/// xorshift64*: a fast, seedable generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn stamp(b: &mut Block, block: u64) {
    for (i, w) in b.bytes().chunks_mut(8).enumerate() {
        w.copy_from_slice(&(block ^ ((i as u64) << 48)).to_le_bytes());
    }
}

fn verify(dev: &str, ops: u64, qd: u64) -> Result<String, String> {
    let fd = Arc::new(open(dev, true).map_err(|e| format!("open {dev}: {e}"))?);
    let total = blocks(&fd).map_err(|e| e.to_string())?;
    if total < ops {
        return Err(format!("{dev} has {total} blocks, fewer than {ops}"));
    }
    // Distinct blocks: a stride coprime with the device size from a random start.
    let stride = (1..)
        .map(|k| total / 2 + k)
        .find(|s| gcd(*s, total) == 1)
        .unwrap_or(1);
    let start = Rng(0x9e37_79b9_7f4a_7c15 ^ total).next() % total;
    let pick = move |i: u64| (start + i * stride) % total;
    let run = |write: bool| -> Result<(), String> {
        let threads: Vec<_> = (0..qd)
            .map(|t| {
                let fd = fd.clone();
                std::thread::spawn(move || -> Result<(), String> {
                    let mut b = Block::new();
                    for i in (t..ops).step_by(qd as usize) {
                        let blk = pick(i);
                        if write {
                            stamp(&mut b, blk);
                            pio(&fd, &mut b, blk, true).map_err(|e| format!("write {blk}: {e}"))?;
                        } else {
                            pio(&fd, &mut b, blk, false).map_err(|e| format!("read {blk}: {e}"))?;
                            let mut want = Block::new();
                            stamp(&mut want, blk);
                            if b.bytes() != want.bytes() {
                                return Err(format!("block {blk} reads back wrong"));
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join().map_err(|_| "a thread panicked".to_string())??;
        }
        Ok(())
    };
    run(true)?;
    // SAFETY: fsync on our descriptor.
    if unsafe { libc::fsync(fd.as_raw_fd()) } < 0 {
        return Err(format!("fsync: {}", std::io::Error::last_os_error()));
    }
    run(false)?;
    Ok(format!("UML-IO verify pass ops={ops} qd={qd}"))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Linux AIO's `struct iocb` (x86-64, little endian).
#[repr(C)]
#[derive(Default)]
struct IoCb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// Linux AIO's `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_PREAD: u16 = 0;

/// QD 4 KiB O_DIRECT random reads kept in flight with Linux AIO from one thread, so the
/// driver's ring holds QD requests at once.
fn randread(dev: &str, secs: u64, qd: u64) -> Result<String, String> {
    let fd = open(dev, false).map_err(|e| format!("open {dev}: {e}"))?;
    let total = blocks(&fd).map_err(|e| e.to_string())?;
    if total == 0 {
        return Err(format!("{dev} is empty"));
    }
    let n = qd as usize;
    let mut ctx: libc::c_ulong = 0;
    // SAFETY: io_setup writes the context id into `ctx`.
    if unsafe { libc::syscall(libc::SYS_io_setup, n as libc::c_long, &mut ctx) } < 0 {
        return Err(format!("io_setup: {}", std::io::Error::last_os_error()));
    }
    let mut bufs: Vec<Block> = (0..n).map(|_| Block::new()).collect();
    let mut cbs: Vec<IoCb> = (0..n).map(|_| IoCb::default()).collect();
    let mut rng = Rng(0x1234_5678 ^ total);
    let mut submit = |i: usize, cbs: &mut [IoCb], bufs: &mut [Block]| -> Result<(), String> {
        cbs[i] = IoCb {
            data: i as u64,
            opcode: IOCB_CMD_PREAD,
            fildes: fd.as_raw_fd() as u32,
            buf: bufs[i].0 as u64,
            nbytes: BS as u64,
            offset: ((rng.next() % total) * BS as u64) as i64,
            ..Default::default()
        };
        let mut p: *mut IoCb = &mut cbs[i];
        // SAFETY: one valid iocb whose buffer stays allocated until its event is reaped.
        let r = unsafe { libc::syscall(libc::SYS_io_submit, ctx, 1 as libc::c_long, &mut p) };
        if r != 1 {
            return Err(format!("io_submit: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs(secs);
    for i in 0..n {
        submit(i, &mut cbs, &mut bufs)?;
    }
    let mut ops = 0u64;
    let mut in_flight = n;
    let mut events = vec![IoEvent::default(); n];
    let mut failure = None;
    while in_flight > 0 {
        // SAFETY: `events` has room for `n` events; no timeout.
        let got = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                ctx,
                1 as libc::c_long,
                n as libc::c_long,
                events.as_mut_ptr(),
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            failure = Some(format!("io_getevents: {e}"));
            break;
        }
        let running = Instant::now() < deadline && failure.is_none();
        for ev in &events[..got as usize] {
            in_flight -= 1;
            if ev.res != BS as i64 {
                failure.get_or_insert(format!("read returned {}", ev.res));
                continue;
            }
            ops += 1;
            if running {
                submit(ev.data as usize, &mut cbs, &mut bufs)?;
                in_flight += 1;
            }
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    // SAFETY: destroys the context created above; nothing is in flight.
    unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
    if let Some(f) = failure {
        return Err(f);
    }
    Ok(format!(
        "UML-IO randread qd={qd} ops={ops} secs={elapsed:.2} iops={}",
        (ops as f64 / elapsed) as u64
    ))
}

/// BLKZEROOUT: the kernel zeroes a byte range of a block device, with WRITE_ZEROES requests
/// where the device offers them.
fn zeroout(dev: &str, offset: u64, len: u64) -> Result<String, String> {
    const BLKZEROOUT: libc::c_ulong = 0x127f; // _IO(0x12, 127)
    let fd = open(dev, true).map_err(|e| format!("open {dev}: {e}"))?;
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64s from the pointer, which `range` provides.
    if unsafe { libc::ioctl(fd.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } < 0 {
        return Err(format!("BLKZEROOUT: {}", std::io::Error::last_os_error()));
    }
    Ok(format!("UML-IO zeroout pass offset={offset} len={len}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| {
        args.get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|n| *n > 0)
    };
    let result = match (
        args.first().map(String::as_str),
        args.get(1),
        num(2),
        num(3),
    ) {
        (Some("verify"), Some(dev), Some(ops), Some(qd)) => verify(dev, ops, qd),
        (Some("randread"), Some(dev), Some(secs), Some(qd)) => randread(dev, secs, qd),
        (Some("zeroout"), Some(dev), Some(off), Some(len)) => zeroout(dev, off, len),
        _ => {
            eprintln!(
                "usage: uml-io verify DEV OPS QD | uml-io randread DEV SECS QD | uml-io zeroout DEV OFFSET LEN"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("UML-IO {} fail {e}", args[0]);
            ExitCode::FAILURE
        }
    }
}
