use iced_x86::code_asm::*;

use crate::testing::TestGuest;
use crate::{DataMatch, EventFd, GsiRoute, IoEventAddress, VmExit};

const DONE: u16 = 0xf4;

#[test]
fn ioeventfd_fires_on_guest_write_without_exit() {
    let mut g = TestGuest::new(|a| {
        a.mov(dx, 0x500u32).unwrap();
        a.mov(al, 7u32).unwrap();
        a.out(dx, al).unwrap(); // matches: no exit
        a.mov(al, 8u32).unwrap();
        a.out(dx, al).unwrap(); // no match: exits
        a.mov(rbx, 0xd000_0000u64).unwrap();
        a.mov(dword_ptr(rbx), 0x99u32).unwrap(); // any value: no exit
        a.out(DONE as u32, al).unwrap();
    });
    let pio = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mmio = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.vm.register_ioeventfd(&pio, IoEventAddress::Pio(0x500), DataMatch::U8(7))
        .unwrap();
    g.vm.register_ioeventfd(&mmio, IoEventAddress::Mmio(0xd000_0000), DataMatch::Any)
        .unwrap();
    let mut exits = Vec::new();
    loop {
        match g.vcpu.run().unwrap() {
            VmExit::IoOut { port: DONE, .. } => break,
            VmExit::IoOut { port, data, .. } => exits.push((u64::from(port), data.to_vec())),
            VmExit::MmioWrite { addr, data } => exits.push((addr, data.to_vec())),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(
        exits,
        vec![(0x500, vec![8])],
        "only the unmatched write exits"
    );
    assert_eq!(pio.read().unwrap(), 1);
    assert_eq!(mmio.read().unwrap(), 1);

    // Deregistered: the write exits to userspace again.
    g.vm.deregister_ioeventfd(&pio, IoEventAddress::Pio(0x500), DataMatch::U8(7))
        .unwrap();
    let mut g2 = TestGuest::new(|a| {
        a.mov(dx, 0x500u32).unwrap();
        a.mov(al, 7u32).unwrap();
        a.out(dx, al).unwrap();
        a.out(DONE as u32, al).unwrap();
    });
    let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g2.vm
        .register_ioeventfd(&fd, IoEventAddress::Pio(0x500), DataMatch::U8(7))
        .unwrap();
    g2.vm
        .deregister_ioeventfd(&fd, IoEventAddress::Pio(0x500), DataMatch::U8(7))
        .unwrap();
    let exit = g2.vcpu.run().unwrap();
    assert!(
        matches!(exit, VmExit::IoOut { port: 0x500, .. }),
        "{exit:?}"
    );
    assert!(fd.read().is_err(), "deregistered eventfd must stay quiet");
}

const IDT: u64 = 0x8000;
const HANDLER: u64 = 0x9000;
const VECTOR: u64 = 0x30;

#[test]
fn irqfd_msi_reaches_guest_idt_handler() {
    let mut g = TestGuest::new(|a| {
        // IDTR image at 0x7ff0: limit, base.
        a.mov(rax, 0x7ff0u64).unwrap();
        a.mov(word_ptr(rax), (256 * 16 - 1) as u32).unwrap();
        a.mov(qword_ptr(rax + 2), IDT as i32).unwrap();
        a.lidt(ptr(rax)).unwrap();
        // Software-enable the local APIC (spurious vector register).
        a.mov(rbx, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap();
        a.out(0x10u32, al).unwrap(); // ready
        let mut idle = a.create_label();
        a.set_label(&mut idle).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.jmp(idle).unwrap();
    });
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(al, VECTOR as u32).unwrap();
    h.out(0x11u32, al).unwrap();
    h.mov(rbx, 0xfee0_0000u64).unwrap();
    h.mov(dword_ptr(rbx + 0xb0), 0u32).unwrap(); // EOI
    h.iretq().unwrap();
    g.write(HANDLER, &h.assemble(HANDLER).unwrap());
    let gate = (HANDLER & 0xffff) | (8 << 16) | (0x8e << 40) | (((HANDLER >> 16) & 0xffff) << 48);
    g.write(IDT + VECTOR * 16, &gate.to_le_bytes());
    g.write(IDT + VECTOR * 16 + 8, &(HANDLER >> 32).to_le_bytes());

    let routes = [GsiRoute::Msi {
        gsi: 24,
        addr: 0xfee0_0000,
        data: VECTOR as u32,
    }];
    g.vm.set_gsi_routing(&routes).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.vm.register_irqfd(&irq, 24).unwrap();

    let mut handled = 0;
    for _ in 0..100 {
        match g.vcpu.run().unwrap() {
            VmExit::IoOut { port: 0x10, .. } => irq.write(1).unwrap(),
            VmExit::IoOut {
                port: 0x11, data, ..
            } => {
                assert_eq!(data, &[VECTOR as u8]);
                handled += 1;
                if handled == 2 {
                    break;
                }
                irq.write(1).unwrap();
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(handled, 2, "both injected interrupts reach the handler");
    g.vm.deregister_irqfd(&irq, 24).unwrap();
}
