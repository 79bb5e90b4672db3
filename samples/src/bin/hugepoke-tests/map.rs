//! `hugepoke map` against the real page table: the picture of one full
//! cycle, read by the real binary (`map --json`) at each step and checked
//! against pagemap and the module's own answers.

use crate::common::*;
use crate::races::Pause;
use crate::TestResult;
use serde_json::Value;

/// `hugepoke map --pid P --addr A --json`, parsed.
fn map_json(t: &Target, addr: u64) -> Result<Value, String> {
    let out = io(std::process::Command::new("hugepoke")
        .args([
            "map",
            "--pid",
            &t.pid.to_string(),
            "--addr",
            &format!("{addr:#x}"),
            "--json",
        ])
        .output())?;
    ensure!(
        out.status.success(),
        "hugepoke map: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).map_err(|e| format!("map --json printed no JSON: {e}"))
}

/// Run every page's function, so that each page is mapped again (a split
/// PMD leaves them to refault; fault-around maps only a few at a time).
fn touch_all(t: &mut Target) -> TestResult {
    for page in 0..text::PAGES {
        t.call(page)?;
    }
    Ok(())
}

/// The kinds of the 512 cells, and the count of each as `counts` has it.
fn kinds(m: &Value) -> Result<Vec<String>, String> {
    let cells = m["cells"].as_array().ok_or("no cells")?;
    ensure!(cells.len() == 512, "{} cells", cells.len());
    let kinds: Vec<String> = cells
        .iter()
        .map(|c| c["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    for k in ["pmd", "page_cache", "anon", "swapped", "none"] {
        let n = kinds.iter().filter(|x| *x == k).count() as u64;
        ensure!(
            m["counts"][k] == n,
            "counts.{k} = {}, {n} cells",
            m["counts"][k]
        );
    }
    Ok(kinds)
}

/// Every cell but `except` is `kind`, PFN head + page (the THP's own
/// subpage), a THP page, with no patch on it.
fn thp_cells(m: &Value, head: u64, kind: &str, except: Option<usize>) -> TestResult {
    for (i, c) in m["cells"]
        .as_array()
        .ok_or("no cells")?
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != except)
    {
        ensure!(
            c["kind"] == kind
                && c["pfn"] == head + i as u64
                && c["thp"] == true
                && c["patches"] == serde_json::json!([]),
            "cell {i}: {c}, want {kind} at pfn {:#x}",
            head + i as u64
        );
    }
    Ok(())
}

pub(crate) fn map_shows_patch_restore_and_collapse() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    const PAGE: usize = 7;
    let site = t.page_addr(PAGE) + 3;

    // Before PATCH: one PMD maps the THP.
    let m = map_json(&t, site)?;
    ensure!(
        m["start"] == t.addr && m["end"] == t.addr + 2 * 1024 * 1024,
        "range {} {}",
        m["start"],
        m["end"]
    );
    ensure!(
        m["summary"] == "PMD-mapped THP",
        "before PATCH: {}",
        m["summary"]
    );
    kinds(&m)?;
    thp_cells(&m, head, "pmd", None)?;

    // After PATCH (every page run since): 511 page-cache subpages by PTEs,
    // the patched page an anonymous copy under the patch's handle, at the
    // PFN pagemap and the module's QUERY both say.
    let dev = io(Device::open())?;
    let handle = io(dev.patch(&patch_req(&t, PAGE, 4242)))?;
    touch_all(&mut t)?;
    let m = map_json(&t, site)?;
    let want = format!("511 page-cache PTEs, 1 anonymous (handle {handle})");
    ensure!(
        m["summary"] == want.as_str(),
        "after PATCH: {}, want {want}",
        m["summary"]
    );
    kinds(&m)?;
    thp_cells(&m, head, "page_cache", Some(PAGE))?;
    let anon = io(io(Pagemap::open(t.pid))?.entry(t.page_addr(PAGE)))?;
    let q = io(dev.query(handle))?;
    let cell = &m["cells"][PAGE];
    ensure!(
        cell["kind"] == "anon"
            && cell["pfn"] == anon.pfn()
            && anon.pfn() == q.pfn
            && cell["patches"] == serde_json::json!([handle]),
        "patched cell {cell}; pagemap {anon:?}, QUERY pfn {:#x}",
        q.pfn
    );
    ensure!(
        m["patches"]
            == serde_json::json!([{"handle": handle, "addr": t.page_addr(PAGE), "len": 6, "page": PAGE, "pfn": q.pfn, "forked_from": null}]),
        "patches {}",
        m["patches"]
    );

    // After RESTORE, with the collapse it queued parked: the page-cache
    // page is back, no anonymous page, no patch.
    let pause = Pause::arm("collapse", t.pid)?;
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(handle))?;
    touch_all(&mut t)?;
    let m = map_json(&t, site)?;
    ensure!(
        m["summary"] == "512 page-cache PTEs",
        "after RESTORE: {} (pause: {:?})",
        m["summary"],
        io(proc::debugfs("pause"))?.trim()
    );
    kinds(&m)?;
    thp_cells(&m, head, "page_cache", None)?;
    ensure!(
        m["patches"] == serde_json::json!([]),
        "patches after RESTORE {}",
        m["patches"]
    );

    // After the collapse: one PMD again, over the same THP.
    pause.wait_parked("collapse")?;
    pause.release()?;
    let mut collapse = None;
    wait_for(
        "the queued collapse journaled",
        Duration::from_secs(30),
        || {
            collapse = events()?
                .into_iter()
                .find(|e| e.seq > seq && e.step == "collapse" && e.pid == t.pid);
            Ok(collapse.is_some())
        },
    )?;
    // The collapse retracted the page table: the next fault maps the PMD.
    // Once, and looked at at once: khugepaged would collapse the range
    // too, given time, and must not be taken for the module's collapse.
    t.call(0)?;
    let m = map_json(&t, site)?;
    ensure!(
        m["summary"] == "PMD-mapped THP",
        "after the collapse ({:?}) and one fault: {}",
        collapse.unwrap(),
        m["summary"]
    );
    thp_cells(&m, head, "pmd", None)?;
    let collapse = collapse.unwrap();
    ensure!(
        collapse.result == "ok" && collapse.note.starts_with("SCAN_SUCCEED"),
        "collapse {collapse:?}"
    );
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        map_shows_patch_restore_and_collapse,
    ];
}
