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
        .filter(|e| e.handle == Some(handle as u32))
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

/// Run a helper to its end; its exit code.
pub(crate) fn helper_exit_code(args: &[&str]) -> Result<i32, String> {
    let status = io(helper(args)?.status())?;
    status
        .code()
        .ok_or(format!("helper {args:?} killed: {status}"))
}
