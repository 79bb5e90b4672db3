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
        ring.push(event(Step::KeepAnonPage).note("other patches remain on this page"), 1);
        ring.push(event(Step::KeepAnonPage).note("other patches remain on this page"), 2);
        ring.push(event(Step::KeepAnonPage).note("page has unexpected references (pinned or in a pipe)"), 3);
        ring.push(event(Step::Collapse).note("PMD installed"), 4);
        ring.push(event(Step::Patch).error(EINVAL, "unknown flag bits"), 5);
        // An ok step that is no decision is not broken down.
        ring.push(event(Step::Patched).note("page-cache folio is PMD-mappable"), 6);
        assert_eq!(ring.count_by_reason(Step::KeepAnonPage, "other patches remain on this page"), 2);
        assert_eq!(ring.count_by_reason(Step::Collapse, "PMD installed"), 1);
        assert_eq!(ring.count_by_reason(Step::Patch, "unknown flag bits"), 1);
        assert_eq!(ring.count_by_reason(Step::Patched, "page-cache folio is PMD-mappable"), 0);
        let mut out = text();
        ring.write_stats(&mut out).unwrap();
        assert!(out.as_str().contains("\nkeep_anon_page 2 other patches remain on this page\n"));
        assert!(out.as_str().contains("\npatch 1 unknown flag bits\n"));
        assert!(out.as_str().ends_with("other_reasons 0\n"));
    }

    #[test]
    fn event_line_has_every_field() {
        let mut ring = Ring::with_capacity(4).unwrap();
        ring.push(
            event(Step::Ioctl).handle(7).addr(0x7f00_0000_1000).page(0x1234, 9).error(EACCES, "not allowed"),
            99,
        );
        let mut out = text();
        ring.write_events(&mut out).unwrap();
        let last = out.as_str().lines().last().unwrap();
        assert_eq!(last, "1 99 42 7 0x7f0000001000 ioctl 0x1234 9 -EACCES not allowed");
    }

    #[test]
    fn errno_names() {
        let mut out = text();
        write!(out, "{} {} {}", ErrnoName(-22), ErrnoName(-3), ErrnoName(-200)).unwrap();
        assert_eq!(out.as_str(), "-EINVAL -ESRCH -E200");
    }

    #[test]
    fn step_names_are_unique() {
        for (i, a) in Step::ALL.iter().enumerate() {
            for b in &Step::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
