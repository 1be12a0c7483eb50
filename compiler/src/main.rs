//! `v3c`: the DeepSeek-V3 compiler's command line; see `v3c --help`.

// The arguments' doc comments are clap's help text, written for a terminal (`<dir>`, `[N]`).
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use v3c_compiler::{doctor, target::GpuTarget};
use v3c_runtime::cli::{plan_rows, positive};

mod commands;

/// Compile DeepSeek-V3 model graphs through MLIR into PTX kernels for NVIDIA Hopper (sm_90a).
///
/// A model (the built-in `deepseek-v3` definition, the small `deepseek-v3-tiny`, DeepSeek-V2's
/// `deepseek-v2-lite`, DeepSeek-V3.2's `deepseek-v3.2` with sparse attention, or a Hugging Face
/// checkpoint directory of any of these architectures) is imported into the `v3` MLIR dialect, fused into kernels (MLA low-rank
/// projections, MoE gather/scatter, FP8 block-scaled matmuls), lowered to PTX, and written as an
/// artifact directory that `v3r` runs. Every stage can be dumped (`v3c dump-ir`, V3C_DUMP_DIR).
#[derive(Parser)]
#[command(name = "v3c", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Examples:\n  v3c doctor                                        # what this machine can do\n  v3c compile --model deepseek-v3 --target sm_90a --out out/deepseek-v3\n  v3c dump-ir --model deepseek-v3-tiny --stage v3 --entry decode\n  v3c init-weights --model deepseek-v3-tiny --out ckpt/ [--fp8]\n  v3c logits --model-dir ckpt/ --tokens \"0 3 17\" --backend reference --out logits.safetensors\n  v3c run --model-dir ckpt/ --prompt-tokens \"0 3 17\" --max-new-tokens 8\n  v3c compile --model ckpt/ --target cpu --speculative --out out/spec   # + the MTP draft entry\n  v3c tune --model deepseek-v3 --emit-candidates cands/   # for `v3r tune` on a GPU machine\n  v3c emulate out/small --weights ckpt/ --tokens \"0 3 17\" --out l.safetensors --dump dump/\n  v3c cache --trim 500M                              # keep the 500 MiB of kernels used last\n\nStages, in order: v3, fused, cpu, gpu, nvvm, ptx, plan.\nEnvironment: V3C_DUMP_DIR=<dir> dumps every stage; V3C_LOG=<filter> sets logging;\nV3C_KERNEL_CACHE=<dir>|off moves or disables the kernel cache; V3C_KERNEL_CACHE_MAX=2G caps it;\nV3C_PTXAS / V3C_CUOBJDUMP / V3C_NVDISASM name tools not in .tools/bin or on PATH."
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); V3C_LOG=<filter> overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a model for a GPU target into an artifact directory (kernels, launch plan, manifest).
    Compile(CompileArgs),
    /// Print the IR of one pipeline stage (or run stages from a given IR file).
    DumpIr(DumpIrArgs),
    /// Compute logits for a token sequence and write them as safetensors.
    Logits(LogitsArgs),
    /// Generate tokens from a prompt (greedy, or temperature/top-p with a seed).
    Run(RunArgs),
    /// Autotune kernels for the GPU of this machine (or emit candidates for another machine).
    Tune(TuneArgs),
    /// Write a random checkpoint (HF layout, optionally fp8) for tests and demos.
    InitWeights(InitWeightsArgs),
    /// Train a checkpoint on a file of token ids (next-token loss, AdamW, loss-free balancing).
    Train(TrainArgs),
    /// Report LLVM/MLIR, PTX and cubin generation, CUDA tools, driver and GPUs; works without a GPU.
    Doctor(DoctorArgs),
    /// Show the kernel cache (CPU kernels, PTX and cubins kept between runs), or trim or clear it.
    ///
    /// The cache is held to V3C_KERNEL_CACHE_MAX (default 2G; `unlimited` for no limit): after each
    /// command that may store kernels, the least recently used entries are removed until the rest fit
    /// (entries used in the last ten minutes are spared).
    /// V3C_KERNEL_CACHE=<dir> moves the cache, =off turns it off.
    Cache(CacheArgs),
    /// Run a GPU artifact's launches on this CPU (row kernels through their CPU lowering, GEMMs from
    /// their parameters): the logits a GPU must give, and with --dump every launch's buffers, for
    /// `benches/device/dump_compare.py` against `V3R_DUMP_DIR=... v3r logits` on the GPU.
    Emulate(EmulateArgs),
}

#[derive(Args)]
struct EmulateArgs {
    /// GPU artifact directory (`v3c compile --target sm_90a --out`).
    artifact: PathBuf,
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// Token ids separated by spaces: one prefill from position 0 (at most the plan's rows); for a
    /// training-step artifact, one window: its tokens and their targets (as `v3r train` cuts them).
    #[arg(long, value_name = "IDS")]
    tokens: String,
    /// Output safetensors file (`logits` F32 [tokens, vocab]; a training step: `loss` and every
    /// `grad.*`).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Write every launch's buffers (but weights) here, with an index.jsonl.
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
    /// Then this many greedy decode steps, as `v3r run --max-new-tokens N+1` takes them (dumped too).
    #[arg(long, value_name = "N", default_value_t = 0)]
    decode_steps: usize,
    /// Run the kernels' PTX instruction by instruction in a simulator of sm_90a (threads, shared
    /// memory, barriers, mbarriers, TMA, wgmma) instead of their CPU lowering and their semantics:
    /// the GPU code itself checked, every global access inside an allocation. Slow: small models.
    #[arg(long)]
    ptx: bool,
    /// With --ptx: also check every launch for data races on shared memory (happens-before over
    /// barriers, mbarriers, the cluster barrier and wgmma; and a proxy fence before a wgmma reads
    /// what threads wrote) and on global memory between CTAs (ordered only by a GPU-scope fence
    /// then an atomic, as split-K's hand-off). A race fails the run naming both accesses' lines.
    /// Slower still.
    #[arg(long, requires = "ptx")]
    races: bool,
    /// With --ptx: under the profile, each kernel's N loads and stores that waste the most, by
    /// line of its PTX (kernels/NAME.ptx): global sector bytes moved but not asked for
    /// (uncoalesced), shared wavefronts past the fewest the requests could take (bank conflicts).
    #[arg(long, value_name = "N", requires = "ptx")]
    worst_accesses: Option<usize>,
}

/// Pipeline stages, in order; the names are stable (dump folders and snapshots use them).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Stage {
    V3,
    Fused,
    Cpu,
    Gpu,
    Nvvm,
    Ptx,
    Plan,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::V3 => "v3",
            Stage::Fused => "fused",
            Stage::Cpu => "cpu",
            Stage::Gpu => "gpu",
            Stage::Nvvm => "nvvm",
            Stage::Ptx => "ptx",
            Stage::Plan => "plan",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Entry {
    Prefill,
    Decode,
    /// The training step: forward, losses (next-token, MTP, balance) and every gradient.
    TrainStep,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Backend {
    /// The f32 reference interpreter (the oracle).
    Reference,
    /// Fused kernels JIT-compiled for this CPU.
    Cpu,
    /// The model compiled for sm_90a into a scratch artifact and run on this machine's GPU (what
    /// `v3c compile --target sm_90a` then `v3r` do).
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Precision {
    /// Weights dequantized to f32, activations in f32 (the oracle).
    F32,
    /// Activations quantized 1x128 to e4m3 before fp8-weight GEMMs, block-scaled accumulation.
    Fp8,
}

/// `compile --prefill-attention`, `--decode-attention`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AttentionKernel {
    TensorCores,
    Rows,
}

/// `compile --kv-cache`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KvCache {
    Bf16,
    Fp8,
}

impl AttentionKernel {
    fn kernel(self) -> v3c_compiler::conversion::sm90::AttentionKernel {
        match self {
            AttentionKernel::TensorCores => v3c_compiler::conversion::sm90::AttentionKernel::TensorCores,
            AttentionKernel::Rows => v3c_compiler::conversion::sm90::AttentionKernel::Rows,
        }
    }
}

impl Precision {
    fn model(self) -> v3c_models::Precision {
        match self {
            Precision::F32 => v3c_models::Precision::F32,
            Precision::Fp8 => v3c_models::Precision::Fp8,
        }
    }
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

#[derive(Args)]
struct ModelArg {
    /// A built-in model (deepseek-v3, deepseek-v3-tiny, deepseek-v2-lite, deepseek-v3.2) or a
    /// checkpoint directory with config.json (model_type deepseek_v3, deepseek_v2 or deepseek_v32).
    #[arg(long, value_name = "NAME|DIR", default_value = "deepseek-v3")]
    model: String,
}

#[derive(Args)]
struct CompileArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Target: a GPU (sm_90a) or `cpu` (this machine: kernels JIT-compiled through MLIR). Compiled
    /// kernels (CPU machine code; GPU PTX and ptxas's cubins) are kept in the content-addressed
    /// kernel cache, V3C_KERNEL_CACHE=<dir>|off.
    #[arg(long, value_name = "TARGET", default_value = "sm_90a", value_parser = parse_compile_target)]
    target: CompileTarget,
    /// Most rows (tokens of one launch) the plan's arena is sized for (smaller runs fit it):
    /// a prefill's chunk of the prompt, a decode's sequences (unless --max-batch). Default: for a
    /// GPU, prompts in chunks of 4096 tokens (the rows its prefill kernels are picked and tuned
    /// for) and decode steps of 64 sequences; for the cpu target and --train windows, 64. A GPU's
    /// prefill GEMMs are picked for N's power of two (64 to 4096) and again for each smaller one
    /// from 64: a shorter chunk launches the kernels of the smallest that holds it.
    #[arg(long, value_parser = plan_rows, value_name = "N")]
    max_rows: Option<usize>,
    /// Most sequences one decode step takes (default: --max-rows when given, else 64). With a
    /// larger --max-rows, prompts are prefilled in long chunks without planning (and holding
    /// caches for) a decode of as many sequences.
    #[arg(long, value_parser = plan_rows, value_name = "N")]
    max_batch: Option<usize>,
    /// Longest context (KV cache rows) the plan's arena is sized for (shorter ones fit it).
    #[arg(long, value_parser = plan_rows, value_name = "N", default_value_t = 4096)]
    max_context: usize,
    /// Artifact directory to write (created; must not exist unless --force): kernels (sm_90a: PTX
    /// and cubins; cpu: shared objects), the launch plan, the manifest (sm_90a: and the lowering).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Tuning database to take kernel configurations from (written by `v3c tune` / `v3r tune`).
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
    /// Replace an existing artifact directory.
    #[arg(long)]
    force: bool,
    /// Graph to compile (default: fp8 when the checkpoint's weights are fp8 — the tensor-core
    /// path — else f32).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// The GPU to pick kernel configurations for (cost model figures, tuning database entries):
    /// H200, H100, H800, H20.
    #[arg(long, value_name = "NAME", default_value = "H200")]
    gpu: String,
    /// Also compile the MTP module as an entry of its own (`draft`), for speculative decoding
    /// (`v3r run --speculative`): the main entries then leave it out and output their hidden state.
    #[arg(long)]
    speculative: bool,
    /// Where prefill attention runs on sm_90a: `tensor-cores` — flash attention (wgmma, TMA) in the
    /// naive form, q, k, v and P in bf16, after kv_b's up-projection of the latent (fp8 graph: an
    /// e4m3 GEMM, as DeepSeek-V3's own naive-form inference; f32 graph: bf16 hi + lo GEMMs) — or
    /// `rows`: the CUDA-core row kernel in the absorbed form, f32 as the reference computes it (to
    /// compare logits tightly). Heads whose widths the kernel does not take stay on the row. The
    /// fp8 graph's prefill caches are then bf16. DeepSeek-V3.2's attention over each query's
    /// selected rows: `tensor-cores` — the absorbed form (as decode's), the kernel gathering the
    /// rows it reads (bf16 keys, queries and P), and its indexer's scores (the queries split in bf16
    /// hi and lo parts: f32's accuracy over the keys), its caches bf16 rows (the indexer's keys
    /// rounded too). With --train, the training step's attention and
    /// its gradient: `tensor-cores` — flash attention forward and FlashAttention-2's backward (dQ,
    /// dK, dV kernels; q, k, v, P and dS in bf16, as DeepSeek-V3's recipe runs attention), or
    /// `rows`: CUDA-core rows in f32, the reference's bits (slow at full width). Default:
    /// tensor-cores (GPU targets only).
    #[arg(long, value_enum, value_name = "WHERE")]
    prefill_attention: Option<AttentionKernel>,
    /// Where decode attention runs on sm_90a: `tensor-cores` — split-K attention (wgmma, a TMA
    /// page ring) in the absorbed form, the decode caches bf16 64-row pages read in place (the
    /// artifact's decode caches are bf16, their rows a multiple of 64: --max-context rounds up),
    /// the absorbed queries and P in bf16 (kv_b e4m3, or bf16 in the f32 graph) — or `rows`: the
    /// CUDA-core row kernel over f32 caches, f32 as the reference computes it. DeepSeek-V3.2's
    /// indexer scores go with it (its decode caches bf16 rows, not pages, with `tensor-cores`).
    /// Heads whose widths the kernel does not take stay on the row.
    /// Default: tensor-cores (GPU targets only).
    #[arg(long, value_enum, value_name = "WHERE")]
    decode_attention: Option<AttentionKernel>,
    /// How the caches the tensor-core attention reads store a row on sm_90a: `bf16` — the latent
    /// and the rope key in bf16 (1152 bytes for DeepSeek-V3's 576 columns) — or `fp8`: FlashMLA's
    /// fp8 rows, the latent in e4m3 with one power-of-two scale per 128 columns, the rope key in
    /// bf16 (656 bytes: 43% less for the attention to read, the caches to hold and sessions to
    /// move). Decode's pages (decode attention on the tensor cores), and prefill's caches where
    /// prefill attention runs there in the fp8 graph (its kv_b GEMM then reads the rows' e4m3
    /// latent and scales as they are); other caches stay f32. Sessions keep caches in f32 on the
    /// host: fp8 rows dequantize and quantize back to the same bytes (power-of-two scales).
    /// Default: bf16.
    #[arg(long, value_enum, value_name = "FORMAT")]
    kv_cache: Option<KvCache>,
    /// Compile the training step (forward, losses, every gradient) instead of the inference
    /// entries, planned for windows of up to --max-rows tokens: an artifact `v3r train` runs (cpu
    /// target; with --target sm_90a, `v3r train` runs it on the GPU). `--precision fp8`:
    /// DeepSeek-V3's FP8 recipe. Kernels without an sm_90a lowering are named.
    #[arg(long)]
    train: bool,
    /// Threads to compile GPU kernels on, each lowering and assembling kernels of its own (default:
    /// one a core). The kernels chosen and their PTX are the same whatever the number.
    #[arg(long, short = 'j', value_name = "N", value_parser = positive)]
    jobs: Option<usize>,
    /// With --train: weight (lambda) of the MTP loss (0 leaves the MTP module out).
    #[arg(long, value_name = "LAMBDA", default_value_t = 0.3, requires = "train")]
    mtp_weight: f32,
    /// With --train: weight (alpha) of each MoE layer's sequence-wise balance loss (0: off).
    #[arg(long, value_name = "ALPHA", default_value_t = 1e-4, requires = "train")]
    balance_alpha: f32,
}

#[derive(Args)]
struct DumpIrArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Stage whose IR to print.
    #[arg(long, value_enum, default_value_t = Stage::V3)]
    stage: Stage,
    /// Entry point to print (default: all).
    #[arg(long, value_enum)]
    entry: Option<Entry>,
    /// Only these decoder layers, e.g. 0..4 (half-open).
    #[arg(long, value_name = "A..B")]
    layers: Option<String>,
    /// Start from this IR file instead of the model; `--stage` names the stage the file is the
    /// output of (it is verified as such).
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Build the fp8 graph (activations quantized 1x128 before fp8-weight GEMMs).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Also print kernel and launch counts (per entry point and layer) to stderr.
    #[arg(long)]
    report: bool,
    /// Print only this kernel (e.g. mla_latent_0), in every stage from `fused` up to `--stage`.
    /// With `--stage gpu|nvvm|ptx`: a Hopper template kernel by name, e.g.
    /// gemm_fp8_bf16_64x128x128_s6 (gemm_<in>_<out>_<M>x<N>x<K>_s<stages>), down to PTX.
    #[arg(long, value_name = "NAME")]
    kernel: Option<String>,
    /// With `--kernel` and `--stage cpu`: also print the kernel lowered to the LLVM dialect (what the
    /// JIT compiles) and its kernel-cache key.
    #[arg(long, requires = "kernel")]
    llvm: bool,
    /// `--stage plan`: rows to plan for (tokens of a prefill, sequences of a decode).
    #[arg(long, value_parser = plan_rows, value_name = "N", default_value_t = 128)]
    max_rows: usize,
    /// `--stage plan`: sequences of a decode to plan for (default: --max-rows).
    #[arg(long, value_parser = plan_rows, value_name = "N")]
    max_batch: Option<usize>,
    /// `--stage plan`: context to plan for (tokens cached before a prefill, cache rows of a decode).
    #[arg(long, value_parser = plan_rows, value_name = "N", default_value_t = 4096)]
    max_context: usize,
}

#[derive(Args)]
struct LogitsArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    model_dir: PathBuf,
    /// Token ids separated by spaces, e.g. "0 3 17 250".
    #[arg(long, value_name = "IDS")]
    tokens: String,
    #[arg(long, value_enum, default_value_t = Backend::Reference)]
    backend: Backend,
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Absolute position of the first token.
    #[arg(long, value_name = "N", default_value_t = 0)]
    first_position: i64,
    /// Output safetensors file (`logits` F32 [T, vocab]; `mtp_logits` F32 [T-1, vocab], row i
    /// predicting token i+2, when the checkpoint has an MTP module).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    model_dir: PathBuf,
    /// Prompt token ids separated by spaces.
    #[arg(long, value_name = "IDS", required_unless_present = "prompt", conflicts_with = "prompt")]
    prompt_tokens: Option<String>,
    /// Prompt as text, encoded by the checkpoint's tokenizer.json (or --tokenizer), its template's
    /// special tokens added; the completion is printed as text (as `v3r run --prompt` does).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// A tokenizer.json (or a directory holding one) for --prompt (default: the checkpoint's).
    #[arg(long, value_name = "FILE", requires = "prompt")]
    tokenizer: Option<PathBuf>,
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_new_tokens: usize,
    #[arg(long, value_enum, default_value_t = Backend::Reference)]
    backend: Backend,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[command(flatten)]
    shaping: v3c_runtime::cli::ShapingArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

#[derive(Args)]
struct TrainArgs {
    /// Checkpoint to start from (config.json + *.safetensors), or an earlier --out with --resume.
    #[arg(long, value_name = "DIR")]
    model_dir: PathBuf,
    #[command(flatten)]
    run: v3c_runtime::cli::TrainRunArgs,
    /// Tokens per sequence.
    #[arg(long, value_name = "T", default_value_t = 32)]
    seq: usize,
    /// Where the steps run: `reference` (the interpreter, the oracle) or `cpu` (the training graph
    /// compiled: forward, losses and backward kernels JIT-compiled for this machine, the FP8 recipe
    /// and MoE layers included) or `cuda` (the step compiled for sm_90a and run on this machine's
    /// GPU, AdamW on the host; as `v3c compile --target sm_90a --train --out DIR` then `v3r train
    /// DIR` do, which is the way for a GPU machine without the compiler).
    #[arg(long, value_name = "BACKEND", default_value = "reference")]
    backend: String,
    /// Weight (lambda) of the MTP loss when the checkpoint has an MTP module; 0 leaves it untrained.
    #[arg(long, value_name = "LAMBDA", default_value_t = 0.3)]
    mtp_weight: f32,
    /// Weight (alpha) of each MoE layer's sequence-wise balance loss over a window's tokens
    /// (DeepSeek-V3: 1e-4); 0 turns it off, leaving the bias update as the only balancing.
    #[arg(long, value_name = "ALPHA", default_value_t = 1e-4)]
    balance_alpha: f32,
    /// `fp8`: DeepSeek-V3's FP8 training recipe — every projection GEMM in e4m3 (forward, Dgrad and
    /// Wgrad; 1x128 activation tiles, 128x1 for Wgrad, 128x128 weight blocks from the f32 masters);
    /// `f32`: everything in f32.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

#[derive(Args)]
struct InitWeightsArgs {
    /// Config source: a built-in model (e.g. deepseek-v3-tiny) or a directory with config.json.
    #[arg(long, value_name = "NAME|DIR", default_value = "deepseek-v3-tiny")]
    model: String,
    /// Checkpoint directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Store attention and MLP/expert projections as fp8 e4m3 with 128x128 block scales.
    #[arg(long)]
    fp8: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct TuneArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Tuning database to write (merged with an existing one); measuring here needs the GPU runtime.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write the compiled candidates (PTX + candidates.json) into this new directory, for measuring
    /// on a GPU machine with `v3r tune DIR --out tuning.json`: the GEMMs' configurations at decode and
    /// prefill M, and the MLA attention kernels' ring depths (decode at 64 sequences of 4096 keys,
    /// prefill at 4096 tokens).
    #[arg(long, value_name = "DIR")]
    emit_candidates: Option<PathBuf>,
    /// Candidates per problem kept after the cost model's ranking and ptxas's spill check.
    #[arg(long, value_parser = positive, value_name = "N", default_value_t = 4)]
    top: usize,
    /// Print, per GEMM kernel and M and per attention kernel, the database's default vs tuned time and
    /// winner (with --tuning).
    #[arg(long)]
    report: bool,
    /// Tuning database to report on.
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
    /// The GPU to tune for (cost model figures, database key): H200, H100, H800, H20.
    #[arg(long, value_name = "NAME", default_value = "H200")]
    gpu: String,
    /// Graph whose kernels to tune (default: fp8 when the checkpoint's weights are fp8; with --train:
    /// f32, or `fp8` for DeepSeek-V3's FP8 training recipe).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Tune the training step's kernels (as `compile --train` builds them: its Fprop, Dgrad and Wgrad
    /// GEMMs, the experts' grouped ones, its flash attention forward and gradients, at windows of 4096
    /// tokens) instead of the inference entries'.
    #[arg(long)]
    train: bool,
    /// Only the problems whose signature contains PATTERN (repeatable; e.g. `--only mla_grad`, `--only
    /// "gemm fp8"`): re-tune a few kernels, or report on them.
    #[arg(long, value_name = "PATTERN")]
    only: Vec<String>,
    /// Also tune the GEMMs prefill runs at these rows, comma-separated powers of two from 64 to
    /// 2048: the buckets at which `v3c compile` picks kernels for shorter chunks. A bucket with no
    /// database entry takes the cost model's pick.
    #[arg(long, value_name = "ROWS,..", value_delimiter = ',', value_parser = prefill_bucket)]
    prefill_rows: Vec<usize>,
}

/// A `--prefill-rows` bucket: a power of two from [`v3c_compiler::tune::DECODE_M`] below
/// [`v3c_compiler::tune::PREFILL_M`].
fn prefill_bucket(s: &str) -> Result<usize, String> {
    let rows: usize = s.parse().map_err(|_| format!("'{s}' is not a number of rows"))?;
    let (low, high) = (v3c_compiler::tune::DECODE_M, v3c_compiler::tune::PREFILL_M);
    if rows.is_power_of_two() && (low..high).contains(&rows) {
        Ok(rows)
    } else {
        Err(format!("{rows}: a bucket is a power of two from {low} to {} (compile picks kernels there)", high / 2))
    }
}

#[derive(Args)]
struct CacheArgs {
    /// Remove the least recently used entries until the rest take at most SIZE (bytes, or with a
    /// unit: 500M, 2G, 1.5GiB; 0 empties it).
    #[arg(long, value_name = "SIZE", value_parser = size_arg, conflicts_with = "clear")]
    trim: Option<u64>,
    /// Remove every entry.
    #[arg(long)]
    clear: bool,
}

fn size_arg(text: &str) -> Result<u64, String> {
    v3c_compiler::kernel_cache::parse_size(text)
}

#[derive(Args)]
struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy)]
enum CompileTarget {
    Cpu,
    Gpu(GpuTarget),
}

fn parse_compile_target(s: &str) -> Result<CompileTarget, String> {
    if s == "cpu" {
        return Ok(CompileTarget::Cpu);
    }
    GpuTarget::by_name(s).map(CompileTarget::Gpu).map_err(|_| {
        let known: Vec<_> = v3c_compiler::target::TARGETS.iter().map(|t| t.name).chain(["cpu"]).collect();
        format!("unknown target '{s}' (known: {})", known.join(", "))
    })
}

/// Rows of a plan's launches when `--max-rows` does not say: a cpu artifact's and a training
/// step's windows.
const DEFAULT_ROWS: usize = 64;

/// The sizes `v3c compile` plans for: `--max-rows`, `--max-batch` and `--max-context`, with the
/// defaults of [`CompileArgs::max_rows`] — a GPU's inference entries prefill prompts in chunks of
/// [`v3c_compiler::tune::PREFILL_M`] tokens (the rows its prefill kernels are picked at) and decode
/// [`v3c_compiler::tune::DECODE_M`] sequences a step.
fn plan_sizes(a: &CompileArgs) -> v3c_compiler::plan::PlanSizes {
    let gpu_inference = matches!(a.target, CompileTarget::Gpu(_)) && !a.train;
    let (rows, batch) = match a.max_rows {
        Some(rows) => (rows, a.max_batch),
        None if gpu_inference => {
            (v3c_compiler::tune::PREFILL_M, Some(a.max_batch.unwrap_or(v3c_compiler::tune::DECODE_M)))
        }
        None => (DEFAULT_ROWS, a.max_batch),
    };
    v3c_compiler::plan::PlanSizes { batch, ..v3c_compiler::plan::PlanSizes::new(rows, a.max_context) }
}

/// `compile --train`'s loss settings and precision.
fn train_config(a: &CompileArgs) -> v3c_models::train::TrainConfig {
    v3c_models::train::TrainConfig {
        mtp_weight: a.mtp_weight,
        balance_alpha: a.balance_alpha,
        fp8: a.precision == Some(Precision::Fp8),
        ..Default::default()
    }
}

/// `--mtp-weight` and `--balance-alpha` of a `--train` compile, as `v3c train` takes them.
fn loss_weights(a: &CompileArgs) -> Result<(), String> {
    v3c_runtime::training::nonnegative(&[("--mtp-weight", a.mtp_weight), ("--balance-alpha", a.balance_alpha)])
}

fn main() -> ExitCode {
    let cli: Cli = v3c_runtime::cli::parse_or_exit("v3c");
    v3c_runtime::cli::init_logging(cli.verbose);
    // dump-ir shows every stage of a kernel's lowering, which the cache does not keep.
    if !matches!(cli.command, Command::DumpIr(_)) {
        v3c_compiler::kernel_cache::keep_gpu_kernels_in(v3c_compiler::kernel_cache::KernelCache::from_env());
    }
    let stores_kernels =
        !matches!(cli.command, Command::DumpIr(_) | Command::Doctor(_) | Command::Cache(_) | Command::InitWeights(_));
    let result = match cli.command {
        Command::Doctor(a) => run_doctor(&a),
        Command::Cache(a) => run_cache(&a),
        Command::Compile(a) if a.train && a.max_batch.is_some() => {
            Err("--max-batch with --train: a training step has no decode entry (--max-rows sizes its windows)".into())
        }
        Command::Compile(a) if a.train && loss_weights(&a).is_err() => loss_weights(&a),
        Command::Compile(a) if a.train && a.kv_cache.is_some() => {
            Err("--kv-cache with --train: a training step keeps no decode caches".into())
        }
        Command::Compile(a) => match a.target {
            CompileTarget::Gpu(t) => commands::compile(&commands::CompileGpuOptions {
                model: &a.model.model,
                target: t,
                precision: a.precision.map(Precision::model),
                gpu: &a.gpu,
                tuning: a.tuning.as_deref(),
                out: a.out.as_deref(),
                force: a.force,
                sizes: plan_sizes(&a),
                speculative: a.speculative,
                train: a.train.then(|| train_config(&a)),
                attention: v3c_compiler::conversion::sm90::AttentionKernels {
                    prefill: a.prefill_attention.map(AttentionKernel::kernel).unwrap_or_default(),
                    decode: a.decode_attention.map(AttentionKernel::kernel).unwrap_or_default(),
                    fp8_cache: a.kv_cache == Some(KvCache::Fp8),
                },
                jobs: a.jobs,
            }),
            CompileTarget::Cpu if a.tuning.is_some() => {
                Err("--tuning: CPU kernels have no tuned configurations (GPU targets only)".into())
            }
            CompileTarget::Cpu if a.prefill_attention.is_some() || a.decode_attention.is_some() => {
                Err("--prefill-attention / --decode-attention: the CPU backend's attention is one kernel (GPU targets only)"
                    .into())
            }
            CompileTarget::Cpu if a.jobs.is_some() => {
                Err("--jobs: the CPU backend compiles its kernels on one thread (GPU targets only)".into())
            }
            CompileTarget::Cpu if a.kv_cache.is_some() => {
                Err("--kv-cache: the CPU backend's caches are f32 (GPU targets only)".into())
            }
            CompileTarget::Cpu => commands::compile_cpu(&commands::CompileCpuOptions {
                model: &a.model.model,
                precision: a.precision.map(Precision::model),
                out: a.out.as_deref(),
                force: a.force,
                sizes: plan_sizes(&a),
                speculative: a.speculative,
                train: a.train.then(|| train_config(&a)),
            }),
        },
        Command::DumpIr(a) => commands::dump_ir(&commands::DumpIrOptions {
            model: &a.model.model,
            stage: a.stage.name(),
            entries: match a.entry {
                Some(Entry::Prefill) => vec![v3c_models::Entry::Prefill],
                Some(Entry::Decode) => vec![v3c_models::Entry::Decode],
                Some(Entry::TrainStep) => Vec::new(),
                None => v3c_models::Entry::ALL.to_vec(),
            },
            train_step: matches!(a.entry, Some(Entry::TrainStep)),
            layers: a.layers.as_deref(),
            from: a.from.as_deref(),
            precision: a.precision.model(),
            report: a.report,
            kernel: a.kernel.as_deref(),
            llvm: a.llvm,
            plan_sizes: v3c_compiler::plan::PlanSizes {
                batch: a.max_batch,
                ..v3c_compiler::plan::PlanSizes::new(a.max_rows, a.max_context)
            },
        }),
        Command::Emulate(a) => {
            let ptx = a.ptx.then_some(commands::Simulation {
                checks: v3c_ptxsim::Checks { reversed: false, races: a.races },
                worst_accesses: a.worst_accesses.unwrap_or(0),
            });
            commands::emulate(&a.artifact, &a.weights, &a.tokens, &a.out, a.dump.as_deref(), a.decode_steps, ptx)
        }
        Command::Logits(a) => commands::require_backend(a.backend.name()).and_then(|_| {
            commands::logits(&a.model_dir, &a.tokens, a.first_position, a.precision.model(), a.backend.name(), &a.out)
        }),
        Command::Run(a) => commands::require_backend(a.backend.name()).and_then(|_| {
            commands::run(&commands::RunOptions {
                model_dir: &a.model_dir,
                prompt: match (&a.prompt_tokens, &a.prompt) {
                    (Some(ids), _) => commands::Prompt::Ids(ids),
                    (None, text) => commands::Prompt::Text(text.as_deref().unwrap_or(""), a.tokenizer.as_deref()),
                },
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                shaping: &a.shaping,
                seed: a.seed,
                ignore_eos: a.ignore_eos,
                precision: a.precision.model(),
                backend: a.backend.name(),
            })
        }),
        Command::InitWeights(a) => commands::init_weights(&a.model, &a.out, a.fp8, a.seed),
        Command::Train(a) => commands::train(&commands::TrainOptions {
            run: v3c_runtime::training::RunOptions {
                model_dir: &a.model_dir,
                data: &a.run.data,
                steps: a.run.steps,
                out: &a.run.out,
                batch: a.run.batch,
                seq: a.seq,
                lr: a.run.lr,
                seed: a.run.seed,
                resume: a.run.resume,
                save_every: a.run.save_every,
                mtp_weight: a.mtp_weight,
                balance_alpha: a.balance_alpha,
                fp8: a.precision == Precision::Fp8,
                optimizer: a.run.optimizer(),
                eval: a.run.eval(),
                tokenizer: a.run.tokenizer.as_deref(),
            },
            backend: &a.backend,
        }),
        Command::Tune(a) => commands::tune(&commands::TuneOptions {
            model: &a.model.model,
            precision: a.precision.map(Precision::model),
            gpu: &a.gpu,
            emit_candidates: a.emit_candidates.as_deref(),
            top: a.top.max(1),
            report: a.report,
            tuning: a.tuning.as_deref(),
            out: a.out.as_deref(),
            train: a.train.then(|| v3c_models::train::TrainConfig {
                fp8: a.precision == Some(Precision::Fp8),
                ..Default::default()
            }),
            only: &a.only,
            prefill_rows: &a.prefill_rows,
        }),
    };
    if stores_kernels {
        hold_kernel_cache_to_its_size();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("v3c: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `v3c cache`: what the kernel cache holds, and `--trim` / `--clear`.
fn run_cache(args: &CacheArgs) -> Result<(), String> {
    use v3c_compiler::kernel_cache::{mib, KernelCache};
    let Some(cache) = KernelCache::from_env() else {
        println!("kernel cache off (V3C_KERNEL_CACHE=off, or no HOME): nothing is kept");
        return Ok(());
    };
    let dir = cache.dir().display();
    let removed = match (args.clear, args.trim) {
        (true, _) => Some(cache.clear()?),
        (false, Some(max)) => Some(cache.trim(max)?),
        (false, None) => None,
    };
    if let Some(r) = removed {
        let partial = if r.partial > 0 { format!(" and {} partial entries", r.partial) } else { String::new() };
        println!("kernel cache {dir}: removed {} entries ({}){partial}", r.entries, mib(r.bytes));
    }
    let (usage, limit) = (cache.usage()?, v3c_compiler::kernel_cache::limit_text()?);
    println!("kernel cache {dir}: {usage}; {limit}");
    Ok(())
}

/// After a command that may have stored kernels: the least recently used entries removed until the
/// cache fits `V3C_KERNEL_CACHE_MAX`, but for those used in the last ten minutes (another compiler
/// may be copying them into its artifact); said on stderr when any were (a failure only warns: the
/// command's own work is done).
fn hold_kernel_cache_to_its_size() {
    use v3c_compiler::kernel_cache::{max_bytes_from_env, mib, KernelCache};
    let Some(cache) = KernelCache::from_env() else { return };
    let max = match max_bytes_from_env() {
        Ok(Some(max)) => max,
        Ok(None) => return,
        Err(e) => {
            eprintln!("v3c: warning: {e}; the kernel cache is not trimmed");
            return;
        }
    };
    match cache.trim_sparing(max, v3c_compiler::kernel_cache::SPARED_AFTER_USE) {
        Ok(r) if r.entries > 0 => eprintln!(
            "kernel cache {}: removed the {} least recently used entries ({}) to stay within {} (V3C_KERNEL_CACHE_MAX)",
            cache.dir().display(),
            r.entries,
            mib(r.bytes),
            mib(max)
        ),
        Ok(_) => {}
        Err(e) => eprintln!("v3c: warning: {e}"),
    }
}

fn run_doctor(args: &DoctorArgs) -> Result<(), String> {
    let report = doctor::run();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print!("{}", report.to_text());
    }
    if report.compiler_ok() {
        Ok(())
    } else {
        Err("the compiler's own toolchain (LLVM/MLIR) is broken; see the lines marked --".into())
    }
}
