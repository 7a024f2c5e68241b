//! The virtio-pci transport on arbitrary register traffic: PCI configuration space reads and
//! writes (BAR0, the command register, capabilities, MSI-X control), and BAR0 reads and writes
//! (common configuration, device configuration, notifications, the MSI-X table and PBA) of
//! every width, at any offset, in any order — what a hostile guest's driver can do. No panic,
//! no hang; the device behind it is the real epoll worker with the rng device.
#![no_main]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};

use alioth_devices::virtio::rng::VirtioRng;
use alioth_mem::{Bus, MemoryMap, RamBus};
use alioth_pci::{MsiRouter, PciFunction};
use alioth_virtio::{DeviceInfo, EpollBackend, Worker};
use alioth_virtio_pci::{IoeventRegistry, VirtioPci};
use vmm_sys_util::eventfd::EventFd;

const BAR: u64 = 0xc000_0000;

#[derive(Default)]
struct FakeVm {
    next_gsi: Mutex<u32>,
}

impl MsiRouter for FakeVm {
    fn alloc_gsi(&self) -> std::io::Result<u32> {
        let mut g = self.next_gsi.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        Ok(23 + *g)
    }
    fn set_route(&self, _gsi: u32, _addr: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn register_irqfd(&self, fd: &EventFd, _gsi: u32) -> std::io::Result<()> {
        let _ = fd.as_raw_fd();
        Ok(())
    }
}

impl IoeventRegistry for FakeVm {
    fn register(&self, _fd: &EventFd, _addr: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn deregister(&self, _fd: &EventFd, _addr: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn ram() -> &'static RamBus {
    static RAM: OnceLock<RamBus> = OnceLock::new();
    RAM.get_or_init(|| RamBus::new(MemoryMap::new(16 << 20).expect("map")).expect("ram"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mmio = Arc::new(Bus::new("mmio"));
    let vm = Arc::new(FakeVm::default());
    let dev = VirtioRng::new("virtio-rng0");
    let info = DeviceInfo::of(&dev);
    let Ok(worker) = Worker::spawn(dev, EpollBackend::default(), ram().memory().clone()) else {
        return;
    };
    let Ok(pci) = VirtioPci::new(info, worker, BAR, mmio.clone(), vm.clone(), vm) else {
        return;
    };
    // Each operation: kind, width, offset (2 bytes), value (8 bytes).
    for op in data.chunks_exact(12).take(256) {
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let off = u16::from_le_bytes([op[2], op[3]]);
        let val = u64::from_le_bytes(op[4..12].try_into().unwrap_or([0; 8]));
        let bytes = val.to_le_bytes();
        match op[0] % 4 {
            0 => pci.config_write(off & 0xfff, &bytes[..len.min(4)]),
            1 => {
                let mut b = [0u8; 4];
                pci.config_read(off & 0xfff, &mut b[..len.min(4)]);
            }
            // BAR0 through the bus, where the guest reaches it (mapped once it enabled it).
            2 => {
                let _ = mmio.write(BAR + u64::from(off), &bytes[..len]);
            }
            _ => {
                let mut b = [0u8; 8];
                let _ = mmio.read(BAR + u64::from(off), &mut b[..len]);
            }
        }
    }
    pci.shutdown();
});
