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
    let out = Command::new(env!("CARGO_BIN_EXE_hugepoke")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn dry(symbol: &str, bytes: &str) -> (i32, String, String) {
    let pid = std::process::id().to_string();
    cli(&["patch", "--pid", &pid, "--symbol", symbol, "--bytes", bytes, "--dry-run"])
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
    for (insn, bytes) in [("push rbp", "55"), ("mov rbp, rsp", "48 89 e5"), ("mov eax, 7", "b8 07 00 00 00")] {
        assert!(old.lines().any(|l| l.contains(insn) && l.contains(bytes)), "old lacks {insn}: {out}");
    }
    assert!(new.contains("<hugepoke_cli_probe+0x0>  31 c0") && new.contains("xor eax, eax") && new.contains("ret"), "{out}");
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
    assert!(out.contains("not an instruction boundary") && out.contains("mov rbp, rsp"), "{out}");
    assert!(err.contains("refused"), "{err}");
    let pid = std::process::id().to_string();
    let (code, out, _) = cli(&["patch", "--pid", &pid, "--symbol", "hugepoke_cli_probe+2", "--bytes", "c3", "--dry-run", "--force"]);
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
    assert!(out.contains("warning: the last new instruction `nop` can fall through") && out.contains("89 e5"), "{out}");
}

#[test]
fn exit_codes_and_help() {
    let pid = std::process::id().to_string();
    // A missing symbol: the command line is wrong.
    let (code, _, err) = dry("no_such_function_here", "c3");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no code symbol no_such_function_here"), "{err}");
    // A bad argument is named.
    let (code, _, err) = cli(&["patch", "--pid", &pid, "--addr", "0xzz", "--bytes", "c3"]);
    assert_eq!(code, 2);
    assert!(err.contains("--addr"), "{err}");
    let (code, _, err) = cli(&["patch", "--pid", &pid, "--symbol", "x", "--bytes", "c"]);
    assert_eq!(code, 2);
    assert!(err.contains("--bytes"), "{err}");
    let (code, _, err) = cli(&["patch", "--pid", &pid, "--addr", "1", "--symbol", "x", "--bytes", "c3"]);
    assert_eq!(code, 2, "--addr and --symbol together: {err}");
    for sub in ["patch", "restore", "query", "list", "events", "stats", "collapse"] {
        let (code, out, _) = cli(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub} --help");
        assert!(out.contains("Usage: hugepoke"), "{sub}: {out}");
    }
}
