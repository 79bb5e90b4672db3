//! Userspace side of hugepoke: what the CLI, the THP text target and the
//! in-guest tests share.  Everything that observes the kernel's own
//! accounting (smaps, pagemap, kpageflags, debugfs) lives in `proc`.
//! [`testkit`] holds the fixtures that only the tests, the bench, the
//! stress and fuzz tools and thp-target use; every other module is the
//! product.

pub mod collapse;
pub mod decode;
pub mod device;
pub mod map;
pub mod proc;
pub mod report;
pub mod sites;
pub mod svg;
pub mod symbols;
pub mod testkit;
// The kernel side owns src/uapi.rs and its formatting: `cargo fmt` here leaves it alone.
#[rustfmt::skip]
#[path = "../../src/uapi.rs"]
pub mod uapi;


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
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
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
        libc::EIO => "EIO",
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
        libc::ENOSPC => "ENOSPC",
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
