//! `hugepoke map`: a picture of the 2 MiB range around an address of a
//! process — one cell per 4 KiB page, saying how the page table maps it
//! now — as text (ANSI colour or plain), JSON and SVG.
//!
//! Each cell is read from the kernel's own accounting, nothing inferred:
//!
//! - PMD-mapped: PAGEMAP_SCAN reports the page `PAGE_IS_HUGE` (only its
//!   PMD-level walker does; plain pagemap entries look the same for a PMD
//!   and for 512 PTEs);
//! - anonymous copy: present, and `/proc/kpageflags` says `ANON` for its
//!   PFN (without kpageflags, i.e. not root: pagemap's file bit is clear);
//! - page-cache page mapped by a PTE: present, not anonymous;
//! - swapped out: pagemap's swap bit (a patched page can be paged out);
//! - not mapped: none of these (a split PMD leaves most pages to refault).
//!
//! Over that, the module's table (debugfs `patches`) marks the cells a live
//! patch of this pid covers, with its handle.  [`RangeMap::read`] builds the
//! model; [`render_text`] and [`render_svg`] draw it; the JSON is
//! `serde_json` of [`RangeMap`] (field names in Documentation/cli.md).

use crate::proc::{self, KpageFlags, Pagemap, PatchLine, PAGE_SIZE};
use serde::Serialize;
use std::fmt::Write;
use std::io;

/// Pages in the range: one PMD's worth.
pub const CELLS: usize = 512;
/// The range's size and alignment.
pub const RANGE: u64 = CELLS as u64 * PAGE_SIZE;
/// Cells per row of the picture: 16 rows of 128 KiB.
pub const COLUMNS: usize = 32;

/// How one page of the range is mapped.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Mapped by a PMD (the whole range is: a THP).
    Pmd,
    /// A page-cache page mapped by a PTE.
    PageCache,
    /// An anonymous page: a private copy (what PATCH writes into).
    Anon,
    /// Swapped out.
    Swapped,
    /// Not mapped now.
    None,
}

impl Kind {
    /// In legend order.
    pub const ALL: [Kind; 5] = [
        Kind::Pmd,
        Kind::PageCache,
        Kind::Anon,
        Kind::Swapped,
        Kind::None,
    ];

    /// The character of a cell in the text picture.
    pub fn glyph(self) -> char {
        match self {
            Kind::Pmd => 'H',
            Kind::PageCache => 'p',
            Kind::Anon => 'A',
            Kind::Swapped => 's',
            Kind::None => '.',
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Pmd => "PMD-mapped",
            Kind::PageCache => "page-cache page, PTE-mapped",
            Kind::Anon => "anonymous copy",
            Kind::Swapped => "swapped out",
            Kind::None => "not mapped",
        }
    }

    /// SGR parameters of the glyph on a terminal.
    fn ansi(self) -> &'static str {
        match self {
            Kind::Pmd => "32",
            Kind::PageCache => "36",
            Kind::Anon => "1;31",
            Kind::Swapped => "35",
            Kind::None => "2",
        }
    }

    /// Fill of the cell in the SVG.
    fn fill(self) -> &'static str {
        match self {
            Kind::Pmd => "#2e8b57",
            Kind::PageCache => "#6baed6",
            Kind::Anon => "#e34a33",
            Kind::Swapped => "#9e6ebd",
            Kind::None => "#eeeeee",
        }
    }
}

/// One page of the range.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Cell {
    /// Index in the range, 0..512.
    pub page: usize,
    pub addr: u64,
    pub kind: Kind,
    /// The PFN pagemap reports (present pages; `None` without root).
    pub pfn: Option<u64>,
    /// kpageflags says the page is part of a THP (`false` when unknown).
    pub thp: bool,
    /// Handles of the live patches of this pid that cover this page.
    pub patches: Vec<u64>,
}

/// A live patch of this pid inside the range, as the module's table has it.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Patch {
    pub handle: u64,
    pub addr: u64,
    pub len: u64,
    /// The page it starts on, 0..512.
    pub page: usize,
    /// The anonymous page the module wrote into.
    pub pfn: Option<u64>,
    /// The process the patch was made in, when this pid runs it as a
    /// process forked from it since (QUERY_FORKED names it; it shares the
    /// copy, at the same address).
    pub forked_from: Option<i32>,
}

/// Cells of each kind.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub pmd: usize,
    pub page_cache: usize,
    pub anon: usize,
    pub swapped: usize,
    pub none: usize,
}

impl Counts {
    pub fn of(&self, kind: Kind) -> usize {
        match kind {
            Kind::Pmd => self.pmd,
            Kind::PageCache => self.page_cache,
            Kind::Anon => self.anon,
            Kind::Swapped => self.swapped,
            Kind::None => self.none,
        }
    }

    fn add(&mut self, kind: Kind) {
        *match kind {
            Kind::Pmd => &mut self.pmd,
            Kind::PageCache => &mut self.page_cache,
            Kind::Anon => &mut self.anon,
            Kind::Swapped => &mut self.swapped,
            Kind::None => &mut self.none,
        } += 1;
    }
}

/// The mapping (smaps entry) that holds the address asked about.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: String,
}

/// The picture's model: what `map --json` prints.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct RangeMap {
    pub pid: i32,
    /// The address asked about.
    pub addr: u64,
    /// The 2 MiB-aligned range `[start, end)` around it.
    pub start: u64,
    pub end: u64,
    pub vma: Option<Vma>,
    /// One line: `PMD-mapped THP`, `511 page-cache PTEs, 1 anonymous (handle 3)`…
    pub summary: String,
    pub counts: Counts,
    /// Why the module's table could not be read (no patches shown), or that
    /// it left some out (a busy target), if so.
    pub patch_table_error: Option<String>,
    pub patches: Vec<Patch>,
    pub cells: Vec<Cell>,
}

impl RangeMap {
    /// The model from cells (exactly [`CELLS`] of them, from `start`) and
    /// the live patches in the range; counts and summary follow from them.
    pub fn new(
        pid: i32,
        addr: u64,
        vma: Option<Vma>,
        mut cells: Vec<Cell>,
        patches: Vec<Patch>,
        patch_table_error: Option<String>,
    ) -> Self {
        let start = addr & !(RANGE - 1);
        assert_eq!(cells.len(), CELLS, "a map has one cell per page of 2 MiB");
        for p in &patches {
            for c in cells
                .iter_mut()
                .filter(|c| p.addr < c.addr + PAGE_SIZE && c.addr < p.addr + p.len)
            {
                c.patches.push(p.handle);
            }
        }
        let mut counts = Counts::default();
        cells.iter().for_each(|c| counts.add(c.kind));
        let summary = summary(&counts, &cells);
        RangeMap {
            pid,
            addr,
            start,
            end: start + RANGE,
            vma,
            summary,
            counts,
            patch_table_error,
            patches,
            cells,
        }
    }

    /// The range around `addr` of process `pid` as its page table maps it now.
    /// PFNs and kpageflags need root; without, kinds come from pagemap alone.
    pub fn read(pid: i32, addr: u64) -> io::Result<Self> {
        let start = addr & !(RANGE - 1);
        let pagemap = Pagemap::open(pid)?;
        let entries = pagemap.entries(start, CELLS)?;
        let huge = pagemap.pmd_mapped_ranges(start, start + RANGE, CELLS)?;
        let kpageflags = KpageFlags::open().ok();
        let cells = entries
            .iter()
            .enumerate()
            .map(|(page, e)| {
                let addr = start + page as u64 * PAGE_SIZE;
                // PFN 0 is what an unprivileged reader sees for every page.
                let pfn = (e.present() && e.pfn() != 0).then(|| e.pfn());
                let flags = pfn.and_then(|pfn| kpageflags.as_ref()?.get(pfn).ok());
                let kind = if huge.iter().any(|&(s, e)| s <= addr && addr < e) {
                    Kind::Pmd
                } else if e.present() {
                    match flags {
                        Some(f) if f.anon() => Kind::Anon,
                        Some(_) => Kind::PageCache,
                        None if e.file() => Kind::PageCache,
                        None => Kind::Anon,
                    }
                } else if e.swapped() {
                    Kind::Swapped
                } else {
                    Kind::None
                };
                Cell {
                    page,
                    addr,
                    kind,
                    pfn,
                    thp: flags.is_some_and(|f| f.thp()),
                    patches: Vec::new(),
                }
            })
            .collect();
        let (patches, error) = match proc::debugfs("patches") {
            Ok(text) => {
                let lines = proc::parse_patches(&text);
                let mut own = patches_in_range(&lines, pid, start);
                own.extend(forked_patches_in_range(&lines, pid, start));
                (own, busy_note(&text))
            }
            Err(e) => (Vec::new(), Some(format!("{}/patches: {e}", proc::DEBUGFS))),
        };
        let vma = proc::smaps_entry(pid, addr).ok().map(|e| Vma {
            start: e.start,
            end: e.end,
            perms: e.perms,
            path: e.path,
        });
        Ok(Self::new(pid, addr, vma, cells, patches, error))
    }
}

/// debugfs `patches` stands for a busy target's patches with a `# a target
/// is busy …` line: then some patches may be missing, and the map says so.
pub fn busy_note(table: &str) -> Option<String> {
    table
        .lines()
        .find(|l| l.starts_with("# a target is busy"))
        .map(|l| format!("some not listed: debugfs patches says \"{}\"", &l[2..]))
}

/// The live patches of `pid` that start in the range at `start`.
pub fn patches_in_range(lines: &[PatchLine], pid: i32, start: u64) -> Vec<Patch> {
    lines
        .iter()
        .filter(|l| l.pid == pid && l.state == "live" && start <= l.addr && l.addr < start + RANGE)
        .map(|l| Patch {
            handle: l.handle,
            addr: l.addr,
            len: l.len,
            page: ((l.addr - start) / PAGE_SIZE) as usize,
            pfn: l.pfn,
            forked_from: None,
        })
        .collect()
}

/// The live patches of other processes in the range that `pid` runs as a
/// process forked from them (QUERY_FORKED, through the device: none
/// without it), at the address they were made at.
pub fn forked_patches_in_range(lines: &[PatchLine], pid: i32, start: u64) -> Vec<Patch> {
    let inside = |l: &&PatchLine| {
        // (A target that is gone, or restored while a forked process
        // refused, leaves its forked processes patched.)
        let kept = matches!(l.state.as_str(), "live" | "gone" | "forked-only");
        l.pid != pid && kept && start <= l.addr && l.addr < start + RANGE
    };
    let mut handles: Vec<u64> = lines.iter().filter(inside).map(|l| l.handle).collect();
    handles.sort_unstable();
    handles.dedup();
    // The device only when there is a handle to ask about.
    let Some(dev) = (!handles.is_empty())
        .then(crate::device::Device::open)
        .and_then(Result::ok)
    else {
        return Vec::new();
    };
    handles.retain(|&h| dev.query_forked(h).is_ok_and(|f| f.contains(&pid)));
    lines
        .iter()
        .filter(inside)
        .filter(|l| handles.contains(&l.handle))
        .map(|l| Patch {
            handle: l.handle,
            addr: l.addr,
            len: l.len,
            page: ((l.addr - start) / PAGE_SIZE) as usize,
            pfn: None,
            forked_from: Some(l.pid),
        })
        .collect()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The one-line summary: `PMD-mapped THP` when one PMD maps it all; else
/// the count of each kind present, in legend order, each followed by the
/// handles of the live patches on those cells.
pub fn summary(counts: &Counts, cells: &[Cell]) -> String {
    if counts.pmd == CELLS {
        return "PMD-mapped THP".into();
    }
    let mut parts = Vec::new();
    for kind in Kind::ALL {
        let n = counts.of(kind);
        if n == 0 {
            continue;
        }
        let mut part = match kind {
            Kind::Pmd => format!("{n} PMD-mapped"),
            Kind::PageCache => plural(n, "page-cache PTE", "page-cache PTEs"),
            Kind::Anon => format!("{n} anonymous"),
            Kind::Swapped => format!("{n} swapped out"),
            Kind::None => format!("{n} not mapped"),
        };
        let mut handles: Vec<u64> = cells
            .iter()
            .filter(|c| c.kind == kind)
            .flat_map(|c| c.patches.iter().copied())
            .collect();
        handles.sort_unstable();
        handles.dedup();
        let bare = cells
            .iter()
            .filter(|c| c.kind == kind && c.patches.is_empty())
            .count();
        let list = handles
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let handles = if handles.is_empty() {
            String::new()
        } else {
            format!(
                "{} {list}",
                if handles.len() == 1 {
                    "handle"
                } else {
                    "handles"
                }
            )
        };
        part += &match (handles.is_empty(), kind == Kind::Anon && bare > 0) {
            (true, true) => " (no live patch)".to_string(),
            (true, false) => String::new(),
            (false, true) => format!(" ({handles}; {bare} with no live patch)"),
            (false, false) => format!(" ({handles})"),
        };
        parts.push(part);
    }
    parts.join(", ")
}

/// `0x7f0000200000-0x7f0000400000 (pid 123, r-xp /tmp/x)`.
fn title(m: &RangeMap) -> String {
    let vma = match &m.vma {
        Some(v) => format!("{} {}", v.perms, v.path),
        None => format!("no mapping at {:#x}", m.addr),
    };
    format!("pid {}: {:#x}-{:#x}, {vma}", m.pid, m.start, m.end)
}

/// One line per live patch: where it is and what the cell under it is.
fn patch_lines(m: &RangeMap) -> Vec<String> {
    let mut out: Vec<String> = m
        .patches
        .iter()
        .map(|p| {
            let c = &m.cells[p.page];
            let pfn = |pfn: Option<u64>| pfn.map_or("-".to_string(), |p| format!("{p:#x}"));
            let table = match p.forked_from {
                Some(parent) => format!("forked from pid {parent}, which the patch was made in"),
                None => format!("the module's table says pfn {}", pfn(p.pfn)),
            };
            format!(
                "handle {} at {:#x} (page {}, {} bytes): {}, pfn {}; {table}",
                p.handle,
                p.addr,
                p.page,
                p.len,
                c.kind.label(),
                pfn(c.pfn),
            )
        })
        .collect();
    if let Some(e) = &m.patch_table_error {
        out.push(format!("(live patches not shown: {e})"));
    }
    out
}

/// The legend, one line (`;` between entries: labels have commas).
pub fn legend() -> String {
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|k| format!("{} {}", k.glyph(), k.label()))
        .collect();
    format!(
        "{}; * live patch (its cell's colour is the page's)",
        kinds.join("; ")
    )
}

/// The picture as text: a title, 16 rows of 32 cells (in groups of 8) each
/// with its offset in the range, the legend, the patches, and the summary
/// as the last line.  `colour`: ANSI colours (for a terminal).
pub fn render_text(m: &RangeMap, colour: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", title(m));
    let mut header = String::from("         ");
    for col in (0..COLUMNS).step_by(8) {
        let _ = write!(header, " {:<8}", format!("+{col}"));
    }
    let _ = writeln!(s, "{}", header.trim_end());
    for (row, cells) in m.cells.chunks(COLUMNS).enumerate() {
        let _ = write!(s, "+{:#08x}", row as u64 * COLUMNS as u64 * PAGE_SIZE);
        for (i, c) in cells.iter().enumerate() {
            if i % 8 == 0 {
                s.push(' ');
            }
            let glyph = if c.patches.is_empty() {
                c.kind.glyph()
            } else {
                '*'
            };
            match (colour, c.patches.is_empty()) {
                (false, _) => s.push(glyph),
                (true, true) => {
                    let _ = write!(s, "\x1b[{}m{glyph}\x1b[0m", c.kind.ansi());
                }
                (true, false) => {
                    let _ = write!(s, "\x1b[{};1;7m{glyph}\x1b[0m", c.kind.ansi());
                }
            }
        }
        s.push('\n');
    }
    let _ = writeln!(s, "legend: {}", legend());
    for l in patch_lines(m) {
        let _ = writeln!(s, "{l}");
    }
    let _ = writeln!(s, "summary: {}", m.summary);
    s
}

const CELL: f64 = 20.0;
const PITCH: f64 = 22.0;
const LEFT: f64 = 90.0;
const TOP: f64 = 64.0;
const LINE: f64 = 18.0;

/// The same picture as SVG: cells coloured by kind (a `<title>` on each
/// says page, address, kind and PFN), live patches outlined with their
/// handle, the legend, the patches and the summary below.
pub fn render_svg(m: &RangeMap) -> String {
    use crate::svg::escape;
    let rows = CELLS.div_ceil(COLUMNS);
    let grid_w = COLUMNS as f64 * PITCH;
    let width = LEFT + grid_w + 20.0;
    let below = TOP + rows as f64 * PITCH + 12.0;
    let notes = patch_lines(m);
    // Legend (one line per kind, two columns of three), notes, summary.
    let height = below + 3.0 * LINE + (notes.len() as f64 + 1.0) * LINE + 16.0;
    let mut s = crate::svg::open(width, height);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        escape(&title(m))
    );
    let _ = writeln!(
        s,
        r#"<text class="summary" x="10" y="40" font-size="14" font-weight="bold">{}</text>"#,
        escape(&m.summary)
    );
    for col in (0..COLUMNS).step_by(8) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">+{col}</text>"#,
            LEFT + col as f64 * PITCH,
            TOP - 6.0
        );
    }
    for (row, cells) in m.cells.chunks(COLUMNS).enumerate() {
        let y = TOP + row as f64 * PITCH;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-family="monospace">+{:#08x}</text>"#,
            LEFT - 8.0,
            y + 14.0,
            row as u64 * COLUMNS as u64 * PAGE_SIZE
        );
        for (i, c) in cells.iter().enumerate() {
            let x = LEFT + i as f64 * PITCH;
            let pfn = c.pfn.map_or(String::new(), |p| format!(", pfn {p:#x}"));
            let handles = c
                .patches
                .iter()
                .map(|h| format!(", live patch: handle {h}"))
                .collect::<String>();
            let tip = format!(
                "page {} at {:#x}: {}{pfn}{handles}",
                c.page,
                c.addr,
                c.kind.label()
            );
            let _ = writeln!(
                s,
                r#"<rect class="cell {:?}" x="{x:.1}" y="{y:.1}" width="{CELL}" height="{CELL}" fill="{}"><title>{}</title></rect>"#,
                c.kind,
                c.kind.fill(),
                escape(&tip)
            );
            if let Some(h) = c.patches.first() {
                let _ = writeln!(
                    s,
                    r#"<rect class="patch" x="{:.1}" y="{:.1}" width="{}" height="{}" fill="none" stroke="black" stroke-width="2.5"/>"#,
                    x + 1.25,
                    y + 1.25,
                    CELL - 2.5,
                    CELL - 2.5
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="{}" font-weight="bold" fill="white">{h}</text>"#,
                    x + CELL / 2.0,
                    y + 14.5,
                    if *h < 100 { 11 } else { 8 }
                );
            }
        }
    }
    // Legend: every kind, and the patch outline.
    let items: Vec<(Option<Kind>, String)> = Kind::ALL
        .iter()
        .map(|k| (Some(*k), k.label().to_string()))
        .chain([(None, "live patch (handle inside)".to_string())])
        .collect();
    for (i, (kind, label)) in items.iter().enumerate() {
        let x = 10.0 + (i % 3) as f64 * 260.0;
        let y = below + (i / 3) as f64 * LINE;
        let (fill, stroke) = match kind {
            Some(k) => (k.fill(), r##"stroke="#999""##),
            None => ("white", r#"stroke="black" stroke-width="2.5""#),
        };
        let _ = writeln!(
            s,
            r#"<rect class="legend" x="{x}" y="{y}" width="14" height="14" fill="{fill}" {stroke}/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 20.0,
            y + 12.0,
            escape(label)
        );
    }
    let mut y = below + 3.0 * LINE + 12.0;
    for n in &notes {
        let _ = writeln!(s, r#"<text x="10" y="{y}">{}</text>"#, escape(n));
        y += LINE;
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const START: u64 = 0x7f00_0020_0000;

    /// Cells of the given kinds (page i's PFN 0x6a00 + i, the THP's).
    pub(crate) fn cells(kind: impl Fn(usize) -> Kind) -> Vec<Cell> {
        (0..CELLS)
            .map(|page| {
                let kind = kind(page);
                let pfn = match kind {
                    Kind::None | Kind::Swapped => None,
                    Kind::Anon => Some(0x3c3d),
                    _ => Some(0x6a00 + page as u64),
                };
                Cell {
                    page,
                    addr: START + page as u64 * PAGE_SIZE,
                    kind,
                    pfn,
                    thp: kind != Kind::Anon,
                    patches: vec![],
                }
            })
            .collect()
    }

    fn patch(handle: u64, page: usize) -> Patch {
        Patch {
            forked_from: None,
            handle,
            addr: START + page as u64 * PAGE_SIZE,
            len: 6,
            page,
            pfn: Some(0x3c3d),
        }
    }

    fn vma() -> Option<Vma> {
        Some(Vma {
            start: START,
            end: START + RANGE,
            perms: "r-xp".into(),
            path: "/tmp/hugepoke-thp/text <1>".into(),
        })
    }

    /// After PATCH of page 7, every page touched since.
    fn patched() -> RangeMap {
        let c = cells(|p| if p == 7 { Kind::Anon } else { Kind::PageCache });
        RangeMap::new(
            42,
            START + 7 * PAGE_SIZE + 3,
            vma(),
            c,
            vec![patch(3, 7)],
            None,
        )
    }

    #[test]
    fn summaries() {
        let pmd = RangeMap::new(42, START, vma(), cells(|_| Kind::Pmd), vec![], None);
        assert_eq!(pmd.summary, "PMD-mapped THP");
        assert_eq!(
            pmd.counts,
            Counts {
                pmd: 512,
                ..Default::default()
            }
        );
        assert_eq!(
            patched().summary,
            "511 page-cache PTEs, 1 anonymous (handle 3)"
        );
        assert_eq!(
            patched().counts,
            Counts {
                page_cache: 511,
                anon: 1,
                ..Default::default()
            }
        );
        let restored = RangeMap::new(42, START, vma(), cells(|_| Kind::PageCache), vec![], None);
        assert_eq!(restored.summary, "512 page-cache PTEs");
        let none = RangeMap::new(42, START, None, cells(|_| Kind::None), vec![], None);
        assert_eq!(none.summary, "512 not mapped");
        // Just split: fault-around mapped 16 pages; two patches, one page
        // anonymous without a patch (its patch restored but kept), one swapped.
        let c = cells(|p| match p {
            0..=15 => Kind::PageCache,
            20 | 30 | 40 => Kind::Anon,
            41 => Kind::Swapped,
            _ => Kind::None,
        });
        let m = RangeMap::new(
            42,
            START,
            vma(),
            c,
            vec![patch(5, 30), patch(4, 20), patch(9, 41)],
            None,
        );
        assert_eq!(m.summary, "16 page-cache PTEs, 3 anonymous (handles 4, 5; 1 with no live patch), 1 swapped out (handle 9), 492 not mapped");
        let one = RangeMap::new(
            42,
            START,
            vma(),
            cells(|p| if p == 0 { Kind::PageCache } else { Kind::None }),
            vec![],
            None,
        );
        assert_eq!(one.summary, "1 page-cache PTE, 511 not mapped");
        let bare = RangeMap::new(
            42,
            START,
            vma(),
            cells(|p| if p == 0 { Kind::Anon } else { Kind::PageCache }),
            vec![],
            None,
        );
        assert_eq!(
            bare.summary,
            "511 page-cache PTEs, 1 anonymous (no live patch)"
        );
    }

    #[test]
    fn a_patch_marks_every_page_it_covers() {
        let mut p = patch(8, 9);
        p.addr = START + 10 * PAGE_SIZE - 2; // 6 bytes across the boundary of pages 9 and 10
        let m = RangeMap::new(42, START, vma(), cells(|_| Kind::PageCache), vec![p], None);
        let marked: Vec<usize> = m
            .cells
            .iter()
            .filter(|c| c.patches == [8])
            .map(|c| c.page)
            .collect();
        assert_eq!(marked, [9, 10]);
    }

    #[test]
    fn patches_of_this_pid_in_this_range_only() {
        let text = "# handle pid addr len state pfn owner pmd_mappable bytes orig site\n\
                    3 42 0x7f0000207000 6 live 0x3c3d file:1 yes b892100000c3 b8ef030000c3 0/1\n\
                    4 43 0x7f0000207000 6 live 0x3c3e file:1 yes b892100000c3 b8ef030000c3 0/1\n\
                    5 42 0x7f0000407000 6 live 0x3c3f persistent yes b892100000c3 b8ef030000c3 0/1\n\
                    6 42 0x7f0000208000 1 gone - file:1 yes cc b8 0/1\n\
                    # a target is busy (its lock held for more than 100 ms): its patches are not listed\n";
        let got = patches_in_range(&proc::parse_patches(text), 42, START);
        assert_eq!(
            busy_note(text).as_deref(),
            Some("some not listed: debugfs patches says \"a target is busy (its lock held for more than 100 ms): its patches are not listed\"")
        );
        assert_eq!(busy_note("# handle pid addr\n"), None);
        assert_eq!(
            got,
            vec![Patch {
                handle: 3,
                addr: START + 7 * PAGE_SIZE,
                len: 6,
                page: 7,
                pfn: Some(0x3c3d),
                forked_from: None,
            }]
        );
    }

    #[test]
    fn text_has_title_rows_legend_patch_and_summary_last() {
        let t = render_text(&patched(), false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "pid 42: 0x7f0000200000-0x7f0000400000, r-xp /tmp/hugepoke-thp/text <1>"
        );
        assert_eq!(lines[1], "          +0       +8       +16      +24");
        assert_eq!(lines[2], "+0x000000 ppppppp* pppppppp pppppppp pppppppp");
        assert_eq!(lines[17], "+0x1e0000 pppppppp pppppppp pppppppp pppppppp");
        assert_eq!(
            lines[18],
            "legend: H PMD-mapped; p page-cache page, PTE-mapped; A anonymous copy; s swapped out; . not mapped; * live patch (its cell's colour is the page's)"
        );
        assert_eq!(lines[19], "handle 3 at 0x7f0000207000 (page 7, 6 bytes): anonymous copy, pfn 0x3c3d; the module's table says pfn 0x3c3d");
        assert_eq!(
            *lines.last().unwrap(),
            "summary: 511 page-cache PTEs, 1 anonymous (handle 3)"
        );
        assert_eq!(lines.len(), 21);
        assert!(!t.contains('\x1b'), "plain text has no escapes");
        // 512 cells: 511 glyphs and one patch mark.
        let grid: String = lines[2..18].iter().map(|l| &l[10..]).collect();
        assert_eq!(grid.chars().filter(|c| *c == 'p').count(), 511);
        assert_eq!(grid.chars().filter(|c| *c == '*').count(), 1);
    }

    #[test]
    fn colour_only_when_asked() {
        let t = render_text(&patched(), true);
        assert!(t.contains("\x1b[36mp\x1b[0m"), "page-cache cells cyan");
        assert!(
            t.contains("\x1b[1;31;1;7m*\x1b[0m"),
            "the patch reversed, in the anonymous colour"
        );
        // Same text once the escapes are gone.
        let mut plain = String::new();
        let mut rest = t.as_str();
        while let Some(i) = rest.find('\x1b') {
            plain += &rest[..i];
            rest = &rest[i + rest[i..].find('m').unwrap() + 1..];
        }
        plain += rest;
        assert_eq!(plain, render_text(&patched(), false));
    }

    #[test]
    fn unreadable_table_is_said() {
        let m = RangeMap::new(
            42,
            START,
            vma(),
            cells(|_| Kind::PageCache),
            vec![],
            Some("x: Permission denied".into()),
        );
        assert!(render_text(&m, false).contains("(live patches not shown: x: Permission denied)\n"));
    }

    #[test]
    fn svg_is_well_formed_with_one_rect_per_cell() {
        let svg = render_svg(&patched());
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        let class = |c: &str| {
            doc.descendants()
                .filter(|n| {
                    n.attribute("class")
                        .is_some_and(|a| a.split(' ').any(|w| w == c))
                })
                .count()
        };
        assert_eq!(class("cell"), CELLS);
        assert_eq!(class("PageCache"), 511);
        assert_eq!(class("Anon"), 1);
        assert_eq!(class("patch"), 1);
        assert_eq!(class("legend"), Kind::ALL.len() + 1);
        let summary = doc
            .descendants()
            .find(|n| n.attribute("class") == Some("summary"))
            .unwrap();
        assert_eq!(
            summary.text(),
            Some("511 page-cache PTEs, 1 anonymous (handle 3)")
        );
        // The path's "<1>" is escaped, and the patch's handle is drawn in its cell.
        assert!(svg.contains("text &lt;1&gt;"));
        let tip = doc
            .descendants()
            .filter(|n| n.has_tag_name("title"))
            .nth(7)
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(
            tip,
            "page 7 at 0x7f0000207000: anonymous copy, pfn 0x3c3d, live patch: handle 3"
        );
        // Every text fits inside the picture.
        let height: f64 = root.attribute("height").unwrap().parse().unwrap();
        for n in doc.descendants().filter(|n| n.has_tag_name("text")) {
            let y: f64 = n.attribute("y").unwrap().parse().unwrap();
            assert!(y < height, "text at y={y} below the picture's {height}");
        }
    }

    #[test]
    fn json_field_names() {
        let v = serde_json::to_value(patched()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "addr",
                "cells",
                "counts",
                "end",
                "patch_table_error",
                "patches",
                "pid",
                "start",
                "summary",
                "vma"
            ]
        );
        assert_eq!(
            v["counts"],
            serde_json::json!({"pmd": 0, "page_cache": 511, "anon": 1, "swapped": 0, "none": 0})
        );
        assert_eq!(
            v["cells"][7],
            serde_json::json!({"page": 7, "addr": START + 7 * 4096, "kind": "anon", "pfn": 0x3c3d, "thp": false, "patches": [3]})
        );
        assert_eq!(v["cells"][8]["kind"], "page_cache");
        assert_eq!(
            v["patches"][0],
            serde_json::json!({"handle": 3, "addr": START + 7 * 4096, "len": 6, "page": 7, "pfn": 0x3c3d, "forked_from": null})
        );
        assert_eq!(v["vma"]["perms"], "r-xp");
    }
}
