//! Other tools' copies: COLLAPSE (and `hugepoke collapse`) drops the
//! anonymous copies a `/proc/PID/mem` writer, a debugger or a uprobe left
//! in the target's text when they equal the page cache, keeps every other
//! one and says why, and gives the range its PMD back.

use crate::cli::hugepoke;
use crate::common::*;
use crate::hardening::expect_errno;
use crate::TestResult;
use hugepoke::uapi::{self, CollapseArgs};

/// Write `bytes` over the target's page `page` at `offset`, then the file's
/// own bytes back: the copy a debugger's poke and unpoke leave.
fn poke_and_unpoke(t: &Target, page: usize, offset: u64) -> TestResult {
    let at = t.page_addr(page) + offset;
    let file = file_bytes(t, at, 1)?;
    write_mem(t.pid, at, &[!file[0]])?;
    write_mem(t.pid, at, &file)
}

/// The PFN pagemap shows at the target's page `page`, if present.
fn pfn_at(t: &Target, page: usize) -> Result<Option<u64>, String> {
    let e = text_pfns(t)?[page];
    Ok(e.present().then(|| e.pfn()))
}

/// The text is PMD-mapped by the page-cache THP `head`, with no anonymous
/// page left, and every page runs its file's code.
fn pmd_back(t: &mut Target, head: u64, pages: &[usize]) -> TestResult {
    let s = smaps(t)?;
    ensure!(
        s.pmd_mapped_kb() == 2048 && s.kb("Anonymous") == 0,
        "after COLLAPSE: {s:?}"
    );
    for &p in pages {
        ensure!(
            pfn_at(t, p)? == Some(head + p as u64),
            "page {p} is not the page-cache THP's: {:?}",
            text_pfns(t)?[p]
        );
        ensure!(
            t.call(p)? == text::original_value(p),
            "page {p} does not run the file's code"
        );
    }
    Ok(())
}

/// The journal's records of COLLAPSE steps for `pid` after `seq`.
fn collapse_events(pid: i32, seq: u64) -> Result<Vec<EventLine>, String> {
    Ok(events()?
        .into_iter()
        .filter(|e| e.seq > seq && e.pid == pid && e.handle.is_none())
        .filter(|e| {
            matches!(
                e.step.as_str(),
                "collapse_range" | "zap_anon_page" | "keep_anon_page" | "lru_drain"
            )
        })
        .collect())
}

/// COLLAPSE of the target's range, checked to succeed as an ioctl.
fn collapse(dev: &Device, t: &Target) -> Result<CollapseArgs, String> {
    io(dev.collapse(t.pid, t.addr))
}

/// A `/proc/PID/mem` writer poked two pages and wrote the file's bytes
/// back: COLLAPSE drops both copies (they equal the page cache) and maps
/// the PMD again; the journal says so per copy and gives the verdict.
pub(crate) fn collapse_drops_a_mem_writers_copies_and_gives_the_pmd_back() -> TestResult {
    // A fresh copy waits in its CPU's LRU batch (with a reference) until
    // something drains it; COLLAPSE must drain to drop it.  Whether one
    // still waits when COLLAPSE looks is up to the rest of the guest, so
    // rounds go on until one did (the drain journaled).
    for round in 1..=ROUNDS {
        if collapse_drops_the_copies()? {
            return Ok(());
        }
        println!("# round {round}: no copy waited in an LRU batch when COLLAPSE looked; again");
    }
    println!("# in {ROUNDS} rounds no copy waited in an LRU batch: the drain was not exercised");
    Ok(())
}

/// Rounds of [`collapse_drops_a_mem_writers_copies_and_gives_the_pmd_back`].
const ROUNDS: usize = 8;

/// One round: a writer's two copies, COLLAPSE drops both and the PMD is
/// back.  Whether COLLAPSE had to drain an LRU batch for it.
fn collapse_drops_the_copies() -> Result<bool, String> {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    poke_and_unpoke(&t, 3, 100)?;
    poke_and_unpoke(&t, 300, 7)?;
    let s = smaps(&t)?;
    ensure!(
        s.pmd_mapped_kb() == 0 && s.kb("Anonymous") == 8,
        "the writer left no two copies: {s:?}"
    );
    let seq = hugepoke::device::journal_seq();
    let dev = io(Device::open())?;
    let a = collapse(&dev, &t)?;
    ensure!(
        a.result == uapi::COLLAPSE_DONE && a.dropped == 2 && a.first_kept == 0,
        "COLLAPSE said {a:?}"
    );
    pmd_back(&mut t, head, &[3, 300, 4])?;
    let evs = collapse_events(t.pid, seq)?;
    // In either order: a copy still in an LRU batch is kept by the first
    // look and dropped after the drain, after the other.
    let mut zapped: Vec<u64> = evs
        .iter()
        .filter(|e| e.step == "zap_anon_page" && e.note.contains("equal to the page-cache page"))
        .filter_map(|e| e.addr)
        .collect();
    zapped.sort_unstable();
    ensure!(
        zapped == [t.page_addr(3), t.page_addr(300)],
        "dropped copies journaled at {zapped:x?}: {:?}",
        steps(&evs)
    );
    ensure!(
        evs.iter()
            .any(|e| e.step == "collapse_range" && e.note.starts_with("SCAN_SUCCEED")),
        "no verdict journaled: {evs:?}"
    );
    // Again: nothing to drop, already PMD-mapped.
    let again = collapse(&dev, &t)?;
    ensure!(
        again.result == uapi::COLLAPSE_DONE && again.dropped == 0,
        "second COLLAPSE said {again:?}"
    );
    Ok(evs.iter().any(|e| e.step == "lru_drain"))
}

/// A change another tool still has in place is kept: the copy that
/// differs stays (its byte too), the identical one beside it goes, the
/// range stays PTE-mapped, and COLLAPSE says which copy and why.
pub(crate) fn collapse_keeps_a_copy_that_differs() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let theirs_at = t.page_addr(9) + 300;
    let theirs = !file_bytes(&t, theirs_at, 1)?[0];
    write_mem(t.pid, theirs_at, &[theirs])?;
    poke_and_unpoke(&t, 10, 0)?;
    let dev = io(Device::open())?;
    let a = collapse(&dev, &t)?;
    ensure!(
        read_mem(t.pid, theirs_at, 1)? == [theirs],
        "the other tool's byte is gone"
    );
    ensure!(
        a.result == uapi::COLLAPSE_COPIES_KEPT
            && a.dropped == 1
            && a.kept_differs == 1
            && a.first_kept == t.page_addr(9),
        "COLLAPSE said {a:?}"
    );
    let s = smaps(&t)?;
    ensure!(
        s.kb("Anonymous") == 4 && s.pmd_mapped_kb() == 0,
        "not the one differing copy left: {s:?}"
    );
    ensure!(t.call(10)? == text::original_value(10), "page 10");
    // The CLI says the same, and exits 1: a range a PMD could map is not.
    let (code, out, _) = hugepoke(&["collapse", "--pid", &t.pid.to_string()])?;
    ensure!(
        code == 1
            && out.contains("1 anonymous copy kept")
            && out.contains("1 differ from the page cache"),
        "hugepoke collapse exited {code}: {out}"
    );
    Ok(())
}

/// A copy something else holds (here a pipe, by vmsplice) is kept, even
/// though it equals the page cache.
pub(crate) fn collapse_keeps_a_pinned_copy() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    poke_and_unpoke(&t, 20, 0)?;
    // A pipe takes a page by vmsplice from its own mapper: the target's.
    let reply = t.command("pin 20")?;
    ensure!(reply.starts_with("pinned"), "target said {reply}");
    let dev = io(Device::open())?;
    let a = collapse(&dev, &t)?;
    let s = smaps(&t)?;
    ensure!(s.kb("Anonymous") == 4, "pinned copy dropped: {s:?}");
    ensure!(
        a.result == uapi::COLLAPSE_COPIES_KEPT && a.dropped == 0 && a.kept_pinned == 1,
        "COLLAPSE said {a:?}"
    );
    Ok(())
}

/// A live hugepoke patch is RESTORE's to give back: COLLAPSE keeps its
/// copy (and says it is ours) but drops an identical copy beside it; after
/// RESTORE the module's own collapse maps the PMD.
pub(crate) fn collapse_keeps_a_live_hugepoke_patch() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 30, 3030)))?;
    poke_and_unpoke(&t, 31, 0)?;
    let a = collapse(&dev, &t)?;
    ensure!(
        a.kept_patched == 1 && a.kept_differs == 0,
        "the live patch's copy not kept as ours: {a:?}"
    );
    ensure!(
        a.result == uapi::COLLAPSE_COPIES_KEPT && a.dropped == 1 && a.first_kept == t.page_addr(30),
        "COLLAPSE said {a:?}"
    );
    ensure!(t.call(30)? == 3030, "the patch is gone");
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(h))?;
    wait_module_collapse(t.pid, t.addr, seq)?;
    // (The collapse retracted the page table: the next fault maps the PMD.)
    t.call(0)?;
    pmd_back(&mut t, head, &[30, 31])
}

/// gdb, attached, sets a breakpoint (inserted at once) and detaches
/// (removing it): its poke and unpoke leave a copy equal to the page
/// cache, which COLLAPSE drops, and the PMD is back.
pub(crate) fn collapse_after_gdb_set_and_removed_a_breakpoint() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let at = t.page_addr(40);
    let gdb = io(std::process::Command::new("gdb")
        .args(["-nx", "-batch", "-p", &t.pid.to_string()])
        .args([
            "-iex",
            "set debuginfod enabled off",
            "-iex",
            "set auto-load off",
        ])
        .args(["-ex", "set breakpoint always-inserted on"])
        .args(["-ex", &format!("break *{at:#x}"), "-ex", "detach"])
        .output())?;
    let said = String::from_utf8_lossy(&gdb.stdout);
    ensure!(
        gdb.status.success() && said.contains("Breakpoint 1 at"),
        "gdb: {said}{}",
        String::from_utf8_lossy(&gdb.stderr)
    );
    let s = smaps(&t)?;
    ensure!(
        s.pmd_mapped_kb() == 0 && s.kb("Anonymous") >= 4,
        "gdb's breakpoint left no copy: {s:?}"
    );
    ensure!(
        read_mem(t.pid, at, 6)? == file_bytes(&t, at, 6)?,
        "gdb left its breakpoint"
    );
    let dev = io(Device::open())?;
    let a = collapse(&dev, &t)?;
    ensure!(
        a.result == uapi::COLLAPSE_DONE && a.dropped >= 1,
        "COLLAPSE said {a:?}"
    );
    println!(
        "# gdb left {} kB anonymous; COLLAPSE dropped {}",
        s.kb("Anonymous"),
        a.dropped
    );
    pmd_back(&mut t, head, &[40])
}

/// A uprobe from tracefs, attached, hit and detached: its PMD does not
/// come back by itself (uprobes zap their copy only without an unexpected
/// reference); `hugepoke collapse` gives it back and exits 0.
pub(crate) fn collapse_after_a_uprobe_came_and_went() -> TestResult {
    const PAGE: usize = 50;
    let _khugepaged = khugepaged_asleep()?;
    // A file of its own: a probe left behind must not reach other tests.
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let path = format!("{thp_dir}/uprobed-collapse.bin");
    io(std::fs::write(&path, text::blob()))?;
    let mut t = Target::spawn(&["--file", &path])?;
    let head = thp_head(&t)?;
    let at = t.page_addr(PAGE);
    let probe =
        hugepoke::testkit::uprobe::Uprobe::add("hugepoke_tests/live", &t.file, at - t.addr)?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the probed function"
    );
    ensure!(probe.hits()? >= 1, "the uprobe did not fire");
    drop(probe);
    let s = smaps(&t)?;
    ensure!(
        s.pmd_mapped_kb() == 0 && s.kb("Anonymous") == 4,
        "the detached uprobe left no copy (the case this test is for): {s:?}"
    );
    let (code, out, err) = hugepoke(&["collapse", "--pid", &t.pid.to_string()])?;
    ensure!(code == 0, "hugepoke collapse exited {code}: {out}{err}");
    println!(
        "# the detached uprobe left {} kB anonymous; hugepoke collapse said: {}",
        s.kb("Anonymous"),
        out.lines().find(|l| l.contains(&path)).unwrap_or("")
    );
    pmd_back(&mut t, head, &[PAGE])?;
    drop(t);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Bad input gets an errno and a reason, and changes nothing.
pub(crate) fn collapse_refuses_bad_input_with_a_reason() -> TestResult {
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    expect_errno(
        "COLLAPSE of an unaligned address",
        dev.collapse(t.pid, t.addr + 4096),
        libc::EINVAL,
        "not 2 MiB-aligned",
    )?;
    expect_errno(
        "COLLAPSE of no process",
        dev.collapse(i32::MAX, t.addr),
        libc::ESRCH,
        "no such process",
    )?;
    expect_errno(
        "COLLAPSE of an unmapped range",
        dev.collapse(t.pid, 0x200000),
        libc::EFAULT,
        "not mapped",
    )?;
    // Our own anonymous memory: not text.
    let len = 4 << 20;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    ensure!(p != libc::MAP_FAILED, "mmap");
    let aligned = (p as u64).next_multiple_of(2 << 20);
    let anon = dev.collapse(std::process::id() as i32, aligned);
    // SAFETY: our mapping, from above.
    unsafe { libc::munmap(p, len) };
    expect_errno(
        "COLLAPSE of anonymous memory",
        anon,
        libc::EINVAL,
        "not a file-backed mapping",
    )?;
    let mut a = CollapseArgs {
        size: 8,
        pid: t.pid,
        addr: t.addr,
        ..Default::default()
    };
    expect_errno(
        "COLLAPSE with a wrong size",
        dev.ioctl(uapi::IOCTL_COLLAPSE, &mut a),
        libc::EINVAL,
        "unknown struct size",
    )?;
    ensure!(
        smaps(&t)?.pmd_mapped_kb() == 2048,
        "a refused COLLAPSE changed the target"
    );
    Ok(())
}

/// A child forked while a patch lives runs it too: RESTORE takes it back
/// from the child first (its PTE of the shared patched page zapped, the
/// page not written), collapses the child's range, and journals it under
/// the child's pid; the close of the file that made a patch does the same.
pub(crate) fn restore_takes_the_patch_back_from_a_forked_child() -> TestResult {
    const PAGE: usize = 70;
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let req = PatchRequest {
        install_pmd: true,
        ..patch_req(&t, PAGE, 7070)
    };
    let h = io(dev.patch(&req))?;
    let child = fork_child(&mut t)?;
    let at = t.page_addr(PAGE);
    let result = (|| {
        ensure!(
            read_mem(child, at, 6)? == text::mov_eax_ret(7070),
            "the child does not run the patch"
        );
        let (code, out, err) = crate::cli::hugepoke(&["query", &h.to_string()])?;
        ensure!(
            code == 0 && out.contains(&format!("forked={child}\n")),
            "query does not show the forked child {child}: {out}{err}"
        );
        let forked = io(proc::debugfs("forked"))?;
        ensure!(
            forked.lines().any(|l| l == format!("{h} {child}")),
            "debugfs forked does not show the forked child {child}: {forked}"
        );
        let (_, list, _) = crate::cli::hugepoke(&["list"])?;
        ensure!(
            list.contains(&format!("# forked from handle {h}: pids {child}\n")),
            "list does not show the forked child {child}: {list}"
        );
        let (child_s, at_s) = (child.to_string(), format!("{at:#x}"));
        let (_, map, _) = crate::cli::hugepoke(&["map", "--pid", &child_s, "--addr", &at_s])?;
        ensure!(
            map.contains(&format!("handle {h} at {at:#x}"))
                && map.contains(&format!("forked from pid {}", t.pid)),
            "map of the forked child does not show the patch it runs: {map}"
        );
        io(dev.restore(h))?;
        ensure!(
            read_mem(child, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the forked child still runs the patch after RESTORE"
        );
        let s = io(proc::smaps_entry(child, t.addr))?;
        ensure!(
            s.kb("Anonymous") == 0 && s.pmd_mapped_kb() == 2048,
            "the child's text after RESTORE: {s:?}"
        );
        let e = io(io(Pagemap::open(child))?.entry(at))?;
        ensure!(
            e.present() && e.pfn() == head + PAGE as u64,
            "the child's page: {e:?}"
        );
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "parent not restored"
        );
        let evs = events_of(h)?;
        ensure!(
            restored_as_forked(&evs, child)
                && evs
                    .iter()
                    .any(|e| e.step == "zap_anon_page" && e.pid == child),
            "the child's restore not journaled under its pid: {:?}",
            steps(&evs)
        );
        ensure!(
            !restored_as_forked(&evs, t.pid),
            "the target taken for a forked process: {:?}",
            steps(&evs)
        );
        Ok(())
    })();
    // The close-time restore reaches a child too.
    let dev2 = io(Device::open())?;
    io(dev2.patch(&patch_req(&t, PAGE + 1, 7171)))?;
    let child2 = fork_child(&mut t)?;
    drop(dev2);
    let at2 = t.page_addr(PAGE + 1);
    let closed = wait_for(
        "the close-time restore in the child",
        Duration::from_secs(10),
        || Ok(read_mem(child2, at2, 6)? == text::mov_eax_ret(text::original_value(PAGE + 1))),
    );
    for c in [child, child2] {
        // SAFETY: killing nothing but the target's children.
        unsafe { libc::kill(c, libc::SIGKILL) };
    }
    result?;
    closed.map(|_| ())
}

/// Forty children forked while a patch lives (more than the first try of
/// a walk of the file's mappings has room for): RESTORE takes the patch
/// back from every one.
pub(crate) fn restore_takes_the_patch_back_from_forty_forked_children() -> TestResult {
    const PAGE: usize = 80;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 8080)))?;
    let mut children = Vec::new();
    let result = (|| {
        for _ in 0..40 {
            children.push(fork_child(&mut t)?);
        }
        let forked = io(dev.query_forked(h))?;
        ensure!(
            forked.len() == 40,
            "QUERY_FORKED names {} of the 40 children",
            forked.len()
        );
        io(dev.restore(h))?;
        let orig = text::mov_eax_ret(text::original_value(PAGE));
        for &c in &children {
            ensure!(
                read_mem(c, t.page_addr(PAGE), 6)? == orig,
                "child {c} of 40 still runs the patch after RESTORE"
            );
        }
        Ok(())
    })();
    for c in children {
        // SAFETY: killing nothing but the target's children.
        unsafe { libc::kill(c, libc::SIGKILL) };
    }
    result
}

/// A change another tool made in the patched page before the fork is in
/// the child's copy too: RESTORE puts the originals back in each process's
/// own copy (COW broken: the shared page is not written) and keeps the
/// change there, in the child as in the target.
pub(crate) fn restore_keeps_a_forked_childs_other_change() -> TestResult {
    const PAGE: usize = 72;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 7272)))?;
    let theirs_at = t.page_addr(PAGE) + 200;
    let theirs = !file_bytes(&t, theirs_at, 1)?[0];
    write_mem(t.pid, theirs_at, &[theirs])?;
    let child = fork_child(&mut t)?;
    let result = (|| {
        io(dev.restore(h))?;
        let orig = text::mov_eax_ret(text::original_value(PAGE));
        ensure!(
            read_mem(child, t.page_addr(PAGE), 6)? == orig,
            "the forked child still runs the patch after RESTORE"
        );
        ensure!(
            read_mem(child, theirs_at, 1)? == [theirs]
                && read_mem(t.pid, theirs_at, 1)? == [theirs],
            "the other tool's change is gone"
        );
        let s = io(proc::smaps_entry(child, t.addr))?;
        ensure!(
            s.kb("Anonymous") == 4,
            "the child's changed copy not kept: {s:?}"
        );
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "parent not restored"
        );
        Ok(())
    })();
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    result
}

/// A process forked before the patch shares the target's fork family
/// (the target had COWed a page already), so the walk names it too; its
/// own copy there holds the very bytes of the patch (its debugger wrote
/// them), and so does the copy of the child it forks after the patch:
/// RESTORE succeeds and leaves both alone (neither descends from the
/// target since the patch), restoring only the target and the child the
/// target forked after the patch.
pub(crate) fn restore_leaves_a_process_forked_before_the_patch_alone() -> TestResult {
    const PAGE: usize = 74;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    poke_and_unpoke(&t, 90, 0)?;
    let before = fork_child(&mut t)?;
    let at = t.page_addr(PAGE);
    let own = text::mov_eax_ret(7474);
    let mut grandchild = None;
    let result = (|| {
        write_mem(before, at, &own)?;
        let dev = io(Device::open())?;
        let h = io(dev.patch(&patch_req(&t, PAGE, 7474)))?;
        let after = fork_child(&mut t)?;
        // SAFETY: signalling the test's own child (it forks on SIGUSR1).
        unsafe { libc::kill(before, libc::SIGUSR1) };
        let g = child_of(before)?;
        grandchild = Some(g);
        // The one forked after the patch runs it; the others do not.
        let forked = io(dev.query_forked(h))?;
        let restored = dev.restore(h);
        let checked = (|| {
            ensure!(
                forked == [after],
                "QUERY_FORKED says {forked:?}, want [{after}] (not {before} nor {g})"
            );
            ensure!(restored.is_ok(), "RESTORE returned {restored:?}");
            ensure!(
                read_mem(before, at, 6)? == own,
                "RESTORE changed the process forked before the patch"
            );
            ensure!(
                read_mem(g, at, 6)? == own,
                "RESTORE changed the child of the process forked before the patch"
            );
            ensure!(
                read_mem(after, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
                "the child forked after the patch still runs it"
            );
            Ok(())
        })();
        // SAFETY: killing nothing but the target's child.
        unsafe { libc::kill(after, libc::SIGKILL) };
        checked
    })();
    for p in grandchild.into_iter().chain([before]) {
        // SAFETY: as above, and its child.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    result
}

/// The target is a subreaper.  A process it forked before the patch holds
/// the patch's very bytes in its own copy (its debugger wrote them), forks
/// a child after the patch and exits: the child is given to the target.
/// Its ancestry now ends at the target, but says nothing (a reaper is given
/// anyone's orphans), and its copy is neither the page PATCH wrote nor the
/// target's: RESTORE cannot tell whether it runs the patch, so it refuses
/// (EBUSY, patch kept, nothing written anywhere); once that process is
/// gone, RESTORE restores the target.
pub(crate) fn restore_leaves_an_orphan_given_to_a_subreaper_target_alone() -> TestResult {
    orphan_given_to_the_target(92, false)
}

/// As above, but the target stops being a subreaper once it has adopted
/// the orphan: the orphan's mark of a subreaper line, which the target's
/// own line does not explain, still says it may be adopted.
pub(crate) fn restore_leaves_an_orphan_alone_after_the_target_stopped_reaping() -> TestResult {
    orphan_given_to_the_target(91, true)
}

/// The body of the two tests above, on page `page`; with `unreap`, the
/// target clears its subreaper flag after the orphan was given to it.
fn orphan_given_to_the_target(page: usize, unreap: bool) -> TestResult {
    let mut t = Target::spawn(&["--subreaper"])?;
    thp_head(&t)?;
    poke_and_unpoke(&t, 90, 0)?;
    let exits = fork_child(&mut t)?;
    let at = t.page_addr(page);
    let own = text::mov_eax_ret(9292);
    let mut orphan = None;
    let result = (|| {
        write_mem(exits, at, &own)?;
        let dev = io(Device::open())?;
        let h = io(dev.patch(&patch_req(&t, page, 9292)))?;
        // SAFETY: signalling the test's own child (it forks on SIGUSR1),
        // then killing it: its child goes to the target.
        unsafe { libc::kill(exits, libc::SIGUSR1) };
        let g = child_of(exits)?;
        orphan = Some(g);
        unsafe { libc::kill(exits, libc::SIGKILL) };
        wait_for(
            "the orphan given to the target",
            Duration::from_secs(10),
            || Ok(ppid(g)? == t.pid),
        )?;
        if unreap {
            let said = t.command("unsubreaper")?;
            ensure!(said == "unsubreaper 0", "unsubreaper said {said:?}");
        }
        let forked = io(dev.query_forked(h))?;
        ensure!(forked.is_empty(), "QUERY_FORKED says {forked:?}, want []");
        let refused = dev.restore(h);
        ensure!(
            refused.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EBUSY),
            "RESTORE returned {refused:?}, want EBUSY"
        );
        ensure!(read_mem(g, at, 6)? == own, "RESTORE changed the orphan");
        ensure!(
            t.call(page)? == 9292,
            "the refused RESTORE changed the target"
        );
        let evs = events_of(h)?;
        ensure!(
            evs.iter()
                .any(|e| e.pid == g && e.note.contains("cannot be told")),
            "the refusal does not name the orphan: {:?}",
            steps(&evs)
        );
        // SAFETY: killing the orphan, which the target reaps... or not: it
        // only has to be gone from the family.
        unsafe { libc::kill(g, libc::SIGKILL) };
        wait_for("the orphan gone", Duration::from_secs(10), || {
            Ok(!read_mem(g, at, 6).is_ok_and(|b| b == own))
        })?;
        io(dev.restore(h))?;
        ensure!(
            t.call(page)? == text::original_value(page),
            "the target not restored once the orphan was gone"
        );
        Ok(())
    })();
    for p in orphan.into_iter().chain([exits]) {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    result
}

/// The parent of `pid` now (`PPid` in /proc/PID/status).
fn ppid(pid: i32) -> Result<i32, String> {
    let status = io(std::fs::read_to_string(format!("/proc/{pid}/status")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:")?.trim().parse().ok())
        .ok_or(format!("no PPid for {pid}"))
}

/// The one child of `pid`, once it has forked it.
fn child_of(pid: i32) -> Result<i32, String> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let mut child = 0;
    wait_for("the grandchild", Duration::from_secs(10), || {
        let text = io(std::fs::read_to_string(&path))?;
        child = text
            .split_whitespace()
            .next()
            .map_or(Ok(0), |c| c.parse().map_err(|e| format!("{path}: {e}")))?;
        Ok(child != 0)
    })?;
    Ok(child)
}

/// The target makes a child with clone(CLONE_PARENT) while the patch
/// lives: the child's parent is the target's parent (the test), not the
/// target, yet it runs the patch (it shares the target's copy).  Its
/// ancestry cannot say it is the target's, but its copy is the target's
/// own page: QUERY_FORKED names it and RESTORE takes the patch back from
/// it too.
pub(crate) fn restore_reaches_a_clone_parent_child() -> TestResult {
    const PAGE: usize = 93;
    let (mut t, dev, h, child) = patched_then_cloned(PAGE, 9393)?;
    let result = (|| {
        let me = std::process::id() as i32;
        ensure!(ppid(child)? == me, "the clone's parent is not the test");
        let forked = io(dev.query_forked(h))?;
        ensure!(
            forked == [child],
            "QUERY_FORKED says {forked:?}, want [{child}]"
        );
        io(dev.restore(h))?;
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "the target not restored"
        );
        clone_restored(&t, child, PAGE)
    })();
    kill_and_wait(child);
    result
}

/// A pre-forking master's worker is patched; the master forks another
/// worker after the patch, and another tool writes the patch's very bytes
/// into that sibling's text.  The sibling is of the target's fork family
/// (the master's copies made it) and its ancestry ends at the target's
/// parent, as a CLONE_PARENT child's would: its copy, neither the page
/// PATCH wrote nor the target's, says it is the master's line.  RESTORE
/// restores the target and leaves the sibling's bytes alone.
pub(crate) fn restore_leaves_the_targets_sibling_alone() -> TestResult {
    const PAGE: usize = 96;
    let mut master = Target::spawn(&[])?;
    thp_head(&master)?;
    // The master's own copy: its text gets the anon_vma its workers' share.
    poke_and_unpoke(&master, 90, 0)?;
    let worker = fork_child(&mut master)?;
    let mut sibling = None;
    let result = (|| {
        let at = master.page_addr(PAGE);
        let bytes = text::mov_eax_ret(9696);
        let dev = io(Device::open())?;
        let req = PatchRequest {
            pid: worker,
            ..patch_req(&master, PAGE, 9696)
        };
        let h = io(dev.patch(&req))?;
        let s = *sibling.insert(fork_child(&mut master)?);
        write_mem(s, at, &bytes)?;
        let forked = io(dev.query_forked(h))?;
        ensure!(forked.is_empty(), "QUERY_FORKED says {forked:?}, want []");
        io(dev.restore(h))?;
        ensure!(
            read_mem(s, at, 6)? == bytes,
            "RESTORE wrote into the target's sibling"
        );
        ensure!(
            read_mem(worker, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the worker not restored"
        );
        Ok(())
    })();
    for p in sibling.into_iter().chain([worker]) {
        kill_and_wait(p);
    }
    result
}

/// A process that shares the target's memory (clone(CLONE_VM), its own
/// thread group, made before the patch) forks a child while the patch
/// lives: the child's parent is not the target, but it forked from the
/// very pages.  RESTORE counts the peer as the target and takes the patch
/// back from the child.
pub(crate) fn restore_reaches_a_clone_vm_peers_child() -> TestResult {
    const PAGE: usize = 98;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let peer = pid_said(&mut t, "clone-vm", "peer ")?;
    let mut child = None;
    let result = (|| {
        let dev = io(Device::open())?;
        let h = io(dev.patch(&patch_req(&t, PAGE, 9898)))?;
        let c = *child.insert(pid_said(&mut t, "peer-fork", "child ")?);
        ensure!(ppid(c)? == peer, "the child's parent is not the peer");
        let at = t.page_addr(PAGE);
        ensure!(
            read_mem(c, at, 6)? == text::mov_eax_ret(9898),
            "the peer's child does not run the patch"
        );
        let forked = io(dev.query_forked(h))?;
        ensure!(forked == [c], "QUERY_FORKED says {forked:?}, want [{c}]");
        io(dev.restore(h))?;
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "the target not restored"
        );
        ensure!(
            read_mem(c, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the CLONE_VM peer's child still runs the patch after RESTORE"
        );
        Ok(())
    })();
    for p in child.into_iter().chain([peer]) {
        kill_and_wait(p);
    }
    result
}

/// As above, but the target exits (and is reaped) before RESTORE: the
/// clone's ancestry ends at the target's parent (recorded when the target
/// was first patched), and it maps the very page PATCH wrote: RESTORE of
/// the gone target's patch takes it back from the clone.
pub(crate) fn restore_of_a_gone_target_reaches_its_clone_parent_child() -> TestResult {
    const PAGE: usize = 97;
    let (t, dev, h, child) = patched_then_cloned(PAGE, 9797)?;
    let result = (|| {
        kill_and_reap(&t);
        ensure!(
            read_mem(child, t.page_addr(PAGE), 6)? == text::mov_eax_ret(9797),
            "the clone does not run the patch"
        );
        io(dev.restore(h))?;
        clone_restored(&t, child, PAGE)
    })();
    kill_and_wait(child);
    result
}

/// A target with page `page` patched to return `value` (handle `h` of
/// `dev`), then a child of it made with clone(CLONE_PARENT).
fn patched_then_cloned(page: usize, value: u32) -> Result<(Target, Device, u64, i32), String> {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, page, value)))?;
    let child = clone_parent_child(&mut t)?;
    Ok((t, dev, h, child))
}

/// The CLONE_PARENT `child` of `t` runs page `page`'s original code.
fn clone_restored(t: &Target, child: i32, page: usize) -> TestResult {
    ensure!(
        read_mem(child, t.page_addr(page), 6)? == text::mov_eax_ret(text::original_value(page)),
        "the CLONE_PARENT child still runs the patch"
    );
    Ok(())
}

/// A child forked while the patch lives makes its text read-only (not
/// executable) but keeps its copy, patch and all: it may make the text
/// executable again and run it.  The walk still names it, and RESTORE
/// refuses there (EACCES, journaled under its pid) before writing
/// anywhere; once its text is executable again, RESTORE takes the patch
/// back from both.
pub(crate) fn restore_refuses_while_a_forked_child_keeps_the_patch_without_exec() -> TestResult {
    const PAGE: usize = 94;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 9494)))?;
    let child = fork_child(&mut t)?;
    let at = t.page_addr(PAGE);
    let result = (|| {
        flip_exec(child, at, "r--p")?;
        let refused = dev.restore(h);
        expect_errno("RESTORE", refused, libc::EACCES, "without exec")?;
        let evs = events_of(h)?;
        ensure!(
            evs.iter()
                .any(|e| e.pid == child && e.note.contains("without exec")),
            "the refusal does not name the child: {:?}",
            steps(&evs)
        );
        ensure!(
            t.call(PAGE)? == 9494,
            "the refused RESTORE changed the target"
        );
        ensure!(
            read_mem(child, at, 6)? == text::mov_eax_ret(9494),
            "the refused RESTORE changed the child"
        );
        flip_exec(child, at, "r-xp")?;
        io(dev.restore(h))?;
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "the target not restored"
        );
        ensure!(
            read_mem(child, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the child still runs the patch"
        );
        Ok(())
    })();
    kill_and_wait(child);
    result
}

/// Kill a process the test made (directly or through a target) and reap
/// it if it is the test's own child.
pub(crate) fn kill_and_wait(pid: i32) {
    // SAFETY: killing a process the test made; waitpid reaps it if it is
    // the test's own child, and fails at once (ECHILD) if not.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
    }
}

/// A child forked while the patch lives whose copy then diverged from the
/// target's (another tool wrote elsewhere in the page, in the child
/// only) still runs the patch: RESTORE finds it through the file's
/// mappings, restores the site in the child's own copy and keeps the other
/// change; a child whose site another tool overwrote with its own bytes no
/// longer runs the patch and is left alone.
pub(crate) fn restore_reaches_a_forked_childs_diverged_copy() -> TestResult {
    const PAGE: usize = 76;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 7676)))?;
    let (child, other) = (fork_child(&mut t)?, fork_child(&mut t)?);
    let at = t.page_addr(PAGE);
    let result = (|| {
        let theirs_at = at + 200;
        let theirs = !file_bytes(&t, theirs_at, 1)?[0];
        write_mem(child, theirs_at, &[theirs])?;
        let breakpoint = [0xcc, 0x90, 0x90, 0x90, 0x90, 0x90];
        write_mem(other, at, &breakpoint)?;
        let (cp, tp) = (pfn_of(child, at)?, pfn_of(t.pid, at)?);
        ensure!(cp != tp, "the child's copy did not diverge: {cp:#x}");
        let forked = io(dev.query_forked(h))?;
        ensure!(
            forked == [child],
            "QUERY_FORKED says {forked:?}, want [{child}] (not {other})"
        );
        io(dev.restore(h))?;
        let orig = text::mov_eax_ret(text::original_value(PAGE));
        ensure!(
            read_mem(child, at, 6)? == orig,
            "the forked child's diverged copy still runs the patch after RESTORE"
        );
        ensure!(
            read_mem(child, theirs_at, 1)? == [theirs],
            "the other tool's change in the child is gone"
        );
        ensure!(
            read_mem(other, at, 6)? == breakpoint,
            "RESTORE wrote over the other tool's bytes at the site"
        );
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "parent not restored"
        );
        Ok(())
    })();
    for c in [child, other] {
        // SAFETY: killing nothing but the target's children.
        unsafe { libc::kill(c, libc::SIGKILL) };
    }
    result
}

/// The target maps its text's file again over the text (its copies go),
/// and another tool writes the patch's very bytes into the new mapping:
/// RESTORE finds no copy of the patch (the new mapping's copy is of
/// another fork family), forgets it, and writes nothing there.
///
/// A fork family is the address of its root anon_vma; the patch holds a
/// reference on it, so the new mapping's anon_vma cannot be that slab
/// object.  The target and the test (whose /proc/PID/mem write makes the
/// new anon_vma) run on one CPU, so that without the reference the freed
/// object is the next one that CPU's slab hands out.  A second patch of
/// the same family, restored first, must not let go of the reference the
/// first one still needs.
pub(crate) fn restore_never_writes_into_a_mapping_made_since() -> TestResult {
    const PAGE: usize = 88;
    let mut t = Target::spawn(&[])?;
    crate::races::pin_to_cpu(t.pid, 0)?;
    crate::races::pin_to_cpu(0, 0)?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 8888)))?;
    let other = io(dev.patch(&patch_req(&t, PAGE + 1, 8989)))?;
    io(dev.restore(other))?;
    let said = t.command("remap-same")?;
    ensure!(said == "remapped-same", "remap-same said {said:?}");
    let at = t.page_addr(PAGE);
    let theirs = text::mov_eax_ret(8888);
    write_mem(t.pid, at, &theirs)?;
    io(dev.restore(h))?;
    ensure!(
        read_mem(t.pid, at, 6)? == theirs,
        "RESTORE wrote into a mapping made since the patch"
    );
    let q = dev.query(h);
    ensure!(
        q.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT),
        "the patch is not forgotten: {q:?}"
    );
    Ok(())
}

/// The PFN `pid` maps at `addr`.
fn pfn_of(pid: i32, addr: u64) -> Result<u64, String> {
    let e = io(io(Pagemap::open(pid))?.entry(addr))?;
    ensure!(e.present(), "{pid} maps nothing at {addr:#x}: {e:?}");
    Ok(e.pfn())
}

/// The target is gone, and so is the child it forked while the patch
/// lived; the grandchild that child forked (given to a reaper) still runs
/// the patch.  RESTORE takes it back there, found by its fork family and
/// its ancestry since the patch: the grandchild runs the originals on the
/// page-cache page, PMD-mapped again.
pub(crate) fn restore_reaches_an_orphan_after_the_target_exited() -> TestResult {
    const PAGE: usize = 78;
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let req = PatchRequest {
        install_pmd: true,
        ..patch_req(&t, PAGE, 7878)
    };
    let h = io(dev.patch(&req))?;
    let g = fork_orphan(&mut t)?;
    let at = t.page_addr(PAGE);
    let result = (|| {
        ensure!(
            read_mem(g, at, 6)? == text::mov_eax_ret(7878),
            "the grandchild does not run the patch"
        );
        kill_and_reap(&t);
        let forked = io(dev.query_forked(h))?;
        ensure!(forked == [g], "QUERY_FORKED says {forked:?}, want [{g}]");
        let (g_s, at_s) = (g.to_string(), format!("{at:#x}"));
        let (_, map, _) = crate::cli::hugepoke(&["map", "--pid", &g_s, "--addr", &at_s])?;
        ensure!(
            map.contains(&format!("forked from pid {}", t.pid)),
            "map of the orphan does not show the patch it runs: {map}"
        );
        io(dev.restore(h))?;
        ensure!(
            read_mem(g, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the orphaned grandchild still runs the patch after RESTORE"
        );
        let s = io(proc::smaps_entry(g, t.addr))?;
        ensure!(
            s.kb("Anonymous") == 0 && s.pmd_mapped_kb() == 2048,
            "the grandchild's text after RESTORE: {s:?}"
        );
        ensure!(
            pfn_of(g, at)? == head + PAGE as u64,
            "the grandchild does not map the page-cache page"
        );
        let evs = events_of(h)?;
        ensure!(
            restored_as_forked(&evs, g),
            "the grandchild's restore not journaled under its pid: {:?}",
            steps(&evs)
        );
        Ok(())
    })();
    // SAFETY: killing the test's target's grandchild.
    unsafe { libc::kill(g, libc::SIGKILL) };
    result
}

tests! {
    TESTS: [
        collapse_drops_a_mem_writers_copies_and_gives_the_pmd_back,
        collapse_keeps_a_copy_that_differs,
        collapse_keeps_a_pinned_copy,
        collapse_keeps_a_live_hugepoke_patch,
        collapse_after_gdb_set_and_removed_a_breakpoint,
        collapse_after_a_uprobe_came_and_went,
        collapse_refuses_bad_input_with_a_reason,
        collapse_file_reaches_every_process_that_maps_it,
        restore_takes_the_patch_back_from_a_forked_child,
        restore_keeps_a_forked_childs_other_change,
        restore_leaves_a_process_forked_before_the_patch_alone,
        restore_leaves_an_orphan_given_to_a_subreaper_target_alone,
        restore_leaves_an_orphan_alone_after_the_target_stopped_reaping,
        restore_reaches_a_forked_childs_diverged_copy,
        restore_reaches_an_orphan_after_the_target_exited,
        restore_takes_the_patch_back_from_forty_forked_children,
        restore_never_writes_into_a_mapping_made_since,
        restore_reaches_a_clone_parent_child,
        restore_reaches_a_clone_vm_peers_child,
        restore_leaves_the_targets_sibling_alone,
        restore_of_a_gone_target_reaches_its_clone_parent_child,
        restore_refuses_while_a_forked_child_keeps_the_patch_without_exec,
    ];
}

/// `hugepoke collapse --file`: two unrelated processes map the same text,
/// each with a copy a writer left; both get the PMD back, and the report
/// names both.
pub(crate) fn collapse_file_reaches_every_process_that_maps_it() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let path = format!("{thp_dir}/shared-collapse.bin");
    io(std::fs::write(&path, text::blob()))?;
    let mut a = Target::spawn(&["--file", &path])?;
    let mut b = Target::spawn(&["--file", &path])?;
    let head = thp_head(&a)?;
    ensure!(thp_head(&b)? == head, "not one page-cache THP");
    poke_and_unpoke(&a, 60, 0)?;
    poke_and_unpoke(&b, 61, 0)?;
    let (code, out, err) = hugepoke(&["collapse", "--file", &path])?;
    ensure!(
        code == 0,
        "hugepoke collapse --file exited {code}: {out}{err}"
    );
    for pid in [a.pid, b.pid] {
        ensure!(
            out.contains(&format!("pid {pid}:")),
            "pid {pid} not in the report: {out}"
        );
    }
    pmd_back(&mut a, head, &[60, 61])?;
    pmd_back(&mut b, head, &[60, 61])?;
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}
