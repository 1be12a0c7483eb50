//! Row kernels of the training step ([`TrainRow`]): the backward pass's elementwise and per-row
//! ops, the losses, MLA's forward and backward, the routed experts and their gradients, the FP8
//! recipe's quantizers, and CUDA-core baselines for what has no tensor-core template yet (the f32
//! GEMMs, the FP8 Wgrad, the FP8 experts' block-scaled products). Same template as the other row
//! kernels ([`super`]): phases that exchange data only through memory, one `gpu.func` on sm_90a and
//! a CPU function running each phase's threads in turn, which the tests check against the
//! reference interpreter's kernels.
//!
//! Orders of operations follow the reference (`v3c_models::interp::kernels`) wherever one thread
//! computes a value: sequential sums in its order, products rounded as it rounds them. Where the
//! block shares a sum (RMSNorm's gradient: the row's sum of squares and `dy . w . x`; the
//! cross-entropy's max and sum), a tree over the threads' strided partial sums (not the reference's
//! order: equal up to rounding).

use std::fmt::Write;

use super::{
    aligned, aligned_all, amax_step, chunk_steps, chunk_unroll, encode_e4m3, exp, indent2, mla_train, quant_constants,
    rope_rotation, round_bf16, sqrt, tree_phases, unindent, Buffer, Lowering, RowKernel, AMAX_PARTS, BF16_CONSTANTS,
    E4M3_MAX, VEC,
};

/// `{out} = ln(value)`: on sm_90a `lg2.approx` times ln 2 (no libdevice), on the CPU libm's.
fn ln(lowering: Lowering, value: &str, out: &str) -> String {
    match lowering {
        Lowering::Gpu => format!(
            "{out}_l2 = llvm.inline_asm \"lg2.approx.f32 $0, $1;\", \"=f,f\" {value} : (f32) -> f32\n{out}_ln2 = \
             arith.constant 0.693147182 : f32\n{out} = arith.mulf {out}_l2, {out}_ln2 : f32\n"
        ),
        Lowering::Cpu => format!("{out} = math.log {value} : f32\n"),
    }
}

/// The routed slots of token `%row` in expert order into `%sh_order` (of type `order`): slot s's
/// place is how many slots have a lower expert, or the same one and come earlier (as the
/// reference sorts them, stably).
fn slot_order(order: &str) -> String {
    format!(
        "%t = arith.addi %row, %c0 : index
scf.for %s = %tid to %cK step %cT {{
  %es = memref.load %idx[%t, %s] : memref<?x?xi32>
  %rank = scf.for %s2 = %c0 to %cK step %c1 iter_args(%a = %c0) -> (index) {{
    %e2 = memref.load %idx[%t, %s2] : memref<?x?xi32>
    %lower = arith.cmpi slt, %e2, %es : i32
    %same = arith.cmpi eq, %e2, %es : i32
    %earlier = arith.cmpi ult, %s2, %s : index
    %tie = arith.andi %same, %earlier : i1
    %before = arith.ori %lower, %tie : i1
    %a1 = arith.addi %a, %c1 : index
    %a2 = arith.select %before, %a1, %a : index
    scf.yield %a2 : index
  }}
  %s_i = arith.index_cast %s : index to i32
  %s_f = arith.sitofp %s_i : i32 to f32
  memref.store %s_f, %sh_order[%rank] : {order}
}}
"
    )
}

/// SwiGLU's gradient at one element (the reference's `silu_mul_grad`): `%dg = dy * u * s * (1 + g
/// * (1 - s))` with `s = sigmoid(g)`, `%du = dy * silu(g)`, from the values `g`, `u`, `dy`.
fn swiglu_grad(lowering: Lowering, g: &str, u: &str, dy: &str) -> String {
    format!(
        "%swg_neg = arith.negf {g} : f32
{exp}%swg_den = arith.addf %one, %swg_e : f32
%swg_s = arith.divf %one, %swg_den : f32
%swg_dyu = arith.mulf {dy}, {u} : f32
%swg_dyus = arith.mulf %swg_dyu, %swg_s : f32
%swg_oms = arith.subf %one, %swg_s : f32
%swg_goms = arith.mulf {g}, %swg_oms : f32
%swg_f = arith.addf %one, %swg_goms : f32
%dg = arith.mulf %swg_dyus, %swg_f : f32
%swg_silu = arith.divf {g}, %swg_den : f32
%du = arith.mulf {dy}, %swg_silu : f32
",
        exp = exp(lowering, "%swg_neg", "%swg_e")
    )
}

/// `%ebase` = the first row of expert `idx[{t}, {s}]` in stacked weights `{weights}` of `{rows}`
/// rows per expert (an expert outside them reads expert 0: the runtime checks the routing).
fn expert_base(t: &str, s: &str, weights: &str, rows: &str) -> String {
    let ty = "memref<?x?xf32>";
    format!(
        "%e_i32 = memref.load %idx[{t}, {s}] : memref<?x?xi32>
%e_raw = arith.index_cast %e_i32 : i32 to index
%w_rows = memref.dim {weights}, %c0 : {ty}
%experts = arith.divui %w_rows, {rows} : index
%e_zero = arith.constant 0 : i32
%e_lo = arith.cmpi sge, %e_i32, %e_zero : i32
%e_hi = arith.cmpi ult, %e_raw, %experts : index
%e_ok = arith.andi %e_lo, %e_hi : i1
%e = arith.select %e_ok, %e_raw, %c0 : index
%ebase = arith.muli %e, {rows} : index
"
    )
}

/// A float as kernel names spell it (`1e-6` -> `1em6`: PTX names allow no `-` or `.`).
fn spelled(v: f32) -> String {
    format!("{v:e}").replace('-', "m").replace('.', "p")
}

fn unspelled(s: &str) -> Option<f32> {
    s.replace('m', "-").replace('p', ".").parse().ok()
}

/// Multi-head latent attention's shape in the naive form (per head: `nope` + `rope` query/key
/// columns, `v` value columns; the latent of `kv` columns + `rope`), the scale, `context`: the
/// keys (or queries) a block takes through shared memory at a time — longer windows go in chunks,
/// each pass recomputing a chunk's scores, every sum continuing in order (the same bits) — and
/// `group`: the queries a block takes (the keys, for the keys' gradient), sharing each key's
/// (query's) loads ([`super::mla_train`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mla {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv: usize,
    pub context: usize,
    pub group: usize,
    pub scale: f32,
}

impl Mla {
    /// The most queries (keys) a block takes: each is a thread's reduction and a loop-carried value
    /// of every shared load.
    pub const MAX_GROUP: usize = 32;

    fn name(&self) -> String {
        let Mla { heads, nope, rope, v, kv, context, group, scale } = *self;
        format!("h{heads}_n{nope}_r{rope}_v{v}_kv{kv}_c{context}_g{group}_s{}", spelled(scale))
    }

    fn parse(parts: &[&str]) -> Option<Mla> {
        let number = |part: &str, prefix: &str| -> Option<usize> { part.strip_prefix(prefix)?.parse().ok() };
        let [h, n, r, v, kv, c, g, s] = parts else { return None };
        Some(Mla {
            heads: number(h, "h")?,
            nope: number(n, "n")?,
            rope: number(r, "r")?,
            v: number(v, "v")?,
            kv: number(kv, "kv")?,
            context: number(c, "c")?,
            group: number(g, "g")?,
            scale: unspelled(s.strip_prefix('s')?)?,
        })
    }
}

/// Rows and columns of a [`TrainRow::Transpose`] tile.
const TRANSPOSE_TILE: usize = 32;

/// Blocks per 32 columns of [`TrainRow::QuantizePairs`], sharing out the 128-pair groups.
const PAIR_GROUP_BLOCKS: usize = 16;

/// A training row kernel. `d` (the [`RowKernel`]'s row length) is given per op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainRow {
    /// `out [M, d] = a' . b'` in f32, one block per 64 x 64 tile of `out` ([`super::matmul`]: `a`'s
    /// and `b`'s slices staged in shared memory, 4 x 8 outputs a thread), each output's inner
    /// dimension summed sequentially (the reference's `matmul_t` order and bits): `a` is `[M, K]`,
    /// or `[K, M]` when `transpose_a`; `b` is `[K, d]`, or `[d, K]` when `transpose_b`. M and K are
    /// read from `a` (the grid's rows from `a`, or from `out` when `a` is transposed: a temporary
    /// output may have more rows). The training graph's f32 GEMMs (its f32 linears and head) on
    /// CUDA cores: the FP8 recipe's (whose outputs feed e4m3 roundings downstream), and the f32
    /// recipe's the tensor-core form does not take.
    Matmul { transpose_a: bool, transpose_b: bool },
    /// `y = x1 + x2` (f32 rows).
    Add,
    /// `y = x1 + x2` of vectors (`d` elements; one block): the losses' sum.
    AddFlat,
    /// `y = silu(gate) * up` of two f32 inputs, `silu(g) = g / (1 + exp(-g))`.
    SiluMul,
    /// The gradients of [`TrainRow::SiluMul`]: `d gate = dy * up * s * (1 + g * (1 - s))` with
    /// `s = sigmoid(g)`, `d up = dy * silu(g)`.
    SiluMulGrad,
    /// `y [rows, d]`: row r is `x[r * stride + start ..][..d]` of x read flat (all its dims
    /// collapsed): a column range of rows `stride` wide — the pieces of a split (also of a
    /// reshaped output: heads of a `[T, heads * stride]` matrix are rows of its `[T * heads,
    /// stride]` view), or of a concatenation's gradient.
    Columns { start: usize, stride: usize },
    /// `y[r, :] = x[r, start .. start + d]` for the rows of `x`, zeros for the rows of `y` past
    /// them (a temporary sized for the run's rows, longer than x: its tail then sums as zeros).
    Slice { start: usize },
    /// `y [d, R'] = x[:, start .. start + d]^T` for the `R` rows of `x` (`R'` >= `R`: y's columns
    /// past them are left as they are), or (`heads` > 0; `start` 0) of `x [R, heads, d / heads]`
    /// read as `[R, d]`: the attention kernels' operands along the keys (queries), which a warp
    /// then reads 32 consecutive keys at a time. 32 x 32 tiles through shared memory (reads and
    /// writes coalesced), a block per tile.
    Transpose { start: usize, heads: usize },
    /// `y = [x1 | x2]` (`d` and `second` columns) over the rows of `y` (the parts may be
    /// temporaries with more rows).
    Join { second: usize },
    /// Row copies between matrices of `d` columns: `into`, row r of `x` into row `r + shift` of
    /// `y` (one block per row of x); otherwise row `r + shift` of `x` into row r of `y` (one per
    /// row of y). `shift` is the row count of `off` when `shifted` (the rows before a
    /// concatenation's second part), else 0. A concatenation along rows and its gradient.
    RowRange { into: bool, shifted: bool },
    /// RoPE (or, `inverse`, its gradient: the same angles with the sine negated) of `x [T * heads,
    /// d]` (heads of `d` columns; row r is token r / heads) at each token's position, cos/sin from
    /// the table [`super::RowOp::Latent`] reads. Positions outside the table leave the row unwritten.
    Rope { heads: usize, interleave: bool, inverse: bool },
    /// Cross-entropy of each row of logits `[rows, d]` against its target (`targets [rows]`, i64):
    /// the row's max (NaN ignored, as `f32::max` does) and `sum exp(x - max)` as trees over the threads (f32; the reference sums in
    /// f64), then `grad`: `weight * ((softmax - onehot) / rows)` per column (`rows` from the
    /// targets); else `lse - x[target]` into `loss_rows [rows]` (for [`TrainRow::LossMean`]). A
    /// target outside the row reads column 0 (the runtime checks targets before launching).
    CrossEntropy { grad: bool, weight: f32 },
    /// `loss [1] = weight * (sum loss_rows / rows)`, the sum sequential in f64 (one block; `rows`
    /// from the first dim of `x` (the rows the losses are of), which may be fewer than the rows
    /// `loss_rows` holds).
    LossMean { weight: f32 },
    /// The experts' load frequencies of the balance loss: `freq[e] = count(idx == e) * E / (K *
    /// T)` over the selected experts `idx [T, K]` (i32; `d` = E): the pairs counted in chunks, then
    /// per expert `E / (K T)` added once per pair of it (the reference's sum).
    ExpertFreq,
    /// The sequence-wise balance loss per token (`d` = E): `s = sigmoid(logits)`, `weighted =
    /// sum(freq * s) / sum(s)` (sums sequential in the reference's order, by one thread), then
    /// `grad`: `dl = alpha / T * (freq - weighted) / sum(s) * s * (1 - s)`; else `weighted`
    /// into `loss_rows` (their mean times alpha is the loss: [`TrainRow::LossMean`]).
    /// `softmax` (DeepSeek-V2, `_sm`): `s = exp(logits - max)`, and `dl` without the `(1 - s)`.
    BalanceRows { grad: bool, alpha: f32, softmax: bool },
    /// The router logits' gradient per token (`d` = E) from the routing weights' gradient
    /// `dw [T, K]` of the selected experts `idx [T, K]`: zero but at the selected experts, where
    /// `scale * (dw / S - sum(dw * s) / S^2) * s * (1 - s)` (`norm`: normalized weights, `S` the
    /// selected scores' sum + 1e-20; else `scale * dw * s * (1 - s)`), by one thread per token.
    /// `softmax` (DeepSeek-V2, `_sm`): `s` the row's softmax and `dl_j = s_j (ds_j - sum_k ds_k
    /// s_{i_k})` with `ds = scale * dw` at the selected experts: every logit gets a gradient.
    RouteGrad { norm: bool, scale: f32, softmax: bool },
    /// Naive-form MLA attention, one block per (group of `group` queries, head) — the CUDA-core
    /// baseline ([`super::mla_train`]: each key's loads serve the group); blocks head-major (as
    /// the backward's), so that those running together read one head's keys and values, which L2
    /// then holds: scores over keys `0..=S - T + query` of `q_nope . k_nope + q_pe
    /// . k_pe` times the scale (`k_nope` from `kvb [S, heads * (nope + v)]`, the latent times
    /// kv_b^T computed before; `k_pe` the latent's last `rope` columns), softmax (the exponentials
    /// by every thread, each query's max and sum by one in the reference's order), `out [T, heads * v]`
    /// the probabilities times the values, each output a sequential sum over the keys.
    MlaForward(Mla),
    /// MLA's backward, per (group of queries, head): the forward's probabilities recomputed, `dp = dout .
    /// v`, `ds = p * (dp - sum(p * dp)) * scale`, then `d q_nope = ds . k_nope` and `d q_pe = ds .
    /// k_pe` (sums over the keys in order); the row's softmax max, sum and `sum(p * dp)` into
    /// `stats [T * heads, 3]` for [`TrainRow::MlaGradKv`].
    MlaGradQ(Mla),
    /// MLA's backward, per (group of `group` keys, head) of `dkvb`'s rows (a temporary: rows past
    /// the latent's are written as zeros): each query that sees the key has its `p` and `ds`
    /// recomputed from `stats`; then `dkvb` (the gradient of kvb: `ds . q_nope` for the key's
    /// columns, `p . dout` for its values) summed over the queries in order, and the head's part of
    /// the latent's rope columns' gradient (`ds . q_pe`) into `part [S * heads, rope]`.
    MlaGradKv(Mla),
    /// `y [rows, d]`: row r the sum over its `heads` rows of `part [rows * heads, d]`, in order.
    SumHeads { heads: usize },
    /// Flash attention's backward, before its kernels: per token row of `dout [T, heads, d]`, each
    /// head's row in bf16 head-major (`dob [heads * T, d]`, as the tensor cores read it) and
    /// `D = rowsum(bf16(dout) * o)` against the forward's head-major output `o [heads * T, d]` (`dd
    /// [heads * T]`, one thread's sequential sum per head) — the dout the kernels' `dP` sees, so that
    /// `dP - D` cancels where it should (one key: exactly `dP = D`, but for the sums' order).
    FlashDout { heads: usize },
    /// Flash attention's query gradient `dq [heads * T, d]` (head-major) back to token rows: its
    /// first `nope` columns per head into `dq_nope [T, heads, nope]`, the rest into `dq_pe`.
    FlashDq { heads: usize, nope: usize },
    /// Flash attention's key and value gradients (head-major `dk [heads * S, d]`, `dv [heads * S,
    /// v]`) back to key rows: `dkvb [S, heads * (nope + v)]` (kv_b's rows: per head its keys' nope
    /// columns, then its values) and the shared rope key's gradient `dpe [S, d - nope]`, the sum
    /// over the heads in order.
    FlashDkv { heads: usize, nope: usize, v: usize },
    /// The routed experts' hidden rows (f32 MoE, CUDA cores), one block per (token, slot) of
    /// `idx [T, k]`: `h = silu(x . gate_e^T) * (x . up_e^T)` (`d` = the experts' intermediate width;
    /// the stacked weights `[E * d, D]`), each product a sequential sum, into `h [T * k, d]`;
    /// `keep`: also the gate and up products into `g`, `u` (for the gradient).
    MoeHidden { k: usize, keep: bool },
    /// The routed experts' output per token (`d` = D): the token's slots in expert order (as the
    /// reference adds them), each `w * (h . down_e^T)`, summed into `y [T, D]`.
    MoeCombine { k: usize },
    /// 128x1 tiles over each expert's sorted pairs (`d` = columns), transposed for the Wgrad GEMM
    /// (K = the pairs): each expert's pairs cut in groups of 128 from its first, expert e's placed
    /// from column `padded[e]` ([`TrainRow::PadOffsets`]) of `q [d, P']` (column j of the expert the
    /// source row of its sorted pair j: row r itself, or `by_token` its token's), the group's last
    /// columns past the expert's pairs zeros; a group's scale per column in `scale [d, P' / 128]`.
    /// Blocks: 32 columns (a lane each: rows read 128 bytes at a time) x [`PAIR_GROUP_BLOCKS`], each
    /// warp taking every `warps x PAIR_GROUP_BLOCKS`-th group (the groups only the device counts).
    QuantizePairs { by_token: bool },
    /// The experts' pair columns padded to whole 128-pair groups (one block, `d` = E): `padded [E +
    /// 1]` the prefix sums of `ceil(n_e / 128) * 128` over the experts' pair counts in `offsets`.
    PadOffsets,
    /// The experts' backward per (token, slot) (`d` = the intermediate width): the expert's output
    /// `y = h . down_e^T` into a temporary, then `dh = (dy * w) . down_e` and SwiGLU's gradient into
    /// `gg`, `uu`; the routing weight's gradient `dy . y` by one thread.
    MoeGradToken { k: usize },
    /// The experts' input gradient per token (`d` = D): over its slots and the intermediate
    /// columns in order, `gg * gate_e + uu * up_e`.
    MoeGradX { k: usize },
    /// The (token, slot) pairs sorted by expert (one block, `d` = E): `offsets [E + 1]`, then each
    /// expert's pairs (`t * k + slot`) in token order into `pairs` — the pairs cut into chunks a
    /// thread each counts per expert, then places in order (as [`super::RowOp::Dispatch`]).
    PairSort,
    /// What the experts' grouped GEMMs read of the sorted pairs (one block, `d` = k, the slots per
    /// token; `w [T, k]` the routing weights): per sorted row r of pair p, its token `tok[r] = p /
    /// k` (the rows the gate/up GEMMs gather), its routing weight `wt[r]` (the down GEMM's row
    /// scale), and `pos[p] = r` (where [`TrainRow::PairCombine`] finds the pair's row).
    PairRows { k: usize },
    /// The routed experts' output per token (`d` = D) from the down GEMM's weighted rows in sorted
    /// order (`ys [T * k, D]`): the token's slots in expert order (as the reference adds them), each
    /// pair's row `pos[t * k + slot]`, summed from zero into `y [T, D]`. Deterministic: no atomics.
    /// `two`: each slot's term is `ys[q] + ys2[q]` (the input gradient through gate and up).
    PairCombine { k: usize, two: bool },
    /// The experts' backward per sorted row r (`d` = D; the grid: `y`'s rows, those past the real
    /// pairs, `dy`'s rows x k, do nothing): `dye[r] = dy[tok[r]] * wt[r]` (Dgrad's and Wgrad's
    /// operand) and, by one thread, the routing weight's gradient `dy[tok[r]] . y[r]` (the expert's
    /// unweighted output row) into `dw` at pair `pairs[r]`, summed in column order.
    PairGrad { k: usize },
    /// 128x128 block scales of stacked matrices of `matrix_rows` rows (`scale [E * ceil(rows /
    /// 128), d]`, [`TrainRow::QuantizeBlocks`]) as per-row scales `out [E * rows, d]`: each row its
    /// block's (what a grouped GEMM over experts of any row count reads). One block per row.
    RowScales { matrix_rows: usize },
    /// One expert's weight gradient (launched per expert with its two `offsets` and the sorted
    /// `pairs`), one block per row of the gradient: `Down`: `d down [D, I]` row o sums `(dy[t, o] *
    /// w) * h`; else `d gate` / `d up` `[I, D]` row i sums `gg[i] * x[t]` (or `uu`), over the
    /// expert's pairs in order.
    MoeGradW { down: bool },
    /// DeepSeek-V3's FP8 recipe: f32 rows (`d` columns) as e4m3 bytes `q` with 1x128 `scale`s
    /// (`max(|max|, 1e-4) / 448` per group), as the inference quantization does.
    Quantize,
    /// The recipe's f32 master weight `w [N, K]` in 128x128 e4m3 blocks (`scale = max(|max|,
    /// 1e-12) / 448` per block): one block per tile (the grid: `scale`'s rows times `tiles`, its
    /// columns); `transposed`: `q [K, N]` and `scale [K / 128, N / 128]` (what Dgrad reads).
    /// `matrix_rows` (0: N): w stacks matrices of that many rows (experts), each in blocks of its
    /// own (`scale` stacks theirs; transposed, each matrix is transposed in place in the stack).
    QuantizeBlocks { tiles: usize, transposed: bool, matrix_rows: usize },
    /// 128x1 tiles (128 tokens of one column) of `x [T, d]`, transposed — Wgrad's GEMM operands,
    /// 1x128 rows of `x^T`: `q [d, Tp]` (e4m3; columns `T..Tp` zero, `Tp` a multiple of 16 for
    /// TMA) and `scale [d, ceil(T/128)]` (`max(|max|, 1e-4) / 448` per group, as
    /// [`TrainRow::Quantize`]). The grid is `x`'s rows: block b < G * C (G groups, C = min(T / G,
    /// ceil(d / threads)) column chunks) quantizes group b mod G of chunk b / G, each thread a
    /// column (the others do nothing).
    QuantizeCols,
    /// RMSNorm's input gradient per row: with `r = 1 / sqrt(mean(x^2) + eps)`, `dx = r * dy * w -
    /// x * r^3 / d * sum(dy * w * x)`; also writes `r` per row for [`TrainRow::RmsNormDw`].
    RmsNormGrad { eps: f32 },
    /// RMSNorm's weight gradient `dw[i] = sum_rows dy * x * r` in row order (a thread per column,
    /// 32 a block).
    RmsNormDw,
    /// The tokens in order of their ids, a stable sort: `order[p]` is the token at position p of
    /// the window's tokens sorted by (id, token) — each token's position the count of the tokens
    /// before it in that order (a thread per token scanning the ids, `d` tokens a block).
    IdRank,
    /// The embedding table's gradient: row v of `out [V, d]` sums the `dy` rows of the tokens
    /// whose id is v, in token order — found by binary search in the tokens sorted by id
    /// ([`TrainRow::IdRank`]'s `order`), so that a row reads only its own tokens (one block per
    /// table row, a thread per column summing it from zero; no atomics: deterministic).
    EmbedGrad,
    /// The optimizer's gradient of a batch summed over its windows on the device (flat f32, a
    /// block taking `d` elements): `acc = g` (`first`: the first window's), else `acc += g`.
    GradAccum { first: bool },
    /// A flat f32 gradient's squares summed per block of `d` elements into `part [ceil(n / d)]`:
    /// each thread's strided share in order, then a tree over the threads (the host adds the parts
    /// in f64: the global norm that clipping divides by).
    SumSquares,
    /// AdamW per element of a flat f32 master `w` (a block taking `d` elements, updated in place)
    /// from the summed gradient `g` and the bf16 moments `m`, `v` (updated in place), the step's
    /// scalars in `hyper` ([`v3c_runtime::lowering::ADAMW_HYPER`] of them: the gradient's scale
    /// (clip / windows), lr, b1, 1 - b1, b2, 1 - b2, the bias corrections 1 - b1^t and 1 - b2^t,
    /// eps, the weight decay) — the trainer's arithmetic (`v3c_models::train`), each moment rounded
    /// to bf16 (nearest even) as stored.
    AdamW,
}

impl TrainRow {
    /// The name's op part and its parameters after `_d<d>` (without the block size).
    pub(super) fn kernel_name(&self, d: usize, weight: &str, threads: usize) -> String {
        let t = threads;
        match *self {
            TrainRow::Matmul { transpose_a, transpose_b } => {
                let layout = |t: bool| if t { 't' } else { 'n' };
                format!("rows_matmul_d{d}_{}{}_t{t}", layout(transpose_a), layout(transpose_b))
            }
            TrainRow::Add => format!("rows_add_d{d}_t{t}"),
            TrainRow::AddFlat => format!("rows_addflat_d{d}_t{t}"),
            // bf16 rows: the selected rows' attention's key rows (`_sel16`).
            TrainRow::Slice { start } if weight == "bf16" => format!("rows_slice_bf16_d{d}_o{start}_t{t}"),
            TrainRow::Slice { start } => format!("rows_slice_d{d}_o{start}_t{t}"),
            TrainRow::Transpose { start, heads: 0 } => format!("rows_transpose_d{d}_o{start}_t{t}"),
            TrainRow::Transpose { heads, .. } => format!("rows_transpose_d{d}_h{heads}_t{t}"),
            TrainRow::Join { second } => format!("rows_join_d{d}_b{second}_t{t}"),
            TrainRow::RowRange { into, shifted } => {
                let dir = if into { "into" } else { "from" };
                let shifted = if shifted { "_shifted" } else { "" };
                format!("rows_rowrange_d{d}_{dir}{shifted}_t{t}")
            }
            TrainRow::SiluMul => format!("rows_silumulpair_d{d}_t{t}"),
            TrainRow::SiluMulGrad => format!("rows_silumulgrad_d{d}_t{t}"),
            TrainRow::Columns { start, stride } => format!("rows_columns_d{d}_o{start}_s{stride}_t{t}"),
            TrainRow::Rope { heads, interleave, inverse } => {
                let layout = if interleave { "_il" } else { "" };
                let inverse = if inverse { "_inv" } else { "" };
                format!("rows_rope_d{d}_h{heads}_t{t}{layout}{inverse}")
            }
            TrainRow::RmsNormGrad { eps } => {
                let eps = format!("{eps:e}").replace('-', "m").replace('.', "p");
                format!("rows_rmsnormgrad_{weight}_d{d}_t{t}_eps{eps}")
            }
            TrainRow::RmsNormDw => format!("rows_rmsnormdw_d{d}_t{t}"),
            // bf16 rows: the prefill attention's bf16 latent cache.
            TrainRow::Quantize if weight == "bf16" => format!("rows_quantize_bf16_d{d}_t{t}"),
            TrainRow::Quantize => format!("rows_quantize_d{d}_t{t}"),
            TrainRow::QuantizeBlocks { tiles, transposed, matrix_rows } => {
                let stacked = if matrix_rows > 0 { format!("_m{matrix_rows}") } else { String::new() };
                format!("rows_qblocks_d{d}_b{tiles}_t{t}{}{stacked}", if transposed { "_tr" } else { "" })
            }
            TrainRow::QuantizeCols => format!("rows_qcolst_d{d}_t{t}"),
            TrainRow::MoeHidden { k, keep } => {
                format!("rows_moehidden_d{d}_k{k}_t{t}{}", if keep { "_keep" } else { "" })
            }
            TrainRow::MoeCombine { k } => format!("rows_moecombine_d{d}_k{k}_t{t}"),
            TrainRow::QuantizePairs { by_token } => {
                format!("rows_qpairs_d{d}_t{t}{}", if by_token { "_tokens" } else { "" })
            }
            TrainRow::PadOffsets => format!("rows_padoffsets_d{d}_t{t}"),
            TrainRow::MoeGradToken { k } => format!("rows_moegradtoken_d{d}_k{k}_t{t}"),
            TrainRow::MoeGradX { k } => format!("rows_moegradx_d{d}_k{k}_t{t}"),
            TrainRow::PairSort => format!("rows_pairsort_d{d}_t{t}"),
            TrainRow::PairRows { k } => format!("rows_pairrows_d{d}_k{k}_t{t}"),
            TrainRow::PairCombine { k, two } => {
                format!("rows_paircombine_d{d}_k{k}_t{t}{}", if two { "_two" } else { "" })
            }
            TrainRow::PairGrad { k } => format!("rows_pairgrad_d{d}_k{k}_t{t}"),
            TrainRow::RowScales { matrix_rows } => format!("rows_rowscales_d{d}_m{matrix_rows}_t{t}"),
            TrainRow::MoeGradW { down } => format!("rows_moegradw_d{d}_t{t}_{}", if down { "down" } else { "in" }),
            TrainRow::MlaForward(m) => format!("rows_mlafwd_{}_t{t}", m.name()),
            TrainRow::MlaGradQ(m) => format!("rows_mlagradq_{}_t{t}", m.name()),
            TrainRow::MlaGradKv(m) => format!("rows_mlagradkv_{}_t{t}", m.name()),
            TrainRow::SumHeads { heads } => format!("rows_sumheads_d{d}_h{heads}_t{t}"),
            TrainRow::FlashDout { heads } => format!("rows_flashdout_d{d}_h{heads}_t{t}"),
            TrainRow::FlashDq { heads, nope } => format!("rows_flashdq_d{d}_h{heads}_n{nope}_t{t}"),
            TrainRow::FlashDkv { heads, nope, v } => format!("rows_flashdkv_d{d}_h{heads}_n{nope}_v{v}_t{t}"),
            TrainRow::CrossEntropy { grad, weight } => {
                format!("rows_xent_d{d}_w{}_t{t}_{}", spelled(weight), if grad { "grad" } else { "loss" })
            }
            TrainRow::LossMean { weight } => format!("rows_lossmean_d{d}_w{}_t{t}", spelled(weight)),
            TrainRow::ExpertFreq => format!("rows_expertfreq_d{d}_t{t}"),
            TrainRow::BalanceRows { grad, alpha, softmax } => format!(
                "rows_balance_d{d}_a{}_t{t}_{}{}",
                spelled(alpha),
                if grad { "grad" } else { "loss" },
                if softmax { "_sm" } else { "" }
            ),
            TrainRow::RouteGrad { norm, scale, softmax } => format!(
                "rows_routegrad_d{d}_s{}_t{t}{}",
                spelled(scale),
                match (norm, softmax) {
                    (true, _) => "_norm",
                    (false, true) => "_sm",
                    (false, false) => "",
                }
            ),
            TrainRow::IdRank => format!("rows_idrank_d{d}_t{t}"),
            TrainRow::EmbedGrad => format!("rows_embedgrad_d{d}_t{t}"),
            TrainRow::GradAccum { first } => format!("rows_gradacc_d{d}_t{t}{}", if first { "_first" } else { "" }),
            TrainRow::SumSquares => format!("rows_sumsq_d{d}_t{t}"),
            TrainRow::AdamW => format!("rows_adamw_d{d}_t{t}"),
        }
    }

    /// The kernel a [`TrainRow::kernel_name`] names (checked by the caller: the name must round-trip).
    pub(super) fn from_name(name: &str) -> Option<RowKernel> {
        let rest = name.strip_prefix("rows_")?;
        let parts: Vec<&str> = rest.split('_').collect();
        let number = |part: &str, prefix: &str| -> Option<usize> { part.strip_prefix(prefix)?.parse().ok() };
        // An optional last part: Some(true) when it is `tag`, Some(false) when absent.
        let suffix = |rest: &[&str], tag: &str| -> Option<bool> {
            match rest {
                [part] if *part == tag => Some(true),
                [] => Some(false),
                _ => None,
            }
        };
        let kernel = |op: TrainRow, d: &str, weight: &str, t: &str| -> Option<RowKernel> {
            Some(RowKernel {
                op: super::RowOp::Train(op),
                d: number(d, "d")?,
                weight: weight.to_string(),
                threads: number(t, "t")?,
            })
        };
        match &parts[..] {
            ["matmul", d, layout, t] => {
                let (transpose_a, transpose_b) = match *layout {
                    "nn" => (false, false),
                    "nt" => (false, true),
                    "tn" => (true, false),
                    "tt" => (true, true),
                    _ => return None,
                };
                kernel(TrainRow::Matmul { transpose_a, transpose_b }, d, "f32", t)
            }
            ["add", d, t] => kernel(TrainRow::Add, d, "f32", t),
            ["addflat", d, t] => kernel(TrainRow::AddFlat, d, "f32", t),
            ["slice", d, o, t] => kernel(TrainRow::Slice { start: number(o, "o")? }, d, "f32", t),
            ["slice", "bf16", d, o, t] => kernel(TrainRow::Slice { start: number(o, "o")? }, d, "bf16", t),
            ["transpose", d, o, t] if o.starts_with('o') => {
                kernel(TrainRow::Transpose { start: number(o, "o")?, heads: 0 }, d, "f32", t)
            }
            ["transpose", d, h, t] => kernel(TrainRow::Transpose { start: 0, heads: number(h, "h")? }, d, "f32", t),
            ["join", d, b, t] => kernel(TrainRow::Join { second: number(b, "b")? }, d, "f32", t),
            ["rowrange", d, dir, rest @ ..] => {
                let into = match *dir {
                    "into" => true,
                    "from" => false,
                    _ => return None,
                };
                let (shifted, t) = match rest {
                    ["shifted", t] => (true, t),
                    [t] => (false, t),
                    _ => return None,
                };
                kernel(TrainRow::RowRange { into, shifted }, d, "f32", t)
            }
            ["silumulpair", d, t] => kernel(TrainRow::SiluMul, d, "f32", t),
            ["silumulgrad", d, t] => kernel(TrainRow::SiluMulGrad, d, "f32", t),
            ["columns", d, o, st, t] => {
                kernel(TrainRow::Columns { start: number(o, "o")?, stride: number(st, "s")? }, d, "f32", t)
            }
            ["rope", d, h, t, flags @ ..] => {
                let (interleave, inverse) = match flags {
                    [] => (false, false),
                    ["il"] => (true, false),
                    ["inv"] => (false, true),
                    ["il", "inv"] => (true, true),
                    _ => return None,
                };
                kernel(TrainRow::Rope { heads: number(h, "h")?, interleave, inverse }, d, "f32", t)
            }
            ["rmsnormgrad", w, d, t, eps] => {
                let eps = eps.strip_prefix("eps")?.replace('m', "-").replace('p', ".").parse().ok()?;
                kernel(TrainRow::RmsNormGrad { eps }, d, w, t)
            }
            ["rmsnormdw", d, t] => kernel(TrainRow::RmsNormDw, d, "f32", t),
            ["quantize", d, t] => kernel(TrainRow::Quantize, d, "f32", t),
            ["quantize", "bf16", d, t] => kernel(TrainRow::Quantize, d, "bf16", t),
            ["qblocks", d, b, t, rest @ ..] => {
                let (transposed, rest) = match rest {
                    ["tr", rest @ ..] => (true, rest),
                    rest => (false, rest),
                };
                let matrix_rows = match rest {
                    [m] => number(m, "m")?,
                    [] => 0,
                    _ => return None,
                };
                kernel(TrainRow::QuantizeBlocks { tiles: number(b, "b")?, transposed, matrix_rows }, d, "f32", t)
            }
            ["qcolst", d, t] => kernel(TrainRow::QuantizeCols, d, "f32", t),
            [kind @ ("mlafwd" | "mlagradq" | "mlagradkv"), rest @ .., t] => {
                let m = Mla::parse(rest)?;
                let op = match *kind {
                    "mlafwd" => TrainRow::MlaForward(m),
                    "mlagradq" => TrainRow::MlaGradQ(m),
                    _ => TrainRow::MlaGradKv(m),
                };
                kernel(op, &format!("d{}", m.kv), "f32", t)
            }
            ["sumheads", d, h, t] => kernel(TrainRow::SumHeads { heads: number(h, "h")? }, d, "f32", t),
            ["flashdout", d, h, t] => kernel(TrainRow::FlashDout { heads: number(h, "h")? }, d, "f32", t),
            ["flashdq", d, h, n, t] => {
                kernel(TrainRow::FlashDq { heads: number(h, "h")?, nope: number(n, "n")? }, d, "f32", t)
            }
            ["flashdkv", d, h, n, v, t] => {
                let op = TrainRow::FlashDkv { heads: number(h, "h")?, nope: number(n, "n")?, v: number(v, "v")? };
                kernel(op, d, "f32", t)
            }
            ["moehidden", d, k, t, rest @ ..] => {
                let keep = suffix(rest, "keep")?;
                kernel(TrainRow::MoeHidden { k: number(k, "k")?, keep }, d, "f32", t)
            }
            ["moecombine", d, k, t] => kernel(TrainRow::MoeCombine { k: number(k, "k")? }, d, "f32", t),
            ["qpairs", d, t, rest @ ..] => {
                let by_token = suffix(rest, "tokens")?;
                kernel(TrainRow::QuantizePairs { by_token }, d, "f32", t)
            }
            ["padoffsets", d, t] => kernel(TrainRow::PadOffsets, d, "f32", t),
            ["moegradtoken", d, k, t] => kernel(TrainRow::MoeGradToken { k: number(k, "k")? }, d, "f32", t),
            ["moegradx", d, k, t] => kernel(TrainRow::MoeGradX { k: number(k, "k")? }, d, "f32", t),
            ["pairsort", d, t] => kernel(TrainRow::PairSort, d, "f32", t),
            ["pairrows", d, k, t] => kernel(TrainRow::PairRows { k: number(k, "k")? }, d, "f32", t),
            ["paircombine", d, k, t, rest @ ..] => {
                let two = suffix(rest, "two")?;
                kernel(TrainRow::PairCombine { k: number(k, "k")?, two }, d, "f32", t)
            }
            ["pairgrad", d, k, t] => kernel(TrainRow::PairGrad { k: number(k, "k")? }, d, "f32", t),
            ["rowscales", d, m, t] => kernel(TrainRow::RowScales { matrix_rows: number(m, "m")? }, d, "f32", t),
            ["moegradw", d, t, kind] => {
                let down = match *kind {
                    "down" => true,
                    "in" => false,
                    _ => return None,
                };
                kernel(TrainRow::MoeGradW { down }, d, "f32", t)
            }
            ["xent", d, w, t, mode] => {
                let grad = match *mode {
                    "grad" => true,
                    "loss" => false,
                    _ => return None,
                };
                kernel(TrainRow::CrossEntropy { grad, weight: unspelled(w.strip_prefix('w')?)? }, d, "f32", t)
            }
            ["lossmean", d, w, t] => {
                kernel(TrainRow::LossMean { weight: unspelled(w.strip_prefix('w')?)? }, d, "f32", t)
            }
            ["expertfreq", d, t] => kernel(TrainRow::ExpertFreq, d, "f32", t),
            ["balance", d, a, t, mode, rest @ ..] => {
                let grad = match *mode {
                    "grad" => true,
                    "loss" => false,
                    _ => return None,
                };
                let (alpha, softmax) = (unspelled(a.strip_prefix('a')?)?, suffix(rest, "sm")?);
                kernel(TrainRow::BalanceRows { grad, alpha, softmax }, d, "f32", t)
            }
            ["routegrad", d, sc, t, rest @ ..] => {
                let (norm, softmax) = match rest {
                    ["norm"] => (true, false),
                    ["sm"] => (false, true),
                    [] => (false, false),
                    _ => return None,
                };
                kernel(TrainRow::RouteGrad { norm, scale: unspelled(sc.strip_prefix('s')?)?, softmax }, d, "f32", t)
            }
            ["idrank", d, t] => kernel(TrainRow::IdRank, d, "f32", t),
            ["embedgrad", d, t] => kernel(TrainRow::EmbedGrad, d, "f32", t),
            ["gradacc", d, t, rest @ ..] => kernel(TrainRow::GradAccum { first: suffix(rest, "first")? }, d, "f32", t),
            ["sumsq", d, t] => kernel(TrainRow::SumSquares, d, "f32", t),
            ["adamw", d, t] => kernel(TrainRow::AdamW, d, "f32", t),
            _ => None,
        }
    }

    /// The kernel's arguments in order (name, memref type): inputs, then results.
    pub(super) fn arguments(&self, weight: &str) -> Vec<(&'static str, String)> {
        let rows = || "memref<?x?xf32>".to_string();
        let flat = || "memref<?xf32>".to_string();
        match self {
            TrainRow::Matmul { .. } => vec![("a", rows()), ("b", rows()), ("out", rows())],
            TrainRow::Add | TrainRow::Join { .. } => vec![("x1", rows()), ("x2", rows()), ("y", rows())],
            TrainRow::Slice { .. } if weight == "bf16" => vec![("x", rows()), ("y", "memref<?x?xbf16>".into())],
            TrainRow::Slice { .. } | TrainRow::Transpose { heads: 0, .. } => vec![("x", rows()), ("y", rows())],
            TrainRow::Transpose { .. } => vec![("x", "memref<?x?x?xf32>".into()), ("y", rows())],
            TrainRow::AddFlat => {
                let v = || "memref<?xf32>".to_string();
                vec![("x1", v()), ("x2", v()), ("y", v())]
            }
            TrainRow::RowRange { shifted: true, .. } => vec![("x", rows()), ("off", rows()), ("y", rows())],
            TrainRow::RowRange { shifted: false, .. } => vec![("x", rows()), ("y", rows())],
            TrainRow::SiluMul => vec![("gate", rows()), ("up", rows()), ("y", rows())],
            TrainRow::SiluMulGrad => {
                vec![("gate", rows()), ("up", rows()), ("dy", rows()), ("dgate", rows()), ("dup", rows())]
            }
            TrainRow::Columns { .. } => vec![("x", "memref<?xf32>".into()), ("y", rows())],
            TrainRow::Rope { .. } => {
                vec![("x", rows()), ("positions", "memref<?xi64>".into()), ("rope", rows()), ("y", rows())]
            }
            TrainRow::RmsNormGrad { .. } => vec![
                ("x", rows()),
                ("w", format!("memref<?x{weight}>")),
                ("dy", rows()),
                ("dx", rows()),
                ("r", "memref<?xf32>".into()),
            ],
            TrainRow::RmsNormDw => {
                vec![("x", rows()), ("dy", rows()), ("r", "memref<?xf32>".into()), ("dw", "memref<?xf32>".into())]
            }
            TrainRow::IdRank => vec![("ids", "memref<?xi64>".into()), ("order", "memref<?xi32>".into())],
            TrainRow::EmbedGrad => vec![
                ("ids", "memref<?xi64>".into()),
                ("order", "memref<?xi32>".into()),
                ("dy", rows()),
                ("out", rows()),
            ],
            TrainRow::GradAccum { .. } => vec![("g", flat()), ("acc", flat())],
            TrainRow::SumSquares => vec![("g", flat()), ("part", flat())],
            TrainRow::AdamW => vec![
                ("w", flat()),
                ("g", flat()),
                ("m", "memref<?xbf16>".into()),
                ("v", "memref<?xbf16>".into()),
                ("hyper", flat()),
            ],
            TrainRow::MlaForward(_) | TrainRow::MlaGradQ(_) | TrainRow::MlaGradKv(_) => {
                let heads = || "memref<?x?x?xf32>".to_string();
                let mut args = vec![("q_nope", heads()), ("q_pe", heads()), ("latent", rows()), ("kvb", rows())];
                // Transposed along the keys (queries): what a thread per key (query) reads.
                match self {
                    TrainRow::MlaGradKv(_) => args.extend([("qnt", rows()), ("qpt", rows()), ("doutt", rows())]),
                    _ => args.extend([("kvbt", rows()), ("latt", rows())]),
                }
                match self {
                    TrainRow::MlaForward(_) => args.push(("out", rows())),
                    TrainRow::MlaGradQ(_) => {
                        args.extend([("dout", heads()), ("dq_nope", heads()), ("dq_pe", heads()), ("stats", rows())])
                    }
                    _ => args.extend([("dout", heads()), ("stats", rows()), ("dkvb", rows()), ("part", rows())]),
                }
                args
            }
            TrainRow::SumHeads { .. } => vec![("part", rows()), ("y", rows())],
            TrainRow::FlashDout { .. } => vec![
                ("dout", "memref<?x?x?xf32>".into()),
                ("o", rows()),
                ("dob", "memref<?x?xbf16>".into()),
                ("dd", flat()),
            ],
            TrainRow::FlashDq { .. } => {
                vec![("dq", rows()), ("dq_nope", "memref<?x?x?xf32>".into()), ("dq_pe", "memref<?x?x?xf32>".into())]
            }
            TrainRow::FlashDkv { .. } => vec![("dk", rows()), ("dv", rows()), ("dkvb", rows()), ("dpe", rows())],
            TrainRow::Quantize if weight == "bf16" => {
                vec![("x", "memref<?x?xbf16>".into()), ("q", "memref<?x?xi8>".into()), ("scale", rows())]
            }
            TrainRow::Quantize | TrainRow::QuantizeCols => {
                vec![("x", rows()), ("q", "memref<?x?xi8>".into()), ("scale", rows())]
            }
            TrainRow::QuantizeBlocks { .. } => vec![("w", rows()), ("q", "memref<?x?xi8>".into()), ("scale", rows())],
            TrainRow::MoeHidden { keep, .. } => {
                let mut args = vec![
                    ("x", rows()),
                    ("idx", "memref<?x?xi32>".into()),
                    ("gate", rows()),
                    ("up", rows()),
                    ("h", rows()),
                ];
                if *keep {
                    args.extend([("g", rows()), ("u", rows())]);
                }
                args
            }
            TrainRow::MoeCombine { .. } => {
                vec![("h", rows()), ("idx", "memref<?x?xi32>".into()), ("w", rows()), ("down", rows()), ("y", rows())]
            }
            TrainRow::QuantizePairs { .. } => vec![
                ("offsets", "memref<?xi32>".into()),
                ("padded", "memref<?xi32>".into()),
                ("pairs", "memref<?xi32>".into()),
                ("w", rows()),
                ("src", rows()),
                ("q", "memref<?x?xi8>".into()),
                ("scale", rows()),
            ],
            TrainRow::PadOffsets => vec![("offsets", "memref<?xi32>".into()), ("padded", "memref<?xi32>".into())],
            TrainRow::MoeGradToken { .. } => vec![
                ("dy", rows()),
                ("idx", "memref<?x?xi32>".into()),
                ("w", rows()),
                ("down", rows()),
                ("g", rows()),
                ("u", rows()),
                ("h", rows()),
                ("y", rows()),
                ("gg", rows()),
                ("uu", rows()),
                ("dw", rows()),
            ],
            TrainRow::MoeGradX { .. } => vec![
                ("gg", rows()),
                ("uu", rows()),
                ("idx", "memref<?x?xi32>".into()),
                ("gate", rows()),
                ("up", rows()),
                ("dx", rows()),
            ],
            TrainRow::PairSort => vec![
                ("idx", "memref<?x?xi32>".into()),
                ("offsets", "memref<?xi32>".into()),
                ("pairs", "memref<?xi32>".into()),
            ],
            TrainRow::PairRows { .. } => vec![
                ("pairs", "memref<?xi32>".into()),
                ("w", rows()),
                ("tok", "memref<?xi32>".into()),
                ("wt", "memref<?xf32>".into()),
                ("pos", "memref<?xi32>".into()),
            ],
            TrainRow::PairCombine { two, .. } => {
                let mut args = vec![("ys", rows())];
                if *two {
                    args.push(("ys2", rows()));
                }
                args.extend([("idx", "memref<?x?xi32>".into()), ("pos", "memref<?xi32>".into()), ("y", rows())]);
                args
            }
            TrainRow::PairGrad { .. } => vec![
                ("dy", rows()),
                ("y", rows()),
                ("tok", "memref<?xi32>".into()),
                ("wt", "memref<?xf32>".into()),
                ("pairs", "memref<?xi32>".into()),
                ("dye", rows()),
                ("dw", rows()),
            ],
            TrainRow::RowScales { .. } => vec![("scale", rows()), ("out", rows())],
            TrainRow::MoeGradW { down } => vec![
                ("offsets", "memref<?xi32>".into()),
                ("pairs", "memref<?xi32>".into()),
                ("w", rows()),
                (if *down { "h" } else { "src" }, rows()),
                (if *down { "dy" } else { "x" }, rows()),
                ("out", rows()),
            ],
            TrainRow::CrossEntropy { grad: true, .. } => {
                vec![("logits", rows()), ("targets", "memref<?xi64>".into()), ("dlogits", rows())]
            }
            TrainRow::CrossEntropy { grad: false, .. } => {
                vec![("logits", rows()), ("targets", "memref<?xi64>".into()), ("loss_rows", "memref<?xf32>".into())]
            }
            TrainRow::ExpertFreq => vec![("idx", "memref<?x?xi32>".into()), ("freq", "memref<?xf32>".into())],
            TrainRow::BalanceRows { grad, .. } => vec![
                ("logits", rows()),
                ("freq", "memref<?xf32>".into()),
                if *grad { ("dl", rows()) } else { ("loss_rows", "memref<?xf32>".into()) },
            ],
            TrainRow::RouteGrad { .. } => {
                vec![("logits", rows()), ("idx", "memref<?x?xi32>".into()), ("dw", rows()), ("dl", rows())]
            }
            TrainRow::LossMean { .. } => {
                vec![("x", rows()), ("loss_rows", "memref<?xf32>".into()), ("loss", "memref<?xf32>".into())]
            }
        }
    }

    /// The argument whose first dimension is the grid (None: one block).
    pub(super) fn rows_argument(&self) -> Option<&'static str> {
        Some(match self {
            TrainRow::CrossEntropy { .. } => "logits",
            TrainRow::MlaForward(_) | TrainRow::MlaGradQ(_) => "q_nope",
            TrainRow::MlaGradKv(_) => "dkvb",
            TrainRow::SumHeads { .. } => "y",
            TrainRow::FlashDout { .. } => "dout",
            TrainRow::FlashDq { .. } => "dq_nope",
            TrainRow::FlashDkv { .. } => "dkvb",
            TrainRow::Quantize | TrainRow::QuantizeCols => "x",
            TrainRow::QuantizeBlocks { .. } => "scale",
            TrainRow::MoeHidden { .. } => "x",
            TrainRow::MoeCombine { .. } => "y",
            // 32 columns (of the transposed scales' rows) a block.
            TrainRow::QuantizePairs { .. } => "scale",
            TrainRow::MoeGradToken { .. } => "dy",
            TrainRow::MoeGradX { .. } => "dx",
            TrainRow::PairSort | TrainRow::PairRows { .. } | TrainRow::PadOffsets => return None,
            TrainRow::PairCombine { .. } | TrainRow::PairGrad { .. } => "y",
            TrainRow::RowScales { .. } => "out",
            TrainRow::MoeGradW { .. } => "out",
            TrainRow::LossMean { .. } | TrainRow::ExpertFreq | TrainRow::AddFlat => return None,
            TrainRow::BalanceRows { .. } | TrainRow::RouteGrad { .. } => "logits",
            TrainRow::Matmul { transpose_a: false, .. } => "a",
            TrainRow::Matmul { transpose_a: true, .. } | TrainRow::EmbedGrad => "out",
            TrainRow::IdRank => "ids",
            TrainRow::Add => "x1",
            TrainRow::RowRange { into: true, .. } => "x",
            TrainRow::RowRange { into: false, .. } => "y",
            TrainRow::SiluMul | TrainRow::SiluMulGrad => "gate",
            TrainRow::Columns { .. } | TrainRow::Slice { .. } | TrainRow::Join { .. } => "y",
            TrainRow::Transpose { .. } => "x",
            TrainRow::Rope { .. } | TrainRow::RmsNormGrad { .. } => "x",
            TrainRow::RmsNormDw => "dw",
            // A block per `d` elements.
            TrainRow::GradAccum { .. } | TrainRow::SumSquares => "g",
            TrainRow::AdamW => "w",
        })
    }

    /// Shared arrays (name, f32 elements).
    pub(super) fn shared(&self, d: usize, threads: usize) -> Vec<(&'static str, usize)> {
        match self {
            TrainRow::RmsNormGrad { .. } => vec![("sh_sum", threads), ("sh_dot", threads)],
            TrainRow::SumSquares => vec![("sh_sum", threads)],
            TrainRow::CrossEntropy { .. } => vec![("sh_max", threads), ("sh_sum", threads)],
            // The group's scores (probabilities, their gradients), its queries (keys) and their
            // output gradients, the running maxima and sums.
            TrainRow::MlaForward(m) => {
                vec![("sh_p", m.group * m.context), ("sh_q", m.group * (m.nope + m.rope)), ("sh_red", 4 * m.group)]
            }
            TrainRow::MlaGradQ(m) => vec![
                ("sh_p", m.group * m.context),
                ("sh_dp", m.group * m.context),
                ("sh_q", m.group * (m.nope + m.rope)),
                ("sh_g", m.group * m.v),
                ("sh_red", 4 * m.group),
            ],
            TrainRow::MlaGradKv(m) => vec![
                ("sh_pi", m.group * m.context),
                ("sh_dsi", m.group * m.context),
                ("sh_k", m.group * (m.nope + m.v + m.rope)),
            ],
            TrainRow::MoeCombine { k } | TrainRow::PairCombine { k, .. } => vec![("sh_order", *k)],
            TrainRow::Matmul { .. } => super::matmul::shared(),
            TrainRow::Transpose { .. } => vec![("sh_tr", TRANSPOSE_TILE * (TRANSPOSE_TILE + 1))],
            TrainRow::Quantize => {
                let groups = d.div_ceil(super::GROUP);
                vec![("sh_amax", groups * AMAX_PARTS), ("sh_scale", groups)]
            }
            TrainRow::QuantizeBlocks { .. } => vec![("sh_amax", threads)],
            TrainRow::PairSort => vec![("sh_count", d), ("sh_off", d), ("sh_cc", super::pair_chunks(d) * d)],
            TrainRow::ExpertFreq => vec![("sh_cc", super::pair_chunks(d) * d)],
            _ => Vec::new(),
        }
    }

    /// Threads per block for rows of `d` columns.
    pub(super) fn threads(&self, d: usize) -> usize {
        match self {
            // One thread sums a column.
            TrainRow::RmsNormDw | TrainRow::LossMean { .. } => 32,
            // A thread per token.
            TrainRow::IdRank => d,
            TrainRow::MlaForward(_) | TrainRow::MlaGradQ(_) | TrainRow::MlaGradKv(_) => 128,
            // A thread per head (its sum of d products); the others move heads x d values a row.
            TrainRow::FlashDout { heads } => heads.next_power_of_two().clamp(32, 256),
            TrainRow::FlashDq { heads, .. } | TrainRow::FlashDkv { heads, .. } => {
                (heads * d / 8).next_power_of_two().clamp(32, 256)
            }
            TrainRow::Matmul { .. } => super::matmul::THREADS,
            TrainRow::Transpose { .. } => 256,
            // A 128x128 tile per block; every sorted pair in one block.
            TrainRow::QuantizeBlocks { .. } | TrainRow::PairRows { .. } => 256,
            // One thread per expert; one thread per token does the rest.
            TrainRow::ExpertFreq
            | TrainRow::PairSort
            | TrainRow::PadOffsets
            | TrainRow::BalanceRows { .. }
            | TrainRow::RouteGrad { .. } => d.next_power_of_two().clamp(32, 256),
            _ => (d / 8).next_power_of_two().clamp(32, 256),
        }
    }

    /// Whether the CPU lowering needs the e4m3 helpers.
    pub(super) fn encodes_fp8(&self) -> bool {
        matches!(
            self,
            TrainRow::Quantize
                | TrainRow::QuantizeBlocks { .. }
                | TrainRow::QuantizeCols
                | TrainRow::QuantizePairs { .. }
        )
    }

    /// Blocks per row of the rows argument (attention: one per head).
    pub(super) fn blocks_per_row(&self, d: usize) -> usize {
        match self {
            TrainRow::Matmul { .. } => d.div_ceil(super::matmul::TILE),
            TrainRow::Transpose { .. } => d.div_ceil(TRANSPOSE_TILE),
            TrainRow::MlaForward(m) | TrainRow::MlaGradQ(m) | TrainRow::MlaGradKv(m) => m.heads,
            TrainRow::MoeHidden { k, .. } | TrainRow::MoeGradToken { k } => *k,
            TrainRow::QuantizeBlocks { tiles, .. } => *tiles,
            TrainRow::QuantizePairs { .. } => PAIR_GROUP_BLOCKS,
            _ => 1,
        }
    }

    /// Rows of the rows argument a block takes (of `d` columns).
    pub(super) fn rows_per_block(&self, d: usize) -> usize {
        match self {
            // 32 columns of the transposed scales; of dw.
            TrainRow::QuantizePairs { .. } | TrainRow::RmsNormDw => 32,
            // A thread per token.
            TrainRow::IdRank => d,
            // Elements of a flat tensor.
            TrainRow::GradAccum { .. } | TrainRow::SumSquares | TrainRow::AdamW => d,
            TrainRow::Matmul { .. } => super::matmul::TILE,
            TrainRow::Transpose { .. } => TRANSPOSE_TILE,
            // Queries (keys) of a group.
            TrainRow::MlaForward(m) | TrainRow::MlaGradQ(m) | TrainRow::MlaGradKv(m) => m.group,
            _ => 1,
        }
    }

    /// Why the kernel cannot be generated, if it cannot.
    pub(super) fn check(&self, name: &str, d: usize) -> Result<(), String> {
        if *self == TrainRow::IdRank && !(d.is_power_of_two() && (32..=1024).contains(&d)) {
            return Err(format!("{name}: {d} tokens a block (a thread each: a power of two, 32 to 1024)"));
        }
        if let TrainRow::Columns { start, stride } = self {
            if start + d > *stride {
                return Err(format!("{name}: columns {start}..{} of rows {stride} wide", start + d));
            }
        }
        if let TrainRow::Rope { heads, .. } = self {
            if *heads == 0 {
                return Err(format!("{name}: rows of 0 heads"));
            }
        }
        if let TrainRow::FlashDout { heads } | TrainRow::FlashDq { heads, .. } | TrainRow::FlashDkv { heads, .. } = self
        {
            let nope = match self {
                TrainRow::FlashDq { nope, .. } | TrainRow::FlashDkv { nope, .. } => *nope,
                _ => 0,
            };
            if *heads == 0 || nope >= d {
                return Err(format!("{name}: {heads} heads of {d} columns, {nope} of them nope"));
            }
        }
        if let TrainRow::Transpose { start, heads } = self {
            if *heads > 0 && (*start != 0 || d % heads != 0) {
                return Err(format!("{name}: {d} columns of {heads} heads from column {start}"));
            }
        }
        if let TrainRow::MlaForward(m) | TrainRow::MlaGradQ(m) | TrainRow::MlaGradKv(m) = self {
            if !(1..=Mla::MAX_GROUP).contains(&m.group) || m.context == 0 {
                let most = Mla::MAX_GROUP;
                return Err(format!("{name}: groups of {} (1 to {most}) and {} keys at a time", m.group, m.context));
            }
        }
        Ok(())
    }

    /// Constants the phases use (beyond `%c0`, `%c1`, `%cT`, `%cD`, `%zero`).
    pub(super) fn constants(&self, d: usize) -> String {
        let mut s = String::new();
        match *self {
            TrainRow::Matmul { .. } => s.push_str(&super::matmul::constants(d)),
            TrainRow::Transpose { start, heads } => {
                let _ = writeln!(s, "%cStart = arith.constant {start} : index");
                let _ = writeln!(s, "%cTr = arith.constant {TRANSPOSE_TILE} : index");
                let _ = writeln!(s, "%cTrS = arith.constant {} : index", TRANSPOSE_TILE + 1);
                let _ = writeln!(s, "%cTrAll = arith.constant {} : index", TRANSPOSE_TILE * TRANSPOSE_TILE);
                let _ = writeln!(s, "%cNB = arith.constant {} : index", d.div_ceil(TRANSPOSE_TILE));
                let _ = writeln!(s, "%cHn = arith.constant {} : index", d / heads.max(1));
            }
            TrainRow::SiluMul | TrainRow::SiluMulGrad => {
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
            }
            TrainRow::Slice { start } => {
                let _ = writeln!(s, "%cStart = arith.constant {start} : index");
            }
            TrainRow::Join { second } => {
                let _ = writeln!(s, "%cSecond = arith.constant {second} : index");
            }
            TrainRow::Columns { start, stride } => {
                let _ = writeln!(s, "%cStart = arith.constant {start} : index");
                let _ = writeln!(s, "%cStride = arith.constant {stride} : index");
            }
            TrainRow::Rope { heads, .. } => {
                let _ = writeln!(s, "%cHeads = arith.constant {heads} : index");
                let _ = writeln!(s, "%cHalf = arith.constant {} : index", d / 2);
                let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
            }
            TrainRow::MlaForward(m) | TrainRow::MlaGradQ(m) | TrainRow::MlaGradKv(m) => {
                let _ = writeln!(s, "%cH = arith.constant {} : index", m.heads);
                let _ = writeln!(s, "%cNope = arith.constant {} : index", m.nope);
                let _ = writeln!(s, "%cRope = arith.constant {} : index", m.rope);
                let _ = writeln!(s, "%cV = arith.constant {} : index", m.v);
                let _ = writeln!(s, "%cKv = arith.constant {} : index", m.kv);
                let _ = writeln!(s, "%cPerHead = arith.constant {} : index", m.nope + m.v);
                let _ = writeln!(s, "%cCtx = arith.constant {} : index", m.context);
                let _ = writeln!(s, "%cG = arith.constant {} : index", m.group);
                let _ = writeln!(s, "%c4 = arith.constant 4 : index");
                let _ = writeln!(s, "%softmax_scale = arith.constant 0x{:08X} : f32", m.scale.to_bits());
                let _ = writeln!(s, "%ninf = arith.constant 0xFF800000 : f32");
                let _ = writeln!(s, "%nan = arith.constant 0x7FC00000 : f32");
                let _ = writeln!(s, "%c2 = arith.constant 2 : index");
            }
            TrainRow::SumHeads { heads } | TrainRow::FlashDout { heads } => {
                let _ = writeln!(s, "%cH = arith.constant {heads} : index");
            }
            TrainRow::FlashDq { heads, nope } => {
                let _ = writeln!(s, "%cH = arith.constant {heads} : index");
                let _ = writeln!(s, "%cNope = arith.constant {nope} : index");
                let _ = writeln!(s, "%cHD = arith.constant {} : index", heads * d);
            }
            TrainRow::FlashDkv { heads, nope, v } => {
                let _ = writeln!(s, "%cH = arith.constant {heads} : index");
                let _ = writeln!(s, "%cNope = arith.constant {nope} : index");
                let _ = writeln!(s, "%cRope = arith.constant {} : index", d - nope);
                let _ = writeln!(s, "%cPerHead = arith.constant {} : index", nope + v);
                let _ = writeln!(s, "%cHW = arith.constant {} : index", heads * (nope + v));
            }
            TrainRow::RowScales { matrix_rows } => {
                let _ = writeln!(s, "%cMR = arith.constant {matrix_rows} : index");
            }
            TrainRow::Quantize => s.push_str(&quant_constants(d.div_ceil(super::GROUP))),
            TrainRow::QuantizeBlocks { tiles, .. } => {
                let _ = writeln!(s, "%cTiles = arith.constant {tiles} : index");
                let _ = writeln!(s, "%c128 = arith.constant 128 : index");
                let _ = writeln!(s, "%cTile = arith.constant 16384 : index");
                let _ = writeln!(s, "%abs_mask = arith.constant 2147483647 : i32");
                let _ = writeln!(s, "%e4m3_max = arith.constant 0x{:08X} : f32", E4M3_MAX.to_bits());
                let _ = writeln!(s, "%amax_floor = arith.constant 1.0e-12 : f32");
            }
            TrainRow::QuantizeCols | TrainRow::QuantizePairs { .. } => {
                let _ = writeln!(s, "%c128 = arith.constant 128 : index");
                let _ = writeln!(s, "%abs_mask = arith.constant 2147483647 : i32");
                let _ = writeln!(s, "%e4m3_max = arith.constant 0x{:08X} : f32", E4M3_MAX.to_bits());
                let _ = writeln!(s, "%amax_floor = arith.constant 1.0e-04 : f32");
            }
            TrainRow::MoeHidden { k, .. }
            | TrainRow::MoeCombine { k }
            | TrainRow::MoeGradToken { k }
            | TrainRow::MoeGradX { k }
            | TrainRow::PairRows { k }
            | TrainRow::PairGrad { k }
            | TrainRow::PairCombine { k, .. } => {
                let _ = writeln!(s, "%cK = arith.constant {k} : index");
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
            }
            TrainRow::BalanceRows { alpha, .. } => {
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
                let _ = writeln!(s, "%fAlpha = arith.constant 0x{:08X} : f32", alpha.to_bits());
            }
            TrainRow::RouteGrad { scale, .. } => {
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
                let _ = writeln!(s, "%fScale = arith.constant 0x{:08X} : f32", scale.to_bits());
                let _ = writeln!(s, "%tiny = arith.constant 1.0e-20 : f32");
            }
            TrainRow::CrossEntropy { weight, .. } | TrainRow::LossMean { weight } => {
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
                let _ = writeln!(s, "%ninf = arith.constant 0xFF800000 : f32");
                let _ = writeln!(s, "%fW = arith.constant 0x{:08X} : f32", weight.to_bits());
                let _ = writeln!(s, "%zero_i64 = arith.constant 0 : i64");
            }
            TrainRow::RmsNormGrad { eps } => {
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
                let _ = writeln!(s, "%fD = arith.constant 0x{:08X} : f32", (d as f32).to_bits());
                let _ = writeln!(s, "%eps = arith.constant 0x{:08X} : f32", eps.to_bits());
            }
            _ => {}
        }
        s
    }

    /// Values every phase of a block uses.
    pub(super) fn prologue(&self) -> String {
        match self {
            TrainRow::Rope { .. } => "%tok = arith.divui %row, %cHeads : index
%p64 = memref.load %positions[%tok] : memref<?xi64>
%p = arith.index_cast %p64 : i64 to index
%npos = memref.dim %rope, %c0 : memref<?x?xf32>
%p_lo = arith.cmpi sge, %p64, %zero_i64 : i64
%p_hi = arith.cmpi slt, %p, %npos : index
%ok = arith.andi %p_lo, %p_hi : i1
"
            .into(),
            TrainRow::QuantizeBlocks { transposed, matrix_rows, .. } => {
                // Scale row sr, column sc: (matrix, its row tile) and the column tile, or transposed
                // (matrix, its column tile) and the row tile.
                let mr = if *matrix_rows > 0 {
                    format!("arith.constant {matrix_rows} : index")
                } else {
                    "memref.dim %w, %c0 : memref<?x?xf32>".into()
                };
                let (per, rt, kt) = if *transposed { ("%k_tiles", "%sc", "%sub") } else { ("%r_tiles", "%sub", "%sc") };
                format!(
                    "%sr = arith.divui %row, %cTiles : index
%sc = arith.remui %row, %cTiles : index
%N = memref.dim %w, %c0 : memref<?x?xf32>
%K = memref.dim %w, %c1 : memref<?x?xf32>
%MR = {mr}
%c127 = arith.constant 127 : index
%mr127 = arith.addi %MR, %c127 : index
%r_tiles = arith.divui %mr127, %c128 : index
%k127 = arith.addi %K, %c127 : index
%k_tiles = arith.divui %k127, %c128 : index
%mat = arith.divui %sr, {per} : index
%sub = arith.remui %sr, {per} : index
%mat_first = arith.muli %mat, %MR : index
%r_tile_first = arith.muli {rt}, %c128 : index
%r_first = arith.addi %mat_first, %r_tile_first : index
%mat_end = arith.addi %mat_first, %MR : index
%r_end0 = arith.addi %r_first, %c128 : index
%r_end1 = arith.minui %r_end0, %mat_end : index
%r_end = arith.minui %r_end1, %N : index
%c_first = arith.muli {kt}, %c128 : index
%mat_out = arith.muli %mat, %K : index
"
                )
            }
            TrainRow::MoeHidden { .. } | TrainRow::MoeGradToken { .. } => "%t = arith.divui %row, %cK : index
%s = arith.remui %row, %cK : index
"
            .into(),
            // Blocks head-major: those running together share one head's keys and values (in L2).
            TrainRow::MlaForward(m) | TrainRow::MlaGradQ(m) => super::mla_train::query_prologue(m),
            TrainRow::MlaGradKv(m) => super::mla_train::key_prologue(m),
            TrainRow::Matmul { transpose_a, .. } => super::matmul::prologue(*transpose_a),
            TrainRow::Transpose { heads, .. } => format!(
                "%rb = arith.divui %row, %cNB : index
%cb = arith.remui %row, %cNB : index
%r0 = arith.muli %rb, %cTr : index
%k0 = arith.muli %cb, %cTr : index
%R = memref.dim %x, %c0 : {}
",
                if *heads > 0 { "memref<?x?x?xf32>" } else { "memref<?x?xf32>" }
            ),
            TrainRow::CrossEntropy { .. } => "%t64 = memref.load %targets[%row] : memref<?xi64>
%t_idx = arith.index_cast %t64 : i64 to index
%t_lo = arith.cmpi sge, %t64, %zero_i64 : i64
%t_hi = arith.cmpi slt, %t_idx, %cD : index
%t_ok = arith.andi %t_lo, %t_hi : i1
%t_safe = arith.select %t_ok, %t_idx, %c0 : index
%nrows = memref.dim %targets, %c0 : memref<?xi64>
%nrows_i64 = arith.index_cast %nrows : index to i64
%fR = arith.uitofp %nrows_i64 : i64 to f32
"
            .into(),
            _ => String::new(),
        }
    }

    /// The per-thread bodies, in order (a barrier between consecutive ones).
    pub(super) fn phases(&self, kernel: &RowKernel, lowering: Lowering) -> Vec<String> {
        let sh = |name: &str| kernel.shared_type(name, lowering);
        let m = "memref<?x?xf32>";
        match *self {
            TrainRow::Matmul { transpose_a, transpose_b } => super::matmul::phases(transpose_a, transpose_b, &sh),
            TrainRow::RowRange { into, shifted } => {
                let shift = if shifted {
                    format!("%shift = memref.dim %off, %c0 : {m}")
                } else {
                    "%shift = arith.constant 0 : index".into()
                };
                let (src, dst) = if into { ("%row", "%moved") } else { ("%moved", "%row") };
                vec![format!(
                    "{shift}
%moved = arith.addi %row, %shift : index
scf.for %i = %tid to %cD step %cT {{
  %v = memref.load %x[{src}, %i] : {m}
  memref.store %v, %y[{dst}, %i] : {m}
}}
"
                )]
            }
            TrainRow::Transpose { heads, .. } => {
                let tr = sh("sh_tr");
                let load = if heads > 0 {
                    "%hh = arith.divui %gc, %cHn : index
    %hc = arith.remui %gc, %cHn : index
    %v = memref.load %x[%gr, %hh, %hc] : memref<?x?x?xf32>
"
                } else {
                    "%xc = arith.addi %gc, %cStart : index
    %v = memref.load %x[%gr, %xc] : memref<?x?xf32>
"
                };
                // Rows of the tile along the threads, then its columns: each pass reads (writes) 32
                // consecutive elements of a row, the shared tile padded (no bank conflicts).
                let tile = |outer: &str, inner: &str, body: &str| {
                    format!(
                        "scf.for %q = %tid to %cTrAll step %cT {{
  %{outer} = arith.divui %q, %cTr : index
  %{inner} = arith.remui %q, %cTr : index
  %gr = arith.addi %r0, %r : index
  %gc = arith.addi %k0, %c : index
  %r_in = arith.cmpi ult, %gr, %R : index
  %c_in = arith.cmpi ult, %gc, %cD : index
  %in = arith.andi %r_in, %c_in : i1
  %at0 = arith.muli %r, %cTrS : index
  %at = arith.addi %at0, %c : index
  scf.if %in {{
    {body}  }}
}}
"
                    )
                };
                vec![
                    tile(
                        "r",
                        "c",
                        &format!(
                            "{load}    memref.store %v, %sh_tr[%at] : {tr}
"
                        ),
                    ),
                    tile(
                        "c",
                        "r",
                        &format!(
                            "%v = memref.load %sh_tr[%at] : {tr}
    memref.store %v, %y[%gc, %gr] : {m}
"
                        ),
                    ),
                ]
            }
            TrainRow::Slice { .. } => {
                // bf16 rows: each value rounded to nearest even by its bits.
                let (round, value, y) = match kernel.weight.as_str() {
                    "bf16" => (super::round_bf16("%v", "%vb"), "%vb", "memref<?x?xbf16>"),
                    _ => (String::new(), "%v", m),
                };
                let setup = if kernel.weight == "bf16" { super::BF16_CONSTANTS } else { "" };
                vec![format!(
                    "{setup}%xr = memref.dim %x, %c0 : {m}
%inside = arith.cmpi ult, %row, %xr : index
scf.for %i = %tid to %cD step %cT {{
  %v = scf.if %inside -> (f32) {{
    %c = arith.addi %i, %cStart : index
    %xv = memref.load %x[%row, %c] : {m}
    scf.yield %xv : f32
  }} else {{
    scf.yield %zero : f32
  }}
{round}  memref.store {value}, %y[%row, %i] : {y}
}}
"
                )]
            }
            TrainRow::Join { .. } => vec![format!(
                "scf.for %i = %tid to %cD step %cT {{
  %v = memref.load %x1[%row, %i] : {m}
  memref.store %v, %y[%row, %i] : {m}
}}
scf.for %i = %tid to %cSecond step %cT {{
  %v = memref.load %x2[%row, %i] : {m}
  %c = arith.addi %i, %cD : index
  memref.store %v, %y[%row, %c] : {m}
}}
"
            )],
            TrainRow::AddFlat => vec!["scf.for %i = %tid to %cD step %cT {
  %a = memref.load %x1[%i] : memref<?xf32>
  %b = memref.load %x2[%i] : memref<?xf32>
  %v = arith.addf %a, %b : f32
  memref.store %v, %y[%i] : memref<?xf32>
}
"
            .into()],
            TrainRow::Add => vec![format!(
                "scf.for %i = %tid to %cD step %cT {{
  %a = memref.load %x1[%row, %i] : {m}
  %b = memref.load %x2[%row, %i] : {m}
  %v = arith.addf %a, %b : f32
  memref.store %v, %y[%row, %i] : {m}
}}
"
            )],
            TrainRow::SiluMul => vec![format!(
                "scf.for %i = %tid to %cD step %cT {{
  %g = memref.load %gate[%row, %i] : {m}
  %u = memref.load %up[%row, %i] : {m}
  %neg = arith.negf %g : f32
{exp}  %den = arith.addf %one, %e : f32
  %silu = arith.divf %g, %den : f32
  %v = arith.mulf %silu, %u : f32
  memref.store %v, %y[%row, %i] : {m}
}}
",
                exp = indent2(&exp(lowering, "%neg", "%e"))
            )],
            TrainRow::SiluMulGrad => vec![format!(
                "scf.for %i = %tid to %cD step %cT {{
  %g = memref.load %gate[%row, %i] : {m}
  %u = memref.load %up[%row, %i] : {m}
  %dy_v = memref.load %dy[%row, %i] : {m}
{grad}  memref.store %dg, %dgate[%row, %i] : {m}
  memref.store %du, %dup[%row, %i] : {m}
}}
",
                grad = indent2(&swiglu_grad(lowering, "%g", "%u", "%dy_v"))
            )],
            TrainRow::Columns { .. } => vec![format!(
                "%row_base = arith.muli %row, %cStride : index
%base = arith.addi %row_base, %cStart : index
scf.for %i = %tid to %cD step %cT {{
  %c = arith.addi %base, %i : index
  %v = memref.load %x[%c] : memref<?xf32>
  memref.store %v, %y[%row, %i] : {m}
}}
"
            )],
            TrainRow::Rope { interleave, inverse, .. } => vec![format!(
                "scf.if %ok {{
scf.for %i = %tid to %cHalf step %cT {{
{}}}
}}
",
                rope_rotation(
                    interleave,
                    inverse,
                    |c, out| format!("  {out} = memref.load %x[%row, {c}] : {m}\n"),
                    |v, c, _| format!("  memref.store {v}, %y[%row, {c}] : {m}\n"),
                )
            )],
            TrainRow::RmsNormGrad { .. } => {
                let (sum, dot) = (sh("sh_sum"), sh("sh_dot"));
                let w = kernel.load_weight("wv", "%w", "%i");
                let mut phases = vec![format!(
                    "%ss:2 = scf.for %i = %tid to %cD step %cT iter_args(%a = %zero, %b = %zero) -> (f32, f32) {{
  %xv = memref.load %x[%row, %i] : {m}
  %gv = memref.load %dy[%row, %i] : {m}
{w}  %sq = arith.mulf %xv, %xv : f32
  %a2 = arith.addf %a, %sq : f32
  %gw = arith.mulf %gv, %wv : f32
  %gwx = arith.mulf %gw, %xv : f32
  %b2 = arith.addf %b, %gwx : f32
  scf.yield %a2, %b2 : f32, f32
}}
memref.store %ss#0, %sh_sum[%tid] : {sum}
memref.store %ss#1, %sh_dot[%tid] : {dot}
",
                    w = indent2(&w)
                )];
                phases.extend(tree_phases(
                    kernel.threads,
                    &format!(
                        "%a = memref.load %sh_sum[%tid] : {sum}
%b = memref.load %sh_sum[%other] : {sum}
%s = arith.addf %a, %b : f32
memref.store %s, %sh_sum[%tid] : {sum}
%da = memref.load %sh_dot[%tid] : {dot}
%db = memref.load %sh_dot[%other] : {dot}
%ds = arith.addf %da, %db : f32
memref.store %ds, %sh_dot[%tid] : {dot}"
                    ),
                ));
                phases.push(format!(
                    "%total = memref.load %sh_sum[%c0] : {sum}
%dot = memref.load %sh_dot[%c0] : {dot}
%mean = arith.divf %total, %fD : f32
%mean_eps = arith.addf %mean, %eps : f32
{sqrt}%r_v = arith.divf %one, %root : f32
%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  memref.store %r_v, %r[%row] : memref<?xf32>
}}
scf.for %i = %tid to %cD step %cT {{
  %xv = memref.load %x[%row, %i] : {m}
  %gv = memref.load %dy[%row, %i] : {m}
{w}  %rg = arith.mulf %r_v, %gv : f32
  %rgw = arith.mulf %rg, %wv : f32
  %xr = arith.mulf %xv, %r_v : f32
  %xrr = arith.mulf %xr, %r_v : f32
  %xrrr = arith.mulf %xrr, %r_v : f32
  %xd = arith.divf %xrrr, %fD : f32
  %xdd = arith.mulf %xd, %dot : f32
  %dx_v = arith.subf %rgw, %xdd : f32
  memref.store %dx_v, %dx[%row, %i] : {m}
}}
",
                    sqrt = sqrt(lowering, "%mean_eps", "%root"),
                    w = indent2(&w)
                ));
                phases
            }
            // A thread per column (a block's 32 read 128 bytes of each row), its rows in order.
            TrainRow::RmsNormDw => vec![format!(
                "%c32 = arith.constant 32 : index
%col0 = arith.muli %row, %c32 : index
%col = arith.addi %col0, %tid : index
%in = arith.cmpi ult, %col, %cD : index
scf.if %in {{
  %R = memref.dim %x, %c0 : {m}
  %acc = scf.for %t = %c0 to %R step %c1 iter_args(%s = %zero) -> (f32) {{
    %xv = memref.load %x[%t, %col] : {m}
    %gv = memref.load %dy[%t, %col] : {m}
    %rv = memref.load %r[%t] : memref<?xf32>
    %gx = arith.mulf %gv, %xv : f32
    %gxr = arith.mulf %gx, %rv : f32
    %s2 = arith.addf %s, %gxr : f32
    scf.yield %s2 : f32
  }}
  memref.store %acc, %dw[%col] : memref<?xf32>
}}
"
            )],
            TrainRow::CrossEntropy { grad, .. } => {
                let (mx, sum) = (sh("sh_max"), sh("sh_sum"));
                let mut phases = vec![format!(
                    "%m = scf.for %i = %tid to %cD step %cT iter_args(%a = %ninf) -> (f32) {{
  %v = memref.load %logits[%row, %i] : {m}
  %gt = arith.cmpf ogt, %v, %a : f32
  %a2 = arith.select %gt, %v, %a : f32
  scf.yield %a2 : f32
}}
memref.store %m, %sh_max[%tid] : {mx}
"
                )];
                phases.extend(tree_phases(
                    kernel.threads,
                    &format!(
                        "%a = memref.load %sh_max[%tid] : {mx}
%b = memref.load %sh_max[%other] : {mx}
%gt = arith.cmpf ogt, %b, %a : f32
%c = arith.select %gt, %b, %a : f32
memref.store %c, %sh_max[%tid] : {mx}"
                    ),
                ));
                let e = indent2(&exp(lowering, "%xm", "%e"));
                phases.push(format!(
                    "%max = memref.load %sh_max[%c0] : {mx}
%s = scf.for %i = %tid to %cD step %cT iter_args(%a = %zero) -> (f32) {{
  %v = memref.load %logits[%row, %i] : {m}
  %xm = arith.subf %v, %max : f32
{e}  %a2 = arith.addf %a, %e : f32
  scf.yield %a2 : f32
}}
memref.store %s, %sh_sum[%tid] : {sum}
"
                ));
                phases.extend(tree_phases(
                    kernel.threads,
                    &format!(
                        "%a = memref.load %sh_sum[%tid] : {sum}
%b = memref.load %sh_sum[%other] : {sum}
%c = arith.addf %a, %b : f32
memref.store %c, %sh_sum[%tid] : {sum}"
                    ),
                ));
                let last = if grad {
                    format!(
                        "scf.for %i = %tid to %cD step %cT {{
  %v = memref.load %logits[%row, %i] : {m}
  %xm = arith.subf %v, %max : f32
{e}  %p = arith.divf %e, %total : f32
  %is_t = arith.cmpi eq, %i, %t_safe : index
  %hot = arith.andi %is_t, %t_ok : i1
  %onehot = arith.select %hot, %one, %zero : f32
  %p1 = arith.subf %p, %onehot : f32
  %pr = arith.divf %p1, %fR : f32
  %g = arith.mulf %fW, %pr : f32
  memref.store %g, %dlogits[%row, %i] : {m}
}}
"
                    )
                } else {
                    format!(
                        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
{ln}  %lse = arith.addf %max, %log_sum : f32
  %xt = memref.load %logits[%row, %t_safe] : {m}
  %l = arith.subf %lse, %xt : f32
  memref.store %l, %loss_rows[%row] : memref<?xf32>
}}
",
                        ln = indent2(&ln(lowering, "%total", "%log_sum"))
                    )
                };
                phases.push(format!(
                    "%max = memref.load %sh_max[%c0] : {mx}
%total = memref.load %sh_sum[%c0] : {sum}
{last}"
                ));
                phases
            }
            TrainRow::LossMean { .. } => vec![format!(
                "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %R = memref.dim %x, %c0 : {m}
  %zero_f64 = arith.constant 0.0 : f64
  %acc = scf.for %r = %c0 to %R step %c1 iter_args(%s = %zero_f64) -> (f64) {{
    %l = memref.load %loss_rows[%r] : memref<?xf32>
    %l64 = arith.extf %l : f32 to f64
    %s2 = arith.addf %s, %l64 : f64
    scf.yield %s2 : f64
  }}
  %R_i64 = arith.index_cast %R : index to i64
  %fR = arith.uitofp %R_i64 : i64 to f64
  %mean = arith.divf %acc, %fR : f64
  %mean32 = arith.truncf %mean : f64 to f32
  %loss_v = arith.mulf %fW, %mean32 : f32
  memref.store %loss_v, %loss[%c0] : memref<?xf32>
}}
"
            )],
            TrainRow::ExpertFreq => {
                let chunks =
                    super::PairChunks { experts: "%cD".into(), chunks: super::pair_chunks(kernel.d), cc: sh("sh_cc") };
                // Each expert's frequency: `unit` added once per pair of it, in turn (the same
                // bits whatever order the pairs were counted in).
                let freq = format!(
                    "  %TK_i64 = arith.index_cast %pc_n : index to i64
  %fTK = arith.uitofp %TK_i64 : i64 to f32
  %fE = arith.constant 0x{:08X} : f32
  %unit = arith.divf %fE, %fTK : f32
  %hits = arith.index_cast %n : i32 to index
  %count = scf.for %j = %c0 to %hits step %c1 iter_args(%a = %zero) -> (f32) {{
    %a2 = arith.addf %a, %unit : f32
    scf.yield %a2 : f32
  }}
  memref.store %count, %freq[%e] : memref<?xf32>
",
                    (kernel.d as f32).to_bits()
                );
                vec![chunks.clear(), chunks.walk(""), chunks.totals(&freq)]
            }
            TrainRow::BalanceRows { grad, softmax, .. } => {
                let e = indent2(&exp(lowering, "%neg", "%ex"));
                let sigmoid = if softmax {
                    // exp(l - max): `%neg` is the difference here.
                    format!(
                        "  %l = memref.load %logits[%row, %j] : {m}
  %neg = arith.subf %l, %mx : f32
{e}  %s = arith.addf %ex, %zero : f32
"
                    )
                } else {
                    format!(
                        "  %l = memref.load %logits[%row, %j] : {m}
  %neg = arith.negf %l : f32
{e}  %den = arith.addf %one, %ex : f32
  %s = arith.divf %one, %den : f32
"
                    )
                };
                let max = if softmax {
                    format!(
                        "%ninf = arith.constant 0xFF800000 : f32
%mx = scf.for %j = %c0 to %cD step %c1 iter_args(%m = %ninf) -> (f32) {{
  %l = memref.load %logits[%row, %j] : {m}
  %gt = arith.cmpf ogt, %l, %m : f32
  %m2 = arith.select %gt, %l, %m : f32
  scf.yield %m2 : f32
}}
"
                    )
                } else {
                    String::new()
                };
                let jacobian = if softmax {
                    "  %g = arith.addf %dss, %zero : f32\n"
                } else {
                    "  %oms = arith.subf %one, %s : f32\n  %g = arith.mulf %dss, %oms : f32\n"
                };
                let sums = format!(
                    "{max}%sums:2 = scf.for %j = %c0 to %cD step %c1 iter_args(%a = %zero, %b = %zero) -> (f32, f32) {{
{sigmoid}  %f = memref.load %freq[%j] : memref<?xf32>
  %fs = arith.mulf %f, %s : f32
  %a2 = arith.addf %a, %s : f32
  %b2 = arith.addf %b, %fs : f32
  scf.yield %a2, %b2 : f32, f32
}}
%weighted = arith.divf %sums#1, %sums#0 : f32
"
                );
                if grad {
                    // Every thread recomputes the row's sums (E is small), then writes its columns.
                    vec![format!(
                        "{sums}%T = memref.dim %logits, %c0 : {m}
%T_i64 = arith.index_cast %T : index to i64
%fT = arith.uitofp %T_i64 : i64 to f32
%at = arith.divf %fAlpha, %fT : f32
scf.for %j = %tid to %cD step %cT {{
{sigmoid}  %f = memref.load %freq[%j] : memref<?xf32>
  %fw = arith.subf %f, %weighted : f32
  %atf = arith.mulf %at, %fw : f32
  %ds = arith.divf %atf, %sums#0 : f32
  %dss = arith.mulf %ds, %s : f32
{jacobian}  memref.store %g, %dl[%row, %j] : {m}
}}
"
                    )]
                } else {
                    vec![format!(
                        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
{}  memref.store %weighted, %loss_rows[%row] : memref<?xf32>
}}
",
                        indent2(&sums)
                    )]
                }
            }
            TrainRow::RouteGrad { softmax: true, .. } => {
                let e = indent2(&indent2(&exp(lowering, "%neg", "%ex")));
                vec![format!(
                    "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %K = memref.dim %idx, %c1 : memref<?x?xi32>
  %ninf = arith.constant 0xFF800000 : f32
  %mx = scf.for %j = %c0 to %cD step %c1 iter_args(%m = %ninf) -> (f32) {{
    %l = memref.load %logits[%row, %j] : {m}
    %gt = arith.cmpf ogt, %l, %m : f32
    %m2 = arith.select %gt, %l, %m : f32
    scf.yield %m2 : f32
  }}
  %sum = scf.for %j = %c0 to %cD step %c1 iter_args(%a = %zero) -> (f32) {{
    %l = memref.load %logits[%row, %j] : {m}
    %neg = arith.subf %l, %mx : f32
{e}    memref.store %ex, %dl[%row, %j] : {m}
    %a2 = arith.addf %a, %ex : f32
    scf.yield %a2 : f32
  }}
  %cross = scf.for %k = %c0 to %K step %c1 iter_args(%a = %zero) -> (f32) {{
    %e_i32 = memref.load %idx[%row, %k] : memref<?x?xi32>
    %e = arith.index_cast %e_i32 : i32 to index
    %x = memref.load %dl[%row, %e] : {m}
    %s = arith.divf %x, %sum : f32
    %g = memref.load %dw[%row, %k] : {m}
    %ds = arith.mulf %fScale, %g : f32
    %p = arith.mulf %ds, %s : f32
    %a2 = arith.addf %a, %p : f32
    scf.yield %a2 : f32
  }}
  scf.for %j = %c0 to %cD step %c1 {{
    %x = memref.load %dl[%row, %j] : {m}
    %s = arith.divf %x, %sum : f32
    %ns = arith.negf %s : f32
    %v = arith.mulf %ns, %cross : f32
    memref.store %v, %dl[%row, %j] : {m}
  }}
  scf.for %k = %c0 to %K step %c1 {{
    %e_i32 = memref.load %idx[%row, %k] : memref<?x?xi32>
    %e = arith.index_cast %e_i32 : i32 to index
    %l = memref.load %logits[%row, %e] : {m}
    %neg = arith.subf %l, %mx : f32
{e}    %s = arith.divf %ex, %sum : f32
    %g = memref.load %dw[%row, %k] : {m}
    %ds = arith.mulf %fScale, %g : f32
    %p = arith.mulf %s, %ds : f32
    %old = memref.load %dl[%row, %e] : {m}
    %new = arith.addf %old, %p : f32
    memref.store %new, %dl[%row, %e] : {m}
  }}
}}
"
                )]
            }
            TrainRow::RouteGrad { norm, .. } => {
                let e = indent2(&indent2(&exp(lowering, "%neg", "%ex")));
                let score = |v: &str| {
                    format!(
                        "    %e_i32 = memref.load %idx[%row, {v}] : memref<?x?xi32>
    %e = arith.index_cast %e_i32 : i32 to index
    %l = memref.load %logits[%row, %e] : {m}
    %neg = arith.negf %l : f32
{e}    %den = arith.addf %one, %ex : f32
    %s = arith.divf %one, %den : f32
"
                    )
                };
                let ds = if norm {
                    "    %gs = arith.divf %g, %S : f32
    %cs = arith.divf %cross, %S2 : f32
    %inner = arith.subf %gs, %cs : f32
    %ds = arith.mulf %fScale, %inner : f32
"
                } else {
                    "    %ds = arith.mulf %fScale, %g : f32
"
                };
                vec![
                    format!(
                        "scf.for %j = %tid to %cD step %cT {{
  memref.store %zero, %dl[%row, %j] : {m}
}}
"
                    ),
                    format!(
                        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %K = memref.dim %idx, %c1 : memref<?x?xi32>
  %sums:2 = scf.for %k = %c0 to %K step %c1 iter_args(%a = %zero, %b = %zero) -> (f32, f32) {{
{sk}    %g = memref.load %dw[%row, %k] : {m}
    %gv = arith.mulf %g, %s : f32
    %a2 = arith.addf %a, %s : f32
    %b2 = arith.addf %b, %gv : f32
    scf.yield %a2, %b2 : f32, f32
  }}
  %S = arith.addf %sums#0, %tiny : f32
  %S2 = arith.mulf %S, %S : f32
  %cross = arith.addf %sums#1, %zero : f32
  scf.for %k = %c0 to %K step %c1 {{
{sk}    %g = memref.load %dw[%row, %k] : {m}
{ds}    %oms = arith.subf %one, %s : f32
    %dss = arith.mulf %ds, %s : f32
    %v = arith.mulf %dss, %oms : f32
    %old = memref.load %dl[%row, %e] : {m}
    %new = arith.addf %old, %v : f32
    memref.store %new, %dl[%row, %e] : {m}
  }}
}}
",
                        sk = score("%k"),
                    ),
                ]
            }
            TrainRow::MlaForward(m) => mla_train::query_phases(&m, false, lowering, &sh),
            TrainRow::MlaGradQ(m) => mla_train::query_phases(&m, true, lowering, &sh),
            TrainRow::MlaGradKv(m) => mla_train::key_phases(&m, lowering, &sh),
            TrainRow::MoeHidden { keep, .. } => {
                let keep = if keep {
                    "  memref.store %gv, %g[%row, %i] : MEM\n  memref.store %uv, %u[%row, %i] : MEM\n".replace("MEM", m)
                } else {
                    String::new()
                };
                vec![format!(
                    "{e}%D = memref.dim %x, %c1 : {m}
scf.for %i = %tid to %cD step %cT {{
  %wrow = arith.addi %ebase, %i : index
  %gu:2 = scf.for %c = %c0 to %D step %c1 iter_args(%a = %zero, %b = %zero) -> (f32, f32) {{
    %xv = memref.load %x[%t, %c] : {m}
    %gw = memref.load %gate[%wrow, %c] : {m}
    %uw = memref.load %up[%wrow, %c] : {m}
    %xg = arith.mulf %xv, %gw : f32
    %xu = arith.mulf %xv, %uw : f32
    %a2 = arith.addf %a, %xg : f32
    %b2 = arith.addf %b, %xu : f32
    scf.yield %a2, %b2 : f32, f32
  }}
  %gv = arith.addf %gu#0, %zero : f32
  %uv = arith.addf %gu#1, %zero : f32
  %neg = arith.negf %gv : f32
{exp}  %den = arith.addf %one, %ex : f32
  %silu = arith.divf %gv, %den : f32
  %hv = arith.mulf %silu, %uv : f32
  memref.store %hv, %h[%row, %i] : {m}
{keep}}}
",
                    e = expert_base("%t", "%s", "%gate", "%cD"),
                    exp = indent2(&exp(lowering, "%neg", "%ex")),
                )]
            }
            TrainRow::QuantizePairs { by_token } => {
                let src_row = if by_token { "%tok" } else { "%r" };
                vec![format!(
                    "%K = memref.dim %w, %c1 : {m}
%E1 = memref.dim %offsets, %c0 : memref<?xi32>
%E = arith.subi %E1, %c1 : index
%cGB = arith.constant {PAIR_GROUP_BLOCKS} : index
%c32 = arith.constant 32 : index
// This block's 32 columns and share of the groups: warp w of group block b takes groups
// b * warps + w, then every warps x GB-th.
%chunk = arith.divui %row, %cGB : index
%gblock = arith.remui %row, %cGB : index
%lane = arith.remui %tid, %c32 : index
%warp = arith.divui %tid, %c32 : index
%warps = arith.divui %cT, %c32 : index
%c0_col = arith.muli %chunk, %c32 : index
%c = arith.addi %c0_col, %lane : index
%g_first0 = arith.muli %gblock, %warps : index
%g_first = arith.addi %g_first0, %warp : index
%g_step = arith.muli %warps, %cGB : index
%total_i32 = memref.load %padded[%E] : memref<?xi32>
%total = arith.index_cast %total_i32 : i32 to index
%groups = arith.divui %total, %c128 : index
%col_in = arith.cmpi ult, %c, %cD : index
scf.if %col_in {{
scf.for %g = %g_first to %groups step %g_step {{
  %pc = arith.muli %g, %c128 : index
  %pc_i32 = arith.index_cast %pc : index to i32
  // The group's expert: the last e with padded[e] <= pc (an empty expert's successor starts
  // there too, so the last is never empty).
  %ex = scf.for %e = %c0 to %E step %c1 iter_args(%a = %c0) -> (index) {{
    %o_i32 = memref.load %padded[%e] : memref<?xi32>
    %at_or_after = arith.cmpi sle, %o_i32, %pc_i32 : i32
    %a2 = arith.select %at_or_after, %e, %a : index
    scf.yield %a2 : index
  }}
  %start_i32 = memref.load %offsets[%ex] : memref<?xi32>
  %ex1 = arith.addi %ex, %c1 : index
  %end_i32 = memref.load %offsets[%ex1] : memref<?xi32>
  %pstart_i32 = memref.load %padded[%ex] : memref<?xi32>
  %start = arith.index_cast %start_i32 : i32 to index
  %end = arith.index_cast %end_i32 : i32 to index
  %pstart = arith.index_cast %pstart_i32 : i32 to index
  %local = arith.subi %pc, %pstart : index
  %r0 = arith.addi %start, %local : index
  %g_end0 = arith.addi %r0, %c128 : index
  %g_end = arith.minui %g_end0, %end : index
  %m = scf.for %r = %r0 to %g_end step %c1 iter_args(%mx = %zero) -> (f32) {{
    %p_i32 = memref.load %pairs[%r] : memref<?xi32>
    %p = arith.index_cast %p_i32 : i32 to index
    %tok = arith.divui %p, %K : index
    %v = memref.load %src[{src_row}, %c] : {m}
{amax}    scf.yield %mx2 : f32
  }}
  %small = arith.cmpf olt, %m, %amax_floor : f32
  %floored = arith.select %small, %amax_floor, %m : f32
  %sv = arith.divf %floored, %e4m3_max : f32
  memref.store %sv, %scale[%c, %g] : {m}
  scf.for %i = %c0 to %c128 step %c1 {{
    %r = arith.addi %r0, %i : index
    %real = arith.cmpi ult, %r, %g_end : index
    %byte = scf.if %real -> (i8) {{
      %p_i32 = memref.load %pairs[%r] : memref<?xi32>
      %p = arith.index_cast %p_i32 : i32 to index
      %tok = arith.divui %p, %K : index
      %v = memref.load %src[{src_row}, %c] : {m}
      %qv = arith.divf %v, %sv : f32
{enc}      scf.yield %byte_v : i8
    }} else {{
      %zero_byte = arith.constant 0 : i8
      scf.yield %zero_byte : i8
    }}
    %col = arith.addi %pc, %i : index
    memref.store %byte, %q[%c, %col] : memref<?x?xi8>
  }}
}}
}}
",
                    amax = indent2(&indent2(&amax_step("%v", "%mx", "%mx2"))),
                    enc = indent2(&indent2(&indent2(&encode_e4m3(lowering, "%qv", "%byte_v")))),
                )]
            }
            TrainRow::PadOffsets => vec!["%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {
  %zero_i32 = arith.constant 0 : i32
  %c127_i32 = arith.constant 127 : i32
  %c128_i32 = arith.constant 128 : i32
  %total = scf.for %e = %c0 to %cD step %c1 iter_args(%a = %zero_i32) -> (i32) {
    memref.store %a, %padded[%e] : memref<?xi32>
    %o0 = memref.load %offsets[%e] : memref<?xi32>
    %e1 = arith.addi %e, %c1 : index
    %o1 = memref.load %offsets[%e1] : memref<?xi32>
    %n = arith.subi %o1, %o0 : i32
    %n127 = arith.addi %n, %c127_i32 : i32
    %whole = arith.divui %n127, %c128_i32 : i32
    %span = arith.muli %whole, %c128_i32 : i32
    %a2 = arith.addi %a, %span : i32
    scf.yield %a2 : i32
  }
  memref.store %total, %padded[%cD] : memref<?xi32>
}
"
            .to_string()],
            TrainRow::MoeCombine { .. } => {
                let order = sh("sh_order");
                vec![
                    slot_order(&order),
                    format!(
                        "%t = arith.addi %row, %c0 : index
%I = memref.dim %h, %c1 : {m}
scf.for %o = %tid to %cD step %cT {{
  %acc = scf.for %r = %c0 to %cK step %c1 iter_args(%a = %zero) -> (f32) {{
    %s_f = memref.load %sh_order[%r] : {order}
    %s_i = arith.fptosi %s_f : f32 to i32
    %s = arith.index_cast %s_i : i32 to index
{e}    %wrow = arith.addi %ebase, %o : index
    %hrow0 = arith.muli %t, %cK : index
    %hrow = arith.addi %hrow0, %s : index
    %ov = scf.for %i = %c0 to %I step %c1 iter_args(%b = %zero) -> (f32) {{
      %hv = memref.load %h[%hrow, %i] : {m}
      %dv = memref.load %down[%wrow, %i] : {m}
      %x = arith.mulf %hv, %dv : f32
      %b2 = arith.addf %b, %x : f32
      scf.yield %b2 : f32
    }}
    %wv = memref.load %w[%t, %s] : {m}
    %wo = arith.mulf %wv, %ov : f32
    %a2 = arith.addf %a, %wo : f32
    scf.yield %a2 : f32
  }}
  memref.store %acc, %y[%t, %o] : {m}
}}
",
                        e = indent2(&indent2(&expert_base("%t", "%s", "%down", "%cD")))
                    ),
                ]
            }
            TrainRow::MoeGradToken { .. } => vec![
                format!(
                    "%D = memref.dim %dy, %c1 : {m}
{e}%wt = memref.load %w[%t, %s] : {m}
scf.for %o = %tid to %D step %cT {{
  %wrow = arith.addi %ebase, %o : index
  %yv = scf.for %i = %c0 to %cD step %c1 iter_args(%a = %zero) -> (f32) {{
    %hv = memref.load %h[%row, %i] : {m}
    %dv = memref.load %down[%wrow, %i] : {m}
    %x = arith.mulf %hv, %dv : f32
    %a2 = arith.addf %a, %x : f32
    scf.yield %a2 : f32
  }}
  memref.store %yv, %y[%row, %o] : {m}
}}
scf.for %i = %tid to %cD step %cT {{
  %dh = scf.for %o = %c0 to %D step %c1 iter_args(%a = %zero) -> (f32) {{
    %gv = memref.load %dy[%t, %o] : {m}
    %dye = arith.mulf %gv, %wt : f32
    %wrow = arith.addi %ebase, %o : index
    %dv = memref.load %down[%wrow, %i] : {m}
    %x = arith.mulf %dye, %dv : f32
    %a2 = arith.addf %a, %x : f32
    scf.yield %a2 : f32
  }}
  %gv = memref.load %g[%row, %i] : {m}
  %uv = memref.load %u[%row, %i] : {m}
{grad}  memref.store %dg, %gg[%row, %i] : {m}
  memref.store %du, %uu[%row, %i] : {m}
}}
",
                    e = expert_base("%t", "%s", "%down", "%D"),
                    grad = indent2(&swiglu_grad(lowering, "%gv", "%uv", "%dh")),
                ),
                format!(
                    "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %D = memref.dim %dy, %c1 : {m}
  %dot = scf.for %o = %c0 to %D step %c1 iter_args(%a = %zero) -> (f32) {{
    %gv = memref.load %dy[%t, %o] : {m}
    %yv = memref.load %y[%row, %o] : {m}
    %x = arith.mulf %gv, %yv : f32
    %a2 = arith.addf %a, %x : f32
    scf.yield %a2 : f32
  }}
  memref.store %dot, %dw[%t, %s] : {m}
}}
"
                ),
            ],
            TrainRow::MoeGradX { .. } => vec![format!(
                "%t = arith.addi %row, %c0 : index
%I = memref.dim %gg, %c1 : {m}
scf.for %c = %tid to %cD step %cT {{
  %acc = scf.for %s = %c0 to %cK step %c1 iter_args(%a = %zero) -> (f32) {{
{e}    %hrow0 = arith.muli %t, %cK : index
    %hrow = arith.addi %hrow0, %s : index
    %a3 = scf.for %i = %c0 to %I step %c1 iter_args(%b = %a) -> (f32) {{
      %ggv = memref.load %gg[%hrow, %i] : {m}
      %uuv = memref.load %uu[%hrow, %i] : {m}
      %wrow = arith.addi %ebase, %i : index
      %gw = memref.load %gate[%wrow, %c] : {m}
      %uw = memref.load %up[%wrow, %c] : {m}
      %x1 = arith.mulf %ggv, %gw : f32
      %x2 = arith.mulf %uuv, %uw : f32
      %x = arith.addf %x1, %x2 : f32
      %b2 = arith.addf %b, %x : f32
      scf.yield %b2 : f32
    }}
    scf.yield %a3 : f32
  }}
  memref.store %acc, %dx[%t, %c] : {m}
}}
",
                e = indent2(&indent2(&expert_base("%t", "%s", "%gate", "%I")))
            )],
            TrainRow::PairSort => {
                let (count, off) = (sh("sh_count"), sh("sh_off"));
                let chunks =
                    super::PairChunks { experts: "%cD".into(), chunks: super::pair_chunks(kernel.d), cc: sh("sh_cc") };
                vec![
                    // 1: the per-chunk counts cleared; 2: each chunk's pairs counted per expert.
                    chunks.clear(),
                    chunks.walk(""),
                    // 3: per expert its pairs.
                    chunks.totals(&format!("  memref.store %n, %sh_count[%e] : {count}\n")),
                    // 4: the offsets.
                    format!(
                        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %zero_i32 = arith.constant 0 : i32
  %total = scf.for %e = %c0 to %cD step %c1 iter_args(%a = %zero_i32) -> (i32) {{
    memref.store %a, %sh_off[%e] : {off}
    memref.store %a, %offsets[%e] : memref<?xi32>
    %n = memref.load %sh_count[%e] : {count}
    %a2 = arith.addi %a, %n : i32
    scf.yield %a2 : i32
  }}
  memref.store %total, %offsets[%cD] : memref<?xi32>
}}
"
                    ),
                    // 5: each chunk's pairs into their experts' places in order (token order within
                    // an expert).
                    chunks.walk(&format!(
                        "      %o32 = memref.load %sh_off[%e] : {off}
      %q32 = arith.addi %o32, %n : i32
      %q = arith.index_cast %q32 : i32 to index
      %p_i32 = arith.index_cast %p : index to i32
      memref.store %p_i32, %pairs[%q] : memref<?xi32>
"
                    )),
                ]
            }
            TrainRow::PairRows { .. } => vec![format!(
                "%T = memref.dim %w, %c0 : {m}
%P = arith.muli %T, %cK : index
scf.for %r = %tid to %P step %cT {{
  %p_i32 = memref.load %pairs[%r] : memref<?xi32>
  %p = arith.index_cast %p_i32 : i32 to index
  %pt = arith.divui %p, %cK : index
  %ps = arith.remui %p, %cK : index
  %pt_i32 = arith.index_cast %pt : index to i32
  memref.store %pt_i32, %tok[%r] : memref<?xi32>
  %wv = memref.load %w[%pt, %ps] : {m}
  memref.store %wv, %wt[%r] : memref<?xf32>
  %r_i32 = arith.index_cast %r : index to i32
  memref.store %r_i32, %pos[%p] : memref<?xi32>
}}
"
            )],
            TrainRow::PairCombine { two, .. } => {
                let order = sh("sh_order");
                let term = if two {
                    format!(
                        "    %v1 = memref.load %ys[%q, %o] : {m}\n    %v2 = memref.load %ys2[%q, %o] : {m}\n    %v = arith.addf %v1, %v2 : f32\n"
                    )
                } else {
                    format!("    %v = memref.load %ys[%q, %o] : {m}\n")
                };
                vec![
                    slot_order(&order),
                    format!(
                        "%t = arith.addi %row, %c0 : index
%p0 = arith.muli %t, %cK : index
scf.for %o = %tid to %cD step %cT {{
  %acc = scf.for %r = %c0 to %cK step %c1 iter_args(%a = %zero) -> (f32) {{
    %s_f = memref.load %sh_order[%r] : {order}
    %s_i = arith.fptosi %s_f : f32 to i32
    %s = arith.index_cast %s_i : i32 to index
    %p = arith.addi %p0, %s : index
    %q_i32 = memref.load %pos[%p] : memref<?xi32>
    %q = arith.index_cast %q_i32 : i32 to index
{term}    %a2 = arith.addf %a, %v : f32
    scf.yield %a2 : f32
  }}
  memref.store %acc, %y[%t, %o] : {m}
}}
"
                    ),
                ]
            }
            TrainRow::PairGrad { .. } => {
                let guard = "%T = memref.dim %dy, %c0 : memref<?x?xf32>
%P = arith.muli %T, %cK : index
%real = arith.cmpi ult, %row, %P : index
%t_i32 = memref.load %tok[%row] : memref<?xi32>
%t_raw = arith.index_cast %t_i32 : i32 to index
%t_last = arith.subi %T, %c1 : index
%t = arith.minui %t_raw, %t_last : index
";
                vec![
                    format!(
                        "{guard}%wv = memref.load %wt[%row] : memref<?xf32>
scf.if %real {{
scf.for %o = %tid to %cD step %cT {{
  %gv = memref.load %dy[%t, %o] : {m}
  %dye_v = arith.mulf %gv, %wv : f32
  memref.store %dye_v, %dye[%row, %o] : {m}
}}
}}
"
                    ),
                    format!(
                        "{guard}%first = arith.cmpi eq, %tid, %c0 : index
%write = arith.andi %real, %first : i1
scf.if %write {{
  %dot = scf.for %o = %c0 to %cD step %c1 iter_args(%a = %zero) -> (f32) {{
    %gv = memref.load %dy[%t, %o] : {m}
    %yv = memref.load %y[%row, %o] : {m}
    %x = arith.mulf %gv, %yv : f32
    %a2 = arith.addf %a, %x : f32
    scf.yield %a2 : f32
  }}
  %p_i32 = memref.load %pairs[%row] : memref<?xi32>
  %p = arith.index_cast %p_i32 : i32 to index
  %pt = arith.divui %p, %cK : index
  %ps = arith.remui %p, %cK : index
  memref.store %dot, %dw[%pt, %ps] : {m}
}}
"
                    ),
                ]
            }
            TrainRow::RowScales { .. } => vec![format!(
                "%mat = arith.divui %row, %cMR : index
%sub = arith.remui %row, %cMR : index
%c128 = arith.constant 128 : index
%c127 = arith.constant 127 : index
%mr127 = arith.addi %cMR, %c127 : index
%per = arith.divui %mr127, %c128 : index
%first = arith.muli %mat, %per : index
%blk = arith.divui %sub, %c128 : index
%sr = arith.addi %first, %blk : index
scf.for %c = %tid to %cD step %cT {{
  %v = memref.load %scale[%sr, %c] : {m}
  memref.store %v, %out[%row, %c] : {m}
}}
"
            )],
            TrainRow::MoeGradW { down } => {
                // Pair p is token p / k, slot p % k (k: the routing weights' columns).
                let term = if down {
                    // out[o, i] += (dy[t, o] * w) * h[p, i]
                    "  %gv = memref.load %dy[%pt, %row] : MEM\n  %wv = memref.load %w[%pt, %ps] : MEM\n  %coef = arith.mulf %gv, %wv : f32\n  %sv = memref.load %h[%p, %i] : MEM\n  %prod = arith.mulf %coef, %sv : f32\n"
                } else {
                    // out[i, c] += src[p, i] * x[t, c]
                    "  %sv = memref.load %src[%p, %row] : MEM\n  %xv = memref.load %x[%pt, %i] : MEM\n  %prod = arith.mulf %sv, %xv : f32\n"
                };
                vec![format!(
                    "%K = memref.dim %w, %c1 : {m}
%first_i32 = memref.load %offsets[%c0] : memref<?xi32>
%last_i32 = memref.load %offsets[%c1] : memref<?xi32>
%from = arith.index_cast %first_i32 : i32 to index
%to = arith.index_cast %last_i32 : i32 to index
scf.for %i = %tid to %cD step %cT {{
  %acc = scf.for %r = %from to %to step %c1 iter_args(%a = %zero) -> (f32) {{
    %p_i32 = memref.load %pairs[%r] : memref<?xi32>
    %p = arith.index_cast %p_i32 : i32 to index
    %pt = arith.divui %p, %K : index
    %ps = arith.remui %p, %K : index
{term}    %a2 = arith.addf %a, %prod : f32
    scf.yield %a2 : f32
  }}
  memref.store %acc, %out[%row, %i] : {m}
}}
",
                    term = indent2(&term.replace("MEM", m))
                )]
            }
            TrainRow::Quantize if kernel.weight == "bf16" => kernel.quant_phases(lowering, &|c| {
                format!(
                    "  %v_raw = memref.load %x[%row, {c}] : memref<?x?xbf16>\n  %v = arith.extf %v_raw : bf16 to f32\n"
                )
            }),
            TrainRow::Quantize => {
                kernel.quant_phases(lowering, &|c| format!("  %v = memref.load %x[%row, {c}] : {m}\n"))
            }
            TrainRow::QuantizeBlocks { transposed, .. } => {
                let amax = sh("sh_amax");
                // Element i of the tile: row r_first + i / 128, column c_first + i % 128.
                let at = "  %tr = arith.divui %i, %c128 : index
  %tc = arith.remui %i, %c128 : index
  %r = arith.addi %r_first, %tr : index
  %c = arith.addi %c_first, %tc : index
  %r_in = arith.cmpi ult, %r, %r_end : index
  %c_in = arith.cmpi ult, %c, %K : index
  %inside = arith.andi %r_in, %c_in : i1
";
                // Transposed: row c of the matrix's block of K rows, column r within the matrix.
                let q_at = if transposed { "%qr, %qc" } else { "%r, %c" };
                let q_index = if transposed {
                    "    %qr = arith.addi %mat_out, %c : index\n    %qc = arith.subi %r, %mat_first : index\n"
                } else {
                    ""
                };
                let mut phases = vec![format!(
                    "%m = scf.for %i = %tid to %cTile step %cT iter_args(%mx = %zero) -> (f32) {{
{at}  %mx2 = scf.if %inside -> (f32) {{
    %v = memref.load %w[%r, %c] : {m}
{amax}    scf.yield %mx3 : f32
  }} else {{
    scf.yield %mx : f32
  }}
  scf.yield %mx2 : f32
}}
memref.store %m, %sh_amax[%tid] : {amax_ty}
",
                    amax = indent2(&indent2(&amax_step("%v", "%mx", "%mx3"))),
                    amax_ty = amax
                )];
                phases.extend(tree_phases(
                    kernel.threads,
                    &format!(
                        "%a = memref.load %sh_amax[%tid] : {amax}
%b = memref.load %sh_amax[%other] : {amax}
%gt = arith.cmpf ogt, %b, %a : f32
%c = arith.select %gt, %b, %a : f32
memref.store %c, %sh_amax[%tid] : {amax}"
                    ),
                ));
                phases.push(format!(
                    "%amax = memref.load %sh_amax[%c0] : {amax}
%small = arith.cmpf olt, %amax, %amax_floor : f32
%floored = arith.select %small, %amax_floor, %amax : f32
%s = arith.divf %floored, %e4m3_max : f32
%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  memref.store %s, %scale[%sr, %sc] : {m}
}}
scf.for %i = %tid to %cTile step %cT {{
{at}  scf.if %inside {{
    %v = memref.load %w[%r, %c] : {m}
    %qv = arith.divf %v, %s : f32
{enc}{q_index}    memref.store %byte, %q[{q_at}] : memref<?x?xi8>
  }}
}}
",
                    enc = indent2(&encode_e4m3(lowering, "%qv", "%byte"))
                ));
                phases
            }
            TrainRow::QuantizeCols => vec![format!(
                "%T = memref.dim %x, %c0 : {m}
%Tp = memref.dim %q, %c1 : memref<?x?xi8>
%c127 = arith.constant 127 : index
%T127 = arith.addi %T, %c127 : index
%G = arith.divui %T127, %c128 : index
%per_group = arith.divui %T, %G : index
%cT1 = arith.subi %cT, %c1 : index
%D_up = arith.addi %cD, %cT1 : index
%thread_chunks = arith.divui %D_up, %cT : index
%C = arith.minui %per_group, %thread_chunks : index
%C1 = arith.subi %C, %c1 : index
%D_c = arith.addi %cD, %C1 : index
%width = arith.divui %D_c, %C : index
%work = arith.muli %G, %C : index
%active = arith.cmpi ult, %row, %work : index
scf.if %active {{
%g = arith.remui %row, %G : index
%chunk = arith.divui %row, %G : index
%c_first0 = arith.muli %chunk, %width : index
%c_first = arith.addi %c_first0, %tid : index
%c_end0 = arith.addi %c_first0, %width : index
%c_end = arith.minui %c_end0, %cD : index
%t_first = arith.muli %g, %c128 : index
%t_end0 = arith.addi %t_first, %c128 : index
%t_end = arith.minui %t_end0, %T : index
%t_pad = arith.minui %t_end0, %Tp : index
scf.for %c = %c_first to %c_end step %cT {{
  %m = scf.for %t = %t_first to %t_end step %c1 iter_args(%mx = %zero) -> (f32) {{
    %v = memref.load %x[%t, %c] : {m}
{amax}    scf.yield %mx2 : f32
  }}
  %small = arith.cmpf olt, %m, %amax_floor : f32
  %floored = arith.select %small, %amax_floor, %m : f32
  %s = arith.divf %floored, %e4m3_max : f32
  memref.store %s, %scale[%c, %g] : {m}
  scf.for %t = %t_first to %t_pad step %c1 {{
    %real = arith.cmpi ult, %t, %T : index
    %byte = scf.if %real -> (i8) {{
      %v = memref.load %x[%t, %c] : {m}
      %qv = arith.divf %v, %s : f32
{enc}      scf.yield %byte_v : i8
    }} else {{
      %zero_byte = arith.constant 0 : i8
      scf.yield %zero_byte : i8
    }}
    memref.store %byte, %q[%c, %t] : memref<?x?xi8>
  }}
}}
}}
",
                enc = indent2(&indent2(&indent2(&encode_e4m3(lowering, "%qv", "%byte_v")))),
                amax = indent2(&indent2(&amax_step("%v", "%mx", "%mx2"))),
            )],
            TrainRow::FlashDout { .. } => vec![format!(
                "{BF16_CONSTANTS}%HT = memref.dim %o, %c0 : {m}
%R = arith.divui %HT, %cH : index
scf.for %hh = %tid to %cH step %cT {{
  %hr0 = arith.muli %hh, %R : index
  %hr = arith.addi %hr0, %row : index
  %acc = scf.for %i = %c0 to %cD step %c1 iter_args(%a = %zero) -> (f32) {{
    %g = memref.load %dout[%row, %hh, %i] : memref<?x?x?xf32>
    %ov = memref.load %o[%hr, %i] : {m}
{round}    memref.store %gb, %dob[%hr, %i] : memref<?x?xbf16>
    %prod = arith.mulf %gb_f, %ov : f32
    %a2 = arith.addf %a, %prod : f32
    scf.yield %a2 : f32
  }}
  memref.store %acc, %dd[%hr] : memref<?xf32>
}}
",
                // By its bits, as every row rounds to bf16: `arith.truncf` to bf16 is a libcall
                // (`__truncsfbf2`) on x86 that the JIT need not find.
                round = indent2(&round_bf16("%g", "%gb"))
            )],
            TrainRow::FlashDq { .. } => vec![format!(
                "%HT = memref.dim %dq, %c0 : {m}
%R = arith.divui %HT, %cH : index
scf.for %i = %tid to %cHD step %cT {{
  %hh = arith.divui %i, %cD : index
  %c = arith.remui %i, %cD : index
  %hr0 = arith.muli %hh, %R : index
  %hr = arith.addi %hr0, %row : index
  %v = memref.load %dq[%hr, %c] : {m}
  %is_nope = arith.cmpi ult, %c, %cNope : index
  scf.if %is_nope {{
    memref.store %v, %dq_nope[%row, %hh, %c] : memref<?x?x?xf32>
  }} else {{
    %cr = arith.subi %c, %cNope : index
    memref.store %v, %dq_pe[%row, %hh, %cr] : memref<?x?x?xf32>
  }}
}}
"
            )],
            TrainRow::FlashDkv { .. } => vec![format!(
                "%HS = memref.dim %dk, %c0 : {m}
%R = arith.divui %HS, %cH : index
scf.for %i = %tid to %cHW step %cT {{
  %hh = arith.divui %i, %cPerHead : index
  %c = arith.remui %i, %cPerHead : index
  %hr0 = arith.muli %hh, %R : index
  %hr = arith.addi %hr0, %row : index
  %is_key = arith.cmpi ult, %c, %cNope : index
  %v = scf.if %is_key -> (f32) {{
    %kv = memref.load %dk[%hr, %c] : {m}
    scf.yield %kv : f32
  }} else {{
    %cv = arith.subi %c, %cNope : index
    %vv = memref.load %dv[%hr, %cv] : {m}
    scf.yield %vv : f32
  }}
  memref.store %v, %dkvb[%row, %i] : {m}
}}
scf.for %c = %tid to %cRope step %cT {{
  %kc = arith.addi %c, %cNope : index
  %acc = scf.for %hh = %c0 to %cH step %c1 iter_args(%a = %zero) -> (f32) {{
    %hr0 = arith.muli %hh, %R : index
    %hr = arith.addi %hr0, %row : index
    %x = memref.load %dk[%hr, %kc] : {m}
    %a2 = arith.addf %a, %x : f32
    scf.yield %a2 : f32
  }}
  memref.store %acc, %dpe[%row, %c] : {m}
}}
"
            )],
            TrainRow::SumHeads { .. } => vec![format!(
                "%base = arith.muli %row, %cH : index
scf.for %i = %tid to %cD step %cT {{
  %acc = scf.for %hh = %c0 to %cH step %c1 iter_args(%a = %zero) -> (f32) {{
    %r = arith.addi %base, %hh : index
    %v = memref.load %part[%r, %i] : {m}
    %a2 = arith.addf %a, %v : f32
    scf.yield %a2 : f32
  }}
  memref.store %acc, %y[%row, %i] : {m}
}}
"
            )],
            TrainRow::IdRank => vec![format!(
                "%T = memref.dim %ids, %c0 : memref<?xi64>
%t0 = arith.muli %row, %cT : index
%t = arith.addi %t0, %tid : index
%in = arith.cmpi ult, %t, %T : index
scf.if %in {{
  %mine = memref.load %ids[%t] : memref<?xi64>
  %rank = scf.for %u = %c0 to %T step %c1 iter_args(%r = %c0) -> (index) {{
    %other = memref.load %ids[%u] : memref<?xi64>
    %less = arith.cmpi slt, %other, %mine : i64
    %same = arith.cmpi eq, %other, %mine : i64
    %earlier = arith.cmpi ult, %u, %t : index
    %tie = arith.andi %same, %earlier : i1
    %before = arith.ori %less, %tie : i1
    %one = arith.select %before, %c1, %c0 : index
    %r2 = arith.addi %r, %one : index
    scf.yield %r2 : index
  }}
  %ti = arith.index_cast %t : index to i32
  memref.store %ti, %order[%rank] : memref<?xi32>
}}
"
            )],
            // The row's tokens: from the first sorted position whose id is not below the row's
            // (binary search over `order`), while the id is the row's — in token order (the sort is
            // stable), each column summed from zero as the reference sums it.
            TrainRow::EmbedGrad => vec![format!(
                "%T = memref.dim %ids, %c0 : memref<?xi64>
%v = arith.index_cast %row : index to i64
%c2 = arith.constant 2 : index
%bounds:2 = scf.while (%a = %c0, %b = %T) : (index, index) -> (index, index) {{
  %open = arith.cmpi ult, %a, %b : index
  scf.condition(%open) %a, %b : index, index
}} do {{
^bb0(%a: index, %b: index):
  %span = arith.subi %b, %a : index
  %half = arith.divui %span, %c2 : index
  %mid = arith.addi %a, %half : index
  %tok32 = memref.load %order[%mid] : memref<?xi32>
  %tok = arith.index_cast %tok32 : i32 to index
  %id = memref.load %ids[%tok] : memref<?xi64>
  %below = arith.cmpi slt, %id, %v : i64
  %mid1 = arith.addi %mid, %c1 : index
  %a2 = arith.select %below, %mid1, %a : index
  %b2 = arith.select %below, %b, %mid : index
  scf.yield %a2, %b2 : index, index
}}
%end = scf.while (%p = %bounds#0) : (index) -> index {{
  %more = arith.cmpi ult, %p, %T : index
  %same = scf.if %more -> (i1) {{
    %tok32 = memref.load %order[%p] : memref<?xi32>
    %tok = arith.index_cast %tok32 : i32 to index
    %id = memref.load %ids[%tok] : memref<?xi64>
    %eq = arith.cmpi eq, %id, %v : i64
    scf.yield %eq : i1
  }} else {{
    %no = arith.constant false
    scf.yield %no : i1
  }}
  scf.condition(%same) %p : index
}} do {{
^bb0(%p: index):
  %p2 = arith.addi %p, %c1 : index
  scf.yield %p2 : index
}}
scf.for %i = %tid to %cD step %cT {{
  %acc = scf.for %p = %bounds#0 to %end step %c1 iter_args(%a = %zero) -> (f32) {{
    %tok32 = memref.load %order[%p] : memref<?xi32>
    %tok = arith.index_cast %tok32 : i32 to index
    %g = memref.load %dy[%tok, %i] : {m}
    %s = arith.addf %a, %g : f32
    scf.yield %s : f32
  }}
  memref.store %acc, %out[%row, %i] : {m}
}}
"
            )],
            TrainRow::GradAccum { first } => {
                let f = "memref<?xf32>";
                let store = if first {
                    format!("memref.store %gv, %acc[%i] : {f}\n")
                } else {
                    format!("%av = memref.load %acc[%i] : {f}\n%s = arith.addf %av, %gv : f32\nmemref.store %s, %acc[%i] : {f}\n")
                };
                let scalar = format!("%gv = memref.load %g[%i] : {f}\n{store}");
                // 4 elements of the gradient (and of the sum) a load, of the sum a store.
                let v4 = "vector<4xf32>";
                let load = |u: usize| {
                    let mut t = format!("%gv4_{u} = vector.load %g[%at{u}] {{alignment = 16 : i64}} : {f}, {v4}\n");
                    if !first {
                        let _ = writeln!(t, "%av4_{u} = vector.load %acc[%at{u}] {{alignment = 16 : i64}} : {f}, {v4}");
                    }
                    t
                };
                let store = |u: usize| {
                    if first {
                        format!("vector.store %gv4_{u}, %acc[%at{u}] {{alignment = 16 : i64}} : {f}, {v4}\n")
                    } else {
                        format!(
                            "%s4_{u} = arith.addf %av4_{u}, %gv4_{u} : {v4}
vector.store %s4_{u}, %acc[%at{u}] {{alignment = 16 : i64}} : {f}, {v4}
"
                        )
                    }
                };
                let map = FlatMap { scalar, load: &load, store: &store, buffers: vec![("%g", f, 4), ("%acc", f, 4)] };
                vec![flat_block("%g") + &flat_wide(kernel, lowering, &map)]
            }
            TrainRow::SumSquares => {
                let sum = sh("sh_sum");
                let mut phases = vec![format!(
                    "{}{}memref.store %ss, %sh_sum[%tid] : {sum}\n",
                    flat_block("%g"),
                    sum_of_squares(kernel, lowering)
                )];
                phases.extend(tree_phases(
                    kernel.threads,
                    &format!(
                        "%a = memref.load %sh_sum[%tid] : {sum}
%b = memref.load %sh_sum[%other] : {sum}
%s = arith.addf %a, %b : f32
memref.store %s, %sh_sum[%tid] : {sum}"
                    ),
                ));
                phases.push(format!(
                    "%lead = arith.cmpi eq, %tid, %c0 : index
scf.if %lead {{
  %total = memref.load %sh_sum[%c0] : {sum}
  memref.store %total, %part[%row] : memref<?xf32>
}}
"
                ));
                phases
            }
            TrainRow::AdamW => {
                let f = "memref<?xf32>";
                let h = "memref<?xbf16>";
                let hyper: String = ["scale", "lr", "b1", "omb1", "b2", "omb2", "bc1", "bc2", "eps", "decay"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        format!("%h_i{i} = arith.constant {i} : index\n%{n} = memref.load %hyper[%h_i{i}] : {f}\n")
                    })
                    .collect();
                let scalar = format!(
                    "%gv = memref.load %g[%i] : {f}
%m16 = memref.load %m[%i] : {h}
%v16 = memref.load %v[%i] : {h}
%wv = memref.load %w[%i] : {f}
{math}memref.store %m_r, %m[%i] : {h}
memref.store %v_r, %v[%i] : {h}
memref.store %w_new, %w[%i] : {f}
",
                    math = adamw(lowering, ("%gv", "%m16", "%v16", "%wv"), "")
                );
                // 4 elements a load of each state (the moments' 8 bytes), each element's arithmetic
                // as a column's, the 4 results a store.
                let load = |u: usize| {
                    format!(
                        "%gv4_{u} = vector.load %g[%at{u}] {{alignment = 16 : i64}} : {f}, vector<4xf32>
%m4_{u} = vector.load %m[%at{u}] {{alignment = 8 : i64}} : {h}, vector<4xbf16>
%v4_{u} = vector.load %v[%at{u}] {{alignment = 8 : i64}} : {h}, vector<4xbf16>
%wv4_{u} = vector.load %w[%at{u}] {{alignment = 16 : i64}} : {f}, vector<4xf32>
"
                    )
                };
                let store = |u: usize| {
                    let mut t = String::new();
                    let lanes = |name: &str| (0..VEC).map(|k| format!("{name}_{u}_{k}")).collect::<Vec<_>>().join(", ");
                    for k in 0..VEC {
                        let _ = write!(
                            t,
                            "%gv_{u}_{k} = vector.extract %gv4_{u}[{k}] : f32 from vector<4xf32>
%m16_{u}_{k} = vector.extract %m4_{u}[{k}] : bf16 from vector<4xbf16>
%v16_{u}_{k} = vector.extract %v4_{u}[{k}] : bf16 from vector<4xbf16>
%wv_{u}_{k} = vector.extract %wv4_{u}[{k}] : f32 from vector<4xf32>
{}",
                            adamw(
                                lowering,
                                (
                                    &format!("%gv_{u}_{k}"),
                                    &format!("%m16_{u}_{k}"),
                                    &format!("%v16_{u}_{k}"),
                                    &format!("%wv_{u}_{k}")
                                ),
                                &format!("_{u}_{k}")
                            )
                        );
                    }
                    let _ = write!(
                        t,
                        "%mo4_{u} = vector.from_elements {} : vector<4xbf16>
%vo4_{u} = vector.from_elements {} : vector<4xbf16>
%wo4_{u} = vector.from_elements {} : vector<4xf32>
vector.store %mo4_{u}, %m[%at{u}] {{alignment = 8 : i64}} : {h}, vector<4xbf16>
vector.store %vo4_{u}, %v[%at{u}] {{alignment = 8 : i64}} : {h}, vector<4xbf16>
vector.store %wo4_{u}, %w[%at{u}] {{alignment = 16 : i64}} : {f}, vector<4xf32>
",
                        lanes("%m_r"),
                        lanes("%v_r"),
                        lanes("%w_new")
                    );
                    t
                };
                let map = FlatMap {
                    scalar,
                    load: &load,
                    store: &store,
                    buffers: vec![("%w", f, 4), ("%g", f, 4), ("%m", h, 2), ("%v", h, 2)],
                };
                vec![format!("{BF16_CONSTANTS}{hyper}{}{}", flat_block("%w"), flat_wide(kernel, lowering, &map))]
            }
        }
    }
}

/// AdamW's step of one element (the trainer's arithmetic, [`v3c_models::train::AdamWStep`]): from
/// its gradient `g` (f32, before the clipping `%scale`), moments `m16`, `v16` (bf16) and weight `w`,
/// the moments `%m_r{s}`, `%v_r{s}` (rounded to bf16) and the weight `%w_new{s}`.
fn adamw(lowering: Lowering, (g, m16, v16, w): (&str, &str, &str, &str), s: &str) -> String {
    format!(
        "%gi{s} = arith.mulf {g}, %scale : f32
%mv{s} = arith.extf {m16} : bf16 to f32
%m_a{s} = arith.mulf %b1, %mv{s} : f32
%m_b{s} = arith.mulf %omb1, %gi{s} : f32
%m_n{s} = arith.addf %m_a{s}, %m_b{s} : f32
{round_m}%vv{s} = arith.extf {v16} : bf16 to f32
%v_a{s} = arith.mulf %b2, %vv{s} : f32
%v_b0{s} = arith.mulf %omb2, %gi{s} : f32
%v_b{s} = arith.mulf %v_b0{s}, %gi{s} : f32
%v_n{s} = arith.addf %v_a{s}, %v_b{s} : f32
{round_v}%m_hat{s} = arith.divf %m_r{s}_f, %bc1 : f32
%v_hat{s} = arith.divf %v_r{s}_f, %bc2 : f32
{root}%den{s} = arith.addf %root{s}, %eps : f32
%update{s} = arith.divf %m_hat{s}, %den{s} : f32
%wd{s} = arith.mulf %decay, {w} : f32
%u_wd{s} = arith.addf %update{s}, %wd{s} : f32
%delta{s} = arith.mulf %lr, %u_wd{s} : f32
%w_new{s} = arith.subf {w}, %delta{s} : f32
",
        round_m = unindent(&round_bf16(&format!("%m_n{s}"), &format!("%m_r{s}"))),
        round_v = unindent(&round_bf16(&format!("%v_n{s}"), &format!("%v_r{s}"))),
        root = sqrt(lowering, &format!("%v_hat{s}"), &format!("%root{s}")),
    )
}

/// `%ss`: the sum of squares of this thread's share of the block's elements `%base..%end`
/// ([`flat_block`]): chunks of [`VEC`] elements (the last block's last one shorter), chunk c by
/// thread c mod T, in order, each chunk's elements in order — on every path, so the part has the
/// same bits whichever runs. On sm_90a where `%g` starts on 16 bytes (a block's `%base` is a
/// multiple of `d`: whole chunks), the whole chunks come 16 bytes a load, up to 4 a step (a repeated
/// chunk adds +0: exact, the sum is never -0).
fn sum_of_squares(kernel: &RowKernel, lowering: Lowering) -> String {
    let f = "memref<?xf32>";
    // Chunks `%cs_from..%cs_to` (of this thread's) a column at a time, the sum from `%a_in`.
    let columns = |from: &str, to: &str, a_in: &str, out: &str| {
        format!(
            "{out} = scf.for %ch = {from} to {to} step %cT iter_args(%a = {a_in}) -> (f32) {{
  %c_i0a = arith.muli %ch, %cVec : index
  %c_i0 = arith.addi %base, %c_i0a : index
  %c_i1a = arith.addi %c_i0, %cVec : index
  %c_i1 = arith.minui %c_i1a, %end : index
  %b = scf.for %i = %c_i0 to %c_i1 step %c1 iter_args(%a1 = %a) -> (f32) {{
    %gv = memref.load %g[%i] : {f}
    %sq = arith.mulf %gv, %gv : f32
    %a2 = arith.addf %a1, %sq : f32
    scf.yield %a2 : f32
  }}
  scf.yield %b : f32
}}
"
        )
    };
    let head = "%cVec = arith.constant 4 : index
%fl_n = arith.subi %end, %base : index
%fl_chunks = arith.ceildivui %fl_n, %cVec : index
%cVecs = arith.divui %fl_n, %cVec : index
";
    let scalar = columns("%tid", "%fl_chunks", "%zero", "%ss");
    if lowering != Lowering::Gpu || !kernel.d.is_multiple_of(VEC) {
        return format!("{head}{scalar}");
    }
    let unroll = kernel.wide_unroll(kernel.d / VEC);
    let (step, ids) = chunk_unroll(unroll, kernel.threads);
    let mut body = ids;
    for u in 0..unroll {
        let _ = writeln!(
            body,
            "    %at{u} = arith.addi %base, %i{u} : index
    %g4_{u} = vector.load %g[%at{u}] {{alignment = 16 : i64}} : {f}, vector<4xf32>"
        );
    }
    let mut acc = "%a".to_string();
    for u in 0..unroll {
        let _ = writeln!(
            body,
            "    %gz{u} = arith.select %in{u}, %g4_{u}, %zero4 : vector<4xf32>
    %sq4_{u} = arith.mulf %gz{u}, %gz{u} : vector<4xf32>"
        );
        for k in 0..VEC {
            let _ = writeln!(
                body,
                "    %sq{u}_{k} = vector.extract %sq4_{u}[{k}] : f32 from vector<4xf32>
    %a{u}_{k} = arith.addf {acc}, %sq{u}_{k} : f32"
            );
            acc = format!("%a{u}_{k}");
        }
    }
    // The whole chunks, then the last block's shorter one (its owner's last: chunk order kept).
    format!(
        "{head}{flag}%ss = scf.if %vec -> (f32) {{
  %zero4 = vector.broadcast %zero : f32 to vector<4xf32>
{step}  %sw = scf.for %c0u = %tid to %cVecs step %cTU iter_args(%a = %zero) -> (f32) {{
{body}    scf.yield {acc} : f32
  }}
  %rest0 = arith.subi %cVecs, %tid : index
  %rest1 = arith.ceildivui %rest0, %cT : index
  %rest2 = arith.muli %rest1, %cT : index
  %rest_from = arith.addi %tid, %rest2 : index
  %rest_in = arith.cmpi ult, %tid, %cVecs : index
  %tail_from = arith.select %rest_in, %rest_from, %tid : index
{tail}  scf.yield %st : f32
}} else {{
{scalar}  scf.yield %ss_c : f32
}}
",
        flag = aligned("vec", 16, &[("%g", f, 4)]),
        tail = indent2(&columns("%tail_from", "%fl_chunks", "%sw", "%st")),
        scalar = indent2(&columns("%tid", "%fl_chunks", "%zero", "%ss_c")),
    )
}

/// A flat block's elements mapped one by one ([`flat_wide`]).
struct FlatMap<'a> {
    /// Element `%i`'s loads, arithmetic and stores.
    scalar: String,
    /// Chunk `u`'s loads at its first element `%at{u}` (names ending `_{u}`).
    load: &'a dyn Fn(usize) -> String,
    /// Its arithmetic and stores (where `%in{u}`).
    store: &'a dyn Fn(usize) -> String,
    /// The buffers, each accessed 4 elements at a time (aligned to 4 elements).
    buffers: Vec<Buffer<'a>>,
}

/// The block's elements `%first..%end` ([`flat_block`]) 4 at a time where the GPU lowering takes them
/// and every buffer starts on 4 elements (the block's `%base` is a multiple of `d`, whole chunks), up
/// to 4 chunks' loads a step before their first use; the elements past the last whole chunk (the
/// last block's), and every element otherwise, one at a time (`map.scalar`).
fn flat_wide(kernel: &RowKernel, lowering: Lowering, map: &FlatMap) -> String {
    let scalar = |first: &str| format!("scf.for %i = {first} to %end step %cT {{\n{}}}\n", indent2(&map.scalar));
    if lowering != Lowering::Gpu || !kernel.d.is_multiple_of(VEC) {
        return scalar("%first");
    }
    let unroll = kernel.wide_unroll(kernel.d / VEC);
    let (head, mut ids) = chunk_unroll(unroll, kernel.threads);
    // Each buffer's chunks: 4 elements of its bytes.
    let checks: Vec<(usize, Vec<Buffer>)> = map.buffers.iter().map(|b| (VEC * b.2, vec![*b])).collect();
    let (checks, all) = aligned_all("vec", &checks);
    for u in 0..unroll {
        let _ = writeln!(ids, "    %at{u} = arith.addi %base, %i{u} : index");
    }
    let body = chunk_steps(ids, unroll, map.load, map.store);
    format!(
        "{checks}scf.if {all} {{
  %cVec = arith.constant {VEC} : index
  %fl_n = arith.subi %end, %base : index
  %cVecs = arith.divui %fl_n, %cVec : index
{head}  scf.for %c0u = %tid to %cVecs step %cTU {{
{body}  }}
  %fl_whole = arith.muli %cVecs, %cVec : index
  %fl_rest = arith.addi %base, %fl_whole : index
  %fl_first = arith.addi %fl_rest, %tid : index
{tail}}} else {{
{all_scalar}}}
",
        tail = indent2(&scalar("%fl_first")),
        all_scalar = indent2(&scalar("%first")),
    )
}

/// A block's share of a flat tensor `{x}` (`memref<?xf32>`): elements `%row * d ..` (`%cD` of them,
/// fewer in the last block), this thread's first `%first`, the block's end `%end`.
fn flat_block(x: &str) -> String {
    format!(
        "%n = memref.dim {x}, %c0 : memref<?xf32>
%base = arith.muli %row, %cD : index
%end0 = arith.addi %base, %cD : index
%end = arith.minui %end0, %n : index
%first = arith.addi %base, %tid : index
"
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::{placed, raw, requests_of, run_cpu, run_simulated, values};
    use super::super::RowOp;
    use super::*;
    use v3c_models::interp::kernels;

    fn kernel(op: TrainRow, d: usize) -> RowKernel {
        let k = RowKernel::new(RowOp::Train(op), d, "f32");
        assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k.clone()), "{} round-trips", k.kernel_name());
        k
    }

    /// The third step of AdamW (lr 3e-3, betas 0.9 and 0.95) with weight decay `decay`.
    fn adamw_step(decay: f32) -> v3c_models::train::AdamWStep {
        v3c_models::train::AdamWStep {
            lr: 3e-3,
            b1: 0.9,
            b2: 0.95,
            c1: 1.0 - 0.9f32.powi(3),
            c2: 1.0 - 0.95f32.powi(3),
            eps: 1e-8,
            weight_decay: decay,
        }
    }

    /// The device optimizer's kernels over flat tensors with a partial last block: the windows'
    /// gradients summed in window order, the squares' per-block parts (to f32's rounding of the
    /// f64 sums), and AdamW equal to the trainer's arithmetic ([`v3c_models::train::AdamWStep`])
    /// bit for bit, moments stored as bf16, with and without weight decay.
    #[test]
    fn optimizer_rows_equal_the_trainers_arithmetic() {
        use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
        let (d, n): (usize, usize) = (512, 1300);
        let blocks = n.div_ceil(d);
        let windows: Vec<Vec<f32>> = (0..3).map(|i| values(n, 40 + i, 2.0)).collect();
        let mut acc = vec![f32::NAN; n];
        for (i, g) in windows.iter().enumerate() {
            let mut g = g.clone();
            run_cpu(
                &kernel(TrainRow::GradAccum { first: i == 0 }, d),
                &[raw(&mut g, &[n], "f32"), raw(&mut acc, &[n], "f32")],
            );
        }
        let want: Vec<f32> = (0..n).map(|i| windows[0][i] + windows[1][i] + windows[2][i]).collect();
        assert_eq!(acc, want, "summed in window order");
        let mut part = vec![f32::NAN; blocks];
        run_cpu(&kernel(TrainRow::SumSquares, d), &[raw(&mut acc, &[n], "f32"), raw(&mut part, &[blocks], "f32")]);
        for (b, p) in part.iter().enumerate() {
            let exact: f64 = acc[b * d..((b + 1) * d).min(n)].iter().map(|&x| (x as f64).powi(2)).sum();
            assert!(((*p as f64) - exact).abs() <= 1e-5 * exact, "block {b}: {p} vs {exact}");
        }
        for decay in [0.0, 0.1] {
            let step = adamw_step(decay);
            let scale = 0.37f32;
            let mut w = values(n, 50, 1.0);
            let m32: Vec<f32> = values(n, 51, 0.1).iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect();
            let v32: Vec<f32> = values(n, 52, 0.1).iter().map(|&x| bf16_to_f32(f32_to_bf16(x * x))).collect();
            let (mut m16, mut v16): (Vec<u16>, Vec<u16>) =
                (m32.iter().map(|&x| f32_to_bf16(x)).collect(), v32.iter().map(|&x| f32_to_bf16(x)).collect());
            let (mut want_w, mut want_m, mut want_v) = (w.clone(), m32.clone(), v32.clone());
            for i in 0..n {
                step.apply(acc[i] * scale, &mut want_w[i], &mut want_m[i], &mut want_v[i]);
            }
            let mut hyper = step.hyper(scale).to_vec();
            run_cpu(
                &kernel(TrainRow::AdamW, d),
                &[
                    raw(&mut w, &[n], "f32"),
                    raw(&mut acc, &[n], "f32"),
                    raw(&mut m16, &[n], "bf16"),
                    raw(&mut v16, &[n], "bf16"),
                    raw(&mut hyper, &[10], "f32"),
                ],
            );
            assert!(w == want_w, "decay {decay}: the master weights");
            assert!(m16.iter().map(|&x| bf16_to_f32(x)).eq(want_m.iter().copied()), "decay {decay}: m");
            assert!(v16.iter().map(|&x| bf16_to_f32(x)).eq(want_v.iter().copied()), "decay {decay}: v");
        }
    }

    /// The optimizer's rows through the PTX simulated, against the CPU lowering's bits (the
    /// trainer's; the squares' parts summed in the same chunks on every path): over buffers on 128
    /// bytes (4 elements a load and a store, the last block's 3 past its whole chunks one at a
    /// time) and an element off (every element one at a time).
    #[test]
    fn optimizer_rows_simulated_take_4_elements_a_load_where_aligned() {
        use v3c_models::dtype::f32_to_bf16;
        // 3 blocks, the last of 275 elements: 68 chunks and 3.
        let (d, n): (usize, usize) = (512, 1299);
        let g = values(n, 60, 2.0);
        let acc0 = values(n, 61, 1.0);
        let w0 = values(n, 62, 1.0);
        let m0: Vec<u16> = values(n, 63, 0.1).iter().map(|&x| f32_to_bf16(x)).collect();
        let v0: Vec<u16> = values(n, 64, 0.1).iter().map(|&x| f32_to_bf16(x * x)).collect();
        let hyper = adamw_step(0.1).hyper(0.37).to_vec();
        let blocks = n.div_ceil(d);
        for op in [
            TrainRow::GradAccum { first: true },
            TrainRow::GradAccum { first: false },
            TrainRow::AdamW,
            TrainRow::SumSquares,
        ] {
            let k = kernel(op, d);
            // The outputs' bits by shift (None: the CPU lowering).
            let run = |shift: Option<usize>| -> (Vec<u32>, Vec<u16>, Vec<u16>) {
                let at = shift.unwrap_or(0);
                let (mut gp, mut accp, mut wp) = (placed(&g, at), placed(&acc0, at), placed(&w0, at));
                let (mut mp, mut vp, mut hp) = (placed(&m0, at), placed(&v0, at), placed(&hyper, 0));
                let mut part = placed(&vec![f32::NAN; blocks], 0);
                let buffers = match op {
                    TrainRow::AdamW => vec![
                        raw(wp.slice(), &[n], "f32"),
                        raw(gp.slice(), &[n], "f32"),
                        raw(mp.slice(), &[n], "bf16"),
                        raw(vp.slice(), &[n], "bf16"),
                        raw(hp.slice(), &[10], "f32"),
                    ],
                    TrainRow::SumSquares => vec![raw(gp.slice(), &[n], "f32"), raw(part.slice(), &[blocks], "f32")],
                    _ => vec![raw(gp.slice(), &[n], "f32"), raw(accp.slice(), &[n], "f32")],
                };
                match shift {
                    None => run_cpu(&k, &buffers),
                    Some(shift) => {
                        let stats = run_simulated(&k, &buffers, n.div_ceil(d));
                        let name = format!("{} (PTX simulated, shift {shift})", k.kernel_name());
                        let wide: u64 = requests_of(&stats, &["ld.global.v4", "st.global.v4"]);
                        eprintln!(
                            "{name}: {} instructions, {} load rounds, {wide} wide requests",
                            stats.instructions, stats.load_rounds
                        );
                        assert_eq!(wide > 0, shift == 0, "{name}: {wide} warp requests of 16 bytes");
                    }
                }
                let out = match op {
                    TrainRow::AdamW => wp.slice().to_vec(),
                    TrainRow::SumSquares => part.slice().to_vec(),
                    _ => accp.slice().to_vec(),
                };
                (out.iter().map(|x| x.to_bits()).collect(), mp.slice().to_vec(), vp.slice().to_vec())
            };
            let cpu = run(None);
            for shift in [0, 1] {
                assert!(run(Some(shift)) == cpu, "{}: shift {shift} differs from the CPU lowering", k.kernel_name());
            }
        }
    }

    /// Every layout of the CUDA-core matmul equals the reference's `matmul_t` bit for bit (each
    /// output's inner dimension summed in the reference's order, across the staged slices), for
    /// inner dimensions of 1 (a one-token window's weight gradient), of one slice and a part, and
    /// tiles cut at every edge (rows, columns, the inner dimension).
    #[test]
    fn matmul_rows_equal_the_reference_in_every_layout() {
        for (m, k, n) in [(3, 1, 5), (7, 40, 300), (1, 129, 64), (130, 32, 65), (64, 97, 128), (65, 64, 1)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let kern = kernel(TrainRow::Matmul { transpose_a: ta, transpose_b: tb }, n);
                let (a_shape, b_shape) = (if ta { [k, m] } else { [m, k] }, if tb { [n, k] } else { [k, n] });
                let (mut a, mut b) = (values(m * k, 3, 4.0), values(k * n, 4, 2.0));
                let want = kernels::matmul_t(&a, &b, (m, k, n), (ta, tb), (a_shape[1], b_shape[1]));
                let mut out = vec![f32::NAN; m * n];
                run_cpu(
                    &kern,
                    &[raw(&mut a, &a_shape, "f32"), raw(&mut b, &b_shape, "f32"), raw(&mut out, &[m, n], "f32")],
                );
                assert_eq!(out, want, "{} on {m}x{k}x{n}", kern.kernel_name());
            }
        }
    }

    /// The transposes (a column range of 2-D rows; rows of heads): every element in place, tiles
    /// cut at both edges, the columns past the rows untouched.
    #[test]
    fn transpose_rows_move_every_element() {
        for (rows, cols, start, d, heads) in
            [(5, 40, 3, 33, 0), (70, 64, 0, 64, 0), (33, 6, 0, 6, 3), (1, 96, 0, 96, 4)]
        {
            let mut x = values(rows * cols, 7, 1.0);
            let mut y = vec![f32::NAN; d * (rows + 2)];
            let op = TrainRow::Transpose { start, heads };
            let shape = if heads > 0 { vec![rows, heads, cols / heads] } else { vec![rows, cols] };
            run_cpu(&kernel(op, d), &[raw(&mut x, &shape, "f32"), raw(&mut y, &[d, rows + 2], "f32")]);
            for c in 0..d {
                for r in 0..rows + 2 {
                    let got = y[c * (rows + 2) + r];
                    if r < rows {
                        assert_eq!(got, x[r * cols + start + c], "{rows}x{cols} from {start}: ({r}, {c})");
                    } else {
                        assert!(got.is_nan(), "{rows}x{cols}: column {r} past the rows written");
                    }
                }
            }
        }
    }

    /// Flash attention's layout rows: dout to bf16 head-major with D = rowsum(dout * o) (one
    /// sequential sum per head), dQ back to q_nope's and q_pe's rows, dK and dV to kvb's rows and the
    /// rope key's gradient summed over the heads in order — exactly.
    #[test]
    fn flash_layout_rows_are_their_definitions() {
        use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
        let (t, heads, nope, rope, v) = (5, 3, 4, 6, 7);
        let qk = nope + rope;
        // dout [T, H, v], o [H T, v] -> dob [H T, v] bf16, dd [H T].
        let (mut dout, mut o) = (values(t * heads * v, 1, 1.0), values(heads * t * v, 2, 1.0));
        let (mut dob, mut dd) = (vec![0u16; heads * t * v], vec![f32::NAN; heads * t]);
        run_cpu(
            &kernel(TrainRow::FlashDout { heads }, v),
            &[
                raw(&mut dout, &[t, heads, v], "f32"),
                raw(&mut o, &[heads * t, v], "f32"),
                raw(&mut dob, &[heads * t, v], "bf16"),
                raw(&mut dd, &[heads * t], "f32"),
            ],
        );
        for (h, r) in (0..heads).flat_map(|h| (0..t).map(move |r| (h, r))) {
            let g = &dout[(r * heads + h) * v..][..v];
            let row = (h * t + r) * v;
            let rounded = |x: f32| bf16_to_f32(f32_to_bf16(x));
            let d = g.iter().zip(&o[row..row + v]).fold(0.0f32, |a, (x, y)| a + rounded(*x) * y);
            assert_eq!(dd[h * t + r], d, "D of head {h}, row {r}");
            let got: Vec<f32> = dob[row..row + v].iter().map(|&b| bf16_to_f32(b)).collect();
            let want: Vec<f32> = g.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect();
            assert_eq!(got, want, "dout of head {h}, row {r}");
        }
        // dq [H T, qk] -> dq_nope [T, H, nope], dq_pe [T, H, rope].
        let mut dq = values(heads * t * qk, 3, 1.0);
        let (mut dq_nope, mut dq_pe) = (vec![f32::NAN; t * heads * nope], vec![f32::NAN; t * heads * rope]);
        run_cpu(
            &kernel(TrainRow::FlashDq { heads, nope }, qk),
            &[
                raw(&mut dq, &[heads * t, qk], "f32"),
                raw(&mut dq_nope, &[t, heads, nope], "f32"),
                raw(&mut dq_pe, &[t, heads, rope], "f32"),
            ],
        );
        for (h, r) in (0..heads).flat_map(|h| (0..t).map(move |r| (h, r))) {
            let from = &dq[(h * t + r) * qk..][..qk];
            assert_eq!(&dq_nope[(r * heads + h) * nope..][..nope], &from[..nope], "dq_nope {h} {r}");
            assert_eq!(&dq_pe[(r * heads + h) * rope..][..rope], &from[nope..], "dq_pe {h} {r}");
        }
        // dk [H S, qk], dv [H S, v] -> dkvb [S, H (nope + v)], dpe [S, rope].
        let s_len = 4;
        let (mut dk, mut dv) = (values(heads * s_len * qk, 4, 1.0), values(heads * s_len * v, 5, 1.0));
        let (mut dkvb, mut dpe) = (vec![f32::NAN; s_len * heads * (nope + v)], vec![f32::NAN; s_len * rope]);
        run_cpu(
            &kernel(TrainRow::FlashDkv { heads, nope, v }, qk),
            &[
                raw(&mut dk, &[heads * s_len, qk], "f32"),
                raw(&mut dv, &[heads * s_len, v], "f32"),
                raw(&mut dkvb, &[s_len, heads * (nope + v)], "f32"),
                raw(&mut dpe, &[s_len, rope], "f32"),
            ],
        );
        for r in 0..s_len {
            for h in 0..heads {
                let at = (r * heads + h) * (nope + v);
                assert_eq!(&dkvb[at..at + nope], &dk[(h * s_len + r) * qk..][..nope], "dk {h} {r}");
                assert_eq!(&dkvb[at + nope..at + nope + v], &dv[(h * s_len + r) * v..][..v], "dv {h} {r}");
            }
            for c in 0..rope {
                let sum = (0..heads).fold(0.0f32, |a, h| a + dk[(h * s_len + r) * qk + nope + c]);
                assert_eq!(dpe[r * rope + c], sum, "dpe {r} {c}");
            }
        }
    }

    /// Add, SwiGLU of two inputs and its gradient, and column ranges: exactly the reference's.
    #[test]
    fn elementwise_rows_equal_the_reference() {
        let (rows, d) = (5, 300);
        let (mut g, mut u, mut dy) = (values(rows * d, 5, 12.0), values(rows * d, 6, 3.0), values(rows * d, 7, 1.0));
        let mut y = vec![f32::NAN; rows * d];
        let add = kernel(TrainRow::Add, d);
        run_cpu(
            &add,
            &[raw(&mut g, &[rows, d], "f32"), raw(&mut u, &[rows, d], "f32"), raw(&mut y, &[rows, d], "f32")],
        );
        assert!(y.iter().zip(g.iter().zip(&u)).all(|(y, (a, b))| *y == a + b), "add");
        let silu = kernel(TrainRow::SiluMul, d);
        run_cpu(
            &silu,
            &[raw(&mut g, &[rows, d], "f32"), raw(&mut u, &[rows, d], "f32"), raw(&mut y, &[rows, d], "f32")],
        );
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| kernels::silu(*g) * u).collect();
        assert_eq!(y, want, "silu_mul");
        let grad = kernel(TrainRow::SiluMulGrad, d);
        let (mut dg, mut du) = (vec![f32::NAN; rows * d], vec![f32::NAN; rows * d]);
        run_cpu(
            &grad,
            &[
                raw(&mut g, &[rows, d], "f32"),
                raw(&mut u, &[rows, d], "f32"),
                raw(&mut dy, &[rows, d], "f32"),
                raw(&mut dg, &[rows, d], "f32"),
                raw(&mut du, &[rows, d], "f32"),
            ],
        );
        let (want_dg, want_du) = kernels::silu_mul_grad(&g, &u, &dy);
        assert_eq!((dg, du), (want_dg, want_du), "silu_mul_grad");
        let (start, width) = (37, 200);
        let columns = kernel(TrainRow::Columns { start, stride: d }, width);
        let mut piece = vec![f32::NAN; rows * width];
        run_cpu(&columns, &[raw(&mut g, &[rows * d], "f32"), raw(&mut piece, &[rows, width], "f32")]);
        let want: Vec<f32> = g.chunks(d).flat_map(|r| r[start..start + width].to_vec()).collect();
        assert_eq!(piece, want, "columns");
        // Heads of 60 columns (5 per row of 300): the 20 columns at 40 of every head.
        let heads = kernel(TrainRow::Columns { start: 40, stride: 60 }, 20);
        let mut piece = vec![f32::NAN; rows * 5 * 20];
        run_cpu(&heads, &[raw(&mut g, &[rows * d], "f32"), raw(&mut piece, &[rows * 5, 20], "f32")]);
        let want: Vec<f32> = g.chunks(60).flat_map(|h| h[40..60].to_vec()).collect();
        assert_eq!(piece, want, "columns of heads");
        // A slice into a longer buffer: zeros past x's rows; joined back over the rows of y.
        let mut sliced = vec![f32::NAN; (rows + 2) * width];
        run_cpu(
            &kernel(TrainRow::Slice { start }, width),
            &[raw(&mut g, &[rows, d], "f32"), raw(&mut sliced, &[rows + 2, width], "f32")],
        );
        let want: Vec<f32> = g.chunks(d).flat_map(|r| r[start..start + width].to_vec()).collect();
        assert!(sliced[..rows * width] == want[..], "slice");
        assert!(sliced[rows * width..].iter().all(|v| *v == 0.0), "slice: zeros past x");
        // In bf16 (the selected rows' attention's keys): each value rounded to nearest even.
        let mut sliced16 = vec![0xFFFFu16; rows * width];
        let slice16 = RowKernel::new(RowOp::Train(TrainRow::Slice { start }), width, "bf16");
        assert_eq!(RowKernel::from_name(&slice16.kernel_name()), Some(slice16.clone()));
        run_cpu(&slice16, &[raw(&mut g, &[rows, d], "f32"), raw(&mut sliced16, &[rows, width], "bf16")]);
        let want16: Vec<u16> = want.iter().map(|&v| v3c_models::dtype::f32_to_bf16(v)).collect();
        assert!(sliced16 == want16, "slice in bf16");
        let mut joined = vec![f32::NAN; rows * (width + d)];
        run_cpu(
            &kernel(TrainRow::Join { second: d }, width),
            &[
                raw(&mut sliced, &[rows + 2, width], "f32"),
                raw(&mut u, &[rows, d], "f32"),
                raw(&mut joined, &[rows, width + d], "f32"),
            ],
        );
        let want: Vec<f32> =
            (0..rows).flat_map(|r| [&want[r * width..(r + 1) * width], &u[r * d..(r + 1) * d]].concat()).collect();
        assert!(joined == want, "join");
        assert!(RowKernel::new(RowOp::Train(TrainRow::Columns { start: 50, stride: 60 }), 20, "f32")
            .emit_cpu()
            .is_err_and(|e| e.contains("columns 50..70 of rows 60 wide")));
    }

    /// Row ranges: two matrices concatenated along rows (into, at 0 and shifted by the first's
    /// rows) and split back (from), exactly.
    #[test]
    fn row_ranges_concatenate_and_split_rows() {
        let (p, t, d) = (3, 5, 70);
        let (mut a, mut b) = (values(p * d, 13, 2.0), values(t * d, 14, 2.0));
        let mut both = vec![f32::NAN; (p + t) * d];
        let range = |into, shifted| kernel(TrainRow::RowRange { into, shifted }, d);
        run_cpu(&range(true, false), &[raw(&mut a, &[p, d], "f32"), raw(&mut both, &[p + t, d], "f32")]);
        run_cpu(
            &range(true, true),
            &[raw(&mut b, &[t, d], "f32"), raw(&mut a, &[p, d], "f32"), raw(&mut both, &[p + t, d], "f32")],
        );
        assert_eq!(both, [a.clone(), b.clone()].concat(), "concatenated");
        let (mut first, mut second) = (vec![f32::NAN; p * d], vec![f32::NAN; t * d]);
        run_cpu(&range(false, false), &[raw(&mut both, &[p + t, d], "f32"), raw(&mut first, &[p, d], "f32")]);
        run_cpu(
            &range(false, true),
            &[raw(&mut both, &[p + t, d], "f32"), raw(&mut a, &[p, d], "f32"), raw(&mut second, &[t, d], "f32")],
        );
        assert_eq!((first, second), (a, b), "split back");
    }

    /// RoPE and its gradient (the inverse rotation) on heads of tokens, both pair layouts, from the
    /// table the runtime builds, equal the reference's rotation; a position outside the table
    /// leaves its rows unwritten; the gradient undoes the rotation.
    #[test]
    fn rope_rows_rotate_as_the_reference() {
        let (tokens, heads, dim, table_rows) = (4, 3, 16, 10);
        let inv: Vec<f32> = (0..dim / 2).map(|i| 10000f32.powf(-((2 * i) as f32) / dim as f32)).collect();
        let mut table: Vec<f32> = (0..table_rows as i64)
            .flat_map(|p| {
                let (cos, sin) = v3c_models::rope::cos_sin(&inv, 1.0, p);
                cos.into_iter().chain(sin)
            })
            .collect();
        for interleave in [true, false] {
            for inverse in [false, true] {
                let k = kernel(TrainRow::Rope { heads, interleave, inverse }, dim);
                let mut x = values(tokens * heads * dim, 8, 4.0);
                let mut positions: Vec<i64> = vec![0, 7, 3, 12];
                let mut y = vec![f32::NAN; x.len()];
                run_cpu(
                    &k,
                    &[
                        raw(&mut x, &[tokens * heads, dim], "f32"),
                        raw(&mut positions, &[tokens], "i64"),
                        raw(&mut table, &[table_rows, dim], "f32"),
                        raw(&mut y, &[tokens * heads, dim], "f32"),
                    ],
                );
                for (t, &p) in positions.iter().enumerate() {
                    let rows = t * heads * dim..(t + 1) * heads * dim;
                    if p as usize >= table_rows {
                        assert!(y[rows].iter().all(|v| v.is_nan()), "{}: row {t} written", k.kernel_name());
                        continue;
                    }
                    let (cos, mut sin) = v3c_models::rope::cos_sin(&inv, 1.0, p);
                    if inverse {
                        sin.iter_mut().for_each(|s| *s = -*s);
                    }
                    let mut want = x[rows.clone()].to_vec();
                    want.chunks_mut(dim).for_each(|v| kernels::rotate(v, &cos, &sin, interleave));
                    assert_eq!(y[rows].to_vec(), want, "{}: token {t}", k.kernel_name());
                }
            }
        }
    }

    /// RMSNorm's gradient (dx per row, then dw over the rows) against the reference's: dx within
    /// 1e-5 relative (the block's sums are trees over its threads), dw likewise (it reads the rows'
    /// r); rows of very different magnitudes, bf16 and f32 weights, one row and many.
    #[test]
    fn rms_norm_grad_rows_match_the_reference() {
        for (rows, d, weight) in [(1, 96, "f32"), (9, 700, "f32"), (4, 512, "bf16")] {
            let eps = 1e-6;
            let grad = RowKernel::new(RowOp::Train(TrainRow::RmsNormGrad { eps }), d, weight);
            assert_eq!(RowKernel::from_name(&grad.kernel_name()), Some(grad.clone()));
            let dw_kernel = kernel(TrainRow::RmsNormDw, d);
            let mut x = values(rows * d, 9, 6.0);
            for (r, row) in x.chunks_mut(d).enumerate() {
                row.iter_mut().for_each(|v| *v *= 10f32.powi(r as i32 % 3 - 1));
            }
            let mut dy = values(rows * d, 10, 2.0);
            let w32: Vec<f32> = values(d, 11, 1.0).iter().map(|v| v + 1.0).collect();
            let mut w_bf16: Vec<u16> = w32.iter().map(|&v| v3c_models::dtype::f32_to_bf16(v)).collect();
            let mut w_f32: Vec<f32> = if weight == "bf16" {
                w_bf16.iter().map(|&b| v3c_models::dtype::bf16_to_f32(b)).collect()
            } else {
                w32
            };
            let (want_dx, want_dw) = kernels::rms_norm_grad(&x, &w_f32, &dy, eps);
            let (mut dx, mut r, mut dw) = (vec![f32::NAN; rows * d], vec![f32::NAN; rows], vec![f32::NAN; d]);
            let w_buffer = if weight == "bf16" { raw(&mut w_bf16, &[d], "bf16") } else { raw(&mut w_f32, &[d], "f32") };
            run_cpu(
                &grad,
                &[
                    raw(&mut x, &[rows, d], "f32"),
                    w_buffer,
                    raw(&mut dy, &[rows, d], "f32"),
                    raw(&mut dx, &[rows, d], "f32"),
                    raw(&mut r, &[rows], "f32"),
                ],
            );
            run_cpu(
                &dw_kernel,
                &[
                    raw(&mut x, &[rows, d], "f32"),
                    raw(&mut dy, &[rows, d], "f32"),
                    raw(&mut r, &[rows], "f32"),
                    raw(&mut dw, &[d], "f32"),
                ],
            );
            let scale = |v: &[f32]| v.iter().fold(0.0f32, |a, b| a.max(b.abs()));
            for (what, got, want) in [("dx", &dx, &want_dx), ("dw", &dw, &want_dw)] {
                let tolerance = 1e-5 * scale(want);
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((a - b).abs() <= tolerance, "{}: {what}[{i}] = {a}, reference {b}", grad.kernel_name());
                }
            }
        }
    }

    /// Cross-entropy rows (loss per row, then the mean; and the gradient) against the reference's
    /// f64 computation: within 1e-6 relative (the rows' sums are f32 trees here), for rows of more
    /// columns than threads, a one-row window, and mean rows fewer than the rows buffer holds.
    #[test]
    fn cross_entropy_rows_match_the_reference() {
        for (rows, v) in [(1, 50), (6, 1000)] {
            let weight = 0.3f32;
            let mut logits = values(rows * v, 15, 16.0);
            let mut targets: Vec<i64> = (0..rows).map(|r| ((r * 7 + 3) % v) as i64).collect();
            let (want_loss, want_grad) = kernels::cross_entropy(&logits, &targets, v);
            let grad = kernel(TrainRow::CrossEntropy { grad: true, weight }, v);
            let mut g = vec![f32::NAN; rows * v];
            run_cpu(
                &grad,
                &[
                    raw(&mut logits, &[rows, v], "f32"),
                    raw(&mut targets, &[rows], "i64"),
                    raw(&mut g, &[rows, v], "f32"),
                ],
            );
            let scale = want_grad.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in g.iter().zip(&want_grad).enumerate() {
                assert!((a - weight * b).abs() <= 1e-6 * scale, "{}: [{i}] {a} vs {}", grad.kernel_name(), weight * b);
            }
            let rows_kernel = kernel(TrainRow::CrossEntropy { grad: false, weight }, v);
            // The per-row losses in a buffer of more rows than the window (as the runtime's temporary).
            let mut per_row = vec![f32::NAN; rows + 3];
            run_cpu(
                &rows_kernel,
                &[
                    raw(&mut logits, &[rows, v], "f32"),
                    raw(&mut targets, &[rows], "i64"),
                    raw(&mut per_row, &[rows + 3], "f32"),
                ],
            );
            let mean = kernel(TrainRow::LossMean { weight }, 1);
            let mut loss = vec![f32::NAN];
            run_cpu(
                &mean,
                &[
                    raw(&mut logits, &[rows, v], "f32"),
                    raw(&mut per_row, &[rows + 3], "f32"),
                    raw(&mut loss, &[1], "f32"),
                ],
            );
            let want = weight * want_loss;
            assert!((loss[0] - want).abs() <= 1e-6 * want.abs(), "loss {} vs {want}", loss[0]);
        }
    }

    /// The balance loss (frequencies, per-token terms, their mean) and its gradient against the
    /// reference's f64 computation, and the router logits' gradient against its `route_grad`.
    #[test]
    fn balance_and_routing_gradient_rows_match_the_reference() {
        use v3c_models::config::Scoring;
        let (t, e, k, alpha) = (7, 16, 3, 0.3f32);
        let mut logits = values(t * e, 16, 6.0);
        let mut idx: Vec<i32> = (0..t * k).map(|i| ((i * 5 + i / k) % e) as i32).collect();
        // DeepSeek-V3's sigmoid affinities, then DeepSeek-V2's softmax.
        for softmax in [false, true] {
            let scoring = if softmax { Scoring::Softmax } else { Scoring::Sigmoid };
            let (want_loss, want_dl) = kernels::balance_loss(&logits, &idx, e, k, alpha, scoring);
            let mut freq = vec![f32::NAN; e + 5];
            run_cpu(
                &kernel(TrainRow::ExpertFreq, e),
                &[raw(&mut idx, &[t, k], "i32"), raw(&mut freq, &[e + 5], "f32")],
            );
            let mut dl = vec![f32::NAN; t * e];
            let grad = kernel(TrainRow::BalanceRows { grad: true, alpha, softmax }, e);
            run_cpu(
                &grad,
                &[raw(&mut logits, &[t, e], "f32"), raw(&mut freq, &[e + 5], "f32"), raw(&mut dl, &[t, e], "f32")],
            );
            let scale = want_dl.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in dl.iter().zip(&want_dl).enumerate() {
                assert!((a - b).abs() <= 1e-5 * scale, "{scoring:?} balance dl[{i}] {a} vs {b}");
            }
            let mut per_token = vec![f32::NAN; t];
            let rows_kernel = kernel(TrainRow::BalanceRows { grad: false, alpha, softmax }, e);
            run_cpu(
                &rows_kernel,
                &[raw(&mut logits, &[t, e], "f32"), raw(&mut freq, &[e + 5], "f32"), raw(&mut per_token, &[t], "f32")],
            );
            let mut loss = vec![f32::NAN];
            run_cpu(
                &kernel(TrainRow::LossMean { weight: alpha }, 1),
                &[raw(&mut logits, &[t, e], "f32"), raw(&mut per_token, &[t], "f32"), raw(&mut loss, &[1], "f32")],
            );
            assert!((loss[0] - want_loss).abs() <= 1e-5 * want_loss.abs(), "balance loss {} vs {want_loss}", loss[0]);
            // (Softmax routing is never normalized.)
            for norm in [true, false].into_iter().filter(|n| !(softmax && *n)) {
                let routing = v3c_models::graph::Routing {
                    top_k: k,
                    n_group: 1,
                    topk_group: 1,
                    norm_topk_prob: norm,
                    routed_scaling_factor: 2.5,
                    scoring,
                };
                let mut dw = values(t * k, 17, 1.0);
                let mut want = Vec::new();
                for r in 0..t {
                    let sel: Vec<usize> = idx[r * k..(r + 1) * k].iter().map(|&i| i as usize).collect();
                    want.extend(kernels::route_grad(
                        &logits[r * e..(r + 1) * e],
                        &sel,
                        &dw[r * k..(r + 1) * k],
                        &routing,
                    ));
                }
                let route = kernel(TrainRow::RouteGrad { norm, scale: 2.5, softmax }, e);
                let mut got = vec![f32::NAN; t * e];
                run_cpu(
                    &route,
                    &[
                        raw(&mut logits, &[t, e], "f32"),
                        raw(&mut idx, &[t, k], "i32"),
                        raw(&mut dw, &[t, k], "f32"),
                        raw(&mut got, &[t, e], "f32"),
                    ],
                );
                assert_eq!(got, want, "{}", route.kernel_name());
                // The PTX: within the GPU's exp.
                let mut simulated = vec![f32::NAN; t * e];
                run_simulated(
                    &route,
                    &[
                        raw(&mut logits, &[t, e], "f32"),
                        raw(&mut idx, &[t, k], "i32"),
                        raw(&mut dw, &[t, k], "f32"),
                        raw(&mut simulated, &[t, e], "f32"),
                    ],
                    t,
                );
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in simulated.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * scale, "{} (PTX) dl[{i}] {a} vs {b}", route.kernel_name());
                }
            }
        }
    }

    /// Naive MLA (forward and backward rows) against the reference's `mla` and `mla_grad`, with
    /// more keys than queries (continuations) and as many: forward and the queries' gradients
    /// equal bit for bit; the latent's and kv_b's gradients within 1e-5 relative (the latent's
    /// rope columns sum per head first, then over the heads).
    #[test]
    fn mla_rows_match_the_reference() {
        // `[width, rows + 1]`: columns `from..from + width` of `x [rows, cols]` transposed, the
        // last column NaN.
        fn transposed(x: &[f32], rows: usize, cols: usize, from: usize, width: usize) -> Vec<f32> {
            let mut y = vec![f32::NAN; width * (rows + 1)];
            for r in 0..rows {
                for c in 0..width {
                    y[c * (rows + 1) + r] = x[r * cols + from + c];
                }
            }
            y
        }
        use v3c_models::graph::AttentionForm;
        let (h, dn, dr, dv, kv) = (3, 8, 4, 6, 16);
        let dims = kernels::MlaDims { heads: h, nope: dn, rope: dr, v: dv, kv_lora: kv };
        let (hp, c) = (h * (dn + dv), kv + dr);
        // Capacities holding every key, and chunks of 3 and of 1 key (query) through shared memory;
        // one query (key) a block, and groups of 2 and 3 (the last one short: 5 and 7 rows).
        let shapes = [(5, 5), (3, 7), (1, 1), (5, 7)];
        for ((context, group), (t, s_len)) in
            [64, 3, 1].into_iter().flat_map(|c| [1, 2, 3].map(|g| (c, g))).flat_map(|cg| shapes.map(|ts| (cg, ts)))
        {
            let m = Mla { heads: h, nope: dn, rope: dr, v: dv, kv, context, group, scale: 0.37 };
            let visible: Vec<usize> = (0..t).map(|i| s_len - t + i).collect();
            let (mut qn, mut qp) = (values(t * h * dn, 20, 2.0), values(t * h * dr, 21, 2.0));
            let (mut latent, kv_b) = (values(s_len * c, 22, 2.0), values(hp * kv, 23, 0.5));
            let mut g = values(t * h * dv, 24, 1.0);
            let ckv: Vec<f32> = (0..s_len).flat_map(|j| latent[j * c..j * c + kv].to_vec()).collect();
            let mut kvb = kernels::matmul_nt(&ckv, &kv_b, s_len, kv, hp);
            let want = kernels::mla(&qn, &qp, &latent, &kv_b, &visible, s_len, dims, m.scale, AttentionForm::Naive);
            let bufs = |qn: &mut Vec<f32>, qp: &mut Vec<f32>, latent: &mut Vec<f32>, kvb: &mut Vec<f32>| {
                vec![
                    raw(qn, &[t, h, dn], "f32"),
                    raw(qp, &[t, h, dr], "f32"),
                    raw(latent, &[s_len, c], "f32"),
                    raw(kvb, &[s_len, hp], "f32"),
                ]
            };
            // The keys' (queries') operands transposed, a column more than the rows (a temporary
            // of the run's rows).
            let (mut kvbt, mut latt) = (transposed(&kvb, s_len, hp, 0, hp), transposed(&latent, s_len, c, kv, dr));
            let (mut qnt, mut qpt) = (transposed(&qn, t, h * dn, 0, h * dn), transposed(&qp, t, h * dr, 0, h * dr));
            let mut gt = transposed(&g, t, h * dv, 0, h * dv);
            let mut out = vec![f32::NAN; t * h * dv];
            let mut args = bufs(&mut qn, &mut qp, &mut latent, &mut kvb);
            args.extend([raw(&mut kvbt, &[hp, s_len + 1], "f32"), raw(&mut latt, &[dr, s_len + 1], "f32")]);
            args.push(raw(&mut out, &[t, h * dv], "f32"));
            run_cpu(&kernel(TrainRow::MlaForward(m), kv), &args);
            assert_eq!(out, want, "forward, {t} queries over {s_len} keys, capacity {context}, groups of {group}");
            let [want_dqn, want_dqp, want_dlat, want_dkv_b] =
                kernels::mla_grad(&qn, &qp, &latent, &kv_b, &g, &visible, s_len, dims, m.scale);
            let (mut dqn, mut dqp, mut stats) =
                (vec![f32::NAN; t * h * dn], vec![f32::NAN; t * h * dr], vec![f32::NAN; t * h * 3]);
            let mut args = bufs(&mut qn, &mut qp, &mut latent, &mut kvb);
            args.extend([
                raw(&mut kvbt, &[hp, s_len + 1], "f32"),
                raw(&mut latt, &[dr, s_len + 1], "f32"),
                raw(&mut g, &[t, h, dv], "f32"),
                raw(&mut dqn, &[t, h, dn], "f32"),
                raw(&mut dqp, &[t, h, dr], "f32"),
                raw(&mut stats, &[t * h, 3], "f32"),
            ]);
            run_cpu(&kernel(TrainRow::MlaGradQ(m), kv), &args);
            let at = format!("{t} queries over {s_len} keys, capacity {context}, groups of {group}");
            assert_eq!((&dqn, &dqp), (&want_dqn, &want_dqp), "d q, {at}");
            // The keys' gradient into rows past the latent's too (a temporary's rows: zeros there),
            // and with one key a block for the same bits.
            let rows = s_len + 2;
            let mut grad_kv = |m: Mla| {
                let (mut dkvb, mut part) = (vec![f32::NAN; rows * hp], vec![f32::NAN; rows * h * dr]);
                let mut args = bufs(&mut qn, &mut qp, &mut latent, &mut kvb);
                args.extend([
                    raw(&mut qnt, &[h * dn, t + 1], "f32"),
                    raw(&mut qpt, &[h * dr, t + 1], "f32"),
                    raw(&mut gt, &[h * dv, t + 1], "f32"),
                    raw(&mut g, &[t, h, dv], "f32"),
                    raw(&mut stats, &[t * h, 3], "f32"),
                    raw(&mut dkvb, &[rows, hp], "f32"),
                    raw(&mut part, &[rows * h, dr], "f32"),
                ]);
                run_cpu(&kernel(TrainRow::MlaGradKv(m), kv), &args);
                (dkvb, part)
            };
            let (mut dkvb, mut part) = grad_kv(m);
            assert!(
                dkvb[s_len * hp..].iter().chain(&part[s_len * h * dr..]).all(|&x| x == 0.0),
                "rows past the keys, {at}"
            );
            if group > 1 {
                assert!(
                    grad_kv(Mla { group: 1, ..m }) == (dkvb.clone(), part.clone()),
                    "d kvb, part vs one key a block, {at}"
                );
            }
            dkvb.truncate(s_len * hp);
            part.truncate(s_len * h * dr);
            let mut dpe = vec![f32::NAN; s_len * dr];
            run_cpu(
                &kernel(TrainRow::SumHeads { heads: h }, dr),
                &[raw(&mut part, &[s_len * h, dr], "f32"), raw(&mut dpe, &[s_len, dr], "f32")],
            );
            let dckv = kernels::matmul_t(&dkvb, &kv_b, (s_len, hp, kv), (false, false), (hp, kv));
            let dlat: Vec<f32> =
                (0..s_len).flat_map(|j| [&dckv[j * kv..(j + 1) * kv], &dpe[j * dr..(j + 1) * dr]].concat()).collect();
            let dkv_b = kernels::matmul_t(&dkvb, &ckv, (hp, s_len, kv), (true, false), (hp, kv));
            for (what, got, want) in [("d latent", &dlat, &want_dlat), ("d kv_b", &dkv_b, &want_dkv_b)] {
                let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * scale, "{what}[{i}] = {a}, reference {b} ({at})");
                }
            }
        }
    }

    /// The FP8 recipe's quantizers (1x128 rows, 128x128 blocks and their transpose, 128x1 token
    /// tiles transposed) give the reference's bits and scales, with edge tiles (dims not multiples
    /// of 128) and more than one token group.
    #[test]
    fn fp8_recipe_rows_equal_the_reference() {
        let (t, n, k) = (150, 200, 136);
        let mut x = values(t * k, 30, 8.0);
        let mut dy = values(t * n, 31, 0.01);
        let mut w = values(n * k, 32, 0.2);
        // Rows: the 1x128 quantization of x.
        let (want_q, want_s) = kernels::quantize_fp8(&x, k, 128);
        let (mut q, mut sc) = (vec![0u8; t * k], vec![f32::NAN; t * 2]);
        run_cpu(
            &kernel(TrainRow::Quantize, k),
            &[raw(&mut x, &[t, k], "f32"), raw(&mut q, &[t, k], "i8"), raw(&mut sc, &[t, 2], "f32")],
        );
        assert!(q == want_q && sc == want_s, "1x128 rows");
        // bf16 rows (the prefill attention's bf16 latent cache): those of their f32 values.
        let mut x16: Vec<u16> = x.iter().map(|&v| v3c_models::dtype::f32_to_bf16(v)).collect();
        let wide: Vec<f32> = x16.iter().map(|&b| v3c_models::dtype::bf16_to_f32(b)).collect();
        let (want_q, want_s) = kernels::quantize_fp8(&wide, k, 128);
        let (mut q, mut sc) = (vec![0u8; t * k], vec![f32::NAN; t * 2]);
        let rows16 = RowKernel::new(RowOp::Train(TrainRow::Quantize), k, "bf16");
        assert_eq!(RowKernel::from_name(&rows16.kernel_name()).as_ref(), Some(&rows16));
        run_cpu(&rows16, &[raw(&mut x16, &[t, k], "bf16"), raw(&mut q, &[t, k], "i8"), raw(&mut sc, &[t, 2], "f32")]);
        assert!(q == want_q && sc == want_s, "1x128 rows of bf16");
        // Blocks, and blocks transposed.
        let (want_q, want_s) = kernels::quantize_master(&w, n, k);
        let (nb, kb) = (n.div_ceil(128), k.div_ceil(128));
        let (mut q, mut sc) = (vec![0u8; n * k], vec![f32::NAN; nb * kb]);
        run_cpu(
            &kernel(TrainRow::QuantizeBlocks { tiles: kb, transposed: false, matrix_rows: 0 }, 128),
            &[raw(&mut w, &[n, k], "f32"), raw(&mut q, &[n, k], "i8"), raw(&mut sc, &[nb, kb], "f32")],
        );
        assert!(q == want_q && sc == want_s, "128x128 blocks");
        let (mut qt, mut sct) = (vec![0u8; n * k], vec![f32::NAN; nb * kb]);
        run_cpu(
            &kernel(TrainRow::QuantizeBlocks { tiles: nb, transposed: true, matrix_rows: 0 }, 128),
            &[raw(&mut w, &[n, k], "f32"), raw(&mut qt, &[k, n], "i8"), raw(&mut sct, &[kb, nb], "f32")],
        );
        assert!(qt == kernels::transpose(&want_q, n, k) && sct == kernels::transpose(&want_s, nb, kb), "transposed");
        // Stacked matrices (experts of 200 rows, not a multiple of 128): each in blocks of its own.
        let (e, mr) = (3, 200);
        let mut stacked = values(e * mr * k, 33, 0.3);
        let rb = mr.div_ceil(128);
        let (mut q, mut sc) = (vec![0u8; e * mr * k], vec![f32::NAN; e * rb * kb]);
        run_cpu(
            &kernel(TrainRow::QuantizeBlocks { tiles: kb, transposed: false, matrix_rows: mr }, 128),
            &[
                raw(&mut stacked, &[e * mr, k], "f32"),
                raw(&mut q, &[e * mr, k], "i8"),
                raw(&mut sc, &[e * rb, kb], "f32"),
            ],
        );
        let (mut qt, mut sct) = (vec![0u8; e * mr * k], vec![f32::NAN; e * rb * kb]);
        run_cpu(
            &kernel(TrainRow::QuantizeBlocks { tiles: rb, transposed: true, matrix_rows: mr }, 128),
            &[
                raw(&mut stacked, &[e * mr, k], "f32"),
                raw(&mut qt, &[e * k, mr], "i8"),
                raw(&mut sct, &[e * kb, rb], "f32"),
            ],
        );
        for m in 0..e {
            let (want_q, want_s) = kernels::quantize_master(&stacked[m * mr * k..(m + 1) * mr * k], mr, k);
            assert!(q[m * mr * k..(m + 1) * mr * k] == want_q[..], "stacked bits {m}");
            assert!(sc[m * rb * kb..(m + 1) * rb * kb] == want_s[..], "stacked scales {m}");
            assert!(
                qt[m * mr * k..(m + 1) * mr * k] == kernels::transpose(&want_q, mr, k)[..],
                "stacked transposed {m}"
            );
            assert!(
                sct[m * rb * kb..(m + 1) * rb * kb] == kernels::transpose(&want_s, rb, kb)[..],
                "scales transposed {m}"
            );
        }
        // 128x1 token tiles of dy and x, transposed (Wgrad's GEMM operands): the reference's
        // 1x128 quantization of the transposes, the columns past the tokens zero; one partial
        // group, whole groups, a partial second one (the leading tokens of dy and x).
        for tokens in [7, 128, t] {
            let (padded, groups) = (tokens.next_multiple_of(16), tokens.div_ceil(128));
            for (m, c) in [(&mut dy, n), (&mut x, k)] {
                let (mut q, mut sc) = (vec![0xAAu8; c * padded], vec![f32::NAN; c * groups]);
                let mut m = m[..tokens * c].to_vec();
                // As many blocks as tokens (the kernel's grid: x's rows).
                run_cpu(
                    &kernel(TrainRow::QuantizeCols, c),
                    &[
                        raw(&mut m, &[tokens, c], "f32"),
                        raw(&mut q, &[c, padded], "i8"),
                        raw(&mut sc, &[c, groups], "f32"),
                    ],
                );
                let (want_q, want_s) = kernels::quantize_fp8(&kernels::transpose(&m, tokens, c), tokens, 128);
                for r in 0..c {
                    let row = &q[r * padded..(r + 1) * padded];
                    assert!(row[..tokens] == want_q[r * tokens..(r + 1) * tokens], "{tokens} tokens: bits, column {r}");
                    assert!(row[tokens..].iter().all(|&b| b == 0), "{tokens} tokens: padding, column {r}");
                }
                assert!(sc == want_s, "{tokens} tokens: 128x1 scales");
            }
        }
    }

    /// The embedding gradient sums each id's rows in token order — exactly the reference's — with
    /// repeated ids, ids never seen (zero rows), the first and last ids, a one-token window and
    /// windows over several blocks of the sort: the ids' ranks are their stable sort.
    #[test]
    fn embed_grad_rows_equal_the_reference() {
        let d = 300;
        let many = |t: usize, vocab: usize| -> Vec<i64> {
            values(t, 31, 1.0).iter().map(|v| ((v.abs() * 7919.0) as usize % vocab) as i64).collect()
        };
        let windows = [
            (11, vec![3i64, 0, 3, 10, 3, 7]),
            (11, vec![5]),
            (37, many(700, 37)),
            (2000, many(513, 2000)),
            (5, vec![4; 300]),
        ];
        for (vocab, ids) in windows {
            let t = ids.len();
            let mut dy = values(t * d, 12, 3.0);
            let mut want = vec![0.0f32; vocab * d];
            for (row, &id) in ids.iter().enumerate() {
                for i in 0..d {
                    want[id as usize * d + i] += dy[row * d + i];
                }
            }
            let mut sorted: Vec<i32> = (0..t as i32).collect();
            sorted.sort_by_key(|&u| ids[u as usize]);
            let rank = kernel(TrainRow::IdRank, 256);
            let (mut ids, mut order) = (ids.clone(), vec![-1i32; t]);
            run_cpu(&rank, &[raw(&mut ids, &[t], "i64"), raw(&mut order, &[t], "i32")]);
            assert_eq!(order, sorted, "{}: {t} tokens, a stable sort by id", rank.kernel_name());
            let k = kernel(TrainRow::EmbedGrad, d);
            let mut out = vec![f32::NAN; vocab * d];
            run_cpu(
                &k,
                &[
                    raw(&mut ids, &[t], "i64"),
                    raw(&mut order, &[t], "i32"),
                    raw(&mut dy, &[t, d], "f32"),
                    raw(&mut out, &[vocab, d], "f32"),
                ],
            );
            assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: {t} tokens", k.kernel_name());
        }
    }
}
