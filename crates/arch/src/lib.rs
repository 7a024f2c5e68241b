//! `alioth-arch`: x86-64 CPU state shared by the boot loader and the hypervisor layer, with no
//! hypervisor dependency.
//!
//! A boot protocol (`alioth-boot`) describes the state it hands the boot vCPU as a
//! [`BootCpuState`]; the hypervisor layer (`alioth-hv` over KVM, or another VMM's own) turns it
//! into registers. Neither needs the other.
//!
//! ```
//! use alioth_arch::{BootCpuState, CpuMode};
//!
//! let st = BootCpuState {
//!     mode: CpuMode::Long64,
//!     rip: 0x20_0000,
//!     rsp: 0x8ff0,
//!     rsi: 0x7000,
//!     rbx: 0,
//!     cr3: 0x9000,
//!     gdt_addr: 0x500,
//!     gdt: vec![0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008b_0000_0000_0000],
//!     idt_addr: 0x520,
//!     code_index: 1,
//!     data_index: 2,
//!     tss_index: 3,
//! };
//! assert!(st.is_long_mode());
//! ```

/// The CPU mode a boot protocol starts the vCPU in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 64-bit long mode with paging (Linux 64-bit boot protocol).
    Long64,
    /// 32-bit protected mode, paging off (PVH).
    Protected32,
}

/// The register state a boot protocol hands over on the boot vCPU. The GDT itself is written to
/// guest memory by the loader; its descriptors are repeated here so the hidden segment state
/// matches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCpuState {
    /// The CPU mode.
    pub mode: CpuMode,
    /// Entry point.
    pub rip: u64,
    /// Stack pointer (0 if the protocol sets none).
    pub rsp: u64,
    /// RSI (boot_params for the Linux protocol).
    pub rsi: u64,
    /// RBX (start_info for PVH).
    pub rbx: u64,
    /// Page-table root (long mode).
    pub cr3: u64,
    /// Guest-physical address of the GDT.
    pub gdt_addr: u64,
    /// The GDT's descriptors.
    pub gdt: Vec<u64>,
    /// Guest-physical address of the (empty) IDT.
    pub idt_addr: u64,
    /// GDT index of the code segment.
    pub code_index: u16,
    /// GDT index of the data segment.
    pub data_index: u16,
    /// GDT index of the TSS.
    pub tss_index: u16,
}

impl BootCpuState {
    /// Whether the vCPU starts in 64-bit long mode.
    pub fn is_long_mode(&self) -> bool {
        self.mode == CpuMode::Long64
    }
}
