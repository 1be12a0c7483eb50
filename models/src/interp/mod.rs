//! The reference interpreter: executes any graph on the CPU in f32 (weights dequantized; fp8
//! activations and block-scaled GEMMs where the graph asks for them). It is the oracle every backend
//! is checked against, so it is written to be obviously correct: each op is a plain loop in
//! [`kernels`].
//!
//! Evaluation is by demand: only the nodes the requested outputs need are run, and only the inputs
//! they need must be given (the MTP outputs need `mtp_tokens`, the main logits do not). Parameters
//! are loaded once, when the interpreter is created, and checked against the graph.
//!
//! Not handled: anything for speed beyond splitting large matmuls across threads.

pub mod kernels;

use std::collections::HashMap;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::dtype::DType;
use crate::graph::{AttentionForm, Dim, Graph, Node, Op, ValueId};
use crate::rope;
use crate::tensor::{Tensor, TensorData};

/// Why a graph could not be evaluated; names the input, op or token at fault.
#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("input '{name}': {problem}")]
    Input { name: String, problem: String },
    #[error("{graph}: no output named '{name}' (outputs: {known})")]
    UnknownOutput { graph: String, name: String, known: String },
    #[error("{op}: {problem}")]
    Op { op: String, problem: String },
}

fn op_err(node: &Node, problem: impl Into<String>) -> InterpError {
    InterpError::Op { op: node.op.name().to_string(), problem: problem.into() }
}

/// A graph with its parameters loaded.
pub struct Interpreter {
    graph: Graph,
    params: HashMap<ValueId, Tensor>,
}

impl Interpreter {
    /// Checks and loads every parameter of `graph` from `checkpoint`.
    pub fn new(graph: Graph, checkpoint: &Checkpoint) -> Result<Interpreter, InterpError> {
        checkpoint.check(&graph)?;
        let mut params = HashMap::new();
        for (name, ty, format, v) in graph.params() {
            params.insert(v, checkpoint.load(name, ty, format)?);
        }
        Ok(Interpreter { graph, params })
    }

    /// An interpreter over parameters given directly (tests, generated weights).
    pub fn with_params(graph: Graph, params: HashMap<String, Tensor>) -> Result<Interpreter, InterpError> {
        let mut loaded = HashMap::new();
        for (name, _, _, v) in graph.params() {
            let t = params
                .get(name)
                .cloned()
                .ok_or_else(|| InterpError::Input { name: name.into(), problem: "parameter not given".into() })?;
            loaded.insert(v, t);
        }
        Ok(Interpreter { graph, params: loaded })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Evaluates the named outputs from the named inputs.
    pub fn run(
        &self,
        inputs: &HashMap<String, Tensor>,
        outputs: &[&str],
    ) -> Result<HashMap<String, Tensor>, InterpError> {
        let g = &self.graph;
        let mut wanted = Vec::new();
        for &name in outputs {
            let v = g.output(name).ok_or_else(|| InterpError::UnknownOutput {
                graph: g.name.clone(),
                name: name.into(),
                known: g.outputs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
            })?;
            wanted.push((name, v));
        }
        // Mark the nodes the outputs depend on.
        let mut needed = vec![false; g.nodes.len()];
        let mut stack: Vec<u32> = wanted.iter().map(|(_, v)| g.producers[v.0 as usize]).collect();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut needed[n as usize], true) {
                continue;
            }
            stack.extend(g.nodes[n as usize].inputs.iter().map(|v| g.producers[v.0 as usize]));
        }
        let mut env: HashMap<ValueId, Tensor> = HashMap::new();
        let mut bindings: HashMap<String, usize> = HashMap::new();
        for (index, node) in g.nodes.iter().enumerate() {
            if !needed[index] {
                continue;
            }
            match &node.op {
                Op::Param { .. } => continue,
                Op::Input { name } => {
                    let t = inputs
                        .get(name)
                        .ok_or_else(|| InterpError::Input { name: name.clone(), problem: "not given".into() })?;
                    check_input(name, t, g.ty(node.outputs[0]), &mut bindings)?;
                    env.insert(node.outputs[0], t.clone());
                }
                _ => {
                    let args: Vec<&Tensor> = node
                        .inputs
                        .iter()
                        .map(|v| self.params.get(v).or_else(|| env.get(v)).expect("operands evaluated first"))
                        .collect();
                    let results = self.eval(node, &args)?;
                    for (v, t) in node.outputs.iter().zip(results) {
                        env.insert(*v, t);
                    }
                }
            }
        }
        // Two output names may share a value: clone rather than move.
        Ok(wanted.into_iter().map(|(name, v)| (name.to_string(), env[&v].clone())).collect())
    }

    fn eval(&self, node: &Node, a: &[&Tensor]) -> Result<Vec<Tensor>, InterpError> {
        let f = |i: usize| {
            a[i].as_f32().ok_or_else(|| op_err(node, format!("operand {i} is {}, expected floats", a[i].describe())))
        };
        let one = |t: Tensor| Ok(vec![t]);
        match &node.op {
            Op::Input { .. } | Op::Param { .. } => unreachable!("handled by run"),
            Op::Embed => {
                let table = f(0)?;
                let (vocab, d) = (a[0].shape[0], a[0].shape[1]);
                let ids = a[1].as_ids().ok_or_else(|| op_err(node, "ids must be integers"))?;
                let mut out = Vec::with_capacity(ids.len() * d);
                for &id in &ids {
                    if id < 0 || id as usize >= vocab {
                        return Err(op_err(node, format!("token id {id} is outside the vocabulary (0..{vocab})")));
                    }
                    out.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
                }
                one(Tensor::f32(vec![ids.len(), d], out))
            }
            Op::Linear if a.len() == 2 => {
                let (x, w) = (f(0)?, f(1)?);
                let (n, k) = (a[1].shape[0], a[1].shape[1]);
                let m = x.len() / k;
                one(Tensor::f32(with_last(&a[0].shape, n), kernels::matmul_nt(x, w, m, k, n)))
            }
            Op::Fp8Linear => {
                let (x, w) = (f(0)?, f(1)?);
                let (n, k) = (a[1].shape[0], a[1].shape[1]);
                let m = x.len() / k;
                one(Tensor::f32(with_last(&a[0].shape, n), kernels::fp8_fprop(x, w, m, k, n)))
            }
            Op::Fp8LinearDgrad => {
                let (dy, w) = (f(0)?, f(1)?);
                let (n, k) = (a[1].shape[0], a[1].shape[1]);
                let m = dy.len() / n;
                one(Tensor::f32(with_last(&a[0].shape, k), kernels::fp8_dgrad(dy, w, m, k, n)))
            }
            Op::Fp8LinearWgrad => {
                let (dy, x) = (f(0)?, f(1)?);
                let (n, k) = (*a[0].shape.last().unwrap_or(&0), *a[1].shape.last().unwrap_or(&0));
                let m = x.len() / k.max(1);
                one(Tensor::f32(vec![n, k], kernels::fp8_wgrad(dy, x, m, k, n)))
            }
            Op::Linear => {
                let (TensorData::F8(xq), Some(xs)) = (&a[0].data, a[1].as_f32()) else {
                    return Err(op_err(node, "fp8 linear needs quantized activations and scales"));
                };
                let TensorData::F8Block { bits, scale, block, scale_cols, .. } = &a[2].data else {
                    return Err(op_err(node, "fp8 linear needs a block-scaled fp8 weight"));
                };
                let (n, k) = (a[2].shape[0], a[2].shape[1]);
                let groups = *a[1].shape.last().unwrap_or(&0);
                if groups != *scale_cols {
                    return Err(op_err(
                        node,
                        format!("activation scales have {groups} groups per row, the weight {scale_cols} K blocks"),
                    ));
                }
                let m = xq.len() / k;
                let y = kernels::matmul_fp8(xq, xs, bits, scale, m, k, n, block[1], block[0], *scale_cols);
                one(Tensor::f32(with_last(&a[0].shape, n), y))
            }
            Op::RmsNorm { eps } => one(Tensor::f32(a[0].shape.clone(), kernels::rms_norm(f(0)?, f(1)?, *eps))),
            Op::Rope(r) => {
                let positions = a[1].as_ids().ok_or_else(|| op_err(node, "positions must be integers"))?;
                one(Tensor::f32(a[0].shape.clone(), rotate_rows(f(0)?, &positions, r, false)))
            }
            Op::Attention { form, scale, kv_lora_rank } => {
                let dims = mla_dims(a[0], a[1], a[3], *kv_lora_rank);
                let (t, s) = (a[0].shape[0], a[2].shape[0]);
                if s < t {
                    return Err(op_err(node, format!("latent has {s} rows for {t} queries")));
                }
                let visible: Vec<usize> = (0..t).map(|i| s - t + i).collect();
                let o = kernels::mla(f(0)?, f(1)?, f(2)?, f(3)?, &visible, s, dims, *scale, *form);
                one(Tensor::f32(vec![t, dims.heads, dims.v], o))
            }
            Op::AttentionDecode { form, scale, kv_lora_rank } => {
                let dims = mla_dims(a[0], a[1], a[4], *kv_lora_rank);
                let (b, s, c) = (a[2].shape[0], a[2].shape[1], a[2].shape[2]);
                let positions = a[3].as_ids().ok_or_else(|| op_err(node, "positions must be integers"))?;
                let (qn, qp, lat, kvb) = (f(0)?, f(1)?, f(2)?, f(4)?);
                let (h, dn, dr) = (dims.heads, dims.nope, dims.rope);
                let mut out = Vec::with_capacity(b * h * dims.v);
                for (seq, &p) in positions.iter().enumerate() {
                    if p < 0 || p as usize >= s {
                        return Err(op_err(
                            node,
                            format!("sequence {seq}: position {p} is outside the cache (0..{s})"),
                        ));
                    }
                    let rows = &lat[seq * s * c..(seq + 1) * s * c];
                    out.extend(kernels::mla(
                        &qn[seq * h * dn..(seq + 1) * h * dn],
                        &qp[seq * h * dr..(seq + 1) * h * dr],
                        rows,
                        kvb,
                        &[p as usize],
                        s,
                        dims,
                        *scale,
                        *form,
                    ));
                }
                one(Tensor::f32(vec![b, h, dims.v], out))
            }
            Op::LayerNorm { eps } => {
                one(Tensor::f32(a[0].shape.clone(), kernels::layer_norm(f(0)?, f(1)?, f(2)?, *eps)))
            }
            Op::SparseIndex { top_k } => {
                let (q, w, keys) = (f(0)?, f(1)?, f(2)?);
                let (t, hi, di, s) = (a[0].shape[0], a[0].shape[1], a[0].shape[2], a[2].shape[0]);
                let c = a[2].shape[1];
                if s < t {
                    return Err(op_err(node, format!("{s} keys for {t} queries")));
                }
                let mut out = Vec::with_capacity(t * top_k);
                for i in 0..t {
                    let seen = &keys[..(s - t + i + 1) * c];
                    let (qi, wi) = (&q[i * hi * di..(i + 1) * hi * di], &w[i * hi..(i + 1) * hi]);
                    out.extend(kernels::select_top_keys(&kernels::index_scores(qi, wi, seen, c, di), *top_k));
                }
                one(Tensor { shape: vec![t, *top_k], data: TensorData::I32(out) })
            }
            Op::SparseIndexDecode { top_k } => {
                let (q, w, keys) = (f(0)?, f(1)?, f(2)?);
                let (hi, di, s, c) = (a[0].shape[1], a[0].shape[2], a[2].shape[1], a[2].shape[2]);
                let positions = a[3].as_ids().ok_or_else(|| op_err(node, "positions must be integers"))?;
                let mut out = Vec::with_capacity(positions.len() * top_k);
                for (seq, &p) in positions.iter().enumerate() {
                    if p < 0 || p as usize >= s {
                        return Err(op_err(
                            node,
                            format!("sequence {seq}: position {p} is outside the cache (0..{s})"),
                        ));
                    }
                    let seen = &keys[seq * s * c..(seq * s + p as usize + 1) * c];
                    let (qi, wi) = (&q[seq * hi * di..(seq + 1) * hi * di], &w[seq * hi..(seq + 1) * hi]);
                    out.extend(kernels::select_top_keys(&kernels::index_scores(qi, wi, seen, c, di), *top_k));
                }
                one(Tensor { shape: vec![positions.len(), *top_k], data: TensorData::I32(out) })
            }
            Op::GatherRows { width } => {
                let TensorData::I32(selected) = &a[1].data else {
                    return Err(op_err(node, format!("selected rows are {}, expected i32", a[1].describe())));
                };
                let latent = f(0)?;
                let (c, k) = (a[0].shape[a[0].shape.len() - 1], a[1].shape[1]);
                let (t, per_query) = (a[1].shape[0], a[0].shape.len() == 3);
                let s = if per_query { a[0].shape[1] } else { a[0].shape[0] };
                let width = *width;
                let (mut rows, mut last) = (vec![0.0f32; t * k * width], Vec::with_capacity(t));
                for (q, picks) in selected.chunks(k.max(1)).enumerate().take(t) {
                    let count = picks.iter().take_while(|&&j| j >= 0).count();
                    if count == 0 || picks[count..].iter().any(|&j| j >= 0) {
                        return Err(op_err(node, format!("query {q}: selected {picks:?} is not its rows then -1s")));
                    }
                    let base = if per_query { q * s } else { 0 };
                    for (slot, &j) in picks[..count].iter().enumerate() {
                        if j as usize >= s {
                            return Err(op_err(node, format!("query {q}: row {j} is outside 0..{s}")));
                        }
                        let from = (base + j as usize) * c;
                        rows[(q * k + slot) * width..(q * k + slot + 1) * width]
                            .copy_from_slice(&latent[from..from + width]);
                    }
                    last.push(count as i64 - 1);
                }
                Ok(vec![Tensor::f32(vec![t, k, width], rows), Tensor::i64(vec![t], last)])
            }
            Op::CacheWrite => {
                let mut cache = f(0)?.to_vec();
                let (s, c) = (a[0].shape[1], a[0].shape[2]);
                let entries = f(1)?;
                let positions = a[2].as_ids().ok_or_else(|| op_err(node, "positions must be integers"))?;
                for (seq, &p) in positions.iter().enumerate() {
                    if p < 0 || p as usize >= s {
                        return Err(op_err(
                            node,
                            format!("sequence {seq}: position {p} is outside the cache (0..{s})"),
                        ));
                    }
                    let at = (seq * s + p as usize) * c;
                    cache[at..at + c].copy_from_slice(&entries[seq * c..(seq + 1) * c]);
                }
                one(Tensor::f32(a[0].shape.clone(), cache))
            }
            Op::MoeRoute(r) => {
                let (x, gate) = (f(0)?, f(1)?);
                let bias = if a.len() > 2 { f(2)? } else { &[] };
                let (e, d) = (a[1].shape[0], a[1].shape[1]);
                let t = x.len() / d;
                let logits = kernels::router_logits(x, gate, t, d, e);
                let (mut idx, mut w) = (Vec::with_capacity(t * r.top_k), Vec::with_capacity(t * r.top_k));
                for row in logits.chunks(e) {
                    let (i, ws) = kernels::route(row, bias, r);
                    idx.extend(i.iter().map(|&v| v as i32));
                    w.extend(ws);
                }
                Ok(vec![
                    Tensor { shape: vec![t, r.top_k], data: TensorData::I32(idx) },
                    Tensor::f32(vec![t, r.top_k], w),
                ])
            }
            Op::MoeExperts { num_experts, fp8_activations } => {
                let x = f(0)?;
                let d = a[0].shape[1];
                let t = x.len() / d;
                let TensorData::I32(idx) = &a[1].data else { return Err(op_err(node, "indices must be i32")) };
                let w = f(2)?;
                let k = a[1].shape[1];
                // fp8 training: f32 master weights quantized once (128x128 blocks), as Fprop reads them.
                let masters: Vec<Option<(Vec<u8>, Vec<f32>)>> = a[3..]
                    .iter()
                    .map(|t| match (&t.data, *fp8_activations) {
                        (TensorData::F32(w), true) => Some(kernels::quantize_master(w, t.shape[0], t.shape[1])),
                        _ => None,
                    })
                    .collect();
                // One expert projection of one row: f32, or fp8 activations x block-scaled fp8 weight.
                let project = |row: &[f32], at: usize| -> Result<Vec<f32>, InterpError> {
                    let wt = a[at];
                    let (n, kk) = (wt.shape[0], wt.shape[1]);
                    if !*fp8_activations {
                        let wv = wt.as_f32().ok_or_else(|| op_err(node, "expert weight is not float"))?;
                        return Ok(kernels::matmul_nt(row, wv, 1, kk, n));
                    }
                    if let Some((bits, scale)) = &masters[at - 3] {
                        let (q, s) = kernels::quantize_fp8(row, kk, kernels::FP8_TILE);
                        let cols = kk.div_ceil(kernels::FP8_TILE);
                        return Ok(kernels::matmul_fp8(
                            &q,
                            &s,
                            bits,
                            scale,
                            1,
                            kk,
                            n,
                            kernels::FP8_TILE,
                            kernels::FP8_TILE,
                            cols,
                        ));
                    }
                    let TensorData::F8Block { bits, scale, block, scale_cols, .. } = &wt.data else {
                        return Err(op_err(node, "fp8 experts need block-scaled fp8 weights"));
                    };
                    let (q, s) = kernels::quantize_fp8(row, kk, block[1]);
                    Ok(kernels::matmul_fp8(&q, &s, bits, scale, 1, kk, n, block[1], block[0], *scale_cols))
                };
                let mut y = vec![0.0f32; t * d];
                for tok in 0..t {
                    let xr = &x[tok * d..(tok + 1) * d];
                    // A token's experts are summed in expert order, as Hugging Face's DeepseekV3MoE
                    // does (index_add_ expert by expert).
                    let mut slots: Vec<usize> = (0..k).collect();
                    slots.sort_by_key(|&s| idx[tok * k + s]);
                    for slot in slots {
                        let e = idx[tok * k + slot];
                        if e < 0 || e as usize >= *num_experts {
                            return Err(op_err(node, format!("expert index {e} outside 0..{num_experts}")));
                        }
                        let base = 3 + 3 * e as usize;
                        let gv = project(xr, base)?;
                        let uv = project(xr, base + 1)?;
                        let h: Vec<f32> = gv.iter().zip(&uv).map(|(a, b)| kernels::silu(*a) * b).collect();
                        let out = project(&h, base + 2)?;
                        for (yv, ov) in y[tok * d..(tok + 1) * d].iter_mut().zip(out) {
                            *yv += w[tok * k + slot] * ov;
                        }
                    }
                }
                one(Tensor::f32(a[0].shape.clone(), y))
            }
            Op::SiluMul => {
                let y = f(0)?.iter().zip(f(1)?).map(|(g, u)| kernels::silu(*g) * u).collect();
                one(Tensor::f32(a[0].shape.clone(), y))
            }
            Op::Add => one(Tensor::f32(a[0].shape.clone(), f(0)?.iter().zip(f(1)?).map(|(x, y)| x + y).collect())),
            Op::Split { axis, sizes } => {
                let x = f(0)?;
                let shape = &a[0].shape;
                let (outer, inner) =
                    (shape[..*axis].iter().product::<usize>(), shape[axis + 1..].iter().product::<usize>());
                let full = shape[*axis];
                let mut start = 0;
                let mut parts = Vec::new();
                for &size in sizes {
                    let mut v = Vec::with_capacity(outer * size * inner);
                    for o in 0..outer {
                        v.extend_from_slice(&x[(o * full + start) * inner..(o * full + start + size) * inner]);
                    }
                    let mut s = shape.clone();
                    s[*axis] = size;
                    parts.push(Tensor::f32(s, v));
                    start += size;
                }
                Ok(parts)
            }
            Op::Concat { axis } => {
                let shape0 = &a[0].shape;
                let outer: usize = shape0[..*axis].iter().product();
                let inner: usize = shape0[axis + 1..].iter().product();
                let total: usize = a.iter().map(|t| t.shape[*axis]).sum();
                let mut v = Vec::with_capacity(outer * total * inner);
                for o in 0..outer {
                    for (i, t) in a.iter().enumerate() {
                        let n = t.shape[*axis] * inner;
                        v.extend_from_slice(&f(i)?[o * n..(o + 1) * n]);
                    }
                }
                let mut s = shape0.clone();
                s[*axis] = total;
                one(Tensor::f32(s, v))
            }
            Op::Reshape => {
                let ty = self.graph.ty(node.outputs[0]);
                let known: usize = ty.shape.iter().filter_map(|d| d.clone().fixed()).product();
                let shape = ty.shape.iter().map(|d| d.clone().fixed().unwrap_or(a[0].len() / known.max(1))).collect();
                one(Tensor { shape, data: a[0].data.clone() })
            }
            Op::QuantizeFp8 { group } => {
                let x = f(0)?;
                let k = *a[0].shape.last().unwrap_or(&1);
                let (bits, scales) = kernels::quantize_fp8(x, k, *group);
                Ok(vec![
                    Tensor { shape: a[0].shape.clone(), data: TensorData::F8(bits) },
                    Tensor::f32(with_last(&a[0].shape, k.div_ceil(*group)), scales),
                ])
            }
            Op::LmHead => {
                let (x, w) = (f(0)?, f(1)?);
                let (v, d) = (a[1].shape[0], a[1].shape[1]);
                one(Tensor::f32(vec![x.len() / d, v], kernels::matmul_nt(x, w, x.len() / d, d, v)))
            }
            Op::CrossEntropy { weight } | Op::CrossEntropyGrad { weight } => {
                let logits = f(0)?;
                let v = a[0].shape[1];
                let targets = a[1].as_ids().ok_or_else(|| op_err(node, "targets must be integers"))?;
                if let Some(&t) = targets.iter().find(|&&t| t < 0 || t as usize >= v) {
                    return Err(op_err(node, format!("target {t} is outside the vocabulary (0..{v})")));
                }
                let (loss, grad) = kernels::cross_entropy(logits, &targets, v);
                match node.op {
                    Op::CrossEntropy { .. } => one(Tensor::f32(vec![1], vec![weight * loss])),
                    _ => one(Tensor::f32(a[0].shape.clone(), grad.iter().map(|g| weight * g).collect())),
                }
            }
            Op::MatMul { transpose_a, transpose_b } => {
                let (x, y) = (f(0)?, f(1)?);
                let (ar, ac, br, bc) = (a[0].shape[0], a[0].shape[1], a[1].shape[0], a[1].shape[1]);
                let (m, k) = if *transpose_a { (ac, ar) } else { (ar, ac) };
                let n = if *transpose_b { br } else { bc };
                let out = kernels::matmul_t(x, y, (m, k, n), (*transpose_a, *transpose_b), (ac, bc));
                one(Tensor::f32(vec![m, n], out))
            }
            Op::RmsNormGrad { eps } => {
                let (dx, dw) = kernels::rms_norm_grad(f(0)?, f(1)?, f(2)?, *eps);
                Ok(vec![Tensor::f32(a[0].shape.clone(), dx), Tensor::f32(a[1].shape.clone(), dw)])
            }
            Op::SiluMulGrad => {
                let (dg, du) = kernels::silu_mul_grad(f(0)?, f(1)?, f(2)?);
                Ok(vec![Tensor::f32(a[0].shape.clone(), dg), Tensor::f32(a[1].shape.clone(), du)])
            }
            Op::RopeGrad(r) => {
                // The inverse rotation: the same angles, sine negated.
                let positions = a[1].as_ids().ok_or_else(|| op_err(node, "positions must be integers"))?;
                one(Tensor::f32(a[0].shape.clone(), rotate_rows(f(0)?, &positions, r, true)))
            }
            Op::AttentionGrad { scale, kv_lora_rank } => {
                let dims = mla_dims(a[0], a[1], a[3], *kv_lora_rank);
                let (t, s) = (a[0].shape[0], a[2].shape[0]);
                let visible: Vec<usize> = (0..t).map(|i| s - t + i).collect();
                let grads = kernels::mla_grad(f(0)?, f(1)?, f(2)?, f(3)?, f(4)?, &visible, s, dims, *scale);
                Ok(grads.into_iter().zip(0..4).map(|(g, k)| Tensor::f32(a[k].shape.clone(), g)).collect())
            }
            Op::ConcatGrad { axis } => {
                let dy = f(0)?;
                let shape = &a[0].shape;
                let (outer, inner) =
                    (shape[..*axis].iter().product::<usize>(), shape[axis + 1..].iter().product::<usize>());
                let full = shape[*axis];
                let mut start = 0;
                let mut parts = Vec::new();
                for x in &a[1..] {
                    let size = x.shape[*axis];
                    let mut v = Vec::with_capacity(outer * size * inner);
                    for o in 0..outer {
                        v.extend_from_slice(&dy[(o * full + start) * inner..(o * full + start + size) * inner]);
                    }
                    parts.push(Tensor::f32(x.shape.clone(), v));
                    start += size;
                }
                Ok(parts)
            }
            Op::SplitGrad { axis, sizes, present } => {
                let shape = &a[0].shape;
                let (outer, inner) =
                    (shape[..*axis].iter().product::<usize>(), shape[axis + 1..].iter().product::<usize>());
                let mut v = Vec::with_capacity(a[0].len());
                let mut given = 1;
                let dys: Vec<Option<&[f32]>> = present
                    .iter()
                    .map(|&p| {
                        if p {
                            given += 1;
                            f(given - 1).ok()
                        } else {
                            None
                        }
                    })
                    .collect();
                for o in 0..outer {
                    for (k, &size) in sizes.iter().enumerate() {
                        match dys[k] {
                            Some(d) => v.extend_from_slice(&d[o * size * inner..(o + 1) * size * inner]),
                            None => v.extend(std::iter::repeat_n(0.0, size * inner)),
                        }
                    }
                }
                one(Tensor::f32(shape.clone(), v))
            }
            Op::MoeRouteGrad(r) => {
                let (x, gate, dw) = (f(0)?, f(1)?, f(3)?);
                let (e, d) = (a[1].shape[0], a[1].shape[1]);
                let t = x.len() / d;
                let TensorData::I32(idx) = &a[2].data else { return Err(op_err(node, "indices must be i32")) };
                let k = a[2].shape[1];
                let logits = kernels::router_logits(x, gate, t, d, e);
                let mut dl = Vec::with_capacity(t * e);
                for tok in 0..t {
                    let sel: Vec<usize> = idx[tok * k..(tok + 1) * k].iter().map(|&i| i as usize).collect();
                    dl.extend(kernels::route_grad(
                        &logits[tok * e..(tok + 1) * e],
                        &sel,
                        &dw[tok * k..(tok + 1) * k],
                        r,
                    ));
                }
                Ok(router_logits_grad(&dl, x, gate, &a[0].shape, &a[1].shape))
            }
            Op::MoeExpertsGrad { num_experts, fp8: true } => {
                let (x, w, dy) = (f(0)?, f(2)?, f(3)?);
                let TensorData::I32(idx) = &a[1].data else { return Err(op_err(node, "indices must be i32")) };
                let params: Vec<&[f32]> = (0..3 * num_experts).map(|p| f(4 + p)).collect::<Result<_, _>>()?;
                let shapes: Vec<&[usize]> = (0..3 * num_experts).map(|p| a[4 + p].shape.as_slice()).collect();
                let (dx, dwts, dparams) =
                    kernels::moe_experts_grad_fp8(x, (idx, w, a[1].shape[1]), dy, &params, &shapes);
                let mut out = vec![Tensor::f32(a[0].shape.clone(), dx), Tensor::f32(a[2].shape.clone(), dwts)];
                out.extend(dparams.into_iter().enumerate().map(|(p, v)| Tensor::f32(a[4 + p].shape.clone(), v)));
                Ok(out)
            }
            Op::MoeExpertsGrad { num_experts, fp8: false } => {
                let (x, w, dy) = (f(0)?, f(2)?, f(3)?);
                let d = a[0].shape[1];
                let t = x.len() / d;
                let TensorData::I32(idx) = &a[1].data else { return Err(op_err(node, "indices must be i32")) };
                let k = a[1].shape[1];
                let mut dx = vec![0.0f32; x.len()];
                let mut dwts = vec![0.0f32; w.len()];
                let mut dparams: Vec<Vec<f32>> = (0..3 * num_experts).map(|p| vec![0.0f32; a[4 + p].len()]).collect();
                for tok in 0..t {
                    let xr = &x[tok * d..(tok + 1) * d];
                    let g_out = &dy[tok * d..(tok + 1) * d];
                    for slot in 0..k {
                        let e = idx[tok * k + slot];
                        if e < 0 || e as usize >= *num_experts {
                            return Err(op_err(node, format!("expert index {e} outside 0..{num_experts}")));
                        }
                        let base = 3 * e as usize;
                        let (wg, wu, wd) = (f(4 + base)?, f(5 + base)?, f(6 + base)?);
                        let inter = a[4 + base].shape[0];
                        let gv = kernels::matmul_nt(xr, wg, 1, d, inter);
                        let uv = kernels::matmul_nt(xr, wu, 1, d, inter);
                        let h: Vec<f32> = gv.iter().zip(&uv).map(|(a, b)| kernels::silu(*a) * b).collect();
                        let y = kernels::matmul_nt(&h, wd, 1, inter, d);
                        let wt = w[tok * k + slot];
                        dwts[tok * k + slot] = kernels::dot(g_out, &y);
                        let dye: Vec<f32> = g_out.iter().map(|g| g * wt).collect();
                        // y = h wd^T: d wd += dye (x) h, dh = dye wd.
                        for o in 0..d {
                            for (i, hv) in h.iter().enumerate() {
                                dparams[base + 2][o * inter + i] += dye[o] * hv;
                            }
                        }
                        let dh = kernels::matmul_t(&dye, wd, (1, d, inter), (false, false), (d, inter));
                        let (dg, du) = kernels::silu_mul_grad(&gv, &uv, &dh);
                        for (i, (gg, uu)) in dg.iter().zip(&du).enumerate() {
                            for c in 0..d {
                                dparams[base][i * d + c] += gg * xr[c];
                                dparams[base + 1][i * d + c] += uu * xr[c];
                                dx[tok * d + c] += gg * wg[i * d + c] + uu * wu[i * d + c];
                            }
                        }
                    }
                }
                let mut out = vec![Tensor::f32(a[0].shape.clone(), dx), Tensor::f32(a[2].shape.clone(), dwts)];
                out.extend(dparams.into_iter().enumerate().map(|(p, v)| Tensor::f32(a[4 + p].shape.clone(), v)));
                Ok(out)
            }
            Op::BalanceLoss { alpha, scoring } | Op::BalanceLossGrad { alpha, scoring } => {
                let (x, gate) = (f(0)?, f(1)?);
                let (e, d) = (a[1].shape[0], a[1].shape[1]);
                let t = x.len() / d;
                let TensorData::I32(idx) = &a[2].data else { return Err(op_err(node, "indices must be i32")) };
                let logits = kernels::router_logits(x, gate, t, d, e);
                let (loss, dl) = kernels::balance_loss(&logits, idx, e, a[2].shape[1], *alpha, *scoring);
                match node.op {
                    Op::BalanceLoss { .. } => one(Tensor::f32(vec![1], vec![loss])),
                    _ => Ok(router_logits_grad(&dl, x, gate, &a[0].shape, &a[1].shape)),
                }
            }
            Op::EmbedGrad { vocab } => {
                let ids = a[0].as_ids().ok_or_else(|| op_err(node, "ids must be integers"))?;
                let dy = f(1)?;
                let d = a[1].shape[1];
                let mut table = vec![0.0f32; vocab * d];
                for (row, &id) in ids.iter().enumerate() {
                    if id < 0 || id as usize >= *vocab {
                        return Err(op_err(node, format!("token id {id} is outside the vocabulary (0..{vocab})")));
                    }
                    for (t, g) in
                        table[id as usize * d..(id as usize + 1) * d].iter_mut().zip(&dy[row * d..(row + 1) * d])
                    {
                        *t += g;
                    }
                }
                one(Tensor::f32(vec![*vocab, d], table))
            }
        }
    }
}

/// (dx, d gate) from the gradient `dl` [T, E] of router logits `x gate^T`: `dx = dl gate`,
/// `d gate = dl^T x`.
fn router_logits_grad(dl: &[f32], x: &[f32], gate: &[f32], x_shape: &[usize], gate_shape: &[usize]) -> Vec<Tensor> {
    let (e, d) = (gate_shape[0], gate_shape[1]);
    let t = x.len() / d;
    let dx = kernels::matmul_t(dl, gate, (t, e, d), (false, false), (e, d));
    let dgate = kernels::matmul_t(dl, x, (e, t, d), (true, false), (e, d));
    vec![Tensor::f32(x_shape.to_vec(), dx), Tensor::f32(gate_shape.to_vec(), dgate)]
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

/// RoPE over rows of `x` (one position per row, `attrs.dim`-wide vectors), or its inverse.
fn rotate_rows(x: &[f32], positions: &[i64], attrs: &crate::graph::RopeAttrs, inverse: bool) -> Vec<f32> {
    let mut x = x.to_vec();
    let inv = rope::inv_freq(&attrs.rope, attrs.dim);
    let factor = rope::attention_factor(&attrs.rope);
    let per_row = x.len() / positions.len().max(1);
    for (row, &p) in positions.iter().enumerate() {
        let (cos, mut sin) = rope::cos_sin(&inv, factor, p);
        if inverse {
            sin.iter_mut().for_each(|s| *s = -*s);
        }
        for v in x[row * per_row..(row + 1) * per_row].chunks_mut(attrs.dim) {
            kernels::rotate(v, &cos, &sin, attrs.rope.interleave);
        }
    }
    x
}

fn mla_dims(q_nope: &Tensor, q_pe: &Tensor, kv_b: &Tensor, kv_lora: usize) -> kernels::MlaDims {
    let (heads, nope, rope) = (q_nope.shape[1], q_nope.shape[2], q_pe.shape[2]);
    kernels::MlaDims { heads, nope, rope, v: kv_b.shape[0] / heads - nope, kv_lora }
}

/// Checks a given input against its declared type, binding dynamic dims by name.
fn check_input(
    name: &str,
    t: &Tensor,
    ty: &crate::graph::TensorType,
    bindings: &mut HashMap<String, usize>,
) -> Result<(), InterpError> {
    let bad = |problem: String| InterpError::Input { name: name.into(), problem };
    let dtype_ok = match ty.dtype {
        DType::I64 | DType::I32 => matches!(t.data, TensorData::I64(_) | TensorData::I32(_)),
        _ => matches!(t.data, TensorData::F32(_)),
    };
    if !dtype_ok || t.shape.len() != ty.rank() {
        return Err(bad(format!("expected {ty}, given {}", t.describe())));
    }
    for (given, dim) in t.shape.iter().zip(&ty.shape) {
        match dim {
            Dim::Fixed(n) if n != given => return Err(bad(format!("expected {ty}, given {}", t.describe()))),
            Dim::Dyn(sym) => {
                if let Some(&bound) = bindings.get(sym) {
                    if bound != *given {
                        return Err(bad(format!("dimension {sym} is {given} here but {bound} in an earlier input")));
                    }
                } else {
                    bindings.insert(sym.clone(), *given);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The attention form a graph uses (for reports).
pub fn attention_form(graph: &Graph) -> Option<AttentionForm> {
    graph.nodes.iter().find_map(|n| match n.op {
        Op::Attention { form, .. } | Op::AttentionDecode { form, .. } => Some(form),
        _ => None,
    })
}
