//! The CPU backend: runs entry points of the `fused` stage on this machine, every kernel JIT-compiled
//! from MLIR ([`crate::conversion::v3_to_cpu`]); no op falls back to hand-written numerics.
//!
//! A [`CpuProgram`] is built once per model: the pipeline runs to `fused` (with dense f32 weights:
//! fp8 and bf16 weights are converted at load, as the reference interpreter does in f32 precision),
//! every kernel function is compiled, and the weights every entry reads are loaded (MoE experts
//! stacked per layer). [`CpuProgram::run`] then walks an entry's launch list: it checks the inputs
//! (token ids in the vocabulary, cache positions inside the caches), infers each launch's output
//! shapes, allocates them, and launches.
//!
//! Not handled yet: fp8 precision (fp8 activations / block-scaled GEMMs), a memory arena from a plan
//! (every launch allocates), tiling and vectorization, threads.

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::{Module, RegionLike, ValueLike};
use melior::Context;
use v3c_models::checkpoint::Checkpoint;
use v3c_models::{BuildOptions, Entry, ModelConfig};

use crate::conversion::v3_to_cpu::{CpuError, CpuKernel, HostBuffer, HostData, RawBuffer};
use crate::kernel_cache::KernelCache;
use crate::pipeline::Driver;

#[derive(Debug, thiserror::Error)]
pub enum CpuBackendError {
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Kernel(#[from] CpuError),
    #[error(transparent)]
    Checkpoint(#[from] v3c_models::checkpoint::CheckpointError),
    #[error("{0}")]
    Invalid(String),
}

/// What a function argument binds to.
#[derive(Debug, Clone)]
enum Binding {
    Input(String),
    Param(String),
}

fn bindings(attr_text: &str) -> Vec<Binding> {
    attr_text
        .split("}, {")
        .map(|a| {
            let value = |key: &str| {
                a.split(&format!("{key} = \"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_string)
            };
            match (value(v3c_dialects::INPUT_ATTR), value(v3c_dialects::PARAM_ATTR)) {
                (Some(i), _) => Binding::Input(i),
                (None, Some(p)) => Binding::Param(p),
                _ => Binding::Input(String::new()),
            }
        })
        .collect()
}

/// Runs the CPU kernel of the call being offered on other buffers (inputs, outputs shaped like
/// the call's).
pub type CpuLaunch<'a> = dyn Fn(&[&HostBuffer], &mut [HostBuffer]) -> Result<(), String> + 'a;

/// Computes a kernel call's outputs instead of its CPU kernel: `(kernel, inputs, outputs, the CPU
/// kernel)` -> whether it did ([`CpuProgram::run_with`]).
pub type KernelOverride<'a> =
    dyn FnMut(&str, &[&HostBuffer], &mut [HostBuffer], &CpuLaunch) -> Result<bool, String> + 'a;

/// A [`KernelOverride`] that is also given the fused kernels' module.
pub type ModuleKernelOverride<'a> =
    dyn FnMut(&Module, &str, &[&HostBuffer], &mut [HostBuffer], &CpuLaunch) -> Result<bool, String> + 'a;

/// A model compiled for the CPU, with its weights loaded.
pub struct CpuProgram<'c> {
    module: Module<'c>,
    kernels: HashMap<String, CpuKernel>,
    weights: HashMap<String, HostBuffer>,
    vocab: usize,
}

impl<'c> CpuProgram<'c> {
    /// Compiles `entries` of `config` and loads their weights from `checkpoint`.
    pub fn new(
        context: &'c Context,
        config: &ModelConfig,
        entries: &[Entry],
        skip_mtp: bool,
        precision: v3c_models::Precision,
        checkpoint: &Checkpoint,
    ) -> Result<CpuProgram<'c>, CpuBackendError> {
        CpuProgram::with_cache(context, config, entries, skip_mtp, precision, checkpoint, None)
    }

    /// As [`CpuProgram::new`], taking kernels from (and adding them to) `cache`.
    pub fn with_cache(
        context: &'c Context,
        config: &ModelConfig,
        entries: &[Entry],
        skip_mtp: bool,
        precision: v3c_models::Precision,
        checkpoint: &Checkpoint,
        cache: Option<&KernelCache>,
    ) -> Result<CpuProgram<'c>, CpuBackendError> {
        let CompiledModel { module, kernels } =
            compile_model(context, config, entries, skip_mtp, precision, cache, &mut |_, _, _| {})?;
        let mut weights = HashMap::new();
        let mut op = module.body().first_operation();
        while let Some(f) = op {
            op = f.next_in_block();
            if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
                continue;
            }
            let Ok(attrs) = f.attribute("arg_attrs") else { continue };
            let block = f
                .region(0)
                .ok()
                .and_then(|r| r.first_block())
                .ok_or_else(|| CpuBackendError::Invalid("entry without body".into()))?;
            for (i, b) in bindings(&attrs.to_string()).into_iter().enumerate() {
                let Binding::Param(name) = b else { continue };
                if weights.contains_key(&name) {
                    continue;
                }
                let ty = block.argument(i).map_err(|e| CpuBackendError::Invalid(e.to_string()))?.r#type().to_string();
                let shape = crate::verify::Shape::parse(&ty)
                    .ok_or_else(|| CpuBackendError::Invalid(format!("{name}: {ty}")))?;
                let dims: Vec<usize> = shape.dims.iter().map(|d| d.unwrap_or(0)).collect();
                weights.insert(name.clone(), load_weight(checkpoint, &name, &dims, &shape.element)?);
            }
        }
        Ok(CpuProgram { module, kernels, weights, vocab: config.vocab_size })
    }

    /// Compiles `graphs` (built already, e.g. a training step; see [`Driver::run_graphs`]) with no
    /// weights loaded: give them with [`CpuProgram::set_weight`] before running. `vocab` bounds
    /// the token ids (and targets) inputs may hold.
    pub fn from_graphs(
        context: &'c Context,
        label: &str,
        graphs: &[(&str, &v3c_models::Graph)],
        vocab: usize,
        cache: Option<&KernelCache>,
        progress: &mut dyn FnMut(usize, usize, &CpuKernel),
    ) -> Result<CpuProgram<'c>, CpuBackendError> {
        let CompiledModel { module, kernels } = compile_graphs(context, label, graphs, cache, progress)?;
        Ok(CpuProgram { module, kernels, weights: HashMap::new(), vocab })
    }

    /// The parameter names the entries bind (stacked experts as `...experts.*...`), sorted.
    pub fn param_names(&self) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        let mut op = self.module.body().first_operation();
        while let Some(f) = op {
            op = f.next_in_block();
            if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
                continue;
            }
            let Ok(attrs) = f.attribute("arg_attrs") else { continue };
            for b in bindings(&attrs.to_string()) {
                if let Binding::Param(name) = b {
                    names.insert(name);
                }
            }
        }
        names.into_iter().collect()
    }

    /// Sets (or replaces) the weight bound to parameter `name`.
    pub fn set_weight(&mut self, name: &str, weight: HostBuffer) {
        self.weights.insert(name.to_string(), weight);
    }

    /// Runs `entry` on `inputs` (by `v3.input` name) and returns the outputs named in `wanted`.
    pub fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, CpuBackendError> {
        self.run_with(entry, inputs, wanted, &mut |_, _, _, _| Ok(false))
    }

    /// The fused-stage module the kernels were compiled from.
    pub fn module(&self) -> &Module<'c> {
        &self.module
    }

    /// As [`CpuProgram::run`], offering every kernel call to `instead(kernel, inputs, outputs,
    /// cpu)` first (outputs allocated, zeroed, shaped by the kernel's rules; `cpu` runs the call's
    /// CPU kernel on buffers of its choosing): when it returns true it has computed the outputs
    /// and the CPU kernel is not launched. How another lowering of the
    /// same kernels (e.g. sm_90a's, run through its CPU form) is checked inside a whole entry.
    pub fn run_with(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        instead: &mut KernelOverride,
    ) -> Result<HashMap<String, HostBuffer>, CpuBackendError> {
        let invalid = |m: String| CpuBackendError::Invalid(m);
        let mut op = self.module.body().first_operation();
        let function = loop {
            let f = op.ok_or_else(|| invalid(format!("no entry point '{entry}'")))?;
            op = f.next_in_block();
            if f.attribute("sym_name").map(|a| a.to_string() == format!("\"{entry}\"")).unwrap_or(false) {
                break f;
            }
        };
        let args = bindings(&function.attribute("arg_attrs").map(|a| a.to_string()).unwrap_or_default());
        let block = function
            .region(0)
            .ok()
            .and_then(|r| r.first_block())
            .ok_or_else(|| invalid("entry without body".into()))?;
        self.check_inputs(inputs)?;
        // Values: inputs (copied once) and kernel results by value; weights are read in place.
        let mut env: HashMap<usize, HostBuffer> = HashMap::new();
        let mut weight_of: HashMap<usize, &HostBuffer> = HashMap::new();
        for (i, b) in args.iter().enumerate() {
            let value = block.argument(i).map_err(|e| invalid(e.to_string()))?.to_raw().ptr as usize;
            match b {
                Binding::Input(name) => {
                    let buf = inputs.get(name).cloned().ok_or_else(|| invalid(format!("input '{name}' not given")))?;
                    env.insert(value, buf);
                }
                Binding::Param(name) => {
                    let w = self.weights.get(name).ok_or_else(|| invalid(format!("weight '{name}' not loaded")))?;
                    weight_of.insert(value, w);
                }
            }
        }
        let profile = std::env::var_os("V3C_PROFILE_KERNELS").is_some();
        let mut times: Vec<(String, f64)> = Vec::new();
        let mut c = block.first_operation();
        while let Some(call) = c {
            c = call.next_in_block();
            let Ok(callee) = call.attribute("callee") else {
                if profile {
                    print_profile(entry, &times);
                }
                // func.return: collect the outputs by name.
                let names: Vec<String> = function
                    .attribute("res_attrs")
                    .map(|a| a.to_string())
                    .unwrap_or_default()
                    .split("}, {")
                    .map(|a| {
                        a.split(&format!("{} = \"", v3c_dialects::OUTPUT_ATTR))
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect();
                // Results move out of the environment (a value returned under two names, or a
                // weight, is copied).
                let mut out: HashMap<String, HostBuffer> = HashMap::new();
                let mut moved: HashMap<usize, String> = HashMap::new();
                for (k, name) in names.iter().enumerate() {
                    if wanted.contains(&name.as_str()) {
                        let v = call.operand(k).map_err(|e| invalid(e.to_string()))?.to_raw().ptr as usize;
                        let buf = match (env.remove(&v), moved.get(&v)) {
                            (Some(b), _) => b,
                            (None, Some(first)) => out[first].clone(),
                            (None, None) => weight_of
                                .get(&v)
                                .map(|w| (*w).clone())
                                .ok_or_else(|| invalid(format!("output {name}")))?,
                        };
                        moved.insert(v, name.clone());
                        out.insert(name.clone(), buf);
                    }
                }
                return Ok(out);
            };
            let name = callee.to_string().trim_start_matches('@').to_string();
            let kernel = self.kernels.get(&name).ok_or_else(|| invalid(format!("kernel {name} missing")))?;
            let ins: Vec<&HostBuffer> = (0..call.operand_count())
                .map(|k| {
                    let v = call.operand(k).map_err(|e| invalid(e.to_string()))?.to_raw().ptr as usize;
                    env.get(&v)
                        .or_else(|| weight_of.get(&v).copied())
                        .ok_or_else(|| invalid(format!("{name}: operand {k} unknown")))
                })
                .collect::<Result<_, _>>()?;
            let shapes = kernel.output_shapes(&ins.iter().map(|b| b.shape.clone()).collect::<Vec<_>>())?;
            let mut outs: Vec<HostBuffer> = shapes
                .into_iter()
                .zip(&kernel.signature.outputs)
                .map(|(shape, declared)| {
                    let n = shape.iter().product();
                    let data = match declared.element.as_str() {
                        "i32" => HostData::I32(vec![0; n]),
                        "i64" => HostData::I64(vec![0; n]),
                        "f8E4M3FN" => HostData::F8(vec![0; n]),
                        _ => HostData::F32(vec![0.0; n]),
                    };
                    HostBuffer { shape, data }
                })
                .collect();
            let started = std::time::Instant::now();
            let cpu = |ins: &[&HostBuffer], outs: &mut [HostBuffer]| -> Result<(), String> {
                let mut raw: Vec<RawBuffer> = ins.iter().map(|b| b.raw_const()).collect();
                raw.extend(outs.iter_mut().map(HostBuffer::raw));
                // SAFETY: as below; the caller gives buffers shaped like this call's.
                unsafe { launch(kernel, &raw) }.map_err(|e| e.to_string())
            };
            if !instead(&name, &ins, &mut outs, &cpu).map_err(|e| invalid(format!("{name}: {e}")))? {
                let mut raw: Vec<RawBuffer> = ins.iter().map(|b| b.raw_const()).collect();
                raw.extend(outs.iter_mut().map(HostBuffer::raw));
                // SAFETY: output shapes come from the kernel's own shape rules; token ids and cache
                // positions were checked above, and every other index is produced by a kernel.
                // Kernels only read their inputs; the borrowed buffers live until the call returns.
                unsafe { launch(kernel, &raw)? };
            }
            if profile {
                times.push((name.clone(), started.elapsed().as_secs_f64() * 1e3));
            }
            for (k, b) in outs.into_iter().enumerate() {
                env.insert(call.result(k).map_err(|e| invalid(e.to_string()))?.to_raw().ptr as usize, b);
            }
        }
        Err(invalid(format!("entry '{entry}' has no return")))
    }

    /// The launch plan of this program's entries for `sizes` (stage `plan`).
    pub fn plan(&self, sizes: crate::plan::PlanSizes) -> Result<v3c_runtime::plan::Plan, CpuBackendError> {
        crate::plan::build_plan(&self.module, sizes).map_err(CpuBackendError::Invalid)
    }

    /// Runs one entry from its plan: every intermediate lives in one arena at the plan's offsets,
    /// caches updated in place are written into the input buffers. `inputs` must have the shapes the
    /// plan was made for.
    pub fn run_plan(
        &self,
        plan: &v3c_runtime::plan::EntryPlan,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, CpuBackendError> {
        self.check_inputs(inputs)?;
        let mut failure = None;
        let out = v3c_runtime::cpu::run_plan(plan, &self.weights, inputs, wanted, &mut |name, buffers| {
            let kernel = self.kernels.get(name).ok_or_else(|| format!("kernel {name} missing"))?;
            // SAFETY: shapes come from the plan (the kernels' own shape rules at the planned
            // sizes), inputs were checked against the plan's bounds and id ranges. Spread over
            // the cores as the launch-list walk does.
            unsafe { launch(kernel, buffers) }.map_err(|e| {
                let message = e.to_string();
                failure = Some(e);
                message
            })
        });
        match (out, failure) {
            (Ok(out), _) => Ok(out),
            (Err(_), Some(kernel_error)) => Err(kernel_error.into()),
            (Err(message), None) => Err(CpuBackendError::Invalid(message)),
        }
    }

    fn check_inputs(&self, inputs: &HashMap<String, HostBuffer>) -> Result<(), CpuBackendError> {
        v3c_runtime::cpu::check_id_inputs(inputs, self.vocab).map_err(CpuBackendError::Invalid)
    }
}

/// Loads a weight as the kernels take it ([`v3c_runtime::cpu::load_weight`]).
fn load_weight(
    checkpoint: &Checkpoint,
    name: &str,
    dims: &[usize],
    element: &str,
) -> Result<HostBuffer, CpuBackendError> {
    v3c_runtime::cpu::load_weight(checkpoint, name, dims, element).map_err(|e| match e {
        v3c_runtime::cpu::WeightError::Checkpoint(c) => CpuBackendError::Checkpoint(c),
        v3c_runtime::cpu::WeightError::Invalid(m) => CpuBackendError::Invalid(m),
    })
}

/// The `fused` module of a model and its kernels compiled for this CPU (no weights).
pub struct CompiledModel<'c> {
    pub module: Module<'c>,
    pub kernels: HashMap<String, CpuKernel>,
}

/// Runs `entries` of `config` to the `fused` stage and compiles every kernel, taking machine code
/// from `cache` where it holds it. `progress(done, total, kernel)` is called after each kernel.
pub fn compile_model<'c>(
    context: &'c Context,
    config: &ModelConfig,
    entries: &[Entry],
    skip_mtp: bool,
    precision: v3c_models::Precision,
    cache: Option<&KernelCache>,
    progress: &mut dyn FnMut(usize, usize, &CpuKernel),
) -> Result<CompiledModel<'c>, CpuBackendError> {
    // A draft entry among them: the MTP module apart, the main entries output their hidden state.
    let mtp_draft = entries.contains(&Entry::Draft);
    let options = BuildOptions { dense_f32_weights: true, skip_mtp, precision, mtp_draft, ..Default::default() };
    let module = Driver::from_env(&config.name).run_model(context, config, entries, &options, "fused")?;
    let kernels = compile_kernels(context, &module, cache, progress)?;
    Ok(CompiledModel { module, kernels })
}

/// Graphs built already (a training step) to the `fused` stage ([`Driver::run_graphs`]) and every
/// kernel compiled, as [`compile_model`] does for a model's entries.
pub fn compile_graphs<'c>(
    context: &'c Context,
    label: &str,
    graphs: &[(&str, &v3c_models::Graph)],
    cache: Option<&KernelCache>,
    progress: &mut dyn FnMut(usize, usize, &CpuKernel),
) -> Result<CompiledModel<'c>, CpuBackendError> {
    let module = Driver::from_env(label).run_graphs(context, graphs, "fused")?;
    let kernels = compile_kernels(context, &module, cache, progress)?;
    Ok(CompiledModel { module, kernels })
}

/// Compiles every kernel function of the `fused` `module`, taking machine code from `cache` where
/// it holds it; `progress(done, total, kernel)` after each.
fn compile_kernels(
    context: &Context,
    module: &Module,
    cache: Option<&KernelCache>,
    progress: &mut dyn FnMut(usize, usize, &CpuKernel),
) -> Result<HashMap<String, CpuKernel>, CpuBackendError> {
    let mut functions = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
            functions.push(f);
        }
    }
    let mut kernels = HashMap::new();
    for (i, f) in functions.iter().enumerate() {
        let k = CpuKernel::compile_cached(context, f, cache)?;
        progress(i + 1, functions.len(), &k);
        kernels.insert(k.name.clone(), k);
    }
    Ok(kernels)
}

/// Logits of one sequence through the CPU backend: the CPU twin of
/// [`v3c_models::reference::Model::logits`] (same inputs, same outputs).
pub fn logits(
    model: &v3c_models::reference::Model,
    tokens: &[u32],
    first_position: i64,
    cache: Option<&KernelCache>,
) -> Result<v3c_models::reference::Logits, CpuBackendError> {
    use v3c_models::tensor::Tensor;
    if tokens.is_empty() {
        return Err(CpuBackendError::Invalid("no tokens given".into()));
    }
    let context = crate::mlir::new_context();
    let program = CpuProgram::with_cache(
        &context,
        &model.config,
        &[Entry::Prefill],
        !model.has_mtp,
        model.precision,
        &model.checkpoint,
        cache,
    )?;
    let t = tokens.len();
    let ids = |v: Vec<i64>| HostBuffer { shape: vec![v.len()], data: HostData::I64(v) };
    let mut inputs = HashMap::new();
    inputs.insert("tokens".to_string(), ids(tokens.iter().map(|&x| x as i64).collect()));
    inputs.insert("positions".to_string(), ids((0..t as i64).map(|i| i + first_position).collect()));
    let cache_width = model.config.cache_dim();
    for l in (0..model.config.num_hidden_layers).map(|l| format!("kv_cache.{l}")).chain(["kv_cache.mtp".to_string()]) {
        inputs.insert(l, HostBuffer { shape: vec![0, cache_width], data: HostData::F32(Vec::new()) });
    }
    let mut wanted = vec!["logits"];
    if model.has_mtp {
        inputs.insert("mtp_tokens".into(), ids(tokens[1..].iter().map(|&x| x as i64).chain([0]).collect()));
        wanted.push("mtp_logits");
    }
    let out = program.run("prefill", &inputs, &wanted)?;
    let tensor = |b: &HostBuffer, rows: usize| match &b.data {
        HostData::F32(v) => Tensor::f32(vec![rows, b.shape[1]], v[..rows * b.shape[1]].to_vec()),
        _ => Tensor::f32(vec![0, 0], Vec::new()),
    };
    Ok(v3c_models::reference::Logits {
        logits: tensor(&out["logits"], t),
        mtp_logits: out.get("mtp_logits").map(|m| tensor(m, t - 1)),
    })
}

/// One sequence generated on the CPU backend: prefill once, then one decode step per token, with
/// every layer's cache held as a [1, max_len, C] buffer between steps (C: the latent, 576 for
/// DeepSeek-V3, then DeepSeek-V3.2's indexer key: `ModelConfig::cache_dim`).
pub struct CpuSession<'c> {
    program: CpuProgram<'c>,
    caches: HashMap<String, HostBuffer>,
    cache_width: usize,
    layers: usize,
    position: usize,
    max_len: usize,
}

impl<'c> CpuSession<'c> {
    /// Compiles both entry points of `model` (without MTP) for sequences up to `max_len` tokens.
    pub fn new(
        context: &'c Context,
        model: &v3c_models::reference::Model,
        max_len: usize,
        cache: Option<&KernelCache>,
    ) -> Result<CpuSession<'c>, CpuBackendError> {
        let program = CpuProgram::with_cache(
            context,
            &model.config,
            &Entry::ALL,
            true,
            model.precision,
            &model.checkpoint,
            cache,
        )?;
        Ok(CpuSession {
            program,
            caches: HashMap::new(),
            cache_width: model.config.cache_dim(),
            layers: model.config.num_hidden_layers,
            position: 0,
            max_len,
        })
    }

    fn cache_names(&self) -> Vec<String> {
        (0..self.layers).map(|l| format!("kv_cache.{l}")).collect()
    }

    fn ids(v: Vec<i64>) -> HostBuffer {
        HostBuffer { shape: vec![v.len()], data: HostData::I64(v) }
    }

    fn last_row(b: &HostBuffer) -> Vec<f32> {
        match &b.data {
            HostData::F32(v) => v[v.len() - b.shape[1]..].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Runs the prompt; returns the logits of its last token.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, CpuBackendError> {
        if tokens.is_empty() || tokens.len() > self.max_len {
            return Err(CpuBackendError::Invalid(format!(
                "prompt of {} tokens (session holds 1..={})",
                tokens.len(),
                self.max_len
            )));
        }
        let t = tokens.len();
        let mut inputs = HashMap::new();
        inputs.insert("tokens".to_string(), Self::ids(tokens.iter().map(|&x| x as i64).collect()));
        inputs.insert("positions".to_string(), Self::ids((0..t as i64).collect()));
        for name in self.cache_names() {
            inputs.insert(name, HostBuffer { shape: vec![0, self.cache_width], data: HostData::F32(Vec::new()) });
        }
        let names = self.cache_names();
        let mut wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        wanted.push("logits");
        let out = self.program.run("prefill", &inputs, &wanted)?;
        for name in &names {
            let HostData::F32(rows) = &out[name].data else { continue };
            let mut cache = vec![0.0f32; self.max_len * self.cache_width];
            cache[..rows.len()].copy_from_slice(rows);
            self.caches.insert(
                name.clone(),
                HostBuffer { shape: vec![1, self.max_len, self.cache_width], data: HostData::F32(cache) },
            );
        }
        self.position = t;
        Ok(Self::last_row(&out["logits"]))
    }

    /// Feeds one token at the next position; returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, CpuBackendError> {
        if self.position >= self.max_len {
            return Err(CpuBackendError::Invalid(format!("session is full ({} tokens)", self.max_len)));
        }
        let mut inputs = self.caches.clone();
        inputs.insert("tokens".to_string(), Self::ids(vec![token as i64]));
        inputs.insert("positions".to_string(), Self::ids(vec![self.position as i64]));
        let names = self.cache_names();
        let mut wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        wanted.push("logits");
        let mut out = self.program.run("decode", &inputs, &wanted)?;
        for name in names {
            if let Some(c) = out.remove(&name) {
                self.caches.insert(name, c);
            }
        }
        self.position += 1;
        Ok(Self::last_row(&out["logits"]))
    }
}

/// Launches `kernel` on `buffers` over the machine's cores (two at most): a partitioned kernel as
/// its two shares, a row-independent kernel with enough rows on the halves of its rows
/// ([`v3c_runtime::host::run_spread`], which the runtime's cpu artifacts use too).
///
/// # Safety
/// As [`CpuKernel::run_raw`].
unsafe fn launch(kernel: &CpuKernel, buffers: &[RawBuffer]) -> Result<(), CpuError> {
    // SAFETY: forwarded contract; JIT-compiled kernels are reentrant (no global state,
    // temporaries from malloc) and their shares and halves write disjoint elements.
    unsafe {
        v3c_runtime::host::run_spread(
            buffers,
            kernel.signature.partitioned,
            kernel.signature.row_split.as_ref(),
            &|b, part, parts| kernel.run_part(b, part, parts),
        )
    }
}

/// `V3C_PROFILE_KERNELS=1`: time per kernel of one entry run, largest first, on stderr.
fn print_profile(entry: &str, times: &[(String, f64)]) {
    let mut by_kernel: HashMap<&str, (usize, f64)> = HashMap::new();
    for (name, ms) in times {
        let e = by_kernel.entry(name.as_str()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += ms;
    }
    let mut rows: Vec<_> = by_kernel.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let total: f64 = times.iter().map(|t| t.1).sum();
    eprintln!("profile {entry}: {} launches, {total:.3} ms in kernels", times.len());
    for (name, (count, ms)) in rows {
        eprintln!("  {ms:9.3} ms {:5.1}%  {count:4}x  {name}", 100.0 * ms / total.max(1e-9));
    }
}

/// The CPU backend as the [`StepBackend`] of a [`Trainer`]: its training graph (forward, loss,
/// backward) compiled once, the parameters handed over at each optimizer step.
///
/// [`StepBackend`]: v3c_models::train::StepBackend
/// [`Trainer`]: v3c_models::train::Trainer
pub struct CpuTrainStep<'c> {
    program: CpuProgram<'c>,
    /// The weights the step binds (read from its module once, bound at every optimizer step).
    params: Vec<String>,
}

/// The entry point name of a compiled training step.
pub use v3c_runtime::training::TRAIN_ENTRY;

impl<'c> CpuTrainStep<'c> {
    /// Compiles `trainer`'s training graph (kernels from `cache` where it holds them).
    pub fn new(
        context: &'c Context,
        trainer: &v3c_models::train::Trainer,
        cache: Option<&KernelCache>,
    ) -> Result<CpuTrainStep<'c>, CpuBackendError> {
        CpuTrainStep::for_graph(context, trainer.graph(), &trainer.config, cache, &mut |_, _, _| {})
    }

    /// Compiles `graph`, a training graph of `config` (or one with more outputs, e.g. every
    /// intermediate value for debugging); `progress(done, total, kernel)` after each kernel.
    pub fn for_graph(
        context: &'c Context,
        graph: &v3c_models::Graph,
        config: &ModelConfig,
        cache: Option<&KernelCache>,
        progress: &mut dyn FnMut(usize, usize, &CpuKernel),
    ) -> Result<CpuTrainStep<'c>, CpuBackendError> {
        let graphs = [(TRAIN_ENTRY, graph)];
        let program = CpuProgram::from_graphs(context, &config.name, &graphs, config.vocab_size, cache, progress)?;
        let params = program.param_names();
        Ok(CpuTrainStep { program, params })
    }
}

impl v3c_models::train::StepBackend for CpuTrainStep<'_> {
    fn load(
        &mut self,
        _graph: &v3c_models::Graph,
        params: &HashMap<String, v3c_models::tensor::Tensor>,
    ) -> Result<(), v3c_models::train::TrainError> {
        for name in &self.params {
            let w = v3c_runtime::training::bound_weight(name, params)?;
            self.program.set_weight(name, w);
        }
        Ok(())
    }

    fn run(
        &mut self,
        inputs: &HashMap<String, v3c_models::tensor::Tensor>,
        wanted: &[&str],
    ) -> Result<HashMap<String, v3c_models::tensor::Tensor>, v3c_models::train::TrainError> {
        self.run_with(inputs, |program, host| program.run(TRAIN_ENTRY, host, wanted))
    }
}

impl CpuTrainStep<'_> {
    /// The training step's launch plan for windows of up to `rows` tokens (an arena for every
    /// intermediate, see [`crate::plan`]).
    pub fn plan(&self, rows: usize) -> Result<v3c_runtime::plan::EntryPlan, CpuBackendError> {
        let plan = self.program.plan(crate::plan::PlanSizes::new(rows, 0))?;
        plan.entries
            .into_iter()
            .find(|e| e.name == TRAIN_ENTRY)
            .ok_or_else(|| CpuBackendError::Invalid("no training entry in the plan".into()))
    }

    /// As [`v3c_models::train::StepBackend::run`], executing `plan` (its arena) instead of the
    /// launch list.
    pub fn run_planned(
        &mut self,
        plan: &v3c_runtime::plan::EntryPlan,
        inputs: &HashMap<String, v3c_models::tensor::Tensor>,
        wanted: &[&str],
    ) -> Result<HashMap<String, v3c_models::tensor::Tensor>, v3c_models::train::TrainError> {
        self.run_with(inputs, |program, host| program.run_plan(plan, host, wanted))
    }

    /// As [`v3c_models::train::StepBackend::run`], offering each kernel call to `instead` first
    /// (see [`CpuProgram::run_with`]); the program gives it the fused kernels' module.
    pub fn run_instead(
        &mut self,
        inputs: &HashMap<String, v3c_models::tensor::Tensor>,
        wanted: &[&str],
        instead: &mut ModuleKernelOverride,
    ) -> Result<HashMap<String, v3c_models::tensor::Tensor>, v3c_models::train::TrainError> {
        self.run_with(inputs, |program, host| {
            program.run_with(TRAIN_ENTRY, host, wanted, &mut |kernel, ins, outs, cpu| {
                instead(program.module(), kernel, ins, outs, cpu)
            })
        })
    }

    /// Inputs as host buffers, `execute` on them, outputs back as tensors.
    fn run_with(
        &mut self,
        inputs: &HashMap<String, v3c_models::tensor::Tensor>,
        execute: impl FnOnce(
            &CpuProgram,
            &HashMap<String, HostBuffer>,
        ) -> Result<HashMap<String, HostBuffer>, CpuBackendError>,
    ) -> Result<HashMap<String, v3c_models::tensor::Tensor>, v3c_models::train::TrainError> {
        use v3c_runtime::training::{host_inputs, output_tensors};
        let out = execute(&self.program, &host_inputs(inputs)?)
            .map_err(|e| v3c_models::train::TrainError::Backend(e.to_string()))?;
        output_tensors(out)
    }
}
