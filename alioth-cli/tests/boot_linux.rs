//! Tier 3: the stock Debian cloud kernel under `alioth`.
//!
//! On this project's machines KVM is software (PVM): guest ring 0 is emulated, so these tests
//! check the early boot lines, then stop the VM. The full-boot test needs hardware KVM and skips
//! elsewhere with a message saying why.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use alioth_mem::{E820Kind, MemoryMap};
use alioth_test_util::{guest_artifact, kvm_is_hardware_backed, require_hardware_kvm};

/// Workarounds for instructions PVM's emulator lacks (see docs/testing.md).
const PVM_CMDLINE: &str = "clearcpuid=141,151,137 noxsave";
/// Generous bound for the early lines under emulated ring 0 (seen: 5-20 s).
const EARLY_LINES_TIMEOUT: Duration = Duration::from_secs(300);

struct Vm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

/// Whether a VM can be run in a network namespace of its own with a tap (root, `unshare`, `ip`).
fn net_namespace_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "not root (a network namespace and a tap need CAP_SYS_ADMIN, CAP_NET_ADMIN)".into(),
        );
    }
    for tool in ["unshare", "ip"] {
        if Command::new(tool)
            .arg("-V")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Err(format!("`{tool}` is missing"));
        }
    }
    Ok(())
}

impl Vm {
    fn boot(kernel: &Path, args: &[&str]) -> Vm {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_alioth"));
        cmd.arg("boot").arg("--kernel").arg(kernel).args(args);
        Self::spawn(cmd)
    }

    /// Boots inside a new network namespace (never the host's) holding a multi-queue tap `kt0`
    /// with 192.0.2.1/24, with a virtio-net device on it.
    fn boot_in_netns(kernel: &Path, args: &[&str]) -> Vm {
        let mut cmd = Command::new("unshare");
        cmd.args(["-n", "sh", "-c"])
            .arg(
                "ip link set lo up && ip tuntap add dev kt0 mode tap multi_queue vnet_hdr && \
                 ip addr add 192.0.2.1/24 dev kt0 && ip link set kt0 up && exec \"$@\"",
            )
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_alioth"))
            .arg("boot")
            .arg("--kernel")
            .arg(kernel)
            .args(args)
            .args(["--net", "tap=kt0,mac=02:00:00:00:00:02"]);
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Vm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start alioth");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Vm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a line containing `needle` has been printed; returns it.
    fn expect(&mut self, needle: &str, deadline: Instant) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let tail: Vec<_> = self.seen.iter().rev().take(30).rev().collect();
                    panic!("no line with `{needle}` in time; last lines:\n{tail:#?}");
                }
            }
        }
    }

    /// Stops the VM with SIGTERM; alioth must exit 0 promptly.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_bounded(&mut self.child, Duration::from_secs(20));
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert_eq!(status, Some(0), "alioth after SIGTERM; stderr: {err}");
    }
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("alioth did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `BIOS-e820:` lines Linux prints for our memory map.
fn expected_e820(memory: u64) -> Vec<String> {
    MemoryMap::new(memory)
        .unwrap()
        .e820()
        .iter()
        .map(|e| {
            let kind = match e.kind {
                E820Kind::Ram => "usable",
                E820Kind::Reserved => "reserved",
            };
            format!(
                "BIOS-e820: [mem {:#018x}-{:#018x}] {kind}",
                e.addr,
                e.addr + e.size - 1
            )
        })
        .collect()
}

/// Boots `vmlinux` with `cpus` vCPUs and checks the early lines; returns the running VM.
fn boot_and_check_early_lines(cpus: u32, protocol: &str) -> Option<Vm> {
    let vmlinux = guest_artifact("vmlinux")?;
    let memory = 512u64 << 20;
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 {PVM_CMDLINE} alioth.test=early-{cpus}cpu"
    );
    let mut vm = Vm::boot(
        &vmlinux,
        &[
            "--cpus",
            &cpus.to_string(),
            "--memory",
            "512M",
            "--boot-protocol",
            protocol,
            "--cmdline",
            &cmdline,
        ],
    );
    let deadline = Instant::now() + EARLY_LINES_TIMEOUT;
    let version = vm.expect("Linux version", deadline);
    assert!(version.contains("Linux version 6."), "{version}");
    let cmd = vm.expect("Command line:", deadline);
    assert!(
        cmd.trim_end()
            .ends_with(&format!("Command line: {cmdline}")),
        "kernel saw another command line: {cmd}"
    );
    // The e820 block: exactly our map, in order.
    let want = expected_e820(memory);
    let last = want.last().unwrap().clone();
    vm.expect(&last, deadline);
    let got: Vec<String> = vm
        .seen
        .iter()
        .filter(|l| l.contains("BIOS-e820:"))
        .map(|l| l[l.find("BIOS-e820:").unwrap()..].trim_end().to_string())
        .collect();
    assert_eq!(got, want, "e820 as Linux printed it");
    vm.expect(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        deadline,
    );
    vm.expect(
        &format!("smpboot: Allowing {cpus} CPUs, 0 hotplug CPUs"),
        deadline,
    );
    Some(vm)
}

#[test]
fn debian_vmlinux_two_vcpus_linux64_reaches_acpi_smp_lines() {
    let Some(vm) = boot_and_check_early_lines(2, "linux64") else {
        return;
    };
    vm.stop();
}

#[test]
fn debian_vmlinux_one_vcpu_pvh_boots_and_emulator_gaps_are_reported() {
    let Some(mut vm) = boot_and_check_early_lines(1, "pvh") else {
        return;
    };
    if kvm_is_hardware_backed() {
        return vm.stop();
    }
    // Under PVM the kernel soon meets an instruction the emulator lacks (its int3 self-test,
    // cmpxchg16b, xrstor...): alioth must say so, with RIP and bytes, and exit 1 — not hang.
    let status = wait_bounded(&mut vm.child, Duration::from_secs(600));
    let mut err = String::new();
    if let Some(mut e) = vm.child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_eq!(status, Some(1), "stderr: {err}");
    assert!(err.contains("vcpu0: KVM internal error"), "{err}");
    assert!(err.contains("RIP 0x"), "{err}");
    assert!(err.contains("instruction bytes ["), "{err}");
}

#[test]
fn debian_kernel_full_boot_runs_init_and_powers_off() {
    if !require_hardware_kvm("debian_kernel_full_boot_runs_init_and_powers_off") {
        return;
    }
    let (Some(vmlinux), Some(initramfs), Some(blank)) = (
        guest_artifact("vmlinux"),
        guest_artifact("initramfs.cpio"),
        guest_artifact("disk.img"),
    ) else {
        return;
    };
    let disk = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(&blank, disk.path()).unwrap();
    let vsock_dir = tempfile::tempdir().unwrap();
    let vsock = format!("cid=3,uds={}/v.sock", vsock_dir.path().display());
    // With root and iproute2, the VM also gets a network card on a tap in a network namespace
    // of its own (192.0.2.1/24 on the host side), and the guest pings the host.
    let net = net_namespace_available();
    let args = [
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cmdline",
        if net.is_ok() {
            "console=ttyS0 panic=-1 alioth.test=full-boot alioth.net=1"
        } else {
            "console=ttyS0 panic=-1 alioth.test=full-boot"
        },
        "--disk",
        disk.path().to_str().unwrap(),
        "--rng",
        "--vsock",
        &vsock,
    ];
    let mut vm = match &net {
        Ok(()) => Vm::boot_in_netns(&vmlinux, &args),
        Err(why) => {
            eprintln!("full boot without a network card: {why}");
            Vm::boot(&vmlinux, &args)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    vm.expect("ALIOTH-INIT-START", deadline);
    vm.expect("ALIOTH-CPUS 2", deadline);
    vm.expect("ALIOTH-BLK-OK", deadline);
    vm.expect("ALIOTH-RNG-OK", deadline);
    vm.expect("ALIOTH-VSOCK-OK", deadline);
    if net.is_ok() {
        vm.expect("ALIOTH-NET-OK", deadline);
    }
    vm.expect("ALIOTH-INIT-OK", deadline);
    assert!(
        !vm.seen.iter().any(|l| l.contains("ALIOTH-MODULE-FAILED")),
        "a virtio module failed to load: {:#?}",
        vm.seen
    );
    // poweroff -f -> ACPI S5 through the FADT's sleep control register -> exit 0.
    let status = wait_bounded(&mut vm.child, Duration::from_secs(60));
    assert_eq!(status, Some(0));
    // What the guest wrote through virtio-blk is in the image file.
    let image = std::fs::read(disk.path()).unwrap();
    assert!(image.starts_with(b"ALIOTH-DISK-MARKER"));
}

#[test]
fn debian_kernel_full_boot_on_hvc0_prints_init_through_the_virtio_console() {
    if !require_hardware_kvm(
        "debian_kernel_full_boot_on_hvc0_prints_init_through_the_virtio_console",
    ) {
        return;
    }
    let (Some(vmlinux), Some(initramfs)) =
        (guest_artifact("vmlinux"), guest_artifact("initramfs.cpio"))
    else {
        return;
    };
    // COM1 off: everything the test sees comes through virtio-console on stdout.
    let mut vm = Vm::boot(
        &vmlinux,
        &[
            "--memory",
            "512M",
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            "console=hvc0 panic=-1 alioth.test=full-boot",
            "--serial",
            "off",
            "--console",
            "stdio",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    vm.expect("ALIOTH-HVC-OK", deadline);
    vm.expect("ALIOTH-INIT-OK", deadline);
    let status = wait_bounded(&mut vm.child, Duration::from_secs(60));
    assert_eq!(status, Some(0));
}
