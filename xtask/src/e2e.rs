//! `cargo xtask e2e`: builds the guest kit and boots it under `alioth` once per test, checking
//! each verdict (the `ALIOTH-KIT result <test> pass` line and the exit status).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, run};

/// Per-test bound: the kit's ring-0 part is emulated on a software KVM, the rest is native.
const TIMEOUT: Duration = Duration::from_secs(120);

struct Case {
    test: &'static str,
    args: Vec<String>,
}

/// Builds the kit; returns the ELF.
pub fn build_kit(root: &Path) -> Result<PathBuf> {
    let dir = root.join("crates/guest-kit");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&dir)
            .args(["build", "--release", "--quiet"]),
    )?;
    Ok(dir.join("target/release/guest-kit"))
}

fn run_case(alioth: &Path, kit: &Path, case: &Case) -> Result<()> {
    let mut child = Command::new(alioth)
        .args([
            "boot",
            "--memory",
            "128M",
            "--exit-device",
            "on",
            "--kernel",
        ])
        .arg(kit)
        .arg("--cmdline")
        .arg(format!("kit.test={}", case.test))
        .args(&case.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting alioth")?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("timed out after {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out)?;
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err)?;
    let verdict = format!("ALIOTH-KIT result {} pass", case.test);
    if status.code() != Some(0) || !out.lines().any(|l| l.starts_with(&verdict)) {
        bail!("exit {status}\n--- serial ---\n{out}--- stderr ---\n{err}");
    }
    Ok(())
}

/// Runs every kit test; fails if any fails.
pub fn e2e(root: &Path) -> Result<()> {
    let kit = build_kit(root)?;
    run(cargo().args(["build", "--quiet", "-p", "alioth-cli"]))?;
    let alioth = root.join("target/debug/alioth");
    let disk = root.join("target/e2e-disk.img");
    std::fs::File::create(&disk)?.set_len(16 << 20)?;
    let disk_arg = format!("path={}", disk.display());
    let cases = [
        Case {
            test: "hello",
            args: vec![],
        },
        Case {
            test: "pci",
            args: vec!["--disk".into(), disk_arg.clone(), "--rng".into()],
        },
    ];
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        match run_case(&alioth, &kit, case) {
            Ok(()) => {
                passed += 1;
                eprintln!("e2e: {} ... ok", case.test);
            }
            Err(e) => {
                failed += 1;
                eprintln!("e2e: {} ... FAILED: {e:#}", case.test);
            }
        }
    }
    println!("e2e: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} guest-kit test(s) failed");
    }
    Ok(())
}
