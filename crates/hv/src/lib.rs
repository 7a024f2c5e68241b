//! `alioth-hv`: the only crate of Alioth that talks to KVM.
//!
//! It wraps `kvm-ioctls`/`kvm-bindings` in a small API of Alioth's own: [`Kvm`] opens the
//! hypervisor, [`Vm`] owns memory slots, ioeventfds, irqfds and GSI routing, and [`Vcpu`] runs guest
//! code and reports each exit as a [`VmExit`]. CPUID tables ([`Cpuid`]) are built from what KVM
//! supports, made per-vCPU (APIC IDs, topology) and trimmed by user-chosen [`CpuFeature`] edits.
//!
//! ```no_run
//! use alioth_hv::Kvm;
//!
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let cpuid = kvm.supported_cpuid()?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.set_cpuid(&cpuid.for_vcpu(0, 1))?;
//! # Ok::<(), alioth_hv::Error>(())
//! ```

mod cpuid;
mod state;
mod vcpu;
mod vm;

pub use alioth_arch::{BootCpuState, CpuMode};
pub use cpuid::{CpuFeature, CpuFeatureEdit, Cpuid, CpuidEntry, parse_cpu_features};
pub use state::{VcpuState, VmState};
pub use vcpu::{
    InternalError, Regs, Vcpu, VcpuKicker, VcpuThread, VmExit, install_kick_signal_handler,
};
pub use vm::{DataMatch, GsiRoute, IOAPIC_PINS, IoEventAddress, Vm};
pub use vmm_sys_util::eventfd::EventFd;

use kvm_ioctls::Cap;

/// Errors returned by the hypervisor layer. Each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and do you have access to /dev/kvm?)")]
    Open(#[source] std::io::Error),
    /// The KVM API version is not the stable one (12).
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A KVM capability Alioth needs is missing.
    #[error("KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// The operation that failed.
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: std::io::Error,
    },
    /// A CPU feature name is not known.
    #[error("unknown CPU feature `{0}` (known: {1})")]
    UnknownCpuFeature(String, String),
    /// A CPU feature edit is malformed.
    #[error("bad CPU feature edit `{0}`: write `-name` to remove a feature (e.g. `-xsave,-cx16`)")]
    BadCpuFeatureEdit(String),
    /// Too many entries for a KVM table.
    #[error("too many entries for {0}")]
    TooManyEntries(&'static str),
}

impl Error {
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |e| Error::Ioctl {
            op,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An open `/dev/kvm`.
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
    /// `KVM_GET_SUPPORTED_CPUID` does not change while `/dev/kvm` is open and costs ~0.3 ms
    /// here (a measurable part of start-up), so it is asked once.
    supported_cpuid: std::sync::OnceLock<Cpuid>,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the API version and the capabilities Alioth relies on.
    pub fn new() -> Result<Self> {
        let kvm = kvm_ioctls::Kvm::new()
            .map_err(|e| Error::Open(std::io::Error::from_raw_os_error(e.errno())))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::Ioeventfd, "IOEVENTFD"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::IrqRouting, "IRQ_ROUTING"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::SplitIrqchip, "SPLIT_IRQCHIP"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        Ok(Kvm {
            kvm,
            supported_cpuid: std::sync::OnceLock::new(),
        })
    }

    /// The largest number of vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The number of memory slots KVM allows in one VM.
    pub fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// The CPUID leaves KVM can present to a guest (`KVM_GET_SUPPORTED_CPUID`, asked once per
    /// [`Kvm`]).
    pub fn supported_cpuid(&self) -> Result<Cpuid> {
        if let Some(cpuid) = self.supported_cpuid.get() {
            return Ok(cpuid.clone());
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::ioctl("GET_SUPPORTED_CPUID"))?;
        Ok(self
            .supported_cpuid
            .get_or_init(|| Cpuid::from_kvm(&cpuid))
            .clone())
    }

    /// Creates a VM with the split irqchip: local APICs in the kernel, the I/O APIC left to
    /// userspace (see [`Vm`]).
    pub fn create_vm(&self) -> Result<Vm> {
        Vm::new(&self.kvm)
    }
}

/// Whether `/dev/kvm` is backed by hardware virtualization (VMX or SVM), as opposed to a software
/// KVM such as PVM, on which guest ring 0 is emulated and a full Linux boot is impractical.
pub fn kvm_is_hardware_backed() -> bool {
    std::path::Path::new("/sys/module/kvm_intel").exists()
        || std::path::Path::new("/sys/module/kvm_amd").exists()
}

#[cfg(test)]
mod testing;
