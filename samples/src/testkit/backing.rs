//! Backings for text: filesystems made and mounted in the guest (ext4 and
//! XFS images on loop devices, tmpfs with a `huge=` policy), and the text
//! blob written onto them in a chosen write size — which, with the mapping's
//! advice, decides the page-cache folio size (Documentation/filesystems.md).

use crate::proc::{KpageFlags, Pagemap};
use crate::testkit::target::Target;
use crate::testkit::text;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

fn io<T>(r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mounted(dir: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(dir)))
}

/// A fresh `fs` (ext4 or xfs) on a loop device over a sparse image in /tmp,
/// mounted once per guest run; its mount point.
pub fn image(fs: &str) -> Result<String, String> {
    let dir = format!("/tmp/hugepoke-{fs}");
    if mounted(&dir) {
        return Ok(dir);
    }
    let img = format!("/tmp/hugepoke-{fs}.img");
    // XFS refuses filesystems under 300 MB.
    io(io(std::fs::File::create(&img))?.set_len(512 << 20))?;
    match fs {
        "ext4" => sh("mkfs.ext4", &["-q", "-F", &img])?,
        "xfs" => sh("mkfs.xfs", &["-q", "-f", &img])?,
        _ => return Err(format!("no image recipe for {fs}")),
    };
    let dev = sh("losetup", &["-f", "--show", &img])?.trim().to_string();
    io(std::fs::create_dir_all(&dir))?;
    if let Err(e) = sh("mount", &["-t", fs, &dev, &dir]) {
        let _ = sh("losetup", &["-d", &dev]);
        return Err(e);
    }
    Ok(dir)
}

/// A tmpfs mounted with `huge=HUGE`, once per guest run; its mount point.
pub fn tmpfs(huge: &str) -> Result<String, String> {
    let dir = format!("/tmp/hugepoke-tmpfs-{huge}");
    if !mounted(&dir) {
        io(std::fs::create_dir_all(&dir))?;
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("huge={huge},size=64M"),
                "hugepoke-tmpfs",
                &dir,
            ],
        )?;
    }
    Ok(dir)
}

/// Write the text blob to `dir/text.bin` in `chunk`-byte writes (the write
/// size picks the page-cache folio size on tmpfs `within_size`, and on
/// ext4/XFS), then, if `evict`, sync it and drop it from the page cache, so
/// that the target's first fault reads it in afresh (with MADV_HUGEPAGE:
/// PMD-order readahead).
pub fn write_text(dir: &str, chunk: usize, evict: bool) -> Result<String, String> {
    let path = format!("{dir}/text.bin");
    let _ = std::fs::remove_file(&path);
    compact_memory();
    let f = io(std::fs::File::create(&path))?;
    let blob = text::blob();
    for off in (0..blob.len()).step_by(chunk) {
        io(f.write_all_at(&blob[off..off + chunk], off as u64))?;
    }
    if evict {
        io(f.sync_all())?;
        // SAFETY: fadvise on our own open file.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(
            r == 0,
            "posix_fadvise(DONTNEED): {}",
            std::io::Error::from_raw_os_error(r)
        );
    }
    Ok(path)
}

/// The folio order of the page-cache page behind text page `page` (mapped
/// by the caller), from the compound head/tail bits of it and its
/// neighbours in /proc/kpageflags.
pub fn folio_order(t: &mut Target, page: usize) -> Result<u32, String> {
    let pm = io(Pagemap::open(t.pid))?;
    let kpf = io(KpageFlags::open())?;
    let pfn_of = |t: &mut Target, p: usize| -> Result<u64, String> {
        t.call(p)?;
        let e = io(pm.entry(t.page_addr(p)))?;
        ensure!(
            e.present() && e.file(),
            "page {p} not mapped from the page cache: {e:?}"
        );
        Ok(e.pfn())
    };
    let pfn = pfn_of(t, page)?;
    let f = io(kpf.get(pfn))?;
    if !f.compound_head() && !f.compound_tail() {
        return Ok(0);
    }
    // Walk back to the head, then forward to the end of the folio.
    let mut first = page;
    while io(kpf.get(pfn_of(t, first)?))?.compound_tail() {
        ensure!(first > 0, "page 0 is a compound tail");
        first -= 1;
    }
    let head = pfn_of(t, first)?;
    let mut n = 1;
    while first + n < text::PAGES
        && pfn_of(t, first + n)? == head + n as u64
        && io(kpf.get(head + n as u64))?.compound_tail()
    {
        n += 1;
    }
    ensure!(n.is_power_of_two(), "folio at page {first} has {n} pages");
    Ok(n.trailing_zeros())
}

/// Compact memory, so that a PMD-sized folio can be had late in a long run
/// in a small guest (a fragmented guest falls back to small folios, and a
/// test of the PMD path would fail for a reason not its own).  Best effort.
pub fn compact_memory() {
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
}

/// A swap device on a loop device over a file in /tmp, for one test (or one
/// model run).
pub struct Swap {
    dev: String,
    img: String,
}

impl Swap {
    pub fn on() -> Result<Self, String> {
        let img = "/tmp/hugepoke-swap.img".to_string();
        io(std::fs::write(&img, vec![0u8; 32 << 20]))?;
        let out = sh("losetup", &["-f", "--show", &img])?;
        let dev = out.trim().to_string();
        sh("mkswap", &[&dev])?;
        sh("swapon", &[&dev])?;
        Ok(Self { dev, img })
    }

    pub fn used_kb(&self) -> Result<u64, String> {
        let swaps = io(std::fs::read_to_string("/proc/swaps"))?;
        swaps
            .lines()
            .find(|l| l.starts_with(&self.dev))
            .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            .ok_or(format!("{} not in /proc/swaps:\n{swaps}", self.dev))
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = sh("swapoff", &[&self.dev]);
        let _ = sh("losetup", &["-d", &self.dev]);
        let _ = std::fs::remove_file(&self.img);
    }
}
