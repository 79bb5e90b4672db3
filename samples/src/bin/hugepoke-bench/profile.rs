//! Where a single call's time goes (issue 22, item 2): `perf script -F
//! ip,sym` output of the "single calls on a copied page" phase, recorded
//! in the guest by `scripts/profile-calls`, read back into a table of the
//! samples under PATCH, RESTORE and a `/proc/PID/mem` write: what each
//! calls directly, and where the samples land.

use std::collections::HashMap;

/// One sample's call chain, innermost frame first, names demangled.
type Chain = Vec<String>;

/// The calls measured, each by a frame every one of its samples holds.
const ROOTS: &[(&str, &str)] = &[
    ("PATCH (ioctl)", "engine::patch::patch"),
    ("RESTORE (ioctl)", "engine::settle::restore_handle"),
    ("/proc/PID/mem write (pwrite)", "__x64_sys_pwrite64"),
];

/// A symbol as people read it: Rust's demangled (`rustc-demangle`),
/// without its hash and without the module's crate name, which every one
/// of ours has (`module::engine::patch::patch` → `engine::patch::patch`).
pub fn demangle(sym: &str) -> String {
    let name = format!("{:#}", rustc_demangle::demangle(sym));
    name.replace("module::", "")
}

/// The samples of `perf script -F ip,sym`: blocks of `ADDR SYMBOL` lines.
pub fn parse(text: &str) -> Vec<Chain> {
    text.split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1).map(demangle))
                .collect::<Chain>()
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// Counts, largest first, as `| name | share |` rows (at most `top`).
fn rows(counts: HashMap<String, usize>, total: usize, top: usize) -> String {
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.iter()
        .take(top)
        .map(|(name, n)| format!("| `{name}` | {:.0} % |\n", 100.0 * *n as f64 / total as f64))
        .collect()
}

/// The Markdown tables: per measured call, its direct callees and the
/// functions its samples land in.
pub fn markdown(chains: &[Chain], made_by: &str) -> String {
    let mut out = format!("{made_by}\n");
    for (label, root) in ROOTS {
        let mine: Vec<&Chain> = chains
            .iter()
            .filter(|c| c.iter().any(|f| f.ends_with(root)))
            .collect();
        let (mut callees, mut leaves) = (HashMap::new(), HashMap::new());
        for c in &mine {
            let at = c.iter().rposition(|f| f.ends_with(root)).unwrap();
            let callee = match at {
                0 => "(the function itself)".to_string(),
                _ => c[at - 1].clone(),
            };
            *callees.entry(callee).or_insert(0) += 1;
            *leaves.entry(c[0].clone()).or_insert(0) += 1;
        }
        out.push_str(&format!(
            "\n{label}: {} samples.\n\n| calls directly (`{root}`) | share |\n| --- | --- |\n",
            mine.len()
        ));
        if mine.is_empty() {
            continue;
        }
        out.push_str(&rows(callees, mine.len(), 12));
        out.push_str("\n| where the samples land | share |\n| --- | --- |\n");
        out.push_str(&rows(leaves, mine.len(), 12));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_the_modules_v0_names() {
        assert_eq!(
            demangle("_RNvNtNtCscSvpXRc1Ko3_6module6engine5patch5patch"),
            "engine::patch::patch"
        );
        assert_eq!(
            demangle("_RNvNtNtCscSvpXRc1Ko3_6module6engine6settle14restore_handle"),
            "engine::settle::restore_handle"
        );
        assert_eq!(
            demangle("_RNvMs2_NtCscSvpXRc1Ko3_6module7patchesINtB5_7PatchesINtNtNtCs1EKtwoKEMO2_6kernel4sync4aref4ARefNtNtNtBV_2fs4file4FileEE6forgetB7_"),
            "<patches::Patches<kernel::sync::aref::ARef<kernel::fs::file::File>>>::forget"
        );
        assert_eq!(demangle("find_vma"), "find_vma");
    }

    #[test]
    fn callees_and_leaves_of_each_call() {
        let text = "\
\tffffffff81000001 mt_find
\tffffffff81000002 find_vma
\tffffffffa0000003 _RNvNtNtCscSvpXRc1Ko3_6module6engine6settle14restore_handle
\tffffffff81000004 __x64_sys_ioctl

\tffffffffa0000003 _RNvNtNtCscSvpXRc1Ko3_6module6engine6settle14restore_handle
\tffffffff81000004 __x64_sys_ioctl

\tffffffff81000005 _copy_from_user
\tffffffff81000006 __x64_sys_pwrite64
";
        let md = markdown(&parse(text), "made by a test");
        assert!(md.starts_with("made by a test\n"), "{md}");
        assert!(md.contains("PATCH (ioctl): 0 samples."), "{md}");
        assert!(md.contains("RESTORE (ioctl): 2 samples."), "{md}");
        assert!(
            md.contains("| `(the function itself)` | 50 % |\n| `find_vma` | 50 % |"),
            "{md}"
        );
        assert!(
            md.contains("| `engine::settle::restore_handle` | 50 % |\n| `mt_find` | 50 % |"),
            "{md}"
        );
        assert!(
            md.contains("/proc/PID/mem write (pwrite): 1 samples."),
            "{md}"
        );
        assert!(md.contains("| `_copy_from_user` | 100 % |"), "{md}");
    }
}
