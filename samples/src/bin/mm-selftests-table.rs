//! The table of the kernel's mm selftests run in several modes
//! (`samples/mm-selftests`, run by `scripts/selftests` and `make check`).
//!
//!   mm-selftests-table DIR [MODE...]
//!
//! DIR holds one directory per mode (`none`, `control`, `held`,
//! `cycling`; the MODEs given, else those present in that order), each
//! with `N.cmd` (program and arguments), `N.out` (its TAP) and `N.exit`.
//! Every `ok`/`not ok` line is a case, named by its description (a
//! repeated description gets `#2`, `#3`, ...); a program's exit status
//! is one more case.  Prints, per program, each mode's count of results,
//! then every case whose result differs between modes, and last
//! `mm selftests: N programs, M cases, K differences`: K counts the cases
//! where a mode with the module (anything but `none` and `control`)
//! differs from `none`.  A difference also seen between `none` and
//! `control` (both without the module) is marked as the kernel's own.
//! Writes the whole table to DIR/table.tsv.  Exits 1 if a difference is
//! not the kernel's own, or a mode is missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// What one case did in one mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    Fail,
    Skip,
    Xfail,
    /// Not reported in this mode at all.
    Missing,
    /// A program's exit status other than 0, 1 (KSFT_FAIL) and 4
    /// (KSFT_SKIP): a timeout (124), a signal (128 + N), a missing binary.
    Exit(i32),
}

impl Outcome {
    fn name(self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Fail => "FAIL".into(),
            Outcome::Skip => "skip".into(),
            Outcome::Xfail => "xfail".into(),
            Outcome::Missing => "missing".into(),
            Outcome::Exit(code) => format!("exit-{code}"),
        }
    }
}

/// The cases of one program's output, in order: (name, outcome).
fn parse_tap(out: &str, exit: &str) -> Vec<(String, Outcome)> {
    let mut cases = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in out.lines() {
        let (rest, failed) = if let Some(r) = line.strip_prefix("not ok ") {
            (r, true)
        } else if let Some(r) = line.strip_prefix("ok ") {
            (r, false)
        } else {
            continue;
        };
        // "N description", "N # SKIP description", "N description # SKIP reason"
        let Some((num, text)) = rest.split_once(' ').or(Some((rest, ""))) else {
            continue;
        };
        if num.parse::<u32>().is_err() {
            continue;
        }
        let mut outcome = if failed { Outcome::Fail } else { Outcome::Ok };
        let mut name = text.trim();
        for (tag, o) in [("# SKIP", Outcome::Skip), ("# XFAIL", Outcome::Xfail)] {
            if let Some(i) = name.find(tag) {
                outcome = o;
                let (before, after) = (name[..i].trim(), name[i + tag.len()..].trim());
                name = if before.is_empty() { after } else { before };
            }
        }
        // Numbers in a description can be measurements ("Extra pages 104
        // (0.2%)"): a case is named with each number as '#', and told from
        // its namesakes by its place among them.
        let name = without_numbers(name);
        let n = seen.entry(name.clone()).or_insert(0);
        *n += 1;
        let key = if *n == 1 {
            name
        } else {
            format!("{name} #{n}")
        };
        cases.push((key, outcome));
    }
    let code = exit.trim();
    let outcome = match code {
        "0" => Outcome::Ok,
        // kselftest's KSFT_SKIP: the whole program skipped.
        "4" => Outcome::Skip,
        "1" => Outcome::Fail,
        c => Outcome::Exit(c.parse().unwrap_or(-1)),
    };
    cases.push((format!("(exit status {code})"), outcome));
    cases
}

/// `text` with every run of digits made one '#'.
fn without_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for c in text.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !in_number {
            out.push('#');
        }
        in_number = c.is_ascii_digit();
    }
    out
}

/// One mode's runs: each program's command line and its cases.
type ModeRuns = Vec<(String, Vec<(String, Outcome)>)>;

/// One program's cases: name → outcome per mode (in the modes' order).
struct Program {
    cmd: String,
    cases: Vec<(String, Vec<Outcome>)>,
}

fn read_mode(dir: &Path) -> Result<ModeRuns, String> {
    let mut runs = Vec::new();
    for i in 1.. {
        let cmd = match std::fs::read_to_string(dir.join(format!("{i}.cmd"))) {
            // The same program twice in a mode: the second is its own row.
            Ok(c) if runs.iter().any(|(r, _)| r == c.trim()) => format!("{} #{i}", c.trim()),
            Ok(c) => c.trim().to_string(),
            Err(_) if i > 1 => break,
            Err(e) => return Err(format!("{}: no programs ({e})", dir.display())),
        };
        let out = std::fs::read_to_string(dir.join(format!("{i}.out"))).unwrap_or_default();
        let exit = std::fs::read_to_string(dir.join(format!("{i}.exit")))
            .unwrap_or_else(|_| "never finished".into());
        // The exit status is one case; its name must not change with it.
        let mut cases = parse_tap(&out, &exit);
        if let Some(last) = cases.last_mut() {
            last.0 = "(exit status)".into();
        }
        runs.push((cmd, cases));
    }
    Ok(runs)
}

/// Merge the modes' runs into programs, keyed by command line.
fn merge(modes: &[ModeRuns]) -> Vec<Program> {
    let mut programs: Vec<Program> = Vec::new();
    for (m, runs) in modes.iter().enumerate() {
        for (cmd, cases) in runs {
            let idx = match programs.iter().position(|p| &p.cmd == cmd) {
                Some(i) => i,
                None => {
                    programs.push(Program {
                        cmd: cmd.clone(),
                        cases: Vec::new(),
                    });
                    programs.len() - 1
                }
            };
            let p = &mut programs[idx];
            for (name, o) in cases {
                let row = match p.cases.iter().position(|(n, _)| n == name) {
                    Some(r) => r,
                    None => {
                        p.cases
                            .push((name.clone(), vec![Outcome::Missing; modes.len()]));
                        p.cases.len() - 1
                    }
                };
                p.cases[row].1[m] = *o;
            }
        }
    }
    programs
}

/// The report, and whether every difference is the kernel's own.
fn report(modes: &[String], programs: &[Program]) -> (String, String, bool) {
    let none = modes.iter().position(|m| m == "none");
    let control = modes.iter().position(|m| m == "control");
    let with_module: Vec<usize> = (0..modes.len())
        .filter(|&i| Some(i) != none && Some(i) != control)
        .collect();
    let mut text = String::new();
    let mut tsv = format!("program\tcase\t{}\n", modes.join("\t"));
    let _ = write!(text, "{:<52}", "program");
    for m in modes {
        let _ = write!(text, " {m:>24}");
    }
    text.push('\n');
    let mut diffs = String::new();
    let (mut cases, mut differences, mut kernels_own) = (0, 0, 0);
    for p in programs {
        let _ = write!(text, "{:<52}", p.cmd);
        for m in 0..modes.len() {
            let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
            for (_, o) in &p.cases {
                *counts.entry(o[m]).or_default() += 1;
            }
            let cell: Vec<String> = counts
                .iter()
                .map(|(o, n)| format!("{n} {}", o.name()))
                .collect();
            let _ = write!(text, " {:>24}", cell.join(" "));
        }
        text.push('\n');
        for (name, o) in &p.cases {
            cases += 1;
            let row: Vec<String> = o.iter().map(|x| x.name()).collect();
            let _ = writeln!(tsv, "{}\t{name}\t{}", p.cmd, row.join("\t"));
            let base = none.map(|i| o[i]);
            let differs = base.is_some_and(|b| with_module.iter().any(|&i| o[i] != b));
            let flaky = matches!((none, control), (Some(a), Some(c)) if o[a] != o[c]);
            // The kernel's own only if every result with the module is one
            // the kernel gave without it.
            let excused = flaky
                && with_module
                    .iter()
                    .all(|&i| [none, control].iter().flatten().any(|&j| o[i] == o[j]));
            if differs || flaky {
                if differs {
                    differences += 1;
                }
                if differs && excused {
                    kernels_own += 1;
                }
                let what = if !differs {
                    "differs without the module only"
                } else if excused {
                    "the kernel's own: differs without the module too"
                } else {
                    "differs with the module only"
                };
                let cells: Vec<String> = modes
                    .iter()
                    .zip(&row)
                    .map(|(m, r)| format!("{m} {r}"))
                    .collect();
                let _ = writeln!(
                    diffs,
                    "  {} | {name} | {} | {what}",
                    p.cmd,
                    cells.join(", ")
                );
            }
        }
    }
    if !diffs.is_empty() {
        let _ = write!(text, "cases whose result differs between modes:\n{diffs}");
    }
    let _ = write!(
        text,
        "mm selftests: {} programs, {cases} cases, {differences} differences",
        programs.len()
    );
    if differences > 0 {
        let _ = write!(text, " ({kernels_own} of them the kernel's own)");
    }
    text.push('\n');
    (text, tsv, none.is_some() && differences == kernels_own)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: mm-selftests-table DIR [MODE...]");
        std::process::exit(2);
    };
    let dir = Path::new(dir);
    let modes: Vec<String> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        ["none", "control", "held", "cycling"]
            .iter()
            .filter(|m| dir.join(m).is_dir())
            .map(|m| m.to_string())
            .collect()
    };
    let mut runs = Vec::new();
    for m in &modes {
        match read_mode(&dir.join(m)) {
            Ok(r) => runs.push(r),
            Err(e) => {
                eprintln!("mm-selftests-table: {e}");
                std::process::exit(1);
            }
        }
    }
    let programs = merge(&runs);
    let (text, tsv, clean) = report(&modes, &programs);
    print!("{text}");
    if let Err(e) = std::fs::write(dir.join("table.tsv"), tsv) {
        eprintln!(
            "mm-selftests-table: {}: {e}",
            dir.join("table.tsv").display()
        );
    }
    std::process::exit(if clean { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(out: &str, exit: &str) -> ModeRuns {
        let mut cases = parse_tap(out, exit);
        cases.last_mut().unwrap().0 = "(exit status)".into();
        vec![("prog".to_string(), cases)]
    }

    #[test]
    fn tap_lines_become_named_cases() {
        let out = "1..6\n# [RUN] x\nok 1 a\nnot ok 2 b\nok 3 # SKIP c\nok 4 # XFAIL d\nok 5 a\n# ok 9 nested\nok 6 took 104 ms (0.2%)\n";
        let cases = parse_tap(out, "1\n");
        let got: Vec<(&str, Outcome)> = cases.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        assert_eq!(
            got,
            [
                ("a", Outcome::Ok),
                ("b", Outcome::Fail),
                ("c", Outcome::Skip),
                ("d", Outcome::Xfail),
                ("a #2", Outcome::Ok),
                ("took # ms (#.#%)", Outcome::Ok),
                ("(exit status 1)", Outcome::Fail),
            ]
        );
    }

    #[test]
    fn a_difference_with_the_module_fails_unless_the_control_shows_it() {
        let modes: Vec<String> = ["none", "control", "held"].map(String::from).to_vec();
        let ok = run("ok 1 a\nok 2 b\n", "0");
        let held_fails_a = run("not ok 1 a\nok 2 b\n", "0");
        let (text, _, clean) = report(&modes, &merge(&[ok.clone(), ok.clone(), ok.clone()]));
        assert!(clean, "{text}");
        assert!(
            text.ends_with("mm selftests: 1 programs, 3 cases, 0 differences\n"),
            "{text}"
        );
        let (text, _, clean) = report(
            &modes,
            &merge(&[ok.clone(), ok.clone(), held_fails_a.clone()]),
        );
        assert!(!clean, "{text}");
        assert!(
            text.contains(
                "prog | a | none ok, control ok, held FAIL | differs with the module only"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("1 differences (0 of them the kernel's own)\n"),
            "{text}"
        );
        // The same failure without the module too: the kernel's own.
        let (text, _, clean) = report(
            &modes,
            &merge(&[ok.clone(), held_fails_a.clone(), held_fails_a.clone()]),
        );
        assert!(clean, "{text}");
        assert!(
            text.contains("the kernel's own: differs without the module too"),
            "{text}"
        );
        // Flaky without the module, but failing with it as it never did
        // without: not excused.
        let skip_a = run("ok 1 # SKIP a\nok 2 b\n", "0");
        let (text, _, clean) = report(&modes, &merge(&[ok.clone(), skip_a, held_fails_a.clone()]));
        assert!(
            !clean && text.contains("differs with the module only"),
            "{text}"
        );
        // A crash is its own outcome, not an ordinary failure.
        let (text, _, clean) = report(
            &modes,
            &merge(&[
                run("ok 1 a\n", "1"),
                run("ok 1 a\n", "1"),
                run("ok 1 a\n", "139"),
            ]),
        );
        assert!(!clean && text.contains("held exit-139"), "{text}");
        // A case that disappears with the module is a difference.
        let (text, _, clean) = report(&modes, &merge(&[ok.clone(), ok, run("ok 1 a\n", "0")]));
        assert!(!clean && text.contains("held missing"), "{text}");
    }
}
