//! Text on real filesystems, and on page caches of every folio size.
//!
//! The full cycle (PATCH → the target runs the new bytes from an anonymous
//! page → RESTORE → the page-cache page faults back in → the PMD is back) on
//! a text THP in tmpfs `huge=always`, ext4 and XFS (images on loop devices,
//! made here); and on text whose page cache holds folios smaller than a PMD
//! (4 KiB: tmpfs `huge=never`; order 4: tmpfs `huge=within_size` written in
//! 64 KiB pieces), where PATCH and RESTORE work the same but there is no PMD
//! to rebuild: no collapse is queued, and the journal says why.

use crate::common::*;
use crate::TestResult;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    ensure!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mounted(dir: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(dir)))
}

/// A fresh `fs` (ext4 or xfs) on a loop device over a sparse image in /tmp,
/// mounted once per guest run; its mount point.
fn image(fs: &str) -> Result<String, String> {
    let dir = format!("/tmp/hugepoke-{fs}");
    if mounted(&dir) {
        return Ok(dir);
    }
    let img = format!("/tmp/hugepoke-{fs}.img");
    // XFS refuses filesystems under 300 MB.
    io(io(std::fs::File::create(&img))?.set_len(512 << 20))?;
    match fs {
        "ext4" => sh("mkfs.ext4", &["-q", "-F", &img])?,
        "xfs" => sh("mkfs.xfs", &["-q", "-f", &img])?,
        _ => return Err(format!("no image recipe for {fs}")),
    };
    let dev = sh("losetup", &["-f", "--show", &img])?.trim().to_string();
    io(std::fs::create_dir_all(&dir))?;
    if let Err(e) = sh("mount", &["-t", fs, &dev, &dir]) {
        let _ = sh("losetup", &["-d", &dev]);
        return Err(e);
    }
    Ok(dir)
}

/// A tmpfs mounted with `huge=HUGE`, once per guest run; its mount point.
fn tmpfs(huge: &str) -> Result<String, String> {
    let dir = format!("/tmp/hugepoke-tmpfs-{huge}");
    if !mounted(&dir) {
        io(std::fs::create_dir_all(&dir))?;
        sh("mount", &["-t", "tmpfs", "-o", &format!("huge={huge},size=64M"), "hugepoke-tmpfs", &dir])?;
    }
    Ok(dir)
}

/// Write the text blob to `dir/text.bin` in `chunk`-byte writes (the write
/// size picks the page-cache folio size on tmpfs `within_size`, and on
/// ext4/XFS), then, if `evict`, sync it and drop it from the page cache, so
/// that the target's first fault reads it in afresh (with MADV_HUGEPAGE:
/// PMD-order readahead).
fn write_text(dir: &str, chunk: usize, evict: bool) -> Result<String, String> {
    let path = format!("{dir}/text.bin");
    let _ = std::fs::remove_file(&path);
    let f = io(std::fs::File::create(&path))?;
    let blob = text::blob();
    for off in (0..blob.len()).step_by(chunk) {
        io(f.write_all_at(&blob[off..off + chunk], off as u64))?;
    }
    if evict {
        io(f.sync_all())?;
        // SAFETY: fadvise on our own open file.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(r == 0, "posix_fadvise(DONTNEED): {}", std::io::Error::from_raw_os_error(r));
    }
    Ok(path)
}

/// The cycle on a text THP: PMD-mapped → PATCH splits the PMD and COWs one
/// page → RESTORE zaps it, the page-cache subpage maps again → the queued
/// collapse brings the same THP back by a PMD.
fn thp_cycle(backing: &str, path: &str) -> TestResult {
    const PAGE: usize = 9;
    let mut t = Target::spawn(&["--file", path])?;
    let head = thp_head(&t).map_err(|e| format!("{backing}: {e}"))?;
    let kpf = io(KpageFlags::open())?;
    let f = io(kpf.get(head))?;
    ensure!(f.thp() && f.compound_head() && !f.anon(), "{backing}: head {head:#x} flags {f:?}");
    let dev = io(Device::open())?;

    let handle = io(dev.patch(&patch_req(&t, PAGE, 4242)))?;
    ensure!(t.call(PAGE)? == 4242, "{backing}: patch not running");
    let anon = io(io(Pagemap::open(t.pid))?.entry(t.page_addr(PAGE)))?;
    ensure!(anon.present() && !anon.file() && anon.exclusive(), "{backing}: patched page {anon:?}");
    let s = smaps(&t)?;
    ensure!(s.pmd_mapped_kb() == 0 && s.kb("Anonymous") == 4, "{backing}: after PATCH {s:?}");
    let evs = events()?;
    let split = evs.iter().rev().find(|e| e.step == "split_pmd" && e.pid == t.pid).ok_or("no split_pmd event")?;
    ensure!(split.pfn == Some(head) && split.order == Some(9), "{backing}: split_pmd {split:?}, head {head:#x}");

    io(dev.restore(handle))?;
    ensure!(t.call(PAGE)? == text::original_value(PAGE), "{backing}: not restored");
    let took = wait_for(&format!("{backing}: page-cache page {PAGE} mapped again"), Duration::from_secs(30), || {
        t.call(PAGE)?;
        let e = io(io(Pagemap::open(t.pid))?.entry(t.page_addr(PAGE)))?;
        Ok(e.present() && e.file() && e.pfn() == head + PAGE as u64)
    })?;
    println!("# {backing}: page-cache page back {took:?} after RESTORE");
    ensure!(smaps(&t)?.kb("Anonymous") == 0, "{backing}: anonymous memory left {:?}", smaps(&t)?);
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# {backing}: PMD-mapped again {took:?} after RESTORE");
    ensure!(thp_head(&t)? == head, "{backing}: another THP came back");
    let collapse = events()?.into_iter().rev().find(|e| e.step == "collapse" && e.pid == t.pid).ok_or("no collapse event")?;
    ensure!(collapse.result == "ok" && collapse.note.starts_with("SCAN_SUCCEED"), "{backing}: collapse {collapse:?}");
    Ok(())
}

pub(crate) fn full_cycle_on_tmpfs_huge_always() -> TestResult {
    let dir = tmpfs("always")?;
    thp_cycle("tmpfs huge=always", &write_text(&dir, THP, false)?)
}

/// On ext4 and XFS a text THP takes: a page cache that does not hold the
/// file yet, a 2 MiB-aligned mapping of a 2 MiB-aligned file offset, and
/// MADV_HUGEPAGE on it (the fault's readahead is then PMD-order).
pub(crate) fn full_cycle_on_ext4() -> TestResult {
    let dir = image("ext4")?;
    thp_cycle("ext4", &write_text(&dir, THP, true)?)
}

pub(crate) fn full_cycle_on_xfs() -> TestResult {
    let dir = image("xfs")?;
    thp_cycle("xfs", &write_text(&dir, THP, true)?)
}

const THP: usize = text::THP_SIZE;

/// The folio order of the page-cache page behind text page `page` (mapped
/// by the caller), from the compound head/tail bits of it and its
/// neighbours in /proc/kpageflags.
fn folio_order(t: &mut Target, page: usize) -> Result<u32, String> {
    let pm = io(Pagemap::open(t.pid))?;
    let kpf = io(KpageFlags::open())?;
    let pfn_of = |t: &mut Target, p: usize| -> Result<u64, String> {
        t.call(p)?;
        let e = io(pm.entry(t.page_addr(p)))?;
        ensure!(e.present() && e.file(), "page {p} not mapped from the page cache: {e:?}");
        Ok(e.pfn())
    };
    let pfn = pfn_of(t, page)?;
    let f = io(kpf.get(pfn))?;
    if !f.compound_head() && !f.compound_tail() {
        return Ok(0);
    }
    // Walk back to the head, then forward to the end of the folio.
    let mut first = page;
    while io(kpf.get(pfn_of(t, first)?))?.compound_tail() {
        ensure!(first > 0, "page 0 is a compound tail");
        first -= 1;
    }
    let head = pfn_of(t, first)?;
    let mut n = 1;
    while first + n < text::PAGES && pfn_of(t, first + n)? == head + n as u64 && io(kpf.get(head + n as u64))?.compound_tail() {
        n += 1;
    }
    ensure!(n.is_power_of_two(), "folio at page {first} has {n} pages");
    Ok(n.trailing_zeros())
}

/// The cycle on text whose page-cache folio is smaller than a PMD: PATCH
/// and RESTORE work the same, the page-cache page itself comes back, and
/// RESTORE queues no collapse — its journal says why.
fn small_folio_cycle(what: &str, path: &str, order: u32) -> TestResult {
    const PAGE: usize = 21;
    let mut t = Target::spawn(&["--file", path, "--no-huge"])?;
    ensure!(smaps(&t)?.pmd_mapped_kb() == 0, "{what}: PMD-mapped {:?}", smaps(&t)?);
    let got = folio_order(&mut t, PAGE)?;
    ensure!(got == order, "{what}: page-cache folio of order {got}, want {order}");
    let pm = io(Pagemap::open(t.pid))?;
    let cache = io(pm.entry(t.page_addr(PAGE)))?;
    let dev = io(Device::open())?;

    let handle = io(dev.patch(&patch_req(&t, PAGE, 77)))?;
    ensure!(t.call(PAGE)? == 77, "{what}: patch not running");
    let anon = io(pm.entry(t.page_addr(PAGE)))?;
    ensure!(anon.present() && !anon.file() && anon.exclusive(), "{what}: patched page {anon:?}");
    ensure!(smaps(&t)?.kb("Anonymous") == 4, "{what}: after PATCH {:?}", smaps(&t)?);
    let patched = events_of(handle)?;
    ensure!(
        patched.iter().any(|e| e.step == "patched" && e.note.contains("not PMD-mappable")),
        "{what}: PATCH journal {patched:?}"
    );

    io(dev.restore(handle))?;
    ensure!(t.call(PAGE)? == text::original_value(PAGE), "{what}: not restored");
    let back = io(pm.entry(t.page_addr(PAGE)))?;
    ensure!(back.present() && back.file() && back.pfn() == cache.pfn(), "{what}: after RESTORE {back:?}, page cache {cache:?}");
    ensure!(smaps(&t)?.kb("Anonymous") == 0, "{what}: anonymous memory left {:?}", smaps(&t)?);
    let evs = events_of(handle)?;
    let why = evs.iter().find(|e| e.step == "queue_collapse").ok_or(format!("{what}: no collapse decision: {:?}", steps(&evs)))?;
    ensure!(
        why.note.contains("smaller than a PMD") && why.order == Some(order),
        "{what}: collapse decision {why:?}"
    );
    ensure!(evs.iter().any(|e| e.step == "zap_anon_page" && e.pfn == Some(cache.pfn())), "{what}: {:?}", steps(&evs));
    // Nothing was queued, so no collapse work ever reports on this target.
    ensure!(!events()?.iter().any(|e| e.step == "collapse" && e.pid == t.pid), "{what}: a collapse ran");
    ensure!(smaps(&t)?.pmd_mapped_kb() == 0, "{what}: PMD-mapped {:?}", smaps(&t)?);
    Ok(())
}

pub(crate) fn cycle_on_a_4k_page_cache_queues_no_collapse() -> TestResult {
    let dir = tmpfs("never")?;
    small_folio_cycle("tmpfs huge=never", &write_text(&dir, THP, false)?, 0)
}

/// Order-4 folios, made by 64 KiB writes, on tmpfs and on ext4.
pub(crate) fn cycle_on_an_mthp_page_cache_queues_no_collapse() -> TestResult {
    let dir = tmpfs("within_size")?;
    small_folio_cycle("tmpfs huge=within_size, 64 KiB writes", &write_text(&dir, 64 << 10, false)?, 4)?;
    let dir = image("ext4")?;
    small_folio_cycle("ext4, 64 KiB writes", &write_text(&dir, 64 << 10, false)?, 4)
}
