//! What a run produces (`bench.json`) and the README table made from it.
//! The JSON keeps every sample, so the table and the chart can be redrawn
//! from it, and so can any other statistic.

use crate::stats::{human_ns, median, p90};
use serde::{Deserialize, Serialize};

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bench {
    pub schema: u32,
    /// The host command that made it, e.g. `scripts/bench 100`.
    pub command: String,
    /// `git describe --always --dirty` of the tree that was measured.
    pub commit: String,
    /// `uname -r` in the guest.
    pub kernel: String,
    pub cpus: usize,
    /// The host's /proc/loadavg when the run started: TCG vCPUs are host
    /// threads, and other guests share the host.
    pub host_load: String,
    /// How the guest ran: `tcg` (emulated: CPU-bound figures are many times
    /// hardware's) or `kvm` (hardware virtualization); runs before this
    /// field were all TCG.
    #[serde(default = "tcg")]
    pub accel: String,
    /// Cycles of each single-site method.
    pub cycles: usize,
    /// How long one iteration of the PMD-watching loop (one PAGEMAP_SCAN
    /// ioctl plus a clock read) took, median: the resolution of the
    /// user-visible "PMD back" rows.
    pub pmd_poll_ns: i64,
    /// Journal stamps compared with the CLOCK_MONOTONIC bracket of the
    /// ioctl that made them; every one fell inside (or the run failed).
    pub clock_checks: u64,
    /// Subtracted from each sample's CPU time: what the CPU-time bracket
    /// costs beyond the wall-clock bracket (median over empty calls).
    pub cpu_clock_overhead_ns: i64,
    pub rows: Vec<Row>,
    pub throughput: Vec<Throughput>,
    /// The distinct kernel stacks (from `__schedule` down) that the traced
    /// uprobe attaches and detaches slept in, with how often.
    pub uprobe_sleeps: Vec<Stack>,
    /// The 10,000-site methods' totals, for their cost per site.
    #[serde(default)]
    pub site_costs: Vec<SiteCost>,
    /// The host machine (CPU model, CPUs, memory, kernel), as scripts/bench
    /// read it.
    #[serde(default)]
    pub machine: String,
    /// Each phase of the run, in order, with the host's load around it.
    #[serde(default)]
    pub phases: Vec<Phase>,
    /// Ratios between two methods' medians, taken round by round.
    #[serde(default)]
    pub ratios: Vec<Ratio>,
    /// What khugepaged did during the run (asleep: only the methods' own
    /// work brings a PMD back).
    #[serde(default)]
    pub khugepaged: String,
}

/// One method's median over another's, in each round of a phase whose
/// rounds alternate which goes first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub label: String,
    pub per_round: Vec<f64>,
}

/// One phase of a run: its name, how long it took, and the host's
/// /proc/loadavg (first three fields) when it started and ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub wall_ns: i64,
    pub host_load_before: String,
    pub host_load_after: String,
}

/// One method's total over all cycles of the 10,000-site phases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteCost {
    pub label: String,
    /// `patch` (the change) or `restore` (its undoing).
    pub kind: String,
    /// PATCH_BATCH and the RESTORE of batches: what the others compare with.
    pub batch: bool,
    pub sites: usize,
    pub calls: usize,
    pub wall_ns: i64,
    pub on_cpu_ns: i64,
    /// The module's own time from the journal, where there is one.
    pub module_ns: Option<i64>,
    /// The median sample over the sites one sample covers (one call, or
    /// one cycle's batch calls): against outliers, which the totals keep.
    #[serde(default)]
    pub median_ns: Option<i64>,
}

impl SiteCost {
    pub fn new(label: &str, kind: &str, batch: bool) -> Self {
        SiteCost {
            label: label.into(),
            kind: kind.into(),
            batch,
            sites: 0,
            calls: 0,
            wall_ns: 0,
            on_cpu_ns: 0,
            module_ns: None,
            median_ns: None,
        }
    }

    pub fn add(
        &mut self,
        sites: usize,
        calls: usize,
        wall_ns: i64,
        on_cpu_ns: i64,
        module_ns: Option<i64>,
    ) {
        self.sites += sites;
        self.calls += calls;
        self.wall_ns += wall_ns;
        self.on_cpu_ns += on_cpu_ns;
        if let Some(m) = module_ns {
            self.module_ns = Some(self.module_ns.unwrap_or(0) + m);
        }
    }

    pub fn per_site(&self, ns: i64) -> i64 {
        ns / self.sites.max(1) as i64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    /// `attach` or `detach`.
    pub during: String,
    pub count: usize,
    pub grace_period: bool,
    pub frames: Vec<String>,
}

/// How a row's time is spent, from the measured share of it that the
/// calling thread spent on a CPU (`on_cpu_ns`), or by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bound {
    /// Mostly on the caller's CPU: scales with TCG's slowdown.
    Cpu,
    /// Mostly waiting (grace periods, ticks, work items, another CPU):
    /// wall-clock time that TCG does not slow down in proportion.
    Wall,
    /// Neither dominates.
    Mixed,
}

impl Bound {
    /// Classify from the medians: on-CPU share >= 80 % is CPU-bound,
    /// <= 20 % wall-clock-bound.
    pub fn from_share(wall_median: i64, on_cpu_median: i64) -> Self {
        let share = if wall_median > 0 {
            on_cpu_median as f64 / wall_median as f64
        } else {
            1.0
        };
        if share >= 0.8 {
            Bound::Cpu
        } else if share <= 0.2 {
            Bound::Wall
        } else {
            Bound::Mixed
        }
    }

    fn words(self) -> &'static str {
        match self {
            Bound::Cpu => "CPU",
            Bound::Wall => "wall clock",
            Bound::Mixed => "mixed",
        }
    }
}

/// An observation counted over the samples (not a pass/fail check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Count {
    pub what: String,
    pub yes: usize,
    pub of: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub label: String,
    /// Exactly what one sample's interval includes.
    pub includes: String,
    pub bound: Bound,
    /// Why `bound` is what it is when not measured (`on_cpu_ns` empty).
    pub bound_why: String,
    pub samples_ns: Vec<i64>,
    /// The calling thread's CPU time in each sample (CLOCK_THREAD_CPUTIME_ID);
    /// empty for intervals that are not one thread's call.
    pub on_cpu_ns: Vec<i64>,
    /// What was verified on every sample (a failure ends the run).
    pub checked: String,
    pub counts: Vec<Count>,
}

impl Row {
    pub fn new(id: &str, label: &str, includes: &str, checked: &str) -> Self {
        Row {
            id: id.into(),
            label: label.into(),
            includes: includes.into(),
            bound: Bound::Mixed,
            bound_why: String::new(),
            samples_ns: Vec::new(),
            on_cpu_ns: Vec::new(),
            checked: checked.into(),
            counts: Vec::new(),
        }
    }

    pub fn push(&mut self, wall_ns: i64, on_cpu_ns: i64) {
        self.samples_ns.push(wall_ns);
        self.on_cpu_ns.push(on_cpu_ns);
    }

    /// Set `bound` from the measured on-CPU share.
    pub fn classify(mut self) -> Self {
        if let (Some(w), Some(c)) = (median(&self.samples_ns), median(&self.on_cpu_ns)) {
            self.bound = Bound::from_share(w, c);
        }
        self
    }

    /// Set `bound` by construction, saying why.
    pub fn bound_by(mut self, bound: Bound, why: &str) -> Self {
        self.bound = bound;
        self.bound_why = why.into();
        self
    }

    pub fn count(&mut self, what: &str, yes: usize, of: usize) {
        self.counts.push(Count {
            what: what.into(),
            yes,
            of,
        });
    }
}

/// Calls per second of one or more threads, each on its own target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub label: String,
    pub threads: usize,
    /// Calls in one repetition.
    pub calls: usize,
    /// From the first call's start to the last call's end, over all
    /// threads: the median of `rep_wall_ns`.
    pub wall_ns: i64,
    /// Sites patched (and restored) by one repetition's calls.
    #[serde(default)]
    pub sites: usize,
    /// Each repetition's wall time, in run order; the one-thread and
    /// two-thread rows of a pair alternate which goes first.
    #[serde(default)]
    pub rep_wall_ns: Vec<i64>,
}

impl Throughput {
    /// A row from its repetitions' wall times (at least one).
    pub fn from_reps(
        label: String,
        threads: usize,
        calls: usize,
        sites: usize,
        rep_wall_ns: Vec<i64>,
    ) -> Self {
        let wall_ns = crate::stats::median(&rep_wall_ns).expect("no repetition");
        Throughput {
            label,
            threads,
            calls,
            wall_ns,
            sites,
            rep_wall_ns,
        }
    }

    /// Sites a second in each repetition.
    fn rep_rates(&self) -> Vec<f64> {
        let walls = if self.rep_wall_ns.is_empty() {
            vec![self.wall_ns]
        } else {
            self.rep_wall_ns.clone()
        };
        walls
            .iter()
            .map(|&w| self.sites as f64 * 1e9 / w.max(1) as f64)
            .collect()
    }
}

/// The run's phases in order: how long each took and the host's load
/// around it (TCG vCPUs are host threads that other work competes with).
fn phase_table(phases: &[Phase]) -> String {
    let total: i64 = phases.iter().map(|p| p.wall_ns).sum();
    let mut out = format!(
        "\nThe run's phases, {} in all (host /proc/loadavg, 1, 5 and 15 minutes, read on the host as each began and ended):\n\n| phase | took | host load before | host load after |\n| --- | --- | --- | --- |\n",
        human_s(total)
    );
    for p in phases {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            md_escape(&p.name),
            human_s(p.wall_ns),
            p.host_load_before,
            p.host_load_after
        ));
    }
    out
}

/// A phase's length: seconds, or minutes and seconds.
fn human_s(ns: i64) -> String {
    let s = ns as f64 / 1e9;
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {:.0} s", (s / 60.0) as i64, s % 60.0)
    }
}

/// "median (min–max)" of `v`, each shown by `show`.
fn spread(v: &[f64], show: impl Fn(f64) -> String) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => "–".into(),
        1 => show(v[0]),
        n => format!("{} ({}–{})", show(v[n / 2]), show(v[0]), show(v[n - 1])),
    }
}

/// Throughput rows, each two-thread row after its one-thread row and
/// compared with it repetition by repetition (they ran alternated).
fn throughput_table(rows: &[Throughput]) -> String {
    let mut out = String::from("\n| throughput | threads | repetitions | calls a repetition | wall a repetition, median | sites/s, median (min–max) | sites/s vs the row above, median (min–max) of the repetitions' ratios |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for (i, t) in rows.iter().enumerate() {
        let rates = t.rep_rates();
        let ratio = match i.checked_sub(1).map(|j| &rows[j]) {
            Some(one) if t.threads == 2 && one.threads == 1 && one.sites > 0 => {
                let ones = one.rep_rates();
                let r: Vec<f64> = rates.iter().zip(&ones).map(|(a, b)| a / b).collect();
                spread(&r, |x| format!("{x:.2}×"))
            }
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {ratio} |\n",
            md_escape(&t.label),
            t.threads,
            rates.len(),
            t.calls,
            human_ns(t.wall_ns),
            spread(&rates, |x| format!("{x:.0}")),
        ));
    }
    out
}

/// 10,000 sites by each method: the cost per site, and how many times
/// PATCH_BATCH's (or the RESTORE of batches') it is.
fn site_cost_table(costs: &[SiteCost], tcg: bool) -> String {
    let mut out = String::from(
        "\n| 10,000 sites (100 on each of 100 pages of one THP; rows marked libLLVM: 10,000 of its functions) | sites | calls | wall, all calls | per site (total / sites) | vs the 100-page batch | per site (median sample) | vs the 100-page batch | on caller's CPU per site | module time per site (journal) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let times = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) if b > 0 => format!("{:.1}×", a as f64 / b as f64),
        _ => "–".into(),
    };
    for c in costs {
        let base = costs
            .iter()
            .find(|b| b.batch && b.kind == c.kind)
            .filter(|_| !c.batch);
        let mean = c.per_site(c.wall_ns);
        let vs_mean = times(Some(mean), base.map(|b| b.per_site(b.wall_ns)));
        let vs_median = times(c.median_ns, base.and_then(|b| b.median_ns));
        let median = c.median_ns.map_or("–".into(), human_ns);
        let module = c.module_ns.map_or("–".into(), |m| human_ns(c.per_site(m)));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {vs_mean} | {median} | {vs_median} | {} | {module} |\n",
            md_escape(&c.label),
            c.sites,
            c.calls,
            human_ns(c.wall_ns),
            human_ns(mean),
            human_ns(c.per_site(c.on_cpu_ns)),
        ));
    }
    if let Some(b) = costs.iter().find(|b| b.batch && b.kind == "patch") {
        if let Some(m) = b.module_ns {
            let per_10k = m as f64 * 10_000.0 / b.sites.max(1) as f64;
            let caveat = if tcg {
                " Under TCG each guest instruction is emulated, so CPU-bound module time is many times what hardware takes; \
                 the guest cannot show whether hardware makes 10 ms, only the ratio between methods that are CPU-bound alike \
                 (see \"bound by\" above) and how the cost grows with the number of sites."
            } else {
                ""
            };
            out.push_str(&format!(
                "\nPATCH_BATCH: {} of module time per 10,000 sites in this guest (journal `patch` to `patched` of each call).{caveat}\n",
                human_ns(per_10k as i64)
            ));
        }
    }
    out
}

fn tcg() -> String {
    "tcg".into()
}

/// The accelerator as the header says it, and what it means for the figures.
fn accel_said(b: &Bench) -> (&'static str, &'static str) {
    if b.accel == "kvm" {
        ("KVM", "Under KVM the guest runs on the CPU: CPU-bound figures are close to hardware's, less the virtualization's cost of page-table and TLB work. ")
    } else {
        ("TCG", "Under TCG every guest instruction is emulated: CPU-bound figures are many times hardware's, wall-clock-bound ones (grace periods, timer ticks, work on other CPUs) are not, so only ratios between methods bound alike mean anything (see \"bound by\"). ")
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The README's Speed table, and under it what each row includes.
pub fn markdown(b: &Bench) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Made by `{}` at `{}` (kernel {}, {} vCPUs, {}{}; host load average {} at the start); {} cycles per \
         single-site method. {}{}What every sample is checked for is listed under the table; a failed check fails the run.\n\n",
        b.command,
        b.commit,
        b.kernel,
        b.cpus,
        accel_said(b).0,
        if b.machine.is_empty() { String::new() } else { format!(", on {}", b.machine) },
        b.host_load,
        b.cycles,
        accel_said(b).1,
        if b.khugepaged.is_empty() { String::new() } else { format!("khugepaged: {}. ", b.khugepaged) },
    ));
    out.push_str(
        "| | median | p90 | samples | on caller's CPU (median) | bound by | checks; counts |\n",
    );
    out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for (i, r) in b.rows.iter().enumerate() {
        let med = median(&r.samples_ns).map_or("–".into(), human_ns);
        let p = p90(&r.samples_ns).map_or("–".into(), human_ns);
        let cpu = match (median(&r.on_cpu_ns), median(&r.samples_ns)) {
            (Some(c), Some(w)) if w > 0 => {
                format!("{} ({:.0} %)", human_ns(c), 100.0 * c as f64 / w as f64)
            }
            _ => "–".into(),
        };
        let mut notes: Vec<String> = Vec::new();
        if !r.checked.is_empty() {
            notes.push(format!("all {} checked", r.samples_ns.len()));
        }
        notes.extend(
            r.counts
                .iter()
                .map(|c| format!("{}: {} of {}", c.what, c.yes, c.of)),
        );
        let checked = notes.join("; ");
        out.push_str(&format!(
            "| {}. {} | {med} | {p} | {} | {cpu} | {} | {} |\n",
            i + 1,
            md_escape(&r.label),
            r.samples_ns.len(),
            r.bound.words(),
            md_escape(&checked)
        ));
    }
    if !b.throughput.is_empty() {
        out.push_str(&throughput_table(&b.throughput));
    }
    if !b.site_costs.is_empty() {
        out.push_str(&site_cost_table(&b.site_costs, b.accel != "kvm"));
    }
    if !b.ratios.is_empty() {
        out.push_str("\n| ratio of medians | each round, in run order | median of the rounds |\n| --- | --- | --- |\n");
        for r in &b.ratios {
            let each: Vec<String> = r.per_round.iter().map(|x| format!("{x:.2}×")).collect();
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                md_escape(&r.label),
                each.join(", "),
                spread(&r.per_round, |x| format!("{x:.2}×"))
            ));
        }
    }
    if !b.phases.is_empty() {
        out.push_str(&phase_table(&b.phases));
    }
    out.push_str(&format!(
        "\nThe user-visible \"PMD back\" rows poll one PAGEMAP_SCAN entry in a loop; one iteration took {} \
         (median), which is their resolution.  {} journal stamps (ktime_get_mono_fast_ns) all fell inside the \
         CLOCK_MONOTONIC bracket of the ioctl that made them.  On-CPU time is the calling thread's \
         CLOCK_THREAD_CPUTIME_ID over the call, less that clock's own cost ({}).\n\nWhat each row includes:\n\n",
        human_ns(b.pmd_poll_ns),
        b.clock_checks,
        human_ns(b.cpu_clock_overhead_ns)
    ));
    for (i, r) in b.rows.iter().enumerate() {
        let why = if r.bound_why.is_empty() {
            String::new()
        } else {
            format!(" *Bound by {}:* {}", r.bound.words(), r.bound_why)
        };
        let checked = if r.checked.is_empty() {
            String::new()
        } else {
            format!(" *Checked on every sample:* {}.", r.checked)
        };
        out.push_str(&format!(
            "{}. {}: {}.{checked}{why}\n",
            i + 1,
            r.label.trim(),
            r.includes
        ));
    }
    if !b.uprobe_sleeps.is_empty() {
        out.push_str("\nWhere the traced uprobe attaches and detaches slept (kernel stack at each switch-out, from `__schedule` outwards; times seen over all traced cycles):\n\n");
        for st in &b.uprobe_sleeps {
            let frames: Vec<&str> = st.frames.iter().map(String::as_str).take(12).collect();
            let kind = if st.grace_period {
                "grace period"
            } else {
                "other"
            };
            out.push_str(&format!(
                "- {}: {}× ({kind}) `{}`\n",
                st.during,
                st.count,
                frames.join(" ← ")
            ));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_bench() -> Bench {
        let mut a = Row::new("hp.patch", "hugepoke PATCH", "the ioctl", "bytes read back");
        for i in 1..=100 {
            a.push(i * 1000, i * 900);
        }
        a.count("PMD back", 100, 100);
        let a = a.classify();
        let mut d = Row::new("up.detach", "uprobe detach | close", "close(2)", "");
        for i in 1..=10 {
            d.push(i * 1_000_000, i * 10_000);
        }
        let d = d.classify();
        let mut g = Row::new("drain", "LRU drain", "journal", "")
            .bound_by(Bound::Wall, "waits for a work item on every CPU");
        g.samples_ns = vec![-5, 10, 20];
        Bench {
            schema: SCHEMA,
            command: "scripts/bench 100".into(),
            commit: "abc1234".into(),
            kernel: "7.2.12".into(),
            cpus: 2,
            host_load: "1.50 1.20 1.00".into(),
            accel: "tcg".into(),
            cycles: 100,
            pmd_poll_ns: 31_000,
            clock_checks: 300,
            cpu_clock_overhead_ns: 1500,
            uprobe_sleeps: vec![Stack {
                during: "detach".into(),
                count: 4,
                grace_period: true,
                frames: vec!["__schedule".into(), "__synchronize_srcu".into()],
            }],
            rows: vec![a, d, g],
            throughput: vec![Throughput::from_reps(
                "PATCH, one target".into(),
                1,
                256,
                128,
                vec![512_000_000, 256_000_000, 1_024_000_000],
            )],
            site_costs: vec![],
            machine: String::new(),
            ratios: vec![],
            phases: vec![],
            khugepaged: String::new(),
        }
    }

    #[test]
    fn json_round_trip_keeps_every_sample() {
        let b = sample_bench();
        let text = serde_json::to_string_pretty(&b).unwrap();
        let back: Bench = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
        // The shape other tools read: field names and the bound's spelling.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["rows"][0]["samples_ns"].as_array().unwrap().len(), 100);
        assert_eq!(v["rows"][0]["bound"], "cpu");
        assert_eq!(v["rows"][1]["bound"], "wall");
        assert_eq!(v["rows"][2]["bound"], "wall");
        assert_eq!(v["throughput"][0]["calls"], 256);
    }

    #[test]
    fn per_site_costs_compare_with_the_batch_of_the_same_kind() {
        let mut b = sample_bench();
        let mut batch = SiteCost::new("PATCH_BATCH", "patch", true);
        batch.add(10_000, 3, 50_000_000, 49_000_000, Some(40_000_000));
        batch.median_ns = Some(4_000);
        let mut single = SiteCost::new("PATCH, one call a site", "patch", false);
        for _ in 0..10_000 {
            single.add(1, 1, 100_000, 90_000, Some(80_000));
        }
        single.median_ns = Some(40_000);
        let mut undo = SiteCost::new("uprobe detach", "restore", false);
        undo.add(10_000, 10_000, 1_000_000_000, 10_000_000, None);
        b.site_costs = vec![batch, single, undo];
        b.throughput.push(Throughput::from_reps(
            "two".into(),
            2,
            512,
            384,
            vec![512_000_000; 3],
        ));
        let md = markdown(&b);
        assert!(md.contains("| PATCH_BATCH | 10000 | 3 | 50.0 ms | 5.00 µs | – | 4.00 µs | – | 4.90 µs | 4.00 µs |"), "{md}");
        // 100 µs a site against 5 µs: 20 times; medians 40 µs against 4 µs: 10 times.
        assert!(md.contains("| PATCH, one call a site | 10000 | 10000 | 1.00 s | 100 µs | 20.0× | 40.0 µs | 10.0× | 90.0 µs | 80.0 µs |"), "{md}");
        // No batch RESTORE to compare with, no median, no journal: dashes.
        assert!(
            md.contains(
                "| uprobe detach | 10000 | 10000 | 1.00 s | 100 µs | – | – | – | 1.00 µs | – |"
            ),
            "{md}"
        );
        assert!(
            md.contains("40.0 ms of module time per 10,000 sites"),
            "{md}"
        );
        // 750 sites/s in each repetition, against 250, 500 and 125 sites/s
        // in the one-thread row's: ratios 3, 1.5 and 6.
        assert!(
            md.contains("| two | 2 | 3 | 512 | 512 ms | 750 (750–750) | 3.00× (1.50×–6.00×) |"),
            "{md}"
        );
    }

    #[test]
    fn bound_from_on_cpu_share() {
        assert_eq!(Bound::from_share(100, 95), Bound::Cpu);
        assert_eq!(Bound::from_share(100, 80), Bound::Cpu);
        assert_eq!(Bound::from_share(100, 50), Bound::Mixed);
        assert_eq!(Bound::from_share(100, 20), Bound::Wall);
        assert_eq!(Bound::from_share(0, 0), Bound::Cpu);
    }

    #[test]
    fn header_says_which_accelerator_ran_the_guest() {
        let mut b = sample_bench();
        assert!(markdown(&b).contains("2 vCPUs, TCG;") && markdown(&b).contains("Under TCG"));
        b.accel = "kvm".into();
        let md = markdown(&b);
        assert!(
            md.contains("2 vCPUs, KVM;") && md.contains("Under KVM") && !md.contains("Under TCG"),
            "{md}"
        );
        // A bench.json from before the field was TCG.
        let mut v = serde_json::to_value(sample_bench()).unwrap();
        v.as_object_mut().unwrap().remove("accel");
        assert_eq!(serde_json::from_value::<Bench>(v).unwrap().accel, "tcg");
    }

    #[test]
    fn header_and_phase_table_say_where_and_under_what_load_it_ran() {
        let mut b = sample_bench();
        b.machine = "Some CPU, 2 CPUs, 24 GiB".into();
        b.khugepaged = "asleep for the run".into();
        b.phases = vec![
            Phase {
                name: "one".into(),
                wall_ns: 1_500_000_000,
                host_load_before: "0.10 0.20 0.30".into(),
                host_load_after: "1.10 0.40 0.30".into(),
            },
            Phase {
                name: "two | three".into(),
                wall_ns: 125_000_000_000,
                host_load_before: "1.10 0.40 0.30".into(),
                host_load_after: "2.00 1.00 0.50".into(),
            },
        ];
        let md = markdown(&b);
        assert!(
            md.contains("2 vCPUs, TCG, on Some CPU, 2 CPUs, 24 GiB; host load"),
            "{md}"
        );
        assert!(md.contains("khugepaged: asleep for the run. "), "{md}");
        b.ratios = vec![Ratio {
            label: "a : b".into(),
            per_round: vec![2.0, 1.0, 3.0],
        }];
        let md = markdown(&b);
        assert!(
            md.contains("| a : b | 2.00×, 1.00×, 3.00× | 2.00× (1.00×–3.00×) |"),
            "{md}"
        );
        assert!(md.contains("The run's phases, 2 min 6 s in all"), "{md}");
        assert!(
            md.contains("| one | 1.5 s | 0.10 0.20 0.30 | 1.10 0.40 0.30 |"),
            "{md}"
        );
        assert!(
            md.contains("| two \\| three | 2 min 5 s | 1.10 0.40 0.30 | 2.00 1.00 0.50 |"),
            "{md}"
        );
        // A bench.json from before these fields reads with them empty.
        let mut v = serde_json::to_value(sample_bench()).unwrap();
        for k in ["machine", "phases", "khugepaged"] {
            v.as_object_mut().unwrap().remove(k);
        }
        assert!(serde_json::from_value::<Bench>(v)
            .unwrap()
            .phases
            .is_empty());
    }

    #[test]
    fn table_has_a_line_per_row_with_median_and_p90() {
        let md = markdown(&sample_bench());
        assert!(md.starts_with("Made by `scripts/bench 100` at `abc1234` (kernel 7.2.12, 2 vCPUs, TCG; host load average 1.50 1.20 1.00 at the start)"), "{md}");
        let lines: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| 1.") || l.starts_with("| 2.") || l.starts_with("| 3."))
            .collect();
        assert_eq!(lines.len(), 3, "{md}");
        assert_eq!(lines[0], "| 1. hugepoke PATCH | 50.0 µs | 90.0 µs | 100 | 45.0 µs (90 %) | CPU | all 100 checked; PMD back: 100 of 100 |");
        // A `|` in a label is escaped, not a new column.
        assert!(lines[1].starts_with("| 2. uprobe detach \\| close | 5.00 ms | 9.00 ms | 10 | 50.0 µs (1 %) | wall clock |"), "{}", lines[1]);
        assert!(
            lines[2].starts_with("| 3. LRU drain | 10 ns | 20 ns | 3 | – | wall clock |"),
            "{}",
            lines[2]
        );
        assert!(
            md.contains("| PATCH, one target | 1 | 3 | 256 | 512 ms | 250 (125–500) | – |"),
            "{md}"
        );
        assert!(
            md.contains(
                "3. LRU drain: journal. *Bound by wall clock:* waits for a work item on every CPU"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "1. hugepoke PATCH: the ioctl. *Checked on every sample:* bytes read back."
            ),
            "{md}"
        );
        assert!(md.contains("one iteration took 31.0 µs"), "{md}");
        assert!(md.contains("less that clock's own cost (1.50 µs)"), "{md}");
        assert!(
            md.contains("- detach: 4× (grace period) `__schedule ← __synchronize_srcu`"),
            "{md}"
        );
    }
}
