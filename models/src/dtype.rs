//! Element types and the exact conversions between them: bf16 and fp8 e4m3 (`float8_e4m3fn`) to and
//! from f32, rounding to nearest-even as PyTorch does.
//!
//! e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN; the largest
//! finite value is 448; subnormals down to 2^-9. Conversion from f32 saturates nothing: values beyond
//! 448 round to NaN like torch's `.to(torch.float8_e4m3fn)` (callers scale first: 128x128 weight
//! blocks, [`crate::init::quantize_weight`]; 1x128 activation tiles).

use std::fmt;

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    BF16,
    /// `float8_e4m3fn`
    F8E4M3,
    I32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
            DType::F8E4M3 => 1,
            DType::I64 => 8,
        }
    }

    /// The MLIR spelling of the element type.
    pub fn mlir_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8E4M3FN",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F8E4M3)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::I32 => "i32",
            DType::I64 => "i64",
        })
    }
}

/// bf16 bits -> f32 (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN.
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    ((bits.wrapping_add(rounding)) >> 16) as u16
}

/// Rounds an f32 to the nearest bf16 value (as f32).
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// The largest finite e4m3fn value.
pub const F8E4M3_MAX: f32 = 448.0;

/// e4m3fn bits -> f32 (exact).
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    f8_all_values()[bits as usize]
}

/// The value of e4m3fn bits, computed.
fn f8e4m3_value(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((bits >> 3) & 0x0f) as i32;
    let man = (bits & 0x07) as f32;
    if exp == 0x0f && bits & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * (2.0f32).powi(-9)
    } else {
        sign * (1.0 + man / 8.0) * (2.0f32).powi(exp - 7)
    }
}

/// f32 -> e4m3fn bits, round to nearest even. |x| >= 464 (the midpoint past the largest finite
/// value) becomes NaN, as in PyTorch; NaN stays NaN. By the bits: subnormals (below 2^-6) as the
/// nearest multiple of 2^-9, normals with the exponent rebased and the mantissa rounded from 23
/// bits to 3 (a carry moves into the exponent; [448, 464) stays 448).
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= 464.0 {
        return sign | 0x7f;
    }
    if a < 0.015625 {
        // 0..=8 steps of 2^-9 (8: the least normal, 2^-6).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // f32 exponent 121..=135 (2^-6 ..= 2^8) becomes e4m3's 1..=15.
    let rebased = a.to_bits() - (120 << 23);
    let (keep, rest) = (rebased >> 20, rebased & 0xf_ffff);
    let up = rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1);
    sign | (keep + u32::from(up)).min(0x7e) as u8
}

/// Every e4m3fn code's value.
fn f8_all_values() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| f8e4m3_value(i as u8)))
}

/// Rounds an f32 to the nearest e4m3fn value (as f32).
pub fn round_f8e4m3(x: f32) -> f32 {
    f8e4m3_to_f32(f32_to_f8e4m3(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bf16_round_trip_and_rounding() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        assert_eq!(bf16_to_f32(f32_to_bf16(-3.5)), -3.5);
        // 1 + 2^-8 is exactly between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_bf16(1.0 + (2.0f32).powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * (2.0f32).powi(-8)), 1.0 + (2.0f32).powi(-6));
        assert!(round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn every_f8_value_round_trips() {
        for bits in 0u8..=255 {
            let v = f8e4m3_to_f32(bits);
            if v.is_nan() {
                assert!(bits & 0x7f == 0x7f);
                continue;
            }
            let back = f32_to_f8e4m3(v);
            // +0 / -0 both fine.
            assert_eq!(f8e4m3_to_f32(back), v, "bits {bits:#04x} value {v}");
        }
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), (2.0f32).powi(-9));
    }

    #[test]
    fn f8_rounding_ties_to_even_and_overflow_is_nan() {
        // Between 1.0 (man 0) and 1.125 (man 1): 1.0625 ties to even -> 1.0.
        assert_eq!(round_f8e4m3(1.0625), 1.0);
        // Between 1.125 and 1.25: 1.1875 ties to even -> 1.25.
        assert_eq!(round_f8e4m3(1.1875), 1.25);
        assert_eq!(round_f8e4m3(450.0), 448.0);
        assert!(round_f8e4m3(470.0).is_nan());
        assert_eq!(round_f8e4m3(-0.3), -0.3125);
        assert_eq!(round_f8e4m3((2.0f32).powi(-10)), 0.0);
    }

    /// The encoding by the bits equals a search of the value table (the nearest value, ties to the
    /// even code, [448, 464) to 448) on every f32 near a code boundary — each midpoint between
    /// consecutive values and its neighbours ulps away — on a sweep of f32 bit patterns up to 464,
    /// on both signs, and on the special values.
    #[test]
    fn f8_encoding_by_bits_equals_the_nearest_value_search() {
        let values: Vec<f32> = (0u8..=0x7e).map(f8e4m3_to_f32).collect();
        let search = |x: f32| -> u8 {
            if x.is_nan() {
                return 0x7f;
            }
            let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
            let a = x.abs();
            if a >= 464.0 {
                return sign | 0x7f;
            }
            let hi = values.partition_point(|&v| v < a).min(0x7e);
            if hi == 0 {
                return sign;
            }
            let lo = hi - 1;
            let (dlo, dhi) = (a - values[lo], values[hi] - a);
            sign | if dlo < dhi || (dlo == dhi && lo % 2 == 0) { lo } else { hi } as u8
        };
        let mut probes: Vec<f32> = vec![0.0, 448.0, 456.0, 463.99, 464.0, 1e30, f32::INFINITY, f32::NAN, 1e-40, 2e-3];
        for w in values.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            for ulps in -2i32..=2 {
                probes.push(f32::from_bits((mid.to_bits() as i32 + ulps) as u32));
            }
            probes.extend([w[0], w[1]]);
        }
        probes.extend((0..0x43e8_0000u32).step_by(7919).map(f32::from_bits));
        let mut checked = 0;
        for &p in &probes {
            for x in [p, -p] {
                assert_eq!(f32_to_f8e4m3(x), search(x), "{x:e} ({:#010x})", x.to_bits());
                checked += 1;
            }
        }
        assert!(checked > 280_000, "{checked}");
    }

    proptest! {
        #[test]
        fn f8_rounding_picks_a_nearest_representable(x in -448.0f32..448.0) {
            let r = round_f8e4m3(x);
            // No representable value is strictly closer.
            let best = (0u8..=255).map(f8e4m3_to_f32).filter(|v| !v.is_nan())
                .map(|v| (v - x).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(((r - x).abs() - best).abs() <= best * 1e-6 + 1e-12, "x {} r {} best {}", x, r, best);
        }
    }
}
