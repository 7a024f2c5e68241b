//! Helpers shared by Alioth's tests.
//!
//! ```
//! // Returns None (and says why on stderr) when `cargo xtask guest` has not been run.
//! let vmlinux = alioth_test_util::guest_artifact("vmlinux");
//! # let _ = vmlinux;
//! ```

use std::path::{Path, PathBuf};

/// The directory of the real-kernel guest artifacts: `$ALIOTH_GUEST_DIR`, else
/// `<workspace>/target/guest` (where `cargo xtask guest` puts them).
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("ALIOTH_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
    }
}

/// The path of guest artifact `name` (`vmlinux`, `vmlinuz`, `initramfs.cpio`). When it is
/// missing the test should skip: this returns `None` after saying so on stderr, unless
/// `ALIOTH_REQUIRE_GUEST` is set (as `cargo xtask ci` does), in which case it panics.
pub fn guest_artifact(name: &str) -> Option<PathBuf> {
    let p = guest_dir().join(name);
    if p.is_file() {
        return Some(p);
    }
    let msg = format!(
        "guest artifact {} is missing; run `cargo xtask guest` to fetch Debian's kernel",
        p.display()
    );
    if std::env::var_os("ALIOTH_REQUIRE_GUEST").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

pub use alioth_hv::kvm_is_hardware_backed;

/// For full-boot tests: true on hardware KVM; otherwise prints why the test is skipped — or,
/// where `ALIOTH_REQUIRE_HARDWARE_KVM=1` says the machine must have it (a hardware CI runner),
/// fails the test instead of skipping it.
pub fn require_hardware_kvm(test: &str) -> bool {
    if kvm_is_hardware_backed() {
        return true;
    }
    if std::env::var("ALIOTH_REQUIRE_HARDWARE_KVM").is_ok_and(|v| !v.is_empty() && v != "0") {
        panic!(
            "{test}: ALIOTH_REQUIRE_HARDWARE_KVM is set but /dev/kvm is not hardware-backed (no kvm_intel/kvm_amd)"
        );
    }
    eprintln!(
        "SKIPPED {test}: /dev/kvm is a software KVM here (no kvm_intel/kvm_amd module): guest \
         ring 0 is emulated at ~1M instructions/s, so a full Linux boot takes 10+ minutes. \
         This test runs on hardware-backed KVM."
    );
    false
}

/// A minimal ELF64 x86-64 executable whose single PT_LOAD segment holds `code` at physical (and
/// virtual) address `load`, with the entry point at its start. Alioth boots it like a vmlinux
/// without a PVH note: the Linux 64-bit protocol, long mode, identity-mapped low 4 GiB.
pub fn tiny_elf(code: &[u8], load: u64) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const OFFSET: usize = 0x1000;
    let mut f = vec![0u8; OFFSET];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&load.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    f[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let p = &mut f[EHDR..EHDR + PHDR];
    p[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    p[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    p[8..16].copy_from_slice(&(OFFSET as u64).to_le_bytes());
    p[16..24].copy_from_slice(&load.to_le_bytes());
    p[24..32].copy_from_slice(&load.to_le_bytes());
    p[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    p[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    p[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// Waits up to `ms` milliseconds for `fd` to be signalled and consumes the count; false on
/// timeout. Tests use it where KVM would turn an irqfd write into a guest interrupt.
pub fn wait_eventfd(fd: &alioth_hv::EventFd, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r == 1 && fd.read().is_ok()
}
