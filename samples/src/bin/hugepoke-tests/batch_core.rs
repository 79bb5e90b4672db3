//! PATCH_BATCH's core promise on real state: several pages of one THP
//! patched by one call, each page's sites executed together, one handle
//! that RESTORE gives back whole, and the PMD back after it.

use crate::common::*;
use crate::TestResult;
use hugepoke::device::{batch_site, Device};
use hugepoke::text;
use hugepoke::target::Target;
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
    let handle = dev.patch_batch(t.pid, &sites, 0).map_err(|e| format!("PATCH_BATCH: {e}"))?;
    for (k, &page) in PAGES.iter().enumerate() {
        ensure!(t.call(page)? == 7000 + k as u32, "page {page} not patched");
    }
    ensure!(t.call(5)? == text::original_value(5), "neighbour changed");
    let s = smaps(&t)?;
    ensure!(s.kb("Anonymous") == 4 * PAGES.len() as u64 && s.pmd_mapped_kb() == 0, "after PATCH_BATCH {s:?}");
    let q = io(dev.query_site(handle, 3))?;
    ensure!(q.count == 4 && q.addr == t.page_addr(4) + 100 && q.len == 1, "query of site 3 {q:?}");
    ensure!(dev.query_site(handle, 4).is_err(), "a site past the batch was answered");
    // One split for the range, one COW per page.
    let evs = events()?;
    let from = evs.iter().rposition(|e| e.step == "patch" && e.pid == t.pid && e.note == "batch").ok_or("no batch patch event")?;
    let ours: Vec<_> = evs[from..].iter().filter(|e| e.pid == t.pid).collect();
    let splits: Vec<_> = ours.iter().filter(|e| e.step == "split_pmd" && e.note.starts_with("PMD split")).collect();
    ensure!(splits.len() == 1 && splits[0].pfn == Some(head), "PMD splits {splits:?}");
    let cows = ours.iter().filter(|e| e.step == "cow_page" && e.result == "ok").count();
    ensure!(cows == PAGES.len(), "{cows} COWs for {} pages", PAGES.len());

    io(dev.restore(handle))?;
    for &page in PAGES.iter() {
        ensure!(t.call(page)? == text::original_value(page), "page {page} not restored");
    }
    ensure!(smaps(&t)?.kb("Anonymous") == 0, "anonymous memory left: {:?}", smaps(&t)?);
    ensure!(dev.query(handle).is_err(), "a restored batch is still known");
    let queued = events_of(handle)?.iter().filter(|e| e.step == "queue_collapse").count();
    ensure!(queued == 1, "{queued} collapses queued for one range");
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# PMD back {took:?} after the batch RESTORE");
    ensure!(thp_head(&t)? == head, "a different THP came back");
    Ok(())
}
