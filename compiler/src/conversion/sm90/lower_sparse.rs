//! DeepSeek-V3.2's `fused`-stage kernels -> sm_90a launches ([`super::rows::SparseRow`] and the
//! inference rows where one fits):
//! - `layer_norm` (the indexer key's), alone or split into its rotated and plain halves: the row,
//!   then each half copied out of it;
//! - `sparse_index`: the indexer's scores of every visible key into a temporary `[T, S]` (S the
//!   keys' rows), on the tensor cores with the attention ([`tensor_core_index_steps`]) or the CUDA
//!   cores, then the top keys of each row of it;
//! - `gather_rows`: each query's selected latent rows, the attention's keys and values;
//! - `cache_write` (decode's new cache rows: the latent row and the indexer key side by side);
//! - the latent row with the indexer key: `rms_norm(latent)`, `rope(k_pe)`, their concatenation
//!   and the key after them -> the norm row, the RoPE row, two joins; with the key's `layer_norm`,
//!   split and RoPE in the kernel too (`fuse-mla-projections` puts them there) one
//!   [`RowOp::LatentKey`] launch.
//!
//! The attention over each query's selected rows is the CUDA-core MLA row reading them in place
//! ([`super::rows::RowOp::MlaDecode`], a query its own sequence of selected rows), or on the tensor
//! cores ([`sparse_attention_steps`]). A model with sparse attention keeps its caches in f32 rows,
//! as the indexer, the gathers and the attention read them, except decode's where every kernel
//! reading them runs on the tensor cores ([`cache_formats`]): bf16 rows there (the cache write
//! rounds the new rows; the indexer and the attention read them as they are).

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::Module;
use melior::ir::RegionLike;

use super::lower::{float_attr, rope_table_of, Operand, RowLaunch, Step, StepKernel, Steps, Temp, TempDim};
use super::lower_train::{int_attr, operand_shape, raw, result_shape, returned_as, width, width as width_of, Body};
use super::rows::{RowKernel, RowOp, SparseRow, TrainRow};

/// Whether `module` has a kernel with DeepSeek-V3.2's key selection.
pub fn has_sparse_attention(module: &Module) -> bool {
    kernel_bodies(module).iter().any(|(_, b)| b.names == ["sparse_index"])
}

/// `module`'s fused kernels (the functions with the kernel attribute) and their bodies.
fn kernel_bodies<'c, 'a>(module: &'a Module<'c>) -> Vec<(OperationRef<'c, 'a>, Body<'c, 'a>)> {
    let mut kernels = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
            kernels.extend(Body::of(&f).map(|b| (f, b)));
        }
    }
    kernels
}

/// The caches of a module with sparse attention ([`has_sparse_attention`]), per kind of entry:
/// bf16 rows where that kind's attention runs on the tensor cores and every kernel of that kind
/// reading the caches takes bf16 rows there (the attention over the selected rows, the indexer's
/// scores on the tensor cores) — and, for prefill, where the caches are only extended by kernels
/// appending their new rows ([`cache_appends`]); f32 rows otherwise. Never paged: the rows hold
/// the indexer's key beside the latent.
pub fn cache_formats(module: &Module, attention: super::AttentionKernels) -> super::CacheFormats {
    use super::rows::CacheRows::{Bf16, F32};
    use super::AttentionKernel::TensorCores;
    let bf16 = super::CacheFormats { prefill: Bf16, decode: Bf16, sparse: true };
    // Per kind (prefill, decode): the kernels reading the caches, and those taking bf16 rows.
    let mut counts = [(0, 0); 2];
    for (f, body) in kernel_bodies(module) {
        let decode = match body.names.first().map(String::as_str) {
            Some("sparse_index") => body.ops[0].operand_count() == 4,
            Some("gather_rows") => operand_shape(&body.ops[0], 0).is_ok_and(|s| s.dims.len() == 3),
            _ => continue,
        };
        let (prefill, decode) = (!decode, decode);
        let takes = sparse_attention_steps(&f, prefill, decode, bf16).is_ok()
            || tensor_core_index_steps(&f, prefill, decode, bf16).is_some();
        let count = &mut counts[usize::from(decode)];
        *count = (count.0 + 1, count.1 + usize::from(takes));
    }
    let format =
        |(readers, taken): (usize, usize), kernel| match kernel == TensorCores && readers > 0 && taken == readers {
            true => Bf16,
            false => F32,
        };
    let appended = cache_appends(module).is_some_and(|a| !a.is_empty());
    super::CacheFormats {
        prefill: if appended { format(counts[0], attention.prefill) } else { F32 },
        decode: format(counts[1], attention.decode),
        sparse: true,
    }
}

/// The kernels appending an entry's new cache rows to its cache: a `concat` along the rows whose
/// first operand is, at every call, an entry's `kv_cache.*` input. `None` where such a kernel is
/// also called for other rows, or where a kernel other than the sparse attention's (the indexer's
/// scores, the attention over the selected rows) reads what one returns (then the caches stay
/// f32 rows, as those readers take them).
pub fn cache_appends(module: &Module) -> Option<std::collections::HashSet<String>> {
    use std::collections::{HashMap, HashSet};
    // Kernels by name: whether a concat along rows, whether a sparse kernel reading the caches.
    let mut kinds: HashMap<String, (bool, bool)> = HashMap::new();
    for (_, body) in kernel_bodies(module) {
        let concat = body.names == ["concat"] && int_attr(&body.ops[0], "axis") == Some(0);
        let reader = matches!(body.names.first().map(String::as_str), Some("sparse_index" | "gather_rows"));
        kinds.insert(body.name.clone(), (concat, reader));
    }
    let (mut appends, mut others) = (HashSet::new(), HashSet::new());
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
            continue;
        }
        let Some(block) = f.region(0).ok().and_then(|r| r.first_block()) else { continue };
        let attrs = f.attribute("arg_attrs").map(|a| a.to_string()).unwrap_or_default();
        let caches: HashSet<usize> = attrs
            .split("}, {")
            .enumerate()
            .filter(|(_, a)| a.contains(&format!("{} = \"kv_cache.", v3c_dialects::INPUT_ATTR)))
            .filter_map(|(i, _)| block.argument(i).ok().map(|a| raw(a.into())))
            .collect();
        let mut appended: HashSet<usize> = HashSet::new();
        let mut call = block.first_operation();
        while let Some(c) = call {
            call = c.next_in_block();
            let callee = c.attribute("callee").ok().map(|a| a.to_string().trim_start_matches('@').to_string());
            let (concat, reader) = callee.as_ref().and_then(|n| kinds.get(n)).copied().unwrap_or_default();
            // An appended cache read by a kernel other than the sparse attention's.
            let reads = (0..c.operand_count()).filter_map(|i| c.operand(i).ok()).any(|v| appended.contains(&raw(v)));
            if reads && !reader && c.name().as_string_ref().as_str() != Ok("func.return") {
                return None;
            }
            if !concat {
                continue;
            }
            let name = callee.unwrap_or_default();
            match c.operand(0).is_ok_and(|v| caches.contains(&raw(v))) {
                true => {
                    appended.extend((0..c.result_count()).filter_map(|i| c.result(i).ok()).map(|r| raw(r.into())));
                    appends.insert(name)
                }
                false => others.insert(name),
            };
        }
    }
    appends.is_disjoint(&others).then_some(appends)
}

/// A cache append ([`cache_appends`]) into bf16 rows: the old rows copied, the new rounded after
/// them.
pub fn bf16_append_steps(kernel: &OperationRef) -> Result<Steps, String> {
    let body = Body::of(kernel).ok_or("a kernel without a body")?;
    let o = body.ops.first().ok_or("an empty kernel")?;
    let (old, new, out) = (operand_shape(o, 0)?, operand_shape(o, 1)?, result_shape(o, 0)?);
    let d = width(&out)?;
    let wired = body.names == ["concat"] && body.operands_are_args(o) && body.returns_results_of(o);
    if !wired || [&old, &new, &out].iter().any(|s| s.element != "f32" || s.dims.len() != 2) {
        return Err(format!("a cache append of {new} after {old} (a concat of f32 rows)"));
    }
    let step = |new: bool, operands: Vec<Operand>| Step {
        only: None,
        kernel: StepKernel::Row(RowKernel::new(RowOp::Sparse(SparseRow::AppendBf16 { new }), d, "f32")),
        operands,
    };
    Ok(Steps {
        steps: vec![
            step(false, vec![Operand::Arg(0), Operand::Result(0)]),
            step(true, vec![Operand::Arg(1), Operand::Arg(0), Operand::Result(0)]),
        ],
        temps: Vec::new(),
        rope_table: None,
    })
}

fn eps_of(o: &OperationRef) -> Result<f32, String> {
    float_attr(o, "eps").ok_or_else(|| "a norm without an eps".to_string())
}

/// A `layer_norm` of the kernel's (x, w, b) arguments: its row kernel.
fn layer_norm_kernel(body: &Body) -> Result<RowKernel, String> {
    let o = &body.ops[0];
    if o.operand_count() != 3 || !body.operands_are_args(o) {
        return Err("layer_norm of values other than the kernel's (x, w, b) arguments".into());
    }
    let (x, w) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
    if x.element != "f32" || x.dims.len() != 2 {
        return Err(format!("layer_norm of {x} (the row kernels read f32 rows)"));
    }
    Ok(RowKernel::new(RowOp::Sparse(SparseRow::LayerNorm { eps: eps_of(o)? }), width(&w)?, &w.element))
}

/// The sparse-attention kernel `kernel` as one row launch (`None`: not one of its ops).
pub fn row_of_sparse_kernel(kernel: &OperationRef) -> Option<Result<RowLaunch, String>> {
    let body = Body::of(kernel)?;
    let names: Vec<&str> = body.names.iter().map(String::as_str).collect();
    if let ["gather_rows", "attention_decode", "reshape", rest @ ..] = &names[..] {
        return matches!(rest, [] | ["quantize_fp8"]).then(|| selected_attention(&body));
    }
    if names == ["layer_norm", "split", "rope", "concat", "rms_norm", "rope", "concat", "concat"] {
        return Some(latent_key_row(&body));
    }
    let [name] = &body.names[..] else { return None };
    let o = &body.ops[0];
    let launch = |k: RowKernel, operands: Vec<Operand>| RowLaunch { kernel: k, rope_table: None, operands };
    let in_order = || (0..o.operand_count()).map(Operand::Arg).chain((0..o.result_count()).map(Operand::Result));
    let row = || -> Result<RowLaunch, String> {
        if !body.operands_are_args(o) || !body.returns_results_of(o) {
            return Err(format!("{name} with its operands or results in another order"));
        }
        match name.as_str() {
            "layer_norm" => Ok(launch(layer_norm_kernel(&body)?, in_order().collect())),
            "gather_rows" => {
                let (keys, selected) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
                let w = int_attr(o, "width").ok_or("gather_rows without a width")? as usize;
                if keys.element != "f32" || selected.element != "i32" || w > width(&keys)? {
                    return Err(format!("gather_rows of {w} columns from {keys} by {selected}"));
                }
                let decode = keys.dims.len() == 3;
                Ok(launch(
                    RowKernel::new(RowOp::Sparse(SparseRow::GatherRows { decode }), w, "f32"),
                    in_order().collect(),
                ))
            }
            "cache_write" => {
                let (cache, new) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
                if cache.element != "f32" || cache.dims.len() != 3 || new.dims.len() != 2 {
                    return Err(format!("cache_write of {new} into {cache} (f32 rows into [B, S, C])"));
                }
                // The cache is updated in place: its result is its argument.
                // (bf16 rows where the caches are: [`super::row_launch`].)
                let k = RowKernel::new(RowOp::Sparse(SparseRow::CacheWrite { bf16: false }), width(&cache)?, "f32");
                Ok(launch(k, (0..3).map(Operand::Arg).collect()))
            }
            _ => Err(name.clone()),
        }
    };
    matches!(name.as_str(), "layer_norm" | "gather_rows" | "cache_write").then(row)
}

/// The attention over each query's selected rows (`gather_rows` then the absorbed
/// `attention_decode` over them, its output reshaped to token rows, and quantized 1x128 in the fp8
/// graph) as the MLA row reading the selected rows in place: the gathered rows are never written.
fn selected_attention(body: &Body) -> Result<RowLaunch, String> {
    let (gather, att, reshape) = (&body.ops[0], &body.ops[1], &body.ops[2]);
    let quant = body.ops.get(3);
    let arg = |o: &OperationRef, i: usize| o.operand(i).ok().and_then(|v| body.arg(v));
    let from = |o: &OperationRef, i: usize, p: &OperationRef, r: usize| {
        o.operand(i).is_ok_and(|v| p.result(r).is_ok_and(|x| raw(x.into()) == raw(v)))
    };
    let form = att.attribute("form").map(|a| a.to_string()).unwrap_or_default();
    let fp8 = quant.is_some();
    let wired = att.operand_count() == if fp8 { 6 } else { 5 }
        && form.contains("absorbed")
        && from(att, 2, gather, 0)
        && from(att, 3, gather, 1)
        && from(reshape, 0, att, 0)
        && quant.is_none_or(|q| from(q, 0, reshape, 0))
        && body.returns_results_of(quant.unwrap_or(reshape));
    let (keys, selected) = (arg(gather, 0), arg(gather, 1));
    let (q_nope, q_pe, kv_b) = (arg(att, 0), arg(att, 1), arg(att, 4));
    let kv_scale = if fp8 { arg(att, 5).map(Some) } else { Some(None) };
    let (Some(keys), Some(selected), Some(q_nope), Some(q_pe), Some(kv_b), Some(kv_scale), true) =
        (keys, selected, q_nope, q_pe, kv_b, kv_scale, wired)
    else {
        return Err("gather_rows + attention_decode not over the kernel's arguments".into());
    };
    let (qn, qp, rows, kvb) =
        (operand_shape(att, 0)?, operand_shape(att, 1)?, operand_shape(gather, 0)?, operand_shape(att, 4)?);
    if kvb.element != if fp8 { "f8E4M3FN" } else { "bf16" } || qn.element != "f32" || rows.element != "f32" {
        return Err(format!("attention over selected rows of {} with {} kv_b", rows.element, kvb.element));
    }
    let dim = |s: &crate::verify::Shape, i: usize| s.dims.get(i).copied().flatten().ok_or("a dynamic attention dim");
    let (heads, nope, rope) = (dim(&qn, 1)?, dim(&qn, 2)?, dim(&qp, 2)?);
    let (kv_rows, kv) = (dim(&kvb, 0)?, dim(&kvb, 1)?);
    let v = kv_rows / heads - nope;
    if kv + rope > width(&rows)? {
        return Err(format!(
            "attention over rows of {} columns with a latent of {kv} and a rope key of {rope}",
            width(&rows)?
        ));
    }
    let scale = float_attr(att, "scale").ok_or("attention without a scale")?;
    let prefill = rows.dims.len() == 2;
    let op = RowOp::MlaDecode { heads, nope, rope, v, context: 8192, scale, prefill, selected: true };
    let kernel = RowKernel::new(op, kv, if fp8 { "f8E4M3FN" } else { "bf16" });
    let mut operands =
        vec![Operand::Arg(q_nope), Operand::Arg(q_pe), Operand::Arg(keys), Operand::Arg(selected), Operand::Arg(kv_b)];
    operands.extend(kv_scale.map(Operand::Arg));
    operands.extend((0..body.returned.len()).map(Operand::Result));
    Ok(RowLaunch { kernel, rope_table: None, operands })
}

/// The attention over each query's selected rows on the tensor cores, in the absorbed form: the
/// queries absorbed (bf16), the split-K attention kernel of DeepSeek-V3's decode, the splits
/// merged, each head's output through `W_UV` (quantized 1x128 in the fp8 graph). The numerics of
/// V3's tensor-core decode (keys, queries and P in bf16). The attention kernel:
/// the `_sel` variant of V3's decode kernel ([`super::mla::MlaDecodeConfig::selected`]), which
/// gathers each query's selected rows page by page into shared memory: prefill's from the rows
/// every query selects from (pages of them for every query of a 4096-row prefill would be
/// `[4096, 2048, 576]` bf16, 9.7 GB) — from their first `kv + rope` columns copied to bf16 first
/// (`rows_slice_bf16`, then `_sel16`: each row is gathered by many queries, so the gathers read
/// half the bytes for one conversion) —, decode's from its sequence's cache rows (f32: read once,
/// where pages gathered first would write and read them again in bf16; bf16 caches' rows as they
/// are, `_sel16`). Asked for by kind: `prefill`, `decode`; `caches`: the rows' formats.
///
/// `Err`: not this kernel, not a kind asked for, or shapes the templates do not take.
pub fn sparse_attention_steps(
    kernel: &OperationRef,
    prefill: bool,
    decode: bool,
    caches: super::CacheFormats,
) -> Result<Steps, String> {
    use Operand::{Arg, Temp as T};
    let body = Body::of(kernel).ok_or("a kernel without a body")?;
    if !matches!(body.names.first().map(String::as_str), Some("gather_rows")) {
        return Err("not an attention over selected rows".into());
    }
    let launch = selected_attention(&body)?;
    let RowOp::MlaDecode { heads, nope, rope, v, scale, prefill: is_prefill, selected: true, .. } = launch.kernel.op
    else {
        return Err("not an attention over selected rows".into());
    };
    if !(if is_prefill { prefill } else { decode }) {
        return Err(format!(
            "{} attention over selected rows stays on the row",
            ["decode", "prefill"][usize::from(is_prefill)]
        ));
    }
    let weight = launch.kernel.weight.clone();
    let fp8 = weight == "f8E4M3FN";
    let kv = launch.kernel.d;
    // Prefill's queries select from the same rows: a bf16 copy of them (written once, gathered by
    // every query) halves what the gathers read. Decode's read their caches' rows (f32 or bf16).
    let cache16 = if is_prefill { caches.prefill } else { caches.decode } == super::rows::CacheRows::Bf16;
    let copy = is_prefill && !cache16;
    let bf16_rows = copy || cache16;
    let config =
        super::mla::MlaDecodeConfig { kv, rope, bf16_rows, ..super::mla::MlaDecodeConfig::DEEPSEEK_V32_SELECTED };
    config.validate(&crate::target::SM90A)?;
    if fp8 && v != super::rows::GROUP {
        return Err(format!("value heads of {v} (one 128-wide quantization group each)"));
    }
    // The launch's operands: q_nope, q_pe, keys, selected, kv_b (and its scales), the outputs.
    let ops = &launch.operands;
    let (q_nope, q_pe, keys, selected) = (ops[0], ops[1], ops[2], ops[3]);
    let Arg(selected_arg) = selected else { return Err("a selection that is not an argument".into()) };
    let weights: Vec<Operand> = ops[4..if fp8 { 6 } else { 5 }].to_vec();
    let outs: Vec<Operand> = ops[weights.len() + 4..].to_vec();
    let width = kv + rope;
    let k = operand_shape(&body.ops[0], 1)?.dims.get(1).copied().flatten().ok_or("a selection of dynamic width")?;
    let splits = TempDim::SplitsOver { heads, arg: selected_arg, dim: 1 };
    let row = |op: RowOp, d: usize, weight: &str| StepKernel::Row(RowKernel::new(op, d, weight));
    let step = |kernel: StepKernel, operands: Vec<Operand>| Step { only: None, kernel, operands };
    let (absorb, up_v) = super::lower::absorb_and_up_v(heads, nope, rope, v, kv, &weight);
    let selection = Some(super::lower::Selection { keys: k, prefill: is_prefill });
    let attention = StepKernel::MlaDecode(super::lower::MlaDecodeLaunch { config, heads, scale, selection });
    // The key rows are read 16 bytes at a time.
    let cols = width_of(&operand_shape(&body.ops[0], 0)?)?;
    let per_16_bytes = if cache16 { 8 } else { 4 };
    if !cols.is_multiple_of(per_16_bytes) {
        return Err(format!("selected rows of {cols} columns (a multiple of {per_16_bytes})"));
    }
    let mut temps = vec![
        Temp::per_row(heads, width, "bf16"),
        Temp::shaped(vec![splits, TempDim::Rows(heads), TempDim::Fixed(kv)], "f32"),
        Temp::shaped(vec![splits, TempDim::Rows(heads)], "f32"),
        Temp::per_row(heads, kv, "f32"),
    ];
    let mut steps = vec![step(absorb, [vec![q_nope, q_pe], weights.clone(), vec![T(0)]].concat())];
    let keys = match (copy, keys) {
        (false, keys) => keys,
        (true, Arg(arg)) => {
            // The rows' first kv + rope columns (the latent and the rope key) in bf16.
            temps.push(Temp::shaped(
                vec![TempDim::Arg { arg, dim: 0, align: 1, div: 1 }, TempDim::Fixed(width)],
                "bf16",
            ));
            steps.push(step(row(RowOp::Train(TrainRow::Slice { start: 0 }), width, "bf16"), vec![keys, T(4)]));
            T(4)
        }
        (true, _) => return Err("prefill's key rows that are not an argument".into()),
    };
    steps.extend([
        step(attention, vec![T(0), keys, selected, T(1), T(2)]),
        step(row(RowOp::MlaCombine, kv, "f32"), vec![T(1), T(2), T(3)]),
        step(up_v, [vec![T(3)], weights, outs].concat()),
    ]);
    Ok(Steps { temps, steps, rope_table: None })
}

/// The sparse-attention kernel `kernel` as several launches (`None`: not one of these kernels).
pub fn steps_of_sparse_kernel(kernel: &OperationRef) -> Option<Result<Steps, String>> {
    let body = Body::of(kernel)?;
    let names: Vec<&str> = body.names.iter().map(String::as_str).collect();
    match names[..] {
        ["layer_norm", "split"] => Some(layer_norm_split(&body)),
        ["sparse_index"] => Some(sparse_index(&body, false, false)),
        ["rms_norm", "rope", "concat", "concat"] => Some(latent_with_key(&body)),
        _ => None,
    }
}

/// `layer_norm` split along its columns: the row into a temporary, each returned piece copied out.
fn layer_norm_split(body: &Body) -> Result<Steps, String> {
    let (norm, split) = (&body.ops[0], &body.ops[1]);
    let k = layer_norm_kernel(body)?;
    let chained = split.operand(0).is_ok_and(|v| norm.result(0).is_ok_and(|r| raw(r.into()) == raw(v)));
    if !chained || int_attr(split, "axis") != Some(1) {
        return Err("a split of another value than the layer_norm's rows".into());
    }
    let d = k.d;
    let mut steps = vec![Step {
        only: None,
        kernel: StepKernel::Row(k),
        operands: vec![Operand::Arg(0), Operand::Arg(1), Operand::Arg(2), Operand::Temp(0)],
    }];
    let mut start = 0;
    for piece in 0..split.result_count() {
        let w = width(&result_shape(split, piece)?)?;
        let r = split.result(piece).map_err(|e| e.to_string())?;
        if let Some(i) = returned_as(body, r.into()) {
            let copy = RowKernel::new(RowOp::Train(TrainRow::Columns { start, stride: d }), w, "f32");
            steps.push(Step {
                only: None,
                kernel: StepKernel::Row(copy),
                operands: vec![Operand::Temp(0), Operand::Result(i)],
            });
        }
        start += w;
    }
    if steps.len() != body.returned.len() + 1 {
        return Err("a layer_norm returning values other than its pieces".into());
    }
    Ok(Steps { steps, temps: vec![Temp::per_row(1, d, "f32")], rope_table: None })
}

/// `sparse_index` with its scores on the tensor cores ([`SparseRow::IndexScores`] `mma`) where the
/// attention of its mode is (`prefill`, `decode`: the tensor-core attention's); None for another
/// kernel, a mode whose attention is on the CUDA cores (the reference's arithmetic throughout),
/// or a shape the tensor-core kernel does not take (then the CUDA-core kernel scores it; never
/// over bf16 rows: [`cache_formats`] keeps f32 caches then). `caches`: the key rows' formats.
pub fn tensor_core_index_steps(
    kernel: &OperationRef,
    prefill: bool,
    decode: bool,
    caches: super::CacheFormats,
) -> Option<Steps> {
    let body = Body::of(kernel)?;
    if body.names != ["sparse_index"] {
        return None;
    }
    let decode_kernel = body.ops[0].operand_count() == 4;
    let tensor_cores = if decode_kernel { decode } else { prefill };
    let cache = if decode_kernel { caches.decode } else { caches.prefill };
    let bf16_keys = cache == super::rows::CacheRows::Bf16;
    tensor_cores.then(|| sparse_index(&body, true, bf16_keys).ok()).flatten()
}

/// `sparse_index`: the scores (on the tensor cores: `mma`; over bf16 key rows: `bf16_keys`), then
/// the selection.
fn sparse_index(body: &Body, mma: bool, bf16_keys: bool) -> Result<Steps, String> {
    let o = &body.ops[0];
    if !body.operands_are_args(o) || !body.returns_results_of(o) {
        return Err("sparse_index with its operands or results in another order".into());
    }
    let (q, keys) = (operand_shape(o, 0)?, operand_shape(o, 2)?);
    let decode = o.operand_count() == 4;
    let top_k = int_attr(o, "top_k").ok_or("sparse_index without top_k")? as usize;
    let heads = q.dims.get(1).copied().flatten().ok_or("sparse_index with dynamic heads")?;
    let di = width(&q)?;
    if q.element != "f32"
        || keys.element != "f32"
        || keys.dims.len() != if decode { 3 } else { 2 }
        || di > width(&keys)?
    {
        return Err(format!("sparse_index of {q} over {keys}"));
    }
    if bf16_keys && !width(&keys)?.is_multiple_of(2) {
        return Err(format!("sparse_index over bf16 rows of {keys} (an even width: keys read in pairs)"));
    }
    let op = SparseRow::IndexScores { heads, decode, top_k, mma, bf16_keys };
    let scores = RowKernel::new(RowOp::Sparse(op), di, "f32");
    scores.validate(&crate::target::SM90A)?;
    let top = RowKernel::new(RowOp::Sparse(SparseRow::TopKeys { decode }), top_k, "f32");
    let mut score_ops = vec![Operand::Arg(0), Operand::Arg(1), Operand::Arg(2)];
    let mut top_ops = vec![Operand::Temp(0)];
    if decode {
        score_ops.push(Operand::Arg(3));
        top_ops.push(Operand::Arg(3));
    }
    score_ops.push(Operand::Temp(0));
    top_ops.push(Operand::Result(0));
    // A row of scores per query, a column per key row (the cache's, or the sequence's).
    let key_rows = TempDim::Arg { arg: 2, dim: usize::from(decode), align: 1, div: 1 };
    Ok(Steps {
        steps: vec![
            Step { only: None, kernel: StepKernel::Row(scores), operands: score_ops },
            Step { only: None, kernel: StepKernel::Row(top), operands: top_ops },
        ],
        temps: vec![Temp::shaped(vec![TempDim::Rows(1), key_rows], "f32")],
        rope_table: None,
    })
}

/// V3.2's cache row with its indexer key normalized and rotated in the kernel (`fuse-mla-projections`
/// puts them together): `concat(concat(rms_norm(latent, w), rope(k_pe, p)), concat(rope(k.0, p),
/// k.1))`, `k = split(layer_norm(key, kw, kb))`, as one [`RowOp::LatentKey`] launch.
fn latent_key_row(body: &Body) -> Result<RowLaunch, String> {
    let o = &body.ops;
    let (ln, split, rope_k, key, norm, rope, join, row) = (&o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7]);
    let arg = |o: &OperationRef, i: usize| o.operand(i).ok().and_then(|v| body.arg(v));
    let from = |o: &OperationRef, i: usize, p: &OperationRef, r: usize| {
        o.operand(i).is_ok_and(|v| p.result(r).is_ok_and(|x| raw(x.into()) == raw(v)))
    };
    let positions = arg(rope, 1);
    let args = |o: &OperationRef| (0..o.operand_count()).all(|i| arg(o, i).is_some());
    let wired = ln.operand_count() == 3
        && args(ln)
        && from(split, 0, ln, 0)
        && split.result_count() == 2
        && from(rope_k, 0, split, 0)
        && positions.is_some()
        && arg(rope_k, 1) == positions
        && from(key, 0, rope_k, 0)
        && from(key, 1, split, 1)
        && norm.operand_count() == 2
        && args(norm)
        && arg(rope, 0).is_some()
        && from(join, 0, norm, 0)
        && from(join, 1, rope, 0)
        && from(row, 0, join, 0)
        && from(row, 1, key, 0)
        && body.returns_results_of(row)
        && [split, key, join, row].iter().all(|o| int_attr(o, "axis") == Some(1));
    if !wired {
        return Err("layer_norm + rope of the indexer key and rms_norm + rope of the latent not in the cache \
                    row's order"
            .into());
    }
    let (latent, w, k_pe, k, kw) = (
        operand_shape(norm, 0)?,
        operand_shape(norm, 1)?,
        operand_shape(rope, 0)?,
        operand_shape(ln, 0)?,
        operand_shape(ln, 1)?,
    );
    if [&latent, &k_pe, &k].iter().any(|s| s.element != "f32" || s.dims.len() != 2) {
        return Err("a latent row of non-f32 values".into());
    }
    if kw.element != w.element || operand_shape(ln, 2)?.element != w.element {
        return Err(format!("norm weights of {} and {} in one row", w.element, kw.element));
    }
    let (d, r, kd) = (width(&w)?, width(&k_pe)?, width(&kw)?);
    let (table, interleave) = rope_table_of(rope)?;
    let (key_table, key_interleave) = rope_table_of(rope_k)?;
    if table.dim != r || key_table != table || key_interleave || width(&result_shape(split, 0)?)? != r {
        return Err(format!("the indexer key's rope (width {}) not the latent's rope of {r}", key_table.dim));
    }
    let op = RowOp::LatentKey { eps: eps_of(norm)?, rope: r, interleave, key: kd, key_eps: eps_of(ln)? };
    let kernel = RowKernel::new(op, d, &w.element);
    let a = |o: &OperationRef, i: usize| Operand::Arg(arg(o, i).expect("wired: an argument"));
    Ok(RowLaunch {
        kernel,
        rope_table: Some(table),
        operands: vec![
            a(norm, 0),
            a(norm, 1),
            a(rope, 0),
            a(rope, 1),
            a(ln, 0),
            a(ln, 1),
            a(ln, 2),
            Operand::RopeTable,
            Operand::Result(0),
        ],
    })
}

/// V3.2's latent row: `concat(concat(rms_norm(latent, w), rope(k_pe, positions)), key)` over the
/// arguments (latent, w, k_pe, positions, key), returned (the cache store is a kernel of its own).
fn latent_with_key(body: &Body) -> Result<Steps, String> {
    let (norm, rope, join, join2) = (&body.ops[0], &body.ops[1], &body.ops[2], &body.ops[3]);
    let arg = |o: &OperationRef, i: usize, a: usize| o.operand(i).is_ok_and(|v| body.arg(v) == Some(a));
    let from = |o: &OperationRef, i: usize, p: &OperationRef| {
        o.operand(i).is_ok_and(|v| p.result(0).is_ok_and(|r| raw(r.into()) == raw(v)))
    };
    let wired = arg(norm, 0, 0)
        && arg(norm, 1, 1)
        && arg(rope, 0, 2)
        && arg(rope, 1, 3)
        && from(join, 0, norm)
        && from(join, 1, rope)
        && from(join2, 0, join)
        && arg(join2, 1, 4)
        && body.returns_results_of(join2);
    if !wired {
        return Err(
            "rms_norm + rope + concat + concat not in the latent row's (latent, w, k_pe, positions, key) order".into(),
        );
    }
    let (latent, w, k_pe, key) =
        (operand_shape(norm, 0)?, operand_shape(norm, 1)?, operand_shape(rope, 0)?, operand_shape(join2, 1)?);
    if [&latent, &k_pe, &key].iter().any(|s| s.element != "f32" || s.dims.len() != 2) {
        return Err("a latent row of non-f32 values".into());
    }
    let (d, r, kd) = (width(&w)?, width(&k_pe)?, width(&key)?);
    let (table, interleave) = rope_table_of(rope)?;
    if table.dim != r {
        return Err(format!("rope of width {} on k_pe of {r}", table.dim));
    }
    let row = |k: RowKernel, operands: Vec<Operand>| Step { only: None, kernel: StepKernel::Row(k), operands };
    let norm_k = RowKernel::new(RowOp::RmsNorm { eps: eps_of(norm)?, keep: true, quantize: false }, d, &w.element);
    let rope_k = RowKernel::new(RowOp::Train(TrainRow::Rope { heads: 1, interleave, inverse: false }), r, "f32");
    let join_k = |a: usize, b: usize| RowKernel::new(RowOp::Train(TrainRow::Join { second: b }), a, "f32");
    Ok(Steps {
        steps: vec![
            row(norm_k, vec![Operand::Arg(0), Operand::Arg(1), Operand::Temp(0)]),
            row(rope_k, vec![Operand::Arg(2), Operand::Arg(3), Operand::RopeTable, Operand::Temp(1)]),
            row(join_k(d, r), vec![Operand::Temp(0), Operand::Temp(1), Operand::Temp(2)]),
            row(join_k(d + r, kd), vec![Operand::Temp(2), Operand::Arg(4), Operand::Result(0)]),
        ],
        temps: vec![Temp::per_row(1, d, "f32"), Temp::per_row(1, r, "f32"), Temp::per_row(1, d + r, "f32")],
        rope_table: Some(table),
    })
}

#[cfg(test)]
mod tests {
    /// A module of a cache append (`concat_0`: an entry's `kv_cache.0` input, then the new rows),
    /// what reads its result (`reader`: a kernel of one `v3.<reader>` op over it), and (`other`) a
    /// second call of the append kernel over rows that are not a cache.
    fn module_text(reader: &str, other: bool) -> String {
        let rows = "tensor<?x8xf32>";
        let (reader_fn, read) = match reader {
            "gather_rows" => (
                format!(
                    "func.func private @reader_0(%arg0: {rows}, %arg1: tensor<?x2xi32>) -> (tensor<?x2x8xf32>, tensor<?xi64>) \
                     attributes {{v3.kernel = \"gather_rows\"}} {{
    %0:2 = \"v3.gather_rows\"(%arg0, %arg1) {{width = 8 : i64}} : ({rows}, tensor<?x2xi32>) -> (tensor<?x2x8xf32>, tensor<?xi64>)
    return %0#0, %0#1 : tensor<?x2x8xf32>, tensor<?xi64>
  }}"
                ),
                format!("%r:2 = call @reader_0(%c, %sel) : ({rows}, tensor<?x2xi32>) -> (tensor<?x2x8xf32>, tensor<?xi64>)"),
            ),
            _ => (
                format!(
                    "func.func private @reader_0(%arg0: {rows}, %arg1: tensor<8xbf16>) -> {rows} attributes {{v3.kernel = \"rms_norm\"}} {{
    %0 = \"v3.rms_norm\"(%arg0, %arg1) {{eps = 1.0E-6 : f32}} : ({rows}, tensor<8xbf16>) -> {rows}
    return %0 : {rows}
  }}"
                ),
                format!("%r = call @reader_0(%c, %w) : ({rows}, tensor<8xbf16>) -> {rows}"),
            ),
        };
        let again =
            if other { format!("%o = call @concat_0(%new, %new) : ({rows}, {rows}) -> {rows}") } else { String::new() };
        format!(
            "module {{
  func.func private @concat_0(%arg0: {rows}, %arg1: {rows}) -> {rows} attributes {{v3.kernel = \"concat\"}} {{
    %0 = \"v3.concat\"(%arg0, %arg1) {{axis = 0 : i64}} : ({rows}, {rows}) -> {rows}
    return %0 : {rows}
  }}
  {reader_fn}
  func.func @prefill(%cache: {rows} {{v3.input = \"kv_cache.0\"}}, %new: {rows} {{v3.input = \"rows\"}}, \
%sel: tensor<?x2xi32> {{v3.input = \"selected\"}}, %w: tensor<8xbf16> {{v3.param = \"w\"}}) -> {rows} {{
    %c = call @concat_0(%cache, %new) : ({rows}, {rows}) -> {rows}
    {read}
    {again}
    return %c : {rows}
  }}
}}"
        )
    }

    /// The append is found where only the sparse attention's kernels read its result; not where
    /// another kernel does, nor where its kernel also joins rows that are not a cache.
    #[test]
    fn cache_appends_are_the_caches_concats_only_the_sparse_kernels_read() {
        let context = crate::mlir::new_context();
        v3c_dialects::load(&context).unwrap();
        let appends = |reader: &str, other: bool| {
            let module = crate::mlir::parse_module(&context, &module_text(reader, other), "appends.mlir")
                .unwrap_or_else(|e| panic!("{e}"));
            super::cache_appends(&module).map(|a| a.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(appends("gather_rows", false), Some(vec!["concat_0".to_string()]));
        assert_eq!(appends("rms_norm", false), None);
        assert_eq!(appends("gather_rows", true), None);
    }
}
