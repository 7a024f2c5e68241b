//! The virtio-console test of `cargo xtask e2e`: the kit's `console` test on the socket
//! backend, with this process as the terminal: it waits for the kit's ready line, sends 64 KiB
//! (which must wait, not be lost, while the kit posts no buffers) and checks the echo.

use std::io::Read;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const READY: &[u8] = b"ALIOTH-KIT console ready\n";
const ECHO: &[u8] = b"ALIOTH-KIT console echo\n";
const ROUND_TRIP: usize = 64 << 10;

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The terminal: connect (retrying until the VMM made the socket), wait for READY, send,
/// check the echo.
fn terminal(sock: &Path, deadline: Instant) -> Result<()> {
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => bail!("connecting to {}: {e}", sock.display()),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while find(&seen, READY).is_none() {
        let n = s.read(&mut buf).context("waiting for the ready line")?;
        if n == 0 {
            bail!("the console closed before the ready line");
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let data: Vec<u8> = (0..ROUND_TRIP).map(pattern).collect();
    s.write_all(&data)?;
    loop {
        if let Some(at) = find(&seen, ECHO) {
            let echo = &seen[at + ECHO.len()..];
            if echo.len() >= ROUND_TRIP {
                if echo[..ROUND_TRIP] != data[..] {
                    bail!("the echo differs from what was sent");
                }
                return Ok(());
            }
        }
        let n = s.read(&mut buf).context("reading the echo")?;
        if n == 0 {
            bail!("the console closed before the whole echo");
        }
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Boots the kit's `console` test with the console on a socket; Ok if the kit passes, the
/// echo is intact and the socket file is gone afterwards.
pub fn run_case(alioth: &Path, kit: &Path, backend: &str, ring: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "alioth-console-{}-{backend}-{ring}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("c.sock");
    let child = crate::e2e::kit_boot_args(&mut Command::new(alioth), kit, "128M")
        .arg("--cmdline")
        .arg(format!("kit.test=console kit.ring={ring}"))
        .arg("--config")
        .arg({
            let cfg = dir.join("vm.toml");
            std::fs::write(
                &cfg,
                format!("[console]\nmode = \"socket:c.sock\"\nbackend = \"{backend}\"\n"),
            )?;
            cfg
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let host = {
        let sock = sock.clone();
        std::thread::spawn(move || terminal(&sock, deadline))
    };
    let (status, out, err) = crate::e2e::finish(child, deadline)?;
    let host = host
        .join()
        .map_err(|_| anyhow::anyhow!("the terminal thread panicked"))?;
    let left = sock.exists();
    let _ = std::fs::remove_dir_all(&dir);
    let passed = out
        .lines()
        .any(|l| l.starts_with("ALIOTH-KIT result console pass"));
    if !passed || status.code() != Some(0) {
        bail!("exit {status}\n--- serial ---\n{out}--- stderr ---\n{err}");
    }
    if let Err(e) = host {
        bail!("terminal: {e:#}\n--- serial ---\n{out}--- stderr ---\n{err}");
    }
    if left {
        bail!("{} is left behind", sock.display());
    }
    Ok(())
}
