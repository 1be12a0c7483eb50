//! Running a `cpu` artifact: its kernels (`kernels/<name>.so`, loaded with `dlopen`) launched in the
//! order of its plan over one arena, with the weights loaded from a checkpoint as the plan binds
//! them. The compiler's CPU backend runs plans with the same [`run_plan`] (its kernels JIT-compiled
//! or from its cache); this is the path with no compiler at all.

use std::collections::HashMap;
use std::path::Path;

use v3c_models::checkpoint::{Checkpoint, CheckpointError};
use v3c_models::dtype::DType;
use v3c_models::graph::{Dim, TensorType, WeightFormat};

use crate::artifact::Artifact;
use crate::host::{call_packed, run_spread, HostBuffer, HostData, PackedFn, RawBuffer, RowSplit};
use crate::plan::{shape_at, BufferKind, EntryPlan, Sizes};
use crate::signature::KernelSignature;

/// Why a weight could not be loaded as a kernel takes it.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Invalid(String),
}

/// Loads a weight as the kernels take it: fp8 bits, f32 block scales (`*_scale_inv`), or dense f32
/// (bf16 widened, fp8 dequantized); `model.layers.N.mlp.experts.*.X` stacks the experts.
pub fn load_weight(
    checkpoint: &Checkpoint,
    name: &str,
    dims: &[usize],
    element: &str,
) -> Result<HostBuffer, WeightError> {
    let stacked = name.contains(".experts.*.");
    let (count, shape) = if stacked && !dims.is_empty() { (dims[0], &dims[1..]) } else { (1, dims) };
    let expert =
        |e: usize| if stacked { name.replace(".experts.*.", &format!(".experts.{e}.")) } else { name.to_string() };
    let fixed = || shape.iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>();
    let data = if element == "f8E4M3FN" {
        let mut bits = Vec::new();
        for e in 0..count {
            let ty = TensorType::new(fixed(), DType::F8E4M3);
            let t = checkpoint.load(&expert(e), &ty, WeightFormat::Fp8Block { block: [128, 128] })?;
            let v3c_models::tensor::TensorData::F8Block { bits: b, .. } = t.data else {
                return Err(WeightError::Invalid(format!("{}: not an fp8 tensor", expert(e))));
            };
            bits.extend(b);
        }
        HostData::F8(bits)
    } else if name.ends_with("_scale_inv") {
        let mut all = Vec::new();
        for e in 0..count {
            let t = checkpoint.read(&expert(e))?;
            all.extend_from_slice(t.as_f32().unwrap_or_default());
        }
        HostData::F32(all)
    } else {
        let mut all = Vec::new();
        for e in 0..count {
            let ty = TensorType::new(fixed(), DType::F32);
            let t = checkpoint.load(&expert(e), &ty, WeightFormat::Dense(DType::F32))?;
            all.extend_from_slice(t.as_f32().unwrap_or_default());
        }
        HostData::F32(all)
    };
    Ok(HostBuffer { shape: dims.to_vec(), data })
}

/// Checks the id inputs a kernel indexes memory with: token ids inside the vocabulary, positions
/// inside the decode caches (`[B, S, C]`, or a pool of pages `[pages, 64, C]` with a block table
/// `[B, S / 64]`: a position inside the table's pages, each page inside the pool or -1, none).
pub fn check_id_inputs(inputs: &HashMap<String, HostBuffer>, vocab: usize) -> Result<(), String> {
    let table = inputs.get(crate::plan::PAGE_POOL);
    if let (Some(t), Some((cache_name, cache))) =
        (table, inputs.iter().find(|(n, b)| n.starts_with("kv_cache.") && b.shape.len() == 3))
    {
        let pages: Vec<i64> = match &t.data {
            HostData::I32(v) => v.iter().map(|&p| p as i64).collect(),
            HostData::I64(v) => v.clone(),
            _ => Vec::new(),
        };
        // -1: no page (a sequence's table row past what it holds).
        if let Some(&p) = pages.iter().find(|&&p| p < -1 || (p >= 0 && p as usize >= cache.shape[0])) {
            return Err(format!(
                "{}: page {p} is outside {cache_name}'s pool ({} pages)",
                crate::plan::PAGE_POOL,
                cache.shape[0]
            ));
        }
    }
    for (name, buf) in inputs {
        let HostData::I64(ids) = &buf.data else { continue };
        if ["tokens", "mtp_tokens", "targets", "mtp_targets"].contains(&name.as_str()) {
            if let Some(&t) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(format!("{name}: token id {t} is outside the vocabulary (0..{vocab})"));
            }
        }
        if name == "positions" {
            for (cache_name, cache) in inputs.iter().filter(|(n, b)| n.starts_with("kv_cache.") && b.shape.len() == 3) {
                // Paged: a sequence holds its block table's pages of `shape[1]` rows each.
                let rows = match table.map(|t| &t.shape[..]) {
                    Some([_, pages]) => pages * cache.shape[1],
                    _ => cache.shape[1],
                };
                if let Some(&p) = ids.iter().find(|&&p| p < 0 || p as usize >= rows) {
                    return Err(format!("position {p} is outside {cache_name} ({rows} rows a sequence)"));
                }
            }
        }
    }
    Ok(())
}

/// Runs one kernel of a plan on its arguments then results.
pub type LaunchFn<'a> = dyn FnMut(&str, &[RawBuffer]) -> Result<(), String> + 'a;

/// Runs one entry from its plan: every intermediate lives in one arena at the plan's offsets;
/// caches updated in place are written into (copies of) the input buffers. `inputs` must have the
/// shapes the plan was made for; `launch(kernel, buffers)` runs one kernel on its arguments then
/// results. Returns the outputs named in `wanted`.
pub fn run_plan(
    plan: &EntryPlan,
    weights: &HashMap<String, HostBuffer>,
    inputs: &HashMap<String, HostBuffer>,
    wanted: &[&str],
    launch: &mut LaunchFn,
) -> Result<HashMap<String, HostBuffer>, String> {
    let mut bound = BoundPlan::new(plan, weights, inputs)?;
    bound.launch_all(launch)?;
    bound.outputs(wanted)
}

/// A plan's buffers bound to memory: the inputs (owned copies), the weights, one arena; every
/// buffer at the sizes the inputs are at.
pub struct BoundPlan<'p> {
    plan: &'p EntryPlan,
    weights: &'p HashMap<String, HostBuffer>,
    owned: HashMap<String, HostBuffer>,
    arena: Vec<u64>,
    sizes: Sizes,
}

impl<'p> BoundPlan<'p> {
    /// Finds the sizes `inputs` are at (at most the planned ones) and allocates the arena.
    pub fn new(
        plan: &'p EntryPlan,
        weights: &'p HashMap<String, HostBuffer>,
        inputs: &HashMap<String, HostBuffer>,
    ) -> Result<BoundPlan<'p>, String> {
        BoundPlan::with_parts(plan, weights, inputs.clone(), Vec::new())
    }

    /// As [`BoundPlan::new`] on inputs it owns, in `arena` (grown to the plan's size; its old
    /// contents are overwritten before anything reads them: every arena buffer is a kernel result).
    pub fn with_parts(
        plan: &'p EntryPlan,
        weights: &'p HashMap<String, HostBuffer>,
        owned: HashMap<String, HostBuffer>,
        arena: Vec<u64>,
    ) -> Result<BoundPlan<'p>, String> {
        let shapes = owned.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        let sizes = plan.bind(&shapes)?;
        Ok(BoundPlan::at_sizes(plan, weights, owned, arena, sizes))
    }

    /// As [`BoundPlan::with_parts`] at `sizes`, which `plan.bind` found for the inputs.
    fn at_sizes(
        plan: &'p EntryPlan,
        weights: &'p HashMap<String, HostBuffer>,
        owned: HashMap<String, HostBuffer>,
        mut arena: Vec<u64>,
        sizes: Sizes,
    ) -> BoundPlan<'p> {
        let words = (plan.arena_bytes as usize).div_ceil(8);
        if arena.len() < words {
            arena.resize(words, 0);
        }
        BoundPlan { plan, weights, owned, arena, sizes }
    }

    /// The inputs (as the run left them: caches updated in place) and the arena, for another run.
    pub fn into_parts(self) -> (HashMap<String, HostBuffer>, Vec<u64>) {
        (self.owned, self.arena)
    }

    /// The sizes the plan runs at.
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// Buffer `id` as launch `launch` sees it ([`crate::plan::Launch::view`]).
    fn raw(&mut self, id: usize, launch: usize) -> Result<RawBuffer, String> {
        let b = &self.plan.buffers[id];
        let (shape, offset) = self.plan.launches[launch].view(b, self.sizes);
        let ptr = match &b.kind {
            BufferKind::Input { name } => {
                self.owned.get_mut(name).map(HostBuffer::ptr_mut).ok_or(format!("input {name}"))?
            }
            // Kernels never write weights (they are inputs of every launch that reads them).
            BufferKind::Weight { name } => {
                self.weights.get(name).map(HostBuffer::ptr_const).ok_or(format!("weight {name}"))?
            }
            // SAFETY: offsets come from the plan, within `arena_bytes`.
            BufferKind::Arena { offset } => unsafe {
                (self.arena.as_mut_ptr() as *mut u8).add(*offset as usize) as *mut ()
            },
        };
        // SAFETY: the rows a launch sees lie inside the buffer.
        let ptr = unsafe { (ptr as *mut u8).add(offset as usize) as *mut () };
        Ok(RawBuffer { ptr, shape, element: b.dtype.clone() })
    }

    /// Runs every launch of the plan in order: `launch(kernel, buffers)`.
    pub fn launch_all(&mut self, launch: &mut LaunchFn) -> Result<(), String> {
        for i in 0..self.plan.launches.len() {
            let buffers = self.buffers(i)?;
            launch(&self.plan.launches[i].kernel, &buffers)?;
        }
        Ok(())
    }

    /// The buffers of launch `i`: its arguments then its results.
    pub fn buffers(&mut self, i: usize) -> Result<Vec<RawBuffer>, String> {
        let l = &self.plan.launches[i];
        l.args.iter().chain(&l.results).map(|&id| self.raw(id, i)).collect()
    }

    /// The outputs named in `wanted` (or the rows it names: [`crate::plan::LAST_ROW`]), copied out.
    pub fn outputs(&self, wanted: &[&str]) -> Result<HashMap<String, HostBuffer>, String> {
        let base = self.arena.as_ptr() as *const u8;
        let mut out = HashMap::new();
        for (name, id) in &self.plan.outputs {
            let b = &self.plan.buffers[*id];
            let shape = shape_at(&b.dims, self.sizes);
            let Some((key, first, rows)) = crate::plan::wanted_rows(wanted, name, &shape) else { continue };
            let value = match &b.kind {
                BufferKind::Input { name: input } => self.owned[input].rows(first, rows),
                BufferKind::Arena { offset } => {
                    let row: usize = shape.iter().skip(1).product();
                    let (start, n) = (first * row, rows * row);
                    let mut shape = shape;
                    if let Some(r) = shape.first_mut() {
                        *r = rows;
                    }
                    // SAFETY: the buffer's bytes lie inside the arena; the rows lie inside the buffer.
                    let data = unsafe {
                        let p = base.add(*offset as usize);
                        match b.dtype.as_str() {
                            "f32" => {
                                HostData::F32(std::slice::from_raw_parts((p as *const f32).add(start), n).to_vec())
                            }
                            "i32" => {
                                HostData::I32(std::slice::from_raw_parts((p as *const i32).add(start), n).to_vec())
                            }
                            "i64" => {
                                HostData::I64(std::slice::from_raw_parts((p as *const i64).add(start), n).to_vec())
                            }
                            "bf16" => {
                                HostData::Bf16(std::slice::from_raw_parts((p as *const u16).add(start), n).to_vec())
                            }
                            "f8E4M3FN" => HostData::F8(std::slice::from_raw_parts(p.add(start), n).to_vec()),
                            other => return Err(format!("output {name} of type {other}")),
                        }
                    };
                    HostBuffer { shape, data }
                }
                BufferKind::Weight { name: w } => self.weights[w].rows(first, rows),
            };
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// Inputs at an entry's planned shapes for timing its kernels: token 0, positions 0.. (within the
/// caches), zero caches (a pool of pages: the sequences' pages interleaved in it).
pub fn bench_inputs(plan: &EntryPlan) -> Result<HashMap<String, HostBuffer>, String> {
    let mut inputs = HashMap::new();
    let pool_table = plan.bounds.get(crate::plan::PAGE_POOL);
    for (name, shape) in &plan.bounds {
        let buffer = match name.as_str() {
            "tokens" | "mtp_tokens" => {
                HostBuffer { shape: shape.clone(), data: HostData::I64(vec![0; shape.iter().product()]) }
            }
            crate::plan::PAGE_POOL => {
                let [b, n] = shape[..] else { return Err(format!("{name} of shape {shape:?}")) };
                let table = (0..b * n).map(|k| ((k % n) * b + k / n) as i32).collect();
                HostBuffer { shape: shape.clone(), data: HostData::I32(table) }
            }
            "positions" => {
                let rows = match pool_table {
                    Some(t) => t.get(1).copied().unwrap_or(0) * crate::pages::PAGE_ROWS,
                    None => *plan
                        .bounds
                        .iter()
                        .find(|(n, _)| n.starts_with("kv_cache."))
                        .map(|(_, s)| s)
                        .and_then(|s| s.get(s.len().saturating_sub(2)))
                        .unwrap_or(&1),
                };
                let n: usize = shape.iter().product();
                HostBuffer {
                    shape: shape.clone(),
                    data: HostData::I64((0..n).map(|i| (i % rows.max(1)) as i64).collect()),
                }
            }
            _ => HostBuffer::zeros(shape.clone(), "f32").ok_or("zeros")?,
        };
        inputs.insert(name.clone(), buffer);
    }
    Ok(inputs)
}

/// Per kernel, the median times of its launches in one run of an entry, summed (`per_launch`:
/// kernel name and median ms of each launch, in order), slowest first.
pub fn kernel_timings(per_launch: Vec<(String, f64)>) -> Vec<KernelTiming> {
    let mut timings: Vec<KernelTiming> = Vec::new();
    for (kernel, ms) in per_launch {
        match timings.iter_mut().find(|t| t.kernel == kernel) {
            Some(t) => {
                t.launches += 1;
                t.total_ms += ms;
            }
            None => timings.push(KernelTiming { kernel, launches: 1, median_ms: 0.0, total_ms: ms }),
        }
    }
    for t in &mut timings {
        t.median_ms = t.total_ms / t.launches as f64;
    }
    timings.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
    timings
}

/// Time of one kernel over an entry's launches of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTiming {
    pub kernel: String,
    /// Launches of the kernel per run of the entry.
    pub launches: usize,
    /// Median over repetitions of one launch, averaged over the kernel's launches, in ms.
    pub median_ms: f64,
    /// `median_ms x launches`: the kernel's share of one run of the entry.
    pub total_ms: f64,
}

/// A kernel of a `cpu` artifact: its shared object, kept loaded, and the signature its code holds.
pub struct SharedObjectKernel {
    pub name: String,
    entry: PackedFn,
    pub signature: KernelSignature,
    _library: libloading::Library,
}

impl SharedObjectKernel {
    /// Loads `path`, looks up `symbol` (the kernel's packed entry) and reads the kernel's signature
    /// from its code ([`crate::signature`]), which must say what the manifest says of it (`spread`:
    /// its partitioned flag and row split).
    pub fn load(
        name: &str,
        path: &Path,
        symbol: &str,
        (partitioned, row_split): (bool, Option<RowSplit>),
    ) -> Result<SharedObjectKernel, String> {
        // SAFETY: loading runs the object's initializers; v3c's kernel objects have none beyond
        // relocation (they are MLIR-generated code and its runtime helpers).
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: the symbol is the packed C-interface wrapper, `void(void**)`.
        let entry = unsafe { library.get::<PackedFn>(symbol.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("{}: no entry {symbol}: {e}", path.display()))?;
        let global = KernelSignature::symbol(name);
        // SAFETY: the global is a NUL-terminated string the compiler put beside the entry.
        let text = unsafe { library.get::<*const std::ffi::c_char>(global.as_bytes()) }
            .map(|s| unsafe { std::ffi::CStr::from_ptr(*s) }.to_string_lossy().into_owned())
            .map_err(|_| {
                format!(
                    "{}: no {global} (the code says nothing of its buffers: compiled by an older v3c? compile the \
                     model again)",
                    path.display()
                )
            })?;
        let signature = KernelSignature::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        listed_as_coded(name, path, &signature, (partitioned, &row_split))?;
        Ok(SharedObjectKernel { name: name.to_string(), entry, signature, _library: library })
    }

    /// Runs the kernel on its arguments then results, over the machine's cores as the compiler's
    /// CPU backend does ([`run_spread`]: a partitioned kernel as two shares, a row-split one on
    /// the halves of its rows). Buffers that do not fit the kernel's signature are refused.
    ///
    /// # Safety
    /// As [`call_packed`], and each buffer addresses as many elements as its shape says.
    pub unsafe fn run(&self, buffers: &[RawBuffer]) -> Result<(), String> {
        let shapes: Vec<(&[usize], &str)> = buffers.iter().map(|b| (&b.shape[..], b.element.as_str())).collect();
        self.signature.check(&shapes, &|i| format!("buffer {i}")).map_err(|e| format!("kernel {}: {e}", self.name))?;
        let entry = self.entry;
        let partitioned = self.signature.partitioned;
        let job = |b: &[RawBuffer], part: usize, parts: usize| -> Result<(), ()> {
            // SAFETY: forwarded; the argument array outlives the call; shares and halves write
            // disjoint elements, and the kernels keep no global state.
            unsafe { call_packed(b, partitioned, part, parts, |args| entry(args.as_mut_ptr())) };
            Ok(())
        };
        // SAFETY: as above; the buffers fit the signature (checked above).
        let _ = unsafe { run_spread(buffers, partitioned, self.signature.row_split.as_ref(), &job) };
        Ok(())
    }
}

/// Whether the manifest lists kernel `name` (code at `path`) with the partitioned flag and row split
/// its code has (else the call would misread its arguments).
fn listed_as_coded(
    name: &str,
    path: &Path,
    signature: &KernelSignature,
    (partitioned, row_split): (bool, &Option<RowSplit>),
) -> Result<(), String> {
    if (signature.partitioned, &signature.row_split) != (partitioned, row_split) {
        return Err(format!(
            "manifest.json: kernel {name} is listed as partitioned {partitioned}, row split {row_split:?}; its code \
             ({}) is partitioned {}, row split {:?}",
            path.display(),
            signature.partitioned,
            signature.row_split
        ));
    }
    Ok(())
}

/// What `v3r info` checks of a cpu artifact without loading its code (it may be another
/// machine's): each kernel's signature read from its shared object's symbol table, its manifest
/// flags against it, and every launch of the plan against it (as loading does). The number of
/// launches checked.
pub fn check_signatures(artifact: &Artifact) -> Result<usize, String> {
    let mut signatures = HashMap::new();
    for k in &artifact.manifest.kernels {
        let path = artifact.path(&k.file);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let signature =
            crate::signature::read_embedded(&bytes, &k.name).map_err(|e| format!("{}: {e}", path.display()))?;
        listed_as_coded(&k.name, &path, &signature, (k.partitioned.unwrap_or(false), &k.row_split))?;
        signatures.insert(k.name.clone(), signature);
    }
    check_launches(artifact, &|name| signatures.get(name))
}

/// Checks every launch of `artifact`'s plan, at the planned sizes, against the signature of the
/// kernel it launches (read from the kernel's code): a plan edited with its hash updated cannot make
/// a kernel read or write past its buffers. (Smaller sizes keep the same relations: each launch is
/// checked again as it runs.) The number of launches checked.
fn check_launches<'s>(
    artifact: &Artifact,
    signature_of: &dyn Fn(&str) -> Option<&'s KernelSignature>,
) -> Result<usize, String> {
    let mut checked = 0;
    for e in &artifact.plan.entries {
        for (i, l) in e.launches.iter().enumerate() {
            let k = signature_of(&l.kernel).ok_or_else(|| format!("kernel {} missing", l.kernel))?;
            let ids: Vec<usize> = l.args.iter().chain(&l.results).copied().collect();
            let buffers: Vec<(&[usize], &str)> =
                ids.iter().map(|&id| (&e.buffers[id].shape[..], e.buffers[id].dtype.as_str())).collect();
            checked += 1;
            k.check(&buffers, &|j| e.buffers[ids[j]].describe(ids[j])).map_err(|why| {
                format!(
                    "{}: entry {}, launch {i} (kernel {}): {why}",
                    artifact.dir.join(&artifact.manifest.plan.file).display(),
                    e.name,
                    l.kernel
                )
            })?;
        }
    }
    Ok(checked)
}

/// A `cpu` artifact ready to run: kernels loaded, weights loaded as the plan binds them.
pub struct CpuArtifact {
    pub artifact: Artifact,
    kernels: HashMap<String, SharedObjectKernel>,
    weights: HashMap<String, HostBuffer>,
    vocab: usize,
    kept: std::sync::Mutex<Kept>,
    /// The plans of runs that leave launches out.
    run_plans: crate::plan::RunPlans,
}

/// What a cpu artifact keeps between runs: the inputs the last run updated in place (decode's
/// caches), which the next run of the same entry and shapes may take as they are instead of new
/// copies, and the arena (allocated and faulted in once, not every step).
#[derive(Default)]
struct Kept {
    /// The entry and input shapes (sorted by name) of the run that left `buffers`.
    run: Option<(String, InputShapes)>,
    buffers: HashMap<String, HostBuffer>,
    arena: Vec<u64>,
}

/// Input names and shapes, sorted by name.
type InputShapes = Vec<(String, Vec<usize>)>;

/// The number of values `b` holds.
fn values(b: &HostBuffer) -> usize {
    match &b.data {
        HostData::F32(v) => v.len(),
        HostData::Bf16(v) => v.len(),
        HostData::I64(v) => v.len(),
        HostData::I32(v) => v.len(),
        HostData::F8(v) => v.len(),
    }
}

impl CpuArtifact {
    /// Loads a validated artifact's kernels and the checkpoint in `weights` (checked against the plan
    /// first). The artifact must be for `cpu` and this machine must run it.
    pub fn load(artifact: Artifact, weights: &Path) -> Result<CpuArtifact, String> {
        artifact.check_weights(weights)?;
        let ckpt = Checkpoint::open(weights).map_err(|e| e.to_string())?;
        CpuArtifact::load_weights(artifact, &crate::gpu::Weights::Checkpoint(&ckpt))
    }

    /// As [`CpuArtifact::load`], the weights from `weights` (a checkpoint already checked against
    /// the plan, or made-up ones for timing).
    pub fn load_weights(artifact: Artifact, weights: &crate::gpu::Weights) -> Result<CpuArtifact, String> {
        let dir = artifact.dir.display().to_string();
        if artifact.manifest.target.name != "cpu" {
            return Err(format!("{dir}: a {} artifact, not a cpu one", artifact.manifest.target.name));
        }
        artifact.runs_here(0).map_err(|why| format!("{dir}: cannot run here: {why}"))?;
        let mut kernels = HashMap::new();
        for k in &artifact.manifest.kernels {
            // Artifact::open checked that cpu kernels have both.
            let symbol = k.symbol.clone().unwrap_or_default();
            let spread = (k.partitioned.unwrap_or(false), k.row_split.clone());
            let loaded = SharedObjectKernel::load(&k.name, &artifact.path(&k.file), &symbol, spread)?;
            kernels.insert(k.name.clone(), loaded);
        }
        check_launches(&artifact, &|name| kernels.get(name).map(|k| &k.signature))?;
        let mut loaded = HashMap::new();
        for e in &artifact.plan.entries {
            for b in &e.buffers {
                let BufferKind::Weight { name } = &b.kind else { continue };
                if !loaded.contains_key(name) {
                    let w = match weights {
                        crate::gpu::Weights::Checkpoint(ckpt) => {
                            load_weight(ckpt, name, &b.shape, &b.dtype).map_err(|e| e.to_string())?
                        }
                        random => {
                            let bytes = random.bytes(name, &b.shape, &b.dtype)?;
                            crate::gpu::host_buffer(&bytes, b.shape.clone(), &b.dtype)?
                        }
                    };
                    loaded.insert(name.clone(), w);
                }
            }
        }
        let vocab = artifact.manifest.model.config["vocab_size"]
            .as_u64()
            .ok_or_else(|| format!("{dir}/manifest.json: model.config has no vocab_size"))?
            as usize;
        Ok(CpuArtifact {
            artifact,
            kernels,
            weights: loaded,
            vocab,
            kept: Default::default(),
            run_plans: Default::default(),
        })
    }

    /// Times every kernel of `entry`: the entry runs once on planned-shape inputs (token 0,
    /// positions 0.., zero caches) so every buffer holds what it would, then each launch is repeated
    /// `reps` times after one warm-up; per kernel, the median of its launches.
    pub fn bench_kernels(&self, entry: &str, reps: usize) -> Result<Vec<KernelTiming>, String> {
        let plan = self.entry(entry)?;
        let inputs = bench_inputs(plan)?;
        check_id_inputs(&inputs, self.vocab)?;
        let mut bound = BoundPlan::new(plan, &self.weights, &inputs)?;
        let mut per_launch = Vec::new();
        for i in 0..plan.launches.len() {
            let k = self.kernel(&plan.launches[i].kernel)?;
            let buffers = bound.buffers(i)?;
            let mut times = Vec::with_capacity(reps);
            for rep in 0..=reps {
                let start = std::time::Instant::now();
                // SAFETY: as in `run`: the validated plan's buffers at their planned shapes.
                unsafe { k.run(&buffers) }?;
                if rep > 0 {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            per_launch.push((k.name.clone(), times.get(times.len() / 2).copied().unwrap_or(0.0)));
        }
        let timings = kernel_timings(per_launch);
        Ok(timings)
    }

    /// The names of the weights the plan binds (stacked experts as `...experts.*...`), sorted.
    pub fn weight_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.weights.keys().cloned().collect();
        names.sort();
        names
    }

    /// Replaces the weight bound to `name` (a trained parameter) with `weight` of the same shape
    /// and element type.
    pub fn set_weight(&mut self, name: &str, weight: HostBuffer) -> Result<(), String> {
        let old = self.weights.get(name).ok_or_else(|| format!("the plan binds no weight '{name}'"))?;
        if old.shape != weight.shape || old.element() != weight.element() {
            return Err(format!(
                "{name}: {:?} {} does not replace {:?} {}",
                weight.shape,
                weight.element(),
                old.shape,
                old.element()
            ));
        }
        self.weights.insert(name.to_string(), weight);
        Ok(())
    }

    /// The plan of entry `entry`.
    pub fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
        self.entry(entry)
    }

    fn entry(&self, entry: &str) -> Result<&EntryPlan, String> {
        self.artifact.plan.entries.iter().find(|e| e.name == entry).ok_or_else(|| {
            let names: Vec<&str> = self.artifact.plan.entries.iter().map(|e| e.name.as_str()).collect();
            format!("no entry '{entry}' (entries: {})", names.join(", "))
        })
    }

    fn kernel(&self, name: &str) -> Result<&SharedObjectKernel, String> {
        self.kernels.get(name).ok_or_else(|| format!("kernel {name} missing"))
    }

    /// Runs entry `entry` on `inputs` (which must have the planned shapes) and returns the outputs
    /// named in `wanted`.
    pub fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.run_with(entry, inputs, wanted, &[], false)
    }

    /// As [`CpuArtifact::run`]; the inputs named in `resident` are taken as the previous run of
    /// `entry` (with inputs of the same shapes) left them — decode's caches, updated in place — and
    /// not copied from `inputs` (there they may be shapes without values). The inputs this run
    /// updates in place stay here for the next one.
    pub fn run_keeping(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.run_with(entry, inputs, wanted, resident, true)
    }

    /// As [`CpuArtifact::run`], on the caller's buffers: the inputs the run updates in place
    /// (decode's caches) are updated in `inputs` and not returned, nothing is copied in or out of
    /// them (a step of a batch planned for 64 sequences of 4096 rows copied its caches twice). On
    /// an error `inputs` holds every input still (the updated ones in no known state). Leaves what
    /// a keeping run kept alone.
    pub fn run_in_place(
        &self,
        entry: &str,
        inputs: &mut HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        let full = self.entry(entry)?;
        let pruned = self.run_plans.get(full, wanted, &[]);
        let plan = pruned.as_deref().unwrap_or(full);
        check_id_inputs(inputs, self.vocab)?;
        if let Some((name, b)) = inputs.iter().find(|(_, b)| values(b) != b.shape.iter().product::<usize>()) {
            return Err(format!("{entry}: input {name} has {} values for shape {:?}", values(b), b.shape));
        }
        let shapes = inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        let sizes = plan.bind(&shapes)?;
        let mut kept = self.kept.lock().map_err(|_| "a previous run panicked".to_string())?;
        let arena = std::mem::take(&mut kept.arena);
        let mut bound = BoundPlan::at_sizes(plan, &self.weights, std::mem::take(inputs), arena, sizes);
        let ran = self.launch_all(&mut bound);
        // The outputs that are inputs stay where they are.
        let in_place = |name: &&str| {
            let id = plan.outputs.iter().find(|(n, _)| n == *name).map(|(_, id)| *id);
            id.is_some_and(|id| matches!(plan.buffers[id].kind, BufferKind::Input { .. }))
        };
        let copied: Vec<&str> = wanted.iter().copied().filter(|n| !in_place(n)).collect();
        let out = ran.and_then(|()| bound.outputs(&copied));
        (*inputs, kept.arena) = bound.into_parts();
        out
    }

    /// Every launch of `bound`'s plan, each kernel from this artifact. Callers check the inputs
    /// first (shapes bound by the plan, values' counts, id ranges).
    fn launch_all(&self, bound: &mut BoundPlan) -> Result<(), String> {
        bound.launch_all(&mut |name, buffers| {
            let k = self.kernel(name)?;
            // SAFETY: the artifact was validated (hashes, plan vs manifest, every launch against its
            // kernel's signature); the inputs were checked against the plan's bounds, their values'
            // counts and their id ranges; `run` checks the buffers against the signature again.
            unsafe { k.run(buffers) }
        })
    }

    /// The names of the inputs kept from the last [`CpuArtifact::run_keeping`].
    pub fn kept_inputs(&self) -> Vec<String> {
        self.kept.lock().map(|k| k.buffers.keys().cloned().collect()).unwrap_or_default()
    }

    fn run_with(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        keep: bool,
    ) -> Result<HashMap<String, HostBuffer>, String> {
        let full = self.entry(entry)?;
        let pruned = self.run_plans.get(full, wanted, &[]);
        let plan = pruned.as_deref().unwrap_or(full);
        check_id_inputs(inputs, self.vocab)?;
        let mut kept = self.kept.lock().map_err(|_| "a previous run panicked".to_string())?;
        let mut shapes: InputShapes = inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        shapes.sort();
        if !resident.is_empty() {
            let same = kept.run.as_ref().is_some_and(|(e, s)| e == entry && *s == shapes);
            if !same || resident.iter().any(|r| !kept.buffers.contains_key(*r)) {
                return Err(format!(
                    "{entry}: inputs {} are not kept from a previous {entry} run of these shapes",
                    resident.join(", ")
                ));
            }
        }
        let mut owned = HashMap::new();
        for (name, b) in inputs {
            let taken = if resident.contains(&name.as_str()) { kept.buffers.remove(name) } else { None };
            match taken {
                Some(k) => owned.insert(name.clone(), k),
                None => {
                    if values(b) != b.shape.iter().product::<usize>() {
                        return Err(format!(
                            "{entry}: input {name} has {} values for shape {:?} (a cache kept by the program cannot be given back without its values)",
                            values(b),
                            b.shape
                        ));
                    }
                    owned.insert(name.clone(), b.clone())
                }
            };
        }
        if keep {
            // Until this run succeeds nothing is kept: a failed run leaves its inputs in no known
            // state. (A plain run leaves what a keeping run kept alone.)
            kept.run = None;
            kept.buffers.clear();
        }
        let arena = std::mem::take(&mut kept.arena);
        let mut bound = BoundPlan::with_parts(plan, &self.weights, owned, arena)?;
        self.launch_all(&mut bound)?;
        let out = bound.outputs(wanted)?;
        let (mut owned, arena) = bound.into_parts();
        kept.arena = arena;
        if keep {
            // Outputs bound to input buffers: the inputs updated in place.
            for id in plan.outputs.iter().map(|(_, id)| *id) {
                if let BufferKind::Input { name } = &plan.buffers[id].kind {
                    if let Some(b) = owned.remove(name) {
                        kept.buffers.insert(name.clone(), b);
                    }
                }
            }
            kept.run = Some((entry.to_string(), shapes));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(shape: &[usize], data: HostData) -> HostBuffer {
        HostBuffer { shape: shape.to_vec(), data }
    }

    /// A paged decode's positions reach past one page (seen on the H200: `v3r bench-decode` of a
    /// paged slice refused position 511 as outside a 64-row page); its table's pages stay in the pool.
    #[test]
    fn paged_positions_are_held_to_the_block_tables_pages() {
        let mut inputs = HashMap::from([
            ("positions".to_string(), buffer(&[2], HostData::I64(vec![511, 3]))),
            ("kv_cache.0".to_string(), buffer(&[16, 64, 4], HostData::F32(vec![0.0; 16 * 64 * 4]))),
            (crate::plan::PAGE_POOL.to_string(), buffer(&[2, 8], HostData::I32((0..15).chain([-1]).collect()))),
        ]);
        assert_eq!(check_id_inputs(&inputs, 10), Ok(()));
        inputs.get_mut("positions").unwrap().data = HostData::I64(vec![512, 3]);
        assert_eq!(
            check_id_inputs(&inputs, 10),
            Err("position 512 is outside kv_cache.0 (512 rows a sequence)".to_string())
        );
        inputs.get_mut("positions").unwrap().data = HostData::I64(vec![5, 3]);
        inputs.get_mut(crate::plan::PAGE_POOL).unwrap().data = HostData::I32((1..17).collect());
        assert_eq!(
            check_id_inputs(&inputs, 10),
            Err("block_table: page 16 is outside kv_cache.0's pool (16 pages)".to_string())
        );
        // Unpaged caches hold their own rows.
        inputs.remove(crate::plan::PAGE_POOL);
        inputs.get_mut("positions").unwrap().data = HostData::I64(vec![64, 3]);
        assert_eq!(
            check_id_inputs(&inputs, 10),
            Err("position 64 is outside kv_cache.0 (64 rows a sequence)".to_string())
        );
    }
}
