//! What the tests share: observing the target and the journal.

pub(crate) use hugepoke::device::{Device, PatchRequest};
pub(crate) use hugepoke::proc::{self, KpageFlags, Pagemap};
pub(crate) use hugepoke::proc::{EventLine, SmapsEntry};
pub(crate) use hugepoke::testkit::target::Target;
pub(crate) use hugepoke::testkit::text;
pub(crate) use std::time::{Duration, Instant};

pub(crate) fn io<T>(r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

pub(crate) fn smaps(t: &Target) -> Result<SmapsEntry, String> {
    io(proc::smaps_entry(t.pid, t.addr))
}

pub(crate) fn events() -> Result<Vec<EventLine>, String> {
    Ok(proc::parse_events(&io(proc::debugfs("events"))?))
}

pub(crate) fn events_of(handle: u64) -> Result<Vec<EventLine>, String> {
    Ok(events()?
        .into_iter()
        .filter(|e| e.handle == Some(handle))
        .collect())
}

/// PFNs of all 512 pages of the target's text, from pagemap.
pub(crate) fn text_pfns(t: &Target) -> Result<Vec<hugepoke::proc::PagemapEntry>, String> {
    let pm = io(Pagemap::open(t.pid))?;
    (0..text::PAGES)
        .map(|p| io(pm.entry(t.page_addr(p))))
        .collect()
}

/// The THP's head PFN, checking the text is PMD-mapped by it right now.
pub(crate) fn thp_head(t: &Target) -> Result<u64, String> {
    let s = smaps(t)?;
    ensure!(s.pmd_mapped_kb() == 2048, "text not PMD-mapped: {s:?}");
    let head = text_pfns(t)?[0];
    ensure!(head.present() && head.pfn() % 512 == 0, "head {head:?}");
    Ok(head.pfn())
}

pub(crate) fn patch_req(t: &Target, page: usize, value: u32) -> PatchRequest {
    PatchRequest {
        pid: t.pid,
        addr: t.page_addr(page),
        bytes: text::mov_eax_ret(value).to_vec(),
        ..Default::default()
    }
}

/// Poke the target until its text is PMD-mapped again; the elapsed time.
pub(crate) fn wait_pmd_mapped(t: &mut Target, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        t.call(0)?;
        if smaps(t)?.pmd_mapped_kb() == 2048 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("not PMD-mapped after {limit:?}: {:?}", smaps(t)?));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Steps of `evs` in order, as `step:result` strings.
/// Did RESTORE run its passes in `pid` as a process forked while the
/// patch lived (journaled under its pid)?
pub(crate) fn restored_as_forked(evs: &[EventLine], pid: i32) -> bool {
    evs.iter()
        .any(|e| e.step == "restore" && e.pid == pid && e.note.contains("forked"))
}

/// Did RESTORE break COW for a copy it found shared (journaled)?
pub(crate) fn cow_broken(evs: &[EventLine]) -> bool {
    evs.iter()
        .any(|e| e.step == "restore_bytes" && e.note.contains("shared"))
}

pub(crate) fn steps(evs: &[EventLine]) -> Vec<String> {
    evs.iter()
        .map(|e| format!("{}:{}", e.step, e.result))
        .collect()
}

/// Run `hugepoke patch` (without --persist) on text page `page` of `t`,
/// making it return `value`; the CLI holds the patch until its stdin closes.
/// Returns the CLI process and the handle it printed.
pub(crate) fn cli_patch(
    t: &Target,
    page: usize,
    value: u32,
) -> Result<(std::process::Child, u64), String> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let hex: String = text::mov_eax_ret(value)
        .iter()
        .map(|b| format!("{b:02x} "))
        .collect();
    let mut cli = Command::new("hugepoke")
        .args([
            "patch",
            "--pid",
            &t.pid.to_string(),
            "--addr",
            &format!("{:#x}", t.page_addr(page)),
            "--bytes",
            hex.trim(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(cli.stdout.take().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let handle = line
        .trim()
        .parse()
        .map_err(|_| format!("CLI printed {line:?}"))?;
    Ok((cli, handle))
}

pub(crate) fn read_mem(pid: i32, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let f = io(std::fs::File::open(format!("/proc/{pid}/mem")))?;
    let mut buf = vec![0; len];
    io(f.read_exact_at(&mut buf, addr))?;
    Ok(buf)
}

/// Write through `/proc/PID/mem`, as a debugger would (FOLL_FORCE).
pub(crate) fn write_mem(pid: i32, addr: u64, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = io(std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem")))?;
    io(f.write_all_at(bytes, addr))
}

/// Wait until `cond` holds, polling; how long it took, or an error after
/// `limit` that says what was awaited.
pub(crate) fn wait_for(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> Result<bool, String>,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("{what}: not after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `hugepoke-tests --helper ARGS`: a fresh, single-threaded process of
/// this program (see helper.rs), for what must not run in a child forked
/// from this multithreaded one.
pub(crate) fn helper(args: &[&str]) -> Result<std::process::Command, String> {
    let mut cmd = std::process::Command::new(io(std::env::current_exe())?);
    cmd.arg("--helper").args(args);
    Ok(cmd)
}

/// Have the target fork a child that only sleeps; the child's pid.
pub(crate) fn fork_child(t: &mut Target) -> Result<i32, String> {
    let said = t.command("fork")?;
    said.strip_prefix("child ")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("fork said {said:?}"))
}

/// Have `t` make a child with clone(CLONE_PARENT) (thp-target's
/// `clone-parent`): the child's pid; its parent is the test's process.
pub(crate) fn clone_parent_child(t: &mut Target) -> Result<i32, String> {
    let said = t.command("clone-parent")?;
    said.strip_prefix("child ")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("clone-parent said {said:?}"))
}

/// `t`'s answer `WORD PID` to `command`: the pid.
pub(crate) fn pid_said(t: &mut Target, command: &str, word: &str) -> Result<i32, String> {
    let said = t.command(command)?;
    said.strip_prefix(word)
        .and_then(|p| p.trim().parse().ok())
        .filter(|&p: &i32| p > 0)
        .ok_or(format!("{command} said {said:?}"))
}

/// Have `child` (one of thp-target's forked children) flip its text's exec
/// permission (SIGUSR2), and wait until its maps say `perms` there.
pub(crate) fn flip_exec(child: i32, addr: u64, perms: &str) -> crate::TestResult {
    // SAFETY: signalling a child of the test's target; it flips its text's
    // protection on SIGUSR2.
    unsafe { libc::kill(child, libc::SIGUSR2) };
    wait_for(
        &format!("{child}'s text {perms}"),
        Duration::from_secs(10),
        || Ok(io(proc::smaps_entry(child, addr))?.perms == perms),
    )
    .map(drop)
}

/// Have `t` fork a child that forks a grandchild and exits (thp-target's
/// `fork-orphan`): the grandchild's pid.
pub(crate) fn fork_orphan(t: &mut Target) -> Result<i32, String> {
    let said = t.command("fork-orphan")?;
    said.strip_prefix("grandchild ")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("fork-orphan said {said:?}"))
}

/// Kill the target `t` and reap it (its children go to a reaper).
pub(crate) fn kill_and_reap(t: &Target) {
    // SAFETY: killing and reaping the test's own child.
    unsafe {
        libc::kill(t.pid, libc::SIGKILL);
        libc::waitpid(t.pid, std::ptr::null_mut(), 0);
    }
}

/// Run a helper to its end; its exit code.
pub(crate) fn helper_exit_code(args: &[&str]) -> Result<i32, String> {
    let status = io(helper(args)?.status())?;
    status
        .code()
        .ok_or(format!("helper {args:?} killed: {status}"))
}

/// khugepaged put to sleep for an hour, and woken as before on drop.  The
/// target's text is MADV_HUGEPAGE: once RESTORE has made the range all
/// page cache, khugepaged collapses it as readily as the module's work
/// (seen: "after RESTORE: PMD-mapped THP", the module's work still parked).
/// Writing the sleep wakes it for one pass at once, then it sleeps (other
/// wake-ups do not end the sleep early): make it before the target exists.
pub(crate) fn khugepaged_asleep() -> Result<hugepoke::testkit::khugepaged::Asleep, String> {
    io(hugepoke::testkit::khugepaged::Asleep::new(3_600_000))
}

/// The module's own collapse of the 2 MiB range at `range` in `pid`,
/// journaled as a success (with khugepaged asleep, the only one).
pub(crate) fn wait_module_collapse(pid: i32, range: u64, since: u64) -> Result<EventLine, String> {
    let mut found = None;
    wait_for(
        "the module's collapse journaled",
        Duration::from_secs(30),
        || {
            found = events()?
                .into_iter()
                .find(|e| e.seq > since && e.step == "collapse" && e.pid == pid);
            Ok(found.is_some())
        },
    )?;
    let c = found.unwrap();
    ensure!(
        c.result == "ok" && c.addr == Some(range) && c.note.starts_with("SCAN_SUCCEED"),
        "collapse {c:?}, want SCAN_SUCCEED at {range:#x}"
    );
    Ok(c)
}

/// `len` bytes of the target's text file behind address `at` of its text
/// (what the page cache holds, and what uprobes would restore).
pub(crate) fn file_bytes(t: &Target, at: u64, len: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    io(io(std::fs::File::open(&t.file))?.read_exact_at(&mut buf, at - t.addr))?;
    Ok(buf)
}

/// The kernel log's lines that contain `needle`.
pub(crate) fn dmesg_with(needle: &str) -> Result<Vec<String>, String> {
    let out = std::process::Command::new("dmesg")
        .output()
        .map_err(|e| format!("dmesg: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect())
}

/// After an unload: one more "state freed" line than `before`, and it says
/// nothing of the module's outlived it.
pub(crate) fn freed_nothing_alive(before: usize) -> Result<(), String> {
    let freed = dmesg_with("hugepoke: state freed")?;
    ensure!(
        freed.len() == before + 1,
        "no \"state freed\" line at unload: hugepoke's state leaked ({before} such lines before, {} after)",
        freed.len()
    );
    let last = freed.last().map(String::as_str).unwrap_or_default();
    ensure!(
        last.ends_with("still alive: 0 targets, 0 work items"),
        "at unload: {last}"
    );
    Ok(())
}

/// Another tool's copy of text page `page`: a `/proc/PID/mem` write of the
/// file's own byte 100 there; the copy's pagemap entry (checked anonymous).
pub(crate) fn copy_by_a_mem_write(
    t: &Target,
    page: usize,
) -> Result<hugepoke::proc::PagemapEntry, String> {
    let at = t.page_addr(page) + 100;
    write_mem(t.pid, at, &file_bytes(t, at, 1)?)?;
    let e = text_pfns(t)?[page];
    ensure!(e.present() && !e.file(), "the write made no copy: {e:?}");
    Ok(e)
}

/// Page `page` is still the copy `before` was (same PFN, anonymous) and
/// runs the file's code: what an undo must leave of another tool's copy.
pub(crate) fn still_that_copy(
    t: &mut Target,
    page: usize,
    before: hugepoke::proc::PagemapEntry,
) -> crate::TestResult {
    let after = text_pfns(t)?[page];
    ensure!(
        after.present() && !after.file() && after.pfn() == before.pfn(),
        "page {page}: {before:?} before the batch, {after:?} after its undo"
    );
    ensure!(
        t.call(page)? == text::original_value(page),
        "page {page} does not run the file's code"
    );
    Ok(())
}
