//! `fuse-moe`: a DeepSeek MoE block as three launches: routing that also builds the permutation,
//! a grouped gate/up GEMM reading permuted rows, and a grouped down GEMM that scatters into the
//! tokens' rows (the combine), with the shared experts as more experts of weight 1.
//!
//! Level: `v3` ops of an entry, after the MLA fusion, before `fuse-epilogues` and `form-kernels`.
//! Matches, by dataflow (not by weight names): `moe_route` -> `moe_experts`, optionally the shared
//! expert (two linears on the experts' input whose `silu_mul` feeds a down linear, fp8
//! quantizations between them) added to the routed output, optionally the residual add of that sum.
//! Rewrites it to `moe_dispatch` -> `moe_gate_up` (-> `quantize_fp8` of its result, fp8) ->
//! `moe_down`; the shared expert of intermediate size S x I becomes S experts of size I (its
//! weights are row / column blocks read in place: nothing is re-laid out). Numerics: each
//! expert computes what it did before; only the order of the final sum over a token's experts
//! changes (routed in expert order, then shared), so results agree to rounding.
//!
//! Every `moe_experts` fed by a `moe_route` (all the DSL builds) is rewritten. A shared expert whose width is not a multiple of the routed
//! experts' (or, with fp8 weights, is more than one expert wide: its 128 x 128 scale blocks would
//! straddle experts) keeps its own kernels; the combine add becomes the down GEMM's residual.

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{BlockRef, Location, RegionLike, Type, Value, ValueLike};
use melior::Context;
use mlir_sys::{
    mlirOperationDestroy, mlirOperationRemoveFromParent, mlirValueReplaceAllUsesOfWith, MlirOperation, MlirValue,
};
use v3c_dialects::ops::{self as v3, Permutation, RouteAttributes, Scaled};

use super::form_kernels::{defining_op, operands, results, users};
use super::PassError;
use crate::verify::Shape;

/// The fp8 activation group (1 x 128), as the DSL quantizes.
const GROUP: usize = 128;

fn name(op: MlirOperation) -> String {
    // SAFETY: `op` is a live operation of the entry being rewritten.
    let op = unsafe { OperationRef::from_raw(op) };
    op.name().as_string_ref().as_str().unwrap_or_default().to_string()
}

fn is(op: MlirOperation, bare: &str) -> bool {
    name(op) == v3::qualified(bare)
}

fn shape(v: MlirValue) -> Option<Shape> {
    // SAFETY: `v` is a live value.
    Shape::of(unsafe { Value::from_raw(v) }.r#type())
}

/// Identity of a value (MLIR values compare by address).
fn id(v: Option<MlirValue>) -> Option<usize> {
    v.map(|v| v.ptr as usize)
}

fn is_argument(v: MlirValue) -> bool {
    // SAFETY: `v` is a live value.
    unsafe { mlir_sys::mlirValueIsABlockArgument(v) }
}

/// The op producing `v` when `v` is its only use's operand and `user` that only use.
fn sole_producer(v: MlirValue, user: MlirOperation, bare: &str) -> Option<MlirOperation> {
    let p = defining_op(v)?;
    (is(p, bare) && users(v).iter().all(|u| u.ptr == user.ptr) && results(p).iter().all(|r| only_user(*r, user)))
        .then_some(p)
}

fn only_user(v: MlirValue, user: MlirOperation) -> bool {
    let u = users(v);
    !u.is_empty() && u.iter().all(|o| o.ptr == user.ptr)
}

fn attr_text(op: MlirOperation, attr: &str) -> Option<String> {
    // SAFETY: as in `name`.
    let op = unsafe { OperationRef::from_raw(op) };
    Some(crate::mlir::attribute_text(op.attribute(attr).ok()?))
}

fn attr_number(op: MlirOperation, attr: &str) -> Option<f64> {
    attr_text(op, attr)?.split(':').next()?.trim().parse().ok()
}

/// A linear's (activations, activation scales, weight, weight scales); weights must be parameters.
struct Linear {
    op: MlirOperation,
    x: MlirValue,
    x_scale: Option<MlirValue>,
    w: MlirValue,
    w_scale: Option<MlirValue>,
}

fn linear(op: MlirOperation) -> Option<Linear> {
    if !is(op, "linear") {
        return None;
    }
    let o = operands(op);
    let l = match o[..] {
        [x, w] => Linear { op, x, x_scale: None, w, w_scale: None },
        [x, w, ws] => Linear { op, x, x_scale: None, w, w_scale: Some(ws) },
        [x, xs, w, ws] => Linear { op, x, x_scale: Some(xs), w, w_scale: Some(ws) },
        _ => return None,
    };
    (is_argument(l.w) && l.w_scale.is_none_or(is_argument)).then_some(l)
}

/// The shared expert: gate/up linears, `silu_mul`, down linear (and the quantizations between).
struct Shared {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Ops of the chain to erase once the rewrite stands, users first.
    ops: Vec<MlirOperation>,
}

/// Matches the shared expert whose down projection is `v`, the other operand of `combine`.
fn shared_expert(v: MlirValue, combine: MlirOperation, x: MlirValue, fp8: bool) -> Option<Shared> {
    let down = linear(defining_op(v).filter(|_| only_user(v, combine))?)?;
    let mut ops = vec![down.op];
    let activation = if fp8 {
        let q = sole_producer(down.x, down.op, "quantize_fp8")?;
        (id(Some(down.x)) == id(results(q).first().copied()) && id(down.x_scale) == id(results(q).get(1).copied()))
            .then_some(())?;
        ops.push(q);
        operands(q)[0]
    } else {
        down.x_scale.is_none().then_some(down.x)?
    };
    let silu = sole_producer(activation, ops[ops.len() - 1], "silu_mul")?;
    ops.push(silu);
    let [g, u] = operands(silu)[..] else { return None };
    let gate = linear(defining_op(g).filter(|_| only_user(g, silu))?)?;
    let up = linear(defining_op(u).filter(|_| only_user(u, silu))?)?;
    if gate.x.ptr != up.x.ptr || id(gate.x_scale) != id(up.x_scale) || fp8 != gate.x_scale.is_some() {
        return None;
    }
    // The shared expert reads the experts' input (fp8: its 1 x 128 quantization).
    let input = match gate.x_scale {
        Some(_) => {
            let q = defining_op(gate.x).filter(|&q| is(q, "quantize_fp8"))?;
            (operands(q)[0].ptr == x.ptr && attr_number(q, "group") == Some(GROUP as f64)).then_some(())?;
            operands(q)[0]
        }
        None => gate.x,
    };
    if input.ptr != x.ptr {
        return None;
    }
    ops.extend([gate.op, up.op]);
    Some(Shared { gate, up, down, ops })
}

/// Rewrites every MoE block of every entry of `module_op`.
pub fn fuse_moe(context: &Context, module_op: &OperationRef) -> Result<(), PassError> {
    super::for_each_entry(module_op, "fuse-moe", |entry| {
        let Some(block) = entry.region(0).ok().and_then(|r| r.first_block()) else { return Ok(()) };
        let mut experts = Vec::new();
        let mut op = block.first_operation();
        while let Some(o) = op {
            op = o.next_in_block();
            if is(o.to_raw(), "moe_experts") {
                experts.push(o.to_raw());
            }
        }
        for m in experts {
            rewrite(context, &block, m).map_err(|message| PassError { pass: "fuse-moe".into(), message })?;
        }
        Ok(())
    })
}

fn tensor_type<'c>(context: &'c Context, dims: &[Option<usize>], element: &str) -> Result<Type<'c>, String> {
    let dims: Vec<String> = dims.iter().map(|d| d.map_or("?".into(), |n| n.to_string())).collect();
    let text = format!("tensor<{}x{element}>", dims.join("x"));
    Type::parse(context, &text).ok_or_else(|| format!("cannot build type {text}"))
}

/// Matches one `moe_experts` op and rewrites its block; leaves it alone when it does not match.
fn rewrite(context: &Context, block: &BlockRef, m: MlirOperation) -> Result<(), String> {
    let o = operands(m);
    // fp8 activations (quantized 1 x 128), and fp8 weights (block scaled; with f32 activations
    // they are dequantized as read).
    let fp8 = attr_text(m, "fp8_activations").as_deref() == Some("true");
    let fp8_weights = o.len() == 9;
    let (x, idx, w) = (o[0], o[1], o[2]);
    let Some(route) = defining_op(idx).filter(|&r| is(r, "moe_route")) else { return Ok(()) };
    if results(route).iter().map(|v| v.ptr).ne([idx.ptr, w.ptr]) || !only_user(idx, m) || !only_user(w, m) {
        return Ok(());
    }
    let (Some(xs), Some(gs), Some(ids)) = (shape(x), shape(o[3]), shape(idx)) else {
        return Ok(());
    };
    let (Some(experts), Some(inter), Some(top_k)) = (gs.dims[0], gs.dims[1], ids.dims[1]) else { return Ok(()) };
    let mut doomed = vec![m, route];
    // The shared expert, added to the routed output.
    let mut out = results(m)[0];
    let mut shared = None;
    if let [combine] = users(out)[..] {
        if is(combine, "add") {
            let other = operands(combine).into_iter().find(|v| v.ptr != out.ptr);
            // A shared expert that cannot be cut into routed-size experts stays its own kernels; the
            // combine add then folds into the down GEMM as its residual (the sum is the same).
            let fits = |s: &Shared| {
                let width = shape(s.gate.w).and_then(|s| s.dims[0]).unwrap_or(0);
                let count = width / inter.max(1);
                (count > 0 && count * inter == width && !(fp8_weights && count != 1)).then_some(count)
            };
            let matched = other.and_then(|v| shared_expert(v, combine, x, fp8));
            if let Some((s, count)) = matched.and_then(|s| fits(&s).map(|c| (s, c))) {
                doomed.splice(0..0, std::iter::once(combine).chain(s.ops.iter().copied()));
                out = results(combine)[0];
                shared = Some((s, count));
            }
        }
    }
    // The residual add of the block's output.
    let mut residual = None;
    if let [add] = users(out)[..] {
        let ops = operands(add);
        if is(add, "add") && ops.iter().filter(|v| v.ptr == out.ptr).count() == 1 {
            residual = ops.into_iter().find(|v| v.ptr != out.ptr);
            doomed.insert(0, add);
            out = results(add)[0];
        }
    }
    let num_shared = shared.as_ref().map_or(0, |s| s.1);
    let rows = top_k + num_shared;
    let d = xs.dims[1].ok_or("dynamic hidden size")?;
    let anchor = *doomed.first().ok_or("nothing to rewrite")?;
    // SAFETY: `anchor` is a live op of `block`.
    let anchor_ref = unsafe { OperationRef::from_raw(anchor) };
    let location = Location::unknown(context);
    let value = |v: MlirValue| unsafe { Value::from_raw(v) };
    let err = |e: v3c_dialects::DialectError| e.to_string();
    // fp8 activations: the gathered rows are the 1 x 128 quantization of x.
    let x_in = if fp8 {
        // An existing 1 x 128 quantization of x (the shared expert's, joined or not) is reused.
        let existing = users(x).into_iter().find(|&u| {
            is(u, "quantize_fp8")
                && attr_number(u, "group") == Some(GROUP as f64)
                && !doomed.iter().any(|d| d.ptr == u.ptr)
        });
        match existing.map(|q| (results(q)[0], results(q)[1])) {
            Some((q, sc)) => (q, Some(sc)),
            None => {
                let q = v3::quantize_fp8(
                    value(x),
                    GROUP,
                    tensor_type(context, &[None, Some(d)], "f8E4M3FN")?,
                    tensor_type(context, &[None, Some(d.div_ceil(GROUP))], "f32")?,
                    context,
                    location,
                )
                .map_err(err)?;
                let q = block.insert_operation_before(anchor_ref, q);
                (
                    q.result(0).map_err(|e| e.to_string())?.to_raw(),
                    Some(q.result(1).map_err(|e| e.to_string())?.to_raw()),
                )
            }
        }
    } else {
        (x, None)
    };
    let route_attrs = RouteAttributes {
        top_k,
        n_group: attr_number(route, "n_group").ok_or("moe_route without n_group")? as usize,
        topk_group: attr_number(route, "topk_group").ok_or("moe_route without topk_group")? as usize,
        norm_topk_prob: attr_text(route, "norm_topk_prob").as_deref() == Some("true"),
        routed_scaling_factor: attr_number(route, "routed_scaling_factor").ok_or("moe_route without a factor")? as f32,
        softmax: attr_text(route, "scoring").is_some_and(|s| s.contains("softmax")),
    };
    let r = operands(route);
    let dispatch = v3::moe_dispatch(
        value(r[0]),
        value(r[1]),
        r.get(2).map(|&b| value(b)),
        &route_attrs,
        num_shared,
        [
            tensor_type(context, &[Some(experts + num_shared + 1)], "i32")?,
            tensor_type(context, &[None, Some(rows)], "i32")?,
            tensor_type(context, &[None, Some(rows)], "f32")?,
        ],
        context,
        location,
    )
    .map_err(err)?;
    let dispatch = block.insert_operation_before(anchor_ref, dispatch);
    let res = |op: &OperationRef, i: usize| -> Result<MlirValue, String> {
        Ok(op.result(i).map_err(|e| e.to_string())?.to_raw())
    };
    let perm = Permutation { offsets: value(res(&dispatch, 0)?), rows: value(res(&dispatch, 1)?) };
    let scaled = |w: MlirValue, s: Option<MlirValue>| Scaled { weight: value(w), scale: s.map(value) };
    let (gate, up, down) = if fp8_weights {
        (scaled(o[3], Some(o[6])), scaled(o[4], Some(o[7])), scaled(o[5], Some(o[8])))
    } else {
        (scaled(o[3], None), scaled(o[4], None), scaled(o[5], None))
    };
    let gate_up = v3::moe_gate_up(
        scaled(x_in.0, x_in.1),
        perm,
        (gate, up),
        shared.as_ref().map(|(s, _)| (scaled(s.gate.w, s.gate.w_scale), scaled(s.up.w, s.up.w_scale))),
        (experts, num_shared),
        tensor_type(context, &[None, Some(rows), Some(inter)], "f32")?,
        context,
        location,
    )
    .map_err(err)?;
    let gate_up = block.insert_operation_before(anchor_ref, gate_up);
    let h = if fp8 {
        let q = v3::quantize_fp8(
            value(res(&gate_up, 0)?),
            GROUP,
            tensor_type(context, &[None, Some(rows), Some(inter)], "f8E4M3FN")?,
            tensor_type(context, &[None, Some(rows), Some(inter.div_ceil(GROUP))], "f32")?,
            context,
            location,
        )
        .map_err(err)?;
        let q = block.insert_operation_before(anchor_ref, q);
        scaled(res(&q, 0)?, Some(res(&q, 1)?))
    } else {
        scaled(res(&gate_up, 0)?, None)
    };
    // SAFETY: `out` is a live value.
    let out_type = unsafe { Value::from_raw(out) }.r#type();
    let moe_down = v3::moe_down(
        h,
        perm,
        value(res(&dispatch, 2)?),
        down,
        shared.as_ref().map(|(s, _)| scaled(s.down.w, s.down.w_scale)),
        residual.map(value),
        (experts, num_shared),
        out_type,
        context,
        location,
    )
    .map_err(err)?;
    let moe_down = block.insert_operation_before(anchor_ref, moe_down);
    // SAFETY: `out` and the new result are live values of the same type; then the old ops, users
    // first, have no uses left and are erased.
    unsafe {
        mlirValueReplaceAllUsesOfWith(out, res(&moe_down, 0)?);
        for op in doomed {
            mlirOperationRemoveFromParent(op);
            mlirOperationDestroy(op);
        }
    }
    Ok(())
}
