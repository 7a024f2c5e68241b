//! Alioth's guest kit: a freestanding x86_64 virtio conformance guest.
//!
//! It boots as a PVH ELF or like a Linux kernel (64-bit boot protocol: long mode, `boot_params`
//! in RSI), does the few things that need ring 0 — GDT and TSS, an IDT with exception and
//! interrupt stubs, page tables that let ring 3 reach RAM and the MMIO windows, SSE, the local
//! APIC in the mode it was left in — and then runs everything else at CPL3 with IOPL=3. On a
//! software KVM such as PVM, ring-0 code is emulated while ring-3 code runs natively, so this
//! keeps the kit fast there.
//!
//! It assumes only what a VMM that boots PVH with virtio-pci must provide: COM1 for its
//! output, PCI configuration space (ECAM from the ACPI MCFG, else ports 0xCF8/0xCFC) and the
//! devices under test. Results are printed as `ALIOTH-KIT result <test> pass|fail|skip ...`
//! lines and `ALIOTH-KIT summary pass=N fail=N skip=N`; then the kit stops the VM through
//! Alioth's exit device when there is one (status 0, or 1 if a test failed), else ACPI
//! soft-off (FADT sleep control or PM1a control), else it halts.

#![no_std]
#![no_main]

mod acpi;
mod clock;
mod console;
mod cpu;
mod mm;
mod net;
mod pci;
mod rt;
mod serial;
mod tests;
mod virtio;
mod vsock;

use core::fmt::Write;

use serial::Com1;
use tests::Verdict;

/// Port of Alioth's test exit device.
const EXIT_PORT: u16 = 0xf4;
/// What Alioth's exit device answers when read (other VMMs answer 0xff or 0 for no device).
const EXIT_SIGNATURE: u8 = 0xa1;

/// Stops the VM: Alioth's exit device with `status`, else ACPI soft-off, else halt.
pub fn exit(status: u8) -> ! {
    // SAFETY: reading a port with no device is harmless; Alioth's exit device answers its
    // signature and ends the VM with the byte written to it.
    unsafe {
        if cpu::inb(EXIT_PORT) == EXIT_SIGNATURE {
            cpu::outb(EXIT_PORT, status);
        }
    }
    if let Some(acpi) = ACPI.get() {
        power_off(acpi);
    }
    cpu::halt()
}

/// Soft-off (S5) as the FADT describes it: the sleep control register of a hardware-reduced
/// platform, else PM1a control. SLP_TYP comes from the DSDT's `\_S5` (5 if it has none).
fn power_off(acpi: &acpi::Acpi) {
    let typ = u16::from(acpi.s5_slp_typ.unwrap_or(5) & 7);
    let write = |reg: acpi::Reg, v: u16, wide: bool| match reg {
        // SAFETY: the FADT names this port as a sleep register; writing S5 powers off.
        acpi::Reg::Port(p) => unsafe {
            if wide {
                cpu::outw(p, v)
            } else {
                cpu::outb(p, v as u8)
            }
        },
        acpi::Reg::Mem(a) => {
            if mm::map(a, 2).is_ok() {
                // SAFETY: as above, a memory-mapped sleep register, mapped just now.
                unsafe {
                    if wide {
                        core::ptr::write_volatile(a as *mut u16, v)
                    } else {
                        core::ptr::write_volatile(a as *mut u8, v as u8)
                    }
                }
            }
        }
    };
    if let Some(reg) = acpi.sleep_control {
        write(reg, (typ << 2) | (1 << 5), false); // SLP_TYPx, SLP_EN
    }
    if let Some(reg) = acpi.pm1a_control {
        write(reg, (typ << 10) | (1 << 13), true); // SLP_TYPx, SLP_EN
    }
    // Give the VMM a moment to act on it before halting.
    let d = clock::Deadline::after_ms(1000);
    while !d.passed() {
        core::hint::spin_loop();
    }
}

/// The ACPI facts found at boot (set once, before any test runs).
static ACPI: Once<acpi::Acpi> = Once::new();

/// A value set once (one CPU, no allocator).
struct Once<T>(
    core::cell::UnsafeCell<Option<T>>,
    core::sync::atomic::AtomicBool,
);

// SAFETY: the value is written once, before the flag is released, and only read after the flag
// is acquired; the kit runs on one CPU.
unsafe impl<T: Sync> Sync for Once<T> {}

impl<T> Once<T> {
    const fn new() -> Self {
        Once(
            core::cell::UnsafeCell::new(None),
            core::sync::atomic::AtomicBool::new(false),
        )
    }

    fn set(&self, v: T) {
        use core::sync::atomic::Ordering;
        if self.1.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: the swap above lets exactly one caller get here; readers wait for `get`.
        unsafe { *self.0.get() = Some(v) };
    }

    fn get(&self) -> Option<&T> {
        if !self.1.load(core::sync::atomic::Ordering::Acquire) {
            return None;
        }
        // SAFETY: set before the flag; never written again.
        unsafe { (*self.0.get()).as_ref() }
    }
}

/// `hvm_start_info.magic`: RSI points at a PVH start_info rather than a Linux zero page.
pub const PVH_MAGIC: u32 = 0x336e_c578;

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

/// Every test, in the order `kit.test=all` runs them (the bench is never part of `all`).
const ALL: &[&[u8]] = &[
    b"pci",
    b"rng",
    b"blk-rw",
    b"blk-beyond-end",
    b"blk-flush",
    b"blk-discard",
    b"blk-mq",
    b"blk-reset",
    b"blk-ro",
    b"hostile-chain",
];

/// Runs one test.
fn run(out: &mut Com1, test: &[u8], cmd: &[u8]) -> Option<Verdict> {
    Some(match test {
        b"hello" => tests::Verdict::Pass(tests::Detail::default()),
        b"pci" => tests::pci(out),
        b"rng" => tests::rng(),
        b"blk-rw" => tests::blk_rw(),
        b"blk-beyond-end" => tests::blk_beyond_end(),
        b"blk-ro" => tests::blk_ro(),
        b"blk-flush" => tests::blk_flush(),
        b"blk-discard" => tests::blk_discard(),
        b"blk-mq" => tests::blk_mq(),
        b"blk-reset" => tests::blk_reset(),
        b"hostile-chain" => tests::hostile_chain(),
        b"map-high" => tests::map_high(),
        b"net" | b"net-mq" | b"net-starve" => {
            let csum = param(cmd, b"kit.csum") == Some(b"on");
            let secs = param(cmd, b"kit.secs")
                .and_then(|v| core::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(60);
            tests::net(out, test == b"net-mq", test == b"net-starve", csum, secs)
        }
        b"net-bench" => tests::net_bench(out, param(cmd, b"kit.bench").unwrap_or(b"")),
        b"net-hostile-rx" => tests::net_hostile(true),
        b"net-hostile-tx" => tests::net_hostile(false),
        b"snapshot" => tests::snapshot(
            out,
            param(cmd, b"kit.iters")
                .and_then(|v| core::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(400),
        ),
        b"console" => console::round_trip(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-echo" => vsock::echo(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-many" => vsock::many(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-listen" => vsock::listen(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-stall" => vsock::stall(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-close" => vsock::close(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-hostile" => vsock::hostile(tests::memory(), tests::buffers(), tests::packed()),
        b"vsock-bench" => vsock::bench(
            out,
            tests::memory(),
            tests::buffers(),
            tests::packed(),
            param(cmd, b"kit.bench").unwrap_or(b""),
        ),
        b"bench" => tests::bench(out, param(cmd, b"kit.bench").unwrap_or(b"")),
        _ => return None,
    })
}

/// Everything after the ring-0 setup runs here, at CPL3.
pub extern "C" fn user_main(boot_info: u64) -> ! {
    let mut out = Com1;
    let cmd = cmdline(boot_info);
    let list = param(cmd, b"kit.test").unwrap_or(b"hello");
    let ring = param(cmd, b"kit.ring").unwrap_or(b"split");
    tests::use_packed_rings(ring == b"packed");
    tests::use_ring_features(
        param(cmd, b"kit.event_idx") != Some(b"off"),
        param(cmd, b"kit.indirect") != Some(b"off"),
    );
    let found = acpi::discover(boot_info);
    ACPI.set(found);
    if let Some(ecam) = found.ecam {
        pci::use_ecam(ecam);
    }
    let (clock, tsc_hz) = clock::init(&found);
    let _ = writeln!(
        out,
        "ALIOTH-KIT start cpl={} boot={} apic={} pci={} clock={clock:?} tsc-mhz={} acpi={} ring={} test={}",
        cpu::cpl(),
        protocol(boot_info),
        if cpu::x2apic() { "x2apic" } else { "xapic" },
        pci::mechanism(),
        tsc_hz / 1_000_000,
        if found.rsdp.is_some() { "yes" } else { "no" },
        core::str::from_utf8(ring).unwrap_or("?"),
        core::str::from_utf8(list).unwrap_or("?")
    );
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut run_one = |test: &[u8]| {
        let name = core::str::from_utf8(test).unwrap_or("?");
        let (word, detail) = match run(&mut out, test, cmd) {
            Some(Verdict::Pass(d)) => {
                passed += 1;
                ("pass", d)
            }
            Some(Verdict::Fail(d)) => {
                failed += 1;
                ("fail", d)
            }
            Some(Verdict::Skip(d)) => {
                skipped += 1;
                ("skip", d)
            }
            None => {
                failed += 1;
                ("fail", tests::Detail::from_str("unknown-test"))
            }
        };
        let _ = writeln!(out, "ALIOTH-KIT result {name} {word} {}", detail.as_str());
    };
    if list == b"all" {
        ALL.iter().for_each(|t| run_one(t));
    } else {
        list.split(|b| *b == b',')
            .filter(|t| !t.is_empty())
            .for_each(run_one);
    }
    let _ = writeln!(
        out,
        "ALIOTH-KIT summary pass={passed} fail={failed} skip={skipped}"
    );
    exit(if failed > 0 { 1 } else { 0 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Com1, "ALIOTH-KIT panic {info}");
    let _ = writeln!(Com1, "ALIOTH-KIT summary pass=0 fail=1 skip=0");
    exit(0xfe)
}
