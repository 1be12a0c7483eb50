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
#[derive(Clone, Copy)]
pub struct GroupedWeight<'a> {
    pub routed: Stacked<'a>,
    pub routed_scale: &'a [f32],
    pub shared: Option<&'a [u8]>,
    pub shared_scale: Option<&'a [f32]>,
    pub rows: usize,
}

/// A stacked weight's bytes `[E, ...]`: whole, or each expert's apart (a checkpoint's tensors, one
/// an expert, as they lie in its mapped files).
#[derive(Clone, Copy)]
pub enum Stacked<'a> {
    Whole(&'a [u8]),
    Each(&'a [&'a [u8]]),
}

impl<'a> Stacked<'a> {
    /// Expert `index`'s `n` bytes, if it has them.
    pub fn expert(&self, index: usize, n: usize) -> Option<&'a [u8]> {
        match *self {
            Stacked::Whole(b) => b.get(index * n..(index + 1) * n),
            Stacked::Each(experts) => experts.get(index).copied().filter(|b| b.len() == n),
        }
    }
}

/// A grouped GEMM's B `[groups * n, K]` and its scales: group g (routed expert g, then the shared
/// experts one by one) holds each weight's rows for g in turn (gate then up for the MoE gate/up
/// GEMM). Weights of `element_bytes` per element: e4m3 in 128-row scale blocks, or unscaled (bf16:
/// empty scales). Where `spec` says a weight's shared experts lie side by side along K
/// ([`crate::lowering::GroupedWeightSpec::shared_columns`]: the down projection of several shared
/// experts, one MLP's `[rows, S * K]`), shared expert j is its columns `j * K..(j + 1) * K`.
pub fn grouped_b(
    spec: &GroupedSpec,
    k: usize,
    element_bytes: usize,
    weights: &[GroupedWeight],
) -> Result<(Vec<u8>, Vec<f32>), String> {
    let mut bits = Vec::new();
    let scales = grouped_pieces(spec, k, element_bytes, weights, &mut |piece| {
        bits.extend_from_slice(piece);
        Ok(())
    })?;
    Ok((bits, scales))
}

/// [`grouped_b`]'s B handed to `piece` in order, a weight's rows of one group at a time (each
/// source's bytes as they are, but for shared experts side by side along K), so that it can be
/// written where it goes without a host copy of the whole; its scales returned.
pub fn grouped_pieces(
    spec: &GroupedSpec,
    k: usize,
    element_bytes: usize,
    weights: &[GroupedWeight],
    piece: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<Vec<f32>, String> {
    let kb = k.div_ceil(128);
    let mut scales = Vec::new();
    for g in 0..spec.groups {
        for (i, w) in weights.iter().enumerate() {
            let scaled = !w.routed_scale.is_empty();
            if scaled && w.rows % 128 != 0 {
                return Err(format!("grouped weight {i}: {} rows per expert (not whole 128-row scale blocks)", w.rows));
            }
            let (n, blocks) = (w.rows * k * element_bytes, if scaled { w.rows / 128 * kb } else { 0 });
            let (b, s, index) = if g < spec.routed {
                (w.routed.expert(g, n), w.routed_scale.get(g * blocks..(g + 1) * blocks), g)
            } else {
                let (Some(s), Some(ss)) = (w.shared, w.shared_scale) else {
                    return Err(format!("grouped weight {i}: group {g} is a shared expert, and none is given"));
                };
                if spec.weights.get(i).is_some_and(|w| w.shared_columns) {
                    let shared = spec.groups - spec.routed;
                    let (b, sc) = shared_columns(s, ss, g - spec.routed, shared, w.rows, k, element_bytes)
                        .map_err(|e| format!("grouped weight {i}: {e}"))?;
                    piece(&b)?;
                    scales.extend(sc);
                    continue;
                }
                let j = g - spec.routed;
                (s.get(j * n..(j + 1) * n), ss.get(j * blocks..(j + 1) * blocks), j)
            };
            let (Some(b), Some(s)) = (b, s) else {
                return Err(format!("grouped weight {i}: expert {index} of group {g} is outside the weight"));
            };
            piece(b)?;
            scales.extend_from_slice(s);
        }
    }
    Ok(scales)
}

/// Shared expert `j` of `shared` lying side by side along K in `[rows, shared * k]` (elements of
/// `element_bytes`), with its scales out of `[rows / 128, shared * k / 128]` (none: unscaled): its
/// `[rows, k]` and `[rows / 128, k / 128]`.
fn shared_columns(
    bits: &[u8],
    scales: &[f32],
    j: usize,
    shared: usize,
    rows: usize,
    k: usize,
    element_bytes: usize,
) -> Result<(Vec<u8>, Vec<f32>), String> {
    let row = shared * k * element_bytes;
    if bits.len() != rows * row {
        return Err(format!("{} bytes of shared experts, not {rows} rows of {shared} x {k} columns", bits.len()));
    }
    let mut out = Vec::with_capacity(rows * k * element_bytes);
    for r in bits.chunks(row) {
        out.extend_from_slice(&r[j * k * element_bytes..(j + 1) * k * element_bytes]);
    }
    if scales.is_empty() {
        return Ok((out, Vec::new()));
    }
    if k % 128 != 0 {
        return Err(format!("the shared experts' {k} columns each are not whole 128-column scale blocks"));
    }
    let (kb, blocks) = (k / 128, shared * k / 128);
    if scales.len() != rows.div_ceil(128) * blocks {
        return Err(format!(
            "{} scales of shared experts, not {} row blocks of {blocks}",
            scales.len(),
            rows.div_ceil(128)
        ));
    }
    let picked = scales.chunks(blocks).flat_map(|b| b[j * kb..(j + 1) * kb].iter().copied()).collect();
    Ok((out, picked))
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
                routed: Stacked::Whole(&gate),
                routed_scale: &gate_s,
                shared: Some(&shared_gate),
                shared_scale: Some(&shared_gate_s),
                rows: 128,
            },
            GroupedWeight {
                routed: Stacked::Whole(&up),
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
        // The routed experts apart (as a checkpoint's tensors lie) give the same bytes; one of
        // the wrong size is named.
        let (gate_each, up_each): (Vec<&[u8]>, Vec<&[u8]>) = (gate.chunks(128).collect(), up.chunks(128).collect());
        let apart = [
            GroupedWeight { routed: Stacked::Each(&gate_each), ..weights[0] },
            GroupedWeight { routed: Stacked::Each(&up_each), ..weights[1] },
        ];
        assert_eq!(grouped_b(&spec, 1, 1, &apart).unwrap(), (bits, scales));
        let short: Vec<&[u8]> = vec![&gate[..128], &gate[128..200]];
        let short = [GroupedWeight { routed: Stacked::Each(&short), ..weights[0] }, weights[1]];
        assert!(grouped_b(&spec, 1, 1, &short).unwrap_err().contains("expert 1 of group 1 is outside the weight"));
        let bad = GroupedWeight {
            routed: Stacked::Whole(&gate),
            routed_scale: &gate_s,
            shared: None,
            shared_scale: None,
            rows: 128,
        };
        assert!(grouped_b(&spec, 1, 1, &[bad]).unwrap_err().contains("group 2 is a shared expert"));
    }

    /// Two shared experts' down projection, one MLP's `[rows, 2 * K]`: each is its half of every
    /// row's columns, and of every row block's scales (K 256: two scale blocks an expert).
    #[test]
    fn shared_experts_side_by_side_along_k_are_their_columns() {
        let (rows, k) = (128, 256);
        let spec = GroupedSpec {
            grouping: "contiguous".into(),
            groups: 3,
            routed: 1,
            offsets: 1,
            perm: 2,
            row_scale: None,
            scatter: true,
            weights: vec![crate::lowering::GroupedWeightSpec {
                routed: 0,
                routed_scale: None,
                shared: None,
                shared_scale: None,
                rows,
                shared_columns: true,
            }],
        };
        // Byte (r, c) of the shared [rows, 2K]: c / K names the expert, c % K / 128 the block.
        let shared: Vec<u8> = (0..rows * 2 * k).map(|i| (i % (2 * k) / 128) as u8 + 100).collect();
        let shared_s = [1.0f32, 2.0, 3.0, 4.0];
        let routed = vec![7u8; rows * k];
        let w = GroupedWeight {
            routed: Stacked::Whole(&routed),
            routed_scale: &[9.0, 9.0],
            shared: Some(&shared),
            shared_scale: Some(&shared_s),
            rows,
        };
        let (bits, scales) = grouped_b(&spec, k, 1, &[w]).unwrap();
        let expert = |g: usize| &bits[g * rows * k..(g + 1) * rows * k];
        assert!(expert(0).iter().all(|&b| b == 7));
        for (g, want) in [(1, [100u8, 101]), (2, [102, 103])] {
            let blocks: Vec<u8> = expert(g).chunks(128).map(|c| c[0]).collect();
            assert_eq!(blocks, want.repeat(rows), "shared expert {}", g - 1);
        }
        assert_eq!(scales, vec![9.0, 9.0, 1.0, 2.0, 3.0, 4.0]);
        // Scales can only be split where each expert's columns are whole blocks.
        let narrow = [0u8; 128 * 2 * 64];
        let odd = GroupedWeight { shared: Some(&narrow), shared_scale: Some(&[1.0]), ..w };
        let err = grouped_b(
            &spec,
            64,
            1,
            &[GroupedWeight { routed: Stacked::Whole(&routed[..128 * 64]), routed_scale: &[1.0], ..odd }],
        );
        assert!(err.unwrap_err().contains("64 columns each are not whole 128-column scale blocks"));
    }
}
