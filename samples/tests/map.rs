//! `hugepoke map` on the host, against this test process's own text
//! (no module needed: the patch table is said to be unreadable, or empty).

use std::process::Command;

fn map(pid: u32, addr: u64, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hugepoke"))
        .args([
            "map",
            "--pid",
            &pid.to_string(),
            "--addr",
            &format!("{addr:#x}"),
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[inline(never)]
fn here() -> u64 {
    std::hint::black_box(here as fn() -> u64 as usize as u64)
}

#[test]
fn maps_our_own_text_page() {
    let addr = here(); // run, so its page is mapped
    let (code, out, err) = map(std::process::id(), addr, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let start = addr & !0x1f_ffff;
    assert_eq!(m["start"], start);
    assert_eq!(m["cells"].as_array().unwrap().len(), 512);
    let cell = &m["cells"][((addr - start) / 4096) as usize];
    assert_eq!(cell["addr"], addr & !0xfff);
    // Our text is file-backed and was just run: mapped, by a PTE or a PMD.
    assert!(
        cell["kind"] == "page_cache" || cell["kind"] == "pmd",
        "{cell}"
    );
    assert!(
        m["vma"]["perms"].as_str().unwrap().contains('x'),
        "{}",
        m["vma"]
    );
    let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(m["vma"]["path"], exe.to_str().unwrap());
    let total: u64 = ["pmd", "page_cache", "anon", "swapped", "none"]
        .iter()
        .map(|k| m["counts"][k].as_u64().unwrap())
        .sum();
    assert_eq!(total, 512);

    // Piped: plain text, 16 rows, the summary last; and the SVG file.
    let svg = std::env::temp_dir().join(format!("hugepoke-map-test-{}.svg", std::process::id()));
    let (code, out, err) = map(std::process::id(), addr, &["--svg", svg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains('\x1b'), "colour when piped");
    assert_eq!(out.lines().filter(|l| l.starts_with("+0x")).count(), 16);
    assert_eq!(
        out.lines().last().unwrap(),
        format!("summary: {}", m["summary"].as_str().unwrap())
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    std::fs::remove_file(&svg).unwrap();
    assert!(text.starts_with("<svg ") && text.trim_end().ends_with("</svg>"));
}

#[test]
fn a_process_that_is_not_there_exits_1() {
    let (code, _, err) = map(999_999_999, 0x400000, &[]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("hugepoke: map: pid 999999999 at 0x400000: "),
        "{err}"
    );
}
