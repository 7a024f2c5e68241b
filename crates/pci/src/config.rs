//! Configuration space: 4 KiB of bytes with per-byte write masks and a capability list.

/// A 4 KiB configuration space with per-byte write masks.
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    /// Where the next capability goes, and the last one added (whose next pointer links it).
    next_cap: usize,
    last_cap: Option<usize>,
}

/// Size of a function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// The status register.
pub const STATUS: usize = 0x06;
/// Status bit: the function has a capability list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// The capabilities pointer.
pub const CAP_POINTER: usize = 0x34;
/// Where capabilities start (the end of the type 0 header).
pub const CAP_START: usize = 0x40;
/// The end of the legacy configuration space, where standard capabilities must fit.
const CAP_END: usize = 0x100;

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            wmask: vec![0; CONFIG_SPACE_SIZE],
            next_cap: CAP_START,
            last_cap: None,
        }
    }
}

impl ConfigSpace {
    /// The 4096 bytes as the guest last left them (for a snapshot).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Puts back bytes from [`ConfigSpace::bytes`] of a function built the same way; false
    /// (and nothing changed) if the length is not 4096. Read-only fields are taken as saved:
    /// they were this function's own.
    pub fn restore_bytes(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() != CONFIG_SPACE_SIZE {
            return false;
        }
        self.bytes.copy_from_slice(bytes);
        true
    }

    /// Appends a capability with ID `id` whose bytes after the ID and next pointer are `body`,
    /// links it into the list (setting the capabilities pointer and the status bit for the
    /// first one) and returns its offset; `None` when it does not fit below 0x100.
    ///
    /// ```
    /// use alioth_pci::ConfigSpace;
    ///
    /// let mut c = ConfigSpace::default();
    /// let a = c.add_capability(0x09, &[4, 1]).unwrap();
    /// let b = c.add_capability(0x11, &[0; 10]).unwrap();
    /// assert_eq!((a, b), (0x40, 0x44));
    /// assert_eq!(c.u16_at(0x34) & 0xff, 0x40); // capabilities pointer
    /// assert_eq!(c.u16_at(a) >> 8, 0x44); // next pointer of the first
    /// ```
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Option<usize> {
        let at = self.next_cap;
        let end = at.checked_add(2 + body.len())?;
        if end > CAP_END {
            return None;
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..end].copy_from_slice(body);
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = at as u8,
            None => {
                self.bytes[CAP_POINTER] = at as u8;
                let st = self.u16_at(STATUS) | STATUS_CAP_LIST;
                self.set_u16(STATUS, st);
            }
        }
        self.last_cap = Some(at);
        self.next_cap = end.next_multiple_of(4);
        Some(at)
    }

    /// Sets read-only bytes.
    pub fn set(&mut self, offset: usize, v: &[u8]) {
        self.bytes[offset..offset + v.len()].copy_from_slice(v);
    }

    /// Sets a little-endian u16.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Sets a little-endian u32.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Makes bits writable by the guest.
    pub fn set_wmask(&mut self, offset: usize, mask: &[u8]) {
        self.wmask[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// A little-endian u32.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(
            self.bytes[offset..offset + 4]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// A little-endian u16.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// A guest read; out-of-range bytes read as 0xff.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self
                .bytes
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A guest write, honouring the write masks.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = usize::from(offset) + i;
            if o >= self.bytes.len() {
                break;
            }
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
    }
}
