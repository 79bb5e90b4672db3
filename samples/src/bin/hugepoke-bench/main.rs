//! hugepoke against the other ways of changing a running process's text,
//! in one guest run, on the same page of the same file: hugepoke
//! PATCH/RESTORE, a uprobe attach/detach (perf_event_open/close on the
//! "uprobe" PMU), a /proc/PID/mem write; where RESTORE and detach spend
//! their time; and PATCH/RESTORE with 1 to 4,096 live sites per target and
//! on two targets at once.  Every sample is checked (see `run.rs`).
//!
//!   hugepoke-bench run CYCLES OUT.json [--command STR] [--commit STR] [--host-load STR] [--accel tcg|kvm] [--only PHASE]
//!       [--machine STR] [--host-load-file FILE]   (in a guest;
//!       --only runs just the phases whose name contains PHASE, or one of
//!       PHASE's `|`-separated parts, for trying one out)
//!   hugepoke-bench report BENCH.json    the README's Markdown table, on stdout
//!   hugepoke-bench svg BENCH.json       the latency chart, on stdout
//!   hugepoke-bench profile SCRIPT.txt MADE-BY   where single calls spend
//!       their time, from `perf script -F ip,sym` (scripts/profile-calls)
//!
//! `scripts/bench` runs all three.

mod probe;
mod profile;
mod report;
mod run;
mod stats;
mod svg;
mod trace;

use report::Bench;

fn usage() -> ! {
    eprintln!("usage: hugepoke-bench run CYCLES OUT.json [--command STR] [--commit STR] [--host-load STR] [--accel tcg|kvm] [--only PHASE] [--machine STR] [--host-load-file FILE] | report BENCH.json | svg BENCH.json | profile SCRIPT.txt MADE-BY");
    std::process::exit(2)
}

fn load(path: &str) -> Bench {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("hugepoke-bench: reading {path}: {e}");
        std::process::exit(1)
    });
    let b: Bench = serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!("hugepoke-bench: {path}: {e}");
        std::process::exit(1)
    });
    if b.schema != report::SCHEMA {
        eprintln!(
            "hugepoke-bench: {path}: schema {} (this program reads {})",
            b.schema,
            report::SCHEMA
        );
        std::process::exit(1)
    }
    b
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => {
            let cycles: usize = args
                .get(1)
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| usage());
            let out = args.get(2).unwrap_or_else(|| usage());
            let mut o = run::Options {
                cycles,
                command: format!("hugepoke-bench run {cycles}"),
                commit: "unknown".into(),
                host_load: "unknown".into(),
                accel: "tcg".into(),
                only: None,
                machine: String::new(),
                host_load_file: None,
            };
            let mut rest = args[3..].iter();
            while let Some(a) = rest.next() {
                match (a.as_str(), rest.next()) {
                    ("--command", Some(v)) => o.command = v.clone(),
                    ("--commit", Some(v)) => o.commit = v.clone(),
                    ("--host-load", Some(v)) => o.host_load = v.clone(),
                    ("--accel", Some(v)) if v == "tcg" || v == "kvm" => o.accel = v.clone(),
                    ("--only", Some(v)) => o.only = Some(v.clone()),
                    ("--machine", Some(v)) => o.machine = v.clone(),
                    ("--host-load-file", Some(v)) => o.host_load_file = Some(v.clone()),
                    _ => usage(),
                }
            }
            let bench = run::run(&o);
            let text = serde_json::to_string_pretty(&bench).expect("serializing");
            if let Err(e) = std::fs::write(out, text + "\n") {
                eprintln!("hugepoke-bench: writing {out}: {e}");
                std::process::exit(1)
            }
            print!("{}", report::markdown(&bench));
        }
        Some("report") if args.len() == 2 => print!("{}", report::markdown(&load(&args[1]))),
        Some("svg") if args.len() == 2 => print!("{}", svg::chart(&load(&args[1]))),
        Some("profile") if args.len() == 3 => match std::fs::read_to_string(&args[1]) {
            Ok(text) => print!("{}", profile::markdown(&profile::parse(&text), &args[2])),
            Err(e) => {
                eprintln!("hugepoke-bench: reading {}: {e}", args[1]);
                std::process::exit(1)
            }
        },
        _ => usage(),
    }
}
