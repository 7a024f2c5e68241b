//! The typed VM configuration.

use std::path::PathBuf;

use alioth_boot::{BootProtocol, KernelSpec};
use alioth_devices::virtio::blk::BlkConfig;
use alioth_devices::virtio::console::ConsoleMode;
use alioth_devices::virtio::net::NetConfig;
use alioth_devices::virtio::vsock::VsockConfig;
use alioth_devices::{acpi_pm, cmos, i8042, serial};
use alioth_hv::CpuFeatureEdit;
use alioth_pci::{CONFIG_IO_LEN, CONFIG_IO_PORT};

use crate::{Error, Result};

/// Where COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Output to stdout; input from stdin (raw mode when it is a terminal).
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// No COM1.
    Off,
}

/// Which event loop serves a virtio device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring, or epoll (with a log line) where io_uring is unavailable.
    #[default]
    Auto,
    /// io_uring only (an error where it is unavailable).
    IoUring,
    /// epoll with synchronous I/O on the worker thread.
    Epoll,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image and queue settings (unused when `vhost_user` is set).
    pub blk: BlkConfig,
    /// Event loop.
    pub backend: IoBackend,
    /// Served by the vhost-user backend listening on this socket instead of in-process.
    pub vhost_user: Option<PathBuf>,
    /// Adaptive polling window in microseconds before the worker sleeps (0: off).
    pub poll_us: u32,
}

/// The virtio-rng device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RngConfig {
    /// Event loop.
    pub backend: IoBackend,
    /// Bytes and requests per second (none by default).
    pub rate_limit: alioth_virtio::RateLimit,
}

/// A virtio-net device on a host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDeviceConfig {
    /// The tap and the device's settings.
    pub net: NetConfig,
    /// Event loop.
    pub backend: IoBackend,
    /// Adaptive polling window in microseconds before the worker sleeps (0: off).
    pub poll_us: u32,
}

/// The virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockDeviceConfig {
    /// The guest's CID and the host socket.
    pub vsock: VsockConfig,
    /// Event loop.
    pub backend: IoBackend,
}

/// The virtio-console device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleDeviceConfig {
    /// Where it goes.
    pub mode: ConsoleMode,
    /// Event loop.
    pub backend: IoBackend,
}

/// A complete VM description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel, initramfs, command line and protocol.
    pub kernel: KernelSpec,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// CPU features hidden from the guest.
    pub cpu_features: Vec<CpuFeatureEdit>,
    /// COM1.
    pub serial: SerialConfig,
    /// The I/O port of the test exit device, if enabled.
    pub exit_device: Option<u16>,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// The entropy device, if enabled.
    pub rng: Option<RngConfig>,
    /// virtio-net devices, after the disks in PCI slot order.
    pub nets: Vec<NetDeviceConfig>,
    /// The vsock device, if enabled (after the net devices in PCI slot order).
    pub vsock: Option<VsockDeviceConfig>,
    /// The virtio console (hvc0), if enabled (last in PCI slot order). With
    /// [`ConsoleMode::Stdio`] it takes the terminal's input; COM1 then only prints.
    pub console: Option<ConsoleDeviceConfig>,
    /// The seccomp filters of the vCPU, device and input threads (see [`crate::sandbox`]).
    pub seccomp: crate::sandbox::SeccompMode,
}

/// The most virtio devices: 31 slots on bus 0 (slot 0 is the host bridge).
pub const MAX_PCI_DEVICES: usize = 31;

/// The longest polling window a device may ask for (1 ms): beyond it polling only burns CPU.
pub const MAX_POLL_US: u32 = 1000;

/// The most vCPUs Alioth describes (xAPIC IDs in the MADT).
pub const MAX_CPUS: u32 = 255;

impl VmConfig {
    /// A 1-vCPU, 512 MiB VM booting `kernel` with an empty command line.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: KernelSpec {
                kernel: kernel.into(),
                initramfs: None,
                cmdline: String::new(),
                protocol: BootProtocol::Auto,
            },
            cpus: 1,
            memory: 512 << 20,
            cpu_features: Vec::new(),
            serial: SerialConfig::Stdio,
            exit_device: None,
            disks: Vec::new(),
            rng: None,
            nets: Vec::new(),
            vsock: None,
            console: None,
            seccomp: crate::sandbox::SeccompMode::On,
        }
    }

    /// Checks what can be checked without touching KVM or guest memory.
    pub fn validate(&self) -> Result<()> {
        self.check(true)
    }

    /// Like [`VmConfig::validate`] for a VM restored from a snapshot: the kernel and initramfs
    /// are not read again, so they need not exist any more.
    pub fn validate_for_restore(&self) -> Result<()> {
        self.check(false)
    }

    fn check(&self, images: bool) -> Result<()> {
        if self.cpus == 0 {
            return Err(Error::Config("cpus must be at least 1".into()));
        }
        if self.cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "cpus = {} is more than the {MAX_CPUS} Alioth supports",
                self.cpus
            )));
        }
        alioth_mem::MemoryMap::new(self.memory)?;
        let k = &self.kernel.kernel;
        if images && !k.is_file() {
            return Err(Error::Config(format!(
                "kernel {} does not exist or is not a file",
                k.display()
            )));
        }
        if let Some(i) = &self.kernel.initramfs
            && images
            && !i.is_file()
        {
            return Err(Error::Config(format!(
                "initramfs {} does not exist or is not a file",
                i.display()
            )));
        }
        for d in &self.disks {
            if let Some(sock) = &d.vhost_user {
                use std::os::unix::fs::FileTypeExt;
                if !std::fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
                    return Err(Error::Config(format!(
                        "vhost-user disk socket {} does not exist or is not a socket",
                        sock.display()
                    )));
                }
            } else if !d.blk.path.is_file() {
                return Err(Error::Config(format!(
                    "disk {} does not exist or is not a file",
                    d.blk.path.display()
                )));
            }
        }
        if let Some(p) = self
            .disks
            .iter()
            .map(|d| d.poll_us)
            .chain(self.nets.iter().map(|n| n.poll_us))
            .find(|p| *p > MAX_POLL_US)
        {
            return Err(Error::Config(format!(
                "poll_us = {p}: at most {MAX_POLL_US} microseconds"
            )));
        }
        let mut taps = std::collections::HashSet::new();
        for n in &self.nets {
            n.net.validate().map_err(|e| Error::Config(e.to_string()))?;
            if !n.net.tap.contains('%') && !taps.insert(n.net.tap.as_str()) {
                return Err(Error::Config(format!(
                    "tap {} is given to two net devices",
                    n.net.tap
                )));
            }
        }
        if let Some(v) = &self.vsock {
            v.vsock
                .validate()
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        if let Some(c) = &self.console {
            alioth_devices::virtio::console::validate(&c.mode)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        let devices = self.disks.len()
            + usize::from(self.rng.is_some())
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.console.is_some());
        if devices > MAX_PCI_DEVICES {
            return Err(Error::Config(format!(
                "{devices} PCI devices requested; at most {MAX_PCI_DEVICES} fit"
            )));
        }
        if let Some(port) = self.exit_device {
            let reserved: &[(u16, u16, &str)] = &[
                (serial::COM1_PORT, serial::LEN, "COM1"),
                (i8042::BASE_PORT, i8042::LEN, "i8042"),
                (cmos::BASE_PORT, cmos::LEN, "CMOS"),
                (acpi_pm::BASE_PORT, acpi_pm::LEN, "ACPI PM"),
                (CONFIG_IO_PORT, CONFIG_IO_LEN, "PCI config"),
                // No PIC or PIT here (split irqchip), but guests probe their ports: an exit
                // device there would end the VM on the probe.
                (0x20, 2, "PIC"),
                (0xa0, 2, "PIC"),
                (0x40, 4, "PIT"),
            ];
            if let Some((_, _, who)) = reserved.iter().find(|(b, l, _)| port >= *b && port < b + l)
            {
                return Err(Error::Config(format!(
                    "exit device port {port:#x} collides with {who}"
                )));
            }
        }
        Ok(())
    }
}
