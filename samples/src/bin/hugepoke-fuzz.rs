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
    /// Handles PATCH returned (restored or not).
    handles: Mutex<Vec<u64>>,
    results: Mutex<BTreeMap<String, u64>>,
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

impl Fuzz {
    fn count(&self, key: String) {
        *self.results.lock().unwrap().entry(key).or_default() += 1;
    }

    /// A valid-looking PATCH of the target's text into `buf`.
    fn plausible_patch(&self, rng: &mut Rng, buf: &mut [u8]) {
        let page = if rng.below(4) == 0 {
            0
        } else {
            rng.below(text::PAGES as u64) as usize
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
        // The file's bytes there (right unless patched), or random ones.
        let function = text::mov_eax_ret(text::original_value(page));
        for (i, e) in a.expect[..len].iter_mut().enumerate() {
            *e = function.get(offset + i).copied().unwrap_or(0xcc);
        }
        if rng.below(4) == 0 {
            a.expect[rng.below(len as u64) as usize] ^= 1;
        }
        buf[..std::mem::size_of::<PatchArgs>()].copy_from_slice(pod_bytes(&a));
    }

    /// A valid-looking site of the target's text, as `plausible_patch`'s.
    fn plausible_site(&self, rng: &mut Rng) -> BatchSite {
        let mut buf = [0u8; std::mem::size_of::<PatchArgs>()];
        self.plausible_patch(rng, &mut buf);
        // SAFETY: `buf` holds the bytes of a PatchArgs, which has no padding
        // and no invalid bit patterns.
        let a: PatchArgs = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        // Now and then a flag no site may carry (PATCH_INSTALL_PMD is the batch's).
        let stray = if rng.below(16) == 0 {
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
    /// pointer.
    fn plausible_batch(&self, rng: &mut Rng, buf: &mut [u8], heap: &mut Vec<BatchSite>) {
        const SITE: usize = std::mem::size_of::<BatchSite>();
        let any = rng.next() as u32;
        let count: u32 = match rng.below(10) {
            0 => rng.pick(&[
                0,
                uapi::MAX_BATCH as u32,
                uapi::MAX_BATCH as u32 + 1,
                u32::MAX,
                any,
            ]),
            1 => 1 + rng.below(200) as u32,
            _ => 1 + rng.below(6) as u32,
        };
        // What the kernel may read: at most MAX_BATCH + 1 sites are built.
        let built = (count as usize).min(uapi::MAX_BATCH + 1);
        heap.clear();
        heap.extend((0..built).map(|_| self.plausible_site(rng)));
        let in_page = (4096 - std::mem::size_of::<PatchBatchArgs>()) / SITE;
        let sites = match rng.below(10) {
            0 => 0,
            1 => rng.pick(&[0xffff_ffff_8100_0000u64, 0x1000, u64::MAX - 47]),
            2 | 3 => {
                // The last k sites of the page; more than k run into the guard page.
                let k = built.min(in_page);
                let at = 4096 - k * SITE;
                for (i, site) in heap[..k].iter().enumerate() {
                    buf[at + i * SITE..at + (i + 1) * SITE].copy_from_slice(pod_bytes(site));
                }
                buf.as_ptr() as u64 + at as u64
            }
            _ => heap.as_ptr() as u64,
        };
        let a = PatchBatchArgs {
            size: if rng.below(16) == 0 {
                rng.pick(&[0, 32, 48, 64])
            } else {
                std::mem::size_of::<PatchBatchArgs>() as u32
            },
            flags: match rng.below(6) {
                0 => uapi::PATCH_PERSIST,
                1 => uapi::PATCH_INSTALL_PMD,
                2 => rng.below(8) as u32,
                _ => 0,
            },
            pid: if rng.below(16) == 0 {
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
    }

    /// One thread's fuzzing, until `deadline`; returns its ioctl count.
    fn thread(&self, seed: u64, deadline: Instant) -> u64 {
        let mut rng = Rng::new(seed);
        let mut arg = ArgPage::new();
        let buf = arg.buf();
        let pids = [self.pid, 2, 0, -1, i32::MAX, 999_999];
        let addrs = [
            self.text,
            self.text + 0x1ffffa,
            0,
            0x1000,
            0xffff_ffff_8100_0000,
            0xffff_8880_0000_0000,
            u64::MAX,
            0x7fff_ffff_f000,
        ];
        let mut devs: Vec<Device> = (0..2)
            .map(|_| Device::open().expect("/dev/hugepoke"))
            .collect();
        let mut heap: Vec<BatchSite> = Vec::with_capacity(uapi::MAX_BATCH + 1);
        let trace = std::env::var_os("HUGEPOKE_FUZZ_TRACE").is_some();
        let mut calls = 0u64;
        while Instant::now() < deadline {
            calls += 1;
            if rng.below(200) == 0 {
                // Closing a file restores its patches; open a fresh one.
                let i = rng.below(devs.len() as u64) as usize;
                devs[i] = Device::open().expect("/dev/hugepoke");
            }
            let dev = &devs[rng.below(devs.len() as u64) as usize];
            buf.iter_mut().for_each(|b| *b = rng.next() as u8);
            // The same draws whatever the handles are, so that a seed
            // repeats the sequence of choices.
            let (which, any, recent) = (rng.below(8), rng.next(), rng.next());
            let handle = {
                let handles = self.handles.lock().unwrap();
                match (handles.len(), which) {
                    (0, _) | (_, 0) => [0, 1, u64::MAX, any][(recent % 4) as usize],
                    // Mostly recent ones: they may still be live.
                    (n, _) => handles[n - 1 - (recent % n.min(16) as u64) as usize],
                }
            };
            let (cmd, name) = match rng.below(100) {
                0..=44 => {
                    self.plausible_patch(&mut rng, buf);
                    (uapi::IOCTL_PATCH, "PATCH")
                }
                45..=69 => {
                    let r = RestoreArgs {
                        size: std::mem::size_of::<RestoreArgs>() as u32,
                        flags: 0,
                        handle,
                    };
                    buf[..std::mem::size_of::<RestoreArgs>()].copy_from_slice(pod_bytes(&r));
                    (uapi::IOCTL_RESTORE, "RESTORE")
                }
                70..=76 => {
                    let index = [0, 0, 1, (any >> 32) as u32 % 8, u32::MAX][(any % 5) as usize];
                    let q = QueryArgs {
                        size: std::mem::size_of::<QueryArgs>() as u32,
                        handle,
                        index,
                        ..Default::default()
                    };
                    buf[..std::mem::size_of::<QueryArgs>()].copy_from_slice(pod_bytes(&q));
                    (uapi::IOCTL_QUERY, "QUERY")
                }
                77..=88 => {
                    self.plausible_batch(&mut rng, buf, &mut heap);
                    (uapi::IOCTL_PATCH_BATCH, "PATCH_BATCH")
                }
                _ => self.random_call(&mut rng, buf, &pids, &addrs, handle),
            };
            let ptr = match rng.below(20) {
                0 => 0usize,
                1 => 0xffff_ffff_8100_0000,
                2 => buf.as_ptr() as usize + 4096 - rng.below(64) as usize, // runs off the end
                _ => buf.as_mut_ptr() as usize,
            };
            if trace {
                eprintln!(
                    "# {seed:#x} {calls}: cmd {cmd:#x} ptr {ptr:#x} {:02x?}",
                    &buf[..64]
                );
            }
            let r = dev.ioctl_raw(cmd, ptr);
            self.count(match &r {
                Ok(()) => format!("ok({name})"),
                Err(e) => match (
                    hugepoke::errno_name(e.raw_os_error().unwrap_or(0)),
                    e.raw_os_error(),
                ) {
                    ("E?", Some(n)) => format!("errno {n}"),
                    (errno, _) => errno.to_string(),
                },
            });
            if r.is_ok() && ptr == buf.as_mut_ptr() as usize {
                match cmd {
                    uapi::IOCTL_PATCH => self
                        .handles
                        .lock()
                        .unwrap()
                        .push(u64::from_ne_bytes(buf[56..64].try_into().unwrap())),
                    uapi::IOCTL_PATCH_BATCH => self
                        .handles
                        .lock()
                        .unwrap()
                        .push(u64::from_ne_bytes(buf[24..32].try_into().unwrap())),
                    _ => {}
                }
            }
        }
        calls
    }

    /// Anything: random command numbers, sizes, flags, pids and addresses.
    fn random_call(
        &self,
        rng: &mut Rng,
        buf: &mut [u8],
        pids: &[i32],
        addrs: &[u64],
        handle: u64,
    ) -> (u32, &'static str) {
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
                    pid: rng.pick(pids),
                    len: rng.pick(&[0u32, 1, 6, 16, 17, 4096, u32::MAX]),
                    addr: rng.pick(addrs).wrapping_add(rng.below(3) * 0x1000),
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
                    flags: rng.below(4) as u32,
                    handle,
                };
                buf[..std::mem::size_of::<RestoreArgs>()].copy_from_slice(pod_bytes(&r));
            }
            _ => {} // random bytes
        }
        (cmd, "random")
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
        handles: Mutex::new(Vec::new()),
        results: Mutex::new(BTreeMap::new()),
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut problems = Vec::new();
    let calls: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2u64)
            .map(|i| {
                let fuzz = &fuzz;
                s.spawn(move || fuzz.thread(seed ^ i.wrapping_mul(0xa076_1d64_78bd_642f), deadline))
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
    after_the_fuzz(&mut t, &mut problems);
    t.kill();
    println!(
        "# fuzz: seed {seed}, {calls} ioctls from 2 threads in {seconds} s: {:?}",
        fuzz.results.lock().unwrap()
    );
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
        Ok(p) if p.lines().all(|l| l.starts_with('#')) => {}
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
