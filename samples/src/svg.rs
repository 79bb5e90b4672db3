//! What the hand-written SVG pictures share (`hugepoke-bench`'s chart,
//! `hugepoke map --svg`): a few dozen lines of SVG text cost less to build
//! and to audit than a plotting crate and its dependencies.

use std::fmt::Write;

/// `s` escaped for XML text and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The opening `<svg>` element, `width` x `height`, on a white background;
/// close it with `</svg>`.
pub fn open(width: f64, height: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::escape(r#"a<b & "c">"#),
            "a&lt;b &amp; &quot;c&quot;&gt;"
        );
    }
}
