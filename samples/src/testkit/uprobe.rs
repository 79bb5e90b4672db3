//! A tracefs uprobe at a file offset, added and enabled for its life: what
//! a tracer (perf probe, bpftrace) does to every process that maps the
//! file — an int3 written into its text through a copy of the page.

use std::io::Write;

const TRACEFS: &str = "/sys/kernel/tracing";

pub struct Uprobe {
    /// `group/name`.
    event: String,
}

fn io<T>(r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// One command to `uprobe_events` (tracefs parses each write as one).
fn command(line: &str) -> Result<(), String> {
    let mut events = io(std::fs::OpenOptions::new()
        .append(true)
        .open(format!("{TRACEFS}/uprobe_events")))?;
    io(events.write_all(format!("{line}\n").as_bytes()))
}

impl Uprobe {
    /// The uprobe `event` (`group/name`) at `path:offset`, enabled.
    pub fn add(event: &str, path: &str, offset: u64) -> Result<Self, String> {
        command(&format!("p:{event} {path}:{offset:#x}"))?;
        let probe = Self {
            event: event.to_string(),
        };
        io(std::fs::write(
            format!("{TRACEFS}/events/{event}/enable"),
            "1",
        ))?;
        Ok(probe)
    }

    /// Its hits, from `uprobe_profile` (`PATH EVENT HITS`).
    pub fn hits(&self) -> Result<u64, String> {
        let profile = io(std::fs::read_to_string(format!("{TRACEFS}/uprobe_profile")))?;
        let name = self.event.rsplit('/').next().unwrap_or_default();
        profile
            .lines()
            .find(|l| l.contains(&self.event) || l.contains(&format!(" {name} ")))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .ok_or(format!("no hit count in {profile:?}"))
    }
}

/// Disabled and removed: the int3 leaves every process it was written in.
impl Drop for Uprobe {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{TRACEFS}/events/{}/enable", self.event), "0");
        let _ = command(&format!("-:{}", self.event));
    }
}
