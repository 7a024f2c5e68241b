//! The VM: memory slots, ioeventfds, irqfds and interrupt routing.

use kvm_bindings::{
    KVM_IRQ_ROUTING_MSI, KVM_MEM_READONLY, KvmIrqRouting, kvm_irq_routing_entry, kvm_msi,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::Vcpu;
use crate::{Error, Result};

/// Guest-physical address of the 3-page TSS region KVM needs on Intel hosts (just below the BIOS
/// area at the top of the 32-bit space, outside any RAM or device window Alioth uses).
const TSS_ADDR: usize = 0xfffb_d000;
/// Guest-physical address of the identity-map page KVM needs on Intel hosts.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Where an ioeventfd listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    /// An I/O port.
    Pio(u16),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// Which written value triggers an ioeventfd. The width of the match is the width of the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMatch {
    /// Any write of any width triggers it.
    Any,
    /// Only a 1-byte write of this value.
    U8(u8),
    /// Only a 2-byte write of this value.
    U16(u16),
    /// Only a 4-byte write of this value.
    U32(u32),
    /// Only an 8-byte write of this value.
    U64(u64),
}

/// One entry of the GSI routing table. With the split irqchip every route is an MSI: the
/// userspace I/O APIC turns its pins' redirection entries into MSI routes for GSIs 0-23.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsiRoute {
    /// A GSI that sends an MSI message.
    Msi {
        /// The GSI number.
        gsi: u32,
        /// MSI address (e.g. 0xfee0_0000 | dest << 12).
        addr: u64,
        /// MSI data (vector and delivery mode).
        data: u32,
    },
}

impl GsiRoute {
    fn to_kvm(self) -> kvm_irq_routing_entry {
        let mut entry = kvm_irq_routing_entry::default();
        match self {
            GsiRoute::Msi { gsi, addr, data } => {
                entry.gsi = gsi;
                entry.type_ = KVM_IRQ_ROUTING_MSI;
                entry.u.msi.address_lo = addr as u32;
                entry.u.msi.address_hi = (addr >> 32) as u32;
                entry.u.msi.data = data;
            }
        }
        entry
    }
}

/// Calls a kvm-ioctls ioeventfd method with the datamatch type (and so width) `$dm` names.
macro_rules! with_datamatch {
    ($vm:expr, $method:ident, $fd:expr, $addr:expr, $dm:expr) => {
        match $dm {
            DataMatch::Any => $vm.$method($fd, $addr, NoDatamatch),
            DataMatch::U8(v) => $vm.$method($fd, $addr, v),
            DataMatch::U16(v) => $vm.$method($fd, $addr, v),
            DataMatch::U32(v) => $vm.$method($fd, $addr, v),
            DataMatch::U64(v) => $vm.$method($fd, $addr, v),
        }
    };
}

/// Pins of the (userspace) I/O APIC the split irqchip is created for: GSIs 0-23.
pub const IOAPIC_PINS: u32 = 24;

/// A KVM virtual machine with the split irqchip: local APICs in the kernel, the I/O APIC in
/// userspace (no PIC, no PIT), as Cloud Hypervisor and upstream Alioth do. Besides the smaller
/// in-kernel surface, on software KVM hosts such as PVM the full in-kernel irqchip made every
/// memory-slot change cost milliseconds (5 ms for 128 MiB, and 16 ms at VM teardown); the
/// split irqchip costs 0.1 ms and 0.4 ms.
pub struct Vm {
    pub(crate) fd: VmFd,
}

impl Vm {
    pub(crate) fn new(kvm: &kvm_ioctls::Kvm) -> Result<Self> {
        let fd = kvm.create_vm().map_err(Error::ioctl("CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDR)
            .map_err(Error::ioctl("SET_TSS_ADDR"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(Error::ioctl("SET_IDENTITY_MAP_ADDR"))?;
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = u64::from(IOAPIC_PINS);
        fd.enable_cap(&cap)
            .map_err(Error::ioctl("ENABLE_CAP(SPLIT_IRQCHIP)"))?;
        Ok(Vm { fd })
    }

    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr` as memory
    /// slot `slot`. A `size` of 0 deletes the slot.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be a mapping of this process that stays valid (not
    /// unmapped or remapped) until the slot is deleted or the VM is dropped.
    pub unsafe fn set_memory_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
        read_only: bool,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the slot's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(Error::ioctl("SET_USER_MEMORY_REGION"))
    }

    /// Creates vCPU `id` (also its initial APIC ID).
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(Error::ioctl("CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, id))
    }

    /// Makes KVM signal `fd` (without a userspace exit) when the guest writes to `addr` and the
    /// written value matches `datamatch`.
    pub fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()> {
        let addr = to_kvm_addr(addr);
        with_datamatch!(self.fd, register_ioevent, fd, &addr, datamatch)
            .map_err(Error::ioctl("IOEVENTFD (assign)"))
    }

    /// Removes an ioeventfd registered with the same `fd`, `addr` and `datamatch`.
    pub fn deregister_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()> {
        let addr = to_kvm_addr(addr);
        with_datamatch!(self.fd, unregister_ioevent, fd, &addr, datamatch)
            .map_err(Error::ioctl("IOEVENTFD (deassign)"))
    }

    /// Makes a write to `fd` inject GSI `gsi` (as routed by [`Vm::set_gsi_routing`]).
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(Error::ioctl("IRQFD (assign)"))
    }

    /// Detaches `fd` from `gsi`.
    pub fn deregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(Error::ioctl("IRQFD (deassign)"))
    }

    /// Replaces the whole GSI routing table (GSIs 0-23 are the I/O APIC's pins, routed by
    /// whoever emulates it; a GSI without a route delivers nothing).
    pub fn set_gsi_routing(&self, routes: &[GsiRoute]) -> Result<()> {
        let entries: Vec<_> = routes.iter().map(|r| r.to_kvm()).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| Error::TooManyEntries("the GSI routing table"))?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(Error::ioctl("SET_GSI_ROUTING"))
    }

    /// Sends one MSI message directly (a slow path; use an irqfd with an MSI route for devices).
    pub fn signal_msi(&self, addr: u64, data: u32) -> Result<bool> {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        let delivered = self
            .fd
            .signal_msi(msi)
            .map_err(Error::ioctl("SIGNAL_MSI"))?;
        Ok(delivered > 0)
    }
}

fn to_kvm_addr(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(port) => kvm_ioctls::IoEventAddress::Pio(u64::from(port)),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

#[cfg(test)]
#[path = "vm_test.rs"]
mod tests;
