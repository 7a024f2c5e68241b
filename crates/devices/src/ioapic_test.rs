use std::sync::{Arc, Mutex};

use alioth_mem::BusDevice;

use super::*;

type Routes = Arc<Mutex<Vec<(u32, Option<(u64, u32)>)>>>;

fn ioapic() -> (IoApic, Routes) {
    let routes: Routes = Arc::new(Mutex::new(Vec::new()));
    let r = routes.clone();
    let dev = IoApic::new(Arc::new(move |pin, msi| {
        r.lock().unwrap().push((pin, msi));
        Ok(())
    }));
    (dev, routes)
}

fn write_reg(dev: &IoApic, reg: u32, v: u32) {
    dev.write(IOREGSEL, &reg.to_le_bytes());
    dev.write(IOWIN, &v.to_le_bytes());
}

fn read_reg(dev: &IoApic, reg: u32) -> u32 {
    dev.write(IOREGSEL, &reg.to_le_bytes());
    let mut b = [0u8; 4];
    dev.read(IOWIN, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn version_names_24_pins_and_every_pin_starts_masked() {
    let (dev, routes) = ioapic();
    assert_eq!(read_reg(&dev, REG_VER), 0x0017_0011);
    for pin in 0..PINS as u32 {
        assert_eq!(read_reg(&dev, REG_RTE0 + 2 * pin) & (1 << 16), 1 << 16);
    }
    assert!(routes.lock().unwrap().is_empty());
}

#[test]
fn an_unmasked_entry_becomes_its_msi_route_and_masking_removes_it() {
    let (dev, routes) = ioapic();
    // Pin 4 (COM1): vector 0x24, fixed, physical destination APIC 1, edge, high, masked.
    write_reg(&dev, REG_RTE0 + 9, 1 << 24);
    write_reg(&dev, REG_RTE0 + 8, 0x24 | (1 << 16));
    assert!(routes.lock().unwrap().iter().all(|(_, m)| m.is_none()));
    // Unmask.
    write_reg(&dev, REG_RTE0 + 8, 0x24);
    assert_eq!(
        routes.lock().unwrap().last(),
        Some(&(4, Some((0xfee0_1000, 0x24))))
    );
    assert_eq!(dev.rte(4), Some((1 << 56) | 0x24));
    // Lowest priority, logical destination 3.
    write_reg(&dev, REG_RTE0 + 9, 3 << 24);
    write_reg(&dev, REG_RTE0 + 8, 0x31 | (1 << 8) | (1 << 11));
    assert_eq!(
        routes.lock().unwrap().last(),
        Some(&(4, Some((0xfee0_3004, 0x131))))
    );
    write_reg(&dev, REG_RTE0 + 8, 0x31 | (1 << 16));
    assert_eq!(routes.lock().unwrap().last(), Some(&(4, None)));
}

#[test]
fn read_only_bits_and_registers_past_the_table_are_left_alone() {
    let (dev, routes) = ioapic();
    // Delivery status (12) and remote IRR (14) are read-only.
    write_reg(&dev, REG_RTE0, (1 << 12) | (1 << 14) | (1 << 16));
    assert_eq!(read_reg(&dev, REG_RTE0), 1 << 16);
    // A register beyond pin 23 reads 0 and is not written.
    write_reg(&dev, REG_RTE0 + 2 * PINS as u32, 0x55);
    assert_eq!(read_reg(&dev, REG_RTE0 + 2 * PINS as u32), 0);
    assert!(routes.lock().unwrap().is_empty());
    // Odd offsets and sizes do not panic.
    dev.write(0x7, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let mut b = [0u8; 8];
    dev.read(0x3, &mut b);
}
