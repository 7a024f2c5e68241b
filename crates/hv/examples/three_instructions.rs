//! Runs a three-instruction guest with `alioth-hv` alone: no guest memory crate, no devices.
//!
//! The guest starts in 32-bit protected mode at 0x1000, computes 0x40 + 2 and writes it to
//! port 0xf4; the host sees the port write as a `VmExit::IoOut` and stops.
//!
//! ```sh
//! cargo run -p alioth-hv --example three_instructions
//! ```

use alioth_hv::{BootCpuState, CpuMode, Kvm, VmExit};

const RAM_SIZE: usize = 1 << 20;
const CODE: u64 = 0x1000;
const GDT: u64 = 0x500;

/// Anonymous memory for the guest, unmapped on drop (after the VM, by declaration order).
struct Ram(*mut u8);

impl Ram {
    fn new() -> std::io::Result<Ram> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Ram(p.cast()))
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= RAM_SIZE);
        // SAFETY: in bounds (checked above) of our own RAM_SIZE-byte mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(gpa as usize), bytes.len())
        };
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once, after the VM that used it is gone.
        unsafe { libc::munmap(self.0.cast(), RAM_SIZE) };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ram = Ram::new()?;
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    // SAFETY: `ram` is declared before `vm`, so it is dropped after it and stays mapped for as
    // long as the slot exists.
    unsafe { vm.set_memory_slot(0, 0, RAM_SIZE as u64, ram.0, false)? };

    // mov al, 0x40; add al, 2; out 0xf4, al
    ram.write(CODE, &[0xb0, 0x40, 0x04, 0x02, 0xe6, 0xf4]);
    let gdt: Vec<u64> = vec![
        0,
        0x00cf_9b00_0000_ffff, // 32-bit code
        0x00cf_9300_0000_ffff, // data
        0x008f_8b00_0000_ffff, // TSS
    ];
    for (i, d) in gdt.iter().enumerate() {
        ram.write(GDT + 8 * i as u64, &d.to_le_bytes());
    }
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_boot_state(&BootCpuState {
        mode: CpuMode::Protected32,
        rip: CODE,
        rsp: 0,
        rsi: 0,
        rbx: 0,
        cr3: 0,
        gdt_addr: GDT,
        gdt,
        idt_addr: 0,
        code_index: 1,
        data_index: 2,
        tss_index: 3,
    })?;
    loop {
        match vcpu.run()? {
            VmExit::IoOut { port, data, .. } => {
                println!("guest wrote {:#x} to port {port:#x}", data[0]);
                assert_eq!((port, data), (0xf4, &[0x42][..]));
                return Ok(());
            }
            VmExit::Interrupted => continue,
            other => return Err(format!("unexpected exit: {other:?}").into()),
        }
    }
}
