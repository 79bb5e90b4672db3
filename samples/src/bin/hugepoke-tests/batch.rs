//! PATCH_BATCH's all-or-nothing promises, on real state: a batch refused
//! at its last site changes nothing (bytes, anonymous memory, the PMD); a
//! batch that fails under the page-table lock of a later page undoes the
//! pages it wrote; several pages of one THP cost one split, one COW each
//! and one collapse; two batches racing for one range: one wins; a RESTORE
//! refused by one changed site writes nothing.

use crate::common::*;
use crate::races::Pause;
use crate::TestResult;
use hugepoke::device::{batch_site, journal_seq, BatchError};
use hugepoke::uapi::{self, BatchSite};

/// What a batch must leave exactly as it found when it is refused.
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// The whole 2 MiB text, as a debugger reads it.
    text: Vec<u8>,
    anonymous_kb: u64,
    pmd_mapped_kb: u64,
    /// The PFN every page is mapped by.
    pfns: Vec<u64>,
}

fn snapshot(t: &Target) -> Result<Snapshot, String> {
    let s = smaps(t)?;
    Ok(Snapshot {
        text: read_mem(t.pid, t.addr, text::THP_SIZE)?,
        anonymous_kb: s.kb("Anonymous"),
        pmd_mapped_kb: s.pmd_mapped_kb(),
        pfns: text_pfns(t)?.iter().map(|e| e.pfn()).collect(),
    })
}

/// Where two snapshots differ, in words (the 2 MiB text is not printed).
fn differences(before: &Snapshot, after: &Snapshot) -> String {
    let mut d = Vec::new();
    if let Some(i) = before
        .text
        .iter()
        .zip(&after.text)
        .position(|(a, b)| a != b)
    {
        d.push(format!("text differs first at offset {i:#x}"));
    }
    if before.anonymous_kb != after.anonymous_kb {
        d.push(format!(
            "Anonymous {} kB -> {} kB",
            before.anonymous_kb, after.anonymous_kb
        ));
    }
    if before.pmd_mapped_kb != after.pmd_mapped_kb {
        d.push(format!(
            "PMD-mapped {} kB -> {} kB",
            before.pmd_mapped_kb, after.pmd_mapped_kb
        ));
    }
    if let Some(p) = before
        .pfns
        .iter()
        .zip(&after.pfns)
        .position(|(a, b)| a != b)
    {
        d.push(format!(
            "page {p} PFN {:#x} -> {:#x}",
            before.pfns[p], after.pfns[p]
        ));
    }
    d.join("; ")
}

/// The function at the start of `page` made to return `value`, only over
/// its original bytes.
fn function_site(t: &Target, page: usize, value: u32) -> BatchSite {
    let old = text::mov_eax_ret(text::original_value(page));
    batch_site(t.page_addr(page), &text::mov_eax_ret(value), Some(&old))
}

/// Journal events about `pid` after `seq`.
fn events_after(seq: u64, pid: i32) -> Result<Vec<EventLine>, String> {
    Ok(events()?
        .into_iter()
        .filter(|e| e.seq > seq && e.pid == pid)
        .collect())
}

fn errno_of(r: &Result<u64, BatchError>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.error.raw_os_error())
}

/// A batch over pages 10..=19 whose last site is bad, five ways (address
/// not mapped, length 0, overlapping an earlier site of the batch,
/// expected bytes that are not there, overlapping a live patch — the
/// batch's second site on that page): each is refused with the last index
/// to blame, a journaled reason at that site's address, and the target
/// exactly as before: text, anonymous memory, PFNs and PMD.
pub(crate) fn batch_refused_at_its_last_site_changes_nothing() -> TestResult {
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let good: Vec<BatchSite> = (10..20)
        .map(|p| function_site(&t, p, 7000 + p as u32))
        .collect();
    let last = good.len();
    let before = snapshot(&t)?;
    ensure!(
        before.anonymous_kb == 0 && before.pmd_mapped_kb == 2048,
        "fresh target not pristine: {before:?}"
    );
    let wrong = text::mov_eax_ret(4242);
    let bad: [(&str, BatchSite, i32, &str); 4] = [
        (
            "unmapped address",
            batch_site(0x1000, &[0x90], None),
            libc::EFAULT,
            "not mapped",
        ),
        (
            "length 0",
            BatchSite {
                addr: t.page_addr(30),
                len: 0,
                ..Default::default()
            },
            libc::EINVAL,
            "1 to 16 bytes",
        ),
        (
            "overlapping site 3",
            batch_site(t.page_addr(13) + 2, &[0x90, 0x90], None),
            libc::EINVAL,
            "overlaps",
        ),
        (
            "expect mismatch",
            batch_site(t.page_addr(30), &[0x90; 6], Some(&wrong)),
            libc::EILSEQ,
            "not the expected ones",
        ),
    ];
    for (what, site, errno, reason) in bad {
        let mut sites = good.clone();
        sites.push(site);
        let seq = journal_seq();
        let r = dev.patch_batch(t.pid, &sites, 0);
        ensure!(
            errno_of(&r) == Some(errno),
            "{what}: PATCH_BATCH returned {r:?}, want {}",
            hugepoke::errno_name(errno)
        );
        let failed = r.unwrap_err().failed;
        ensure!(
            failed == Some(last),
            "{what}: failed = {failed:?}, want the last site ({last})"
        );
        let evs = events()?;
        let fail = evs
            .iter()
            .find(|e| e.seq > seq && e.result != "ok")
            .ok_or(format!("{what}: no failure journaled"))?;
        ensure!(
            fail.note.contains(reason),
            "{what}: journaled {:?}, want {reason:?}",
            fail.note
        );
        ensure!(
            fail.addr == Some(site.addr),
            "{what}: failure journaled at {:?}, not at the last site's {:#x}",
            fail.addr,
            site.addr
        );
        let after = snapshot(&t)?;
        ensure!(
            after == before,
            "{what}: the refused batch changed the target: {}",
            differences(&before, &after)
        );
    }
    // A refusal only the checks after the target is resolved can make:
    // the last site overlaps a live single patch at byte 200 of page 30
    // (EBUSY), and is not the first site of the batch on that page.
    let live = PatchRequest {
        pid: t.pid,
        addr: t.page_addr(30) + 200,
        bytes: vec![0x90],
        ..Default::default()
    };
    let single = io(dev.patch(&live))?;
    let before = snapshot(&t)?;
    let mut sites = good.clone();
    sites.push(function_site(&t, 30, 7030));
    sites.push(batch_site(t.page_addr(30) + 199, &[0x90, 0x90], None));
    let seq = journal_seq();
    let r = dev.patch_batch(t.pid, &sites, 0);
    ensure!(
        errno_of(&r) == Some(libc::EBUSY),
        "overlapping a live patch: PATCH_BATCH returned {r:?}, want EBUSY"
    );
    let failed = r.unwrap_err().failed;
    ensure!(
        failed == Some(last + 1),
        "overlapping a live patch: failed = {failed:?}, want the last site ({})",
        last + 1
    );
    let fail = events_after(seq, t.pid)?
        .into_iter()
        .find(|e| e.result != "ok")
        .ok_or("overlapping a live patch: no failure journaled")?;
    ensure!(
        fail.note.contains("overlaps a live patch") && fail.addr == Some(t.page_addr(30) + 199),
        "overlapping a live patch: journaled {fail:?}"
    );
    let after = snapshot(&t)?;
    ensure!(
        after == before,
        "overlapping a live patch: the refused batch changed the target: {}",
        differences(&before, &after)
    );
    io(dev.restore(single))?;
    // The good sites alone go in: the refusals were about the last site.
    let h = dev
        .patch_batch(t.pid, &good, 0)
        .map_err(|e| format!("the good sites: {e}"))?;
    ensure!(io(dev.query(h))?.count == last as u32, "query count");
    io(dev.restore(h))?;
    Ok(())
}

/// One file page reached at two addresses (the text file mapped twice)
/// would be two copies of one identity: a batch with sites on pages 12
/// and 13 of each mapping (so another page lies between the two sightings
/// of page 12 in address order) is refused with EINVAL, blaming the page-12
/// site of the higher mapping, journaled there; the first mapping is as
/// before (bytes, anonymous memory, PFNs, PMD), the second's bytes too.
/// Sites on different file pages of the two mappings go in, each mapping
/// runs its own, and RESTORE gives both back.
pub(crate) fn batch_refuses_one_file_page_at_two_addresses() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let reply = t.command("map-again")?;
    let second = reply
        .strip_prefix("mapped-again ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("map-again: {reply}"))?;
    let at_second = |page: usize| second + (page * text::PAGE) as u64;
    let dev = io(Device::open())?;
    let first_site = function_site(&t, 12, 7012);
    let second_site = BatchSite {
        addr: at_second(12),
        ..first_site
    };
    let first_13 = function_site(&t, 13, 7013);
    let second_13 = BatchSite {
        addr: at_second(13),
        ..first_13
    };
    let before = snapshot(&t)?;
    let second_before = read_mem(t.pid, second, text::THP_SIZE)?;
    let seq = journal_seq();
    let r = dev.patch_batch(t.pid, &[second_site, first_site, first_13, second_13], 0);
    ensure!(
        errno_of(&r) == Some(libc::EINVAL),
        "PATCH_BATCH of one file page at two addresses returned {r:?}, want EINVAL"
    );
    let (blamed, blamed_addr) = if second > t.addr {
        (0, second_site.addr)
    } else {
        (1, first_site.addr)
    };
    let failed = r.unwrap_err().failed;
    ensure!(
        failed == Some(blamed),
        "failed = {failed:?}, want {blamed} (the site at the higher address)"
    );
    let fail = events_after(seq, t.pid)?
        .into_iter()
        .find(|e| e.result != "ok")
        .ok_or("no failure journaled")?;
    ensure!(
        fail.note.contains("two addresses"),
        "journaled {:?}",
        fail.note
    );
    ensure!(
        fail.addr == Some(blamed_addr),
        "failure journaled at {:?}, want {blamed_addr:#x}",
        fail.addr
    );
    let after = snapshot(&t)?;
    ensure!(
        after == before,
        "the refused batch changed the first mapping: {}",
        differences(&before, &after)
    );
    ensure!(
        read_mem(t.pid, second, text::THP_SIZE)? == second_before,
        "the refused batch changed the second mapping"
    );

    // Different file pages of the two mappings: one identity each.
    let other = BatchSite {
        addr: at_second(13),
        ..function_site(&t, 13, 7013)
    };
    let h = dev
        .patch_batch(t.pid, &[first_site, other], 0)
        .map_err(|e| format!("sites on pages 12 and 13 of the two mappings: {e}"))?;
    ensure!(
        t.call(12)? == 7012,
        "page 12 of the first mapping does not run its patch"
    );
    ensure!(
        read_mem(t.pid, at_second(13), 6)? == text::mov_eax_ret(7013),
        "page 13 of the second mapping does not hold its patch"
    );
    ensure!(
        read_mem(t.pid, at_second(12), 6)? == second_before[12 * text::PAGE..][..6],
        "page 12 of the second mapping changed"
    );
    io(dev.restore(h))?;
    ensure!(
        t.call(12)? == text::original_value(12),
        "page 12 not restored"
    );
    ensure!(
        read_mem(t.pid, second, text::THP_SIZE)? == second_before,
        "the second mapping not restored"
    );
    Ok(())
}

/// A batch refused at its second page (another tool's int3 on that site)
/// undoes its first page; where that page was already another tool's copy
/// (a `/proc/PID/mem` write of the file's own byte), the undo writes the
/// originals back into it and leaves it: the same page, still anonymous,
/// as it was (hugepoke-model found it zapped).
pub(crate) fn failed_batch_leaves_a_copy_it_found_there() -> TestResult {
    batch_refused_beside_a_found_copy([52, 53], false)
}

/// The same with that copy shared once (the target forked, the child is
/// gone): no longer marked exclusive, so the kernel reuses it for PATCH's
/// write only while nothing else holds it (a review found PATCH holding
/// it, so that GUP copied it and the tool's page was freed; a CPU's LRU
/// batch holding it does the same, which is why they are drained first).
pub(crate) fn failed_batch_leaves_a_once_shared_copy_it_found_there() -> TestResult {
    batch_refused_beside_a_found_copy([58, 59], true)
}

fn batch_refused_beside_a_found_copy(pages: [usize; 2], shared: bool) -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(hugepoke::device::Device::open())?;
    let before = copy_by_a_mem_write(&t, pages[0])?;
    if shared {
        let child = fork_child(&mut t)?;
        // SAFETY: killing nothing but the target's child.
        unsafe { libc::kill(child, libc::SIGKILL) };
        // Its mm goes before it is a zombie.
        wait_for("the child's exit", Duration::from_secs(10), || {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            Ok(stat.is_empty() || stat.contains(") Z "))
        })?;
        // The kernel reuses a copy no longer marked exclusive only if
        // nothing else holds it, and a CPU's LRU batch may (the write's
        // fault put it in one, which GUP drains only on its own CPU):
        // every CPU's batch drained (drop_caches' lru_add_drain_all()).
        io(std::fs::write("/proc/sys/vm/drop_caches", "1"))?;
    }
    let second = t.page_addr(pages[1]);
    write_mem(t.pid, second, &[0xcc])?;
    let sites =
        pages.map(|p| batch_site(t.page_addr(p), &text::mov_eax_ret(5000 + p as u32), None));
    let seq = journal_seq();
    let refused = dev.patch_batch(t.pid, &sites, 0).map_err(|e| e.error);
    still_that_copy(&mut t, pages[0], before)?;
    refused_at_an_int3(refused, seq, t.pid)?;
    // The batch wrote into that copy, and the undo kept it on purpose:
    // not a batch that never wrote the first page.
    let first = t.page_addr(pages[0]);
    let on_first = |e: &hugepoke::proc::EventLine| {
        e.seq > seq && e.pid == t.pid && e.addr.is_some_and(|a| a & !4095 == first)
    };
    let evs = events()?;
    ensure!(
        evs.iter().any(|e| on_first(e)
            && e.step == "write_bytes"
            && e.result == "ok"
            && e.pfn == Some(before.pfn())),
        "the batch did not write page {} in the copy it found: {:?}",
        pages[0],
        steps(&evs)
    );
    ensure!(
        evs.iter().any(|e| on_first(e)
            && e.step == "keep_anon_page"
            && e.note.contains("the undo leaves it")),
        "the undo did not keep page {}'s copy on purpose: {:?}",
        pages[0],
        steps(&evs)
    );
    ensure!(
        read_mem(t.pid, second, 1)? == [0xcc],
        "page {}'s int3 is gone",
        pages[1]
    );
    Ok(())
}

/// The batch was refused at another tool's int3 (EBUSY), and journaled
/// why since `seq`.  (Not the newest failure: a collapse queued by the
/// undo may journal its own EBUSY after it.)
fn refused_at_an_int3(refused: Result<u64, std::io::Error>, seq: u64, pid: i32) -> TestResult {
    ensure!(
        matches!(&refused, Err(e) if e.raw_os_error() == Some(libc::EBUSY)),
        "PATCH_BATCH over another tool's int3: {refused:?}, want EBUSY"
    );
    let evs = events()?;
    ensure!(
        evs.iter().any(|e| e.seq > seq
            && e.pid == pid
            && e.result == "-EBUSY"
            && e.note.contains("changed by another tool")),
        "PATCH_BATCH over another tool's int3: no reason \"changed by another tool\" journaled: {:?}",
        steps(&evs)
    );
    Ok(())
}

/// The other side of `failed_batch_leaves_a_copy_it_found_there`: the
/// other tool's copy of page 56 goes (the target drops it) while the batch
/// is parked between its GUP and the page-table lock, so the page it then
/// writes is a copy its own GUP made.  Refused at page 57's int3, the undo
/// must zap that copy, not keep it as the other tool's: page 56 maps the
/// page cache again, and page 57 keeps the int3.
pub(crate) fn failed_batch_zaps_the_copy_it_made_after_anothers_went() -> TestResult {
    const PAGES: [usize; 2] = [56, 57];
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    copy_by_a_mem_write(&t, PAGES[0])?;
    let second = t.page_addr(PAGES[1]);
    write_mem(t.pid, second, &[0xcc])?;
    let sites =
        PAGES.map(|p| batch_site(t.page_addr(p), &text::mov_eax_ret(5600 + p as u32), None));
    let seq = journal_seq();
    let pause = Pause::arm("cowed", t.pid)?;
    let pid = t.pid;
    let batcher = std::thread::spawn(move || {
        let dev = Device::open().map_err(|e| e.to_string())?;
        Ok::<_, String>(dev.patch_batch(pid, &sites, 0).map_err(|e| e.error))
    });
    pause.wait_parked("cowed")?;
    let drop = format!("dontneed {}", PAGES[0]);
    ensure!(t.command(&drop)? == drop, "the target's MADV_DONTNEED");
    ensure!(
        pause.parked("cowed")?,
        "the batch left its pause before the drop"
    );
    pause.release()?;
    let refused = batcher.join().map_err(|_| "the batch thread panicked")??;
    refused_at_an_int3(refused, seq, t.pid)?;
    let after = text_pfns(&t)?[PAGES[0]];
    ensure!(
        !after.present() || after.file(),
        "page {} is still an anonymous copy after the failed batch, which made it: {after:?}",
        PAGES[0]
    );
    ensure!(
        t.call(PAGES[0])? == text::original_value(PAGES[0]),
        "page {} does not run the file's code",
        PAGES[0]
    );
    ensure!(
        read_mem(t.pid, second, 1)? == [0xcc],
        "page {}'s int3 is gone",
        PAGES[1]
    );
    // (The page it wrote was its own because the drop made it retry.)
    let evs = events()?;
    ensure!(
        evs.iter()
            .any(|e| e.seq > seq && e.pid == t.pid && e.note.starts_with("PTE changed after GUP")),
        "no retry after the drop: {:?}",
        steps(&evs)
    );
    Ok(())
}

/// The failure only the step that writes can see: the batch is parked
/// after every site was checked, then page 32's bytes change in the file
/// (the page cache its COW copies from).  Pages 30 and 31 are written
/// first (address order), then page 32's check under its page-table lock
/// fails: the call returns EILSEQ blaming that site, and pages 30 and 31
/// are put back and their copies zapped: the target runs its originals
/// there, the file's new bytes on page 32, no anonymous page is left, and
/// the PMD comes back.
pub(crate) fn batch_failing_on_a_later_page_undoes_the_earlier_pages() -> TestResult {
    use std::os::unix::fs::FileExt;
    const PAGES: [usize; 3] = [30, 31, 32];
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let file = format!("{thp_dir}/batch-undo.bin");
    io(std::fs::write(&file, text::blob()))?;
    let mut t = Target::spawn(&["--file", &file])?;
    let head = thp_head(&t)?;
    // Listed out of order: the module sorts them, the index is the caller's.
    let sites = vec![
        function_site(&t, 32, 7032),
        function_site(&t, 30, 7030),
        function_site(&t, 31, 7031),
    ];
    let theirs = text::mov_eax_ret(7777);

    let pause = Pause::arm("checked", t.pid)?;
    let seq = journal_seq();
    let pid = t.pid;
    let batcher = std::thread::spawn(move || {
        let dev = Device::open().map_err(|e| e.to_string())?;
        Ok::<_, String>(dev.patch_batch(pid, &sites, 0))
    });
    pause.wait_parked("checked")?;
    let f = io(std::fs::OpenOptions::new().write(true).open(&file))?;
    io(f.write_all_at(&theirs, (32 * text::PAGE) as u64))?;
    drop(f);
    pause.release()?;
    let r = batcher.join().map_err(|_| "batch thread panicked")??;

    ensure!(
        errno_of(&r) == Some(libc::EILSEQ),
        "PATCH_BATCH over bytes changed after its check returned {r:?}, not EILSEQ"
    );
    let failed = r.unwrap_err().failed;
    ensure!(
        failed == Some(0),
        "failed = {failed:?}, want site 0 (page 32's)"
    );
    let evs = events_after(seq, t.pid)?;
    let steps_seen = steps(&evs);
    let written = evs
        .iter()
        .filter(|e| e.step == "write_bytes" && e.result == "ok")
        .count();
    ensure!(
        written == 2,
        "{written} pages written before the failing one, want 2 (30, 31): {steps_seen:?}"
    );
    let locked_check = evs
        .iter()
        .find(|e| e.result != "ok" && e.note.contains("page-table lock"));
    ensure!(
        locked_check.is_some_and(|e| e.addr == Some(t.page_addr(32))),
        "no failure under the page-table lock journaled at page 32: {steps_seen:?}"
    );
    ensure!(
        evs.iter().any(|e| e.note.contains("undo")),
        "the journal does not say the batch was undone: {steps_seen:?}"
    );
    for page in [30, 31] {
        ensure!(
            t.call(page)? == text::original_value(page),
            "page {page} kept the failed batch's bytes"
        );
    }
    ensure!(
        t.call(32)? == 7777,
        "page 32 does not run the file's new bytes"
    );
    let s = smaps(&t)?;
    ensure!(
        s.kb("Anonymous") == 0,
        "anonymous copies left after the undo: {s:?}"
    );
    ensure!(
        io(proc::debugfs("patches"))?
            .lines()
            .all(|l| !l.contains(&format!(" {} ", t.pid)) && !l.starts_with("# a target is busy")),
        "a patch of the failed batch is listed (or a busy target hides it)"
    );
    wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    ensure!(thp_head(&t)? == head, "a different THP came back");
    for page in PAGES {
        let want = if page == 32 {
            7777
        } else {
            text::original_value(page)
        };
        ensure!(t.call(page)? == want, "page {page} after the collapse");
    }
    drop(t);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Ten pages of one THP, three sites each (the function, and two int3s
/// of the padding made nops): the journal shows one PMD split, one COW per
/// page; QUERY and debugfs `patches` agree site by site; RESTORE queues
/// one collapse, which succeeds, and the same THP is PMD-mapped again.
pub(crate) fn batch_over_pages_of_one_thp_splits_once_and_collapses_once() -> TestResult {
    const PAGES: std::ops::Range<usize> = 100..110;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let mut sites = Vec::new();
    for page in PAGES {
        sites.push(function_site(&t, page, 7000 + page as u32));
        for at in [600, 3000] {
            sites.push(batch_site(
                t.page_addr(page) + at,
                &[0x90, 0x90],
                Some(&[0xcc, 0xcc]),
            ));
        }
    }
    let seq = journal_seq();
    let h = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    for page in PAGES {
        ensure!(
            t.call(page)? == 7000 + page as u32,
            "page {page} not patched"
        );
    }
    ensure!(
        t.call(PAGES.end)? == text::original_value(PAGES.end),
        "the next page changed"
    );
    let evs = events_after(seq, t.pid)?;
    let splits: Vec<_> = evs
        .iter()
        .filter(|e| e.step == "split_pmd" && e.note.starts_with("PMD split"))
        .collect();
    ensure!(
        splits.len() == 1 && splits[0].pfn == Some(head),
        "PMD splits, want one of {head:#x}: {splits:?}"
    );
    let cows: Vec<u64> = evs
        .iter()
        .filter(|e| e.step == "cow_page" && e.result == "ok")
        .filter_map(|e| e.addr)
        .collect();
    let want: Vec<u64> = PAGES.map(|p| t.page_addr(p)).collect();
    let mut cowed = cows.clone();
    cowed.sort_unstable();
    cowed.dedup();
    ensure!(
        cows.len() == PAGES.len() && cowed == want,
        "COWs at {cows:x?}, want one at each of {want:x?}"
    );
    let s = smaps(&t)?;
    ensure!(
        s.kb("Anonymous") == 4 * PAGES.len() as u64,
        "after the batch {s:?}"
    );

    let pagemap = io(Pagemap::open(t.pid))?;
    for (i, site) in sites.iter().enumerate() {
        let q = io(dev.query_site(h, i as u32))?;
        ensure!(q.count == sites.len() as u32, "site {i}: count {}", q.count);
        ensure!(
            q.addr == site.addr && q.len == site.len,
            "site {i}: query {:#x}+{}",
            q.addr,
            q.len
        );
        let n = site.len as usize;
        ensure!(
            q.bytes[..n] == site.bytes[..n] && q.orig[..n] == site.expect[..n],
            "site {i}: bytes/orig {q:?}"
        );
        let pfn = io(pagemap.entry(site.addr & !(text::PAGE as u64 - 1)))?.pfn();
        ensure!(
            q.pfn == pfn,
            "site {i}: QUERY pfn {:#x}, pagemap {pfn:#x}",
            q.pfn
        );
    }
    let past = dev.query_site(h, sites.len() as u32);
    ensure!(
        past.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT),
        "QUERY past the batch: {past:?}"
    );
    let listed: Vec<String> = io(proc::debugfs("patches"))?
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(&h.to_string()))
        .map(String::from)
        .collect();
    ensure!(
        listed.len() == sites.len(),
        "debugfs patches lists {} sites of {}",
        listed.len(),
        sites.len()
    );
    for i in 0..sites.len() {
        let tag = format!("{i}/{}", sites.len());
        ensure!(
            listed
                .iter()
                .any(|l| l.split_whitespace().last() == Some(tag.as_str())),
            "no site {tag} in patches"
        );
    }

    let seq = journal_seq();
    io(dev.restore(h))?;
    for page in PAGES {
        ensure!(
            t.call(page)? == text::original_value(page),
            "page {page} not restored"
        );
    }
    ensure!(
        read_mem(t.pid, t.page_addr(PAGES.start), PAGES.len() * text::PAGE)?
            == text::blob()[PAGES.start * text::PAGE..PAGES.end * text::PAGE],
        "text not pristine after RESTORE"
    );
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "anonymous memory left: {:?}",
        smaps(&t)?
    );
    let queued = events_after(seq, t.pid)?
        .iter()
        .filter(|e| e.step == "queue_collapse" && e.result == "ok")
        .count();
    ensure!(queued == 1, "{queued} collapses queued for one 2 MiB range");
    let collapses = |evs: &[EventLine]| {
        evs.iter()
            .filter(|e| e.step == "collapse")
            .map(|e| e.note.clone())
            .collect::<Vec<_>>()
    };
    wait_for("the collapse work", Duration::from_secs(30), || {
        Ok(!collapses(&events_after(seq, t.pid)?).is_empty())
    })?;
    wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    let done = collapses(&events_after(seq, t.pid)?);
    ensure!(
        done.len() == 1 && done[0].starts_with("SCAN_SUCCEED"),
        "collapses after the RESTORE: {done:?}"
    );
    ensure!(thp_head(&t)? == head, "a different THP came back");
    Ok(())
}

/// Two threads, each with its own file, batch overlapping ranges of one
/// target (pages 40..50 and 45..55): the first is parked after its checks
/// while the second enters the ioctl; the second is refused with EBUSY,
/// blaming one of its sites on pages 45..50, and changes nothing.  Then
/// the same race unparked, three times: exactly one wins each time.
pub(crate) fn overlapping_batches_at_once_one_wins() -> TestResult {
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    let first: Vec<BatchSite> = (40..50)
        .map(|p| function_site(&t, p, 7100 + p as u32))
        .collect();
    // Listed from the top down, so the index differs from the page order.
    let second: Vec<BatchSite> = (45..55)
        .rev()
        .map(|p| function_site(&t, p, 7200 + p as u32))
        .collect();
    let overlaps = |s: &BatchSite| (t.page_addr(45)..t.page_addr(50)).contains(&s.addr);
    let pid = t.pid;
    let batch = |sites: Vec<BatchSite>| {
        std::thread::spawn(move || {
            let dev = Device::open().map_err(|e| e.to_string())?;
            let r = dev.patch_batch(pid, &sites, 0);
            // The device goes back with the result: closing it would restore the winner.
            Ok::<_, String>((dev, r))
        })
    };
    let batch_entries = |seq: u64| -> Result<usize, String> {
        Ok(events_after(seq, pid)?
            .iter()
            .filter(|e| e.step == "patch")
            .count())
    };

    let pause = Pause::arm("checked", t.pid)?;
    let seq = journal_seq();
    let a = batch(first.clone());
    pause.wait_parked("checked")?;
    // Nothing reads the target while it is parked: its mmap lock is held.
    let b = batch(second.clone());
    wait_for(
        "the second batch entering the ioctl",
        Duration::from_secs(30),
        || Ok(batch_entries(seq)? == 2),
    )?;
    pause.release()?;
    let (dev_a, ra) = a.join().map_err(|_| "thread panicked")??;
    let (_dev_b, rb) = b.join().map_err(|_| "thread panicked")??;
    ensure!(ra.is_ok(), "the parked batch failed: {ra:?}");
    ensure!(
        errno_of(&rb) == Some(libc::EBUSY),
        "the overlapping batch returned {rb:?}, not EBUSY"
    );
    let failed = rb
        .unwrap_err()
        .failed
        .ok_or("EBUSY with no site to blame")?;
    ensure!(
        overlaps(&second[failed]),
        "EBUSY blames site {failed} at {:#x}, not one on pages 45..50",
        second[failed].addr
    );
    for p in 40..55 {
        let want = if p < 50 {
            7100 + p as u32
        } else {
            text::original_value(p)
        };
        let got = read_mem(t.pid, t.page_addr(p), 6)?;
        ensure!(
            got == text::mov_eax_ret(want),
            "page {p} holds {got:x?}, want the first batch's or the original"
        );
    }
    let s = smaps(&t)?;
    ensure!(
        s.kb("Anonymous") == 4 * 10,
        "the refused batch left anonymous pages: {s:?}"
    );
    io(dev_a.restore(ra.unwrap()))?;
    drop(pause);

    for round in 0..3 {
        let (a, b) = (batch(first.clone()), batch(second.clone()));
        let (dev_a, ra) = a.join().map_err(|_| "thread panicked")??;
        let (dev_b, rb) = b.join().map_err(|_| "thread panicked")??;
        let (winner, won, lost, loser_sites) = match (&ra, &rb) {
            (Ok(h), Err(_)) => (dev_a, *h, &rb, &second),
            (Err(_), Ok(h)) => (dev_b, *h, &ra, &first),
            _ => return Err(format!("round {round}: both or neither won: {ra:?} {rb:?}")),
        };
        ensure!(
            errno_of(lost) == Some(libc::EBUSY),
            "round {round}: the loser got {lost:?}"
        );
        let failed = lost
            .as_ref()
            .unwrap_err()
            .failed
            .ok_or("EBUSY with no site to blame")?;
        ensure!(
            overlaps(&loser_sites[failed]),
            "round {round}: blamed site {failed} does not overlap"
        );
        let anon = smaps(&t)?.kb("Anonymous");
        ensure!(
            anon == 40,
            "round {round}: {anon} kB anonymous, want the winner's 10 pages"
        );
        io(winner.restore(won))?;
    }
    Ok(())
}

/// RESTORE of a batch one of whose sites a debugger changed: EILSEQ,
/// nothing written, every site still patched (and QUERY still answers);
/// once the byte is put back, RESTORE restores them all.
pub(crate) fn batch_restore_refused_by_one_changed_site_writes_nothing() -> TestResult {
    const PAGES: std::ops::Range<usize> = 60..65;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let sites: Vec<BatchSite> = PAGES
        .map(|p| function_site(&t, p, 7300 + p as u32))
        .collect();
    let h = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    let debugger = text::mov_eax_ret(77);
    write_mem(t.pid, t.page_addr(63), &debugger)?;
    ensure!(t.call(63)? == 77, "the debugger's write is not running");
    let before = snapshot(&t)?;
    let seq = journal_seq();
    let r = dev.restore(h);
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EILSEQ),
        "RESTORE returned {r:?}, not EILSEQ"
    );
    let evs = events_after(seq, t.pid)?;
    ensure!(
        evs.iter()
            .any(|e| e.result != "ok" && e.addr == Some(t.page_addr(63))),
        "no refusal journaled at the changed site: {:?}",
        steps(&evs)
    );
    ensure!(
        evs.iter().any(|e| e.note.contains("patch kept whole")),
        "the journal does not say the batch is kept: {:?}",
        steps(&evs)
    );
    let after = snapshot(&t)?;
    ensure!(
        after == before,
        "the refused RESTORE changed the target: {}",
        differences(&before, &after)
    );
    for p in PAGES {
        let want = if p == 63 { 77 } else { 7300 + p as u32 };
        ensure!(t.call(p)? == want, "page {p} after the refused RESTORE");
    }
    let q = io(dev.query_site(h, 4))?;
    ensure!(
        q.state == uapi::STATE_LIVE && q.count == 5,
        "batch not kept whole: {q:?}"
    );

    write_mem(t.pid, t.page_addr(63), &text::mov_eax_ret(7363))?;
    io(dev.restore(h))?;
    for p in PAGES {
        ensure!(
            t.call(p)? == text::original_value(p),
            "page {p} not restored"
        );
    }
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "anonymous memory left: {:?}",
        smaps(&t)?
    );
    wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    ensure!(thp_head(&t)? == head, "a different THP came back");
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        batch_refused_at_its_last_site_changes_nothing,
        batch_failing_on_a_later_page_undoes_the_earlier_pages,
        failed_batch_leaves_a_copy_it_found_there,
        failed_batch_leaves_a_once_shared_copy_it_found_there,
        failed_batch_zaps_the_copy_it_made_after_anothers_went,
        batch_over_pages_of_one_thp_splits_once_and_collapses_once,
        overlapping_batches_at_once_one_wins,
        batch_restore_refused_by_one_changed_site_writes_nothing,
        batch_refuses_one_file_page_at_two_addresses,
    ];
}
