//! `hugepoke collapse --pid PID`: make another process's text huge without
//! its cooperation.  Over each 2 MiB-aligned 2 MiB range of its executable
//! file mappings, the module's COLLAPSE first drops the anonymous copies
//! other tools left (a detached uprobe's, a debugger's, a `/proc/PID/mem`
//! writer's) where they equal the page cache and maps the PMD; then, where
//! no copy is left but the page cache has no huge folio,
//! `process_madvise(pidfd, MADV_COLLAPSE)` makes one.  Then it says per
//! mapping how much the kernel's own accounting (smaps) shows PMD-mapped,
//! per range what it dropped and kept, and why not where not.

use crate::device::Device;
use crate::proc::{self, SmapsEntry};
use crate::symbols::{self, Mapping};
use crate::uapi::{self, CollapseArgs};
use std::io;

pub const PMD_SIZE: u64 = 2 << 20;
const MADV_COLLAPSE: i32 = 25;

/// What happened to one 2 MiB range.
#[derive(Debug, Clone, Default)]
pub struct RangeReport {
    pub start: u64,
    /// The module's COLLAPSE: other tools' copies dropped and kept (None
    /// without `/dev/hugepoke`, or when it refused the range: `module_errno`).
    pub module: Option<CollapseArgs>,
    pub module_errno: Option<i32>,
    /// MADV_COLLAPSE's errno, when it was tried and refused.
    pub madvise_errno: Option<i32>,
    /// The module's verdict as journaled (`collapse_range`), when its
    /// collapse refused: the kernel's `SCAN_*` name.
    pub module_verdict: Option<String>,
    /// A PMD maps the range (by the module's or MADV_COLLAPSE's word).
    pub collapsed: bool,
}

impl RangeReport {
    fn kept(&self) -> u32 {
        self.module
            .as_ref()
            .map_or(0, |a| kept_counts(a).iter().map(|c| c.0).sum())
    }

    /// Worth a line of its own: something dropped, kept or refused.
    pub fn notable(&self) -> bool {
        self.module.is_some_and(|a| a.dropped != 0) || !self.collapsed
    }
}

/// What happened to one executable file mapping.
#[derive(Debug, Clone)]
pub struct MappingReport {
    pub mapping: Mapping,
    /// 2 MiB ranges inside the mapping that a PMD could map.
    pub ranges: u64,
    /// Ranges a PMD maps now, by the module's or MADV_COLLAPSE's word.
    pub collapsed: u64,
    /// Every range, in order.
    pub range_reports: Vec<RangeReport>,
    /// PMD-mapped kB after (ShmemPmdMapped + FilePmdMapped).
    pub pmd_kb: u64,
    /// Why this mapping cannot be (all) PMD-mapped, when it cannot.
    pub why_not: Option<String>,
    /// The filesystem the file is on.
    pub fs: String,
}

impl MappingReport {
    /// Every range a PMD could map is PMD-mapped.
    pub fn complete(&self) -> bool {
        self.ranges > 0 && self.pmd_kb >= self.ranges * PMD_SIZE / 1024
    }

    /// Either no PMD can map it, or every range is PMD-mapped.
    pub fn done(&self) -> bool {
        self.ranges == 0 || self.complete()
    }
}

/// The 2 MiB-aligned 2 MiB ranges inside `m` a PMD could map: none when
/// the virtual address and the file offset differ modulo 2 MiB (the file's
/// huge folios cannot line up with PMDs there).
pub fn pmd_ranges(m: &Mapping) -> Result<Vec<u64>, String> {
    if !m.start.wrapping_sub(m.offset).is_multiple_of(PMD_SIZE) {
        return Err(format!(
            "its address and file offset differ modulo 2 MiB (start {:#x}, offset {:#x}): no PMD can map this file here (mapped without 2 MiB alignment)",
            m.start, m.offset
        ));
    }
    let first = m.start.div_ceil(PMD_SIZE) * PMD_SIZE;
    let ranges: Vec<u64> = (first..)
        .step_by(PMD_SIZE as usize)
        .take_while(|r| r + PMD_SIZE <= m.end)
        .collect();
    if ranges.is_empty() {
        return Err(format!(
            "no 2 MiB-aligned 2 MiB range inside it ({} kB, {:#x}-{:#x})",
            (m.end - m.start) / 1024,
            m.start,
            m.end
        ));
    }
    Ok(ranges)
}

/// The filesystem type of the file a mapping maps, by name.
fn fs_name(pid: i32, m: &Mapping) -> String {
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs buffer of the right type.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return "unknown".into();
    }
    match st.f_type as u32 {
        0x0102_1994 => "tmpfs",
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x0102_1997 => "9p",
        0x6573_5546 => "fuse",
        0x794c_7630 => "overlayfs",
        0x9123_683e => "btrfs",
        0x7371_7368 => "squashfs",
        0x6969 => "nfs",
        other => return format!("fs magic {other:#x}"),
    }
    .into()
}

pub fn pidfd_open(pid: i32) -> io::Result<i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd as i32)
    }
}

/// MADV_COLLAPSE one range of the process behind `pidfd`.
pub fn madvise_collapse(pidfd: i32, start: u64, len: u64) -> io::Result<()> {
    let iov = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: len as usize,
    };
    // SAFETY: the iovec names addresses in the *target's* address space;
    // the kernel only reads the iovec from ours.
    let n = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd,
            &iov as *const libc::iovec,
            1usize,
            MADV_COLLAPSE,
            0u32,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One range: the module's COLLAPSE first (it drops the copies other
/// tools left, then maps the PMD when the page cache holds a PMD-sized
/// folio); MADV_COLLAPSE when it left no copy but could not map one (small
/// folios: MADV_COLLAPSE makes a huge one), or without the module.
fn collapse_one(dev: Option<&Device>, pid: i32, pidfd: i32, start: u64) -> RangeReport {
    let mut r = RangeReport {
        start,
        ..Default::default()
    };
    if let Some(dev) = dev {
        match dev.collapse(pid, start) {
            Ok(a) => {
                r.module = Some(a);
                match a.result {
                    uapi::COLLAPSE_DONE | uapi::COLLAPSE_AT_FAULT => r.collapsed = true,
                    uapi::COLLAPSE_COPIES_KEPT => return r,
                    uapi::COLLAPSE_REFUSED => r.module_verdict = module_verdict(pid, start),
                    _ => {}
                }
            }
            Err(e) => r.module_errno = e.raw_os_error(),
        }
    }
    if !r.collapsed {
        match madvise_collapse(pidfd, start, PMD_SIZE) {
            Ok(()) => r.collapsed = true,
            Err(e) => r.madvise_errno = Some(e.raw_os_error().unwrap_or(0)),
        }
    }
    r
}

/// The newest `collapse_range` verdict the module journaled for `pid`'s
/// range at `start` (debugfs `events`), if it can be read.
fn module_verdict(pid: i32, start: u64) -> Option<String> {
    let events = proc::parse_events(&proc::debugfs("events").ok()?);
    events
        .iter()
        .rfind(|e| e.step == "collapse_range" && e.pid == pid && e.addr == Some(start))
        .map(|e| e.note.clone())
}

/// Collapse every executable file mapping of `pid`.
pub fn collapse(pid: i32) -> Result<Vec<MappingReport>, String> {
    collapse_matching(pid, |_| true)
}

/// The processes that map `path` privately and executably now, found
/// through `/proc/*/maps` (by device and inode: any name, any mount),
/// with the report of each one's mappings of it.  A process that exits
/// meanwhile, or whose maps we may not read, is left out.
pub fn collapse_file(path: &str) -> Result<FileReport, String> {
    use std::os::unix::fs::MetadataExt;
    let st = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    let id = (libc::major(st.dev()), libc::minor(st.dev()), st.ino());
    // /proc/PID/maps names the device of the inode's own superblock, which
    // stat() may not (btrfs subvolumes, overlayfs): the inode and the path
    // as maps shows it then stand for it.
    let real = std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_string());
    let is_it = move |m: &Mapping| {
        m.perms.ends_with('p')
            && ((m.dev.0, m.dev.1, m.inode) == id || (m.inode == id.2 && m.path == real))
    };
    let (pids, unreadable) = mappers(&is_it)?;
    let mut out = FileReport {
        processes: vec![],
        unreadable,
    };
    for pid in pids {
        match collapse_matching(pid, &is_it) {
            Ok(r) if !r.is_empty() => out.processes.push((pid, r)),
            // Gone meanwhile, or it unmapped the file.
            _ => {}
        }
    }
    Ok(out)
}

/// What `collapse --file` did: each process that mapped the file, and how
/// many processes' maps could not be read (gone, or not ours to read).
pub struct FileReport {
    pub processes: Vec<(i32, Vec<MappingReport>)>,
    pub unreadable: usize,
}

/// The pids whose executable mappings include one `is_it` picks, in order,
/// and how many processes' maps could not be read.
fn mappers(is_it: &impl Fn(&Mapping) -> bool) -> Result<(Vec<i32>, usize), String> {
    let mut unreadable = 0;
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| match symbols::read_maps(pid) {
            Ok(maps) => maps.iter().any(|m| m.executable() && is_it(m)),
            Err(_) => {
                unreadable += 1;
                false
            }
        })
        .collect();
    pids.sort_unstable();
    Ok((pids, unreadable))
}

/// Collapse the executable file mappings of `pid` that `want` picks.
fn collapse_matching(
    pid: i32,
    want: impl Fn(&Mapping) -> bool,
) -> Result<Vec<MappingReport>, String> {
    let maps = symbols::read_maps(pid)?;
    let pidfd = pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let dev = Device::open().ok();
    let mut reports = Vec::new();
    for m in maps
        .into_iter()
        .filter(|m| m.file_backed() && m.executable() && want(m))
    {
        let mut r = MappingReport {
            fs: fs_name(pid, &m),
            mapping: m,
            ranges: 0,
            collapsed: 0,
            range_reports: vec![],
            pmd_kb: 0,
            why_not: None,
        };
        match pmd_ranges(&r.mapping) {
            Err(why) => r.why_not = Some(why),
            Ok(ranges) => {
                r.ranges = ranges.len() as u64;
                for start in ranges {
                    let range = collapse_one(dev.as_ref(), pid, pidfd, start);
                    r.collapsed += u64::from(range.collapsed);
                    r.range_reports.push(range);
                }
            }
        }
        reports.push(r);
    }
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(pidfd) };
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let smaps: Vec<SmapsEntry> = proc::parse_smaps(&smaps);
    for r in reports.iter_mut() {
        if let Some(s) = smaps.iter().find(|s| s.start == r.mapping.start) {
            r.pmd_kb = s.pmd_mapped_kb();
        }
        if r.why_not.is_none() && r.collapsed < r.ranges {
            r.why_not = Some(explain_refusals(r, dev.is_some()));
        } else if r.why_not.is_none() && !r.complete() {
            r.why_not = Some(format!(
                "all {} ranges collapsed, yet smaps shows {} of {} kB PMD-mapped (a range was split or unmapped since)",
                r.ranges,
                r.pmd_kb,
                r.ranges * PMD_SIZE / 1024
            ));
        }
    }
    Ok(reports)
}

/// COLLAPSE's kept copies, by why, with the words for each.
fn kept_counts(a: &CollapseArgs) -> [(u32, &'static str); 5] {
    [
        (
            a.kept_differs,
            "differ from the page cache (another tool's change, live)",
        ),
        (a.kept_pinned, "held by something else (a pin, a pipe)"),
        (a.kept_uffd, "under userfaultfd"),
        (a.kept_patched, "carry a live hugepoke patch"),
        (
            a.kept_no_cache,
            "have no uptodate page-cache page to fault back in",
        ),
    ]
}

/// Why the copies of a range were kept, in words.
pub fn kept_words(a: &CollapseArgs) -> String {
    let counts = kept_counts(a);
    let total: u32 = counts.iter().map(|c| c.0).sum();
    let why: Vec<String> = counts
        .iter()
        .filter(|c| c.0 != 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    format!(
        "{total} anonymous cop{} kept (first at {:#x}): {}",
        if total == 1 { "y" } else { "ies" },
        a.first_kept,
        why.join(", ")
    )
}

/// Why the one range was not collapsed, in words.
fn range_refusal(r: &RangeReport, fs: &str) -> String {
    if let Some(a) = r.module.filter(|a| a.result == uapi::COLLAPSE_COPIES_KEPT) {
        return kept_words(&a);
    }
    let module = match (r.module, r.module_errno) {
        (_, Some(e)) => format!("the module refused it ({}); ", crate::errno_name(e)),
        (Some(a), _) if a.result == uapi::COLLAPSE_REFUSED => format!(
            "no copy in memory was kept (a swapped-out one is not looked at), but collapse_pte_mapped_thp() refused ({}); ",
            r.module_verdict.as_deref().unwrap_or("see `hugepoke events`")
        ),
        (Some(a), _) if a.result == uapi::COLLAPSE_SMALL_FOLIOS => {
            "no copy left, but the page cache has no huge folio here; ".to_string()
        }
        _ => String::new(),
    };
    let errno = r.madvise_errno.unwrap_or(0);
    let why = match errno {
        libc::EINVAL => format!("the kernel will not make this VMA huge (a filesystem without large folios for text — this one is {fs} — or THP disabled for it)"),
        libc::EAGAIN => "transient: pages locked, under writeback, or in use (retry)".to_string(),
        libc::ENOMEM => "no memory for a huge page".to_string(),
        libc::EPERM => "not permitted (CAP_SYS_NICE and ptrace access to the process are needed)".to_string(),
        libc::ESRCH => "the process is gone".to_string(),
        _ => "see madvise(2), MADV_COLLAPSE".to_string(),
    };
    format!(
        "{module}MADV_COLLAPSE refused with {}: {why}",
        crate::errno_name(errno)
    )
}

fn explain_refusals(r: &MappingReport, with_module: bool) -> String {
    let mut by_why: Vec<(String, Vec<u64>)> = Vec::new();
    for range in r.range_reports.iter().filter(|x| !x.collapsed) {
        let why = range_refusal(range, &r.fs);
        let why = if range.kept() != 0 {
            "anonymous copies kept (see the ranges)".to_string()
        } else {
            why
        };
        match by_why.iter_mut().find(|(w, _)| *w == why) {
            Some((_, v)) => v.push(range.start),
            None => by_why.push((why, vec![range.start])),
        }
    }
    let mut s = by_why
        .iter()
        .map(|(why, starts)| {
            let at: Vec<String> = starts.iter().take(4).map(|s| format!("{s:#x}")).collect();
            let more = if starts.len() > 4 {
                format!(" and {} more", starts.len() - 4)
            } else {
                String::new()
            };
            format!(
                "{} range(s) not collapsed: {why} (at {}{more})",
                starts.len(),
                at.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    if !with_module {
        s += " (without /dev/hugepoke: other tools' anonymous copies were not looked for)";
    }
    s
}

/// The line for one range that dropped, kept or refused something.
pub fn range_line(r: &RangeReport, fs: &str) -> String {
    let dropped = r.module.map_or(0, |a| a.dropped);
    let head = format!(
        "  range {:#x}: {dropped} cop{} dropped",
        r.start,
        if dropped == 1 { "y" } else { "ies" }
    );
    if r.collapsed {
        format!("{head}, PMD-mapped")
    } else {
        format!("{head}; not collapsed: {}", range_refusal(r, fs))
    }
}

/// One line per mapping, as the CLI prints it.
pub fn report_line(r: &MappingReport) -> String {
    let m = &r.mapping;
    let head = format!(
        "{:#x}-{:#x} {} {} ({}):",
        m.start, m.end, m.perms, m.path, r.fs
    );
    let dropped: u32 = r
        .range_reports
        .iter()
        .filter_map(|x| x.module.map(|a| a.dropped))
        .sum();
    let pmd = if dropped == 0 {
        format!("{} kB PMD-mapped", r.pmd_kb)
    } else {
        format!(
            "{} kB PMD-mapped, {dropped} other tools' cop{} dropped",
            r.pmd_kb,
            if dropped == 1 { "y" } else { "ies" }
        )
    };
    match &r.why_not {
        None => format!("{head} {pmd}, all {} 2 MiB range(s) collapsed", r.ranges),
        Some(why) if r.ranges == 0 => format!("{head} {pmd}; no PMD: {why}"),
        Some(why) => format!(
            "{head} {pmd}, {} of {} 2 MiB range(s) collapsed; {why}",
            r.collapsed, r.ranges
        ),
    }
}

/// The mapping's line, then a line per range that dropped, kept or
/// refused something.
pub fn report_lines(r: &MappingReport) -> Vec<String> {
    let mut lines = vec![report_line(r)];
    for range in r.range_reports.iter().filter(|x| x.notable()) {
        lines.push(range_line(range, &r.fs));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, end: u64, offset: u64) -> Mapping {
        Mapping {
            start,
            end,
            offset,
            perms: "r-xp".into(),
            inode: 1,
            path: "/x".into(),
            ..Default::default()
        }
    }

    #[test]
    fn ranges_inside_a_mapping() {
        // libLLVM-like: base 2 MiB-aligned, 117 MB of text.
        let r = pmd_ranges(&m(0x7f0000000000, 0x7f0007596000, 0)).unwrap();
        assert_eq!(r.len(), 58);
        assert_eq!(r[0], 0x7f0000000000);
        assert_eq!(*r.last().unwrap(), 0x7f0000000000 + 57 * PMD_SIZE);
        // A text segment that starts past a 2 MiB boundary: only whole ranges.
        assert_eq!(
            pmd_ranges(&m(0x7f000008a000, 0x7f00012a1000, 0x8a000))
                .unwrap()
                .len(),
            8
        );
    }

    fn kept(differs: u32, pinned: u32) -> CollapseArgs {
        CollapseArgs {
            result: uapi::COLLAPSE_COPIES_KEPT,
            dropped: 2,
            kept_differs: differs,
            kept_pinned: pinned,
            first_kept: 0x7f0000009000,
            ..Default::default()
        }
    }

    #[test]
    fn a_range_says_what_it_dropped_and_kept_and_why() {
        let r = RangeReport {
            start: 0x7f0000000000,
            module: Some(kept(1, 2)),
            ..Default::default()
        };
        assert!(r.notable());
        assert_eq!(
            range_line(&r, "tmpfs"),
            "  range 0x7f0000000000: 2 copies dropped; not collapsed: 3 anonymous copies kept (first at 0x7f0000009000): 1 differ from the page cache (another tool's change, live), 2 held by something else (a pin, a pipe)"
        );
        let one = kept_words(&kept(1, 0));
        assert!(one.starts_with("1 anonymous copy kept"), "{one}");
        // Collapsed with nothing dropped: no line of its own.
        let quiet = RangeReport {
            start: 0x7f0000000000,
            module: Some(CollapseArgs {
                result: uapi::COLLAPSE_DONE,
                ..Default::default()
            }),
            collapsed: true,
            ..Default::default()
        };
        assert!(!quiet.notable());
        // No copy kept but MADV_COLLAPSE refused: both words, the real cause last.
        let small = RangeReport {
            start: 0x7f0000000000,
            module: Some(CollapseArgs {
                result: uapi::COLLAPSE_SMALL_FOLIOS,
                ..Default::default()
            }),
            madvise_errno: Some(libc::EINVAL),
            ..Default::default()
        };
        let line = range_line(&small, "ext4");
        assert!(
            line.contains("MADV_COLLAPSE refused with EINVAL") && line.contains("this one is ext4"),
            "{line}"
        );
    }

    #[test]
    fn why_not() {
        // python3.11's text: congruent but no whole aligned range inside.
        let e = pmd_ranges(&m(0x41f000, 0x6d2000, 0x1f000)).unwrap_err();
        assert!(e.contains("no 2 MiB-aligned"), "{e}");
        // Placed without alignment: offset and address disagree mod 2 MiB.
        let e = pmd_ranges(&m(0x7f0000123000, 0x7f0000923000, 0)).unwrap_err();
        assert!(e.contains("differ modulo 2 MiB"), "{e}");
    }
}
