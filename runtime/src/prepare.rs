//! Host-side preparation of the buffers a GPU artifact's lowering derives from the checkpoint
//! (`crate::lowering`), done once at load before the upload: the RoPE cos/sin table, and a grouped
//! GEMM's B operand laid out per expert. (Dense GEMMs over several weights read them concatenated
//! along N: their rows one after the other, as stored.)

use crate::lowering::{GroupedSpec, RopeTableSpec};

/// Rows `0..positions` of the RoPE table: `[cos | sin]`, `dim / 2` each, exactly as the reference
/// computes them (`v3c_models::rope::cos_sin`).
pub fn rope_table(spec: &RopeTableSpec, positions: usize) -> Vec<f32> {
    let mut table = Vec::with_capacity(positions * spec.dim);
    for p in 0..positions {
        let (cos, sin) = v3c_models::rope::cos_sin(&spec.inv_freq, spec.attention_factor, p as i64);
        table.extend(cos);
        table.extend(sin);
    }
    table
}

/// One weight of a grouped GEMM as stored: the routed experts' e4m3 `[E, rows, K]` with their
/// 128x128 scales `[E, rows / 128, ceil(K / 128)]`, and the shared experts' `[S * rows, K]` with
/// theirs `[S * rows / 128, ceil(K / 128)]`.
pub struct GroupedWeight<'a> {
    pub routed: &'a [u8],
    pub routed_scale: &'a [f32],
    pub shared: Option<&'a [u8]>,
    pub shared_scale: Option<&'a [f32]>,
    pub rows: usize,
}

/// A grouped GEMM's B `[groups * n, K]` and its scales: group g (routed expert g, then the shared
/// experts one by one) holds each weight's rows for g in turn (gate then up for the MoE gate/up
/// GEMM). Weights of `element_bytes` per element: e4m3 in 128-row scale blocks, or unscaled (bf16:
/// empty scales).
pub fn grouped_b(
    spec: &GroupedSpec,
    k: usize,
    element_bytes: usize,
    weights: &[GroupedWeight],
) -> Result<(Vec<u8>, Vec<f32>), String> {
    let kb = k.div_ceil(128);
    let (mut bits, mut scales) = (Vec::new(), Vec::new());
    for g in 0..spec.groups {
        for (i, w) in weights.iter().enumerate() {
            let scaled = !w.routed_scale.is_empty();
            if scaled && w.rows % 128 != 0 {
                return Err(format!("grouped weight {i}: {} rows per expert (not whole 128-row scale blocks)", w.rows));
            }
            let (src, src_scale, index) = if g < spec.routed {
                (w.routed, w.routed_scale, g)
            } else {
                let (Some(s), Some(ss)) = (w.shared, w.shared_scale) else {
                    return Err(format!("grouped weight {i}: group {g} is a shared expert, and none is given"));
                };
                (s, ss, g - spec.routed)
            };
            let (n, blocks) = (w.rows * k * element_bytes, if scaled { w.rows / 128 * kb } else { 0 });
            let (b, s) = (src.get(index * n..(index + 1) * n), src_scale.get(index * blocks..(index + 1) * blocks));
            let (Some(b), Some(s)) = (b, s) else {
                return Err(format!("grouped weight {i}: expert {index} of group {g} is outside the weight"));
            };
            bits.extend_from_slice(b);
            scales.extend_from_slice(s);
        }
    }
    Ok((bits, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rope_table_is_cos_then_sin_per_position() {
        let spec = RopeTableSpec { dim: 4, inv_freq: vec![1.0, 0.5], attention_factor: 2.0 };
        let t = rope_table(&spec, 3);
        assert_eq!(t.len(), 12);
        assert_eq!(&t[..4], &[2.0, 2.0, 0.0, 0.0]);
        assert!((t[8] - 2.0 * 2f64.cos() as f32).abs() < 1e-6 && (t[11] - 2.0 * 1f64.sin() as f32).abs() < 1e-6);
    }

    #[test]
    fn groups_hold_each_weights_rows_in_turn() {
        // 2 routed experts + 1 shared, two weights of 128 rows, K 1 (one scale block per 128 rows).
        let spec = GroupedSpec {
            grouping: "gather".into(),
            groups: 3,
            routed: 2,
            offsets: 2,
            perm: 3,
            row_scale: None,
            scatter: false,
            weights: Vec::new(),
        };
        let routed = |tag: u8| -> Vec<u8> { (0..256).map(|r| tag + (r / 128) as u8).collect() };
        let (gate, up, shared_gate, shared_up) = (routed(10), routed(20), vec![30u8; 128], vec![40u8; 128]);
        let (gate_s, up_s, shared_gate_s, shared_up_s) = ([1.0f32, 2.0], [5.0f32, 6.0], [3.0f32], [7.0f32]);
        let weights = [
            GroupedWeight {
                routed: &gate,
                routed_scale: &gate_s,
                shared: Some(&shared_gate),
                shared_scale: Some(&shared_gate_s),
                rows: 128,
            },
            GroupedWeight {
                routed: &up,
                routed_scale: &up_s,
                shared: Some(&shared_up),
                shared_scale: Some(&shared_up_s),
                rows: 128,
            },
        ];
        let (bits, scales) = grouped_b(&spec, 1, 1, &weights).unwrap();
        let firsts: Vec<u8> = bits.chunks(128).map(|c| c[0]).collect();
        assert_eq!(firsts, vec![10, 20, 11, 21, 30, 40], "expert 0 gate|up, expert 1 gate|up, shared gate|up");
        assert_eq!(scales, vec![1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
        let bad = GroupedWeight { routed: &gate, routed_scale: &gate_s, shared: None, shared_scale: None, rows: 128 };
        assert!(grouped_b(&spec, 1, 1, &[bad]).unwrap_err().contains("group 2 is a shared expert"));
    }
}
