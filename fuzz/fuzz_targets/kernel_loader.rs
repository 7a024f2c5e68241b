//! The kernel loader on arbitrary bytes (bzImage setup headers, ELF headers, PVH notes): a
//! loaded image or an error, never a panic or a write outside guest RAM.
#![no_main]

use std::sync::OnceLock;

use alioth_boot::acpi::{AcpiConfig, PmPorts};
use alioth_boot::{BootProtocol, KernelSpec, load_kernel};
use alioth_mem::{MemoryMap, RamBus};

fn ram() -> &'static RamBus {
    static RAM: OnceLock<RamBus> = OnceLock::new();
    RAM.get_or_init(|| RamBus::new(MemoryMap::new(64 << 20).expect("map")).expect("ram"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let path = std::env::temp_dir().join(format!("alioth-fuzz-kernel-{}", std::process::id()));
    if std::fs::write(&path, &data[1..]).is_err() {
        return;
    }
    let spec = KernelSpec {
        kernel: path,
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        protocol: match data[0] % 3 {
            0 => BootProtocol::Auto,
            1 => BootProtocol::Linux64,
            _ => BootProtocol::Pvh,
        },
    };
    let acpi = AcpiConfig {
        nr_vcpus: 1,
        serials: Vec::new(),
        pm: PmPorts {
            sleep_control: 0x3c0,
            sleep_status: 0x3c1,
            reset: 0x3c2,
            reset_value: 1,
            timer: Some(0x3c4),
        },
        ecam: None,
    };
    let _ = load_kernel(ram(), &spec, &acpi);
});
