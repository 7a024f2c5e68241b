//! The VM's control plane: `alioth-api`'s requests carried out on the running machine, and the
//! `alioth ctl` client.

use std::path::Path;
use std::sync::Mutex;

use alioth_api::{Request, Response};
use alioth_vmm::{ConsoleMode, MachineHandle, SerialConfig, VmConfig, VmState};
use serde_json::{Value, json};

/// What the API thread needs: the configuration (for `vm.info`) and the machine running now
/// (replaced on reboot; `None` between machines).
pub struct VmControl {
    /// The VM (none while waiting for `vm.restore`) and its configuration as TOML, for
    /// snapshot manifests.
    vm: Mutex<Option<(VmConfig, String)>>,
    machine: Mutex<Option<MachineHandle>>,
    /// Set while the process has no VM and waits for `vm.restore`.
    waiting: Option<Mutex<std::sync::mpsc::Sender<Waiting>>>,
}

/// What the API asks of a process that has no VM yet.
pub enum Waiting {
    /// Restore the snapshot in this directory; answer on the sender.
    Restore(std::path::PathBuf, std::sync::mpsc::Sender<Response>),
    /// `vmm.shutdown`.
    Shutdown,
}

impl VmControl {
    /// A controller for the VM `config` (`description` as TOML) describes.
    pub fn new(config: VmConfig, description: String) -> Self {
        VmControl {
            vm: Mutex::new(Some((config, description))),
            machine: Mutex::new(None),
            waiting: None,
        }
    }

    /// A controller with no VM: `vm.restore` and `vmm.shutdown` go to `tx`.
    pub fn waiting(tx: std::sync::mpsc::Sender<Waiting>) -> Self {
        VmControl {
            vm: Mutex::new(None),
            machine: Mutex::new(None),
            waiting: Some(Mutex::new(tx)),
        }
    }

    /// The VM that now exists (after a restore).
    pub fn set_vm(&self, config: VmConfig, description: String) {
        *self.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some((config, description));
    }

    /// The machine now running (or none).
    pub fn set_machine(&self, m: Option<MachineHandle>) {
        *self.machine.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    fn machine(&self) -> Option<MachineHandle> {
        self.machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// `vm.info`'s `config`, in Cloud Hypervisor's VmConfig shape for what Alioth has.
pub fn config_json(c: &VmConfig) -> Value {
    let mut v = json!({
        "cpus": {"boot_vcpus": c.cpus, "max_vcpus": c.cpus},
        "memory": {"size": c.memory},
        "payload": {
            "kernel": path(&c.kernel.kernel),
            "cmdline": c.kernel.cmdline,
        },
        "disks": c.disks.iter().map(|d| match &d.vhost_user {
            Some(s) => json!({"vhost_user": true, "vhost_socket": path(s)}),
            None => json!({
                "path": path(&d.blk.path),
                "readonly": d.blk.read_only,
                "direct": d.blk.direct,
                "num_queues": d.blk.num_queues,
                "queue_size": d.blk.queue_size,
            }),
        }).collect::<Vec<_>>(),
        "net": c.nets.iter().map(|n| {
            let m = n.net.mac;
            json!({
                "tap": n.net.tap,
                "mac": format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]),
                "num_queues": n.net.queue_pairs * 2,
                "queue_size": n.net.queue_size,
                "mtu": n.net.mtu,
            })
        }).collect::<Vec<_>>(),
        "serial": match &c.serial {
            SerialConfig::Stdio => json!({"mode": "Tty"}),
            SerialConfig::File(p) => json!({"mode": "File", "file": path(p)}),
            SerialConfig::Off => json!({"mode": "Off"}),
        },
    });
    if let Some(i) = &c.kernel.initramfs {
        v["payload"]["initramfs"] = path(i);
    }
    if c.rng.is_some() {
        v["rng"] = json!({"src": "getrandom"});
    }
    if let Some(s) = &c.vsock {
        v["vsock"] = json!({"cid": s.vsock.cid, "socket": path(&s.vsock.uds)});
    }
    v["console"] = match c.console.as_ref().map(|c| &c.mode) {
        None => json!({"mode": "Off"}),
        Some(ConsoleMode::Stdio) => json!({"mode": "Tty"}),
        Some(ConsoleMode::Pty) => json!({"mode": "Pty"}),
        Some(ConsoleMode::File(p)) => json!({"mode": "File", "file": path(p)}),
        Some(ConsoleMode::Socket(p)) => json!({"mode": "Socket", "socket": path(p)}),
    };
    v
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Created => "Created",
        VmState::Running => "Running",
        VmState::Paused => "Paused",
        VmState::Shutdown => "Shutdown",
    }
}

impl alioth_api::Controller for VmControl {
    fn handle(&self, req: Request) -> Response {
        if req == Request::Ping {
            return Response::json(
                200,
                json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "build_version": concat!("alioth ", env!("CARGO_PKG_VERSION")),
                    "pid": std::process::id(),
                    "features": [],
                }),
            );
        }
        let Some(m) = self.machine() else {
            if let Some(tx) = &self.waiting {
                let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                return match req {
                    Request::Restore { source } => {
                        let (rtx, rrx) = std::sync::mpsc::channel();
                        if tx.send(Waiting::Restore(source, rtx)).is_err() {
                            return Response::error(500, "the VMM is going away");
                        }
                        rrx.recv()
                            .unwrap_or_else(|_| Response::error(500, "the restore did not answer"))
                    }
                    Request::VmmShutdown => {
                        let _ = tx.send(Waiting::Shutdown);
                        Response::done()
                    }
                    _ => Response::error(404, "no VM here yet: restore one with vm.restore"),
                };
            }
            return Response::error(404, "the VM is not running (between a reboot's machines)");
        };
        let Some((config, description)) = self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone()
        else {
            return Response::error(404, "no VM here");
        };
        match req {
            Request::Ping => unreachable!("answered above"),
            Request::Info => Response::json(
                200,
                json!({
                    "config": config_json(&config),
                    "state": state_name(m.state()),
                    "memory_actual_size": config.memory,
                }),
            ),
            Request::Counters => {
                let mut all = serde_json::Map::new();
                for (dev, counters) in m.counters() {
                    let c: serde_json::Map<String, Value> = counters
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .collect();
                    all.insert(dev, Value::Object(c));
                }
                Response::json(200, Value::Object(all))
            }
            Request::Pause => match m.pause() {
                Ok(took) => {
                    log::info!("paused in {} us", took.as_micros());
                    Response::done()
                }
                Err(e) => Response::error(405, e),
            },
            Request::Resume => match m.resume() {
                Ok(()) => Response::done(),
                Err(e) => Response::error(405, e),
            },
            Request::Shutdown | Request::VmmShutdown => {
                m.stop();
                Response::done()
            }
            Request::Reboot => {
                m.reboot();
                Response::done()
            }
            Request::PowerButton => Response::error(
                405,
                "this VM has no ACPI power button (its ACPI tables describe none)",
            ),
            Request::Snapshot { destination } => match m.snapshot(&destination, description) {
                Ok(info) => {
                    log::info!(
                        "snapshot {}: {} MiB of RAM, {} KiB of state, {} ms",
                        destination.display(),
                        info.memory_bytes >> 20,
                        info.state_bytes >> 10,
                        info.took.as_millis()
                    );
                    Response::done()
                }
                Err(e) => Response::error(500, e),
            },
            Request::Restore { .. } => Response::error(
                404,
                "a VM is already running here; restore into a new process with `alioth boot --restore DIR`",
            ),
        }
    }
}

/// What `alioth ctl` can ask: (method, path, needs a directory argument).
pub fn ctl_request(
    cmd: &str,
    arg: Option<&str>,
) -> anyhow::Result<(&'static str, &'static str, Option<String>)> {
    let dir_url = |what: &str| -> anyhow::Result<String> {
        let Some(d) = arg else {
            anyhow::bail!("`{what}` needs a directory");
        };
        let abs = std::path::absolute(d)?;
        Ok(json!({ format!("{}_url", if what == "snapshot" { "destination" } else { "source" }): format!("file://{}", abs.display()) }).to_string())
    };
    Ok(match cmd {
        "ping" => ("GET", "/api/v1/vmm.ping", None),
        "info" => ("GET", "/api/v1/vm.info", None),
        "counters" => ("GET", "/api/v1/vm.counters", None),
        "pause" => ("PUT", "/api/v1/vm.pause", None),
        "resume" => ("PUT", "/api/v1/vm.resume", None),
        "shutdown" => ("PUT", "/api/v1/vm.shutdown", None),
        "reboot" => ("PUT", "/api/v1/vm.reboot", None),
        "power-button" => ("PUT", "/api/v1/vm.power-button", None),
        "vmm-shutdown" => ("PUT", "/api/v1/vmm.shutdown", None),
        "snapshot" => ("PUT", "/api/v1/vm.snapshot", Some(dir_url("snapshot")?)),
        "restore" => ("PUT", "/api/v1/vm.restore", Some(dir_url("restore")?)),
        _ => anyhow::bail!(
            "unknown command `{cmd}` (ping, info, counters, pause, resume, shutdown, reboot, power-button, vmm-shutdown, snapshot DIR, restore DIR)"
        ),
    })
}

/// Human output for a successful answer of `cmd`.
pub fn human(cmd: &str, body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return match cmd {
            "pause" => "paused".into(),
            "resume" => "resumed".into(),
            "shutdown" | "vmm-shutdown" => "shutting down".into(),
            "reboot" => "rebooting".into(),
            "snapshot" => "snapshot written".into(),
            "restore" => "restored".into(),
            _ => "done".into(),
        };
    };
    match cmd {
        "ping" => format!(
            "alioth {} (pid {})",
            v["version"].as_str().unwrap_or("?"),
            v["pid"]
        ),
        "info" => {
            let c = &v["config"];
            format!(
                "state: {}\ncpus: {}\nmemory: {} MiB\nkernel: {}\ndisks: {}\nnet: {}\nvsock: {}\nconsole: {}",
                v["state"].as_str().unwrap_or("?"),
                c["cpus"]["boot_vcpus"],
                c["memory"]["size"].as_u64().unwrap_or(0) >> 20,
                c["payload"]["kernel"].as_str().unwrap_or("?"),
                c["disks"].as_array().map_or(0, Vec::len),
                c["net"].as_array().map_or(0, Vec::len),
                if c["vsock"].is_null() {
                    "none".to_string()
                } else {
                    format!("cid {}", c["vsock"]["cid"])
                },
                c["console"]["mode"].as_str().unwrap_or("?"),
            )
        }
        "counters" => {
            let mut out = Vec::new();
            if let Some(devs) = v.as_object() {
                for (dev, cs) in devs {
                    let line: Vec<String> = cs
                        .as_object()
                        .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect())
                        .unwrap_or_default();
                    out.push(format!("{dev}: {}", line.join(" ")));
                }
            }
            out.join("\n")
        }
        _ => v.to_string(),
    }
}
