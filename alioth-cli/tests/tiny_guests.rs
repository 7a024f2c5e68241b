//! End-to-end runs of `alioth` with tiny guests written in assembly: the exit device, the serial
//! console, the i8042 reset line, ACPI power-off and stopping a spinning guest.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use alioth_test_util::tiny_elf;
use iced_x86::code_asm::*;

const LOAD: u64 = 0x20_0000;

fn kernel(build: impl FnOnce(&mut CodeAssembler)) -> tempfile::NamedTempFile {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a);
    // Never fall off the end: spin.
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    let code = a.assemble(LOAD).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), tiny_elf(&code, LOAD)).unwrap();
    f
}

fn out_byte(a: &mut CodeAssembler, port: u16, value: u8) {
    a.mov(dx, u32::from(port)).unwrap();
    a.mov(al, u32::from(value)).unwrap();
    a.out(dx, al).unwrap();
}

fn alioth(kernel: &tempfile::NamedTempFile, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_alioth"))
        .args(["boot", "--memory", "64M", "--kernel"])
        .arg(kernel.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("alioth did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn exit_device_value_becomes_the_exit_status() {
    let k = kernel(|a| out_byte(a, 0xf4, 42));
    let out = alioth(&k, &["--exit-device", "on", "--serial", "off"]);
    assert_eq!(out.status.code(), Some(42), "{out:?}");
    // Without the device the write goes nowhere and the guest spins: SIGTERM is tested below.
    let k = kernel(|a| out_byte(a, 0x501, 7));
    let out = alioth(&k, &["--exit-device", "0x501", "--serial", "off"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}

#[test]
fn serial_output_reaches_stdout() {
    let k = kernel(|a| {
        for b in b"hello from COM1\n" {
            out_byte(a, 0x3f8, *b);
        }
        out_byte(a, 0xf4, 0);
    });
    let out = alioth(&k, &["--exit-device", "on"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from COM1\n");
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let k = kernel(|a| {
        for b in b"to the file" {
            out_byte(a, 0x3f8, *b);
        }
        out_byte(a, 0xf4, 0);
    });
    let out = alioth(
        &k,
        &[
            "--exit-device",
            "on",
            "--serial",
            &format!("file:{}", log.display()),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to the file");
}

#[test]
fn i8042_reset_and_acpi_power_off_stop_the_vm_cleanly() {
    let k = kernel(|a| out_byte(a, 0x64, 0xfe));
    let out = alioth(&k, &["--serial", "off"]);
    assert_eq!(out.status.code(), Some(0), "reset: {out:?}");
    // SLP_TYP 5 (\_S5) with SLP_EN into the FADT's sleep control register.
    let k = kernel(|a| out_byte(a, 0x3c0, (5 << 2) | (1 << 5)));
    let out = alioth(&k, &["--serial", "off", "-v"]);
    assert_eq!(out.status.code(), Some(0), "power-off: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("powered off"));
}

#[test]
fn triple_fault_stops_the_vm_as_a_reset() {
    // The loader's IDT is empty, so the first exception escalates to a triple fault.
    let k = kernel(|a| a.ud2().unwrap());
    let out = alioth(&k, &["--serial", "off", "-v"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("reset"), "{err}");
}

#[test]
fn every_catchable_terminating_signal_stops_a_guest_that_never_exits_cleanly() {
    // Each ends alioth through its normal stop path, which restores the terminal (it left the
    // terminal raw on SIGQUIT before); none kills the process outright.
    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
    ] {
        let k = kernel(|_| {});
        let mut child = Command::new(env!("CARGO_BIN_EXE_alioth"))
            .args([
                "boot", "--memory", "64M", "--cpus", "2", "--serial", "off", "--kernel",
            ])
            .arg(k.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            child.try_wait().unwrap().is_none(),
            "guest should still spin"
        );
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "alioth ignored signal {sig}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(0), "signal {sig}: {status:?} {err}");
    }
}

/// Reads the vendor/device dword of `slot` through ports 0xCF8/0xCFC into eax.
fn pci_id_via_ports(a: &mut CodeAssembler, slot: u32) {
    a.mov(dx, 0xcf8u32).unwrap();
    a.mov(eax, 0x8000_0000u32 | (slot << 11)).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(dx, 0xcfcu32).unwrap();
    a.in_(eax, dx).unwrap();
}

#[test]
fn guest_enumerates_virtio_devices_through_config_ports_and_ecam() {
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    // Exit 0 when 00:01.0 is virtio-blk and 00:02.0 virtio-rng, seen both ways; 1-3 otherwise.
    let k = kernel(|a| {
        let mut fail = [a.create_label(), a.create_label(), a.create_label()];
        pci_id_via_ports(a, 1);
        a.cmp(eax, 0x1042_1af4u32 as i32).unwrap();
        a.jne(fail[0]).unwrap();
        pci_id_via_ports(a, 2);
        a.cmp(eax, 0x1044_1af4u32 as i32).unwrap();
        a.jne(fail[1]).unwrap();
        a.mov(rbx, 0xe000_8000u64).unwrap(); // ECAM, device 1
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.cmp(eax, 0x1042_1af4u32 as i32).unwrap();
        a.jne(fail[2]).unwrap();
        out_byte(a, 0xf4, 0);
        for (i, l) in fail.iter_mut().enumerate() {
            a.set_label(l).unwrap();
            out_byte(a, 0xf4, i as u8 + 1);
        }
    });
    let out = alioth(
        &k,
        &[
            "--exit-device",
            "on",
            "--serial",
            "off",
            "--disk",
            img.path().to_str().unwrap(),
            "--rng",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
