//! virtio-blk requests from a hostile driver (headers, segments, buffer layouts) on a small
//! image: every chain is answered or breaks the queue with an error, never a panic; nothing is
//! read or written outside the image.
#![no_main]

use std::sync::{Arc, OnceLock};

use alioth_devices::virtio::blk::{BlkConfig, VirtioBlk};
use alioth_queue::{QueueConfig, new_queue};
use alioth_virtio::{ActiveQueue, execute_sync, process_queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const RAM: usize = 64 << 10;

fn image() -> &'static std::path::Path {
    static IMG: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("alioth-fuzz-blk-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).expect("image");
        f.set_len(64 << 10).expect("image size");
        p
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, body) = data.split_at(4);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    let _ = mem.write_slice(&body[..body.len().min(RAM)], GuestAddress(0));
    let cfg = BlkConfig {
        path: image().to_path_buf(),
        read_only: head[0] & 1 != 0,
        num_queues: 1,
        queue_size: 64,
        direct: false,
        lock: false,
        rate_limit: Default::default(),
    };
    let Ok(mut dev) = VirtioBlk::open("virtio-blk0", &cfg) else {
        return;
    };
    let mut features = 1u64 << 32;
    if head[0] & 2 != 0 {
        features |= 1 << 34;
    }
    if head[0] & 4 != 0 {
        features |= 1 << 28;
    }
    let config = QueueConfig {
        size: 1 << (head[1] % 7),
        desc: 0,
        driver: 0x2000,
        device: 0x3000,
    };
    let Ok(queue) = new_queue(64, config, features, &mem) else {
        return;
    };
    let Ok(kick) = EventFd::new(0) else { return };
    let mut aq = ActiveQueue::new(0, queue, Arc::new(kick));
    // Served as by a backend that sleeps next (notifications re-enabled at the end).
    let _ = process_queue(&mut dev, &mut aq, &mem, false, &mut execute_sync);
});
