use alioth_mem::{MemoryMap, RamBus};

use crate::testing::TestDriver;
use crate::*;

const BASE: u64 = 0x10_0000;

fn ram(size: u64) -> RamBus {
    RamBus::new(MemoryMap::new(size).unwrap()).unwrap()
}

fn combos() -> Vec<(QueueFormat, u64)> {
    let mut v = Vec::new();
    for f in [QueueFormat::Split, QueueFormat::Packed] {
        for feats in [
            0,
            1 << VIRTIO_F_EVENT_IDX,
            1 << VIRTIO_F_INDIRECT_DESC,
            (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC),
        ] {
            v.push((f, feats));
        }
    }
    v
}

#[test]
fn chains_round_trip_in_every_format() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for (format, feats) in combos() {
        let mut d = TestDriver::new(mem, format, 8, BASE, feats);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        assert_eq!(q.format(), format);
        let id = d.add(&[b"hello ", b"world"], &[4, 60]).unwrap();
        let c = q.pop(mem).unwrap().expect("a chain");
        assert_eq!(c.id(), id);
        assert_eq!((c.readable_len(), c.writable_len()), (11, 64));
        let mut buf = [0u8; 11];
        assert_eq!(c.read_at(mem, 0, &mut buf).unwrap(), 11);
        assert_eq!(&buf, b"hello world");
        let mut tail = [0u8; 8];
        assert_eq!(c.read_at(mem, 8, &mut tail).unwrap(), 3, "short at the end");
        let msg: Vec<u8> = (0..10u8).collect();
        assert_eq!(
            c.write_at(mem, 0, &msg).unwrap(),
            10,
            "spans both writable buffers"
        );
        q.push_used(mem, &c, 10).unwrap();
        assert!(q.pop(mem).unwrap().is_none());
        assert_eq!(d.used(), Some((id, 10)), "{format:?} {feats:#x}");
        assert_eq!(d.written(id), msg);
    }
}

#[test]
fn many_laps_with_out_of_order_completion() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for (format, feats) in combos() {
        let mut d = TestDriver::new(mem, format, 4, BASE, feats);
        let mut q = new_queue(4, d.config(), d.features(), mem).unwrap();
        for round in 0..25u32 {
            let mut ids = Vec::new();
            while let Some(id) = d.add(&[&round.to_le_bytes()], &[8]) {
                ids.push(id);
            }
            assert!(!ids.is_empty());
            let mut chains = Vec::new();
            while let Some(c) = q.pop(mem).unwrap() {
                chains.push(c);
            }
            assert_eq!(chains.len(), ids.len(), "{format:?} round {round}");
            // Complete newest first: the device may return chains in any order.
            for c in chains.iter().rev() {
                let mut b = [0u8; 4];
                c.read_at(mem, 0, &mut b).unwrap();
                c.write_at(mem, 0, &b).unwrap();
                q.push_used(mem, c, 4).unwrap();
            }
            let mut got = Vec::new();
            while let Some((id, len)) = d.used() {
                assert_eq!(len, 4);
                assert_eq!(d.written(id), round.to_le_bytes());
                got.push(id);
            }
            got.sort();
            ids.sort();
            assert_eq!(got, ids, "{format:?} {feats:#x} round {round}");
        }
    }
}

#[test]
fn event_idx_interrupts_only_when_the_driver_asked() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 8, BASE, 1 << VIRTIO_F_EVENT_IDX);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        // Ask for an interrupt when the 3rd completion is written (used position 2).
        d.set_used_event(2);
        for _ in 0..4 {
            d.add(&[b"x"], &[]).unwrap();
        }
        let mut wants = Vec::new();
        for _ in 0..4 {
            let c = q.pop(mem).unwrap().unwrap();
            q.push_used(mem, &c, 0).unwrap();
            wants.push(q.needs_interrupt(mem).unwrap());
        }
        assert_eq!(wants, vec![false, false, true, false], "{format:?}");
    }
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 8, BASE, 0);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        d.set_interrupts(false);
        d.add(&[b"x"], &[]).unwrap();
        let c = q.pop(mem).unwrap().unwrap();
        q.push_used(mem, &c, 0).unwrap();
        assert!(!q.needs_interrupt(mem).unwrap(), "{format:?}: suppressed");
        d.set_interrupts(true);
        d.add(&[b"x"], &[]).unwrap();
        let c = q.pop(mem).unwrap().unwrap();
        q.push_used(mem, &c, 0).unwrap();
        assert!(q.needs_interrupt(mem).unwrap(), "{format:?}: enabled");
    }
}

#[test]
fn notification_suppression_reaches_the_driver() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for (format, feats) in combos() {
        let mut d = TestDriver::new(mem, format, 8, BASE, feats);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        q.disable_notification(mem).unwrap();
        d.add(&[b"a"], &[]).unwrap();
        assert!(!d.kick_needed(), "{format:?} {feats:#x}: disabled");
        // Enabling reports the chain already waiting.
        assert!(q.enable_notification(mem).unwrap());
        while let Some(c) = q.pop(mem).unwrap() {
            q.push_used(mem, &c, 0).unwrap();
        }
        assert!(!q.enable_notification(mem).unwrap());
        d.add(&[b"b"], &[]).unwrap();
        assert!(d.kick_needed(), "{format:?} {feats:#x}: enabled");
    }
}

fn err(format: QueueFormat, feats: u64, setup: impl FnOnce(&mut TestDriver)) -> QueueError {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    let mut d = TestDriver::new(mem, format, 8, BASE, feats);
    let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
    setup(&mut d);
    q.pop(mem).expect_err("the chain must be rejected")
}

#[test]
fn hostile_split_chains_are_errors_not_hangs() {
    use QueueFormat::Split;
    let buf = BASE + 0x8_0000;
    let e = err(Split, 0, |d| {
        d.split_raw(
            &[(0, buf, 8, DESC_F_NEXT, 1), (1, buf, 8, DESC_F_NEXT, 0)],
            0,
        )
    });
    assert_eq!(e, QueueError::TooLong { head: 0 });
    let e = err(Split, 0, |d| d.split_raw(&[(0, buf, 8, DESC_F_NEXT, 9)], 0));
    assert_eq!(e, QueueError::BadIndex { head: 0 });
    let e = err(Split, 0, |d| d.split_raw(&[], 12));
    assert_eq!(e, QueueError::BadIndex { head: 12 });
    let e = err(Split, 0, |d| d.split_raw(&[(0, 0xd000_0000, 8, 0, 0)], 0));
    assert!(matches!(e, QueueError::OutsideRam { .. }), "{e}");
    let e = err(Split, 0, |d| {
        d.split_raw(&[(0, (16 << 20) - 4, 8, 0, 0)], 0)
    });
    assert!(
        matches!(e, QueueError::OutsideRam { .. }),
        "straddles the end: {e}"
    );
    let e = err(Split, 0, |d| {
        d.split_raw(
            &[
                (0, buf, 8, DESC_F_WRITE | DESC_F_NEXT, 1),
                (1, buf, 8, 0, 0),
            ],
            0,
        )
    });
    assert_eq!(e, QueueError::ReadableAfterWritable { head: 0 });
    let e = err(Split, 0, |d| d.set_avail_idx(9));
    assert_eq!(e, QueueError::BadAvailIndex(9));
    // Indirect descriptors: not negotiated, nested, malformed, too long.
    let e = err(Split, 0, |d| {
        let t = d.indirect_table(&[(buf, 8, 0, 0)]);
        d.split_raw(&[(0, t, 16, DESC_F_INDIRECT, 0)], 0)
    });
    assert_eq!(e, QueueError::BadIndirect { head: 0 });
    let ind = 1 << VIRTIO_F_INDIRECT_DESC;
    let e = err(Split, ind, |d| {
        let inner = d.indirect_table(&[(buf, 8, 0, 0)]);
        let t = d.indirect_table(&[(inner, 16, DESC_F_INDIRECT, 0)]);
        d.split_raw(&[(0, t, 16, DESC_F_INDIRECT, 0)], 0)
    });
    assert_eq!(e, QueueError::BadIndirect { head: 0 });
    let e = err(Split, ind, |d| {
        let t = d.indirect_table(&[(buf, 8, 0, 0)]);
        d.split_raw(&[(0, t, 15, DESC_F_INDIRECT, 0)], 0)
    });
    assert_eq!(e, QueueError::BadIndirect { head: 0 });
    let e = err(Split, ind, |d| {
        let entries: Vec<_> = (0..9u16).map(|i| (buf, 8, DESC_F_NEXT, i + 1)).collect();
        let t = d.indirect_table(&entries);
        d.split_raw(&[(0, t, 16 * 9, DESC_F_INDIRECT, 0)], 0)
    });
    assert!(
        matches!(e, QueueError::TooLong { .. } | QueueError::BadIndex { .. }),
        "{e}"
    );
    let e = err(Split, ind, |d| {
        let t = d.indirect_table(&[(buf, 8, DESC_F_NEXT, 0)]);
        d.split_raw(&[(0, t, 16, DESC_F_INDIRECT, 0)], 0)
    });
    assert_eq!(e, QueueError::TooLong { head: 0 }, "cycle inside a table");
}

#[test]
fn hostile_packed_chains_are_errors_not_hangs() {
    use QueueFormat::Packed;
    let buf = BASE + 0x8_0000;
    // Every slot chained to the next: the walk would wrap onto itself.
    let e = err(Packed, 0, |d| {
        let descs: Vec<_> = (0..8).map(|_| (buf, 8, 0, DESC_F_NEXT)).collect();
        d.packed_raw(&descs)
    });
    assert_eq!(e, QueueError::TooLong { head: 0 });
    let e = err(Packed, 0, |d| d.packed_raw(&[(0xd000_0000, 8, 0, 0)]));
    assert!(matches!(e, QueueError::OutsideRam { .. }), "{e}");
    let e = err(Packed, 0, |d| {
        d.packed_raw(&[(buf, 8, 0, DESC_F_WRITE | DESC_F_NEXT), (buf, 8, 0, 0)])
    });
    assert_eq!(e, QueueError::ReadableAfterWritable { head: 0 });
    let e = err(Packed, 0, |d| {
        d.packed_raw(&[(buf, 16, 0, DESC_F_INDIRECT)])
    });
    assert_eq!(e, QueueError::BadIndirect { head: 0 }, "not negotiated");
    let e = err(Packed, 1 << VIRTIO_F_INDIRECT_DESC, |d| {
        let t = d.alloc(16);
        let mut entry = [0u8; 16];
        entry[0..8].copy_from_slice(&buf.to_le_bytes());
        entry[8..12].copy_from_slice(&16u32.to_le_bytes());
        entry[14..16].copy_from_slice(&DESC_F_INDIRECT.to_le_bytes());
        d.write_mem(t, &entry);
        d.packed_raw(&[(t, 16, 0, DESC_F_INDIRECT)])
    });
    assert_eq!(e, QueueError::BadIndirect { head: 0 }, "nested");
}

#[test]
fn length_overflow_is_an_error() {
    // 5 GiB of sparse RAM so that two 2 GiB buffers are both inside it.
    let ram = ram(5 << 30);
    let mem = ram.memory();
    let mut d = TestDriver::new(mem, QueueFormat::Split, 8, BASE, 0);
    let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
    let big = 0x8000_0000u32;
    d.split_raw(
        &[
            (0, 0x1000_0000, big, DESC_F_NEXT, 1),
            (1, 0x1000_0000, big, 0, 0),
        ],
        0,
    );
    assert_eq!(
        q.pop(mem).unwrap_err(),
        QueueError::LengthOverflow { head: 0 }
    );
}

#[test]
fn bad_queue_configs_are_rejected() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    let cfg = |size| QueueConfig {
        size,
        desc: BASE,
        driver: BASE + 0x1000,
        device: BASE + 0x2000,
    };
    let packed = 1 << VIRTIO_F_RING_PACKED;
    for (size, feats) in [(0, 0), (6, 0), (512, 0), (0, packed), (512, packed)] {
        let e = new_queue(256, cfg(size), feats, mem).err().unwrap();
        assert!(
            matches!(e, QueueError::BadSize { .. }),
            "{size} {feats:#x}: {e}"
        );
    }
    assert!(
        new_queue(256, cfg(6), packed, mem).is_ok(),
        "packed sizes need not be 2^n"
    );
    let mut c = cfg(8);
    c.desc = BASE + 8;
    assert!(matches!(
        new_queue(256, c, 0, mem),
        Err(QueueError::BadRing { .. })
    ));
    let mut c = cfg(8);
    c.device = 0xd000_0000;
    assert!(matches!(
        new_queue(256, c, packed, mem),
        Err(QueueError::BadRing { .. })
    ));
    let mut c = cfg(8);
    c.driver = u64::MAX - 2;
    assert!(matches!(
        new_queue(256, c, 0, mem),
        Err(QueueError::BadRing { .. })
    ));
}

#[test]
fn returning_a_chain_that_is_not_in_flight_is_an_error() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 8, BASE, 0);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        d.add(&[b"x"], &[]).unwrap();
        let c = q.pop(mem).unwrap().unwrap();
        q.push_used(mem, &c, 0).unwrap();
        assert!(matches!(
            q.push_used(mem, &c, 0),
            Err(QueueError::NotInFlight(_))
        ));
    }
}

#[test]
fn chains_popped_from_a_guest_memory_atomic_snapshot_outlive_a_memory_swap() {
    use vm_memory::{
        GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
        GuestMemoryRegion,
    };
    let mmap = |size| GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mmap(16 << 20));
    let snapshot = atomic.memory();
    let mut d = TestDriver::new(&*snapshot, QueueFormat::Split, 8, BASE, 0);
    let mut q = new_queue(8, d.config(), d.features(), &*snapshot).unwrap();
    let id = d.add(&[b"req"], &[8]).unwrap();
    let c = q.pop(&*snapshot).unwrap().unwrap();
    // The VMM swaps in a new memory map (hotplug) while the chain is in flight.
    atomic.lock().unwrap().replace(mmap(32 << 20));
    assert_ne!(
        atomic.memory().iter().next().map(|r| r.len()),
        snapshot.iter().next().map(|r| r.len())
    );
    // The snapshot keeps the old mapping alive: the chain's host pointer is still valid.
    let iov = c.writable[0];
    // SAFETY: `snapshot` holds the mapping `iov` points into, and `iov.len` is 8.
    unsafe { std::ptr::copy_nonoverlapping(b"reply!!!".as_ptr(), iov.host_ptr(), 8) };
    q.push_used(&*snapshot, &c, 8).unwrap();
    assert_eq!(d.used(), Some((id, 8)));
    assert_eq!(d.written(id), b"reply!!!");
}

#[test]
fn used_bytes_written_through_host_pointers_are_marked_dirty() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let page = |gpa: u64| {
        let (region, offset) = mem.to_region_addr(GuestAddress(gpa)).unwrap();
        region.bitmap().dirty_at(offset.0 as usize)
    };
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(&mem, format, 8, BASE, 0);
        let mut q = new_queue(8, d.config(), d.features(), &mem).unwrap();
        let id = d.add(&[], &[4096, 4096]).unwrap();
        let c = q.pop(&mem).unwrap().unwrap();
        let (first, second) = (c.writable[0].gpa(), c.writable[1].gpa());
        mem.iter().for_each(|r| r.bitmap().reset());
        assert!(!page(first) && !page(second));
        // The device fills the first buffer through its host pointer (as readv would).
        // SAFETY: `mem` is alive and the buffer is 4096 bytes.
        unsafe { std::ptr::write_bytes(c.writable[0].host_ptr(), 0xab, 4096) };
        q.push_used(&mem, &c, 4096).unwrap();
        assert!(page(first), "{format:?}: written buffer is dirty");
        assert!(!page(second), "{format:?}: unwritten buffer stays clean");
        let used_ring = match format {
            QueueFormat::Split => d.config().device,
            QueueFormat::Packed => d.config().desc,
        };
        assert!(page(used_ring), "{format:?}: the used ring is dirty");
        assert_eq!(d.used(), Some((id, 4096)));
    }
}

#[test]
fn a_ring_continues_from_its_base_in_a_new_queue() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 4, BASE, 1 << VIRTIO_F_EVENT_IDX);
        let mut q = new_queue(4, d.config(), d.features(), mem).unwrap();
        let fresh = q.ring_base();
        // Six chains through a ring of four: the position wraps once.
        for i in 0..6u8 {
            let id = d.add(&[&[i]], &[1]).unwrap();
            let c = q.pop(mem).unwrap().unwrap();
            q.push_used(mem, &c, 0).unwrap();
            assert_eq!(d.used(), Some((id, 0)));
        }
        let base = q.ring_base();
        assert_ne!(base, fresh, "{format:?}");
        // A new queue (a backend that reconnected) continues where the old one stopped.
        let mut q2 = new_queue(4, d.config(), d.features(), mem).unwrap();
        q2.set_ring_base(mem, base).unwrap();
        assert_eq!(q2.ring_base(), base, "{format:?}");
        let id = d.add(&[b"next"], &[4]).unwrap();
        let c = q2
            .pop(mem)
            .unwrap()
            .expect("the next chain, not an old one");
        assert_eq!(c.id(), id);
        let mut b = [0u8; 4];
        c.read_at(mem, 0, &mut b).unwrap();
        assert_eq!(&b, b"next");
        q2.push_used(mem, &c, 4).unwrap();
        assert_eq!(d.used(), Some((id, 4)), "{format:?}");
        // Base 0 on a fresh ring is the start of the ring for both formats.
        let d3 = TestDriver::new(mem, format, 4, BASE + 0x20_0000, 0);
        let mut q3 = new_queue(4, d3.config(), d3.features(), mem).unwrap();
        q3.set_ring_base(mem, 0).unwrap();
        assert_eq!(q3.ring_base(), fresh, "{format:?}");
    }
}

#[test]
fn each_chain_in_flight_is_tracked_by_its_id() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 8, BASE, 0);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        d.add(&[b"a"], &[]).unwrap();
        d.add(&[b"b"], &[]).unwrap();
        let a = q.pop(mem).unwrap().unwrap();
        let _b = q.pop(mem).unwrap().unwrap();
        q.push_used(mem, &a, 0).unwrap();
        // Two chains were in flight, one came back: returning it again is an error, not a
        // silent second used entry.
        assert_eq!(
            q.push_used(mem, &a, 0),
            Err(QueueError::NotInFlight(a.id())),
            "{format:?}"
        );
    }
}

#[test]
fn a_driver_reusing_an_id_still_in_flight_is_an_error() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    let buf = 0x40_0000;
    // Split: the same head index made available twice.
    let mut d = TestDriver::new(mem, QueueFormat::Split, 8, BASE, 0);
    let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
    d.split_raw(&[(0, buf, 16, 0, 0)], 0);
    d.split_raw(&[(0, buf, 16, 0, 0)], 0);
    assert!(q.pop(mem).unwrap().is_some());
    assert_eq!(q.pop(mem), Err(QueueError::AlreadyInFlight(0)));
    // Packed: two available descriptors carrying the same buffer ID.
    let mut d = TestDriver::new(mem, QueueFormat::Packed, 8, BASE + 0x10_0000, 0);
    let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
    d.packed_raw(&[(buf, 16, 5, 0)]);
    d.packed_raw(&[(buf, 16, 5, 0)]);
    assert!(q.pop(mem).unwrap().is_some());
    assert_eq!(q.pop(mem), Err(QueueError::AlreadyInFlight(5)));
}

#[test]
fn a_recycled_chain_lends_its_buffer_lists_to_the_next_and_nothing_leaks_between_them() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for (format, feats) in combos() {
        let mut d = TestDriver::new(mem, format, 8, BASE, feats);
        let mut q = new_queue(8, d.config(), d.features(), mem).unwrap();
        let a = d.add(&[b"one", b"two", b"three"], &[8, 8]).unwrap();
        let c = q.pop(mem).unwrap().unwrap();
        let lists = (c.readable.as_ptr(), c.writable.as_ptr());
        q.push_used(mem, &c, 0).unwrap();
        q.recycle(c);
        assert_eq!(d.used(), Some((a, 0)));
        let b = d.add(&[b"four"], &[16]).unwrap();
        let c = q.pop(mem).unwrap().unwrap();
        assert_eq!(c.id(), b, "{format:?} {feats:#x}");
        assert_eq!((c.readable.as_ptr(), c.writable.as_ptr()), lists, "reused");
        assert_eq!(
            (c.readable.len(), c.writable.len()),
            (1, 1),
            "only the new buffers"
        );
        assert_eq!((c.readable_len(), c.writable_len()), (4, 16));
    }
}

#[test]
fn a_new_queue_at_the_base_before_held_chains_pops_them_again() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 4, BASE, 0);
        let mut q = new_queue(4, d.config(), d.features(), mem).unwrap();
        // Five receive buffers through a ring of four (so the held ones straddle the wrap):
        // the first two are filled and returned, the last three are held by the device.
        let mut ids = Vec::new();
        for i in 0..2u8 {
            ids.push(d.add(&[], &[8 + u32::from(i)]).unwrap());
            let c = q.pop(mem).unwrap().unwrap();
            q.push_used(mem, &c, 1).unwrap();
            assert!(d.used().is_some());
        }
        let mut held = Vec::new();
        for i in 0..3u32 {
            ids.push(d.add(&[], &[16 + i]).unwrap());
            held.push(q.pop(mem).unwrap().unwrap());
        }
        let tokens: Vec<_> = held.iter().map(|c| c.token()).collect();
        let before = q.ring_base_before(&tokens);
        assert_ne!(before, q.ring_base(), "{format:?}");
        assert_eq!(q.ring_base_before(&[]), q.ring_base());
        // A new device continues there: it pops the three held chains again, in order.
        let mut q2 = new_queue(4, d.config(), d.features(), mem).unwrap();
        q2.set_ring_base(mem, before).unwrap();
        for (i, h) in held.iter().enumerate() {
            let c = q2.pop(mem).unwrap().expect("a held chain again");
            assert_eq!(c.id(), h.id(), "{format:?} chain {i}");
            assert_eq!(c.writable_len(), u64::from(16 + i as u32));
            q2.push_used(mem, &c, 2).unwrap();
            assert_eq!(d.used(), Some((h.id(), 2)), "{format:?}");
        }
        assert!(q2.pop(mem).unwrap().is_none());
    }
}

#[test]
fn an_unpopped_chain_is_popped_again_and_a_stranger_is_refused() {
    let ram = ram(16 << 20);
    let mem = ram.memory();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(mem, format, 4, BASE, 0);
        let mut q = new_queue(4, d.config(), d.features(), mem).unwrap();
        // Around the ring twice, unpopping every chain once before taking it.
        for i in 0..8u8 {
            let id = d.add(&[&[i], &[i, i]], &[4]).unwrap();
            let c = q.pop(mem).unwrap().unwrap();
            assert_eq!(c.id(), id);
            q.unpop(c).unwrap();
            let again = q.pop(mem).unwrap().expect("the same chain again");
            assert_eq!((again.id(), again.readable_len()), (id, 3), "{format:?}");
            q.push_used(mem, &again, 0).unwrap();
            assert_eq!(d.used(), Some((id, 0)));
            // Returned: no longer in flight, so it cannot be put back.
            assert!(matches!(q.unpop(again), Err(QueueError::NotInFlight(_))));
        }
        assert!(q.pop(mem).unwrap().is_none());
    }
}

#[test]
fn a_buffer_across_two_memory_regions_becomes_two_iovecs_and_reads_whole() {
    // Two adjacent mappings: guest-contiguous, host-separate.
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
        (vm_memory::GuestAddress(0), 0x10_0000),
        (vm_memory::GuestAddress(0x10_0000), 0x10_0000),
    ])
    .unwrap();
    let mut d = TestDriver::new(&mem, QueueFormat::Split, 8, 0x1000, 0);
    let mut q = new_queue(8, d.config(), d.features(), &mem).unwrap();
    let boundary = 0x10_0000u64;
    let (rd, wr) = (boundary - 8, boundary - 0x800);
    let msg: Vec<u8> = (0..32u8).collect();
    d.write_mem(rd, &msg);
    // (index, addr, len, flags, next): 32 readable bytes across the boundary, then 4 KiB
    // writable across it.
    d.split_raw(
        &[
            (0, rd, 32, crate::DESC_F_NEXT, 1),
            (1, wr, 0x1000, crate::DESC_F_WRITE, 0),
        ],
        0,
    );
    let c = q.pop(&mem).unwrap().expect("a chain");
    assert_eq!(c.readable.len(), 2, "split at the region boundary");
    assert_eq!(c.writable.len(), 2);
    assert_eq!((c.readable_len(), c.writable_len()), (32, 0x1000));
    let mut buf = [0u8; 32];
    assert_eq!(c.read_at(&mem, 0, &mut buf).unwrap(), 32);
    assert_eq!(&buf[..], &msg[..]);
    let reply = [0x5au8; 0x10];
    assert_eq!(c.write_at(&mem, 0x7f8, &reply).unwrap(), 0x10);
    assert_eq!(d.read_mem(boundary - 8, 0x10), reply.to_vec());
}
