//! The virtio-vsock tests of `cargo xtask e2e`: the guest kit's vsock tests (crates/guest-kit/
//! src/vsock.rs) against host services this process runs on the VM's Unix sockets:
//!
//! - `<uds>_1000`: an echo server (one thread per connection);
//! - `<uds>_3000`: a slow reader (about 1 MB/s) that checks every byte and samples the VMM's
//!   resident memory while the guest is throttled;
//! - `<uds>_4000`: reads 10 KiB and closes mid-stream;
//! - a client that connects to `<uds>`, writes `CONNECT 2000`, sends 256 KiB, reads 256 KiB
//!   back and closes — built in, or the Debian `socat` (a host program written for Firecracker's
//!   convention, not by us).
//!
//! Every stream carries the kit's pattern (byte i = i mod 251) and both ends check each byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The guest's CID in the tests.
pub const CID: u64 = 3;
/// The kit's tests, in the order one VM runs them.
pub const TESTS: [&str; 6] = [
    "vsock-echo",
    "vsock-many",
    "vsock-hostile",
    "vsock-stall",
    "vsock-close",
    "vsock-listen",
];
const LISTEN_BYTES: usize = 256 << 10;
const SLOW_BYTES: usize = 2 << 20;
/// How much the VMM's RSS may grow while the guest is throttled by a slow reader.
const MAX_STALL_GROWTH_KIB: u64 = 2048;

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn check_pattern(data: &[u8], at: usize) -> Result<()> {
    if let Some(k) = (0..data.len()).find(|&k| data[k] != pattern(at + k)) {
        bail!("byte {} differs", at + k);
    }
    Ok(())
}

fn pattern_bytes(n: usize) -> Vec<u8> {
    (0..n).map(pattern).collect()
}

/// What the host services saw; errors end the case.
#[derive(Default)]
struct Report {
    errors: Vec<String>,
    stall_growth_kib: Option<u64>,
    listen_done: bool,
}

type Shared = Arc<Mutex<Report>>;

fn note_err(r: &Shared, e: impl std::fmt::Display) {
    r.lock().unwrap().errors.push(e.to_string());
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Accepts connections on `path` until the listener is dropped with the process; each is
/// served on its own thread by `serve`.
fn serve(path: PathBuf, report: Shared, serve: fn(UnixStream, &Shared, u32), pid: u32) {
    let l = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => return note_err(&report, format!("bind {}: {e}", path.display())),
    };
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { break };
            let r = report.clone();
            std::thread::spawn(move || serve(s, &r, pid));
        }
    });
}

fn echo(mut s: UnixStream, _: &Shared, _: u32) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn slow(mut s: UnixStream, r: &Shared, pid: u32) {
    let before = rss_kib(pid);
    let mut peak = before;
    let mut got = 0usize;
    let mut buf = vec![0u8; 4096];
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    while got < SLOW_BYTES {
        std::thread::sleep(Duration::from_millis(4));
        let n = match s.read(&mut buf) {
            Ok(0) => return note_err(r, format!("slow reader: EOF after {got} bytes")),
            Ok(n) => n,
            Err(e) => return note_err(r, format!("slow reader: {e} after {got} bytes")),
        };
        if let Err(e) = check_pattern(&buf[..n], got) {
            return note_err(r, format!("slow reader: {e}"));
        }
        got += n;
        peak = peak.max(rss_kib(pid));
    }
    if let (Some(b), Some(p)) = (before, peak) {
        r.lock().unwrap().stall_growth_kib = Some(p.saturating_sub(b));
    }
    // Closing tells the guest the data is in.
}

fn closer(mut s: UnixStream, _: &Shared, _: u32) {
    let mut buf = vec![0u8; 10 << 10];
    let _ = s.read_exact(&mut buf);
}

/// Runs `attempt` until it succeeds (`Ok(true)`: the listen test is done), fails, or the
/// deadline passes; `Ok(false)` means the kit was not listening yet.
fn retry(r: &Shared, deadline: Instant, who: &str, attempt: impl Fn() -> Result<bool>) {
    while Instant::now() < deadline {
        match attempt() {
            Ok(true) => {
                r.lock().unwrap().listen_done = true;
                return;
            }
            Ok(false) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return note_err(r, format!("{who}: {e:#}")),
        }
    }
    note_err(r, format!("{who}: the kit never accepted"));
}

/// The built-in `CONNECT 2000` client: retries until the kit listens, then checks 256 KiB
/// each way.
fn listen_client(uds: PathBuf, r: Shared, deadline: Instant) {
    let attempt = || -> Result<bool> {
        // The VMM may not have created its socket yet.
        let Ok(mut s) = UnixStream::connect(&uds) else {
            return Ok(false);
        };
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"CONNECT 2000\n")?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            // The kit is not listening yet: the device closed the socket.
            return Ok(false);
        }
        if !line.starts_with("OK ") {
            bail!("CONNECT answered {line:?}");
        }
        s.write_all(&pattern_bytes(LISTEN_BYTES))?;
        let mut back = vec![0u8; LISTEN_BYTES];
        reader.read_exact(&mut back)?;
        check_pattern(&back, 0)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        Ok(true)
    };
    retry(&r, deadline, "CONNECT client", attempt);
}

/// The same with `socat - UNIX-CONNECT:<uds>` speaking for the host.
fn socat_client(uds: PathBuf, r: Shared, deadline: Instant) {
    let attempt = || -> Result<bool> {
        if UnixStream::connect(&uds).is_err() {
            return Ok(false);
        }
        let mut child = Command::new("socat")
            .arg("-")
            .arg(format!("UNIX-CONNECT:{}", uds.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting socat")?;
        let mut input = child.stdin.take().context("socat stdin")?;
        let mut out = BufReader::new(child.stdout.take().context("socat stdout")?);
        input.write_all(b"CONNECT 2000\n")?;
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            drop(input);
            let _ = child.wait();
            return Ok(false);
        }
        if !line.starts_with("OK ") {
            let _ = child.kill();
            bail!("socat: CONNECT answered {line:?}");
        }
        input.write_all(&pattern_bytes(LISTEN_BYTES))?;
        let mut back = vec![0u8; LISTEN_BYTES];
        out.read_exact(&mut back)?;
        check_pattern(&back, 0)?;
        drop(input);
        let _ = child.wait();
        Ok(true)
    };
    retry(&r, deadline, "socat", attempt);
}

/// One VM running `tests` with `backend` and `ring`; `socat` drives the listen test.
pub struct VsockCase {
    /// Name for the report.
    pub name: String,
    tests: Vec<&'static str>,
    ring: &'static str,
    backend: &'static str,
    socat: bool,
}

/// The cases: every test on each backend and ring format, and the listen test driven by socat.
pub fn cases() -> Vec<VsockCase> {
    let mut v = Vec::new();
    for backend in ["io_uring", "epoll"] {
        for ring in ["split", "packed"] {
            v.push(VsockCase {
                name: format!("vsock/{backend}/{ring}"),
                tests: TESTS.to_vec(),
                ring,
                backend,
                socat: false,
            });
        }
    }
    v.push(VsockCase {
        name: "vsock-listen/socat".into(),
        tests: vec!["vsock-listen"],
        ring: "split",
        backend: "io_uring",
        socat: true,
    });
    v
}

/// Whether socat is installed (CI installs it).
pub fn socat_available() -> bool {
    Command::new("socat")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Boots the kit with a vsock device and the host services; Ok if every test passes, the
/// services saw no error, memory stayed flat, and the socket file is gone afterwards.
pub fn run_case(alioth: &Path, kit: &Path, case: &VsockCase) -> Result<()> {
    let dir = tempfile_dir(&case.name)?;
    let r = run_in(alioth, kit, &dir, case);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run_in(alioth: &Path, kit: &Path, dir: &Path, case: &VsockCase) -> Result<()> {
    let uds = dir.join("v.sock");
    let report: Shared = Arc::default();
    let child = crate::e2e::kit_boot_args(&mut Command::new(alioth), kit, "128M")
        .arg("--cmdline")
        .arg(format!(
            "kit.test={} kit.ring={}",
            case.tests.join(","),
            case.ring
        ))
        .arg("--vsock")
        .arg(format!(
            "cid={CID},uds={},backend={}",
            uds.display(),
            case.backend
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let pid = child.id();
    let sub = |port: u32| PathBuf::from(format!("{}_{port}", uds.display()));
    serve(sub(1000), report.clone(), echo, pid);
    serve(sub(3000), report.clone(), slow, pid);
    serve(sub(4000), report.clone(), closer, pid);
    let deadline = Instant::now() + Duration::from_secs(150);
    if case.tests.contains(&"vsock-listen") {
        let (u, r) = (uds.clone(), report.clone());
        if case.socat {
            std::thread::spawn(move || socat_client(u, r, deadline));
        } else {
            std::thread::spawn(move || listen_client(u, r, deadline));
        }
    }
    let (status, out, err) = crate::e2e::finish(child, deadline)?;
    let host = report.lock().unwrap().errors.join("; ");
    let fail = |why: String| -> Result<()> {
        bail!("{why}\n--- host side ---\n{host}\n--- serial ---\n{out}--- stderr ---\n{err}")
    };
    for t in &case.tests {
        let want = format!("ALIOTH-KIT result {t} pass");
        if !out.lines().any(|l| l.starts_with(&want)) {
            return fail(format!("{t} did not pass"));
        }
    }
    if status.code() != Some(0) {
        return fail(format!("exit {status}"));
    }
    let r = report.lock().unwrap();
    if !r.errors.is_empty() {
        return fail(format!("host side: {}", r.errors.join("; ")));
    }
    if case.tests.contains(&"vsock-listen") && !r.listen_done {
        return fail("the CONNECT client did not finish".into());
    }
    if case.tests.contains(&"vsock-stall") {
        match r.stall_growth_kib {
            Some(g) if g <= MAX_STALL_GROWTH_KIB => {}
            Some(g) => {
                return fail(format!(
                    "the VMM grew {g} KiB while the guest was throttled (at most {MAX_STALL_GROWTH_KIB})"
                ));
            }
            None => return fail("the slow reader did not finish".into()),
        }
    }
    if uds.exists() {
        return fail(format!("{} is left behind", uds.display()));
    }
    Ok(())
}

/// A fresh directory for one case, under the system's temporary directory: Unix socket paths
/// are limited to 107 bytes, which a deep checkout's target/ could exceed.
fn tempfile_dir(name: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "alioth-vs-{}-{}",
        std::process::id(),
        name.replace('/', "-")
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Host throughput of a plain Unix stream socket pair: one thread writes 64 KiB chunks for
/// `secs`, this one reads; bytes per second.
fn host_uds_baseline(secs: u64) -> Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let writer = std::thread::spawn(move || {
        let buf = vec![0x5au8; 64 << 10];
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if a.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match b.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    let t = start.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    Ok(total as f64 / t)
}

/// One guest stream: `tx` (guest -> host sink) or `rx` (host source -> guest) for `secs` on
/// `backend`; bytes per second as the host measured them (first byte to the guest's close).
fn guest_stream(alioth: &Path, kit: &Path, backend: &str, tx: bool, secs: u64) -> Result<f64> {
    let dir = tempfile_dir(&format!("bench-{backend}-{tx}"))?;
    let uds = dir.join("v.sock");
    let port = if tx { 5000 } else { 5001 };
    let l = UnixListener::bind(format!("{}_{port}", uds.display()))?;
    let child = crate::e2e::kit_boot_args(&mut Command::new(alioth), kit, "128M")
        .arg("--cmdline")
        .arg(format!(
            "kit.test=vsock-bench kit.bench={},secs={secs}",
            if tx { "tx" } else { "rx" }
        ))
        .arg("--vsock")
        .arg(format!("cid={CID},uds={},backend={backend}", uds.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let server = std::thread::spawn(move || -> Result<(u64, f64)> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        let mut start = None;
        if tx {
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => {
                        start.get_or_insert_with(Instant::now);
                        total += n as u64;
                    }
                }
            }
        } else {
            start = Some(Instant::now());
            while let Ok(n) = s.write(&buf) {
                total += n as u64;
            }
        }
        let t = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        Ok((total, t))
    });
    let finished = crate::e2e::finish(child, Instant::now() + Duration::from_secs(secs + 60));
    let _ = std::fs::remove_dir_all(&dir);
    let (status, out, err) = finished?;
    if status.code() != Some(0) || !out.contains("ALIOTH-KIT result vsock-bench pass") {
        bail!("the kit's bench failed (exit {status}):\n{out}{err}");
    }
    let (host_bytes, t) = server
        .join()
        .map_err(|_| anyhow::anyhow!("the host side panicked"))??;
    // The guest's own count (what it sent, or what arrived) over its own clock.
    let kit = out
        .lines()
        .find_map(|l| l.strip_prefix("ALIOTH-KIT vsock-bench "))
        .and_then(|l| {
            let mut it = l
                .split_whitespace()
                .map(|w| w.split_once('=').map(|(_, v)| v));
            let bytes: f64 = it.next()??.parse().ok()?;
            let ns: f64 = it.next()??.parse().ok()?;
            Some(bytes / (ns / 1e9))
        });
    let host_rate = if t > 0.0 { host_bytes as f64 / t } else { 0.0 };
    // The host's view includes connection set-up and teardown; for tx it is the bytes that
    // arrived, for rx the kit's count is what arrived.
    Ok(if tx {
        host_rate
    } else {
        kit.unwrap_or(host_rate)
    })
}

/// `cargo xtask bench vsock [--secs N]`: guest -> host and host -> guest stream throughput on
/// both backends vs a plain Unix socket pair on the host, as ratios, measured in this run.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    let secs = crate::secs_arg(args);
    let kit = crate::e2e::build_kit(root)?;
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "release").join("alioth");
    let base = host_uds_baseline(secs)?;
    println!(
        "\nvirtio-vsock stream throughput, {secs} s per run, 64 KiB packets (the guest kit \
         polls, one connection); baseline: a Unix stream socket pair on the host, 64 KiB writes"
    );
    println!(
        "{:<10} {:<14} {:>12} {:>12} {:>7}",
        "backend", "direction", "guest MB/s", "host MB/s", "ratio"
    );
    for (tx, label) in [(true, "guest->host"), (false, "host->guest")] {
        for backend in ["io_uring", "epoll"] {
            let rate = guest_stream(&alioth, &kit, backend, tx, secs)?;
            println!(
                "{backend:<10} {label:<14} {:>12.0} {:>12.0} {:>7.2}",
                rate / 1e6,
                base / 1e6,
                rate / base
            );
        }
    }
    Ok(())
}
