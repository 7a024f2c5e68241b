//! Places the functions a VM runs first in `alioth`'s text (symbol-order.txt, made by
//! `cargo xtask symbol-order`): the kernel maps code in whole page-cache folios around each page
//! that runs, and with that code scattered over the text a VM kept nearly all of its 3.5 MiB
//! resident; ordered, about 1.3 MiB. Names the binary lacks (after a toolchain or dependency
//! update) are skipped silently; the order only moves code, so a stale list costs memory, never
//! correctness.
//!
//! The option is lld's, rustc's own linker on x86_64-unknown-linux-gnu since Rust 1.90; with an
//! older rustc, another target, or a linker chosen in the configuration (`target.*.linker`, or
//! `-C linker=`, `-fuse-ld=`, `linker-features` in RUSTFLAGS) the list is left out.

/// Whether `rustc --version` is 1.90 or later.
fn rustc_links_with_lld() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let mut parts = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let list = format!("{dir}/symbol-order.txt");
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let target = std::env::var("TARGET").unwrap_or_default();
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let other_linker = std::env::var_os("RUSTC_LINKER").is_some()
        || [
            "linker=",
            "fuse-ld",
            "linker-features",
            "link-self-contained",
        ]
        .iter()
        .any(|f| flags.contains(f));
    if target != "x86_64-unknown-linux-gnu"
        || other_linker
        || !std::path::Path::new(&list).exists()
        || !rustc_links_with_lld()
    {
        return;
    }
    println!("cargo:rustc-link-arg-bin=alioth=-Wl,--symbol-ordering-file={list}");
    println!("cargo:rustc-link-arg-bin=alioth=-Wl,--no-warn-symbol-ordering");
}
