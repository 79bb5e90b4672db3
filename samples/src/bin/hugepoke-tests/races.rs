//! Races that are microseconds wide, made certain: the module's `pause`
//! hook (debugfs) parks a PATCH at a named point while the test makes the
//! change a racer would make — an `execve()` of a setuid image, a write to
//! the text's file, another target's PATCH, the target's exit.

use crate::common::*;
use crate::TestResult;
use std::sync::mpsc;

pub(crate) use hugepoke::testkit::pause::Pause;

/// What a PATCH made on another thread returned, and that thread's id.
/// The open file is the test's: its patches live until the `Patcher` is
/// dropped.
struct Patcher {
    rx: mpsc::Receiver<(i32, std::io::Result<u64>)>,
    _dev: std::sync::Arc<Device>,
}

impl Patcher {
    /// PATCH `req` from a new thread with its own open file of the device,
    /// as user and group `uid` if given (for that thread alone: the raw
    /// syscalls change one thread's credentials, unlike libc's).
    fn start(req: PatchRequest, uid: Option<u32>) -> Result<Self, String> {
        let dev = std::sync::Arc::new(io(Device::open())?);
        let (tx, rx) = mpsc::channel();
        let ours = dev.clone();
        std::thread::spawn(move || {
            // SAFETY: gettid and per-thread credential changes of our own thread.
            let tid = unsafe { libc::gettid() };
            if let Some(id) = uid {
                // SAFETY: as above.
                let dropped = unsafe {
                    libc::syscall(libc::SYS_setresgid, id, id, id) == 0
                        && libc::syscall(libc::SYS_setresuid, id, id, id) == 0
                };
                if !dropped {
                    let _ = tx.send((tid, Err(std::io::Error::last_os_error())));
                    return;
                }
            }
            let result = dev.patch(&req);
            // Our reference goes before the result does: once the test has
            // the result, dropping the `Patcher` closes the file.
            drop(dev);
            let _ = tx.send((tid, result));
        });
        Ok(Self { rx, _dev: ours })
    }

    fn finish(&self, limit: Duration) -> Result<(i32, std::io::Result<u64>), String> {
        self.rx
            .recv_timeout(limit)
            .map_err(|_| format!("the parked PATCH did not return within {limit:?}"))
    }
}

/// The setuid window: PATCH checks that its caller may ptrace the target
/// and takes the target's mm in one step (`mm_access`, under the target's
/// `exec_update_lock`).  An `execve()` of a setuid image right after that
/// step must not let the PATCH reach the new image: it may only ever write
/// into the address space it was allowed to.  The new image maps the same
/// text file at the same address, so a PATCH that looked the mm up again
/// would land in it.
pub(crate) fn execve_during_patch_never_patches_the_new_image() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    const PAGE: usize = 44;
    const AT: &str = "0x200000000000";
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let dir = format!("{thp_dir}/suid");
    io(std::fs::create_dir_all(&dir))?;
    io(std::fs::set_permissions(
        &dir,
        std::fs::Permissions::from_mode(0o755),
    ))?;
    let exe = io(std::env::current_exe())?.with_file_name("thp-target");
    // Copies where uid 1000 can reach them (the repo may be under /root).
    let plain = format!("{dir}/thp-target");
    io(std::fs::copy(&exe, &plain))?;
    io(std::fs::set_permissions(
        &plain,
        std::fs::Permissions::from_mode(0o755),
    ))?;
    let suid = format!("{dir}/thp-target-suid");
    io(std::fs::copy(&exe, &suid))?;
    io(std::fs::set_permissions(
        &suid,
        std::fs::Permissions::from_mode(0o4755),
    ))?;
    let text = format!("{dir}/text.bin");
    io(std::fs::write(&text, text::blob()))?;
    io(std::fs::set_permissions(
        &text,
        std::fs::Permissions::from_mode(0o644),
    ))?;

    let args = ["--file", text.as_str(), "--at", AT];
    let mut t = Target::spawn_program(&plain, Some(1000), &args)?;
    thp_head(&t)?;
    let pause = Pause::arm("resolved", t.pid)?;
    let patcher = Patcher::start(patch_req(&t, PAGE, 4444), Some(1000))?;
    pause.wait_parked("resolved")?;

    let (pid, addr) = (t.pid, t.addr);
    t.exec(&suid, &args)?;
    ensure!(
        t.pid == pid && t.addr == addr,
        "the new image is pid {} text {:#x}, not {pid} {addr:#x}",
        t.pid,
        t.addr
    );
    let status = io(std::fs::read_to_string(format!("/proc/{pid}/status")))?;
    let uids = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    ensure!(
        uids.split_whitespace().nth(2) == Some("0"),
        "the new image is not setuid root ({uids}): the test tests nothing"
    );
    thp_head(&t)?;

    pause.release()?;
    let (_, result) = patcher.finish(Duration::from_secs(60))?;
    let value = t.call(PAGE)?;
    ensure!(
        value == text::original_value(PAGE),
        "the setuid image runs {value}, not {}: the PATCH ({result:?}) reached the image exec'd after its check",
        text::original_value(PAGE)
    );
    let s = smaps(&t)?;
    ensure!(
        s.kb("Anonymous") == 0,
        "the new image's text has anonymous pages: {s:?}"
    );
    // The PATCH went to the old image's address space, which nothing runs
    // any more, or found it gone.
    match result {
        // Its handle says so: the process it patched is gone.
        Ok(h) => {
            let q = io(io(Device::open())?.query(h))?;
            ensure!(
                q.state == hugepoke::uapi::STATE_GONE,
                "the PATCH of the old image: QUERY state {}, want gone",
                q.state
            );
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => {
            return Err(format!(
                "PATCH returned {e}: expected success on the old image or ESRCH"
            ))
        }
    }
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// PATCH_EXPECT is compared with the bytes read under the page-table lock,
/// in the step that writes: a change made after PATCH's early (cheap) read
/// — here a write to the text's file, which changes the page-cache page the
/// COW copies — turns the PATCH into EILSEQ, and the target runs the
/// changed bytes, not the patch.
pub(crate) fn expect_is_checked_in_the_step_that_writes() -> TestResult {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 21;
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let file = format!("{thp_dir}/expect-race.bin");
    io(std::fs::write(&file, text::blob()))?;
    let mut t = Target::spawn(&["--file", &file])?;
    thp_head(&t)?;
    let original = text::mov_eax_ret(text::original_value(PAGE));
    let theirs = text::mov_eax_ret(7777);
    ensure!(
        read_mem(t.pid, t.page_addr(PAGE), original.len())? == original,
        "page {PAGE} does not hold its original code"
    );

    let pause = Pause::arm("checked", t.pid)?;
    let seq = hugepoke::device::journal_seq();
    let req = PatchRequest {
        expect: Some(original.to_vec()),
        ..patch_req(&t, PAGE, 2121)
    };
    let patcher = Patcher::start(req, None)?;
    pause.wait_parked("checked")?;
    // Someone else changes the bytes now, after the early read.
    let f = io(std::fs::OpenOptions::new().write(true).open(&file))?;
    io(f.write_all_at(&theirs, (PAGE * text::PAGE) as u64))?;
    drop(f);
    pause.release()?;
    let (_, result) = patcher.finish(Duration::from_secs(60))?;

    ensure!(
        result.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EILSEQ),
        "PATCH with stale expected bytes returned {result:?}, not EILSEQ"
    );
    let value = t.call(PAGE)?;
    ensure!(
        value == 7777,
        "page {PAGE} runs {value}: expected the bytes written to the file (7777), not the patch"
    );
    // The copy PATCH made was given back: zapped (it equals the page
    // cache), no anonymous page left, the collapse queued.
    let evs: Vec<_> = events()?
        .into_iter()
        .filter(|e| e.pid == t.pid && e.seq > seq)
        .collect();
    for (step, note) in [
        ("zap_anon_page", "PTE zapped"),
        ("restore", "undone: every page written so far restored"),
        ("queue_collapse", ""),
    ] {
        ensure!(
            evs.iter().any(|e| e.step == step && e.note.contains(note)),
            "the failed PATCH's undo: no {step} {note:?} in {:?}",
            steps(&evs)
        );
    }
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "the failed PATCH left an anonymous page: {:?}",
        smaps(&t)?
    );
    drop(t);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// One target's PATCH parked in the middle (holding that target's lock and
/// its mmap lock, as a PATCH waiting on a slow fault would) stalls nothing
/// else: another target is patched, queried and restored, and debugfs
/// `patches` is read, while it waits.
pub(crate) fn a_parked_patch_does_not_stall_other_targets() -> TestResult {
    let mut slow = Target::spawn(&[])?;
    let mut other = Target::spawn(&[])?;
    thp_head(&slow)?;
    thp_head(&other)?;
    let pause = Pause::arm("checked", slow.pid)?;
    let patcher = Patcher::start(patch_req(&slow, 50, 5050), None)?;
    pause.wait_parked("checked")?;

    let (tx, rx) = mpsc::channel();
    let req = patch_req(&other, 51, 5151);
    let worker = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let tid = worker.clone();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        tid.store(me, std::sync::atomic::Ordering::SeqCst);
        let work = || -> Result<String, String> {
            let dev = io(Device::open())?;
            let h = io(dev.patch(&req))?;
            io(dev.query(h))?;
            let listed = io(proc::debugfs("patches"))?;
            io(dev.restore(h))?;
            Ok(listed)
        };
        let _ = tx.send(work());
    });
    let start = Instant::now();
    let other_done = rx.recv_timeout(Duration::from_secs(30));
    let waited = start.elapsed();
    let tid = worker.load(std::sync::atomic::Ordering::SeqCst);
    let stack = std::fs::read_to_string(format!("/proc/self/task/{tid}/stack")).unwrap_or_default();
    let journal = proc::debugfs("events").unwrap_or_default();
    let tail: Vec<&str> = journal.lines().rev().take(8).collect();
    pause.release()?;
    let (_, slow_result) = patcher.finish(Duration::from_secs(60))?;
    let listed = match other_done {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!(
                "PATCH/QUERY/RESTORE of another target did not finish in {waited:?} while one PATCH was parked;\n\
                 its kernel stack:\n{stack}last events (newest first):\n{}",
                tail.join("\n")
            ))
        }
    };
    ensure!(
        listed.contains("busy"),
        "debugfs patches did not say the parked target is busy:\n{listed}"
    );
    io(slow_result)?;
    drop(patcher);
    ensure!(
        other.call(51)? == text::original_value(51),
        "the other target's patch was not restored"
    );
    ensure!(
        slow.call(50)? == text::original_value(50),
        "the parked PATCH's patch outlived its file"
    );
    Ok(())
}

/// The last reference to a target's address space may be PATCH's own (the
/// target exited while PATCH ran).  Dropping it tears the whole address
/// space down (`exit_mmap`); that must happen in a worker (`mmput_async`),
/// never on the ioctl path under the target's lock.  Seen through the
/// `kmem:rss_stat` trace event: the teardown's counters reach zero, and
/// the event names the task that did it.
pub(crate) fn last_mm_reference_is_dropped_by_a_worker() -> TestResult {
    let tracing = "/sys/kernel/debug/tracing";
    let event = format!("{tracing}/events/kmem/rss_stat");
    if !std::path::Path::new(&event).exists() {
        return Err(format!("no {event}: is tracefs mounted?"));
    }
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let pause = Pause::arm("resolved", t.pid)?;
    let patcher = Patcher::start(patch_req(&t, 60, 6060), None)?;
    pause.wait_parked("resolved")?;
    t.kill();

    // MM_FILEPAGES (member 0) at zero: only a teardown gets there (the
    // target maps its binary and libc); PATCH's PMD split can empty the
    // shmem counter for a moment, so that one does not count.
    io(std::fs::write(
        format!("{event}/filter"),
        "member == 0 && size == 0",
    ))?;
    io(std::fs::write(format!("{event}/enable"), "1"))?;
    io(std::fs::write(format!("{tracing}/trace"), ""))?;
    pause.release()?;
    let (tid, result) = patcher.finish(Duration::from_secs(60))?;
    // Who brought some counter of some mm to zero: `comm-tid` of each event.
    let zeroed_by = || -> Result<Vec<String>, String> {
        Ok(io(std::fs::read_to_string(format!("{tracing}/trace")))?
            .lines()
            .filter(|l| l.contains("rss_stat:"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    };
    let waited = wait_for(
        "an address space torn down by a kworker",
        Duration::from_secs(30),
        || Ok(zeroed_by()?.iter().any(|who| who.starts_with("kworker"))),
    );
    let tasks = zeroed_by()?;
    io(std::fs::write(format!("{event}/enable"), "0"))?;
    io(std::fs::write(format!("{event}/filter"), "0"))?;
    let ours = format!("-{tid}");
    ensure!(
        !tasks.iter().any(|who| who.ends_with(&ours)),
        "the PATCH thread (tid {tid}) tore the address space down itself (PATCH: {result:?}); counters zeroed by {tasks:?}"
    );
    waited.map_err(|e| format!("{e}; counters zeroed by {tasks:?} (PATCH: {result:?})"))?;
    Ok(())
}

/// Pin the calling thread (`pid` 0) or process `pid` to one CPU.
pub(crate) fn pin_to_cpu(pid: i32, cpu: usize) -> TestResult {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(
        rc == 0,
        "sched_setaffinity({pid}, cpu {cpu}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

const KPF_REFERENCED: u32 = 2;
const KPF_LRU: u32 = 5;
const KPF_ACTIVE: u32 = 6;

/// LRU batches.  PATCH drains its own CPU's LRU batches right after the
/// COW: its fresh copy is on the LRU after PATCH (`/proc/kpageflags`), so
/// RESTORE needs no drain (no `lru_drain` step) and zaps.  The PATCH runs on
/// CPU 1 right after `drop_caches` emptied every batch, the target and the
/// test on CPU 0.  Then, after another PATCH, the test reads the copy
/// through `/proc/PID/mem` on CPU 0 (marking it accessed twice queues it in
/// CPU 0's activate batch, with a reference: `kpageflags` shows it neither
/// referenced nor active any more).  A RESTORE from CPU 0 frees it by
/// draining its own CPU's batches only.  The fallback: the same, but
/// RESTORE runs on CPU 1; its own CPU's drain leaves the reference, so it
/// drains every CPU once, with neither the target's mmap lock nor the
/// registry held, and zaps.  It is parked just before that drain;
/// meanwhile the target `mprotect()`s its text (its mmap lock is free) and
/// another target is patched and restored (the registry is free).
pub(crate) fn restore_drains_lru_batches_once_and_unlocked() -> TestResult {
    const PAGE: usize = 77;
    pin_to_cpu(0, 0)?;
    let mut t = Target::spawn(&[])?;
    pin_to_cpu(t.pid, 0)?;
    let other = Target::spawn(&[])?;
    thp_head(&t)?;
    thp_head(&other)?;
    let dev = std::sync::Arc::new(io(Device::open())?);
    let kpf = io(KpageFlags::open())?;
    let pm = io(Pagemap::open(t.pid))?;
    let patch_on_cpu1 = || -> Result<(u64, u64), String> {
        let (d, req) = (dev.clone(), patch_req(&t, PAGE, 7777));
        let h = std::thread::spawn(move || -> Result<u64, String> {
            pin_to_cpu(0, 1)?;
            io(std::fs::write("/proc/sys/vm/drop_caches", "1"))?;
            io(d.patch(&req))
        })
        .join()
        .map_err(|_| "the PATCH thread panicked")??;
        let e = io(pm.entry(t.page_addr(PAGE)))?;
        ensure!(e.present() && !e.file(), "page {PAGE} after PATCH: {e:?}");
        ensure!(
            io(kpf.get(e.pfn()))?.has(KPF_LRU),
            "after PATCH the COW copy is not on the LRU: PATCH left it in its CPU's batch"
        );
        Ok((h, e.pfn()))
    };
    // The notes of the drain events of RESTORE `h`, once its copy `pfn`
    // was zapped.
    let drains_of = |h, pfn| -> Result<Vec<String>, String> {
        let evs = events_of(h)?;
        ensure!(
            evs.iter()
                .any(|e| e.step == "zap_anon_page" && e.pfn == Some(pfn)),
            "copy {pfn:#x} not zapped: {:?}",
            steps(&evs)
        );
        Ok(evs
            .iter()
            .filter(|e| e.step == "lru_drain")
            .map(|e| e.note.clone())
            .collect())
    };

    // The common case: no drain at all.
    let (h, pfn) = patch_on_cpu1()?;
    io(dev.restore(h))?;
    ensure!(
        drains_of(h, pfn)?.is_empty(),
        "RESTORE of a copy on the LRU drained: {:?}",
        steps(&events_of(h)?)
    );

    // Queued on the caller's own CPU: its local drain is enough.
    let local = |round| -> Result<bool, String> {
        let (handle, pfn) = patch_on_cpu1()?;
        let queued = queue_for_activation(&t, PAGE, &kpf, pfn)?;
        io(dev.restore(handle))?;
        let notes = drains_of(handle, pfn)?;
        if !queued || notes.is_empty() {
            println!("# local round {round}: the copy left CPU 0's activate batch before RESTORE looked; again");
            return Ok(false);
        }
        ensure!(
            notes == ["drained this CPU's LRU batches: every copy is free"],
            "RESTORE of a copy queued on its own CPU: drains {notes:?}, want this CPU's only"
        );
        Ok(true)
    };
    let mut freed_locally = false;
    for round in 1..=3 {
        if local(round)? {
            freed_locally = true;
            break;
        }
    }
    ensure!(
        freed_locally,
        "in 3 rounds RESTORE never found the copy in its own CPU's batch"
    );

    for round in 1..=3 {
        let (handle, pfn) = patch_on_cpu1()?;
        if !queue_for_activation(&t, PAGE, &kpf, pfn)? {
            println!("# round {round}: the copy left CPU 0's activate batch before RESTORE; again");
            io(dev.restore(handle))?;
            continue;
        }
        let pause = Pause::arm("drain", t.pid)?;
        let d = dev.clone();
        let restore = std::thread::spawn(move || -> Result<(), String> {
            pin_to_cpu(0, 1)?;
            io(d.restore(handle))
        });
        wait_for(
            "RESTORE parked at its drain (or done)",
            Duration::from_secs(60),
            || Ok(restore.is_finished() || io(proc::debugfs("pause"))?.starts_with("parked drain")),
        )?;
        if restore.is_finished() {
            // The batch was emptied between our look and RESTORE's (khugepaged's
            // scan drains every CPU; a large folio on CPU 0 flushes it), so
            // RESTORE had nothing to drain: inconclusive, again.
            drop(pause);
            restore
                .join()
                .map_err(|_| "the RESTORE thread panicked")??;
            println!("# round {round}: the copy left its LRU batch before RESTORE looked; again");
            continue;
        }
        let start = Instant::now();
        let protected = t.command("protect rx")?;
        let mprotect_took = start.elapsed();
        let start = Instant::now();
        let h2 = io(dev.patch(&patch_req(&other, PAGE, 7878)))?;
        io(dev.restore(h2))?;
        let other_took = start.elapsed();
        pause.release()?;
        let restored = restore.join().map_err(|_| "the RESTORE thread panicked")?;
        ensure!(protected == "protected 0", "target's mprotect: {protected}");
        ensure!(
            mprotect_took < Duration::from_secs(10),
            "the target's mprotect waited {mprotect_took:?} while RESTORE was parked at its drain: the mmap lock was held"
        );
        ensure!(
            other_took < Duration::from_secs(10),
            "another target's PATCH+RESTORE waited {other_took:?} during the drain"
        );
        restored?;
        let drains = drains_of(handle, pfn)?;
        let want = [
            "drained this CPU's LRU batches: a copy is still held (another CPU's batch?)",
            "draining all CPUs' LRU batches",
            "drained",
        ];
        ensure!(
            drains == want,
            "RESTORE of a page in another CPU's LRU batch: drains {drains:?}, want {want:?}"
        );
        ensure!(t.call(PAGE)? == text::original_value(PAGE), "not restored");
        return Ok(());
    }
    Err("in 3 rounds RESTORE never found the copy in an LRU batch".into())
}

/// Read page `page` of `t`'s text through /proc/PID/mem (from this thread's
/// CPU) until the copy `pfn` is queued for activation: a read finds it
/// referenced and not active, so it goes into this CPU's activate batch
/// (with a reference) and loses its referenced bit.  False if it turned
/// active instead (the batch was drained meanwhile).
fn queue_for_activation(
    t: &Target,
    page: usize,
    kpf: &KpageFlags,
    pfn: u64,
) -> Result<bool, String> {
    for _ in 0..4 {
        let was = io(kpf.get(pfn))?;
        read_mem(t.pid, t.page_addr(page), 1)?;
        let now = io(kpf.get(pfn))?;
        if now.has(KPF_ACTIVE) {
            return Ok(false);
        }
        if was.has(KPF_REFERENCED) && !now.has(KPF_REFERENCED) {
            return Ok(true);
        }
    }
    Err(format!(
        "the copy {pfn:#x} never went from referenced to queued for activation"
    ))
}

/// Closing the file restores its patches from a work item, where a fatal
/// signal for the closing task cannot cut GUP short.  The CLI holds a patch
/// and closes the device when its stdin closes; the close-time RESTORE is
/// parked at `restore`, the CLI is SIGKILLed, then released: the patch must
/// be restored, not kept (a RESTORE in the killed task itself would get
/// EINTR from GUP and leave the patch behind as persistent).  The copy is
/// paged out first, so the RESTORE must fault it in through GUP (a copy
/// in place is taken from the page table, where no signal cuts in).
pub(crate) fn close_restores_even_when_the_closer_is_killed() -> TestResult {
    const PAGE: usize = 88;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let (mut cli, handle) = cli_patch(&t, PAGE, 8888)?;
    ensure!(t.call(PAGE)? == 8888, "CLI patch not running");
    let _swap = hugepoke::testkit::backing::Swap::on()?;
    let paged = t.command(&format!("pageout {PAGE}"))?;
    ensure!(paged == "pageout ok", "pageout said {paged:?}");
    let pause = Pause::arm("restore", t.pid)?;
    drop(cli.stdin.take());
    pause.wait_parked("restore")?;
    cli.kill().map_err(|e| e.to_string())?;
    // Give the signal time to land before the RESTORE goes on.
    wait_for(
        "the CLI to have SIGKILL pending",
        Duration::from_secs(10),
        || {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", cli.id())).unwrap_or_default();
            Ok(status
                .lines()
                .any(|l| l.starts_with("ShdPnd:") && !l.ends_with("0000000000000000"))
                || status
                    .lines()
                    .any(|l| l.starts_with("SigPnd:") && !l.ends_with("0000000000000000"))
                || status.is_empty())
        },
    )?;
    pause.release()?;
    cli.wait().map_err(|e| e.to_string())?;
    // The killed closer need not wait for its restore (m8): the work item
    // finishes it.
    let restored = wait_for(
        "the handle's restored step",
        Duration::from_secs(30),
        || {
            Ok(events_of(handle)?
                .iter()
                .any(|e| e.step == "restored" && e.result == "ok"))
        },
    );
    let evs = events_of(handle)?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the killed closer left the patch behind: {:?}",
        steps(&evs)
    );
    restored?;
    Ok(())
}

/// The CLI checks the code it patches (by symbol or address) and then asks
/// the kernel to write only over the bytes it checked: a change between its
/// look and the write — here a debugger's `int3` through /proc/PID/mem
/// while the PATCH is parked after resolving its target — is refused
/// (EILSEQ) and leaves the debugger's byte alone.
pub(crate) fn cli_patch_writes_only_over_the_bytes_it_checked() -> TestResult {
    use std::process::{Command, Stdio};
    const PAGE: usize = 23;
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    let addr = t.page_addr(PAGE);
    let original = text::mov_eax_ret(text::original_value(PAGE));
    let pause = Pause::arm("resolved", t.pid)?;
    let cli = Command::new("hugepoke")
        .args([
            "patch",
            "--pid",
            &t.pid.to_string(),
            "--addr",
            &format!("{addr:#x}"),
            "--bytes",
            "b8 2a 00 00 00 c3",
            "--persist",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("hugepoke: {e}"))?;
    pause.wait_parked("resolved")?;
    write_mem(t.pid, addr, &[0xcc])?;
    pause.release()?;
    let out = cli.wait_with_output().map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && stderr.contains("EILSEQ"),
        "CLI exited {:?}: {stderr}",
        out.status.code()
    );
    let now = read_mem(t.pid, addr, original.len())?;
    ensure!(
        now[0] == 0xcc && now[1..] == original[1..],
        "bytes at the site: {now:02x?}, want the debugger's cc then the original rest"
    );
    ensure!(
        !events()?
            .iter()
            .any(|e| e.step == "patched" && e.pid == t.pid),
        "a patch was made"
    );
    Ok(())
}

// This module's in-guest tests, in groups that main.rs's SUITE puts in run order.
/// A PATCH, and a PATCH_BATCH, whose caller (the CLI) is SIGKILLed while
/// parked at `checked` (target locked, mmap lock held, nothing written):
/// the call goes on, its first GUP sees the fatal signal (EINTR,
/// journaled), and the target is exactly as it was — PMD-mapped by the
/// same THP, no anonymous page, the original code, no patch listed.
pub(crate) fn killed_patch_and_batch_change_nothing() -> TestResult {
    use std::process::{Command, Stdio};
    let mut t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let sites = std::env::temp_dir().join("hugepoke-killed-batch.sites");
    let line = |page: usize| {
        format!(
            "{:#x} b8{:08x}c3\n",
            t.page_addr(page),
            (7000 + page as u32).swap_bytes()
        )
    };
    io(std::fs::write(
        &sites,
        format!("{}{}{}", line(50), line(51), line(90)),
    ))?;
    let single = [
        "--addr".to_string(),
        format!("{:#x}", t.page_addr(52)),
        "--bytes".into(),
        "b801000000c3".into(),
    ];
    let batch = ["--sites".to_string(), sites.display().to_string()];
    for (what, args) in [("PATCH", &single[..]), ("PATCH_BATCH", &batch[..])] {
        let seq = hugepoke::device::journal_seq();
        let pause = Pause::arm("checked", t.pid)?;
        let mut cli = io(Command::new("hugepoke")
            .args(["patch", "--pid", &t.pid.to_string()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn())?;
        pause.wait_parked("checked")?;
        let _ = cli.kill();
        let _ = cli.wait();
        let mut failed = None;
        wait_for(
            &format!("the killed {what} to fail"),
            Duration::from_secs(30),
            || {
                failed = events()?
                    .into_iter()
                    .find(|e| e.seq > seq && e.pid == t.pid && e.result == "-EINTR");
                Ok(failed.is_some())
            },
        )?;
        drop(pause);
        ensure!(
            thp_head(&t)? == head && smaps(&t)?.kb("Anonymous") == 0,
            "the killed {what} changed the target: {:?}",
            smaps(&t)?
        );
        for page in [50, 51, 52, 90] {
            ensure!(
                t.call(page)? == text::original_value(page),
                "the killed {what} left page {page} patched"
            );
        }
        let listed = proc::parse_patches(&io(proc::debugfs("patches"))?);
        ensure!(
            !listed.iter().any(|p| p.pid == t.pid),
            "the killed {what} left a patch: {listed:?}"
        );
    }
    let _ = std::fs::remove_file(&sites);
    Ok(())
}

/// The journal's `pause` records at `point` for target `pid` since `seq`.
fn parked_times(point: &str, pid: i32, seq: u64) -> Result<usize, String> {
    Ok(events()?
        .iter()
        .filter(|e| e.seq > seq && e.pid == pid && e.step == "pause" && e.note == point)
        .count())
}

/// Wait until an operation on `pid` has parked at `point` `n` times since
/// `seq` (the debugfs state alone cannot tell one park from the next).
fn wait_parked_times(point: &str, pid: i32, seq: u64, n: usize) -> TestResult {
    wait_for(
        &format!("park {n} at {point}"),
        Duration::from_secs(60),
        || Ok(parked_times(point, pid, seq)? >= n),
    )?;
    Ok(())
}

/// The module's own collapse (khugepaged asleep) of the 2 MiB range that
/// holds text page `page`, journaled since `seq`, and the PMD back.
fn pmd_back_by_the_module(t: &mut Target, page: usize, seq: u64) -> TestResult {
    let range = t.page_addr(page) & !(text::THP_SIZE as u64 - 1);
    wait_module_collapse(t.pid, range, seq)?;
    wait_pmd_mapped(t, Duration::from_secs(10))?;
    Ok(())
}

/// SIGKILL `cli`, which waits in the kernel for a target that a PATCH
/// parked at `checked` holds: it must exit while that PATCH is still
/// parked.  The pause is released either way.
fn kill_while_parked(cli: &mut std::process::Child, pause: &Pause, what: &str) -> TestResult {
    io(cli.kill())?;
    let exited = wait_for(
        &format!("the killed {what} to exit"),
        Duration::from_secs(10),
        || Ok(io(cli.try_wait())?.is_some()),
    );
    let still_parked = io(proc::debugfs("pause"))?.starts_with("parked checked");
    pause.release()?;
    let _ = cli.wait();
    exited?;
    ensure!(
        still_parked,
        "the {what} left only once the target was free"
    );
    Ok(())
}

/// Every page of the target mapped in, so that it can answer a command
/// while a parked PATCH holds its mmap lock (a fault that needs that lock,
/// such as one that reads the binary in, would wait for the PATCH).
fn warm(t: &mut Target) -> TestResult {
    let said = t.command("warm")?;
    ensure!(said == "warm 0", "warm: {said}");
    ensure!(thp_head(t).is_ok(), "warm split the text's PMD");
    Ok(())
}

/// m4: a PATCH whose GUP split the PMD and then failed — the target
/// dropped each fresh copy (MADV_DONTNEED, under its per-VMA lock, which
/// our mmap lock does not keep out) between GUP and the page-table lock,
/// six times — gives the PMD back: its collapse is queued as RESTORE's
/// would be (khugepaged is asleep, and cannot collapse a range whose VMA
/// now has an anon_vma anyway).
pub(crate) fn failed_patch_after_its_split_gives_the_pmd_back() -> TestResult {
    const PAGE: usize = 61;
    let _asleep = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    warm(&mut t)?;
    let seq = hugepoke::device::journal_seq();
    let pause = Pause::arm("cowed", t.pid)?;
    let patcher = Patcher::start(patch_req(&t, PAGE, 6161), None)?;
    for n in 1..=6 {
        wait_parked_times("cowed", t.pid, seq, n)?;
        t.command(&format!("dontneed {PAGE}"))?;
        if n < 6 {
            Pause::arm("cowed", t.pid).map(std::mem::forget)?;
        }
        pause.release()?;
    }
    let (_, result) = patcher.finish(Duration::from_secs(60))?;
    ensure!(
        matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EAGAIN)),
        "PATCH returned {result:?}, want EAGAIN (page table kept changing)"
    );
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the failed PATCH changed the text"
    );
    pmd_back_by_the_module(&mut t, PAGE, seq)?;
    ensure!(
        smaps(&t)?.kb("Anonymous") == 0,
        "an anonymous copy is left: {:?}",
        smaps(&t)?
    );
    Ok(())
}

/// A fresh target with text page `page` patched to `value` (a handle on
/// `dev`) and that patch's copy then dropped by the target itself
/// (MADV_DONTNEED); khugepaged must be asleep.
fn patched_then_dropped(dev: &Device, page: usize, value: u32) -> Result<(Target, u64), String> {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let h = io(dev.patch(&patch_req(&t, page, value)))?;
    ensure!(t.call(page)? == value, "patch not running");
    t.command(&format!("dontneed {page}"))?;
    ensure!(
        t.call(page)? == text::original_value(page),
        "MADV_DONTNEED did not drop the copy"
    );
    Ok((t, h))
}

/// The target dropped its patched copy itself (MADV_DONTNEED): RESTORE
/// finds the page-cache page back, forgets the patch ("already undone")
/// and still collapses the range, which would otherwise stay PTE-mapped.
pub(crate) fn restore_after_the_target_dropped_its_copy_collapses() -> TestResult {
    const PAGE: usize = 62;
    let _asleep = khugepaged_asleep()?;
    let dev = io(Device::open())?;
    let (mut t, h) = patched_then_dropped(&dev, PAGE, 6262)?;
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(h))?;
    ensure!(
        events_of(h)?
            .iter()
            .any(|e| e.note.contains("already undone")),
        "RESTORE did not find the copy gone: {:?}",
        steps(&events_of(h)?)
    );
    pmd_back_by_the_module(&mut t, PAGE, seq)?;
    Ok(())
}

/// The same after the target also moved its text (mremap): the page-cache
/// page maps back at the new address, and the module collapses the range
/// there (once only where PATCH wrote: the range stayed PTE-mapped until
/// `hugepoke collapse`; hugepoke-model found it).
pub(crate) fn restore_after_a_drop_and_a_move_collapses_where_the_text_is() -> TestResult {
    const PAGE: usize = 63;
    let _asleep = khugepaged_asleep()?;
    let dev = io(Device::open())?;
    let (mut t, h) = patched_then_dropped(&dev, PAGE, 6363)?;
    let moved = t.command("move")?;
    t.addr = moved
        .strip_prefix("moved ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("move said {moved:?}"))?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the moved text runs {} at page {PAGE}",
        t.call(PAGE)?
    );
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(h))?;
    pmd_back_by_the_module(&mut t, PAGE, seq)?;
    Ok(())
}

/// The same with another view of the file: the target dropped the
/// patch's copy and mapped its text file again, below its text (walked
/// first) and never written to.  RESTORE collapses the text PATCH wrote
/// in, not that view (a review found the first mapping met would do).
pub(crate) fn restore_after_a_drop_collapses_the_text_not_another_view() -> TestResult {
    const PAGE: usize = 64;
    let _asleep = khugepaged_asleep()?;
    let dev = io(Device::open())?;
    let (mut t, h) = patched_then_dropped(&dev, PAGE, 6464)?;
    let said = t.command("map-again")?;
    let view = said
        .strip_prefix("mapped-again ")
        .and_then(hugepoke::parse_number)
        .ok_or(format!("map-again said {said:?}"))?;
    ensure!(
        view < t.addr,
        "the second view at {view:#x} is not below the text at {:#x} (the case this test is for)",
        t.addr
    );
    let seq = hugepoke::device::journal_seq();
    io(dev.restore(h))?;
    pmd_back_by_the_module(&mut t, PAGE, seq)?;
    Ok(())
}

/// A PATCH_BATCH killed after its first page was written, that page
/// another tool's copy (a `/proc/PID/mem` write of the file's own byte):
/// the second page's GUP fails (EINTR), and the undo, whose only written
/// page is restored and zapped in one step, leaves that copy as it was (a
/// review found no test reached this path of the undo).
pub(crate) fn killed_batch_leaves_a_copy_it_found_there() -> TestResult {
    const PAGES: [usize; 2] = [74, 75];
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let before = copy_by_a_mem_write(&t, PAGES[0])?;
    let (mut cli, seq, _pause) = cli_batch_parked_after_one_page(&t, "found", &PAGES, 5000)?;
    let _ = cli.kill();
    let _ = cli.wait();
    wait_for("the killed batch undone", Duration::from_secs(30), || {
        Ok(events()?
            .iter()
            .any(|e| e.seq > seq && e.pid == t.pid && e.note.starts_with("undone: every page")))
    })?;
    still_that_copy(&mut t, PAGES[0], before)?;
    ensure!(
        t.call(PAGES[1])? == text::original_value(PAGES[1]),
        "the killed batch left page {} patched",
        PAGES[1]
    );
    Ok(())
}

/// `hugepoke patch` of a function site on each of `pages` (page P made to
/// return `base` + P), parked once its first page is written: the CLI, the
/// journal's sequence before it, and the armed pause (released on drop).
fn cli_batch_parked_after_one_page(
    t: &Target,
    name: &str,
    pages: &[usize],
    base: u32,
) -> Result<(std::process::Child, u64, Pause), String> {
    use std::process::{Command, Stdio};
    let sites = std::env::temp_dir().join(format!("hugepoke-killed-{name}.sites"));
    let lines: String = pages
        .iter()
        .map(|&p| {
            let value = (base + p as u32).swap_bytes();
            format!("{:#x} b8{value:08x}c3\n", t.page_addr(p))
        })
        .collect();
    io(std::fs::write(&sites, lines))?;
    let seq = hugepoke::device::journal_seq();
    let pause = Pause::arm("written", t.pid)?;
    let cli = io(Command::new("hugepoke")
        .args(["patch", "--pid", &t.pid.to_string(), "--sites"])
        .arg(&sites)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn())?;
    let parked = wait_parked_times("written", t.pid, seq, 1);
    let _ = std::fs::remove_file(&sites);
    parked?;
    Ok((cli, seq, pause))
}

/// m3: a PATCH_BATCH killed after its first page was written, that page's
/// copy dropped by the target meanwhile: the undo must find the page again
/// with GUP, which the pending SIGKILL fails (EINTR).  What it kept is
/// restored by a work item (no signal there): no patch is left, the text
/// is the file's, and the range is PMD-mapped again.
pub(crate) fn killed_batch_is_undone_by_a_worker() -> TestResult {
    let _asleep = khugepaged_asleep()?;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    warm(&mut t)?;
    let (mut cli, seq, _pause) =
        cli_batch_parked_after_one_page(&t, "worker", &[70, 71, 72], 7000)?;
    t.command("dontneed 70")?;
    // The parked batch wakes on the signal and goes on to page 71.
    let _ = cli.kill();
    let _ = cli.wait();
    let mut handle = None;
    wait_for(
        "the kept sites restored by a work item",
        Duration::from_secs(30),
        || {
            let evs = events()?;
            handle = evs
                .iter()
                .find(|e| e.seq > seq && e.note.contains("restored from a work item"))
                .and_then(|e| e.handle);
            Ok(handle.is_some_and(|h| {
                evs.iter()
                    .any(|e| e.handle == Some(h) && e.step == "restored" && e.result == "ok")
            }))
        },
    )?;
    // The undo was refused first (that is what the work item is for).
    ensure!(
        events_of(handle.unwrap_or_default())?
            .iter()
            .any(|e| e.result == "-EINTR" && e.note.contains("could not all be undone")),
        "the undo was not cut short, so nothing was kept: {:?}",
        steps(&events_of(handle.unwrap_or_default())?)
    );
    let listed = proc::parse_patches(&io(proc::debugfs("patches"))?);
    ensure!(
        !listed.iter().any(|p| p.pid == t.pid),
        "the killed batch left a patch: {listed:?}"
    );
    for page in [70, 71, 72] {
        ensure!(
            t.call(page)? == text::original_value(page),
            "the killed batch left page {page} patched"
        );
    }
    pmd_back_by_the_module(&mut t, 70, seq)?;
    Ok(())
}

/// m8: a RESTORE queued behind an operation that holds the target (here a
/// PATCH parked at `checked`, as one stuck in a FUSE fault would) can be
/// killed: it leaves at once, EINTR journaled, while the target is still
/// busy; the patch stays and is restored afterwards.
pub(crate) fn a_restore_behind_a_busy_target_can_be_killed() -> TestResult {
    use std::process::{Command, Stdio};
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, 30, 3030)))?;
    let seq = hugepoke::device::journal_seq();
    let pause = Pause::arm("checked", t.pid)?;
    let patcher = Patcher::start(patch_req(&t, 31, 3131), None)?;
    pause.wait_parked("checked")?;
    let mut cli = io(Command::new("hugepoke")
        .args(["restore", &h.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn())?;
    // In its ioctl (x86-64 syscall 16), waiting for the target (a killable
    // wait shows as D).
    wait_for("the RESTORE to wait", Duration::from_secs(20), || {
        let at = |f: &str| std::fs::read_to_string(format!("/proc/{}/{f}", cli.id()));
        let in_ioctl = at("syscall").is_ok_and(|s| s.starts_with("16 "));
        Ok(in_ioctl && at("status").is_ok_and(|s| s.contains("State:\tD")))
    })?;
    kill_while_parked(&mut cli, &pause, "RESTORE")?;
    let evs: Vec<_> = events()?.into_iter().filter(|e| e.seq > seq).collect();
    ensure!(
        evs.iter()
            .any(|e| e.result == "-EINTR" && e.note.contains("waiting for the target")),
        "no EINTR journaled for the killed RESTORE: {evs:?}"
    );
    let (_, second) = patcher.finish(Duration::from_secs(30))?;
    let second = io(second)?;
    ensure!(
        io(dev.query(h))?.state == hugepoke::uapi::STATE_LIVE,
        "the killed RESTORE changed the patch"
    );
    io(dev.restore(h))?;
    io(dev.restore(second))?;
    Ok(())
}

/// A RESTORE of a batch whose second page fails in the write pass (the
/// target dropped that copy while the RESTORE was parked at `located`)
/// patches again the pages it had restored — but not one where another
/// tool had put the originals back already: that page stays restored and
/// its sites are forgotten.  The other page's copy is gone, so the next
/// RESTORE forgets it too.
pub(crate) fn restore_undo_leaves_a_page_another_tool_restored() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    warm(&mut t)?;
    let dev = std::sync::Arc::new(io(Device::open())?);
    let sites: Vec<_> = [80usize, 81]
        .iter()
        .map(|&p| {
            hugepoke::device::batch_site(t.page_addr(p), &text::mov_eax_ret(8000 + p as u32), None)
        })
        .collect();
    let h = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("batch: {e:?}"))?;
    ensure!(
        t.call(80)? == 8080 && t.call(81)? == 8081,
        "batch not running"
    );
    // Another tool restores page 80's site.
    let at = t.page_addr(80);
    write_mem(t.pid, at, &file_bytes(&t, at, 6)?)?;
    let seq = hugepoke::device::journal_seq();
    let pause = Pause::arm("located", t.pid)?;
    let (tx, rx) = mpsc::channel();
    let ours = dev.clone();
    std::thread::spawn(move || {
        let _ = tx.send(ours.restore(h));
    });
    pause.wait_parked("located")?;
    t.command("dontneed 81")?;
    pause.release()?;
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the parked RESTORE did not return")?;
    ensure!(
        matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EAGAIN)),
        "RESTORE returned {result:?}, want EAGAIN (page 81's copy went)"
    );
    ensure!(
        t.call(80)? == text::original_value(80),
        "the undo patched page 80 again over the originals another tool put back"
    );
    let evs: Vec<_> = events_of(h)?.into_iter().filter(|e| e.seq > seq).collect();
    ensure!(
        evs.iter()
            .any(|e| e.note.contains("restored and could not be re-patched")),
        "page 80 not forgotten: {:?}",
        steps(&evs)
    );
    ensure!(
        io(dev.query(h))?.count == 1,
        "the handle does not keep page 81 alone"
    );
    io(dev.restore(h))?;
    ensure!(t.call(81)? == text::original_value(81), "page 81");
    Ok(())
}

/// m8 at close: a CLI whose close-time restore waits behind an operation
/// that holds its target (a PATCH parked at `checked`) can be killed: it
/// exits while the target is still busy, the journal says its restore
/// goes on in the work item, and once the target is free the work
/// restores the CLI's patch.
pub(crate) fn a_closer_behind_a_busy_target_can_be_killed() -> TestResult {
    const PAGE: usize = 33;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let (mut cli, handle) = cli_patch(&t, PAGE, 3333)?;
    ensure!(t.call(PAGE)? == 3333, "CLI patch not running");
    let seq = hugepoke::device::journal_seq();
    let pause = Pause::arm("checked", t.pid)?;
    let patcher = Patcher::start(patch_req(&t, 34, 3434), None)?;
    pause.wait_parked("checked")?;
    // The CLI closes its file: its restore work waits for the target.
    drop(cli.stdin.take());
    wait_for(
        "the CLI to wait for its restore",
        Duration::from_secs(20),
        || {
            let status = std::fs::read_to_string(format!("/proc/{}/status", cli.id()));
            Ok(status.is_ok_and(|s| s.contains("State:\tD")))
        },
    )?;
    kill_while_parked(&mut cli, &pause, "closer")?;
    ensure!(
        events()?.iter().any(|e| e.seq > seq
            && e.result == "-EINTR"
            && e.note.contains("waiting for the restore at close")),
        "no EINTR journaled for the killed closer"
    );
    wait_for(
        "the work to restore the CLI's patch",
        Duration::from_secs(30),
        || {
            Ok(events_of(handle)?
                .iter()
                .any(|e| e.step == "restored" && e.result == "ok"))
        },
    )?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "the CLI's patch was not restored"
    );
    let (_, second) = patcher.finish(Duration::from_secs(30))?;
    drop(second);
    Ok(())
}

/// Park a RESTORE of a two-page batch at `forked` (only the target's own
/// lock held: the processes forked before are done, the target not yet
/// looked at), have the target fork a child there, release: `undo` is
/// RESTORE or the close of the file that made the patch.  The child's pid,
/// the handle, and what `undo` returned.
fn fork_during_restore(
    t: &mut Target,
    pages: [usize; 2],
    by_close: bool,
) -> Result<(i32, u64, std::io::Result<()>), String> {
    let dev = io(Device::open())?;
    let sites: Vec<_> = pages
        .iter()
        .map(|&p| {
            hugepoke::device::batch_site(t.page_addr(p), &text::mov_eax_ret(8200 + p as u32), None)
        })
        .collect();
    let h = dev
        .patch_batch(t.pid, &sites, 0)
        .map_err(|e| format!("batch: {e:?}"))?;
    let pause = Pause::arm("forked", t.pid)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = if by_close { Ok(()) } else { dev.restore(h) };
        // Closing restores what the file made (its patch, if still there).
        drop(dev);
        let _ = tx.send(result);
    });
    pause.wait_parked("forked")?;
    let child = fork_child(t)?;
    pause.release()?;
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the parked RESTORE did not return")?;
    Ok((child, h, result))
}

/// The target and the `child` it forked during RESTORE both run the
/// originals at `pages` again.
fn both_restored(t: &mut Target, child: i32, pages: [usize; 2]) -> TestResult {
    for p in pages {
        ensure!(
            t.call(p)? == text::original_value(p),
            "parent's page {p} not restored"
        );
        ensure!(
            read_mem(child, t.page_addr(p), 6)? == text::mov_eax_ret(text::original_value(p)),
            "the child forked during RESTORE still runs the patch at page {p}"
        );
    }
    Ok(())
}

/// The close-time restore, parked at `forked`, and a child forked there:
/// the target is restored whatever its children say, so RESTORE must break
/// COW for the target and never write into the page the child shares;
/// then one more forked pass restores the child in its own copy.
pub(crate) fn a_child_forked_during_restore_is_never_written_into() -> TestResult {
    const PAGES: [usize; 2] = [82, 83];
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let (child, h, result) = fork_during_restore(&mut t, PAGES, true)?;
    let checked = (|| {
        io(result)?;
        let evs = events_of(h)?;
        both_restored(&mut t, child, PAGES)?;
        // Its bytes came back by a pass of its own, not through the page
        // it shared with the target.
        ensure!(
            restored_as_forked(&evs, child),
            "RESTORE wrote into the page the child shares (the child had no pass of its own): {:?}",
            steps(&evs)
        );
        ensure!(
            cow_broken(&evs),
            "no COW break journaled: {:?}",
            steps(&evs)
        );
        Ok(())
    })();
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    checked
}

/// RESTORE, parked at `forked`; the target's copy paged out to swap and a
/// child forked there: the child maps the copy by a swap entry, which the
/// target's pass (it faults its copy back in) cannot count as another
/// mapping.  The copy is not exclusive, so COW is broken for the target
/// and one more forked pass finds the child and restores it; RESTORE
/// returns 0 only then.
pub(crate) fn a_child_forked_during_restore_with_its_copy_swapped_out_is_restored_too() -> TestResult
{
    const PAGE: usize = 86;
    let _swap = hugepoke::testkit::backing::Swap::on()?;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let h = io(dev.patch(&patch_req(&t, PAGE, 8686)))?;
    let pause = Pause::arm("forked", t.pid)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(dev.restore(h));
    });
    pause.wait_parked("forked")?;
    let paged = t.command(&format!("pageout {PAGE}"));
    let child = fork_child(&mut t);
    pause.release()?;
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the parked RESTORE did not return")?;
    let child = child?;
    let checked = (|| {
        let said = paged?;
        ensure!(said == "pageout ok", "pageout said {said:?}");
        io(result)?;
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "parent not restored"
        );
        ensure!(
            read_mem(child, t.page_addr(PAGE), 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the child forked during RESTORE by a swap entry still runs the patch"
        );
        let evs = events_of(h)?;
        ensure!(
            restored_as_forked(&evs, child),
            "the child's restore not journaled under its pid: {:?}",
            steps(&evs)
        );
        Ok(())
    })();
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    checked
}

/// As the test above, but the child forked at `forked` (by a swap entry)
/// also makes its text read-only, keeping its copy: the target's pass
/// restores the target, and the forked pass after it finds the child,
/// which refuses (EACCES).  The handle must not be forgotten while the
/// child runs the patch: every site is kept, and once the child's text is
/// executable again, a second RESTORE takes the patch back from it.
pub(crate) fn a_forked_refusal_after_the_targets_pass_keeps_the_patch() -> TestResult {
    const PAGE: usize = 95;
    let _swap = hugepoke::testkit::backing::Swap::on()?;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = std::sync::Arc::new(io(Device::open())?);
    let h = io(dev.patch(&patch_req(&t, PAGE, 9595)))?;
    let at = t.page_addr(PAGE);
    let pause = Pause::arm("forked", t.pid)?;
    let (tx, rx) = mpsc::channel();
    let ours = dev.clone();
    let restorer = std::thread::spawn(move || {
        let _ = tx.send(ours.restore(h));
    });
    pause.wait_parked("forked")?;
    let paged = t.command(&format!("pageout {PAGE}"));
    let child = fork_child(&mut t);
    let flipped = match &child {
        Ok(c) => flip_exec(*c, at, "r--p"),
        Err(e) => Err(e.clone()),
    };
    pause.release()?;
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the parked RESTORE did not return")?;
    // (Its clone of the device goes with it: the test closes the file.)
    let _ = restorer.join();
    drop(pause);
    let child = child?;
    let checked = (|| {
        let said = paged?;
        ensure!(said == "pageout ok", "pageout said {said:?}");
        flipped?;
        ensure!(
            result.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES),
            "RESTORE returned {result:?}, want EACCES"
        );
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "the target not restored"
        );
        ensure!(
            read_mem(child, at, 6)? == text::mov_eax_ret(9595),
            "the refusing child changed"
        );
        let q = dev
            .query(h)
            .map_err(|e| format!("the patch is forgotten after the forked refusal: {e}"))?;
        ensure!(
            q.state == hugepoke::uapi::STATE_FORKED_ONLY,
            "QUERY does not say the patch lives only in forked processes"
        );
        // The file closes: its restore refuses the same way, and the patch
        // is kept, persistent, the target left alone.
        let dev = std::sync::Arc::into_inner(dev).ok_or("the device is still shared")?;
        drop(dev);
        let dev = io(Device::open())?;
        let listed = proc::parse_patches(&io(proc::debugfs("patches"))?);
        let line = listed.iter().find(|l| l.handle == h);
        ensure!(
            line.is_some_and(|l| l.state == "forked-only" && l.owner == "persistent"),
            "after close, debugfs patches says {line:?}, want forked-only, persistent"
        );
        ensure!(
            t.call(PAGE)? == text::original_value(PAGE),
            "the close-time restore changed the target"
        );
        // Another tool writes into the restored target, the patch's very
        // bytes, and the target forks again: the retry must leave the
        // target alone, and the child it forked since (which runs the
        // other tool's bytes, not the patch).
        write_mem(t.pid, at, &text::mov_eax_ret(9595))?;
        let since = fork_child(&mut t)?;
        flip_exec(child, at, "r-xp")?;
        let retried = dev.restore(h);
        let theirs = read_mem(since, at, 6);
        // SAFETY: killing nothing but the target's child.
        unsafe { libc::kill(since, libc::SIGKILL) };
        io(retried).map_err(|e| format!("the second RESTORE: {e}"))?;
        ensure!(
            t.call(PAGE)? == 9595,
            "the retry wrote over another tool's bytes in the target"
        );
        ensure!(
            theirs? == text::mov_eax_ret(9595),
            "the retry wrote into a child the target forked after it was restored"
        );
        ensure!(
            read_mem(child, at, 6)? == text::mov_eax_ret(text::original_value(PAGE)),
            "the child still runs the patch after the second RESTORE"
        );
        Ok(())
    })();
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    checked
}

/// RESTORE, parked at `forked`, and a child forked there: the target's
/// pass sees its copy mapped by another process (under its mmap lock no
/// fork comes in), RESTORE's forked pass runs again and takes the patch
/// back from that child too; RESTORE returns 0 only then.
pub(crate) fn a_child_forked_during_restore_is_restored_too() -> TestResult {
    const PAGES: [usize; 2] = [84, 85];
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let (child, h, result) = fork_during_restore(&mut t, PAGES, false)?;
    let checked = (|| {
        io(result)?;
        both_restored(&mut t, child, PAGES)?;
        let s = io(proc::smaps_entry(child, t.addr))?;
        ensure!(
            s.kb("Anonymous") == 0,
            "the child's text after RESTORE: {s:?}"
        );
        let evs = events_of(h)?;
        ensure!(
            evs.iter()
                .any(|e| e.step == "restore" && e.note.contains("forked during RESTORE")),
            "the second forked pass not journaled: {:?}",
            steps(&evs)
        );
        Ok(())
    })();
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    checked
}

tests! {
    TESTS: [
        execve_during_patch_never_patches_the_new_image,
        expect_is_checked_in_the_step_that_writes,
        cli_patch_writes_only_over_the_bytes_it_checked,
        killed_patch_and_batch_change_nothing,
    ];
    WORKERS: [
        a_parked_patch_does_not_stall_other_targets,
        last_mm_reference_is_dropped_by_a_worker,
        restore_drains_lru_batches_once_and_unlocked,
        close_restores_even_when_the_closer_is_killed,
        failed_patch_after_its_split_gives_the_pmd_back,
        restore_after_the_target_dropped_its_copy_collapses,
        restore_after_a_drop_and_a_move_collapses_where_the_text_is,
        restore_after_a_drop_collapses_the_text_not_another_view,
        killed_batch_is_undone_by_a_worker,
        killed_batch_leaves_a_copy_it_found_there,
        a_restore_behind_a_busy_target_can_be_killed,
        restore_undo_leaves_a_page_another_tool_restored,
        a_closer_behind_a_busy_target_can_be_killed,
        a_child_forked_during_restore_is_never_written_into,
        a_child_forked_during_restore_is_restored_too,
        a_child_forked_during_restore_with_its_copy_swapped_out_is_restored_too,
        a_forked_refusal_after_the_targets_pass_keeps_the_patch,
    ];
}
