//! PATCH_BATCH's core promise on real state: several pages of one THP
//! patched by one call, each page's sites executed together, one handle
//! that RESTORE gives back whole, and the PMD back after it.

use crate::common::*;
use crate::TestResult;
use hugepoke::device::{batch_site, Device};
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use std::time::Duration;

pub(crate) fn batch_patches_and_restores_every_site() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    const PAGES: [usize; 3] = [3, 4, 9];
    // Page 4 gets two sites: its function's value, and a filler int3 at
    // offset 100 (0xcc over 0xcc: a site that changes nothing visible).
    let mut sites = Vec::new();
    for (k, &page) in PAGES.iter().enumerate() {
        let new = text::mov_eax_ret(7000 + k as u32);
        let old = text::mov_eax_ret(text::original_value(page));
        sites.push(batch_site(t.page_addr(page), &new, Some(&old)));
    }
    sites.push(batch_site(t.page_addr(4) + 100, &[0xcc], Some(&[0xcc])));
    let handle = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    for (k, &page) in PAGES.iter().enumerate() {
        ensure!(t.call(page)? == 7000 + k as u32, "page {page} not patched");
    }
    ensure!(t.call(5)? == text::original_value(5), "neighbour changed");
    let s = smaps(&t)?;
    ensure!(
        s.kb("Anonymous") == 4 * PAGES.len() as u64 && s.pmd_mapped_kb() == 0,
        "after PATCH_BATCH {s:?}"
    );
    let q = dev
        .query_site(handle, 3)
        .map_err(|e| format!("site 3 of the batch not recorded: query: {e}"))?;
    ensure!(
        q.count == 4 && q.site == 3 && q.addr == t.page_addr(4) + 100 && q.len == 1,
        "query of site 3 {q:?}"
    );
    ensure!(
        dev.query_site(handle, 4).is_err(),
        "a site past the batch was answered"
    );
    // One split for the range, one COW per page.
    let evs = events()?;
    let from = evs
        .iter()
        .rposition(|e| e.step == "patch" && e.pid == t.pid)
        .ok_or("no patch event")?;
    let ours: Vec<_> = evs[from..].iter().filter(|e| e.pid == t.pid).collect();
    let splits: Vec<_> = ours
        .iter()
        .filter(|e| e.step == "split_pmd" && e.note.starts_with("PMD split"))
        .collect();
    ensure!(
        splits.len() == 1 && splits[0].pfn == Some(head),
        "PMD splits {splits:?}"
    );
    let cows = ours
        .iter()
        .filter(|e| e.step == "cow_page" && e.result == "ok")
        .count();
    ensure!(cows == PAGES.len(), "{cows} COWs for {} pages", PAGES.len());

    io(dev.restore(handle))?;
    for &page in PAGES.iter() {
        ensure!(
            t.call(page)? == text::original_value(page),
            "page {page} not restored"
        );
    }
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "anonymous memory left: {:?}",
        smaps(&t)?
    );
    ensure!(
        dev.query(handle).is_err(),
        "a restored batch is still known"
    );
    let evs = events_of(handle)?;
    let queued = evs.iter().filter(|e| e.step == "queue_collapse").count();
    ensure!(queued == 1, "{queued} collapses queued for one range");
    // One verdict for the handle: what `stats` counts it by.
    let settled: Vec<_> = evs.iter().filter(|e| e.step == "restored").collect();
    ensure!(
        settled.len() == 1 && settled[0].result == "ok",
        "the batch's restored records: {settled:?}"
    );
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# PMD back {took:?} after the batch RESTORE");
    ensure!(thp_head(&t)? == head, "a different THP came back");
    Ok(())
}

/// What the target and the kernel change between PATCH_BATCH and its
/// RESTORE: the text moves (mremap), one patched page is dropped
/// (MADV_DONTNEED: the target runs the page-cache page again), one is
/// swapped out.  RESTORE follows every page to where it is now, writes the
/// originals into the pages still patched (the swapped one comes back
/// first), forgets the dropped one, and the PMD comes back.
pub(crate) fn batch_restore_follows_moves_drops_and_swap() -> TestResult {
    let swap = hugepoke::testkit::backing::Swap::on()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    const PAGES: [usize; 3] = [40, 41, 42];
    let sites: Vec<_> = PAGES
        .iter()
        .map(|&p| batch_site(t.page_addr(p), &text::mov_eax_ret(8000 + p as u32), None))
        .collect();
    let handle = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    let moved = t.command("move")?;
    t.addr = moved
        .strip_prefix("moved ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("move said {moved:?}"))?;
    ensure!(t.call(40)? == 8040, "moved text lost the patch");
    ensure!(
        t.command("dontneed 41")? == "dontneed 41",
        "could not drop page 41"
    );
    ensure!(
        t.call(41)? == text::original_value(41),
        "page 41 still patched after MADV_DONTNEED"
    );
    let used_before = swap.used_kb()?;
    ensure!(
        t.command("pageout 42")? == "pageout ok",
        "could not page 42 out"
    );
    let e = io(io(hugepoke::proc::Pagemap::open(t.pid))?.entry(t.page_addr(42)))?;
    ensure!(e.swapped() && !e.present(), "page 42 after pageout: {e:?}");

    io(dev.restore(handle))?;
    for &p in PAGES.iter() {
        ensure!(
            t.call(p)? == text::original_value(p),
            "page {p} not restored"
        );
    }
    let evs = events_of(handle)?;
    let written: Vec<_> = evs
        .iter()
        .filter(|e| e.step == "restore_bytes" && e.note.contains("written back"))
        .collect();
    ensure!(
        written.len() == 2
            && written
                .iter()
                .all(|e| e.note.contains("moved") && e.addr >= Some(t.addr)),
        "restore_bytes at the new address for pages 40 and 42 only: {written:?}"
    );
    ensure!(
        evs.iter()
            .any(|e| e.step == "restore_bytes" && e.note.contains("already undone")),
        "page 41 not forgotten as undone: {:?}",
        steps(&evs)
    );
    let notes: Vec<_> = evs
        .iter()
        .filter(|e| e.step.contains("anon_page") || e.step == "lru_drain")
        .map(|e| format!("{} {}", e.step, e.note))
        .collect();
    ensure!(
        evs.iter()
            .any(|e| e.step == "zap_anon_page" && e.note.contains("swap slot freed")),
        "page 42's swap slot not freed: {notes:?}"
    );
    ensure!(
        swap.used_kb()? <= used_before,
        "swap slot leaked: {} kB used, {used_before} kB before; {notes:?}",
        swap.used_kb()?
    );
    ensure!(
        dev.query(handle).is_err(),
        "a restored batch is still known"
    );
    wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    ensure!(
        thp_head(&t)? == head && smaps(&t)?.kb("Anonymous") == 0,
        "after RESTORE: {:?}",
        smaps(&t)?
    );
    Ok(())
}

/// The target maps another file over its patched text: a batch RESTORE
/// writes nothing into the data now there, forgets the batch and says
/// ENXIO.
pub(crate) fn batch_restore_after_remap_writes_nothing() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let sites: Vec<_> = [50, 51]
        .iter()
        .map(|&p| batch_site(t.page_addr(p), &text::mov_eax_ret(p as u32), None))
        .collect();
    let handle = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    ensure!(
        t.command("remap-data 50")? == "remapped",
        "target could not remap"
    );
    let before: Vec<_> = [50, 51]
        .iter()
        .map(|&p| read_mem(t.pid, t.page_addr(p), 4096))
        .collect::<Result<_, _>>()?;
    let r = dev.restore(handle);
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENXIO),
        "RESTORE returned {r:?}, not ENXIO"
    );
    for (k, &p) in [50, 51].iter().enumerate() {
        ensure!(
            read_mem(t.pid, t.page_addr(p), 4096)? == before[k],
            "RESTORE wrote into the data now at page {p}"
        );
    }
    ensure!(dev.query(handle).is_err(), "batch still in the table");
    let settled: Vec<_> = events_of(handle)?
        .into_iter()
        .filter(|e| e.step == "restored")
        .collect();
    ensure!(
        settled.len() == 1 && settled[0].result == "-ENXIO",
        "the batch's restored records: {settled:?}"
    );
    Ok(())
}

/// The target forks while a batch is live: the child shares the patched
/// copies.  A batch RESTORE takes both pages back from the child (its PTEs
/// zapped: the shared pages are never written), then breaks COW for the
/// parent and writes only into the parent's pages.
pub(crate) fn batch_restore_after_fork_restores_the_child_too() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    const PAGES: [usize; 2] = [80, 81];
    let sites: Vec<_> = PAGES
        .iter()
        .map(|&p| batch_site(t.page_addr(p), &text::mov_eax_ret(8100 + p as u32), None))
        .collect();
    let handle = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    let forked = t.command("fork")?;
    let child: i32 = forked
        .strip_prefix("child ")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("fork said {forked:?}"))?;
    io(dev.restore(handle))?;
    let mut result = Ok(());
    for &p in PAGES.iter() {
        if t.call(p)? != text::original_value(p) {
            result = Err(format!("parent's page {p} not restored"));
        } else if read_mem(child, t.page_addr(p), 6)? != text::mov_eax_ret(text::original_value(p))
        {
            result = Err(format!("the child's page {p} still patched after RESTORE"));
        }
    }
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    result?;
    let evs = events_of(handle)?;
    ensure!(
        cow_broken(&evs),
        "no COW break journaled: {:?}",
        steps(&evs)
    );
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        batch_patches_and_restores_every_site,
        batch_restore_follows_moves_drops_and_swap,
        batch_restore_after_remap_writes_nothing,
        batch_restore_after_fork_restores_the_child_too,
    ];
}
