use super::*;

#[test]
fn small_guest_has_one_region_and_three_e820_entries() {
    let m = MemoryMap::new(256 << 20).unwrap();
    assert_eq!(m.ram_regions(), vec![(0, 256 << 20)]);
    let e = m.e820();
    assert_eq!(e.len(), 4);
    assert_eq!(
        (e[0].addr, e[0].size, e[0].kind),
        (0, 0xa_0000, E820Kind::Ram)
    );
    assert_eq!(
        (e[1].addr, e[1].size, e[1].kind),
        (0xa_0000, 0x6_0000, E820Kind::Reserved)
    );
    assert_eq!((e[2].addr, e[2].addr + e[2].size), (0x10_0000, 256 << 20));
    assert_eq!(
        (e[3].addr, e[3].size, e[3].kind),
        (ECAM_BASE, ECAM_SIZE, E820Kind::Reserved)
    );
}

#[test]
fn large_guest_continues_above_4g() {
    let m = MemoryMap::new(4 << 30).unwrap();
    assert_eq!(
        m.ram_regions(),
        vec![(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)]
    );
    assert_eq!(m.ram_end(), 0x1_4000_0000);
    assert_eq!(m.e820().last().unwrap().addr, 0x1_0000_0000);
}

#[test]
fn bad_sizes_are_rejected_with_reason() {
    assert!(
        MemoryMap::new(0)
            .unwrap_err()
            .to_string()
            .contains("at least")
    );
    assert!(
        MemoryMap::new((64 << 20) + 1)
            .unwrap_err()
            .to_string()
            .contains("4 KiB")
    );
    assert!(
        MemoryMap::new(1 << 60)
            .unwrap_err()
            .to_string()
            .contains("address space")
    );
}

#[test]
fn usable_ram_excludes_bios_area_and_hole() {
    let m = MemoryMap::new(64 << 20).unwrap();
    assert!(m.is_usable_ram(0x1000, 0x1000));
    assert!(!m.is_usable_ram(0xe_0000, 16));
    assert!(!m.is_usable_ram((64 << 20) - 8, 16));
    assert!(!m.is_usable_ram(u64::MAX, 2));
}
