use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::layout::RAM_ABOVE_4G;

#[test]
fn ram_above_and_below_the_hole_shares_one_memfd() {
    let ram = RamBus::new(MemoryMap::new(3 << 30 | 64 << 20).unwrap()).unwrap();
    let regions = ram.regions();
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[1].gpa, RAM_ABOVE_4G);
    ram.memory()
        .write_obj(0x1234_5678u32, GuestAddress(RAM_ABOVE_4G + 16))
        .unwrap();
    // The same bytes are visible through the memfd at offset (low size + 16).
    let mut buf = [0u8; 4];
    let n = nix_pread(ram.fd(), &mut buf, (3u64 << 30) + 16);
    assert_eq!(n, 4);
    assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
    // The hole is not RAM.
    assert!(
        ram.memory()
            .read_obj::<u32>(GuestAddress(0xd000_0000))
            .is_err()
    );
}

fn nix_pread(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8], off: u64) -> isize {
    use std::os::fd::AsRawFd;
    // SAFETY: buf is a valid writable buffer of buf.len() bytes.
    unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as i64,
        )
    }
}

#[test]
fn memory_larger_than_the_host_can_map_is_an_error_not_a_panic() {
    // 2^51 bytes is a valid physical size but no x86-64 process can map it.
    let err = match RamBus::new(MemoryMap::new(1 << 51).unwrap()) {
        Err(e) => e,
        Ok(_) => panic!("mapping 2 PiB should fail"),
    };
    assert!(err.to_string().contains("guest memory"), "{err}");
}

#[test]
fn saved_ram_is_sparse_and_loads_back_into_fresh_ram_with_the_same_hash() {
    use vm_memory::{Bytes, GuestAddress};
    let ram = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    let m = ram.memory();
    m.write_slice(b"first page", GuestAddress(0x1000)).unwrap();
    m.write_slice(&[0xab; 8192], GuestAddress(0x200_0000))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.bin");
    let f = std::fs::File::create(&path).unwrap();
    let saved = ram.save_to(&f).unwrap();
    assert!(
        saved.bytes >= 4096 + 8192 && saved.bytes < 1 << 20,
        "{saved:?}"
    );
    // Sparse: far fewer blocks than the 64 MiB length.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    let fresh = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    let loaded = fresh
        .load_from(&std::fs::File::open(&path).unwrap())
        .unwrap();
    assert_eq!(loaded, saved);
    let mut b = [0u8; 10];
    fresh
        .memory()
        .read_slice(&mut b, GuestAddress(0x1000))
        .unwrap();
    assert_eq!(&b, b"first page");
    // Another size, or a flipped byte, shows.
    let small = RamBus::new(MemoryMap::new(32 << 20).unwrap()).unwrap();
    assert!(
        small
            .load_from(&std::fs::File::open(&path).unwrap())
            .is_err()
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xac], 0x200_0010).unwrap();
    }
    let again = RamBus::new(MemoryMap::new(64 << 20).unwrap()).unwrap();
    let l2 = again
        .load_from(&std::fs::File::open(&path).unwrap())
        .unwrap();
    assert_ne!(l2.hash, saved.hash);
}
