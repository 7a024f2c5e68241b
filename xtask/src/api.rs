//! The control API cases of `cargo xtask e2e`: the kit's blk bench runs while this process
//! drives the VM through its API socket — with `alioth ctl` and with raw requests shaped as
//! Cloud Hypervisor's `ch-remote` sends them — pausing and resuming it repeatedly (the bench
//! fails on a lost or duplicated completion), then shutting it down (exit 0).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Sends one raw HTTP request; returns (status, body).
fn raw(sock: &Path, req: &str) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(sock).context("connecting to the API socket")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {out:?}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

/// As ch-remote sends a request: HTTP/1.1, Host, Accept, Content-Length (0 for no body).
pub fn ch_remote(sock: &Path, method: &str, endpoint: &str, body: &str) -> Result<(u16, String)> {
    let mut req =
        format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    raw(sock, &req)
}

/// Runs `alioth ctl --api-socket SOCK ARGS`; its stdout, or an error with its stderr.
pub fn ctl(alioth: &Path, sock: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(alioth)
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "alioth ctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_ops(alioth: &Path, sock: &Path) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(&ctl(alioth, sock, &["--json", "counters"])?)?;
    v["virtio-blk0"]["read_ops"]
        .as_u64()
        .context("no virtio-blk0 read_ops in vm.counters")
}

/// Drives the VM; returns the pause latencies (ms).
fn drive(alioth: &Path, sock: &Path, disk: &Path) -> Result<Vec<f64>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("no API socket");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, body) = ch_remote(sock, "GET", "vmm.ping", "")?;
    if status != 200 || !body.contains("\"version\"") {
        bail!("vmm.ping: {status} {body}");
    }
    let (status, body) = ch_remote(sock, "GET", "vm.info", "")?;
    let info: serde_json::Value = serde_json::from_str(&body).context("vm.info body")?;
    if status != 200
        || info["state"] != "Running"
        || info["config"]["disks"][0]["path"] != disk.display().to_string()
        || info["config"]["memory"]["size"] != 128u64 << 20
    {
        bail!("vm.info: {status} {body}");
    }
    // Wait for the bench to be under way.
    let start = Instant::now();
    while read_ops(alioth, sock)? == 0 {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the bench never started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut latencies = Vec::new();
    for round in 0..10 {
        let t = Instant::now();
        let (status, body) = if round % 2 == 0 {
            ch_remote(sock, "PUT", "vm.pause", "")?
        } else {
            ctl(alioth, sock, &["pause"]).map(|_| (204, String::new()))?
        };
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if status != 204 {
            bail!("vm.pause: {status} {body}");
        }
        let (_, body) = ch_remote(sock, "GET", "vm.info", "")?;
        if !body.contains("\"state\":\"Paused\"") {
            bail!("vm.info while paused: {body}");
        }
        let a = read_ops(alioth, sock)?;
        std::thread::sleep(Duration::from_millis(150));
        let b = read_ops(alioth, sock)?;
        if a != b {
            bail!("I/O went on while paused: read_ops {a} -> {b}");
        }
        let (status, body) = ch_remote(sock, "PUT", "vm.pause", "")?;
        if status != 405 {
            bail!("a second pause: {status} {body}");
        }
        let (status, body) = ch_remote(sock, "PUT", "vm.resume", "")?;
        if status != 204 {
            bail!("vm.resume: {status} {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
        let c = read_ops(alioth, sock)?;
        if c <= b {
            bail!("no I/O after resume: read_ops {b} -> {c}");
        }
    }
    for (method, endpoint, body, want) in [
        ("PUT", "vm.resume", "", 405),
        ("GET", "vm.nope", "", 404),
        ("PUT", "vm.info", "", 405),
        ("PUT", "vm.snapshot", "{bad", 400),
    ] {
        let (status, text) = ch_remote(sock, method, endpoint, body)?;
        if status != want {
            bail!("{method} {endpoint}: {status} (want {want}) {text}");
        }
    }
    Ok(latencies)
}

/// One VM running the kit's bench with the API on; Ok if every API step behaves, the bench
/// passes despite the pauses, and `vm.shutdown` then ends alioth with exit 0.
pub fn run_case(alioth: &Path, kit: &Path, backend: &str) -> Result<Vec<f64>> {
    let dir = std::env::temp_dir().join(format!("alioth-api-{}-{backend}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("api.sock");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let child = crate::e2e::kit_boot_args(&mut Command::new(alioth), kit, "128M")
        .arg("--cmdline")
        .arg("kit.test=bench,hello kit.bench=blk-randread,qd=8,bs=4k,secs=15")
        .arg("--disk")
        .arg(format!("path={},backend={backend}", disk.display()))
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let driven = drive(alioth, &sock, &disk);
    // The kit finishes the bench, runs `hello` and stops the VM itself.
    let (status, out, err) = crate::e2e::finish(child, Instant::now() + Duration::from_secs(90))?;
    let left = sock.exists();
    let _ = std::fs::remove_dir_all(&dir);
    let latencies =
        driven.with_context(|| format!("--- serial ---\n{out}--- stderr ---\n{err}"))?;
    if !out.contains("ALIOTH-KIT result bench pass") || status.code() != Some(0) {
        bail!(
            "the bench did not pass across pauses (exit {status})\n--- serial ---\n{out}--- stderr ---\n{err}"
        );
    }
    if left {
        bail!("the API socket is left behind");
    }
    Ok(latencies)
}

/// `vm.shutdown` stops a running VM with exit 0.
pub fn shutdown_case(alioth: &Path, kit: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("alioth-api-sd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("api.sock");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let child = crate::e2e::kit_boot_args(&mut Command::new(alioth), kit, "128M")
        .arg("--cmdline")
        .arg("kit.test=bench kit.bench=blk-randread,qd=1,bs=4k,secs=60")
        .arg("--disk")
        .arg(disk.display().to_string())
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let r = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while read_ops(alioth, &sock).unwrap_or(0) == 0 {
            if Instant::now() > deadline {
                bail!("the bench never started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, body) = ch_remote(&sock, "PUT", "vm.shutdown", "")?;
        if status != 204 {
            bail!("vm.shutdown: {status} {body}");
        }
        Ok(())
    })();
    let t = Instant::now();
    let (status, out, err) = crate::e2e::finish(child, Instant::now() + Duration::from_secs(30))?;
    let _ = std::fs::remove_dir_all(&dir);
    r.with_context(|| format!("--- serial ---\n{out}--- stderr ---\n{err}"))?;
    if status.code() != Some(0) || t.elapsed() > Duration::from_secs(10) {
        bail!(
            "exit {status} after {:?}\n--- stderr ---\n{err}",
            t.elapsed()
        );
    }
    Ok(())
}
