use std::io::Write;

use alioth_mem::{MemoryMap, RamBus};
use alioth_test_util::guest_artifact;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::acpi::PmPorts;

fn acpi(n: u32) -> AcpiConfig {
    AcpiConfig {
        nr_vcpus: n,
        serials: vec![],
        pm: PmPorts {
            sleep_control: 0x3c0,
            sleep_status: 0x3c1,
            reset: 0x3c2,
            reset_value: 1,
            timer: Some(0x3c4),
        },
        ecam: None,
    }
}

fn spec(kernel: &Path, initramfs: Option<&Path>, cmdline: &str) -> KernelSpec {
    KernelSpec {
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.map(Path::to_path_buf),
        cmdline: cmdline.into(),
        protocol: BootProtocol::Auto,
    }
}

fn read_bytes(ram: &RamBus, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ram.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn bzimage_zero_page_matches_the_real_debian_kernel() {
    let Some(bz_path) = guest_artifact("vmlinuz") else {
        return;
    };
    let Some(initrd_path) = guest_artifact("initramfs.cpio") else {
        return;
    };
    let file = std::fs::read(&bz_path).unwrap();
    let initrd = std::fs::read(&initrd_path).unwrap();
    let ram = RamBus::new(MemoryMap::new(512 << 20).unwrap()).unwrap();
    let cmdline = "console=ttyS0 alioth.test=zero-page";
    let booted = load_kernel(&ram, &spec(&bz_path, Some(&initrd_path), cmdline), &acpi(1)).unwrap();
    assert_eq!(booted.format, KernelFormat::BzImage);
    assert_eq!(booted.protocol, BootProtocol::Linux64);

    let zp: boot_params = ram.memory().read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    let hdr = zp.hdr;
    // Fields copied from the image's setup header.
    let (magic, boot_flag, version, xload) =
        (hdr.header, hdr.boot_flag, hdr.version, hdr.xloadflags);
    assert_eq!(magic, 0x5372_6448);
    assert_eq!(boot_flag, 0xaa55);
    assert_eq!(version, le16(&file, 0x206));
    assert_eq!(xload, le16(&file, 0x236));
    let (init_size, initrd_max, align) = (hdr.init_size, hdr.initrd_addr_max, hdr.kernel_alignment);
    assert_eq!(init_size, le32(&file, 0x260));
    assert_eq!(initrd_max, le32(&file, 0x22c));
    assert_eq!(align, le32(&file, 0x230));
    // Fields the loader fills.
    let (loader, cmd_ptr, code32) = (hdr.type_of_loader, hdr.cmd_line_ptr, hdr.code32_start);
    assert_eq!(loader, 0xff);
    assert_eq!(u64::from(cmd_ptr), crate::x86::CMDLINE_ADDR);
    let stored = read_bytes(&ram, u64::from(cmd_ptr), cmdline.len() + 1);
    assert_eq!(&stored[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(stored[cmdline.len()], 0);
    assert_eq!(code32, 0x10_0000);
    // The protected-mode kernel is in memory at code32_start, byte for byte.
    let setup_size = (usize::from(file[0x1f1]) + 1) * 512;
    let pm = &file[setup_size..];
    assert_eq!(read_bytes(&ram, u64::from(code32), pm.len()), pm);
    assert_eq!(booted.cpu.rip, u64::from(code32) + 0x200);
    assert_eq!(booted.cpu.rsi, ZERO_PAGE_ADDR);
    // Ramdisk: where the fields say, byte for byte, below initrd_addr_max, above the kernel.
    let (rd_addr, rd_size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(booted.initramfs, Some((rd_addr, rd_size)));
    assert_eq!(rd_addr % 4096, 0);
    assert!(rd_addr + rd_size - 1 <= u64::from(initrd_max));
    assert!(
        rd_addr >= booted.kernel_range.1,
        "initramfs overlaps the kernel"
    );
    assert_eq!(read_bytes(&ram, rd_addr, initrd.len()), initrd);
    // e820 is the memory map, entry for entry.
    let want = ram.map().e820();
    assert_eq!(usize::from(zp.e820_entries), want.len());
    for (i, e) in want.iter().enumerate() {
        let got = zp.e820_table[i];
        let (a, s, t) = (got.addr, got.size, got.r#type);
        assert_eq!((a, s, t), (e.addr, e.size, e.kind as u32), "e820[{i}]");
    }
    let rsdp = zp.acpi_rsdp_addr;
    assert_eq!(rsdp, booted.rsdp_addr);
    assert_eq!(read_bytes(&ram, rsdp, 8), b"RSD PTR ");
}

#[test]
fn vmlinux_offers_pvh_and_linux64() {
    let Some(vmlinux) = guest_artifact("vmlinux") else {
        return;
    };
    let ram = RamBus::new(MemoryMap::new(256 << 20).unwrap()).unwrap();
    let auto = load_kernel(&ram, &spec(&vmlinux, None, "x"), &acpi(1)).unwrap();
    assert_eq!(auto.format, KernelFormat::Elf);
    assert_eq!(auto.protocol, BootProtocol::Pvh);
    assert_eq!(auto.cpu.mode, alioth_arch::CpuMode::Protected32);
    assert_eq!(auto.cpu.rbx, crate::x86::PVH_INFO_ADDR);
    let magic: u32 = ram
        .memory()
        .read_obj(GuestAddress(crate::x86::PVH_INFO_ADDR))
        .unwrap();
    assert_eq!(magic, 0x336e_c578);

    let mut s = spec(&vmlinux, None, "x");
    s.protocol = BootProtocol::Linux64;
    let l64 = load_kernel(&ram, &s, &acpi(1)).unwrap();
    assert_eq!(l64.cpu.mode, alioth_arch::CpuMode::Long64);
    assert_eq!(l64.cpu.rip, 0x100_0000, "startup_64 at the ELF entry");
}

fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f
}

#[test]
fn a_file_that_is_not_a_kernel_is_rejected_by_name() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    let f = temp_with(b"#!/bin/sh\necho definitely not a kernel\n");
    let err = load_kernel(&ram, &spec(f.path(), None, ""), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::NotAKernel { .. }), "{err}");
    assert!(err.to_string().contains(&f.path().display().to_string()));
    let empty = temp_with(b"");
    let err = load_kernel(&ram, &spec(empty.path(), None, ""), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::NotAKernel { .. }), "{err}");
    // An ELF header with garbage after it.
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64, 0xff);
    let bad = temp_with(&elf);
    let err = load_kernel(&ram, &spec(bad.path(), None, ""), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::BadKernel { .. }), "{err}");
}

#[test]
fn kernel_larger_than_memory_and_initramfs_that_does_not_fit_are_errors() {
    let Some(vmlinux) = guest_artifact("vmlinux") else {
        return;
    };
    // The Debian vmlinux spans up to ~62 MiB: 32 MiB of RAM cannot hold it.
    let small = RamBus::new(MemoryMap::new(32 << 20).unwrap()).unwrap();
    let err = load_kernel(&small, &spec(&vmlinux, None, ""), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::KernelTooLarge { .. }), "{err}");
    // 80 MiB of RAM fits the kernel but not a 40 MiB initramfs above it.
    let ram = RamBus::new(MemoryMap::new(80 << 20).unwrap()).unwrap();
    let big = tempfile::NamedTempFile::new().unwrap();
    big.as_file().set_len(40 << 20).unwrap();
    let err = load_kernel(&ram, &spec(&vmlinux, Some(big.path()), ""), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::InitramfsTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("does not fit"), "{err}");
}

#[test]
fn overlong_or_nul_command_lines_are_rejected() {
    let Some(vmlinux) = guest_artifact("vmlinux") else {
        return;
    };
    let ram = RamBus::new(MemoryMap::new(128 << 20).unwrap()).unwrap();
    let long = "a".repeat(2048);
    let err = load_kernel(&ram, &spec(&vmlinux, None, &long), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::Cmdline(_)), "{err}");
    let ok = "a".repeat(2047);
    load_kernel(&ram, &spec(&vmlinux, None, &ok), &acpi(1)).unwrap();
    let err = load_kernel(&ram, &spec(&vmlinux, None, "a\0b"), &acpi(1)).unwrap_err();
    assert!(matches!(err, Error::Cmdline(_)), "{err}");
}
