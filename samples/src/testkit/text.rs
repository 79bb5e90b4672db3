//! The text that THP targets execute: a 2 MiB blob of tiny functions, one at
//! the start of every 4 KiB page, so that each page's code is observable.

pub const THP_SIZE: usize = 2 << 20;
pub const PAGE: usize = 4096;
pub const PAGES: usize = THP_SIZE / PAGE;

/// What the function at the start of page `page` returns, unpatched.
pub fn original_value(page: usize) -> u32 {
    1000 + page as u32
}

/// What the stress test patches page `page` to return.
pub fn stress_value(page: usize) -> u32 {
    5000 + page as u32
}

/// `mov eax, imm32; ret` — six bytes of x86-64.
pub fn mov_eax_ret(value: u32) -> [u8; 6] {
    let v = value.to_le_bytes();
    [0xb8, v[0], v[1], v[2], v[3], 0xc3]
}

/// Code that returns `value` (< 65536) in `eax`, one encoding per entry,
/// with instruction boundaries that differ from `mov eax, imm32; ret`'s
/// (at 0 and 5) and from each other's: a CPU that ran a stale or
/// half-written mix of old and new bytes would start an instruction in the
/// middle of another, and crash or return something else.
pub fn encodings_returning(value: u32) -> [Vec<u8>; 6] {
    assert!(value < 1 << 16);
    let v = value.to_le_bytes();
    let cat = |parts: &[&[u8]]| parts.concat();
    [
        // mov eax, imm32; ret: boundaries 0, 5
        mov_eax_ret(value).to_vec(),
        // xor eax, eax; add eax, imm32; ret: 0, 2, 7
        cat(&[&[0x31, 0xc0, 0x05], &v, &[0xc3]]),
        // push imm32; pop rax; ret: 0, 5, 6
        cat(&[&[0x68], &v, &[0x58, 0xc3]]),
        // lea eax, [imm32]; ret: 0, 7
        cat(&[&[0x8d, 0x04, 0x25], &v, &[0xc3]]),
        // mov ax, imm16; movzx eax, ax; ret: 0, 4, 7
        cat(&[&[0x66, 0xb8], &v[..2], &[0x0f, 0xb7, 0xc0, 0xc3]]),
        // nine nops; mov eax, imm32; ret: 0 to 9, 14 (15 bytes)
        cat(&[&[0x90; 9], &mov_eax_ret(value)]),
    ]
}

/// The whole blob: each page starts with its function, the rest is `int3`.
pub fn blob() -> Vec<u8> {
    let mut b = vec![0xcc; THP_SIZE];
    for page in 0..PAGES {
        b[page * PAGE..page * PAGE + 6].copy_from_slice(&mov_eax_ret(original_value(page)));
    }
    b
}

/// The log a `thp-target` watcher thread keeps in shared memory: how many
/// calls it has made, and each change of the value they returned (the
/// iteration it was first seen at, the value), in a ring of `WATCH_LOG`.
#[repr(C)]
pub struct Watch {
    /// Calls completed.
    pub iterations: AtomicU64,
    /// Changes recorded so far (the ring holds the last `WATCH_LOG`).
    pub changes: AtomicU64,
    log: [[AtomicU64; 2]; WATCH_LOG],
}

pub const WATCH_LOG: usize = 1024;

use std::sync::atomic::{AtomicU64, Ordering};

impl Watch {
    /// Writer side (one thread): `value` first seen at call `iteration`.
    pub fn record_change(&self, iteration: u64, value: u32) {
        let n = self.changes.load(Ordering::Relaxed);
        let slot = &self.log[n as usize % WATCH_LOG];
        slot[0].store(iteration, Ordering::Relaxed);
        slot[1].store(value as u64, Ordering::Relaxed);
        self.changes.store(n + 1, Ordering::Release);
    }

    /// Reader side: change number `n` as `(iteration, value)`, if it is
    /// still in the ring.
    pub fn change(&self, n: u64) -> Option<(u64, u32)> {
        if n >= self.changes.load(Ordering::Acquire) {
            return None;
        }
        let slot = &self.log[n as usize % WATCH_LOG];
        let entry = (
            slot[0].load(Ordering::Relaxed),
            slot[1].load(Ordering::Relaxed) as u32,
        );
        // The slot is overwritten WATCH_LOG changes later: check after reading.
        let total = self.changes.load(Ordering::Acquire);
        (total - n <= WATCH_LOG as u64).then_some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_log_ring() {
        // SAFETY: all-zero bytes are valid atomics: an empty log.
        let w = unsafe { Box::<Watch>::new_zeroed().assume_init() };
        assert_eq!(w.change(0), None);
        w.record_change(0, 1070);
        w.record_change(5, 7001);
        assert_eq!(w.change(0), Some((0, 1070)));
        assert_eq!(w.change(1), Some((5, 7001)));
        assert_eq!(w.change(2), None);
        for i in 0..WATCH_LOG as u64 {
            w.record_change(10 + i, i as u32);
        }
        // Overwritten: the ring keeps the last WATCH_LOG changes.
        assert_eq!(w.change(1), None);
        assert_eq!(w.change(2), Some((10, 0)));
    }

    #[test]
    fn blob_layout() {
        let b = blob();
        assert_eq!(b.len(), THP_SIZE);
        assert_eq!(&b[0..6], &[0xb8, 0xe8, 0x03, 0, 0, 0xc3]);
        assert_eq!(&b[5 * PAGE..5 * PAGE + 6], &mov_eax_ret(1005));
        assert_eq!(b[6], 0xcc);
        assert_eq!(b[THP_SIZE - 1], 0xcc);
    }

    /// Every encoding runs and returns its value (on this x86-64 host).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn encodings_return_their_value() {
        // SAFETY: a fresh private RWX page of our own; each encoding is a
        // complete function ending in `ret`, followed by int3 padding.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let code = std::slice::from_raw_parts_mut(p.cast::<u8>(), PAGE);
            let mut boundaries = std::collections::BTreeSet::new();
            for (i, e) in encodings_returning(5007).iter().enumerate() {
                assert!(
                    e.len() <= crate::uapi::MAX_BYTES,
                    "encoding {i} is {} bytes",
                    e.len()
                );
                code.fill(0xcc);
                code[..e.len()].copy_from_slice(e);
                let f: extern "C" fn() -> u32 = std::mem::transmute(p);
                assert_eq!(f(), 5007, "encoding {i}");
                boundaries.insert(e.len());
            }
            // Lengths differ (one of the ways boundaries differ).
            assert!(boundaries.len() >= 4);
            libc::munmap(p, PAGE);
        }
    }
}
