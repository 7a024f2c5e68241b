//! CMOS RAM and the MC146818 real-time clock on ports 0x70/0x71.
//!
//! The clock reads the host's time (UTC) in BCD, 24-hour mode, and never reports an update in
//! progress. The memory-size bytes firmware normally fills are set from the VM's RAM size.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use alioth_mem::BusDevice;

/// Index port; the data port follows it.
pub const BASE_PORT: u16 = 0x70;
/// Ports covered.
pub const LEN: u16 = 2;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

struct State {
    index: u8,
    ram: [u8; 128],
}

/// The CMOS/RTC device.
pub struct Cmos {
    state: Mutex<State>,
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Converts days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// The index register and the 128 bytes of RAM, for a snapshot (the clock registers are
    /// read from the host's clock, not kept).
    pub fn save(&self) -> (u8, Vec<u8>) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.index, s.ram.to_vec())
    }

    /// Puts back [`Cmos::save`]'s registers; false (nothing changed) if `ram` is not 128 bytes.
    pub fn restore(&self, index: u8, ram: &[u8]) -> bool {
        let Ok(ram): Result<[u8; 128], _> = ram.try_into() else {
            return false;
        };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.index = index & 0x7f;
        s.ram = ram;
        true
    }

    /// CMOS for a VM with `mem_below_4g` bytes of RAM under the 32-bit hole and `mem_above_4g`
    /// above 4 GiB.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[REG_B as usize] = 0x02; // 24-hour mode, BCD
        ram[REG_D as usize] = 0x80; // valid RAM and time
        // Base memory: 640 KiB.
        ram[0x15] = (640u16 & 0xff) as u8;
        ram[0x16] = (640u16 >> 8) as u8;
        // Extended memory between 1 MiB and 64 MiB, in KiB.
        let ext_kb = (mem_below_4g.saturating_sub(1 << 20) >> 10).min(0xfc00) as u16;
        for base in [0x17, 0x30] {
            ram[base] = ext_kb as u8;
            ram[base + 1] = (ext_kb >> 8) as u8;
        }
        // Memory between 16 MiB and 4 GiB, in 64 KiB units.
        let mid = (mem_below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34] = mid as u8;
        ram[0x35] = (mid >> 8) as u8;
        // Memory above 4 GiB, in 64 KiB units (24 bits).
        let high = (mem_above_4g >> 16).min(0xff_ffff) as u32;
        ram[0x5b] = high as u8;
        ram[0x5c] = (high >> 8) as u8;
        ram[0x5d] = (high >> 16) as u8;
        Cmos {
            state: Mutex::new(State { index: 0, ram }),
        }
    }

    fn clock(reg: u8) -> Option<u8> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = (now / 86_400) as i64;
        let secs = now % 86_400;
        let (y, m, d) = civil_from_days(days);
        let v = match reg {
            0x00 => bcd(secs % 60),
            0x02 => bcd((secs / 60) % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64), // 1970-01-01 was a Thursday
            0x07 => bcd(u64::from(d)),
            0x08 => bcd(u64::from(m)),
            0x09 => bcd((y % 100) as u64),
            CENTURY => bcd((y / 100) as u64),
            _ => return None,
        };
        Some(v)
    }
}

impl BusDevice for Cmos {
    fn name(&self) -> &str {
        "cmos"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let v = match offset {
            0 => st.index,
            _ => Self::clock(st.index).unwrap_or(st.ram[usize::from(st.index & 0x7f)]),
        };
        crate::put_byte(data, v);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; it is not part of the index.
            0 => st.index = v & 0x7f,
            _ => {
                let i = st.index;
                // The clock follows the host; status registers C and D are read-only.
                if Self::clock(i).is_none() && i != REG_C && i != REG_D {
                    st.ram[usize::from(i)] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_reg(c: &Cmos, i: u8) -> u8 {
        c.write(0, &[i]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
    }

    #[test]
    fn clock_is_bcd_and_memory_size_is_reported() {
        let c = Cmos::new(512 << 20, 1 << 30);
        let sec = read_reg(&c, 0);
        assert!(sec >> 4 <= 5 && sec & 0xf <= 9, "BCD seconds {sec:#x}");
        let century = read_reg(&c, CENTURY);
        assert_eq!(century, 0x20);
        let mid = u16::from(read_reg(&c, 0x34)) | u16::from(read_reg(&c, 0x35)) << 8;
        assert_eq!(u64::from(mid) << 16, (512 << 20) - (16 << 20));
        assert_eq!(read_reg(&c, 0x5c), 0x40); // 1 GiB = 0x4000 x 64 KiB
        assert_eq!(read_reg(&c, REG_D), 0x80);
        c.write(0, &[0x80 | 0x40]); // NMI mask bit is not part of the index
        c.write(1, &[0x5a]);
        assert_eq!(read_reg(&c, 0x40), 0x5a);
    }
}
