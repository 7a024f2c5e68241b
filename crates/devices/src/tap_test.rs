use super::*;

#[test]
fn names_and_queue_counts_are_checked_before_any_syscall() {
    let e = Tap::open("a-name-much-too-long", 1, false).unwrap_err();
    assert!(matches!(e, TapError::NameTooLong { .. }), "{e}");
    let e = Tap::open("tap0", 0, false).unwrap_err();
    assert!(e.to_string().contains("1 to 256"), "{e}");
    let e = Tap::open("tap0", MAX_QUEUES + 1, false).unwrap_err();
    assert!(matches!(e, TapError::Queues { .. }), "{e}");
}

#[test]
fn ifreq_carries_the_name_and_flags_where_the_kernel_reads_them() {
    assert_eq!(std::mem::size_of::<IfReq>(), 40);
    let r = IfReq::new("alioth%d", IFF_TAP);
    assert_eq!(r.name(), "alioth%d");
    assert_eq!(r.flags, IFF_TAP);
}

#[test]
fn descriptors_that_are_not_a_tap_take_no_tap_ioctls() {
    let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let tap = Tap::from_fds("fds", vec![a.into()]);
    assert!(!tap.offloads_supported());
    tap.set_offload(offload::CSUM).unwrap();
    tap.set_queue_attached(0, false).unwrap();
    assert_eq!(tap.queues(), 1);
}
