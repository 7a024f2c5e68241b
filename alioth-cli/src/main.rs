//! `alioth`: boot a Linux VM under KVM from a TOML file and command-line flags.

mod api;
mod config;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use alioth_vmm::{ExitReason, Machine, MachineOptions};

/// Exit status when the VM ran into a runtime failure.
const EXIT_RUNTIME: u8 = 1;
/// Exit status for a bad command line or configuration.
const EXIT_USAGE: u8 = 2;

/// Alioth: a KVM virtual machine monitor.
///
/// Exit status: 0 when the guest stopped normally (power-off, reset, Ctrl-A x, a termination
/// signal), the guest's own status when it wrote the exit device, 1 on a runtime failure (for
/// example a KVM internal error), 2 on a usage or configuration error.
#[derive(Parser, Debug)]
#[command(name = "alioth", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log verbosity: -v for info, -vv for debug, -vvv for trace (RUST_LOG overrides it).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM. Flags override the values of the --config file.
    Boot(Box<BootArgs>),
    /// Serve a device as a vhost-user backend (to QEMU, Cloud Hypervisor, User-Mode Linux or
    /// alioth itself) until stopped. Either a device subcommand or --config.
    VhostUser(VhostUserArgs),
    /// Drive a running VM through its API socket (`alioth boot --api-socket PATH`).
    Ctl(CtlArgs),
}

/// Options of `alioth ctl`.
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

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Boot(args) => boot(*args),
        Command::VhostUser(args) => vhost_user(args),
        Command::Ctl(args) => ctl(args),
    }
}

fn ctl(args: CtlArgs) -> ExitCode {
    let (method, path, body) = match api::ctl_request(&args.command, args.dir.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("alioth ctl: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match alioth_api::client::call(&args.api_socket, method, path, body.as_deref()) {
        Ok((status, text)) if (200..300).contains(&status) => {
            use std::io::Write;
            let out = if args.json {
                text
            } else {
                api::human(&args.command, &text)
            };
            // A reader that went away (`| head`) is not an error of ours.
            if !out.is_empty() {
                let _ = writeln!(std::io::stdout(), "{out}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, text)) => {
            eprintln!("alioth ctl: {status}: {text}");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            eprintln!("alioth ctl: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn vhost_user(args: VhostUserArgs) -> ExitCode {
    let config = match config::build_vhost_user(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("alioth: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match alioth_vmm::serve_vhost_user(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("alioth: {e}");
            ExitCode::from(if e.is_user_error() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

/// The API server, its thread under the API threads' seccomp filter.
fn start_api(
    path: &std::path::Path,
    control: std::sync::Arc<api::VmControl>,
    mode: alioth_vmm::sandbox::SeccompMode,
) -> Result<alioth_api::ApiServer, alioth_api::ApiError> {
    alioth_api::ApiServer::start_with(path, control, move || {
        alioth_vmm::sandbox::install(alioth_vmm::sandbox::ThreadKind::Api, mode)
            .map_err(|e| e.to_string())
    })
}

/// `alioth boot --api-socket PATH` and nothing else: a VMM with no VM yet, waiting for the
/// API's `vm.restore` (as Cloud Hypervisor started with only `--api-socket` does).
fn waits_for_restore(args: &BootArgs) -> bool {
    args.api_socket.is_some()
        && args.config.is_none()
        && args.kernel.is_none()
        && args.restore.is_none()
}

/// Serves the API with no VM until `vm.restore` names a snapshot that restores (then runs it)
/// or `vmm.shutdown` arrives.
fn wait_for_restore(args: &BootArgs) -> ExitCode {
    let Some(sock) = args.api_socket.clone() else {
        return ExitCode::from(EXIT_USAGE);
    };
    let mode = match config::parse_seccomp(args.seccomp.as_deref().unwrap_or("on")) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("alioth: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let control = std::sync::Arc::new(api::VmControl::waiting(tx));
    let _server = match start_api(&sock, control.clone(), mode) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("alioth: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = sandbox_main(mode) {
        eprintln!("alioth: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    loop {
        match rx.recv() {
            Ok(api::Waiting::Restore(dir, reply)) => {
                let restore_args = BootArgs {
                    restore: Some(dir.clone()),
                    api_socket: Some(sock.clone()),
                    ..Default::default()
                };
                let built = config::build_boot(&restore_args).and_then(|(config, _)| {
                    let description = config::to_toml(&config, Some(&sock))?;
                    let options = MachineOptions {
                        handle_signals: true,
                        ..Default::default()
                    };
                    let m = Machine::restore(&config, &dir, options)?;
                    Ok((config, description, m))
                });
                match built {
                    Ok((config, description, machine)) => {
                        control.set_vm(config, description);
                        control.set_machine(Some(machine.handle()));
                        let _ = reply.send(alioth_api::Response::done());
                        return finish(machine.run(), &control);
                    }
                    Err(e) => {
                        let _ = reply.send(alioth_api::Response::error(400, format!("{e:#}")));
                    }
                }
            }
            Ok(api::Waiting::Shutdown) | Err(_) => return ExitCode::SUCCESS,
        }
    }
}

/// The SIGSYS reporter and the main thread's seccomp filter (see alioth_vmm::sandbox).
fn sandbox_main(
    mode: alioth_vmm::sandbox::SeccompMode,
) -> Result<(), alioth_vmm::sandbox::SandboxError> {
    use alioth_vmm::sandbox::{SeccompMode, ThreadKind, install, install_sigsys_handler};
    if mode == SeccompMode::On {
        install_sigsys_handler();
    }
    install(ThreadKind::Main, mode)
}

/// The exit status for how a machine stopped (a reboot is not an answer here).
fn finish(result: alioth_vmm::Result<ExitReason>, control: &api::VmControl) -> ExitCode {
    control.set_machine(None);
    match result {
        Ok(reason) => {
            log::info!("{reason}");
            match reason {
                ExitReason::GuestExit(status) => ExitCode::from(status),
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("alioth: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn boot(args: BootArgs) -> ExitCode {
    if waits_for_restore(&args) {
        return wait_for_restore(&args);
    }
    let (config, api_socket) = match config::build_boot(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("alioth: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let description = match config::to_toml(&config, api_socket.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("alioth: {e:#}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let control = std::sync::Arc::new(api::VmControl::new(config.clone(), description));
    let mut restore = args.restore.clone();
    let mut server = None;
    // A reboot through the API builds the machine again from the same configuration.
    let mut main_filtered = false;
    loop {
        let options = MachineOptions {
            handle_signals: true,
            ..Default::default()
        };
        // A reboot after a restore boots the kernel afresh.
        let built = match restore.take() {
            Some(dir) => Machine::restore(&config, &dir, options),
            None => Machine::new(&config, options),
        };
        let machine = match built {
            Ok(m) => m,
            Err(e) => {
                eprintln!("alioth: {e}");
                return ExitCode::from(if e.is_user_error() {
                    EXIT_USAGE
                } else {
                    EXIT_RUNTIME
                });
            }
        };
        control.set_machine(Some(machine.handle()));
        // The API socket appears once there is a machine to answer for.
        if let (Some(p), None) = (&api_socket, &server) {
            match start_api(p, control.clone(), config.seccomp) {
                Ok(s) => server = Some(s),
                Err(e) => {
                    eprintln!("alioth: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        // The main thread's filter goes on once, before the guest runs (its threads add theirs).
        if !main_filtered {
            if let Err(e) = sandbox_main(config.seccomp) {
                eprintln!("alioth: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            main_filtered = true;
        }
        let result = machine.run();
        if matches!(result, Ok(ExitReason::RebootRequested)) {
            log::info!("rebooting");
            control.set_machine(None);
            continue;
        }
        return finish(result, &control);
    }
}
