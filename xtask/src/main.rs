//! `cargo xtask`: Alioth's developer tasks.
//!
//! - `cargo xtask guest`: fetch Debian's cloud kernel and busybox-static with `apt-get download`
//!   and build the test guest artifacts under `target/guest/`.
//! - `cargo xtask ci`: what CI runs: guest artifacts, `cargo fmt --check`, clippy with
//!   `-D warnings`, every test, `crates`, `e2e`, `conformance --vmm alioth`, `uml` and a short
//!   `fuzz`.
//! - `cargo xtask fuzz [--secs N] [TARGET]`: the cargo-fuzz targets (nightly).
//! - `cargo xtask uml`: User-Mode Linux's own virtio_blk driver against `alioth vhost-user`.
//! - `cargo xtask conformance --vmm alioth|upstream|CMD`: the guest kit's virtio conformance
//!   suite against a VMM, as a table test x result (docs/conformance.md).
//! - `cargo xtask crates`: the library crates as other VMMs take them: no unused dependencies
//!   (cargo-machete), the layering of docs/architecture.md, each crate's example, `cargo package`.

mod api;
mod conformance;
mod console;
mod cpio;
mod e2e;
mod fuzz;
mod guest;
mod net;
mod snapshot;
mod symbol_order;
mod uml;
mod vsock;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command and returns its standard output, failing with its name if it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    eprintln!("xtask: running {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where cargo puts `profile`'s binaries of the workspace (or the kit) rooted at `root`:
/// `.cargo/config.toml` names the target (for static linking), so they sit under its triple.
pub fn bin_dir(root: &Path, profile: &str) -> PathBuf {
    root.join("target/x86_64-unknown-linux-gnu").join(profile)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed with {status}", cmd.get_program());
    }
    Ok(())
}

/// The value of `--secs N` among a bench's arguments (3 by default).
pub fn secs_arg(args: &[String]) -> u64 {
    args.iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    let kit = workspace_root().join("crates/guest-kit");
    run(cargo().current_dir(&kit).args(["fmt", "--", "--check"]))?;
    run(cargo()
        .current_dir(&kit)
        .args(["clippy", "--release", "--", "-D", "warnings"]))?;
    let guest_dir = guest::build(&workspace_root())?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo()
        .args([
            "test",
            "--workspace",
            "--all-targets",
            "--",
            "--show-output",
        ])
        .env("ALIOTH_GUEST_DIR", &guest_dir)
        .env("ALIOTH_REQUIRE_GUEST", "1"))?;
    run(cargo()
        .args(["test", "--workspace", "--doc"])
        .env("ALIOTH_GUEST_DIR", &guest_dir))?;
    crates_stand_alone(&guest_dir)?;
    e2e::e2e(&workspace_root())?;
    conformance::conformance(&workspace_root(), &[])?;
    uml::uml(&workspace_root())?;
    // The vsock bench moves more data per connection than any e2e case (its buffers are freed
    // on the worker, which once tripped the seccomp filter): one short run of each stream, its
    // figures printed, not judged.
    vsock::bench(&workspace_root(), &["--secs".into(), "1".into()])?;
    fuzz::fuzz(&workspace_root(), &["--secs".into(), "10".into()])?;
    Ok(())
}

/// The library crates as other VMMs would take them: no unused dependencies, the layering the
/// architecture promises, each crate's example run on its own, and every publishable crate
/// packaged (which fails if anything refers outside its crate).
fn crates_stand_alone(guest_dir: &Path) -> Result<()> {
    let machete = || {
        let mut c = Command::new("cargo-machete");
        c.current_dir(workspace_root());
        c
    };
    if !machete()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(cargo().args(["install", "cargo-machete", "--locked", "--version", "0.9.2"]))?;
    }
    run(machete().arg("."))?;
    check_layering()?;
    let vmlinuz = guest_dir.join("vmlinuz");
    let vmlinuz = vmlinuz.to_string_lossy();
    for (krate, example, args) in [
        ("alioth-queue", "walk_chain", vec![]),
        ("alioth-io-uring", "blk_over_io_uring", vec![]),
        ("alioth-boot", "zero_page", vec![vmlinuz.as_ref(), "256M"]),
        ("alioth-hv", "three_instructions", vec![]),
        ("alioth-pci", "enumerate", vec![]),
        ("alioth-api", "ping", vec![]),
    ] {
        run(cargo()
            .args(["run", "-q", "-p", krate, "--example", example, "--"])
            .args(args))?;
    }
    forget_packaged_sources()?;
    run(cargo().args([
        "package",
        "--workspace",
        "--allow-dirty",
        "--exclude",
        "xtask",
        "--exclude",
        "alioth-test-util",
    ]))
}

/// `cargo package` verifies each crate against the others unpacked from a temporary registry,
/// and cargo caches that unpacking under `$CARGO_HOME/registry/src/-<hash of the path>/`. A
/// later run from the same folder with the same version number would verify against those stale
/// sources, so they go first.
fn forget_packaged_sources() -> Result<()> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let Ok(registries) = std::fs::read_dir(home.join("registry/src")) else {
        return Ok(());
    };
    for reg in registries.flatten() {
        // Local (path) registries are named `-<hash>`; crates.io's are `index.crates.io-...`.
        if !reg.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for krate in std::fs::read_dir(reg.path())?.flatten() {
            if krate.file_name().to_string_lossy().starts_with("alioth-") {
                std::fs::remove_dir_all(krate.path())?;
            }
        }
    }
    Ok(())
}

/// What each crate may depend on (normal dependencies, transitively): the crates other VMMs
/// embed must not drag in the layers above them or KVM.
fn check_layering() -> Result<()> {
    let forbidden: [(&str, &[&str]); 8] = [
        ("alioth-api", &["alioth-", "kvm-ioctls", "io-uring"]),
        ("alioth-queue", &["alioth-", "kvm-ioctls", "io-uring"]),
        (
            "alioth-virtio",
            &["alioth-pci", "alioth-mem", "kvm-ioctls", "io-uring"],
        ),
        (
            "alioth-io-uring",
            &["alioth-pci", "alioth-virtio-pci", "kvm-ioctls"],
        ),
        (
            "alioth-pci",
            &["alioth-virtio", "alioth-queue", "kvm-ioctls"],
        ),
        ("alioth-boot", &["alioth-hv", "kvm-ioctls", "kvm-bindings"]),
        ("alioth-arch", &["alioth-", "kvm-ioctls"]),
        (
            "alioth-vhost-user",
            &["alioth-pci", "alioth-virtio-pci", "kvm-ioctls", "io-uring"],
        ),
    ];
    for (krate, banned) in forbidden {
        let tree = output(cargo().args([
            "tree", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
        ]))?;
        let deps: Vec<&str> = tree
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        if let Some(bad) = deps
            .iter()
            .find(|d| banned.iter().any(|b| d.starts_with(b) && **d != krate))
        {
            bail!("{krate} depends on {bad}, which its layer must not (see docs/architecture.md)");
        }
    }
    eprintln!("xtask: crate layering holds");
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("blk") => {
            run(cargo()
                .args(["bench", "-p", "alioth-devices", "--bench", "blk", "--"])
                .args(&args[1..]))?;
            e2e::bench_in_guest(&workspace_root(), &args[1..])
        }
        Some("vhost-user-blk") => uml::bench(&workspace_root(), &args[1..]),
        Some("net") => net::bench(&workspace_root(), &args[1..]),
        Some("vsock") => vsock::bench(&workspace_root(), &args[1..]),
        Some("rate-limit") => e2e::bench_rate_limit(&workspace_root(), &args[1..]),
        Some("startup") => e2e::bench_startup(&workspace_root(), &args[1..]),
        _ => bail!(
            "usage: cargo xtask bench blk|vhost-user-blk|net|vsock|rate-limit|startup [--secs N]"
        ),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo xtask <task>\n\n\
         tasks:\n  \
         guest   fetch Debian's cloud kernel + busybox and build target/guest/\n  \
         ci      guest artifacts, fmt check, clippy -D warnings, all tests, crates, e2e\n  \
         crates  unused dependencies, crate layering, each crate's example, cargo package\n  \
         e2e     build the guest kit and run its tests under alioth\n  \
         fuzz [--secs N] [TARGET]  the cargo-fuzz targets, N seconds each (default 10)\n  \
         conformance [--vmm alioth|upstream|CMD] [--ring split|packed]\n          \
         the kit's virtio conformance suite against a VMM, as a table\n  \
         uml     User-Mode Linux's virtio_blk against alioth's vhost-user backend\n  \
         bench blk [--secs N]  virtio-blk 4 KiB random-read IOPS vs a plain io_uring loop\n  \
         bench vhost-user-blk [--secs N]  UML random reads: alioth's backend vs qemu-storage-daemon\n  \
         bench net [--secs N]  virtio-net frame rates vs a host-only process on the same tap\n  \
         bench vsock [--secs N]  virtio-vsock stream throughput vs a Unix socket pair on the host\n  \
         bench rate-limit [--secs N]  a rate-limited disk's in-guest IOPS next to its limit\n  \
         bench startup [--no-peer]  exec -> first kit line / verdict / exit, vs upstream Alioth\n  \
         symbol-order [--fresh]  regenerate alioth-cli/symbol-order.txt (perf; valgrind for --fresh)"
    );
    std::process::exit(2);
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("guest") => guest::build(&workspace_root()).map(|dir| {
            eprintln!("xtask: guest artifacts in {}", dir.display());
        }),
        Some("ci") => ci(),
        Some("crates") => crates_stand_alone(&guest::build(&workspace_root())?),
        Some("bench") => bench(&args[1..]),
        Some("e2e") => e2e::e2e(&workspace_root()),
        // The host side of the net tests, run by e2e inside a test namespace.
        Some("net-peer") => match args.get(1).map(String::as_str) {
            Some(s) if s.starts_with("bench-") || s == "counter" || s == "uml-serve" => {
                net::bench_peer(&args[1..])
            }
            steps => net::peer(steps.unwrap_or("")),
        },
        Some("conformance") => conformance::conformance(&workspace_root(), &args[1..]),
        Some("fuzz") => fuzz::fuzz(&workspace_root(), &args[1..]),
        Some("uml") => uml::uml(&workspace_root()),
        Some("symbol-order") => symbol_order::symbol_order(&workspace_root(), &args[1..]),
        _ => usage(),
    }
}
