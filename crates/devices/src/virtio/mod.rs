//! Virtio devices.

pub mod rng;
