//! Saving and restoring what KVM holds for a VM and its vCPUs (snapshots).
//!
//! The types are opaque and serializable (serde): a snapshot stores them and a new process
//! gives them back to a fresh VM of the same shape. KVM's own structures stay inside.

use kvm_bindings::{
    Msrs, kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::Cap;
use serde::{Deserialize, Serialize};

use crate::{Error, Kvm, Result, Vcpu, Vm};

/// Everything KVM holds for one vCPU: registers, segment and control registers, the FPU and
/// extended state (XSAVE), XCRs, the local APIC, the MSRs KVM saves, the run state, pending
/// events, debug registers and the TSC frequency.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    id: u32,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<(u32, u64)>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
    tsc_khz: Option<u32>,
}

impl VcpuState {
    /// The vCPU it was taken from.
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// The VM-wide state KVM holds with the split irqchip: the KVM clock (the guest's notion of
/// time continues from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    clock: kvm_clock_data,
}

/// The MSRs that take more than [`Msrs`] holds in one call are read in chunks of this size.
const MSR_CHUNK: usize = 64;

impl Kvm {
    /// The MSRs KVM says are worth saving (`KVM_GET_MSR_INDEX_LIST`), for
    /// [`Vcpu::save_state`].
    pub fn msrs_to_save(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(Error::ioctl("GET_MSR_INDEX_LIST"))?;
        Ok(list.as_slice().to_vec())
    }

    /// Checks that the legacy 4 KiB XSAVE area holds all of this host's extended state (no
    /// AMX-sized state): what [`Vcpu::restore_state`] relies on.
    pub fn xsave_fits(&self) -> Result<()> {
        if !self.kvm.check_extension(Cap::Xsave) {
            return Err(Error::MissingCap("XSAVE"));
        }
        let size = self.kvm.check_extension_int(Cap::Xsave2);
        if size > 4096 {
            return Err(Error::Ioctl {
                op: "CHECK_EXTENSION(XSAVE2)",
                source: std::io::Error::other(format!(
                    "the extended state takes {size} bytes; snapshots support 4096"
                )),
            });
        }
        Ok(())
    }
}

impl Vcpu {
    /// Reads this vCPU's state. `msrs` is [`Kvm::msrs_to_save`]; MSRs KVM then refuses to
    /// read are left out. The vCPU must not be running (its thread parked or not started).
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState> {
        let fd = &self.fd;
        let mut saved = Vec::with_capacity(msrs.len());
        for chunk in msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m =
                Msrs::from_entries(&entries).map_err(|_| Error::TooManyEntries("the MSR list"))?;
            let n = fd.get_msrs(&mut m).map_err(Error::ioctl("GET_MSRS"))?;
            saved.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: go on after it.
            if n < chunk.len() {
                for &index in &chunk[n + 1..] {
                    let mut one = Msrs::from_entries(&[kvm_msr_entry {
                        index,
                        ..Default::default()
                    }])
                    .map_err(|_| Error::TooManyEntries("the MSR list"))?;
                    if fd.get_msrs(&mut one).map_err(Error::ioctl("GET_MSRS"))? == 1 {
                        saved.push((index, one.as_slice()[0].data));
                    }
                }
            }
        }
        Ok(VcpuState {
            id: self.id,
            regs: fd.get_regs().map_err(Error::ioctl("GET_REGS"))?,
            sregs: fd.get_sregs().map_err(Error::ioctl("GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(Error::ioctl("GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(Error::ioctl("GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(Error::ioctl("GET_LAPIC"))?,
            msrs: saved,
            mp_state: fd.get_mp_state().map_err(Error::ioctl("GET_MP_STATE"))?,
            events: fd
                .get_vcpu_events()
                .map_err(Error::ioctl("GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(Error::ioctl("GET_DEBUGREGS"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Gives this vCPU the state `s` (taken from the vCPU with the same ID). `kvm` vouches that
    /// the XSAVE area fits ([`Kvm::xsave_fits`]).
    pub fn restore_state(&self, kvm: &Kvm, s: &VcpuState) -> Result<()> {
        if s.id != self.id {
            return Err(Error::Ioctl {
                op: "restore",
                source: std::io::Error::other(format!(
                    "state of vCPU {} given to vCPU {}",
                    s.id, self.id
                )),
            });
        }
        kvm.xsave_fits()?;
        let fd = &self.fd;
        if let Some(khz) = s.tsc_khz
            && fd.get_tsc_khz().ok() != Some(khz)
        {
            // Another host (or frequency): the guest keeps the frequency it calibrated.
            fd.set_tsc_khz(khz).map_err(Error::ioctl("SET_TSC_KHZ"))?;
        }
        // Control registers before the MSRs that depend on them (EFER with CR0/CR4).
        fd.set_sregs(&s.sregs).map_err(Error::ioctl("SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(Error::ioctl("SET_REGS"))?;
        // SAFETY: `xsave_fits` checked that this host's extended state fits the 4096-byte area,
        // so the kernel reads no further than the struct.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(Error::ioctl("SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(Error::ioctl("SET_XCRS"))?;
        for chunk in s.msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let m =
                Msrs::from_entries(&entries).map_err(|_| Error::TooManyEntries("the MSR list"))?;
            let n = fd.set_msrs(&m).map_err(Error::ioctl("SET_MSRS"))?;
            if n != entries.len() {
                return Err(Error::Ioctl {
                    op: "SET_MSRS",
                    source: std::io::Error::other(format!(
                        "KVM refused MSR {:#x}",
                        entries[n].index
                    )),
                });
            }
        }
        fd.set_lapic(&s.lapic).map_err(Error::ioctl("SET_LAPIC"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(Error::ioctl("SET_MP_STATE"))?;
        fd.set_vcpu_events(&s.events)
            .map_err(Error::ioctl("SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(Error::ioctl("SET_DEBUGREGS"))?;
        Ok(())
    }
}

impl Vm {
    /// Reads the VM-wide state (with every vCPU stopped).
    pub fn save_state(&self) -> Result<VmState> {
        Ok(VmState {
            clock: self.fd.get_clock().map_err(Error::ioctl("GET_CLOCK"))?,
        })
    }

    /// Restores the VM-wide state.
    pub fn restore_state(&self, s: &VmState) -> Result<()> {
        // Only the clock value is set; KVM computes the rest (flags are outputs).
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(Error::ioctl("SET_CLOCK"))
    }
}

#[cfg(test)]
#[path = "state_test.rs"]
mod tests;
