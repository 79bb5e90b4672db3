// SPDX-License-Identifier: GPL-2.0

//! `/dev/hugepoke`: one `Controller` per open file.  Patches made through a
//! file belong to it and are restored when it is closed, unless they were
//! made with `PATCH_PERSIST`.

use kernel::{
    alloc::KVVec,
    fs::{File, LocalFile},
    ioctl::_IOC_SIZE,
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    prelude::*,
    sync::Arc,
    transmute::AsBytes,
    uaccess::{UserPtr, UserSlice},
};

use crate::{
    authority,
    engine::{self, Closing, Failure, Request},
    journal::{Event, Step},
    policy, sys,
    target::Target,
    uapi::{
        self, BatchSite, CollapseArgs, PatchArgs, PatchBatchArgs, PatchFileArgs, QueryArgs,
        RestoreArgs,
    },
    Hugepoke,
};

/// The state of one open file of `/dev/hugepoke`.
pub(crate) struct Controller {
    hugepoke: Arc<Hugepoke>,
    /// Owner id of the patches made through this file.
    id: u64,
    /// Keeps the module loaded while the file is open; dropped last.
    module: sys::ModuleRef,
}

#[vtable]
impl MiscDevice for Controller {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        let module = sys::ModuleRef::get().ok_or(ENODEV)?;
        let hugepoke = Hugepoke::get().ok_or(ENODEV)?;
        let id = hugepoke.new_owner_id();
        hugepoke.journal.record(Step::Open.event());
        Ok(KBox::new(
            Self {
                hugepoke,
                id,
                module,
            },
            GFP_KERNEL,
        )?)
    }

    fn release(this: KBox<Self>, _file: &File) {
        // Closing restores what this file patched (and queues collapses),
        // from a work item: a fatal signal pending for us cannot cut it short.
        engine::restore_owned(&this.hugepoke, Some(this.id), Closing::File);
        // Their members are restored: the file patches' handles go too.
        engine::forget_file_handles(&this.hugepoke, this.id);
        this.hugepoke.journal.record(Step::Release.event());
        let Controller {
            hugepoke,
            id: _,
            module,
        } = KBox::into_inner(this);
        drop(hugepoke);
        // Last: once the module reference is gone, rmmod may proceed.
        drop(module);
    }

    fn ioctl(this: &Self, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        let hp = &this.hugepoke;
        let user = UserSlice::new(UserPtr::from_addr(arg), _IOC_SIZE(cmd));
        let result = match cmd {
            uapi::IOCTL_PATCH => this.patch(user),
            uapi::IOCTL_RESTORE => this.restore(user),
            uapi::IOCTL_QUERY => this.query(user),
            uapi::IOCTL_PATCH_BATCH => this.patch_batch(user),
            uapi::IOCTL_COLLAPSE => this.collapse(user),
            uapi::IOCTL_PATCH_FILE => this.patch_file(user),
            _ => Err(hp.journal.fail(
                Event::new(Step::Ioctl).addr(cmd as usize),
                ENOTTY,
                "unknown ioctl command",
            )),
        };
        result.map(|()| 0)
    }
}

impl Controller {
    /// PATCH: a request of one site.
    fn patch(&self, user: UserSlice) -> Result {
        let hp = &self.hugepoke;
        let (mut reader, mut writer) = user.reader_writer();
        let mut args: PatchArgs = reader.read().map_err(|e| {
            hp.journal.fail(
                Event::new(Step::Patch),
                e,
                "cannot read the PATCH arguments",
            )
        })?;
        let ev = Event::new(Step::Patch)
            .pid(args.pid)
            .addr(args.addr as usize);
        policy::check_patch_args(&args).map_err(|r| hp.journal.refuse(ev, r))?;
        let site = BatchSite {
            addr: args.addr,
            len: args.len,
            flags: args.flags & uapi::SITE_FLAGS,
            bytes: args.bytes,
            expect: args.expect,
        };
        let request = Request {
            pid: args.pid,
            flags: args.flags & !uapi::SITE_FLAGS,
            sites: &[site],
            scope: None,
        };
        let result = engine::patch(hp, self.id, &request);
        // The struct goes back with the handle, or, from a failed PATCH
        // whose page could not be given back, the handle that keeps it.
        let (Ok(handle)
        | Err(Failure {
            kept: Some(handle), ..
        })) = result
        else {
            return Err(result.err().map_or(EINVAL, |f| f.error));
        };
        args.handle = handle;
        let written = writer.write(&args);
        self.returned(result, written, ev)
    }

    /// The end of PATCH and PATCH_BATCH: if the handle of a patch in place
    /// cannot be returned, undo the patch.
    fn returned(&self, result: Result<u64, Failure>, written: Result, ev: Event) -> Result {
        let hp = &self.hugepoke;
        match (result, written) {
            (Ok(_), Ok(())) => Ok(()),
            (Ok(handle), Err(e)) => {
                if engine::restore_any(hp, handle).is_err() {
                    let why = "cannot write the handle back, and its undo was refused: the patch stays under its handle (debugfs patches)";
                    hp.journal.record(ev.handle(handle).error(e, why));
                }
                Err(hp
                    .journal
                    .fail(ev, e, "cannot write the handle back; patch undone"))
            }
            (Err(f), _) => Err(f.error),
        }
    }

    fn patch_batch(&self, user: UserSlice) -> Result {
        let hp = &self.hugepoke;
        let ev = Event::new(Step::Patch);
        let (mut reader, mut writer) = user.reader_writer();
        let mut args: PatchBatchArgs = reader.read().map_err(|e| {
            hp.journal
                .fail(ev, e, "cannot read the PATCH_BATCH arguments")
        })?;
        policy::check_batch_args(&args).map_err(|r| hp.journal.refuse(ev.pid(args.pid), r))?;
        let sites = self.read_sites(args.sites, args.count, ev.pid(args.pid))?;
        let request = Request {
            pid: args.pid,
            flags: args.flags,
            sites: &sites,
            scope: None,
        };
        let result = engine::patch(hp, self.id, &request);
        let (failed, error) = match &result {
            Ok(handle) => {
                args.handle = *handle;
                (uapi::NO_SITE, 0)
            }
            Err(f) => {
                // Sites it could not give back are kept under a handle: say which.
                args.handle = f.kept.unwrap_or(0);
                (f.site.unwrap_or(uapi::NO_SITE), -f.error.to_errno())
            }
        };
        args.failed = failed;
        args.error = error;
        let written = writer.write(&args);
        self.returned(result, written, ev.pid(args.pid))
    }

    /// A batch's `count` sites from user pointer `ptr`, in one copy.
    fn read_sites(&self, ptr: u64, count: u32, ev: Event) -> Result<KVVec<BatchSite>> {
        let hp = &self.hugepoke;
        let count = count as usize;
        let mut sites = KVVec::new();
        sites
            .extend_with(count, BatchSite::default(), GFP_KERNEL)
            .map_err(|_| {
                hp.journal
                    .fail(ev, ENOMEM, "no memory for the batch's sites")
            })?;
        let bytes = count * core::mem::size_of::<BatchSite>();
        UserSlice::new(UserPtr::from_addr(ptr as usize), bytes)
            .reader()
            .read_slice(sites.as_mut_slice().as_bytes_mut())
            .map_err(|e| hp.journal.fail(ev, e, "cannot read the batch's sites"))?;
        Ok(sites)
    }

    /// PATCH_FILE: the sites of a file's text, in every process that maps it.
    fn patch_file(&self, user: UserSlice) -> Result {
        let hp = &self.hugepoke;
        let ev = Event::new(Step::Patch);
        let (mut reader, mut writer) = user.reader_writer();
        let mut args: PatchFileArgs = reader.read().map_err(|e| {
            hp.journal
                .fail(ev, e, "cannot read the PATCH_FILE arguments")
        })?;
        policy::check_file_args(&args).map_err(|r| hp.journal.refuse(ev, r))?;
        authority::may_patch_file().map_err(|r| hp.journal.refuse(ev, r))?;
        let file = LocalFile::fget(args.fd as u32)
            .map_err(|_| hp.journal.fail(ev, EBADF, "fd is not an open file"))?;
        let sites = self.read_sites(args.sites, args.count, ev)?;
        // The sites' own checks (flags, lengths, overlaps), as a batch's.
        let offsets = Request {
            pid: 0,
            flags: args.flags,
            sites: &sites,
            scope: None,
        };
        engine::check_sites(hp, &offsets).map_err(|f| f.error)?;
        let members = engine::file_members(hp, &file, &sites);
        let result =
            members.and_then(|members| self.patch_members(&mut args, &file, &sites, &members));
        match &result {
            Ok(handle) => {
                args.handle = *handle;
                (args.failed, args.error, args.failed_pid) = (uapi::NO_SITE, 0, 0);
            }
            Err(f) => {
                args.handle = f.kept.unwrap_or(0);
                args.failed = f.site.unwrap_or(uapi::NO_SITE);
                (args.error, args.failed_pid) = (-f.error.to_errno(), f.pid);
            }
        }
        let written = writer.write(&args);
        let result = result.map_err(|f| Failure {
            error: f.error,
            site: f.site,
            kept: f.kept,
        });
        self.returned(result, written, ev)
    }

    /// PATCH_FILE's processes `members` told in `args` (`pids`, `nr_pids`),
    /// and patched unless it is a dry run: the handle (0 for a dry run).
    fn patch_members(
        &self,
        args: &mut PatchFileArgs,
        file: &LocalFile,
        sites: &[BatchSite],
        members: &[engine::Member],
    ) -> Result<u64, engine::FileFailure> {
        let hp = &self.hugepoke;
        let ev = Event::new(Step::Patch);
        args.nr_pids = members.len() as u32;
        if members.len() > args.max_pids as usize {
            let why = "more processes map the file than the pids array has room for";
            return Err(hp.journal.fail(ev, E2BIG, why).into());
        }
        let mut pids = UserSlice::new(
            UserPtr::from_addr(args.pids as usize),
            members.len() * core::mem::size_of::<i32>(),
        )
        .writer();
        for m in members {
            pids.write(&m.pid)
                .map_err(|e| hp.journal.fail(ev, e, "cannot write the pids"))?;
        }
        if args.flags & uapi::FILE_DRY_RUN != 0 {
            return Ok(0);
        }
        if members.is_empty() {
            let why = "no process maps the sites' pages privately and executably";
            return Err(hp.journal.fail(ev, ESRCH, why).into());
        }
        engine::patch_file(
            hp,
            self.id,
            file,
            args.flags & uapi::BATCH_FLAGS,
            sites,
            members,
        )
    }

    fn restore(&self, user: UserSlice) -> Result {
        let hp = &self.hugepoke;
        let ev = Event::new(Step::Restore);
        let args: RestoreArgs = user
            .reader()
            .read()
            .map_err(|e| hp.journal.fail(ev, e, "cannot read the RESTORE arguments"))?;
        uapi::check_header(
            args.size,
            args.flags,
            core::mem::size_of::<RestoreArgs>(),
            uapi::RESTORE_FLAGS,
        )
        .map_err(|why| hp.journal.fail(ev, EINVAL, why))?;
        let ev = ev.handle(args.handle);
        let drop_only = args.flags & uapi::RESTORE_DROP != 0;
        if self.authorize_file(args.handle, ev)? {
            if drop_only {
                authority::may_drop().map_err(|r| hp.journal.refuse(ev, r))?;
            }
            return engine::restore_file(hp, args.handle, drop_only); // mutant: file-drop-restores
        }
        let target = self.authorize(args.handle, ev)?;
        if args.flags & uapi::RESTORE_DROP != 0 {
            authority::may_drop().map_err(|r| hp.journal.refuse(ev, r))?;
            return engine::drop_handle(hp, &target, args.handle);
        }
        engine::restore_of(hp, &target, args.handle)
    }

    /// May this caller RESTORE or QUERY `handle` (see `authority`)?  Its
    /// target, if so.
    fn authorize(&self, handle: u64, ev: Event) -> Result<Arc<Target>> {
        let hp = &self.hugepoke;
        let Some((owner, target)) = hp.registry.lock().handle(handle) else {
            let why = "no such patch (unknown or already restored)";
            return Err(hp.journal.fail(ev, ENOENT, why));
        };
        authority::may_undo(owner, self.id, &target).map_err(|r| hp.journal.refuse(ev, r))?;
        Ok(target)
    }

    /// Is `handle` a PATCH_FILE's?  If so, may this caller RESTORE or
    /// QUERY it: its own file made it and it is not persistent, or
    /// CAP_SYS_ADMIN.
    fn authorize_file(&self, handle: u64, ev: Event) -> Result<bool> {
        let hp = &self.hugepoke;
        let owner = match hp.registry.lock().file_handle(handle) {
            Some(f) => f.owner,
            None => return Ok(false),
        };
        if owner != Some(self.id) {
            // mutant: anyone-may-undo-a-file-patch
            authority::may_patch_file().map_err(|r| hp.journal.refuse(ev, r))?;
        }
        Ok(true)
    }

    /// QUERY_FORKED: process `index` (by pid) of those forked while the
    /// patch lived that run it (`count` of them), in `pid`.
    fn query_forked(&self, args: &mut QueryArgs, ev: Event) -> Result {
        let hp = &self.hugepoke;
        if !self.authorize_file(args.handle, ev)? {
            self.authorize(args.handle, ev)?;
        }
        let nomem = |_| {
            hp.journal
                .fail(ev, ENOMEM, "no memory to list the processes")
        };
        let mut pids = KVec::new();
        // (EBUSY, a file patch still being made, is journaled already.)
        let patches =
            engine::patches_of(hp, args.handle)
                .map_err(|e| if e == EBUSY { e } else { nomem(e) })?;
        for (target, handle) in patches {
            engine::forked_of(hp, &target, handle, &mut pids).map_err(|e| {
                hp.journal
                    .fail(ev, e, "cannot list the processes forked since PATCH")
            })?;
        }
        let index = args.index as usize;
        *args = QueryArgs {
            size: args.size,
            flags: args.flags,
            handle: args.handle,
            index: args.index,
            count: pids.len() as u32,
            pid: pids.get(index).copied().unwrap_or(0),
            ..Default::default()
        };
        if index > 0 && index >= pids.len() {
            return Err(hp
                .journal
                .fail(ev, ENOENT, "no such forked process (index past count)"));
        }
        hp.journal.record(ev.note("forked processes listed"));
        Ok(())
    }

    /// COLLAPSE: one 2 MiB range, its copies dropped and its PMD given back.
    fn collapse(&self, user: UserSlice) -> Result {
        let hp = &self.hugepoke;
        let ev = Event::new(Step::CollapseRange);
        let (mut reader, mut writer) = user.reader_writer();
        let mut args: CollapseArgs = reader
            .read()
            .map_err(|e| hp.journal.fail(ev, e, "cannot read the COLLAPSE arguments"))?;
        engine::collapse(hp, &mut args)?;
        writer
            .write(&args)
            .map_err(|e| hp.journal.fail(ev, e, "cannot write the COLLAPSE result"))
    }

    fn query(&self, user: UserSlice) -> Result {
        let hp = &self.hugepoke;
        let (mut reader, mut writer) = user.reader_writer();
        let ev = Event::new(Step::Query);
        let mut args: QueryArgs = reader
            .read()
            .map_err(|e| hp.journal.fail(ev, e, "cannot read the QUERY arguments"))?;
        uapi::check_header(
            args.size,
            args.flags,
            core::mem::size_of::<QueryArgs>(),
            uapi::QUERY_FLAGS,
        )
        .map_err(|why| hp.journal.fail(ev, EINVAL, why))?;
        if args.flags & uapi::QUERY_FORKED != 0 {
            let ev = ev.handle(args.handle);
            self.query_forked(&mut args, ev)?;
            return writer
                .write(&args)
                .map_err(|e| hp.journal.fail(ev, e, "cannot write the QUERY result"));
        }
        let unknown = || {
            hp.journal.fail(
                ev.handle(args.handle),
                ENOENT,
                "no such patch (unknown or already restored)",
            )
        };
        // A file patch's sites are its members', one process after another.
        let (target, handle, index, count) = if self.authorize_file(args.handle, ev)? {
            let (count, site) = engine::file_site(hp, args.handle, args.index)?;
            let (target, handle, index) = site.ok_or_else(unknown)?;
            (target, handle, index, Some(count))
        } else {
            let target = self.authorize(args.handle, ev.handle(args.handle))?;
            (target, args.handle, args.index, None)
        };
        self.fill_site(&mut args, &target, handle, index, count)?;
        writer
            .write(&args)
            .map_err(|e| hp.journal.fail(ev, e, "cannot write the QUERY result"))
    }

    /// QUERY's answer in `args`: site `index` of `handle`'s patch of
    /// `target`; `count` sites in all (the handle's own if None).
    fn fill_site(
        &self,
        args: &mut QueryArgs,
        target: &Target,
        handle: u64,
        index: u32,
        count: Option<u32>,
    ) -> Result {
        let hp = &self.hugepoke;
        let ev = Event::new(Step::Query).handle(args.handle);
        let unknown = || {
            hp.journal
                .fail(ev, ENOENT, "no such patch (unknown or already restored)")
        };
        let shows_pfns = authority::shows_pfns();
        {
            let state = target.lock_killable(&hp.journal, ev)?;
            args.count = count.unwrap_or(state.patches.count(handle));
            // The Nth live site: a batch that lost some keeps the others' places.
            let p = state
                .patches
                .sites_of_handle(handle)
                .nth(index as usize)
                .ok_or_else(unknown)?;
            args.site = p.index;
            args.reserved = 0;
            args.state = p.state(target.gone());
            // The process PATCH found, as the caller's pid namespace sees it.
            args.pid = target.pid.as_ref().map_or(0, |pid| pid.vnr());
            args.addr = p.addr as u64;
            args.len = p.len as u32;
            args.patch_flags = p.flags;
            args.pfn = if shows_pfns { p.pfn as u64 } else { 0 };
            args.orig = p.orig;
            args.bytes = p.bytes;
        }
        Ok(())
    }
}
