//! MSI-X (PCI 3.0 §6.8.2): a vector table and pending-bit array that a device places in a BAR,
//! each vector delivered through an irqfd whose MSI route follows the guest's writes.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::ConfigSpace;

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry (address low, address high, data, vector control).
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CTRL_ENABLE: u16 = 0x8000;
/// Message control: function mask.
const CTRL_MASK: u16 = 0x4000;

/// Sets up MSI routes and irqfds in the VM (the VMM implements it over its hypervisor).
pub trait MsiRouter: Send + Sync {
    /// A free GSI for an MSI route.
    fn alloc_gsi(&self) -> std::io::Result<u32>;
    /// Routes `gsi` to the MSI message (`addr`, `data`).
    fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()>;
    /// Makes a write to `fd` inject `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()>;
}

struct Vector {
    addr: u64,
    data: u32,
    masked: bool,
    pending: bool,
    gsi: u32,
    irqfd: EventFd,
}

/// One MSI-X vector as the guest programmed it (for a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsixEntry {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// The vector's mask bit.
    pub masked: bool,
    /// Its pending bit.
    pub pending: bool,
}

/// Reads up to 8 bytes little-endian (a BAR or configuration access).
pub fn read_le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Stores the low `data.len()` bytes (at most 8) of `v` little-endian.
pub fn write_le(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

/// Adds an MSI-X capability for `vectors` vectors whose table is at `table` and PBA at `pba`
/// (offsets into BAR `bir`) to `cfg`, with the enable and function-mask bits writable. Returns
/// the capability's offset (its message control is at offset + 2).
pub fn add_msix_capability(
    cfg: &mut ConfigSpace,
    vectors: u16,
    bir: u8,
    table: u32,
    pba: u32,
) -> Option<usize> {
    let n = vectors.checked_sub(1)?;
    let mut body = [0u8; 10];
    body[..2].copy_from_slice(&n.to_le_bytes());
    body[2..6].copy_from_slice(&(table | u32::from(bir & 7)).to_le_bytes());
    body[6..10].copy_from_slice(&(pba | u32::from(bir & 7)).to_le_bytes());
    let at = cfg.add_capability(MSIX_CAP_ID, &body)?;
    cfg.set_wmask(at + 3, &[0xc0]);
    Some(at)
}

/// A function's MSI-X vectors: the table and PBA as the guest sees them, one irqfd per vector.
///
/// A vector fires through its irqfd when MSI-X is enabled and neither the function nor the
/// vector is masked; otherwise its pending bit is set, and it fires when unmasked.
pub struct MsixTable {
    name: String,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<Vector>,
    router: Arc<dyn MsiRouter>,
}

impl MsixTable {
    /// `n` vectors, each with a GSI from `router` and an irqfd registered on it; all masked.
    pub fn new(name: &str, n: u16, router: Arc<dyn MsiRouter>) -> std::io::Result<Self> {
        let mut vectors = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let gsi = router.alloc_gsi()?;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            router.register_irqfd(&irqfd, gsi)?;
            vectors.push(Vector {
                addr: 0,
                data: 0,
                masked: true,
                pending: false,
                gsi,
                irqfd,
            });
        }
        Ok(MsixTable {
            name: name.to_string(),
            enabled: false,
            function_masked: false,
            vectors,
            router,
        })
    }

    /// The number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The irqfd of vector `v`.
    pub fn irqfd(&self, v: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(v)).map(|x| &x.irqfd)
    }

    /// Whether vector `v`'s pending bit is set.
    pub fn is_pending(&self, v: u16) -> bool {
        self.vectors.get(usize::from(v)).is_some_and(|x| x.pending)
    }

    /// Signals vector `v` (or records it as pending while masked). Out-of-range vectors are
    /// ignored.
    pub fn fire(&mut self, v: u16) {
        let (enabled, fmask) = (self.enabled, self.function_masked);
        let Some(vec) = self.vectors.get_mut(usize::from(v)) else {
            return;
        };
        if !enabled || fmask || vec.masked {
            vec.pending = true;
            return;
        }
        if let Err(e) = vec.irqfd.write(1) {
            log::warn!("{}: MSI-X vector {v}: irqfd write failed: {e}", self.name);
        }
    }

    /// Every vector as programmed (for a snapshot); the enable and function-mask bits live in
    /// the capability's message control, in configuration space.
    pub fn save(&self) -> Vec<MsixEntry> {
        self.vectors
            .iter()
            .map(|v| MsixEntry {
                addr: v.addr,
                data: v.data,
                masked: v.masked,
                pending: v.pending,
            })
            .collect()
    }

    /// Programs the vectors from [`MsixTable::save`] (routes included) and the message
    /// control `ctrl`; interrupts pending and now deliverable fire. Fails if the vector count
    /// differs.
    pub fn restore(&mut self, entries: &[MsixEntry], ctrl: u16) -> std::io::Result<()> {
        if entries.len() != self.vectors.len() {
            return Err(std::io::Error::other(format!(
                "{}: {} MSI-X vectors saved, the device has {}",
                self.name,
                entries.len(),
                self.vectors.len()
            )));
        }
        for (v, e) in self.vectors.iter_mut().zip(entries) {
            v.addr = e.addr;
            v.data = e.data;
            v.masked = e.masked;
            v.pending = e.pending;
            if e.addr != 0 {
                self.router.set_route(v.gsi, e.addr, e.data)?;
            }
        }
        self.set_control(ctrl);
        Ok(())
    }

    /// The guest wrote the capability's message control.
    pub fn set_control(&mut self, ctrl: u16) {
        self.enabled = ctrl & CTRL_ENABLE != 0;
        self.function_masked = ctrl & CTRL_MASK != 0;
        self.flush_pending();
    }

    fn flush_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for (i, vec) in self.vectors.iter_mut().enumerate() {
            if vec.pending && !vec.masked {
                vec.pending = false;
                if let Err(e) = vec.irqfd.write(1) {
                    log::warn!("{}: MSI-X vector {i}: irqfd write failed: {e}", self.name);
                }
            }
        }
    }

    /// A guest read at `offset` into the table.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let Some(v) = self.vectors.get((offset / MSIX_ENTRY_SIZE) as usize) else {
            data.fill(0);
            return;
        };
        let entry = [
            v.addr as u32,
            (v.addr >> 32) as u32,
            v.data,
            u32::from(v.masked),
        ];
        let field = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        if data.len() == 8 && field.is_multiple_of(2) {
            write_le(
                data,
                u64::from(entry[field]) | (u64::from(entry[field + 1]) << 32),
            );
        } else {
            write_le(data, u64::from(entry[field]));
        }
    }

    /// A guest write at `offset` into the table: address and data update the vector's route,
    /// the mask bit may release a pending interrupt.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let idx = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(v) = self.vectors.get_mut(idx) else {
            return;
        };
        let val = read_le(data);
        let first = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        let mut route = false;
        let words = if data.len() == 8 { 2 } else { 1 };
        for (field, w) in [(first, val as u32), (first + 1, (val >> 32) as u32)]
            .into_iter()
            .take(words)
        {
            match field {
                0 => v.addr = (v.addr & !0xffff_ffff) | u64::from(w),
                1 => v.addr = (v.addr & 0xffff_ffff) | (u64::from(w) << 32),
                2 => v.data = w,
                3 => v.masked = w & 1 == 1,
                _ => {}
            }
            route |= field < 3;
        }
        if route && let Err(e) = self.router.set_route(v.gsi, v.addr, v.data) {
            log::warn!("{}: MSI-X vector {idx}: route: {e}", self.name);
        }
        self.flush_pending();
    }

    /// A guest read at `offset` into the pending-bit array (writes to it are ignored).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let word = (offset / 8) as usize;
        let mut bits = 0u64;
        for (i, v) in self.vectors.iter().enumerate().skip(word * 64).take(64) {
            if v.pending {
                bits |= 1 << (i % 64);
            }
        }
        write_le(data, bits >> ((offset % 8) * 8));
    }
}
