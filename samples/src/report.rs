//! What the CLI prints, as records: hugepoke's debugfs text (`patches`,
//! `events`, `stats`) parsed into structs that serialize to the JSON of
//! `--json` (field names are stable: Documentation/cli.md), and the
//! follower behind `events --follow`; and what `patch --json` prints
//! ([`PatchOut`]).  Pure functions of the text, so the
//! host tests can feed them any text.

use crate::decode::Check;
use crate::parse_number;
use crate::proc::{self, EventLine};
use serde::Serialize;
use std::io::{self, Write};

/// Write `value` as one line of JSON (a `--json` call's output, or one
/// line of a JSON Lines stream).
pub fn write_json<T: Serialize>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(io::Error::other)?;
    writeln!(out)
}

/// Bytes as lowercase hex without spaces, as debugfs and `--json` write them.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One line (one site) of debugfs `patches`:
/// `handle pid addr len state pfn owner pmd_mappable bytes orig [site]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchLine {
    pub handle: u64,
    pub pid: i32,
    pub addr: u64,
    pub len: u32,
    /// `live` or `gone`.
    pub state: String,
    pub pfn: u64,
    /// `file:N` or `persistent`.
    pub owner: String,
    pub pmd_mappable: bool,
    pub bytes: String,
    pub orig: String,
    /// Site `site` of the handle's `sites` (0 of 1 for a single PATCH).
    pub site: u32,
    pub sites: u32,
    /// `NAME+0xOFF` of `addr` in the process now (filled in by `list`).
    pub symbol: Option<String>,
    /// The line as debugfs wrote it (plain output prints it).
    #[serde(skip)]
    pub raw: String,
}

/// Parse one non-comment line of `patches`; None if it is not one.
pub fn parse_patch_line(line: &str) -> Option<PatchLine> {
    let w: Vec<&str> = line.split_whitespace().collect();
    if !(10..=11).contains(&w.len()) {
        return None;
    }
    // Before ABI v2's `site` column every patch was one site.
    let (site, sites) = match w.get(10) {
        Some(s) => {
            let (i, n) = s.split_once('/')?;
            (i.parse().ok()?, n.parse().ok()?)
        }
        None => (0, 1),
    };
    Some(PatchLine {
        handle: w[0].parse().ok()?,
        pid: w[1].parse().ok()?,
        addr: parse_number(w[2])?,
        len: w[3].parse().ok()?,
        state: w[4].to_string(),
        pfn: parse_number(w[5])?,
        owner: w[6].to_string(),
        pmd_mappable: match w[7] {
            "yes" => true,
            "no" => false,
            _ => return None,
        },
        bytes: w[8].to_string(),
        orig: w[9].to_string(),
        site,
        sites,
        symbol: None,
        raw: line.to_string(),
    })
}

/// One line of debugfs `files`: a PATCH_FILE handle over its processes'
/// handles (and, added by `list`, their pids).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FilePatch {
    pub handle: u64,
    /// `file:N` or `persistent`.
    pub owner: String,
    pub handles: Vec<u64>,
    pub pids: Vec<i32>,
}

/// debugfs `files`, parsed (comments skipped).
pub fn parse_files(text: &str) -> Vec<FilePatch> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(FilePatch {
                handle: w.next()?.parse().ok()?,
                owner: w.next()?.to_string(),
                handles: w.map(|h| h.parse().ok()).collect::<Option<_>>()?,
                pids: Vec::new(),
            })
        })
        .collect()
}

/// One line of debugfs `forked`: a handle and the processes forked from
/// its target since the patch that run it now.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Forked {
    pub handle: u64,
    pub pids: Vec<i32>,
}

/// debugfs `forked`, parsed (comments skipped).
pub fn parse_forked(text: &str) -> Vec<Forked> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(Forked {
                handle: w.next()?.parse().ok()?,
                pids: w.map(|p| p.parse().ok()).collect::<Option<_>>()?,
            })
        })
        .collect()
}

/// debugfs `patches`, parsed: what `list --json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Patches {
    pub patches: Vec<PatchLine>,
    /// The file patches (PATCH_FILE): each over handles of `patches`.
    pub files: Vec<FilePatch>,
    /// The handles whose patch processes forked from the target run too.
    pub forked: Vec<Forked>,
    /// Targets busy in a long PATCH or RESTORE when debugfs was read:
    /// their patches are not in `patches`.
    pub busy_targets: u32,
    /// Header (`# handle …`) line as debugfs wrote it.
    #[serde(skip)]
    pub header: String,
    /// Lines that are none of the above, kept for the plain output.
    #[serde(skip)]
    pub other: Vec<String>,
}

pub fn parse_patches(text: &str) -> Patches {
    let mut p = Patches::default();
    for line in text.lines() {
        if line.starts_with("# handle") {
            p.header = line.to_string();
        } else if line.starts_with("# a target is busy") {
            p.busy_targets += 1;
            p.other.push(line.to_string());
        } else if let Some(l) = parse_patch_line(line) {
            p.patches.push(l);
        } else if !line.trim().is_empty() {
            p.other.push(line.to_string());
        }
    }
    p
}

/// debugfs `events`, parsed: what `events --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Events {
    /// Events the journal has dropped since the module was loaded (it keeps the newest 4096).
    pub dropped: u64,
    pub events: Vec<EventLine>,
}

/// The `# dropped N` header of `events`.
pub fn parse_dropped(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("# dropped ")?.trim().parse().ok())
        .unwrap_or(0)
}

pub fn parse_events(text: &str) -> Events {
    Events {
        dropped: parse_dropped(text),
        events: proc::parse_events(text),
    }
}

/// One row of `stats`' first table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepCount {
    pub step: String,
    pub ok: u64,
    pub failed: u64,
}

/// One row of `stats`' reason table: how often `step` failed or decided
/// for `reason`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasonCount {
    pub step: String,
    pub count: u64,
    pub reason: String,
}

/// debugfs `stats`, parsed: what `stats --json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub steps: Vec<StepCount>,
    pub events_dropped: u64,
    pub reasons: Vec<ReasonCount>,
    /// Reasons beyond the 64 distinct (step, reason) pairs counted.
    pub other_reasons: u64,
}

pub fn parse_stats(text: &str) -> Stats {
    let mut s = Stats::default();
    let mut in_reasons = false;
    for line in text.lines() {
        if line.starts_with("# step count reason") {
            in_reasons = true;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let mut w = line.splitn(3, ' ');
        let (Some(name), Some(n)) = (w.next(), w.next().and_then(|n| n.parse::<u64>().ok())) else {
            continue;
        };
        let rest = w.next().unwrap_or("");
        match name {
            "events_dropped" => s.events_dropped = n,
            "other_reasons" => s.other_reasons = n,
            _ if in_reasons => s.reasons.push(ReasonCount {
                step: name.into(),
                count: n,
                reason: rest.into(),
            }),
            _ => {
                let Ok(failed) = rest.trim().parse() else {
                    continue;
                };
                s.steps.push(StepCount {
                    step: name.into(),
                    ok: n,
                    failed,
                })
            }
        }
    }
    s
}

/// What `events --follow` prints next.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    /// A new journal entry, with its line as debugfs wrote it.
    Event(EventLine, String),
    /// `count` entries were dropped from the journal before they were
    /// read (it keeps only the newest 4096).
    Lost { count: u64 },
    /// The journal started again (the module was reloaded): what follows
    /// is the new journal from its start.
    Restarted,
}

impl Followed {
    /// The plain line.
    pub fn line(&self) -> String {
        match self {
            Followed::Event(_, raw) => raw.clone(),
            Followed::Lost { count } => {
                format!("# lost {count} events (dropped from the journal before they were read)")
            }
            Followed::Restarted => "# the journal restarted (module reloaded)".into(),
        }
    }

    /// The JSON Lines object.
    pub fn write_json(&self, out: &mut dyn Write) -> io::Result<()> {
        match self {
            Followed::Event(e, _) => write_json(out, e),
            Followed::Lost { count } => write_json(out, &serde_json::json!({ "lost": count })),
            Followed::Restarted => write_json(out, &serde_json::json!({ "restarted": true })),
        }
    }
}

/// Follows the journal from one read of `events` to the next by `seq`.
#[derive(Debug, Default)]
pub struct Follower {
    /// `(seq, time_ns)` of the newest entry shown.
    last: Option<(u64, u64)>,
}

impl Follower {
    /// What is new in `text` since the last call (everything, the first time).
    pub fn next(&mut self, text: &str) -> Vec<Followed> {
        let events: Vec<(EventLine, &str)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| Some((proc::parse_event_line(l)?, l)))
            .collect();
        let mut out = Vec::new();
        let mut from = 0;
        if let Some((seq, time)) = self.last {
            let newest = events.last().map_or(0, |(e, _)| e.seq);
            // The entry last shown, if still kept, must be the same one: a
            // reloaded module counts from 1 again.
            let same = events
                .iter()
                .find(|(e, _)| e.seq == seq)
                .is_none_or(|(e, _)| e.time_ns == time);
            if newest < seq || !same {
                out.push(Followed::Restarted);
                self.last = None;
            } else {
                from = events.partition_point(|(e, _)| e.seq <= seq);
                if let Some((first, _)) = events.get(from) {
                    if first.seq > seq + 1 {
                        out.push(Followed::Lost {
                            count: first.seq - seq - 1,
                        });
                    }
                }
            }
        }
        for (e, raw) in &events[from..] {
            self.last = Some((e.seq, e.time_ns));
            out.push(Followed::Event(e.clone(), raw.to_string()));
        }
        out
    }
}

/// One site of a `patch` call, as `--json` shows it.
#[derive(Serialize)]
pub struct SiteOut {
    /// The sites file's line (null without --sites).
    pub line: Option<usize>,
    pub addr: u64,
    /// `NAME+0xOFF` of `addr` in the process.
    pub symbol: Option<String>,
    pub len: usize,
    pub bytes: String,
    /// What the kernel is told must be there (PATCH_EXPECT): the given
    /// expected bytes, or those the check read; null for none.
    pub expect: Option<String>,
    pub check: Check,
}

/// What `patch --json` prints.
#[derive(Serialize)]
pub struct PatchOut {
    /// Null with --dry-run.
    pub handle: Option<u64>,
    pub pid: i32,
    pub persist: bool,
    pub dry_run: bool,
    pub sites: Vec<SiteOut>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCHES: &str = "\
# handle pid addr len state pfn owner pmd_mappable bytes orig site
1 113 0x7f659b755d70 6 live 0x3c3d persistent yes b82a000000c3 b801000000c3 0/1
2 114 0x7f0000201000 6 gone 0x1a2b file:3 no b8e9030000c3 b8e9030000c3 1/2
# a target is busy (PATCH, RESTORE or collapse running): its patches are not listed
";

    #[test]
    fn patches_lines() {
        let p = parse_patches(PATCHES);
        assert_eq!(p.patches.len(), 2);
        assert_eq!(p.busy_targets, 1);
        let a = &p.patches[0];
        assert_eq!(
            (a.handle, a.pid, a.addr, a.len, a.pfn),
            (1, 113, 0x7f659b755d70, 6, 0x3c3d)
        );
        assert_eq!(
            (a.state.as_str(), a.owner.as_str(), a.pmd_mappable),
            ("live", "persistent", true)
        );
        assert_eq!(
            (a.bytes.as_str(), a.orig.as_str(), a.site, a.sites),
            ("b82a000000c3", "b801000000c3", 0, 1)
        );
        let b = &p.patches[1];
        assert_eq!(
            (
                b.owner.as_str(),
                b.pmd_mappable,
                b.site,
                b.sites,
                b.state.as_str()
            ),
            ("file:3", false, 1, 2, "gone")
        );
        // ABI v1's lines had no site column.
        let old = parse_patch_line("3 7 0x1000 1 live 0x5 persistent no cc 55").unwrap();
        assert_eq!((old.site, old.sites), (0, 1));
        assert_eq!(
            parse_patch_line("3 7 0x1000 1 live 0x5 persistent maybe cc 55"),
            None
        );
    }

    #[test]
    fn patches_json_field_names() {
        let v = serde_json::to_value(parse_patches(PATCHES)).unwrap();
        let keys: Vec<&str> = v["patches"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = [
            "handle",
            "pid",
            "addr",
            "len",
            "state",
            "pfn",
            "owner",
            "pmd_mappable",
            "bytes",
            "orig",
            "site",
            "sites",
            "symbol",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["patches"][0]["addr"], 0x7f659b755d70u64);
        assert_eq!(v["patches"][1]["pmd_mappable"], false);
        assert!(v["patches"][0]["symbol"].is_null());
        assert_eq!(v["busy_targets"], 1);
    }

    const STATS: &str = "\
# step ok failed
open 3 0
ioctl 1 2
events_dropped 5
# step count reason
ioctl 2 unknown ioctl command
zap_anon_page 1 kept: page is pinned (refcount 3)
other_reasons 0
";

    #[test]
    fn stats_tables() {
        let s = parse_stats(STATS);
        assert_eq!(
            s.steps,
            vec![
                StepCount {
                    step: "open".into(),
                    ok: 3,
                    failed: 0
                },
                StepCount {
                    step: "ioctl".into(),
                    ok: 1,
                    failed: 2
                }
            ]
        );
        assert_eq!(s.events_dropped, 5);
        assert_eq!(
            s.reasons[1],
            ReasonCount {
                step: "zap_anon_page".into(),
                count: 1,
                reason: "kept: page is pinned (refcount 3)".into()
            }
        );
        assert_eq!(s.other_reasons, 0);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["reasons"][0]["reason"], "unknown ioctl command");
        assert_eq!(v["steps"][1]["failed"], 2);
    }

    fn journal(dropped: u64, seqs: impl IntoIterator<Item = (u64, u64)>) -> String {
        let mut t = format!(
            "# dropped {dropped}\n# seq time_ns pid handle addr step pfn order result note\n"
        );
        for (seq, time) in seqs {
            t.push_str(&format!("{seq} {time} 7 - - open - - ok\n"));
        }
        t
    }

    fn seqs(f: &[Followed]) -> Vec<String> {
        f.iter()
            .map(|x| match x {
                Followed::Event(e, _) => e.seq.to_string(),
                Followed::Lost { count } => format!("lost{count}"),
                Followed::Restarted => "restarted".into(),
            })
            .collect()
    }

    #[test]
    fn forked_lines_parsed_and_bad_ones_skipped() {
        let text = "# handle pids\n3 120 121\n7 99\n8 x\n";
        let f = parse_forked(text);
        assert_eq!(
            f,
            [
                Forked {
                    handle: 3,
                    pids: vec![120, 121]
                },
                Forked {
                    handle: 7,
                    pids: vec![99]
                }
            ]
        );
        let v = serde_json::to_value(&f[0]).unwrap();
        assert_eq!(v, serde_json::json!({"handle": 3, "pids": [120, 121]}));
    }

    #[test]
    fn events_json_shape() {
        let e = parse_events(&journal(4, [(5, 50)]));
        assert_eq!(e.dropped, 4);
        let v = serde_json::to_value(&e).unwrap();
        let ev = v["events"][0].as_object().unwrap();
        let mut keys: Vec<&str> = ev.keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["addr", "handle", "note", "order", "pfn", "pid", "result", "seq", "step", "time_ns"]
        );
        assert!(ev["handle"].is_null() && ev["addr"].is_null());
        assert_eq!(ev["seq"], 5);
    }

    #[test]
    fn follow_by_seq_with_gaps_and_restarts() {
        let mut f = Follower::default();
        assert_eq!(seqs(&f.next(&journal(0, [(1, 10), (2, 20)]))), ["1", "2"]);
        assert_eq!(
            seqs(&f.next(&journal(0, [(1, 10), (2, 20)]))),
            Vec::<String>::new()
        );
        assert_eq!(
            seqs(&f.next(&journal(0, [(1, 10), (2, 20), (3, 30)]))),
            ["3"]
        );
        // The journal dropped 4..=6 before we read them.
        assert_eq!(
            seqs(&f.next(&journal(6, [(7, 70), (8, 80)]))),
            ["lost3", "7", "8"]
        );
        // A reload: seq counts from 1 again, below or above where we were.
        assert_eq!(seqs(&f.next(&journal(0, [(1, 5)]))), ["restarted", "1"]);
        let long: Vec<(u64, u64)> = (1..=9).map(|s| (s, 100 + s)).collect();
        assert_eq!(
            seqs(&f.next(&journal(0, long))),
            ["restarted", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
        );
        // Unloaded (no entries) then loaded again.
        assert_eq!(seqs(&f.next("")), ["restarted"]);
        assert_eq!(seqs(&f.next(&journal(0, [(1, 1)]))), ["1"]);
        let mut out = Vec::new();
        Followed::Lost { count: 3 }.write_json(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"lost\":3}\n");
    }
}
