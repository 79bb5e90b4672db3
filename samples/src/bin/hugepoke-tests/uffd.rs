//! userfaultfd and pinned pages on PMD-mapped THP text (seeds 002–004):
//! what PATCH refuses, what RESTORE keeps, on the test process's own
//! 2 MiB-aligned mapping of a THP text file, checked PMD-mapped before
//! anything is armed.

use crate::common::*;
use crate::hardening::expect_errno;
use crate::TestResult;
use hugepoke::uapi;

// userfaultfd(2), as include/uapi/linux/userfaultfd.h lays it out.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}
const UFFDIO_API: libc::c_ulong = (3 << 30) | (24 << 16) | (0xaa << 8) | 0x3f;
const UFFDIO_REGISTER: libc::c_ulong = (3 << 30) | (32 << 16) | (0xaa << 8);
const UFFDIO_WRITEPROTECT: libc::c_ulong = (3 << 30) | (24 << 16) | (0xaa << 8) | 0x06;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 4;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// A userfaultfd of this process; closed on drop (which unregisters).
struct Uffd(i32);

impl Uffd {
    fn open() -> Result<Self, String> {
        // SAFETY: userfaultfd(2) and UFFDIO_API on a struct laid out as the uapi.
        unsafe {
            let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as i32;
            ensure!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
            let uffd = Self(fd);
            // Write-protect and minor faults on shmem (our THP text is on
            // tmpfs) need these features.
            let mut api = UffdioApi {
                api: 0xaa,
                features: UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_MINOR_SHMEM,
                ioctls: 0,
            };
            ensure!(
                libc::ioctl(fd, UFFDIO_API, &mut api) == 0,
                "UFFDIO_API: {}",
                std::io::Error::last_os_error()
            );
            Ok(uffd)
        }
    }

    fn register(&self, start: u64, len: u64, mode: u64) -> TestResult {
        let mut reg = UffdioRegister {
            start,
            len,
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER of our own mapping, struct as the uapi.
        let rc = unsafe { libc::ioctl(self.0, UFFDIO_REGISTER, &mut reg) };
        ensure!(
            rc == 0,
            "UFFDIO_REGISTER mode {mode}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    fn write_protect(&self, start: u64, len: u64, protect: bool) -> TestResult {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        let mut wp = UffdioWriteprotect { start, len, mode };
        // SAFETY: UFFDIO_WRITEPROTECT of our own mapping, struct as the uapi.
        let rc = unsafe { libc::ioctl(self.0, UFFDIO_WRITEPROTECT, &mut wp) };
        ensure!(
            rc == 0,
            "UFFDIO_WRITEPROTECT {protect}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

impl Drop for Uffd {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// This process's own 2 MiB-aligned, private r-x mapping of a THP text
/// file, PMD-mapped (checked); unmapped on drop.
struct OwnText {
    addr: u64,
}

impl OwnText {
    fn map(file: &std::fs::File) -> Result<Self, String> {
        let text = Self {
            addr: io(hugepoke::testkit::thp::map_text(file))? as u64,
        };
        // SAFETY: reading our own fresh mapping faults the THP in by a PMD.
        unsafe { std::ptr::read_volatile(text.addr as *const u8) };
        text.check_pmd_mapped("after the first fault")?;
        Ok(text)
    }

    fn smaps(&self) -> Result<SmapsEntry, String> {
        io(proc::smaps_entry(std::process::id() as i32, self.addr))
    }

    fn check_pmd_mapped(&self, when: &str) -> TestResult {
        let s = self.smaps()?;
        ensure!(
            s.kb("ShmemPmdMapped") == 2048 && s.kb("Anonymous") == 0,
            "own THP text {when}: not PMD-mapped by the shmem THP: {s:?}"
        );
        Ok(())
    }

    fn page(&self, page: usize) -> u64 {
        self.addr + (page * text::PAGE) as u64
    }

    /// The first bytes of text page `page`, as this process sees them.
    fn bytes(&self, page: usize) -> Vec<u8> {
        // SAFETY: reading our own mapping.
        unsafe { std::slice::from_raw_parts(self.page(page) as *const u8, 6) }.to_vec()
    }

    fn patch(&self, dev: &Device, page: usize, value: u32) -> std::io::Result<u64> {
        let pid = std::process::id() as i32;
        dev.patch(&PatchRequest {
            pid,
            addr: self.page(page),
            bytes: text::mov_eax_ret(value).to_vec(),
            ..Default::default()
        })
    }
}

impl Drop for OwnText {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, which nothing else uses.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, text::THP_SIZE) };
    }
}

/// Seed 003: PATCH refuses text that userfaultfd is armed on, in either
/// mode (EBUSY): the write fault GUP would take could wait for the uffd
/// reader or drop a wp bit.  Registered on the whole 2 MiB of PMD-mapped
/// THP text (registration alone leaves the PMD); after the refusal the
/// text is still PMD-mapped, without anonymous memory, unchanged.
pub(crate) fn userfaultfd_armed_text_is_refused() -> TestResult {
    const PAGE: usize = 9;
    let t = Target::spawn(&[])?; // provides the THP file
    let file = io(std::fs::File::open(&t.file))?;
    let dev = io(Device::open())?;
    for (mode, name) in [
        (UFFDIO_REGISTER_MODE_WP, "wp"),
        (UFFDIO_REGISTER_MODE_MISSING, "missing"),
    ] {
        let own = OwnText::map(&file)?;
        let uffd = Uffd::open()?;
        uffd.register(own.addr, text::THP_SIZE as u64, mode)?;
        own.check_pmd_mapped(&format!("armed in {name} mode"))?;
        expect_errno(
            &format!("PATCH of uffd-{name} text"),
            own.patch(&dev, PAGE, 99),
            libc::EBUSY,
            "userfaultfd is armed",
        )?;
        own.check_pmd_mapped(&format!("after the refused PATCH ({name})"))?;
        ensure!(
            own.bytes(PAGE) == text::mov_eax_ret(text::original_value(PAGE)),
            "{name}: text changed: {:x?}",
            own.bytes(PAGE)
        );
    }
    Ok(())
}

/// Seed 003: userfaultfd write-protect registered on the text after PATCH
/// (PATCH split the PMD: the patched page is an anonymous PTE now), and the
/// patched page write-protected.  RESTORE treats the uffd-wp PTE as a fault
/// to take, as uprobes does: the fault is refused (EFAULT, no way to wait
/// from here), the patch and the wp bit stay; once the page is
/// un-protected RESTORE works and keeps the anonymous page (zapping would
/// drop the registration's wp bit).
pub(crate) fn uffd_wp_on_pmd_mapped_text_is_never_written_through() -> TestResult {
    const PAGE: usize = 9;
    let t = Target::spawn(&[])?;
    let file = io(std::fs::File::open(&t.file))?;
    let own = OwnText::map(&file)?;
    let dev = io(Device::open())?;
    let h = io(own.patch(&dev, PAGE, 9))?;
    let uffd = Uffd::open()?;
    uffd.register(own.addr, text::THP_SIZE as u64, UFFDIO_REGISTER_MODE_WP)?;
    uffd.write_protect(own.page(PAGE), text::PAGE as u64, true)?;
    let pm = io(Pagemap::open(std::process::id() as i32))?;
    let e = io(pm.entry(own.page(PAGE)))?;
    ensure!(
        e.present() && !e.file() && e.uffd_wp(),
        "patched page not an anonymous uffd-wp PTE: {e:?}"
    );

    expect_errno(
        "restore through uffd-wp",
        dev.restore(h),
        libc::EFAULT,
        "for writing",
    )?;
    ensure!(
        events_of(h)?
            .iter()
            .any(|e| e.note.contains("userfaultfd write-protected")),
        "uffd-wp PTE not seen: {:?}",
        events_of(h)?
    );
    ensure!(
        own.bytes(PAGE) == text::mov_eax_ret(9),
        "RESTORE wrote through the uffd-wp PTE: {:x?}",
        own.bytes(PAGE)
    );
    ensure!(io(pm.entry(own.page(PAGE)))?.uffd_wp(), "wp bit dropped");
    ensure!(
        io(dev.query(h))?.state == uapi::STATE_LIVE,
        "patch not kept"
    );

    uffd.write_protect(own.page(PAGE), text::PAGE as u64, false)?;
    io(dev.restore(h))?;
    ensure!(
        own.bytes(PAGE) == text::mov_eax_ret(text::original_value(PAGE)),
        "not restored: {:x?}",
        own.bytes(PAGE)
    );
    let evs = events_of(h)?;
    let keep = evs
        .iter()
        .find(|e| e.step == "keep_anon_page")
        .ok_or(format!("zapped under uffd-wp: {:?}", steps(&evs)))?;
    ensure!(
        keep.note.contains("write-protect"),
        "keep reason {:?}",
        keep.note
    );
    Ok(())
}

/// The same for a batch: sites on pages 12 and 13 under one handle, only
/// page 13 write-protected.  RESTORE of the batch stops at page 13's
/// fault before writing anything (EFAULT): page 12 keeps its patch too,
/// the wp bit stays; once un-protected, RESTORE gives both back.
pub(crate) fn uffd_wp_stops_a_batch_restore_before_any_write() -> TestResult {
    let t = Target::spawn(&[])?;
    let file = io(std::fs::File::open(&t.file))?;
    let own = OwnText::map(&file)?;
    let dev = io(Device::open())?;
    let sites: Vec<_> = [12, 13]
        .iter()
        .map(|&p| hugepoke::device::batch_site(own.page(p), &text::mov_eax_ret(p as u32), None))
        .collect();
    let h = dev
        .patch_batch(std::process::id() as i32, &sites, 0)
        .map_err(|e| format!("batch: {e}"))?;
    let uffd = Uffd::open()?;
    uffd.register(own.addr, text::THP_SIZE as u64, UFFDIO_REGISTER_MODE_WP)?;
    uffd.write_protect(own.page(13), text::PAGE as u64, true)?;
    expect_errno(
        "batch restore through uffd-wp",
        dev.restore(h),
        libc::EFAULT,
        "for writing",
    )?;
    for p in [12, 13] {
        ensure!(
            own.bytes(p) == text::mov_eax_ret(p as u32),
            "the refused batch RESTORE wrote page {p}: {:x?}",
            own.bytes(p)
        );
    }
    let pm = io(Pagemap::open(std::process::id() as i32))?;
    ensure!(io(pm.entry(own.page(13)))?.uffd_wp(), "wp bit dropped");
    uffd.write_protect(own.page(13), text::PAGE as u64, false)?;
    io(dev.restore(h))?;
    for p in [12, 13] {
        ensure!(
            own.bytes(p) == text::mov_eax_ret(text::original_value(p)),
            "page {p} not restored: {:x?}",
            own.bytes(p)
        );
    }
    Ok(())
}

/// userfaultfd missing mode registered on the text after PATCH: RESTORE
/// writes the originals back but keeps the anonymous page (abi.md: zapped
/// only when no userfaultfd mode is registered), queues no collapse, and
/// the page stays mapped with the original bytes.
pub(crate) fn uffd_missing_after_patch_keeps_the_anonymous_page() -> TestResult {
    uffd_after_patch_keeps_the_copy(10, UFFDIO_REGISTER_MODE_MISSING, "missing mode")
}

/// The same for minor mode: a zapped copy would make the target's next
/// fetch from the page wait for a monitor that never expected a fault.
pub(crate) fn uffd_minor_after_patch_keeps_the_anonymous_page() -> TestResult {
    uffd_after_patch_keeps_the_copy(11, UFFDIO_REGISTER_MODE_MINOR, "minor mode")
}

/// PATCH, then userfaultfd registered in `mode` on the text, then RESTORE:
/// the bytes go back, the copy is kept (`reason`), no collapse queued.
fn uffd_after_patch_keeps_the_copy(page: usize, mode: u64, reason: &str) -> TestResult {
    let t = Target::spawn(&[])?;
    let file = io(std::fs::File::open(&t.file))?;
    let own = OwnText::map(&file)?;
    let dev = io(Device::open())?;
    let h = io(own.patch(&dev, page, page as u32))?;
    let uffd = Uffd::open()?;
    uffd.register(own.addr, text::THP_SIZE as u64, mode)?;
    io(dev.restore(h))?;
    // The journal first: had the copy been zapped, touching the page would
    // wait for a uffd monitor (this thread) for ever.
    let evs = events_of(h)?;
    let keep = evs
        .iter()
        .find(|e| e.step == "keep_anon_page")
        .ok_or(format!("zapped under uffd {reason}: {:?}", steps(&evs)))?;
    ensure!(keep.note.contains(reason), "keep reason {:?}", keep.note);
    ensure!(
        own.bytes(page) == text::mov_eax_ret(text::original_value(page)),
        "not restored: {:x?}",
        own.bytes(page)
    );
    ensure!(
        !evs.iter().any(|e| e.step == "queue_collapse"),
        "collapse queued with the copy kept: {:?}",
        steps(&evs)
    );
    let s = own.smaps()?;
    ensure!(s.kb("Anonymous") == 4, "the kept copy is not mapped: {s:?}");
    drop(uffd);
    Ok(())
}

/// Seeds 002/004: the anonymous page pinned by someone else (vmsplice into a
/// pipe) when RESTORE runs: the bytes go back, the page is kept (so no
/// collapse), events say why, and the pipe reader sees the page's
/// consistent, restored content.  On PMD-mapped THP text: PATCH split it.
pub(crate) fn pinned_page_is_restored_but_not_zapped() -> TestResult {
    const PAGE: usize = 5;
    let t = Target::spawn(&[])?;
    let file = io(std::fs::File::open(&t.file))?;
    let own = OwnText::map(&file)?;
    let dev = io(Device::open())?;
    let h = io(own.patch(&dev, PAGE, 5))?;
    ensure!(
        own.bytes(PAGE) == text::mov_eax_ret(5),
        "patch not visible in our mapping: {:x?}",
        own.bytes(PAGE)
    );
    let s = own.smaps()?;
    ensure!(
        s.kb("ShmemPmdMapped") == 0 && s.kb("Anonymous") == 4,
        "after PATCH: {s:?}"
    );
    let mut fds = [0; 2];
    // SAFETY: pipe(2) and vmsplice(2) of our own page into it.
    unsafe {
        ensure!(libc::pipe(fds.as_mut_ptr()) == 0, "pipe");
        let iov = libc::iovec {
            iov_base: own.page(PAGE) as *mut libc::c_void,
            iov_len: 4096,
        };
        let n = libc::vmsplice(fds[1], &iov, 1, 0);
        ensure!(
            n == 4096,
            "vmsplice: {n} {}",
            std::io::Error::last_os_error()
        );
    }
    io(dev.restore(h))?;
    let evs = events_of(h)?;
    let keep = evs
        .iter()
        .find(|e| e.step == "keep_anon_page")
        .ok_or(format!("page zapped while pinned: {:?}", steps(&evs)))?;
    ensure!(
        keep.note.contains("references"),
        "keep reason {:?}",
        keep.note
    );
    ensure!(
        !evs.iter().any(|e| e.step == "queue_collapse"),
        "collapse queued with the copy kept: {:?}",
        steps(&evs)
    );
    ensure!(
        own.bytes(PAGE) == text::mov_eax_ret(text::original_value(PAGE)),
        "bytes not restored: {:x?}",
        own.bytes(PAGE)
    );
    let mut buf = vec![0u8; 4096];
    // SAFETY: reading the pipe into our buffer.
    let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), 4096) };
    ensure!(
        n == 4096 && buf[..6] == text::mov_eax_ret(text::original_value(PAGE)),
        "pipe reader saw {:x?}",
        &buf[..6]
    );
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    Ok(())
}

// This module's in-guest tests, in groups that main.rs's SUITE puts in run order.
/// COLLAPSE keeps a copy under userfaultfd, in missing mode (once zapped,
/// the next fetch from the page would wait for a monitor that expects no
/// fault) and in write-protect mode (a zap would drop the page's wp state
/// a monitor tracks).  The copy is another tool's: a /proc/self/mem write
/// and write-back.
pub(crate) fn collapse_keeps_a_copy_under_userfaultfd() -> TestResult {
    for (page, mode, name) in [
        (12, UFFDIO_REGISTER_MODE_MISSING, "missing"),
        (13, UFFDIO_REGISTER_MODE_WP, "wp"),
    ] {
        let t = Target::spawn(&[])?;
        let file = io(std::fs::File::open(&t.file))?;
        let own = OwnText::map(&file)?;
        let me = std::process::id() as i32;
        let byte = own.bytes(page)[0];
        write_mem(me, own.page(page), &[!byte])?;
        write_mem(me, own.page(page), &[byte])?;
        let uffd = Uffd::open()?;
        uffd.register(own.addr, text::THP_SIZE as u64, mode)?;
        let dev = io(Device::open())?;
        let a = io(dev.collapse(me, own.addr))?;
        // smaps first: had the copy been zapped, touching it could wait for ever.
        let s = own.smaps()?;
        ensure!(
            s.kb("Anonymous") == 4,
            "the copy was dropped under uffd {name} mode: {s:?}"
        );
        ensure!(
            a.result == uapi::COLLAPSE_COPIES_KEPT && a.kept_uffd == 1 && a.dropped == 0,
            "COLLAPSE under uffd {name} mode said {a:?}"
        );
        drop(uffd);
    }
    Ok(())
}

tests! {
    TESTS: [
        userfaultfd_armed_text_is_refused,
        pinned_page_is_restored_but_not_zapped,
        collapse_keeps_a_copy_under_userfaultfd,
    ];
    WP_AND_MISSING: [
        uffd_wp_on_pmd_mapped_text_is_never_written_through,
        uffd_wp_stops_a_batch_restore_before_any_write,
        uffd_missing_after_patch_keeps_the_anonymous_page,
        uffd_minor_after_patch_keeps_the_anonymous_page,
    ];
}
