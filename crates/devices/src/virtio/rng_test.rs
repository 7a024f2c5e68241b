use std::sync::Arc;

use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::testing::TestDriver;
use alioth_queue::{DESC_F_NEXT, QueueFormat, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
use alioth_test_util::wait_eventfd;
use alioth_virtio::{EpollBackend, EventFdIrq, QueueSetup, WakeEvent, Worker};
use vmm_sys_util::eventfd::EventFd;

use super::*;

struct Rig {
    worker: Worker,
    irq: Arc<EventFdIrq>,
    kick: Arc<EventFd>,
}

fn start_with(ram: &RamBus, features: u64, config: alioth_queue::QueueConfig) -> Rig {
    let worker = Worker::spawn(
        VirtioRng::new("virtio-rng0"),
        EpollBackend::default(),
        ram.memory().clone(),
    )
    .unwrap();
    let irq = Arc::new(EventFdIrq::new(1).unwrap());
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    worker.wake(WakeEvent::Start {
        features: features | (1 << VIRTIO_F_VERSION_1),
        queues: vec![Some(QueueSetup {
            config,
            ioeventfd: kick.clone(),
            base: 0,
        })],
        irq: irq.clone(),
    });
    Rig { worker, irq, kick }
}

/// Starts `worker` on `d`'s one queue with the driver's features.
fn start_queue(worker: &Worker, d: &TestDriver, kick: &Arc<EventFd>, irq: &Arc<EventFdIrq>) {
    worker.wake(WakeEvent::Start {
        features: d.features() | (1 << VIRTIO_F_VERSION_1),
        queues: vec![Some(QueueSetup {
            config: d.config(),
            ioeventfd: kick.clone(),
            base: 0,
        })],
        irq: irq.clone(),
    });
}

fn start(ram: &RamBus, driver: &TestDriver) -> Rig {
    start_with(ram, driver.features(), driver.config())
}

#[test]
fn random_bytes_arrive_through_split_and_packed_rings() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        for feats in [0, 1 << VIRTIO_F_EVENT_IDX] {
            let mut d = TestDriver::new(ram.memory(), format, 16, 0x10_0000, feats);
            let rig = start(&ram, &d);
            let a = d.add(&[], &[64]).unwrap();
            let b = d.add(&[], &[32, 32]).unwrap();
            rig.kick.write(1).unwrap();
            let mut got = Vec::new();
            while got.len() < 2 {
                assert!(
                    wait_eventfd(&rig.irq.queues[0], 5000),
                    "{format:?}: no interrupt"
                );
                while let Some(u) = d.used() {
                    got.push(u);
                }
            }
            got.sort();
            let mut want = vec![(a, 64), (b, 64)];
            want.sort();
            assert_eq!(got, want);
            let (x, y) = (d.written(a), d.written(b));
            assert_ne!(x, vec![0u8; 64], "entropy, not zeros");
            assert_ne!(x, y, "two requests, two different answers");
            rig.worker.shutdown();
        }
    }
}

#[test]
fn hostile_chain_sets_needs_reset_and_reset_recovers() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(ram.memory(), format, 8, 0x10_0000, 0);
        let rig = start(&ram, &d);
        let buf = 0x20_0000;
        match format {
            QueueFormat::Split => d.split_raw(
                &[(0, buf, 8, DESC_F_NEXT, 1), (1, buf, 8, DESC_F_NEXT, 0)],
                0,
            ),
            QueueFormat::Packed => {
                let descs: Vec<_> = (0..8).map(|_| (buf, 8, 0, DESC_F_NEXT)).collect();
                d.packed_raw(&descs)
            }
        }
        rig.kick.write(1).unwrap();
        assert!(
            wait_eventfd(&rig.irq.config, 5000),
            "{format:?}: config interrupt"
        );
        assert!(rig.worker.needs_reset());
        assert!(d.used().is_none(), "nothing completed from a broken chain");
        rig.worker.reset();
        assert_eq!(
            rig.worker.state(),
            alioth_virtio::WorkerState::Idle,
            "reset clears NEEDS_RESET"
        );
        // A fresh start on fresh rings works again.
        let mut d = TestDriver::new(ram.memory(), format, 8, 0x30_0000, 0);
        let rig2 = Rig {
            worker: rig.worker,
            irq: rig.irq,
            kick: rig.kick,
        };
        rig2.worker.wake(WakeEvent::Start {
            features: d.features() | (1 << VIRTIO_F_VERSION_1),
            queues: vec![Some(QueueSetup {
                config: d.config(),
                ioeventfd: rig2.kick.clone(),
                base: 0,
            })],
            irq: rig2.irq.clone(),
        });
        let id = d.add(&[], &[16]).unwrap();
        rig2.kick.write(1).unwrap();
        assert!(wait_eventfd(&rig2.irq.queues[0], 5000));
        assert_eq!(d.used(), Some((id, 16)));
        assert_eq!(rig2.worker.state(), alioth_virtio::WorkerState::Running);
    }
}

#[test]
fn bad_queue_size_at_start_sets_needs_reset() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let d = TestDriver::new(ram.memory(), QueueFormat::Split, 8, 0x10_0000, 0);
    let mut config = d.config();
    config.size = 6; // not a power of two
    let rig = start_with(&ram, 0, config);
    assert!(wait_eventfd(&rig.irq.config, 5000));
    assert!(rig.worker.needs_reset());
}

#[test]
fn a_reset_reports_where_each_ring_stopped_and_a_restart_continues_there() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut d = TestDriver::new(ram.memory(), format, 4, 0x10_0000, 0);
        let rig = start(&ram, &d);
        // Five one-descriptor chains through a ring of four.
        for _ in 0..5 {
            let id = d.add(&[], &[8]).unwrap();
            rig.kick.write(1).unwrap();
            assert!(wait_eventfd(&rig.irq.queues[0], 5000), "{format:?}");
            assert_eq!(d.used(), Some((id, 8)));
        }
        let stopped = rig.worker.reset();
        let want = match format {
            QueueFormat::Split => 5,
            // Index 1 after one lap: both wrap counters 0.
            QueueFormat::Packed => 1 | (1 << 16),
        };
        assert_eq!(stopped, vec![(0, want)], "{format:?}");
        // A new start from that base serves the next chain, not the ring's first slot again.
        rig.worker.wake(WakeEvent::Start {
            features: d.features() | (1 << VIRTIO_F_VERSION_1),
            queues: vec![Some(QueueSetup {
                config: d.config(),
                ioeventfd: rig.kick.clone(),
                base: want,
            })],
            irq: rig.irq.clone(),
        });
        let id = d.add(&[], &[16]).unwrap();
        rig.kick.write(1).unwrap();
        assert!(wait_eventfd(&rig.irq.queues[0], 5000), "{format:?}");
        assert_eq!(d.used(), Some((id, 16)), "{format:?}");
        rig.worker.shutdown();
    }
}

#[test]
fn a_blocking_kick_eventfd_is_made_non_blocking_so_a_spare_notification_cannot_stall_the_worker() {
    use std::os::fd::AsRawFd;
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    for backend in ["epoll", "io_uring"] {
        let mut d = TestDriver::new(ram.memory(), QueueFormat::Split, 16, 0x10_0000, 0);
        let dev = VirtioRng::new("virtio-rng0");
        let mem = ram.memory().clone();
        let worker = match backend {
            "epoll" => Worker::spawn(dev, EpollBackend::default(), mem),
            _ => Worker::spawn(dev, alioth_io_uring::IoUringBackend::new(16), mem),
        }
        .unwrap();
        let irq = Arc::new(EventFdIrq::new(1).unwrap());
        // As a vhost-user frontend may pass it: without EFD_NONBLOCK.
        let kick = Arc::new(EventFd::new(0).unwrap());
        start_queue(&worker, &d, &kick, &irq);
        let id = d.add(&[], &[8]).unwrap();
        kick.write(1).unwrap();
        assert!(wait_eventfd(&irq.queues[0], 5000), "{backend}");
        assert_eq!(d.used(), Some((id, 8)));
        // SAFETY: F_GETFL on a descriptor the EventFd owns.
        let flags = unsafe { libc::fcntl(kick.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(
            flags & libc::O_NONBLOCK,
            0,
            "{backend}: the worker would block on a read"
        );
        // Spare notifications (more wake-ups than counts) leave the worker serving.
        kick.write(1).unwrap();
        kick.write(1).unwrap();
        let id = d.add(&[], &[8]).unwrap();
        kick.write(1).unwrap();
        assert!(wait_eventfd(&irq.queues[0], 5000), "{backend}: stalled");
        assert_eq!(d.used(), Some((id, 8)));
        worker.shutdown();
    }
}

#[test]
fn a_polling_worker_serves_chains_without_notifications_and_suppresses_them() {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        for (backend, poll_us) in [
            ("epoll", 0),
            ("epoll", 200_000),
            ("io_uring", 0),
            ("io_uring", 200_000),
        ] {
            let what = format!("{format:?} {backend} poll_us={poll_us}");
            let mut d = TestDriver::new(ram.memory(), format, 16, 0x10_0000, 0);
            let dev = VirtioRng::new("virtio-rng0");
            let mem = ram.memory().clone();
            let worker = match backend {
                "epoll" => Worker::spawn(dev, EpollBackend::polling(poll_us), mem),
                _ => Worker::spawn(
                    dev,
                    alioth_io_uring::IoUringBackend::new(16).with_poll(poll_us),
                    mem,
                ),
            }
            .unwrap();
            let irq = Arc::new(EventFdIrq::new(1).unwrap());
            let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            start_queue(&worker, &d, &kick, &irq);
            let id = d.add(&[], &[8]).unwrap();
            kick.write(1).unwrap();
            assert!(wait_eventfd(&irq.queues[0], 5000), "{what}");
            assert_eq!(d.used(), Some((id, 8)));
            // Right after the work, a polling worker watches the ring (for up to 200 ms here)
            // with notifications suppressed; without polling it sleeps until a notification.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let id = d.add(&[], &[8]).unwrap();
            if poll_us > 0 {
                assert!(!d.kick_needed(), "{what}: notifications not suppressed");
                assert!(wait_eventfd(&irq.queues[0], 5000), "{what}: not polled");
                assert_eq!(d.used(), Some((id, 8)));
            } else {
                assert!(d.kick_needed(), "{what}");
                assert!(!wait_eventfd(&irq.queues[0], 100), "{what}: served unasked");
                kick.write(1).unwrap();
                assert!(wait_eventfd(&irq.queues[0], 5000), "{what}");
                assert_eq!(d.used(), Some((id, 8)));
            }
            worker.shutdown();
        }
    }
}
