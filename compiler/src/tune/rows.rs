//! Autotuning of the reductions: the block width of the RMSNorm row kernels and of greedy
//! sampling's argmax over the vocabulary ([`crate::conversion::sm90::rows`]: one block per row, a
//! tree over the threads' partial results).
//!
//! The template's one free field is `threads` (a power of two from 32 to 1024; every phase strides
//! its columns over the block, so any width computes the same row — the sum of squares in another
//! tree order). The space is every width up to the row's columns that fits ([`candidates`]); the
//! template's own pick (`RowKernel::new`: 8 columns a thread, at most 256) is the default.
//!
//! The cost model ([`estimate`]) follows Little's law rather than bandwidth alone. RMSNorm's loops
//! take a thread's columns in chunks of 4 (16-byte loads) and issue 4 chunks' loads before their
//! first use, so a phase that streams the row from DRAM takes `ceil(d / 4 / threads / 4)` load
//! latencies, and the shared-memory phases a shared access per chunk; the argmax's loop issues its
//! load and uses it right away (its PTX), which ptxas unrolls four times (its SASS: four `LDG`
//! before their first use): `ceil(d / threads / 4)` latencies. The tree takes `log2(threads)`
//! barriers. The argmax streams its
//! row once (keys and indices kept in registers), then its tree. Blocks per SM come from threads, shared memory
//! (the row is staged there) and the 32-block limit, not registers (ptxas gives the vectorized
//! RMSNorm at 256 threads 40 a thread, 53 with both outputs: six or four blocks an SM, whose loads
//! in flight still exceed what DRAM needs); waves of blocks against the DRAM time of the
//! bytes every row moves. Decode's few rows (one block each, on few SMs) favour the widest blocks;
//! prefill's many rows keep enough loads in flight at any width that fills an SM to be bound by
//! DRAM (then the template's own width stands). Its figures rank; the database's measured timings
//! win over it.

use super::db::{self, Tunable};
use super::{m_bucket, Choice};
use crate::conversion::sm90::rows::{RowKernel, RowOp, GROUP};
use crate::target::{DeviceModel, GpuTarget};

/// A reduction problem: a row kernel over `rows` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct RowShape {
    /// The kernel at the template's own width.
    pub kernel: RowKernel,
    pub rows: usize,
}

impl RowShape {
    /// `kernel` over `rows` rows, if its template is tuned (RMSNorm, with its f32 and e4m3 outputs;
    /// the argmax).
    pub fn of(kernel: &RowKernel, rows: usize) -> Option<RowShape> {
        matches!(kernel.op, RowOp::RmsNorm { .. } | RowOp::Argmax).then(|| RowShape { kernel: kernel.clone(), rows })
    }

    /// What the tuning database keys it by (with [`Self::bucket`]): the kernel's name without its
    /// width (`rows_rmsnorm_bf16_d7168_eps1em6_y_q`).
    pub fn signature(&self) -> String {
        let name = self.kernel.kernel_name();
        name.replacen(&format!("_t{}", self.kernel.threads), "", 1)
    }

    pub fn bucket(&self) -> usize {
        m_bucket(self.rows)
    }

    /// Its kernel's arguments at its rows, as `v3r tune` makes them: (name, shape, element,
    /// whether the kernel writes it). RMSNorm: `x [rows, d]`, `w [d]`, then `y [rows, d]`, `q [rows,
    /// d]` (e4m3 bytes, `i8`) and `scale [rows, d / 128]`; the argmax: `x [rows, d]`, `idx [rows]`.
    pub fn operands(&self) -> Vec<(&'static str, Vec<usize>, String, bool)> {
        let (rows, d) = (self.rows, self.kernel.d);
        self.kernel
            .arguments()
            .into_iter()
            .map(|(name, ty)| {
                let element = ty.trim_end_matches('>').rsplit('x').next().unwrap_or_default().to_string();
                let shape = match name {
                    "w" => vec![d],
                    "scale" => vec![rows, d.div_ceil(GROUP)],
                    "idx" => vec![rows],
                    _ => vec![rows, d],
                };
                (name, shape, element, !matches!(name, "x" | "w"))
            })
            .collect()
    }

    /// Its kernel `threads` wide.
    pub fn with_threads(&self, threads: usize) -> RowKernel {
        RowKernel { threads, ..self.kernel.clone() }
    }
}

impl Tunable for RowKernel {
    fn from_name(name: &str) -> Option<RowKernel> {
        RowKernel::from_name(name)
    }

    fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        self.validate(target)
    }
}

/// Every width of `shape`'s kernel that fits `target`, up to one thread per column.
pub fn candidates(shape: &RowShape, target: &GpuTarget) -> Vec<RowKernel> {
    let most = shape.kernel.d.next_power_of_two().max(32);
    (5..=10)
        .map(|p| 1usize << p)
        .filter(|&t| t <= most)
        .map(|t| shape.with_threads(t))
        .filter(|k| k.validate(target).is_ok())
        .collect()
}

/// The cost model's view of one width on one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct RowEstimate {
    pub kernel: RowKernel,
    /// Blocks resident per SM, and waves of the rows' blocks.
    pub per_sm: usize,
    pub waves: usize,
    /// Microseconds of one block (one row).
    pub block_us: f64,
    pub micros: f64,
    /// `latency` (the blocks' chains) or `memory` (DRAM).
    pub bound: &'static str,
}

/// Fixed cost of a launch (as the GEMM model's), a dependent DRAM access, a shared-memory access,
/// a block barrier, in microseconds.
const LAUNCH_US: f64 = 4.0;
const DRAM_LATENCY_US: f64 = 0.6;
const SHARED_US: f64 = 0.02;
const BARRIER_US: f64 = 0.05;
/// Loads a thread keeps in flight in a streaming loop (ptxas unrolls the argmax's loop by 4;
/// RMSNorm's vectorized loops issue 4 chunks' loads a step themselves).
const PTXAS_UNROLL: usize = 4;

/// The cost model (see the module doc) for `kernel` on `shape` on `device`.
pub fn estimate(shape: &RowShape, kernel: &RowKernel, device: &DeviceModel) -> RowEstimate {
    let sms = device.sm_count as usize;
    let (d, t) = (kernel.d, kernel.threads);
    let smem = kernel.shared_memory_bytes() + 1024;
    let per_sm = (2048 / t).min(32).min(device.target.shared_memory_per_sm as usize / smem).max(1);
    let slots = sms * per_sm;
    let waves = shape.rows.div_ceil(slots).max(1);
    // A thread's loads of the row: RMSNorm's take chunks of 4 columns (16 bytes), the argmax's one.
    let chunk = match kernel.op {
        RowOp::RmsNorm { .. } => kernel.vec_chunk(),
        _ => 1,
    };
    let per_thread = (d / chunk).div_ceil(t) as f64;
    // Phase 1 streams the row from DRAM.
    let round_trips = (d / chunk).div_ceil(t).div_ceil(PTXAS_UNROLL) as f64;
    let mut block_us = round_trips * DRAM_LATENCY_US;
    let mut barriers = t.trailing_zeros() as f64;
    // The row in f32 (and the outputs).
    let mut row_bytes = 4 * d;
    match kernel.op {
        RowOp::RmsNorm { keep, quantize, .. } => {
            // The normalization reads the row back from shared memory and writes the outputs
            // (stores do not wait); quantized, the |max| per group and the bytes. The weight comes
            // from L2 after the first rows.
            block_us += per_thread * SHARED_US;
            barriers += 2.0;
            if quantize {
                let groups = d.div_ceil(GROUP);
                block_us += (groups * 4).div_ceil(t) as f64 * (GROUP / 4) as f64 * SHARED_US + per_thread * SHARED_US;
                barriers += 3.0;
            }
            if keep {
                row_bytes += 4 * d;
            }
            if quantize {
                row_bytes += d + 4 * d.div_ceil(GROUP);
            }
        }
        // The tree over the threads' (key, index) pairs, then one thread's write.
        RowOp::Argmax => barriers += 1.0,
        _ => unreachable!("only RMSNorm and the argmax are tuned (RowShape::of)"),
    }
    block_us += barriers * BARRIER_US;
    let memory = (shape.rows * row_bytes) as f64 / (device.dram_tbps * 1e6);
    let latency = waves as f64 * block_us;
    RowEstimate {
        kernel: kernel.clone(),
        per_sm,
        waves,
        block_us,
        micros: latency.max(memory) + LAUNCH_US,
        bound: if latency >= memory { "latency" } else { "memory" },
    }
}

/// The candidates ranked by the cost model, fastest first (ties: the width nearest the template's
/// own, then the narrower).
pub fn rank(shape: &RowShape, device: &DeviceModel) -> Vec<RowEstimate> {
    let mut all: Vec<RowEstimate> =
        candidates(shape, &device.target).iter().map(|k| estimate(shape, k, device)).collect();
    let default = shape.kernel.threads.trailing_zeros() as i32;
    let distance = |e: &RowEstimate| (e.kernel.threads.trailing_zeros() as i32 - default).abs();
    all.sort_by(|a, b| {
        a.micros
            .total_cmp(&b.micros)
            .then_with(|| distance(a).cmp(&distance(b)))
            .then_with(|| a.kernel.threads.cmp(&b.kernel.threads))
    });
    all
}

/// The cost model's view of DeepSeek-V3.2's indexer scores ([`SparseRow::IndexScores`]) at the
/// plan's sizes: not tuned (one configuration a kernel), reported beside the launch.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEstimate {
    /// (query, key) pairs scored and, on the tensor cores, 64-key tiles.
    pub pairs: usize,
    pub tiles: usize,
    pub micros: f64,
    /// `tensor` (the tensor cores' multiply-adds), `issue` (the threads' instructions) or `memory`
    /// (the keys from DRAM).
    pub bound: &'static str,
}

/// Thread instructions a multiply-add of the CUDA-core scores (two keys a thread, 4 columns a step):
/// the PTX simulator's count at V3.2's sizes (22.0 M for 1023 pairs of 64 heads x 128 columns).
const CUDA_CORE_INSTRUCTIONS_PER_MAC: f64 = 2.63;
/// A thread's instructions for a 64-key tile on the tensor cores (the loads, the hi/lo splits, the
/// heads' terms and shuffles: the PTX simulator's count per added tile at 64 heads x 128 columns,
/// 498; over bf16 key rows, loaded in pairs and not split, 258) and per iteration of the query's
/// staging (about 45).
const MMA_TILE_INSTRUCTIONS: f64 = 500.0;
const MMA_TILE_INSTRUCTIONS_BF16_KEYS: f64 = 260.0;
const MMA_STAGE_INSTRUCTIONS: f64 = 45.0;

/// The indexer's scores for `prefill_queries` prefill queries over their own keys (query t sees
/// t + 1), or decode's [`super::DECODE_M`] queries over [`super::attention::DECODE_CONTEXT`] keys
/// each; a query that sees at most top_k keys scores none. The CUDA-core kernel issues
/// [`CUDA_CORE_INSTRUCTIONS_PER_MAC`] a (pair, head, column) on the SMs' 128 lanes a clock; the
/// tensor-core kernel's tiles take the longer of their multiply-adds at the bf16 peak and their
/// threads' instructions (blocks on an SM overlap one's loads with another's wgmmas), plus each
/// block's staging of its query. Either is bound below by its keys' bytes from DRAM: decode's
/// caches once a query (each query its own sequence's), prefill's sequence once (its keys stay in
/// L2). The clock is the bf16 peak's (4096 FLOP a clock an SM).
pub fn index_scores_estimate(
    kernel: &RowKernel,
    prefill_queries: usize,
    device: &DeviceModel,
) -> Option<IndexEstimate> {
    use crate::conversion::sm90::rows::{IndexMma, SparseRow};
    let RowOp::Sparse(SparseRow::IndexScores { heads, decode, top_k, mma, bf16_keys }) = kernel.op else {
        return None;
    };
    let seen: Vec<usize> = match decode {
        true => vec![super::attention::DECODE_CONTEXT; super::DECODE_M],
        false => (1..=prefill_queries).collect(),
    };
    let scored: Vec<usize> = seen.into_iter().filter(|&n| n > top_k).collect();
    let pairs: usize = scored.iter().sum();
    let clock = device.bf16_tflops * 1e12 / (f64::from(device.sm_count) * 4096.0);
    let lanes = f64::from(device.sm_count) * 128.0 * clock;
    let key_rows = if decode { pairs } else { prefill_queries };
    let shape = IndexMma { heads, d: kernel.d, bf16_keys };
    let memory = (key_rows * kernel.d * shape.key_bytes()) as f64 / (device.dram_tbps * 1e12);
    // The longest of the bounds (seconds, what).
    let finish = |tiles: usize, bounds: &[(f64, &'static str)]| {
        let longest = bounds.iter().copied().chain([(memory, "memory")]).max_by(|a, b| a.0.total_cmp(&b.0));
        longest.map(|(seconds, bound)| IndexEstimate { pairs, tiles, micros: seconds * 1e6 + LAUNCH_US, bound })
    };
    if !mma {
        let instructions = (pairs * heads * kernel.d) as f64 * CUDA_CORE_INSTRUCTIONS_PER_MAC;
        return finish(0, &[(instructions / lanes, "issue")]);
    }
    let tiles: usize = scored.iter().map(|n| n.div_ceil(64)).sum();
    let blocks = scored.len() * kernel.blocks_per_row();
    let tensor = (tiles * shape.tile_macs()) as f64 / (device.bf16_tflops * 1e12 / 2.0);
    let threads = kernel.threads as f64;
    let per_block = shape.stage_iterations() as f64 * MMA_STAGE_INSTRUCTIONS;
    let per_tile = if bf16_keys { MMA_TILE_INSTRUCTIONS_BF16_KEYS } else { MMA_TILE_INSTRUCTIONS };
    let issue = (tiles as f64 * per_tile + blocks as f64 * per_block) * threads / lanes;
    finish(tiles, &[(tensor, "tensor"), (issue, "issue")])
}

/// The candidate set's checksum (see [`super::candidates_sha256`]).
pub fn candidates_sha256(kernels: &[RowKernel]) -> String {
    let mut names: Vec<String> = kernels.iter().map(RowKernel::kernel_name).collect();
    names.sort();
    v3c_runtime::artifact::sha256_hex(names.join("\n").as_bytes())
}

/// Widths to try for `shape` on `device`, best first: a measured database entry when one applies,
/// then the cost model's order.
pub fn choose(shape: &RowShape, device: &DeviceModel, db: Option<&db::TuningDb>) -> Choice<RowKernel> {
    let ranked = rank(shape, device);
    let preferences: Vec<RowKernel> = ranked.iter().map(|e| e.kernel.clone()).collect();
    let model = ranked.first().map_or_else(
        || "cost model: no candidate".to_string(),
        |e| format!("cost model: {:.1} us est., {}-bound", e.micros, e.bound),
    );
    let problem = super::Problem { signature: shape.signature(), bucket: shape.bucket(), device };
    let sha = || candidates_sha256(&candidates(shape, &device.target));
    let implements = |k: &RowKernel| *k == shape.with_threads(k.threads);
    super::decide(preferences, model, db, &problem, sha, implements, RowKernel::kernel_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(d: usize, quantize: bool, rows: usize) -> RowShape {
        let op = RowOp::RmsNorm { eps: 1e-6, keep: true, quantize };
        RowShape::of(&RowKernel::new(op, d, "bf16"), rows).unwrap()
    }

    /// DeepSeek-V3.2's indexer (64 heads of 128, top 2048) at 4096 prefill queries: 6.29 M pairs
    /// (queries 2048.. score), 99,328 tiles; on the tensor cores bound by them and an order of
    /// magnitude below the CUDA cores' issue; decode's 64 x 4096 bound by its keys from DRAM and
    /// 5.8x below. Over bf16 key rows: two products a tile of three, decode's keys half the bytes.
    /// A prompt of at most top_k tokens scores nothing; other kernels have no estimate.
    #[test]
    fn the_indexer_on_the_tensor_cores_is_bound_by_them() {
        use crate::conversion::sm90::rows::SparseRow;
        let h200 = DeviceModel::by_name("H200").unwrap();
        let scores = |decode, mma, bf16_keys| {
            let op = SparseRow::IndexScores { heads: 64, decode, top_k: 2048, mma, bf16_keys };
            RowKernel::new(RowOp::Sparse(op), 128, "f32")
        };
        let kernel = |decode, mma| scores(decode, mma, false);
        for decode in [false, true] {
            let cores = index_scores_estimate(&kernel(decode, false), 4096, &h200).unwrap();
            let tensor = index_scores_estimate(&kernel(decode, true), 4096, &h200).unwrap();
            eprintln!("decode {decode}: CUDA cores {cores:?}, tensor cores {tensor:?}");
            assert_eq!(cores.pairs, if decode { 64 * 4096 } else { (2049..=4096).sum() });
            assert_eq!(tensor.tiles, if decode { 64 * 64 } else { 64 * (33..=64).sum::<usize>() });
            // Decode reads every query's keys from DRAM (134 MB: 28 us at 4.8 TB/s).
            assert_eq!(tensor.bound, if decode { "memory" } else { "tensor" });
            assert!(cores.micros > 5.0 * tensor.micros, "{cores:?} vs {tensor:?}");
            let short = index_scores_estimate(&kernel(decode, true), 2048, &h200).unwrap();
            assert_eq!(short.pairs, if decode { tensor.pairs } else { 0 });
            let bf16 = index_scores_estimate(&scores(decode, true, true), 4096, &h200).unwrap();
            eprintln!("decode {decode}: tensor cores over bf16 keys {bf16:?}");
            assert_eq!((bf16.pairs, bf16.tiles, bf16.bound), (tensor.pairs, tensor.tiles, tensor.bound));
            if decode {
                let keys_time = |e: &IndexEstimate| e.micros - LAUNCH_US;
                assert!((keys_time(&bf16) * 2.0 - keys_time(&tensor)).abs() < 1e-6, "{bf16:?} vs {tensor:?}");
            } else {
                assert!(bf16.micros < 0.7 * tensor.micros, "{bf16:?} vs {tensor:?}");
            }
        }
        assert!(index_scores_estimate(&norm(7168, true, 64).kernel, 4096, &h200).is_none());
    }

    #[test]
    fn the_space_is_every_width_up_to_the_columns() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let s = norm(7168, true, 64);
        assert_eq!(s.kernel.threads, 256, "the template's own");
        assert_eq!(s.signature(), "rows_rmsnorm_bf16_d7168_eps1em6_y_q");
        let widths: Vec<usize> = candidates(&s, &h200.target).iter().map(|k| k.threads).collect();
        assert_eq!(widths, [32, 64, 128, 256, 512, 1024]);
        let narrow = norm(64, false, 64);
        assert_eq!(candidates(&narrow, &h200.target).iter().map(|k| k.threads).collect::<Vec<_>>(), [32, 64]);
        for k in candidates(&s, &h200.target) {
            assert_eq!(<RowKernel as Tunable>::from_name(&k.kernel_name()), Some(k));
        }
        let all = s.operands();
        let operands: Vec<(&str, Vec<usize>, &str, bool)> =
            all.iter().map(|(n, shape, e, out)| (*n, shape.clone(), e.as_str(), *out)).collect();
        assert_eq!(
            operands,
            [
                ("x", vec![64, 7168], "f32", false),
                ("w", vec![7168], "bf16", false),
                ("y", vec![64, 7168], "f32", true),
                ("q", vec![64, 7168], "i8", true),
                ("scale", vec![64, 56], "f32", true),
            ]
        );
        let embed = RowKernel::new(RowOp::Embed, 7168, "bf16");
        assert_eq!(RowShape::of(&embed, 64), None, "only RMSNorm and the argmax are tuned");
    }

    /// Greedy sampling's argmax over DeepSeek-V3's 129280-entry vocabulary: one block per row
    /// streams 505 values a thread at the template's 256 threads (126 load latencies); decode's rows
    /// take the widest blocks.
    #[test]
    fn the_argmax_over_the_vocabulary_takes_the_widest_blocks() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let s = RowShape::of(&RowKernel::new(RowOp::Argmax, 129_280, "f32"), 64).unwrap();
        assert_eq!((s.kernel.threads, s.signature().as_str()), (256, "rows_argmax_d129280"));
        let operands: Vec<(&str, Vec<usize>, String, bool)> = s.operands();
        assert_eq!(
            operands,
            [("x", vec![64, 129_280], "f32".to_string(), false), ("idx", vec![64], "i32".to_string(), true)]
        );
        let ranked = rank(&s, &h200);
        assert_eq!((ranked[0].kernel.threads, ranked[0].bound), (1024, "latency"), "{ranked:?}");
        let t256 = ranked.iter().find(|e| e.kernel.threads == 256).unwrap();
        assert!(t256.micros > 3.0 * ranked[0].micros - 2.0 * LAUNCH_US, "{t256:?} vs {:?}", ranked[0]);
        // One row (batch 1): still one block, still the widest.
        let one = RowShape::of(&RowKernel::new(RowOp::Argmax, 129_280, "f32"), 1).unwrap();
        assert_eq!(rank(&one, &h200)[0].kernel.threads, 1024);
    }

    #[test]
    fn decode_takes_the_widest_blocks_and_prefill_fills_the_sms() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let decode = rank(&norm(7168, true, 64), &h200);
        assert_eq!(decode[0].kernel.threads, 1024, "{decode:?}");
        assert_eq!((decode[0].waves, decode[0].bound), (1, "latency"));
        let t256 = decode.iter().find(|e| e.kernel.threads == 256).unwrap();
        // 2 DRAM round trips a thread (7 chunks of 4 columns, 4 + 3) instead of 1.
        assert!(t256.micros > decode[0].micros + 0.5, "{t256:?}");
        // Prefill: seven blocks of 256 threads an SM (its shared memory; ptxas's registers allow
        // four) keep enough loads in flight for DRAM to bound it; equal DRAM time: the template's
        // own width.
        let prefill = rank(&norm(7168, true, 4096), &h200);
        assert_eq!((prefill[0].kernel.threads, prefill[0].per_sm, prefill[0].bound), (256, 7, "memory"));
        let narrow = prefill.iter().find(|e| e.kernel.threads == 32).unwrap();
        assert_eq!(narrow.bound, "latency", "{narrow:?}");
        assert_eq!(rank(&norm(7168, true, 4096), &h200), prefill, "deterministic");
    }

    #[test]
    fn a_measured_width_comes_first() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let s = norm(1536, true, 64);
        let winner = s.with_threads(128).kernel_name();
        let mut db = db::TuningDb::new();
        db.insert(db::DbEntry {
            compiler_version: env!("CARGO_PKG_VERSION").into(),
            gpu: "H200".into(),
            compute_capability: (9, 0),
            kernel: s.signature(),
            m_bucket: 64,
            candidates_sha256: candidates_sha256(&candidates(&s, &h200.target)),
            default_config: s.kernel.kernel_name(),
            timings: vec![(s.kernel.kernel_name(), 0.004), (winner.clone(), 0.003)],
            rejected: vec![],
            measured_at: "now".into(),
            measured_on: "test".into(),
        });
        let choice = choose(&s, &h200, Some(&db));
        assert_eq!(choice.preferences[0].kernel_name(), winner);
        assert!(choice.source.starts_with("tuning database: 0.0030 ms"), "{}", choice.source);
        // Another norm's entry does not apply.
        let other = norm(7168, true, 64);
        assert!(choose(&other, &h200, Some(&db)).source.ends_with("(no tuning database entry)"));
    }
}
