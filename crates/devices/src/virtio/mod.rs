//! Virtio devices.

pub mod blk;
pub mod net;
pub mod rng;
pub mod vsock;
