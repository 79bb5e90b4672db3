//! What a thread executing the text sees while it is patched and restored
//! under it, from another CPU.

use crate::common::*;
use crate::races::pin_to_cpu;
use crate::TestResult;
use hugepoke::testkit::text::{Watch, WATCH_LOG};
use std::sync::atomic::Ordering;

/// The target's watcher log (see `thp-target watch`), mapped shared.
struct WatchMap {
    watch: *const Watch,
    /// The target, to tell a crash from a slow spinner.
    pid: i32,
    /// Changes read so far, in order: (iteration first seen at, value).
    seen: Vec<(u64, u32)>,
}

impl WatchMap {
    fn open(pid: i32, fd: i32) -> Result<Self, String> {
        use std::os::fd::AsRawFd;
        let file = io(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/{fd}")))?;
        let len = std::mem::size_of::<Watch>();
        // SAFETY: a shared mapping of the target's memfd, as long as the
        // memfd; only ever accessed through the atomics of `Watch`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        ensure!(
            p != libc::MAP_FAILED,
            "mmap of the watch log: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self {
            watch: p as *const Watch,
            pid,
            seen: Vec::new(),
        })
    }

    fn watch(&self) -> &Watch {
        // SAFETY: mapped in `open`, unmapped only in drop.
        unsafe { &*self.watch }
    }

    fn iterations(&self) -> u64 {
        self.watch().iterations.load(Ordering::Acquire)
    }

    /// Read the changes logged since the last call.
    fn read(&mut self) -> TestResult {
        let total = self.watch().changes.load(Ordering::Acquire);
        for n in self.seen.len() as u64..total {
            let change = self.watch().change(n).ok_or(format!(
                "watch log overflowed ({total} changes, ring of {WATCH_LOG})"
            ))?;
            self.seen.push(change);
        }
        Ok(())
    }

    /// Wait until the spinner has been seen returning `value` at or after
    /// change `from`; the iteration it first did.
    fn wait_for_value(&mut self, what: &str, from: usize, value: u32) -> Result<u64, String> {
        let mut at = None;
        let stat = format!("/proc/{}/stat", self.pid);
        wait_for(what, Duration::from_secs(30), || {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            ensure!(
                state
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with(['Z', 'X'])),
                "the target died (its spinner crashed?) while waiting for: {what}"
            );
            self.read()?;
            at = self.seen[from..]
                .iter()
                .find(|(_, v)| *v == value)
                .map(|(i, _)| *i);
            Ok(at.is_some())
        })
        .map_err(|e| format!("{e}; values seen since: {:?}", &self.seen[from..]))?;
        Ok(at.unwrap())
    }
}

impl Drop for WatchMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping from `open`.
        unsafe {
            libc::munmap(
                self.watch as *mut libc::c_void,
                std::mem::size_of::<Watch>(),
            )
        };
    }
}

/// Code of different lengths for the function at the start of a page; each
/// returns its value.
fn sequences() -> Vec<(&'static str, Vec<u8>, u32)> {
    let mut long = vec![0x66, 0x90]; // 2-byte nop
    long.extend_from_slice(&text::mov_eax_ret(7002));
    let mut sixteen = vec![0x48, 0xc7, 0xc0]; // mov rax, imm32
    sixteen.extend_from_slice(&7003u32.to_le_bytes());
    sixteen.extend_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x66, 0x90, 0x90, 0xc3]); // nops, ret
    vec![
        (
            "mov eax, imm32; ret (same length)",
            text::mov_eax_ret(7001).to_vec(),
            7001,
        ),
        ("xor eax, eax; ret (3 bytes)", vec![0x31, 0xc0, 0xc3], 0),
        (
            "2-byte nop; mov eax, imm32; ret (8 bytes, over int3)",
            long,
            7002,
        ),
        (
            "push 0x55; pop rax; ret (4 bytes)",
            vec![0x6a, 0x55, 0x58, 0xc3],
            0x55,
        ),
        ("mov rax, imm32; nops; ret (16 bytes)", sixteen, 7003),
    ]
}

/// A thread of the target spins on the function of one page, pinned to the
/// other CPU, while the test PATCHes it with code of other lengths and
/// RESTOREs it, again and again.  After each PATCH returns, the spinner
/// must see the new value within `LAG` calls, and after each RESTORE the
/// original; it must never see anything but whole old or whole new code
/// (a torn instruction shows as another value, or kills it with SIGSEGV,
/// SIGILL or SIGTRAP).
///
/// Under TCG: QEMU invalidates translated code when the page it came from
/// is written, whichever vCPU writes, so stale code can only come from a
/// stale TLB entry — which TCG's per-vCPU TLB does keep without a flush.
/// With PATCH's and RESTORE's TLB flush removed (mutant `no-tlb-flush`),
/// the spinner kept running the page RESTORE had zapped (freed) for 30 s
/// after the next PATCH returned (in round 3 of one run, round 6 of
/// another): that PATCH's COW fills an empty PTE, which flushes nothing.
/// Torn code (the flush's other job: no CPU executes the page while it is
/// half-written) was not seen in those runs; its window is two stores wide.
pub(crate) fn spinner_sees_each_patch_and_restore_whole_and_at_once() -> TestResult {
    const PAGE: usize = 70;
    const ROUNDS: usize = 20;
    /// Calls the spinner may make after the ioctl returned before it runs
    /// the new code: the one in flight, and one for the log's bookkeeping.
    const LAG: u64 = 2;
    pin_to_cpu(0, 0)?;
    let mut t = Target::spawn(&[])?;
    thp_head(&t)?;
    let reply = t.command(&format!("watch {PAGE} 1"))?;
    let fd: i32 = reply
        .strip_prefix("watching fd=")
        .and_then(|f| f.parse().ok())
        .ok_or(format!("watch said {reply:?}"))?;
    let mut w = WatchMap::open(t.pid, fd)?;
    let original = text::original_value(PAGE);
    w.wait_for_value("the spinner running", 0, original)?;
    let dev = io(Device::open())?;
    let addr = t.page_addr(PAGE);
    let seqs = sequences();
    let (mut max_lag, mut ops) = (0, 0);
    let result = (|| -> TestResult {
        for round in 0..ROUNDS {
            for (what, bytes, value) in &seqs {
                w.read()?;
                let from = w.seen.len();
                let h = io(dev.patch(&PatchRequest {
                    pid: t.pid,
                    addr,
                    bytes: bytes.clone(),
                    ..Default::default()
                }))?;
                let returned_at = w.iterations();
                let seen_at =
                    w.wait_for_value(&format!("round {round}: {what} seen"), from, *value)?;
                ensure!(
                    seen_at <= returned_at + LAG,
                    "round {round}: PATCH {what} returned at call {returned_at}; the spinner first returned {value} at call {seen_at}"
                );
                max_lag = max_lag.max(seen_at.saturating_sub(returned_at));

                w.read()?;
                let from = w.seen.len();
                io(dev.restore(h))?;
                let returned_at = w.iterations();
                let seen_at =
                    w.wait_for_value(&format!("round {round}: {what} restored"), from, original)?;
                ensure!(
                    seen_at <= returned_at + LAG,
                    "round {round}: RESTORE of {what} returned at call {returned_at}; the spinner first returned {original} at call {seen_at}"
                );
                max_lag = max_lag.max(seen_at.saturating_sub(returned_at));
                ops += 2;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let died = std::fs::read_to_string(format!("/proc/{}/stat", t.pid))
            .map_or(true, |s| s.contains(") Z"));
        let how = if died {
            format!(" (the target was killed by signal {:?})", t.wait_signal())
        } else {
            String::new()
        };
        return Err(format!("{e}{how}"));
    }
    w.read()?;
    let allowed: Vec<u32> = std::iter::once(original)
        .chain(seqs.iter().map(|s| s.2))
        .collect();
    let torn: Vec<_> = w
        .seen
        .iter()
        .filter(|(_, v)| !allowed.contains(v))
        .collect();
    ensure!(
        torn.is_empty(),
        "the spinner saw code that is neither old nor new: (call, value) {torn:?}"
    );
    ensure!(
        t.call(PAGE)? == original,
        "target's page {PAGE} not original at the end"
    );
    let calls = w.iterations();
    println!("# {ops} PATCH/RESTOREs under a spinner ({calls} calls, {} changes seen): each seen at most {max_lag} calls after the ioctl returned", w.seen.len());
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        spinner_sees_each_patch_and_restore_whole_and_at_once,
    ];
}
