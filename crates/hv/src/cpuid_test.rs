use super::*;

fn table() -> Cpuid {
    Cpuid::from_entries(vec![
        CpuidEntry {
            function: 1,
            ebx: 0x0001_0800,
            ecx: (1 << 26) | (1 << 28) | (1 << 13) | (1 << 23),
            edx: 1,
            ..Default::default()
        },
        CpuidEntry {
            function: 7,
            indexed: true,
            ebx: 1 << 5,
            ..Default::default()
        },
        CpuidEntry {
            function: 0xb,
            index: 1,
            indexed: true,
            ..Default::default()
        },
        CpuidEntry {
            function: 0xd,
            indexed: true,
            eax: 7,
            ..Default::default()
        },
    ])
}

#[test]
fn removing_xsave_also_removes_avx_and_state_leaf() {
    let mut t = table();
    t.apply_edits(&parse_cpu_features("-xsave").unwrap());
    let l1 = t.get(1, 0).unwrap();
    assert_eq!(l1.ecx & (1 << 26), 0);
    assert_eq!(l1.ecx & (1 << 28), 0, "avx must go with xsave");
    assert_ne!(l1.ecx & (1 << 13), 0, "cx16 untouched");
    assert_eq!(
        t.get(7, 0).unwrap().ebx & (1 << 5),
        0,
        "avx2 must go with xsave"
    );
    assert_eq!(t.get(0xd, 0).unwrap().eax, 0);
}

#[test]
fn feature_list_parses_removals_and_rejects_unknown_names() {
    let edits = parse_cpu_features("-cx16, -popcnt").unwrap();
    assert_eq!(edits.len(), 2);
    let mut t = table();
    t.apply_edits(&edits);
    assert_eq!(t.get(1, 0).unwrap().ecx & ((1 << 13) | (1 << 23)), 0);
    let err = parse_cpu_features("-nosuchfeature").unwrap_err();
    assert!(err.to_string().contains("nosuchfeature"), "{err}");
    let err = parse_cpu_features("xsave").unwrap_err();
    assert!(err.to_string().contains("-name"), "{err}");
    assert!(parse_cpu_features("").unwrap().is_empty());
}

#[test]
fn per_vcpu_table_carries_apic_id_and_topology() {
    let t = table().for_vcpu(3, 4);
    let l1 = t.get(1, 0).unwrap();
    assert_eq!(l1.ebx >> 24, 3);
    assert_eq!((l1.ebx >> 16) & 0xff, 4);
    assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
    let core = t.get(0xb, 1).unwrap();
    assert_eq!(core.edx, 3);
    assert_eq!(core.ebx, 4);
    assert_eq!(core.eax, 2);
    let sig = t.get(0x4000_0000, 0).unwrap();
    assert_eq!(sig.ebx.to_le_bytes(), *b"KVMK");
}

#[test]
fn supported_cpuid_is_asked_once_and_callers_edit_their_own_copy() {
    let kvm = crate::Kvm::new().unwrap();
    let mut edited = kvm.supported_cpuid().unwrap();
    edited.apply_edits(&parse_cpu_features("-cx16,-xsave").unwrap());
    let fresh = crate::Kvm::new().unwrap().supported_cpuid().unwrap();
    assert_ne!(edited, fresh, "the edit changed the caller's copy");
    assert_eq!(
        kvm.supported_cpuid().unwrap(),
        fresh,
        "the kept answer is KVM's, not the caller's edited copy"
    );
}
