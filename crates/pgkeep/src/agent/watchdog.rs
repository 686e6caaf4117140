//! The hardware watchdog, as in Patroni: while this node leads, a watchdog device is kept alive
//! once per HA cycle with a timeout of `ttl - safety_margin`, so a machine whose agent stops
//! cycling (or whose kernel freezes) is reset before its lease can expire. The fence guard
//! covers a killed or frozen agent without a device; only a frozen kernel needs this.
//!
//! `watchdog.mode`: `off`; `automatic` (default: use the device if it works, say loudly when it
//! does not); `required` (a node without a working device never takes the leader key).
//! Leaving the leader role closes the device with the magic close character `V`, which stops a
//! device without `nowayout`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;

use nix::unistd::{AccessFlags, access};

use crate::config::{Watchdog as WatchdogConfig, WatchdogMode};

#[allow(unsafe_code)]
mod ioctl {
    // WDIOC_SETTIMEOUT = _IOWR('W', 6, int) from <linux/watchdog.h>.
    nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, std::ffi::c_int);
}

/// Sets the device's timeout in seconds; returns the timeout the driver chose.
#[allow(unsafe_code)]
fn set_timeout(dev: &File, secs: i32) -> nix::Result<i32> {
    let mut value: std::ffi::c_int = secs;
    // SAFETY: WDIOC_SETTIMEOUT reads and writes exactly one `int` through the pointer, which
    // points to `value`, a live, aligned i32 on this stack frame for the whole call; the fd is
    // open for the call's duration because `dev` is borrowed.
    unsafe { ioctl::wdioc_settimeout(dev.as_raw_fd(), &raw mut value) }?;
    Ok(value)
}

/// The watchdog device's state in the agent.
#[derive(Debug)]
pub(super) struct Watchdog {
    cfg: WatchdogConfig,
    dev: Option<File>,
    /// `required` and not working: reported to the core (no leader race) and peers.
    failed: bool,
    /// The absent-device warning was logged (once per agent run).
    warned: bool,
}

impl Watchdog {
    pub(super) fn new(cfg: WatchdogConfig) -> Watchdog {
        Watchdog {
            cfg,
            dev: None,
            failed: false,
            warned: false,
        }
    }

    /// Whether the core must treat this node as unable to lead: the watchdog is required and
    /// the device is not usable (checked without opening it: opening a watchdog starts it).
    pub(super) fn failed(&mut self) -> bool {
        if self.cfg.mode != WatchdogMode::Required {
            return false;
        }
        if self.dev.is_none() && access(&self.cfg.device, AccessFlags::W_OK).is_err() {
            if !self.failed {
                tracing::error!(
                    device = %self.cfg.device.display(),
                    "watchdog.mode is required but the device is not writable: this node will not become leader"
                );
            }
            self.failed = true;
        }
        self.failed
    }

    /// Keeps the device alive (opening and arming it first) while this node leads. `ttl_secs`
    /// gives the timeout: `ttl - safety_margin`.
    pub(super) fn keepalive(&mut self, ttl_secs: u64) {
        if self.cfg.mode == WatchdogMode::Off {
            return;
        }
        if self.dev.is_none() {
            self.open(ttl_secs);
        }
        let Some(dev) = &mut self.dev else { return };
        if let Err(e) = dev.write_all(b"\0").and_then(|()| dev.flush()) {
            tracing::error!(device = %self.cfg.device.display(), error = %e, "watchdog keepalive failed");
            self.failed = self.cfg.mode == WatchdogMode::Required;
            self.dev = None;
        }
    }

    fn open(&mut self, ttl_secs: u64) {
        // Append: meaningless for a character device, and a test's fake device keeps a record.
        let dev = match OpenOptions::new().append(true).open(&self.cfg.device) {
            Ok(f) => f,
            Err(e) => {
                self.unavailable(&format!("cannot open it: {e}"));
                return;
            }
        };
        let timeout = ttl_secs.saturating_sub(self.cfg.safety_margin).max(1);
        let timeout = i32::try_from(timeout).unwrap_or(i32::MAX);
        match set_timeout(&dev, timeout) {
            Ok(actual) if actual <= timeout => {
                tracing::info!(device = %self.cfg.device.display(), timeout_s = actual, "watchdog armed");
            }
            Ok(actual) => {
                tracing::error!(
                    device = %self.cfg.device.display(),
                    wanted_s = timeout,
                    actual_s = actual,
                    "the watchdog's timeout is longer than ttl - safety_margin: it would fire after the lease expired"
                );
                self.failed = self.cfg.mode == WatchdogMode::Required;
            }
            Err(e) => {
                // A device that cannot take a timeout (or a test's fake device) still gets
                // keepalives; its own timeout is unknown, so `required` cannot trust it.
                tracing::warn!(
                    device = %self.cfg.device.display(),
                    error = %e,
                    "cannot set the watchdog timeout; keeping the device alive with its own timeout"
                );
                self.failed = self.cfg.mode == WatchdogMode::Required;
            }
        }
        self.dev = Some(dev);
    }

    fn unavailable(&mut self, why: &str) {
        match self.cfg.mode {
            WatchdogMode::Required => {
                tracing::error!(device = %self.cfg.device.display(), "watchdog required but unusable: {why}");
                self.failed = true;
            }
            _ if !self.warned => {
                tracing::warn!(
                    device = %self.cfg.device.display(),
                    "NO HARDWARE WATCHDOG: {why}. The fence guard still stops PostgreSQL if this \
                     agent dies or freezes, but a frozen kernel would not be reset before the lease expires"
                );
                self.warned = true;
            }
            _ => {}
        }
    }

    /// Stops the watchdog (magic close) when this node no longer leads or shuts down.
    pub(super) fn disarm(&mut self) {
        if let Some(mut dev) = self.dev.take() {
            if let Err(e) = dev.write_all(b"V").and_then(|()| dev.flush()) {
                tracing::error!(device = %self.cfg.device.display(), error = %e, "watchdog magic close failed");
            } else {
                tracing::info!(device = %self.cfg.device.display(), "watchdog disarmed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(mode: WatchdogMode, dir: &std::path::Path) -> (Watchdog, std::path::PathBuf) {
        let path = dir.join("watchdog");
        std::fs::write(&path, b"").unwrap();
        (
            Watchdog::new(WatchdogConfig {
                mode,
                device: path.clone(),
                safety_margin: 5,
            }),
            path,
        )
    }

    #[test]
    fn a_fake_device_gets_keepalives_and_the_magic_close() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = fake(WatchdogMode::Automatic, dir.path());
        assert!(!w.failed());
        w.keepalive(30);
        w.keepalive(30);
        w.disarm();
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0V");
        // Disarming twice writes nothing more; off writes nothing at all.
        w.disarm();
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0V");
        let (mut off, path) = fake(WatchdogMode::Off, dir.path());
        off.keepalive(30);
        off.disarm();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn required_fails_without_a_usable_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut missing = Watchdog::new(WatchdogConfig {
            mode: WatchdogMode::Required,
            device: dir.path().join("absent"),
            safety_margin: 5,
        });
        assert!(missing.failed());
        // A file that is not a watchdog cannot take a timeout: required does not trust it.
        let (mut w, _) = fake(WatchdogMode::Required, dir.path());
        assert!(!w.failed(), "writable: may try");
        w.keepalive(30);
        assert!(w.failed());
        // Automatic carries on with a missing device.
        let mut auto = Watchdog::new(WatchdogConfig {
            mode: WatchdogMode::Automatic,
            device: dir.path().join("absent"),
            safety_margin: 5,
        });
        auto.keepalive(30);
        assert!(!auto.failed());
    }
}
