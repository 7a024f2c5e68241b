use std::sync::mpsc::channel;
use std::time::Duration;

use alioth_queue::testing::TestDriver;
use alioth_queue::{DescChain, QueueFormat, VIRTIO_F_VERSION_1};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::{BufferAction, DeviceId, EpollBackend, EventFdIrq, Virtio};

/// Test devices: `Bomb` panics on its first chain, `Filler` fills every chain itself (no I/O).
enum TestDev {
    Bomb,
    Filler,
}
use TestDev::{Bomb, Filler};

impl Virtio for TestDev {
    fn name(&self) -> &str {
        match self {
            Bomb => "bomb0",
            Filler => "filler0",
        }
    }
    fn device_id(&self) -> DeviceId {
        DeviceId::Entropy
    }
    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![8]
    }
    fn config(&self) -> &[u8] {
        &[]
    }
}

impl ChainHandler for TestDev {
    fn handle(&mut self, _q: u16, chain: &DescChain, _m: &GuestMemoryMmap) -> BufferAction {
        match self {
            Bomb => panic!("boom on chain {}", chain.id()),
            Filler => BufferAction::Written(8),
        }
    }
    fn complete(
        &mut self,
        _q: u16,
        _c: &DescChain,
        _m: &GuestMemoryMmap,
        _r: std::io::Result<usize>,
    ) -> u32 {
        0
    }
}

#[test]
fn a_device_that_panics_needs_reset_and_its_failure_handler_hears_why() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let worker = Worker::spawn(Bomb, EpollBackend::default(), mem.clone()).unwrap();
    let (tx, rx) = channel();
    worker.on_failure(move |dev, msg| {
        let _ = tx.send((dev.to_string(), msg.to_string()));
    });
    let mut d = TestDriver::new(&mem, QueueFormat::Split, 8, 0x10_0000, 0);
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    worker.wake(WakeEvent::Start {
        features: 1 << VIRTIO_F_VERSION_1,
        queues: vec![Some(QueueSetup {
            config: d.config(),
            ioeventfd: kick.clone(),
            base: 0,
        })],
        irq: Arc::new(EventFdIrq::new(1).unwrap()),
    });
    d.add(&[], &[8]).unwrap();
    kick.write(1).unwrap();
    let (dev, msg) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the failure handler was not called");
    assert_eq!(dev, "bomb0");
    assert!(msg.contains("boom on chain 0"), "{msg}");
    assert_eq!(worker.state(), WorkerState::NeedsReset);
    assert!(worker.needs_reset(), "the transport reports NEEDS_RESET");
    // Stopping a worker whose thread is gone neither hangs nor panics.
    assert!(worker.reset().is_empty());
    worker.shutdown();
}

/// A polling backend looks at the ring right after serving it, so notifications must stay
/// suppressed: a driver that posts its next request at once would otherwise kick for it (it
/// did for 20-40 % of the requests at QD1). A backend that sleeps next must enable them.
#[test]
fn serving_a_queue_leaves_notifications_suppressed_only_for_a_polling_backend() {
    use alioth_queue::{VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, new_queue};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        for event_idx in [false, true] {
            for polling in [false, true] {
                let what = format!("{format:?} event_idx={event_idx} polling={polling}");
                let mut features = 1 << VIRTIO_F_VERSION_1;
                if event_idx {
                    features |= 1 << VIRTIO_F_EVENT_IDX;
                }
                let mut d = TestDriver::new(&mem, format, 8, 0x10_0000, features);
                if format == QueueFormat::Packed {
                    features |= 1 << VIRTIO_F_RING_PACKED;
                }
                let queue = new_queue(8, d.config(), features, &mem).unwrap();
                let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
                let mut aq = ActiveQueue::new(0, queue, kick);
                let id = d.add(&[], &[8]).unwrap();
                let served = process_queue(&mut Filler, &mut aq, &mem, polling, &mut |_| {
                    unreachable!("the filler does no I/O")
                })
                .unwrap();
                assert!(served, "{what}");
                assert_eq!(d.used(), Some((id, 8)), "{what}");
                d.add(&[], &[8]).unwrap();
                assert_eq!(d.kick_needed(), !polling, "{what}");
            }
        }
    }
}
