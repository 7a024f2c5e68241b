//! `alioth`: boot a Linux VM under KVM from a TOML file and command-line flags.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use alioth_cli::{BootArgs, CtlArgs, VhostUserArgs, api, config};
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
                // The API socket is this process's own, already serving: not checked again.
                let restore_args = BootArgs {
                    restore: Some(dir.clone()),
                    seccomp: args.seccomp.clone(),
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
