//! DeepSeek-V3 in the DSL: MLA, dense MLP, MoE, decoder layer, the full model and the MTP module,
//! for two entry points (see `shared/reference/deepseek-v3.md`).
//!
//! `prefill` — T tokens of one sequence at absolute `positions` `[T]`, continuing a latent cache of P
//! earlier tokens per layer:
//!   inputs  `tokens` `[T]` i64, `positions` `[T]` i64, `kv_cache.{l}` `[P, 576]` for every layer l,
//!           and with MTP `mtp_tokens` `[T]` i64 (the token FOLLOWING each position) and `kv_cache.mtp`;
//!   outputs `logits` [T, vocab], `kv_cache.{l}` [P+T, 576], and with MTP `mtp_logits` [T, vocab]
//!           (row i predicts token i+2) and `kv_cache.mtp` [P+T, 576].
//!   Attention is the naive form (latent expanded through kv_b_proj).
//! `decode` — one new token for each of B sequences, each with its own cache of S rows:
//!   inputs  `tokens` `[B]`, `positions` `[B]` (= tokens already cached), `kv_cache.{l}` `[B, S, 576]`,
//!           with MTP `mtp_tokens` `[B]` and `kv_cache.mtp` `[B, S, 576]`;
//!   outputs `logits` `[B, vocab]`, the caches with row `positions[b]` written, with MTP `mtp_logits`.
//!   Attention is the absorbed form over the latent cache.
//! The cache row of a token is (RMSNorm_kv(ckv) `[512]`, rope(k_pe) `[64]`); both forms read the same cache.
//! MTP outputs depend on `mtp_tokens`, main outputs do not: a caller computes `logits`, picks the next
//! token, then asks for `mtp_logits` (the interpreter evaluates only what an output needs).
//!
//! Building never touches weight data: the full 671B definition is a few hundred thousand nodes.

use std::ops::Range;

use crate::config::{ModelConfig, RopeConfig, Scoring, SparseIndexer};
use crate::dtype::DType;
use crate::graph::{AttentionForm, Builder, Dim, Graph, GraphError, Routing, ValueId, WeightFormat};
use crate::rope;

/// The inference entry points: the two of every model, and the MTP module on its own for
/// speculative decoding ([`BuildOptions::mtp_draft`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    Prefill,
    Decode,
    /// The MTP module alone, prefill-shaped: `hidden` [T, hidden] (the main model's final-normed
    /// hidden state at `positions` `[T]`), `mtp_tokens` `[T]` (the token following each position) and
    /// `kv_cache.mtp` [P, 576] in; `mtp_logits` [T, vocab] (row i drafts the token after
    /// `mtp_tokens[i]`), `kv_cache.mtp` [P+T, 576] and `mtp_hidden` [T, hidden] (its own
    /// final-normed hidden state, which chained drafts feed back as the next position's `hidden`)
    /// out.
    Draft,
}

impl Entry {
    pub const ALL: [Entry; 2] = [Entry::Prefill, Entry::Decode];
    /// The entries of a model compiled for speculative decoding with its MTP module.
    pub const SPECULATIVE: [Entry; 3] = [Entry::Prefill, Entry::Decode, Entry::Draft];

    pub fn name(self) -> &'static str {
        match self {
            Entry::Prefill => "prefill",
            Entry::Decode => "decode",
            Entry::Draft => "draft",
        }
    }
}

/// Arithmetic of the linear layers whose weights are fp8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Weights dequantized, activations in f32 (the oracle).
    #[default]
    F32,
    /// Activations quantized 1x128 to e4m3 before every fp8-weight linear; block-scaled GEMM.
    Fp8,
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub precision: Precision,
    /// Only these decoder layers (default: all). Embedding, final norm and head are always built.
    pub layers: Option<Range<usize>>,
    /// Override the MLA form of the entry (default: naive for prefill, absorbed for decode).
    pub attention_form: Option<AttentionForm>,
    /// Leave out the MTP module even when the config has one.
    pub skip_mtp: bool,
    /// The MTP module as its own entry ([`Entry::Draft`]) for speculative decoding: the main entries
    /// leave it out and output `hidden` (the final-normed hidden state it reads) instead.
    pub mtp_draft: bool,
    /// Declare every weight as dense f32 (bf16 widened, fp8 dequantized at load, except that fp8
    /// precision keeps fp8 projections fp8): for backends that run on the loaded values, as the
    /// reference interpreter does.
    pub dense_f32_weights: bool,
    /// FP8 training (with `dense_f32_weights`: f32 master weights): every projection GEMM is an
    /// `fp8_linear` (activations 1x128, weights 128x128 in e4m3, quantized each step), so its
    /// backward runs the recipe's FP8 Dgrad and Wgrad. Embedding, norms, router, attention core, head
    /// and the routed experts stay f32.
    pub fp8_training: bool,
}

/// The indexer's `k_norm` epsilon (transformers' `DeepseekV32Indexer`: `nn.LayerNorm(head_dim, eps=1e-6)`).
pub const INDEXER_NORM_EPS: f32 = 1e-6;

/// Activation group of fp8 activation quantization (per token per 128 channels).
pub const FP8_ACTIVATION_GROUP: usize = 128;

/// Builds one entry point of `config`.
pub fn build(config: &ModelConfig, entry: Entry, options: &BuildOptions) -> Result<Graph, GraphError> {
    let layers = options.layers.clone().unwrap_or(0..config.num_hidden_layers);
    if layers.end > config.num_hidden_layers || layers.start > layers.end {
        return Err(GraphError {
            op: "build".into(),
            problem: format!("layers {}..{} outside 0..{}", layers.start, layers.end, config.num_hidden_layers),
        });
    }
    let has_mtp = config.num_nextn_predict_layers > 0 && !options.skip_mtp;
    let mut m = ModelBuilder::new(config, entry, options, &format!("{}.{}", config.name, entry.name()));
    if entry == Entry::Draft {
        if !has_mtp {
            return Err(GraphError {
                op: "build".into(),
                problem: "a draft entry needs the model's MTP module".into(),
            });
        }
        let rows = m.rows();
        let hidden = m.b.input("hidden", vec![rows.clone(), config.hidden_size.into()], DType::F32)?;
        let positions = m.b.input("positions", vec![rows], DType::I64)?;
        m.mtp(hidden, &Tokens { positions })?;
        return Ok(m.b.finish());
    }
    m.model(layers, has_mtp, options.mtp_draft)?;
    Ok(m.b.finish())
}

/// One block of the model on its own, for IR snapshots and kernel tests: its inputs are the
/// block's activations (`x` [T|B, hidden]) plus whatever it reads (`positions`, `kv_cache`), its
/// outputs what it produces. Weights keep their checkpoint names (layer `layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Multi-head latent attention (naive form in prefill, absorbed in decode) with its cache.
    Mla,
    /// The dense SwiGLU MLP (layers below `first_k_dense_replace`).
    DenseMlp,
    /// Routing + routed experts + shared expert.
    Moe,
    /// The MTP module: `hidden` (final-normed) and `mtp_tokens` in, `mtp_logits` out.
    Mtp,
}

/// Builds one [`Block`] of `config` for `entry`, with the weights of decoder layer `layer`.
pub fn build_block(
    config: &ModelConfig,
    block: Block,
    entry: Entry,
    layer: usize,
    options: &BuildOptions,
) -> Result<Graph, GraphError> {
    let name = format!("{}.{:?}.{}", config.name, block, entry.name()).to_lowercase();
    let mut m = ModelBuilder::new(config, entry, options, &name);
    let rows = m.rows();
    let d = config.hidden_size;
    let x = m.b.input(if block == Block::Mtp { "hidden" } else { "x" }, vec![rows.clone(), d.into()], DType::F32)?;
    let p = format!("model.layers.{layer}");
    match block {
        Block::Mla => {
            let positions = m.b.input("positions", vec![rows], DType::I64)?;
            let cache = m.cache_input("kv_cache")?;
            let (y, cache) = m.mla(x, &Tokens { positions }, cache, &format!("{p}.self_attn"))?;
            m.b.output("y", y)?;
            m.b.output("kv_cache", cache)?;
        }
        Block::DenseMlp => {
            let y = m.mlp(x, &format!("{p}.mlp"), config.intermediate_size)?;
            m.b.output("y", y)?;
        }
        Block::Moe => {
            let y = m.moe(x, &format!("{p}.mlp"))?;
            m.b.output("y", y)?;
        }
        Block::Mtp => {
            let positions = m.b.input("positions", vec![rows], DType::I64)?;
            m.mtp(x, &Tokens { positions })?;
        }
    }
    Ok(m.b.finish())
}

struct ModelBuilder<'a> {
    b: Builder,
    c: &'a ModelConfig,
    entry: Entry,
    precision: Precision,
    form: AttentionForm,
    /// fp8 quantizations already built, by activation: one quantization serves every GEMM reading it.
    quantized: std::collections::HashMap<ValueId, (ValueId, ValueId)>,
    dense_f32_weights: bool,
    fp8_training: bool,
}

/// Per-call inputs shared by all layers.
struct Tokens {
    positions: ValueId,
}

impl<'a> ModelBuilder<'a> {
    fn new(config: &'a ModelConfig, entry: Entry, options: &BuildOptions, name: &str) -> ModelBuilder<'a> {
        ModelBuilder {
            b: Builder::new(name),
            c: config,
            entry,
            precision: options.precision,
            form: options.attention_form.unwrap_or(match entry {
                Entry::Prefill | Entry::Draft => AttentionForm::Naive,
                Entry::Decode => AttentionForm::Absorbed,
            }),
            quantized: std::collections::HashMap::new(),
            dense_f32_weights: options.dense_f32_weights,
            fp8_training: options.fp8_training,
        }
    }

    fn dense_dtype(&self) -> DType {
        if self.dense_f32_weights {
            DType::F32
        } else {
            self.c.weight_dtype
        }
    }

    /// A projection weight: fp8 block-scaled when the checkpoint is quantized.
    fn proj(&mut self, name: &str, out: usize, inp: usize) -> Result<ValueId, GraphError> {
        let format = match &self.c.quantization {
            // fp8 weights stay fp8 where fp8 GEMMs run; dense f32 values are asked for otherwise.
            Some(q) if !self.dense_f32_weights || self.precision == Precision::Fp8 => {
                WeightFormat::Fp8Block { block: q.weight_block }
            }
            _ => WeightFormat::Dense(self.dense_dtype()),
        };
        self.b.param(&format!("{name}.weight"), &[out, inp], format)
    }

    /// A weight that is never quantized (embeddings, norms, router, eh_proj, head).
    fn plain(&mut self, name: &str, shape: &[usize]) -> Result<ValueId, GraphError> {
        let format = WeightFormat::Dense(self.dense_dtype());
        self.b.param(name, shape, format)
    }

    fn norm(&mut self, x: ValueId, name: &str, dim: usize) -> Result<ValueId, GraphError> {
        let w = self.plain(&format!("{name}.weight"), &[dim])?;
        self.b.rms_norm(x, w, self.c.rms_norm_eps)
    }

    /// `x @ W^T` for projection `name`, with fp8 activations when asked and the weight is fp8.
    fn linear(&mut self, x: ValueId, name: &str, out: usize, inp: usize) -> Result<ValueId, GraphError> {
        let w = self.proj(name, out, inp)?;
        self.linear_of(x, w)
    }

    /// `x @ W^T` for a declared projection weight `w` (see [`Self::linear`]).
    fn linear_of(&mut self, x: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        if self.fp8_training {
            return self.b.fp8_linear(x, w);
        }
        self.apply_linear(x, w)
    }

    fn apply_linear(&mut self, x: ValueId, w: ValueId) -> Result<ValueId, GraphError> {
        if self.precision == Precision::Fp8 && self.b.ty(w).dtype == DType::F8E4M3 {
            let (xq, xs) = match self.quantized.get(&x) {
                Some(&q) => q,
                None => {
                    let q = self.b.quantize_fp8(x, FP8_ACTIVATION_GROUP)?;
                    self.quantized.insert(x, q);
                    q
                }
            };
            self.b.linear_fp8(xq, xs, w)
        } else {
            self.b.linear(x, w)
        }
    }

    fn rows(&self) -> Dim {
        match self.entry {
            Entry::Prefill | Entry::Draft => Dim::dynamic("T"),
            Entry::Decode => Dim::dynamic("B"),
        }
    }

    fn model(&mut self, layers: Range<usize>, mtp: bool, draft_apart: bool) -> Result<(), GraphError> {
        let c = self.c;
        let rows = self.rows();
        let tokens = self.b.input("tokens", vec![rows.clone()], DType::I64)?;
        let positions = self.b.input("positions", vec![rows.clone()], DType::I64)?;
        let t = Tokens { positions };
        let embed = self.plain("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let mut h = self.b.embed(embed, tokens)?;
        let mut caches = Vec::new();
        for l in layers {
            let cache = self.cache_input(&format!("kv_cache.{l}"))?;
            let (out, new_cache) = self.decoder_layer(h, &t, cache, &format!("model.layers.{l}"), c.is_moe_layer(l))?;
            h = out;
            caches.push((format!("kv_cache.{l}"), new_cache));
        }
        let h = self.norm(h, "model.norm", c.hidden_size)?;
        let head = self.head_weight()?;
        let logits = self.b.lm_head(h, head)?;
        self.b.output("logits", logits)?;
        for (name, v) in caches {
            self.b.output(&name, v)?;
        }
        if mtp && draft_apart {
            self.b.output("hidden", h)?;
        } else if mtp {
            self.mtp(h, &t)?;
        }
        Ok(())
    }

    fn head_weight(&mut self) -> Result<ValueId, GraphError> {
        let c = self.c;
        if c.tie_word_embeddings {
            self.plain("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])
        } else {
            self.plain("lm_head.weight", &[c.vocab_size, c.hidden_size])
        }
    }

    fn cache_input(&mut self, name: &str) -> Result<ValueId, GraphError> {
        let width = Dim::Fixed(self.c.cache_dim());
        let shape = match self.entry {
            Entry::Prefill | Entry::Draft => vec![Dim::dynamic("P"), width],
            Entry::Decode => vec![Dim::dynamic("B"), Dim::dynamic("S"), width],
        };
        self.b.input(name, shape, DType::F32)
    }

    /// Multi-token prediction (spec section 6): position i combines the final hidden state h_i with
    /// the embedding of the token that follows it, runs one MoE decoder layer, and predicts i+2.
    /// The module's own `embed_tokens` / `shared_head.head` are declared; checkpoints without them
    /// fall back to the main embedding and head when loaded (`checkpoint::fallback_name`).
    fn mtp(&mut self, h: ValueId, t: &Tokens) -> Result<(), GraphError> {
        let c = self.c;
        let p = format!("model.layers.{}", c.num_hidden_layers);
        let rows = self.rows();
        let next = self.b.input("mtp_tokens", vec![rows], DType::I64)?;
        let embed = self.plain(&format!("{p}.embed_tokens.weight"), &[c.vocab_size, c.hidden_size])?;
        let e = self.b.embed(embed, next)?;
        let e = self.norm(e, &format!("{p}.enorm"), c.hidden_size)?;
        let hn = self.norm(h, &format!("{p}.hnorm"), c.hidden_size)?;
        let x = self.b.concat(&[e, hn], 1)?;
        let eh = self.plain(&format!("{p}.eh_proj.weight"), &[c.hidden_size, 2 * c.hidden_size])?;
        let x = self.b.linear(x, eh)?;
        let cache = self.cache_input("kv_cache.mtp")?;
        let (y, new_cache) = self.decoder_layer(x, t, cache, &p, true)?;
        let y = self.norm(y, &format!("{p}.shared_head.norm"), c.hidden_size)?;
        let head = self.plain(&format!("{p}.shared_head.head.weight"), &[c.vocab_size, c.hidden_size])?;
        let logits = self.b.lm_head(y, head)?;
        self.b.output("mtp_logits", logits)?;
        self.b.output("kv_cache.mtp", new_cache)?;
        if self.entry == Entry::Draft {
            self.b.output("mtp_hidden", y)?;
        }
        Ok(())
    }

    fn decoder_layer(
        &mut self,
        h: ValueId,
        t: &Tokens,
        cache: ValueId,
        p: &str,
        moe: bool,
    ) -> Result<(ValueId, ValueId), GraphError> {
        let d = self.c.hidden_size;
        let x = self.norm(h, &format!("{p}.input_layernorm"), d)?;
        let (a, new_cache) = self.mla(x, t, cache, &format!("{p}.self_attn"))?;
        let h = self.b.add(h, a)?;
        let x = self.norm(h, &format!("{p}.post_attention_layernorm"), d)?;
        let f = if moe {
            self.moe(x, &format!("{p}.mlp"))?
        } else {
            self.mlp(x, &format!("{p}.mlp"), self.c.intermediate_size)?
        };
        Ok((self.b.add(h, f)?, new_cache))
    }

    /// Multi-head latent attention (spec section 3). Returns (output, updated cache).
    fn mla(&mut self, x: ValueId, t: &Tokens, cache: ValueId, p: &str) -> Result<(ValueId, ValueId), GraphError> {
        let c = self.c;
        let (h, dn, dr, dv, kv) =
            (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let rows = self.rows();
        let (q, q_latent) = match c.q_lora_rank {
            Some(r) => {
                let qa = self.linear(x, &format!("{p}.q_a_proj"), r, c.hidden_size)?;
                let cq = self.norm(qa, &format!("{p}.q_a_layernorm"), r)?;
                (self.linear(cq, &format!("{p}.q_b_proj"), h * (dn + dr), r)?, Some(cq))
            }
            None => (self.linear(x, &format!("{p}.q_proj"), h * (dn + dr), c.hidden_size)?, None),
        };
        let q = self.b.reshape(q, vec![rows.clone(), h.into(), (dn + dr).into()])?;
        let qs = self.b.split(q, 2, &[dn, dr])?;
        let q_pe = self.b.rope(qs[1], t.positions, &c.rope)?;
        // The indexer's key projected before kv_a: the projections of `x` in this order are q_a,
        // wk, kv_a, the order the fused GEMM concatenates them in (kv_a's 576 columns, not a whole
        // number of fp8 weights' 128-row scale blocks, last). kv_a's weights are declared first
        // all the same: the parameters keep their order (a seeded random checkpoint its values).
        let kva_w = self.proj(&format!("{p}.kv_a_proj_with_mqa"), kv + dr, c.hidden_size)?;
        let kv_norm_w = self.plain(&format!("{p}.kv_a_layernorm.weight"), &[kv])?;
        let index_key = match c.indexer {
            Some(i) => Some(self.index_key(x, t, i, &format!("{p}.indexer"))?),
            None => None,
        };
        let kva = self.linear_of(x, kva_w)?;
        let kvs = self.b.split(kva, 1, &[kv, dr])?;
        let ckv = self.b.rms_norm(kvs[0], kv_norm_w, c.rms_norm_eps)?;
        let k_pe = self.b.rope(kvs[1], t.positions, &c.rope)?;
        let row: Vec<ValueId> = [ckv, k_pe].into_iter().chain(index_key).collect();
        let entry = self.b.concat(&row, 1)?;
        // kv_b_proj feeds the attention core, which runs in f32 (an fp8 weight is dequantized there).
        let kv_b = self.proj(&format!("{p}.kv_b_proj"), h * (dn + dv), kv)?;
        let scale = rope::softmax_scale(c);
        let decode = self.entry == Entry::Decode;
        let all = match decode {
            false => self.b.concat(&[cache, entry], 0)?,
            true => self.b.cache_write(cache, entry, t.positions)?,
        };
        let o = match (c.indexer, decode) {
            (None, false) => self.b.attention(qs[0], q_pe, all, kv_b, self.form, scale, kv)?,
            (None, true) => self.b.attention_decode(qs[0], q_pe, all, t.positions, kv_b, self.form, scale, kv)?,
            // DeepSeek Sparse Attention: a cache row's last `head_dim` columns are the indexer's key,
            // read in place. Each query attends to the latents of the rows it selected, gathered: MLA
            // decode over them (one "sequence" of rows a query, its last gathered row its position).
            (Some(indexer), _) => {
                let cq = q_latent.expect("configs with an indexer have a query latent (checked)");
                let selected = self.select_keys(x, cq, t, all, indexer, &format!("{p}.indexer"))?;
                let (rows, last) = self.b.gather_rows(all, selected, kv + dr)?;
                self.b.attention_decode(qs[0], q_pe, rows, last, kv_b, self.form, scale, kv)?
            }
        };
        let o = self.b.reshape(o, vec![rows, (h * dv).into()])?;
        let out = self.linear(o, &format!("{p}.o_proj"), c.hidden_size, h * dv)?;
        Ok((out, all))
    }

    /// The indexer's key of each token: `k_norm(wk(x))` (a LayerNorm with bias), its first
    /// `qk_rope_head_dim` dims rotated in halves.
    fn index_key(&mut self, x: ValueId, t: &Tokens, i: SparseIndexer, p: &str) -> Result<ValueId, GraphError> {
        let k = self.linear(x, &format!("{p}.wk"), i.head_dim, self.c.hidden_size)?;
        let w = self.plain(&format!("{p}.k_norm.weight"), &[i.head_dim])?;
        let b = self.plain(&format!("{p}.k_norm.bias"), &[i.head_dim])?;
        let k = self.b.layer_norm(k, w, b, INDEXER_NORM_EPS)?;
        self.rotate_halves(k, t, 1, i.head_dim)
    }

    /// `x`'s first `qk_rope_head_dim` dims along `axis` (the last) rotated by the model's RoPE with
    /// halves paired (`rotate_half`), as the indexer rotates its queries and keys.
    fn rotate_halves(&mut self, x: ValueId, t: &Tokens, axis: usize, width: usize) -> Result<ValueId, GraphError> {
        let dr = self.c.qk_rope_head_dim;
        let parts = self.b.split(x, axis, &[dr, width - dr])?;
        let rope = RopeConfig { interleave: false, ..self.c.rope.clone() };
        let rotated = self.b.rope(parts[0], t.positions, &rope)?;
        self.b.concat(&[rotated, parts[1]], axis)
    }

    /// The keys each query attends to (see [`crate::graph::Op::SparseIndex`]) among the cache's
    /// `rows`: queries from the query latent `cq`, head weights from `x`.
    fn select_keys(
        &mut self,
        x: ValueId,
        cq: ValueId,
        t: &Tokens,
        rows: ValueId,
        i: SparseIndexer,
        p: &str,
    ) -> Result<ValueId, GraphError> {
        let c = self.c;
        let r = c.q_lora_rank.unwrap_or(0);
        let q = self.linear(cq, &format!("{p}.wq_b"), i.n_heads * i.head_dim, r)?;
        let q = self.b.reshape(q, vec![self.rows(), i.n_heads.into(), i.head_dim.into()])?;
        let q = self.rotate_halves(q, t, 2, i.head_dim)?;
        let w = self.plain(&format!("{p}.weights_proj.weight"), &[i.n_heads, c.hidden_size])?;
        let w = self.b.linear(x, w)?;
        let positions = (self.entry == Entry::Decode).then_some(t.positions);
        self.b.sparse_index(q, w, rows, positions, i.topk)
    }

    /// Dense SwiGLU MLP.
    fn mlp(&mut self, x: ValueId, p: &str, inter: usize) -> Result<ValueId, GraphError> {
        let d = self.c.hidden_size;
        let g = self.linear(x, &format!("{p}.gate_proj"), inter, d)?;
        let u = self.linear(x, &format!("{p}.up_proj"), inter, d)?;
        let a = self.b.silu_mul(g, u)?;
        self.linear(a, &format!("{p}.down_proj"), d, inter)
    }

    /// Routed experts + shared expert (spec section 4).
    fn moe(&mut self, x: ValueId, p: &str) -> Result<ValueId, GraphError> {
        let c = self.c;
        let (d, e, inter) = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size);
        let gate = self.b.param(&format!("{p}.gate.weight"), &[e, d], WeightFormat::Dense(self.dense_dtype()))?;
        let bias = match c.scoring {
            Scoring::Sigmoid => Some(self.b.param(
                &format!("{p}.gate.e_score_correction_bias"),
                &[e],
                WeightFormat::Dense(DType::F32),
            )?),
            Scoring::Softmax => None,
        };
        let routing = Routing {
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            norm_topk_prob: c.norm_topk_prob,
            routed_scaling_factor: c.routed_scaling_factor,
            scoring: c.scoring,
        };
        let (idx, w) = self.b.moe_route(x, gate, bias, routing)?;
        let mut experts = Vec::with_capacity(e);
        for i in 0..e {
            let q = format!("{p}.experts.{i}");
            experts.push((
                self.proj(&format!("{q}.gate_proj"), inter, d)?,
                self.proj(&format!("{q}.up_proj"), inter, d)?,
                self.proj(&format!("{q}.down_proj"), d, inter)?,
            ));
        }
        // fp8 training: the routed experts' GEMMs in e4m3 as the dense projections' (the shared
        // expert is an `mlp` of `fp8_linear`s).
        let fp8 = (self.precision == Precision::Fp8 && self.c.quantization.is_some()) || self.fp8_training;
        let routed = self.b.moe_experts(x, idx, w, &experts, fp8)?;
        if c.n_shared_experts == 0 {
            return Ok(routed);
        }
        let shared = self.mlp(x, &format!("{p}.shared_experts"), inter * c.n_shared_experts)?;
        self.b.add(routed, shared)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::graph::Op;

    #[test]
    fn tiny_prefill_has_every_block() {
        let c = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        let g = build(&c, Entry::Prefill, &BuildOptions::default()).unwrap();
        let count = |name: &str| g.nodes.iter().filter(|n| n.op.name() == name).count();
        // 3 layers + MTP layer.
        assert_eq!(count("attention"), 4);
        assert_eq!(count("moe_route"), 3);
        assert_eq!(count("moe_experts"), 3);
        assert_eq!(count("lm_head"), 2);
        let names: Vec<_> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["logits", "kv_cache.0", "kv_cache.1", "kv_cache.2", "mtp_logits", "kv_cache.mtp"]);
        assert_eq!(g.ty(g.output("kv_cache.0").unwrap()).to_string(), "[P+T, 48] f32");
        assert_eq!(g.ty(g.output("logits").unwrap()).to_string(), "[T, 320] f32");
    }

    /// The tiny preset with DeepSeek-V3.2's sparse attention (4 indexer heads of 24, 3 keys a query).
    pub(crate) fn v32_tiny() -> ModelConfig {
        let mut c = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        c.indexer = Some(SparseIndexer { n_heads: 4, head_dim: 24, topk: 3 });
        c
    }

    #[test]
    fn v32_layers_select_their_keys() {
        let c = v32_tiny();
        for entry in Entry::ALL {
            let g = build(&c, entry, &BuildOptions::default()).unwrap();
            let count = |name: &str| g.nodes.iter().filter(|n| n.op.name() == name).count();
            let index = if entry == Entry::Decode { "sparse_index_decode" } else { "sparse_index" };
            // 3 layers + the MTP layer, each with its indexer; attention over the gathered rows.
            assert_eq!((count(index), count("gather_rows"), count("layer_norm")), (4, 4, 4), "{entry:?}");
            assert_eq!((count("attention_decode"), count("attention")), (4, 0));
            let width = g.ty(g.output("kv_cache.0").unwrap()).shape.last().cloned();
            assert_eq!(width, Some(Dim::Fixed(c.latent_dim() + 24)));
        }
        let names: Vec<String> = build(&c, Entry::Prefill, &BuildOptions::default())
            .unwrap()
            .params()
            .map(|(n, ..)| n.to_string())
            .filter(|n| n.starts_with("model.layers.0.self_attn.indexer."))
            .collect();
        let p = "model.layers.0.self_attn.indexer";
        assert_eq!(
            names,
            [
                format!("{p}.wk.weight"),
                format!("{p}.k_norm.weight"),
                format!("{p}.k_norm.bias"),
                format!("{p}.wq_b.weight"),
                format!("{p}.weights_proj.weight")
            ]
        );
    }

    #[test]
    fn decode_uses_the_absorbed_form_and_cache_writes() {
        let c = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        let g = build(&c, Entry::Decode, &BuildOptions::default()).unwrap();
        assert!(g.nodes.iter().any(|n| matches!(n.op, Op::AttentionDecode { form: AttentionForm::Absorbed, .. })));
        assert_eq!(g.nodes.iter().filter(|n| matches!(n.op, Op::CacheWrite)).count(), 4);
        assert_eq!(g.ty(g.output("kv_cache.mtp").unwrap()).to_string(), "[B, S, 48] f32");
    }

    #[test]
    fn fp8_precision_quantizes_activations_of_fp8_linears_only() {
        let mut c = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        c.quantization = Some(crate::config::Fp8Quantization { weight_block: [128, 128] });
        let g = build(&c, Entry::Prefill, &BuildOptions { precision: Precision::Fp8, ..Default::default() }).unwrap();
        let quantized = g.nodes.iter().filter(|n| matches!(n.op, Op::QuantizeFp8 { .. })).count();
        // Per layer (4 with MTP): one for q_a + kv_a (same input), q_b, o_proj, one for the MLP's (or
        // shared expert's) gate + up, and down.
        assert_eq!(quantized, 4 * 5);
        // eh_proj and the heads stay bf16.
        let eh = g.params().find(|(n, ..)| n.ends_with("eh_proj.weight")).unwrap();
        assert_eq!(eh.2, WeightFormat::Dense(DType::BF16));
    }

    #[test]
    fn the_mtp_module_can_be_an_entry_of_its_own() {
        let c = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        let options = BuildOptions { mtp_draft: true, ..Default::default() };
        for entry in [Entry::Prefill, Entry::Decode] {
            let g = build(&c, entry, &options).unwrap();
            let names: Vec<_> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["logits", "kv_cache.0", "kv_cache.1", "kv_cache.2", "hidden"], "{entry:?}");
            assert_eq!(g.nodes.iter().filter(|n| n.op.name() == "lm_head").count(), 1);
        }
        let g = build(&c, Entry::Draft, &options).unwrap();
        let inputs: Vec<String> = g.inputs.iter().map(|(n, v)| format!("{n} {}", g.ty(*v))).collect();
        assert_eq!(
            inputs,
            ["hidden [T, 96] f32", "positions [T] i64", "mtp_tokens [T] i64", "kv_cache.mtp [P, 48] f32"]
        );
        let names: Vec<_> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["mtp_logits", "kv_cache.mtp", "mtp_hidden"]);
        assert_eq!(g.ty(g.output("kv_cache.mtp").unwrap()).to_string(), "[P+T, 48] f32");
        let no_mtp = BuildOptions { skip_mtp: true, ..options };
        assert!(build(&c, Entry::Draft, &no_mtp).unwrap_err().to_string().contains("needs the model's MTP module"));
    }

    #[test]
    fn full_model_has_all_layers_and_mtp() {
        let c = ModelConfig::preset("deepseek-v3").unwrap();
        let g = build(&c, Entry::Prefill, &BuildOptions::default()).unwrap();
        assert_eq!(g.nodes.iter().filter(|n| matches!(n.op, Op::Attention { .. })).count(), 62);
        // 58 MoE layers + MTP, 256 experts x 3 projections each.
        let experts = g.params().filter(|(n, ..)| n.contains(".experts.")).count();
        assert_eq!(experts, 59 * 256 * 3);
    }
}
