//! The virtio-net tests of `cargo xtask e2e`: the guest kit's responder behind a tap, in a
//! network namespace the test creates and deletes, with the host side (ping and UDP) run inside
//! that namespace by this binary (`xtask net-peer ...`).
//!
//! Only the namespace is touched: it gets a loopback, one multi-queue tap `kt0` with
//! 192.0.2.1/24 (TEST-NET-1, RFC 5737) and no route beyond that subnet; the guest kit is
//! 192.0.2.2. Deleting the namespace removes the tap.

use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The host's address in the namespace.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The guest kit's address.
pub const KIT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The guest's MAC address.
pub const KIT_MAC: &str = "02:00:00:00:00:02";
/// The tap's name inside the namespace.
pub const TAP: &str = "kt0";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a configured tap, deleted when dropped.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// Creates the namespace and a multi-queue tap in it.
    pub fn new() -> Result<NetNs> {
        let name = format!(
            "alioth-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            n,
            "tuntap",
            "add",
            "dev",
            TAP,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ])?;
        ip(&["-n", n, "addr", "add", "192.0.2.1/24", "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A static neighbour entry for the kit's address, so that the host sends to it without
    /// ARP (the benches' baselines have no one to answer).
    pub fn pin_kit_neighbor(&self) -> Result<()> {
        let kit = KIT_IP.to_string();
        ip(&[
            "-n", &self.name, "neigh", "add", &kit, "lladdr", KIT_MAC, "dev", TAP,
        ])
    }

    /// `alioth boot` of the guest kit (128 MiB, exit device), inside the namespace; the caller
    /// adds the command line and the devices.
    pub fn boot_kit(&self, alioth: &Path, kit: &Path) -> Command {
        let mut c = self.exec(alioth);
        crate::e2e::kit_boot_args(&mut c, kit, "128M");
        c
    }

    /// `cmd` run inside the namespace.
    pub fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// Why the net tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces and taps need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    for (tool, pkg) in [("ip", "iproute2"), ("ping", "iputils-ping")] {
        if Command::new(tool)
            .arg("-V")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Some(format!("`{tool}` is missing (Debian package {pkg})"));
        }
    }
    None
}

/// A net e2e case: the kit test, options for `--net`, kit command-line extras, and the peer
/// script (`None`: the kit needs no peer).
pub struct NetCase {
    /// Case name.
    pub name: String,
    /// `kit.test=`.
    pub test: &'static str,
    /// `split` or `packed`.
    pub ring: &'static str,
    /// Extra `--net` options (after `tap=kt0,mac=...`).
    pub net_opts: String,
    /// Extra kit parameters.
    pub kit_args: String,
    /// `xtask net-peer` steps, run once the kit says it is ready.
    pub peer: Option<&'static str>,
}

/// Boots the kit in a fresh namespace and runs the peer; Ok if the kit passes and the peer
/// succeeds.
pub fn run_case(alioth: &Path, kit: &Path, xtask: &Path, case: &NetCase) -> Result<()> {
    let ns = NetNs::new()?;
    let mut child = ns
        .boot_kit(alioth, kit)
        .arg("--cmdline")
        .arg(format!(
            "kit.test={} kit.ring={} kit.secs=60 {}",
            case.test, case.ring, case.kit_args
        ))
        .arg("--net")
        .arg(format!("tap={TAP},mac={KIT_MAC}{}", case.net_opts))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth in the namespace")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut serial = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut peer_result: Option<Result<String>> = None;
    let verdict = format!("ALIOTH-KIT result {} ", case.test);
    let mut result_line = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = child.kill();
            bail!("timed out\n--- serial ---\n{serial}");
        }
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => break,
        };
        serial.push_str(&line);
        serial.push('\n');
        if line.starts_with("ALIOTH-KIT net ready")
            && let Some(steps) = case.peer
        {
            {
                let out = ns
                    .exec(xtask)
                    .args(["net-peer", steps])
                    .stdin(Stdio::null())
                    .output()
                    .context("running the peer")?;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                peer_result = Some(if out.status.success() {
                    Ok(text)
                } else {
                    Err(anyhow::anyhow!("the peer failed:\n{text}"))
                });
            }
        }
        if line.starts_with(&verdict) {
            result_line = Some(line);
        }
    }
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    if let Some(Err(e)) = peer_result {
        bail!("{e:#}\n--- serial ---\n{serial}--- stderr ---\n{err}");
    }
    let passed = result_line
        .as_deref()
        .is_some_and(|l| l.starts_with(&format!("{verdict}pass")));
    if !passed || status.code() != Some(0) {
        bail!("exit {status}\n--- serial ---\n{serial}--- stderr ---\n{err}");
    }
    Ok(())
}

/// The net cases for one backend and ring format.
pub fn cases(backend: &str, ring: &'static str) -> Vec<NetCase> {
    let net_opts = format!(",backend={backend}");
    let case = |name: &str, test, kit_args: &str, queues, peer| NetCase {
        name: format!("{name}/{backend}/{ring}"),
        test,
        ring,
        net_opts: if queues > 1 {
            format!("{net_opts},queues={queues}")
        } else {
            net_opts.clone()
        },
        kit_args: kit_args.to_string(),
        peer,
    };
    vec![
        case("net-arp-icmp", "net", "", 1, Some("ping,stop")),
        case("net-udp", "net", "", 1, Some("echo,recv,stop")),
        case(
            "net-udp-csum-offload",
            "net",
            "kit.csum=on",
            1,
            Some("echo,recv,stop"),
        ),
        case("net-mq", "net-mq", "", 2, Some("flows,stop")),
        case(
            "net-rx-starve",
            "net-starve",
            "",
            1,
            Some("flood,recover,stop"),
        ),
        case("net-hostile-rx", "net-hostile-rx", "", 1, None),
        case("net-hostile-tx", "net-hostile-tx", "", 1, None),
    ]
}

/// `xtask net-peer STEPS`: the host side, run inside the namespace. Steps, comma-separated:
/// `ping` (20 echo requests with a pattern, all answered), `echo` (UDP echo of sizes up to the
/// MTU, payloads compared), `recv` (the kit sends 100 datagrams of 64 and of 1472 bytes,
/// sequence and pattern checked), `flows` (64 source ports, so both queue pairs carry traffic),
/// `flood` (5000 datagrams as fast as the host can send), `recover` (echo works again), `stop`.
pub fn peer(steps: &str) -> Result<()> {
    let kit = SocketAddrV4::new(KIT_IP, 7);
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Room for every datagram the guest sends at once (the default would drop some of a burst
    // of 100 full-size datagrams: that is the host socket's limit, not the device's).
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt on our socket with a valid int option value.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let pattern = |size: usize, seed: u8| -> Vec<u8> {
        (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let mut buf = vec![0u8; 65536];
    for step in steps.split(',') {
        match step {
            "ping" => {
                let out = Command::new("ping")
                    .args([
                        "-c", "20", "-i", "0.01", "-W", "2", "-s", "200", "-p", "a5c3",
                    ])
                    .arg(KIT_IP.to_string())
                    .output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                if !text.contains("20 packets transmitted, 20 received")
                    || text.contains("wrong data")
                {
                    bail!("ping: {text}");
                }
                println!("ping: 20 of 20 answered, payloads intact");
            }
            "echo" => {
                for (i, size) in [1usize, 2, 18, 64, 100, 512, 999, 1000, 1471, 1472]
                    .into_iter()
                    .enumerate()
                {
                    let data = pattern(size, i as u8);
                    sock.send_to(&data, kit)?;
                    let (n, from) = sock
                        .recv_from(&mut buf)
                        .with_context(|| format!("no echo of {size} bytes"))?;
                    if from != std::net::SocketAddr::V4(kit) || buf[..n] != data[..] {
                        bail!("echo of {size} bytes came back as {n} bytes from {from}");
                    }
                }
                println!("echo: 10 sizes up to 1472 bytes, all intact");
            }
            "recv" => {
                let port = sock.local_addr()?.port();
                for size in [64usize, 1472] {
                    sock.send_to(
                        format!("send 100 {size} {port}").as_bytes(),
                        SocketAddrV4::new(KIT_IP, 5),
                    )?;
                    for seq in 0..100u32 {
                        let n = sock
                            .recv(&mut buf)
                            .with_context(|| format!("datagram {seq} of 100 ({size} bytes)"))?;
                        let want: Vec<u8> = seq
                            .to_le_bytes()
                            .into_iter()
                            .chain((0..size - 4).map(|i| (seq as u8).wrapping_add(i as u8)))
                            .collect();
                        if buf[..n] != want[..] {
                            bail!("datagram {seq} ({size} bytes) is wrong: {n} bytes");
                        }
                    }
                }
                println!("recv: 2 x 100 datagrams from the guest, in order and intact");
            }
            "flows" => {
                let socks: Vec<UdpSocket> = (0..64)
                    .map(|_| UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)))
                    .collect::<std::io::Result<_>>()?;
                for (i, s) in socks.iter().enumerate() {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    for j in 0..4u8 {
                        let data = pattern(200, i as u8 ^ j);
                        s.send_to(&data, kit)?;
                        let n = s.recv(&mut buf).with_context(|| format!("flow {i}"))?;
                        if buf[..n] != data[..] {
                            bail!("flow {i}: echo differs");
                        }
                    }
                }
                println!("flows: 64 flows x 4 echoes");
            }
            "flood" => {
                let data = pattern(1000, 7);
                let mut sent = 0;
                for _ in 0..5000 {
                    if sock.send_to(&data, SocketAddrV4::new(KIT_IP, 1234)).is_ok() {
                        sent += 1;
                    }
                }
                println!("flood: {sent} datagrams sent");
            }
            "recover" => {
                // The starved guest drains what the tap queued, then echoes again.
                let data = pattern(300, 3);
                let mut ok = 0;
                let until = Instant::now() + Duration::from_secs(30);
                while ok < 5 && Instant::now() < until {
                    sock.send_to(&data, kit)?;
                    if let Ok(n) = sock.recv(&mut buf)
                        && buf[..n] == data[..]
                    {
                        ok += 1;
                    }
                }
                if ok < 5 {
                    bail!("the guest answered {ok} of 5 echoes after the flood");
                }
                println!("recover: echoes work after the flood");
            }
            "stop" => {
                for _ in 0..10 {
                    sock.send_to(b"stop", SocketAddrV4::new(KIT_IP, 9))?;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            other => bail!("unknown peer step {other}"),
        }
    }
    Ok(())
}

/// The frame `net-bench` sends: broadcast, ethertype 0x88b5 (IEEE local experimental), `size`
/// bytes, after a zero virtio-net header.
fn bench_frame(size: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12 + size];
    f[12..18].fill(0xff);
    f[18..24].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[24..26].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// The tap's receive counter (frames written into the tap by whoever holds a queue).
fn tap_rx_packets() -> Result<u64> {
    let p = format!("/sys/class/net/{TAP}/statistics/rx_packets");
    Ok(std::fs::read_to_string(&p)
        .with_context(|| p.clone())?
        .trim()
        .parse()?)
}

/// Floods 192.0.2.2:9 with UDP datagrams making `size`-byte frames for `secs`.
fn flood(size: usize, secs: f64) -> Result<u64> {
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0))?;
    let data = vec![0x5au8; size.saturating_sub(42).max(1)];
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < until {
        for _ in 0..64 {
            if sock.send_to(&data, SocketAddrV4::new(KIT_IP, 9)).is_ok() {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

/// The host-only halves of `cargo xtask bench net`, run inside the namespace:
/// `bench-write SIZE SECS` writes frames into the tap as fast as one process can (the
/// guest-to-host baseline), `bench-read SIZE SECS` reads the tap while a second thread floods
/// it with UDP (the host-to-guest baseline), `bench-send SIZE SECS` only floods, `counter`
/// prints the tap's receive counter. Each prints `pps N`.
pub fn bench_peer(args: &[String]) -> Result<()> {
    use alioth_devices::tap::Tap;
    let num = |i: usize| -> Result<f64> {
        args.get(i)
            .context("missing argument")?
            .parse()
            .context("not a number")
    };
    match args.first().map(String::as_str) {
        Some("counter") => println!("{}", tap_rx_packets()?),
        Some("bench-send") => {
            flood(num(1)? as usize, num(2)?)?;
        }
        Some("bench-write") => {
            let (size, secs) = (num(1)? as usize, num(2)?);
            let tap = Tap::open(TAP, 1, false)?;
            let fd = tap.fd(0).context("tap queue")?;
            let frame = bench_frame(size);
            let c0 = tap_rx_packets()?;
            let t0 = Instant::now();
            while t0.elapsed().as_secs_f64() < secs {
                // SAFETY: `frame` is valid for its length; `fd` is the tap queue we hold.
                unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            }
            let secs = t0.elapsed().as_secs_f64();
            println!("pps {:.0}", (tap_rx_packets()? - c0) as f64 / secs);
        }
        Some("bench-read") => {
            let (size, secs) = (num(1)? as usize, num(2)?);
            let tap = Tap::open(TAP, 1, true)?;
            let fd = tap.fd(0).context("tap queue")?;
            let sender = std::thread::spawn(move || flood(size, secs + 0.5));
            std::thread::sleep(Duration::from_millis(100));
            let mut buf = vec![0u8; 65536];
            let (mut frames, t0) = (0u64, Instant::now());
            while t0.elapsed().as_secs_f64() < secs {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; `buf` is valid for its length.
                unsafe {
                    libc::poll(&mut p, 1, 100);
                    while libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {
                        frames += 1;
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let _ = sender.join();
            println!("pps {:.0}", frames as f64 / secs);
        }
        Some("uml-serve") => uml_serve(Path::new(args.get(1).context("a folder")?))?,
        _ => bail!(
            "usage: xtask net-peer bench-write|bench-read|bench-send SIZE SECS | counter | uml-serve DIR"
        ),
    }
    Ok(())
}

fn pps_of(out: &std::process::Output) -> Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("pps "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| {
            format!(
                "no rate from the peer: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// One in-guest run: the kit's `net-bench` in direction `dir` with `size`-byte frames, timed by
/// the host between the kit's window lines. Guest-to-host counts what the tap received;
/// host-to-guest what the kit received while the host flooded.
fn guest_pps(
    alioth: &Path,
    kit: &Path,
    xtask: &Path,
    backend: &str,
    dir: &str,
    size: usize,
    secs: u64,
) -> Result<f64> {
    let ns = NetNs::new()?;
    ns.pin_kit_neighbor()?;
    let mut child = ns
        .boot_kit(alioth, kit)
        .arg("--cmdline")
        .arg(format!(
            "kit.test=net-bench kit.bench={dir},size={size},secs={secs}"
        ))
        .arg("--net")
        .arg(format!(
            "tap={TAP},mac={KIT_MAC},backend={backend},queue_size=256"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (mut t0, mut t1, mut c0, mut c1, mut frames) = (None, None, 0u64, 0u64, None);
    let mut sender = None;
    let counter = || -> Result<u64> {
        let out = ns.exec(xtask).args(["net-peer", "counter"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        if line.starts_with("ALIOTH-KIT bench-window start") {
            t0 = Some(Instant::now());
            if dir == "tx" {
                c0 = counter()?;
            } else {
                sender = Some(
                    ns.exec(xtask)
                        .args(["net-peer", "bench-send", &size.to_string()])
                        .arg((secs + 1).to_string())
                        .stdout(Stdio::null())
                        .spawn()?,
                );
            }
        } else if line.starts_with("ALIOTH-KIT bench-window end") {
            t1 = Some(Instant::now());
            if dir == "tx" {
                c1 = counter()?;
            }
        } else if let Some(rest) = line.strip_prefix("ALIOTH-KIT bench net-") {
            frames = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("frames="))
                .and_then(|v| v.parse::<u64>().ok());
        }
    }
    let _ = child.wait();
    if let Some(mut s) = sender {
        let _ = s.wait();
    }
    let (Some(t0), Some(t1)) = (t0, t1) else {
        bail!("no bench window from the guest");
    };
    let secs = t1.duration_since(t0).as_secs_f64();
    let n = if dir == "tx" {
        c1.saturating_sub(c0)
    } else {
        frames.context("no frame count from the guest")?
    };
    Ok(n as f64 / secs)
}

/// `cargo xtask bench net [--secs N]`: virtio-net packet rates next to a host-only process on
/// the same tap, in a namespace of their own.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    if let Some(why) = unavailable() {
        bail!("bench net cannot run here: {why}");
    }
    let secs = crate::secs_arg(args);
    let kit = crate::e2e::build_kit(root)?;
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "release").join("alioth");
    let xtask = std::env::current_exe()?;
    println!(
        "\nvirtio-net frame rates, {secs} s per run, one queue pair of 256 entries; the guest kit \
         sends one notification per batch of returned buffers (no EVENT_IDX), the host-only \
         baseline is one process on the same tap (write loop, or read loop while a second \
         thread floods it with UDP)"
    );
    println!(
        "{:<10} {:<14} {:>6} {:>12} {:>10} {:>12} {:>7}",
        "backend", "direction", "frame", "guest pps", "Mbit/s", "host pps", "ratio"
    );
    for (dir, label) in [("tx", "guest->host"), ("rx", "host->guest")] {
        for size in [60usize, 1514] {
            let ns = NetNs::new()?;
            ns.pin_kit_neighbor()?;
            let peer = ns
                .exec(&xtask)
                .arg("net-peer")
                .arg(if dir == "tx" {
                    "bench-write"
                } else {
                    "bench-read"
                })
                .arg(size.to_string())
                .arg(secs.to_string())
                .output()?;
            drop(ns);
            let base = pps_of(&peer)?;
            for backend in ["io_uring", "epoll"] {
                let pps = guest_pps(&alioth, &kit, &xtask, backend, dir, size, secs)?;
                println!(
                    "{backend:<10} {label:<14} {size:>6} {pps:>12.0} {:>10.1} {base:>12.0} {:>7.2}",
                    pps * size as f64 * 8.0 / 1e6,
                    pps / base
                );
            }
        }
    }
    Ok(())
}

/// The host side of the UML net check: on 192.0.2.1, port 7000 sends 16 MiB (kept in
/// `DIR/down.bin`) and closes; port 7001 stores what arrives (4 MiB) in `DIR/up.bin`.
fn uml_serve(dir: &Path) -> Result<()> {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    let down: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("down.bin"), &down)?;
    let _ = std::fs::remove_file(dir.join("up.bin"));
    let l_down = TcpListener::bind(SocketAddrV4::new(HOST_IP, 7000))?;
    let l_up = TcpListener::bind(SocketAddrV4::new(HOST_IP, 7001))?;
    let sender = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = l_down.accept()?;
        s.write_all(&down)?;
        Ok(())
    });
    let (mut s, _) = l_up.accept()?;
    let mut up = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while up.len() < 4 << 20 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        up.extend_from_slice(&buf[..n]);
    }
    std::fs::write(dir.join("up.bin"), &up)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    Ok(())
}
