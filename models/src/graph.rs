//! The model DSL: a typed dataflow graph of kernel-level ops, and the builder that checks shapes as
//! each op is added.
//!
//! Level: ops are what kernels are written for (linear, rms_norm, rope, MLA attention, MoE routing and
//! experts, ...), never scalar arithmetic; the fusion passes match these ops and the reference
//! interpreter implements each one plainly. Values are tensors with a shape (static model dims,
//! named dynamic dims for batch/sequence) and a dtype. A graph has named inputs, named outputs, and
//! parameters referenced by checkpoint name; it holds no weight data.
//!
//! Invariants: nodes are in topological order (an op's operands exist before it); every value has
//! exactly one producer; builder methods return [`GraphError`] naming the op and the shapes when
//! operands do not fit, and never add a node in that case.

use std::fmt;

use crate::config::RopeConfig;
use crate::dtype::DType;

/// One dimension: a model constant, or a dynamic size named by a symbol (`T`, `B`, `S`, `P+T`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    Dyn(String),
}

impl Dim {
    pub fn dynamic(name: &str) -> Dim {
        Dim::Dyn(name.to_string())
    }

    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(n),
            Dim::Dyn(_) => None,
        }
    }

    /// The sum of two dims (concatenation): fixed if both are, else a new symbol.
    fn plus(&self, other: &Dim) -> Dim {
        match (self, other) {
            (Dim::Fixed(a), Dim::Fixed(b)) => Dim::Fixed(a + b),
            _ => Dim::Dyn(format!("{self}+{other}")),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dyn(s) => f.write_str(s),
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Fixed(n)
    }
}

/// Shape and element type of a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub shape: Vec<Dim>,
    pub dtype: DType,
}

impl TensorType {
    pub fn new(shape: Vec<Dim>, dtype: DType) -> TensorType {
        TensorType { shape, dtype }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn last(&self) -> &Dim {
        self.shape.last().expect("rank >= 1 checked by the builder")
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        write!(f, "[{}] {}", dims.join(", "), self.dtype)
    }
}

/// How a weight is stored (and so which GEMM a linear op needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// A plain tensor of this dtype (f32 or bf16).
    Dense(DType),
    /// `float8_e4m3fn` weight with an f32 `weight_scale_inv` of one value per `block` (rows, cols)
    /// block, ragged at the edges; `W = f32(Wq) * scale`.
    Fp8Block { block: [usize; 2] },
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Dense(d) => write!(f, "{d}"),
            WeightFormat::Fp8Block { block } => write!(f, "fp8e4m3 block {}x{}", block[0], block[1]),
        }
    }
}

/// Which MLA formulation an attention op computes (both give the same result up to rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionForm {
    /// Expand the latent through kv_b_proj into per-head keys and values (prefill, training).
    Naive,
    /// Absorb W_UK into the query and W_UV into the output; attend over the latent (decode).
    Absorbed,
}

impl fmt::Display for AttentionForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttentionForm::Naive => "naive",
            AttentionForm::Absorbed => "absorbed",
        })
    }
}

/// MoE routing attributes (spec section 4).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    /// DeepSeek-V3's sigmoid and bias, or DeepSeek-V2's softmax (no bias input).
    pub scoring: crate::config::Scoring,
}

/// Rotary embedding attributes: which dims rotate, how pairs are formed, the frequencies' source.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeAttrs {
    pub rope: RopeConfig,
    /// Rotary dims (last axis size).
    pub dim: usize,
}

/// A kernel-level operation. Operands are listed per variant as `(name [shape])`.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A named graph input (token ids, positions, caches).
    Input { name: String },
    /// A weight, by checkpoint name (`model.layers.0.self_attn.q_a_proj.weight`).
    Param { name: String, format: WeightFormat },
    /// (table `[V, D]`, ids `[N]`) -> `[N, D]`
    Embed,
    /// (x [.., K], w [N, K]) -> [.., N] = x @ w^T. With fp8 activations: (xq [.., K] f8, xs [.., K/g] f32, w).
    Linear,
    /// (x `[.., D]`, w `[D]`) -> `[.., D]`, in f32.
    RmsNorm { eps: f32 },
    /// (x `[N, (H,) d]`, positions `[N]`) -> same; rotates at absolute positions.
    Rope(RopeAttrs),
    /// MLA over one sequence, causal: (q_nope [T, H, dn], q_pe [T, H, dr], latent [S, kv + dr],
    /// kv_b [H * (dn + dv), kv]) -> [T, H, dv]. Query t sits at absolute position S - T + t; the latent
    /// rows are (normed ckv, rotated k_pe) of positions 0..S.
    Attention { form: AttentionForm, scale: f32, kv_lora_rank: usize },
    /// MLA decode, one new token per sequence: (q_nope [B, H, dn], q_pe [B, H, dr], latent [B, S, kv + dr],
    /// positions `[B]`, kv_b) -> `[B, H, dv]`; sequence b attends to latent rows `0..=positions[b]`.
    AttentionDecode { form: AttentionForm, scale: f32, kv_lora_rank: usize },
    /// (cache `[B, S, C]`, entries `[B, C]`, positions `[B]`) -> cache with row `positions[b]` of sequence b replaced.
    CacheWrite,
    // --- DeepSeek Sparse Attention (DeepSeek-V3.2; [`crate::config::SparseIndexer`]).
    /// (x `[.., D]`, w `[D]`, b `[D]`) -> `[.., D]`: `(x - mean) / sqrt(var + eps) * w + b` over the last
    /// axis (the biased variance), in f32, as `torch.nn.LayerNorm`.
    LayerNorm { eps: f32 },
    /// The lightning indexer's key selection over one sequence, (q `[T, Hi, Di]`, w `[T, Hi]`, cache
    /// rows `[S, C]`) -> selected `[T, top_k]` i32; a row's key is its last `Di` columns (C >= Di: the
    /// cache row, latent then key, read in place). Query t sits at row S - T + t, as in `attention`; a key's
    /// score is `sum_h w[t,h] / sqrt(Hi) * relu(q[t,h] . key / sqrt(Di))`. A query selects the `top_k`
    /// best-scoring keys at or before its row (every one of them while there are at most `top_k`; equal
    /// scores: the earlier key), listed in ascending order, the rest of the row -1.
    SparseIndex { top_k: usize },
    /// Decode's selection, one query per sequence: (q `[B, Hi, Di]`, w `[B, Hi]`, rows `[B, S, C]`,
    /// positions `[B]`) -> `[B, top_k]` i32 over sequence b's keys `0..=positions[b]`.
    SparseIndexDecode { top_k: usize },
    /// The rows each query selected, for `attention_decode` over them (sparse MLA: a query attends
    /// to its gathered rows `0..=last`): (cache `[S, C]`, selected `[T, K]` i32) -> (rows `[T, K, width]`,
    /// last `[T]` i64) with `rows[t, k]` the first `width` columns of `cache[selected[t, k]]` (the
    /// latent; zeros for -1) and `last[t]` the count of t's selected rows minus one; a 3-D cache
    /// `[B, S, C]` is one set of rows per query (decode: each sequence's own). A query's selection is
    /// its valid rows then -1s.
    GatherRows { width: usize },
    /// (x `[T, D]`, gate `[E, D]`, bias `[E]`) -> (indices `[T, K]` i32, weights `[T, K]` f32); a
    /// softmax routing ([`crate::config::Scoring::Softmax`]) has no bias input.
    MoeRoute(Routing),
    /// (x [T, D], indices [T, K], weights [T, K], then gate_e [I, D], up_e [I, D], down_e [D, I] for each
    /// expert e) -> `[T, D]` = `sum_k weights[t,k] * Expert_{indices[t,k]}(x[t])`; experts are SwiGLU.
    /// With `fp8_activations` the expert inputs are quantized 1x128 and the GEMMs block-scaled.
    MoeExperts { num_experts: usize, fp8_activations: bool },
    /// (gate, up) -> silu(gate) * up
    SiluMul,
    /// (a, b) -> a + b, same shapes.
    Add,
    /// (x) -> pieces along `axis` of the given sizes.
    Split { axis: usize, sizes: Vec<usize> },
    /// (xs...) -> concatenation along `axis`.
    Concat { axis: usize },
    /// (x) -> same elements, new shape (at most one dynamic dim, kept in place).
    Reshape,
    /// (x [.., K]) -> (xq [.., K] f8e4m3, scales [.., ceil(K / group)] f32): per token per `group` channels,
    /// s = max(amax, 1e-4) / 448, xq = e4m3(x / s).
    QuantizeFp8 { group: usize },
    /// (x [N, D], w [V, D]) -> logits [N, V] f32.
    LmHead,
    // --- Training ([`crate::autodiff`]): losses and the vector-Jacobian products of the ops.
    /// (logits `[N, V]`, targets `[N]` i64) -> `[1]`: `weight` x the mean over rows of
    /// `-log softmax(logits)[target]`.
    CrossEntropy { weight: f32 },
    /// (logits `[N, V]`, targets `[N]`) -> d (weighted mean cross-entropy) / d logits `[N, V]` (the
    /// loss's seed is 1).
    CrossEntropyGrad { weight: f32 },
    /// (a, b) 2-D -> a' @ b' with ' the transposes asked for: the VJPs of linear layers.
    MatMul { transpose_a: bool, transpose_b: bool },
    /// (x `[N, D]`, w `[D]`, dy `[N, D]`) -> (dx `[N, D]`, dw `[D]`).
    RmsNormGrad { eps: f32 },
    /// (gate, up, dy) -> (d gate, d up) of silu(gate) * up.
    SiluMulGrad,
    /// (ids `[N]`, dy `[N, D]`) -> d table `[vocab, D]`: rows scattered and summed.
    EmbedGrad { vocab: usize },
    /// (dy, positions) -> dx of `rope`: the inverse rotation.
    RopeGrad(RopeAttrs),
    /// Naive-form MLA (one sequence, causal), (q_nope, q_pe, latent, kv_b, d out) ->
    /// (d q_nope, d q_pe, d latent, d kv_b).
    AttentionGrad { scale: f32, kv_lora_rank: usize },
    /// (dy, x_0, ..., x_n) -> (dx_0, ..., dx_n) of `concat(x_i)` along `axis` (sizes taken at run time).
    ConcatGrad { axis: usize },
    /// (x, the output gradients that exist) -> dx of `split(x)` along `axis`; a piece without a
    /// gradient (`present` false) contributes zeros.
    SplitGrad { axis: usize, sizes: Vec<usize>, present: Vec<bool> },
    /// (x, gate, indices, d weights) -> (dx, d gate) of `moe_route`: through the selected
    /// experts' sigmoid scores and their normalization, or their softmax scores (the selection
    /// itself passes no gradient; a bias is set by the load-balancing rule, not by gradients).
    MoeRouteGrad(Routing),
    /// (x, indices, weights, dy, then gate_e, up_e, down_e per expert) -> (dx, d weights, then
    /// d gate_e, d up_e, d down_e per expert) of `moe_experts` (f32).
    /// `fp8`: the recipe's e4m3 GEMMs (Fprop recomputed, Dgrad, Wgrad) on f32 master weights.
    MoeExpertsGrad { num_experts: usize, fp8: bool },
    /// DeepSeek-V3's complementary sequence-wise balance loss of one MoE layer, (x [T, D], gate [E, D],
    /// indices `[T, K]`) -> `[1]`: `alpha * sum_i f_i P_i` with `f_i = E / (K T) * (tokens routed to i)`
    /// and `P_i = mean_t s_i,t / sum_j s_j,t` over the sigmoid affinities `s = sigmoid(x gate^T)`.
    /// With [`crate::config::Scoring::Softmax`] (DeepSeek-V2's expert-level balance loss) the
    /// affinities are the softmax.
    BalanceLoss { alpha: f32, scoring: crate::config::Scoring },
    /// (x, gate, indices) -> (dx, d gate) of `balance_loss` (through P; f is a count).
    BalanceLossGrad { alpha: f32, scoring: crate::config::Scoring },
    /// The training Fprop of DeepSeek-V3's FP8 recipe, (x [.., K] f32, w [N, K] f32 master) -> y:
    /// `x W^T` with x quantized 1x128 along K and W 128x128 (e4m3), f32 accumulation promoted per
    /// 128-wide K block with both scales.
    Fp8Linear,
    /// Dgrad of `fp8_linear`, (dy [.., N], w [N, K]) -> dx [.., K] = `dy W`: dy quantized 1x128
    /// along N, W with the same 128x128 blocks (transposed).
    Fp8LinearDgrad,
    /// Wgrad of `fp8_linear`, (dy [.., N], x [.., K]) -> dW [N, K] = `dy^T x`: both quantized in
    /// 128x1 tiles (128 tokens of one channel), the contraction running over tokens.
    Fp8LinearWgrad,
}

impl Op {
    /// The DSL and dialect name of the op.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Embed => "embed",
            Op::Linear => "linear",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope(_) => "rope",
            Op::Attention { .. } => "attention",
            Op::AttentionDecode { .. } => "attention_decode",
            Op::CacheWrite => "cache_write",
            Op::LayerNorm { .. } => "layer_norm",
            Op::SparseIndex { .. } => "sparse_index",
            Op::SparseIndexDecode { .. } => "sparse_index_decode",
            Op::GatherRows { .. } => "gather_rows",
            Op::MoeRoute(_) => "moe_route",
            Op::MoeExperts { .. } => "moe_experts",
            Op::SiluMul => "silu_mul",
            Op::Add => "add",
            Op::Split { .. } => "split",
            Op::Concat { .. } => "concat",
            Op::Reshape => "reshape",
            Op::QuantizeFp8 { .. } => "quantize_fp8",
            Op::LmHead => "lm_head",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::MatMul { .. } => "matmul",
            Op::RmsNormGrad { .. } => "rms_norm_grad",
            Op::SiluMulGrad => "silu_mul_grad",
            Op::EmbedGrad { .. } => "embed_grad",
            Op::RopeGrad(_) => "rope_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::ConcatGrad { .. } => "concat_grad",
            Op::SplitGrad { .. } => "split_grad",
            Op::MoeRouteGrad(_) => "moe_route_grad",
            Op::MoeExpertsGrad { .. } => "moe_experts_grad",
            Op::BalanceLoss { .. } => "balance_loss",
            Op::BalanceLossGrad { .. } => "balance_loss_grad",
            Op::Fp8Linear => "fp8_linear",
            Op::Fp8LinearDgrad => "fp8_linear_dgrad",
            Op::Fp8LinearWgrad => "fp8_linear_wgrad",
        }
    }
}

/// A value: one result of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// One op with its operands and results.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

/// A shape or type mismatch found while building; names the op and the operands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {problem}")]
pub struct GraphError {
    pub op: String,
    pub problem: String,
}

/// A built graph: nodes in topological order, value types, named inputs and outputs.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    /// Type of each value, indexed by `ValueId`.
    pub values: Vec<TensorType>,
    /// Node index producing each value.
    pub producers: Vec<u32>,
    pub inputs: Vec<(String, ValueId)>,
    pub outputs: Vec<(String, ValueId)>,
}

impl Graph {
    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.values[v.0 as usize]
    }

    pub fn producer(&self, v: ValueId) -> &Node {
        &self.nodes[self.producers[v.0 as usize] as usize]
    }

    /// Parameters in order of first appearance: (checkpoint name, type, format, value).
    pub fn params(&self) -> impl Iterator<Item = (&str, &TensorType, WeightFormat, ValueId)> {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Param { name, format } => Some((name.as_str(), self.ty(n.outputs[0]), *format, n.outputs[0])),
            _ => None,
        })
    }

    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    pub fn input(&self, name: &str) -> Option<ValueId> {
        self.inputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Number of ops other than inputs and params.
    pub fn op_count(&self) -> usize {
        self.nodes.iter().filter(|n| !matches!(n.op, Op::Input { .. } | Op::Param { .. })).count()
    }
}

/// Builds a [`Graph`], checking every op's operands as it is added.
#[derive(Debug, Default)]
pub struct Builder {
    graph: Graph,
    param_index: std::collections::HashMap<String, ValueId>,
}

fn shapes(tys: &[&TensorType]) -> String {
    tys.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" and ")
}

impl Builder {
    pub fn new(name: &str) -> Builder {
        Builder { graph: Graph { name: name.to_string(), ..Graph::default() }, ..Builder::default() }
    }

    pub fn finish(self) -> Graph {
        self.graph
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        self.graph.ty(v)
    }

    fn push(&mut self, op: Op, inputs: Vec<ValueId>, result_types: Vec<TensorType>) -> Vec<ValueId> {
        let node_index = self.graph.nodes.len() as u32;
        let mut outputs = Vec::with_capacity(result_types.len());
        for ty in result_types {
            let id = ValueId(self.graph.values.len() as u32);
            self.graph.values.push(ty);
            self.graph.producers.push(node_index);
            outputs.push(id);
        }
        self.graph.nodes.push(Node { op, inputs, outputs: outputs.clone() });
        outputs
    }

    fn push1(&mut self, op: Op, inputs: Vec<ValueId>, ty: TensorType) -> ValueId {
        self.push(op, inputs, vec![ty])[0]
    }

    fn err<T>(op: &str, problem: impl Into<String>) -> Result<T, GraphError> {
        Err(GraphError { op: op.to_string(), problem: problem.into() })
    }

    /// A named graph input.
    pub fn input(&mut self, name: &str, shape: Vec<Dim>, dtype: DType) -> Result<ValueId, GraphError> {
        if self.graph.inputs.iter().any(|(n, _)| n == name) {
            return Self::err("input", format!("duplicate input name '{name}'"));
        }
        let v = self.push1(Op::Input { name: name.to_string() }, vec![], TensorType::new(shape, dtype));
        self.graph.inputs.push((name.to_string(), v));
        Ok(v)
    }

    /// Marks `v` as the graph output `name`.
    pub fn output(&mut self, name: &str, v: ValueId) -> Result<(), GraphError> {
        if self.graph.outputs.iter().any(|(n, _)| n == name) {
            return Self::err("output", format!("duplicate output name '{name}'"));
        }
        self.graph.outputs.push((name.to_string(), v));
        Ok(())
    }

    /// A weight by checkpoint name; the same name twice gives the same value (shapes must agree).
    pub fn param(&mut self, name: &str, shape: &[usize], format: WeightFormat) -> Result<ValueId, GraphError> {
        let dtype = match format {
            WeightFormat::Dense(d) => d,
            WeightFormat::Fp8Block { .. } => DType::F8E4M3,
        };
        let ty = TensorType::new(shape.iter().map(|&d| Dim::Fixed(d)).collect(), dtype);
        if let Some(&v) = self.param_index.get(name) {
            if self.ty(v) != &ty {
                return Self::err("param", format!("'{name}' used as {} and as {ty}", self.ty(v)));
            }
            return Ok(v);
        }
        let v = self.push1(Op::Param { name: name.to_string(), format }, vec![], ty);
        self.param_index.insert(name.to_string(), v);
        Ok(v)
    }

    fn expect_float(&self, op: &str, v: ValueId, what: &str) -> Result<(), GraphError> {
        if !self.ty(v).dtype.is_float() || self.ty(v).dtype == DType::F8E4M3 {
            return Self::err(op, format!("{what} must be f32 or bf16, found {}", self.ty(v)));
        }
        Ok(())
    }

    fn expect_ids(&self, op: &str, v: ValueId, what: &str) -> Result<(), GraphError> {
        let t = self.ty(v);
        if !matches!(t.dtype, DType::I32 | DType::I64) || t.rank() != 1 {
            return Self::err(op, format!("{what} must be a 1-D i32/i64 tensor, found {t}"));
        }
        Ok(())
    }

    /// (table `[V, D]`, ids `[N]`) -> `[N, D]` f32
    pub fn embed(&mut self, table: ValueId, ids: ValueId) -> Result<ValueId, GraphError> {
        self.expect_ids("embed", ids, "ids")?;
        let t = self.ty(table);
        if t.rank() != 2 {
            return Self::err("embed", format!("table must be [vocab, hidden], found {t}"));
        }
        let ty = TensorType::new(vec![self.ty(ids).shape[0].clone(), t.shape[1].clone()], DType::F32);
        Ok(self.push1(Op::Embed, vec![table, ids], ty))
    }

    /// x [.., K] @ w[N, K]^T -> [.., N] f32.
    pub fn linear(&mut self, x: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        self.expect_float("linear", x, "input")?;
        let (xt, wt) = (self.ty(x), self.ty(w));
        if xt.rank() < 1 || wt.rank() != 2 || xt.last() != &wt.shape[1] {
            return Self::err("linear", format!("input {xt} does not fit weight {wt} ([out, in])"));
        }
        let mut shape = xt.shape.clone();
        *shape.last_mut().expect("rank >= 1") = wt.shape[0].clone();
        Ok(self.push1(Op::Linear, vec![x, w], TensorType::new(shape, DType::F32)))
    }

    /// `x W^T` as FP8 training runs it (see `Op::Fp8Linear`): f32 x and master weight, quantized
    /// inside.
    pub fn fp8_linear(&mut self, x: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        self.expect_float("fp8_linear", x, "input")?;
        let (xt, wt) = (self.ty(x), self.ty(w));
        if xt.rank() < 1 || wt.rank() != 2 || xt.last() != &wt.shape[1] || wt.dtype != DType::F32 {
            return Self::err("fp8_linear", format!("input {xt} does not fit f32 master weight {wt} ([out, in])"));
        }
        let mut shape = xt.shape.clone();
        *shape.last_mut().expect("rank >= 1") = wt.shape[0].clone();
        Ok(self.push1(Op::Fp8Linear, vec![x, w], TensorType::new(shape, DType::F32)))
    }

    /// dx of `fp8_linear(x, w)` for the output gradient `dy` (FP8 Dgrad).
    pub fn fp8_linear_dgrad(&mut self, dy: ValueId, w: ValueId, x: ValueId) -> Result<ValueId, GraphError> {
        let ty = TensorType::new(self.ty(x).shape.clone(), DType::F32);
        Ok(self.push1(Op::Fp8LinearDgrad, vec![dy, w], ty))
    }

    /// dW of `fp8_linear(x, w)` for the output gradient `dy` (FP8 Wgrad).
    pub fn fp8_linear_wgrad(&mut self, dy: ValueId, x: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        let ty = TensorType::new(self.ty(w).shape.clone(), DType::F32);
        Ok(self.push1(Op::Fp8LinearWgrad, vec![dy, x], ty))
    }

    /// Linear with fp8-quantized activations (from [`Builder::quantize_fp8`]) and an fp8 weight.
    pub fn linear_fp8(&mut self, xq: ValueId, xs: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        let (qt, st, wt) = (self.ty(xq), self.ty(xs), self.ty(w));
        if qt.dtype != DType::F8E4M3 || wt.dtype != DType::F8E4M3 || st.dtype != DType::F32 {
            return Self::err(
                "linear",
                format!("fp8 linear needs f8 activations, f32 scales, f8 weight; found {}", shapes(&[qt, st, wt])),
            );
        }
        if qt.rank() < 1 || wt.rank() != 2 || qt.last() != &wt.shape[1] || st.rank() != qt.rank() {
            return Self::err("linear", format!("activations {qt} / scales {st} do not fit weight {wt}"));
        }
        let mut shape = qt.shape.clone();
        *shape.last_mut().expect("rank >= 1") = wt.shape[0].clone();
        Ok(self.push1(Op::Linear, vec![xq, xs, w], TensorType::new(shape, DType::F32)))
    }

    /// RMSNorm over the last axis (f32).
    pub fn rms_norm(&mut self, x: ValueId, w: ValueId, eps: f32) -> Result<ValueId, GraphError> {
        self.expect_float("rms_norm", x, "input")?;
        let (xt, wt) = (self.ty(x), self.ty(w));
        if xt.rank() < 1 || wt.rank() != 1 || xt.last() != &wt.shape[0] {
            return Self::err("rms_norm", format!("input {xt} does not fit weight {wt}"));
        }
        let ty = TensorType::new(xt.shape.clone(), DType::F32);
        Ok(self.push1(Op::RmsNorm { eps }, vec![x, w], ty))
    }

    /// `torch.nn.LayerNorm` over the last axis of x with weight w and bias b (see [`Op::LayerNorm`]).
    pub fn layer_norm(&mut self, x: ValueId, w: ValueId, b: ValueId, eps: f32) -> Result<ValueId, GraphError> {
        self.expect_float("layer_norm", x, "input")?;
        let (xt, wt, bt) = (self.ty(x), self.ty(w), self.ty(b));
        if xt.rank() < 1 || wt.rank() != 1 || xt.last() != &wt.shape[0] || bt.shape != wt.shape {
            return Self::err("layer_norm", format!("input {xt} does not fit weight {wt} and bias {bt}"));
        }
        let ty = TensorType::new(xt.shape.clone(), DType::F32);
        Ok(self.push1(Op::LayerNorm { eps }, vec![x, w, b], ty))
    }

    /// The indexer's selection (see [`Op::SparseIndex`]; with `positions`, [`Op::SparseIndexDecode`]:
    /// q `[B, Hi, Di]`, rows `[B, S, C]`).
    pub fn sparse_index(
        &mut self,
        q: ValueId,
        w: ValueId,
        keys: ValueId,
        positions: Option<ValueId>,
        top_k: usize,
    ) -> Result<ValueId, GraphError> {
        let op = if positions.is_some() { "sparse_index_decode" } else { "sparse_index" };
        for (v, what) in [(q, "queries"), (w, "weights"), (keys, "keys")] {
            self.expect_float(op, v, what)?;
        }
        let (qt, wt, kt) = (self.ty(q), self.ty(w), self.ty(keys));
        let key_rank = if positions.is_some() { 3 } else { 2 };
        let fits = qt.rank() == 3
            && wt.rank() == 2
            && kt.rank() == key_rank
            && wt.shape[0] == qt.shape[0]
            && wt.shape[1] == qt.shape[1]
            && matches!((kt.last(), qt.last()), (Dim::Fixed(c), Dim::Fixed(d)) if c >= d)
            && (positions.is_none() || kt.shape[0] == qt.shape[0]);
        if !fits || top_k == 0 {
            return Self::err(op, format!("queries {qt}, weights {wt}, keys {kt}, top_k {top_k} do not fit"));
        }
        let ty = TensorType::new(vec![qt.shape[0].clone(), top_k.into()], DType::I32);
        Ok(match positions {
            None => self.push1(Op::SparseIndex { top_k }, vec![q, w, keys], ty),
            Some(p) => {
                self.expect_ids(op, p, "positions")?;
                self.push1(Op::SparseIndexDecode { top_k }, vec![q, w, keys, p], ty)
            }
        })
    }

    /// Rotates the last axis of x `[N, d]` or `[N, H, d]` at `positions` `[N]`.
    pub fn rope(&mut self, x: ValueId, positions: ValueId, rope: &RopeConfig) -> Result<ValueId, GraphError> {
        self.expect_float("rope", x, "input")?;
        self.expect_ids("rope", positions, "positions")?;
        let (xt, pt) = (self.ty(x), self.ty(positions));
        let Some(Dim::Fixed(dim)) = xt.shape.last().cloned() else {
            return Self::err("rope", format!("input {xt} needs a static last dim"));
        };
        if !(2..=3).contains(&xt.rank()) || xt.shape[0] != pt.shape[0] || dim % 2 != 0 {
            return Self::err(
                "rope",
                format!("input {xt} must be [N, d] or [N, H, d] with even d matching positions {pt}"),
            );
        }
        let ty = TensorType::new(xt.shape.clone(), DType::F32);
        Ok(self.push1(Op::Rope(RopeAttrs { rope: rope.clone(), dim }), vec![x, positions], ty))
    }

    fn check_mla(
        &self,
        op: &str,
        q_nope: ValueId,
        q_pe: ValueId,
        latent: ValueId,
        kv_b: ValueId,
        kv_lora_rank: usize,
        batched: bool,
    ) -> Result<TensorType, GraphError> {
        let (qn, qp, lat, wb) = (self.ty(q_nope), self.ty(q_pe), self.ty(latent), self.ty(kv_b));
        let bad = || Self::err(op, format!("q_nope {qn}, q_pe {qp}, latent {lat}, kv_b_proj {wb} do not fit"));
        if qn.rank() != 3 || qp.rank() != 3 || qn.shape[..2] != qp.shape[..2] || wb.rank() != 2 {
            return bad();
        }
        let (Some(h), Some(dn), Some(dr)) =
            (qn.shape[1].clone().fixed(), qn.shape[2].clone().fixed(), qp.shape[2].clone().fixed())
        else {
            return bad();
        };
        let lat_rank = if batched { 3 } else { 2 };
        if lat.rank() != lat_rank
            || lat.last() != &Dim::Fixed(kv_lora_rank + dr)
            || wb.shape[1] != Dim::Fixed(kv_lora_rank)
        {
            return bad();
        }
        if batched && lat.shape[0] != qn.shape[0] {
            return bad();
        }
        let Some(rows) = wb.shape[0].clone().fixed() else { return bad() };
        if rows % h != 0 || rows / h <= dn {
            return bad();
        }
        let dv = rows / h - dn;
        Ok(TensorType::new(vec![qn.shape[0].clone(), Dim::Fixed(h), Dim::Fixed(dv)], DType::F32))
    }

    /// Causal MLA over one sequence (see [`Op::Attention`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q_nope: ValueId,
        q_pe: ValueId,
        latent: ValueId,
        kv_b: ValueId,
        form: AttentionForm,
        scale: f32,
        kv_lora_rank: usize,
    ) -> Result<ValueId, GraphError> {
        let ty = self.check_mla("attention", q_nope, q_pe, latent, kv_b, kv_lora_rank, false)?;
        Ok(self.push1(Op::Attention { form, scale, kv_lora_rank }, vec![q_nope, q_pe, latent, kv_b], ty))
    }

    /// The first `width` columns of the rows `selected` picks from `latent`, and each query's last
    /// (see [`Op::GatherRows`]).
    pub fn gather_rows(
        &mut self,
        latent: ValueId,
        selected: ValueId,
        width: usize,
    ) -> Result<(ValueId, ValueId), GraphError> {
        self.expect_float("gather_rows", latent, "rows")?;
        let (lt, st) = (self.ty(latent).clone(), self.ty(selected).clone());
        let per_query = lt.rank() == 3;
        let fits = st.dtype == DType::I32
            && st.rank() == 2
            && (lt.rank() == 2 || (per_query && lt.shape[0] == st.shape[0]))
            && matches!(st.shape[1], Dim::Fixed(_))
            && matches!(lt.last(), Dim::Fixed(c) if *c >= width && width > 0);
        if !fits {
            return Self::err("gather_rows", format!("rows {lt}, selected {st} and width {width} do not fit"));
        }
        let (t, k) = (st.shape[0].clone(), st.shape[1].clone());
        let rows = TensorType::new(vec![t.clone(), k, width.into()], DType::F32);
        let results = vec![rows, TensorType::new(vec![t], DType::I64)];
        let out = self.push(Op::GatherRows { width }, vec![latent, selected], results);
        Ok((out[0], out[1]))
    }

    /// MLA decode over per-sequence latent caches (see [`Op::AttentionDecode`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &mut self,
        q_nope: ValueId,
        q_pe: ValueId,
        latent: ValueId,
        positions: ValueId,
        kv_b: ValueId,
        form: AttentionForm,
        scale: f32,
        kv_lora_rank: usize,
    ) -> Result<ValueId, GraphError> {
        self.expect_ids("attention_decode", positions, "positions")?;
        let ty = self.check_mla("attention_decode", q_nope, q_pe, latent, kv_b, kv_lora_rank, true)?;
        let inputs = vec![q_nope, q_pe, latent, positions, kv_b];
        Ok(self.push1(Op::AttentionDecode { form, scale, kv_lora_rank }, inputs, ty))
    }

    /// Writes one entry per sequence into a [B, S, C] cache at `positions`.
    pub fn cache_write(&mut self, cache: ValueId, entries: ValueId, positions: ValueId) -> Result<ValueId, GraphError> {
        self.expect_ids("cache_write", positions, "positions")?;
        let (ct, et) = (self.ty(cache), self.ty(entries));
        if ct.rank() != 3 || et.rank() != 2 || ct.shape[0] != et.shape[0] || ct.shape[2] != et.shape[1] {
            return Self::err("cache_write", format!("cache {ct} and entries {et} do not fit ([B, S, C] and [B, C])"));
        }
        let ty = ct.clone();
        Ok(self.push1(Op::CacheWrite, vec![cache, entries, positions], ty))
    }

    /// MoE routing: (indices [T, K] i32, weights [T, K] f32).
    pub fn moe_route(
        &mut self,
        x: ValueId,
        gate: ValueId,
        bias: Option<ValueId>,
        routing: Routing,
    ) -> Result<(ValueId, ValueId), GraphError> {
        self.expect_float("moe_route", x, "input")?;
        let (xt, gt) = (self.ty(x), self.ty(gate));
        if xt.rank() != 2 || gt.rank() != 2 || xt.shape[1] != gt.shape[1] {
            return Self::err("moe_route", format!("input {xt}, gate {gt} do not fit"));
        }
        match (bias, routing.scoring) {
            (Some(bias), crate::config::Scoring::Sigmoid) => {
                let bt = self.ty(bias);
                if bt.rank() != 1 || gt.shape[0] != bt.shape[0] {
                    return Self::err("moe_route", format!("gate {gt}, bias {bt} do not fit"));
                }
            }
            (None, crate::config::Scoring::Softmax) => {}
            (_, scoring) => {
                return Self::err(
                    "moe_route",
                    format!("{scoring:?} scoring with bias {bias:?} (sigmoid takes one, softmax none)"),
                )
            }
        }
        let e = gt.shape[0].clone().fixed().unwrap_or(0);
        if routing.n_group == 0 || e % routing.n_group != 0 || routing.top_k > e || routing.topk_group > routing.n_group
        {
            return Self::err("moe_route", format!("{e} experts cannot be routed with {routing:?}"));
        }
        let t = xt.shape[0].clone();
        let k = Dim::Fixed(routing.top_k);
        let out = self.push(
            Op::MoeRoute(routing),
            [x, gate].into_iter().chain(bias).collect(),
            vec![TensorType::new(vec![t.clone(), k.clone()], DType::I32), TensorType::new(vec![t, k], DType::F32)],
        );
        Ok((out[0], out[1]))
    }

    /// Routed SwiGLU experts: `experts[e] = (gate, up, down)` weights.
    pub fn moe_experts(
        &mut self,
        x: ValueId,
        indices: ValueId,
        weights: ValueId,
        experts: &[(ValueId, ValueId, ValueId)],
        fp8_activations: bool,
    ) -> Result<ValueId, GraphError> {
        self.expect_float("moe_experts", x, "input")?;
        let (xt, it, wt) = (self.ty(x), self.ty(indices), self.ty(weights));
        if xt.rank() != 2
            || it.shape != wt.shape
            || it.rank() != 2
            || it.shape[0] != xt.shape[0]
            || it.dtype != DType::I32
        {
            return Self::err("moe_experts", format!("input {xt}, indices {it}, weights {wt} do not fit"));
        }
        let d = xt.shape[1].clone();
        let mut inputs = vec![x, indices, weights];
        for (e, &(g, u, dn)) in experts.iter().enumerate() {
            let (gt, ut, dt) = (self.ty(g), self.ty(u), self.ty(dn));
            let ok = gt.rank() == 2
                && gt.shape == ut.shape
                && gt.shape[1] == d
                && dt.rank() == 2
                && dt.shape[0] == d
                && dt.shape[1] == gt.shape[0];
            if !ok {
                return Self::err(
                    "moe_experts",
                    format!("expert {e}: gate {gt}, up {ut}, down {dt} do not fit input {xt}"),
                );
            }
            // fp8 activations read e4m3 weights, or (training) f32 masters quantized as read.
            if fp8_activations && !matches!(gt.dtype, DType::F8E4M3 | DType::F32) {
                return Self::err(
                    "moe_experts",
                    format!("expert {e}: fp8 activations need fp8 weights or f32 masters, found gate {gt}"),
                );
            }
            inputs.extend([g, u, dn]);
        }
        let ty = TensorType::new(xt.shape.clone(), DType::F32);
        Ok(self.push1(Op::MoeExperts { num_experts: experts.len(), fp8_activations }, inputs, ty))
    }

    fn same_shape(&mut self, op: Op, a: ValueId, b: ValueId) -> Result<ValueId, GraphError> {
        let name = op.name();
        self.expect_float(name, a, "lhs")?;
        self.expect_float(name, b, "rhs")?;
        let (at, bt) = (self.ty(a), self.ty(b));
        if at.shape != bt.shape {
            return Self::err(name, format!("operands {} differ in shape", shapes(&[at, bt])));
        }
        let ty = TensorType::new(at.shape.clone(), DType::F32);
        Ok(self.push1(op, vec![a, b], ty))
    }

    pub fn silu_mul(&mut self, gate: ValueId, up: ValueId) -> Result<ValueId, GraphError> {
        self.same_shape(Op::SiluMul, gate, up)
    }

    pub fn add(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, GraphError> {
        self.same_shape(Op::Add, a, b)
    }

    /// Splits `axis` (static) into pieces of `sizes`.
    pub fn split(&mut self, x: ValueId, axis: usize, sizes: &[usize]) -> Result<Vec<ValueId>, GraphError> {
        let xt = self.ty(x).clone();
        if axis >= xt.rank() || xt.shape[axis] != Dim::Fixed(sizes.iter().sum()) {
            return Self::err("split", format!("cannot split axis {axis} of {xt} into {sizes:?}"));
        }
        let tys = sizes
            .iter()
            .map(|&s| {
                let mut shape = xt.shape.clone();
                shape[axis] = Dim::Fixed(s);
                TensorType::new(shape, xt.dtype)
            })
            .collect();
        Ok(self.push(Op::Split { axis, sizes: sizes.to_vec() }, vec![x], tys))
    }

    /// Concatenates along `axis`; other dims must agree.
    pub fn concat(&mut self, xs: &[ValueId], axis: usize) -> Result<ValueId, GraphError> {
        let Some(&first) = xs.first() else { return Self::err("concat", "no operands") };
        let ft = self.ty(first).clone();
        let mut dim = ft
            .shape
            .get(axis)
            .cloned()
            .ok_or_else(|| GraphError { op: "concat".into(), problem: format!("axis {axis} out of range for {ft}") })?;
        for &x in &xs[1..] {
            let t = self.ty(x);
            let fits = t.rank() == ft.rank()
                && t.dtype == ft.dtype
                && t.shape.iter().zip(&ft.shape).enumerate().all(|(i, (a, b))| i == axis || a == b);
            if !fits {
                return Self::err("concat", format!("operands {} differ off axis {axis}", shapes(&[&ft, t])));
            }
            dim = dim.plus(&t.shape[axis]);
        }
        let mut shape = ft.shape.clone();
        shape[axis] = dim;
        Ok(self.push1(Op::Concat { axis }, xs.to_vec(), TensorType::new(shape, ft.dtype)))
    }

    /// Reinterprets x with a new shape; dynamic dims must match position by position, static sizes
    /// must multiply to the same total.
    pub fn reshape(&mut self, x: ValueId, shape: Vec<Dim>) -> Result<ValueId, GraphError> {
        let xt = self.ty(x).clone();
        let dyn_of = |s: &[Dim]| s.iter().filter(|d| matches!(d, Dim::Dyn(_))).cloned().collect::<Vec<_>>();
        let prod = |s: &[Dim]| s.iter().filter_map(|d| d.clone().fixed()).product::<usize>();
        if dyn_of(&xt.shape) != dyn_of(&shape) || prod(&xt.shape) != prod(&shape) {
            let new = TensorType::new(shape, xt.dtype);
            return Self::err("reshape", format!("cannot reshape {xt} to {new}"));
        }
        Ok(self.push1(Op::Reshape, vec![x], TensorType::new(shape, xt.dtype)))
    }

    /// 1 x `group` fp8 quantization of the last axis: (xq f8, scales f32).
    pub fn quantize_fp8(&mut self, x: ValueId, group: usize) -> Result<(ValueId, ValueId), GraphError> {
        self.expect_float("quantize_fp8", x, "input")?;
        let xt = self.ty(x).clone();
        let Some(Dim::Fixed(k)) = xt.shape.last().cloned() else {
            return Self::err("quantize_fp8", format!("input {xt} needs a static last dim"));
        };
        if group == 0 {
            return Self::err("quantize_fp8", "group size must be positive");
        }
        let mut sshape = xt.shape.clone();
        *sshape.last_mut().expect("rank >= 1") = Dim::Fixed(k.div_ceil(group));
        let out = self.push(
            Op::QuantizeFp8 { group },
            vec![x],
            vec![TensorType::new(xt.shape.clone(), DType::F8E4M3), TensorType::new(sshape, DType::F32)],
        );
        Ok((out[0], out[1]))
    }

    /// Output projection to vocabulary logits (f32).
    pub fn lm_head(&mut self, x: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        self.expect_float("lm_head", x, "input")?;
        let (xt, wt) = (self.ty(x), self.ty(w));
        if xt.rank() != 2 || wt.rank() != 2 || xt.shape[1] != wt.shape[1] {
            return Self::err("lm_head", format!("input {xt} does not fit head {wt}"));
        }
        let ty = TensorType::new(vec![xt.shape[0].clone(), wt.shape[0].clone()], DType::F32);
        Ok(self.push1(Op::LmHead, vec![x, w], ty))
    }

    /// The graph built so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// A builder continuing `graph` (training: the backward pass is appended to the forward one).
    pub fn extend(graph: Graph) -> Builder {
        let mut param_index = std::collections::HashMap::new();
        for (name, _, _, v) in graph.params() {
            param_index.insert(name.to_string(), v);
        }
        Builder { graph, param_index }
    }

    /// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (i64): a `[1]` f32 loss.
    pub fn cross_entropy(&mut self, logits: ValueId, targets: ValueId) -> Result<ValueId, GraphError> {
        self.cross_entropy_weighted(logits, targets, 1.0)
    }

    /// `weight` x the mean cross-entropy (a term of a summed loss, e.g. the MTP loss with lambda).
    pub fn cross_entropy_weighted(
        &mut self,
        logits: ValueId,
        targets: ValueId,
        weight: f32,
    ) -> Result<ValueId, GraphError> {
        self.check_logits_targets("cross_entropy", logits, targets)?;
        let ty = TensorType::new(vec![Dim::Fixed(1)], DType::F32);
        Ok(self.push1(Op::CrossEntropy { weight }, vec![logits, targets], ty))
    }

    /// d (weighted mean cross-entropy) / d logits.
    pub fn cross_entropy_grad(
        &mut self,
        logits: ValueId,
        targets: ValueId,
        weight: f32,
    ) -> Result<ValueId, GraphError> {
        self.check_logits_targets("cross_entropy_grad", logits, targets)?;
        let ty = TensorType::new(self.ty(logits).shape.clone(), DType::F32);
        Ok(self.push1(Op::CrossEntropyGrad { weight }, vec![logits, targets], ty))
    }

    fn check_logits_targets(&self, op: &str, logits: ValueId, targets: ValueId) -> Result<(), GraphError> {
        let (lt, tt) = (self.ty(logits), self.ty(targets));
        if lt.rank() != 2 || tt.rank() != 1 || lt.shape[0] != tt.shape[0] || tt.dtype != DType::I64 {
            return Self::err(op, format!("logits {lt} and targets {tt} (expected [N, V] and [N] i64)"));
        }
        Ok(())
    }

    /// `a' @ b'` for 2-D operands, ' the transposes asked for.
    pub fn matmul(
        &mut self,
        a: ValueId,
        b: ValueId,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<ValueId, GraphError> {
        let (at, bt) = (self.ty(a), self.ty(b));
        if at.rank() != 2 || bt.rank() != 2 {
            return Self::err("matmul", format!("operands {} must be matrices", shapes(&[at, bt])));
        }
        let (m, ka) = if transpose_a { (&at.shape[1], &at.shape[0]) } else { (&at.shape[0], &at.shape[1]) };
        let (kb, n) = if transpose_b { (&bt.shape[1], &bt.shape[0]) } else { (&bt.shape[0], &bt.shape[1]) };
        if ka != kb {
            return Self::err("matmul", format!("inner dims differ: {}", shapes(&[at, bt])));
        }
        let ty = TensorType::new(vec![m.clone(), n.clone()], DType::F32);
        Ok(self.push1(Op::MatMul { transpose_a, transpose_b }, vec![a, b], ty))
    }

    /// `(dx, dw)` of `rms_norm(x, w)` for the output gradient `dy`.
    pub fn rms_norm_grad(
        &mut self,
        x: ValueId,
        w: ValueId,
        dy: ValueId,
        eps: f32,
    ) -> Result<(ValueId, ValueId), GraphError> {
        let (xt, wt, dt) = (self.ty(x).clone(), self.ty(w).clone(), self.ty(dy).clone());
        if xt.shape != dt.shape || wt.rank() != 1 || xt.last() != &wt.shape[0] {
            return Self::err("rms_norm_grad", format!("x, w, dy: {}", shapes(&[&xt, &wt, &dt])));
        }
        let out = self.push(
            Op::RmsNormGrad { eps },
            vec![x, w, dy],
            vec![TensorType::new(xt.shape, DType::F32), TensorType::new(wt.shape, DType::F32)],
        );
        Ok((out[0], out[1]))
    }

    /// `(d gate, d up)` of `silu(gate) * up` for the output gradient `dy`.
    pub fn silu_mul_grad(&mut self, gate: ValueId, up: ValueId, dy: ValueId) -> Result<(ValueId, ValueId), GraphError> {
        let (gt, ut, dt) = (self.ty(gate).clone(), self.ty(up).clone(), self.ty(dy).clone());
        if gt.shape != ut.shape || gt.shape != dt.shape {
            return Self::err("silu_mul_grad", format!("gate, up, dy: {}", shapes(&[&gt, &ut, &dt])));
        }
        let ty = TensorType::new(gt.shape, DType::F32);
        let out = self.push(Op::SiluMulGrad, vec![gate, up, dy], vec![ty.clone(), ty]);
        Ok((out[0], out[1]))
    }

    /// dx of `rope(x, positions)` for the output gradient `dy`.
    pub fn rope_grad(&mut self, dy: ValueId, positions: ValueId, attrs: &RopeAttrs) -> Result<ValueId, GraphError> {
        let ty = TensorType::new(self.ty(dy).shape.clone(), DType::F32);
        Ok(self.push1(Op::RopeGrad(attrs.clone()), vec![dy, positions], ty))
    }

    /// Gradients of naive-form `attention(q_nope, q_pe, latent, kv_b)` for `d_out`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_grad(
        &mut self,
        q_nope: ValueId,
        q_pe: ValueId,
        latent: ValueId,
        kv_b: ValueId,
        d_out: ValueId,
        scale: f32,
        kv_lora_rank: usize,
    ) -> Result<[ValueId; 4], GraphError> {
        let tys = [q_nope, q_pe, latent, kv_b].map(|v| TensorType::new(self.ty(v).shape.clone(), DType::F32));
        let out =
            self.push(Op::AttentionGrad { scale, kv_lora_rank }, vec![q_nope, q_pe, latent, kv_b, d_out], tys.to_vec());
        Ok([out[0], out[1], out[2], out[3]])
    }

    /// Gradients of `concat(xs)` along `axis` for `dy`.
    pub fn concat_grad(&mut self, dy: ValueId, xs: &[ValueId], axis: usize) -> Result<Vec<ValueId>, GraphError> {
        let tys = xs.iter().map(|&x| TensorType::new(self.ty(x).shape.clone(), DType::F32)).collect();
        let mut inputs = vec![dy];
        inputs.extend_from_slice(xs);
        Ok(self.push(Op::ConcatGrad { axis }, inputs, tys))
    }

    /// dx of `split(x, axis, sizes)` for the piece gradients `dys` (None: zeros).
    pub fn split_grad(
        &mut self,
        x: ValueId,
        dys: &[Option<ValueId>],
        axis: usize,
        sizes: &[usize],
    ) -> Result<ValueId, GraphError> {
        let ty = TensorType::new(self.ty(x).shape.clone(), DType::F32);
        let present = dys.iter().map(Option::is_some).collect();
        let mut inputs = vec![x];
        inputs.extend(dys.iter().flatten());
        Ok(self.push1(Op::SplitGrad { axis, sizes: sizes.to_vec(), present }, inputs, ty))
    }

    /// `(dx, d gate)` of `moe_route(x, gate, ..)` for the routing-weight gradient `d_weights`.
    pub fn moe_route_grad(
        &mut self,
        [x, gate, indices]: [ValueId; 3],
        d_weights: ValueId,
        routing: &Routing,
    ) -> Result<(ValueId, ValueId), GraphError> {
        let tys = [x, gate].map(|v| TensorType::new(self.ty(v).shape.clone(), DType::F32));
        let out = self.push(Op::MoeRouteGrad(routing.clone()), vec![x, gate, indices, d_weights], tys.to_vec());
        Ok((out[0], out[1]))
    }

    /// `(dx, d weights, [d gate_e, d up_e, d down_e]...)` of `moe_experts` for `dy`.
    pub fn moe_experts_grad(
        &mut self,
        [x, indices, weights]: [ValueId; 3],
        dy: ValueId,
        experts: &[ValueId],
        fp8: bool,
    ) -> Result<Vec<ValueId>, GraphError> {
        let mut inputs = vec![x, indices, weights, dy];
        inputs.extend_from_slice(experts);
        let mut tys = vec![x, weights]
            .into_iter()
            .map(|v| TensorType::new(self.ty(v).shape.clone(), DType::F32))
            .collect::<Vec<_>>();
        tys.extend(experts.iter().map(|&v| TensorType::new(self.ty(v).shape.clone(), DType::F32)));
        Ok(self.push(Op::MoeExpertsGrad { num_experts: experts.len() / 3, fp8 }, inputs, tys))
    }

    /// The sequence-wise balance loss (`Op::BalanceLoss`) of the MoE layer whose `moe_route` takes
    /// `x` and `gate` and selects `indices`; the tokens of `x` are one sequence.
    pub fn balance_loss(
        &mut self,
        x: ValueId,
        gate: ValueId,
        indices: ValueId,
        alpha: f32,
        scoring: crate::config::Scoring,
    ) -> Result<ValueId, GraphError> {
        let (xt, gt, it) = (self.ty(x), self.ty(gate), self.ty(indices));
        if xt.rank() != 2
            || gt.rank() != 2
            || it.rank() != 2
            || xt.shape[1] != gt.shape[1]
            || it.shape[0] != xt.shape[0]
        {
            return Self::err("balance_loss", format!("x, gate, indices: {}", shapes(&[xt, gt, it])));
        }
        Ok(self.push1(
            Op::BalanceLoss { alpha, scoring },
            vec![x, gate, indices],
            TensorType::new(vec![Dim::Fixed(1)], DType::F32),
        ))
    }

    /// `(dx, d gate)` of `balance_loss`.
    pub fn balance_loss_grad(
        &mut self,
        x: ValueId,
        gate: ValueId,
        indices: ValueId,
        alpha: f32,
        scoring: crate::config::Scoring,
    ) -> Result<(ValueId, ValueId), GraphError> {
        let tys = [x, gate].map(|v| TensorType::new(self.ty(v).shape.clone(), DType::F32));
        let out = self.push(Op::BalanceLossGrad { alpha, scoring }, vec![x, gate, indices], tys.to_vec());
        Ok((out[0], out[1]))
    }

    /// d table [vocab, D] of `embed(table, ids)` for the output gradient `dy` [N, D].
    pub fn embed_grad(&mut self, ids: ValueId, dy: ValueId, vocab: usize) -> Result<ValueId, GraphError> {
        let dt = self.ty(dy).clone();
        if dt.rank() != 2 || self.ty(ids).rank() != 1 {
            return Self::err("embed_grad", format!("ids {} and dy {dt}", self.ty(ids)));
        }
        let ty = TensorType::new(vec![Dim::Fixed(vocab), dt.shape[1].clone()], DType::F32);
        Ok(self.push1(Op::EmbedGrad { vocab }, vec![ids, dy], ty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Dim {
        Dim::dynamic("T")
    }

    #[test]
    fn linear_checks_shapes_and_names_them() {
        let mut b = Builder::new("g");
        let x = b.input("x", vec![t(), 64.into()], DType::F32).unwrap();
        let w = b.param("w", &[32, 48], WeightFormat::Dense(DType::BF16)).unwrap();
        let e = b.linear(x, w).unwrap_err();
        assert_eq!(e.to_string(), "linear: input [T, 64] f32 does not fit weight [32, 48] bf16 ([out, in])");
        let w = b.param("w2", &[32, 64], WeightFormat::Dense(DType::BF16)).unwrap();
        let y = b.linear(x, w).unwrap();
        assert_eq!(b.ty(y).to_string(), "[T, 32] f32");
        let nodes = b.finish().nodes.len();
        assert_eq!(nodes, 4, "a failed op adds no node");
    }

    #[test]
    fn concat_of_dynamic_dims_makes_a_sum_symbol() {
        let mut b = Builder::new("g");
        let p = b.input("p", vec![Dim::dynamic("P"), 8.into()], DType::F32).unwrap();
        let q = b.input("q", vec![t(), 8.into()], DType::F32).unwrap();
        let c = b.concat(&[p, q], 0).unwrap();
        assert_eq!(b.ty(c).to_string(), "[P+T, 8] f32");
        let e = b.concat(&[p, c], 1).unwrap_err();
        assert!(e.to_string().starts_with("concat: operands [P, 8] f32 and [P+T, 8] f32 differ off axis 1"), "{e}");
    }

    #[test]
    fn params_are_shared_by_name_and_checked() {
        let mut b = Builder::new("g");
        let a = b.param("w", &[4, 4], WeightFormat::Dense(DType::F32)).unwrap();
        assert_eq!(b.param("w", &[4, 4], WeightFormat::Dense(DType::F32)).unwrap(), a);
        let e = b.param("w", &[4, 5], WeightFormat::Dense(DType::F32)).unwrap_err();
        assert_eq!(e.to_string(), "param: 'w' used as [4, 4] f32 and as [4, 5] f32");
    }

    #[test]
    fn reshape_and_split_check_sizes() {
        let mut b = Builder::new("g");
        let x = b.input("x", vec![t(), 12.into()], DType::F32).unwrap();
        let r = b.reshape(x, vec![t(), 3.into(), 4.into()]).unwrap();
        assert!(b.reshape(x, vec![t(), 5.into()]).is_err());
        let parts = b.split(r, 2, &[1, 3]).unwrap();
        assert_eq!(b.ty(parts[1]).to_string(), "[T, 3, 3] f32");
        assert!(b.split(r, 2, &[2, 3]).unwrap_err().to_string().contains("cannot split axis 2"));
    }
}
