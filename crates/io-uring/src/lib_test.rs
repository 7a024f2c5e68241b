use io_uring::opcode;

use super::*;

fn submit_one(ring: &mut IoUring, sqe: squeue::Entry) -> i32 {
    // SAFETY: whatever the entry points at (a path) outlives this call, which waits for the
    // entry's completion.
    unsafe { ring.submission().push(&sqe.user_data(7)).unwrap() };
    ring.submit_and_wait(1).unwrap();
    ring.completion().next().unwrap().result()
}

#[test]
fn a_worker_ring_refuses_operations_it_does_not_use() {
    let mut ring = restricted_ring(8).unwrap();
    // A no-op is not on the list: the kernel refuses it with EACCES.
    assert_eq!(
        submit_one(&mut ring, opcode::Nop::new().build()),
        -libc::EACCES
    );
    // Nor is opening a file, which a compromised worker would want.
    let path = c"/etc/hostname";
    let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
    assert_eq!(submit_one(&mut ring, open), -libc::EACCES);
    // What the backend uses still works: cancelling nothing finds nothing.
    let cancel = opcode::AsyncCancel::new(12345).build();
    assert_eq!(submit_one(&mut ring, cancel), -libc::ENOENT);
    // And nothing more can be registered.
    let mut more = [Restriction::sqe_op(opcode::Nop::CODE)];
    assert!(ring.submitter().register_restrictions(&mut more).is_err());
}
