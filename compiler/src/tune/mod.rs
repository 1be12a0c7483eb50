//! Autotuning of the sm_90a GEMM template: the search space, static pruning, an analytic cost
//! model that ranks what survives, and the tuning database ([`db`]).
//!
//! A GEMM kernel of the model (a [`GemmKernel`] from [`crate::conversion::sm90::lower`]) is tuned per
//! regime: decode (M bucket [`DECODE_M`]) and prefill ([`PREFILL_M`]). The space is every field the
//! template takes ([`candidates`]); [`GemmConfig::validate`] drops what does not fit shared memory,
//! registers or threads; [`rank`] drops configurations whose waves leave most SMs idle for the shape
//! and orders the rest by [`estimate`]. Spilling candidates are dropped by assembling them
//! ([`crate::conversion::sm90`] + ptxas's report) in the flows that compile candidates.
//!
//! The cost model is a roofline per configuration, not a simulator: per unit (tile x K split) the
//! tensor-core time at the device's dense peak scaled by the template's efficiency (wgmma width,
//! latency hiding by consumer warpgroups / producer warpgroup / pipeline depth, fp8 promotion),
//! times the waves the units make; against DRAM time for the bytes that must move (operands once
//! when the tile order keeps them in L2, the output, residual and split-K workspace), at a bandwidth
//! that grows with the SMs streaming; plus launch and per-wave fixed costs. Its figures rank, they
//! do not predict: measured timings (the database) win over it.

pub mod db;

use crate::conversion::sm90::gemm::{GemmConfig, GemmGrouping, GemmInput, GemmOutput};
use crate::conversion::sm90::lower::GemmKernel;
use crate::target::{DeviceModel, GpuTarget};

/// The M a kernel is tuned at for decode (a batch of up to 64 sequences) and for prefill.
pub const DECODE_M: usize = 64;
pub const PREFILL_M: usize = 4096;

/// A GEMM problem: `out[M, N] = A[M, K] . B[N, K]^T (+ residual)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub input: GemmInput,
    pub output: GemmOutput,
    pub residual: bool,
}

impl GemmShape {
    /// The shape of `kernel` at `m` rows.
    pub fn of(kernel: &GemmKernel, m: usize) -> GemmShape {
        GemmShape {
            m,
            n: kernel.n,
            k: kernel.k,
            input: kernel.input,
            output: kernel.output,
            residual: kernel.residual.is_some(),
        }
    }

    /// What the tuning database keys a kernel by (with the M bucket): types, N, K, epilogue.
    pub fn signature(&self) -> String {
        let t = |i: GemmInput| if i == GemmInput::Fp8 { "fp8" } else { "bf16" };
        let o = match self.output {
            GemmOutput::F32 => "f32",
            GemmOutput::Bf16 => "bf16",
            GemmOutput::Fp8 => "fp8",
        };
        format!("gemm {}->{o} n{} k{}{}", t(self.input), self.n, self.k, if self.residual { " +residual" } else { "" })
    }
}

/// The power-of-two bucket a dynamic M falls in (what the database is keyed by).
pub fn m_bucket(m: usize) -> usize {
    m.max(1).next_power_of_two()
}

/// Every configuration of the GEMM template for `shape` that fits `target` (validate passes).
pub fn candidates(shape: &GemmShape, target: &GpuTarget) -> Vec<GemmConfig> {
    let block_ns: &[usize] = match shape.input {
        GemmInput::Fp8 => &[64, 128],
        GemmInput::Bf16 => &[64, 128, 192, 256],
    };
    let mut out = Vec::new();
    for &block_m in &[64, 128, 256] {
        for &block_n in block_ns {
            for stages in 2..=8 {
                for consumers in [1, 2] {
                    for specialized in [false, true] {
                        for (persistent, raster) in [(false, 0), (true, 0), (true, 8)] {
                            if persistent && !specialized {
                                continue;
                            }
                            for cluster in [1, 2] {
                                for split_k in [false, true] {
                                    let c = GemmConfig {
                                        consumers,
                                        specialized,
                                        persistent,
                                        raster,
                                        cluster,
                                        split_k,
                                        residual: shape.residual,
                                        ..GemmConfig::new(shape.input, shape.output, block_m, block_n, stages)
                                    };
                                    if c.validate(target).is_ok() {
                                        out.push(c);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The cost model's view of one configuration on one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub config: GemmConfig,
    /// K splits the launch uses (1 unless `split_k`).
    pub splits: usize,
    /// Units (tile x split), waves of them, and the share of SM slots the waves keep busy.
    pub units: usize,
    pub waves: usize,
    pub wave_efficiency: f64,
    pub micros: f64,
    pub tflops: f64,
    /// `compute` or `memory`: which side of the roofline bounds it.
    pub bound: &'static str,
}

/// Fixed cost of a launch, and of starting a unit (prologue fill, epilogue), in microseconds.
const LAUNCH_US: f64 = 4.0;
const UNIT_US: f64 = 1.0;
/// How many times its fair share of DRAM bandwidth one SM can pull when few are streaming.
const SM_BANDWIDTH_SHARE: f64 = 2.5;

/// The cost model (see the module doc) for `config` on `shape` on `device`.
pub fn estimate(shape: &GemmShape, config: &GemmConfig, device: &DeviceModel) -> Estimate {
    let c = config;
    let sms = device.sm_count as usize;
    let elt = if shape.input == GemmInput::Fp8 { 1.0 } else { 2.0 };
    let out_elt = match shape.output {
        GemmOutput::F32 => 4.0,
        GemmOutput::Bf16 => 2.0,
        GemmOutput::Fp8 => 1.0,
    };
    let (tiles_m, tiles_n) = (shape.m.div_ceil(c.block_m), shape.n.div_ceil(c.block_n));
    let k_tiles = shape.k.div_ceil(c.block_k());
    let tiles = tiles_m * tiles_n;
    let splits = if c.split_k { sms.div_ceil(tiles).clamp(1, k_tiles) } else { 1 };
    let units = tiles * splits;
    // Blocks per SM: shared memory bounds it (the ring is most of it), then threads.
    let smem = c.shared_memory_bytes() + crate::conversion::sm90::gemm::STATIC_SHARED_BYTES;
    let per_sm = (device.target.shared_memory_per_sm as usize / smem).min(2048 / c.threads()).max(1);
    let slots = sms * per_sm;
    let waves = units.div_ceil(slots);
    let wave_efficiency = units as f64 / (waves * slots) as f64;

    // Tensor-core time of one unit at this SM's share of the peak, scaled by the template's efficiency.
    let peak_per_sm = if shape.input == GemmInput::Fp8 { device.fp8_tflops } else { device.bf16_tflops } * 1e12
        / sms as f64
        / per_sm as f64;
    let width = 1.0 - 12.8 / c.block_n as f64;
    let hiding = match (c.consumers, c.specialized) {
        (2, true) => 1.0,
        (2, false) | (1, true) => 0.9,
        _ => 0.8,
    };
    let depth = (0.6 + 0.1 * (c.stages as f64 - 1.0)).min(1.0);
    // fp8: the per-128-K promotion of the block accumulator runs on the CUDA cores between wgmma
    // groups; a second consumer warpgroup overlaps half of it.
    let promotion = match (shape.input, c.consumers) {
        (GemmInput::Fp8, 1) => 1.0 / 1.25,
        (GemmInput::Fp8, _) => 1.0 / 1.12,
        _ => 1.0,
    };
    let k_per_unit = (k_tiles.div_ceil(splits) * c.block_k()) as f64;
    let unit_flops = 2.0 * (c.block_m * c.block_n) as f64 * k_per_unit;
    let compute_us = waves as f64 * unit_flops / (peak_per_sm * width * hiding * depth * promotion) * 1e6;

    // DRAM: each operand once when the tiles running together share it in L2 (rasterized order, or
    // small enough), re-read otherwise — A across tile columns, B across tile rows; the output
    // (+ residual); split K's workspace written and read.
    let (a_bytes, b_bytes) = ((shape.m * shape.k) as f64 * elt, (shape.n * shape.k) as f64 * elt);
    let fits = |bytes: f64| bytes < device.l2_bytes as f64 / 4.0;
    let reread =
        |bytes: f64, other_tiles: usize| if c.raster > 0 || fits(bytes) || other_tiles == 1 { 1.0 } else { 1.5 };
    let operands = a_bytes * reread(a_bytes, tiles_n) + b_bytes * reread(b_bytes, tiles_m);
    let mut bytes = operands + (shape.m * shape.n) as f64 * out_elt;
    if shape.residual {
        bytes += (shape.m * shape.n) as f64 * out_elt;
    }
    if splits > 1 {
        bytes += 2.0 * (splits * shape.m * shape.n) as f64 * 4.0;
    }
    let streaming = units.min(slots) as f64 / per_sm as f64;
    let bandwidth = device.dram_tbps * 1e12 * (streaming * SM_BANDWIDTH_SHARE / sms as f64).min(1.0);
    let memory_us = bytes / bandwidth * 1e6;

    let fixed = LAUNCH_US + UNIT_US * units.div_ceil(slots) as f64 + if splits > 1 { 2.0 } else { 0.0 };
    let micros = compute_us.max(memory_us) + fixed;
    let flops = 2.0 * (shape.m * shape.n * shape.k) as f64;
    Estimate {
        config: *c,
        splits,
        units,
        waves,
        wave_efficiency,
        micros,
        tflops: flops / (micros * 1e-6) / 1e12,
        bound: if compute_us >= memory_us { "compute" } else { "memory" },
    }
}

/// Below this share of busy SM slots in its waves a configuration is dropped (unless nothing does
/// better for the shape).
pub const MIN_WAVE_EFFICIENCY: f64 = 0.5;

/// The candidates for `shape` ranked by the cost model, fastest first (ties: the simpler, then by
/// kernel name: the order is deterministic), after dropping those whose waves leave most SMs idle.
pub fn rank(shape: &GemmShape, device: &DeviceModel) -> Vec<Estimate> {
    let mut all: Vec<Estimate> = candidates(shape, &device.target).iter().map(|c| estimate(shape, c, device)).collect();
    let best_efficiency = all.iter().map(|e| e.wave_efficiency).fold(0.0, f64::max);
    let floor = MIN_WAVE_EFFICIENCY.min(best_efficiency);
    // A split-K configuration that would not split here is its plain twin with more work.
    all.retain(|e| e.wave_efficiency >= floor && (!e.config.split_k || e.splits > 1));
    // Equal estimates: the less padded tiles at the edges, the simpler configuration (fewer
    // scheduling features), then the name.
    let padded = |e: &Estimate| e.units / e.splits * e.config.block_m * e.config.block_n;
    let features = |c: &GemmConfig| {
        usize::from(c.cluster > 1)
            + usize::from(c.persistent)
            + usize::from(c.raster > 0)
            + usize::from(c.split_k)
            + usize::from(c.specialized)
            + (c.consumers - 1)
    };
    all.sort_by(|a, b| {
        a.micros
            .total_cmp(&b.micros)
            .then_with(|| padded(a).cmp(&padded(b)))
            .then_with(|| features(&a.config).cmp(&features(&b.config)))
            .then_with(|| a.config.kernel_name().cmp(&b.config.kernel_name()))
    });
    all
}

/// The order to compile and measure candidates in: the cost model's best of each tile shape (block
/// M x N, consumer warpgroups, split K) first, in rank order, then the rest in rank order — so a
/// few measured candidates cover different shapes rather than neighbours the model cannot tell
/// apart.
pub fn diverse(ranked: &[Estimate]) -> Vec<Estimate> {
    let key = |e: &Estimate| (e.config.block_m, e.config.block_n, e.config.consumers, e.config.split_k);
    let mut seen = std::collections::HashSet::new();
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for e in ranked {
        if seen.insert(key(e)) {
            first.push(e.clone());
        } else {
            rest.push(e.clone());
        }
    }
    first.extend(rest);
    first
}

/// The candidate set's checksum: a changed search space (or template naming) invalidates database
/// entries measured over another set.
pub fn candidates_sha256(configs: &[GemmConfig]) -> String {
    let mut names: Vec<String> = configs.iter().map(GemmConfig::kernel_name).collect();
    names.sort();
    v3c_runtime::artifact::sha256_hex(names.join("\n").as_bytes())
}

/// Configurations to try for `kernel` at `m` rows on `device`, best first, and where the order
/// comes from: a measured database entry when one applies (then the cost model's order after it),
/// else the cost model.
pub struct Choice {
    pub preferences: Vec<GemmConfig>,
    pub source: String,
    /// Set when a database entry exists but was not used: why (for a warning).
    pub ignored: Option<String>,
}

/// How many of the cost model's best a compile tries (the first that assembles without spills wins).
pub const COMPILE_TRIES: usize = 8;

pub fn choose(kernel: &GemmKernel, m: usize, device: &DeviceModel, db: Option<&db::TuningDb>) -> Choice {
    let shape = GemmShape::of(kernel, m);
    let ranked = rank(&shape, device);
    let mut preferences: Vec<GemmConfig> = ranked.iter().take(COMPILE_TRIES).map(|e| e.config).collect();
    let model = ranked.first().map_or_else(
        || "cost model: no candidate".to_string(),
        |e| format!("cost model: {:.1} us est., {:.0} TFLOP/s, {}-bound", e.micros, e.tflops, e.bound),
    );
    let Some(db) = db else { return Choice { preferences, source: model, ignored: None } };
    let sha = candidates_sha256(&candidates(&shape, &device.target));
    match db.lookup(&shape.signature(), m_bucket(m), device, env!("CARGO_PKG_VERSION"), &sha) {
        db::Lookup::Tuned { config, .. }
            if (config.input, config.output, config.residual) != (shape.input, shape.output, shape.residual) =>
        {
            let why = format!("its winner {} does not implement {}", config.kernel_name(), shape.signature());
            Choice { preferences, source: model, ignored: Some(why) }
        }
        db::Lookup::Tuned { config, entry } => {
            let (_, ms) = entry.winner().expect("a tuned entry has a winner");
            let default = entry.default_ms().map_or(String::new(), |d| format!(", default {d:.4} ms"));
            preferences.retain(|c| *c != config);
            preferences.insert(0, config);
            let source =
                format!("tuning database: {ms:.4} ms measured on {} at {}{default}", entry.gpu, entry.measured_at);
            Choice { preferences, source, ignored: None }
        }
        db::Lookup::Ignored(why) => Choice { preferences, source: model, ignored: Some(why) },
        db::Lookup::Missing => {
            Choice { preferences, source: format!("{model} (no tuning database entry)"), ignored: None }
        }
    }
}

/// The grouped template is tuned the same way; its shapes come with the MoE mapping (not yet).
pub fn is_tunable(config: &GemmConfig) -> bool {
    config.grouping == GemmGrouping::Dense
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::DeviceModel;

    fn shape(m: usize, n: usize, k: usize) -> GemmShape {
        GemmShape { m, n, k, input: GemmInput::Fp8, output: GemmOutput::F32, residual: false }
    }

    #[test]
    fn the_space_holds_only_configurations_that_fit() {
        let s = shape(4096, 7168, 16384);
        let all = candidates(&s, &crate::target::SM90A);
        assert!(all.len() > 100, "{}", all.len());
        assert!(all.iter().all(|c| c.validate(&crate::target::SM90A).is_ok()));
        assert!(all.iter().any(|c| c.cluster == 2) && all.iter().any(|c| c.split_k));
    }

    #[test]
    fn decode_splits_k_and_prefill_fills_the_machine() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let decode = rank(&shape(64, 2112, 7168), &h200);
        let best = &decode[0];
        assert!(best.config.split_k && best.splits > 1, "{best:?}");
        assert_eq!(best.bound, "memory");
        let prefill = rank(&shape(4096, 7168, 16384), &h200);
        let best = &prefill[0];
        assert_eq!(best.bound, "compute", "{best:?}");
        assert!(best.wave_efficiency > 0.8 && best.config.consumers == 2 && best.config.specialized, "{best:?}");
        // Ranked fastest first, deterministically.
        assert!(prefill.windows(2).all(|w| w[0].micros <= w[1].micros));
        assert_eq!(rank(&shape(4096, 7168, 16384), &h200), prefill);
    }

    #[test]
    fn waves_that_leave_most_sms_idle_are_dropped() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let ranked = rank(&shape(4096, 7168, 16384), &h200);
        assert!(ranked.iter().all(|e| e.wave_efficiency >= MIN_WAVE_EFFICIENCY));
        // 133 tiles of 64 x 64 on 132 SMs (8 stages: one block per SM): a second wave of one tile.
        let one_over =
            estimate(&shape(64, 133 * 64, 4096), &GemmConfig::new(GemmInput::Bf16, GemmOutput::F32, 64, 64, 8), &h200);
        assert_eq!(one_over.waves, 2);
        assert!(one_over.wave_efficiency < 0.51);
    }

    #[test]
    fn a_database_winner_of_another_kernel_is_ignored() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let kernel = GemmKernel {
            kernel: "gemm_residual_0".into(),
            input: GemmInput::Fp8,
            output: GemmOutput::F32,
            n: 7168,
            k: 16384,
            a: 0,
            a_scale: Some(1),
            weights: vec![(2, Some(3))],
            residual: Some(4),
            results: vec![(0, 7168)],
            grouped: None,
        };
        let shape = GemmShape::of(&kernel, DECODE_M);
        let entry = |winner: &str| db::DbEntry {
            compiler_version: env!("CARGO_PKG_VERSION").into(),
            gpu: "H200".into(),
            compute_capability: (9, 0),
            kernel: shape.signature(),
            m_bucket: 64,
            candidates_sha256: candidates_sha256(&candidates(&shape, &h200.target)),
            default_config: "x".into(),
            timings: vec![(winner.into(), 0.01)],
            rejected: vec![],
            measured_at: "now".into(),
            measured_on: "test".into(),
        };
        let mut db = db::TuningDb::new();
        db.insert(entry("gemm_bf16_f32_64x64x64_s4_res"));
        let choice = choose(&kernel, DECODE_M, &h200, Some(&db));
        assert!(choice.ignored.unwrap().contains("does not implement gemm fp8->f32 n7168 k16384 +residual"));
        db.insert(entry("gemm_fp8_f32_64x128x128_s4_res"));
        let choice = choose(&kernel, DECODE_M, &h200, Some(&db));
        assert_eq!(choice.preferences[0].kernel_name(), "gemm_fp8_f32_64x128x128_s4_res");
        assert!(choice.source.starts_with("tuning database: 0.0100 ms measured on H200"), "{}", choice.source);
    }

    #[test]
    fn buckets_are_powers_of_two_and_devices_resolve() {
        assert_eq!((m_bucket(1), m_bucket(64), m_bucket(65), m_bucket(4000)), (1, 64, 128, 4096));
        assert_eq!(DeviceModel::by_name("NVIDIA H200").unwrap().name, "H200");
        assert_eq!(DeviceModel::by_name("h20").unwrap().name, "H20");
        assert!(DeviceModel::by_name("A100").unwrap_err().contains("knows: H200, H100, H800, H20"));
    }
}
