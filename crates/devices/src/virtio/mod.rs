//! Virtio devices.

pub mod blk;
pub mod rng;
