//! Places the functions a VM runs first in `alioth`'s text (symbol-order.txt, made by
//! `cargo xtask symbol-order`): the kernel maps code in whole page-cache folios around each page
//! that runs, and with that code scattered over the text a VM kept nearly all of its 3.5 MiB
//! resident; ordered, about 1 MiB. Names the binary lacks (after a toolchain or dependency
//! update) are skipped silently; the order only moves code, so a stale list costs memory, never
//! correctness.
//!
//! The option is lld's (rustc's default linker on x86_64-unknown-linux-gnu, and mold's); with
//! another linker chosen through RUSTFLAGS (`-C linker=`, `-fuse-ld=`, `linker-features`) the
//! list is left out.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let list = format!("{dir}/symbol-order.txt");
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let target = std::env::var("TARGET").unwrap_or_default();
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let other_linker = [
        "linker=",
        "fuse-ld",
        "linker-features",
        "link-self-contained",
    ]
    .iter()
    .any(|f| flags.contains(f));
    if target != "x86_64-unknown-linux-gnu" || other_linker || !std::path::Path::new(&list).exists()
    {
        return;
    }
    println!("cargo:rustc-link-arg-bin=alioth=-Wl,--symbol-ordering-file={list}");
    println!("cargo:rustc-link-arg-bin=alioth=-Wl,--no-warn-symbol-ordering");
}
