//! `cargo xtask fuzz [--secs N] [TARGET]`: runs the cargo-fuzz targets of `fuzz/` (chain
//! walks, virtio-blk requests, the kernel loader, virtio-pci register traffic, the TOML configuration and device specs) and of `crates/vhost-user/fuzz` (vhost-user
//! messages), each for N seconds (default 10) from its checked-in seeds, and prints executions
//! per target. A crash fails the task and leaves its input in the target's `artifacts/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// (fuzz crate, target, seed folder relative to the crate)
const TARGETS: &[(&str, &str)] = &[
    ("fuzz", "chain_walk"),
    ("fuzz", "blk_requests"),
    ("fuzz", "kernel_loader"),
    ("fuzz", "pci_registers"),
    ("fuzz", "toml_config"),
    ("crates/vhost-user/fuzz", "messages"),
];

const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn ensure_tools() -> Result<()> {
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

/// Copies `from`'s files into a fresh `to` (the run's corpus, outside the source tree).
fn fresh_corpus(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    if let Ok(entries) = std::fs::read_dir(from) {
        for e in entries.flatten() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// `cargo xtask fuzz`.
pub fn fuzz(root: &Path, args: &[String]) -> Result<()> {
    let mut secs = 10u64;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().context("--secs N")?.parse().context("--secs N")?,
            t if !t.starts_with('-') => only = Some(t.to_string()),
            other => bail!("unknown argument {other}\nusage: cargo xtask fuzz [--secs N] [TARGET]"),
        }
    }
    ensure_tools()?;
    let mut rows = Vec::new();
    for &(krate, target) in TARGETS {
        if only.as_deref().is_some_and(|o| o != target) {
            continue;
        }
        let dir = root.join(krate);
        let seeds = dir.join("seeds").join(target);
        let corpus: PathBuf = root.join("target/fuzz-corpus").join(target);
        fresh_corpus(&seeds, &corpus)?;
        // The targets write their inputs to files (an image, a kernel, a config) in TMPDIR:
        // give them one that goes away with the run.
        let scratch = root.join("target/fuzz-tmp").join(target);
        std::fs::create_dir_all(&scratch)?;
        let out = Command::new("cargo")
            .current_dir(&dir)
            .env("TMPDIR", &scratch)
            .args(["+nightly", "fuzz", "run", "-O", target])
            .arg(&corpus)
            .args(["--", "-rss_limit_mb=2048"])
            .arg(format!("-max_total_time={secs}"))
            .output()
            .with_context(|| format!("running cargo fuzz for {target}"));
        let _ = std::fs::remove_dir_all(&scratch);
        let out = out?;
        let text = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed (the input is in {}/artifacts/{target}):\n{}",
                dir.display(),
                tail.join("\n")
            );
        }
        let runs: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Done "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        rows.push((target, runs));
    }
    if rows.is_empty() {
        bail!("no fuzz target named {}", only.unwrap_or_default());
    }
    println!("\nfuzz: {secs} s per target, no crash");
    println!("| target | executions | per second |");
    println!("| --- | --- | --- |");
    for (t, runs) in rows {
        println!("| {t} | {runs} | {:.0} |", runs as f64 / secs as f64);
    }
    Ok(())
}
