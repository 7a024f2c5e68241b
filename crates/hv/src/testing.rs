//! A tiny long-mode guest for hv's own tests: 2 MiB of RAM, identity-mapped 4 GiB, code assembled
//! with iced-x86 at `CODE`.

use iced_x86::code_asm::CodeAssembler;

use crate::{BootCpuState, CpuMode, Kvm, Vcpu, Vm};

pub const RAM_SIZE: usize = 2 << 20;
pub const CODE: u64 = 0x10000;
pub const STACK: u64 = 0x80000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;

/// Anonymous memory that backs the guest; unmapped after the VM is gone (field order).
struct Mapping(*mut u8);

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping after the VM that used it has been dropped.
        unsafe { libc::munmap(self.0.cast(), RAM_SIZE) };
    }
}

pub struct TestGuest {
    pub vcpu: Vcpu,
    pub vm: Vm,
    pub kvm: Kvm,
    ram: Mapping,
}

fn write_ram(ram: *mut u8, gpa: u64, bytes: &[u8]) {
    assert!(gpa as usize + bytes.len() <= RAM_SIZE);
    // SAFETY: bounds checked above; the mapping is RAM_SIZE bytes and ours.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ram.add(gpa as usize), bytes.len()) };
}

impl TestGuest {
    /// Builds the guest and loads `code` (assembled for `CODE`).
    pub fn new(build: impl FnOnce(&mut CodeAssembler)) -> TestGuest {
        let mut a = CodeAssembler::new(64).unwrap();
        build(&mut a);
        let code = a.assemble(CODE).unwrap();

        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        // SAFETY: a fresh anonymous private mapping, checked below.
        let ram = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ram, libc::MAP_FAILED);
        let ram = Mapping(ram.cast());
        // SAFETY: the mapping is dropped after the VM (TestGuest field order).
        unsafe { vm.set_memory_slot(0, 0, RAM_SIZE as u64, ram.0, false) }.unwrap();
        write_ram(ram.0, CODE, &code);
        let w64 = |gpa: u64, v: u64| write_ram(ram.0, gpa, &v.to_le_bytes());
        // Page tables: PML4[0] -> PDPT, PDPT[0..4] -> PD pages of 2 MiB mappings (user-ok).
        w64(PML4, PDPT | 0x7);
        for i in 0..4u64 {
            w64(PDPT + i * 8, (PD + i * 0x1000) | 0x7);
            for j in 0..512u64 {
                w64(PD + i * 0x1000 + j * 8, (i << 30) | (j << 21) | 0x87);
            }
        }
        let gdt = vec![
            0,
            0x00af_9b00_0000_ffff, // 64-bit code
            0x00cf_9300_0000_ffff, // data
            0x008f_8b00_0000_ffff, // TSS
        ];
        for (i, d) in gdt.iter().enumerate() {
            w64(GDT + i as u64 * 8, *d);
        }
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.supported_cpuid().unwrap().for_vcpu(0, 1);
        vcpu.set_cpuid(&cpuid).unwrap();
        vcpu.set_boot_state(&BootCpuState {
            mode: CpuMode::Long64,
            rip: CODE,
            rsp: STACK,
            rsi: 0,
            rbx: 0,
            cr3: PML4,
            gdt_addr: GDT,
            gdt,
            idt_addr: 0,
            code_index: 1,
            data_index: 2,
            tss_index: 3,
        })
        .unwrap();
        vcpu.set_lapic_lint().unwrap();
        TestGuest { vcpu, vm, kvm, ram }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        write_ram(self.ram.0, gpa, bytes);
    }
}
