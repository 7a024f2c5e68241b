//! Time for deadlines and the bench: the TSC, calibrated against the ACPI PM timer when the FADT
//! names one, else against what CPUID reports, else against the CMOS RTC's seconds.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::{Acpi, Reg};
use crate::{cpu, mm};

/// The PM timer's frequency (ACPI 6.5 §4.8.3.3).
const PM_TIMER_HZ: u64 = 3_579_545;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// What the TSC was calibrated against.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// The ACPI PM timer.
    PmTimer,
    /// CPUID leaf 0x15/0x16 or the hypervisor's TSC leaf.
    Cpuid,
    /// The CMOS RTC's seconds.
    Rtc,
    /// Nothing: a 2 GHz guess (deadlines may be off; the host times the bench window).
    Guess,
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads the time-stamp counter; allowed at CPL3 unless CR4.TSD, which the
    // kit does not set.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Reads the PM timer register.
fn pm_read(reg: Reg) -> u32 {
    match reg {
        // SAFETY: the FADT names this port as the PM timer; reading it has no side effects.
        Reg::Port(p) => unsafe { cpu::inl(p) },
        // SAFETY: as above, a memory-mapped register mapped by `init` before use.
        Reg::Mem(a) => unsafe { core::ptr::read_volatile(a as *const u32) },
    }
}

fn from_pm_timer(reg: Reg, wide: bool) -> Option<u64> {
    if let Reg::Mem(a) = reg {
        mm::map(a, 4).ok()?;
    }
    let mask = if wide { u32::MAX } else { 0x00ff_ffff };
    let (p0, t0) = (pm_read(reg) & mask, rdtsc());
    // 10 ms of PM timer ticks (35795: error well under 0.1 %), bounded in TSC cycles in case
    // the timer does not move.
    loop {
        let p = pm_read(reg) & mask;
        let t = rdtsc();
        let ticks = u64::from(p.wrapping_sub(p0) & mask);
        if ticks >= PM_TIMER_HZ / 100 {
            return Some((t - t0) * PM_TIMER_HZ / ticks);
        }
        if t - t0 > 20_000_000_000 {
            return None;
        }
    }
}

fn from_cpuid() -> Option<u64> {
    let max = cpuid(0)[0];
    if max >= 0x15 {
        let [den, num, crystal, _] = cpuid(0x15);
        if den != 0 && num != 0 && crystal != 0 {
            return Some(u64::from(crystal) * u64::from(num) / u64::from(den));
        }
    }
    let hv = cpuid(0x4000_0000)[0];
    if (0x4000_0010..0x4001_0000).contains(&hv) {
        let khz = cpuid(0x4000_0010)[0];
        if khz != 0 {
            return Some(u64::from(khz) * 1000);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16)[0] & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1_000_000);
        }
    }
    None
}

fn cmos(reg: u8) -> u8 {
    // SAFETY: CMOS index/data port I/O; the RTC registers read have no side effects.
    unsafe {
        cpu::outb(0x70, reg);
        cpu::inb(0x71)
    }
}

/// Seconds of the minute from the RTC, if an RTC answers (binary or BCD, as register B says).
fn rtc_second() -> Option<u8> {
    let v = cmos(0);
    if v == 0xff {
        return None;
    }
    Some(if cmos(0x0b) & 4 != 0 {
        v
    } else {
        (v >> 4) * 10 + (v & 0xf)
    })
}

fn from_rtc() -> Option<u64> {
    let edge = || {
        let s = rtc_second()?;
        let t0 = rdtsc();
        loop {
            let now = rtc_second()?;
            if now != s {
                return Some(rdtsc());
            }
            if rdtsc() - t0 > 40_000_000_000 {
                return None;
            }
        }
    };
    let a = edge()?;
    let b = edge()?;
    Some(b - a)
}

/// Calibrates the TSC once; returns what it was calibrated against and its frequency.
pub fn init(acpi: &Acpi) -> (Source, u64) {
    let (source, hz) = if let Some(hz) = acpi.pm_timer.and_then(|(r, w)| from_pm_timer(r, w)) {
        (Source::PmTimer, hz)
    } else if let Some(hz) = from_cpuid() {
        (Source::Cpuid, hz)
    } else if let Some(hz) = from_rtc() {
        (Source::Rtc, hz)
    } else {
        (Source::Guess, 2_000_000_000)
    };
    let hz = hz.max(1_000_000);
    TSC_HZ.store(hz, Ordering::Relaxed);
    (source, hz)
}

/// Nanoseconds since an arbitrary start.
pub fn now_ns() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed).max(1_000_000);
    (u128::from(rdtsc()) * 1_000_000_000 / u128::from(hz)) as u64
}

/// A point in time after which a wait gives up.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        Deadline(now_ns() + ms * 1_000_000)
    }

    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Deadline(now_ns() + us * 1000)
    }

    /// Whether it has passed.
    pub fn passed(&self) -> bool {
        now_ns() >= self.0
    }
}
