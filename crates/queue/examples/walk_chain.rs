//! Walks a descriptor chain that a test driver laid out in guest memory, using `alioth-queue`
//! alone (and vm-memory): the device side of a split and of a packed ring, including a chain
//! through an indirect table and a hostile, cyclic chain that is refused.
//!
//! ```sh
//! cargo run -p alioth-queue --example walk_chain
//! ```

use alioth_queue::testing::TestDriver;
use alioth_queue::{
    DESC_F_NEXT, QueueError, QueueFormat, VIRTIO_F_INDIRECT_DESC, VirtQueue, new_queue,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn main() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    for format in [QueueFormat::Split, QueueFormat::Packed] {
        let mut driver = TestDriver::new(&mem, format, 16, 0x10_0000, 1 << VIRTIO_F_INDIRECT_DESC);
        let mut q = new_queue(16, driver.config(), driver.features(), &mem).unwrap();
        // A request: a header and a payload to read, room for a reply and a status byte.
        let id = driver.add(&[b"GET ", b"/index"], &[32, 1]).unwrap();
        let chain = q.pop(&mem).unwrap().expect("one chain");
        println!(
            "{format:?}: chain {} with {} readable buffers ({} bytes), {} writable ({} bytes)",
            chain.id(),
            chain.readable.len(),
            chain.readable_len(),
            chain.writable.len(),
            chain.writable_len()
        );
        for iov in chain.readable.iter().chain(&chain.writable) {
            println!("  buffer at guest {:#x}, {} bytes", iov.gpa(), iov.len());
        }
        let mut req = vec![0; chain.readable_len() as usize];
        chain.read_at(&mem, 0, &mut req).unwrap();
        assert_eq!(req, b"GET /index");
        let n = chain.write_at(&mem, 0, b"200 OK").unwrap() as u32;
        q.push_used(&mem, &chain, n).unwrap();
        assert_eq!(driver.used(), Some((id, n)));
        assert_eq!(driver.written(id), b"200 OK");
    }

    // A hostile split ring: descriptor 0 -> 1 -> 0 never ends. The walk is bounded.
    let mut driver = TestDriver::new(&mem, QueueFormat::Split, 4, 0x20_0000, 0);
    let mut q = new_queue(4, driver.config(), driver.features(), &mem).unwrap();
    let buf = driver.alloc(64);
    driver.split_raw(
        &[(0, buf, 64, DESC_F_NEXT, 1), (1, buf, 64, DESC_F_NEXT, 0)],
        0,
    );
    let err = q.pop(&mem).unwrap_err();
    println!("cyclic chain: {err}");
    assert_eq!(err, QueueError::TooLong { head: 0 });
}
