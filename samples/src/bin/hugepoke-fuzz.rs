//! Fuzz /dev/hugepoke: random commands, sizes, structs, pids and addresses
//! (user, kernel, unmapped, the target's text) and pointers (good, null,
//! unmapped, kernel), for a bounded time.  Afterwards the target must be
//! alive and unpatched once the fuzzing files are closed, and no patch left.
//!
//!   hugepoke-fuzz [--seconds S] [--seed N]
//!
//! The guest runner fails the run if dmesg shows any kernel report.

use hugepoke::device::Device;
use hugepoke::proc;
use hugepoke::target::Target;
use hugepoke::text;
use hugepoke::uapi::{self, PatchArgs, QueryArgs, RestoreArgs};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<u64>().ok());
    let seconds = get("--seconds").unwrap_or(10);
    let seed = get("--seed").unwrap_or_else(|| Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64 ^ 0x5eed);
    let mut rng = Rng(seed | 1);

    let mut t = Target::spawn(&[]).expect("thp-target");
    // Only the target may be hit for real: as root, hugepoke would patch any
    // process (init, ourselves) whose text a random address happens to hit.
    let pids = [t.pid, t.pid, t.pid, 2, 0, -1, i32::MAX, 999_999];
    let text_addr = t.addr;
    let addrs = [
        text_addr,
        text_addr + 0x1000 * 7 + 3,
        text_addr + 0x1ffffa,
        0,
        0x1000,
        0xffff_ffff_8100_0000,
        0xffff_8880_0000_0000,
        u64::MAX,
        0x7fff_ffff_f000,
    ];
    // The argument buffer: one page, then a PROT_NONE guard page, so that a
    // pointer running off its end faults (EFAULT) instead of hitting our heap.
    // SAFETY: a fresh private mapping of two pages, the second made
    // inaccessible; `buf` covers only the first.
    let buf: &mut [u8] = unsafe {
        let p = libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        assert!(p != libc::MAP_FAILED);
        libc::mprotect(p.cast::<u8>().add(4096).cast(), 4096, libc::PROT_NONE);
        std::slice::from_raw_parts_mut(p.cast::<u8>(), 4096)
    };
    let mut devs: Vec<Device> = (0..3).map(|_| Device::open().expect("/dev/hugepoke")).collect();
    let mut handles: Vec<u64> = vec![0, 1, u64::MAX];
    let mut results: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    let mut iterations = 0u64;

    while start.elapsed() < Duration::from_secs(seconds) {
        iterations += 1;
        if rng.below(200) == 0 {
            // Closing a file restores its patches; open a fresh one.
            let i = rng.below(devs.len() as u64) as usize;
            devs[i] = Device::open().expect("/dev/hugepoke");
        }
        let dev = &devs[rng.below(devs.len() as u64) as usize];
        let nr = rng.pick(&[1u32, 1, 1, 2, 2, 3, 3, 0, 4, 200]);
        let size = match rng.below(4) {
            0 => rng.below(257) as usize,
            _ => [64usize, 16, 80][(nr as usize).saturating_sub(1).min(2)],
        };
        let cmd = if rng.below(10) == 0 { rng.next() as u32 } else { uapi::iowr(nr, size) };
        // Fill the argument: random bytes, then plausible fields now and then.
        for b in buf.iter_mut() {
            *b = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            let mut a = PatchArgs {
                size: if rng.below(8) == 0 { rng.next() as u32 } else { 64 },
                flags: if rng.below(4) == 0 { rng.next() as u32 } else { rng.below(8) as u32 },
                pid: rng.pick(&pids),
                len: rng.pick(&[0u32, 1, 2, 6, 16, 17, 4096, u32::MAX]),
                addr: rng.pick(&addrs).wrapping_add(rng.below(3) * 0x1000),
                ..Default::default()
            };
            a.bytes = text::mov_eax_ret(rng.next() as u32).iter().chain([0xcc; 10].iter()).copied().collect::<Vec<_>>().try_into().unwrap();
            a.expect = a.bytes;
            let raw = unsafe_bytes(&a);
            buf[..raw.len()].copy_from_slice(raw);
        } else if rng.below(2) == 0 {
            let h = rng.pick(&handles);
            let r = RestoreArgs { size: if rng.below(8) == 0 { 8 } else { 16 }, flags: rng.below(2) as u32, handle: h };
            let raw = unsafe_bytes(&r);
            buf[..raw.len()].copy_from_slice(raw);
            if nr == 3 {
                let q = QueryArgs { size: 80, handle: h, ..Default::default() };
                let raw = unsafe_bytes(&q);
                buf[..raw.len()].copy_from_slice(raw);
            }
        }
        let ptr = match rng.below(10) {
            0 => 0usize,
            1 => 1,
            2 => 0xffff_ffff_8100_0000,
            3 => buf.as_ptr() as usize + 4096 - rng.below(64) as usize, // runs off the end
            _ => buf.as_mut_ptr() as usize,
        };
        if std::env::var_os("HUGEPOKE_FUZZ_TRACE").is_some() {
            eprintln!("# {iterations}: cmd {cmd:#x} ptr {ptr:#x} {:02x?}", &buf[..64]);
        }
        let r = dev.ioctl_raw(cmd, ptr);
        let key = match &r {
            Ok(()) => format!("ok({nr})"),
            Err(e) => match (hugepoke::errno_name(e.raw_os_error().unwrap_or(0)), e.raw_os_error()) {
                ("E?", Some(n)) => format!("errno {n}"),
                (name, _) => name.to_string(),
            },
        };
        *results.entry(key).or_default() += 1;
        if r.is_ok() && cmd == uapi::IOCTL_PATCH && ptr == buf.as_mut_ptr() as usize {
            let h = u64::from_ne_bytes(buf[56..64].try_into().unwrap());
            handles.push(h);
        }
    }
    drop(devs);
    // Closing restored the file-owned patches; persistent ones (random flags
    // include PATCH_PERSIST) are restored by handle, as a user would.
    let dev = Device::open().expect("/dev/hugepoke");
    let left = proc::debugfs("patches").unwrap_or_default();
    for handle in left.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(' ').next()?.parse::<u64>().ok()) {
        let _ = dev.restore(handle);
    }

    let mut problems = Vec::new();
    for page in 0..text::PAGES {
        match t.call(page) {
            Ok(v) if v == text::original_value(page) => {}
            Ok(v) => {
                problems.push(format!("page {page} returns {v} after all files closed"));
                break;
            }
            Err(e) => {
                problems.push(format!("target died: {e}"));
                break;
            }
        }
    }
    match proc::debugfs("patches") {
        Ok(p) if p.lines().count() == 1 => {}
        Ok(p) => problems.push(format!("patches left:\n{p}")),
        Err(e) => problems.push(e.to_string()),
    }
    t.kill();
    println!("# fuzz: seed {seed}, {iterations} ioctls in {seconds} s: {results:?}");
    for p in &problems {
        println!("# problem: {p}");
    }
    std::process::exit(i32::from(!problems.is_empty()));
}

/// The bytes of a plain-old-data ABI struct.
fn unsafe_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: the ABI structs are `repr(C)` integers and byte arrays without
    // padding; reading their bytes is fine.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}
