//! Autotuning of the MLA attention kernels ([`crate::conversion::sm90::mla`]): the split-K decode
//! over the paged latent cache and the causal flash-attention prefill — inference's, and a training
//! step's forward with its log-sum-exps and its three gradient kernels (dQ, dK, dV).
//!
//! At a model's widths the field these templates leave free is the depth of their TMA ring
//! (`stages`: page buffers for decode, key/value tile buffers for prefill); the space is every depth
//! that fits shared memory ([`candidates`]), for decode whose heads pair its blocks (128 heads)
//! each depth in clusters of 2 and without, and for decode's bf16 cache two buffers or more with
//! the page loop a page ahead and serial ([`MlaDecodeConfig::serial`]). Decode's K splits are not a kernel field: the runtime
//! picks them per run from the batch and the SMs ([`v3c_runtime::lowering::attention_splits`]), and
//! the cost model uses the same rule.
//!
//! The cost model ([`estimate`]) is a per-block pipeline model, not a simulator. A block walks its
//! pages (decode) or key tiles (prefill); per step it loads the tile (decode: from DRAM at an SM's
//! share of the bandwidth, in a cluster its half of the page; prefill: the head's keys and values
//! stay in L2 across its query tiles),
//! runs the tensor-core products (decode: `S = Q K^T` in the first warpgroup, then `P V` in both;
//! a page ahead, the softmax behind `P V`;
//! prefill: both warpgroups' 64 query rows, the forward's softmax (dV's P) a tile ahead behind `P V`
//! (`P^T dout`)) at the SM's share of the dense bf16 peak times the
//! efficiency of each product's wgmma width ([`super::wgmma_width_efficiency`]), and the online
//! softmax (and the fp8 cache's conversion) on the CUDA cores. A ring that loads no step ahead
//! (one buffer; or two in a loop a step ahead, whose next tile's buffer is busy for two steps:
//! [`AttentionConfig::loads_ahead`]) waits for every load in full, its latency too; one that loads
//! ahead hides it behind the previous steps' work, all but a residue that shrinks with the steps. Blocks per SM come from shared memory, threads and a lower bound on registers (the
//! f32 accumulators and scores each thread holds). Decode: waves of (sequence, 64 heads, split)
//! blocks against the DRAM time of the cache; prefill: the causal triangle's tiles spread over the
//! SMs, bounded below by the longest block (the last query tile). The gradients walk the same
//! triangle (dK's and dV's blocks take 128 keys and stream the queries after them: the first key
//! tile's block is the longest), their steps' products as FlashAttention-2's backward computes them:
//! S and dP, then dQ or dK (dV: S, then dV), the tile streamed being queries and the output gradient
//! for dK and dV. Its figures rank, the database's measured timings win over it.

use super::db::{self, Tunable};
use super::{m_bucket, Choice, DECODE_M, PREFILL_M};
use crate::conversion::sm90::lower::{MlaDecodeLaunch, MlaPrefillLaunch};
use crate::conversion::sm90::mla::{FlashMode, GradOf, MlaDecodeConfig, MlaPrefillConfig, PAGE};
use crate::target::{DeviceModel, GpuTarget};

/// Keys per sequence the decode kernel is tuned at (FlashMLA's benchmark point, with
/// [`DECODE_M`] sequences).
pub const DECODE_CONTEXT: usize = 4096;

/// An attention problem as the tuner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionShape {
    /// Absorbed decode: `sequences` of one new token, `heads` query rows each, over `context` keys
    /// of `kv + rope` columns (bf16 pages, or the fp8 cache's rows).
    Decode { heads: usize, kv: usize, rope: usize, fp8_cache: bool, sequences: usize, context: usize },
    /// Causal prefill of `tokens` queries over as many keys, per head `qk`-wide queries and keys and
    /// `v`-wide values: the kernel `mode` says (inference's forward, a training step's forward with
    /// log-sum-exps, or one of its gradients).
    Prefill { heads: usize, qk: usize, v: usize, tokens: usize, mode: FlashMode },
    /// Attention over each query's selected rows (DeepSeek-V3.2's, the `_sel` kernel): `tokens`
    /// queries of `heads` rows each, each over `keys` rows of `kv + rope` columns that the kernel
    /// gathers (f32 rows, rounded to bf16 into shared memory; `bf16_rows`: bf16 rows, copied) —
    /// prefill's from the rows all select from, decode's each from its sequence's cache. One
    /// kernel: nothing to tune, a cost to report.
    Selected { heads: usize, kv: usize, rope: usize, tokens: usize, keys: usize, prefill: bool, bf16_rows: bool },
}

impl AttentionShape {
    /// The decode launch's problem at `sequences` sequences of [`DECODE_CONTEXT`] keys, or of the
    /// selection's width where one bounds them; the `_sel` kernel's at `sequences` queries.
    pub fn decode(launch: &MlaDecodeLaunch, sequences: usize) -> AttentionShape {
        let c = &launch.config;
        let (heads, kv, rope) = (launch.heads, c.kv, c.rope);
        let context = launch.selection.map_or(DECODE_CONTEXT, |s| s.keys);
        match (c.selected, launch.selection) {
            (true, Some(s)) => AttentionShape::Selected {
                heads,
                kv,
                rope,
                tokens: sequences,
                keys: s.keys,
                prefill: s.prefill,
                bf16_rows: c.bf16_rows,
            },
            _ => AttentionShape::Decode { heads, kv, rope, fp8_cache: c.fp8_cache, sequences, context },
        }
    }

    /// The prefill launch's problem over `tokens` tokens.
    pub fn prefill(launch: &MlaPrefillLaunch, tokens: usize) -> AttentionShape {
        let c = &launch.config;
        AttentionShape::Prefill { heads: launch.heads, qk: c.qk, v: c.v, tokens, mode: c.mode }
    }

    /// The problem of the launch `kernel` if it is attention, at the regime's size (decode:
    /// [`DECODE_M`] sequences, prefill: [`PREFILL_M`] tokens).
    pub fn of_step(kernel: &crate::conversion::sm90::lower::StepKernel) -> Option<AttentionShape> {
        use crate::conversion::sm90::lower::StepKernel;
        match kernel {
            // V3.2's prefill over its selected rows at prefill's tokens.
            StepKernel::MlaDecode(a) if a.selection.is_some_and(|s| s.prefill) => {
                Some(AttentionShape::decode(a, PREFILL_M))
            }
            StepKernel::MlaDecode(a) => Some(AttentionShape::decode(a, DECODE_M)),
            // Training's at its windows of PREFILL_M tokens too.
            StepKernel::MlaPrefill(a) => Some(AttentionShape::prefill(a, PREFILL_M)),
            StepKernel::Row(_) | StepKernel::Gemm(_) => None,
        }
    }

    /// What the tuning database keys it by (with [`Self::bucket`]): `mla_decode kv512 r64 h128`
    /// (` fp8cache`; ` k2048` over a selection's 2048 keys, not [`DECODE_CONTEXT`]'s), `mla_prefill
    /// qk192 v128 h128`; training's `mla_prefill_lse ...`, `mla_gradq ...`, `mla_gradk ...`,
    /// `mla_gradv ...`; `mla_decode_sel kv512 r64 h128 k2048` (the selected rows'; ` bf16rows`:
    /// of bf16 rows).
    pub fn signature(&self) -> String {
        match *self {
            AttentionShape::Decode { heads, kv, rope, fp8_cache, context, .. } => {
                let keys = if context != DECODE_CONTEXT { format!(" k{context}") } else { String::new() };
                format!("mla_decode kv{kv} r{rope} h{heads}{}{keys}", if fp8_cache { " fp8cache" } else { "" })
            }
            AttentionShape::Selected { heads, kv, rope, keys, bf16_rows, .. } => {
                format!("mla_decode_sel kv{kv} r{rope} h{heads} k{keys}{}", if bf16_rows { " bf16rows" } else { "" })
            }
            AttentionShape::Prefill { heads, qk, v, mode, .. } => {
                let kernel = match mode {
                    FlashMode::Forward => "mla_prefill",
                    FlashMode::Lse => "mla_prefill_lse",
                    FlashMode::Grad(GradOf::Queries) => "mla_gradq",
                    FlashMode::Grad(GradOf::Keys) => "mla_gradk",
                    FlashMode::Grad(GradOf::Values) => "mla_gradv",
                };
                format!("{kernel} qk{qk} v{v} h{heads}")
            }
        }
    }

    /// Its dynamic dim: sequences (decode) or tokens (prefill).
    pub fn rows(&self) -> usize {
        match *self {
            AttentionShape::Decode { sequences, .. } => sequences,
            AttentionShape::Prefill { tokens, .. } | AttentionShape::Selected { tokens, .. } => tokens,
        }
    }

    /// The database's bucket of [`Self::rows`].
    pub fn bucket(&self) -> usize {
        m_bucket(self.rows())
    }

    /// `decode` or `prefill`.
    pub fn regime(&self) -> &'static str {
        match self {
            AttentionShape::Decode { .. } | AttentionShape::Selected { prefill: false, .. } => "decode",
            AttentionShape::Prefill { .. } | AttentionShape::Selected { prefill: true, .. } => "prefill",
        }
    }

    /// The same decode over the fp8 cache's rows, where the kernel takes them (None: not decode, or
    /// already fp8, or widths the fp8 rows do not take).
    pub fn fp8_cache(&self, target: &GpuTarget) -> Option<AttentionShape> {
        let AttentionShape::Decode { heads, kv, rope, fp8_cache: false, sequences, context } = *self else {
            return None;
        };
        let shape = AttentionShape::Decode { heads, kv, rope, fp8_cache: true, sequences, context };
        let rows = v3c_runtime::plan::Fp8LatentRow::of(kv + rope).is_some_and(|r| r.latent == kv);
        (rows && !candidates(&shape, target).is_empty()).then_some(shape)
    }

    /// Which flash kernel a prefill problem's is, as the runtime launches it (decode: None).
    pub fn flash_kind(&self) -> Option<v3c_runtime::abi::FlashKind> {
        match self.config(1) {
            AttentionConfig::Prefill(c) => Some(c.flash_kind()),
            AttentionConfig::Decode(_) => None,
        }
    }

    /// Its kernel with a ring of `stages` buffers (decode: in clusters where its heads allow them,
    /// [`MlaDecodeConfig::cluster_for`]).
    pub fn config(&self, stages: usize) -> AttentionConfig {
        match *self {
            AttentionShape::Decode { heads, kv, rope, fp8_cache, .. } => {
                let cluster = MlaDecodeConfig::cluster_for(heads);
                AttentionConfig::Decode(MlaDecodeConfig {
                    kv,
                    rope,
                    stages,
                    fp8_cache,
                    cluster,
                    serial: false,
                    selected: false,
                    bf16_rows: false,
                })
            }
            AttentionShape::Prefill { qk, v, mode, .. } => {
                AttentionConfig::Prefill(MlaPrefillConfig { qk, v, stages, mode })
            }
            AttentionShape::Selected { kv, rope, bf16_rows, .. } => AttentionConfig::Decode(MlaDecodeConfig {
                kv,
                rope,
                stages,
                bf16_rows,
                ..MlaDecodeConfig::DEEPSEEK_V32_SELECTED
            }),
        }
    }

    /// Its kernels with a ring of `stages` buffers: [`Self::config`], and for decode the same
    /// without clusters (where it takes them) and with the serial page loop (a ring of two or more
    /// bf16 page buffers: [`MlaDecodeConfig::serial`]).
    pub fn configs(&self, stages: usize) -> Vec<AttentionConfig> {
        match self.config(stages) {
            AttentionConfig::Decode(c) if !c.selected => {
                let clusters = if c.cluster > 1 { vec![1, c.cluster] } else { vec![1] };
                let serial = if stages >= 2 && !c.fp8_cache { vec![false, true] } else { vec![false] };
                serial
                    .iter()
                    .flat_map(|&serial| {
                        clusters
                            .iter()
                            .map(move |&cluster| AttentionConfig::Decode(MlaDecodeConfig { cluster, serial, ..c }))
                    })
                    .collect()
            }
            config => vec![config],
        }
    }
}

/// An attention kernel's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionConfig {
    Decode(MlaDecodeConfig),
    Prefill(MlaPrefillConfig),
}

impl AttentionConfig {
    pub fn kernel_name(&self) -> String {
        match self {
            AttentionConfig::Decode(c) => c.kernel_name(),
            AttentionConfig::Prefill(c) => c.kernel_name(),
        }
    }

    pub fn stages(&self) -> usize {
        match self {
            AttentionConfig::Decode(c) => c.stages,
            AttentionConfig::Prefill(c) => c.stages,
        }
    }

    /// Steps its ring loads ahead of the one a block waits for next
    /// ([`MlaDecodeConfig::loads_ahead`], [`MlaPrefillConfig::loads_ahead`]).
    pub fn loads_ahead(&self) -> usize {
        match self {
            AttentionConfig::Decode(c) => c.loads_ahead(),
            AttentionConfig::Prefill(c) => c.loads_ahead(),
        }
    }

    pub fn shared_memory_bytes(&self) -> usize {
        match self {
            AttentionConfig::Decode(c) => c.shared_memory_bytes(),
            AttentionConfig::Prefill(c) => c.shared_memory_bytes(),
        }
    }

    pub fn threads(&self) -> usize {
        match self {
            AttentionConfig::Decode(c) => c.threads(),
            AttentionConfig::Prefill(c) => c.threads(),
        }
    }

    /// Registers a thread needs at least: its share of the f32 output accumulators (decode: a
    /// warpgroup's 64 rows x `kv / 2` columns; prefill: 64 rows x `v`; dQ and dK: 64 x `qk`; dV:
    /// 64 x `v`) and of the 64 x 64 scores (dQ and dK: dP's too), plus the addresses, softmax state
    /// and loop counters (48; ptxas reports the real count, e.g. 254 for DeepSeek-V3's decode, 164
    /// for its prefill and 194 for dK).
    pub fn registers_at_least(&self) -> usize {
        let warpgroup = 128;
        let (accumulators, score_tiles) = match self {
            AttentionConfig::Decode(c) => (PAGE * c.kv / 2 / warpgroup, 1),
            AttentionConfig::Prefill(c) => match c.mode {
                FlashMode::Forward | FlashMode::Lse => (PAGE * c.v / warpgroup, 1),
                FlashMode::Grad(GradOf::Queries | GradOf::Keys) => (PAGE * c.qk / warpgroup, 2),
                FlashMode::Grad(GradOf::Values) => (PAGE * c.v / warpgroup, 1),
            },
        };
        accumulators + score_tiles * PAGE * PAGE / warpgroup + 48
    }
}

impl Tunable for AttentionConfig {
    fn from_name(name: &str) -> Option<AttentionConfig> {
        MlaDecodeConfig::from_name(name)
            .map(AttentionConfig::Decode)
            .or_else(|| MlaPrefillConfig::from_name(name).map(AttentionConfig::Prefill))
    }

    fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        match self {
            AttentionConfig::Decode(c) => c.validate(target),
            AttentionConfig::Prefill(c) => c.validate(target),
        }
    }
}

/// Every ring depth of `shape`'s kernel that fits `target` (decode whose heads allow clusters:
/// each with and without them).
pub fn candidates(shape: &AttentionShape, target: &GpuTarget) -> Vec<AttentionConfig> {
    (1..=4).flat_map(|stages| shape.configs(stages)).filter(|c| c.validate(target).is_ok()).collect()
}

/// The cost model's view of one configuration on one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionEstimate {
    pub config: AttentionConfig,
    /// Blocks of the launch (decode: with its K splits) and the splits (prefill: 1).
    pub blocks: usize,
    pub splits: usize,
    /// Blocks resident per SM (shared memory, threads, registers).
    pub per_sm: usize,
    /// Microseconds of one step (a page or a key/value tile) of one block, at `per_sm` blocks.
    pub step_us: f64,
    pub micros: f64,
    /// `compute` (the blocks' pipelines) or `memory` (DRAM).
    pub bound: &'static str,
}

/// Fixed cost of a launch, and of a wave of blocks (prologue: the query tile; epilogue), in
/// microseconds (as the GEMM model's).
const LAUNCH_US: f64 = 4.0;
const WAVE_US: f64 = 1.0;
/// CUDA-core operations per microsecond on one SM (128 FP32 lanes near 1.8 GHz).
const CUDA_OPS_PER_SM_US: f64 = 128.0 * 1.8e3;
/// Operations per score of the online softmax (scale, mask, running max, exp2, sum, bf16 P store)
/// and per latent element of the fp8 cache's conversion (cvt, scale, cvt, shared store).
const SOFTMAX_OPS: f64 = 12.0;
const FP8_CONVERT_OPS: f64 = 4.0;
/// Operations per f32 element the selected rows' gather spends (its share of a 16-byte load, the
/// position's and entry's arithmetic, the bf16 rounding, the swizzled store).
const GATHER_OPS: f64 = 3.0;
/// L2's bandwidth as a multiple of DRAM's (what prefill's re-read keys and values stream at).
const L2_PER_DRAM: f64 = 2.5;
/// The share of a step's load a ring loading one step ahead leaves exposed (further ahead:
/// divided by the steps).
const EXPOSED_AT_TWO: f64 = 0.3;
/// The latency of a step's load waited for in full (a ring that loads no step ahead), before its
/// bytes stream: a TMA load's from DRAM (decode's pages) or from L2 (prefill's tiles).
const DRAM_LATENCY_US: f64 = 0.6;
const L2_LATENCY_US: f64 = 0.3;

/// The cost model (see the module doc) for `config` on `shape` on `device`.
pub fn estimate(shape: &AttentionShape, config: &AttentionConfig, device: &DeviceModel) -> AttentionEstimate {
    let sms = device.sm_count as usize;
    let target = &device.target;
    let smem = config.shared_memory_bytes() + crate::conversion::sm90::gemm::STATIC_SHARED_BYTES;
    let registers = target.registers_per_sm as usize / (config.threads() * config.registers_at_least());
    let per_sm = (target.shared_memory_per_sm as usize / smem).min(2048 / config.threads()).min(registers).max(1);
    let slots = sms * per_sm;
    // Per microsecond of one of the SM's `per_sm` blocks: tensor-core FLOPs at the peak,
    // CUDA-core operations. A product's time: its FLOPs over the peak times the efficiency of
    // the wgmma width it runs at.
    let flops_us = device.bf16_tflops * 1e6 / sms as f64 / per_sm as f64;
    let tensor_us = |products: &[(usize, usize)]| -> f64 {
        products.iter().map(|&(flops, n)| flops as f64 / (flops_us * super::wgmma_width_efficiency(n))).sum()
    };
    let ops_us = CUDA_OPS_PER_SM_US / per_sm as f64;
    let dram_us = device.dram_tbps * 1e6;
    // One step of a block's pipeline: the load waited for in full, its latency too (a ring that
    // loads no step ahead: one buffer, or a loop a step ahead in two), or hidden behind the
    // steps before it but for a residue.
    let ahead = config.loads_ahead();
    // The launch: its pipelines' time or its DRAM traffic's, whichever is longer.
    let finish = |blocks: usize, splits: usize, step_us: f64, compute: f64, memory: f64| AttentionEstimate {
        config: *config,
        blocks,
        splits,
        per_sm,
        step_us,
        micros: compute.max(memory) + LAUNCH_US,
        bound: if compute >= memory { "compute" } else { "memory" },
    };
    let step = |latency: f64, load: f64, work: f64| match ahead {
        0 => latency + load + work,
        a => work.max(load) + EXPOSED_AT_TWO / a as f64 * load.min(work),
    };
    match *shape {
        AttentionShape::Decode { heads, kv, rope, fp8_cache, sequences, context } => {
            let width = kv + rope;
            let row_bytes = match fp8_cache {
                true => v3c_runtime::plan::Fp8LatentRow::of(width).map_or(width, |r| r.bytes()),
                false => 2 * width,
            };
            let splits = v3c_runtime::lowering::attention_splits(sequences, heads, context, sms);
            let blocks = sequences * heads.div_ceil(PAGE) * splits;
            let pages = context.div_ceil(PAGE).div_ceil(splits);
            // Warpgroup 0 scores the page's keys (m64n64) and runs the softmax; both multiply P by
            // their halves of the values' columns (one m64n<kv / 2> a k16 step). A page ahead
            // (pipelined), warpgroup 0's softmax runs while the tensor cores multiply: it hides
            // behind up to half of `P V` (warpgroup 1's half starts with the next page's S).
            let (scores, values) = ((2 * PAGE * PAGE * width, PAGE), (2 * PAGE * PAGE * kv, (kv / 2).min(256)));
            let convert = if fp8_cache { (PAGE * kv) as f64 * FP8_CONVERT_OPS } else { 0.0 };
            let softmax = (PAGE * PAGE) as f64 * SOFTMAX_OPS / ops_us;
            let hidden = match config {
                AttentionConfig::Decode(c) if c.pipelined() => softmax.min(tensor_us(&[values]) / 2.0),
                _ => 0.0,
            };
            let work = tensor_us(&[scores, values]) + softmax - hidden + convert / ops_us;
            // A page from DRAM at the SM's share of the bandwidth, split among its blocks; in a
            // cluster each block loads its share of the page (multicast into both).
            let cluster = match config {
                AttentionConfig::Decode(c) => c.cluster,
                AttentionConfig::Prefill(_) => 1,
            };
            let load = (PAGE * row_bytes / cluster) as f64 / (dram_us / sms as f64 / per_sm as f64);
            let step_us = step(DRAM_LATENCY_US, load, work);
            let waves = blocks.div_ceil(slots);
            let compute = waves as f64 * (pages as f64 * step_us + WAVE_US);
            // The cache once (the heads' blocks of a sequence share its pages in L2), the queries,
            // the splits' outputs.
            let bytes = (sequences * context * row_bytes) as f64
                + (sequences * heads * width * 2) as f64
                + (splits * sequences * heads * (kv + 1) * 4) as f64;
            let memory = bytes / dram_us;
            finish(blocks, splits, step_us, compute, memory)
        }
        AttentionShape::Prefill { heads, qk, v, tokens, mode } => {
            let queries = 2 * PAGE;
            let tiles = tokens.div_ceil(queries);
            let key_tiles = tokens.div_ceil(PAGE);
            // Query tile i sees the keys up to its last query: its key tiles (dK's and dV's key tile
            // i from the last sees as many query tiles: the same triangle).
            let steps_of = |i: usize| ((i + 1) * queries).div_ceil(PAGE).min(key_tiles);
            let all_steps: usize = heads * (0..tiles).map(steps_of).sum::<usize>();
            let longest = steps_of(tiles.saturating_sub(1));
            // A step's products (the FLOPs' reduction width, the wgmma's N): S = Q K^T (m64n64),
            // then P V (forward: one m64n<v> a k16 step), dP = dO V^T (m64n64) and dS K (dQ:
            // m64n<qk>) or dS^T Q (dK: m64n<qk>), P^T dO (dV: m64n<v>).
            let widths: &[(usize, usize)] = match mode {
                FlashMode::Forward | FlashMode::Lse => &[(qk, PAGE), (v, v)],
                FlashMode::Grad(GradOf::Queries) => &[(qk, PAGE), (v, PAGE), (qk, qk)],
                FlashMode::Grad(GradOf::Keys) => &[(qk, PAGE), (v, PAGE), (qk, qk)],
                FlashMode::Grad(GradOf::Values) => &[(qk, PAGE), (v, v)],
            };
            let products: Vec<(usize, usize)> =
                widths.iter().map(|&(k, n)| (2 * queries * PAGE * k, n.min(256))).collect();
            // A tile ahead (the forward's and dV's, pipelined), the next tile's softmax (P) runs
            // while P V (P^T dout) multiplies.
            let softmax = (queries * PAGE) as f64 * SOFTMAX_OPS / ops_us;
            let hidden = match config {
                AttentionConfig::Prefill(c) if c.pipelined() => softmax.min(tensor_us(&products[1..])),
                _ => 0.0,
            };
            let work = tensor_us(&products) + softmax - hidden;
            let l2_us = dram_us * L2_PER_DRAM / sms as f64 / per_sm as f64;
            let load = (PAGE * (qk + v) * 2) as f64 / l2_us;
            let step_us = step(L2_LATENCY_US, load, work);
            let blocks = tiles * heads;
            let compute = (all_steps as f64 * step_us / slots as f64).max(longest as f64 * step_us)
                + blocks.div_ceil(slots) as f64 * WAVE_US;
            // Queries, keys and values once (a gradient's output gradient too, and two statistics a
            // query), the f32 output (the log-sum-exps).
            let (read, written) = match mode {
                FlashMode::Forward => (2 * (2 * qk + v), 4 * v),
                FlashMode::Lse => (2 * (2 * qk + v), 4 * (v + 1)),
                FlashMode::Grad(of) => {
                    let width = if of == GradOf::Values { v } else { qk };
                    (2 * (2 * qk + 2 * v) + 8, 4 * width)
                }
            };
            let bytes = (heads * tokens * (read + written)) as f64;
            let memory = bytes / dram_us;
            finish(blocks, 1, step_us, compute, memory)
        }
        AttentionShape::Selected { heads, kv, rope, tokens, keys, prefill, bf16_rows } => {
            let width = kv + rope;
            let splits = v3c_runtime::lowering::attention_splits(tokens, heads, keys.next_multiple_of(PAGE), sms);
            let blocks = tokens * heads.div_ceil(PAGE) * splits;
            let pages = keys.div_ceil(PAGE).div_ceil(splits);
            // Decode's products and softmax a page; warpgroup 1 gathers the next page meanwhile:
            // its rows from L2 (the keys' rows stay there across the queries) into shared memory
            // on its half of the CUDA cores (f32 rows rounded to bf16 on the way, bf16 rows half
            // the bytes and copied), hidden behind warpgroup 0's scores and softmax but for what
            // they leave of it; then both multiply P V.
            let (scores, values) = ((2 * PAGE * PAGE * width, PAGE), (2 * PAGE * PAGE * kv, (kv / 2).min(256)));
            let softmax = (PAGE * PAGE) as f64 * SOFTMAX_OPS / ops_us;
            let l2_us = dram_us * L2_PER_DRAM / sms as f64 / per_sm as f64;
            // (A 16-byte load's arithmetic and store serve 8 bf16 columns, or 4 f32 ones.)
            let row_bytes = if bf16_rows { 2 } else { 4 };
            let gather = (PAGE * width * row_bytes) as f64 / l2_us
                + (PAGE * width * row_bytes / 4) as f64 * GATHER_OPS / (ops_us / 2.0);
            let step_us = (tensor_us(&[scores]) + softmax).max(gather) + tensor_us(&[values]);
            let compute = blocks.div_ceil(slots) as f64 * (pages as f64 * step_us + WAVE_US);
            // From DRAM: the key rows once (prefill: about a row a query; decode: each query's own
            // rows, its heads' blocks reading them from L2 after the first), the queries, the
            // splits' outputs.
            let rows = if prefill { tokens } else { tokens * keys };
            let bytes = (rows * width * row_bytes) as f64
                + (tokens * heads * width * 2) as f64
                + (splits * tokens * heads * (kv + 1) * 4) as f64;
            let memory = bytes / dram_us;
            finish(blocks, splits, step_us, compute, memory)
        }
    }
}

/// The candidates for `shape` ranked by the cost model, fastest first (ties: the shallower ring,
/// which leaves shared memory to spare).
pub fn rank(shape: &AttentionShape, device: &DeviceModel) -> Vec<AttentionEstimate> {
    let mut all: Vec<AttentionEstimate> =
        candidates(shape, &device.target).iter().map(|c| estimate(shape, c, device)).collect();
    all.sort_by(|a, b| a.micros.total_cmp(&b.micros).then_with(|| a.config.stages().cmp(&b.config.stages())));
    all
}

/// The candidate set's checksum (see [`super::candidates_sha256`]).
pub fn candidates_sha256(configs: &[AttentionConfig]) -> String {
    let mut names: Vec<String> = configs.iter().map(AttentionConfig::kernel_name).collect();
    names.sort();
    v3c_runtime::artifact::sha256_hex(names.join("\n").as_bytes())
}

/// Configurations to try for `shape` on `device`, best first: a measured database entry when one
/// applies, then the cost model's order.
pub fn choose(shape: &AttentionShape, device: &DeviceModel, db: Option<&db::TuningDb>) -> Choice<AttentionConfig> {
    let ranked = rank(shape, device);
    let preferences: Vec<AttentionConfig> = ranked.iter().map(|e| e.config).collect();
    let model = ranked.first().map_or_else(
        || "cost model: no candidate".to_string(),
        |e| format!("cost model: {:.1} us est., {}-bound", e.micros, e.bound),
    );
    let problem = super::Problem { signature: shape.signature(), bucket: shape.bucket(), device };
    let sha = || candidates_sha256(&candidates(shape, &device.target));
    let implements = |c: &AttentionConfig| shape.configs(c.stages()).contains(c);
    super::decide(preferences, model, db, &problem, sha, implements, AttentionConfig::kernel_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(fp8_cache: bool, sequences: usize) -> AttentionShape {
        AttentionShape::Decode { heads: 128, kv: 512, rope: 64, fp8_cache, sequences, context: DECODE_CONTEXT }
    }

    fn prefill(tokens: usize) -> AttentionShape {
        flash(tokens, FlashMode::Forward)
    }

    fn flash(tokens: usize, mode: FlashMode) -> AttentionShape {
        AttentionShape::Prefill { heads: 128, qk: 192, v: 128, tokens, mode }
    }

    #[test]
    fn the_space_is_every_ring_depth_that_fits_shared_memory() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let names = |s: &AttentionShape| -> Vec<String> {
            candidates(s, &h200.target).iter().map(AttentionConfig::kernel_name).collect()
        };
        // DeepSeek-V3's decode: the query tile and a page are 72 KiB each: two pages at most; its
        // 128 heads' blocks of a sequence in clusters of 2 or not; two pages a page ahead or in
        // the serial loop (the fp8 cache's is serial).
        let (s1, s2) = ("mla_decode_kv512_r64_p64_s1", "mla_decode_kv512_r64_p64_s2");
        let space =
            [s1, &format!("{s1}_cl2"), s2, &format!("{s2}_cl2"), &format!("{s2}_serial"), &format!("{s2}_cl2_serial")];
        assert_eq!(names(&decode(false, 64)), space);
        let fp8: Vec<String> = space[..4].iter().map(|n| format!("{n}_fp8")).collect();
        assert_eq!(names(&decode(true, 64)), fp8);
        for shape in [decode(false, 64), decode(true, 64)] {
            for c in candidates(&shape, &h200.target) {
                assert_eq!(AttentionConfig::from_name(&c.kernel_name()), Some(c));
                assert!(shape.configs(c.stages()).contains(&c), "{}", c.kernel_name());
            }
        }
        assert_eq!(names(&prefill(4096)).len(), 4);
        assert_eq!(decode(false, 64).signature(), "mla_decode kv512 r64 h128");
        assert_eq!(decode(true, 64).signature(), "mla_decode kv512 r64 h128 fp8cache");
        assert_eq!(prefill(4096).signature(), "mla_prefill qk192 v128 h128");
        assert_eq!((decode(false, 50).bucket(), prefill(3000).bucket()), (64, 4096));
        // A narrow head whose ring fits three deep; 16 heads: one block a sequence, no clusters.
        let small =
            AttentionShape::Decode { heads: 16, kv: 128, rope: 64, fp8_cache: false, sequences: 4, context: 64 };
        assert_eq!(names(&small).len(), 7);
        assert!(names(&small).iter().all(|n| !n.contains("_cl")), "{:?}", names(&small));
        for c in candidates(&prefill(4096), &h200.target) {
            assert_eq!(AttentionConfig::from_name(&c.kernel_name()), Some(c));
        }
    }

    /// A training step's flash kernels at DeepSeek-V3's heads: each its own signature and space —
    /// dQ's and dK's own tiles (queries or keys with the output gradient or values, 80 KiB) leave
    /// room for three ring buffers, dV's and the forward's for four —, ranked by the same pipeline
    /// model: deeper first, the gradients' steps costlier than the forward's.
    #[test]
    fn the_training_flash_kernels_are_tuned_like_the_forward() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let modes = [
            (FlashMode::Lse, "mla_prefill_lse qk192 v128 h128", 4),
            (FlashMode::Grad(GradOf::Queries), "mla_gradq qk192 v128 h128", 3),
            (FlashMode::Grad(GradOf::Keys), "mla_gradk qk192 v128 h128", 3),
            (FlashMode::Grad(GradOf::Values), "mla_gradv qk192 v128 h128", 4),
        ];
        let forward = rank(&prefill(4096), &h200)[0].clone();
        for (mode, signature, depths) in modes {
            let shape = flash(4096, mode);
            assert_eq!(shape.signature(), signature);
            let space = candidates(&shape, &h200.target);
            assert_eq!(space.len(), depths, "{signature}");
            for c in &space {
                assert_eq!(AttentionConfig::from_name(&c.kernel_name()), Some(*c));
                assert_eq!(*c, shape.config(c.stages()), "{signature}: {}", c.kernel_name());
            }
            let ranked = rank(&shape, &h200);
            let stages: Vec<usize> = ranked.iter().map(|e| e.config.stages()).collect();
            assert_eq!(stages, (1..=depths).rev().collect::<Vec<_>>(), "{signature}");
            let best = &ranked[0];
            assert_eq!((best.blocks, best.bound), (forward.blocks, "compute"), "{signature}");
            // dV's steps multiply as many tiles as the forward's (S, then P^T dO).
            let slower = if matches!(mode, FlashMode::Lse | FlashMode::Grad(GradOf::Values)) { 1.0 } else { 1.2 };
            assert!(best.micros >= forward.micros * slower, "{signature}: {best:?} vs {forward:?}");
        }
        // dQ's and dK's steps multiply three tiles (S, dP, dQ or dK), dV's two.
        let step = |of| rank(&flash(4096, FlashMode::Grad(of)), &h200)[0].step_us;
        assert!(
            step(GradOf::Queries) > step(GradOf::Values) * 1.3,
            "{} {}",
            step(GradOf::Queries),
            step(GradOf::Values)
        );
    }

    #[test]
    fn the_model_hides_loads_behind_deeper_rings_and_counts_occupancy() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let d = rank(&decode(false, 64), &h200);
        let of = |ranked: &[AttentionEstimate], name: &str| {
            ranked.iter().find(|e| e.config.kernel_name() == name).unwrap_or_else(|| panic!("{name}")).clone()
        };
        let (s1, s2) = (of(&d, "mla_decode_kv512_r64_p64_s1"), of(&d, "mla_decode_kv512_r64_p64_s2_serial"));
        let ahead = of(&d, "mla_decode_kv512_r64_p64_s2");
        assert_eq!(d[0].config.kernel_name(), "mla_decode_kv512_r64_p64_s2_cl2_serial", "{d:?}");
        // 64 sequences x 2 blocks of 64 heads: one wave on 132 SMs, unsplit (the runtime's rule).
        assert_eq!((d[0].blocks, d[0].splits, d[0].per_sm), (128, 1, 1));
        assert!(s1.micros > s2.micros * 1.2, "one page buffer exposes every load: {d:?}");
        // Two buffers a page ahead load no page ahead: every load waited for, as with one buffer
        // (the softmax behind P V the difference).
        assert!(ahead.micros > s2.micros * 1.2 && ahead.micros < s1.micros, "{d:?}");
        // A cluster's blocks each load half of a page: a step loads in half the time.
        assert!(d[0].step_us < s2.step_us * 0.85, "{d:?}");
        // The fp8 cache moves 43% fewer bytes and converts them on the CUDA cores.
        let f = rank(&decode(true, 64), &h200);
        assert_eq!(f[0].config.kernel_name(), "mla_decode_kv512_r64_p64_s2_cl2_fp8", "{f:?}");
        let f2 = of(&f, "mla_decode_kv512_r64_p64_s2_fp8");
        assert!(f2.step_us > s2.step_us * 0.5 && f2.micros < s1.micros, "{f:?}");
        let p = rank(&prefill(4096), &h200);
        assert_eq!(p.iter().map(|e| e.config.stages()).collect::<Vec<_>>(), [4, 3, 2, 1]);
        // 164 registers a thread (ptxas): one block an SM even where shared memory holds two.
        assert!(p.iter().all(|e| e.per_sm == 1), "{p:?}");
        assert_eq!(p[0].bound, "compute");
        assert_eq!(p[0].blocks, 32 * 128);
        // Roughly the causal half of 2 x 128 x 4096^2 x 320 FLOPs at most of the tensor cores' peak.
        let flops = 128.0 * 4096.0 * 4096.0 * 320.0;
        let tflops = flops / (p[0].micros * 1e-6) / 1e12;
        assert!((300.0..900.0).contains(&tflops), "{tflops}");
        assert_eq!(rank(&prefill(4096), &h200), p, "deterministic");
    }

    /// DeepSeek-V3.2's attention over 2048 selected keys a query: decode's (V3's kernel over pages
    /// of them) keyed and costed at those keys, not V3's context; prefill's `_sel` kernel its one
    /// candidate, compute-bound at 4096 tokens, its FLOPs (scores and values of 2048 keys a head) at
    /// most of the tensor cores' peak.
    #[test]
    fn the_selected_rows_attention_is_costed_at_the_selections_keys() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let v32 =
            AttentionShape::Decode { heads: 128, kv: 512, rope: 64, fp8_cache: false, sequences: 64, context: 2048 };
        assert_eq!(v32.signature(), "mla_decode kv512 r64 h128 k2048");
        assert_eq!(decode(false, 64).signature(), "mla_decode kv512 r64 h128");
        let (short, long) = (rank(&v32, &h200)[0].micros, rank(&decode(false, 64), &h200)[0].micros);
        assert!(short < long * 0.7, "{short} vs {long}");
        let selected = |bf16_rows| AttentionShape::Selected {
            heads: 128,
            kv: 512,
            rope: 64,
            tokens: 4096,
            keys: 2048,
            prefill: true,
            bf16_rows,
        };
        let space = |s: &AttentionShape| -> Vec<String> {
            candidates(s, &h200.target).iter().map(AttentionConfig::kernel_name).collect()
        };
        let f32_rows = selected(false);
        assert_eq!(
            (f32_rows.signature(), f32_rows.regime()),
            ("mla_decode_sel kv512 r64 h128 k2048".into(), "prefill")
        );
        assert_eq!(space(&f32_rows), ["mla_decode_kv512_r64_p64_s2_sel"]);
        // Prefill's bf16 copy of the rows: half the gather's bytes, no rounding on the way.
        let shape = selected(true);
        assert_eq!(shape.signature(), "mla_decode_sel kv512 r64 h128 k2048 bf16rows");
        assert_eq!(space(&shape), ["mla_decode_kv512_r64_p64_s2_sel16"]);
        let e = &rank(&shape, &h200)[0];
        assert_eq!((e.blocks, e.splits, e.bound), (4096 * 2, 1, "compute"));
        let flops = 2.0 * 4096.0 * 128.0 * 2048.0 * (576.0 + 512.0);
        let tflops = flops / (e.micros * 1e-6) / 1e12;
        assert!((100.0..900.0).contains(&tflops), "{tflops}");
        let slower = rank(&f32_rows, &h200)[0].micros;
        assert!(e.micros < slower * 0.8, "{} vs {slower}", e.micros);
    }

    fn entry(shape: &AttentionShape, winner: &str, device: &DeviceModel) -> db::DbEntry {
        db::DbEntry {
            compiler_version: env!("CARGO_PKG_VERSION").into(),
            gpu: device.name.into(),
            compute_capability: (9, 0),
            kernel: shape.signature(),
            m_bucket: shape.bucket(),
            candidates_sha256: candidates_sha256(&candidates(shape, &device.target)),
            default_config: shape.config(2).kernel_name(),
            timings: vec![(shape.config(2).kernel_name(), 1.0), (winner.into(), 0.5)],
            rejected: vec![],
            measured_at: "now".into(),
            measured_on: "test".into(),
        }
    }

    #[test]
    fn a_measured_winner_comes_first_and_a_foreign_one_is_ignored() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let shape = prefill(4096);
        let mut db = db::TuningDb::new();
        db.insert(entry(&shape, "mla_prefill_qk192_v128_s1", &h200));
        let choice = choose(&shape, &h200, Some(&db));
        assert_eq!(choice.preferences[0].kernel_name(), "mla_prefill_qk192_v128_s1");
        assert_eq!(choice.preferences.len(), 4);
        assert!(choice.source.starts_with("tuning database: 0.5000 ms measured on H200"), "{}", choice.source);
        // Another kernel's winner filed under this signature.
        db.insert(entry(&shape, "mla_prefill_qk128_v128_s1", &h200));
        let choice = choose(&shape, &h200, Some(&db));
        assert!(choice.ignored.unwrap().contains("does not implement mla_prefill qk192 v128 h128"));
        assert_eq!(choice.preferences[0].stages(), 4);
        // A GEMM's winner does not parse as attention.
        let mut db = db::TuningDb::new();
        db.insert(entry(&shape, "gemm_fp8_f32_64x128x128_s4", &h200));
        assert_eq!(choose(&shape, &h200, Some(&db)).ignored.as_deref(), Some("no usable timing"));
        let h100 = DeviceModel::by_name("H100").unwrap();
        let choice = choose(&decode(false, 64), &h100, Some(&db));
        assert!(choice.source.ends_with("(no tuning database entry)"), "{}", choice.source);
    }
}
