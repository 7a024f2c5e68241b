//! The `alioth` command line as a library: the argument structures (clap), the TOML schema and
//! its merge into a `VmConfig`, and the control-plane glue. The `alioth` binary is its only
//! user besides the fuzz target for configuration files and the tests.
// The argument and schema structures document themselves through clap's help and
// docs/config.md; their fields are not an API.
#![allow(missing_docs)]

pub mod api;
pub mod config;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: std::path::PathBuf,
    /// Print the API's JSON answer as it is (for scripts) instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// ping | info | counters | pause | resume | shutdown | reboot | power-button |
    /// vmm-shutdown | snapshot DIR | restore DIR
    pub command: String,
    /// The directory of `snapshot` and `restore`.
    pub dir: Option<String>,
}

/// Options of `alioth vhost-user`.
#[derive(Args, Debug, Default)]
pub struct VhostUserArgs {
    /// TOML file: `socket = "PATH"` and a `[blk]` table (the keys of `[[disk]]`), a `[net]`
    /// table (the keys of `[[net]]`) or an `[rng]` table. Relative paths are relative to the file's directory.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// The device.
    #[command(subcommand)]
    pub device: Option<VhostUserDevice>,
}

/// A device `alioth vhost-user` serves.
#[derive(Subcommand, Debug)]
pub enum VhostUserDevice {
    /// virtio-blk on a disk image.
    Blk {
        /// The Unix socket to listen on (a stale socket is replaced; one in use is an error).
        #[arg(long, value_name = "PATH")]
        socket: std::path::PathBuf,
        /// The disk, as for `alioth boot --disk`: PATH or `path=PATH[,read_only=on]...`.
        #[arg(long, value_name = "SPEC")]
        disk: String,
    },
    /// virtio-net on a host tap.
    Net {
        /// The Unix socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: std::path::PathBuf,
        /// The device, as for `alioth boot --net`: `tap=NAME,mac=..,queues=N,...` (a named tap
        /// is reopened for each frontend).
        #[arg(long, value_name = "SPEC")]
        net: String,
    },
    /// virtio-rng, fed by the host's getrandom.
    Rng {
        /// The Unix socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: std::path::PathBuf,
        /// Event loop: auto, io_uring or epoll.
        #[arg(long, value_name = "B")]
        backend: Option<String>,
    },
}

/// Options of `alioth boot`.
#[derive(Args, Debug, Default)]
pub struct BootArgs {
    /// TOML file describing the VM (see docs/config.md). Relative paths in it are relative to
    /// the file's own directory.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Kernel image: a bzImage or an ELF vmlinux.
    #[arg(short, long, value_name = "PATH")]
    pub kernel: Option<std::path::PathBuf>,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(short, long, value_name = "PATH")]
    pub initramfs: Option<std::path::PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1-255).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest RAM: bytes or a size with a K, M, G or T suffix (e.g. 512M, 2G). Default 512M.
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Where COM1 goes: `stdio` (stdin/stdout; raw terminal, Ctrl-A x quits), `off`, or
    /// `file:PATH` (output appended to PATH).
    #[arg(long, value_name = "MODE")]
    pub serial: Option<String>,
    /// CPU features to hide from the guest, e.g. `-xsave,-cx16` (like QEMU's -cpu host,-feat).
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    pub cpu_features: Option<String>,
    /// Boot protocol: `auto` (PVH when the ELF has the note, else the 64-bit Linux protocol),
    /// `linux64` or `pvh`.
    #[arg(long, value_name = "PROTOCOL")]
    pub boot_protocol: Option<String>,
    /// Add a virtio-blk disk (repeatable; replaces the file's [[disk]] list): a raw image PATH,
    /// or `path=PATH[,read_only=on][,num_queues=N][,queue_size=N][,direct=on][,backend=B]` with
    /// B one of auto, io_uring, epoll; or `vhost_user=SOCKET` for a disk served by a vhost-user
    /// backend (`alioth vhost-user blk`, qemu-storage-daemon, ...).
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// Add a virtio-net device on a host tap (repeatable; replaces the file's [[net]] list):
    /// `tap=NAME|auto,mac=MAC,queues=N,queue_size=N,mtu=N,backend=B`. `auto` creates a tap
    /// named alioth%d; a named tap is attached (created if missing) with multi_queue and
    /// vnet_hdr.
    #[arg(long = "net", value_name = "SPEC")]
    pub net: Vec<String>,
    /// Add a virtio-rng entropy device (fed by the host's getrandom).
    #[arg(long)]
    pub rng: bool,
    /// Add a virtio-vsock device (replaces the file's [vsock]):
    /// `cid=N,uds=PATH[,max_connections=N][,backend=B]`. Host programs connect to PATH and
    /// write `CONNECT <port>\n`; guest connections to host port P go to `PATH_P`.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// Add a virtio console (hvc0 in a Linux guest; replaces the file's [console]): `stdio`
    /// (the terminal's input then goes to it rather than COM1; Ctrl-A x quits), `pty` (a new
    /// pseudo-terminal, its path printed), `file:PATH` (output appended), `socket:PATH` (a Unix
    /// socket; one client at a time is the terminal) or `off`.
    #[arg(long, value_name = "MODE")]
    pub console: Option<String>,
    /// Restore the VM from the snapshot in DIR (written by `alioth ctl snapshot DIR` or the
    /// API's vm.snapshot) instead of booting: its configuration comes from the snapshot;
    /// --disk (all of them), --serial, --console, --vsock, --net and --api-socket may replace
    /// their host side.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<std::path::PathBuf>,
    /// seccomp filters (docs/security.md): `on` (default: a thread making a syscall outside its
    /// list stops the VMM, naming the syscall), `log` (the kernel logs it and it runs) or `off`.
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<String>,
    /// Serve the control API (Cloud Hypervisor's HTTP API subset, see docs/api.md) on this Unix
    /// socket; `alioth ctl --api-socket PATH ...` and curl --unix-socket drive it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<std::path::PathBuf>,
    /// Enable the test exit device: `on` (port 0xf4) or a port number. The value the guest writes
    /// there becomes alioth's exit status.
    #[arg(long, value_name = "on|PORT")]
    pub exit_device: Option<String>,
}
