//! PATCH_FILE and `hugepoke patch --file`: one patch of a file's text in
//! every process that maps it, all or none, under one handle; checked by
//! what each process runs, smaps, QUERY and the journal.

use crate::cli::hugepoke;
use crate::common::*;
use crate::hardening::expect_errno;
use crate::races::Pause;
use crate::TestResult;
use hugepoke::device::batch_site;
use hugepoke::uapi::{self, PatchFileArgs};

/// The page the tests patch, and its offset in the text file.
const PAGE: usize = 7;
const OFFSET: u64 = (PAGE * 4096) as u64;

/// Two unrelated processes that map the same THP text file; the file.
fn two_mappers(name: &str) -> Result<(String, Target, Target), String> {
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let path = format!("{thp_dir}/{name}");
    io(std::fs::write(&path, text::blob()))?;
    let a = Target::spawn(&["--file", &path])?;
    let b = Target::spawn(&["--file", &path])?;
    let head = thp_head(&a)?;
    ensure!(thp_head(&b)? == head, "not one page-cache THP");
    // Patched (and undone) in pid order.
    Ok(if a.pid < b.pid {
        (path, a, b)
    } else {
        (path, b, a)
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Each runs `value` at PAGE, and holds an anonymous copy of that page alone.
fn runs(ts: &mut [&mut Target], value: u32, anon_kb: u64) -> TestResult {
    for t in ts.iter_mut() {
        let now = t.call(PAGE)?;
        ensure!(now == value, "pid {} runs {now}, want {value}", t.pid);
        let s = smaps(t)?;
        ensure!(s.kb("Anonymous") == anon_kb, "pid {}: {s:?}", t.pid);
    }
    Ok(())
}

/// Each has its PMD back: PMD-mapped, no anonymous page.
fn pmd_back(ts: &mut [&mut Target]) -> TestResult {
    for t in ts.iter_mut() {
        wait_pmd_mapped(t, Duration::from_secs(30))?;
        let s = smaps(t)?;
        ensure!(
            s.pmd_mapped_kb() == 2048 && s.kb("Anonymous") == 0,
            "pid {}: {s:?}",
            t.pid
        );
    }
    Ok(())
}

/// `hugepoke patch --file --dry-run` names both processes and changes
/// nothing; `--persist` patches both under one handle, which QUERY shows
/// as a site in each process; RESTORE of that handle gives both their
/// bytes and their PMD back.  Without `--persist`, closing restores both.
pub(crate) fn patch_file_reaches_every_process_and_restore_takes_it_back() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let (path, mut a, mut b) = two_mappers("shared-patch.bin")?;
    let orig = text::original_value(PAGE);
    let off = format!("{OFFSET:#x}");
    let bytes = hex(&text::mov_eax_ret(4242));
    let args = [
        "patch", "--file", &path, "--offset", &off, "--bytes", &bytes,
    ];
    let (code, out, err) = hugepoke(&[&args[..], &["--dry-run"]].concat())?;
    let want = format!("would patch 2 processes: {} {}", a.pid, b.pid);
    ensure!(
        code == 0 && out.contains(&want),
        "dry run exited {code}: {out}{err}"
    );
    runs(&mut [&mut a, &mut b], orig, 0)?;

    let (code, out, err) = hugepoke(&[&args[..], &["--persist"]].concat())?;
    ensure!(
        code == 0 && err.contains("patched 2 processes"),
        "patch --file exited {code}: {out}{err}"
    );
    let handle: u64 = out
        .trim()
        .parse()
        .map_err(|_| format!("no handle: {out}"))?;
    runs(&mut [&mut a, &mut b], 4242, 4)?;
    let dev = io(Device::open())?;
    let (q0, q1) = (
        io(dev.query_site(handle, 0))?,
        io(dev.query_site(handle, 1))?,
    );
    ensure!(
        q0.count == 2 && [q0.pid, q1.pid] == [a.pid, b.pid],
        "QUERY of the file's handle: {q0:?} {q1:?}"
    );
    ensure!(
        q0.addr == a.page_addr(PAGE) && q1.addr == b.page_addr(PAGE),
        "QUERY addresses {:#x} {:#x}",
        q0.addr,
        q1.addr
    );
    let (_, list, _) = hugepoke(&["list"])?;
    let want = format!("pids {} {}", a.pid, b.pid);
    ensure!(
        list.lines().any(
            |l| l.starts_with(&format!("# file patch {handle} persistent: handles "))
                && l.ends_with(&want)
        ),
        "list does not show the file patch's processes: {list}"
    );
    let (_, query, _) = hugepoke(&["query", &handle.to_string()])?;
    for t in [&a, &b] {
        ensure!(
            query.contains(&format!("pid={} addr={:#x}", t.pid, t.page_addr(PAGE))),
            "query: {query}"
        );
    }
    let (code, _, err) = hugepoke(&["restore", &handle.to_string()])?;
    ensure!(code == 0, "restore: {err}");
    runs(&mut [&mut a, &mut b], orig, 0)?;
    pmd_back(&mut [&mut a, &mut b])?;
    ensure!(
        !io(proc::debugfs("files"))?
            .lines()
            .any(|l| l.starts_with(&format!("{handle} "))),
        "the file handle outlived its RESTORE"
    );
    expect_errno(
        "QUERY after RESTORE",
        dev.query(handle),
        libc::ENOENT,
        "no such patch",
    )?;

    // Held by the CLI until its stdin closes; closing restores both.
    let mut cli = io(std::process::Command::new("hugepoke")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn())?;
    let mut line = String::new();
    io(std::io::BufRead::read_line(
        &mut std::io::BufReader::new(cli.stdout.take().ok_or("no stdout")?),
        &mut line,
    ))?;
    ensure!(
        line.trim().parse::<u64>().is_ok(),
        "held patch --file said {line:?}"
    );
    runs(&mut [&mut a, &mut b], 4242, 4)?;
    drop(cli.stdin.take());
    io(cli.wait())?;
    runs(&mut [&mut a, &mut b], orig, 0)?;
    let files = io(proc::debugfs("files"))?;
    ensure!(
        files.lines().count() == 1,
        "file handles left after close: {files}"
    );
    pmd_back(&mut [&mut a, &mut b])?;

    // --sites with --file: numbers are file offsets.
    let sites = format!("{path}.sites");
    let line = |page: usize, v| format!("{:#x} {}\n", page * 4096, hex(&text::mov_eax_ret(v)));
    io(std::fs::write(
        &sites,
        line(PAGE, 4242) + &line(PAGE + 2, 4343),
    ))?;
    let (code, out, err) = hugepoke(&["patch", "--file", &path, "--sites", &sites, "--persist"])?;
    ensure!(code == 0, "patch --file --sites exited {code}: {out}{err}");
    for t in [&mut a, &mut b] {
        let now = (t.call(PAGE)?, t.call(PAGE + 2)?);
        ensure!(
            now == (4242, 4343),
            "pid {} runs {now:?} after --sites",
            t.pid
        );
    }
    let (code, _, err) = hugepoke(&["restore", out.trim()])?;
    ensure!(code == 0, "restore: {err}");
    runs(&mut [&mut a, &mut b], orig, 0)?;
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&sites);
    Ok(())
}

/// All or none: the second process (by pid) holds another tool's change
/// at the site, so it refuses (EILSEQ: not the file's bytes); the first,
/// already patched, is restored, and the other tool's change is kept.
pub(crate) fn patch_file_is_all_or_none() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let (path, mut a, b) = two_mappers("shared-all-or-none.bin")?;
    let at = b.page_addr(PAGE);
    let file = file_bytes(&b, at, 1)?;
    write_mem(b.pid, at, &[!file[0]])?;
    let off = format!("{OFFSET:#x}");
    let bytes = hex(&text::mov_eax_ret(4242));
    let args = [
        "patch",
        "--file",
        &path,
        "--offset",
        &off,
        "--bytes",
        &bytes,
        "--persist",
    ];
    let (code, out, err) = hugepoke(&args)?;
    ensure!(
        code == 1 && err.contains(&format!("pid {}", b.pid)) && err.contains("EILSEQ"),
        "patch --file over another tool's change exited {code}: {out}{err}"
    );
    ensure!(
        events()?
            .iter()
            .any(|e| e.note == "a process refused or failed: the file's patch is undone"),
        "the undo is not journaled"
    );
    runs(&mut [&mut a], text::original_value(PAGE), 0)?;
    ensure!(
        read_mem(b.pid, at, 1)? == [!file[0]],
        "the other tool's change was lost"
    );
    let live = proc::parse_patches(&io(proc::debugfs("patches"))?);
    ensure!(
        !live.iter().any(|p| p.pid == a.pid || p.pid == b.pid),
        "patches left after the refusal: {live:?}"
    );
    pmd_back(&mut [&mut a])?;
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// PATCH_FILE with `args` (its `fd` and `sites` filled in here).
fn patch_file(
    dev: &Device,
    file: &std::fs::File,
    sites: &[uapi::BatchSite],
    mut args: PatchFileArgs,
) -> std::io::Result<PatchFileArgs> {
    use std::os::fd::AsRawFd;
    let mut pids = [0i32; 4];
    args.size = std::mem::size_of::<PatchFileArgs>() as u32;
    args.fd = args.fd.max(file.as_raw_fd());
    args.count = args.count.max(sites.len() as u32);
    args.sites = sites.as_ptr() as u64;
    args.pids = pids.as_mut_ptr() as u64;
    dev.ioctl(uapi::IOCTL_PATCH_FILE, &mut args).map(|()| args)
}

/// Bad input is refused with its errno and reason, and changes nothing:
/// no CAP_SYS_ADMIN, a bad fd, a directory, a site past EOF, unknown
/// flags, more sites than a batch holds, no room for the pids, a file nobody maps, and a process that
/// maps the site's page at two addresses.
pub(crate) fn patch_file_refuses_bad_input_with_a_reason() -> TestResult {
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let dev = io(Device::open())?;
    let file = io(std::fs::File::open(&t.file))?;
    let site = [batch_site(OFFSET, &text::mov_eax_ret(4242), None)];
    let ok = PatchFileArgs {
        max_pids: 4,
        ..Default::default()
    };
    let code = helper_exit_code(&["patch-file-as-nobody", &t.file])?;
    ensure!(
        code == libc::EPERM,
        "PATCH_FILE as nobody: {code}, want EPERM"
    );
    let cases: [(&str, PatchFileArgs, &[uapi::BatchSite], i32, &str); 5] = [
        (
            "bad fd",
            PatchFileArgs { fd: 999, ..ok },
            &site,
            libc::EBADF,
            "not an open file",
        ),
        (
            "unknown flags",
            PatchFileArgs {
                flags: 1 << 20,
                ..ok
            },
            &site,
            libc::EINVAL,
            "unknown flag bits",
        ),
        (
            "no room for the pids",
            PatchFileArgs { max_pids: 0, ..ok },
            &site,
            libc::E2BIG,
            "room",
        ),
        (
            "more sites than a batch holds",
            PatchFileArgs {
                count: uapi::MAX_BATCH as u32 + 1,
                ..ok
            },
            &site,
            libc::EINVAL,
            "a batch holds 1 to 16384 sites",
        ),
        (
            "a site past EOF",
            ok,
            &[batch_site(4 << 20, &[0xcc], None)],
            libc::ENXIO,
            "past the end of the file",
        ),
    ];
    for (what, args, sites, errno, why) in cases {
        expect_errno(what, patch_file(&dev, &file, sites, args), errno, why)?;
    }
    let dir = io(std::fs::File::open("/tmp"))?;
    expect_errno(
        "a directory",
        patch_file(&dev, &dir, &site, ok),
        libc::EINVAL,
        "not a regular file",
    )?;
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let lonely = &format!("{thp_dir}/nobody-maps.bin");
    io(std::fs::write(lonely, vec![0x90u8; 65536]))?;
    let nobody = io(std::fs::File::open(lonely))?;
    expect_errno(
        "a file nobody maps",
        patch_file(&dev, &nobody, &site, ok),
        libc::ESRCH,
        "no process maps",
    )?;
    let _ = std::fs::remove_file(lonely);
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE),
        "a refusal changed the text"
    );
    let said = t.command("map-again")?;
    ensure!(said.starts_with("mapped-again"), "map-again said {said:?}");
    expect_errno(
        "mapped twice",
        patch_file(&dev, &file, &site, ok),
        libc::EINVAL,
        "two addresses",
    )?;
    ensure!(
        t.call(PAGE)? == text::original_value(PAGE) && smaps(&t)?.kb("Anonymous") == 0,
        "a refusal changed the text"
    );
    Ok(())
}

/// What the walk found is held to under each process's own locks: the
/// second process, parked after the walk (PATCH_FILE at `walked`), maps another file
/// (same bytes) over its text at the same address; its PATCH is refused
/// (EAGAIN) rather than written into that other file's page, and the
/// first process is restored.
pub(crate) fn patch_file_never_writes_into_another_file_mapped_since_the_walk() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let (path, mut a, mut b) = two_mappers("shared-swapped.bin")?;
    let site = batch_site(OFFSET, &text::mov_eax_ret(4242), None);
    let result = parked_file_patch(&path, site, b.pid, || {
        let said = b.command("remap-text")?;
        ensure!(said == "remapped-text", "remap-text said {said:?}");
        Ok(())
    })?;
    expect_errno(
        "PATCH_FILE over a swapped text",
        result.map_err(|e| e.batch.error),
        libc::EAGAIN,
        "moved in this process",
    )?;
    runs(&mut [&mut a], text::original_value(PAGE), 0)?;
    ensure!(
        b.call(PAGE)? == text::original_value(PAGE) && smaps(&b)?.kb("Anonymous") == 0,
        "the other file's text was written"
    );
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// A file patch whose RESTORE one process refuses (another tool changed
/// its copy since): the others are restored, that process stays under the
/// handle (debugfs `files`, QUERY) and RESTORE says why; once the change
/// is gone, RESTORE finishes and the handle goes.  Before that: a child
/// forked from one of them is named by QUERY_FORKED, and nobody holding a
/// root-opened fd may QUERY, drop or RESTORE the handle.  RESTORE_DROP of
/// a file handle forgets every process's patch and writes nothing.
pub(crate) fn patch_file_restore_keeps_a_process_that_refuses() -> TestResult {
    let _khugepaged = khugepaged_asleep()?;
    let (path, mut a, mut b) = two_mappers("shared-refuses.bin")?;
    let dev = io(Device::open())?;
    let file = io(std::fs::File::open(&path))?;
    let site = [batch_site(OFFSET, &text::mov_eax_ret(4242), None)];
    let patch = || {
        dev.patch_file(&file, &site, uapi::PATCH_PERSIST)
            .map(|(h, _)| h)
            .map_err(|e| format!("PATCH_FILE: {e}"))
    };
    let h = patch()?;
    let child = fork_child(&mut b)?;
    let forked = io(dev.query_forked(h));
    // SAFETY: killing nothing but the target's child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    ensure!(
        forked.as_deref() == Ok(&[child][..]),
        "QUERY_FORKED of the file handle: {forked:?}, want [{child}]"
    );
    let out = io(helper(&["file-handle-as-nobody", &h.to_string()])?.output())?;
    let said = String::from_utf8_lossy(&out.stdout);
    let eperm = libc::EPERM.to_string();
    for key in ["forked", "query", "drop", "restore"] {
        ensure!(
            said.split_whitespace()
                .any(|w| w == format!("{key}={eperm}")),
            "nobody holding root's fd: {said}, want EPERM for {key}"
        );
    }
    runs(&mut [&mut a, &mut b], 4242, 4)?;

    let at = b.page_addr(PAGE);
    write_mem(b.pid, at, &text::mov_eax_ret(77))?;
    let refused = dev.restore(h);
    ensure!(
        refused.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EILSEQ),
        "RESTORE over b's change: {refused:?}"
    );
    ensure!(
        a.call(PAGE)? == text::original_value(PAGE) && b.call(PAGE)? == 77,
        "after the refused RESTORE"
    );
    let files = io(proc::debugfs("files"))?;
    let line = files
        .lines()
        .find(|l| l.starts_with(&format!("{h} ")))
        .ok_or(format!("the handle left `files`: {files}"))?;
    ensure!(
        line.split_whitespace().count() == 3,
        "`files` should hold b's patch alone: {line}"
    );
    let q = io(dev.query(h))?;
    ensure!(
        q.count == 1 && q.pid == b.pid,
        "QUERY after the refusal: {q:?}"
    );
    write_mem(b.pid, at, &text::mov_eax_ret(4242))?;
    io(dev.restore(h))?;
    runs(&mut [&mut a, &mut b], text::original_value(PAGE), 0)?;
    ensure!(
        io(proc::debugfs("files"))?.lines().count() == 1,
        "the handle outlived its RESTORE"
    );

    let h = patch()?;
    io(dev.restore_flags(h, uapi::RESTORE_DROP))?;
    runs(&mut [&mut a, &mut b], 4242, 4)?;
    let live = proc::parse_patches(&io(proc::debugfs("patches"))?);
    ensure!(
        !live.iter().any(|p| p.pid == a.pid || p.pid == b.pid)
            && io(proc::debugfs("files"))?.lines().count() == 1,
        "RESTORE_DROP left patches: {live:?}"
    );
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Only others' private executable mappings count: a process that maps
/// the file read-only and the caller itself (which maps it read+exec) are
/// not patched; a process that maps some of the sites' pages but not all
/// refuses the whole call (it would be half patched), named in `failed_pid`.
pub(crate) fn patch_file_reaches_only_whole_private_executable_mappings_of_others() -> TestResult {
    let (path, mut a, mut b) = two_mappers("shared-mappers.bin")?;
    let mut c = Target::spawn(&["--file", &path])?;
    ensure!(
        c.command("protect r")?.starts_with("protected"),
        "protect r"
    );
    let file = io(std::fs::File::open(&path))?;
    // SAFETY: a fresh private read+exec mapping of the file in this
    // process, unmapped below; nothing runs it.
    let own = unsafe {
        use std::os::fd::AsRawFd;
        libc::mmap(
            std::ptr::null_mut(),
            2 << 20,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    ensure!(own != libc::MAP_FAILED, "mmap of the file here");
    let dev = io(Device::open())?;
    let site = |page: usize| batch_site((page * 4096) as u64, &text::mov_eax_ret(4242), None);
    let dry = dev.patch_file(&file, &[site(PAGE)], uapi::FILE_DRY_RUN);
    // SAFETY: our own mapping from above.
    unsafe { libc::munmap(own, 2 << 20) };
    let pids = dry.map_err(|e| format!("dry run: {e}"))?.1;
    ensure!(
        pids == [a.pid, b.pid],
        "dry run named {pids:?}, want [{}, {}] (not {} read-only, nor the caller)",
        a.pid,
        b.pid,
        c.pid
    );
    ensure!(b.command("unmap 9")? == "unmap 9 0", "unmap 9");
    let partial = dev.patch_file(&file, &[site(PAGE), site(9)], uapi::PATCH_PERSIST);
    ensure!(
        partial.as_ref().err().is_some_and(
            |e| e.pid == Some(b.pid) && e.batch.error.raw_os_error() == Some(libc::EINVAL)
        ),
        "a process mapping the file but not page 9: {partial:?}"
    );
    ensure!(
        crate::hardening::last_failure()?
            .note
            .contains("not every site's page"),
        "journal: {:?}",
        crate::hardening::last_failure()?
    );
    runs(&mut [&mut a, &mut b], text::original_value(PAGE), 0)?;
    drop((a, b, c));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// PATCH_FILE of `site` with PATCH_PERSIST in a thread, parked at
/// `walked` before it patches `parked` (the process after the first); `then`
/// runs while it is parked.  What the call returned.
fn parked_file_patch(
    path: &str,
    site: uapi::BatchSite,
    parked: i32,
    then: impl FnOnce() -> TestResult,
) -> Result<Result<(u64, Vec<i32>), hugepoke::device::FileError>, String> {
    let dev = io(Device::open())?;
    let file = io(std::fs::File::open(path))?;
    let pause = Pause::arm("walked", parked)?;
    std::thread::scope(|s| {
        let call = s.spawn(|| dev.patch_file(&file, &[site], uapi::PATCH_PERSIST));
        let done = pause.wait_parked("walked").and_then(|_| then());
        let _ = pause.release();
        let result = call.join().map_err(|_| "PATCH_FILE panicked".to_string())?;
        done?;
        Ok(result)
    })
}

/// The process the walk found is the one patched: the second process,
/// parked after the walk, `execve()`s a new image that maps the same file
/// at the same address; PATCH_FILE refuses it (EAGAIN) instead of patching
/// a process it never walked, and the first is restored.
pub(crate) fn patch_file_refuses_a_process_that_execd_since_the_walk() -> TestResult {
    const AT: &str = "0x200000000000";
    let thp_dir = std::env::var("HUGEPOKE_THP_DIR").map_err(|_| "HUGEPOKE_THP_DIR not set")?;
    let path = format!("{thp_dir}/shared-exec.bin");
    io(std::fs::write(&path, text::blob()))?;
    let mut a = Target::spawn(&["--file", &path])?;
    let mut b = Target::spawn(&["--file", &path, "--at", AT])?;
    if b.pid < a.pid {
        return Err("SKIP: pids wrapped (the exec'ing process must come second)".into());
    }
    let exe = io(std::env::current_exe())?.with_file_name("thp-target");
    let exe = exe.to_str().ok_or("exe path")?.to_string();
    let site = batch_site(OFFSET, &text::mov_eax_ret(4242), None);
    let result = parked_file_patch(&path, site, b.pid, || {
        b.exec(&exe, &["--file", &path, "--at", AT])
    })?;
    let e = result
        .err()
        .ok_or("PATCH_FILE patched a process it never walked")?;
    ensure!(
        e.batch.error.raw_os_error() == Some(libc::EAGAIN) && e.pid == Some(b.pid),
        "PATCH_FILE: {e}"
    );
    let f = crate::hardening::last_failure()?;
    ensure!(
        f.note.contains("not the one the file's walk found"),
        "journal {f:?}"
    );
    runs(&mut [&mut a, &mut b], text::original_value(PAGE), 0)?;
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// RESTORE of a file handle while PATCH_FILE is still making it (parked
/// after the first process) is EBUSY: the handle is not taken apart under
/// the call, which then returns it whole.
pub(crate) fn patch_file_handle_is_not_restored_while_being_made() -> TestResult {
    let (path, mut a, mut b) = two_mappers("shared-building.bin")?;
    let dev = io(Device::open())?;
    let site = batch_site(OFFSET, &text::mov_eax_ret(4242), None);
    let mut early = None;
    let result = parked_file_patch(&path, site, b.pid, || {
        let files = io(proc::debugfs("files"))?;
        let h: u64 = files
            .lines()
            .find(|l| !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .ok_or(format!("no file handle in `files`: {files}"))?;
        early = Some(dev.restore(h));
        Ok(())
    })?;
    let (h, pids) = result.map_err(|e| format!("PATCH_FILE: {e}"))?;
    let early = early.ok_or("no early RESTORE")?;
    ensure!(
        early.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EBUSY),
        "RESTORE while being made: {early:?}"
    );
    ensure!(pids == [a.pid, b.pid], "patched {pids:?}");
    runs(&mut [&mut a, &mut b], 4242, 4)?;
    io(dev.restore(h))?;
    runs(&mut [&mut a, &mut b], text::original_value(PAGE), 0)?;
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// A PATCH_FILE whose caller is killed after the first process was patched
/// (parked after it): the dying caller's undo would fail, so a work item
/// restores the first process; nothing is left patched and no handle.
pub(crate) fn killed_patch_file_leaves_nothing_patched() -> TestResult {
    let (path, mut a, b) = two_mappers("shared-killed.bin")?;
    let pause = Pause::arm("walked", b.pid)?;
    let off = format!("{OFFSET:#x}");
    let bytes = hex(&text::mov_eax_ret(4242));
    let mut cli = io(std::process::Command::new("hugepoke")
        .args([
            "patch",
            "--file",
            &path,
            "--offset",
            &off,
            "--bytes",
            &bytes,
            "--persist",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn())?;
    pause.wait_parked("walked")?;
    ensure!(
        a.call(PAGE)? == 4242,
        "the first process is not patched yet"
    );
    io(cli.kill())?;
    io(cli.wait())?;
    drop(pause);
    wait_for(
        "the first process restored",
        Duration::from_secs(30),
        || Ok(a.call(PAGE)? == text::original_value(PAGE)),
    )?;
    let live = proc::parse_patches(&io(proc::debugfs("patches"))?);
    ensure!(
        !live.iter().any(|p| p.pid == a.pid || p.pid == b.pid),
        "patches left: {live:?}"
    );
    ensure!(
        io(proc::debugfs("files"))?.lines().count() == 1,
        "a file handle left"
    );
    drop((a, b));
    let _ = std::fs::remove_file(&path);
    Ok(())
}

tests! {
    TESTS: [
        patch_file_reaches_every_process_and_restore_takes_it_back,
        patch_file_is_all_or_none,
        patch_file_refuses_bad_input_with_a_reason,
        patch_file_never_writes_into_another_file_mapped_since_the_walk,
        patch_file_restore_keeps_a_process_that_refuses,
        patch_file_reaches_only_whole_private_executable_mappings_of_others,
        patch_file_refuses_a_process_that_execd_since_the_walk,
        patch_file_handle_is_not_restored_while_being_made,
        killed_patch_file_leaves_nothing_patched,
    ];
}
