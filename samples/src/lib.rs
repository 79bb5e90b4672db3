//! Userspace side of hugepoke: what the CLI, the THP text target and the
//! in-guest tests share.  Everything that observes the kernel's own
//! accounting (smaps, pagemap, kpageflags, debugfs) lives in `proc`.

pub mod backing;
pub mod check_state;
pub mod collapse;
pub mod decode;
pub mod device;
pub mod map;
pub mod proc;
pub mod report;
pub mod sites;
pub mod svg;
pub mod symbols;
pub mod target;
pub mod text;
// The kernel side owns src/uapi.rs and its formatting: `cargo fmt` here leaves it alone.
#[rustfmt::skip]
#[path = "../../src/uapi.rs"]
pub mod uapi;

pub mod thp {
    //! 2 MiB-aligned mappings of THP text, for the targets and the tests.
    use crate::text::THP_SIZE;
    use std::io;
    use std::os::fd::AsRawFd;

    /// Reserve a 2 MiB-aligned, `THP_SIZE` window of address space
    /// (PROT_NONE); the caller maps or moves something over it with
    /// MAP_FIXED / MREMAP_FIXED.
    pub fn reserve_window() -> io::Result<usize> {
        // SAFETY: a fresh PROT_NONE reservation of our own, trimmed to the
        // aligned window inside it.
        unsafe {
            let reserve = libc::mmap(
                std::ptr::null_mut(),
                2 * THP_SIZE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if reserve == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let aligned = (reserve as usize + THP_SIZE - 1) & !(THP_SIZE - 1);
            let head = aligned - reserve as usize;
            if head > 0 {
                libc::munmap(reserve, head);
            }
            let tail = THP_SIZE - head;
            if tail > 0 {
                libc::munmap((aligned + THP_SIZE) as *mut libc::c_void, tail);
            }
            Ok(aligned)
        }
    }

    /// Map `file` 2 MiB-aligned, read+exec, private, with MADV_HUGEPAGE, so
    /// that its first fault maps the page-cache THP by a PMD.
    pub fn map_text(file: &std::fs::File) -> io::Result<usize> {
        map_text_at(file, None)
    }

    /// [`map_text`] at a chosen 2 MiB-aligned address (`MAP_FIXED_NOREPLACE`:
    /// fails rather than replace a mapping), or anywhere if `None`.
    pub fn map_text_at(file: &std::fs::File, at: Option<usize>) -> io::Result<usize> {
        map_text_with(file, at, true)
    }

    /// [`map_text_at`], advised MADV_HUGEPAGE if `huge`, else
    /// MADV_NOHUGEPAGE: then neither a fault nor khugepaged builds a
    /// PMD-sized folio there (a tmpfs `huge=` mount would let khugepaged
    /// collapse it even without advice), so small page-cache folios stay small.
    pub fn map_text_with(file: &std::fs::File, at: Option<usize>, huge: bool) -> io::Result<usize> {
        let (at, fixed) = match at {
            Some(at) if at % THP_SIZE == 0 => (at, libc::MAP_FIXED_NOREPLACE),
            Some(_) => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            None => (reserve_window()?, libc::MAP_FIXED),
        };
        // SAFETY: maps over our own reservation, or where nothing is mapped.
        unsafe {
            let p = libc::mmap(
                at as *mut libc::c_void,
                THP_SIZE,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | fixed,
                file.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED
                || p as usize != at
                || libc::madvise(
                    p,
                    THP_SIZE,
                    if huge {
                        libc::MADV_HUGEPAGE
                    } else {
                        libc::MADV_NOHUGEPAGE
                    },
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(at)
    }
}

/// Parse an address or number given as `0x…` hex or decimal.
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parse bytes written as hex, with optional spaces: `"b8 2a 00 00 00 c3"`.
pub fn parse_hex_bytes(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.is_empty() || digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// Errno name for an OS error, as the CLI prints it.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ERANGE => "ERANGE",
        libc::EILSEQ => "EILSEQ",
        libc::ENODATA => "ENODATA",
        libc::ENXIO => "ENXIO",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "E?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_hex_and_decimal() {
        assert_eq!(parse_number("0x7f0000200000"), Some(0x7f00_0020_0000));
        assert_eq!(parse_number("4096"), Some(4096));
        assert_eq!(parse_number("0xzz"), None);
        assert_eq!(parse_number(""), None);
    }

    #[test]
    fn hex_bytes() {
        assert_eq!(
            parse_hex_bytes("b82a000000c3"),
            Some(vec![0xb8, 0x2a, 0, 0, 0, 0xc3])
        );
        assert_eq!(parse_hex_bytes("b8 2a 00"), Some(vec![0xb8, 0x2a, 0]));
        assert_eq!(parse_hex_bytes("b8 2"), None);
        assert_eq!(parse_hex_bytes("xx"), None);
        assert_eq!(parse_hex_bytes(""), None);
    }

    #[test]
    fn abi_header_check() {
        use crate::uapi::{check_header, PATCH_FLAGS};
        assert_eq!(check_header(64, PATCH_FLAGS, 64, PATCH_FLAGS), Ok(()));
        assert_eq!(
            check_header(60, 0, 64, PATCH_FLAGS),
            Err("unknown struct size")
        );
        assert_eq!(
            check_header(64, 1 << 7, 64, PATCH_FLAGS),
            Err("unknown flag bits")
        );
        assert_eq!(check_header(16, 1, 16, 0), Err("unknown flag bits"));
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ENOTTY), "ENOTTY");
        assert_eq!(errno_name(libc::EACCES), "EACCES");
        assert_eq!(errno_name(9999), "E?");
    }
}
