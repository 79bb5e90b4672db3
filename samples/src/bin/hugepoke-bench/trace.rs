//! Where a uprobe detach (close of its perf event) waits: the kernel's
//! sched_switch tracepoint for the closing thread, each switch-out with its
//! kernel stack (tracefs `options/stacktrace`), on the `mono` trace clock
//! (CLOCK_MONOTONIC).  Our kernel has no function tracer (kernel/base.config
//! lacks CONFIG_FUNCTION_TRACER, and a config change means a kernel
//! rebuild); sched_switch needs none, and a sleeping task's stack names
//! what it sleeps in.

use crate::probe::check;

const TRACEFS: &str = "/sys/kernel/tracing";

/// One interval the traced thread spent off its CPU, blocked.
#[derive(Debug, Clone, PartialEq)]
pub struct OffCpu {
    pub from_ns: i64,
    pub to_ns: i64,
    /// Kernel frames at the switch-out, innermost first.
    pub stack: Vec<String>,
}

impl OffCpu {
    /// Blocked in an RCU/SRCU grace-period wait: `synchronize_srcu` (which
    /// `synchronize_rcu_tasks_trace` is in 7.2) or `synchronize_rcu`.
    pub fn grace_period(&self) -> bool {
        self.stack
            .iter()
            .any(|f| f.contains("synchronize_srcu") || f.contains("synchronize_rcu"))
    }

    /// The stack from the scheduler down, without the tracepoint's frames.
    pub fn stack_from_schedule(&self) -> Vec<String> {
        let from = self
            .stack
            .iter()
            .position(|f| f.contains("schedule"))
            .unwrap_or(0);
        self.stack[from..].to_vec()
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

/// `1234.567890` (seconds, µs) from the text before `: sched_switch:`.
fn timestamp_ns(head: &str) -> Option<i64> {
    let t = head.split_whitespace().last()?.trim_end_matches(':');
    let (s, us) = t.split_once('.')?;
    let frac = format!("{us:0<9}");
    Some(s.parse::<i64>().ok()? * 1_000_000_000 + frac[..9].parse::<i64>().ok()?)
}

/// The blocked intervals of thread `tid` in a `trace` text: from each
/// switch-out that was not a preemption (`prev_state` other than `R`/`R+`)
/// to its next switch-in.
pub fn off_cpu(trace: &str, tid: i32) -> Vec<OffCpu> {
    let (prev, next) = (tid.to_string(), tid.to_string());
    let mut out: Vec<OffCpu> = Vec::new();
    let mut open: Option<OffCpu> = None;
    // Stack lines follow the event they belong to.
    let mut collecting = false;
    for line in trace.lines() {
        let t = line.trim_start();
        if let Some(frame) = t.strip_prefix("=> ") {
            if collecting {
                if let Some(o) = open.as_mut() {
                    o.stack.push(frame.trim().to_string());
                }
            }
            continue;
        }
        if t.contains("<stack trace>") {
            continue;
        }
        collecting = false;
        let Some((head, ev)) = line.split_once(": sched_switch: ") else {
            continue;
        };
        let Some(at) = timestamp_ns(head) else {
            continue;
        };
        if field(ev, "next_pid=") == Some(next.as_str()) {
            if let Some(mut o) = open.take() {
                o.to_ns = at;
                out.push(o);
            }
        }
        if field(ev, "prev_pid=") == Some(prev.as_str()) {
            let state = field(ev, "prev_state=").unwrap_or("R");
            if !state.starts_with('R') {
                open = Some(OffCpu {
                    from_ns: at,
                    to_ns: at,
                    stack: Vec::new(),
                });
                collecting = true;
            }
        }
    }
    out
}

fn write(file: &str, what: &str) {
    let r = std::fs::write(format!("{TRACEFS}/{file}"), what);
    check!(
        r.is_ok(),
        "writing {what:?} to {TRACEFS}/{file}: {:?}",
        r.err()
    );
}

/// sched_switch of one thread, with stacks, on the mono clock.
pub struct SchedTrace;

impl SchedTrace {
    pub fn start(tid: i32) -> Self {
        if !std::path::Path::new(&format!("{TRACEFS}/trace")).exists() {
            let r = std::process::Command::new("mount")
                .args(["-t", "tracefs", "tracefs", TRACEFS])
                .status();
            check!(
                r.is_ok_and(|s| s.success()),
                "mounting tracefs at {TRACEFS}"
            );
        }
        write("tracing_on", "0");
        write("trace_clock", "mono");
        write(
            "events/sched/sched_switch/filter",
            &format!("prev_pid == {tid} || next_pid == {tid}"),
        );
        write("options/stacktrace", "1");
        write("events/sched/sched_switch/enable", "1");
        write("trace", "");
        SchedTrace
    }

    /// Record only around `f`; the trace text of that stretch.
    pub fn around<T>(&self, f: impl FnOnce() -> T) -> (T, String) {
        write("trace", "");
        write("tracing_on", "1");
        let v = f();
        write("tracing_on", "0");
        let text = std::fs::read_to_string(format!("{TRACEFS}/trace"));
        check!(text.is_ok(), "reading {TRACEFS}/trace: {:?}", text.err());
        (v, text.unwrap())
    }
}

impl Drop for SchedTrace {
    fn drop(&mut self) {
        for (f, v) in [
            ("events/sched/sched_switch/enable", "0"),
            ("options/stacktrace", "0"),
            ("events/sched/sched_switch/filter", "0"),
            ("trace", ""),
        ] {
            let _ = std::fs::write(format!("{TRACEFS}/{f}"), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
# tracer: nop
#
 hugepoke-bench-77      [001] d..2.   100.000100: sched_switch: prev_comm=hugepoke-bench prev_pid=77 prev_prio=120 prev_state=D ==> next_comm=swapper/1 next_pid=0 next_prio=120
 hugepoke-bench-77      [001] d..2.   100.000101: <stack trace>
 => trace_event_raw_event_sched_switch
 => __schedule
 => schedule
 => schedule_timeout
 => __wait_for_common
 => __synchronize_srcu
 => uprobe_unregister_sync
 => __probe_event_disable
 => perf_trace_event_unreg
 => perf_uprobe_destroy
          <idle>-0       [001] d..2.   100.004100: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=hugepoke-bench next_pid=77 next_prio=120
          <idle>-0       [001] d..2.   100.004101: <stack trace>
 => __schedule
 => schedule_idle
 hugepoke-bench-77      [001] d..2.   100.004200: sched_switch: prev_comm=hugepoke-bench prev_pid=77 prev_prio=120 prev_state=R+ ==> next_comm=kworker next_pid=9 next_prio=120
 hugepoke-bench-77      [001] d..2.   100.004201: <stack trace>
 => __schedule
 => preempt_schedule
            kworker-9    [001] d..2.   100.004300: sched_switch: prev_comm=kworker prev_pid=9 prev_prio=120 prev_state=I ==> next_comm=hugepoke-bench next_pid=77 next_prio=120
 hugepoke-bench-77      [000] d..2.   100.004500: sched_switch: prev_comm=hugepoke-bench prev_pid=77 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
 hugepoke-bench-77      [000] d..2.   100.004501: <stack trace>
 => __schedule
 => schedule
 => __mutex_lock
 => perf_uprobe_destroy
          <idle>-0       [000] d..2.   100.005500: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=hugepoke-bench next_pid=77 next_prio=120
";

    #[test]
    fn blocked_intervals_with_their_stacks() {
        let o = off_cpu(TRACE, 77);
        // The preemption (R+) is not a blocked interval; the two sleeps are.
        assert_eq!(o.len(), 2, "{o:?}");
        assert_eq!(
            (o[0].from_ns, o[0].to_ns),
            (100_000_100_000, 100_004_100_000)
        );
        assert!(o[0].grace_period());
        assert_eq!(
            o[0].stack.len(),
            10,
            "the idle task's stack is not ours: {:?}",
            o[0].stack
        );
        assert_eq!(o[0].stack_from_schedule()[0], "__schedule");
        assert_eq!(
            (o[1].from_ns, o[1].to_ns),
            (100_004_500_000, 100_005_500_000)
        );
        assert!(!o[1].grace_period());
        assert_eq!(
            o[1].stack_from_schedule(),
            [
                "__schedule",
                "schedule",
                "__mutex_lock",
                "perf_uprobe_destroy"
            ]
        );
        assert_eq!(off_cpu(TRACE, 78), vec![]);
    }
}
