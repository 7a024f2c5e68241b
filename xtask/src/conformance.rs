//! `cargo xtask conformance --vmm alioth|upstream|CMD`: the guest kit's virtio conformance
//! suite against a VMM, one VM per test and ring format, printed as a table test x result.
//!
//! Each VM boots the kit with `kit.test=<test> kit.ring=<ring>`, and its serial output (the
//! VMM's stdout) is read until the kit's `ALIOTH-KIT summary` line. The VM then gets two
//! seconds to stop by itself (Alioth's exit device, ACPI soft-off) before it is killed; a VM
//! that gives no verdict within the deadline is a `hang`. Every VMM gets a pseudo-terminal on
//! stdin (upstream Alioth needs one).

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::e2e::build_kit;
use crate::{cargo, run};

/// The suite, in table order.
const TESTS: &[&str] = &[
    "pci",
    "rng",
    "blk-rw",
    "blk-beyond-end",
    "blk-flush",
    "blk-discard",
    "blk-mq",
    "blk-reset",
    "blk-ro",
    "hostile-chain",
];

/// How long a VM may take to print its verdict (the longest test waits 10 s for NEEDS_RESET).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VM may take to stop by itself after its verdict.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Upstream Alioth, the first peer.
const UPSTREAM_VERSION: &str = "0.12.0";

/// One cell of the table.
struct Cell {
    /// pass, fail, skip, crash (an exception or panic in the kit) or hang.
    word: String,
    /// The kit's detail text, or what went wrong.
    detail: String,
    /// How the VM ended.
    ended: String,
    /// The VMM's peak RSS, if it could be read.
    peak_rss_kib: Option<u64>,
}

/// What a test needs from the VM: a read-only disk, two queues.
struct Needs {
    read_only: bool,
}

fn needs(test: &str) -> Needs {
    Needs {
        read_only: test == "blk-ro",
    }
}

/// A VMM under test: a name per column and how to start one VM.
enum Vmm {
    /// This tree's `alioth` on one backend.
    Alioth { bin: PathBuf, backend: &'static str },
    /// Upstream Alioth from crates.io.
    Upstream { bin: PathBuf },
    /// A command template run by `sh -c`.
    Template(String),
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The placeholders of a command template.
struct Placeholders<'a> {
    kernel: &'a Path,
    cmdline: &'a str,
    disk: &'a Path,
    memory_mib: u32,
}

/// Fills a template's `{kernel}`, `{cmdline}`, `{disk}` and `{memory}` (MiB) placeholders,
/// shell-quoted.
fn fill_template(template: &str, p: &Placeholders) -> String {
    template
        .replace("{kernel}", &sh_quote(&p.kernel.to_string_lossy()))
        .replace("{cmdline}", &sh_quote(p.cmdline))
        .replace("{disk}", &sh_quote(&p.disk.to_string_lossy()))
        .replace("{memory}", &p.memory_mib.to_string())
}

impl Vmm {
    fn command(&self, p: &Placeholders, needs: &Needs, dir: &Path) -> Result<Command> {
        Ok(match self {
            Vmm::Alioth { bin, backend } => {
                let rng = dir.join(format!("rng-{backend}.toml"));
                std::fs::write(&rng, format!("[rng]\nbackend = \"{backend}\"\n"))?;
                let mut c = Command::new(bin);
                c.args(["boot", "--exit-device", "on", "--memory"])
                    .arg(format!("{}M", p.memory_mib))
                    .arg("--kernel")
                    .arg(p.kernel)
                    .arg("--cmdline")
                    .arg(p.cmdline)
                    .arg("--config")
                    .arg(&rng)
                    .arg("--disk")
                    .arg(format!(
                        "path={},backend={backend},num_queues=2{}",
                        p.disk.display(),
                        if needs.read_only { ",read_only=on" } else { "" }
                    ));
                c
            }
            Vmm::Upstream { bin } => {
                let mut c = Command::new(bin);
                c.args(["boot", "--pvh"])
                    .arg(p.kernel)
                    .arg("--memory")
                    .arg(format!("size={}M", p.memory_mib))
                    .arg("--cmdline")
                    .arg(p.cmdline)
                    .arg("--blk")
                    .arg(format!(
                        "file,path={},api=iouring{}",
                        p.disk.display(),
                        if needs.read_only {
                            ",readonly=true"
                        } else {
                            ""
                        }
                    ))
                    .arg("--entropy");
                c
            }
            Vmm::Template(t) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("exec {}", fill_template(t, p)));
                c
            }
        })
    }
}

/// A pseudo-terminal pair: (controller, terminal). The controller must stay open while the VMM
/// runs, or reads of its terminal fail.
pub fn pty() -> Result<(OwnedFd, OwnedFd)> {
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the two ints; the name, termios and
    // winsize arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != 0 {
        bail!("openpty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by openpty and are owned by nothing else.
    Ok(unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    })
}

/// The VMM's peak RSS (VmHWM), while it runs.
fn peak_rss_kib(child: &Child) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Boots one VM and reads its verdict for `test`.
fn run_one(vmm: &Vmm, kit: &Path, test: &str, ring: &str, dir: &Path) -> Result<Cell> {
    let disk = dir.join(format!("{test}-{ring}.img"));
    std::fs::File::create(&disk)?.set_len(16 << 20)?;
    let cmdline = format!("kit.test={test} kit.ring={ring}");
    let p = Placeholders {
        kernel: kit,
        cmdline: &cmdline,
        disk: &disk,
        memory_mib: 128,
    };
    let mut cmd = vmm.command(&p, &needs(test), dir)?;
    let (_controller, terminal) = pty()?;
    let log = dir.join(format!("{test}-{ring}.stderr"));
    let mut child = cmd
        .stdin(Stdio::from(terminal))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    let prefix = format!("ALIOTH-KIT result {test} ");
    let mut verdict: Option<(String, String)> = None;
    let mut crash: Option<String> = None;
    let mut summary = false;
    let mut eof = false;
    while !summary && !eof {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                if let Some(rest) = line.strip_prefix(&prefix) {
                    let (word, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                    verdict = Some((word.to_string(), detail.to_string()));
                } else if line.starts_with("ALIOTH-KIT exception")
                    || line.starts_with("ALIOTH-KIT panic")
                {
                    crash = Some(line.to_string());
                } else if line.starts_with("ALIOTH-KIT summary") {
                    summary = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => eof = true,
        }
    }
    // Give the VM a moment to stop by itself, then stop it.
    let mut peak = peak_rss_kib(&child);
    let stop_by = Instant::now() + STOP_GRACE;
    let ended = loop {
        if let Some(st) = child.try_wait()? {
            break format!(
                "exited {}",
                st.code().map_or("by signal".into(), |c| c.to_string())
            );
        }
        peak = peak_rss_kib(&child).or(peak);
        if Instant::now() > stop_by {
            let _ = child.kill();
            let _ = child.wait();
            break "killed after the verdict".to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr_tail = || {
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        err.lines().last().unwrap_or("").to_string()
    };
    let (word, detail) = match (verdict, crash) {
        (_, Some(c)) => ("crash".to_string(), c),
        (Some((w, d)), None) => (w, d),
        (None, None) if eof => (
            "crash".to_string(),
            format!("the VMM stopped before a verdict: {}", stderr_tail()),
        ),
        (None, None) => (
            "hang".to_string(),
            format!("no verdict within {} s", VERDICT_TIMEOUT.as_secs()),
        ),
    };
    let ended = if word == "hang" {
        "killed".to_string()
    } else {
        ended
    };
    Ok(Cell {
        word,
        detail,
        ended,
        peak_rss_kib: peak,
    })
}

/// Installs upstream Alioth into `target/peers` unless it is there; returns its binary.
pub fn upstream_alioth(root: &Path) -> Result<PathBuf> {
    let peers = root.join("target/peers");
    let bin = peers.join("bin/alioth");
    let version = Command::new(&bin).arg("--version").output();
    if !version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(UPSTREAM_VERSION)) {
        run(cargo()
            .args([
                "install",
                "--locked",
                "alioth-cli",
                "--version",
                UPSTREAM_VERSION,
            ])
            .arg("--root")
            .arg(&peers))?;
    }
    Ok(bin)
}

/// `cargo xtask conformance [--vmm alioth|upstream|CMD] [--ring split|packed]`.
pub fn conformance(root: &Path, args: &[String]) -> Result<()> {
    let mut vmm = "alioth".to_string();
    let mut rings = vec!["split", "packed"];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--vmm" => vmm = it.next().context("--vmm needs a value")?.clone(),
            "--ring" => {
                rings = match it.next().map(String::as_str) {
                    Some("split") => vec!["split"],
                    Some("packed") => vec!["packed"],
                    _ => bail!("--ring needs split or packed"),
                }
            }
            other => bail!(
                "unknown argument {other}\nusage: cargo xtask conformance [--vmm alioth|upstream|CMD] [--ring split|packed]"
            ),
        }
    }
    let kit = build_kit(root)?;
    let dir = root.join("target/conformance");
    std::fs::create_dir_all(&dir)?;
    // Columns: (title, VMM, ring).
    let mut columns: Vec<(String, Vmm, &str)> = Vec::new();
    let strict = match vmm.as_str() {
        "alioth" => {
            run(cargo().args(["build", "--quiet", "-p", "alioth-cli"]))?;
            let bin = crate::bin_dir(root, "debug").join("alioth");
            for backend in ["io_uring", "epoll"] {
                for &ring in &rings {
                    let vmm = Vmm::Alioth {
                        bin: bin.clone(),
                        backend,
                    };
                    columns.push((format!("alioth {backend}/{ring}"), vmm, ring));
                }
            }
            // Alioth must pass every test: it offers every feature the suite uses.
            true
        }
        "upstream" => {
            let bin = upstream_alioth(root)?;
            for &ring in &rings {
                let vmm = Vmm::Upstream { bin: bin.clone() };
                columns.push((format!("upstream {UPSTREAM_VERSION} {ring}"), vmm, ring));
            }
            false
        }
        template => {
            if !template.contains("{kernel}") || !template.contains("{cmdline}") {
                bail!("a --vmm command template needs at least {{kernel}} and {{cmdline}}");
            }
            for &ring in &rings {
                columns.push((ring.to_string(), Vmm::Template(template.to_string()), ring));
            }
            false
        }
    };
    let mut table: Vec<Vec<Cell>> = Vec::new();
    for test in TESTS {
        let mut row = Vec::new();
        for (title, vmm, ring) in &columns {
            let cell = run_one(vmm, &kit, test, ring, &dir)?;
            eprintln!("conformance: {test} [{title}] ... {}", cell.word);
            row.push(cell);
        }
        table.push(row);
    }
    print_table(&columns, &table);
    let bad = |c: &Cell| {
        if strict {
            c.word != "pass"
        } else {
            c.word == "hang" || c.word == "crash"
        }
    };
    let n = table.iter().flatten().filter(|c| bad(c)).count();
    if n > 0 {
        bail!(
            "{n} cell(s) {}",
            if strict {
                "did not pass"
            } else {
                "gave no verdict"
            }
        );
    }
    Ok(())
}

fn print_table(columns: &[(String, Vmm, &str)], table: &[Vec<Cell>]) {
    let mut head = format!("| {:<15} |", "test");
    let mut rule = format!("| {:-<15} |", "");
    for (title, _, _) in columns {
        head.push_str(&format!(" {title} |"));
        rule.push_str(&format!(" {:-<w$} |", "", w = title.len()));
    }
    println!("\n{head}\n{rule}");
    for (test, row) in TESTS.iter().zip(table) {
        let mut line = format!("| {test:<15} |");
        for ((title, _, _), cell) in columns.iter().zip(row) {
            line.push_str(&format!(" {:<w$} |", cell.word, w = title.len()));
        }
        println!("{line}");
    }
    println!();
    // Details of every cell that did not pass, and of the hostile chain (how the VMM coped).
    for (test, row) in TESTS.iter().zip(table) {
        for ((title, _, _), cell) in columns.iter().zip(row) {
            if cell.word == "pass" && *test != "hostile-chain" {
                continue;
            }
            let rss = cell
                .peak_rss_kib
                .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
            println!(
                "- {test} [{title}]: {} {} ({}; VMM peak RSS {rss})",
                cell.word, cell.detail, cell.ended
            );
        }
    }
}

#[cfg(test)]
#[path = "conformance_test.rs"]
mod tests;
