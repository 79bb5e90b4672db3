//! The foundation: module, device, debugfs, the THP text target.

use crate::TestResult;
use hugepoke::proc::{self, KpageFlags, Pagemap};
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

pub(crate) fn module_is_loaded() -> TestResult {
    ensure!(
        std::path::Path::new("/sys/module/hugepoke").is_dir(),
        "/sys/module/hugepoke missing"
    );
    // The counter, not the event: the event ring may have rotated it out.
    let stats = proc::debugfs("stats").map_err(|e| e.to_string())?;
    ensure!(
        proc::parse_stat(&stats, "load") == Some((1, 0)),
        "stats say: {:?}",
        proc::parse_stat(&stats, "load")
    );
    Ok(())
}

pub(crate) fn device_is_root_only() -> TestResult {
    let m = std::fs::metadata("/dev/hugepoke").map_err(|e| format!("/dev/hugepoke: {e}"))?;
    ensure!(
        m.file_type().is_char_device(),
        "/dev/hugepoke is not a character device"
    );
    ensure!(
        m.mode() & 0o777 == 0o600,
        "mode is {:o}, want 600",
        m.mode() & 0o777
    );
    ensure!(
        m.uid() == 0 && m.gid() == 0,
        "owned by {}:{}",
        m.uid(),
        m.gid()
    );
    Ok(())
}

pub(crate) fn debugfs_files_exist() -> TestResult {
    for name in ["events", "stats", "patches", "files", "forked"] {
        let text = proc::debugfs(name).map_err(|e| format!("{name}: {e}"))?;
        ensure!(text.starts_with('#'), "{name} has no header: {text:?}");
    }
    let stats = proc::debugfs("stats").map_err(|e| e.to_string())?;
    ensure!(
        proc::parse_stat(&stats, "load") == Some((1, 0)),
        "stats: {stats}"
    );
    Ok(())
}

pub(crate) fn open_close_and_unknown_ioctl_are_journaled() -> TestResult {
    use std::os::fd::AsRawFd;
    let before = proc::debugfs("stats").map_err(|e| e.to_string())?;
    let (open0, _) = proc::parse_stat(&before, "open").ok_or("no open stat")?;
    let (_, ioctl_failed0) = proc::parse_stat(&before, "ioctl").ok_or("no ioctl stat")?;

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/hugepoke")
        .map_err(|e| e.to_string())?;
    let cmd: libc::c_ulong = 0xdead;
    // SAFETY: an ioctl with an unknown command and a null argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), cmd, 0usize) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    ensure!(
        rc == -1 && errno == libc::ENOTTY,
        "ioctl returned {rc}, errno {errno}"
    );
    drop(f);

    let after = proc::debugfs("stats").map_err(|e| e.to_string())?;
    ensure!(
        proc::parse_stat(&after, "open").map(|s| s.0) == Some(open0 + 1),
        "open not counted"
    );
    ensure!(
        proc::parse_stat(&after, "ioctl").map(|s| s.1) == Some(ioctl_failed0 + 1),
        "ioctl failure not counted"
    );
    let events = proc::parse_events(&proc::debugfs("events").map_err(|e| e.to_string())?);
    let me = std::process::id() as i32;
    let mine: Vec<_> = events
        .iter()
        .filter(|e| e.pid == me)
        .map(|e| (e.step.as_str(), e.result.as_str()))
        .collect();
    ensure!(
        mine.ends_with(&[("open", "ok"), ("ioctl", "-ENOTTY"), ("release", "ok")]),
        "events for pid {me}: {mine:?}"
    );
    let last_ioctl = events.iter().rev().find(|e| e.step == "ioctl").unwrap();
    ensure!(
        last_ioctl.note == "unknown ioctl command",
        "reason: {:?}",
        last_ioctl.note
    );
    Ok(())
}

pub(crate) fn unprivileged_user_cannot_open() -> TestResult {
    // A single-threaded helper process drops to nobody and tries.
    let code = crate::common::helper_exit_code(&["open-as-nobody", "/dev/hugepoke"])?;
    ensure!(
        code == libc::EACCES,
        "unprivileged open gave exit {code} (want EACCES={})",
        libc::EACCES
    );
    Ok(())
}

/// The target's text is PMD-mapped by one file THP, from the kernel's own
/// accounting: smaps, pagemap and kpageflags.
pub(crate) fn target_text_is_pmd_mapped_thp() -> TestResult {
    let mut t = Target::spawn(&[])?;
    for page in [0, 1, 255, 511] {
        let v = t.call(page)?;
        ensure!(v == text::original_value(page), "page {page} returned {v}");
    }
    let smaps = proc::smaps_entry(t.pid, t.addr).map_err(|e| e.to_string())?;
    ensure!(
        smaps.start == t.addr && smaps.end == t.addr + text::THP_SIZE as u64,
        "mapping {smaps:?}"
    );
    ensure!(smaps.perms == "r-xp", "perms {}", smaps.perms);
    ensure!(
        smaps.pmd_mapped_kb() == 2048,
        "PmdMapped {} kB in {smaps:?}",
        smaps.pmd_mapped_kb()
    );
    ensure!(
        smaps.kb("Anonymous") == 0,
        "Anonymous {} kB",
        smaps.kb("Anonymous")
    );
    println!(
        "# pid {} text {:#x}: ShmemPmdMapped {} kB, FilePmdMapped {} kB",
        t.pid,
        t.addr,
        smaps.kb("ShmemPmdMapped"),
        smaps.kb("FilePmdMapped")
    );

    let pagemap = Pagemap::open(t.pid).map_err(|e| e.to_string())?;
    let kpf = KpageFlags::open().map_err(|e| e.to_string())?;
    let head = pagemap.entry(t.addr).map_err(|e| e.to_string())?;
    ensure!(head.present() && head.file(), "page 0 pagemap {head:?}");
    ensure!(
        head.pfn() % 512 == 0,
        "head pfn {:#x} not 2 MiB aligned",
        head.pfn()
    );
    for page in 0..text::PAGES {
        let e = pagemap
            .entry(t.page_addr(page))
            .map_err(|e| e.to_string())?;
        ensure!(
            e.present() && e.pfn() == head.pfn() + page as u64,
            "page {page}: {e:?}"
        );
        let flags = kpf.get(e.pfn()).map_err(|e| e.to_string())?;
        ensure!(flags.thp() && !flags.anon(), "page {page} flags {flags:?}");
        ensure!(
            if page == 0 {
                flags.compound_head()
            } else {
                flags.compound_tail()
            },
            "page {page} flags {flags:?}"
        );
    }
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        module_is_loaded,
        device_is_root_only,
        debugfs_files_exist,
        open_close_and_unknown_ioctl_are_journaled,
        unprivileged_user_cannot_open,
        target_text_is_pmd_mapped_thp,
    ];
}
