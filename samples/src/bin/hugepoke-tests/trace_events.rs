//! Tracing: each journaled step is also a kernel trace event.

use crate::common::*;
use crate::TestResult;
use hugepoke::proc::{parse_trace, TraceLine};
use std::path::PathBuf;

const TRACEFS: &str = "/sys/kernel/tracing";

/// A tracefs instance (its own ring buffer, so the global trace and other
/// users are left alone) with hugepoke's events enabled; removed on drop.
struct TraceInstance(PathBuf);

impl TraceInstance {
    fn new(name: &str) -> Result<Self, String> {
        if !std::path::Path::new(TRACEFS).join("instances").is_dir() {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tracefs", "tracefs", TRACEFS])
                .status();
            ensure!(
                matches!(ok, Ok(s) if s.success()),
                "cannot mount tracefs at {TRACEFS}"
            );
        }
        let dir = PathBuf::from(TRACEFS).join("instances").join(name);
        // Left over from an interrupted run: start from an empty buffer.
        let _ = std::fs::remove_dir(&dir);
        io(std::fs::create_dir(&dir))?;
        let instance = Self(dir);
        io(std::fs::write(
            instance.0.join("events/hugepoke/enable"),
            "1",
        ))?;
        Ok(instance)
    }

    /// hugepoke's events recorded so far, oldest first.
    fn events(&self) -> Result<Vec<TraceLine>, String> {
        Ok(parse_trace(&io(std::fs::read_to_string(
            self.0.join("trace"),
        ))?))
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("events/hugepoke/enable"), "0");
        let _ = std::fs::remove_dir(&self.0);
    }
}

pub(crate) fn trace_events_carry_each_step_and_its_pfns() -> TestResult {
    let t = Target::spawn(&[])?;
    let head = thp_head(&t)?;
    let dev = io(Device::open())?;
    const PAGE: usize = 9;
    let addr = t.page_addr(PAGE);
    let trace = TraceInstance::new("hugepoke-test")?;

    let handle = io(dev.patch(&patch_req(&t, PAGE, 9999)))?;
    let anon = text_pfns(&t)?[PAGE];
    ensure!(
        anon.present() && !anon.file(),
        "patched page pagemap {anon:?}"
    );
    io(dev.restore(handle))?;
    let mut journal = Vec::new();
    wait_for(
        "the queued collapse journaled",
        Duration::from_secs(30),
        || {
            journal = events()?;
            Ok(journal
                .iter()
                .any(|e| e.step == "collapse" && e.pid == t.pid))
        },
    )?;
    let traced: Vec<_> = trace
        .events()?
        .into_iter()
        .filter(|e| e.pid == t.pid)
        .collect();
    drop(trace);

    // The trace says what the journal says, step for step, in its order.
    let from = journal
        .iter()
        .position(|e| e.step == "patch" && e.pid == t.pid)
        .ok_or("no patch journaled")?;
    let journaled: Vec<_> = journal[from..].iter().filter(|e| e.pid == t.pid).collect();
    ensure!(
        traced.len() == journaled.len(),
        "traced {:?}, journaled {:?}",
        traced.iter().map(|e| &e.step).collect::<Vec<_>>(),
        journaled.iter().map(|e| &e.step).collect::<Vec<_>>()
    );
    for (tr, j) in traced.iter().zip(&journaled) {
        ensure!(
            tr.matches(j),
            "trace {tr:?} disagrees with the journal's {j:?}"
        );
    }

    // And it has the PFNs seen through pagemap: the THP, the anonymous copy,
    // the page-cache subpage that faults back; the collapse's SCAN_ result.
    let step = |name: &str, nth: usize| {
        traced
            .iter()
            .filter(|e| e.step == name)
            .nth(nth)
            .ok_or(format!("no {name} #{nth} traced"))
    };
    let split = step("split_pmd", 0)?;
    ensure!(
        split.addr == addr && split.pfn == head && split.order == 9,
        "split_pmd {split:?}, THP head {head:#x}"
    );
    for name in ["cow_page", "write_bytes", "restore_bytes", "zap_anon_page"] {
        let e = step(name, 0)?;
        ensure!(
            e.addr == addr && e.pfn == anon.pfn() && e.order == 0,
            "{name} {e:?}, anonymous pfn {:#x}",
            anon.pfn()
        );
    }
    let refault = step("zap_anon_page", 1)?;
    ensure!(
        refault.pfn == head + PAGE as u64 && refault.order == 9,
        "second zap_anon_page {refault:?}, want pfn {:#x}",
        head + PAGE as u64
    );
    let queued = step("queue_collapse", 0)?;
    ensure!(
        queued.handle == handle && queued.addr == t.addr,
        "queue_collapse {queued:?}"
    );
    let collapse = step("collapse", 0)?;
    ensure!(
        collapse.addr == t.addr
            && collapse.errno == 0
            && collapse.reason.starts_with("SCAN_SUCCEED"),
        "collapse {collapse:?}"
    );
    Ok(())
}

/// The one-liners of Documentation/tracing.md, as one bpftrace program:
/// steps counted per target pid (four of them: each probe bpftrace
/// attaches costs seconds in a TCG guest), and a histogram of PATCH
/// latency from the `patch` and `patched` events of one thread.
pub(crate) const BPFTRACE_PROGRAM: &str = "tracepoint:hugepoke:hugepoke_patch { @steps[args->pid, probe] = count(); @start[tid] = nsecs; }
tracepoint:hugepoke:hugepoke_patched /@start[tid]/ { @steps[args->pid, probe] = count(); @patch_us = hist((nsecs - @start[tid]) / 1000); delete(@start[tid]); }
tracepoint:hugepoke:hugepoke_cow_page, tracepoint:hugepoke:hugepoke_zap_anon_page { @steps[args->pid, probe] = count(); }
END { clear(@start); }";

/// bpftrace attached to hugepoke's trace events: five PATCH/RESTORE cycles
/// by the CLI on one page of a target (bpftrace's `-c`, run once every
/// probe is attached) show as five `cow_page`s (and as many of each step
/// counted) under the target's pid, and as five PATCH latencies in the
/// histogram.
pub(crate) fn bpftrace_counts_steps_per_pid_and_times_patch() -> TestResult {
    const PAGE: usize = 96;
    const CYCLES: u64 = 5;
    let t = Target::spawn(&[])?;
    thp_head(&t)?;
    // A trace instance only makes sure tracefs is mounted.
    drop(TraceInstance::new("hugepoke-bpftrace")?);
    let cycle = format!(
        "h=$(hugepoke patch --pid {} --addr {:#x} --bytes 'b8 60 25 00 00 c3' --persist) && hugepoke restore $h",
        t.pid,
        t.page_addr(PAGE)
    );
    let script = std::env::temp_dir().join(format!("hugepoke-bpftrace-{}.sh", t.pid));
    io(std::fs::write(
        &script,
        format!("set -e\nfor i in $(seq {CYCLES}); do {cycle}; done\n"),
    ))?;
    let out = std::process::Command::new("bpftrace")
        .args(["-e", BPFTRACE_PROGRAM, "-c"])
        .arg(format!("/bin/sh {}", script.display()))
        .output();
    let _ = std::fs::remove_file(&script);
    let out = io(out)?;
    let rest = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bpftrace: {}: {}{rest}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["patch", "cow_page", "patched", "zap_anon_page"] {
        let line = format!("@steps[{}, tracepoint:hugepoke:hugepoke_{step}]: ", t.pid);
        let n = rest
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse::<u64>().ok());
        ensure!(
            n.is_some_and(|n| n >= CYCLES),
            "bpftrace counted {n:?} {step} for {}, want {CYCLES} at least:\n{rest}",
            t.pid
        );
    }
    // Histogram lines: "[lo, hi)   count |@@@@|".
    let timed: u64 = rest
        .split("@patch_us:")
        .nth(1)
        .ok_or(format!("no @patch_us histogram:\n{rest}"))?
        .lines()
        .filter_map(|l| {
            l.split(')')
                .nth(1)?
                .split('|')
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum();
    ensure!(
        timed == CYCLES,
        "the PATCH histogram holds {timed} calls, want {CYCLES}:\n{rest}"
    );
    Ok(())
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        trace_events_carry_each_step_and_its_pfns,
        bpftrace_counts_steps_per_pid_and_times_patch,
    ];
}
