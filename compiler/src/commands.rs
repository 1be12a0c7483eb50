//! The commands of `v3c` beyond `doctor`: `dump-ir`, and on the reference backend `logits`, `run`,
//! `init-weights`. Each returns a one-line error for the user; output files are written atomically.

use std::path::Path;
use std::time::Instant;

use v3c_compiler::kernel_cache::KernelCache;
use v3c_compiler::target::GpuTarget;
use v3c_models::checkpoint::save_tensors;
use v3c_models::config::ModelConfig;
use v3c_models::init::{with_fp8, write_random_checkpoint};
use v3c_models::reference::{Model, Sampler};
use v3c_models::Precision;
use v3c_runtime::lowering::Regime;

/// Which backend a command was asked to use: `reference` (interpreter), `cpu` (JIT kernels) or
/// `cuda` (the model compiled for sm_90a and run on this machine's GPU).
pub fn require_backend(backend: &str) -> Result<(), String> {
    match backend {
        "reference" | "cpu" | "cuda" => Ok(()),
        other => Err(format!("--backend {other}: unknown (reference, cpu, cuda)")),
    }
}

/// This machine's GPU for `--backend cuda`, or one line saying what is missing.
fn cuda_device() -> Result<v3c_runtime::device::DeviceInfo, String> {
    v3c_runtime::device::probe_device(0).map_err(|e| {
        format!(
            "--backend cuda needs this machine's GPU: {e}; elsewhere compile with `v3c compile --target sm_90a \
             --out DIR` (--train for a training step) and run the artifact with `v3r` on the GPU machine"
        )
    })
}

/// `model_dir` compiled for sm_90a into a scratch artifact (a plan for `sizes`; a training step
/// with `train`: its weights the trainer's parameters) and loaded on `device` with the checkpoint
/// in `model_dir` — what `v3c compile --target sm_90a` then `v3r` do. The scratch directory lives
/// as long as the returned guard.
fn compile_and_load(
    device: &v3c_runtime::device::DeviceInfo,
    model_dir: &Path,
    precision: Precision,
    sizes: v3c_compiler::plan::PlanSizes,
    train: Option<&v3c_models::train::Trainer>,
) -> Result<(v3c_runtime::cuda::GpuArtifact, tempfile::TempDir), String> {
    let scratch = tempfile::tempdir().map_err(|e| format!("a scratch directory: {e}"))?;
    let artifact = scratch.path().join("model");
    let gpu = v3c_compiler::target::DeviceModel::by_name(&device.name).map_or("H200", |d| d.name);
    compile(&CompileGpuOptions {
        model: &model_dir.display().to_string(),
        target: v3c_compiler::target::SM90A,
        precision: Some(precision),
        gpu,
        tuning: None,
        out: Some(&artifact),
        force: false,
        sizes,
        speculative: false,
        train: train.map(|t| t.train.clone()),
        attention: Default::default(),
        jobs: None,
    })?;
    let a = v3c_runtime::artifact::Artifact::open(&artifact).map_err(|e| e.to_string())?;
    let mut progress = |what: &str| tracing::debug!("{what}");
    let loaded = match train {
        Some(t) => {
            let weights = v3c_runtime::gpu::Weights::Params(&t.params);
            v3c_runtime::cuda::GpuArtifact::load_weights(a, &weights, device.ordinal, &mut progress)?
        }
        None => v3c_runtime::cuda::GpuArtifact::load(a, model_dir, device.ordinal, &mut progress)?,
    };
    Ok((loaded, scratch))
}

/// `--backend cuda` for `logits` and `run`: the model for `rows` rows and `context` cache rows on
/// this machine's GPU (see [`compile_and_load`]); without a GPU one line before anything is compiled.
fn gpu_program(
    model_dir: &Path,
    precision: Precision,
    rows: usize,
    context: usize,
) -> Result<(v3c_runtime::cuda::GpuArtifact, tempfile::TempDir, String), String> {
    let device = cuda_device()?;
    let sizes = v3c_compiler::plan::PlanSizes::new(rows.max(1), context);
    let (loaded, scratch) = compile_and_load(&device, model_dir, precision, sizes, None)?;
    Ok((loaded, scratch, format!("cuda:{} ({})", device.ordinal, device.name)))
}

pub fn logits(
    model_dir: &Path,
    tokens: &str,
    first_position: i64,
    precision: Precision,
    backend: &str,
    out: &Path,
) -> Result<(), String> {
    let tokens = v3c_runtime::cli::parse_token_ids(tokens, "--tokens")?;
    if backend == "cuda" {
        if first_position != 0 {
            return Err("--first-position with --backend cuda: the GPU session prefills from position 0".into());
        }
        let (program, _scratch, device) = gpu_program(model_dir, precision, tokens.len(), 0)?;
        let mut session = v3c_runtime::session::ArtifactSession::new(&program, tokens.len())?;
        let (rows, vocab) = session.prefill_rows(&tokens)?;
        let logits = v3c_models::tensor::Tensor::f32(vec![tokens.len(), vocab], rows);
        save_tensors(out, &[("logits", &logits)]).map_err(|e| e.to_string())?;
        eprintln!("wrote logits {:?} to {} (on {device})", logits.shape, out.display());
        return Ok(());
    }
    let model = Model::open(model_dir, precision).map_err(|e| e.to_string())?;
    let result = if backend == "cpu" {
        v3c_compiler::cpu_backend::logits(&model, &tokens, first_position, KernelCache::from_env().as_ref())
            .map_err(|e| e.to_string())?
    } else {
        model.logits(&tokens, first_position).map_err(|e| e.to_string())?
    };
    let mut tensors = vec![("logits", &result.logits)];
    if let Some(m) = &result.mtp_logits {
        tensors.push(("mtp_logits", m));
    }
    save_tensors(out, &tensors).map_err(|e| e.to_string())?;
    let mtp = match &result.mtp_logits {
        Some(m) => format!(" and mtp_logits {:?}", m.shape),
        None => String::new(),
    };
    eprintln!("wrote logits {:?}{mtp} to {}", result.logits.shape, out.display());
    Ok(())
}

/// What `v3c run` generates after: token ids (spelled out), or text and the tokenizer for it (the
/// checkpoint's tokenizer.json when None).
pub enum Prompt<'a> {
    Ids(&'a str),
    Text(&'a str, Option<&'a Path>),
}

pub struct RunOptions<'a> {
    pub model_dir: &'a Path,
    pub prompt: Prompt<'a>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Top-k, min-p, the penalties; what the completion is held to.
    pub shaping: &'a v3c_runtime::cli::ShapingArgs,
    pub seed: u64,
    pub ignore_eos: bool,
    pub precision: Precision,
    pub backend: &'a str,
}

/// A generation session on either backend.
enum AnySession<'m, 'c> {
    Reference(v3c_models::reference::Session<'m>),
    Cpu(v3c_compiler::cpu_backend::CpuSession<'c>),
}

impl v3c_runtime::session::Generator for AnySession<'_, '_> {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        match self {
            AnySession::Reference(s) => s.prefill(tokens).map_err(|e| e.to_string()),
            AnySession::Cpu(s) => s.prefill(tokens).map_err(|e| e.to_string()),
        }
    }

    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String> {
        match self {
            AnySession::Reference(s) => s.decode(token).map_err(|e| e.to_string()),
            AnySession::Cpu(s) => s.decode(token).map_err(|e| e.to_string()),
        }
    }
}

pub fn run(o: &RunOptions) -> Result<(), String> {
    v3c_runtime::cli::check_sampling(o.temperature, o.top_p)
        .and_then(|()| o.shaping.shaping().check())
        .map_err(|e| format!("--{e}"))?;
    // Text in, text out.
    let (prompt, tokenizer) = match o.prompt {
        Prompt::Ids(ids) => (v3c_runtime::cli::parse_token_ids(ids, "--prompt-tokens")?, None),
        Prompt::Text(text, file) => {
            let t = v3c_runtime::tokenizer::Tokenizer::from_path(file.unwrap_or(o.model_dir))?;
            let ids = t.encode(text, true);
            if ids.is_empty() {
                return Err("--prompt: no tokens (an empty text)".into());
            }
            (ids, Some(std::sync::Arc::new(t)))
        }
    };
    let print = |tokens: &[u32]| match &tokenizer {
        Some(t) => println!("{}", t.decode(tokens, true)),
        None => println!("{}", tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")),
    };
    // A constraint asked for: through the prompt's tokenizer, else the checkpoint's.
    let guide_tokenizer = match (&tokenizer, o.shaping.guided()) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => Some(std::sync::Arc::new(v3c_runtime::tokenizer::Tokenizer::from_path(o.model_dir)?)),
        (None, false) => None,
    };
    let sampler_for = |eos: Option<u32>| -> Result<Sampler, String> {
        let s = Sampler::new(o.temperature, o.top_p, o.seed).shaped(o.shaping.shaping());
        Ok(match o.shaping.constraint(guide_tokenizer.as_ref(), eos)? {
            Some(c) => s.constrained(c),
            None => s,
        })
    };
    if o.backend == "cuda" {
        let max_len = prompt.len() + o.max_new_tokens;
        let (program, _scratch, device) = gpu_program(o.model_dir, o.precision, prompt.len(), max_len)?;
        let eos = if o.ignore_eos {
            None
        } else {
            ModelConfig::resolve(&o.model_dir.display().to_string()).map_err(|e| e.to_string())?.eos_token_id
        };
        let mut session = v3c_runtime::session::ArtifactSession::new(&program, max_len)?;
        let mut sampler = sampler_for(eos)?;
        let generation = v3c_runtime::session::generate(&mut session, &prompt, o.max_new_tokens, &mut sampler, eos)?;
        print(&generation.tokens);
        eprintln!("{} (cuda backend on {device})", generation.summary(prompt.len()));
        return Ok(());
    }
    let model = Model::open(o.model_dir, o.precision).map_err(|e| e.to_string())?;
    let context = v3c_compiler::mlir::new_context();
    let max_len = prompt.len() + o.max_new_tokens;
    let mut session = if o.backend == "cpu" {
        AnySession::Cpu(
            v3c_compiler::cpu_backend::CpuSession::new(&context, &model, max_len, KernelCache::from_env().as_ref())
                .map_err(|e| e.to_string())?,
        )
    } else {
        AnySession::Reference(model.session(max_len).map_err(|e| e.to_string())?)
    };
    let vocab = model.config.vocab_size;
    if let Some((t, _)) = o.shaping.shaping().logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
        return Err(format!("--logit-bias: token id {t} is outside the model's vocabulary (0..{vocab})"));
    }
    let eos = if o.ignore_eos { None } else { model.config.eos_token_id };
    let mut sampler = sampler_for(eos)?;
    let generation = v3c_runtime::session::generate(&mut session, &prompt, o.max_new_tokens, &mut sampler, eos)?;
    print(&generation.tokens);
    eprintln!(
        "{} ({} backend, {})",
        generation.summary(prompt.len()),
        o.backend,
        if o.precision == Precision::Fp8 { "fp8" } else { "f32" }
    );
    Ok(())
}

pub fn init_weights(model: &str, out: &Path, fp8: bool, seed: u64) -> Result<(), String> {
    let config = ModelConfig::resolve(model).map_err(|e| e.to_string())?;
    let config = if fp8 { with_fp8(&config) } else { config };
    let params: usize = v3c_models::build(&config, v3c_models::Entry::Prefill, &Default::default())
        .map_err(|e| e.to_string())?
        .params()
        .map(|(_, ty, ..)| ty.shape.iter().filter_map(|d| d.clone().fixed()).product::<usize>())
        .sum();
    if params > 2_000_000_000 {
        return Err(format!(
            "--model {model}: {:.1}B parameters is too large for random test weights (use deepseek-v3-tiny or a small config)",
            params as f64 / 1e9
        ));
    }
    let n = write_random_checkpoint(&config, out, seed).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {n} tensors ({params} parameters{}) to {}",
        if fp8 { ", fp8 block-scaled" } else { "" },
        out.display()
    );
    Ok(())
}

pub struct DumpIrOptions<'a> {
    pub model: &'a str,
    pub stage: &'a str,
    pub entries: Vec<v3c_models::Entry>,
    /// The training step (`--entry train-step`) instead of `entries`.
    pub train_step: bool,
    pub layers: Option<&'a str>,
    pub from: Option<&'a Path>,
    pub precision: Precision,
    /// Print launch counts per entry and layer (stage `fused` and later) to stderr.
    pub report: bool,
    /// Print only this kernel, in every stage from `fused` up to `stage`.
    pub kernel: Option<&'a str>,
    /// With `kernel` at stage `cpu`: also the LLVM dialect the JIT compiles, and the cache key.
    pub llvm: bool,
    /// Sizes the `plan` stage plans dynamic dims for.
    pub plan_sizes: v3c_compiler::plan::PlanSizes,
}

/// Parses `a..b` (half-open layer range).
fn parse_layers(text: &str) -> Result<std::ops::Range<usize>, String> {
    let bad = || format!("--layers '{text}': expected A..B with A < B, e.g. 0..4");
    let (a, b) = text.split_once("..").ok_or_else(bad)?;
    let (a, b) = (a.trim().parse::<usize>().map_err(|_| bad())?, b.trim().parse::<usize>().map_err(|_| bad())?);
    if a >= b {
        return Err(bad());
    }
    Ok(a..b)
}

pub fn dump_ir(o: &DumpIrOptions) -> Result<(), String> {
    use v3c_compiler::pipeline::Driver;
    let context = v3c_compiler::mlir::new_context();
    if let Some(kernel) = o.kernel {
        return dump_kernel(o, &context, kernel);
    }
    if o.stage == v3c_compiler::pipeline::PLAN_STAGE {
        return dump_plan(o, &context);
    }
    let module = match o.from {
        Some(path) => {
            let label = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Driver::from_env(&label).run_file(&context, path, o.stage, o.stage).map_err(|e| e.to_string())?
        }
        None => model_module(o, &context, o.stage)?,
    };
    if o.report {
        let (entries, kernels) = v3c_compiler::transforms::form_kernels::launch_report(&module.as_operation());
        if kernels == 0 {
            eprintln!("report: no kernels at stage {} (kernels form at stage fused)", o.stage);
        } else {
            eprintln!("report: {kernels} distinct kernels");
            for e in entries {
                eprintln!("report: {e}");
            }
        }
    }
    write_stdout(&module.as_operation().to_string());
    Ok(())
}

/// The model's module at `stage`: its entries (and layers) as asked, or with `train_step` its
/// training graph (forward, losses, backward; see `v3c_models::train`), f32 or the FP8 recipe.
fn model_module<'c>(
    o: &DumpIrOptions,
    context: &'c melior::Context,
    stage: &str,
) -> Result<melior::ir::Module<'c>, String> {
    use v3c_compiler::pipeline::Driver;
    let config = ModelConfig::resolve(o.model).map_err(|e| e.to_string())?;
    if o.train_step {
        if o.layers.is_some() {
            return Err("--layers: a training step has every layer".into());
        }
        let train = v3c_models::train::TrainConfig {
            fp8: o.precision == Precision::Fp8,
            ..v3c_models::train::TrainConfig::default()
        };
        let graph = v3c_models::train::training_graph(&config, &train).map_err(|e| e.to_string())?.graph;
        let entry = v3c_compiler::cpu_backend::TRAIN_ENTRY;
        return Driver::from_env(o.model).run_graphs(context, &[(entry, &graph)], stage).map_err(|e| e.to_string());
    }
    let layers = o.layers.map(parse_layers).transpose()?;
    if let Some(r) = &layers {
        if r.end > config.num_hidden_layers {
            return Err(format!("--layers {}..{}: the model has {} layers", r.start, r.end, config.num_hidden_layers));
        }
    }
    let options = v3c_models::BuildOptions { precision: o.precision, layers, ..Default::default() };
    Driver::from_env(o.model).run_model(context, &config, &o.entries, &options, stage).map_err(|e| e.to_string())
}

/// Writes to stdout; a closed pipe (e.g. `| head`) is not an error worth reporting.
fn write_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

/// `dump-ir --kernel NAME`: the kernel's function at stage `fused`, then (for `--stage cpu`) its CPU
/// lowering and, with `--llvm`, the LLVM dialect the JIT compiles, each under a `// -----` header.
fn dump_kernel(o: &DumpIrOptions, context: &melior::Context, kernel: &str) -> Result<(), String> {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    let gpu = matches!(o.stage, "gpu" | "nvvm" | "ptx");
    if gpu {
        use v3c_compiler::conversion::sm90;
        let target = v3c_compiler::target::SM90A;
        if let Some(config) = sm90::gemm::GemmConfig::from_name(kernel) {
            write_stdout(&gpu_kernel_text(o.stage, sm90::compile_gemm(context, &config, &target))?);
            return Ok(());
        }
        if let Some(config) = sm90::mla::MlaDecodeConfig::from_name(kernel) {
            write_stdout(&gpu_kernel_text(o.stage, sm90::compile_mla(context, &config, &target))?);
            return Ok(());
        }
        if let Some(config) = sm90::mla::MlaPrefillConfig::from_name(kernel) {
            write_stdout(&gpu_kernel_text(o.stage, sm90::compile_mla_prefill(context, &config, &target))?);
            return Ok(());
        }
        if let Some(row) = sm90::rows::RowKernel::from_name(kernel) {
            write_stdout(&gpu_kernel_text(o.stage, sm90::compile_rows(context, &row, &target))?);
            return Ok(());
        }
    }
    if !gpu && !matches!(o.stage, "fused" | "cpu") {
        return Err(format!("--kernel: kernels exist from stage fused on (asked for stage {})", o.stage));
    }
    if o.llvm && o.stage != "cpu" {
        return Err(format!("--llvm: the LLVM dialect is below stage cpu (asked for stage {})", o.stage));
    }
    let module = model_module(o, context, "fused")?;
    let mut names = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if !v3c_compiler::transforms::form_kernels::is_kernel(&f) {
            continue;
        }
        let name = f.attribute("sym_name").map(v3c_compiler::mlir::attribute_text).unwrap_or_default();
        if name != kernel {
            names.push(name);
            continue;
        }
        let mut text = format!("// ----- stage fused: {kernel}\n{f}\n");
        if gpu {
            use v3c_compiler::conversion::sm90::{self, lower};
            let target = v3c_compiler::target::SM90A;
            // The default lowering's: attention on the tensor cores where it applies (over bf16
            // caches, which the latent rows store, where every attention kernel of its kind is).
            let defaults = sm90::AttentionKernels::default();
            let caches = sm90::CacheFormats::of(&module, defaults);
            let attention = sm90::tensor_core_attention(&f, defaults, caches);
            if let (Ok(row), None) = (sm90::row_launch(&f, caches), &attention) {
                let table = row.rope_table.as_ref().map_or(String::new(), |t| {
                    format!("; reads a RoPE table of {} columns (cos then sin, x{})", t.dim, t.attention_factor)
                });
                text.push_str(&format!(
                    "// {kernel}: a row kernel, {} (one block per row){table}\n",
                    row.kernel.kernel_name()
                ));
                text.push_str(&gpu_kernel_text(o.stage, sm90::compile_rows(context, &row.kernel, &target))?);
                write_stdout(&text);
                return Ok(());
            }
            if let Some(steps) = attention.or_else(|| lower::steps_of_kernel(&f).ok()) {
                // Each launch in turn: a row kernel, a GEMM's decode and prefill kernels, attention.
                text.push_str(&format!(
                    "// {kernel}: {} launches through {} temporaries\n",
                    steps.steps.len(),
                    steps.temps.len()
                ));
                for (i, step) in steps.steps.iter().enumerate() {
                    text.push_str(&format!("// launch {i}: operands {:?}\n", step.operands));
                    match &step.kernel {
                        lower::StepKernel::Row(k) => {
                            text.push_str(&gpu_kernel_text(o.stage, sm90::compile_rows(context, k, &target))?)
                        }
                        lower::StepKernel::Gemm(g) => {
                            for m in [v3c_compiler::tune::DECODE_M, v3c_compiler::tune::PREFILL_M] {
                                text.push_str(&gemm_as_compiled(o, context, g, m)?.2);
                            }
                        }
                        lower::StepKernel::MlaPrefill(a) => text.push_str(&gpu_kernel_text(
                            o.stage,
                            sm90::compile_mla_prefill(context, &a.config, &target),
                        )?),
                        lower::StepKernel::MlaDecode(a) => {
                            text.push_str(&gpu_kernel_text(o.stage, sm90::compile_mla(context, &a.config, &target))?)
                        }
                    }
                }
                write_stdout(&text);
                return Ok(());
            }
            let g = lower::gemm_of_kernel(&f).map_err(|why| format!("unsupported on sm_90a: {kernel} ({why})"))?;
            let (decode, decode_source, decode_text) = gemm_as_compiled(o, context, &g, v3c_compiler::tune::DECODE_M)?;
            let (prefill, prefill_source, prefill_text) =
                gemm_as_compiled(o, context, &g, v3c_compiler::tune::PREFILL_M)?;
            text.push_str(&format!(
                "// {kernel}: a GEMM, N {} K {}, {} weight(s) concatenated along N; on the H200, decode launches {decode} \
                 ({decode_source}), prefill {prefill} ({prefill_source})\n",
                g.n,
                g.k,
                g.weights.len(),
            ));
            text.push_str(&decode_text);
            text.push_str(&prefill_text);
            write_stdout(&text);
            return Ok(());
        }
        if o.stage == "cpu" {
            let lowered = v3c_compiler::conversion::v3_to_cpu::lower_kernel(&f).map_err(|e| e.to_string())?;
            text.push_str(&format!("// ----- stage cpu: {kernel}\n{}", lowered.text));
            if o.llvm {
                let llvm = v3c_compiler::conversion::v3_to_cpu::lower_to_llvm(context, &lowered.text, kernel)
                    .map_err(|e| format!("kernel {kernel}: {e}"))?;
                let key = v3c_compiler::conversion::v3_to_cpu::cache_key(&lowered.text);
                text.push_str(&format!(
                    "// ----- llvm dialect: {kernel} (kernel cache key {key})\n{}",
                    llvm.as_operation()
                ));
            }
        }
        write_stdout(&text);
        return Ok(());
    }
    if gpu && kernel.starts_with("gemm_") {
        // Likely a mistyped template kernel name: say what the names look like.
        return Err(format!(
            "no kernel '{kernel}': not a template kernel ({}, e.g. gemm_fp8_bf16_64x128x128_s6, checked against \
             the config rules) nor a kernel of the model (kernels: {})",
            v3c_compiler::conversion::sm90::gemm::GemmConfig::NAME_FORMAT,
            names.join(", ")
        ));
    }
    // `v3c compile` builds an fp8 checkpoint's fp8 graph; dump-ir the f32 one unless told.
    let fp8_checkpoint = ModelConfig::resolve(o.model).is_ok_and(|c| c.quantization.is_some());
    let hint = if fp8_checkpoint && o.precision == Precision::F32 && !o.train_step {
        "; this is the f32 graph, and `v3c compile` builds the fp8 graph of this fp8 checkpoint: --precision fp8"
    } else {
        ""
    };
    Err(format!("no kernel '{kernel}' (kernels: {}){hint}", names.join(", ")))
}

/// GEMM `g`'s kernel at `m` rows as `v3c compile` picks it for the H200 (the cost model's first
/// configuration that assembles without spills or serialized wgmma: [`sm90::gemm_as_compiled`]):
/// its name, where the choice came from, and its text down to `o.stage` after a line per
/// configuration ptxas passed over.
fn gemm_as_compiled(
    o: &DumpIrOptions,
    context: &melior::Context,
    g: &v3c_compiler::conversion::sm90::lower::GemmKernel,
    m: usize,
) -> Result<(String, String, String), String> {
    use v3c_compiler::conversion::sm90;
    let ptxas = v3c_compiler::toolchain::find(v3c_compiler::toolchain::Tool::Ptxas).ok();
    let device = v3c_compiler::target::DeviceModel::by_name("H200")?;
    let sm90::GemmAsCompiled { kernel, source, passed_over, smaller } =
        sm90::gemm_as_compiled(context, g, m, &device, ptxas.as_ref()).map_err(|e| e.to_string())?;
    let name = kernel.name.clone();
    let passed: String = passed_over.iter().map(|(name, why)| format!("// {name} passed over: {why}\n")).collect();
    // Shorter prefill chunks' kernels, named (`--kernel NAME --stage ptx` prints one).
    let smaller: String = (smaller.iter())
        .map(|(rows, name, source)| format!("// a prefill chunk of up to {rows} rows launches {name} ({source})\n"))
        .collect();
    Ok((name, source, smaller + &passed + &gpu_kernel_text(o.stage, Ok(kernel))?))
}

/// `dump-ir --stage gpu|nvvm|ptx`: a Hopper template kernel through its stages: the gpu/nvgpu/nvvm
/// module, the LLVM + NVVM dialect after lowering, and the PTX for sm_90a, with ptxas's resource
/// report when ptxas is present.
fn gpu_kernel_text(
    stage: &str,
    compiled: Result<v3c_compiler::conversion::sm90::GpuKernel, v3c_compiler::conversion::sm90::Sm90Error>,
) -> Result<String, String> {
    let target = v3c_compiler::target::SM90A;
    let mut k = compiled.map_err(|e| e.to_string())?;
    let kernel = &k.name;
    let mut text = format!("// ----- stage gpu: {kernel}\n{}", k.mlir);
    if stage != "gpu" {
        let dialect = k.llvm_dialect.as_deref().ok_or("the LLVM dialect of a kernel whose PTX was cached")?;
        text.push_str(&format!("// ----- stage nvvm: {kernel}\n{dialect}"));
    }
    if stage == "ptx" {
        text.push_str(&format!(
            "// ----- stage ptx: {kernel} ({} threads, {} B dynamic shared memory)\n{}",
            k.threads, k.shared_memory_bytes, k.ptx
        ));
        if let Ok(ptxas) = v3c_compiler::toolchain::find(v3c_compiler::toolchain::Tool::Ptxas) {
            k.assemble(&target, &ptxas).map_err(|e| e.to_string())?;
            if let Some(r) = &k.resources {
                text.push_str(&format!(
                    "// ptxas: {}: {} registers, {} B spill stores, {} B spill loads, {} B static shared memory\n",
                    r.name, r.registers, r.spill_stores_bytes, r.spill_loads_bytes, r.shared_memory_bytes
                ));
            }
        }
    }
    Ok(text)
}

/// `dump-ir --stage plan`: the launch plan of every entry as JSON (stage `fused`, then planning).
fn dump_plan(o: &DumpIrOptions, context: &melior::Context) -> Result<(), String> {
    use v3c_compiler::pipeline::Driver;
    let driver = Driver::from_env(o.model);
    let module = match o.from {
        Some(path) => driver.run_file(context, path, "fused", "fused").map_err(|e| e.to_string())?,
        None => model_module(o, context, "fused")?,
    };
    let plan = v3c_compiler::plan::build_plan(&module, o.plan_sizes)?;
    let text = serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())? + "\n";
    driver.dump_data("plan", "json", &text).map_err(|e| e.to_string())?;
    if o.report {
        for e in &plan.entries {
            let weights: u64 = e
                .buffers
                .iter()
                .filter(|b| matches!(b.kind, v3c_runtime::plan::BufferKind::Weight { .. }))
                .map(|b| b.bytes)
                .sum();
            eprintln!(
                "report: {}: {} launches, arena {} peak (rows {}, context {}), weights {}",
                e.name,
                e.launches.len(),
                human_bytes(e.arena_bytes),
                e.sizes.rows,
                e.sizes.context,
                human_bytes(weights)
            );
        }
    }
    write_stdout(&text);
    Ok(())
}

/// `1.5 KiB`, `66.6 MiB`, `641.29 GiB`.
fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.2} GiB", b / 1_073_741_824.0),
    }
}

/// `v3c compile --target sm_90a`: both entry points through the `fused` stage, then every kernel
/// onto the sm_90a templates (PTX, assembled by ptxas when present: registers and spills are
/// printed). Kernels without an sm_90a lowering are all named (`unsupported on sm_90a: <kernel>
/// (<op>)`), never skipped: then nothing is written and the exit code is 1. `precision`: the graph
/// to compile (default: fp8 when the checkpoint's weights are fp8, the tensor-core path).
pub struct CompileGpuOptions<'a> {
    pub model: &'a str,
    pub target: GpuTarget,
    pub precision: Option<v3c_models::Precision>,
    /// The GPU the cost model and the tuning database are consulted for.
    pub gpu: &'a str,
    pub tuning: Option<&'a Path>,
    /// Where to write the artifact (none: compile and report only).
    pub out: Option<&'a Path>,
    pub force: bool,
    pub sizes: v3c_compiler::plan::PlanSizes,
    /// The MTP module as an entry of its own (`draft`).
    pub speculative: bool,
    /// The training step instead of the inference entries (reported, not written: the runtime
    /// launches training steps from cpu artifacts only).
    pub train: Option<v3c_models::train::TrainConfig>,
    /// Where prefill's and decode's attention run.
    pub attention: v3c_compiler::conversion::sm90::AttentionKernels,
    /// Threads to compile kernels on (none: one a core).
    pub jobs: Option<usize>,
}

/// The entry points to compile: speculative adds the MTP module's own (`draft`), which needs one.
fn entries_for(config: &ModelConfig, speculative: bool) -> Result<&'static [v3c_models::Entry], String> {
    if !speculative {
        return Ok(&v3c_models::Entry::ALL);
    }
    if config.num_nextn_predict_layers == 0 {
        return Err(format!("--speculative: {} has no MTP module to draft with", config.name));
    }
    Ok(&v3c_models::Entry::SPECULATIVE)
}

pub fn compile(o: &CompileGpuOptions) -> Result<(), String> {
    use v3c_compiler::conversion::sm90;
    use v3c_compiler::pipeline::Driver;
    let (model, target, precision) = (o.model, &o.target, o.precision);
    let device = v3c_compiler::target::DeviceModel::by_name(o.gpu)?;
    if device.target != *target {
        return Err(format!("--gpu {}: a {} device, not {}", o.gpu, device.target.name, target.name));
    }
    let db = o.tuning.map(v3c_compiler::tune::db::TuningDb::read).transpose()?;
    let config = ModelConfig::resolve(model).map_err(|e| e.to_string())?;
    let precision = precision.unwrap_or(if config.quantization.is_some() && o.train.is_none() {
        v3c_models::Precision::Fp8
    } else {
        v3c_models::Precision::F32
    });
    let context = v3c_compiler::mlir::new_context();
    let module = match &o.train {
        Some(train) => {
            if o.speculative {
                return Err("--train with --speculative: a training step has no draft entry".into());
            }
            let graph = v3c_models::train::training_graph(&config, train).map_err(|e| e.to_string())?.graph;
            let entry = v3c_compiler::cpu_backend::TRAIN_ENTRY;
            Driver::from_env(model).run_graphs(&context, &[(entry, &graph)], "fused").map_err(|e| e.to_string())?
        }
        None => {
            let entries = entries_for(&config, o.speculative)?;
            let options = v3c_models::BuildOptions { precision, mtp_draft: o.speculative, ..Default::default() };
            Driver::from_env(model)
                .run_model(&context, &config, entries, &options, "fused")
                .map_err(|e| e.to_string())?
        }
    };
    let ptxas = v3c_compiler::toolchain::find(v3c_compiler::toolchain::Tool::Ptxas).ok();
    // Progress on a terminal: one line rewritten per template kernel as a thread starts it.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut choose = v3c_compiler::tune::ModelChooser::new(&device, db.as_ref());
    // Prefill GEMMs picked for the plan's rows (at most 4096), and again for runs of fewer.
    choose.prefill_m = v3c_compiler::tune::prefill_m(o.sizes.rows);
    choose.prefill_rows = v3c_compiler::tune::prefill_rows(o.sizes.rows);
    if o.attention.fp8_cache && sm90::lower_sparse::has_sparse_attention(&module) {
        return Err(
            "--kv-cache fp8: DeepSeek-V3.2's sparse attention reads f32 or bf16 cache rows (the indexer's keys \
                    beside the latent); compile it without --kv-cache"
                .into(),
        );
    }
    if o.attention.fp8_cache && sm90::CacheFormats::of(&module, o.attention).decode != sm90::rows::CacheRows::Fp8 {
        return Err(
            "--kv-cache fp8: the fp8 cache is read by the tensor-core decode attention, and this model's decode \
                    attention does not run there (--decode-attention rows, or heads the kernel does not take: the fp8 \
                    rows need a latent of whole 128-column groups and a rope key of 64)"
                .into(),
        );
    }
    let jobs = o.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let progress = |name: &str| {
        let done = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if tty {
            eprint!("\r\x1b[Kcompile: {} kernel {done}: {name}", target.name);
        }
    };
    // Beside the model's kernels, compiled ahead with them: inference's sampling on the device —
    // greedy's argmax over the vocabulary (the runtime launches it on the logits instead of
    // reading them back), sampling at a temperature (the host sampler's draws, bit for bit) and
    // scoring (log-probabilities, perplexity: 16 bytes a row read back, the host's bits) — or
    // training's AdamW and what it needs on the device (`v3r train` keeps the state there).
    let training = o.train.is_some();
    let beside = |lowered: &mut sm90::ModelKernels, choose: &mut dyn sm90::Chooser| {
        use v3c_compiler::conversion::sm90::rows::RowOp;
        if training {
            return Ok((None, None, None, Some(lowered.training_optimizer(&context, target, ptxas.as_ref())?)));
        }
        let argmax = lowered.sampling_argmax(&context, config.vocab_size, target, ptxas.as_ref(), choose)?;
        let sample = lowered.logits_kernel(&context, RowOp::Sample, config.vocab_size, target, ptxas.as_ref())?;
        let scores = lowered.logits_kernel(&context, RowOp::Scores, config.vocab_size, target, ptxas.as_ref())?;
        Ok((Some(argmax), Some(sample), Some(scores), None))
    };
    let (lowered, (argmax, sample, scores, optimizer)) = sm90::compile_model(
        &context,
        &module,
        target,
        ptxas.as_ref(),
        o.attention,
        &mut choose,
        jobs,
        progress,
        beside,
    )
    .map_err(|e| e.to_string())?;
    if tty && done.into_inner() > 0 {
        eprint!("\r\x1b[K");
    }
    if let Some(path) = o.tuning {
        for why in &choose.ignored {
            eprintln!("warning: {}: {why}", path.display());
        }
    }
    // Every GEMM the kernels launch (whole fused kernels, and steps of multi-launch ones) with where
    // its configurations came from.
    let step_gemms = lowered.compound.iter().flat_map(|(_, steps, picked)| {
        steps.steps.iter().zip(picked).filter_map(|(step, kernels)| match (&step.kernel, kernels) {
            (sm90::lower::StepKernel::Gemm(g), Some(k)) => Some((g, k)),
            _ => None,
        })
    });
    let mut reported = std::collections::HashSet::new();
    // What the manifest records of each choice.
    let mut choices = Vec::new();
    // (`regime`: and with prefill's kernels for smaller runs, the most rows this one takes.)
    let mut chose =
        |kernel: &str, dims: String, signature: String, regime: (&str, Option<usize>), config: &str, source: &str| {
            let (regime, up_to_rows) = regime;
            let rows = up_to_rows.map_or(String::new(), |r| format!(" up to {r} rows"));
            eprintln!("compile: {kernel} ({dims}) {regime}{rows} -> {config} [{source}]");
            choices.push(v3c_runtime::artifact::TuningChoice {
                kernel: kernel.to_string(),
                signature,
                regime: regime.to_string(),
                up_to_rows,
                config: config.to_string(),
                source: source.to_string(),
            });
        };
    for (g, kernels) in lowered.gemms.iter().map(|(g, k)| (g, k)).chain(step_gemms) {
        if !reported.insert(&g.kernel) {
            continue;
        }
        // The regimes its entries run it in (a configuration was chosen for those only), and
        // prefill's smaller runs.
        let picked = kernels.picked().into_iter().map(|(r, m, k)| ((r.name(), None), m, k));
        let under = kernels.prefill_under.iter().map(|(m, k)| (("prefill", Some(*m)), *m, k.as_str()));
        for (regime, m, kernel) in picked.chain(under) {
            if let Some(source) = choose.source_of(&g.kernel, m, kernel) {
                let signature = v3c_compiler::tune::GemmShape::of(g, m).signature();
                chose(&g.kernel, g.dims(), signature, regime, kernel, &source);
            }
        }
    }
    // The attention kernels.
    for (fused, steps, _) in &lowered.compound {
        for step in &steps.steps {
            let Some(shape) = v3c_compiler::tune::attention::AttentionShape::of_step(&step.kernel) else { continue };
            let (kernel, heads, _) = step.kernel.attention().expect("an attention launch");
            let key = v3c_compiler::tune::ModelChooser::attention_key(fused, &shape);
            if let Some(source) = choose.source_of(&key, shape.rows(), &kernel) {
                chose(fused, format!("{heads} heads"), shape.signature(), (shape.regime(), None), &kernel, &source);
            }
        }
    }
    // The reductions the tuner widens per regime: whole row kernels and steps of compound ones.
    let tuned_rows = lowered
        .rows
        .iter()
        .filter_map(|(fused, l)| lowered.row_regimes.get(fused).map(|k| (fused.clone(), k, &l.kernel)));
    let step_rows = lowered.compound.iter().flat_map(|(fused, steps, picked)| {
        steps.steps.iter().zip(picked).enumerate().filter_map(move |(i, (step, kernels))| {
            match (&step.kernel, kernels) {
                (sm90::lower::StepKernel::Row(k), Some(kernels)) => Some((format!("{fused}.{i}"), kernels, k)),
                _ => None,
            }
        })
    });
    for (name, kernels, kernel) in tuned_rows.chain(step_rows) {
        for (regime, m, config) in kernels.picked() {
            let (Some(source), Some(shape)) =
                (choose.source_of(&name, m, config), v3c_compiler::tune::rows::RowShape::of(kernel, m))
            else {
                continue;
            };
            chose(&name, format!("d {}", kernel.d), shape.signature(), (regime.name(), None), config, &source);
        }
    }
    // The sampling argmax: one kernel, its width for decode's rows.
    let m = v3c_compiler::tune::DECODE_M;
    if let Some((k, source)) =
        argmax.as_ref().and_then(|k| Some((k, choose.source_of(sm90::ARGMAX, m, &k.kernel_name())?)))
    {
        let signature = v3c_compiler::tune::rows::RowShape::of(k, m).map(|s| s.signature()).unwrap_or_default();
        chose(sm90::ARGMAX, format!("d {}", k.d), signature, ("decode", None), &k.kernel_name(), &source);
    }
    // A kernel per regime, as the regimes it runs in (a configuration was chosen for those only).
    // (Prefill's kernel, then those of its smaller runs.)
    let prefill_kernels = |kernels: &sm90::RegimeKernels| {
        let mut prefill = kernels.prefill.clone();
        for (rows, kernel) in &kernels.prefill_under {
            prefill.push_str(&format!("; up to {rows} rows {kernel}"));
        }
        prefill
    };
    let regimes = |kernels: &sm90::RegimeKernels| {
        let (decode, prefill) = (&kernels.decode, prefill_kernels(kernels));
        match kernels.runs {
            [true, false] => format!("decode {decode}"),
            [false, true] => format!("prefill {prefill}"),
            _ => format!("decode {decode}, prefill {prefill}"),
        }
    };
    for (fused, row) in &lowered.rows {
        let table = if row.rope_table.is_some() { ", + a RoPE table built at load" } else { "" };
        use sm90::rows::{RowOp, TrainRow};
        let attention = matches!(
            row.kernel.op,
            RowOp::MlaDecode { .. }
                | RowOp::Train(TrainRow::MlaForward(_) | TrainRow::MlaGradQ(_) | TrainRow::MlaGradKv(_))
        );
        let blocks = match row.kernel.blocks_per_row() {
            1 => "one block per row".to_string(),
            n if attention => format!(
                "{n} blocks per row, CUDA cores (--prefill-attention / --decode-attention rows, or heads the tensor-core kernels do not take)"
            ),
            n => format!("{n} blocks per row"),
        };
        let kernel = lowered.row_regimes.get(fused).map_or_else(|| row.kernel.kernel_name(), regimes);
        eprintln!("compile: {fused} -> {kernel} [row kernel, {blocks}{table}]");
    }
    for (fused, steps, picked) in &lowered.compound {
        use v3c_compiler::conversion::sm90::lower::StepKernel;
        let launches: Vec<String> = steps
            .steps
            .iter()
            .zip(picked)
            .map(|(step, gemm)| {
                // A step of one regime: its kernel there.
                let per_regime = |kernels: &sm90::RegimeKernels| match step.only {
                    Some(Regime::Prefill) => format!("prefill only {}", prefill_kernels(kernels)),
                    Some(r) => format!("{} only {}", r.name(), kernels.of(r)),
                    None => regimes(kernels),
                };
                match (&step.kernel, gemm) {
                    (StepKernel::Row(k), None) => {
                        // DeepSeek-V3.2's indexer scores: the cost model's figure at the plan's rows.
                        let estimate = v3c_compiler::tune::rows::index_scores_estimate(k, choose.prefill_m, &device)
                            .map_or(String::new(), |e| {
                                format!(" [cost model: {:.1} us est., {} pairs, {}-bound]", e.micros, e.pairs, e.bound)
                            });
                        match step.only {
                            Some(r) => format!("{} only {}{estimate}", r.name(), k.kernel_name()),
                            None => format!("{}{estimate}", k.kernel_name()),
                        }
                    }
                    (StepKernel::Row(_), Some(kernels)) => per_regime(kernels),
                    (StepKernel::Gemm(g), Some(kernels)) => {
                        let regimes = per_regime(kernels);
                        match &g.grouped {
                            Some(gr) => format!("grouped GEMM over {} experts, {} ({regimes})", gr.groups, g.dims()),
                            None => format!("GEMM {} ({regimes})", g.dims()),
                        }
                    }
                    (StepKernel::Gemm(g), None) => format!("GEMM {}", g.dims()),
                    (StepKernel::MlaPrefill(a), _) => {
                        format!("{} ({} heads, tensor cores)", a.config.kernel_name(), a.heads)
                    }
                    (StepKernel::MlaDecode(a), _) => {
                        format!("{} ({} heads, split K, tensor cores)", a.config.kernel_name(), a.heads)
                    }
                }
            })
            .collect();
        let table = if steps.rope_table.is_some() { ", + a RoPE table built at load" } else { "" };
        eprintln!("compile: {fused} -> {} launches: {}{table}", launches.len(), launches.join(" -> "));
    }
    for (name, why) in &lowered.passed_over {
        eprintln!("compile: {name} passed over: {why}");
    }
    for k in &lowered.kernels {
        match &k.resources {
            Some(r) => eprintln!(
                "compile: {}: {} threads, {} B dynamic + {} B static shared memory, {} registers, spills {}/{} B",
                k.name,
                k.threads,
                k.shared_memory_bytes,
                r.shared_memory_bytes,
                r.registers,
                r.spill_stores_bytes,
                r.spill_loads_bytes
            ),
            None => eprintln!("compile: {}: PTX only (no ptxas: run scripts/bootstrap.sh)", k.name),
        }
    }
    let total = lowered.gemms.len() + lowered.rows.len() + lowered.compound.len() + lowered.unsupported.len();
    // Launches per entry run: each call of a fused kernel is one launch, or its steps.
    {
        use melior::ir::block::BlockLike;
        use melior::ir::operation::OperationLike;
        use melior::ir::RegionLike;
        // A fused kernel's launches in an entry's regime (steps of the other regime left out).
        let launches_of = |fused: &str, regime: Regime| {
            lowered
                .compound
                .iter()
                .find(|(k, _, _)| k == fused)
                .map_or(1, |(_, steps, _)| steps.steps.iter().filter(|s| s.runs_in(regime)).count())
        };
        let mut op = module.body().first_operation();
        while let Some(f) = op {
            op = f.next_in_block();
            if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
                continue;
            }
            let Some(block) = f.region(0).ok().and_then(|r| r.first_block()) else { continue };
            let entry = f.attribute("sym_name").map(v3c_compiler::mlir::attribute_text).unwrap_or_default();
            let (mut calls, mut launches) = (0, 0);
            let regime = Regime::of_entry(&entry);
            let mut c = block.first_operation();
            while let Some(call) = c {
                c = call.next_in_block();
                if let Ok(callee) = call.attribute("callee") {
                    calls += 1;
                    launches += launches_of(callee.to_string().trim_start_matches('@'), regime);
                }
            }
            eprintln!("compile: {entry}: {launches} sm_90a launches per run ({calls} fused kernels)");
        }
    }
    if !lowered.unsupported.is_empty() {
        let names: Vec<String> = lowered.unsupported.iter().map(|(k, why)| format!("{k} ({why})")).collect();
        return Err(format!(
            "unsupported on {}: {} of {total} kernels have no {} lowering yet: {}",
            target.name,
            lowered.unsupported.len(),
            target.name,
            names.join(", ")
        ));
    }
    let Some(out) = o.out else {
        eprintln!("compile: all {total} kernels lower for {}; pass --out DIR to write the artifact", target.name);
        return Ok(());
    };
    let tuning = v3c_runtime::artifact::TuningInfo {
        source: if db.is_some() { "database" } else { "cost-model" }.into(),
        detail: format!(
            "GEMM configurations, dense and grouped, the MLA attention kernels' ring depth and the norms' block \
             width, for {}",
            o.gpu
        ),
        choices,
    };
    let picks = Picks { argmax: argmax.as_ref(), sample: sample.as_ref(), scores: scores.as_ref() };
    write_gpu_artifact(out, o, &config, precision, &module, &lowered, picks, optimizer, tuning)
}

/// A row kernel's blocks: the rows of its rows argument (by position) times its blocks per row
/// (`regimes`: its [decode, prefill] kernels, when decode's takes other rows a block).
fn row_blocks(
    k: &v3c_compiler::conversion::sm90::rows::RowKernel,
    regimes: Option<&v3c_compiler::conversion::sm90::RegimeKernels>,
) -> v3c_runtime::lowering::Blocks {
    use v3c_compiler::conversion::sm90::rows::RowKernel;
    let position = k.rows_argument().and_then(|rows| k.arguments().iter().position(|(n, _)| *n == rows));
    let rows_of = |name: &String| RowKernel::from_name(name).map(|r| r.rows_per_block());
    let (decode, prefill) = match regimes {
        Some(k) => (rows_of(&k.decode), rows_of(&k.prefill)),
        None => (None, None),
    };
    let rows_per_block = prefill.unwrap_or_else(|| k.rows_per_block());
    match position {
        Some(operand) => v3c_runtime::lowering::Blocks::Rows {
            operand,
            per_row: k.blocks_per_row(),
            rows_per_block,
            decode_rows_per_block: decode.filter(|&d| d != rows_per_block),
        },
        None => v3c_runtime::lowering::Blocks::One,
    }
}

/// The kernels that pick tokens on the device: greedy's argmax, and sampling at a temperature;
/// and the one that scores them (log-probabilities' sums).
struct Picks<'a> {
    argmax: Option<&'a v3c_compiler::conversion::sm90::rows::RowKernel>,
    sample: Option<&'a v3c_compiler::conversion::sm90::rows::RowKernel>,
    scores: Option<&'a v3c_compiler::conversion::sm90::rows::RowKernel>,
}

/// Writes the sm_90a artifact of `lowered` (whole or not at all): kernels (PTX, cubin when ptxas
/// assembled it), the fused-level plan, the lowering of every fused kernel (and `picks`, the
/// sampling kernels; `optimizer`, a training step's), the manifest.
#[allow(clippy::too_many_arguments)]
fn write_gpu_artifact(
    out: &Path,
    o: &CompileGpuOptions,
    config: &ModelConfig,
    precision: v3c_models::Precision,
    module: &melior::ir::Module,
    lowered: &v3c_compiler::conversion::sm90::ModelKernels,
    picks: Picks,
    optimizer: Option<v3c_runtime::lowering::OptimizerSpec>,
    tuning: v3c_runtime::artifact::TuningInfo,
) -> Result<(), String> {
    use v3c_compiler::conversion::sm90::lower::{GemmKernel, Operand, StepKernel};
    use v3c_compiler::conversion::sm90::rows::{RowOp, PAGE_ROWS};
    use v3c_runtime::artifact::{self, FileEntry, KernelEntry, Manifest};
    use v3c_runtime::lowering::{self as lw, Blocks, FusedLowering, KernelChoice, LaunchSpec, OperandSpec};
    let staging = stage_artifact_dir(out, o.force)?;
    let kernel_dir = staging.path().join("kernels");
    std::fs::create_dir_all(&kernel_dir).map_err(|e| format!("{}: {e}", kernel_dir.display()))?;
    let write = |file: &str, bytes: &[u8]| -> Result<FileEntry, String> {
        let path = staging.path().join(file);
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(FileEntry { file: file.to_string(), sha256: artifact::sha256_hex(bytes) })
    };
    // How each kernel takes its arguments: GEMMs from their configuration, row kernels from theirs.
    let mut row_ranks: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
    let row_kernels =
        lowered.rows.iter().map(|(_, l)| &l.kernel).chain(lowered.compound.iter().flat_map(|(_, s, _)| {
            s.steps.iter().filter_map(|st| match &st.kernel {
                StepKernel::Row(k) => Some(k),
                StepKernel::Gemm(_) | StepKernel::MlaPrefill(_) | StepKernel::MlaDecode(_) => None,
            })
        }));
    for k in row_kernels.chain(picks.argmax).chain(picks.sample).chain(picks.scores) {
        row_ranks.insert(k.kernel_name(), k.argument_ranks());
    }
    let abi_of = |name: &str| -> Result<v3c_runtime::abi::KernelAbi, String> {
        if let Some(config) = v3c_compiler::conversion::sm90::gemm::GemmConfig::from_name(name) {
            return Ok(v3c_runtime::abi::KernelAbi::Gemm(config.host_abi()));
        }
        if let Some(c) = v3c_compiler::conversion::sm90::mla::MlaDecodeConfig::from_name(name) {
            return Ok(v3c_runtime::abi::KernelAbi::MlaDecode(v3c_runtime::abi::MlaDecodeAbi {
                kv: c.kv,
                rope: c.rope,
                fp8_cache: c.fp8_cache,
                selected: c.selected,
                bf16_rows: c.bf16_rows,
            }));
        }
        if let Some(c) = v3c_compiler::conversion::sm90::mla::MlaPrefillConfig::from_name(name) {
            let kind = c.flash_kind();
            return Ok(v3c_runtime::abi::KernelAbi::MlaPrefill(v3c_runtime::abi::MlaPrefillAbi {
                qk: c.qk,
                v: c.v,
                kind,
            }));
        }
        // (A tuned reduction's other widths take the same arguments.)
        row_ranks
            .get(name)
            .cloned()
            .or_else(|| v3c_compiler::conversion::sm90::rows::RowKernel::from_name(name).map(|k| k.argument_ranks()))
            .map(|ranks| v3c_runtime::abi::KernelAbi::Memrefs { ranks })
            .ok_or_else(|| format!("{name}: a kernel of no known template"))
    };
    let mut kernels = Vec::new();
    for k in &lowered.kernels {
        let ptx = write(&format!("kernels/{}.ptx", k.name), k.ptx.as_bytes())?;
        let cubin = k.cubin.as_ref().map(|c| write(&format!("kernels/{}.cubin", k.name), c)).transpose()?;
        kernels.push(KernelEntry {
            name: k.name.clone(),
            file: ptx.file,
            sha256: ptx.sha256,
            symbol: None,
            partitioned: None,
            row_split: None,
            cubin,
            threads: Some(k.threads),
            dynamic_shared_memory: Some(k.shared_memory_bytes),
            abi: Some(abi_of(&k.name)?),
        });
    }
    let spec = |o: &Operand| match *o {
        Operand::Arg(i) => OperandSpec::Arg(i),
        Operand::Result(i) => OperandSpec::Result(i),
        Operand::Temp(i) => OperandSpec::Temp(i),
        Operand::RopeTable => OperandSpec::RopeTable,
        Operand::TempRows { temp, first, rows } => OperandSpec::TempRows { temp, first, rows },
        Operand::TempRowsOf { temp, arg } => OperandSpec::TempRowsOf { temp, arg },
    };
    let table = |t: &v3c_compiler::conversion::sm90::lower::RopeTable| lw::RopeTableSpec {
        dim: t.dim,
        inv_freq: t.inv_freq.clone(),
        attention_factor: t.attention_factor,
    };
    let gemm_spec = |g: &GemmKernel, weights: Vec<(usize, Option<usize>)>, a: usize, a_scale, residual| lw::GemmSpec {
        n: g.n,
        k: g.k,
        a,
        a_scale,
        weights,
        residual,
        results: if g.results.len() > 1 { g.results.clone() } else { Vec::new() },
        grouped: g.grouped.as_ref().map(|gr| lw::GroupedSpec {
            grouping: format!("{:?}", gr.grouping).to_lowercase(),
            groups: gr.groups,
            routed: gr.routed,
            offsets: gr.offsets,
            perm: gr.perm,
            row_scale: gr.row_scale,
            scatter: gr.scatter,
            weights: gr
                .weights
                .iter()
                .map(|w| lw::GroupedWeightSpec {
                    routed: w.routed,
                    routed_scale: w.routed_scale,
                    shared: w.shared,
                    shared_scale: w.shared_scale,
                    rows: w.rows,
                    shared_columns: w.shared_columns,
                })
                .collect(),
        }),
        k_range: g.k_range.map(|r| r.operand),
        a2: g.a2,
    };
    let mut fused = Vec::new();
    // A single GEMM: its operands are the fused kernel's arguments in the GEMM's roles, then its
    // output (the result, or a temporary whose column ranges are the results).
    for (g, kernels) in &lowered.gemms {
        let mut operands = vec![OperandSpec::Arg(g.a)];
        let a_scale = g.a_scale.map(|s| {
            operands.push(OperandSpec::Arg(s));
            1
        });
        let mut weights = Vec::new();
        for &(w, s) in &g.weights {
            operands.push(OperandSpec::Arg(w));
            let wi = operands.len() - 1;
            let si = s.map(|s| {
                operands.push(OperandSpec::Arg(s));
                operands.len() - 1
            });
            weights.push((wi, si));
        }
        let residual = g.residual.map(|r| {
            operands.push(OperandSpec::Arg(r));
            operands.len() - 1
        });
        let temps = if g.results.len() > 1 {
            operands.push(OperandSpec::Temp(0));
            vec![lw::TempSpec {
                rows_factor: 1,
                cols: g.n,
                dtype: "f32".into(),
                fixed_rows: None,
                run_cols: None,
                rows_of: None,
                dims: None,
            }]
        } else {
            operands.push(OperandSpec::Result(0));
            Vec::new()
        };
        fused.push(FusedLowering {
            fused: g.kernel.clone(),
            launches: vec![LaunchSpec {
                kernel: kernels.choice(),
                operands,
                blocks: Blocks::GemmUnits,
                gemm: Some(gemm_spec(g, weights, 0, a_scale, residual)),
                attention: None,
                only: None,
            }],
            temps,
            rope_table: None,
        });
    }
    // A kernel, or (a tuned reduction) one per regime.
    let choice = |one: String, regimes: Option<&v3c_compiler::conversion::sm90::RegimeKernels>| match regimes {
        Some(kernels) => kernels.choice(),
        None => KernelChoice::One(one),
    };
    for (name, launch) in &lowered.rows {
        let k = &launch.kernel;
        let blocks = row_blocks(k, lowered.row_regimes.get(name));
        fused.push(FusedLowering {
            fused: name.clone(),
            launches: vec![LaunchSpec {
                kernel: choice(k.kernel_name(), lowered.row_regimes.get(name)),
                operands: launch.operands.iter().map(spec).collect(),
                blocks,
                gemm: None,
                attention: None,
                only: None,
            }],
            temps: Vec::new(),
            rope_table: launch.rope_table.as_ref().map(table),
        });
    }
    for (name, steps, picks) in &lowered.compound {
        let mut launches = Vec::new();
        for (step, pick) in steps.steps.iter().zip(picks) {
            let operands: Vec<OperandSpec> = step.operands.iter().map(spec).collect();
            launches.push(match (&step.kernel, pick) {
                (StepKernel::Row(k), pick) => LaunchSpec {
                    kernel: choice(k.kernel_name(), pick.as_ref()),
                    operands,
                    blocks: row_blocks(k, pick.as_ref()),
                    gemm: None,
                    attention: None,
                    only: step.only,
                },
                (StepKernel::Gemm(g), Some(kernels)) => LaunchSpec {
                    kernel: kernels.choice(),
                    operands,
                    blocks: Blocks::GemmUnits,
                    gemm: Some(gemm_spec(g, g.weights.clone(), g.a, g.a_scale, g.residual)),
                    attention: None,
                    only: step.only,
                },
                (k @ (StepKernel::MlaPrefill(_) | StepKernel::MlaDecode(_)), _) => {
                    let (kernel, heads, scale) = k.attention().ok_or_else(|| format!("{name}: not attention"))?;
                    LaunchSpec {
                        kernel: KernelChoice::One(kernel),
                        operands,
                        blocks: Blocks::AttentionTiles,
                        gemm: None,
                        attention: Some(lw::AttentionSpec { heads, scale }),
                        only: step.only,
                    }
                }
                (StepKernel::Gemm(g), None) => return Err(format!("{name}: GEMM {} without kernels", g.kernel)),
            });
        }
        fused.push(FusedLowering {
            fused: name.clone(),
            launches,
            temps: steps.temps.iter().map(|t| t.spec()).collect(),
            rope_table: steps.rope_table.as_ref().map(table),
        });
    }
    fused.sort_by(|a, b| a.fused.cmp(&b.fused));
    let lowering = lw::Lowering {
        format_version: lw::LOWERING_FORMAT_VERSION,
        kernels: fused,
        argmax: picks.argmax.map(|k| k.kernel_name()),
        sample: picks.sample.map(|k| k.kernel_name()),
        scores: picks.scores.map(|k| k.kernel_name()),
        cache_rows_multiple: lowered.caches.paged_decode().then_some(PAGE_ROWS),
        optimizer,
    };
    let lowering_file = write(
        "lowering.json",
        (serde_json::to_string_pretty(&lowering).map_err(|e| e.to_string())? + "\n").as_bytes(),
    )?;
    // A training step's caches are empty: every window is a prefill from position 0.
    let sizes = match o.train {
        Some(_) => v3c_compiler::plan::PlanSizes { context: 0, ..o.sizes },
        // Decode caches in whole pages where they are bf16 pages.
        None if lowered.caches.paged_decode() => {
            v3c_compiler::plan::PlanSizes { context: o.sizes.context.next_multiple_of(PAGE_ROWS), ..o.sizes }
        }
        None => o.sizes,
    };
    let mut plan = v3c_compiler::plan::build_plan(module, sizes)?;
    // Decode caches the tensor-core attention reads: pools of pages through a block table, which
    // the latent row writing the new rows and the attention take.
    if lowered.caches.paged_decode() && o.train.is_none() {
        let through_table: Vec<String> = lowered
            .rows
            .iter()
            .filter(|(_, l)| matches!(l.kernel.op, RowOp::Latent { append: false, .. }))
            .map(|(name, _)| name.clone())
            .chain(lowered.compound.iter().filter_map(|(name, steps, _)| {
                steps.steps.iter().any(|s| matches!(s.kernel, StepKernel::MlaDecode(_))).then(|| name.clone())
            }))
            .collect();
        v3c_compiler::plan::page_decode_caches(&mut plan, "decode", &through_table, PAGE_ROWS)?;
    }
    // Entries calling a kernel that writes or reads bf16 (or fp8) caches (the latent rows storing
    // them, the tensor-core attention over them) take caches of that element.
    use v3c_compiler::conversion::sm90::rows::CacheRows;
    let fp8 = v3c_runtime::plan::LATENT_FP8;
    let cache_kernels: std::collections::HashMap<&str, &str> = lowered
        .rows
        .iter()
        .filter_map(|(name, l)| match l.kernel.op {
            RowOp::Latent { cache: CacheRows::Bf16, .. } => Some((name.as_str(), "bf16")),
            RowOp::Latent { cache: CacheRows::Fp8, .. } => Some((name.as_str(), fp8)),
            // DeepSeek-V3.2's decode rows (the indexer and the attention read them as they are).
            RowOp::Sparse(v3c_compiler::conversion::sm90::rows::SparseRow::CacheWrite { bf16: true }) => {
                Some((name.as_str(), "bf16"))
            }
            _ => None,
        })
        .chain(lowered.compound.iter().filter_map(|(name, steps, _)| {
            steps.steps.iter().find_map(|s| match &s.kernel {
                // (Over the caches themselves: V3.2's reads its own pages of the selected rows.)
                // (The selected rows' kernel reads f32 key rows: not a cache of its own format.)
                StepKernel::MlaDecode(d)
                    if !d.config.selected
                        && matches!(
                            s.operands.get(1),
                            Some(v3c_compiler::conversion::sm90::lower::Operand::Arg(_))
                        ) =>
                {
                    Some((name.as_str(), if d.config.fp8_cache { fp8 } else { "bf16" }))
                }
                StepKernel::MlaDecode(_) => None,
                StepKernel::Row(k) => match k.op {
                    RowOp::MlaKeys { cache: CacheRows::Bf16, .. } => Some((name.as_str(), "bf16")),
                    // DeepSeek-V3.2's prefill rows.
                    RowOp::Sparse(v3c_compiler::conversion::sm90::rows::SparseRow::AppendBf16 { .. }) => {
                        Some((name.as_str(), "bf16"))
                    }
                    RowOp::MlaKeys { cache: CacheRows::Fp8, .. } => Some((name.as_str(), fp8)),
                    _ => None,
                },
                StepKernel::Gemm(_) | StepKernel::MlaPrefill(_) => None,
            })
        }))
        .collect();
    let mut entries: Vec<(String, &str)> = Vec::new();
    for e in &plan.entries {
        let elements: std::collections::BTreeSet<&str> =
            e.launches.iter().filter_map(|l| cache_kernels.get(l.kernel.as_str()).copied()).collect();
        match elements.into_iter().collect::<Vec<_>>()[..] {
            [] => {}
            [element] => entries.push((e.name.clone(), element)),
            [a, b, ..] => return Err(format!("entry {}: kernels over caches of {a} and of {b}", e.name)),
        }
    }
    for (entry, element) in entries {
        v3c_compiler::plan::set_cache_element(&mut plan, &entry, element)?;
    }
    let plan_file =
        write("plan.json", (serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())? + "\n").as_bytes())?;
    let model_config = config.to_hf_json();
    let manifest = Manifest {
        format_version: artifact::ARTIFACT_FORMAT_VERSION,
        compiler: artifact::CompilerInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            git_hash: env!("V3C_GIT_HASH").into(),
        },
        target: artifact::TargetInfo {
            name: o.target.name.to_string(),
            arch: None,
            cpu_features: Vec::new(),
            compute_capability: Some(o.target.compute_capability),
        },
        model: artifact::ModelInfo {
            name: config.name.clone(),
            precision: if precision == v3c_models::Precision::Fp8 { "fp8".into() } else { "f32".into() },
            config_sha256: artifact::config_sha256(&model_config),
            config: model_config,
        },
        entries: plan.entries.iter().map(|e| e.name.clone()).collect(),
        plan: plan_file,
        lowering: Some(lowering_file),
        kernels,
        tuning,
        training: o.train.as_ref().map(|t| artifact::TrainingInfo {
            mtp_weight: t.mtp_weight,
            balance_alpha: t.balance_alpha,
            fp8: t.fp8,
        }),
    };
    write("manifest.json", (serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())? + "\n").as_bytes())?;
    // What is written must read back: the runtime's validation, before the artifact is moved in place.
    v3c_runtime::artifact::Artifact::open(staging.path())
        .map_err(|e| format!("the artifact does not validate: {e}"))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| format!("{}: cannot replace: {e}", out.display()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, out).map_err(|e| format!("{}: {e}", out.display()))?;
    if o.train.is_none() {
        // How the caches store a row (`v3r info` says it too).
        let row = |c: CacheRows| match (c, v3c_runtime::plan::Fp8LatentRow::of(config.latent_dim())) {
            (CacheRows::Fp8, Some(r)) => format!("fp8 rows of {} bytes", r.bytes()),
            (c, _) => c.element().to_string(),
        };
        let pages =
            if lowered.caches.paged_decode() { format!(" in a pool of {PAGE_ROWS}-row pages") } else { String::new() };
        eprintln!("caches: prefill {}, decode {}{pages}", row(lowered.caches.prefill), row(lowered.caches.decode));
    }
    if let Some(cache) = v3c_compiler::kernel_cache::gpu_cache() {
        let c = v3c_compiler::kernel_cache::gpu_cache_counts();
        eprintln!(
            "compile: kernel cache {}: PTX of {} kernels reused, {} lowered; {} cubins reused, {} assembled",
            cache.dir().display(),
            c.ptx_kept,
            c.ptx_made,
            c.cubins_kept,
            c.cubins_made
        );
    }
    eprintln!(
        "wrote {} ({} kernels, plan for {}, lowering, manifest)",
        out.display(),
        lowered.kernels.len(),
        sizes.describe()
    );
    Ok(())
}

pub struct CompileCpuOptions<'a> {
    pub model: &'a str,
    /// The graph (default: fp8 when the checkpoint's weights are, else f32).
    pub precision: Option<Precision>,
    pub out: Option<&'a Path>,
    pub force: bool,
    pub sizes: v3c_compiler::plan::PlanSizes,
    /// The MTP module as an entry of its own (`draft`).
    pub speculative: bool,
    /// The training step instead of the inference entries.
    pub train: Option<v3c_models::train::TrainConfig>,
}

/// `v3c compile --target cpu`: both entry points to machine code for this CPU, kernels taken from
/// the content-addressed kernel cache where it has them. With `--out`: an artifact directory
/// (`manifest.json`, `plan.json`, `kernels/<kernel>.so`) written whole or not at all.
pub fn compile_cpu(o: &CompileCpuOptions) -> Result<(), String> {
    let start = Instant::now();
    let config = ModelConfig::resolve(o.model).map_err(|e| e.to_string())?;
    let precision = o.precision.unwrap_or(if config.quantization.is_some() { Precision::Fp8 } else { Precision::F32 });
    let staging = match o.out {
        Some(out) => Some(stage_artifact_dir(out, o.force)?),
        None => None,
    };
    // Without a cache, an artifact still needs its kernels as files: link them into the staging dir.
    let cache =
        KernelCache::from_env().or_else(|| staging.as_ref().map(|s| KernelCache::new(s.path().join(".objects"))));
    let context = v3c_compiler::mlir::new_context();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} kernels {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_prefix("compiling for cpu");
    let (mut hits, mut built) = (0usize, 0usize);
    let mut progress = |done: usize, total: usize, k: &v3c_compiler::conversion::v3_to_cpu::CpuKernel| {
        if k.from_cache {
            hits += 1;
        } else {
            built += 1;
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(k.name.clone());
    };
    let compiled = match &o.train {
        // The training step: its caches are empty (every window is a prefill from position 0).
        Some(train) => {
            let graph = v3c_models::train::training_graph(&config, train).map_err(|e| e.to_string())?.graph;
            let graphs = [(v3c_compiler::cpu_backend::TRAIN_ENTRY, &graph)];
            v3c_compiler::cpu_backend::compile_graphs(&context, o.model, &graphs, cache.as_ref(), &mut progress)
        }
        None => {
            let entries = entries_for(&config, o.speculative)?;
            let compile = v3c_compiler::cpu_backend::compile_model;
            compile(&context, &config, entries, false, precision, cache.as_ref(), &mut progress)
        }
    }
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let sizes = match o.train {
        Some(_) => v3c_compiler::plan::PlanSizes { context: 0, ..o.sizes },
        None => o.sizes,
    };
    let plan = v3c_compiler::plan::build_plan(&compiled.module, sizes)?;
    let arenas: Vec<String> =
        plan.entries.iter().map(|e| format!("{} {:.1} MiB", e.name, e.arena_bytes as f64 / (1 << 20) as f64)).collect();
    eprintln!(
        "compiled {} for cpu: {} kernels ({hits} from the kernel cache, {built} JIT-compiled) in {:.2} s; \
         arenas at {}: {}",
        config.name,
        compiled.kernels.len(),
        start.elapsed().as_secs_f64(),
        sizes.describe(),
        arenas.join(", ")
    );
    match &cache {
        Some(c) if staging.is_none() => eprintln!("kernel cache: {}", c.dir().display()),
        _ => {}
    }
    let (Some(staging), Some(out), Some(cache)) = (staging, o.out, cache) else { return Ok(()) };
    let kernel_dir = staging.path().join("kernels");
    std::fs::create_dir_all(&kernel_dir).map_err(|e| format!("{}: {e}", kernel_dir.display()))?;
    let mut names: Vec<&String> = compiled.kernels.keys().collect();
    names.sort();
    use v3c_runtime::artifact::{self, FileEntry, KernelEntry, Manifest};
    let mut kernels = Vec::new();
    for name in names {
        let key = &compiled.kernels[name].key;
        let from = cache.path(key);
        let file = format!("kernels/{name}.so");
        let to = staging.path().join(&file);
        std::fs::copy(&from, &to)
            .map_err(|e| format!("kernel {name}: no machine code in the kernel cache ({}: {e})", from.display()))?;
        let bytes = std::fs::read(&to).map_err(|e| format!("{}: {e}", to.display()))?;
        kernels.push(KernelEntry {
            name: name.clone(),
            file,
            sha256: artifact::sha256_hex(&bytes),
            symbol: Some(format!("_mlir__mlir_ciface_{name}")),
            partitioned: Some(compiled.kernels[name].signature.partitioned),
            row_split: compiled.kernels[name].signature.row_split.clone(),
            cubin: None,
            threads: None,
            dynamic_shared_memory: None,
            abi: None,
        });
    }
    let plan_text = serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())? + "\n";
    let model_config = config.to_hf_json();
    let manifest = Manifest {
        format_version: artifact::ARTIFACT_FORMAT_VERSION,
        compiler: artifact::CompilerInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            git_hash: env!("V3C_GIT_HASH").into(),
        },
        target: artifact::TargetInfo {
            name: "cpu".into(),
            arch: Some(std::env::consts::ARCH.into()),
            cpu_features: artifact::host_cpu_features(),
            compute_capability: None,
        },
        model: artifact::ModelInfo {
            name: config.name.clone(),
            precision: if precision == Precision::Fp8 { "fp8" } else { "f32" }.into(),
            config_sha256: artifact::config_sha256(&model_config),
            config: model_config,
        },
        entries: plan.entries.iter().map(|e| e.name.clone()).collect(),
        plan: FileEntry { file: "plan.json".into(), sha256: artifact::sha256_hex(plan_text.as_bytes()) },
        lowering: None,
        kernels,
        tuning: artifact::TuningInfo {
            source: "none".into(),
            detail: "CPU kernels are fixed templates; nothing to tune".into(),
            choices: Vec::new(),
        },
        training: o.train.as_ref().map(|t| artifact::TrainingInfo {
            mtp_weight: t.mtp_weight,
            balance_alpha: t.balance_alpha,
            fp8: t.fp8,
        }),
    };
    let write = |file: &str, text: String| {
        let path = staging.path().join(file);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write("plan.json", plan_text)?;
    write("manifest.json", serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())? + "\n")?;
    // What is written must read back: the runtime's validation, before the artifact is moved in place.
    v3c_runtime::artifact::Artifact::open(staging.path())
        .map_err(|e| format!("the artifact does not validate: {e}"))?;
    let _ = std::fs::remove_dir_all(staging.path().join(".objects"));
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| format!("{}: cannot replace: {e}", out.display()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, out).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("wrote {} ({} kernels, plan, manifest)", out.display(), compiled.kernels.len());
    Ok(())
}

/// A temporary directory beside `out` to build an artifact in (removed unless kept); `out` must
/// not exist unless `force`.
fn stage_artifact_dir(out: &Path, force: bool) -> Result<tempfile::TempDir, String> {
    if out.exists() && !force {
        return Err(format!("{}: already exists (pass --force to replace it)", out.display()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(".v3c-artifact.")
        .tempdir_in(parent)
        .map_err(|e| format!("{}: cannot create a staging directory: {e}", parent.display()))
}

pub struct TuneOptions<'a> {
    pub model: &'a str,
    pub precision: Option<v3c_models::Precision>,
    pub gpu: &'a str,
    pub emit_candidates: Option<&'a Path>,
    pub top: usize,
    pub report: bool,
    pub tuning: Option<&'a Path>,
    pub out: Option<&'a Path>,
    /// The training step's kernels (as `compile --train` builds it) instead of the inference entries'.
    pub train: Option<v3c_models::train::TrainConfig>,
    /// Only the problems whose signature contains one of these (none: every problem).
    pub only: &'a [String],
    /// Rows below [`v3c_compiler::tune::PREFILL_M`] to tune the prefill GEMMs at too (compile's
    /// buckets for shorter chunks, [`v3c_compiler::tune::prefill_rows`]).
    pub prefill_rows: &'a [usize],
}

/// An attention launch of the model the tuner measures: its fused kernel, its problem at the
/// regime's size, its softmax scale.
struct AttentionTuning {
    fused: String,
    shape: v3c_compiler::tune::attention::AttentionShape,
    scale: f32,
}

/// A reduction of the model the tuner measures: its fused kernel (`<fused>.<step>` for a step of
/// one), its problem at a regime's rows.
struct RowTuning {
    name: String,
    shape: v3c_compiler::tune::rows::RowShape,
}

/// The model's tunable kernels ([`model_problems`]).
struct ModelProblems {
    /// Each GEMM with the Ms of the regimes it runs in.
    gemms: Vec<(v3c_compiler::conversion::sm90::lower::GemmKernel, Vec<usize>)>,
    attention: Vec<AttentionTuning>,
    rows: Vec<RowTuning>,
}

impl ModelProblems {
    /// The problems whose signature contains one of `patterns` (none given: all); an error naming
    /// the signatures when none does.
    fn only(self, patterns: &[String]) -> Result<ModelProblems, String> {
        if patterns.is_empty() {
            return Ok(self);
        }
        let wanted = |signature: &str| patterns.iter().any(|p| signature.contains(p.as_str()));
        let mut all = std::collections::BTreeSet::new();
        let gemm_signature = |g: &v3c_compiler::conversion::sm90::lower::GemmKernel, m: usize| {
            v3c_compiler::tune::GemmShape::of(g, m).signature()
        };
        for (g, runs) in &self.gemms {
            all.extend(runs.iter().map(|&m| gemm_signature(g, m)));
        }
        all.extend(self.attention.iter().map(|a| a.shape.signature()));
        all.extend(self.rows.iter().map(|r| r.shape.signature()));
        let gemms: Vec<_> = self
            .gemms
            .into_iter()
            .map(|(g, runs)| {
                let runs: Vec<usize> = runs.into_iter().filter(|&m| wanted(&gemm_signature(&g, m))).collect();
                (g, runs)
            })
            .filter(|(_, runs)| !runs.is_empty())
            .collect();
        let attention: Vec<_> = self.attention.into_iter().filter(|a| wanted(&a.shape.signature())).collect();
        let rows: Vec<_> = self.rows.into_iter().filter(|r| wanted(&r.shape.signature())).collect();
        if gemms.is_empty() && attention.is_empty() && rows.is_empty() {
            let names: Vec<String> = all.into_iter().collect();
            return Err(format!(
                "--only {}: no problem's signature contains it (the model's: {})",
                patterns.join(", "),
                names.join("; ")
            ));
        }
        Ok(ModelProblems { gemms, attention, rows })
    }
}

/// The model's tunable kernels with the graph `precision` picks — or its training step's, with
/// `train` — as `compile` sees them (sm_90a mapping): its GEMMs (whole fused kernels, and the GEMM steps of multi-launch ones, the grouped
/// MoE GEMMs among them), each with the Ms of the regimes its entries run it in
/// ([`v3c_compiler::conversion::sm90::regimes`]), and those prefill runs at each of `prefill_rows`
/// too; its tensor-core attention launches (decode's
/// also over the fp8 cache, which `--kv-cache fp8` compiles); its reductions at the rows of the
/// regimes they run in (distinct problems once).
fn model_problems(
    model: &str,
    precision: Option<v3c_models::Precision>,
    train: Option<&v3c_models::train::TrainConfig>,
    prefill_rows: &[usize],
) -> Result<ModelProblems, String> {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    let config = ModelConfig::resolve(model).map_err(|e| e.to_string())?;
    let context = v3c_compiler::mlir::new_context();
    let driver = v3c_compiler::pipeline::Driver::from_env(model);
    let module = match train {
        Some(train) => {
            let graph = v3c_models::train::training_graph(&config, train).map_err(|e| e.to_string())?.graph;
            driver.run_graphs(&context, &[(v3c_compiler::cpu_backend::TRAIN_ENTRY, &graph)], "fused")
        }
        None => {
            let precision =
                precision.unwrap_or(if config.quantization.is_some() { Precision::Fp8 } else { Precision::F32 });
            let options = v3c_models::BuildOptions { precision, ..Default::default() };
            driver.run_model(&context, &config, &v3c_models::Entry::ALL, &options, "fused")
        }
    }
    .map_err(|e| e.to_string())?;
    let regimes = v3c_compiler::conversion::sm90::regimes(&module);
    let mut gemms = Vec::new();
    let mut attention: Vec<AttentionTuning> = Vec::new();
    let mut rows: Vec<RowTuning> = Vec::new();
    let defaults = v3c_compiler::conversion::sm90::AttentionKernels::default();
    let caches = v3c_compiler::conversion::sm90::CacheFormats::of(&module, defaults);
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
            use v3c_compiler::conversion::sm90::lower;
            use v3c_compiler::tune::attention::AttentionShape;
            let fused = f.attribute("sym_name").map(v3c_compiler::mlir::attribute_text).unwrap_or_default();
            let steps = v3c_compiler::conversion::sm90::tensor_core_attention(&f, defaults, caches);
            for step in steps.iter().flat_map(|s| &s.steps) {
                let (Some(shape), Some((_, _, scale))) =
                    (AttentionShape::of_step(&step.kernel), step.kernel.attention())
                else {
                    continue;
                };
                // The selected rows' attention is one kernel: nothing to measure it against.
                if matches!(shape, AttentionShape::Selected { .. }) {
                    continue;
                }
                // And the fp8 cache's decode kernel, where the rows take it.
                let shapes = [Some(shape), shape.fp8_cache(&v3c_compiler::target::SM90A)];
                for shape in shapes.into_iter().flatten() {
                    if !attention.iter().any(|a| a.shape == shape) {
                        attention.push(AttentionTuning { fused: fused.clone(), shape, scale });
                    }
                }
            }
            let runs = match regimes.get(&fused).copied().unwrap_or_default() {
                [true, false] => vec![v3c_compiler::tune::DECODE_M],
                [false, true] => vec![v3c_compiler::tune::PREFILL_M],
                _ => vec![v3c_compiler::tune::DECODE_M, v3c_compiler::tune::PREFILL_M],
            };
            // A step of one regime runs at that regime's M only (if its kernel runs there at all).
            let step_runs = |only: Option<Regime>| -> Vec<usize> {
                let Some(r) = only else { return runs.clone() };
                let m = [v3c_compiler::tune::DECODE_M, v3c_compiler::tune::PREFILL_M][r.index()];
                runs.iter().copied().filter(|&at| at == m).collect()
            };
            // The reductions: a whole row kernel, or steps of a compound one.
            let row_kernels: Vec<(String, v3c_compiler::conversion::sm90::rows::RowKernel, Vec<usize>)> =
                match v3c_compiler::conversion::sm90::row_launch(&f, caches) {
                    Ok(launch) if steps.is_none() => vec![(fused.clone(), launch.kernel, runs.clone())],
                    _ => lower::steps_of_kernel(&f)
                        .map(|s| {
                            s.steps
                                .into_iter()
                                .enumerate()
                                .filter_map(|(i, step)| match step.kernel {
                                    lower::StepKernel::Row(k) => {
                                        Some((format!("{fused}.{i}"), k, step_runs(step.only)))
                                    }
                                    _ => None,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                };
            for (name, k, runs) in row_kernels {
                for &m in &runs {
                    let Some(shape) = v3c_compiler::tune::rows::RowShape::of(&k, m) else { continue };
                    let key = (shape.signature(), shape.bucket());
                    if !rows.iter().any(|r: &RowTuning| (r.shape.signature(), r.shape.bucket()) == key) {
                        rows.push(RowTuning { name: name.clone(), shape });
                    }
                }
            }
            // Prefill's GEMMs at the smaller buckets asked for too.
            let with_smaller = |mut runs: Vec<usize>| {
                if runs.contains(&v3c_compiler::tune::PREFILL_M) {
                    runs.extend(prefill_rows.iter().filter(|m| !runs.contains(m)).collect::<Vec<_>>());
                }
                runs
            };
            if let Ok(g) = lower::gemm_of_kernel(&f) {
                gemms.push((g, with_smaller(runs)));
            } else if let Ok(steps) = lower::mla_prefill_steps(&f, v3c_compiler::conversion::sm90::rows::CacheRows::F32)
                .or_else(|_| lower::steps_of_kernel(&f))
            {
                // (The prefill attention's kv_b GEMM whichever --prefill-attention compile takes.)
                gemms.extend(steps.steps.into_iter().filter_map(|s| match s.kernel {
                    lower::StepKernel::Gemm(g) => {
                        Some((g, with_smaller(step_runs(s.only)))).filter(|(_, runs)| !runs.is_empty())
                    }
                    lower::StepKernel::Row(_) | lower::StepKernel::MlaPrefill(_) | lower::StepKernel::MlaDecode(_) => {
                        None
                    }
                }));
            }
        }
    }
    if gemms.is_empty() {
        return Err(format!("{model}: no kernel maps onto the sm_90a GEMM template (try --precision fp8)"));
    }
    // Greedy sampling's argmax over the vocabulary, at decode's rows (as `compile` picks it);
    // training samples nothing.
    let argmax = v3c_compiler::conversion::sm90::rows::RowKernel::new(
        v3c_compiler::conversion::sm90::rows::RowOp::Argmax,
        config.vocab_size,
        "f32",
    );
    let shape = v3c_compiler::tune::rows::RowShape::of(&argmax, v3c_compiler::tune::DECODE_M);
    if let (None, Some(shape)) = (train, shape) {
        rows.push(RowTuning { name: v3c_compiler::conversion::sm90::ARGMAX.into(), shape });
    }
    Ok(ModelProblems { gemms, attention, rows })
}

/// `v3c tune`: `--emit-candidates DIR` compiles, for every GEMM problem of the model (kernel
/// signature x the decode/prefill Ms its entries run it at) and every tensor-core attention kernel
/// (its ring depths), the cost model's best candidates on all cores, drops those ptxas reports
/// spilling, and writes their PTX and `candidates.json` for measurement on a GPU machine (`v3r tune
/// DIR` writes the tuning database); `--out FILE` does both here, on this machine's GPU; `--report
/// --tuning FILE` prints, per kernel, default vs tuned time.
pub fn tune(o: &TuneOptions) -> Result<(), String> {
    use v3c_compiler::tune::{self, db::DbLookup as _, db::TuningDb, GemmShape};
    let device = v3c_compiler::target::DeviceModel::by_name(o.gpu)?;
    if o.report {
        let path = o.tuning.ok_or("--report: name the database with --tuning FILE")?;
        let db = TuningDb::read(path)?;
        let ModelProblems { gemms, attention, rows } =
            model_problems(o.model, o.precision, o.train.as_ref(), o.prefill_rows)?.only(o.only)?;
        println!(
            "{:<20} {:>6} {:<44} {:>10} {:>10} {:>8}  winner",
            "kernel", "M", "signature", "default ms", "tuned ms", "speedup"
        );
        // One line per problem: the entry's default and winner, or why none applies.
        let version = env!("CARGO_PKG_VERSION");
        fn line<C>(kernel: &str, m: usize, signature: &str, lookup: tune::db::Lookup<'_, C>, name: fn(&C) -> String) {
            match lookup {
                tune::db::Lookup::Tuned { config, entry } => {
                    let (_, ms) = entry.winner().unwrap_or(("", f64::NAN));
                    let default = entry.default_ms().unwrap_or(f64::NAN);
                    let winner = name(&config);
                    println!(
                        "{kernel:<20} {m:>6} {signature:<44} {default:>10.4} {ms:>10.4} {:>7.2}x  {winner}",
                        default / ms
                    );
                }
                tune::db::Lookup::Ignored(why) => println!("{kernel:<20} {m:>6} {signature:<44}  ignored: {why}"),
                tune::db::Lookup::Missing => println!("{kernel:<20} {m:>6} {signature:<44}  no entry"),
            }
        }
        for (g, runs) in &gemms {
            for &m in runs {
                let shape = GemmShape::of(g, m);
                let sha = tune::candidates_sha256(&tune::candidates(&shape, &device.target));
                let found = db.lookup(&shape.signature(), tune::m_bucket(m), &device, version, &sha);
                line(
                    &g.kernel,
                    m,
                    &shape.signature(),
                    found,
                    |c: &v3c_compiler::conversion::sm90::gemm::GemmConfig| c.kernel_name(),
                );
            }
        }
        for a in &attention {
            let shape = &a.shape;
            let sha = tune::attention::candidates_sha256(&tune::attention::candidates(shape, &device.target));
            let found = db.lookup(&shape.signature(), shape.bucket(), &device, version, &sha);
            line(&a.fused, shape.rows(), &shape.signature(), found, |c: &tune::attention::AttentionConfig| {
                c.kernel_name()
            });
        }
        for r in &rows {
            let shape = &r.shape;
            let sha = tune::rows::candidates_sha256(&tune::rows::candidates(shape, &device.target));
            let found = db.lookup(&shape.signature(), shape.bucket(), &device, version, &sha);
            line(
                &r.name,
                shape.rows,
                &shape.signature(),
                found,
                |k: &v3c_compiler::conversion::sm90::rows::RowKernel| k.kernel_name(),
            );
        }
        return Ok(());
    }
    let Some(dir) = o.emit_candidates else {
        // One machine with a GPU: the candidates compiled into a scratch directory, measured here.
        let out = o.out.ok_or_else(|| {
            format!(
                "give --out tuning.json to measure on this machine's GPU, or --emit-candidates DIR to measure on \
                 another (`v3r tune DIR --out tuning.json` there; model {})",
                o.model
            )
        })?;
        let device = v3c_runtime::device::probe_device(0).map_err(|e| {
            format!("measuring needs this machine's GPU: {e}; use the split flow: `v3c tune --emit-candidates DIR` here, `v3r tune DIR --out tuning.json` on the GPU machine")
        })?;
        let scratch = tempfile::tempdir().map_err(|e| format!("a scratch directory: {e}"))?;
        let candidates = scratch.path().join("candidates");
        tune(&TuneOptions { emit_candidates: Some(&candidates), train: o.train.clone(), ..*o })?;
        let written =
            v3c_runtime::measure::tune(&candidates, out, 20, device.ordinal, false, &mut |line| println!("{line}"))?;
        eprintln!("tune: {written} entries measured on {} written to {}", device.name, out.display());
        return Ok(());
    };
    if dir.exists() {
        return Err(format!("{}: already exists (candidates are written into a new directory)", dir.display()));
    }
    let ModelProblems { gemms, attention, rows } =
        model_problems(o.model, o.precision, o.train.as_ref(), o.prefill_rows)?.only(o.only)?;
    // Distinct problems: several kernels of the model may share a signature.
    let mut problems: Vec<(GemmShape, Vec<String>)> = Vec::new();
    for (g, runs) in &gemms {
        for &m in runs {
            let shape = GemmShape::of(g, m);
            match problems.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, kernels)) => kernels.push(g.kernel.clone()),
                None => problems.push((shape, vec![g.kernel.clone()])),
            }
        }
    }
    let ptxas = v3c_compiler::toolchain::find(v3c_compiler::toolchain::Tool::Ptxas).ok();
    // Per problem, the ranked candidates to compile until `top` assemble without spills.
    let ranked: Vec<Vec<tune::Estimate>> =
        problems.iter().map(|(s, _)| tune::diverse(&tune::rank(s, &device))).collect();
    let staging = tempfile::Builder::new()
        .prefix(".v3c-candidates-")
        .tempdir_in(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::create_dir_all(staging.path().join("kernels")).map_err(|e| e.to_string())?;
    let attention_ranked: Vec<Vec<tune::attention::AttentionEstimate>> =
        attention.iter().map(|a| tune::attention::rank(&a.shape, &device)).collect();
    let total: usize = ranked.iter().map(|r| r.len().min(o.top * 2)).sum::<usize>()
        + attention_ranked.iter().map(|r| r.len().min(o.top)).sum::<usize>()
        + rows.len() * o.top;
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} candidates {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("compiling candidates for {}", device.name));
    let mut problem_json = Vec::new();
    let compiled: std::sync::Mutex<std::collections::BTreeMap<String, Option<serde_json::Value>>> = Default::default();
    for ((shape, kernels), estimates) in problems.iter().zip(&ranked) {
        // Compile in rounds of as many candidates as there are cores until `top` survive.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut survivors = Vec::new();
        let mut next = 0;
        while survivors.len() < o.top && next < estimates.len().min(o.top * 4) {
            let round: Vec<&tune::Estimate> = estimates[next..].iter().take(threads).collect();
            next += round.len();
            std::thread::scope(|scope| {
                for e in &round {
                    let (compiled, bar, ptxas, staging) = (&compiled, &bar, &ptxas, staging.path());
                    scope.spawn(move || {
                        let name = e.config.kernel_name();
                        if compiled.lock().unwrap().contains_key(&name) {
                            return;
                        }
                        let context = v3c_compiler::mlir::new_context();
                        let result = v3c_compiler::conversion::sm90::compile_gemm(&context, &e.config, &device.target)
                            .and_then(|mut k| {
                                if let Some(p) = ptxas {
                                    k.assemble(&device.target, p)?;
                                }
                                Ok(k)
                            });
                        let entry = match result {
                            Ok(k) if k.resources.as_ref().and_then(|r| r.unfit()).is_some() => None,
                            Ok(k) => {
                                let ok =
                                    std::fs::write(staging.join("kernels").join(format!("{name}.ptx")), &k.ptx).is_ok();
                                ok.then(|| {
                                    serde_json::json!({
                                        "name": name,
                                        "threads": k.threads,
                                        "dynamic_shared_memory_bytes": k.shared_memory_bytes,
                                        "registers": k.resources.as_ref().map(|r| r.registers),
                                        "abi": e.config.host_abi(),
                                    })
                                })
                            }
                            Err(_) => None,
                        };
                        compiled.lock().unwrap().insert(name.clone(), entry);
                        bar.inc(1);
                        bar.set_message(name);
                    });
                }
            });
            let done = compiled.lock().unwrap();
            for e in &round {
                if let Some(Some(info)) = done.get(&e.config.kernel_name()) {
                    if survivors.len() < o.top {
                        let mut info = info.clone();
                        info["estimate_us"] = serde_json::json!(e.micros);
                        info["splits"] = serde_json::json!(e.splits);
                        survivors.push(info);
                    }
                }
            }
        }
        if survivors.is_empty() {
            return Err(format!("{}: no candidate assembles without spills", shape.signature()));
        }
        let default = survivors[0]["name"].clone();
        problem_json.push(serde_json::json!({
            "kernel": shape.signature(),
            "model_kernels": kernels,
            "m": shape.m,
            "m_bucket": shape.bucket(),
            "n": shape.n,
            "k": shape.k,
            "residual": shape.residual,
            "grouped": shape.grouped.map(|g| serde_json::json!({
                "routed": g.routed,
                "shared": g.shared,
                "top_k": g.top_k,
            })),
            "candidates_sha256": tune::candidates_sha256(&tune::candidates(shape, &device.target)),
            "default": default,
            "candidates": survivors,
        }));
    }
    // The attention kernels: each ring depth the cost model ranks in its `top`, spilling ones dropped.
    // A candidate compiled (with ptxas: assembled) into the staging directory; None: it spills.
    let emit =
        |kernel: Result<v3c_compiler::conversion::sm90::GpuKernel, _>, extra: serde_json::Value| -> Result<_, String> {
            let mut k = kernel.map_err(|err: v3c_compiler::conversion::sm90::Sm90Error| err.to_string())?;
            bar.set_message(k.name.clone());
            if let Some(p) = &ptxas {
                k.assemble(&device.target, p).map_err(|err| err.to_string())?;
            }
            bar.inc(1);
            if k.resources.as_ref().and_then(|r| r.unfit()).is_some() {
                return Ok(None);
            }
            let path = staging.path().join("kernels").join(format!("{}.ptx", k.name));
            std::fs::write(&path, &k.ptx).map_err(|err| format!("{}: {err}", path.display()))?;
            let mut entry = serde_json::json!({
                "name": k.name,
                "threads": k.threads,
                "dynamic_shared_memory_bytes": k.shared_memory_bytes,
                "registers": k.resources.as_ref().map(|r| r.registers),
            });
            entry.as_object_mut().expect("an object").extend(extra.as_object().cloned().unwrap_or_default());
            Ok(Some(entry))
        };
    for (a, estimates) in attention.iter().zip(&attention_ranked) {
        let context = v3c_compiler::mlir::new_context();
        let mut survivors = Vec::new();
        for e in estimates.iter().take(o.top) {
            let kernel = v3c_compiler::conversion::sm90::compile_attention(&context, &e.config, &device.target);
            survivors.extend(emit(kernel, serde_json::json!({ "estimate_us": e.micros, "splits": e.splits }))?);
        }
        let Some(default) = survivors.first().map(|c| c["name"].clone()) else {
            return Err(format!("{}: no candidate assembles without spills", a.shape.signature()));
        };
        use tune::attention::AttentionShape;
        let problem = match a.shape {
            AttentionShape::Decode { heads, kv, rope, fp8_cache, context, .. } => serde_json::json!({
                "kind": "decode", "heads": heads, "kv": kv, "rope": rope, "fp8_cache": fp8_cache,
                "context": context, "scale": a.scale,
            }),
            AttentionShape::Selected { .. } => return Err(format!("{}: not a tunable kernel", a.shape.signature())),
            AttentionShape::Prefill { heads, qk, v, .. } => {
                let mut problem = serde_json::json!({
                    "kind": "prefill", "heads": heads, "qk": qk, "v": v, "scale": a.scale,
                });
                // A training step's kernels: which (the forward's log-sum-exps, a gradient).
                let flash = a.shape.flash_kind().unwrap_or_default();
                if flash != v3c_runtime::abi::FlashKind::Forward {
                    problem["flash"] = serde_json::to_value(flash).map_err(|e| e.to_string())?;
                }
                problem
            }
        };
        problem_json.push(serde_json::json!({
            "kernel": a.shape.signature(),
            "model_kernels": [a.fused],
            "m": a.shape.rows(),
            "m_bucket": a.shape.bucket(),
            "attention": problem,
            "candidates_sha256":
                tune::attention::candidates_sha256(&tune::attention::candidates(&a.shape, &device.target)),
            "default": default,
            "candidates": survivors,
        }));
    }
    // The reductions: each block width the cost model ranks in its `top`, spilling ones dropped.
    for r in &rows {
        let context = v3c_compiler::mlir::new_context();
        let mut survivors = Vec::new();
        for e in tune::rows::rank(&r.shape, &device).iter().take(o.top) {
            let kernel = v3c_compiler::conversion::sm90::compile_rows(&context, &e.kernel, &device.target);
            survivors.extend(emit(kernel, serde_json::json!({ "estimate_us": e.micros }))?);
        }
        let Some(default) = survivors.first().map(|c| c["name"].clone()) else {
            return Err(format!("{}: no candidate assembles without spills", r.shape.signature()));
        };
        let operands: Vec<serde_json::Value> = r
            .shape
            .operands()
            .into_iter()
            .map(|(name, shape, element, output)| {
                serde_json::json!({ "name": name, "shape": shape, "element": element, "output": output })
            })
            .collect();
        problem_json.push(serde_json::json!({
            "kernel": r.shape.signature(),
            "model_kernels": [r.name],
            "m": r.shape.rows,
            "m_bucket": r.shape.bucket(),
            "rows": {
                "operands": operands,
                "rmsnorm_eps": match r.shape.kernel.op {
                    v3c_compiler::conversion::sm90::rows::RowOp::RmsNorm { eps, .. } => Some(eps),
                    _ => None,
                },
                "argmax": r.shape.kernel.op == v3c_compiler::conversion::sm90::rows::RowOp::Argmax,
            },
            "candidates_sha256": tune::rows::candidates_sha256(&tune::rows::candidates(&r.shape, &device.target)),
            "default": default,
            "candidates": survivors,
        }));
    }
    bar.finish_and_clear();
    let manifest = serde_json::json!({
        "format_version": 1,
        "compiler_version": env!("CARGO_PKG_VERSION"),
        "git_hash": env!("V3C_GIT_HASH"),
        "gpu": device.name,
        "compute_capability": device.target.compute_capability,
        "model": o.model,
        "assembled": ptxas.is_some(),
        "problems": problem_json,
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())? + "\n";
    std::fs::write(staging.path().join("candidates.json"), text).map_err(|e| e.to_string())?;
    let n_kernels = std::fs::read_dir(staging.path().join("kernels")).map_err(|e| e.to_string())?.count();
    let staged = staging.keep();
    std::fs::rename(&staged, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    eprintln!(
        "wrote {}: {} problems ({} attention, {} reductions), {n_kernels} candidate kernels (PTX{}); measure them on a {} with \
         `v3r tune {} --out tuning.json` (or benches/device/tune_check.py), then `v3c compile --tuning \
         tuning.json`",
        dir.display(),
        problems.len() + attention.len() + rows.len(),
        attention.len(),
        rows.len(),
        if ptxas.is_some() { ", spilling ones dropped by ptxas" } else { "; no ptxas here: spills unchecked" },
        device.name,
        dir.display()
    );
    Ok(())
}

pub struct TrainOptions<'a> {
    pub run: v3c_runtime::training::RunOptions<'a>,
    pub backend: &'a str,
}

/// `v3c train` on the reference or cpu backend ([`v3c_runtime::training`]): the cpu backend
/// compiles the training graph before anything is written.
pub fn train(o: &TrainOptions) -> Result<(), String> {
    match o.backend {
        "reference" | "cpu" => {}
        "cuda" => return train_on_gpu(o),
        other => return Err(format!("--backend {other}: unknown (reference, cpu, cuda)")),
    }
    let run = v3c_runtime::training::Run::prepare(&o.run)?;
    if o.backend == "reference" {
        return run.execute(&o.run, &mut v3c_models::train::Reference::default(), o.backend);
    }
    let context = v3c_compiler::mlir::new_context();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("compiling the training step [{bar:30}] {pos}/{len} kernels {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut step = v3c_compiler::cpu_backend::CpuTrainStep::for_graph(
        &context,
        run.trainer.graph(),
        &run.config,
        KernelCache::from_env().as_ref(),
        &mut |done, total, k| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(k.name.clone());
        },
    )
    .map_err(|e| format!("--backend cpu: {e}"))?;
    bar.finish_and_clear();
    run.execute(&o.run, &mut step, o.backend)
}

/// `v3c train --backend cuda`: the training step compiled for sm_90a into a scratch artifact, then
/// run on this machine's GPU as `v3r train` runs one (the step's launches, AdamW and the state it
/// keeps, all on the device). Without a GPU it stops before anything is compiled or written.
fn train_on_gpu(o: &TrainOptions) -> Result<(), String> {
    let device = cuda_device()?;
    let run = v3c_runtime::training::Run::prepare(&o.run)?;
    let source = if o.run.resume { o.run.out } else { o.run.model_dir };
    let precision = if o.run.fp8 { v3c_models::Precision::Fp8 } else { v3c_models::Precision::F32 };
    let sizes = v3c_compiler::plan::PlanSizes::new(o.run.seq, 0);
    let (loaded, _scratch) = compile_and_load(&device, source, precision, sizes, Some(&run.trainer))?;
    let mut step = v3c_runtime::training::ArtifactStep::new(loaded, &run.trainer, o.run.seq)?.on_device()?;
    run.execute(&o.run, &mut step, &format!("cuda:{} ({}, sm_90a, AdamW on the device)", device.ordinal, device.name))
}

/// `v3c emulate --ptx`: how the kernels' PTX is simulated and what is reported of it.
#[derive(Debug, Clone, Copy)]
pub struct Simulation {
    pub checks: v3c_ptxsim::Checks,
    /// Per kernel, this many of its most wasteful memory instructions listed (`--worst-accesses`).
    pub worst_accesses: usize,
}

/// The simulated kernels' profile, most instructions first: launches, instructions (all threads',
/// and the busiest thread's summed over the launches), the global-load latencies the thread that
/// waited most waited out (summed over the launches; in PTX order: a kernel whose launch these
/// dominate is latency-bound), global requests and the share of their
/// sectors' bytes used (coalescing), shared requests, their wavefronts each (1 for 4-byte lanes, 4
/// for 16-byte lanes) and those per the fewest they could take (1: no bank conflicts); with the race check, that it found none (a race fails
/// the run before); then each kernel's most wasteful accesses ([`worst_accesses`]).
fn simulated_profile(
    by_kernel: &std::collections::BTreeMap<String, (usize, v3c_ptxsim::Stats)>,
    simulation: Simulation,
) -> String {
    let mut rows: Vec<_> = by_kernel.iter().collect();
    rows.sort_by(|a, b| b.1 .1.instructions.cmp(&a.1 .1.instructions).then(a.0.cmp(b.0)));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(6).max(6);
    let mut out = format!(
        "simulated PTX, per kernel:\n  {:width$}  {:>8}  {:>14}  {:>14}  {:>11}  {:>10}  {:>6}  {:>10}  {:>10}  {:>9}\n",
        "kernel",
        "launches",
        "instructions",
        "longest thread",
        "load rounds",
        "global req",
        "used",
        "shared req",
        "wavefronts",
        "conflicts"
    );
    for (kernel, (launches, s)) in rows {
        let used =
            if s.global_requests == 0 { "-".to_string() } else { format!("{:.0}%", 100.0 * s.global_efficiency()) };
        let waves =
            if s.shared_requests == 0 { "-".to_string() } else { format!("{:.2}", s.shared_wavefronts_per_request()) };
        let conflicts =
            if s.shared_requests == 0 { "-".to_string() } else { format!("{:.2}", s.shared_conflict_factor()) };
        out.push_str(&format!(
            "  {kernel:width$}  {launches:>8}  {:>14}  {:>14}  {:>11}  {:>10}  {used:>6}  {:>10}  {waves:>10}  {conflicts:>9}\n",
            s.instructions, s.longest_thread, s.load_rounds, s.global_requests, s.shared_requests
        ));
    }
    if simulation.checks.races {
        let launches: usize = by_kernel.values().map(|(n, _)| n).sum();
        out.push_str(&format!(
            "no data race on shared or global memory in {launches} launches (happens-before check)\n"
        ));
    }
    if simulation.worst_accesses > 0 {
        out.push_str(&worst_accesses(by_kernel, simulation.worst_accesses));
    }
    out
}

/// Each kernel's `n` memory instructions that waste the most (most first; those that waste
/// nothing left out), kernels in the order of what they waste in all: global sector bytes moved
/// but not asked for, shared wavefronts past the fewest the requests could take (bank conflicts),
/// with the instruction's PTX line.
fn worst_accesses(by_kernel: &std::collections::BTreeMap<String, (usize, v3c_ptxsim::Stats)>, n: usize) -> String {
    let wasted = |s: &v3c_ptxsim::Stats| -> (u64, u64) {
        (32 * s.global_sectors - s.global_bytes, s.shared_wavefronts - s.shared_least_wavefronts)
    };
    let mut kernels: Vec<_> = by_kernel.iter().filter(|(_, (_, s))| wasted(s) != (0, 0)).collect();
    kernels.sort_by(|a, b| wasted(&b.1 .1).cmp(&wasted(&a.1 .1)).then(a.0.cmp(b.0)));
    if kernels.is_empty() {
        return "every simulated load and store used all its sectors' bytes, without bank conflicts\n".into();
    }
    let mut out = format!("the {n} most wasteful loads and stores of each kernel, by line of kernels/NAME.ptx:\n");
    for (kernel, (_, s)) in kernels {
        let (global, shared) = wasted(s);
        out.push_str(&format!(
            "  {kernel}: {global} global bytes moved unasked ({:.0}% used), {shared} shared wavefronts past the fewest \
             the requests could take\n",
            100.0 * s.global_efficiency()
        ));
        let mut lines: Vec<_> = s.accesses.iter().filter(|(_, a)| a.waste() > 0).collect();
        // Global waste in bytes, shared in wavefronts of 128 bytes: one order for both.
        let weight = |a: &v3c_ptxsim::MemoryAccess| if a.shared { 128 * a.waste() } else { a.waste() };
        lines.sort_by(|a, b| weight(b.1).cmp(&weight(a.1)).then(a.0.cmp(b.0)));
        for (line, a) in lines.into_iter().take(n) {
            let what = if a.shared {
                format!("{} requests, {:.2} wavefronts each", a.requests, a.wavefronts as f64 / a.requests as f64)
            } else {
                format!(
                    "{} requests, {} sectors, {:.0}% of their bytes used",
                    a.requests,
                    a.sectors,
                    100.0 * a.bytes as f64 / (32 * a.sectors) as f64
                )
            };
            out.push_str(&format!("    line {line:>6}  {what}  `{}`\n", a.text));
        }
    }
    out
}

/// `v3c emulate` of a training-step artifact: one window (`tokens`: the inputs and their targets,
/// as `v3r train` cuts them from its data) through the step, its loss and every gradient written to
/// `out` (safetensors), every launch's buffers to `dump` — what `V3R_DUMP_DIR` makes `v3r train`
/// write on the GPU for the same window (a data file of exactly one window).
#[allow(clippy::too_many_arguments)]
fn emulate_train_step(
    a: &v3c_runtime::artifact::Artifact,
    weights: &Path,
    ckpt: &v3c_models::checkpoint::Checkpoint,
    info: &v3c_runtime::artifact::TrainingInfo,
    tokens: &[u32],
    out: &Path,
    dump: Option<&Path>,
    ptx: Option<Simulation>,
) -> Result<(), String> {
    use v3c_models::train::{load_params, TrainConfig, Trainer};
    let config = ModelConfig::resolve(&weights.display().to_string()).map_err(|e| e.to_string())?;
    let params = load_params(&config, ckpt).map_err(|e| e.to_string())?;
    let train = TrainConfig {
        mtp_weight: info.mtp_weight,
        balance_alpha: info.balance_alpha,
        fp8: info.fp8,
        ..Default::default()
    };
    let trainer = Trainer::new(&config, params, train).map_err(|e| e.to_string())?;
    let entry = v3c_runtime::training::TRAIN_ENTRY;
    let plan = a.plan.entries.iter().find(|e| e.name == entry).ok_or("the artifact has no training step")?;
    let rows = tokens.len().saturating_sub(trainer.window_extra());
    if rows == 0 || rows > plan.sizes.rows {
        return Err(format!(
            "{} tokens: a window is 1..={} tokens plus {} (the targets), as the plan holds",
            tokens.len(),
            plan.sizes.rows,
            trainer.window_extra()
        ));
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let inputs = trainer.window_inputs(&ids).map_err(|e| e.to_string())?;
    let host = v3c_runtime::training::host_inputs(&inputs).map_err(|e| e.to_string())?;
    let context = v3c_compiler::mlir::new_context();
    let mut emulator = v3c_compiler::emulate::Emulator::new(&context, a, &v3c_runtime::gpu::Weights::Checkpoint(ckpt))?;
    if let Some(simulation) = ptx {
        emulator.simulate_ptx(simulation.checks);
    }
    let names: Vec<String> = trainer.graph().outputs.iter().map(|(n, _)| n.clone()).collect();
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    let start = Instant::now();
    let outs = emulator.run(entry, &host, &wanted, dump)?;
    if let Some(simulation) = ptx {
        eprint!("{}", simulated_profile(emulator.simulated(), simulation));
    }
    let tensors = v3c_runtime::training::output_tensors(outs).map_err(|e| e.to_string())?;
    let mut named: Vec<(&str, &v3c_models::tensor::Tensor)> =
        names.iter().filter_map(|n| tensors.get(n).filter(|t| t.as_f32().is_some()).map(|t| (n.as_str(), t))).collect();
    named.sort_by(|x, y| x.0.cmp(y.0));
    save_tensors(out, &named).map_err(|e| e.to_string())?;
    let loss = tensors.get("loss").and_then(|t| t.as_f32()).and_then(|v| v.first().copied()).unwrap_or(f32::NAN);
    eprintln!(
        "emulated the training step ({} fused launches) on a window of {rows} tokens in {:.2} s: loss {loss}; wrote \
         the loss and {} gradients to {}{}",
        plan.launches.len(),
        start.elapsed().as_secs_f64(),
        named.len() - 1,
        out.display(),
        dump.map_or(String::new(), |d| format!(", every launch's buffers to {}", d.display()))
    );
    Ok(())
}

/// `v3c emulate`: a GPU artifact's prefill of `tokens` from position 0 run on this CPU
/// ([`v3c_compiler::emulate`]), its logits written to `out`, every launch's buffers to `dump`;
/// `ptx`: the kernels' PTX simulated instead, and their profile reported.
pub fn emulate(
    artifact: &Path,
    weights: &Path,
    tokens: &str,
    out: &Path,
    dump: Option<&Path>,
    decode_steps: usize,
    ptx: Option<Simulation>,
) -> Result<(), String> {
    use v3c_runtime::host::{HostBuffer, HostData};
    let tokens = v3c_runtime::cli::parse_token_ids(tokens, "--tokens")?;
    let a = v3c_runtime::artifact::Artifact::open(artifact).map_err(|e| e.to_string())?;
    if a.lowering.is_none() {
        return Err(format!(
            "{}: a {} artifact: emulation runs GPU artifacts",
            artifact.display(),
            a.manifest.target.name
        ));
    }
    a.check_weights(weights)?;
    if let Some(d) = dump.filter(|d| d.exists()) {
        return Err(format!("{}: already exists (dumps go into a new directory)", d.display()));
    }
    let ckpt = v3c_models::checkpoint::Checkpoint::open(weights).map_err(|e| e.to_string())?;
    if let Some(info) = a.manifest.training.clone() {
        return emulate_train_step(&a, weights, &ckpt, &info, &tokens, out, dump, ptx);
    }
    let plan = a.plan.entries.iter().find(|e| e.name == "prefill").ok_or("the artifact has no prefill entry")?;
    if tokens.is_empty() || tokens.len() > plan.sizes.rows {
        return Err(format!(
            "{} tokens: the prefill plan holds 1..={} (one prefill is emulated)",
            tokens.len(),
            plan.sizes.rows
        ));
    }
    let ids = |v: Vec<i64>| HostBuffer { shape: vec![v.len()], data: HostData::I64(v) };
    let mut inputs = std::collections::HashMap::new();
    for (name, shape) in &plan.bounds {
        let value = match name.as_str() {
            "tokens" => ids(tokens.iter().map(|&t| i64::from(t)).collect()),
            "positions" => ids((0..tokens.len() as i64).collect()),
            // The MTP layer at position i reads token i + 1 (0 past the prompt), as v3r's sessions feed it.
            "mtp_tokens" => ids(tokens.iter().skip(1).map(|&t| i64::from(t)).chain([0]).collect()),
            cache if cache.starts_with("kv_cache.") => {
                HostBuffer { shape: vec![0, *shape.last().unwrap_or(&0)], data: HostData::F32(Vec::new()) }
            }
            other => return Err(format!("the prefill entry has an input {other} emulate does not fill")),
        };
        inputs.insert(name.clone(), value);
    }
    let context = v3c_compiler::mlir::new_context();
    let mut emulator =
        v3c_compiler::emulate::Emulator::new(&context, &a, &v3c_runtime::gpu::Weights::Checkpoint(&ckpt))?;
    if let Some(simulation) = ptx {
        emulator.simulate_ptx(simulation.checks);
    }
    let start = Instant::now();
    let mut wanted: Vec<&str> = plan.bounds.keys().filter(|n| n.starts_with("kv_cache.")).map(String::as_str).collect();
    // The launches `v3r run` runs (and dumps, launch by launch): not the MTP module's past its
    // cache row.
    wanted.extend(["logits", v3c_runtime::plan::ONLY_WANTED]);
    let outs = emulator.run("prefill", &inputs, &wanted, dump)?;
    let logits = outs.get("logits").ok_or("the prefill entry has no logits")?;
    let HostData::F32(values) = &logits.data else { return Err("logits are not f32".into()) };
    // Decode steps as `v3r run --max-new-tokens {decode_steps + 1}` takes them: greedy tokens, one
    // sequence over caches of prompt + new rows, MTP tokens 0.
    if decode_steps > 0 {
        let decode = a.plan.entries.iter().find(|e| e.name == "decode").ok_or("the artifact has no decode entry")?;
        // Caches in whole pages where the decode attention reads bf16 pages in place.
        let multiple = a.lowering.as_ref().and_then(|l| l.cache_rows_multiple).unwrap_or(1);
        let max_len = (tokens.len() + decode_steps + 1).next_multiple_of(multiple);
        if max_len > decode.sizes.context {
            return Err(format!("{max_len} rows: the decode plan holds {}", decode.sizes.context));
        }
        let mut state: std::collections::HashMap<String, HostBuffer> = std::collections::HashMap::new();
        // One sequence's caches of max_len rows, or the pages of a pool (as `v3r run`'s session).
        let paged = v3c_runtime::pages::DecodeCaches::paged_entry(&decode.bounds);
        let mut layout = None;
        for (name, b) in &outs {
            if !name.starts_with("kv_cache.") {
                continue;
            }
            // (bf16 caches widened exactly; the decode entry's own element is the plan's.)
            let HostData::F32(rows) = b.clone().into_f32().data else { continue };
            let width = b.shape[1];
            let layout =
                layout.get_or_insert_with(|| v3c_runtime::pages::DecodeCaches::new(&[max_len], max_len, width, paged));
            state.insert(name.clone(), layout.lay_out(&[&rows])?);
        }
        let mut last: Vec<f32> = values[values.len() - logits.shape[1]..].to_vec();
        let mut greedy = v3c_models::reference::Sampler::new(0.0, 1.0, 0);
        for step in 0..decode_steps {
            let token = greedy.sample(&last);
            let mut inputs = state.clone();
            let position = tokens.len() + step;
            if let Some(table) = layout.as_mut().map(|l| l.step(&[position], &[true], &[0])).transpose()?.flatten() {
                inputs.insert(v3c_runtime::plan::PAGE_POOL.into(), table);
            }
            inputs.insert("tokens".into(), ids(vec![i64::from(token)]));
            inputs.insert("positions".into(), ids(vec![position as i64]));
            if decode.bounds.contains_key("mtp_tokens") {
                inputs.insert("mtp_tokens".into(), ids(vec![0]));
            }
            let mut want: Vec<&str> = state.keys().map(String::as_str).collect();
            want.extend(["logits", v3c_runtime::plan::ONLY_WANTED]);
            let mut step_out = emulator.run("decode", &inputs, &want, dump)?;
            let HostData::F32(l) = &step_out["logits"].data else { return Err("decode logits are not f32".into()) };
            last = l.clone();
            for name in state.clone().keys() {
                if let Some(b) = step_out.remove(name) {
                    state.insert(name.clone(), b);
                }
            }
            eprintln!("emulated decode step {step}: token {token} at position {}", tokens.len() + step);
        }
    }
    if let Some(simulation) = ptx {
        eprint!("{}", simulated_profile(emulator.simulated(), simulation));
    }
    let tensor = v3c_models::tensor::Tensor::f32(logits.shape.clone(), values.clone());
    save_tensors(out, &[("logits", &tensor)]).map_err(|e| e.to_string())?;
    eprintln!(
        "emulated the prefill ({} fused launches) of {} tokens in {:.2} s; wrote logits {:?} to {}{}",
        plan.launches.len(),
        tokens.len(),
        start.elapsed().as_secs_f64(),
        logits.shape,
        out.display(),
        dump.map_or(String::new(), |d| format!(", every launch's buffers to {}", d.display()))
    );
    Ok(())
}
