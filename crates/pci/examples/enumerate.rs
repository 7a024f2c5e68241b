//! Enumerates a PCI bus with one device, as firmware or a guest kernel would, using
//! `alioth-pci` alone: configuration mechanism #1 (ports 0xCF8/0xCFC) to find the functions,
//! then BAR sizing and the capability list.
//!
//! ```sh
//! cargo run -p alioth-pci --example enumerate
//! ```

use std::sync::{Arc, Mutex};

use alioth_mem::BusDevice;
use alioth_pci::{ConfigSpace, PciBus, PciConfigIo, PciFunction};

/// A device with a 4 KiB memory BAR and a vendor capability: a pvpanic-like PCI function.
struct Device(Mutex<ConfigSpace>);

impl Device {
    fn new() -> Device {
        let mut c = ConfigSpace::default();
        c.set_u16(0x00, 0x1b36); // vendor: Red Hat
        c.set_u16(0x02, 0x0011); // device: pvpanic
        c.set(0x0b, &[0x08]); // class: system peripheral
        c.set_u32(0x10, 0xfebf_0000); // BAR0: 32-bit memory
        c.set_wmask(0x10, &(!0xfffu32).to_le_bytes());
        c.add_capability(0x09, &[4, 0xaa])
            .expect("room for a capability");
        Device(Mutex::new(c))
    }
}

impl PciFunction for Device {
    fn name(&self) -> &str {
        "pvpanic"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.0.lock().unwrap().read(offset, data)
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.0.lock().unwrap().write(offset, data)
    }
}

/// Config access through 0xCF8/0xCFC, as port offsets 0 and 4 of the device.
struct Cf8(PciConfigIo);

impl Cf8 {
    fn select(&self, slot: u8, reg: u8) {
        let addr = (1u32 << 31) | (u32::from(slot) << 11) | u32::from(reg & 0xfc);
        self.0.write(0, &addr.to_le_bytes());
    }
    fn read32(&self, slot: u8, reg: u8) -> u32 {
        self.select(slot, reg);
        let mut b = [0u8; 4];
        self.0.read(4, &mut b);
        u32::from_le_bytes(b)
    }
    fn write32(&self, slot: u8, reg: u8, v: u32) {
        self.select(slot, reg);
        self.0.write(4, &v.to_le_bytes());
    }
}

fn main() {
    let bus = Arc::new(PciBus::default());
    bus.add(Arc::new(Device::new())).expect("a free slot");
    let cf8 = Cf8(PciConfigIo::new(bus));
    let mut found = Vec::new();
    for slot in 0..32u8 {
        let id = cf8.read32(slot, 0);
        if id == 0xffff_ffff {
            continue;
        }
        let class = cf8.read32(slot, 8) >> 24;
        print!(
            "00:{slot:02x}.0 {:04x}:{:04x} class {class:02x}",
            id & 0xffff,
            id >> 16
        );
        // Size BAR0: write all ones, read back the mask, restore.
        let bar = cf8.read32(slot, 0x10);
        cf8.write32(slot, 0x10, !0);
        let mask = cf8.read32(slot, 0x10);
        cf8.write32(slot, 0x10, bar);
        if mask != 0 {
            print!(
                ", BAR0 {:#x} size {:#x}",
                bar & !0xf,
                (!(mask & !0xf)).wrapping_add(1)
            );
        }
        // Walk the capability list.
        if cf8.read32(slot, 0x04) >> 16 & 0x10 != 0 {
            let mut at = (cf8.read32(slot, 0x34) & 0xff) as u8;
            while at != 0 {
                let head = cf8.read32(slot, at);
                print!(", cap {:#04x} at {at:#x}", head & 0xff);
                at = (head >> 8) as u8;
            }
        }
        println!();
        found.push(id);
    }
    assert_eq!(
        found,
        vec![0x0008_1b36, 0x0011_1b36],
        "host bridge and the device"
    );
}
