//! A process whose text lives on a file THP.
//!
//! It writes the 2 MiB code blob (see `hugepoke::testkit::text`) to a file — on a
//! tmpfs mounted `huge=always` that gives one PMD-sized folio — maps it
//! 2 MiB-aligned `PROT_READ|PROT_EXEC, MAP_PRIVATE`, calls into it so the
//! PMD is faulted in, prints `ready pid=P addr=A file=F`, and then answers
//! commands on stdin, one per line:
//!
//!   call N   → prints `N VALUE`, what the function at page N returns now
//!   write N  → writes to text page N (the mapping is read-only: SIGSEGV)
//!   fork     → forks a child that sleeps until killed; prints `child PID`.
//!              The child forks a grandchild on SIGUSR1 and flips its
//!              text between read+exec and read-only on SIGUSR2
//!   clone-parent → the same child made with clone(CLONE_PARENT): our
//!              parent is its parent; prints `child PID`
//!   clone-vm → makes a process that shares our memory (clone(CLONE_VM),
//!              not a thread); prints `peer PID`
//!   peer-fork → that peer forks a child that sleeps; prints `child PID`
//!   unsubreaper → stops being a child subreaper (see `--subreaper`);
//!              prints `unsubreaper RC`
//!   exec     → replaces itself with `sleep 1000`
//!   hog MIB  → a thread keeps our mmap lock write-locked most of the time
//!              (mprotect() of MIB MiB of 4 KiB pages, back and forth)
//!   calm     → stops the --chaos and hog threads, makes the text whole again
//!   move     → mremap()s the text to another 2 MiB-aligned address;
//!              prints `moved ADDR`
//!   map-again → maps the text file a second time, elsewhere (as the
//!              first: private, read+exec); prints `mapped-again ADDR`
//!   protect P → mprotect()s the whole text to P (`rx`, `rwx` or `r`)
//!   unmap N  → munmap()s text page N (the rest stays mapped); prints
//!              `unmap N RC`
//!   dontneed N → madvise(MADV_DONTNEED) of text page N
//!   warm     → maps in every page of every mapping (mlockall, then
//!              munlockall), so that answering later commands takes no
//!              fault that needs the mmap lock: a test can then have us
//!              `dontneed` while a parked PATCH holds that lock
//!   guard N  → madvise(MADV_GUARD_INSTALL) of text page N; prints
//!              `guard N RC`
//!   pageout N → pages text page N out to swap (MADV_PAGEOUT, after an
//!              LRU drain through drop_caches, so as root); prints
//!              `pageout ok` once pagemap shows it swapped
//!   remap-text → maps, over the text at the same address, another file
//!              holding the same code (private, read+exec); prints
//!              `remapped-text`
//!   dontunmap → mremap()s the text's first 64 pages to a new address
//!              with MREMAP_DONTUNMAP: a second mapping of them with the
//!              same anon_vma (the old range stays, empty); prints
//!              `dontunmapped ADDR`
//!   remap-same → maps the text's own file again over the text, at the
//!              same address (a new mapping: its copies are gone); prints
//!              `remapped-same`
//!   remap-data N → unmaps the text, maps another file private and writable
//!              at the same address and writes 0x22 at byte 100 of page N
//!   watch N CPU → a thread pinned to CPU keeps calling page N's function
//!              and logs, in a shared memfd (`text::Watch`), its iteration
//!              count and every change of the value it returns; prints
//!              `watching fd=FD` (open it as /proc/PID/fd/FD)
//!   exec-suid PATH FDS [ARG...] → opens FDS close-on-exec descriptors
//!              (closing them makes execve() slow) and execs PATH ARG...
//!   quit     → exits (so does end of input)
//!
//! With `--at ADDR`, the text is mapped at ADDR (2 MiB-aligned), so that
//! an image exec'd with the same arguments has its text where this one had.
//! With `--no-huge`, the text is advised MADV_NOHUGEPAGE instead of
//! MADV_HUGEPAGE (a page cache of small folios stays small: khugepaged
//! leaves it alone).
//! With `--subreaper`, it is a child subreaper (PR_SET_CHILD_SUBREAPER):
//! the orphans of its children's children are given to it.
//! With `--spin`, a thread keeps calling page 0's function, so the text is hot.
//! With `--check-threads N --check-pages P`, N threads keep calling the
//! functions of pages 0..P and abort (exit 3) if one ever returns anything
//! but its original value or its stress value (`text::stress_value`): a
//! torn instruction would show as that, or as SIGSEGV/SIGILL.  With
//! `--check-state FD` too (a `check_state` memfd the controller shares),
//! they also exit (4) if a call made wholly after a PATCH or RESTORE
//! returned still runs the code from before it, more than
//! `check_state::MISSES_ALLOWED` times in a row, and confirm every state
//! they saw right (see `hugepoke::testkit::check_state`).
//! With `--chaos`, a thread keeps racing the kernel on the pages the
//! checkers run (0..P): it `madvise(MADV_DONTNEED)`s them (dropping any
//! patched anonymous page: counted in the check state) and flips them
//! between read+exec and read+write+exec with `mprotect()` (splitting and
//! merging the VMA, making it briefly writable: PATCH and RESTORE must
//! refuse then); and flips pages P..P+4, which no checker runs, between
//! read-only and read+exec; `calm` stops it.

use hugepoke::testkit::check_state;
use hugepoke::testkit::text::{self, PAGE, THP_SIZE};
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;

fn die(msg: &str) -> ! {
    eprintln!("thp-target: {msg}: {}", std::io::Error::last_os_error());
    std::process::exit(1)
}

static CHAOS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static HOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The text's address, for a forked child's SIGUSR2.
static TEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Whether a forked child's text is read-only now (SIGUSR2 flips it).
static TEXT_NO_EXEC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// vmsplice text page `n` into a pipe that stays open (leaked): the page
/// has a reference beyond its mappings' while we live.
fn pin_in_pipe(base: usize, n: usize) -> String {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into our array; vmsplice(2) of our own mapped page.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return format!("error: pipe: {}", std::io::Error::last_os_error());
        }
        let iov = libc::iovec {
            iov_base: (base + n * PAGE) as *mut libc::c_void,
            iov_len: PAGE,
        };
        let spliced = libc::vmsplice(fds[1], &iov, 1, 0);
        if spliced != PAGE as isize {
            return format!(
                "error: vmsplice: {spliced} {}",
                std::io::Error::last_os_error()
            );
        }
    }
    format!("pinned {n}")
}

/// A forked child's SIGUSR1: fork a grandchild that only sleeps (the
/// test finds it in /proc/PID/task/PID/children).
extern "C" fn fork_on_signal(_: libc::c_int) {
    // SAFETY: fork() and pause() are async-signal-safe.
    unsafe {
        if libc::fork() == 0 {
            loop {
                libc::pause();
            }
        }
    }
}

/// A forked child's SIGUSR2: flip its whole text between read+exec and
/// read-only (its copies stay; only the mapping's protection changes).
extern "C" fn flip_text_exec(_: libc::c_int) {
    use std::sync::atomic::Ordering::Relaxed;
    let no_exec = !TEXT_NO_EXEC.load(Relaxed);
    let prot = if no_exec {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_EXEC
    };
    // SAFETY: mprotect() of our own text mapping (the child runs no code
    // there); it is a plain system call, async-signal-safe.
    if unsafe { libc::mprotect(TEXT.load(Relaxed) as *mut libc::c_void, THP_SIZE, prot) } == 0 {
        TEXT_NO_EXEC.store(no_exec, Relaxed);
    }
}

/// Fork a child that only sleeps, forks a grandchild on SIGUSR1 and flips
/// its text's exec permission on SIGUSR2; its pid.  With `clone_parent`,
/// the child is made with clone(CLONE_PARENT): our parent is its parent
/// too.  Both signals stay blocked across the fork until the child's
/// handlers are in place: a signal sent as soon as the pid is known would
/// otherwise kill it (the default action).
fn fork_sleeper(clone_parent: bool) -> i32 {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset fill it in.
    let mut usr: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: blocking SIGUSR1 and SIGUSR2 in this thread around the fork;
    // the child inherits the mask, and a signal sent to it waits until it
    // unblocks.
    unsafe {
        libc::sigemptyset(&mut usr);
        libc::sigaddset(&mut usr, libc::SIGUSR1);
        libc::sigaddset(&mut usr, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &usr, std::ptr::null_mut());
    }
    let child = if clone_parent {
        // SAFETY: a fork-like clone (no new stack: the child runs on a
        // copy of ours) whose child only sets signal handlers and sleeps.
        unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_PARENT | libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            ) as i32
        }
    } else {
        // SAFETY: the child only sleeps (and acts on its signals); it
        // touches nothing shared.
        unsafe { libc::fork() }
    };
    if child == 0 {
        // SAFETY: installing handlers that only make async-signal-safe
        // system calls, then letting the signals in.
        unsafe {
            libc::signal(
                libc::SIGUSR1,
                fork_on_signal as *const () as libc::sighandler_t,
            );
            libc::signal(
                libc::SIGUSR2,
                flip_text_exec as *const () as libc::sighandler_t,
            );
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &usr, std::ptr::null_mut());
        }
        loop {
            // SAFETY: pause() just sleeps until a signal.
            unsafe { libc::pause() };
        }
    }
    // SAFETY: unblocking what we blocked above.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &usr, std::ptr::null_mut()) };
    child
}

/// Make a process that shares our memory (clone(CLONE_VM), its own thread
/// group): it forks a child that sleeps each time a byte comes down its
/// request pipe, and writes the child's pid back.  Its pid, and our ends
/// of the pipes (request, answer); pid -1 on failure.
fn clone_vm_peer() -> (i32, i32, i32) {
    let (mut req, mut ans) = ([-1i32; 2], [-1i32; 2]);
    // SAFETY: pipes into valid two-int arrays.
    if unsafe { libc::pipe(req.as_mut_ptr()) != 0 || libc::pipe(ans.as_mut_ptr()) != 0 } {
        return (-1, -1, -1);
    }
    // The peer's stack and ends, never freed: it runs until killed.
    let stack = Box::leak(vec![0u8; 256 << 10].into_boxed_slice());
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    let ends: &'static [i32; 2] = Box::leak(Box::new([req[0], ans[1]]));
    // SAFETY: the peer runs `peer_main` on its own stack and makes only
    // plain system calls; what it reads (`ends`) lives for ever.
    let pid = unsafe {
        libc::clone(
            peer_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            (ends as *const [i32; 2]).cast_mut().cast(),
        )
    };
    (pid, req[1], ans[0])
}

/// The CLONE_VM peer: on each byte read, fork a sleeping child (a raw
/// clone: the child has a copy of our memory) and write back its pid.
extern "C" fn peer_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the leaked `[read end, write end]` of clone_vm_peer.
    let ends = unsafe { *(arg as *const [i32; 2]) };
    let mut byte = 0u8;
    // SAFETY: plain system calls on our pipe ends and a fork-like clone
    // whose child only sleeps.
    unsafe {
        while libc::read(ends[0], (&raw mut byte).cast(), 1) == 1 {
            let child = libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            ) as i32;
            if child == 0 {
                loop {
                    libc::pause();
                }
            }
            libc::write(ends[1], (&raw const child).cast(), 4);
        }
        libc::_exit(0)
    }
}

/// Ask the CLONE_VM peer (its pipe ends) for a child; its pid, or -1.
fn peer_fork((req, ans): (i32, i32)) -> i32 {
    let mut pid = -1i32;
    // SAFETY: a byte from our stack down the request pipe, an int back
    // into our stack.
    unsafe {
        if libc::write(req, b"f".as_ptr().cast(), 1) == 1 {
            libc::read(ans, (&raw mut pid).cast(), 4);
        }
    }
    pid
}

/// Fork a child that forks a grandchild (which only sleeps) and exits;
/// the grandchild's pid, or -1.
fn fork_orphan() -> i32 {
    let mut fds = [0i32; 2];
    // SAFETY: a pipe into a valid two-int array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return -1;
    }
    // SAFETY: the child only forks, writes a pid and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: the grandchild only sleeps.
        let grandchild = unsafe { libc::fork() };
        if grandchild == 0 {
            loop {
                // SAFETY: pause() just sleeps until a signal.
                unsafe { libc::pause() };
            }
        }
        // SAFETY: writing an int from our stack into the pipe, then leaving
        // without running the parent's atexit handlers.
        unsafe {
            libc::write(fds[1], (&grandchild as *const i32).cast(), 4);
            libc::_exit(0)
        }
    }
    let mut pid = -1i32;
    // SAFETY: reading an int into our stack; reaping our own child; closing
    // our pipe.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], (&mut pid as *mut i32).cast(), 4);
        libc::close(fds[0]);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    pid
}

/// Keep our mmap lock write-locked most of the time: mprotect() a large
/// populated anonymous region back and forth until `calm`.
fn hog_mmap_lock(mib: usize) {
    let len = mib << 20;
    // SAFETY: a fresh anonymous mapping of our own, touched and mprotect()ed
    // by this thread only.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            die("mapping the hog region");
        }
        // 4 KiB PTEs, so that every mprotect() walks many of them.
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        for off in (0..len).step_by(PAGE) {
            std::ptr::write_volatile((p as *mut u8).add(off), 1);
        }
        HOG.store(true, std::sync::atomic::Ordering::SeqCst);
        while HOG.load(std::sync::atomic::Ordering::Relaxed) {
            libc::mprotect(p, len, libc::PROT_READ);
            libc::mprotect(p, len, libc::PROT_READ | libc::PROT_WRITE);
        }
        libc::munmap(p, len);
    }
}

/// Move the text to another 2 MiB-aligned address; returns it.
fn move_text(base: usize) -> usize {
    let to =
        hugepoke::testkit::thp::reserve_window().unwrap_or_else(|_| die("reserving address space"));
    // SAFETY: moves our own text over our own reservation.
    let moved = unsafe {
        libc::mremap(
            base as *mut libc::c_void,
            THP_SIZE,
            THP_SIZE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        die("mremap");
    }
    to
}

/// Page text page `page` out to swap; true once pagemap shows it swapped.
fn page_out(base: usize, page: usize) -> bool {
    let at = base + page * PAGE;
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return false;
    };
    for _ in 0..200 {
        // drop_caches runs lru_add_drain_all(): the COWed page leaves the
        // per-CPU LRU batch it may sit in (MADV_PAGEOUT skips pages off the
        // LRU).  Needs root.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        // SAFETY: MADV_PAGEOUT of our own text page.
        unsafe { libc::madvise(at as *mut libc::c_void, PAGE, libc::MADV_PAGEOUT) };
        let mut entry = [0u8; 8];
        use std::os::unix::fs::FileExt;
        if pagemap
            .read_exact_at(&mut entry, (at / PAGE * 8) as u64)
            .is_ok()
            && u64::from_ne_bytes(entry) >> 62 & 1 == 1
        {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

/// Replace the text by a private, writable mapping of another file, and
/// write into it (so it holds an anonymous page at `page`).
fn remap_data(base: usize, page: usize, dir: &str) {
    let path = format!("{dir}/data-{}.bin", std::process::id());
    std::fs::write(&path, vec![0x11u8; THP_SIZE]).unwrap_or_else(|e| {
        eprintln!("thp-target: writing {path}: {e}");
        std::process::exit(1)
    });
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|_| die("opening data"));
    // SAFETY: replaces our own text mapping; nothing runs it afterwards.
    unsafe {
        libc::munmap(base as *mut libc::c_void, THP_SIZE);
        let p = libc::mmap(
            base as *mut libc::c_void,
            THP_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            die("mapping the data file");
        }
        std::ptr::write_volatile((base + page * PAGE + 100) as *mut u8, 0x22);
    }
}

/// Replace our text by the same bytes from another file, mapped as the
/// text was (private, read+exec) at the same address.
fn remap_text(base: usize, dir: &str) {
    let path = format!("{dir}/other-text-{}.bin", std::process::id());
    std::fs::write(&path, text::blob()).unwrap_or_else(|e| {
        eprintln!("thp-target: writing {path}: {e}");
        std::process::exit(1)
    });
    map_text_over(base, &path);
}

/// Map `path` (the same code) over our text, private read+exec, at `base`.
fn map_text_over(base: usize, path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|_| die("opening the other text"));
    // SAFETY: replaces our own text mapping at the same address, with the
    // same code; nothing runs it while it is swapped (we answer commands).
    unsafe {
        let p = libc::mmap(
            base as *mut libc::c_void,
            THP_SIZE,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            die("mapping the other text");
        }
    }
}

/// Start a thread, pinned to `cpu`, that keeps calling page `page`'s
/// function and logs what it sees into a fresh shared memfd (laid out as
/// `text::Watch`); returns the memfd.
fn watch(base: usize, page: usize, cpu: usize) -> std::io::Result<i32> {
    // SAFETY: a fresh memfd of our own, sized and mapped shared; the
    // mapping lives as long as the process (the thread never stops).
    let log = unsafe {
        let fd = libc::memfd_create(c"hugepoke-watch".as_ptr(), 0);
        if fd < 0 || libc::ftruncate(fd, std::mem::size_of::<text::Watch>() as libc::off_t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            std::mem::size_of::<text::Watch>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        (fd, &*(p as *const text::Watch))
    };
    let (fd, log) = log;
    std::thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let mut last = None;
        for iteration in 0u64.. {
            let v = call(base, page);
            if last != Some(v) {
                log.record_change(iteration, v);
                last = Some(v);
            }
            log.iterations
                .store(iteration + 1, std::sync::atomic::Ordering::Release);
        }
    });
    Ok(fd)
}

fn call(base: usize, page: usize) -> u32 {
    assert!(page < text::PAGES);
    // SAFETY: every page of the mapping starts with a complete function
    // (`mov eax, imm32; ret`), unpatched or patched by the test driving us.
    let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(base + page * PAGE) };
    f()
}

/// `--chaos`: race the kernel on the pages the checkers run (0..pages) and
/// on a few they do not, until `calm`.
fn chaos_on_text(base: usize, pages: usize, state: Option<&check_state::Shared>) {
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};
    // Give the text VMA its anon_vma now, while it is whole: the pieces our
    // mprotect()s split off share it and merge again at `calm`.  (Pieces
    // that each got their own at a later COW would stay apart for good, and
    // a split VMA never gets its PMD back.)  A COW of the last page, which
    // nothing runs, dropped at once.
    let last = base + (text::PAGES - 1) * PAGE;
    // SAFETY: our own text mapping; the byte written is the one there (int3).
    unsafe {
        libc::mprotect(
            base as *mut libc::c_void,
            THP_SIZE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        );
        std::ptr::write_volatile((last + 100) as *mut u8, 0xcc);
        libc::madvise(last as *mut libc::c_void, PAGE, libc::MADV_DONTNEED);
        libc::mprotect(
            base as *mut libc::c_void,
            THP_SIZE,
            libc::PROT_READ | libc::PROT_EXEC,
        );
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while CHAOS.load(Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = (x % pages as u64) as usize;
        let at = (base + page * PAGE) as *mut libc::c_void;
        let quiet = (base + (pages + page % 4) * PAGE) as *mut libc::c_void;
        let dontneed = state.map(|s| &s.slot(page).dontneed);
        // SAFETY: our own text mapping.  DONTNEED on a private file mapping
        // only drops anonymous copies (they refault from the page cache);
        // the checked pages never lose PROT_EXEC (only gain PROT_WRITE for
        // a while); only the quiet pages, which no checker runs, do.
        unsafe {
            match x % 5 {
                0 => {
                    // Odd while the madvise runs: see check_state.
                    dontneed.map(|d| d.fetch_add(1, SeqCst));
                    libc::madvise(at, PAGE, libc::MADV_DONTNEED);
                    dontneed.map(|d| d.fetch_add(1, SeqCst));
                }
                1 => {
                    libc::mprotect(
                        at,
                        PAGE,
                        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    );
                }
                2 => {
                    libc::mprotect(at, PAGE, libc::PROT_READ | libc::PROT_EXEC);
                }
                3 => {
                    libc::mprotect(quiet, PAGE, libc::PROT_READ);
                }
                _ => {
                    libc::mprotect(quiet, PAGE, libc::PROT_READ | libc::PROT_EXEC);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// `--check-threads`: call the functions of pages 0..pages for ever; exit
/// on a value that is neither the original nor the stress one (3), or, with
/// a check state, on a call that ran the code from before a PATCH or
/// RESTORE that had returned (4).
fn check_calls(base: usize, pages: usize, state: Option<&check_state::Shared>) {
    use check_state::State;
    // Per page: the generation we last saw a miss in, and how many in a row.
    let mut misses = vec![(0u64, 0u32); pages];
    loop {
        // `misses` has one entry a page.
        for (page, m) in misses.iter_mut().enumerate() {
            let (orig, new) = (text::original_value(page), text::stress_value(page));
            let Some(slot) = state.map(|s| s.slot(page)) else {
                let v = call(base, page);
                if v != orig && v != new {
                    eprintln!("thp-target: page {page} returned {v}: torn or foreign code");
                    std::process::exit(3);
                }
                continue;
            };
            let (generation, st) = slot.load();
            let v = call(base, page);
            let dontneed = slot.dontneed.load(std::sync::atomic::Ordering::Acquire);
            let stable = slot.load() == (generation, st);
            if v != orig && v != new {
                eprintln!("thp-target: page {page} returned {v} in state {st:?} (generation {generation}): torn or foreign code");
                std::process::exit(3);
            }
            // The whole call ran after the ioctl that made this state returned.
            let want = match st {
                State::Original if stable => orig,
                State::Patched if stable => new,
                _ => continue,
            };
            if v == want {
                slot.confirm(generation);
                continue;
            }
            if st == State::Patched && slot.dontneed_since_patch(dontneed) {
                slot.excused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                slot.confirm(generation);
                continue;
            }
            slot.misses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *m = if m.0 == generation {
                (generation, m.1 + 1)
            } else {
                (generation, 1)
            };
            if m.1 > check_state::MISSES_ALLOWED {
                eprintln!(
                    "thp-target: page {page}: {} calls in a row after the ioctl that made it {st:?} returned (generation {generation}) still returned {v}",
                    m.1
                );
                std::process::exit(4);
            }
        }
    }
}

fn main() {
    let mut path = format!(
        "{}/text.bin",
        std::env::var("HUGEPOKE_THP_DIR").unwrap_or_else(|_| "/tmp/hugepoke-thp".into())
    );
    let mut spin = false;
    let mut chaos = false;
    let mut huge = true;
    let mut at = None;
    let (mut check_threads, mut check_pages) = (0usize, 1usize);
    let mut check_state = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--file" => path = args.next().unwrap_or_else(|| die("--file needs a path")),
            "--at" => {
                at = Some(
                    args.next()
                        .and_then(|a| hugepoke::parse_number(&a))
                        .unwrap_or_else(|| die("--at ADDR")) as usize,
                )
            }
            "--spin" => spin = true,
            "--chaos" => chaos = true,
            "--no-huge" => huge = false,
            "--subreaper" => {
                // SAFETY: a plain prctl on ourselves.
                if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                    die("PR_SET_CHILD_SUBREAPER");
                }
            }
            "--check-threads" => {
                check_threads = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| die("--check-threads N"))
            }
            "--check-pages" => {
                check_pages = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| die("--check-pages P"))
            }
            "--check-state" => {
                check_state = Some(
                    args.next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| die("--check-state FD")),
                )
            }
            _ => {
                eprintln!("usage: thp-target [--file PATH] [--at ADDR] [--spin] [--chaos] [--no-huge] [--check-threads N --check-pages P [--check-state FD]]");
                std::process::exit(2);
            }
        }
    }

    if std::fs::metadata(&path)
        .map(|m| m.len() as usize != THP_SIZE)
        .unwrap_or(true)
    {
        std::fs::write(&path, text::blob()).unwrap_or_else(|e| {
            eprintln!("thp-target: writing {path}: {e}");
            std::process::exit(1)
        });
    }
    let file = std::fs::File::open(&path).unwrap_or_else(|e| {
        eprintln!("thp-target: opening {path}: {e}");
        std::process::exit(1)
    });
    let base = hugepoke::testkit::thp::map_text_with(&file, at, huge)
        .unwrap_or_else(|_| die("mapping the text"));
    TEXT.store(base, std::sync::atomic::Ordering::Relaxed);
    // Fault the text in (a PMD mapping when the page cache holds a THP).
    let v = call(base, 0);
    assert_eq!(v, text::original_value(0));
    let check_pages = check_pages.min(check_state::PAGES);
    let state: Option<&'static check_state::Shared> = check_state.map(|fd| {
        &*Box::leak(Box::new(
            check_state::Shared::map(fd).unwrap_or_else(|_| die("mapping --check-state")),
        ))
    });

    if spin {
        std::thread::spawn(move || loop {
            std::hint::black_box(call(base, 0));
        });
    }

    if chaos {
        CHAOS.store(true, std::sync::atomic::Ordering::Relaxed);
        std::thread::spawn(move || chaos_on_text(base, check_pages, state));
    }
    for _ in 0..check_threads {
        std::thread::spawn(move || check_calls(base, check_pages, state));
    }

    let mut base = base;
    let dir = std::path::Path::new(&path)
        .parent()
        .map_or("/tmp".into(), |d| d.display().to_string());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "ready pid={} addr={base:#x} file={path}",
        std::process::id()
    );
    let _ = out.flush();
    let mut peer = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|n| n.parse::<usize>().ok())) {
            (Some("call"), Some(n)) if n < text::PAGES => {
                let _ = writeln!(out, "{n} {}", call(base, n));
            }
            (Some("write"), Some(n)) if n < text::PAGES => {
                // SAFETY: deliberately writes to read-only text; the kernel
                // must refuse it (SIGSEGV), even on a patched, dirty PTE.
                unsafe { std::ptr::write_volatile((base + n * PAGE) as *mut u8, 0x90) };
                let _ = writeln!(out, "wrote {n}");
            }
            (Some("fork"), _) => {
                let _ = writeln!(out, "child {}", fork_sleeper(false));
            }
            (Some("clone-parent"), _) => {
                let _ = writeln!(out, "child {}", fork_sleeper(true));
            }
            (Some("unsubreaper"), _) => {
                // SAFETY: a prctl on ourselves with plain integer arguments.
                let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
                let _ = writeln!(out, "unsubreaper {rc}");
            }
            (Some("clone-vm"), _) => {
                let (pid, req, ans) = clone_vm_peer();
                peer = Some((req, ans));
                let _ = writeln!(out, "peer {pid}");
            }
            (Some("peer-fork"), _) => {
                let child = peer.map_or(-1, peer_fork);
                let _ = writeln!(out, "child {child}");
            }
            (Some("fork-orphan"), _) => {
                // A grandchild whose parent (our child) exits: it is given
                // to a reaper, and only its ancestry since says whose it is.
                let _ = writeln!(out, "grandchild {}", fork_orphan());
            }
            (Some("exec"), _) => {
                let _ = out.flush();
                use std::os::unix::process::CommandExt;
                let err = std::process::Command::new("sleep").arg("1000").exec();
                let _ = writeln!(out, "error: exec: {err}");
            }
            (Some("hog"), Some(mib)) => {
                std::thread::spawn(move || hog_mmap_lock(mib));
                while !HOG.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                let _ = writeln!(out, "hogging");
            }
            (Some("calm"), _) => {
                HOG.store(false, std::sync::atomic::Ordering::Relaxed);
                CHAOS.store(false, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(5));
                // SAFETY: our own mapping, made whole read+exec again.
                unsafe {
                    libc::mprotect(
                        base as *mut libc::c_void,
                        THP_SIZE,
                        libc::PROT_READ | libc::PROT_EXEC,
                    )
                };
                let _ = writeln!(out, "calm");
            }
            (Some("move"), _) => {
                base = move_text(base);
                let _ = writeln!(out, "moved {base:#x}");
            }
            (Some("dontunmap"), _) => {
                // SAFETY: mremap of our text's first 64 pages, kept mapped
                // where they were (MREMAP_DONTUNMAP): their page tables,
                // copies and all, go to a new mapping of the same anon_vma
                // (a part only: moving the whole VMA unlinks its anon_vma);
                // the old range faults the page cache in again.
                let to = unsafe {
                    libc::mremap(
                        base as *mut libc::c_void,
                        64 * PAGE,
                        64 * PAGE,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
                        // No address asked for (DONTUNMAP reads this one).
                        std::ptr::null_mut::<libc::c_void>(),
                    )
                };
                if to == libc::MAP_FAILED {
                    let e = std::io::Error::last_os_error();
                    let _ = writeln!(out, "error: dontunmap: {e}");
                } else {
                    let _ = writeln!(out, "dontunmapped {:#x}", to as usize);
                }
            }
            (Some("map-again"), _) => {
                match hugepoke::testkit::thp::map_text_with(&file, None, huge) {
                    Ok(second) => {
                        let _ = writeln!(out, "mapped-again {second:#x}");
                    }
                    Err(e) => {
                        let _ = writeln!(out, "error: map-again: {e}");
                    }
                }
            }
            (Some("protect"), _) => {
                let prot = match line.split_whitespace().nth(1) {
                    Some("rwx") => libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    Some("r") => libc::PROT_READ,
                    _ => libc::PROT_READ | libc::PROT_EXEC,
                };
                // SAFETY: our own text mapping.
                let rc = unsafe { libc::mprotect(base as *mut libc::c_void, THP_SIZE, prot) };
                let _ = writeln!(out, "protected {rc}");
            }
            (Some("warm"), _) => {
                // SAFETY: locks and unlocks our own pages; nothing is unmapped.
                let rc = unsafe { libc::mlockall(libc::MCL_CURRENT) };
                // SAFETY: as above.
                unsafe { libc::munlockall() };
                let _ = writeln!(out, "warm {rc}");
            }
            (Some("unmap"), Some(n)) if n < text::PAGES => {
                // SAFETY: our own text page; nothing calls page n after this.
                let rc = unsafe { libc::munmap((base + n * PAGE) as *mut libc::c_void, PAGE) };
                let _ = writeln!(out, "unmap {n} {rc}");
            }
            (Some("dontneed"), Some(n)) if n < text::PAGES => {
                // SAFETY: our own text page; a private file page refaults.
                let rc = unsafe {
                    libc::madvise(
                        (base + n * PAGE) as *mut libc::c_void,
                        PAGE,
                        libc::MADV_DONTNEED,
                    )
                };
                // Said only when it failed: every caller expects "dontneed N".
                if rc == 0 {
                    let _ = writeln!(out, "dontneed {n}");
                } else {
                    let e = std::io::Error::last_os_error();
                    let _ = writeln!(out, "dontneed {n} failed: {e}");
                }
            }
            (Some("guard"), Some(n)) if n < text::PAGES => {
                // MADV_GUARD_INSTALL (102, Linux 6.13): a guard region over
                // text page n, which zaps what was mapped there.
                // SAFETY: our own text page.
                let rc =
                    unsafe { libc::madvise((base + n * PAGE) as *mut libc::c_void, PAGE, 102) };
                let _ = writeln!(out, "guard {n} {rc}");
            }
            (Some("pageout"), Some(n)) if n < text::PAGES => {
                let _ = writeln!(
                    out,
                    "pageout {}",
                    if page_out(base, n) { "ok" } else { "failed" }
                );
            }
            (Some("pin"), Some(n)) if n < text::PAGES => {
                // A pipe holds text page n (vmsplice takes a reference on
                // the page we map there), until we exit.
                let _ = writeln!(out, "{}", pin_in_pipe(base, n));
            }
            (Some("remap-text"), _) => {
                remap_text(base, &dir);
                let _ = writeln!(out, "remapped-text");
            }
            (Some("remap-same"), _) => {
                map_text_over(base, &path);
                let _ = writeln!(out, "remapped-same");
            }
            (Some("remap-data"), Some(n)) if n < text::PAGES => {
                remap_data(base, n, &dir);
                let _ = writeln!(out, "remapped");
            }
            (Some("watch"), Some(n)) if n < text::PAGES => {
                let cpu = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                match watch(base, n, cpu) {
                    Ok(fd) => {
                        let _ = writeln!(out, "watching fd={fd}");
                    }
                    Err(e) => {
                        let _ = writeln!(out, "error: watch: {e}");
                    }
                }
            }
            (Some("exec-suid"), _) => {
                let mut w = line.split_whitespace().skip(1);
                let (Some(exe), Some(fds)) =
                    (w.next(), w.next().and_then(|n| n.parse::<usize>().ok()))
                else {
                    let _ = writeln!(out, "error: exec-suid PATH FDS [ARG...]");
                    continue;
                };
                // SAFETY: getrlimit/setrlimit on our own limits: the soft
                // descriptor limit up to the hard one.
                unsafe {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                    lim.rlim_cur = lim.rlim_max;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                for _ in 0..fds {
                    // SAFETY: a close-on-exec duplicate of our stdin.
                    unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
                }
                let _ = out.flush();
                use std::os::unix::process::CommandExt;
                let err = std::process::Command::new(exe).args(w).exec();
                let _ = writeln!(out, "error: exec: {err}");
            }
            (Some("quit"), _) => break,
            _ => {
                let _ = writeln!(out, "error: {line}");
            }
        }
        let _ = out.flush();
    }
}
