//! The real CLI with `--json` against the real kernel: what it prints is
//! checked against pagemap, debugfs and the target's own calls.

use crate::common::*;
use crate::TestResult;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

/// `hugepoke ARGS`: (status, stdout, stderr).
pub(crate) fn hugepoke(args: &[&str]) -> Result<(i32, String, String), String> {
    let out = Command::new("hugepoke")
        .args(args)
        .output()
        .map_err(|e| format!("hugepoke: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// `hugepoke --json ARGS` that must succeed: its one JSON value.
fn hugepoke_json(args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = hugepoke(&all)?;
    ensure!(code == 0, "hugepoke {all:?} exited {code}: {err}");
    ensure!(
        out.lines().count() == 1,
        "hugepoke {all:?}: not one line: {out}"
    );
    serde_json::from_str(&out).map_err(|e| format!("hugepoke {all:?}: not JSON ({e}): {out}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The lines a child prints, on a channel (so a test can wait with a limit).
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_json(rx: &mpsc::Receiver<String>, what: &str) -> Result<Value, String> {
    let l = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| format!("{what}: no line within 60 s"))?;
    serde_json::from_str(&l).map_err(|e| format!("{what}: not JSON ({e}): {l}"))
}

fn anon_pfn(t: &Target, addr: u64) -> Result<u64, String> {
    let e = io(io(Pagemap::open(t.pid))?.entry(addr))?;
    ensure!(
        e.present() && !e.file(),
        "page at {addr:#x} not an anonymous page: {e:?}"
    );
    Ok(e.pfn())
}

/// patch, query, list, events, stats and events --follow with --json on
/// one patch: every value what the kernel says (pagemap's PFN, the bytes
/// the target runs, debugfs), and the restore streamed as it happens.
pub(crate) fn cli_json_output_matches_the_kernel() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    const PAGE: usize = 21;
    let addr = t.page_addr(PAGE);
    let bytes = text::mov_eax_ret(77);
    let orig = text::mov_eax_ret(1000 + PAGE as u32);
    let (pid, addr_s) = (t.pid.to_string(), format!("{addr:#x}"));
    let mut cli = Command::new("hugepoke")
        .args([
            "--json",
            "patch",
            "--pid",
            &pid,
            "--addr",
            &addr_s,
            "--bytes",
            &hex(&bytes),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let patch = next_json(&lines_of(&mut cli), "patch --json")?;
    let handle = patch["handle"]
        .as_u64()
        .ok_or(format!("no handle: {patch}"))?;
    ensure!(t.call(PAGE)? == 77, "patch not running");
    let site = &patch["sites"][0];
    ensure!(
        site["addr"] == addr && site["bytes"] == hex(&bytes) && site["len"] == 6,
        "patch sites: {patch}"
    );
    // What the check read and PATCH was told to expect: the original code.
    ensure!(
        site["expect"] == hex(&orig) && site["check"]["checked"] == true,
        "patch check: {patch}"
    );
    ensure!(
        patch["pid"] == t.pid && patch["persist"] == false && patch["dry_run"] == false,
        "{patch}"
    );
    let pfn = anon_pfn(&t, addr)?;

    let q = hugepoke_json(&["query", &handle.to_string()])?;
    ensure!(
        q["handle"] == handle && q["state"] == "live" && q["pid"] == t.pid && q["count"] == 1,
        "query: {q}"
    );
    let qs = &q["sites"][0];
    ensure!(
        qs["addr"] == addr && qs["len"] == 6 && qs["pfn"] == pfn,
        "query site vs pagemap PFN {pfn:#x}: {q}"
    );
    ensure!(
        qs["bytes"] == hex(&bytes) && qs["orig"] == hex(&orig) && qs["site"] == 0,
        "query bytes: {q}"
    );
    ensure!(
        qs["flags"] == hugepoke::uapi::PATCH_EXPECT,
        "query flags (the CLI passes the checked bytes): {q}"
    );

    let l = hugepoke_json(&["list"])?;
    let mine: Vec<&Value> = l["patches"]
        .as_array()
        .ok_or("list: no patches")?
        .iter()
        .filter(|p| p["handle"] == handle)
        .collect();
    ensure!(mine.len() == 1, "list: {l}");
    let p = mine[0];
    ensure!(
        p["pid"] == t.pid && p["addr"] == addr && p["pfn"] == pfn && p["state"] == "live",
        "list vs pagemap PFN {pfn:#x}: {p}"
    );
    ensure!(
        p["owner"].as_str().is_some_and(|o| o.starts_with("file:"))
            && p["site"] == 0
            && p["sites"] == 1,
        "list: {p}"
    );
    ensure!(
        p["bytes"] == hex(&bytes) && p["orig"] == hex(&orig) && p["pmd_mappable"] == true,
        "list: {p}"
    );

    let e = hugepoke_json(&["events"])?;
    let evs = e["events"].as_array().ok_or("events: no events")?;
    let patched = evs
        .iter()
        .find(|v| v["handle"] == handle && v["step"] == "patched")
        .ok_or(format!("events: no patched for {handle}"))?;
    ensure!(
        patched["pid"] == t.pid
            && patched["addr"] == addr
            && patched["pfn"] == pfn
            && patched["result"] == "ok",
        "{patched}"
    );
    let journal = events()?;
    ensure!(
        evs.len() <= journal.len() && e["dropped"].as_u64().is_some(),
        "events: {} vs {} in debugfs",
        evs.len(),
        journal.len()
    );

    let s = hugepoke_json(&["stats"])?;
    let step = |name: &str| {
        s["steps"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["step"] == name).cloned())
    };
    let (ok, failed) = io(proc::debugfs("stats"))
        .map(|t| proc::parse_stat(&t, "patched"))?
        .ok_or("no patched in stats")?;
    let p = step("patched").ok_or(format!("stats: no patched: {s}"))?;
    ensure!(
        p["ok"] == ok && p["failed"] == failed && ok >= 1,
        "stats --json {p} vs debugfs ({ok}, {failed})"
    );

    // Follow: the restore that closing the CLI's stdin makes, as it happens.
    let mut follow = Command::new("hugepoke")
        .args(["events", "--follow", "--json", "--interval-ms", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let lines = lines_of(&mut follow);
    let newest = journal.last().map_or(0, |e| e.seq);
    // First the journal as it is, up to its newest entry.
    loop {
        let v = next_json(&lines, "follow (backlog)")?;
        if v["seq"].as_u64().is_some_and(|s| s >= newest) {
            break;
        }
    }
    drop(cli.stdin.take());
    io(cli.wait())?;
    let mut steps = Vec::new();
    while !steps.iter().any(|s: &String| s == "restored") {
        let v = next_json(&lines, "follow (restore)")?;
        ensure!(
            v["seq"].as_u64().is_some_and(|s| s > newest),
            "follow repeated or lost an entry: {v}"
        );
        if v["handle"] == handle {
            steps.push(v["step"].as_str().unwrap_or("?").to_string());
        }
    }
    ensure!(
        steps.first().map(String::as_str) == Some("restore")
            && steps.contains(&"restore_bytes".to_string()),
        "followed {steps:?}"
    );
    ensure!(t.call(PAGE)? == 1000 + PAGE as u32, "not restored");
    // SAFETY: signals our own child.
    unsafe { libc::kill(follow.id() as i32, libc::SIGINT) };
    let status = io(follow.wait())?;
    ensure!(status.code() == Some(0), "follow after SIGINT: {status}");
    Ok(())
}

/// `patch --sites FILE`: one PATCH_BATCH for every line, all or none; a
/// refused site named by its index and its line; `--sites -` holds the
/// batch until a signal.
pub(crate) fn cli_patch_sites_is_one_batch() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let pages = [3usize, 5, 7];
    let mut text = String::from("# three functions\n");
    for p in pages {
        text.push_str(&format!(
            "\n{:#x} {}  # page {p}\n",
            t.page_addr(p),
            hex(&text::mov_eax_ret(p as u32 * 111))
        ));
    }
    let file = format!("/tmp/hugepoke-sites-{}", t.pid);
    io(std::fs::write(&file, &text))?;
    let pid = t.pid.to_string();
    // A dry run says one line for the batch; --verbose, every site's check.
    let dry = ["patch", "--pid", &pid, "--sites", &file, "--dry-run"];
    let (code, out, err) = hugepoke(&dry)?;
    ensure!(
        code == 0
            && out.starts_with("3 sites checked: 0 with a warning, 0 patched over a refusal")
            && out.lines().count() == 2,
        "dry run of 3 sites exited {code}: {out}{err}"
    );
    let (code, out, err) = hugepoke(&[&dry[..], &["--verbose"]].concat())?;
    let listed = out.matches("mov eax,").count();
    ensure!(
        code == 0 && listed >= 3 && !out.contains("sites checked"),
        "verbose dry run of 3 sites exited {code}, {listed} instructions listed: {out}{err}"
    );
    let out = hugepoke_json(&["patch", "--pid", &pid, "--sites", &file, "--persist"])?;
    let handle = out["handle"].as_u64().ok_or(format!("no handle: {out}"))?;
    let lines: Vec<u64> = out["sites"]
        .as_array()
        .ok_or("no sites")?
        .iter()
        .filter_map(|s| s["line"].as_u64())
        .collect();
    ensure!(lines == [3, 5, 7], "sites' lines {lines:?}: {out}");
    for p in pages {
        ensure!(t.call(p)? == p as u32 * 111, "page {p} not patched");
    }
    let q = hugepoke_json(&["query", &handle.to_string()])?;
    ensure!(q["count"] == 3, "query: {q}");
    for (i, p) in pages.iter().enumerate() {
        let s = &q["sites"][i];
        let pfn = anon_pfn(&t, t.page_addr(*p))?;
        ensure!(
            s["site"] == i && s["addr"] == t.page_addr(*p) && s["pfn"] == pfn,
            "query site {i} vs pagemap {pfn:#x}: {q}"
        );
    }
    let l = hugepoke_json(&["list"])?;
    let sites: Vec<u64> = l["patches"]
        .as_array()
        .ok_or("list")?
        .iter()
        .filter(|p| p["handle"] == handle && p["sites"] == 3)
        .filter_map(|p| p["site"].as_u64())
        .collect();
    ensure!(sites == [0, 1, 2], "list: {l}");

    // A batch whose second site overlaps the live one: nothing written,
    // and the message names site 1 and its line.
    let bad = format!(
        "{:#x} {}\n# overlaps page 5's patch\n{:#x} c3\n",
        t.page_addr(9),
        hex(&text::mov_eax_ret(999)),
        t.page_addr(5)
    );
    io(std::fs::write(&file, &bad))?;
    let (code, _, err) = hugepoke(&["patch", "--pid", &pid, "--sites", &file, "--persist"])?;
    ensure!(code == 1, "overlapping batch exited {code}: {err}");
    let want = format!(
        "hugepoke: patch: site 1 ({file} line 3, {:#x}): EBUSY: ",
        t.page_addr(5)
    );
    ensure!(
        err.contains(&want) && err.contains("overlaps a live patch"),
        "said {err:?}, want {want:?}"
    );
    ensure!(
        t.call(9)? == 1009 && t.call(5)? == 555,
        "a refused batch changed the text"
    );
    let (code, _, err) = hugepoke(&["restore", &handle.to_string()])?;
    ensure!(code == 0, "restore: {err}");
    for p in pages {
        ensure!(t.call(p)? == 1000 + p as u32, "page {p} not restored");
    }

    // From stdin, without --persist: held until a signal ends the CLI.
    let mut cli = Command::new("hugepoke")
        .args(["patch", "--pid", &pid, "--sites", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut stdin = cli.stdin.take().unwrap();
        io(stdin.write_all(text.as_bytes()))?;
    }
    let rx = lines_of(&mut cli);
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "--sites -: no handle")?;
    ensure!(
        line.trim().parse::<u64>().is_ok(),
        "--sites - printed {line:?}"
    );
    for p in pages {
        ensure!(
            t.call(p)? == p as u32 * 111,
            "--sites -: page {p} not patched"
        );
    }
    ensure!(
        io(cli.try_wait())?.is_none(),
        "--sites - exited while holding the batch"
    );
    // SAFETY: signals our own child.
    unsafe { libc::kill(cli.id() as i32, libc::SIGTERM) };
    io(cli.wait())?;
    wait_for(
        "the batch restored on close",
        Duration::from_secs(60),
        || Ok(t.call(pages[0])? == 1000 + pages[0] as u32),
    )?;
    for p in pages {
        ensure!(
            t.call(p)? == 1000 + p as u32,
            "--sites -: page {p} not restored after the CLI ended"
        );
    }
    let _ = std::fs::remove_file(&file);
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        cli_json_output_matches_the_kernel,
        cli_patch_sites_is_one_batch,
    ];
}
