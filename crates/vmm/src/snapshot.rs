//! Snapshots: a paused machine written to a directory, and read back into a new one.
//!
//! The directory holds three files:
//! - `memory.bin`: guest RAM at its memfd offsets, sparse (only pages the guest ever wrote);
//! - `state.json`: every vCPU's KVM state, the VM's (the KVM clock), every device's (virtio-pci
//!   transports with their rings' positions and MSI-X vectors, the I/O APIC, COM1, CMOS);
//! - `manifest.json`, written last: the format and its version, Alioth's version, the
//!   embedder's description of the VM (the CLI's TOML), the vCPU count, the memory size, the
//!   devices in slot order, each disk's path and size, and the length and hash of the other
//!   two files.
//!
//! A restore checks everything it can before a vCPU runs — format and version, vCPU count and
//! memory size, devices, disk sizes, hashes — so a corrupt, truncated or foreign snapshot is
//! refused with the reason and nothing is half-restored.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alioth_hv::{Kvm, VcpuState, Vm};
use alioth_mem::RamBus;
use alioth_virtio_pci::{TransportState, VirtioPci};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::machine::Legacy;
use crate::{Error, Result};

/// What a snapshot's `manifest.json` says is in it.
pub const FORMAT: &str = "alioth-snapshot";
/// The format version this Alioth writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const STATE: &str = "state.json";
const MEMORY: &str = "memory.bin";
/// The largest state file read (a few hundred KiB per vCPU at most).
const MAX_STATE: u64 = 64 << 20;

/// A disk as the snapshot knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    /// The image (vhost-user disks have none).
    pub path: Option<PathBuf>,
    /// Its size when the snapshot was taken.
    pub size: u64,
}

/// A snapshot's `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written.
    pub version: u32,
    /// The Alioth that wrote it.
    pub alioth_version: String,
    /// The embedder's description of the VM (`alioth` stores its configuration as TOML).
    pub config: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Virtio devices in slot order.
    pub devices: Vec<String>,
    /// Disks in order.
    pub disks: Vec<DiskRecord>,
    /// `state.json`'s length and hash.
    pub state_len: u64,
    /// See `state_len`.
    pub state_hash: u64,
    /// Data bytes in `memory.bin` and their hash.
    pub memory_bytes: u64,
    /// See `memory_bytes`.
    pub memory_hash: u64,
}

/// COM1's registers (vm-superio's `SerialState`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SerialRegs {
    dll: u8,
    dlh: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    fifo: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegs {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialRegs {
            dll: s.baud_divisor_low,
            dlh: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            fifo: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegs) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.dll,
            baud_divisor_high: s.dlh,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.fifo.clone(),
        }
    }
}

/// `state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SavedState {
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) vm: alioth_hv::VmState,
    pub(crate) virtio: Vec<TransportState>,
    ioapic: (u32, u32, Vec<u64>),
    cmos: (u8, Vec<u8>),
    serial: Option<SerialRegs>,
}

/// What a snapshot took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Guest RAM written (pages the guest ever wrote).
    pub memory_bytes: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Time from the request to the manifest written (pause included).
    pub took: Duration,
}

/// What a snapshot reads from the running machine (all of it paused).
pub(crate) struct Sources<'a> {
    pub(crate) vm: &'a Vm,
    pub(crate) ram: &'a RamBus,
    pub(crate) virtio: &'a [VirtioPci],
    pub(crate) legacy: &'a Legacy,
    pub(crate) config: &'a VmConfig,
    pub(crate) vcpus: Vec<VcpuState>,
}

fn snap_err(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::Config(format!("snapshot {}: {what}", dir.display()))
}

fn disk_records(config: &VmConfig) -> Vec<DiskRecord> {
    config
        .disks
        .iter()
        .map(|d| match &d.vhost_user {
            Some(_) => DiskRecord {
                path: None,
                size: 0,
            },
            None => DiskRecord {
                path: Some(d.blk.path.clone()),
                size: std::fs::metadata(&d.blk.path).map_or(0, |m| m.len()),
            },
        })
        .collect()
}

/// Writes the snapshot of a paused machine to `dir` (created if missing; refused if it already
/// holds a snapshot). `description` goes into the manifest.
pub(crate) fn write(
    dir: &Path,
    src: Sources<'_>,
    description: &str,
    started: Instant,
) -> Result<SnapshotInfo> {
    let io = |what: &str| {
        let what = format!("snapshot {}: {what}", dir.display());
        move |source| Error::Io { what, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating the directory"))?;
    if dir.join(MANIFEST).exists() {
        return Err(snap_err(
            dir,
            "already holds a snapshot; give an empty directory",
        ));
    }
    let mut virtio = Vec::with_capacity(src.virtio.len());
    for d in src.virtio {
        virtio.push(d.save().ok_or_else(|| {
            snap_err(
                dir,
                format!(
                    "{} is served by a vhost-user backend, whose state Alioth cannot save",
                    d.name()
                ),
            )
        })?);
    }
    let state = SavedState {
        vm: src.vm.save_state()?,
        vcpus: src.vcpus,
        virtio,
        ioapic: src.legacy.ioapic.save(),
        cmos: src.legacy.cmos.save(),
        serial: src.legacy.serial.as_ref().map(|s| s.save().into()),
    };
    let text = serde_json::to_vec(&state).map_err(|e| snap_err(dir, e))?;
    std::fs::write(dir.join(STATE), &text).map_err(io("writing state.json"))?;
    let mem = File::create(dir.join(MEMORY)).map_err(io("creating memory.bin"))?;
    let image = src.ram.save_to(&mem).map_err(io("writing memory.bin"))?;
    mem.sync_all().map_err(io("writing memory.bin"))?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        alioth_version: env!("CARGO_PKG_VERSION").into(),
        config: description.into(),
        cpus: src.config.cpus,
        memory: src.config.memory,
        devices: src.virtio.iter().map(|d| d.name().to_string()).collect(),
        disks: disk_records(src.config),
        state_len: text.len() as u64,
        state_hash: alioth_mem::content_hash(&text),
        memory_bytes: image.bytes,
        memory_hash: image.hash,
    };
    let m = serde_json::to_vec_pretty(&manifest).map_err(|e| snap_err(dir, e))?;
    // Written under another name and renamed: a manifest is there only when all is.
    let tmp = dir.join("manifest.json.tmp");
    std::fs::write(&tmp, m).map_err(io("writing manifest.json"))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(io("writing manifest.json"))?;
    Ok(SnapshotInfo {
        memory_bytes: image.bytes,
        state_bytes: text.len() as u64,
        took: started.elapsed(),
    })
}

/// Reads and checks a snapshot's manifest (format and version).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let meta = std::fs::metadata(&path).map_err(|e| snap_err(dir, format!("{MANIFEST}: {e}")))?;
    if !meta.is_file() || meta.len() > MAX_STATE {
        return Err(snap_err(
            dir,
            format!("{MANIFEST} is not a snapshot manifest"),
        ));
    }
    let text = std::fs::read(&path).map_err(|e| snap_err(dir, format!("{MANIFEST}: {e}")))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| snap_err(dir, format!("{MANIFEST} is corrupt: {e}")))?;
    if m.format != FORMAT {
        return Err(snap_err(
            dir,
            format!("not an Alioth snapshot (format {:?})", m.format),
        ));
    }
    if m.version != FORMAT_VERSION {
        return Err(snap_err(
            dir,
            format!(
                "format version {} (written by Alioth {}); this Alioth reads version {FORMAT_VERSION}",
                m.version, m.alioth_version
            ),
        ));
    }
    Ok(m)
}

/// Reads the state of a snapshot for `config`, checking it against the manifest and the
/// configuration (vCPUs, memory, devices, disk sizes).
pub(crate) fn read_state(
    dir: &Path,
    config: &VmConfig,
    devices: &[String],
) -> Result<(Manifest, SavedState)> {
    let m = read_manifest(dir)?;
    if m.cpus != config.cpus || m.memory != config.memory {
        return Err(snap_err(
            dir,
            format!(
                "taken of a VM with {} vCPUs and {} MiB; this one has {} and {} MiB",
                m.cpus,
                m.memory >> 20,
                config.cpus,
                config.memory >> 20
            ),
        ));
    }
    if m.devices != devices {
        return Err(snap_err(
            dir,
            format!("devices {:?} saved; this VM has {devices:?}", m.devices),
        ));
    }
    let now = disk_records(config);
    if now.len() != m.disks.len() {
        return Err(snap_err(dir, "a different number of disks"));
    }
    for (saved, d) in m.disks.iter().zip(&now) {
        if saved.size != d.size {
            return Err(snap_err(
                dir,
                format!(
                    "disk {} is {} bytes; it was {} when the snapshot was taken",
                    d.path
                        .as_deref()
                        .unwrap_or(Path::new("(vhost-user)"))
                        .display(),
                    d.size,
                    saved.size
                ),
            ));
        }
    }
    let path = dir.join(STATE);
    let len = std::fs::metadata(&path)
        .map_err(|e| snap_err(dir, format!("{STATE}: {e}")))?
        .len();
    if len != m.state_len || len > MAX_STATE {
        return Err(snap_err(
            dir,
            format!(
                "{STATE} is {len} bytes; the manifest says {} (truncated?)",
                m.state_len
            ),
        ));
    }
    let text = std::fs::read(&path).map_err(|e| snap_err(dir, format!("{STATE}: {e}")))?;
    if alioth_mem::content_hash(&text) != m.state_hash {
        return Err(snap_err(
            dir,
            format!("{STATE} does not match its hash (corrupt)"),
        ));
    }
    let state: SavedState = serde_json::from_slice(&text)
        .map_err(|e| snap_err(dir, format!("{STATE} is corrupt: {e}")))?;
    if state.vcpus.len() != config.cpus as usize
        || state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| v.id() != i as u32)
    {
        return Err(snap_err(dir, "the vCPU states do not match the vCPUs"));
    }
    if state.virtio.len() != devices.len() {
        return Err(snap_err(dir, "the device states do not match the devices"));
    }
    Ok((m, state))
}

/// Loads guest RAM from the snapshot and checks it against the manifest.
pub(crate) fn load_memory(dir: &Path, ram: &RamBus, m: &Manifest) -> Result<()> {
    let f = File::open(dir.join(MEMORY)).map_err(|e| snap_err(dir, format!("{MEMORY}: {e}")))?;
    let image = ram
        .load_from(&f)
        .map_err(|e| snap_err(dir, format!("{MEMORY}: {e}")))?;
    if image.bytes != m.memory_bytes || image.hash != m.memory_hash {
        return Err(snap_err(
            dir,
            format!(
                "{MEMORY} does not match the manifest ({} data bytes, {} expected): corrupt or truncated",
                image.bytes, m.memory_bytes
            ),
        ));
    }
    Ok(())
}

/// Gives the freshly built machine's devices, VM and vCPUs the saved state.
pub(crate) fn apply(
    dir: &Path,
    state: &SavedState,
    kvm: &Kvm,
    vm: &Vm,
    vcpus: &[alioth_hv::Vcpu],
    virtio: &[VirtioPci],
    legacy: &Legacy,
) -> Result<()> {
    let (sel, id, rte) = &state.ioapic;
    legacy
        .ioapic
        .restore(*sel, *id, rte)
        .map_err(|e| snap_err(dir, e))?;
    if !legacy.cmos.restore(state.cmos.0, &state.cmos.1) {
        return Err(snap_err(dir, "the CMOS state is malformed"));
    }
    match (&legacy.serial, &state.serial) {
        (Some(s), Some(regs)) => s.restore(&regs.into()).map_err(|e| snap_err(dir, e))?,
        (None, None) => {}
        _ => return Err(snap_err(dir, "COM1 was configured differently")),
    }
    vm.restore_state(&state.vm)?;
    for (v, s) in vcpus.iter().zip(&state.vcpus) {
        v.restore_state(kvm, s)
            .map_err(|e| snap_err(dir, format!("vCPU {}: {e}", s.id())))?;
    }
    for (d, t) in virtio.iter().zip(&state.virtio) {
        d.restore(t).map_err(|e| snap_err(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "snapshot_test.rs"]
mod tests;
