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

/// Whether KVM is backed by hardware (VMX/SVM). On a software KVM such as PVM, guest ring 0 is
/// emulated at about a million instructions per second, so a full Linux boot does not finish in
/// useful time.
pub fn kvm_is_hardware_backed() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// For full-boot tests: true on hardware KVM; otherwise prints why the test is skipped.
pub fn require_hardware_kvm(test: &str) -> bool {
    if kvm_is_hardware_backed() {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: /dev/kvm is a software KVM here (no kvm_intel/kvm_amd module): guest \
         ring 0 is emulated at ~1M instructions/s, so a full Linux boot takes 10+ minutes. \
         This test runs on hardware-backed KVM."
    );
    false
}
