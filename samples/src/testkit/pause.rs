//! The module's `pause` hook (debugfs, src/pause.rs) from a test: a point
//! armed for one target, waited for, released.  On drop it is disarmed and
//! whatever is parked released, so that a failing test leaves nothing
//! parked.

use std::time::{Duration, Instant};

const PAUSE: &str = "/sys/kernel/debug/hugepoke/pause";

/// One armed point (one shot: the next operation on the target parks).
pub struct Pause;

impl Pause {
    pub fn arm(point: &str, pid: i32) -> Result<Self, String> {
        std::fs::write(PAUSE, format!("{point} {pid}")).map_err(|e| format!("{PAUSE}: {e}"))?;
        Ok(Pause)
    }

    /// An operation is parked at `point` now.
    pub fn parked(&self, point: &str) -> Result<bool, String> {
        let state = crate::proc::debugfs("pause").map_err(|e| format!("{PAUSE}: {e}"))?;
        Ok(state.starts_with(&format!("parked {point}")))
    }

    /// Wait (up to 60 s) until an operation is parked at `point`.
    pub fn wait_parked(&self, point: &str) -> Result<Duration, String> {
        let start = Instant::now();
        while !self.parked(point)? {
            if start.elapsed() > Duration::from_secs(60) {
                return Err(format!("parked {point}: not after 60 s"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(start.elapsed())
    }

    /// Let what is parked go on.
    pub fn release(&self) -> Result<(), String> {
        std::fs::write(PAUSE, "go").map_err(|e| format!("{PAUSE}: {e}"))
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = std::fs::write(PAUSE, "off");
        let _ = std::fs::write(PAUSE, "go");
    }
}
