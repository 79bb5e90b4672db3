//! The text that THP targets execute: a 2 MiB blob of tiny functions, one at
//! the start of every 4 KiB page, so that each page's code is observable.

pub const THP_SIZE: usize = 2 << 20;
pub const PAGE: usize = 4096;
pub const PAGES: usize = THP_SIZE / PAGE;

/// What the function at the start of page `page` returns, unpatched.
pub fn original_value(page: usize) -> u32 {
    1000 + page as u32
}

/// What the stress test patches page `page` to return.
pub fn stress_value(page: usize) -> u32 {
    5000 + page as u32
}

/// `mov eax, imm32; ret` — six bytes of x86-64.
pub fn mov_eax_ret(value: u32) -> [u8; 6] {
    let v = value.to_le_bytes();
    [0xb8, v[0], v[1], v[2], v[3], 0xc3]
}

/// The whole blob: each page starts with its function, the rest is `int3`.
pub fn blob() -> Vec<u8> {
    let mut b = vec![0xcc; THP_SIZE];
    for page in 0..PAGES {
        b[page * PAGE..page * PAGE + 6].copy_from_slice(&mov_eax_ret(original_value(page)));
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_layout() {
        let b = blob();
        assert_eq!(b.len(), THP_SIZE);
        assert_eq!(&b[0..6], &[0xb8, 0xe8, 0x03, 0, 0, 0xc3]);
        assert_eq!(&b[5 * PAGE..5 * PAGE + 6], &mov_eax_ret(1005));
        assert_eq!(b[6], 0xcc);
        assert_eq!(b[THP_SIZE - 1], 0xcc);
    }
}
