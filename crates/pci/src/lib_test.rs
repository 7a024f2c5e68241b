use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use alioth_mem::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use super::*;

struct Fixed(ConfigSpace);

impl PciFunction for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn config_write(&self, _offset: u16, _data: &[u8]) {}
}

fn device(vendor: u16) -> Arc<Fixed> {
    let mut c = ConfigSpace::default();
    c.set_u16(0, vendor);
    Arc::new(Fixed(c))
}

fn cf8_read(io: &PciConfigIo, bus: u8, slot: u8, reg: u8, len: usize) -> u32 {
    let addr = (1u32 << 31) | (u32::from(bus) << 16) | (u32::from(slot) << 11) | u32::from(reg);
    io.write(0, &addr.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(4 + u64::from(reg & 3), &mut b[..len]);
    u32::from_le_bytes(b)
}

#[test]
fn host_bridge_sits_at_slot_0_and_devices_fill_free_slots() {
    let bus = Arc::new(PciBus::default());
    assert_eq!(bus.add(device(0x1111)), Some(1));
    assert_eq!(bus.add(device(0x2222)), Some(2));
    let io = PciConfigIo::new(bus.clone());
    assert_eq!(cf8_read(&io, 0, 0, 0, 4), 0x0008_1b36);
    assert_eq!(cf8_read(&io, 0, 1, 0, 2), 0x1111);
    assert_eq!(cf8_read(&io, 0, 2, 0, 2), 0x2222);
    // Absent slots, other buses and other functions read as all ones.
    assert_eq!(cf8_read(&io, 0, 3, 0, 4), 0xffff_ffff);
    assert_eq!(cf8_read(&io, 1, 1, 0, 4), 0xffff_ffff);
    let mut b = [0u8; 4];
    PciEcam::new(bus.clone()).read((1 << 15) | (1 << 12), &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn a_full_bus_refuses_another_device() {
    let bus = PciBus::default();
    for _ in 1..SLOTS {
        assert!(bus.add(device(1)).is_some());
    }
    assert_eq!(bus.add(device(1)), None);
}

#[test]
fn cf8_without_the_enable_bit_reads_ones_and_ignores_writes() {
    let bus = Arc::new(PciBus::default());
    let io = PciConfigIo::new(bus);
    io.write(0, &0u32.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    io.read(0, &mut b);
    assert_eq!(b, [0; 4], "the address register reads back");
}

#[test]
fn write_masks_keep_read_only_bits() {
    let mut c = ConfigSpace::default();
    c.set_u16(4, 0);
    c.set_wmask(4, &[0x06, 0x00]);
    c.write(4, &[0xff, 0xff]);
    assert_eq!(c.u16_at(4), 0x06);
    // Writes past the end are dropped, reads past it are all ones.
    c.write(4095, &[1, 2, 3]);
    let mut b = [0u8; 2];
    c.read(4095, &mut b);
    assert_eq!(b, [0, 0xff]);
}

#[test]
fn capabilities_chain_and_stop_at_0x100() {
    let mut c = ConfigSpace::default();
    let first = c.add_capability(0x09, &[14, 1, 0, 0]).unwrap();
    let second = c.add_capability(0x09, &[3; 13]).unwrap();
    assert_eq!(c.u16_at(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
    let mut walked = Vec::new();
    let mut at = usize::from(c.u16_at(CAP_POINTER) as u8);
    while at != 0 {
        walked.push(at);
        at = usize::from((c.u16_at(at) >> 8) as u8);
    }
    assert_eq!(walked, vec![first, second]);
    assert_eq!(second % 4, 0);
    assert!(c.add_capability(0x09, &[0; 0xc0]).is_none());
}

#[derive(Default)]
struct Router {
    routes: Mutex<Vec<(u32, u64, u32)>>,
    irqfds: Mutex<Vec<(i32, u32)>>,
}

impl MsiRouter for Router {
    fn alloc_gsi(&self) -> std::io::Result<u32> {
        Ok(24 + self.irqfds.lock().unwrap().len() as u32)
    }
    fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
        self.routes.lock().unwrap().push((gsi, addr, data));
        Ok(())
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.irqfds.lock().unwrap().push((fd.as_raw_fd(), gsi));
        Ok(())
    }
}

fn fired(fd: &EventFd) -> bool {
    fd.read().is_ok()
}

#[test]
fn msix_vectors_route_mask_pend_and_fire_on_unmask() {
    let router = Arc::new(Router::default());
    let mut t = MsixTable::new("dev", 2, router.clone()).unwrap();
    assert_eq!(router.irqfds.lock().unwrap().len(), 2);
    // Program vector 1 with one 8-byte address write and a data write: one route per write.
    t.table_write(16, &0xfee0_1000u64.to_le_bytes());
    t.table_write(24, &0x41u32.to_le_bytes());
    assert_eq!(
        router.routes.lock().unwrap().last(),
        Some(&(25, 0xfee0_1000, 0x41))
    );
    let mut b = [0u8; 4];
    t.table_read(24, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x41);
    // Disabled: the interrupt pends.
    t.fire(1);
    assert!(t.is_pending(1));
    let mut pba = [0u8; 8];
    t.pba_read(0, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b10);
    // Enabled but the vector is still masked: still pending.
    t.set_control(0x8000);
    assert!(!fired(t.irqfd(1).unwrap()));
    // Unmask: it fires once and the pending bit clears.
    t.table_write(28, &0u32.to_le_bytes());
    assert!(fired(t.irqfd(1).unwrap()));
    assert!(!t.is_pending(1));
    // Function mask pends again; clearing it fires.
    t.set_control(0xc000);
    t.fire(1);
    assert!(!fired(t.irqfd(1).unwrap()));
    t.set_control(0x8000);
    assert!(fired(t.irqfd(1).unwrap()));
    // Out-of-range vectors and table offsets are ignored.
    t.fire(7);
    t.table_write(16 * 9, &[1; 4]);
    t.table_read(16 * 9, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn msix_capability_points_at_its_table_and_pba() {
    let mut c = ConfigSpace::default();
    let at = add_msix_capability(&mut c, 3, 0, 0x4000, 0x5000).unwrap();
    assert_eq!(c.u16_at(at) & 0xff, u16::from(MSIX_CAP_ID));
    assert_eq!(c.u16_at(at + 2), 2, "table size is N - 1");
    assert_eq!(c.u32_at(at + 4), 0x4000);
    assert_eq!(c.u32_at(at + 8), 0x5000);
    c.write(at as u16 + 2, &[0xff, 0xff]);
    assert_eq!(
        c.u16_at(at + 2),
        0xc002,
        "only enable and mask are writable"
    );
    assert!(add_msix_capability(&mut c, 0, 0, 0, 0).is_none());
}
