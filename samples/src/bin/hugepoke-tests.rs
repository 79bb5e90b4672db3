//! The in-guest integration tests: run inside a virtme-ng guest with
//! hugepoke.ko loaded (scripts/guest), observe the real kernel, print TAP.
//!
//!   hugepoke-tests [FILTER]   runs the tests whose name contains FILTER

use hugepoke::proc::{self, KpageFlags, Pagemap};
use hugepoke::target::Target;
use hugepoke::text;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

type TestResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn module_is_loaded() -> TestResult {
    ensure!(std::path::Path::new("/sys/module/hugepoke").is_dir(), "/sys/module/hugepoke missing");
    let events = proc::parse_events(&proc::debugfs("events").map_err(|e| e.to_string())?);
    ensure!(events.iter().any(|e| e.step == "load" && e.result == "ok"), "no load event: {events:?}");
    Ok(())
}

fn device_is_root_only() -> TestResult {
    let m = std::fs::metadata("/dev/hugepoke").map_err(|e| format!("/dev/hugepoke: {e}"))?;
    ensure!(m.file_type().is_char_device(), "/dev/hugepoke is not a character device");
    ensure!(m.mode() & 0o777 == 0o600, "mode is {:o}, want 600", m.mode() & 0o777);
    ensure!(m.uid() == 0 && m.gid() == 0, "owned by {}:{}", m.uid(), m.gid());
    Ok(())
}

fn debugfs_files_exist() -> TestResult {
    for name in ["events", "stats"] {
        let text = proc::debugfs(name).map_err(|e| format!("{name}: {e}"))?;
        ensure!(text.starts_with('#'), "{name} has no header: {text:?}");
    }
    let stats = proc::debugfs("stats").map_err(|e| e.to_string())?;
    ensure!(proc::parse_stat(&stats, "load") == Some((1, 0)), "stats: {stats}");
    Ok(())
}

fn open_close_and_unknown_ioctl_are_journaled() -> TestResult {
    use std::os::fd::AsRawFd;
    let before = proc::debugfs("stats").map_err(|e| e.to_string())?;
    let (open0, _) = proc::parse_stat(&before, "open").ok_or("no open stat")?;
    let (_, ioctl_failed0) = proc::parse_stat(&before, "ioctl").ok_or("no ioctl stat")?;

    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/hugepoke").map_err(|e| e.to_string())?;
    let cmd: libc::c_ulong = 0xdead;
    // SAFETY: an ioctl with an unknown command and a null argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), cmd, 0usize) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    ensure!(rc == -1 && errno == libc::ENOTTY, "ioctl returned {rc}, errno {errno}");
    drop(f);

    let after = proc::debugfs("stats").map_err(|e| e.to_string())?;
    ensure!(proc::parse_stat(&after, "open").map(|s| s.0) == Some(open0 + 1), "open not counted");
    ensure!(proc::parse_stat(&after, "ioctl").map(|s| s.1) == Some(ioctl_failed0 + 1), "ioctl failure not counted");
    let events = proc::parse_events(&proc::debugfs("events").map_err(|e| e.to_string())?);
    let me = std::process::id() as i32;
    let mine: Vec<_> = events.iter().filter(|e| e.pid == me).map(|e| (e.step.as_str(), e.result.as_str())).collect();
    ensure!(
        mine.ends_with(&[("open", "ok"), ("ioctl", "-ENOTTY"), ("release", "ok")]),
        "events for pid {me}: {mine:?}"
    );
    let last_ioctl = events.iter().rev().find(|e| e.step == "ioctl").unwrap();
    ensure!(last_ioctl.note == "unknown ioctl command", "reason: {:?}", last_ioctl.note);
    Ok(())
}

fn unprivileged_user_cannot_open() -> TestResult {
    // A forked child drops to nobody and tries; it reports the errno.
    // SAFETY: fork in a single-threaded test process; the child only calls
    // async-signal-safe functions before _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(100);
            }
            let fd = libc::open(c"/dev/hugepoke".as_ptr(), libc::O_RDWR);
            let errno = *libc::__errno_location();
            libc::_exit(if fd >= 0 { 0 } else { errno });
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        let code = libc::WEXITSTATUS(status);
        ensure!(code == libc::EACCES, "unprivileged open gave exit {code} (want EACCES={})", libc::EACCES);
    }
    Ok(())
}

/// The target's text is PMD-mapped by one file THP, from the kernel's own
/// accounting: smaps, pagemap and kpageflags.
fn target_text_is_pmd_mapped_thp() -> TestResult {
    let mut t = Target::spawn(&[])?;
    for page in [0, 1, 255, 511] {
        let v = t.call(page)?;
        ensure!(v == text::original_value(page), "page {page} returned {v}");
    }
    let smaps = proc::smaps_entry(t.pid, t.addr).map_err(|e| e.to_string())?;
    ensure!(smaps.start == t.addr && smaps.end == t.addr + text::THP_SIZE as u64, "mapping {smaps:?}");
    ensure!(smaps.perms == "r-xp", "perms {}", smaps.perms);
    ensure!(smaps.pmd_mapped_kb() == 2048, "PmdMapped {} kB in {smaps:?}", smaps.pmd_mapped_kb());
    ensure!(smaps.kb("Anonymous") == 0, "Anonymous {} kB", smaps.kb("Anonymous"));
    println!("# pid {} text {:#x}: ShmemPmdMapped {} kB, FilePmdMapped {} kB", t.pid, t.addr,
        smaps.kb("ShmemPmdMapped"), smaps.kb("FilePmdMapped"));

    let pagemap = Pagemap::open(t.pid).map_err(|e| e.to_string())?;
    let kpf = KpageFlags::open().map_err(|e| e.to_string())?;
    let head = pagemap.entry(t.addr).map_err(|e| e.to_string())?;
    ensure!(head.present() && head.file(), "page 0 pagemap {head:?}");
    ensure!(head.pfn() % 512 == 0, "head pfn {:#x} not 2 MiB aligned", head.pfn());
    for page in 0..text::PAGES {
        let e = pagemap.entry(t.page_addr(page)).map_err(|e| e.to_string())?;
        ensure!(e.present() && e.pfn() == head.pfn() + page as u64, "page {page}: {e:?}");
        let flags = kpf.get(e.pfn()).map_err(|e| e.to_string())?;
        ensure!(flags.thp() && !flags.anon(), "page {page} flags {flags:?}");
        ensure!(if page == 0 { flags.compound_head() } else { flags.compound_tail() }, "page {page} flags {flags:?}");
    }
    Ok(())
}


// ---- The mechanism (issue 3) ----

use hugepoke::device::{Device, PatchRequest};
use hugepoke::proc::{EventLine, SmapsEntry};
use std::time::{Duration, Instant};

fn io<T>(r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

fn smaps(t: &Target) -> Result<SmapsEntry, String> {
    io(proc::smaps_entry(t.pid, t.addr))
}

fn events() -> Result<Vec<EventLine>, String> {
    Ok(proc::parse_events(&io(proc::debugfs("events"))?))
}

fn events_of(handle: u64) -> Result<Vec<EventLine>, String> {
    Ok(events()?.into_iter().filter(|e| e.handle == Some(handle as u32)).collect())
}

/// PFNs of all 512 pages of the target's text, from pagemap.
fn text_pfns(t: &Target) -> Result<Vec<hugepoke::proc::PagemapEntry>, String> {
    let pm = io(Pagemap::open(t.pid))?;
    (0..text::PAGES).map(|p| io(pm.entry(t.page_addr(p)))).collect()
}

/// The THP's head PFN, checking the text is PMD-mapped by it right now.
fn thp_head(t: &Target) -> Result<u64, String> {
    let s = smaps(t)?;
    ensure!(s.pmd_mapped_kb() == 2048, "text not PMD-mapped: {s:?}");
    let head = text_pfns(t)?[0];
    ensure!(head.present() && head.pfn() % 512 == 0, "head {head:?}");
    Ok(head.pfn())
}

fn patch_req(t: &Target, page: usize, value: u32) -> PatchRequest {
    PatchRequest { pid: t.pid, addr: t.page_addr(page), bytes: text::mov_eax_ret(value).to_vec(), ..Default::default() }
}

/// Poke the target until its text is PMD-mapped again; the elapsed time.
fn wait_pmd_mapped(t: &mut Target, limit: Duration) -> Result<Duration, String> {
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
fn steps(evs: &[EventLine]) -> Vec<String> {
    evs.iter().map(|e| format!("{}:{}", e.step, e.result)).collect()
}

fn patch_restore_collapse_one_page() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let kpf = io(KpageFlags::open())?;
    let dev = io(Device::open())?;
    const PAGE: usize = 5;

    // (b) PATCH: the target runs the new bytes from an anonymous page.
    let handle = io(dev.patch(&patch_req(&t, PAGE, 4242)))?;
    ensure!(t.call(PAGE)? == 4242, "patched function returned the old value");
    ensure!(t.call(PAGE + 1)? == text::original_value(PAGE + 1), "neighbour changed");
    let pfns = text_pfns(&t)?;
    let anon = pfns[PAGE];
    ensure!(anon.present() && !anon.file() && anon.exclusive(), "patched page pagemap {anon:?}");
    let flags = io(kpf.get(anon.pfn()))?;
    ensure!(flags.anon() && !flags.thp(), "patched page flags {flags:?}");
    for (i, e) in pfns.iter().enumerate().filter(|(i, _)| *i != PAGE) {
        ensure!(e.present() && e.pfn() == head + i as u64, "page {i}: {e:?}, want pfn {:#x}", head + i as u64);
        let f = io(kpf.get(e.pfn()))?;
        ensure!(f.thp() && !f.anon(), "page {i} flags {f:?}: the THP was split");
    }
    let s = smaps(&t)?;
    ensure!(s.pmd_mapped_kb() == 0 && s.kb("Anonymous") == 4, "after PATCH {s:?}");
    {
        let mut other = Target::spawn(&["--file", &t.file])?;
        ensure!(other.call(PAGE)? == text::original_value(PAGE), "a second mapping of the file sees the patch");
    }
    let q = io(dev.query(handle))?;
    ensure!(q.state == hugepoke::uapi::STATE_LIVE && q.pfn == anon.pfn() && q.pid == t.pid, "query {q:?}");
    ensure!(q.orig[..6] == text::mov_eax_ret(text::original_value(PAGE)), "query orig {:?}", &q.orig[..6]);

    // (e, PATCH) each step, in order, with the PFNs seen above.
    let evs = events_of(handle)?;
    let want = ["patched:ok"];
    ensure!(steps(&evs) == want, "handle events {:?}", steps(&evs));
    let all = events()?;
    let from = all.iter().rposition(|e| e.step == "patch" && e.pid == t.pid && e.addr == Some(t.page_addr(PAGE))).ok_or("no patch event")?;
    let seq: Vec<_> = all[from..].iter().filter(|e| e.pid == t.pid).map(|e| e.step.as_str()).collect();
    ensure!(
        seq.starts_with(&["patch", "resolve_target", "check_vma", "split_pmd", "cow_page", "write_bytes", "patched"]),
        "PATCH steps {seq:?}"
    );
    let split = all[from..].iter().find(|e| e.step == "split_pmd").unwrap();
    ensure!(split.pfn == Some(head) && split.order == Some(9), "split_pmd {split:?}, THP head {head:#x}");
    for step in ["cow_page", "write_bytes"] {
        let e = all[from..].iter().find(|e| e.step == step).unwrap();
        ensure!(e.pfn == Some(anon.pfn()) && e.order == Some(0), "{step} {e:?}, anon pfn {:#x}", anon.pfn());
    }

    // (c) RESTORE: the page-cache subpage is back, no anonymous page left.
    io(dev.restore(handle))?;
    let restored_at = Instant::now();
    ensure!(t.call(PAGE)? == text::original_value(PAGE), "restored function returned the patched value");
    let e = text_pfns(&t)?[PAGE];
    ensure!(e.present() && e.file() && e.pfn() == head + PAGE as u64, "restored page {e:?}");
    ensure!(smaps(&t)?.kb("Anonymous") == 0, "anonymous memory left: {:?}", smaps(&t)?);

    // (d) the queued collapse: PMD-mapped again, fast, without khugepaged.
    let took = wait_pmd_mapped(&mut t, Duration::from_millis(100))?;
    println!("# PMD mapping back {:?} after RESTORE returned ({:?} incl. checks)", took, restored_at.elapsed());
    ensure!(thp_head(&t)? == head, "a different THP came back");

    // (e, RESTORE) steps with PFNs.
    let evs = events_of(handle)?;
    let got = steps(&evs);
    let want = ["restore:ok", "restore_bytes:ok", "zap_anon_page:ok", "zap_anon_page:ok", "queue_collapse:ok", "restored:ok"];
    ensure!(got.iter().skip(1).map(String::as_str).collect::<Vec<_>>() == want, "RESTORE steps {got:?}");
    ensure!(evs[2].pfn == Some(anon.pfn()), "restore_bytes pfn {:?}", evs[2].pfn);
    ensure!(evs[3].pfn == Some(anon.pfn()), "zap pfn {:?}", evs[3].pfn);
    ensure!(evs[4].pfn == Some(head + PAGE as u64) && evs[4].order == Some(9), "page-cache page {:?}", evs[4]);
    let collapse = events()?.into_iter().rev().find(|e| e.step == "collapse" && e.pid == t.pid).ok_or("no collapse event")?;
    ensure!(collapse.result == "ok" && collapse.addr == Some(t.addr), "collapse {collapse:?}");
    Ok(())
}

fn collapse_waits_for_the_last_patch() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    // Two patches on page 3 (the function, and int3 filler further on), one on page 7.
    let a = io(dev.patch(&patch_req(&t, 3, 33)))?;
    let b = io(dev.patch(&PatchRequest { pid: t.pid, addr: t.page_addr(3) + 100, bytes: vec![0x90, 0x90], ..Default::default() }))?;
    let c = io(dev.patch(&patch_req(&t, 7, 77)))?;
    ensure!(t.call(3)? == 33 && t.call(7)? == 77, "patches not running");
    ensure!(smaps(&t)?.kb("Anonymous") == 8, "want two anonymous pages: {:?}", smaps(&t)?);

    io(dev.restore(a))?;
    ensure!(t.call(3)? == 1003, "page 3 function not restored");
    let kept = events_of(a)?;
    ensure!(kept.iter().any(|e| e.step == "keep_anon_page" && e.note.contains("other patches")), "page 3 zapped early: {:?}", steps(&kept));
    io(dev.restore(b))?;
    let evs = events_of(b)?;
    ensure!(evs.iter().any(|e| e.step == "zap_anon_page"), "page 3 not zapped: {:?}", steps(&evs));
    ensure!(evs.iter().any(|e| e.step == "queue_collapse" && e.note.contains("other patches")), "collapse queued too early: {:?}", steps(&evs));
    std::thread::sleep(Duration::from_millis(50));
    t.call(0)?;
    ensure!(smaps(&t)?.pmd_mapped_kb() == 0, "collapsed while page 7 is patched");
    ensure!(t.call(7)? == 77, "page 7 patch lost");

    io(dev.restore(c))?;
    wait_pmd_mapped(&mut t, Duration::from_millis(100))?;
    ensure!(thp_head(&t)? == head, "a different THP came back");
    ensure!(smaps(&t)?.kb("Anonymous") == 0, "anonymous memory left");
    Ok(())
}

fn install_pmd_maps_without_a_fault() -> TestResult {
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&PatchRequest { install_pmd: true, ..patch_req(&t, 9, 99) }))?;
    io(dev.restore(h))?;
    // No call into the target: only the work can have mapped the PMD.
    let start = Instant::now();
    while smaps(&t)?.pmd_mapped_kb() != 2048 {
        ensure!(start.elapsed() < Duration::from_millis(100), "no PMD without a fault: {:?}", smaps(&t)?);
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = events()?.into_iter().rev().find(|e| e.step == "collapse" && e.pid == t.pid).ok_or("no collapse event")?;
    ensure!(c.note == "PMD installed", "collapse {c:?}");
    Ok(())
}

fn expect_mismatch_changes_nothing() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    let mut req = patch_req(&t, 2, 2);
    req.expect = Some(vec![0xde, 0xad, 0xbe, 0xef, 0, 0]);
    let err = dev.patch(&req).err().ok_or("mismatching PATCH succeeded")?;
    ensure!(err.raw_os_error() == Some(libc::EILSEQ), "errno {err}");
    ensure!(thp_head(&t)? == head, "PMD mapping changed");
    ensure!(t.call(2)? == 1002, "text changed");
    let last = events()?.into_iter().rev().find(|e| e.pid == t.pid).unwrap();
    ensure!(last.step == "check_expected" && last.result == "-EILSEQ", "journal {last:?}");
    // With the right expectation it goes through.
    req.expect = Some(text::mov_eax_ret(1002).to_vec());
    io(dev.patch(&req))?;
    ensure!(t.call(2)? == 2, "expected-bytes PATCH did not apply");
    Ok(())
}

fn overlapping_patch_is_refused() -> TestResult {
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

fn closing_the_file_restores_and_persist_survives() -> TestResult {
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let persistent;
    {
        let dev = io(Device::open())?;
        io(dev.patch(&patch_req(&t, 10, 10)))?;
        persistent = io(dev.patch(&PatchRequest { persist: true, ..patch_req(&t, 11, 11) }))?;
        ensure!(t.call(10)? == 10 && t.call(11)? == 11, "patches not running");
    }
    ensure!(t.call(10)? == 1010, "closing the file did not restore its patch");
    ensure!(t.call(11)? == 11, "persistent patch did not survive the close");
    let dev = io(Device::open())?;
    ensure!(io(dev.query(persistent))?.state == hugepoke::uapi::STATE_LIVE, "persistent patch not live");
    io(dev.restore(persistent))?;
    ensure!(t.call(11)? == 1011, "persistent patch not restored");
    wait_pmd_mapped(&mut t, Duration::from_millis(100))?;
    ensure!(thp_head(&t)? == head, "different THP");
    let err = dev.restore(persistent).err().ok_or("second RESTORE succeeded")?;
    ensure!(err.raw_os_error() == Some(libc::ENOENT), "errno {err}");
    Ok(())
}

fn cli_patch_holds_until_stdin_closes() -> TestResult {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let addr = format!("{:#x}", t.page_addr(12));
    let mut cli = Command::new("hugepoke")
        .args(["patch", "--pid", &t.pid.to_string(), "--addr", &addr, "--bytes", "b8 0c 00 00 00 c3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(cli.stdout.take().unwrap()).read_line(&mut line).map_err(|e| e.to_string())?;
    let handle: u64 = line.trim().parse().map_err(|_| format!("CLI printed {line:?}"))?;
    ensure!(t.call(12)? == 12, "CLI patch not running");
    let out = Command::new("hugepoke").args(["query", &handle.to_string()]).output().map_err(|e| e.to_string())?;
    let q = String::from_utf8_lossy(&out.stdout);
    ensure!(q.contains("state=live") && q.contains("bytes=b80c000000c3"), "query: {q}");
    drop(cli.stdin.take());
    cli.wait().map_err(|e| e.to_string())?;
    ensure!(t.call(12)? == 1012, "patch outlived the CLI");

    // Failure: errno name and the module's reason, exit 1.
    let out = Command::new("hugepoke")
        .args(["patch", "--pid", &t.pid.to_string(), "--addr", &addr, "--bytes", "90", "--expect", "ff"])
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1) && err.contains("EILSEQ") && err.contains("not the expected"), "CLI said {err:?}");
    Ok(())
}

const TESTS: &[(&str, fn() -> TestResult)] = &[
    ("module_is_loaded", module_is_loaded),
    ("device_is_root_only", device_is_root_only),
    ("debugfs_files_exist", debugfs_files_exist),
    ("open_close_and_unknown_ioctl_are_journaled", open_close_and_unknown_ioctl_are_journaled),
    ("unprivileged_user_cannot_open", unprivileged_user_cannot_open),
    ("target_text_is_pmd_mapped_thp", target_text_is_pmd_mapped_thp),
    ("patch_restore_collapse_one_page", patch_restore_collapse_one_page),
    ("collapse_waits_for_the_last_patch", collapse_waits_for_the_last_patch),
    ("install_pmd_maps_without_a_fault", install_pmd_maps_without_a_fault),
    ("expect_mismatch_changes_nothing", expect_mismatch_changes_nothing),
    ("overlapping_patch_is_refused", overlapping_patch_is_refused),
    ("closing_the_file_restores_and_persist_survives", closing_the_file_restores_and_persist_survives),
    ("cli_patch_holds_until_stdin_closes", cli_patch_holds_until_stdin_closes),
];

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    let selected: Vec<_> = TESTS.iter().filter(|(n, _)| n.contains(&filter)).collect();
    println!("1..{}", selected.len());
    let mut failed = 0;
    for (i, (name, test)) in selected.iter().enumerate() {
        match test() {
            Ok(()) => println!("ok {} - {name}", i + 1),
            Err(why) => {
                failed += 1;
                println!("not ok {} - {name}", i + 1);
                for line in why.lines() {
                    println!("# {line}");
                }
            }
        }
    }
    std::process::exit(i32::from(failed > 0));
}
