//! Virtio devices.

pub mod blk;
pub mod console;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(test)]
mod test_rig;
