//! `alioth-vmm`: assembles a VM from a typed [`VmConfig`] and runs it.
//!
//! A [`Machine`] owns the KVM VM, guest RAM, the port-I/O and MMIO buses with their devices,
//! and one thread per vCPU. [`Machine::run`] blocks until the guest powers off, resets, writes
//! the exit device, the user quits, a signal arrives, or something fails; every vCPU and device
//! thread is then stopped (kicked out of `KVM_RUN`) and the reason returned as an [`ExitReason`].
//!
//! ```no_run
//! use alioth_vmm::{Machine, MachineOptions, VmConfig};
//!
//! let mut config = VmConfig::new("vmlinux");
//! config.kernel.cmdline = "console=ttyS0".into();
//! config.cpus = 2;
//! config.memory = 512 << 20;
//! let machine = Machine::new(&config, MachineOptions::default())?;
//! let reason = machine.run()?;
//! println!("guest stopped: {reason}");
//! # Ok::<(), alioth_vmm::Error>(())
//! ```

mod config;
mod machine;
mod pci;
pub mod sandbox;
mod signals;
pub mod snapshot;
mod terminal;
mod vhost_user;

pub use alioth_boot::{BootProtocol, KernelSpec};
pub use alioth_devices::virtio::blk::BlkConfig;
pub use alioth_devices::virtio::console::ConsoleMode;
pub use alioth_devices::virtio::net::NetConfig;
pub use alioth_devices::virtio::vsock::VsockConfig;
pub use alioth_virtio::RateLimit;

/// Defaults and limits of virtio-net devices and their taps.
pub mod net {
    pub use alioth_devices::tap::{AUTO_NAME, MAX_NAME_LEN};
    pub use alioth_devices::virtio::net::{
        DEFAULT_MTU, DEFAULT_QUEUE_SIZE, MAX_MTU, MAX_QUEUE_PAIRS, MIN_MTU,
    };
}
pub use alioth_hv::{CpuFeature, CpuFeatureEdit, parse_cpu_features};
pub use config::{
    ConsoleDeviceConfig, DiskConfig, IoBackend, NetDeviceConfig, RngConfig, SerialConfig, VmConfig,
    VsockDeviceConfig,
};
pub use machine::{DeviceCounters, ExitReason, Machine, MachineHandle, MachineOptions, VmState};
pub use vhost_user::{VhostUserConfig, VhostUserDeviceConfig, serve_vhost_user};

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] alioth_mem::Error),
    /// The kernel, initramfs or boot tables could not be loaded.
    #[error(transparent)]
    Boot(#[from] alioth_boot::Error),
    /// KVM refused an operation.
    #[error(transparent)]
    Hv(#[from] alioth_hv::Error),
    /// A host resource (file, thread, eventfd) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A device cannot be created from its configuration (e.g. a disk image cannot be opened).
    #[error("{0}")]
    Device(String),
    /// A vCPU stopped with an error.
    #[error("vcpu{vcpu}: {reason}")]
    Vcpu {
        /// The vCPU index.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// A device or helper thread died.
    #[error("{thread} thread failed: {reason}")]
    Thread {
        /// The thread.
        thread: String,
        /// What happened.
        reason: String,
    },
}

impl Error {
    /// Whether the error comes from what the user asked for (a bad config, a missing or invalid
    /// kernel, memory that cannot be had), as opposed to a failure while running.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Config(_) | Error::Memory(_) | Error::Device(_) => true,
            Error::Boot(e) => !matches!(e, alioth_boot::Error::GuestMemory { .. }),
            _ => false,
        }
    }
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
