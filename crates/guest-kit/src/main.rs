//! Alioth's guest kit: a freestanding x86_64 test guest.
//!
//! It boots like a Linux kernel (64-bit boot protocol: long mode, `boot_params` in RSI), does
//! the few things that need ring 0 — GDT and TSS, an IDT with exception and interrupt stubs,
//! page tables that let ring 3 reach RAM and the MMIO windows, SSE — and then runs everything
//! else at CPL3 with IOPL=3. On a software KVM such as PVM, ring-0 code is emulated while ring-3
//! code runs natively, so this keeps the kit fast there. Results are printed on COM1 as
//! `ALIOTH-KIT ...` lines and the verdict is written to the exit device (port 0xf4).

#![no_std]
#![no_main]

mod cpu;
mod pci;
mod rt;
mod serial;
mod tests;
mod virtio;

use core::fmt::Write;

use serial::Com1;

/// Port of Alioth's test exit device.
const EXIT_PORT: u16 = 0xf4;

/// Ends the VM with `status` through the exit device.
pub fn exit(status: u8) -> ! {
    // SAFETY: port I/O to the exit device; allowed at CPL0 and at CPL3 with IOPL=3.
    unsafe { cpu::outb(EXIT_PORT, status) };
    loop {
        core::hint::spin_loop();
    }
}

/// `hvm_start_info.magic`: RSI points at a PVH start_info rather than a Linux zero page.
const PVH_MAGIC: u32 = 0x336e_c578;

/// The kernel command line, from the Linux zero page or the PVH start_info at `boot_info`.
fn cmdline(boot_info: u64) -> &'static [u8] {
    // SAFETY: the loader put its boot structure at `boot_info`, identity-mapped; both name a
    // NUL-terminated command line in RAM (zero page: u32 at 0x228; start_info: u64 at 24).
    unsafe {
        let ptr = if core::ptr::read_unaligned(boot_info as *const u32) == PVH_MAGIC {
            core::ptr::read_unaligned((boot_info + 24) as *const u64) as usize
        } else {
            core::ptr::read_unaligned((boot_info + 0x228) as *const u32) as usize
        };
        if ptr == 0 {
            return &[];
        }
        let mut len = 0;
        while len < 4096 && *((ptr + len) as *const u8) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(ptr as *const u8, len)
    }
}

/// Which boot protocol started the kit.
fn protocol(boot_info: u64) -> &'static str {
    // SAFETY: as in `cmdline`.
    let magic = unsafe { core::ptr::read_unaligned(boot_info as *const u32) };
    if magic == PVH_MAGIC { "pvh" } else { "linux64" }
}

/// The value of `key=` on the command line.
fn param<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline.split(|b| *b == b' ').find_map(|w| {
        let rest = w.strip_prefix(key)?;
        rest.strip_prefix(b"=")
    })
}

/// Everything after the ring-0 setup runs here, at CPL3.
pub extern "C" fn user_main(boot_params: u64) -> ! {
    let mut out = Com1;
    let cmd = cmdline(boot_params);
    let test = param(cmd, b"kit.test").unwrap_or(b"hello");
    let ring = param(cmd, b"kit.ring").unwrap_or(b"split");
    tests::use_packed_rings(ring == b"packed");
    let _ = writeln!(
        out,
        "ALIOTH-KIT start cpl={} boot={} ring={} test={}",
        cpu::cpl(),
        protocol(boot_params),
        core::str::from_utf8(ring).unwrap_or("?"),
        core::str::from_utf8(test).unwrap_or("?")
    );
    match test {
        b"hello" => {
            let _ = writeln!(out, "ALIOTH-KIT result hello pass");
            exit(0)
        }
        b"pci" => {
            let found = pci::scan(&mut out);
            let pass = found.virtio > 0;
            let _ = writeln!(
                out,
                "ALIOTH-KIT result pci {} devices={} virtio={}",
                if pass { "pass" } else { "fail" },
                found.devices,
                found.virtio
            );
            exit(if pass { 0 } else { 1 })
        }
        b"rng" => tests::rng(&mut out),
        b"blk-rw" => tests::blk_rw(&mut out),
        b"blk-ro" => tests::blk_ro(&mut out),
        b"blk-flush" => tests::blk_flush(&mut out),
        b"blk-discard" => tests::blk_discard(&mut out),
        b"blk-mq" => tests::blk_mq(&mut out),
        b"hostile-chain" => tests::hostile_chain(&mut out),
        b"bench" => tests::bench(&mut out, param(cmd, b"kit.bench").unwrap_or(b"")),
        other => {
            let _ = writeln!(
                out,
                "ALIOTH-KIT result {} fail unknown-test",
                core::str::from_utf8(other).unwrap_or("?")
            );
            exit(2)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Com1, "ALIOTH-KIT panic {info}");
    exit(0xfe)
}
