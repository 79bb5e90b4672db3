//! The CLI's instruction check and exit codes, on the host (no module
//! needed: `--dry-run` stops before /dev/hugepoke), against this test
//! process itself, whose `hugepoke_cli_probe` has known bytes.

use std::process::Command;

// push rbp; mov rbp, rsp; mov eax, 7; pop rbp; ret — 55 48 89 e5 b8 07 00 00 00 5d c3
std::arch::global_asm!(
    ".globl hugepoke_cli_probe",
    ".type hugepoke_cli_probe, @function",
    "hugepoke_cli_probe:",
    "push rbp",
    "mov rbp, rsp",
    "mov eax, 7",
    "pop rbp",
    "ret",
    ".size hugepoke_cli_probe, . - hugepoke_cli_probe",
);

extern "C" {
    fn hugepoke_cli_probe() -> u32;
}

/// `hugepoke ARGS` against this process: (status, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn dry(symbol: &str, bytes: &str) -> (i32, String, String) {
    let pid = std::process::id().to_string();
    cli(&[
        "patch",
        "--pid",
        &pid,
        "--symbol",
        symbol,
        "--bytes",
        bytes,
        "--dry-run",
    ])
}

fn probe() -> u64 {
    // SAFETY: the probe only sets eax and returns.
    assert_eq!(unsafe { hugepoke_cli_probe() }, 7);
    hugepoke_cli_probe as *const () as u64
}

#[test]
fn dry_run_shows_old_and_new_instructions() {
    let addr = probe();
    let (code, out, err) = dry("hugepoke_cli_probe", "31 c0 c3");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("at {addr:#x}")), "{out}");
    let (old, new) = out.split_once("new:\n").unwrap();
    assert!(old.contains("old:\n"), "{out}");
    for (insn, bytes) in [
        ("push rbp", "55"),
        ("mov rbp, rsp", "48 89 e5"),
        ("mov eax, 7", "b8 07 00 00 00"),
    ] {
        assert!(
            old.lines().any(|l| l.contains(insn) && l.contains(bytes)),
            "old lacks {insn}: {out}"
        );
    }
    assert!(
        new.contains("<hugepoke_cli_probe+0x0>  31 c0")
            && new.contains("xor eax, eax")
            && new.contains("ret"),
        "{out}"
    );
    assert!(out.ends_with("dry run: nothing patched\n"), "{out}");
}

#[test]
fn breakpoint_and_returns_at_the_start_pass() {
    probe();
    for bytes in ["cc", "c3", "31 c0 c3", "b8 2a 00 00 00 c3"] {
        let (code, out, err) = dry("hugepoke_cli_probe", bytes);
        assert_eq!(code, 0, "{bytes}: {out}{err}");
        assert!(!out.contains("refused"), "{bytes}: {out}");
        // More than one byte may cover an old boundary (after the probe's
        // one-byte `push rbp`), which is said, and nothing else is.
        let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning")).collect();
        let allowed = |w: &&str| bytes.len() > 2 && w.contains("old instruction boundary");
        assert!(warnings.iter().all(allowed), "{bytes}: {out}");
    }
}

#[test]
fn mid_instruction_start_is_refused_unless_forced() {
    probe();
    // +2 is inside `mov rbp, rsp` (48 89 e5 at +1).
    let (code, out, err) = dry("hugepoke_cli_probe+2", "c3");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("not an instruction boundary") && out.contains("mov rbp, rsp"),
        "{out}"
    );
    assert!(err.contains("refused"), "{err}");
    let pid = std::process::id().to_string();
    let (code, out, _) = cli(&[
        "patch",
        "--pid",
        &pid,
        "--symbol",
        "hugepoke_cli_probe+2",
        "--bytes",
        "c3",
        "--dry-run",
        "--force",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("forced: "), "{out}");
}

#[test]
fn new_bytes_ending_mid_instruction_are_refused() {
    probe();
    let (code, out, _) = dry("hugepoke_cli_probe", "b8 2a 00");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("end inside an instruction"), "{out}");
}

#[test]
fn nop_into_half_an_instruction_warns() {
    probe();
    // A nop over the first byte of `mov rbp, rsp`: the 89 e5 left behind run next.
    let (code, out, _) = dry("hugepoke_cli_probe+1", "90");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: the last new instruction `nop` can fall through")
            && out.contains("89 e5"),
        "{out}"
    );
}

#[test]
fn exit_codes_and_help() {
    let pid = std::process::id().to_string();
    // A missing symbol: the command line is wrong.
    let (code, _, err) = dry("no_such_function_here", "c3");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no code symbol no_such_function_here"),
        "{err}"
    );
    // A bad argument is named.
    let (code, _, err) = cli(&["patch", "--pid", &pid, "--addr", "0xzz", "--bytes", "c3"]);
    assert_eq!(code, 2);
    assert!(err.contains("--addr"), "{err}");
    let (code, _, err) = cli(&["patch", "--pid", &pid, "--symbol", "x", "--bytes", "c"]);
    assert_eq!(code, 2);
    assert!(err.contains("--bytes"), "{err}");
    let (code, _, err) = cli(&[
        "patch", "--pid", &pid, "--addr", "1", "--symbol", "x", "--bytes", "c3",
    ]);
    assert_eq!(code, 2, "--addr and --symbol together: {err}");
    // Usage errors exit 2 and name what is wrong.
    for (args, names) in [
        (
            &["patch", "--pid", "x", "--addr", "1", "--bytes", "c3"][..],
            "--pid",
        ),
        (
            &["patch", "--pid", "1", "--sites", "f", "--bytes", "c3"][..],
            "--sites",
        ),
        (&["patch", "--pid", "1", "--bytes", "c3"][..], "--addr"),
        (&["query", "nope"][..], "<HANDLE>"),
        (&["events", "--interval-ms", "5"][..], "--follow"),
        (
            &["events", "--follow", "--interval-ms", "0"][..],
            "--interval-ms",
        ),
        (&["nosuch"][..], "nosuch"),
        (&["list", "--bogus"][..], "--bogus"),
    ] {
        let (code, _, err) = cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    let (code, out, _) = cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Exit status: 0 done; 1 refused") && out.contains("--json"),
        "{out}"
    );
    for sub in [
        "patch", "restore", "query", "list", "events", "stats", "collapse",
    ] {
        let (code, out, _) = cli(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub} --help");
        assert!(
            out.contains("Usage: hugepoke") && out.contains("--json"),
            "{sub}: {out}"
        );
    }
}

/// A fake debugfs directory for the CLI (`HUGEPOKE_DEBUGFS`).
struct FakeDebugfs(std::path::PathBuf);

impl FakeDebugfs {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("hugepoke-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        FakeDebugfs(d)
    }

    /// Replace a file whole (rename: a reader sees the old or the new text).
    fn write(&self, file: &str, text: &str) {
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.0.join(file)).unwrap();
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
            .args(args)
            .env("HUGEPOKE_DEBUGFS", &self.0)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }
}

impl Drop for FakeDebugfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const EVENTS: &str = "# dropped 2\n# seq time_ns pid handle addr step pfn order result note\n\
    3 100 7 - - open - - ok\n\
    4 200 8 1 0x7f0000201000 split_pmd 0x6a00 9 ok PMD split to PTEs; THP stays whole\n\
    5 300 8 - 0x7f0000201000 check_vma - - -EINVAL mapping is not executable\n";

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn events_and_stats_as_json() {
    let d = FakeDebugfs::new("events");
    d.write("events", EVENTS);
    let (code, out, err) = d.cli(&["events", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "one value per call: {out}");
    let v = json(&out);
    assert_eq!(v["dropped"], 2);
    let e = &v["events"].as_array().unwrap()[1];
    assert_eq!(
        (
            e["seq"].as_u64(),
            e["time_ns"].as_u64(),
            e["pid"].as_i64(),
            e["handle"].as_u64()
        ),
        (Some(4), Some(200), Some(8), Some(1))
    );
    assert_eq!(
        (e["addr"].as_u64(), e["pfn"].as_u64(), e["order"].as_u64()),
        (Some(0x7f0000201000), Some(0x6a00), Some(9))
    );
    assert_eq!(
        (e["step"].as_str(), e["result"].as_str()),
        (Some("split_pmd"), Some("ok"))
    );
    assert_eq!(e["note"], "PMD split to PTEs; THP stays whole");
    assert!(
        v["events"][0]["handle"].is_null()
            && v["events"][0]["addr"].is_null()
            && v["events"][0]["note"] == ""
    );
    assert_eq!(v["events"][2]["result"], "-EINVAL");
    // Plain: the text as debugfs has it.
    let (code, out, _) = d.cli(&["events"]);
    assert_eq!((code, out.as_str()), (0, EVENTS));

    d.write("stats", "# step ok failed\nopen 3 0\ncheck_vma 0 1\nevents_dropped 2\n# step count reason\ncheck_vma 1 mapping is not executable\nother_reasons 0\n");
    let (code, out, err) = d.cli(&["stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(
        v["steps"][1],
        serde_json::json!({"step": "check_vma", "ok": 0, "failed": 1})
    );
    assert_eq!(
        v["reasons"][0],
        serde_json::json!({"step": "check_vma", "count": 1, "reason": "mapping is not executable"})
    );
    assert_eq!(
        (v["events_dropped"].as_u64(), v["other_reasons"].as_u64()),
        (Some(2), Some(0))
    );

    // No debugfs (no module): refused, exit 1, on stderr only.
    std::fs::remove_file(d.0.join("stats")).unwrap();
    let (code, out, err) = d.cli(&["stats", "--json"]);
    assert!(
        code == 1 && out.is_empty() && err.starts_with("hugepoke: stats: ENOENT"),
        "{code} {out} {err}"
    );
}

#[test]
fn list_adds_the_symbol_plain_and_json() {
    let addr = probe();
    let d = FakeDebugfs::new("list");
    let me = std::process::id();
    d.write(
        "patches",
        &format!(
            "# handle pid addr len state pfn owner pmd_mappable bytes orig site\n\
             4 {me} {:#x} 3 live 0x1234 file:2 yes 31c0c3 554889 0/2\n\
             4 {me} {:#x} 1 live 0x1234 file:2 yes cc 48 1/2\n\
             9 999999999 0x1000 1 gone 0x0 persistent no cc 90 0/1\n",
            addr,
            addr + 1
        ),
    );
    let (code, out, err) = d.cli(&["list"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "# handle pid addr len state pfn owner pmd_mappable bytes orig site symbol"
    );
    assert!(
        lines[1].ends_with(" 0/2 hugepoke_cli_probe+0x0")
            && lines[2].ends_with(" 1/2 hugepoke_cli_probe+0x1"),
        "{out}"
    );
    assert!(lines[3].ends_with(" 0/1 -"), "{out}");
    let (code, out, err) = d.cli(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let p = v["patches"].as_array().unwrap();
    assert_eq!(p.len(), 3);
    assert_eq!(p[1]["addr"].as_u64(), Some(addr + 1));
    assert_eq!(
        (
            p[1]["site"].as_u64(),
            p[1]["sites"].as_u64(),
            p[1]["pfn"].as_u64()
        ),
        (Some(1), Some(2), Some(0x1234))
    );
    assert_eq!(
        (
            p[0]["symbol"].as_str(),
            p[0]["owner"].as_str(),
            p[0]["pmd_mappable"].as_bool()
        ),
        (Some("hugepoke_cli_probe+0x0"), Some("file:2"), Some(true))
    );
    assert_eq!(
        (p[0]["bytes"].as_str(), p[0]["orig"].as_str()),
        (Some("31c0c3"), Some("554889"))
    );
    assert!(p[2]["symbol"].is_null() && p[2]["state"] == "gone");
    assert_eq!(v["busy_targets"], 0);
}

/// `events --follow`: lines as they come, by seq, a gap said, and a clean
/// end on SIGINT and when the reader goes away.
#[test]
fn events_follow_streams_new_entries() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let d = FakeDebugfs::new("follow");
    let head = "# dropped 0\n# seq time_ns pid handle addr step pfn order result note\n";
    let ev = |seq: u64| format!("{seq} {} 7 - - open - - ok\n", seq * 10);
    d.write("events", &format!("{head}{}{}", ev(1), ev(2)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
        .args(["events", "--follow", "--json", "--interval-ms", "5"])
        .env("HUGEPOKE_DEBUGFS", &d.0)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || json(&lines.next().unwrap().unwrap());
    assert_eq!(
        (next()["seq"].as_u64(), next()["seq"].as_u64()),
        (Some(1), Some(2))
    );
    d.write("events", &format!("{head}{}{}{}", ev(1), ev(2), ev(3)));
    assert_eq!(next()["seq"], 3);
    // 4 and 5 were dropped before the follower read them.
    d.write(
        "events",
        &format!(
            "{}{}{}",
            head.replace("dropped 0", "dropped 5"),
            ev(6),
            ev(7)
        ),
    );
    assert_eq!(next(), serde_json::json!({"lost": 2}));
    assert_eq!(
        (next()["seq"].as_u64(), next()["seq"].as_u64()),
        (Some(6), Some(7))
    );
    // A reloaded module's journal starts again at 1.
    d.write("events", &format!("{head}{}", "1 5 7 - - load - - ok\n"));
    assert_eq!(next(), serde_json::json!({"restarted": true}));
    assert_eq!(next()["step"], "load");
    // SIGINT: exit 0.
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");

    // Plain, and the reader going away ends it (SIGPIPE).
    let mut child = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
        .args(["events", "-f", "--interval-ms", "5"])
        .env("HUGEPOKE_DEBUGFS", &d.0)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut got = String::new();
    for _ in 0..3 {
        out.read_line(&mut got).unwrap();
    }
    assert_eq!(got, format!("{head}1 5 7 - - load - - ok\n"));
    drop(out);
    d.write("events", &format!("{head}1 5 7 - - load - - ok\n{}", ev(2)));
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.signal() == Some(libc::SIGPIPE) || status.code() == Some(0),
        "{status}"
    );
}

#[test]
fn dry_run_json_shows_the_check() {
    let addr = probe();
    let pid = std::process::id().to_string();
    let (code, out, err) = cli(&[
        "patch",
        "--pid",
        &pid,
        "--symbol",
        "hugepoke_cli_probe",
        "--bytes",
        "31 c0 c3",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let v = json(&out);
    assert_eq!(
        (
            v["handle"].is_null(),
            v["dry_run"].as_bool(),
            v["pid"].as_u64()
        ),
        (true, Some(true), Some(std::process::id() as u64))
    );
    let s = &v["sites"][0];
    assert_eq!(
        (s["addr"].as_u64(), s["len"].as_u64(), s["bytes"].as_str()),
        (Some(addr), Some(3), Some("31c0c3"))
    );
    assert!(s["line"].is_null());
    assert_eq!(s["symbol"], "hugepoke_cli_probe+0x0");
    // What the check read there, which PATCH would be told to expect.
    assert_eq!(s["expect"], "554889");
    let c = &s["check"];
    assert_eq!(
        (c["checked"].as_bool(), c["forced"].as_bool()),
        (Some(true), Some(false))
    );
    assert!(c["refusals"].as_array().unwrap().is_empty());
    assert_eq!(
        c["old"][0],
        serde_json::json!({"addr": addr, "bytes": "55", "text": "push rbp", "symbol": "hugepoke_cli_probe+0x0"})
    );
    assert_eq!(c["new"][0]["text"], "xor eax, eax");
    assert!(
        c["at"]
            .as_str()
            .unwrap()
            .starts_with("hugepoke_cli_probe+0x0 in "),
        "{c}"
    );
}

/// `patch --sites -`: each line through the single patch's checks, and a
/// failure named by its line.
fn sites(input: &str, extra: &[&str]) -> (i32, String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let pid = std::process::id().to_string();
    let mut args = vec!["patch", "--pid", &pid, "--sites", "-", "--dry-run"];
    args.extend_from_slice(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn sites_from_stdin_are_checked_line_by_line() {
    let addr = probe();
    let good = format!(
        "# the probe, twice\n\nhugepoke_cli_probe c3   # ret at once\n{:#x} 90 89\n",
        addr + 5
    );
    // +5 is inside `mov eax, 7` (b8 07 00 00 00 at +4): refused as a single patch would be.
    let (code, out, err) = sites(&good, &["--json"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("hugepoke: refused: <stdin> line 4: the instruction check failed"),
        "{err}"
    );
    // "see above": the check's reason is there, on stderr, with --json too.
    assert!(
        err.contains("refused: ") && err.contains("not an instruction boundary"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
    let good = format!(
        "# the probe, twice\n\nhugepoke_cli_probe c3   # ret at once\n{:#x} 90 b8\n",
        addr + 4
    );
    let (code, out, err) = sites(&good, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let s = v["sites"].as_array().unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (
            s[0]["line"].as_u64(),
            s[0]["addr"].as_u64(),
            s[0]["expect"].as_str()
        ),
        (Some(3), Some(addr), Some("55"))
    );
    assert_eq!(
        (
            s[1]["line"].as_u64(),
            s[1]["addr"].as_u64(),
            s[1]["expect"].as_str()
        ),
        (Some(4), Some(addr + 4), Some("b8"))
    );
    assert_eq!(s[1]["symbol"], "hugepoke_cli_probe+0x4");
    // Plain: the check of each site with a warning, under its line, then
    // a summary; --verbose: every site's check, prefixed by its line.
    let (code, out, _) = sites(&good, &[]);
    assert_eq!(code, 0);
    assert!(
        !out.contains("<stdin> line 3:")
            && out.contains("<stdin> line 4: hugepoke_cli_probe+0x4:")
            && out.contains("2 sites checked: 1 with a warning, 0 patched over a refusal"),
        "{out}"
    );
    assert!(out.ends_with("dry run: nothing patched\n"), "{out}");
    let (code, out, _) = sites(&good, &["--verbose"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("<stdin> line 3: hugepoke_cli_probe: hugepoke_cli_probe+0x0")
            && out.contains(&format!("<stdin> line 4: {:#x}", addr + 4))
            && !out.contains("sites checked"),
        "{out}"
    );
    // EXPECT that is not there: refused, naming the line.
    let (code, _, err) = sites(
        &format!("hugepoke_cli_probe c3 55\n{:#x} 90 cc\n", addr + 4),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("<stdin> line 2: EXPECT cc is not what is there now (b8)"),
        "{err}"
    );
    // Bad lines and missing symbols are usage errors, named by line.
    for (text, what) in [
        (
            "hugepoke_cli_probe c3\nhugepoke_cli_probe+1\n",
            "<stdin>: line 2: 1 fields",
        ),
        (
            "hugepoke_cli_probe zz\n",
            "<stdin>: line 1: BYTES \"zz\" is not hex",
        ),
        (
            "# x\nno_such_function_here c3\n",
            "<stdin> line 2: no code symbol no_such_function_here",
        ),
        ("# only comments\n", "no sites"),
    ] {
        let (code, _, err) = sites(text, &[]);
        assert_eq!(code, 2, "{text:?}: {err}");
        assert!(err.contains(what), "{text:?}: {err}");
    }
    // A file by name, and one that cannot be read.
    let path = std::env::temp_dir().join(format!("hugepoke-sites-{}", std::process::id()));
    std::fs::write(&path, "hugepoke_cli_probe c3\n").unwrap();
    let pid = std::process::id().to_string();
    let (code, out, err) = cli(&[
        "patch",
        "--pid",
        &pid,
        "--sites",
        path.to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["sites"][0]["line"], 1);
    let (code, _, err) = cli(&[
        "patch",
        "--pid",
        &pid,
        "--sites",
        path.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(code == 2 && err.contains("--sites"), "{err}");
}

#[test]
fn man_pages_and_completions_are_generated() {
    let dir = std::env::temp_dir().join(format!("hugepoke-man-{}", std::process::id()));
    let (code, _, err) = cli(&["generate", "man", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    // A page for every subcommand --help lists (and those are at least ours).
    let (_, help, _) = cli(&["--help"]);
    let subs: Vec<&str> = help
        .split("Commands:\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    for s in [
        "patch", "restore", "query", "list", "events", "stats", "collapse",
    ] {
        assert!(subs.contains(&s), "{s} not in --help: {help}");
    }
    let mut want: Vec<String> = subs.iter().map(|s| format!("hugepoke-{s}.1")).collect();
    want.push("hugepoke.1".into());
    want.sort();
    assert_eq!(pages, want);
    let patch = std::fs::read_to_string(dir.join("hugepoke-patch.1")).unwrap();
    for flag in [
        "pid",
        "addr",
        "symbol",
        "object",
        "bytes",
        "expect",
        "sites",
        "persist",
        "install\\-pmd",
        "force",
        "dry\\-run",
        "json",
    ] {
        assert!(
            patch.contains(&format!("\\-\\-{flag}")),
            "hugepoke-patch.1 lacks --{flag}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let (code, bash, _) = cli(&["generate", "completions", "bash"]);
    assert_eq!(code, 0);
    assert!(
        bash.contains("_hugepoke()") && bash.contains("--sites") && !bash.contains(" generate"),
        "{bash}"
    );
    let (code, _, err) = cli(&["generate", "completions", "tcsh"]);
    assert!(code == 2 && err.contains("tcsh"), "{err}");
}

/// `hugepoke events | head`: a reader that goes away ends it quietly
/// (SIGPIPE), not with Rust's "failed printing to stdout" panic.
#[test]
fn a_closed_pipe_ends_it_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let d = FakeDebugfs::new("pipe");
    d.write("events", EVENTS);
    let mut fds = [0; 2];
    // SAFETY: a fresh pipe; both ends are owned below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] and fds[1] are the new pipe's ends, owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
        .arg("events")
        .env("HUGEPOKE_DEBUGFS", &d.0)
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{}: {err}",
        out.status
    );
    assert!(err.is_empty(), "{err}");
}
