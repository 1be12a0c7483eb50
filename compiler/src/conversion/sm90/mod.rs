//! `v3` kernels -> sm_90a: kernel templates written with the gpu/nvgpu/nvvm dialects, lowered inside
//! their `gpu.module` to the LLVM + NVVM dialects, translated to LLVM IR, then PTX
//! ([`crate::target::emit_ptx`]) and cubin ([`crate::target::assemble`], when ptxas is present).
//!
//! Templates so far: the dense GEMM ([`gemm`]: bf16 and fp8 block-scaled, TMA + mbarrier ring +
//! wgmma, warp-specialized, persistent, split K) and the row kernels ([`rows`]: embedding gather,
//! RMSNorm with its quantization). [`lower`] maps the `fused` stage's kernels onto them
//! ([`compile_model`]); the other kernel kinds are named as unsupported.

pub mod gemm;
pub mod host;
pub mod lower;
pub mod lower_sparse;
pub mod lower_train;
pub mod mla;
pub mod rows;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{Module, RegionLike};
use melior::pass::PassManager;
use melior::Context;

use crate::kernel_cache::KernelCache;
use crate::target::{self, GpuTarget, KernelResources};
use crate::toolchain::FoundTool;
use crate::tune::attention::{AttentionConfig, AttentionShape};
use crate::tune::rows::RowShape;
use v3c_runtime::lowering::Regime;

/// The passes that lower a `gpu.module` (gpu, nvgpu, nvvm, scf, arith, memref) to LLVM + NVVM.
pub const LOWER_GPU_MODULE: &str = "builtin.module(gpu.module(convert-nvgpu-to-nvvm, lower-affine, \
    convert-scf-to-cf, expand-strided-metadata, lower-affine, convert-gpu-to-nvvm, convert-nvvm-to-llvm, \
    reconcile-unrealized-casts, canonicalize, cse))";

/// Why a GPU kernel could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Sm90Error {
    /// The configuration was rejected (`problem` names the kernel and the limit).
    #[error("{problem}")]
    Config { kernel: String, problem: String },
    #[error("{kernel}: lowering to LLVM failed: {problem}")]
    Lowering { kernel: String, problem: String },
    #[error("{0}")]
    Ptx(#[from] target::PtxError),
    /// ptxas rejected the PTX, or could not be run (its message).
    #[error("{0}")]
    Assemble(String),
}

/// One kernel on its way down: the MLIR it was written in, the LLVM dialect, LLVM IR and PTX.
#[derive(Debug, Clone)]
pub struct GpuKernel {
    pub name: String,
    pub mlir: String,
    /// The module lowered to the LLVM and NVVM dialects; None when the PTX was taken from the
    /// kernel cache (which keeps only the PTX).
    pub llvm_dialect: Option<String>,
    pub ptx: String,
    /// Dynamic shared memory the launch must request, in bytes.
    pub shared_memory_bytes: usize,
    pub threads: usize,
    /// ptxas's cubin and resource report (registers, spills, static shared memory), when assembled.
    pub cubin: Option<Vec<u8>>,
    pub resources: Option<KernelResources>,
}

impl GpuKernel {
    /// Assembles the PTX with `ptxas` and keeps the cubin and ptxas's report.
    pub fn assemble(&mut self, target: &GpuTarget, ptxas: &FoundTool) -> Result<(), Sm90Error> {
        let start = std::time::Instant::now();
        let assembled =
            target::assemble(&self.ptx, &self.name, target, ptxas).map_err(|e| Sm90Error::Assemble(e.to_string()))?;
        tracing::debug!(kernel = self.name, ms = start.elapsed().as_secs_f64() * 1e3, "assembled");
        self.resources = assembled.kernels.into_iter().find(|k| k.name == self.name);
        self.cubin = Some(assembled.cubin);
        Ok(())
    }
}

/// Lowers `text` (a module holding one `gpu.module`) and returns the lowered gpu.module's body as a
/// builtin module (LLVM + NVVM dialects) plus its LLVM IR.
pub fn lower_gpu_module(context: &Context, text: &str, kernel: &str) -> Result<(String, String), Sm90Error> {
    let fail = |problem: String| Sm90Error::Lowering { kernel: kernel.into(), problem };
    let mut module = crate::mlir::parse_module(context, text, kernel).map_err(|e| fail(e.to_string()))?;
    melior::utility::register_all_passes();
    let manager = PassManager::new(context);
    melior::utility::parse_pass_pipeline(manager.as_operation_pass_manager(), LOWER_GPU_MODULE)
        .map_err(|e| fail(format!("pipeline: {e}")))?;
    manager.run(&mut module).map_err(|e| fail(format!("passes: {e}")))?;
    // The gpu.module's ops, printed into a builtin module that MLIR can translate to LLVM IR.
    let mut body = String::new();
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        if o.name().as_string_ref().as_str().ok() != Some("gpu.module") {
            continue;
        }
        let block = o.region(0).ok().and_then(|r| r.first_block()).ok_or_else(|| fail("empty gpu.module".into()))?;
        let mut inner = block.first_operation();
        while let Some(i) = inner {
            inner = i.next_in_block();
            body.push_str(&i.to_string());
            body.push('\n');
        }
    }
    // Dynamic shared memory must be the `.extern .shared` array that aliases the launch's dynamic
    // allocation; convert-gpu-to-nvvm declares it internal (NVPTX then demotes it to a 1-byte static
    // variable that static allocations like the mbarriers sit next to). 1024-byte alignment: the
    // 128-byte-swizzled TMA tiles and wgmma descriptors assume 1024-byte-aligned tile bases.
    let body = body.replace(
        "llvm.mlir.global internal @__dynamic_shmem__0() {addr_space = 3 : i32, alignment = 16 : i64}",
        "llvm.mlir.global external @__dynamic_shmem__0() {addr_space = 3 : i32, alignment = 1024 : i64}",
    );
    if body.contains("@__dynamic_shmem__0()") && !body.contains("llvm.mlir.global external @__dynamic_shmem__0()") {
        return Err(fail("the dynamic shared memory global is not declared as this lowering expects".into()));
    }
    let llvm_text = format!("module {{\n{body}}}\n");
    let llvm_module: Module =
        crate::mlir::parse_module(context, &llvm_text, kernel).map_err(|e| fail(e.to_string()))?;
    let ir = crate::mlir::translate_to_llvm_ir(context, &llvm_module, kernel).map_err(|e| fail(e.to_string()))?;
    Ok((llvm_text, ir))
}

/// Generates, lowers and compiles to PTX the GEMM kernel of `config` for `target`.
pub fn compile_gemm(context: &Context, config: &gemm::GemmConfig, target: &GpuTarget) -> Result<GpuKernel, Sm90Error> {
    let name = config.kernel_name();
    let mlir = gemm::emit(config, target);
    compile_module(context, name, mlir, config.shared_memory_bytes(), config.threads(), target)
}

/// Generates, lowers and compiles to PTX the MLA decode attention kernel of `config` for `target`.
pub fn compile_mla(
    context: &Context,
    config: &mla::MlaDecodeConfig,
    target: &GpuTarget,
) -> Result<GpuKernel, Sm90Error> {
    let mlir = mla::emit(config, target);
    compile_module(context, config.kernel_name(), mlir, config.shared_memory_bytes(), config.threads(), target)
}

/// Generates, lowers and compiles to PTX the MLA prefill attention kernel of `config` for `target`.
pub fn compile_mla_prefill(
    context: &Context,
    config: &mla::MlaPrefillConfig,
    target: &GpuTarget,
) -> Result<GpuKernel, Sm90Error> {
    let mlir = mla::emit_prefill(config, target);
    compile_module(context, config.kernel_name(), mlir, config.shared_memory_bytes(), config.threads(), target)
}

/// Generates, lowers and compiles to PTX the row kernel `kernel` for `target`.
pub fn compile_rows(context: &Context, kernel: &rows::RowKernel, target: &GpuTarget) -> Result<GpuKernel, Sm90Error> {
    compile_module(context, kernel.kernel_name(), kernel.emit_gpu(), 0, kernel.threads, target)
}

/// A template's `gpu.module` text (or why it was refused) down to PTX.
fn compile_module(
    context: &Context,
    name: String,
    mlir: Result<String, String>,
    shared_memory_bytes: usize,
    threads: usize,
    target: &GpuTarget,
) -> Result<GpuKernel, Sm90Error> {
    let mlir = mlir.map_err(|problem| Sm90Error::Config { kernel: name.clone(), problem })?;
    let kernel = |llvm_dialect, ptx| GpuKernel {
        name: name.clone(),
        mlir: mlir.clone(),
        llvm_dialect,
        ptx,
        shared_memory_bytes,
        threads,
        cubin: None,
        resources: None,
    };
    // The PTX of the same module lowered before (by this compiler, for this target) is taken from
    // the cache.
    let cache = crate::kernel_cache::gpu_cache();
    let key = cache.and_then(|_| KernelCache::ptx_key(&mlir, LOWER_GPU_MODULE, &format!("{target:?}")));
    let kept = cache.zip(key.as_deref());
    if let Some(ptx) = kept.and_then(|(cache, key)| cache.load_ptx(key)) {
        tracing::debug!(kernel = name, "lowered (PTX from the kernel cache)");
        crate::kernel_cache::count(false, true);
        return Ok(kernel(None, ptx));
    }
    let start = std::time::Instant::now();
    let (llvm_dialect, llvm_ir) = lower_gpu_module(context, &mlir, &name)?;
    let lowered = start.elapsed();
    let ptx = target::emit_ptx(&llvm_ir, &format!("{name}.ll"), target)?;
    tracing::debug!(
        kernel = name,
        mlir_to_llvm_ms = lowered.as_secs_f64() * 1e3,
        llvm_to_ptx_ms = (start.elapsed() - lowered).as_secs_f64() * 1e3,
        "lowered"
    );
    if let Some((cache, key)) = kept {
        crate::kernel_cache::count(false, false);
        if let Err(e) = cache.store_ptx(key, &ptx) {
            tracing::warn!("{name}: the PTX is not kept: {e}");
        }
    }
    Ok(kernel(Some(llvm_dialect), ptx))
}

/// Compiles `config`; with ptxas, assembles it and returns Err(why) when ptxas reports spills or
/// serialized its wgmma ([`unspilled`]).
pub fn compile_unspilled(
    context: &Context,
    config: &gemm::GemmConfig,
    target: &GpuTarget,
    ptxas: Option<&FoundTool>,
) -> Result<Result<GpuKernel, String>, Sm90Error> {
    unspilled(compile_gemm(context, config, target)?, target, ptxas)
}

/// `kernel`, assembled by `ptxas` when given: Err(why) when ptxas reports spills or serialized
/// its wgmma ([`crate::target::KernelResources::unfit`]: the static pruning of what fits on paper
/// but not in the registers, or not in the tensor cores' pipeline).
pub fn unspilled(
    mut kernel: GpuKernel,
    target: &GpuTarget,
    ptxas: Option<&FoundTool>,
) -> Result<Result<GpuKernel, String>, Sm90Error> {
    if let Some(ptxas) = ptxas {
        kernel.assemble(target, ptxas)?;
        if let Some(why) = kernel.resources.as_ref().and_then(|r| r.unfit()) {
            return Ok(Err(why));
        }
    }
    Ok(Ok(kernel))
}

/// An MLA attention kernel of either template ([`compile_mla`], [`compile_mla_prefill`]).
pub fn compile_attention(
    context: &Context,
    config: &AttentionConfig,
    target: &GpuTarget,
) -> Result<GpuKernel, Sm90Error> {
    match config {
        AttentionConfig::Decode(c) => compile_mla(context, c, target),
        AttentionConfig::Prefill(c) => compile_mla_prefill(context, c, target),
    }
}

/// Orders the configurations to try for each tunable kernel of a model ([`crate::tune::ModelChooser`]:
/// the cost model and the tuning database).
pub trait Chooser {
    /// GEMM `kernel` at `m` rows (decode: [`crate::tune::DECODE_M`], prefill: [`crate::tune::PREFILL_M`],
    /// or one of [`Chooser::prefill_rows`]).
    fn gemm(&mut self, kernel: &lower::GemmKernel, m: usize) -> Vec<gemm::GemmConfig>;
    /// The rows below [`Chooser::prefill_m`] at which a GEMM prefill runs gets kernels of its own,
    /// ascending ([`RegimeKernels::prefill_under`]); none: prefill's kernel at every size.
    fn prefill_rows(&self) -> Vec<usize> {
        Vec::new()
    }
    /// The rows a GEMM's prefill kernel is picked at: [`crate::tune::PREFILL_M`], or a plan's
    /// fewer rows ([`crate::tune::prefill_m`]).
    fn prefill_m(&self) -> usize {
        crate::tune::PREFILL_M
    }
    /// Whether prefill runs of `m` rows (one of [`Chooser::prefill_rows`]) are to launch GEMM
    /// `kernel`'s configuration `own` rather than `larger`, the one runs of the next larger bucket
    /// launch (each a kernel name); yes unless the chooser says the gain is not worth a kernel.
    fn worth_own(&mut self, _kernel: &lower::GemmKernel, _m: usize, _own: &str, _larger: &str) -> bool {
        true
    }
    /// The attention launch of fused kernel `fused` on `shape`.
    fn attention(&mut self, fused: &str, shape: &AttentionShape) -> Vec<AttentionConfig>;
    /// The reduction `name` (a fused row kernel, or `<fused>.<step>`) on `shape`.
    fn rows(&mut self, name: &str, shape: &RowShape) -> Vec<rows::RowKernel>;
}

/// The kernels of one GEMM (or a reduction the tuner widens) per regime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegimeKernels {
    pub decode: String,
    pub prefill: String,
    /// A GEMM's kernels for prefill runs of fewer rows: (the most rows each takes, kernel),
    /// ascending, each differing from the next larger one's ([`Chooser::prefill_rows`];
    /// [`v3c_runtime::lowering::KernelChoice::PerRegime`]).
    pub prefill_under: Vec<(usize, String)>,
    /// The regimes it was picked for, `[decode, prefill]` (a regime it never runs in names the
    /// other's kernel).
    pub runs: [bool; 2],
    /// The rows prefill's kernel was picked at ([`Chooser::prefill_m`]).
    pub prefill_m: usize,
}

/// The Ms of `[decode, prefill]` the reductions and routing are picked at.
const REGIME_MS: [usize; 2] = [crate::tune::DECODE_M, crate::tune::PREFILL_M];

impl RegimeKernels {
    /// The kernel of `regime` (prefill's at its most rows).
    pub fn of(&self, regime: v3c_runtime::lowering::Regime) -> &str {
        match regime {
            v3c_runtime::lowering::Regime::Decode => &self.decode,
            v3c_runtime::lowering::Regime::Prefill => &self.prefill,
        }
    }

    /// Per regime it was picked for: the regime, the M it was picked at, its kernel.
    pub fn picked(&self) -> Vec<(v3c_runtime::lowering::Regime, usize, &str)> {
        use v3c_runtime::lowering::Regime;
        let all = [
            (Regime::Decode, crate::tune::DECODE_M, self.decode.as_str()),
            (Regime::Prefill, self.prefill_m, self.prefill.as_str()),
        ];
        all.into_iter().zip(self.runs).filter_map(|(picked, runs)| runs.then_some(picked)).collect()
    }

    /// Every kernel it names.
    pub fn names(&self) -> Vec<&str> {
        let under = self.prefill_under.iter().map(|(_, k)| k.as_str());
        [self.decode.as_str(), self.prefill.as_str()].into_iter().chain(under).collect()
    }

    /// How the lowering names them.
    pub fn choice(&self) -> v3c_runtime::lowering::KernelChoice {
        v3c_runtime::lowering::KernelChoice::PerRegime {
            decode: self.decode.clone(),
            prefill: self.prefill.clone(),
            prefill_under: (self.prefill_under.iter())
                .map(|(rows, kernel)| v3c_runtime::lowering::RowsKernel { rows: *rows, kernel: kernel.clone() })
                .collect(),
        }
    }
}

/// Where MLA attention runs on sm_90a.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// On the tensor cores: prefill as flash attention in the naive form
    /// ([`lower::mla_prefill_steps`]: q, k, v and P in bf16, kv_b's up-projection of the latent in
    /// e4m3 — the fp8 graph, DeepSeek-V3's own naive-form inference numerics — or as one GEMM over
    /// bf16 hi + lo, the f32 graph); decode as split-K attention over bf16 pages in the absorbed form
    /// ([`lower::mla_decode_steps`]; kv_b e4m3 or, the f32 graph, bf16). Attention whose shapes the
    /// kernels do not take stays on the row.
    #[default]
    TensorCores,
    /// The CUDA-core row kernel in the absorbed form, in f32 as the reference computes it.
    Rows,
}

/// Where prefill's and decode's attention run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttentionKernels {
    pub prefill: AttentionKernel,
    pub decode: AttentionKernel,
    /// The caches the tensor-core attention reads are rows of the latent in e4m3 (`--kv-cache
    /// fp8`: [`v3c_runtime::plan::LATENT_FP8`], FlashMLA's 656-byte rows) rather than bf16.
    pub fp8_cache: bool,
}

/// How each kind of entry's caches store rows ([`rows::CacheRows`]): bf16 — or fp8 rows with
/// [`AttentionKernels::fp8_cache`] — where every attention of that kind in the module runs on the
/// tensor cores over them (prefill's, and the MTP draft's: the fp8 graph's; decode's as 64-row
/// pages), f32 otherwise. A module whose kernels would mix them with the f32 rows keeps f32 caches
/// and the rows for that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheFormats {
    pub prefill: rows::CacheRows,
    pub decode: rows::CacheRows,
    /// DeepSeek-V3.2's rows (the indexer's key beside the latent,
    /// [`lower_sparse::cache_formats`]): never pages.
    pub sparse: bool,
}

impl Default for CacheFormats {
    fn default() -> CacheFormats {
        CacheFormats { prefill: rows::CacheRows::F32, decode: rows::CacheRows::F32, sparse: false }
    }
}

impl CacheFormats {
    /// The caches `module`'s attention kernels take with `attention`'s choices.
    pub fn of(module: &Module, attention: AttentionKernels) -> CacheFormats {
        use rows::CacheRows::{Bf16, Fp8, F32};
        // DeepSeek-V3.2: rows with the indexer's key beside the latent.
        if lower_sparse::has_sparse_attention(module) {
            return lower_sparse::cache_formats(module, attention);
        }
        // Per kind (prefill, decode): attention kernels, those the tensor cores take over bf16
        // caches, and over fp8 rows.
        let mut counts = [(0, 0, 0); 2];
        let mut op = module.body().first_operation();
        while let Some(f) = op {
            op = f.next_in_block();
            if f.attribute(v3c_dialects::KERNEL_ATTR).is_err() {
                continue;
            }
            let Ok(row) = lower::row_of_kernel(&f) else { continue };
            let rows::RowOp::MlaDecode { prefill, .. } = row.kernel.op else { continue };
            let takes = |cache| match prefill {
                true => lower::mla_prefill_steps(&f, cache).is_ok(),
                false => lower::mla_decode_steps(&f, cache == Fp8).is_ok(),
            };
            let count = &mut counts[usize::from(!prefill)];
            *count = (count.0 + 1, count.1 + usize::from(takes(Bf16)), count.2 + usize::from(takes(Fp8)));
        }
        let format = |(n, bf16, fp8): (usize, usize, usize), kernel| match kernel == AttentionKernel::TensorCores {
            true if n > 0 && attention.fp8_cache && fp8 == n => Fp8,
            true if n > 0 && bf16 == n => Bf16,
            _ => F32,
        };
        CacheFormats {
            prefill: format(counts[0], attention.prefill),
            decode: format(counts[1], attention.decode),
            sparse: false,
        }
    }

    /// Decode's caches are pages the tensor-core attention reads in place.
    pub fn paged_decode(&self) -> bool {
        self.decode != rows::CacheRows::F32 && !self.sparse
    }
}

/// Kernel `f`'s row launch (`Err`: not a row kernel), the latent rows storing rows as the caches
/// do ([`CacheFormats`]).
pub fn row_launch(f: &OperationRef, caches: CacheFormats) -> Result<lower::RowLaunch, String> {
    let mut launch = lower::row_of_kernel(f)?;
    if let rows::RowOp::Sparse(rows::SparseRow::CacheWrite { ref mut bf16 }) = launch.kernel.op {
        if caches.paged_decode() {
            return Err("cache_write into paged cache rows".into());
        }
        *bf16 = caches.decode == rows::CacheRows::Bf16;
    }
    if let rows::RowOp::Latent { append, ref mut cache, .. } = launch.kernel.op {
        *cache = if append { caches.prefill } else { caches.decode };
        // Decode's pool of pages: the block table, the argument the plan appends
        // ([`crate::plan::page_decode_caches`]).
        if !append && cache.paged() {
            let args = launch.operands.iter().filter(|o| matches!(o, lower::Operand::Arg(_))).count();
            launch.operands.push(lower::Operand::Arg(args));
        }
    }
    Ok(launch)
}

/// Kernel `f` as tensor-core attention launches, if `attention` and `caches` put it there.
pub fn tensor_core_attention(
    f: &OperationRef,
    attention: AttentionKernels,
    caches: CacheFormats,
) -> Option<lower::Steps> {
    let prefill = attention.prefill == AttentionKernel::TensorCores;
    // Inference's prefill, else a training step's attention (forward or gradient).
    let steps = prefill
        .then(|| lower::mla_prefill_steps(f, caches.prefill).ok())
        .flatten()
        .or_else(|| prefill.then(|| lower_train::flash_attention_steps(f).and_then(Result::ok)).flatten());
    let fp8 = caches.decode == rows::CacheRows::Fp8;
    steps
        .or_else(|| caches.paged_decode().then(|| lower::mla_decode_steps(f, fp8).ok()).flatten())
        // DeepSeek-V3.2's: the attention over each query's selected rows.
        .or_else(|| {
            let decode = attention.decode == AttentionKernel::TensorCores;
            lower_sparse::sparse_attention_steps(f, prefill, decode, caches).ok()
        })
        // And its indexer's scores, on the tensor cores with the attention of their mode.
        .or_else(|| {
            let decode = attention.decode == AttentionKernel::TensorCores;
            lower_sparse::tensor_core_index_steps(f, prefill, decode, caches)
        })
}

/// Per fused kernel of a module, the regimes its GEMMs run in: [a decode entry calls it, another
/// entry (prefill, the MTP draft, a training step) does] — the runtime launches a GEMM's decode
/// kernel in the decode entry, its prefill kernel elsewhere.
pub type Regimes = std::collections::HashMap<String, [bool; 2]>;

/// The [`Regimes`] of `module`'s kernels, from the calls of its entry functions.
pub fn regimes(module: &Module) -> Regimes {
    let mut out = Regimes::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
            continue;
        }
        let entry = f.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
        let Some(block) = f.region(0).ok().and_then(|r| r.first_block()) else { continue };
        let mut call = block.first_operation();
        while let Some(c) = call {
            call = c.next_in_block();
            if let Ok(callee) = c.attribute("callee") {
                let kernel = callee.to_string().trim_start_matches('@').to_string();
                out.entry(kernel).or_default()[usize::from(entry != "decode")] = true;
            }
        }
    }
    out
}

/// The sm_90a lowering of a `fused`-stage module (the kernels of every entry point).
#[derive(Debug, Default)]
pub struct ModelKernels {
    /// How the caches store rows ([`CacheFormats`]): the plan's entries calling kernels that read
    /// or write them are to say so.
    pub caches: CacheFormats,
    /// Per fused kernel mapped onto the GEMM template: its GEMM and its [decode, prefill] kernels.
    pub gemms: Vec<(lower::GemmKernel, RegimeKernels)>,
    /// The distinct template kernels, compiled (and assembled when ptxas was given).
    pub kernels: Vec<GpuKernel>,
    /// Per fused kernel mapped onto a row kernel: (fused kernel, its launch).
    pub rows: Vec<(String, lower::RowLaunch)>,
    /// The [decode, prefill] kernels of the row kernels of [`Self::rows`] the tuner widens per
    /// regime (the reductions, [`crate::tune::rows`]), by fused kernel; the others launch their
    /// launch's kernel.
    pub row_regimes: std::collections::HashMap<String, RegimeKernels>,
    /// Per fused kernel lowered to several launches: (fused kernel, its steps, per step its
    /// [decode, prefill] kernels when it is a GEMM or a tuned reduction).
    pub compound: Vec<(String, lower::Steps, Vec<Option<RegimeKernels>>)>,
    /// Fused kernels with no sm_90a lowering yet: (name, why).
    pub unsupported: Vec<(String, String)>,
    /// Configurations passed over because ptxas reported spills or serialized their wgmma: (kernel,
    /// why).
    pub passed_over: Vec<(String, String)>,
    /// The kernels chosen per GEMM step (its description and regimes): a fused kernel's steps that
    /// repeat one GEMM (the experts' Wgrad, one per expert) are chosen once.
    chosen_gemms: std::collections::HashMap<String, RegimeKernels>,
    /// Kernels [`compile_model`] compiled ahead, in parallel, by name: each taken once, where the
    /// walk comes to it.
    ahead: std::collections::HashMap<String, Result<GpuKernel, Sm90Error>>,
    /// While [`compile_model`] plans (its first walk, which compiles nothing): the kernels the walk
    /// would compile, in order.
    planned: Option<Vec<Job>>,
}

/// A configuration to try: its register form ([`ModelKernels::first_unspilled`]) and the kernel.
type Preference = (String, Job);

/// A template kernel to compile, as data: any thread compiles it in an MLIR context of its own
/// ([`compile_model`] compiles the kernels its walk will take ahead, in parallel).
#[derive(Debug, Clone)]
enum Job {
    Gemm(gemm::GemmConfig),
    Attention(AttentionConfig),
    Rows(rows::RowKernel),
}

impl Job {
    fn name(&self) -> String {
        match self {
            Job::Gemm(c) => c.kernel_name(),
            Job::Attention(c) => c.kernel_name(),
            Job::Rows(k) => k.kernel_name(),
        }
    }

    /// Its `gpu.module` text's length (0 when the template refuses it): what lowering and ptxas
    /// take longest over (DeepSeek-V3's kernels' compile times follow their PTX's sizes with a
    /// correlation of 0.83), so [`compile_ahead`] starts the longest first.
    fn size(&self, target: &GpuTarget) -> usize {
        let text = match self {
            Job::Gemm(c) => gemm::emit(c, target),
            Job::Attention(AttentionConfig::Decode(c)) => mla::emit(c, target),
            Job::Attention(AttentionConfig::Prefill(c)) => mla::emit_prefill(c, target),
            Job::Rows(k) => k.emit_gpu(),
        };
        text.map_or(0, |t| t.len())
    }

    /// The kernel compiled and, with ptxas, assembled.
    fn build(&self, context: &Context, target: &GpuTarget, ptxas: Option<&FoundTool>) -> Result<GpuKernel, Sm90Error> {
        let mut kernel = match self {
            Job::Gemm(c) => compile_gemm(context, c, target),
            Job::Attention(c) => compile_attention(context, c, target),
            Job::Rows(k) => compile_rows(context, k, target),
        }?;
        if let Some(ptxas) = ptxas {
            kernel.assemble(target, ptxas)?;
        }
        Ok(kernel)
    }
}

impl ModelKernels {
    /// `job` compiled (with ptxas: and assembled): taken from the kernels compiled ahead
    /// ([`Self::ahead`]) when it is there. While planning ([`Self::planned`]) nothing is
    /// compiled: the job is noted, and an empty kernel of its name stands for it.
    fn build(
        &mut self,
        job: &Job,
        context: &Context,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        progress: &mut impl FnMut(&str),
    ) -> Result<GpuKernel, Sm90Error> {
        let name = job.name();
        if let Some(planned) = &mut self.planned {
            planned.push(job.clone());
            let (mlir, ptx) = (String::new(), String::new());
            let (shared_memory_bytes, threads) = (0, 0);
            let (llvm_dialect, cubin, resources) = (None, None, None);
            return Ok(GpuKernel { name, mlir, llvm_dialect, ptx, shared_memory_bytes, threads, cubin, resources });
        }
        if let Some(kernel) = self.ahead.remove(&name) {
            return kernel;
        }
        progress(&name);
        job.build(context, target, ptxas)
    }

    /// Compiles row kernel `k` (with ptxas: and assembles it) unless it is already compiled.
    fn row_kernel(
        &mut self,
        context: &Context,
        k: &rows::RowKernel,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        progress: &mut impl FnMut(&str),
    ) -> Result<(), Sm90Error> {
        if !self.kernels.iter().any(|c| c.name == k.kernel_name()) {
            let kernel = self.build(&Job::Rows(k.clone()), context, target, ptxas, progress)?;
            self.kernels.push(kernel);
        }
        Ok(())
    }

    /// The first of `preferences` (kernel names, their register forms, and how to compile each)
    /// that is compiled already or compiles (with ptxas: without spilling or serialized wgmma),
    /// compiled once across the model: its index. At most [`crate::tune::COMPILE_TRIES`] are
    /// compiled, and once one is passed over the others of its form are not tried (a GEMM's form:
    /// its configuration but for the ring depth, cluster and raster — what its registers hang on;
    /// another kernel's: its name), nor is a configuration passed over before. `Err` names
    /// `kernel` and `what` when none does, and each one tried with why.
    #[allow(clippy::too_many_arguments)]
    fn first_unspilled(
        &mut self,
        kernel: &str,
        what: &str,
        preferences: Vec<Preference>,
        context: &Context,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        progress: &mut impl FnMut(&str),
    ) -> Result<usize, Sm90Error> {
        let before = self.passed_over.len();
        let (mut tried, mut failed_forms) = (0, Vec::new());
        for (i, (form, job)) in preferences.into_iter().enumerate() {
            let name = job.name();
            if self.kernels.iter().any(|k| k.name == name) {
                return Ok(i);
            }
            if tried == crate::tune::COMPILE_TRIES {
                break;
            }
            if failed_forms.contains(&form) || self.passed_over.iter().any(|(n, _)| *n == name) {
                continue;
            }
            tried += 1;
            let compiled = self.build(&job, context, target, ptxas, progress)?;
            match compiled.resources.as_ref().and_then(|r| r.unfit()) {
                None => {
                    self.kernels.push(compiled);
                    return Ok(i);
                }
                Some(why) => {
                    self.passed_over.push((name, why));
                    failed_forms.push(form);
                }
            }
        }
        Err(Sm90Error::Config {
            kernel: kernel.to_string(),
            problem: format!(
                "{kernel}: none of the {tried} {what}configurations tried assembles without spilling or serialized \
                 wgmma ({})",
                self.passed_over[before..]
                    .iter()
                    .map(|(name, why)| format!("{name}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        })
    }

    /// The kernel of attention launch `step` of fused kernel `fused`: the first of `choose`'s
    /// configurations that compiles (with ptxas: without spilling), compiled once across the model;
    /// the step then names it.
    #[allow(clippy::too_many_arguments)]
    fn attention_kernel(
        &mut self,
        context: &Context,
        fused: &str,
        step: &mut lower::StepKernel,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        choose: &mut dyn Chooser,
        progress: &mut impl FnMut(&str),
    ) -> Result<(), Sm90Error> {
        let Some(shape) = AttentionShape::of_step(step) else { return Ok(()) };
        let (preferences, what) = (choose.attention(fused, &shape), format!("{} ", shape.signature()));
        let compiles = preferences.iter().map(|c| (c.kernel_name(), Job::Attention(*c))).collect();
        let chosen = preferences[self.first_unspilled(fused, &what, compiles, context, target, ptxas, progress)?];
        match (step, chosen) {
            (lower::StepKernel::MlaDecode(a), AttentionConfig::Decode(c)) => a.config = c,
            (lower::StepKernel::MlaPrefill(a), AttentionConfig::Prefill(c)) => a.config = c,
            (_, c) => unreachable!("{fused}: {} for another attention", c.kernel_name()),
        }
        Ok(())
    }

    /// [decode, prefill] kernels: `pick(m)` per regime it runs in (`regimes`, [`Regimes`]; none:
    /// both, as a kernel every entry calls) at that regime's M of `ms`; a regime it never runs in
    /// names the other's kernel.
    fn per_regime(
        regimes: [bool; 2],
        ms: [usize; 2],
        mut pick: impl FnMut(usize) -> Result<String, Sm90Error>,
    ) -> Result<RegimeKernels, Sm90Error> {
        let regimes = if regimes == [false, false] { [true, true] } else { regimes };
        let mut picked = Vec::new();
        for (m, runs) in ms.into_iter().zip(regimes) {
            picked.push(if runs { Some(pick(m)?) } else { None });
        }
        let (decode, prefill) = match &picked[..] {
            [Some(decode), Some(prefill)] => (decode.clone(), prefill.clone()),
            [Some(one), None] | [None, Some(one)] => (one.clone(), one.clone()),
            _ => unreachable!("at least one regime"),
        };
        Ok(RegimeKernels { decode, prefill, prefill_under: Vec::new(), runs: regimes, prefill_m: ms[1] })
    }

    /// The [decode, prefill] kernels of GEMM `g`: per regime it runs in the first of `choose`'s
    /// configurations that compiles (with ptxas: without spilling), compiled once across the model.
    #[allow(clippy::too_many_arguments)]
    fn gemm_kernels(
        &mut self,
        context: &Context,
        g: &lower::GemmKernel,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        choose: &mut dyn Chooser,
        regimes: [bool; 2],
        progress: &mut impl FnMut(&str),
    ) -> Result<RegimeKernels, Sm90Error> {
        let key = format!("{g:?} {regimes:?}");
        if let Some(chosen) = self.chosen_gemms.get(&key) {
            return Ok(chosen.clone());
        }
        let smaller = choose.prefill_rows();
        // The first of `preferences` that compiles (with ptxas: without spilling).
        let mut compile = |preferences: Vec<gemm::GemmConfig>| -> Result<String, Sm90Error> {
            let compiles = preferences.iter().map(|c| (c.register_form(), Job::Gemm(*c))).collect();
            let i = self.first_unspilled(&g.kernel, "", compiles, context, target, ptxas, progress)?;
            Ok(preferences[i].kernel_name())
        };
        let ms = [crate::tune::DECODE_M, choose.prefill_m()];
        let mut chosen = Self::per_regime(regimes, ms, |m| compile(choose.gemm(g, m)))?;
        // Prefill's smaller runs, from the most rows down: a bound gets a kernel of its own where
        // the chooser's first is not the one the next larger bound (or prefill's own) launches and
        // is worth it; nothing is compiled for a bound that keeps the larger one's.
        if chosen.runs[1] {
            let mut under: Vec<(usize, String)> = Vec::new();
            for m in smaller.into_iter().rev() {
                let preferences = choose.gemm(g, m);
                let larger = under.last().map_or(&chosen.prefill, |(_, k)| k).clone();
                let Some(first) = preferences.first().map(|c| c.kernel_name()) else { continue };
                if first == larger || !choose.worth_own(g, m, &first, &larger) {
                    continue;
                }
                let kernel = compile(preferences)?;
                if kernel != larger {
                    under.push((m, kernel));
                }
            }
            under.reverse();
            chosen.prefill_under = under;
        }
        self.chosen_gemms.insert(key, chosen.clone());
        Ok(chosen)
    }

    /// Greedy sampling's argmax over `vocab` columns (the runtime launches it on any entry's
    /// logits), its width as `choose` orders them for decode's rows ([`ARGMAX`]); the first that
    /// compiles (with ptxas: without spilling).
    pub fn sampling_argmax(
        &mut self,
        context: &Context,
        vocab: usize,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        choose: &mut dyn Chooser,
    ) -> Result<rows::RowKernel, Sm90Error> {
        let default = rows::RowKernel::new(rows::RowOp::Argmax, vocab, "f32");
        let shape = RowShape::of(&default, crate::tune::DECODE_M).expect("the argmax is tuned");
        self.first_row_kernel(context, ARGMAX, &shape, target, ptxas, choose, &mut |_| {})
    }

    /// A row kernel `op` over logits of `vocab` columns that the runtime launches on any entry's
    /// logits, compiled: sampling at a temperature ([`rows::RowOp::Sample`]: the host sampler's
    /// draw, bit for bit; then the logits are not read back), 256 threads, fewer where a
    /// vocabulary's block sums would not fit shared memory; or scoring ([`rows::RowOp::Scores`]:
    /// what log-probabilities need, the host's bits), 256 threads, a running sum each.
    pub fn logits_kernel(
        &mut self,
        context: &Context,
        op: rows::RowOp,
        vocab: usize,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
    ) -> Result<rows::RowKernel, Sm90Error> {
        let shrinks = op == rows::RowOp::Sample;
        let mut k = rows::RowKernel::new(op, vocab, "f32");
        while shrinks && k.threads > 32 && k.validate(target).is_err() {
            k.threads /= 2;
        }
        k.validate(target).map_err(|problem| Sm90Error::Config { kernel: k.kernel_name(), problem })?;
        self.row_kernel(context, &k, target, ptxas, &mut |_| {})?;
        Ok(k)
    }

    /// A training step's optimizer on the device ([`OPTIMIZER_CHUNK`] elements a block): the
    /// gradients summed over windows, their squares per block, AdamW
    /// ([`rows::TrainRow::GradAccum`], [`rows::TrainRow::SumSquares`], [`rows::TrainRow::AdamW`]).
    pub fn training_optimizer(
        &mut self,
        context: &Context,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
    ) -> Result<v3c_runtime::lowering::OptimizerSpec, Sm90Error> {
        use rows::TrainRow;
        let kernel = |op| rows::RowKernel::new(rows::RowOp::Train(op), OPTIMIZER_CHUNK, "f32");
        let [first, next, squares, adamw] = [
            TrainRow::GradAccum { first: true },
            TrainRow::GradAccum { first: false },
            TrainRow::SumSquares,
            TrainRow::AdamW,
        ]
        .map(kernel);
        for k in [&first, &next, &squares, &adamw] {
            self.row_kernel(context, k, target, ptxas, &mut |_| {})?;
        }
        Ok(v3c_runtime::lowering::OptimizerSpec {
            chunk: OPTIMIZER_CHUNK,
            accumulate_first: first.kernel_name(),
            accumulate: next.kernel_name(),
            squares: squares.kernel_name(),
            adamw: adamw.kernel_name(),
        })
    }

    /// The first of the widths `choose` orders for reduction `shape` of `name` that compiles (with
    /// ptxas: without spilling), compiled once across the model.
    #[allow(clippy::too_many_arguments)]
    fn first_row_kernel(
        &mut self,
        context: &Context,
        name: &str,
        shape: &RowShape,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        choose: &mut dyn Chooser,
        progress: &mut impl FnMut(&str),
    ) -> Result<rows::RowKernel, Sm90Error> {
        let preferences = choose.rows(name, shape);
        if preferences.is_empty() {
            // No width fits the target: say why the template's own width does not.
            let why = shape.kernel.validate(target).err().unwrap_or_else(|| "no width fits".into());
            return Err(Sm90Error::Config {
                kernel: name.to_string(),
                problem: format!("{name}: no width of {} fits {}: {why}", shape.signature(), target.name),
            });
        }
        let compiles = preferences.iter().map(|r| (r.kernel_name(), Job::Rows(r.clone()))).collect();
        let what = format!("{} ", shape.signature());
        let i = self.first_unspilled(name, &what, compiles, context, target, ptxas, progress)?;
        Ok(preferences[i].clone())
    }

    /// Row kernel `k` of `name` (a fused kernel, or a step of one): a reduction the tuner widens
    /// ([`crate::tune::rows`]) gets [decode, prefill] kernels as a GEMM does (`Some`), and so does
    /// routing (decode's a token a block, prefill's `k`'s several); any other is compiled as it is
    /// (`None`).
    #[allow(clippy::too_many_arguments)]
    fn row_kernels(
        &mut self,
        context: &Context,
        name: &str,
        k: &rows::RowKernel,
        target: &GpuTarget,
        ptxas: Option<&FoundTool>,
        choose: &mut dyn Chooser,
        regimes: [bool; 2],
        progress: &mut impl FnMut(&str),
    ) -> Result<Option<RegimeKernels>, Sm90Error> {
        // Routing: decode's few tokens a block (its logits' blocks spread over splits and experts
        // too), prefill's several (each gate value read once for them).
        if matches!(k.op, rows::RowOp::Route { .. } | rows::RowOp::RouteLogits { .. }) {
            return Self::per_regime(regimes, REGIME_MS, |m| {
                let mut op = k.op;
                if m == crate::tune::DECODE_M {
                    match &mut op {
                        rows::RowOp::Route { tokens, .. } => *tokens = 1,
                        rows::RowOp::RouteLogits { tokens, .. } => *tokens = rows::ROUTE_DECODE_TOKENS,
                        _ => {}
                    }
                }
                let variant = rows::RowKernel { op, ..k.clone() };
                self.row_kernel(context, &variant, target, ptxas, progress)?;
                Ok(variant.kernel_name())
            })
            .map(Some);
        }
        if RowShape::of(k, 1).is_none() {
            self.row_kernel(context, k, target, ptxas, progress)?;
            return Ok(None);
        }
        Self::per_regime(regimes, REGIME_MS, |m| {
            let shape = RowShape::of(k, m).expect("a tuned row kernel");
            Ok(self.first_row_kernel(context, name, &shape, target, ptxas, choose, progress)?.kernel_name())
        })
        .map(Some)
    }
}

/// The kernel `v3c compile` launches for GEMM `g` at `m` rows (decode: [`crate::tune::DECODE_M`],
/// prefill: [`crate::tune::PREFILL_M`]) on `device` without a tuning database: the first of the
/// cost model's configurations that compiles (with ptxas: assembles without spills or serialized
/// wgmma), tried as [`compile_model`] tries them; with where the choice came from and the
/// configurations passed over before it (name, why). `v3c dump-ir` shows this one. At prefill's
/// M, also the kernels of shorter prefill runs ([`RegimeKernels::prefill_under`], for a plan of
/// that many rows): per bucket kept, the most rows it takes, its kernel and where it came from.
pub fn gemm_as_compiled(
    context: &Context,
    g: &lower::GemmKernel,
    m: usize,
    device: &crate::target::DeviceModel,
    ptxas: Option<&FoundTool>,
) -> Result<GemmAsCompiled, Sm90Error> {
    let mut choose = crate::tune::ModelChooser::new(device, None);
    let mut out = ModelKernels::default();
    let decode = m == crate::tune::DECODE_M;
    if !decode {
        choose.prefill_m = m;
        choose.prefill_rows = crate::tune::prefill_rows(m);
    }
    let regimes = [decode, !decode];
    let kernels = out.gemm_kernels(context, g, &device.target, ptxas, &mut choose, regimes, &mut |_| {})?;
    let smaller = (kernels.prefill_under.iter())
        .map(|(rows, name)| (*rows, name.clone(), choose.source_of(&g.kernel, *rows, name).unwrap_or_default()))
        .collect();
    let name = if decode { kernels.decode } else { kernels.prefill };
    let source = choose.source_of(&g.kernel, m, &name).unwrap_or_default();
    let kernel = out.kernels.into_iter().find(|k| k.name == name).expect("the kernel chosen is compiled");
    Ok(GemmAsCompiled { kernel, source, passed_over: out.passed_over, smaller })
}

/// What [`gemm_as_compiled`] found.
pub struct GemmAsCompiled {
    pub kernel: GpuKernel,
    /// Where the choice came from.
    pub source: String,
    /// Configurations passed over before it: (name, why).
    pub passed_over: Vec<(String, String)>,
    /// Prefill's: the kernels of shorter runs, (the most rows each takes, name, source).
    pub smaller: Vec<(usize, String, String)>,
}

/// What the tuner and the manifest call the sampling argmax ([`ModelKernels::sampling_argmax`]).
pub const ARGMAX: &str = "argmax";

/// Elements of a flat tensor one block of the optimizer's kernels takes (16 a thread of 256).
pub const OPTIMIZER_CHUNK: usize = 4096;

/// Maps every kernel of `module` (stage `fused`) onto the sm_90a templates, compiling each
/// distinct template kernel once. `choose` orders the configurations to try for a GEMM kernel at
/// `m` rows (decode: [`crate::tune::DECODE_M`], prefill: [`crate::tune::PREFILL_M`]), for an
/// attention kernel and for a reduction's width per regime; with ptxas the first that assembles
/// without spilling is taken, without it the first. `progress` is told each kernel name as it is
/// compiled. `attention` picks where attention runs. A kernel whose row template does not take its
/// shapes is named in `unsupported` with the template's reason, as one without a template is.
///
/// The kernels are compiled on `jobs` threads (each with an MLIR context of its own): a first walk
/// over the module compiles nothing and notes what the second will compile when each first
/// preference assembles; those are compiled in parallel, and the second walk takes them as it comes
/// to them (compiling inline only what the first could not foresee: the next preference after one
/// ptxas passes over). `choose` is asked each question once (its answers are kept for the second
/// walk), and `progress` may be called from any of the threads. `then` runs after each walk on its
/// result (with the same chooser), so that kernels the caller compiles beside the model's are
/// compiled ahead too; its value from the second walk is returned. The second walk alone reports
/// errors: a first that fails compiles nothing ahead.
#[allow(clippy::too_many_arguments)]
pub fn compile_model<T>(
    context: &Context,
    module: &Module,
    target: &GpuTarget,
    ptxas: Option<&FoundTool>,
    attention: AttentionKernels,
    choose: &mut dyn Chooser,
    jobs: usize,
    progress: impl Fn(&str) + Sync,
    mut then: impl FnMut(&mut ModelKernels, &mut dyn Chooser) -> Result<T, Sm90Error>,
) -> Result<(ModelKernels, T), Sm90Error> {
    let mut choose = KeptAnswers { inner: choose, answers: Default::default() };
    let mut ahead = std::collections::HashMap::new();
    if jobs > 1 {
        let mut plan = ModelKernels { planned: Some(Vec::new()), ..ModelKernels::default() };
        let planned = walk(context, module, target, None, attention, &mut choose, &mut plan, &mut |_| {})
            .and_then(|()| then(&mut plan, &mut choose));
        if planned.is_ok() {
            ahead = compile_ahead(plan.planned.unwrap_or_default(), jobs, target, ptxas, &progress);
        }
    }
    let mut out = ModelKernels { ahead, ..ModelKernels::default() };
    walk(context, module, target, ptxas, attention, &mut choose, &mut out, &mut |name| progress(name))?;
    let value = then(&mut out, &mut choose)?;
    out.ahead.clear();
    Ok((out, value))
}

/// The [`Chooser`]'s answers by question: [`compile_model`]'s second walk asks the same questions
/// as its first, and the chooser (which records where each choice came from) hears each once.
struct KeptAnswers<'c> {
    inner: &'c mut dyn Chooser,
    answers: std::collections::HashMap<String, Answer>,
}

#[derive(Clone)]
enum Answer {
    Gemm(Vec<gemm::GemmConfig>),
    Attention(Vec<AttentionConfig>),
    Rows(Vec<rows::RowKernel>),
}

impl Chooser for KeptAnswers<'_> {
    fn prefill_rows(&self) -> Vec<usize> {
        self.inner.prefill_rows()
    }

    fn prefill_m(&self) -> usize {
        self.inner.prefill_m()
    }

    fn worth_own(&mut self, kernel: &lower::GemmKernel, m: usize, own: &str, larger: &str) -> bool {
        self.inner.worth_own(kernel, m, own, larger)
    }

    fn gemm(&mut self, kernel: &lower::GemmKernel, m: usize) -> Vec<gemm::GemmConfig> {
        let inner = &mut self.inner;
        match self.answers.entry(format!("gemm {kernel:?} {m}")).or_insert_with(|| Answer::Gemm(inner.gemm(kernel, m)))
        {
            Answer::Gemm(configs) => configs.clone(),
            _ => unreachable!("a GEMM's question"),
        }
    }

    fn attention(&mut self, fused: &str, shape: &AttentionShape) -> Vec<AttentionConfig> {
        let inner = &mut self.inner;
        let key = format!("attention {fused} {shape:?}");
        match self.answers.entry(key).or_insert_with(|| Answer::Attention(inner.attention(fused, shape))) {
            Answer::Attention(configs) => configs.clone(),
            _ => unreachable!("an attention launch's question"),
        }
    }

    fn rows(&mut self, name: &str, shape: &RowShape) -> Vec<rows::RowKernel> {
        let inner = &mut self.inner;
        match self
            .answers
            .entry(format!("rows {name} {shape:?}"))
            .or_insert_with(|| Answer::Rows(inner.rows(name, shape)))
        {
            Answer::Rows(kernels) => kernels.clone(),
            _ => unreachable!("a reduction's question"),
        }
    }
}

/// `planned` compiled (with ptxas: and assembled) on up to `jobs` threads, each in an MLIR context
/// of its own, by name (the first of a name; a failure is kept for the walk that comes to it).
fn compile_ahead(
    planned: Vec<Job>,
    jobs: usize,
    target: &GpuTarget,
    ptxas: Option<&FoundTool>,
    progress: &(impl Fn(&str) + Sync),
) -> std::collections::HashMap<String, Result<GpuKernel, Sm90Error>> {
    let mut seen = std::collections::HashSet::new();
    let mut planned: Vec<Job> = planned.into_iter().filter(|j| seen.insert(j.name())).collect();
    // The longest first: the last to finish is then a short one.
    planned.sort_by_cached_key(|j| std::cmp::Reverse(j.size(target)));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(std::collections::HashMap::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(planned.len()) {
            scope.spawn(|| {
                let context = crate::mlir::new_context();
                while let Some(job) = planned.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    let name = job.name();
                    progress(&name);
                    let kernel = job.build(&context, target, ptxas);
                    done.lock().unwrap_or_else(|e| e.into_inner()).insert(name, kernel);
                }
            });
        }
    });
    done.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// One walk of [`compile_model`] over `module`'s kernels, into `out`.
#[allow(clippy::too_many_arguments)]
fn walk(
    context: &Context,
    module: &Module,
    target: &GpuTarget,
    ptxas: Option<&FoundTool>,
    attention: AttentionKernels,
    choose: &mut dyn Chooser,
    out: &mut ModelKernels,
    mut progress: &mut dyn FnMut(&str),
) -> Result<(), Sm90Error> {
    let caches = CacheFormats::of(module, attention);
    let regimes = regimes(module);
    // A training step with its attention in bf16 has its f32 matmuls on the tensor cores too.
    let bf16_step = attention.prefill == AttentionKernel::TensorCores && lower_train::has_flash_attention(module);
    out.caches = caches;
    // DeepSeek-V3.2's prefill caches in bf16 rows: the kernels appending to them.
    let bf16_appends = match caches.sparse && caches.prefill == rows::CacheRows::Bf16 {
        true => lower_sparse::cache_appends(module).unwrap_or_default(),
        false => Default::default(),
    };
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_err() {
            continue;
        }
        let fused = f.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
        let append = match bf16_appends.contains(&fused) {
            true => match lower_sparse::bf16_append_steps(&f) {
                Ok(steps) => Some(steps),
                Err(why) => {
                    out.unsupported.push((fused, why));
                    continue;
                }
            },
            false => None,
        };
        let tensor_core_attention = append
            .or_else(|| tensor_core_attention(&f, attention, caches))
            .or_else(|| bf16_step.then(|| lower_train::bf16_matmul_steps(&f).and_then(Result::ok)).flatten());
        let row = row_launch(&f, caches);
        let runs = regimes.get(&fused).copied().unwrap_or_default();
        if let (Ok(launch), None) = (&row, &tensor_core_attention) {
            let launch = launch.clone();
            let tuned =
                match out.row_kernels(context, &fused, &launch.kernel, target, ptxas, choose, runs, &mut progress) {
                    Err(Sm90Error::Config { problem, .. }) => {
                        let why = problem.strip_prefix(&format!("{fused}: ")).unwrap_or(&problem).to_string();
                        out.unsupported.push((fused, why));
                        continue;
                    }
                    tuned => tuned?,
                };
            if let Some(kernels) = tuned {
                out.row_regimes.insert(fused.clone(), kernels);
            }
            out.rows.push((fused, launch));
            continue;
        }
        if let Some(mut steps) = tensor_core_attention.or_else(|| lower::steps_of_kernel(&f).ok()) {
            // Steps of one regime: left out where no entry of theirs calls the kernel; otherwise
            // chosen for their regime alone.
            let both = if runs == [false, false] { [true, true] } else { runs };
            let step_runs = |only: Option<Regime>| match only {
                None => runs,
                Some(r) => {
                    let mut one = [false; 2];
                    one[r.index()] = true;
                    one
                }
            };
            steps.retain(|s| s.only.is_none_or(|r| both[r.index()]));
            let mut picked = Vec::new();
            for (i, step) in steps.steps.iter_mut().enumerate() {
                let runs = step_runs(step.only);
                match &step.kernel {
                    lower::StepKernel::Row(k) => {
                        let name = format!("{fused}.{i}");
                        match out.row_kernels(context, &name, k, target, ptxas, choose, runs, &mut progress) {
                            Err(Sm90Error::Config { problem, .. }) => {
                                out.unsupported.push((fused.clone(), problem));
                                break;
                            }
                            kernels => picked.push(kernels?),
                        }
                    }
                    lower::StepKernel::Gemm(g) => {
                        picked.push(Some(out.gemm_kernels(context, g, target, ptxas, choose, runs, &mut progress)?))
                    }
                    lower::StepKernel::MlaPrefill(_) | lower::StepKernel::MlaDecode(_) => {
                        out.attention_kernel(context, &fused, &mut step.kernel, target, ptxas, choose, &mut progress)?;
                        picked.push(None);
                    }
                }
            }
            if picked.len() == steps.steps.len() {
                out.compound.push((fused, steps, picked));
            }
            continue;
        }
        match lower::gemm_of_kernel(&f) {
            Ok(g) => {
                let kernels = out.gemm_kernels(context, &g, target, ptxas, choose, runs, &mut progress)?;
                out.gemms.push((g, kernels));
            }
            // A kernel that starts like a row kernel is named by the row template's reason.
            Err(why) => {
                let why = match row {
                    Err(row_why) if ["embed", "rms_norm"].iter().any(|k| row_why.starts_with(k)) => row_why,
                    _ => why,
                };
                out.unsupported.push((fused, why));
            }
        }
    }
    Ok(())
}
