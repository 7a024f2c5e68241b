//! Builds the Linux zero page (`struct boot_params`) for a bzImage into a plain byte buffer,
//! with `alioth-boot` and `alioth-mem`'s memory map alone: no guest memory, no KVM.
//!
//! ```sh
//! cargo xtask guest   # fetches Debian's kernel into target/guest/
//! cargo run -p alioth-boot --example zero_page -- target/guest/vmlinuz 256M
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use alioth_boot::{ZERO_PAGE_ADDR, read_setup_header, zero_page};
use alioth_mem::MemoryMap;
use vm_memory::ByteValued;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next().map(PathBuf::from) else {
        eprintln!("usage: zero_page BZIMAGE [MEMORY_MIB]");
        return ExitCode::from(2);
    };
    let mib: u64 = match args
        .next()
        .as_deref()
        .map(|s| s.trim_end_matches('M').parse())
    {
        None => 256,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("memory size: {e}");
            return ExitCode::from(2);
        }
    };
    let header = match read_setup_header(&kernel) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let map = match MemoryMap::new(mib << 20) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let params = zero_page(Some(&header), &map.e820(), None, 0xe_0000);
    // The plain buffer a VMM would copy to guest-physical ZERO_PAGE_ADDR.
    let buf: Vec<u8> = params.as_slice().to_vec();

    let hdr = params.hdr;
    let (version, init_size, cmd_line_ptr) = (hdr.version, hdr.init_size, hdr.cmd_line_ptr);
    println!(
        "{}: boot protocol {}.{:02}, init_size {init_size:#x}",
        kernel.display(),
        version >> 8,
        version & 0xff
    );
    println!(
        "zero page: {} bytes for {ZERO_PAGE_ADDR:#x}, loader {:#x}, command line at {cmd_line_ptr:#x}",
        buf.len(),
        buf[0x210]
    );
    let entries = params.e820_entries;
    for e in params.e820_table.iter().take(usize::from(entries)) {
        let (addr, size, kind) = (e.addr, e.size, e.r#type);
        println!("  e820 {addr:#012x}-{:#012x} type {kind}", addr + size - 1);
    }
    assert_eq!(buf.len(), 4096);
    assert_eq!(&buf[0x202..0x206], b"HdrS");
    assert_eq!(usize::from(entries), map.e820().len());
    ExitCode::SUCCESS
}
