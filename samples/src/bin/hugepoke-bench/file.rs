//! File scope (issue 21): one PATCH_FILE of a site of a text file that N
//! idle processes map, and the RESTORE of its handle, per process.  Every
//! sample is checked in every process (the bytes through /proc/PID/mem).

use super::{thp_dir, Run, SITE_PAGE};
use crate::probe::{check, fresh_target, timed, Mem};
use crate::report::Row;
use hugepoke::device::batch_site;
use hugepoke::testkit::text::{mov_eax_ret, original_value};
use hugepoke::uapi;

impl Run {
    /// `n` fresh idle targets of one file, kept for every cycle: PATCH_FILE
    /// of one site (every process patched, all or none), then RESTORE of
    /// its handle (every process restored, its copy zapped, its collapse
    /// queued); each sample's time divided by `n`.
    pub(super) fn file_scope(&mut self, n: usize) {
        let path = format!("{}/file-scope.bin", thp_dir());
        let targets: Vec<_> = (0..n).map(|_| fresh_target(&path, false)).collect();
        let file = std::fs::File::open(&path);
        check!(file.is_ok(), "opening {path}: {:?}", file.err());
        let file = file.unwrap();
        let site = [batch_site(
            (SITE_PAGE * 4096) as u64,
            &mov_eax_ret(4242),
            None,
        )];
        let (what, map) = if n == 1 {
            ("process", "maps")
        } else {
            ("processes", "map")
        };
        let mut patch = Row::new(&format!("file.patch.{n}"), &format!("PATCH_FILE per process, {n} {what}"),
            &format!("one PATCH_FILE ioctl (PATCH_INSTALL_PMD) of one site of a 2 MiB text file that {n} idle {what} {map} (the same {n} every cycle, each PMD-mapped again before it): the rmap walk of the site's page-cache folio, then PATCH in each process in turn (split, COW, write), divided by {n}"),
            "every process holds the new bytes after it (/proc/PID/mem), and the kernel named exactly these processes");
        let mut restore = Row::new(&format!("file.restore.{n}"), &format!("RESTORE of a file patch per process, {n} {what}"),
            &format!("RESTORE of that handle: RESTORE in each of the {n} {what} in turn (bytes back, copy zapped, collapse queued; it installs the PMD after), divided by {n}"),
            "every process holds the file's bytes after it");
        let cycles = (self.cycles * 8)
            .div_ceil(n)
            .clamp(self.cycles.min(10), self.cycles);
        let mems: Vec<Mem> = targets.iter().map(|(t, _)| Mem::open(t.pid)).collect();
        let mut want: Vec<i32> = targets.iter().map(|(t, _)| t.pid).collect();
        want.sort_unstable();
        let at = |k: usize| targets[k].0.page_addr(SITE_PAGE);
        for _ in 0..cycles {
            let p = timed(|| self.dev.patch_file(&file, &site, uapi::PATCH_INSTALL_PMD));
            check!(
                p.value.as_ref().is_ok_and(|(_, pids)| *pids == want),
                "PATCH_FILE: {:?}",
                p.value.as_ref().err()
            );
            let handle = p.value.as_ref().unwrap().0;
            for (k, m) in mems.iter().enumerate() {
                check!(
                    m.read(at(k), 6) == mov_eax_ret(4242),
                    "process {k} not patched"
                );
            }
            let r = timed(|| self.dev.restore(handle));
            check!(
                r.value.is_ok(),
                "RESTORE of the file patch: {:?}",
                r.value.as_ref().err()
            );
            for (k, m) in mems.iter().enumerate() {
                check!(
                    m.read(at(k), 6) == mov_eax_ret(original_value(SITE_PAGE)),
                    "process {k} not restored"
                );
            }
            // Not timed: each range PMD-mapped again before the next cycle.
            for (t, w) in &targets {
                let back = w.wait_pmd(t.addr, crate::probe::mono_ns(), 2_000_000_000);
                check!(
                    back.seen_at.is_some(),
                    "pid {}: no PMD back within 2 s",
                    t.pid
                );
            }
            let per = |x: i64| x / n as i64;
            patch.push(per(p.wall()), per(p.cpu));
            restore.push(per(r.wall()), per(r.cpu));
        }
        self.rows.extend([patch.classify(), restore.classify()]);
        drop(targets);
        let _ = std::fs::remove_file(&path);
    }
}
