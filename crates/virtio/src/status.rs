//! The device status register (virtio 1.2 §2.1) and feature negotiation.

use alioth_queue::VIRTIO_F_VERSION_1;

/// Status bits.
pub struct StatusBits;

impl StatusBits {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// What a status write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// Nothing to do.
    None,
    /// Status 0: reset the device.
    Reset,
    /// FEATURES_OK was refused (unsupported features, or no VIRTIO_F_VERSION_1).
    FeaturesRejected,
    /// DRIVER_OK: start the device with these features.
    Activate(u64),
}

/// The status register and negotiated features of one device.
#[derive(Debug, Clone)]
pub struct DeviceStatus {
    status: u8,
    device_features: u64,
    driver_features: u64,
    /// What a driver does wrong it may do in a loop: its log lines are rate-limited.
    log: crate::LogLimiter,
}

impl DeviceStatus {
    /// A freshly reset device offering `device_features`.
    pub fn new(device_features: u64) -> Self {
        DeviceStatus {
            status: 0,
            device_features,
            driver_features: 0,
            log: crate::LogLimiter::new(),
        }
    }

    /// Puts back a status byte and the driver's features from a snapshot (no transition is
    /// run: the device is started by whoever restores it).
    pub fn restore(&mut self, status: u8, driver_features: u64) {
        self.status = status;
        self.driver_features = driver_features;
    }

    /// The register's value.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether the driver set DRIVER_OK (and no reset since).
    pub fn driver_ok(&self) -> bool {
        self.status & StatusBits::DRIVER_OK != 0
    }

    /// Whether the features can still change (FEATURES_OK not yet accepted).
    pub fn negotiating(&self) -> bool {
        self.status & StatusBits::FEATURES_OK == 0
    }

    /// Device features, 32 bits at a time (`select` 0 = low word).
    pub fn device_features_word(&self, select: u32) -> u32 {
        match select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 bits of its features; ignored once FEATURES_OK is set.
    pub fn set_driver_features_word(&mut self, select: u32, value: u32) {
        if !self.negotiating() {
            self.log.warn(format_args!(
                "driver changed features after FEATURES_OK; ignored"
            ));
            return;
        }
        match select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// The negotiated features.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Marks the device broken; the transport should then send a config interrupt.
    pub fn set_needs_reset(&mut self) {
        if self.driver_ok() {
            self.status |= StatusBits::NEEDS_RESET;
        }
    }

    /// Handles a driver write of the status register.
    pub fn write(&mut self, value: u8) -> StatusChange {
        if value == 0 {
            *self = DeviceStatus::new(self.device_features);
            return StatusChange::Reset;
        }
        if value & self.status & !StatusBits::NEEDS_RESET != self.status & !StatusBits::NEEDS_RESET
        {
            self.log.warn(format_args!(
                "driver cleared status bits ({:#x} -> {value:#x}) without a reset; ignored",
                self.status
            ));
            return StatusChange::None;
        }
        let new = value & !self.status & !StatusBits::NEEDS_RESET;
        let mut change = StatusChange::None;
        let mut accept = new;
        if new & StatusBits::FEATURES_OK != 0 {
            let unsupported = self.driver_features & !self.device_features;
            let version_1 = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if unsupported != 0 || !version_1 {
                self.log.warn(format_args!(
                    "driver features {:#x} refused (unsupported {unsupported:#x}, version 1: {version_1})",
                    self.driver_features
                ));
                accept &= !StatusBits::FEATURES_OK;
                change = StatusChange::FeaturesRejected;
            }
        }
        let features_ok = (self.status | accept) & StatusBits::FEATURES_OK != 0;
        if accept & StatusBits::DRIVER_OK != 0 {
            if features_ok {
                change = StatusChange::Activate(self.driver_features);
            } else {
                self.log
                    .warn(format_args!("DRIVER_OK before FEATURES_OK; ignored"));
                accept &= !StatusBits::DRIVER_OK;
            }
        }
        self.status |= accept;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    fn negotiate(s: &mut DeviceStatus, features: u64) {
        s.write(StatusBits::ACKNOWLEDGE);
        s.write(StatusBits::ACKNOWLEDGE | StatusBits::DRIVER);
        s.set_driver_features_word(0, features as u32);
        s.set_driver_features_word(1, (features >> 32) as u32);
    }

    #[test]
    fn full_handshake_activates_with_the_negotiated_features() {
        let mut s = DeviceStatus::new(V1 | 0b101);
        negotiate(&mut s, V1 | 0b001);
        let a = StatusBits::ACKNOWLEDGE | StatusBits::DRIVER;
        assert_eq!(s.write(a | StatusBits::FEATURES_OK), StatusChange::None);
        assert_ne!(s.status() & StatusBits::FEATURES_OK, 0);
        let ok = a | StatusBits::FEATURES_OK | StatusBits::DRIVER_OK;
        assert_eq!(s.write(ok), StatusChange::Activate(V1 | 1));
        assert!(s.driver_ok());
        s.set_driver_features_word(0, 0xff);
        assert_eq!(
            s.driver_features(),
            V1 | 1,
            "features frozen after FEATURES_OK"
        );
    }

    #[test]
    fn unsupported_or_legacy_features_are_refused() {
        let a = StatusBits::ACKNOWLEDGE | StatusBits::DRIVER;
        let mut s = DeviceStatus::new(V1 | 1);
        negotiate(&mut s, V1 | 0b10);
        assert_eq!(
            s.write(a | StatusBits::FEATURES_OK),
            StatusChange::FeaturesRejected
        );
        assert_eq!(
            s.status() & StatusBits::FEATURES_OK,
            0,
            "driver reads it back unset"
        );
        let mut s = DeviceStatus::new(V1 | 1);
        negotiate(&mut s, 1);
        assert_eq!(
            s.write(a | StatusBits::FEATURES_OK),
            StatusChange::FeaturesRejected
        );
    }

    #[test]
    fn driver_ok_needs_features_ok_and_zero_resets() {
        let mut s = DeviceStatus::new(V1);
        negotiate(&mut s, V1);
        let a = StatusBits::ACKNOWLEDGE | StatusBits::DRIVER;
        assert_eq!(s.write(a | StatusBits::DRIVER_OK), StatusChange::None);
        assert!(!s.driver_ok());
        s.write(a | StatusBits::FEATURES_OK);
        s.write(a | StatusBits::FEATURES_OK | StatusBits::DRIVER_OK);
        s.set_needs_reset();
        assert_ne!(s.status() & StatusBits::NEEDS_RESET, 0);
        assert_eq!(
            s.write(StatusBits::ACKNOWLEDGE),
            StatusChange::None,
            "clearing bits"
        );
        assert!(s.driver_ok());
        assert_eq!(s.write(0), StatusChange::Reset);
        assert_eq!((s.status(), s.driver_features()), (0, 0));
    }
}
