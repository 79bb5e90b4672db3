//! The mechanism: PATCH, RESTORE, the collapse, the journal.

use crate::common::*;
use crate::TestResult;

pub(crate) fn patch_restore_collapse_one_page() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let kpf = io(KpageFlags::open())?;
    let dev = io(Device::open())?;
    const PAGE: usize = 5;

    // (b) PATCH: the target runs the new bytes from an anonymous page.
    let handle = io(dev.patch(&patch_req(&t, PAGE, 4242)))?;
    ensure!(
        t.call(PAGE)? == 4242,
        "patched function returned the old value"
    );
    ensure!(
        t.call(PAGE + 1)? == text::original_value(PAGE + 1),
        "neighbour changed"
    );
    let pfns = text_pfns(&t)?;
    let anon = pfns[PAGE];
    ensure!(
        anon.present() && !anon.file() && anon.exclusive(),
        "patched page pagemap {anon:?}"
    );
    let flags = io(kpf.get(anon.pfn()))?;
    ensure!(flags.anon() && !flags.thp(), "patched page flags {flags:?}");
    // The split left the other pages to refault (fault-around maps some):
    // every one mapped maps its own subpage of the same THP; page PAGE + 1,
    // just executed, is mapped.
    ensure!(
        pfns[PAGE + 1].present(),
        "page {} not mapped after executing it",
        PAGE + 1
    );
    for (i, e) in pfns
        .iter()
        .enumerate()
        .filter(|(i, e)| *i != PAGE && e.present())
    {
        ensure!(
            e.pfn() == head + i as u64,
            "page {i}: {e:?}, want pfn {:#x}",
            head + i as u64
        );
        let f = io(kpf.get(e.pfn()))?;
        ensure!(
            f.thp() && !f.anon(),
            "page {i} flags {f:?}: the THP was split"
        );
    }
    let s = smaps(&t)?;
    ensure!(
        s.pmd_mapped_kb() == 0 && s.kb("Anonymous") == 4,
        "after PATCH {s:?}"
    );
    {
        let mut other = Target::spawn(&["--file", &t.file])?;
        ensure!(
            other.call(PAGE)? == text::original_value(PAGE),
            "a second mapping of the file sees the patch"
        );
    }
    let q = io(dev.query(handle))?;
    ensure!(
        q.state == hugepoke::uapi::STATE_LIVE && q.pfn == anon.pfn() && q.pid == t.pid,
        "query {q:?}"
    );
    ensure!(
        q.orig[..6] == text::mov_eax_ret(text::original_value(PAGE)),
        "query orig {:?}",
        &q.orig[..6]
    );

    // (e, PATCH) each step, in order, with the PFNs seen above.
    let evs = events_of(handle)?;
    let want = ["check_vma:ok", "patched:ok"];
    ensure!(steps(&evs) == want, "handle events {:?}", steps(&evs));
    let all = events()?;
    let from = all
        .iter()
        .rposition(|e| e.step == "patch" && e.pid == t.pid && e.addr == Some(t.page_addr(PAGE)))
        .ok_or("no patch event")?;
    let seq: Vec<_> = all[from..]
        .iter()
        .filter(|e| e.pid == t.pid)
        .map(|e| e.step.as_str())
        .collect();
    ensure!(
        seq.starts_with(&[
            "patch",
            "resolve_target",
            "check_vma",
            "split_pmd",
            "cow_page",
            "write_bytes",
            "patched"
        ]),
        "PATCH steps {seq:?}"
    );
    let split = all[from..].iter().find(|e| e.step == "split_pmd").unwrap();
    ensure!(
        split.pfn == Some(head) && split.order == Some(9),
        "split_pmd {split:?}, THP head {head:#x}"
    );
    for step in ["cow_page", "write_bytes"] {
        let e = all[from..].iter().find(|e| e.step == step).unwrap();
        ensure!(
            e.pfn == Some(anon.pfn()) && e.order == Some(0),
            "{step} {e:?}, anon pfn {:#x}",
            anon.pfn()
        );
    }

    // (c) RESTORE: the page-cache subpage is back, no anonymous page left.
    io(dev.restore(handle))?;
    let restored_at = Instant::now();
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "restored function returned the patched value"
    );
    // The queued collapse may retract the page table between our fault and
    // our look (the page is then mapped again at the next fault): re-fault.
    let pm = io(Pagemap::open(t.pid))?;
    let mut e = io(pm.entry(t.page_addr(PAGE)))?;
    for _ in 0..10 {
        if e.present() {
            break;
        }
        t.call(PAGE)?;
        e = io(pm.entry(t.page_addr(PAGE)))?;
    }
    ensure!(
        e.present() && e.file() && e.pfn() == head + PAGE as u64,
        "restored page {e:?}"
    );
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "anonymous memory left: {:?}",
        smaps(&t)?
    );

    // (d) the queued collapse: our work's verdict first (so the PMD that
    // comes back is its doing, not khugepaged's), then the PMD at the next fault.
    let mut collapse = None;
    let waited = wait_for(
        "the queued collapse journaled",
        Duration::from_secs(30),
        || {
            collapse = events()?
                .into_iter()
                .rev()
                .find(|e| e.step == "collapse" && e.pid == t.pid);
            Ok(collapse.is_some())
        },
    )?;
    let collapse = collapse.unwrap();
    ensure!(
        collapse.result == "ok"
            && collapse.addr == Some(t.addr)
            && collapse.note.starts_with("SCAN_SUCCEED"),
        "collapse {collapse:?}"
    );
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# collapse journaled {waited:?}, PMD mapping back {took:?} later ({:?} after RESTORE returned, incl. checks)", restored_at.elapsed());
    ensure!(thp_head(&t)? == head, "a different THP came back");

    // (e, RESTORE) steps with PFNs.  At most one LRU drain of this CPU,
    // then of all (start, done), before the bytes are written, and none at
    // PATCH.
    let all_evs = events_of(handle)?;
    let drains = all_evs.iter().filter(|e| e.step == "lru_drain").count();
    ensure!(
        matches!(drains, 0 | 1 | 3),
        "LRU drains {:?}",
        steps(&all_evs)
    );
    let evs: Vec<_> = all_evs
        .into_iter()
        .filter(|e| e.step != "lru_drain")
        .collect();
    let got = steps(&evs);
    let want = [
        "restore:ok",
        "restore_bytes:ok",
        "zap_anon_page:ok",
        "zap_anon_page:ok",
        "queue_collapse:ok",
        "restored:ok",
    ];
    ensure!(
        got.iter().skip(2).map(String::as_str).collect::<Vec<_>>() == want,
        "RESTORE steps {got:?}"
    );
    // (check_vma and patched come first: the handle's PATCH.)
    ensure!(
        evs[3].pfn == Some(anon.pfn()),
        "restore_bytes pfn {:?}",
        evs[3].pfn
    );
    ensure!(evs[4].pfn == Some(anon.pfn()), "zap pfn {:?}", evs[4].pfn);
    ensure!(
        evs[5].pfn == Some(head + PAGE as u64) && evs[5].order == Some(9),
        "page-cache page {:?}",
        evs[5]
    );
    Ok(())
}

pub(crate) fn collapse_waits_for_the_last_patch() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    // Two patches on page 3 (the function, and int3 filler further on), one on page 7.
    let a = io(dev.patch(&patch_req(&t, 3, 33)))?;
    let b = io(dev.patch(&PatchRequest {
        pid: t.pid,
        addr: t.page_addr(3) + 100,
        bytes: vec![0x90, 0x90],
        ..Default::default()
    }))?;
    let c = io(dev.patch(&patch_req(&t, 7, 77)))?;
    let seq0 = hugepoke::device::journal_seq();
    ensure!(t.call(3)? == 33 && t.call(7)? == 77, "patches not running");
    ensure!(
        smaps(&t)?.kb("Anonymous") == 8,
        "want two anonymous pages: {:?}",
        smaps(&t)?
    );

    io(dev.restore(a))?;
    ensure!(t.call(3)? == 1003, "page 3 function not restored");
    let kept = events_of(a)?;
    ensure!(
        kept.iter()
            .any(|e| e.step == "keep_anon_page" && e.note.contains("other patches")),
        "page 3 zapped early: {:?}",
        steps(&kept)
    );
    io(dev.restore(b))?;
    let evs = events_of(b)?;
    ensure!(
        evs.iter().any(|e| e.step == "zap_anon_page"),
        "page 3 not zapped: {:?}",
        steps(&evs)
    );
    ensure!(
        evs.iter()
            .any(|e| e.step == "queue_collapse" && e.note.contains("other patches")),
        "collapse queued too early: {:?}",
        steps(&evs)
    );
    // No sleep to see that nothing collapses: a collapse only ever runs as
    // work that queue_collapse journals as queued (under the target's lock,
    // before the work can run); none may be queued while page 7 is patched.
    let pid = t.pid;
    let queued = |since: u64| -> Result<Vec<EventLine>, String> {
        Ok(events()?
            .into_iter()
            .filter(|e| {
                e.seq > since
                    && e.pid == pid
                    && e.step == "queue_collapse"
                    && e.note.contains("queued")
            })
            .collect())
    };
    ensure!(
        queued(seq0)?.is_empty(),
        "collapse queued while page 7 is patched: {:?}",
        queued(seq0)?
    );
    t.call(0)?;
    ensure!(
        smaps(&t)?.pmd_mapped_kb() == 0,
        "collapsed while page 7 is patched"
    );
    ensure!(t.call(7)? == 77, "page 7 patch lost");

    let seq1 = hugepoke::device::journal_seq();
    io(dev.restore(c))?;
    ensure!(
        queued(seq1)?.len() == 1 && queued(seq0)?.len() == 1,
        "want one collapse queued, by the last RESTORE: {:?}",
        queued(seq0)?
    );
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# PMD back {took:?} after the last RESTORE");
    ensure!(thp_head(&t)? == head, "a different THP came back");
    ensure!(smaps(&t)?.kb("Anonymous") == 0, "anonymous memory left");
    Ok(())
}

pub(crate) fn install_pmd_maps_without_a_fault() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&PatchRequest {
        install_pmd: true,
        ..patch_req(&t, 9, 99)
    }))?;
    io(dev.restore(h))?;
    // No call into the target: once our work says it installed the PMD,
    // smaps must show it, with no fault in between (khugepaged could also
    // install one, given time: then our work would not say "installed").
    let mut collapse = None;
    let took = wait_for(
        "the queued collapse journaled",
        Duration::from_secs(30),
        || {
            collapse = events()?
                .into_iter()
                .rev()
                .find(|e| e.step == "collapse" && e.pid == t.pid);
            Ok(collapse.is_some())
        },
    )?;
    let c = collapse.unwrap();
    ensure!(c.note == "SCAN_SUCCEED: PMD installed", "collapse {c:?}");
    ensure!(
        smaps(&t)?.pmd_mapped_kb() == 2048,
        "collapse says PMD installed, smaps says {:?}",
        smaps(&t)?
    );
    println!("# PMD installed {took:?} after RESTORE, without a fault");
    // And what it maps is the file's THP: the target runs its original code.
    ensure!(thp_head(&t)? == head, "the PMD maps another folio");
    ensure!(
        t.call(9)? == text::original_value(9),
        "the target does not run the original code through the new PMD"
    );
    Ok(())
}

pub(crate) fn expect_mismatch_changes_nothing() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let mut req = patch_req(&t, 2, 2);
    req.expect = Some(vec![0xde, 0xad, 0xbe, 0xef, 0, 0]);
    let err = dev.patch(&req).err().ok_or("mismatching PATCH succeeded")?;
    ensure!(err.raw_os_error() == Some(libc::EILSEQ), "errno {err}");
    ensure!(thp_head(&t)? == head, "PMD mapping changed");
    ensure!(t.call(2)? == 1002, "text changed");
    let last = events()?
        .into_iter()
        .rev()
        .find(|e| e.pid == t.pid)
        .unwrap();
    ensure!(
        last.step == "check_expected" && last.result == "-EILSEQ",
        "journal {last:?}"
    );
    // With the right expectation it goes through.
    req.expect = Some(text::mov_eax_ret(1002).to_vec());
    io(dev.patch(&req))?;
    ensure!(t.call(2)? == 2, "expected-bytes PATCH did not apply");
    Ok(())
}

pub(crate) fn overlapping_patch_is_refused() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let dev = io(Device::open())?;
    io(dev.patch(&patch_req(&t, 4, 44)))?;
    let mut req = patch_req(&t, 4, 45);
    req.addr += 3;
    let err = dev.patch(&req).err().ok_or("overlapping PATCH succeeded")?;
    ensure!(err.raw_os_error() == Some(libc::EBUSY), "errno {err}");
    ensure!(t.call(4)? == 44, "first patch disturbed");
    Ok(())
}

pub(crate) fn closing_the_file_restores_and_persist_survives() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let persistent;
    {
        let dev = io(Device::open())?;
        io(dev.patch(&patch_req(&t, 10, 10)))?;
        persistent = io(dev.patch(&PatchRequest {
            persist: true,
            ..patch_req(&t, 11, 11)
        }))?;
        ensure!(
            t.call(10)? == 10 && t.call(11)? == 11,
            "patches not running"
        );
    }
    ensure!(
        t.call(10)? == 1010,
        "closing the file did not restore its patch"
    );
    ensure!(
        t.call(11)? == 11,
        "persistent patch did not survive the close"
    );
    let dev = io(Device::open())?;
    ensure!(
        io(dev.query(persistent))?.state == hugepoke::uapi::STATE_LIVE,
        "persistent patch not live"
    );
    io(dev.restore(persistent))?;
    ensure!(t.call(11)? == 1011, "persistent patch not restored");
    let took = wait_pmd_mapped(&mut t, Duration::from_secs(30))?;
    println!("# PMD back {took:?} after the last RESTORE");
    ensure!(thp_head(&t)? == head, "different THP");
    let err = dev
        .restore(persistent)
        .err()
        .ok_or("second RESTORE succeeded")?;
    ensure!(err.raw_os_error() == Some(libc::ENOENT), "errno {err}");
    Ok(())
}

pub(crate) fn cli_patch_holds_until_stdin_closes() -> TestResult {
    use std::process::Command;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let addr = format!("{:#x}", t.page_addr(12));
    let (mut cli, handle) = cli_patch(&t, 12, 12)?;
    ensure!(t.call(12)? == 12, "CLI patch not running");
    let out = Command::new("hugepoke")
        .args(["query", &handle.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    let q = String::from_utf8_lossy(&out.stdout);
    ensure!(
        q.contains("state=live") && q.contains("bytes=b80c000000c3"),
        "query: {q}"
    );
    drop(cli.stdin.take());
    cli.wait().map_err(|e| e.to_string())?;
    ensure!(t.call(12)? == 1012, "patch outlived the CLI");

    // Failure: errno name and the module's reason, exit 1 (--force: past
    // the CLI's own check that --expect is what is there).
    let out = Command::new("hugepoke")
        .args([
            "patch",
            "--pid",
            &t.pid.to_string(),
            "--addr",
            &addr,
            "--bytes",
            "90",
            "--expect",
            "ff",
            "--force",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && err.contains("EILSEQ") && err.contains("not the expected"),
        "CLI said {err:?}"
    );
    Ok(())
}

// This module's in-guest tests, in groups that main.rs's SUITE puts in run order.
tests! {
    ONE_PAGE: [
        patch_restore_collapse_one_page,
    ];
    COLLAPSE: [
        collapse_waits_for_the_last_patch,
        install_pmd_maps_without_a_fault,
    ];
    EXPECT: [
        expect_mismatch_changes_nothing,
    ];
    OVERLAP_AND_CLOSE: [
        overlapping_patch_is_refused,
        closing_the_file_restores_and_persist_survives,
    ];
    CLI_HOLD: [
        cli_patch_holds_until_stdin_closes,
    ];
}
