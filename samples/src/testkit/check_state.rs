//! What a controller (hugepoke-stress) and the checking threads of its
//! target (thp-target --check-state) share: per text page, a word saying
//! which code the page must run now, so that a checker can tell "PATCH (or
//! RESTORE) returned, yet this CPU still runs the old code" from the
//! harmless "the call raced the ioctl".
//!
//! The controller publishes [`State::Patching`] before its PATCH ioctl and
//! [`State::Patched`] after it returns (likewise `Restoring`, `Original`
//! around RESTORE), each time with a new generation.  A checker reads the
//! word, calls the page's function, and reads the word again: only if both
//! reads saw the same generation did the whole call run after the ioctl
//! returned, and then it must have returned the value of that state.  The
//! kernel flushed every TLB before the ioctl returned, so there is no
//! legitimate reason for even one such miss; a checker tolerates
//! [`MISSES_ALLOWED`] in a row and exits on the next.  A checker that saw the right value says so
//! in `seen`; the controller waits for that before its next ioctl on the
//! page, so every state is observed, not just allowed.  Misses tolerated
//! and values excused (below) are counted per page, and the run reports
//! them.
//!
//! `--chaos` (the target itself `madvise(MADV_DONTNEED)`s patched pages,
//! which drops the patched copy, legitimately undoing the patch) bumps the
//! page's `dontneed` count before and after each madvise (odd while one is
//! in progress).  The controller records it before PATCH (`dontneed_before`);
//! a checker excuses the original value in `Patched` only if that count
//! moved, or was odd, since.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Pages a state file describes (the stress patches fewer).
pub const PAGES: usize = 64;
/// Wrong-value calls in a row, in one stable state, that a checker tolerates.
pub const MISSES_ALLOWED: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Original = 0,
    Patching = 1,
    Patched = 2,
    Restoring = 3,
}

impl State {
    fn from_word(w: u64) -> Self {
        match w & 3 {
            0 => State::Original,
            1 => State::Patching,
            2 => State::Patched,
            _ => State::Restoring,
        }
    }
}

#[repr(C)]
#[derive(Default)]
pub struct Slot {
    /// `generation << 2 | State`.
    word: AtomicU64,
    /// The newest generation a checker saw the right value in (low 32
    /// bits; a futex the controller sleeps on).
    pub seen: AtomicU32,
    /// Calls that ran wholly after the ioctl and still returned the value
    /// from before it (tolerated up to MISSES_ALLOWED in a row): counted,
    /// so that the run reports them.
    pub misses: AtomicU32,
    /// `dontneed` as the controller read it before its PATCH.
    pub dontneed_before: AtomicU64,
    /// Bumped by the chaos thread before and after each MADV_DONTNEED.
    pub dontneed: AtomicU64,
    /// Original values in `Patched` excused by such a MADV_DONTNEED.
    pub excused: AtomicU64,
}

impl Slot {
    /// The current (generation, state).
    pub fn load(&self) -> (u64, State) {
        let w = self.word.load(Ordering::Acquire);
        (w >> 2, State::from_word(w))
    }

    /// Publish `state` with the next generation (one writer per page);
    /// returns that generation.
    pub fn publish(&self, state: State) -> u64 {
        let generation = (self.word.load(Ordering::Relaxed) >> 2) + 1;
        self.word
            .store(generation << 2 | state as u64, Ordering::Release);
        generation
    }

    /// A checker saw the right value in `generation`: record it, and wake
    /// a controller waiting for it.
    pub fn confirm(&self, generation: u64) {
        let generation = generation as u32;
        if self.seen.fetch_max(generation, Ordering::Release) < generation {
            // SAFETY: FUTEX_WAKE on our own word of the shared mapping (a
            // shared futex: the waiter is another process).
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.seen.as_ptr(),
                    libc::FUTEX_WAKE,
                    i32::MAX,
                )
            };
            // The woken controller may be queued behind us on this CPU.
            std::thread::yield_now();
        }
    }

    /// Whether a checker has seen `generation`, after waiting at most
    /// about `limit` for it.
    pub fn wait_seen(&self, generation: u64, limit: Duration) -> bool {
        let generation = generation as u32;
        let seen = self.seen.load(Ordering::Acquire);
        if seen >= generation {
            return true;
        }
        let ts = libc::timespec {
            tv_sec: limit.as_secs() as libc::time_t,
            tv_nsec: limit.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on our own word of the shared mapping, with a
        // valid timeout; it returns at once if the word is not `seen` any more.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.seen.as_ptr(),
                libc::FUTEX_WAIT,
                seen,
                &ts as *const libc::timespec,
            )
        };
        self.seen.load(Ordering::Acquire) >= generation
    }

    /// Whether a MADV_DONTNEED may have dropped the patched copy since the
    /// controller's PATCH began.
    pub fn dontneed_since_patch(&self, dontneed_now: u64) -> bool {
        let before = self.dontneed_before.load(Ordering::Acquire);
        before % 2 == 1 || dontneed_now != before
    }
}

/// The shared state: a `MAP_SHARED` mapping of a memfd.
pub struct Shared {
    slots: *const Slot,
}

// SAFETY: the slots are atomics in a shared mapping that lives as long as
// the process (it is never unmapped).
unsafe impl Send for Shared {}
// SAFETY: as above; all access is through atomics.
unsafe impl Sync for Shared {}

pub const SIZE: usize = PAGES * std::mem::size_of::<Slot>();

impl Shared {
    /// A fresh, zeroed state in a memfd that a child inherits (no
    /// close-on-exec); returns it and the descriptor.
    pub fn create() -> std::io::Result<(Self, i32)> {
        // SAFETY: memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"hugepoke-check-state".as_ptr(), 0) };
        // SAFETY: ftruncate of our own fd (or none, when fd < 0).
        if fd < 0 || unsafe { libc::ftruncate(fd, SIZE as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((Self::map(fd)?, fd))
    }

    /// Map the state in descriptor `fd`.
    pub fn map(fd: i32) -> std::io::Result<Self> {
        // SAFETY: a shared mapping of SIZE bytes of the memfd, never unmapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { slots: p.cast() })
    }

    pub fn slot(&self, page: usize) -> &Slot {
        assert!(page < PAGES);
        // SAFETY: in bounds of the mapping; Slot is atomics only, valid for
        // any bit pattern (zero-filled memfd to start with).
        unsafe { &*self.slots.add(page) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bumps_the_generation_and_keeps_the_state() {
        let s = Slot::default();
        assert_eq!(s.load(), (0, State::Original));
        assert_eq!(s.publish(State::Patching), 1);
        assert_eq!(s.publish(State::Patched), 2);
        assert_eq!(s.load(), (2, State::Patched));
        assert_eq!(s.publish(State::Restoring), 3);
        assert_eq!(s.publish(State::Original), 4);
        assert_eq!(s.load(), (4, State::Original));
    }

    #[test]
    fn dontneed_excuses_only_when_one_may_have_run() {
        let s = Slot::default();
        s.dontneed_before.store(4, Ordering::Relaxed);
        assert!(!s.dontneed_since_patch(4));
        assert!(s.dontneed_since_patch(5));
        assert!(s.dontneed_since_patch(6));
        s.dontneed_before.store(5, Ordering::Relaxed);
        assert!(s.dontneed_since_patch(5));
    }

    #[test]
    fn shared_between_two_mappings() {
        let (a, fd) = Shared::create().unwrap();
        let b = Shared::map(fd).unwrap();
        a.slot(3).publish(State::Patched);
        assert_eq!(b.slot(3).load(), (1, State::Patched));
        assert!(!a.slot(3).wait_seen(1, Duration::from_millis(1)));
        let waiter = std::thread::spawn(move || a.slot(3).wait_seen(1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(10));
        b.slot(3).confirm(1);
        assert!(waiter.join().unwrap());
    }
}
