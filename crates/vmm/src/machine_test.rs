use std::time::{Duration, Instant};

use alioth_test_util::guest_artifact;

use super::*;

fn config(kernel: std::path::PathBuf) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.memory = 256 << 20;
    c.serial = SerialConfig::Off;
    c.kernel.cmdline = "console=ttyS0".into();
    c
}

/// Runs the boot vCPU on this thread, kicking it every `slice` to sample RIP, until `total`.
fn sample_rips(m: &mut Machine, slice: Duration, total: Duration) -> Vec<u64> {
    install_kick_signal_handler();
    // SAFETY: the ticker that uses the kicker is joined before this function returns.
    let kicker = unsafe { alioth_hv::VcpuKicker::for_current_thread() };
    let deadline = Instant::now() + total;
    let (tx, rx) = channel::<()>();
    let ticker = std::thread::spawn(move || {
        while rx.recv_timeout(slice).is_err() {
            kicker.kick();
        }
    });
    let mut rips = Vec::new();
    let vcpu = &mut m.vcpus[0];
    vcpu.bind_kick_to_current_thread();
    while Instant::now() < deadline {
        match vcpu.run().unwrap() {
            VmExit::IoIn { port, data, .. } => {
                if !m.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            VmExit::IoOut { port, data, .. } => {
                m.pio.write(u64::from(port), data);
            }
            VmExit::MmioRead { data, .. } => data.fill(0xff),
            VmExit::MmioWrite { .. } | VmExit::Interrupted => {}
            other => panic!("unexpected exit {other:?}"),
        }
        rips.push(vcpu.regs().unwrap().rip);
    }
    tx.send(()).unwrap();
    ticker.join().unwrap();
    rips
}

#[test]
fn bzimage_boot_runs_the_decompressor_inside_the_loaded_image() {
    let Some(bz) = guest_artifact("vmlinuz") else {
        return;
    };
    let mut m = Machine::new(&config(bz), MachineOptions::default()).unwrap();
    let (start, end) = m.booted().unwrap().kernel_range;
    let entry = m.booted().unwrap().cpu.rip;
    assert_eq!(entry, start + 0x200, "64-bit entry of the bzImage");
    let rips = sample_rips(&mut m, Duration::from_millis(500), Duration::from_secs(3));
    assert!(!rips.is_empty());
    for rip in &rips {
        assert!(
            (start..end).contains(rip),
            "RIP {rip:#x} left the image {start:#x}-{end:#x}"
        );
    }
    assert!(
        rips.iter().any(|r| *r != entry),
        "the decompressor made progress"
    );
}

#[test]
fn zero_vcpus_and_missing_kernel_are_config_errors() {
    let mut c = VmConfig::new("/nonexistent/vmlinux");
    let e = Machine::new(&c, MachineOptions::default()).err().unwrap();
    assert!(e.is_user_error());
    assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    c.cpus = 0;
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("cpus"), "{e}");
}
