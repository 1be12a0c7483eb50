//! Where a wgmma operand's element lies in shared memory, from its matrix descriptor: the
//! canonical layouts of the PTX ISA ("Shared Memory Matrix Layout"), as CUTLASS's GMMA descriptors
//! spell them, in 16-byte units T:
//!
//! - K-major, no swizzle: `((8,m),(T,2)):((1T,SBO),(1,LBO))`;
//! - K-major, W-byte swizzle (W = 128, 64, 32): `((8,m),(T,2)):((W/16 T,SBO),(1,T))`;
//! - MN-major, no swizzle: `((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))`;
//! - MN-major, W-byte swizzle: `((T,W/16,m),(8,k)):((1,T,LBO),(W/16 T,SBO))`;
//!
//! the swizzle XORing address bits [4, 4 + log2(W/16)) with the bits 3 above them, on the shared
//! address itself (so a 128-byte swizzled tile written by TMA at a 1024-byte aligned address reads
//! back as written).

/// The descriptor's fields: start address, leading and stride byte offsets, swizzle width (bytes;
/// 0: none).
pub fn fields(desc: u64) -> Result<(usize, usize, usize, usize), String> {
    let start = ((desc & 0x3fff) << 4) as usize;
    let lbo = (((desc >> 16) & 0x3fff) << 4) as usize;
    let sbo = (((desc >> 32) & 0x3fff) << 4) as usize;
    if (desc >> 49) & 7 != 0 {
        return Err(format!("matrix descriptor {desc:#x} has a base offset (not simulated)"));
    }
    let width = match desc >> 62 {
        0 => 0,
        1 => 128,
        2 => 64,
        _ => 32,
    };
    Ok((start, lbo, sbo, width))
}

/// The swizzle of a shared address for a `width`-byte pattern.
pub fn swizzle(addr: usize, width: usize) -> usize {
    match width {
        0 => addr,
        w => {
            let bits = (w / 16).trailing_zeros();
            addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4)
        }
    }
}

/// The shared byte offset of element (`mn`, `k`) of a wgmma operand (row `mn` of A's M or B's N),
/// elements `bytes` wide; `mn_major`: the transposed (MN-major) layout.
pub fn element(desc: u64, mn: usize, k: usize, bytes: usize, mn_major: bool) -> Result<usize, String> {
    let (start, lbo, sbo, w) = fields(desc)?;
    let addr = if !mn_major {
        let kb = k * bytes;
        if w == 0 {
            start + (mn % 8) * 16 + (mn / 8) * sbo + kb % 16 + (kb / 16) * lbo
        } else {
            if kb >= w {
                return Err(format!("K byte {kb} past a {w}-byte swizzle row"));
            }
            start + (mn % 8) * w + (mn / 8) * sbo + kb
        }
    } else {
        let mb = mn * bytes;
        if w == 0 {
            start + mb % 16 + (mb / 16) * sbo + (k % 8) * 16 + (k / 8) * lbo
        } else {
            start + mb % w + (mb / w) * lbo + (k % 8) * w + (k / 8) * sbo
        }
    };
    Ok(swizzle(addr, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_k_major_128_byte_swizzled_tile_reads_rows_128_bytes_apart_with_chunks_permuted() {
        // Start 1024, LBO 16 (unused), SBO 1024, 128-byte swizzle: DeepGEMM's and ours.
        let desc = (1u64 << 62) | (64 << 32) | (1 << 16) | (1024 >> 4);
        // Row 0 is not permuted; row 1's 16-byte chunk 0 is its chunk 1; row 9 = group 1, row 1.
        assert_eq!(element(desc, 0, 0, 2, false).unwrap(), 1024);
        assert_eq!(element(desc, 0, 9, 2, false).unwrap(), 1024 + 18);
        assert_eq!(element(desc, 1, 0, 2, false).unwrap(), 1024 + 128 + 16);
        // Row 9, K 8 (byte 16: chunk 1), swizzled by row 1's bits: chunk 1 ^ 1 = 0.
        assert_eq!(element(desc, 9, 8, 2, false).unwrap(), 1024 + 1024 + 128);
        // Advancing the start by 32 bytes (the next K16 slice) moves within the swizzled row.
        let next = desc + 2;
        assert_eq!(element(next, 1, 0, 2, false).unwrap(), 1024 + 128 + (32 ^ 16));
    }

    #[test]
    fn an_mn_major_128_byte_swizzled_tile_reads_64_columns_a_row_and_k_rows_128_bytes_apart() {
        let desc = (1u64 << 62) | (64 << 32) | ((8192 >> 4) << 16) | (2048 >> 4);
        assert_eq!(element(desc, 5, 0, 2, true).unwrap(), 2048 + 10);
        assert_eq!(element(desc, 0, 1, 2, true).unwrap(), 2048 + 128 + 16);
        // Column 64 is the next 64-column block, LBO away; K 8 the next 8 rows, SBO away.
        assert_eq!(element(desc, 64, 0, 2, true).unwrap(), 2048 + 8192);
        assert_eq!(element(desc, 0, 8, 2, true).unwrap(), 2048 + 1024);
    }
}
