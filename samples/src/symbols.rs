//! Addressing by symbol: the ELF objects a process maps, where each is
//! loaded (its load bias), and the names in their symbol tables (`.symtab`
//! and `.dynsym`, with GNU symbol versions), as `perf probe -x` and
//! `bpftrace uprobe:` name functions.
//!
//! Each file-backed mapping in `/proc/PID/maps` is traced back to its file
//! through `/proc/PID/map_files/` (the very file mapped, even when deleted
//! or replaced, in any mount namespace), or else its path when that still
//! names the same inode.  The load bias is the mapping's start minus the
//! virtual address its file offset has in a `PT_LOAD` segment: 0 for a
//! non-PIE executable, the base for PIE executables and shared objects.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, Sym};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    /// `(major, minor)` of the file's device.
    pub dev: (u32, u32),
    pub inode: u64,
    /// The path as the kernel shows it (may end in ` (deleted)`), or
    /// `[heap]`, `[vdso]`…, or empty for anonymous memory.
    pub path: String,
}

impl Mapping {
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    /// Backed by a file (not anonymous memory, not `[vdso]` and the like).
    pub fn file_backed(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
    /// The file offset that `addr` (inside this mapping) maps.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// Parse the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut w = line.splitn(6, ' ');
            let (start, end) = w.next()?.split_once('-')?;
            let perms = w.next()?.to_string();
            let offset = u64::from_str_radix(w.next()?, 16).ok()?;
            let (major, minor) = w.next()?.split_once(':')?;
            let inode = w.next()?.parse().ok()?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                offset,
                dev: (
                    u32::from_str_radix(major, 16).ok()?,
                    u32::from_str_radix(minor, 16).ok()?,
                ),
                inode,
                path: w.next().unwrap_or("").trim_start().to_string(),
            })
        })
        .collect()
}

pub fn read_maps(pid: i32) -> Result<Vec<Mapping>, String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|t| parse_maps(&t))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))
}

/// A code symbol of an ELF object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The name without any version.
    pub name: String,
    /// The GNU version of a `.dynsym` symbol (or of a `.symtab` name written
    /// `name@VER`), if any.
    pub version: Option<String>,
    /// A non-default version (`name@VER`, not `name@@VER`): the dynamic
    /// linker binds an unversioned reference to the default one.
    pub hidden: bool,
    /// The address in the object's own virtual address space (before bias).
    pub value: u64,
    /// Size in bytes; 0 when the object does not say.
    pub size: u64,
    /// `STT_GNU_IFUNC`: the address is the resolver, not the code callers run.
    pub ifunc: bool,
    pub dynamic: bool,
}

impl Symbol {
    /// The name as `readelf` shows it: `puts@@GLIBC_2.2.5`, `memcpy@GLIBC_2.2.5`.
    pub fn full_name(&self) -> String {
        match &self.version {
            Some(v) if self.hidden => format!("{}@{v}", self.name),
            Some(v) => format!("{}@@{v}", self.name),
            None => self.name.clone(),
        }
    }
    pub fn covers(&self, vaddr: u64) -> bool {
        self.value <= vaddr && vaddr < self.value + self.size
    }
}

/// A `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub exec: bool,
}

/// A file mapped read-only into this process, so that the symbol tables of
/// a 100 MB library are read by touching only their pages.
struct FileMap {
    ptr: *const u8,
    len: usize,
}

impl FileMap {
    fn new(file: &File, what: &str) -> Result<FileMap, String> {
        let len = file.metadata().map_err(|e| format!("{what}: {e}"))?.len() as usize;
        if len == 0 {
            return Ok(FileMap {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping of a whole file we hold
        // open; it is only read through `bytes()`, and unmapped once in drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("{what}: mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(FileMap {
            ptr: ptr as *const u8,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable at `ptr` for our lifetime.  A
        // file truncated under us would fault (SIGBUS): a CLI's risk, as
        // for any tool that maps the objects it inspects.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

impl std::fmt::Debug for FileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileMap({} bytes)", self.len)
    }
}

/// What hugepoke needs of an ELF file: its `PT_LOAD` segments now, its
/// symbol tables when first asked (read once into an index, so that many
/// sites in one object cost a lookup each, not a scan of every symbol).
#[derive(Debug)]
pub struct Elf {
    /// `ET_EXEC` (a non-PIE executable: bias 0) or `ET_DYN`.
    pub exec_type: bool,
    pub loads: Vec<Load>,
    map: FileMap,
    index: OnceLock<SymbolIndex>,
}

/// Every code symbol of an object: by address, and by name.
#[derive(Debug)]
struct SymbolIndex {
    /// By value, as [`dedup`] leaves them.
    by_addr: Vec<Symbol>,
    /// For each of `by_addr`, the greatest end (value + size) of it and
    /// every one before it: where a search for a symbol covering an
    /// address may stop.
    max_end: Vec<u64>,
    /// Positions in `by_addr` of each name (without its version).
    by_name: HashMap<String, Vec<usize>>,
}

impl SymbolIndex {
    fn new(by_addr: Vec<Symbol>) -> Self {
        let mut max_end = Vec::with_capacity(by_addr.len());
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut end = 0;
        for (i, s) in by_addr.iter().enumerate() {
            end = end.max(s.value.saturating_add(s.size));
            max_end.push(end);
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        SymbolIndex {
            by_addr,
            max_end,
            by_name,
        }
    }

    /// The symbol that covers `vaddr` (of those that do, the one that
    /// starts last), or else the nearest one before it; of aliases, a
    /// default-versioned name, then the shortest.
    fn at(&self, vaddr: u64) -> Option<Symbol> {
        let syms = &self.by_addr;
        let below = syms.partition_point(|s| s.value <= vaddr);
        let before = syms.get(below.checked_sub(1)?)?.value;
        // Back from `below`, while one before may still reach past `vaddr`.
        let mut cover = None;
        let mut j = below;
        while j > 0 && self.max_end[j - 1] > vaddr {
            j -= 1;
            if vaddr < syms[j].value.saturating_add(syms[j].size) {
                cover = Some(syms[j].value);
                break;
            }
        }
        let pick = cover.unwrap_or(before);
        let from = syms.partition_point(|s| s.value < pick);
        syms[from..below]
            .iter()
            .filter(|s| cover.is_none() || vaddr < s.value.saturating_add(s.size))
            .min_by_key(|s| (s.hidden, s.name.len()))
            .cloned()
    }
}

type Header = elf::FileHeader64<object::Endianness>;

fn read_err(what: &str) -> impl Fn(object::read::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Elf {
    /// Read the program headers of a 64-bit ELF file.  `Ok(None)` when the
    /// file is not ELF at all.
    pub fn read(file: File, what: &str) -> Result<Option<Elf>, String> {
        let map = FileMap::new(&file, what)?;
        let data = map.bytes();
        if data.get(..4) != Some(&elf::ELFMAG[..]) {
            return Ok(None);
        }
        let header = Header::parse(data).map_err(read_err(what))?;
        let endian = header.endian().map_err(read_err(what))?;
        let exec_type = header.e_type(endian) == elf::ET_EXEC;
        let mut loads = Vec::new();
        for ph in header
            .program_headers(endian, data)
            .map_err(read_err(what))?
        {
            if ph.p_type(endian) == elf::PT_LOAD {
                loads.push(Load {
                    vaddr: ph.p_vaddr(endian),
                    offset: ph.p_offset(endian),
                    filesz: ph.p_filesz(endian),
                    exec: ph.p_flags(endian) & elf::PF_X != 0,
                });
            }
        }
        Ok(Some(Elf {
            exec_type,
            loads,
            map,
            index: OnceLock::new(),
        }))
    }

    /// Every defined code symbol of `.symtab` then `.dynsym`, with
    /// versions, as [`dedup`] leaves them (by value).
    fn scan(&self) -> Vec<Symbol> {
        let mut out = Vec::new();
        let data = self.map.bytes();
        let Ok(header) = Header::parse(data) else {
            return out;
        };
        let Ok(endian) = header.endian() else {
            return out;
        };
        let Ok(sections) = header.sections(endian, data) else {
            return out;
        };
        let versions = sections.versions(endian, data).ok().flatten();
        for (table_type, dynamic) in [(elf::SHT_SYMTAB, false), (elf::SHT_DYNSYM, true)] {
            let Ok(table) = sections.symbols(endian, data, table_type) else {
                continue;
            };
            for (index, sym) in table.enumerate() {
                let kind = sym.st_type();
                let code = matches!(kind, elf::STT_FUNC | elf::STT_GNU_IFUNC)
                    // Hand-written assembly often leaves its labels untyped.
                    || (kind == elf::STT_NOTYPE && sym.st_bind() != elf::STB_LOCAL);
                let (value, size) = (sym.st_value(endian), sym.st_size(endian));
                if !code || sym.st_shndx(endian) == elf::SHN_UNDEF || value == 0 {
                    continue;
                }
                let Ok(raw) = sym.name(endian, table.strings()) else {
                    continue;
                };
                if raw.is_empty() {
                    continue;
                }
                let (name, mut version, mut hidden) = split_version(&String::from_utf8_lossy(raw));
                if let (true, Some(v)) = (dynamic, versions.as_ref()) {
                    let vi = v.version_index(endian, index);
                    if let Ok(Some(ver)) = v.version(vi) {
                        version = Some(String::from_utf8_lossy(ver.name()).into_owned());
                        hidden = vi.is_hidden();
                    }
                }
                out.push(Symbol {
                    name,
                    version,
                    hidden,
                    value,
                    size,
                    ifunc: kind == elf::STT_GNU_IFUNC,
                    dynamic,
                });
            }
        }
        dedup(out)
    }

    /// The index of every code symbol, read on first use.
    fn index(&self) -> &SymbolIndex {
        self.index.get_or_init(|| SymbolIndex::new(self.scan()))
    }

    /// Every code symbol named `name` (any version).
    pub fn lookup(&self, name: &str) -> Vec<Symbol> {
        let idx = self.index();
        idx.by_name.get(name).map_or_else(Vec::new, |at| {
            at.iter().map(|&i| idx.by_addr[i].clone()).collect()
        })
    }

    /// The symbol that covers `vaddr`, or else the nearest one before it.
    pub fn symbol_at(&self, vaddr: u64) -> Option<Symbol> {
        self.index().at(vaddr)
    }

    /// All defined code symbols (for tests and listings of small objects).
    pub fn symbols(&self) -> Vec<Symbol> {
        self.index().by_addr.clone()
    }

    /// The file offset of object address `vaddr`, if a `PT_LOAD` maps it from the file.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        file_offset(&self.loads, vaddr)
    }

    /// The load bias given one of the object's mappings.
    pub fn bias(&self, m: &Mapping) -> Option<u64> {
        bias(&self.loads, m)
    }
}

/// The same symbol in both tables: keep one, with the version `.dynsym` gives.
fn dedup(mut symbols: Vec<Symbol>) -> Vec<Symbol> {
    symbols.sort_by(|a, b| (a.value, &a.name, a.dynamic).cmp(&(b.value, &b.name, b.dynamic)));
    let mut kept: Vec<Symbol> = Vec::with_capacity(symbols.len());
    for s in symbols {
        match kept.last_mut() {
            Some(k)
                if k.value == s.value
                    && k.name == s.name
                    && (k.version.is_none() || s.version.is_none() || k.version == s.version) =>
            {
                if k.version.is_none() {
                    k.version = s.version;
                    k.hidden = s.hidden;
                }
                k.size = k.size.max(s.size);
                k.dynamic |= s.dynamic;
            }
            _ => kept.push(s),
        }
    }
    kept
}

fn file_offset(loads: &[Load], vaddr: u64) -> Option<u64> {
    loads
        .iter()
        .find(|l| l.vaddr <= vaddr && vaddr < l.vaddr + l.filesz)
        .map(|l| vaddr - l.vaddr + l.offset)
}

/// The load bias from one mapping: its start minus the object address of
/// its file offset, from the `PT_LOAD` segment that maps that offset.
fn bias(loads: &[Load], m: &Mapping) -> Option<u64> {
    let load = loads
        .iter()
        .filter(|l| l.exec == m.executable())
        .find(|l| {
            let first_page = l.offset & !(crate::proc::PAGE_SIZE - 1);
            first_page <= m.offset && m.offset < l.offset + l.filesz.max(1)
        })?;
    // In the object, file offset m.offset is at load.vaddr - (load.offset - m.offset).
    let vaddr = (load.vaddr + m.offset).wrapping_sub(load.offset);
    Some(m.start.wrapping_sub(vaddr))
}

/// `name@VER` / `name@@VER` (as `.symtab` spells versioned names) into
/// `(name, version, hidden)`.
fn split_version(raw: &str) -> (String, Option<String>, bool) {
    match raw.split_once('@') {
        Some((name, rest)) => match rest.strip_prefix('@') {
            Some(v) => (name.to_string(), Some(v.to_string()), false),
            None => (name.to_string(), Some(rest.to_string()), true),
        },
        None => (raw.to_string(), None, false),
    }
}

/// One mapped file of a process: all its mappings, and what its ELF says.
#[derive(Debug)]
pub struct Object {
    /// The path as `/proc/PID/maps` shows it.
    pub path: String,
    pub mappings: Vec<Mapping>,
    /// The process's main executable (`/proc/PID/exe`).
    pub main: bool,
    /// `None`: not an ELF file (a JIT blob, hugepoke's own `thp-target` text).
    pub elf: Option<Elf>,
    /// Load bias: object address + bias = process address.
    pub bias: u64,
    /// Why the file could not be read, if it could not.
    pub error: Option<String>,
}

impl Object {
    pub fn basename(&self) -> &str {
        let p = self.path.strip_suffix(" (deleted)").unwrap_or(&self.path);
        p.rsplit('/').next().unwrap_or(p)
    }

    /// The mapping that holds process address `addr`.
    pub fn mapping(&self, addr: u64) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.contains(addr))
    }

    /// Does `--object PATTERN` name this object?  A full path (with a `/`)
    /// must be the path shown in maps, or the same file; a bare name matches
    /// the basename, or its start up to a `.` or `-` (`libc` for
    /// `libc.so.6`, `libLLVM` for `libLLVM.so.19.1`).
    pub fn matches(&self, pattern: &str) -> bool {
        if pattern.contains('/') {
            if self.path == pattern {
                return true;
            }
            return std::fs::metadata(pattern).is_ok_and(|md| {
                self.mappings.first().is_some_and(|m| {
                    m.inode == md.ino()
                        && m.dev == (libc::major(md.dev()) as u32, libc::minor(md.dev()) as u32)
                })
            });
        }
        let base = self.basename();
        base == pattern
            || base
                .strip_prefix(pattern)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
    }

    /// `NAME+0xOFF` for process address `addr` (`?` when no symbol covers
    /// it and the name is only the nearest before), or `FILE+0xOFFSET` when
    /// the object has no symbols there.
    pub fn describe(&self, addr: u64) -> Option<String> {
        let m = self.mapping(addr)?;
        let by_offset = || format!("{}+{:#x}", self.basename(), m.file_offset(addr));
        let Some(elf) = &self.elf else {
            return Some(by_offset());
        };
        let vaddr = addr.wrapping_sub(self.bias);
        Some(match elf.symbol_at(vaddr) {
            Some(s) if s.covers(vaddr) => format!("{}+{:#x}", s.name, vaddr - s.value),
            Some(s)
                if self
                    .mapping(s.value.wrapping_add(self.bias))
                    .is_some_and(|sm| sm.start == m.start) =>
            {
                format!("{}+{:#x}?", s.name, vaddr - s.value)
            }
            _ => by_offset(),
        })
    }
}

/// Open the file a mapping maps: `/proc/PID/map_files/…` first (the very
/// inode, deleted or not), else the path if it still names that inode.
fn open_mapped(pid: i32, m: &Mapping) -> Result<File, String> {
    // (No inode check on the map_files fd: on overlayfs, as the guest's
    // /usr is, maps shows the lower file's device and inode and fstat the
    // overlay's, so a check would refuse every library there.)
    if let Ok(f) = File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)) {
        return Ok(f);
    }
    let f = File::open(&m.path).map_err(|e| format!("{}: {e}", m.path))?;
    let md = f.metadata().map_err(|e| format!("{}: {e}", m.path))?;
    if md.ino() != m.inode || (libc::major(md.dev()) as u32, libc::minor(md.dev()) as u32) != m.dev
    {
        return Err(format!(
            "{} is no longer the file pid {pid} maps (replaced or deleted), and /proc/{pid}/map_files is not readable",
            m.path
        ));
    }
    Ok(f)
}

/// Every mapped file of `pid` that has executable mappings, the main
/// executable first, then the others in address order.
pub fn objects(pid: i32) -> Result<Vec<Object>, String> {
    let maps = read_maps(pid)?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok();
    let mut objects: Vec<Object> = Vec::new();
    for m in maps.into_iter().filter(Mapping::file_backed) {
        match objects.iter_mut().find(|o| {
            o.mappings[0].inode == m.inode && o.mappings[0].dev == m.dev && o.path == m.path
        }) {
            Some(o) => o.mappings.push(m),
            None => {
                let main = exe.as_ref().is_some_and(|md| {
                    md.ino() == m.inode
                        && (libc::major(md.dev()) as u32, libc::minor(md.dev()) as u32) == m.dev
                });
                objects.push(Object {
                    path: m.path.clone(),
                    mappings: vec![m],
                    main,
                    elf: None,
                    bias: 0,
                    error: None,
                });
            }
        }
    }
    objects.retain(|o| o.mappings.iter().any(Mapping::executable));
    for o in objects.iter_mut() {
        let exec = o.mappings.iter().find(|m| m.executable()).unwrap();
        match open_mapped(pid, exec).and_then(|f| Elf::read(f, &o.path)) {
            Ok(elf) => o.elf = elf,
            Err(e) => o.error = Some(e),
        }
        if let Some(elf) = &o.elf {
            // From an executable mapping and an executable segment: another
            // read-only mapping of the same file (a tool reading it, as we
            // do) says nothing about where the code is.
            o.bias = if elf.exec_type {
                0
            } else {
                o.mappings
                    .iter()
                    .filter(|m| m.executable())
                    .find_map(|m| elf.bias(m))
                    .unwrap_or(0)
            };
            // One file loaded twice (dlmopen, or mapped executable again by
            // hand) has two biases: a symbol names two places.
            let mut biases: Vec<u64> = o
                .mappings
                .iter()
                .filter(|m| m.executable())
                .filter_map(|m| elf.bias(m))
                .collect();
            biases.sort_unstable();
            biases.dedup();
            if !elf.exec_type && biases.len() > 1 {
                let at: Vec<String> = biases.iter().map(|b| format!("{b:#x}")).collect();
                o.error = Some(format!(
                    "{} is loaded more than once (load biases {}): give the address with --addr",
                    o.path,
                    at.join(", ")
                ));
            }
        }
    }
    objects.sort_by_key(|o| !o.main);
    Ok(objects)
}

/// Where `--symbol NAME[+OFFSET]` resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Index into the objects given to [`resolve`].
    pub object: usize,
    pub symbol: Symbol,
    pub offset: u64,
    /// The process address.
    pub addr: u64,
}

/// `NAME[@VER|@@VER][+OFFSET]` into its parts.
pub fn parse_query(q: &str) -> Result<(String, Option<String>, u64), String> {
    let (name, offset) = match q.rsplit_once('+') {
        Some((name, off)) if !name.is_empty() => (
            name,
            crate::parse_number(off).ok_or_else(|| {
                format!("bad offset {off:?} in {q:?} (want NAME+0xOFF or NAME+DEC)")
            })?,
        ),
        _ => (q, 0),
    };
    if name.is_empty() {
        return Err("empty symbol name".into());
    }
    let (name, version, _) = split_version(name);
    Ok((name, version, offset))
}

/// Find `query` in `objects` (only those matching `object`, if given):
/// the main executable's definition if it has one and no library does,
/// else the one library that defines it; an error naming every candidate
/// when it is ambiguous, and a clear one when it is nowhere.
pub fn resolve(objects: &[Object], query: &str, object: Option<&str>) -> Result<Resolved, String> {
    let (name, version, offset) = parse_query(query)?;
    let candidates: Vec<usize> = match object {
        Some(pat) => {
            let found: Vec<usize> = (0..objects.len())
                .filter(|&i| objects[i].matches(pat))
                .collect();
            match found.len() {
                0 => {
                    let all: Vec<&str> = objects.iter().map(|o| o.path.as_str()).collect();
                    return Err(format!(
                        "--object {pat}: the process maps no such object (it maps: {})",
                        all.join(", ")
                    ));
                }
                1 => found,
                _ => {
                    let all: Vec<&str> = found.iter().map(|&i| objects[i].path.as_str()).collect();
                    return Err(format!("--object {pat} is ambiguous: {}", all.join(", ")));
                }
            }
        }
        None => (0..objects.len()).collect(),
    };
    let mut hits: Vec<(usize, Symbol)> = Vec::new();
    let mut ambiguous_in: Vec<String> = Vec::new();
    // An object we could not read (or that is loaded twice) might define
    // the name too: then no answer is safe.
    let unsafe_objects: Vec<&str> = candidates
        .iter()
        .filter_map(|&i| objects[i].error.as_deref())
        .collect();
    if !unsafe_objects.is_empty() {
        return Err(format!(
            "cannot resolve {name} safely: {} (choose the object with --object, or give --addr)",
            unsafe_objects.join("; ")
        ));
    }
    for i in candidates {
        let Some(elf) = &objects[i].elf else { continue };
        let all = elf.lookup(&name);
        let mut found: Vec<&Symbol> = all
            .iter()
            .filter(|s| {
                s.name == name
                    && version
                        .as_ref()
                        .is_none_or(|v| s.version.as_ref() == Some(v))
            })
            .collect();
        // Without a version, as the dynamic linker: the default version.
        if version.is_none() && found.iter().any(|s| !s.hidden) {
            found.retain(|s| !s.hidden);
        }
        found.dedup_by_key(|s| s.value);
        match found.as_slice() {
            [] => {}
            [one] => hits.push((i, (*one).clone())),
            many => ambiguous_in.push(format!(
                "{} defines {} {} times: {}",
                objects[i].path,
                name,
                many.len(),
                many.iter()
                    .map(|s| format!("{} at {:#x}", s.full_name(), s.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    if !ambiguous_in.is_empty() {
        return Err(format!(
            "symbol {name} is ambiguous: {} (give NAME@VERSION, or --addr)",
            ambiguous_in.join("; ")
        ));
    }
    let (object_index, symbol) = match hits.len() {
        0 => {
            let searched = match object {
                Some(_) => "the object given",
                None => "any object the process maps",
            };
            let v = version.map(|v| format!(" version {v}")).unwrap_or_default();
            let unread: Vec<&str> = objects.iter().filter_map(|o| o.error.as_deref()).collect();
            let unread = if unread.is_empty() {
                String::new()
            } else {
                format!("; could not read: {}", unread.join("; "))
            };
            return Err(format!(
                "no code symbol {name}{v} in {searched} (.symtab or .dynsym){unread}"
            ));
        }
        1 => hits.pop().unwrap(),
        _ => {
            let all: Vec<String> = hits
                .iter()
                .map(|(i, s)| {
                    format!(
                        "{} ({} at {:#x})",
                        objects[*i].path,
                        s.full_name(),
                        s.value.wrapping_add(objects[*i].bias)
                    )
                })
                .collect();
            return Err(format!(
                "symbol {name} is defined by more than one object: {}; choose one with --object",
                all.join(", ")
            ));
        }
    };
    if symbol.size != 0 && offset >= symbol.size {
        return Err(format!(
            "{query}: offset {offset:#x} is past the end of {name} (size {:#x})",
            symbol.size
        ));
    }
    let o = &objects[object_index];
    let addr = symbol.value.wrapping_add(o.bias) + offset;
    if !o.mapping(addr).is_some_and(Mapping::executable) {
        return Err(format!(
            "{query} is at {addr:#x}, which no executable mapping of {} holds",
            o.path
        ));
    }
    Ok(Resolved {
        object: object_index,
        symbol,
        offset,
        addr,
    })
}

/// The object whose mapping holds `addr`, if any.
pub fn object_at(objects: &[Object], addr: u64) -> Option<usize> {
    objects.iter().position(|o| o.mapping(addr).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let text = "\
00400000-0041f000 r--p 00000000 fd:01 1311233                            /usr/bin/python3.11
7f0000200000-7f0000400000 r-xp 00200000 00:1f 5                          /tmp/a b/lib.so (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00022000-7ffd00024000 rw-p 00000000 00:00 0
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[0].start, m[0].end, m[0].offset, m[0].dev, m[0].inode),
            (0x400000, 0x41f000, 0, (0xfd, 1), 1311233)
        );
        assert_eq!(m[0].path, "/usr/bin/python3.11");
        assert!(m[1].executable() && m[1].file_backed());
        assert_eq!(m[1].path, "/tmp/a b/lib.so (deleted)");
        assert_eq!(m[1].file_offset(0x7f0000201000), 0x201000);
        assert!(!m[2].file_backed() && !m[3].file_backed());
        assert_eq!(m[3].path, "");
    }

    /// symbol_at over an index: a covering symbol wins over a nearer one
    /// that ends before the address (even one that starts later), the
    /// nearest before when none covers, the default-versioned then shortest
    /// of aliases, nothing below the first.
    #[test]
    fn symbol_at_by_index() {
        let sym = |name: &str, value: u64, size: u64, hidden: bool| Symbol {
            name: name.into(),
            version: None,
            hidden,
            value,
            size,
            ifunc: false,
            dynamic: true,
        };
        let idx = SymbolIndex::new(vec![
            sym("big", 0x1000, 0x1000, false),
            sym("inner", 0x1100, 0x10, false),
            sym("tail", 0x1800, 0x10, false),
            sym("alias_hidden", 0x3000, 0x20, true),
            sym("long_alias", 0x3000, 0x20, false),
            sym("al", 0x3000, 0x20, false),
        ]);
        let name = |v| idx.at(v).map(|s| s.name);
        assert_eq!(name(0xfff), None);
        assert_eq!(name(0x1105).as_deref(), Some("inner"));
        // A symbol's end is not in it.
        assert_eq!(name(0x1110).as_deref(), Some("big"));
        // `inner` and `tail` end before 0x1900: `big` covers it.
        assert_eq!(name(0x1900).as_deref(), Some("big"));
        assert_eq!(name(0x1805).as_deref(), Some("tail"));
        // Nothing covers 0x2800: the nearest before is `tail`.
        assert_eq!(name(0x2800).as_deref(), Some("tail"));
        assert_eq!(name(0x3010).as_deref(), Some("al"));
        assert_eq!(name(0x4000).as_deref(), Some("al"));
    }

    #[test]
    fn queries() {
        assert_eq!(
            parse_query("readline").unwrap(),
            ("readline".into(), None, 0)
        );
        assert_eq!(
            parse_query("readline+0x10").unwrap(),
            ("readline".into(), None, 16)
        );
        assert_eq!(
            parse_query("puts@@GLIBC_2.2.5+4").unwrap(),
            ("puts".into(), Some("GLIBC_2.2.5".into()), 4)
        );
        assert_eq!(
            parse_query("realpath@GLIBC_2.2.5").unwrap(),
            ("realpath".into(), Some("GLIBC_2.2.5".into()), 0)
        );
        assert!(parse_query("f+zz").is_err());
        assert!(parse_query("").is_err());
    }

    /// The bias from a PT_LOAD whose offset and vaddr are not page-aligned
    /// (a data segment), and from a PIE's first segment.
    #[test]
    fn bias_from_segments() {
        let loads = [
            Load {
                vaddr: 0,
                offset: 0,
                filesz: 0x7595ee0,
                exec: true,
            },
            Load {
                vaddr: 0x75974f0,
                offset: 0x75964f0,
                filesz: 0x5b1940,
                exec: false,
            },
        ];
        let text = Mapping {
            start: 0x7f0000000000,
            end: 0x7f0007596000,
            offset: 0,
            perms: "r-xp".into(),
            ..Default::default()
        };
        let data = Mapping {
            start: 0x7f0000000000 + 0x7597000,
            end: 0x7f0007b49000,
            offset: 0x7596000,
            perms: "rw-p".into(),
            ..Default::default()
        };
        assert_eq!(bias(&loads, &text), Some(0x7f0000000000));
        assert_eq!(bias(&loads, &data), Some(0x7f0000000000));
        assert_eq!(file_offset(&loads, 0x75974f0), Some(0x75964f0));
    }
}
