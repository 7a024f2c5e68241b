//! `alioth-boot`: puts a kernel, its command line, initramfs and the firmware tables a kernel
//! expects into guest memory, and says how the boot vCPU must start.
//!
//! Supported images: bzImage (Linux 64-bit boot protocol entry), ELF vmlinux (64-bit entry) and
//! ELF with a PVH note (PVH entry in 32-bit protected mode). The loader fills the zero page or
//! the PVH start_info, the e820 map from [`alioth_mem::MemoryMap`], and ACPI tables (RSDP, XSDT,
//! hardware-reduced FADT, MADT, DSDT) that describe the vCPUs, the IOAPIC and COM1.
//!
//! ```no_run
//! use alioth_boot::acpi::{AcpiConfig, PmPorts};
//! use alioth_boot::{BootProtocol, KernelSpec, load_kernel};
//! use alioth_mem::{MemoryMap, RamBus};
//!
//! let ram = RamBus::new(MemoryMap::new(256 << 20)?)?;
//! let pm = PmPorts { sleep_control: 0x3c0, sleep_status: 0x3c1, reset: 0x3c2, reset_value: 1, timer: Some(0x3c4) };
//! let acpi = AcpiConfig { nr_vcpus: 1, serials: vec![], pm, ecam: None };
//! let spec = KernelSpec {
//!     kernel: "vmlinux".into(),
//!     initramfs: None,
//!     cmdline: "console=ttyS0".into(),
//!     protocol: BootProtocol::Auto,
//! };
//! let booted = load_kernel(&ram, &spec, &acpi)?;
//! println!("entry {:#x}", booted.cpu.rip);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod acpi;
mod linux;
pub mod x86;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use alioth_arch::BootCpuState;

pub use linux::{ZERO_PAGE_ADDR, load_kernel, read_setup_header, zero_page};
/// The zero page and setup header types (from linux-loader).
pub use linux_loader::loader::bootparam::{boot_params, setup_header};

/// How to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH if the image is an ELF with a PVH note, else the Linux 64-bit boot protocol.
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (zero page in RSI, long mode).
    Linux64,
    /// PVH (start_info in RBX, 32-bit protected mode). Needs an ELF with a PVH note.
    Pvh,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    /// Kernel image: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Boot protocol.
    pub protocol: BootProtocol,
}

/// The kind of kernel image found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage.
    BzImage,
    /// An ELF executable.
    Elf,
}

/// The result of loading: how the boot vCPU starts, and where things went.
#[derive(Debug, Clone)]
pub struct BootedKernel {
    /// The boot vCPU's initial state.
    pub cpu: BootCpuState,
    /// The image format.
    pub format: KernelFormat,
    /// The protocol used.
    pub protocol: BootProtocol,
    /// Guest-physical range of the kernel (including the space it decompresses into).
    pub kernel_range: (u64, u64),
    /// Guest-physical start and size of the initramfs, if any.
    pub initramfs: Option<(u64, u64)>,
    /// Guest-physical address of the ACPI RSDP.
    pub rsdp_addr: u64,
}

/// Errors of kernel loading. Each names the file or the limit involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither a bzImage nor an ELF.
    #[error("{path} is not a kernel image (neither a bzImage nor an ELF vmlinux)")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The kernel image is damaged or of an unsupported kind.
    #[error("cannot load kernel {path}: {reason}")]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The kernel does not fit in guest RAM.
    #[error(
        "kernel {path} needs guest memory up to {needed:#x} but RAM below the 32-bit hole ends at {available:#x}; give the VM more memory"
    )]
    KernelTooLarge {
        /// The file.
        path: PathBuf,
        /// End address the kernel needs.
        needed: u64,
        /// End of low RAM.
        available: u64,
    },
    /// The initramfs does not fit between the kernel and the highest address it may use.
    #[error(
        "initramfs {path} ({size} bytes) does not fit: only {available} bytes are free between the kernel and {limit:#x}; give the VM more memory or use a smaller initramfs"
    )]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Free space.
        available: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// PVH was requested but the image has no PVH note.
    #[error("{path} has no PVH entry note (boot it with the linux64 protocol)")]
    NoPvhNote {
        /// The file.
        path: PathBuf,
    },
    /// Writing into guest memory failed.
    #[error("cannot write {what} to guest memory at {addr:#x}")]
    GuestMemory {
        /// What was written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
    /// The ACPI tables do not fit their area.
    #[error("ACPI tables: {0}")]
    Acpi(String),
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads the first bytes of `path` to tell a bzImage from an ELF.
pub fn detect_format(path: &Path) -> Result<KernelFormat> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut head = vec![0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(io)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::NotAKernel {
        path: path.to_path_buf(),
    })
}
