//! `cargo xtask guest`: the real-kernel test guest.
//!
//! Resolves the current Debian cloud kernel (`linux-image-cloud-amd64`'s dependency), downloads
//! it and `busybox-static` with `apt-get download`, and writes to `target/guest/`:
//! - `vmlinuz`: the bzImage as shipped;
//! - `vmlinux`: the uncompressed ELF kernel (Debian compresses the payload with LZ4);
//! - `initramfs.cpio`: busybox with an `/init` that loads the virtio modules, checks a virtio
//!   disk (`ALIOTH-BLK-OK`) and the virtio entropy source (`ALIOTH-RNG-OK`) when present,
//!   prints `ALIOTH-INIT-OK`, and powers off;
//! - `disk.img`: a blank 64 MiB raw disk;
//! - `kernel-version`: the version the artifacts come from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cpio::Cpio;
use crate::{output, run};

const META_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The marker `/init` prints once the modules are loaded.
pub const INIT_MARKER: &str = "ALIOTH-INIT-OK";
/// Modules `/init` loads (their dependencies are found from `.modinfo` and loaded first).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio-rng",
    "virtio_net",
    "virtio_console",
];
/// Modules loaded when the kernel package has them (a missing one is reported, not an error).
const OPTIONAL_MODULES: &[&str] = &["vmw_vsock_virtio_transport"];

/// The versioned kernel package the meta package currently depends on.
fn resolve_kernel_package() -> Result<String> {
    let depends = |refresh: bool| -> Result<Option<String>> {
        if refresh {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        let out = match output(Command::new("apt-cache").args(["depends", META_PACKAGE])) {
            Ok(o) => o,
            Err(_) => return Ok(None),
        };
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
            .map(str::to_string))
    };
    if let Some(p) = depends(false)? {
        return Ok(p);
    }
    eprintln!("xtask: {META_PACKAGE} is not in the apt lists; running apt-get update");
    depends(true)?.with_context(|| {
        format!("apt knows no {META_PACKAGE}; is this a Debian machine with main enabled?")
    })
}

/// Extracts the ELF vmlinux from a bzImage whose payload is LZ4 (legacy frame, `lz4 -l`).
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    let get = |off: usize, len: usize| {
        bz.get(off..off + len)
            .with_context(|| format!("bzImage truncated at {off:#x}"))
    };
    if get(0x202, 4)? != b"HdrS" {
        bail!("not a bzImage (no HdrS signature)");
    }
    let setup_sects = match get(0x1f1, 1)?[0] {
        0 => 4,
        n => usize::from(n),
    };
    let rd32 = |off| -> Result<usize> {
        let b = get(off, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let payload_offset = rd32(0x248)?;
    let payload_length = rd32(0x24c)?;
    let start = (setup_sects + 1) * 512 + payload_offset;
    let payload = get(start, payload_length)?;
    const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    if payload.get(..4) != Some(&LZ4_LEGACY_MAGIC) {
        let head: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        bail!(
            "kernel payload is not LZ4 (starts with {}); only Debian's LZ4 kernels are handled",
            head.join(" ")
        );
    }
    // The kernel's build appends the uncompressed size (4 bytes) after the LZ4 stream.
    let expected = {
        let t = payload
            .get(payload.len().saturating_sub(4)..)
            .context("payload too short")?;
        u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize
    };
    let mut out = Vec::with_capacity(expected);
    let mut pos = 4;
    const MAX_BLOCK: usize = 8 << 20;
    while pos + 4 <= payload.len() {
        let b = &payload[pos..pos + 4];
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len
            == LZ4_LEGACY_MAGIC
                .iter()
                .rev()
                .fold(0, |a, x| (a << 8) | *x as usize)
        {
            pos += 4; // a concatenated stream
            continue;
        }
        if pos + 4 + len > payload.len() || len == 0 {
            break; // the trailing size word
        }
        let block = &payload[pos + 4..pos + 4 + len];
        let mut buf = vec![0u8; MAX_BLOCK];
        let n = lz4_flex::block::decompress_into(block, &mut buf)
            .map_err(|e| anyhow::anyhow!("LZ4 block at {pos:#x}: {e}"))?;
        out.extend_from_slice(&buf[..n]);
        pos += 4 + len;
    }
    if out.len() != expected {
        bail!(
            "decompressed {} bytes, the kernel says {expected}",
            out.len()
        );
    }
    if !out.starts_with(b"\x7fELF") {
        bail!("decompressed payload is not an ELF");
    }
    Ok(out)
}

/// The `depends=` list of a module's `.modinfo`.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn find_modules(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                map.insert(stem.to_string(), p.clone());
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
                && (name.ends_with(".ko.xz") || name.ends_with(".ko.zst"))
            {
                bail!(
                    "{name}: compressed modules are not handled; this task expects Debian's \
                     uncompressed .ko files"
                );
            }
        }
    }
    Ok(map)
}

/// The modules to load, dependencies first.
fn module_order(all: &BTreeMap<String, PathBuf>) -> Result<Vec<(String, Vec<u8>)>> {
    fn visit(
        name: &str,
        all: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        // modinfo names use '_' where file names may use '-'.
        let key = all
            .keys()
            .find(|k| k.replace('-', "_") == name.replace('-', "_"))
            .with_context(|| format!("module {name} is not in the kernel package"))?
            .clone();
        if !seen.insert(key.clone()) {
            return Ok(());
        }
        let data = std::fs::read(&all[&key])?;
        for dep in module_depends(&data) {
            visit(&dep, all, seen, out)?;
        }
        out.push((key, data));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in MODULES {
        visit(m, all, &mut seen, &mut out)?;
    }
    for m in OPTIONAL_MODULES {
        if let Err(e) = visit(m, all, &mut seen, &mut out) {
            eprintln!("xtask: {e:#}; the guest goes without it");
        }
    }
    Ok(out)
}

/// Bumped whenever `init_script` changes.
const INIT_REVISION: u32 = 2;

fn init_script(modules: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /proc /sys /dev /tmp\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         /bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null\n\
         /bin/busybox --install -s /bin\n\
         echo \"ALIOTH-INIT-START $(uname -r)\"\n",
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/modules/{m}.ko || echo \"ALIOTH-MODULE-FAILED {m}\"\n"
        ));
    }
    // With console=hvc0 the rest goes to the virtio console (its module is loaded only now).
    s.push_str(
        "if grep -q console=hvc0 /proc/cmdline; then\n\
         \x20 for i in 1 2 3 4 5 6 7 8 9 10; do [ -c /dev/hvc0 ] && break; sleep 0.2; done\n\
         \x20 exec >/dev/hvc0 2>&1\n\
         \x20 echo ALIOTH-HVC-OK\n\
         fi\n",
    );
    // With a disk: write a marker, drop the cache, read it back; the host checks the image too.
    s.push_str(
        "for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done\n\
         if [ -b /dev/vda ]; then\n\
         \x20 echo ALIOTH-DISK-MARKER > /tmp/marker\n\
         \x20 dd if=/tmp/marker of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; sync\n\
         \x20 echo 3 > /proc/sys/vm/drop_caches\n\
         \x20 if dd if=/dev/vda bs=512 count=1 2>/dev/null | grep -q ALIOTH-DISK-MARKER; then\n\
         \x20   echo ALIOTH-BLK-OK; else echo ALIOTH-BLK-FAIL; fi\n\
         fi\n\
         grep -q virtio /sys/class/misc/hw_random/rng_current 2>/dev/null && echo ALIOTH-RNG-OK\n\
         ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport 2>/dev/null | grep -q virtio && echo ALIOTH-VSOCK-OK\n\
         if grep -q alioth.net=1 /proc/cmdline && [ -e /sys/class/net/eth0 ]; then\n\
         \x20 ip link set lo up; ip addr add 192.0.2.2/24 dev eth0; ip link set eth0 up\n\
         \x20 if ping -c 3 -W 2 192.0.2.1 >/dev/null 2>&1; then echo ALIOTH-NET-OK; else echo ALIOTH-NET-FAIL; fi\n\
         fi\n",
    );
    s.push_str(&format!(
        "echo \"ALIOTH-CMDLINE $(cat /proc/cmdline)\"\n\
         echo \"ALIOTH-CPUS $(grep -c ^processor /proc/cpuinfo)\"\n\
         echo \"ALIOTH-VIRTIO $(ls /sys/bus/virtio/devices 2>/dev/null | tr '\\n' ' ')\"\n\
         echo {INIT_MARKER}\n\
         poweroff -f\n"
    ));
    s
}

/// Builds the artifacts (once per kernel version) and returns their directory.
pub fn build(root: &Path) -> Result<PathBuf> {
    let out_dir = root.join("target/guest");
    let work = out_dir.join("work");
    let pkg = resolve_kernel_package()?;
    let version = pkg.trim_start_matches("linux-image-").to_string();
    let stamp = out_dir.join("kernel-version");
    // The stamp names the init script's revision too, so a changed script rebuilds.
    let stamp_text = format!("{version} init-{INIT_REVISION}");
    let want = ["vmlinuz", "vmlinux", "initramfs.cpio", "disk.img"];
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str())
        && want.iter().all(|f| out_dir.join(f).is_file())
    {
        eprintln!("xtask: guest artifacts for {version} are up to date");
        return Ok(out_dir);
    }
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    run(Command::new("apt-get")
        .current_dir(&work)
        .args(["download", "-q", &pkg, BUSYBOX_PACKAGE]))
    .context("apt-get download (run `apt-get update` first on a fresh machine)")?;
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    let extracted = work.join("root");
    for deb in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&extracted))?;
    }

    let vmlinuz_src = extracted.join(format!("boot/vmlinuz-{version}"));
    let bz = std::fs::read(&vmlinuz_src)
        .with_context(|| format!("reading {}", vmlinuz_src.display()))?;
    let vmlinux = extract_vmlinux(&bz).context("extracting vmlinux")?;

    let modules = find_modules(&extracted.join(format!("lib/modules/{version}")))?;
    let ordered = module_order(&modules)?;
    let busybox = std::fs::read(extracted.join("bin/busybox")).context("reading busybox")?;

    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    let names: Vec<String> = ordered.iter().map(|(n, _)| n.clone()).collect();
    for (name, data) in &ordered {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, data);
    }
    cpio.file("init", 0o755, init_script(&names).as_bytes());

    std::fs::write(out_dir.join("vmlinuz"), &bz)?;
    std::fs::write(out_dir.join("vmlinux"), &vmlinux)?;
    std::fs::write(out_dir.join("initramfs.cpio"), cpio.finish())?;
    // A blank 64 MiB raw disk for the example VM and the full-boot test.
    let disk = std::fs::File::create(out_dir.join("disk.img"))?;
    disk.set_len(64 << 20)?;
    std::fs::write(&stamp, &stamp_text)?;
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "xtask: built guest for {version}: vmlinux {} MiB, modules {}",
        vmlinux.len() >> 20,
        names.join(" ")
    );
    Ok(out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_are_parsed() {
        let ko = b"\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn non_lz4_payload_is_rejected_with_a_reason() {
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 1; // setup_sects: payload area starts at 0x400
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&16u32.to_le_bytes());
        bz[0x400..0x404].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x00]); // gzip
        let err = extract_vmlinux(&bz).unwrap_err().to_string();
        assert!(err.contains("not LZ4"), "{err}");
        assert!(extract_vmlinux(&[0u8; 16]).is_err());
    }
}
