// SPDX-License-Identifier: GPL-2.0

//! Processes: the target named by a pid ([`Process`]) and its address
//! space, the caller's tgid, and the reference on this module an open
//! file holds ([`ModuleRef`]).

use core::ptr::NonNull;
use kernel::{
    bindings,
    mm::{Mm, MmWithUser, MmWithUserAsync},
    prelude::*,
    sync::aref::ARef,
    task::Task,
};

/// Thread-group id of the calling task, in its own pid namespace.
pub(crate) fn current_tgid() -> i32 {
    kernel::current!().tgid_nr_ns(None)
}

/// The tgid of the process that owns `mm` (`mm->owner`), as the caller's
/// pid namespace sees it; 0 if there is none (exiting) or not visible.
pub(crate) fn mm_owner_tgid(mm: &Mm) -> i32 {
    // SAFETY: `mm` is a valid mm_struct (we hold a reference); the helper
    // reads `owner` under RCU.
    unsafe { super::hugepoke_mm_owner_tgid(mm.as_raw()) }
}

/// Who owns `mm` (`mm->owner`): `Some(tgid)` as the caller's pid namespace
/// sees it (0: not visible there), or `None` when it has no owner (its
/// last task is exiting).
pub(crate) fn mm_owner(mm: &Mm) -> Option<i32> {
    // SAFETY: as in `mm_owner_tgid`.
    let tgid = unsafe { super::hugepoke_mm_owner(mm.as_raw()) };
    (tgid >= 0).then_some(tgid)
}

/// How `mm`'s process came from a patched target (see
/// `hugepoke_forked_since`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forked {
    /// Forked before `since`, or from another process.
    No,
    /// Forked since from the target, or from a process forked from it since.
    FromTarget,
    /// Forked since, but whose it was is no longer known: its parent
    /// exited (it was given to a reaper), or it started at the very time
    /// of the stamp.  It may be the target's, or not.
    Adopted,
    /// Forked since by the target's parent, or by the target with
    /// clone(CLONE_PARENT): only the target's own page says it is the
    /// target's; a copy of its own is its parent's line, not the patch.
    ParentsChild,
}

/// Was `mm`'s process forked after `since` (boot-time ns) from the
/// process of `target` (None: gone), or from one forked from it since?
/// A process that shares `target_mm` (a clone(CLONE_VM) peer of the
/// target) counts as the target.
/// `parent` is the target's parent: a climb that ends there may be a
/// CLONE_PARENT child's (see `hugepoke_forked_since`); a process whose
/// ancestry reaches the target through a child started at or after
/// `until` (when the target was restored) was not.
pub(crate) fn forked_since(
    mm: &Mm,
    (since, until): (u64, u64),
    (target, target_mm): (Option<&PidRef>, Option<&Mm>),
    parent: Option<&PidRef>,
) -> Forked {
    let raw = |p: Option<&PidRef>| p.map_or(core::ptr::null_mut(), |p| p.0.as_ptr());
    let (target, parent) = (raw(target), raw(parent));
    let target_mm = target_mm.map_or(core::ptr::null_mut(), |m| m.as_raw());
    // SAFETY: `mm` is a valid mm_struct (we hold a reference); the helper
    // reads the tasks under RCU and only compares `target`, `target_mm`
    // and `parent`.
    match unsafe {
        super::hugepoke_forked_since(mm.as_raw(), since, target, target_mm, parent, until)
    } {
        1 => Forked::FromTarget,
        2 => Forked::Adopted,
        3 => Forked::ParentsChild,
        _ => Forked::No,
    }
}

/// A process named by the caller, with a reference on its task.
pub(crate) struct Process {
    task: ARef<Task>,
}

impl Process {
    /// Look `pid` up in the caller's pid namespace.
    pub(crate) fn find(pid: i32) -> Option<Self> {
        if pid <= 0 {
            return None;
        }
        // SAFETY: `find_get_pid` takes any number; it returns a counted
        // `struct pid` or null.
        let spid = unsafe { bindings::find_get_pid(pid) };
        if spid.is_null() {
            return None;
        }
        // SAFETY: `spid` is a valid, counted pid; `get_pid_task` returns a
        // counted task or null.  We drop our pid reference right after.
        let task = unsafe {
            let task = bindings::get_pid_task(spid, bindings::pid_type_PIDTYPE_PID);
            bindings::put_pid(spid);
            task
        };
        let task = NonNull::new(task)?.cast::<Task>();
        // SAFETY: `get_pid_task` gave us one reference, which the `ARef`
        // now owns; `Task` is a transparent wrapper of `task_struct`.
        let task = unsafe { ARef::from_raw(task) };
        Some(Self { task })
    }

    /// Its tgid, as the caller sees it.
    pub(crate) fn tgid(&self) -> i32 {
        self.task.tgid_nr_ns(None)
    }

    /// Its thread group's `struct pid`: the process itself, whatever pid
    /// namespace looks at it, and never a later process given its number.
    pub(crate) fn tgid_pid(&self) -> Option<PidRef> {
        // SAFETY: the task is valid while we hold our reference;
        // `get_task_pid` returns a counted pid, or null once it is reaped.
        let pid =
            unsafe { bindings::get_task_pid(self.task.as_ptr(), bindings::pid_type_PIDTYPE_TGID) };
        NonNull::new(pid).map(PidRef)
    }

    /// Its parent's thread group (`real_parent`), as the process is now.
    pub(crate) fn parent_tgid_pid(&self) -> Option<PidRef> {
        // SAFETY: the task is valid while we hold our reference; the helper
        // returns a counted pid, or null once the parent is reaped.
        let pid = unsafe { super::hugepoke_parent_tgid(self.task.as_ptr()) };
        NonNull::new(pid).map(PidRef)
    }

    pub(crate) fn is_kernel_thread(&self) -> bool {
        // SAFETY: the task is valid while we hold our reference; `flags` is
        // a plain word that PF_KTHREAD never leaves once set.
        let flags = unsafe { (*self.task.as_ptr()).flags };
        flags & bindings::PF_KTHREAD != 0
    }

    /// Its address space, with a user reference, if the caller may
    /// ptrace-attach to it with its real credentials (the check
    /// `process_vm_writev()` and `/proc/PID/mem` make).  `mm_access()`
    /// makes the check and takes the mm under the target's
    /// `exec_update_lock`, so an `execve()` cannot come between them.
    /// The reference is dropped with `mmput_async`, so that the last
    /// `mmput` of an exiting target never runs in our locks.
    pub(crate) fn mm_access(&self) -> Result<ARef<MmWithUserAsync>> {
        // SAFETY: the task is valid while we hold our reference; the mode is
        // a valid PTRACE_MODE_* combination.
        let mm = unsafe {
            bindings::mm_access(self.task.as_ptr(), bindings::PTRACE_MODE_ATTACH_REALCREDS)
            // mutant: no-ptrace-check
        };
        if mm.is_null() {
            return Err(ESRCH);
        }
        let mm = kernel::error::from_err_ptr(mm)?;
        // SAFETY: `mm_access` returned an mm with `mm_users` raised, which
        // the `ARef` now owns; `MmWithUser` is a transparent `mm_struct`.
        let mm: ARef<MmWithUser> = unsafe { ARef::from_raw(NonNull::new_unchecked(mm.cast())) };
        Ok(MmWithUser::into_mmput_async(mm))
    }
}

/// A counted `struct pid` (the target process as PATCH found it).
pub(crate) struct PidRef(NonNull<bindings::pid>);

// SAFETY: `struct pid` is reference counted with atomics and may be used
// and put from any task.
unsafe impl Send for PidRef {}
// SAFETY: as above; `&PidRef` only reads it.
unsafe impl Sync for PidRef {}

impl PidRef {
    /// The pid number the calling task sees (0: not in its pid namespace).
    pub(crate) fn vnr(&self) -> i32 {
        // SAFETY: we hold a reference on the pid.
        unsafe { bindings::pid_vnr(self.0.as_ptr()) }
    }

    /// The process, if it still exists (a zombie still has its task).
    pub(crate) fn process(&self) -> Option<Process> {
        // SAFETY: we hold a reference on the pid; `get_pid_task` returns a
        // counted task or null.
        let task =
            unsafe { bindings::get_pid_task(self.0.as_ptr(), bindings::pid_type_PIDTYPE_TGID) };
        let task = NonNull::new(task)?.cast::<Task>();
        // SAFETY: `get_pid_task` gave us one reference, which the `ARef`
        // now owns; `Task` is a transparent wrapper of `task_struct`.
        Some(Process {
            task: unsafe { ARef::from_raw(task) },
        })
    }
}

impl Drop for PidRef {
    fn drop(&mut self) {
        // SAFETY: we own one reference on the pid.
        unsafe { bindings::put_pid(self.0.as_ptr()) };
    }
}

/// Does the calling task have CAP_SYS_ADMIN (the capability that shows
/// PFNs in `/proc/PID/pagemap` and lets uprobes attach)?  Audited as a use
/// of the capability, so it is asked last.
pub(crate) fn capable_sys_admin() -> bool {
    // SAFETY: `capable` checks the current task's credentials; no locks.
    unsafe { bindings::capable(bindings::CAP_SYS_ADMIN as i32) }
}

/// [`capable_sys_admin`] without an audit record or PF_SUPERPRIV: for
/// deciding what to show (a PFN), not what to allow.
pub(crate) fn capable_sys_admin_noaudit() -> bool {
    // SAFETY: `init_user_ns` is the kernel's static initial namespace;
    // `ns_capable_noaudit` checks the current task's credentials, no locks.
    unsafe {
        bindings::ns_capable_noaudit(
            core::ptr::addr_of_mut!(bindings::init_user_ns),
            bindings::CAP_SYS_ADMIN as i32,
        )
    }
}

/// Identity of an address space, for comparing targets; never dereferenced.
pub(crate) fn mm_id(mm: &Mm) -> usize {
    mm.as_raw() as usize
}

/// A reference on this module, held by every open file of the device
/// (the Rust miscdevice sets no `fops->owner`), so that `rmmod` waits for
/// the last `close()`.
pub(crate) struct ModuleRef(());

impl ModuleRef {
    pub(crate) fn get() -> Option<Self> {
        // SAFETY: try_module_get() on our own module, from one of its calls.
        unsafe { super::hugepoke_module_get() }.then_some(Self(()))
    }
}

impl Drop for ModuleRef {
    fn drop(&mut self) {
        // SAFETY: drops the one reference `get` took.  Callers drop it as
        // their very last act, so only their return runs after it.
        unsafe { super::hugepoke_module_put() };
    }
}
