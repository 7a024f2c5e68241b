//! Address buses: MMIO and port I/O ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::{Error, Result};

/// A device on a bus. Accesses are at an offset from the start of the device's range; `data`'s
/// length is the access width. Devices use interior mutability: vCPU threads call them
/// concurrently.
pub trait BusDevice: Send + Sync {
    /// The device's name, for logs and errors (`serial0`, `i8042`, ...).
    fn name(&self) -> &str;
    /// A read of `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

struct Entry {
    len: u64,
    dev: Arc<dyn BusDevice>,
}

/// Maps non-overlapping address ranges to devices.
pub struct Bus {
    name: &'static str,
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus called `name` (`mmio`, `pio`).
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            ranges: RwLock::new(BTreeMap::new()),
        }
    }

    /// Places `dev` at `[base, base + len)`. Fails if the range is empty, wraps, or overlaps a
    /// range already on the bus.
    pub fn insert(&self, base: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<()> {
        let bad = || Error::BadRange {
            bus: self.name,
            base,
            len,
        };
        if len == 0 {
            return Err(bad());
        }
        let end = base.checked_add(len - 1).ok_or_else(bad)?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The entry starting at or below `end` with the highest start is the only candidate.
        if let Some((&b, e)) = ranges.range(..=end).next_back()
            && b + (e.len - 1) >= base
        {
            return Err(Error::Overlap {
                bus: self.name,
                base,
                len,
                other_base: b,
                other_len: e.len,
                other: e.dev.name().to_string(),
            });
        }
        ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    /// Removes the device placed at `base`; returns whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).is_some()
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<dyn BusDevice>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&b, e) = ranges.range(..=addr).next_back()?;
        (addr - b < e.len).then(|| (addr - b, e.dev.clone()))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
#[path = "bus_test.rs"]
mod tests;
