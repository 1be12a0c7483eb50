//! `lowering.json` of a GPU artifact: how each fused kernel the plan launches runs as template
//! kernel launches. The plan (`crate::plan`) binds the fused kernels' arguments and results to
//! buffers; a fused kernel here becomes one or more launches over those buffers, temporaries sized
//! by the fused kernel's rows, and tables the runtime builds once (RoPE cos/sin).
//!
//! Weights a GEMM reads are the fused kernel's weight arguments, concatenated along N in the listed
//! order (one GEMM over q_a and kv_a, or gate and up) — or, grouped, laid out per expert: each
//! listed weight's rows for the expert in turn, the routed experts then the shared ones. The runtime
//! does these re-layouts once, at load.

use serde::{Deserialize, Serialize};

/// Bumped whenever the format changes incompatibly (2: a row launch's grid may differ per regime,
/// [`Blocks::Rows`]'s `decode_rows_per_block`, which a reader of 1 would ignore; 3: a grouped
/// weight's shared experts may lie side by side along K, [`GroupedWeightSpec::shared_columns`]; 4:
/// a GEMM may read a second A, [`GemmSpec::a2`], which a reader of 3 would not pass; 5: a launch
/// may run in one regime only, [`LaunchSpec::only`], which a reader of 4 would run in both; 6:
/// the sampling kernel, [`Lowering::sample`], takes each row's min-p, which a reader of 5 would
/// not pass).
pub const LOWERING_FORMAT_VERSION: u32 = 6;

/// The most probable tokens (and their logits) the scoring kernel ([`Lowering::scores`]) gives a
/// row, most probable first: OpenAI's most `top_logprobs`.
pub const SCORES_TOP: usize = 20;

/// What the sampling kernel ([`Lowering::sample`]) gives for a row whose list it leaves to the
/// host (more candidates than it sorts, or NaN weights): the runtime draws that row there.
pub const SAMPLE_ON_HOST: i32 = -2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lowering {
    pub format_version: u32,
    pub kernels: Vec<FusedLowering>,
    /// Greedy sampling on the device: a row kernel taking logits `[rows, vocab]` (f32) to each row's
    /// argmax `[rows]` (i32; f32 total order, ties to the lower index, as the host sampler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argmax: Option<String>,
    /// Sampling at a temperature on the device, with top-k, top-p and min-p or every token weighed:
    /// a row kernel taking logits `[rows, vocab]` (f32), temperatures and top-ps `[rows]` (f32),
    /// top-ks `[rows]` (i32; 0: none), min-ps `[rows]` (f32; 0: none) and uniform draws `[rows]`
    /// (the bits of f64s in [0, 1), as i64) to
    /// each row's token `[rows]` (i32; -1 where the temperature is not above 0, [`SAMPLE_ON_HOST`]
    /// where the host must draw): the host sampler's draw from the same logits, bit for bit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
    /// Log-probabilities' sums on the device: a row kernel taking logits `[rows, vocab]` (f32) and
    /// a token per row `[rows]` (i32) to softmax's denominator `sum(e^(l - max))` (the bits of an
    /// f64, as i64; [`v3c_models::sampling::exp_sum`]'s, bit for bit), the largest logit and the
    /// token's logit (f32; NaN past the row), `[rows]` each, and the [`SCORES_TOP`] most probable
    /// tokens `[rows, SCORES_TOP]` (i32; -1 past the row's) with their logits (f32): the host's
    /// `top_k`. 16 bytes a row to read back, 8 more an alternative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<String>,
    /// The decode caches' rows (S of `[B, S, C]`) must be a multiple of this: they are bf16 pages
    /// of that many rows, read in place by the tensor-core decode attention (sessions round their
    /// caches up). Absent: any number of rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_rows_multiple: Option<usize>,
    /// A training step's optimizer on the device (absent: AdamW runs on the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerSpec>,
}

/// Scalars the AdamW kernel reads (`hyper`, f32): the gradient's scale (clip / windows), lr, b1,
/// 1 - b1, b2, 1 - b2, the bias corrections 1 - b1^t and 1 - b2^t, eps, the weight decay
/// (`v3c_models::train::AdamWStep::hyper`).
pub const ADAMW_HYPER: usize = 10;

/// The row kernels of a training step's optimizer on the device, each over a flat f32 tensor of
/// any length, a block per `chunk` elements (the grid: `ceil(n / chunk)`): the windows' gradients
/// summed (`accumulate_first`: `acc = g`, `accumulate`: `acc += g`; memrefs `g`, `acc`), their
/// squares summed per block (`squares`: `g`, `part [grid]`), and AdamW (`adamw`: the master `w`,
/// the gradient `g`, the bf16 moments `m`, `v`, `hyper` [[`ADAMW_HYPER`]]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSpec {
    pub chunk: usize,
    pub accumulate_first: String,
    pub accumulate: String,
    pub squares: String,
    pub adamw: String,
}

impl OptimizerSpec {
    /// The kernels and the ranks of their memrefs.
    pub fn kernels(&self) -> [(&str, &'static [usize]); 4] {
        [
            (&self.accumulate_first, &[1, 1]),
            (&self.accumulate, &[1, 1]),
            (&self.squares, &[1, 1]),
            (&self.adamw, &[1, 1, 1, 1, 1]),
        ]
    }
}

/// One fused kernel's launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusedLowering {
    pub fused: String,
    pub launches: Vec<LaunchSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temps: Vec<TempSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_table: Option<RopeTableSpec>,
}

impl FusedLowering {
    /// Per temporary, whether it needs memory in `regime`: a launch running there names it, or no
    /// launch names it at all. One only the other regime's launches name needs none.
    pub fn temps_used_in(&self, regime: Regime) -> Vec<bool> {
        let (mut here, mut anywhere) = (vec![false; self.temps.len()], vec![false; self.temps.len()]);
        for l in &self.launches {
            for t in l.operands.iter().filter_map(OperandSpec::temp).filter(|&t| t < self.temps.len()) {
                anywhere[t] = true;
                here[t] |= l.runs_in(regime);
            }
        }
        here.iter().zip(&anywhere).map(|(&h, &a)| h || !a).collect()
    }

    /// The launches (first, last) that name each temporary; one no launch names spans them all.
    fn temp_lives(&self) -> Vec<(usize, usize)> {
        let mut lives = vec![None::<(usize, usize)>; self.temps.len()];
        for (li, l) in self.launches.iter().enumerate() {
            for t in l.operands.iter().filter_map(OperandSpec::temp) {
                if let Some(live) = lives.get_mut(t) {
                    *live = Some(live.map_or((li, li), |(a, b)| (a.min(li), b.max(li))));
                }
            }
        }
        let all = (0, self.launches.len().saturating_sub(1));
        lives.into_iter().map(|l| l.unwrap_or(all)).collect()
    }

    /// Where each temporary starts in the temporaries region, and the bytes the region needs, for
    /// temporaries of `bytes[i]` bytes (each already aligned): temporaries live in overlapping
    /// launch ranges (from the first launch naming one to the last) never share bytes; one dead
    /// before another is first written may (the experts' per-step weight blocks: the forward's
    /// before the gradient's transposed ones). First fit, in the order of first use: laid out at
    /// the most any run needs, the same offsets hold every smaller run.
    pub fn temp_layout(&self, bytes: &[usize]) -> (Vec<usize>, usize) {
        let lives = self.temp_lives();
        let mut order: Vec<usize> = (0..bytes.len().min(lives.len())).collect();
        order.sort_by_key(|&i| (lives[i].0, i));
        let mut offsets = vec![0usize; bytes.len()];
        let mut placed: Vec<usize> = Vec::new();
        let mut total = 0;
        for i in order {
            let (first, last) = lives[i];
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|&&j| lives[j].0 <= last && first <= lives[j].1)
                .map(|&j| (offsets[j], offsets[j] + bytes[j]))
                .collect();
            busy.sort_unstable();
            let mut at = 0;
            for (start, end) in busy {
                if at + bytes[i] <= start {
                    break;
                }
                at = at.max(end);
            }
            offsets[i] = at;
            total = total.max(at + bytes[i]);
            placed.push(i);
        }
        (offsets, total)
    }
}

/// What a launch runs: one kernel, or one per regime (decode's few rows, prefill's many).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KernelChoice {
    One(String),
    PerRegime {
        decode: String,
        prefill: String,
        /// A GEMM's kernels for prefill runs of fewer rows, by the most rows each takes, ascending:
        /// a run of `R` rows (1 on its last row alone) launches the first whose `rows` is at least
        /// `R`, else `prefill` (picked for the regime's most rows). A prompt's short chunk, a speculative
        /// draft's few tokens and a chunk's head on its last row then run tiles and K splits picked
        /// for their rows. A reader that ignores it launches `prefill` at every size: slower, the
        /// same results.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        prefill_under: Vec<RowsKernel>,
    },
}

/// A kernel for runs of at most `rows` rows ([`KernelChoice::PerRegime`]'s `prefill_under`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowsKernel {
    pub rows: usize,
    pub kernel: String,
}

impl KernelChoice {
    /// A kernel per regime, and none for smaller prefill runs.
    pub fn per_regime(decode: impl Into<String>, prefill: impl Into<String>) -> KernelChoice {
        KernelChoice::PerRegime { decode: decode.into(), prefill: prefill.into(), prefill_under: Vec::new() }
    }

    /// Every kernel name it may launch.
    pub fn names(&self) -> Vec<&str> {
        match self {
            KernelChoice::One(k) => vec![k],
            KernelChoice::PerRegime { decode, prefill, prefill_under } => {
                let mut names = vec![decode.as_str(), prefill.as_str()];
                names.extend(prefill_under.iter().map(|k| k.kernel.as_str()));
                names
            }
        }
    }

    /// The kernel a run in `regime` over `rows` rows launches.
    pub fn for_run(&self, regime: Regime, rows: usize) -> &str {
        match self {
            KernelChoice::One(k) => k,
            KernelChoice::PerRegime { decode, .. } if regime == Regime::Decode => decode,
            KernelChoice::PerRegime { prefill, prefill_under, .. } => {
                prefill_under.iter().find(|k| rows <= k.rows).map_or(prefill, |k| &k.kernel)
            }
        }
    }

    /// The most rows of a prefill run below which it launches another kernel than at the planned
    /// rows: what an expansion check must also reach.
    pub fn prefill_bounds(&self) -> Vec<usize> {
        match self {
            KernelChoice::One(_) => Vec::new(),
            KernelChoice::PerRegime { prefill_under, .. } => prefill_under.iter().map(|k| k.rows).collect(),
        }
    }
}

/// A buffer a launch reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperandSpec {
    /// The fused kernel's argument (the plan's buffer for it).
    Arg(usize),
    /// The fused kernel's result.
    Result(usize),
    /// A temporary of this lowering.
    Temp(usize),
    /// The RoPE table.
    RopeTable,
    /// Rows `first .. first + rows` of a temporary (viewed as `[rows, cols]`).
    TempRows { temp: usize, first: usize, rows: usize },
    /// A temporary's first rows, as many as argument `arg` has (seen as a matrix): a copy of that
    /// argument whose rows are not the run's (e.g. the MTP module's `T - 1`).
    TempRowsOf { temp: usize, arg: usize },
}

impl OperandSpec {
    /// The temporary it names (whole or rows of it), if it names one.
    pub fn temp(&self) -> Option<usize> {
        match *self {
            OperandSpec::Temp(t) | OperandSpec::TempRows { temp: t, .. } | OperandSpec::TempRowsOf { temp: t, .. } => {
                Some(t)
            }
            OperandSpec::Arg(_) | OperandSpec::Result(_) | OperandSpec::RopeTable => None,
        }
    }
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// How many blocks a launch has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Blocks {
    /// The leading dim of operand `operand` in blocks of `rows_per_block` (rounded up) times
    /// `per_row`; `decode_rows_per_block`: the decode regime's kernel's rows a block, where it
    /// differs (routing: a token a block in decode, several in prefill).
    Rows {
        operand: usize,
        per_row: usize,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        rows_per_block: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decode_rows_per_block: Option<usize>,
    },
    /// One block.
    One,
    /// A GEMM's units: tiles (x K splits) from M, N and its configuration (in its name), or one
    /// per SM when persistent.
    GemmUnits,
    /// Prefill attention's: one per 128 queries and head.
    AttentionTiles,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub kernel: KernelChoice,
    /// Operands in the kernel's argument order (contiguous buffers; a lower-rank argument sees the
    /// leading dims collapsed).
    pub operands: Vec<OperandSpec>,
    pub blocks: Blocks,
    /// For a GEMM: which operands are what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm: Option<GemmSpec>,
    /// For prefill attention (operands q, k, v, out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionSpec>,
    /// The one regime the launch runs in (absent: both). A fused kernel may take another path per
    /// regime: routing's logits on the tensor cores for prefill's many rows, in the reference's
    /// split order on the CUDA cores for decode's few.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Regime>,
}

/// Which entries a launch runs in: the decode entry's steps, or every other entry's runs (prefill,
/// the MTP draft, a training step), as [`KernelChoice::PerRegime`] picks kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Regime {
    Decode,
    Prefill,
}

impl Regime {
    /// Its place in the `[decode, prefill]` pairs the lowering keeps per regime.
    pub fn index(self) -> usize {
        match self {
            Regime::Decode => 0,
            Regime::Prefill => 1,
        }
    }

    /// How `lowering.json` and the compiler's reports name it.
    pub fn name(self) -> &'static str {
        ["decode", "prefill"][self.index()]
    }

    /// The regime of entry `entry` (by name: `decode`, or any other).
    pub fn of_entry(entry: &str) -> Regime {
        if entry == "decode" {
            Regime::Decode
        } else {
            Regime::Prefill
        }
    }
}

impl LaunchSpec {
    /// Whether the launch runs in `regime`.
    pub fn runs_in(&self, regime: Regime) -> bool {
        self.only.is_none_or(|only| only == regime)
    }
}

/// A prefill attention launch's parameters: the heads its head-major operands stack (the query
/// length is q's rows / heads, the key length k's) and the softmax scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub heads: usize,
    pub scale: f32,
}

/// A GEMM launch's operands by role (indices into the launch's operands).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmSpec {
    pub n: usize,
    /// K of the weights (0 for Wgrad's form: K is the run's tokens, A and B are temporaries).
    pub k: usize,
    pub a: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a_scale: Option<usize>,
    /// Weights (and scales) concatenated along N, in order (dense GEMMs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<(usize, Option<usize>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<usize>,
    /// The output is the last operand; when the fused kernel has several results they are column
    /// ranges `[start, end)` of it, copied into its result buffers in order (a strided device copy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<(usize, usize)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grouped: Option<GroupedSpec>,
    /// The operand holding K's range `[start, end)` (two i32) when the device decides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k_range: Option<usize>,
    /// The second A of a dual-A GEMM (`(A + A2) B^T`: f32 activations as bf16 hi + lo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a2: Option<usize>,
}

/// A grouped (MoE) GEMM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupedSpec {
    /// `gather` (A rows read by token) or `contiguous` (A rows in sorted order).
    pub grouping: String,
    pub groups: usize,
    pub routed: usize,
    pub offsets: usize,
    pub perm: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_scale: Option<usize>,
    pub scatter: bool,
    pub weights: Vec<GroupedWeightSpec>,
}

/// One weight of a grouped GEMM (operand indices): the routed experts' `[E, rows, K]` and scales,
/// the shared experts' `[S * rows, K]` and scales — or, `shared_columns`, `[rows, S * K]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupedWeightSpec {
    pub routed: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_scale: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_scale: Option<usize>,
    /// Rows per expert.
    pub rows: usize,
    /// The shared experts lie side by side along K: the down projection of S shared experts is
    /// one MLP's `[rows, S * K]` (its intermediate columns, expert by expert).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_columns: bool,
}

/// A temporary: `[rows * rows_factor, cols]` of `dtype` (rows: the run's, or with `rows_of` the
/// leading dim of that argument of the fused kernel), or `[fixed_rows, cols]`; with `run_cols`, its
/// columns follow the run's rows instead of `cols` (a transposed activation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempSpec {
    pub rows_factor: usize,
    pub cols: usize,
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_rows: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_cols: Option<RunCols>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_of: Option<usize>,
    /// An explicit shape instead (any rank), dim by dim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dims: Option<Vec<TempDim>>,
}

/// One dim of a temporary's explicit shape ([`TempSpec::dims`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TempDim {
    Fixed(usize),
    /// The run's rows times this.
    Rows(usize),
    /// Dim `dim` of the fused kernel's argument `arg`, rounded up to a multiple of `align`, then
    /// divided by `div` (e.g. a cache's rows in whole 64-row pages, or its pages).
    Arg {
        arg: usize,
        dim: usize,
        align: usize,
        div: usize,
    },
    /// Split-K decode attention's splits ([`attention_splits`]) for the run's sequences of `heads`
    /// query rows over the pages of the block table `[B, pages]` of argument `table` (64 keys a
    /// page).
    Splits {
        heads: usize,
        table: usize,
    },
    /// The same splits over the keys each sequence may have: dim `dim` of argument `arg` (sparse
    /// attention: the selection `[B, K]` a query's keys come from).
    SplitsOver {
        heads: usize,
        arg: usize,
        dim: usize,
    },
}

/// Most splits of split-K decode attention.
pub const MAX_SPLITS: usize = 128;
/// Fewest 64-key pages a split takes: each split loads its query tile (as much as a page) and writes
/// its f32 outputs (a quarter of its pages' bytes at 8 pages) for the combine to read back.
pub const MIN_SPLIT_PAGES: usize = 8;
/// The most SMs a device may count for the splits: GH100 has 144 (H100, H200, H800 SXM enable 132).
/// A larger count is taken as this, so that temporaries sized for any device hold every run's.
pub const MAX_SMS: usize = 144;

/// A split's fixed work in page steps: its query tile's load (as many bytes as a page) and its f32
/// outputs written for the combine (and read back).
pub const SPLIT_OVERHEAD_PAGES: usize = 1;

/// Splits of split-K decode attention: `sequences` of `rows` query rows (64 a block) over `keys`
/// keys on `sms` SMs, at most [`MAX_SPLITS`] and one per [`MIN_SPLIT_PAGES`] pages, and at most
/// enough blocks for two waves (FlashMLA fills the machine likewise: a batch of one long sequence
/// is spread over every SM). Of those, the fewest whose makespan is the least: waves of blocks (one
/// an SM) times a block's page steps ([`SPLIT_OVERHEAD_PAGES`] more than its pages) — 64 sequences
/// of 128 heads over 4096 keys on 132 SMs take 1 split (128 blocks, one wave of 65 steps; two waves'
/// 3 splits ran 3 waves of 23). `sms` 0: what temporaries are sized for — per sequence, the most
/// splits x sequences any run of at most `sequences` sequences (and at most `keys` keys) on any
/// device needs (the two waves' bound: it only grows with SMs and keys).
pub fn attention_splits(sequences: usize, rows: usize, keys: usize, sms: usize) -> usize {
    let pages = keys.div_ceil(64).max(1);
    let most = MAX_SPLITS.min(pages.div_ceil(MIN_SPLIT_PAGES)).max(1);
    let blocks_of = |sequences: usize| (sequences * rows.div_ceil(64)).max(1);
    let splits = |sequences: usize, sms: usize| (2 * sms.min(MAX_SMS)).div_ceil(blocks_of(sequences)).clamp(1, most);
    if sms > 0 {
        let (blocks, sms) = (blocks_of(sequences), sms.min(MAX_SMS));
        let makespan = |s: usize| (blocks * s).div_ceil(sms) * (pages.div_ceil(s) + SPLIT_OVERHEAD_PAGES);
        return (1..=splits(sequences, sms)).min_by_key(|&s| makespan(s)).unwrap_or(1);
    }
    // Fewer sequences take more splits each: the temporaries' `[splits, sequences x rows, ..]`
    // hold the largest product (splits only grow with SMs and keys).
    let n = sequences.max(1);
    (1..=n).map(|b| splits(b, MAX_SMS) * b).max().unwrap_or(1).div_ceil(n)
}

impl TempSpec {
    /// Its shape in a run of `rows` rows whose fused kernel's argument `i` has shape `arg(i)`, on a
    /// device of `sms` SMs (0: the most any device needs).
    pub fn shape(
        &self,
        rows: usize,
        arg: &dyn Fn(usize) -> Result<Vec<usize>, String>,
        sms: usize,
    ) -> Result<Vec<usize>, String> {
        if let Some(dims) = &self.dims {
            return dims
                .iter()
                .map(|d| match *d {
                    TempDim::Fixed(n) => Ok(n),
                    TempDim::Rows(f) => Ok(rows * f),
                    TempDim::Arg { arg: i, dim, align, div } => {
                        let shape = arg(i)?;
                        let n = *shape.get(dim).ok_or_else(|| format!("argument {i} has no dim {dim}"))?;
                        Ok(n.next_multiple_of(align.max(1)) / div.max(1))
                    }
                    TempDim::Splits { heads, table } => {
                        let pages = *arg(table)?.get(1).ok_or_else(|| format!("argument {table} is not [B, pages]"))?;
                        Ok(attention_splits(rows, heads, pages * crate::abi::PAGE_ROWS, sms))
                    }
                    TempDim::SplitsOver { heads, arg: i, dim } => {
                        let keys = *arg(i)?.get(dim).ok_or_else(|| format!("argument {i} has no dim {dim}"))?;
                        Ok(attention_splits(rows, heads, keys.next_multiple_of(crate::abi::PAGE_ROWS), sms))
                    }
                })
                .collect();
        }
        let base = match self.rows_of {
            Some(i) => arg(i)?.first().copied().unwrap_or(0),
            None => rows,
        };
        Ok(vec![self.rows(base), self.cols(rows)])
    }

    /// Its rows for a run of `rows` rows (`rows`: the `rows_of` argument's leading dim when it has
    /// one).
    pub fn rows(&self, rows: usize) -> usize {
        self.fixed_rows.unwrap_or(rows * self.rows_factor)
    }

    /// Its columns for a run of `rows` rows.
    pub fn cols(&self, rows: usize) -> usize {
        self.run_cols.map_or(self.cols, |c| c.cols(rows))
    }
}

/// Columns that follow a run's rows: one per `group` of `rows * factor + extra` (the last group
/// partial), rounded up to a multiple of `align` (e.g. a transposed e4m3 activation: TMA needs rows
/// of 16-byte multiples; the experts' pairs, `factor` per token, each expert's padded to whole
/// 128-pair groups: `extra` = experts x 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCols {
    pub group: usize,
    pub align: usize,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub factor: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub extra: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl RunCols {
    /// One per `group` rows, rounded up to `align`.
    pub fn new(group: usize, align: usize) -> RunCols {
        RunCols { group, align, factor: 1, extra: 0 }
    }

    pub fn cols(&self, rows: usize) -> usize {
        (rows * self.factor + self.extra).div_ceil(self.group.max(1)).next_multiple_of(self.align.max(1))
    }
}

/// Row p of the table: `cos(p * inv_freq[i]) * attention_factor` for i < dim / 2, then the sines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeTableSpec {
    pub dim: usize,
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

impl Lowering {
    /// Every GEMM's prefill kernel at every run's rows: the kernels for smaller runs left out
    /// (`v3r bench-prefill --plan-rows-kernels`: how chunks ran before they had them).
    pub fn without_smaller_prefill_kernels(&mut self) {
        for l in self.kernels.iter_mut().flat_map(|f| &mut f.launches) {
            if let KernelChoice::PerRegime { prefill_under, .. } = &mut l.kernel {
                prefill_under.clear();
            }
        }
    }

    /// Why these launches cannot run: an operand out of range, or a kernel the manifest does not
    /// list (`known`).
    pub fn check(&self, known: &dyn Fn(&str) -> bool) -> Result<(), String> {
        if let Some(k) = self.argmax.as_ref().filter(|k| !known(k)) {
            return Err(format!("argmax kernel {k} is not in the manifest"));
        }
        if let Some(k) = self.sample.as_ref().filter(|k| !known(k)) {
            return Err(format!("sampling kernel {k} is not in the manifest"));
        }
        if let Some(k) = self.scores.as_ref().filter(|k| !known(k)) {
            return Err(format!("scoring kernel {k} is not in the manifest"));
        }
        if let Some(o) = &self.optimizer {
            if o.chunk == 0 {
                return Err("the optimizer's kernels take blocks of 0 elements".into());
            }
            if let Some((k, _)) = o.kernels().into_iter().find(|(k, _)| !known(k)) {
                return Err(format!("optimizer kernel {k} is not in the manifest"));
            }
        }
        for f in &self.kernels {
            for (i, l) in f.launches.iter().enumerate() {
                for name in l.kernel.names() {
                    if !known(name) {
                        return Err(format!("{} launch {i}: kernel {name} is not in the manifest", f.fused));
                    }
                }
                for o in &l.operands {
                    let ok = match *o {
                        OperandSpec::Temp(t) => t < f.temps.len(),
                        OperandSpec::TempRows { temp, first, rows } => {
                            f.temps.get(temp).is_some_and(|t| t.fixed_rows.is_some_and(|fixed| first + rows <= fixed))
                        }
                        OperandSpec::TempRowsOf { temp, .. } => temp < f.temps.len(),
                        OperandSpec::RopeTable => f.rope_table.is_some(),
                        OperandSpec::Arg(_) | OperandSpec::Result(_) => true,
                    };
                    if !ok {
                        return Err(format!("{} launch {i}: operand {o:?} is not defined", f.fused));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// A row launch of kernel `k` over temporaries `temps`, in regime `only` (None: both).
    fn temps_launch(temps: &[usize], only: Option<super::Regime>) -> super::LaunchSpec {
        use super::*;
        LaunchSpec {
            kernel: KernelChoice::One("k".into()),
            operands: temps.iter().map(|&t| OperandSpec::Temp(t)).collect(),
            blocks: Blocks::One,
            gemm: None,
            attention: None,
            only,
        }
    }

    /// A temporary of one f32 a row.
    fn one_f32_a_row() -> super::TempSpec {
        super::TempSpec {
            rows_factor: 1,
            cols: 1,
            dtype: "f32".into(),
            fixed_rows: None,
            run_cols: None,
            rows_of: None,
            dims: None,
        }
    }

    #[test]
    fn temporaries_share_bytes_only_when_their_launches_do_not_overlap() {
        use super::*;
        let launch = |temps: &[usize]| temps_launch(temps, None);
        let temp = one_f32_a_row();
        // 0 -> 1 (launch 0), 1 -> 2 (launch 1), 2 + 3 -> 4 (launch 2); 5 named by none.
        let f = FusedLowering {
            fused: "f".into(),
            launches: vec![launch(&[0, 1]), launch(&[1, 2]), launch(&[2, 3, 4])],
            temps: vec![temp; 6],
            rope_table: None,
        };
        let (offsets, total) = f.temp_layout(&[512, 256, 1024, 256, 512, 256]);
        // 0 and 1 are dead by launch 2: 3 and 4 take their bytes; 5, named by no launch, and 2 (live
        // with 1 at launch 1) take their own.
        assert_eq!(offsets, vec![0, 512, 1024, 0, 256, 768]);
        assert_eq!(total, 2048);
        for i in 0..6 {
            for j in 0..i {
                let lives = f.temp_lives();
                let overlap = lives[i].0 <= lives[j].1 && lives[j].0 <= lives[i].1;
                let sizes = [512, 256, 1024, 256, 512, 256];
                let disjoint = offsets[i] + sizes[i] <= offsets[j] || offsets[j] + sizes[j] <= offsets[i];
                assert!(!overlap || disjoint, "temporaries {j} and {i}: {offsets:?}");
            }
        }
    }

    #[test]
    fn a_temporary_only_the_other_regimes_launches_name_needs_no_memory() {
        use super::*;
        let launch = temps_launch;
        let temp = one_f32_a_row();
        // 0: decode's; 1: prefill's; 2: both regimes'; 3: no launch's.
        let f = FusedLowering {
            fused: "f".into(),
            launches: vec![
                launch(&[0, 2], Some(Regime::Decode)),
                launch(&[1, 2], Some(Regime::Prefill)),
                launch(&[2], None),
            ],
            temps: vec![temp; 4],
            rope_table: None,
        };
        assert_eq!(f.temps_used_in(Regime::Decode), [true, false, true, true]);
        assert_eq!(f.temps_used_in(Regime::Prefill), [false, true, true, true]);
        assert!(f.launches[0].runs_in(Regime::Decode) && !f.launches[0].runs_in(Regime::Prefill));
        assert!(f.launches[2].runs_in(Regime::Decode) && f.launches[2].runs_in(Regime::Prefill));
        assert_eq!((Regime::of_entry("decode"), Regime::of_entry("draft")), (Regime::Decode, Regime::Prefill));
        let json = serde_json::to_string(&f.launches[1]).unwrap();
        assert!(json.contains(r#""only":"prefill""#), "{json}");
        assert!(!serde_json::to_string(&f.launches[2]).unwrap().contains("only"));
    }

    use super::*;

    /// Explicit shapes: argument dims in whole pages, the run's rows, decode attention's splits
    /// (two waves of blocks, at most one per page and MAX_SPLITS; sized for the most).
    #[test]
    fn temporaries_take_explicit_shapes() {
        let arg = |i: usize| match i {
            2 => Ok(vec![3, 70, 576]),
            3 => Ok(vec![3, 2]),
            _ => Err(format!("argument {i}")),
        };
        let t = |dims: Vec<TempDim>| TempSpec {
            rows_factor: 0,
            cols: 0,
            dtype: "f32".into(),
            fixed_rows: None,
            run_cols: None,
            rows_of: None,
            dims: Some(dims),
        };
        let pages = t(vec![
            TempDim::Arg { arg: 2, dim: 0, align: 1, div: 1 },
            TempDim::Arg { arg: 2, dim: 1, align: 64, div: 1 },
            TempDim::Fixed(576),
        ]);
        assert_eq!(pages.shape(3, &arg, 132), Ok(vec![3, 128, 576]));
        let table = t(vec![
            TempDim::Arg { arg: 2, dim: 0, align: 1, div: 1 },
            TempDim::Arg { arg: 2, dim: 1, align: 64, div: 64 },
        ]);
        assert_eq!(table.shape(3, &arg, 132), Ok(vec![3, 2]));
        let lse = t(vec![TempDim::Splits { heads: 128, table: 3 }, TempDim::Rows(128)]);
        assert_eq!(lse.shape(3, &arg, 132), Ok(vec![1, 384]), "a table of two pages: one split");
        assert_eq!(lse.shape(3, &arg, 0), Ok(vec![1, 384]));
        assert!(t(vec![TempDim::Arg { arg: 1, dim: 0, align: 1, div: 1 }]).shape(3, &arg, 132).is_err());
        // 64 sequences of 128 heads over 4096 keys: 128 blocks, one wave of 64 pages and a step (two
        // splits: two waves of 33, three: three waves of 23; the two waves' bound); MTP's two tokens
        // a sequence: 256 blocks, two waves either way (130 steps unsplit, 132 in two); one
        // sequence: a split per 8 of its 64 pages; sized for the most any run needs.
        assert_eq!(attention_splits(64, 128, 4096, 132), 1);
        assert_eq!(attention_splits(64, 256, 4096, 132), 1);
        // 34 blocks: 7 splits run two waves of 11 steps (22), 3 one wave of 23, 8 three of 9.
        assert_eq!(attention_splits(17, 128, 4096, 132), 7);
        assert_eq!(attention_splits(1, 128, 4096, 132), 8);
        assert_eq!(attention_splits(1, 128, 10, 132), 1);
        // One sequence of 32768 keys: 512 pages over 132 splits (264 blocks: two waves), not 8 as
        // a fixed cap had it (16 blocks on 132 SMs).
        assert_eq!(attention_splits(1, 128, 32768, 132), 64);
        assert_eq!(attention_splits(1, 16, 32768, 132), 64, "one block of heads: capped by the pages");
        assert_eq!(attention_splits(1, 16, 1 << 20, 132), MAX_SPLITS, "264 for two waves, capped");
    }

    /// The temporaries sized with `sms` 0 hold every run's splits x sequences: fewer sequences, fewer
    /// keys, any device.
    #[test]
    fn split_temporaries_hold_every_run() {
        for (sequences, rows, keys) in [(64, 128, 4096), (1, 128, 32768), (256, 16, 163840), (7, 3, 5000), (3, 128, 64)]
        {
            let sized = attention_splits(sequences, rows, keys, 0) * sequences;
            for b in 1..=sequences {
                for k in [1, keys / 3, keys] {
                    for sms in [1, 78, 132, 144, 1000] {
                        let need = attention_splits(b, rows, k, sms) * b;
                        assert!(
                            need <= sized,
                            "{b} of {sequences} x {rows} over {k} of {keys} on {sms}: {need} > {sized}"
                        );
                    }
                }
            }
        }
        // 64 sequences of 4096 keys: 3 splits' outputs per sequence (a run of 64 on 144 SMs needs 3
        // each, of 17 needs 9 each: 153 < 192); the fixed cap of 8 sized 8.
        assert_eq!(attention_splits(64, 128, 4096, 0), 3);
    }

    #[test]
    fn a_prefill_run_launches_the_kernel_picked_for_its_rows() {
        use super::*;
        let under = [(64, "gemm_s"), (512, "gemm_m")].map(|(rows, k)| RowsKernel { rows, kernel: k.into() });
        let choice = KernelChoice::PerRegime {
            decode: "gemm_d".into(),
            prefill: "gemm_l".into(),
            prefill_under: under.to_vec(),
        };
        let prefill = |rows| choice.for_run(Regime::Prefill, rows);
        assert_eq!(
            [prefill(1), prefill(64), prefill(65), prefill(512), prefill(513), prefill(4096)],
            ["gemm_s", "gemm_s", "gemm_m", "gemm_m", "gemm_l", "gemm_l"]
        );
        // Decode's kernel whatever the rows; the bounds an expansion check reaches; every name.
        assert_eq!((choice.for_run(Regime::Decode, 1), choice.for_run(Regime::Decode, 4096)), ("gemm_d", "gemm_d"));
        assert_eq!(choice.prefill_bounds(), [64, 512]);
        assert_eq!(choice.names(), ["gemm_d", "gemm_l", "gemm_s", "gemm_m"]);
        // Written only where there are smaller kernels; a lowering without them reads back as none.
        let text = serde_json::to_string(&choice).unwrap();
        assert!(text.contains(r#""prefill_under":[{"rows":64,"kernel":"gemm_s"}"#), "{text}");
        assert_eq!(serde_json::from_str::<KernelChoice>(&text).unwrap(), choice);
        let plain = KernelChoice::per_regime("gemm_d", "gemm_l");
        assert_eq!(serde_json::to_string(&plain).unwrap(), r#"{"PerRegime":{"decode":"gemm_d","prefill":"gemm_l"}}"#);
        assert_eq!((plain.for_run(Regime::Prefill, 1), plain.prefill_bounds()), ("gemm_l", vec![]));
    }

    #[test]
    fn launches_must_name_listed_kernels_and_defined_operands() {
        let launch = |kernel: &str, operands: Vec<OperandSpec>| LaunchSpec {
            kernel: KernelChoice::per_regime(kernel, "gemm_b"),
            operands,
            blocks: Blocks::GemmUnits,
            gemm: None,
            attention: None,
            only: None,
        };
        let lowering = |l: LaunchSpec| Lowering {
            format_version: LOWERING_FORMAT_VERSION,
            kernels: vec![FusedLowering {
                fused: "swiglu_0".into(),
                launches: vec![l],
                temps: vec![],
                rope_table: None,
            }],
            argmax: None,
            sample: None,
            scores: None,
            cache_rows_multiple: None,
            optimizer: None,
        };
        let known = |k: &str| k.starts_with("gemm_");
        assert_eq!(lowering(launch("gemm_a", vec![OperandSpec::Arg(0), OperandSpec::Result(0)])).check(&known), Ok(()));
        assert_eq!(
            lowering(launch("rows_x", vec![])).check(&known),
            Err("swiglu_0 launch 0: kernel rows_x is not in the manifest".into())
        );
        assert_eq!(
            lowering(launch("gemm_a", vec![OperandSpec::Temp(0)])).check(&known),
            Err("swiglu_0 launch 0: operand Temp(0) is not defined".into())
        );
        let text = serde_json::to_string(&lowering(launch("gemm_a", vec![OperandSpec::RopeTable]))).unwrap();
        let back: Lowering = serde_json::from_str(&text).unwrap();
        assert!(back.check(&known).unwrap_err().contains("RopeTable is not defined"));
    }
}
