//! Serves a virtio-blk device over io_uring with no VMM and no KVM: `alioth-io-uring` runs the
//! device's worker, `alioth-queue`'s test driver plays the guest in plain memory, an eventfd
//! stands in for the queue's ioeventfd and another for its MSI-X irqfd.
//!
//! ```sh
//! cargo run -p alioth-io-uring --example blk_over_io_uring
//! ```

use std::os::fd::AsRawFd;
use std::sync::Arc;

use alioth_devices::virtio::blk::{BlkConfig, VirtioBlk};
use alioth_io_uring::{IoUringBackend, io_uring_available};
use alioth_queue::testing::TestDriver;
use alioth_queue::{QueueFormat, VIRTIO_F_VERSION_1};
use alioth_virtio::{EventFdIrq, QueueSetup, Virtio, WakeEvent, Worker};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Waits up to 5 s for the device's interrupt.
fn wait(irq: &EventFd) -> Result<(), String> {
    let mut p = libc::pollfd {
        fd: irq.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut p, 1, 5000) } {
        1 => irq.read().map(drop).map_err(|e| e.to_string()),
        _ => Err("no interrupt within 5 s".into()),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !io_uring_available() {
        return Err("io_uring is not available here".into());
    }
    let dir = std::env::temp_dir().join(format!("alioth-io-uring-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20])?;

    let blk = VirtioBlk::open(
        "virtio-blk0",
        &BlkConfig {
            path: image.clone(),
            read_only: false,
            num_queues: 1,
            queue_size: 64,
            direct: false,
            lock: true,
            rate_limit: Default::default(),
        },
    )?;
    let features = blk.device_features();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
    let worker = Worker::spawn(blk, IoUringBackend::new(64), mem.clone())?;

    // The "guest": one split queue laid out in `mem`, a kick eventfd and an interrupt eventfd.
    let mut driver = TestDriver::new(&mem, QueueFormat::Split, 64, 0x10_0000, 0);
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let irq = Arc::new(EventFdIrq::new(1)?);
    worker.wake(WakeEvent::Start {
        features: features & (1 << VIRTIO_F_VERSION_1),
        queues: vec![Some(QueueSetup {
            config: driver.config(),
            ioeventfd: kick.clone(),
            base: 0,
        })],
        irq: irq.clone(),
    });

    // Write sector 8, then read it back.
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    let id = driver
        .add(&[&header(VIRTIO_BLK_T_OUT, 8), &data], &[1])
        .ok_or("ring full")?;
    kick.write(1)?;
    wait(&irq.queues[0])?;
    let (done, _) = driver.used().ok_or("no used entry")?;
    assert_eq!(
        (done, driver.written(id)),
        (id, vec![0]),
        "write: status OK"
    );

    let id = driver
        .add(&[&header(VIRTIO_BLK_T_IN, 8)], &[512, 1])
        .ok_or("ring full")?;
    kick.write(1)?;
    wait(&irq.queues[0])?;
    let (done, len) = driver.used().ok_or("no used entry")?;
    let back = driver.written(id);
    assert_eq!((done, len), (id, 513));
    assert_eq!(
        (&back[..512], back[512]),
        (&data[..], 0),
        "read back, status OK"
    );

    worker.shutdown();
    let on_disk = std::fs::read(&image)?;
    assert_eq!(
        &on_disk[8 * 512..9 * 512],
        &data[..],
        "the image holds the write"
    );
    std::fs::remove_dir_all(&dir)?;
    println!("virtio-blk over io_uring: wrote and read back sector 8 ({len} bytes used)");
    Ok(())
}
