//! Split and packed chain walks over guest memory a hostile driver wrote: every pop must end in
//! a chain or an error, never a panic, a hang or an access outside guest RAM.
#![no_main]

use alioth_queue::{QueueConfig, VirtQueue, new_queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 64 KiB at 0 (the rings and what they point at live here).
const RAM: usize = 64 << 10;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, body) = data.split_at(8);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    let _ = mem.write_slice(&body[..body.len().min(RAM)], GuestAddress(0));
    // Ring format, features and size from the first bytes; the areas at fixed places.
    let packed = head[0] & 1 != 0;
    let mut features = 1u64 << 32;
    if packed {
        features |= 1 << 34;
    }
    if head[0] & 2 != 0 {
        features |= 1 << 28; // INDIRECT_DESC
    }
    if head[0] & 4 != 0 {
        features |= 1 << 29; // EVENT_IDX
    }
    let size = u16::from_le_bytes([head[1], head[2]]) % 513;
    let config = QueueConfig {
        size,
        desc: u64::from(head[3]) * 64,
        driver: 0x4000 + u64::from(head[4]) * 64,
        device: 0x8000 + u64::from(head[5]) * 64,
    };
    let Ok(mut q) = new_queue(256, config, features, &mem) else {
        return;
    };
    for _ in 0..64 {
        match q.pop(&mem) {
            Ok(Some(chain)) => {
                let n = (chain.writable_len() as u32).min(u32::from(head[6]));
                if q.push_used(&mem, &chain, n).is_err() {
                    break;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = q.needs_interrupt(&mem);
    let _ = q.enable_notification(&mem);
});
