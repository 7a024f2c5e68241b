use std::sync::Mutex;

use super::*;

struct Recorder {
    name: &'static str,
    log: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl BusDevice for Recorder {
    fn name(&self) -> &str {
        self.name
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.log.lock().unwrap().push((offset, data.to_vec()));
    }
}

fn dev(name: &'static str) -> Arc<Recorder> {
    Arc::new(Recorder {
        name,
        log: Mutex::new(Vec::new()),
    })
}

#[test]
fn accesses_reach_the_device_at_their_offset() {
    let bus = Bus::new("pio");
    let a = dev("a");
    bus.insert(0x3f8, 8, a.clone()).unwrap();
    assert!(bus.write(0x3fb, &[9]));
    let mut b = [0u8; 1];
    assert!(bus.read(0x3fd, &mut b));
    assert_eq!(b, [5]);
    assert!(!bus.read(0x400, &mut b), "past the end");
    assert!(!bus.write(0x3f7, &[1]), "before the start");
    assert_eq!(*a.log.lock().unwrap(), vec![(3, vec![9])]);
}

#[test]
fn overlapping_ranges_are_rejected_with_both_names() {
    let bus = Bus::new("mmio");
    bus.insert(0x1000, 0x100, dev("first")).unwrap();
    for (base, len) in [(0x1000, 1), (0xf00, 0x101), (0x10ff, 0x10), (0x0, u64::MAX)] {
        let err = bus.insert(base, len, dev("second")).unwrap_err();
        assert!(err.to_string().contains("first"), "{err}");
    }
    bus.insert(0x1100, 0x100, dev("adjacent")).unwrap();
    bus.insert(0xf00, 0x100, dev("below")).unwrap();
    assert!(matches!(
        bus.insert(5, 0, dev("empty")),
        Err(Error::BadRange { .. })
    ));
    assert!(matches!(
        bus.insert(u64::MAX, 2, dev("wraps")),
        Err(Error::BadRange { .. })
    ));
    assert!(bus.remove(0x1000));
    bus.insert(0x1000, 0x100, dev("again")).unwrap();
}
