//! Patches follow their file page (issue 7): RESTORE writes only into the
//! anonymous copy of the page PATCH changed, only over the bytes PATCH
//! wrote, wherever the target maps it now; what it cannot restore it keeps
//! or forgets for a reason it journals, with an errno the ABI lists.

use crate::common::*;
use crate::hardening::expect_errno;
use crate::TestResult;
use hugepoke::testkit::backing::Swap;
use hugepoke::uapi;

/// The target replaces its text by a writable private mapping of another
/// file at the same address and writes to it: RESTORE must not write the
/// stale text bytes into that data page (ENXIO, patch forgotten).
pub(crate) fn restore_after_remap_to_another_file_writes_nothing() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 30, 30)))?;
    ensure!(t.call(30)? == 30, "patch not running");
    ensure!(
        t.command("remap-data 30")? == "remapped",
        "target could not remap"
    );
    let before = read_mem(t.pid, t.page_addr(30), 4096)?;
    ensure!(
        before[..6] == [0x11; 6] && before[100] == 0x22,
        "data page is not the data file's: {:x?}",
        &before[..8]
    );
    expect_errno("restore", dev.restore(h), libc::ENXIO, "no longer mapped")?;
    let after = read_mem(t.pid, t.page_addr(30), 4096)?;
    ensure!(
        after == before,
        "RESTORE wrote into the data page: starts {:x?}",
        &after[..8]
    );
    ensure!(dev.query(h).is_err(), "patch still in the table");
    Ok(())
}

/// RESTORE finds a copy on the first and the last page of each mapping of
/// the text: the text split in two VMAs by unmapping page 9, one batch on
/// pages 0 and 8 (the first VMA's first and last) and 10 and 511 (the
/// second's), then RESTORE of the batch: every site back to the file's
/// bytes and its copy zapped (the walk for the copies passes over no
/// mapping's edge page).
pub(crate) fn restore_finds_copies_on_the_edge_pages_of_a_mapping() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let unmapped = t.command("unmap 9")?;
    ensure!(unmapped == "unmap 9 0", "unmap said {unmapped:?}");
    let dev = io(Device::open())?;
    let pages = [0, 8, 10, 511];
    let sites: Vec<_> = pages
        .iter()
        .map(|&p| {
            hugepoke::device::batch_site(t.page_addr(p), &text::mov_eax_ret(4000 + p as u32), None)
        })
        .collect();
    let h = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("PATCH_BATCH: {e}"))?;
    for &p in &pages {
        ensure!(t.call(p)? == 4000 + p as u32, "page {p} not patched");
    }
    io(dev.restore(h)).map_err(|e| format!("RESTORE of the batch: {e}"))?;
    for &p in &pages {
        ensure!(
            t.call(p)? == text::original_value(p),
            "page {p} still runs the patch after RESTORE"
        );
    }
    let evs = events_of(h)?;
    let zapped = evs
        .iter()
        .filter(|e| e.step == "zap_anon_page" && e.note.starts_with("PTE zapped"))
        .count();
    ensure!(
        zapped == pages.len(),
        "{zapped} copies zapped, want {}: {:?}",
        pages.len(),
        steps(&evs)
    );
    Ok(())
}

/// The target mremap()s its patched text: RESTORE follows the file page to
/// its new address, restores it there, and the PMD comes back there.
pub(crate) fn restore_follows_mremap() -> TestResult {
    // khugepaged asleep: the collapse after RESTORE must be the module's.
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 31, 31)))?;
    ensure!(t.call(31)? == 31, "patch not running");
    let moved = t.command("move")?;
    let new = moved
        .strip_prefix("moved ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("move said {moved:?}"))?;
    ensure!(new != t.addr, "text did not move");
    t.addr = new;
    ensure!(t.call(31)? == 31, "moved text lost the patch");
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(h))?;
    ensure!(
        t.call(31)? == 1031,
        "moved text still runs the patched bytes"
    );
    let evs = events_of(h)?;
    ensure!(
        evs.iter().any(|e| e.step == "restore_bytes"
            && e.note.contains("moved")
            && e.addr == Some(new + 31 * 4096)),
        "restore not journaled at the new address: {evs:?}"
    );
    ensure!(
        evs.iter().any(|e| e.step == "zap_anon_page"),
        "not zapped: {:?}",
        steps(&evs)
    );
    // The module's collapse, at the new address (not khugepaged's).
    wait_module_collapse(t.pid, new, seq)?;
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(10))?;
    ensure!(
        thp_head(&t)? == head && smaps(&t)?.kb("Anonymous") == 0,
        "after restore: {:?}",
        smaps(&t)?
    );
    println!("# PMD back at the new address {took:?} after RESTORE");
    Ok(())
}

/// A debugger (here /proc/PID/mem) overwrote the patched bytes: RESTORE
/// writes nothing (EILSEQ) and keeps the patch; once the patched bytes are
/// back, RESTORE works.
pub(crate) fn restore_refuses_bytes_changed_by_someone_else() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 32, 32)))?;
    write_mem(t.pid, t.page_addr(32), &text::mov_eax_ret(77))?;
    ensure!(t.call(32)? == 77, "debugger's write not running");
    // A refusal writes nothing, so a dirty tracker (CRIU) sees nothing.
    io(std::fs::write(format!("/proc/{}/clear_refs", t.pid), "4"))?;
    expect_errno(
        "restore",
        dev.restore(h),
        libc::EILSEQ,
        "not the ones PATCH wrote",
    )?;
    ensure!(
        !text_pfns(&t)?[32].soft_dirty(),
        "the refused RESTORE left the page soft-dirty"
    );
    ensure!(t.call(32)? == 77, "RESTORE overwrote the debugger's bytes");
    // The CLI says why, not only what happened to the patch.
    let (code, _, err) = crate::cli::hugepoke(&["restore", &h.to_string()])?;
    ensure!(
        code == 1 && err.contains("not the ones PATCH wrote"),
        "hugepoke restore exited {code}, said {err:?}"
    );
    ensure!(
        io(dev.query(h))?.state == uapi::STATE_LIVE,
        "patch not kept"
    );
    ensure!(
        events_of(h)?.iter().any(|e| e.note.contains("patch kept")),
        "journal does not say the patch is kept: {:?}",
        events_of(h)?
    );
    write_mem(t.pid, t.page_addr(32), &text::mov_eax_ret(32))?;
    io(dev.restore(h))?;
    ensure!(t.call(32)? == 1032, "not restored");
    wait_pmd_mapped(&mut t, Duration::from_secs(10))?;
    Ok(())
}

/// The target made its text writable: RESTORE refuses (EACCES) and keeps
/// the patch until the mapping is text again.
pub(crate) fn restore_refuses_a_writable_mapping() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 33, 33)))?;
    ensure!(
        t.command("protect rwx")? == "protected 0",
        "mprotect rwx failed"
    );
    expect_errno("restore", dev.restore(h), libc::EACCES, "writable")?;
    ensure!(t.call(33)? == 33, "RESTORE wrote into a writable mapping");
    ensure!(
        io(dev.query(h))?.state == uapi::STATE_LIVE,
        "patch not kept"
    );
    ensure!(
        t.command("protect rx")? == "protected 0",
        "mprotect rx failed"
    );
    io(dev.restore(h))?;
    ensure!(t.call(33)? == 1033, "not restored");
    wait_pmd_mapped(&mut t, Duration::from_secs(10))?;
    Ok(())
}

/// A file closed while its patch cannot be restored (the text made
/// writable): the close-time RESTORE keeps it, as persistent (journaled;
/// debugfs `patches` says `persistent`, not the closed file), and RESTORE
/// by handle gives it back once the text is r-x again.
pub(crate) fn close_time_restore_refused_keeps_the_patch_persistent() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 34, 34)))?;
    ensure!(
        t.command("protect rwx")? == "protected 0",
        "mprotect rwx failed"
    );
    drop(dev);
    // The close-time RESTORE runs in a work item: wait for its verdict.
    let why = "its file closed: patch kept whole as persistent";
    wait_for(
        "the close-time RESTORE's verdict",
        Duration::from_secs(10),
        || {
            Ok(events_of(h)?
                .iter()
                .any(|e| e.step == "restore" && e.note.contains(why)))
        },
    )?;
    ensure!(t.call(34)? == 34, "the refused close-time RESTORE wrote");
    let listed = proc::parse_patches(&io(proc::debugfs("patches"))?);
    ensure!(
        listed
            .iter()
            .any(|p| p.handle == h && p.owner == "persistent"),
        "the kept patch is not listed persistent: {listed:?}"
    );
    let dev = io(Device::open())?;
    ensure!(
        io(dev.query(h))?.state == uapi::STATE_LIVE,
        "patch not kept"
    );
    ensure!(
        t.command("protect rx")? == "protected 0",
        "mprotect rx failed"
    );
    io(dev.restore(h))?;
    ensure!(t.call(34)? == 1034, "not restored");
    Ok(())
}

/// Fresh anonymous pages of the test's own, touched (so allocated, from
/// this CPU's free list first), unmapped on drop.
struct FreshPages(*mut libc::c_void, usize);

impl FreshPages {
    fn take(pages: usize) -> Result<Self, String> {
        let len = pages * text::PAGE;
        // SAFETY: a fresh private anonymous mapping of our own.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        ensure!(p != libc::MAP_FAILED, "mmap of {len} bytes failed");
        for i in 0..pages {
            // SAFETY: within the mapping just made, writable.
            unsafe { std::ptr::write_volatile(p.cast::<u8>().add(i * text::PAGE), 1) };
        }
        Ok(Self(p, len))
    }
}

impl Drop for FreshPages {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping `take` made.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// The file mapped twice with one anon_vma (`MREMAP_DONTUNMAP`: a
/// mapping made since, with another, holds no copy of the patch's), a
/// private copy of the patched page in each mapping (a debugger wrote
/// into the second): RESTORE takes the copy
/// holding the page PATCH wrote and leaves the other as it is.  With no
/// copy that PATCH wrote nor at its address (the target dropped PATCH's,
/// wrote elsewhere on the page in both mappings and moved the first),
/// RESTORE refuses to guess: EBUSY, nothing written.
pub(crate) fn restore_picks_the_copy_patch_wrote_among_several() -> TestResult {
    const P: usize = 35;
    const Q: usize = 36; // and up to two pages after it
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    // A second mapping of the same anon_vma (of the fork family PATCH
    // writes in): its copies are candidates too.
    let b = map_again_same_family(&mut t)?;
    let h = io(dev.patch(&patch_req(&t, P, 35)))?;
    let off = |page: usize, at: u64| (page * text::PAGE) as u64 + at;
    let theirs = !file_bytes(&t, t.addr + off(P, 100), 1)?[0];
    write_mem(t.pid, b + off(P, 100), &[theirs])?;
    io(dev.restore(h))?;
    ensure!(
        t.call(P)? == text::original_value(P),
        "the first mapping not restored"
    );
    ensure!(
        read_mem(t.pid, b + off(P, 100), 1)? == [theirs]
            && read_mem(t.pid, b + off(P, 0), 6)? == file_bytes(&t, t.addr + off(P, 0), 6)?,
        "RESTORE changed the second mapping's copy"
    );

    // PATCH's copy dropped, copies made by writes elsewhere in both
    // mappings, the first moved.  (A copy may land on the very frame
    // PATCH's copy had, freed just before: then it would be PATCH's by its
    // PFN, and the scenario is tried again on another page.)
    // (PATCH's copy is on the LRU, not in a batch that holds it: dropped,
    // it is freed at once, to its CPU's free list, whose next allocation
    // takes it.  So the target and the test share CPU 0, and the test
    // takes a few fresh pages of its own before the writes.)
    crate::races::pin_to_cpu(0, 0)?;
    crate::races::pin_to_cpu(t.pid, 0)?;
    let mut tries = 0;
    let h = loop {
        tries += 1;
        ensure!(tries <= 3, "a new copy took PATCH's freed frame 3 times");
        let q = Q + tries;
        let h = io(dev.patch(&patch_req(&t, q, q as u32)))?;
        let pfn = io(dev.query(h))?.pfn;
        ensure!(
            t.command(&format!("dontneed {q}"))? == format!("dontneed {q}"),
            "dontneed"
        );
        let _decoy = FreshPages::take(16)?;
        let theirs = !file_bytes(&t, t.addr + off(q, 100), 1)?[0];
        write_mem(t.pid, t.addr + off(q, 100), &[theirs])?;
        write_mem(t.pid, b + off(q, 100), &[theirs])?;
        let pm = io(Pagemap::open(t.pid))?;
        let pfns = [
            io(pm.entry(t.addr + off(q, 0)))?.pfn(),
            io(pm.entry(b + off(q, 0)))?.pfn(),
        ];
        if !pfns.contains(&pfn) {
            break (h, q);
        }
        io(dev.restore_flags(h, uapi::RESTORE_DROP))?;
    };
    let (h, q) = h;
    let moved = t.command("move")?;
    let new: u64 = moved
        .strip_prefix("moved ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("move said {moved:?}"))?;
    t.addr = new;
    let before = (
        read_mem(t.pid, new + off(q, 0), 4096)?,
        read_mem(t.pid, b + off(q, 0), 4096)?,
    );
    expect_errno(
        "restore",
        dev.restore(h),
        libc::EBUSY,
        "several private copies",
    )?;
    ensure!(
        (
            read_mem(t.pid, new + off(q, 0), 4096)?,
            read_mem(t.pid, b + off(q, 0), 4096)?
        ) == before,
        "the refused RESTORE wrote"
    );
    // Nothing of ours is left to restore: root drops the handle.
    io(dev.restore_flags(h, uapi::RESTORE_DROP))?;
    Ok(())
}

/// The patched page gone for good — a guard region installed over it, the
/// file truncated below it (each zaps the copy): RESTORE forgets the patch
/// and says why, instead of keeping it for ever behind a GUP that cannot
/// succeed; nothing of it stays listed.
pub(crate) fn restore_forgets_a_page_gone_for_good() -> TestResult {
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let file = format!("{thp_dir}/gone-for-good.bin");
    io(std::fs::write(&file, text::blob()))?;
    let mut t = Target::spawn(&["--file", &file])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    // Truncation first: a VMA that once had a guard region is marked so
    // for good, and the truncation must be told by the file's size.
    let h = io(dev.patch(&patch_req(&t, 500, 500)))?;
    let f = io(std::fs::OpenOptions::new().write(true).open(&file))?;
    io(f.set_len((500 * text::PAGE) as u64))?;
    drop(f);
    io(dev.restore(h))?;
    let evs = events_of(h)?;
    ensure!(
        evs.iter()
            .any(|e| e.step == "restore_bytes" && e.note.contains("truncated")),
        "RESTORE after truncation: {:?}",
        steps(&evs)
    );
    let h = io(dev.patch(&patch_req(&t, 400, 400)))?;
    let guarded = t.command("guard 400")?;
    ensure!(guarded == "guard 400 0", "MADV_GUARD_INSTALL: {guarded}");
    io(dev.restore(h))?;
    let evs = events_of(h)?;
    ensure!(
        evs.iter()
            .any(|e| e.step == "restore_bytes" && e.note.contains("guard region")),
        "RESTORE after a guard region: {:?}",
        steps(&evs)
    );
    let listed = proc::parse_patches(&io(proc::debugfs("patches"))?);
    ensure!(
        !listed.iter().any(|p| p.pid == t.pid),
        "patches left: {listed:?}"
    );
    drop(t);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// The file mapped a second time and never touched there: RESTORE looks
/// for the copy in both mappings but faults neither page in where no
/// anonymous page can be (a VMA without an anon_vma), so the second
/// mapping's page stays not present.
pub(crate) fn restore_faults_in_no_mapping_without_copies() -> TestResult {
    const P: usize = 45;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, P, 45)))?;
    let b = map_again(&mut t)?;
    let at = b + (P * text::PAGE) as u64;
    let pm = io(Pagemap::open(t.pid))?;
    ensure!(
        !io(pm.entry(at))?.present(),
        "the second mapping was touched"
    );
    io(dev.restore(h))?;
    ensure!(t.call(P)? == text::original_value(P), "not restored");
    ensure!(
        !io(pm.entry(at))?.present(),
        "RESTORE faulted the page in where the target has no copy"
    );
    Ok(())
}

/// The file mapped twice with one anon_vma (`MREMAP_DONTUNMAP`): a
/// debugger's copy in the second mapping (a byte
/// elsewhere on the page), the patch in the first, then the first made
/// writable.  RESTORE may not write there, and the second mapping's copy,
/// which holds the originals at the site, is not the patch's: RESTORE
/// refuses and keeps the patch (it must not take the originals it sees
/// there for a restore and forget a patch still live in the first).
pub(crate) fn restore_keeps_a_patch_beside_a_copy_it_may_not_judge() -> TestResult {
    const P: usize = 46;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let b = map_again_same_family(&mut t)?;
    let other = b + (P * text::PAGE + 100) as u64;
    write_mem(
        t.pid,
        other,
        &[!file_bytes(&t, t.addr + (P * text::PAGE + 100) as u64, 1)?[0]],
    )?;
    let h = io(dev.patch(&patch_req(&t, P, 46)))?;
    ensure!(
        t.command("protect rwx")? == "protected 0",
        "mprotect rwx failed"
    );
    ensure!(
        dev.restore(h).is_err(),
        "RESTORE succeeded: it took the other mapping's copy for the patch's"
    );
    ensure!(
        io(dev.query(h))?.state == uapi::STATE_LIVE,
        "the patch, still live in the first mapping, was forgotten"
    );
    ensure!(t.call(P)? == 46, "the first mapping's patch is gone");
    ensure!(
        t.command("protect rx")? == "protected 0",
        "mprotect rx failed"
    );
    io(dev.restore(h))?;
    ensure!(t.call(P)? == text::original_value(P), "not restored");
    Ok(())
}

/// Have the target move the page tables of its text's first 64 pages to a
/// second mapping of the same anon_vma (`MREMAP_DONTUNMAP`), the first
/// staying mapped; where (the second mapping's page 0).  Page 90 is left
/// an anonymous copy.
fn map_again_same_family(t: &mut Target) -> Result<u64, String> {
    // An anon_vma first (a copy of page 90, made and left by a write):
    // one made later would be each mapping's own.
    let at = t.addr + (90 * text::PAGE) as u64;
    let byte = file_bytes(t, at, 1)?;
    write_mem(t.pid, at, &byte)?;
    let second = t.command("dontunmap")?;
    second
        .strip_prefix("dontunmapped ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("dontunmap said {second:?}"))
}

/// Have the target map its text file a second time; where.
fn map_again(t: &mut Target) -> Result<u64, String> {
    let second = t.command("map-again")?;
    second
        .strip_prefix("mapped-again ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("map-again said {second:?}"))
}

/// After RESTORE of the last patch in a range whose collapse cannot work
/// (another anonymous page in it, written by a debugger; page 0 not
/// mapped), the journal reports the kernel's own verdict, not a success.
pub(crate) fn failed_collapse_is_reported_with_the_kernels_reason() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 34, 34)))?;
    write_mem(t.pid, t.page_addr(35), &text::mov_eax_ret(35))?;
    ensure!(t.command("dontneed 0")? == "dontneed 0", "dontneed failed");
    io(dev.restore(h))?;
    let mut collapse = None;
    wait_for("collapse journaled", Duration::from_secs(10), || {
        collapse = events()?
            .into_iter()
            .rev()
            .find(|e| e.step == "collapse" && e.pid == t.pid);
        Ok(collapse.is_some())
    })?;
    let c = collapse.unwrap();
    // collapse_pte_mapped_thp() skips the none PTE of page 0 and stops at
    // page 35, which maps a page that is not the THP's: SCAN_FAIL.
    ensure!(
        c.result != "ok" && c.note.starts_with("SCAN_FAIL"),
        "collapse reported as {c:?}, want the kernel's SCAN_FAIL"
    );
    ensure!(t.call(35)? == 35 && t.call(34)? == 1034, "target's pages");
    Ok(())
}

/// Swap (seed: uprobes frees the swap slot): the patched page is paged out
/// between PATCH and RESTORE; RESTORE swaps it in, restores, zaps it and
/// frees its swap slot; the PMD comes back.
pub(crate) fn swapped_out_patch_restores_and_frees_its_swap_slot() -> TestResult {
    let swap = Swap::on()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 36, 36)))?;
    let used_before = swap.used_kb()?;
    ensure!(
        t.command("pageout 36")? == "pageout ok",
        "could not page the patched page out"
    );
    let e = io(io(Pagemap::open(t.pid))?.entry(t.page_addr(36)))?;
    ensure!(e.swapped() && !e.present(), "pagemap after pageout: {e:?}");
    ensure!(swap.used_kb()? > used_before, "nothing in swap");
    io(dev.restore(h))?;
    let evs = events_of(h)?;
    ensure!(
        evs.iter()
            .any(|e| e.step == "zap_anon_page" && e.note.contains("swap slot freed")),
        "no zap with swap freed: {evs:?}"
    );
    ensure!(
        swap.used_kb()? == used_before,
        "swap slot leaked: {} kB used, {used_before} kB before",
        swap.used_kb()?
    );
    ensure!(t.call(36)? == 1036, "not restored");
    wait_pmd_mapped(&mut t, Duration::from_secs(10))?;
    ensure!(
        thp_head(&t)? == head && smaps(&t)?.kb("Anonymous") == 0,
        "after restore: {:?}",
        smaps(&t)?
    );
    Ok(())
}

/// RESTORE zaps a copy only when the page-cache page it would fault back
/// in is there and uptodate; else it writes the originals and keeps the
/// copy, and says why.  On tmpfs (4 KiB folios): a page whose file range
/// was punched and fallocated again (an fallocated shmem folio is not
/// uptodate until first used; the hole punch leaves private copies), and
/// a page whose page-cache folio went to swap.
pub(crate) fn restore_keeps_the_copy_without_a_page_cache_page_to_fault_in() -> TestResult {
    use std::os::unix::io::AsRawFd;
    const STALE: usize = 25;
    const SWAPPED: usize = 26;
    let swap = Swap::on()?;
    let dir = hugepoke::testkit::backing::tmpfs("never")?;
    let path = hugepoke::testkit::backing::write_text(&dir, text::THP_SIZE, false)?;
    let mut t = Target::spawn(&["--file", &path, "--no-huge"])?;
    let dev = io(Device::open())?;
    let stale = io(dev.patch(&patch_req(&t, STALE, 2525)))?;
    let swapped = io(dev.patch(&patch_req(&t, SWAPPED, 2626)))?;
    let file = io(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path))?;
    let fd = file.as_raw_fd();
    let page = 4096i64;
    // SAFETY: our own file descriptor; plain fallocate calls.
    let rc = unsafe {
        let off = STALE as i64 * page;
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            page,
        ) | libc::fallocate(fd, 0, off, page)
    };
    ensure!(rc == 0, "fallocate: {}", std::io::Error::last_os_error());
    ensure!(
        t.call(STALE)? == 2525,
        "the hole punch took the private copy"
    );
    page_out_of_the_page_cache(&swap, fd, SWAPPED)?;
    for (h, page, why) in [
        (stale, STALE, "page-cache page is not uptodate"),
        (swapped, SWAPPED, "no page-cache page to fault back in"),
    ] {
        io(dev.restore(h))?;
        let evs = events_of(h)?;
        ensure!(
            evs.iter()
                .any(|e| e.step == "keep_anon_page" && e.note.contains(why)),
            "page {page}: copy not kept because {why:?}: {:?}",
            steps(&evs)
        );
        ensure!(
            t.call(page)? == text::original_value(page),
            "page {page} not restored"
        );
    }
    ensure!(
        smaps(&t)?.kb("Anonymous") == 8,
        "not the two copies kept: {:?}",
        smaps(&t)?
    );
    Ok(())
}

/// Push the tmpfs page `page` of `fd` out to swap: map it shared, read
/// it, drain the LRU batches (through drop_caches: a folio in a per-CPU
/// batch cannot be reclaimed) and `MADV_PAGEOUT` it, until `swap` holds
/// more than before.  (Not read again after that: a fault would bring it
/// back into the page cache.)
fn page_out_of_the_page_cache(swap: &Swap, fd: i32, page: usize) -> TestResult {
    let before = swap.used_kb()?;
    // SAFETY: a fresh shared read-only mapping of one page of our file,
    // read, advised and unmapped here.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            (page * 4096) as i64,
        )
    };
    ensure!(
        p != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let result = wait_for(
        "the page-cache page to go to swap",
        Duration::from_secs(10),
        || {
            if swap.used_kb()? > before {
                return Ok(true);
            }
            // SAFETY: `p` maps one readable page of our file.
            unsafe { std::ptr::read_volatile(p as *const u8) };
            io(std::fs::write("/proc/sys/vm/drop_caches", "1"))?;
            // SAFETY: as above.
            unsafe { libc::madvise(p, 4096, libc::MADV_PAGEOUT) };
            Ok(false)
        },
    );
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, 4096) };
    result.map(|_| ())
}

/// `hugepoke restore HANDLE`, its output discarded.
fn restore_cli(h: u64) -> Result<std::process::Child, String> {
    std::process::Command::new("hugepoke")
        .args(["restore", &h.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())
}

/// A RESTORE cut short by a fatal signal (EINTR) keeps the patch.  The
/// controller is the CLI (`hugepoke restore`).  The copy is paged out to
/// swap, the RESTORE is parked at the `restore` pause point (target's
/// locks held) and SIGKILLed there; the park ends on the signal and GUP,
/// faulting the copy back in, returns EINTR.
pub(crate) fn killed_restore_keeps_the_patch() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    {
        let h = io(dev.patch(&PatchRequest {
            persist: true,
            ..patch_req(&t, 40, 40)
        }))?;
        // Swapped out, the copy must be faulted in (GUP), which a fatal
        // signal cuts short; a copy in place is taken from the page table.
        let swap = Swap::on()?;
        let paged = t.command("pageout 40")?;
        ensure!(paged == "pageout ok", "pageout said {paged:?}");
        let pause = crate::races::Pause::arm("restore", t.pid)?;
        let mut cli = restore_cli(h)?;
        pause.wait_parked("restore")?;
        let _ = cli.kill();
        let _ = cli.wait();
        let evs = events_of(h)?;
        ensure!(
            evs.iter().any(|e| e.step == "restore"
                && e.result == "-EINTR"
                && e.note.contains("patch kept")),
            "RESTORE killed while parked: not EINTR with the patch kept: {:?}",
            steps(&evs)
        );
        ensure!(
            io(dev.query(h))?.state == uapi::STATE_LIVE,
            "the killed RESTORE's patch is not live"
        );
        ensure!(
            read_mem(t.pid, t.page_addr(40), 6)? == text::mov_eax_ret(40),
            "the killed RESTORE changed the bytes"
        );
        io(dev.restore(h))?;
        ensure!(t.call(40)? == 1040, "not restored after the killed RESTORE");
        drop(swap);
    }
    Ok(())
}

/// A RESTORE killed as it happens in the field: while it sleeps waiting
/// for the target's mmap lock (held by the target's own mprotect() loop);
/// attempts that slip in between two mprotect()s restore normally, and
/// none may lose the patch.  A kill is sent once the CLI sleeps inside
/// its ioctl, and one that lands must be journaled as the mmap-lock wait's
/// EINTR; a run in which none lands passes with a note saying so (the
/// scheduler decides).  Base flavour only (`BASE_ONLY`): on the debug
/// kernel under TCG every call of an attempt waits seconds for the hog,
/// and no kill has landed in the wait there.
pub(crate) fn killed_restore_waiting_for_the_mmap_lock_keeps_the_patch() -> TestResult {
    const ATTEMPTS: usize = 30;
    const HOG_BUDGET: Duration = Duration::from_secs(20);
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    ensure!(
        t.command("hog 512")? == "hogging",
        "target cannot hog its mmap lock"
    );
    let hogging = Instant::now();
    let (mut interrupted, mut attempts) = (0, 0);
    while interrupted == 0 && attempts < ATTEMPTS && hogging.elapsed() < HOG_BUDGET {
        attempts += 1;
        let h = io(dev.patch(&PatchRequest {
            persist: true,
            ..patch_req(&t, 40, 40)
        }))?;
        let mut cli = restore_cli(h)?;
        // Kill it once it sleeps uninterruptibly inside its ioctl (on the
        // mmap lock), not while its binary is still being paged in.
        let (stat, syscall) = (
            format!("/proc/{}/stat", cli.id()),
            format!("/proc/{}/syscall", cli.id()),
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            let in_ioctl = || {
                std::fs::read_to_string(&syscall)
                    .is_ok_and(|s| s.split_whitespace().next() == Some("16"))
            };
            if state.is_empty()
                || state.rsplit(')').next().is_some_and(|r| {
                    let r = r.trim_start();
                    r.starts_with('Z') || (r.starts_with('D') && in_ioctl())
                })
            {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let _ = cli.kill();
        let _ = cli.wait();
        let evs = events_of(h)?;
        let eintr = evs
            .iter()
            .any(|e| e.step == "restore" && e.result == "-EINTR");
        match dev.query(h) {
            Ok(_) if !evs.iter().any(|e| e.step == "restore") => {
                // Killed before its ioctl: nothing happened; try again.
                io(dev.restore(h))?;
            }
            Ok(q) => {
                ensure!(
                    eintr,
                    "attempt {attempts}: RESTORE neither finished nor was interrupted: {:?}",
                    steps(&evs)
                );
                ensure!(
                    q.state == uapi::STATE_LIVE,
                    "attempt {attempts}: query {q:?}"
                );
                ensure!(
                    evs.iter().any(|e| e.note.contains("patch kept")),
                    "attempt {attempts}: {:?}",
                    steps(&evs)
                );
                ensure!(
                    evs.iter()
                        .any(|e| e.result == "-EINTR" && e.note.contains("mmap lock")),
                    "attempt {attempts}: interrupted, but not in the mmap-lock wait: {:?}",
                    evs.iter()
                        .map(|e| (&e.step, &e.result, &e.note))
                        .collect::<Vec<_>>()
                );
                ensure!(
                    read_mem(t.pid, t.page_addr(40), 6)? == text::mov_eax_ret(40),
                    "attempt {attempts}: patched bytes gone"
                );
                interrupted += 1;
                io(dev.restore(h))?;
            }
            Err(_) => {
                // Restored before the kill, or lost: the bytes say which.
                ensure!(
                    !eintr,
                    "attempt {attempts}: interrupted RESTORE forgot the patch: {:?}",
                    steps(&evs)
                );
                ensure!(
                    read_mem(t.pid, t.page_addr(40), 6)? == text::mov_eax_ret(1040),
                    "attempt {attempts}: patch lost, bytes not restored"
                );
            }
        }
    }
    t.command("calm")?;
    ensure!(t.call(40)? == 1040, "not restored");
    if interrupted == 0 {
        // Nothing lost, but the wait was never interrupted.  Not a SKIP:
        // `make check` fails on any skip, and whether a kill lands in the
        // wait is the scheduler's; the certain half is
        // killed_restore_keeps_the_patch.
        println!("# no RESTORE caught waiting for the mmap lock in {attempts} attempts, {:?} (all restored normally, none lost)", hogging.elapsed());
        return Ok(());
    }
    println!("# RESTORE waiting for the mmap lock interrupted by SIGKILL (EINTR) in attempt {attempts}; the patch was kept");
    Ok(())
}

/// Load → patch → restore → collapse → unload leaves nothing behind, by the
/// module's own count at unload: every target and work item carries a
/// token; when the shared state is freed the kernel log says how many are
/// still alive, and if the state itself leaked the line never comes.  (In
/// the debug flavour kmemleak judges everything since boot once, after the
/// last unload: samples/guest-checks.)
pub(crate) fn unload_after_collapse_leaks_nothing() -> TestResult {
    let root = std::env::var("HUGEPOKE_ROOT").map_err(|_| "HUGEPOKE_ROOT not set")?;
    let ko = format!("{root}/src/hugepoke.ko");
    let before = dmesg_with("hugepoke: state freed")?.len();
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    {
        let dev = io(Device::open())?;
        let h = io(dev.patch(&patch_req(&t, 37, 37)))?;
        io(dev.restore(h))?;
        let persist = io(dev.patch(&PatchRequest {
            persist: true,
            ..patch_req(&t, 300, 38)
        }))?;
        ensure!(persist > 0, "no handle");
    }
    wait_pmd_mapped(&mut t, Duration::from_secs(10)).ok();
    wait_for("collapse journaled", Duration::from_secs(10), || {
        Ok(events()?
            .iter()
            .any(|e| e.step == "collapse" && e.pid == t.pid))
    })?;
    crate::hardening::run("rmmod", &["hugepoke"])?;
    let freed = freed_nothing_alive(before);
    crate::hardening::run("insmod", &[&ko])?;
    drop(t);
    freed
}

// This module's in-guest tests, in groups that main.rs's SUITE puts in run order.
tests! {
    TESTS: [
        restore_after_remap_to_another_file_writes_nothing,
        restore_follows_mremap,
        restore_finds_copies_on_the_edge_pages_of_a_mapping,
        restore_refuses_bytes_changed_by_someone_else,
        restore_refuses_a_writable_mapping,
        close_time_restore_refused_keeps_the_patch_persistent,
        restore_picks_the_copy_patch_wrote_among_several,
        restore_forgets_a_page_gone_for_good,
        restore_keeps_the_copy_without_a_page_cache_page_to_fault_in,
        restore_faults_in_no_mapping_without_copies,
        restore_keeps_a_patch_beside_a_copy_it_may_not_judge,
        failed_collapse_is_reported_with_the_kernels_reason,
        swapped_out_patch_restores_and_frees_its_swap_slot,
    ];
    KILLED_RESTORE: [
        killed_restore_keeps_the_patch,
        killed_restore_waiting_for_the_mmap_lock_keeps_the_patch,
    ];
    RELOADING: [
        #[reloads] unload_after_collapse_leaks_nothing,
    ];
}
