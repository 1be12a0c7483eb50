//! Typed builders: one function per `v3` op, taking operands, result types and the op's attributes.
//! Each returns the created (unattached) operation or an error naming the op.

use melior::ir::attribute::{
    BoolAttribute, DenseI32ArrayAttribute, DenseI64ArrayAttribute, FloatAttribute, IntegerAttribute, StringAttribute,
};
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Attribute, Identifier, Location, Operation, Type, Value};
use melior::Context;

use crate::DialectError;

/// Op names, in the order of the IRDL file.
pub const OP_NAMES: &[&str] = &[
    "embed",
    "linear",
    "rms_norm",
    "rope",
    "attention",
    "attention_decode",
    "cache_write",
    "layer_norm",
    "sparse_index",
    "gather_rows",
    "moe_route",
    "moe_experts",
    "moe_dispatch",
    "moe_gate_up",
    "moe_down",
    "silu_mul",
    "add",
    "split",
    "concat",
    "reshape",
    "quantize_fp8",
    "lm_head",
    "cross_entropy",
    "cross_entropy_grad",
    "matmul",
    "rms_norm_grad",
    "silu_mul_grad",
    "embed_grad",
    "rope_grad",
    "attention_grad",
    "concat_grad",
    "split_grad",
    "route_logits_grad",
    "balance_loss",
    "balance_loss_grad",
    "moe_experts_grad",
    "fp8_linear",
    "fp8_linear_dgrad",
    "fp8_linear_wgrad",
];

/// The full op name (`v3.<op>`) of a bare op name from [`OP_NAMES`].
pub fn qualified(op: &str) -> String {
    format!("{}.{op}", crate::DIALECT)
}

fn build<'c>(
    name: &str,
    operands: &[Value<'c, '_>],
    results: &[Type<'c>],
    attributes: &[(&str, Attribute<'c>)],
    context: &'c Context,
    location: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let attrs: Vec<(Identifier, Attribute)> =
        attributes.iter().map(|(k, v)| (Identifier::new(context, k), *v)).collect();
    OperationBuilder::new(&format!("v3.{name}"), location)
        .add_operands(operands)
        .add_results(results)
        .add_attributes(&attrs)
        .build()
        .map_err(|e| DialectError::Build { op: format!("v3.{name}"), reason: e.to_string() })
}

fn i64_attr<'c>(c: &'c Context, v: i64) -> Attribute<'c> {
    IntegerAttribute::new(IntegerType::new(c, 64).into(), v).into()
}

fn f32_attr<'c>(c: &'c Context, v: f32) -> Attribute<'c> {
    FloatAttribute::new(c, melior::ir::r#type::Type::float32(c), v as f64).into()
}

fn f64_attr<'c>(c: &'c Context, v: f64) -> Attribute<'c> {
    FloatAttribute::new(c, melior::ir::r#type::Type::float64(c), v).into()
}

fn bool_attr<'c>(c: &'c Context, v: bool) -> Attribute<'c> {
    BoolAttribute::new(c, v).into()
}

fn str_attr<'c>(c: &'c Context, v: &str) -> Attribute<'c> {
    StringAttribute::new(c, v).into()
}

/// `array<f32: ...>` (melior has no typed builder for it; the text form is exact: Rust prints the
/// shortest representation that round-trips).
fn f32_array_attr<'c>(c: &'c Context, values: &[f32]) -> Result<Attribute<'c>, DialectError> {
    let text: Vec<String> = values.iter().map(|v| format!("{v:.9e}")).collect();
    Attribute::parse(c, &format!("array<f32: {}>", text.join(", ")))
        .ok_or_else(|| DialectError::Build { op: "v3.rope".into(), reason: "inv_freq array does not parse".into() })
}

/// `operandSegmentSizes` for ops with optional operands.
fn segments<'c>(c: &'c Context, sizes: &[i32]) -> Attribute<'c> {
    DenseI32ArrayAttribute::new(c, sizes).into()
}

/// Creates `v3.embed`: rows of `table` `[V, D]` picked by `ids` `[N]`.
pub fn embed<'c>(
    table: Value<'c, '_>,
    ids: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("embed", &[table, ids], &[out], &[], c, l)
}

/// Creates `v3.linear`: `x @ w^T`; fp8 activations carry `x_scale`, fp8 weights `w_scale`.
pub fn linear<'c, 'a>(
    x: Value<'c, 'a>,
    x_scale: Option<Value<'c, 'a>>,
    w: Value<'c, 'a>,
    w_scale: Option<Value<'c, 'a>>,
    y: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![x];
    operands.extend(x_scale);
    operands.push(w);
    operands.extend(w_scale);
    let seg = segments(c, &[1, x_scale.is_some() as i32, 1, w_scale.is_some() as i32]);
    build("linear", &operands, &[y], &[("operandSegmentSizes", seg)], c, l)
}

/// Creates `v3.rms_norm` over the last axis.
pub fn rms_norm<'c>(
    x: Value<'c, '_>,
    w: Value<'c, '_>,
    eps: f32,
    y: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("rms_norm", &[x, w], &[y], &[("eps", f32_attr(c, eps))], c, l)
}

/// Attributes of `v3.rope`.
#[derive(Debug, Clone)]
pub struct RopeAttributes<'a> {
    pub dim: usize,
    pub theta: f64,
    pub interleave: bool,
    pub inv_freq: &'a [f32],
    pub attention_factor: f32,
}

/// Creates `v3.rope`: rotates the last `dim` values at absolute `positions`.
pub fn rope<'c>(
    x: Value<'c, '_>,
    positions: Value<'c, '_>,
    a: &RopeAttributes,
    y: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("rope", &[x, positions], &[y], &rope_attrs(c, a)?, c, l)
}

fn rope_attrs<'c>(c: &'c Context, a: &RopeAttributes) -> Result<[(&'static str, Attribute<'c>); 5], DialectError> {
    Ok([
        ("dim", i64_attr(c, a.dim as i64)),
        ("theta", f64_attr(c, a.theta)),
        ("interleave", bool_attr(c, a.interleave)),
        ("inv_freq", f32_array_attr(c, a.inv_freq)?),
        ("attention_factor", f32_attr(c, a.attention_factor)),
    ])
}

/// Attributes of the MLA ops.
#[derive(Debug, Clone, Copy)]
pub struct AttentionAttributes<'a> {
    pub form: &'a str,
    pub scale: f32,
    pub kv_lora_rank: usize,
}

fn attention_attrs<'c>(c: &'c Context, a: &AttentionAttributes) -> [(&'static str, Attribute<'c>); 3] {
    [
        ("form", str_attr(c, a.form)),
        ("scale", f32_attr(c, a.scale)),
        ("kv_lora_rank", i64_attr(c, a.kv_lora_rank as i64)),
    ]
}

/// Creates `v3.attention`: causal MLA over one sequence's latent rows.
#[allow(clippy::too_many_arguments)]
pub fn attention<'c, 'a>(
    q_nope: Value<'c, 'a>,
    q_pe: Value<'c, 'a>,
    latent: Value<'c, 'a>,
    kv_b: Value<'c, 'a>,
    kv_b_scale: Option<Value<'c, 'a>>,
    a: &AttentionAttributes,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![q_nope, q_pe, latent, kv_b];
    operands.extend(kv_b_scale);
    build("attention", &operands, &[out], &attention_attrs(c, a), c, l)
}

/// Creates `v3.attention_decode`: MLA for one new token per sequence over per-sequence caches.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<'c, 'a>(
    q_nope: Value<'c, 'a>,
    q_pe: Value<'c, 'a>,
    latent: Value<'c, 'a>,
    positions: Value<'c, 'a>,
    kv_b: Value<'c, 'a>,
    kv_b_scale: Option<Value<'c, 'a>>,
    a: &AttentionAttributes,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![q_nope, q_pe, latent, positions, kv_b];
    operands.extend(kv_b_scale);
    build("attention_decode", &operands, &[out], &attention_attrs(c, a), c, l)
}

/// Creates `v3.cache_write`: one entry per sequence written at its position.
pub fn cache_write<'c>(
    cache: Value<'c, '_>,
    entries: Value<'c, '_>,
    positions: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("cache_write", &[cache, entries, positions], &[out], &[], c, l)
}

/// Creates `v3.layer_norm`: `torch.nn.LayerNorm` with weight `w` and bias `b`.
pub fn layer_norm<'c>(
    [x, w, b]: [Value<'c, '_>; 3],
    eps: f32,
    y: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("layer_norm", &[x, w, b], &[y], &[("eps", f32_attr(c, eps))], c, l)
}

/// Creates `v3.sparse_index`: the indexer's `top_k` keys per query (decode's with `positions`).
pub fn sparse_index<'c>(
    [q, w, keys]: [Value<'c, '_>; 3],
    positions: Option<Value<'c, '_>>,
    top_k: usize,
    selected: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let operands: Vec<Value> = [q, w, keys].into_iter().chain(positions).collect();
    build("sparse_index", &operands, &[selected], &[("top_k", i64_attr(c, top_k as i64))], c, l)
}

/// Creates `v3.gather_rows`: `(rows, last)` of the selected rows' first `width` columns.
pub fn gather_rows<'c>(
    latent: Value<'c, '_>,
    selected: Value<'c, '_>,
    width: usize,
    [rows, last]: [Type<'c>; 2],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("gather_rows", &[latent, selected], &[rows, last], &[("width", i64_attr(c, width as i64))], c, l)
}

/// Attributes of `v3.moe_route`.
#[derive(Debug, Clone, Copy)]
pub struct RouteAttributes {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    /// DeepSeek-V2's softmax routing (attribute `scoring = "softmax"`, no bias operand); absent:
    /// DeepSeek-V3's sigmoid with the bias.
    pub softmax: bool,
}

/// Creates `v3.moe_route`: sigmoid scores, biased group-limited top-k, normalized weights (or,
/// with `softmax` and no bias, DeepSeek-V2's softmax routing).
#[allow(clippy::too_many_arguments)]
pub fn moe_route<'c>(
    x: Value<'c, '_>,
    gate: Value<'c, '_>,
    bias: Option<Value<'c, '_>>,
    a: &RouteAttributes,
    indices: Type<'c>,
    weights: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let operands: Vec<Value> = [x, gate].into_iter().chain(bias).collect();
    build("moe_route", &operands, &[indices, weights], &route_attrs(c, a), c, l)
}

/// The routing attributes `moe_route` and `moe_dispatch` share.
fn route_attrs<'c>(c: &'c Context, a: &RouteAttributes) -> Vec<(&'static str, Attribute<'c>)> {
    let mut attrs = vec![
        ("top_k", i64_attr(c, a.top_k as i64)),
        ("n_group", i64_attr(c, a.n_group as i64)),
        ("topk_group", i64_attr(c, a.topk_group as i64)),
        ("norm_topk_prob", bool_attr(c, a.norm_topk_prob)),
        ("routed_scaling_factor", f32_attr(c, a.routed_scaling_factor)),
    ];
    if a.softmax {
        attrs.push(("scoring", str_attr(c, "softmax")));
    }
    attrs
}

/// Expert weights stacked over experts, with block scales when fp8.
#[derive(Clone, Copy)]
pub struct StackedExperts<'c, 'a> {
    pub gate: Value<'c, 'a>,
    pub up: Value<'c, 'a>,
    pub down: Value<'c, 'a>,
    pub scales: Option<[Value<'c, 'a>; 3]>,
}

/// Creates `v3.moe_experts`: routed SwiGLU experts combined with the routing weights.
#[allow(clippy::too_many_arguments)]
pub fn moe_experts<'c, 'a>(
    x: Value<'c, 'a>,
    indices: Value<'c, 'a>,
    weights: Value<'c, 'a>,
    experts: StackedExperts<'c, 'a>,
    num_experts: usize,
    fp8_activations: bool,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![x, indices, weights, experts.gate, experts.up, experts.down];
    let s = experts.scales.is_some() as i32;
    if let Some(scales) = experts.scales {
        operands.extend(scales);
    }
    let attrs = [
        ("num_experts", i64_attr(c, num_experts as i64)),
        ("fp8_activations", bool_attr(c, fp8_activations)),
        ("operandSegmentSizes", segments(c, &[1, 1, 1, 1, 1, 1, s, s, s])),
    ];
    build("moe_experts", &operands, &[out], &attrs, c, l)
}

/// Creates `v3.moe_dispatch`: routing plus the permutation of (token, expert) rows by expert, the
/// `num_shared` shared experts after the routed ones.
#[allow(clippy::too_many_arguments)]
pub fn moe_dispatch<'c>(
    x: Value<'c, '_>,
    gate: Value<'c, '_>,
    bias: Option<Value<'c, '_>>,
    a: &RouteAttributes,
    num_shared: usize,
    [offsets, rows, row_weights]: [Type<'c>; 3],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut attrs = route_attrs(c, a);
    attrs.push(("num_shared", i64_attr(c, num_shared as i64)));
    let operands: Vec<Value> = [x, gate].into_iter().chain(bias).collect();
    build("moe_dispatch", &operands, &[offsets, rows, row_weights], &attrs, c, l)
}

/// A weight with its block scales when fp8.
#[derive(Clone, Copy)]
pub struct Scaled<'c, 'a> {
    pub weight: Value<'c, 'a>,
    pub scale: Option<Value<'c, 'a>>,
}

/// The permutation `v3.moe_dispatch` produces: offsets per expert and the token of each row.
#[derive(Clone, Copy)]
pub struct Permutation<'c, 'a> {
    pub offsets: Value<'c, 'a>,
    pub rows: Value<'c, 'a>,
}

/// Creates `v3.moe_gate_up`: grouped gate/up GEMM over permuted rows (gathered from `x`) with
/// SwiGLU; `shared` = the shared experts' (gate, up), stacked along their output rows.
#[allow(clippy::too_many_arguments)]
pub fn moe_gate_up<'c, 'a>(
    x: Scaled<'c, 'a>,
    p: Permutation<'c, 'a>,
    (gate, up): (Scaled<'c, 'a>, Scaled<'c, 'a>),
    shared: Option<(Scaled<'c, 'a>, Scaled<'c, 'a>)>,
    (num_experts, num_shared): (usize, usize),
    h: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![x.weight];
    operands.extend(x.scale);
    operands.extend([p.offsets, p.rows, gate.weight, up.weight]);
    operands.extend(gate.scale);
    operands.extend(up.scale);
    let n = |v: Option<Value>| v.is_some() as i32;
    let (sg, su) = (shared.map(|s| s.0), shared.map(|s| s.1));
    operands.extend(sg.map(|s| s.weight));
    operands.extend(su.map(|s| s.weight));
    operands.extend(sg.and_then(|s| s.scale));
    operands.extend(su.and_then(|s| s.scale));
    let seg = [
        1,
        n(x.scale),
        1,
        1,
        1,
        1,
        n(gate.scale),
        n(up.scale),
        n(sg.map(|s| s.weight)),
        n(su.map(|s| s.weight)),
        n(sg.and_then(|s| s.scale)),
        n(su.and_then(|s| s.scale)),
    ];
    let attrs = [
        ("num_experts", i64_attr(c, num_experts as i64)),
        ("num_shared", i64_attr(c, num_shared as i64)),
        ("operandSegmentSizes", segments(c, &seg)),
    ];
    build("moe_gate_up", &operands, &[h], &attrs, c, l)
}

/// Creates `v3.moe_down`: grouped down GEMM over the permuted rows `h`, scattered into the
/// tokens' rows with the row weights (the combine), plus `residual` when given.
#[allow(clippy::too_many_arguments)]
pub fn moe_down<'c, 'a>(
    h: Scaled<'c, 'a>,
    p: Permutation<'c, 'a>,
    row_weights: Value<'c, 'a>,
    down: Scaled<'c, 'a>,
    shared: Option<Scaled<'c, 'a>>,
    residual: Option<Value<'c, 'a>>,
    (num_experts, num_shared): (usize, usize),
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![h.weight];
    operands.extend(h.scale);
    operands.extend([p.offsets, p.rows, row_weights, down.weight]);
    operands.extend(down.scale);
    operands.extend(shared.map(|s| s.weight));
    operands.extend(shared.and_then(|s| s.scale));
    operands.extend(residual);
    let n = |v: Option<Value>| v.is_some() as i32;
    let seg = [
        1,
        n(h.scale),
        1,
        1,
        1,
        1,
        n(down.scale),
        n(shared.map(|s| s.weight)),
        n(shared.and_then(|s| s.scale)),
        n(residual),
    ];
    let attrs = [
        ("num_experts", i64_attr(c, num_experts as i64)),
        ("num_shared", i64_attr(c, num_shared as i64)),
        ("operandSegmentSizes", segments(c, &seg)),
    ];
    build("moe_down", &operands, &[out], &attrs, c, l)
}

/// Creates `v3.silu_mul`: `silu(gate) * up`.
pub fn silu_mul<'c>(
    gate: Value<'c, '_>,
    up: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("silu_mul", &[gate, up], &[out], &[], c, l)
}

/// Creates `v3.add`.
pub fn add<'c>(
    lhs: Value<'c, '_>,
    rhs: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("add", &[lhs, rhs], &[out], &[], c, l)
}

/// Creates `v3.split`: `[head, tail]` sizes along `axis`.
pub fn split<'c>(
    x: Value<'c, '_>,
    axis: usize,
    sizes: [usize; 2],
    parts: [Type<'c>; 2],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let sizes = [sizes[0] as i64, sizes[1] as i64];
    let attrs = [("axis", i64_attr(c, axis as i64)), ("sizes", DenseI64ArrayAttribute::new(c, &sizes).into())];
    build("split", &[x], &parts, &attrs, c, l)
}

/// Creates `v3.concat` of two tensors along `axis`.
pub fn concat<'c>(
    lhs: Value<'c, '_>,
    rhs: Value<'c, '_>,
    axis: usize,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("concat", &[lhs, rhs], &[out], &[("axis", i64_attr(c, axis as i64))], c, l)
}

/// Creates `v3.reshape` to the result type's shape.
pub fn reshape<'c>(
    x: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("reshape", &[x], &[out], &[], c, l)
}

/// Creates `v3.quantize_fp8`: 1 x `group` e4m3 quantization with f32 scales.
pub fn quantize_fp8<'c>(
    x: Value<'c, '_>,
    group: usize,
    xq: Type<'c>,
    scales: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("quantize_fp8", &[x], &[xq, scales], &[("group", i64_attr(c, group as i64))], c, l)
}

/// Creates `v3.lm_head`: vocabulary logits in f32.
pub fn lm_head<'c>(
    x: Value<'c, '_>,
    w: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("lm_head", &[x, w], &[out], &[], c, l)
}

// --- Training ops (losses and vector-Jacobian products).

/// Creates `v3.cross_entropy` (`grad` false: the `[1]` loss) or `v3.cross_entropy_grad` (`grad`
/// true: d loss / d logits), both weighted by `weight`.
pub fn cross_entropy<'c>(
    logits: Value<'c, '_>,
    targets: Value<'c, '_>,
    weight: f32,
    grad: bool,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let name = if grad { "cross_entropy_grad" } else { "cross_entropy" };
    build(name, &[logits, targets], &[out], &[("weight", f32_attr(c, weight))], c, l)
}

/// Creates `v3.matmul`: `a' @ b'` with the transposes asked for.
pub fn matmul<'c>(
    a: Value<'c, '_>,
    b: Value<'c, '_>,
    (transpose_a, transpose_b): (bool, bool),
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let attrs = [("transpose_a", bool_attr(c, transpose_a)), ("transpose_b", bool_attr(c, transpose_b))];
    build("matmul", &[a, b], &[out], &attrs, c, l)
}

/// Creates `v3.rms_norm_grad`: `(dx, dw)`.
pub fn rms_norm_grad<'c>(
    [x, w, dy]: [Value<'c, '_>; 3],
    eps: f32,
    results: [Type<'c>; 2],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("rms_norm_grad", &[x, w, dy], &results, &[("eps", f32_attr(c, eps))], c, l)
}

/// Creates `v3.silu_mul_grad`: `(d gate, d up)`.
pub fn silu_mul_grad<'c>(
    [gate, up, dy]: [Value<'c, '_>; 3],
    results: [Type<'c>; 2],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("silu_mul_grad", &[gate, up, dy], &results, &[], c, l)
}

/// Creates `v3.embed_grad`: the `[vocab, D]` table gradient.
pub fn embed_grad<'c>(
    ids: Value<'c, '_>,
    dy: Value<'c, '_>,
    vocab: usize,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("embed_grad", &[ids, dy], &[out], &[("vocab", i64_attr(c, vocab as i64))], c, l)
}

/// Creates `v3.rope_grad`: the inverse rotation of `rope` with attributes `a`.
pub fn rope_grad<'c>(
    dy: Value<'c, '_>,
    positions: Value<'c, '_>,
    a: &RopeAttributes,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("rope_grad", &[dy, positions], &[out], &rope_attrs(c, a)?, c, l)
}

/// Creates `v3.attention_grad` (naive form): operands `[q_nope, q_pe, latent, kv_b, d out]`,
/// results their gradients but d out's.
pub fn attention_grad<'c>(
    operands: [Value<'c, '_>; 5],
    scale: f32,
    kv_lora_rank: usize,
    results: [Type<'c>; 4],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let attrs = [("scale", f32_attr(c, scale)), ("kv_lora_rank", i64_attr(c, kv_lora_rank as i64))];
    build("attention_grad", &operands, &results, &attrs, c, l)
}

/// Creates `v3.concat_grad`: `(d lhs, d rhs)` of `concat(lhs, rhs)` along `axis`.
pub fn concat_grad<'c>(
    [dy, lhs, rhs]: [Value<'c, '_>; 3],
    axis: usize,
    results: [Type<'c>; 2],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("concat_grad", &[dy, lhs, rhs], &results, &[("axis", i64_attr(c, axis as i64))], c, l)
}

/// Creates `v3.split_grad`: dx of a binary split of `x` (`sizes` along `axis`) from the pieces'
/// gradients that exist.
pub fn split_grad<'c, 'a>(
    x: Value<'c, 'a>,
    (dhead, dtail): (Option<Value<'c, 'a>>, Option<Value<'c, 'a>>),
    axis: usize,
    sizes: [usize; 2],
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut operands = vec![x];
    operands.extend(dhead);
    operands.extend(dtail);
    let sizes = [sizes[0] as i64, sizes[1] as i64];
    let attrs = [
        ("axis", i64_attr(c, axis as i64)),
        ("sizes", DenseI64ArrayAttribute::new(c, &sizes).into()),
        ("operandSegmentSizes", segments(c, &[1, dhead.is_some() as i32, dtail.is_some() as i32])),
    ];
    build("split_grad", &operands, &[out], &attrs, c, l)
}

/// Creates `v3.route_logits_grad`: d router logits from d routing weights.
pub fn route_logits_grad<'c>(
    [logits, indices, dweights]: [Value<'c, '_>; 3],
    a: &RouteAttributes,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    build("route_logits_grad", &[logits, indices, dweights], &[out], &route_attrs(c, a), c, l)
}

/// Creates `v3.balance_loss` (`grad` false: the `[1]` loss) or `v3.balance_loss_grad` (`grad`
/// true: d loss / d router logits); `softmax`: DeepSeek-V2's affinities (attribute `scoring =
/// "softmax"`), else DeepSeek-V3's sigmoid.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss<'c>(
    logits: Value<'c, '_>,
    indices: Value<'c, '_>,
    alpha: f32,
    grad: bool,
    softmax: bool,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let name = if grad { "balance_loss_grad" } else { "balance_loss" };
    let mut attrs = vec![("alpha", f32_attr(c, alpha))];
    if softmax {
        attrs.push(("scoring", str_attr(c, "softmax")));
    }
    build(name, &[logits, indices], &[out], &attrs, c, l)
}

/// Creates `v3.moe_experts_grad` (f32, or `fp8`: the recipe's e4m3 GEMMs on f32 masters):
/// operands `[x, indices, weights, dy]` and the stacked expert weights; results `[dx, d weights,
/// d gate, d up, d down]`.
pub fn moe_experts_grad<'c, 'a>(
    operands: [Value<'c, 'a>; 4],
    [gate, up, down]: [Value<'c, 'a>; 3],
    (num_experts, fp8): (usize, bool),
    results: [Type<'c>; 5],
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    let mut all = operands.to_vec();
    all.extend([gate, up, down]);
    let attrs = [("num_experts", i64_attr(c, num_experts as i64)), ("fp8", bool_attr(c, fp8))];
    build("moe_experts_grad", &all, &results, &attrs, c, l)
}

/// Creates one of DeepSeek-V3's FP8 training GEMMs on f32 operands: `fp8_linear` (x, w),
/// `fp8_linear_dgrad` (dy, w) or `fp8_linear_wgrad` (dy, x).
pub fn fp8_training_gemm<'c>(
    name: &str,
    a: Value<'c, '_>,
    b: Value<'c, '_>,
    out: Type<'c>,
    c: &'c Context,
    l: Location<'c>,
) -> Result<Operation<'c>, DialectError> {
    if !["fp8_linear", "fp8_linear_dgrad", "fp8_linear_wgrad"].contains(&name) {
        return Err(DialectError::Build { op: format!("v3.{name}"), reason: "not an fp8 training GEMM".into() });
    }
    build(name, &[a, b], &[out], &[], c, l)
}
