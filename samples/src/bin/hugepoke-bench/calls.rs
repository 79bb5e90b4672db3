//! A single call against a write (issue 22, item 2): PATCH and RESTORE of
//! one 6-byte site on a page that is already an anonymous copy (another
//! site of the same target lives on it, so RESTORE keeps the page), and a
//! `/proc/PID/mem` write of the same 6 bytes and of the originals, at the
//! same address of the same target.  Rounds alternate which method goes
//! first; the ratio of the medians is taken round by round.

use super::{Run, SITE_PAGE};
use crate::probe::{check, fresh_target, timed, Mem};
use crate::report::{Ratio, Row};
use hugepoke::device::PatchRequest;

/// The measured site: 6 bytes of int3 padding on the site page.
const AT: u64 = 1024;
/// The site that keeps the page a copy.
const ANCHOR: u64 = 512;
const INT3: u8 = 0xcc;

impl Run {
    pub(super) fn calls_on_a_copy(&mut self) {
        let (t, w) = fresh_target(&self.file, false);
        let mem = Mem::open(t.pid);
        let page = t.page_addr(SITE_PAGE);
        let cache = w.pfn(page);
        let anchor = self.dev.patch(&PatchRequest {
            pid: t.pid,
            addr: page + ANCHOR,
            bytes: vec![0x90],
            ..Default::default()
        });
        check!(anchor.is_ok(), "the anchor PATCH: {anchor:?}");
        check!(
            cache.is_some() && w.pfn(page).is_some_and(|f| Some(f) != cache),
            "the site page is not an anonymous copy"
        );
        let addr = page + AT;
        let (new, orig) = (super::new_bytes(SITE_PAGE), vec![INT3; 6]);
        let copy = w.pfn(page);
        let checked = "the 6 bytes read back after every call; the page still the same anonymous copy after each round";
        let what = "6 bytes at page 17 + 1024 of one idle target reused for every round, a page that another live site keeps an anonymous copy";
        let mut rows = [
            Row::new("calls.patch", "PATCH on an already-copied page (one target reused)", &format!("one PATCH ioctl: {what}"), checked),
            Row::new("calls.restore", "RESTORE of that site (the page stays a copy)", "one RESTORE ioctl: the bytes written back; no zap, no drain, no collapse (the other site keeps the page)", checked),
            Row::new("calls.mem.new", "/proc/PID/mem write of the same 6 bytes (one target reused)", &format!("pwrite(2) of the new bytes: {what}"), checked),
            Row::new("calls.mem.orig", "/proc/PID/mem write of the originals", "pwrite(2) of the original 6 bytes right after", checked),
        ];
        let rounds = 5;
        let per_round = (self.cycles * 2).max(100);
        let mut round_medians: Vec<[i64; 4]> = Vec::new();
        for round in 0..rounds {
            let mut samples: [Vec<i64>; 4] = Default::default();
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for hugepoke in order {
                for _ in 0..per_round {
                    if hugepoke {
                        let req = PatchRequest {
                            pid: t.pid,
                            addr,
                            bytes: new.clone(),
                            ..Default::default()
                        };
                        let p = timed(|| self.dev.patch(&req));
                        check!(p.value.is_ok(), "PATCH: {:?}", p.value);
                        check!(mem.read(addr, 6) == new, "PATCH: not the new bytes");
                        let h = *p.value.as_ref().unwrap();
                        let r = timed(|| self.dev.restore(h));
                        check!(r.value.is_ok(), "RESTORE: {:?}", r.value);
                        check!(mem.read(addr, 6) == orig, "RESTORE: not the originals");
                        rows[0].push(p.wall(), p.cpu);
                        rows[1].push(r.wall(), r.cpu);
                        samples[0].push(p.wall());
                        samples[1].push(r.wall());
                    } else {
                        let a = timed(|| mem.write(addr, &new));
                        check!(a.value.is_ok(), "write: {:?}", a.value);
                        check!(mem.read(addr, 6) == new, "write: not the new bytes");
                        let b = timed(|| mem.write(addr, &orig));
                        check!(b.value.is_ok(), "write back: {:?}", b.value);
                        check!(mem.read(addr, 6) == orig, "write back: not the originals");
                        rows[2].push(a.wall(), a.cpu);
                        rows[3].push(b.wall(), b.cpu);
                        samples[2].push(a.wall());
                        samples[3].push(b.wall());
                    }
                }
            }
            check!(
                w.pfn(page) == copy,
                "the site page changed copies during round {round}"
            );
            round_medians.push(samples.map(|s| crate::stats::median(&s).unwrap_or(0)));
        }
        let ratio = |a: usize, b: usize| -> Vec<f64> {
            round_medians
                .iter()
                .map(|m| m[a] as f64 / m[b].max(1) as f64)
                .collect()
        };
        self.ratios.push(Ratio {
            label: "PATCH on a copied page : /proc/PID/mem write of the same bytes".into(),
            per_round: ratio(0, 2),
        });
        self.ratios.push(Ratio {
            label: "RESTORE keeping the copy : /proc/PID/mem write of the originals".into(),
            per_round: ratio(1, 3),
        });
        let r = self.dev.restore(anchor.unwrap());
        check!(r.is_ok(), "the anchor's RESTORE: {r:?}");
        self.rows.extend(rows.map(Row::classify));
    }
}
