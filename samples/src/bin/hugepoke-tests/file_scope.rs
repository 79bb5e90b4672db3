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
    let _khugepaged = KhugepagedAsleep::new()?;
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
    let _khugepaged = KhugepagedAsleep::new()?;
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
/// flags, no room for the pids, a file nobody maps, and a process that
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
    let cases: [(&str, PatchFileArgs, &[uapi::BatchSite], i32, &str); 4] = [
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
    let _khugepaged = KhugepagedAsleep::new()?;
    let (path, mut a, mut b) = two_mappers("shared-swapped.bin")?;
    let dev = io(Device::open())?;
    let file = io(std::fs::File::open(&path))?;
    let site = [batch_site(OFFSET, &text::mov_eax_ret(4242), None)];
    let args = PatchFileArgs {
        max_pids: 4,
        flags: uapi::PATCH_PERSIST,
        ..Default::default()
    };
    let pause = Pause::arm("walked", b.pid)?;
    let result = std::thread::scope(|s| {
        let call = s.spawn(|| patch_file(&dev, &file, &site, args));
        let swapped = pause
            .wait_parked("walked")
            .and_then(|_| b.command("remap-text"));
        let _ = pause.release();
        let result = call.join().map_err(|_| "PATCH_FILE panicked".to_string())?;
        ensure!(swapped? == "remapped-text", "remap-text failed");
        Ok::<_, String>(result)
    })?;
    expect_errno(
        "PATCH_FILE over a swapped text",
        result,
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

tests! {
    TESTS: [
        patch_file_reaches_every_process_and_restore_takes_it_back,
        patch_file_is_all_or_none,
        patch_file_refuses_bad_input_with_a_reason,
        patch_file_never_writes_into_another_file_mapped_since_the_walk,
    ];
}
