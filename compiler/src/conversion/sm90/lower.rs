//! `fused`-stage kernels -> sm_90a template launches. A kernel maps onto the GEMM template when its
//! body is GEMM-shaped, whatever the fusion passes named it:
//! - one `v3.linear` (`linear`), optionally added to a kernel argument (`gemm_residual`: the
//!   residual epilogue);
//! - several `v3.linear` on the same activation whose results (or `v3.split` pieces of them) are the
//!   kernel's results in column order (`mla_projections`: q_a and kv_a): ONE GEMM over the
//!   weights concatenated along N, a re-layout done once at load ([`GemmKernel::weights`]); the
//!   results are column ranges of its output.
//!
//! The activation must already be in a tensor-core type: e4m3 with its 1x128 scales, or bf16. A
//! linear on f32 activations (the f32 oracle graph, or bf16 weights in the fp8 graph) has no
//! sm_90a lowering: [`gemm_of_kernel`] says so, and so does every other kernel kind not mapped yet.

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};

use super::gemm::{GemmInput, GemmOutput};
use super::rows::{CacheRows, RowKernel, RowOp};
use crate::verify::Shape;
use v3c_models::interp::kernels::ROUTER_SPLITS;
use v3c_runtime::lowering::Regime;
pub use v3c_runtime::lowering::{RunCols, TempDim};

/// A fused kernel as one GEMM launch: `out[M, N] = A[M, K] . W[N, K]^T (+ residual)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemmKernel {
    /// The fused kernel's name (`gemm_residual_0`).
    pub kernel: String,
    pub input: GemmInput,
    pub output: GemmOutput,
    pub n: usize,
    pub k: usize,
    /// Kernel arguments: the activation and, fp8, its scales.
    pub a: usize,
    pub a_scale: Option<usize>,
    /// Weight arguments (and fp8 their scales), concatenated along N in this order.
    pub weights: Vec<(usize, Option<usize>)>,
    /// The argument the epilogue adds (the residual stream).
    pub residual: Option<usize>,
    /// Column range `[start, end)` of the GEMM output that each kernel result is.
    pub results: Vec<(usize, usize)>,
    /// A grouped (MoE) GEMM: one launch over every expert.
    pub grouped: Option<Grouped>,
    /// Wgrad's form (`dW [M, n] = dy^T x`): A has these `M` rows whatever the run, K is the run's
    /// tokens (`k` unused), and (fp8) B's scales are per row, 1x128 along K as A's.
    pub fixed_m: Option<usize>,
    /// K's range from the device (Wgrad over one expert's pairs): see [`KRange`].
    pub k_range: Option<KRange>,
    /// A second activation argument of A's shape, multiplied by the same weights into the same
    /// output (`(A + A2) W^T`, the weights read once): f32 activations as bf16 hi + lo.
    pub a2: Option<usize>,
}

/// A GEMM whose K range `[start, end)` (in whole 128-wide tiles, zero-padded) a step operand holds
/// on the device (`GemmConfig::k_range`): one expert's pairs, laid out per expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KRange {
    /// The step operand (two i32).
    pub operand: usize,
    /// The range's share of the run's rows on average (`per_token` rows per token over `groups`
    /// ranges: an expert's pairs when the balancing keeps loads even) — what the tuner sizes K by.
    pub per_token: usize,
    pub groups: usize,
}

impl GemmKernel {
    /// An fp8 GEMM into f32 over step operands in the template's order: A at 0 with its 1x128
    /// scales at 1, B at 2 with its scales at 3, the output (one result, all `n` columns) last.
    pub fn fp8(kernel: String, n: usize, k: usize) -> GemmKernel {
        GemmKernel {
            kernel,
            input: GemmInput::Fp8,
            output: GemmOutput::F32,
            n,
            k,
            a: 0,
            a_scale: Some(1),
            weights: vec![(2, Some(3))],
            residual: None,
            results: vec![(0, n)],
            grouped: None,
            fixed_m: None,
            k_range: None,
            a2: None,
        }
    }

    /// A bf16 GEMM into f32 over step operands: A at 0, B at 1, the output (all `n` columns) last.
    pub fn bf16(kernel: String, n: usize, k: usize) -> GemmKernel {
        GemmKernel { input: GemmInput::Bf16, a_scale: None, weights: vec![(1, None)], ..GemmKernel::fp8(kernel, n, k) }
    }

    /// Its problem in words: `N 7168 K 2048` (M: the run's rows), or Wgrad's `M 7168 N 2048 K
    /// tokens` (`K an expert's pairs` over a K range from the device).
    pub fn dims(&self) -> String {
        match self.fixed_m {
            Some(m) if self.k_range.is_some() => format!("M {m} N {} K an expert's pairs", self.n),
            Some(m) => format!("M {m} N {} K tokens", self.n),
            None => format!("N {} K {}", self.n, self.k),
        }
    }
}

/// One weight of a grouped GEMM: the routed experts' `[E, rows, K]` (and scales `[E, rows / 128,
/// K / 128]`) and the shared experts' `[S * rows, K]` (and scales), by step operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupedWeight {
    pub routed: usize,
    pub routed_scale: Option<usize>,
    pub shared: Option<usize>,
    pub shared_scale: Option<usize>,
    /// Rows per expert.
    pub rows: usize,
    /// The shared experts lie side by side along K (the down projection of several, one MLP's
    /// `[rows, S * K]`: [`v3c_runtime::lowering::GroupedWeightSpec::shared_columns`]).
    pub shared_columns: bool,
}

/// How a grouped GEMM's operands are organized (indices are step operands). B is re-laid out at
/// load as `[groups * n, K]`: group g (expert g, then the shared experts one by one) holds each
/// weight's rows for g in turn (gate then up: the SwiGLU step after it reads `[gate | up]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouped {
    pub grouping: super::gemm::GemmGrouping,
    /// Routed experts plus shared experts.
    pub groups: usize,
    pub routed: usize,
    /// Sorted rows per token: the routed experts it goes to plus the shared ones.
    pub per_token: usize,
    /// Group boundaries `[groups + 1]` over the sorted rows.
    pub offsets: usize,
    /// The token of each sorted row (gathered from, or scattered into).
    pub perm: usize,
    /// The routing weight of each sorted row, multiplied in the epilogue.
    pub row_scale: Option<usize>,
    /// Rows added into their token's output row (f32 atomics: no fixed order).
    pub scatter: bool,
    /// The weights, laid out per group at load. Empty: B is the GEMM's one weight operand, already
    /// stacked `[groups * n, K]` by earlier steps (the training experts' blocks, quantized at every
    /// step), with `b_row_scales`.
    pub weights: Vec<GroupedWeight>,
    /// fp8: B's scales per row of the stacked B (`[groups * n, ceil(K / 128)]`), so that groups of
    /// any row count keep their own 128x128 blocks' scales (each row carries its block's).
    pub b_row_scales: bool,
}

/// The GEMM a fused kernel is, or why it has no sm_90a lowering (a phrase naming the op).
pub fn gemm_of_kernel(kernel: &OperationRef) -> Result<GemmKernel, String> {
    gemm_of(kernel, false)
}

/// [`gemm_of_kernel`]; `f32_on_bf16`: linears on f32 activations with bf16 weights are taken too
/// (as bf16 GEMMs: the caller splits the activations, see [`split_bf16_steps`]).
fn gemm_of(kernel: &OperationRef, f32_on_bf16: bool) -> Result<GemmKernel, String> {
    let name = kernel.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or("a kernel without a body")?;
    let mut args: HashMap<usize, (usize, Shape)> = HashMap::new();
    for i in 0..block.argument_count() {
        let arg = block.argument(i).map_err(|e| e.to_string())?;
        let shape = Shape::of(arg.r#type()).ok_or("a non-tensor argument")?;
        args.insert(arg.to_raw().ptr as usize, (i, shape));
    }
    let arg_of = |v: melior::ir::Value| args.get(&(v.to_raw().ptr as usize)).cloned();
    // Column ranges of the GEMM output, per value: linear results and split pieces of them.
    let mut columns: HashMap<usize, (usize, usize)> = HashMap::new();
    let mut g = GemmKernel {
        kernel: name,
        input: GemmInput::Bf16,
        output: GemmOutput::F32,
        n: 0,
        k: 0,
        a: usize::MAX,
        a_scale: None,
        weights: Vec::new(),
        residual: None,
        results: Vec::new(),
        grouped: None,
        fixed_m: None,
        k_range: None,
        a2: None,
    };
    let mut residual_sum: Option<usize> = None;
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let full = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        let kind =
            if full == "func.return" { "return".to_string() } else { full.trim_start_matches("v3.").to_string() };
        let operand = |i: usize| o.operand(i).map_err(|e| e.to_string());
        let result_shape = |i: usize| -> Result<Shape, String> {
            let r = o.result(i).map_err(|e| e.to_string())?;
            Shape::of(r.r#type()).ok_or_else(|| format!("{kind}: a non-tensor result"))
        };
        match kind.as_str() {
            "linear" => {
                let n_operands = o.operand_count();
                let (a, a_shape) = arg_of(operand(0)?).ok_or("linear on a value computed in the kernel")?;
                let (w, w_shape) = arg_of(operand(n_operands.min(4) / 2)?).ok_or("linear on a computed weight")?;
                let (input, a_scale, w_scale) = match (n_operands, a_shape.element.as_str(), w_shape.element.as_str()) {
                    (4, "f8E4M3FN", "f8E4M3FN") => {
                        let sa = arg_of(operand(1)?).ok_or("linear with computed scales")?.0;
                        let sw = arg_of(operand(3)?).ok_or("linear with computed scales")?.0;
                        (GemmInput::Fp8, Some(sa), Some(sw))
                    }
                    (2, "bf16", "bf16") => (GemmInput::Bf16, None, None),
                    (2, "f32", "bf16") if f32_on_bf16 => (GemmInput::Bf16, None, None),
                    (_, a_el, w_el) => {
                        return Err(format!(
                            "linear on {a_el} activations with {w_el} weights (the sm_90a GEMMs read e4m3 with \
                             scales or bf16 activations)"
                        ))
                    }
                };
                let (Some(n), Some(k)) = (w_shape.dims[0], w_shape.dims[1]) else {
                    return Err("linear with a dynamic weight shape".into());
                };
                if g.weights.is_empty() {
                    (g.input, g.a, g.a_scale, g.k) = (input, a, a_scale, k);
                } else if (input, a, a_scale, k) != (g.input, g.a, g.a_scale, g.k) {
                    return Err("linears on different activations in one kernel".into());
                }
                if input == GemmInput::Fp8 && !g.n.is_multiple_of(128) {
                    return Err(format!("fp8 weights concatenated at row {} (not a 128-row scale block)", g.n));
                }
                g.output = match result_shape(0)?.element.as_str() {
                    "f32" => GemmOutput::F32,
                    "bf16" => GemmOutput::Bf16,
                    other => return Err(format!("linear with a {other} result")),
                };
                g.weights.push((w, w_scale));
                columns.insert(o.result(0).map_err(|e| e.to_string())?.to_raw().ptr as usize, (g.n, g.n + n));
                g.n += n;
            }
            "split" => {
                let whole = operand(0)?.to_raw().ptr as usize;
                let (start, _) = *columns.get(&whole).ok_or("split of a value that is not a GEMM output")?;
                let mut at = start;
                for r in 0..o.result_count() {
                    let shape = result_shape(r)?;
                    if shape.dims.len() != 2 {
                        return Err("split of a GEMM output into non-matrices".into());
                    }
                    let width = shape.dims[1].ok_or("split with a dynamic width")?;
                    columns.insert(o.result(r).map_err(|e| e.to_string())?.to_raw().ptr as usize, (at, at + width));
                    at += width;
                }
            }
            "add" if g.weights.len() == 1 && residual_sum.is_none() => {
                let (x, y) = (operand(0)?, operand(1)?);
                let (residual, sum) = match (arg_of(x), arg_of(y)) {
                    (Some((i, _)), None) if columns.contains_key(&(y.to_raw().ptr as usize)) => (i, y),
                    (None, Some((i, _))) if columns.contains_key(&(x.to_raw().ptr as usize)) => (i, x),
                    _ => return Err("add that is not a residual epilogue".into()),
                };
                let _ = sum;
                g.residual = Some(residual);
                let out = o.result(0).map_err(|e| e.to_string())?.to_raw().ptr as usize;
                columns.insert(out, (0, g.n));
                residual_sum = Some(out);
            }
            "return" => {
                for i in 0..o.operand_count() {
                    let v = operand(i)?.to_raw().ptr as usize;
                    let range = *columns.get(&v).ok_or("a result that is not a column range of the GEMM")?;
                    g.results.push(range);
                }
            }
            other => return Err(other.to_string()),
        }
    }
    if g.weights.is_empty() {
        return Err("no linear".into());
    }
    // The results must be the GEMM output's columns, in order, once each (the output buffer is
    // carved into them); with a residual, the one result is the sum.
    let mut at = 0;
    for &(start, end) in &g.results {
        if start != at {
            return Err("results that are not the GEMM output's columns in order".into());
        }
        at = end;
    }
    if at != g.n || residual_sum.is_some_and(|_| g.results.len() != 1) {
        return Err("results that do not cover the GEMM output".into());
    }
    Ok(g)
}

/// The RoPE cos/sin table a latent row kernel reads (its last input): row p holds
/// `cos(p * inv_freq[i]) * attention_factor` for i < dim / 2, then the sines, as the reference
/// computes them (`v3c_models::rope::cos_sin`). The runtime builds it once for the positions it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    pub dim: usize,
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

/// A fused kernel as one row-kernel launch: the kernel, the table it reads when it has RoPE, and
/// its operands (the fused kernel's arguments, the table, then its results, in the kernel's order;
/// a result updated in place, like the decode cache, is its argument).
#[derive(Debug, Clone, PartialEq)]
pub struct RowLaunch {
    pub kernel: RowKernel,
    pub rope_table: Option<RopeTable>,
    pub operands: Vec<Operand>,
}

impl RowLaunch {
    fn new(kernel: RowKernel, rope_table: Option<RopeTable>, fused_args: usize) -> RowLaunch {
        let mut operands = Vec::new();
        let mut next = 0;
        for (name, _) in kernel.arguments() {
            if name == "rope" {
                operands.push(Operand::RopeTable);
                continue;
            }
            operands.push(if next < fused_args { Operand::Arg(next) } else { Operand::Result(next - fused_args) });
            next += 1;
        }
        RowLaunch { kernel, rope_table, operands }
    }
}

/// A float attribute's value (`1.000000e+00 : f32`).
pub(super) fn float_attr(o: &OperationRef, name: &str) -> Option<f32> {
    o.attribute(name).ok()?.to_string().split(':').next()?.trim().parse().ok()
}

/// The row kernel a fused kernel is ([`super::rows`]), or why not:
/// - one `v3.embed` of (table, ids);
/// - one `v3.rms_norm` of (x, w) optionally followed by its 1x128 `v3.quantize_fp8`, returning the
///   norm's output and/or the quantized pair in that order (the template's argument order);
/// - MLA's latent row: `rms_norm(latent, w)`, `rope(k_pe, positions)`, their concatenation, then
///   `cache_write(cache, row, positions)` (decode) or `concat(cache, row)` (prefill).
pub fn row_of_kernel(kernel: &OperationRef) -> Result<RowLaunch, String> {
    let fused_args = kernel.region(0).ok().and_then(|r| r.first_block()).map_or(0, |b| b.argument_count());
    let plain = |k: RowKernel| RowLaunch::new(k, None, fused_args);
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or("a kernel without a body")?;
    let mut ops = Vec::new();
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        ops.push(o);
    }
    let kind =
        |o: &OperationRef| o.name().as_string_ref().as_str().unwrap_or_default().trim_start_matches("v3.").to_string();
    let raw = |v: melior::ir::Value| v.to_raw().ptr as usize;
    let is_arg = |v: melior::ir::Value, i: usize| block.argument(i).is_ok_and(|a| raw(a.into()) == raw(v));
    let shape = |v: melior::ir::Value| Shape::of(v.r#type()).ok_or("a non-tensor value");
    let names: Vec<String> = ops.iter().map(kind).collect();
    let first = ops.first().ok_or("an empty kernel")?;
    fn operand<'c, 'a>(o: &OperationRef<'c, 'a>, i: usize) -> Result<melior::ir::Value<'c, 'a>, String> {
        o.operand(i).map_err(|e| e.to_string())
    }
    match names.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["embed", "func.return"] => {
            if !(is_arg(operand(first, 0)?, 0) && is_arg(operand(first, 1)?, 1)) {
                return Err("embed of values other than the kernel's (table, ids) arguments".into());
            }
            let table = shape(operand(first, 0)?)?;
            let d = table.dims.get(1).copied().flatten().ok_or("embed with a dynamic width")?;
            Ok(plain(RowKernel::new(RowOp::Embed, d, &table.element)))
        }
        ["rms_norm", "func.return"] | ["rms_norm", "quantize_fp8", "func.return"] => {
            let (x, w) = (operand(first, 0)?, operand(first, 1)?);
            if !(is_arg(x, 0) && is_arg(w, 1)) {
                return Err("rms_norm of values other than the kernel's (x, w) arguments".into());
            }
            let (xs, ws) = (shape(x)?, shape(w)?);
            if xs.element != "f32" || xs.dims.len() != 2 {
                return Err(format!("rms_norm of {} (the row kernels read f32 rows)", x.r#type()));
            }
            let d = ws.dims.first().copied().flatten().ok_or("rms_norm with a dynamic width")?;
            let eps = first
                .attribute("eps")
                .ok()
                .and_then(|a| a.to_string().split(':').next().and_then(|n| n.trim().parse::<f32>().ok()))
                .ok_or("rms_norm without an eps")?;
            let normed = raw(first.result(0).map_err(|e| e.to_string())?.into());
            let mut produced = vec![normed];
            let quantize = ops.len() == 3;
            if quantize {
                let q = &ops[1];
                let group = q.attribute("group").map(|a| a.to_string()).unwrap_or_default();
                if raw(operand(q, 0)?) != normed || !group.starts_with(&format!("{} ", super::rows::GROUP)) {
                    return Err(format!("quantize_fp8 (group {group}) of another value than the norm's"));
                }
                for r in 0..2 {
                    produced.push(raw(q.result(r).map_err(|e| e.to_string())?.into()));
                }
            }
            let ret = ops.last().expect("a return");
            let returned: Vec<usize> =
                (0..ret.operand_count()).map(|i| operand(ret, i).map(raw)).collect::<Result<_, _>>()?;
            // The results: the norm's output (kept) and/or the quantized pair, in that order.
            let keep = returned.first() == Some(&normed);
            let expected: Vec<usize> = produced.iter().copied().skip(usize::from(!keep)).collect();
            if returned != expected || (!keep && !quantize) {
                return Err("rms_norm results other than (y), (q, scale) or (y, q, scale)".into());
            }
            Ok(plain(RowKernel::new(RowOp::RmsNorm { eps, keep, quantize }, d, &ws.element)))
        }
        ["rms_norm", "rope", "concat", last @ ("cache_write" | "concat"), "func.return"] => {
            let (rope, join, store) = (&ops[1], &ops[2], &ops[3]);
            let append = last == "concat";
            let arg = |o: &OperationRef, i: usize, a: usize| operand(o, i).map(|v| is_arg(v, a));
            let result = |o: &OperationRef| o.result(0).map(|r| raw(r.into())).map_err(|e| e.to_string());
            let wired = arg(first, 0, 0)?
                && arg(first, 1, 1)?
                && arg(rope, 0, 2)?
                && arg(rope, 1, 3)?
                && raw(operand(join, 0)?) == result(first)?
                && raw(operand(join, 1)?) == result(rope)?
                && if append {
                    arg(store, 0, 4)? && raw(operand(store, 1)?) == result(join)?
                } else {
                    arg(store, 0, 4)? && raw(operand(store, 1)?) == result(join)? && arg(store, 2, 3)?
                };
            if !wired {
                return Err(
                    "rms_norm + rope + concat + cache store not in the latent row's (latent, w, k_pe, positions, \
                            cache) order"
                        .into(),
                );
            }
            let (ls, ws, ks) = (shape(operand(first, 0)?)?, shape(operand(first, 1)?)?, shape(operand(rope, 0)?)?);
            if ls.element != "f32" || ks.element != "f32" {
                return Err("a latent row of non-f32 values".into());
            }
            let d = ws.dims.first().copied().flatten().ok_or("rms_norm with a dynamic width")?;
            let dim = ks.dims.last().copied().flatten().ok_or("rope with a dynamic width")?;
            let eps = float_attr(first, "eps").ok_or("rms_norm without an eps")?;
            let (table, interleave) = rope_table_of(rope)?;
            if table.dim != dim {
                return Err(format!("rope of width {} on k_pe of {dim}", table.dim));
            }
            let op = RowOp::Latent { eps, rope: dim, interleave, append, cache: super::rows::CacheRows::F32 };
            Ok(RowLaunch::new(RowKernel::new(op, d, &ws.element), Some(table), fused_args))
        }
        [kind @ ("attention_decode" | "attention"), "reshape", "quantize_fp8", "func.return"] => {
            let prefill = kind == "attention";
            let (att, reshape, quant, ret) = (&ops[0], &ops[1], &ops[2], &ops[3]);
            let form = att.attribute("form").map(|a| a.to_string()).unwrap_or_default();
            // Decode reads the absorbed form; prefill's naive form runs absorbed too (the same
            // attention up to rounding, without the per-head keys and values).
            let mut wired =
                att.operand_count() == if prefill { 5 } else { 6 } && (prefill || form.contains("absorbed"));
            for i in 0..att.operand_count() {
                wired &= is_arg(operand(att, i)?, i);
            }
            let r = |o: &OperationRef, i: usize| o.result(i).map(|v| raw(v.into())).map_err(|e| e.to_string());
            wired = wired
                && raw(operand(reshape, 0)?) == r(att, 0)?
                && raw(operand(quant, 0)?) == r(reshape, 0)?
                && raw(operand(ret, 0)?) == r(quant, 0)?
                && raw(operand(ret, 1)?) == r(quant, 1)?;
            if !wired {
                return Err(format!("{kind} + reshape + quantize_fp8 not in the kernel's argument order"));
            }
            let kv_arg = if prefill { 3 } else { 4 };
            let (qn, qp, kvb) = (shape(operand(att, 0)?)?, shape(operand(att, 1)?)?, shape(operand(att, kv_arg)?)?);
            if kvb.element != "f8E4M3FN" {
                return Err(format!("{kind} with {} kv_b (the attention row reads e4m3)", kvb.element));
            }
            let dim = |s: &Shape, i: usize| s.dims.get(i).copied().flatten().ok_or("a dynamic attention dim");
            let (heads, nope, rope) = (dim(&qn, 1)?, dim(&qn, 2)?, dim(&qp, 2)?);
            let (rows, kv) = (dim(&kvb, 0)?, dim(&kvb, 1)?);
            let v = rows / heads - nope;
            let scale = float_attr(att, "scale").ok_or("attention without a scale")?;
            // Contexts up to 8192 rows: the scores live in shared memory (32 KB).
            let op = RowOp::MlaDecode { heads, nope, rope, v, context: 8192, scale, prefill, selected: false };
            Ok(plain(RowKernel::new(op, kv, "f8E4M3FN")))
        }
        [kind @ ("attention_decode" | "attention"), "reshape", "func.return"] => {
            // The f32 graph's attention (bf16 kv_b): the same row, its outputs in f32.
            let prefill = kind == "attention";
            let (att, reshape, ret) = (&ops[0], &ops[1], &ops[2]);
            let form = att.attribute("form").map(|a| a.to_string()).unwrap_or_default();
            let mut wired =
                att.operand_count() == if prefill { 4 } else { 5 } && (prefill || form.contains("absorbed"));
            for i in 0..att.operand_count() {
                wired &= is_arg(operand(att, i)?, i);
            }
            let r = |o: &OperationRef, i: usize| o.result(i).map(|v| raw(v.into())).map_err(|e| e.to_string());
            wired = wired && raw(operand(reshape, 0)?) == r(att, 0)? && raw(operand(ret, 0)?) == r(reshape, 0)?;
            if !wired {
                return Err(format!("{kind} + reshape not in the kernel's argument order"));
            }
            let kv_arg = if prefill { 3 } else { 4 };
            let (qn, qp, kvb) = (shape(operand(att, 0)?)?, shape(operand(att, 1)?)?, shape(operand(att, kv_arg)?)?);
            if kvb.element != "bf16" || qn.element != "f32" {
                return Err(format!("{kind} of {} queries with {} kv_b", qn.element, kvb.element));
            }
            let dim = |s: &Shape, i: usize| s.dims.get(i).copied().flatten().ok_or("a dynamic attention dim");
            let (heads, nope, rope) = (dim(&qn, 1)?, dim(&qn, 2)?, dim(&qp, 2)?);
            let (rows, kv) = (dim(&kvb, 0)?, dim(&kvb, 1)?);
            let v = rows / heads - nope;
            let scale = float_attr(att, "scale").ok_or("attention without a scale")?;
            let op = RowOp::MlaDecode { heads, nope, rope, v, context: 8192, scale, prefill, selected: false };
            Ok(plain(RowKernel::new(op, kv, "bf16")))
        }
        ["concat", "func.return"] => {
            let (a, b) = (shape(operand(first, 0)?)?, shape(operand(first, 1)?)?);
            let wired = is_arg(operand(first, 0)?, 0) && is_arg(operand(first, 1)?, 1);
            let axis = first.attribute("axis").map(|a| a.to_string()).unwrap_or_default();
            let rank = a.dims.len();
            if wired && rank > 2 && b.dims.len() == rank && a.dims[..rank - 1] == b.dims[..rank - 1] {
                // Along the last axis of heads (`[T, H, d1] + [T, H, d2]`): rows of every head,
                // joined over the result's rows.
                let last = format!("{} ", rank - 1);
                let (d, second) = (a.dims[rank - 1], b.dims[rank - 1]);
                if let (Some(d), Some(second), true, "f32") = (d, second, axis.starts_with(&last), a.element.as_str()) {
                    let k = RowKernel::new(RowOp::Train(super::rows::TrainRow::Join { second }), d, "f32");
                    return Ok(RowLaunch {
                        kernel: k,
                        rope_table: None,
                        operands: vec![Operand::Arg(0), Operand::Arg(1), Operand::Result(0)],
                    });
                }
            }
            if !wired || a.element != "f32" || a.dims.len() != 2 || b.dims.len() != 2 || !axis.starts_with("1 ") {
                return Err("concat that is not of the kernel's two f32 row arguments along columns".into());
            }
            let (d, second) =
                (a.dims[1].ok_or("concat with a dynamic width")?, b.dims[1].ok_or("concat with a dynamic width")?);
            Ok(plain(RowKernel::new(RowOp::Concat { second }, d, "f32")))
        }
        // The training step's kernels; others named by their ops, as a GEMM kernel that does not
        // map is by the op that stops it.
        _ => super::lower_sparse::row_of_sparse_kernel(kernel)
            .or_else(|| super::lower_train::row_of_train_kernel(kernel))
            .unwrap_or_else(|| {
                Err(names.iter().filter(|n| *n != "func.return").cloned().collect::<Vec<_>>().join(" + "))
            }),
    }
}

/// A buffer one launch of a multi-launch lowering reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// The fused kernel's argument.
    Arg(usize),
    /// The fused kernel's result.
    Result(usize),
    /// A temporary of the lowering ([`Steps::temps`]), live between its launches.
    Temp(usize),
    /// The RoPE table ([`Steps::rope_table`]).
    RopeTable,
    /// Rows `first .. first + rows` of a temporary (e.g. one expert's entries of a per-expert table).
    TempRows { temp: usize, first: usize, rows: usize },
    /// A temporary's first rows, as many as argument `arg` has (seen as a matrix).
    TempRowsOf { temp: usize, arg: usize },
}

/// A temporary buffer: `[rows * rows_factor, cols]` where rows are the fused kernel's rows (a MoE
/// temporary holds each token's routed and shared expert rows: `rows_factor` = top-k + shared), or
/// `[fixed_rows, cols]` when its rows do not depend on the run's (e.g. one per expert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Temp {
    pub rows_factor: usize,
    pub cols: usize,
    pub element: String,
    pub fixed_rows: Option<usize>,
    /// Columns that follow the run's rows instead of `cols` (a transposed activation).
    pub run_cols: Option<RunCols>,
    /// Rows that follow argument `i`'s leading dim instead of the run's rows (times `rows_factor`):
    /// e.g. prefill's cached and new latent rows.
    pub rows_of: Option<usize>,
    /// An explicit shape instead, dim by dim (any rank).
    pub dims: Option<Vec<TempDim>>,
}

impl Temp {
    /// `[rows * rows_factor, cols]` of `element`.
    pub fn per_row(rows_factor: usize, cols: usize, element: &str) -> Temp {
        Temp { rows_factor, cols, element: element.into(), fixed_rows: None, run_cols: None, rows_of: None, dims: None }
    }

    /// `[rows, run_cols.cols(run rows)]` of `element`: e.g. a `[T, rows]` activation transposed.
    pub fn transposed(rows: usize, run_cols: RunCols, element: &str) -> Temp {
        Temp {
            rows_factor: 0,
            cols: 0,
            element: element.into(),
            fixed_rows: Some(rows),
            run_cols: Some(run_cols),
            rows_of: None,
            dims: None,
        }
    }

    /// A temporary of `element` shaped `dims`.
    pub fn shaped(dims: Vec<TempDim>, element: &str) -> Temp {
        Temp { dims: Some(dims), ..Temp::per_row(0, 0, element) }
    }

    /// How `lowering.json` describes it.
    pub fn spec(&self) -> v3c_runtime::lowering::TempSpec {
        v3c_runtime::lowering::TempSpec {
            rows_factor: self.rows_factor,
            cols: self.cols,
            dtype: self.element.clone(),
            fixed_rows: self.fixed_rows,
            run_cols: self.run_cols,
            rows_of: self.rows_of,
            dims: self.dims.clone(),
        }
    }

    /// `[arg_rows(i) * rows_factor, cols]` of `element`, `arg_rows(i)` the leading dim of
    /// argument `i`.
    pub fn per_row_of(arg: usize, rows_factor: usize, cols: usize, element: &str) -> Temp {
        Temp { rows_of: Some(arg), ..Temp::per_row(rows_factor, cols, element) }
    }

    /// Its rows for a run of `rows` rows (with [`Temp::rows_of`]: `rows` is that argument's
    /// leading dim).
    pub fn rows(&self, rows: usize) -> usize {
        self.fixed_rows.unwrap_or(rows * self.rows_factor)
    }

    /// Its columns for a run of `rows` rows.
    pub fn cols(&self, rows: usize) -> usize {
        self.run_cols.map_or(self.cols, |c| c.cols(rows))
    }
}

/// What one launch runs.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKernel {
    /// A GEMM whose argument indices (`a`, `a_scale`, `weights`, `residual`) index the step's
    /// operands; its output is the operand after them.
    Gemm(GemmKernel),
    Row(RowKernel),
    /// MLA prefill attention on the tensor cores ([`super::mla::MlaPrefillConfig`]): operands q, k,
    /// v (bf16, head-major), out (f32).
    MlaPrefill(MlaPrefillLaunch),
    /// MLA decode attention on the tensor cores ([`super::mla::MlaDecodeConfig`]): operands q
    /// (absorbed, bf16), the paged cache (bf16), block table, lengths, split outputs, lse.
    MlaDecode(MlaDecodeLaunch),
}

/// A launch of the split-K decode attention kernel: its configuration, the query rows per token
/// (heads), the softmax scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaDecodeLaunch {
    pub config: super::mla::MlaDecodeConfig,
    pub heads: usize,
    pub scale: f32,
    /// The selection that bounds a query's keys (DeepSeek-V3.2's `_sel` kernel); None: the
    /// cache's context.
    pub selection: Option<Selection>,
}

/// What an attention over each query's selected rows attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    /// The most keys a query attends (DeepSeek-V3.2: its top-k width).
    pub keys: usize,
    /// Prefill's (the queries select from the same rows), or decode's (each from its sequence's).
    pub prefill: bool,
}

impl StepKernel {
    /// An attention launch's kernel name, heads and softmax scale (None: not attention).
    pub fn attention(&self) -> Option<(String, usize, f32)> {
        match self {
            StepKernel::MlaPrefill(a) => Some((a.config.kernel_name(), a.heads, a.scale)),
            StepKernel::MlaDecode(a) => Some((a.config.kernel_name(), a.heads, a.scale)),
            StepKernel::Gemm(_) | StepKernel::Row(_) => None,
        }
    }
}

/// A launch of the flash-attention prefill kernel: its configuration, the heads its head-major
/// operands stack (the query length is q's rows / heads, the key length k's), the softmax scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaPrefillLaunch {
    pub config: super::mla::MlaPrefillConfig,
    pub heads: usize,
    pub scale: f32,
}

/// One launch: its kernel and its operands in the kernel's argument order (buffers are contiguous:
/// an argument of lower rank than its buffer sees the leading dims collapsed, e.g. a MoE result
/// `[T, 9, 2048]` as `[T * 9, 2048]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The one regime the launch runs in (None: both), [`v3c_runtime::lowering::LaunchSpec::only`].
    pub only: Option<Regime>,
    pub kernel: StepKernel,
    pub operands: Vec<Operand>,
}

impl Step {
    /// Whether the launch runs in `regime`.
    pub fn runs_in(&self, regime: Regime) -> bool {
        self.only.is_none_or(|only| only == regime)
    }
}

/// A fused kernel as several launches through temporaries.
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    pub steps: Vec<Step>,
    pub temps: Vec<Temp>,
    pub rope_table: Option<RopeTable>,
}

impl Steps {
    /// Keeps the steps `keep` takes, and of the temporaries only those a kept step names or no
    /// step named before (the operands renumbered): a regime's path left out takes its buffers.
    pub fn retain(&mut self, keep: impl Fn(&Step) -> bool) {
        let named = |steps: &[Step]| {
            let mut named = vec![false; self.temps.len()];
            for o in steps.iter().flat_map(|s| &s.operands) {
                if let Operand::Temp(t) | Operand::TempRows { temp: t, .. } | Operand::TempRowsOf { temp: t, .. } = *o {
                    named[t] = true;
                }
            }
            named
        };
        let before = named(&self.steps);
        self.steps.retain(|s| keep(s));
        let after = named(&self.steps);
        let kept: Vec<bool> = before.iter().zip(&after).map(|(&b, &a)| a || !b).collect();
        let mut number = Vec::with_capacity(kept.len());
        let mut next = 0;
        for &k in &kept {
            number.push(next);
            next += usize::from(k);
        }
        let mut i = 0;
        self.temps.retain(|_| {
            i += 1;
            kept[i - 1]
        });
        for o in self.steps.iter_mut().flat_map(|s| &mut s.operands) {
            if let Operand::Temp(t) | Operand::TempRows { temp: t, .. } | Operand::TempRowsOf { temp: t, .. } = o {
                *t = number[*t];
            }
        }
    }
}

/// The launches of a fused kernel that no single template covers but a few do in sequence:
/// - MLA's query up-projection (fp8): `rms_norm`, `quantize_fp8`, the q_b `linear`, `reshape`,
///   `split` into nope and rope heads, `rope` -> row kernel (norm + 1x128 quantization), fp8 GEMM
///   (f32 out), row kernel (split + RoPE from the table);
/// - MoE routing (`moe_dispatch`): a routing row per token (experts and weights), then one block
///   sorting the pairs by expert (offsets, the token and weight of each sorted row);
/// - the MoE grouped GEMMs (fp8): `moe_gate_up` + its quantization as a gathered grouped GEMM then
///   the SwiGLU row; `moe_down` as a copy of the residual then a grouped GEMM scattering into it;
/// - a GEMM on f32 activations with bf16 weights (`lm_head`, the MTP's `eh_proj` linear): the
///   activations split into bf16 hi + lo by a row, then one dual-A bf16 GEMM over both halves
///   (x W^T to ~2^-16 on the tensor cores, the weights read once);
/// - the dense SwiGLU MLP's first half (fp8): gate and up `linear`s on the same quantized
///   activation, `silu_mul`, `quantize_fp8` -> one fp8 GEMM over the gate and up weights
///   concatenated along N (f32 out), row kernel (SwiGLU + 1x128 quantization). (The GEMM template
///   refuses fp8 SwiGLU epilogues: gate and up rows would share a 128-row weight scale block.)
pub fn steps_of_kernel(kernel: &OperationRef) -> Result<Steps, String> {
    // The training graph's f32 x f32 matmuls (master weights) on the tensor cores.
    if let Some(steps) = super::lower_train::tensor_core_matmul_of(kernel) {
        return Ok(steps);
    }
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or("a kernel without a body")?;
    let mut ops = Vec::new();
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        ops.push(o);
    }
    let kind =
        |o: &OperationRef| o.name().as_string_ref().as_str().unwrap_or_default().trim_start_matches("v3.").to_string();
    let names: Vec<String> = ops.iter().map(kind).collect();
    let raw = |v: melior::ir::Value| v.to_raw().ptr as usize;
    let arg_shape = |i: usize| -> Result<Shape, String> {
        let a = block.argument(i).map_err(|e| e.to_string())?;
        Shape::of(a.r#type()).ok_or_else(|| "a non-tensor argument".to_string())
    };
    let shape_of = |o: &OperationRef, i: usize| -> Result<Shape, String> {
        Shape::of(o.result(i).map_err(|e| e.to_string())?.r#type()).ok_or_else(|| "a result".into())
    };
    let is_arg = |v: melior::ir::Value, i: usize| block.argument(i).is_ok_and(|a| raw(a.into()) == raw(v));
    fn operand<'c, 'a>(o: &OperationRef<'c, 'a>, i: usize) -> Result<melior::ir::Value<'c, 'a>, String> {
        o.operand(i).map_err(|e| e.to_string())
    }
    let result = |o: &OperationRef, i: usize| o.result(i).map(|r| raw(r.into())).map_err(|e| e.to_string());
    let fixed = |s: &Shape, d: usize| s.dims.get(d).copied().flatten().ok_or_else(|| "a dynamic width".to_string());
    let fp8_gemm = |name: String, n: usize, k: usize, weights: Vec<(usize, Option<usize>)>| GemmKernel {
        kernel: name,
        input: GemmInput::Fp8,
        output: GemmOutput::F32,
        n,
        k,
        a: 0,
        a_scale: Some(1),
        weights,
        residual: None,
        results: vec![(0, n)],
        grouped: None,
        fixed_m: None,
        k_range: None,
        a2: None,
    };
    let bf16_gemm = |name: String, n: usize, k: usize, weights: Vec<(usize, Option<usize>)>| GemmKernel {
        kernel: name,
        input: GemmInput::Bf16,
        output: GemmOutput::F32,
        n,
        k,
        a: 0,
        a_scale: None,
        weights,
        residual: None,
        results: vec![(0, n)],
        grouped: None,
        fixed_m: None,
        k_range: None,
        a2: None,
    };
    let fused = kernel.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
    match names.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["rms_norm", "quantize_fp8", "linear", "reshape", "split", "rope", "func.return"]
        | ["rms_norm", "linear", "reshape", "split", "rope", "func.return"] => {
            // fp8: norm + 1x128 quantization row, fp8 GEMM (f32 out), split + RoPE row. The f32
            // graph (bf16 weights): the norm's f32 rows split into bf16 hi + lo for one dual-A GEMM.
            let fp8 = ops.len() == 7;
            let at = |i: usize| &ops[if fp8 && i > 0 { i + 1 } else { i }];
            let (norm, linear, reshape, split, rope, ret) = (at(0), at(1), at(2), at(3), at(4), at(5));
            let input_wired = if fp8 {
                let quant = &ops[1];
                raw(operand(quant, 0)?) == result(norm, 0)?
                    && linear.operand_count() == 4
                    && raw(operand(linear, 0)?) == result(quant, 0)?
                    && raw(operand(linear, 1)?) == result(quant, 1)?
                    && is_arg(operand(linear, 2)?, 2)
                    && is_arg(operand(linear, 3)?, 3)
            } else {
                linear.operand_count() == 2
                    && raw(operand(linear, 0)?) == result(norm, 0)?
                    && is_arg(operand(linear, 1)?, 2)
            };
            let positions = if fp8 { 4 } else { 3 };
            let wired = is_arg(operand(norm, 0)?, 0)
                && is_arg(operand(norm, 1)?, 1)
                && input_wired
                && raw(operand(reshape, 0)?) == result(linear, 0)?
                && raw(operand(split, 0)?) == result(reshape, 0)?
                && raw(operand(rope, 0)?) == result(split, 1)?
                && is_arg(operand(rope, 1)?, positions)
                && raw(operand(ret, 0)?) == result(split, 0)?
                && raw(operand(ret, 1)?) == result(rope, 0)?;
            if !wired {
                return Err("the query up-projection's ops in another order".into());
            }
            let (x, w, wq) = (arg_shape(0)?, arg_shape(1)?, arg_shape(2)?);
            if x.element != "f32" || wq.element != if fp8 { "f8E4M3FN" } else { "bf16" } {
                return Err(format!("a query up-projection of {} on {} weights", x.element, wq.element));
            }
            let (d, n) = (fixed(&w, 0)?, fixed(&wq, 0)?);
            let (heads, nope, rope_dim) =
                (fixed(&shape_of(reshape, 0)?, 1)?, fixed(&shape_of(split, 0)?, 2)?, fixed(&shape_of(rope, 0)?, 2)?);
            if heads * (nope + rope_dim) != n {
                return Err(format!("{heads} heads of {nope} + {rope_dim} from {n} columns"));
            }
            let (table, interleave) = rope_table_of(rope)?;
            let eps = float_attr(norm, "eps").ok_or("rms_norm without an eps")?;
            let norm_row = |quantize: bool| {
                StepKernel::Row(RowKernel::new(RowOp::RmsNorm { eps, keep: !quantize, quantize }, d, &w.element))
            };
            let rope_step = |rows: Operand| Step {
                only: None,
                kernel: StepKernel::Row(RowKernel::new(
                    RowOp::SplitRope { heads, nope, rope: rope_dim, interleave },
                    n,
                    "f32",
                )),
                operands: vec![
                    rows,
                    Operand::Arg(positions),
                    Operand::RopeTable,
                    Operand::Result(0),
                    Operand::Result(1),
                ],
            };
            if !fp8 {
                let g = bf16_gemm(format!("{fused}.gemm"), n, d, vec![(2, None)]);
                let normed = Step {
                    only: None,
                    kernel: norm_row(false),
                    operands: vec![Operand::Arg(0), Operand::Arg(1), Operand::Temp(2)],
                };
                let mut steps =
                    split_bf16_steps(&g, &fused, vec![(normed, Temp::per_row(1, d, "f32"))], Some(Operand::Temp(3)));
                steps.temps.push(Temp::per_row(1, n, "f32"));
                steps.steps.push(rope_step(Operand::Temp(3)));
                steps.rope_table = Some(table);
                return Ok(steps);
            }
            let groups = d.div_ceil(super::rows::GROUP);
            Ok(Steps {
                temps: vec![
                    Temp::per_row(1, d, "f8E4M3FN"),
                    Temp::per_row(1, groups, "f32"),
                    Temp::per_row(1, n, "f32"),
                ],
                steps: vec![
                    Step {
                        only: None,
                        kernel: norm_row(true),
                        operands: vec![Operand::Arg(0), Operand::Arg(1), Operand::Temp(0), Operand::Temp(1)],
                    },
                    Step {
                        only: None,
                        kernel: StepKernel::Gemm(fp8_gemm(format!("{fused}.gemm"), n, d, vec![(2, Some(3))])),
                        operands: vec![
                            Operand::Temp(0),
                            Operand::Temp(1),
                            Operand::Arg(2),
                            Operand::Arg(3),
                            Operand::Temp(2),
                        ],
                    },
                    rope_step(Operand::Temp(2)),
                ],
                rope_table: Some(table),
            })
        }
        ["linear", "reshape", "split", "rope", "func.return"]
        | ["linear", "reshape", "split", "rope", "concat", "func.return"] => {
            // A query up-projection whose input other kernels read too (DeepSeek-V3.2's query
            // latent, normed and quantized once for q_b and the indexer's wq_b): the GEMM, then its
            // rows split into heads with RoPE — q_nope and q_pe ([`RowOp::SplitRope`]), or the
            // indexer's heads with their first columns rotated ([`RowOp::HeadsRope`]).
            let joined = ops.len() == 6;
            let (linear, reshape, split, rope, ret) = (&ops[0], &ops[1], &ops[2], &ops[3], &ops[ops.len() - 1]);
            let fp8 = linear.operand_count() == 4;
            let mut wired = match fp8 {
                true => (0..4).all(|i| operand(linear, i).is_ok_and(|v| is_arg(v, i))),
                false => {
                    linear.operand_count() == 2 && is_arg(operand(linear, 0)?, 0) && is_arg(operand(linear, 1)?, 1)
                }
            };
            let (weight, positions) = if fp8 { (2, 4) } else { (1, 2) };
            // The rotated piece: the second (q_pe), or the first (the indexer's).
            let piece = usize::from(!joined);
            wired = wired
                && raw(operand(reshape, 0)?) == result(linear, 0)?
                && raw(operand(split, 0)?) == result(reshape, 0)?
                && split.result_count() == 2
                && raw(operand(rope, 0)?) == result(split, piece)?
                && is_arg(operand(rope, 1)?, positions);
            wired = wired
                && if joined {
                    let join = &ops[4];
                    raw(operand(join, 0)?) == result(rope, 0)?
                        && raw(operand(join, 1)?) == result(split, 1)?
                        && ret.operand_count() == 1
                        && raw(operand(ret, 0)?) == result(join, 0)?
                        && join.attribute("axis").is_ok_and(|a| a.to_string().starts_with("2 "))
                } else {
                    ret.operand_count() == 2
                        && raw(operand(ret, 0)?) == result(split, 0)?
                        && raw(operand(ret, 1)?) == result(rope, 0)?
                };
            if !wired {
                return Err("the query heads' GEMM, split and RoPE in another order".into());
            }
            let (x, wq) = (arg_shape(0)?, arg_shape(weight)?);
            let (x_el, w_el) = if fp8 { ("f8E4M3FN", "f8E4M3FN") } else { ("f32", "bf16") };
            if x.element != x_el || wq.element != w_el {
                return Err(format!("query heads of {} activations on {} weights", x.element, wq.element));
            }
            let (n, k) = (fixed(&wq, 0)?, fixed(&wq, 1)?);
            let (heads, first, second) =
                (fixed(&shape_of(reshape, 0)?, 1)?, fixed(&shape_of(split, 0)?, 2)?, fixed(&shape_of(split, 1)?, 2)?);
            if heads * (first + second) != n {
                return Err(format!("{heads} heads of {first} + {second} from {n} columns"));
            }
            let (table, interleave) = rope_table_of(rope)?;
            let (row, operands) = if joined {
                let op = RowOp::HeadsRope { heads, rope: first, interleave };
                (RowKernel::new(op, n, "f32"), vec![Operand::Result(0)])
            } else {
                let op = RowOp::SplitRope { heads, nope: first, rope: second, interleave };
                (RowKernel::new(op, n, "f32"), vec![Operand::Result(0), Operand::Result(1)])
            };
            let heads_step = |rows: Operand, operands: Vec<Operand>| Step {
                only: None,
                kernel: StepKernel::Row(row.clone()),
                operands: [rows, Operand::Arg(positions), Operand::RopeTable].into_iter().chain(operands).collect(),
            };
            if !fp8 {
                let g = bf16_gemm(format!("{fused}.gemm"), n, k, vec![(1, None)]);
                let mut steps = split_bf16_steps(&g, &fused, Vec::new(), Some(Operand::Temp(2)));
                steps.temps.push(Temp::per_row(1, n, "f32"));
                steps.steps.push(heads_step(Operand::Temp(2), operands));
                steps.rope_table = Some(table);
                return Ok(steps);
            }
            let gemm = Step {
                only: None,
                kernel: StepKernel::Gemm(fp8_gemm(format!("{fused}.gemm"), n, k, vec![(2, Some(3))])),
                operands: (0..4).map(Operand::Arg).chain([Operand::Temp(0)]).collect(),
            };
            Ok(Steps {
                temps: vec![Temp::per_row(1, n, "f32")],
                steps: vec![gemm, heads_step(Operand::Temp(0), operands)],
                rope_table: Some(table),
            })
        }
        ["reshape", "split", "rope", "func.return"] => {
            // MLA without q LoRA (`mla_q_rope`): q_proj's rows split into heads, RoPE on q_pe —
            // the q_b GEMM's epilogue row of the LoRA form, alone.
            let (reshape, split, rope, ret) = (&ops[0], &ops[1], &ops[2], &ops[3]);
            let wired = is_arg(operand(reshape, 0)?, 0)
                && raw(operand(split, 0)?) == result(reshape, 0)?
                && raw(operand(rope, 0)?) == result(split, 1)?
                && is_arg(operand(rope, 1)?, 1)
                && raw(operand(ret, 0)?) == result(split, 0)?
                && raw(operand(ret, 1)?) == result(rope, 0)?;
            if !wired {
                return Err("the query heads' split and RoPE in another order".into());
            }
            let x = arg_shape(0)?;
            let n = fixed(&x, 1)?;
            let (heads, nope, rope_dim) =
                (fixed(&shape_of(reshape, 0)?, 1)?, fixed(&shape_of(split, 0)?, 2)?, fixed(&shape_of(rope, 0)?, 2)?);
            if x.element != "f32" || heads * (nope + rope_dim) != n {
                return Err(format!("{heads} heads of {nope} + {rope_dim} from {n} {} columns", x.element));
            }
            let (table, interleave) = rope_table_of(rope)?;
            Ok(Steps {
                temps: Vec::new(),
                steps: vec![Step {
                    only: None,
                    kernel: StepKernel::Row(RowKernel::new(
                        RowOp::SplitRope { heads, nope, rope: rope_dim, interleave },
                        n,
                        "f32",
                    )),
                    operands: vec![
                        Operand::Arg(0),
                        Operand::Arg(1),
                        Operand::RopeTable,
                        Operand::Result(0),
                        Operand::Result(1),
                    ],
                }],
                rope_table: Some(table),
            })
        }
        ["linear", "linear", "silu_mul", "func.return"] => {
            // The f32 graph's SwiGLU MLP (bf16 weights): gate and up as one GEMM (weights
            // concatenated along N) on the split activations into `[gate | up]`, then the SwiGLU row.
            let (gate, up, silu, ret) = (&ops[0], &ops[1], &ops[2], &ops[3]);
            let wired = gate.operand_count() == 2
                && up.operand_count() == 2
                && is_arg(operand(gate, 0)?, 0)
                && is_arg(operand(gate, 1)?, 1)
                && is_arg(operand(up, 0)?, 0)
                && is_arg(operand(up, 1)?, 2)
                && raw(operand(silu, 0)?) == result(gate, 0)?
                && raw(operand(silu, 1)?) == result(up, 0)?
                && raw(operand(ret, 0)?) == result(silu, 0)?;
            if !wired {
                return Err("the SwiGLU MLP's ops in another order".into());
            }
            let (x, wg, wu) = (arg_shape(0)?, arg_shape(1)?, arg_shape(2)?);
            if x.element != "f32" || wg.element != "bf16" || wu.element != "bf16" {
                return Err(format!("a SwiGLU MLP of {} activations on {} weights", x.element, wg.element));
            }
            let (inter, k) = (fixed(&wg, 0)?, fixed(&wg, 1)?);
            let g = bf16_gemm(fused.clone(), 2 * inter, k, vec![(1, None), (2, None)]);
            let mut steps = split_bf16_steps(&g, &fused, Vec::new(), Some(Operand::Temp(2)));
            steps.temps.push(Temp::per_row(1, 2 * inter, "f32"));
            steps.steps.push(Step {
                only: None,
                kernel: StepKernel::Row(RowKernel::new(RowOp::SiluMul { quantize: false }, inter, "f32")),
                operands: vec![Operand::Temp(2), Operand::Result(0)],
            });
            Ok(steps)
        }
        ["linear", "linear", "silu_mul", "quantize_fp8", "func.return"] => {
            let (gate, up, silu, quant, ret) = (&ops[0], &ops[1], &ops[2], &ops[3], &ops[4]);
            let wired = gate.operand_count() == 4
                && up.operand_count() == 4
                && is_arg(operand(gate, 0)?, 0)
                && is_arg(operand(gate, 1)?, 1)
                && is_arg(operand(gate, 2)?, 2)
                && is_arg(operand(gate, 3)?, 3)
                && is_arg(operand(up, 0)?, 0)
                && is_arg(operand(up, 1)?, 1)
                && is_arg(operand(up, 2)?, 4)
                && is_arg(operand(up, 3)?, 5)
                && raw(operand(silu, 0)?) == result(gate, 0)?
                && raw(operand(silu, 1)?) == result(up, 0)?
                && raw(operand(quant, 0)?) == result(silu, 0)?
                && raw(operand(ret, 0)?) == result(quant, 0)?
                && raw(operand(ret, 1)?) == result(quant, 1)?;
            if !wired {
                return Err("the SwiGLU MLP's ops in another order".into());
            }
            let (x, wg) = (arg_shape(0)?, arg_shape(2)?);
            if x.element != "f8E4M3FN" || wg.element != "f8E4M3FN" {
                return Err(format!("a SwiGLU MLP of {} on {} weights", x.element, wg.element));
            }
            let (inter, k) = (fixed(&wg, 0)?, fixed(&wg, 1)?);
            if !inter.is_multiple_of(128) {
                return Err(format!("gate and up weights of {inter} rows (not whole 128-row scale blocks)"));
            }
            Ok(Steps {
                temps: vec![Temp::per_row(1, 2 * inter, "f32")],
                steps: vec![
                    Step {
                        only: None,
                        kernel: StepKernel::Gemm(fp8_gemm(
                            format!("{fused}.gemm"),
                            2 * inter,
                            k,
                            vec![(2, Some(3)), (4, Some(5))],
                        )),
                        operands: (0..6).map(Operand::Arg).chain([Operand::Temp(0)]).collect(),
                    },
                    Step {
                        only: None,
                        kernel: StepKernel::Row(RowKernel::new(RowOp::SiluMul { quantize: true }, inter, "f32")),
                        operands: vec![Operand::Temp(0), Operand::Result(0), Operand::Result(1)],
                    },
                ],
                rope_table: None,
            })
        }
        [head @ ("lm_head" | "linear"), "func.return"] => {
            let (gemm_op, ret) = (&ops[0], &ops[1]);
            let wired = gemm_op.operand_count() == 2
                && is_arg(operand(gemm_op, 0)?, 0)
                && is_arg(operand(gemm_op, 1)?, 1)
                && raw(operand(ret, 0)?) == result(gemm_op, 0)?;
            let (x, w) = (arg_shape(0)?, arg_shape(1)?);
            if !wired || x.element != "f32" || w.element != "bf16" || x.dims.len() != 2 {
                return Err(format!("{head} on {} activations with {} weights", x.element, w.element));
            }
            let (n, k) = (fixed(&w, 0)?, fixed(&w, 1)?);
            // f32 activations on the bf16 tensor cores: x = hi + lo (both bf16), one dual-A GEMM.
            let g = bf16_gemm(fused.clone(), n, k, vec![(1, None)]);
            Ok(split_bf16_steps(&g, &fused, Vec::new(), None))
        }
        ["moe_dispatch", "func.return"] => {
            let dispatch = &ops[0];
            let count = dispatch.operand_count();
            let wired = (2..=3).contains(&count)
                && (0..count).all(|i| operand(dispatch, i).is_ok_and(|v| is_arg(v, i)))
                && (0..3).all(|i| operand(&ops[1], i).is_ok_and(|v| result(dispatch, i).is_ok_and(|r| raw(v) == r)));
            if !wired {
                return Err("moe_dispatch with its operands in another order".into());
            }
            let int_attr = |name: &str| -> Option<usize> {
                usize::try_from(dispatch.attribute(name).ok().and_then(crate::mlir::int_value)?).ok()
            };
            let (x, gate) = (arg_shape(0)?, arg_shape(1)?);
            if x.element != "f32" {
                return Err(format!("routing of {} activations", x.element));
            }
            let (experts, d) = (fixed(&gate, 0)?, fixed(&gate, 1)?);
            let top_k = int_attr("top_k").ok_or("moe_dispatch without top_k")?;
            let shared = int_attr("num_shared").unwrap_or(0);
            let (mut steps, route_temps) = route_steps(
                dispatch,
                &fused,
                experts,
                (d, &gate.element),
                [Operand::Arg(0), Operand::Arg(1), Operand::Arg(2), Operand::Temp(0), Operand::Temp(1)],
                2,
                count == 3,
            )?;
            steps.push(Step {
                only: None,
                kernel: StepKernel::Row(RowKernel::new(RowOp::Dispatch { experts, shared }, experts + shared, "f32")),
                operands: vec![
                    Operand::Temp(0),
                    Operand::Temp(1),
                    Operand::Result(0),
                    Operand::Result(1),
                    Operand::Result(2),
                ],
            });
            let mut temps = vec![Temp::per_row(1, top_k, "i32"), Temp::per_row(1, top_k, "f32")];
            temps.extend(route_temps);
            Ok(Steps { temps, steps, rope_table: None })
        }
        [kind @ ("moe_gate_up" | "moe_down"), "func.return"] if ops[0].operand_count() == 7 => {
            // The f32 graph's routed + shared experts (bf16 weights): the activations split into
            // bf16 hi + lo, both through one dual-A grouped GEMM (each expert's weights read once;
            // gate/up: gathered by token, then SwiGLU; down: sorted rows weighted and scattered
            // onto a copy of the residual). The second A is the operand before the output.
            let moe = &ops[0];
            let gate_up = kind == "moe_gate_up";
            let mut wired = moe.operand_count() == 7 && raw(operand(&ops[1], 0)?) == result(moe, 0)?;
            for i in 0..moe.operand_count() {
                wired &= is_arg(operand(moe, i)?, i);
            }
            if !wired {
                return Err(format!("{kind} with its operands in another order"));
            }
            let int_attr = |name: &str| -> Option<usize> {
                usize::try_from(moe.attribute(name).ok().and_then(crate::mlir::int_value)?).ok()
            };
            let (routed, shared) = (int_attr("num_experts").ok_or("num_experts")?, int_attr("num_shared").unwrap_or(0));
            let (x, w) = (arg_shape(0)?, arg_shape(if gate_up { 3 } else { 4 })?);
            if x.element != "f32" || w.element != "bf16" || shared == 0 {
                return Err(format!(
                    "{kind} of {} activations on {} weights, {shared} shared experts",
                    x.element, w.element
                ));
            }
            let per_token = fixed(&arg_shape(2)?, 1)?;
            let (rows, k) = (fixed(&w, 1)?, fixed(&w, 2)?);
            use super::gemm::GemmGrouping;
            let grouped_gemm = |a2: usize, grouping, weights: Vec<GroupedWeight>, row_scale, scatter| GemmKernel {
                kernel: format!("{fused}.grouped"),
                input: GemmInput::Bf16,
                output: GemmOutput::F32,
                n: weights.iter().map(|w: &GroupedWeight| w.rows).sum(),
                k,
                a: 0,
                a_scale: None,
                weights: Vec::new(),
                residual: None,
                results: vec![(0, weights.iter().map(|w| w.rows).sum())],
                grouped: Some(Grouped {
                    grouping,
                    groups: routed + shared,
                    routed,
                    per_token,
                    offsets: 1,
                    perm: 2,
                    row_scale,
                    scatter,
                    weights,
                    b_row_scales: false,
                }),
                fixed_m: None,
                k_range: None,
                a2: Some(a2),
            };
            // Several shared experts are one MLP's: the gate and up rows, or (down) the
            // columns, expert after expert.
            let weight = |routed: usize, shared: usize| GroupedWeight {
                routed,
                routed_scale: None,
                shared: Some(shared),
                shared_scale: None,
                rows,
                shared_columns: !gate_up,
            };
            if gate_up {
                // Arguments: x, offsets, perm, gate, up, shared gate, shared up.
                let both = || vec![weight(3, 5), weight(4, 6)];
                let steps = vec![
                    Step {
                        only: None,
                        kernel: StepKernel::Row(RowKernel::new(RowOp::SplitBf16, k, "f32")),
                        operands: vec![Operand::Arg(0), Operand::Temp(0), Operand::Temp(1)],
                    },
                    Step {
                        only: None,
                        kernel: StepKernel::Gemm(grouped_gemm(7, GemmGrouping::Gather, both(), None, false)),
                        operands: [Operand::Temp(0)]
                            .into_iter()
                            .chain((1..7).map(Operand::Arg))
                            .chain([Operand::Temp(1), Operand::Temp(2)])
                            .collect(),
                    },
                    Step {
                        only: None,
                        kernel: StepKernel::Row(RowKernel::new(RowOp::SiluMul { quantize: false }, rows, "f32")),
                        operands: vec![Operand::Temp(2), Operand::Result(0)],
                    },
                ];
                Ok(Steps {
                    temps: vec![
                        Temp::per_row(1, k, "bf16"),
                        Temp::per_row(1, k, "bf16"),
                        Temp::per_row(per_token, 2 * rows, "f32"),
                    ],
                    steps,
                    rope_table: None,
                })
            } else {
                // Arguments: h (sorted rows), offsets, perm, routing weights, down, shared down, residual.
                let g = grouped_gemm(6, GemmGrouping::Contiguous, vec![weight(4, 5)], Some(3), true);
                let steps = vec![
                    // The residual first; the experts' rows are added onto it.
                    Step {
                        only: None,
                        kernel: StepKernel::Row(RowKernel::new(RowOp::Copy, rows, "f32")),
                        operands: vec![Operand::Arg(6), Operand::Result(0)],
                    },
                    Step {
                        only: None,
                        kernel: StepKernel::Row(RowKernel::new(RowOp::SplitBf16, k, "f32")),
                        operands: vec![Operand::Arg(0), Operand::Temp(0), Operand::Temp(1)],
                    },
                    Step {
                        only: None,
                        kernel: StepKernel::Gemm(g),
                        operands: [Operand::Temp(0)]
                            .into_iter()
                            .chain((1..6).map(Operand::Arg))
                            .chain([Operand::Temp(1), Operand::Result(0)])
                            .collect(),
                    },
                ];
                Ok(Steps {
                    temps: vec![Temp::per_row(per_token, k, "bf16"), Temp::per_row(per_token, k, "bf16")],
                    steps,
                    rope_table: None,
                })
            }
        }
        ["moe_gate_up", "quantize_fp8", "func.return"] | ["moe_down", "func.return"] => {
            let moe = &ops[0];
            let gate_up = names[0] == "moe_gate_up";
            let int_attr = |name: &str| -> Option<usize> {
                usize::try_from(moe.attribute(name).ok().and_then(crate::mlir::int_value)?).ok()
            };
            let (routed, shared) = (int_attr("num_experts").ok_or("num_experts")?, int_attr("num_shared").unwrap_or(0));
            // The shared experts' weights and scales, where they are among the groups (several
            // fp8 shared experts stay a dense MLP of their own: none here).
            let n_args = match (gate_up, shared > 0) {
                (true, true) => 12,
                (true, false) => 8,
                (false, true) => 10,
                (false, false) => 8,
            };
            let mut wired = moe.operand_count() == n_args;
            for i in 0..moe.operand_count() {
                wired &= is_arg(operand(moe, i)?, i);
            }
            if gate_up {
                let (quant, ret) = (&ops[1], &ops[2]);
                wired &= raw(operand(quant, 0)?) == result(moe, 0)?
                    && raw(operand(ret, 0)?) == result(quant, 0)?
                    && raw(operand(ret, 1)?) == result(quant, 1)?;
            } else {
                wired &= raw(operand(&ops[1], 0)?) == result(moe, 0)?;
            }
            if !wired {
                return Err(format!("{} with its operands in another order", names[0]));
            }
            let x = arg_shape(0)?;
            if x.element != "f8E4M3FN" {
                return Err(format!("{} of {} activations (the grouped GEMMs here read e4m3)", names[0], x.element));
            }
            // Routed [E, rows, K]; the shared experts' rows follow them as groups.
            let weight = |routed_arg: usize,
                          scale_arg: usize,
                          shared_arg: usize,
                          shared_scale: usize|
             -> Result<GroupedWeight, String> {
                let w = arg_shape(routed_arg)?;
                Ok(GroupedWeight {
                    routed: routed_arg,
                    routed_scale: Some(scale_arg),
                    shared: (shared > 0).then_some(shared_arg),
                    shared_scale: (shared > 0).then_some(shared_scale),
                    rows: fixed(&w, 1)?,
                    // Several shared experts are one MLP's: down's are its columns, expert by expert.
                    shared_columns: !gate_up,
                })
            };
            let per_token = {
                let out = shape_of(moe, 0)?;
                if gate_up {
                    fixed(&out, 1)?
                } else {
                    fixed(&arg_shape(0)?, 1)?
                }
            };
            let rows_per_token = fixed(&arg_shape(3)?, 1)?;
            let grouped = |grouping, weights: Vec<GroupedWeight>, row_scale, scatter| Grouped {
                grouping,
                groups: routed + shared,
                routed,
                per_token: rows_per_token,
                offsets: 2,
                perm: 3,
                row_scale,
                scatter,
                weights,
                b_row_scales: false,
            };
            let gemm = |n: usize, k: usize, g: Grouped| GemmKernel {
                kernel: format!("{fused}.grouped"),
                input: GemmInput::Fp8,
                output: GemmOutput::F32,
                n,
                k,
                a: 0,
                a_scale: Some(1),
                weights: Vec::new(),
                residual: None,
                results: vec![(0, n)],
                grouped: Some(g),
                fixed_m: None,
                k_range: None,
                a2: None,
            };
            use super::gemm::GemmGrouping;
            if gate_up {
                // Arguments: x, x scales, offsets, perm, gate, up, their scales, shared gate, up, scales (where there are shared experts).
                let (g, u) = (weight(4, 6, 8, 10)?, weight(5, 7, 9, 11)?);
                let (inter, k) = (g.rows, fixed(&arg_shape(4)?, 2)?);
                // The tokens' rows copied into expert order first, then a contiguous grouped GEMM
                // over them: one TMA box of a tile's rows a k step, where gathering by token in the
                // GEMM issues a TMA copy per row (on the H200, a contiguous grouped GEMM ran at
                // 430-473 TFLOP/s and the gathering one at 92; the copy moves 2 x 7 KiB a row).
                Ok(Steps {
                    temps: vec![
                        Temp::per_row(per_token, k, "f8E4M3FN"),
                        Temp::per_row(per_token, k.div_ceil(super::rows::GROUP), "f32"),
                        Temp::per_row(per_token, 2 * inter, "f32"),
                    ],
                    steps: vec![
                        Step {
                            only: None,
                            kernel: StepKernel::Row(RowKernel::new(RowOp::GatherFp8, k, "f32")),
                            operands: vec![
                                Operand::Arg(0),
                                Operand::Arg(1),
                                Operand::Arg(3),
                                Operand::Temp(0),
                                Operand::Temp(1),
                            ],
                        },
                        Step {
                            only: None,
                            kernel: StepKernel::Gemm(gemm(
                                2 * inter,
                                k,
                                grouped(GemmGrouping::Contiguous, vec![g, u], None, false),
                            )),
                            operands: [Operand::Temp(0), Operand::Temp(1)]
                                .into_iter()
                                .chain((2..n_args).map(Operand::Arg))
                                .chain([Operand::Temp(2)])
                                .collect(),
                        },
                        Step {
                            only: None,
                            kernel: StepKernel::Row(RowKernel::new(RowOp::SiluMul { quantize: true }, inter, "f32")),
                            operands: vec![Operand::Temp(2), Operand::Result(0), Operand::Result(1)],
                        },
                    ],
                    rope_table: None,
                })
            } else {
                // Arguments: h, h scales, offsets, perm, weights, down, scales, shared down, scales (where there are shared experts), residual.
                let down = weight(5, 6, 7, 8)?;
                let (d, k) = (down.rows, fixed(&arg_shape(5)?, 2)?);
                Ok(Steps {
                    temps: Vec::new(),
                    steps: vec![
                        // The residual first; the experts' rows are added onto it.
                        Step {
                            only: None,
                            kernel: StepKernel::Row(RowKernel::new(RowOp::Copy, d, "f32")),
                            operands: vec![Operand::Arg(n_args - 1), Operand::Result(0)],
                        },
                        Step {
                            only: None,
                            kernel: StepKernel::Gemm(gemm(
                                d,
                                k,
                                grouped(GemmGrouping::Contiguous, vec![down], Some(4), true),
                            )),
                            operands: (0..n_args - 1).map(Operand::Arg).chain([Operand::Result(0)]).collect(),
                        },
                    ],
                    rope_table: None,
                })
            }
        }
        _ => match gemm_of(kernel, true) {
            // A GEMM on f32 activations with bf16 weights (the f32 graph of a bf16 checkpoint).
            Ok(g) if arg_shape(g.a)?.element == "f32" => Ok(split_bf16_steps(&g, &fused, Vec::new(), None)),
            _ => super::lower_sparse::steps_of_sparse_kernel(kernel)
                .or_else(|| super::lower_train::steps_of_train_kernel(kernel))
                .unwrap_or_else(|| {
                    Err(names.iter().filter(|n| *n != "func.return").cloned().collect::<Vec<_>>().join(" + "))
                }),
        },
    }
}

/// `g` (a bf16 GEMM whose activation argument `g.a` is f32) on the tensor cores to ~2^-16: the
/// activations split into bf16 hi + lo by a row (`x = hi + lo`), then one dual-A bf16 GEMM
/// `(hi + lo) W^T` into the f32 output (the weights read once), adding `g`'s residual.
/// `before`: steps that come first (`g.a` then names one of their temporaries, numbered after the
/// split's); the output is `into` (a step operand), else the kernel's one result, else a temporary
/// whose column ranges are copied into the results.
pub(super) fn split_bf16_steps(g: &GemmKernel, fused: &str, before: Vec<(Step, Temp)>, into: Option<Operand>) -> Steps {
    let (n, k) = (g.n, g.k);
    let mut temps = vec![Temp::per_row(1, k, "bf16"), Temp::per_row(1, k, "bf16")];
    let mut steps = Vec::new();
    let mut source = Operand::Arg(g.a);
    for (step, temp) in before {
        steps.push(step);
        temps.push(temp);
        source = Operand::Temp(temps.len() - 1);
    }
    let single = g.results.len() == 1 && g.results[0] == (0, n);
    let out = into.unwrap_or_else(|| {
        if single {
            Operand::Result(0)
        } else {
            temps.push(Temp::per_row(1, n, "f32"));
            Operand::Temp(temps.len() - 1)
        }
    });
    steps.push(Step {
        only: None,
        kernel: StepKernel::Row(RowKernel::new(RowOp::SplitBf16, k, "f32")),
        operands: vec![source, Operand::Temp(0), Operand::Temp(1)],
    });
    // One GEMM over both halves (each K tile's weights read once, multiplied by hi's and lo's
    // tiles into the same accumulators), adding `g`'s residual.
    let mut operands = vec![Operand::Temp(0), Operand::Temp(1)];
    let weights: Vec<(usize, Option<usize>)> = g
        .weights
        .iter()
        .map(|&(w, _)| {
            operands.push(Operand::Arg(w));
            (operands.len() - 1, None)
        })
        .collect();
    let residual = g.residual.map(|r| {
        operands.push(Operand::Arg(r));
        operands.len() - 1
    });
    operands.push(out);
    let kernel = GemmKernel {
        kernel: format!("{fused}.gemm"),
        input: GemmInput::Bf16,
        output: GemmOutput::F32,
        n,
        k,
        a: 0,
        a_scale: None,
        weights,
        residual,
        results: vec![(0, n)],
        grouped: None,
        fixed_m: None,
        k_range: None,
        a2: Some(1),
    };
    steps.push(Step { only: None, kernel: StepKernel::Gemm(kernel), operands });
    if !single && into.is_none() {
        for (i, &(start, end)) in g.results.iter().enumerate() {
            let copy =
                RowKernel::new(RowOp::Train(super::rows::TrainRow::Columns { start, stride: n }), end - start, "f32");
            steps.push(Step { only: None, kernel: StepKernel::Row(copy), operands: vec![out, Operand::Result(i)] });
        }
    }
    Steps { steps, temps, rope_table: None }
}

/// The routing row of a `v3.moe_dispatch` or `v3.moe_route` op over `experts` experts: prefill's
/// ([`super::rows::route_tokens`] tokens a block; [`super::ModelKernels`] adds decode's, one a
/// block, for the fused kernels decode runs).
pub(super) fn route_op(o: &OperationRef, experts: usize) -> Result<RowOp, String> {
    let int_attr = |name: &str| -> Option<usize> {
        usize::try_from(o.attribute(name).ok().and_then(crate::mlir::int_value)?).ok()
    };
    let (top_k, n_group) =
        (int_attr("top_k").ok_or("routing without top_k")?, int_attr("n_group").ok_or("routing without n_group")?);
    Ok(RowOp::Route {
        experts,
        top_k,
        n_group,
        topk_group: int_attr("topk_group").ok_or("routing without topk_group")?,
        norm: o.attribute("norm_topk_prob").ok().and_then(crate::mlir::bool_value).unwrap_or(false),
        scale: float_attr(o, "routed_scaling_factor").unwrap_or(1.0),
        tokens: super::rows::route_tokens(experts, n_group, top_k),
        pieces: ROUTER_SPLITS,
        softmax: crate::mlir::softmax_scoring(o),
    })
}

/// The routing of `o` ([`route_op`]) over `experts` experts, rows of `d` columns and a gate of
/// `element`, as launches of fused kernel `name`; `[x, gate, bias, idx, w]` their operands, their
/// temporaries (returned) numbered from `first_temp`.
///
/// Decode's few rows: the logits' pieces in the reference's split order on the CUDA cores
/// ([`RowOp::RouteLogits`], spread over many blocks), then the selection summing them — the
/// reference's bits, so the same experts. Every other regime's many rows (prefill, the MTP draft,
/// a training step), with a bf16 gate whose rows TMA can stride (`d` a multiple of 8): the
/// activations split into bf16 hi + lo and one dual-A GEMM on the tensor cores `(hi + lo) gate^T`
/// into whole f32 logits (x to ~2^-16: the sums differ from the reference's in their last bits, so
/// experts whose biased scores tie to that precision may swap), then the selection on them. A gate
/// of any other element routes on the CUDA cores in both regimes.
pub(super) fn route_steps(
    o: &OperationRef,
    name: &str,
    experts: usize,
    (d, element): (usize, &str),
    operands: [Operand; 5],
    first_temp: usize,
    biased: bool,
) -> Result<(Vec<Step>, Vec<Temp>), String> {
    let op = route_op(o, experts)?;
    if matches!(op, RowOp::Route { softmax, .. } if softmax == biased) {
        return Err(format!("{name}: routing with{} a bias operand", if biased { "" } else { "out" }));
    }
    let [x, gate, bias, idx, w] = operands;
    // The selection's operands: the logits, the bias (sigmoid routing), the picks.
    let select = |logits: Operand| if biased { vec![logits, bias, idx, w] } else { vec![logits, idx, w] };
    // As many rows as x (the MTP module's fewer than the run's: the selection walks its operand's
    // rows).
    let per_row = |cols: usize, element: &str| match x {
        Operand::Arg(i) => Temp::per_row_of(i, 1, cols, element),
        _ => Temp::per_row(1, cols, element),
    };
    let tensor_cores = element == "bf16" && d.is_multiple_of(8);
    let decode = tensor_cores.then_some(Regime::Decode);
    let parts = Operand::Temp(first_temp);
    let logits = RowOp::RouteLogits { experts, tokens: super::rows::ROUTE_TOKENS };
    let mut steps = vec![
        Step {
            only: decode,
            kernel: StepKernel::Row(RowKernel::new(logits, d, element)),
            operands: vec![x, gate, parts],
        },
        Step { only: decode, kernel: StepKernel::Row(RowKernel::new(op, experts, "f32")), operands: select(parts) },
    ];
    let mut temps = vec![per_row(ROUTER_SPLITS * experts, "f32")];
    if tensor_cores {
        let prefill = Some(Regime::Prefill);
        let [hi, lo, whole] = [1, 2, 3].map(|i| Operand::Temp(first_temp + i));
        temps.extend([per_row(d, "bf16"), per_row(d, "bf16"), per_row(experts, "f32")]);
        let gemm = GemmKernel {
            kernel: format!("{name}.gate"),
            input: GemmInput::Bf16,
            output: GemmOutput::F32,
            n: experts,
            k: d,
            a: 0,
            a_scale: None,
            weights: vec![(2, None)],
            residual: None,
            results: vec![(0, experts)],
            grouped: None,
            fixed_m: None,
            k_range: None,
            a2: Some(1),
        };
        // The selection over whole logits.
        let mut whole_op = op;
        if let RowOp::Route { pieces, .. } = &mut whole_op {
            *pieces = 1;
        }
        steps.extend([
            Step {
                only: prefill,
                kernel: StepKernel::Row(RowKernel::new(RowOp::SplitBf16, d, "f32")),
                operands: vec![x, hi, lo],
            },
            Step { only: prefill, kernel: StepKernel::Gemm(gemm), operands: vec![hi, lo, gate, whole] },
            Step {
                only: prefill,
                kernel: StepKernel::Row(RowKernel::new(whole_op, experts, "f32")),
                operands: select(whole),
            },
        ]);
    }
    Ok((steps, temps))
}

/// The table and pair layout of a `v3.rope` op.
pub(super) fn rope_table_of(rope: &OperationRef) -> Result<(RopeTable, bool), String> {
    let interleave = rope.attribute("interleave").ok().and_then(crate::mlir::bool_value).unwrap_or(true);
    let dim = rope
        .attribute("dim")
        .ok()
        .and_then(crate::mlir::int_value)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or("rope without dim")?;
    let inv = rope.attribute("inv_freq").map(|a| a.to_string()).map_err(|_| "rope without inv_freq")?;
    let inv_freq = inv
        .trim_start_matches("array<f32:")
        .trim_end_matches('>')
        .split(',')
        .map(|v| v.trim().parse::<f32>().map_err(|_| format!("rope inv_freq '{v}'")))
        .collect::<Result<Vec<f32>, String>>()?;
    if inv_freq.len() * 2 != dim {
        return Err(format!("rope of width {dim} with {} frequencies", inv_freq.len()));
    }
    let attention_factor = float_attr(rope, "attention_factor").unwrap_or(1.0);
    Ok((RopeTable { dim, inv_freq, attention_factor }, interleave))
}

/// MLA prefill attention on the tensor cores, in the naive form as DeepSeek-V3's own inference runs
/// it. The fp8 graph's fused `attention` + `reshape` + `quantize_fp8` kernel of arguments (q_nope
/// `[T, H, nope]`, q_pe `[T, H, rope]`, the latent cache `[S, kv + rope]`, kv_b `[H (nope + v), kv]`
/// e4m3 and its 128x128 scales) as six launches:
/// 1. the cache's latent columns 1x128-quantized to e4m3 (`rows_quantize`);
/// 2. the fp8 GEMM of kv_b: every head's nope keys and values `[S, H (nope + v)]` (bf16 out);
/// 3. keys `[H S, nope + rope]` (the rope key from the cache, shared by the heads) and values
///    `[H S, v]` head-major in bf16 (`rows_mlakeys`), 4. the queries likewise (`rows_mlaqueries`);
/// 5. flash attention (`mla_prefill_*`: wgmma, causal, query t seeing keys `0..=S - T + t`);
/// 6. its head-major f32 output back to token rows, quantized 1x128 (`rows_mlaheadsout_*_q`).
///
/// The f32 graph's `attention` + `reshape` (bf16 kv_b, f32 output): the up-projection as a dual-A bf16
/// GEMM of the latent split into hi + lo (to ~2^-16), the output rows in f32 (`_y`): 6 launches.
///
/// Numerics: (fp8) the latent in e4m3 for the up-projection, then q, k, v and P in bf16 (the
/// CUDA-core row, [`RowOp::MlaDecode`], keeps the reference's f32 instead). `Err`: not this
/// kernel, or shapes the templates do not take (head widths not multiples of 64, values over 256;
/// fp8: a latent or value heads not multiples of 128). `cache_rows` (fp8 graph: bf16 or fp8 rows
/// as well as f32): how the cache stores rows — bf16: the latent quantized from it, its rope key
/// copied as it is; fp8 rows: their e4m3 latent and power-of-two scales copied out as the GEMM's
/// 1x128 operand (`rows_fp8latent`), the rope key's bf16 as it is.
pub fn mla_prefill_steps(kernel: &OperationRef, cache_rows: CacheRows) -> Result<Steps, String> {
    let launch = row_of_kernel(kernel)?;
    let RowOp::MlaDecode { heads, nope, rope, v, scale, prefill: true, selected: false, .. } = launch.kernel.op else {
        return Err("not a prefill attention".into());
    };
    let fp8 = launch.kernel.weight == "f8E4M3FN";
    if cache_rows != CacheRows::F32 && !fp8 {
        return Err("the f32 graph's prefill attention over bf16 or fp8 caches (its caches stay f32)".into());
    }
    let kv = launch.kernel.d;
    if cache_rows == CacheRows::Fp8 && v3c_runtime::plan::Fp8LatentRow::of(kv + rope).is_none_or(|r| r.latent != kv) {
        return Err(format!("fp8 cache rows of {kv} + {rope} (a rope key of 64)"));
    }
    let config = super::mla::MlaPrefillConfig { qk: nope + rope, v, stages: 2, mode: super::mla::FlashMode::Forward };
    config.validate(&crate::target::SM90A)?;
    let group = super::rows::GROUP;
    if fp8 && !(kv.is_multiple_of(group) && v.is_multiple_of(group)) {
        return Err(format!("a latent of {kv} and value heads of {v} (multiples of 128 for the 1x128 groups)"));
    }
    let fused = kernel.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
    let n = heads * (nope + v);
    let (q_nope, q_pe, cache, kv_b) = (0, 1, 2, 3);
    let gemm = |input, output, a, a_scale, weights| GemmKernel {
        kernel: format!("{fused}.kv_b"),
        input,
        output,
        n,
        k: kv,
        a,
        a_scale,
        weights,
        residual: None,
        results: vec![(0, n)],
        grouped: None,
        fixed_m: None,
        k_range: None,
        a2: None,
    };
    let row = |op: RowOp, d: usize| StepKernel::Row(RowKernel::new(op, d, "f32"));
    let step = |kernel: StepKernel, operands: Vec<Operand>| Step { only: None, kernel, operands };
    use Operand::{Arg, Result as Out, Temp as T};
    // kv_b's up-projection of the cache's latent rows into temporary 2 ([S, n]), from temporaries 0
    // and 1 (fp8: the e4m3 latent and its scales; f32 graph: its bf16 hi and lo).
    let mut steps = if fp8 {
        // Its output in bf16: the keys' and values' precision, half the temporary.
        let g = gemm(GemmInput::Fp8, GemmOutput::Bf16, 0, Some(1), vec![(2, Some(3))]);
        Steps {
            temps: vec![Temp::per_row_of(cache, 1, kv, "f8E4M3FN"), Temp::per_row_of(cache, 1, kv / group, "f32")],
            steps: vec![
                // The cache's latent quantized 1x128 (fp8 rows: already, their bytes and scales
                // copied out).
                step(
                    StepKernel::Row(match cache_rows {
                        CacheRows::Fp8 => RowKernel::new(RowOp::Fp8Latent, kv, "f32"),
                        rows => RowKernel::new(RowOp::Train(super::rows::TrainRow::Quantize), kv, rows.element()),
                    }),
                    vec![Arg(cache), T(0), T(1)],
                ),
                step(StepKernel::Gemm(g), vec![T(0), T(1), Arg(kv_b), Arg(kv_b + 1), T(2)]),
            ],
            rope_table: None,
        }
    } else {
        let g = gemm(GemmInput::Bf16, GemmOutput::F32, cache, None, vec![(kv_b, None)]);
        let mut steps = split_bf16_steps(&g, &fused, Vec::new(), Some(T(2)));
        steps.temps.iter_mut().for_each(|t| t.rows_of = Some(cache));
        steps
    };
    // The up-projection: bf16 (fp8 graph: the GEMM's output) or f32 (the f32 graph: the hi + lo sum).
    let projected = if fp8 { "bf16" } else { "f32" };
    steps.temps.extend([
        Temp::per_row_of(cache, 1, n, projected),
        Temp::per_row_of(cache, heads, nope + rope, "bf16"),
        Temp::per_row_of(cache, heads, v, "bf16"),
        Temp::per_row_of(q_nope, heads, nope + rope, "bf16"),
        Temp::per_row_of(q_nope, heads, v, "f32"),
    ]);
    let out = if fp8 { vec![T(6), Out(0), Out(1)] } else { vec![T(6), Out(0)] };
    steps.steps.extend([
        step(
            StepKernel::Row(RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache: cache_rows }, kv, projected)),
            vec![T(2), Arg(cache), T(3), T(4)],
        ),
        step(row(RowOp::MlaQueries { heads, nope, rope }, heads * (nope + rope)), vec![Arg(q_nope), Arg(q_pe), T(5)]),
        step(StepKernel::MlaPrefill(MlaPrefillLaunch { config, heads, scale }), vec![T(5), T(3), T(4), T(6)]),
        step(row(RowOp::MlaHeadsOut { heads, quantize: fp8 }, heads * v), out),
    ]);
    Ok(steps)
}

/// MLA decode attention on the tensor cores, in the absorbed form: the fp8 graph's fused
/// `attention_decode` + `reshape` + `quantize_fp8` kernel of arguments (q_nope `[B, H, nope]`, q_pe
/// `[B, H, rope]`, the caches `[B, S, kv + rope]`, positions `[B]`, kv_b e4m3 and its
/// scales), or the f32 graph's `attention_decode` + `reshape` (kv_b bf16, f32 output rows), as
/// five launches:
/// 1. the absorbed queries `[q_nope W_UK | q_pe]` per (token, head) in bf16: on the tensor cores
///    (`rows_mlaabsorbmma`, the query rounded to bf16 first) where the head's widths allow, else
///    `rows_mlaabsorb`;
/// 2. the sequences' lengths (`rows_mlalengths`): the decode entry's caches are pools of 64-row
///    pages (bf16 or fp8 rows) where the decode attention runs on the tensor cores, addressed
///    through a block table the plan adds as the kernel's last argument
///    ([`crate::plan::page_decode_caches`]; the latent row writes through it too, sessions fill it);
/// 3. split-K attention (`mla_decode_*`: wgmma for `S = Q K^T` and `P V`, TMA page ring; the
///    runtime picks the splits for the run, [`v3c_runtime::lowering::attention_splits`]);
/// 4. the splits merged (`rows_mlacombine`); 5. each head's latent output through `W_UV`,
///    quantized 1x128 (`rows_mlaupvmma` on the tensor cores, the output times the block scale
///    rounded to bf16 first, where the head's widths allow, else `rows_mlaupv`; the f32 graph's:
///    as it is, `_bf16`).
///
/// Numerics: the cache (each row rounded to bf16 as the latent row stores it), the absorbed
/// queries and P in bf16, kv_b's products' inputs rounded to bf16 (the CUDA-core row keeps the
/// reference's f32). `Err`: not this kernel, or
/// shapes the templates do not take.
/// Decode attention's row kernels around the split-K kernel: the queries' absorption into the
/// latent (`q_nope W_UK`) and the heads' latent outputs through `W_UV` — kv_b's products on the
/// tensor cores where the head's widths fit the blocks' operands, else on the CUDA cores.
pub(super) fn absorb_and_up_v(
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    kv: usize,
    weight: &str,
) -> (StepKernel, StepKernel) {
    use super::rows::HEAD_TOKENS;
    let tensor_cores = |op: RowOp, else_op: RowOp| {
        let mma = RowKernel::new(op, kv, weight);
        match mma.validate(&crate::target::SM90A) {
            Ok(()) => StepKernel::Row(mma),
            Err(_) => StepKernel::Row(RowKernel::new(else_op, kv, weight)),
        }
    };
    let absorb = tensor_cores(
        RowOp::MlaAbsorbMma { heads, nope, rope, v },
        RowOp::MlaAbsorb { heads, nope, rope, v, tokens: HEAD_TOKENS },
    );
    let up_v = tensor_cores(RowOp::MlaUpVMma { heads, nope, v }, RowOp::MlaUpV { heads, nope, v, tokens: HEAD_TOKENS });
    (absorb, up_v)
}

pub fn mla_decode_steps(kernel: &OperationRef, fp8_cache: bool) -> Result<Steps, String> {
    use Operand::{Arg, Result as Out, Temp as T};
    let launch = row_of_kernel(kernel)?;
    let RowOp::MlaDecode { heads, nope, rope, v, scale, prefill: false, selected: false, .. } = launch.kernel.op else {
        return Err("not a decode attention".into());
    };
    // The f32 graph's: bf16 kv_b, the heads' outputs in f32 (no scales, no quantization).
    let weight = launch.kernel.weight.clone();
    let fp8 = weight == "f8E4M3FN";
    let kv = launch.kernel.d;
    let cluster = super::mla::MlaDecodeConfig::cluster_for(heads);
    let config = super::mla::MlaDecodeConfig {
        kv,
        rope,
        stages: 2,
        fp8_cache,
        cluster,
        serial: !fp8_cache,
        selected: false,
        bf16_rows: false,
    };
    config.validate(&crate::target::SM90A)?;
    if fp8_cache && v3c_runtime::plan::Fp8LatentRow::of(kv + rope).is_none_or(|r| r.latent != kv) {
        return Err(format!("an fp8 cache of rows of {kv} + {rope} (a rope key of 64)"));
    }
    if fp8 && v != super::rows::GROUP {
        return Err(format!("value heads of {v} (one 128-wide quantization group each)"));
    }
    let (q_nope, q_pe, cache, positions, kv_b) = (0, 1, 2, 3, 4);
    // The block table: the argument the plan appends to the kernel's.
    let table = kernel.region(0).ok().and_then(|r| r.first_block()).map_or(0, |b| b.argument_count());
    // kv_b and its scales (fp8), the outputs: the quantized bytes and scales, or the f32 rows.
    let (weights, outs) = match fp8 {
        true => (vec![Arg(kv_b), Arg(kv_b + 1)], vec![Out(0), Out(1)]),
        false => (vec![Arg(kv_b)], vec![Out(0)]),
    };
    let width = kv + rope;
    use super::rows::PAGE_ROWS as page;
    let splits = TempDim::Splits { heads, table };
    let row = |op: RowOp, d: usize, weight: &str| StepKernel::Row(RowKernel::new(op, d, weight));
    let step = |kernel: StepKernel, operands: Vec<Operand>| Step { only: None, kernel, operands };
    let (absorb, up_v) = absorb_and_up_v(heads, nope, rope, v, kv, &weight);
    Ok(Steps {
        temps: vec![
            Temp::per_row(heads, width, "bf16"),
            Temp::shaped(vec![TempDim::Arg { arg: table, dim: 0, align: 1, div: 1 }], "i32"),
            Temp::shaped(vec![splits, TempDim::Rows(heads), TempDim::Fixed(kv)], "f32"),
            Temp::shaped(vec![splits, TempDim::Rows(heads)], "f32"),
            Temp::per_row(heads, kv, "f32"),
        ],
        steps: vec![
            step(absorb, [vec![Arg(q_nope), Arg(q_pe)], weights.clone(), vec![T(0)]].concat()),
            step(row(RowOp::MlaLengths, page, "f32"), vec![Arg(positions), Arg(table), T(1)]),
            step(
                StepKernel::MlaDecode(MlaDecodeLaunch { config, heads, scale, selection: None }),
                vec![T(0), Arg(cache), Arg(table), T(1), T(2), T(3)],
            ),
            step(row(RowOp::MlaCombine, kv, "f32"), vec![T(2), T(3), T(4)]),
            step(up_v, [vec![T(4)], weights, outs].concat()),
        ],
        rope_table: None,
    })
}
