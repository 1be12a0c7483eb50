//! Row kernels: one CTA per row of a `[rows, d]` activation, for the memory-bound ops between the
//! GEMMs: the embedding gather, and RMSNorm with its 1x128 e4m3 quantization (and/or its f32
//! output).
//!
//! One template, two lowerings. A row kernel is written as *phases*: per-thread bodies that use
//! `%tid` (the thread) and `%row`, and that communicate only through memory (the row's arrays in
//! shared memory, its results in global memory). On sm_90a ([`RowKernel::emit_gpu`]) the phases
//! are one `gpu.func` with a `gpu.barrier` between them (the block is `threads` wide, the grid one
//! block per row). On the CPU ([`RowKernel::emit_cpu`]) the same phase text runs inside
//! `scf.for %row`, then per phase `scf.for %tid` over every thread in turn, with the shared arrays
//! on the stack: because phases only exchange data through memory at the barriers, running the
//! threads of a phase one after the other computes what the block computes. That CPU lowering is
//! what the tests check against the reference interpreter.
//!
//! RMSNorm: phase 1 copies the row into shared memory and sums squares per thread (a strided
//! share of the columns, so the global loads coalesce); a tree over the threads' sums (log2
//! `threads` phases) gives the row's sum of squares; the next phase writes `w * (x * inv)` (the
//! reference's order) to the f32 output and/or back into shared memory; with quantization, each
//! group of 128 columns has its |max| taken in 4 parts by 4 threads, then one thread per group
//! finishes it, stores `max(amax, 1e-4) / 448` as the group's scale, and the last phase writes
//! every column's e4m3 byte (`x / scale`, round to nearest even, saturating).

use std::fmt::Write;

use v3c_models::interp::kernels::ROUTER_SPLITS;

mod index_mma;
pub use index_mma::IndexMma;
mod matmul;
mod mla_mma;
mod mla_train;
mod sample;
mod scores;
mod sparse;
mod train;
pub use sample::NUCLEUS_CAP;
pub use sparse::SparseRow;
pub use train::{Mla, TrainRow};

/// Columns per fp8 quantization group (the 1x128 activation scales).
pub const GROUP: usize = 128;
/// Threads that share one group's |max| (each scans `GROUP / AMAX_PARTS` columns).
const AMAX_PARTS: usize = 4;
/// The largest e4m3 magnitude.
const E4M3_MAX: f32 = 448.0;

/// Rows of a page of the paged latent cache the tensor-core decode attention reads.
pub const PAGE_ROWS: usize = 64;

/// Tokens one block of decode's per-head rows ([`RowOp::MlaAbsorb`], [`RowOp::MlaUpV`]) takes: each
/// of the head's kv_b weights is read once for all of them.
pub const HEAD_TOKENS: usize = 8;
/// Splits the combine ([`RowOp::MlaCombine`]) reads at a time: a thread's loads in flight.
const COMBINE_SPLITS: usize = 8;
/// Static shared memory a CTA may declare without opting in.
const STATIC_SHARED_LIMIT: usize = 48 * 1024;

/// How a latent cache stores its rows ([`RowOp::Latent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRows {
    F32,
    Bf16,
    /// [`v3c_runtime::plan::LATENT_FP8`]: e4m3 latent, power-of-two scales, bf16 RoPE key.
    Fp8,
}

impl CacheRows {
    /// The cache memref's element type.
    pub fn element(self) -> &'static str {
        match self {
            CacheRows::F32 => "f32",
            CacheRows::Bf16 => "bf16",
            CacheRows::Fp8 => "i8",
        }
    }

    /// Decode caches of these rows are a pool of pages the block table addresses (the tensor-core
    /// attention's): the decode latent row writes through the table.
    pub fn paged(self) -> bool {
        self != CacheRows::F32
    }

    /// The kernel name's suffix after `append` / `write`.
    fn suffix(self) -> &'static str {
        match self {
            CacheRows::F32 => "",
            CacheRows::Bf16 => "bf16",
            CacheRows::Fp8 => "fp8",
        }
    }
}

/// What a row kernel computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowOp {
    /// `out[r, :] = f32(table[ids[r], :])`. An id outside the table reads as a row of zeros
    /// (the runtime checks token ids before launching; the kernel never reads out of bounds).
    Embed,
    /// `y = w * (x / sqrt(mean(x^2) + eps))` per row; `keep`: y is a result (f32), `quantize`: its
    /// e4m3 bytes and 1x128 scales are results.
    RmsNorm { eps: f32, keep: bool, quantize: bool },
    /// MLA's latent-cache row: `concat(rms_norm(latent) * w, rope(k_pe))` (d + `rope` columns) at
    /// the token's position, the rope's cos/sin read from a table `[positions, rope]` (cos in the
    /// first half, sin in the second) that the runtime computes once, as the reference does.
    /// `append` (prefill): the output is `concat(cache [P, C], new rows)`, one block per output row
    /// (the first P copy); otherwise (decode) row b is written in place at `cache[b, position_b]`.
    /// Positions outside the table (or the cache) leave the row unwritten: the runtime rejects
    /// them before launching, as the CPU backend does. `cache`: how the caches store rows — f32,
    /// bf16 (the tensor-core attention's: each new value rounded to nearest even as stored), or
    /// fp8: the row's bytes as [`v3c_runtime::plan::Fp8LatentRow`] lays them out, the normalized
    /// latent quantized per 128 columns with power-of-two scales (prefill's old rows copied as bytes).
    Latent { eps: f32, rope: usize, interleave: bool, append: bool, cache: CacheRows },
    /// DeepSeek-V3.2's cache row, the latent row and the indexer's key in one launch:
    /// [`RowOp::Latent`]'s `concat(rms_norm(latent) * w, rope(k_pe))`, then `layer_norm(key) * kw +
    /// kb` (`key` columns; its mean and variance summed in column order by one thread, the
    /// reference's order, as [`SparseRow::LayerNorm`]'s) with its first `rope` columns rotated in
    /// halves (`rotate_half`), into `out [rows, d + rope + key]` (f32: the cache store is a kernel
    /// of its own). Both rotations read one table at the row's position; a position outside it
    /// leaves the row's rotated columns unwritten (the runtime rejects it before launching).
    LatentKey { eps: f32, rope: usize, interleave: bool, key: usize, key_eps: f32 },
    /// MLA's query heads out of the q_b GEMM: `y [rows, heads * (nope + rope)]` split per head into
    /// `q_nope [rows, heads, nope]` and `q_pe [rows, heads, rope]`, RoPE applied to q_pe at the
    /// row's position from the same table as [`RowOp::Latent`]. `d` is `heads * (nope + rope)`.
    SplitRope { heads: usize, nope: usize, rope: usize, interleave: bool },
    /// DeepSeek-V3.2's indexer queries out of the wq_b GEMM: `y [rows, heads * dim]` as `out
    /// [rows, heads, dim]` with each head's first `rope` columns rotated at the row's position
    /// (`interleave`: neighbours paired, else halves) from [`RowOp::SplitRope`]'s table, the rest
    /// copied. `d` is `heads * dim`. A position outside the table leaves the row unwritten.
    HeadsRope { heads: usize, rope: usize, interleave: bool },
    /// SwiGLU of a gate|up GEMM output: `x [rows, 2d]` -> `silu(x[:, :d]) * x[:, d:]`, as f32 `y`
    /// or (`quantize`) its 1x128 e4m3 bytes and scales.
    SiluMul { quantize: bool },
    /// `y = x` (f32 rows; e.g. the residual a scattering GEMM then adds into).
    Copy,
    /// The fp8 MoE's rows in expert order: sorted row r is token `sorted[r / W, r % W]`'s e4m3
    /// bytes `x [T, d]` and 1x128 scales `x_scale [T, ceil(d / 128)]` (`sorted [T, W]` from
    /// [`RowOp::Dispatch`], W the routed and shared experts a token takes), copied as they are into
    /// `q [T W, d]` and `scale [T W, ceil(d / 128)]` — a contiguous grouped GEMM's operand, one TMA box of
    /// a tile's rows a k step (gathering by token in the GEMM takes a TMA copy per row). One block
    /// per sorted row.
    GatherFp8,
    /// The router's logits in pieces (`d` = hidden): `parts [rows, S * experts]`, piece `s` of
    /// expert `e` at column `s * experts + e` the sequential sum of `x . gate^T` over the columns of
    /// split `s` of the reference's [`ROUTER_SPLITS`] (see [`v3c_models::interp::kernels::router_logits`]). A block
    /// takes `tokens` tokens, one split and [`ROUTE_EXPERT_TILE`] experts (each gate value read once
    /// for its tokens): decode's one token spreads over `S x experts / 64` blocks instead of one
    /// streaming the whole gate; prefill's [`ROUTE_TOKENS`] tokens read it once per 8 tokens.
    RouteLogits { experts: usize, tokens: usize },
    /// DeepSeek-V3's routing (`d` = experts) from [`RowOp::RouteLogits`]'s pieces, `tokens` tokens
    /// a block (prefill's [`ROUTE_TOKENS`], decode's one): each logit the pieces' sum in split order
    /// (the reference's bits), sigmoid scores `s`, selection on `s + bias` (groups scored by their
    /// top two, the best `topk_group` groups kept, then the best `top_k` experts in them; ties to
    /// the lower index), weights `s` of the chosen, normalized (`norm`) and scaled. Writes the
    /// experts `idx [rows, top_k]` (i32) and weights `w [rows, top_k]`.
    ///
    /// `pieces`: the pieces per logit in `parts [rows, pieces * experts]` — [`ROUTER_SPLITS`] from
    /// [`RowOp::RouteLogits`], or 1: whole logits (prefill's gate GEMM on the tensor cores).
    ///
    /// `softmax` (DeepSeek-V2, `_sm`): no bias argument; the scores are each token's softmax over
    /// its logits (a warp a token: the max and the sum by butterflies), the selection is on them and
    /// a group scores its best expert.
    Route {
        experts: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        norm: bool,
        scale: f32,
        tokens: usize,
        pieces: usize,
        softmax: bool,
    },
    /// The counting sort of the routed (token, expert) pairs by expert (one block; the pairs cut
    /// into chunks a thread each counts, then places in order): `offsets [experts + shared + 1]`, per sorted row its token
    /// `sorted [tokens, top_k + shared]` and weight `rw`; tokens in order within an expert, the shared
    /// experts taking every token with weight 1 after the routed ones (arguments `idx`, `w`,
    /// `offsets`, `sorted`, `rw`). `d` = experts + shared.
    Dispatch { experts: usize, shared: usize },
    /// f32 rows as two bf16 rows, `hi = bf16(x)` and `lo = bf16(x - hi)` (round to nearest even):
    /// a bf16 GEMM of each, summed in f32, is x's GEMM to ~2^-16 — how GEMMs on f32 activations
    /// (the head, the MTP projection) run on the bf16 tensor cores.
    SplitBf16,
    /// [`RowOp::SplitBf16`] transposed: `x [R, d]` into `hi`, `lo` `[d, Rp]` (`Rp`: `lo`'s columns,
    /// at least R; the columns past R zero). One block per row of x writes that column — the GEMM
    /// operands a contraction over x's rows needs (the bf16 template reads both K-major).
    SplitBf16T,
    /// `y = [x1 | x2]` (f32 rows of `d` and `second` columns).
    Concat { second: usize },
    /// MLA decode attention in the absorbed form, one block per (sequence, head) — the CUDA-core
    /// baseline (no tensor cores yet): `q_abs = q_nope W_UK`, scores over the latent cache rows
    /// `0..=position` of `q_abs . latent + q_pe . k_pe` times `scale`, softmax, `o = sum p latent`,
    /// `out = o W_UV`, then the head's 128 outputs quantized to e4m3 (one 1x128 group). The
    /// reference's summation orders throughout (one thread per output element, sequential sums;
    /// the softmax's max and sum by one thread). `kv_b [H (nope + v), kv]` is e4m3 with 128x128
    /// block scales, decoded as read. Scores go through shared memory `context` keys at a time:
    /// longer contexts take several chunks, each pass (max, sum, `P . latent`) recomputing a chunk's
    /// scores, the sums continuing in key order (the same bits as one chunk). `d` is `kv`.
    /// `prefill`: the queries are the last T of the latent's S rows (causal: query i sees rows
    /// `0..=S - T + i`; the cache argument is the latent `[S, kv + rope]`, no positions) — the
    /// absorbed form for prefill too (the reference runs the naive one: equal up to rounding).
    /// `selected` (DeepSeek-V3.2's sparse attention): query b's keys are the rows `selected[b, j]`
    /// (`[T, K]` i32, its selection then -1s) of the cache, read in place — `[S, C]` one
    /// sequence's rows (`prefill`) or `[B, S, C]` a cache per query — instead of positions.
    MlaDecode {
        heads: usize,
        nope: usize,
        rope: usize,
        v: usize,
        context: usize,
        scale: f32,
        prefill: bool,
        selected: bool,
    },
    /// The combine step of split-K attention ([`super::mla`]): per row, the splits' normalized
    /// outputs `o_part [splits, rows, d]` weighted by `exp(lse_z - max_z lse_z)` (`lse [splits,
    /// rows]`, natural log, `-inf` for a split without keys) over the weights' sum, into `out
    /// [rows, d]`; a row no split saw is zeros. A thread per column (the block as wide as the
    /// row, up to 512), the splits read 8 at a time.
    MlaCombine,
    /// MLA prefill on the tensor cores (the naive form), its keys and values: one block per latent
    /// row s of `kv [S, heads * (nope + v)]` (the kv_b up-projection of the cache's latent, f32)
    /// writes head h's key row `k[h * S + s] = bf16([kv[s, h, :nope] | cache[s, d .. d + rope]])`
    /// and value row `vv[h * S + s] = bf16(kv[s, h, nope..])` — head-major, the layout
    /// `mla_prefill_*` reads (bf16 by round to nearest even). `d` is the latent width: a cache row
    /// is the latent, then the rope key every head shares. `cache`: how the cache stores rows (bf16
    /// or fp8 rows: the rope key's bf16 copied as it is).
    MlaKeys { heads: usize, nope: usize, rope: usize, v: usize, cache: CacheRows },
    /// The e4m3 latent and the scales of fp8 cache rows `cache [S, row bytes]` (d the latent's
    /// columns) as the 1x128 operand kv_b's fp8 GEMM reads: `q [S, d]` (e4m3 bytes) and `scale [S,
    /// d / 128]` — the rows' power-of-two scales are 1x128 activation scales as they are.
    Fp8Latent,
    /// Its queries: `q[h * T + t] = bf16([q_nope[t, h] | q_pe[t, h]])` (`d` = heads * (nope + rope)).
    MlaQueries { heads: usize, nope: usize, rope: usize },
    /// The prefill kernel's head-major output `o [heads * T, d / heads]` (f32) back to token rows:
    /// row t is `[o[t], o[T + t], ..]`, 1x128 e4m3 quantized (`quantize`: bytes `q [T, d]` and
    /// `scale`, the fp8 graph's o_proj input) or as f32 `y [T, d]` (the f32 graph's).
    MlaHeadsOut { heads: usize, quantize: bool },
    /// MLA decode's queries for the tensor-core kernel (the absorbed form): `q[b H + h] =
    /// bf16([q_nope[b, h] W_UK_h | q_pe[b, h]])`, `W_UK_h` the head's nope rows of kv_b (e4m3 with
    /// 128x128 block scales, decoded as read), each latent column summed over nope in order — as
    /// the CUDA-core row's first phases ([`RowOp::MlaDecode`]). One block per head and `tokens`
    /// tokens, each weight read once for all of them. `d` is the latent width. Weight `bf16`: the
    /// f32 graph's kv_b (bf16, no scales).
    MlaAbsorb { heads: usize, nope: usize, rope: usize, v: usize, tokens: usize },
    /// [`RowOp::MlaAbsorb`] on the tensor cores (`rows/mla_mma.rs`): a block per (64 tokens, head,
    /// 64 latent columns), the query rounded to bf16 before the product and the block scale
    /// applied to the sum.
    MlaAbsorbMma { heads: usize, nope: usize, rope: usize, v: usize },
    /// The decode attention's latent output `o [B H, d]` (f32) through each head's value rows of
    /// kv_b (`W_UV_h`) and quantized 1x128: `q[b, h v ..][..v]` and its group's scale `scale[b,
    /// h]` (v = 128: a head is a group) — the CUDA-core row's last phases. One block per head and
    /// `tokens` tokens, each weight read once for all of them. Weight `bf16`: the f32 graph's kv_b,
    /// the heads' outputs `out [B, H v]` in f32 as they are.
    MlaUpV { heads: usize, nope: usize, v: usize, tokens: usize },
    /// [`RowOp::MlaUpV`] on the tensor cores (`rows/mla_mma.rs`): a block per (64 tokens, head),
    /// `o` times each 128 x 128 block's scale rounded to bf16 before the product.
    MlaUpVMma { heads: usize, nope: usize, v: usize },
    /// The lengths of the decode sequences over a pool of 64-row pages (the tensor-core
    /// attention's caches): sequence b's `min(position_b + 1, 64 n)` for the n columns of its
    /// block table (0 for a negative position). One block per sequence; the table is read for its
    /// width only (the runtime's sessions fill it, [`v3c_runtime::plan::PAGE_POOL`]).
    MlaLengths,
    /// Greedy sampling's argmax of each f32 row (`x [rows, d]` -> `idx [rows]`, i32) in the
    /// reference's order: `f32::total_cmp` (NaN and -0 < +0 ordered as Rust orders them), ties to
    /// the lower index. Each thread scans a strided share, then a tree over the threads.
    Argmax,
    /// Sampling at a temperature, every token weighed (`x [rows, d]` f32, `temperature [rows]`
    /// f32, `uniform [rows]` the bits of an f64 draw in [0, 1) -> `idx [rows]` i32): the token the
    /// host sampler draws ([`v3c_models::sampling::draw_every_token`]), bit for bit; -1 where the
    /// temperature is not above 0 (greedy rows are the argmax's). See [`sample`].
    Sample,
    /// What a row's log-probabilities need (`x [rows, d]` f32, `token [rows]` i32 -> `sum
    /// [rows]` the bits of an f64, `max [rows]` f32, `logit [rows]` f32, `top_id [rows, 20]` i32,
    /// `top_logit [rows, 20]` f32): softmax's denominator `sum(e^(l - max))`, the host's bits
    /// ([`v3c_models::sampling::exp_sum`]), the largest logit, the token's logit (NaN past the
    /// row), and the 20 most probable tokens with their logits (the host's `top_k`: f32 total
    /// order, ties to the lower id; -1 past the row's tokens). See [`scores`].
    Scores,
    /// A kernel of the training step ([`TrainRow`]).
    Train(TrainRow),
    /// A kernel of DeepSeek-V3.2's sparse attention ([`SparseRow`]).
    Sparse(SparseRow),
}

/// A row kernel: its op, the row length and the element type of the table or weight.
#[derive(Debug, Clone, PartialEq)]
pub struct RowKernel {
    pub op: RowOp,
    /// Columns per row.
    pub d: usize,
    /// Element type of the embedding table or the norm weight: `bf16` or `f32`.
    pub weight: String,
    /// Threads per block (a power of two, 32..=1024).
    pub threads: usize,
}

/// Where a row kernel's phases run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lowering {
    Gpu,
    Cpu,
}

impl RowKernel {
    /// The row kernel for `op` on rows of `d` columns, with a block size suited to `d`
    /// (enough threads for every column to be one load per thread per 8 columns, at most 256).
    pub fn new(op: RowOp, d: usize, weight: &str) -> RowKernel {
        let threads = match op {
            // One thread per expert's scan of the pairs.
            RowOp::Dispatch { .. } => d.next_power_of_two().clamp(32, 256),
            RowOp::MlaDecode { .. }
            | RowOp::MlaAbsorb { .. }
            | RowOp::MlaAbsorbMma { .. }
            | RowOp::MlaUpV { .. }
            | RowOp::MlaUpVMma { .. } => 128,
            // A warp per token selects; the logits' tiles are loaded by all.
            RowOp::Route { .. } | RowOp::RouteLogits { .. } => 256,
            RowOp::Train(op) => op.threads(d),
            RowOp::Sparse(op) => op.threads(d),
            // A thread per column: batch-1 decode's few rows (128 a sequence) over many splits
            // keep the SMs' loads in flight only with wide blocks.
            RowOp::MlaCombine => d.next_power_of_two().clamp(32, 512),
            // A row is one block's (decode's few rows): its blocks' sums two a thread (at 512 threads
            // ptxas holds the kernel to 128 registers, and the top-p and top-k draw spills there).
            RowOp::Sample => 256,
            // A thread a running sum of the host's (`SCORE_LANES`).
            RowOp::Scores => v3c_models::sampling::SCORE_LANES,
            // A latent row's keys and values: every head's nope and value columns.
            RowOp::MlaKeys { heads, nope, v, .. } => (heads * (nope + v) / 8).next_power_of_two().clamp(32, 256),
            _ => (d / 8).next_power_of_two().clamp(32, 256),
        };
        RowKernel { op, d, weight: weight.to_string(), threads }
    }

    /// `rows_embed_bf16_d7168_t256`, `rows_rmsnorm_bf16_d7168_t256_eps1em6_y_q` (`_y`: the f32
    /// result, `_q`: the e4m3 one; PTX names allow no `-` or `.`, so eps is spelled with `m`, `p`).
    pub fn kernel_name(&self) -> String {
        let (d, t, w) = (self.d, self.threads, &self.weight);
        match self.op {
            RowOp::Embed => format!("rows_embed_{w}_d{d}_t{t}"),
            RowOp::Train(op) => op.kernel_name(d, w, t),
            RowOp::Sparse(op) => op.kernel_name(d, w, t),
            RowOp::RmsNorm { eps, keep, quantize } => {
                let eps = format!("{eps:e}").replace('-', "m").replace('.', "p");
                let mut name = format!("rows_rmsnorm_{w}_d{d}_t{t}_eps{eps}");
                if keep {
                    name.push_str("_y");
                }
                if quantize {
                    name.push_str("_q");
                }
                name
            }
            RowOp::SplitRope { heads, nope, rope, interleave } => {
                let layout = if interleave { "_il" } else { "" };
                format!("rows_splitrope_h{heads}_n{nope}_r{rope}_t{t}{layout}")
            }
            RowOp::HeadsRope { heads, rope, interleave } => {
                let layout = if interleave { "_il" } else { "" };
                format!("rows_headsrope_h{heads}_d{d}_r{rope}_t{t}{layout}")
            }
            RowOp::SiluMul { quantize } => format!("rows_silumul_d{d}_t{t}{}", if quantize { "_q" } else { "_y" }),
            RowOp::Copy => format!("rows_copy_d{d}_t{t}"),
            RowOp::GatherFp8 => format!("rows_gatherfp8_d{d}_t{t}"),
            RowOp::MlaCombine => format!("rows_mlacombine_d{d}_t{t}"),
            RowOp::MlaKeys { heads, nope, rope, v, cache } => {
                format!(
                    "rows_mlakeys_h{heads}_n{nope}_r{rope}_v{v}_kv{d}_t{t}{}{}",
                    if w == "bf16" { "_bf16" } else { "" },
                    match cache {
                        CacheRows::F32 => "",
                        CacheRows::Bf16 => "_c16",
                        CacheRows::Fp8 => "_c8",
                    }
                )
            }
            RowOp::Fp8Latent => format!("rows_fp8latent_d{d}_t{t}"),
            RowOp::MlaQueries { heads, nope, rope } => format!("rows_mlaqueries_h{heads}_n{nope}_r{rope}_t{t}"),
            RowOp::MlaAbsorb { heads, nope, rope, v, tokens } => {
                let f32_graph = if w == "bf16" { "_bf16" } else { "" };
                format!("rows_mlaabsorb_h{heads}_n{nope}_r{rope}_v{v}_kv{d}_b{tokens}_t{t}{f32_graph}")
            }
            RowOp::MlaAbsorbMma { heads, nope, rope, v } => {
                let f32_graph = if w == "bf16" { "_bf16" } else { "" };
                format!("rows_mlaabsorbmma_h{heads}_n{nope}_r{rope}_v{v}_kv{d}_t{t}{f32_graph}")
            }
            RowOp::MlaUpVMma { heads, nope, v } => {
                let f32_graph = if w == "bf16" { "_bf16" } else { "" };
                format!("rows_mlaupvmma_h{heads}_n{nope}_v{v}_kv{d}_t{t}{f32_graph}")
            }
            RowOp::MlaUpV { heads, nope, v, tokens } => {
                let f32_graph = if w == "bf16" { "_bf16" } else { "" };
                format!("rows_mlaupv_h{heads}_n{nope}_v{v}_kv{d}_b{tokens}_t{t}{f32_graph}")
            }
            RowOp::MlaLengths => format!("rows_mlalengths_t{t}"),
            RowOp::MlaHeadsOut { heads, quantize } => {
                format!("rows_mlaheadsout_h{heads}_d{d}_t{t}_{}", if quantize { "q" } else { "y" })
            }
            RowOp::Argmax => format!("rows_argmax_d{d}_t{t}"),
            RowOp::Sample => format!("rows_sample_d{d}_t{t}"),
            RowOp::Scores => format!("rows_scores_d{d}_t{t}"),
            RowOp::SplitBf16 => format!("rows_splitbf16_d{d}_t{t}"),
            RowOp::SplitBf16T => format!("rows_splitbf16t_d{d}_t{t}"),
            RowOp::Concat { second } => format!("rows_concat_d{d}_b{second}_t{t}"),
            RowOp::MlaDecode { heads, nope, rope, v, context, scale, prefill, selected } => {
                let scale = format!("{scale:e}").replace('-', "m").replace('.', "p");
                let kind = match (prefill, selected) {
                    (true, false) => "mlaprefill",
                    (false, false) => "mladecode",
                    (true, true) => "mlaprefillsel",
                    (false, true) => "mladecodesel",
                };
                // bf16 kv_b: the f32 graph's (f32 output, no quantization).
                let f32_graph = if w == "bf16" { "_bf16" } else { "" };
                format!("rows_{kind}_h{heads}_n{nope}_r{rope}_v{v}_kv{d}_c{context}_s{scale}_t{t}{f32_graph}")
            }
            RowOp::Route { experts, top_k, n_group, topk_group, norm, scale, tokens, pieces, softmax } => {
                let scale = format!("{scale:e}").replace('-', "m").replace('.', "p");
                let norm = if norm { "_norm" } else { "" };
                let norm = if softmax { format!("_sm{norm}") } else { norm.to_string() };
                let tokens = if tokens == 1 { String::new() } else { format!("_b{tokens}") };
                let pieces = if pieces == ROUTER_SPLITS { String::new() } else { format!("_p{pieces}") };
                format!("rows_route_e{experts}_k{top_k}_g{n_group}_kg{topk_group}_s{scale}{norm}_t{t}{tokens}{pieces}")
            }
            RowOp::RouteLogits { experts, tokens } => {
                let tokens = if tokens == 1 { String::new() } else { format!("_b{tokens}") };
                format!("rows_routelogits_{w}_d{d}_e{experts}_t{t}{tokens}")
            }
            RowOp::Dispatch { experts, shared } => format!("rows_dispatch_e{experts}_s{shared}_t{t}"),
            RowOp::Latent { eps, rope, interleave, append, cache } => {
                let eps = format!("{eps:e}").replace('-', "m").replace('.', "p");
                let layout = if interleave { "_il" } else { "" };
                let mode = if append { "append" } else { "write" };
                format!("rows_latent_{w}_d{d}_r{rope}_t{t}_eps{eps}{layout}_{mode}{}", cache.suffix())
            }
            RowOp::LatentKey { eps, rope, interleave, key, key_eps } => {
                let spell = |e: f32| format!("{e:e}").replace('-', "m").replace('.', "p");
                let layout = if interleave { "_il" } else { "" };
                format!("rows_latentkey_{w}_d{d}_r{rope}_k{key}_t{t}_eps{}_keps{}{layout}", spell(eps), spell(key_eps))
            }
        }
    }

    /// The kernel a [`RowKernel::kernel_name`] names (None: not a row kernel name, or one whose
    /// block size is not valid).
    pub fn from_name(name: &str) -> Option<RowKernel> {
        if let Some(kernel) = TrainRow::from_name(name).or_else(|| SparseRow::from_name(name)) {
            return (kernel.check().is_ok() && kernel.kernel_name() == name).then_some(kernel);
        }
        let rest = name.strip_prefix("rows_")?;
        let (op, rest) = rest.split_once('_')?;
        let parts: Vec<&str> = rest.split('_').collect();
        let eps_of =
            |e: &str| -> Option<f32> { e.strip_prefix("eps")?.replace('m', "-").replace('p', ".").parse().ok() };
        let number = |part: &str, prefix: char| -> Option<usize> { part.strip_prefix(prefix)?.parse().ok() };
        // A kernel over kv_b (MLA's decode rows): e4m3, or (`_bf16`) the f32 graph's bf16.
        let kv_b_kernel = |op: RowOp, kv: &str, t: &str, f32_graph: &[&str]| -> Option<RowKernel> {
            let weight = match f32_graph {
                [] => "f8E4M3FN",
                ["bf16"] => "bf16",
                _ => return None,
            };
            Some(RowKernel {
                op,
                d: kv.strip_prefix("kv")?.parse().ok()?,
                weight: weight.into(),
                threads: number(t, 't')?,
            })
        };
        let kernel = match (op, &parts[..]) {
            ("headsrope", [h, d, r, t, rest @ ..]) => {
                let interleave = match rest {
                    ["il"] => true,
                    [] => false,
                    _ => return None,
                };
                let op = RowOp::HeadsRope { heads: number(h, 'h')?, rope: number(r, 'r')?, interleave };
                Some(RowKernel { op, d: number(d, 'd')?, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("splitrope", [h, n, r, t, rest @ ..]) => {
                let interleave = match rest {
                    ["il"] => true,
                    [] => false,
                    _ => return None,
                };
                let (heads, nope, rope) = (number(h, 'h')?, number(n, 'n')?, number(r, 'r')?);
                let op = RowOp::SplitRope { heads, nope, rope, interleave };
                Some(RowKernel { op, d: heads * (nope + rope), weight: "f32".into(), threads: number(t, 't')? })
            }
            ("silumul", [d, t, mode]) => {
                let quantize = match *mode {
                    "q" => true,
                    "y" => false,
                    _ => return None,
                };
                let op = RowOp::SiluMul { quantize };
                Some(RowKernel { op, d: number(d, 'd')?, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("dispatch", [e, sh, t]) => {
                let (experts, shared) = (number(e, 'e')?, number(sh, 's')?);
                let op = RowOp::Dispatch { experts, shared };
                Some(RowKernel { op, d: experts + shared, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("routelogits", [w, d, e, t, rest @ ..]) => {
                let tokens = match rest {
                    [b] => number(b, 'b')?,
                    [] => 1,
                    _ => return None,
                };
                let op = RowOp::RouteLogits { experts: number(e, 'e')?, tokens };
                Some(RowKernel { op, d: number(d, 'd')?, weight: w.to_string(), threads: number(t, 't')? })
            }
            ("route", [e, k, g, kg, sc, rest @ ..]) => {
                let (rest, pieces) = match rest {
                    [rest @ .., p] if p.starts_with('p') => (rest, number(p, 'p')?),
                    rest => (rest, ROUTER_SPLITS),
                };
                let (rest, tokens) = match rest {
                    [rest @ .., b] if b.starts_with('b') => (rest, number(b, 'b')?),
                    rest => (rest, 1),
                };
                let (softmax, rest) = match rest {
                    ["sm", rest @ ..] => (true, rest),
                    rest => (false, rest),
                };
                let (norm, t) = match rest {
                    ["norm", t] => (true, t),
                    [t] => (false, t),
                    _ => return None,
                };
                let op = RowOp::Route {
                    softmax,
                    experts: number(e, 'e')?,
                    top_k: number(k, 'k')?,
                    n_group: number(g, 'g')?,
                    topk_group: kg.strip_prefix("kg")?.parse().ok()?,
                    norm,
                    scale: sc.strip_prefix('s')?.replace('m', "-").replace('p', ".").parse().ok()?,
                    tokens,
                    pieces,
                };
                Some(RowKernel { op, d: number(e, 'e')?, weight: "f32".into(), threads: number(t, 't')? })
            }
            (kind @ ("splitbf16" | "splitbf16t"), [d, t]) => Some(RowKernel {
                op: if kind == "splitbf16" { RowOp::SplitBf16 } else { RowOp::SplitBf16T },
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            (
                kind @ ("mladecode" | "mlaprefill" | "mladecodesel" | "mlaprefillsel"),
                [h, n, r, v, kv, c, sc, t, f32_graph @ ..],
            ) if f32_graph.is_empty() || f32_graph == ["bf16"] => {
                let op = RowOp::MlaDecode {
                    prefill: kind.starts_with("mlaprefill"),
                    selected: kind.ends_with("sel"),
                    heads: number(h, 'h')?,
                    nope: number(n, 'n')?,
                    rope: number(r, 'r')?,
                    v: number(v, 'v')?,
                    context: number(c, 'c')?,
                    scale: sc.strip_prefix('s')?.replace('m', "-").replace('p', ".").parse().ok()?,
                };
                Some(RowKernel {
                    op,
                    d: kv.strip_prefix("kv")?.parse().ok()?,
                    weight: if f32_graph.is_empty() { "f8E4M3FN" } else { "bf16" }.into(),
                    threads: number(t, 't')?,
                })
            }
            ("mlakeys", [h, n, r, v, kv, t, rest @ ..]) => {
                let (source, cache) = match rest {
                    [] => ("f32", "f32"),
                    ["bf16"] => ("bf16", "f32"),
                    [c] => ("f32", *c),
                    ["bf16", c] => ("bf16", *c),
                    _ => return None,
                };
                let cache = match cache {
                    "f32" => CacheRows::F32,
                    "c16" => CacheRows::Bf16,
                    "c8" => CacheRows::Fp8,
                    _ => return None,
                };
                let op = RowOp::MlaKeys {
                    heads: number(h, 'h')?,
                    nope: number(n, 'n')?,
                    rope: number(r, 'r')?,
                    v: number(v, 'v')?,
                    cache,
                };
                Some(RowKernel {
                    op,
                    d: kv.strip_prefix("kv")?.parse().ok()?,
                    weight: source.into(),
                    threads: number(t, 't')?,
                })
            }
            ("mlaabsorb", [h, n, r, v, kv, b, t, f32_graph @ ..]) => {
                let (heads, nope, rope, v, tokens) =
                    (number(h, 'h')?, number(n, 'n')?, number(r, 'r')?, number(v, 'v')?, number(b, 'b')?);
                kv_b_kernel(RowOp::MlaAbsorb { heads, nope, rope, v, tokens }, kv, t, f32_graph)
            }
            ("mlaabsorbmma", [h, n, r, v, kv, t, f32_graph @ ..]) => {
                let (heads, nope, rope, v) = (number(h, 'h')?, number(n, 'n')?, number(r, 'r')?, number(v, 'v')?);
                kv_b_kernel(RowOp::MlaAbsorbMma { heads, nope, rope, v }, kv, t, f32_graph)
            }
            ("mlaupvmma", [h, n, v, kv, t, f32_graph @ ..]) => {
                let (heads, nope, v) = (number(h, 'h')?, number(n, 'n')?, number(v, 'v')?);
                kv_b_kernel(RowOp::MlaUpVMma { heads, nope, v }, kv, t, f32_graph)
            }
            ("mlaupv", [h, n, v, kv, b, t, f32_graph @ ..]) => {
                let (heads, nope, v, tokens) = (number(h, 'h')?, number(n, 'n')?, number(v, 'v')?, number(b, 'b')?);
                kv_b_kernel(RowOp::MlaUpV { heads, nope, v, tokens }, kv, t, f32_graph)
            }
            ("fp8latent", [d, t]) => Some(RowKernel {
                op: RowOp::Fp8Latent,
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            ("mlalengths", [t]) => {
                Some(RowKernel { op: RowOp::MlaLengths, d: PAGE_ROWS, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("mlaqueries", [h, n, r, t]) => {
                let (heads, nope, rope) = (number(h, 'h')?, number(n, 'n')?, number(r, 'r')?);
                let op = RowOp::MlaQueries { heads, nope, rope };
                Some(RowKernel { op, d: heads * (nope + rope), weight: "f32".into(), threads: number(t, 't')? })
            }
            ("mlaheadsout", [h, d, t, mode @ ("q" | "y")]) => {
                let op = RowOp::MlaHeadsOut { heads: number(h, 'h')?, quantize: *mode == "q" };
                Some(RowKernel { op, d: number(d, 'd')?, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("concat", [d, b, t]) => {
                let op = RowOp::Concat { second: number(b, 'b')? };
                Some(RowKernel { op, d: number(d, 'd')?, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("scores", [d, t]) => Some(RowKernel {
                op: RowOp::Scores,
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            ("sample", [d, t]) => Some(RowKernel {
                op: RowOp::Sample,
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            ("argmax", [d, t]) => Some(RowKernel {
                op: RowOp::Argmax,
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            ("mlacombine", [d, t]) => Some(RowKernel {
                op: RowOp::MlaCombine,
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            ("copy", [d, t]) => {
                Some(RowKernel { op: RowOp::Copy, d: number(d, 'd')?, weight: "f32".into(), threads: number(t, 't')? })
            }
            ("gatherfp8", [d, t]) => Some(RowKernel {
                op: RowOp::GatherFp8,
                d: number(d, 'd')?,
                weight: "f32".into(),
                threads: number(t, 't')?,
            }),
            _ => None,
        };
        if let Some(kernel) = kernel {
            return (kernel.check().is_ok() && kernel.kernel_name() == name).then_some(kernel);
        }
        if op == "latentkey" {
            // rows_latentkey_<w>_d<D>_r<R>_k<K>_t<T>_eps<E>_keps<E>[_il]
            let [weight, d, r, k, t, eps, keps, rest @ ..] = &parts[..] else { return None };
            let interleave = match rest {
                ["il"] => true,
                [] => false,
                _ => return None,
            };
            let op = RowOp::LatentKey {
                eps: eps_of(eps)?,
                rope: number(r, 'r')?,
                interleave,
                key: number(k, 'k')?,
                key_eps: eps_of(keps.strip_prefix('k')?)?,
            };
            let kernel = RowKernel { op, d: number(d, 'd')?, weight: weight.to_string(), threads: number(t, 't')? };
            return (kernel.check().is_ok() && kernel.kernel_name() == name).then_some(kernel);
        }
        if op == "latent" {
            // rows_latent_<w>_d<D>_r<R>_t<T>_eps<E>[_il]_(append|write)[bf16]
            let [weight, d, r, t, eps, rest @ ..] = &parts[..] else { return None };
            let (interleave, mode) = match rest {
                ["il", m] => (true, *m),
                [m] => (false, *m),
                _ => return None,
            };
            let (append, cache) = mode
                .strip_prefix("append")
                .map(|c| (true, c))
                .or_else(|| mode.strip_prefix("write").map(|c| (false, c)))?;
            let cache = [CacheRows::F32, CacheRows::Bf16, CacheRows::Fp8].into_iter().find(|k| k.suffix() == cache)?;
            let op = RowOp::Latent {
                eps: eps_of(eps)?,
                rope: r.strip_prefix('r')?.parse().ok()?,
                interleave,
                append,
                cache,
            };
            let d = d.strip_prefix('d')?.parse().ok()?;
            let threads = t.strip_prefix('t')?.parse().ok()?;
            let kernel = RowKernel { op, d, weight: weight.to_string(), threads };
            return (kernel.check().is_ok() && kernel.kernel_name() == name).then_some(kernel);
        }
        let [weight, d, t, tail @ ..] = &parts[..] else { return None };
        let d: usize = d.strip_prefix('d')?.parse().ok()?;
        let threads: usize = t.strip_prefix('t')?.parse().ok()?;
        let op = match (op, tail) {
            ("embed", []) => RowOp::Embed,
            ("rmsnorm", [eps, flags @ ..]) => {
                let eps = eps_of(eps)?;
                let (keep, quantize) = match flags {
                    ["y"] => (true, false),
                    ["q"] => (false, true),
                    ["y", "q"] => (true, true),
                    _ => return None,
                };
                RowOp::RmsNorm { eps, keep, quantize }
            }
            _ => return None,
        };
        let kernel = RowKernel { op, d, weight: weight.to_string(), threads };
        (kernel.check().is_ok() && kernel.kernel_name() == name).then_some(kernel)
    }

    /// Scale groups per row.
    fn groups(&self) -> usize {
        self.d.div_ceil(GROUP)
    }

    /// The kernel's arguments in order (name, memref type): inputs, then results. Every memref is
    /// dynamically shaped (a descriptor of 2 + 2 x rank scalars on sm_90a). Embed: `table [V, d]`,
    /// `ids [rows]` (i64), `out [rows, d]` (f32). RMSNorm: `x [rows, d]` (f32), `w [d]`, then `y
    /// [rows, d]` (f32) when kept, and `q [rows, d]` (e4m3 bytes as i8) with `scale [rows, d / 128]`
    /// (f32) when quantized.
    pub fn arguments(&self) -> Vec<(&'static str, String)> {
        let w = &self.weight;
        match self.op {
            RowOp::Train(op) => op.arguments(w),
            RowOp::Sparse(op) => op.arguments(w),
            RowOp::Embed => vec![
                ("table", format!("memref<?x?x{w}>")),
                ("ids", "memref<?xi64>".into()),
                ("out", "memref<?x?xf32>".into()),
            ],
            RowOp::RmsNorm { keep, quantize, .. } => {
                let mut args = vec![("x", "memref<?x?xf32>".to_string()), ("w", format!("memref<?x{w}>"))];
                if keep {
                    args.push(("y", "memref<?x?xf32>".into()));
                }
                if quantize {
                    args.push(("q", "memref<?x?xi8>".into()));
                    args.push(("scale", "memref<?x?xf32>".into()));
                }
                args
            }
            RowOp::Copy => vec![("x", "memref<?x?xf32>".to_string()), ("y", "memref<?x?xf32>".into())],
            RowOp::GatherFp8 => vec![
                ("x", "memref<?x?xi8>".to_string()),
                ("x_scale", "memref<?x?xf32>".into()),
                ("sorted", "memref<?x?xi32>".into()),
                ("q", "memref<?x?xi8>".into()),
                ("scale", "memref<?x?xf32>".into()),
            ],
            RowOp::Argmax => vec![("x", "memref<?x?xf32>".to_string()), ("idx", "memref<?xi32>".into())],
            RowOp::Scores => vec![
                ("x", "memref<?x?xf32>".to_string()),
                ("token", "memref<?xi32>".into()),
                ("sum", "memref<?xi64>".into()),
                ("max", "memref<?xf32>".into()),
                ("logit", "memref<?xf32>".into()),
                ("top_id", "memref<?x?xi32>".into()),
                ("top_logit", "memref<?x?xf32>".into()),
            ],
            RowOp::Sample => vec![
                ("x", "memref<?x?xf32>".to_string()),
                ("temperature", "memref<?xf32>".into()),
                ("top_p", "memref<?xf32>".into()),
                ("top_k", "memref<?xi32>".into()),
                ("min_p", "memref<?xf32>".into()),
                ("uniform", "memref<?xi64>".into()),
                ("idx", "memref<?xi32>".into()),
            ],
            RowOp::MlaCombine => vec![
                ("o_part", "memref<?x?x?xf32>".to_string()),
                ("lse", "memref<?x?xf32>".into()),
                ("out", "memref<?x?xf32>".into()),
            ],
            RowOp::SplitBf16 | RowOp::SplitBf16T => vec![
                ("x", "memref<?x?xf32>".to_string()),
                ("hi", "memref<?x?xbf16>".into()),
                ("lo", "memref<?x?xbf16>".into()),
            ],
            RowOp::MlaDecode { prefill, selected, .. } => {
                let mut args = vec![("q_nope", "memref<?x?x?xf32>".to_string()), ("q_pe", "memref<?x?x?xf32>".into())];
                if prefill {
                    args.push(("cache", "memref<?x?xf32>".into()));
                } else {
                    args.push(("cache", "memref<?x?x?xf32>".into()));
                }
                if selected {
                    args.push(("selected", "memref<?x?xi32>".into()));
                } else if !prefill {
                    args.push(("positions", "memref<?xi64>".into()));
                }
                args.extend(self.kv_b_arguments());
                args.extend(self.head_outputs());
                args
            }
            RowOp::Fp8Latent => vec![
                ("cache", "memref<?x?xi8>".into()),
                ("q", "memref<?x?xi8>".into()),
                ("scale", "memref<?x?xf32>".into()),
            ],
            RowOp::MlaKeys { cache, .. } => vec![
                ("kv", format!("memref<?x?x{w}>")),
                ("cache", format!("memref<?x?x{}>", cache.element())),
                ("k", "memref<?x?xbf16>".into()),
                ("vv", "memref<?x?xbf16>".into()),
            ],
            RowOp::MlaAbsorb { .. } | RowOp::MlaAbsorbMma { .. } => {
                let mut args = vec![("q_nope", "memref<?x?x?xf32>".to_string()), ("q_pe", "memref<?x?x?xf32>".into())];
                args.extend(self.kv_b_arguments());
                args.push(("qa", "memref<?x?xbf16>".into()));
                args
            }
            RowOp::MlaUpV { .. } | RowOp::MlaUpVMma { .. } => {
                let mut args = vec![("o", "memref<?x?xf32>".to_string())];
                args.extend(self.kv_b_arguments());
                args.extend(self.head_outputs());
                args
            }
            RowOp::MlaLengths => vec![
                ("positions", "memref<?xi64>".to_string()),
                ("table", "memref<?x?xi32>".into()),
                ("seqlens", "memref<?xi32>".into()),
            ],
            RowOp::MlaQueries { .. } => vec![
                ("q_nope", "memref<?x?x?xf32>".to_string()),
                ("q_pe", "memref<?x?x?xf32>".into()),
                ("q", "memref<?x?xbf16>".into()),
            ],
            RowOp::MlaHeadsOut { quantize: true, .. } => vec![
                ("o", "memref<?x?xf32>".to_string()),
                ("q", "memref<?x?xi8>".into()),
                ("scale", "memref<?x?xf32>".into()),
            ],
            RowOp::MlaHeadsOut { quantize: false, .. } => {
                vec![("o", "memref<?x?xf32>".to_string()), ("y", "memref<?x?xf32>".into())]
            }
            RowOp::Concat { .. } => vec![
                ("x1", "memref<?x?xf32>".to_string()),
                ("x2", "memref<?x?xf32>".into()),
                ("y", "memref<?x?xf32>".into()),
            ],
            RowOp::RouteLogits { .. } => vec![
                ("x", "memref<?x?xf32>".to_string()),
                ("gate", format!("memref<?x?x{w}>")),
                ("parts", "memref<?x?xf32>".into()),
            ],
            RowOp::Route { softmax, .. } => {
                let mut args = vec![("parts", "memref<?x?xf32>".to_string()), ("bias", "memref<?xf32>".into())];
                if softmax {
                    args.pop();
                }
                args.extend([("idx", "memref<?x?xi32>".into()), ("w", "memref<?x?xf32>".into())]);
                args
            }
            RowOp::Dispatch { .. } => vec![
                ("idx", "memref<?x?xi32>".to_string()),
                ("w", "memref<?x?xf32>".into()),
                ("offsets", "memref<?xi32>".into()),
                ("sorted", "memref<?x?xi32>".into()),
                ("rw", "memref<?x?xf32>".into()),
            ],
            RowOp::HeadsRope { .. } => vec![
                ("y", "memref<?x?xf32>".to_string()),
                ("positions", "memref<?xi64>".into()),
                ("rope", "memref<?x?xf32>".into()),
                ("out", "memref<?x?x?xf32>".into()),
            ],
            RowOp::SplitRope { .. } => vec![
                ("y", "memref<?x?xf32>".to_string()),
                ("positions", "memref<?xi64>".into()),
                ("rope", "memref<?x?xf32>".into()),
                ("q_nope", "memref<?x?x?xf32>".into()),
                ("q_pe", "memref<?x?x?xf32>".into()),
            ],
            RowOp::SiluMul { quantize } => {
                let mut args = vec![("x", "memref<?x?xf32>".to_string())];
                if quantize {
                    args.push(("q", "memref<?x?xi8>".into()));
                    args.push(("scale", "memref<?x?xf32>".into()));
                } else {
                    args.push(("y", "memref<?x?xf32>".into()));
                }
                args
            }
            RowOp::LatentKey { .. } => vec![
                ("latent", "memref<?x?xf32>".to_string()),
                ("w", format!("memref<?x{w}>")),
                ("k_pe", "memref<?x?xf32>".into()),
                ("positions", "memref<?xi64>".into()),
                ("key", "memref<?x?xf32>".into()),
                ("kw", format!("memref<?x{w}>")),
                ("kb", format!("memref<?x{w}>")),
                ("rope", "memref<?x?xf32>".into()),
                ("out", "memref<?x?xf32>".into()),
            ],
            RowOp::Latent { append, cache, .. } => {
                let mut args = vec![
                    ("latent", "memref<?x?xf32>".to_string()),
                    ("w", format!("memref<?x{w}>")),
                    ("k_pe", "memref<?x?xf32>".into()),
                    ("positions", "memref<?xi64>".into()),
                ];
                let element = cache.element();
                if append {
                    args.push(("cache", format!("memref<?x?x{element}>")));
                    args.push(("rope", "memref<?x?xf32>".into()));
                    args.push(("out", format!("memref<?x?x{element}>")));
                } else {
                    args.push(("cache", format!("memref<?x?x?x{element}>")));
                    args.push(("rope", "memref<?x?xf32>".into()));
                    if cache.paged() {
                        args.push(("table", "memref<?x?xi32>".into()));
                    }
                }
                args
            }
        }
    }

    /// MLA's kv_b: bf16 (the f32 graph's), or e4m3 bytes and their 128x128 block scales.
    fn kv_b_arguments(&self) -> Vec<(&'static str, String)> {
        match self.weight.as_str() {
            "bf16" => vec![("kv_b", "memref<?x?xbf16>".into())],
            _ => vec![("kv_b", "memref<?x?xi8>".into()), ("kv_b_scale", "memref<?x?xf32>".into())],
        }
    }

    /// MLA's per-head outputs `[B, H v]`: f32 rows (the f32 graph's), or e4m3 bytes and their
    /// 1x128 scales.
    fn head_outputs(&self) -> Vec<(&'static str, String)> {
        match self.weight.as_str() {
            "bf16" => vec![("out", "memref<?x?xf32>".into())],
            _ => vec![("q", "memref<?x?xi8>".into()), ("scale", "memref<?x?xf32>".into())],
        }
    }

    /// The rank of each argument's memref, in order (how the runtime passes its buffers).
    pub fn argument_ranks(&self) -> Vec<usize> {
        self.arguments().iter().map(|(_, ty)| ty.matches('?').count()).collect()
    }

    /// The argument whose first dimension is the number of rows (the grid); None: one block.
    pub fn rows_argument(&self) -> Option<&'static str> {
        Some(match self.op {
            RowOp::Embed => "ids",
            RowOp::RmsNorm { .. } => "x",
            // Prefill: one block per output row (the cached ones copied); decode: per sequence.
            RowOp::Latent { append: true, .. } => "out",
            RowOp::Latent { append: false, .. } | RowOp::LatentKey { .. } => "latent",
            RowOp::SplitRope { .. } | RowOp::HeadsRope { .. } => "y",
            RowOp::SiluMul { .. } | RowOp::Copy | RowOp::RouteLogits { .. } | RowOp::SplitBf16 | RowOp::SplitBf16T => {
                "x"
            }
            RowOp::Route { .. } => "parts",
            RowOp::Concat { .. } => "x1",
            RowOp::MlaCombine => "out",
            RowOp::MlaKeys { .. } => "kv",
            RowOp::Fp8Latent => "cache",
            RowOp::GatherFp8 => "q",
            RowOp::MlaQueries { .. } | RowOp::MlaAbsorb { .. } | RowOp::MlaAbsorbMma { .. } => "q_nope",
            RowOp::MlaUpV { .. } | RowOp::MlaUpVMma { .. } if self.weight == "bf16" => "out",
            RowOp::MlaUpV { .. } | RowOp::MlaUpVMma { .. } => "q",
            RowOp::MlaLengths => "positions",
            RowOp::MlaHeadsOut { quantize: true, .. } => "q",
            RowOp::MlaHeadsOut { quantize: false, .. } => "y",
            RowOp::Argmax | RowOp::Sample | RowOp::Scores => "x",
            // One block per (sequence, head): see `blocks_per_row`.
            RowOp::MlaDecode { .. } => "q_nope",
            RowOp::Dispatch { .. } => return None,
            RowOp::Train(op) => return op.rows_argument(),
            RowOp::Sparse(op) => op.rows_argument(),
        })
    }

    /// Rows of the rows argument one block takes (the grid is `ceil(rows / this)` x
    /// [`RowKernel::blocks_per_row`]).
    pub fn rows_per_block(&self) -> usize {
        match self.op {
            RowOp::MlaAbsorb { tokens, .. } | RowOp::MlaUpV { tokens, .. } => tokens,
            RowOp::MlaAbsorbMma { .. } | RowOp::MlaUpVMma { .. } => mla_mma::TILE,
            RowOp::Route { tokens, .. } | RowOp::RouteLogits { tokens, .. } => tokens,
            RowOp::Train(op) => op.rows_per_block(self.d),
            _ => 1,
        }
    }

    /// Blocks per row of the rows argument: the grid is rows x this (attention: one per head).
    pub fn blocks_per_row(&self) -> usize {
        match self.op {
            RowOp::MlaDecode { heads, .. }
            | RowOp::MlaAbsorb { heads, .. }
            | RowOp::MlaUpV { heads, .. }
            | RowOp::MlaUpVMma { heads, .. } => heads,
            RowOp::MlaAbsorbMma { heads, .. } => heads * (self.d / mla_mma::Absorb::columns(self.d)),
            RowOp::RouteLogits { experts, .. } => ROUTER_SPLITS * experts.div_ceil(ROUTE_EXPERT_TILE),
            RowOp::Train(op) => op.blocks_per_row(self.d),
            RowOp::Sparse(op) => op.blocks_per_row(),
            _ => 1,
        }
    }

    /// Shared arrays (name, elements: see [`shared_element`]).
    fn shared(&self) -> Vec<(&'static str, usize)> {
        match self.op {
            RowOp::Embed => Vec::new(),
            RowOp::Train(op) => op.shared(self.d, self.threads),
            RowOp::Sparse(op) => op.shared(self.d, self.threads),
            RowOp::RmsNorm { quantize, .. } => {
                let mut s = vec![("sh_row", self.d), ("sh_sum", self.threads)];
                if quantize {
                    s.push(("sh_amax", self.groups() * AMAX_PARTS));
                    s.push(("sh_scale", self.groups()));
                }
                s
            }
            RowOp::LatentKey { .. } => vec![("sh_row", self.d), ("sh_sum", self.threads), ("sh_red", 2)],
            RowOp::Latent { cache, .. } => {
                let mut s = vec![("sh_row", self.d), ("sh_sum", self.threads)];
                if cache == CacheRows::Fp8 {
                    s.push(("sh_amax", self.groups() * AMAX_PARTS));
                    s.push(("sh_scale", self.groups()));
                }
                s
            }
            RowOp::Argmax => vec![("sh_key", self.threads), ("sh_idx", self.threads)],
            RowOp::Sample => sample::shared(self.d, self.threads),
            RowOp::Scores => scores::shared(self.threads),
            RowOp::SplitRope { .. }
            | RowOp::SiluMul { quantize: false }
            | RowOp::Copy
            | RowOp::GatherFp8
            | RowOp::SplitBf16
            | RowOp::SplitBf16T
            | RowOp::Concat { .. }
            | RowOp::MlaKeys { .. }
            | RowOp::MlaQueries { .. }
            | RowOp::MlaLengths
            | RowOp::Fp8Latent
            | RowOp::HeadsRope { .. }
            | RowOp::MlaCombine => Vec::new(),
            RowOp::MlaAbsorb { nope, tokens, .. } => vec![("sh_qn", tokens * nope)],
            RowOp::MlaAbsorbMma { .. } => self.absorb().map_or(Vec::new(), |a| a.shared()),
            RowOp::MlaUpVMma { .. } => self.up_v().map_or(Vec::new(), |u| u.shared()),
            RowOp::MlaUpV { v, tokens, .. } => {
                vec![("sh_o", tokens * self.d), ("sh_out", tokens * v), ("sh_red", 2 + tokens.max(2))]
            }
            RowOp::MlaHeadsOut { quantize: true, .. } => {
                vec![("sh_amax", self.groups() * AMAX_PARTS), ("sh_scale", self.groups())]
            }
            RowOp::MlaHeadsOut { quantize: false, .. } => Vec::new(),
            RowOp::MlaDecode { nope, rope, v, context, .. } => vec![
                ("sh_qn", nope),
                ("sh_qpe", rope),
                ("sh_qa", self.d),
                ("sh_p", context),
                ("sh_o", self.d),
                ("sh_out", v),
                ("sh_red", 4),
            ],
            RowOp::Route { experts, n_group, top_k, tokens, .. } => route_arrays(experts, n_group, top_k, tokens),
            RowOp::RouteLogits { experts, tokens } => {
                let tile = experts.min(ROUTE_EXPERT_TILE);
                let chunk = route_chunk(self.d);
                vec![("sh_tile", chunk * (tile + 1)), ("sh_x", chunk * tokens), ("sh_acc", tokens * tile)]
            }
            RowOp::Dispatch { experts, shared } => vec![
                ("sh_count", experts + shared),
                ("sh_off", experts + shared),
                ("sh_cc", pair_chunks(experts) * experts),
            ],
            RowOp::SiluMul { quantize: true } => {
                vec![("sh_amax", self.groups() * AMAX_PARTS), ("sh_scale", self.groups())]
            }
        }
    }

    /// The memref type of shared array `name` in `lowering` (workgroup memory on sm_90a).
    fn shared_type(&self, name: &str, lowering: Lowering) -> String {
        let n = self.shared().iter().find(|(s, _)| *s == name).map(|(_, n)| *n).expect("a declared shared array");
        let space = match lowering {
            Lowering::Gpu => ", #gpu.address_space<workgroup>",
            Lowering::Cpu => "",
        };
        format!("memref<{n}x{}{space}>", shared_element(name))
    }

    /// Static shared memory, in bytes.
    pub fn shared_memory_bytes(&self) -> usize {
        self.shared().iter().map(|(name, n)| element_bytes(shared_element(name)) * n).sum()
    }

    /// Why this kernel cannot be generated for `target`, if it cannot: its own checks (the shared
    /// arrays within the static limit among them) and its block width.
    pub fn validate(&self, target: &crate::target::GpuTarget) -> Result<(), String> {
        self.check()?;
        if self.threads > target.max_threads_per_block as usize {
            let (name, most) = (self.kernel_name(), target.max_threads_per_block);
            return Err(format!("{name}: {} threads, {} takes {most}", self.threads, target.name));
        }
        Ok(())
    }

    /// Why this kernel cannot be generated, if it cannot.
    fn check(&self) -> Result<(), String> {
        let name = self.kernel_name();
        if !self.threads.is_power_of_two() || !(32..=1024).contains(&self.threads) {
            return Err(format!("{name}: {} threads (a power of two from 32 to 1024)", self.threads));
        }
        if self.d == 0 {
            return Err(format!("{name}: rows of 0 columns"));
        }
        if let RowOp::Train(op) = self.op {
            op.check(&name, self.d)?;
        }
        if let RowOp::Sparse(op) = self.op {
            op.check(&name, self.d)?;
        }
        if self.op == RowOp::Scores {
            scores::check(self.threads).map_err(|e| format!("{name}: {e}"))?;
        }
        if let RowOp::Latent { rope, .. }
        | RowOp::SplitRope { rope, .. }
        | RowOp::LatentKey { rope, .. }
        | RowOp::HeadsRope { rope, .. } = self.op
        {
            if rope == 0 || rope % 2 != 0 {
                return Err(format!("{name}: a rope width of {rope} (a positive even number)"));
            }
        }
        if let RowOp::HeadsRope { heads, rope, .. } = self.op {
            if heads == 0 || !self.d.is_multiple_of(heads) || rope > self.d / heads {
                return Err(format!("{name}: {heads} heads of {} columns rotated on {rope}", self.d / heads.max(1)));
            }
        }
        if let RowOp::LatentKey { rope, key, .. } = self.op {
            if key < rope {
                return Err(format!("{name}: a key of {key} columns rotated on {rope}"));
            }
        }
        let fp8_rows = match self.op {
            RowOp::Fp8Latent => Some(v3c_runtime::plan::Fp8LatentRow::ROPE),
            RowOp::MlaKeys { cache: CacheRows::Fp8, rope, .. } => Some(rope),
            _ => None,
        };
        if let Some(rope) = fp8_rows {
            if !self.d.is_multiple_of(GROUP) || rope != v3c_runtime::plan::Fp8LatentRow::ROPE {
                return Err(format!(
                    "{name}: fp8 cache rows of a latent of {} columns and a rope key of {rope}",
                    self.d
                ));
            }
        }
        if let RowOp::Latent { rope, cache: CacheRows::Fp8, .. } = self.op {
            let row = v3c_runtime::plan::Fp8LatentRow::of(self.d + rope).filter(|r| r.latent == self.d);
            if row.is_none() {
                return Err(format!(
                    "{name}: fp8 cache rows of a latent of {} columns (whole 128-column groups) and a rope key of {}",
                    self.d,
                    v3c_runtime::plan::Fp8LatentRow::ROPE
                ));
            }
        }
        if let RowOp::RouteLogits { tokens, .. } | RowOp::Route { tokens, .. } = self.op {
            if !(1..=self.threads).contains(&tokens) {
                return Err(format!("{name}: {tokens} tokens a block of {} threads", self.threads));
            }
        }
        if let RowOp::Route { experts, top_k, n_group, topk_group, pieces, softmax, .. } = self.op {
            if pieces != 1 && pieces != ROUTER_SPLITS {
                return Err(format!("{name}: logits in {pieces} pieces (1, or the router's {ROUTER_SPLITS} splits)"));
            }
            let per = experts / n_group.max(1);
            if self.d != experts {
                return Err(format!("{name}: rows of {} logits for {experts} experts", self.d));
            }
            if n_group == 0
                || experts % n_group != 0
                || (per < 2 && !softmax)
                || topk_group == 0
                || topk_group > n_group
                || top_k == 0
                || top_k > topk_group * per
            {
                return Err(format!(
                    "{name}: routing {experts} experts in {n_group} groups, keeping {topk_group} groups and {top_k} experts"
                ));
            }
        }
        if let (RowOp::MlaUpV { v, .. }, false) = (self.op, self.weight == "bf16") {
            if v != GROUP {
                return Err(format!("{name}: v heads of {v} (one head is one 128-wide quantization group)"));
            }
        }
        if let RowOp::MlaAbsorb { tokens, .. } | RowOp::MlaUpV { tokens, .. } = self.op {
            if tokens == 0 || tokens > self.threads {
                return Err(format!("{name}: {tokens} tokens per block (1 to the {} threads)", self.threads));
            }
        }
        if let (RowOp::MlaAbsorbMma { v, .. }, Some(a)) = (self.op, self.absorb()) {
            a.check(v, self.d).map_err(|e| format!("{name}: {e}"))?;
            if !matches!(self.weight.as_str(), "bf16" | "f8E4M3FN") {
                return Err(format!("{name}: {} kv_b (e4m3 with block scales, or bf16)", self.weight));
            }
        }
        if let (RowOp::MlaUpVMma { nope, .. }, Some(u)) = (self.op, self.up_v()) {
            u.check(nope, self.d).map_err(|e| format!("{name}: {e}"))?;
            if !matches!(self.weight.as_str(), "bf16" | "f8E4M3FN") {
                return Err(format!("{name}: {} kv_b (e4m3 with block scales, or bf16)", self.weight));
            }
        }
        if let RowOp::MlaHeadsOut { heads, .. } = self.op {
            if heads == 0 || !self.d.is_multiple_of(heads) {
                return Err(format!("{name}: rows of {} columns are not {heads} heads", self.d));
            }
        }
        if let RowOp::MlaDecode { v, .. } = self.op {
            if !["f8E4M3FN", "bf16"].contains(&self.weight.as_str()) {
                return Err(format!("{name}: {} kv_b (e4m3 with block scales, or bf16)", self.weight));
            }
            if v != GROUP && self.weight != "bf16" {
                return Err(format!("{name}: v heads of {v} (one head is one 128-wide quantization group)"));
            }
        }
        if !matches!(self.weight.as_str(), "bf16" | "f32" | "f8E4M3FN") {
            return Err(format!("{name}: {} weights (bf16 or f32)", self.weight));
        }
        if self.shared_memory_bytes() > STATIC_SHARED_LIMIT {
            return Err(format!(
                "{name}: {} B of shared memory for rows of {} columns (at most {STATIC_SHARED_LIMIT} B)",
                self.shared_memory_bytes(),
                self.d
            ));
        }
        Ok(())
    }

    /// Constants the phases use.
    fn constants(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "%c0 = arith.constant 0 : index");
        let _ = writeln!(s, "%c1 = arith.constant 1 : index");
        let _ = writeln!(s, "%cT = arith.constant {} : index", self.threads);
        let _ = writeln!(s, "%cD = arith.constant {} : index", self.d);
        let _ = writeln!(s, "%zero = arith.constant 0.0 : f32");
        if let RowOp::Latent { eps, rope, cache, .. } = self.op {
            if cache == CacheRows::Fp8 {
                s.push_str(&quant_constants(self.groups()));
            }
            let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
            let _ = writeln!(s, "%fD = arith.constant 0x{:08X} : f32", (self.d as f32).to_bits());
            let _ = writeln!(s, "%eps = arith.constant 0x{:08X} : f32", eps.to_bits());
            let _ = writeln!(s, "%cHalf = arith.constant {} : index", rope / 2);
            let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
        }
        if let RowOp::HeadsRope { heads, rope, .. } = self.op {
            let dim = self.d / heads.max(1);
            let _ = writeln!(s, "%cHalf = arith.constant {} : index", rope / 2);
            let _ = writeln!(s, "%cR = arith.constant {rope} : index");
            let _ = writeln!(s, "%cHead = arith.constant {dim} : index");
            let _ = writeln!(s, "%cPlain = arith.constant {} : index", dim - rope.min(dim));
            let _ = writeln!(s, "%cPlainAll = arith.constant {} : index", heads * (dim - rope.min(dim)));
            let _ = writeln!(s, "%cHalfAll = arith.constant {} : index", heads * rope / 2);
            let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
        }
        if let RowOp::LatentKey { eps, rope, key, key_eps, .. } = self.op {
            let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
            let _ = writeln!(s, "%fD = arith.constant 0x{:08X} : f32", (self.d as f32).to_bits());
            let _ = writeln!(s, "%eps = arith.constant 0x{:08X} : f32", eps.to_bits());
            let _ = writeln!(s, "%fK = arith.constant 0x{:08X} : f32", (key as f32).to_bits());
            let _ = writeln!(s, "%keps = arith.constant 0x{:08X} : f32", key_eps.to_bits());
            let _ = writeln!(s, "%cHalf = arith.constant {} : index", rope / 2);
            let _ = writeln!(s, "%cR = arith.constant {rope} : index");
            let _ = writeln!(s, "%cKey = arith.constant {key} : index");
            let _ = writeln!(s, "%cRopeBase = arith.constant {} : index", self.d);
            let _ = writeln!(s, "%cKeyBase = arith.constant {} : index", self.d + rope);
            let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
        }
        if let RowOp::SplitRope { heads, nope, rope, .. } = self.op {
            let _ = writeln!(s, "%cVecR = arith.constant {VEC} : index");
            let _ = writeln!(s, "%cHalf = arith.constant {} : index", rope / 2);
            let _ = writeln!(s, "%cNope = arith.constant {nope} : index");
            let _ = writeln!(s, "%cHead = arith.constant {} : index", nope + rope);
            let _ = writeln!(s, "%cNopeAll = arith.constant {} : index", heads * nope);
            let _ = writeln!(s, "%cHalfAll = arith.constant {} : index", heads * rope / 2);
            let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
        }
        if let RowOp::Route { .. } = self.op {
            let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
        }
        if let RowOp::Train(op) = self.op {
            s.push_str(&op.constants(self.d));
        }
        if let RowOp::Sparse(op) = self.op {
            s.push_str(&op.constants(self.d));
        }
        if let RowOp::MlaDecode { heads, nope, rope, v, context, scale, .. } = self.op {
            let _ = writeln!(s, "%cH = arith.constant {heads} : index");
            let _ = writeln!(s, "%cNope = arith.constant {nope} : index");
            let _ = writeln!(s, "%cRope = arith.constant {rope} : index");
            let _ = writeln!(s, "%cV = arith.constant {v} : index");
            let _ = writeln!(s, "%cPerHead = arith.constant {} : index", nope + v);
            let _ = writeln!(s, "%cCtx = arith.constant {context} : index");
            let _ = writeln!(s, "%c128 = arith.constant 128 : index");
            let _ = writeln!(s, "%softmax_scale = arith.constant 0x{:08X} : f32", scale.to_bits());
            let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
            s.push_str(&quant_constants(1));
        }
        let mla_heads = match self.op {
            RowOp::MlaAbsorb { heads, nope, rope, v, .. } | RowOp::MlaAbsorbMma { heads, nope, rope, v } => {
                Some((heads, nope, rope, v))
            }
            RowOp::MlaUpV { heads, nope, v, .. } | RowOp::MlaUpVMma { heads, nope, v } => Some((heads, nope, 0, v)),
            _ => None,
        };
        if let Some((heads, nope, rope, v)) = mla_heads {
            let _ = writeln!(s, "%cH = arith.constant {heads} : index");
            let _ = writeln!(s, "%cNope = arith.constant {nope} : index");
            let _ = writeln!(s, "%cRope = arith.constant {rope} : index");
            let _ = writeln!(s, "%cV = arith.constant {v} : index");
            let _ = writeln!(s, "%cPerHead = arith.constant {} : index", nope + v);
            let _ = writeln!(s, "%c128 = arith.constant 128 : index");
            if let RowOp::MlaUpV { .. } | RowOp::MlaUpVMma { .. } = self.op {
                s.push_str(&quant_constants(1));
            }
        }
        if let RowOp::MlaHeadsOut { heads, quantize } = self.op {
            let _ = writeln!(s, "%cV = arith.constant {} : index", self.d / heads);
            if quantize {
                s.push_str(&quant_constants(self.groups()));
            }
        }
        if let RowOp::SiluMul { quantize } = self.op {
            let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
            if quantize {
                s.push_str(&quant_constants(self.groups()));
            }
        }
        if let RowOp::RmsNorm { .. }
        | RowOp::Latent { .. }
        | RowOp::LatentKey { .. }
        | RowOp::SiluMul { quantize: true }
        | RowOp::MlaHeadsOut { quantize: true, .. } = self.op
        {
            // The chunks of columns of the norm (`norm_phases`) and the quantization
            // (`quant_phases_wide`).
            let chunk = self.vec_chunk();
            let _ = writeln!(s, "%cVec = arith.constant {chunk} : index");
            let _ = writeln!(s, "%cVecs = arith.constant {} : index", self.d / chunk);
        }
        if let RowOp::RmsNorm { eps, quantize, .. } = self.op {
            let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
            // Hexadecimal bit patterns: exactly the f32 values, whatever their decimal spelling.
            let _ = writeln!(s, "%fD = arith.constant 0x{:08X} : f32", (self.d as f32).to_bits());
            let _ = writeln!(s, "%eps = arith.constant 0x{:08X} : f32", eps.to_bits());
            if quantize {
                s.push_str(&quant_constants(self.groups()));
            }
        }
        s
    }

    /// The tensor-core absorb's operand shapes ([`RowOp::MlaAbsorbMma`]).
    fn absorb(&self) -> Option<mla_mma::Absorb> {
        match self.op {
            RowOp::MlaAbsorbMma { nope, rope, .. } => {
                Some(mla_mma::Absorb { nope, rope, bf16_weight: self.weight == "bf16" })
            }
            _ => None,
        }
    }

    /// The tensor-core up-projection's shape ([`RowOp::MlaUpVMma`]).
    fn up_v(&self) -> Option<mla_mma::UpV> {
        match self.op {
            RowOp::MlaUpVMma { v, .. } => Some(mla_mma::UpV { v, bf16_weight: self.weight == "bf16" }),
            _ => None,
        }
    }

    /// The weight (or table) element at `index` as f32, into `%{out}`.
    fn load_weight(&self, out: &str, memref: &str, index: &str) -> String {
        let w = &self.weight;
        let ty = if memref == "%w" { format!("memref<?x{w}>") } else { format!("memref<?x?x{w}>") };
        if w == "f32" {
            format!("%{out} = memref.load {memref}[{index}] : {ty}\n")
        } else {
            format!("%{out}_raw = memref.load {memref}[{index}] : {ty}\n%{out} = arith.extf %{out}_raw : {w} to f32\n")
        }
    }

    /// kv_b's element (row, col) into `{out}` as f32: e4m3 decoded and scaled by its 128x128 block's
    /// scale as read, bf16 widened.
    fn kv_b_weight(&self, row: &str, col: &str, out: &str, lowering: Lowering) -> String {
        self.kv_b_weight_scaled(row, col, out, None, lowering)
    }

    /// [`Self::kv_b_weight`], the block's scale already in `scale` when given (e4m3 weights).
    fn kv_b_weight_scaled(&self, row: &str, col: &str, out: &str, scale: Option<&str>, lowering: Lowering) -> String {
        if self.weight == "bf16" {
            return format!(
                "{out}_raw = memref.load %kv_b[{row}, {col}] : memref<?x?xbf16>
{out} = arith.extf {out}_raw : bf16 to f32
"
            );
        }
        let load = match scale {
            Some(s) => format!("{out}_s = arith.addf {s}, %zero : f32\n"),
            None => format!(
                "{out}_br = arith.divui {row}, %c128 : index
{out}_bc = arith.divui {col}, %c128 : index
{out}_s = memref.load %kv_b_scale[{out}_br, {out}_bc] : memref<?x?xf32>
"
            ),
        };
        format!(
            "{out}_byte = memref.load %kv_b[{row}, {col}] : memref<?x?xi8>
{dec}{load}{out} = arith.mulf {out}_f, {out}_s : f32
",
            dec = decode_e4m3(&format!("{out}_byte"), &format!("{out}_f"), lowering),
        )
    }

    /// MLA attention's last phases, from the heads' latent outputs in `sh_o` (block (b, h), or
    /// [`RowOp::MlaUpV`]'s tokens: token t's at `t d`): `out[e] = sum_a o[a] W_UV[e, a]` (each a
    /// sequential sum, each weight read once for all tokens), then the f32 graph's rows as they
    /// are, or each head's 1x128 group quantized (token t's scale via `sh_red[2 + t]`: the phases
    /// need `%c2`).
    fn up_v_phases(&self, lowering: Lowering) -> Vec<String> {
        let sh = |name: &str| self.shared_type(name, lowering);
        let (o, out, red) = (sh("sh_o"), sh("sh_out"), sh("sh_red"));
        let bf16 = self.weight == "bf16";
        let (v, tiled) = match self.op {
            RowOp::MlaUpV { v, tokens, .. } => (v, Some(tokens)),
            RowOp::MlaDecode { v, .. } => (v, None),
            _ => unreachable!("the up-projection of MLA's rows"),
        };
        let n = tiled.unwrap_or(1);
        // Per count k of tokens a loop carries: the tokens' offsets, the products' sums, the
        // loop-carried values.
        let offsets_of = |k: usize| -> String {
            (0..k)
                .map(|t| {
                    format!(
                        "%ooff{t} = arith.constant {} : index\n%voff{t} = arith.constant {} : index\n",
                        t * self.d,
                        t * v
                    )
                })
                .collect()
        };
        let offsets = offsets_of(n);
        let sums_of = |k: usize| -> String {
            (0..k)
                .map(|t| {
                    format!(
                        "    %oi{t} = arith.addi %a, %ooff{t} : index
    %ov{t} = memref.load %sh_o[%oi{t}] : {o}
    %m{t} = arith.mulf %ov{t}, %wv : f32
    %n{t} = arith.addf %s{t}, %m{t} : f32
"
                    )
                })
                .collect()
        };
        let list = |k: usize, f: &dyn Fn(usize) -> String| (0..k).map(f).collect::<Vec<_>>().join(", ");
        let stores: String = (0..n)
            .map(|t| {
                format!(
                    "  %si{t} = arith.addi %e, %voff{t} : index\n  memref.store %acc#{t}, %sh_out[%si{t}] : {out}\n"
                )
            })
            .collect();
        let mut phases = Vec::new();
        let types_of = |k: usize| vec!["f32"; k].join(", ");
        let w = self.kv_b_weight("%vrow", "%a", "%wv", lowering);
        phases.push(match lowering {
            // On the GPU a warp takes an output element e: lane l reads W_UV[e, l], [e, l + 32],
            // ... (a warp's loads 32 adjacent weights: whole sectors, where a thread per element
            // read weights a row apart), then shuffles add the lanes' parts ([`lane_sums`]). (`T`
            // and the loop's bound are multiples of 32: a warp's lanes loop together.) A block of
            // one token carries one sum ([`one_token_or_all`]). Latent rows of whole 128-column
            // blocks: the loop over a block's columns unrolled (the same order).
            Lowering::Gpu => one_token_or_all(tiled, |k| {
                let (butterfly, stores) = lane_sums(k, v, &out);
                let shifts: String =
                    [16, 8, 4, 2, 1].iter().map(|o| format!("%o{o} = arith.constant {o} : i32\n")).collect();
                let (columns, block, yields) = if self.d.is_multiple_of(128) {
                    let mut body = String::new();
                    let mut columns = String::new();
                    for i in 0..4 {
                        let _ = writeln!(columns, "%k32_{i} = arith.constant {} : index", 32 * i);
                        let _ = writeln!(body, "    %a{i} = arith.addi %a, %k32_{i} : index");
                        body.push_str(&indent2(&indent2(&self.kv_b_weight_scaled(
                            "%vrow",
                            &format!("%a{i}"),
                            &format!("%wv{i}"),
                            (!bf16).then_some("%wblk_s"),
                            lowering,
                        ))));
                    }
                    let mut sums: Vec<String> = (0..k).map(|t| format!("%bs{t}")).collect();
                    for (t, sum) in sums.iter_mut().enumerate() {
                        for i in 0..4 {
                            let _ = writeln!(
                                body,
                                "    %oi{t}_{i} = arith.addi %a{i}, %ooff{t} : index
    %ov{t}_{i} = memref.load %sh_o[%oi{t}_{i}] : {o}
    %m{t}_{i} = arith.mulf %ov{t}_{i}, %wv{i} : f32
    %n{t}_{i} = arith.addf {sum}, %m{t}_{i} : f32"
                            );
                            *sum = format!("%n{t}_{i}");
                        }
                    }
                    (columns, format!("    %a = arith.addi %ab, %lane : index\n{body}"), sums.join(", "))
                } else {
                    let block = format!(
                        "    %a_end0 = arith.addi %ab, %c128 : index
    %a_end = arith.minui %a_end0, %cD : index
    %a0 = arith.addi %ab, %lane : index
    %blk:{k} = scf.for %a = %a0 to %a_end step %lanes iter_args({block_inits}) -> ({types}) {{
{w}{sums}      scf.yield {yields} : {types}
    }}
",
                        sums = sums_of(k),
                        types = types_of(k),
                        yields = list(k, &|t| format!("%n{t}")),
                        block_inits = list(k, &|t| format!("%s{t} = %bs{t}")),
                        w = self.kv_b_weight_scaled("%vrow", "%a", "%wv", (!bf16).then_some("%wblk_s"), lowering),
                    );
                    (String::new(), block, list(k, &|t| format!("%blk#{t}")))
                };
                format!(
                    "{offsets}{shifts}{columns}%lanes = arith.constant 32 : index
%width = arith.constant 32 : i32
%cVW = arith.constant {vw} : index
scf.for %j = %tid to %cVW step %cT {{
  %e = arith.divui %j, %lanes : index
  %lane = arith.remui %j, %lanes : index
  %vrow0 = arith.addi %head_row, %cNope : index
  %vrow = arith.addi %vrow0, %e : index
  %acc:{k} = scf.for %ab = %c0 to %cD step %c128 iter_args({inits}) -> ({types}) {{
{scale}{block}    scf.yield {yields} : {types}
  }}
{butterfly}{stores}}}
",
                    offsets = offsets_of(k),
                    vw = v * 32,
                    // Each 128-column block's scale once (e4m3 weights; the same for all its weights).
                    scale = if bf16 {
                        String::new()
                    } else {
                        "    %wblk_r = arith.divui %vrow, %c128 : index
    %wblk_c = arith.divui %ab, %c128 : index
    %wblk_s = memref.load %kv_b_scale[%wblk_r, %wblk_c] : memref<?x?xf32>
"
                        .to_string()
                    },
                    types = types_of(k),
                    inits = list(k, &|t| format!("%bs{t} = %zero")),
                )
            }),
            Lowering::Cpu => format!(
                "{offsets}scf.for %e = %tid to %cV step %cT {{
  %vrow0 = arith.addi %head_row, %cNope : index
  %vrow = arith.addi %vrow0, %e : index
  %acc:{n} = scf.for %a = %c0 to %cD step %c1 iter_args({inits}) -> ({types}) {{
{w}{sums}    scf.yield {yields} : {types}
  }}
{stores}}}
",
                sums = sums_of(n),
                inits = list(n, &|t| format!("%s{t} = %zero")),
                types = types_of(n),
                yields = list(n, &|t| format!("%n{t}")),
            ),
        });
        let out_row = |t: usize| {
            format!(
                "scf.for %e = %tid to %cV step %cT {{
  %si = arith.addi %e, %voff{t} : index
  %v = memref.load %sh_out[%si] : {out}
"
            )
        };
        if bf16 {
            // The f32 graph's: the heads' outputs as they are.
            let rows = per_token(tiled, |t| {
                format!(
                    "{}  %col = arith.addi %col0, %e : index\n  memref.store %v, %out[%bt{t}, %col] : memref<?x?xf32>\n}}\n",
                    out_row(t)
                )
            });
            phases.push(format!("{offsets}%col0 = arith.muli %h, %cV : index\n{rows}"));
            return phases;
        }
        // Each token's group: its scale (thread t), then its bytes.
        let scales = per_token(tiled, |t| {
            format!(
                "%tt = arith.constant {t} : index
%mine = arith.cmpi eq, %tid, %tt : index
scf.if %mine {{
  %m = scf.for %e = %c0 to %cV step %c1 iter_args(%mx = %zero) -> (f32) {{
    %si = arith.addi %e, %voff{t} : index
    %v = memref.load %sh_out[%si] : {out}
{step}    scf.yield %mx2 : f32
  }}
{scale}  memref.store %s, %scale[%bt{t}, %h] : memref<?x?xf32>
  %ri = arith.constant {} : index
  memref.store %s, %sh_red[%ri] : {red}
}}
",
                2 + t,
                step = indent2(&indent2(&amax_step("%v", "%mx", "%mx2"))),
                scale = indent2(&group_scale("%m", "%s")),
            )
        });
        phases.push(format!("{offsets}{scales}"));
        let bytes = per_token(tiled, |t| {
            format!(
                "%ri = arith.constant {} : index
%s = memref.load %sh_red[%ri] : {red}
{}  %qv = arith.divf %v, %s : f32
{encode}  %col = arith.addi %col0, %e : index
  memref.store %byte, %q[%bt{t}, %col] : memref<?x?xi8>
}}
",
                2 + t,
                out_row(t),
                encode = encode_e4m3(lowering, "%qv", "%byte"),
            )
        });
        phases.push(format!("{offsets}%col0 = arith.muli %h, %cV : index\n{bytes}"));
        phases
    }

    /// The gather's copy of token `%tok`'s e4m3 row into row `%row` of `%q`. On the GPU, 16 bytes
    /// a thread a step (one `ld.global.v4` and one `st.global.v4`) when the rows are whole
    /// 16-byte chunks and both buffers start on 16 bytes, else (and on the CPU) a byte a step:
    /// a warp's 32 bytes, a sector, a step — 16x the instructions.
    fn gather_bytes(&self, lowering: Lowering) -> String {
        let bytewise = |indent: &str| {
            format!(
                "{indent}scf.for %i = %tid to %cD step %cT {{
{indent}  %v = memref.load %x[%tok, %i] : memref<?x?xi8>
{indent}  memref.store %v, %q[%row, %i] : memref<?x?xi8>
{indent}}}
"
            )
        };
        if lowering == Lowering::Cpu || !self.d.is_multiple_of(16) {
            return bytewise("");
        }
        format!(
            "{flag}scf.if %g_vec {{
  %c16g = arith.constant 16 : index
  %cChunks = arith.constant {chunks} : index
  scf.for %ch = %tid to %cChunks step %cT {{
    %ch_col = arith.muli %ch, %c16g : index
    %ch_v = vector.load %x[%tok, %ch_col] {{alignment = 16 : i64}} : memref<?x?xi8>, vector<16xi8>
    vector.store %ch_v, %q[%row, %ch_col] {{alignment = 16 : i64}} : memref<?x?xi8>, vector<16xi8>
  }}
}} else {{
{}}}
",
            bytewise("  "),
            flag = aligned("g_vec", 16, &[("%x", "memref<?x?xi8>", 1), ("%q", "memref<?x?xi8>", 1)]),
            chunks = self.d / 16,
        )
    }

    /// The per-thread bodies, in order; a barrier separates consecutive phases.
    fn phases(&self, lowering: Lowering) -> Vec<String> {
        let sh = |name: &str| self.shared_type(name, lowering);
        match self.op {
            RowOp::Train(op) => op.phases(self, lowering),
            RowOp::Sparse(op) => op.phases(self, lowering),
            RowOp::Sample => sample::phases(self, lowering),
            RowOp::Scores => scores::phases(self, lowering),
            RowOp::MlaAbsorbMma { .. } => {
                let a = self.absorb().expect("the tensor-core absorb");
                a.phases(self.d, lowering, &sh("sh_mma"))
            }
            RowOp::MlaUpVMma { .. } => {
                let u = self.up_v().expect("the tensor-core up-projection");
                u.phases(lowering, &sh("sh_mma"))
            }
            RowOp::Embed => {
                let p = format!(
                    "%zero_i64 = arith.constant 0 : i64
%id64 = memref.load %ids[%row] : memref<?xi64>
%id = arith.index_cast %id64 : i64 to index
%vocab = memref.dim %table, %c0 : memref<?x?x{w}>
%id_lo = arith.cmpi sge, %id64, %zero_i64 : i64
%id_hi = arith.cmpi slt, %id, %vocab : index
%id_ok = arith.andi %id_lo, %id_hi : i1
%id_safe = arith.select %id_ok, %id, %c0 : index
",
                    w = self.weight,
                );
                let scalar = format!(
                    "scf.for %i = %tid to %cD step %cT {{
{load}%v = arith.select %id_ok, %t, %zero : f32
memref.store %v, %out[%row, %i] : memref<?x?xf32>
}}
",
                    load = self.load_weight("t", "%table", "%id_safe, %i"),
                );
                // 4 columns of the table's row a load (widened), of the output's a store.
                let w = self.weight.as_str();
                let bytes = match w {
                    "f32" => 4,
                    "bf16" | "f16" => 2,
                    _ => return vec![p + &scalar],
                };
                let load = |u: usize| {
                    let raw = format!(
                        "%t4r_{u} = vector.load %table[%id_safe, %i{u}] {{alignment = {} : i64}} : memref<?x?x{w}>, vector<4x{w}>\n",
                        VEC * bytes
                    );
                    match w {
                        "f32" => raw.replace("%t4r_", "%t4_"),
                        _ => format!("{raw}%t4_{u} = arith.extf %t4r_{u} : vector<4x{w}> to vector<4xf32>\n"),
                    }
                };
                let store = |u: usize| {
                    format!(
                        "%v4_{u} = arith.select %id_ok, %t4_{u}, %zero4 : vector<4xf32>
vector.store %v4_{u}, %out[%row, %i{u}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
"
                    )
                };
                let table_ty = format!("memref<?x?x{w}>");
                let map = WideMap {
                    columns: self.d,
                    load: &load,
                    store: &store,
                    checks: vec![
                        (VEC * bytes, vec![("%table", table_ty.as_str(), bytes)]),
                        (16, vec![("%out", "memref<?x?xf32>", 4)]),
                    ],
                    setup: "%zero4 = vector.broadcast %zero : f32 to vector<4xf32>\n".to_string(),
                    scalar,
                };
                vec![p + &self.wide_map(lowering, "vec", &map)]
            }
            RowOp::RmsNorm { keep, quantize, .. } => {
                // y = w * (x * inv): kept, and/or into shared memory for the quantization.
                let row = sh("sh_row");
                let (mut scalar, mut vector, mut buffers) =
                    (String::new(), String::new(), vec![("%x", "memref<?x?xf32>", 4)]);
                if keep {
                    scalar.push_str("  memref.store %y_v, %y[%row, %i] : memref<?x?xf32>\n");
                    vector.push_str(
                        "    vector.store %y4, %y[%row, %i0] {alignment = 16 : i64} : memref<?x?xf32>, vector<4xf32>\n",
                    );
                    buffers.push(("%y", "memref<?x?xf32>", 4));
                }
                if quantize {
                    let _ = writeln!(scalar, "  memref.store %y_v, %sh_row[%i] : {row}");
                    let _ = writeln!(
                        vector,
                        "    vector.store %y4, %sh_row[%i0] {{alignment = 16 : i64}} : {row}, vector<4xf32>"
                    );
                }
                let store = NormStore { scalar, vector: Some((vector, buffers)) };
                let mut phases = self.norm_phases(lowering, ("%x", "%row"), None, &store, "");
                if quantize {
                    let value = |c: &str| format!("  %v = memref.load %sh_row[{c}] : {row}\n");
                    let value4 = |c: &str| {
                        format!(
                            "    %v4 = vector.load %sh_row[{c}] {{alignment = 16 : i64}} : {row}, vector<4xf32>\n{}",
                            extract4("%v4", "%v")
                        )
                    };
                    let quant = self.quant_phases_wide(lowering, &value, &Wide { value: &value4, buffers: vec![] });
                    phases.extend(quant);
                }
                phases
            }
            RowOp::HeadsRope { interleave, .. } => {
                // Per row: every head's columns past its rope copied, its rope columns rotated.
                let rotate = rope_rotation(
                    interleave,
                    false,
                    |c, out| {
                        format!(
                            "  {out}_col = arith.addi %head, {c} : index\n  {out} = memref.load %y[%row, {out}_col] : \
                             memref<?x?xf32>\n"
                        )
                    },
                    |v, c, _| format!("  memref.store {v}, %out[%row, %h, {c}] : memref<?x?x?xf32>\n"),
                );
                vec![format!(
                    "scf.if %ok {{\n{}{}}}\n}}\n",
                    head_columns(("%cPlainAll", "%cPlain", Some("%cR")), "%out"),
                    head_pairs(&rotate)
                )]
            }
            RowOp::SplitRope { heads, nope, rope, interleave } => {
                // Per row: every head's nope columns copied, its rope columns rotated.
                let columns = format!(
                    "{}{}{}}}\n",
                    head_columns(("%cNopeAll", "%cNope", None), "%q_nope"),
                    head_pairs("  %rope_base = arith.addi %head, %cNope : index\n"),
                    rope_rotation(
                        interleave,
                        false,
                        |c, out| {
                            format!(
                            "  {out}_col = arith.addi %rope_base, {c} : index\n  {out} = memref.load %y[%row, {out}_col] : \
                             memref<?x?xf32>\n"
                        )
                        },
                        |v, c, _| format!("  memref.store {v}, %q_pe[%row, %h, {c}] : memref<?x?x?xf32>\n"),
                    )
                );
                let wide = lowering == Lowering::Gpu
                    && nope.is_multiple_of(VEC)
                    && rope.is_multiple_of(if interleave { VEC } else { 2 * VEC });
                if !wide {
                    return vec![format!("scf.if %ok {{\n{columns}}}\n")];
                }
                // 16 bytes a load and a store where the buffers allow: a thread copies 4 nope
                // columns, and rotates 4 rope columns (two interleaved pairs, or the halves of 4
                // pairs of a half-split head), each pair as `rope_rotation` does.
                let flag = aligned(
                    "vec",
                    16,
                    &[
                        ("%y", "memref<?x?xf32>", 4),
                        ("%rope", "memref<?x?xf32>", 4),
                        ("%q_nope", "memref<?x?x?xf32>", 4),
                        ("%q_pe", "memref<?x?x?xf32>", 4),
                    ],
                );
                let (per_head, pairs) = if interleave { (rope / VEC, 2) } else { (rope / 2 / VEC, VEC) };
                let mut rotate = String::new();
                for k in 0..pairs {
                    let (x, y) = if interleave { (2 * k, 2 * k + 1) } else { (k, k) };
                    let (xs, ys) = if interleave { ("%pe4", "%pe4") } else { ("%pa4", "%pb4") };
                    let _ = write!(
                        rotate,
                        "    %x_r{k} = vector.extract {xs}[{x}] : f32 from vector<4xf32>
    %y_r{k} = vector.extract {ys}[{y}] : f32 from vector<4xf32>
    %cos_v{k} = vector.extract %cos{pairs}[{k}] : f32 from vector<{pairs}xf32>
    %sin_v{k} = vector.extract %sin{pairs}[{k}] : f32 from vector<{pairs}xf32>
    %xc{k} = arith.mulf %x_r{k}, %cos_v{k} : f32
    %ys{k} = arith.mulf %y_r{k}, %sin_v{k} : f32
    %ra{k} = arith.subf %xc{k}, %ys{k} : f32
    %yc{k} = arith.mulf %y_r{k}, %cos_v{k} : f32
    %xs{k} = arith.mulf %x_r{k}, %sin_v{k} : f32
    %rb{k} = arith.addf %yc{k}, %xs{k} : f32
"
                    );
                }
                let (load, store) = if interleave {
                    (
                        "    %pe4 = vector.load %y[%row, %col] {alignment = 16 : i64} : memref<?x?xf32>, vector<4xf32>\n",
                        "    %out4 = vector.from_elements %ra0, %rb0, %ra1, %rb1 : vector<4xf32>
    vector.store %out4, %q_pe[%row, %h, %k0] {alignment = 16 : i64} : memref<?x?x?xf32>, vector<4xf32>
",
                    )
                } else {
                    (
                        "    %colb = arith.addi %col, %cHalf : index
    %pa4 = vector.load %y[%row, %col] {alignment = 16 : i64} : memref<?x?xf32>, vector<4xf32>
    %pb4 = vector.load %y[%row, %colb] {alignment = 16 : i64} : memref<?x?xf32>, vector<4xf32>
",
                        "    %outa = vector.from_elements %ra0, %ra1, %ra2, %ra3 : vector<4xf32>
    %outb = vector.from_elements %rb0, %rb1, %rb2, %rb3 : vector<4xf32>
    %kb = arith.addi %k0, %cHalf : index
    vector.store %outa, %q_pe[%row, %h, %k0] {alignment = 16 : i64} : memref<?x?x?xf32>, vector<4xf32>
    vector.store %outb, %q_pe[%row, %h, %kb] {alignment = 16 : i64} : memref<?x?x?xf32>, vector<4xf32>
",
                    )
                };
                // The nope copy 4 chunks a step, their loads issued before the first store (a
                // chunk past the row's repeats the step's first and stores nothing). Where a
                // block's width is whole heads of chunks, a thread's chunks a step share their
                // column in the head: the heads `T / chunks` apart, no index arithmetic of their own.
                let unroll = if self.threads.is_multiple_of(nope / VEC) { NORM_UNROLL } else { 1 };
                let mut copy = format!(
                    "  %cStep = arith.constant {step} : index
  scf.for %jstep = %tid to %cNopeAll4 step %cStep {{
    %n_h = arith.divui %jstep, %cNope4 : index
    %n_cq = arith.remui %jstep, %cNope4 : index
    %n_c = arith.muli %n_cq, %cVecR : index
    %n_base = arith.muli %n_h, %cHead : index
    %n_col = arith.addi %n_base, %n_c : index
",
                    step = unroll * self.threads
                );
                for u in 0..unroll {
                    let heads_apart = u * self.threads / (nope / VEC);
                    let _ = write!(
                        copy,
                        "    %n_off{u} = arith.constant {off} : index
    %n_ju{u} = arith.addi %jstep, %n_off{u} : index
    %n_in{u} = arith.cmpi ult, %n_ju{u}, %cNopeAll4 : index
    %n_dh{u} = arith.constant {heads_apart} : index
    %n_h{u} = arith.addi %n_h, %n_dh{u} : index
    %n_dcol{u} = arith.constant {dcol} : index
    %n_colu{u} = arith.addi %n_col, %n_dcol{u} : index
    %n_col{u} = arith.select %n_in{u}, %n_colu{u}, %n_col : index
    %n_v{u} = vector.load %y[%row, %n_col{u}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
",
                        off = u * self.threads,
                        dcol = heads_apart * (nope + rope),
                    );
                }
                for u in 0..unroll {
                    let _ = write!(
                        copy,
                        "    scf.if %n_in{u} {{
      vector.store %n_v{u}, %q_nope[%row, %n_h{u}, %n_c] {{alignment = 16 : i64}} : memref<?x?x?xf32>, vector<4xf32>
    }}
"
                    );
                }
                copy.push_str("  }\n");
                vec![format!(
                    "scf.if %ok {{
{flag}scf.if %vec {{
  %cNope4 = arith.constant {nope4} : index
  %cNopeAll4 = arith.constant {nope_all4} : index
{copy}  %cPerHead4 = arith.constant {per_head} : index
  %cRopeAll4 = arith.constant {rope_all4} : index
  %cPairs = arith.constant {pairs} : index
  scf.for %j = %tid to %cRopeAll4 step %cT {{
    %h = arith.divui %j, %cPerHead4 : index
    %k = arith.remui %j, %cPerHead4 : index
    %k0 = arith.muli %k, %cVecR : index
    %i0 = arith.muli %k, %cPairs : index
    %head = arith.muli %h, %cHead : index
    %rope_base = arith.addi %head, %cNope : index
    %col = arith.addi %rope_base, %k0 : index
    %sin_col = arith.addi %i0, %cHalf : index
    %cos{pairs} = vector.load %rope[%p, %i0] {{alignment = {table_align} : i64}} : memref<?x?xf32>, vector<{pairs}xf32>
    %sin{pairs} = vector.load %rope[%p, %sin_col] {{alignment = {table_align} : i64}} : memref<?x?xf32>, vector<{pairs}xf32>
{load}{rotate}{store}  }}
}} else {{
{columns}}}
}}
",
                    nope4 = nope / VEC,
                    nope_all4 = heads * nope / VEC,
                    rope_all4 = heads * per_head,
                    table_align = 4 * pairs,
                    columns = indent2(&columns),
                )]
            }
            RowOp::RouteLogits { experts, tokens } => {
                let tile = experts.min(ROUTE_EXPERT_TILE);
                let (tile_ty, x_ty, acc) = (sh("sh_tile"), sh("sh_x"), sh("sh_acc"));
                let (cells, padded) = (tokens * tile, tile + 1);
                // 1: the block's sums cleared.
                let clear = format!(
                    "%cCells = arith.constant {cells} : index
scf.for %q = %tid to %cCells step %cT {{
  memref.store %zero, %sh_acc[%q] : {acc}
}}
"
                );
                // 2: per chunk of the split's columns, the block's experts' [tile, chunk] gate tile
                // read row by row (a warp takes consecutive columns of one expert) into shared
                // memory column-major with a padded stride (no bank conflicts either way), and the
                // tokens' columns beside it.
                let load = format!(
                    "{ROUTE_CHUNK_COLUMNS}%cTileCells = arith.constant {tile_cells} : index
%cPad = arith.constant {padded} : index
{}%cXs = arith.constant {x_cells} : index
{}",
                    grid_loop(
                        "%cTileCells",
                        "%cCh",
                        ("el", "%ne"),
                        ("j", "%n"),
                        &format!(
                            "    %e = arith.addi %e0, %el : index
    %i = arith.addi %i0, %j : index
{}    %slot0 = arith.muli %j, %cPad : index
    %slot = arith.addi %slot0, %el : index
    memref.store %gv, %sh_tile[%slot] : {tile_ty}
",
                            indent2(&indent2(&self.load_weight("gv", "%gate", "%e, %i")))
                        )
                    ),
                    grid_loop(
                        "%cXs",
                        "%cCh",
                        ("t", "%ntok"),
                        ("j", "%n"),
                        &format!(
                            "    %trow = arith.addi %row0, %t : index
    %i = arith.addi %i0, %j : index
    %xv = memref.load %x[%trow, %i] : memref<?x?xf32>
    memref.store %xv, %sh_x[%q] : {x_ty}
"
                        )
                    ),
                    tile_cells = route_chunk(self.d) * tile,
                    x_cells = route_chunk(self.d) * tokens,
                );
                // 3: a thread per (expert, `per` consecutive tokens) continues their sequential sums
                // over the chunk, each gate value read once for its tokens (the sums of tokens past
                // the block's never leave shared memory).
                let per = route_tokens_per_thread(tokens, tile, self.threads);
                let each = |f: &dyn Fn(usize) -> String| (0..per).map(f).collect::<String>();
                let list = |f: &dyn Fn(usize) -> String| (0..per).map(f).collect::<Vec<_>>().join(", ");
                let sums = format!(
                    "{ROUTE_CHUNK_COLUMNS}%cTE = arith.constant {tile} : index
%cPad = arith.constant {padded} : index
%cPer = arith.constant {per} : index
%cWork = arith.constant {work} : index
scf.for %q = %tid to %cWork step %cT {{
  %tg = arith.divui %q, %cTE : index
  %el = arith.remui %q, %cTE : index
  %tfirst = arith.muli %tg, %cPer : index
  %t_in = arith.cmpi ult, %tfirst, %ntok : index
  %e_in = arith.cmpi ult, %el, %ne : index
  %in = arith.andi %t_in, %e_in : i1
  scf.if %in {{
{starts}    %sums:{per} = scf.for %j = %c0 to %n step %c1 iter_args({args}) -> ({types}) {{
      %slot0 = arith.muli %j, %cPad : index
      %slot = arith.addi %slot0, %el : index
      %gv = memref.load %sh_tile[%slot] : {tile_ty}
{products}      scf.yield {yields} : {types}
    }}
{stores}  }}
}}
",
                    work = cells / per,
                    starts = each(&|k| format!(
                        "    %ck{k} = arith.constant {k} : index
    %t{k} = arith.addi %tfirst, %ck{k} : index
    %xo{k} = arith.muli %t{k}, %cCh : index
    %ac0{k} = arith.muli %t{k}, %cTE : index
    %ac{k} = arith.addi %ac0{k}, %el : index
    %a0{k} = memref.load %sh_acc[%ac{k}] : {acc}
"
                    )),
                    args = list(&|k| format!("%a{k} = %a0{k}")),
                    types = vec!["f32"; per].join(", "),
                    products = each(&|k| format!(
                        "      %xi{k} = arith.addi %xo{k}, %j : index
      %xv{k} = memref.load %sh_x[%xi{k}] : {x_ty}
      %p{k} = arith.mulf %xv{k}, %gv : f32
      %b{k} = arith.addf %a{k}, %p{k} : f32
"
                    )),
                    yields = list(&|k| format!("%b{k}")),
                    stores = each(&|k| format!("    memref.store %sums#{k}, %sh_acc[%ac{k}] : {acc}\n")),
                );
                // 4: the pieces out, consecutive threads at consecutive experts.
                let store = format!(
                    "%cTE = arith.constant {tile} : index
%cCells = arith.constant {cells} : index
%cE = arith.constant {experts} : index
%pc0 = arith.muli %split, %cE : index
%pcol0 = arith.addi %pc0, %e0 : index
{}",
                    grid_loop(
                        "%cCells",
                        "%cTE",
                        ("t", "%ntok"),
                        ("el", "%ne"),
                        &format!(
                            "    %v = memref.load %sh_acc[%q] : {acc}
    %trow = arith.addi %row0, %t : index
    %pcol = arith.addi %pcol0, %el : index
    memref.store %v, %parts[%trow, %pcol] : memref<?x?xf32>
"
                        )
                    )
                );
                let mut phases = vec![clear];
                phases.extend(loop_phases("chunk", "nchunks", vec![load, sums]));
                phases.push(store);
                phases
            }
            RowOp::Route { experts, top_k, n_group, topk_group, norm, scale, tokens, pieces, softmax } => {
                let per = experts / n_group;
                let (acc, flag, gflag) = (sh("sh_acc"), sh("sh_flag"), sh("sh_gflag"));
                let (sb, gscore, w_ty) = (sh("sh_sb"), sh("sh_gscore"), sh("sh_w"));
                // 1: the block's selection flags cleared.
                let clear = format!(
                    "%cEG = arith.constant {eg} : index
scf.for %q = %tid to %cEG step %cT {{
  memref.store %zero, %sh_flag[%q] : {flag}
}}
%cGG = arith.constant {gg} : index
scf.for %q = %tid to %cGG step %cT {{
  memref.store %zero, %sh_gflag[%q] : {gflag}
  memref.store %zero, %sh_gscore[%q] : {gscore}
}}
",
                    eg = tokens * experts,
                    gg = tokens * n_group,
                );
                // 2: per (token, expert) its logit, the pieces summed in split order (consecutive
                // threads read consecutive experts' pieces), its score and biased score.
                let logits = format!(
                    "%cE = arith.constant {experts} : index
%cS = arith.constant {pieces} : index
%all = arith.muli %ntok, %cE : index
scf.for %q = %tid to %all step %cT {{
  %t = arith.divui %q, %cE : index
  %e = arith.remui %q, %cE : index
  %prow = arith.addi %row0, %t : index
  %logit = scf.for %s = %c0 to %cS step %c1 iter_args(%a = %zero) -> (f32) {{
    %pc0 = arith.muli %s, %cE : index
    %pc = arith.addi %pc0, %e : index
    %pv = memref.load %parts[%prow, %pc] : memref<?x?xf32>
    %a2 = arith.addf %a, %pv : f32
    scf.yield %a2 : f32
  }}
{score}}}
",
                    score = if softmax {
                        format!("  memref.store %logit, %sh_acc[%q] : {acc}\n")
                    } else {
                        format!(
                            "  %neg = arith.negf %logit : f32
{exp}  %den = arith.addf %one, %ex : f32
  %s = arith.divf %one, %den : f32
  %b = memref.load %bias[%e] : memref<?xf32>
  %sbv = arith.addf %s, %b : f32
  memref.store %s, %sh_acc[%q] : {acc}
  memref.store %sbv, %sh_sb[%q] : {sb}
",
                            exp = exp(lowering, "%neg", "%ex")
                        )
                    },
                );
                // 4: a thread per token selects, as the reference sorts: group scores (top two), the
                // best groups, the best experts in them (strictly greater wins: ties to the lower
                // index); its cells of the shared arrays from `%te` (experts), `%tg` (groups), `%tk`.
                let weights = if norm {
                    format!(
                        "%sum = scf.for %j = %c0 to %cK step %c1 iter_args(%a = %zero) -> (f32) {{
    %wj = arith.addi %tk, %j : index
    %v = memref.load %sh_w[%wj] : {w_ty}
    %a2 = arith.addf %a, %v : f32
    scf.yield %a2 : f32
  }}
  %tiny = arith.constant 1.0e-20 : f32
  %total = arith.addf %sum, %tiny : f32
  scf.for %j = %c0 to %cK step %c1 {{
    %wj = arith.addi %tk, %j : index
    %v = memref.load %sh_w[%wj] : {w_ty}
    %n = arith.divf %v, %total : f32
    %sc = arith.mulf %n, %scale : f32
    memref.store %sc, %w[%trow, %j] : memref<?x?xf32>
  }}
"
                    )
                } else {
                    format!(
                        "scf.for %j = %c0 to %cK step %c1 {{
    %wj = arith.addi %tk, %j : index
    %v = memref.load %sh_w[%wj] : {w_ty}
    %sc = arith.mulf %v, %scale : f32
    memref.store %sc, %w[%trow, %j] : memref<?x?xf32>
  }}
"
                    )
                };
                let select = format!(
                    "%mine = arith.cmpi ult, %tid, %ntok : index
scf.if %mine {{
  %ninf = arith.constant 0xFF800000 : f32
  %cE = arith.constant {experts} : index
  %cGr = arith.constant {n_group} : index
  %cPer = arith.constant {per} : index
  %cKg = arith.constant {topk_group} : index
  %cK = arith.constant {top_k} : index
  %scale = arith.constant 0x{scale_bits:08X} : f32
  %trow = arith.addi %row0, %tid : index
  %te = arith.muli %tid, %cE : index
  %tg = arith.muli %tid, %cGr : index
  %tk = arith.muli %tid, %cK : index
  scf.for %g = %c0 to %cGr step %c1 {{
    %gb = arith.muli %g, %cPer : index
    %ge = arith.addi %gb, %cPer : index
    %top:2 = scf.for %i = %gb to %ge step %c1 iter_args(%a = %ninf, %b = %ninf) -> (f32, f32) {{
      %ie = arith.addi %te, %i : index
      %v = memref.load %sh_sb[%ie] : {sb}
      %gta = arith.cmpf ogt, %v, %a : f32
      %gtb = arith.cmpf ogt, %v, %b : f32
      %na = arith.select %gta, %v, %a : f32
      %nb0 = arith.select %gtb, %v, %b : f32
      %nb = arith.select %gta, %a, %nb0 : f32
      scf.yield %na, %nb : f32, f32
    }}
    %gs = arith.addf %top#0, {second} : f32
    %gg = arith.addi %tg, %g : index
    memref.store %gs, %sh_gscore[%gg] : {gscore}
  }}
  scf.for %j = %c0 to %cKg step %c1 {{
    %best:2 = scf.for %g = %c0 to %cGr step %c1 iter_args(%bv = %ninf, %bi = %cGr) -> (f32, index) {{
      %gg = arith.addi %tg, %g : index
      %kept = memref.load %sh_gflag[%gg] : {gflag}
      %free = arith.cmpf oeq, %kept, %zero : f32
      %v = memref.load %sh_gscore[%gg] : {gscore}
      %gt = arith.cmpf ogt, %v, %bv : f32
      %none = arith.cmpi eq, %bi, %cGr : index
      %better = arith.ori %gt, %none : i1
      %take = arith.andi %free, %better : i1
      %nv = arith.select %take, %v, %bv : f32
      %ni = arith.select %take, %g, %bi : index
      scf.yield %nv, %ni : f32, index
    }}
    %bg = arith.addi %tg, %best#1 : index
    memref.store %one, %sh_gflag[%bg] : {gflag}
  }}
  scf.for %j = %c0 to %cK step %c1 {{
    %best:2 = scf.for %e = %c0 to %cE step %c1 iter_args(%bv = %ninf, %bi = %cE) -> (f32, index) {{
      %g = arith.divui %e, %cPer : index
      %gg = arith.addi %tg, %g : index
      %gk = memref.load %sh_gflag[%gg] : {gflag}
      %ingroup = arith.cmpf oeq, %gk, %one : f32
      %ee = arith.addi %te, %e : index
      %ch = memref.load %sh_flag[%ee] : {flag}
      %free = arith.cmpf oeq, %ch, %zero : f32
      %ok = arith.andi %ingroup, %free : i1
      %v = memref.load %sh_sb[%ee] : {sb}
      %gt = arith.cmpf ogt, %v, %bv : f32
      %none = arith.cmpi eq, %bi, %cE : index
      %better = arith.ori %gt, %none : i1
      %take = arith.andi %ok, %better : i1
      %nv = arith.select %take, %v, %bv : f32
      %ni = arith.select %take, %e, %bi : index
      scf.yield %nv, %ni : f32, index
    }}
    %be = arith.addi %te, %best#1 : index
    memref.store %one, %sh_flag[%be] : {flag}
    %e32 = arith.index_cast %best#1 : index to i32
    memref.store %e32, %idx[%trow, %j] : memref<?x?xi32>
    %sv = memref.load %sh_acc[%be] : {acc}
    %wj = arith.addi %tk, %j : index
    memref.store %sv, %sh_w[%wj] : {w_ty}
  }}
  {weights}}}
",
                    scale_bits = scale.to_bits(),
                    second = if softmax { "%zero" } else { "%top#1" },
                );
                let shape = RouteShape { experts, n_group, topk_group, top_k, threads: self.threads, softmax };
                let select = match lowering {
                    Lowering::Gpu => route_select_warp(shape, scale, &weights, (&sb, &acc, &w_ty)),
                    Lowering::Cpu => select,
                };
                if softmax {
                    let scores = route_softmax(lowering, experts, self.threads, (&acc, &sb));
                    return vec![clear, logits, scores, select];
                }
                vec![clear, logits, select]
            }
            RowOp::Dispatch { experts, shared } => {
                let (count, off) = (sh("sh_count"), sh("sh_off"));
                let chunks = PairChunks { experts: "%cE".into(), chunks: pair_chunks(experts), cc: sh("sh_cc") };
                let header = format!(
                    "%cE = arith.constant {experts} : index
%cES = arith.constant {total} : index
%cS = arith.constant {shared} : index
%nt = memref.dim %idx, %c0 : memref<?x?xi32>
%width = memref.dim %sorted, %c1 : memref<?x?xi32>
",
                    total = experts + shared
                );
                // 3: per routed expert its rows.
                let totals = chunks.totals(&format!("  memref.store %n, %sh_count[%e] : {count}\n"));
                // 4: the offsets (the shared experts take every token).
                let scan = format!(
                    "%is0 = arith.cmpi eq, %tid, %c0 : index
scf.if %is0 {{
  %zero_i32 = arith.constant 0 : i32
  %nt32 = arith.index_cast %nt : index to i32
  %end = scf.for %e = %c0 to %cES step %c1 iter_args(%start = %zero_i32) -> (i32) {{
    %routed = arith.cmpi ult, %e, %cE : index
    %n = scf.if %routed -> (i32) {{
      %c = memref.load %sh_count[%e] : {count}
      scf.yield %c : i32
    }} else {{
      scf.yield %nt32 : i32
    }}
    memref.store %start, %offsets[%e] : memref<?xi32>
    memref.store %start, %sh_off[%e] : {off}
    %next = arith.addi %start, %n : i32
    scf.yield %next : i32
  }}
  memref.store %end, %offsets[%cES] : memref<?xi32>
}}
"
                );
                // 5: each chunk's pairs into their experts' rows in pair order (so every expert's rows
                // are in token order); every token into each shared expert's rows.
                let place = chunks.walk(&format!(
                    "      %o32 = memref.load %sh_off[%e] : {off}
      %q32 = arith.addi %o32, %n : i32
      %q = arith.index_cast %q32 : i32 to index
      %r = arith.divui %q, %width : index
      %c = arith.remui %q, %width : index
      %t32 = arith.index_cast %t : index to i32
      %wv = memref.load %w[%t, %k] : memref<?x?xf32>
      memref.store %t32, %sorted[%r, %c] : memref<?x?xi32>
      memref.store %wv, %rw[%r, %c] : memref<?x?xf32>
"
                ));
                let shared_rows = format!(
                    "%one_f = arith.constant 1.0 : f32
scf.for %s = %tid to %cS step %cT {{
  %e = arith.addi %cE, %s : index
  %o32 = memref.load %sh_off[%e] : {off}
  %o = arith.index_cast %o32 : i32 to index
  scf.for %t = %c0 to %nt step %c1 {{
    %t32 = arith.index_cast %t : index to i32
    %q = arith.addi %o, %t : index
    %r = arith.divui %q, %width : index
    %c = arith.remui %q, %width : index
    memref.store %t32, %sorted[%r, %c] : memref<?x?xi32>
    memref.store %one_f, %rw[%r, %c] : memref<?x?xf32>
  }}
}}
"
                );
                // 1: the counts cleared; 2: each chunk's pairs counted per routed expert.
                [chunks.clear(), chunks.walk(""), totals, scan, format!("{place}{shared_rows}")]
                    .into_iter()
                    .map(|phase| format!("{header}{phase}"))
                    .collect()
            }
            RowOp::SplitBf16 | RowOp::SplitBf16T => {
                let round = round_bf16;
                let transposed = self.op == RowOp::SplitBf16T;
                let at = if transposed { "%i, %row" } else { "%row, %i" };
                // Transposed: x's last row also zeroes the padding columns.
                let pad = if transposed {
                    "%R = memref.dim %x, %c0 : memref<?x?xf32>
%Rp = memref.dim %lo, %c1 : memref<?x?xbf16>
%R1 = arith.subi %R, %c1 : index
%last = arith.cmpi eq, %row, %R1 : index
scf.if %last {
  %bf_zero = arith.constant 0.0 : bf16
  scf.for %i = %tid to %cD step %cT {
    scf.for %p = %R to %Rp step %c1 {
      memref.store %bf_zero, %hi[%i, %p] : memref<?x?xbf16>
      memref.store %bf_zero, %lo[%i, %p] : memref<?x?xbf16>
    }
  }
}
"
                } else {
                    ""
                };
                let scalar = format!(
                    "scf.for %i = %tid to %cD step %cT {{
  %v = memref.load %x[%row, %i] : memref<?x?xf32>
{}  %rest = arith.subf %v, %h_f : f32
{}  memref.store %h, %hi[{at}] : memref<?x?xbf16>
  memref.store %l, %lo[{at}] : memref<?x?xbf16>
}}
",
                    round("%v", "%h"),
                    round("%rest", "%l")
                );
                let split = if transposed {
                    scalar
                } else {
                    // 4 columns a load of x, a store of hi and of lo.
                    let load = |u: usize| {
                        format!(
                            "%x4_{u} = vector.load %x[%row, %i{u}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>\n"
                        )
                    };
                    let store = |u: usize| {
                        format!(
                            "{}%rest4_{u} = arith.subf %x4_{u}, %h4_{u}_f : vector<4xf32>
{}vector.store %h4_{u}, %hi[%row, %i{u}] {{alignment = 8 : i64}} : memref<?x?xbf16>, vector<4xbf16>
vector.store %l4_{u}, %lo[%row, %i{u}] {{alignment = 8 : i64}} : memref<?x?xbf16>, vector<4xbf16>
",
                            unindent(&round_bf16_lanes(&format!("%x4_{u}"), &format!("%h4_{u}"), VEC)),
                            unindent(&round_bf16_lanes(&format!("%rest4_{u}"), &format!("%l4_{u}"), VEC)),
                        )
                    };
                    self.wide_map(
                        lowering,
                        "vec",
                        &WideMap {
                            columns: self.d,
                            load: &load,
                            store: &store,
                            checks: vec![
                                (16, vec![("%x", "memref<?x?xf32>", 4)]),
                                (8, vec![("%hi", "memref<?x?xbf16>", 2), ("%lo", "memref<?x?xbf16>", 2)]),
                            ],
                            setup: BF16_CONSTANTS_VEC.to_string(),
                            scalar,
                        },
                    )
                };
                vec![format!("{BF16_CONSTANTS}{split}{pad}")]
            }
            RowOp::MlaKeys { heads, nope, rope, v, cache } => {
                // Per head: its nope key columns and value columns of the row (bf16 as they come,
                // f32 rounded), the shared rope key (an fp8 row's: its two bytes).
                let w = self.weight.as_str();
                let kv_ty = format!("memref<?x?x{w}>");
                let kv_bytes = if w == "f32" { 4 } else { 2 };
                // kv's columns: head h's nope, then its value columns.
                let kv_read = |first: &'static str| {
                    let kv_ty = kv_ty.clone();
                    move |h: &str, c: &str| {
                        let n = h.trim_start_matches('%');
                        HeadRead {
                            index: format!(
                                "%{n}_base = arith.muli {h}, %cPerHead : index
%{n}_first = arith.addi %{n}_base, {first} : index
%{n}_kv = arith.addi %{n}_first, {c} : index
"
                            ),
                            memref: "%kv".into(),
                            ty: kv_ty.clone(),
                            lead: "%row, ".into(),
                            column: format!("%{n}_kv"),
                            element: if w == "f32" { Stored::F32 } else { Stored::Bf16 },
                        }
                    }
                };
                let (nope_read, val_read) = (kv_read("%c0"), kv_read("%cNope"));
                // The rope key every head shares: at column d of a cache row (an fp8 row's: its
                // bytes at the row's rope offset).
                let cache_ty = format!("memref<?x?x{}>", cache.element());
                let (rope_at, rope_element, cache_bytes) = match cache {
                    CacheRows::Fp8 => {
                        (v3c_runtime::plan::Fp8LatentRow { latent: self.d }.rope_offset(), Stored::Bf16Bytes, 1)
                    }
                    CacheRows::Bf16 => (self.d, Stored::Bf16, 2),
                    CacheRows::F32 => (self.d, Stored::F32, 4),
                };
                let rope_read = |_h: &str, c: &str| {
                    let n = c.trim_start_matches('%');
                    let bytes = if cache == CacheRows::Fp8 {
                        format!("%{n}_b = arith.muli {c}, %cTwo : index\n")
                    } else {
                        format!("%{n}_b = arith.addi {c}, %c0 : index\n")
                    };
                    HeadRead {
                        index: format!("{bytes}%{n}_at = arith.addi %{n}_b, %cRopeAt : index\n"),
                        memref: "%cache".into(),
                        ty: cache_ty.clone(),
                        lead: "%row, ".into(),
                        column: format!("%{n}_at"),
                        element: rope_element,
                    }
                };
                // A chunk of the rope key: 16 bytes of f32, else 8.
                let rope_align = if cache == CacheRows::F32 { 16 } else { 8 };
                let kv_check = || vec![(VEC * kv_bytes, vec![("%kv", kv_ty.as_str(), kv_bytes)])];
                let part = |flag: &str, width: usize, read: &dyn Fn(&str, &str) -> HeadRead, to, checks, wide| {
                    let map = HeadMajor { heads, width, read, rows: "%S", to, checks, wide };
                    self.head_major(lowering, flag, &map)
                };
                vec![format!(
                    "{BF16_CONSTANTS}%S = memref.dim %kv, %c0 : {kv_ty}
%cTwo = arith.constant 2 : index
%cPerHead = arith.constant {per_head} : index
%cNope = arith.constant {nope} : index
%cRopeAt = arith.constant {rope_at} : index
{}{}{}",
                    part("vec_n", nope, &nope_read, ("%k", None), kv_check(), true),
                    part(
                        "vec_r",
                        rope,
                        &rope_read,
                        ("%k", Some("%cNope")),
                        vec![(rope_align, vec![("%cache", cache_ty.as_str(), cache_bytes)])],
                        (rope_at * cache_bytes).is_multiple_of(rope_align),
                    ),
                    part("vec_v", v, &val_read, ("%vv", None), kv_check(), true),
                    per_head = nope + v,
                )]
            }
            RowOp::MlaQueries { heads, nope, rope } => {
                let ty3 = "memref<?x?x?xf32>";
                // A token's nope (then rope) columns of every head, head after head.
                let part = |flag: &str, from: &str, width: usize, at: Option<&str>| {
                    let read = |h: &str, c: &str| HeadRead {
                        index: String::new(),
                        memref: from.to_string(),
                        ty: ty3.to_string(),
                        lead: format!("%row, {h}, "),
                        column: c.to_string(),
                        element: Stored::F32,
                    };
                    let map = HeadMajor {
                        heads,
                        width,
                        read: &read,
                        rows: "%T",
                        to: ("%q", at),
                        checks: vec![(16, vec![(from, ty3, 4)])],
                        wide: true,
                    };
                    self.head_major(lowering, flag, &map)
                };
                vec![format!(
                    "{BF16_CONSTANTS}%T = memref.dim %q_nope, %c0 : {ty3}
%cNope = arith.constant {nope} : index
{}{}",
                    part("vec_n", "%q_nope", nope, None),
                    part("vec_r", "%q_pe", rope, Some("%cNope")),
                )]
            }
            RowOp::MlaHeadsOut { quantize, .. } => {
                // Column c of row t: head c / v's output row h * T + t, its column c mod v.
                let (rows_of, ty) = if quantize { ("%q", "i8") } else { ("%y", "f32") };
                let value = |c: &str| {
                    format!(
                        "  %ho_T = memref.dim {rows_of}, %c0 : memref<?x?x{ty}>
  %ho_h = arith.divui {c}, %cV : index
  %ho_c = arith.remui {c}, %cV : index
  %ho_r0 = arith.muli %ho_h, %ho_T : index
  %ho_r = arith.addi %ho_r0, %row : index
  %v = memref.load %o[%ho_r, %ho_c] : memref<?x?xf32>
"
                    )
                };
                // Four columns of a head (`v` is whole chunks: `vec_chunk`), 16 bytes a load.
                let value4 = |c: &str| {
                    format!(
                        "    %ho_T = memref.dim %q, %c0 : memref<?x?xi8>
    %ho_h = arith.divui {c}, %cV : index
    %ho_c = arith.remui {c}, %cV : index
    %ho_r0 = arith.muli %ho_h, %ho_T : index
    %ho_r = arith.addi %ho_r0, %row : index
    %ho_v4 = vector.load %o[%ho_r, %ho_c] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
{}",
                        extract4("%ho_v4", "%v")
                    )
                };
                if quantize {
                    let wide = Wide { value: &value4, buffers: vec![("%o", "memref<?x?xf32>", 4)] };
                    self.quant_phases_wide(lowering, &value, &wide)
                } else {
                    let scalar = format!(
                        "scf.for %i = %tid to %cD step %cT {{
{}  memref.store %v, %y[%row, %i] : memref<?x?xf32>
}}
",
                        value("%i")
                    );
                    if self.vec_chunk() != VEC {
                        return vec![scalar];
                    }
                    // A head's 4 columns a load, y's a store.
                    let ty = "memref<?x?xf32>";
                    let load = |u: usize| {
                        format!(
                            "%ho_h{u} = arith.divui %i{u}, %cV : index
%ho_c{u} = arith.remui %i{u}, %cV : index
%ho_r0_{u} = arith.muli %ho_h{u}, %ho_T : index
%ho_r{u} = arith.addi %ho_r0_{u}, %row : index
%ho_v4_{u} = vector.load %o[%ho_r{u}, %ho_c{u}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>
"
                        )
                    };
                    let store = |u: usize| {
                        format!(
                            "vector.store %ho_v4_{u}, %y[%row, %i{u}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>\n"
                        )
                    };
                    let map = WideMap {
                        columns: self.d,
                        load: &load,
                        store: &store,
                        checks: vec![(16, vec![("%o", ty, 4), ("%y", ty, 4)])],
                        setup: format!("%ho_T = memref.dim %y, %c0 : {ty}\n"),
                        scalar,
                    };
                    vec![self.wide_map(lowering, "vec", &map)]
                }
            }
            RowOp::Concat { second } => {
                // The second row's columns start at d: its chunks on 16 bytes where d is whole ones.
                vec![format!(
                    "{}%cB = arith.constant {second} : index
{}",
                    self.copy_columns(lowering, "vec_a", ("%x1", "%y", None), ("%cD", self.d), true),
                    self.copy_columns(
                        lowering,
                        "vec_b",
                        ("%x2", "%y", Some("%cD")),
                        ("%cB", second),
                        self.d.is_multiple_of(VEC)
                    ),
                )]
            }
            RowOp::MlaDecode { prefill, selected, .. } => {
                let t = |n: &str| sh(n);
                // A latent row's element: [b, j, col] of the decode caches, [j, col] of the prefill
                // latent; selected keys: row `%jr` (the key's selected row, see below) for `%j`.
                let j = if selected { "%jr" } else { "%j" };
                let lat = |col: &str| {
                    if prefill {
                        format!("%cache[{j}, {col}] : memref<?x?xf32>")
                    } else {
                        format!("%cache[%b, {j}, {col}] : memref<?x?x?xf32>")
                    }
                };
                let weight = |row: &str, col: &str, out: &str| self.kv_b_weight(row, col, out, lowering);
                let (qn, qpe, qa, pp, o, red) =
                    (t("sh_qn"), t("sh_qpe"), t("sh_qa"), t("sh_p"), t("sh_o"), t("sh_red"));
                let mut phases = vec![format!(
                    "scf.for %i = %tid to %cNope step %cT {{
  %v = memref.load %q_nope[%b, %h, %i] : memref<?x?x?xf32>
  memref.store %v, %sh_qn[%i] : {qn}
}}
scf.for %i = %tid to %cRope step %cT {{
  %v = memref.load %q_pe[%b, %h, %i] : memref<?x?x?xf32>
  memref.store %v, %sh_qpe[%i] : {qpe}
}}
"
                )];
                // q_abs[a] = sum_d q_nope[d] W_UK[d, a].
                phases.push(format!(
                    "scf.for %a = %tid to %cD step %cT {{
  %acc = scf.for %d = %c0 to %cNope step %c1 iter_args(%s = %zero) -> (f32) {{
    %qv = memref.load %sh_qn[%d] : {qn}
    %wrow = arith.addi %head_row, %d : index
{w}    %m = arith.mulf %qv, %wv : f32
    %s2 = arith.addf %s, %m : f32
    scf.yield %s2 : f32
  }}
  memref.store %acc, %sh_qa[%a] : {qa}
}}
",
                    w = weight("%wrow", "%a", "%wv")
                ));
                // Keys go through shared memory `context` at a time (a chunk): the max over every
                // chunk's scores, then the sum of exp(s - max) in key order, then P . latent into
                // `sh_o` in key order — each chunk's scores recomputed (the same bits) when there
                // are several, kept in `sh_p` when there is one. Every sum runs in the reference's
                // order across chunks, so the result does not depend on the chunking.
                let chunk = MLA_CHUNK;
                let scores = format!(
                    "scf.for %j = %j_first to %k1 step %cT {{
  %lat = scf.for %a = %c0 to %cD step %c1 iter_args(%s = %zero) -> (f32) {{
    %qv = memref.load %sh_qa[%a] : {qa}
    %cv = memref.load {lat_a}
    %m = arith.mulf %qv, %cv : f32
    %s2 = arith.addf %s, %m : f32
    scf.yield %s2 : f32
  }}
  %pe = scf.for %r = %c0 to %cRope step %c1 iter_args(%s = %zero) -> (f32) {{
    %qv = memref.load %sh_qpe[%r] : {qpe}
    %col = arith.addi %cD, %r : index
    %cv = memref.load {lat_col}
    %m = arith.mulf %qv, %cv : f32
    %s2 = arith.addf %s, %m : f32
    scf.yield %s2 : f32
  }}
  %sum = arith.addf %lat, %pe : f32
  %sc = arith.mulf %sum, %softmax_scale : f32
  %slot = arith.subi %j, %k0 : index
  memref.store %sc, %sh_p[%slot] : {pp}
}}
",
                    lat_a = lat("%a"),
                    lat_col = lat("%col"),
                );
                let exps = chunk_exps(lowering, &red, &pp);
                // The running max and sum (one thread), and o, start empty.
                phases.push(format!(
                    "%is0 = arith.cmpi eq, %tid, %c0 : index
scf.if %is0 {{
  %ninf = arith.constant 0xFF800000 : f32
  memref.store %ninf, %sh_red[%c0] : {red}
  memref.store %zero, %sh_red[%c1] : {red}
}}
scf.for %a = %tid to %cD step %cT {{
  memref.store %zero, %sh_o[%a] : {o}
}}
"
                ));
                phases.extend(loop_phases(
                    "chunk",
                    "nchunks",
                    vec![format!("{chunk}{scores}"), format!("{chunk}{}", chunk_max(&red, &pp))],
                ));
                // exp(s - max) per key; their sum in key order (one thread).
                let recompute = format!("scf.if %several {{\n{scores}}}\n");
                phases.extend(loop_phases(
                    "chunk",
                    "nchunks",
                    vec![
                        format!("{chunk}{recompute}"),
                        format!("{chunk}{exps}"),
                        format!(
                            "{chunk}%is0 = arith.cmpi eq, %tid, %c0 : index
scf.if %is0 {{
  %a0 = memref.load %sh_red[%c1] : {red}
  %sum = scf.for %j = %k0 to %k1 step %c1 iter_args(%a = %a0) -> (f32) {{
    %slot = arith.subi %j, %k0 : index
    %v = memref.load %sh_p[%slot] : {pp}
    %a2 = arith.addf %a, %v : f32
    scf.yield %a2 : f32
  }}
  memref.store %sum, %sh_red[%c1] : {red}
}}
"
                        ),
                    ],
                ));
                // p = e / sum (e recomputed when there are several chunks); o[a] += p_j latent_j[a].
                phases.extend(loop_phases(
                    "chunk",
                    "nchunks",
                    vec![
                        format!("{chunk}{recompute}"),
                        format!("{chunk}scf.if %several {{\n{exps}}}\n"),
                        format!(
                            "{chunk}%sum = memref.load %sh_red[%c1] : {red}
scf.for %j = %j_first to %k1 step %cT {{
  %slot = arith.subi %j, %k0 : index
  %v = memref.load %sh_p[%slot] : {pp}
  %pv = arith.divf %v, %sum : f32
  memref.store %pv, %sh_p[%slot] : {pp}
}}
"
                        ),
                        format!(
                            "{chunk}scf.for %a = %tid to %cD step %cT {{
  %o0 = memref.load %sh_o[%a] : {o}
  %acc = scf.for %j = %k0 to %k1 step %c1 iter_args(%s = %o0) -> (f32) {{
    %slot = arith.subi %j, %k0 : index
    %pv = memref.load %sh_p[%slot] : {pp}
    %cv = memref.load {lat_a}
    %m = arith.mulf %pv, %cv : f32
    %s2 = arith.addf %s, %m : f32
    scf.yield %s2 : f32
  }}
  memref.store %acc, %sh_o[%a] : {o}
}}
",
                            lat_a = lat("%a"),
                        ),
                    ],
                ));
                phases.extend(self.up_v_phases(lowering));
                if selected {
                    // Every loop over the keys starts by reading its key's row.
                    let row = "%jsel = memref.load %selected[%b, %j] : memref<?x?xi32>
%jsel_i = arith.index_cast %jsel : i32 to index
%jr = arith.minui %jsel_i, %last_slot : index
";
                    for phase in phases.iter_mut().filter(|p| p.contains("scf.for %j = ")) {
                        let mut text = String::new();
                        for line in phase.lines() {
                            text.push_str(line);
                            text.push('\n');
                            if line.contains("scf.for %j = ") {
                                text.push_str(row);
                            }
                        }
                        *phase = text;
                    }
                }
                with_c2(phases)
            }
            RowOp::MlaUpV { tokens, .. } => {
                let o = sh("sh_o");
                let loads = per_token(Some(tokens), |t| {
                    format!(
                        "%orow0 = arith.muli %bt{t}, %cH : index
%orow = arith.addi %orow0, %h : index
%ooff = arith.constant {} : index
scf.for %a = %tid to %cD step %cT {{
  %v = memref.load %o[%orow, %a] : memref<?x?xf32>
  %oi = arith.addi %a, %ooff : index
  memref.store %v, %sh_o[%oi] : {o}
}}
",
                        t * self.d
                    )
                });
                let mut phases = vec![loads];
                phases.extend(self.up_v_phases(lowering));
                with_c2(phases)
            }
            RowOp::MlaAbsorb { nope, tokens, .. } => {
                let qn = sh("sh_qn");
                let tiled = Some(tokens);
                let offsets: String =
                    (0..tokens).map(|t| format!("%qoff{t} = arith.constant {} : index\n", t * nope)).collect();
                let query_row = |t: usize| {
                    format!("%qrow0 = arith.muli %bt{t}, %cH : index\n%qrow = arith.addi %qrow0, %h : index\n")
                };
                let loads = per_token(tiled, |t| {
                    format!(
                        "scf.for %i = %tid to %cNope step %cT {{
  %v = memref.load %q_nope[%bt{t}, %h, %i] : memref<?x?x?xf32>
  %qi = arith.addi %i, %qoff{t} : index
  memref.store %v, %sh_qn[%qi] : {qn}
}}
"
                    )
                });
                // Columns a thread takes at once (`%a{u}` = `%a + u T`): each query value read from
                // shared memory once for all of them; 4 where the latent row is 4 T wide.
                let cols = if self.d.is_multiple_of(4 * self.threads) { 4 } else { 1 };
                // Per count k of tokens the loops carry (sum u k + t: column u, token t).
                let sums_of = |k: usize| -> String {
                    let mut t_text = String::new();
                    for t in 0..k {
                        let _ = writeln!(
                            t_text,
                            "    %qi{t} = arith.addi %d, %qoff{t} : index\n    %qv{t} = memref.load %sh_qn[%qi{t}] : {qn}"
                        );
                        for u in 0..cols {
                            let x = u * k + t;
                            let _ = writeln!(
                                t_text,
                                "    %m{x} = arith.mulf %qv{t}, %wv{u} : f32\n    %n{x} = arith.addf %s{x}, %m{x} : f32"
                            );
                        }
                    }
                    t_text
                };
                // Each column's stores in a region of its own (the tokens' names repeat).
                let stores_of = |k: usize| -> String {
                    (0..cols)
                        .map(|u| {
                            let stores = per_token(Some(k), |t| {
                                format!(
                                    "{}{}memref.store %qb, %qa[%qrow, %a{u}] : memref<?x?xbf16>\n",
                                    query_row(t),
                                    round_bf16(&format!("%acc#{}", u * k + t), "%qb")
                                )
                            });
                            format!("scf.execute_region {{\n{stores}scf.yield\n}}\n")
                        })
                        .collect()
                };
                let list = |k: usize, f: &dyn Fn(usize) -> String| (0..k).map(f).collect::<Vec<_>>().join(", ");
                let ropes = per_token(tiled, |t| {
                    format!(
                        "{}scf.for %r = %tid to %cRope step %cT {{
  %pe = memref.load %q_pe[%bt{t}, %h, %r] : memref<?x?x?xf32>
{}  %col = arith.addi %cD, %r : index
  memref.store %pb, %qa[%qrow, %col] : memref<?x?xbf16>
}}
",
                        query_row(t),
                        round_bf16("%pe", "%pb")
                    )
                });
                // The columns' weights of row `%wrow`, and (e4m3) their blocks' scales.
                let (mut weights, mut scales) = (String::new(), String::new());
                for u in 0..cols {
                    let scale = format!("%wblk_s{u}");
                    weights.push_str(&indent2(&indent2(&self.kv_b_weight_scaled(
                        "%wrow",
                        &format!("%a{u}"),
                        &format!("%wv{u}"),
                        (self.weight != "bf16").then_some(&scale),
                        lowering,
                    ))));
                    if self.weight != "bf16" {
                        let _ = writeln!(
                            scales,
                            "    %wblk_c{u} = arith.divui %a{u}, %c128 : index
    %wblk_s{u} = memref.load %kv_b_scale[%rb, %wblk_c{u}] : memref<?x?xf32>"
                        );
                    }
                }
                let columns: String = (1..cols)
                    .map(|u| format!("  %au_off{u} = arith.muli %cT, %ku{u} : index\n  %a{u} = arith.addi %a, %au_off{u} : index\n"))
                    .collect();
                let column_constants: String =
                    (1..=cols).map(|u| format!("%ku{u} = arith.constant {u} : index\n")).collect();
                // q_abs[a] = sum_d q_nope[d] W_UK[d, a] per token (a block of one token carrying one
                // sum: [`one_token_or_all`]), then the rope query, in bf16. In order over d, by the
                // 128-row blocks of kv_b the head's rows cross: each block's scale read once (e4m3
                // weights), not once a weight.
                let q_abs = one_token_or_all(tiled, |k| {
                    let n = cols * k;
                    format!(
                        "%rb_first = arith.divui %head_row, %c128 : index
%head_end = arith.addi %head_row, %cNope : index
%rb_end = arith.ceildivui %head_end, %c128 : index
{column_constants}%cT_cols = arith.muli %cT, %ku{cols} : index
scf.for %a = %tid to %cD step %cT_cols {{
  %a0 = arith.addi %a, %c0 : index
{columns}  %acc:{n} = scf.for %rb = %rb_first to %rb_end step %c1 iter_args({block_inits}) -> ({types}) {{
{scales}    %rb_lo0 = arith.muli %rb, %c128 : index
    %rb_lo = arith.maxui %rb_lo0, %head_row : index
    %rb_hi0 = arith.addi %rb_lo0, %c128 : index
    %rb_hi = arith.minui %rb_hi0, %head_end : index
    %blk:{n} = scf.for %wrow = %rb_lo to %rb_hi step %c1 iter_args({inits}) -> ({types}) {{
      %d = arith.subi %wrow, %head_row : index
{weights}{sums}      scf.yield {yields} : {types}
    }}
    scf.yield {block_yields} : {types}
  }}
{stores}}}
",
                        sums = sums_of(k),
                        stores = stores_of(k),
                        inits = list(n, &|x| format!("%s{x} = %bs{x}")),
                        block_inits = list(n, &|x| format!("%bs{x} = %zero")),
                        block_yields = list(n, &|x| format!("%blk#{x}")),
                        types = vec!["f32"; n].join(", "),
                        yields = list(n, &|x| format!("%n{x}")),
                    )
                });
                vec![format!("{offsets}{loads}"), format!("{BF16_CONSTANTS}{offsets}{q_abs}{ropes}")]
            }
            RowOp::Fp8Latent => {
                // The e4m3 bytes as they are; each scale's four bytes (little-endian) as its f32.
                let row = v3c_runtime::plan::Fp8LatentRow { latent: self.d };
                let bytes = (0..4)
                    .map(|k| {
                        format!(
                            "  %b{k}_at = arith.addi %at, %c{k} : index
  %b{k}_8 = memref.load %cache[%row, %b{k}_at] : memref<?x?xi8>
  %b{k}_32 = arith.extui %b{k}_8 : i8 to i32
  %b{k}_sh = arith.constant {} : i32
  %b{k} = arith.shli %b{k}_32, %b{k}_sh : i32
",
                            8 * k
                        )
                    })
                    .collect::<String>();
                vec![format!(
                    "%c2 = arith.constant 2 : index
%c3 = arith.constant 3 : index
%c4 = arith.constant 4 : index
%cGroups = arith.constant {groups} : index
%cScaleAt = arith.constant {scale_at} : index
scf.for %i = %tid to %cD step %cT {{
  %x = memref.load %cache[%row, %i] : memref<?x?xi8>
  memref.store %x, %q[%row, %i] : memref<?x?xi8>
}}
scf.for %g = %tid to %cGroups step %cT {{
  %g4 = arith.muli %g, %c4 : index
  %at = arith.addi %g4, %cScaleAt : index
{bytes}  %lo = arith.ori %b0, %b1 : i32
  %hi = arith.ori %b2, %b3 : i32
  %bits = arith.ori %lo, %hi : i32
  %s = arith.bitcast %bits : i32 to f32
  memref.store %s, %scale[%row, %g] : memref<?x?xf32>
}}
",
                    groups = row.groups(),
                    scale_at = row.scale_offset(),
                )]
            }
            RowOp::MlaLengths => vec![format!(
                "%n_pages = memref.dim %table, %c1 : memref<?x?xi32>
%t0 = arith.cmpi eq, %tid, %c0 : index
scf.if %t0 {{
  %p64 = memref.load %positions[%row] : memref<?xi64>
  %zero_i64 = arith.constant 0 : i64
  %one_i64 = arith.constant 1 : i64
  %c_page = arith.constant {PAGE_ROWS} : index
  %cache_rows = arith.muli %n_pages, %c_page : index
  %rows64 = arith.index_cast %cache_rows : index to i64
  %len0 = arith.addi %p64, %one_i64 : i64
  %len1 = arith.minsi %len0, %rows64 : i64
  %len2 = arith.maxsi %len1, %zero_i64 : i64
  %len = arith.trunci %len2 : i64 to i32
  memref.store %len, %seqlens[%row] : memref<?xi32>
}}
"
            )],
            RowOp::Argmax => {
                let (key, idx) = (sh("sh_key"), sh("sh_idx"));
                // (k, i) beats (bk, bi): a larger total-order key, or the same key at a lower index.
                let better = "%gt = arith.cmpi sgt, %k, %bk : i32
  %eq = arith.cmpi eq, %k, %bk : i32
  %lt = arith.cmpi slt, %ix, %bi : i32
  %tie = arith.andi %eq, %lt : i1
  %win = arith.ori %gt, %tie : i1
  %nk = arith.select %win, %k, %bk : i32
  %ni = arith.select %win, %ix, %bi : i32";
                let mut phases = vec![format!(
                    "%kmin = arith.constant -2147483648 : i32
%imax = arith.constant 2147483647 : i32
%c31 = arith.constant 31 : i32
%c1_i32 = arith.constant 1 : i32
%best:2 = scf.for %i = %tid to %cD step %cT iter_args(%bk = %kmin, %bi = %imax) -> (i32, i32) {{
  %v = memref.load %x[%row, %i] : memref<?x?xf32>
  %bits = arith.bitcast %v : f32 to i32
  %sign = arith.shrsi %bits, %c31 : i32
  %flip = arith.shrui %sign, %c1_i32 : i32
  %k = arith.xori %bits, %flip : i32
  %ix = arith.index_cast %i : index to i32
  {better}
  scf.yield %nk, %ni : i32, i32
}}
memref.store %best#0, %sh_key[%tid] : {key}
memref.store %best#1, %sh_idx[%tid] : {idx}
"
                )];
                phases.extend(tree_phases(
                    self.threads,
                    &format!(
                        "%bk = memref.load %sh_key[%tid] : {key}
%bi = memref.load %sh_idx[%tid] : {idx}
%k = memref.load %sh_key[%other] : {key}
%ix = memref.load %sh_idx[%other] : {idx}
{better}
memref.store %nk, %sh_key[%tid] : {key}
memref.store %ni, %sh_idx[%tid] : {idx}"
                    ),
                ));
                phases.push(format!(
                    "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %w = memref.load %sh_idx[%c0] : {idx}
  memref.store %w, %idx[%row] : memref<?xi32>
}}
"
                ));
                phases
            }
            RowOp::MlaCombine => {
                // A thread per column (the block as wide as the row, up to 512): the splits' maximum,
                // then per column the weighted sum and the weights' sum in split order. The splits
                // are read COMBINE_SPLITS at a time: their loads (each behind its bounds check) are
                // all issued before the first is used, so a thread has that many in flight where
                // a loop over the splits would wait for each.
                let u = COMBINE_SPLITS;
                let mut max_loads = String::new();
                let mut col_loads = String::new();
                let mut col_sums = String::new();
                for k in 0..u {
                    let prev = if k == 0 { "%m".to_string() } else { format!("%mm{}", k - 1) };
                    let _ = write!(
                        max_loads,
                        "  %mz{k} = arith.addi %z0, %c{k}_u : index
  %min{k} = arith.cmpi ult, %mz{k}, %splits : index
  %ml{k} = scf.if %min{k} -> (f32) {{
    %v = memref.load %lse[%mz{k}, %row] : memref<?x?xf32>
    scf.yield %v : f32
  }} else {{
    scf.yield %ninf : f32
  }}
  %mm{k} = arith.maximumf {prev}, %ml{k} : f32
"
                    );
                    let _ = write!(
                        col_loads,
                        "    %cz{k} = arith.addi %z0, %c{k}_u : index
    %cin{k} = arith.cmpi ult, %cz{k}, %splits : index
    %cv{k}:2 = scf.if %cin{k} -> (f32, f32) {{
      %l = memref.load %lse[%cz{k}, %row] : memref<?x?xf32>
      %o = memref.load %o_part[%cz{k}, %row, %i] : memref<?x?x?xf32>
      scf.yield %l, %o : f32, f32
    }} else {{
      scf.yield %none, %none : f32, f32
    }}
"
                    );
                    let (a, s) = if k == 0 {
                        ("%a".to_string(), "%s".to_string())
                    } else {
                        (format!("%a{}", k - 1), format!("%s{}", k - 1))
                    };
                    let weight = exp(lowering, &format!("%cd{k}"), &format!("%ce{k}"));
                    // A split past the last leaves the sums as they are (its values, never read from
                    // memory, are poison: no default is moved into the loads' registers).
                    let _ = write!(
                        col_sums,
                        "    %cd{k} = arith.subf %cv{k}#0, %mx : f32
{weight}    %ceo{k} = arith.mulf %ce{k}, %cv{k}#1 : f32
    %ca{k} = arith.addf {a}, %ceo{k} : f32
    %cs{k} = arith.addf {s}, %ce{k} : f32
    %a{k} = arith.select %cin{k}, %ca{k}, {a} : f32
    %s{k} = arith.select %cin{k}, %cs{k}, {s} : f32
",
                        weight = indent2(&indent2(&weight)),
                    );
                }
                let consts: String = (0..u).map(|k| format!("%c{k}_u = arith.constant {k} : index\n")).collect();
                vec![format!(
                    "%ninf = arith.constant 0xFF800000 : f32
%none = llvm.mlir.poison : f32
%splits = memref.dim %lse, %c0 : memref<?x?xf32>
%cU = arith.constant {u} : index
{consts}%mx = scf.for %z0 = %c0 to %splits step %cU iter_args(%m = %ninf) -> (f32) {{
{max_loads}  scf.yield %mm{last} : f32
}}
%seen = arith.cmpf ogt, %mx, %ninf : f32
scf.for %i = %tid to %cD step %cT {{
  %acc:2 = scf.for %z0 = %c0 to %splits step %cU iter_args(%a = %zero, %s = %zero) -> (f32, f32) {{
{col_loads}{col_sums}    scf.yield %a{last}, %s{last} : f32, f32
  }}
  %y0 = arith.divf %acc#0, %acc#1 : f32
  %y = arith.select %seen, %y0, %zero : f32
  memref.store %y, %out[%row, %i] : memref<?x?xf32>
}}
",
                    last = u - 1,
                )]
            }
            RowOp::GatherFp8 => vec![format!(
                "%c1g = arith.constant 1 : index
%width = memref.dim %sorted, %c1g : memref<?x?xi32>
%s_tok = arith.divui %row, %width : index
%s_slot = arith.remui %row, %width : index
%tok_i = memref.load %sorted[%s_tok, %s_slot] : memref<?x?xi32>
%tok = arith.index_cast %tok_i : i32 to index
%cGroups = arith.constant {groups} : index
{bytes}scf.for %g = %tid to %cGroups step %cT {{
  %s = memref.load %x_scale[%tok, %g] : memref<?x?xf32>
  memref.store %s, %scale[%row, %g] : memref<?x?xf32>
}}
",
                groups = self.groups(),
                bytes = self.gather_bytes(lowering),
            )],
            RowOp::Copy => vec![self.copy_columns(lowering, "vec", ("%x", "%y", None), ("%cD", self.d), true)],
            RowOp::SiluMul { quantize } => {
                // silu(g) * u = g / (1 + exp(-g)) * u, the reference's order; quantized, it is
                // computed where each phase reads it (no row buffer: rows of 18432 would not fit).
                let silu = |c: &str| {
                    format!(
                        "  %sw_up_col = arith.addi {c}, %cD : index
  %sw_g = memref.load %x[%row, {c}] : memref<?x?xf32>
  %sw_u = memref.load %x[%row, %sw_up_col] : memref<?x?xf32>
{}",
                        silu_of(lowering, ("%sw_g", "%sw_u"), "")
                    )
                };
                // Four columns: 16 bytes of the gate and of the up half a load each.
                let silu4 = |c: &str| {
                    let mut text = format!(
                        "    %sw_up_col = arith.addi {c}, %cD : index
    %sw_g4 = vector.load %x[%row, {c}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
    %sw_u4 = vector.load %x[%row, %sw_up_col] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
{}{}",
                        extract4("%sw_g4", "%sw_g"),
                        extract4("%sw_u4", "%sw_u")
                    );
                    for k in 0..VEC {
                        text.push_str(&silu_of(lowering, (&format!("%sw_g{k}"), &format!("%sw_u{k}")), &k.to_string()));
                    }
                    text
                };
                if quantize {
                    let wide = Wide { value: &silu4, buffers: vec![("%x", "memref<?x?xf32>", 4)] };
                    self.quant_phases_wide(lowering, &silu, &wide)
                } else {
                    let scalar = format!(
                        "scf.for %i = %tid to %cD step %cT {{
{}  memref.store %v, %y[%row, %i] : memref<?x?xf32>
}}
",
                        silu("%i")
                    );
                    // 4 columns of the gate and of the up half a load each, of y a store.
                    let ty = "memref<?x?xf32>";
                    let load = |u: usize| {
                        format!(
                            "%sw_up{u} = arith.addi %i{u}, %cD : index
%sw_g4_{u} = vector.load %x[%row, %i{u}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>
%sw_u4_{u} = vector.load %x[%row, %sw_up{u}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>
"
                        )
                    };
                    let store = |u: usize| {
                        let (g, up) = (format!("%sw_g{u}_"), format!("%sw_u{u}_"));
                        let mut text = unindent(&extract4(&format!("%sw_g4_{u}"), &g));
                        text.push_str(&unindent(&extract4(&format!("%sw_u4_{u}"), &up)));
                        for k in 0..VEC {
                            text.push_str(&unindent(&silu_of(
                                lowering,
                                (&format!("{g}{k}"), &format!("{up}{k}")),
                                &format!("{u}_{k}"),
                            )));
                        }
                        let lanes: Vec<String> = (0..VEC).map(|k| format!("%v{u}_{k}")).collect();
                        let _ = write!(
                            text,
                            "%y4_{u} = vector.from_elements {} : vector<4xf32>
vector.store %y4_{u}, %y[%row, %i{u}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>
",
                            lanes.join(", ")
                        );
                        text
                    };
                    let map = WideMap {
                        columns: self.d,
                        load: &load,
                        store: &store,
                        checks: vec![(16, vec![("%x", ty, 4), ("%y", ty, 4)])],
                        setup: String::new(),
                        scalar,
                    };
                    vec![self.wide_map(lowering, "vec", &map)]
                }
            }
            RowOp::LatentKey { interleave, .. } => self.latent_key_phases(lowering, interleave),
            RowOp::Latent { interleave, append, cache, .. } => {
                let d = self.d;
                let element = cache.element();
                let (target, at) = match (append, cache.paged()) {
                    (true, _) => ("%out", "%row"),
                    (false, false) => ("%cache", "%row, %p"),
                    (false, true) => ("%cache", "%pg, %pr"),
                };
                let rank = if append { "?x?" } else { "?x?x?" };
                let fp8_row = v3c_runtime::plan::Fp8LatentRow { latent: d };
                let dest = |v: &str, col: &str| -> String {
                    match cache {
                        CacheRows::Bf16 => format!(
                            "{}memref.store {v}_b, {target}[{at}, {col}] : memref<{rank}xbf16>\n",
                            round_bf16(v, &format!("{v}_b"))
                        ),
                        CacheRows::F32 => format!("memref.store {v}, {target}[{at}, {col}] : memref<{rank}xf32>\n"),
                        // The latent goes through shared memory to its quantization; the RoPE
                        // key's bf16 bits as two bytes at its place in the row.
                        CacheRows::Fp8 if v == "%y_v" => {
                            format!("memref.store {v}, %sh_row[{col}] : {}\n", sh("sh_row"))
                        }
                        CacheRows::Fp8 => format!(
                            "{round}%{t}_rel = arith.subi {col}, %cRopeBase : index
%{t}_rel2 = arith.muli %{t}_rel, %cTwo : index
%{t}_at = arith.addi %{t}_rel2, %cRopeAt : index
%{t}_at1 = arith.addi %{t}_at, %c1 : index
%{t}_lo = arith.trunci {v}_b_top : i32 to i8
%{t}_hs = arith.shrui {v}_b_top, %c8_i32 : i32
%{t}_hi = arith.trunci %{t}_hs : i32 to i8
memref.store %{t}_lo, {target}[{at}, %{t}_at] : memref<{rank}xi8>
memref.store %{t}_hi, {target}[{at}, %{t}_at1] : memref<{rank}xi8>
",
                            round = round_bf16(v, &format!("{v}_b")),
                            t = v.trim_start_matches('%'),
                        ),
                    }
                };
                // Rows of the old cache are copied (prefill); others have nothing to add.
                let mut otherwise = format!("memref.store %zero, %sh_sum[%tid] : {}\n", sh("sh_sum"));
                if append {
                    let _ = write!(
                        otherwise,
                        "%is_old = arith.xori %is_new, %true : i1
scf.if %is_old {{
  %width = memref.dim %cache, %c1 : memref<?x?x{element}>
  scf.for %i = %tid to %width step %cT {{
    %old = memref.load %cache[%row, %i] : memref<?x?x{element}>
    memref.store %old, %out[%row, %i] : memref<?x?x{element}>
  }}
}}
"
                    );
                }
                let rope_loop = format!(
                    "%cRopeBase = arith.constant {d} : index
scf.for %i = %tid to %cHalf step %cT {{
{}}}
",
                    rope_rotation(
                        interleave,
                        false,
                        |col, out| format!("  {out} = memref.load %k_pe[%t, {col}] : memref<?x?xf32>\n"),
                        |v, col, tag| format!(
                            "  %col_{tag} = arith.addi %cRopeBase, {col} : index\n  {}",
                            dest(v, &format!("%col_{tag}"))
                        ),
                    )
                );
                let rope_loop = match cache {
                    CacheRows::Fp8 => format!(
                        "%cTwo = arith.constant 2 : index\n%c8_i32 = arith.constant 8 : i32\n%cRopeAt = arith.constant {} : \
                         index\n{rope_loop}",
                        fp8_row.rope_offset()
                    ),
                    _ => rope_loop,
                };
                let mut phases = self.norm_phases(
                    lowering,
                    ("%latent", "%t"),
                    Some(("%ok", otherwise.as_str())),
                    &NormStore { scalar: format!("  {}", dest("%y_v", "%i")), vector: None },
                    &rope_loop,
                );
                if cache == CacheRows::Fp8 {
                    // The normalized latent (in shared memory) quantized into the row.
                    let out = QuantOut {
                        scale: format!(
                            "  %s_bits = arith.bitcast %s : f32 to i32
  %s_g4 = arith.muli %g, %c4 : index
  %s_at = arith.addi %s_g4, %cScaleAt : index
{}",
                            (0..4)
                                .map(|k| format!(
                                    "  %s_sh{k} = arith.constant {} : i32
  %s_v{k}0 = arith.shrui %s_bits, %s_sh{k} : i32
  %s_v{k} = arith.trunci %s_v{k}0 : i32 to i8
  %s_b{k} = arith.addi %s_at, %c{k} : index
  memref.store %s_v{k}, {target}[{at}, %s_b{k}] : memref<{rank}xi8>
",
                                    8 * k
                                ))
                                .collect::<String>()
                        ),
                        byte: format!("  memref.store %byte, {target}[{at}, %i] : memref<{rank}xi8>\n"),
                        pow2: true,
                    };
                    let row = sh("sh_row");
                    let quant =
                        self.quant_phases_to(lowering, &|c| format!("  %v = memref.load %sh_row[{c}] : {row}\n"), &out);
                    phases.extend(quant.into_iter().map(|q| {
                        format!(
                            "%c2 = arith.constant 2 : index\n%c3 = arith.constant 3 : index\n%c4 = arith.constant 4 : index
%cScaleAt = arith.constant {} : index\nscf.if %ok {{\n{q}}}\n",
                            fp8_row.scale_offset()
                        )
                    }));
                }
                phases
            }
        }
    }

    /// The 1x128 e4m3 quantization of a row into `%q` and `%scale`: the |max| of each quarter
    /// group, then per group the scale `max(amax, 1e-4) / 448`, then every column's byte. The row's
    /// value at a column is `value(column)` (lines defining `%v`), read twice: it must be the same.
    fn quant_phases(&self, lowering: Lowering, value: &dyn Fn(&str) -> String) -> Vec<String> {
        let out = QuantOut {
            scale: "  memref.store %s, %scale[%row, %g] : memref<?x?xf32>\n".into(),
            byte: "  memref.store %byte, %q[%row, %i] : memref<?x?xi8>\n".into(),
            pow2: false,
        };
        self.quant_phases_to(lowering, value, &out)
    }

    /// The GPU scan's end: the first [`AMAX_PARTS`] lanes store the group's |max| `m` as its parts
    /// (part-major: part `p` of group `g` at `p G + g`).
    fn amax_parts(&self, lowering: Lowering, m: &str) -> String {
        format!(
            "  %part_lane = arith.cmpi ult, %lane, %cP : index
  scf.if %part_lane {{
    %amax_lg = arith.muli %lane, %cG : index
    %amax_at = arith.addi %amax_lg, %g : index
    memref.store {m}, %sh_amax[%amax_at] : {amax}
  }}
",
            amax = self.shared_type("sh_amax", lowering)
        )
    }

    /// [`RowKernel::quant_phases`], where on sm_90a the buffers allow ([`aligned`] over `%q`
    /// and `wide.buffers`) a lane of the |max| scan and a thread of the bytes take chunks of 4
    /// columns: `wide.value(c)` defines `%v0..%v3` at columns `c..c + 4` (the same values as
    /// `value`'s). A warp's lanes scan a group's 128 columns in one step (a load of 16 bytes
    /// each), and a thread stores 4 bytes at once. The |max| does not depend on the order and each
    /// byte is its own value's: the same bits either way. Not where ptxas holds the block to 32
    /// registers ([`Self::tight_registers`]: four divisions' slow-path calls at once spill there),
    /// nor where the row is not whole chunks.
    fn quant_phases_wide(&self, lowering: Lowering, value: &dyn Fn(&str) -> String, wide: &Wide) -> Vec<String> {
        let mut phases = self.quant_phases(lowering, value);
        if lowering != Lowering::Gpu || self.vec_chunk() != VEC || self.tight_registers() {
            return phases;
        }
        // The bytes go 4 a store; the values' buffers 16 bytes a load.
        let q = [("%q", "memref<?x?xi8>", 1)];
        let flag = if wide.buffers.is_empty() {
            aligned("vec", 4, &q)
        } else {
            format!(
                "{}{}%vec = arith.andi %vec_q, %vec_x : i1\n",
                aligned("vec_q", 4, &q),
                aligned("vec_x", 16, &wide.buffers)
            )
        };
        let mut abs_max = String::new();
        let mut mx = "%zero".to_string();
        for k in 0..VEC {
            let _ = write!(
                abs_max,
                "    %abits{k} = arith.bitcast %v{k} : f32 to i32
    %aabs{k} = arith.andi %abits{k}, %abs_mask : i32
    %aval{k} = arith.bitcast %aabs{k} : i32 to f32
    %agt{k} = arith.cmpf ogt, %aval{k}, {mx} : f32
    %amx{k} = arith.select %agt{k}, %aval{k}, {mx} : f32
"
            );
            mx = format!("%amx{k}");
        }
        let (butterfly, m) = amax_butterfly("%m0");
        let scan = format!(
            "{flag}scf.if %vec {{
  scf.for %j = %tid to %cGW step %cT {{
{SCAN_LANE}    %lane_col = arith.muli %lane, %cVec : index
    %c_at = arith.addi %g0, %lane_col : index
    %c_in = arith.cmpi ult, %c_at, %cD : index
    %c = arith.select %c_in, %c_at, %g0 : index
{value_c}{abs_max}    %m0 = arith.select %c_in, {mx}, %zero : f32
{butterfly}{parts}  }}
}} else {{
{scalar}}}
",
            value_c = (wide.value)("%c"),
            butterfly = indent2(&butterfly),
            parts = indent2(&self.amax_parts(lowering, &m)),
            scalar = indent2(&phases[0]),
        );
        let quotients: String = (0..VEC).map(|k| format!("    %qv{k} = arith.divf %v{k}, %s : f32\n")).collect();
        let bytes = format!(
            "{flag}scf.if %vec {{
  scf.for %ch = %tid to %cVecs step %cT {{
    %i0 = arith.muli %ch, %cVec : index
    %g = arith.divui %i0, %cGroup : index
    %s = memref.load %sh_scale[%g] : {scale}
{value_i}{quotients}    %qv4 = vector.from_elements %qv0, %qv1, %qv2, %qv3 : vector<4xf32>
{encode}    vector.store %b4, %q[%row, %i0] {{alignment = 4 : i64}} : memref<?x?xi8>, vector<4xi8>
  }}
}} else {{
{scalar}}}
",
            scale = self.shared_type("sh_scale", lowering),
            value_i = (wide.value)("%i0"),
            encode = encode_e4m3x4("%qv4", "%b4"),
            scalar = indent2(phases.last().expect("the quantization's byte phase")),
        );
        let last = phases.len() - 1;
        phases[0] = scan;
        phases[last] = bytes;
        phases
    }

    /// [`RowKernel::quant_phases`] storing where `out` says, its scales as `out` computes them.
    fn quant_phases_to(&self, lowering: Lowering, value: &dyn Fn(&str) -> String, out: &QuantOut) -> Vec<String> {
        let sh = |name: &str| self.shared_type(name, lowering);
        let mut phases = Vec::new();
        // Each (group, part)'s |max| into `sh_amax`, part-major (part p of group g at `p G + g`: the
        // scale phase's lanes, a group each, read adjacent words). The |max| does not depend on the order, and
        // select-if-greater skips NaNs in any order, so both lowerings give the same bits.
        let abs_max = "    %vb = arith.bitcast %v : f32 to i32
    %ab = arith.andi %vb, %abs_mask : i32
    %av = arith.bitcast %ab : i32 to f32
    %gt = arith.cmpf ogt, %av, %mx : f32
    %mx2 = arith.select %gt, %av, %mx : f32
    scf.yield %mx2 : f32
  }";
        let scan = match lowering {
            // On the GPU a warp takes a group: lane l reads columns l, l + 32, ... of it, so that
            // at every step the warp reads 32 adjacent columns (whole sectors of global memory,
            // 32 banks of shared memory); then a butterfly of shuffles gives every lane the
            // group's |max|, which the first `AMAX_PARTS` lanes store as the group's parts. (`T`
            // and the loop's bound are multiples of 32, so a warp's lanes loop together.)
            Lowering::Gpu => {
                let (butterfly, m) = amax_butterfly("%m0");
                format!(
                    "scf.for %j = %tid to %cGW step %cT {{
{SCAN_LANE}  %start = arith.addi %g0, %lane : index
  %end0 = arith.addi %g0, %cGroup : index
  %end = arith.minui %end0, %cD : index
  %m0 = scf.for %c = %start to %end step %lanes iter_args(%mx = %zero) -> (f32) {{
{value_c}{abs_max}
{butterfly}{parts}}}
",
                    value_c = value("%c"),
                    parts = self.amax_parts(lowering, &m),
                )
            }
            // On the CPU a thread (an iteration) per part of `GROUP / AMAX_PARTS` adjacent columns.
            Lowering::Cpu => format!(
                "scf.for %j = %tid to %cGP step %cT {{
  %g = arith.divui %j, %cP : index
  %part = arith.remui %j, %cP : index
  %g0 = arith.muli %g, %cGroup : index
  %p0 = arith.muli %part, %cPart : index
  %lo0 = arith.addi %g0, %p0 : index
  %hi0 = arith.addi %lo0, %cPart : index
  %lo = arith.minui %lo0, %cD : index
  %hi = arith.minui %hi0, %cD : index
  %m = scf.for %c = %lo to %hi step %c1 iter_args(%mx = %zero) -> (f32) {{
{value_c}{abs_max}
  %amax_pg = arith.muli %part, %cG : index
  %amax_at = arith.addi %amax_pg, %g : index
  memref.store %m, %sh_amax[%amax_at] : {amax}
}}
",
                value_c = value("%c"),
                amax = sh("sh_amax")
            ),
        };
        phases.push(scan);
        phases.push(format!(
            "scf.for %g = %tid to %cG step %cT {{
  %m = scf.for %pi = %c0 to %cP step %c1 iter_args(%mx = %zero) -> (f32) {{
    %amax_pi = arith.muli %pi, %cG : index
    %k = arith.addi %amax_pi, %g : index
    %v = memref.load %sh_amax[%k] : {amax}
    %gt = arith.cmpf ogt, %v, %mx : f32
    %mx2 = arith.select %gt, %v, %mx : f32
    scf.yield %mx2 : f32
  }}
  %small = arith.cmpf olt, %m, %amax_floor : f32
  %floored = arith.select %small, %amax_floor, %m : f32
{compute}{store}  memref.store %s, %sh_scale[%g] : {scale}
}}
",
            amax = sh("sh_amax"),
            scale = sh("sh_scale"),
            compute = if out.pow2 { POW2_SCALE } else { "  %s = arith.divf %floored, %e4m3_max : f32\n" },
            store = out.scale,
        ));
        phases.push(format!(
            "scf.for %i = %tid to %cD step %cT {{
  %g = arith.divui %i, %cGroup : index
  %s = memref.load %sh_scale[%g] : {scale}
{value_i}  %qv = arith.divf %v, %s : f32
{encode}{store}}}
",
            scale = sh("sh_scale"),
            value_i = value("%i"),
            encode = encode_e4m3(lowering, "%qv", "%byte"),
            store = out.byte,
        ));
        phases
    }

    /// [`RowOp::LatentKey`]'s phases: the key's mean and inverse deviation by thread 0 (column
    /// order, as [`SparseRow::LayerNorm`]), then the latent's RMSNorm ([`Self::norm_phases`]) into
    /// `out`, its last phase rotating k_pe (`interleave`: neighbours paired) and the key (halves
    /// paired) after it and copying the key's other columns normalized.
    fn latent_key_phases(&self, lowering: Lowering, interleave: bool) -> Vec<String> {
        let red = self.shared_type("sh_red", lowering);
        let w = &self.weight;
        let param = |name: &str, col: &str, out: &str| {
            if w == "f32" {
                format!("  {out} = memref.load %{name}[{col}] : memref<?xf32>\n")
            } else {
                format!("  {out}_raw = memref.load %{name}[{col}] : memref<?x{w}>\n  {out} = arith.extf {out}_raw : {w} to f32\n")
            }
        };
        // The key's column `col` normalized, as the LayerNorm row computes it.
        let normed = |col: &str, out: &str| {
            let t = out.trim_start_matches('%');
            format!(
                "  %{t}_x = memref.load %key[%row, {col}] : memref<?x?xf32>
{w}{b}  %{t}_d = arith.subf %{t}_x, %kmean : f32
  %{t}_n = arith.mulf %{t}_d, %kinv : f32
  %{t}_nw = arith.mulf %{t}_n, %{t}_w : f32
  {out} = arith.addf %{t}_nw, %{t}_b : f32
",
                w = param("kw", col, &format!("%{t}_w")),
                b = param("kb", col, &format!("%{t}_b")),
            )
        };
        let stats = sparse::layer_norm_stats(lowering, ("%key", "%cKey", "%fK"), "%keps", &red);
        let out_at = |base: &'static str| {
            move |v: &str, col: &str, tag: &str| {
                format!("  %{base}_{tag} = arith.addi %c{base}, {col} : index\n  memref.store {v}, %out[%row, %{base}_{tag}] : memref<?x?xf32>\n")
            }
        };
        let k_pe = rope_rotation(
            interleave,
            false,
            |col, out| format!("  {out} = memref.load %k_pe[%row, {col}] : memref<?x?xf32>\n"),
            out_at("RopeBase"),
        );
        let key = rope_rotation(false, false, normed, out_at("KeyBase"));
        let after = format!(
            "%kmean = memref.load %sh_red[%c0] : {red}
%kinv = memref.load %sh_red[%c1] : {red}
scf.if %ok {{
  scf.for %i = %tid to %cHalf step %cT {{
{k_pe}  }}
  scf.for %i = %tid to %cHalf step %cT {{
{key}  }}
}}
%plain0 = arith.addi %tid, %cR : index
scf.for %i = %plain0 to %cKey step %cT {{
{plain}  %kcol = arith.addi %cKeyBase, %i : index
  memref.store %kv, %out[%row, %kcol] : memref<?x?xf32>
}}
",
            k_pe = indent2(&k_pe),
            key = indent2(&key),
            plain = normed("%i", "%kv"),
        );
        let store = NormStore {
            scalar: "  memref.store %y_v, %out[%row, %i] : memref<?x?xf32>\n".into(),
            vector: Some((
                "    vector.store %y4, %out[%row, %i0] {alignment = 16 : i64} : memref<?x?xf32>, vector<4xf32>\n"
                    .into(),
                vec![("%latent", "memref<?x?xf32>", 4), ("%out", "memref<?x?xf32>", 4)],
            )),
        };
        let mut phases = vec![stats];
        phases.extend(self.norm_phases(lowering, ("%latent", "%row"), None, &store, &after));
        phases
    }

    /// RMSNorm's phases over row `x.1` of `x.0` (a `memref<?x?xf32>`): the row into shared memory
    /// with per-thread sums of squares, the tree over threads, then `%y_v = w * (x * inv)` per
    /// column followed by `store.scalar` (which may use `%i`, `%y_v`), then `after` in the same
    /// phase. With `guard = (cond, otherwise)`, rows where `cond` is false run `otherwise` in the
    /// first phase and nothing in the last.
    ///
    /// A thread takes chunks of [`Self::vec_chunk`] adjacent columns (chunk `c` by thread `c mod T`), so that on
    /// sm_90a, where the buffers allow it ([`aligned`]), the row comes in 16 bytes a load
    /// (`ld.global.v4.f32`: a quarter of the loads, each moving a warp's 512 bytes) and, with
    /// `store.vector` (which may use `%i0`, the chunk's first column, and `%y4`, its four values;
    /// over the buffers `store.buffers`), the normalization goes a chunk at a time too. Every path
    /// (vector or not, either lowering) sums a thread's squares in the same order.
    fn norm_phases(
        &self,
        lowering: Lowering,
        (x, x_row): (&str, &str),
        guard: Option<(&str, &str)>,
        store: &NormStore,
        after: &str,
    ) -> Vec<String> {
        let sh = |name: &str| self.shared_type(name, lowering);
        let row = sh("sh_row");
        let vector = lowering == Lowering::Gpu && self.vec_chunk() == VEC;
        let guarded = |body: String, otherwise: Option<&str>| match guard {
            None => body,
            Some((cond, other)) => match otherwise.map(|_| other) {
                Some(other) => format!("scf.if {cond} {{\n{body}}} else {{\n{other}}}\n"),
                None => format!("scf.if {cond} {{\n{body}}}\n"),
            },
        };
        let mut phases = Vec::new();
        // 1: the row into shared memory, a strided share of the sum of squares per thread.
        let scalar = format!(
            "%s = scf.for %ch = %tid to %cVecs step %cT iter_args(%a = %zero) -> (f32) {{
  %i0 = arith.muli %ch, %cVec : index
  %i1 = arith.addi %i0, %cVec : index
  %b = scf.for %i = %i0 to %i1 step %c1 iter_args(%a1 = %a) -> (f32) {{
    %v = memref.load {x}[{x_row}, %i] : memref<?x?xf32>
    memref.store %v, %sh_row[%i] : {row}
    %sq = arith.mulf %v, %v : f32
    %a2 = arith.addf %a1, %sq : f32
    scf.yield %a2 : f32
  }}
  scf.yield %b : f32
}}
"
        );
        let load = if vector {
            let unroll = self.norm_unroll();
            let (head, ids) = chunk_unroll(unroll, self.threads);
            let mut body = ids.clone();
            for u in 0..unroll {
                let _ = writeln!(
                    body,
                    "    %x4_{u} = vector.load {x}[{x_row}, %i{u}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>"
                );
            }
            let mut acc = "%a".to_string();
            for u in 0..unroll {
                // A repeated chunk adds +0 (exact: the sum is never -0), and stores nothing.
                let _ = write!(
                    body,
                    "    %xz{u} = arith.select %in{u}, %x4_{u}, %zero4 : vector<4xf32>
    scf.if %in{u} {{
      vector.store %x4_{u}, %sh_row[%i{u}] {{alignment = 16 : i64}} : {row}, vector<4xf32>
    }}
    %sqv{u} = arith.mulf %xz{u}, %xz{u} : vector<4xf32>
"
                );
                for k in 0..VEC {
                    let _ = writeln!(
                        body,
                        "    %sq{u}_{k} = vector.extract %sqv{u}[{k}] : f32 from vector<4xf32>\n    %a{u}_{k} = arith.addf {acc}, %sq{u}_{k} : f32"
                    );
                    acc = format!("%a{u}_{k}");
                }
            }
            format!(
                "{flag}%ss = scf.if %vec -> (f32) {{
  %zero4 = vector.broadcast %zero : f32 to vector<4xf32>
{head}  %s = scf.for %c0u = %tid to %cVecs step %cTU iter_args(%a = %zero) -> (f32) {{
{body}    scf.yield {acc} : f32
  }}
  scf.yield %s : f32
}} else {{
{scalar}  scf.yield %s : f32
}}
",
                flag = aligned("vec", 16, &[(x, "memref<?x?xf32>", 4)]),
                scalar = indent2(&scalar),
            )
        } else {
            scalar.replacen("%s = ", "%ss = ", 1)
        };
        phases.push(guarded(format!("{load}memref.store %ss, %sh_sum[%tid] : {sum}\n", sum = sh("sh_sum")), Some("")));
        // 2..: a tree over the threads' sums.
        phases.extend(tree_phases(
            self.threads,
            &format!(
                "%a = memref.load %sh_sum[%tid] : {sum}
%b = memref.load %sh_sum[%other] : {sum}
%s = arith.addf %a, %b : f32
memref.store %s, %sh_sum[%tid] : {sum}",
                sum = sh("sh_sum")
            ),
        ));
        // y = w * (x * inv), inv = 1 / sqrt(sum / d + eps).
        let scalar = format!(
            "scf.for %i = %tid to %cD step %cT {{
  %x_v = memref.load %sh_row[%i] : {row}
{load}  %xn = arith.mulf %x_v, %inv : f32
  %y_v = arith.mulf %w_v, %xn : f32
{store}}}
",
            load = self.load_weight("w_v", "%w", "%i"),
            store = store.scalar,
        );
        let normalize = match &store.vector {
            Some((vector_store, buffers)) if vector => {
                let w = &self.weight;
                // f32 weights load as they are, bf16 ones widened.
                let (w_align, w_load) = if w == "f32" { (16, "%w4") } else { (8, "%w4_raw") };
                let widen = |u: usize| match w.as_str() {
                    "f32" => String::new(),
                    _ => format!("    %w4_{u} = arith.extf %w4_raw_{u} : vector<4x{w}> to vector<4xf32>\n"),
                };
                let mut all = vec![("%w", format!("memref<?x{w}>"), if w == "f32" { 4 } else { 2 })];
                all.extend(buffers.iter().map(|(b, ty, e)| (*b, ty.to_string(), *e)));
                let all: Vec<(&str, &str, usize)> = all.iter().map(|(b, ty, e)| (*b, ty.as_str(), *e)).collect();
                let unroll = self.norm_unroll();
                let (head, ids) = chunk_unroll(unroll, self.threads);
                let mut body = ids.clone();
                for u in 0..unroll {
                    let _ = write!(
                        body,
                        "    %x4_{u} = vector.load %sh_row[%i{u}] {{alignment = 16 : i64}} : {row}, vector<4xf32>
    {w_load}_{u} = vector.load %w[%i{u}] {{alignment = {w_align} : i64}} : memref<?x{w}>, vector<4x{w}>
"
                    );
                }
                for u in 0..unroll {
                    let _ = write!(
                        body,
                        "{widen}    %xn4_{u} = arith.mulf %x4_{u}, %inv4 : vector<4xf32>
    %y4_{u} = arith.mulf %w4_{u}, %xn4_{u} : vector<4xf32>
    scf.if %in{u} {{
{store}    }}
",
                        widen = widen(u),
                        store = indent2(
                            &vector_store.replace("%y4", &format!("%y4_{u}")).replace("%i0", &format!("%i{u}"))
                        ),
                    );
                }
                format!(
                    "{flag}scf.if %vec {{
  %inv4 = vector.broadcast %inv : f32 to vector<4xf32>
{head}  scf.for %c0u = %tid to %cVecs step %cTU {{
{body}  }}
}} else {{
{scalar}}}
",
                    flag = aligned("vec", 16, &all),
                    scalar = indent2(&scalar),
                )
            }
            _ => scalar,
        };
        phases.push(guarded(
            format!(
                "%total = memref.load %sh_sum[%c0] : {sum}
%mean = arith.divf %total, %fD : f32
%mean_eps = arith.addf %mean, %eps : f32
{sqrt}%inv = arith.divf %one, %root : f32
{normalize}{after}",
                sum = sh("sh_sum"),
                sqrt = sqrt(lowering, "%mean_eps", "%root"),
            ),
            None,
        ));
        phases
    }

    /// A row's columns `0..map.columns` taken [`VEC`] at a time (one load of 16 bytes of f32) where
    /// the GPU lowering takes it, every buffer of `map.checks` is aligned at run time, and the columns
    /// are whole chunks; `map.scalar` (the same map a column at a time) otherwise. A step issues
    /// [`Self::wide_unroll`] chunks' loads before their first use. The chunks' names: `%i{u}` is
    /// chunk `u`'s first column, and `%in{u}` whether it is one of the row's (the stores of a
    /// repeated chunk are skipped). `flag` names the alignment check (unique within the kernel).
    fn wide_map(&self, lowering: Lowering, flag: &str, map: &WideMap) -> String {
        if lowering != Lowering::Gpu || !map.columns.is_multiple_of(VEC) || map.columns == 0 {
            return map.scalar.clone();
        }
        let chunks = map.columns / VEC;
        let unroll = self.wide_unroll(chunks);
        let (head, ids) = chunk_unroll(unroll, self.threads);
        let (checks, both) = aligned_all(flag, &map.checks);
        let body = chunk_steps(ids, unroll, map.load, map.store);
        format!(
            "{checks}scf.if {both} {{
  %cVec = arith.constant {VEC} : index
  %cVecs = arith.constant {chunks} : index
{setup}{head}  scf.for %c0u = %tid to %cVecs step %cTU {{
{body}  }}
}} else {{
{scalar}}}
",
            setup = indent2(&map.setup),
            scalar = indent2(&map.scalar),
        )
    }

    /// `to[%row, at + c] = from[%row, c]` (f32) for the columns `c < columns` (`count`: their
    /// index constant), 16 bytes a load and a store where [`Self::wide_map`] takes them and `wide`
    /// (`at` keeps the chunks on 16 bytes).
    fn copy_columns(
        &self,
        lowering: Lowering,
        flag: &str,
        (from, to, at): (&str, &str, Option<&str>),
        (count, columns): (&str, usize),
        wide: bool,
    ) -> String {
        let ty = "memref<?x?xf32>";
        let column = |i: &str, col: &str| match at {
            Some(at) => (format!("{col} = arith.addi {i}, {at} : index\n"), col.to_string()),
            None => (String::new(), i.to_string()),
        };
        let (offset, col) = column("%i", "%col");
        let scalar = format!(
            "scf.for %i = %tid to {count} step %cT {{
  %v = memref.load {from}[%row, %i] : {ty}
{}  memref.store %v, {to}[%row, {col}] : {ty}
}}
",
            indent2(&offset)
        );
        if !wide {
            return scalar;
        }
        let load = |u: usize| {
            format!("%v4_{u} = vector.load {from}[%row, %i{u}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>\n")
        };
        let store = |u: usize| {
            let (offset, col) = column(&format!("%i{u}"), &format!("%col{u}"));
            format!("{offset}vector.store %v4_{u}, {to}[%row, {col}] {{alignment = 16 : i64}} : {ty}, vector<4xf32>\n")
        };
        let map = WideMap {
            columns,
            load: &load,
            store: &store,
            checks: vec![(16, vec![(from, ty, 4), (to, ty, 4)])],
            setup: String::new(),
            scalar,
        };
        self.wide_map(lowering, flag, &map)
    }

    /// `map`'s head-major copy: for each column `n < heads * width` of a row's part, head
    /// `h = n / width`'s column `c = n mod width` as bf16 into row `h * rows + %row` of `to`, at
    /// column `c` (plus `to`'s offset). [`Self::wide_map`] takes the columns 4 at a time where
    /// each head's part is whole chunks and `map.wide`.
    fn head_major(&self, lowering: Lowering, flag: &str, map: &HeadMajor) -> String {
        let (to, at) = map.to;
        let to_ty = "memref<?x?xbf16>";
        let rows = map.rows;
        let (all, width) = (format!("%{flag}_all"), format!("%{flag}_w"));
        // The output row and column of head `h`'s column `c`; names from `o`.
        let place = |h: &str, c: &str, o: &str| {
            let col = match at {
                Some(at) => format!("{o}_col = arith.addi {c}, {at} : index\n"),
                None => format!("{o}_col = arith.addi {c}, %c0 : index\n"),
            };
            format!("{o}_r0 = arith.muli {h}, {rows} : index\n{o}_r = arith.addi {o}_r0, %row : index\n{col}")
        };
        let one = (map.read)("%hh", "%cc");
        let load = |r: &HeadRead, col: &str| format!("{}[{}{col}] : {}", r.memref, r.lead, r.ty);
        let value = match one.element {
            Stored::F32 => {
                format!("%x = memref.load {}\n{}", load(&one, &one.column), unindent(&round_bf16("%x", "%b")))
            }
            Stored::Bf16 => format!("%b = memref.load {}\n", load(&one, &one.column)),
            Stored::Bf16Bytes => format!(
                "%lo8 = memref.load {}
%hi_at = arith.addi {col}, %c1 : index
%hi8 = memref.load {}
%lo16 = arith.extui %lo8 : i8 to i16
%hi16a = arith.extui %hi8 : i8 to i16
%c8_i16 = arith.constant 8 : i16
%hi16 = arith.shli %hi16a, %c8_i16 : i16
%bits = arith.ori %lo16, %hi16 : i16
%b = arith.bitcast %bits : i16 to bf16
",
                load(&one, &one.column),
                load(&one, "%hi_at"),
                col = one.column,
            ),
        };
        let scalar = format!(
            "scf.for %n = %tid to {all} step %cT {{
  %hh = arith.divui %n, {width} : index
  %cc = arith.remui %n, {width} : index
{index}{value}{place}  memref.store %b, {to}[%o_r, %o_col] : {to_ty}
}}
",
            index = indent2(&one.index),
            value = indent2(&value),
            place = indent2(&place("%hh", "%cc", "%o")),
        );
        let head = format!(
            "{all} = arith.constant {} : index\n{width} = arith.constant {} : index\n",
            map.heads * map.width,
            map.width
        );
        if !map.wide || !map.width.is_multiple_of(VEC) {
            return head + &scalar;
        }
        let reads: Vec<HeadRead> =
            (0..NORM_UNROLL).map(|u| (map.read)(&format!("%hd{u}"), &format!("%cl{u}"))).collect();
        let loads = |u: usize| {
            let r = &reads[u];
            let at = format!(
                "%hd{u} = arith.divui %i{u}, {width} : index\n%cl{u} = arith.remui %i{u}, {width} : index\n{}",
                r.index
            );
            let vload = |ty: &str, align: usize| {
                format!(
                    "vector.load {}[{}{}] {{alignment = {align} : i64}} : {}, {ty}",
                    r.memref, r.lead, r.column, r.ty
                )
            };
            match r.element {
                Stored::F32 => format!("{at}%x4_{u} = {}\n", vload("vector<4xf32>", 16)),
                Stored::Bf16 => format!("{at}%b4_{u} = {}\n", vload("vector<4xbf16>", 8)),
                Stored::Bf16Bytes => format!(
                    "{at}%y8_{u} = {}\n%b4_{u} = vector.bitcast %y8_{u} : vector<8xi8> to vector<4xbf16>\n",
                    vload("vector<8xi8>", 8)
                ),
            }
        };
        let stores = |u: usize| {
            let round = if reads[u].element == Stored::F32 {
                unindent(&round_bf16_lanes(&format!("%x4_{u}"), &format!("%b4_{u}"), VEC))
            } else {
                String::new()
            };
            format!(
                "{round}{}vector.store %b4_{u}, {to}[%o{u}_r, %o{u}_col] {{alignment = 8 : i64}} : {to_ty}, vector<4xbf16>\n",
                place(&format!("%hd{u}"), &format!("%cl{u}"), &format!("%o{u}"))
            )
        };
        let mut checks = map.checks.clone();
        checks.push((8, vec![(to, to_ty, 2)]));
        let wide = WideMap {
            columns: map.heads * map.width,
            load: &loads,
            store: &stores,
            checks,
            setup: BF16_CONSTANTS_VEC.to_string(),
            scalar,
        };
        head + &self.wide_map(lowering, flag, &wide)
    }

    /// Chunks a step of [`Self::wide_map`]'s loop loads before using them: a thread's chunks in
    /// as few steps of at most [`NORM_UNROLL`] as they allow, the steps as even as they can be.
    fn wide_unroll(&self, chunks: usize) -> usize {
        let per_thread = chunks.div_ceil(self.threads).max(1);
        per_thread.div_ceil(per_thread.div_ceil(NORM_UNROLL))
    }

    /// Chunks a thread's loop over the row takes a step in RMSNorm's vectorized phases, at most
    /// [`NORM_UNROLL`]: the step's loads all issued before their first use (one latency for the
    /// step), the steps as even as the thread's chunks allow; one where [`Self::tight_registers`]
    /// (at two, `_d7168_t1024_y_q` and the latent's row spill).
    fn norm_unroll(&self) -> usize {
        if self.tight_registers() {
            return 1;
        }
        let per_thread = (self.d / VEC).div_ceil(self.threads).max(1);
        per_thread.div_ceil(per_thread.div_ceil(NORM_UNROLL))
    }

    /// Whether ptxas holds the kernel to 32 registers a thread (the most that lets the SM hold its
    /// 2048 threads): it does at 1024 threads (two blocks an SM) and for the latent's norm (a
    /// 512-column row at 64 threads: 32 blocks an SM), where it spills what does not fit rather
    /// than give up a block.
    fn tight_registers(&self) -> bool {
        self.threads >= 1024 || matches!(self.op, RowOp::Latent { .. })
    }

    /// Adjacent columns a thread takes together in RMSNorm's phases ([`Self::norm_phases`]):
    /// [`VEC`] where the row is whole chunks of it, else one (the columns strided over the threads).
    pub(crate) fn vec_chunk(&self) -> usize {
        // The heads' output: a chunk within a head.
        let whole = match self.op {
            RowOp::MlaHeadsOut { heads, .. } => (self.d / heads).is_multiple_of(VEC),
            _ => true,
        };
        if whole && self.d.is_multiple_of(VEC) {
            VEC
        } else {
            1
        }
    }

    /// Values every phase of a row uses, computed once per row (after `%row`).
    fn prologue(&self) -> String {
        if let RowOp::Train(op) = self.op {
            return op.prologue();
        }
        if let RowOp::Sparse(op) = self.op {
            return op.prologue(self.threads);
        }
        if let Some(a) = self.absorb() {
            return a.prologue(self.d);
        }
        if let Some(u) = self.up_v() {
            return u.prologue();
        }
        if let RowOp::MlaAbsorb { tokens, .. } | RowOp::MlaUpV { tokens, .. } = self.op {
            // Block (tokens b0 .. b0 + tokens, head h) of the n_b tokens.
            let (rows, ty) = match self.op {
                RowOp::MlaAbsorb { .. } => ("q_nope", "memref<?x?x?xf32>"),
                _ if self.weight == "bf16" => ("out", "memref<?x?xf32>"),
                _ => ("q", "memref<?x?xi8>"),
            };
            return format!(
                "%tile = arith.divui %row, %cH : index
%h = arith.remui %row, %cH : index
%cTok = arith.constant {tokens} : index
%b0 = arith.muli %tile, %cTok : index
%n_b = memref.dim %{rows}, %c0 : {ty}
%head_row = arith.muli %h, %cPerHead : index
"
            );
        }
        if let RowOp::MlaDecode { prefill, selected: true, .. } = self.op {
            // Block (query b, head h); keys: the selection's leading rows (its -1s are a suffix: the
            // count by binary search), each read through `%jr` (see the phases).
            let (dim, ty) = if prefill { ("%c0", "memref<?x?xf32>") } else { ("%c1", "memref<?x?x?xf32>") };
            return format!(
                "%b = arith.divui %row, %cH : index
%h = arith.remui %row, %cH : index
%nsel = memref.dim %selected, %c1 : memref<?x?xi32>
%slots = memref.dim %cache, {dim} : {ty}
%last_slot = arith.subi %slots, %c1 : index
%c31_sel = arith.constant 31 : index
%c30_sel = arith.constant 30 : index
%c0_sel = arith.constant 0 : i32
%nkeys = scf.for %bit_i = %c0 to %c31_sel step %c1 iter_args(%pos = %c0) -> (index) {{
  %shift = arith.subi %c30_sel, %bit_i : index
  %stride = arith.shli %c1, %shift : index
  %cand = arith.addi %pos, %stride : index
  %fits = arith.cmpi ule, %cand, %nsel : index
  %taken = scf.if %fits -> (i1) {{
    %at = arith.subi %cand, %c1 : index
    %v = memref.load %selected[%b, %at] : memref<?x?xi32>
    %nonneg = arith.cmpi sge, %v, %c0_sel : i32
    scf.yield %nonneg : i1
  }} else {{
    %no = arith.constant false
    scf.yield %no : i1
  }}
  %pos2 = arith.select %taken, %cand, %pos : index
  scf.yield %pos2 : index
}}
%head_row = arith.muli %h, %cPerHead : index
"
            ) + MLA_CHUNKS;
        }
        if let RowOp::MlaDecode { prefill: true, .. } = self.op {
            // Block (query b, head h); keys 0..=S - T + b (the queries are the latent's last rows).
            return "%b = arith.divui %row, %cH : index
%h = arith.remui %row, %cH : index
%n_lat = memref.dim %cache, %c0 : memref<?x?xf32>
%n_q = memref.dim %q_nope, %c0 : memref<?x?x?xf32>
%first = arith.subi %n_lat, %n_q : index
%last = arith.addi %first, %b : index
%nkeys = arith.addi %last, %c1 : index
%head_row = arith.muli %h, %cPerHead : index
"
            .to_string()
                + MLA_CHUNKS;
        }
        if let RowOp::MlaDecode { .. } = self.op {
            // Block (b, h); keys 0..=position, clamped to the cache.
            return "%b = arith.divui %row, %cH : index
%h = arith.remui %row, %cH : index
%p64 = memref.load %positions[%b] : memref<?xi64>
%p_neg = arith.cmpi slt, %p64, %zero_i64 : i64
%p_idx = arith.index_cast %p64 : i64 to index
%after = arith.addi %p_idx, %c1 : index
%slots = memref.dim %cache, %c1 : memref<?x?x?xf32>
%nk0 = arith.minui %after, %slots : index
%nkeys = arith.select %p_neg, %c0, %nk0 : index
%head_row = arith.muli %h, %cPerHead : index
"
            .to_string()
                + MLA_CHUNKS;
        }
        if let RowOp::Route { tokens, .. } = self.op {
            // The block's tokens `%row0..` (`%ntok` of them).
            return format!(
                "%cTok = arith.constant {tokens} : index
%row0 = arith.muli %row, %cTok : index
%nrows = memref.dim %parts, %c0 : memref<?x?xf32>
%row_end0 = arith.addi %row0, %cTok : index
%row_end = arith.minui %row_end0, %nrows : index
%ntok = arith.subi %row_end, %row0 : index
"
            );
        }
        if let RowOp::RouteLogits { experts, tokens } = self.op {
            // Block (token block, split, expert tile): tokens `%row0..` (`%ntok`), experts
            // `%e0..` (`%ne`), columns `%k0..%k1` in chunks.
            let tile = experts.min(ROUTE_EXPERT_TILE);
            return format!(
                "%cTok = arith.constant {tokens} : index
%cParts = arith.constant {parts} : index
%cTiles = arith.constant {tiles} : index
%cTE0 = arith.constant {tile} : index
%cE0 = arith.constant {experts} : index
%cWidth = arith.constant {width} : index
%cCh = arith.constant {chunk} : index
%tb = arith.divui %row, %cParts : index
%part = arith.remui %row, %cParts : index
%split = arith.divui %part, %cTiles : index
%etile = arith.remui %part, %cTiles : index
%row0 = arith.muli %tb, %cTok : index
%nrows = memref.dim %x, %c0 : memref<?x?xf32>
%row_end0 = arith.addi %row0, %cTok : index
%row_end = arith.minui %row_end0, %nrows : index
%ntok = arith.subi %row_end, %row0 : index
%e0 = arith.muli %etile, %cTE0 : index
%e_end0 = arith.addi %e0, %cTE0 : index
%e_end = arith.minui %e_end0, %cE0 : index
%ne = arith.subi %e_end, %e0 : index
%k0a = arith.muli %split, %cWidth : index
%k0 = arith.minui %k0a, %cD : index
%k1a = arith.addi %k0, %cWidth : index
%k1 = arith.minui %k1a, %cD : index
%nk = arith.subi %k1, %k0 : index
%nchunks = arith.ceildivui %nk, %cCh : index
",
                parts = self.blocks_per_row(),
                tiles = experts.div_ceil(ROUTE_EXPERT_TILE),
                width = self.d.div_ceil(ROUTER_SPLITS),
                chunk = route_chunk(self.d),
            );
        }
        if let RowOp::SplitRope { .. } | RowOp::LatentKey { .. } | RowOp::HeadsRope { .. } = self.op {
            return "%p64 = memref.load %positions[%row] : memref<?xi64>
%p = arith.index_cast %p64 : i64 to index
%npos = memref.dim %rope, %c0 : memref<?x?xf32>
%p_lo = arith.cmpi sge, %p64, %zero_i64 : i64
%p_hi = arith.cmpi slt, %p, %npos : index
%ok = arith.andi %p_lo, %p_hi : i1
"
            .into();
        }
        let RowOp::Latent { append, cache, .. } = self.op else { return String::new() };
        let mut s = String::from("%true = arith.constant true\n");
        if cache != CacheRows::F32 {
            s.push_str(BF16_CONSTANTS);
        }
        let element = cache.element();
        if append {
            let _ = write!(
                s,
                "%P = memref.dim %cache, %c0 : memref<?x?x{element}>
%is_new = arith.cmpi uge, %row, %P : index
%t = arith.subi %row, %P : index
"
            );
        } else {
            s.push_str("%is_new = arith.constant true\n%t = arith.addi %row, %c0 : index\n");
        }
        s.push_str(
            "%p64 = scf.if %is_new -> (i64) {
  %v = memref.load %positions[%t] : memref<?xi64>
  scf.yield %v : i64
} else {
  scf.yield %zero_i64 : i64
}
%p = arith.index_cast %p64 : i64 to index
%npos = memref.dim %rope, %c0 : memref<?x?xf32>
%p_lo = arith.cmpi sge, %p64, %zero_i64 : i64
%p_hi = arith.cmpi slt, %p, %npos : index
%p_ok0 = arith.andi %p_lo, %p_hi : i1
",
        );
        if append {
            s.push_str("%p_ok = arith.andi %p_ok0, %true : i1\n");
        } else if cache.paged() {
            // Position p is row p mod 64 of the sequence's page p / 64, which the block table
            // places in the pool (a position past the table or a page past the pool: no row).
            let _ = write!(
                s,
                "%c_page = arith.constant {PAGE_ROWS} : index
%n_pages = memref.dim %table, %c1 : memref<?x?xi32>
%pool = memref.dim %cache, %c0 : memref<?x?x?x{element}>
%lp = arith.divui %p, %c_page : index
%pr = arith.remui %p, %c_page : index
%lp_in = arith.cmpi ult, %lp, %n_pages : index
%lp_ok = arith.andi %p_ok0, %lp_in : i1
%pg = scf.if %lp_ok -> (index) {{
  %pg32 = memref.load %table[%row, %lp] : memref<?x?xi32>
  %pg_i = arith.index_cast %pg32 : i32 to index
  scf.yield %pg_i : index
}} else {{
  scf.yield %pool : index
}}
%pg_in = arith.cmpi ult, %pg, %pool : index
%p_ok = arith.andi %lp_ok, %pg_in : i1
"
            );
        } else {
            let _ = write!(
                s,
                "%slots = memref.dim %cache, %c1 : memref<?x?x?x{element}>
%p_in = arith.cmpi slt, %p, %slots : index
%p_ok = arith.andi %p_ok0, %p_in : i1
"
            );
        }
        s.push_str("%ok = arith.andi %is_new, %p_ok : i1\n");
        s
    }

    /// The kernel as a `gpu.module` holding one `gpu.func` (launch: `threads` x 1 x 1 per block,
    /// one block per row; no dynamic shared memory).
    pub fn emit_gpu(&self) -> Result<String, String> {
        self.check()?;
        let args: Vec<String> = self.arguments().iter().map(|(n, t)| format!("%{n}: {t}")).collect();
        let shared: Vec<String> = self
            .shared()
            .iter()
            .map(|(n, _)| {
                // RMSNorm's vectorized phases access the row 16 bytes at a time.
                let align = if *n == "sh_row" { " {llvm.align = 16 : i64}" } else { "" };
                format!("%{n}: {}{align}", self.shared_type(n, Lowering::Gpu))
            })
            .collect();
        let attribution = if shared.is_empty() { String::new() } else { format!(" workgroup({})", shared.join(", ")) };
        let mut s = String::from("module attributes {gpu.container_module} {\ngpu.module @kernels {\n");
        let _ = writeln!(
            s,
            "gpu.func @{}({}){attribution} kernel attributes {{known_block_size = array<i32: {t}, 1, 1>}} {{",
            self.kernel_name(),
            args.join(", "),
            t = self.threads
        );
        s.push_str("%tid = gpu.thread_id x\n%row = gpu.block_id x\n");
        s.push_str(&self.constants());
        s.push_str(&self.prologue());
        // A barrier between consecutive phases; a loop of phases ends each iteration with one.
        let mut first = true;
        for phase in self.phases(Lowering::Gpu) {
            if let Some(header) = phase.strip_prefix(LOOP_BEGIN) {
                if !first {
                    s.push_str("gpu.barrier\n");
                }
                let _ = writeln!(s, "{header} {{");
                first = true;
                continue;
            }
            if phase == LOOP_END {
                s.push_str("gpu.barrier\n}\n");
                first = true;
                continue;
            }
            if !first {
                s.push_str("gpu.barrier\n");
            }
            first = false;
            // Every phase in its own region, so that phases may reuse value names.
            let _ = write!(s, "scf.execute_region {{\n{phase}scf.yield\n}}\n");
        }
        s.push_str("gpu.return\n}\n}\n}\n");
        Ok(s)
    }

    /// The same phases as a CPU function `@<name>(<arguments>)` (C interface), each phase run by
    /// every thread in turn for every row.
    pub fn emit_cpu(&self) -> Result<String, String> {
        self.check()?;
        let args: Vec<String> = self.arguments().iter().map(|(n, t)| format!("%{n}: {t}")).collect();
        let mut s = String::from("module {\n");
        if matches!(
            self.op,
            RowOp::RmsNorm { quantize: true, .. }
                | RowOp::SiluMul { quantize: true }
                | RowOp::MlaDecode { .. }
                | RowOp::MlaHeadsOut { quantize: true, .. }
                | RowOp::MlaUpV { .. }
                | RowOp::MlaUpVMma { .. }
                | RowOp::Latent { cache: CacheRows::Fp8, .. }
        ) || matches!(self.op, RowOp::Train(op) if op.encodes_fp8())
        {
            s.push_str(&crate::conversion::v3_to_cpu::fp8_helpers("rows"));
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "func.func @{}({}) attributes {{llvm.emit_c_interface}} {{",
            self.kernel_name(),
            args.join(", ")
        );
        s.push_str(&self.constants());
        for (name, _) in self.shared() {
            let _ = writeln!(s, "%{name} = memref.alloca() : {}", self.shared_type(name, Lowering::Cpu));
        }
        match self.rows_argument() {
            Some(rows) => {
                let rows_ty = &self.arguments().iter().find(|(n, _)| *n == rows).expect("the rows argument").1.clone();
                let _ = writeln!(s, "%rows_arg = memref.dim %{rows}, %c0 : {rows_ty}");
                let _ = writeln!(s, "%blocks_per_row = arith.constant {} : index", self.blocks_per_row());
                let _ = writeln!(s, "%rows_per_block = arith.constant {} : index", self.rows_per_block());
                let _ = writeln!(s, "%row_blocks = arith.ceildivui %rows_arg, %rows_per_block : index");
                let _ = writeln!(s, "%rows = arith.muli %row_blocks, %blocks_per_row : index");
            }
            None => s.push_str("%rows = arith.constant 1 : index\n"),
        }
        s.push_str("scf.for %row = %c0 to %rows step %c1 {\n");
        s.push_str(&self.prologue());
        for phase in self.phases(Lowering::Cpu) {
            if let Some(header) = phase.strip_prefix(LOOP_BEGIN) {
                let _ = writeln!(s, "{header} {{");
            } else if phase == LOOP_END {
                s.push_str("}\n");
            } else {
                let _ = write!(s, "scf.for %tid = %c0 to %cT step %c1 {{\n{phase}}}\n");
            }
        }
        s.push_str("}\nreturn\n}\n}\n");
        Ok(s)
    }
}

/// MLA attention's chunks of keys (`%cCtx` at a time through shared memory) and whether there are
/// several (then scores are recomputed per pass).
const MLA_CHUNKS: &str = "%ctx_m1 = arith.subi %cCtx, %c1 : index
%nchunks_up = arith.addi %nkeys, %ctx_m1 : index
%nchunks = arith.divui %nchunks_up, %cCtx : index
%several = arith.cmpi ugt, %nchunks, %c1 : index
";

/// An attention chunk's keys inside a `chunk` loop (see [`MLA_CHUNKS`]): `%k0..%k1` of `%nkeys`,
/// this thread's first `%j_first`.
const MLA_CHUNK: &str = "%k0 = arith.muli %chunk, %cCtx : index
%k_end0 = arith.addi %k0, %cCtx : index
%k1 = arith.minui %k_end0, %nkeys : index
%j_first = arith.addi %k0, %tid : index
";

/// One thread folds the chunk's scores (`sh_p`, of type `p`) into the running max `sh_red[0]`
/// (of type `red`), in key order.
fn chunk_max(red: &str, p: &str) -> String {
    format!(
        "%max_thread = arith.cmpi eq, %tid, %c0 : index
scf.if %max_thread {{
  %m0 = memref.load %sh_red[%c0] : {red}
  %max = scf.for %j = %k0 to %k1 step %c1 iter_args(%a = %m0) -> (f32) {{
    %slot = arith.subi %j, %k0 : index
    %v = memref.load %sh_p[%slot] : {p}
    %gt = arith.cmpf ogt, %v, %a : f32
    %a2 = arith.select %gt, %v, %a : f32
    scf.yield %a2 : f32
  }}
  memref.store %max, %sh_red[%c0] : {red}
}}
"
    )
}

/// Every key of the chunk: `sh_p` = exp(score - max `sh_red[0]`) in place (any thread: the same
/// bits as the one that summed them).
fn chunk_exps(lowering: Lowering, red: &str, p: &str) -> String {
    format!(
        "%max = memref.load %sh_red[%c0] : {red}
scf.for %j = %j_first to %k1 step %cT {{
  %slot = arith.subi %j, %k0 : index
  %v = memref.load %sh_p[%slot] : {p}
  %xm = arith.subf %v, %max : f32
{e}  memref.store %e, %sh_p[%slot] : {p}
}}
",
        e = exp(lowering, "%xm", "%e")
    )
}

/// Chunks of the pairs the counting sorts split them into ([`RowOp::Dispatch`],
/// [`TrainRow::PairSort`], [`TrainRow::ExpertFreq`]): a thread counts (and places) each chunk's
/// pairs in order, their per-expert counts in shared memory (32 KiB at most).
fn pair_chunks(experts: usize) -> usize {
    (8192 / experts.max(1)).clamp(1, 32)
}

/// The phases of a counting sort over the (token, slot) pairs of `idx [T, K]` (i32) in
/// [`pair_chunks`] runs: the per-chunk counts `sh_cc [chunks, experts]` (type `cc`), experts below
/// the index constant `experts` (defined by the caller's phases, as everything `%c…`).
struct PairChunks {
    experts: String,
    chunks: usize,
    cc: String,
}

impl PairChunks {
    /// Pairs, chunks, a chunk's pairs and the count cells.
    fn header(&self) -> String {
        format!(
            "%pc_t = memref.dim %idx, %c0 : memref<?x?xi32>
%pc_k = memref.dim %idx, %c1 : memref<?x?xi32>
%pc_n = arith.muli %pc_t, %pc_k : index
%cC = arith.constant {chunks} : index
%per = arith.ceildivui %pc_n, %cC : index
%cells = arith.muli %cC, {e} : index
",
            chunks = self.chunks,
            e = self.experts
        )
    }

    /// The counts cleared.
    fn clear(&self) -> String {
        format!(
            "{}%zero_i32 = arith.constant 0 : i32
scf.for %i = %tid to %cells step %cT {{
  memref.store %zero_i32, %sh_cc[%i] : {}
}}
",
            self.header(),
            self.cc
        )
    }

    /// Chunk `%tid`'s pairs in order (a thread below the chunks): per pair `%p` (token `%t`, slot
    /// `%k`) of an expert `%e` in range, its chunk's count `%n` before this pair is added, then `body`.
    fn walk(&self, body: &str) -> String {
        format!(
            "{h}%one_i32 = arith.constant 1 : i32
%chunked = arith.cmpi ult, %tid, %cC : index
scf.if %chunked {{
  %p_first0 = arith.muli %tid, %per : index
  %p_first = arith.minui %p_first0, %pc_n : index
  %p_end0 = arith.addi %p_first, %per : index
  %p_end = arith.minui %p_end0, %pc_n : index
  %row0 = arith.muli %tid, {e} : index
  scf.for %p = %p_first to %p_end step %c1 {{
    %t = arith.divui %p, %pc_k : index
    %k = arith.remui %p, %pc_k : index
    %v = memref.load %idx[%t, %k] : memref<?x?xi32>
    %e = arith.index_cast %v : i32 to index
    %known = arith.cmpi ult, %e, {e} : index
    scf.if %known {{
      %cell = arith.addi %row0, %e : index
      %n = memref.load %sh_cc[%cell] : {cc}
      %n1 = arith.addi %n, %one_i32 : i32
      memref.store %n1, %sh_cc[%cell] : {cc}
{body}    }}
  }}
}}
",
            h = self.header(),
            e = self.experts,
            cc = self.cc
        )
    }

    /// Per expert `%e` its count `%n` over the chunks, each chunk's cell left holding its first
    /// place among the expert's pairs (the counts before it), then `body`.
    fn totals(&self, body: &str) -> String {
        format!(
            "{h}%zero_i32 = arith.constant 0 : i32
scf.for %e = %tid to {e} step %cT {{
  %n = scf.for %c = %c0 to %cC step %c1 iter_args(%run = %zero_i32) -> (i32) {{
    %cell0 = arith.muli %c, {e} : index
    %cell = arith.addi %cell0, %e : index
    %here = memref.load %sh_cc[%cell] : {cc}
    memref.store %run, %sh_cc[%cell] : {cc}
    %run2 = arith.addi %run, %here : i32
    scf.yield %run2 : i32
  }}
{body}}}
",
            h = self.header(),
            e = self.experts,
            cc = self.cc
        )
    }
}

/// Tokens a block of prefill's routing kernels take ([`RowOp::RouteLogits`]: each gate value it
/// reads serves them all; [`RowOp::Route`]: a warp each selects); decode's take one. Fewer where the
/// selection's arrays would not fit ([`route_tokens`]).
pub const ROUTE_TOKENS: usize = 8;

/// Tokens a block of decode's [`RowOp::RouteLogits`] takes: as fast as one at batch 1 (a thread
/// still sums one token's expert: the block's 4 x 64 sums fit its 256 threads), a quarter of the
/// gate's reads at larger batches (simulated at DeepSeek-V3's width, 8 tokens: 466,944 -> 122,880
/// global requests, the longest thread 6,769 -> 6,825 instructions).
pub const ROUTE_DECODE_TOKENS: usize = 4;

/// Experts a block of [`RowOp::RouteLogits`] sums (a thread each per token).
pub const ROUTE_EXPERT_TILE: usize = 64;

/// Most gate columns per shared-memory tile of [`RowOp::RouteLogits`] (a split's columns in chunks).
const ROUTE_CHUNK: usize = 128;

/// [`RowOp::RouteLogits`]'s chunk `%chunk` of its split's columns `%k0..%k1`: from `%i0`, `%n` of
/// them (the last chunk's fewer).
const ROUTE_CHUNK_COLUMNS: &str = "%i0c = arith.muli %chunk, %cCh : index
%i0 = arith.addi %k0, %i0c : index
%left = arith.subi %k1, %i0 : index
%n = arith.minui %left, %cCh : index
";

/// Consecutive tokens one thread of [`RowOp::RouteLogits`] sums an expert's tile for (each gate
/// value read from shared memory once for them): the block's (token, expert) sums spread over its
/// threads, a divisor of `tokens`.
fn route_tokens_per_thread(tokens: usize, tile: usize, threads: usize) -> usize {
    let most = (tokens * tile).div_ceil(threads).max(1);
    (1..=most.min(tokens)).rev().find(|p| tokens % p == 0).unwrap_or(1)
}

/// Gate columns per tile of [`RowOp::RouteLogits`] over rows of `d`: a split's columns (a power of
/// two), at most [`ROUTE_CHUNK`] — a narrow split's tile holds no columns no thread loads.
fn route_chunk(d: usize) -> usize {
    d.div_ceil(ROUTER_SPLITS).next_power_of_two().min(ROUTE_CHUNK)
}

/// The routing kernel's shared arrays and their elements: per token of the block, its scores,
/// biased scores, flags, group scores and flags, chosen scores.
fn route_arrays(experts: usize, n_group: usize, top_k: usize, tokens: usize) -> Vec<(&'static str, usize)> {
    vec![
        ("sh_acc", tokens * experts),
        ("sh_sb", tokens * experts),
        ("sh_flag", tokens * experts),
        ("sh_gscore", tokens * n_group),
        ("sh_gflag", tokens * n_group),
        ("sh_w", tokens * top_k),
    ]
}

/// Tokens a block of prefill's routing kernel takes: [`ROUTE_TOKENS`], halved while their arrays
/// would pass the static limit.
pub fn route_tokens(experts: usize, n_group: usize, top_k: usize) -> usize {
    let floats = |tokens| route_arrays(experts, n_group, top_k, tokens).iter().map(|(_, n)| n).sum::<usize>();
    let mut tokens = ROUTE_TOKENS;
    while tokens > 1 && 4 * floats(tokens) > STATIC_SHARED_LIMIT {
        tokens /= 2;
    }
    tokens
}

/// A phase list item that opens a loop around the phases up to the matching [`LOOP_END`]: the rest
/// is the loop's `scf.for` header (its bounds defined in the prologue). On the GPU every iteration
/// ends with a barrier; on the CPU each phase in it still runs for every thread in turn.
const LOOP_BEGIN: &str = "//loop ";
const LOOP_END: &str = "//end loop";

/// `body` as a loop over `%{var}` from 0 to `%{count}` (phases: see [`LOOP_BEGIN`]).
/// A block's threads over a grid of `count` cells, `cols` to a row: cell `%q` is (`%<r>`,
/// `%<c>`), and `body` (indented 4) runs where both are below their bounds.
fn grid_loop(count: &str, cols: &str, (r, r_bound): (&str, &str), (c, c_bound): (&str, &str), body: &str) -> String {
    format!(
        "scf.for %q = %tid to {count} step %cT {{
  %{r} = arith.divui %q, {cols} : index
  %{c} = arith.remui %q, {cols} : index
  %{r}_in = arith.cmpi ult, %{r}, {r_bound} : index
  %{c}_in = arith.cmpi ult, %{c}, {c_bound} : index
  %in = arith.andi %{r}_in, %{c}_in : i1
  scf.if %in {{
{body}  }}
}}
"
    )
}

fn loop_phases(var: &str, count: &str, body: Vec<String>) -> Vec<String> {
    let mut phases = vec![format!("{LOOP_BEGIN}scf.for %{var} = %c0 to %{count} step %c1")];
    phases.extend(body);
    phases.push(LOOP_END.to_string());
    phases
}

/// The element of a shared array: the dispatch's counts and offsets are i32, the rest f32 (all
/// four bytes wide).
fn shared_element(name: &str) -> &'static str {
    if matches!(
        name,
        "sh_count"
            | "sh_off"
            | "sh_cc"
            | "sh_key"
            | "sh_idx"
            | "sh_hit"
            | "sh_cnt"
            | "sh_aux"
            | "sh_bmax"
            | "sh_hist"
            | "sh_grp"
    ) {
        "i32"
    } else if matches!(name, "sh_bsum" | "sh_r" | "sh_mass") {
        "f64"
    } else if name == "sh_nkey" || name == "sh_top" {
        "i64"
    } else {
        "f32"
    }
}

/// Bytes of a shared array's element.
fn element_bytes(element: &str) -> usize {
    if element == "f64" || element == "i64" {
        8
    } else {
        4
    }
}

/// `{out}` (f32) = the e4m3 byte `{byte}` (i8) decoded, exactly (NaN for the NaN pattern): on the
/// GPU by the hardware's conversion to f16 (`cvt.rn.f16x2.e4m3x2`: every e4m3 value is an f16) and
/// widened, two instructions; on the CPU by integer arithmetic on the byte's fields.
fn decode_e4m3(byte: &str, out: &str, lowering: Lowering) -> String {
    if lowering == Lowering::Gpu {
        return format!(
            "{out}_b16 = arith.extui {byte} : i8 to i16
{out}_h2 = llvm.inline_asm \"cvt.rn.f16x2.e4m3x2 $0, $1;\", \"=r,h\" {out}_b16 : (i16) -> i32
{out}_h = arith.trunci {out}_h2 : i32 to i16
{out}_hf = arith.bitcast {out}_h : i16 to f16
{out} = arith.extf {out}_hf : f16 to f32
"
        );
    }
    format!(
        "{out}_bi = arith.extui {byte} : i8 to i32
{out}_k3 = arith.constant 3 : i32
{out}_k7 = arith.constant 7 : i32
{out}_k15 = arith.constant 15 : i32
{out}_k20 = arith.constant 20 : i32
{out}_k23 = arith.constant 23 : i32
{out}_k24 = arith.constant 24 : i32
{out}_k120 = arith.constant 120 : i32
{out}_k128 = arith.constant 128 : i32
{out}_k0 = arith.constant 0 : i32
{out}_sign = arith.andi {out}_bi, {out}_k128 : i32
{out}_signbit = arith.shli {out}_sign, {out}_k24 : i32
{out}_eraw = arith.shrui {out}_bi, {out}_k3 : i32
{out}_e = arith.andi {out}_eraw, {out}_k15 : i32
{out}_m = arith.andi {out}_bi, {out}_k7 : i32
{out}_eb = arith.addi {out}_e, {out}_k120 : i32
{out}_es = arith.shli {out}_eb, {out}_k23 : i32
{out}_ms = arith.shli {out}_m, {out}_k20 : i32
{out}_n0 = arith.ori {out}_es, {out}_ms : i32
{out}_n1 = arith.ori {out}_n0, {out}_signbit : i32
{out}_normal = arith.bitcast {out}_n1 : i32 to f32
{out}_mf = arith.uitofp {out}_m : i32 to f32
{out}_tiny = arith.constant 1.953125e-03 : f32
{out}_subabs = arith.mulf {out}_mf, {out}_tiny : f32
{out}_subneg = arith.negf {out}_subabs : f32
{out}_isneg = arith.cmpi ne, {out}_sign, {out}_k0 : i32
{out}_sub = arith.select {out}_isneg, {out}_subneg, {out}_subabs : f32
{out}_issub = arith.cmpi eq, {out}_e, {out}_k0 : i32
{out}_v = arith.select {out}_issub, {out}_sub, {out}_normal : f32
{out}_emax = arith.cmpi eq, {out}_e, {out}_k15 : i32
{out}_mmax = arith.cmpi eq, {out}_m, {out}_k7 : i32
{out}_isnan = arith.andi {out}_emax, {out}_mmax : i1
{out}_nan = arith.constant 0x7FC00000 : f32
{out} = arith.select {out}_isnan, {out}_nan, {out}_v : f32
"
    )
}

/// The constants of [`RowKernel::quant_phases`] for rows of `groups` 128-column groups.
/// Phases (loop markers excepted) with `%c2` defined first.
/// Lines defining `%bt{t}`, the block's token t, and `%okt{t}`, whether it has one: `%b0 + t`
/// below `%n_b` for a block of `tiled` tokens, else the block's one token `%b`.
fn block_token(tiled: Option<usize>, t: usize) -> String {
    match tiled {
        Some(_) => format!(
            "%ct{t} = arith.constant {t} : index
%bt{t} = arith.addi %b0, %ct{t} : index
%okt{t} = arith.cmpi ult, %bt{t}, %n_b : index
"
        ),
        None => "%bt0 = arith.addi %b, %c0 : index\n%okt0 = arith.constant true\n".into(),
    }
}

/// `text(k)` for a block's tokens, `k` the tokens its loops carry a sum each for: with several
/// tokens a block (`tiled`), a block holding one (decode at batch 1, or a batch's last token)
/// branches to `text(1)` — one sum carried, not `tokens` of which all but one are never stored.
fn one_token_or_all(tiled: Option<usize>, text: impl Fn(usize) -> String) -> String {
    match tiled {
        Some(n) if n > 1 => format!(
            "%ntok_b = arith.subi %n_b, %b0 : index
%one_token = arith.cmpi eq, %ntok_b, %c1 : index
scf.if %one_token {{
{}}} else {{
{}}}
",
            text(1),
            text(n)
        ),
        other => text(other.unwrap_or(1)),
    }
}

/// `body(t)` for each token t of the block ([`block_token`]) that it has.
/// A warp's sums of `n` per-lane values (`%acc#0..`, f32; in a loop over `%e` with `%lane`,
/// `%o16`..`%o1` (i32 shift constants) and `%width` defined), value t's stored to `sh_out[e + t v]`
/// (`out`: its type): the text of the sums and of the stores. The values halve at each of the first
/// log2(n) shuffle steps (the lanes with the step's bit set keep the upper half and send the
/// lower), so n values take n - 1 + (5 - log2 n) shuffles where a butterfly each would take 5 n;
/// then token t's sum is in the lanes whose high bits spell t, and the first of them stores it.
/// `n` past a power of two is padded with zeros.
fn lane_sums(n: usize, v: usize, out: &str) -> (String, String) {
    let width = n.next_power_of_two();
    assert!(width <= 32, "at most 32 values per lane");
    let mut t = String::new();
    let mut vals: Vec<String> = (0..width).map(|i| if i < n { format!("%acc#{i}") } else { "%zero".into() }).collect();
    let mut offset = 16;
    let mut index = Vec::new();
    while offset >= 1 {
        let half = vals.len() / 2;
        if half == 0 {
            let x = &vals[0];
            let _ = writeln!(
                t,
                "  %r{offset}, %r{offset}_ok = gpu.shuffle xor {x}, %o{offset}, %width : f32\n  %y{offset} = arith.addf {x}, %r{offset} : f32"
            );
            vals = vec![format!("%y{offset}")];
        } else {
            let _ = writeln!(
                t,
                "  %bit{offset}_c = arith.constant {offset} : index
  %bit{offset}_m = arith.andi %lane, %bit{offset}_c : index
  %hi{offset} = arith.cmpi ne, %bit{offset}_m, %c0 : index"
            );
            index.push((offset, half));
            let mut next = Vec::new();
            for i in 0..half {
                let (lo, hi) = (&vals[i], &vals[i + half]);
                let _ = writeln!(
                    t,
                    "  %send{offset}_{i} = arith.select %hi{offset}, {lo}, {hi} : f32
  %keep{offset}_{i} = arith.select %hi{offset}, {hi}, {lo} : f32
  %got{offset}_{i}, %got{offset}_{i}_ok = gpu.shuffle xor %send{offset}_{i}, %o{offset}, %width : f32
  %h{offset}_{i} = arith.addf %keep{offset}_{i}, %got{offset}_{i} : f32"
                );
                next.push(format!("%h{offset}_{i}"));
            }
            vals = next;
        }
        offset /= 2;
    }
    // The lane's token: the halving steps' bits, each worth the half it kept.
    let mut stores = String::from("  %tok0 = arith.constant 0 : index\n");
    let mut tok = "%tok0".to_string();
    for (offset, half) in &index {
        let _ = writeln!(
            stores,
            "  %tk{offset}_h = arith.constant {half} : index
  %tk{offset}_a = arith.select %hi{offset}, %tk{offset}_h, %c0 : index
  %tk{offset} = arith.addi {tok}, %tk{offset}_a : index"
        );
        tok = format!("%tk{offset}");
    }
    // The first lane of each token's: its bits below the last halving step's are zero.
    let low = index.last().map_or(32, |(offset, _)| *offset);
    let _ = write!(
        stores,
        "  %low_m = arith.constant {} : index
  %low = arith.andi %lane, %low_m : index
  %low0 = arith.cmpi eq, %low, %c0 : index
  %tok_n = arith.constant {n} : index
  %tok_in = arith.cmpi ult, {tok}, %tok_n : index
  %storer = arith.andi %low0, %tok_in : i1
  scf.if %storer {{
    %tok_v = arith.constant {v} : index
    %tok_off = arith.muli {tok}, %tok_v : index
    %tok_at = arith.addi %e, %tok_off : index
    memref.store {sum}, %sh_out[%tok_at] : {out}
  }}
",
        low - 1,
        sum = vals[0],
    );
    (t, stores)
}

/// The routing's sizes that its selection needs (compile-time).
struct RouteShape {
    experts: usize,
    n_group: usize,
    topk_group: usize,
    top_k: usize,
    threads: usize,
    /// A group's score is its best expert's (DeepSeek-V2), not its top two's sum.
    softmax: bool,
}

/// DeepSeek-V2's scores: each token's softmax over its logits in `sh_acc`, written over them and
/// into `sh_sb` (what the selection ranks). On the GPU a warp takes a token (the block's warps its
/// tokens in turn): lane l its experts l, l + 32, ..., the max and then the sum of `exp(l - max)`
/// by butterflies. On the CPU a thread takes a token, summing in expert order (the reference's).
fn route_softmax(lowering: Lowering, experts: usize, threads: usize, (acc, sb): (&str, &str)) -> String {
    // Tokens: a warp's (strided by the block's warps) or a thread's (by its threads); a token's
    // experts: the lane's (strided by 32) or all of them.
    let (first, step, (lo, by)) = match lowering {
        Lowering::Gpu => ("%warp", format!("%cNW = arith.constant {} : index", threads / 32), ("%lane", "%lanes")),
        Lowering::Cpu => ("%tid", "%cNW = arith.addi %cT, %c0 : index".to_string(), ("%c0", "%c1")),
    };
    let butterfly = |value: &str, op: &str, out: &str| match lowering {
        Lowering::Gpu => {
            let mut t = String::new();
            let mut v = value.to_string();
            for o in [16, 8, 4, 2, 1] {
                let combine = match op {
                    // max: the larger (no libdevice call).
                    "max" => format!(
                        "  %{out}{o}_gt = arith.cmpf ogt, %{out}{o}_x, {v} : f32\n  %{out}{o} = arith.select %{out}{o}_gt, %{out}{o}_x, {v} : f32\n"
                    ),
                    _ => format!("  %{out}{o} = arith.addf {v}, %{out}{o}_x : f32\n"),
                };
                let _ = write!(
                    t,
                    "  %{out}{o}_o = arith.constant {o} : i32
  %{out}{o}_x, %{out}{o}_ok = gpu.shuffle xor {v}, %{out}{o}_o, %width : f32
{combine}"
                );
                v = format!("%{out}{o}");
            }
            let _ = writeln!(t, "  %{out} = arith.addf {v}, %zero : f32");
            t
        }
        Lowering::Cpu => format!("  %{out} = arith.addf {value}, %zero : f32\n"),
    };
    format!(
        "%lanes = arith.constant 32 : index
%width = arith.constant 32 : i32
%lane = arith.remui %tid, %lanes : index
%warp = arith.divui %tid, %lanes : index
{step}
%ninf = arith.constant 0xFF800000 : f32
%cE = arith.constant {experts} : index
scf.for %tt = {first} to %ntok step %cNW {{
  %te = arith.muli %tt, %cE : index
  %mx0 = scf.for %e = {lo} to %cE step {by} iter_args(%m = %ninf) -> (f32) {{
    %i = arith.addi %te, %e : index
    %v = memref.load %sh_acc[%i] : {acc}
    %gt = arith.cmpf ogt, %v, %m : f32
    %m2 = arith.select %gt, %v, %m : f32
    scf.yield %m2 : f32
  }}
{max}  %sum0 = scf.for %e = {lo} to %cE step {by} iter_args(%a = %zero) -> (f32) {{
    %i = arith.addi %te, %e : index
    %v = memref.load %sh_acc[%i] : {acc}
    %d = arith.subf %v, %mx : f32
{exp}    memref.store %x, %sh_acc[%i] : {acc}
    %a2 = arith.addf %a, %x : f32
    scf.yield %a2 : f32
  }}
{sum}  scf.for %e = {lo} to %cE step {by} {{
    %i = arith.addi %te, %e : index
    %x = memref.load %sh_acc[%i] : {acc}
    %q = arith.divf %x, %sum : f32
    memref.store %q, %sh_acc[%i] : {acc}
    memref.store %q, %sh_sb[%i] : {sb}
  }}
}}
",
        max = butterfly("%mx0", "max", "mx"),
        exp = exp(lowering, "%d", "%x"),
        sum = butterfly("%sum0", "add", "sum"),
    )
}

/// Routing's selection on the GPU: a warp per token (a block's warps take its tokens in turn), where
/// the CPU lowering has a thread walk every expert once per pick. Lane l holds experts l, l + 32,
/// ... (their biased scores from `sh_sb`, in registers). Each group's top two come from the lanes'
/// own top two merged by shuffles; every lane then picks the best groups as the reference does (all
/// lanes the same); each of the top-k picks is the lanes' best untaken expert of a kept group, then
/// the warp's best by a butterfly of (score, index) — strictly greater wins, ties to the lower
/// index, as in the reference's order — as lane 0 has it. Lane 0 writes the picks and `weights`
/// (the normalization: `sh_w`, `%tk`, `%trow`). Non-NaN scores give the CPU lowering's picks.
fn route_select_warp(shape: RouteShape, scale: f32, weights: &str, (sb, acc, w_ty): (&str, &str, &str)) -> String {
    let RouteShape { experts, n_group, topk_group, top_k, threads, softmax } = shape;
    let per = experts / n_group;
    let m_count = experts.div_ceil(32);
    let mut t = format!(
        "%lanes = arith.constant 32 : index
%width = arith.constant 32 : i32
%lane = arith.remui %tid, %lanes : index
%warp = arith.divui %tid, %lanes : index
%cNW = arith.constant {nw} : index
%ninf = arith.constant 0xFF800000 : f32
%cE = arith.constant {experts} : index
%cE_i = arith.constant {experts} : i32
%cPer = arith.constant {per} : index
%cK = arith.constant {top_k} : index
%scale = arith.constant 0x{scale_bits:08X} : f32
%false = arith.constant false
%tru = arith.constant true
%zero_i32 = arith.constant 0 : i32
%lane0 = arith.cmpi eq, %lane, %c0 : index
",
        nw = threads / 32,
        scale_bits = scale.to_bits(),
    );
    for o in [16, 8, 4, 2, 1] {
        let _ = writeln!(t, "%o{o} = arith.constant {o} : i32");
    }
    let _ = writeln!(
        t,
        "scf.for %tt = %warp to %ntok step %cNW {{
  %trow = arith.addi %row0, %tt : index
  %te = arith.muli %tt, %cE : index
  %tk = arith.muli %tt, %cK : index"
    );
    // The lane's experts: index, in range, group, biased score.
    for m in 0..m_count {
        let _ = writeln!(
            t,
            "  %x{m}_o = arith.constant {off} : index
  %x{m} = arith.addi %lane, %x{m}_o : index
  %xin{m} = arith.cmpi ult, %x{m}, %cE : index
  %xg{m} = arith.divui %x{m}, %cPer : index
  %v{m} = scf.if %xin{m} -> (f32) {{
    %xa = arith.addi %te, %x{m} : index
    %xv = memref.load %sh_sb[%xa] : SB_TYPE
    scf.yield %xv : f32
  }} else {{
    scf.yield %ninf : f32
  }}",
            off = 32 * m
        );
    }
    // Group scores: the sum of each group's top two.
    for g in 0..n_group {
        let (mut a, mut b) = ("%ninf".to_string(), "%ninf".to_string());
        let _ = writeln!(t, "  %gc{g} = arith.constant {g} : index");
        for m in 0..m_count {
            let p = format!("g{g}m{m}");
            let _ = writeln!(
                t,
                "  %{p}_in = arith.cmpi eq, %xg{m}, %gc{g} : index
  %{p}_gta = arith.cmpf ogt, %v{m}, {a} : f32
  %{p}_gtb = arith.cmpf ogt, %v{m}, {b} : f32
  %{p}_na = arith.select %{p}_gta, %v{m}, {a} : f32
  %{p}_nb0 = arith.select %{p}_gtb, %v{m}, {b} : f32
  %{p}_nb = arith.select %{p}_gta, {a}, %{p}_nb0 : f32
  %{p}_a = arith.select %{p}_in, %{p}_na, {a} : f32
  %{p}_b = arith.select %{p}_in, %{p}_nb, {b} : f32"
            );
            (a, b) = (format!("%{p}_a"), format!("%{p}_b"));
        }
        // Merged across the lanes: the top two of the two pairs.
        for o in [16, 8, 4, 2, 1] {
            let p = format!("g{g}s{o}");
            let _ = writeln!(
                t,
                "  %{p}_oa, %{p}_oa_ok = gpu.shuffle xor {a}, %o{o}, %width : f32
  %{p}_ob, %{p}_ob_ok = gpu.shuffle xor {b}, %o{o}, %width : f32
  %{p}_up = arith.cmpf ogt, %{p}_oa, {a} : f32
  %{p}_a = arith.select %{p}_up, %{p}_oa, {a} : f32
  %{p}_x0 = arith.cmpf ogt, %{p}_ob, {a} : f32
  %{p}_m0 = arith.select %{p}_x0, %{p}_ob, {a} : f32
  %{p}_x1 = arith.cmpf ogt, {b}, %{p}_oa : f32
  %{p}_m1 = arith.select %{p}_x1, {b}, %{p}_oa : f32
  %{p}_b = arith.select %{p}_up, %{p}_m0, %{p}_m1 : f32"
            );
            (a, b) = (format!("%{p}_a"), format!("%{p}_b"));
        }
        // DeepSeek-V2: the group's best alone.
        let second = if softmax { "%zero" } else { &b };
        let _ = writeln!(t, "  %gs{g} = arith.addf {a}, {second} : f32");
    }
    // The best groups, as the reference picks them (every lane alike).
    let mut kept: Vec<String> = vec!["%false".to_string(); n_group];
    for j in 0..topk_group {
        let (mut bv, mut bi) = ("%ninf".to_string(), format!("%gnone{j}"));
        let _ = writeln!(t, "  %gnone{j} = arith.constant {n_group} : index");
        for (g, k) in kept.iter().enumerate() {
            let p = format!("kg{j}_{g}");
            let _ = writeln!(
                t,
                "  %{p}_free = arith.xori {k}, %tru : i1
  %{p}_gt = arith.cmpf ogt, %gs{g}, {bv} : f32
  %{p}_none = arith.cmpi eq, {bi}, %gnone{j} : index
  %{p}_better = arith.ori %{p}_gt, %{p}_none : i1
  %{p}_take = arith.andi %{p}_free, %{p}_better : i1
  %{p}_v = arith.select %{p}_take, %gs{g}, {bv} : f32
  %{p}_i = arith.select %{p}_take, %gc{g}, {bi} : index"
            );
            (bv, bi) = (format!("%{p}_v"), format!("%{p}_i"));
        }
        for (g, k) in kept.iter_mut().enumerate() {
            let p = format!("kg{j}_{g}");
            let _ = writeln!(
                t,
                "  %{p}_is = arith.cmpi eq, {bi}, %gc{g} : index\n  %{p}_kept = arith.ori {k}, %{p}_is : i1"
            );
            *k = format!("%{p}_kept");
        }
    }
    // The lane's experts a pick may take: in range, of a kept group.
    for m in 0..m_count {
        let mut el = "%false".to_string();
        for (g, k) in kept.iter().enumerate() {
            let p = format!("el{m}_{g}");
            let _ = writeln!(
                t,
                "  %{p}_is = arith.cmpi eq, %xg{m}, %gc{g} : index\n  %{p}_k = arith.andi %{p}_is, {k} : i1\n  %{p} = arith.ori {el}, %{p}_k : i1"
            );
            el = format!("%{p}");
        }
        let _ = writeln!(t, "  %el{m} = arith.andi {el}, %xin{m} : i1");
    }
    // The picks.
    let mut taken: Vec<String> = vec!["%false".to_string(); m_count];
    for j in 0..top_k {
        let (mut bv, mut bi) = ("%ninf".to_string(), "%cE_i".to_string());
        for (m, tk) in taken.iter().enumerate() {
            let p = format!("p{j}_{m}");
            let _ = writeln!(
                t,
                "  %{p}_free = arith.xori {tk}, %tru : i1
  %{p}_ok = arith.andi %el{m}, %{p}_free : i1
  %{p}_gt = arith.cmpf ogt, %v{m}, {bv} : f32
  %{p}_none = arith.cmpi eq, {bi}, %cE_i : i32
  %{p}_better = arith.ori %{p}_gt, %{p}_none : i1
  %{p}_take = arith.andi %{p}_ok, %{p}_better : i1
  %{p}_x = arith.index_cast %x{m} : index to i32
  %{p}_v = arith.select %{p}_take, %v{m}, {bv} : f32
  %{p}_i = arith.select %{p}_take, %{p}_x, {bi} : i32"
            );
            (bv, bi) = (format!("%{p}_v"), format!("%{p}_i"));
        }
        for o in [16, 8, 4, 2, 1] {
            let p = format!("w{j}s{o}");
            let _ = writeln!(
                t,
                "  %{p}_ov, %{p}_ov_ok = gpu.shuffle xor {bv}, %o{o}, %width : f32
  %{p}_oi, %{p}_oi_ok = gpu.shuffle xor {bi}, %o{o}, %width : i32
  %{p}_some = arith.cmpi ne, %{p}_oi, %cE_i : i32
  %{p}_none = arith.cmpi eq, {bi}, %cE_i : i32
  %{p}_gt = arith.cmpf ogt, %{p}_ov, {bv} : f32
  %{p}_eq = arith.cmpf oeq, %{p}_ov, {bv} : f32
  %{p}_lo = arith.cmpi slt, %{p}_oi, {bi} : i32
  %{p}_tie = arith.andi %{p}_eq, %{p}_lo : i1
  %{p}_b0 = arith.ori %{p}_none, %{p}_gt : i1
  %{p}_b1 = arith.ori %{p}_b0, %{p}_tie : i1
  %{p}_better = arith.andi %{p}_some, %{p}_b1 : i1
  %{p}_v = arith.select %{p}_better, %{p}_ov, {bv} : f32
  %{p}_i = arith.select %{p}_better, %{p}_oi, {bi} : i32"
            );
            (bv, bi) = (format!("%{p}_v"), format!("%{p}_i"));
        }
        let _ = writeln!(
            t,
            "  %win{j}, %win{j}_ok = gpu.shuffle idx {bi}, %zero_i32, %width : i32
  %wi{j} = arith.index_cast %win{j} : i32 to index
  scf.if %lane0 {{
    %jj{j} = arith.constant {j} : index
    memref.store %win{j}, %idx[%trow, %jj{j}] : memref<?x?xi32>
    %be{j} = arith.addi %te, %wi{j} : index
    %sv{j} = memref.load %sh_acc[%be{j}] : ACC_TYPE
    %wj{j} = arith.addi %tk, %jj{j} : index
    memref.store %sv{j}, %sh_w[%wj{j}] : W_TYPE
  }}"
        );
        for (m, tk) in taken.iter_mut().enumerate() {
            let p = format!("t{j}_{m}");
            let _ =
                writeln!(t, "  %{p}_is = arith.cmpi eq, %wi{j}, %x{m} : index\n  %{p} = arith.ori {tk}, %{p}_is : i1");
            *tk = format!("%{p}");
        }
    }
    let _ = write!(t, "  scf.if %lane0 {{\n  {weights}}}\n}}\n");
    t.replace("SB_TYPE", sb).replace("ACC_TYPE", acc).replace("W_TYPE", w_ty)
}

fn per_token(tiled: Option<usize>, body: impl Fn(usize) -> String) -> String {
    (0..tiled.unwrap_or(1)).map(|t| format!("{}scf.if %okt{t} {{\n{}}}\n", block_token(tiled, t), body(t))).collect()
}

fn with_c2(phases: Vec<String>) -> Vec<String> {
    phases
        .into_iter()
        .map(|p| {
            if p.starts_with(LOOP_BEGIN) || p == LOOP_END {
                p
            } else {
                format!("%c2 = arith.constant 2 : index\n{p}")
            }
        })
        .collect()
}

/// Where [`RowKernel::quant_phases_to`] puts a row's quantization: lines storing group `%g`'s
/// scale `%s`, lines storing column `%i`'s byte `%byte`; `pow2`: the scales are powers of two
/// ([`POW2_SCALE`]) rather than `amax / 448`.
/// What RMSNorm's normalization stores per column ([`RowKernel::norm_phases`]): `scalar` of `%y_v`
/// at column `%i`; where given, `vector` of `%y4` (`vector<4xf32>`) at columns `%i0..%i0 + 4` (on
/// sm_90a, when every buffer it names, as [`aligned`] takes them, allows 16-byte accesses).
struct NormStore<'a> {
    scalar: String,
    vector: Option<(String, Vec<Buffer<'a>>)>,
}

/// A buffer as [`aligned`] takes it: its SSA name, memref type and bytes an element.
type Buffer<'a> = (&'a str, &'a str, usize);

/// The head of a loop over a thread's chunks (`%cVecs` of them, chunk `c` by thread `c mod T`)
/// `unroll` at a time, `scf.for %c0u = %tid to %cVecs step %cTU`: its constants, and the body's
/// start, which names for each `u < unroll` the chunk's first column `%i{u}` and whether the chunk
/// is one of the row's `%in{u}`. A chunk past the row is the step's first (`%c0u`, always one), so
/// that every access stays in the thread's own columns.
fn chunk_unroll(unroll: usize, threads: usize) -> (String, String) {
    let mut head = format!("  %cTU = arith.constant {} : index\n", threads * unroll);
    let mut ids = String::new();
    for u in 0..unroll {
        if u == 0 {
            ids.push_str("    %in0 = arith.constant true\n    %cs0 = arith.addi %c0u, %c0 : index\n");
        } else {
            let _ = writeln!(head, "  %cTu{u} = arith.constant {} : index", threads * u);
            let _ = write!(
                ids,
                "    %ch{u} = arith.addi %c0u, %cTu{u} : index
    %in{u} = arith.cmpi ult, %ch{u}, %cVecs : index
    %cs{u} = arith.select %in{u}, %ch{u}, %c0u : index
"
            );
        }
        let _ = writeln!(ids, "    %i{u} = arith.muli %cs{u}, %cVec : index");
    }
    (head, ids)
}

/// Columns a thread takes together in the vectorized row phases: 16 bytes of f32.
const VEC: usize = 4;

/// Most chunks a step of RMSNorm's vectorized loops loads before using them. More do not buy
/// fewer waits: at 8 (a 256-thread block's 7 chunks of a 7168-column row in one step) ptxas
/// schedules the first chunk's use after the fifth load (its SASS), so the row still waits twice,
/// as at 4 (4 + 3), and the block needs 48 registers a thread instead of 40 (64 instead of 53
/// with both outputs): a block less per SM.
const NORM_UNROLL: usize = 4;

/// Columns of a row mapped one by one ([`RowKernel::wide_map`]).
struct WideMap<'a> {
    /// How many (from column 0).
    columns: usize,
    /// Chunk `u`'s loads at its first column `%i{u}` (the names ending `_{u}`).
    load: &'a dyn Fn(usize) -> String,
    /// Chunk `u`'s arithmetic and stores (run where `%in{u}`).
    store: &'a dyn Fn(usize) -> String,
    /// The buffers the chunks access, each set with the alignment its accesses need in bytes.
    checks: Vec<(usize, Vec<Buffer<'a>>)>,
    /// Values the chunks use, computed before the loop.
    setup: String,
    /// The same map a column at a time.
    scalar: String,
}

/// A head-major copy of a row's part ([`RowKernel::head_major`]).
struct HeadMajor<'a> {
    heads: usize,
    /// Columns of a head's part.
    width: usize,
    /// Where head `h`'s column `c` is read from (given their names).
    read: &'a dyn Fn(&str, &str) -> HeadRead,
    /// Rows of the output a head has (`%T`: the tokens).
    rows: &'a str,
    /// The output (bf16 rows), and the column a head's part starts at.
    to: (&'a str, Option<&'a str>),
    /// The buffers read, with the alignment in bytes a chunk's load needs.
    checks: Vec<(usize, Vec<Buffer<'a>>)>,
    /// Whether a head's chunk is a load (the part's offset keeps it aligned).
    wide: bool,
}

/// A column's load ([`HeadMajor::read`]).
struct HeadRead {
    /// Index arithmetic before the load.
    index: String,
    memref: String,
    /// Its memref type.
    ty: String,
    /// The indices before the last (each followed by ", ").
    lead: String,
    /// The last index (the column; an fp8 row's first byte).
    column: String,
    /// What is there.
    element: Stored,
}

/// How a [`HeadRead`]'s values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// f32, rounded to bf16 (to nearest even).
    F32,
    Bf16,
    /// An i8 row's bytes, two a bf16 (low first): an fp8 cache row's RoPE key.
    Bf16Bytes,
}

/// `%{flag}` (i1): every buffer of `buffers` starts on `bytes` bytes and, beyond one dimension, has
/// rows (every dimension past the first) a multiple of `bytes` long: then an access of `bytes`
/// bytes at an offset in the row that is a multiple of `bytes` is aligned. (The runtime passes
/// every memref at offset 0 with contiguous rows: `v3c_runtime::abi::memref`.)
fn aligned(flag: &str, bytes: usize, buffers: &[Buffer]) -> String {
    let mut s = format!("%{flag}_align = arith.constant {bytes} : index\n");
    let mut terms = Vec::new();
    for (k, (name, ty, element)) in buffers.iter().enumerate() {
        let _ = writeln!(s, "%{flag}_b{k} = memref.extract_aligned_pointer_as_index {name} : {ty} -> index");
        terms.push(format!("%{flag}_b{k}"));
        // A row: every dimension past the first (`memref<?x?xf32>`: rank 2).
        let rank = ty.matches('x').count();
        if rank > 1 {
            let mut row = format!("%{flag}_e{k}");
            let _ = writeln!(s, "{row} = arith.constant {element} : index");
            for dim in 1..rank {
                let _ = writeln!(s, "%{flag}_c{k}_{dim} = arith.constant {dim} : index");
                let _ = writeln!(s, "%{flag}_n{k}_{dim} = memref.dim {name}, %{flag}_c{k}_{dim} : {ty}");
                let _ = writeln!(s, "%{flag}_r{k}_{dim} = arith.muli {row}, %{flag}_n{k}_{dim} : index");
                row = format!("%{flag}_r{k}_{dim}");
            }
            terms.push(row);
        }
    }
    let mut acc = terms[0].clone();
    for (k, t) in terms.iter().enumerate().skip(1) {
        let _ = writeln!(s, "%{flag}_or{k} = arith.ori {acc}, {t} : index");
        acc = format!("%{flag}_or{k}");
    }
    let _ = writeln!(s, "%{flag}_mis = arith.remui {acc}, %{flag}_align : index");
    let _ = writeln!(s, "%{flag}_c0 = arith.constant 0 : index");
    let _ = writeln!(s, "%{flag} = arith.cmpi eq, %{flag}_mis, %{flag}_c0 : index");
    s
}

/// [`aligned`] of each set of `checks` (with the alignment its accesses need in bytes): the checks'
/// text, and the name of the i1 that is true where all pass.
fn aligned_all(flag: &str, checks: &[(usize, Vec<Buffer>)]) -> (String, String) {
    let mut text = String::new();
    let mut all = String::new();
    for (k, (bytes, buffers)) in checks.iter().enumerate() {
        text.push_str(&aligned(&format!("{flag}{k}"), *bytes, buffers));
        all = match k {
            0 => format!("%{flag}{k}"),
            _ => {
                let _ = writeln!(text, "%{flag}_and{k} = arith.andi {all}, %{flag}{k} : i1");
                format!("%{flag}_and{k}")
            }
        };
    }
    (text, all)
}

/// A step of a loop over chunks ([`chunk_unroll`]'s `ids` first): every chunk's loads, then each
/// chunk's arithmetic and stores where the chunk is one of the row's (`%in{u}`).
fn chunk_steps(ids: String, unroll: usize, load: &dyn Fn(usize) -> String, store: &dyn Fn(usize) -> String) -> String {
    let mut body = ids;
    (0..unroll).for_each(|u| body.push_str(&indent4(&load(u))));
    for u in 0..unroll {
        let _ = write!(body, "    scf.if %in{u} {{\n{}    }}\n", indent6(&store(u)));
    }
    body
}

struct QuantOut {
    scale: String,
    byte: String,
    pow2: bool,
}

/// `%s`: the least power of two with `%m <= 448 %s` (`%m` floored at 1e-4: `%floored`), by the
/// bits of `%floored / 448` — [`v3c_runtime::plan::pow2_scale`], bit for bit.
const POW2_SCALE: &str = "  %x = arith.divf %floored, %e4m3_max : f32
  %xb = arith.bitcast %x : f32 to i32
  %c23_i32 = arith.constant 23 : i32
  %mant_mask = arith.constant 8388607 : i32
  %c0_i32z = arith.constant 0 : i32
  %xe = arith.shrui %xb, %c23_i32 : i32
  %xm = arith.andi %xb, %mant_mask : i32
  %frac = arith.cmpi ne, %xm, %c0_i32z : i32
  %up = arith.extui %frac : i1 to i32
  %e2 = arith.addi %xe, %up : i32
  %sb = arith.shli %e2, %c23_i32 : i32
  %s0 = arith.bitcast %sb : i32 to f32
  %lim = arith.mulf %s0, %e4m3_max : f32
  %over = arith.cmpf ogt, %m, %lim : f32
  %s1 = arith.addf %s0, %s0 : f32
  %s = arith.select %over, %s1, %s0 : f32
";

/// The constants [`round_bf16`] uses.
const BF16_CONSTANTS: &str = "%c16_i32 = arith.constant 16 : i32
%c1_i32 = arith.constant 1 : i32
%c7fff_i32 = arith.constant 32767 : i32
";

/// `{out}` = the larger of `{acc}` and |`{value}`| (a bit mask, as the inference quantization
/// takes it; `ogt`: a NaN value is passed over, as the reference's |max| fold passes it).
fn amax_step(value: &str, acc: &str, out: &str) -> String {
    format!(
        "{out}_bits = arith.bitcast {value} : f32 to i32
{out}_abs_bits = arith.andi {out}_bits, %abs_mask : i32
{out}_abs = arith.bitcast {out}_abs_bits : i32 to f32
{out}_gt = arith.cmpf ogt, {out}_abs, {acc} : f32
{out} = arith.select {out}_gt, {out}_abs, {acc} : f32
"
    )
}

/// `{s}`: a 1x128 group's scale from its |max| `{amax}`: floored, over e4m3's largest (needs
/// [`quant_constants`]).
fn group_scale(amax: &str, s: &str) -> String {
    format!(
        "{s}_small = arith.cmpf olt, {amax}, %amax_floor : f32
{s}_floored = arith.select {s}_small, %amax_floor, {amax} : f32
{s} = arith.divf {s}_floored, %e4m3_max : f32
"
    )
}

/// `{out}` (bf16) = `{x}` (f32) rounded to nearest even by its bits — the same integer arithmetic
/// in both lowerings — and `{out}_f`, that value as f32 (needs [`BF16_CONSTANTS`]).
fn round_bf16(x: &str, out: &str) -> String {
    round_bf16_lanes(x, out, 1)
}

/// The constants [`round_bf16_lanes`] uses at [`VEC`] lanes.
const BF16_CONSTANTS_VEC: &str = "%c16_i32_v = arith.constant dense<16> : vector<4xi32>
%c1_i32_v = arith.constant dense<1> : vector<4xi32>
%c7fff_i32_v = arith.constant dense<32767> : vector<4xi32>
";

/// [`round_bf16`] of 1 value, or of [`VEC`] (`vector<4xf32>` to `vector<4xbf16>`, needs
/// [`BF16_CONSTANTS_VEC`]): the same arithmetic on each lane.
fn round_bf16_lanes(x: &str, out: &str, lanes: usize) -> String {
    let (f, i, h, b, c) = if lanes == 1 {
        ("f32".to_string(), "i32".to_string(), "i16".to_string(), "bf16".to_string(), "")
    } else {
        assert_eq!(lanes, VEC, "bf16 rounding takes 1 or {VEC} lanes");
        let v = |t: &str| format!("vector<{VEC}x{t}>");
        (v("f32"), v("i32"), v("i16"), v("bf16"), "_v")
    };
    format!(
        "  {out}_bits = arith.bitcast {x} : {f} to {i}
  {out}_lsb0 = arith.shrui {out}_bits, %c16_i32{c} : {i}
  {out}_lsb = arith.andi {out}_lsb0, %c1_i32{c} : {i}
  {out}_bias = arith.addi {out}_lsb, %c7fff_i32{c} : {i}
  {out}_sum = arith.addi {out}_bits, {out}_bias : {i}
  {out}_top = arith.shrui {out}_sum, %c16_i32{c} : {i}
  {out}_i16 = arith.trunci {out}_top : {i} to {h}
  {out} = arith.bitcast {out}_i16 : {h} to {b}
  {out}_back = arith.shli {out}_top, %c16_i32{c} : {i}
  {out}_f = arith.bitcast {out}_back : {i} to {f}
"
    )
}

fn quant_constants(groups: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "%cG = arith.constant {groups} : index");
    let _ = writeln!(s, "%cGP = arith.constant {} : index", groups * AMAX_PARTS);
    let _ = writeln!(s, "%cGW = arith.constant {} : index", groups * 32);
    let _ = writeln!(s, "%cP = arith.constant {AMAX_PARTS} : index");
    let _ = writeln!(s, "%cGroup = arith.constant {GROUP} : index");
    let _ = writeln!(s, "%cPart = arith.constant {} : index", GROUP / AMAX_PARTS);
    let _ = writeln!(s, "%amax_floor = arith.constant 1.0e-04 : f32");
    let _ = writeln!(s, "%abs_mask = arith.constant 2147483647 : i32");
    let _ = writeln!(s, "%e4m3_max = arith.constant 0x{:08X} : f32", E4M3_MAX.to_bits());
    s
}

/// `{out} = exp(value)`: on sm_90a `ex2.approx` of `value * log2(e)` (no libdevice is linked; a few
/// ulp), on the CPU libm's (the reference's).
/// A tree over the threads' shared values: one phase per stride (threads / 2 down to 1) in which
/// each thread below the stride combines its slot with slot `%other` = tid + stride (`combine`).
fn tree_phases(threads: usize, combine: &str) -> Vec<String> {
    let mut phases = Vec::new();
    let mut stride = threads / 2;
    while stride >= 1 {
        phases.push(format!(
            "%stride = arith.constant {stride} : index
%in = arith.cmpi ult, %tid, %stride : index
scf.if %in {{
  %other = arith.addi %tid, %stride : index
{}}}
",
            indent2(combine)
        ));
        stride /= 2;
    }
    phases
}

/// `text` indented by two more spaces.
fn indent2(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `text` with each line's leading spaces dropped.
fn unindent(text: &str) -> String {
    text.lines().map(|l| format!("{}\n", l.trim_start())).collect()
}

fn indent4(text: &str) -> String {
    indent2(&indent2(text))
}

fn indent6(text: &str) -> String {
    indent2(&indent4(text))
}

fn exp(lowering: Lowering, value: &str, out: &str) -> String {
    match lowering {
        Lowering::Gpu => format!(
            "{out}_log2e = arith.constant 1.44269502 : f32\n{out}_x = arith.mulf {value}, {out}_log2e : f32\n{out} = \
             llvm.inline_asm \"ex2.approx.ftz.f32 $0, $1;\", \"=f,f\" {out}_x : (f32) -> f32\n"
        ),
        Lowering::Cpu => format!("{out} = math.exp {value} : f32\n"),
    }
}

/// One RoPE rotation inside a loop over the frequency `%i` (of `%cHalf`) at the table row `%p`
/// (`inverse`: with the sine negated, the rotation back, as RoPE's gradient):
/// the pair `(%ia, %ib)` — (2i, 2i + 1) interleaved, else (i, i + half) — read by `load(index,
/// value)` (lines defining `value`), rotated as the reference does (`a' = a cos - b sin`, `b' = b cos + a sin`, the
/// products rounded before the sum), and written by `store(value, index, tag)` (lines; `tag` keeps
/// the two stores' value names apart).
fn rope_rotation(
    interleave: bool,
    inverse: bool,
    load: impl Fn(&str, &str) -> String,
    store: impl Fn(&str, &str, &str) -> String,
) -> String {
    let pair = if interleave {
        "  %c2 = arith.constant 2 : index\n  %two_i = arith.muli %i, %c2 : index\n  %ia = arith.addi %two_i, %c0 : index\n  %ib = arith.addi %two_i, %c1 : index\n"
    } else {
        "  %ia = arith.addi %i, %c0 : index\n  %ib = arith.addi %i, %cHalf : index\n"
    };
    format!(
        "{pair}{xa}{yb}  %sin_col = arith.addi %i, %cHalf : index
  %cos_v = memref.load %rope[%p, %i] : memref<?x?xf32>
{sin}  %xc = arith.mulf %x_r, %cos_v : f32
  %ys = arith.mulf %y_r, %sin_v : f32
  %ra = arith.subf %xc, %ys : f32
  %yc = arith.mulf %y_r, %cos_v : f32
  %xs = arith.mulf %x_r, %sin_v : f32
  %rb = arith.addf %yc, %xs : f32
{sa}{sb}",
        sin = if inverse {
            "  %sin_raw = memref.load %rope[%p, %sin_col] : memref<?x?xf32>\n  %sin_v = arith.negf %sin_raw : f32\n"
        } else {
            "  %sin_v = memref.load %rope[%p, %sin_col] : memref<?x?xf32>\n"
        },
        xa = load("%ia", "%x_r"),
        yb = load("%ib", "%y_r"),
        sa = store("%ra", "%ia", "a"),
        sb = store("%rb", "%ib", "b"),
    )
}

/// Per row of `%y [rows, heads * %cHead]`: each head's `per` columns (from its column `first`, or
/// 0) copied into `to [rows, heads, %cHead or fewer]` at the same column, a thread a column
/// (`all` = heads x per of them).
fn head_columns((all, per, first): (&str, &str, Option<&str>), to: &str) -> String {
    let at = match first {
        Some(first) => format!("  %c0p = arith.remui %j, {per} : index\n  %c = arith.addi %c0p, {first} : index\n"),
        None => format!("  %c = arith.remui %j, {per} : index\n"),
    };
    format!(
        "scf.for %j = %tid to {all} step %cT {{
  %h = arith.divui %j, {per} : index
{at}  %base = arith.muli %h, %cHead : index
  %col = arith.addi %base, %c : index
  %v = memref.load %y[%row, %col] : memref<?x?xf32>
  memref.store %v, {to}[%row, %h, %c] : memref<?x?x?xf32>
}}
"
    )
}

/// The head of a loop over every head's rope pairs (`%cHalfAll`, a thread a pair): pair `%i` of head
/// `%h`, whose first column in `%y` is `%head`; then `body` (left open: the caller closes the loop).
fn head_pairs(body: &str) -> String {
    format!(
        "scf.for %j = %tid to %cHalfAll step %cT {{
  %h = arith.divui %j, %cHalf : index
  %i = arith.remui %j, %cHalf : index
  %head = arith.muli %h, %cHead : index
{body}"
    )
}

/// `{out} = sqrt(value)`, correctly rounded (as the reference's f32 sqrt): on sm_90a the PTX
/// instruction itself (`math.sqrt` would become a libdevice call, and no libdevice is linked).
fn sqrt(lowering: Lowering, value: &str, out: &str) -> String {
    match lowering {
        Lowering::Gpu => format!("{out} = llvm.inline_asm \"sqrt.rn.f32 $0, $1;\", \"=f,f\" {value} : (f32) -> f32\n"),
        Lowering::Cpu => format!("{out} = math.sqrt {value} : f32\n"),
    }
}

/// `%{byte}` (i8) = the e4m3 encoding of `value` (f32): round to nearest even, saturating on
/// sm_90a (`cvt.rn.satfinite.e4m3x2.f32`), the CPU helper otherwise (the same bits for the
/// |values| <= 448 that quantization produces).
fn encode_e4m3(lowering: Lowering, value: &str, byte: &str) -> String {
    match lowering {
        Lowering::Gpu => format!(
            "  %pair = nvvm.convert.f32x2.to.f8x2 %zero, {value} {{rnd = #nvvm.fp_rnd_mode<rn>, sat = \
             #nvvm.sat_mode<satfinite>}} : i16 (f8E4M3FN)\n  {byte} = arith.trunci %pair : i16 to i8\n"
        ),
        Lowering::Cpu => format!("  {byte} = func.call @rows_f8_encode({value}) : (f32) -> i8\n"),
    }
}

/// The GPU |max| scan's step `%j` (a warp a group): its group `%g`, lane `%lane`, and the group's
/// first column `%g0`.
const SCAN_LANE: &str = "  %lanes = arith.constant 32 : index
  %width = arith.constant 32 : i32
  %g = arith.divui %j, %lanes : index
  %lane = arith.remui %j, %lanes : index
  %g0 = arith.muli %g, %cGroup : index
";

/// A butterfly of shuffles over a warp's lanes (`%width`: 32) giving every lane the greatest of
/// their `m0` (select-if-greater: NaNs skipped); the lines, and the result's name.
fn amax_butterfly(m0: &str) -> (String, String) {
    let mut butterfly = String::new();
    let mut m = m0.to_string();
    for o in [16, 8, 4, 2, 1] {
        let _ = writeln!(
            butterfly,
            "  %o{o} = arith.constant {o} : i32
  %s{o}, %ok{o} = gpu.shuffle xor {m}, %o{o}, %width : f32
  %gt{o} = arith.cmpf ogt, %s{o}, {m} : f32
  %m{o} = arith.select %gt{o}, %s{o}, {m} : f32"
        );
        m = format!("%m{o}");
    }
    (butterfly, m)
}

/// `{out}0..{out}3` = the elements of `{vector}` (`vector<4xf32>`).
fn extract4(vector: &str, out: &str) -> String {
    (0..VEC).map(|k| format!("    {out}{k} = vector.extract {vector}[{k}] : f32 from vector<4xf32>\n")).collect()
}

/// `%v{suffix}` = silu(g) * u = g / (1 + exp(-g)) * u, in the reference's order.
fn silu_of(lowering: Lowering, (g, u): (&str, &str), suffix: &str) -> String {
    format!(
        "  %sw_neg{suffix} = arith.negf {g} : f32
{exp}  %sw_den{suffix} = arith.addf %one, %sw_e{suffix} : f32
  %sw_silu{suffix} = arith.divf {g}, %sw_den{suffix} : f32
  %v{suffix} = arith.mulf %sw_silu{suffix}, {u} : f32
",
        exp = exp(lowering, &format!("%sw_neg{suffix}"), &format!("%sw_e{suffix}"))
    )
}

/// The quantization's values four columns at a time ([`RowKernel::quant_phases_wide`]): `value(c)`
/// defines `%v0..%v3`, reading `buffers` (beside `%q`) 16 bytes at a time.
struct Wide<'a> {
    value: &'a dyn Fn(&str) -> String,
    buffers: Vec<Buffer<'a>>,
}

/// `{out}` (`vector<4xi8>`): the four values of `{value}` (`vector<4xf32>`) as e4m3 bytes on sm_90a,
/// each as [`encode_e4m3`] gives it, in two conversions of a pair.
fn encode_e4m3x4(value: &str, out: &str) -> String {
    let mut s = String::new();
    for k in 0..4 {
        let _ = writeln!(s, "    {out}_v{k} = vector.extract {value}[{k}] : f32 from vector<4xf32>");
    }
    for (pair, lo, hi) in [("01", 0, 1), ("23", 2, 3)] {
        // The second operand is the low byte (as in `encode_e4m3`).
        let _ = writeln!(
            s,
            "    {out}_p{pair} = nvvm.convert.f32x2.to.f8x2 {out}_v{hi}, {out}_v{lo} {{rnd = #nvvm.fp_rnd_mode<rn>, sat = \
             #nvvm.sat_mode<satfinite>}} : i16 (f8E4M3FN)\n    {out}_w{pair} = arith.extui {out}_p{pair} : i16 to i32"
        );
    }
    let _ = write!(
        s,
        "    {out}_c16 = arith.constant 16 : i32
    {out}_hi = arith.shli {out}_w23, {out}_c16 : i32
    {out}_word = arith.ori {out}_w01, {out}_hi : i32
    {out} = llvm.bitcast {out}_word : i32 to vector<4xi8>
"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::v3_to_cpu::lower_to_llvm;
    use melior::ExecutionEngine;
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16, f8e4m3_to_f32};
    use v3c_models::interp::kernels;
    use v3c_runtime::host::{call_packed, RawBuffer};

    /// Runs the CPU lowering of `kernel` on `buffers` (its arguments in order).
    pub(super) fn run_cpu(kernel: &RowKernel, buffers: &[RawBuffer]) {
        let context = crate::mlir::new_context();
        let text = kernel.emit_cpu().unwrap();
        let module = lower_to_llvm(&context, &text, "rows").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let engine = ExecutionEngine::new(&module, 2, &[], false, false);
        // SAFETY: the buffers match the kernel's memref arguments (element type and rank) and
        // address their shapes' elements; they outlive the call.
        unsafe {
            call_packed(buffers, false, 0, 1, |args| engine.invoke_packed(&kernel.kernel_name(), args).unwrap());
        }
    }

    /// The same kernel's PTX for sm_90a run in the simulator over `buffers`, one block per row of
    /// `rows` as the runtime launches it: every global access inside a buffer, shared memory checked
    /// for races.
    /// Warp requests of the launch's accesses whose PTX starts with any of `ops`.
    pub(super) fn requests_of(stats: &v3c_ptxsim::Stats, ops: &[&str]) -> u64 {
        stats.accesses.values().filter(|a| ops.iter().any(|op| a.text.starts_with(op))).map(|a| a.requests).sum()
    }

    pub(super) fn run_simulated(kernel: &RowKernel, buffers: &[RawBuffer], rows: usize) -> v3c_ptxsim::Stats {
        let context = crate::mlir::new_context();
        let gpu = crate::conversion::sm90::compile_rows(&context, kernel, &crate::target::SM90A).unwrap();
        let module = v3c_ptxsim::Module::parse(&gpu.ptx).unwrap();
        let (mut params, mut regions) = (Vec::new(), Vec::new());
        for b in buffers {
            let element = v3c_runtime::abi::element_name(&b.element).unwrap();
            let buf = v3c_runtime::abi::Buf { addr: b.ptr as u64, shape: b.shape.clone(), element };
            for p in v3c_runtime::abi::memref(&buf, b.shape.len()).unwrap() {
                let v3c_runtime::abi::Param::Value(v) = p else { unreachable!("a memref is values") };
                params.push(v);
            }
            let element = v3c_runtime::plan::element_bytes(&b.element).unwrap() as usize;
            regions.push((buf.addr, b.shape.iter().product::<usize>() * element));
        }
        regions.sort_unstable();
        let launch = v3c_ptxsim::Launch {
            grid: [rows as u32, 1],
            threads: kernel.threads as u32,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[],
            regions: Some(&regions),
            max_instructions: 1 << 32,
            checks: v3c_ptxsim::Checks { reversed: false, races: true },
        };
        // SAFETY: the parameters are the buffers' (live, of their shapes); every access is checked
        // against them.
        unsafe { v3c_ptxsim::run(&module.kernels[0], &launch) }.unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kernel` over `buffers(out)` (its last the f32 output, `len` NaNs each time) through the CPU
    /// lowering, then as its sm_90a PTX simulated over `rows` blocks: the output, which both give bit
    /// for bit.
    pub(super) fn cpu_and_simulated(
        kernel: &RowKernel,
        rows: usize,
        len: usize,
        mut buffers: impl FnMut(&mut [f32]) -> Vec<RawBuffer>,
    ) -> Vec<f32> {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut cpu = vec![f32::NAN; len];
        run_cpu(kernel, &buffers(&mut cpu));
        let mut simulated = vec![f32::NAN; len];
        run_simulated(kernel, &buffers(&mut simulated), rows);
        assert_eq!(bits(&simulated), bits(&cpu), "{}: simulated vs the CPU lowering", kernel.kernel_name());
        cpu
    }

    pub(super) fn raw<T>(data: &mut [T], shape: &[usize], element: &str) -> RawBuffer {
        assert_eq!(data.len(), shape.iter().product::<usize>());
        RawBuffer { ptr: data.as_mut_ptr() as *mut (), shape: shape.to_vec(), element: element.into() }
    }

    pub(super) fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5) * scale
            })
            .collect()
    }

    /// RMSNorm (+ quantization) of `rows` rows of `d` columns through the CPU lowering of the row
    /// template and its sm_90a PTX in the simulator, against the reference interpreter's
    /// `rms_norm` and `quantize_fp8`.
    fn check_rms_norm(rows: usize, d: usize, weight: &str, keep: bool, quantize: bool, threads: Option<usize>) {
        let eps = 1e-6;
        let mut kernel = RowKernel::new(RowOp::RmsNorm { eps, keep, quantize }, d, weight);
        if let Some(t) = threads {
            kernel.threads = t;
        }
        let mut x = values(rows * d, 1, 6.0);
        // Rows of very different magnitudes, and one group that is all zeros (the 1e-4 floor).
        for (r, row) in x.chunks_mut(d).enumerate() {
            row.iter_mut().for_each(|v| *v *= 10f32.powi(r as i32 % 4 - 2));
        }
        if d > GROUP {
            x[GROUP..2 * GROUP.min(d / 2)].iter_mut().for_each(|v| *v = 0.0);
        }
        let w32: Vec<f32> = values(d, 2, 1.0).iter().map(|v| v + 1.0).collect();
        let w_bf16: Vec<u16> = w32.iter().map(|&v| f32_to_bf16(v)).collect();
        let w_ref: Vec<f32> =
            if weight == "bf16" { w_bf16.iter().map(|&b| bf16_to_f32(b)).collect() } else { w32.clone() };
        let w_f32 = w_ref.clone();
        let want = kernels::rms_norm(&x, &w_ref, eps);
        let (want_q, want_s) = kernels::quantize_fp8(&want, d, GROUP);
        let groups = d.div_ceil(GROUP);
        // Through the CPU lowering, then the PTX simulated with every buffer on 128 bytes (its
        // 16-byte chunks) and with every buffer an element off (the columns one at a time): each
        // against the reference.
        for (simulated, shift) in [(false, 0), (true, 0), (true, 1)] {
            let mut y = placed(&vec![f32::NAN; rows * d], shift);
            let mut q = placed(&vec![0u8; rows * d], shift);
            let mut s = placed(&vec![f32::NAN; rows * groups], shift);
            let mut xp = placed(&x, shift);
            let (mut w16, mut w32) = (placed(&w_bf16, shift), placed(&w_f32, shift));
            let mut buffers = vec![
                raw(xp.slice(), &[rows, d], "f32"),
                if weight == "bf16" { raw(w16.slice(), &[d], "bf16") } else { raw(w32.slice(), &[d], "f32") },
            ];
            if keep {
                buffers.push(raw(y.slice(), &[rows, d], "f32"));
            }
            if quantize {
                buffers.push(raw(q.slice(), &[rows, d], "i8"));
                buffers.push(raw(s.slice(), &[rows, groups], "f32"));
            }
            let name = kernel.kernel_name() + if simulated { " (PTX simulated)" } else { "" };
            let name = if shift == 0 { name } else { name + ", buffers an element off 16 bytes" };
            if simulated {
                let stats = run_simulated(&kernel, &buffers, rows);
                eprintln!(
                    "{name}: {} instructions, {} longest thread, {} load rounds, {:.0}% of global sectors' bytes used, {:.2} shared wavefronts a request ({:.2} the fewest)",
                    stats.instructions,
                    stats.longest_thread,
                    stats.load_rounds,
                    100.0 * stats.global_efficiency(),
                    stats.shared_wavefronts_per_request(),
                    stats.shared_conflict_factor()
                );
                if shift == 0 {
                    assert_eq!(stats.shared_conflict_factor(), 1.0, "{name}: shared bank conflicts");
                }
                // The row (and the weight) come 4 columns a load where the buffers allow it, and
                // only there.
                let v4: u64 = requests_of(&stats, &["ld.global.v4"]);
                assert_eq!(v4 > 0, shift == 0 && d.is_multiple_of(4), "{name}: {v4} warp requests of ld.global.v4");
            } else {
                run_cpu(&kernel, &buffers);
            }
            if keep {
                // The sum of squares is a tree over threads, the reference's is sequential.
                for (i, (a, b)) in y.slice().iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * b.abs() + 1e-30, "{name}: y[{i}] = {a}, reference {b}");
                }
            }
            if quantize {
                // The tree sum's rounding apart.
                assert_fp8_rows_near(&name, (q.slice(), s.slice()), (&want_q, &want_s));
            }
        }
    }

    /// A copy of some elements placed `shift` elements past a 128-byte boundary.
    pub(super) struct Placed<T> {
        data: Vec<T>,
        start: usize,
        len: usize,
    }

    impl<T> Placed<T> {
        pub(super) fn slice(&mut self) -> &mut [T] {
            &mut self.data[self.start..self.start + self.len]
        }
    }

    pub(super) fn placed<T: Copy + Default>(values: &[T], shift: usize) -> Placed<T> {
        let size = std::mem::size_of::<T>();
        let mut data = vec![T::default(); values.len() + 128 / size + shift];
        let lead = (128 - data.as_ptr() as usize % 128) % 128;
        assert_eq!(lead % size, 0, "elements on their own alignment");
        let start = lead / size + shift;
        data[start..start + values.len()].copy_from_slice(values);
        Placed { data, start, len: values.len() }
    }

    /// Quantized rows `(bytes, scales)` against the reference's: scales within 1e-5, and a value
    /// that a rounding apart before quantization sits at a tie of e4m3 may round the other way —
    /// one step of e4m3 at most, and in at most 1% of the bytes.
    fn assert_fp8_rows_near(name: &str, (q, s): (&[u8], &[f32]), (want_q, want_s): (&[u8], &[f32])) {
        for (i, (a, b)) in s.iter().zip(want_s).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{name}: scale[{i}] = {a}, reference {b}");
        }
        let mut differ = 0;
        for (i, (&a, &b)) in q.iter().zip(want_q).enumerate() {
            if a != b {
                differ += 1;
                let (fa, fb) = (f8e4m3_to_f32(a), f8e4m3_to_f32(b));
                assert!((fa - fb).abs() <= 0.125 * fb.abs().max(fa.abs()), "{name}: q[{i}] = {fa}, reference {fb}");
            }
        }
        assert!(differ * 100 <= q.len(), "{name}: {differ} of {} bytes differ", q.len());
    }

    #[test]
    fn rms_norm_with_quantization_matches_the_reference() {
        check_rms_norm(3, 7168, "bf16", false, true, None);
    }

    #[test]
    fn rms_norm_keeping_y_and_quantizing_matches_the_reference() {
        check_rms_norm(2, 1536, "bf16", true, true, None);
    }

    #[test]
    fn rms_norm_of_ragged_widths_and_block_sizes_matches_the_reference() {
        // Widths that are not multiples of the block or of 128 (a partial last group).
        for (d, threads) in [(512, Some(32)), (200, None), (1000, Some(64)), (77, Some(128))] {
            check_rms_norm(5, d, "f32", true, false, threads);
            check_rms_norm(2, d, "bf16", false, true, threads);
        }
    }

    /// Every block width the tuner may pick for DeepSeek-V3's norms (`crate::tune::rows`) computes
    /// the reference's rows.
    #[test]
    fn every_tuned_width_of_the_models_norms_matches_the_reference() {
        let h200 = crate::target::DeviceModel::by_name("H200").unwrap();
        for (d, keep) in [(7168, true), (1536, false)] {
            let kernel = RowKernel::new(RowOp::RmsNorm { eps: 1e-6, keep, quantize: true }, d, "bf16");
            let shape = crate::tune::rows::RowShape::of(&kernel, 64).unwrap();
            let widths: Vec<usize> =
                crate::tune::rows::candidates(&shape, &h200.target).iter().map(|k| k.threads).collect();
            assert_eq!(widths, [32, 64, 128, 256, 512, 1024]);
            for t in widths {
                check_rms_norm(2, d, "bf16", keep, true, Some(t));
            }
        }
    }

    #[test]
    fn embedding_rows_are_gathered_and_ids_outside_the_table_read_zeros() {
        let (vocab, d) = (11, 300);
        let table32 = values(vocab * d, 3, 2.0);
        let mut table: Vec<u16> = table32.iter().map(|&v| f32_to_bf16(v)).collect();
        let mut ids: Vec<i64> = vec![3, 0, 10, 3, -1, 11];
        let mut out = vec![f32::NAN; ids.len() * d];
        let kernel = RowKernel::new(RowOp::Embed, d, "bf16");
        let n = ids.len();
        run_cpu(
            &kernel,
            &[raw(&mut table, &[vocab, d], "bf16"), raw(&mut ids, &[n], "i64"), raw(&mut out, &[n, d], "f32")],
        );
        for (r, &id) in ids.iter().enumerate() {
            for c in 0..d {
                let want = if (0..vocab as i64).contains(&id) { bf16_to_f32(table[id as usize * d + c]) } else { 0.0 };
                assert_eq!(out[r * d + c], want, "row {r} (id {id}) column {c}");
            }
        }
    }

    /// DeepSeek-V3.2's indexer queries ([`RowOp::HeadsRope`]): every head's first `rope` columns
    /// rotated (halves, and neighbours) bit for bit as the reference rotates them, the rest copied,
    /// through the CPU lowering and the simulated PTX; a position outside the table writes nothing.
    #[test]
    fn heads_with_their_first_columns_rotated_match_the_reference() {
        for (heads, dim, r, interleave) in [(64, 128, 64, false), (3, 12, 8, false), (2, 10, 4, true)] {
            let inv: Vec<f32> = (0..r / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / r as f32)).collect();
            let npos = 9;
            let mut table = vec![0.0f32; npos * r];
            for p in 0..npos {
                let (cos, sin) = v3c_models::rope::cos_sin(&inv, 1.3, p as i64);
                table[p * r..p * r + r / 2].copy_from_slice(&cos);
                table[p * r + r / 2..(p + 1) * r].copy_from_slice(&sin);
            }
            let (t, d) = (3, heads * dim);
            let mut y = values(t * d, 11, 3.0);
            let mut positions: Vec<i64> = vec![4, npos as i64, 0];
            let kernel = RowKernel::new(RowOp::HeadsRope { heads, rope: r, interleave }, d, "f32");
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()), "{}", kernel.kernel_name());
            let mut rope = table.clone();
            let out = cpu_and_simulated(&kernel, t, t * d, |out| {
                vec![
                    raw(&mut y, &[t, d], "f32"),
                    raw(&mut positions, &[t], "i64"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(out, &[t, heads, dim], "f32"),
                ]
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for row in 0..t {
                let got = &out[row * d..(row + 1) * d];
                if positions[row] >= npos as i64 {
                    assert!(got.iter().all(|v| v.is_nan()), "row {row} written");
                    continue;
                }
                let (cos, sin) = v3c_models::rope::cos_sin(&inv, 1.3, positions[row]);
                let mut want = y[row * d..(row + 1) * d].to_vec();
                for h in 0..heads {
                    kernels::rotate(&mut want[h * dim..h * dim + r], &cos, &sin, interleave);
                }
                assert_eq!(bits(got), bits(&want), "row {row} ({heads} x {dim}, rope {r}, interleave {interleave})");
            }
        }
    }

    /// DeepSeek-V3.2's cache rows ([`RowOp::LatentKey`]) through the CPU lowering against the
    /// reference: the latent's norm (a tree sum: within 1e-5), its rope and the indexer key's
    /// LayerNorm and rope in halves bit for bit; and the sm_90a PTX simulated, the CPU lowering's bits.
    /// A position outside the table leaves the row's rotated columns unwritten. The full model's
    /// widths (512, 64, 128: the vector path) and ragged ones (the scalar path, a plain key tail).
    #[test]
    fn latent_rows_with_the_indexer_key_match_the_reference() {
        let eps = 1e-6;
        let key_eps = 1e-5;
        for (d, r, kd, interleave) in [(512, 64, 128, true), (200, 16, 40, false)] {
            let c = d + r + kd;
            let inv: Vec<f32> = (0..r / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / r as f32)).collect();
            let npos = 12;
            let mut table = vec![0.0f32; npos * r];
            for p in 0..npos {
                let (cos, sin) = v3c_models::rope::cos_sin(&inv, 0.7, p as i64);
                table[p * r..p * r + r / 2].copy_from_slice(&cos);
                table[p * r + r / 2..(p + 1) * r].copy_from_slice(&sin);
            }
            let bf16s = |v: Vec<f32>| -> (Vec<u16>, Vec<f32>) {
                let b: Vec<u16> = v.iter().map(|&x| f32_to_bf16(x)).collect();
                let f = b.iter().map(|&x| bf16_to_f32(x)).collect();
                (b, f)
            };
            let (mut w, w_ref) = bf16s(values(d, 4, 0.5).iter().map(|v| v + 1.0).collect());
            let (mut kw, kw_ref) = bf16s(values(kd, 8, 0.5).iter().map(|v| v + 1.0).collect());
            let (mut kb, kb_ref) = bf16s(values(kd, 9, 0.2));
            let t = 4;
            let mut latent = values(t * d, 5, 4.0);
            let mut k_pe = values(t * r, 6, 2.0);
            // Keys off zero mean, so that the mean matters.
            let mut key: Vec<f32> = values(t * kd, 7, 3.0).iter().map(|v| v + 0.4).collect();
            let mut positions: Vec<i64> = vec![5, 0, npos as i64, 11];
            let kernel = RowKernel::new(RowOp::LatentKey { eps, rope: r, interleave, key: kd, key_eps }, d, "bf16");
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()), "{}", kernel.kernel_name());
            let mut rope = table.clone();
            let out = cpu_and_simulated(&kernel, t, t * c, |out| {
                vec![
                    raw(&mut latent, &[t, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[t, r], "f32"),
                    raw(&mut positions, &[t], "i64"),
                    raw(&mut key, &[t, kd], "f32"),
                    raw(&mut kw, &[kd], "bf16"),
                    raw(&mut kb, &[kd], "bf16"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(out, &[t, c], "f32"),
                ]
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for row in 0..t {
                let normed = kernels::rms_norm(&latent[row * d..(row + 1) * d], &w_ref, eps);
                let mut k = kernels::layer_norm(&key[row * kd..(row + 1) * kd], &kw_ref, &kb_ref, key_eps);
                let mut pe = k_pe[row * r..(row + 1) * r].to_vec();
                let got = &out[row * c..(row + 1) * c];
                for (i, (a, b)) in got[..d].iter().zip(&normed).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * b.abs(), "row {row} latent column {i}: {a} vs {b}");
                }
                if positions[row] >= npos as i64 {
                    assert!(got[d..d + r].iter().all(|v| v.is_nan()), "row {row}: rope columns written");
                    assert!(got[d + r..d + r + r].iter().all(|v| v.is_nan()), "row {row}: key rope written");
                    assert_eq!(bits(&got[d + r + r..]), bits(&k[r..]), "row {row}: the key's plain columns");
                    continue;
                }
                let (cos, sin) = v3c_models::rope::cos_sin(&inv, 0.7, positions[row]);
                kernels::rotate(&mut pe, &cos, &sin, interleave);
                kernels::rotate(&mut k[..r], &cos, &sin, false);
                assert_eq!(bits(&got[d..d + r]), bits(&pe), "row {row}: k_pe");
                assert_eq!(bits(&got[d + r..]), bits(&k), "row {row}: the indexer key");
            }
        }
    }

    /// MLA's latent-cache rows through the CPU lowering against the reference: the norm (tree sum),
    /// the rope (bit for bit: the same table, the same products), the in-place decode write at each
    /// sequence's position (a position outside the cache leaves the row alone) and the prefill append
    /// after the cached rows; interleaved and half-split rope layouts.
    #[test]
    fn latent_cache_rows_match_the_reference() {
        let (d, r, eps) = (512, 64, 1e-6);
        let c = d + r;
        let inv: Vec<f32> = (0..r / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / r as f32)).collect();
        let npos = 40;
        let mut table = vec![0.0f32; npos * r];
        for p in 0..npos {
            let (cos, sin) = v3c_models::rope::cos_sin(&inv, 0.7, p as i64);
            table[p * r..p * r + r / 2].copy_from_slice(&cos);
            table[p * r + r / 2..(p + 1) * r].copy_from_slice(&sin);
        }
        let reference_row = |latent: &[f32], w: &[f32], k_pe: &[f32], p: i64, interleave: bool| -> Vec<f32> {
            let mut row = kernels::rms_norm(latent, w, eps);
            let (cos, sin) = v3c_models::rope::cos_sin(&inv, 0.7, p);
            let mut k = k_pe.to_vec();
            kernels::rotate(&mut k, &cos, &sin, interleave);
            row.extend(k);
            row
        };
        let w32: Vec<f32> = values(d, 4, 0.5).iter().map(|v| v + 1.0).collect();
        let mut w: Vec<u16> = w32.iter().map(|&v| f32_to_bf16(v)).collect();
        let w_ref: Vec<f32> = w.iter().map(|&b| bf16_to_f32(b)).collect();
        for interleave in [true, false] {
            // Decode: 3 sequences over 8-slot caches; the third position is outside the cache.
            let (b, slots) = (3, 8);
            let mut latent = values(b * d, 5, 4.0);
            let mut k_pe = values(b * r, 6, 2.0);
            let mut positions: Vec<i64> = vec![5, 0, 8];
            let mut cache = values(b * slots * c, 7, 1.0);
            let before = cache.clone();
            let mut rope = table.clone();
            let kernel = RowKernel::new(
                RowOp::Latent { eps, rope: r, interleave, append: false, cache: CacheRows::F32 },
                d,
                "bf16",
            );
            run_cpu(
                &kernel,
                &[
                    raw(&mut latent, &[b, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[b, r], "f32"),
                    raw(&mut positions, &[b], "i64"),
                    raw(&mut cache, &[b, slots, c], "f32"),
                    raw(&mut rope, &[npos, r], "f32"),
                ],
            );
            let mut want = before.clone();
            for seq in 0..2 {
                let row = reference_row(
                    &latent[seq * d..(seq + 1) * d],
                    &w_ref,
                    &k_pe[seq * r..(seq + 1) * r],
                    positions[seq],
                    interleave,
                );
                let at = (seq * slots + positions[seq] as usize) * c;
                want[at..at + c].copy_from_slice(&row);
            }
            for (i, (got, want)) in cache.iter().zip(&want).enumerate() {
                let col = i % c;
                let tol = if col < d { 1e-5 * want.abs() } else { 0.0 };
                assert!(
                    (got - want).abs() <= tol,
                    "decode (interleave {interleave}): element {i} = {got}, reference {want}"
                );
            }
            // bf16 and fp8 caches are a pool of 64-row pages the block table addresses: sequence 0's
            // position 5 on page 2, sequence 1's position 0 on page 1; sequence 2's first page is a
            // hole (-1: bf16) or past the pool (9: fp8) — no row written.
            let pages = 4;
            let pool_row = |seq: usize| [2 * 64 + 5, 64][seq];
            let written: Vec<Vec<f32>> =
                (0..2).map(|seq| cache[(seq * slots + positions[seq] as usize) * c..][..c].to_vec()).collect();
            let f32_row = |seq: usize| written[seq].as_slice();
            let mut block_table = vec![2i32, 0, 1, 3, -1, 0];
            // A bf16 cache: the same rows rounded to nearest even, the others left alone.
            let old: Vec<u16> = values(pages * 64 * c, 17, 1.0).iter().map(|&x| f32_to_bf16(x)).collect();
            let mut cache16 = old.clone();
            let op = RowOp::Latent { eps, rope: r, interleave, append: false, cache: CacheRows::Bf16 };
            let kernel16 = RowKernel::new(op, d, "bf16");
            assert_eq!(RowKernel::from_name(&kernel16.kernel_name()).as_ref(), Some(&kernel16));
            run_cpu(
                &kernel16,
                &[
                    raw(&mut latent, &[b, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[b, r], "f32"),
                    raw(&mut positions, &[b], "i64"),
                    raw(&mut cache16, &[pages, 64, c], "bf16"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(&mut block_table, &[b, 2], "i32"),
                ],
            );
            let mut want16 = old.clone();
            for seq in 0..2 {
                for (k, &x) in f32_row(seq).iter().enumerate() {
                    want16[pool_row(seq) * c + k] = f32_to_bf16(x);
                }
            }
            for (i, (got, want)) in cache16.iter().zip(&want16).enumerate() {
                assert_eq!(got, want, "bf16 pool (interleave {interleave}): element {i}");
            }
            // An fp8 cache: the written rows are the f32 kernel's rows packed as the host packs
            // them (the same scales, bytes and bf16 rope key); the others and the row whose position
            // is outside the cache are left alone.
            let row = v3c_runtime::plan::Fp8LatentRow::of(c).unwrap();
            let mut cache8 = vec![0xa5u8; pages * 64 * row.bytes()];
            block_table[4] = 9;
            let op = RowOp::Latent { eps, rope: r, interleave, append: false, cache: CacheRows::Fp8 };
            let kernel8 = RowKernel::new(op, d, "bf16");
            assert_eq!(RowKernel::from_name(&kernel8.kernel_name()).as_ref(), Some(&kernel8));
            assert!(kernel8.kernel_name().ends_with("_writefp8"));
            run_cpu(
                &kernel8,
                &[
                    raw(&mut latent, &[b, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[b, r], "f32"),
                    raw(&mut positions, &[b], "i64"),
                    raw(&mut cache8, &[pages, 64, row.bytes()], "i8"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(&mut block_table, &[b, 2], "i32"),
                ],
            );
            let mut want8 = vec![0xa5u8; cache8.len()];
            for seq in 0..2 {
                row.pack(f32_row(seq), &mut want8[pool_row(seq) * row.bytes()..][..row.bytes()]);
            }
            for (i, (got, want)) in cache8.iter().zip(&want8).enumerate() {
                assert_eq!(
                    got,
                    want,
                    "fp8 cache (interleave {interleave}): byte {} of row {}",
                    i % row.bytes(),
                    i / row.bytes()
                );
            }
            // Prefill: 4 new rows after 3 cached ones.
            let (cached, t) = (3, 4);
            let mut latent = values(t * d, 8, 4.0);
            let mut k_pe = values(t * r, 9, 2.0);
            let mut positions: Vec<i64> = vec![3, 4, 5, 39];
            let mut old = values(cached * c, 10, 1.0);
            let mut out = vec![f32::NAN; (cached + t) * c];
            let mut rope = table.clone();
            let kernel = RowKernel::new(
                RowOp::Latent { eps, rope: r, interleave, append: true, cache: CacheRows::F32 },
                d,
                "bf16",
            );
            run_cpu(
                &kernel,
                &[
                    raw(&mut latent, &[t, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[t, r], "f32"),
                    raw(&mut positions, &[t], "i64"),
                    raw(&mut old, &[cached, c], "f32"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(&mut out, &[cached + t, c], "f32"),
                ],
            );
            let mut want = old.clone();
            for row in 0..t {
                want.extend(reference_row(
                    &latent[row * d..(row + 1) * d],
                    &w_ref,
                    &k_pe[row * r..(row + 1) * r],
                    positions[row],
                    interleave,
                ));
            }
            for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                let tol = if i >= cached * c && i % c < d { 1e-5 * want.abs() } else { 0.0 };
                assert!(
                    (got - want).abs() <= tol,
                    "prefill (interleave {interleave}): element {i} = {got}, reference {want}"
                );
            }
            // bf16 caches: the old rows as they are, the new ones rounded to nearest even.
            let mut old16: Vec<u16> = old.iter().map(|&x| f32_to_bf16(x)).collect();
            let mut out16 = vec![0xAAAAu16; (cached + t) * c];
            let op = RowOp::Latent { eps, rope: r, interleave, append: true, cache: CacheRows::Bf16 };
            let kernel16 = RowKernel::new(op, d, "bf16");
            assert_eq!(RowKernel::from_name(&kernel16.kernel_name()).as_ref(), Some(&kernel16));
            run_cpu(
                &kernel16,
                &[
                    raw(&mut latent, &[t, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[t, r], "f32"),
                    raw(&mut positions, &[t], "i64"),
                    raw(&mut old16, &[cached, c], "bf16"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(&mut out16, &[cached + t, c], "bf16"),
                ],
            );
            let want16: Vec<u16> =
                old16.iter().copied().chain(out[cached * c..].iter().map(|&x| f32_to_bf16(x))).collect();
            assert_eq!(out16, want16, "prefill into bf16 caches (interleave {interleave})");
            // fp8 rows: the old rows' bytes as they are, the new ones packed as the host packs the
            // f32 kernel's.
            let mut old8 = vec![0u8; cached * row.bytes()];
            for (r32, r8) in old.chunks_exact(c).zip(old8.chunks_exact_mut(row.bytes())) {
                row.pack(r32, r8);
            }
            let mut out8 = vec![0xa5u8; (cached + t) * row.bytes()];
            let op = RowOp::Latent { eps, rope: r, interleave, append: true, cache: CacheRows::Fp8 };
            let kernel8 = RowKernel::new(op, d, "bf16");
            assert_eq!(RowKernel::from_name(&kernel8.kernel_name()).as_ref(), Some(&kernel8));
            assert!(kernel8.kernel_name().ends_with("_appendfp8"));
            run_cpu(
                &kernel8,
                &[
                    raw(&mut latent, &[t, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut k_pe, &[t, r], "f32"),
                    raw(&mut positions, &[t], "i64"),
                    raw(&mut old8, &[cached, row.bytes()], "i8"),
                    raw(&mut rope, &[npos, r], "f32"),
                    raw(&mut out8, &[cached + t, row.bytes()], "i8"),
                ],
            );
            let mut want8 = old8.clone();
            want8.resize(out8.len(), 0);
            for (r32, r8) in
                out[cached * c..].chunks_exact(c).zip(want8[cached * row.bytes()..].chunks_exact_mut(row.bytes()))
            {
                row.pack(r32, r8);
            }
            assert_eq!(out8, want8, "prefill into fp8 rows (interleave {interleave})");
        }
    }

    /// The fp8 MoE's rows in expert order: each sorted row its token's e4m3 bytes and scales as
    /// they are, through the CPU lowering and the PTX simulated (every access inside the buffers,
    /// each vector access aligned), tokens repeated (a token in several experts) and out of order
    /// as a dispatch sorts them; rows of whole 128-column groups and of a ragged last group; the
    /// tokens' rows starting on 16 bytes (the GPU copies 16 bytes a thread a step) and one byte
    /// past (a byte a step).
    #[test]
    fn fp8_rows_gather_into_expert_order() {
        let (tokens, width) = (5, 3);
        let mut sorted: Vec<i32> = vec![4, 0, 2, 1, 1, 3, 0, 4, 2, 3, 3, 0, 2, 4, 1];
        assert_eq!(sorted.len(), tokens * width);
        for (d, shift) in [(256usize, 0usize), (256, 1), (200, 0)] {
            let g = d.div_ceil(128);
            let kernel = RowKernel::new(RowOp::GatherFp8, d, "f32");
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()).as_ref(), Some(&kernel));
            // 16 bytes more than the rows, so that they can start on 16 bytes, or one past.
            let mut backing: Vec<u8> = vec![0; tokens * d + 16];
            let skip = (16 - backing.as_ptr() as usize % 16) % 16 + shift;
            let x = &mut backing[skip..][..tokens * d];
            for (i, b) in x.iter_mut().enumerate() {
                *b = (i * 7 + i / d) as u8;
            }
            let mut x_scale: Vec<f32> = (0..tokens * g).map(|i| 0.5 + i as f32).collect();
            for simulated in [false, true] {
                let rows = tokens * width;
                let (mut q, mut scale) = (vec![0x7fu8; rows * d], vec![f32::NAN; rows * g]);
                let buffers = [
                    raw(x, &[tokens, d], "i8"),
                    raw(&mut x_scale, &[tokens, g], "f32"),
                    raw(&mut sorted, &[tokens, width], "i32"),
                    raw(&mut q, &[rows, d], "i8"),
                    raw(&mut scale, &[rows, g], "f32"),
                ];
                if simulated {
                    let stats = run_simulated(&kernel, &buffers, rows);
                    // A row of 256 bytes: 16 chunks of 16 for its first 16 threads, against a byte
                    // for each of 256 threads.
                    let vector = d % 16 == 0 && shift == 0 && q.as_ptr() as usize % 16 == 0;
                    let bytes = stats.accesses.values().filter(|a| !a.shared && a.text.contains(".b8")).count();
                    assert_eq!(bytes == 0, vector, "d {d}, shift {shift}: {:?}", stats.accesses);
                } else {
                    run_cpu(&kernel, &buffers);
                }
                for (r, &t) in sorted.iter().enumerate() {
                    let t = t as usize;
                    let at = format!("d {d}, shift {shift}, row {r} (token {t}), simulated {simulated}");
                    assert_eq!(&q[r * d..][..d], &x[t * d..][..d], "{at}");
                    assert_eq!(&scale[r * g..][..g], &x_scale[t * g..][..g], "{at}: scales");
                }
            }
        }
    }

    /// Prefill over fp8 cache rows: the e4m3 latent and scales copied out as the 1x128 GEMM
    /// operand bit for bit, and the keys' rope part the rows' bf16 — the same keys and values as
    /// over a bf16 cache of the rows' values.
    #[test]
    fn fp8_cache_rows_feed_prefill_as_their_values_would() {
        let (heads, nope, rope, v, d, s_len) = (2, 8, 64, 6, 256, 5);
        let (c, per) = (d + rope, nope + v);
        let row = v3c_runtime::plan::Fp8LatentRow::of(c).unwrap();
        let values32 = values(s_len * c, 80, 5.0);
        let mut packed = vec![0u8; s_len * row.bytes()];
        for (r32, r8) in values32.chunks_exact(c).zip(packed.chunks_exact_mut(row.bytes())) {
            row.pack(r32, r8);
        }
        let (mut q, mut scale) = (vec![0x7fu8; s_len * d], vec![f32::NAN; s_len * d / 128]);
        let unpack = RowKernel::new(RowOp::Fp8Latent, d, "f32");
        assert_eq!(RowKernel::from_name(&unpack.kernel_name()).as_ref(), Some(&unpack));
        run_cpu(
            &unpack,
            &[
                raw(&mut packed, &[s_len, row.bytes()], "i8"),
                raw(&mut q, &[s_len, d], "i8"),
                raw(&mut scale, &[s_len, d / 128], "f32"),
            ],
        );
        for s in 0..s_len {
            let bytes = &packed[s * row.bytes()..][..row.bytes()];
            assert_eq!(&q[s * d..][..d], &bytes[..d], "row {s}: e4m3 latent");
            for g in 0..d / 128 {
                let at = row.scale_offset() + 4 * g;
                let want = f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                assert_eq!(scale[s * d / 128 + g], want, "row {s}: scale {g}");
            }
        }
        // The keys and values over the fp8 rows and over a bf16 cache of their values.
        let mut kv = values(s_len * heads * per, 81, 9.0);
        let mut decoded = vec![0f32; s_len * c];
        for (r8, r32) in packed.chunks_exact(row.bytes()).zip(decoded.chunks_exact_mut(c)) {
            row.unpack(r8, r32);
        }
        let mut cache16: Vec<u16> = decoded.iter().map(|&x| f32_to_bf16(x)).collect();
        let mut outs = Vec::new();
        for cache in [CacheRows::Bf16, CacheRows::Fp8] {
            let (mut k, mut vv) = (vec![0xAAAAu16; heads * s_len * (nope + rope)], vec![0xAAAAu16; heads * s_len * v]);
            let keys = RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache }, d, "f32");
            assert_eq!(RowKernel::from_name(&keys.kernel_name()).as_ref(), Some(&keys));
            let cache_buf = match cache {
                CacheRows::Fp8 => raw(&mut packed, &[s_len, row.bytes()], "i8"),
                _ => raw(&mut cache16, &[s_len, c], "bf16"),
            };
            run_cpu(
                &keys,
                &[
                    raw(&mut kv, &[s_len, heads * per], "f32"),
                    cache_buf,
                    raw(&mut k, &[heads * s_len, nope + rope], "bf16"),
                    raw(&mut vv, &[heads * s_len, v], "bf16"),
                ],
            );
            outs.push((k, vv));
        }
        assert!(RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache: CacheRows::Fp8 }, d, "f32")
            .kernel_name()
            .ends_with("_c8"));
        assert_eq!(outs[0], outs[1], "keys and values over fp8 rows");
        assert!(RowKernel::new(RowOp::Fp8Latent, 100, "f32").emit_cpu().is_err(), "a latent of 100 columns");
    }

    /// The query heads out of q_b: nope columns copied, rope columns rotated bit for bit as the
    /// reference's `rope` op does (per head, at the row's position); both layouts; a position
    /// outside the table leaves the row unwritten.
    #[test]
    fn query_split_and_rope_match_the_reference() {
        // 6 rope columns: a column at a time on the GPU; 8: 16 bytes a load and a store; 40
        // heads: several chunks a thread; then DeepSeek-V3's query.
        for (heads, nope, r) in [(3, 8, 6), (3, 8, 8), (40, 8, 8), (128, 128, 64)] {
            check_split_rope(heads, nope, r);
        }
    }

    /// The query split + RoPE of `heads` heads (`nope` + `r` columns) through the CPU lowering
    /// (the reference's bits) and the simulated PTX (buffers on 128 bytes and an element off:
    /// the same bits either way, within a rounding of the reference's).
    fn check_split_rope(heads: usize, nope: usize, r: usize) {
        let w = nope + r;
        let inv: Vec<f32> = (0..r / 2).map(|i| 1.0 / 500f32.powf(2.0 * i as f32 / r as f32)).collect();
        let npos = 16;
        let mut table = vec![0.0f32; npos * r];
        for p in 0..npos {
            let (cos, sin) = v3c_models::rope::cos_sin(&inv, 1.3, p as i64);
            table[p * r..p * r + r / 2].copy_from_slice(&cos);
            table[p * r + r / 2..(p + 1) * r].copy_from_slice(&sin);
        }
        for interleave in [true, false] {
            let rows = 4;
            let y = values(rows * heads * w, 12, 3.0);
            let positions: Vec<i64> = vec![0, 7, 15, 16];
            let kernel = RowKernel::new(RowOp::SplitRope { heads, nope, rope: r, interleave }, heads * w, "f32");
            let mut simulated_bits: Option<Vec<u32>> = None;
            for (simulated, shift) in [(false, 0), (true, 0), (true, 1)] {
                let (mut yp, mut pos, mut rope) = (placed(&y, shift), placed(&positions, 0), placed(&table, shift));
                let mut q_nope = placed(&vec![f32::NAN; rows * heads * nope], shift);
                let mut q_pe = placed(&vec![f32::NAN; rows * heads * r], shift);
                let buffers = [
                    raw(yp.slice(), &[rows, heads * w], "f32"),
                    raw(pos.slice(), &[rows], "i64"),
                    raw(rope.slice(), &[npos, r], "f32"),
                    raw(q_nope.slice(), &[rows, heads, nope], "f32"),
                    raw(q_pe.slice(), &[rows, heads, r], "f32"),
                ];
                let name = format!("{} (simulated {simulated}, shift {shift})", kernel.kernel_name());
                if simulated {
                    let stats = run_simulated(&kernel, &buffers, rows);
                    eprintln!(
                        "{name}: {} instructions, {} longest thread, {} load rounds, {} global requests, {:.0}% of \
                         their sectors' bytes used",
                        stats.instructions,
                        stats.longest_thread,
                        stats.load_rounds,
                        stats.global_requests,
                        100.0 * stats.global_efficiency()
                    );
                    let v4: u64 = requests_of(&stats, &["ld.global.v4", "st.global.v4"]);
                    let wide = nope.is_multiple_of(4) && r.is_multiple_of(if interleave { 4 } else { 8 });
                    assert_eq!(v4 > 0, wide && shift == 0, "{name}: {v4} warp requests of 16 bytes");
                } else {
                    run_cpu(&kernel, &buffers);
                }
                let (q_nope, q_pe) = (q_nope.slice(), q_pe.slice());
                for row in 0..rows {
                    for h in 0..heads {
                        let src = &y[(row * heads + h) * w..(row * heads + h + 1) * w];
                        let got_nope = &q_nope[(row * heads + h) * nope..(row * heads + h + 1) * nope];
                        let got_pe = &q_pe[(row * heads + h) * r..(row * heads + h + 1) * r];
                        if positions[row] as usize >= npos {
                            assert!(got_nope.iter().chain(got_pe).all(|v| v.is_nan()), "{name}: row {row}: written");
                            continue;
                        }
                        assert_eq!(got_nope, &src[..nope], "{name}: row {row} head {h}: nope");
                        let (cos, sin) = v3c_models::rope::cos_sin(&inv, 1.3, positions[row]);
                        let mut want = src[nope..].to_vec();
                        kernels::rotate(&mut want, &cos, &sin, interleave);
                        if simulated {
                            // ptxas may fuse a product into the sum: a rounding apart.
                            for (i, (a, b)) in got_pe.iter().zip(&want).enumerate() {
                                let tol = 1e-6 * (src[nope..].iter().map(|v| v.abs()).fold(0.0, f32::max));
                                assert!((a - b).abs() <= tol, "{name}: row {row} head {h} rope {i}: {a} vs {b}");
                            }
                        } else {
                            assert_eq!(got_pe, &want[..], "{name}: row {row} head {h}: rope");
                        }
                    }
                }
                if simulated {
                    let bits: Vec<u32> = q_nope.iter().chain(q_pe.iter()).map(|v| v.to_bits()).collect();
                    match &simulated_bits {
                        Some(before) => assert!(before == &bits, "{name}: not the aligned run's bits"),
                        None => simulated_bits = Some(bits),
                    }
                }
            }
        }
    }

    /// SwiGLU of a gate|up row, as f32 (the reference's silu(g) * u exactly: the same libm exp) and
    /// quantized 1x128 (the value recomputed in each phase must be the same), at the dense MLP's
    /// width (18432: no row buffer fits in shared memory) and a ragged one.
    #[test]
    fn swiglu_rows_match_the_reference() {
        for (d, rows) in [(18432, 2), (300, 5)] {
            let x = values(rows * 2 * d, 13, 8.0);
            let mut want = Vec::with_capacity(rows * d);
            for row in x.chunks(2 * d) {
                want.extend(row[..d].iter().zip(&row[d..]).map(|(g, u)| kernels::silu(*g) * u));
            }
            let (want_q, want_s) = kernels::quantize_fp8(&want, d, GROUP);
            let mut input = x.clone();
            let mut y = vec![f32::NAN; rows * d];
            run_cpu(
                &RowKernel::new(RowOp::SiluMul { quantize: false }, d, "f32"),
                &[raw(&mut input, &[rows, 2 * d], "f32"), raw(&mut y, &[rows, d], "f32")],
            );
            assert_eq!(y, want, "d {d}: swiglu");
            let groups = d.div_ceil(GROUP);
            let (mut q, mut scale) = (vec![0u8; rows * d], vec![f32::NAN; rows * groups]);
            let kernel = RowKernel::new(RowOp::SiluMul { quantize: true }, d, "f32");
            assert!(kernel.shared_memory_bytes() < 4096, "{}", kernel.shared_memory_bytes());
            run_cpu(
                &kernel,
                &[
                    raw(&mut input, &[rows, 2 * d], "f32"),
                    raw(&mut q, &[rows, d], "i8"),
                    raw(&mut scale, &[rows, groups], "f32"),
                ],
            );
            assert_eq!(scale, want_s, "d {d}: scales");
            assert_eq!(q, want_q, "d {d}: e4m3 bytes");
            // The PTX simulated (SiLU's exp by ex2 of x log2(e), a rounding apart), with the
            // buffers on 128 bytes (16-byte chunks where the row is whole ones) and an element off.
            for shift in [0, 1] {
                let mut xp = placed(&x, shift);
                let (mut q, mut scale) = (placed(&vec![0u8; rows * d], shift), placed(&vec![0f32; rows * groups], 0));
                let buffers = [
                    raw(xp.slice(), &[rows, 2 * d], "f32"),
                    raw(q.slice(), &[rows, d], "i8"),
                    raw(scale.slice(), &[rows, groups], "f32"),
                ];
                let stats = run_simulated(&kernel, &buffers, rows);
                let name = format!("{} (PTX simulated, buffers {shift} elements off 128 bytes)", kernel.kernel_name());
                eprintln!(
                    "{name}: {} instructions, {} longest thread, {} load rounds, {:.0}% of global sectors' bytes used",
                    stats.instructions,
                    stats.longest_thread,
                    stats.load_rounds,
                    100.0 * stats.global_efficiency()
                );
                let v4: u64 = requests_of(&stats, &["ld.global.v4"]);
                assert_eq!(v4 > 0, shift == 0 && d.is_multiple_of(4), "{name}: {v4} warp requests of ld.global.v4");
                assert_fp8_rows_near(&name, (q.slice(), scale.slice()), (&want_q, &want_s));
                // f32 rows: 4 columns of gate and up a load each and of y a store where aligned;
                // ex2's rounding apart from libm's exp.
                let f32_rows = RowKernel::new(RowOp::SiluMul { quantize: false }, d, "f32");
                let mut y = placed(&vec![f32::NAN; rows * d], shift);
                let stats = run_simulated(
                    &f32_rows,
                    &[raw(xp.slice(), &[rows, 2 * d], "f32"), raw(y.slice(), &[rows, d], "f32")],
                    rows,
                );
                let name =
                    format!("{} (PTX simulated, buffers {shift} elements off 128 bytes)", f32_rows.kernel_name());
                eprintln!("{name}: {} instructions, {} load rounds", stats.instructions, stats.load_rounds);
                let v4: u64 = requests_of(&stats, &["st.global.v4"]);
                assert_eq!(v4 > 0, shift == 0 && d.is_multiple_of(4), "{name}: {v4} warp requests of st.global.v4");
                for (i, (a, b)) in y.slice().iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * b.abs() + 1e-6, "{name}: y[{i}] = {a}, reference {b}");
                }
            }
        }
    }

    /// Routing through the CPU lowering against the reference's `route` (bit for bit: the same
    /// logits in split order, libm's exp, the same selection order), with and without
    /// normalization, on near ties (equal logits for some experts), then the counting sort against
    /// the CPU backend's layout (offsets, tokens in order per expert, the shared expert last). The
    /// PTX (simulated) writes the same logits' pieces and picks the same experts.
    #[test]
    fn routing_and_dispatch_match_the_reference() {
        // (43 tokens: the dispatch's 32 chunks of pairs hold several each; the routing's last block
        // of 8 tokens partial.)
        let rows = 43;
        // Decode's one token a block and prefill's several (the last block partial). Columns:
        // splits of 6 and 7 (the last ones shorter), of 132 (a chunk of 128 and one of 4; the last
        // split's 120). Experts: 16, 96 (a tile of 64 and a partial one), Kimi K2's 384 in one group.
        assert_eq!((route_tokens(16, 4, 4), route_tokens(256, 8, 8), route_tokens(384, 1, 8)), (8, 8, 8));
        // DeepSeek-V2's softmax routing (the last flag): V2-Lite's one group of 64 experts, groups of
        // four scored by their best, groups of one.
        let cases = [
            (96, true, 4, 4, 2, 16, false),
            (100, false, 3, 8, 3, 16, false),
            (100, true, 8, 1, 1, 384, false),
            (2100, true, 4, 4, 2, 16, false),
            (100, false, 6, 6, 3, 96, false),
            (100, false, 6, 1, 1, 64, true),
            (96, false, 4, 4, 2, 16, true),
            (100, false, 3, 16, 4, 16, true),
        ]
        .into_iter()
        .flat_map(|c| [(c, 1), (c, route_tokens(c.5, c.3, c.2))]);
        for ((d, norm, top_k, n_group, topk_group, experts, softmax), tokens) in cases {
            let scoring =
                if softmax { v3c_models::config::Scoring::Softmax } else { v3c_models::config::Scoring::Sigmoid };
            let r = v3c_models::graph::Routing {
                top_k,
                n_group,
                topk_group,
                norm_topk_prob: norm,
                routed_scaling_factor: 2.5,
                scoring,
            };
            let x = values(rows * d, 20, 2.0);
            let gate32 = values(experts * d, 21, 0.5);
            let mut gate: Vec<u16> = gate32.iter().map(|&v| f32_to_bf16(v)).collect();
            // Experts 3 and 5 share a gate row: their scores tie ...
            let (r3, r5) = (3 * d, 5 * d);
            let copy: Vec<u16> = gate[r3..r3 + d].to_vec();
            gate[r5..r5 + d].copy_from_slice(&copy);
            let g_ref: Vec<f32> = gate.iter().map(|&b| bf16_to_f32(b)).collect();
            let mut bias = values(experts, 22, 0.1);
            // ... and their biases, large enough that both are chosen: the order says who won the tie.
            (bias[3], bias[5]) = (1.0, 1.0);
            // Decode's logits take 4 tokens a block where its selection takes one.
            let logits_tokens = if tokens == 1 { ROUTE_DECODE_TOKENS } else { tokens };
            let logits_kernel = RowKernel::new(RowOp::RouteLogits { experts, tokens: logits_tokens }, d, "bf16");
            let op = RowOp::Route {
                experts,
                top_k,
                n_group,
                topk_group,
                norm,
                scale: 2.5,
                tokens,
                pieces: ROUTER_SPLITS,
                softmax,
            };
            let kernel = RowKernel::new(op, experts, "f32");
            // Prefill's selection over whole logits (its gate GEMM's).
            let whole = RowKernel::new(
                RowOp::Route { experts, top_k, n_group, topk_group, norm, scale: 2.5, tokens, pieces: 1, softmax },
                experts,
                "f32",
            );
            // Softmax routing has no bias argument.
            let bias_arg = |b: &mut Vec<f32>| (!softmax).then(|| raw(b, &[experts], "f32"));
            for k in [&logits_kernel, &kernel, &whole] {
                assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k.clone()));
                assert!(k.shared_memory_bytes() <= STATIC_SHARED_LIMIT, "{}", k.kernel_name());
            }
            // Every piece, the reference's split sums.
            let width = d.div_ceil(ROUTER_SPLITS);
            let mut want_parts = vec![0f32; rows * ROUTER_SPLITS * experts];
            for t in 0..rows {
                for s in 0..ROUTER_SPLITS {
                    for e in 0..experts {
                        let cols = (s * width).min(d)..((s + 1) * width).min(d);
                        want_parts[(t * ROUTER_SPLITS + s) * experts + e] =
                            cols.fold(0f32, |a, i| a + x[t * d + i] * g_ref[e * d + i]);
                    }
                }
            }
            let pieces = |lowering: &str, run: &dyn Fn(&RowKernel, &[RawBuffer], usize)| {
                let (mut x, mut gate, mut bias) = (x.clone(), gate.clone(), bias.clone());
                let mut parts = vec![f32::NAN; rows * ROUTER_SPLITS * experts];
                let (mut idx, mut w) = (vec![-1i32; rows * top_k], vec![f32::NAN; rows * top_k]);
                let parts_shape = [rows, ROUTER_SPLITS * experts];
                let blocks = rows.div_ceil(tokens);
                run(
                    &logits_kernel,
                    &[
                        raw(&mut x, &[rows, d], "f32"),
                        raw(&mut gate, &[experts, d], "bf16"),
                        raw(&mut parts, &parts_shape, "f32"),
                    ],
                    rows.div_ceil(logits_tokens) * logits_kernel.blocks_per_row(),
                );
                assert!(
                    parts.iter().zip(&want_parts).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{lowering} {}: the pieces",
                    logits_kernel.kernel_name()
                );
                let bufs: Vec<RawBuffer> = [Some(raw(&mut parts, &parts_shape, "f32")), bias_arg(&mut bias)]
                    .into_iter()
                    .flatten()
                    .chain([raw(&mut idx, &[rows, top_k], "i32"), raw(&mut w, &[rows, top_k], "f32")])
                    .collect();
                run(&kernel, &bufs, blocks);
                (idx, w)
            };
            let (mut idx, mut w) = pieces("CPU", &|k, b, _| run_cpu(k, b));
            let logits = kernels::router_logits(&x, &g_ref, rows, d, experts);
            for t in 0..rows {
                let bias: &[f32] = if softmax { &[] } else { &bias };
                let (want_idx, want_w) = kernels::route(&logits[t * experts..(t + 1) * experts], bias, &r);
                let got: Vec<usize> = idx[t * top_k..(t + 1) * top_k].iter().map(|&i| i as usize).collect();
                assert_eq!(got, want_idx, "token {t} (norm {norm}): experts");
                assert_eq!(&w[t * top_k..(t + 1) * top_k], &want_w[..], "token {t} (norm {norm}): weights");
            }
            // The PTX (logits' blocks spread over splits and expert tiles; a warp per token picks,
            // by shuffles): the same pieces, the same experts in the same order, the weights within
            // the GPU's exp.
            let (gpu_idx, gpu_w) = pieces("PTX", &|k, b, blocks| {
                run_simulated(k, b, blocks);
            });
            assert_eq!(gpu_idx, idx, "{}: experts", kernel.kernel_name());
            for (i, (g, c)) in gpu_w.iter().zip(&w).enumerate() {
                assert!((g - c).abs() <= 1e-5 * c.abs(), "{}: weight {i} {g}, CPU {c}", kernel.kernel_name());
            }
            // Over whole logits (the reference's here): the same experts and weights, CPU and PTX.
            for (lowering, simulated) in [("CPU", false), ("PTX", true)] {
                let (mut l, mut b) = (logits.clone(), bias.clone());
                let (mut wi, mut ww) = (vec![-1i32; rows * top_k], vec![f32::NAN; rows * top_k]);
                let bufs: Vec<RawBuffer> = [Some(raw(&mut l, &[rows, experts], "f32")), bias_arg(&mut b)]
                    .into_iter()
                    .flatten()
                    .chain([raw(&mut wi, &[rows, top_k], "i32"), raw(&mut ww, &[rows, top_k], "f32")])
                    .collect();
                if simulated {
                    run_simulated(&whole, &bufs, rows.div_ceil(tokens));
                } else {
                    run_cpu(&whole, &bufs);
                }
                assert_eq!(wi, idx, "{lowering} {}: experts", whole.kernel_name());
                for (i, (g, c)) in ww.iter().zip(&w).enumerate() {
                    assert!((g - c).abs() <= 1e-5 * c.abs(), "{lowering} {}: weight {i} {g}, {c}", whole.kernel_name());
                }
            }
            // The counting sort, with one shared expert.
            let shared = 1;
            let width = top_k + shared;
            let mut offsets = vec![-1i32; experts + shared + 1];
            let (mut tokens, mut rw) = (vec![-1i32; rows * width], vec![f32::NAN; rows * width]);
            let dispatch = RowKernel::new(RowOp::Dispatch { experts, shared }, experts + shared, "f32");
            run_cpu(
                &dispatch,
                &[
                    raw(&mut idx, &[rows, top_k], "i32"),
                    raw(&mut w, &[rows, top_k], "f32"),
                    raw(&mut offsets, &[experts + shared + 1], "i32"),
                    raw(&mut tokens, &[rows, width], "i32"),
                    raw(&mut rw, &[rows, width], "f32"),
                ],
            );
            let (mut want_tokens, mut want_w, mut want_off) = (Vec::new(), Vec::new(), vec![0i32]);
            for e in 0..experts + shared {
                for t in 0..rows {
                    if e >= experts {
                        want_tokens.push(t as i32);
                        want_w.push(1.0);
                    }
                    for k in 0..top_k {
                        if e < experts && idx[t * top_k + k] as usize == e {
                            want_tokens.push(t as i32);
                            want_w.push(w[t * top_k + k]);
                        }
                    }
                }
                want_off.push(want_tokens.len() as i32);
            }
            assert_eq!(offsets, want_off, "offsets");
            assert_eq!(tokens, want_tokens, "tokens of the sorted rows");
            assert_eq!(rw, want_w, "weights of the sorted rows");
        }
    }

    /// Greedy argmax per row through the CPU lowering equals the reference sampler's (temperature 0):
    /// ties to the lower index, NaN, -0 < +0 and all -inf rows ordered as `total_cmp` orders them;
    /// rows wider and narrower than the block, at the template's width and the tuner's (up to 1024).
    #[test]
    fn argmax_rows_equal_the_reference_sampler() {
        use v3c_models::reference::Sampler;
        for (d, threads) in [(1000, 32), (5, 32), (129_280 / 40, 256), (129_280 / 40, 1024), (3000, 512)] {
            let rows = 7;
            let mut x = values(rows * d, d as u64, 10.0);
            let at = |r: usize, c: usize| r * d + c.min(d - 1);
            // Row 1: the maximum twice; row 2: a NaN; row 3: -0 then +0 alone; row 4: all -inf;
            // row 5: the maximum in the last column; row 6: a negative NaN is the smallest.
            x[at(1, 3)] = 99.0;
            x[at(1, d / 2)] = 99.0;
            x[at(2, d / 3)] = f32::NAN;
            x[at(3, 0)..at(3, 0) + d].iter_mut().for_each(|v| *v = -1.0);
            x[at(3, 1)] = -0.0;
            x[at(3, 2)] = 0.0;
            x[at(4, 0)..at(4, 0) + d].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            x[at(5, d - 1)] = 1e30;
            x[at(6, 0)..at(6, 0) + d].iter_mut().for_each(|v| *v = -f32::NAN);
            x[at(6, d - 1)] = -1e30;
            let mut idx = vec![-1i32; rows];
            let mut kernel = RowKernel::new(RowOp::Argmax, d, "f32");
            kernel.threads = threads;
            run_cpu(&kernel, &[raw(&mut x, &[rows, d], "f32"), raw(&mut idx, &[rows], "i32")]);
            let mut sampler = Sampler::new(0.0, 1.0, 0);
            for r in 0..rows {
                let want = sampler.sample(&x[r * d..(r + 1) * d]) as i32;
                assert_eq!(idx[r], want, "d {d} threads {threads} row {r}");
            }
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel));
        }
    }

    /// The split-K combine: attention over keys cut into splits (empty ones included: lse -inf,
    /// zeros), each split's softmax-normalized output and log-sum-exp, merged by the CPU lowering
    /// and by the PTX simulated, equals attention over all keys; a row no split saw is zeros. The
    /// splits fill part of one group of 8, spill into a second, or fill two; blocks as wide as the
    /// row and narrower (several columns a thread).
    #[test]
    fn mla_combine_merges_split_attention() {
        let (rows, d, keys) = (3, 40, 37);
        let scores = values(rows * keys, 60, 8.0);
        let vals = values(keys * d, 61, 2.0);
        // Key cut points: consecutive ones bound a split ([10, 10): empty).
        let cuts: [&[usize]; 3] = [
            &[0, 10, 10, 30, 37],
            &[0, 3, 3, 7, 10, 10, 15, 20, 22, 30, 30, 37],
            &[0, 2, 5, 5, 8, 11, 14, 17, 20, 23, 26, 26, 29, 32, 34, 36, 37],
        ];
        for (cuts, threads) in cuts.into_iter().zip([64, 64, 32]) {
            let bounds: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
            let splits = bounds.len();
            let (mut o_part, mut lse) = (vec![0f32; splits * rows * d], vec![0f32; splits * rows]);
            // Row `rows - 1` is seen by no split.
            for (z, &(k0, k1)) in bounds.iter().enumerate() {
                for r in 0..rows {
                    let at = z * rows + r;
                    if k0 == k1 || r == rows - 1 {
                        lse[at] = f32::NEG_INFINITY;
                        continue;
                    }
                    let s = &scores[r * keys..(r + 1) * keys];
                    let m = s[k0..k1].iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let l: f64 = s[k0..k1].iter().map(|&v| (v as f64 - m).exp()).sum();
                    lse[at] = (m + l.ln()) as f32;
                    for c in 0..d {
                        let o: f64 = (k0..k1).map(|k| (s[k] as f64 - m).exp() * vals[k * d + c] as f64).sum();
                        o_part[at * d + c] = (o / l) as f32;
                    }
                }
            }
            let kernel = RowKernel { threads, ..RowKernel::new(RowOp::MlaCombine, d, "f32") };
            for simulated in [false, true] {
                let mut out = vec![f32::NAN; rows * d];
                let buffers = [
                    raw(&mut o_part, &[splits, rows, d], "f32"),
                    raw(&mut lse, &[splits, rows], "f32"),
                    raw(&mut out, &[rows, d], "f32"),
                ];
                let at = format!("{splits} splits, {threads} threads, simulated {simulated}");
                if simulated {
                    // Eight splits' loads in flight at a time: the maximum's groups, then each of
                    // a thread's columns' (40 columns over 64 threads: one; over 32: two).
                    let stats = run_simulated(&kernel, &buffers, rows);
                    let groups = splits.div_ceil(COMBINE_SPLITS) as u64;
                    let columns = d.div_ceil(threads) as u64;
                    assert_eq!(stats.load_rounds, groups * (1 + columns), "{at}: global-load waits");
                } else {
                    run_cpu(&kernel, &buffers);
                }
                for r in 0..rows - 1 {
                    let s = &scores[r * keys..(r + 1) * keys];
                    let m = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let l: f64 = s.iter().map(|&v| (v as f64 - m).exp()).sum();
                    for c in 0..d {
                        let want: f64 =
                            (0..keys).map(|k| (s[k] as f64 - m).exp() * vals[k * d + c] as f64).sum::<f64>() / l;
                        let got = out[r * d + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{at}: row {r} col {c}: {got} vs {want}"
                        );
                    }
                }
                assert!(out[(rows - 1) * d..].iter().all(|&v| v == 0.0), "{at}: the unseen row is zeros");
            }
        }
        let k = RowKernel::new(RowOp::MlaCombine, 512, "f32");
        assert_eq!(k.kernel_name(), "rows_mlacombine_d512_t512");
        assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k));
        assert_eq!(RowKernel::new(RowOp::MlaCombine, 40, "f32").threads, 64, "a thread per column");
    }

    /// MLA prefill's layout rows around the tensor-core kernel: keys and values (head-major, bf16
    /// of the up-projection's columns and the cache's shared rope key), queries (head-major), and
    /// the head-major output back to token rows with the reference's 1x128 quantization.
    #[test]
    fn mla_prefill_layout_rows_are_their_definitions() {
        let (heads, nope, rope, v, d, s_len, t_len) = (3, 8, 4, 6, 16, 5, 4);
        let per = nope + v;
        let (mut kv, mut cache) = (values(s_len * heads * per, 70, 9.0), values(s_len * (d + rope), 71, 9.0));
        let (mut k, mut vv) = (vec![0xAAAAu16; heads * s_len * (nope + rope)], vec![0xAAAAu16; heads * s_len * v]);
        let keys = RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache: CacheRows::F32 }, d, "f32");
        run_cpu(
            &keys,
            &[
                raw(&mut kv, &[s_len, heads * per], "f32"),
                raw(&mut cache, &[s_len, d + rope], "f32"),
                raw(&mut k, &[heads * s_len, nope + rope], "bf16"),
                raw(&mut vv, &[heads * s_len, v], "bf16"),
            ],
        );
        for h in 0..heads {
            for s in 0..s_len {
                let r = h * s_len + s;
                for c in 0..nope + rope {
                    let want =
                        if c < nope { kv[s * heads * per + h * per + c] } else { cache[s * (d + rope) + d + c - nope] };
                    assert_eq!(k[r * (nope + rope) + c], f32_to_bf16(want), "k[{h}, {s}, {c}]");
                }
                for c in 0..v {
                    assert_eq!(
                        vv[r * v + c],
                        f32_to_bf16(kv[s * heads * per + h * per + nope + c]),
                        "v[{h}, {s}, {c}]"
                    );
                }
            }
        }
        // The up-projection in bf16 (the fp8 graph's GEMM output): the same bits, copied.
        let mut kv16: Vec<u16> = kv.iter().map(|&x| f32_to_bf16(x)).collect();
        let (mut k16, mut v16) = (vec![0u16; k.len()], vec![0u16; vv.len()]);
        let keys16 = RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache: CacheRows::F32 }, d, "bf16");
        run_cpu(
            &keys16,
            &[
                raw(&mut kv16, &[s_len, heads * per], "bf16"),
                raw(&mut cache, &[s_len, d + rope], "f32"),
                raw(&mut k16, &[heads * s_len, nope + rope], "bf16"),
                raw(&mut v16, &[heads * s_len, v], "bf16"),
            ],
        );
        assert_eq!((&k16, &v16), (&k, &vv));
        assert_eq!(RowKernel::from_name(&keys16.kernel_name()), Some(keys16));
        // A bf16 cache: its rope key as it is, the same bits.
        let mut cache16: Vec<u16> = cache.iter().map(|&x| f32_to_bf16(x)).collect();
        let (mut k16, mut v16) = (vec![0u16; k.len()], vec![0u16; vv.len()]);
        let keys_c16 = RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache: CacheRows::Bf16 }, d, "bf16");
        run_cpu(
            &keys_c16,
            &[
                raw(&mut kv16, &[s_len, heads * per], "bf16"),
                raw(&mut cache16, &[s_len, d + rope], "bf16"),
                raw(&mut k16, &[heads * s_len, nope + rope], "bf16"),
                raw(&mut v16, &[heads * s_len, v], "bf16"),
            ],
        );
        assert_eq!((&k16, &v16), (&k, &vv));
        assert_eq!(RowKernel::from_name(&keys_c16.kernel_name()), Some(keys_c16));
        let (mut qn, mut qp) = (values(t_len * heads * nope, 72, 9.0), values(t_len * heads * rope, 73, 9.0));
        let mut q = vec![0xAAAAu16; heads * t_len * (nope + rope)];
        let queries = RowKernel::new(RowOp::MlaQueries { heads, nope, rope }, heads * (nope + rope), "f32");
        run_cpu(
            &queries,
            &[
                raw(&mut qn, &[t_len, heads, nope], "f32"),
                raw(&mut qp, &[t_len, heads, rope], "f32"),
                raw(&mut q, &[heads * t_len, nope + rope], "bf16"),
            ],
        );
        for h in 0..heads {
            for t in 0..t_len {
                for c in 0..nope + rope {
                    let want =
                        if c < nope { qn[(t * heads + h) * nope + c] } else { qp[(t * heads + h) * rope + c - nope] };
                    assert_eq!(q[(h * t_len + t) * (nope + rope) + c], f32_to_bf16(want), "q[{h}, {t}, {c}]");
                }
            }
        }
        // Two heads of 128 (a group each) and heads of 64 (two per group).
        for (heads, v) in [(2, 128), (3, 64)] {
            let d = heads * v;
            let mut o = values(heads * t_len * v, 74, 30.0);
            let mut tokens = vec![0f32; t_len * d];
            for t in 0..t_len {
                for c in 0..d {
                    tokens[t * d + c] = o[((c / v) * t_len + t) * v + c % v];
                }
            }
            let (want_q, want_s) = kernels::quantize_fp8(&tokens, d, GROUP);
            let (mut got_q, mut got_s) = (vec![0u8; t_len * d], vec![f32::NAN; t_len * d.div_ceil(GROUP)]);
            let out = RowKernel::new(RowOp::MlaHeadsOut { heads, quantize: true }, d, "f32");
            run_cpu(
                &out,
                &[
                    raw(&mut o, &[heads * t_len, v], "f32"),
                    raw(&mut got_q, &[t_len, d], "i8"),
                    raw(&mut got_s, &[t_len, d.div_ceil(GROUP)], "f32"),
                ],
            );
            assert_eq!(got_s, want_s, "{}", out.kernel_name());
            assert_eq!(got_q, want_q, "{}", out.kernel_name());
            // The PTX simulated, over buffers on 128 bytes (a head's 4 columns a load) and an
            // element off (a column at a time): the same bytes and scales.
            for shift in [0, 1] {
                let mut op = placed(&o, shift);
                let (mut q, mut s) = (placed(&vec![0u8; t_len * d], shift), placed(&vec![0f32; want_s.len()], 0));
                let buffers = [
                    raw(op.slice(), &[heads * t_len, v], "f32"),
                    raw(q.slice(), &[t_len, d], "i8"),
                    raw(s.slice(), &[t_len, d.div_ceil(GROUP)], "f32"),
                ];
                let stats = run_simulated(&out, &buffers, t_len);
                let name = format!("{} (PTX simulated, shift {shift})", out.kernel_name());
                let v4: u64 = requests_of(&stats, &["ld.global.v4"]);
                assert_eq!(v4 > 0, shift == 0, "{name}: {v4} warp requests of ld.global.v4");
                assert_eq!(s.slice(), &want_s[..], "{name}");
                assert_eq!(q.slice(), &want_q[..], "{name}");
            }
            assert_eq!(RowKernel::from_name(&out.kernel_name()), Some(out));
            // The f32 graph's: the same rows, unquantized.
            let mut y = vec![f32::NAN; t_len * d];
            let out = RowKernel::new(RowOp::MlaHeadsOut { heads, quantize: false }, d, "f32");
            run_cpu(&out, &[raw(&mut o, &[heads * t_len, v], "f32"), raw(&mut y, &[t_len, d], "f32")]);
            assert_eq!(y, tokens, "{}", out.kernel_name());
            // Simulated: a head's 4 columns a load and a store where the buffers allow it.
            for shift in [0, 1] {
                let (mut op, mut yp) = (placed(&o, shift), placed(&vec![f32::NAN; t_len * d], shift));
                let buffers = [raw(op.slice(), &[heads * t_len, v], "f32"), raw(yp.slice(), &[t_len, d], "f32")];
                let stats = run_simulated(&out, &buffers, t_len);
                let name = format!("{} (PTX simulated, shift {shift})", out.kernel_name());
                let v4: u64 = requests_of(&stats, &["st.global.v4"]);
                assert_eq!(v4 > 0, shift == 0, "{name}: {v4} warp requests of st.global.v4");
                assert_eq!(yp.slice(), &tokens[..], "{name}");
            }
            assert_eq!(RowKernel::from_name(&out.kernel_name()), Some(out));
        }
        for k in [keys, queries] {
            assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k));
        }
    }

    /// MLA decode's rows around the tensor-core kernel: the absorbed queries (`q_nope W_UK` summed
    /// in order, then bf16, the rope query after), the latent output through `W_UV` quantized per
    /// head (the reference's 1x128 quantization) — the same bits with blocks of 1, 2 and 8 of the
    /// 5 tokens — and the block table and lengths over caches that are bf16 pages.
    #[test]
    fn mla_decode_layout_rows_are_their_definitions() {
        use v3c_models::dtype::f32_to_f8e4m3;
        let (heads, nope, rope, v, b) = (3, 16, 8, 128, 5);
        let mut kernels = Vec::new();
        // A latent of 64 columns, and of 512: q_abs 4 columns a thread (4 x 128 threads), W_UV's
        // 128-column blocks unrolled.
        for kv in [64, 512] {
            let per = nope + v;
            let kv_b: Vec<u8> = values(heads * per * kv, 80, 300.0).iter().map(|&x| f32_to_f8e4m3(x)).collect();
            let (sr, sc) = ((heads * per).div_ceil(128), kv.div_ceil(128));
            let kv_scale: Vec<f32> = (0..sr * sc).map(|i| 0.002 + 0.001 * i as f32).collect();
            let w =
                |row: usize, col: usize| f8e4m3_to_f32(kv_b[row * kv + col]) * kv_scale[(row / 128) * sc + col / 128];
            let (mut qn, mut qp) = (values(b * heads * nope, 81, 2.0), values(b * heads * rope, 82, 2.0));
            let mut o = values(b * heads * kv, 83, 3.0);
            let mut want = vec![0f32; b * heads * v];
            for r in 0..b * heads {
                for e in 0..v {
                    want[r * v + e] =
                        (0..kv).fold(0f32, |acc, a| acc + o[r * kv + a] * w(r % heads * per + nope + e, a));
                }
            }
            let (want_q, want_s) = kernels::quantize_fp8(&want, heads * v, GROUP);
            // Blocks of one token, of 2 (the last one short) and of more tokens than there are.
            for tokens in [1, 2, 8] {
                let mut qa = vec![0u16; b * heads * (kv + rope)];
                let absorb = RowKernel::new(RowOp::MlaAbsorb { heads, nope, rope, v, tokens }, kv, "f8E4M3FN");
                run_cpu(
                    &absorb,
                    &[
                        raw(&mut qn, &[b, heads, nope], "f32"),
                        raw(&mut qp, &[b, heads, rope], "f32"),
                        raw(&mut kv_b.clone(), &[heads * per, kv], "i8"),
                        raw(&mut kv_scale.clone(), &[sr, sc], "f32"),
                        raw(&mut qa, &[b * heads, kv + rope], "bf16"),
                    ],
                );
                for r in 0..b * heads {
                    let h = r % heads;
                    for a in 0..kv {
                        let want = (0..nope).fold(0f32, |acc, d| acc + qn[r * nope + d] * w(h * per + d, a));
                        assert_eq!(qa[r * (kv + rope) + a], f32_to_bf16(want), "q_abs[{r}, {a}] ({tokens} tokens)");
                    }
                    for c in 0..rope {
                        let pe = f32_to_bf16(qp[r * rope + c]);
                        assert_eq!(qa[r * (kv + rope) + kv + c], pe, "q_pe[{r}, {c}] ({tokens} tokens)");
                    }
                }
                // The PTX: each block's scale read once, the sums in the same order.
                let mut simulated = vec![0u16; b * heads * (kv + rope)];
                let stats = run_simulated(
                    &absorb,
                    &[
                        raw(&mut qn, &[b, heads, nope], "f32"),
                        raw(&mut qp, &[b, heads, rope], "f32"),
                        raw(&mut kv_b.clone(), &[heads * per, kv], "i8"),
                        raw(&mut kv_scale.clone(), &[sr, sc], "f32"),
                        raw(&mut simulated, &[b * heads, kv + rope], "bf16"),
                    ],
                    b.div_ceil(tokens) * heads,
                );
                eprintln!("{}: {} instructions simulated", absorb.kernel_name(), stats.instructions);
                for (i, (&got, &want)) in simulated.iter().zip(&qa).enumerate() {
                    let (g, w) = (bf16_to_f32(got), bf16_to_f32(want));
                    assert!((g - w).abs() <= w.abs() / 128.0, "PTX q_abs [{i}] {g}, CPU {w} ({tokens} tokens)");
                }
                let (mut q, mut qs) = (vec![0u8; b * heads * v], vec![f32::NAN; b * heads]);
                let up = RowKernel::new(RowOp::MlaUpV { heads, nope, v, tokens }, kv, "f8E4M3FN");
                run_cpu(
                    &up,
                    &[
                        raw(&mut o, &[b * heads, kv], "f32"),
                        raw(&mut kv_b.clone(), &[heads * per, kv], "i8"),
                        raw(&mut kv_scale.clone(), &[sr, sc], "f32"),
                        raw(&mut q, &[b, heads * v], "i8"),
                        raw(&mut qs, &[b, heads], "f32"),
                    ],
                );
                assert_eq!((&qs, &q), (&want_s, &want_q), "{tokens} tokens");
                // The PTX: a warp per output element, its lanes' sums added by shuffles (another
                // order: the reference's bytes but for an e4m3 rounding now and then).
                let (mut q, mut qs) = (vec![0u8; b * heads * v], vec![f32::NAN; b * heads]);
                let stats = run_simulated(
                    &up,
                    &[
                        raw(&mut o, &[b * heads, kv], "f32"),
                        raw(&mut kv_b.clone(), &[heads * per, kv], "i8"),
                        raw(&mut kv_scale.clone(), &[sr, sc], "f32"),
                        raw(&mut q, &[b, heads * v], "i8"),
                        raw(&mut qs, &[b, heads], "f32"),
                    ],
                    b.div_ceil(tokens) * heads,
                );
                assert_fp8_rows_near(&up.kernel_name(), (&q, &qs), (&want_q, &want_s));
                // A warp's loads of W_UV's bytes take 32 adjacent ones: one sector, two where they
                // straddle a boundary. (A thread per element read 32 bytes a row apart: 32 sectors.)
                let w_loads: Vec<_> = stats.accesses.values().filter(|a| a.text.starts_with("ld.global.b8")).collect();
                assert!(!w_loads.is_empty(), "{}: no byte loads", up.kernel_name());
                for a in w_loads {
                    assert!(
                        a.sectors <= 2 * a.requests,
                        "{}: {} requests, {} sectors",
                        up.kernel_name(),
                        a.requests,
                        a.sectors
                    );
                }
                kernels.extend([absorb, up]);
            }
            // The f32 graph's: bf16 kv_b (no scales), the heads' outputs in f32.
            let kv16: Vec<u16> = (0..heads * per * kv).map(|i| f32_to_bf16(w(i / kv, i % kv))).collect();
            let w16 = |row: usize, col: usize| bf16_to_f32(kv16[row * kv + col]);
            let mut qa = vec![0u16; b * heads * (kv + rope)];
            let absorb = RowKernel::new(RowOp::MlaAbsorb { heads, nope, rope, v, tokens: 2 }, kv, "bf16");
            run_cpu(
                &absorb,
                &[
                    raw(&mut qn, &[b, heads, nope], "f32"),
                    raw(&mut qp, &[b, heads, rope], "f32"),
                    raw(&mut kv16.clone(), &[heads * per, kv], "bf16"),
                    raw(&mut qa, &[b * heads, kv + rope], "bf16"),
                ],
            );
            for r in 0..b * heads {
                for a in 0..kv {
                    let want = (0..nope).fold(0f32, |acc, d| acc + qn[r * nope + d] * w16(r % heads * per + d, a));
                    assert_eq!(qa[r * (kv + rope) + a], f32_to_bf16(want), "bf16 kv_b: q_abs[{r}, {a}]");
                }
            }
            let mut y = vec![f32::NAN; b * heads * v];
            let up = RowKernel::new(RowOp::MlaUpV { heads, nope, v, tokens: 2 }, kv, "bf16");
            run_cpu(
                &up,
                &[
                    raw(&mut o, &[b * heads, kv], "f32"),
                    raw(&mut kv16.clone(), &[heads * per, kv], "bf16"),
                    raw(&mut y, &[b, heads * v], "f32"),
                ],
            );
            let mut simulated = vec![f32::NAN; b * heads * v];
            run_simulated(
                &up,
                &[
                    raw(&mut o, &[b * heads, kv], "f32"),
                    raw(&mut kv16.clone(), &[heads * per, kv], "bf16"),
                    raw(&mut simulated, &[b, heads * v], "f32"),
                ],
                b.div_ceil(2) * heads,
            );
            for r in 0..b * heads {
                for e in 0..v {
                    let want = (0..kv).fold(0f32, |acc, a| acc + o[r * kv + a] * w16(r % heads * per + nope + e, a));
                    assert_eq!(y[r * v + e], want, "bf16 kv_b: out[{r}, {e}]");
                    // The lanes' sums in another order: within the rounding of kv terms.
                    let got = simulated[r * v + e];
                    let terms: f32 = (0..kv).map(|a| (o[r * kv + a] * w16(r % heads * per + nope + e, a)).abs()).sum();
                    assert!(
                        (got - want).abs() <= kv as f32 * f32::EPSILON * terms,
                        "bf16 kv_b, PTX: out[{r}, {e}] {got} {want}"
                    );
                }
            }
            kernels.extend([absorb, up]);
        }
        // A pool of pages: the lengths from the positions, within the table's pages (a negative
        // position: 0 rows; past the table: its rows); the table is left as the session made it.
        let mut positions = vec![69i64, 3, -1, 500];
        let (mut table, mut seqlens) = (vec![7i32, 2, -1, 5, 0, 1, 3, 4], vec![-1i32; 4]);
        let lengths = RowKernel::new(RowOp::MlaLengths, PAGE_ROWS, "f32");
        run_cpu(
            &lengths,
            &[raw(&mut positions, &[4], "i64"), raw(&mut table, &[4, 2], "i32"), raw(&mut seqlens, &[4], "i32")],
        );
        assert_eq!((table, seqlens), (vec![7, 2, -1, 5, 0, 1, 3, 4], vec![70, 4, 0, 128]));
        for k in kernels.into_iter().chain([lengths]) {
            assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k));
        }
    }

    /// A kv_b of `rows x cols`: e4m3 bytes, their 128x128 blocks' scales (`[sr, sc]`), and the
    /// same weights dequantized to bf16 (the f32 graph's).
    struct KvB {
        kv_b: Vec<u8>,
        kv_scale: Vec<f32>,
        kv16: Vec<u16>,
        sr: usize,
        sc: usize,
    }

    impl KvB {
        fn new(rows: usize, cols: usize, seed: u64) -> KvB {
            use v3c_models::dtype::f32_to_f8e4m3;
            let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
            let kv_b: Vec<u8> = values(rows * cols, seed, 300.0).iter().map(|&x| f32_to_f8e4m3(x)).collect();
            let kv_scale: Vec<f32> = (0..sr * sc).map(|i| 0.002 + 0.001 * i as f32).collect();
            let kv16 = (0..rows * cols)
                .map(|i| f32_to_bf16(f8e4m3_to_f32(kv_b[i]) * kv_scale[(i / cols / 128) * sc + i % cols / 128]))
                .collect();
            KvB { kv_b, kv_scale, kv16, sr, sc }
        }
    }

    /// The absorbed queries on the tensor cores: the CPU lowering is its definition (the query
    /// rounded to bf16, each output one f32 sum over k, the block's scale after), the PTX equals it
    /// but for the order of the sums, both within the query's bf16 rounding of the CUDA-core row's
    /// f32 form. Token tiles of 64 with a short last one, column blocks across a 128-column scale
    /// block, kv_b e4m3 and bf16.
    #[test]
    fn mla_absorb_on_the_tensor_cores_is_its_definition() {
        let (heads, nope, rope, v): (usize, usize, usize, usize) = (2, 128, 64, 128);
        let per = nope + v;
        let mut kernels = Vec::new();
        // A latent of 3 chunks (a block a chunk), then of 4 (a block two chunks: A staged once,
        // the second block's columns in the second 128-column block of scales).
        for (kv, b, weight) in [(192, 70, "f8E4M3FN"), (192, 5, "bf16"), (256, 70, "f8E4M3FN"), (256, 5, "bf16")] {
            let KvB { kv_b, kv_scale, kv16, sr, sc } = KvB::new(heads * per, kv, 90);
            let (mut qn, mut qp) = (values(b * heads * nope, 91, 4.0), values(b * heads * rope, 92, 2.0));
            // The weight unscaled and the block's scale (bf16: 1).
            let w = |row: usize, col: usize| match weight {
                "bf16" => (bf16_to_f32(kv16[row * kv + col]), 1.0),
                _ => (f8e4m3_to_f32(kv_b[row * kv + col]), kv_scale[(row / 128) * sc + col / 128]),
            };
            let kernel = RowKernel::new(RowOp::MlaAbsorbMma { heads, nope, rope, v }, kv, weight);
            let (mut kb, mut ks, mut k16) = (kv_b.clone(), kv_scale.clone(), kv16.clone());
            let mut buffers = |qa: &mut Vec<u16>| {
                let mut args = vec![raw(&mut qn, &[b, heads, nope], "f32"), raw(&mut qp, &[b, heads, rope], "f32")];
                match weight {
                    "bf16" => args.push(raw(&mut k16, &[heads * per, kv], "bf16")),
                    _ => args.extend([raw(&mut kb, &[heads * per, kv], "i8"), raw(&mut ks, &[sr, sc], "f32")]),
                }
                args.push(raw(qa, &[b * heads, kv + rope], "bf16"));
                args
            };
            let mut qa = vec![0u16; b * heads * (kv + rope)];
            run_cpu(&kernel, &buffers(&mut qa));
            let mut simulated = vec![0u16; b * heads * (kv + rope)];
            let blocks = b.div_ceil(mla_mma::TILE) * kernel.blocks_per_row();
            let stats = run_simulated(&kernel, &buffers(&mut simulated), blocks);
            eprintln!("{}: {} instructions simulated", kernel.kernel_name(), stats.instructions);
            for r in 0..b * heads {
                let h = r % heads;
                for a in 0..kv {
                    let (mut sum, mut terms, mut exact) = (0f32, 0f32, 0f32);
                    for d in 0..nope {
                        let (wv, _) = w(h * per + d, a);
                        let q = bf16_to_f32(f32_to_bf16(qn[r * nope + d]));
                        sum += q * wv;
                        terms += (q * wv).abs();
                        exact += qn[r * nope + d] * wv;
                    }
                    let s = w(h * per, a).1;
                    let at = r * (kv + rope) + a;
                    assert_eq!(qa[at], f32_to_bf16(sum * s), "CPU q_abs[{r}, {a}] ({weight})");
                    // The PTX's sums in the tensor cores' order: within nope roundings, then bf16's.
                    let (got, want) = (bf16_to_f32(simulated[at]), sum * s);
                    let bound = want.abs() / 128.0 + nope as f32 * f32::EPSILON * terms * s;
                    assert!((got - want).abs() <= bound, "PTX q_abs[{r}, {a}] {got}, want {want} ({weight})");
                    // The f32 query's form: apart by the query's rounding (2^-9 of each term).
                    let f32_form = exact * s;
                    assert!(
                        (bf16_to_f32(qa[at]) - f32_form).abs() <= f32_form.abs() / 128.0 + terms * s / 256.0,
                        "q_abs[{r}, {a}] {} vs the f32 query's {f32_form}",
                        bf16_to_f32(qa[at])
                    );
                }
                for c in 0..rope {
                    let pe = f32_to_bf16(qp[r * rope + c]);
                    assert_eq!(qa[r * (kv + rope) + kv + c], pe, "CPU q_pe[{r}, {c}]");
                    assert_eq!(simulated[r * (kv + rope) + kv + c], pe, "PTX q_pe[{r}, {c}]");
                }
            }
            kernels.push(kernel);
        }
        for k in kernels {
            assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k));
        }
        // Heads the block's operands cannot take.
        for (nope, rope, v, kv) in [(192, 64, 128, 512), (128, 64, 64, 512), (128, 64, 128, 96), (128, 63, 128, 512)] {
            let k = RowKernel::new(RowOp::MlaAbsorbMma { heads: 2, nope, rope, v }, kv, "f8E4M3FN");
            assert!(k.emit_gpu().is_err(), "{}", k.kernel_name());
        }
    }

    /// The up-projection on the tensor cores: the CPU lowering is its definition (`o` times the
    /// block's scale rounded to bf16, each output one f32 sum over the latent, the head's group
    /// quantized as the reference quantizes), the PTX's bytes and scales near it (the sums in the
    /// tensor cores' order), both near the CUDA-core row's f32 form. Token tiles of 64 with a
    /// short last one, a latent of 3 chunks across two scale blocks, kv_b e4m3 and bf16.
    #[test]
    fn mla_up_projection_on_the_tensor_cores_is_its_definition() {
        let (heads, nope, v, kv): (usize, usize, usize, usize) = (2, 128, 128, 192);
        let per = nope + v;
        let KvB { kv_b, kv_scale, kv16, sr, sc } = KvB::new(heads * per, kv, 93);
        let mut kernels = Vec::new();
        for (b, weight) in [(70, "f8E4M3FN"), (5, "bf16")] {
            let mut o = values(b * heads * kv, 94, 3.0);
            let w = |row: usize, col: usize| match weight {
                "bf16" => (bf16_to_f32(kv16[row * kv + col]), 1.0),
                _ => (f8e4m3_to_f32(kv_b[row * kv + col]), kv_scale[(row / 128) * sc + col / 128]),
            };
            // The definition, its terms' magnitudes, and the CUDA-core row's f32 form.
            let (mut want, mut terms, mut f32_form) =
                (vec![0f32; b * heads * v], vec![0f32; b * heads * v], vec![0f32; b * heads * v]);
            for r in 0..b * heads {
                let h = r % heads;
                for e in 0..v {
                    for a in 0..kv {
                        let (wv, s) = w(h * per + nope + e, a);
                        let x = bf16_to_f32(f32_to_bf16(o[r * kv + a] * s)) * wv;
                        want[r * v + e] += x;
                        terms[r * v + e] += x.abs();
                        f32_form[r * v + e] += o[r * kv + a] * (wv * s);
                    }
                }
            }
            let kernel = RowKernel::new(RowOp::MlaUpVMma { heads, nope, v }, kv, weight);
            let blocks = b.div_ceil(mla_mma::TILE) * kernel.blocks_per_row();
            let (mut kb, mut ks, mut k16) = (kv_b.clone(), kv_scale.clone(), kv16.clone());
            let mut inputs = |o: &mut Vec<f32>| {
                let mut args = vec![raw(o, &[b * heads, kv], "f32")];
                match weight {
                    "bf16" => args.push(raw(&mut k16, &[heads * per, kv], "bf16")),
                    _ => args.extend([raw(&mut kb, &[heads * per, kv], "i8"), raw(&mut ks, &[sr, sc], "f32")]),
                }
                args
            };
            if weight == "bf16" {
                let (mut y, mut simulated) = (vec![f32::NAN; b * heads * v], vec![f32::NAN; b * heads * v]);
                let mut args = inputs(&mut o);
                args.push(raw(&mut y, &[b, heads * v], "f32"));
                run_cpu(&kernel, &args);
                let mut args = inputs(&mut o);
                args.push(raw(&mut simulated, &[b, heads * v], "f32"));
                let stats = run_simulated(&kernel, &args, blocks);
                eprintln!("{}: {} instructions simulated", kernel.kernel_name(), stats.instructions);
                for i in 0..b * heads * v {
                    assert_eq!(y[i], want[i], "CPU out[{i}]");
                    let bound = kv as f32 * f32::EPSILON * terms[i];
                    assert!((simulated[i] - want[i]).abs() <= bound, "PTX out[{i}] {} want {}", simulated[i], want[i]);
                    // o's rounding: 2^-9 of each term.
                    assert!((want[i] - f32_form[i]).abs() <= terms[i] / 256.0, "out[{i}] vs the f32 form");
                }
            } else {
                let (want_q, want_s) = kernels::quantize_fp8(&want, heads * v, GROUP);
                let (mut q, mut qs) = (vec![0u8; b * heads * v], vec![f32::NAN; b * heads]);
                let mut args = inputs(&mut o);
                args.extend([raw(&mut q, &[b, heads * v], "i8"), raw(&mut qs, &[b, heads], "f32")]);
                run_cpu(&kernel, &args);
                assert_eq!((&qs, &q), (&want_s, &want_q), "CPU bytes and scales");
                let (mut sq, mut sqs) = (vec![0u8; b * heads * v], vec![f32::NAN; b * heads]);
                let mut args = inputs(&mut o);
                args.extend([raw(&mut sq, &[b, heads * v], "i8"), raw(&mut sqs, &[b, heads], "f32")]);
                let stats = run_simulated(&kernel, &args, blocks);
                eprintln!("{}: {} instructions simulated", kernel.kernel_name(), stats.instructions);
                assert_fp8_rows_near(&kernel.kernel_name(), (&sq, &sqs), (&want_q, &want_s));
                // Dequantized, near the f32 form: e4m3's rounding (2^-4 of the value, or of the
                // scale's step below the normal range), and o's (2^-9 of each term).
                for i in 0..b * heads * v {
                    let (got, scale) = (f8e4m3_to_f32(q[i]) * qs[i / v], qs[i / v]);
                    let bound = f32_form[i].abs() / 16.0 + scale / 64.0 + terms[i] / 256.0;
                    assert!((got - f32_form[i]).abs() <= bound, "out[{i}] {got} vs the f32 form's {}", f32_form[i]);
                }
            }
            kernels.push(kernel);
        }
        for k in kernels {
            assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k));
        }
        for (nope, v, kv) in [(64, 128, 512), (128, 64, 512), (128, 128, 96)] {
            let k = RowKernel::new(RowOp::MlaUpVMma { heads: 2, nope, v }, kv, "f8E4M3FN");
            assert!(k.emit_gpu().is_err(), "{}", k.kernel_name());
        }
    }

    /// f32 rows as bf16 hi + lo: hi is the reference's bf16 rounding of x, lo that of the rest, and
    /// hi + lo is x to 2^-16, also transposed; concatenation of two rows.
    #[test]
    fn split_bf16_and_concat_rows_are_exact() {
        let (rows, d, second) = (3, 300, 77);
        let mut x = values(rows * d, 30, 50.0);
        x[5] = 1.0 + f32::EPSILON; // a rest below bf16's reach
        let (mut hi, mut lo) = (vec![0u16; rows * d], vec![0u16; rows * d]);
        run_cpu(
            &RowKernel::new(RowOp::SplitBf16, d, "f32"),
            &[raw(&mut x, &[rows, d], "f32"), raw(&mut hi, &[rows, d], "bf16"), raw(&mut lo, &[rows, d], "bf16")],
        );
        for i in 0..x.len() {
            let want_hi = f32_to_bf16(x[i]);
            assert_eq!(hi[i], want_hi, "hi[{i}] of {}", x[i]);
            assert_eq!(lo[i], f32_to_bf16(x[i] - bf16_to_f32(want_hi)), "lo[{i}] of {}", x[i]);
            let sum = bf16_to_f32(hi[i]) + bf16_to_f32(lo[i]);
            assert!((sum - x[i]).abs() <= x[i].abs() * 2f32.powi(-16), "{} vs {}", sum, x[i]);
        }
        // Transposed: the same bits at [col, row], the padding columns zero.
        let padded = rows.next_multiple_of(8);
        let (mut hi_t, mut lo_t) = (vec![0xAAAAu16; d * padded], vec![0xAAAAu16; d * padded]);
        run_cpu(
            &RowKernel::new(RowOp::SplitBf16T, d, "f32"),
            &[
                raw(&mut x, &[rows, d], "f32"),
                raw(&mut hi_t, &[d, padded], "bf16"),
                raw(&mut lo_t, &[d, padded], "bf16"),
            ],
        );
        for c in 0..d {
            for r in 0..padded {
                let (want_hi, want_lo) = if r < rows { (hi[r * d + c], lo[r * d + c]) } else { (0, 0) };
                assert_eq!((hi_t[c * padded + r], lo_t[c * padded + r]), (want_hi, want_lo), "[{c}, {r}]");
            }
        }
        let (mut a, mut b) = (values(rows * d, 31, 1.0), values(rows * second, 32, 1.0));
        let mut y = vec![f32::NAN; rows * (d + second)];
        run_cpu(
            &RowKernel::new(RowOp::Concat { second }, d, "f32"),
            &[
                raw(&mut a, &[rows, d], "f32"),
                raw(&mut b, &[rows, second], "f32"),
                raw(&mut y, &[rows, d + second], "f32"),
            ],
        );
        for r in 0..rows {
            assert_eq!(&y[r * (d + second)..r * (d + second) + d], &a[r * d..(r + 1) * d]);
            assert_eq!(&y[r * (d + second) + d..(r + 1) * (d + second)], &b[r * second..(r + 1) * second]);
        }
    }

    /// The copies and the bf16 split through the PTX simulated, against the CPU lowering's bits:
    /// with every buffer on 128 bytes (16 bytes a load where the widths are whole chunks of 4
    /// columns, and only there) and every buffer an element off (a column at a time).
    #[test]
    fn split_copy_concat_and_embed_rows_simulated_move_16_bytes_a_load_where_aligned() {
        let rows = 3;
        // d 300: 75 chunks, some threads two (a repeated chunk in a step); 302 is no whole chunks.
        for (d, threads) in [(300, 64), (302, 64), (7168, 256)] {
            let x = {
                let mut x = values(rows * d, 40, 50.0);
                x[5] = 1.0 + f32::EPSILON;
                x
            };
            // Concatenated rows are whole chunks where both parts are.
            let second = if d == 300 { 100 } else { d.min(128) };
            let x2 = values(rows * second, 41, 3.0);
            let vocab = 5;
            let table32 = values(vocab * d, 42, 2.0);
            let table: Vec<u16> = table32.iter().map(|&v| f32_to_bf16(v)).collect();
            let ids: Vec<i64> = vec![4, -1, 0];
            let with = |op: RowOp, weight: &str| {
                let mut k = RowKernel::new(op, d, weight);
                k.threads = threads;
                k
            };
            // Each kernel's outputs, by shift (None: the CPU lowering), as bytes.
            let run = |kernel: &RowKernel, shift: Option<usize>| -> Vec<Vec<u8>> {
                let at = shift.unwrap_or(0);
                let (mut xp, mut x2p) = (placed(&x, at), placed(&x2, at));
                let (mut tp, mut idp) = (placed(&table, at), placed(&ids, at));
                let mut hi = placed(&vec![0u16; rows * d], at);
                let mut lo = placed(&vec![0u16; rows * d], at);
                let mut y = placed(&vec![f32::NAN; rows * (d + second)], at);
                let buffers = match kernel.op {
                    RowOp::SplitBf16 => vec![
                        raw(xp.slice(), &[rows, d], "f32"),
                        raw(hi.slice(), &[rows, d], "bf16"),
                        raw(lo.slice(), &[rows, d], "bf16"),
                    ],
                    RowOp::Copy => {
                        vec![raw(xp.slice(), &[rows, d], "f32"), raw(&mut y.slice()[..rows * d], &[rows, d], "f32")]
                    }
                    RowOp::Concat { .. } => vec![
                        raw(xp.slice(), &[rows, d], "f32"),
                        raw(x2p.slice(), &[rows, second], "f32"),
                        raw(y.slice(), &[rows, d + second], "f32"),
                    ],
                    RowOp::Embed => vec![
                        raw(tp.slice(), &[vocab, d], "bf16"),
                        raw(idp.slice(), &[rows], "i64"),
                        raw(&mut y.slice()[..rows * d], &[rows, d], "f32"),
                    ],
                    _ => unreachable!(),
                };
                let name = format!("{} at shift {shift:?}", kernel.kernel_name());
                match shift {
                    None => run_cpu(kernel, &buffers),
                    Some(shift) => {
                        let stats = run_simulated(kernel, &buffers, rows);
                        let (v4_loads, v4_stores) = (
                            requests_of(&stats, &["ld.global.v4"]),
                            requests_of(&stats, &["st.global.v4", "st.global.v2"]),
                        );
                        eprintln!(
                            "{name}: {} instructions, {} load rounds, {:.0}% of global sectors' bytes used, {v4_loads} / {v4_stores} wide loads / stores",
                            stats.instructions,
                            stats.load_rounds,
                            100.0 * stats.global_efficiency()
                        );
                        // The embedding's bf16 table comes 8 bytes a load.
                        let loads = if kernel.op == RowOp::Embed {
                            requests_of(&stats, &["ld.global.v4.b16", "ld.global.v2"])
                        } else {
                            v4_loads
                        };
                        let aligned = shift == 0 && d.is_multiple_of(4) && (d + second).is_multiple_of(4);
                        assert_eq!(loads > 0, aligned, "{name}: {loads} wide loads");
                        assert_eq!(v4_stores > 0, aligned, "{name}: {v4_stores} wide stores");
                    }
                }
                // The outputs as bits (NaN where nothing was written).
                let bits32 = |v: &[f32]| v.iter().flat_map(|f| f.to_bits().to_le_bytes()).collect::<Vec<u8>>();
                let bits16 = |v: &[u16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
                vec![bits16(hi.slice()), bits16(lo.slice()), bits32(y.slice())]
            };
            for op in [RowOp::SplitBf16, RowOp::Copy, RowOp::Concat { second }, RowOp::Embed] {
                let kernel = with(op, if op == RowOp::Embed { "bf16" } else { "f32" });
                let cpu = run(&kernel, None);
                for shift in [0, 1] {
                    assert!(
                        run(&kernel, Some(shift)) == cpu,
                        "{}: shift {shift} differs from the CPU lowering",
                        kernel.kernel_name()
                    );
                }
            }
        }
    }

    /// MLA prefill's keys, values and queries (head-major bf16 rows) through the PTX simulated,
    /// against the CPU lowering's bits: over buffers on 128 bytes (a head's 4 columns a load and a
    /// store where its parts are whole chunks of 4, and only there) and an element off (a column
    /// at a time). kv f32 or bf16; caches of f32, bf16 and fp8 rows.
    #[test]
    fn mla_prefill_keys_and_queries_simulated_move_a_heads_chunk_a_load_where_aligned() {
        let (s_len, heads, rope, d) = (3, 3, v3c_runtime::plan::Fp8LatentRow::ROPE, 128);
        let row = v3c_runtime::plan::Fp8LatentRow { latent: d };
        // nope 6: no whole chunks (a column at a time); 8 with values of 12.
        for (nope, v) in [(8, 12), (6, 8)] {
            let per = nope + v;
            let kv32 = values(s_len * heads * per, 90, 9.0);
            let kv16: Vec<u16> = kv32.iter().map(|&x| f32_to_bf16(x)).collect();
            let latent = values(s_len * (d + rope), 91, 2.0);
            let mut packed = vec![0u8; s_len * row.bytes()];
            for (r, out) in latent.chunks_exact(d + rope).zip(packed.chunks_exact_mut(row.bytes())) {
                row.pack(r, out);
            }
            let cache16: Vec<u16> = latent.iter().map(|&x| f32_to_bf16(x)).collect();
            let (qn, qp) = (values(s_len * heads * nope, 92, 9.0), values(s_len * heads * rope, 93, 9.0));
            let mut kernels: Vec<RowKernel> = Vec::new();
            for (w, cache) in
                [("bf16", CacheRows::Bf16), ("f32", CacheRows::Fp8), ("bf16", CacheRows::Fp8), ("f32", CacheRows::F32)]
            {
                kernels.push(RowKernel::new(RowOp::MlaKeys { heads, nope, rope, v, cache }, d, w));
            }
            kernels.push(RowKernel::new(RowOp::MlaQueries { heads, nope, rope }, heads * (nope + rope), "f32"));
            for kernel in &mut kernels {
                kernel.threads = 32;
                let run = |shift: Option<usize>| -> (Vec<u16>, Vec<u16>) {
                    let at = shift.unwrap_or(0);
                    let (mut kvp, mut kv16p) = (placed(&kv32, at), placed(&kv16, at));
                    let (mut c32, mut c16, mut c8) = (placed(&latent, at), placed(&cache16, at), placed(&packed, at));
                    let (mut qnp, mut qpp) = (placed(&qn, at), placed(&qp, at));
                    let mut k = placed(&vec![0xAAAAu16; heads * s_len * (nope + rope)], at);
                    let mut vv = placed(&vec![0xAAAAu16; heads * s_len * v], at);
                    let buffers = match kernel.op {
                        RowOp::MlaKeys { cache, .. } => vec![
                            if kernel.weight == "f32" {
                                raw(kvp.slice(), &[s_len, heads * per], "f32")
                            } else {
                                raw(kv16p.slice(), &[s_len, heads * per], "bf16")
                            },
                            match cache {
                                CacheRows::Fp8 => raw(c8.slice(), &[s_len, row.bytes()], "i8"),
                                CacheRows::Bf16 => raw(c16.slice(), &[s_len, d + rope], "bf16"),
                                CacheRows::F32 => raw(c32.slice(), &[s_len, d + rope], "f32"),
                            },
                            raw(k.slice(), &[heads * s_len, nope + rope], "bf16"),
                            raw(vv.slice(), &[heads * s_len, v], "bf16"),
                        ],
                        _ => vec![
                            raw(qnp.slice(), &[s_len, heads, nope], "f32"),
                            raw(qpp.slice(), &[s_len, heads, rope], "f32"),
                            raw(k.slice(), &[heads * s_len, nope + rope], "bf16"),
                        ],
                    };
                    let name = format!("{} ({} kv) at shift {shift:?}", kernel.kernel_name(), kernel.weight);
                    match shift {
                        None => run_cpu(kernel, &buffers),
                        Some(shift) => {
                            let stats = run_simulated(kernel, &buffers, s_len);
                            let wide: u64 = requests_of(&stats, &["st.global.v2", "st.global.v4"]);
                            eprintln!(
                                "{name}: {} instructions, {} load rounds, {:.0}% of global sectors' bytes used, {wide} wide stores",
                                stats.instructions,
                                stats.load_rounds,
                                100.0 * stats.global_efficiency()
                            );
                            assert_eq!(wide > 0, shift == 0 && nope % 4 == 0, "{name}: {wide} wide stores");
                        }
                    }
                    (k.slice().to_vec(), vv.slice().to_vec())
                };
                let cpu = run(None);
                assert!(!cpu.0.contains(&0xAAAA), "{}: every key column written", kernel.kernel_name());
                for shift in [0, 1] {
                    assert!(
                        run(Some(shift)) == cpu,
                        "{}: shift {shift} differs from the CPU lowering",
                        kernel.kernel_name()
                    );
                }
            }
        }
    }

    /// MLA decode attention (absorbed) through the CPU lowering against the reference's `mla`
    /// (absorbed form, fp8 kv_b dequantized) and its 1x128 quantization: the same sums in the same
    /// order, so scales and bytes equal — whatever the kernel's capacity: keys past it go through
    /// shared memory in chunks, every sum continuing in key order. 1, 2 and 5 heads; sequences
    /// seeing 1 to 5000 keys, in one chunk or up to 625.
    #[test]
    fn mla_decode_attention_matches_the_reference() {
        // Keys 1, 8 and 20: in one chunk of 64; chunks of 8 (the last one partial); of 1.
        check_mla_decode(2, 20, vec![0, 7, 19], &[64, 8, 1]);
        // Other head counts, contexts from one key to 5000.
        check_mla_decode(5, 5000, vec![4999, 0, 2500, 63, 64], &[8192, 8, 64]);
        check_mla_decode(1, 300, vec![299], &[512, 7]);
    }

    /// The f32 graph's attention rows (bf16 kv_b, f32 outputs, any value width): decode equals the
    /// reference's absorbed `mla` bit for bit, prefill its naive form up to rounding — in one chunk
    /// of keys or several.
    #[test]
    fn mla_attention_of_the_f32_graph_matches_the_reference() {
        use v3c_models::graph::AttentionForm;
        let (heads, nope, rope, v, kv) = (3, 16, 8, 24, 40);
        let per = nope + v;
        let mut kv_b: Vec<u16> = values(heads * per * kv, 60, 0.3).iter().map(|&x| f32_to_bf16(x)).collect();
        let kvb: Vec<f32> = kv_b.iter().map(|&b| bf16_to_f32(b)).collect();
        let dims = kernels::MlaDims { heads, nope, rope, v, kv_lora: kv };
        let (b, slots) = (3, 31);
        let mut positions: Vec<i64> = vec![0, 9, 30];
        let mut q_nope = values(b * heads * nope, 61, 2.0);
        let mut q_pe = values(b * heads * rope, 62, 2.0);
        let mut cache = values(b * slots * (kv + rope), 63, 1.0);
        let mut want = Vec::new();
        for seq in 0..b {
            let c = kv + rope;
            want.extend(kernels::mla(
                &q_nope[seq * heads * nope..(seq + 1) * heads * nope],
                &q_pe[seq * heads * rope..(seq + 1) * heads * rope],
                &cache[seq * slots * c..(seq + 1) * slots * c],
                &kvb,
                &[positions[seq] as usize],
                slots,
                dims,
                0.3,
                AttentionForm::Absorbed,
            ));
        }
        for context in [64, 5] {
            let kernel = RowKernel::new(
                RowOp::MlaDecode { heads, nope, rope, v, context, scale: 0.3, prefill: false, selected: false },
                kv,
                "bf16",
            );
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()));
            let mut out = vec![f32::NAN; b * heads * v];
            run_cpu(
                &kernel,
                &[
                    raw(&mut q_nope, &[b, heads, nope], "f32"),
                    raw(&mut q_pe, &[b, heads, rope], "f32"),
                    raw(&mut cache, &[b, slots, kv + rope], "f32"),
                    raw(&mut positions, &[b], "i64"),
                    raw(&mut kv_b, &[heads * per, kv], "bf16"),
                    raw(&mut out, &[b, heads * v], "f32"),
                ],
            );
            assert_eq!(out, want, "decode, capacity {context}");
        }
        // Prefill: the last 3 of 7 latent rows are the queries.
        let (t, s_rows) = (3, 7);
        let mut latent = values(s_rows * (kv + rope), 64, 1.0);
        let (mut qn, mut qp) = (values(t * heads * nope, 65, 2.0), values(t * heads * rope, 66, 2.0));
        let visible: Vec<usize> = (0..t).map(|i| s_rows - t + i).collect();
        let want = kernels::mla(&qn, &qp, &latent, &kvb, &visible, s_rows, dims, 0.3, AttentionForm::Naive);
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for context in [64, 2] {
            let kernel = RowKernel::new(
                RowOp::MlaDecode { heads, nope, rope, v, context, scale: 0.3, prefill: true, selected: false },
                kv,
                "bf16",
            );
            let mut out = vec![f32::NAN; t * heads * v];
            run_cpu(
                &kernel,
                &[
                    raw(&mut qn, &[t, heads, nope], "f32"),
                    raw(&mut qp, &[t, heads, rope], "f32"),
                    raw(&mut latent, &[s_rows, kv + rope], "f32"),
                    raw(&mut kv_b, &[heads * per, kv], "bf16"),
                    raw(&mut out, &[t, heads * v], "f32"),
                ],
            );
            for (i, (a, w)) in out.iter().zip(&want).enumerate() {
                assert!((a - w).abs() <= 1e-5 * scale, "prefill [{i}]: {a} vs {w} (capacity {context})");
            }
        }
    }

    /// [`RowOp::MlaDecode`] over `positions.len()` sequences of `slots` cache rows (sequence b sees
    /// rows `0..=positions[b]`) with `heads` heads, through the CPU lowering, against the reference's
    /// absorbed `mla` and its 1x128 quantization, bit for bit, per kernel capacity in `contexts`.
    fn check_mla_decode(heads: usize, slots: usize, mut positions: Vec<i64>, contexts: &[usize]) {
        use v3c_models::dtype::f32_to_f8e4m3;
        let (nope, rope, v, kv) = (16, 8, 128, 64);
        let b = positions.len();
        let scale = 0.3f32;
        let per = nope + v;
        let kvb_f: Vec<f32> = values(heads * per * kv, 40, 1.0);
        let mut kv_b: Vec<u8> = kvb_f.iter().map(|&x| f32_to_f8e4m3(x * 300.0)).collect();
        let (sr, sc) = ((heads * per).div_ceil(128), kv.div_ceil(128));
        let mut kv_scale: Vec<f32> = (0..sr * sc).map(|i| 0.002 + 0.001 * i as f32).collect();
        let kvb_deq: Vec<f32> = (0..heads * per * kv)
            .map(|i| f8e4m3_to_f32(kv_b[i]) * kv_scale[(i / kv / 128) * sc + (i % kv) / 128])
            .collect();
        let mut q_nope = values(b * heads * nope, 41, 2.0);
        let mut q_pe = values(b * heads * rope, 42, 2.0);
        let mut cache = values(b * slots * (kv + rope), 43, 1.0);
        let dims = kernels::MlaDims { heads, nope, rope, v, kv_lora: kv };
        let mut want = Vec::new();
        for seq in 0..b {
            let lat = &cache[seq * slots * (kv + rope)..(seq + 1) * slots * (kv + rope)];
            let qn = &q_nope[seq * heads * nope..(seq + 1) * heads * nope];
            let qp = &q_pe[seq * heads * rope..(seq + 1) * heads * rope];
            let visible = [positions[seq] as usize];
            want.extend(kernels::mla(
                qn,
                qp,
                lat,
                &kvb_deq,
                &visible,
                slots,
                dims,
                scale,
                v3c_models::graph::AttentionForm::Absorbed,
            ));
        }
        let (want_q, want_s) = kernels::quantize_fp8(&want, heads * v, GROUP);
        for &context in contexts {
            let op = RowOp::MlaDecode { heads, nope, rope, v, context, scale, prefill: false, selected: false };
            let kernel = RowKernel::new(op, kv, "f8E4M3FN");
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()));
            let (mut q, mut qs) = (vec![0u8; b * heads * v], vec![f32::NAN; b * heads]);
            run_cpu(
                &kernel,
                &[
                    raw(&mut q_nope, &[b, heads, nope], "f32"),
                    raw(&mut q_pe, &[b, heads, rope], "f32"),
                    raw(&mut cache, &[b, slots, kv + rope], "f32"),
                    raw(&mut positions, &[b], "i64"),
                    raw(&mut kv_b, &[heads * per, kv], "i8"),
                    raw(&mut kv_scale, &[sr, sc], "f32"),
                    raw(&mut q, &[b, heads * v], "i8"),
                    raw(&mut qs, &[b, heads], "f32"),
                ],
            );
            for seq in 0..b {
                let (s, bytes) = (seq * heads..(seq + 1) * heads, seq * heads * v..(seq + 1) * heads * v);
                assert_eq!(qs[s.clone()], want_s[s], "scales of sequence {seq} ({heads} heads, capacity {context})");
                assert_eq!(q[bytes.clone()], want_q[bytes], "bytes of sequence {seq} (capacity {context})");
            }
        }
    }

    /// Prefill attention (the last T of S latent rows are the queries, causal) in the absorbed form
    /// against the reference's naive form: the same attention up to rounding (scales within 1e-5,
    /// bytes at most one e4m3 step apart and rarely), and the same bits whatever the kernel's
    /// capacity (keys in chunks of 16, 5, 2, 1).
    #[test]
    fn mla_prefill_attention_matches_the_naive_reference() {
        use v3c_models::dtype::f32_to_f8e4m3;
        let (heads, nope, rope, v, kv) = (2, 16, 8, 128, 64);
        let (t, s_rows) = (3, 7);
        let per = nope + v;
        let mut kv_b: Vec<u8> = values(heads * per * kv, 50, 300.0).iter().map(|&x| f32_to_f8e4m3(x)).collect();
        let (sr, sc) = ((heads * per).div_ceil(128), kv.div_ceil(128));
        let mut kv_scale: Vec<f32> = (0..sr * sc).map(|i| 0.002 + 0.001 * i as f32).collect();
        let kvb_deq: Vec<f32> = (0..heads * per * kv)
            .map(|i| f8e4m3_to_f32(kv_b[i]) * kv_scale[(i / kv / 128) * sc + (i % kv) / 128])
            .collect();
        let mut q_nope = values(t * heads * nope, 51, 2.0);
        let mut q_pe = values(t * heads * rope, 52, 2.0);
        let mut latent = values(s_rows * (kv + rope), 53, 1.0);
        let dims = kernels::MlaDims { heads, nope, rope, v, kv_lora: kv };
        let visible: Vec<usize> = (0..t).map(|i| s_rows - t + i).collect();
        let want = kernels::mla(
            &q_nope,
            &q_pe,
            &latent,
            &kvb_deq,
            &visible,
            s_rows,
            dims,
            0.3,
            v3c_models::graph::AttentionForm::Naive,
        );
        let (want_q, want_s) = kernels::quantize_fp8(&want, heads * v, GROUP);
        let mut first: Option<(Vec<u8>, Vec<f32>)> = None;
        for context in [16, 5, 2, 1] {
            let op = RowOp::MlaDecode { heads, nope, rope, v, context, scale: 0.3, prefill: true, selected: false };
            let kernel = RowKernel::new(op, kv, "f8E4M3FN");
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()));
            let (mut q, mut qs) = (vec![0u8; t * heads * v], vec![f32::NAN; t * heads]);
            run_cpu(
                &kernel,
                &[
                    raw(&mut q_nope, &[t, heads, nope], "f32"),
                    raw(&mut q_pe, &[t, heads, rope], "f32"),
                    raw(&mut latent, &[s_rows, kv + rope], "f32"),
                    raw(&mut kv_b, &[heads * per, kv], "i8"),
                    raw(&mut kv_scale, &[sr, sc], "f32"),
                    raw(&mut q, &[t, heads * v], "i8"),
                    raw(&mut qs, &[t, heads], "f32"),
                ],
            );
            // Query 0 sees 5 rows; 1 and 2 see 6 and 7.
            for (i, (a, b)) in qs.iter().zip(&want_s).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b, "scale {i}: {a} vs {b} (capacity {context})");
            }
            let n = t * heads * v;
            let differ = q.iter().zip(&want_q).filter(|(a, b)| a != b).count();
            assert!(differ * 100 <= n, "{differ} of {n} bytes differ");
            for (a, b) in q.iter().zip(&want_q) {
                let (fa, fb) = (f8e4m3_to_f32(*a), f8e4m3_to_f32(*b));
                assert!((fa - fb).abs() <= 0.125 * fa.abs().max(fb.abs()), "{fa} vs {fb}");
            }
            match &first {
                None => first = Some((q, qs)),
                Some((q0, qs0)) => {
                    assert!(
                        q == *q0 && qs.iter().zip(qs0).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "capacity {context}"
                    )
                }
            }
        }
    }

    #[test]
    fn rows_too_wide_for_shared_memory_are_refused() {
        let k = RowKernel::new(RowOp::RmsNorm { eps: 1e-6, keep: true, quantize: true }, 16384, "bf16");
        let err = k.emit_gpu().unwrap_err();
        assert!(err.contains("of shared memory for rows of 16384 columns"), "{err}");
        let mut k = RowKernel::new(RowOp::Embed, 64, "bf16");
        k.threads = 48;
        assert!(k.emit_cpu().unwrap_err().contains("48 threads (a power of two"));
    }

    #[test]
    fn names_spell_the_kernel() {
        let k = RowKernel::new(RowOp::RmsNorm { eps: 1e-6, keep: true, quantize: true }, 7168, "bf16");
        assert_eq!(k.kernel_name(), "rows_rmsnorm_bf16_d7168_t256_eps1em6_y_q");
        assert_eq!(RowKernel::new(RowOp::Embed, 512, "f32").kernel_name(), "rows_embed_f32_d512_t64");
        for k in [
            k.clone(),
            RowKernel::new(RowOp::RmsNorm { eps: 1e-5, keep: false, quantize: true }, 1000, "f32"),
            RowKernel::new(RowOp::RmsNorm { eps: 2.5e-7, keep: true, quantize: false }, 77, "bf16"),
            RowKernel::new(RowOp::Embed, 7168, "bf16"),
            RowKernel::new(
                RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: false, cache: CacheRows::F32 },
                512,
                "bf16",
            ),
            RowKernel::new(
                RowOp::Latent { eps: 1e-5, rope: 32, interleave: false, append: true, cache: CacheRows::F32 },
                256,
                "f32",
            ),
            RowKernel::new(RowOp::SplitRope { heads: 128, nope: 128, rope: 64, interleave: true }, 128 * 192, "f32"),
            RowKernel::new(RowOp::SplitRope { heads: 2, nope: 4, rope: 2, interleave: false }, 12, "f32"),
            RowKernel::new(RowOp::SiluMul { quantize: true }, 18432, "f32"),
            RowKernel::new(RowOp::SiluMul { quantize: false }, 300, "f32"),
        ] {
            assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k.clone()), "{}", k.kernel_name());
        }
        for bad in [
            "rows_rmsnorm_bf16_d7168_t256_eps1em6",
            "rows_embed_bf16_d7168_t48",
            "rows_embed_f16_d64_t32",
            "rows_latent_bf16_d512_r63_t64_eps1em6_write",
            "rows_latent_bf16_d512_r64_t64_eps1em6_il",
            "gemm_x",
        ] {
            assert_eq!(RowKernel::from_name(bad), None, "{bad}");
        }
    }
}
