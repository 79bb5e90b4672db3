//! `hugepoke collapse --pid PID`: make another process's text huge without
//! its cooperation, with `process_madvise(pidfd, MADV_COLLAPSE)` over each
//! 2 MiB-aligned 2 MiB range of its executable file mappings, then say per
//! mapping how much the kernel's own accounting (smaps) shows PMD-mapped,
//! and why not where not.

use crate::proc::{self, SmapsEntry};
use crate::symbols::{self, Mapping};
use std::io;

pub const PMD_SIZE: u64 = 2 << 20;
const MADV_COLLAPSE: i32 = 25;

/// What happened to one executable file mapping.
#[derive(Debug, Clone)]
pub struct MappingReport {
    pub mapping: Mapping,
    /// 2 MiB ranges inside the mapping that a PMD could map.
    pub ranges: u64,
    /// Ranges for which MADV_COLLAPSE succeeded.
    pub collapsed: u64,
    /// `(range start, errno)` of the ranges it refused.
    pub failures: Vec<(u64, i32)>,
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

fn pidfd_open(pid: i32) -> io::Result<i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd as i32)
    }
}

/// MADV_COLLAPSE one range of the process behind `pidfd`.
fn collapse_range(pidfd: i32, start: u64, len: u64) -> io::Result<()> {
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

/// Collapse every executable file mapping of `pid`.
pub fn collapse(pid: i32) -> Result<Vec<MappingReport>, String> {
    let maps = symbols::read_maps(pid)?;
    let pidfd = pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let mut reports = Vec::new();
    for m in maps
        .into_iter()
        .filter(|m| m.file_backed() && m.executable())
    {
        let mut r = MappingReport {
            fs: fs_name(pid, &m),
            mapping: m,
            ranges: 0,
            collapsed: 0,
            failures: vec![],
            pmd_kb: 0,
            why_not: None,
        };
        match pmd_ranges(&r.mapping) {
            Err(why) => r.why_not = Some(why),
            Ok(ranges) => {
                r.ranges = ranges.len() as u64;
                for start in ranges {
                    match collapse_range(pidfd, start, PMD_SIZE) {
                        Ok(()) => r.collapsed += 1,
                        Err(e) => r.failures.push((start, e.raw_os_error().unwrap_or(0))),
                    }
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
        if r.why_not.is_none() && !r.failures.is_empty() {
            r.why_not = Some(explain_failures(r));
        } else if r.why_not.is_none() && !r.complete() {
            r.why_not = Some(format!(
                "MADV_COLLAPSE succeeded on all {} ranges, yet smaps shows {} of {} kB PMD-mapped (a range was split or unmapped since)",
                r.ranges,
                r.pmd_kb,
                r.ranges * PMD_SIZE / 1024
            ));
        }
    }
    Ok(reports)
}

fn explain_failures(r: &MappingReport) -> String {
    let mut by_errno: Vec<(i32, Vec<u64>)> = Vec::new();
    for &(start, errno) in &r.failures {
        match by_errno.iter_mut().find(|(e, _)| *e == errno) {
            Some((_, v)) => v.push(start),
            None => by_errno.push((errno, vec![start])),
        }
    }
    by_errno
        .iter()
        .map(|(errno, starts)| {
            let why = match *errno {
                libc::EINVAL => format!("the kernel will not make this VMA huge (a filesystem without large folios for text — this one is {} — or THP disabled for it)", r.fs),
                libc::EAGAIN => "transient: pages locked, under writeback, or in use (retry)".to_string(),
                libc::ENOMEM => "no memory for a huge page".to_string(),
                libc::EPERM => "not permitted (CAP_SYS_NICE and ptrace access to the process are needed)".to_string(),
                libc::ESRCH => "the process is gone".to_string(),
                _ => "see madvise(2), MADV_COLLAPSE".to_string(),
            };
            let at: Vec<String> = starts.iter().take(4).map(|s| format!("{s:#x}")).collect();
            let more = if starts.len() > 4 { format!(" and {} more", starts.len() - 4) } else { String::new() };
            format!("{} range(s) refused with {}: {why} (at {}{more})", starts.len(), crate::errno_name(*errno), at.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One line per mapping, as the CLI prints it.
pub fn report_line(r: &MappingReport) -> String {
    let m = &r.mapping;
    let head = format!(
        "{:#x}-{:#x} {} {} ({}):",
        m.start, m.end, m.perms, m.path, r.fs
    );
    let pmd = format!("{} kB PMD-mapped", r.pmd_kb);
    match &r.why_not {
        None => format!("{head} {pmd}, all {} 2 MiB range(s) collapsed", r.ranges),
        Some(why) if r.ranges == 0 => format!("{head} {pmd}; no PMD: {why}"),
        Some(why) => format!(
            "{head} {pmd}, {} of {} 2 MiB range(s) collapsed; {why}",
            r.collapsed, r.ranges
        ),
    }
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
