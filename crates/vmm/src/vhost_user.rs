//! Serving one of Alioth's devices as a vhost-user backend (`alioth vhost-user`).

use std::path::PathBuf;

use alioth_devices::virtio::blk::VirtioBlk;
use alioth_devices::virtio::net::VirtioNet;
use alioth_devices::virtio::rng::VirtioRng;
use alioth_io_uring::IoUringBackend;
use alioth_vhost_user::{VhostUserDevice, bind, serve};
use alioth_virtio::{ChainHandler, EpollBackend};

use crate::config::{DiskConfig, IoBackend, NetDeviceConfig, RngConfig};
use crate::pci::{IO_URING_ENTRIES, use_io_uring};
use crate::{Error, Result};

/// Which device to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostUserDeviceConfig {
    /// virtio-blk on a disk image.
    Blk(DiskConfig),
    /// virtio-rng.
    Rng(RngConfig),
    /// virtio-net on a host tap.
    Net(NetDeviceConfig),
}

/// A vhost-user backend process: the socket it listens on and the device it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserConfig {
    /// The Unix socket frontends connect to.
    pub socket: PathBuf,
    /// The device.
    pub device: VhostUserDeviceConfig,
}

fn run<D: ChainHandler>(
    config: &VhostUserConfig,
    make: impl FnMut() -> std::io::Result<D> + Send + 'static,
    backend: IoBackend,
    poll_us: u32,
) -> Result<()> {
    let name = "vhost-user";
    // Bad input (device, socket) fails here, before anything is served.
    let listener = bind(&config.socket).map_err(|e| Error::Config(e.to_string()))?;
    let served = if use_io_uring(name, backend)? {
        let b = IoUringBackend::new(IO_URING_ENTRIES).with_poll(poll_us);
        let dev = VhostUserDevice::new(make, b).map_err(|e| Error::Device(e.to_string()))?;
        log::info!(
            "{}: serving on {} (io_uring)",
            dev.name(),
            config.socket.display()
        );
        serve(listener, dev, || false)
    } else {
        let dev = VhostUserDevice::new(make, EpollBackend::polling(poll_us))
            .map_err(|e| Error::Device(e.to_string()))?;
        log::info!(
            "{}: serving on {} (epoll)",
            dev.name(),
            config.socket.display()
        );
        serve(listener, dev, || false)
    };
    served.map_err(|e| Error::Io {
        what: format!("vhost-user on {}", config.socket.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Serves `config.device` on `config.socket` until the process is stopped: one frontend at a
/// time, the next after each disconnects. Errors in the device or socket configuration are
/// [`Error::is_user_error`]s.
pub fn serve_vhost_user(config: &VhostUserConfig) -> Result<()> {
    match &config.device {
        VhostUserDeviceConfig::Blk(d) => {
            let blk = d.blk.clone();
            // Open once up front so a bad image is reported before the socket is served.
            VirtioBlk::open("virtio-blk0", &blk).map_err(|e| Error::Device(e.to_string()))?;
            run(
                config,
                move || VirtioBlk::open("virtio-blk0", &blk).map_err(std::io::Error::other),
                d.backend,
                d.poll_us,
            )
        }
        VhostUserDeviceConfig::Net(n) => {
            let net = n.net.clone();
            n.net.validate().map_err(|e| Error::Config(e.to_string()))?;
            // io_uring keeps a read in flight on a blocking tap; epoll reads when readable.
            let nonblocking = !use_io_uring("vhost-user", n.backend)?;
            // Open once up front so a bad tap is reported before the socket is served (the
            // tap is reopened for each frontend).
            drop(
                VirtioNet::open("virtio-net0", &net, nonblocking)
                    .map_err(|e| Error::Device(e.to_string()))?,
            );
            run(
                config,
                move || {
                    VirtioNet::open("virtio-net0", &net, nonblocking).map_err(std::io::Error::other)
                },
                n.backend,
                n.poll_us,
            )
        }
        VhostUserDeviceConfig::Rng(r) => {
            let limit = r.rate_limit;
            run(
                config,
                move || Ok(VirtioRng::limited("virtio-rng0", &limit)),
                r.backend,
                0,
            )
        }
    }
}
