//! Ring 0: entry, descriptor tables, paging, interrupt stubs, and the drop to ring 3.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// First vector the kit gives to MSI-X interrupts (`IRQ_STUBS` are installed from here).
#[allow(dead_code)]
pub const IRQ_BASE: u8 = 0x40;
/// Number of interrupt vectors with counting stubs.
pub const IRQ_COUNT: usize = 16;

/// Interrupts taken per vector `IRQ_BASE + i` (incremented by the ring-0 stubs).
#[unsafe(no_mangle)]
pub static IRQ_COUNTS: [AtomicU64; IRQ_COUNT] = [const { AtomicU64::new(0) }; IRQ_COUNT];

/// Set by the entry code when the local APIC runs in x2APIC mode.
#[unsafe(no_mangle)]
pub static KIT_X2APIC: AtomicU8 = AtomicU8::new(0);
/// The boot CPU's APIC ID, read by the entry code (the destination of the kit's MSI-X messages).
#[unsafe(no_mangle)]
pub static KIT_APIC_ID: AtomicU32 = AtomicU32::new(0);

/// Whether the local APIC is in x2APIC mode.
pub fn x2apic() -> bool {
    KIT_X2APIC.load(Ordering::Relaxed) != 0
}

/// The boot CPU's APIC ID.
pub fn apic_id() -> u32 {
    KIT_APIC_ID.load(Ordering::Relaxed)
}

/// Halts the CPU for good (interrupts off): `hlt` at ring 3 faults, and the #GP handler halts
/// at ring 0 instead of returning.
pub fn halt() -> ! {
    // SAFETY: the kit's #GP handler turns a ring-3 `hlt` into `kit_halt`, which never returns.
    unsafe { asm!("hlt", options(noreturn)) }
}

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

#[unsafe(no_mangle)]
static mut KERNEL_STACK: Stack<16384> = Stack([0; 16384]);
#[unsafe(no_mangle)]
static mut USER_STACK: Stack<65536> = Stack([0; 65536]);

// Ring 0 runs emulated on a software KVM, and that emulator has no SSE: everything here is
// assembly (no compiler-generated vector code), and the tables are assembled data.
//
// Entry (64-bit boot protocol): interrupts off, our own stack, SSE on for ring 3, page tables
// with user-accessible 2 MiB pages over 4 GiB (above the first GiB, MMIO, uncached; ring 3
// maps more itself, see `mm`), GDT with user segments and a TSS, IDT with exception and
// interrupt stubs, the local APIC on in xAPIC or x2APIC mode, then `iretq` to
// `user_main` at CPL3 with IOPL=3 and interrupts enabled.
global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "lea rsp, [rip + KERNEL_STACK + 16384]",
    "mov r15, rsi", // boot_params
    // First sign of life, before any setup: "ALIOTH-KIT entry" on COM1 (the host times it).
    "lea rsi, [rip + kit_entry_msg]",
    "mov dx, 0x3f8",
    "20:",
    "mov al, [rsi]",
    "test al, al",
    "jz 21f",
    "out dx, al",
    "inc rsi",
    "jmp 20b",
    "21:",
    "mov rax, cr0",
    "and rax, ~(1 << 2)", // EM off
    "or rax, (1 << 1)",   // MP on
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, (3 << 9)", // OSFXSR, OSXMMEXCPT
    "mov cr4, rax",
    "lea rax, [rip + kit_pml4]",
    "mov cr3, rax",
    // TSS: RSP0 and the descriptor's base.
    "lea rdi, [rip + kit_tss]",
    "lea rax, [rip + KERNEL_STACK + 16384]",
    "mov [rdi + 4], rax",
    "mov rax, rdi",
    "and rax, 0xffffff",
    "shl rax, 16",
    "mov rcx, 103 | (0x89 << 40)",
    "or rax, rcx",
    "mov rcx, rdi",
    "shr rcx, 24",
    "and rcx, 0xff",
    "shl rcx, 56",
    "or rax, rcx",
    "mov [rip + kit_gdt + 40], rax",
    "mov rax, rdi",
    "shr rax, 32",
    "mov [rip + kit_gdt + 48], rax",
    "lgdt [rip + kit_gdtr]",
    "push 0x08",
    "lea rax, [rip + 3f]",
    "push rax",
    "retfq",
    "3:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov ax, 0x28",
    "ltr ax",
    // IDT: vectors 0-31 from EXC_STUBS, IRQ_BASE.. from IRQ_STUBS.
    "lea rsi, [rip + EXC_STUBS]",
    "lea rdi, [rip + kit_idt]",
    "mov ecx, 32",
    "call kit_fill_gates",
    "lea rsi, [rip + IRQ_STUBS]",
    "lea rdi, [rip + kit_idt + 0x40 * 16]",
    "mov ecx, 16",
    "call kit_fill_gates",
    // #GP gets the port-I/O emulating handler.
    "lea rsi, [rip + kit_gp_table]",
    "lea rdi, [rip + kit_idt + 13 * 16]",
    "mov ecx, 1",
    "call kit_fill_gates",
    "lidt [rip + kit_idtr]",
    // Local APIC on (spurious vector 0xff), in the mode the VMM left it: x2APIC when
    // IA32_APIC_BASE.EXTD is set (the xAPIC page is not decoded then), else xAPIC at the base
    // the MSR names. Globally disabled (EN clear) is turned on first.
    "mov ecx, 0x1b",
    "rdmsr",
    "test eax, (1 << 11)",
    "jnz 10f",
    "or eax, (1 << 11)",
    "wrmsr",
    "10:",
    "test eax, (1 << 10)",
    "jz 11f",
    "mov byte ptr [rip + KIT_X2APIC], 1",
    "mov ecx, 0x802", // x2APIC ID
    "rdmsr",
    "mov [rip + KIT_APIC_ID], eax",
    "mov ecx, 0x80f", // spurious interrupt vector register
    "mov eax, 0x1ff",
    "xor edx, edx",
    "wrmsr",
    "jmp 12f",
    "11:",
    "and eax, 0xfffff000",
    "shl rdx, 32",
    "or rax, rdx",
    "lea rcx, [rax + 0xb0]",
    "mov [rip + kit_apic_eoi], rcx",
    "mov ecx, [rax + 0x20]", // xAPIC ID in bits 31:24
    "shr ecx, 24",
    "mov [rip + KIT_APIC_ID], ecx",
    "mov dword ptr [rax + 0xf0], 0x1ff",
    "12:",
    // Ring 3.
    "mov rdi, r15",
    "lea rax, [rip + USER_STACK + 65536 - 8]",
    "push 0x1b", // user data | 3
    "push rax",
    "push 0x3202", // IOPL 3, IF
    "push 0x23",   // user code | 3
    "lea rax, [rip + {user}]",
    "push rax",
    "iretq",
    // rsi: stub addresses, rdi: first gate, rcx: count.
    "kit_fill_gates:",
    "mov rax, [rsi]",
    "mov rdx, rax",
    "and rdx, 0xffff",
    "or rdx, (0x08 << 16)",
    "mov r8, 0x8e",
    "shl r8, 40",
    "or rdx, r8",
    "mov r8, rax",
    "shr r8, 16",
    "and r8, 0xffff",
    "shl r8, 48",
    "or rdx, r8",
    "mov [rdi], rdx",
    "shr rax, 32",
    "mov [rdi + 8], rax",
    "add rsi, 8",
    "add rdi, 16",
    "dec ecx",
    "jnz kit_fill_gates",
    "ret",
    user = sym crate::user_main,
);

// PVH entry: 32-bit protected mode, paging off, RBX = hvm_start_info. Turn on long mode with
// the kit's own page tables and GDT, then continue at `_start` with RSI = start_info (the kit
// tells the two boot structures apart by the start_info magic).
global_asm!(
    ".section .text",
    ".code32",
    ".global _start32",
    "_start32:",
    "cli",
    "mov esp, offset KERNEL_STACK + 16384", // PVH provides no stack
    "mov esi, ebx",
    "mov eax, cr4",
    "or eax, (1 << 5)", // PAE
    "mov cr4, eax",
    "mov eax, offset kit_pml4",
    "mov cr3, eax",
    "mov ecx, 0xc0000080", // EFER
    "rdmsr",
    "or eax, (1 << 8)", // LME
    "wrmsr",
    "mov eax, cr0",
    "or eax, 0x80000001", // PG, PE
    "mov cr0, eax",
    "lgdt [kit_gdtr]",
    "push 0x08",
    ".byte 0x68", // push imm32 (the assembler would pick a 16-bit form for a symbol here)
    ".long _start",
    "retf",
    ".code64",
    // The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY) naming the entry above.
    ".section .note.Xen, \"a\"",
    ".balign 4",
    ".long 4",
    ".long 4",
    ".long 18",
    ".asciz \"Xen\"",
    ".balign 4",
    ".long _start32",
    ".section .text",
);

// Exception stubs report "ALIOTH-KIT exception vector=NN" and exit with 0xee. Interrupt stubs
// count, signal EOI and return.
global_asm!(
    ".section .text",
    ".altmacro",
    ".macro EXC n",
    "exc_stub_\\n:",
    "mov r12, \\n",
    "jmp exc_common",
    ".endm",
    ".macro IRQ n",
    "irq_stub_\\n:",
    "lock inc qword ptr [rip + IRQ_COUNTS + 8 * \\n]",
    "jmp kit_eoi",
    ".endm",
    ".set i, 0",
    ".rept 32",
    "EXC %i",
    ".set i, i + 1",
    ".endr",
    ".set i, 0",
    ".rept 16",
    "IRQ %i",
    ".set i, i + 1",
    ".endr",
    // End of interrupt: an MSR write in x2APIC mode, a store to the xAPIC page otherwise.
    "kit_eoi:",
    "push rax",
    "push rcx",
    "push rdx",
    "cmp byte ptr [rip + KIT_X2APIC], 0",
    "je 1f",
    "mov ecx, 0x80b",
    "xor eax, eax",
    "xor edx, edx",
    "wrmsr",
    "jmp 2f",
    "1:",
    "mov rax, [rip + kit_apic_eoi]",
    "mov dword ptr [rax], 0",
    "2:",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "iretq",
    "kit_halt:",
    "cli",
    "3: hlt",
    "jmp 3b",
    // #GP: a software KVM may not honour IOPL=3 for ring 3, so port I/O faults. Emulate the
    // in/out forms (EC ED EE EF, E4-E7 ib, 66-prefixed 16-bit) at ring 0 and step over the
    // instruction; `hlt` halts for good; anything else is reported as an exception. The user's RAX lives in
    // kit_gp_rax meanwhile (one CPU, interrupts off in the handler).
    "kit_gp:",
    "mov [rip + kit_gp_rax], rax",
    "push rcx",
    "push rsi",
    "push rdx",
    "mov rsi, [rsp + 32]", // RIP: above rdx, rsi, rcx and the error code
    "xor ecx, ecx",
    "cmp byte ptr [rsi], 0x66",
    "jne kit_gp_decode",
    "mov ecx, 1",
    "kit_gp_decode:",
    "movzx eax, byte ptr [rsi + rcx]",
    "cmp al, 0xee",
    "je kit_gp_out_al",
    "cmp al, 0xef",
    "je kit_gp_out_eax",
    "cmp al, 0xec",
    "je kit_gp_in_al",
    "cmp al, 0xed",
    "je kit_gp_in_eax",
    "cmp al, 0xe6",
    "je kit_gp_outi_al",
    "cmp al, 0xe7",
    "je kit_gp_outi_eax",
    "cmp al, 0xe4",
    "je kit_gp_ini_al",
    "cmp al, 0xe5",
    "je kit_gp_ini_eax",
    "cmp al, 0xf4", // hlt from ring 3: halt here for good
    "je kit_halt",
    "mov rax, [rip + kit_gp_rax]",
    "pop rdx",
    "pop rsi",
    "pop rcx",
    "mov r12, 13",
    "jmp exc_common",
    "kit_gp_out_al:",
    "mov rax, [rip + kit_gp_rax]",
    "out dx, al",
    "inc ecx",
    "jmp kit_gp_done",
    "kit_gp_out_eax:",
    "mov rax, [rip + kit_gp_rax]",
    "test ecx, ecx",
    "jnz kit_gp_out_ax",
    "out dx, eax",
    "inc ecx",
    "jmp kit_gp_done",
    "kit_gp_out_ax:",
    "out dx, ax",
    "inc ecx",
    "jmp kit_gp_done",
    "kit_gp_in_al:",
    "in al, dx",
    "mov byte ptr [rip + kit_gp_rax], al",
    "inc ecx",
    "jmp kit_gp_done",
    "kit_gp_in_eax:",
    "test ecx, ecx",
    "jnz kit_gp_in_ax",
    "in eax, dx",
    "mov [rip + kit_gp_rax], rax",
    "inc ecx",
    "jmp kit_gp_done",
    "kit_gp_in_ax:",
    "in ax, dx",
    "mov word ptr [rip + kit_gp_rax], ax",
    "inc ecx",
    "jmp kit_gp_done",
    "kit_gp_outi_al:",
    "movzx edx, byte ptr [rsi + rcx + 1]",
    "mov rax, [rip + kit_gp_rax]",
    "out dx, al",
    "add ecx, 2",
    "jmp kit_gp_done",
    "kit_gp_outi_eax:",
    "movzx edx, byte ptr [rsi + rcx + 1]",
    "mov rax, [rip + kit_gp_rax]",
    "out dx, eax",
    "add ecx, 2",
    "jmp kit_gp_done",
    "kit_gp_ini_al:",
    "movzx edx, byte ptr [rsi + rcx + 1]",
    "in al, dx",
    "mov byte ptr [rip + kit_gp_rax], al",
    "add ecx, 2",
    "jmp kit_gp_done",
    "kit_gp_ini_eax:",
    "movzx edx, byte ptr [rsi + rcx + 1]",
    "in eax, dx",
    "mov [rip + kit_gp_rax], rax",
    "add ecx, 2",
    "kit_gp_done:", // rcx: instruction length
    "add [rsp + 32], rcx",
    "pop rdx",
    "pop rsi",
    "pop rcx",
    "mov rax, [rip + kit_gp_rax]",
    "add rsp, 8", // error code
    "iretq",
    "exc_common:",
    "mov dx, 0x3f8",
    "lea rsi, [rip + kit_exc_msg]",
    "4:",
    "mov al, [rsi]",
    "test al, al",
    "jz 5f",
    "out dx, al",
    "inc rsi",
    "jmp 4b",
    "5:",
    "mov rax, r12",
    "shr rax, 4",
    "call kit_hex_digit",
    "mov rax, r12",
    "call kit_hex_digit",
    // The frame's first two words: RIP (or the error code, then RIP).
    "mov al, 32",
    "out dx, al",
    "mov r13, [rsp]",
    "call kit_hex_qword",
    "mov al, 32",
    "out dx, al",
    "mov r13, [rsp + 8]",
    "call kit_hex_qword",
    "mov al, 10",
    "out dx, al",
    "mov dx, 0xf4",
    "mov al, 0xee",
    "out dx, al",
    "6: hlt",
    "jmp 6b",
    "kit_hex_qword:",
    "mov ecx, 16",
    "8:",
    "rol r13, 4",
    "mov rax, r13",
    "call kit_hex_digit",
    "dec ecx",
    "jnz 8b",
    "ret",
    "kit_hex_digit:",
    "and al, 0xf",
    "cmp al, 10",
    "jb 7f",
    "add al, 39",
    "7: add al, 48",
    "out dx, al",
    "ret",
    ".macro ADDR kind, n",
    ".quad \\kind\\()_stub_\\n",
    ".endm",
    ".section .rodata",
    "kit_exc_msg: .asciz \"ALIOTH-KIT exception vector=0x\"",
    "kit_entry_msg: .asciz \"ALIOTH-KIT entry\\n\"",
    ".balign 8",
    "kit_gp_table: .quad kit_gp",
    ".global EXC_STUBS",
    "EXC_STUBS:",
    ".set i, 0",
    ".rept 32",
    "ADDR exc, %i",
    ".set i, i + 1",
    ".endr",
    ".global IRQ_STUBS",
    "IRQ_STUBS:",
    ".set i, 0",
    ".rept 16",
    "ADDR irq, %i",
    ".set i, i + 1",
    ".endr",
    ".noaltmacro",
    // Descriptor tables and page tables, assembled.
    ".section .data",
    ".balign 16",
    "kit_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08 kernel code
    ".quad 0x00cf92000000ffff", // 0x10 kernel data
    ".quad 0x00cff2000000ffff", // 0x18 user data, DPL 3
    ".quad 0x00affa000000ffff", // 0x20 user code, DPL 3
    ".quad 0, 0",               // 0x28 TSS, filled at boot
    "kit_gdtr: .word 7 * 8 - 1",
    ".quad kit_gdt",
    ".balign 16",
    "kit_idtr: .word 256 * 16 - 1",
    ".quad kit_idt",
    ".balign 16",
    "kit_tss: .fill 104, 1, 0",
    ".balign 8",
    "kit_gp_rax: .quad 0",
    "kit_apic_eoi: .quad 0xfee000b0",
    ".section .data.pages, \"aw\"",
    ".balign 4096",
    ".global kit_pml4",
    "kit_pml4: .quad kit_pdpt + 7",
    ".fill 511, 8, 0",
    ".global kit_pdpt",
    "kit_pdpt: .quad kit_pd + 7, kit_pd + 0x1000 + 7, kit_pd + 0x2000 + 7, kit_pd + 0x3000 + 7",
    ".fill 508, 8, 0",
    "kit_pd:",
    ".set i, 0",
    ".rept 512",
    ".quad (i << 21) | 0x87",
    ".set i, i + 1",
    ".endr",
    // Above 1 GiB, where VMMs put MMIO (the kit's RAM is below), uncached: PCD | PWT.
    ".rept 1536",
    ".quad (i << 21) | 0x9f",
    ".set i, i + 1",
    ".endr",
    ".section .bss",
    ".balign 4096",
    "kit_idt: .fill 256 * 16, 1, 0",
);

/// The current privilege level.
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack)) };
    cs & 3
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port I/O has device side effects; the caller must own the device.
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: per the caller.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: per the caller.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Writes a dword to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: per the caller.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

/// Writes a word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, v: u16) {
    // SAFETY: per the caller.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}

/// Reads a dword from an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: per the caller.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

/// Interrupts counted on vector `IRQ_BASE + i`.
#[allow(dead_code)]
pub fn irq_count(i: usize) -> u64 {
    IRQ_COUNTS
        .get(i)
        .map(|c| c.load(Ordering::Acquire))
        .unwrap_or(0)
}
