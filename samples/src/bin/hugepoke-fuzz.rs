//! Fuzz /dev/hugepoke from two threads for a bounded time, against a live
//! target (thp-target --spin: a thread keeps running page 0's function).
//!
//!   hugepoke-fuzz [--seconds S] [--seed N]
//!
//! Most calls are valid-looking: PATCHes of the target's text (any page and
//! offset, 1 to 16 bytes, random flags, right or wrong expected bytes) and
//! RESTOREs and QUERYs (of any site index) of handles that PATCH or
//! PATCH_BATCH returned; PATCH_BATCHes of such sites (counts 0 to 4,097
//! and beyond, random batch flags, the sites array on the heap, at the end
//! of the argument page running into its guard page, null, in the kernel
//! or unmapped); the rest are random
//! commands, sizes, structs, pids (invalid ones, a kernel thread),
//! addresses (kernel, unmapped, wrapping) and pointers (null, kernel,
//! running into a guard page).  Files are closed and reopened now and then.
//! Every byte written into page 0 keeps its function valid code (`mov eax,
//! imm32; ret`, then int3), so the spinning thread may run any of them.
//!
//! The seed comes from the clock unless given, and is printed first
//! (`# seed N`); `--seed N` repeats each thread's sequence of calls (not
//! their interleaving, nor the handles the module hands out).
//!
//! Afterwards, once the files are closed and leftover persistent patches
//! restored: the target is alive, its 2 MiB of text read back
//! (/proc/PID/mem) byte for byte as the file, no patch is left, and its
//! text has no anonymous memory and is PMD-mapped again.  Prints the count
//! of each result (`ok(PATCH)`, `EBUSY`, ...) on one `#` line; exits 1 on
//! any problem.  The guest runner fails the run if dmesg shows any kernel
//! report.

use hugepoke::device::Device;
use hugepoke::proc;
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use hugepoke::uapi::{self, BatchSite, PatchArgs, PatchBatchArgs, QueryArgs, RestoreArgs};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds differ from the start.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

/// What both fuzzing threads share.
struct Fuzz {
    pid: i32,
    text: u64,
    /// The file's bytes: what the text holds where no patch is.
    blob: Vec<u8>,
    results: Mutex<BTreeMap<String, u64>>,
    /// Checks made after calls: results predicted, byte ranges compared.
    checks: Mutex<BTreeMap<&'static str, u64>>,
    /// What went against the model (the first few, with the call).
    problems: Mutex<Vec<String>>,
}

/// A live patch one thread made: its handle, the file it came through
/// (index into the thread's files), and its sites' addresses and bytes.
struct Live {
    handle: u64,
    dev: usize,
    persist: bool,
    sites: Vec<(u64, Vec<u8>)>,
}

/// One thread's model of its half of the text: the pages it owns (page
/// `p` belongs to thread `p % 2`; page 0, which the spinner runs, to
/// thread 0) hold the file's bytes but where its live patches are.  No
/// other call touches them, so every result there can be predicted.
struct Model {
    me: usize,
    live: Vec<Live>,
}

impl Model {
    fn owns(&self, page: usize) -> bool {
        page % 2 == self.me
    }

    /// Does `addr..addr+len` overlap a live site of ours?
    fn overlaps(&self, addr: u64, len: u64) -> bool {
        self.live
            .iter()
            .flat_map(|l| &l.sites)
            .any(|(a, b)| *a < addr + len && addr < *a + b.len() as u64)
    }
}

/// The argument buffer: one page, then a PROT_NONE guard page, so that a
/// pointer running off its end faults (EFAULT) instead of hitting the heap.
struct ArgPage(*mut u8);

impl ArgPage {
    fn new() -> Self {
        // SAFETY: a fresh private mapping of two pages, the second made
        // inaccessible; only the first is ever accessed through `buf`.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(p != libc::MAP_FAILED);
            libc::mprotect(p.cast::<u8>().add(4096).cast(), 4096, libc::PROT_NONE);
            Self(p.cast())
        }
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the first, read-write page of our mapping, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}

/// What a call must do, as the model predicts it.
#[derive(Debug, PartialEq)]
enum Want {
    Ok,
    /// Fail with this errno, changing nothing.
    Err(i32),
    /// Fail with one of these errnos, changing nothing.
    Fail(&'static [i32]),
    /// Succeed or fail with one of these errnos (changing nothing then).
    Any(&'static [i32]),
}

/// Every errno the ABI documents (Documentation/abi.md).
const DOCUMENTED: &[i32] = &[
    libc::ENOTTY,
    libc::EFAULT,
    libc::EINVAL,
    libc::ESRCH,
    libc::EPERM,
    libc::EBUSY,
    libc::EILSEQ,
    libc::ENXIO,
    libc::EACCES,
    libc::EAGAIN,
    libc::ENOENT,
    libc::EIO,
    libc::ENOMEM,
    libc::EINTR,
    libc::ENODEV,
];

impl Fuzz {
    fn count(&self, key: String) {
        *self.results.lock().unwrap().entry(key).or_default() += 1;
    }

    fn checked(&self, what: &'static str) {
        *self.checks.lock().unwrap().entry(what).or_default() += 1;
    }

    fn problem(&self, p: String) {
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < 20 {
            problems.push(p);
        }
    }

    /// The target's bytes at `addr`, through /proc/PID/mem.
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        let ok = std::fs::File::open(format!("/proc/{}/mem", self.pid))
            .and_then(|f| f.read_exact_at(&mut buf, addr));
        if let Err(e) = ok {
            self.problem(format!("reading the target at {addr:#x}: {e}"));
        }
        buf
    }

    /// The file's bytes at `addr` of the text.
    fn file(&self, addr: u64, len: usize) -> &[u8] {
        let at = (addr - self.text) as usize;
        &self.blob[at..at + len]
    }

    /// The target holds `want` at `addr`, else a problem about `after`.
    fn holds(&self, addr: u64, want: &[u8], after: &str) {
        self.checked("byte ranges compared with the model");
        let now = self.read(addr, want.len());
        if now != want {
            self.problem(format!(
                "after {after}: {addr:#x} holds {now:02x?}, the model {want:02x?}"
            ));
        }
    }

    /// A page of ours, a length and an offset in it for a PATCH.
    fn draw_range(&self, rng: &mut Rng, model: &Model) -> (usize, usize, usize) {
        let page = loop {
            let p = if model.me == 0 && rng.below(4) == 0 {
                0
            } else {
                rng.below(text::PAGES as u64) as usize
            };
            if model.owns(p) {
                break p;
            }
        };
        let len = if rng.below(2) == 0 {
            6
        } else {
            1 + rng.below(16) as usize
        };
        // Page 0 runs: only patch its function from its start, with code.
        let offset = if page == 0 || rng.below(2) == 0 {
            0
        } else {
            rng.below((text::PAGE - len) as u64) as usize
        };
        (page, len, offset)
    }

    /// A valid-looking PATCH of a page of ours into `buf`.
    fn plausible_patch(&self, rng: &mut Rng, model: &Model, buf: &mut [u8]) {
        // Over a live site of ours (EBUSY) one time in eight; else a range
        // that is free (a few draws), so that most PATCHes reach the write.
        let overlap_ok = rng.below(8) == 0;
        let (mut page, mut len, mut offset) = self.draw_range(rng, model);
        for _ in 0..4 {
            let at = self.text + (page * text::PAGE + offset) as u64;
            if overlap_ok || !model.overlaps(at, len as u64) {
                break;
            }
            (page, len, offset) = self.draw_range(rng, model);
        }
        let mut a = PatchArgs {
            size: std::mem::size_of::<PatchArgs>() as u32,
            flags: match rng.below(6) {
                0 => uapi::PATCH_PERSIST,
                1 => uapi::PATCH_EXPECT,
                2 => uapi::PATCH_INSTALL_PMD,
                3 => rng.below(8) as u32,
                _ => 0,
            },
            pid: self.pid,
            len: len as u32,
            addr: self.text + (page * text::PAGE + offset) as u64,
            ..Default::default()
        };
        let code: Vec<u8> = text::mov_eax_ret(rng.next() as u32)
            .iter()
            .chain([0xcc; 10].iter())
            .copied()
            .collect();
        a.bytes.copy_from_slice(&code);
        // The file's bytes there (right unless patched), or now and then wrong.
        a.expect[..len].copy_from_slice(self.file(a.addr, len));
        if rng.below(8) == 0 {
            a.expect[rng.below(len as u64) as usize] ^= 1;
        }
        buf[..std::mem::size_of::<PatchArgs>()].copy_from_slice(pod_bytes(&a));
    }

    /// A valid-looking site of a page of ours, as `plausible_patch`'s.
    fn plausible_site(&self, rng: &mut Rng, model: &Model) -> BatchSite {
        let mut buf = [0u8; std::mem::size_of::<PatchArgs>()];
        self.plausible_patch(rng, model, &mut buf);
        // SAFETY: `buf` holds the bytes of a PatchArgs, which has no padding
        // and no invalid bit patterns.
        let a: PatchArgs = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        // Now and then a flag no site may carry (PATCH_INSTALL_PMD is the batch's).
        let stray = if rng.below(32) == 0 {
            uapi::PATCH_INSTALL_PMD
        } else {
            0
        };
        BatchSite {
            addr: a.addr,
            len: a.len,
            flags: (a.flags & uapi::PATCH_EXPECT) | stray,
            bytes: a.bytes,
            expect: a.expect,
        }
    }

    /// A PATCH_BATCH into `buf`: its sites in `heap` or at the end of
    /// `buf` (running into the guard page when there are more), or a bad
    /// pointer.  Returns where the sites are (None: not readable).
    fn plausible_batch(
        &self,
        rng: &mut Rng,
        model: &Model,
        buf: &mut [u8],
        heap: &mut Vec<BatchSite>,
    ) -> Option<u64> {
        const SITE: usize = std::mem::size_of::<BatchSite>();
        let any = rng.next() as u32;
        let count: u32 = match rng.below(20) {
            0 => rng.pick(&[
                0,
                uapi::MAX_BATCH as u32,
                uapi::MAX_BATCH as u32 + 1,
                u32::MAX,
                any,
            ]),
            1..=3 => 1 + rng.below(64) as u32,
            _ => 1 + rng.below(6) as u32,
        };
        // What the kernel may read: at most MAX_BATCH + 1 sites are built.
        let built = (count as usize).min(uapi::MAX_BATCH + 1);
        heap.clear();
        heap.extend((0..built).map(|_| self.plausible_site(rng, model)));
        let in_page = (4096 - std::mem::size_of::<PatchBatchArgs>()) / SITE;
        let (sites, readable) = match rng.below(20) {
            0 => (0, false),
            1 => (
                rng.pick(&[0xffff_ffff_8100_0000u64, 0x1000, u64::MAX - 47]),
                false,
            ),
            2 | 3 => {
                // The last k sites of the page; more than k run into the guard page.
                let k = built.min(in_page);
                let at = 4096 - k * SITE;
                for (i, site) in heap[..k].iter().enumerate() {
                    buf[at + i * SITE..at + (i + 1) * SITE].copy_from_slice(pod_bytes(site));
                }
                (buf.as_ptr() as u64 + at as u64, built <= in_page)
            }
            _ => (heap.as_ptr() as u64, true),
        };
        let a = PatchBatchArgs {
            size: if rng.below(32) == 0 {
                rng.pick(&[0, 32, 48, 64])
            } else {
                std::mem::size_of::<PatchBatchArgs>() as u32
            },
            flags: match rng.below(6) {
                0 => uapi::PATCH_PERSIST,
                1 => uapi::PATCH_INSTALL_PMD,
                2 => rng.below(16) as u32,
                _ => 0,
            },
            pid: if rng.below(32) == 0 {
                rng.pick(&[0, -1, 2, i32::MAX])
            } else {
                self.pid
            },
            count,
            sites,
            handle: rng.next(),
            failed: rng.next() as u32,
            error: rng.next() as i32,
        };
        buf[..std::mem::size_of::<PatchBatchArgs>()].copy_from_slice(pod_bytes(&a));
        readable.then_some(sites)
    }

    /// What the PATCH in `buf` must do, by the model.
    fn want_patch(&self, model: &Model, a: &PatchArgs) -> Want {
        let len = a.len as usize;
        if model.overlaps(a.addr, a.len as u64) {
            Want::Err(libc::EBUSY)
        } else if a.flags & uapi::PATCH_EXPECT != 0 && a.expect[..len] != *self.file(a.addr, len) {
            Want::Err(libc::EILSEQ)
        } else {
            Want::Ok
        }
    }

    /// What a batch for our pid with a good header and readable sites must
    /// do, in the order the module checks: EINVAL for a site flag that is
    /// not a site's or two sites that overlap, EBUSY when one overlaps a
    /// live site of ours, EILSEQ for a wrong `expect`, else succeed.
    fn want_batch(&self, model: &Model, sites: &[BatchSite]) -> Want {
        let stray = sites.iter().any(|s| s.flags & !uapi::SITE_FLAGS != 0);
        let crossed = sites.iter().enumerate().any(|(i, a)| {
            sites[..i]
                .iter()
                .any(|b| a.addr < b.addr + b.len as u64 && b.addr < a.addr + a.len as u64)
        });
        let len = |s: &BatchSite| s.len as usize;
        if stray || crossed {
            Want::Err(libc::EINVAL)
        } else if sites.iter().any(|s| model.overlaps(s.addr, s.len as u64)) {
            Want::Err(libc::EBUSY)
        } else if sites.iter().any(|s| {
            s.flags & uapi::PATCH_EXPECT != 0 && s.expect[..len(s)] != *self.file(s.addr, len(s))
        }) {
            Want::Err(libc::EILSEQ)
        } else {
            Want::Ok
        }
    }

    /// The sites of the batch at `sites` (`count` of them, readable), as
    /// (address, bytes), and whether the kernel must refuse it before
    /// anything else (a bad count, header or site flag).
    fn batch_sites(&self, a: &PatchBatchArgs, heap: &[BatchSite], buf: &[u8]) -> Vec<BatchSite> {
        const SITE: usize = std::mem::size_of::<BatchSite>();
        let n = (a.count as usize).min(uapi::MAX_BATCH);
        if a.sites == heap.as_ptr() as u64 {
            return heap[..n.min(heap.len())].to_vec();
        }
        let at = (a.sites - buf.as_ptr() as u64) as usize;
        (0..n)
            .map(|i| {
                // SAFETY: within `buf` (readable batches only), a BatchSite's bytes.
                unsafe { std::ptr::read_unaligned(buf[at + i * SITE..].as_ptr().cast()) }
            })
            .collect()
    }

    /// One thread's fuzzing, until `deadline`; returns its ioctl count.
    fn thread(&self, me: usize, seed: u64, deadline: Instant) -> u64 {
        pin_to_cpu(me);
        let mut rng = Rng::new(seed);
        let mut arg = ArgPage::new();
        let buf = arg.buf();
        let mut model = Model {
            me,
            live: Vec::new(),
        };
        let mut devs: Vec<Device> = (0..2)
            .map(|_| Device::open().expect("/dev/hugepoke"))
            .collect();
        let mut heap: Vec<BatchSite> = Vec::with_capacity(uapi::MAX_BATCH + 1);
        let mut calls = 0u64;
        while Instant::now() < deadline {
            calls += 1;
            if rng.below(200) == 0 {
                // Closing a file restores its patches (not the persistent).
                let i = rng.below(devs.len() as u64) as usize;
                devs[i] = Device::open().expect("/dev/hugepoke");
                self.closed(&mut model, i);
            }
            let d = rng.below(devs.len() as u64) as usize;
            buf.iter_mut().for_each(|b| *b = rng.next() as u8);
            // A handle of ours (mostly a recent one), or one nobody has.
            let (which, any, recent) = (rng.below(8), rng.next(), rng.next());
            let handle = match (model.live.len(), which) {
                (0, _) | (_, 0) => [0, u64::MAX, any | 1 << 48][(recent % 3) as usize],
                (n, _) => model.live[n - 1 - (recent % n.min(16) as u64) as usize].handle,
            };
            let bad_ptr = rng.below(40) == 0;
            let (cmd, name, readable) = match rng.below(100) {
                0..=54 => {
                    self.plausible_patch(&mut rng, &model, buf);
                    (uapi::IOCTL_PATCH, "PATCH", None)
                }
                55..=76 => {
                    let r = RestoreArgs {
                        size: std::mem::size_of::<RestoreArgs>() as u32,
                        flags: 0,
                        handle,
                    };
                    buf[..std::mem::size_of::<RestoreArgs>()].copy_from_slice(pod_bytes(&r));
                    (uapi::IOCTL_RESTORE, "RESTORE", None)
                }
                77..=79 => {
                    let index = [0, 0, 1, (any >> 32) as u32 % 8, u32::MAX][(any % 5) as usize];
                    let q = QueryArgs {
                        size: std::mem::size_of::<QueryArgs>() as u32,
                        handle,
                        index,
                        ..Default::default()
                    };
                    buf[..std::mem::size_of::<QueryArgs>()].copy_from_slice(pod_bytes(&q));
                    (uapi::IOCTL_QUERY, "QUERY", None)
                }
                80..=94 => {
                    let at = self.plausible_batch(&mut rng, &model, buf, &mut heap);
                    (uapi::IOCTL_PATCH_BATCH, "PATCH_BATCH", at)
                }
                _ => {
                    let (cmd, name) = self.random_call(&mut rng, &model, buf, handle);
                    (cmd, name, None)
                }
            };
            let ptr = if bad_ptr {
                let off_the_end = buf.as_ptr() as usize + 4096 - rng.below(64) as usize;
                rng.pick(&[0usize, 0xffff_ffff_8100_0000, off_the_end])
            } else {
                buf.as_mut_ptr() as usize
            };
            let r = devs[d].ioctl_raw(cmd, ptr);
            self.count(match &r {
                Ok(()) => format!("ok({name})"),
                Err(e) => hugepoke::errno_name(e.raw_os_error().unwrap_or(0)).to_string(),
            });
            let errno = r.as_ref().err().map(|e| e.raw_os_error().unwrap_or(0));
            let call = format!("{name} ({calls}th call of thread {me})");
            if bad_ptr {
                // Null or in the kernel: EFAULT; running off the argument
                // page: EFAULT, or EINVAL when what fits is read as junk;
                // a random command may be unknown (ENOTTY) first.
                let want = match ptr {
                    _ if name == "random" => Want::Any(DOCUMENTED),
                    0 | 0xffff_ffff_8100_0000 => Want::Err(libc::EFAULT),
                    _ => Want::Fail(&[libc::EFAULT, libc::EINVAL]),
                };
                self.judge(&call, want, errno);
                continue;
            }
            match name {
                "PATCH" => self.after_patch(&mut model, d, buf, errno, &call),
                "RESTORE" => self.after_restore(&mut model, handle, errno, &call),
                "QUERY" => self.after_query(&model, buf, errno, &call),
                "PATCH_BATCH" => {
                    self.after_batch(&mut model, d, buf, &heap, readable, errno, &call)
                }
                _ => self.after_random(&mut model, &devs[d], d, cmd, buf, errno, &call),
            }
        }
        calls
    }

    /// The errno (None: success) against what was wanted.
    fn judge(&self, call: &str, want: Want, errno: Option<i32>) -> bool {
        self.checked("results predicted");
        let ok = match (&want, errno) {
            (Want::Ok, None) => true,
            (Want::Err(w), Some(e)) => *w == e,
            (Want::Any(set), None) => !set.is_empty(),
            (Want::Any(set) | Want::Fail(set), Some(e)) => set.contains(&e),
            (Want::Fail(_), None) => false,
            // EAGAIN (the page table kept changing) may end any write.
            (Want::Ok, Some(e)) => e == libc::EAGAIN,
            (Want::Err(_), None) => false,
        };
        if !ok {
            self.problem(format!(
                "{call}: {} where the model wants {want:?}",
                errno.map_or("success".to_string(), |e| hugepoke::errno_name(e)
                    .to_string())
            ));
        }
        ok
    }

    fn after_patch(&self, model: &mut Model, d: usize, buf: &[u8], errno: Option<i32>, call: &str) {
        // SAFETY: `buf` holds a PatchArgs (the kernel wrote back `handle`).
        let a: PatchArgs = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let len = a.len as usize;
        let before = model.overlaps(a.addr, a.len as u64);
        self.judge(call, self.want_patch(model, &a), errno);
        if errno.is_none() {
            self.holds(a.addr, &a.bytes[..len], call);
            model.live.push(Live {
                handle: a.handle,
                dev: d,
                persist: a.flags & uapi::PATCH_PERSIST != 0,
                sites: vec![(a.addr, a.bytes[..len].to_vec())],
            });
        } else if !before {
            // Refused: nothing written where no patch of ours is.
            self.holds(a.addr, self.file(a.addr, len), call);
        }
    }

    fn after_restore(&self, model: &mut Model, handle: u64, errno: Option<i32>, call: &str) {
        let Some(i) = model.live.iter().position(|l| l.handle == handle) else {
            self.judge(call, Want::Err(libc::ENOENT), errno);
            return;
        };
        if self.judge(call, Want::Ok, errno) && errno.is_none() {
            let live = model.live.swap_remove(i);
            for (addr, bytes) in &live.sites {
                self.holds(*addr, self.file(*addr, bytes.len()), call);
            }
        }
    }

    fn after_query(&self, model: &Model, buf: &[u8], errno: Option<i32>, call: &str) {
        // SAFETY: `buf` holds a QueryArgs.
        let q: QueryArgs = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let live = model.live.iter().find(|l| l.handle == q.handle);
        let want = match live {
            Some(l) if (q.index as usize) < l.sites.len() => Want::Ok,
            _ => Want::Err(libc::ENOENT),
        };
        if self.judge(call, want, errno) && errno.is_none() {
            let (l, site) = (live.unwrap(), q.site as usize);
            let right = l.sites.get(site).is_some_and(|(addr, bytes)| {
                q.addr == *addr
                    && q.bytes[..bytes.len()] == bytes[..]
                    && q.orig[..bytes.len()] == *self.file(*addr, bytes.len())
                    && q.count as usize == l.sites.len()
                    && q.pid == self.pid
            });
            if !right {
                self.problem(format!(
                    "{call}: {q:?} is not the model's site {site} of {:?}",
                    l.sites
                ));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn after_batch(
        &self,
        model: &mut Model,
        d: usize,
        buf: &[u8],
        heap: &[BatchSite],
        readable: Option<u64>,
        errno: Option<i32>,
        call: &str,
    ) {
        // SAFETY: `buf` holds a PatchBatchArgs.
        let a: PatchBatchArgs = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let header_ok = a.size as usize == std::mem::size_of::<PatchBatchArgs>()
            && a.flags & !uapi::BATCH_FLAGS == 0
            && (1..=uapi::MAX_BATCH as u32).contains(&a.count);
        let sites = match (header_ok, readable) {
            (true, Some(_)) => self.batch_sites(&a, heap, buf),
            _ => Vec::new(),
        };
        let want = if !header_ok {
            Want::Err(libc::EINVAL)
        } else if readable.is_none() {
            Want::Err(libc::EFAULT)
        } else if a.pid != self.pid {
            // (The sites are checked before the pid is looked up.)
            Want::Fail(&[libc::ESRCH, libc::EINVAL])
        } else {
            self.want_batch(model, &sites)
        };
        self.judge(call, want, errno);
        if !header_ok || readable.is_none() {
            return;
        }
        match errno {
            None => {
                for s in &sites {
                    self.holds(s.addr, &s.bytes[..s.len as usize], call);
                }
                model.live.push(Live {
                    handle: a.handle,
                    dev: d,
                    persist: a.flags & uapi::PATCH_PERSIST != 0,
                    sites: sites
                        .iter()
                        .map(|s| (s.addr, s.bytes[..s.len as usize].to_vec()))
                        .collect(),
                });
            }
            Some(_) => {
                if a.handle != 0 {
                    self.problem(format!(
                        "{call}: failed, yet kept sites under handle {}",
                        a.handle
                    ));
                }
                // Nothing written where no patch of ours is.
                for s in sites
                    .iter()
                    .filter(|s| !model.overlaps(s.addr, s.len as u64))
                {
                    let len = (s.len as usize).clamp(1, uapi::MAX_BYTES);
                    self.holds(s.addr, self.file(s.addr, len), call);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn after_random(
        &self,
        model: &mut Model,
        dev: &Device,
        d: usize,
        cmd: u32,
        buf: &[u8],
        errno: Option<i32>,
        call: &str,
    ) {
        self.judge(call, Want::Any(DOCUMENTED), errno);
        if errno.is_some() {
            return;
        }
        if cmd == uapi::IOCTL_RESTORE {
            // It named a handle of ours, rightly: the model follows.
            let handle = u64::from_ne_bytes(buf[8..16].try_into().unwrap());
            if let Some(i) = model.live.iter().position(|l| l.handle == handle) {
                for (addr, bytes) in &model.live.swap_remove(i).sites {
                    self.holds(*addr, self.file(*addr, bytes.len()), call);
                }
            }
            return;
        }
        // A random PATCH or PATCH_BATCH that went through patched a page of
        // ours (random_call aims only there) or nothing: give it back.
        let handle = match cmd {
            uapi::IOCTL_PATCH => u64::from_ne_bytes(buf[56..64].try_into().unwrap()),
            uapi::IOCTL_PATCH_BATCH => u64::from_ne_bytes(buf[24..32].try_into().unwrap()),
            _ => return,
        };
        if model.live.iter().any(|l| l.handle == handle) {
            return;
        }
        if let Err(e) = dev.restore(handle) {
            self.problem(format!(
                "{call}: RESTORE of its handle {handle} (file {d}): {e}"
            ));
        }
    }

    /// File `d` was closed: its patches that were not persistent are
    /// restored.
    fn closed(&self, model: &mut Model, d: usize) {
        let (gone, kept): (Vec<Live>, Vec<Live>) = std::mem::take(&mut model.live)
            .into_iter()
            .partition(|l| l.dev == d && !l.persist);
        model.live = kept;
        for (addr, bytes) in gone.iter().flat_map(|l| &l.sites) {
            self.holds(*addr, self.file(*addr, bytes.len()), "closing a file");
        }
    }

    /// Anything: random command numbers, sizes, flags, pids and addresses
    /// (addresses in the text only on pages of ours).
    fn random_call(
        &self,
        rng: &mut Rng,
        model: &Model,
        buf: &mut [u8],
        handle: u64,
    ) -> (u32, &'static str) {
        let pids = [self.pid, 2, 0, -1, i32::MAX, 999_999];
        let own = (2 * rng.below(3) as usize + model.me) * text::PAGE;
        let addrs = [
            self.text + own as u64,
            self.text + (511 * text::PAGE + 0xffa) as u64 - (1 - model.me as u64) * 0x1000,
            0,
            0x1000,
            0xffff_ffff_8100_0000,
            0xffff_8880_0000_0000,
            u64::MAX,
            0x7fff_ffff_f000,
        ];
        let nr = rng.pick(&[1u32, 1, 2, 3, 0, 4, 5, 200]);
        let size = match rng.below(3) {
            0 => rng.below(257) as usize,
            _ => [64usize, 16, 88, 40][(nr as usize).saturating_sub(1).min(3)],
        };
        let cmd = if rng.below(4) == 0 {
            rng.next() as u32
        } else {
            uapi::iowr(nr, size)
        };
        match rng.below(3) {
            0 => {
                let mut a = PatchArgs {
                    size: if rng.below(4) == 0 {
                        rng.next() as u32
                    } else {
                        64
                    },
                    flags: rng.next() as u32 & rng.pick(&[0xf, u32::MAX]),
                    pid: rng.pick(&pids),
                    len: rng.pick(&[0u32, 1, 6, 16, 17, 4096, u32::MAX]),
                    addr: rng.pick(&addrs),
                    ..Default::default()
                };
                a.bytes[..6].copy_from_slice(&text::mov_eax_ret(rng.next() as u32));
                a.bytes[6..].fill(0xcc);
                buf[..std::mem::size_of::<PatchArgs>()].copy_from_slice(pod_bytes(&a));
            }
            1 => {
                let any = rng.next() as u32;
                let r = RestoreArgs {
                    size: rng.pick(&[8, 16, 24, any]),
                    // Never RESTORE_DROP: root's way to leave a patch in
                    // place, which the model would then disagree with.
                    flags: rng.below(4) as u32 & !uapi::RESTORE_DROP,
                    handle,
                };
                buf[..std::mem::size_of::<RestoreArgs>()].copy_from_slice(pod_bytes(&r));
            }
            _ => {} // random bytes
        }
        (cmd, "random")
    }
}

/// Run this thread on CPU `cpu`, if there is one: the two threads then
/// call from both vCPUs at once.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t, one CPU set in it, applied to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let seconds = get("--seconds").unwrap_or(10);
    let seed = get("--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    // First, so that a run that crashes the kernel can still be repeated.
    println!("# seed {seed} (repeat with: hugepoke-fuzz --seconds {seconds} --seed {seed})");
    let _ = std::io::stdout().flush();

    let mut t = Target::spawn(&["--spin"]).expect("thp-target");
    let fuzz = Fuzz {
        pid: t.pid,
        text: t.addr,
        blob: text::blob(),
        results: Mutex::new(BTreeMap::new()),
        checks: Mutex::new(BTreeMap::new()),
        problems: Mutex::new(Vec::new()),
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut problems = Vec::new();
    let calls: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2usize)
            .map(|i| {
                let fuzz = &fuzz;
                let seed = seed ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f);
                s.spawn(move || fuzz.thread(i, seed, deadline))
            })
            .collect();
        threads
            .into_iter()
            .map(|th| {
                th.join().unwrap_or_else(|_| {
                    problems.push("a fuzzing thread panicked".to_string());
                    0
                })
            })
            .sum()
    });
    problems.extend(fuzz.problems.lock().unwrap().drain(..));
    after_the_fuzz(&mut t, &mut problems);
    t.kill();
    let results = fuzz.results.lock().unwrap();
    println!("# fuzz: seed {seed}, {calls} ioctls from 2 threads (one on each CPU) in {seconds} s: {results:?}");
    let mix: BTreeMap<&str, u64> = results.iter().fold(BTreeMap::new(), |mut m, (k, n)| {
        let cmd = k
            .strip_prefix("ok(")
            .map_or("failed", |c| c.trim_end_matches(')'));
        *m.entry(cmd).or_default() += n;
        m
    });
    println!(
        "# fuzz: succeeded by command {mix:?}; checks {:?}",
        fuzz.checks.lock().unwrap()
    );
    // A module that refused everything would contradict the model; this
    // says the run reached the write at all.
    let wrote = results.get("ok(PATCH)").copied().unwrap_or(0)
        + results.get("ok(PATCH_BATCH)").copied().unwrap_or(0);
    println!(
        "# fuzz: {wrote} of {calls} calls ({}%) wrote a patch",
        wrote * 100 / calls.max(1)
    );
    if wrote * 3 < calls {
        problems.push(format!(
            "only {wrote} of {calls} calls patched (want a third at least)"
        ));
    }
    for p in &problems {
        println!("# problem: {p}");
    }
    std::process::exit(i32::from(!problems.is_empty()));
}

/// Restore what is left, then check the target.
fn after_the_fuzz(t: &mut Target, problems: &mut Vec<String>) {
    // The fuzzing files are closed: their patches are restored.  Persistent
    // ones (random flags include PATCH_PERSIST) are restored by handle, as
    // a user would.
    match Device::open() {
        Ok(dev) => {
            let left = proc::debugfs("patches").unwrap_or_default();
            // A line per site: a batch's handle stands on several.
            let handles: std::collections::BTreeSet<u64> = left
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
                .collect();
            for handle in handles {
                if let Err(e) = dev.restore(handle) {
                    problems.push(format!("RESTORE of persistent patch {handle}: {e}"));
                }
            }
        }
        Err(e) => problems.push(format!("opening /dev/hugepoke: {e}")),
    }
    match proc::debugfs("patches") {
        // Only the header: a "# a target is busy" line would hide patches.
        Ok(p) if p.lines().all(|l| l.starts_with("# handle ")) => {}
        Ok(p) => problems.push(format!("patches left:\n{p}")),
        Err(e) => problems.push(e.to_string()),
    }
    // Alive, and its text is the file's, byte for byte.
    if let Err(e) = t.call(0) {
        problems.push(format!("target died: {e}"));
        return;
    }
    let mut now = vec![0u8; text::THP_SIZE];
    match std::fs::File::open(format!("/proc/{}/mem", t.pid)) {
        Ok(mem) => {
            use std::os::unix::fs::FileExt;
            match mem.read_exact_at(&mut now, t.addr) {
                Ok(()) => {
                    if let Some(at) = now.iter().zip(text::blob()).position(|(a, b)| *a != b) {
                        problems.push(format!(
                            "text differs from the file at offset {at:#x} (page {})",
                            at / text::PAGE
                        ));
                    }
                }
                Err(e) => problems.push(format!("reading the target's text: {e}")),
            }
        }
        Err(e) => problems.push(format!("opening the target's memory: {e}")),
    }
    // No anonymous memory, and the collapse (asynchronous) maps the PMD again.
    let begin = Instant::now();
    loop {
        let _ = t.call(0);
        let s = proc::smaps_entry(t.pid, t.addr).unwrap_or_default();
        if s.pmd_mapped_kb() == 2048 && s.kb("Anonymous") == 0 {
            println!(
                "# fuzz: PMD back, no anonymous memory, {:.2} s after the run",
                begin.elapsed().as_secs_f64()
            );
            break;
        }
        if begin.elapsed() > Duration::from_secs(30) {
            problems.push(format!("30 s after the run: {s:?}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The bytes of a plain-old-data ABI struct.
fn pod_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: the ABI structs are `repr(C)` integers and byte arrays without
    // padding; reading their bytes is fine.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}
