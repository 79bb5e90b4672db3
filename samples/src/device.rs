//! `/dev/hugepoke` from userspace, over the shared ABI in `src/uapi.rs`.

use crate::uapi::{
    self, BatchSite, CollapseArgs, PatchArgs, PatchBatchArgs, PatchFileArgs, QueryArgs,
    RestoreArgs, MAX_BYTES,
};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

pub const DEVICE: &str = "/dev/hugepoke";

/// What to patch.
#[derive(Debug, Clone, Default)]
pub struct PatchRequest {
    pub pid: i32,
    pub addr: u64,
    pub bytes: Vec<u8>,
    pub expect: Option<Vec<u8>>,
    pub persist: bool,
    pub install_pmd: bool,
    /// Patch even over bytes that differ from the file's (`PATCH_OVER_CHANGED`).
    pub over_changed: bool,
}

impl PatchRequest {
    /// The ioctl argument; over-long byte strings are cut to MAX_BYTES but
    /// `len` keeps the real length so the module can refuse it.
    pub fn args(&self) -> PatchArgs {
        let mut a = PatchArgs {
            size: std::mem::size_of::<PatchArgs>() as u32,
            pid: self.pid,
            addr: self.addr,
            len: self.bytes.len() as u32,
            ..Default::default()
        };
        let n = self.bytes.len().min(MAX_BYTES);
        a.bytes[..n].copy_from_slice(&self.bytes[..n]);
        if let Some(e) = &self.expect {
            a.flags |= uapi::PATCH_EXPECT;
            let n = e.len().min(MAX_BYTES);
            a.expect[..n].copy_from_slice(&e[..n]);
        }
        if self.persist {
            a.flags |= uapi::PATCH_PERSIST;
        }
        if self.install_pmd {
            a.flags |= uapi::PATCH_INSTALL_PMD;
        }
        if self.over_changed {
            a.flags |= uapi::PATCH_OVER_CHANGED;
        }
        a
    }
}

/// One site to patch: `bytes` at `addr`, only over `expect` if given.
#[derive(Debug, Clone, Default)]
pub struct Site {
    pub addr: u64,
    pub bytes: Vec<u8>,
    pub expect: Option<Vec<u8>>,
}

/// One site of a batch: `bytes` at `addr`, optionally only over `expect`.
pub fn batch_site(addr: u64, bytes: &[u8], expect: Option<&[u8]>) -> BatchSite {
    let mut s = BatchSite {
        addr,
        len: bytes.len() as u32,
        ..Default::default()
    };
    let n = bytes.len().min(MAX_BYTES);
    s.bytes[..n].copy_from_slice(&bytes[..n]);
    if let Some(e) = expect {
        s.flags |= uapi::PATCH_EXPECT;
        let n = e.len().min(MAX_BYTES);
        s.expect[..n].copy_from_slice(&e[..n]);
    }
    s
}

/// A refused PATCH_BATCH: the errno, and the site to blame (if one is).
#[derive(Debug)]
pub struct BatchError {
    pub error: io::Error,
    pub failed: Option<usize>,
    /// The sites it wrote and could not undo are kept (persistent) under
    /// this handle.
    pub kept: Option<u64>,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.failed {
            Some(i) => write!(f, "site {i}: {}", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

impl std::error::Error for BatchError {}

/// A refused PATCH_FILE: as a batch's, and the process to blame.
#[derive(Debug)]
pub struct FileError {
    pub batch: BatchError,
    pub pid: Option<i32>,
    /// The processes that map the sites (if the kernel got that far).
    pub pids: Vec<i32>,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}: {}", self.batch),
            None => write!(f, "{}", self.batch),
        }
    }
}

impl std::error::Error for FileError {}

/// An open `/dev/hugepoke`; non-persistent patches made through it are
/// restored when it is dropped.
pub struct Device(File);

impl Device {
    pub fn open() -> io::Result<Self> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE)
            .map(Self)
    }

    /// Raw ioctl with any command and argument struct (tests use it for bad input).
    pub fn ioctl<T>(&self, cmd: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is a valid, exclusively borrowed `T` for the call;
        // the kernel reads and writes at most `_IOC_SIZE(cmd)` bytes, which
        // callers keep within `size_of::<T>()` (or test the module's checks).
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), cmd as libc::c_ulong, arg as *mut T) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Raw ioctl with a raw argument (tests use it for bad pointers).
    pub fn ioctl_raw(&self, cmd: u32, arg: usize) -> io::Result<()> {
        // SAFETY: the kernel validates `arg` as a user pointer; a bad one
        // gives EFAULT, it cannot corrupt this process.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), cmd as libc::c_ulong, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn patch_args(&self, args: &mut PatchArgs) -> io::Result<u64> {
        self.ioctl(uapi::IOCTL_PATCH, args)?;
        Ok(args.handle)
    }

    pub fn patch(&self, req: &PatchRequest) -> io::Result<u64> {
        self.patch_args(&mut req.args())
    }

    /// PATCH_BATCH: every site of `sites` in `pid`, or none.  `flags` are
    /// `BATCH_FLAGS` bits.
    pub fn patch_batch(
        &self,
        pid: i32,
        sites: &[BatchSite],
        flags: u32,
    ) -> Result<u64, BatchError> {
        let mut a = PatchBatchArgs {
            size: std::mem::size_of::<PatchBatchArgs>() as u32,
            flags,
            pid,
            count: sites.len() as u32,
            sites: sites.as_ptr() as u64,
            ..Default::default()
        };
        match self.ioctl(uapi::IOCTL_PATCH_BATCH, &mut a) {
            Ok(()) => Ok(a.handle),
            Err(error) => Err(BatchError {
                error,
                failed: (a.failed != uapi::NO_SITE).then_some(a.failed as usize),
                kept: (a.handle != 0).then_some(a.handle),
            }),
        }
    }

    /// Patch `sites` in `pid`, all or none: with PATCH when `batch` is
    /// false (then `sites` is one site), else with one PATCH_BATCH.  `flags`
    /// are `BATCH_FLAGS` bits.  A refused PATCH blames no site and keeps
    /// nothing.
    pub fn patch_sites(
        &self,
        pid: i32,
        sites: &[Site],
        batch: bool,
        flags: u32,
    ) -> Result<u64, BatchError> {
        if !batch {
            let req = PatchRequest {
                pid,
                addr: sites[0].addr,
                bytes: sites[0].bytes.clone(),
                expect: sites[0].expect.clone(),
                persist: flags & uapi::PATCH_PERSIST != 0,
                install_pmd: flags & uapi::PATCH_INSTALL_PMD != 0,
                over_changed: flags & uapi::PATCH_OVER_CHANGED != 0,
            };
            return self.patch(&req).map_err(|error| BatchError {
                error,
                failed: None,
                kept: None,
            });
        }
        let batch: Vec<BatchSite> = sites
            .iter()
            .map(|s| batch_site(s.addr, &s.bytes, s.expect.as_deref()))
            .collect();
        self.patch_batch(pid, &batch, flags)
    }

    /// PATCH_FILE: `sites` (their `addr` an offset in `file`) in every
    /// process that maps them privately and executably, all or none
    /// (`flags`: `FILE_FLAGS` bits; with `FILE_DRY_RUN` nothing is
    /// patched).  The handle (0 for a dry run) and the processes' pids.
    pub fn patch_file(
        &self,
        file: &File,
        sites: &[BatchSite],
        flags: u32,
    ) -> Result<(u64, Vec<i32>), FileError> {
        let mut pids = vec![0i32; uapi::MAX_FILE_PROCESSES];
        let mut a = PatchFileArgs {
            size: std::mem::size_of::<PatchFileArgs>() as u32,
            flags,
            fd: file.as_raw_fd(),
            count: sites.len() as u32,
            sites: sites.as_ptr() as u64,
            pids: pids.as_mut_ptr() as u64,
            max_pids: pids.len() as u32,
            ..Default::default()
        };
        let result = self.ioctl(uapi::IOCTL_PATCH_FILE, &mut a);
        pids.truncate((a.nr_pids as usize).min(pids.len()));
        match result {
            Ok(()) => Ok((a.handle, pids)),
            Err(error) => Err(FileError {
                batch: BatchError {
                    error,
                    failed: (a.failed != uapi::NO_SITE).then_some(a.failed as usize),
                    kept: (a.handle != 0).then_some(a.handle),
                },
                pid: (a.failed_pid != 0).then_some(a.failed_pid),
                pids,
            }),
        }
    }

    pub fn restore(&self, handle: u64) -> io::Result<()> {
        self.restore_flags(handle, 0)
    }

    /// RESTORE with `RESTORE_*` flags (`RESTORE_DROP`: forget the handle,
    /// write nothing; CAP_SYS_ADMIN).
    pub fn restore_flags(&self, handle: u64, flags: u32) -> io::Result<()> {
        let mut a = RestoreArgs {
            size: std::mem::size_of::<RestoreArgs>() as u32,
            flags,
            handle,
        };
        self.ioctl(uapi::IOCTL_RESTORE, &mut a)
    }

    /// COLLAPSE the 2 MiB range at `addr` of `pid`: drop the copies other
    /// tools left that equal the page cache, then collapse (PMD installed).
    pub fn collapse(&self, pid: i32, addr: u64) -> io::Result<CollapseArgs> {
        let mut a = CollapseArgs {
            size: std::mem::size_of::<CollapseArgs>() as u32,
            flags: uapi::COLLAPSE_INSTALL_PMD,
            pid,
            addr,
            ..Default::default()
        };
        self.ioctl(uapi::IOCTL_COLLAPSE, &mut a)?;
        Ok(a)
    }

    /// QUERY_FORKED: the processes forked while `handle`'s patch lived
    /// that run it now, by pid.
    pub fn query_forked(&self, handle: u64) -> io::Result<Vec<i32>> {
        let mut pids = Vec::new();
        let mut index = 0;
        loop {
            let mut q = QueryArgs {
                size: std::mem::size_of::<QueryArgs>() as u32,
                flags: uapi::QUERY_FORKED,
                handle,
                index,
                ..Default::default()
            };
            self.ioctl(uapi::IOCTL_QUERY, &mut q)?;
            if q.count == 0 {
                return Ok(pids);
            }
            pids.push(q.pid);
            index += 1;
            if index >= q.count {
                return Ok(pids);
            }
        }
    }

    pub fn query(&self, handle: u64) -> io::Result<QueryArgs> {
        self.query_site(handle, 0)
    }

    /// QUERY site `index` of `handle` (`count` says how many it has).
    pub fn query_site(&self, handle: u64, index: u32) -> io::Result<QueryArgs> {
        let mut a = QueryArgs {
            size: std::mem::size_of::<QueryArgs>() as u32,
            handle,
            index,
            ..Default::default()
        };
        self.ioctl(uapi::IOCTL_QUERY, &mut a)?;
        Ok(a)
    }
}

/// The newest sequence number in debugfs `events` (0 when unreadable).
pub fn journal_seq() -> u64 {
    crate::proc::debugfs("events")
        .map(|t| crate::proc::parse_events(&t).last().map_or(0, |e| e.seq))
        .unwrap_or(0)
}

/// The reason the module journaled for the call that failed with `errno`:
/// of the failed steps after `seq` about `target` or made by this process
/// (so that another tool's failure at the same time is not taken for ours;
/// any pid's when `target` is None), the newest with that errno, else the
/// newest.  (A refused RESTORE journals the patch's fate, then why; a
/// failed PATCH journals why, then what its undo met.)
pub fn failure_since(seq: u64, target: Option<i32>, errno: i32) -> Option<String> {
    let events = crate::proc::parse_events(&crate::proc::debugfs("events").ok()?);
    let me = std::process::id() as i32;
    pick_failure(&events, seq, target, me, errno)
}

/// [`failure_since`]'s choice among `events`, `me` being this process.
fn pick_failure(
    events: &[crate::proc::EventLine],
    seq: u64,
    target: Option<i32>,
    me: i32,
    errno: i32,
) -> Option<String> {
    let failed: Vec<_> = events
        .iter()
        .filter(|e| target.is_none_or(|t| e.pid == t || e.pid == me))
        .filter(|e| e.seq > seq && e.result != "ok")
        .collect();
    let same = format!("-{}", crate::errno_name(errno));
    let e = failed
        .iter()
        .rfind(|e| e.result == same)
        .or(failed.last())?;
    Some(format!("{}: {} ({})", e.step, e.note, e.result))
}

#[cfg(test)]
mod tests {
    use super::pick_failure;
    use crate::proc::parse_events;

    /// A failed PATCH (why, then an undo that met EINTR), a refused RESTORE
    /// (the fate, then why), another process's failure, an old one.
    const EVENTS: &str = "\
1 10 7 - 0x1000 check_vma - - -EBUSY an old failure
5 50 7 - 0x1000 check_expected - - -EILSEQ bytes at the address are not the expected ones (under the page-table lock)
6 60 7 - - restore - - -EINTR fatal signal while waiting for the target's mmap lock
7 70 9 - - check_vma - - -EINVAL another process's failure
8 80 7 3 0x1000 restore - - -EILSEQ patch kept whole; RESTORE may be retried
9 90 7 3 0x1000 restore_bytes - - -EILSEQ bytes at a site are not the ones PATCH wrote; nothing written
";

    #[test]
    fn the_newest_failure_with_the_calls_errno() {
        let events = parse_events(EVENTS);
        let pick = |seq, errno| pick_failure(&events, seq, Some(7), 100, errno).unwrap();
        // The PATCH (events 5-6) failed with EILSEQ: its reason, not the undo's EINTR.
        let patch: Vec<_> = events.iter().filter(|e| e.seq <= 6).cloned().collect();
        let p = pick_failure(&patch, 1, Some(7), 100, libc::EILSEQ).unwrap();
        assert!(p.starts_with("check_expected: bytes at the address"), "{p}");
        // The RESTORE (events 8-9): why, not what became of the patch.
        assert!(pick(7, libc::EILSEQ).starts_with("restore_bytes: bytes at a site"));
        // No failure with that errno: the newest; another pid's never.
        assert!(pick(5, libc::ENOENT).starts_with("restore_bytes:"));
        assert!(pick_failure(&events, 6, Some(7), 100, libc::EINVAL)
            .unwrap()
            .starts_with("restore_bytes:"));
        assert!(pick_failure(&events, 9, Some(7), 100, libc::EILSEQ).is_none());
    }
}
