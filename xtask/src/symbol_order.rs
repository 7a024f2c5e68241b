//! `cargo xtask symbol-order [--fresh]`: regenerates `alioth-cli/symbol-order.txt`, the
//! functions a VM runs, which the `alioth` binary's link places first in its text (lld's
//! `--symbol-ordering-file`, passed by alioth-cli's build script).
//!
//! Why: the kernel maps a binary's code in whole page-cache folios (64-256 KiB here) around
//! each page that runs, and rustc's layout scatters the code a VM runs over the whole 3.5 MiB
//! text, so nearly all of it was resident. With that code first, a VM maps about 1 MiB of it.
//!
//! How: the functions that run are found in two ways. `--fresh` seeds the list with every
//! function callgrind sees in the kit's `hello` and in its blk bench on the epoll backend at QD1
//! and QD32 (valgrind cannot run io_uring workers: it does not treat `io_uring_enter` as a
//! blocking call), adds the io_uring crates' functions and glibc's ifunc resolvers whole, then,
//! like a run without `--fresh` (which starts from the file as it is and drops names the binary
//! no longer has), it repeats: link, run the workloads (both backends, with and without
//! polling) under `perf record` of user page faults, add the function at each instruction fetch
//! that faulted, until a round adds nothing. Each round finds one function per folio touched
//! outside the ordered code. Names are the linker's (mangled); they stay valid across code
//! changes and only go stale with the toolchain or dependency versions, after which a plain run
//! brings the list back. Needs perf (and valgrind for `--fresh`) and /dev/kvm.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cargo, output, run};

/// At most this many link-and-trace rounds.
const ROUNDS: usize = 30;

/// The workloads, as `alioth boot` arguments after the kit: the kit's hello and its blk bench
/// at QD1 and QD32 on both backends, with the default polling and without.
fn workloads(img: &Path) -> Vec<Vec<String>> {
    let mut w = vec![
        vec!["--memory", "128M", "--cmdline", "kit.test=hello"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for backend in ["io_uring", "epoll"] {
        for poll in ["", ",poll_us=0"] {
            for qd in [1, 32] {
                w.push(vec![
                    "--memory".into(),
                    "256M".into(),
                    "--serial".into(),
                    "stdio".into(),
                    "--cmdline".into(),
                    format!("kit.test=bench kit.bench=blk-randread,qd={qd},secs=1"),
                    "--disk".into(),
                    format!(
                        "path={},read_only=on,backend={backend}{poll}",
                        img.display()
                    ),
                ]);
            }
        }
    }
    w
}

/// The binary's function symbols: (address, size, name), sorted by address.
fn functions(bin: &Path) -> Result<Vec<(u64, u64, String)>> {
    let nm = output(Command::new("nm").arg("-S").arg(bin))?;
    let mut v: Vec<(u64, u64, String)> = nm
        .lines()
        .filter_map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            let [addr, size, kind, name] = p[..] else {
                return None;
            };
            if !matches!(kind, "t" | "T" | "w" | "W" | "i") {
                return None;
            }
            Some((
                u64::from_str_radix(addr, 16).ok()?,
                u64::from_str_radix(size, 16).ok()?,
                name.to_string(),
            ))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The function containing `addr`.
fn function_at(funcs: &[(u64, u64, String)], addr: u64) -> Option<&str> {
    let i = funcs.partition_point(|f| f.0 <= addr).checked_sub(1)?;
    let (start, size, name) = &funcs[i];
    (addr < start + (*size).max(1)).then_some(name.as_str())
}

/// The binary's loadable segments: (file offset, virtual address).
fn segments(bin: &Path) -> Result<Vec<(u64, u64)>> {
    let out = output(Command::new("readelf").arg("-lW").arg(bin))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            if p.first() != Some(&"LOAD") {
                return None;
            }
            Some((hex(p.get(1)?)?, hex(p.get(2)?)?))
        })
        .collect())
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Functions at the instruction fetches that faulted in `data` (a `perf record` of
/// exceptions:page_fault_user on `bin`).
fn faulted(bin: &Path, data: &Path, funcs: &[(u64, u64, String)]) -> Result<Vec<String>> {
    let segs = segments(bin)?;
    let real = std::fs::canonicalize(bin)?;
    let real = real.to_string_lossy();
    let script = output(
        Command::new("perf")
            .arg("script")
            .arg("-i")
            .arg(data)
            .args(["--show-mmap-events", "-F", "ip,trace"]),
    )?;
    // (start, end, load bias) of each mapping of the binary.
    let mut maps: Vec<(u64, u64, u64)> = Vec::new();
    let mut found = Vec::new();
    for line in script.lines() {
        if line.contains("PERF_RECORD_MMAP") && line.contains(real.as_ref()) {
            // ... [0xSTART(0xLEN) @ 0xPGOFF ...]: ... PATH
            let Some(rest) = line.split('[').nth(1) else {
                continue;
            };
            let Some((start, rest)) = rest.split_once('(') else {
                continue;
            };
            let Some((len, rest)) = rest.split_once(')') else {
                continue;
            };
            let Some(pgoff) = rest.trim_start_matches(" @ ").split_whitespace().next() else {
                continue;
            };
            let (Some(start), Some(len), Some(pgoff)) = (hex(start), hex(len), hex(pgoff)) else {
                continue;
            };
            if let Some(&(_, vaddr)) = segs.iter().find(|(off, _)| off / 4096 == pgoff / 4096) {
                maps.push((start, start + len, start - vaddr / 4096 * 4096));
            }
            continue;
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(hex)
        };
        let (Some(addr), Some(code)) = (field("address="), field("error_code=")) else {
            continue;
        };
        // Bit 4: an instruction fetch.
        if code & 0x10 == 0 {
            continue;
        }
        if let Some(&(_, _, bias)) = maps.iter().find(|(s, e, _)| (*s..*e).contains(&addr))
            && let Some(f) = function_at(funcs, addr - bias)
        {
            found.push(f.to_string());
        }
    }
    Ok(found)
}

/// Every function callgrind sees `bin` run in `args` (epoll workloads only, see the module doc).
fn callgrind(bin: &Path, kit: &Path, args: &[String], out: &Path) -> Result<Vec<String>> {
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--demangle=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(bin)
        .args([
            "boot",
            "--exit-device",
            "on",
            "--seccomp",
            "off",
            "--kernel",
        ])
        .arg(kit)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("valgrind (apt-get install valgrind)")?;
    if !status.success() {
        bail!("valgrind {args:?}: {status}");
    }
    let text = std::fs::read_to_string(out)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("fn=(").or_else(|| l.strip_prefix("cfn=("))?;
            let (_, name) = rest.split_once(") ")?;
            // callgrind marks recursion levels with 'N.
            Some(name.split('\'').next()?.to_string())
        })
        .collect())
}

pub fn symbol_order(root: &Path, args: &[String]) -> Result<()> {
    let fresh = args.iter().any(|a| a == "--fresh");
    let file = root.join("alioth-cli/symbol-order.txt");
    let kit = crate::e2e::build_kit(root)?;
    let img = root.join("target/bench/in-guest.img");
    if !img.exists() {
        bail!(
            "{} is missing: `cargo xtask bench blk` makes it",
            img.display()
        );
    }
    let bin = crate::bin_dir(root, "release").join("alioth");
    let dir = root.join("target/symbol-order");
    std::fs::create_dir_all(&dir)?;
    let build = || run(cargo().args(["build", "--release", "--quiet", "-p", "alioth-cli"]));
    let mut order: Vec<String> = if fresh {
        Vec::new()
    } else {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    std::fs::write(&file, order.join("\n") + "\n")?;
    build()?;
    let funcs = functions(&bin)?;
    let names: HashSet<&str> = funcs.iter().map(|f| f.2.as_str()).collect();
    let before = order.len();
    order.retain(|n| names.contains(n.as_str()));
    eprintln!(
        "xtask: symbol-order: {} of {before} names are in the binary",
        order.len()
    );
    let mut have: HashSet<String> = order.iter().cloned().collect();
    let mut add = |order: &mut Vec<String>, n: String| {
        if names.contains(n.as_str()) && have.insert(n.clone()) {
            order.push(n);
        }
    };
    if fresh {
        for w in workloads(&img) {
            if w.iter().any(|a| a.contains("io_uring")) {
                continue;
            }
            for n in callgrind(&bin, &kit, &w, &dir.join("callgrind.out"))? {
                add(&mut order, n);
            }
        }
        for (_, _, n) in &funcs {
            if n.contains("io_uring") || n.ends_with("_ifunc") {
                add(&mut order, n.clone());
            }
        }
        eprintln!("xtask: symbol-order: seeded with {} functions", order.len());
    }
    for round in 1..=ROUNDS {
        std::fs::write(&file, order.join("\n") + "\n")?;
        build()?;
        let funcs = functions(&bin)?;
        let mut new = 0;
        for (i, w) in workloads(&img).iter().enumerate() {
            let data = dir.join(format!("faults-{i}.data"));
            let status = Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-e",
                    "exceptions:page_fault_user",
                    "-c",
                    "1",
                    "-o",
                ])
                .arg(&data)
                .arg("--")
                .arg(&bin)
                .args(["boot", "--exit-device", "on", "--kernel"])
                .arg(&kit)
                .args(w)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("perf record of {w:?}: {status}");
            }
            for n in faulted(&bin, &data, &funcs)? {
                let before = order.len();
                add(&mut order, n);
                new += order.len() - before;
            }
        }
        eprintln!("xtask: symbol-order: round {round}: {new} more functions");
        if new == 0 {
            break;
        }
    }
    std::fs::write(&file, order.join("\n") + "\n")?;
    eprintln!(
        "xtask: symbol-order: {} functions in {}",
        order.len(),
        file.display()
    );
    Ok(())
}
