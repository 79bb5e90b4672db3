//! `include/uapi/hugepoke.h` against `src/uapi.rs`: the C header is
//! compiled with the host's `cc`, and every struct's size and every field's
//! offset and signedness must be the Rust struct's; the ioctl numbers and
//! constants too.

use hugepoke::uapi::*;
use std::mem::{offset_of, size_of};
use std::process::Command;

/// 1 for a signed integer field, 0 for an unsigned one or an array.
trait Sign {
    const SIGNED: u64;
}
macro_rules! sign {
    ($($t:ty => $v:literal),*) => { $(impl Sign for $t { const SIGNED: u64 = $v; })* };
}
sign!(i8 => 1, i16 => 1, i32 => 1, i64 => 1, u8 => 0, u16 => 0, u32 => 0, u64 => 0);
impl<T, const N: usize> Sign for [T; N] {
    const SIGNED: u64 = 0;
}

/// The signedness of the field `field` picks out.
fn sign_of<R, T: Sign>(_field: fn(&R) -> &T) -> u64 {
    T::SIGNED
}

/// (C expression, Rust value): what the compiled header must print.
fn expected() -> Vec<(&'static str, u64)> {
    macro_rules! layout {
        ($c:literal, $r:ty; $($cf:ident => $rf:ident),* $(,)?) => {{
            let mut v = vec![(concat!("sizeof(struct ", $c, ")"), size_of::<$r>() as u64)];
            $(v.push((concat!("offsetof(struct ", $c, ", ", stringify!($cf), ")"), offset_of!($r, $rf) as u64));)*
            // Signedness too (an array field is neither: _Generic sees a pointer).
            $(v.push((
                concat!("_Generic(((struct ", $c, " *)0)->", stringify!($cf), ", __s8: 1, __s16: 1, __s32: 1, __s64: 1, default: 0)"),
                sign_of(|x: &$r| &x.$rf),
            ));)*
            v
        }};
    }
    let mut v = Vec::new();
    v.extend(
        layout!("hugepoke_patch", PatchArgs; size => size, flags => flags, pid => pid, len => len,
        addr => addr, bytes => bytes, expect => expect, handle => handle),
    );
    v.extend(
        layout!("hugepoke_batch_site", BatchSite; addr => addr, len => len, flags => flags,
        bytes => bytes, expect => expect),
    );
    v.extend(
        layout!("hugepoke_patch_batch", PatchBatchArgs; size => size, flags => flags, pid => pid,
        count => count, sites => sites, handle => handle, failed => failed, error => error),
    );
    v.extend(
        layout!("hugepoke_restore", RestoreArgs; size => size, flags => flags, handle => handle),
    );
    v.extend(layout!("hugepoke_query", QueryArgs; size => size, flags => flags, handle => handle,
        state => state, pid => pid, addr => addr, len => len, patch_flags => patch_flags, pfn => pfn,
        orig => orig, bytes => bytes, index => index, count => count, site => site, reserved => reserved));
    v.extend(
        layout!("hugepoke_collapse", CollapseArgs; size => size, flags => flags, pid => pid,
        result => result, addr => addr, dropped => dropped, kept_differs => kept_differs,
        kept_pinned => kept_pinned, kept_uffd => kept_uffd, kept_patched => kept_patched,
        kept_no_cache => kept_no_cache, first_kept => first_kept),
    );
    v.extend(
        layout!("hugepoke_patch_file", PatchFileArgs; size => size, flags => flags, fd => fd,
        count => count, sites => sites, pids => pids, max_pids => max_pids, nr_pids => nr_pids,
        handle => handle, failed => failed, error => error, failed_pid => failed_pid,
        reserved => reserved),
    );
    v.extend([
        ("HUGEPOKE_IOCTL_PATCH", IOCTL_PATCH as u64),
        ("HUGEPOKE_IOCTL_PATCH_FILE", IOCTL_PATCH_FILE as u64),
        ("HUGEPOKE_FILE_DRY_RUN", FILE_DRY_RUN as u64),
        ("HUGEPOKE_MAX_FILE_PROCESSES", MAX_FILE_PROCESSES as u64),
        ("HUGEPOKE_QUERY_FORKED", QUERY_FORKED as u64),
        ("HUGEPOKE_IOCTL_COLLAPSE", IOCTL_COLLAPSE as u64),
        ("HUGEPOKE_COLLAPSE_INSTALL_PMD", COLLAPSE_INSTALL_PMD as u64),
        ("HUGEPOKE_COLLAPSE_DONE", COLLAPSE_DONE as u64),
        ("HUGEPOKE_COLLAPSE_AT_FAULT", COLLAPSE_AT_FAULT as u64),
        ("HUGEPOKE_COLLAPSE_COPIES_KEPT", COLLAPSE_COPIES_KEPT as u64),
        (
            "HUGEPOKE_COLLAPSE_SMALL_FOLIOS",
            COLLAPSE_SMALL_FOLIOS as u64,
        ),
        ("HUGEPOKE_COLLAPSE_REFUSED", COLLAPSE_REFUSED as u64),
        ("HUGEPOKE_IOCTL_RESTORE", IOCTL_RESTORE as u64),
        ("HUGEPOKE_IOCTL_QUERY", IOCTL_QUERY as u64),
        ("HUGEPOKE_IOCTL_PATCH_BATCH", IOCTL_PATCH_BATCH as u64),
        ("HUGEPOKE_ABI_VERSION", ABI_VERSION as u64),
        ("HUGEPOKE_MAX_BYTES", MAX_BYTES as u64),
        ("HUGEPOKE_MAX_BATCH", MAX_BATCH as u64),
        ("HUGEPOKE_MAX_TARGET_SITES", MAX_TARGET_SITES as u64),
        ("HUGEPOKE_NO_SITE", NO_SITE as u64),
        ("HUGEPOKE_PATCH_PERSIST", PATCH_PERSIST as u64),
        ("HUGEPOKE_PATCH_EXPECT", PATCH_EXPECT as u64),
        ("HUGEPOKE_PATCH_INSTALL_PMD", PATCH_INSTALL_PMD as u64),
        ("HUGEPOKE_PATCH_OVER_CHANGED", PATCH_OVER_CHANGED as u64),
        ("HUGEPOKE_RESTORE_DROP", RESTORE_DROP as u64),
        ("HUGEPOKE_STATE_LIVE", STATE_LIVE as u64),
        ("HUGEPOKE_STATE_GONE", STATE_GONE as u64),
    ]);
    v
}

#[test]
fn c_header_matches_the_rust_abi() {
    let want = expected();
    let dir = std::env::temp_dir().join(format!("hugepoke-uapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"hugepoke.h\"\nint main(void)\n{\n",
    );
    for (expr, _) in &want {
        c += &format!("\tprintf(\"%llu\\n\", (unsigned long long)({expr}));\n");
    }
    c += "\treturn 0;\n}\n";
    std::fs::write(dir.join("layout.c"), c).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../include/uapi");
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(dir.join("layout"))
        .arg(dir.join("layout.c"))
        .output()
        .expect("cc runs");
    assert!(
        cc.status.success(),
        "the header does not compile: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(dir.join("layout"))
        .output()
        .expect("the layout program runs");
    let got: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(got.len(), want.len());
    let wrong: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|((_, r), c)| r != *c)
        .map(|((expr, r), c)| format!("{expr}: C {c}, Rust {r}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "include/uapi/hugepoke.h differs from src/uapi.rs: {wrong:#?}"
    );
}
