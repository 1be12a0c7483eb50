//! Row kernels of DeepSeek-V3.2's sparse attention (the lightning indexer and what feeds the
//! attention its selected rows), and the two small ops its MLA adds:
//! - [`SparseRow::LayerNorm`]: the indexer key's `LayerNorm` with bias, the reference's order
//!   (both means summed in column order by one thread: the rows are 128 wide);
//! - [`SparseRow::IndexScores`]: a query's score for every key it may see, [`SCORE_PARTS`] blocks a
//!   query (each every `SCORE_PARTS`-th run of keys: decode's few queries still fill the SMs), two
//!   keys a thread: `sum_h w_h / sqrt(H) relu(q_h . k / sqrt(D))`, heads and dims summed in the
//!   reference's order (its bits on the CPU lowering), the query's heads and weights in shared
//!   memory, the keys read in place (the last `D` columns of the cache rows); none for a query that
//!   sees at most `top_k` keys (all of them are its selection, whatever their scores). With `mma`
//!   the same scores on the tensor cores at f32's accuracy ([`super::index_mma`]);
//! - [`SparseRow::TopKeys`]: the `top_k` best of those scores, ascending, ties to the earlier key,
//!   padded with -1 ([`v3c_models::interp::kernels::select_top_keys`]): the threshold is the
//!   `top_k`-th largest score's total-order key, found a byte at a time (4 radix passes over the
//!   scores: the keys that match the bytes found so far counted into 256 bins of the next byte by
//!   shared-memory atomics, the bins summed in 16 groups, one thread walking the groups then the
//!   bins from the top), then every key above it and the earliest keys equal to it are written in
//!   key order (each thread a contiguous chunk, its place from a scan of the threads' counts);
//! - [`SparseRow::GatherRows`]: each query's selected latent rows (the first `d` columns of the
//!   cache rows), zeros past its selection, and its last valid row's index;
//! - [`SparseRow::CacheWrite`]: decode's new cache rows written in place at their positions;
//! - [`SparseRow::AppendBf16`]: prefill's bf16 cache rows, the new ones (rounded) after the old.
//!
//! `decode`: the keys are the sessions' caches `[B, S, C]` with a position per query (query b sees
//! rows `0..=position_b` of sequence b); otherwise (prefill) one sequence's rows `[S, C]` whose last
//! T are the queries' own (query t sees rows `0..=S - T + t`).

use std::fmt::Write;

use super::index_mma::IndexMma;
use super::{loop_phases, sqrt, Lowering, RowKernel};

/// Blocks a query's scores take ([`SparseRow::IndexScores`]; on the tensor cores, decode's: each
/// block stages its query's heads once, and prefill's many queries fill the SMs with 2).
pub const SCORE_PARTS: usize = 8;
const PREFILL_MMA_PARTS: usize = 2;

/// A sparse-attention row kernel (its `d`: see each).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SparseRow {
    /// `y = (x - mean) / sqrt(var + eps) * w + b` over rows of `d` (x, w, b, y).
    LayerNorm { eps: f32 },
    /// Scores of keys `d` wide (q `[T, heads, d]`, w `[T, heads]`, keys, (positions), scores `[T, S]`)
    /// for the selection of `top_k` ([`SparseRow::TopKeys`]): a query that sees at most `top_k`
    /// keys takes all of them whatever their scores, and none of its scores is computed. `mma`: on
    /// the tensor cores ([`super::index_mma`]), else the CUDA cores in the reference's order.
    /// `bf16_keys`: the key rows are bf16 (the caches' rows; on the tensor cores only).
    IndexScores { heads: usize, decode: bool, top_k: usize, mma: bool, bf16_keys: bool },
    /// The best `d` keys of each row of scores (scores `[T, S]`, (positions), selected `[T, d]` i32).
    TopKeys { decode: bool },
    /// Selected rows' first `d` columns (keys, selected `[T, K]` i32, rows `[T K, d]`, last `[T]` i64).
    GatherRows { decode: bool },
    /// `cache[b, position_b] = row[b]`, rows of `d` (cache `[B, S, d]`, new `[B, d]`, positions);
    /// `bf16`: the cache's rows are bf16, the new rows rounded to nearest even.
    CacheWrite { bf16: bool },
    /// Rows of `d` into bf16 cache rows after a prefill (y `[P + T, d]` bf16): the cache's `P` old
    /// rows copied (x `[P, d]` bf16, y), or (`new`) the `T` new rows rounded to nearest even after
    /// them (x `[T, d]` f32, the old rows `[P, d]` for `P`, y).
    AppendBf16 { new: bool },
}

/// One thread's LayerNorm statistics of row `%row` of `x` (`x.0`, `memref<?x?xf32>`; `x.1` its
/// width as an index constant, `x.2` as f32): the mean, then the biased variance, each a sum in
/// column order (the reference's), and `1 / sqrt(var + eps)` stored as `sh_red[0]`, `sh_red[1]`
/// (`red`: its memref type). Thread 0's phase; the others wait at the barrier after it.
pub(super) fn layer_norm_stats(
    lowering: Lowering,
    (x, cols, fcols): (&str, &str, &str),
    eps: &str,
    red: &str,
) -> String {
    format!(
        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %sum = scf.for %i = %c0 to {cols} step %c1 iter_args(%a = %zero) -> (f32) {{
    %v = memref.load {x}[%row, %i] : memref<?x?xf32>
    %a2 = arith.addf %a, %v : f32
    scf.yield %a2 : f32
  }}
  %mean = arith.divf %sum, {fcols} : f32
  %sq = scf.for %i = %c0 to {cols} step %c1 iter_args(%a = %zero) -> (f32) {{
    %v = memref.load {x}[%row, %i] : memref<?x?xf32>
    %dv = arith.subf %v, %mean : f32
    %d2 = arith.mulf %dv, %dv : f32
    %a2 = arith.addf %a, %d2 : f32
    scf.yield %a2 : f32
  }}
  %var = arith.divf %sq, {fcols} : f32
  %ve = arith.addf %var, {eps} : f32
{sqrt}  %inv = arith.divf %one, %root : f32
  memref.store %mean, %sh_red[%c0] : {red}
  memref.store %inv, %sh_red[%c1] : {red}
}}
",
        sqrt = indent(&sqrt(lowering, "%ve", "%root"), "  ")
    )
}

impl SparseRow {
    pub(super) fn kernel_name(&self, d: usize, weight: &str, threads: usize) -> String {
        let t = threads;
        let mode = |decode: bool| if decode { "decode" } else { "prefill" };
        match *self {
            SparseRow::LayerNorm { eps } => {
                let eps = format!("{eps:e}").replace('-', "m").replace('.', "p");
                format!("rows_layernorm_{weight}_d{d}_t{t}_eps{eps}")
            }
            SparseRow::IndexScores { heads, decode, top_k, mma, bf16_keys } => {
                let mma = if mma { "_mma" } else { "" };
                let keys = if bf16_keys { "_bf16" } else { "" };
                format!("rows_indexscores_d{d}_h{heads}_k{top_k}_t{t}_{}{mma}{keys}", mode(decode))
            }
            SparseRow::TopKeys { decode } => format!("rows_topkeys_d{d}_t{t}_{}", mode(decode)),
            SparseRow::GatherRows { decode } => format!("rows_gatherrows_d{d}_t{t}_{}", mode(decode)),
            SparseRow::CacheWrite { bf16 } => format!("rows_cachewrite_d{d}_t{t}{}", if bf16 { "_bf16" } else { "" }),
            SparseRow::AppendBf16 { new } => format!("rows_appendbf16_d{d}_t{t}_{}", if new { "new" } else { "old" }),
        }
    }

    /// The kernel a [`SparseRow::kernel_name`] names (the caller checks that the name round-trips).
    pub(super) fn from_name(name: &str) -> Option<RowKernel> {
        let parts: Vec<&str> = name.strip_prefix("rows_")?.split('_').collect();
        let number = |part: &str, prefix: &str| -> Option<usize> { part.strip_prefix(prefix)?.parse().ok() };
        let decode = |m: &str| match m {
            "decode" => Some(true),
            "prefill" => Some(false),
            _ => None,
        };
        let kernel = |op: SparseRow, d: &str, weight: &str, t: &str| -> Option<RowKernel> {
            Some(RowKernel {
                op: super::RowOp::Sparse(op),
                d: number(d, "d")?,
                weight: weight.to_string(),
                threads: number(t, "t")?,
            })
        };
        match parts[..] {
            ["layernorm", w, d, t, eps] => {
                let eps = eps.strip_prefix("eps")?.replace('m', "-").replace('p', ".").parse().ok()?;
                kernel(SparseRow::LayerNorm { eps }, d, w, t)
            }
            ["indexscores", d, h, k, t, m, ref rest @ ..] => {
                let (heads, top_k) = (number(h, "h")?, number(k, "k")?);
                let (mma, bf16_keys) = match rest {
                    [] => (false, false),
                    ["mma"] => (true, false),
                    ["mma", "bf16"] => (true, true),
                    _ => return None,
                };
                let op = SparseRow::IndexScores { heads, decode: decode(m)?, top_k, mma, bf16_keys };
                kernel(op, d, "f32", t)
            }
            ["topkeys", d, t, m] => kernel(SparseRow::TopKeys { decode: decode(m)? }, d, "f32", t),
            ["gatherrows", d, t, m] => kernel(SparseRow::GatherRows { decode: decode(m)? }, d, "f32", t),
            ["appendbf16", d, t, w @ ("old" | "new")] => kernel(SparseRow::AppendBf16 { new: w == "new" }, d, "f32", t),
            ["cachewrite", d, t, ref rest @ ..] if rest.is_empty() || rest == ["bf16"] => {
                kernel(SparseRow::CacheWrite { bf16: !rest.is_empty() }, d, "f32", t)
            }
            _ => None,
        }
    }

    /// The kernel's arguments in order (name, memref type): inputs, then results.
    pub(super) fn arguments(&self, weight: &str) -> Vec<(&'static str, String)> {
        let rows = || "memref<?x?xf32>".to_string();
        let keys = |decode: bool| if decode { "memref<?x?x?xf32>".to_string() } else { rows() };
        let keys_of = |decode: bool, bf16: bool| keys(decode).replace("f32", if bf16 { "bf16" } else { "f32" });
        let positions = ("positions", "memref<?xi64>".to_string());
        match *self {
            SparseRow::LayerNorm { .. } => {
                vec![
                    ("x", rows()),
                    ("w", format!("memref<?x{weight}>")),
                    ("b", format!("memref<?x{weight}>")),
                    ("y", rows()),
                ]
            }
            SparseRow::IndexScores { decode, bf16_keys, .. } => {
                let mut args =
                    vec![("q", "memref<?x?x?xf32>".to_string()), ("w", rows()), ("keys", keys_of(decode, bf16_keys))];
                if decode {
                    args.push(positions);
                }
                args.push(("scores", rows()));
                args
            }
            SparseRow::TopKeys { decode } => {
                let mut args = vec![("scores", rows())];
                if decode {
                    args.push(positions);
                }
                args.push(("selected", "memref<?x?xi32>".into()));
                args
            }
            SparseRow::GatherRows { decode } => vec![
                ("keys", keys(decode)),
                ("selected", "memref<?x?xi32>".into()),
                ("out", rows()),
                ("last", "memref<?xi64>".into()),
            ],
            SparseRow::CacheWrite { bf16 } => vec![("cache", keys_of(true, bf16)), ("new", rows()), positions],
            SparseRow::AppendBf16 { new: false } => vec![("x", keys_of(false, true)), ("y", keys_of(false, true))],
            SparseRow::AppendBf16 { new: true } => {
                vec![("x", rows()), ("off", keys_of(false, true)), ("y", keys_of(false, true))]
            }
        }
    }

    /// The argument whose first dimension is the grid: a block per row (query).
    pub(super) fn rows_argument(&self) -> &'static str {
        match self {
            SparseRow::LayerNorm { .. } => "x",
            SparseRow::IndexScores { .. } => "w",
            // Its rows (the MTP module's queries may be fewer than the scores' rows).
            SparseRow::TopKeys { .. } => "selected",
            SparseRow::GatherRows { .. } => "selected",
            SparseRow::CacheWrite { .. } => "new",
            SparseRow::AppendBf16 { .. } => "x",
        }
    }

    /// Blocks per row of the rows argument.
    pub(super) fn blocks_per_row(&self) -> usize {
        match self {
            SparseRow::IndexScores { decode: false, mma: true, .. } => PREFILL_MMA_PARTS,
            SparseRow::IndexScores { .. } => SCORE_PARTS,
            _ => 1,
        }
    }

    /// Shared arrays (name, elements; `sh_cnt`, `sh_hit`, `sh_count`, `sh_off`, `sh_aux` are i32).
    pub(super) fn shared(&self, d: usize, threads: usize) -> Vec<(&'static str, usize)> {
        match *self {
            SparseRow::LayerNorm { .. } => vec![("sh_red", 2)],
            SparseRow::IndexScores { heads, mma: true, bf16_keys, .. } => IndexMma { heads, d, bf16_keys }.shared(),
            SparseRow::IndexScores { heads, .. } => vec![("sh_q", heads * d), ("sh_w", heads)],
            SparseRow::TopKeys { .. } => {
                vec![
                    ("sh_aux", 3),
                    ("sh_hist", RADIX_BINS),
                    ("sh_grp", RADIX_GROUPS),
                    ("sh_cnt", threads),
                    ("sh_hit", threads),
                    ("sh_count", threads),
                    ("sh_off", threads),
                ]
            }
            SparseRow::GatherRows { .. } | SparseRow::CacheWrite { .. } | SparseRow::AppendBf16 { .. } => Vec::new(),
        }
    }

    /// Threads per block.
    pub(super) fn threads(&self, d: usize) -> usize {
        match self {
            // One warpgroup.
            SparseRow::IndexScores { mma: true, .. } => super::index_mma::THREADS,
            // A thread a key (a chunk of keys).
            SparseRow::IndexScores { .. } | SparseRow::TopKeys { .. } => 256,
            _ => (d / 8).next_power_of_two().clamp(32, 256),
        }
    }

    /// Why the kernel cannot be generated, if it cannot.
    pub(super) fn check(&self, name: &str, d: usize) -> Result<(), String> {
        if let SparseRow::IndexScores { heads, mma, bf16_keys, .. } = *self {
            if heads == 0 {
                return Err(format!("{name}: 0 heads"));
            }
            if bf16_keys && !mma {
                return Err(format!("{name}: bf16 keys on the CUDA cores (only the tensor cores' kernel reads them)"));
            }
            if bf16_keys && d % 2 != 0 {
                return Err(format!("{name}: bf16 keys of {d} columns (read in pairs: an even number)"));
            }
            if mma {
                IndexMma { heads, d, bf16_keys }.check().map_err(|e| format!("{name}: {e}"))?;
            }
        }
        if let SparseRow::TopKeys { .. } = self {
            if d > i32::MAX as usize {
                return Err(format!("{name}: {d} keys to select"));
            }
        }
        Ok(())
    }

    /// Constants the phases use (beyond `%c0`, `%c1`, `%cT`, `%cD`, `%zero`).
    pub(super) fn constants(&self, d: usize) -> String {
        let mut s = String::from(
            "%c2 = arith.constant 2 : index
%zero_i64 = arith.constant 0 : i64
%c0_i32 = arith.constant 0 : i32
%c1_i32 = arith.constant 1 : i32
%c31_i32 = arith.constant 31 : i32
%min_i32 = arith.constant -2147483648 : i32
%neg1_i32 = arith.constant -1 : i32
%true = arith.constant true
",
        );
        match *self {
            SparseRow::LayerNorm { eps } => {
                let _ = writeln!(s, "%one = arith.constant 1.0 : f32");
                let _ = writeln!(s, "%fD = arith.constant 0x{:08X} : f32", (d as f32).to_bits());
                let _ = writeln!(s, "%eps = arith.constant 0x{:08X} : f32", eps.to_bits());
            }
            SparseRow::IndexScores { heads, top_k, .. } => {
                let _ = writeln!(s, "%cTopK = arith.constant {top_k} : index");
                let qk = (d as f32).powf(-0.5);
                let w = (heads as f32).powf(-0.5);
                let _ = writeln!(s, "%cH = arith.constant {heads} : index");
                let _ = writeln!(s, "%cHD = arith.constant {} : index", heads * d);
                let _ = writeln!(s, "%qk_scale = arith.constant 0x{:08X} : f32", qk.to_bits());
                let _ = writeln!(s, "%w_scale = arith.constant 0x{:08X} : f32", w.to_bits());
            }
            SparseRow::TopKeys { .. } => {
                let _ = writeln!(s, "%cRadixPasses = arith.constant {} : index", 32 / RADIX_BITS);
                let _ = writeln!(s, "%false = arith.constant false");
                let _ = writeln!(s, "%c32_i32 = arith.constant 32 : i32");
                let _ = writeln!(s, "%cK_i32 = arith.constant {d} : i32");
            }
            SparseRow::GatherRows { .. } | SparseRow::CacheWrite { .. } | SparseRow::AppendBf16 { .. } => {}
        }
        s
    }

    /// The keys query `%row` sees: `%nkeys` (and, with keys, `%koff`: the first key column).
    fn visible(decode: bool, keys: &str, keys_ty: &str, (queries, queries_ty): (&str, &str), query: &str) -> String {
        if decode {
            format!(
                "%p64 = memref.load %positions[{query}] : memref<?xi64>
%p_neg = arith.cmpi slt, %p64, %zero_i64 : i64
%p_idx = arith.index_cast %p64 : i64 to index
%after = arith.addi %p_idx, %c1 : index
%slots = memref.dim {keys}, %c1 : {keys_ty}
%nk0 = arith.minui %after, %slots : index
%nkeys = arith.select %p_neg, %c0, %nk0 : index
"
            )
        } else {
            format!(
                "%slots = memref.dim {keys}, {dim} : {keys_ty}
%nq = memref.dim {queries}, %c0 : {queries_ty}
%short = arith.cmpi ult, %slots, %nq : index
%kfirst0 = arith.subi %slots, %nq : index
%kfirst = arith.select %short, %c0, %kfirst0 : index
%after = arith.addi %kfirst, {query} : index
%after1 = arith.addi %after, %c1 : index
%nkeys = arith.minui %after1, %slots : index
",
                dim = if keys == "%scores" { "%c1" } else { "%c0" }
            )
        }
    }

    /// Values every phase of a block uses (`%row` its row).
    pub(super) fn prologue(&self, threads: usize) -> String {
        let mut s = format!("%cT_m1b = arith.constant {} : index\n", threads - 1);
        match *self {
            SparseRow::IndexScores { decode, bf16_keys, .. } => {
                let keys_ty = match (decode, bf16_keys) {
                    (true, false) => "memref<?x?x?xf32>",
                    (false, false) => "memref<?x?xf32>",
                    (true, true) => "memref<?x?x?xbf16>",
                    (false, true) => "memref<?x?xbf16>",
                };
                // Block `%row`: query `%qrow`, part `%part` of its keys.
                let _ = write!(
                    s,
                    "%cParts = arith.constant {parts} : index
%qrow = arith.divui %row, %cParts : index
%part = arith.remui %row, %cParts : index
%part_t = arith.muli %part, %cT : index
%key_stride = arith.muli %cT, %cParts : index
",
                    parts = self.blocks_per_row()
                );
                s.push_str(&Self::visible(decode, "%keys", keys_ty, ("%w", "memref<?x?xf32>"), "%qrow"));
                let last_dim = if decode { "%c2" } else { "%c1" };
                // A query that sees at most top_k keys: none scored (the selection takes them all).
                let _ = write!(
                    s,
                    "%kcols = memref.dim %keys, {last_dim} : {keys_ty}
%koff = arith.subi %kcols, %cD : index
%scored = arith.cmpi ugt, %nkeys, %cTopK : index
%nscored = arith.select %scored, %nkeys, %c0 : index
"
                );
            }
            SparseRow::TopKeys { decode } => {
                s.push_str(&Self::visible(
                    decode,
                    "%scores",
                    "memref<?x?xf32>",
                    ("%selected", "memref<?x?xi32>"),
                    "%row",
                ));
                s.push_str(
                    "%few = arith.cmpi ule, %nkeys, %cD : index
%passes = arith.select %few, %c0, %cRadixPasses : index
%chunk0 = arith.addi %nkeys, %cT_m1b : index
%chunk = arith.divui %chunk0, %cT : index
",
                );
            }
            SparseRow::GatherRows { decode } => {
                let (keys_ty, dim) = if decode { ("memref<?x?x?xf32>", "%c1") } else { ("memref<?x?xf32>", "%c0") };
                let _ = write!(
                    s,
                    "%nsel = memref.dim %selected, %c1 : memref<?x?xi32>
%slots = memref.dim %keys, {dim} : {keys_ty}
%out0 = arith.muli %row, %nsel : index
"
                );
            }
            SparseRow::LayerNorm { .. } | SparseRow::CacheWrite { .. } | SparseRow::AppendBf16 { .. } => {}
        }
        s
    }

    /// The per-thread bodies, in order (a barrier between consecutive ones).
    pub(super) fn phases(&self, kernel: &RowKernel, lowering: Lowering) -> Vec<String> {
        let sh = |name: &str| kernel.shared_type(name, lowering);
        match *self {
            SparseRow::LayerNorm { .. } => {
                let red = sh("sh_red");
                let w = &kernel.weight;
                let widen = |v: &str| {
                    if w == "f32" {
                        format!("%{v} = memref.load %{v}_m[%i] : memref<?xf32>\n")
                    } else {
                        format!("%{v}_raw = memref.load %{v}_m[%i] : memref<?x{w}>\n%{v} = arith.extf %{v}_raw : {w} to f32\n")
                    }
                };
                let params = format!("{}{}", widen("wv"), widen("bv")).replace("%wv_m", "%w").replace("%bv_m", "%b");
                vec![
                    layer_norm_stats(lowering, ("%x", "%cD", "%fD"), "%eps", &red),
                    format!(
                        "%mean = memref.load %sh_red[%c0] : {red}
%inv = memref.load %sh_red[%c1] : {red}
scf.for %i = %tid to %cD step %cT {{
  %v = memref.load %x[%row, %i] : memref<?x?xf32>
{params}  %dv = arith.subf %v, %mean : f32
  %n = arith.mulf %dv, %inv : f32
  %nw = arith.mulf %n, %wv : f32
  %yv = arith.addf %nw, %bv : f32
  memref.store %yv, %y[%row, %i] : memref<?x?xf32>
}}
",
                        params = indent(&params, "  ")
                    ),
                ]
            }
            SparseRow::IndexScores { heads, decode, mma: true, bf16_keys, .. } => {
                IndexMma { heads, d: kernel.d, bf16_keys }.phases(decode, lowering, &sh("sh_mma"))
            }
            SparseRow::IndexScores { heads, decode, .. } => {
                let (q_sh, w_sh) = (sh("sh_q"), sh("sh_w"));
                let pairs = kernel.d.is_multiple_of(KEY_CHUNK);
                let key = if decode {
                    "%k = memref.load %keys[%qrow, %s, %col] : memref<?x?x?xf32>"
                } else {
                    "%k = memref.load %keys[%s, %col] : memref<?x?xf32>"
                };
                vec![
                    // A block with keys to score loads its query (its first key: part p's `p T`,
                    // or `2 p T` two keys a thread).
                    format!(
                        "%part_first = arith.muli %part_t, %c{per_thread} : index
%busy = arith.cmpi ult, %part_first, %nscored : index
scf.if %busy {{
  scf.for %i = %tid to %cHD step %cT {{
    %h = arith.divui %i, %cD : index
    %j = arith.remui %i, %cD : index
    %v = memref.load %q[%qrow, %h, %j] : memref<?x?x?xf32>
    memref.store %v, %sh_q[%i] : {q_sh}
  }}
  scf.for %h = %tid to %cH step %cT {{
    %v = memref.load %w[%qrow, %h] : memref<?x?xf32>
    memref.store %v, %sh_w[%h] : {w_sh}
  }}
}}
",
                        per_thread = if pairs { 2 } else { 1 }
                    ),
                    if pairs {
                        index_scores_by_pairs(heads, kernel.d, decode, &q_sh, &w_sh)
                    } else {
                        format!(
                            "%s0 = arith.addi %part_t, %tid : index
scf.for %s = %s0 to %nscored step %key_stride {{
  %acc = scf.for %h = %c0 to %cH step %c1 iter_args(%a = %zero) -> (f32) {{
    %qb = arith.muli %h, %cD : index
    %dot = scf.for %j = %c0 to %cD step %c1 iter_args(%dd = %zero) -> (f32) {{
      %col = arith.addi %koff, %j : index
      {key}
      %qi = arith.addi %qb, %j : index
      %qv = memref.load %sh_q[%qi] : {q_sh}
      %m = arith.mulf %qv, %k : f32
      %dd2 = arith.addf %dd, %m : f32
      scf.yield %dd2 : f32
    }}
{score}    scf.yield %a2 : f32
  }}
  memref.store %acc, %scores[%qrow, %s] : memref<?x?xf32>
}}
",
                            score = indent(&head_score("", "%dot", "%h", "%a", "%a2", &w_sh), "    ")
                        )
                    },
                ]
            }
            SparseRow::TopKeys { .. } => top_keys_phases(&sh),
            SparseRow::GatherRows { decode } => {
                let load = if decode {
                    "%v = memref.load %keys[%row, %j_idx, %col] : memref<?x?x?xf32>\n"
                } else {
                    "%v = memref.load %keys[%j_idx, %col] : memref<?x?xf32>\n"
                };
                let pick = "%j = memref.load %selected[%row, %slot] : memref<?x?xi32>\n";
                vec![format!(
                    "{}%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %last_i32 = arith.subi %cnt, %c1_i32 : i32
  %last_v = arith.extsi %last_i32 : i32 to i64
  memref.store %last_v, %last[%row] : memref<?xi64>
}}
",
                    selected_rows("%nsel", pick, load)
                )]
            }
            SparseRow::AppendBf16 { new: false } => vec!["scf.for %i = %tid to %cD step %cT {
  %v = memref.load %x[%row, %i] : memref<?x?xbf16>
  memref.store %v, %y[%row, %i] : memref<?x?xbf16>
}
"
            .to_string()],
            SparseRow::AppendBf16 { new: true } => vec![format!(
                "%c16_i32 = arith.constant 16 : i32
%c7fff_i32 = arith.constant 32767 : i32
%shift = memref.dim %off, %c0 : memref<?x?xbf16>
%moved = arith.addi %row, %shift : index
scf.for %i = %tid to %cD step %cT {{
  %v = memref.load %x[%row, %i] : memref<?x?xf32>
{}  memref.store %vb, %y[%moved, %i] : memref<?x?xbf16>
}}
",
                super::round_bf16("%v", "%vb")
            )],
            SparseRow::CacheWrite { bf16 } => {
                // bf16 rows: each value rounded to nearest even by its bits (both lowerings).
                let (consts, store, ty) = match bf16 {
                    true => (
                        "%c16_i32 = arith.constant 16 : i32\n%c7fff_i32 = arith.constant 32767 : i32\n",
                        format!(
                            "{}    memref.store %vb, %cache[%row, %p_idx, %i] : memref<?x?x?xbf16>\n",
                            indent(&super::round_bf16("%v", "%vb"), "  ")
                        ),
                        "bf16",
                    ),
                    false => {
                        ("", "    memref.store %v, %cache[%row, %p_idx, %i] : memref<?x?x?xf32>\n".to_string(), "f32")
                    }
                };
                vec![format!(
                    "{consts}%p64 = memref.load %positions[%row] : memref<?xi64>
%p_pos = arith.cmpi sge, %p64, %zero_i64 : i64
%p_idx = arith.index_cast %p64 : i64 to index
%slots = memref.dim %cache, %c1 : memref<?x?x?x{ty}>
%inside = arith.cmpi ult, %p_idx, %slots : index
%ok = arith.andi %p_pos, %inside : i1
scf.if %ok {{
  scf.for %i = %tid to %cD step %cT {{
    %v = memref.load %new[%row, %i] : memref<?x?xf32>
{store}  }}
}}
"
                )]
            }
        }
    }
}

/// A block's pass over its query's selected slots `0..{bound}` (`pick` defines `%j`, the slot's
/// row or -1): row `%j`'s columns (`load` defines `%v` from `%j_idx`, `%col`) stored to row `%out0
/// + %slot` of `%out` (zeros where the slot selects no row of the keys), the selected slots
/// counted into `%cnt` (i32).
fn selected_rows(bound: &str, pick: &str, load: &str) -> String {
    format!(
        "%cnt = scf.for %slot = %c0 to {bound} step %c1 iter_args(%c = %c0_i32) -> (i32) {{
{pick}  %nonneg = arith.cmpi sge, %j, %c0_i32 : i32
  %j_idx = arith.index_cast %j : i32 to index
  %inside = arith.cmpi ult, %j_idx, %slots : index
  %ok = arith.andi %nonneg, %inside : i1
  %orow = arith.addi %out0, %slot : index
  scf.for %col = %tid to %cD step %cT {{
    %val = scf.if %ok -> (f32) {{
{load}      scf.yield %v : f32
    }} else {{
      scf.yield %zero : f32
    }}
    memref.store %val, %out[%orow, %col] : memref<?x?xf32>
  }}
  %inc = arith.extui %nonneg : i1 to i32
  %c2n = arith.addi %c, %inc : i32
  scf.yield %c2n : i32
}}
",
        pick = indent(pick, "  "),
        load = indent(load, "      ")
    )
}

/// Key columns a step of [`index_scores_by_pairs`] loads (each key's, once for every head).
const KEY_CHUNK: usize = 4;

/// A head's share of a query's score (the reference's ops, in its order): `{out} = {acc} + w_h /
/// sqrt(H) * relu(dot * qk_scale)`, `{h}` the head's index. Names start with `{p}`.
fn head_score(p: &str, dot: &str, h: &str, acc: &str, out: &str, w_sh: &str) -> String {
    format!(
        "%{p}sc = arith.mulf {dot}, %qk_scale : f32
%{p}pos = arith.cmpf ogt, %{p}sc, %zero : f32
%{p}r = arith.select %{p}pos, %{p}sc, %zero : f32
%{p}wh = memref.load %sh_w[{h}] : {w_sh}
%{p}ww = arith.mulf %{p}wh, %w_scale : f32
%{p}t = arith.mulf %{p}ww, %{p}r : f32
{out} = arith.addf {acc}, %{p}t : f32
"
    )
}

/// [`SparseRow::IndexScores`]'s scores two keys a thread (each query head's values read from
/// shared memory once for both), every head's dot product of both carried through the loop over
/// the key's columns ([`KEY_CHUNK`] a step: each key column read once, not once a head) — `2
/// heads` accumulators in registers. Part p of a query's blocks takes keys `2 T p + T i + tid`
/// (`i` 0 and 1) of every `2 T parts`: a query's first `2 T parts` keys fill pairs (a query sees
/// fewer than its `T parts` threads in most of a prefill). Each dot product is summed in column
/// order and each score over the heads in order: the reference's operations, in its order.
fn index_scores_by_pairs(heads: usize, d: usize, decode: bool, q_sh: &str, w_sh: &str) -> String {
    let load = |k: &str, key: &str, col: &str| match decode {
        true => format!("{k} = memref.load %keys[%qrow, {key}, {col}] : memref<?x?x?xf32>\n"),
        false => format!("{k} = memref.load %keys[{key}, {col}] : memref<?x?xf32>\n"),
    };
    let mut t = format!("%cChunk = arith.constant {KEY_CHUNK} : index\n");
    for u in 1..KEY_CHUNK {
        let _ = writeln!(t, "%cu{u} = arith.constant {u} : index");
    }
    for h in 0..heads {
        let _ = writeln!(t, "%qo{h} = arith.constant {} : index\n%hi{h} = arith.constant {h} : index", h * d);
    }
    let keys = ["a", "b"];
    let dots: Vec<String> = (0..heads).flat_map(|h| keys.map(|k| format!("%d{k}{h}"))).collect();
    let carried: Vec<String> = dots.iter().map(|d| format!("{d}_in = %zero")).collect();
    let _ = write!(
        t,
        "%pair_stride = arith.muli %key_stride, %c2 : index
%part_2t = arith.muli %part_t, %c2 : index
%s0 = arith.addi %part_2t, %tid : index
scf.for %sa = %s0 to %nscored step %pair_stride {{
  %sb_raw = arith.addi %sa, %cT : index
  %has_b = arith.cmpi ult, %sb_raw, %nscored : index
  %sb = arith.select %has_b, %sb_raw, %sa : index
  %dots:{n} = scf.for %j = %c0 to %cD step %cChunk iter_args({carried}) -> ({types}) {{
",
        n = dots.len(),
        carried = carried.join(", "),
        types = vec!["f32"; dots.len()].join(", "),
    );
    let mut body = String::from("%col0 = arith.addi %koff, %j : index\n");
    for u in 1..KEY_CHUNK {
        let _ = writeln!(body, "%col{u} = arith.addi %col0, %cu{u} : index");
    }
    for u in 0..KEY_CHUNK {
        body.push_str(&load(&format!("%ka{u}"), "%sa", &format!("%col{u}")));
        body.push_str(&load(&format!("%kb{u}"), "%sb", &format!("%col{u}")));
    }
    let mut finals = Vec::new();
    for h in 0..heads {
        let _ = writeln!(body, "%qh{h}_0 = arith.addi %j, %qo{h} : index");
        for u in 0..KEY_CHUNK {
            if u > 0 {
                let _ = writeln!(body, "%qh{h}_{u} = arith.addi %qh{h}_0, %cu{u} : index");
            }
            let _ = writeln!(body, "%q{h}_{u} = memref.load %sh_q[%qh{h}_{u}] : {q_sh}");
        }
        for k in keys {
            let mut sum = format!("%d{k}{h}_in");
            for u in 0..KEY_CHUNK {
                let _ = writeln!(
                    body,
                    "%m{k}{h}_{u} = arith.mulf %q{h}_{u}, %k{k}{u} : f32\n%s{k}{h}_{u} = arith.addf {sum}, %m{k}{h}_{u} : f32"
                );
                sum = format!("%s{k}{h}_{u}");
            }
            finals.push(sum);
        }
    }
    let _ = writeln!(body, "scf.yield {} : {}", finals.join(", "), vec!["f32"; finals.len()].join(", "));
    t.push_str(&indent(&body, "    "));
    t.push_str("  }\n");
    let mut scores = String::new();
    for (ki, k) in keys.iter().enumerate() {
        let mut acc = "%zero".to_string();
        for h in 0..heads {
            let out = format!("%acc{k}{h}");
            let dot = format!("%dots#{}", 2 * h + ki);
            scores.push_str(&head_score(&format!("{k}{h}_"), &dot, &format!("%hi{h}"), &acc, &out, w_sh));
            acc = out;
        }
    }
    let last = heads - 1;
    let _ = write!(
        scores,
        "memref.store %acca{last}, %scores[%qrow, %sa] : memref<?x?xf32>
scf.if %has_b {{
  memref.store %accb{last}, %scores[%qrow, %sb] : memref<?x?xf32>
}}
"
    );
    t.push_str(&indent(&scores, "  "));
    t.push_str("}\n");
    t
}

/// `text` with every line indented by `by`.
fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}\n")).collect()
}

/// A key's class against the threshold `%thr` (`%u` its key): `%gt` above it, `%eq` at it (with
/// few keys, `%few`: every key above).
const CLASSIFY: &str = "  %gt0 = arith.cmpi ugt, %u, %thr : i32
  %gt = arith.ori %gt0, %few : i1
  %eq0 = arith.cmpi eq, %u, %thr : i32
  %nfew = arith.xori %few, %true : i1
  %eq = arith.andi %eq0, %nfew : i1
";

/// The total-order key of score `%v` as an unsigned i32 (`%u`): larger scores, larger keys.
const SCORE_KEY: &str = "%bits = arith.bitcast %v : f32 to i32
%sign = arith.shrsi %bits, %c31_i32 : i32
%flip = arith.shrui %sign, %c1_i32 : i32
%k = arith.xori %bits, %flip : i32
%u = arith.xori %k, %min_i32 : i32
";

/// Bits of the threshold [`SparseRow::TopKeys`] finds a pass, its bins a pass and their groups.
const RADIX_BITS: usize = 8;
const RADIX_BINS: usize = 1 << RADIX_BITS;
const RADIX_GROUPS: usize = 16;

/// One thread's walk down `count` counts (`load` reads the one at `%at`, from `last` down) from
/// `start` counted above them, into `{out}:3`: `{out}#2` the first whose count takes the total to
/// `%rank`, `{out}#0` the total above it.
fn walk_down(count: &str, last: &str, start: &str, load: &str, out: &str) -> String {
    format!(
        "{out}:3 = scf.for %i = %c0 to {count} step %c1 iter_args(%cum = {start}, %got = %false, %pick = %c0) -> (i32, i1, index) {{
  %at = arith.subi {last}, %i : index
  %n = memref.load {load}
  %cum2 = arith.addi %cum, %n : i32
  %reach = arith.cmpi sge, %cum2, %rank : i32
  %nogot = arith.xori %got, %true : i1
  %take = arith.andi %reach, %nogot : i1
  %pick2 = arith.select %take, %at, %pick : index
  %cum3 = arith.select %got, %cum, %cum2 : i32
  %cum4 = arith.select %take, %cum, %cum3 : i32
  %got2 = arith.ori %got, %take : i1
  scf.yield %cum4, %got2, %pick2 : i32, i1, index
}}
"
    )
}

/// [`SparseRow::TopKeys`]' phases: the threshold a byte at a time, the threads' counts above and
/// at it, their scan, then the selection in key order and the padding.
fn top_keys_phases(sh: &dyn Fn(&str) -> String) -> Vec<String> {
    let (aux, cnt, hit, count, off) = (sh("sh_aux"), sh("sh_cnt"), sh("sh_hit"), sh("sh_count"), sh("sh_off"));
    // This thread's chunk of keys `%lo..%hi`.
    let chunk = "%lo0 = arith.muli %tid, %chunk : index
%lo = arith.minui %lo0, %nkeys : index
%hi0 = arith.addi %lo0, %chunk : index
%hi = arith.minui %hi0, %nkeys : index
";
    let key = |indent_by: &str| {
        indent(&format!("%v = memref.load %scores[%row, %s] : memref<?x?xf32>\n{SCORE_KEY}"), indent_by)
    };
    let (hist, grp) = (sh("sh_hist"), sh("sh_grp"));
    // The threshold's bytes found so far (`sh_aux[0]`), and the rank of the key sought among the
    // keys that match them (`sh_aux[2]`: top_k at first).
    let mut phases = vec![format!(
        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %c2_aux = arith.constant 2 : index
  memref.store %c0_i32, %sh_aux[%c0] : {aux}
  memref.store %cK_i32, %sh_aux[%c2_aux] : {aux}
}}
"
    )];
    // Pass `%bi`'s byte: bits `%shift ..` of the key; the bytes above it (found) under `%above_mask`.
    let byte = format!(
        "%prefix = memref.load %sh_aux[%c0] : {aux}
%bi_i = arith.index_cast %bi : index to i32
%c8_i32 = arith.constant {RADIX_BITS} : i32
%c24_i32 = arith.constant {top} : i32
%bi8 = arith.muli %bi_i, %c8_i32 : i32
%shift = arith.subi %c24_i32, %bi8 : i32
%above_bits = arith.addi %shift, %c8_i32 : i32
%all_free = arith.cmpi eq, %above_bits, %c32_i32 : i32
%above_sh = arith.minui %above_bits, %c31_i32 : i32
%above_m = arith.shli %neg1_i32, %above_sh : i32
%above_mask = arith.select %all_free, %c0_i32, %above_m : i32
%want = arith.andi %prefix, %above_mask : i32
",
        top = 32 - RADIX_BITS,
    );
    let pass = vec![
        // The bins cleared.
        format!(
            "%c_bins = arith.constant {RADIX_BINS} : index
scf.for %i = %tid to %c_bins step %cT {{
  memref.store %c0_i32, %sh_hist[%i] : {hist}
}}
"
        ),
        // Each key that matches the bytes found: its next byte's bin counted.
        format!(
            "{byte}%c255_i32 = arith.constant 255 : i32
%one_i32 = arith.constant 1 : i32
{chunk}scf.for %s = %lo to %hi step %c1 {{
{key}  %has = arith.andi %u, %above_mask : i32
  %match = arith.cmpi eq, %has, %want : i32
  scf.if %match {{
    %digit0 = arith.shrui %u, %shift : i32
    %digit = arith.andi %digit0, %c255_i32 : i32
    %bin = arith.index_cast %digit : i32 to index
    %old = memref.atomic_rmw addi %one_i32, %sh_hist[%bin] : (i32, {hist}) -> i32
  }}
}}
",
            key = key("  ")
        ),
        // The bins summed in groups of 16.
        format!(
            "%c_groups = arith.constant {RADIX_GROUPS} : index
%c_per_group = arith.constant {per} : index
scf.for %g = %tid to %c_groups step %cT {{
  %b0 = arith.muli %g, %c_per_group : index
  %sum = scf.for %j = %c0 to %c_per_group step %c1 iter_args(%a = %c0_i32) -> (i32) {{
    %b = arith.addi %b0, %j : index
    %n = memref.load %sh_hist[%b] : {hist}
    %a2 = arith.addi %a, %n : i32
    scf.yield %a2 : i32
  }}
  memref.store %sum, %sh_grp[%g] : {grp}
}}
",
            per = RADIX_BINS / RADIX_GROUPS
        ),
        // One thread: the group, then the bin, holding the rank sought (counts from the top).
        format!(
            "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
{byte}  %c2_aux = arith.constant 2 : index
  %rank = memref.load %sh_aux[%c2_aux] : {aux}
  %c_groups = arith.constant {RADIX_GROUPS} : index
  %c_per_group = arith.constant {per} : index
  %last_group = arith.constant {last_group} : index
{walk_groups}  %b_top = arith.muli %group#2, %c_per_group : index
  %last_in = arith.subi %c_per_group, %c1 : index
  %b_last = arith.addi %b_top, %last_in : index
{walk_bins}  %rank2 = arith.subi %rank, %bin#0 : i32
  %digit = arith.index_cast %bin#2 : index to i32
  %placed = arith.shli %digit, %shift : i32
  %prefix2 = arith.ori %prefix, %placed : i32
  memref.store %prefix2, %sh_aux[%c0] : {aux}
  memref.store %rank2, %sh_aux[%c2_aux] : {aux}
}}
",
            byte = indent(&byte, "  "),
            per = RADIX_BINS / RADIX_GROUPS,
            last_group = RADIX_GROUPS - 1,
            walk_groups = indent(
                &walk_down("%c_groups", "%last_group", "%c0_i32", &format!("%sh_grp[%at] : {grp}"), "%group"),
                "  "
            ),
            walk_bins = indent(
                &walk_down("%c_per_group", "%b_last", "%group#0", &format!("%sh_hist[%at] : {hist}"), "%bin"),
                "  "
            ),
        ),
    ];
    phases.extend(loop_phases("bi", "passes", pass));
    // The thread's keys above the threshold and at it (with few keys: every key counts as above).
    phases.push(format!(
        "%thr = memref.load %sh_aux[%c0] : {aux}
{chunk}%n:2 = scf.for %s = %lo to %hi step %c1 iter_args(%g = %c0_i32, %e = %c0_i32) -> (i32, i32) {{
{key}{CLASSIFY}  %gi = arith.extui %gt : i1 to i32
  %ei = arith.extui %eq : i1 to i32
  %g2 = arith.addi %g, %gi : i32
  %e2 = arith.addi %e, %ei : i32
  scf.yield %g2, %e2 : i32, i32
}}
memref.store %n#0, %sh_cnt[%tid] : {cnt}
memref.store %n#1, %sh_hit[%tid] : {hit}
",
        key = key("  ")
    ));
    // One thread: the exclusive scan of the counts, and the total above the threshold.
    phases.push(format!(
        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %tot:2 = scf.for %i = %c0 to %cT step %c1 iter_args(%g = %c0_i32, %e = %c0_i32) -> (i32, i32) {{
    memref.store %g, %sh_count[%i] : {count}
    memref.store %e, %sh_off[%i] : {off}
    %gi = memref.load %sh_cnt[%i] : {cnt}
    %ei = memref.load %sh_hit[%i] : {hit}
    %g2 = arith.addi %g, %gi : i32
    %e2 = arith.addi %e, %ei : i32
    scf.yield %g2, %e2 : i32, i32
  }}
  memref.store %tot#0, %sh_aux[%c1] : {aux}
}}
"
    ));
    // Each thread's keys in order: above the threshold, or at it while the earlier ones at it
    // leave room; then the slots past the selection -1.
    phases.push(format!(
        "%thr = memref.load %sh_aux[%c0] : {aux}
%above = memref.load %sh_aux[%c1] : {aux}
%pre_g = memref.load %sh_count[%tid] : {count}
%pre_e = memref.load %sh_off[%tid] : {off}
%room0 = arith.subi %cK_i32, %above : i32
%room = arith.select %few, %c0_i32, %room0 : i32
%taken_e = arith.minsi %pre_e, %room : i32
%slot0 = arith.addi %pre_g, %taken_e : i32
{chunk}%n:2 = scf.for %s = %lo to %hi step %c1 iter_args(%slot = %slot0, %e = %pre_e) -> (i32, i32) {{
{key}{CLASSIFY}  %fits = arith.cmpi slt, %e, %room : i32
  %eq_in = arith.andi %eq, %fits : i1
  %take = arith.ori %gt, %eq_in : i1
  scf.if %take {{
    %s_i32 = arith.index_cast %s : index to i32
    %slot_idx = arith.index_cast %slot : i32 to index
    memref.store %s_i32, %selected[%row, %slot_idx] : memref<?x?xi32>
  }}
  %ti = arith.extui %take : i1 to i32
  %ei = arith.extui %eq : i1 to i32
  %slot2 = arith.addi %slot, %ti : i32
  %e2 = arith.addi %e, %ei : i32
  scf.yield %slot2, %e2 : i32, i32
}}
%taken = arith.select %few, %nkeys, %cD : index
%pad0 = arith.addi %taken, %tid : index
scf.for %p = %pad0 to %cD step %cT {{
  memref.store %neg1_i32, %selected[%row, %p] : memref<?x?xi32>
}}
",
        key = key("  ")
    ));
    phases
}

#[cfg(test)]
mod tests {
    use super::super::tests::{raw, run_cpu, run_simulated, values};
    use super::super::{RowKernel, RowOp};
    use super::SparseRow;
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
    use v3c_models::interp::kernels;

    /// `kernel` over `args` through its CPU lowering, or (`simulated`) its PTX in the simulator
    /// over `rows` blocks' rows.
    fn run(kernel: &RowKernel, args: &[v3c_runtime::host::RawBuffer], rows: usize, simulated: bool) {
        match simulated {
            false => run_cpu(kernel, args),
            true => drop(run_simulated(kernel, args, rows)),
        }
    }

    fn kernel(op: SparseRow, d: usize, weight: &str) -> RowKernel {
        kernel_of(RowOp::Sparse(op), d, weight)
    }

    fn kernel_of(op: RowOp, d: usize, weight: &str) -> RowKernel {
        let k = RowKernel::new(op, d, weight);
        assert_eq!(RowKernel::from_name(&k.kernel_name()).as_ref(), Some(&k), "{}", k.kernel_name());
        k
    }

    /// The indexer key's LayerNorm (bf16 weight and bias), rows of 128 and of a ragged width:
    /// the reference's bits through the CPU lowering, and the PTX simulated within rounding.
    #[test]
    fn layer_norm_matches_the_reference() {
        for d in [128, 100] {
            let rows = 3;
            let mut x = values(rows * d, 5, 4.0);
            x[..d].iter_mut().for_each(|v| *v += 30.0);
            let w: Vec<u16> = values(d, 6, 1.0).iter().map(|v| f32_to_bf16(v + 1.0)).collect();
            let b: Vec<u16> = values(d, 7, 1.0).iter().map(|&v| f32_to_bf16(v)).collect();
            let widen = |v: &[u16]| -> Vec<f32> { v.iter().map(|&h| bf16_to_f32(h)).collect() };
            let want = kernels::layer_norm(&x, &widen(&w), &widen(&b), 1e-6);
            let k = kernel(SparseRow::LayerNorm { eps: 1e-6 }, d, "bf16");
            for simulated in [false, true] {
                let (mut x, mut w, mut b) = (x.clone(), w.clone(), b.clone());
                let mut y = vec![f32::NAN; rows * d];
                let buffers = [
                    raw(&mut x, &[rows, d], "f32"),
                    raw(&mut w, &[d], "bf16"),
                    raw(&mut b, &[d], "bf16"),
                    raw(&mut y, &[rows, d], "f32"),
                ];
                if simulated {
                    run_simulated(&k, &buffers, rows);
                    let worst = y.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(worst <= 1e-5, "d {d}: simulated differs by {worst}");
                } else {
                    run_cpu(&k, &buffers);
                    assert_eq!(y, want, "d {d}");
                }
            }
        }
    }

    /// Queries, head weights and cache rows (the key the last `di` columns of each `width`) with
    /// ties: keys 3 and 9 repeat key 1 (equal scores: the earlier wins), and a zero query head.
    fn indexer_inputs(t: usize, heads: usize, di: usize, rows: usize, width: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let q = values(t * heads * di, 11, 2.0);
        let w = values(t * heads, 12, 2.0);
        let mut keys = values(rows * width, 13, 2.0);
        let per_seq = rows.min(40);
        for base in (0..rows).step_by(per_seq) {
            for copy in [3, 9] {
                if base + copy < rows {
                    let from = (base + 1) * width;
                    let row: Vec<f32> = keys[from..from + width].to_vec();
                    keys[(base + copy) * width..(base + copy + 1) * width].copy_from_slice(&row);
                }
            }
        }
        (q, w, keys)
    }

    /// An indexer problem: `t` queries of `heads` heads of `di` columns over key rows `width` wide
    /// (the key their last `di` columns), `s` of them (prefill: one sequence, query t sees rows
    /// `0..=S - T + t`; decode: a cache per query up to its position — few keys, top_k + 1, the
    /// cache's last, past it, negative), selecting `top_k`.
    struct IndexerCase {
        heads: usize,
        di: usize,
        width: usize,
        top_k: usize,
        t: usize,
        s: usize,
        decode: bool,
        q: Vec<f32>,
        w: Vec<f32>,
        keys: Vec<f32>,
        positions: Vec<i64>,
    }

    impl IndexerCase {
        /// Keys past one block's width (every part of a query's blocks has some, and some threads
        /// a second key); DeepSeek-V3.2's 64 heads of 128 in its 704-wide cache rows; and keys of
        /// 10 columns (not whole steps of the two-key loop, nor of a 16-column wgmma step) of 3
        /// heads (not a multiple of 8).
        fn all() -> Vec<IndexerCase> {
            Self::all_widths(|w| w)
        }

        /// [`Self::all`] with each row width `width(w)`.
        fn all_widths(width_of: impl Fn(usize) -> usize) -> Vec<IndexerCase> {
            let both = [false, true].as_slice();
            let cases = [
                ((4, 16, 24, 8), (5, 2200), both),
                ((64, 128, 704, 16), (2, 512), &[false]),
                ((3, 10, 17, 5), (4, 600), both),
            ];
            let mut all = Vec::new();
            for ((heads, di, width, top_k), (t, s), modes) in cases {
                let width = width_of(width);
                for &decode in modes {
                    let (q, w, keys) = indexer_inputs(t, heads, di, if decode { t * s } else { s }, width);
                    let positions = [2, top_k as i64, (s - 1) as i64, s as i64 + 5, -1][..t].to_vec();
                    all.push(IndexerCase { heads, di, width, top_k, t, s, decode, q, w, keys, positions });
                }
            }
            all
        }

        /// The rows query `i` sees.
        fn seen(&self, i: usize) -> std::ops::Range<usize> {
            match (self.decode, self.positions[i]) {
                (false, _) => 0..self.s - self.t + i + 1,
                (true, p) if p < 0 => 0..0,
                (true, p) => 0..(p as usize + 1).min(self.s),
            }
        }

        /// Query `i`'s heads, weights and the key rows it sees.
        fn query(&self, i: usize) -> (&[f32], &[f32], &[f32]) {
            let (heads, di, width, r) = (self.heads, self.di, self.width, self.seen(i));
            let base = if self.decode { i * self.s * width } else { 0 };
            let cache = &self.keys[base + r.start * width..base + r.end * width];
            (&self.q[i * heads * di..(i + 1) * heads * di], &self.w[i * heads..(i + 1) * heads], cache)
        }

        /// The case with its key rows rounded to bf16 (as bf16 caches hold them).
        fn rounded(mut self) -> IndexerCase {
            self.keys.iter_mut().for_each(|v| *v = v3c_models::dtype::round_bf16(*v));
            self
        }

        /// The scores `[T, S]` (NaN where none is written) of `kernel` through its CPU lowering,
        /// or its PTX simulated; the key rows passed as bf16 (`bf16_keys`: exact only for a
        /// [`Self::rounded`] case) or f32.
        fn scores(&self, kernel: &RowKernel, simulated: bool, bf16_keys: bool) -> Vec<f32> {
            let (t, s) = (self.t, self.s);
            let (mut q, mut w, mut keys, mut pos) =
                (self.q.clone(), self.w.clone(), self.keys.clone(), self.positions.clone());
            let mut keys16: Vec<u16> = keys.iter().map(|&v| f32_to_bf16(v)).collect();
            let key_shape = if self.decode { vec![t, s, self.width] } else { vec![s, self.width] };
            let mut scores = vec![f32::NAN; t * s];
            let mut args = vec![
                raw(&mut q, &[t, self.heads, self.di], "f32"),
                raw(&mut w, &[t, self.heads], "f32"),
                match bf16_keys {
                    true => raw(&mut keys16, &key_shape, "bf16"),
                    false => raw(&mut keys, &key_shape, "f32"),
                },
            ];
            if self.decode {
                args.push(raw(&mut pos, &[t], "i64"));
            }
            args.push(raw(&mut scores, &[t, s], "f32"));
            if simulated {
                let stats = run_simulated(kernel, &args, t * kernel.blocks_per_row());
                let name = kernel.kernel_name();
                eprintln!("{name} (decode {}): {} instructions simulated", self.decode, stats.instructions);
            } else {
                run_cpu(kernel, &args);
            }
            scores
        }

        /// `top`'s selection (`[T, top_k]`) from `scores`.
        fn select(&self, top: &RowKernel, mut scores: Vec<f32>, simulated: bool) -> Vec<i32> {
            let (t, top_k) = (self.t, self.top_k);
            let mut sel = vec![7i32; t * top_k];
            let mut pos = self.positions.clone();
            let mut args = vec![raw(&mut scores, &[t, self.s], "f32")];
            if self.decode {
                args.push(raw(&mut pos, &[t], "i64"));
            }
            args.push(raw(&mut sel, &[t, top_k], "i32"));
            run(top, &args, t, simulated);
            sel
        }
    }

    /// The CUDA-core scores ([`IndexerCase::all`]): the CPU lowering's are the reference's bits
    /// and its selection the reference's (ties to the earlier key; every key while there are at
    /// most top_k); the PTX simulated selects the same keys from the same scores, and its scores
    /// are the reference's within rounding.
    #[test]
    fn indexer_scores_and_selection_match_the_reference() {
        for c in IndexerCase::all() {
            let (t, s, top_k, decode) = (c.t, c.s, c.top_k, c.decode);
            let mut want_scores = vec![0f32; t * s];
            let mut want_sel = Vec::new();
            for i in 0..t {
                let (qi, wi, cache) = c.query(i);
                let sc = kernels::index_scores(qi, wi, cache, c.width, c.di);
                want_scores[i * s..i * s + sc.len()].copy_from_slice(&sc);
                want_sel.extend(kernels::select_top_keys(&sc, top_k));
            }
            let op = SparseRow::IndexScores { heads: c.heads, decode, top_k, mma: false, bf16_keys: false };
            let scores_k = kernel(op, c.di, "f32");
            let top = kernel(SparseRow::TopKeys { decode }, top_k, "f32");
            for simulated in [false, true] {
                let scores = c.scores(&scores_k, simulated, false);
                for i in 0..t {
                    let r = c.seen(i);
                    let (got, want) = (&scores[i * s..i * s + r.len()], &want_scores[i * s..i * s + r.len()]);
                    if r.len() <= top_k {
                        // Every key it sees is selected: no score computed.
                        assert!(scores[i * s..(i + 1) * s].iter().all(|v| v.is_nan()), "decode {decode} query {i}");
                    } else if simulated {
                        let worst = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(worst <= 1e-5, "decode {decode} query {i}: {worst}");
                    } else {
                        assert_eq!(got, want, "decode {decode} query {i}");
                    }
                }
                // The selection from the reference's scores, and from the kernel's (the queries
                // it computed none for still select every key they see).
                for scores in [want_scores.clone(), scores] {
                    let sel = c.select(&top, scores, simulated);
                    assert_eq!(sel, want_sel, "decode {decode} simulated {simulated}");
                }
            }
        }
    }

    /// [`super::super::index_mma`]'s scores, as its doc gives their arithmetic: each (key, head)
    /// product of the bf16 splits summed per step hi.hi, hi.lo, lo.hi over 16 columns; each lane's
    /// heads `8 j + 2 q + e` in order from +0; the lanes as `(s0 + s1) + (s2 + s3)`.
    fn split_scores(q: &[f32], w: &[f32], rows: &[f32], width: usize, di: usize) -> Vec<f32> {
        let heads = w.len();
        let n = heads.next_multiple_of(8);
        let (qk_scale, w_scale) = ((di as f32).powf(-0.5), (heads as f32).powf(-0.5));
        let split = |x: f32| {
            let hi = v3c_models::dtype::round_bf16(x);
            (hi, v3c_models::dtype::round_bf16(x - hi))
        };
        rows.chunks(width)
            .map(|row| &row[width - di..])
            .map(|k| {
                let lane = |l: usize| {
                    let mut s = 0.0f32;
                    for h in (0..n / 8).flat_map(|j| [8 * j + 2 * l, 8 * j + 2 * l + 1]) {
                        let mut dot = 0.0f32;
                        for step in 0..di.div_ceil(16) {
                            let cols = 16 * step..16 * step + 16;
                            let kv = |c: usize| split(if c < di { k[c] } else { 0.0 });
                            let qv = |c: usize| split(if c < di && h < heads { q[h * di + c] } else { 0.0 });
                            for c in cols.clone() {
                                dot += kv(c).0 * qv(c).0;
                            }
                            for c in cols.clone() {
                                dot += kv(c).0 * qv(c).1;
                            }
                            for c in cols {
                                dot += kv(c).1 * qv(c).0;
                            }
                        }
                        let ws = if h < heads { w[h] * w_scale } else { 0.0 };
                        let sc = dot * qk_scale;
                        s += ws * if sc > 0.0 { sc } else { 0.0 };
                    }
                    s
                };
                (lane(0) + lane(1)) + (lane(2) + lane(3))
            })
            .collect()
    }

    /// The indexer's scores on the tensor cores ([`IndexerCase::all`]: heads padded to 8, keys of
    /// 10 columns padded to a 16-column step): the CPU lowering's are [`split_scores`]' bits, the
    /// PTX simulated within rounding of them, both within 2^-16-ish of the f32 reference's; the
    /// selection from the kernel's scores equals the reference's.
    #[test]
    fn indexer_scores_on_the_tensor_cores_keep_f32_accuracy() {
        for c in IndexerCase::all() {
            check_tensor_core_scores(&c, false);
        }
    }

    /// The same over bf16 key rows (the bf16 caches' `_bf16` kernel, two products a step, the
    /// keys' words loaded as they are) of the cases' keys rounded to bf16: the split arithmetic
    /// over those keys (their lo zero) bit for bit on the CPU lowering, within rounding in the
    /// PTX simulated, the reference's selection over the same keys.
    #[test]
    fn indexer_scores_over_bf16_key_rows_keep_f32_accuracy() {
        // (bf16 rows of an even width: the keys' words are 4-byte loads.)
        for c in IndexerCase::all_widths(|w| w.next_multiple_of(2)) {
            check_tensor_core_scores(&c.rounded(), true);
        }
    }

    fn check_tensor_core_scores(c: &IndexerCase, bf16_keys: bool) {
        {
            let (t, s, top_k, decode) = (c.t, c.s, c.top_k, c.decode);
            let op = SparseRow::IndexScores { heads: c.heads, decode, top_k, mma: true, bf16_keys };
            let k = kernel(op, c.di, "f32");
            assert_eq!(k.threads, 128, "{}", k.kernel_name());
            for simulated in [false, true] {
                let scores = c.scores(&k, simulated, bf16_keys);
                let mut worst = 0f32;
                for i in 0..t {
                    let r = c.seen(i);
                    if r.len() <= top_k {
                        assert!(scores[i * s..(i + 1) * s].iter().all(|v| v.is_nan()), "decode {decode} query {i}");
                        continue;
                    }
                    let (qi, wi, cache) = c.query(i);
                    let model = split_scores(qi, wi, cache, c.width, c.di);
                    let reference = kernels::index_scores(qi, wi, cache, c.width, c.di);
                    let got = &scores[i * s..i * s + r.len()];
                    assert!(scores[i * s + r.len()..(i + 1) * s].iter().all(|v| v.is_nan()), "past the keys");
                    let largest = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    if simulated {
                        let d = diff(got, &model);
                        assert!(d <= 1e-6 * largest, "decode {decode} query {i}: {d} of {largest}");
                    } else {
                        assert_eq!(got, &model[..], "decode {decode} query {i}");
                    }
                    let d = diff(&model, &reference);
                    assert!(d <= 1e-4 * largest, "decode {decode} query {i}: {d} of {largest} from the reference");
                    worst = worst.max(d / largest);
                    assert_eq!(
                        kernels::select_top_keys(got, top_k),
                        kernels::select_top_keys(&reference, top_k),
                        "decode {decode} query {i}"
                    );
                }
                eprintln!(
                    "heads {} d {} decode {decode} bf16 keys {bf16_keys}: split vs f32 reference {worst:.2e} of the largest",
                    c.heads, c.di
                );
            }
        }
    }

    /// The tensor cores' split arithmetic ([`split_scores`], the kernel's bits on the CPU
    /// lowering) selects the f32 reference's keys where the cut is densest: top 1024 of 2048 keys
    /// (the cut at the median score), 16 heads of 64, 12 random queries.
    #[test]
    fn split_scores_select_the_references_keys_at_the_median() {
        let (heads, di, keys_n, top_k) = (16, 64, 2048, 1024);
        for seed in 0..12u64 {
            let q = values(heads * di, 100 + seed, 2.0);
            let w = values(heads, 200 + seed, 2.0);
            let keys = values(keys_n * di, 300 + seed, 2.0);
            let split = kernels::select_top_keys(&split_scores(&q, &w, &keys, di, di), top_k);
            assert_eq!(split, kernels::select_top_keys(&kernels::index_scores(&q, &w, &keys, di, di), top_k), "{seed}");
        }
    }

    /// Scores with many equal values, NaN-free extremes, -0 and +0: the selection follows the
    /// reference's total order with ties to the earlier key, for several top_k and widths of the
    /// scores (fewer keys than threads, more than one chunk a thread, DeepSeek-V3.2's 2048 of 4096
    /// keys), through the CPU lowering and the PTX simulated.
    #[test]
    fn top_keys_follow_the_total_order_with_ties_to_the_earlier_key() {
        let cases = [(7, 3, 1), (300, 17, 2), (600, 256, 3), (1000, 999, 4), (9, 9, 5), (4096, 2048, 6)];
        for (s, top_k, seed) in cases {
            let t = 3;
            let mut scores: Vec<f32> = values(t * s, seed, 8.0).iter().map(|v| (v * 2.0).round() / 2.0).collect();
            scores[0] = -0.0;
            scores[1.min(s - 1)] = 0.0;
            scores[s - 1] = f32::INFINITY;
            scores[s] = f32::NEG_INFINITY;
            let mut want = Vec::new();
            for i in 0..t {
                // Prefill: query i sees the first s - t + i + 1 scores.
                let n = s - t + i + 1;
                want.extend(kernels::select_top_keys(&scores[i * s..i * s + n], top_k));
            }
            let top = kernel(SparseRow::TopKeys { decode: false }, top_k, "f32");
            for simulated in [false, true] {
                let mut sel = vec![7i32; t * top_k];
                let mut sc = scores.clone();
                let args = [raw(&mut sc, &[t, s], "f32"), raw(&mut sel, &[t, top_k], "i32")];
                if simulated {
                    let stats = run_simulated(&top, &args, t);
                    eprintln!("{}: {} keys, {} instructions simulated", top.kernel_name(), s, stats.instructions);
                } else {
                    run_cpu(&top, &args);
                }
                assert_eq!(sel, want, "s {s} top_k {top_k} simulated {simulated}");
            }
        }
    }

    /// Gathered rows (prefill's shared cache, decode's per-query ones) and the last valid slot:
    /// the selected rows' first columns, zeros past the selection; decode's cache write lands at
    /// each position and leaves positions outside the cache alone.
    #[test]
    fn gathered_rows_and_cache_writes_match_the_reference() {
        let (t, k, s, width, d) = (3, 4, 6, 10, 7);
        for decode in [false, true] {
            let rows = if decode { t * s } else { s };
            let keys = values(rows * width, 21, 3.0);
            let sel: Vec<i32> = vec![0, 2, 5, -1, 1, -1, -1, -1, 3, 4, 1, 0];
            let mut want = vec![0f32; t * k * d];
            let mut want_last = Vec::new();
            for i in 0..t {
                let picks = &sel[i * k..(i + 1) * k];
                let count = picks.iter().filter(|&&j| j >= 0).count();
                want_last.push(count as i64 - 1);
                for (slot, &j) in picks.iter().enumerate().filter(|(_, &j)| j >= 0) {
                    let from = ((if decode { i * s } else { 0 }) + j as usize) * width;
                    want[(i * k + slot) * d..(i * k + slot + 1) * d].copy_from_slice(&keys[from..from + d]);
                }
            }
            let g = kernel(SparseRow::GatherRows { decode }, d, "f32");
            let key_shape: Vec<usize> = if decode { vec![t, s, width] } else { vec![s, width] };
            for simulated in [false, true] {
                let (mut keys, mut sel) = (keys.clone(), sel.clone());
                let (mut out, mut last) = (vec![f32::NAN; t * k * d], vec![9i64; t]);
                let args = [
                    raw(&mut keys, &key_shape, "f32"),
                    raw(&mut sel, &[t, k], "i32"),
                    raw(&mut out, &[t * k, d], "f32"),
                    raw(&mut last, &[t], "i64"),
                ];
                run(&g, &args, t, simulated);
                assert_eq!((out, last), (want.clone(), want_last.clone()), "decode {decode} simulated {simulated}");
            }
        }
        let (b, c) = (3, 9);
        let cache0 = values(b * s * c, 22, 1.0);
        let new = values(b * c, 23, 1.0);
        let positions = vec![4i64, s as i64, -2];
        let mut want = cache0.clone();
        want[4 * c..5 * c].copy_from_slice(&new[..c]);
        let w = kernel(SparseRow::CacheWrite { bf16: false }, c, "f32");
        for simulated in [false, true] {
            let (mut cache, mut new, mut pos) = (cache0.clone(), new.clone(), positions.clone());
            let args = [raw(&mut cache, &[b, s, c], "f32"), raw(&mut new, &[b, c], "f32"), raw(&mut pos, &[b], "i64")];
            run(&w, &args, b, simulated);
            assert_eq!(cache, want, "simulated {simulated}");
        }
        // bf16 rows: the new row rounded to nearest even (a tie, a value rounding up into the
        // next binade, a NaN-free largest), the rest of the cache untouched.
        let mut new16 = new.clone();
        new16[..3].copy_from_slice(&[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 2.0 - 2f32.powi(-10)]);
        let cache16: Vec<u16> = cache0.iter().map(|&v| f32_to_bf16(v)).collect();
        let mut want16 = cache16.clone();
        for (to, &v) in want16[4 * c..5 * c].iter_mut().zip(&new16[..c]) {
            *to = f32_to_bf16(v);
        }
        assert_eq!(want16[4 * c..4 * c + 3], [0x3F80, 0x3F82, 0x4000]);
        let w16 = kernel(SparseRow::CacheWrite { bf16: true }, c, "f32");
        for simulated in [false, true] {
            let (mut cache, mut new, mut pos) = (cache16.clone(), new16.clone(), positions.clone());
            let args = [raw(&mut cache, &[b, s, c], "bf16"), raw(&mut new, &[b, c], "f32"), raw(&mut pos, &[b], "i64")];
            run(&w16, &args, b, simulated);
            assert_eq!(cache, want16, "bf16 rows, simulated {simulated}");
        }
    }

    /// Prefill's bf16 cache rows: the old rows copied as they are, the new rows rounded to nearest
    /// even after them (a tie, a value rounding up into the next binade); an empty cache (the
    /// first chunk: no old row, the new ones first).
    #[test]
    fn prefill_cache_rows_append_in_bf16() {
        let (t, c) = (3, 9);
        let mut new = values(t * c, 24, 2.0);
        new[..2].copy_from_slice(&[1.0 + 3.0 * 2f32.powi(-8), 2.0 - 2f32.powi(-10)]);
        let (old_k, new_k) = (
            kernel(SparseRow::AppendBf16 { new: false }, c, "f32"),
            kernel(SparseRow::AppendBf16 { new: true }, c, "f32"),
        );
        for p in [4, 0] {
            let old: Vec<u16> = values(p * c, 25, 2.0).iter().map(|&v| f32_to_bf16(v)).collect();
            let mut want = old.clone();
            want.extend(new.iter().map(|&v| f32_to_bf16(v)));
            assert_eq!(want[p * c..p * c + 2], [0x3F82, 0x4000]);
            for simulated in [false, true] {
                let (mut old, mut new) = (old.clone(), new.clone());
                let mut out = vec![0x7FC0u16; (p + t) * c];
                run(&old_k, &[raw(&mut old, &[p, c], "bf16"), raw(&mut out, &[p + t, c], "bf16")], p, simulated);
                let args =
                    [raw(&mut new, &[t, c], "f32"), raw(&mut old, &[p, c], "bf16"), raw(&mut out, &[p + t, c], "bf16")];
                run(&new_k, &args, t, simulated);
                assert_eq!(out, want, "{p} cached rows, simulated {simulated}");
            }
        }
    }

    /// The MLA row reading each query's selected rows in place (`selected`) equals the same row
    /// over the rows gathered (keys the gathered rows, positions their last): the reference's bits
    /// on the CPU lowering, prefill's one sequence and decode's cache per query, selections of
    /// every length up to K (-1 padded; one empty); the PTX simulated within rounding.
    #[test]
    fn mla_attention_over_selected_rows_equals_it_over_gathered_rows() {
        let (heads, nope, rope, v, kv, k) = (2, 16, 8, 16, 32, 5);
        let (t, s) = (4, 9);
        let c = kv + rope + 7;
        let kvb: Vec<u16> = values(heads * (nope + v) * kv, 31, 1.0).iter().map(|&x| f32_to_bf16(x)).collect();
        let q_nope = values(t * heads * nope, 32, 2.0);
        let q_pe = values(t * heads * rope, 33, 2.0);
        let sel: Vec<i32> = vec![0, 3, 8, 2, 6, 5, -1, -1, -1, -1, 7, 1, 4, -1, -1, -1, -1, -1, -1, -1];
        for decode in [false, true] {
            let rows = if decode { t * s } else { s };
            let cache = values(rows * c, 34, 1.0);
            // The gathered rows (their first kv + rope columns), each query's own sequence.
            let mut gathered = vec![0f32; t * k * (kv + rope)];
            let mut last = vec![0i64; t];
            for i in 0..t {
                let picks = &sel[i * k..(i + 1) * k];
                last[i] = picks.iter().filter(|&&j| j >= 0).count() as i64 - 1;
                for (slot, &j) in picks.iter().enumerate().filter(|(_, &j)| j >= 0) {
                    let from = ((if decode { i * s } else { 0 }) + j as usize) * c;
                    let to = (i * k + slot) * (kv + rope);
                    gathered[to..to + kv + rope].copy_from_slice(&cache[from..from + kv + rope]);
                }
            }
            let op = |prefill: bool, selected: bool| RowOp::MlaDecode {
                heads,
                nope,
                rope,
                v,
                context: 4,
                scale: 0.3,
                prefill,
                selected,
            };
            let (mut qn, mut qp, mut w) = (q_nope.clone(), q_pe.clone(), kvb.clone());
            let mut want = vec![f32::NAN; t * heads * v];
            let (mut g, mut l) = (gathered.clone(), last.clone());
            run_cpu(
                &RowKernel::new(op(false, false), kv, "bf16"),
                &[
                    raw(&mut qn, &[t, heads, nope], "f32"),
                    raw(&mut qp, &[t, heads, rope], "f32"),
                    raw(&mut g, &[t, k, kv + rope], "f32"),
                    raw(&mut l, &[t], "i64"),
                    raw(&mut w, &[heads * (nope + v), kv], "bf16"),
                    raw(&mut want, &[t, heads * v], "f32"),
                ],
            );
            assert!(want[..(t - 1) * heads * v].iter().all(|x| x.is_finite()));
            let kernel = kernel_of(op(!decode, true), kv, "bf16");
            let cache_shape: Vec<usize> = if decode { vec![t, s, c] } else { vec![s, c] };
            for simulated in [false, true] {
                let (mut qn, mut qp, mut w, mut cache, mut sel) =
                    (q_nope.clone(), q_pe.clone(), kvb.clone(), cache.clone(), sel.clone());
                let mut out = vec![f32::NAN; t * heads * v];
                let args = [
                    raw(&mut qn, &[t, heads, nope], "f32"),
                    raw(&mut qp, &[t, heads, rope], "f32"),
                    raw(&mut cache, &cache_shape, "f32"),
                    raw(&mut sel, &[t, k], "i32"),
                    raw(&mut w, &[heads * (nope + v), kv], "bf16"),
                    raw(&mut out, &[t, heads * v], "f32"),
                ];
                if simulated {
                    run_simulated(&kernel, &args, t * heads);
                    let worst = out.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(worst <= 1e-5, "decode {decode}: simulated differs by {worst}");
                } else {
                    run_cpu(&kernel, &args);
                    let same = out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "decode {decode}: {out:?} vs {want:?}");
                }
            }
        }
    }
}
