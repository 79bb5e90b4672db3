// SPDX-License-Identifier: GPL-2.0

//! Who may RESTORE, QUERY or drop a handle.  PATCH asks the kernel's own
//! question — may the caller ptrace-attach to the target with its real
//! credentials (`mm_access`) — so a device fd alone must not let anyone
//! undo or read a patch later (root may open `/dev/hugepoke` and drop its
//! privileges, or pass the fd on).
//!
//! RESTORE and QUERY of a handle through an open file are allowed when:
//! 1. that file made the patch and it is not persistent (closing the file
//!    would restore it anyway: RESTORE through it grants nothing new);
//! 2. the caller may PATCH the target now: the process PATCH found still
//!    exists, `mm_access()` grants the caller its mm, and that is the
//!    patched mm (not the image of a later `execve()`);
//! 3. the caller has CAP_SYS_ADMIN.
//!
//! (Holders of one open file are one owner: a file passed on or inherited
//! passes its patches on, as a `/proc/PID/mem` file passes on the access
//! checked when it was opened.)  A patch whose process is gone is no one
//! else's either: its RESTORE restores the processes forked from it, and
//! forgetting it would leave them patched with no handle to restore them.
//!
//! A PATCH_FILE (every process that maps a file) needs CAP_SYS_ADMIN, and
//! so do RESTORE and QUERY of its handle through another file.
//!
//! Dropping a handle without restoring it (`RESTORE_DROP`) needs
//! CAP_SYS_ADMIN, and QUERY shows a PFN only to CAP_SYS_ADMIN, as
//! `/proc/PID/pagemap` does.

use kernel::prelude::*;

use crate::{patches::Owner, refusal::Refusal, sys, target::Target};

/// May the caller, through the file with owner id `caller`, RESTORE or
/// QUERY a handle of `owner` on `target`?
pub(crate) fn may_undo(owner: Owner, caller: u64, target: &Target) -> Result<(), Refusal> {
    let allowed = owner == Some(caller) || may_ptrace(target) || sys::capable_sys_admin(); // mutant: gone-target-restored-by-anyone
    if allowed {
        // mutant: anyone-may-restore
        return Ok(());
    }
    Err(Refusal::new(
        EPERM,
        "not this file's patch, and the caller may not ptrace-attach to its target nor has CAP_SYS_ADMIN",
    ))
}

/// May the caller drop a handle without restoring it?
pub(crate) fn may_drop() -> Result<(), Refusal> {
    if sys::capable_sys_admin() {
        // mutant: anyone-may-drop
        return Ok(());
    }
    Err(Refusal::new(EPERM, "RESTORE_DROP needs CAP_SYS_ADMIN"))
}

/// May the caller PATCH_FILE (every process that maps a file, as uprobes
/// do), or RESTORE or QUERY a file patch it did not make?  CAP_SYS_ADMIN,
/// as `uprobe_register()`'s callers need.
pub(crate) fn may_patch_file() -> Result<(), Refusal> {
    if sys::capable_sys_admin() {
        // mutant: anyone-may-patch-a-file
        return Ok(());
    }
    Err(Refusal::new(
        EPERM,
        "patching every process that maps a file needs CAP_SYS_ADMIN",
    ))
}

/// May QUERY show the caller PFNs?  Only to CAP_SYS_ADMIN (asked without
/// an audit record: a QUERY without a PFN is no denial).
pub(crate) fn shows_pfns() -> bool {
    sys::capable_sys_admin_noaudit() // mutant: pfn-for-everyone
}

/// Could the caller PATCH `target` now: the check PATCH makes, on the
/// process PATCH found, and still the same address space?
fn may_ptrace(target: &Target) -> bool {
    let Some(process) = target.pid.as_ref().and_then(|p| p.process()) else {
        return false;
    };
    process
        .mm_access()
        .is_ok_and(|mm| sys::mm_id(&mm) == target.mm_id())
}
