//! vCPUs: boot state, the run loop's exits and the kick that stops a running vCPU.

use std::cell::{Cell, RefCell};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_fpu,
    kvm_msr_entry, kvm_regs, kvm_segment,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use alioth_arch::{BootCpuState, CpuMode};

use crate::cpuid::Cpuid;
use crate::{Error, Result};

/// Where a kick of a thread lands: the `immediate_exit` byte of the vCPU bound to the thread.
/// The thread (through [`BoundSlot`]) and the vCPU share it, so whichever goes first leaves the
/// other nothing dangling: a vCPU dropped on another thread than the one it ran on clears the
/// target here, and waits for a handler that is writing through it.
struct KickSlot {
    /// The vCPU's `immediate_exit` byte; null once the vCPU is gone.
    target: AtomicPtr<u8>,
    /// Kick handlers between loading `target` and their write through it.
    writers: AtomicUsize,
}

/// This thread's binding: the slot, kept alive for as long as the handler may read `SLOT`.
struct BoundSlot(Option<Arc<KickSlot>>);

impl Drop for BoundSlot {
    fn drop(&mut self) {
        // The handler must stop reading the slot before its last reference can go.
        SLOT.with(|c| c.set(null()));
    }
}

thread_local! {
    /// The slot of the vCPU this thread is bound to, for the signal handler (a plain pointer:
    /// const-initialised, no destructor, so it is readable from a handler at any time).
    static SLOT: Cell<*const KickSlot> = const { Cell::new(null()) };
    /// Owns that slot while `SLOT` points at it.
    static BOUND: RefCell<BoundSlot> = const { RefCell::new(BoundSlot(None)) };
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int) {
    // Only async-signal-safe work: a const-initialised thread local, atomics, a volatile store.
    let p = SLOT.with(|c| c.get());
    if p.is_null() {
        return;
    }
    // SAFETY: `SLOT` points at the slot `BOUND` keeps alive on this very thread (it is set only
    // after `BOUND` owns the slot, and cleared before `BOUND` lets it go).
    let slot = unsafe { &*p };
    slot.writers.fetch_add(1, Ordering::SeqCst);
    let target = slot.target.load(Ordering::SeqCst);
    if !target.is_null() {
        // SAFETY: a non-null target is the `immediate_exit` byte of a live vCPU's `kvm_run`
        // mapping: `Vcpu::drop` nulls it and then waits until `writers` is 0 before the
        // mapping can go, and this handler counted itself in `writers` before loading it.
        unsafe { std::ptr::write_volatile(target, 1) };
    }
    slot.writers.fetch_sub(1, Ordering::SeqCst);
}

/// Installs the (process-wide) handler of the vCPU kick signal. [`Vm::create_vcpu`] users call
/// this once before running vCPUs on their threads; calling it again is harmless.
///
/// [`Vm::create_vcpu`]: crate::Vm::create_vcpu
pub fn install_kick_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only does
        // async-signal-safe work. No SA_RESTART, so a blocked KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handle_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// A handle that forces a thread out of `KVM_RUN` (the run returns [`VmExit::Interrupted`]),
/// made for the calling thread. For a thread spawned to run a vCPU, [`VcpuThread`] does the
/// same with the thread's lifetime enforced.
#[derive(Debug, Clone, Copy)]
pub struct VcpuKicker {
    thread: libc::pthread_t,
}

impl VcpuKicker {
    /// A kicker for the calling thread (which runs the vCPU).
    ///
    /// # Safety
    /// The kicker (and its copies) must not be used after the calling thread has ended and been
    /// joined or detached: its id may then name another thread, or nothing.
    pub unsafe fn for_current_thread() -> Self {
        VcpuKicker {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
        }
    }

    /// Kicks the thread.
    pub fn kick(&self) {
        // SAFETY: the id names a live (or finished but unjoined) thread: the constructor's
        // contract. The signal's handler is installed by `install_kick_signal_handler` (without
        // it the signal's default action applies, which is sound, if fatal).
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

/// A thread that runs a vCPU and can be kicked out of `KVM_RUN` until it is joined: the
/// join consumes the handle, so no kick can reach a joined thread's reused id.
#[derive(Debug)]
pub struct VcpuThread<T> {
    handle: std::thread::JoinHandle<T>,
}

impl<T: Send + 'static> VcpuThread<T> {
    /// Spawns thread `name` running `f`.
    pub fn spawn(name: String, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<Self> {
        let handle = std::thread::Builder::new().name(name).spawn(f)?;
        Ok(VcpuThread { handle })
    }

    /// Kicks the thread out of `KVM_RUN` (or makes its next run return at once, if its vCPU is
    /// bound with [`Vcpu::bind_kick_to_current_thread`]).
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: `self` owns the unjoined JoinHandle, so the pthread id stays valid (a
        // finished thread's id is kept until it is joined). The handler is installed by
        // `install_kick_signal_handler`.
        unsafe { libc::pthread_kill(self.handle.as_pthread_t(), kick_signal()) };
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle.join()
    }
}

/// Why `KVM_RUN` returned.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// The guest read I/O port(s): fill `data` (`count` elements of `size` bytes, one after the
    /// other) before the next run.
    IoIn {
        /// The port.
        port: u16,
        /// Bytes per access (1, 2 or 4).
        size: u8,
        /// The buffer to fill.
        data: &'a mut [u8],
    },
    /// The guest wrote I/O port(s): `data` holds elements of `size` bytes.
    IoOut {
        /// The port.
        port: u16,
        /// Bytes per access.
        size: u8,
        /// The written bytes.
        data: &'a [u8],
    },
    /// The guest read unbacked memory: fill `data` before the next run.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// The buffer to fill (1-8 bytes).
        data: &'a mut [u8],
    },
    /// The guest wrote unbacked memory.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The written bytes.
        data: &'a [u8],
    },
    /// The guest executed HLT with no in-kernel LAPIC to wait on it.
    Hlt,
    /// The guest signalled the end of a level-triggered interrupt routed through the userspace
    /// I/O APIC (split irqchip).
    IoapicEoi {
        /// The interrupt vector.
        vector: u8,
    },
    /// Triple fault or similar: the guest is gone (a reset, for a PC).
    Shutdown,
    /// The guest asked for a reset through a system event.
    Reset,
    /// The guest powered off through a system event (e.g. PSCI/ACPI).
    PowerOff,
    /// The guest crashed (system event).
    Crash,
    /// KVM could not handle the guest (e.g. an instruction its emulator lacks).
    InternalError(InternalError),
    /// The run was interrupted by a signal or a kick; check why and run again or stop.
    Interrupted,
    /// VM entry failed.
    FailEntry {
        /// The hardware reason.
        reason: u64,
    },
    /// Any other exit, by KVM exit number.
    Other(u32),
}

/// The details of `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    /// `KVM_INTERNAL_ERROR_*` (1 = emulation failure).
    pub suberror: u32,
    /// The extra data words KVM gave.
    pub data: Vec<u64>,
}

impl InternalError {
    /// For an emulation failure (suberror 1) that carries the instruction: its bytes. KVM lays
    /// the data out as `flags` (data[0]) then `insn_size` (1 byte) and up to 15 instruction
    /// bytes (data[1..3]).
    pub fn insn_bytes(&self) -> Option<Vec<u8>> {
        const FLAG_INSTRUCTION_BYTES: u64 = 1;
        if self.suberror != 1 || self.data.len() < 3 {
            return None;
        }
        if self.data[0] & FLAG_INSTRUCTION_BYTES == 0 {
            return None;
        }
        let raw: Vec<u8> = self.data[1..3]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let len = usize::from(raw[0]).min(15);
        raw.get(1..1 + len).map(<[u8]>::to_vec)
    }

    /// A human description: the suberror's meaning and the instruction bytes if known.
    pub fn describe(&self) -> String {
        let kind = match self.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let mut s = format!("{kind} (suberror {})", self.suberror);
        if let Some(b) = self.insn_bytes() {
            let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            s.push_str(&format!(", instruction bytes [{}]", hex.join(" ")));
        } else if !self.data.is_empty() {
            let hex: Vec<String> = self.data.iter().map(|x| format!("{x:#x}")).collect();
            s.push_str(&format!(", data [{}]", hex.join(", ")));
        }
        s
    }
}

/// General-purpose registers.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Field-for-field conversions between [`Regs`] and `kvm_regs`, with the field list written once.
macro_rules! regs_conversions {
    ($($f:ident),*) => {
        impl Regs {
            fn from_kvm(r: &kvm_regs) -> Regs {
                Regs { $($f: r.$f),* }
            }
            fn to_kvm(self) -> kvm_regs {
                kvm_regs { $($f: self.$f),* }
            }
        }
    };
}

regs_conversions!(
    rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags
);

// MSR numbers set at boot.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// A KVM vCPU.
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    pub(crate) id: u32,
    slot: Arc<KickSlot>,
}

impl Vcpu {
    pub(crate) fn new(mut fd: VcpuFd, id: u32) -> Self {
        let target: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        Vcpu {
            fd,
            id,
            slot: Arc::new(KickSlot {
                target: AtomicPtr::new(target),
                writers: AtomicUsize::new(0),
            }),
        }
    }

    /// The vCPU's index (also its APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sets the CPUID table the guest sees (`KVM_SET_CPUID2`).
    pub fn set_cpuid(&self, cpuid: &Cpuid) -> Result<()> {
        self.fd
            .set_cpuid2(&cpuid.to_kvm()?)
            .map_err(Error::ioctl("SET_CPUID2"))
    }

    /// Reads back the CPUID table KVM holds for this vCPU (`KVM_GET_CPUID2`).
    pub fn cpuid(&self) -> Result<Cpuid> {
        let c = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::ioctl("GET_CPUID2"))?;
        Ok(Cpuid::from_kvm(&c))
    }

    /// Reads the general-purpose registers.
    pub fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(Error::ioctl("GET_REGS"))?;
        Ok(Regs::from_kvm(&r))
    }

    /// Writes the general-purpose registers.
    pub fn set_regs(&self, r: &Regs) -> Result<()> {
        self.fd
            .set_regs(&r.to_kvm())
            .map_err(Error::ioctl("SET_REGS"))
    }

    /// Control registers CR0, CR3, CR4 and EFER, for diagnostics.
    pub fn control_regs(&self) -> Result<[u64; 4]> {
        let s = self.fd.get_sregs().map_err(Error::ioctl("GET_SREGS"))?;
        Ok([s.cr0, s.cr3, s.cr4, s.efer])
    }

    /// Puts the vCPU in the state a boot protocol promises the entry point: segments from the
    /// GDT, control registers for the mode, RIP/RSP/RSI/RBX, a clean FPU and the boot MSRs.
    pub fn set_boot_state(&self, st: &BootCpuState) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(Error::ioctl("GET_SREGS"))?;
        let gdt_entry = |i: u16| st.gdt.get(usize::from(i)).copied().unwrap_or(0);
        let code = segment_from_gdt(gdt_entry(st.code_index), st.code_index);
        let data = segment_from_gdt(gdt_entry(st.data_index), st.data_index);
        let tss = segment_from_gdt(gdt_entry(st.tss_index), st.tss_index);
        sregs.gdt.base = st.gdt_addr;
        sregs.gdt.limit = (st.gdt.len() * 8 - 1) as u16;
        sregs.idt.base = st.idt_addr;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        const CR0_PE: u64 = 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const EFER_LME: u64 = 1 << 8;
        const EFER_LMA: u64 = 1 << 10;
        match st.mode {
            CpuMode::Long64 => {
                sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
                sregs.cr3 = st.cr3;
                sregs.cr4 = CR4_PAE;
                sregs.efer = EFER_LME | EFER_LMA;
            }
            CpuMode::Protected32 => {
                sregs.cr0 = CR0_PE | CR0_ET;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(Error::ioctl("SET_SREGS"))?;

        let regs = Regs {
            rip: st.rip,
            rsp: st.rsp,
            rbp: st.rsp,
            rsi: st.rsi,
            rbx: st.rbx,
            rflags: 0x2,
            ..Default::default()
        };
        self.set_regs(&regs)?;
        self.set_initial_fpu()?;
        self.set_boot_msrs()
    }

    fn set_initial_fpu(&self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(Error::ioctl("SET_FPU"))
    }

    /// Sets the MSRs a freshly booted x86 CPU is expected to hold (fast strings on, write-back
    /// default memory type, zeroed syscall MSRs).
    pub fn set_boot_msrs(&self) -> Result<()> {
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_IA32_SYSENTER_ESP, 0),
            entry(MSR_IA32_SYSENTER_EIP, 0),
            entry(MSR_STAR, 0),
            entry(MSR_CSTAR, 0),
            entry(MSR_KERNEL_GS_BASE, 0),
            entry(MSR_SYSCALL_MASK, 0),
            entry(MSR_LSTAR, 0),
            entry(MSR_IA32_TSC, 0),
            entry(MSR_IA32_MISC_ENABLE, 1), // fast string operations
            entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
        ];
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::TooManyEntries("the MSR list"))?;
        let n = self.fd.set_msrs(&msrs).map_err(Error::ioctl("SET_MSRS"))?;
        if n != entries.len() {
            return Err(Error::Ioctl {
                op: "SET_MSRS",
                source: std::io::Error::other(format!(
                    "KVM accepted {n} of {} boot MSRs (rejected MSR {:#x})",
                    entries.len(),
                    entries[n].index
                )),
            });
        }
        Ok(())
    }

    /// Programs the local APIC's LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a PC
    /// BIOS leaves them.
    pub fn set_lapic_lint(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(Error::ioctl("GET_LAPIC"))?;
        let rw = |regs: &mut [libc::c_char; 1024], off: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *x as libc::c_char;
            }
        };
        rw(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        rw(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(Error::ioctl("SET_LAPIC"))
    }

    /// Makes kicks of the calling thread stop this vCPU: a kick that arrives while the vCPU is
    /// not in `KVM_RUN` makes the next [`Vcpu::run`] return [`VmExit::Interrupted`] at once.
    /// Call it on the vCPU's thread before checking any stop condition, so no kick is lost.
    pub fn bind_kick_to_current_thread(&mut self) {
        if SLOT.with(|c| c.get()) == Arc::as_ptr(&self.slot) {
            return;
        }
        // Point the handler at this vCPU's slot (alive: `self` holds it) before the previous
        // binding's slot may be released.
        SLOT.with(|c| c.set(Arc::as_ptr(&self.slot)));
        let previous = BOUND.with(|b| b.borrow_mut().0.replace(self.slot.clone()));
        drop(previous);
    }

    /// Runs the guest until the next exit that needs userspace.
    pub fn run(&mut self) -> Result<VmExit<'_>> {
        self.bind_kick_to_current_thread();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(VmExit::Interrupted);
            }
            Err(e) => return Err(Error::ioctl("RUN")(e)),
        };
        // Only what the exit says is kept (ports, addresses); the data is then viewed through
        // one `&mut kvm_run`, so no pointer derived from an earlier borrow outlives it.
        let kind = match exit {
            VcpuExit::IoIn(port, _) => Pending::IoIn(port),
            VcpuExit::IoOut(port, _) => Pending::IoOut(port),
            VcpuExit::MmioRead(addr, _) => Pending::MmioRead(addr),
            VcpuExit::MmioWrite(addr, _) => Pending::MmioWrite(addr),
            VcpuExit::Hlt => return Ok(VmExit::Hlt),
            VcpuExit::IoapicEoi(vector) => return Ok(VmExit::IoapicEoi { vector }),
            VcpuExit::Shutdown => return Ok(VmExit::Shutdown),
            VcpuExit::Intr => return Ok(VmExit::Interrupted),
            VcpuExit::FailEntry(reason, _) => return Ok(VmExit::FailEntry { reason }),
            VcpuExit::SystemEvent(kind, _) => {
                return Ok(match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    KVM_SYSTEM_EVENT_CRASH => VmExit::Crash,
                    _ => VmExit::Other(kvm_bindings::KVM_EXIT_SYSTEM_EVENT),
                });
            }
            VcpuExit::InternalError => Pending::Internal,
            VcpuExit::Unsupported(n) => return Ok(VmExit::Other(n)),
            _ => {
                let n = self.fd.get_kvm_run().exit_reason;
                return Ok(VmExit::Other(n));
            }
        };
        let run = self.fd.get_kvm_run();
        match kind {
            Pending::Internal => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union
                // member.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Ok(VmExit::InternalError(InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }))
            }
            Pending::IoIn(port) | Pending::IoOut(port) => {
                // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the live union member (plain
                // data, copied out).
                let io = unsafe { run.__bindgen_anon_1.io };
                let len = usize::from(io.size) * io.count as usize;
                let base: *mut u8 = (run as *mut kvm_bindings::kvm_run).cast();
                // SAFETY: KVM puts the `count` elements of `size` bytes at `data_offset` inside
                // the vCPU's kvm_run mapping (as kvm-ioctls relies on too); the slice is derived
                // from the one `&mut kvm_run` and borrows `self` mutably for its life.
                let data = unsafe {
                    std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len)
                };
                Ok(if matches!(kind, Pending::IoIn(_)) {
                    VmExit::IoIn {
                        port,
                        size: io.size,
                        data,
                    }
                } else {
                    VmExit::IoOut {
                        port,
                        size: io.size,
                        data,
                    }
                })
            }
            Pending::MmioRead(addr) | Pending::MmioWrite(addr) => {
                // SAFETY: exit_reason is KVM_EXIT_MMIO, so `mmio` is the live union member.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let len = (mmio.len as usize).min(mmio.data.len());
                let data = &mut mmio.data[..len];
                Ok(if matches!(kind, Pending::MmioRead(_)) {
                    VmExit::MmioRead { addr, data }
                } else {
                    VmExit::MmioWrite { addr, data }
                })
            }
        }
    }
}

enum Pending {
    IoIn(u16),
    IoOut(u16),
    MmioRead(u64),
    MmioWrite(u64),
    Internal,
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // Whatever thread this vCPU was bound to, its kicks stop landing in our kvm_run, and a
        // handler already writing there finishes before the mapping goes (with `fd`, after this).
        self.slot.target.store(null_mut(), Ordering::SeqCst);
        while self.slot.writers.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
#[path = "vcpu_test.rs"]
mod tests;
