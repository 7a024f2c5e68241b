//! The machine: KVM VM + RAM + buses + devices + vCPU threads.

use std::fmt;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alioth_boot::acpi::{AcpiConfig, LegacySerial, PmPorts};
use alioth_boot::{BootedKernel, load_kernel};
use alioth_devices::ioapic::{self, IoApic};
use alioth_devices::serial::{COM1_IRQ, COM1_PORT, Serial};
use alioth_devices::virtio::blk::VirtioBlk;
use alioth_devices::virtio::console::{ConsoleMode, VirtioConsole};
use alioth_devices::virtio::net::VirtioNet;
use alioth_devices::virtio::rng::VirtioRng;
use alioth_devices::virtio::vsock::VirtioVsock;
use alioth_devices::{EventSink, VmEvent, acpi_pm, cmos, exit, i8042};
use alioth_hv::{
    EventFd, Kvm, Vcpu, VcpuState, VcpuThread, Vm, VmExit, install_kick_signal_handler,
};
use alioth_mem::layout::{
    ECAM_BASE, ECAM_SIZE, IOAPIC_BASE, MMIO32_START, PCI_MMIO_END, PCI_MMIO_START,
};
use alioth_mem::{Bus, BusDevice, MemoryMap, RamBus};
use alioth_pci::{CONFIG_IO_LEN, CONFIG_IO_PORT, PciBus, PciConfigIo, PciEcam};
use alioth_vhost_user::{SharedRegion, VhostUserFrontend};
use alioth_virtio::DeviceId;
use alioth_virtio_pci::VirtioPci;

use crate::config::{SerialConfig, VmConfig};
use crate::pci::{KvmIoevents, KvmMsi, OnFailure, VirtioPlacer};
use crate::sandbox::SeccompMode;
use crate::signals::forward_termination_signals;
use crate::snapshot::SnapshotInfo;
use crate::terminal::RawTerminal;
use crate::{Error, Result};

/// How long [`Machine::run`] waits for threads to finish after asking them to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the VM stopped (without an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (i8042, ACPI reset register, or a triple fault). Alioth stops on reset.
    Reset,
    /// The guest wrote this status to the exit device.
    GuestExit(u8),
    /// The user typed the console escape (Ctrl-A x).
    UserQuit,
    /// A terminating signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2, SIGALRM) arrived.
    Signal(i32),
    /// The embedder called [`MachineHandle::stop`].
    Stopped,
    /// The embedder called [`MachineHandle::reboot`]: build the machine again and run it.
    RebootRequested,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::GuestExit(s) => write!(f, "guest wrote exit status {s}"),
            ExitReason::UserQuit => write!(f, "quit from the console"),
            ExitReason::Signal(s) => write!(f, "stopped by signal {s}"),
            ExitReason::Stopped => write!(f, "stopped"),
            ExitReason::RebootRequested => write!(f, "reboot requested"),
        }
    }
}

enum Event {
    Device(VmEvent),
    Signal(i32),
    Stop,
    Reboot,
    Control(Control, Sender<std::result::Result<Reply, String>>),
    VcpuFailed(u32, String),
    ThreadFailed(String, String),
}

/// Options that are not part of the VM's description.
#[derive(Default)]
pub struct MachineOptions {
    /// Send COM1 output here instead of where the config says (tests, embedders).
    pub serial_output: Option<Box<dyn Write + Send>>,
    /// Turn terminating signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT, ...) into a clean stop while
    /// running, restoring the terminal (what a CLI wants).
    pub handle_signals: bool,
}

/// What [`MachineHandle`] asks of the running machine's thread.
enum Control {
    Pause,
    Resume,
    Snapshot(std::path::PathBuf, String),
}

/// What a control request answers.
enum Reply {
    Took(Duration),
    Snapshot(SnapshotInfo),
}

/// Whether a machine runs or is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built, not yet running.
    Created,
    /// Running.
    Running,
    /// Paused: every vCPU parked, every device quiet.
    Paused,
    /// Stopped.
    Shutdown,
}

/// A device's counters by name, as [`MachineHandle::counters`] reports them.
pub type DeviceCounters = Vec<(&'static str, u64)>;

type CounterFn = Box<dyn Fn() -> DeviceCounters + Send + Sync>;

/// Named counter sources, one per device.
type CounterSet = Vec<(String, CounterFn)>;

/// The vCPUs' pause gate: a flag they check before entering the guest, the count of those
/// parked behind it, and a request for their state that parked vCPUs answer (a snapshot: a
/// vCPU's registers are read on its own thread, which owns it).
#[derive(Default)]
struct PauseGate {
    paused: AtomicBool,
    parked: Mutex<Parked>,
    changed: std::sync::Condvar,
}

/// A vCPU's answer to a state request.
type StateAnswer = Option<std::result::Result<VcpuState, String>>;

#[derive(Default)]
struct Parked {
    count: usize,
    /// The MSRs to save and, per vCPU ID, its answer.
    save: Option<(Arc<Vec<u32>>, Vec<StateAnswer>)>,
}

impl PauseGate {
    /// Called by a vCPU thread between exits: waits while the machine is paused, answering
    /// state requests meanwhile.
    fn park_if_paused(&self, stop: &AtomicBool, vcpu: &Vcpu) {
        if !self.paused.load(Ordering::SeqCst) {
            return;
        }
        let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        p.count += 1;
        self.changed.notify_all();
        loop {
            if let Some((msrs, answers)) = p.save.as_mut()
                && let Some(slot) = answers.get_mut(vcpu.id() as usize)
                && slot.is_none()
            {
                *slot = Some(vcpu.save_state(msrs).map_err(|e| e.to_string()));
                self.changed.notify_all();
            }
            if !self.paused.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
                break;
            }
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.count -= 1;
        self.changed.notify_all();
    }

    fn open(&self) {
        let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.paused.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// With every vCPU parked: each one's state, read on its own thread.
    fn save_vcpus(&self, n: usize, msrs: Vec<u32>) -> std::result::Result<Vec<VcpuState>, String> {
        let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        p.save = Some((Arc::new(msrs), (0..n).map(|_| None).collect()));
        self.changed.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let done = p
                .save
                .as_ref()
                .is_some_and(|(_, a)| a.iter().all(Option::is_some));
            if done {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                p.save = None;
                return Err("the vCPUs did not report their state within 5 s".into());
            }
            p = self
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let (_, answers) = p.save.take().unwrap_or_default();
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err("no answer".into())))
            .collect()
    }
}

/// Controls a running machine from another thread (an API server, an embedder).
#[derive(Clone)]
pub struct MachineHandle {
    tx: Sender<Event>,
    state: Arc<Mutex<VmState>>,
    counters: Arc<CounterSet>,
}

impl MachineHandle {
    /// Asks the machine to stop; [`Machine::run`] returns [`ExitReason::Stopped`].
    pub fn stop(&self) {
        let _ = self.tx.send(Event::Stop);
    }

    /// Asks the machine to stop so that it can be built again; [`Machine::run`] returns
    /// [`ExitReason::RebootRequested`].
    pub fn reboot(&self) {
        let _ = self.tx.send(Event::Reboot);
    }

    /// Pauses the machine: every vCPU leaves the guest and parks, then every device completes
    /// what it has in flight and stops serving its queues. Returns how long that took.
    pub fn pause(&self) -> std::result::Result<Duration, String> {
        match self.control(Control::Pause)? {
            Reply::Took(d) => Ok(d),
            Reply::Snapshot(s) => Ok(s.took),
        }
    }

    /// Resumes a paused machine where it stopped.
    pub fn resume(&self) -> std::result::Result<(), String> {
        self.control(Control::Resume).map(|_| ())
    }

    /// Writes a snapshot of the machine to `dir` (see [`crate::snapshot`]), pausing it for the
    /// time it takes if it runs; `description` (the embedder's configuration) goes into the
    /// manifest.
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        description: String,
    ) -> std::result::Result<SnapshotInfo, String> {
        match self.control(Control::Snapshot(dir.to_path_buf(), description))? {
            Reply::Snapshot(s) => Ok(s),
            Reply::Took(_) => Err("unexpected answer".into()),
        }
    }

    fn control(&self, c: Control) -> std::result::Result<Reply, String> {
        let (tx, rx) = channel();
        if self.tx.send(Event::Control(c, tx)).is_err() {
            return Err("the machine is not running".into());
        }
        rx.recv()
            .unwrap_or_else(|_| Err("the machine stopped meanwhile".into()))
    }

    /// The machine's state.
    pub fn state(&self) -> VmState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every device's counters, by device name.
    pub fn counters(&self) -> Vec<(String, DeviceCounters)> {
        self.counters
            .iter()
            .map(|(n, f)| (n.clone(), f()))
            .collect()
    }
}

/// A VM ready to run.
pub struct Machine {
    vcpus: Vec<Vcpu>,
    /// What the loader did (none for a restored machine).
    booted: Option<BootedKernel>,
    vm: Arc<Vm>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Option<Arc<Serial>>,
    serial_stdin: bool,
    /// The terminal on stdin goes raw while the VM runs (serial or console input).
    raw_stdin: bool,
    virtio: Vec<VirtioPci>,
    handle_signals: bool,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    state: Arc<Mutex<VmState>>,
    counters: Arc<CounterSet>,
    kvm: Arc<Kvm>,
    legacy: Legacy,
    config: VmConfig,
    // Dropped last: the VM's memory slots point into it.
    ram: Arc<RamBus>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The devices the guest sees, on the buses they were placed on.
struct Devices {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Option<Arc<Serial>>,
    /// Serial ports for the ACPI tables.
    serials: Vec<LegacySerial>,
    virtio: Vec<VirtioPci>,
    counters: CounterSet,
    /// The devices whose state a snapshot keeps besides the virtio ones.
    legacy: Legacy,
}

/// What `Machine::new` and `Machine::restore` build, for `Machine::assemble`.
struct Parts {
    kvm: Kvm,
    vm: Arc<Vm>,
    ram: Arc<RamBus>,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    channel: (Sender<Event>, Receiver<Event>),
}

/// Handles on the port and MMIO devices a snapshot saves.
#[derive(Clone)]
pub(crate) struct Legacy {
    pub(crate) ioapic: Arc<IoApic>,
    pub(crate) cmos: Arc<cmos::Cmos>,
    pub(crate) serial: Option<Arc<Serial>>,
}

/// Step 1: the KVM VM, with the vCPU count checked against what KVM allows.
fn create_vm(config: &VmConfig) -> Result<(Kvm, Arc<Vm>)> {
    let kvm = Kvm::new()?;
    if config.cpus as usize > kvm.max_vcpus() {
        return Err(Error::Config(format!(
            "cpus = {} exceeds what KVM allows here ({})",
            config.cpus,
            kvm.max_vcpus()
        )));
    }
    let vm = Arc::new(kvm.create_vm()?);
    Ok((kvm, vm))
}

/// Step 2: guest RAM laid out by the x86 memory map, registered as the VM's memory slots.
fn map_memory(kvm: &Kvm, vm: &Vm, config: &VmConfig) -> Result<Arc<RamBus>> {
    let map = MemoryMap::new(config.memory)?;
    // Guest RAM must lie inside the guest-physical address space KVM offers (CPUID 0x80000008
    // EAX[7:0]); past it KVM refuses the memory slot with a bare EINVAL.
    let end = map
        .ram_regions()
        .iter()
        .map(|(a, s)| a + s)
        .max()
        .unwrap_or(0);
    if let Some(bits) = kvm
        .supported_cpuid()?
        .get(0x8000_0008, 0)
        .map(|e| e.eax & 0xff)
        .filter(|b| (32..64).contains(b))
        && end > 1u64 << bits
    {
        return Err(Error::Config(format!(
            "memory = {} GiB: guest RAM would end at {end:#x}, beyond the {bits}-bit guest-physical address space KVM offers here ({} GiB); give --memory / memory a smaller size",
            config.memory >> 30,
            (1u64 << bits) >> 30
        )));
    }
    let ram = Arc::new(RamBus::new(map)?);
    for (slot, r) in ram.regions().iter().enumerate() {
        // SAFETY: the regions stay mapped as long as `ram`, which the machine drops after
        // the VM and its vCPUs (field order), and which is never remapped.
        let mapped = unsafe { vm.set_memory_slot(slot as u32, r.gpa, r.size, r.host_addr, false) };
        match mapped {
            Ok(()) => {}
            // KVM refuses a slot it cannot address (limits below the CPUID bound exist, e.g.
            // under nested or software KVM): that is the size the user asked for.
            Err(alioth_hv::Error::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                return Err(Error::Config(format!(
                    "memory = {} GiB: KVM refused guest RAM at {:#x}-{:#x} ({source}); this host's KVM addresses less, give --memory / memory a smaller size",
                    config.memory >> 30,
                    r.gpa,
                    r.gpa + r.size
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ram)
}

/// Where device events (power-off, reset, exit) go: the machine's event channel.
fn event_sink(tx: &Sender<Event>) -> EventSink {
    let tx = Mutex::new(tx.clone());
    Arc::new(move |e| {
        let _ = tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Event::Device(e));
    })
}

/// Step 3a: COM1, if the serial console is on, with its interrupt through an irqfd.
fn add_serial(
    vm: &Vm,
    pio: &Bus,
    config: &VmConfig,
    output: Option<Box<dyn Write + Send>>,
) -> Result<Option<Arc<Serial>>> {
    let out: Box<dyn Write + Send> = match (output, &config.serial) {
        (Some(w), _) => w,
        (None, SerialConfig::Stdio) => Box::new(std::io::stdout()),
        (None, SerialConfig::File(p)) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::Config(format!("serial file {}: {e}", p.display())))?,
        ),
        (None, SerialConfig::Off) => return Ok(None),
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial irqfd"))?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let s = Arc::new(Serial::new("serial0", irq, out).map_err(io_err("serial0"))?);
    pio.insert(
        u64::from(COM1_PORT),
        u64::from(alioth_devices::serial::LEN),
        s.clone(),
    )?;
    Ok(Some(s))
}

/// Step 3b: the legacy port devices (i8042 reset, CMOS with the memory sizes, ACPI PM) and the
/// exit device if configured.
fn add_legacy_devices(
    pio: &Bus,
    ram: &RamBus,
    sink: &EventSink,
    config: &VmConfig,
) -> Result<Arc<cmos::Cmos>> {
    let map = ram.map();
    let regions = map.ram_regions();
    let below = regions.first().map(|r| r.1).unwrap_or(0).min(MMIO32_START);
    let above = regions.get(1).map(|r| r.1).unwrap_or(0);
    let rtc = Arc::new(cmos::Cmos::new(below, above));
    let mut legacy: Vec<(u16, u16, Arc<dyn BusDevice>)> = vec![
        (
            i8042::BASE_PORT,
            i8042::LEN,
            Arc::new(i8042::I8042::new(sink.clone())),
        ),
        (cmos::BASE_PORT, cmos::LEN, rtc.clone()),
        (
            acpi_pm::BASE_PORT,
            acpi_pm::LEN,
            Arc::new(acpi_pm::AcpiPm::new(sink.clone())),
        ),
    ];
    if let Some(port) = config.exit_device {
        legacy.push((port, 1, Arc::new(exit::ExitDevice::new(sink.clone()))));
    }
    for (port, len, dev) in legacy {
        pio.insert(u64::from(port), u64::from(len), dev)?;
    }
    Ok(rtc)
}

/// Step 3c: the PCI host bridge on the configuration ports and ECAM, and the virtio devices
/// behind it, each with its worker thread.
fn add_pci_devices(
    vm: &Arc<Vm>,
    msi: Arc<KvmMsi>,
    pio: &Bus,
    mmio: &Arc<Bus>,
    ram: &RamBus,
    config: &VmConfig,
    (on_failure, sink): (OnFailure, &EventSink),
) -> Result<(Vec<VirtioPci>, CounterSet)> {
    let mut counters: CounterSet = Vec::new();
    fn get(a: &std::sync::atomic::AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
    let pci = Arc::new(PciBus::default());
    pio.insert(
        u64::from(CONFIG_IO_PORT),
        u64::from(CONFIG_IO_LEN),
        Arc::new(PciConfigIo::new(pci.clone())),
    )?;
    mmio.insert(ECAM_BASE, ECAM_SIZE, Arc::new(PciEcam::new(pci.clone())))?;
    let mut placer = VirtioPlacer {
        pci,
        mmio: mmio.clone(),
        mem: ram.memory().clone(),
        msi,
        ioevents: Arc::new(KvmIoevents::new(vm.clone())),
        next_bar: PCI_MMIO_START,
        bar_end: PCI_MMIO_END,
        devices: Vec::new(),
        on_failure,
        seccomp: config.seccomp,
    };
    for (i, d) in config.disks.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        if let Some(sock) = &d.vhost_user {
            let regions = shared_regions(ram)?;
            let (frontend, info) =
                VhostUserFrontend::connect(sock, &name, DeviceId::Block, regions)
                    .map_err(|e| Error::Device(e.to_string()))?;
            placer.add_runner(
                info,
                frontend,
                &format!("vhost-user backend at {}", sock.display()),
            )?;
            continue;
        }
        let dev = VirtioBlk::open(&name, &d.blk).map_err(|e| Error::Device(e.to_string()))?;
        let c = dev.counters();
        counters.push((
            name.clone(),
            Box::new(move || {
                vec![
                    ("read_ops", get(&c.read_ops)),
                    ("read_bytes", get(&c.read_bytes)),
                    ("write_ops", get(&c.write_ops)),
                    ("write_bytes", get(&c.write_bytes)),
                    ("errors", get(&c.errors)),
                ]
            }),
        ));
        placer.add(dev, d.backend, d.poll_us)?;
    }
    if let Some(r) = &config.rng {
        placer.add(
            VirtioRng::limited("virtio-rng0", &r.rate_limit),
            r.backend,
            0,
        )?;
    }
    for (i, n) in config.nets.iter().enumerate() {
        let name = format!("virtio-net{i}");
        // io_uring keeps a read in flight on a blocking tap; epoll reads when it is readable.
        let io_uring = crate::pci::use_io_uring(&name, n.backend)?;
        let dev =
            VirtioNet::open(&name, &n.net, !io_uring).map_err(|e| Error::Device(e.to_string()))?;
        log::info!("{name}: tap {}", dev.tap_name());
        let c = dev.counters();
        counters.push((
            name.clone(),
            Box::new(move || {
                vec![
                    ("rx_packets", get(&c.rx_packets)),
                    ("rx_bytes", get(&c.rx_bytes)),
                    ("rx_dropped", get(&c.rx_dropped)),
                    ("rx_errors", get(&c.rx_errors)),
                    ("tx_packets", get(&c.tx_packets)),
                    ("tx_bytes", get(&c.tx_bytes)),
                    ("tx_invalid", get(&c.tx_invalid)),
                    ("tx_errors", get(&c.tx_errors)),
                ]
            }),
        ));
        placer.add(dev, n.backend, n.poll_us)?;
    }
    if let Some(v) = &config.vsock {
        let dev = VirtioVsock::new("virtio-vsock0", &v.vsock).map_err(|e| match e {
            alioth_devices::virtio::vsock::VsockError::Config(m) => Error::Config(m),
            e => Error::Device(e.to_string()),
        })?;
        log::info!(
            "virtio-vsock0: guest CID {}, host socket {}",
            v.vsock.cid,
            dev.uds().display()
        );
        let c = dev.counters();
        counters.push((
            "virtio-vsock0".into(),
            Box::new(move || {
                vec![
                    ("connections", get(&c.connections)),
                    ("rx_bytes", get(&c.rx_bytes)),
                    ("tx_bytes", get(&c.tx_bytes)),
                    ("resets", get(&c.resets)),
                    ("bad_packets", get(&c.bad_packets)),
                ]
            }),
        ));
        placer.add(dev, v.backend, 0)?;
    }
    if let Some(c) = &config.console {
        // Ctrl-A x quits when the console owns a terminal (put in raw mode by `run`).
        let escape = (c.mode == ConsoleMode::Stdio && stdin_is_terminal()).then(|| sink.clone());
        let dev = VirtioConsole::new("virtio-console0", &c.mode, escape).map_err(|e| match e {
            alioth_devices::virtio::console::ConsoleError::Config(m) => Error::Config(m),
            e => Error::Device(e.to_string()),
        })?;
        if let Some(p) = dev.pty() {
            eprintln!("alioth: virtio-console on {}", p.display());
        }
        let k = dev.counters();
        counters.push((
            "virtio-console0".into(),
            Box::new(move || {
                vec![
                    ("rx_bytes", get(&k.rx_bytes)),
                    ("tx_bytes", get(&k.tx_bytes)),
                    ("tx_dropped", get(&k.tx_dropped)),
                ]
            }),
        ));
        placer.add(dev, c.backend, 0)?;
    }
    Ok((placer.devices, counters))
}

/// Guest RAM as a vhost-user backend maps it: the memfd and each region's offset in it.
fn shared_regions(ram: &RamBus) -> Result<Vec<SharedRegion>> {
    ram.regions()
        .iter()
        .map(|r| {
            Ok(SharedRegion {
                gpa: r.gpa,
                size: r.size,
                host_addr: r.host_addr as u64,
                file: ram
                    .fd()
                    .try_clone_to_owned()
                    .map_err(io_err("guest RAM descriptor"))?,
                offset: r.file_offset,
            })
        })
        .collect()
}

/// Whether the virtio console is on stdio.
fn console_stdio(config: &VmConfig) -> bool {
    config
        .console
        .as_ref()
        .is_some_and(|c| c.mode == ConsoleMode::Stdio)
}

fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Step 3: every device, on fresh port and MMIO buses.
fn add_devices(
    vm: &Arc<Vm>,
    ram: &RamBus,
    tx: &Sender<Event>,
    config: &VmConfig,
    serial_output: Option<Box<dyn Write + Send>>,
) -> Result<Devices> {
    let sink = &event_sink(tx);
    let pio = Arc::new(Bus::new("pio"));
    let mmio = Arc::new(Bus::new("mmio"));
    let serial = add_serial(vm, &pio, config, serial_output)?;
    let serials = match serial {
        Some(_) => vec![LegacySerial {
            port: COM1_PORT,
            irq: COM1_IRQ,
        }],
        None => Vec::new(),
    };
    let rtc = add_legacy_devices(&pio, ram, sink, config)?;
    // The I/O APIC (split irqchip): its redirection entries become MSI routes of GSIs 0-23,
    // which legacy devices' irqfds (COM1's on GSI 4) drive.
    let msi = Arc::new(KvmMsi::new(vm.clone()));
    let router = msi.clone();
    let ioapic = Arc::new(IoApic::new(Arc::new(move |pin, route| {
        router.update(pin, route)
    })));
    mmio.insert(IOAPIC_BASE, ioapic::MMIO_LEN, ioapic.clone())?;
    let failed = Mutex::new(tx.clone());
    let on_failure: OnFailure = Arc::new(move |dev, msg| {
        let _ = failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Event::ThreadFailed(
                dev.to_string(),
                format!("panicked: {msg}"),
            ));
    });
    let (virtio, counters) =
        add_pci_devices(vm, msi, &pio, &mmio, ram, config, (on_failure, sink))?;
    Ok(Devices {
        pio,
        mmio,
        legacy: Legacy {
            ioapic,
            cmos: rtc,
            serial: serial.clone(),
        },
        serial,
        serials,
        virtio,
        counters,
    })
}

/// Step 4: the kernel, initramfs, command line and ACPI tables (describing the devices) in
/// guest RAM, by the configured boot protocol.
fn load_guest(ram: &RamBus, config: &VmConfig, serials: Vec<LegacySerial>) -> Result<BootedKernel> {
    let acpi = AcpiConfig {
        nr_vcpus: config.cpus,
        serials,
        pm: PmPorts {
            sleep_control: acpi_pm::BASE_PORT,
            sleep_status: acpi_pm::BASE_PORT + 1,
            reset: acpi_pm::BASE_PORT + 2,
            reset_value: acpi_pm::RESET_VALUE,
            timer: Some(acpi_pm::BASE_PORT + acpi_pm::TIMER_OFFSET),
        },
        ecam: Some((ECAM_BASE, 0, 0)),
    };
    debug_assert_eq!(alioth_boot::acpi::S5_SLP_TYP, acpi_pm::S5_SLP_TYP);
    let booted = load_kernel(ram, &config.kernel, &acpi)?;
    log::info!(
        "loaded {:?} kernel at {:#x}-{:#x}, entry {:#x} via {:?}",
        booted.format,
        booted.kernel_range.0,
        booted.kernel_range.1,
        booted.cpu.rip,
        booted.protocol
    );
    Ok(booted)
}

/// Step 5: the vCPUs, with CPUID (and the configured edits), boot MSRs and LAPIC LINTs; the
/// boot vCPU gets the state the boot protocol hands over.
fn create_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    config: &VmConfig,
    booted: Option<&BootedKernel>,
) -> Result<Vec<Vcpu>> {
    let mut cpuid = kvm.supported_cpuid()?;
    cpuid.apply_edits(&config.cpu_features);
    install_kick_signal_handler();
    let mut vcpus = Vec::with_capacity(config.cpus as usize);
    for id in 0..config.cpus {
        let vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&cpuid.for_vcpu(id, config.cpus))?;
        vcpu.set_boot_msrs()?;
        vcpu.set_lapic_lint()?;
        vcpus.push(vcpu);
    }
    if let (Some(bsp), Some(booted)) = (vcpus.first(), booted) {
        bsp.set_boot_state(&booted.cpu)?;
    }
    Ok(vcpus)
}

impl Machine {
    /// Builds the VM, in the order of the boot path: the KVM VM, guest RAM and its memory
    /// slots, the devices, the guest image (kernel, initramfs, ACPI tables), then the vCPUs.
    pub fn new(config: &VmConfig, options: MachineOptions) -> Result<Machine> {
        config.validate()?;
        Machine::build(config, options, None)
    }

    /// Builds the machine `config` describes from the snapshot in `dir` instead of booting it:
    /// guest RAM, vCPUs, the VM and every device continue where the snapshot left them. Disks
    /// are opened by the paths in `config` and must have the sizes they had. Everything is
    /// checked before anything runs; a snapshot that does not fit is a configuration error
    /// naming what is wrong.
    pub fn restore(
        config: &VmConfig,
        dir: &std::path::Path,
        options: MachineOptions,
    ) -> Result<Machine> {
        config.validate_for_restore()?;
        Machine::build(config, options, Some(dir))
    }

    /// The boot path, or with `snapshot` the restore path (which loads RAM and state instead
    /// of a kernel).
    fn build(
        config: &VmConfig,
        options: MachineOptions,
        snapshot: Option<&std::path::Path>,
    ) -> Result<Machine> {
        let started = Instant::now();
        // A snapshot's cheap checks (manifest, devices, disk sizes, the state file's hash)
        // come before anything is built.
        let saved = match snapshot {
            Some(dir) => Some(crate::snapshot::read_state(
                dir,
                config,
                &virtio_names(config),
            )?),
            None => None,
        };
        let (kvm, vm) = create_vm(config)?;
        let ram = map_memory(&kvm, &vm, config)?;
        if let (Some(dir), Some((manifest, _))) = (snapshot, &saved) {
            crate::snapshot::load_memory(dir, &ram, manifest)?;
        }
        let (tx, rx) = channel();
        let devices = add_devices(&vm, &ram, &tx, config, options.serial_output)?;
        let booted = match (snapshot, &saved) {
            (Some(dir), Some((manifest, state))) => {
                let vcpus = create_vcpus(&kvm, &vm, config, None)?;
                crate::snapshot::apply(
                    dir,
                    state,
                    &kvm,
                    &vm,
                    &vcpus,
                    &devices.virtio,
                    &devices.legacy,
                )?;
                log::info!(
                    "restored from {} in {:.1} ms: {} KiB of guest RAM",
                    dir.display(),
                    started.elapsed().as_secs_f64() * 1e3,
                    manifest.memory_bytes >> 10
                );
                (None, vcpus)
            }
            _ => {
                let booted = load_guest(&ram, config, devices.serials.clone())?;
                let vcpus = create_vcpus(&kvm, &vm, config, Some(&booted))?;
                (Some(booted), vcpus)
            }
        };
        let parts = Parts {
            kvm,
            vm,
            ram,
            devices,
            vcpus: booted.1,
            channel: (tx, rx),
        };
        Ok(Machine::assemble(
            config,
            options.handle_signals,
            parts,
            booted.0,
        ))
    }

    fn assemble(
        config: &VmConfig,
        handle_signals: bool,
        p: Parts,
        booted: Option<BootedKernel>,
    ) -> Machine {
        let (tx, rx) = p.channel;
        Machine {
            vcpus: p.vcpus,
            booted,
            vm: p.vm,
            pio: p.devices.pio,
            mmio: p.devices.mmio,
            serial: p.devices.serial,
            // A stdio console takes the terminal's input; COM1 then only prints.
            serial_stdin: config.serial == SerialConfig::Stdio && !console_stdio(config),
            raw_stdin: config.serial == SerialConfig::Stdio || console_stdio(config),
            virtio: p.devices.virtio,
            handle_signals,
            tx,
            rx,
            state: Arc::new(Mutex::new(VmState::Created)),
            counters: Arc::new(p.devices.counters),
            kvm: Arc::new(p.kvm),
            legacy: p.devices.legacy,
            config: config.clone(),
            ram: p.ram,
        }
    }

    /// What the loader did: the boot vCPU's initial state, where the kernel and initramfs went
    /// (none for a restored machine).
    pub fn booted(&self) -> Option<&BootedKernel> {
        self.booted.as_ref()
    }

    /// A handle that can stop the machine while [`Machine::run`] blocks.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            tx: self.tx.clone(),
            state: self.state.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &RamBus {
        &self.ram
    }

    /// Runs the VM until it stops; see [`ExitReason`]. A vCPU or device failure is an error,
    /// after every thread has been stopped.
    pub fn run(self) -> Result<ExitReason> {
        let Machine {
            vcpus,
            vm,
            pio,
            mmio,
            serial,
            serial_stdin,
            raw_stdin,
            virtio,
            handle_signals,
            tx,
            rx,
            ram,
            state,
            kvm,
            legacy,
            config,
            ..
        } = self;
        let set_state = |s: VmState| *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        let gate = Arc::new(PauseGate::default());
        // Dropped in field order on every path out of here: the devices (they hold guest memory
        // and the VM), then the VM (its memory slots point into guest RAM), then guest RAM, as
        // `Vm::set_memory_slot` requires.
        let owned = Owned { virtio, vm, ram };
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = channel::<String>();

        if handle_signals {
            let tx = Mutex::new(tx.clone());
            forward_termination_signals(config.seccomp, move |sig| {
                let _ = tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Event::Signal(sig));
            })
            .map_err(io_err("signal handling"))?;
        }

        // Console input: stdin, raw when it is a terminal (restored when `_raw` drops).
        let input_stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?);
        let mut _raw = None;
        let mut input_thread = None;
        if raw_stdin {
            _raw = RawTerminal::enter(std::os::fd::AsFd::as_fd(&std::io::stdin()));
            if _raw.is_some() {
                eprintln!("alioth: console in raw mode; press Ctrl-A x to quit");
            }
        }
        if let (Some(s), true) = (&serial, serial_stdin) {
            let escape = _raw.is_some();
            let sink_tx = Mutex::new(tx.clone());
            let sink: EventSink = Arc::new(move |e| {
                let _ = sink_tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(Event::Device(e));
            });
            let stdin_fd = std::os::fd::AsFd::as_fd(&std::io::stdin())
                .try_clone_to_owned()
                .map_err(io_err("stdin"))?;
            let (s, stop, fail_tx) = (s.clone(), input_stop.clone(), Mutex::new(tx.clone()));
            let seccomp = config.seccomp;
            input_thread = Some(
                std::thread::Builder::new()
                    .name("serial0-input".into())
                    .spawn(move || {
                        if let Err(e) =
                            crate::sandbox::install(crate::sandbox::ThreadKind::Input, seccomp)
                        {
                            let _ = fail_tx
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .send(Event::ThreadFailed("serial0-input".into(), e.to_string()));
                            return;
                        }
                        let input = std::fs::File::from(stdin_fd);
                        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            s.run_input(input, escape, sink, &stop)
                        }));
                        if let Err(p) = r {
                            let _ = fail_tx.lock().unwrap_or_else(|e| e.into_inner()).send(
                                Event::ThreadFailed(
                                    "serial0-input".into(),
                                    format!("panicked: {}", panic_message(&p)),
                                ),
                            );
                        }
                    })
                    .map_err(io_err("serial input thread"))?,
            );
        }

        let mut threads: Vec<(String, VcpuThread<()>)> = Vec::new();
        for vcpu in vcpus {
            let id = vcpu.id();
            let name = format!("vcpu{id}");
            let ctx = VcpuContext {
                pio: pio.clone(),
                mmio: mmio.clone(),
                stop: stop.clone(),
                tx: tx.clone(),
                gate: gate.clone(),
                seccomp: config.seccomp,
            };
            let done = done_tx.clone();
            let thread_name = name.clone();
            let h = VcpuThread::spawn(name.clone(), move || {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| ctx.run_vcpu(vcpu)));
                if let Err(p) = r {
                    let msg = panic_message(&p);
                    let _ = ctx
                        .tx
                        .send(Event::VcpuFailed(id, format!("panicked: {msg}")));
                }
                let _ = done.send(thread_name);
            })
            .map_err(io_err(format!("spawning {name}")))?;
            threads.push((name, h));
        }
        drop(done_tx);

        // Control requests (pause, resume) are served here; the first other event decides
        // how the machine stops.
        set_state(VmState::Running);
        let outcome = loop {
            break match rx.recv() {
                Err(_) => Err(Error::Thread {
                    thread: "machine".into(),
                    reason: "every event source is gone".into(),
                }),
                Ok(Event::Control(c, reply)) => {
                    let paused =
                        *state.lock().unwrap_or_else(|e| e.into_inner()) == VmState::Paused;
                    let r = match (c, paused) {
                        (Control::Pause, true) => Err("the VM is already paused".into()),
                        (Control::Resume, false) => Err("the VM is not paused".into()),
                        (Control::Pause, false) => {
                            let r = pause_all(&gate, &threads, &owned.virtio);
                            if r.is_ok() {
                                set_state(VmState::Paused);
                            }
                            r.map(Reply::Took)
                        }
                        (Control::Resume, true) => {
                            let start = Instant::now();
                            resume_all(&gate, &owned.virtio);
                            set_state(VmState::Running);
                            Ok(Reply::Took(start.elapsed()))
                        }
                        (Control::Snapshot(dir, description), paused) => {
                            let started = Instant::now();
                            let r = (if paused {
                                Ok(Duration::ZERO)
                            } else {
                                pause_all(&gate, &threads, &owned.virtio)
                            })
                            .and_then(|_| {
                                let msrs = kvm.msrs_to_save().map_err(|e| e.to_string())?;
                                let vcpus = gate.save_vcpus(threads.len(), msrs)?;
                                let src = crate::snapshot::Sources {
                                    vm: &owned.vm,
                                    ram: &owned.ram,
                                    virtio: &owned.virtio,
                                    legacy: &legacy,
                                    config: &config,
                                    vcpus,
                                };
                                crate::snapshot::write(&dir, src, &description, started)
                                    .map(Reply::Snapshot)
                                    .map_err(|e| e.to_string())
                            });
                            // A running machine runs on, whatever happened.
                            if !paused && gate.paused.load(Ordering::SeqCst) {
                                resume_all(&gate, &owned.virtio);
                            }
                            r
                        }
                    };
                    let _ = reply.send(r);
                    continue;
                }
                Ok(Event::Device(VmEvent::PowerOff)) => Ok(ExitReason::PowerOff),
                Ok(Event::Device(VmEvent::Reset)) => Ok(ExitReason::Reset),
                Ok(Event::Device(VmEvent::Exit(s))) => Ok(ExitReason::GuestExit(s)),
                Ok(Event::Device(VmEvent::UserQuit)) => Ok(ExitReason::UserQuit),
                Ok(Event::Signal(s)) => Ok(ExitReason::Signal(s)),
                Ok(Event::Stop) => Ok(ExitReason::Stopped),
                Ok(Event::Reboot) => Ok(ExitReason::RebootRequested),
                Ok(Event::VcpuFailed(vcpu, reason)) => Err(Error::Vcpu { vcpu, reason }),
                Ok(Event::ThreadFailed(thread, reason)) => Err(Error::Thread { thread, reason }),
            };
        };
        set_state(VmState::Shutdown);
        // A paused machine's devices serve again (to stop like the others); its vCPUs wake to
        // see the stop flag below.
        if gate.paused.load(Ordering::SeqCst) {
            for d in &owned.virtio {
                d.resume();
            }
        }

        // Stop everything: flag first, then kick, so no vCPU can miss it.
        stop.store(true, Ordering::SeqCst);
        gate.open();
        let _ = input_stop.write(1);
        for (_, t) in &threads {
            t.kick();
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut pending: Vec<String> = threads.iter().map(|t| t.0.clone()).collect();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match done_rx.recv_timeout(left) {
                Ok(name) => pending.retain(|n| *n != name),
                Err(_) => break,
            }
            // Kick again in case a vCPU was between exits when the first kick landed.
            for (name, t) in &threads {
                if pending.contains(name) {
                    t.kick();
                }
            }
        }
        if pending.is_empty() {
            for (_, t) in threads {
                let _ = t.join();
            }
        } else {
            log::error!(
                "{} did not stop within {STOP_GRACE:?}; leaving them behind",
                pending.join(", ")
            );
            // The threads still use the RAM and VM; keep them alive for the process's life.
            std::mem::forget(owned);
            drop(_raw);
            return outcome;
        }
        if let Some(h) = input_thread {
            // The input thread polls the stop eventfd and ends promptly.
            let _ = h.join();
        }
        // Devices finish their in-flight requests before the machine is gone.
        for d in &owned.virtio {
            d.shutdown();
        }
        drop(owned);
        drop(_raw);
        outcome
    }
}

/// Resumes every device, then lets the vCPUs into the guest again.
fn resume_all(gate: &PauseGate, virtio: &[VirtioPci]) {
    for d in virtio {
        d.resume();
    }
    gate.open();
}

/// The virtio devices' names, in slot order, as [`add_pci_devices`] names them.
fn virtio_names(config: &VmConfig) -> Vec<String> {
    let mut v: Vec<String> = (0..config.disks.len())
        .map(|i| format!("virtio-blk{i}"))
        .collect();
    if config.rng.is_some() {
        v.push("virtio-rng0".into());
    }
    v.extend((0..config.nets.len()).map(|i| format!("virtio-net{i}")));
    if config.vsock.is_some() {
        v.push("virtio-vsock0".into());
    }
    if config.console.is_some() {
        v.push("virtio-console0".into());
    }
    v
}

/// Parks every vCPU behind `gate` (kicking them out of the guest), then pauses every device.
/// On failure everything runs again.
fn pause_all(
    gate: &PauseGate,
    threads: &[(String, VcpuThread<()>)],
    virtio: &[VirtioPci],
) -> std::result::Result<Duration, String> {
    let start = Instant::now();
    gate.paused.store(true, Ordering::SeqCst);
    let deadline = start + Duration::from_secs(2);
    let mut parked = gate.parked.lock().unwrap_or_else(|e| e.into_inner());
    while parked.count < threads.len() {
        if Instant::now() > deadline {
            drop(parked);
            gate.open();
            return Err("the vCPUs did not stop within 2 s".into());
        }
        // A kick lands only while the vCPU is in (or about to enter) KVM_RUN: repeat it.
        for (_, t) in threads {
            t.kick();
        }
        parked = gate
            .changed
            .wait_timeout(parked, Duration::from_millis(5))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(parked);
    for (i, d) in virtio.iter().enumerate() {
        if !d.pause() {
            for done in &virtio[..i] {
                done.resume();
            }
            gate.open();
            return Err(format!(
                "{} cannot be paused: its queues are served by a vhost-user backend",
                d.name()
            ));
        }
    }
    Ok(start.elapsed())
}

/// What `Machine::run` must drop in this order (struct fields drop in declaration order).
struct Owned {
    virtio: Vec<VirtioPci>,
    /// Dropped after the devices (snapshots read its state).
    vm: Arc<Vm>,
    /// Dropped after the VM (snapshots write it out).
    ram: Arc<RamBus>,
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

struct VcpuContext {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stop: Arc<AtomicBool>,
    tx: Sender<Event>,
    gate: Arc<PauseGate>,
    seccomp: SeccompMode,
}

impl VcpuContext {
    fn fail(&self, id: u32, reason: String) {
        let _ = self.tx.send(Event::VcpuFailed(id, reason));
    }

    fn run_vcpu(&self, mut vcpu: Vcpu) {
        let id = vcpu.id();
        // The filter goes on before the guest runs a single instruction.
        if let Err(e) = crate::sandbox::install(crate::sandbox::ThreadKind::Vcpu, self.seccomp) {
            return self.fail(id, e.to_string());
        }
        vcpu.bind_kick_to_current_thread();
        let mut unhandled_logged = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            self.gate.park_if_paused(&self.stop, &vcpu);
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => return self.fail(id, e.to_string()),
            };
            match exit {
                VmExit::IoIn { port, size, data } => {
                    for chunk in data.chunks_mut(usize::from(size.max(1))) {
                        if !self.pio.read(u64::from(port), chunk) {
                            chunk.fill(0xff);
                        }
                    }
                }
                VmExit::IoOut { port, size, data } => {
                    for chunk in data.chunks(usize::from(size.max(1))) {
                        if !self.pio.write(u64::from(port), chunk) && unhandled_logged < 16 {
                            unhandled_logged += 1;
                            log::debug!("vcpu{id}: write to unhandled port {port:#x}");
                        }
                    }
                }
                VmExit::MmioRead { addr, data } => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                VmExit::MmioWrite { addr, data } => {
                    if !self.mmio.write(addr, data) && unhandled_logged < 16 {
                        unhandled_logged += 1;
                        log::debug!("vcpu{id}: write to unhandled MMIO {addr:#x}");
                    }
                }
                // Pins are edge-triggered (see alioth_devices::ioapic): nothing waits for the EOI.
                VmExit::Interrupted | VmExit::Hlt | VmExit::IoapicEoi { .. } => {}
                VmExit::Shutdown => {
                    log::info!("vcpu{id}: triple fault (shutdown); treating it as a reset");
                    let _ = self.tx.send(Event::Device(VmEvent::Reset));
                    return;
                }
                VmExit::Reset => {
                    let _ = self.tx.send(Event::Device(VmEvent::Reset));
                    return;
                }
                VmExit::PowerOff => {
                    let _ = self.tx.send(Event::Device(VmEvent::PowerOff));
                    return;
                }
                VmExit::Crash => return self.fail(id, "guest reported a crash".into()),
                VmExit::InternalError(e) => {
                    let desc = e.describe();
                    let regs = vcpu
                        .regs()
                        .map(|r| format!("RIP {:#x}, RSP {:#x}", r.rip, r.rsp))
                        .unwrap_or_else(|e| format!("registers unavailable: {e}"));
                    return self.fail(id, format!("KVM internal error: {desc} at {regs}"));
                }
                VmExit::FailEntry { reason } => {
                    return self.fail(id, format!("VM entry failed, hardware reason {reason:#x}"));
                }
                VmExit::Other(n) => {
                    return self.fail(id, format!("unhandled KVM exit reason {n}"));
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "machine_test.rs"]
mod tests;
