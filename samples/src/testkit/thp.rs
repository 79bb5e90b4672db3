//! 2 MiB-aligned mappings of THP text, for the targets and the tests.
use crate::testkit::text::THP_SIZE;
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
