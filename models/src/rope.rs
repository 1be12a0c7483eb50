//! RoPE frequencies, YaRN scaling and the attention softmax scale, exactly as Hugging Face
//! transformers computes them for DeepSeek-V3 (`_compute_yarn_parameters`, `yarn_apply_mscale`).
//!
//! Shared by the reference interpreter and the kernels' constant tables, so that every backend
//! rotates with the same numbers.

use crate::config::{ModelConfig, RopeConfig};

/// `mscale(s, m) = 0.1 m ln(s) + 1` (1 when s <= 1).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Inverse frequencies for `dim` rotary dims (`dim / 2` values), f32 as transformers computes them.
pub fn inv_freq(rope: &RopeConfig, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let base = rope.theta;
    // transformers: base ** (arange(0, dim, 2) / dim) in float32.
    let pos_freq: Vec<f32> = (0..half).map(|i| (base as f32).powf((2 * i) as f32 / dim as f32)).collect();
    let Some(y) = &rope.yarn else {
        return pos_freq.iter().map(|p| 1.0 / p).collect();
    };
    let correction_dim = |rotations: f64| {
        (dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    (0..half)
        .map(|i| {
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            let extrapolation = 1.0 / pos_freq[i];
            let interpolation = 1.0 / (y.factor as f32 * pos_freq[i]);
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

/// The factor cos/sin are multiplied by (transformers' `attention_scaling`); 1 without YaRN.
pub fn attention_factor(rope: &RopeConfig) -> f32 {
    let Some(y) = &rope.yarn else { return 1.0 };
    if let Some(a) = y.attention_factor {
        return a as f32;
    }
    match (y.mscale, y.mscale_all_dim) {
        (Some(m), Some(a)) => (yarn_mscale(y.factor, m) / yarn_mscale(y.factor, a)) as f32,
        _ => yarn_mscale(y.factor, 1.0) as f32,
    }
}

/// Softmax scale of MLA: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2` under YaRN
/// when `mscale_all_dim` is set (0.1352338 for the full model).
pub fn softmax_scale(config: &ModelConfig) -> f32 {
    let base = (config.qk_head_dim() as f64).powf(-0.5);
    let scale = match &config.rope.yarn {
        Some(y) => match y.mscale_all_dim {
            Some(m) => {
                let s = yarn_mscale(y.factor, m);
                base * s * s
            }
            None => base,
        },
        None => base,
    };
    scale as f32
}

/// cos and sin of the rotation angles of one position: `half` values each, including the
/// attention factor.
pub fn cos_sin(inv_freq: &[f32], attention_factor: f32, position: i64) -> (Vec<f32>, Vec<f32>) {
    inv_freq
        .iter()
        .map(|f| {
            // transformers: position (float32) * inv_freq (float32), then cos/sin in float32.
            let angle = (position as f32 * f) as f64;
            ((angle.cos() as f32) * attention_factor, (angle.sin() as f32) * attention_factor)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_model_scale_and_correction_range() {
        let c = ModelConfig::preset("deepseek-v3").unwrap();
        assert!((softmax_scale(&c) - 0.1352338).abs() < 1e-6, "{}", softmax_scale(&c));
        assert_eq!(attention_factor(&c.rope), 1.0);
        let f = inv_freq(&c.rope, 64);
        // Below low = 10: pure extrapolation (theta^(-2i/d)); above high = 23: divided by factor 40.
        let plain = |i: usize| 1.0 / (10000f32).powf(2.0 * i as f32 / 64.0);
        assert_eq!(f[0], plain(0));
        assert_eq!(f[10], plain(10));
        assert!((f[23] / (plain(23) / 40.0) - 1.0).abs() < 1e-6);
        assert!(f[15] < plain(15) && f[15] > plain(15) / 40.0);
    }

    #[test]
    fn plain_rope_has_unit_factor() {
        let rope = RopeConfig { theta: 10000.0, interleave: true, yarn: None };
        assert_eq!(attention_factor(&rope), 1.0);
        assert_eq!(inv_freq(&rope, 4), vec![1.0, 0.01]);
    }
}
