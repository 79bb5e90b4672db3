//! khugepaged held asleep, for the tests and the bench that must tell
//! hugepoke's own collapse from khugepaged's.

use std::io;

const DIR: &str = "/sys/kernel/mm/transparent_hugepage/khugepaged";

/// A khugepaged tunable or counter (`scan_sleep_millisecs`,
/// `pages_collapsed`, `full_scans`), trimmed.
pub fn read(name: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("{DIR}/{name}")).map(|s| s.trim().to_string())
}

/// Set a khugepaged tunable.
pub fn write(name: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("{DIR}/{name}"), value)
}

/// khugepaged's scan sleep set to `ms` until dropped, then set back.
/// Writing the sleep wakes it for one pass at once, then it sleeps (other
/// wake-ups do not end the sleep early) — except that a process
/// registering while none is registered is scanned at once, whatever the
/// sleep.
pub struct Asleep {
    before: String,
}

impl Asleep {
    pub fn new(ms: u64) -> io::Result<Self> {
        let before = read("scan_sleep_millisecs")?;
        write("scan_sleep_millisecs", &ms.to_string())?;
        Ok(Self { before })
    }

    /// The sleep it had before.
    pub fn before(&self) -> &str {
        &self.before
    }
}

impl Drop for Asleep {
    fn drop(&mut self) {
        let _ = write("scan_sleep_millisecs", &self.before);
    }
}
