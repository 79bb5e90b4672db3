// SPDX-License-Identifier: GPL-2.0

//! KUnit suite: runs in the kernel at module load (CONFIG_KUNIT) and reports
//! KTAP in dmesg, which `make check` counts.

use kernel::macros::kunit_tests;

#[kunit_tests(hugepoke)]
mod hugepoke {
    use crate::journal::{ErrnoName, Event, Ring, Step};
    use core::fmt::Write;
    use kernel::prelude::*;

    /// A growable text sink for formatting.
    struct Text(KVec<u8>);

    impl Write for Text {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0
                .extend_from_slice(s.as_bytes(), GFP_KERNEL)
                .map_err(|_| core::fmt::Error)
        }
    }

    fn text() -> Text {
        Text(KVec::new())
    }

    impl Text {
        fn as_str(&self) -> &str {
            core::str::from_utf8(&self.0).unwrap_or("<not utf-8>")
        }
    }

    fn event(step: Step) -> Event {
        Event::new(step).pid(42)
    }

    #[test]
    fn ring_keeps_newest_and_counts_dropped() {
        let mut ring = Ring::with_capacity(3).unwrap();
        for i in 0..5u64 {
            let seq = ring.push(event(Step::Open).addr(i as usize), 1000 + i);
            assert_eq!(seq, i + 1);
        }
        assert_eq!(ring.dropped(), 2);
        let mut out = text();
        ring.write_events(&mut out).unwrap();
        let lines: KVec<&str> = {
            let mut v = KVec::new();
            for l in out.as_str().lines() {
                v.push(l, GFP_KERNEL).unwrap();
            }
            v
        };
        assert_eq!(lines[0], "# dropped 2");
        // Oldest kept first: seq 3, 4, 5.
        assert_eq!(lines.len(), 2 + 3);
        assert!(lines[2].starts_with("3 1002 42 - 0x2 open "));
        assert!(lines[3].starts_with("4 1003 "));
        assert!(lines[4].starts_with("5 1004 "));
    }

    #[test]
    fn ring_counts_ok_and_failed_per_step() {
        let mut ring = Ring::with_capacity(2).unwrap();
        ring.push(event(Step::Open), 1);
        ring.push(event(Step::Ioctl).error(ENOTTY, "unknown ioctl command"), 2);
        ring.push(event(Step::Ioctl), 3);
        ring.push(event(Step::Ioctl).error(EINVAL, "x"), 4);
        // Counters survive the ring dropping old records.
        assert_eq!(ring.count(Step::Open, false), 1);
        assert_eq!(ring.count(Step::Ioctl, false), 1);
        assert_eq!(ring.count(Step::Ioctl, true), 2);
        let mut out = text();
        ring.write_stats(&mut out).unwrap();
        assert!(out.as_str().contains("\nioctl 1 2\n"));
        assert!(out.as_str().contains("\nevents_dropped 2\n"));
    }

    #[test]
    fn stats_break_down_decisions_and_failures_by_reason() {
        let mut ring = Ring::with_capacity(2).unwrap();
        ring.push(
            event(Step::KeepAnonPage).note("other patches remain on this page"),
            1,
        );
        ring.push(
            event(Step::KeepAnonPage).note("other patches remain on this page"),
            2,
        );
        ring.push(
            event(Step::KeepAnonPage).note("page has unexpected references (pinned or in a pipe)"),
            3,
        );
        ring.push(event(Step::Collapse).note("PMD installed"), 4);
        ring.push(event(Step::Patch).error(EINVAL, "unknown flag bits"), 5);
        // An ok step that is no decision is not broken down.
        ring.push(
            event(Step::Patched).note("page-cache folio is PMD-mappable"),
            6,
        );
        assert_eq!(
            ring.count_by_reason(Step::KeepAnonPage, "other patches remain on this page"),
            2
        );
        assert_eq!(ring.count_by_reason(Step::Collapse, "PMD installed"), 1);
        assert_eq!(ring.count_by_reason(Step::Patch, "unknown flag bits"), 1);
        assert_eq!(
            ring.count_by_reason(Step::Patched, "page-cache folio is PMD-mappable"),
            0
        );
        let mut out = text();
        ring.write_stats(&mut out).unwrap();
        assert!(out
            .as_str()
            .contains("\nkeep_anon_page 2 other patches remain on this page\n"));
        assert!(out.as_str().contains("\npatch 1 unknown flag bits\n"));
        assert!(out.as_str().ends_with("other_reasons 0\n"));
    }

    #[test]
    fn event_line_has_every_field() {
        let mut ring = Ring::with_capacity(4).unwrap();
        ring.push(
            event(Step::Ioctl)
                .handle(7)
                .addr(0x7f00_0000_1000)
                .page(0x1234, 9)
                .error(EACCES, "not allowed"),
            99,
        );
        let mut out = text();
        ring.write_events(&mut out).unwrap();
        let last = out.as_str().lines().last().unwrap();
        assert_eq!(
            last,
            "1 99 42 7 0x7f0000001000 ioctl 0x1234 9 -EACCES not allowed"
        );
    }

    #[test]
    fn few_holds_one_inline_and_no_more_than_its_room() {
        use crate::few::Few;
        let mut one: Few<u32> = Few::with_capacity(1, GFP_KERNEL).unwrap();
        assert!(matches!(one, Few::Empty));
        assert_eq!(one.push_within_capacity(7), Ok(()));
        assert_eq!(one.push_within_capacity(8), Err(8));
        assert_eq!(&one[..], &[7]);
        one[0] = 9;
        assert!(matches!(one, Few::One(9)));
        let mut three: Few<u32> = Few::with_capacity(3, GFP_KERNEL).unwrap();
        for i in 0..3 {
            assert_eq!(three.push_within_capacity(i), Ok(()));
        }
        assert_eq!(three.push_within_capacity(3), Err(3));
        three.swap(0, 2);
        assert_eq!(&three[..], &[2, 1, 0]);
        assert!(Few::<u32>::default().is_empty());
    }

    #[test]
    fn errno_names() {
        let mut out = text();
        write!(
            out,
            "{} {} {}",
            ErrnoName(-22),
            ErrnoName(-3),
            ErrnoName(-200)
        )
        .unwrap();
        assert_eq!(out.as_str(), "-EINVAL -ESRCH -E200");
    }

    // The patch-table decisions, on plain data: identities, not addresses.

    use crate::patches::{Patches, Site};
    use crate::policy::{address_in, check_restore_vma};
    use crate::sys::VmaInfo;
    use kernel::bindings::{VM_EXEC, VM_MAYWRITE, VM_READ, VM_SHARED, VM_WRITE};

    const FILE_A: usize = 0xa000;
    const FILE_B: usize = 0xb000;

    fn site(
        handle: u64,
        owner: Option<u64>,
        mapping: usize,
        pgoff: usize,
        offset: usize,
        len: usize,
    ) -> Site {
        Site {
            handle,
            index: 0,
            owner,
            pid: 1,
            addr: 0x40_0000 + (pgoff << 12) + offset,
            len,
            flags: 0,
            mapping,
            pgoff,
            bytes: [0x90; 16],
            orig: [0xcc; 16],
            pfn: 0,
            family: 0,
            since: 0,
            pmd_mappable: true,
            restored_at: 0,
        }
    }

    /// Record `sites` (a page each, or runs of one page) as one handle.
    fn insert(t: &mut Patches<()>, sites: &[Site], per_page: usize) {
        let room = t
            .reserve(
                sites.len(),
                sites.chunks(per_page).map(|r| (r[0].page_key(), r.len())),
            )
            .unwrap();
        let (mut files, mut record) = (KVec::new(), KVVec::new());
        for _ in sites.chunks(per_page) {
            files.push(Some(()), GFP_KERNEL).unwrap();
        }
        record.extend_from_slice(sites, GFP_KERNEL).unwrap();
        let runs = (0..sites.len())
            .step_by(per_page)
            .map(|i| i..(i + per_page).min(sites.len()));
        assert_eq!(t.insert(room, record, runs.zip(files.iter_mut())), 0);
    }

    /// Every handle of `owner` (every one, for None), by the table's walk.
    fn handles_of(t: &Patches<()>, owner: Option<u64>, out: &mut KVec<u64>) {
        let mut next = 0;
        while let Some(h) = t.next_handle_of(owner, next) {
            out.push(h, GFP_KERNEL).unwrap();
            next = h + 1;
        }
    }

    fn table(sites: &[Site]) -> Patches<()> {
        let mut t = Patches::new();
        for s in sites {
            insert(&mut t, core::slice::from_ref(s), 1);
        }
        t
    }

    /// A batch: `n` one-byte sites under one handle, `per_page` to a page.
    fn batch(
        t: &mut Patches<()>,
        handle: u64,
        owner: Option<u64>,
        mapping: usize,
        first_pgoff: usize,
        n: usize,
        per_page: usize,
    ) {
        let mut sites = KVec::new();
        for i in 0..n {
            let mut s = site(
                handle,
                owner,
                mapping,
                first_pgoff + i / per_page,
                (i % per_page) * 2,
                1,
            );
            s.index = i as u32;
            sites.push(s, GFP_KERNEL).unwrap();
        }
        insert(t, &sites, per_page);
    }

    #[test]
    fn overlap_is_per_file_page_and_byte_range() {
        let t = table(&[site(1, Some(7), FILE_A, 5, 100, 6)]);
        assert!(t.overlaps(FILE_A, 5, 100, 1));
        assert!(t.overlaps(FILE_A, 5, 95, 6)); // ends inside
        assert!(t.overlaps(FILE_A, 5, 105, 4)); // starts on the last byte
        assert!(!t.overlaps(FILE_A, 5, 106, 4)); // right after
        assert!(!t.overlaps(FILE_A, 5, 94, 6)); // right before
        assert!(!t.overlaps(FILE_A, 6, 100, 6)); // next page
        assert!(!t.overlaps(FILE_B, 5, 100, 6)); // same offset, other file
    }

    #[test]
    fn last_on_page_and_last_in_range() {
        let t = table(&[
            site(1, None, FILE_A, 5, 0, 1),
            site(2, None, FILE_A, 5, 8, 1),
            site(3, None, FILE_A, 511, 0, 1),
            site(4, None, FILE_B, 512, 0, 1),
        ]);
        assert_eq!(t.on_page((FILE_A, 5)), 2);
        assert_eq!(t.on_page((FILE_A, 511)), 1);
        assert_eq!(t.on_page((FILE_A, 6)), 0);
        // Pages 0..512 of a file are one PMD-sized range; 512 starts the next.
        assert_eq!(t.in_range((FILE_A, 0)), 3);
        assert_eq!(t.in_range((FILE_B, 1)), 1);
        assert_eq!(t.in_range((FILE_B, 0)), 0);
        assert_eq!(t.in_range((FILE_A, 1)), 0);
    }

    #[test]
    fn handles_of_an_owner_and_removal() {
        let mut t = table(&[
            site(1, Some(7), FILE_A, 1, 0, 1),
            site(2, None, FILE_A, 2, 0, 1),
            site(3, Some(8), FILE_A, 3, 0, 1),
        ]);
        let mut v = KVec::new();
        handles_of(&t, Some(7), &mut v);
        assert_eq!(&v[..], &[1]);
        let mut all = KVec::new();
        handles_of(&t, None, &mut all);
        assert_eq!(&all[..], &[1, 2, 3]);
        assert!(t.remove(2, 0).is_some());
        assert!(t.remove(2, 0).is_none());
        assert!(t.get(2, 0).is_none() && t.get(3, 0).is_some());
        // Persistent from now on: no longer the owner's.
        t.disown(1);
        let mut v = KVec::new();
        handles_of(&t, Some(7), &mut v);
        assert!(v.is_empty());
        assert_eq!(t.get(1, 0).unwrap().owner, None);
    }

    #[test]
    fn a_batch_is_one_handle_with_counted_pages_and_ranges() {
        let mut t = Patches::new();
        // 10 pages of 100 one-byte sites each (every other byte), handle 9.
        batch(&mut t, 9, Some(7), FILE_A, 20, 1000, 100);
        batch(&mut t, 10, None, FILE_A, 600, 3, 3);
        assert_eq!(t.count(9), 1000);
        assert_eq!(t.count(10), 3);
        // The target's total, which PATCH holds to MAX_TARGET_SITES.
        assert_eq!(t.live_sites(), 1003);
        assert_eq!(t.on_page((FILE_A, 20)), 100);
        assert_eq!(t.in_range((FILE_A, 0)), 1000);
        assert_eq!(t.in_range((FILE_A, 1)), 3);
        // The sites of page 21 sit at even offsets: odd bytes are free.
        assert!(t.overlaps(FILE_A, 21, 198, 1));
        assert!(!t.overlaps(FILE_A, 21, 199, 1));
        assert!(t.overlaps(FILE_A, 21, 197, 2)); // ends on the site at 198
        assert!(!t.overlaps(FILE_A, 21, 200, 16)); // past the page's last site
        assert!(t.overlaps(FILE_A, 29, 0, 16));
        assert!(!t.overlaps(FILE_A, 30, 0, 16)); // the page after the batch
                                                 // A handle's sites come back grouped by page, in page order.
        let sites = t.sites_of(9).unwrap();
        assert_eq!(sites.len(), 1000);
        assert!(sites
            .windows(2)
            .all(|w| (w[0].pgoff, w[0].offset()) < (w[1].pgoff, w[1].offset())));
        assert_eq!(t.get(9, 999).unwrap().pgoff, 29);
        let mut v = KVec::new();
        handles_of(&t, Some(7), &mut v);
        assert_eq!(&v[..], &[9]);
        // Removing every site removes the handle, its pages and its range.
        for i in 0..1000 {
            assert!(t.remove(9, i).is_some());
        }
        assert_eq!(t.count(9), 0);
        assert_eq!(t.live_sites(), 3);
        assert_eq!(t.on_page((FILE_A, 20)), 0);
        assert_eq!(t.in_range((FILE_A, 0)), 0);
        let mut v = KVec::new();
        handles_of(&t, Some(7), &mut v);
        assert!(v.is_empty());
        assert!(!t.is_empty());
    }

    #[test]
    fn a_kept_part_of_a_batch_keeps_its_own_indexes() {
        // What a failed batch keeps: sites 1 and 2 of 3 (site 0 was undone).
        let mut t = Patches::new();
        let mut sites = KVec::new();
        for i in [2u32, 1] {
            let mut s = site(5, Some(7), FILE_A, 10 + i as usize, 0, 1);
            s.index = i;
            sites.push(s, GFP_KERNEL).unwrap();
        }
        insert(&mut t, &sites, 1);
        assert_eq!(t.count(5), 2);
        assert!(t.get(5, 0).is_none());
        let mut found = KVec::new();
        for s in t.sites_of_handle(5) {
            found.push(s.index, GFP_KERNEL).unwrap();
        }
        assert_eq!(&found[..], &[1, 2]);
        assert_eq!(t.sites_of(5).unwrap().len(), 2);
        // Given out of index order: each page still finds its own site.
        assert_eq!(
            (t.get(5, 1).unwrap().pgoff, t.get(5, 2).unwrap().pgoff),
            (11, 12)
        );
        t.disown(5);
        assert!(t.sites_of_handle(5).all(|s| s.owner.is_none()));
        assert_eq!(t.remove_page(5, (FILE_A, 12)).unwrap().sites, 1);
        assert!(t.get(5, 2).is_none() && t.get(5, 1).is_some());
        assert!(t.remove(5, 2).is_none() && t.remove(5, 1).is_some());
        assert_eq!(t.count(5), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn a_batch_out_of_index_order_on_one_page() {
        let mut t = Patches::new();
        // In address order, as PATCH_BATCH records them: site 1 at offset
        // 0, site 0 at offset 100.
        let mut sites = KVec::new();
        for (index, offset) in [(1u32, 0), (0, 100)] {
            let mut s = site(4, None, FILE_A, 7, offset, 1);
            s.index = index;
            sites.push(s, GFP_KERNEL).unwrap();
        }
        insert(&mut t, &sites, 2);
        assert_eq!(t.get(4, 0).unwrap().offset(), 100);
        // By index, as QUERY lists them.
        assert_eq!(t.sites_of_handle(4).next().unwrap().index, 0);
        assert!(t.remove(4, 0).is_some());
        assert!(t.overlaps(FILE_A, 7, 0, 1) && !t.overlaps(FILE_A, 7, 100, 1));
        assert!(t.get(4, 0).is_none() && t.get(4, 1).is_some());
    }

    #[test]
    fn the_page_keeps_its_file_while_another_handle_is_there() {
        // Handle 1 brings page 5 (and its file) in; handle 2 joins it.
        let mut t = table(&[
            site(1, None, FILE_A, 5, 50, 4),
            site(2, None, FILE_A, 5, 0, 2),
        ]);
        // The one that brought the file leaves first: the page, its file
        // and handle 2's site stay.
        assert!(t.remove(1, 0).unwrap().file.is_none());
        assert_eq!((t.on_page((FILE_A, 5)), t.in_range((FILE_A, 0))), (1, 1));
        assert!(t.overlaps(FILE_A, 5, 1, 1) && !t.overlaps(FILE_A, 5, 50, 4));
        assert!(t.remove(2, 0).unwrap().file.is_some());
        assert!(t.is_empty() && t.on_page((FILE_A, 5)) == 0);
    }

    #[test]
    fn handles_share_a_page_and_leave_it_a_page_at_a_time() {
        let mut t = table(&[site(1, None, FILE_A, 5, 50, 4)]);
        // Handle 2: offsets 0, 10 and 100 of page 5, and page 6; its
        // sites go around handle 1's.
        let mut sites = KVec::new();
        for (i, (pgoff, offset)) in [(5, 0), (5, 10), (5, 100), (6, 0)].into_iter().enumerate() {
            let mut s = site(2, Some(7), FILE_A, pgoff, offset, 2);
            s.index = i as u32;
            sites.push(s, GFP_KERNEL).unwrap();
        }
        let room = t
            .reserve(4, [((FILE_A, 5), 3), ((FILE_A, 6), 1)].into_iter())
            .unwrap();
        let (mut f5, mut f6) = (Some(()), Some(()));
        let mut record = KVVec::new();
        record.extend_from_slice(&sites, GFP_KERNEL).unwrap();
        // Page 5 is in the table already: its file stays with the caller.
        assert_eq!(
            t.insert(room, record, [(0..3, &mut f5), (3..4, &mut f6)].into_iter()),
            0
        );
        assert!(f5.is_some() && f6.is_none());
        assert_eq!(t.on_page((FILE_A, 5)), 4);
        assert_eq!(t.in_range((FILE_A, 0)), 5);
        assert!(t.overlaps(FILE_A, 5, 53, 1)); // handle 1's last byte
        assert!(t.overlaps(FILE_A, 5, 9, 2)); // ends on handle 2's site at 10
        assert!(!t.overlaps(FILE_A, 5, 12, 38)); // 12..50 is free
        assert!(!t.overlaps(FILE_A, 5, 54, 46)); // 54..100 is free
        assert!(t.overlaps(FILE_A, 5, 54, 47));
        // Handle 2 leaves page 5: handle 1 stays there, with the page's file.
        let gone = t.remove_page(2, (FILE_A, 5)).unwrap();
        assert_eq!(gone.sites, 3);
        assert!(gone.file.is_none());
        assert!(t.remove_page(2, (FILE_A, 5)).is_none());
        assert_eq!(
            (t.on_page((FILE_A, 5)), t.count(2), t.in_range((FILE_A, 0))),
            (1, 1, 2)
        );
        assert!(!t.overlaps(FILE_A, 5, 0, 50) && t.overlaps(FILE_A, 5, 50, 1));
        assert!(t.get(2, 0).is_none() && t.get(2, 3).is_some());
        let mut found = KVec::new();
        for s in t.sites_of_handle(2) {
            found.push(s.index, GFP_KERNEL).unwrap();
        }
        assert_eq!(&found[..], &[3]);
        // The last site of a page takes the file with it; the last of a
        // handle takes the handle.
        assert!(t.remove_page(2, (FILE_A, 6)).unwrap().file.is_some());
        assert_eq!(t.count(2), 0);
        let mut v = KVec::new();
        handles_of(&t, Some(7), &mut v);
        assert!(v.is_empty());
        assert!(t.remove(1, 0).unwrap().file.is_some());
        assert!(t.is_empty() && t.in_range((FILE_A, 0)) == 0);
    }

    fn vma(start: usize, pages: usize, mapping: usize, pgoff: usize, flags: usize) -> VmaInfo {
        VmaInfo {
            start,
            end: start + (pages << 12),
            flags,
            mapping,
            pgoff,
            ..Default::default()
        }
    }

    #[test]
    fn identity_follows_the_file_page_not_the_address() {
        let text = (VM_READ | VM_EXEC | VM_MAYWRITE) as usize;
        let s = site(1, None, FILE_A, 5, 0x10, 2);
        // Where it was made: file pages 0..512 at 0x400000.
        assert_eq!(
            address_in(&s, &vma(0x40_0000, 512, FILE_A, 0, text)),
            Some(0x40_5010)
        );
        // After mremap to 0x7f0000000000: the same file page, elsewhere.
        assert_eq!(
            address_in(&s, &vma(0x7f00_0000_0000, 512, FILE_A, 0, text)),
            Some(0x7f00_0000_5010)
        );
        // A VMA that maps file pages 4..6 only.
        assert_eq!(
            address_in(&s, &vma(0x10_0000, 2, FILE_A, 4, text)),
            Some(0x10_1010)
        );
        assert_eq!(address_in(&s, &vma(0x10_0000, 1, FILE_A, 4, text)), None);
        assert_eq!(address_in(&s, &vma(0x10_0000, 4, FILE_A, 6, text)), None);
        // Another file mapped at the very same address: not ours.
        assert_eq!(address_in(&s, &vma(0x40_0000, 512, FILE_B, 0, text)), None);
        // Anonymous memory there: not ours either.
        assert_eq!(address_in(&s, &vma(0x40_0000, 512, 0, 0, text)), None);
    }

    #[test]
    fn restore_writes_only_into_private_readonly_exec_mappings() {
        let text = (VM_READ | VM_EXEC | VM_MAYWRITE) as usize;
        // `matches!`, not `unwrap_err()`: a broken check fails the test
        // instead of panicking the kernel.
        let refused = |flags: usize, word: &str| matches!(check_restore_vma(&vma(0, 1, FILE_A, 0, flags)), Err(r) if r.why.contains(word));
        assert!(check_restore_vma(&vma(0, 1, FILE_A, 0, text)).is_ok());
        assert!(refused(text | VM_WRITE as usize, "writable"));
        assert!(refused(text | VM_SHARED as usize, "shared"));
        assert!(refused(VM_READ as usize, "exec"));
    }

    /// COLLAPSE drops copies only in private, read-only, executable file
    /// text whose whole 2 MiB lies in one VMA at a file offset a PMD can map.
    #[test]
    fn collapse_takes_only_private_exec_text_a_pmd_can_map() {
        use crate::policy::check_collapse_vma;
        let text = (VM_READ | VM_EXEC | VM_MAYWRITE) as usize;
        let base = 0x7f00_0000_0000;
        let ok = |v: &VmaInfo| check_collapse_vma(v, base + 0x20_0000).is_ok();
        let refused = |v: &VmaInfo, word: &str| matches!(check_collapse_vma(v, base + 0x20_0000), Err(r) if r.errno == EINVAL && r.why.contains(word));
        // File pages 0..1024 at `base`: the second 2 MiB is file pages 512..1024.
        assert!(ok(&vma(base, 1024, FILE_A, 0, text)));
        // The same range, the VMA starting at file page 512 one range up.
        assert!(ok(&vma(base + 0x20_0000, 512, FILE_A, 512, text)));
        // Address and file offset disagree modulo 2 MiB: no PMD fits.
        assert!(refused(&vma(base, 1024, FILE_A, 1, text), "modulo 2 MiB"));
        // The VMA ends one page short of the range, or starts inside it.
        assert!(refused(
            &vma(base, 1023, FILE_A, 0, text),
            "inside one mapping"
        ));
        assert!(refused(
            &vma(base + 0x20_1000, 511, FILE_A, 513, text),
            "inside one mapping"
        ));
        assert!(refused(&vma(base, 1024, 0, 0, text), "file-backed"));
        assert!(refused(
            &vma(base, 1024, FILE_A, 0, text | VM_WRITE as usize),
            "not text"
        ));
        assert!(refused(
            &vma(base, 1024, FILE_A, 0, text | VM_SHARED as usize),
            "not text"
        ));
        assert!(refused(
            &vma(base, 1024, FILE_A, 0, VM_READ as usize),
            "not text"
        ));
        let nohuge = text | kernel::bindings::VM_NOHUGEPAGE as usize;
        assert!(refused(
            &vma(base, 1024, FILE_A, 0, nohuge),
            "MADV_NOHUGEPAGE"
        ));
        let hugetlb = text | kernel::bindings::VM_HUGETLB as usize;
        assert!(refused(
            &vma(base, 1024, FILE_A, 0, hugetlb),
            "ordinary pages"
        ));
    }

    /// COLLAPSE's header and address checks, before any lookup.
    #[test]
    fn collapse_arguments_are_checked_before_the_target() {
        use crate::policy::check_collapse_args;
        use crate::uapi::{CollapseArgs, COLLAPSE_INSTALL_PMD};
        let base = 0x7f00_0000_0000;
        let args = CollapseArgs {
            size: core::mem::size_of::<CollapseArgs>() as u32,
            flags: COLLAPSE_INSTALL_PMD,
            addr: base as u64,
            ..Default::default()
        };
        assert!(matches!(check_collapse_args(&args), Ok(a) if a == base));
        let why = |a: CollapseArgs| check_collapse_args(&a).err().map(|r| r.why);
        assert_eq!(
            why(CollapseArgs {
                addr: base as u64 + 0x1000,
                ..args
            }),
            Some("address is not 2 MiB-aligned")
        );
        assert_eq!(
            why(CollapseArgs {
                addr: u64::MAX & !0x1f_ffff,
                ..args
            }),
            Some("address out of range")
        );
        assert_eq!(
            why(CollapseArgs { flags: 2, ..args }),
            Some("unknown flag bits")
        );
        assert_eq!(
            why(CollapseArgs { size: 48, ..args }),
            Some("unknown struct size")
        );
    }

    /// PATCH_BATCH's header checks, before any site is read: size, flags
    /// (a site's own flag is no batch flag), count 1 to 16384; and
    /// PATCH_FILE's count, held to the same bounds.
    #[test]
    fn batch_arguments_are_checked_before_the_sites() {
        use crate::policy::check_batch_args;
        use crate::uapi::{PatchBatchArgs, PATCH_EXPECT, PATCH_OVER_CHANGED, PATCH_PERSIST};
        let ok = PatchBatchArgs {
            size: core::mem::size_of::<PatchBatchArgs>() as u32,
            flags: PATCH_PERSIST | PATCH_OVER_CHANGED,
            count: 1,
            ..Default::default()
        };
        let refused = |a: PatchBatchArgs, word: &str| matches!(check_batch_args(&a), Err(r) if r.errno == EINVAL && r.why.contains(word));
        assert!(check_batch_args(&ok).is_ok());
        assert!(check_batch_args(&PatchBatchArgs { count: 16384, ..ok }).is_ok());
        assert!(refused(PatchBatchArgs { count: 0, ..ok }, "1 to 16384"));
        assert!(refused(PatchBatchArgs { count: 16385, ..ok }, "1 to 16384"));
        assert!(refused(PatchBatchArgs { size: 32, ..ok }, "struct size"));
        assert!(refused(
            PatchBatchArgs {
                flags: PATCH_EXPECT,
                ..ok
            },
            "flag bits"
        ));
        assert!(refused(
            PatchBatchArgs {
                flags: 1 << 9,
                ..ok
            },
            "flag bits"
        ));
        // PATCH_FILE's sites are a batch: the same bounds on their count.
        use crate::{policy::check_file_args, uapi::PatchFileArgs};
        let file = PatchFileArgs {
            size: core::mem::size_of::<PatchFileArgs>() as u32,
            count: 1,
            ..Default::default()
        };
        let refused = |a: PatchFileArgs| matches!(check_file_args(&a), Err(r) if r.errno == EINVAL && r.why.contains("1 to 16384"));
        assert!(check_file_args(&file).is_ok());
        assert!(check_file_args(&PatchFileArgs {
            count: 16384,
            ..file
        })
        .is_ok());
        assert!(refused(PatchFileArgs { count: 0, ..file }));
        assert!(refused(PatchFileArgs {
            count: 16385,
            ..file
        }));
    }

    #[test]
    fn step_names_are_unique() {
        for (i, a) in Step::ALL.iter().enumerate() {
            for b in &Step::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    /// Each step's trace event is the one helpers.c emits for its number.
    #[test]
    fn each_step_has_its_own_trace_event() {
        for &step in Step::ALL {
            let name = crate::sys::trace_step_name(step as u32).map(|n| n.to_bytes());
            assert_eq!(name, Some(step.name().as_bytes()));
        }
        assert!(crate::sys::trace_step_name(Step::COUNT as u32).is_none());
    }
}
