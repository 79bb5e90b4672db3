//! The sites file of `hugepoke patch --sites FILE` (Documentation/cli.md):
//! one site a line, `WHERE BYTES [EXPECT]`, where WHERE is an address
//! (`0x…` or decimal) or a symbol (`NAME`, `NAME+OFFSET`, `NAME@VERSION`),
//! and BYTES and EXPECT are hex without spaces (`b82a000000c3`); `#` starts
//! a comment, blank lines are skipped.  A [`Site`] is one site to patch,
//! from such a line or from the command line; [`Site::resolve`] finds its
//! address in a process.

use crate::symbols::{self, Object};
use crate::uapi::{MAX_BATCH, MAX_BYTES};
use crate::{parse_hex_bytes, parse_number};
use std::io::{Read, Write};
use std::path::Path;

/// Where a site is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Addr(u64),
    Symbol(String),
}

/// One site as its line gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteLine {
    /// 1-based line number in the file.
    pub line: usize,
    pub place: Place,
    pub bytes: Vec<u8>,
    pub expect: Option<Vec<u8>>,
}

/// Parse a sites file; an error names the line and what is wrong with it.
pub fn parse(text: &str) -> Result<Vec<SiteLine>, String> {
    let mut sites = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = content.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        let bad = |what: String| {
            format!("line {line}: {what} (want: ADDR|SYMBOL BYTES [EXPECT], hex without spaces)")
        };
        if !(2..=3).contains(&words.len()) {
            return Err(bad(format!("{} fields, not 2 or 3", words.len())));
        }
        let place = if words[0].starts_with(|c: char| c.is_ascii_digit()) {
            Place::Addr(
                parse_number(words[0])
                    .ok_or_else(|| bad(format!("{:?} is not an address", words[0])))?,
            )
        } else {
            Place::Symbol(words[0].to_string())
        };
        let hex = |w: &str, what: &str| {
            let b =
                parse_hex_bytes(w).ok_or_else(|| bad(format!("{what} {w:?} is not hex bytes")))?;
            if b.len() > MAX_BYTES {
                return Err(bad(format!(
                    "{what} has {} bytes, more than {MAX_BYTES}",
                    b.len()
                )));
            }
            Ok(b)
        };
        let bytes = hex(words[1], "BYTES")?;
        let expect = words.get(2).map(|w| hex(w, "EXPECT")).transpose()?;
        if let Some(e) = &expect {
            if e.len() != bytes.len() {
                return Err(bad(format!(
                    "EXPECT has {} bytes and BYTES {}: they must be as long",
                    e.len(),
                    bytes.len()
                )));
            }
        }
        sites.push(SiteLine {
            line,
            place,
            bytes,
            expect,
        });
    }
    if sites.is_empty() {
        return Err("no sites (every line is blank or a comment)".into());
    }
    if sites.len() > MAX_BATCH {
        return Err(format!(
            "{} sites, more than {MAX_BATCH} (one PATCH_BATCH)",
            sites.len()
        ));
    }
    Ok(sites)
}

/// A site to patch, before it is resolved and checked: a sites file's
/// line, or the command line's one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// `FILE line N`, for messages; None for the command line's site.
    pub label: Option<String>,
    /// The sites file's line.
    pub line: Option<usize>,
    pub place: Place,
    pub bytes: Vec<u8>,
    pub expect: Option<Vec<u8>>,
}

impl Site {
    /// `prefix: ` for messages about this site.
    pub fn prefix(&self) -> String {
        self.label
            .as_ref()
            .map(|l| format!("{l}: "))
            .unwrap_or_default()
    }

    /// Where this site is in the process that maps `objects`: its address,
    /// or its symbol's (defined by `object`, if given), saying on `out`
    /// where the symbol was found (and a sites file's address, as read).
    /// An error (a missing or ambiguous symbol) starts with the prefix.
    pub fn resolve(
        &self,
        objects: &[Object],
        object: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, String> {
        let pre = self.prefix();
        match &self.place {
            Place::Symbol(sym) => {
                let r = symbols::resolve(objects, sym, object).map_err(|e| format!("{pre}{e}"))?;
                let o = &objects[r.object];
                let _ = writeln!(
                    out,
                    "{pre}{sym}: {}+{:#x} in {} at {:#x} (symbol value {:#x}, size {:#x}, load bias {:#x})",
                    r.symbol.full_name(),
                    r.offset,
                    o.path,
                    r.addr,
                    r.symbol.value,
                    r.symbol.size,
                    o.bias
                );
                Ok(r.addr)
            }
            Place::Addr(a) => {
                if self.label.is_some() {
                    let _ = writeln!(out, "{pre}{a:#x}");
                }
                Ok(*a)
            }
        }
    }
}

/// Read and [`parse`] the sites file `path` (`-`: standard input), each
/// site labelled `FILE line N` (`<stdin> line N`); an error starts with
/// the file's name (`-` when standard input could not be read).
pub fn read(path: &Path) -> Result<Vec<Site>, String> {
    let (name, text) = if path == Path::new("-") {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .map_err(|e| format!("-: cannot read stdin: {e}"))?;
        ("<stdin>".to_string(), t)
    } else {
        let t = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        (path.display().to_string(), t)
    };
    let lines = parse(&text).map_err(|e| format!("{name}: {e}"))?;
    Ok(lines
        .into_iter()
        .map(|s| Site {
            label: Some(format!("{name} line {}", s.line)),
            line: Some(s.line),
            place: s.place,
            bytes: s.bytes,
            expect: s.expect,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines() {
        let text = "# two sites\n\n0x7f0000201000 b82a000000c3 b8e9030000c3  # page 1\n  main+0x10\tc3\n4096 90\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            SiteLine {
                line: 3,
                place: Place::Addr(0x7f00_0020_1000),
                bytes: vec![0xb8, 0x2a, 0, 0, 0, 0xc3],
                expect: Some(vec![0xb8, 0xe9, 3, 0, 0, 0xc3])
            }
        );
        assert_eq!(
            (s[1].line, &s[1].place, &s[1].bytes, &s[1].expect),
            (4, &Place::Symbol("main+0x10".into()), &vec![0xc3], &None)
        );
        assert_eq!(s[2].place, Place::Addr(4096));
        let v = parse("realpath@@GLIBC_2.3 cc").unwrap();
        assert_eq!(v[0].place, Place::Symbol("realpath@@GLIBC_2.3".into()));
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line, what) in [
            ("0x1000 c3\n0x2000\n", 2, "1 fields"),
            ("0x1000 c3 c3 c3\n", 1, "4 fields"),
            ("\n# x\n0xzz c3\n", 3, "not an address"),
            ("0x1000 c\n", 1, "BYTES \"c\" is not hex"),
            ("0x1000 c3 c\n", 1, "EXPECT \"c\" is not hex"),
            ("0x1000 c3c3 c3\n", 1, "EXPECT has 1 bytes and BYTES 2"),
            (
                "0x1000 000102030405060708090a0b0c0d0e0f10\n",
                1,
                "17 bytes, more than 16",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                e.starts_with(&format!("line {line}: ")) && e.contains(what),
                "{text:?}: {e}"
            );
        }
        assert!(parse("# nothing\n\n").unwrap_err().contains("no sites"));
        let many: String = (0..=MAX_BATCH)
            .map(|i| format!("{} c3\n", 0x1000 + i))
            .collect();
        assert!(parse(&many)
            .unwrap_err()
            .contains(&format!("more than {MAX_BATCH}")));
    }
}
