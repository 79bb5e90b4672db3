//! Authority and coexistence: who may RESTORE, QUERY or drop a handle,
//! whose bytes PATCH may write over, and what RESTORE does when another
//! tool put the originals back or changed the page elsewhere.

use crate::common::*;
use crate::hardening::{expect_errno, last_failure};
use crate::TestResult;
use hugepoke::testkit::uprobe::Uprobe;
use hugepoke::uapi;

/// `key=N` of a helper's line.
fn field(line: &str, key: &str) -> Result<i64, String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .ok_or(format!("no {key}= in {line:?}"))
}

/// Run a helper to its end; its one line of output.
fn helper_line(args: &[&str]) -> Result<String, String> {
    let out = io(helper(args)?.output())?;
    ensure!(out.status.success(), "helper {args:?}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Root's persistent patch of a root process: a holder of a device fd
/// opened by root that dropped to nobody may not QUERY, drop or RESTORE it
/// (EPERM, journaled, the patch still live); the fd that made a patch may
/// restore it after dropping (closing it would) but sees no PFN and may
/// not drop it (RESTORE_DROP is CAP_SYS_ADMIN's); a QUERY
/// from another pid namespace reads pid 0.
pub(crate) fn restore_and_query_need_authority() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&PatchRequest {
        persist: true,
        ..patch_req(&t, 8, 88)
    }))?;
    let root = io(dev.query(h))?;
    ensure!(root.pfn != 0 && root.pid == t.pid, "root's QUERY: {root:?}");

    let line = helper_line(&["undo-as-nobody", &h.to_string()])?;
    let eperm = libc::EPERM as i64;
    for key in ["query", "drop", "restore"] {
        ensure!(
            field(&line, key)? == eperm,
            "nobody holding root's fd: {line}, want EPERM for {key}"
        );
    }
    let f = last_failure()?;
    ensure!(
        f.result == "-EPERM" && f.note.contains("may not ptrace-attach"),
        "journal {f:?}"
    );
    ensure!(t.call(8)? == 88, "root's patch undone by nobody");
    ensure!(
        io(dev.query(h))?.state == uapi::STATE_LIVE,
        "patch not live"
    );

    let line = helper_line(&["query-in-new-pidns", &h.to_string()])?;
    ensure!(
        field(&line, "query")? == 0 && field(&line, "pid")? == 0,
        "QUERY from a new pid namespace: {line}, want pid 0 (the target is not in it)"
    );
    io(dev.restore(h))?;

    let req = patch_req(&t, 9, 99);
    let hex: String = req.bytes.iter().map(|b| format!("{b:02x}")).collect();
    let line = helper_line(&[
        "own-undo-as-nobody",
        &t.pid.to_string(),
        &format!("{:#x}", req.addr),
        &hex,
    ])?;
    ensure!(
        field(&line, "drop")? == eperm,
        "the fd that patched, dropped to nobody: {line}, want EPERM for RESTORE_DROP (CAP_SYS_ADMIN only)"
    );
    ensure!(
        field(&line, "query")? == 0 && field(&line, "pfn")? == 0 && field(&line, "restore")? == 0,
        "the fd that patched, dropped to nobody: {line}, want QUERY without a PFN and RESTORE ok"
    );
    ensure!(
        t.call(9)? == text::original_value(9),
        "the owner's RESTORE did not restore"
    );
    Ok(())
}

/// A patch whose target is gone is no one else's either: a caller that is
/// not its owner, may not ptrace and has no CAP_SYS_ADMIN may not RESTORE
/// it (EPERM), which would write into the process the target forked while
/// the patch lived (or forget the patch it runs); the owner's RESTORE
/// then restores that process.
pub(crate) fn restore_of_a_gone_target_needs_authority_too() -> TestResult {
    const PAGE: usize = 11;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 1111)))?;
    let g = fork_orphan(&mut t)?;
    let at = t.page_addr(PAGE);
    let result = (|| {
        kill_and_reap(&t);
        let line = helper_line(&["undo-as-nobody", &h.to_string()])?;
        ensure!(
            field(&line, "restore")? == libc::EPERM as i64,
            "nobody's RESTORE of a gone target's patch: {line}, want EPERM"
        );
        ensure!(
            read_mem(g, at, 6)? == text::mov_eax_ret(1111),
            "nobody's RESTORE of a gone target's patch wrote into the process it forked"
        );
        io(dev.restore(h))?;
        ensure!(
            read_mem(g, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the owner's RESTORE did not restore the process the gone target forked"
        );
        Ok(())
    })();
    // SAFETY: killing the test's target's grandchild.
    unsafe { libc::kill(g, libc::SIGKILL) };
    result
}

/// A debugger's int3 where PATCH would write: refused (EBUSY, "changed by
/// another tool"), nothing written; with PATCH_OVER_CHANGED patched, the
/// int3 recorded as the original and put back by RESTORE.
pub(crate) fn patch_over_another_tools_bytes_needs_over_changed() -> TestResult {
    const PAGE: usize = 40;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let at = t.page_addr(PAGE);
    let file = file_bytes(&t, at, 6)?;
    let mut debugged = file.clone();
    debugged[0] = 0xcc;
    write_mem(t.pid, at, &debugged[..1])?;
    let anon = smaps(&t)?.kb("Anonymous");
    let req = patch_req(&t, PAGE, 4040);
    expect_errno(
        "PATCH over a breakpoint",
        dev.patch(&req),
        libc::EBUSY,
        "changed by another tool",
    )?;
    ensure!(
        read_mem(t.pid, at, 6)? == debugged && smaps(&t)?.kb("Anonymous") == anon,
        "the refused PATCH changed the target"
    );

    let h = io(dev.patch(&PatchRequest {
        over_changed: true,
        ..req
    }))?;
    let q = io(dev.query(h))?;
    ensure!(
        q.orig[..6] == debugged[..] && q.patch_flags & uapi::PATCH_OVER_CHANGED != 0,
        "QUERY {q:?}: want the breakpoint as orig and PATCH_OVER_CHANGED"
    );
    ensure!(t.call(PAGE)? == 4040, "patch not running");
    io(dev.restore(h))?;
    ensure!(
        read_mem(t.pid, at, 6)? == debugged,
        "RESTORE did not put back the breakpoint it recorded"
    );
    // The debugger takes its breakpoint away.
    write_mem(t.pid, at, &file[..1])?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "not the original code"
    );
    Ok(())
}

/// A uprobe registered through tracefs on the target's file (so in the
/// target too): PATCH over its int3 is refused; the uprobe still fires;
/// once it is removed PATCH and RESTORE work and the file's bytes are back.
pub(crate) fn patch_over_a_live_uprobe_is_refused() -> TestResult {
    const PAGE: usize = 41;
    // A file of its own: a probe left behind must not reach other tests.
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let path = format!("{thp_dir}/uprobed.bin");
    io(std::fs::write(&path, text::blob()))?;
    let mut t = Target::spawn(&["--file", &path])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let at = t.page_addr(PAGE);
    let file = file_bytes(&t, at, 6)?;
    let probe = Uprobe::add("hugepoke_tests/live", &t.file, at - t.addr)?;
    ensure!(
        read_mem(t.pid, at, 1)? == [0xcc],
        "the uprobe installed no int3 in the target"
    );
    expect_errno(
        "PATCH over a live uprobe",
        dev.patch(&patch_req(&t, PAGE, 4141)),
        libc::EBUSY,
        "changed by another tool",
    )?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the probed function"
    );
    ensure!(probe.hits()? >= 1, "the uprobe did not fire");
    drop(probe);
    ensure!(
        read_mem(t.pid, at, 6)? == file,
        "the uprobe's int3 is still there"
    );
    let h = io(dev.patch(&patch_req(&t, PAGE, 4141)))?;
    ensure!(t.call(PAGE)? == 4141, "patch not running");
    io(dev.restore(h))?;
    ensure!(
        read_mem(t.pid, at, 6)? == file,
        "RESTORE left other bytes than the file's"
    );
    drop(t);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Another tool put the original bytes back over the patch: RESTORE
/// succeeds, writes nothing ("already there"), zaps the copy (now equal to
/// the page cache) and the module's own collapse gives the PMD back.
pub(crate) fn restore_finding_the_originals_zaps_and_collapses() -> TestResult {
    const PAGE: usize = 42;
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let at = t.page_addr(PAGE);
    let h = io(dev.patch(&patch_req(&t, PAGE, 4242)))?;
    write_mem(t.pid, at, &file_bytes(&t, at, 6)?)?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the other tool's write"
    );
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(h))?;
    let evs = events_of(h)?;
    ensure!(
        evs.iter()
            .any(|e| e.step == "restore_bytes" && e.note.contains("already there")),
        "RESTORE did not say the originals were already there: {evs:?}"
    );
    ensure!(
        evs.iter().any(|e| e.step == "zap_anon_page"),
        "copy not zapped: {:?}",
        steps(&evs)
    );
    wait_module_collapse(t.pid, t.addr, seq)?;
    wait_pmd_mapped(&mut t, Duration::from_secs(10))?;
    ensure!(
        thp_head(&t)? == head && smaps(&t)?.kb("Anonymous") == 0,
        "after RESTORE: {:?}",
        smaps(&t)?
    );
    Ok(())
}

/// The target dropped the patch's copy (MADV_DONTNEED), a debugger's
/// write made a copy equal to the file, then the target forked: the copy
/// both now map runs nothing of ours.  RESTORE (a sequence hugepoke-model
/// found, which used to end in EAGAIN for want of a child to restore)
/// succeeds; the target's copy is zapped and its PMD comes back, the
/// child keeps the debugger's copy, untouched.
pub(crate) fn restore_beside_a_forked_copy_of_the_originals_succeeds() -> TestResult {
    const PAGE: usize = 46;
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let at = t.page_addr(PAGE);
    let h = io(dev.patch(&patch_req(&t, PAGE, 4646)))?;
    let drop = format!("dontneed {PAGE}");
    ensure!(t.command(&drop)? == drop, "the target's MADV_DONTNEED");
    let copy = copy_by_a_mem_write(&t, PAGE)?;
    let child = fork_child(&mut t)?;
    let checked = (|| {
        let seq = hugepoke::device::journal_seq();
        io(dev.restore(h))?;
        wait_module_collapse(t.pid, t.addr, seq)?;
        wait_pmd_mapped(&mut t, Duration::from_secs(10))?;
        ensure!(
            thp_head(&t)? == head && smaps(&t)?.kb("Anonymous") == 0,
            "the target after RESTORE: {:?}",
            smaps(&t)?
        );
        let code = read_mem(child, at, 6)?;
        let anon = io(proc::smaps_entry(child, t.addr))?.kb("Anonymous");
        ensure!(
            code == text::mov_eax_ret(text::original_value(PAGE)) && anon == 4,
            "the child after RESTORE: {code:02x?}, {anon} kB anonymous (want the file's code in the debugger's copy)"
        );
        // That copy, not another one made equal to it.
        let theirs = io(io(proc::Pagemap::open(child))?.entry(at))?;
        ensure!(
            theirs.present() && theirs.pfn() == copy.pfn(),
            "the child maps {theirs:?}, not the debugger's copy {copy:?}"
        );
        Ok(())
    })();
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    checked
}

/// A debugger's byte elsewhere on the patched page: RESTORE puts the
/// originals back but keeps the copy ("differs from the page-cache page"),
/// so the debugger's byte survives.
pub(crate) fn restore_keeps_another_change_on_the_page() -> TestResult {
    const PAGE: usize = 43;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 4343)))?;
    let other = t.page_addr(PAGE) + 200;
    let theirs = !file_bytes(&t, other, 1)?[0];
    write_mem(t.pid, other, &[theirs])?;
    // Another tool also put our site's originals back: RESTORE writes
    // nothing, and so leaves the page's soft-dirty bit alone (a dirty
    // tracker such as CRIU sees no change we did not make).
    let site = t.page_addr(PAGE);
    write_mem(t.pid, site, &file_bytes(&t, site, 6)?)?;
    io(std::fs::write(format!("/proc/{}/clear_refs", t.pid), "4"))?;
    io(dev.restore(h))?;
    ensure!(
        !text_pfns(&t)?[PAGE].soft_dirty(),
        "RESTORE, which wrote nothing, left the page soft-dirty"
    );
    ensure!(t.call(PAGE)? == text::original_value(PAGE), "not restored");
    ensure!(
        read_mem(t.pid, other, 1)? == [theirs],
        "the debugger's byte on the patched page is gone"
    );
    let evs = events_of(h)?;
    ensure!(
        evs.iter()
            .any(|e| e.step == "keep_anon_page" && e.note.contains("differs from the page-cache")),
        "copy not kept for the change: {:?}",
        steps(&evs)
    );
    ensure!(
        smaps(&t)?.kb("Anonymous") == 4,
        "not one anonymous page: {:?}",
        smaps(&t)?
    );
    Ok(())
}

/// RESTORE_DROP by root forgets a handle and writes nothing: the target
/// keeps running the patch, QUERY and RESTORE say ENOENT.
pub(crate) fn drop_forgets_a_handle_and_writes_nothing() -> TestResult {
    const PAGE: usize = 44;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 4444)))?;
    io(dev.restore_flags(h, uapi::RESTORE_DROP))?;
    ensure!(t.call(PAGE)? == 4444, "the dropped patch was undone");
    let evs = events_of(h)?;
    ensure!(
        evs.iter()
            .any(|e| e.step == "restored" && e.note.contains("RESTORE_DROP")),
        "drop not journaled: {:?}",
        steps(&evs)
    );
    ensure!(
        !evs.iter()
            .any(|e| e.step == "restore_bytes" || e.step == "zap_anon_page"),
        "the drop wrote: {:?}",
        steps(&evs)
    );
    expect_errno("QUERY", dev.query(h), libc::ENOENT, "no such patch")?;
    // Handles are never reused: the next one is newer.
    let next = io(dev.patch(&patch_req(&t, PAGE + 1, 4545)))?;
    ensure!(next > h, "handle {next} after {h}: reused");
    io(dev.restore(next))?;
    // What the drop left behind: the target's copy, which the original
    // bytes written by hand turn back into a clean one.
    write_mem(
        t.pid,
        t.page_addr(PAGE),
        &text::mov_eax_ret(text::original_value(PAGE)),
    )?;
    Ok(())
}

tests! {
    TESTS: [
        restore_and_query_need_authority,
        restore_of_a_gone_target_needs_authority_too,
        patch_over_another_tools_bytes_needs_over_changed,
        patch_over_a_live_uprobe_is_refused,
        restore_finding_the_originals_zaps_and_collapses,
        restore_beside_a_forked_copy_of_the_originals_succeeds,
        restore_keeps_another_change_on_the_page,
        drop_forgets_a_handle_and_writes_nothing,
    ];
}
