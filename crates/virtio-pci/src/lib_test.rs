use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use alioth_mem::{MemoryMap, RamBus};
use alioth_queue::testing::TestDriver;
use alioth_queue::{DescChain, QueueFormat, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
use vm_memory::GuestMemoryMmap;

use super::*;
use alioth_virtio::{BufferAction, ChainHandler, EpollBackend, Virtio, Worker};

const BAR: u64 = 0xc000_0000;

/// Echoes each chain's readable bytes into its writable buffers.
struct Echo;

impl Virtio for Echo {
    fn name(&self) -> &str {
        "echo0"
    }
    fn device_id(&self) -> DeviceId {
        DeviceId::Console
    }
    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 16]
    }
    fn config(&self) -> &[u8] {
        &[0xde, 0xad, 0xbe, 0xef]
    }
}

impl ChainHandler for Echo {
    fn handle(&mut self, _q: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        let mut buf = vec![0u8; chain.readable_len() as usize];
        let n = chain.read_at(mem, 0, &mut buf).unwrap();
        BufferAction::Written(chain.write_at(mem, 0, &buf[..n]).unwrap() as u32)
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

#[derive(Default)]
struct FakeVm {
    next_gsi: Mutex<u32>,
    routes: Mutex<Vec<(u32, u64, u32)>>,
    irqfds: Mutex<Vec<(i32, u32)>>,
    ioevents: Mutex<Vec<(i32, u64)>>,
}

impl MsiRouter for FakeVm {
    fn alloc_gsi(&self) -> std::io::Result<u32> {
        let mut g = self.next_gsi.lock().unwrap();
        *g += 1;
        Ok(23 + *g)
    }
    fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
        self.routes.lock().unwrap().push((gsi, addr, data));
        Ok(())
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.irqfds.lock().unwrap().push((fd.as_raw_fd(), gsi));
        Ok(())
    }
}

impl IoeventRegistry for FakeVm {
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.ioevents.lock().unwrap().push((fd.as_raw_fd(), addr));
        Ok(())
    }
    fn deregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.ioevents
            .lock()
            .unwrap()
            .retain(|e| *e != (fd.as_raw_fd(), addr));
        Ok(())
    }
}

struct Rig {
    pci: VirtioPci,
    mmio: Arc<Bus>,
    vm: Arc<FakeVm>,
    ram: RamBus,
}

fn rig() -> Rig {
    let ram = RamBus::new(MemoryMap::new(16 << 20).unwrap()).unwrap();
    let mmio = Arc::new(Bus::new("mmio"));
    let vm = Arc::new(FakeVm::default());
    let worker = Worker::spawn(Echo, EpollBackend::default(), ram.memory().clone()).unwrap();
    let pci = VirtioPci::new(
        DeviceInfo::of(&Echo),
        worker,
        BAR,
        mmio.clone(),
        vm.clone(),
        vm.clone(),
    )
    .unwrap();
    Rig { pci, mmio, vm, ram }
}

fn cfg_read(p: &VirtioPci, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    p.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_write(p: &VirtioPci, off: u16, v: u32, len: usize) {
    p.config_write(off, &v.to_le_bytes()[..len]);
}

fn bar_read(m: &Bus, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    assert!(m.read(BAR + off, &mut b[..len]), "BAR0 not mapped");
    u64::from_le_bytes(b)
}

fn bar_write(m: &Bus, off: u64, v: u64, len: usize) {
    assert!(
        m.write(BAR + off, &v.to_le_bytes()[..len]),
        "BAR0 not mapped"
    );
}

/// (capability id, virtio cfg_type, bar, offset, length) in list order.
fn walk_caps(p: &VirtioPci) -> Vec<(u8, u8, u8, u32, u32)> {
    assert_ne!(cfg_read(p, 0x06, 2) & (1 << 4), 0, "capability list bit");
    let mut at = cfg_read(p, 0x34, 1) as u16;
    let mut caps = Vec::new();
    while at != 0 {
        assert!(caps.len() < 48, "capability list loops");
        let id = cfg_read(p, at, 1) as u8;
        let next = cfg_read(p, at + 1, 1) as u16;
        if id == 0x09 {
            caps.push((
                id,
                cfg_read(p, at + 3, 1) as u8,
                cfg_read(p, at + 4, 1) as u8,
                cfg_read(p, at + 8, 4),
                cfg_read(p, at + 12, 4),
            ));
        } else {
            caps.push((id, 0, 0, 0, 0));
        }
        at = next;
    }
    caps
}

fn enable_memory(p: &VirtioPci) {
    cfg_write(p, 0x04, 0x6, 2);
}

#[test]
fn capabilities_walk_like_a_driver_sees_them() {
    let r = rig();
    assert_eq!(cfg_read(&r.pci, 0x00, 2), 0x1af4);
    assert_eq!(cfg_read(&r.pci, 0x02, 2), 0x1040 + 3);
    let caps = walk_caps(&r.pci);
    let types: Vec<u8> = caps.iter().filter(|c| c.0 == 0x09).map(|c| c.1).collect();
    assert_eq!(types, vec![1, 3, 4, 2], "common, ISR, device, notify");
    assert!(caps.iter().any(|c| c.0 == 0x11), "MSI-X");
    for c in caps.iter().filter(|c| c.0 == 0x09) {
        assert_eq!(c.2, 0, "all in BAR0");
        assert!(u64::from(c.3) + u64::from(c.4) <= BAR_SIZE);
    }
    // The notify capability carries the multiplier.
    let mut at = cfg_read(&r.pci, 0x34, 1) as u16;
    loop {
        if cfg_read(&r.pci, at, 1) == 0x09 && cfg_read(&r.pci, at + 3, 1) == 2 {
            assert_eq!(cfg_read(&r.pci, at + 16, 4), NOTIFY_MULTIPLIER);
            break;
        }
        at = cfg_read(&r.pci, at + 1, 1) as u16;
    }
}

#[test]
fn bar_sizing_mapping_and_ioeventfds_follow_the_guest() {
    let r = rig();
    assert!(
        !r.mmio.read(BAR, &mut [0u8; 4]),
        "unmapped until memory decode is on"
    );
    cfg_write(&r.pci, 0x10, 0xffff_ffff, 4);
    cfg_write(&r.pci, 0x14, 0xffff_ffff, 4);
    let lo = cfg_read(&r.pci, 0x10, 4);
    let hi = cfg_read(&r.pci, 0x14, 4);
    assert_eq!(lo & 0x6, 0x4, "64-bit memory BAR");
    let size = !((u64::from(hi) << 32) | u64::from(lo & !0xf)) + 1;
    assert_eq!(size, BAR_SIZE);
    cfg_write(&r.pci, 0x10, BAR as u32, 4);
    cfg_write(&r.pci, 0x14, 0, 4);
    enable_memory(&r.pci);
    assert_eq!(bar_read(&r.mmio, 0x12, 2), 2, "num_queues through BAR0");
    assert_eq!(bar_read(&r.mmio, DEVICE_OFFSET, 4), 0xefbe_adde);
    let io = r.vm.ioevents.lock().unwrap().clone();
    let addrs: Vec<u64> = io.iter().map(|e| e.1).collect();
    assert_eq!(addrs, vec![BAR + NOTIFY_OFFSET, BAR + NOTIFY_OFFSET + 4]);
    // Moving the BAR moves the mapping and the ioeventfds.
    let new = 0xc010_0000u64;
    cfg_write(&r.pci, 0x10, new as u32, 4);
    assert!(!r.mmio.read(BAR, &mut [0u8; 2]));
    assert!(r.mmio.read(new + 0x12, &mut [0u8; 2]));
    let addrs: Vec<u64> = r.vm.ioevents.lock().unwrap().iter().map(|e| e.1).collect();
    assert_eq!(addrs, vec![new + NOTIFY_OFFSET, new + NOTIFY_OFFSET + 4]);
    cfg_write(&r.pci, 0x04, 0, 2);
    assert!(
        r.vm.ioevents.lock().unwrap().is_empty(),
        "decode off unmaps"
    );
}

#[test]
fn msix_vectors_are_assigned_per_queue_and_routed() {
    let r = rig();
    enable_memory(&r.pci);
    bar_write(&r.mmio, 0x10, 2, 2); // config vector
    assert_eq!(bar_read(&r.mmio, 0x10, 2), 2);
    bar_write(&r.mmio, 0x16, 1, 2);
    bar_write(&r.mmio, 0x1a, 0, 2);
    assert_eq!(bar_read(&r.mmio, 0x1a, 2), 0);
    bar_write(&r.mmio, 0x1a, 7, 2);
    assert_eq!(
        bar_read(&r.mmio, 0x1a, 2),
        u64::from(NO_VECTOR),
        "out of range"
    );
    // Program table entry 1.
    let e = MSIX_TABLE_OFFSET + 16;
    bar_write(&r.mmio, e, 0xfee0_1000, 4);
    bar_write(&r.mmio, e + 4, 0, 4);
    bar_write(&r.mmio, e + 8, 0x41, 4);
    let routes = r.vm.routes.lock().unwrap().clone();
    let gsi = r.vm.irqfds.lock().unwrap()[1].1;
    assert_eq!(routes.last(), Some(&(gsi, 0xfee0_1000, 0x41)));
    assert_eq!(bar_read(&r.mmio, e + 8, 4), 0x41);
}

fn readable(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

#[test]
fn masked_vectors_pend_and_fire_on_unmask() {
    let r = rig();
    enable_memory(&r.pci);
    let msix_ctrl = r.pci.msix_cap() + 2;
    cfg_write(&r.pci, msix_ctrl, 0x8000, 2); // enable
    bar_write(&r.mmio, 0x16, 0, 2);
    bar_write(&r.mmio, 0x1a, 0, 2); // queue 0 -> vector 0 (masked after reset)
    let irq = PciIrq {
        state: Arc::downgrade(&r.pci.state),
    };
    irq.queue_irq(0);
    let fd0 = r
        .pci
        .state
        .msix
        .lock()
        .unwrap()
        .irqfd(0)
        .unwrap()
        .try_clone()
        .unwrap();
    assert!(!readable(&fd0), "masked: no interrupt");
    assert_eq!(bar_read(&r.mmio, MSIX_PBA_OFFSET, 8) & 1, 1, "pending bit");
    bar_write(&r.mmio, MSIX_TABLE_OFFSET + 12, 0, 4); // unmask
    assert!(readable(&fd0), "fires on unmask");
    assert_eq!(bar_read(&r.mmio, MSIX_PBA_OFFSET, 8) & 1, 0);
    fd0.read().unwrap();
    // Function mask holds everything back too.
    cfg_write(&r.pci, msix_ctrl, 0xc000, 2);
    irq.queue_irq(0);
    assert!(!readable(&fd0));
    cfg_write(&r.pci, msix_ctrl, 0x8000, 2);
    assert!(readable(&fd0));
}

fn handshake(r: &Rig, d: &TestDriver, driver_features: u64) -> u8 {
    bar_write(&r.mmio, 0x14, 1, 1);
    bar_write(&r.mmio, 0x14, 3, 1);
    bar_write(&r.mmio, 0x08, 0, 4);
    bar_write(&r.mmio, 0x0c, driver_features & 0xffff_ffff, 4);
    bar_write(&r.mmio, 0x08, 1, 4);
    bar_write(&r.mmio, 0x0c, driver_features >> 32, 4);
    bar_write(&r.mmio, 0x14, 0xb, 1);
    let st = bar_read(&r.mmio, 0x14, 1) as u8;
    if st & StatusBits::FEATURES_OK == 0 {
        return st;
    }
    let c = d.config();
    bar_write(&r.mmio, 0x16, 0, 2);
    bar_write(&r.mmio, 0x18, u64::from(c.size), 2);
    bar_write(&r.mmio, 0x1a, 0, 2);
    bar_write(&r.mmio, 0x20, c.desc, 8);
    bar_write(&r.mmio, 0x28, c.driver, 8);
    bar_write(&r.mmio, 0x30, c.device, 8);
    bar_write(&r.mmio, 0x1c, 1, 2);
    bar_write(&r.mmio, 0x14, 0xf, 1);
    bar_read(&r.mmio, 0x14, 1) as u8
}

#[test]
fn driver_handshake_queue_setup_and_a_request_end_to_end() {
    let r = rig();
    enable_memory(&r.pci);
    cfg_write(&r.pci, r.pci.msix_cap() + 2, 0x8000, 2);
    bar_write(&r.mmio, MSIX_TABLE_OFFSET + 12, 0, 4); // unmask vector 0
    let mut d = TestDriver::new(r.ram.memory(), QueueFormat::Split, 8, 0x10_0000, 0);
    // A notification before DRIVER_OK is harmless.
    bar_write(&r.mmio, NOTIFY_OFFSET, 0, 2);
    let st = handshake(&r, &d, 1 << VIRTIO_F_VERSION_1);
    assert_eq!(st, 0xf);
    let id = d.add(&[b"echo me"], &[16]).unwrap();
    bar_write(&r.mmio, NOTIFY_OFFSET, 0, 2);
    let fd0 = r
        .pci
        .state
        .msix
        .lock()
        .unwrap()
        .irqfd(0)
        .unwrap()
        .try_clone()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !readable(&fd0) {
        assert!(Instant::now() < deadline, "no MSI-X interrupt");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(d.used(), Some((id, 7)));
    assert_eq!(d.written(id), b"echo me");
    // Reset: status reads 0, queues are released.
    bar_write(&r.mmio, 0x14, 0, 1);
    assert_eq!(bar_read(&r.mmio, 0x14, 1), 0);
    assert_eq!(bar_read(&r.mmio, 0x1c, 2), 0);
}

#[test]
fn unsupported_features_are_refused_and_bad_queues_need_reset() {
    let r = rig();
    enable_memory(&r.pci);
    let d = TestDriver::new(r.ram.memory(), QueueFormat::Split, 8, 0x10_0000, 0);
    let st = handshake(&r, &d, (1 << VIRTIO_F_VERSION_1) | (1 << 40));
    assert_eq!(st & StatusBits::FEATURES_OK, 0, "FEATURES_OK refused");
    bar_write(&r.mmio, 0x14, 0, 1);
    // A queue size that is not a power of two: the device reports NEEDS_RESET.
    bar_write(&r.mmio, 0x14, 1, 1);
    bar_write(&r.mmio, 0x14, 3, 1);
    bar_write(&r.mmio, 0x0c, 0, 4);
    bar_write(&r.mmio, 0x08, 1, 4);
    bar_write(&r.mmio, 0x0c, 1, 4);
    bar_write(&r.mmio, 0x14, 0xb, 1);
    bar_write(&r.mmio, 0x16, 0, 2);
    bar_write(&r.mmio, 0x18, 6, 2);
    bar_write(&r.mmio, 0x1c, 1, 2);
    bar_write(&r.mmio, 0x14, 0xf, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bar_read(&r.mmio, 0x14, 1) as u8 & StatusBits::NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "NEEDS_RESET not reported");
        std::thread::sleep(Duration::from_millis(2));
    }
}
