//! Import: DSL graphs -> one MLIR module in the `v3` dialect, one `func.func` per entry point.
//!
//! Level in: [`v3c_models::Graph`] (already shape-checked by its builder). Level out: `func.func
//! @prefill`, `@decode` whose arguments are the graph inputs (`{v3.input = "tokens"}`) followed by
//! the parameters (`{v3.param = "<checkpoint name>"}`), and whose results are the graph outputs
//! (`{v3.output = "logits"}`). Batch and sequence dims are dynamic (`?`); model dims static.
//!
//! Re-layouts done here, and only here:
//! - an fp8 block-scaled weight becomes two arguments: the e4m3 weight and its `weight_scale_inv`;
//! - the E experts of a MoE layer become stacked arguments `[E, I, D]` / `[E, D, I]` named with a `*`
//!   for the expert index (`model.layers.3.mlp.experts.*.gate_proj.weight`), the layout grouped GEMMs
//!   read; the runtime stacks the per-expert checkpoint tensors once at load.
//!
//! Not handled: graphs whose experts are shared across MoE ops (DeepSeek-V3 never does that).

use std::collections::{HashMap, HashSet};

use melior::dialect::func;
use melior::ir::attribute::{StringAttribute, TypeAttribute};
use melior::ir::block::BlockLike;
use melior::ir::r#type::FunctionType;
use melior::ir::{Attribute, Block, Identifier, Location, Module, Region, RegionLike, Type, Value, ValueLike};
use melior::Context;
use v3c_dialects::ops;
use v3c_models::graph::{Dim, Graph, Op, TensorType, ValueId, WeightFormat};
use v3c_models::rope;

/// Why a graph could not be imported; names the entry point and op.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Dialect(#[from] v3c_dialects::DialectError),
    #[error("{entry}: {problem}")]
    Unsupported { entry: String, problem: String },
    #[error("{entry}: type {ty} does not parse in MLIR")]
    Type { entry: String, ty: String },
}

/// The MLIR spelling of a tensor type (`tensor<?x7168xbf16>`).
pub fn mlir_type_text(ty: &TensorType) -> String {
    let mut s = String::from("tensor<");
    for d in &ty.shape {
        match d {
            Dim::Fixed(n) => s.push_str(&format!("{n}x")),
            Dim::Dyn(_) => s.push_str("?x"),
        }
    }
    s.push_str(ty.dtype.mlir_name());
    s.push('>');
    s
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One function argument to create: its MLIR type and `{key = "name"}` attribute.
struct Arg {
    ty: String,
    attr_key: &'static str,
    name: String,
}

/// How a graph value is represented in the function.
#[derive(Clone, Copy)]
enum Binding {
    /// A plain value (or an fp8 weight with its scale argument).
    Value { index: usize, scale: Option<usize> },
}

/// Imports several entry points (name, graph) into one module in `context` (the `v3` dialect is
/// loaded if needed).
pub fn import<'c>(context: &'c Context, entries: &[(&str, &Graph)]) -> Result<Module<'c>, ImportError> {
    v3c_dialects::load(context)?;
    let location = Location::unknown(context);
    let module = Module::new(location);
    for (name, graph) in entries {
        let f = import_function(context, name, graph)?;
        module.body().append_operation(f);
    }
    Ok(module)
}

fn import_function<'c>(context: &'c Context, entry: &str, g: &Graph) -> Result<melior::ir::Operation<'c>, ImportError> {
    let unsupported = |problem: String| ImportError::Unsupported { entry: entry.to_string(), problem };
    let parse_type = |text: &str| {
        Type::parse(context, text).ok_or_else(|| ImportError::Type { entry: entry.to_string(), ty: text.to_string() })
    };
    // Expert weights are passed stacked; find them first.
    let mut stacked_members: HashSet<ValueId> = HashSet::new();
    for node in &g.nodes {
        if let Op::MoeExperts { .. } = node.op {
            stacked_members.extend(node.inputs[3..].iter().copied());
        }
    }
    // Arguments: inputs, then parameters in order of first appearance, then stacked experts.
    let mut args: Vec<Arg> = Vec::new();
    let mut bindings: HashMap<ValueId, Binding> = HashMap::new();
    for (name, v) in &g.inputs {
        bindings.insert(*v, Binding::Value { index: args.len(), scale: None });
        args.push(Arg { ty: mlir_type_text(g.ty(*v)), attr_key: v3c_dialects::INPUT_ATTR, name: name.clone() });
    }
    let param_arg = |args: &mut Vec<Arg>, name: &str, ty: &TensorType, format: WeightFormat| -> Binding {
        let index = args.len();
        args.push(Arg { ty: mlir_type_text(ty), attr_key: v3c_dialects::PARAM_ATTR, name: name.to_string() });
        let scale = match format {
            WeightFormat::Fp8Block { block } => {
                let dims: Vec<usize> = ty.shape.iter().map(|d| d.clone().fixed().unwrap_or(0)).collect();
                let n = dims.len();
                let mut sdims = dims.clone();
                sdims[n - 2] = dims[n - 2].div_ceil(block[0]);
                sdims[n - 1] = dims[n - 1].div_ceil(block[1]);
                let s: Vec<String> = sdims.iter().map(|d| d.to_string()).collect();
                args.push(Arg {
                    ty: format!("tensor<{}xf32>", s.join("x")),
                    attr_key: v3c_dialects::PARAM_ATTR,
                    name: format!("{name}_scale_inv"),
                });
                Some(index + 1)
            }
            WeightFormat::Dense(_) => None,
        };
        Binding::Value { index, scale }
    };
    for (name, ty, format, v) in g.params() {
        if !stacked_members.contains(&v) {
            let b = param_arg(&mut args, name, ty, format);
            bindings.insert(v, b);
        }
    }
    // Stacked experts: one argument (+ scale) per projection kind per MoE op, keyed by the op's node index.
    let mut stacked: HashMap<usize, [Binding; 3]> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let Op::MoeExperts { num_experts, .. } = node.op else { continue };
        let experts = &node.inputs[3..];
        let mut kinds = Vec::new();
        for k in 0..3 {
            let first = experts[k];
            let Op::Param { name, format } = &g.producer(first).op else {
                return Err(unsupported("moe_experts: expert weights must be parameters".into()));
            };
            let pattern =
                stack_pattern(name).ok_or_else(|| unsupported(format!("moe_experts: '{name}' has no expert index")))?;
            let ty = g.ty(first);
            let mut shape = vec![Dim::Fixed(num_experts)];
            shape.extend(ty.shape.iter().cloned());
            kinds.push(param_arg(&mut args, &pattern, &TensorType::new(shape, ty.dtype), *format));
        }
        stacked.insert(i, [kinds[0], kinds[1], kinds[2]]);
    }

    let types: Vec<Type> = args.iter().map(|a| parse_type(&a.ty)).collect::<Result<_, _>>()?;
    let location = Location::unknown(context);
    let block = Block::new(&types.iter().map(|t| (*t, location)).collect::<Vec<_>>());
    let mut values: HashMap<ValueId, Value> = HashMap::new();
    let arg_value = |i: usize| arg(&block, i);
    for (i, node) in g.nodes.iter().enumerate() {
        if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
            continue;
        }
        let result_types: Vec<Type> =
            node.outputs.iter().map(|v| parse_type(&mlir_type_text(g.ty(*v)))).collect::<Result<_, _>>()?;
        let o = |k: usize| resolve(&values, &bindings, &block, node.inputs[k]).0;
        let ws = |k: usize| resolve(&values, &bindings, &block, node.inputs[k]);
        let r = result_types[0];
        let op = match &node.op {
            Op::Input { .. } | Op::Param { .. } => unreachable!("skipped above"),
            Op::Embed => ops::embed(o(0), o(1), r, context, location)?,
            Op::Linear if node.inputs.len() == 2 => {
                let (w, w_scale) = ws(1);
                ops::linear(o(0), None, w, w_scale, r, context, location)?
            }
            Op::Linear => {
                let (w, w_scale) = ws(2);
                ops::linear(o(0), Some(o(1)), w, w_scale, r, context, location)?
            }
            Op::RmsNorm { eps } => ops::rms_norm(o(0), o(1), *eps, r, context, location)?,
            Op::Rope(a) => {
                let inv_freq = rope::inv_freq(&a.rope, a.dim);
                ops::rope(o(0), o(1), &rope_attributes(a, &inv_freq), r, context, location)?
            }
            Op::Attention { form, scale, kv_lora_rank } => {
                let (kv_b, kv_b_scale) = ws(3);
                let form = form.to_string();
                let a = ops::AttentionAttributes { form: &form, scale: *scale, kv_lora_rank: *kv_lora_rank };
                ops::attention(o(0), o(1), o(2), kv_b, kv_b_scale, &a, r, context, location)?
            }
            Op::AttentionDecode { form, scale, kv_lora_rank } => {
                let (kv_b, kv_b_scale) = ws(4);
                let form = form.to_string();
                let a = ops::AttentionAttributes { form: &form, scale: *scale, kv_lora_rank: *kv_lora_rank };
                ops::attention_decode(o(0), o(1), o(2), o(3), kv_b, kv_b_scale, &a, r, context, location)?
            }
            Op::CacheWrite => ops::cache_write(o(0), o(1), o(2), r, context, location)?,
            Op::LayerNorm { eps } => ops::layer_norm([o(0), o(1), o(2)], *eps, r, context, location)?,
            Op::SparseIndex { top_k } => ops::sparse_index([o(0), o(1), o(2)], None, *top_k, r, context, location)?,
            Op::SparseIndexDecode { top_k } => {
                ops::sparse_index([o(0), o(1), o(2)], Some(o(3)), *top_k, r, context, location)?
            }
            Op::GatherRows { width } => ops::gather_rows(o(0), o(1), *width, [r, result_types[1]], context, location)?,
            Op::MoeRoute(rt) => {
                let bias = (node.inputs.len() > 2).then(|| o(2));
                ops::moe_route(o(0), o(1), bias, &route_attributes(rt), r, result_types[1], context, location)?
            }
            Op::MoeExperts { num_experts, fp8_activations } => {
                let [g_b, u_b, d_b] = stacked[&i];
                let get = |b: Binding| match b {
                    Binding::Value { index, scale } => (arg_value(index), scale.map(arg_value)),
                };
                let ((gate, gs), (up, us), (down, ds)) = (get(g_b), get(u_b), get(d_b));
                let scales = match (gs, us, ds) {
                    (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                    _ => None,
                };
                let experts = ops::StackedExperts { gate, up, down, scales };
                ops::moe_experts(o(0), o(1), o(2), experts, *num_experts, *fp8_activations, r, context, location)?
            }
            Op::SiluMul => ops::silu_mul(o(0), o(1), r, context, location)?,
            Op::Add => ops::add(o(0), o(1), r, context, location)?,
            Op::Split { axis, sizes } => {
                // A chain of binary splits: [s0 | rest], then rest into [s1 | rest'], ...
                let input_ty = g.ty(node.inputs[0]);
                let mut rest = o(0);
                for k in 0..sizes.len() - 1 {
                    let remaining: usize = sizes[k + 1..].iter().sum();
                    let tail_ty = if k + 2 == sizes.len() {
                        result_types[k + 1]
                    } else {
                        let mut t = input_ty.clone();
                        t.shape[*axis] = Dim::Fixed(remaining);
                        parse_type(&mlir_type_text(&t))?
                    };
                    let op =
                        ops::split(rest, *axis, [sizes[k], remaining], [result_types[k], tail_ty], context, location)?;
                    let op = block.append_operation(op);
                    let err = |e: melior::Error| unsupported(format!("split: {e}"));
                    values.insert(node.outputs[k], op.result(0).map_err(err)?.into());
                    rest = op.result(1).map_err(err)?.into();
                }
                values.insert(node.outputs[sizes.len() - 1], rest);
                continue;
            }
            Op::Concat { axis } => {
                // A chain of binary concatenations, left to right.
                let mut acc = o(0);
                let mut acc_ty = g.ty(node.inputs[0]).clone();
                for k in 1..node.inputs.len() {
                    let next_ty = g.ty(node.inputs[k]);
                    acc_ty.shape[*axis] = match (&acc_ty.shape[*axis], &next_ty.shape[*axis]) {
                        (Dim::Fixed(a), Dim::Fixed(b)) => Dim::Fixed(a + b),
                        _ => Dim::dynamic("?"),
                    };
                    let out_ty = if k + 1 == node.inputs.len() { r } else { parse_type(&mlir_type_text(&acc_ty))? };
                    let op = block.append_operation(ops::concat(acc, o(k), *axis, out_ty, context, location)?);
                    acc = op.result(0).map_err(|e| unsupported(format!("concat: {e}")))?.into();
                }
                values.insert(node.outputs[0], acc);
                continue;
            }
            Op::Reshape => ops::reshape(o(0), r, context, location)?,
            Op::QuantizeFp8 { group } => ops::quantize_fp8(o(0), *group, r, result_types[1], context, location)?,
            Op::LmHead => ops::lm_head(o(0), o(1), r, context, location)?,
            Op::CrossEntropy { weight } => ops::cross_entropy(o(0), o(1), *weight, false, r, context, location)?,
            Op::CrossEntropyGrad { weight } => ops::cross_entropy(o(0), o(1), *weight, true, r, context, location)?,
            Op::MatMul { transpose_a, transpose_b } => {
                ops::matmul(o(0), o(1), (*transpose_a, *transpose_b), r, context, location)?
            }
            Op::RmsNormGrad { eps } => {
                ops::rms_norm_grad([o(0), o(1), o(2)], *eps, [r, result_types[1]], context, location)?
            }
            Op::SiluMulGrad => ops::silu_mul_grad([o(0), o(1), o(2)], [r, result_types[1]], context, location)?,
            Op::EmbedGrad { vocab } => ops::embed_grad(o(0), o(1), *vocab, r, context, location)?,
            Op::RopeGrad(a) => {
                let inv_freq = rope::inv_freq(&a.rope, a.dim);
                let attrs = rope_attributes(a, &inv_freq);
                ops::rope_grad(o(0), o(1), &attrs, r, context, location)?
            }
            Op::AttentionGrad { scale, kv_lora_rank } => {
                let results = [r, result_types[1], result_types[2], result_types[3]];
                ops::attention_grad([o(0), o(1), o(2), o(3), o(4)], *scale, *kv_lora_rank, results, context, location)?
            }
            Op::ConcatGrad { axis } => {
                if node.inputs.len() != 3 {
                    return Err(unsupported(format!(
                        "concat_grad of {} pieces (the dialect's concat_grad is binary)",
                        node.inputs.len() - 1
                    )));
                }
                ops::concat_grad([o(0), o(1), o(2)], *axis, [r, result_types[1]], context, location)?
            }
            Op::SplitGrad { axis, sizes, present } => {
                if sizes.len() != 2 {
                    return Err(unsupported(format!(
                        "split_grad of {} pieces (the dialect's split_grad is binary)",
                        sizes.len()
                    )));
                }
                let mut given = (1..node.inputs.len()).map(o);
                let dhead = if present[0] { given.next() } else { None };
                let dtail = if present[1] { given.next() } else { None };
                ops::split_grad(o(0), (dhead, dtail), *axis, [sizes[0], sizes[1]], r, context, location)?
            }
            // The router's gradients as the gradient to its logits `x gate^T` (recomputed by a
            // matmul) and the two matmuls back to x and the gate.
            Op::MoeRouteGrad(_) | Op::BalanceLoss { .. } | Op::BalanceLossGrad { .. } => {
                let (x, gate) = (o(0), o(1));
                let logits_ty = TensorType::new(
                    vec![g.ty(node.inputs[0]).shape[0].clone(), g.ty(node.inputs[1]).shape[0].clone()],
                    v3c_models::dtype::DType::F32,
                );
                let logits_ty = parse_type(&mlir_type_text(&logits_ty))?;
                let err = |e: melior::Error| unsupported(format!("{}: {e}", node.op.name()));
                let logits = block.append_operation(ops::matmul(x, gate, (false, true), logits_ty, context, location)?);
                let logits: Value = logits.result(0).map_err(err)?.into();
                let dl = match &node.op {
                    Op::MoeRouteGrad(rt) => {
                        let a = route_attributes(rt);
                        ops::route_logits_grad([logits, o(2), o(3)], &a, logits_ty, context, location)?
                    }
                    Op::BalanceLoss { alpha, scoring } => {
                        let softmax = *scoring == v3c_models::config::Scoring::Softmax;
                        ops::balance_loss(logits, o(2), *alpha, false, softmax, r, context, location)?
                    }
                    Op::BalanceLossGrad { alpha, scoring } => {
                        let softmax = *scoring == v3c_models::config::Scoring::Softmax;
                        ops::balance_loss(logits, o(2), *alpha, true, softmax, logits_ty, context, location)?
                    }
                    _ => unreachable!("matched above"),
                };
                let dl: Value = block.append_operation(dl).result(0).map_err(err)?.into();
                if matches!(node.op, Op::BalanceLoss { .. }) {
                    values.insert(node.outputs[0], dl);
                    continue;
                }
                let dx = block.append_operation(ops::matmul(dl, gate, (false, false), r, context, location)?);
                values.insert(node.outputs[0], dx.result(0).map_err(err)?.into());
                let dgate =
                    block.append_operation(ops::matmul(dl, x, (true, false), result_types[1], context, location)?);
                values.insert(node.outputs[1], dgate.result(0).map_err(err)?.into());
                continue;
            }
            // The stacked experts of the forward op; the stacked weight gradients unstacked into
            // each expert's (a chain of splits along the expert axis, each piece reshaped).
            Op::MoeExpertsGrad { num_experts, fp8 } => {
                let forward = g
                    .nodes
                    .iter()
                    .position(|n| matches!(n.op, Op::MoeExperts { .. }) && n.inputs.get(3) == node.inputs.get(4));
                let bindings = forward
                    .and_then(|f| stacked.get(&f))
                    .ok_or_else(|| unsupported("moe_experts_grad: no moe_experts of the same experts".into()))?;
                let stacked_values: Vec<Value> = bindings
                    .iter()
                    .map(|b| match b {
                        Binding::Value { index, .. } => arg_value(*index),
                    })
                    .collect();
                let err = |e: melior::Error| unsupported(format!("moe_experts_grad: {e}"));
                let stacked_ty = |k: usize| -> Result<Type, ImportError> {
                    let ty = g.ty(node.inputs[4 + k]);
                    let mut shape = vec![Dim::Fixed(*num_experts)];
                    shape.extend(ty.shape.iter().cloned());
                    parse_type(&mlir_type_text(&TensorType::new(shape, ty.dtype)))
                };
                let results = [r, result_types[1], stacked_ty(0)?, stacked_ty(1)?, stacked_ty(2)?];
                let op = ops::moe_experts_grad(
                    [o(0), o(1), o(2), o(3)],
                    [stacked_values[0], stacked_values[1], stacked_values[2]],
                    (*num_experts, *fp8),
                    results,
                    context,
                    location,
                )?;
                let op = block.append_operation(op);
                values.insert(node.outputs[0], op.result(0).map_err(err)?.into());
                values.insert(node.outputs[1], op.result(1).map_err(err)?.into());
                for k in 0..3 {
                    let one = g.ty(node.inputs[4 + k]);
                    let piece_ty = |count: usize| {
                        let mut shape = vec![Dim::Fixed(count)];
                        shape.extend(one.shape.iter().cloned());
                        parse_type(&mlir_type_text(&TensorType::new(shape, one.dtype)))
                    };
                    let mut rest: Value = op.result(2 + k).map_err(err)?.into();
                    for e in 0..*num_experts {
                        let remaining = num_experts - e - 1;
                        let head = if remaining == 0 {
                            rest
                        } else {
                            let split = ops::split(
                                rest,
                                0,
                                [1, remaining],
                                [piece_ty(1)?, piece_ty(remaining)?],
                                context,
                                location,
                            )?;
                            let split = block.append_operation(split);
                            rest = split.result(1).map_err(err)?.into();
                            split.result(0).map_err(err)?.into()
                        };
                        let out_ty = result_types[2 + 3 * e + k];
                        let reshaped = block.append_operation(ops::reshape(head, out_ty, context, location)?);
                        values.insert(node.outputs[2 + 3 * e + k], reshaped.result(0).map_err(err)?.into());
                    }
                }
                continue;
            }
            Op::Fp8Linear | Op::Fp8LinearDgrad | Op::Fp8LinearWgrad => {
                ops::fp8_training_gemm(node.op.name(), o(0), o(1), r, context, location)?
            }
        };
        let op = block.append_operation(op);
        for (k, v) in node.outputs.iter().enumerate() {
            let result = op.result(k).map_err(|e| unsupported(format!("{}: {e}", node.op.name())))?;
            values.insert(*v, result.into());
        }
    }
    let outputs: Vec<Value> = g.outputs.iter().map(|(_, v)| resolve(&values, &bindings, &block, *v).0).collect();
    let output_types: Vec<Type> = outputs.iter().map(|v| v.r#type()).collect();
    block.append_operation(func::r#return(&outputs, location));
    drop(values);

    let region = Region::new();
    region.append_block(block);
    let function_type = FunctionType::new(context, &types, &output_types);
    let dict = |key: &str, name: &str| format!("{{{key} = \"{}\"}}", escape(name));
    let arg_attrs: Vec<String> = args.iter().map(|a| dict(a.attr_key, &a.name)).collect();
    let res_attrs: Vec<String> = g.outputs.iter().map(|(n, _)| dict(v3c_dialects::OUTPUT_ATTR, n)).collect();
    let parse_attr = |text: String| {
        Attribute::parse(context, &text).ok_or_else(|| unsupported(format!("attribute does not parse: {text:.80}")))
    };
    let attributes = [
        (Identifier::new(context, "arg_attrs"), parse_attr(format!("[{}]", arg_attrs.join(", ")))?),
        (Identifier::new(context, "res_attrs"), parse_attr(format!("[{}]", res_attrs.join(", ")))?),
    ];
    Ok(func::func(
        context,
        StringAttribute::new(context, entry),
        TypeAttribute::new(function_type.into()),
        region,
        &attributes,
        location,
    ))
}

fn route_attributes(rt: &v3c_models::graph::Routing) -> ops::RouteAttributes {
    ops::RouteAttributes {
        top_k: rt.top_k,
        n_group: rt.n_group,
        topk_group: rt.topk_group,
        norm_topk_prob: rt.norm_topk_prob,
        routed_scaling_factor: rt.routed_scaling_factor,
        softmax: rt.scoring == v3c_models::config::Scoring::Softmax,
    }
}

fn rope_attributes<'a>(a: &v3c_models::graph::RopeAttrs, inv_freq: &'a [f32]) -> ops::RopeAttributes<'a> {
    ops::RopeAttributes {
        dim: a.dim,
        theta: a.rope.theta,
        interleave: a.rope.interleave,
        inv_freq,
        attention_factor: rope::attention_factor(&a.rope),
    }
}

fn arg<'c, 'a>(block: &'a Block<'c>, index: usize) -> Value<'c, 'a> {
    block.argument(index).expect("every binding indexes a created argument").into()
}

/// The function value of a graph value, with its block-scale argument for fp8 weights.
fn resolve<'c, 'a>(
    values: &HashMap<ValueId, Value<'c, 'a>>,
    bindings: &HashMap<ValueId, Binding>,
    block: &'a Block<'c>,
    v: ValueId,
) -> (Value<'c, 'a>, Option<Value<'c, 'a>>) {
    match bindings.get(&v) {
        Some(Binding::Value { index, scale }) => (arg(block, *index), scale.map(|s| arg(block, s))),
        None => (values[&v], None),
    }
}

/// `model.layers.3.mlp.experts.17.gate_proj.weight` -> `model.layers.3.mlp.experts.*.gate_proj.weight`.
pub fn stack_pattern(name: &str) -> Option<String> {
    let (head, tail) = name.split_once(".experts.")?;
    let (index, rest) = tail.split_once('.')?;
    index.parse::<usize>().ok()?;
    Some(format!("{head}.experts.*.{rest}"))
}

/// Counts the ops of `module` by name (for reports and tests).
pub fn op_histogram(module: &Module) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    let text = module.as_operation().to_string();
    for line in text.lines() {
        if let Some(start) = line.find("\"v3.") {
            let rest = &line[start + 1..];
            if let Some(end) = rest.find('"') {
                *counts.entry(rest[..end].to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}
