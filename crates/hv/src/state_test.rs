use iced_x86::code_asm::*;

use crate::VmExit;
use crate::testing::TestGuest;

use super::*;

#[test]
fn a_vcpu_state_survives_a_json_round_trip_into_a_fresh_vm_and_runs_on() {
    // Loads registers, stops at an `out`, then (after the restore) reports rbx + rcx.
    let build = |a: &mut CodeAssembler| {
        a.mov(rbx, 0x1111_0000u64).unwrap();
        a.mov(rcx, 0x0000_2222u64).unwrap();
        a.out(0x80u32, al).unwrap(); // snapshot point
        a.add(rbx, rcx).unwrap();
        a.mov(rax, rbx).unwrap();
        a.mov(dx, 0x90u32).unwrap();
        a.out(dx, eax).unwrap();
        a.hlt().unwrap();
    };
    let mut g = TestGuest::new(build);
    match g.vcpu.run().unwrap() {
        VmExit::IoOut { port: 0x80, .. } => {}
        other => panic!("unexpected exit {other:?}"),
    }
    let msrs = g.kvm.msrs_to_save().unwrap();
    let saved = g.vcpu.save_state(&msrs).unwrap();
    let vm_state = g.vm.save_state().unwrap();
    assert!(!saved.msrs.is_empty());
    let text = serde_json::to_string(&saved).unwrap();
    let back: VcpuState = serde_json::from_str(&text).unwrap();
    let vm_back: VmState =
        serde_json::from_str(&serde_json::to_string(&vm_state).unwrap()).unwrap();
    // A fresh VM with the same memory contents (the same program) and the saved state.
    let mut h = TestGuest::new(build);
    h.vm.restore_state(&vm_back).unwrap();
    h.vcpu.restore_state(&h.kvm, &back).unwrap();
    assert_eq!(
        h.vcpu.control_regs().unwrap(),
        g.vcpu.control_regs().unwrap(),
        "CR0, CR2, CR3, CR4"
    );
    match h.vcpu.run().unwrap() {
        VmExit::IoOut {
            port: 0x90, data, ..
        } => {
            assert_eq!(u32::from_le_bytes(data.try_into().unwrap()), 0x1111_2222);
        }
        other => panic!("the restored vCPU did not continue: {other:?}"),
    }
}

#[test]
fn state_for_another_vcpu_is_refused() {
    let g = TestGuest::new(|a| a.hlt().unwrap());
    let mut s = g.vcpu.save_state(&g.kvm.msrs_to_save().unwrap()).unwrap();
    s.id = 7;
    let e = g.vcpu.restore_state(&g.kvm, &s).unwrap_err().to_string();
    assert!(e.contains("vCPU 7"), "{e}");
}
