//! `cargo xtask e2e`: builds the guest kit and boots it under `alioth` once per test, checking
//! each verdict (the `ALIOTH-KIT result <test> pass` line and the exit status).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, output, run};

/// Per-test bound: the kit's ring-0 part is emulated on a software KVM, the rest is native.
const TIMEOUT: Duration = Duration::from_secs(120);

struct Case {
    name: String,
    test: &'static str,
    /// `split` or `packed`.
    ring: &'static str,
    args: Vec<String>,
    /// A disk image and the sector that must hold the kit's pattern afterwards.
    check_image: Option<(PathBuf, usize)>,
    /// A vhost-user backend to run during the test: its command line and the socket it serves.
    server: Option<(Vec<String>, PathBuf)>,
    /// Guest memory (`--memory`).
    memory: &'static str,
}

/// A backend process, killed when dropped.
pub struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits (20 s at most) until it has created the socket `sock`. Its stderr
/// goes to `<sock>.log` (a pipe nobody reads could fill and block it).
pub fn start_server(cmd: &[String], sock: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(sock);
    let log = sock.with_extension("log");
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", cmd[0]))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(st) = child.try_wait()? {
            let err = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{} exited with {st}: {err}", cmd[0]);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{} did not create {} within 20 s", cmd[0], sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Server(child))
}

/// What `blk-rw` and `blk-flush` write (crates/guest-kit/src/tests.rs).
const BLK_PATTERN: &[u8] = b"ALIOTH-KIT-BLK-1";

/// Adds `boot --memory MEMORY --exit-device on --kernel KIT` to `cmd` (an `alioth` command, or a
/// wrapper that runs one): how every kit VM of this task starts.
pub fn kit_boot_args<'a>(cmd: &'a mut Command, kit: &Path, memory: &str) -> &'a mut Command {
    cmd.args([
        "boot",
        "--memory",
        memory,
        "--exit-device",
        "on",
        "--kernel",
    ])
    .arg(kit)
}

/// Waits for a VM started with piped stdout and stderr until `deadline` (killing it then);
/// returns its exit status, stdout and stderr. The pipes are drained while it runs, so a
/// chatty VM cannot block on a full pipe.
pub fn finish(
    mut child: std::process::Child,
    deadline: Instant,
) -> Result<(std::process::ExitStatus, String, String)> {
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = out.join().unwrap_or_default();
            bail!("timed out\n--- serial ---\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    Ok((status, out, err))
}

/// Builds the kit; returns the ELF.
pub fn build_kit(root: &Path) -> Result<PathBuf> {
    let dir = root.join("crates/guest-kit");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&dir)
            .args(["build", "--release", "--quiet"]),
    )?;
    Ok(crate::bin_dir(&dir, "release").join("guest-kit"))
}

fn run_case(alioth: &Path, kit: &Path, case: &Case) -> Result<()> {
    let _server = match &case.server {
        Some((cmd, sock)) => Some(start_server(cmd, sock)?),
        None => None,
    };
    let child = kit_boot_args(&mut Command::new(alioth), kit, case.memory)
        .arg("--cmdline")
        .arg(format!("kit.test={} kit.ring={}", case.test, case.ring))
        .args(&case.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let (status, out, err) = finish(child, Instant::now() + TIMEOUT)?;
    let verdict = format!("ALIOTH-KIT result {} pass", case.test);
    if status.code() != Some(0) || !out.lines().any(|l| l.starts_with(&verdict)) {
        bail!("exit {status}\n--- serial ---\n{out}--- stderr ---\n{err}");
    }
    if let Some((img, sector)) = &case.check_image {
        let data = std::fs::read(img)?;
        let at = sector * 512;
        if data.get(at..at + BLK_PATTERN.len()) != Some(BLK_PATTERN) {
            bail!(
                "the guest's write is not in {} at sector {sector}",
                img.display()
            );
        }
    }
    Ok(())
}

/// A config file enabling virtio-rng on `backend` (the flag `--rng` has no backend choice).
fn rng_config(dir: &Path, backend: &str) -> Result<PathBuf> {
    let p = dir.join(format!("rng-{backend}.toml"));
    std::fs::write(&p, format!("[rng]\nbackend = \"{backend}\"\n"))?;
    Ok(p)
}

/// Runs every kit test; fails if any fails.
pub fn e2e(root: &Path) -> Result<()> {
    let kit = build_kit(root)?;
    run(cargo().args(["build", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "debug").join("alioth");
    let dir = root.join("target/e2e");
    std::fs::create_dir_all(&dir)?;
    let image = |name: &str| -> Result<PathBuf> {
        let p = dir.join(format!("{name}.img"));
        std::fs::File::create(&p)?.set_len(16 << 20)?;
        Ok(p)
    };
    let plain = |test: &'static str| Case {
        name: test.to_string(),
        test,
        ring: "split",
        args: vec![],
        check_image: None,
        server: None,
        memory: "128M",
    };
    let mut cases = vec![plain("hello")];
    // The kit maps RAM above 4 GiB itself (as it would a 64-bit BAR there): 3200M puts 128 MiB
    // of it at 4 GiB.
    cases.push(Case {
        memory: "3200M",
        ..plain("map-high")
    });
    let pci_disk = image("pci")?;
    cases.push(Case {
        name: "pci".into(),
        test: "pci",
        ring: "split",
        args: vec![
            "--disk".into(),
            pci_disk.display().to_string(),
            "--rng".into(),
        ],
        check_image: None,
        server: None,
        memory: "128M",
    });
    for backend in ["io_uring", "epoll"] {
        for ring in ["split", "packed"] {
            cases.push(Case {
                name: format!("rng/{backend}/{ring}"),
                test: "rng",
                ring,
                args: vec![
                    "--config".into(),
                    rng_config(&dir, backend)?.display().to_string(),
                ],
                check_image: None,
                server: None,
                memory: "128M",
            });
            // (test, extra disk options, sector the host checks afterwards)
            let blk: [(&'static str, &str, Option<usize>); 6] = [
                ("blk-rw", "", Some(1)),
                ("blk-ro", ",read_only=on", None),
                ("blk-flush", "", Some(3)),
                ("blk-discard", "", None),
                ("blk-mq", ",num_queues=2", None),
                ("hostile-chain", "", None),
            ];
            for (test, opts, sector) in blk {
                let img = image(&format!("{test}-{backend}-{ring}"))?;
                cases.push(Case {
                    name: format!("{test}/{backend}/{ring}"),
                    test,
                    ring,
                    args: vec![
                        "--disk".into(),
                        format!("path={},backend={backend}{opts}", img.display()),
                    ],
                    check_image: sector.map(|s| (img, s)),
                    server: None,
                    memory: "128M",
                });
            }
        }
    }
    // The same blk tests with the disk served over vhost-user: by `alioth vhost-user blk` on
    // each backend and both ring formats, and by qemu-storage-daemon (which offers no packed
    // ring) where it is installed.
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qsd {
        eprintln!("e2e: qemu-storage-daemon is not installed; its vhost-user cases are skipped");
    }
    let vu_tests: [(&'static str, Option<usize>); 4] = [
        ("blk-rw", Some(1)),
        ("blk-flush", Some(3)),
        ("blk-discard", None),
        ("blk-mq", None),
    ];
    let mut servers: Vec<(String, &'static str)> = Vec::new();
    for backend in ["io_uring", "epoll"] {
        for ring in ["split", "packed"] {
            servers.push((format!("alioth-{backend}"), ring));
        }
    }
    if qsd {
        servers.push(("qsd".into(), "split"));
    }
    for (server, ring) in servers {
        for (test, sector) in vu_tests {
            let img = image(&format!("vu-{test}-{server}-{ring}"))?;
            let sock = dir.join(format!("vu-{server}.sock"));
            let cmd = match server.strip_prefix("alioth-") {
                Some(backend) => crate::uml::alioth_blk_cmd(
                    &alioth,
                    &sock,
                    &img,
                    &format!(",backend={backend},num_queues=2"),
                ),
                None => crate::uml::qsd_blk_cmd(&sock, &img, 2),
            };
            cases.push(Case {
                name: format!("{test}/vhost-user-{server}/{ring}"),
                test,
                ring,
                args: vec!["--disk".into(), format!("vhost_user={}", sock.display())],
                check_image: sector.map(|s| (img, s)),
                server: Some((cmd, sock)),
                memory: "128M",
            });
        }
    }
    // `auto` boots the kit through its PVH note; these run it through the 64-bit protocol too.
    let linux64_img = image("blk-rw-linux64")?;
    for test in ["hello", "blk-rw"] {
        let mut args = vec!["--boot-protocol".to_string(), "linux64".into()];
        let mut check = None;
        if test == "blk-rw" {
            args.extend(["--disk".into(), linux64_img.display().to_string()]);
            check = Some((linux64_img.clone(), 1));
        }
        cases.push(Case {
            name: format!("{test}/linux64"),
            test,
            ring: "split",
            args,
            check_image: check,
            server: None,
            memory: "128M",
        });
    }
    // ALIOTH_E2E_FILTER=text runs only the cases whose name contains it.
    let filter = std::env::var("ALIOTH_E2E_FILTER").unwrap_or_default();
    let wanted = |name: &str| name.contains(filter.as_str());
    let (mut passed, mut failed) = (0, 0);
    let mut record = |name: &str, r: Result<()>| match r {
        Ok(()) => {
            passed += 1;
            eprintln!("e2e: {name} ... ok");
        }
        Err(e) => {
            failed += 1;
            eprintln!("e2e: {name} ... FAILED: {e:#}");
        }
    };
    for case in cases.iter().filter(|c| wanted(&c.name)) {
        record(&case.name, run_case(&alioth, &kit, case));
    }
    // virtio-net, in network namespaces this run creates (never the host's own).
    match crate::net::unavailable() {
        Some(why) if std::env::var_os("CI").is_some() => {
            record(
                "net",
                Err(anyhow::anyhow!("the net tests cannot run: {why}")),
            );
        }
        Some(why) => eprintln!("e2e: net tests skipped: {why}"),
        None => {
            let xtask = std::env::current_exe()?;
            for backend in ["io_uring", "epoll"] {
                for ring in ["split", "packed"] {
                    for case in crate::net::cases(backend, ring)
                        .into_iter()
                        .filter(|c| wanted(&c.name))
                    {
                        record(
                            &case.name,
                            crate::net::run_case(&alioth, &kit, &xtask, &case),
                        );
                    }
                }
            }
        }
    }
    // The control API: pause/resume under the blk bench on both backends, then shutdown.
    for backend in ["io_uring", "epoll"] {
        let name = format!("api/{backend}");
        if wanted(&name) {
            let r = crate::api::run_case(&alioth, &kit, backend).map(|lat| {
                let max = lat.iter().cloned().fold(0.0, f64::max);
                eprintln!(
                    "e2e: {name}: {} pauses, latency (request to answer) max {max:.1} ms",
                    lat.len()
                );
            });
            record(&name, r);
        }
    }
    // Snapshot, kill, two clones restored from it; then damaged snapshots.
    for backend in ["io_uring", "epoll"] {
        let name = format!("snapshot/{backend}");
        if !wanted(&name) {
            continue;
        }
        let dir = crate::snapshot::case_dir(backend);
        let r = crate::snapshot::clones(&alioth, &kit, &dir, backend).map(|f| {
            eprintln!(
                "e2e: {name}: pause {:.1} ms, snapshot {:.1} ms and {} KiB on disk (128 MiB VM), restore (manifest to first instruction, in alioth) {:.1} / {:.1} ms",
                f.pause_ms,
                f.snapshot_ms,
                f.snapshot_kib,
                f.restore_ms[0],
                f.restore_ms[1]
            );
        });
        let ok = r.is_ok();
        record(&name, r);
        if ok && backend == "io_uring" && wanted("snapshot/bad") {
            record(
                "snapshot/bad",
                crate::snapshot::bad_snapshots(&alioth, &dir),
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if wanted("api/shutdown") {
        record("api/shutdown", crate::api::shutdown_case(&alioth, &kit));
    }
    // virtio-console on its socket backend, this process being the terminal.
    for backend in ["io_uring", "epoll"] {
        for ring in ["split", "packed"] {
            let name = format!("console/{backend}/{ring}");
            if wanted(&name) {
                record(
                    &name,
                    crate::console::run_case(&alioth, &kit, backend, ring),
                );
            }
        }
    }
    // virtio-vsock against host services on its Unix sockets; socat (a host program written
    // for Firecracker's convention) drives one case where it is installed.
    let socat = crate::vsock::socat_available();
    for case in crate::vsock::cases()
        .into_iter()
        .filter(|c| wanted(&c.name))
    {
        if case.name.contains("socat") && !socat {
            if std::env::var_os("CI").is_some() {
                record(&case.name, Err(anyhow::anyhow!("socat is not installed")));
            } else {
                eprintln!("e2e: {}: skipped: socat is not installed", case.name);
            }
            continue;
        }
        record(&case.name, crate::vsock::run_case(&alioth, &kit, &case));
    }
    println!("e2e: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} guest-kit test(s) failed");
    }
    Ok(())
}

/// What one in-guest bench run measured.
pub struct KitBench {
    /// I/Os per second over the window the host timed.
    pub iops: f64,
    /// CPU time of the VMM's threads other than vCPUs (the I/O path: workers, event loops),
    /// in microseconds per I/O over the window.
    pub cpu_us_per_io: Option<f64>,
    /// The VMM's own resident memory at the window's end, guest RAM left out: RssAnon +
    /// RssFile (Alioth's guest RAM is a shared memfd, counted as RssShmem). Only meaningful
    /// for a VMM whose guest RAM is shared memory.
    pub rss_overhead_kib: Option<u64>,
}

/// RssAnon + RssFile of `pid`, in KiB.
fn rss_overhead_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(field("RssAnon:")? + field("RssFile:")?)
}

/// CPU seconds (user + system) of `pid`'s threads whose name does not contain "vcpu".
fn io_threads_cpu(pid: u32) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ..." — comm may hold spaces; fields follow the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if stat[open + 1..close].to_ascii_lowercase().contains("vcpu") {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the comm.
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
        total += ticks(11)? + ticks(12)?;
    }
    Some(total as f64 / tick)
}

/// Runs a VMM command that boots the kit's bench (with a pseudo-terminal on stdin, which
/// upstream Alioth needs) and times the kit's window from its `bench-window` lines; stops the
/// VMM if it has not exited two seconds after the result.
pub fn timed_kit_bench(mut cmd: Command) -> Result<KitBench> {
    use std::io::BufRead;
    let (_controller, terminal) = crate::conformance::pty()?;
    let mut child = cmd
        .stdin(Stdio::from(terminal))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let (mut start, mut end, mut result) = (None, None, None);
    let (mut cpu0, mut cpu1, mut rss) = (None, None, None);
    let mut text = String::new();
    let deadline = Instant::now() + TIMEOUT;
    while result.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((at, line)) = rx.recv_timeout(left) else {
            break;
        };
        if line.starts_with("ALIOTH-KIT bench-window start") {
            start = Some(at);
            cpu0 = io_threads_cpu(pid);
        } else if line.starts_with("ALIOTH-KIT bench-window end") {
            end = Some(at);
            cpu1 = io_threads_cpu(pid);
            rss = rss_overhead_kib(pid);
        } else if let Some(rest) = line.strip_prefix("ALIOTH-KIT bench ") {
            result = Some(rest.trim_end_matches('\r').to_string());
        }
        text.push_str(&line);
        text.push('\n');
    }
    let stop_by = Instant::now() + Duration::from_secs(2);
    while child.try_wait()?.is_none() {
        if Instant::now() > stop_by {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let field = |name: &str| -> Option<f64> {
        result
            .as_deref()?
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    let (Some(start), Some(end), Some(ios), Some(guest_ns)) =
        (start, end, field("ios="), field("ns="))
    else {
        bail!("no bench window or result from the guest:\n{text}");
    };
    let host_secs = end.duration_since(start).as_secs_f64();
    let guest_secs = guest_ns / 1e9;
    if (host_secs - guest_secs).abs() > 0.1 * host_secs {
        bail!(
            "the guest's clock ({guest_secs:.3} s) and the host's ({host_secs:.3} s) disagree about the bench window"
        );
    }
    Ok(KitBench {
        iops: ios / host_secs,
        cpu_us_per_io: cpu0.zip(cpu1).map(|(a, b)| (b - a) * 1e6 / ios.max(1.0)),
        rss_overhead_kib: rss,
    })
}

/// The kit's command line for its 4 KiB random-read bench.
fn bench_cmdline(qd: u32, secs: u64) -> String {
    format!("kit.test=bench kit.bench=blk-randread,qd={qd},secs={secs}")
}

/// Runs the kit's polling-mode 4 KiB random-read bench at `qd` under this tree's `alioth`
/// against the disk `disk` (an `alioth boot --disk` spec).
pub fn kit_bench_iops(alioth: &Path, kit: &Path, disk: &str, qd: u32, secs: u64) -> Result<f64> {
    Ok(kit_bench(alioth, kit, disk, qd, secs)?.iops)
}

fn kit_bench(alioth: &Path, kit: &Path, disk: &str, qd: u32, secs: u64) -> Result<KitBench> {
    let mut cmd = Command::new(alioth);
    kit_boot_args(&mut cmd, kit, "256M")
        .args(["--serial", "stdio"])
        .arg("--cmdline")
        .arg(bench_cmdline(qd, secs))
        .arg("--disk")
        .arg(disk);
    timed_kit_bench(cmd)
}

/// The same bench under upstream Alioth (`--blk file,...,api=iouring`, read-only).
fn upstream_kit_bench(
    upstream: &Path,
    kit: &Path,
    img: &Path,
    qd: u32,
    secs: u64,
) -> Result<KitBench> {
    let mut cmd = Command::new(upstream);
    cmd.args(["boot", "--pvh"])
        .arg(kit)
        .args(["--memory", "size=256M", "--cmdline"])
        .arg(bench_cmdline(qd, secs))
        .arg("--blk")
        .arg(format!(
            "file,path={},readonly=true,api=iouring",
            img.display()
        ));
    timed_kit_bench(cmd)
}

/// One boot of the kit's `hello` test: milliseconds from exec to the kit's first instruction
/// (its `entry` line, printed before any setup), to its first line after setup, to its verdict
/// (summary line), and to the VMM's exit.
fn boot_times(mut cmd: Command) -> Result<[f64; 4]> {
    use std::io::BufRead;
    let (_controller, terminal) = crate::conformance::pty()?;
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::from(terminal))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (mut entry, mut first, mut verdict) = (None, None, None);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        if entry.is_none() && line.contains("ALIOTH-KIT entry") {
            entry = Some(t0.elapsed());
        }
        if first.is_none() && line.contains("ALIOTH-KIT start") {
            first = Some(t0.elapsed());
        }
        if line.contains("ALIOTH-KIT summary") {
            verdict = Some(t0.elapsed());
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the VMM did not exit after the kit's verdict");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let exit = t0.elapsed();
    let (Some(entry), Some(first), Some(verdict)) = (entry, first, verdict) else {
        bail!("no kit output");
    };
    Ok([entry, first, verdict, exit].map(|d| d.as_secs_f64() * 1e3))
}

/// Makes the command that boots one VM.
type CommandMaker<'a> = Box<dyn Fn() -> Command + 'a>;

/// The start-up table: exec -> the kit's first instruction, -> its first line after setup (its
/// emulated ring-0 setup and 10 ms of clock calibration included), -> its `hello` verdict, ->
/// process exit; min/median/max of `runs` boots of this tree's `alioth` and, when given,
/// upstream Alioth's.
pub fn startup_table(
    alioth: &Path,
    kit: &Path,
    upstream: Option<&Path>,
    runs: usize,
) -> Result<()> {
    println!(
        "\nstart-up: exec -> kit's first instruction (entry line) / first line after setup / hello verdict / process exit, ms, {runs} runs each, alternating (min / median / max)"
    );
    println!("| vmm | entry | first line | verdict | exit |");
    println!("| --- | --- | --- | --- | --- |");
    let mut vmms: Vec<(&str, CommandMaker)> = vec![(
        "alioth",
        Box::new(|| {
            let mut c = Command::new(alioth);
            kit_boot_args(&mut c, kit, "128M").args(["--cmdline", "kit.test=hello"]);
            c
        }),
    )];
    if let Some(u) = upstream {
        vmms.push((
            "upstream 0.12.0",
            Box::new(move || {
                let mut c = Command::new(u);
                c.args(["boot", "--pvh"]).arg(kit).args([
                    "--memory",
                    "size=128M",
                    "--cmdline",
                    "kit.test=hello",
                ]);
                c
            }),
        ));
    }
    // Boots alternate between the VMMs, so that a noisy moment of the machine falls on both.
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new(), Vec::new()]; vmms.len()];
    for _ in 0..runs {
        for ((_, make), vmm_samples) in vmms.iter().zip(samples.iter_mut()) {
            let t = boot_times(make())?;
            for (s, v) in vmm_samples.iter_mut().zip(t) {
                s.push(v);
            }
        }
    }
    for ((name, _), mut samples) in vmms.iter().zip(samples) {
        let cell = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            format!(
                "{:.1} / {:.1} / {:.1}",
                v[0],
                v[v.len() / 2],
                v[v.len() - 1]
            )
        };
        let [a, b, c, d] = &mut samples;
        println!(
            "| {name} | {} | {} | {} | {} |",
            cell(a),
            cell(b),
            cell(c),
            cell(d)
        );
    }
    Ok(())
}

/// `cargo xtask bench startup [--no-peer]`: the start-up table alone.
pub fn bench_startup(root: &Path, args: &[String]) -> Result<()> {
    let kit = build_kit(root)?;
    run(cargo().args(["build", "--release", "--quiet", "-p", "alioth-cli"]))?;
    let upstream = if args.iter().any(|a| a == "--no-peer") {
        None
    } else {
        Some(crate::conformance::upstream_alioth(root)?)
    };
    startup_table(
        &crate::bin_dir(root, "release").join("alioth"),
        &kit,
        upstream.as_deref(),
        20,
    )
}

/// The in-guest half of `cargo xtask bench blk`: 4 KiB random reads measured inside the guest
/// kit through the whole path (notify -> ioeventfd -> worker -> used ring -> MSI-X irqfd ->
/// guest), next to a plain io_uring loop on the same file and to upstream Alioth 0.12.0 running
/// the same kit (installed into target/peers; `--no-peer` leaves it out).
pub fn bench_in_guest(root: &Path, args: &[String]) -> Result<()> {
    let secs = crate::secs_arg(args);
    let kit = build_kit(root)?;
    run(cargo().args(["build", "--release", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "release").join("alioth");
    let upstream = if args.iter().any(|a| a == "--no-peer") {
        None
    } else {
        Some(crate::conformance::upstream_alioth(root)?)
    };
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("in-guest.img");
    bench_image(&img)?;
    println!(
        "\nin-guest (guest kit, polling its used ring) 4 KiB random read, 256 MiB file (page cache), {secs} s per run;\n\
         vs host: against a plain io_uring loop on the file; vs upstream: against upstream Alioth 0.12.0's io_uring\n\
         worker running the same kit; CPU: user+sys of the VMM's threads other than vCPUs, per I/O;\n\
         alioth rows use the disks' default adaptive polling (docs/config.md, `poll_us`); `no poll` rows set poll_us=0"
    );
    println!(
        "{:<20} {:>4} {:>12} {:>12} {:>8} {:>11} {:>10}",
        "vmm/backend", "qd", "guest IOPS", "host IOPS", "vs host", "vs upstream", "CPU us/IO"
    );
    let cpu = |b: &KitBench| b.cpu_us_per_io.map_or("?".into(), |c| format!("{c:.1}"));
    let mut rows: Vec<BenchRow> = Vec::new();
    for qd in [1u32, 32] {
        let base = host_baseline(&img, qd, secs, false)?;
        let peer = match &upstream {
            Some(u) => Some(upstream_kit_bench(u, &kit, &img, qd, secs)?),
            None => None,
        };
        // `None`: the default window.
        for (backend, poll) in [
            ("io_uring", None),
            ("epoll", None),
            ("io_uring", Some(0)),
            ("epoll", Some(0)),
        ] {
            let b = kit_bench(
                &alioth,
                &kit,
                &format!(
                    "path={},read_only=on,backend={backend}{}",
                    img.display(),
                    poll.map_or(String::new(), |p| format!(",poll_us={p}"))
                ),
                qd,
                secs,
            )?;
            let vs = peer
                .as_ref()
                .map_or("-".into(), |p| format!("{:.2}", b.iops / p.iops));
            let label = if poll == Some(0) {
                format!("alioth {backend} no poll")
            } else {
                format!("alioth {backend}")
            };
            println!(
                "{:<20} {qd:>4} {:>12.0} {base:>12.0} {:>8.2} {vs:>11} {:>10}",
                label,
                b.iops,
                b.iops / base,
                cpu(&b)
            );
            rows.push(BenchRow {
                vmm: label,
                qd,
                iops: b.iops,
                host_iops: base,
                peer_iops: peer.as_ref().map(|p| p.iops),
                cpu_us_per_io: b.cpu_us_per_io,
            });
        }
        if let Some(p) = &peer {
            println!(
                "{:<20} {qd:>4} {:>12.0} {base:>12.0} {:>8.2} {:>11} {:>10}",
                "upstream io_uring",
                p.iops,
                p.iops / base,
                "1.00",
                cpu(p)
            );
            rows.push(BenchRow {
                vmm: "upstream io_uring".into(),
                qd,
                iops: p.iops,
                host_iops: base,
                peer_iops: Some(p.iops),
                cpu_us_per_io: p.cpu_us_per_io,
            });
        }
    }
    direct_rows(&alioth, &kit, &dir, secs)?;
    write_bench_json(&dir.join("blk.json"), secs, &rows)?;
    draw_bench_svg(&dir.join("blk.svg"), &rows)?;
    println!(
        "(written to {} and {})",
        dir.join("blk.json").display(),
        dir.join("blk.svg").display()
    );
    startup_table(&alioth, &kit, upstream.as_deref(), 20)
}

/// Writes a 256 MiB image with a non-zero pattern (so that reads copy real data) and syncs it.
fn bench_image(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    for _ in 0..256 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The host's own io_uring loop of 4 KiB random reads on `img` at `qd` (with O_DIRECT when
/// `direct`), in IOPS: the devices crate's bench in its baseline mode.
fn host_baseline(img: &Path, qd: u32, secs: u64, direct: bool) -> Result<f64> {
    let mut cmd = cargo();
    cmd.args([
        "bench",
        "-q",
        "-p",
        "alioth-devices",
        "--bench",
        "blk",
        "--",
    ])
    .args(["--bench", "--baseline"])
    .arg(img)
    .args(["--qd", &qd.to_string(), "--secs", &secs.to_string()]);
    if direct {
        cmd.arg("--direct");
    }
    output(&mut cmd)?
        .lines()
        .find_map(|l| l.strip_prefix("baseline-iops "))
        .and_then(|v| v.trim().parse().ok())
        .context("baseline output")
}

/// The same bench with O_DIRECT on a file of the machine's own disk (what users of a real disk
/// see), next to the host's io_uring loop with O_DIRECT on it. Upstream Alioth has no O_DIRECT
/// option, so there is no peer column here. Also prints Alioth's own resident memory.
fn direct_rows(alioth: &Path, kit: &Path, dir: &Path, secs: u64) -> Result<()> {
    let img = dir.join("direct.img");
    bench_image(&img)?;
    println!(
        "\nO_DIRECT on {} (the machine's own disk), 4 KiB random read, {secs} s per run; VMM MiB: RssAnon+RssFile (guest RAM left out)",
        img.display()
    );
    println!(
        "{:<20} {:>4} {:>12} {:>12} {:>8} {:>10} {:>8}",
        "vmm/backend", "qd", "guest IOPS", "host IOPS", "vs host", "CPU us/IO", "VMM MiB"
    );
    for qd in [1u32, 32] {
        let base = host_baseline(&img, qd, secs, true)?;
        for backend in ["io_uring", "epoll"] {
            let b = kit_bench(
                alioth,
                kit,
                &format!(
                    "path={},read_only=on,direct=on,backend={backend}",
                    img.display()
                ),
                qd,
                secs,
            )?;
            println!(
                "{:<20} {qd:>4} {:>12.0} {base:>12.0} {:>8.2} {:>10} {:>8}",
                format!("alioth {backend}"),
                b.iops,
                b.iops / base,
                b.cpu_us_per_io.map_or("?".into(), |c| format!("{c:.1}")),
                b.rss_overhead_kib
                    .map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
            );
        }
    }
    let _ = std::fs::remove_file(&img);
    Ok(())
}

/// One row of the in-guest table.
struct BenchRow {
    vmm: String,
    qd: u32,
    iops: f64,
    host_iops: f64,
    peer_iops: Option<f64>,
    cpu_us_per_io: Option<f64>,
}

fn json_num(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite())
        .map_or("null".into(), |v| format!("{v:.3}"))
}

/// The rows as JSON (for scripts and for comparing runs).
fn write_bench_json(path: &Path, secs: u64, rows: &[BenchRow]) -> Result<()> {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "    {{\"vmm\": \"{}\", \"qd\": {}, \"iops\": {:.0}, \"host_iops\": {:.0}, \"vs_host\": {:.3}, \"vs_upstream\": {}, \"cpu_us_per_io\": {}}}",
                r.vmm,
                r.qd,
                r.iops,
                r.host_iops,
                r.iops / r.host_iops,
                json_num(r.peer_iops.map(|p| r.iops / p)),
                json_num(r.cpu_us_per_io)
            )
        })
        .collect();
    let text = format!(
        "{{\n  \"bench\": \"in-guest 4 KiB random read\",\n  \"secs\": {secs},\n  \"rows\": [\n{}\n  ]\n}}\n",
        items.join(",\n")
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// A bar chart of each row's IOPS as a fraction of the host's own io_uring loop, QD1 and QD32
/// side by side.
fn draw_bench_svg(path: &Path, rows: &[BenchRow]) -> Result<()> {
    use plotters::prelude::*;
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.vmm.as_str()) {
            names.push(&r.vmm);
        }
    }
    let n = names.len() as u32;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let top = rows
        .iter()
        .map(|r| r.iops / r.host_iops)
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "in-guest 4 KiB random read, fraction of the host's io_uring (QD1 left, QD32 right)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..f64::from(n), 0f64..top * 1.05)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(n as usize * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                names.get(i).map(|s| s.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("guest IOPS / host IOPS")
        .draw()
        .map_err(|e| err(&e))?;
    for (qd, color, off) in [(1u32, BLUE, 0.1), (32u32, RED, 0.5)] {
        chart
            .draw_series(rows.iter().filter(|r| r.qd == qd).filter_map(|r| {
                let i = names.iter().position(|n| *n == r.vmm)? as f64;
                Some(Rectangle::new(
                    [(i + off, 0.0), (i + off + 0.38, r.iops / r.host_iops)],
                    color.filled(),
                ))
            }))
            .map_err(|e| err(&e))?
            .label(format!("QD{qd}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
#[path = "e2e_test.rs"]
mod tests;

/// `cargo xtask bench rate-limit [--secs N]`: the kit's 4 KiB random reads (QD8, both
/// backends) on a disk limited to 5000 requests/s, then to 16 MiB/s (4096 requests/s of
/// 4 KiB), each next to its limit: the measured rate should stay within 5 % of it.
pub fn bench_rate_limit(root: &Path, args: &[String]) -> Result<()> {
    let secs = crate::secs_arg(args).max(3);
    let kit = build_kit(root)?;
    run(cargo().args(["build", "--release", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = crate::bin_dir(root, "release").join("alioth");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("rate-limit.img");
    bench_image(&img)?;
    println!(
        "\nrate limits: in-guest 4 KiB random reads, QD8, {secs} s per run; the limit and what the guest got"
    );
    println!(
        "{:<10} {:<24} {:>12} {:>12} {:>8}",
        "backend", "limit", "limit IOPS", "guest IOPS", "ratio"
    );
    for backend in ["io_uring", "epoll"] {
        for (label, spec, expected) in [
            ("ops=5000", "ops=5000", 5000.0),
            (
                "bandwidth=16M",
                "bandwidth=16M",
                (16u64 << 20) as f64 / 4096.0,
            ),
        ] {
            let disk = format!("path={},backend={backend},{spec}", img.display());
            let iops = kit_bench_iops(&alioth, &kit, &disk, 8, secs)?;
            println!(
                "{backend:<10} {label:<24} {expected:>12.0} {iops:>12.0} {:>8.3}",
                iops / expected
            );
        }
    }
    Ok(())
}
