//! Readers for the kernel's own accounting: `/proc/PID/smaps`,
//! `/proc/PID/pagemap`, `/proc/kpageflags`, and hugepoke's debugfs files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const PAGE_SIZE: u64 = 4096;

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SmapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: String,
    /// `(field, kB)` pairs in file order, e.g. `("ShmemPmdMapped", 2048)`.
    pub fields: Vec<(String, u64)>,
}

impl SmapsEntry {
    /// The value of a `kB` field, 0 when absent.
    pub fn kb(&self, field: &str) -> u64 {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .map_or(0, |(_, v)| *v)
    }

    /// PMD-mapped file THP, whichever counter the filesystem uses.
    pub fn pmd_mapped_kb(&self) -> u64 {
        self.kb("ShmemPmdMapped") + self.kb("FilePmdMapped")
    }
}

/// Parse the text of an smaps file.
pub fn parse_smaps(text: &str) -> Vec<SmapsEntry> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let perms = words.next().unwrap_or("").to_string();
                // offset, dev, inode, then the path (which may contain spaces).
                let path = words.skip(3).collect::<Vec<_>>().join(" ");
                out.push(SmapsEntry {
                    start,
                    end,
                    perms,
                    path,
                    fields: Vec::new(),
                });
                continue;
            }
        }
        if let (Some(field), Some(entry)) = (first.strip_suffix(':'), out.last_mut()) {
            if let Some(Ok(v)) = words.next().map(str::parse::<u64>) {
                entry.fields.push((field.to_string(), v));
            }
        }
    }
    out
}

/// The smaps entry of `pid` that contains `addr`.
pub fn smaps_entry(pid: i32, addr: u64) -> io::Result<SmapsEntry> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    parse_smaps(&text)
        .into_iter()
        .find(|e| e.start <= addr && addr < e.end)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no mapping at {addr:#x}")))
}

/// One decoded `/proc/PID/pagemap` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    pub fn present(self) -> bool {
        self.0 >> 63 & 1 == 1
    }
    pub fn pfn(self) -> u64 {
        self.0 & ((1 << 55) - 1)
    }
    pub fn soft_dirty(self) -> bool {
        self.0 >> 55 & 1 == 1
    }
    pub fn exclusive(self) -> bool {
        self.0 >> 56 & 1 == 1
    }
    /// File-backed page (or shared anonymous).
    pub fn file(self) -> bool {
        self.0 >> 61 & 1 == 1
    }
    /// Swapped out: the PTE is a swap entry.
    pub fn swapped(self) -> bool {
        self.0 >> 62 & 1 == 1
    }
    /// The PTE is userfaultfd write-protected.
    pub fn uffd_wp(self) -> bool {
        self.0 >> 57 & 1 == 1
    }
}

/// Reads pagemap entries of one process.
pub struct Pagemap(File);

impl Pagemap {
    pub fn open(pid: i32) -> io::Result<Self> {
        File::open(format!("/proc/{pid}/pagemap")).map(Self)
    }

    pub fn entry(&self, vaddr: u64) -> io::Result<PagemapEntry> {
        let mut buf = [0u8; 8];
        self.0.read_exact_at(&mut buf, vaddr / PAGE_SIZE * 8)?;
        Ok(PagemapEntry(u64::from_ne_bytes(buf)))
    }
}

// PAGEMAP_SCAN (include/uapi/linux/fs.h).
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_HUGE: u64 = 1 << 6;
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610; // _IOWR('f', 16, struct pm_scan_arg)

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

impl Pagemap {
    /// `[start, end)` ranges inside `[from, to)` mapped by a present PMD,
    /// at most `max` of them.  PAGEMAP_SCAN reports PAGE_IS_HUGE only from
    /// its PMD-level walker: a page-cache subpage mapped by a PTE is never
    /// "huge", even inside a THP.  Plain pagemap entries cannot tell the two
    /// apart.
    pub fn pmd_mapped_ranges(&self, from: u64, to: u64, max: usize) -> io::Result<Vec<(u64, u64)>> {
        use std::os::fd::AsRawFd;
        let mut regions = vec![PageRegion::default(); max.max(1)];
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: from,
            end: to,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_mask: PAGE_IS_HUGE | PAGE_IS_PRESENT,
            return_mask: PAGE_IS_HUGE | PAGE_IS_PRESENT,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // regions into `regions`, both ours and alive for the call.
        let n =
            unsafe { libc::ioctl(self.0.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut PmScanArg) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(regions[..n as usize]
            .iter()
            .map(|r| (r.start, r.end))
            .collect())
    }

    /// Entries of the `n` pages from `vaddr`, in one read.
    pub fn entries(&self, vaddr: u64, n: usize) -> io::Result<Vec<PagemapEntry>> {
        let mut buf = vec![0u8; n * 8];
        self.0.read_exact_at(&mut buf, vaddr / PAGE_SIZE * 8)?;
        Ok(buf
            .chunks_exact(8)
            .map(|b| PagemapEntry(u64::from_ne_bytes(b.try_into().unwrap())))
            .collect())
    }
}

/// `/proc/kpageflags` bits (include/uapi/linux/kernel-page-flags.h).
pub mod kpf {
    pub const MMAP: u32 = 11;
    pub const ANON: u32 = 12;
    pub const COMPOUND_HEAD: u32 = 15;
    pub const COMPOUND_TAIL: u32 = 16;
    pub const HUGE: u32 = 17;
    pub const THP: u32 = 22;
}

/// Flags of one physical page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFlags(pub u64);

impl PageFlags {
    pub fn has(self, bit: u32) -> bool {
        self.0 >> bit & 1 == 1
    }
    pub fn anon(self) -> bool {
        self.has(kpf::ANON)
    }
    pub fn thp(self) -> bool {
        self.has(kpf::THP)
    }
    pub fn compound_head(self) -> bool {
        self.has(kpf::COMPOUND_HEAD)
    }
    pub fn compound_tail(self) -> bool {
        self.has(kpf::COMPOUND_TAIL)
    }
}

pub struct KpageFlags(File);

impl KpageFlags {
    pub fn open() -> io::Result<Self> {
        File::open("/proc/kpageflags").map(Self)
    }

    pub fn get(&self, pfn: u64) -> io::Result<PageFlags> {
        let mut buf = [0u8; 8];
        self.0.read_exact_at(&mut buf, pfn * 8)?;
        Ok(PageFlags(u64::from_ne_bytes(buf)))
    }
}

pub const DEBUGFS: &str = "/sys/kernel/debug/hugepoke";

/// The text of one of hugepoke's debugfs files; from the directory
/// `$HUGEPOKE_DEBUGFS` instead if set (the host tests feed the CLI text).
pub fn debugfs(name: &str) -> io::Result<String> {
    let dir = std::env::var_os("HUGEPOKE_DEBUGFS").unwrap_or_else(|| DEBUGFS.into());
    std::fs::read_to_string(std::path::Path::new(&dir).join(name))
}

/// One line of debugfs `events` (and one event of `hugepoke events --json`:
/// the field names are stable, Documentation/cli.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EventLine {
    pub seq: u64,
    pub time_ns: u64,
    pub pid: i32,
    pub handle: Option<u64>,
    pub addr: Option<u64>,
    pub step: String,
    pub pfn: Option<u64>,
    pub order: Option<u32>,
    /// `ok` or `-EINVAL` etc.
    pub result: String,
    pub note: String,
}

fn opt<T: std::str::FromStr>(w: &str) -> Option<T> {
    if w == "-" {
        None
    } else {
        w.parse().ok()
    }
}

fn opt_hex(w: &str) -> Option<u64> {
    crate::parse_number(w).filter(|_| w != "-")
}

/// Parse `events`; comment lines (`# …`) are skipped.
pub fn parse_events(text: &str) -> Vec<EventLine> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_event_line)
        .collect()
}

/// Parse one entry line of `events`.
pub fn parse_event_line(l: &str) -> Option<EventLine> {
    let mut w = l.splitn(10, ' ');
    Some(EventLine {
        seq: w.next()?.parse().ok()?,
        time_ns: w.next()?.parse().ok()?,
        pid: w.next()?.parse().ok()?,
        handle: opt(w.next()?),
        addr: opt_hex(w.next()?),
        step: w.next()?.to_string(),
        pfn: opt_hex(w.next()?),
        order: opt(w.next()?),
        result: w.next()?.to_string(),
        note: w.next().unwrap_or("").to_string(),
    })
}

/// One line of debugfs `patches`: `handle pid addr len state pfn owner
/// pmd_mappable bytes orig site` (the fields a reader needs).
#[derive(Debug, Clone, PartialEq)]
pub struct PatchLine {
    pub handle: u64,
    pub pid: i32,
    pub addr: u64,
    pub len: u64,
    /// `live`, `gone` or `forked-only`.
    pub state: String,
    pub pfn: Option<u64>,
    pub owner: String,
}

/// The handles debugfs `patches` lists, waiting out a target that is busy
/// (its lock held, by a collapse say: `# a target is busy`) for up to a
/// second; a target busy longer, or an unreadable listing, is an error
/// rather than "none".
pub fn listed_handles() -> Result<Vec<u64>, String> {
    let begin = std::time::Instant::now();
    loop {
        let text = debugfs("patches").map_err(|e| format!("debugfs patches: {e}"))?;
        if !text.lines().any(|l| l.starts_with("# a target is busy")) {
            return Ok(parse_patches(&text).iter().map(|p| p.handle).collect());
        }
        if begin.elapsed() > std::time::Duration::from_secs(1) {
            return Err("debugfs patches: a target stayed busy for 1 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Parse `patches`; `#` lines (the header, `# a target is busy …`) are skipped.
pub fn parse_patches(text: &str) -> Vec<PatchLine> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some(PatchLine {
                handle: w.first()?.parse().ok()?,
                pid: w.get(1)?.parse().ok()?,
                addr: crate::parse_number(w.get(2)?)?,
                len: w.get(3)?.parse().ok()?,
                state: w.get(4)?.to_string(),
                pfn: opt_hex(w.get(5)?),
                owner: w.get(6)?.to_string(),
            })
        })
        .collect()
}

/// One of hugepoke's trace events (`hugepoke:hugepoke_<step>`) as tracefs
/// `trace` prints it: the journal's fields, with 0 (`order`: -1) for none.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceLine {
    pub step: String,
    pub seq: u64,
    pub pid: i32,
    pub handle: u64,
    pub addr: u64,
    pub pfn: u64,
    pub order: i32,
    /// 0 or a negative errno.
    pub errno: i32,
    pub reason: String,
}

impl TraceLine {
    /// Does this event say what the journal's `e` says?
    pub fn matches(&self, e: &EventLine) -> bool {
        self.seq == e.seq
            && self.step == e.step
            && self.pid == e.pid
            && Some(self.handle).filter(|&h| h != 0) == e.handle
            && Some(self.addr).filter(|&a| a != 0) == e.addr
            && Some(self.pfn).filter(|&p| p != 0) == e.pfn
            && u32::try_from(self.order).ok() == e.order
            && (self.errno == 0) == (e.result == "ok")
            && self.reason == e.note
    }
}

/// hugepoke's events in a tracefs `trace` text, in order; other lines are
/// skipped.  The fields are as `TP_printk` in src/hugepoke_trace.h has them.
pub fn parse_trace(text: &str) -> Vec<TraceLine> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (_, event) = l.split_once(": hugepoke_")?;
            let (step, fields) = event.split_once(": ")?;
            let (fields, reason) = fields.split_once(" reason=")?;
            let field = |name: &str| {
                fields
                    .split(' ')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_string)
            };
            Some(TraceLine {
                step: step.to_string(),
                seq: field("seq")?.parse().ok()?,
                pid: field("pid")?.parse().ok()?,
                handle: field("handle")?.parse().ok()?,
                addr: crate::parse_number(&field("addr")?)?,
                pfn: crate::parse_number(&field("pfn")?)?,
                order: field("order")?.parse().ok()?,
                errno: field("errno")?.parse().ok()?,
                reason: reason.to_string(),
            })
        })
        .collect()
}

/// `(ok, failed)` of one step in debugfs `stats`.
pub fn parse_stat(text: &str, step: &str) -> Option<(u64, u64)> {
    // The per-step table is the first section; per-reason lines follow.
    let table = text.split("\n# step count reason").next().unwrap_or(text);
    table.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        if w.next()? != step {
            return None;
        }
        Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
# tracer: nop
  hugepoke-tests-119     [000] .l.1.    44.922442: hugepoke_split_pmd: seq=6 pid=120 handle=0 addr=0x7fda98205000 pfn=0x5000 order=9 errno=0 reason=PMD split to PTEs; THP stays whole
    kworker/u8:0-12      [001] .l.1.    45.277755: hugepoke_collapse: seq=18 pid=120 handle=0 addr=0x7fda98200000 pfn=0x0 order=-1 errno=-16 reason=SCAN_FAIL: x=y
  hugepoke-tests-119     [000] ...1.    45.390535: sched_switch: prev_comm=a
";

    #[test]
    fn trace_lines_parse_and_match_the_journal() {
        let t = parse_trace(TRACE);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            TraceLine {
                step: "split_pmd".into(),
                seq: 6,
                pid: 120,
                handle: 0,
                addr: 0x7fda98205000,
                pfn: 0x5000,
                order: 9,
                errno: 0,
                reason: "PMD split to PTEs; THP stays whole".into(),
            }
        );
        assert_eq!(
            (t[1].order, t[1].errno, t[1].reason.as_str()),
            (-1, -16, "SCAN_FAIL: x=y")
        );
        let journal = parse_events(
            "6 1 120 - 0x7fda98205000 split_pmd 0x5000 9 ok PMD split to PTEs; THP stays whole\n\
             18 2 120 - 0x7fda98200000 collapse - - -EBUSY SCAN_FAIL: x=y\n",
        );
        assert!(t[0].matches(&journal[0]) && t[1].matches(&journal[1]));
        assert!(!t[0].matches(&journal[1]));
        let mut other_pfn = journal[0].clone();
        other_pfn.pfn = Some(0x5001);
        assert!(!t[0].matches(&other_pfn));
    }

    const SMAPS: &str = "\
7f0000200000-7f0000400000 r-xp 00000000 00:1f 5                          /tmp/hugepoke-thp/text 1.bin
Size:               2048 kB
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me hg
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Anonymous:           132 kB
";

    #[test]
    fn smaps_fields_and_paths() {
        let e = parse_smaps(SMAPS);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].start, 0x7f00_0020_0000);
        assert_eq!(e[0].end, 0x7f00_0040_0000);
        assert_eq!(e[0].perms, "r-xp");
        assert_eq!(e[0].path, "/tmp/hugepoke-thp/text 1.bin");
        assert_eq!(e[0].kb("ShmemPmdMapped"), 2048);
        assert_eq!(e[0].pmd_mapped_kb(), 2048);
        assert_eq!(e[0].kb("Missing"), 0);
        assert_eq!(e[1].path, "[stack]");
        assert_eq!(e[1].kb("Anonymous"), 132);
    }

    #[test]
    fn pagemap_bits() {
        let e = PagemapEntry(1 << 63 | 1 << 61 | 1 << 55 | 0x1234);
        assert!(e.present() && e.file() && e.soft_dirty() && !e.exclusive());
        assert_eq!(e.pfn(), 0x1234);
    }

    #[test]
    fn kpageflags_bits() {
        let f = PageFlags(1 << kpf::THP | 1 << kpf::COMPOUND_HEAD);
        assert!(f.thp() && f.compound_head() && !f.compound_tail() && !f.anon());
    }

    #[test]
    fn events_lines() {
        let text = "# dropped 0\n# seq ...\n\
                    1 100 7 - - load - - ok\n\
                    2 200 8 3 0x7f0000201000 ioctl 0x1a2b 9 -ENOTTY unknown ioctl command\n";
        let e = parse_events(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].step, "load");
        assert_eq!(e[0].handle, None);
        assert_eq!(e[0].note, "");
        assert_eq!(e[1].handle, Some(3));
        assert_eq!(e[1].addr, Some(0x7f00_0020_1000));
        assert_eq!(e[1].pfn, Some(0x1a2b));
        assert_eq!(e[1].order, Some(9));
        assert_eq!(e[1].result, "-ENOTTY");
        assert_eq!(e[1].note, "unknown ioctl command");
    }

    #[test]
    fn patches_lines() {
        let text = "# handle pid addr len state pfn owner pmd_mappable bytes orig site\n\
                    3 42 0x7f0000207000 6 live 0x3c3d file:1 yes b892100000c3 b8ef030000c3 0/1\n\
                    6 42 0x7f0000208000 1 gone - persistent no cc b8 2/4\n\
                    # a target is busy\n";
        let p = parse_patches(text);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].handle, p[0].pid, p[0].addr, p[0].len, p[0].pfn),
            (3, 42, 0x7f00_0020_7000, 6, Some(0x3c3d))
        );
        assert_eq!(
            (p[0].state.as_str(), p[0].owner.as_str()),
            ("live", "file:1")
        );
        assert_eq!(
            (p[1].state.as_str(), p[1].pfn, p[1].owner.as_str()),
            ("gone", None, "persistent")
        );
    }

    #[test]
    fn stats_lines() {
        let text = "# step ok failed\nopen 3 0\nioctl 1 2\nevents_dropped 0\n\
                    # step count reason\nioctl 2 unknown ioctl command\nother_reasons 0\n";
        assert_eq!(parse_stat(text, "ioctl"), Some((1, 2)));
        assert_eq!(parse_stat(text, "nope"), None);
    }
}
