//! virtio-rng: guest entropy from the host's `getrandom(2)`.

use alioth_queue::DescChain;
use alioth_virtio::{BufferAction, ChainHandler, DeviceId, RING_FEATURES, Virtio};
use vm_memory::GuestMemoryMmap;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets (the driver simply asks again for more).
pub const MAX_PER_REQUEST: usize = 64 << 10;

/// The entropy device: one queue of device-writable buffers, filled from `getrandom(2)`.
pub struct VirtioRng {
    name: String,
    limiter: alioth_virtio::RateLimiter,
}

impl VirtioRng {
    /// A device named `name` (for logs).
    pub fn new(name: &str) -> Self {
        Self::limited(name, &alioth_virtio::RateLimit::default())
    }

    /// A device whose bytes and requests per second `limit` bounds (a guest draining the
    /// host's entropy waits).
    pub fn limited(name: &str, limit: &alioth_virtio::RateLimit) -> Self {
        VirtioRng {
            name: name.to_string(),
            limiter: alioth_virtio::RateLimiter::new(limit),
        }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Virtio for VirtioRng {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Entropy
    }

    fn device_features(&self) -> u64 {
        RING_FEATURES
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &[]
    }
}

impl ChainHandler for VirtioRng {
    fn handle(&mut self, _queue: u16, chain: &DescChain, mem: &GuestMemoryMmap) -> BufferAction {
        let len = (chain.writable_len() as usize).min(MAX_PER_REQUEST);
        if let Err(wait) = self.limiter.admit(len as u64) {
            return BufferAction::Throttle(wait);
        }
        let mut buf = vec![0u8; len];
        if let Err(e) = getrandom(&mut buf) {
            log::error!("{}: getrandom: {e}", self.name);
            return BufferAction::Written(0);
        }
        match chain.write_at(mem, 0, &buf) {
            Ok(n) => BufferAction::Written(n as u32),
            Err(e) => BufferAction::Invalid(e.to_string()),
        }
    }

    fn complete(
        &mut self,
        _queue: u16,
        _chain: &DescChain,
        _mem: &GuestMemoryMmap,
        _result: std::io::Result<usize>,
    ) -> u32 {
        // `handle` never asks for I/O.
        0
    }
}

#[cfg(test)]
#[path = "rng_test.rs"]
mod tests;
