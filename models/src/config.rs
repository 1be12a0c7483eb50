//! DeepSeek-V3 configurations: Hugging Face `config.json` (both spellings) and built-in presets.
//!
//! Accepted spellings of RoPE: the hub's `rope_theta` + `rope_scaling {type|rope_type: yarn, ...}`
//! (or `rope_scaling: null` for plain RoPE), and transformers 5's `rope_parameters {rope_type,
//! rope_theta, ...}`. `quantization_config` (fp8, e4m3, block-scaled weights) is read when present.
//!
//! Every rejected config names the offending key: unknown model types, missing keys, wrong JSON
//! types and impossible values (odd rope dim, experts not divisible into groups, top-k larger than
//! the experts the group limit allows, sizes whose tensors the kernels' 32-bit coordinates cannot
//! address, ...).
//!
//! DeepSeek-V2's configs (`model_type: deepseek_v2`: the same MLA and MoE, routed by a softmax
//! over the experts, `topk_method` `greedy` or `group_limited_greedy`, no MTP) are read too; their
//! routing is [`Scoring::Softmax`].
//!
//! DeepSeek-V3.2's configs (`model_type: deepseek_v32`: V3 with DeepSeek Sparse Attention, a
//! lightning indexer per MLA layer picking the `index_topk` keys each query attends to) are read
//! too; see [`SparseIndexer`].
//!
//! Not handled: attention biases, RoPE types other than default and YaRN, V2's `moe_layer_freq`
//! other than 1.

use std::path::Path;

use serde_json::{Map, Value};

/// A config that cannot be used; `key` names the JSON key (or preset) at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {key}: {problem}")]
pub struct ConfigError {
    pub source_name: String,
    pub key: String,
    pub problem: String,
}

/// YaRN RoPE scaling parameters, as transformers reads them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// Rotary position embedding of the `qk_rope_head_dim` dims of queries and keys.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    /// DeepSeek's layout: adjacent pairs (`x[2i]`, `x[2i+1]`) rotate together (`rope_interleave`, default
    /// true); false means the two halves rotate together (`rotate_half`).
    pub interleave: bool,
    pub yarn: Option<Yarn>,
}

/// FP8 block-scaled weights (`quantization_config`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fp8Quantization {
    /// Weight block [rows, cols], [128, 128] for V3.
    pub weight_block: [usize; 2],
}

/// How a MoE layer scores its experts and picks a token's `num_experts_per_tok` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// DeepSeek-V3 (`scoring_func: sigmoid`, `topk_method: noaux_tc`): sigmoid affinities; the
    /// selection ranks affinity + the gate's `e_score_correction_bias` (loss-free balancing), a
    /// group by the sum of its top two.
    Sigmoid,
    /// DeepSeek-V2 (`model_type: deepseek_v2`): a softmax over the experts; no bias; a group by its
    /// best expert (`group_limited_greedy`; `greedy` is one group). The weights are the selected
    /// scores times `routed_scaling_factor`.
    Softmax,
}

/// DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, `index_n_heads`, `index_head_dim`,
/// `index_topk`), as transformers' `DeepseekV32Indexer` computes it: per token, `index_n_heads`
/// queries of `index_head_dim` from the query latent (`indexer.wq_b`), one key from the hidden state
/// (`indexer.wk`, then a LayerNorm with bias, `indexer.k_norm`), both rotated by the model's RoPE on
/// their first `qk_rope_head_dim` dims in halves (`rotate_half`, not the MLA's adjacent pairs), and
/// head weights (`indexer.weights_proj`). A key's score for a query is
/// `sum_h w_h / sqrt(n_heads) * relu(q_h . k / sqrt(head_dim))`; the query attends to the `topk`
/// best-scoring keys at or before it (all of them while there are at most `topk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SparseIndexer {
    pub n_heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

/// Everything the DeepSeek-V3 definition needs to know about one model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Preset name or the config file it came from.
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// None: queries come from one `q_proj` instead of `q_a_proj` + norm + `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    /// The routing rule: DeepSeek-V3's or DeepSeek-V2's.
    pub scoring: Scoring,
    /// DeepSeek-V3.2's sparse attention (None: every layer attends densely).
    pub indexer: Option<SparseIndexer>,
    pub first_k_dense_replace: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Multi-token prediction modules (0 or 1), stored as layer `num_hidden_layers`.
    pub num_nextn_predict_layers: usize,
    pub quantization: Option<Fp8Quantization>,
    /// Storage dtype of the unquantized weights (`torch_dtype` / `dtype`): f32 or bf16.
    pub weight_dtype: crate::dtype::DType,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The largest tensor dimension a config may make: the GPU kernels address a dimension with signed
/// 32-bit coordinates (TMA's, and token, expert and position ids).
pub const MAX_DIM: usize = i32::MAX as usize;
/// The most decoder layers v3c compiles (DeepSeek-V3 has 61); every layer is unrolled in the graph.
pub const MAX_LAYERS: usize = 1024;
/// The most routed (and shared) experts v3c compiles (DeepSeek-V3 has 256 and 1).
pub const MAX_EXPERTS: usize = 65536;
/// The widest attention head dims (and latent) v3c compiles (DeepSeek-V3's widest: the latent, 512);
/// RoPE's frequencies are attributes of the IR, one per pair of dims.
pub const MAX_HEAD_DIM: usize = 65536;

/// Built-in model names for `--model`.
pub const PRESETS: &[&str] = &["deepseek-v3", "deepseek-v3-tiny", "deepseek-v2-lite", "deepseek-v3.2"];

impl ModelConfig {
    /// q/k head dim (nope + rope), 192 for V3.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Width of one token's latent cache entry per layer (kv_lora_rank + rope dim), 576 for V3.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Width of one token's cache row per layer: the latent, then (DeepSeek-V3.2) the indexer's
    /// key; 576 for V3, 704 for V3.2.
    pub fn cache_dim(&self) -> usize {
        self.latent_dim() + self.indexer.map_or(0, |i| i.head_dim)
    }

    /// Is decoder layer `layer` a MoE layer? (The MTP layer is always MoE.)
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
    }

    /// The config in the hub's `config.json` spelling (`rope_theta` + `rope_scaling`).
    pub fn to_hf_json(&self) -> Value {
        let v2 = self.scoring == Scoring::Softmax;
        let (architecture, model_type) = match (v2, self.indexer.is_some()) {
            (true, _) => ("DeepseekV2ForCausalLM", "deepseek_v2"),
            (false, true) => ("DeepseekV32ForCausalLM", "deepseek_v32"),
            (false, false) => ("DeepseekV3ForCausalLM", "deepseek_v3"),
        };
        let mut m = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "routed_scaling_factor": self.routed_scaling_factor,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "topk_method": match (v2, self.n_group) {
                (false, _) => "noaux_tc",
                (true, 1) => "greedy",
                (true, _) => "group_limited_greedy",
            },
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "num_experts_per_tok": self.num_experts_per_tok,
            "first_k_dense_replace": self.first_k_dense_replace,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": if v2 { "softmax" } else { "sigmoid" },
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_interleave": self.rope.interleave,
            "rope_scaling": self.rope.yarn.as_ref().map(|y| serde_json::json!({
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "mscale": y.mscale.unwrap_or(0.0),
                "mscale_all_dim": y.mscale_all_dim.unwrap_or(0.0),
                "attention_factor": y.attention_factor,
                "truncate": y.truncate,
            })),
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": if self.weight_dtype == crate::dtype::DType::F32 { "float32" } else { "bfloat16" },
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        if let Some(i) = &self.indexer {
            m["index_n_heads"] = i.n_heads.into();
            m["index_head_dim"] = i.head_dim.into();
            m["index_topk"] = i.topk.into();
        }
        if let Some(q) = &self.quantization {
            m["quantization_config"] = serde_json::json!({
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": q.weight_block,
            });
        }
        m
    }

    /// A built-in config by name; the error lists the presets.
    pub fn preset(name: &str) -> Result<ModelConfig, ConfigError> {
        let text = match name {
            "deepseek-v3" => DEEPSEEK_V3_JSON,
            "deepseek-v3-tiny" => DEEPSEEK_V3_TINY_JSON,
            "deepseek-v2-lite" => DEEPSEEK_V2_LITE_JSON,
            "deepseek-v3.2" => DEEPSEEK_V3_2_JSON,
            _ => {
                return Err(ConfigError {
                    source_name: "--model".into(),
                    key: name.into(),
                    problem: format!(
                        "unknown model (built-in: {}; or give a checkpoint directory with config.json)",
                        PRESETS.join(", ")
                    ),
                })
            }
        };
        let mut config = ModelConfig::from_json_str(text, name)?;
        config.name = name.to_string();
        Ok(config)
    }

    /// Reads `dir/config.json` (or a config file given directly).
    pub fn from_path(path: &Path) -> Result<ModelConfig, ConfigError> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let source_name = file.display().to_string();
        if !path.exists() {
            return Err(ConfigError {
                source_name: path.display().to_string(),
                key: "(file)".into(),
                problem: "no such file or directory".into(),
            });
        }
        if !file.is_file() {
            return Err(ConfigError {
                source_name,
                key: "(file)".into(),
                problem: "not found (a checkpoint directory needs config.json)".into(),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            key: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        let mut config = ModelConfig::from_json_str(&text, &source_name)?;
        config.name = path.display().to_string();
        Ok(config)
    }

    /// A built-in name or a checkpoint directory (what `--model` accepts).
    pub fn resolve(model: &str) -> Result<ModelConfig, ConfigError> {
        if PRESETS.contains(&model) {
            ModelConfig::preset(model)
        } else if Path::new(model).exists() {
            ModelConfig::from_path(Path::new(model))
        } else {
            ModelConfig::preset(model)
        }
    }

    /// Parses and validates a Hugging Face `config.json`; `source_name` names it in errors.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<ModelConfig, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            source_name: source_name.into(),
            key: "(json)".into(),
            problem: format!("not valid JSON: {e}"),
        })?;
        let obj = value.as_object().ok_or_else(|| ConfigError {
            source_name: source_name.into(),
            key: "(json)".into(),
            problem: "expected a JSON object".into(),
        })?;
        let r = Reader { obj, source_name };
        let config = r.parse()?;
        config.validate(source_name)?;
        Ok(config)
    }

    fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let fail =
            |key: &str, problem: String| Err(ConfigError { source_name: source_name.into(), key: key.into(), problem });
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return fail(key, "must be positive".into());
            }
        }
        if self.q_lora_rank == Some(0) {
            return fail("q_lora_rank", "must be positive or null".into());
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return fail("qk_rope_head_dim", format!("{} is odd; RoPE rotates pairs of dims", self.qk_rope_head_dim));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return fail(
                "first_k_dense_replace",
                format!("{} exceeds num_hidden_layers {}", self.first_k_dense_replace, self.num_hidden_layers),
            );
        }
        let has_moe = self.first_k_dense_replace < self.num_hidden_layers || self.num_nextn_predict_layers > 0;
        if has_moe {
            if self.n_routed_experts == 0 {
                return fail("n_routed_experts", "must be positive when MoE layers exist".into());
            }
            if self.moe_intermediate_size == 0 {
                return fail("moe_intermediate_size", "must be positive when MoE layers exist".into());
            }
            if self.n_group == 0 || !self.n_routed_experts.is_multiple_of(self.n_group) {
                return fail(
                    "n_group",
                    format!("{} groups do not divide n_routed_experts {}", self.n_group, self.n_routed_experts),
                );
            }
            let per_group = self.n_routed_experts / self.n_group;
            if per_group < 2 && self.scoring == Scoring::Sigmoid {
                return fail(
                    "n_group",
                    format!(
                        "{per_group} expert(s) per group; group scores sum each group's top 2, so groups need >= 2"
                    ),
                );
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return fail("topk_group", format!("{} must be in 1..={} (n_group)", self.topk_group, self.n_group));
            }
            let allowed = self.topk_group * per_group;
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > allowed {
                return fail(
                    "num_experts_per_tok",
                    format!(
                        "{} must be in 1..={allowed} (the experts in topk_group={} groups of {per_group})",
                        self.num_experts_per_tok, self.topk_group
                    ),
                );
            }
        }
        if let Some(i) = &self.indexer {
            if self.q_lora_rank.is_none() {
                return fail(
                    "q_lora_rank",
                    "null, but DeepSeek Sparse Attention's indexer reads the query latent".into(),
                );
            }
            for (key, v) in [("index_n_heads", i.n_heads), ("index_topk", i.topk)] {
                if v == 0 {
                    return fail(key, "must be positive".into());
                }
            }
            if i.head_dim <= self.qk_rope_head_dim {
                return fail(
                    "index_head_dim",
                    format!(
                        "{} must exceed qk_rope_head_dim {} (the indexer rotates its first qk_rope_head_dim dims)",
                        i.head_dim, self.qk_rope_head_dim
                    ),
                );
            }
        }
        if self.num_nextn_predict_layers > 0 && self.scoring == Scoring::Softmax {
            return fail(
                "num_nextn_predict_layers",
                format!("{}: deepseek_v2 has no MTP module", self.num_nextn_predict_layers),
            );
        }
        if self.num_nextn_predict_layers > 1 {
            return fail(
                "num_nextn_predict_layers",
                format!("{} MTP modules; only depth 1 is supported", self.num_nextn_predict_layers),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return fail("rms_norm_eps", format!("{} must be positive", self.rms_norm_eps));
        }
        if !self.routed_scaling_factor.is_finite() || self.routed_scaling_factor <= 0.0 {
            return fail("routed_scaling_factor", format!("{} must be positive", self.routed_scaling_factor));
        }
        if !(self.rope.theta > 1.0) {
            return fail("rope_theta", format!("{} must be > 1", self.rope.theta));
        }
        if let Some(y) = &self.rope.yarn {
            if !(y.factor > 0.0) {
                return fail("rope_scaling.factor", format!("{} must be positive", y.factor));
            }
            if y.original_max_position_embeddings == 0 {
                return fail("rope_scaling.original_max_position_embeddings", "must be positive".into());
            }
        }
        if let Some(q) = &self.quantization {
            if q.weight_block[0] == 0 || q.weight_block[1] == 0 {
                return fail("quantization_config.weight_block_size", "block sizes must be positive".into());
            }
        }
        for (key, token) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(t) = token.filter(|&t| t as usize >= self.vocab_size) {
                return fail(key, format!("token {t} is outside the vocabulary ({})", self.vocab_size));
            }
        }
        self.validate_extents(source_name)
    }

    /// Sizes the compiler can build: at most [`MAX_LAYERS`] layers, [`MAX_EXPERTS`] routed (and
    /// shared) experts and [`MAX_HEAD_DIM`] dims a head (or latent), and every tensor dimension the
    /// sizes make (a GEMM's N or K, a row's width) at most [`MAX_DIM`], computed without overflow.
    /// Without this a typo such as `"num_hidden_layers": 610000` runs for hours, a rope dim of 2^40
    /// aborts on a failed allocation, and 2^40 heads compile into kernels whose coordinates wrap.
    fn validate_extents(&self, source_name: &str) -> Result<(), ConfigError> {
        let fail =
            |key: &str, problem: String| Err(ConfigError { source_name: source_name.into(), key: key.into(), problem });
        let counts = [
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS, "layers (the graph unrolls every layer)"),
            ("n_routed_experts", self.n_routed_experts, MAX_EXPERTS, "routed experts"),
            ("n_shared_experts", self.n_shared_experts, MAX_EXPERTS, "shared experts"),
            ("qk_nope_head_dim", self.qk_nope_head_dim, MAX_HEAD_DIM, "dims a head"),
            ("qk_rope_head_dim", self.qk_rope_head_dim, MAX_HEAD_DIM, "dims a head"),
            ("v_head_dim", self.v_head_dim, MAX_HEAD_DIM, "dims a head"),
            ("kv_lora_rank", self.kv_lora_rank, MAX_HEAD_DIM, "dims of the latent"),
        ];
        for (key, n, max, what) in counts {
            if n > max {
                return fail(key, format!("{n} is more than v3c supports: at most {max} {what}"));
            }
        }
        let heads = self.num_attention_heads;
        let two = |n: usize| n.checked_mul(2);
        // (the keys that make it, what it sizes, its size: None when it overflows)
        let dims: [(&str, &str, Option<usize>); 11] = [
            ("vocab_size", "rows of the embedding", Some(self.vocab_size)),
            ("hidden_size", "columns of the hidden state", Some(self.hidden_size)),
            ("2 x intermediate_size", "columns of the dense MLP's gate|up", two(self.intermediate_size)),
            ("q_lora_rank", "columns of the query latent", Some(self.q_lora_rank.unwrap_or(0))),
            (
                "num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)",
                "columns of the queries",
                self.qk_nope_head_dim.checked_add(self.qk_rope_head_dim).and_then(|d| d.checked_mul(heads)),
            ),
            (
                "num_attention_heads x (qk_nope_head_dim + v_head_dim)",
                "columns of kv_b_proj",
                self.qk_nope_head_dim.checked_add(self.v_head_dim).and_then(|d| d.checked_mul(heads)),
            ),
            (
                "num_attention_heads x (kv_lora_rank + qk_rope_head_dim)",
                "columns of the absorbed queries",
                self.kv_lora_rank.checked_add(self.qk_rope_head_dim).and_then(|d| d.checked_mul(heads)),
            ),
            (
                "kv_lora_rank + qk_rope_head_dim",
                "columns of a latent cache row",
                self.kv_lora_rank.checked_add(self.qk_rope_head_dim),
            ),
            (
                "n_routed_experts x 2 x moe_intermediate_size",
                "rows of the routed experts' stacked gate|up",
                two(self.moe_intermediate_size).and_then(|d| d.checked_mul(self.n_routed_experts)),
            ),
            (
                "n_shared_experts x 2 x moe_intermediate_size",
                "columns of the shared experts' gate|up",
                two(self.moe_intermediate_size).and_then(|d| d.checked_mul(self.n_shared_experts)),
            ),
            ("max_position_embeddings", "positions", Some(self.max_position_embeddings)),
        ];
        for (key, what, size) in dims {
            match size {
                Some(n) if n <= MAX_DIM => {}
                Some(n) => {
                    return fail(
                        key,
                        format!("{n} {what}; kernels address a dimension with 32-bit coordinates (at most {MAX_DIM})"),
                    )
                }
                None => return fail(key, format!("{what} overflow 64 bits")),
            }
        }
        Ok(())
    }
}

/// Typed access to a config object; every error names the key.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    source_name: &'a str,
}

impl Reader<'_> {
    fn err(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError { source_name: self.source_name.into(), key: key.into(), problem: problem.into() }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_in(&self, obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<usize>, ConfigError> {
        let full = format!("{prefix}{key}");
        match obj.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n).map(Some).map_err(|_| self.err(&full, "too large")),
                None => Err(self.err(&full, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }

    fn f64_in(&self, obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<f64>, ConfigError> {
        match obj.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(&format!("{prefix}{key}"), format!("expected a number, found {v}"))),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.usize_in(self.obj, "", key)
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.usize_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.f64_in(self.obj, "", key)
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// `eos_token_id` may be an int or a list of ints (the first is used).
    fn token_opt(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => match items.first() {
                None => Ok(None),
                Some(v) => self.token(key, v).map(Some),
            },
            Some(v) => self.token(key, v).map(Some),
        }
    }

    fn token(&self, key: &str, v: &Value) -> Result<u32, ConfigError> {
        let n = v.as_u64().ok_or_else(|| self.err(key, format!("expected a token id, found {v}")))?;
        u32::try_from(n).map_err(|_| self.err(key, format!("token {n} does not fit 32 bits")))
    }

    fn parse(&self) -> Result<ModelConfig, ConfigError> {
        const EXPECTED: &str = "expected 'deepseek_v3', 'deepseek_v32' or 'deepseek_v2'";
        let (v2, v32) = match self.str_opt("model_type")? {
            Some("deepseek_v3") => (false, false),
            Some("deepseek_v32") => (false, true),
            Some("deepseek_v2") => (true, false),
            Some(other) => return Err(self.err("model_type", format!("'{other}' is not supported ({EXPECTED})"))),
            None => return Err(self.err("model_type", format!("missing ({EXPECTED})"))),
        };
        if let Some(act) = self.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(self.err("hidden_act", format!("'{act}' is not supported (expected 'silu')")));
            }
        }
        let (scoring, grouped) = self.routing(v2)?;
        if self.bool_or("attention_bias", false)? {
            return Err(self.err("attention_bias", "true is not supported (DeepSeek-V3 has no attention biases)"));
        }
        let num_hidden_layers = self.usize("num_hidden_layers")?;
        let n_routed_experts = self.usize_or("n_routed_experts", 0)?;
        let routed_scaling_factor = self.f64_opt("routed_scaling_factor")?.unwrap_or(1.0) as f32;
        let rms_norm_eps = self.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let max_position_embeddings = self.usize("max_position_embeddings")?;
        let rope = self.rope(max_position_embeddings)?;
        let quantization = self.quantization()?;
        let mtp = match self.usize_opt("num_nextn_predict_layers")? {
            Some(n) => n,
            None => self.usize_or("num_mtp_layers", 0)?,
        };
        let indexer = if v32 { Some(self.indexer()?) } else { None };
        // transformers' DeepseekV32Config: 3 dense layers unless said otherwise.
        let first_k_dense_replace = self.first_dense_layers(num_hidden_layers, if v32 { 3 } else { 0 })?;
        Ok(ModelConfig {
            name: self.source_name.to_string(),
            vocab_size: self.usize("vocab_size")?,
            hidden_size: self.usize("hidden_size")?,
            intermediate_size: self.usize("intermediate_size")?,
            moe_intermediate_size: self.usize_or("moe_intermediate_size", 0)?,
            num_hidden_layers,
            num_attention_heads: self.usize("num_attention_heads")?,
            q_lora_rank: self.usize_opt("q_lora_rank")?,
            kv_lora_rank: self.usize("kv_lora_rank")?,
            qk_nope_head_dim: self.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: self.usize("qk_rope_head_dim")?,
            v_head_dim: self.usize("v_head_dim")?,
            n_routed_experts,
            n_shared_experts: self.usize_or("n_shared_experts", 0)?,
            num_experts_per_tok: self.usize_or("num_experts_per_tok", 0)?,
            // `greedy` picks from every expert: one group, whatever the config says of groups.
            n_group: if grouped { self.usize_or("n_group", 1)? } else { 1 },
            topk_group: if grouped { self.usize_or("topk_group", 1)? } else { 1 },
            scoring,
            indexer,
            first_k_dense_replace,
            norm_topk_prob: self.bool_or("norm_topk_prob", false)?,
            routed_scaling_factor,
            rms_norm_eps,
            max_position_embeddings,
            rope,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            num_nextn_predict_layers: mtp,
            quantization,
            weight_dtype: self.weight_dtype()?,
            bos_token_id: self.token_opt("bos_token_id")?,
            eos_token_id: self.token_opt("eos_token_id")?,
        })
    }

    /// DeepSeek Sparse Attention's indexer (`deepseek_v32`; transformers' defaults where a key is
    /// missing). Its MLA rotates adjacent pairs whatever `rope_interleave` says (transformers'
    /// `DeepseekV32Attention`), so `false` there is refused rather than ignored.
    fn indexer(&self) -> Result<SparseIndexer, ConfigError> {
        if !self.bool_or("rope_interleave", true)? {
            return Err(self.err(
                "rope_interleave",
                "false is not supported for deepseek_v32 (its MLA rotates adjacent pairs, its indexer halves)",
            ));
        }
        Ok(SparseIndexer {
            n_heads: self.usize_or("index_n_heads", 64)?,
            head_dim: self.usize_or("index_head_dim", 128)?,
            topk: self.usize_or("index_topk", 2048)?,
        })
    }

    /// The dense layers before the MoE ones: `first_k_dense_replace`, or transformers 5's
    /// `mlp_layer_types` (`"dense"` layers, then `"sparse"` ones), which must agree where both are
    /// given.
    fn first_dense_layers(&self, layers: usize, default: usize) -> Result<usize, ConfigError> {
        let first = self.usize_opt("first_k_dense_replace")?;
        let Some(types) = self.get("mlp_layer_types") else { return Ok(first.unwrap_or(default)) };
        let bad = |problem: String| self.err("mlp_layer_types", problem);
        let Some(types) = types.as_array() else { return Err(bad(format!("expected a list, found {types}"))) };
        let kinds: Vec<&str> = types.iter().map(|v| v.as_str().unwrap_or("?")).collect();
        let dense = kinds.iter().take_while(|k| **k == "dense").count();
        if kinds.len() != layers || kinds[dense..].iter().any(|k| *k != "sparse") {
            return Err(bad(format!(
                "expected num_hidden_layers ({layers}) entries, \"dense\" ones then \"sparse\" ones, found {:?}",
                kinds
            )));
        }
        match first {
            Some(f) if f != dense => Err(bad(format!("{dense} dense layers, but first_k_dense_replace is {f}"))),
            _ => Ok(dense),
        }
    }

    /// The routing rule and whether it limits a token to groups of experts. DeepSeek-V3:
    /// `scoring_func: sigmoid`, `topk_method: noaux_tc` (the defaults). DeepSeek-V2: a softmax
    /// (transformers' `DeepseekV2` ignores `scoring_func`; any other value is refused here),
    /// `topk_method` `greedy` (the default) or `group_limited_greedy`.
    fn routing(&self, v2: bool) -> Result<(Scoring, bool), ConfigError> {
        let scoring_func = self.str_opt("scoring_func")?;
        let topk_method = self.str_opt("topk_method")?;
        if !v2 {
            if let Some(s) = scoring_func.filter(|s| *s != "sigmoid") {
                return Err(self.err(
                    "scoring_func",
                    format!(
                        "'{s}' is not supported for deepseek_v3 (expected 'sigmoid'; softmax routing is deepseek_v2's)"
                    ),
                ));
            }
            if let Some(s) = topk_method.filter(|s| *s != "noaux_tc") {
                return Err(
                    self.err("topk_method", format!("'{s}' is not supported for deepseek_v3 (expected 'noaux_tc')"))
                );
            }
            return Ok((Scoring::Sigmoid, true));
        }
        if let Some(s) = scoring_func.filter(|s| *s != "softmax") {
            return Err(
                self.err("scoring_func", format!("'{s}' is not supported for deepseek_v2 (expected 'softmax')"))
            );
        }
        let grouped = match topk_method.unwrap_or("greedy") {
            "greedy" => false,
            "group_limited_greedy" => true,
            other => {
                return Err(self.err(
                    "topk_method",
                    format!("'{other}' is not supported for deepseek_v2 (expected 'greedy' or 'group_limited_greedy')"),
                ))
            }
        };
        if self.bool_or("norm_topk_prob", false)? {
            return Err(self.err(
                "norm_topk_prob",
                "true is not supported for deepseek_v2 (transformers' DeepseekV2 scales the softmax scores, never normalizes them)",
            ));
        }
        if let Some(f) = self.usize_opt("moe_layer_freq")?.filter(|f| *f != 1) {
            return Err(self.err(
                "moe_layer_freq",
                format!("{f} is not supported (expected 1: a MoE layer after each dense one)"),
            ));
        }
        Ok((Scoring::Softmax, grouped))
    }

    fn rope(&self, max_position_embeddings: usize) -> Result<RopeConfig, ConfigError> {
        let interleave = self.bool_or("rope_interleave", true)?;
        // transformers 5: rope_parameters {rope_type, rope_theta, factor, ...}
        // hub / transformers 4: rope_theta + rope_scaling {type | rope_type, factor, ...} or null.
        let (prefix, params) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters.", Some(p)),
            (None, Some(s)) => ("rope_scaling.", Some(s)),
            (None, None) => ("rope_scaling.", None),
        };
        let params = match params {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => {
                return Err(self.err(prefix.trim_end_matches('.'), format!("expected an object or null, found {v}")))
            }
        };
        let theta = match params.map(|p| self.f64_in(p, prefix, "rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => self.f64_opt("rope_theta")?.unwrap_or(10000.0),
        };
        let Some(p) = params else {
            return Ok(RopeConfig { theta, interleave, yarn: None });
        };
        let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
        match kind {
            "default" => Ok(RopeConfig { theta, interleave, yarn: None }),
            "yarn" => {
                let original =
                    self.usize_in(p, prefix, "original_max_position_embeddings")?.unwrap_or(max_position_embeddings);
                // transformers: a missing factor means max_position_embeddings / original.
                let factor =
                    self.f64_in(p, prefix, "factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
                let nonzero = |v: Option<f64>| v.filter(|x| *x != 0.0);
                let truncate = match p.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(v) => {
                        v.as_bool().ok_or_else(|| self.err(&format!("{prefix}truncate"), "expected true or false"))?
                    }
                };
                Ok(RopeConfig {
                    theta,
                    interleave,
                    yarn: Some(Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast: nonzero(self.f64_in(p, prefix, "beta_fast")?).unwrap_or(32.0),
                        beta_slow: nonzero(self.f64_in(p, prefix, "beta_slow")?).unwrap_or(1.0),
                        mscale: nonzero(self.f64_in(p, prefix, "mscale")?),
                        mscale_all_dim: nonzero(self.f64_in(p, prefix, "mscale_all_dim")?),
                        attention_factor: self.f64_in(p, prefix, "attention_factor")?,
                        truncate,
                    }),
                })
            }
            other => Err(self.err(
                &format!("{prefix}rope_type"),
                format!("'{other}' is not supported (expected 'yarn' or 'default')"),
            )),
        }
    }

    fn weight_dtype(&self) -> Result<crate::dtype::DType, ConfigError> {
        let key = if self.get("dtype").is_some() { "dtype" } else { "torch_dtype" };
        match self.str_opt(key)? {
            None | Some("bfloat16") => Ok(crate::dtype::DType::BF16),
            Some("float32") => Ok(crate::dtype::DType::F32),
            Some(other) => Err(self.err(key, format!("'{other}' is not supported (expected 'bfloat16' or 'float32')"))),
        }
    }

    fn quantization(&self) -> Result<Option<Fp8Quantization>, ConfigError> {
        let Some(q) = self.get("quantization_config") else { return Ok(None) };
        let Some(q) = q.as_object() else {
            return Err(self.err("quantization_config", format!("expected an object, found {q}")));
        };
        let field = |k: &str| q.get(k).and_then(Value::as_str);
        match field("quant_method") {
            Some("fp8") => {}
            other => {
                return Err(self
                    .err("quantization_config.quant_method", format!("{other:?} is not supported (expected \"fp8\")")))
            }
        }
        if let Some(fmt) = field("fmt") {
            if fmt != "e4m3" {
                return Err(self.err("quantization_config.fmt", format!("'{fmt}' is not supported (expected 'e4m3')")));
            }
        }
        if let Some(s) = field("activation_scheme") {
            if s != "dynamic" {
                return Err(self.err(
                    "quantization_config.activation_scheme",
                    format!("'{s}' is not supported (expected 'dynamic')"),
                ));
            }
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => [128, 128],
            Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|v| v.as_u64().is_some()) => {
                [a[0].as_u64().unwrap_or(0) as usize, a[1].as_u64().unwrap_or(0) as usize]
            }
            Some(v) => {
                return Err(
                    self.err("quantization_config.weight_block_size", format!("expected [rows, cols], found {v}"))
                )
            }
        };
        Ok(Some(Fp8Quantization { weight_block: block }))
    }
}

/// The full DeepSeek-V3 (671B), as in the released `config.json`.
pub const DEEPSEEK_V3_JSON: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"],
  "model_type": "deepseek_v3",
  "vocab_size": 129280,
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "num_hidden_layers": 61,
  "num_nextn_predict_layers": 1,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "n_shared_experts": 1,
  "n_routed_experts": 256,
  "routed_scaling_factor": 2.5,
  "kv_lora_rank": 512,
  "q_lora_rank": 1536,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc",
  "n_group": 8,
  "topk_group": 4,
  "num_experts_per_tok": 8,
  "first_k_dense_replace": 3,
  "norm_topk_prob": true,
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "max_position_embeddings": 163840,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "rope_scaling": {
    "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "type": "yarn"
  },
  "tie_word_embeddings": false,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "quantization_config": {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
  }
}"#;

/// DeepSeek-V3.2 (685B with its indexers), as in the released `config.json`: DeepSeek-V3 with
/// DeepSeek Sparse Attention (64 indexer heads of 128, each query attending to its 2048 best keys).
pub const DEEPSEEK_V3_2_JSON: &str = r#"{
  "architectures": ["DeepseekV32ForCausalLM"],
  "model_type": "deepseek_v32",
  "vocab_size": 129280,
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "num_hidden_layers": 61,
  "num_nextn_predict_layers": 1,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "n_shared_experts": 1,
  "n_routed_experts": 256,
  "routed_scaling_factor": 2.5,
  "kv_lora_rank": 512,
  "q_lora_rank": 1536,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "qk_nope_head_dim": 128,
  "index_head_dim": 128,
  "index_n_heads": 64,
  "index_topk": 2048,
  "topk_method": "noaux_tc",
  "n_group": 8,
  "topk_group": 4,
  "num_experts_per_tok": 8,
  "first_k_dense_replace": 3,
  "norm_topk_prob": true,
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "max_position_embeddings": 163840,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "rope_scaling": {
    "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "type": "yarn"
  },
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "bos_token_id": 0,
  "eos_token_id": 1,
  "quantization_config": {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128]
  }
}"#;

/// DeepSeek-V2-Lite (15.7B, 2.4B active; bf16 weights), as in the released `config.json`: MLA
/// without q LoRA, 64 routed experts picked by a softmax (6 a token, `greedy`), 2 shared ones.
pub const DEEPSEEK_V2_LITE_JSON: &str = r#"{
  "architectures": ["DeepseekV2ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v2",
  "moe_intermediate_size": 1408,
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_routed_experts": 64,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts_per_tok": 6,
  "num_hidden_layers": 27,
  "num_key_value_heads": 16,
  "pretraining_tp": 1,
  "q_lora_rank": null,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 1.0,
  "scoring_func": "softmax",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "topk_method": "greedy",
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 102400
}"#;

/// A small config with every feature of the full one (MLA with q LoRA, dense + MoE layers, grouped
/// routing with bias, shared expert, YaRN, MTP) for tests and demos. Sizes are deliberately not
/// multiples of 128 so fp8 blocks are ragged.
pub const DEEPSEEK_V3_TINY_JSON: &str = r#"{
  "model_type": "deepseek_v3",
  "vocab_size": 320,
  "hidden_size": 96,
  "intermediate_size": 160,
  "moe_intermediate_size": 48,
  "num_hidden_layers": 3,
  "num_nextn_predict_layers": 1,
  "num_attention_heads": 4,
  "n_shared_experts": 1,
  "n_routed_experts": 8,
  "routed_scaling_factor": 2.5,
  "kv_lora_rank": 32,
  "q_lora_rank": 48,
  "qk_rope_head_dim": 16,
  "v_head_dim": 24,
  "qk_nope_head_dim": 24,
  "topk_method": "noaux_tc",
  "n_group": 4,
  "topk_group": 2,
  "num_experts_per_tok": 3,
  "first_k_dense_replace": 1,
  "norm_topk_prob": true,
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "max_position_embeddings": 2048,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "rope_scaling": {
    "beta_fast": 32, "beta_slow": 1, "factor": 8, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 256, "type": "yarn"
  },
  "tie_word_embeddings": false,
  "bos_token_id": 0,
  "eos_token_id": 1
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn with(base: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        edit(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn err(text: &str) -> String {
        ModelConfig::from_json_str(text, "config.json").unwrap_err().to_string()
    }

    #[test]
    fn full_preset_has_the_published_shapes() {
        let c = ModelConfig::preset("deepseek-v3").unwrap();
        assert_eq!(c.qk_head_dim(), 192);
        assert_eq!(c.latent_dim(), 576);
        assert_eq!(c.num_hidden_layers, 61);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        let y = c.rope.yarn.as_ref().unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (40.0, 4096));
        assert_eq!(c.quantization, Some(Fp8Quantization { weight_block: [128, 128] }));
        assert!(c.rope.interleave);
    }

    #[test]
    fn v2_lite_preset_has_the_published_shapes() {
        let c = ModelConfig::preset("deepseek-v2-lite").unwrap();
        assert_eq!(
            (c.scoring, c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts),
            (Scoring::Softmax, 64, 6, 2)
        );
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank), (2048, 27, 16, None));
        assert_eq!((c.latent_dim(), c.moe_intermediate_size, c.vocab_size), (576, 1408, 102400));
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1));
        assert_eq!(
            (c.quantization.clone(), c.weight_dtype, c.num_nextn_predict_layers),
            (None, crate::dtype::DType::BF16, 0)
        );
    }

    #[test]
    fn transformers5_rope_parameters_spelling_is_accepted() {
        let text = with(DEEPSEEK_V3_TINY_JSON, |m| {
            m.remove("rope_theta");
            m.remove("rope_scaling");
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                    "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
                    "mscale": 1.0, "mscale_all_dim": 1.0}),
            );
        });
        let c = ModelConfig::from_json_str(&text, "c").unwrap();
        assert_eq!(c.rope.theta, 5000.0);
        assert_eq!(c.rope.yarn.unwrap().factor, 8.0);
        let plain = with(DEEPSEEK_V3_TINY_JSON, |m| {
            m.insert("rope_scaling".into(), Value::Null);
        });
        assert_eq!(ModelConfig::from_json_str(&plain, "c").unwrap().rope.yarn, None);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases: Vec<(String, &str)> = vec![
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("model_type".into(), "llama".into());
                }),
                "config.json: model_type: 'llama' is not supported (expected 'deepseek_v3', 'deepseek_v32' or 'deepseek_v2')",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("scoring_func".into(), "softmax".into());
                }),
                "config.json: scoring_func: 'softmax' is not supported for deepseek_v3 (expected 'sigmoid'; softmax \
                 routing is deepseek_v2's)",
            ),
            (
                with(&v2_tiny(), |m| {
                    m.insert("scoring_func".into(), "sigmoid".into());
                }),
                "config.json: scoring_func: 'sigmoid' is not supported for deepseek_v2 (expected 'softmax')",
            ),
            (
                with(&v2_tiny(), |m| {
                    m.insert("topk_method".into(), "noaux_tc".into());
                }),
                "config.json: topk_method: 'noaux_tc' is not supported for deepseek_v2 (expected 'greedy' or \
                 'group_limited_greedy')",
            ),
            (
                with(&v2_tiny(), |m| {
                    m.insert("norm_topk_prob".into(), true.into());
                }),
                "config.json: norm_topk_prob: true is not supported for deepseek_v2",
            ),
            (
                with(&v2_tiny(), |m| {
                    m.insert("moe_layer_freq".into(), 2.into());
                }),
                "config.json: moe_layer_freq: 2 is not supported (expected 1",
            ),
            (
                with(&v2_tiny(), |m| {
                    m.insert("num_nextn_predict_layers".into(), 1.into());
                }),
                "config.json: num_nextn_predict_layers: 1: deepseek_v2 has no MTP module",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.remove("hidden_size");
                }),
                "config.json: hidden_size: missing",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("hidden_size".into(), "big".into());
                }),
                "config.json: hidden_size: expected a non-negative integer, found \"big\"",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("qk_rope_head_dim".into(), 15.into());
                }),
                "config.json: qk_rope_head_dim: 15 is odd; RoPE rotates pairs of dims",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("n_group".into(), 3.into());
                }),
                "config.json: n_group: 3 groups do not divide n_routed_experts 8",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("num_experts_per_tok".into(), 5.into());
                }),
                "config.json: num_experts_per_tok: 5 must be in 1..=4 (the experts in topk_group=2 groups of 2)",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("topk_group".into(), 5.into());
                }),
                "config.json: topk_group: 5 must be in 1..=4 (n_group)",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("rope_scaling".into(), serde_json::json!({"type": "dynamic", "factor": 2}));
                }),
                "config.json: rope_scaling.rope_type: 'dynamic' is not supported (expected 'yarn' or 'default')",
            ),
            (
                with(DEEPSEEK_V3_JSON, |m| {
                    m["quantization_config"]["fmt"] = "e5m2".into();
                }),
                "config.json: quantization_config.fmt: 'e5m2' is not supported (expected 'e4m3')",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("num_hidden_layers".into(), 610_000.into());
                }),
                "config.json: num_hidden_layers: 610000 is more than v3c supports: at most 1024 layers",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("n_routed_experts".into(), (1u64 << 31).into());
                }),
                "config.json: n_routed_experts: 2147483648 is more than v3c supports: at most 65536 routed experts",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("num_attention_heads".into(), (1u64 << 40).into());
                }),
                "config.json: num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim): 43980465111040 columns \
                 of the queries; kernels address a dimension with 32-bit coordinates (at most 2147483647)",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("num_attention_heads".into(), (1u64 << 62).into());
                }),
                "config.json: num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim): columns of the queries \
                 overflow 64 bits",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("qk_rope_head_dim".into(), (1u64 << 30).into());
                    m.insert("num_attention_heads".into(), 1.into());
                }),
                "config.json: qk_rope_head_dim: 1073741824 is more than v3c supports: at most 65536 dims a head",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("vocab_size".into(), (1u64 << 31).into());
                }),
                "config.json: vocab_size: 2147483648 rows of the embedding;",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("moe_intermediate_size".into(), (1u64 << 27).into());
                }),
                "config.json: n_routed_experts x 2 x moe_intermediate_size: 2147483648 rows of the routed experts'",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("bos_token_id".into(), (1u64 << 40).into());
                }),
                "config.json: bos_token_id: token 1099511627776 does not fit 32 bits",
            ),
            (
                with(DEEPSEEK_V3_TINY_JSON, |m| {
                    m.insert("bos_token_id".into(), 320.into());
                }),
                "config.json: bos_token_id: token 320 is outside the vocabulary (320)",
            ),
            ("[1, 2]".into(), "config.json: (json): expected a JSON object"),
            ("{".into(), "config.json: (json): not valid JSON"),
        ];
        for (text, expected) in cases {
            let msg = err(&text);
            assert!(msg.starts_with(expected), "expected '{expected}', got '{msg}'");
        }
    }

    #[test]
    fn v3_2_preset_has_the_published_shapes() {
        let c = ModelConfig::preset("deepseek-v3.2").unwrap();
        assert_eq!(c.indexer, Some(SparseIndexer { n_heads: 64, head_dim: 128, topk: 2048 }));
        assert_eq!((c.latent_dim(), c.cache_dim()), (576, 704));
        let v3 = ModelConfig::preset("deepseek-v3").unwrap();
        assert_eq!(v3.cache_dim(), 576);
        // Everything else is DeepSeek-V3's.
        assert_eq!(ModelConfig { name: c.name.clone(), indexer: c.indexer, weight_dtype: c.weight_dtype, ..v3 }, c);
    }

    /// The tiny preset as a DeepSeek-V3.2 config.
    fn v32_tiny() -> String {
        with(DEEPSEEK_V3_TINY_JSON, |m| {
            m.insert("model_type".into(), "deepseek_v32".into());
            m.insert("index_n_heads".into(), 4.into());
            m.insert("index_head_dim".into(), 32.into());
            m.insert("index_topk".into(), 6.into());
        })
    }

    #[test]
    fn deepseek_v32_configs_read_the_indexer() {
        let c = ModelConfig::from_json_str(&v32_tiny(), "config.json").unwrap();
        assert_eq!(c.indexer, Some(SparseIndexer { n_heads: 4, head_dim: 32, topk: 6 }));
        assert_eq!(c.cache_dim(), c.latent_dim() + 32);
        let text = c.to_hf_json().to_string();
        assert!(text.contains("\"model_type\":\"deepseek_v32\"") && text.contains("\"index_topk\":6"));
        let back = ModelConfig::from_json_str(&text, "config.json").unwrap();
        assert_eq!(ModelConfig { name: c.name.clone(), ..back }, c);
        // transformers' defaults for missing keys: 64 heads of 128, 2048 keys; 3 dense layers.
        let defaults = with(&v32_tiny(), |m| {
            for k in ["index_n_heads", "index_head_dim", "index_topk", "first_k_dense_replace"] {
                m.remove(k);
            }
        });
        let d = ModelConfig::from_json_str(&defaults, "config.json").unwrap();
        assert_eq!(d.indexer, Some(SparseIndexer { n_heads: 64, head_dim: 128, topk: 2048 }));
        assert_eq!(d.first_k_dense_replace, 3);
        // transformers 5's mlp_layer_types says which layers are dense.
        let typed = with(&v32_tiny(), |m| {
            m.remove("first_k_dense_replace");
            m.insert("mlp_layer_types".into(), serde_json::json!(["dense", "dense", "sparse"]));
        });
        assert_eq!(ModelConfig::from_json_str(&typed, "config.json").unwrap().first_k_dense_replace, 2);
    }

    #[test]
    fn bad_v32_configs_name_the_key() {
        let cases: Vec<(String, &str)> = vec![
            (
                with(&v32_tiny(), |m| {
                    m.insert("q_lora_rank".into(), Value::Null);
                }),
                "config.json: q_lora_rank: null, but DeepSeek Sparse Attention's indexer reads the query latent",
            ),
            (
                with(&v32_tiny(), |m| {
                    m.insert("index_head_dim".into(), 16.into());
                }),
                "config.json: index_head_dim: 16 must exceed qk_rope_head_dim 16",
            ),
            (
                with(&v32_tiny(), |m| {
                    m.insert("index_topk".into(), 0.into());
                }),
                "config.json: index_topk: must be positive",
            ),
            (
                with(&v32_tiny(), |m| {
                    m.insert("rope_interleave".into(), false.into());
                }),
                "config.json: rope_interleave: false is not supported for deepseek_v32",
            ),
            (
                with(&v32_tiny(), |m| {
                    m.insert("mlp_layer_types".into(), serde_json::json!(["dense", "sparse", "dense"]));
                }),
                "config.json: mlp_layer_types: expected num_hidden_layers (3) entries, \"dense\" ones then",
            ),
            (
                with(&v32_tiny(), |m| {
                    m.insert("mlp_layer_types".into(), serde_json::json!(["dense", "dense", "sparse"]));
                }),
                "config.json: mlp_layer_types: 2 dense layers, but first_k_dense_replace is 1",
            ),
        ];
        for (text, expected) in cases {
            let msg = err(&text);
            assert!(msg.starts_with(expected), "expected '{expected}', got '{msg}'");
        }
    }

    /// The tiny preset as a DeepSeek-V2 config (`greedy`, no MTP).
    fn v2_tiny() -> String {
        with(DEEPSEEK_V3_TINY_JSON, |m| {
            m.insert("model_type".into(), "deepseek_v2".into());
            m.insert("architectures".into(), serde_json::json!(["DeepseekV2ForCausalLM"]));
            for k in ["scoring_func", "topk_method", "num_nextn_predict_layers", "norm_topk_prob"] {
                m.remove(k);
            }
        })
    }

    #[test]
    fn deepseek_v2_configs_route_by_softmax() {
        // greedy (the default): one group, whatever n_group says; V2's defaults elsewhere.
        let c = ModelConfig::from_json_str(&v2_tiny(), "config.json").unwrap();
        assert_eq!((c.scoring, c.n_group, c.topk_group, c.num_nextn_predict_layers), (Scoring::Softmax, 1, 1, 0));
        assert!(!c.norm_topk_prob);
        // group_limited_greedy keeps the groups, and groups of one expert are allowed (a group is
        // scored by its best).
        let grouped = with(&v2_tiny(), |m| {
            m.insert("topk_method".into(), "group_limited_greedy".into());
            m.insert("n_group".into(), 8.into());
            m.insert("topk_group".into(), 3.into());
        });
        let g = ModelConfig::from_json_str(&grouped, "config.json").unwrap();
        assert_eq!((g.scoring, g.n_group, g.topk_group), (Scoring::Softmax, 8, 3));
        // Both round-trip through the hub spelling (what a manifest records).
        for c in [c, g] {
            let text = c.to_hf_json().to_string();
            assert!(text.contains("\"model_type\":\"deepseek_v2\"") && text.contains("\"scoring_func\":\"softmax\""));
            let back = ModelConfig::from_json_str(&text, "config.json").unwrap();
            assert_eq!(ModelConfig { name: c.name.clone(), ..back }, c);
        }
        // DeepSeek-V3's stays sigmoid.
        assert_eq!(ModelConfig::preset("deepseek-v3").unwrap().scoring, Scoring::Sigmoid);
    }

    #[test]
    fn hf_json_round_trips() {
        for name in PRESETS {
            let c = ModelConfig::preset(name).unwrap();
            let mut back = ModelConfig::from_json_str(&c.to_hf_json().to_string(), name).unwrap();
            back.name = c.name.clone();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn unknown_preset_lists_the_built_in_ones() {
        let e = ModelConfig::preset("deepseek-v4").unwrap_err().to_string();
        assert!(e.contains("unknown model (built-in: deepseek-v3, deepseek-v3-tiny"), "{e}");
    }
}
