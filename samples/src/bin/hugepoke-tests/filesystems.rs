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
use hugepoke::testkit::backing::{folio_order, image, tmpfs, write_text};

/// The cycle on a text THP: PMD-mapped → PATCH splits the PMD and COWs one
/// page → RESTORE zaps it, the page-cache subpage maps again → the queued
/// collapse brings the same THP back by a PMD.
fn thp_cycle(backing: &str, path: &str) -> TestResult {
    const PAGE: usize = 9;
    let mut t = Target::spawn(&["--file", path])?;
    let head = thp_head(&t).map_err(|e| format!("{backing}: {e}"))?;
    let kpf = io(KpageFlags::open())?;
    let f = io(kpf.get(head))?;
    ensure!(
        f.thp() && f.compound_head() && !f.anon(),
        "{backing}: head {head:#x} flags {f:?}"
    );
    let dev = io(Device::open())?;

    let handle = io(dev.patch(&patch_req(&t, PAGE, 4242)))?;
    ensure!(t.call(PAGE)? == 4242, "{backing}: patch not running");
    let anon = io(io(Pagemap::open(t.pid))?.entry(t.page_addr(PAGE)))?;
    ensure!(
        anon.present() && !anon.file() && anon.exclusive(),
        "{backing}: patched page {anon:?}"
    );
    let s = smaps(&t)?;
    ensure!(
        s.pmd_mapped_kb() == 0 && s.kb("Anonymous") == 4,
        "{backing}: after PATCH {s:?}"
    );
    let evs = events()?;
    let split = evs
        .iter()
        .rev()
        .find(|e| e.step == "split_pmd" && e.pid == t.pid)
        .ok_or("no split_pmd event")?;
    ensure!(
        split.pfn == Some(head) && split.order == Some(9),
        "{backing}: split_pmd {split:?}, head {head:#x}"
    );

    io(dev.restore(handle))?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "{backing}: not restored"
    );
    let took = wait_for(
        &format!("{backing}: page-cache page {PAGE} mapped again"),
        Duration::from_secs(30),
        || {
            t.call(PAGE)?;
            let e = io(io(Pagemap::open(t.pid))?.entry(t.page_addr(PAGE)))?;
            Ok(e.present() && e.file() && e.pfn() == head + PAGE as u64)
        },
    )?;
    println!("# {backing}: page-cache page back {took:?} after RESTORE");
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "{backing}: anonymous memory left {:?}",
        smaps(&t)?
    );
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# {backing}: PMD-mapped again {took:?} after RESTORE");
    ensure!(thp_head(&t)? == head, "{backing}: another THP came back");
    let collapse = events()?
        .into_iter()
        .rev()
        .find(|e| e.step == "collapse" && e.pid == t.pid)
        .ok_or("no collapse event")?;
    ensure!(
        collapse.result == "ok" && collapse.note.starts_with("SCAN_SUCCEED"),
        "{backing}: collapse {collapse:?}"
    );
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

/// The cycle on text whose page-cache folio is smaller than a PMD: PATCH
/// and RESTORE work the same, the page-cache page itself comes back, and
/// RESTORE queues no collapse — its journal says why.
fn small_folio_cycle(what: &str, path: &str, order: u32) -> TestResult {
    const PAGE: usize = 21;
    let mut t = Target::spawn(&["--file", path, "--no-huge"])?;
    ensure!(
        smaps(&t)?.pmd_mapped_kb() == 0,
        "{what}: PMD-mapped {:?}",
        smaps(&t)?
    );
    let got = folio_order(&mut t, PAGE)?;
    ensure!(
        got == order,
        "{what}: page-cache folio of order {got}, want {order}"
    );
    let pm = io(Pagemap::open(t.pid))?;
    let cache = io(pm.entry(t.page_addr(PAGE)))?;
    let dev = io(Device::open())?;

    let handle = io(dev.patch(&patch_req(&t, PAGE, 77)))?;
    ensure!(t.call(PAGE)? == 77, "{what}: patch not running");
    let anon = io(pm.entry(t.page_addr(PAGE)))?;
    ensure!(
        anon.present() && !anon.file() && anon.exclusive(),
        "{what}: patched page {anon:?}"
    );
    ensure!(
        smaps(&t)?.kb("Anonymous") == 4,
        "{what}: after PATCH {:?}",
        smaps(&t)?
    );
    let patched = events_of(handle)?;
    ensure!(
        patched
            .iter()
            .any(|e| e.step == "patched" && e.note.contains("not PMD-mappable")),
        "{what}: PATCH journal {patched:?}"
    );

    io(dev.restore(handle))?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "{what}: not restored"
    );
    let back = io(pm.entry(t.page_addr(PAGE)))?;
    ensure!(
        back.present() && back.file() && back.pfn() == cache.pfn(),
        "{what}: after RESTORE {back:?}, page cache {cache:?}"
    );
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "{what}: anonymous memory left {:?}",
        smaps(&t)?
    );
    let evs = events_of(handle)?;
    let why = evs
        .iter()
        .find(|e| e.step == "queue_collapse")
        .ok_or(format!("{what}: no collapse decision: {:?}", steps(&evs)))?;
    ensure!(
        why.note.contains("smaller than a PMD") && why.order == Some(order),
        "{what}: collapse decision {why:?}"
    );
    ensure!(
        evs.iter()
            .any(|e| e.step == "zap_anon_page" && e.pfn == Some(cache.pfn())),
        "{what}: {:?}",
        steps(&evs)
    );
    // Nothing was queued, so no collapse work ever reports on this target.
    ensure!(
        !events()?
            .iter()
            .any(|e| e.step == "collapse" && e.pid == t.pid),
        "{what}: a collapse ran"
    );
    ensure!(
        smaps(&t)?.pmd_mapped_kb() == 0,
        "{what}: PMD-mapped {:?}",
        smaps(&t)?
    );
    Ok(())
}

pub(crate) fn cycle_on_a_4k_page_cache_queues_no_collapse() -> TestResult {
    let dir = tmpfs("never")?;
    small_folio_cycle("tmpfs huge=never", &write_text(&dir, THP, false)?, 0)
}

/// Order-4 folios, made by 64 KiB writes, on tmpfs and on ext4.
pub(crate) fn cycle_on_an_mthp_page_cache_queues_no_collapse() -> TestResult {
    let dir = tmpfs("within_size")?;
    small_folio_cycle(
        "tmpfs huge=within_size, 64 KiB writes",
        &write_text(&dir, 64 << 10, false)?,
        4,
    )?;
    let dir = image("ext4")?;
    small_folio_cycle(
        "ext4, 64 KiB writes",
        &write_text(&dir, 64 << 10, false)?,
        4,
    )
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        full_cycle_on_tmpfs_huge_always,
        full_cycle_on_ext4,
        full_cycle_on_xfs,
        cycle_on_a_4k_page_cache_queues_no_collapse,
        cycle_on_an_mthp_page_cache_queues_no_collapse,
    ];
}
