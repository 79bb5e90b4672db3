//! What it takes to get a text THP, asked of the kernel: for each backing
//! (tmpfs `huge=always`, `within_size` and `never`; ext4; XFS), each write
//! size of the file, with and without dropping the file from the page
//! cache before the first fault, and with MADV_HUGEPAGE or MADV_NOHUGEPAGE
//! on the mapping, start a `thp-target` on it and report how much of its
//! text is PMD-mapped (smaps) and the folio order behind its first page
//! (pagemap + kpageflags).  Prints the Markdown table in
//! Documentation/filesystems.md.
//!
//!   thp-backings        (as root in a guest: scripts/guest -- thp-backings)

use hugepoke::proc;
use hugepoke::testkit::backing::{folio_order, image, tmpfs, write_text};
use hugepoke::testkit::target::Target;

fn main() -> Result<(), String> {
    let backings = [
        ("tmpfs `huge=always`", tmpfs("always")?),
        ("tmpfs `huge=within_size`", tmpfs("within_size")?),
        ("tmpfs `huge=never`", tmpfs("never")?),
        ("ext4", image("ext4")?),
        ("XFS", image("xfs")?),
    ];
    println!("| backing | write size | page cache dropped first | advice | PMD-mapped | folio order of page 0 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, dir) in &backings {
        for chunk in [2 << 20, 64 << 10, 4 << 10] {
            for evict in [true, false] {
                for huge in [true, false] {
                    let path = write_text(dir, chunk, evict)?;
                    let mut args = vec!["--file", path.as_str()];
                    if !huge {
                        args.push("--no-huge");
                    }
                    let mut t = Target::spawn(&args)?;
                    let pmd = proc::smaps_entry(t.pid, t.addr)
                        .map_err(|e| e.to_string())?
                        .pmd_mapped_kb();
                    let order = folio_order(&mut t, 0)?;
                    println!(
                        "| {name} | {} KiB | {} | {} | {pmd} kB | {order} |",
                        chunk >> 10,
                        if evict { "yes" } else { "no" },
                        if huge {
                            "MADV_HUGEPAGE"
                        } else {
                            "MADV_NOHUGEPAGE"
                        },
                    );
                }
            }
        }
    }
    Ok(())
}
