//! The TOML file schema and the merge of file and flags into a [`VmConfig`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use alioth_vmm::{
    BlkConfig, BootProtocol, ConsoleDeviceConfig, ConsoleMode, DiskConfig, IoBackend, NetConfig,
    NetDeviceConfig, RngConfig, SerialConfig, VhostUserConfig, VhostUserDeviceConfig, VmConfig,
    VsockConfig, VsockDeviceConfig,
};

use alioth_vmm::RateLimit;
use alioth_vmm::sandbox::SeccompMode;

use crate::{BootArgs, VhostUserArgs, VhostUserDevice};

/// The TOML schema (docs/config.md). Unknown keys are errors.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<Size>,
    pub serial: Option<String>,
    pub cpu_features: Option<String>,
    pub boot_protocol: Option<String>,
    pub exit_device: Option<ExitDevice>,
    /// `[[disk]]` tables.
    #[serde(default)]
    pub disk: Vec<DiskFile>,
    /// `[rng]`: present = enabled.
    pub rng: Option<RngFile>,
    /// `[[net]]` tables.
    #[serde(default)]
    pub net: Vec<NetFile>,
    /// `[vsock]`: present = enabled.
    pub vsock: Option<VsockFile>,
    /// `[console]`: present = enabled.
    pub console: Option<ConsoleFile>,
    /// The control API's Unix socket.
    pub api_socket: Option<PathBuf>,
    /// `on`, `log` or `off`.
    pub seccomp: Option<String>,
}

/// The `[console]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFile {
    /// `stdio`, `pty`, `file:PATH`, `socket:PATH` or `off`.
    pub mode: Option<String>,
    pub backend: Option<String>,
}

/// Parses a console mode: `stdio`, `pty`, `file:PATH`, `socket:PATH`, or `off` (`None`).
/// Relative paths are relative to `base`.
pub fn parse_console(s: &str, base: &Path) -> Result<Option<ConsoleMode>> {
    let path = |p: &str| -> Result<PathBuf> {
        if p.is_empty() {
            bail!("console `{s}`: the path is empty");
        }
        Ok(base.join(p))
    };
    Ok(Some(match s {
        "stdio" => ConsoleMode::Stdio,
        "pty" => ConsoleMode::Pty,
        "off" | "none" => return Ok(None),
        _ => match s.split_once(':') {
            Some(("file", p)) => ConsoleMode::File(path(p)?),
            Some(("socket", p)) => ConsoleMode::Socket(path(p)?),
            _ => {
                bail!("console `{s}`: expected `stdio`, `pty`, `file:PATH`, `socket:PATH` or `off`")
            }
        },
    }))
}

/// The `[vsock]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockFile {
    /// The guest's CID (3 or more).
    pub cid: Option<u64>,
    /// The host Unix socket.
    pub uds: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub backend: Option<String>,
}

impl VsockFile {
    fn into_config(self, base: &Path) -> Result<VsockDeviceConfig> {
        let Some(cid) = self.cid else {
            bail!("vsock: `cid` is missing (the guest's CID, 3 or more)");
        };
        let Some(uds) = self.uds else {
            bail!("vsock: `uds` is missing (the host socket path)");
        };
        let mut vsock = VsockConfig::new(cid, base.join(uds));
        if let Some(m) = self.max_connections {
            vsock.max_connections = m;
        }
        Ok(VsockDeviceConfig {
            vsock,
            backend: match &self.backend {
                Some(b) => parse_backend(b)?,
                None => IoBackend::Auto,
            },
        })
    }
}

/// Parses `--vsock cid=N,uds=PATH[,max_connections=N][,backend=B]`.
pub fn parse_vsock_flag(spec: &str) -> Result<VsockFile> {
    let mut f = VsockFile::default();
    let mut seen = std::collections::HashSet::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("--vsock `{item}`: expected key=value");
        };
        if !seen.insert(k) {
            bail!("--vsock `{spec}`: `{k}` is given twice");
        }
        match k {
            "cid" => f.cid = Some(v.parse().with_context(|| format!("--vsock cid=`{v}`"))?),
            "uds" => f.uds = Some(PathBuf::from(v)),
            "max_connections" => {
                f.max_connections = Some(
                    v.parse()
                        .with_context(|| format!("--vsock max_connections=`{v}`"))?,
                )
            }
            "backend" => f.backend = Some(v.to_string()),
            _ => bail!("--vsock: unknown key `{k}` (cid, uds, max_connections, backend)"),
        }
    }
    Ok(f)
}

/// One `[[net]]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetFile {
    /// A tap's name, or `auto` for a new one named `alioth%d`.
    pub tap: Option<String>,
    pub mac: Option<String>,
    pub queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub mtu: Option<u16>,
    pub backend: Option<String>,
    pub poll_us: Option<u32>,
    /// Each direction limited on its own.
    pub rate_limit: Option<RateLimitFile>,
}

/// Parses `aa:bb:cc:dd:ee:ff` (unicast).
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || anyhow::anyhow!("mac `{s}`: expected six hex bytes such as 02:00:00:00:00:01");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        bail!("mac `{s}` is a multicast address (the first byte must be even)");
    }
    if mac == [0; 6] {
        bail!("mac `{s}` is all zeros");
    }
    Ok(mac)
}

/// A random locally administered unicast MAC address (02:xx:...).
fn random_mac() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .to_le_bytes();
    [0x02, r[0], r[1], r[2], r[3], r[4]]
}

impl NetFile {
    fn into_config(self) -> Result<NetDeviceConfig> {
        use alioth_vmm::net::{AUTO_NAME, DEFAULT_MTU, DEFAULT_QUEUE_SIZE};
        let tap = match self.tap.as_deref() {
            None | Some("auto") => AUTO_NAME.to_string(),
            Some("") => bail!("net: tap name is empty (give a name or `auto`)"),
            Some(t) => t.to_string(),
        };
        Ok(NetDeviceConfig {
            net: NetConfig {
                tap,
                mac: match &self.mac {
                    Some(m) => parse_mac(m)?,
                    None => random_mac(),
                },
                queue_pairs: self.queues.unwrap_or(1),
                queue_size: self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
                mtu: self.mtu.unwrap_or(DEFAULT_MTU),
                rate_limit: self
                    .rate_limit
                    .map(|r| r.into_limit())
                    .transpose()?
                    .unwrap_or_default(),
            },
            backend: match &self.backend {
                Some(b) => parse_backend(b)?,
                None => IoBackend::Auto,
            },
            poll_us: self.poll_us.unwrap_or(0),
        })
    }
}

/// Parses `--net tap=NAME|auto,mac=..,queues=N,queue_size=N,mtu=N,backend=B`.
pub fn parse_net_flag(spec: &str) -> Result<NetFile> {
    let mut n = NetFile::default();
    let mut seen = std::collections::HashSet::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("--net `{item}`: expected key=value");
        };
        if !seen.insert(k) {
            bail!("--net `{spec}`: `{k}` is given twice");
        }
        let num = |what: &str| -> Result<u16> {
            v.parse().with_context(|| format!("--net {what}=`{v}`"))
        };
        match k {
            "tap" => n.tap = Some(v.to_string()),
            "mac" => n.mac = Some(v.to_string()),
            "queues" => n.queues = Some(num("queues")?),
            "queue_size" => n.queue_size = Some(num("queue_size")?),
            "mtu" => n.mtu = Some(num("mtu")?),
            "backend" => n.backend = Some(v.to_string()),
            "poll_us" => {
                n.poll_us = Some(v.parse().with_context(|| format!("--net poll_us=`{v}`"))?)
            }
            "bandwidth" => {
                n.rate_limit.get_or_insert_with(Default::default).bandwidth =
                    Some(Size::Text(v.to_string()))
            }
            "ops" => {
                n.rate_limit.get_or_insert_with(Default::default).ops =
                    Some(v.parse().with_context(|| format!("--net ops=`{v}`"))?)
            }
            _ => bail!(
                "--net: unknown key `{k}` (tap, mac, queues, queue_size, mtu, backend, poll_us, bandwidth, ops)"
            ),
        }
    }
    Ok(n)
}

/// One `[[disk]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    pub path: Option<PathBuf>,
    /// The socket of a vhost-user backend that serves the disk instead.
    pub vhost_user: Option<PathBuf>,
    pub read_only: Option<bool>,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub direct: Option<bool>,
    pub backend: Option<String>,
    pub poll_us: Option<u32>,
    /// Take the image's lock (default on).
    pub lock: Option<bool>,
    /// `rate_limit = { bandwidth = "100M", ops = 10000 }`.
    pub rate_limit: Option<RateLimitFile>,
}

/// A device's `rate_limit` table: bytes per second (a size: `100M` is 100 MiB/s), requests per
/// second, and one-time bursts of each.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub bandwidth: Option<Size>,
    pub ops: Option<u64>,
    pub bandwidth_burst: Option<Size>,
    pub ops_burst: Option<u64>,
}

impl RateLimitFile {
    fn into_limit(self) -> Result<RateLimit> {
        let size = |s: Size, what: &str| -> Result<u64> {
            match s {
                Size::Bytes(b) => Ok(b),
                Size::Text(t) => parse_size(&t).with_context(|| format!("rate_limit {what}")),
            }
        };
        let limit = RateLimit {
            bandwidth: self.bandwidth.map(|b| size(b, "bandwidth")).transpose()?,
            ops: self.ops,
            bandwidth_burst: self
                .bandwidth_burst
                .map(|b| size(b, "bandwidth_burst"))
                .transpose()?
                .unwrap_or(0),
            ops_burst: self.ops_burst.unwrap_or(0),
        };
        if limit.bandwidth == Some(0) || limit.ops == Some(0) {
            bail!("rate_limit: a limit of 0 would stop the device; leave the key out for no limit");
        }
        if (limit.bandwidth_burst > 0 && limit.bandwidth.is_none())
            || (limit.ops_burst > 0 && limit.ops.is_none())
        {
            bail!("rate_limit: a burst needs its rate (bandwidth or ops)");
        }
        Ok(limit)
    }

    fn of(l: &RateLimit) -> Option<RateLimitFile> {
        l.is_limited().then(|| RateLimitFile {
            bandwidth: l.bandwidth.map(Size::Bytes),
            ops: l.ops,
            bandwidth_burst: (l.bandwidth_burst > 0).then_some(Size::Bytes(l.bandwidth_burst)),
            ops_burst: (l.ops_burst > 0).then_some(l.ops_burst),
        })
    }
}

/// The `[rng]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RngFile {
    pub backend: Option<String>,
    pub rate_limit: Option<RateLimitFile>,
}

/// Default queue count of a disk.
const DISK_QUEUES: u16 = 1;
/// Default queue size of a disk.
const DISK_QUEUE_SIZE: u16 = 256;

fn parse_backend(s: &str) -> Result<IoBackend> {
    Ok(match s {
        "auto" => IoBackend::Auto,
        "io_uring" | "io-uring" => IoBackend::IoUring,
        "epoll" => IoBackend::Epoll,
        _ => bail!("backend `{s}`: expected `auto`, `io_uring` or `epoll`"),
    })
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    Ok(match v {
        "on" | "true" | "yes" | "1" => true,
        "off" | "false" | "no" | "0" => false,
        _ => bail!("{key}=`{v}`: expected on or off"),
    })
}

impl DiskFile {
    fn into_config(self, base: &Path) -> Result<DiskConfig> {
        let path = match (&self.path, &self.vhost_user) {
            (Some(p), None) => base.join(p),
            (None, Some(_)) => PathBuf::new(),
            (Some(_), Some(_)) => bail!("a disk has either a path or vhost_user, not both"),
            (None, None) => bail!("a disk needs a path (or vhost_user)"),
        };
        if self.vhost_user.is_some()
            && (self.read_only.is_some()
                || self.num_queues.is_some()
                || self.queue_size.is_some()
                || self.direct.is_some()
                || self.backend.is_some()
                || self.poll_us.is_some()
                || self.lock.is_some()
                || self.rate_limit.is_some())
        {
            bail!(
                "a vhost_user disk takes its settings from the backend; read_only, num_queues, queue_size, direct, backend, poll_us, lock and rate_limit belong there"
            );
        }
        Ok(DiskConfig {
            vhost_user: self.vhost_user.map(|s| base.join(s)),
            blk: BlkConfig {
                path,
                read_only: self.read_only.unwrap_or(false),
                num_queues: self.num_queues.unwrap_or(DISK_QUEUES),
                queue_size: self.queue_size.unwrap_or(DISK_QUEUE_SIZE),
                direct: self.direct.unwrap_or(false),
                lock: self.lock.unwrap_or(true),
                rate_limit: self
                    .rate_limit
                    .map(|r| r.into_limit())
                    .transpose()?
                    .unwrap_or_default(),
            },
            backend: match &self.backend {
                Some(b) => parse_backend(b)?,
                None => IoBackend::Auto,
            },
            poll_us: self.poll_us.unwrap_or(DEFAULT_DISK_POLL_US),
        })
    }
}

/// A disk's polling window when none is given (`poll_us`), in microseconds: adaptive polling is
/// on by default for disks, as QEMU's `poll-max-ns` (32 µs) is for its I/O threads. A block
/// driver's next request follows its completions within microseconds, while a worker that
/// sleeps in between costs a thread wake-up and the guest an exit to notify it, each far more
/// (tens of µs on nested virtualization); the window shrinks to 1/16 when polls miss, and an
/// idle disk never polls. `0` turns it off. (Net devices stay at 0: their traffic is often
/// one-way, with nothing to wait for.)
pub const DEFAULT_DISK_POLL_US: u32 = 32;

/// Parses `--disk PATH` or `--disk path=PATH,read_only=on,num_queues=2,...`.
pub fn parse_disk_flag(spec: &str) -> Result<DiskFile> {
    if !spec.contains('=') {
        return Ok(DiskFile {
            path: Some(PathBuf::from(spec)),
            vhost_user: None,
            read_only: None,
            num_queues: None,
            queue_size: None,
            direct: None,
            backend: None,
            poll_us: None,
            lock: None,
            rate_limit: None,
        });
    }
    let mut d = DiskFile {
        path: None,
        vhost_user: None,
        read_only: None,
        num_queues: None,
        queue_size: None,
        direct: None,
        backend: None,
        poll_us: None,
        lock: None,
        rate_limit: None,
    };
    let mut seen = std::collections::HashSet::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("--disk `{item}`: expected key=value");
        };
        if !seen.insert(k) {
            bail!("--disk `{spec}`: `{k}` is given twice");
        }
        match k {
            "path" => d.path = Some(PathBuf::from(v)),
            "vhost_user" => d.vhost_user = Some(PathBuf::from(v)),
            "read_only" | "readonly" => d.read_only = Some(parse_bool(k, v)?),
            "direct" => d.direct = Some(parse_bool(k, v)?),
            "lock" => d.lock = Some(parse_bool(k, v)?),
            "num_queues" => {
                d.num_queues = Some(v.parse().with_context(|| format!("num_queues=`{v}`"))?)
            }
            "queue_size" => {
                d.queue_size = Some(v.parse().with_context(|| format!("queue_size=`{v}`"))?)
            }
            "backend" => d.backend = Some(v.to_string()),
            "poll_us" => d.poll_us = Some(v.parse().with_context(|| format!("poll_us=`{v}`"))?),
            "bandwidth" => {
                d.rate_limit.get_or_insert_with(Default::default).bandwidth =
                    Some(Size::Text(v.to_string()))
            }
            "ops" => {
                d.rate_limit.get_or_insert_with(Default::default).ops =
                    Some(v.parse().with_context(|| format!("ops=`{v}`"))?)
            }
            _ => bail!(
                "--disk: unknown key `{k}` (path, vhost_user, read_only, num_queues, queue_size, direct, backend, poll_us, lock, bandwidth, ops)"
            ),
        }
    }
    if d.path.is_none() && d.vhost_user.is_none() {
        bail!("--disk `{spec}`: path= (or vhost_user=) is missing");
    }
    Ok(d)
}

/// A size: an integer number of bytes or a string with a unit.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// `exit_device = true | false | PORT`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ExitDevice {
    Enabled(bool),
    Port(u16),
}

/// The default exit device port.
const EXIT_PORT: u16 = 0xf4;

/// Parses `512M`, `2G`, `1GiB`, `4096`, ... into bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        bail!("`{s}` is not a size (expected e.g. 512M or 2G)");
    }
    let n: u64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a size"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => bail!("`{s}`: unknown size unit `{other}` (use K, M, G or T)"),
    };
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("`{s}` is too large"))
}

fn parse_serial(s: &str, base: &Path) -> Result<SerialConfig> {
    Ok(match s {
        "stdio" => SerialConfig::Stdio,
        "off" | "none" => SerialConfig::Off,
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => {
                let p = base.join(p);
                // A FIFO would block the VM in open; a device such as /dev/full loses output.
                if let Ok(m) = std::fs::metadata(&p)
                    && !m.is_file()
                {
                    bail!(
                        "serial file {} exists and is not a regular file",
                        p.display()
                    );
                }
                SerialConfig::File(p)
            }
            _ => bail!("serial `{s}`: expected `stdio`, `off` or `file:PATH`"),
        },
    })
}

fn parse_protocol(s: &str) -> Result<BootProtocol> {
    Ok(match s {
        "auto" => BootProtocol::Auto,
        "linux64" => BootProtocol::Linux64,
        "pvh" => BootProtocol::Pvh,
        _ => bail!("boot protocol `{s}`: expected `auto`, `linux64` or `pvh`"),
    })
}

fn parse_exit_flag(s: &str) -> Result<Option<u16>> {
    Ok(match s {
        "on" | "true" => Some(EXIT_PORT),
        "off" | "false" => None,
        _ => {
            let port = if let Some(h) = s.strip_prefix("0x") {
                u16::from_str_radix(h, 16)
            } else {
                s.parse()
            };
            Some(port.with_context(|| {
                format!("exit device `{s}`: expected `on`, `off` or a port number")
            })?)
        }
    })
}

/// Reads and parses the TOML file; errors name the file, line and column.
pub fn read_file(path: &Path) -> Result<FileConfig> {
    let text = read_config_text(path)?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The largest configuration file read (a VM description is a few hundred bytes).
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;

/// Reads a configuration file: only a regular file (a FIFO or a device such as /dev/zero would
/// block or never end), of at most [`MAX_CONFIG_SIZE`] bytes.
pub fn read_config_text(path: &Path) -> Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if !meta.is_file() {
        bail!("config file {} is not a regular file", path.display());
    }
    if meta.len() > MAX_CONFIG_SIZE {
        bail!(
            "config file {} is {} bytes; at most {MAX_CONFIG_SIZE} are read",
            path.display(),
            meta.len()
        );
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_SIZE + 1).read_to_string(&mut text))
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_SIZE {
        bail!(
            "config file {} grew past {MAX_CONFIG_SIZE} bytes while read",
            path.display()
        );
    }
    Ok(text)
}

/// The configuration recorded in the snapshot at `dir`. Flags may replace what belongs to the
/// host side (disks, with the same count; serial, console, vsock and net endpoints; the API
/// socket), never what the guest's state depends on.
fn restore_file(args: &BootArgs, dir: &Path) -> Result<FileConfig> {
    let fixed = [
        (args.kernel.is_some(), "--kernel"),
        (args.initramfs.is_some(), "--initramfs"),
        (args.cmdline.is_some(), "--cmdline"),
        (args.cpus.is_some(), "--cpus"),
        (args.memory.is_some(), "--memory"),
        (args.cpu_features.is_some(), "--cpu-features"),
        (args.boot_protocol.is_some(), "--boot-protocol"),
        (args.rng, "--rng"),
        (args.exit_device.is_some(), "--exit-device"),
    ];
    if let Some((_, flag)) = fixed.iter().find(|(given, _)| *given) {
        bail!("{flag} cannot be changed when restoring: the snapshot's guest depends on it");
    }
    let m = alioth_vmm::snapshot::read_manifest(dir)?;
    let mut file: FileConfig = toml::from_str(&m.config)
        .with_context(|| format!("snapshot {}: its configuration is corrupt", dir.display()))?;
    // The snapshotted VM's API socket belongs to that process (which may still run): a
    // restored VM serves the API only where --api-socket (or vm.restore's process) says.
    file.api_socket = None;
    if !args.disk.is_empty() && args.disk.len() != file.disk.len() {
        bail!(
            "the snapshot has {} disk(s); --disk must replace all of them ({} given)",
            file.disk.len(),
            args.disk.len()
        );
    }
    Ok(file)
}

/// `--seccomp` / `seccomp`: on, log or off.
pub fn parse_seccomp(s: &str) -> Result<SeccompMode> {
    Ok(match s {
        "on" => SeccompMode::On,
        "log" => SeccompMode::Log,
        "off" => SeccompMode::Off,
        _ => bail!("seccomp `{s}`: expected `on`, `log` or `off`"),
    })
}

/// `p` made absolute (a snapshot's configuration is read from another directory).
fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn backend_name(b: IoBackend) -> Option<String> {
    match b {
        IoBackend::Auto => None,
        IoBackend::IoUring => Some("io_uring".into()),
        IoBackend::Epoll => Some("epoll".into()),
    }
}

/// The TOML file that describes `c` (paths absolute): what a snapshot's manifest records, so a
/// restore rebuilds the same VM.
pub fn to_toml(c: &VmConfig, api_socket: Option<&Path>) -> Result<String> {
    let mac = |m: [u8; 6]| {
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    };
    let f = FileConfig {
        kernel: Some(abs(&c.kernel.kernel)),
        initramfs: c.kernel.initramfs.as_deref().map(abs),
        cmdline: Some(c.kernel.cmdline.clone()),
        cpus: Some(c.cpus),
        memory: Some(Size::Bytes(c.memory)),
        serial: Some(match &c.serial {
            SerialConfig::Stdio => "stdio".into(),
            SerialConfig::Off => "off".into(),
            SerialConfig::File(p) => format!("file:{}", abs(p).display()),
        }),
        cpu_features: (!c.cpu_features.is_empty()).then(|| {
            c.cpu_features
                .iter()
                .map(|e| match e {
                    alioth_vmm::CpuFeatureEdit::Remove(f) => format!("-{}", f.name()),
                })
                .collect::<Vec<_>>()
                .join(",")
        }),
        boot_protocol: Some(
            match c.kernel.protocol {
                BootProtocol::Auto => "auto",
                BootProtocol::Linux64 => "linux64",
                BootProtocol::Pvh => "pvh",
            }
            .into(),
        ),
        exit_device: c.exit_device.map(ExitDevice::Port),
        disk: c
            .disks
            .iter()
            .map(|d| DiskFile {
                path: d.vhost_user.is_none().then(|| abs(&d.blk.path)),
                vhost_user: d.vhost_user.as_deref().map(abs),
                read_only: Some(d.blk.read_only),
                num_queues: Some(d.blk.num_queues),
                queue_size: Some(d.blk.queue_size),
                direct: Some(d.blk.direct),
                backend: backend_name(d.backend),
                poll_us: Some(d.poll_us),
                lock: Some(d.blk.lock),
                rate_limit: RateLimitFile::of(&d.blk.rate_limit),
            })
            .collect(),
        rng: c.rng.as_ref().map(|r| RngFile {
            backend: backend_name(r.backend),
            rate_limit: RateLimitFile::of(&r.rate_limit),
        }),
        net: c
            .nets
            .iter()
            .map(|n| NetFile {
                tap: Some(n.net.tap.clone()),
                mac: Some(mac(n.net.mac)),
                queues: Some(n.net.queue_pairs),
                queue_size: Some(n.net.queue_size),
                mtu: Some(n.net.mtu),
                backend: backend_name(n.backend),
                poll_us: Some(n.poll_us),
                rate_limit: RateLimitFile::of(&n.net.rate_limit),
            })
            .collect(),
        vsock: c.vsock.as_ref().map(|v| VsockFile {
            cid: Some(v.vsock.cid),
            uds: Some(abs(&v.vsock.uds)),
            max_connections: Some(v.vsock.max_connections),
            backend: backend_name(v.backend),
        }),
        console: c.console.as_ref().map(|k| ConsoleFile {
            mode: Some(match &k.mode {
                ConsoleMode::Stdio => "stdio".into(),
                ConsoleMode::Pty => "pty".into(),
                ConsoleMode::File(p) => format!("file:{}", abs(p).display()),
                ConsoleMode::Socket(p) => format!("socket:{}", abs(p).display()),
            }),
            backend: backend_name(k.backend),
        }),
        api_socket: api_socket.map(abs),
        seccomp: Some(
            match c.seccomp {
                SeccompMode::On => "on",
                SeccompMode::Log => "log",
                SeccompMode::Off => "off",
            }
            .into(),
        ),
    };
    toml::to_string(&f).context("describing the VM as TOML")
}

/// Merges the file named by `--config` (if any) with the flags, which win (the tests' view:
/// the VM alone).
#[cfg(test)]
pub fn build(args: &BootArgs) -> Result<VmConfig> {
    build_boot(args).map(|(c, _)| c)
}

/// Merges the file named by `--config` (if any) with the flags, which win; returns the VM and
/// the API socket (`--api-socket` or `api_socket`), checked: its directory
/// exists and nothing but a socket is in its place.
pub fn build_boot(args: &BootArgs) -> Result<(VmConfig, Option<PathBuf>)> {
    let (file, base) = match (&args.restore, &args.config) {
        (Some(_), Some(_)) => {
            bail!("--restore takes the VM's configuration from the snapshot; drop --config")
        }
        (Some(dir), None) => (restore_file(args, dir)?, PathBuf::from("/")),
        (None, Some(p)) => {
            let base = p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (read_file(p)?, base)
        }
        (None, None) => (FileConfig::default(), PathBuf::from(".")),
    };
    let cwd = PathBuf::from(".");
    let kernel = match (&args.kernel, &file.kernel) {
        (Some(k), _) => k.clone(),
        (None, Some(k)) => base.join(k),
        (None, None) => bail!("no kernel given: pass --kernel PATH or set `kernel` in the config"),
    };
    let mut config = VmConfig::new(kernel);
    config.kernel.initramfs = match (&args.initramfs, &file.initramfs) {
        (Some(i), _) => Some(i.clone()),
        (None, Some(i)) => Some(base.join(i)),
        _ => None,
    };
    if let Some(c) = args.cmdline.as_ref().or(file.cmdline.as_ref()) {
        config.kernel.cmdline = c.clone();
    }
    if let Some(n) = args.cpus.or(file.cpus) {
        config.cpus = n;
    }
    let memory = match (&args.memory, &file.memory) {
        (Some(m), _) => Some(parse_size(m).context("--memory")?),
        (None, Some(Size::Bytes(b))) => Some(*b),
        (None, Some(Size::Text(t))) => Some(parse_size(t).context("memory")?),
        _ => None,
    };
    if let Some(m) = memory {
        if m == 0 {
            bail!("memory must be larger than 0");
        }
        config.memory = m;
    }
    config.serial = match (&args.serial, &file.serial) {
        (Some(s), _) => parse_serial(s, &cwd)?,
        (None, Some(s)) => parse_serial(s, &base)?,
        _ => SerialConfig::Stdio,
    };
    if let Some(f) = args.cpu_features.as_ref().or(file.cpu_features.as_ref()) {
        config.cpu_features = alioth_vmm::parse_cpu_features(f)?;
    }
    if let Some(p) = args.boot_protocol.as_ref().or(file.boot_protocol.as_ref()) {
        config.kernel.protocol = parse_protocol(p)?;
    }
    config.exit_device = match (&args.exit_device, &file.exit_device) {
        (Some(s), _) => parse_exit_flag(s)?,
        (None, Some(ExitDevice::Enabled(true))) => Some(EXIT_PORT),
        (None, Some(ExitDevice::Enabled(false))) | (None, None) => None,
        (None, Some(ExitDevice::Port(p))) => Some(*p),
    };
    // Disks: --disk flags replace the file's [[disk]] list.
    config.disks = if args.disk.is_empty() {
        file.disk
            .iter()
            .cloned()
            .map(|d| d.into_config(&base))
            .collect::<Result<_>>()?
    } else {
        args.disk
            .iter()
            .map(|s| parse_disk_flag(s).and_then(|d| d.into_config(&cwd)))
            .collect::<Result<_>>()?
    };
    config.rng = match (&file.rng, args.rng) {
        (Some(r), _) => Some(RngConfig {
            backend: match &r.backend {
                Some(b) => parse_backend(b)?,
                None => IoBackend::Auto,
            },
            rate_limit: r
                .rate_limit
                .clone()
                .map(|l| l.into_limit())
                .transpose()?
                .unwrap_or_default(),
        }),
        (None, true) => Some(RngConfig::default()),
        (None, false) => None,
    };
    // Net devices: --net flags replace the file's [[net]] list.
    config.nets = if args.net.is_empty() {
        file.net
            .iter()
            .cloned()
            .map(NetFile::into_config)
            .collect::<Result<_>>()?
    } else {
        args.net
            .iter()
            .map(|s| parse_net_flag(s).and_then(NetFile::into_config))
            .collect::<Result<_>>()?
    };
    // The vsock device: the flag replaces the file's table.
    config.vsock = match (&args.vsock, &file.vsock) {
        (Some(s), _) => Some(parse_vsock_flag(s)?.into_config(&cwd)?),
        (None, Some(v)) => Some(v.clone().into_config(&base)?),
        (None, None) => None,
    };
    if let Some(m) = args.seccomp.as_ref().or(file.seccomp.as_ref()) {
        config.seccomp = parse_seccomp(m)?;
    }
    // The console: the flag replaces the file's table.
    config.console = match (&args.console, &file.console) {
        (Some(m), _) => parse_console(m, &cwd)?.map(|mode| ConsoleDeviceConfig {
            mode,
            backend: IoBackend::Auto,
        }),
        (None, Some(c)) => {
            let Some(m) = &c.mode else {
                bail!("console: `mode` is missing (stdio, pty, file:PATH, socket:PATH or off)");
            };
            let backend = match &c.backend {
                Some(b) => parse_backend(b)?,
                None => IoBackend::Auto,
            };
            parse_console(m, &base)?.map(|mode| ConsoleDeviceConfig { mode, backend })
        }
        (None, None) => None,
    };
    config.validate()?;
    let api_socket = match (&args.api_socket, &file.api_socket) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => Some(base.join(p)),
        (None, None) => None,
    };
    if let Some(p) = &api_socket {
        check_socket_path(p, "api_socket")?;
    }
    Ok((config, api_socket))
}

/// A Unix socket path Alioth will create: its directory exists, it fits `sun_path`, and
/// nothing but a (stale) socket is in its place.
fn check_socket_path(p: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if p.as_os_str().is_empty() || p.as_os_str().len() > 107 {
        bail!("{what} {}: must be 1 to 107 bytes long", p.display());
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("{what} {}: the directory does not exist", p.display());
    }
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if !m.file_type().is_socket() {
            bail!(
                "{what} {} exists and is not a socket; refusing to replace it",
                p.display()
            );
        }
        // Found before the VM is built (the server binds once there is a machine).
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            bail!("{what} {}: another process is listening on it", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_test.rs"]
mod tests;

/// The TOML schema of `alioth vhost-user --config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserFile {
    pub socket: Option<PathBuf>,
    pub blk: Option<DiskFile>,
    pub rng: Option<RngFile>,
    pub net: Option<NetFile>,
}

/// `alioth vhost-user`: a device subcommand, or the file named by `--config`.
pub fn build_vhost_user(args: &VhostUserArgs) -> Result<VhostUserConfig> {
    let cwd = PathBuf::from(".");
    match (&args.device, &args.config) {
        (Some(_), Some(_)) => bail!("give either a device subcommand or --config, not both"),
        (None, None) => bail!("give a device (`blk`, `net` or `rng`) or --config FILE"),
        (Some(VhostUserDevice::Net { socket, net }), None) => Ok(VhostUserConfig {
            socket: socket.clone(),
            device: VhostUserDeviceConfig::Net(parse_net_flag(net)?.into_config()?),
        }),
        (Some(VhostUserDevice::Blk { socket, disk }), None) => {
            let d = parse_disk_flag(disk)?;
            if d.vhost_user.is_some() {
                bail!("--disk: a vhost-user backend serves an image (path=), not another socket");
            }
            Ok(VhostUserConfig {
                socket: socket.clone(),
                device: VhostUserDeviceConfig::Blk(d.into_config(&cwd)?),
            })
        }
        (Some(VhostUserDevice::Rng { socket, backend }), None) => Ok(VhostUserConfig {
            socket: socket.clone(),
            device: VhostUserDeviceConfig::Rng(RngConfig {
                backend: backend
                    .as_deref()
                    .map(parse_backend)
                    .transpose()?
                    .unwrap_or_default(),
                rate_limit: RateLimit::default(),
            }),
        }),
        (None, Some(path)) => {
            let text = read_config_text(path)?;
            let file: VhostUserFile =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or(cwd);
            let Some(socket) = file.socket else {
                bail!("{}: `socket` is missing", path.display());
            };
            let device = match (file.blk, file.rng, file.net) {
                (None, None, Some(n)) => VhostUserDeviceConfig::Net(n.into_config()?),
                (Some(b), None, None) if b.vhost_user.is_some() => {
                    bail!(
                        "{}: [blk] serves an image (path), not another socket",
                        path.display()
                    )
                }
                (Some(b), None, None) => VhostUserDeviceConfig::Blk(b.into_config(&base)?),
                (None, Some(r), None) => VhostUserDeviceConfig::Rng(RngConfig {
                    rate_limit: r
                        .rate_limit
                        .clone()
                        .map(|l| l.into_limit())
                        .transpose()?
                        .unwrap_or_default(),
                    backend: r
                        .backend
                        .as_deref()
                        .map(parse_backend)
                        .transpose()?
                        .unwrap_or_default(),
                }),
                _ => bail!(
                    "{}: give exactly one of [blk], [net] and [rng]",
                    path.display()
                ),
            };
            Ok(VhostUserConfig {
                socket: base.join(socket),
                device,
            })
        }
    }
}
