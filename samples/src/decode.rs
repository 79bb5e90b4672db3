//! The code around a patch, decoded (iced-x86), so that a patch is checked
//! as uprobes checks the instruction it replaces: it must start on an
//! instruction boundary of the old code, its new bytes must be whole
//! instructions, and when it ends inside an old instruction, its last new
//! instruction must not be able to fall through into the half that is left.
//! [`check_patch`] runs that check against a live process, as `hugepoke
//! patch` does before each patch.

use crate::symbols::{self, Object};
use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FlowControl, Formatter, Instruction,
    IntelFormatter,
};
use serde::Serialize;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// One decoded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insn {
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// Intel syntax; `(bad)` for an invalid encoding, `(cut: needs more
    /// bytes)` when the bytes end inside it.
    pub text: String,
    pub invalid: bool,
    /// The bytes ended before the instruction did.
    pub truncated: bool,
    /// Execution can continue at the next address (a `nop`, a `mov`, a
    /// conditional jump, a call that returns); not after `ret`, `jmp`,
    /// `int3` or `ud2`.
    pub falls_through: bool,
}

impl Insn {
    pub fn end(&self) -> u64 {
        self.addr + self.bytes.len() as u64
    }
}

fn falls_through(insn: &Instruction) -> bool {
    match insn.flow_control() {
        FlowControl::Return
        | FlowControl::UnconditionalBranch
        | FlowControl::IndirectBranch
        | FlowControl::Exception => false,
        // int3 traps; a debugger (or uprobes) decides where to go on.
        FlowControl::Interrupt => insn.code() != Code::Int3,
        _ => true,
    }
}

/// Decode all of `code` as 64-bit code at `ip`, linearly; the last
/// instruction may be cut short (`truncated`).
pub fn decode(code: &[u8], ip: u64) -> Vec<Insn> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut formatter = IntelFormatter::new();
    let o = formatter.options_mut();
    o.set_hex_prefix("0x");
    o.set_hex_suffix("");
    o.set_uppercase_hex(false);
    o.set_space_after_operand_separator(true);
    let mut out = Vec::new();
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        let pos = decoder.position();
        decoder.decode_out(&mut insn);
        let mut error = decoder.last_error();
        if error == DecoderError::NoMoreBytes {
            // Out of bytes: cut short, or bad anyway?  Decode it padded.
            let mut padded = code[pos..].to_vec();
            padded.extend_from_slice(&[0; 15]);
            let mut d = Decoder::with_ip(64, &padded, ip + pos as u64, DecoderOptions::NONE);
            let probe = d.decode();
            if d.last_error() == DecoderError::InvalidInstruction || probe.len() <= code.len() - pos
            {
                error = DecoderError::InvalidInstruction;
            }
        }
        let (invalid, truncated) = (
            error == DecoderError::InvalidInstruction,
            error == DecoderError::NoMoreBytes,
        );
        // A bad byte is skipped one at a time; a cut instruction ends the input.
        let len = if truncated {
            code.len() - pos
        } else if invalid {
            1
        } else {
            insn.len()
        };
        let mut text = String::new();
        if truncated {
            text.push_str("(cut: needs more bytes)");
        } else if invalid {
            text.push_str("(bad)");
        } else {
            formatter.format(&insn, &mut text);
        }
        out.push(Insn {
            addr: ip + pos as u64,
            bytes: code[pos..pos + len].to_vec(),
            text,
            invalid,
            truncated,
            falls_through: !invalid && !truncated && falls_through(&insn),
        });
        if truncated {
            break;
        }
        if invalid {
            decoder.set_position(pos + 1).expect("in range");
            decoder.set_ip(ip + pos as u64 + 1);
        }
    }
    out
}

/// How sure we are where the old code's instructions begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A symbol with a size covers the patch: decoding from its start
    /// finds the real boundaries (as far as the function is code).
    Symbol { name: String },
    /// No symbol covers the patch: decoding starts at `what` (the
    /// nearest symbol before, or the start of the mapping), a guess.
    Guess { what: String },
}

/// The verdict on one patch.
#[derive(Debug, Clone, Default)]
pub struct Review {
    /// The old instructions the patch overwrites or cuts, and the one after.
    pub old: Vec<Insn>,
    pub new: Vec<Insn>,
    /// Reasons to refuse the patch (unless forced).
    pub refusals: Vec<String>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

impl Review {
    pub fn ok(&self) -> bool {
        self.refusals.is_empty()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Review patching `new` at `addr`, given the old code `old_code` as the
/// process has it now, from `old_start` (where decoding starts: see
/// [`Start`]) to at least the end of the patch plus one instruction (15
/// bytes) where the mapping allows.
pub fn review(old_code: &[u8], old_start: u64, start: &Start, addr: u64, new: &[u8]) -> Review {
    let mut r = Review::default();
    let end = addr + new.len() as u64;
    let old_all = decode(old_code, old_start);
    let first = old_all.iter().position(|i| i.end() > addr);
    let last = old_all.iter().position(|i| i.addr >= end);
    r.old = match (first, last) {
        (Some(f), Some(l)) => old_all[f..=l].to_vec(),
        (Some(f), None) => old_all[f..].to_vec(),
        _ => Vec::new(),
    };
    let from = match start {
        Start::Symbol { name } => format!("the start of {name} at {old_start:#x}"),
        Start::Guess { what } => format!("{what} at {old_start:#x}"),
    };

    // The patch must start where an old instruction starts.
    let before: Vec<&Insn> = old_all.iter().take_while(|i| i.addr < addr).collect();
    if let Some(bad) = before.iter().find(|i| i.invalid || i.truncated) {
        r.refusals.push(format!(
            "the old code does not decode from {from} up to {addr:#x} (bad bytes at {:#x}: {}): its instruction boundaries are unknown",
            bad.addr,
            hex(&bad.bytes)
        ));
    } else {
        match old_all.iter().find(|i| i.end() > addr) {
            Some(i) if i.addr == addr => {
                if let Start::Guess { .. } = start {
                    r.notes.push(format!(
                        "no symbol covers {addr:#x}: decoded from {from}; {addr:#x} is a boundary on that reading, a guess"
                    ));
                }
            }
            Some(i) => r.refusals.push(format!(
                "{addr:#x} is not an instruction boundary: it is {} bytes into `{}` at {:#x} (decoded from {from})",
                addr - i.addr,
                i.text,
                i.addr
            )),
            None => r.refusals.push(format!("no old code decoded at {addr:#x}")),
        }
    }

    // The new bytes must be whole instructions.
    r.new = decode(new, addr);
    for i in &r.new {
        if i.truncated {
            r.refusals.push(format!(
                "the new bytes end inside an instruction: {} at +{} is not a whole instruction",
                hex(&i.bytes),
                i.addr - addr
            ));
        } else if i.invalid {
            r.refusals.push(format!(
                "the new bytes do not decode: {} at +{} is not an instruction",
                hex(&i.bytes),
                i.addr - addr
            ));
        }
    }

    // Old boundaries inside the patch that the new code does not keep: a
    // thread preempted there, a branch target, or (after an old `call`) a
    // return address resumes inside a new instruction.  uprobes avoids
    // this by writing one byte; a multi-byte patch can only say it.
    let new_starts: Vec<u64> = r.new.iter().map(|i| i.addr).collect();
    for (prev, i) in old_all.iter().zip(old_all.iter().skip(1)) {
        if i.addr > addr && i.addr < end && !new_starts.contains(&i.addr) {
            let why = if prev.text.starts_with("call") {
                format!(
                    "the return address of the old `{}`: a thread in that call returns into it",
                    prev.text
                )
            } else {
                "a thread stopped there, or a jump to it, resumes there".to_string()
            };
            r.warnings.push(format!(
                "the old instruction boundary {:#x} (`{}`) falls inside a new instruction: {why}",
                i.addr, i.text
            ));
        }
    }

    // Where the patch ends inside an old instruction, what runs after the
    // last new instruction is the rest of that old one.
    if let Some(cut) = old_all.iter().find(|i| i.addr < end && end < i.end()) {
        let offset = (end - cut.addr) as usize;
        let rest = &cut.bytes[offset..];
        match r.new.last() {
            Some(last) if last.falls_through && !last.invalid && !last.truncated => {
                let reading = decode(rest, end).first().map(|i| i.text.clone()).unwrap_or_default();
                r.warnings.push(format!(
                    "the last new instruction `{}` can fall through into {:#x}, the last {} bytes ({}) of the old `{}` at {:#x}, cut in half (they would run as `{}`)",
                    last.text,
                    end,
                    rest.len(),
                    hex(rest),
                    cut.text,
                    cut.addr,
                    reading
                ));
            }
            _ => r.notes.push(format!(
                "the patch ends {} bytes into the old `{}` at {:#x}; the last new instruction cannot fall through into the rest",
                offset, cut.text, cut.addr
            )),
        }
    }
    r
}

/// The instructions as `ADDR  NAME+OFF  BYTES  TEXT` lines.
pub fn listing(insns: &[Insn], mut name: impl FnMut(u64) -> Option<String>) -> String {
    let mut out = String::new();
    for i in insns {
        let label = name(i.addr).map(|n| format!(" <{n}>")).unwrap_or_default();
        out.push_str(&format!(
            "  {:#014x}{label}  {:<24} {}\n",
            i.addr,
            hex(&i.bytes),
            i.text
        ));
    }
    out
}

// The check of one patch against a live process: read its code, decode
// from the start of the covering symbol, review (above), and compare with
// the file the code was mapped from.

/// One decoded instruction, as `hugepoke patch --json` shows it.
#[derive(Serialize)]
pub struct InsnOut {
    pub addr: u64,
    pub bytes: String,
    pub text: String,
    /// `NAME+0xOFF` (`?` after the offset: only the nearest symbol before).
    pub symbol: Option<String>,
}

/// What the instruction check found at one site.
#[derive(Serialize, Default)]
pub struct Check {
    /// The old code was read and decoded (false: the kernel alone decides; `notes` or `warnings` say why).
    pub checked: bool,
    /// `NAME+0xOFF in PATH`.
    pub at: Option<String>,
    pub old: Vec<InsnOut>,
    pub new: Vec<InsnOut>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    /// Why the patch is refused (empty: it passed).
    pub refusals: Vec<String>,
    /// --force overrode `refusals`.
    pub forced: bool,
    /// The old and new instructions, as the plain output lists them.
    #[serde(skip)]
    pub listing: String,
    /// The bytes the check read at the address.
    #[serde(skip)]
    pub here: Option<Vec<u8>>,
}

impl Check {
    fn note(mut self, n: String) -> Self {
        self.notes.push(n);
        self
    }

    /// The plain text: where, the instructions, the notes, the verdict.
    pub fn write(&self, addr: u64, out: &mut dyn Write) {
        if let Some(at) = &self.at {
            let _ = writeln!(out, "{addr:#x} is {at}");
        }
        let _ = write!(out, "{}", self.listing);
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        for r in &self.refusals {
            let _ = writeln!(
                out,
                "{}: {r}",
                if self.forced { "forced" } else { "refused" }
            );
        }
    }
}

/// `len` bytes of `pid`'s memory at `addr` (/proc/PID/mem).
fn read_mem(pid: i32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, addr)?;
    Ok(buf)
}

/// The live patches of `pid` (from debugfs) that overlap `[addr, addr+len)`.
fn overlapping_patches(pid: i32, addr: u64, len: u64) -> Vec<String> {
    let Ok(text) = crate::proc::debugfs("patches") else {
        return vec![];
    };
    crate::report::parse_patches(&text)
        .patches
        .iter()
        .filter(|p| p.pid == pid && p.addr < addr + len && addr < p.addr + p.len as u64)
        .map(|p| format!("handle {} at {:#x}", p.handle, p.addr))
        .collect()
}

/// Check patching `new` at `addr` of `pid` against the code the process
/// has now.  Its `here` (the bytes it read at the address) is what PATCH
/// then passes as its expected bytes: the kernel writes only if they are
/// still there under the page-table lock (the code may change between
/// this look and the write: a dlclose/dlopen, a debugger, another patch
/// beside this one).
pub fn check_patch(pid: i32, force: bool, objects: &[Object], addr: u64, new: &[u8]) -> Check {
    let len = new.len() as u64;
    let c = Check {
        forced: force,
        ..Default::default()
    };
    // Not decoded: the kernel decides whether it may patch there, and
    // writes only over the bytes there now (read here, passed as expected).
    let unchecked = |c: Check, why: String| {
        let mut c = c.note(format!("{why}: not checked as instructions (the kernel decides; it writes only over the bytes read here)"));
        c.here = read_mem(pid, addr, new.len()).ok();
        c
    };
    let Some(oi) = symbols::object_at(objects, addr) else {
        return unchecked(
            c,
            format!("{addr:#x} is in no executable file mapping of pid {pid}"),
        );
    };
    let o = &objects[oi];
    let m = o.mapping(addr).unwrap();
    if !m.executable() {
        return unchecked(
            c,
            format!("{addr:#x} is in {} but not executable there", o.path),
        );
    }
    if addr + len > m.end {
        return unchecked(
            c,
            format!("the patch runs past the end of the mapping at {:#x}", m.end),
        );
    }
    let mut c = c;
    // Decode from the start of the covering symbol; without one, from the
    // nearest symbol before in this mapping, or the mapping's start.
    let vaddr = addr.wrapping_sub(o.bias);
    let sym = o.elf.as_ref().and_then(|e| e.symbol_at(vaddr));
    let (from, start) = match &sym {
        Some(s) if s.covers(vaddr) => (
            s.value.wrapping_add(o.bias),
            Start::Symbol {
                name: s.full_name(),
            },
        ),
        Some(s) if m.contains(s.value.wrapping_add(o.bias)) => (
            s.value.wrapping_add(o.bias),
            Start::Guess {
                what: format!(
                    "the nearest symbol before, {} (size {:#x})",
                    s.full_name(),
                    s.size
                ),
            },
        ),
        _ => {
            let why = if o.elf.is_none() {
                format!("{} is not an ELF object", o.basename())
            } else {
                "no symbol before it in this mapping".into()
            };
            (
                m.start,
                Start::Guess {
                    what: format!("the start of the mapping ({why})"),
                },
            )
        }
    };
    let to = (addr + len + 16).min(m.end);
    let old = match read_mem(pid, from, (to - from) as usize) {
        Ok(b) => b,
        Err(e) if force => {
            c.warnings.push(format!(
                "cannot read the old code from /proc/{pid}/mem: {e}; not checked (--force)"
            ));
            return c;
        }
        Err(e) => {
            c.refusals.push(format!("cannot read the old code from /proc/{pid}/mem to check the patch: {e} (--force patches unchecked)"));
            return c;
        }
    };
    c.checked = true;
    let review = review(&old, from, &start, addr, new);
    let name = |a: u64| o.describe(a);
    let insns = |v: &[Insn]| -> Vec<InsnOut> {
        v.iter()
            .map(|i| InsnOut {
                addr: i.addr,
                bytes: crate::report::hex(&i.bytes),
                text: i.text.clone(),
                symbol: o.describe(i.addr),
            })
            .collect()
    };
    c.at = Some(format!(
        "{} in {}",
        o.describe(addr).unwrap_or_default(),
        o.path
    ));
    c.listing = format!(
        "old:\n{}new:\n{}",
        listing(&review.old, name),
        listing(&review.new, name)
    );
    c.old = insns(&review.old);
    c.new = insns(&review.new);

    // The text may be patched already (by us or a debugger): compare with the file.
    let here = &old[(addr - from) as usize..][..len as usize];
    let file_bytes =
        std::fs::File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
            .or_else(|_| std::fs::File::open(&m.path))
            .and_then(|f| {
                let mut b = vec![0; len as usize];
                f.read_exact_at(&mut b, m.file_offset(addr)).map(|_| b)
            });
    match file_bytes {
        Ok(b) if b != here => {
            let by = overlapping_patches(pid, addr, len);
            let by = if by.is_empty() {
                "not by a live hugepoke patch: a debugger or another tool".to_string()
            } else {
                by.join(", ")
            };
            c.notes.push(format!(
                "the process's bytes there differ from its file's: already patched ({by})"
            ));
        }
        _ => {}
    }
    if let Some(s) = sym.filter(|s| s.covers(vaddr)) {
        if s.ifunc {
            c.warnings.push(format!(
                "{} is an IFUNC: this is its resolver, not the implementation callers run",
                s.full_name()
            ));
        }
        if s.size != 0 && vaddr + len > s.value + s.size {
            c.warnings.push(format!(
                "the patch runs past the end of {} (size {:#x})",
                s.full_name(),
                s.size
            ));
        }
    }
    c.notes.extend(review.notes);
    c.warnings.extend(review.warnings);
    c.refusals.extend(review.refusals);
    c.here = Some(here.to_vec());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_boundary_inside_a_new_instruction_warns_and_names_a_call() {
        // call +0; mov edi, eax — patched with one 7-byte instruction.
        let old = [0xe8, 0, 0, 0, 0, 0x89, 0xc7, 0xc3];
        let new = [0x48, 0xc7, 0xc0, 0x2a, 0, 0, 0]; // mov rax, 0x2a
        let r = review(
            &old,
            0x1000,
            &Start::Symbol { name: "f".into() },
            0x1000,
            &new,
        );
        assert!(r.ok(), "{:?}", r.refusals);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("0x1005") && w.contains("return address")),
            "{:?}",
            r.warnings
        );
        // The same boundaries kept: no such warning.
        let r = review(
            &old,
            0x1000,
            &Start::Symbol { name: "f".into() },
            0x1000,
            &[0xe8, 1, 0, 0, 0, 0x90, 0x90],
        );
        assert!(
            !r.warnings.iter().any(|w| w.contains("boundary")),
            "{:?}",
            r.warnings
        );
    }

    /// A function as compilers emit it: endbr64; push rbp; mov rbp, rsp;
    /// mov eax, 7; pop rbp; ret; then int3 padding.
    const FUNC: [u8; 19] = [
        0xf3, 0x0f, 0x1e, 0xfa, // endbr64
        0x55, // push rbp
        0x48, 0x89, 0xe5, // mov rbp, rsp
        0xb8, 0x07, 0x00, 0x00, 0x00, // mov eax, 7
        0x5d, // pop rbp
        0xc3, // ret
        0xcc, 0xcc, 0xcc, 0xcc,
    ];
    const AT: u64 = 0x401000;

    fn sym() -> Start {
        Start::Symbol { name: "f".into() }
    }

    #[test]
    fn decodes_a_function() {
        let d = decode(&FUNC, AT);
        let text: Vec<&str> = d.iter().map(|i| i.text.as_str()).collect();
        assert_eq!(
            &text[..6],
            [
                "endbr64",
                "push rbp",
                "mov rbp, rsp",
                "mov eax, 7",
                "pop rbp",
                "ret"
            ]
        );
        assert_eq!(d[3].addr, AT + 8);
        assert!(d[3].falls_through && !d[5].falls_through && !d[6].falls_through);
    }

    /// Start-of-function breakpoints and returns pass, with nothing to say;
    /// a 6-byte `mov eax, 42; ret` passes too, but covers the boundary
    /// after `endbr64`, which it says.
    #[test]
    fn breakpoint_and_returns_at_a_function_start_pass() {
        for new in [
            &[0xcc][..],
            &[0xc3],
            &[0x31, 0xc0, 0xc3],
            &[0xb8, 0x2a, 0, 0, 0, 0xc3],
        ] {
            let r = review(&FUNC, AT, &sym(), AT, new);
            assert!(r.ok(), "{new:02x?}: {:?}", r.refusals);
            if new.len() == 6 {
                assert!(
                    r.warnings.len() == 1 && r.warnings[0].contains("push rbp"),
                    "{new:02x?}: {:?}",
                    r.warnings
                );
            } else {
                assert!(r.warnings.is_empty(), "{new:02x?}: {:?}", r.warnings);
            }
        }
        // The cut endbr64 is reported, but cannot be reached.
        let r = review(&FUNC, AT, &sym(), AT, &[0xcc]);
        assert!(
            r.notes.iter().any(|n| n.contains("cannot fall through")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn a_patch_inside_an_old_instruction_is_refused() {
        let r = review(&FUNC, AT, &sym(), AT + 9, &[0x2a]);
        assert!(!r.ok());
        assert!(
            r.refusals[0].contains("not an instruction boundary")
                && r.refusals[0].contains("mov eax, 7"),
            "{:?}",
            r.refusals
        );
        // On a boundary further in: fine.
        assert!(review(&FUNC, AT, &sym(), AT + 8, &[0xb8, 0x2a, 0, 0, 0]).ok());
    }

    #[test]
    fn new_bytes_that_end_inside_an_instruction_are_refused() {
        // mov eax, imm32 with only two bytes of its immediate.
        let r = review(&FUNC, AT, &sym(), AT, &[0xb8, 0x2a, 0x00]);
        assert!(!r.ok());
        assert!(
            r.refusals
                .iter()
                .any(|s| s.contains("end inside an instruction")),
            "{:?}",
            r.refusals
        );
        // An invalid opcode in 64-bit mode (push es).
        let r = review(&FUNC, AT, &sym(), AT, &[0x06]);
        assert!(
            r.refusals.iter().any(|s| s.contains("do not decode")),
            "{:?}",
            r.refusals
        );
    }

    /// A nop over the first byte of `push rbp; mov rbp, rsp`'s mov falls
    /// through into the half left behind: a warning, not a refusal.
    #[test]
    fn a_nop_that_falls_into_half_an_instruction_warns() {
        let r = review(&FUNC, AT, &sym(), AT + 4, &[0x90, 0x90]);
        assert!(r.ok(), "{:?}", r.refusals);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("`nop`") && r.warnings[0].contains("mov rbp, rsp"),
            "{}",
            r.warnings[0]
        );
        // The same with a ret last: cannot fall through.
        let r = review(&FUNC, AT, &sym(), AT + 4, &[0x90, 0xc3]);
        assert!(r.ok() && r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn undecodable_old_code_before_the_patch_is_refused() {
        let mut code = FUNC;
        code[4] = 0x06; // bad in 64-bit mode
        let r = review(
            &code,
            AT,
            &Start::Guess {
                what: "the start of the mapping".into(),
            },
            AT + 8,
            &[0xc3],
        );
        assert!(
            r.refusals
                .iter()
                .any(|s| s.contains("boundaries are unknown")),
            "{:?}",
            r.refusals
        );
    }

    #[test]
    fn a_guessed_start_says_so() {
        let r = review(
            &FUNC,
            AT,
            &Start::Guess {
                what: "the start of the mapping".into(),
            },
            AT + 8,
            &[0xc3],
        );
        assert!(r.ok());
        assert!(
            r.notes.iter().any(|n| n.contains("a guess")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn listing_lines() {
        let l = listing(&decode(&FUNC[..5], AT), |a| {
            Some(format!("f+{:#x}", a - AT))
        });
        assert_eq!(l, "  0x000000401000 <f+0x0>  f3 0f 1e fa              endbr64\n  0x000000401004 <f+0x4>  55                       push rbp\n");
    }
}
