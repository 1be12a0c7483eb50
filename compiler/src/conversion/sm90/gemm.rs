//! The Hopper GEMM template: `out[M, N] = A[M, K] . B[N, K]^T (+ residual[M, N])` (both operands
//! K-major, as the model's activations and `[out, in]` weights are), as one `gpu.func` in a `gpu.module`.
//!
//! Work is cut into units: an output tile of `block_m x block_n` and, with `split_k`, one of
//! `splits` K ranges of it. Every block loops over units (`u = blockIdx.x; u += gridDim.x`): the
//! host launches one block per unit, or, `persistent`, one per SM. With `raster = G`, consecutive
//! tiles walk down G tile rows before moving to the next tile column, so blocks running together
//! share B tiles in L2.
//!
//! Per block: `consumers` warpgroups (1 or 2) each own `block_m / consumers` rows of the tile and
//! issue `wgmma.mma_async` (m64 x block_n x k16 for bf16, k32 for e4m3) from shared-memory
//! descriptors. `block_m x 128 B` tiles of A and `block_n x 128 B` tiles of B arrive through TMA
//! (`cp.async.bulk.tensor`, 128-byte swizzle) in a ring of `stages` buffers, each with a "full"
//! mbarrier (`arrive.expect_tx`). Without `specialized`, thread 0 issues the loads and refills a
//! buffer after a block barrier; with it, a producer warpgroup (registers lowered by `setmaxnreg`,
//! the consumers' raised) streams loads ahead, gated by per-buffer "empty" mbarriers the consumer
//! threads arrive on, across tile boundaries. Phases follow a running count of K tiles.
//!
//! fp8: each 128-wide K block accumulates into a fresh block accumulator promoted into the main f32
//! accumulator with the A row scale x the B block scale (1x128 activation, 128x128 weight scaling), as
//! DeepSeek-V3 prescribes; with `b_row_scales` (Wgrad: both operands activations quantized in 128-token
//! groups along K) x each output column's own B row scale. The epilogue writes the fragments straight
//! to global memory (bounds-checked: ragged M and N), adding the residual when asked; a thread's two
//! adjacent columns of a row go in one store (their residual in one load, eight pairs' loads issued
//! before their stores) when the buffers allow (aligned, even N). Split K: each
//! unit writes its partial tile to a workspace (a pair of columns in one 8-byte store); the last of a
//! tile's units (an atomic counter, after a GPU-scope fence) sums the partials in split order — a pair
//! in one 8-byte load a split, two splits' loads of up to 16 pairs issued together; deterministic
//! whatever order the units finish in — applies the epilogue and resets the counter for the next
//! launch. Scattered rows (the MoE down projection) load each of a thread's rows' scale and target
//! once, before the atomic adds.
//!
//! Clusters of 2 along M: the two blocks take adjacent row tiles of one tile column; each producer
//! loads half of the B tile and multicasts it into both blocks (whose consumers release a buffer on
//! both blocks' empty barriers).
//!
//! Grouped (MoE) GEMMs, all experts in one launch over B stacking the experts' weights
//! ([`GemmGrouping`]): rows sorted by expert (`offsets`), optionally gathered from the tokens
//! (`perm`: one TMA row load per A row, issued by the producer warp's 32 lanes), or decode's masked
//! layout (`counts`, `cap`). Units are found by scanning the groups' tile counts. Epilogues: the
//! routing weight per row, SwiGLU (bf16: B's tiles interleave gate and up rows), scatter-add into
//! token rows (f32 atomics: the combine), and fp8 outputs quantized 1x128 in registers (row amax
//! across the row's 4 lanes by shuffles).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::target::GpuTarget;

/// Element type of A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmInput {
    Bf16,
    /// e4m3 with 1x128 A scales `[M, ceil(K/128)]` and 128x128 B scales `[ceil(N/128), ceil(K/128)]`.
    Fp8,
}

/// Element type of the output (and of the residual).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmOutput {
    F32,
    Bf16,
    /// e4m3 with 1x128 scales `out_scale [M, ceil(N/128)]`, quantized as the reference does:
    /// s = max(amax, 1e-4) / 448 over each row's 128 columns, q = e4m3(x / s).
    Fp8,
}

/// How the rows of A and of the output are organized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmGrouping {
    /// One GEMM: `out[M, N] = A[M, K] . B[N, K]^T`.
    Dense,
    /// Grouped (MoE experts, one launch): rows sorted by group, group g owning rows
    /// `[offsets[g], offsets[g + 1])` of A and of the output; B stacks the groups' weights
    /// `[G * N, K]`.
    Contiguous,
    /// As `Contiguous`, but row p of the group-sorted order reads A row `perm[p]` (the token): the
    /// gather is in the loads (one TMA row per A row, issued by the producer warp).
    Gather,
    /// Decode's layout: group g owns rows `[g * cap, g * cap + counts[g])` of A and of the output.
    Masked,
}

/// One GEMM kernel configuration. [`GemmConfig::new`] gives the plain form; the other fields are
/// switched on one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmConfig {
    pub input: GemmInput,
    pub output: GemmOutput,
    /// Output tile rows: a multiple of 64 per consumer warpgroup (one wgmma is 64 rows).
    pub block_m: usize,
    /// Output tile columns: a multiple of 16 from 16 to 256 (the wgmma N).
    pub block_n: usize,
    /// Shared-memory pipeline depth (buffers in flight).
    pub stages: usize,
    /// Consumer warpgroups (1 or 2), each computing `block_m / consumers` rows.
    pub consumers: usize,
    /// Producer/consumer warp specialization: one more warpgroup that only issues TMA loads.
    pub specialized: bool,
    /// Launch one block per SM that loops over tiles (else one block per tile; same kernel code).
    pub persistent: bool,
    /// Tile rasterization: walk `raster` tile rows per tile column (0: row-major order).
    pub raster: usize,
    /// Thread-block cluster size along M (1: none; 2: two blocks with adjacent row tiles share each
    /// B tile, each loading half of it with TMA multicast into both).
    pub cluster: usize,
    /// K split over units with a workspace and a deterministic last-unit reduction (decode shapes).
    pub split_k: bool,
    /// Epilogue adds `residual[M, N]` (the output's type; it may alias the output).
    pub residual: bool,
    pub grouping: GemmGrouping,
    /// Epilogue `silu(gate) * up`: each `block_n` columns of B are `block_n / 2` gate rows then the
    /// matching up rows (weights interleaved so at load); the output has N / 2 columns.
    pub swiglu: bool,
    /// Epilogue multiplies row r by `row_scale[r]` (the routing weight of a permuted row).
    pub row_scale: bool,
    /// Grouped: the epilogue adds row r into output row `perm[r]` (its token) with f32 atomics,
    /// combining a token's experts in the launch (in no fixed order: f32 sums are not
    /// bit-reproducible; the deterministic alternative writes rows in sorted order).
    pub scatter: bool,
    /// fp8: B's scales are per row of B, 1x128 along K as A's (`[N, ceil(K/128)]`), each output
    /// column promoted with its own — Wgrad's `dW = dy^T x`, where both operands are activations
    /// quantized in 128-token groups — not per 128x128 block.
    pub b_row_scales: bool,
    /// K's range from the device: `k_range [2]` (i32) holds the K columns `[start, end)` the unit
    /// sums over, in whole K tiles (start a multiple of `block_k`; the tile that holds `end` is read
    /// whole: the caller pads it with zeros) — one expert's pairs in a Wgrad over pairs laid out per
    /// expert (a count only the device knows).
    pub k_range: bool,
    /// A second A (`a2`, A's shape) multiplied by the same B into the same accumulators: `out =
    /// (A + A2) B^T` with B read once — f32 activations as bf16 `hi + lo` (bf16; dense, gathered or
    /// contiguous).
    pub dual_a: bool,
    /// K tiles pipelined through the tensor cores: tile j + 1's wgmma chain is issued before tile
    /// j's is waited for (`wgmma.wait_group 1`), so the tensor cores run it while the consumer
    /// releases tile j's stage and (fp8) promotes its block accumulator — which then takes a
    /// second block accumulator's registers. Without it each tile's chain drains first
    /// (`wait_group 0`).
    pub k_pipelined: bool,
}

/// Bytes of K per pipeline stage: one 128-byte swizzle row per tile row.
const ROW_BYTES: usize = 128;
/// Registers a thread keeps for itself beyond the accumulators (addresses, loop state), for
/// `validate`, besides what a configuration adds ([`GemmConfig::working_registers`]). ptxas 13.0
/// took 16-38 beyond them (`Used`, or a consumer's highest register in the SASS under
/// `setmaxnreg`): 16 at fp8 128x64 with two consumers, 26 the same K-pipelined, 21-38 at fp8's 192
/// (K-pipelined 128x128 with two consumers, 64x128 with one, 256x64). Configurations near the limit
/// may still spill (fp8 K-pipelined 128x64 with one consumer and a producer: 24 bytes; the MoE
/// GEMMs' K-pipelined 128x128 contiguous and scatter forms: 60-84): `v3c compile` and `v3c tune`
/// pass over what ptxas reports spilling.
const REGISTER_HEADROOM: usize = 40;
/// Registers per thread left to a producer warpgroup (`setmaxnreg.dec`).
const PRODUCER_REGISTERS: usize = 40;
/// Pairs of output columns the split-K reduction sums at a time (their 8-byte loads in flight
/// together, one split after the other): 32 accumulators and as many values loaded.
const REDUCE_PAIRS: usize = 16;
/// Pairs of output columns whose residuals the epilogue loads together before writing them.
const RESIDUAL_PAIRS: usize = 8;

/// Static shared memory beside the dynamic ring: the mbarriers (and the split-K flag), padded so
/// that the dynamic region starts 1024-byte aligned (what ptxas reports for these kernels).
pub const STATIC_SHARED_BYTES: usize = 1024;
/// Named barrier the consumer warpgroups synchronize on without the producer (0 is `bar.sync 0`).
const CONSUMER_BARRIER: usize = 1;

impl GemmConfig {
    /// The plain configuration: one consumer warpgroup, no specialization, one block per tile.
    pub const fn new(input: GemmInput, output: GemmOutput, block_m: usize, block_n: usize, stages: usize) -> Self {
        GemmConfig {
            input,
            output,
            block_m,
            block_n,
            stages,
            consumers: 1,
            specialized: false,
            persistent: false,
            raster: 0,
            cluster: 1,
            split_k: false,
            residual: false,
            grouping: GemmGrouping::Dense,
            swiglu: false,
            row_scale: false,
            scatter: false,
            b_row_scales: false,
            k_range: false,
            dual_a: false,
            k_pipelined: false,
        }
    }

    /// A grouped (MoE) configuration: producer warpgroup (the gather needs its warp).
    pub const fn grouped(
        grouping: GemmGrouping,
        input: GemmInput,
        output: GemmOutput,
        block_m: usize,
        block_n: usize,
        stages: usize,
    ) -> Self {
        let mut c = GemmConfig::new(input, output, block_m, block_n, stages);
        c.grouping = grouping;
        c.specialized = true;
        c
    }

    pub fn is_grouped(&self) -> bool {
        self.grouping != GemmGrouping::Dense
    }

    fn element_bytes(&self) -> usize {
        match self.input {
            GemmInput::Bf16 => 2,
            GemmInput::Fp8 => 1,
        }
    }

    /// K elements per pipeline stage (128 bytes).
    pub fn block_k(&self) -> usize {
        ROW_BYTES / self.element_bytes()
    }

    /// The wgmma K of one instruction (32 bytes of K).
    fn wgmma_k(&self) -> usize {
        32 / self.element_bytes()
    }

    /// A tiles per pipeline stage (two with a second A).
    fn a_tiles(&self) -> usize {
        1 + usize::from(self.dual_a)
    }

    /// Bytes of one pipeline stage (the A tile, or both, and a B tile).
    pub fn stage_bytes(&self) -> usize {
        (self.a_tiles() * self.block_m + self.block_n) * ROW_BYTES
    }

    /// Dynamic shared memory the kernel needs.
    pub fn shared_memory_bytes(&self) -> usize {
        self.stages * self.stage_bytes()
    }

    /// 64-row wgmma tiles each consumer warpgroup computes.
    fn row_tiles(&self) -> usize {
        self.block_m / 64 / self.consumers.max(1)
    }

    /// f32 accumulator registers per consumer thread: fp8 keeps a block and a main accumulator
    /// (K-pipelined, two blocks: the one in flight and the one promoted).
    pub fn accumulator_registers(&self) -> usize {
        let one = self.row_tiles() * (self.block_n / 2);
        match self.input {
            GemmInput::Bf16 => one,
            GemmInput::Fp8 => (2 + usize::from(self.k_pipelined)) * one,
        }
    }

    /// Registers a consumer needs beyond the accumulators and [`REGISTER_HEADROOM`] for what this
    /// configuration adds (ptxas 13.0's counts):
    /// - per-row B scales: the promotion holds a scale per accumulator column, about a fragment's
    ///   worth (fp8 128x128 with two consumers 253 registers against 161 without; K-pipelined at
    ///   192 accumulators it spills 156-956 bytes);
    /// - bf16's epilogue: the residual's loads ahead of their stores, split K's partial tiles
    ///   summed a batch of pairs at a time (at 192 accumulators: 221-224 plain, 248 with the
    ///   residual, spilling with split K). fp8's runs in the block accumulator's registers, dead by
    ///   then (its K-pipelined forms with either within 5 registers of the plain ones).
    pub fn working_registers(&self) -> usize {
        let scales = if self.b_row_scales { self.row_tiles() * self.block_n / 2 } else { 0 };
        let epilogue = match self.input {
            GemmInput::Bf16 => 24 * usize::from(self.residual) + 40 * usize::from(self.split_k),
            GemmInput::Fp8 => 0,
        };
        scales + epilogue
    }

    /// What its registers hang on: the name of this configuration with a ring of 2, no cluster and
    /// no raster (ptxas takes about the same registers whatever those are). A compile that finds
    /// one form spilling tries another form next.
    pub fn register_form(&self) -> String {
        GemmConfig { stages: 2, cluster: 1, raster: 0, ..*self }.kernel_name()
    }

    /// Threads per block: the consumer warpgroups and, specialized, the producer's.
    pub fn threads(&self) -> usize {
        128 * (self.consumers + usize::from(self.specialized))
    }

    /// Registers a consumer thread may use: all a thread can address, or with a producer
    /// warpgroup what `setmaxnreg` gives the consumers once the producer's are lowered.
    pub fn consumer_register_limit(&self, target: &GpuTarget) -> usize {
        let max = target.max_registers_per_thread as usize;
        if !self.specialized {
            return max.min(target.registers_per_sm as usize / self.threads());
        }
        let per_lane = target.registers_per_sm as usize / 128;
        (((per_lane - PRODUCER_REGISTERS) / self.consumers.max(1)) / 8 * 8).min(240).min(max)
    }

    /// Output tiles of an `m x n` problem.
    pub fn tiles(&self, m: usize, n: usize) -> usize {
        m.div_ceil(self.block_m) * n.div_ceil(self.block_n)
    }

    /// Blocks to launch (grid x) for an `m x n` problem with `splits` K splits on `sm_count` SMs:
    /// one per unit or, persistent, per SM; with clusters a multiple of the cluster size (a cluster
    /// takes `cluster` row tiles of one tile column at a time).
    pub fn grid(&self, m: usize, n: usize, splits: usize, sm_count: usize) -> usize {
        let cl = self.cluster.max(1);
        let units = m.div_ceil(self.block_m).div_ceil(cl) * n.div_ceil(self.block_n) * splits.max(1);
        let clusters = if self.persistent { units.min(sm_count / cl) } else { units };
        clusters.max(1) * cl
    }

    /// How [`GemmConfig::kernel_name`] spells a configuration (optional parts in this order).
    pub const NAME_FORMAT: &str = "gemm_<bf16|fp8>_<f32|bf16|fp8>_<M>x<N>x<K>_s<stages>[_wg2][_ws][_persist][_r<G>]\
        [_contig|_gather|_masked][_splitk][_swiglu][_rowscale][_scatter][_res][_b1x128][_krange][_a2][_kp]";

    /// Blocks to launch for a grouped GEMM of `rows` group-sorted rows (masked: `groups * cap`)
    /// over `groups` groups: enough for the most tiles the rows can form (each group's last tile
    /// may be partial), or one per SM when persistent. Blocks beyond the device-side unit count
    /// exit at once.
    pub fn grouped_grid(&self, rows: usize, groups: usize, n: usize, sm_count: usize) -> usize {
        let units = (rows.div_ceil(self.block_m) + groups) * n.div_ceil(self.block_n);
        if self.persistent {
            units.min(sm_count).max(1)
        } else {
            units.max(1)
        }
    }

    /// A stable name for the kernel of this configuration:
    /// [`GemmConfig::NAME_FORMAT`].
    pub fn kernel_name(&self) -> String {
        let input = match self.input {
            GemmInput::Bf16 => "bf16",
            GemmInput::Fp8 => "fp8",
        };
        let output = match self.output {
            GemmOutput::F32 => "f32",
            GemmOutput::Bf16 => "bf16",
            GemmOutput::Fp8 => "fp8",
        };
        let mut name =
            format!("gemm_{input}_{output}_{}x{}x{}_s{}", self.block_m, self.block_n, self.block_k(), self.stages);
        if self.consumers != 1 {
            let _ = write!(name, "_wg{}", self.consumers);
        }
        if self.specialized {
            name.push_str("_ws");
        }
        if self.persistent {
            name.push_str("_persist");
        }
        if self.raster != 0 {
            let _ = write!(name, "_r{}", self.raster);
        }
        if self.cluster != 1 {
            let _ = write!(name, "_cl{}", self.cluster);
        }
        match self.grouping {
            GemmGrouping::Dense => {}
            GemmGrouping::Contiguous => name.push_str("_contig"),
            GemmGrouping::Gather => name.push_str("_gather"),
            GemmGrouping::Masked => name.push_str("_masked"),
        }
        if self.split_k {
            name.push_str("_splitk");
        }
        if self.swiglu {
            name.push_str("_swiglu");
        }
        if self.row_scale {
            name.push_str("_rowscale");
        }
        if self.scatter {
            name.push_str("_scatter");
        }
        if self.residual {
            name.push_str("_res");
        }
        if self.b_row_scales {
            name.push_str("_b1x128");
        }
        if self.k_range {
            name.push_str("_krange");
        }
        if self.dual_a {
            name.push_str("_a2");
        }
        if self.k_pipelined {
            name.push_str("_kp");
        }
        name
    }

    /// What the runtime needs to launch this kernel (recorded in the artifact's manifest).
    pub fn host_abi(&self) -> v3c_runtime::abi::GemmAbi {
        let el = |o: GemmOutput| match o {
            GemmOutput::F32 => "f32",
            GemmOutput::Bf16 => "bf16",
            GemmOutput::Fp8 => "fp8",
        };
        v3c_runtime::abi::GemmAbi {
            input: if self.input == GemmInput::Fp8 { "fp8" } else { "bf16" }.into(),
            output: el(self.output).into(),
            block_m: self.block_m,
            block_n: self.block_n,
            block_k: self.block_k(),
            cluster: self.cluster,
            persistent: self.persistent,
            split_k: self.split_k,
            residual: self.residual,
            grouping: format!("{:?}", self.grouping).to_lowercase(),
            swiglu: self.swiglu,
            row_scale: self.row_scale,
            scatter: self.scatter,
            a_box_rows: if self.grouping == GemmGrouping::Gather { 1 } else { self.block_m },
            b_box_rows: self.block_n / self.cluster,
            b_row_scales: self.b_row_scales,
            k_range: self.k_range,
            dual_a: self.dual_a,
        }
    }

    /// The configuration a [`GemmConfig::kernel_name`] names (`gemm_fp8_bf16_64x128x128_s6_ws`).
    pub fn from_name(name: &str) -> Option<GemmConfig> {
        let rest = name.strip_prefix("gemm_")?;
        let mut parts = rest.split('_');
        let input = match parts.next()? {
            "bf16" => GemmInput::Bf16,
            "fp8" => GemmInput::Fp8,
            _ => return None,
        };
        let output = match parts.next()? {
            "f32" => GemmOutput::F32,
            "bf16" => GemmOutput::Bf16,
            "fp8" => GemmOutput::Fp8,
            _ => return None,
        };
        let dims: Vec<usize> = parts.next()?.split('x').map(|d| d.parse().ok()).collect::<Option<_>>()?;
        let stages = parts.next()?.strip_prefix('s')?.parse().ok()?;
        let [block_m, block_n, block_k] = dims[..] else { return None };
        let mut config = GemmConfig::new(input, output, block_m, block_n, stages);
        // Optional parts, in the order kernel_name writes them.
        let mut order = 0;
        for part in parts {
            let grouping = match part {
                "contig" => Some(GemmGrouping::Contiguous),
                "gather" => Some(GemmGrouping::Gather),
                "masked" => Some(GemmGrouping::Masked),
                _ => None,
            };
            let (rank, ok) = if let Some(grouping) = grouping {
                config.grouping = grouping;
                (6, true)
            } else if part == "ws" {
                config.specialized = true;
                (2, true)
            } else if part == "persist" {
                config.persistent = true;
                (3, true)
            } else if part == "splitk" {
                config.split_k = true;
                (7, true)
            } else if part == "swiglu" {
                config.swiglu = true;
                (8, true)
            } else if part == "rowscale" {
                config.row_scale = true;
                (9, true)
            } else if part == "scatter" {
                config.scatter = true;
                (10, true)
            } else if part == "res" {
                config.residual = true;
                (11, true)
            } else if part == "b1x128" {
                config.b_row_scales = true;
                (12, true)
            } else if part == "krange" {
                config.k_range = true;
                (13, true)
            } else if part == "a2" {
                config.dual_a = true;
                (14, true)
            } else if part == "kp" {
                config.k_pipelined = true;
                (15, true)
            } else if let Some(v) = part.strip_prefix("wg") {
                config.consumers = v.parse().ok()?;
                (1, config.consumers != 1)
            } else if let Some(v) = part.strip_prefix("cl") {
                config.cluster = v.parse().ok()?;
                (5, config.cluster != 1)
            } else if let Some(v) = part.strip_prefix('r') {
                config.raster = v.parse().ok()?;
                (4, config.raster != 0)
            } else {
                return None;
            };
            if rank <= order || !ok {
                return None;
            }
            order = rank;
        }
        (config.block_k() == block_k).then_some(config)
    }

    /// Rejects configurations that cannot be generated or would not fit `target` (shared memory,
    /// registers), before any code is generated. The message names the limit.
    pub fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        let name = self.kernel_name();
        if self.consumers == 0 || self.consumers > 2 {
            return Err(format!("{name}: {} consumer warpgroups (1 or 2 supported)", self.consumers));
        }
        let rows = 64 * self.consumers;
        if self.block_m == 0 || !self.block_m.is_multiple_of(rows) || self.block_m > 256 {
            return Err(format!(
                "{name}: block_m {} is not a multiple of {rows} (64 per consumer warpgroup) in {rows}..=256",
                self.block_m
            ));
        }
        if self.block_n < 16 || !self.block_n.is_multiple_of(16) || self.block_n > 256 {
            return Err(format!("{name}: block_n {} is not a multiple of 16 in 16..=256", self.block_n));
        }
        if self.b_row_scales && (self.input != GemmInput::Fp8 || self.grouping == GemmGrouping::Masked) {
            return Err(format!("{name}: per-row B scales go with fp8 GEMMs (dense, or sorted-row grouped) only"));
        }
        if self.input == GemmInput::Fp8 && !self.b_row_scales && !128usize.is_multiple_of(self.block_n) {
            return Err(format!(
                "{name}: fp8 block_n {} must divide the 128-wide weight scale block (one B scale per tile)",
                self.block_n
            ));
        }
        if self.k_range && (self.is_grouped() || self.split_k || self.input != GemmInput::Fp8) {
            return Err(format!(
                "{name}: a K range from the device goes with dense fp8 GEMMs without split K (the host sizes splits \
                 by K; the range is in 128-wide scale groups)"
            ));
        }
        if self.dual_a && (self.grouping == GemmGrouping::Masked || self.input != GemmInput::Bf16 || self.swiglu) {
            return Err(format!(
                "{name}: a second A goes with bf16 GEMMs (dense, gathered or contiguous) without SwiGLU (f32 \
                 activations as hi + lo)"
            ));
        }
        if self.stages < 2 || self.stages > 8 {
            return Err(format!("{name}: {} stages (2..=8 supported)", self.stages));
        }
        if self.raster != 0 && (!self.raster.is_power_of_two() || self.raster > 16 || self.raster < 2) {
            return Err(format!("{name}: raster {} is not 0 or a power of two in 2..=16", self.raster));
        }
        if self.cluster != 1 {
            let why = if self.cluster != 2 {
                Some("only clusters of 2 are generated")
            } else if !self.specialized {
                Some("needs the producer warpgroup")
            } else if self.is_grouped() || self.split_k {
                Some("goes with neither grouped GEMMs nor split K")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("{name}: cluster size {}: {why}", self.cluster));
            }
        }
        if self.is_grouped() {
            let why = if !self.specialized {
                Some("needs the producer warpgroup (the gathered rows' loads are issued by its warp)")
            } else if self.split_k {
                Some("cannot split K")
            } else if self.residual {
                Some("has no residual epilogue (the combine adds it)")
            } else if self.raster != 0 {
                Some("walks each group's tiles in order (no rasterization)")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("{name}: a grouped GEMM {why}"));
            }
        }
        if self.scatter {
            let why = if !matches!(self.grouping, GemmGrouping::Contiguous | GemmGrouping::Gather) {
                Some("needs the sorted rows' tokens (a contiguous or gathered grouped GEMM)")
            } else if self.output != GemmOutput::F32 {
                Some("adds with f32 atomics (f32 output)")
            } else if self.swiglu {
                Some("does not go with SwiGLU")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("{name}: the scatter epilogue {why}"));
            }
        }
        if self.swiglu {
            if self.input == GemmInput::Fp8 {
                return Err(format!(
                    "{name}: fp8 SwiGLU would interleave gate and up rows inside a 128-row weight scale block \
                     (not generated: the fp8 gate/up GEMM writes both halves)"
                ));
            }
            if self.split_k || self.residual {
                return Err(format!("{name}: the SwiGLU epilogue goes with neither split K nor a residual"));
            }
        }
        if self.output == GemmOutput::Fp8 {
            let width = if self.swiglu { self.block_n / 2 } else { self.block_n };
            if !width.is_multiple_of(128) {
                return Err(format!(
                    "{name}: fp8 output tiles {width} columns wide (a multiple of the 128-column scale group needed)"
                ));
            }
            if self.split_k || self.residual {
                return Err(format!("{name}: fp8 output goes with neither split K nor a residual"));
            }
        }
        let threads = self.threads();
        if threads > target.max_threads_per_block as usize {
            return Err(format!("{name}: {threads} threads exceed {}'s {}", target.name, target.max_threads_per_block));
        }
        let smem = self.shared_memory_bytes() + STATIC_SHARED_BYTES;
        if smem > target.max_shared_memory_per_block as usize {
            return Err(format!(
                "{name}: needs {smem} bytes of shared memory, {} has {} per block",
                target.name, target.max_shared_memory_per_block
            ));
        }
        let headroom = REGISTER_HEADROOM + self.working_registers();
        let regs = self.accumulator_registers() + headroom;
        let limit = self.consumer_register_limit(target);
        if regs > limit {
            return Err(format!(
                "{name}: {} accumulator registers per thread (+{headroom}) exceed the {limit} registers a \
                 consumer thread has on {} with {threads} threads",
                self.accumulator_registers(),
                target.name,
            ));
        }
        Ok(())
    }
}

/// `!llvm.struct<(f32, ...)>` of `n` f32: one wgmma accumulator fragment.
fn fragment_type(n: usize) -> String {
    format!("!llvm.struct<({})>", vec!["f32"; n].join(", "))
}

/// The kernel's `gpu.module` text (one `gpu.func`, `kernel`). Arguments, in order: `%a_ptr`, `%b_ptr`
/// (CUtensorMap pointers: 2-D, K innermost, box `[128 B of K, block_m | block_n rows]`, 128-byte
/// swizzle, out-of-bounds zero fill), `%out` (`memref<?x?xT>`, [M, N]); fp8: `%a_scale` [M,
/// ceil(K/128)], `%b_scale` [ceil(N/128), ceil(K/128)] (`b_row_scales`: [N, ceil(K/128)]) (f32);
/// residual: `%residual` (`memref<?x?xT>`, [M, N]); split K: `%ws` (f32 [splits, M, N]), `%counters`
/// (i32 `[tiles]`, zero before the first launch; the kernel leaves them zero), `%splits`; then `%k` (K in
/// elements).
/// Launch: [`GemmConfig::threads`] threads, [`GemmConfig::shared_memory_bytes`] of dynamic shared
/// memory, [`GemmConfig::grid`] blocks.
pub fn emit(config: &GemmConfig, target: &GpuTarget) -> Result<String, String> {
    config.validate(target)?;
    Ok(Emitter::new(config, target).module())
}

/// Text generation for one configuration. Index constants are written as `%c<N>` (`%c<N>_i64`,
/// `%c<N>_i32`) where used and declared once at the top of the function.
struct Emitter {
    c: GemmConfig,
    /// Registers per consumer thread (`setmaxnreg.inc` with a producer warpgroup).
    consumer_registers: usize,
    frag: String,
    in_el: &'static str,
    wgmma_el: &'static str,
    out_el: &'static str,
}

impl Emitter {
    fn new(c: &GemmConfig, target: &GpuTarget) -> Emitter {
        let (in_el, wgmma_el) = match c.input {
            GemmInput::Bf16 => ("bf16", "bf16"),
            GemmInput::Fp8 => ("f8E4M3FN", "e4m3"),
        };
        let out_el = match c.output {
            GemmOutput::F32 => "f32",
            GemmOutput::Bf16 => "bf16",
            // The e4m3 bytes (packed in pairs by the conversion).
            GemmOutput::Fp8 => "i8",
        };
        Emitter {
            c: *c,
            consumer_registers: c.consumer_register_limit(target),
            frag: fragment_type(c.block_n / 2),
            in_el,
            wgmma_el,
            out_el,
        }
    }

    fn fp8(&self) -> bool {
        self.c.input == GemmInput::Fp8
    }

    fn module(&self) -> String {
        let c = &self.c;
        let (bm, bn, bk, stages) = (c.block_m, c.block_n, c.block_k(), c.stages);
        let in_el = self.in_el;
        let ws = WORKGROUP;
        let mut head = String::new();
        let _ = writeln!(head, "!bar = !nvgpu.mbarrier.group<memorySpace = {ws}, num_barriers = {stages}>");
        let a_box = if c.grouping == GemmGrouping::Gather { 1 } else { bm };
        for (map, rows) in [("amap", a_box), ("bmap", bn / c.cluster)] {
            let _ = writeln!(head, "!{map} = !nvgpu.tensormap.descriptor<tensor = memref<{rows}x{bk}x{in_el}, 3>, swizzle = swizzle_128b, l2promo = none, oob = zero, interleave = none>");
        }
        let _ = writeln!(head, "module attributes {{gpu.container_module}} {{\ngpu.module @kernels {{");
        let out_ty = format!("memref<?x?x{}>", self.out_el);
        let mut args = vec!["%a_ptr: !llvm.ptr".to_string(), "%b_ptr: !llvm.ptr".into()];
        if c.dual_a {
            args.push("%a2_ptr: !llvm.ptr".into());
        }
        args.push(format!("%out: {out_ty}"));
        if c.output == GemmOutput::Fp8 {
            args.push("%out_scale: memref<?x?xf32>".into());
        }
        if self.fp8() {
            args.push("%a_scale: memref<?x?xf32>".into());
            args.push("%b_scale: memref<?x?xf32>".into());
        }
        match c.grouping {
            GemmGrouping::Dense => {}
            GemmGrouping::Contiguous => {
                args.push("%offsets: memref<?xi32>".into());
                if c.scatter {
                    args.push("%perm: memref<?xi32>".into());
                }
            }
            GemmGrouping::Gather => {
                args.push("%offsets: memref<?xi32>".into());
                args.push("%perm: memref<?xi32>".into());
            }
            GemmGrouping::Masked => {
                args.push("%counts: memref<?xi32>".into());
                args.push("%cap: index".into());
            }
        }
        if c.k_range {
            args.push("%k_range: memref<?xi32>".into());
        }
        if c.row_scale {
            args.push("%row_scale: memref<?xf32>".into());
        }
        if c.residual {
            args.push(format!("%residual: {out_ty}"));
        }
        if c.split_k {
            args.push("%ws: memref<?x?x?xf32>".into());
            args.push("%counters: memref<?xi32>".into());
            args.push("%splits: index".into());
        }
        args.push("%k: index".into());
        let attribution = if c.split_k { format!(" workgroup(%flag: memref<1xi32, {ws}>)") } else { String::new() };
        let _ = writeln!(
            head,
            "gpu.func @{}({}){attribution} kernel attributes {{known_block_size = array<i32: {}, 1, 1>{}}} {{",
            c.kernel_name(),
            args.join(", "),
            c.threads(),
            // With a producer warpgroup, `.minnctapersm 1`: ptxas honours `setmaxnreg` only when it
            // knows the registers a thread has at entry (the SM's over the block's threads) —
            // without it, "'setmaxnreg' ignored" and every warpgroup keeps the entry's count.
            format!(
                "{}{}",
                if c.specialized { ", nvvm.minctasm = 1 : i32" } else { "" },
                if c.cluster > 1 {
                    format!(", nvvm.cluster_dim = array<i32: {}, 1, 1>", c.cluster)
                } else {
                    String::new()
                }
            )
        );

        let mut t = String::new();
        self.prelude(&mut t);
        if c.specialized {
            let producers = 128 * c.consumers;
            let gather = c.grouping == GemmGrouping::Gather;
            // One thread issues the loads; a gather takes the producer's first warp, each lane
            // loading every 32nd row (its rows' tokens looked up once per tile).
            // A grouped GEMM's scan of its groups takes the whole warp too.
            let active = if c.is_grouped() { "arith.cmpi ult, %plane, %c32" } else { "arith.cmpi eq, %plane, %c0" };
            let mut tokens = String::new();
            let mut rows = String::new();
            if gather {
                let _ = writeln!(tokens, "%row_last = arith.subi %row_end, %c1 : index");
                for rr in 0..bm / 32 {
                    let _ = writeln!(
                        tokens,
                        "%pr{rr}_l = arith.addi %plane, %c{off} : index
%pr{rr}_a = arith.addi %row0, %pr{rr}_l : index
%pr{rr} = arith.minui %pr{rr}_a, %row_last : index
%tok{rr}_i = memref.load %perm[%pr{rr}] : memref<?xi32>
%tok{rr} = arith.index_cast %tok{rr}_i : i32 to index",
                        off = 32 * rr
                    );
                    let _ = writeln!(
                        rows,
                        "%ro{rr}_b = arith.muli %pr{rr}_l, %c{ROW_BYTES} : index
%ro{rr} = arith.addi %ld_a_off, %ro{rr}_b : index
%ld_row{rr} = memref.view %smem[%ro{rr}][] : memref<?xi8, {ws}> to memref<1x{bk}x{in_el}, {ws}>
nvgpu.tma.async.load %a_map[%ld_k0, %tok{rr}], %full[%st] to %ld_row{rr} : !amap, !bar -> memref<1x{bk}x{in_el}, {ws}>"
                    );
                    if c.dual_a {
                        // The second A's row, at the same place in its tile.
                        let _ = writeln!(
                            rows,
                            "%ro2_{rr} = arith.addi %ld_a2_off, %ro{rr}_b : index
%ld_row2_{rr} = memref.view %smem[%ro2_{rr}][] : memref<?xi8, {ws}> to memref<1x{bk}x{in_el}, {ws}>
nvgpu.tma.async.load %a2_map[%ld_k0, %tok{rr}], %full[%st] to %ld_row2_{rr} : !amap, !bar -> memref<1x{bk}x{in_el}, {ws}>"
                        );
                    }
                }
            }
            let first = if gather {
                self.expect_and_b("%st")
            } else {
                format!("{}\n{}", self.expect_and_b("%st"), self.a_tile("%st"))
            };
            let body = format!(
                "{tokens}
%it_next = scf.for %j = %c0 to %nkt step %c1 iter_args(%i = %it) -> (index) {{
  %st = arith.remui %i, %c{stages} : index
  %round = arith.divui %i, %c{stages} : index
  %round1 = arith.addi %round, %c1 : index
  %par = arith.remui %round1, %c2 : index
  %parity = arith.index_cast %par : index to i1
  nvgpu.mbarrier.try_wait.parity %empty[%st], %parity, %ticks : !bar
  %kt = arith.addi %kt0, %j : index
{views}
  scf.if %p_first {{
{first}
  }}
{rows}
  %i1 = arith.addi %i, %c1 : index
  scf.yield %i1 : index
}}",
                views = indent(&self.views("%kt", "%st"), 2),
                first = indent(&first, 4),
                rows = indent(&rows, 2),
            );
            let _ = writeln!(
                t,
                "  %is_producer = arith.cmpi uge, %tid, %c{producers} : index
  scf.if %is_producer {{
    nvvm.setmaxregister decrease {PRODUCER_REGISTERS}
    %plane = arith.subi %tid, %c{producers} : index
    %p_active = {active} : index
    %p_first = arith.cmpi eq, %plane, %c0 : index
    scf.if %p_active {{
{}
    }}
  }} else {{
    nvvm.setmaxregister increase {regs}",
                indent(&self.unit_loop("%p_end", &body, "%it_next"), 6),
                regs = self.consumer_registers,
            );
            t.push_str(&indent(&self.consumer(), 2));
            t.push_str("\n  }\n");
        } else {
            t.push_str(&self.consumer());
            t.push('\n');
        }
        if c.cluster > 1 {
            // No block leaves while its peer may still multicast into its shared memory or arrive on
            // its barriers.
            t.push_str("  nvvm.cluster.arrive\n  nvvm.cluster.wait\n");
        }
        t.push_str("  gpu.return\n}\n}\n}\n");
        format!("{head}{}{t}", constants(&t))
    }

    /// Kernel-wide values: problem and tile counts, shared memory, barriers (initialized by thread 0).
    fn prelude(&self, t: &mut String) {
        let c = &self.c;
        let (bm, bn, stages) = (c.block_m, c.block_n, c.stages);
        let ws = WORKGROUP;
        let splits = if c.split_k { "" } else { "  %splits = arith.constant 1 : index\n" };
        let _ = writeln!(
            t,
            "  %ticks = arith.constant 10000000 : index
  %desc_hi = arith.constant {desc_hi} : i64
  %addr_mask = arith.constant 262143 : i64
  %zero = arith.constant 0.0 : f32
  %one_f = arith.constant 1.0 : f32
  %neg_log2e = arith.constant -1.44269504 : f32
  %min_amax = arith.constant 1.0e-4 : f32
  %e4m3_max = arith.constant 448.0 : f32
  %sh8 = arith.constant 8 : i16
{splits}  %a_map = builtin.unrealized_conversion_cast %a_ptr : !llvm.ptr to !amap
  %b_map = builtin.unrealized_conversion_cast %b_ptr : !llvm.ptr to !bmap
{a2_map}  %tid = gpu.thread_id x
  %bx = gpu.block_id x
  %gdx = gpu.grid_dim x
  %m = memref.dim %out, %c0 : memref<?x?x{out}>
{n}  %m_tiles = arith.ceildivui %m, %c{bm} : index
  %n_tiles = arith.ceildivui %n, %c{bn} : index
{cluster}  %tiles = arith.muli %m_units, %n_tiles : index
{units}{k_tiles}  %per = arith.ceildivui %k_tiles, %splits : index
  %smem = gpu.dynamic_shared_memory : memref<?xi8, {ws}>
  %smem_base_idx = memref.extract_aligned_pointer_as_index %smem : memref<?xi8, {ws}> -> index
  %smem_base = arith.index_cast %smem_base_idx : index to i64
  %full = nvgpu.mbarrier.create -> !bar",
            // 128-byte swizzle (mode 1 in bits 62-63), stride byte offset 1024 B (8 rows x 128 B) in
            // bits 32-45 (16-byte units); the start address goes in bits 0-13 (16-byte units).
            desc_hi = (1u64 << 62) | (64u64 << 32),
            out = self.out_el,
            a2_map = if c.dual_a {
                "  %a2_map = builtin.unrealized_conversion_cast %a2_ptr : !llvm.ptr to !amap\n"
            } else {
                ""
            },
            n = if c.swiglu {
                format!(
                    "  %n_out = memref.dim %out, %c1 : memref<?x?x{}>\n  %n = arith.muli %n_out, %c2 : index\n",
                    self.out_el
                )
            } else {
                format!(
                    "  %n = memref.dim %out, %c1 : memref<?x?x{}>\n  %n_out = arith.addi %n, %c0 : index\n",
                    self.out_el
                )
            },
            k_tiles = self.k_tiles(),
            units = if c.is_grouped() {
                self.group_count()
            } else {
                "  %units = arith.muli %tiles, %splits : index\n".into()
            },
            // Units are per cluster: `cluster` row tiles of one tile column, block `rank` taking one.
            cluster = if c.cluster > 1 {
                format!(
                    "  %rank_i32 = nvvm.read.ptx.sreg.cluster.ctaid.x : i32
  %rank = arith.index_cast %rank_i32 : i32 to index
  %peer_i32 = arith.subi %c1_i32, %rank_i32 : i32
  %mcast = arith.constant {mask} : i16
  %m_units = arith.ceildivui %m_tiles, %c{cl} : index
  %ubx = arith.divui %bx, %c{cl} : index
  %ugdx = arith.divui %gdx, %c{cl} : index
",
                    cl = c.cluster,
                    mask = (1u32 << c.cluster) - 1
                )
            } else {
                "  %m_units = arith.addi %m_tiles, %c0 : index\n  %ubx = arith.addi %bx, %c0 : index\n  %ugdx = arith.addi %gdx, %c0 : index\n".into()
            },
        );
        let mut init = String::from("      nvgpu.mbarrier.init %full[%s], %c1 : !bar\n");
        if c.specialized {
            let _ = writeln!(t, "  %empty = nvgpu.mbarrier.create -> !bar");
            // Every consumer thread of every block of the cluster releases a buffer (the cluster's
            // blocks multicast into each other's).
            let _ = writeln!(init, "      nvgpu.mbarrier.init %empty[%s], %c{} : !bar", 128 * c.consumers * c.cluster);
        }
        // Barrier initialization made visible to the cluster's other block before it multicasts.
        let fence = if c.cluster > 1 { "    nvvm.fence.mbarrier.init\n" } else { "" };
        let _ = writeln!(
            t,
            "  %leader = arith.cmpi eq, %tid, %c0 : index
  scf.if %leader {{
    scf.for %s = %c0 to %c{stages} step %c1 {{
{init}    }}
{fence}    nvgpu.tma.prefetch.descriptor %a_map : !amap
{a2}    nvgpu.tma.prefetch.descriptor %b_map : !bmap
  }}
  gpu.barrier{}",
            if c.cluster > 1 { "\n  nvvm.cluster.arrive\n  nvvm.cluster.wait" } else { "" },
            a2 = if c.dual_a { "    nvgpu.tma.prefetch.descriptor %a2_map : !amap\n" } else { "" }
        );
    }

    /// `%k_tiles`: K's tiles, or with a K range from the device the range's, counted from
    /// `%kt_base` (its first: added to each unit's first K tile).
    fn k_tiles(&self) -> String {
        let bk = self.c.block_k();
        if !self.c.k_range {
            return format!("  %k_tiles = arith.ceildivui %k, %c{bk} : index\n");
        }
        format!(
            "  %kr_lo_i = memref.load %k_range[%c0] : memref<?xi32>
  %kr_hi_i = memref.load %k_range[%c1] : memref<?xi32>
  %kr_lo = arith.index_cast %kr_lo_i : i32 to index
  %kr_hi = arith.index_cast %kr_hi_i : i32 to index
  %kt_base = arith.divui %kr_lo, %c{bk} : index
  %kt_hi = arith.ceildivui %kr_hi, %c{bk} : index
  %kt_hi_max = arith.maxui %kt_hi, %kt_base : index
  %k_tiles = arith.subi %kt_hi_max, %kt_base : index
"
        )
    }

    /// A consumer thread's place (from `%tid`) in the wgmma accumulator layout: its warpgroup
    /// `%cw`, `%lane`, and the tile row `%trow` / column `%lcol` of its fragment element 0; element
    /// e of row tile i sits [`fragment_offset`] further.
    fn coordinates(&self) -> String {
        format!(
            "{}  %wg_row = arith.muli %cw, %c{rows_per_wg} : index
  %trow = arith.addi %wg_row, %trow0 : index
",
            fragment_coordinates(),
            rows_per_wg = self.c.block_m / self.c.consumers
        )
    }

    /// `%<p>start`, `%<p>rows`: the first row and the row count of group `g`.
    fn group_bounds(&self, p: &str, g: &str) -> String {
        match self.c.grouping {
            GemmGrouping::Masked => format!(
                "%{p}start = arith.muli {g}, %cap : index
%{p}rows_i = memref.load %counts[{g}] : memref<?xi32>
%{p}rows = arith.index_cast %{p}rows_i : i32 to index"
            ),
            _ => format!(
                "%{p}start_i = memref.load %offsets[{g}] : memref<?xi32>
%{p}start = arith.index_cast %{p}start_i : i32 to index
%{p}g1 = arith.addi {g}, %c1 : index
%{p}end_i = memref.load %offsets[%{p}g1] : memref<?xi32>
%{p}end = arith.index_cast %{p}end_i : i32 to index
%{p}rows = arith.subi %{p}end, %{p}start : index"
            ),
        }
    }

    /// Grouped: `%groups`, and `%s_lane`, the thread's lane (for the warps' scan of the groups).
    fn group_count(&self) -> String {
        let groups = match self.c.grouping {
            GemmGrouping::Masked => "%groups = memref.dim %counts, %c0 : memref<?xi32>".to_string(),
            _ => "%offsets_n = memref.dim %offsets, %c0 : memref<?xi32>\n%groups = arith.subi %offsets_n, %c1 : index"
                .to_string(),
        };
        format!("{}\n  %s_lane = arith.remui %tid, %c32 : index\n", indent(&groups, 2))
    }

    /// `%<p>t#0` (`%<p>t_i`: as i32), `%<p>t#1`, `%<p>t#2`: the tiles (ceil(rows / block_m) x
    /// n_tiles), first row and rows of group `first + lane` (none past the last group): the
    /// lane's share of a warp's chunk of 32 groups.
    fn chunk_tiles(&self, p: &str, first: &str) -> String {
        format!(
            "%{p}lg = arith.addi {first}, %s_lane : index
%{p}in = arith.cmpi ult, %{p}lg, %groups : index
%{p}t:3 = scf.if %{p}in -> (index, index, index) {{
{}
  %{p}mt = arith.ceildivui %{p}rows, %c{bm} : index
  %{p}tiles = arith.muli %{p}mt, %n_tiles : index
  scf.yield %{p}tiles, %{p}start, %{p}rows : index, index, index
}} else {{
  scf.yield %c0, %c0, %c0 : index, index, index
}}
%{p}t_i = arith.index_cast %{p}t#0 : index to i32",
            indent(&self.group_bounds(p, &format!("%{p}lg")), 2),
            bm = self.c.block_m
        )
    }

    /// Grouped: unit `unit`'s group. The warp scans the groups 32 at a time (each lane a group's
    /// tiles, their prefix sums by shuffles, the lanes whose groups end at or before the unit
    /// counted), from the chunk where its previous unit's group was (`%gs_g`, with `%gs_base`
    /// tiles before it): the block's units only grow, so over all of them it reads each group's
    /// bounds about once. `%found` (i1): the unit is one (it is not past the last group's tiles);
    /// then `%found_g`, `%found_base` (the group's first unit), `%found_start` and `%found_rows`
    /// (its rows); `%scan#0`, `%scan#1`: where the next unit's scan starts.
    fn scan_groups(&self, unit: &str) -> String {
        let (prefix, incl) = warp_prefix_sum("w_", "%w_t_i");
        let (count, cnt) = warp_sum("wc_", "%w_le_i");
        let chunk = format!(
            "{}
{prefix}
%w_excl = arith.subi {incl}, %w_t_i : i32
%w_rel = arith.subi {unit}, %w_base : index
%w_rel_i = arith.index_cast %w_rel : index to i32
%w_le = arith.cmpi sle, {incl}, %w_rel_i : i32
%w_le_i = arith.extui %w_le : i1 to i32
{count}
%w_past = arith.cmpi eq, {cnt}, %c32_i32 : i32
%w_next_g = arith.addi %w_g, %c32 : index
%w_left = arith.cmpi ult, %w_next_g, %groups : index
%w_more = arith.andi %w_past, %w_left : i1
%w_src = arith.minui {cnt}, %c31_i32 : i32
%w_at, %w_at_ok = gpu.shuffle idx %w_excl, %w_src, %c32_i32 : i32
%w_start_i = arith.index_cast %w_t#1 : index to i32
%w_rows_i = arith.index_cast %w_t#2 : index to i32
%w_fs, %w_fs_ok = gpu.shuffle idx %w_start_i, %w_src, %c32_i32 : i32
%w_fr, %w_fr_ok = gpu.shuffle idx %w_rows_i, %w_src, %c32_i32 : i32
%w_total, %w_total_ok = gpu.shuffle idx {incl}, %c31_i32, %c32_i32 : i32
scf.condition(%w_more) %w_g, %w_base, {cnt}, %w_at, %w_total, %w_fs, %w_fr : index, index, i32, i32, i32, i32, i32",
            self.chunk_tiles("w_", "%w_g")
        );
        format!(
            "%scan:7 = scf.while (%w_g = %gs_g, %w_base = %gs_base) : (index, index) -> (index, index, i32, i32, i32, i32, i32) {{
{}
}} do {{
^bb0(%x_g: index, %x_base: index, %x_cnt: i32, %x_at: i32, %x_total: i32, %x_fs: i32, %x_fr: i32):
  %x_g2 = arith.addi %x_g, %c32 : index
  %x_t = arith.index_cast %x_total : i32 to index
  %x_base2 = arith.addi %x_base, %x_t : index
  scf.yield %x_g2, %x_base2 : index, index
}}
%found = arith.cmpi ult, %scan#2, %c32_i32 : i32
%found_lane = arith.index_cast %scan#2 : i32 to index
%found_g = arith.addi %scan#0, %found_lane : index
%found_at = arith.index_cast %scan#3 : i32 to index
%found_base = arith.addi %scan#1, %found_at : index
%found_start = arith.index_cast %scan#5 : i32 to index
%found_rows = arith.index_cast %scan#6 : i32 to index",
            indent(&chunk, 2),
        )
    }

    /// Grouped: unit `%u` of group `%g_found` (its first unit `%g_base`, rows `%g_start` on, `%g_rows` of
    /// them) -> its tile, as [`Self::decode`] gives a dense one's.
    fn decode_in_group(&self) -> String {
        let (bm, bn) = (self.c.block_m, self.c.block_n);
        format!(
            "%local = arith.subi %u, %g_base : index
%mt = arith.divui %local, %n_tiles : index
%nt = arith.remui %local, %n_tiles : index
%row_off = arith.muli %mt, %c{bm} : index
%row0 = arith.addi %g_start, %row_off : index
%row_end = arith.addi %g_start, %g_rows : index
%col0 = arith.muli %nt, %c{bn} : index
%gcol = arith.muli %g_found, %n : index
%brow0 = arith.addi %gcol, %col0 : index
%kt0 = arith.constant 0 : index
%nkt = arith.addi %k_tiles, %c0 : index"
        )
    }

    /// The persistent loop over units as `result`: `%u` (this block's units: `%ubx`, then every
    /// `%ugdx`-th) and `%it` (the ring position, from 0), each unit decoded, then `body`, which
    /// leaves the ring position in `next_it`. Dense: a for loop over `%units`. Grouped: a while
    /// loop, each unit's group scanned for ([`Self::scan_groups`]), until a unit is past the last
    /// group's tiles.
    fn unit_loop(&self, result: &str, body: &str, next_it: &str) -> String {
        if !self.c.is_grouped() {
            return format!(
                "{result} = scf.for %u = %ubx to %units step %ugdx iter_args(%it = %c0) -> (index) {{
{}
{body}
  scf.yield {next_it} : index
}}",
                indent(&self.decode(), 2)
            );
        }
        format!(
            "{result}:8 = scf.while (%wu = %ubx, %wit = %c0, %gs_g = %c0, %gs_base = %c0) : (index, index, index, index) -> (index, index, index, index, index, index, index, index) {{
{}
  scf.condition(%found) %wu, %wit, %scan#0, %scan#1, %found_g, %found_base, %found_start, %found_rows : index, index, index, index, index, index, index, index
}} do {{
^bb0(%u: index, %it: index, %sc_g: index, %sc_base: index, %g_found: index, %g_base: index, %g_start: index, %g_rows: index):
{}
{body}
  %u_next = arith.addi %u, %ugdx : index
  scf.yield %u_next, {next_it}, %sc_g, %sc_base : index, index, index, index
}}",
            indent(&self.scan_groups("%wu"), 2),
            indent(&self.decode_in_group(), 2)
        )
    }

    /// Unit `%u` -> its tile's first row and column (`%row0`, `%col0`), `%tile`, split `%z`, and
    /// its K tiles `[%kt0, %kt0 + %nkt)`; `%row_end` bounds the rows, `%brow0` is the tile's first B
    /// row. Dense GEMMs (a grouped one's units: [`Self::unit_loop`]).
    fn decode(&self) -> String {
        let c = &self.c;
        let order = if c.raster == 0 {
            "%mtu = arith.divui %tile, %n_tiles : index\n%nt = arith.remui %tile, %n_tiles : index".to_string()
        } else {
            let g = c.raster;
            format!(
                "%rw = arith.muli %n_tiles, %c{g} : index
%grp = arith.divui %tile, %rw : index
%first_m = arith.muli %grp, %c{g} : index
%left_m = arith.subi %m_units, %first_m : index
%gsz = arith.minui %left_m, %c{g} : index
%in_grp = arith.remui %tile, %rw : index
%mt_off = arith.remui %in_grp, %gsz : index
%mtu = arith.addi %first_m, %mt_off : index
%nt = arith.divui %in_grp, %gsz : index"
            )
        };
        let mt = if c.cluster > 1 {
            format!("%mt_c = arith.muli %mtu, %c{} : index\n%mt = arith.addi %mt_c, %rank : index", c.cluster)
        } else {
            "%mt = arith.addi %mtu, %c0 : index".to_string()
        };
        format!(
            "%tile = arith.divui %u, %splits : index
%z = arith.remui %u, %splits : index
{order}
{mt}
%row0 = arith.muli %mt, %c{bm} : index
%col0 = arith.muli %nt, %c{bn} : index
%kt0_raw = arith.muli %z, %per : index
%kt0{rel} = arith.minui %kt0_raw, %k_tiles : index
%kt_end_raw = arith.addi %kt0_raw, %per : index
%kt_end = arith.minui %kt_end_raw, %k_tiles : index
%nkt = arith.subi %kt_end, %kt0{rel} : index{base}
%row_end = arith.addi %m, %c0 : index
%brow0 = arith.addi %col0, %c0 : index",
            bm = c.block_m,
            bn = c.block_n,
            rel = if c.k_range { "_rel" } else { "" },
            base = if c.k_range { "\n%kt0 = arith.addi %kt0_rel, %kt_base : index" } else { "" },
        )
    }

    /// The shared-memory views of ring buffer `st` and K tile `kt`'s first K (`%ld_*`).
    fn views(&self, kt: &str, st: &str) -> String {
        let c = &self.c;
        let (bm, bn, bk) = (c.block_m, c.block_n, c.block_k());
        let (tx, a_bytes, in_el, ws) = (c.stage_bytes(), bm * ROW_BYTES, self.in_el, WORKGROUP);
        // The stage: A's tile, the second A's (dual), then B's.
        let a2 = if c.dual_a {
            format!(
                "\n%ld_a2_off = arith.addi %ld_a_off, %c{a_bytes} : index
%ld_a2 = memref.view %smem[%ld_a2_off][] : memref<?xi8, {ws}> to memref<{bm}x{bk}x{in_el}, {ws}>"
            )
        } else {
            String::new()
        };
        format!(
            "%ld_a_off = arith.muli {st}, %c{tx} : index
%ld_b_off = arith.addi %ld_a_off, %c{b_at} : index
%ld_a = memref.view %smem[%ld_a_off][] : memref<?xi8, {ws}> to memref<{bm}x{bk}x{in_el}, {ws}>{a2}
%ld_b = memref.view %smem[%ld_b_off][] : memref<?xi8, {ws}> to memref<{bn}x{bk}x{in_el}, {ws}>
%ld_k0 = arith.muli {kt}, %c{bk} : index",
            b_at = c.a_tiles() * a_bytes
        )
    }

    /// The buffer's expected bytes (A and B tiles) on its full barrier, and the B tile's load; in a
    /// cluster, this block's share of B rows, multicast to the same place in every block.
    fn expect_and_b(&self, st: &str) -> String {
        let c = &self.c;
        let (bn, bk, tx, in_el, ws) = (c.block_n, c.block_k(), c.stage_bytes(), self.in_el, WORKGROUP);
        let expect = format!("nvgpu.mbarrier.arrive.expect_tx %full[{st}], %c{tx} : !bar");
        if c.cluster == 1 {
            return format!(
                "{expect}
nvgpu.tma.async.load %b_map[%ld_k0, %brow0], %full[{st}] to %ld_b : !bmap, !bar -> memref<{bn}x{bk}x{in_el}, {ws}>"
            );
        }
        let share = bn / c.cluster;
        format!(
            "{expect}
%bh_rows = arith.muli %rank, %c{share} : index
%bh_row0 = arith.addi %brow0, %bh_rows : index
%bh_bytes = arith.muli %bh_rows, %c{ROW_BYTES} : index
%bh_off = arith.addi %ld_b_off, %bh_bytes : index
%ld_bh = memref.view %smem[%bh_off][] : memref<?xi8, {ws}> to memref<{share}x{bk}x{in_el}, {ws}>
nvgpu.tma.async.load %b_map[%ld_k0, %bh_row0], %full[{st}] to %ld_bh multicast_mask = %mcast : !bmap, !bar -> memref<{share}x{bk}x{in_el}, {ws}>"
        )
    }

    /// The A tile's load, and the second A's (rows `%row0..`; not for gathers).
    fn a_tile(&self, st: &str) -> String {
        let c = &self.c;
        let (bm, bk, in_el, ws) = (c.block_m, c.block_k(), self.in_el, WORKGROUP);
        let operands: &[&str] = if c.dual_a { &["a", "a2"] } else { &["a"] };
        operands
            .iter()
            .map(|a| {
                format!(
                    "nvgpu.tma.async.load %{a}_map[%ld_k0, %row0], %full[{st}] to %ld_{a} : !amap, !bar -> memref<{bm}x{bk}x{in_el}, {ws}>"
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// TMA issue of K tile `kt` into ring buffer `st` (one thread; the caller guards).
    fn load(&self, kt: &str, st: &str) -> String {
        format!("{}\n{}\n{}", self.views(kt, st), self.expect_and_b(st), self.a_tile(st))
    }

    /// The consumer warpgroups: the unit loop with the main loop and the epilogue.
    fn consumer(&self) -> String {
        let c = &self.c;
        let stages = c.stages;
        let rows_per_wg = c.block_m / c.consumers;
        let m_tiles = c.row_tiles();
        let frag_n = c.block_n / 2;
        let frag = &self.frag;
        let mut head = self.coordinates();
        let _ = writeln!(
            head,
            "  %wg_a = arith.muli %cw, %c{wg_bytes} : index\n  %wg_a64 = arith.index_cast %wg_a : index to i64",
            wg_bytes = rows_per_wg * ROW_BYTES,
        );
        // The loop's body, each unit's after its decode.
        let mut t = String::new();
        if !c.specialized {
            let _ = writeln!(
                t,
                "    %pro = arith.minui %nkt, %c{stages} : index
    scf.if %leader {{
      scf.for %j = %c0 to %pro step %c1 {{
        %pi = arith.addi %it, %j : index
        %pst = arith.remui %pi, %c{stages} : index
        %pkt = arith.addi %kt0, %j : index
{}
      }}
    }}",
                indent(&self.load("%pkt", "%pst"), 8)
            );
        }
        if self.fp8() && c.grouping == GemmGrouping::Gather {
            let _ = writeln!(
                t,
                "    %c_row_last = arith.subi %row_end, %c1 : index\n    %c_srow = arith.addi %row0, %trow : index"
            );
            for i in 0..m_tiles {
                for h in 0..2 {
                    let _ = writeln!(
                        t,
                        "    %ctr{i}_{h}_a = arith.addi %c_srow, %c{off} : index
    %ctr{i}_{h} = arith.minui %ctr{i}_{h}_a, %c_row_last : index
    %ctok{i}_{h}_i = memref.load %perm[%ctr{i}_{h}] : memref<?xi32>
    %ctok{i}_{h} = arith.index_cast %ctok{i}_{h}_i : i32 to index",
                        off = i * 64 + 8 * h
                    );
                }
            }
        }
        if self.fp8() {
            t.push_str(&self.scale_rows());
        }
        let _ = writeln!(t, "    %frag0 = llvm.mlir.poison : {frag}");
        for e in 0..frag_n {
            let _ = writeln!(t, "    %frag{} = llvm.insertvalue %zero, %frag{e}[{e}] : {frag}", e + 1);
        }
        if c.k_pipelined {
            self.k_pipelined_loop(&mut t);
        } else {
            let accs: Vec<String> = (0..m_tiles).map(|i| format!("%acc{i}_in")).collect();
            let mut iter_args: Vec<String> = accs.iter().map(|a| format!("{a} = %frag{frag_n}")).collect();
            iter_args.push("%i = %it".into());
            let mut types = vec![frag.clone(); m_tiles];
            types.push("index".into());
            let _ = writeln!(
                t,
                "    %res:{} = scf.for %j = %c0 to %nkt step %c1 iter_args({}) -> ({}) {{
      %kt = arith.addi %kt0, %j : index
{}",
                m_tiles + 1,
                iter_args.join(", "),
                types.join(", "),
                indent(&self.stage_operands("%i"), 6),
            );
            let results = self.mainloop_body(&mut t, &accs);
            self.release(&mut t, "%st", "%j");
            let _ = writeln!(
                t,
                "      %i_next = arith.addi %i, %c1 : index
      scf.yield {}, %i_next : {}
    }}",
                results.join(", "),
                types.join(", ")
            );
        }
        t.push_str(&indent(&self.epilogue(), 4));
        let _ = write!(head, "{}", indent(&self.unit_loop("%c_end", &t, &format!("%res#{m_tiles}")), 2));
        head
    }

    /// The stage of the K tile with stage counter `i`: its full barrier waited for, its operands'
    /// shared addresses (`%st`, `%a_addr`, `%b_addr`, dual `%a2_addr`). The addresses are broadcast
    /// from lane 0 (`shfl.sync.idx`): ptxas then keeps their wgmma descriptors in uniform
    /// registers; from the loop-carried stage counter (and the consumer's `%tid / 128`) it built
    /// them in vector registers and moved each to uniform ones (`R2UR`) before every wgmma.
    fn stage_operands(&self, i: &str) -> String {
        let c = &self.c;
        let (stages, tx, a_bytes) = (c.stages, c.stage_bytes(), c.block_m * ROW_BYTES);
        let b_at = c.a_tiles() * a_bytes;
        let mut t = format!(
            "%st = arith.remui {i}, %c{stages} : index
%round = arith.divui {i}, %c{stages} : index
%par = arith.remui %round, %c2 : index
%parity = arith.index_cast %par : index to i1
nvgpu.mbarrier.try_wait.parity %full[%st], %parity, %ticks : !bar
%a_off = arith.muli %st, %c{tx} : index
%a_off64 = arith.index_cast %a_off : index to i64
%stage_addr = arith.addi %smem_base, %a_off64 : i64
%a_addr_t = arith.addi %stage_addr, %wg_a64 : i64
%b_addr_t = arith.addi %stage_addr, %c{b_at}_i64 : i64
{}{}",
            lane0_broadcast("%a_addr", "%a_addr_t"),
            lane0_broadcast("%b_addr", "%b_addr_t")
        );
        if c.dual_a {
            // The second A's tile follows the first in the stage.
            let _ = writeln!(t, "%a2_addr = arith.addi %a_addr, %c{a_bytes}_i64 : i64");
        }
        t
    }

    /// Stage `st` (K tile `j` of the unit's) given back once every consumer's wgmmas have read it:
    /// on its empty barrier for the producer warpgroup (and the cluster peer's, which multicasts
    /// into it); without one, refilled with K tile `j + stages` by the leader after a block
    /// barrier (`wgmma.wait_group` covers the issuing warpgroup only).
    fn release(&self, t: &mut String, st: &str, j: &str) {
        let c = &self.c;
        if c.specialized {
            let _ = writeln!(t, "      %released = nvgpu.mbarrier.arrive %empty[{st}] : !bar -> !nvgpu.mbarrier.token");
            if c.cluster > 1 {
                let _ = writeln!(
                    t,
                    "      %empty_addr = nvgpu.mbarrier.get %empty[{st}] : !bar -> i32\n      {}",
                    arrive_on_peer("%empty_addr", "%peer_i32")
                );
            }
        } else {
            let _ = writeln!(
                t,
                "      gpu.barrier
      %jn = arith.addi {j}, %c{stages} : index
      %more = arith.cmpi ult, %jn, %nkt : index
      %refill = arith.andi %leader, %more : i1
      scf.if %refill {{
        %rkt = arith.addi %kt0, %jn : index
{}
      }}",
                indent(&self.load("%rkt", st), 8),
                stages = c.stages
            );
        }
    }

    /// The main loop with K tiles pipelined through the tensor cores ([`GemmConfig::k_pipelined`]):
    /// tile 0's chain issued before the loop; each step issues tile j's, waits for tile j - 1's
    /// (`wgmma.wait_group 1`), releases its stage and (fp8) promotes its block accumulator; after
    /// the loop the last tile's is waited for, released and promoted. `%res`: the accumulators and
    /// the next stage counter, as the plain loop's.
    ///
    /// No register a chain in flight writes may be read or written before its wait, copies
    /// included (ptxas would wait there itself): bf16 chains accumulate in place; fp8's two block
    /// accumulators alternate, so its loop takes two tiles a step and each keeps its registers
    /// (a loop-carried block swapped each step would be copied while in flight). Every path to the
    /// epilogue, the unit with no K tile too, passes a `wait_group 0`.
    fn k_pipelined_loop(&self, t: &mut String) {
        let c = &self.c;
        let (m_tiles, frag) = (c.row_tiles(), &self.frag);
        let zero = format!("%frag{}", c.block_n / 2);
        let zeros = vec![zero.clone(); m_tiles];
        let frags = vec![frag.clone(); m_tiles].join(", ");
        let fp8 = self.fp8();
        // Prologue: tile 0 issued (bf16 onto zero accumulators; fp8 into a fresh block).
        let _ = writeln!(
            t,
            "    %kp_any = arith.cmpi ugt, %nkt, %c0 : index
    %kp0:{m_tiles} = scf.if %kp_any -> ({frags}) {{
{}",
            indent(&self.stage_operands("%it"), 6)
        );
        let first = self.chain(t, &zeros, true);
        let _ = writeln!(
            t,
            "      scf.yield {} : {frags}
    }} else {{
      scf.yield {} : {frags}
    }}",
            first.join(", "),
            zeros.join(", ")
        );
        let at = |name: &str, k: usize| format!("{name}#{k}");
        let mut types = Vec::new();
        let mut iter_args = Vec::new();
        let mains: Vec<String> = (0..m_tiles).map(|i| format!("%acc{i}_in")).collect();
        let pending: Vec<String> = (0..m_tiles).map(|i| format!("%pend{i}")).collect();
        if fp8 {
            iter_args.extend(mains.iter().map(|a| format!("{a} = {zero}")));
            types.extend(vec![frag.clone(); m_tiles]);
        }
        iter_args.extend(pending.iter().enumerate().map(|(i, p)| format!("{p} = %kp0#{i}")));
        types.extend(vec![frag.clone(); m_tiles]);
        iter_args.push("%i = %it".into());
        types.push("index".into());
        let carried = types.len();
        let loop_out = |k: usize| at("%kl", k);
        let counter = loop_out(carried - 1);
        if !fp8 {
            // bf16: a tile a step, its chain accumulating onto the one in flight.
            let _ = writeln!(
                t,
                "    %kl:{carried} = scf.for %j = %c1 to %nkt step %c1 iter_args({}) -> ({}) {{
      %i_next = arith.addi %i, %c1 : index
{}",
                iter_args.join(", "),
                types.join(", "),
                indent(&self.stage_operands("%i_next"), 6)
            );
            let issued = self.chain(t, &pending, false);
            let _ = writeln!(
                t,
                "      %jp = arith.subi %j, %c1 : index
      nvvm.wgmma.wait.group.sync.aligned 1
      %pst = arith.remui %i, %c{} : index",
                c.stages
            );
            self.release(t, "%pst", "%jp");
            let _ = writeln!(t, "      scf.yield {}, %i_next : {}\n    }}", issued.join(", "), types.join(", "));
            let finals: Vec<String> = (0..m_tiles).map(loop_out).collect();
            let _ = writeln!(
                t,
                "    %res:{} = scf.if %kp_any -> ({frags}, index) {{
      %jp = arith.subi %nkt, %c1 : index
      nvvm.wgmma.wait.group.sync.aligned 0
      %pst = arith.remui {counter}, %c{} : index",
                m_tiles + 1,
                c.stages
            );
            self.release(t, "%pst", "%jp");
            let _ = writeln!(
                t,
                "      %i_after = arith.addi {counter}, %c1 : index
      scf.yield {}, %i_after : {frags}, index
    }} else {{
      nvvm.wgmma.wait.group.sync.aligned 0
      scf.yield {}, %it : {frags}, index
    }}",
                finals.join(", "),
                zeros.join(", ")
            );
            return;
        }
        // fp8: tiles j (into block B) and j + 1 (into block A, the one carried) a step.
        let _ = writeln!(
            t,
            "    %kp_k1 = arith.maxui %nkt, %c1 : index
    %kp_rest = arith.subi %kp_k1, %c1 : index
    %kp_pairs = arith.divui %kp_rest, %c2 : index
    %kp_odd_n = arith.remui %kp_rest, %c2 : index
    %kp_odd = arith.cmpi ne, %kp_odd_n, %c0 : index
    %kl:{carried} = scf.for %q = %c0 to %kp_pairs step %c1 iter_args({}) -> ({}) {{
      %q2 = arith.muli %q, %c2 : index
      %jb = arith.addi %q2, %c1 : index
      %ja = arith.addi %q2, %c2 : index
      %jp = arith.subi %jb, %c1 : index
      %ib = arith.addi %i, %c1 : index
      %ia = arith.addi %i, %c2 : index",
            iter_args.join(", "),
            types.join(", ")
        );
        let (mains_b, block_b) = self.fp8_half(t, "%hb", ("%ib", "%i"), "%jp", &mains, &pending);
        let (mains_a, block_a) = self.fp8_half(t, "%ha", ("%ia", "%ib"), "%jb", &mains_b, &block_b);
        let _ = writeln!(
            t,
            "      scf.yield {}, {}, %ia : {}\n    }}",
            mains_a.join(", "),
            block_a.join(", "),
            types.join(", ")
        );
        let (loop_mains, loop_block): (Vec<String>, Vec<String>) =
            ((0..m_tiles).map(loop_out).collect(), (m_tiles..2 * m_tiles).map(loop_out).collect());
        // The last tile (after an odd one more: issued behind block A's): waited for, released,
        // promoted — in each branch, so that no block in flight is merged (copied).
        let _ = writeln!(
            t,
            "    %res:{} = scf.if %kp_any -> ({frags}, index) {{
      %kp_last = arith.subi %nkt, %c1 : index
      %kp_fin:{m_tiles} = scf.if %kp_odd -> ({frags}) {{
        %jp = arith.subi %kp_last, %c1 : index
        %ib = arith.addi {counter}, %c1 : index",
            m_tiles + 1
        );
        let (odd_mains, odd_block) = self.fp8_half(t, "%hb", ("%ib", &counter), "%jp", &loop_mains, &loop_block);
        let odd_finals = self.fp8_last(t, "last after odd", "%ib", &odd_mains, &odd_block);
        let _ = writeln!(t, "        scf.yield {} : {frags}\n      }} else {{", odd_finals.join(", "));
        let even_finals = self.fp8_last(t, "last", &counter, &loop_mains, &loop_block);
        let _ = writeln!(
            t,
            "        scf.yield {} : {frags}
      }}
      %kp_used = arith.addi %kp_rest, %c1 : index
      %i_after = arith.addi %it, %kp_used : index
      scf.yield {}, %i_after : {frags}, index
    }} else {{
      nvvm.wgmma.wait.group.sync.aligned 0
      scf.yield {}, %it : {frags}, index
    }}",
            even_finals.join(", "),
            (0..m_tiles).map(|k| at("%kp_fin", k)).collect::<Vec<_>>().join(", "),
            zeros.join(", ")
        );
    }

    /// fp8, K-pipelined: one tile's step in its own region (`label`, its names its own): the
    /// chain of the tile with stage counter `issue` into a fresh block, then the block `pending`
    /// (K tile `j_pending`, stage counter `held`) waited for, its stage released and it promoted
    /// into `mains`. Returns the main accumulators and the block issued (in flight).
    fn fp8_half(
        &self,
        t: &mut String,
        label: &str,
        (issue, held): (&str, &str),
        j_pending: &str,
        mains: &[String],
        pending: &[String],
    ) -> (Vec<String>, Vec<String>) {
        let m_tiles = mains.len();
        let frags = vec![self.frag.clone(); 2 * m_tiles].join(", ");
        let _ = writeln!(
            t,
            "      {label}:{} = scf.execute_region -> ({frags}) {{
{}",
            2 * m_tiles,
            indent(&self.stage_operands(issue), 6)
        );
        let issued = self.chain(t, mains, false);
        let _ = writeln!(t, "      %kt = arith.addi %kt0, {j_pending} : index");
        t.push_str(&self.scale_loads());
        let _ = writeln!(
            t,
            "      nvvm.wgmma.wait.group.sync.aligned 1
      %pst = arith.remui {held}, %c{} : index",
            self.c.stages
        );
        self.release(t, "%pst", j_pending);
        let waited = self.fence(t, "%fp", "waited", pending);
        let promoted = self.promote(t, mains, &waited);
        let promoted = self.fence(t, "%fm", "promoted", &promoted);
        let _ = writeln!(t, "      scf.yield {}, {} : {frags}\n      }}", promoted.join(", "), issued.join(", "));
        (
            (0..m_tiles).map(|k| format!("{label}#{k}")).collect(),
            (m_tiles..2 * m_tiles).map(|k| format!("{label}#{k}")).collect(),
        )
    }

    /// fp8, K-pipelined: the unit's last tile (block `block`, stage counter `held`) waited for,
    /// released and promoted into `mains`; `tag` names the fence after the wait (each call's its
    /// own: two identical tails, after an odd tile and not, LLVM merged into one, the waits with
    /// them, and copied the block in flight into the merged one's registers before the wait).
    /// Returns the main accumulators.
    fn fp8_last(&self, t: &mut String, tag: &str, held: &str, mains: &[String], block: &[String]) -> Vec<String> {
        let _ = writeln!(
            t,
            "      %kt = arith.addi %kt0, %kp_last : index
{}      nvvm.wgmma.wait.group.sync.aligned 0
      %pst = arith.remui {held}, %c{} : index",
            self.scale_loads(),
            self.c.stages
        );
        self.release(t, "%pst", "%kp_last");
        let waited = self.fence(t, "%fp", tag, block);
        self.promote(t, mains, &waited)
    }

    /// The fragments `values` passed through an empty side-effecting `asm` that ties each value
    /// to its register (`"+f"`), as CUTLASS's `warpgroup_fence_operand`: no read of them moves
    /// above it, nor the code that computes them below it, so an fp8 block is read only after its
    /// wait and a promotion is done before the next chain is issued (LLVM sank the promotion past
    /// the next chain's issue, which then wrote other registers than the block it replaces: ptxas
    /// serialized the wgmmas over the copy). Returns the fenced fragments.
    /// `tag` goes into the `asm` as a comment.
    fn fence(&self, t: &mut String, label: &str, tag: &str, values: &[String]) -> Vec<String> {
        let (frag, n) = (&self.frag, self.c.block_n / 2);
        let outputs = vec!["=f"; n].join(",");
        let tied = (0..n).map(|e| e.to_string()).collect::<Vec<_>>().join(",");
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let elements: Vec<String> = (0..n).map(|e| format!("{label}{i}_{e}")).collect();
            for (e, x) in elements.iter().enumerate() {
                let _ = writeln!(t, "      {x} = llvm.extractvalue {v}[{e}] : {frag}");
            }
            let _ = writeln!(
                t,
                "      {label}{i} = llvm.inline_asm has_side_effects \"// v3c fence: {tag}\", \"{outputs},{tied}\" {} : ({}) -> {frag}",
                elements.join(", "),
                vec!["f32"; n].join(", ")
            );
            out.push(format!("{label}{i}"));
        }
        out
    }

    /// fp8, once per unit: the scale rows of the thread's accumulator rows (trow and trow + 8 of
    /// each row tile; a gather's, its tokens') and whether each is a row of A; per row of B, the
    /// thread's first column and B's last row.
    fn scale_rows(&self) -> String {
        let c = &self.c;
        let mut t = String::from(
            "    %m_rows = memref.dim %a_scale, %c0 : memref<?x?xf32>
    %srow = arith.addi %row0, %trow : index\n",
        );
        for i in 0..c.row_tiles() {
            for h in 0..2 {
                let row = if c.grouping == GemmGrouping::Gather {
                    format!("arith.addi %ctok{i}_{h}, %c0 : index")
                } else {
                    format!("arith.addi %srow, %c{} : index", i * 64 + 8 * h)
                };
                let _ = writeln!(
                    t,
                    "    %sr{i}_{h} = {row}
    %sr{i}_{h}_in = arith.cmpi ult, %sr{i}_{h}, %m_rows : index"
                );
            }
        }
        if c.b_row_scales {
            t.push_str(
                "    %n_rows = memref.dim %b_scale, %c0 : memref<?x?xf32>
    %n_last = arith.subi %n_rows, %c1 : index
    %bcol0 = arith.addi %brow0, %lcol : index\n",
            );
        } else {
            t.push_str("    %nb = arith.divui %brow0, %c128 : index\n");
        }
        t
    }

    /// fp8: K tile `%kt`'s scales (A's, and B's one per tile), loaded once the tile's wgmma chain
    /// is issued, before its wait, so that their latency overlaps the chain; rows past A (not
    /// loaded) scale by zero. (Loaded before the stage's wait instead, ptxas scheduled the scales'
    /// product ahead of the chain's first wgmma, which then waited for the loads.)
    fn scale_loads(&self) -> String {
        let c = &self.c;
        let mut t = String::new();
        for i in 0..c.row_tiles() {
            for h in 0..2 {
                let _ = writeln!(
                    t,
                    "      %sa{i}_{h} = scf.if %sr{i}_{h}_in -> (f32) {{
        %v = memref.load %a_scale[%sr{i}_{h}, %kt] : memref<?x?xf32>
        scf.yield %v : f32
      }} else {{
        scf.yield %zero : f32
      }}"
                );
            }
        }
        if !c.b_row_scales {
            t.push_str("      %sb = memref.load %b_scale[%nb, %kt] : memref<?x?xf32>\n");
        }
        t
    }

    /// fp8 with per-row B scales: the thread's block_n / 4 of K tile `%kt`, loaded after the
    /// wgmma chain (held across it, with 128-wide tiles they would spill).
    fn b_row_scale_loads(&self) -> String {
        let mut t = String::new();
        for j in 0..self.c.block_n / 8 {
            for p in 0..2 {
                let _ = writeln!(
                    t,
                    "      %bc{j}_{p}_u = arith.addi %bcol0, %c{off} : index
      %bc{j}_{p} = arith.minui %bc{j}_{p}_u, %n_last : index
      %sb{j}_{p} = memref.load %b_scale[%bc{j}_{p}, %kt] : memref<?x?xf32>",
                    off = 8 * j + p
                );
            }
        }
        t
    }

    /// One K tile: its chain, waited for, and for fp8 its promotion into the main accumulators
    /// `accs` (bf16: the chain accumulates onto them). Returns the accumulators after it.
    fn mainloop_body(&self, t: &mut String, accs: &[String]) -> Vec<String> {
        let cur = self.chain(t, accs, false);
        if self.fp8() {
            t.push_str(&self.scale_loads());
        }
        let _ = writeln!(t, "      nvvm.wgmma.wait.group.sync.aligned 0");
        if !self.fp8() {
            return cur;
        }
        self.promote(t, accs, &cur)
    }

    /// One K tile's wgmma chain over the stage at `%a_addr` / `%b_addr` (descriptors, fence,
    /// chain, commit), not waited for. bf16 accumulates onto `accs` (the running accumulators)
    /// unless `fresh` (only their count read); fp8 starts a fresh block accumulator (scale-out zero
    /// on the first step), as a fresh bf16 chain does. Returns the chain's accumulators.
    fn chain(&self, t: &mut String, accs: &[String], fresh: bool) -> Vec<String> {
        let c = &self.c;
        let m_tiles = accs.len();
        let frag_n = c.block_n / 2;
        let frag = &self.frag;
        let fp8 = self.fp8();
        // Descriptors: base per A row tile and for B; each k step adds 32 bytes (2 units of 16).
        let desc = |name: &str, addr: &str| {
            format!(
                "      %{name}_m = arith.andi {addr}, %addr_mask : i64\n      %{name}_s = arith.shrui %{name}_m, %c4_i64 : i64\n      %{name} = arith.ori %desc_hi, %{name}_s : i64"
            )
        };
        // The A operands: A's tile, and the second A's (`dc`), each multiplied by the same B tile.
        let operands: &[(&str, &str)] = if c.dual_a { &[("a", "da"), ("a2", "dc")] } else { &[("a", "da")] };
        for (a, d) in operands {
            for i in 0..m_tiles {
                let _ = writeln!(t, "      %{a}_addr{i} = arith.addi %{a}_addr, %c{}_i64 : i64", i * 64 * ROW_BYTES);
                let _ = writeln!(t, "{}", desc(&format!("{d}{i}"), &format!("%{a}_addr{i}")));
            }
        }
        let _ = writeln!(t, "{}", desc("db", "%b_addr"));
        let _ = writeln!(t, "      nvvm.wgmma.fence.aligned");
        // fp8's block accumulators, and a fresh chain, start from zero (the first wgmma's D scaled by
        // zero): no accumulator written between the fence and the chain's first wgmma, which would
        // make ptxas serialize the warpgroup's wgmma behind an arrive of its own (C7520, seen at bf16
        // K-pipelined with two row tiles, where the prologue zeroed its registers there).
        let fresh = fp8 || fresh;
        let mut cur: Vec<String> = if fresh { vec![String::new(); m_tiles] } else { accs.to_vec() };
        // (Dual: the second A's chain after the first's, into the same accumulators — bf16 only.)
        let steps = c.block_k() / c.wgmma_k();
        for (pass, (_, d)) in operands.iter().enumerate() {
            for ks in 0..steps {
                for (i, cur_i) in cur.iter_mut().enumerate() {
                    let (da, db) = if ks == 0 {
                        (format!("%{d}{i}"), "%db".to_string())
                    } else {
                        let _ = writeln!(t, "      %{d}{i}_{ks} = arith.addi %{d}{i}, %c{}_i64 : i64", 2 * ks);
                        if i == 0 && pass == 0 {
                            let _ = writeln!(t, "      %db_{ks} = arith.addi %db, %c{}_i64 : i64", 2 * ks);
                        }
                        (format!("%{d}{i}_{ks}"), format!("%db_{ks}"))
                    };
                    let (input, scale_out) = if fresh && ks == 0 && pass == 0 {
                        (format!("%frag{frag_n}"), "zero")
                    } else {
                        (cur_i.clone(), "one")
                    };
                    let out = format!("%w{i}_{}", pass * steps + ks);
                    let _ = writeln!(
                        t,
                        "      {out} = nvvm.wgmma.mma_async {da}, {db}, {input}, <m = 64, n = {bn}, k = {wk}>, D[<f32>, <{scale_out}>, <wrapped>], A[<{el}>, <one>, <row>], B[<{el}>, <one>, <col>] : {frag} -> {frag}",
                        bn = c.block_n,
                        wk = c.wgmma_k(),
                        el = self.wgmma_el,
                    );
                    *cur_i = out;
                }
            }
        }
        let _ = writeln!(t, "      nvvm.wgmma.commit.group.sync.aligned");
        cur
    }

    /// fp8 promotion of a waited-for block accumulator `blocks` into the main accumulators
    /// `accs`: main += block * a_scale[row, kt] * b_scale[col0 / 128, kt] (per row of B:
    /// b_scale[col, kt]), with K tile `%kt`'s scales that `scale_loads` fetched during the chain.
    /// Returns the main accumulators after it.
    fn promote(&self, t: &mut String, accs: &[String], blocks: &[String]) -> Vec<String> {
        let c = &self.c;
        let frag = &self.frag;
        if c.b_row_scales {
            t.push_str(&self.b_row_scale_loads());
        }
        let mut out = Vec::new();
        for (i, acc_in) in accs.iter().enumerate() {
            if !c.b_row_scales {
                for h in 0..2 {
                    let _ = writeln!(t, "      %s{i}_{h} = arith.mulf %sa{i}_{h}, %sb : f32");
                }
            }
            let mut prev = acc_in.clone();
            for e in 0..c.block_n / 2 {
                let h = (fragment_offset(i, e).0 - i * 64) / 8;
                if c.b_row_scales {
                    // The element's column: 8 (e / 4) + e % 2 past the thread's first.
                    let (j, p) = (e / 4, e % 2);
                    let _ = writeln!(t, "      %s{i}_{h}_{e} = arith.mulf %sa{i}_{h}, %sb{j}_{p} : f32");
                }
                let scale = if c.b_row_scales { format!("%s{i}_{h}_{e}") } else { format!("%s{i}_{h}") };
                let _ = writeln!(
                    t,
                    "      %bv{i}_{e} = llvm.extractvalue {blk}[{e}] : {frag}
      %mv{i}_{e} = llvm.extractvalue {acc_in}[{e}] : {frag}
      %pv{i}_{e} = llvm.intr.fma(%bv{i}_{e}, {scale}, %mv{i}_{e}) : (f32, f32, f32) -> f32
      %p{i}_{e} = llvm.insertvalue %pv{i}_{e}, {prev}[{e}] : {frag}",
                    blk = blocks[i],
                );
                prev = format!("%p{i}_{e}");
            }
            out.push(prev);
        }
        out
    }

    /// The tile's epilogue from `%res#i`: per fragment element its position, bounds, then the
    /// output (+ residual) directly, or with split K through the workspace and the last unit.
    fn epilogue(&self) -> String {
        let c = &self.c;
        let frag = &self.frag;
        let out_ty = format!("memref<?x?x{}>", self.out_el);
        let mut t = String::new();
        // SwiGLU: element e (gate column c of the tile) pairs with element e + block_n / 4 (up
        // column c + block_n / 2, the same thread's); the output tile is block_n / 2 wide.
        let (out_cols, col_base) = if c.swiglu {
            (
                c.block_n / 4,
                "%col0_out = arith.divui %col0, %c2 : index\n%e_col_base0 = arith.addi %col0_out, %lcol : index",
            )
        } else {
            (c.block_n / 2, "%e_col_base0 = arith.addi %col0, %lcol : index")
        };
        let _ = writeln!(t, "%e_row_base = arith.addi %row0, %trow : index\n{col_base}");
        // The row scale and the scatter's target row, per row of the thread's (rows trow and
        // trow + 8 of each row tile), loaded together before any output: per element after the
        // previous element's atomic, ptxas could not reuse them, and each element's store waited
        // on its own two loads.
        if c.row_scale || c.scatter {
            for i in 0..c.row_tiles() {
                for h in 0..2 {
                    let _ = writeln!(
                        t,
                        "%er{i}_{h} = arith.addi %e_row_base, %c{off} : index
%erin{i}_{h} = arith.cmpi ult, %er{i}_{h}, %row_end : index",
                        off = i * 64 + 8 * h
                    );
                    if c.row_scale {
                        let _ = writeln!(
                            t,
                            "%ersc{i}_{h} = scf.if %erin{i}_{h} -> (f32) {{
  %v = memref.load %row_scale[%er{i}_{h}] : memref<?xf32>
  scf.yield %v : f32
}} else {{
  scf.yield %zero : f32
}}"
                        );
                    }
                    if c.scatter {
                        let _ = writeln!(
                            t,
                            "%etk{i}_{h} = scf.if %erin{i}_{h} -> (index) {{
  %v = memref.load %perm[%er{i}_{h}] : memref<?xi32>
  %vi = arith.index_cast %v : i32 to index
  scf.yield %vi : index
}} else {{
  scf.yield %c0 : index
}}"
                        );
                    }
                }
            }
        }
        // Element `i_e`'s row of the thread's: `i_h`.
        let row_of = |x: &str| -> String {
            let (i, e) = x.split_once('_').expect("elements are named tile_element");
            let (i, e): (usize, usize) = (i.parse().expect("a row tile"), e.parse().expect("an element"));
            format!("{i}_{}", (fragment_offset(i, e).0 - i * 64) / 8)
        };
        let mut elements = Vec::new();
        for i in 0..c.row_tiles() {
            for e in 0..out_cols {
                let (row_off, col_off) = fragment_offset(i, e);
                let _ = writeln!(
                    t,
                    "%r{i}_{e} = arith.addi %e_row_base, %c{row_off} : index
%q{i}_{e} = arith.addi %e_col_base0, %c{col_off} : index
%ir{i}_{e} = arith.cmpi ult, %r{i}_{e}, %row_end : index
%ic{i}_{e} = arith.cmpi ult, %q{i}_{e}, %n_out : index
%in{i}_{e} = arith.andi %ir{i}_{e}, %ic{i}_{e} : i1"
                );
                if c.swiglu {
                    let _ = writeln!(
                        t,
                        "%g{i}_{e} = llvm.extractvalue %res#{i}[{e}] : {frag}
%u{i}_{e} = llvm.extractvalue %res#{i}[{up}] : {frag}
%sg_n{i}_{e} = arith.mulf %g{i}_{e}, %neg_log2e : f32
%sg_e{i}_{e} = llvm.inline_asm \"ex2.approx.ftz.f32 $0, $1;\", \"=f,f\" %sg_n{i}_{e} : (f32) -> f32
%sg_d{i}_{e} = arith.addf %sg_e{i}_{e}, %one_f : f32
%sg_s{i}_{e} = arith.divf %g{i}_{e}, %sg_d{i}_{e} : f32
%v{i}_{e} = arith.mulf %sg_s{i}_{e}, %u{i}_{e} : f32",
                        up = e + c.block_n / 4
                    );
                } else {
                    let _ = writeln!(t, "%v{i}_{e} = llvm.extractvalue %res#{i}[{e}] : {frag}");
                }
                elements.push(format!("{i}_{e}"));
            }
        }
        if c.output == GemmOutput::Fp8 {
            t.push_str(&self.quantized_store(out_cols));
            return t;
        }
        // The output value of f32 `v` at element `x` (scaled, plus the residual — loaded here, or
        // `%rv{x}` already — rounded to the output's type): its lines and its name.
        let finish_with = |v: &str, x: &str, residual_loaded: bool| -> (String, String) {
            let mut s = String::new();
            let mut v = v.to_string();
            if c.row_scale {
                let _ = writeln!(s, "%scaled{x} = arith.mulf {v}, %ersc{} : f32", row_of(x));
                v = format!("%scaled{x}");
            }
            if c.residual {
                if !residual_loaded {
                    let _ = writeln!(s, "%rv{x} = memref.load %residual[%r{x}, %q{x}] : {out_ty}");
                }
                let rv = if c.output == GemmOutput::Bf16 {
                    let _ = writeln!(s, "%rvf{x} = arith.extf %rv{x} : bf16 to f32");
                    format!("%rvf{x}")
                } else {
                    format!("%rv{x}")
                };
                let _ = writeln!(s, "%sum{x} = arith.addf {v}, {rv} : f32");
                v = format!("%sum{x}");
            }
            if c.output == GemmOutput::Bf16 {
                let _ = writeln!(s, "%h{x} = arith.truncf {v} : f32 to bf16");
                v = format!("%h{x}");
            }
            (s, v)
        };
        let finish = |v: &str, x: &str| finish_with(v, x, false);
        // The final write of f32 value `v` at element `x`.
        let store = |v: &str, x: &str| -> String {
            let (mut s, v) = finish(v, x);
            if c.scatter {
                let _ = write!(
                    s,
                    "%old{x} = memref.atomic_rmw addf {v}, %out[%etk{}, %q{x}] : (f32, {out_ty}) -> f32",
                    row_of(x)
                );
            } else {
                let _ = write!(s, "memref.store {v}, %out[%r{x}, %q{x}] : {out_ty}");
            }
            s
        };
        let guarded = |x: &str, body: &str| format!("scf.if %in{x} {{\n{}\n}}\n", indent(body, 2));
        // A thread's two adjacent columns of a row (elements e and e + 1, e even) in one store of 8
        // (f32) or 4 (bf16) bytes — their residual in one load — when both are inside, the rows'
        // length is even and the output (and residual) aligned; else each on its own. Scattered
        // rows add with atomics, one at a time.
        let (bytes, asm, el) = match c.output {
            GemmOutput::Bf16 => (2, "\"st.global.b32 [$0], $1;\", \"l,r\"", "bf16"),
            _ => (4, "\"st.global.v2.f32 [$0], {$1, $2};\", \"l,f,f\"", "f32"),
        };
        let align = 2 * bytes;
        // `%pairs_ok`: the output (and residual) aligned for a pair's one access, the rows' length
        // even.
        let mut pairs_ok = format!(
            "{}%n_odd = arith.remui %n_out, %c2 : index
%n_even = arith.cmpi eq, %n_odd, %c0 : index
",
            aligned_base("out", &format!("%out : {out_ty}"), align)
        );
        if c.residual {
            let _ = write!(
                pairs_ok,
                "{}%both_aligned = arith.andi %out_aligned, %res_aligned : i1
%pairs_ok = arith.andi %both_aligned, %n_even : i1
",
                aligned_base("res", &format!("%residual : {out_ty}"), align)
            );
        } else {
            pairs_ok.push_str("%pairs_ok = arith.andi %out_aligned, %n_even : i1\n");
        }
        // The residual pairs of `pairs` (each loaded when `cond(x0)` holds: both inside and 8-byte
        // pairs allowed), as `%rrl_{x0}`, all issued before any of the pairs' writes: one pair's
        // load after the previous pair's store waited on each (the store and the load may alias:
        // the residual stream updated in place; each pair's own load still comes first).
        let residual_preloads = |pairs: &[(&str, &str)], cond: &dyn Fn(&str) -> String, zero: &str| -> String {
            if !c.residual {
                return String::new();
            }
            let mut t = format!("%rrz{zero} = arith.constant dense<0.0> : vector<2x{el}>\n");
            for (x0, _) in pairs {
                let _ = writeln!(
                    t,
                    "%rrl_{x0} = scf.if {cond} -> (vector<2x{el}>) {{
  %rre_{x0} = arith.muli %r{x0}, %n_out : index
  %rrq_{x0} = arith.addi %rre_{x0}, %q{x0} : index
  %rrb_{x0} = arith.muli %rrq_{x0}, %c{bytes} : index
  %rra_{x0} = arith.addi %res_base, %rrb_{x0} : index
  %rra64_{x0} = arith.index_cast %rra_{x0} : index to i64
  %rrp_{x0} = llvm.inttoptr %rra64_{x0} : i64 to !llvm.ptr<1>
  %rrv_{x0} = llvm.load %rrp_{x0} {{alignment = {align} : i64}} : !llvm.ptr<1> -> vector<2x{el}>
  scf.yield %rrv_{x0} : vector<2x{el}>
}} else {{
  scf.yield %rrz{zero} : vector<2x{el}>
}}",
                    cond = cond(x0)
                );
            }
            t
        };
        // The final write of a pair's values `v0`, `v1` (f32, elements x0 and x1 = x0 + 1) in one
        // store of 8 (f32) or 4 (bf16) bytes, their residual the one `residual_preloads` loaded;
        // `%pairs_ok` and both inside known.
        let pair_write = |x0: &str, x1: &str, v0: &str, v1: &str| -> String {
            let (l0, v0) = finish_with(v0, x0, true);
            let (l1, v1) = finish_with(v1, x1, true);
            // The pair's residual (`residual_preloads`), as `%rv{x0}` and `%rv{x1}`.
            let residual = if c.residual {
                format!(
                    "%rv{x0} = llvm.extractelement %rrl_{x0}[%c0_i32 : i32] : vector<2x{el}>
%rv{x1} = llvm.extractelement %rrl_{x0}[%c1_i32 : i32] : vector<2x{el}>
"
                )
            } else {
                String::new()
            };
            let write = match c.output {
                GemmOutput::Bf16 => format!(
                    "%pk0_{x0} = arith.bitcast {v0} : bf16 to i16
%pk1_{x0} = arith.bitcast {v1} : bf16 to i16
%pw0_{x0} = arith.extui %pk0_{x0} : i16 to i32
%pw1_{x0} = arith.extui %pk1_{x0} : i16 to i32
%pw1s_{x0} = arith.shli %pw1_{x0}, %c16_i32 : i32
%pw_{x0} = arith.ori %pw0_{x0}, %pw1s_{x0} : i32
llvm.inline_asm has_side_effects {asm} %pa64_{x0}, %pw_{x0} : (i64, i32) -> ()"
                ),
                _ => format!("llvm.inline_asm has_side_effects {asm} %pa64_{x0}, {v0}, {v1} : (i64, f32, f32) -> ()"),
            };
            format!(
                "%pe_{x0} = arith.muli %r{x0}, %n_out : index
%pq_{x0} = arith.addi %pe_{x0}, %q{x0} : index
%pb_{x0} = arith.muli %pq_{x0}, %c{bytes} : index
%pa_{x0} = arith.addi %out_base, %pb_{x0} : index
%pa64_{x0} = arith.index_cast %pa_{x0} : index to i64
{residual}{l0}{l1}{write}"
            )
        };
        // Per pair of a thread's adjacent columns (elements e and e + 1, e even): rows past the
        // end skip both at once; inside, column e + 1 in bounds means e is. `paired` (both inside,
        // and what `ok` names holds) gets the pair's lines, else `single` each element's.
        // `writes`: `paired` writes the output (its residual pairs preloaded, `RESIDUAL_PAIRS` pairs
        // at a time), not the workspace.
        let per_pair = |tag: &str,
                        ok: &str,
                        writes: bool,
                        paired: &dyn Fn(&str, &str) -> String,
                        single: &dyn Fn(&str) -> String| {
            let mut d = String::new();
            let pairs: Vec<(&str, &str)> = elements.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
            for (g, group) in pairs.chunks(RESIDUAL_PAIRS).enumerate() {
                if writes && c.residual {
                    for (x0, x1) in group {
                        let _ = writeln!(
                            d,
                            "%{tag}rin_{x0} = arith.andi %ir{x0}, %ic{x1} : i1\n%{tag}rq_{x0} = arith.andi %{tag}rin_{x0}, {ok} : i1"
                        );
                    }
                    d.push_str(&residual_preloads(group, &|x0| format!("%{tag}rq_{x0}"), &format!("_{tag}{g}")));
                }
                for (x0, x1) in group {
                    let _ = write!(
                        d,
                        "scf.if %ir{x0} {{
  %{tag}{x0} = arith.andi %ic{x1}, {ok} : i1
  scf.if %{tag}{x0} {{
{}
  }} else {{
{}
  }}
}}
",
                        indent(&paired(x0, x1), 4),
                        indent(&format!("{}{}", single(x0), single(x1)), 4)
                    );
                }
            }
            d
        };
        let single_write = |x: &str| guarded(x, &store(&format!("%v{x}"), x));
        // Scattered rows add with atomics, one at a time.
        let direct: String = if c.scatter {
            elements.iter().map(|x| single_write(x)).collect()
        } else {
            let v = |x: &str| format!("%v{x}");
            let paired = |x0: &str, x1: &str| pair_write(x0, x1, &v(x0), &v(x1));
            format!("{pairs_ok}{}", per_pair("paired_", "%pairs_ok", true, &paired, &single_write))
        };
        if !c.split_k {
            t.push_str(&direct);
            return t;
        }
        // Split K: the unit's partial tile into the workspace, a pair's two f32 in one 8-byte
        // store (the workspace aligned to 8, its rows' length even); the last unit sums each pair's
        // partials in one 8-byte load a split and writes the pair as the direct path does.
        let ws_pairs = aligned_base("ws", "%ws : memref<?x?x?xf32>", 8)
            + "%ws_rows = memref.dim %ws, %c1 : memref<?x?x?xf32>
%ws_cols = memref.dim %ws, %c2 : memref<?x?x?xf32>
%ws_cols_odd = arith.remui %ws_cols, %c2 : index
%ws_cols_even = arith.cmpi eq, %ws_cols_odd, %c0 : index
%ws_ok = arith.andi %ws_aligned, %ws_cols_even : i1
%ws_split = arith.muli %ws_rows, %ws_cols : index
%reduce_ok = arith.andi %ws_ok, %pairs_ok : i1
%wst_r = arith.muli %e_row_base, %ws_cols : index
%wst_e = arith.addi %wst_r, %e_col_base0 : index
%wst_b = arith.muli %wst_e, %c4 : index
%wst = arith.addi %ws_base, %wst_b : index
";
        // Element x0's address in split `z` of the workspace, as `%{name}_a64`: from the thread's
        // first element's (`%wst`) by the fragment's row and column offsets — the partial's and the
        // reduction's addresses share no more than that and a row's offset, so nothing per
        // element lives across the hand-off.
        let ws_at = |x0: &str, z: &str, name: &str| {
            let (i, e) = x0.split_once('_').expect("elements are named tile_element");
            let (row_off, col_off) = fragment_offset(i.parse().expect("a row tile"), e.parse().expect("an element"));
            format!(
                "%{name}_z = arith.muli {z}, %ws_split : index
%{name}_r = arith.muli %ws_cols, %c{row_off} : index
%{name}_rz = arith.addi %{name}_z, %{name}_r : index
%{name}_i = arith.addi %{name}_rz, %c{col_off} : index
%{name}_b = arith.muli %{name}_i, %c4 : index
%{name}_a = arith.addi %wst, %{name}_b : index
%{name}_a64 = arith.index_cast %{name}_a : index to i64
"
            )
        };
        let partial_pair = |x0: &str, x1: &str| {
            format!(
                "{}llvm.inline_asm has_side_effects \"st.global.v2.f32 [$0], {{$1, $2}};\", \"l,f,f\" %wp_{x0}_a64, %v{x0}, \
                 %v{x1} : (i64, f32, f32) -> ()",
                ws_at(x0, "%z", &format!("wp_{x0}"))
            )
        };
        let partial_single =
            |x: &str| guarded(x, &format!("memref.store %v{x}, %ws[%z, %r{x}, %q{x}] : memref<?x?x?xf32>"));
        let partial = per_pair("wpaired_", "%ws_ok", false, &partial_pair, &partial_single);
        let reduce_single = |x: &str| {
            let sum = format!(
                "%fs{x} = scf.for %zz = %c0 to %splits step %c1 iter_args(%acc = %zero) -> (f32) {{
  %part = memref.load %ws[%zz, %r{x}, %q{x}] : memref<?x?x?xf32>
  %acc_next = arith.addf %acc, %part : f32
  scf.yield %acc_next : f32
}}
{}",
                store(&format!("%fs{x}"), x)
            );
            guarded(x, &sum)
        };
        // The last unit's sums: with pairs (`%reduce_ok`), up to REDUCE_PAIRS pairs at a time,
        // two splits a step, both splits' loads of all of them (8 bytes a pair: both inside)
        // issued before any is added — a pair's partials still summed in split order, so the
        // same bits as a loop over each pair's splits, which waited for every load in turn;
        // a pair whose second column is past the output sums its first alone. Without pairs,
        // element by element.
        let reduce = {
            let pairs: Vec<(&str, &str)> = elements.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
            let mut paired = String::from("%rz2 = arith.constant dense<0.0> : vector<2xf32>\n");
            for (g, group) in pairs.chunks(REDUCE_PAIRS).enumerate() {
                // Two splits a step (`%zz`, and `%zz1` while there is one): both splits' loads of
                // the group issued before either is added, in split order.
                let mut body = String::from(
                    "  %zz1 = arith.addi %zz, %c1 : index\n  %zz1_in = arith.cmpi ult, %zz1, %splits : index\n",
                );
                let mut iter = Vec::new();
                let mut next = Vec::new();
                for (x0, x1) in group {
                    let _ = writeln!(paired, "%rin_{x0} = arith.andi %ir{x0}, %ic{x1} : i1");
                    iter.push(format!("%ra0_{x0} = %zero, %ra1_{x0} = %zero"));
                    let _ = writeln!(body, "  %rin1_{x0} = arith.andi %rin_{x0}, %zz1_in : i1");
                    for (h, (z, guard)) in
                        [("%zz", format!("%rin_{x0}")), ("%zz1", format!("%rin1_{x0}"))].iter().enumerate()
                    {
                        let l = format!("wl{h}_{x0}");
                        let _ = writeln!(
                            body,
                            "  %rl{h}_{x0} = scf.if {guard} -> (vector<2xf32>) {{
{}    %{l}_p = llvm.inttoptr %{l}_a64 : i64 to !llvm.ptr<1>
    %{l} = llvm.load %{l}_p {{alignment = 8 : i64}} : !llvm.ptr<1> -> vector<2xf32>
    scf.yield %{l} : vector<2xf32>
  }} else {{
    scf.yield %rz2 : vector<2xf32>
  }}",
                            indent(&ws_at(x0, z, &l), 4) + "\n"
                        );
                    }
                }
                for (x0, _) in group {
                    for e in 0..2 {
                        let _ = writeln!(
                            body,
                            "  %rp{e}_{x0} = llvm.extractelement %rl0_{x0}[%c{e}_i32 : i32] : vector<2xf32>
  %rq{e}_{x0} = llvm.extractelement %rl1_{x0}[%c{e}_i32 : i32] : vector<2xf32>
  %rm{e}_{x0} = arith.addf %ra{e}_{x0}, %rp{e}_{x0} : f32
  %rmq{e}_{x0} = arith.addf %rm{e}_{x0}, %rq{e}_{x0} : f32
  %rn{e}_{x0} = arith.select %zz1_in, %rmq{e}_{x0}, %rm{e}_{x0} : f32"
                        );
                    }
                    next.push(format!("%rn0_{x0}, %rn1_{x0}"));
                }
                let types = vec!["f32"; 2 * group.len()].join(", ");
                let _ = writeln!(
                    paired,
                    "%rs{g}:{n} = scf.for %zz = %c0 to %splits step %c2 iter_args({iter}) -> ({types}) {{
{body}  scf.yield {next} : {types}
}}",
                    n = 2 * group.len(),
                    iter = iter.join(", "),
                    next = next.join(", "),
                );
                paired.push_str(&residual_preloads(group, &|x0| format!("%rin_{x0}"), &format!("_r{g}")));
                for (k, (x0, x1)) in group.iter().enumerate() {
                    let write = pair_write(x0, x1, &format!("%rs{g}#{}", 2 * k), &format!("%rs{g}#{}", 2 * k + 1));
                    let _ = writeln!(
                        paired,
                        "scf.if %ir{x0} {{
  scf.if %rin_{x0} {{
{}
  }} else {{
{}
  }}
}}",
                        indent(&write, 4),
                        indent(&format!("{}{}", reduce_single(x0), reduce_single(x1)), 4)
                    );
                }
            }
            let singles: String = elements.iter().map(|x| reduce_single(x)).collect();
            format!("scf.if %reduce_ok {{\n{}\n}} else {{\n{}\n}}\n", indent(&paired, 2), indent(&singles, 2))
        };
        let ws = WORKGROUP;
        let _ = write!(
            t,
            "%single = arith.cmpi eq, %splits, %c1 : index
scf.if %single {{
{direct}}} else {{
{pairs_ok}{ws_pairs}{partial}  nvvm.memory.barrier <gpu>
  nvvm.barrier id = %c{bar}_i32 number_of_threads = %c{nthreads}_i32
  %first = arith.cmpi eq, %tid, %c0 : index
  scf.if %first {{
    %old = memref.atomic_rmw addi %c1_i32, %counters[%tile] : (i32, memref<?xi32>) -> i32
    %splits_i32 = arith.index_cast %splits : index to i32
    %last_old = arith.subi %splits_i32, %c1_i32 : i32
    %is_last = arith.cmpi eq, %old, %last_old : i32
    %flag_v = arith.extui %is_last : i1 to i32
    memref.store %flag_v, %flag[%c0] : memref<1xi32, {ws}>
  }}
  nvvm.barrier id = %c{bar}_i32 number_of_threads = %c{nthreads}_i32
  %flag_r = memref.load %flag[%c0] : memref<1xi32, {ws}>
  %last = arith.cmpi ne, %flag_r, %c0_i32 : i32
  scf.if %last {{
    nvvm.memory.barrier <gpu>
{reduce}    scf.if %first {{
      memref.store %c0_i32, %counters[%tile] : memref<?xi32>
    }}
  }}
}}
",
            bar = CONSUMER_BARRIER,
            nthreads = 128 * c.consumers,
            reduce = indent(&reduce, 4) + "\n",
        );
        t
    }
}

impl Emitter {
    /// fp8 output: per row (two per row tile per thread) and 128-column group, the amax over the
    /// thread's values then across the 4 lanes that share the row (shuffles), the scale (stored by
    /// the row's first lane), and the values' e4m3 bytes, two adjacent columns per conversion.
    fn quantized_store(&self, out_cols: usize) -> String {
        let c = &self.c;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "%q_lane4 = arith.remui %lane, %c4 : index
%q_first = arith.cmpi eq, %q_lane4, %c0 : index
%q_col_base = arith.subi %e_col_base0, %lcol : index"
        );
        for i in 0..c.row_tiles() {
            for h in 0..2 {
                let row = format!("{i}_{h}");
                let _ = writeln!(
                    t,
                    "%qr{row} = arith.addi %e_row_base, %c{} : index\n%qr_in{row} = arith.cmpi ult, %qr{row}, %row_end : index",
                    i * 64 + 8 * h
                );
                if c.row_scale {
                    let _ = writeln!(
                        t,
                        "%qrs{row} = scf.if %qr_in{row} -> (f32) {{
  %w = memref.load %row_scale[%qr{row}] : memref<?xf32>
  scf.yield %w : f32
}} else {{
  scf.yield %one_f : f32
}}"
                    );
                }
                for q in 0..out_cols.div_ceil(64) {
                    let members: Vec<usize> = (q * 64..(q * 64 + 64).min(out_cols))
                        .filter(|&e| (fragment_offset(i, e).0 - i * 64) / 8 == h)
                        .collect();
                    let g = format!("{row}_{q}");
                    let mut am = "%zero".to_string();
                    for &e in &members {
                        let x = format!("{i}_{e}");
                        let v = if c.row_scale {
                            let _ = writeln!(t, "%vs{x} = arith.mulf %v{x}, %qrs{row} : f32");
                            format!("%vs{x}")
                        } else {
                            format!("%v{x}")
                        };
                        let _ = writeln!(
                            t,
                            "%ng{x} = arith.negf {v} : f32\n%ab{x} = arith.maximumf {v}, %ng{x} : f32\n%am{x} = arith.maximumf {am}, %ab{x} : f32"
                        );
                        am = format!("%am{x}");
                    }
                    let _ = writeln!(
                        t,
                        "%s1_{g}, %s1ok_{g} = gpu.shuffle xor {am}, %c1_i32, %c32_i32 : f32
%m1_{g} = arith.maximumf {am}, %s1_{g} : f32
%s2_{g}, %s2ok_{g} = gpu.shuffle xor %m1_{g}, %c2_i32, %c32_i32 : f32
%m2_{g} = arith.maximumf %m1_{g}, %s2_{g} : f32
%mc_{g} = arith.maximumf %m2_{g}, %min_amax : f32
%sc_{g} = arith.divf %mc_{g}, %e4m3_max : f32
%gc_{g} = arith.addi %q_col_base, %c{gcol} : index
%gi_{g} = arith.divui %gc_{g}, %c128 : index
%gin_{g} = arith.cmpi ult, %gc_{g}, %n_out : index
%gst0_{g} = arith.andi %q_first, %qr_in{row} : i1
%gst_{g} = arith.andi %gst0_{g}, %gin_{g} : i1
scf.if %gst_{g} {{
  memref.store %sc_{g}, %out_scale[%qr{row}, %gi_{g}] : memref<?x?xf32>
}}",
                        gcol = q * 128
                    );
                    for pair in members.chunks(2) {
                        let [e0, e1] = pair[..] else { unreachable!("a row's columns come in adjacent pairs") };
                        let (x0, x1) = (format!("{i}_{e0}"), format!("{i}_{e1}"));
                        let val = |x: &str| if c.row_scale { format!("%vs{x}") } else { format!("%v{x}") };
                        // cvt packs its first operand into the high byte: column c + 1.
                        let _ = writeln!(
                            t,
                            "%qa{x0} = arith.divf {}, %sc_{g} : f32
%qb{x0} = arith.divf {}, %sc_{g} : f32
%pk{x0} = nvvm.convert.f32x2.to.f8x2 %qb{x0}, %qa{x0} {{rnd = #nvvm.fp_rnd_mode<rn>, sat = #nvvm.sat_mode<satfinite>}} : i16 (f8E4M3FN)
%lo{x0} = arith.trunci %pk{x0} : i16 to i8
%hs{x0} = arith.shrui %pk{x0}, %sh8 : i16
%hi{x0} = arith.trunci %hs{x0} : i16 to i8
scf.if %in{x0} {{
  memref.store %lo{x0}, %out[%r{x0}, %q{x0}] : memref<?x?xi8>
}}
scf.if %in{x1} {{
  memref.store %hi{x0}, %out[%r{x1}, %q{x1}] : memref<?x?xi8>
}}",
                            val(&x0),
                            val(&x1)
                        );
                    }
                }
            }
        }
        t
    }
}

pub(super) const WORKGROUP: &str = "#gpu.address_space<workgroup>";

/// A thread's place (from `%tid`) in its warpgroup's wgmma accumulator layout: the warpgroup `%cw`,
/// `%ctid` within it, `%lane`, `%warp`, `%trow0` (the row of its fragment element 0 within the
/// warpgroup's 64) and `%lcol` (the column; `%lcol0` = lane mod 4).
pub(super) fn fragment_coordinates() -> &'static str {
    "  %cw = arith.divui %tid, %c128 : index
  %ctid = arith.remui %tid, %c128 : index
  %lane = arith.remui %ctid, %c32 : index
  %warp = arith.divui %ctid, %c32 : index
  %wrow = arith.muli %warp, %c16 : index
  %lrow = arith.divui %lane, %c4 : index
  %trow0 = arith.addi %wrow, %lrow : index
  %lcol0 = arith.remui %lane, %c4 : index
  %lcol = arith.muli %lcol0, %c2 : index
"
}

/// Where accumulator element `e` of row tile `i` sits relative to the thread's element 0 (rows,
/// columns): the wgmma m64nNk* f32 D layout (a thread holds 2 adjacent columns of rows r and r + 8
/// in each 8-column group).
pub(super) fn fragment_offset(i: usize, e: usize) -> (usize, usize) {
    (i * 64 + 8 * ((e % 4) / 2), 8 * (e / 4) + e % 2)
}

/// `%{name}_base`, the aligned pointer of `memref` (`%value : type`) as an index, and
/// `%{name}_aligned`, whether it is a multiple of `align` bytes.
fn aligned_base(name: &str, memref: &str, align: usize) -> String {
    format!(
        "%{name}_base = memref.extract_aligned_pointer_as_index {memref} -> index
%{name}_misaligned = arith.remui %{name}_base, %c{align} : index
%{name}_aligned = arith.cmpi eq, %{name}_misaligned, %c0 : index
"
    )
}

/// Declarations of the `%c<N>` (index), `%c<N>_i64` and `%c<N>_i32` constants `body` uses.
pub(super) fn constants(body: &str) -> String {
    let mut seen = BTreeSet::new();
    let bytes = body.as_bytes();
    let mut at = 0;
    while let Some(pos) = body[at..].find("%c") {
        let start = at + pos + 2;
        let mut end = start;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
        at = end.max(start);
        if end == start {
            continue;
        }
        let value: u64 = body[start..end].parse().expect("digits");
        let suffix = ["_i64", "_i32"].into_iter().find(|s| body[end..].starts_with(s));
        let next = body[end + suffix.map_or(0, str::len)..].chars().next();
        if next.is_some_and(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            continue;
        }
        seen.insert((suffix.unwrap_or(""), value));
    }
    seen.into_iter()
        .map(|(suffix, v)| {
            let ty = match suffix {
                "_i64" => "i64",
                "_i32" => "i32",
                _ => "index",
            };
            format!("  %c{v}{suffix} = arith.constant {v} : {ty}\n")
        })
        .collect()
}

/// A warp's sum of the i32 `x` in every lane (a butterfly of shuffles): the text and the sum's name.
fn warp_sum(p: &str, x: &str) -> (String, String) {
    let mut t = String::new();
    let mut v = x.to_string();
    for d in [16, 8, 4, 2, 1] {
        let _ = writeln!(
            t,
            "%{p}x{d}, %{p}x{d}_ok = gpu.shuffle xor {v}, %c{d}_i32, %c32_i32 : i32\n%{p}s{d} = arith.addi {v}, %{p}x{d} : i32"
        );
        v = format!("%{p}s{d}");
    }
    (t.trim_end().to_string(), v)
}

/// A warp's inclusive prefix sum of the i32 `x` over its lanes (lane l: lanes 0..=l's), by
/// shuffles up: the text and the sum's name.
fn warp_prefix_sum(p: &str, x: &str) -> (String, String) {
    let mut t = String::new();
    let mut v = x.to_string();
    for d in [1, 2, 4, 8, 16] {
        let _ = writeln!(
            t,
            "%{p}u{d}, %{p}u{d}_ok = gpu.shuffle up {v}, %c{d}_i32, %c32_i32 : i32
%{p}a{d} = arith.select %{p}u{d}_ok, %{p}u{d}, %c0_i32 : i32
%{p}p{d} = arith.addi {v}, %{p}a{d} : i32"
        );
        v = format!("%{p}p{d}");
    }
    (t.trim_end().to_string(), v)
}

/// An arrival on the mbarrier at shared address `addr` (i32) of this block, in cluster block
/// `peer`'s shared memory (`mapa`): a consumer telling the peer's producer that a buffer it
/// multicasts into is free. The PTX default semantics (release at CTA scope), as CUTLASS's
/// `ClusterBarrier::arrive(cta_id)`: what the arrival orders are reads of the buffer that have
/// completed (the wgmma's, waited for), so no write may overtake them. Written `.release.cluster`,
/// ptxas put `MEMBAR.ALL.GPU` (a GPU-scope fence) before every such arrival, on the path of the
/// buffer's refill.
pub(super) fn arrive_on_peer(addr: &str, peer: &str) -> String {
    format!(
        "llvm.inline_asm has_side_effects \"{{\\n.reg .b32 ra;\\nmapa.shared::cluster.u32 ra, $0, $1;\\nmbarrier.arrive.shared::cluster.b64 _, [ra];\\n}}\", \"r,r\" {addr}, {peer} : (i32, i32) -> ()"
    )
}

/// `dst` (i64) = the shared-memory address `src` (i64) broadcast from the warp's lane 0
/// (`shfl.sync.idx` of its low word: shared addresses fit 32 bits). ptxas then knows it is the
/// same in every lane and keeps what derives from it — the wgmma descriptors — in uniform
/// registers; from an address it cannot prove uniform (a ring stage from a loop counter carried
/// across tiles, say) it builds them in vector registers and moves each to uniform ones (`R2UR`)
/// before every HGMMA. CUTLASS's `canonical_warp_group_idx` trick.
pub(super) fn lane0_broadcast(dst: &str, src: &str) -> String {
    format!(
        "{dst}_lo = arith.trunci {src} : i64 to i32
{dst}_u32, {dst}_ok = gpu.shuffle idx {dst}_lo, %c0_i32, %c32_i32 : i32
{dst} = arith.extui {dst}_u32 : i32 to i64
"
    )
}

pub(super) fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| if l.is_empty() { String::new() } else { format!("{pad}{l}") }).collect::<Vec<_>>().join("\n")
}

/// The scheduling and layout arithmetic of the kernels, run on the CPU: the exact MLIR text the
/// template emits for unit decoding and thread coordinates, JIT-compiled through the CPU lowering
/// and checked against what the GPU code relies on (every tile and K tile computed once, the
/// rasterized order, every accumulator element of a tile owned by exactly one thread).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::v3_to_cpu::lower_to_llvm;
    use melior::ExecutionEngine;

    /// JIT-compiles index functions `@<result>(<args>) -> index` whose body is `body`. An argument
    /// `name:memref` is a `memref<?xi32>` (passed as its 5 descriptor scalars), others are indices.
    fn jit(context: &melior::Context, body: &str, args: &[&str], results: &[&str]) -> ExecutionEngine {
        let params: Vec<String> = args
            .iter()
            .map(|a| match a.strip_suffix(":memref") {
                Some(m) => format!("%{m}: memref<?xi32>"),
                None => format!("%{a}: index"),
            })
            .collect();
        let mut text = String::from("module {\n");
        for r in results {
            let _ = writeln!(
                text,
                "func.func @{}({}) -> index attributes {{llvm.emit_c_interface}} {{",
                r.replace('#', "_"),
                params.join(", ")
            );
            let _ = writeln!(text, "{}{body}  return %{r} : index\n}}", constants(body));
        }
        text.push_str("}\n");
        let module = lower_to_llvm(context, &text, "gemm_index_math").unwrap_or_else(|e| panic!("{e}\n{text}"));
        ExecutionEngine::new(&module, 0, &[], false, false)
    }

    /// Calls `@name` (`#` in result names spelled `_`).
    fn call(engine: &ExecutionEngine, name: &str, args: &[usize]) -> usize {
        let name = name.replace('#', "_");
        let name = name.as_str();
        let mut values: Vec<i64> = args.iter().map(|&a| a as i64).collect();
        let mut result = 0i64;
        let mut ptrs: Vec<*mut ()> = values.iter_mut().map(|v| v as *mut i64 as *mut ()).collect();
        ptrs.push(&mut result as *mut i64 as *mut ());
        // SAFETY: `name` takes `args.len()` index (i64) arguments and returns an index; the
        // pointers outlive the call.
        unsafe { engine.invoke_packed(name, &mut ptrs) }.unwrap();
        result as usize
    }

    #[test]
    fn units_cover_every_tile_and_k_tile_once_in_raster_order() {
        let context = crate::mlir::new_context();
        for raster in [0, 2, 8] {
            let config =
                GemmConfig { raster, split_k: true, ..GemmConfig::new(GemmInput::Fp8, GemmOutput::Bf16, 128, 64, 4) };
            let e = Emitter::new(&config, &crate::target::SM90A);
            let body = format!("  %per = arith.ceildivui %k_tiles, %splits : index\n{}\n", indent(&e.decode(), 2));
            let engine = jit(
                &context,
                &body,
                &["u", "splits", "m", "m_tiles", "m_units", "n_tiles", "k_tiles"],
                &["row0", "col0", "tile", "kt0", "nkt"],
            );
            for (m_tiles, n_tiles, k_tiles, splits) in [(1, 17, 56, 4), (5, 3, 7, 3), (33, 4, 2, 1), (9, 2, 5, 7)] {
                let mut seen = vec![Vec::new(); m_tiles * n_tiles];
                for u in 0..m_tiles * n_tiles * splits {
                    let args = [u, splits, m_tiles * 128, m_tiles, m_tiles, n_tiles, k_tiles];
                    let [row0, col0, tile, kt0, nkt] =
                        ["row0", "col0", "tile", "kt0", "nkt"].map(|f| call(&engine, f, &args));
                    let (mt, nt) = (row0 / 128, col0 / 64);
                    assert_eq!((row0 % 128, col0 % 64), (0, 0));
                    assert!(mt < m_tiles && nt < n_tiles, "unit {u}: tile ({mt}, {nt})");
                    assert_eq!(tile, u / splits, "unit {u}");
                    seen[mt * n_tiles + nt].push((kt0, nkt));
                    // Rasterized: within a group of `raster` tile rows, consecutive tiles go down a column.
                    if raster > 0 && splits == 1 && m_tiles >= raster && u < raster * n_tiles {
                        assert_eq!((mt, nt), (u % raster, u / raster), "raster {raster}, unit {u}");
                    }
                    if raster == 0 {
                        assert_eq!((mt, nt), (tile / n_tiles, tile % n_tiles), "unit {u}");
                    }
                }
                for (t, ranges) in seen.iter_mut().enumerate() {
                    assert_eq!(ranges.len(), splits, "tile {t}: computed {} times", ranges.len());
                    // The splits' K ranges tile [0, k_tiles) in split order.
                    let mut next = 0;
                    for &(kt0, nkt) in ranges.iter() {
                        assert!(kt0 == next || nkt == 0, "tile {t}: K ranges {ranges:?}");
                        next = kt0 + nkt;
                    }
                    assert_eq!(next.max(ranges.iter().map(|r| r.0 + r.1).max().unwrap()), k_tiles, "{ranges:?}");
                }
            }
        }
    }

    #[test]
    fn a_k_range_from_the_device_gives_each_tile_its_k_tiles() {
        let context = crate::mlir::new_context();
        let config = GemmConfig {
            b_row_scales: true,
            k_range: true,
            ..GemmConfig::new(GemmInput::Fp8, GemmOutput::F32, 64, 128, 4)
        };
        config.validate(&crate::target::SM90A).unwrap();
        let e = Emitter::new(&config, &crate::target::SM90A);
        let body = format!(
            "  %splits = arith.constant 1 : index\n{}  %per = arith.ceildivui %k_tiles, %splits : index\n{}\n",
            e.k_tiles(),
            indent(&e.decode(), 2)
        );
        let args = ["k_range:memref", "u", "m", "m_tiles", "m_units", "n_tiles"];
        let engine = jit(&context, &body, &args, &["row0", "col0", "kt0", "nkt"]);
        // (start, end) of the range in K columns: an empty expert, one group, three, a partial last.
        for (lo, hi, first, tiles) in [(256, 256, 2, 0), (384, 512, 3, 1), (0, 384, 0, 3), (1024, 1100, 8, 1)] {
            let range = [lo, hi];
            for u in 0..6 {
                let args = [u, 300, 3, 3, 2];
                let [row0, col0, kt0, nkt] =
                    ["row0", "col0", "kt0", "nkt"].map(|f| call_with_table(&engine, f, &range, &args));
                assert_eq!((row0, col0), ((u / 2) * 64, (u % 2) * 128), "unit {u}");
                assert_eq!((kt0, nkt), (first, tiles), "range {lo}..{hi}, unit {u}");
            }
        }
    }

    #[test]
    fn cluster_units_give_each_block_of_a_cluster_its_row_tile() {
        let context = crate::mlir::new_context();
        for raster in [0, 4] {
            let config = GemmConfig {
                consumers: 2,
                specialized: true,
                persistent: true,
                raster,
                cluster: 2,
                ..GemmConfig::new(GemmInput::Fp8, GemmOutput::F32, 128, 128, 6)
            };
            config.validate(&crate::target::SM90A).unwrap();
            let e = Emitter::new(&config, &crate::target::SM90A);
            let body = format!("  %per = arith.ceildivui %k_tiles, %splits : index\n{}\n", indent(&e.decode(), 2));
            let args = ["u", "rank", "splits", "m", "m_tiles", "m_units", "n_tiles", "k_tiles"];
            let engine = jit(&context, &body, &args, &["row0", "col0"]);
            for (m_tiles, n_tiles) in [(5usize, 3usize), (8, 2), (1, 4)] {
                let m_units = m_tiles.div_ceil(2);
                let mut seen = vec![0; m_units * 2 * n_tiles];
                for u in 0..m_units * n_tiles {
                    let mut cols = Vec::new();
                    for rank in 0..2 {
                        let a = [u, rank, 1, m_tiles * 128, m_tiles, m_units, n_tiles, 9];
                        let (row0, col0) = (call(&engine, "row0", &a), call(&engine, "col0", &a));
                        // The pair's blocks take adjacent row tiles (the second may be past M: its
                        // loads read zeros and its stores are masked) of one tile column.
                        assert_eq!((row0 / 128) % 2, rank, "unit {u}");
                        seen[(row0 / 128) * n_tiles + col0 / 128] += 1;
                        cols.push(col0);
                    }
                    assert_eq!(cols[0], cols[1], "unit {u}: the cluster shares its B tile");
                }
                assert!(seen.iter().all(|&s| s == 1), "{seen:?}");
            }
        }
    }

    /// A `memref<?xi32>` descriptor as the C interface takes it (by pointer).
    #[repr(C)]
    struct MemRef1 {
        allocated: *const i32,
        aligned: *const i32,
        offset: i64,
        size: i64,
        stride: i64,
    }

    /// Calls `@name(table, scalars...)` (`#` spelled `_`).
    fn call_with_table(engine: &ExecutionEngine, name: &str, table: &[i32], scalars: &[usize]) -> usize {
        let desc = MemRef1 {
            allocated: table.as_ptr(),
            aligned: table.as_ptr(),
            offset: 0,
            size: table.len() as i64,
            stride: 1,
        };
        let mut desc_ptr = &desc as *const MemRef1;
        let mut values: Vec<i64> = scalars.iter().map(|&a| a as i64).collect();
        let mut result = 0i64;
        let mut ptrs: Vec<*mut ()> = vec![&mut desc_ptr as *mut *const MemRef1 as *mut ()];
        ptrs.extend(values.iter_mut().map(|v| v as *mut i64 as *mut ()));
        ptrs.push(&mut result as *mut i64 as *mut ());
        // SAFETY: `name` takes a memref<?xi32> (by descriptor pointer) then `scalars.len()`
        // indices and returns an index; everything pointed to outlives the call.
        unsafe { engine.invoke_packed(&name.replace('#', "_"), &mut ptrs) }.unwrap();
        result as usize
    }

    /// The grouped units' loop ([`Emitter::unit_loop`]: the scan by warp shuffles) compiled to PTX
    /// and simulated: blocks of two warps walk the units persistently (each resuming its scan where
    /// its previous unit's group was) until the groups end, lane 0 of each warp writing what it
    /// decoded. 70 groups (three chunks of 32), most empty, some past 128 rows: every group's tiles
    /// are computed once, both warps agree, and no unit past the last is decoded.
    #[test]
    fn grouped_units_cover_every_groups_tiles_once() {
        let context = crate::mlir::new_context();
        let mut counts = vec![0usize; 70];
        for (g, c) in [(0, 5), (2, 130), (3, 1), (31, 64), (32, 300), (33, 2), (40, 9), (63, 128), (64, 1), (69, 257)] {
            counts[g] = c;
        }
        let fields = ["g_found", "row0", "row_end", "col0", "brow0", "nkt"];
        for grouping in [GemmGrouping::Contiguous, GemmGrouping::Masked] {
            let config = GemmConfig::grouped(grouping, GemmInput::Fp8, GemmOutput::F32, 128, 128, 4);
            let e = Emitter::new(&config, &crate::target::SM90A);
            let mut body = String::from(
                "scf.if %lane0 {
  %slot = arith.muli %u, %c2 : index
  %slot_w = arith.addi %slot, %warp : index
  %rec = arith.muli %slot_w, %c6 : index
",
            );
            for (j, f) in fields.iter().enumerate() {
                let _ = writeln!(
                    body,
                    "  %o{j} = arith.addi %rec, %c{j} : index\n  %v{j} = arith.index_cast %{f} : index to i32\n  \
                     memref.store %v{j}, %out[%o{j}] : memref<?xi32>"
                );
            }
            body.push('}');
            let body = format!(
                "  %tid = gpu.thread_id x
  %bx = gpu.block_id x
  %gdx = gpu.grid_dim x
  %ubx = arith.addi %bx, %c0 : index
  %ugdx = arith.addi %gdx, %c0 : index
  %n_tiles = arith.ceildivui %n, %c128 : index
  %k_tiles = arith.ceildivui %k, %c128 : index
{}  %lane0 = arith.cmpi eq, %s_lane, %c0 : index
  %warp = arith.divui %tid, %c32 : index
{}
  gpu.return
}}
}}
}}
",
                e.group_count(),
                indent(&e.unit_loop("%end", &body, "%it"), 2),
            );
            let (table, table_arg) = match grouping {
                GemmGrouping::Masked => {
                    (counts.iter().map(|&c| c as i32).collect::<Vec<_>>(), "%counts: memref<?xi32>, %cap: index")
                }
                _ => {
                    let mut offsets = vec![0i32];
                    for c in &counts {
                        offsets.push(offsets.last().unwrap() + *c as i32);
                    }
                    (offsets, "%offsets: memref<?xi32>")
                }
            };
            let text = format!(
                "module attributes {{gpu.container_module}} {{\ngpu.module @kernels {{\ngpu.func @scan({table_arg}, %out: memref<?xi32>, \
                 %n: index, %k: index) kernel attributes {{known_block_size = array<i32: 64, 1, 1>}} {{\n{}{body}",
                constants(&body)
            );
            let kernel = super::super::compile_module(&context, "scan".into(), Ok(text), 0, 64, &crate::target::SM90A)
                .unwrap_or_else(|e| panic!("{e}"));
            let (n, n_tiles, k_tiles, cap) = (384, 3, 7, 320);
            let units: usize = counts.iter().map(|c| c.div_ceil(128) * n_tiles).sum();
            // Room for 4 units past the last: a scan that went on would write there.
            let mut out = vec![-1i32; (units + 4) * 2 * fields.len()];
            let buf = |v: &mut Vec<i32>| v3c_runtime::abi::Buf {
                addr: v.as_mut_ptr() as u64,
                shape: vec![v.len()],
                element: "i32".into(),
            };
            let mut table = table;
            let (table_buf, out_buf) = (buf(&mut table), buf(&mut out));
            // A memref argument's parameters: its descriptor's values.
            let values = |b: &v3c_runtime::abi::Buf| -> Vec<u64> {
                v3c_runtime::abi::memref(b, 1)
                    .unwrap()
                    .into_iter()
                    .map(|p| match p {
                        v3c_runtime::abi::Param::Value(v) => v,
                        _ => unreachable!("a memref is values"),
                    })
                    .collect()
            };
            let mut params = values(&table_buf);
            if grouping == GemmGrouping::Masked {
                params.push(cap as u64);
            }
            params.extend(values(&out_buf));
            params.extend([n as u64, (k_tiles * 128) as u64]);
            let mut regions = vec![(table_buf.addr, 4 * table.len()), (out_buf.addr, 4 * out.len())];
            regions.sort_unstable();
            let module = v3c_ptxsim::Module::parse(&kernel.ptx).unwrap();
            // Three blocks for 3 x (many) units: each walks about a third of them.
            let launch = v3c_ptxsim::Launch {
                grid: [3, 1],
                threads: 64,
                dynamic_shared: 0,
                params: &params,
                tensor_maps: &[],
                regions: Some(&regions),
                max_instructions: 1 << 28,
                checks: v3c_ptxsim::Checks::default(),
            };
            // SAFETY: the parameters are `table` and `out`, and every access is held to them.
            unsafe { v3c_ptxsim::run(&module.kernels[0], &launch) }.unwrap_or_else(|e| panic!("{e}"));
            assert!(out[units * 2 * fields.len()..].iter().all(|&v| v == -1), "{grouping:?}: units past the last");
            let mut seen = std::collections::HashSet::new();
            for u in 0..units {
                let record = |w: usize| -> Vec<usize> {
                    let at = (2 * u + w) * fields.len();
                    out[at..at + fields.len()].iter().map(|&v| v as usize).collect()
                };
                let (r0, r1) = (record(0), record(1));
                assert_eq!(r0, r1, "{grouping:?} unit {u}: the warps decoded it apart");
                let [g, row0, row_end, col0, brow0, nkt] = r0[..] else { unreachable!() };
                let start = match grouping {
                    GemmGrouping::Masked => g * cap,
                    _ => counts[..g].iter().sum(),
                };
                assert_eq!(row_end, start + counts[g], "{grouping:?} unit {u}");
                assert!(row0 >= start && row0 < row_end && (row0 - start) % 128 == 0, "unit {u}: row {row0}");
                assert_eq!(brow0, g * n + col0, "unit {u}");
                assert_eq!(nkt, k_tiles);
                assert!(seen.insert((g, row0, col0)), "unit {u}: tile computed twice");
            }
        }
    }

    /// The SwiGLU epilogue pairs element e (gate column c) with e + block_n / 4 (up column
    /// c + block_n / 2) of the same thread and row; the fp8 output's amax groups (elements
    /// [64 q, 64 q + 64) of one row half, across the row's 4 lanes) are exactly 128 columns.
    #[test]
    fn swiglu_pairs_and_fp8_groups_follow_the_fragment_layout() {
        for block_n in [64, 128, 256] {
            let quarter = block_n / 4;
            for i in 0..2 {
                for e in 0..quarter {
                    let (gate, up) = (fragment_offset(i, e), fragment_offset(i, e + quarter));
                    assert_eq!((up.0, up.1), (gate.0, gate.1 + block_n / 2), "block_n {block_n}, element {e}");
                }
            }
        }
        let out_cols = 128; // a 256-wide tile: two 128-column groups per row
        for q in 0..2 {
            for h in 0..2 {
                let mut columns = Vec::new();
                for lane4 in 0..4 {
                    for e in (q * 64..q * 64 + 64).filter(|&e| e < out_cols) {
                        let (row, col) = fragment_offset(0, e);
                        if row / 8 == h {
                            columns.push(2 * lane4 + col);
                        }
                    }
                }
                columns.sort_unstable();
                assert_eq!(columns, (q * 128..q * 128 + 128).collect::<Vec<_>>(), "group {q}, row half {h}");
            }
        }
    }

    #[test]
    fn every_accumulator_element_has_one_owner() {
        let context = crate::mlir::new_context();
        for (consumers, block_m, block_n) in [(1, 64, 64), (1, 128, 256), (2, 128, 128), (2, 256, 96)] {
            let config =
                GemmConfig { consumers, ..GemmConfig::new(GemmInput::Bf16, GemmOutput::F32, block_m, block_n, 4) };
            let e = Emitter::new(&config, &crate::target::SM90A);
            let engine = jit(&context, &e.coordinates(), &["tid"], &["trow", "lcol"]);
            let mut owner = vec![None; block_m * block_n];
            for tid in 0..128 * consumers {
                let (trow, lcol) = (call(&engine, "trow", &[tid]), call(&engine, "lcol", &[tid]));
                for i in 0..config.row_tiles() {
                    for el in 0..block_n / 2 {
                        let (dr, dc) = fragment_offset(i, el);
                        let (r, c) = (trow + dr, lcol + dc);
                        assert!(r < block_m && c < block_n, "thread {tid} element ({i}, {el}) at ({r}, {c})");
                        let slot = &mut owner[r * block_n + c];
                        assert_eq!(*slot, None, "({r}, {c}) owned twice");
                        *slot = Some(tid);
                    }
                }
            }
            assert!(owner.iter().all(Option::is_some), "{}: elements nobody holds", config.kernel_name());
        }
    }
}
