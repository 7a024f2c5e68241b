use iced_x86::code_asm::*;

use crate::testing::{CODE, TestGuest};
use crate::{VmExit, parse_cpu_features};

/// Port the test guests write to when they are done.
const DONE: u16 = 0xf4;

/// Runs until the guest writes `DONE`, handing every other exit to `f`. Bounded: a guest that
/// never finishes fails the test instead of hanging it.
fn run_to_done(g: &mut TestGuest, mut f: impl FnMut(&mut VmExit)) {
    for _ in 0..1000 {
        let mut exit = g.vcpu.run().unwrap();
        if let VmExit::IoOut { port: DONE, .. } = exit {
            return;
        }
        if let VmExit::InternalError(e) = &exit {
            panic!("internal error: {}", e.describe());
        }
        f(&mut exit);
    }
    panic!("guest did not finish within 1000 exits");
}

#[test]
fn pio_exits_carry_port_size_and_data() {
    let mut g = TestGuest::new(|a| {
        a.mov(dx, 0x3f8u32).unwrap();
        a.mov(al, 0x42u32).unwrap();
        a.out(dx, al).unwrap();
        a.mov(dx, 0x70u32).unwrap();
        a.mov(eax, 0xdead_beefu32).unwrap();
        a.out(dx, eax).unwrap();
        a.mov(dx, 0x71u32).unwrap();
        a.in_(ax, dx).unwrap();
        // Echo what was read to port 0x72 so the test sees the guest got it.
        a.mov(dx, 0x72u32).unwrap();
        a.out(dx, ax).unwrap();
        a.out(DONE as u32, al).unwrap();
    });
    let mut seen = Vec::new();
    run_to_done(&mut g, |exit| match exit {
        VmExit::IoOut { port, size, data } => seen.push((*port, *size, data.to_vec())),
        VmExit::IoIn { port, size, data } => {
            assert_eq!((*port, *size, data.len()), (0x71, 2, 2));
            data.copy_from_slice(&0x1234u16.to_le_bytes());
        }
        other => panic!("unexpected exit {other:?}"),
    });
    assert_eq!(
        seen,
        vec![
            (0x3f8, 1, vec![0x42]),
            (0x70, 4, 0xdead_beefu32.to_le_bytes().to_vec()),
            (0x72, 2, vec![0x34, 0x12]),
        ]
    );
}

#[test]
fn mmio_exits_carry_address_and_data() {
    let mut g = TestGuest::new(|a| {
        a.mov(rbx, 0xd000_0000u64).unwrap();
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.mov(qword_ptr(rbx + 8), rax).unwrap();
        a.mov(ecx, dword_ptr(rbx + 0x10)).unwrap();
        a.mov(dword_ptr(rbx + 0x20), ecx).unwrap();
        a.out(DONE as u32, al).unwrap();
    });
    let mut writes = Vec::new();
    run_to_done(&mut g, |exit| match exit {
        VmExit::MmioWrite { addr, data } => writes.push((*addr, data.to_vec())),
        VmExit::MmioRead { addr, data } => {
            assert_eq!((*addr, data.len()), (0xd000_0010, 4));
            data.copy_from_slice(&0xcafe_f00du32.to_le_bytes());
        }
        other => panic!("unexpected exit {other:?}"),
    });
    assert_eq!(
        writes,
        vec![
            (0xd000_0008, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()),
            (0xd000_0020, 0xcafe_f00du32.to_le_bytes().to_vec()),
        ]
    );
}

#[test]
fn cpuid_table_set_is_what_kvm_holds_and_guest_reads_kvm_signature() {
    let mut g = TestGuest::new(|a| {
        a.mov(eax, 0x4000_0000u32).unwrap();
        a.cpuid().unwrap();
        a.mov(esi, edx).unwrap();
        a.mov(dx, 0x80u32).unwrap();
        a.out(dx, eax).unwrap();
        a.mov(eax, ebx).unwrap();
        a.out(dx, eax).unwrap();
        a.mov(eax, ecx).unwrap();
        a.out(dx, eax).unwrap();
        a.mov(eax, esi).unwrap();
        a.out(dx, eax).unwrap();
        a.out(DONE as u32, al).unwrap();
    });
    let mut table = g.kvm.supported_cpuid().unwrap().for_vcpu(0, 1);
    table.apply_edits(&parse_cpu_features("-cx16").unwrap());
    g.vcpu.set_cpuid(&table).unwrap();
    let held = g.vcpu.cpuid().unwrap();
    // PVM (software KVM) replaces leaf 1 ECX and leaves 7 and 0xD with the host's values; on
    // hardware KVM the table must come back exactly as set.
    let pvm_owned = |e: &mut crate::CpuidEntry| {
        if !crate::kvm_is_hardware_backed() {
            match e.function {
                1 => e.ecx = 0,
                7 | 0xd => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
                _ => {}
            }
        }
    };
    let mut want = table.entries().to_vec();
    let mut got = held.entries().to_vec();
    want.iter_mut().for_each(pvm_owned);
    got.iter_mut().for_each(pvm_owned);
    let key = |e: &crate::CpuidEntry| (e.function, e.index);
    want.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, want);
    if crate::kvm_is_hardware_backed() {
        assert_eq!(held.get(1, 0).unwrap().ecx & (1 << 13), 0, "cx16 removed");
    }
    // Per-vCPU edits PVM honours: APIC ID in leaf 1 EBX and the topology leaf.
    assert_eq!(held.get(1, 0).unwrap().ebx, table.get(1, 0).unwrap().ebx);

    let mut words = Vec::new();
    run_to_done(&mut g, |exit| match exit {
        VmExit::IoOut {
            port: 0x80, data, ..
        } => words.push(u32::from_le_bytes((*data).try_into().unwrap())),
        other => panic!("unexpected exit {other:?}"),
    });
    assert_eq!(words.len(), 4);
    assert!(
        words[0] >= 0x4000_0001,
        "max hypervisor leaf {:#x}",
        words[0]
    );
    let sig: Vec<u8> = words[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
}

#[test]
fn kick_interrupts_a_spinning_vcpu() {
    crate::install_kick_signal_handler();
    let mut g = TestGuest::new(|a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.pause().unwrap();
        a.jmp(spin).unwrap();
    });
    // SAFETY: the thread that uses the kicker is joined before this test ends.
    let kicker = unsafe { crate::VcpuKicker::for_current_thread() };
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        kicker.kick();
    });
    let exit = g.vcpu.run().unwrap();
    assert!(matches!(exit, VmExit::Interrupted), "{exit:?}");
    t.join().unwrap();
    let regs = g.vcpu.regs().unwrap();
    assert!(
        regs.rip >= CODE && regs.rip < CODE + 16,
        "rip {:#x}",
        regs.rip
    );
}

#[test]
fn emulation_failure_bytes_follow_the_size_byte() {
    // flags = 1 (instruction bytes present); size 3; bytes 0f c7 0f (cmpxchg16b [rdi]).
    let e = crate::InternalError {
        suberror: 1,
        data: vec![
            1,
            u64::from_le_bytes([3, 0x48, 0x0f, 0xc7, 0x0f, 0x90, 0x90, 0x90]),
            0,
        ],
    };
    assert_eq!(e.insn_bytes().unwrap(), vec![0x48, 0x0f, 0xc7]);
    assert!(e.describe().contains("[48 0f c7]"), "{}", e.describe());
    let no_bytes = crate::InternalError {
        suberror: 1,
        data: vec![0, 0, 0],
    };
    assert_eq!(no_bytes.insn_bytes(), None);
}

#[test]
fn a_vcpu_dropped_on_another_thread_leaves_no_dangling_kick_target() {
    crate::install_kick_signal_handler();
    let g = TestGuest::new(|a| {
        a.hlt().unwrap();
    });
    let TestGuest {
        mut vcpu, vm, kvm, ..
    } = g;
    // Bound here (as `run` does), then dropped on another thread: its kvm_run mapping goes.
    vcpu.bind_kick_to_current_thread();
    std::thread::spawn(move || drop(vcpu)).join().unwrap();
    // A kick of this thread now must not write into the unmapped kvm_run (before the fix it
    // did: SIGSEGV, or a write into whatever was mapped there since).
    // SAFETY: the kicker is used on this thread only, while it runs.
    let kicker = unsafe { crate::VcpuKicker::for_current_thread() };
    for _ in 0..100 {
        kicker.kick();
    }
    // A vCPU bound afterwards still gets kicks: a fresh VM with a spinning guest.
    drop((vm, kvm));
    let mut g = TestGuest::new(|a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.pause().unwrap();
        a.jmp(spin).unwrap();
    });
    g.vcpu.bind_kick_to_current_thread();
    kicker.kick();
    assert!(matches!(g.vcpu.run().unwrap(), VmExit::Interrupted));
}

#[test]
fn a_vcpu_thread_can_be_kicked_until_joined() {
    crate::install_kick_signal_handler();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = crate::VcpuThread::spawn("vcpu-test".into(), move || {
        let mut g = TestGuest::new(|a| {
            let mut spin = a.create_label();
            a.set_label(&mut spin).unwrap();
            a.pause().unwrap();
            a.jmp(spin).unwrap();
        });
        tx.send(()).unwrap();
        matches!(g.vcpu.run(), Ok(VmExit::Interrupted))
    })
    .unwrap();
    rx.recv().unwrap();
    // Kick until the run returns (the first kick may land just before KVM_RUN; the binding
    // makes that run return at once, and a later kick covers a miss).
    while !t.is_finished() {
        t.kick();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        t.join().unwrap(),
        "the run ended otherwise than by the kick"
    );
}
