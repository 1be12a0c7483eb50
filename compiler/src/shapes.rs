//! Run-time shapes of kernel results: each dynamic dim of a kernel function's results as a rule over
//! its input sizes ([`DimRule`]), derived from the `v3` ops of the kernel. Target-independent: the
//! CPU backend allocates outputs with it, and the plan sizes buffers with it.
//!
//! Rules: a concatenation along a dynamic axis sums its operands' sizes; an embedding has as many
//! rows as ids; a training op's result follows the operand it is the gradient of (a matmul's the
//! rows of `a'` and columns of `b'`); any other dynamic result dim follows the first operand with a
//! dynamic dim at the same position (rows of activations, batch of caches).

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};

use crate::verify::Shape;

pub use v3c_runtime::plan::DimRule;

/// Per result of `kernel` (a kernel function), per dim, its rule.
pub fn kernel_shape_rules(kernel: &OperationRef) -> Result<Vec<Vec<DimRule>>, String> {
    kernel_shapes(kernel).map(|(rules, _)| rules)
}

/// Classes of `(input, dim)` of a kernel's inputs ([`kernel_shapes`]).
pub type EqualDims = Vec<Vec<(usize, usize)>>;

/// In one pass over `kernel`: its results' rules ([`kernel_shape_rules`]), and the dynamic dims of
/// its inputs that its ops read as one size, in classes of `(input, dim)` (each sorted, of two or
/// more, the classes in order of their first member): the rows of a norm's input and of RoPE's
/// positions, of the MoE routing's input and its expert ids, a concatenation's operands off its
/// axis, ... ([`dim_relations`]). A launch whose buffers differ there would have the kernel index
/// one past the other's end.
pub fn kernel_shapes(kernel: &OperationRef) -> Result<(Vec<Vec<DimRule>>, EqualDims), String> {
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or("kernel without a body")?;
    let mut rules: HashMap<usize, Vec<DimRule>> = HashMap::new();
    // Union-find over input dims: each dim's representative.
    let mut parent: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
    let shape_of = |t: melior::ir::Type| Shape::of(t).ok_or_else(|| format!("{t} is not a ranked tensor"));
    for i in 0..block.argument_count() {
        let arg = block.argument(i).map_err(|e| e.to_string())?;
        let shape = shape_of(arg.r#type())?;
        let r = shape
            .dims
            .iter()
            .enumerate()
            .map(|(d, n)| n.map_or(DimRule::Input { input: i, dim: d }, DimRule::Const))
            .collect();
        rules.insert(arg.to_raw().ptr as usize, r);
    }
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        let operand_rules: Vec<Vec<DimRule>> = (0..o.operand_count())
            .map(|i| o.operand(i).ok().and_then(|v| rules.get(&(v.to_raw().ptr as usize)).cloned()).unwrap_or_default())
            .collect();
        if name == "func.return" {
            return Ok((operand_rules, classes(&parent)));
        }
        let transposes = |key: &str| o.attribute(key).ok().and_then(crate::mlir::bool_value).unwrap_or(false);
        let matmul_t = (transposes("transpose_a"), transposes("transpose_b"));
        let axis = o.attribute("axis").ok().and_then(crate::mlir::int_value).and_then(|a| usize::try_from(a).ok());
        let concat_axis = axis.filter(|_| name == "v3.concat");
        let mut result_rules: Vec<Vec<DimRule>> = Vec::new();
        for r in 0..o.result_count() {
            let result = o.result(r).map_err(|e| e.to_string())?;
            let shape = shape_of(result.r#type())?;
            let dims = shape
                .dims
                .iter()
                .enumerate()
                .map(|(d, n)| match (n, follows(&name, r, d, matmul_t)) {
                    (Some(n), _) => Ok(DimRule::Const(*n)),
                    (None, _) if concat_axis == Some(d) => {
                        Ok(DimRule::Sum(Box::new(operand_rules[0][d].clone()), Box::new(operand_rules[1][d].clone())))
                    }
                    (None, _) if name == "v3.embed" => Ok(operand_rules[1][0].clone()),
                    (None, Some((k, dim))) => operand_rules
                        .get(k)
                        .and_then(|rule| rule.get(dim))
                        .cloned()
                        .ok_or_else(|| format!("{name}: operand {k} has no dim {dim}")),
                    (None, None) => operand_rules
                        .iter()
                        .find_map(|r| r.get(d).filter(|x| !matches!(x, DimRule::Const(_))).cloned())
                        .ok_or_else(|| format!("{name}: no rule for dynamic result dim {d}")),
                })
                .collect::<Result<Vec<_>, String>>()?;
            rules.insert(result.to_raw().ptr as usize, dims.clone());
            result_rules.push(dims);
        }
        let ranks = |rules: &[Vec<DimRule>]| rules.iter().map(Vec::len).collect::<Vec<_>>();
        for (a, b) in dim_relations(&name, &ranks(&operand_rules), &ranks(&result_rules), matmul_t, axis) {
            let rule = |(slot, d): Slot| match slot {
                Side::Operand(k) => operand_rules.get(k).and_then(|r| r.get(d)),
                Side::Result(k) => result_rules.get(k).and_then(|r| r.get(d)),
            };
            if let (Some(DimRule::Input { input: i, dim: d }), Some(DimRule::Input { input: j, dim: e })) =
                (rule(a), rule(b))
            {
                let (x, y) = (find(&mut parent, (*i, *d)), find(&mut parent, (*j, *e)));
                if x != y {
                    parent.insert(x.max(y), x.min(y));
                }
            }
        }
    }
    Err("kernel without a return".into())
}

/// An operand or a result of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Operand(usize),
    Result(usize),
}

/// A dim of an operand or result.
type Slot = (Side, usize);

/// The representative of input dim `x`.
fn find(parent: &mut HashMap<(usize, usize), (usize, usize)>, x: (usize, usize)) -> (usize, usize) {
    let mut root = x;
    while let Some(&p) = parent.get(&root) {
        root = p;
    }
    // Path halving is not worth it at a kernel's handful of ops; point `x` at the root.
    if root != x {
        parent.insert(x, root);
    }
    root
}

/// The classes of the union-find `parent`, sorted.
fn classes(parent: &HashMap<(usize, usize), (usize, usize)>) -> Vec<Vec<(usize, usize)>> {
    let mut parent = parent.clone();
    let mut by_root: std::collections::BTreeMap<(usize, usize), Vec<(usize, usize)>> = Default::default();
    let members: Vec<(usize, usize)> = parent.keys().copied().collect();
    for m in members {
        let root = find(&mut parent, m);
        by_root.entry(root).or_insert_with(|| vec![root]).push(m);
    }
    by_root
        .into_values()
        .map(|mut c| {
            c.sort_unstable();
            c.dedup();
            c
        })
        .collect()
}

/// The dims of an op's operands and results that must be one size, as the op's semantics (and
/// its CPU lowering, which indexes one by the other) take them; `ranks` of its operands and
/// results, the matmul's transposes and the op's `axis`. Only what every use of the op satisfies:
/// prefill attention's latent has the cached rows too, so only its queries' rows are related.
fn dim_relations(
    name: &str,
    operands: &[usize],
    results: &[usize],
    (ta, tb): (bool, bool),
    axis: Option<usize>,
) -> Vec<(Slot, Slot)> {
    use Side::{Operand as O, Result as R};
    let mut rel: Vec<(Slot, Slot)> = Vec::new();
    // Every dim of `a` and `b` (of one rank).
    let whole = |rel: &mut Vec<(Slot, Slot)>, a: Side, b: Side, rank: usize| {
        rel.extend((0..rank).map(|d| ((a, d), (b, d))));
    };
    // Every dim but `axis` of each of `sides` and the first.
    let off_axis = |rel: &mut Vec<(Slot, Slot)>, sides: &[Side], rank: usize, axis: usize| {
        for &s in &sides[1..] {
            rel.extend((0..rank).filter(|&d| d != axis).map(|d| ((sides[0], d), (s, d))));
        }
    };
    // Dim 0 (rows) of each two of `sides` (every pair: a static one among them links none).
    let rows = |rel: &mut Vec<(Slot, Slot)>, sides: &[Side]| {
        for (i, &a) in sides.iter().enumerate() {
            rel.extend(sides[i + 1..].iter().map(|&b| ((a, 0), (b, 0))));
        }
    };
    let op = |k: usize| operands.get(k).copied().unwrap_or(0);
    let kind = name.strip_prefix("v3.").unwrap_or(name);
    match kind {
        // Elementwise: one shape.
        "add" | "silu_mul" => {
            whole(&mut rel, O(0), O(1), op(0));
            whole(&mut rel, O(0), R(0), op(0));
        }
        "rms_norm" | "layer_norm" => whole(&mut rel, O(0), R(0), op(0)),
        // (q, w, keys[, positions]) -> selected: a query per row; decode's keys and positions
        // are its sequence's too (prefill's keys have the cached rows as well).
        "sparse_index" if operands.len() == 4 => rows(&mut rel, &[O(0), O(1), O(2), O(3), R(0)]),
        "sparse_index" => rows(&mut rel, &[O(0), O(1), R(0)]),
        // (latent, selected) -> (rows, last): a query per row; a 3-D latent is the queries' own.
        "gather_rows" if op(0) == 3 => rows(&mut rel, &[O(0), O(1), R(0), R(1)]),
        "gather_rows" => rows(&mut rel, &[O(1), R(0), R(1)]),
        // (x, positions): a position per row.
        "rope" | "rope_grad" => {
            whole(&mut rel, O(0), R(0), op(0));
            rows(&mut rel, &[O(0), O(1)]);
        }
        // (x, [x_scale,] w, [w_scale]): the result has x's leading dims.
        "linear" => rel.extend((0..op(0).saturating_sub(1)).map(|d| ((O(0), d), (R(0), d)))),
        "fp8_linear" | "fp8_linear_dgrad" | "lm_head" | "cross_entropy_grad" => rows(&mut rel, &[O(0), R(0)]),
        "fp8_linear_wgrad" | "cross_entropy" | "embed_grad" => rows(&mut rel, &[O(0), O(1)]),
        "embed" => rows(&mut rel, &[O(1), R(0)]),
        "matmul" => {
            let (ta, tb) = (usize::from(ta), usize::from(tb));
            rel.push(((O(0), 1 - ta), (O(1), tb)));
            rel.push(((R(0), 0), (O(0), ta)));
            rel.push(((R(0), 1), (O(1), 1 - tb)));
        }
        "concat" => {
            let sides: Vec<Side> = (0..operands.len()).map(O).chain([R(0)]).collect();
            if let Some(axis) = axis {
                off_axis(&mut rel, &sides, op(0), axis);
            }
        }
        "split" => {
            let sides: Vec<Side> = [O(0)].into_iter().chain((0..results.len()).map(R)).collect();
            if let Some(axis) = axis {
                off_axis(&mut rel, &sides, op(0), axis);
            }
        }
        // (d concat, a, b) -> (d a, d b); (d a, d b, ...) -> d concat: each gradient shaped like
        // what it is the gradient of, the pieces one size off the axis.
        "concat_grad" => {
            for r in 0..results.len() {
                whole(&mut rel, R(r), O(r + 1), op(r + 1));
            }
            let sides: Vec<Side> = (0..operands.len()).map(O).collect();
            if let Some(axis) = axis {
                off_axis(&mut rel, &sides, op(0), axis);
            }
        }
        "split_grad" => whole(&mut rel, O(0), R(0), op(0)),
        // Rows kept: [T, a*b] <-> [T, a, b].
        "reshape" if op(0) > 0 && results.first().is_some_and(|&r| r > 0) => rows(&mut rel, &[O(0), R(0)]),
        // (cache [B, S, C], entries [B, C], positions [B]) -> the cache.
        "cache_write" => {
            whole(&mut rel, O(0), R(0), op(0));
            rows(&mut rel, &[O(0), O(1), O(2)]);
        }
        // Prefill (q_nope, q_pe, latent, kv_b): the latent has the cached rows as well, so only
        // the queries' rows; decode (q_nope, q_pe, cache, positions, kv_b): a sequence per row.
        "attention" => rows(&mut rel, &[O(0), O(1), R(0)]),
        "attention_decode" => rows(&mut rel, &[O(0), O(1), O(2), O(3), R(0)]),
        // (q_nope, q_pe, latent, kv_b, dy) -> their gradients; dy like the output (q_nope's).
        "attention_grad" => {
            for r in 0..results.len() {
                whole(&mut rel, R(r), O(r), op(r));
            }
            whole(&mut rel, O(4), O(0), op(0));
        }
        // (x, w, dy) -> (dx, dw); (gate, up, dy) -> (d gate, d up).
        "rms_norm_grad" | "silu_mul_grad" => {
            whole(&mut rel, O(2), O(0), op(0));
            if kind == "silu_mul_grad" {
                whole(&mut rel, O(1), O(0), op(0));
            }
            for r in 0..results.len() {
                whole(&mut rel, R(r), O(r), op(r));
            }
        }
        // Routing, the grouped expert GEMMs and the balance loss: every operand and result with
        // rows is a token's (x, its scales, expert ids, routing weights, residual, gradients).
        "moe_route" | "moe_dispatch" | "moe_gate_up" | "moe_down" | "moe_experts" | "moe_experts_grad"
        | "route_logits_grad" | "balance_loss" | "balance_loss_grad" => {
            let sides: Vec<Side> = (0..operands.len()).map(O).chain((0..results.len()).map(R)).collect();
            rows(&mut rel, &sides);
        }
        _ => {}
    }
    rel
}

/// The operand and dim that dim `d` of result `r` of a training op copies: a gradient is shaped
/// like what it is the gradient of; `a' @ b'` has the rows of `a'` and the columns of `b'`.
fn follows(name: &str, r: usize, d: usize, (ta, tb): (bool, bool)) -> Option<(usize, usize)> {
    match name {
        "v3.matmul" => Some(match d {
            0 => (0, usize::from(ta)),
            _ => (1, usize::from(!tb)),
        }),
        _ => shaped_like(name, r).map(|k| (k, d)),
    }
}

/// The operand result `r` of a training op is shaped like (the value it is the gradient of); the
/// rows a query selected (`gather_rows`) are its selection's.
pub fn shaped_like(name: &str, r: usize) -> Option<usize> {
    match name {
        "v3.gather_rows" => Some(1),
        "v3.rms_norm_grad" | "v3.silu_mul_grad" | "v3.attention_grad" => Some(r),
        "v3.concat_grad" => Some(r + 1),
        // (dx, d weights) of (x, indices, weights, ...); the stacked weight gradients are static.
        "v3.moe_experts_grad" => [0, 2].get(r).copied(),
        _ => None,
    }
}

/// Whether `kernel` works row by row ([`v3c_runtime::plan::Launch::row_wise`]): its ops are all
/// norms, projections and heads (their weights static), elementwise ops and per-row (1 x group)
/// quantization, and its inputs and results are dynamic in their leading dim alone (the rows),
/// every result so. Any other op (attention, RoPE's positions, routing, a reshape or a split, a
/// product of two activations) makes it not row-wise.
pub fn kernel_row_wise(kernel: &OperationRef) -> bool {
    let Some(block) = kernel.region(0).ok().and_then(|r| r.first_block()) else { return false };
    let shape = |t: melior::ir::Type| Shape::of(t);
    let rows_only = |t: melior::ir::Type| {
        shape(t).is_some_and(|s| !s.dims.is_empty() && s.dims.iter().skip(1).all(Option::is_some))
    };
    let rows_led = |t: melior::ir::Type| shape(t).is_some_and(|s| s.dims.first() == Some(&None));
    let fixed = |t: melior::ir::Type| shape(t).is_some_and(|s| s.dims.iter().all(Option::is_some));
    if !(0..block.argument_count()).all(|i| block.argument(i).is_ok_and(|a| rows_only(a.r#type()))) {
        return false;
    }
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        let operands: Vec<_> = (0..o.operand_count()).filter_map(|k| o.operand(k).ok()).collect();
        if name == "func.return" {
            return !operands.is_empty() && operands.iter().all(|v| rows_only(v.r#type()) && rows_led(v.r#type()));
        }
        // The operands that are rows (the rest: weights, which must be static).
        let rows = match name.as_str() {
            "v3.rms_norm" | "v3.lm_head" | "v3.quantize_fp8" => 1,
            "v3.add" | "v3.silu_mul" => 2,
            // [x, x_scale?, w, w_scale?]
            "v3.linear" => {
                let segments = o.attribute("operandSegmentSizes").map(|a| a.to_string()).unwrap_or_default();
                let x_scale = segments.split(':').nth(1).and_then(|s| s.split(',').nth(1)).map(|s| s.trim());
                if x_scale == Some("1") {
                    2
                } else {
                    1
                }
            }
            _ => return false,
        };
        if operands.len() < rows || !operands[rows..].iter().all(|v| fixed(v.r#type())) {
            return false;
        }
    }
    false
}

/// For each result of `kernel`: the input it updates in place, if any. A `cache_write` result whose
/// cache is a kernel argument is that argument's buffer with one row per sequence written: the plan
/// binds both to the same buffer (decode caches are never copied).
pub fn kernel_in_place(kernel: &OperationRef) -> Vec<Option<usize>> {
    let Some(block) = kernel.region(0).ok().and_then(|r| r.first_block()) else { return Vec::new() };
    let args: Vec<usize> =
        (0..block.argument_count()).filter_map(|i| block.argument(i).ok().map(|a| a.to_raw().ptr as usize)).collect();
    let mut updates: HashMap<usize, usize> = HashMap::new();
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        if name == "v3.cache_write" {
            if let (Ok(cache), Ok(result)) = (o.operand(0), o.result(0)) {
                if let Some(j) = args.iter().position(|&a| a == cache.to_raw().ptr as usize) {
                    updates.insert(result.to_raw().ptr as usize, j);
                }
            }
        }
        if name == "func.return" {
            return (0..o.operand_count())
                .map(|k| o.operand(k).ok().and_then(|v| updates.get(&(v.to_raw().ptr as usize)).copied()))
                .collect();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use melior::ir::block::BlockLike;

    /// `of` each function of `text` (kernels in the `v3` dialect), by name.
    fn each_kernel<T>(text: &str, of: impl Fn(&OperationRef) -> T) -> Vec<(String, T)> {
        let context = crate::mlir::new_context();
        v3c_dialects::load(&context).unwrap();
        let module = crate::mlir::parse_module(&context, text, "kernels.mlir").unwrap();
        let mut found = Vec::new();
        let mut f = module.body().first_operation();
        while let Some(func) = f {
            let name = func.attribute("sym_name").map(crate::mlir::attribute_text).unwrap();
            found.push((name, of(&func)));
            f = func.next_in_block();
        }
        found
    }

    /// The input equalities of each function of `text`, by name.
    fn equalities(text: &str) -> Vec<(String, Vec<Vec<(usize, usize)>>)> {
        each_kernel(text, |func| kernel_shapes(func).unwrap().1)
    }

    #[test]
    fn inputs_read_as_one_size_are_found_through_the_kernels_ops() {
        let text = r#"
  func.func private @q_rope(%x: tensor<?x48xf32>, %w: tensor<48xbf16>, %p: tensor<?xi64>) -> tensor<?x48xf32> {
    %0 = "v3.rms_norm"(%x, %w) {eps = 1.0e-06 : f32} : (tensor<?x48xf32>, tensor<48xbf16>) -> tensor<?x48xf32>
    %1 = "v3.rope"(%0, %p) {attention_factor = 1.0 : f32, dim = 48 : i64, interleave = true, inv_freq = array<f32: 1.0>, theta = 1.0e+04 : f64} : (tensor<?x48xf32>, tensor<?xi64>) -> tensor<?x48xf32>
    return %1 : tensor<?x48xf32>
  }
  func.func private @residual(%x: tensor<?x96xf32>, %w: tensor<96x96xbf16>, %r: tensor<?x96xf32>) -> tensor<?x96xf32> {
    %0 = "v3.linear"(%x, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
    %1 = "v3.add"(%r, %0) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
    return %1 : tensor<?x96xf32>
  }
  func.func private @latent(%cache: tensor<?x48xf32>, %entry: tensor<?x48xf32>, %a: tensor<?x4x24xf32>, %b: tensor<?x4x16xf32>, %w: tensor<192x32xbf16>) -> tensor<?x4x24xf32> {
    %0 = "v3.concat"(%cache, %entry) {axis = 0 : i64} : (tensor<?x48xf32>, tensor<?x48xf32>) -> tensor<?x48xf32>
    %1 = "v3.attention"(%a, %b, %0, %w) {form = "naive", kv_lora_rank = 32 : i64, scale = 0.2 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x48xf32>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
    return %1 : tensor<?x4x24xf32>
  }
  func.func private @pieces(%a: tensor<?x?xf32>, %b: tensor<?x?xf32>) -> tensor<?x?xf32> {
    %0 = "v3.concat"(%a, %b) {axis = 1 : i64} : (tensor<?x?xf32>, tensor<?x?xf32>) -> tensor<?x?xf32>
    return %0 : tensor<?x?xf32>
  }
  func.func private @grads(%a: tensor<?x?xf32>, %b: tensor<?x8xf32>) -> tensor<?x8xf32> {
    %0 = "v3.matmul"(%a, %b) {transpose_a = true, transpose_b = false} : (tensor<?x?xf32>, tensor<?x8xf32>) -> tensor<?x8xf32>
    return %0 : tensor<?x8xf32>
  }
"#;
        let found = equalities(text);
        let want: Vec<(&str, Vec<Vec<(usize, usize)>>)> = vec![
            // A position per row, through the norm's result.
            ("q_rope", vec![vec![(0, 0), (2, 0)]]),
            // The residual's rows are the GEMM's.
            ("residual", vec![vec![(0, 0), (2, 0)]]),
            // Concatenated rows differ (the cache's and the new ones), and attention relates only
            // its queries' rows to each other, not to the latent's.
            ("latent", vec![vec![(2, 0), (3, 0)]]),
            // Off the axis: rows.
            ("pieces", vec![vec![(0, 0), (1, 0)]]),
            // aᵀ b contracts a's rows with b's.
            ("grads", vec![vec![(0, 0), (1, 0)]]),
        ];
        let want: Vec<(String, Vec<Vec<(usize, usize)>>)> = want.into_iter().map(|(n, c)| (n.to_string(), c)).collect();
        assert_eq!(found, want);
    }

    #[test]
    fn kernels_of_norms_projections_and_heads_over_their_rows_are_row_wise() {
        let text = r#"
  func.func private @head(%x: tensor<?x96xf32>, %n: tensor<96xbf16>, %w: tensor<320x96xbf16>) -> tensor<?x320xf32> {
    %0 = "v3.rms_norm"(%x, %n) {eps = 1.0e-06 : f32} : (tensor<?x96xf32>, tensor<96xbf16>) -> tensor<?x96xf32>
    %1 = "v3.lm_head"(%0, %w) : (tensor<?x96xf32>, tensor<320x96xbf16>) -> tensor<?x320xf32>
    return %1 : tensor<?x320xf32>
  }
  func.func private @residual(%x: tensor<?x96xf32>, %w: tensor<96x96xbf16>, %r: tensor<?x96xf32>) -> tensor<?x96xf32> {
    %0 = "v3.linear"(%x, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
    %1 = "v3.add"(%r, %0) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
    return %1 : tensor<?x96xf32>
  }
  func.func private @activation_weight(%x: tensor<?x96xf32>, %w: tensor<?x96xf32>) -> tensor<?x96xf32> {
    %0 = "v3.linear"(%x, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
    return %0 : tensor<?x96xf32>
  }
  func.func private @q_rope(%x: tensor<?x48xf32>, %w: tensor<48xbf16>, %p: tensor<?xi64>) -> tensor<?x48xf32> {
    %0 = "v3.rms_norm"(%x, %w) {eps = 1.0e-06 : f32} : (tensor<?x48xf32>, tensor<48xbf16>) -> tensor<?x48xf32>
    %1 = "v3.rope"(%0, %p) {attention_factor = 1.0 : f32, dim = 48 : i64, interleave = true, inv_freq = array<f32: 1.0>, theta = 1.0e+04 : f64} : (tensor<?x48xf32>, tensor<?xi64>) -> tensor<?x48xf32>
    return %1 : tensor<?x48xf32>
  }
  func.func private @wide(%x: tensor<?x?xf32>, %y: tensor<?x?xf32>) -> tensor<?x?xf32> {
    %0 = "v3.add"(%x, %y) : (tensor<?x?xf32>, tensor<?x?xf32>) -> tensor<?x?xf32>
    return %0 : tensor<?x?xf32>
  }
"#;
        let found = each_kernel(text, kernel_row_wise);
        let want = [
            ("head", true),
            ("residual", true),
            // A product with another activation's rows mixes rows.
            ("activation_weight", false),
            // RoPE is not among the row-wise ops (its positions are rows, but it is left out).
            ("q_rope", false),
            // Rows of a dynamic width: a row's bytes are not fixed.
            ("wide", false),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        assert_eq!(found, want);
    }
}
