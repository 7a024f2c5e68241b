//! Loading Linux (bzImage or ELF vmlinux) with the 64-bit boot protocol or PVH.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use alioth_arch::{BootCpuState, CpuMode};
use alioth_mem::layout::HIGH_RAM_START;
use alioth_mem::{E820Entry, E820Kind, RamBus};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::acpi::{AcpiConfig, write_acpi_tables};
use crate::x86::{
    BOOT_STACK, CMDLINE_ADDR, CMDLINE_MAX, CODE_INDEX, DATA_INDEX, GDT_ADDR, IDT_ADDR, PML4_ADDR,
    PVH_INFO_ADDR, TSS_INDEX, gdt, write_gdt, write_identity_page_tables,
};
use crate::{BootProtocol, BootedKernel, Error, KernelFormat, KernelSpec, Result, detect_format};

/// Where the zero page (`struct boot_params`) goes for the Linux 64-bit boot protocol.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;

/// `type_of_loader` value for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `xloadflags` bit: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// x86 `COMMAND_LINE_SIZE`, for images that do not state theirs (ELF).
const DEFAULT_CMDLINE_SIZE: u32 = 2048;
/// The kernel's default `initrd_addr_max` when the image does not state it.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PVH_MEMMAP_ADDR: u64 = PVH_INFO_ADDR + 0x40;
const PVH_MODLIST_ADDR: u64 = PVH_INFO_ADDR + 0x400;

/// What the image told us before the boot structures are written.
struct Loaded {
    format: KernelFormat,
    protocol: BootProtocol,
    entry: u64,
    start: u64,
    end: u64,
    cmdline_size: u32,
    initrd_addr_max: u64,
    header: Option<setup_header>,
}

fn bad_kernel(path: &Path, reason: impl ToString) -> Error {
    Error::BadKernel {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The end of the highest PT_LOAD segment of an ELF image (by physical address), read with
/// checked arithmetic so a malformed file gives an error rather than a wrap.
fn elf_load_end(path: &Path, f: &mut File) -> Result<u64> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.read_exact(&mut eh)
        .map_err(|_| bad_kernel(path, "truncated ELF header"))?;
    if eh[4] != 2 || eh[5] != 1 {
        return Err(bad_kernel(path, "not a 64-bit little-endian ELF"));
    }
    if u16::from_le_bytes([eh[18], eh[19]]) != 62 {
        return Err(bad_kernel(path, "not an x86-64 ELF"));
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]);
    let phnum = u16::from_le_bytes([eh[56], eh[57]]);
    if phentsize != 56 || phnum == 0 {
        return Err(bad_kernel(path, "bad program header table"));
    }
    f.seek(SeekFrom::Start(phoff))
        .map_err(|_| bad_kernel(path, "program headers out of file"))?;
    let mut end = 0u64;
    for _ in 0..phnum {
        let mut ph = [0u8; 56];
        f.read_exact(&mut ph)
            .map_err(|_| bad_kernel(path, "truncated program headers"))?;
        if u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default()) != 1 {
            continue; // not PT_LOAD
        }
        let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
        let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad_kernel(path, "segment wraps the address space"))?;
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(bad_kernel(path, "no loadable segment"));
    }
    Ok(end)
}

fn load_image(mem: &GuestMemoryMmap, spec: &KernelSpec, low_end: u64) -> Result<Loaded> {
    let path = spec.kernel.as_path();
    let format = detect_format(path)?;
    let mut f = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let too_large = |needed| Error::KernelTooLarge {
        path: path.to_path_buf(),
        needed,
        available: low_end,
    };
    match format {
        KernelFormat::BzImage => {
            if spec.protocol == BootProtocol::Pvh {
                return Err(Error::NoPvhNote {
                    path: path.to_path_buf(),
                });
            }
            let hdr = read_setup_header(path)?;
            let needed = decompress_end(&hdr);
            if needed > low_end {
                return Err(too_large(needed));
            }
            let res = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(|e| bad_kernel(path, e))?;
            let hdr = res.setup_header.unwrap_or(hdr);
            Ok(Loaded {
                format,
                protocol: BootProtocol::Linux64,
                entry: res.kernel_load.0 + 0x200,
                start: res.kernel_load.0,
                end: res.kernel_end.max(needed),
                cmdline_size: hdr.cmdline_size,
                initrd_addr_max: u64::from(hdr.initrd_addr_max),
                header: Some(hdr),
            })
        }
        KernelFormat::Elf => {
            let end = elf_load_end(path, &mut f)?;
            if end > low_end {
                return Err(too_large(end));
            }
            let res = Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(|e| bad_kernel(path, e))?;
            let pvh = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            let (protocol, entry) = match (spec.protocol, pvh) {
                (BootProtocol::Linux64, _) | (BootProtocol::Auto, None) => {
                    (BootProtocol::Linux64, res.kernel_load.0)
                }
                (BootProtocol::Pvh | BootProtocol::Auto, Some(e)) => (BootProtocol::Pvh, e),
                (BootProtocol::Pvh, None) => {
                    return Err(Error::NoPvhNote {
                        path: path.to_path_buf(),
                    });
                }
            };
            Ok(Loaded {
                format,
                protocol,
                entry,
                start: res.kernel_load.0.min(end),
                end,
                cmdline_size: DEFAULT_CMDLINE_SIZE,
                initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
                header: None,
            })
        }
    }
}

/// The end of the memory a bzImage's decompressor uses: a relocatable kernel runs (and
/// decompresses) at its load address rounded up to `kernel_alignment`, but never below
/// `pref_address`; it needs `init_size` bytes from there.
fn decompress_end(hdr: &linux_loader::loader::bootparam::setup_header) -> u64 {
    let load = u64::from(hdr.code32_start);
    let init_size = u64::from(hdr.init_size);
    let relocatable = hdr.relocatable_kernel != 0;
    let version = hdr.version;
    let base = if relocatable {
        let align = u64::from(hdr.kernel_alignment).max(1);
        let aligned = load.div_ceil(align).saturating_mul(align);
        // pref_address exists from protocol 2.10 on.
        let pref = if version >= 0x020a {
            hdr.pref_address
        } else {
            0
        };
        aligned.max(pref)
    } else {
        load
    };
    base.saturating_add(init_size)
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: u32) -> Result<()> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::Cmdline("contains a NUL byte".into()));
    }
    let limit = (max as usize).min(CMDLINE_MAX);
    // The size limit counts the terminating NUL.
    if cmdline.len() + 1 > limit {
        return Err(Error::Cmdline(format!(
            "{} bytes is longer than the kernel accepts ({} including the NUL)",
            cmdline.len(),
            limit
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| Error::GuestMemory {
            what: "command line",
            addr: CMDLINE_ADDR,
        })
}

/// Places the initramfs as high as allowed: below both `limit` and the end of low RAM, above the
/// kernel, page-aligned.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
    low_end: u64,
) -> Result<(u64, u64)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let top = limit.saturating_add(1).min(low_end);
    let bottom = (kernel_end + 0xfff) & !0xfff;
    let available = top.saturating_sub(bottom);
    if size > available {
        return Err(Error::InitramfsTooLarge {
            path: path.to_path_buf(),
            size,
            available,
            limit: top,
        });
    }
    let addr = (top - size) & !0xfff;
    let len = usize::try_from(size).map_err(|_| Error::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        available,
        limit: top,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Loads the kernel, command line and initramfs of `spec` into `ram`, writes the ACPI tables of
/// `acpi` and the boot structures of the chosen protocol, and returns the boot vCPU's state.
pub fn load_kernel(ram: &RamBus, spec: &KernelSpec, acpi: &AcpiConfig) -> Result<BootedKernel> {
    let mem = ram.memory();
    let map = ram.map();
    let low_end = map.ram_regions().first().map(|(a, s)| a + s).unwrap_or(0);

    let img = load_image(mem, spec, low_end)?;
    write_cmdline(mem, &spec.cmdline, img.cmdline_size)?;
    let initramfs = match &spec.initramfs {
        Some(p) => Some(load_initramfs(
            mem,
            p,
            img.end,
            img.initrd_addr_max,
            low_end,
        )?),
        None => None,
    };
    let rsdp_addr = write_acpi_tables(mem, acpi)?;

    // Protocol-specific structures, and (mode, rsp, rsi, rbx, cr3) for the entry.
    let (mode, rsp, rsi, rbx, cr3) = match img.protocol {
        BootProtocol::Pvh => {
            write_pvh_info(ram, initramfs, rsdp_addr)?;
            (CpuMode::Protected32, 0, 0, PVH_INFO_ADDR, 0)
        }
        _ => {
            write_zero_page(ram, img.header, initramfs, rsdp_addr)?;
            write_identity_page_tables(mem)?;
            (CpuMode::Long64, BOOT_STACK, ZERO_PAGE_ADDR, 0, PML4_ADDR)
        }
    };
    let gdt = gdt(mode);
    write_gdt(mem, &gdt)?;
    let cpu = BootCpuState {
        mode,
        rip: img.entry,
        rsp,
        rsi,
        rbx,
        cr3,
        gdt_addr: GDT_ADDR,
        gdt,
        idt_addr: IDT_ADDR,
        code_index: CODE_INDEX,
        data_index: DATA_INDEX,
        tss_index: TSS_INDEX,
    };
    Ok(BootedKernel {
        cpu,
        format: img.format,
        protocol: img.protocol,
        kernel_range: (img.start, img.end),
        initramfs,
        rsdp_addr,
    })
}

/// Reads and checks a bzImage's setup header: boot protocol 2.06 or later with a 64-bit entry
/// point.
pub fn read_setup_header(path: &Path) -> Result<setup_header> {
    let mut f = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hdr = setup_header::default();
    f.seek(SeekFrom::Start(0x1f1))
        .and_then(|_| f.read_exact(hdr.as_mut_slice()))
        .map_err(|_| bad_kernel(path, "truncated setup header"))?;
    let (flag, magic, version) = (hdr.boot_flag, hdr.header, hdr.version);
    if flag != 0xaa55 || magic != 0x5372_6448 {
        return Err(bad_kernel(
            path,
            "no bzImage setup header (boot flag or HdrS missing)",
        ));
    }
    if version < 0x0206 {
        return Err(bad_kernel(
            path,
            format!("boot protocol {version:#x} is older than 2.06"),
        ));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad_kernel(path, "bzImage has no 64-bit entry point"));
    }
    // The image is the real-mode setup (setup_sects + 1 sectors; 0 means 4) followed by the
    // protected-mode part of syssize 16-byte paragraphs. A shorter file is truncated.
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let (syssize, len) = (
        hdr.syssize,
        f.metadata()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len(),
    );
    let need = (setup_sects + 1) * 512 + u64::from(syssize) * 16;
    if syssize == 0 || len < need {
        return Err(bad_kernel(
            path,
            format!(
                "truncated bzImage: the setup header describes {need} bytes ({setup_sects} setup sectors, syssize {syssize}) but the file has {len}"
            ),
        ));
    }
    Ok(hdr)
}

/// Builds the zero page (`struct boot_params`) of the Linux 64-bit boot protocol: the image's
/// setup `header` (a minimal one for an ELF vmlinux), the command line at its fixed address,
/// the initramfs (address, size), the ACPI RSDP and the `e820` map. Writes nothing anywhere:
/// the caller places it (at [`ZERO_PAGE_ADDR`] for [`load_kernel`]).
pub fn zero_page(
    header: Option<&setup_header>,
    e820: &[E820Entry],
    initramfs: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> boot_params {
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = *h,
        None => {
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.version = 0x020f;
            params.hdr.kernel_alignment = 0x100_0000;
            params.hdr.cmdline_size = DEFAULT_CMDLINE_SIZE;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

fn write_zero_page(
    ram: &RamBus,
    header: Option<setup_header>,
    initramfs: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> Result<()> {
    let params = zero_page(header.as_ref(), &ram.map().e820(), initramfs, rsdp_addr);
    ram.memory()
        .write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| Error::GuestMemory {
            what: "zero page",
            addr: ZERO_PAGE_ADDR,
        })
}

fn write_pvh_info(ram: &RamBus, initramfs: Option<(u64, u64)>, rsdp_addr: u64) -> Result<()> {
    let mem = ram.memory();
    let gm = |what, addr| Error::GuestMemory { what, addr };
    let e820 = ram.map().e820();
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: match e.kind {
                E820Kind::Ram => 1,
                E820Kind::Reserved => 2,
            },
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + i as u64 * std::mem::size_of_val(&entry) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|_| gm("PVH memory map", at))?;
    }
    let mut info = hvm_start_info {
        magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|_| gm("PVH module list", PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|_| gm("PVH start_info", PVH_INFO_ADDR))
}

#[cfg(test)]
#[path = "linux_test.rs"]
mod tests;
