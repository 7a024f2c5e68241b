use alioth_mem::{MemoryMap, RamBus};
use vm_memory::{Bytes, GuestAddress};

use super::*;

fn read(ram: &RamBus, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ram.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn table(ram: &RamBus, addr: u64) -> Vec<u8> {
    let hdr = read(ram, addr, 8);
    let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
    read(ram, addr, len)
}

fn config(n: u32) -> AcpiConfig {
    AcpiConfig {
        nr_vcpus: n,
        serials: vec![LegacySerial {
            port: 0x3f8,
            irq: 4,
        }],
        pm: PmPorts {
            sleep_control: 0x3c0,
            sleep_status: 0x3c1,
            reset: 0x3c2,
            reset_value: 1,
            timer: Some(0x3c4),
        },
        ecam: Some((0xe000_0000, 0, 0)),
    }
}

#[test]
fn tables_chain_from_rsdp_with_valid_checksums() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    let rsdp = write_acpi_tables(ram.memory(), &config(2)).unwrap();
    let r = read(&ram, rsdp, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0);
    assert_eq!(sum(&r), 0);
    let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
    let xsdt = table(&ram, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(sum(&xsdt), 0);
    let mut sigs = Vec::new();
    for p in xsdt[36..].chunks(8) {
        let t = table(&ram, u64::from_le_bytes(p.try_into().unwrap()));
        assert_eq!(sum(&t), 0, "checksum of {:?}", &t[..4]);
        sigs.push(String::from_utf8_lossy(&t[..4]).to_string());
        if &t[..4] == b"FACP" {
            let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
            assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
            // The PM timer: PM_TMR_BLK, PM_TMR_LEN 4, X_PM_TMR_BLK (I/O, 32 bits), TMR_VAL_EXT.
            assert_eq!(u32::from_le_bytes(t[76..80].try_into().unwrap()), 0x3c4);
            assert_eq!(t[91], 4);
            assert_eq!(&t[208..212], &[1, 32, 0, 3]);
            assert_eq!(u64::from_le_bytes(t[212..220].try_into().unwrap()), 0x3c4);
            assert_ne!(flags & (1 << 8), 0, "TMR_VAL_EXT");
            let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
            let d = table(&ram, dsdt);
            assert_eq!(&d[..4], b"DSDT");
            assert_eq!(sum(&d), 0);
            assert!(d.windows(4).any(|w| w == b"_S5_"));
            assert!(d.windows(4).any(|w| w == b"COM1"));
            assert!(d.windows(4).any(|w| w == b"PCI0"), "PCI root bridge");
        }
        if &t[..4] == b"APIC" {
            // Two processor-local APIC entries (type 0) with IDs 0 and 1.
            let mut off = 44;
            let mut ids = Vec::new();
            while off < t.len() {
                if t[off] == 0 {
                    ids.push(t[off + 3]);
                }
                off += t[off + 1] as usize;
            }
            assert_eq!(ids, vec![0, 1]);
        }
    }
    assert_eq!(sigs, vec!["FACP", "APIC", "MCFG"]);
}

#[test]
fn too_many_vcpus_is_an_error() {
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    assert!(write_acpi_tables(ram.memory(), &config(0)).is_err());
    assert!(write_acpi_tables(ram.memory(), &config(300)).is_err());
}
