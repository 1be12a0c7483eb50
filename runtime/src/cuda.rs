//! Running a GPU artifact on a CUDA device: the driver calls around [`crate::gpu`]'s expansion.
//!
//! Load: every launch checked against its kernel's PTX and the memory the artifact needs against the
//! device's, before anything is allocated; the device's primary context and one stream; every
//! kernel's module (its cubin when the artifact has one — the artifact's compute capability was
//! checked against the device — else, or when the driver refuses the cubin, its PTX, JIT-compiled by
//! the driver), with the dynamic shared memory it asks for allowed; the weights in the plan's element
//! types (bf16 norms and tables, e4m3 bits, f32 scales; taken as stored where the checkpoint stores
//! them so), the prepared weights (concatenated, grouped per expert) and the RoPE tables, uploaded
//! once ([`crate::gpu::bind`]); one arena for the largest entry, the inputs at their planned sizes,
//! the temporaries region.
//! Run: inputs uploaded (but those kept on the device: decode's caches, updated in place, and the
//! caches a prefill carried over from its outputs into the inputs of that name — see
//! [`GpuArtifact::run_carrying`]), tensor maps encoded (`cuTensorMapEncodeTiled`) into one upload, every action launched on
//! the stream — decode and training steps replayed from a CUDA graph — one synchronization, the wanted outputs
//! read back; greedy tokens picked on the device by the artifact's argmax kernel.
//!
//! `V3R_CARRY=0` makes sessions move caches through the host instead of carrying them on the
//! device; `V3R_SYNC_EACH=1` synchronizes after every launch, so that a faulting kernel is named;
//! `V3R_GRAPHS=0` launches decode and training steps one by one; `V3R_DUMP_DIR=DIR` writes every launch's
//! buffers (as `v3c emulate --dump` does on the host).
//!
//! Not here yet: weights streamed from the checkpoint's mapping to the device without a host copy.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::Path;

use cudarc::driver::{result, sys};
use v3c_models::checkpoint::Checkpoint;

use crate::abi::{Param, SplitScratch, TensorMapSpec};
use crate::artifact::Artifact;
use crate::gpu::{Action, Bindings, Expander, InputShapes};
use crate::host::HostBuffer;
use crate::plan::{shape_at, BufferKind, EntryPlan};

pub(crate) fn cuda(what: &str) -> impl Fn(result::DriverError) -> String + '_ {
    move |e| format!("{what}: {e} ({:?})", e.0)
}

/// A device allocation, freed when dropped.
pub(crate) struct DeviceBuffer {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) bytes: usize,
}

impl DeviceBuffer {
    pub(crate) fn new(bytes: usize, what: &str) -> Result<DeviceBuffer, String> {
        // SAFETY: a plain allocation in the current context (at least one byte).
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(cuda(what))?;
        Ok(DeviceBuffer { ptr, bytes })
    }

    pub(crate) fn upload(bytes: &[u8], what: &str) -> Result<DeviceBuffer, String> {
        let b = DeviceBuffer::new(bytes.len(), what)?;
        if !bytes.is_empty() {
            // SAFETY: the allocation holds `bytes.len()` bytes.
            unsafe { result::memcpy_htod_sync(b.ptr, bytes) }.map_err(cuda(what))?;
        }
        Ok(b)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync and freed once.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Device memory for [`crate::gpu::bind`], held until the artifact is dropped.
#[derive(Default)]
struct DeviceMemory(Vec<DeviceBuffer>);

impl crate::gpu::Memory for DeviceMemory {
    /// Zeroed, as the host's ([`crate::gpu::bind`]'s emulation): rows a run never writes — a
    /// decode pool's past the rows a prefill carried into it — read the same on both.
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<u64, String> {
        let b = DeviceBuffer::new(bytes, what)?;
        if bytes > 0 {
            // SAFETY: the allocation just made, `bytes` long.
            unsafe { result::memset_d8_sync(b.ptr, 0, bytes) }.map_err(cuda(&format!("zeroing {what}")))?;
        }
        let ptr = b.ptr;
        self.0.push(b);
        Ok(ptr)
    }

    fn upload(&mut self, bytes: &[u8], what: &str) -> Result<u64, String> {
        let b = DeviceBuffer::upload(bytes, &format!("uploading {what}"))?;
        let ptr = b.ptr;
        self.0.push(b);
        Ok(ptr)
    }

    fn write(&mut self, addr: u64, bytes: &[u8], what: &str) -> Result<(), String> {
        let inside = self.0.iter().any(|b| addr >= b.ptr && addr + bytes.len() as u64 <= b.ptr + b.bytes as u64);
        if !inside {
            return Err(format!("writing {what}: {} bytes at {addr:#x} are outside every allocation", bytes.len()));
        }
        // SAFETY: within one of our allocations (checked above).
        unsafe { result::memcpy_htod_sync(addr, bytes) }.map_err(cuda(&format!("writing {what}")))
    }
}

struct Function {
    handle: sys::CUfunction,
    threads: u32,
    shared: u32,
}

/// Device `ordinal`'s primary context made current (retained for the process) and a new stream.
pub(crate) fn open_device(ordinal: usize) -> Result<(sys::CUdevice, sys::CUstream), String> {
    let device = result::device::get(ordinal as i32).map_err(cuda("cuDeviceGet"))?;
    // SAFETY: `device` comes from cuDeviceGet; the primary context is retained for the process.
    let ctx = unsafe { result::primary_ctx::retain(device) }.map_err(cuda("cuDevicePrimaryCtxRetain"))?;
    // SAFETY: a context just retained.
    unsafe { result::ctx::set_current(ctx) }.map_err(cuda("cuCtxSetCurrent"))?;
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(cuda("cuStreamCreate"))?;
    Ok((device, stream))
}

/// Encodes a tensor map (128 bytes) for `t`.
pub(crate) fn encode(t: &TensorMapSpec) -> Result<[u8; 128], String> {
    t.check()?;
    let data_type = if t.element == "bf16" {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    } else {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8
    };
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims = [t.cols as u64, t.rows as u64];
    let strides = [t.pitch as u64];
    let boxes = [t.box_cols as u32, t.box_rows as u32];
    let element_strides = [1u32, 1];
    // SAFETY: every pointer addresses a local array of the length the rank (2) implies.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            2,
            t.addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            if t.swizzle {
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
            } else {
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
            },
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuTensorMapEncodeTiled for {t:?}: {status:?}"));
    }
    let mut out = [0u8; 128];
    for (i, w) in map.opaque.iter().enumerate() {
        out[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

/// A run ready to launch: its actions and its tensor maps, uploaded into a buffer of its own.
struct Staged {
    actions: Vec<Action>,
    maps_base: u64,
    /// Per action, the index of its first tensor map in the uploaded ones.
    first_map: Vec<usize>,
    maps: DeviceBuffer,
}

/// A decode or training step captured as a CUDA graph, and what it was captured from.
struct CapturedGraph {
    entry: String,
    actions: Vec<Action>,
    maps_base: u64,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl CapturedGraph {
    fn destroy(self) {
        // SAFETY: made by instantiate/end_capture, used by nothing else.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// A GPU artifact loaded on a device, ready to run its entries.
pub struct GpuArtifact {
    pub artifact: Artifact,
    device: sys::CUdevice,
    stream: sys::CUstream,
    _modules: Vec<sys::CUmodule>,
    functions: HashMap<String, Function>,
    sms: usize,
    vocab: usize,
    // Memory: weights, prepared weights, tables (kept alive), and the run's regions.
    memory: Vec<DeviceBuffer>,
    input_bytes: HashMap<String, usize>,
    bindings: Bindings,
    scratch: std::cell::RefCell<Option<(DeviceBuffer, DeviceBuffer, SplitScratch)>>,
    /// The entry and input shapes of the last completed run.
    last_inputs: std::cell::RefCell<Option<(String, InputShapes)>>,
    /// What each input's device buffer holds (shape, element) after the last completed run: what
    /// a later run may take as resident. Emptied when a run fails.
    held: std::cell::RefCell<crate::gpu::HeldInputs>,
    /// The steps captured most recently (the least recently used first), up to
    /// [`crate::gpu::STAGED_PER_ENTRY`]: a batch's decode steps at each of its row counts.
    graphs: std::cell::RefCell<Vec<CapturedGraph>>,
    /// Each entry's last run staged (for its input shapes): its actions and tensor maps serve the
    /// entry's next run of the same shapes, whatever ran between.
    staged: std::cell::RefCell<crate::gpu::StagedRuns<Staged>>,
    argmax_out: std::cell::RefCell<Option<DeviceBuffer>>,
    /// [`GpuArtifact::scores_last`]'s tokens and results.
    scores_out: std::cell::RefCell<Option<DeviceBuffer>>,
    /// Leave every token's pick to the host ([`GpuArtifact::pick_on_host`]).
    host_picks: std::cell::Cell<bool>,
    /// Runs dumped per entry (`V3R_DUMP_DIR`).
    dumped_runs: std::cell::RefCell<HashMap<String, usize>>,
    /// The plans of runs that leave launches out.
    run_plans: crate::plan::RunPlans,
}

impl GpuArtifact {
    /// Copies rows `from..from + n` of the device buffer of input `name` (rows of the width and
    /// element it holds, [`GpuArtifact::run_carrying`]) to rows `to..to + n`, which must not
    /// overlap them: a batch's prefilled caches moved to their pages.
    pub fn move_rows(&self, name: &str, from: usize, to: usize, n: usize) -> Result<(), String> {
        let room = self.input_bytes.get(name).copied().unwrap_or(0);
        let mut held = self.held.borrow_mut();
        let row = held.moved(name, from, to, n, room)?;
        let base = self.bindings.inputs[name];
        if n > 0 {
            // SAFETY: both ranges lie in the input's allocation (checked by `moved`) and do not overlap.
            unsafe { result::memcpy_dtod_sync(base + (to * row) as u64, base + (from * row) as u64, n * row) }
                .map_err(|e| {
                    held.clear();
                    cuda(&format!("moving rows of {name}"))(e)
                })?;
        }
        Ok(())
    }
}

impl GpuArtifact {
    /// See [`crate::session::Program::reclaim_rows`].
    pub fn reclaim_rows(&self, name: &str, rows: usize) -> Result<(), String> {
        self.held.borrow_mut().reclaim(name, rows)
    }
}

impl Drop for GpuArtifact {
    fn drop(&mut self) {
        for g in self.graphs.get_mut().drain(..) {
            g.destroy();
        }
    }
}

impl GpuArtifact {
    /// Loads a validated GPU artifact on device `ordinal` with the checkpoint in `weights`
    /// (checked against the plan first).
    pub fn load(
        artifact: Artifact,
        weights: &Path,
        ordinal: usize,
        progress: &mut dyn FnMut(&str),
    ) -> Result<GpuArtifact, String> {
        artifact.check_weights(weights)?;
        let ckpt = Checkpoint::open(weights).map_err(|e| e.to_string())?;
        GpuArtifact::load_weights(artifact, &crate::gpu::Weights::Checkpoint(&ckpt), ordinal, progress)
    }

    /// As [`GpuArtifact::load`], the weights from `weights` (a checkpoint already checked against
    /// the plan, or made-up ones for timing).
    pub fn load_weights(
        artifact: Artifact,
        weights: &crate::gpu::Weights,
        ordinal: usize,
        progress: &mut dyn FnMut(&str),
    ) -> Result<GpuArtifact, String> {
        let dir = artifact.dir.display().to_string();
        if artifact.manifest.target.name == "cpu" {
            return Err(format!("{dir}: a cpu artifact (`v3r run` runs it on the CPU)"));
        }
        let info = crate::device::probe_device(ordinal).map_err(|e| e.to_string())?;
        artifact.runs_here(ordinal).map_err(|why| format!("{dir}: cannot run here: {why}"))?;
        let expander = Expander::new(&artifact)?;
        // Every launch checked against its kernel, and the memory it all needs against the device's,
        // before anything is allocated.
        let check = expander.check(&[]).map_err(|e| format!("{dir}: {e}"))?;
        let need = check.weight_bytes + check.prepared_bytes + check.arena_bytes + check.input_bytes + check.temp_bytes;
        if need > info.total_memory_bytes {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            return Err(format!(
                "{dir}: needs {:.1} GiB of device memory (weights {:.1}, re-laid out {:.1}, arena {:.1}, inputs {:.1}, \
                 temporaries {:.1}); cuda:{ordinal} {} has {:.1} GiB",
                gib(need),
                gib(check.weight_bytes),
                gib(check.prepared_bytes),
                gib(check.arena_bytes),
                gib(check.input_bytes),
                gib(check.temp_bytes),
                info.name,
                gib(info.total_memory_bytes)
            ));
        }
        let (device, stream) = open_device(ordinal)?;

        // Kernels.
        let mut modules = Vec::new();
        let mut functions = HashMap::new();
        for k in &artifact.manifest.kernels {
            progress(&format!("loading kernel {}", k.name));
            // The cubin when there is one; the PTX (JIT-compiled by the driver) when there is none or
            // the driver refuses the cubin (an older driver than the ptxas that made it).
            let load = |image: &[u8]| {
                // SAFETY: a cubin, or PTX text NUL-terminated, that outlives the call.
                unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
                    .map_err(cuda(&format!("{dir}: kernel {}: cuModuleLoadData", k.name)))
            };
            let ptx = || -> Result<Vec<u8>, String> {
                let mut ptx = std::fs::read(artifact.path(&k.file)).map_err(|e| format!("{}: {e}", k.file))?;
                ptx.push(0);
                Ok(ptx)
            };
            let module = match &k.cubin {
                Some(c) => {
                    let cubin = std::fs::read(artifact.path(&c.file)).map_err(|e| format!("{}: {e}", c.file))?;
                    match load(&cubin) {
                        Ok(m) => m,
                        Err(cubin_error) => load(&ptx()?).map_err(|e| format!("{e} (the cubin: {cubin_error})"))?,
                    }
                }
                None => load(&ptx()?)?,
            };
            modules.push(module);
            let name = CString::new(k.name.clone()).map_err(|_| format!("kernel name {}", k.name))?;
            // SAFETY: a module just loaded.
            let handle = unsafe { result::module::get_function(module, name) }
                .map_err(cuda(&format!("kernel {}: cuModuleGetFunction", k.name)))?;
            let shared = k.dynamic_shared_memory.unwrap_or(0) as u32;
            // Opted in whatever the size: the 48 KiB a launch gets without it count the kernel's static
            // shared memory too (the mbarriers a GEMM declares beside its 48 KiB of stages went over it:
            // CUDA_ERROR_INVALID_VALUE at launch, seen on the H200).
            if shared > 0 {
                // SAFETY: a valid function handle.
                unsafe {
                    result::function::set_function_attribute(
                        handle,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        shared as i32,
                    )
                }
                .map_err(cuda(&format!("kernel {}: {shared} B of dynamic shared memory", k.name)))?;
            }
            let threads =
                k.threads.ok_or_else(|| format!("{dir}/manifest.json: kernel {} has no thread count", k.name))? as u32;
            functions.insert(k.name.clone(), Function { handle, threads, shared });
        }

        // Weights, prepared weights, tables and the run's regions, in device memory.
        let mut memory = DeviceMemory::default();
        let (bindings, input_bytes) = crate::gpu::bind(&expander, weights, &mut memory, progress)?;
        let vocab = artifact.manifest.model.config["vocab_size"].as_u64().unwrap_or(0) as usize;
        Ok(GpuArtifact {
            artifact,
            device,
            stream,
            _modules: modules,
            functions,
            sms: info.multiprocessors as usize,
            vocab,
            memory: memory.0,
            input_bytes,
            bindings,
            scratch: std::cell::RefCell::new(None),
            last_inputs: std::cell::RefCell::new(None),
            held: std::cell::RefCell::new(crate::gpu::HeldInputs::default()),
            graphs: std::cell::RefCell::new(Vec::new()),
            staged: std::cell::RefCell::new(crate::gpu::StagedRuns::default()),
            argmax_out: std::cell::RefCell::new(None),
            scores_out: std::cell::RefCell::new(None),
            host_picks: std::cell::Cell::new(false),
            dumped_runs: std::cell::RefCell::new(HashMap::new()),
            run_plans: Default::default(),
        })
    }

    /// The plan of entry `entry`.
    pub fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
        self.artifact.plan.entries.iter().find(|e| e.name == entry).ok_or_else(|| format!("no entry '{entry}'"))
    }

    /// Expands `entry` at the sizes of `inputs` into actions with every address bound (split-K
    /// scratch grown to what they need).
    fn actions(&self, plan: &EntryPlan, inputs: &HashMap<String, HostBuffer>) -> Result<Vec<Action>, String> {
        let shapes = inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        let sizes = plan.bind(&shapes)?;
        let expander = Expander::new(&self.artifact)?;
        let mut bindings = self.bindings.clone();
        loop {
            if let Some((ws, counters, _)) = self.scratch.borrow().as_ref() {
                bindings.workspace = ws.ptr;
                bindings.counters = counters.ptr;
            }
            let (actions, need) = expander.expand(plan, sizes, &bindings, self.sms)?;
            let have = self.scratch.borrow().as_ref().map(|s| s.2).unwrap_or_default();
            if need.workspace_bytes <= have.workspace_bytes && need.counters <= have.counters {
                return Ok(actions);
            }
            let grown = SplitScratch {
                workspace_bytes: need.workspace_bytes.max(have.workspace_bytes),
                counters: need.counters.max(have.counters),
            };
            // The runs kept staged point at the scratch being replaced.
            self.staged.borrow_mut().clear();
            let ws = DeviceBuffer::new(grown.workspace_bytes, "the split-K workspace")?;
            let counters = DeviceBuffer::new(grown.counters * 4, "the split-K counters")?;
            // SAFETY: the allocation just made; the kernels expect zero counters.
            unsafe { result::memset_d8_sync(counters.ptr, 0, counters.bytes) }.map_err(cuda("zeroing counters"))?;
            *self.scratch.borrow_mut() = Some((ws, counters, grown));
        }
    }

    /// Runs entry `entry` on `inputs` (shapes within the plan's) and returns the outputs named in
    /// `wanted`, read back from the device.
    pub fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.run_keeping(entry, inputs, wanted, &[])
    }

    /// As [`GpuArtifact::run`], the inputs named in `resident` taken as the previous runs left them
    /// on the device (decode's caches, updated in place): not uploaded. Decode and training steps
    /// are replayed from a CUDA graph captured on the first step of a shape (`V3R_GRAPHS=0`:
    /// launched one by one).
    pub fn run_keeping(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.run_carrying(entry, inputs, wanted, resident, &[])
    }

    /// As [`GpuArtifact::run_keeping`], then the outputs named in `carry` (caches the entry writes
    /// anew: a prefill's) copied on the device into the inputs of that name, where a later run
    /// (the next prefill chunk, the first decode step) may take them as resident.
    ///
    /// A resident input must hold what the run reads: the element the entry's plan gives it and
    /// rows of the input's width, no more rows than its shape has (a prefill's `[P, C]` is the
    /// first P rows of a one-sequence decode's `[1, S, C]`, or of a pool whose table gives the
    /// sequence pages 0, 1, ... in order; the rows past P are written before they are read).
    pub fn run_carrying(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        carry: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        let full = self.entry_plan(entry)?;
        let pruned = self.run_plans.get(full, wanted, carry);
        let plan = pruned.as_deref().unwrap_or(full);
        let shapes: InputShapes = inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        let mut held = std::mem::take(&mut *self.held.borrow_mut());
        held.check_resident(entry, plan, inputs, resident)?;
        *self.last_inputs.borrow_mut() = None;
        let key = stage_key(entry, pruned.is_some(), wanted, carry);
        let staged = self.stage(plan, &key, inputs, resident)?;
        let sync_each = std::env::var("V3R_SYNC_EACH").is_ok_and(|v| v == "1");
        let graphs = self.graphs(entry);
        if let Some(dir) = std::env::var_os("V3R_DUMP_DIR") {
            // Launch by launch, each one's buffers read back and written as `v3c emulate --dump` does.
            let dir = std::path::PathBuf::from(dir);
            let label = {
                let mut runs = self.dumped_runs.borrow_mut();
                let n = runs.entry(entry.to_string()).or_insert(0);
                *n += 1;
                crate::gpu::dump_label(entry, *n - 1)
            };
            for (i, a) in staged.actions.iter().enumerate() {
                self.launch(entry, &staged, i)?;
                // SAFETY: our stream.
                unsafe { result::stream::synchronize(self.stream) }
                    .map_err(cuda(&format!("{entry}: action {i} ({a:?})")))?;
                if let Action::Kernel(k) = a {
                    let read = |b: &crate::abi::Buf| -> Result<Vec<u8>, String> {
                        let mut bytes =
                            vec![0u8; b.elements() * crate::plan::element_bytes(&b.element).unwrap_or(4) as usize];
                        if !bytes.is_empty() {
                            // SAFETY: the buffer lies in device memory of its shape.
                            unsafe { result::memcpy_dtoh_sync(&mut bytes, b.addr) }
                                .map_err(cuda("reading a dumped buffer"))?;
                        }
                        Ok(bytes)
                    };
                    crate::gpu::dump_launch(&dir, &label, i, k, &self.bindings, &read)?;
                }
            }
        } else if graphs {
            self.launch_graph(entry, &staged)?;
        } else {
            for i in 0..staged.actions.len() {
                self.launch(entry, &staged, i)?;
                if sync_each {
                    // SAFETY: our stream.
                    unsafe { result::stream::synchronize(self.stream) }
                        .map_err(cuda(&format!("{entry}: action {i} ({:?})", staged.actions[i])))?;
                }
            }
        }
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda(&format!("{entry}: running the launches")))?;
        let sizes = plan.bind(&shapes)?;
        held.ran(plan, inputs);
        for name in carry {
            let room = self.input_bytes.get(*name).copied().unwrap_or(0);
            let (offset, bytes) = held.carry(entry, plan, sizes, name, room)?;
            if bytes > 0 {
                // SAFETY: both regions lie in this artifact's device memory, the copy within each.
                unsafe { result::memcpy_dtod_sync(self.bindings.inputs[*name], self.bindings.arena + offset, bytes) }
                    .map_err(cuda(&format!("{entry}: carrying {name} over")))?;
            }
        }
        *self.held.borrow_mut() = held;
        // A run that left its logits out (or all but their last row) has none to take the argmax of.
        if pruned.is_none() || crate::plan::writes_whole("logits", wanted, carry) {
            *self.last_inputs.borrow_mut() = Some((entry.to_string(), shapes));
        }
        let mut out = HashMap::new();
        for (name, id) in &plan.outputs {
            let b = &plan.buffers[*id];
            let shape = shape_at(&b.dims, sizes);
            let Some((key, shape, bytes)) = crate::plan::wanted_bytes(wanted, name, shape, &b.dtype) else { continue };
            let src = self.bindings.address(&b.kind)? + bytes.start as u64;
            let read = |host: &mut [u8]| match host.is_empty() {
                true => Ok(()),
                false => {
                    // SAFETY: the rows lie in the buffer, in device memory sized for the planned shapes.
                    unsafe { result::memcpy_dtoh_sync(host, src) }.map_err(cuda(&format!("reading output {name}")))
                }
            };
            out.insert(key, crate::gpu::read_host_buffer(shape, &b.dtype, bytes.len(), read)?);
        }
        Ok(out)
    }

    /// Checks and uploads `inputs`, expands the entry at their sizes and uploads its tensor maps —
    /// or, when the entry's last run staged was at the same input shapes (every decode step of a
    /// batch, also after a joining prompt's prefill chunk; every window of a training run), takes
    /// its actions and tensor maps as they are: the expansion is milliseconds of host time a step
    /// (DeepSeek-V3's decode: 1185 launches).
    ///
    /// `key` names the run's plan among the entry's ([`crate::plan::run_label`]): a plan left
    /// short is staged apart from the whole one and from one left short otherwise.
    fn stage(
        &self,
        plan: &EntryPlan,
        key: &str,
        inputs: &HashMap<String, HostBuffer>,
        resident: &[&str],
    ) -> Result<std::rc::Rc<Staged>, String> {
        crate::cpu::check_id_inputs(inputs, self.vocab)?;
        let shapes: InputShapes = inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        // Taken out until the inputs are uploaded: a failed run stages anew.
        let (again, replaced) = match self.staged.borrow_mut().take(key, &shapes) {
            Ok(run) => (Some(run), None),
            Err(replaced) => (None, replaced),
        };
        let actions = match &again {
            Some(_) => Vec::new(),
            None => self.actions(plan, inputs)?,
        };
        for (name, b) in inputs.iter().filter(|(n, _)| !resident.contains(&n.as_str())) {
            let Some(planned) = plan.input(name) else { continue };
            let bytes = crate::gpu::plan_bytes(b, &planned.dtype).map_err(|e| format!("input {name}: {e}"))?;
            let expected = crate::plan::tensor_bytes(&b.shape, &planned.dtype).unwrap_or(0) as usize;
            if bytes.len() != expected {
                return Err(format!("input {name}: {} bytes of data for shape {:?}", bytes.len(), b.shape));
            }
            let (dst, room) = (self.bindings.inputs[name], self.input_bytes[name]);
            if bytes.len() > room {
                return Err(format!("input {name}: {} bytes, the plan holds {room}", bytes.len()));
            }
            // SAFETY: within the allocation (checked above).
            unsafe { result::memcpy_htod_sync(dst, &bytes) }.map_err(cuda(&format!("uploading input {name}")))?;
        }
        if let Some(staged) = again {
            self.staged.borrow_mut().keep(key, shapes, staged.clone());
            return Ok(staged);
        }
        // Tensor maps: all of the run's in one upload.
        let mut encoded = Vec::new();
        let mut first_map = Vec::new();
        for a in &actions {
            first_map.push(encoded.len() / 128);
            if let Action::Kernel(k) = a {
                for t in &k.tensor_maps {
                    encoded.extend(encode(t).map_err(|e| format!("{}: {e}", k.kernel))?);
                }
            }
        }
        // The maps go into the buffer of the run this one replaces (a prefill's next chunk) where
        // it holds them, else a new one.
        let reused = replaced.and_then(|r| std::rc::Rc::try_unwrap(r).ok()).map(|r| r.maps);
        let maps = match reused.filter(|m| m.bytes >= encoded.len().max(128)) {
            Some(maps) => maps,
            None => DeviceBuffer::new(encoded.len().max(128), "tensor maps")?,
        };
        if !encoded.is_empty() {
            // SAFETY: the region holds at least `encoded.len()` bytes.
            unsafe { result::memcpy_htod_sync(maps.ptr, &encoded) }.map_err(cuda("uploading tensor maps"))?;
        }
        let staged = std::rc::Rc::new(Staged { actions, maps_base: maps.ptr, first_map, maps });
        self.staged.borrow_mut().keep(key, shapes, staged.clone());
        Ok(staged)
    }

    /// Enqueues a staged run as one CUDA graph: replayed when the run's actions and tensor maps are
    /// those of one captured (a decode step of the same shapes: only the inputs' contents differ),
    /// else captured first — in place of the least recently used where
    /// [`crate::gpu::STAGED_PER_ENTRY`] are held.
    fn launch_graph(&self, entry: &str, staged: &Staged) -> Result<(), String> {
        let mut held = self.graphs.borrow_mut();
        let same =
            |g: &CapturedGraph| g.maps_base == staged.maps_base && g.entry == entry && g.actions == staged.actions;
        if let Some(i) = held.iter().position(same) {
            // The most recently used last.
            let g = held.remove(i);
            held.push(g);
        } else {
            while held.len() >= crate::gpu::STAGED_PER_ENTRY {
                held.remove(0).destroy();
            }
            // SAFETY: our stream; every call between begin and end only enqueues work on it.
            let graph = unsafe {
                result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                    .map_err(cuda(&format!("{entry}: cuStreamBeginCapture")))?;
                let launched = (0..staged.actions.len()).try_for_each(|i| self.launch(entry, staged, i));
                let graph =
                    result::stream::end_capture(self.stream).map_err(cuda(&format!("{entry}: cuStreamEndCapture")));
                launched?;
                graph?
            };
            // SAFETY: a graph just captured.
            let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
                .map_err(cuda(&format!("{entry}: cuGraphInstantiate")))?;
            held.push(CapturedGraph {
                entry: entry.to_string(),
                actions: staged.actions.clone(),
                maps_base: staged.maps_base,
                graph,
                exec,
            });
        }
        let exec = held.last().map(|g| g.exec).ok_or("no graph")?;
        // SAFETY: an instantiated graph of launches on buffers this artifact holds.
        unsafe { result::graph::launch(exec, self.stream) }.map_err(cuda(&format!("{entry}: cuGraphLaunch")))
    }

    /// Enqueues kernel launch `k` on the stream, its tensor maps at `maps` (128 bytes each).
    fn enqueue(&self, entry: &str, k: &crate::abi::KernelLaunch, maps: u64) -> Result<(), String> {
        let f = self.functions.get(&k.kernel).ok_or_else(|| format!("kernel {} not loaded", k.kernel))?;
        let mut values: Vec<u64> = k
            .params
            .iter()
            .map(|p| match *p {
                Param::Value(v) => v,
                Param::TensorMap(t) => maps + 128 * t as u64,
            })
            .collect();
        let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        // SAFETY: parameters as the kernel's PTX declares them (checked by the tests against every
        // kernel), buffers sized by the plan, grid from the problem.
        unsafe {
            result::launch_kernel(
                f.handle,
                (k.grid as u32, k.grid_y as u32, 1),
                (f.threads, 1, 1),
                f.shared,
                self.stream,
                &mut pointers,
            )
        }
        .map_err(cuda(&format!("{entry}: launching {}", k.kernel)))
    }

    /// With `yes`, sessions read every decode step's logits back and pick its tokens on the host,
    /// though the artifact's kernels could pick them here (the same tokens: the A/B for timing
    /// them, `--pick-on-host`).
    pub fn pick_on_host(&self, yes: bool) {
        self.host_picks.set(yes);
    }

    /// Whether sessions leave the picks to the host ([`GpuArtifact::pick_on_host`]).
    pub fn picks_on_host(&self) -> bool {
        self.host_picks.get()
    }

    /// Greedy tokens of the last run of `entry`: the rows of its `logits` output reduced on the
    /// device by the artifact's argmax kernel, only the indices read back. None when the artifact
    /// has no argmax kernel.
    pub fn argmax_last(&self, entry: &str) -> Result<Option<Vec<u32>>, String> {
        self.pick_last(entry, None)
    }

    /// Tokens of the last run of `entry` picked on the device, one per row of its `logits`: row
    /// r's drawn by the artifact's sampling kernel with `draws[r]` (the host sampler's token,
    /// [`v3c_models::sampling::draw_plain`], bit for bit), or its argmax where that temperature is
    /// not above 0; only the tokens read back — but for the rows whose top-p nucleus the kernel
    /// leaves to the host (more than its candidates, or NaN weights): their logits are read back
    /// and drawn from here. None when the artifact lacks a kernel the rows need.
    pub fn sample_last(&self, entry: &str, draws: &[v3c_models::sampling::Draw]) -> Result<Option<Vec<u32>>, String> {
        self.pick_last(entry, Some(draws))
    }

    /// [`GpuArtifact::argmax_last`] (`draws` None: every row greedy) and
    /// [`GpuArtifact::sample_last`].
    fn pick_last(&self, entry: &str, draws: Option<&[v3c_models::sampling::Draw]>) -> Result<Option<Vec<u32>>, String> {
        let logits = self.last_logits(entry)?;
        let rows = logits.shape.first().copied().unwrap_or(0);
        if let Some(d) = draws.filter(|d| d.len() != rows) {
            return Err(format!("{entry}: {} draws for {rows} rows of logits", d.len()));
        }
        let sampled = |r: usize| draws.is_some_and(|d| d[r].temperature > 0.0);
        let greedy = (0..rows).any(|r| !sampled(r));
        // One device buffer: the uniform draws (f64), the temperatures, the top-ps, the top-ks, the
        // min-ps, the argmax's tokens, the sampler's.
        let mut picks = self.argmax_out.borrow_mut();
        if picks.as_ref().is_none_or(|d| d.bytes < 32 * rows) {
            *picks = Some(DeviceBuffer::new(32 * rows.max(1), "picked tokens")?);
        }
        let base = picks.as_ref().map_or(0, |d| d.ptr);
        let at = |k: u64| base + k * rows as u64;
        let (uniform, temperature, top_p, top_k, min_p) = (at(0), at(8), at(12), at(16), at(20));
        let (argmax_idx, sample_idx) = (at(24), at(28));
        let expander = Expander::new(&self.artifact)?;
        let mut launches = Vec::new();
        if greedy {
            let Some(launch) = expander.argmax_launch(&logits, argmax_idx)? else { return Ok(None) };
            launches.push(launch);
        }
        if let Some(draws) = draws.filter(|_| (0..rows).any(sampled)) {
            let Some(launch) =
                expander.sample_launch(&logits, [temperature, top_p, top_k, min_p, uniform], sample_idx)?
            else {
                return Ok(None);
            };
            let mut bytes: Vec<u8> = draws.iter().flat_map(|d| d.uniform.to_le_bytes()).collect();
            bytes.extend(draws.iter().flat_map(|d| d.temperature.to_le_bytes()));
            bytes.extend(draws.iter().flat_map(|d| d.top_p.to_le_bytes()));
            bytes.extend(draws.iter().flat_map(|d| i32::try_from(d.top_k).unwrap_or(i32::MAX).to_le_bytes()));
            bytes.extend(draws.iter().flat_map(|d| d.min_p.to_le_bytes()));
            // SAFETY: the buffer holds `rows` f64 then four times `rows` 4-byte values from its start.
            unsafe { result::memcpy_htod_sync(uniform, &bytes) }.map_err(cuda("uploading sampling draws"))?;
            launches.push(launch);
        }
        if rows > 0 {
            for launch in &launches {
                self.enqueue(entry, launch, 0)?;
            }
        }
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda(&format!("{entry}: picking tokens")))?;
        let mut bytes = vec![0u8; 8 * rows];
        if rows > 0 {
            // SAFETY: the buffer holds both kernels' `rows` i32 there.
            unsafe { result::memcpy_dtoh_sync(&mut bytes, argmax_idx) }.map_err(cuda("reading picked tokens"))?;
        }
        let token = |i: usize| i32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        let mut picked = Vec::with_capacity(rows);
        for r in 0..rows {
            let t = match (sampled(r), draws) {
                (true, Some(draws)) if token(rows + r) == crate::lowering::SAMPLE_ON_HOST => {
                    // A nucleus the kernel left to the host: this row's logits, drawn here.
                    let row = read_row(&logits, r)?;
                    v3c_models::sampling::draw_plain(&row, &draws[r]) as i32
                }
                (true, _) => token(rows + r),
                (false, _) => token(r),
            };
            picked.push(u32::try_from(t).map_err(|_| format!("{entry}: row {r} picked token {t}"))?);
        }
        Ok(Some(picked))
    }

    /// Row `r` of the `logits` output of the last run of `entry`, read back.
    pub fn logits_row_last(&self, entry: &str, r: usize) -> Result<Vec<f32>, String> {
        let logits = self.last_logits(entry)?;
        match logits.shape.first() {
            Some(&rows) if r < rows => read_row(&logits, r),
            _ => Err(format!("{entry}: no row {r} of logits {:?}", logits.shape)),
        }
    }

    /// The `logits` output of the last run of `entry`, where it lies in the arena.
    fn last_logits(&self, entry: &str) -> Result<crate::abi::Buf, String> {
        let plan = self.entry_plan(entry)?;
        let sizes = match self.last_inputs.borrow().as_ref() {
            Some((e, shapes)) if e == entry => plan.bind(shapes)?,
            _ => return Err(format!("{entry}: no completed run to take logits from")),
        };
        let (_, id) =
            plan.outputs.iter().find(|(n, _)| n == "logits").ok_or_else(|| format!("{entry} has no logits"))?;
        let b = &plan.buffers[*id];
        let BufferKind::Arena { offset } = b.kind else { return Err("logits outside the arena".into()) };
        Ok(crate::abi::Buf {
            addr: self.bindings.arena + offset,
            shape: shape_at(&b.dims, sizes),
            element: crate::abi::element_name(&b.dtype).ok_or_else(|| format!("logits of {}", b.dtype))?,
        })
    }

    /// Each `logits` row r of the last run of `entry` scored for `tokens[r]` on the device by the
    /// artifact's scoring kernel: [`v3c_models::sampling::RowScore::of`], bit for bit, and the row's
    /// `alternatives` most probable tokens with their logits (at most
    /// [`crate::lowering::SCORES_TOP`]: the host's `top_k`); only 16 bytes a row read back, 8 more
    /// an alternative. None when the artifact has no scoring kernel.
    pub fn scores_last(
        &self,
        entry: &str,
        tokens: &[i32],
        alternatives: usize,
    ) -> Result<Option<Vec<crate::session::Scores>>, String> {
        let logits = self.last_logits(entry)?;
        let rows = logits.shape.first().copied().unwrap_or(0);
        if tokens.len() != rows {
            return Err(format!("{entry}: {} tokens to score for {rows} rows of logits", tokens.len()));
        }
        let top = crate::lowering::SCORES_TOP;
        if alternatives > top {
            return Err(format!("{entry}: {alternatives} alternatives scored, the kernel gives {top}"));
        }
        let layout = ScoreLayout { rows, top };
        let mut held = self.scores_out.borrow_mut();
        if held.as_ref().is_none_or(|d| d.bytes < layout.bytes()) {
            *held = Some(DeviceBuffer::new(layout.bytes().max(1), "token scores")?);
        }
        let base = held.as_ref().map_or(0, |d| d.ptr);
        let [sum, max, logit, top_id, top_logit, token] = layout.offsets().map(|o| base + o as u64);
        let outs = [sum, max, logit, top_id, top_logit];
        let Some(launch) = Expander::new(&self.artifact)?.scores_launch(&logits, token, outs)? else {
            return Ok(None);
        };
        if rows == 0 {
            return Ok(Some(Vec::new()));
        }
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        // SAFETY: the buffer holds `rows` i32 at `token`.
        unsafe { result::memcpy_htod_sync(token, &bytes) }.map_err(cuda("uploading tokens to score"))?;
        self.enqueue(entry, &launch, 0)?;
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda(&format!("{entry}: scoring tokens")))?;
        let mut out = vec![0u8; layout.read(alternatives)];
        // SAFETY: the buffer's first bytes, within it (`ScoreLayout::read`).
        unsafe { result::memcpy_dtoh_sync(&mut out, sum) }.map_err(cuda("reading token scores"))?;
        Ok(Some(layout.parse(&out, alternatives)))
    }

    /// Enqueues action `i` of a staged run on the stream.
    fn launch(&self, entry: &str, staged: &Staged, i: usize) -> Result<(), String> {
        let (maps_base, first_map) = (staged.maps_base, &staged.first_map);
        match &staged.actions[i] {
            Action::Kernel(k) => self.enqueue(entry, k, maps_base + 128 * first_map[i] as u64)?,
            Action::Copy2D { src, src_pitch, dst, dst_pitch, width, rows } => {
                let copy = sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    srcHost: std::ptr::null(),
                    srcDevice: *src,
                    srcArray: std::ptr::null_mut(),
                    srcPitch: *src_pitch,
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: *dst,
                    dstArray: std::ptr::null_mut(),
                    dstPitch: *dst_pitch,
                    WidthInBytes: *width,
                    Height: *rows,
                };
                if *rows > 0 {
                    // SAFETY: both sides lie in buffers the plan sized for these rows.
                    let status = unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.stream) };
                    if status != sys::CUresult::CUDA_SUCCESS {
                        return Err(format!("{entry}: a strided copy of {rows} rows: {status:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether runs of `entry` go through a CUDA graph: decode steps, and training steps (each
    /// window of a run the same launches: a DeepSeek-V3 layer's step is thousands, the routed
    /// experts' weight gradients alone three per expert), unless `V3R_GRAPHS=0` or
    /// `V3R_SYNC_EACH=1`.
    pub fn graphs(&self, entry: &str) -> bool {
        (entry == "decode" || entry == crate::training::TRAIN_ENTRY)
            && std::env::var("V3R_SYNC_EACH").map_or(true, |v| v != "1")
            && std::env::var("V3R_GRAPHS").map_or(true, |v| v != "0")
    }

    /// Milliseconds of each of `reps` runs of `entry` on `inputs` (uploaded once) after one
    /// warm-up: a run (its CUDA graph for decode and training, see [`GpuArtifact::graphs`]) between two CUDA
    /// events; the launches of a run wanting `wanted` ([`crate::plan::ONLY_WANTED`] leaves some out).
    pub fn time_entry(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        reps: usize,
    ) -> Result<Vec<f64>, String> {
        *self.last_inputs.borrow_mut() = None;
        self.held.borrow_mut().clear();
        let full = self.entry_plan(entry)?;
        let pruned = self.run_plans.get(full, wanted, &[]);
        let plan = pruned.as_deref().unwrap_or(full);
        let key = stage_key(entry, pruned.is_some(), wanted, &[]);
        let staged = self.stage(plan, &key, inputs, &[])?;
        let graphs = self.graphs(entry);
        let event = |what: &str| result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(cuda(what));
        let (start, end) = (event("cuEventCreate")?, event("cuEventCreate")?);
        let mut times = Vec::with_capacity(reps);
        let mut timed = || -> Result<(), String> {
            for rep in 0..=reps {
                // SAFETY: events and stream of this context.
                unsafe { result::event::record(start, self.stream) }.map_err(cuda("cuEventRecord"))?;
                if graphs {
                    self.launch_graph(entry, &staged)?;
                } else {
                    for i in 0..staged.actions.len() {
                        self.launch(entry, &staged, i)?;
                    }
                }
                // SAFETY: as above.
                let ms = unsafe {
                    result::event::record(end, self.stream).map_err(cuda("cuEventRecord"))?;
                    result::event::synchronize(end).map_err(cuda(&format!("{entry}: running the launches")))?;
                    result::event::elapsed(start, end).map_err(cuda("cuEventElapsedTime"))?
                };
                if rep > 0 {
                    times.push(f64::from(ms));
                }
            }
            Ok(())
        };
        let outcome = timed();
        // SAFETY: events created above, not used after.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        outcome.map(|()| times)
    }

    /// Times every kernel launch of `entry` at its planned sizes (inputs from
    /// [`crate::cpu::bench_inputs`]): one run first so every buffer holds what it would, then each
    /// launch `reps` times after one warm-up, timed by CUDA events; per kernel, the medians summed.
    /// Each timed launch follows a 256 MiB memset, as `v3r tune` times candidates: L2 holds none of
    /// its weights (as in a step, where a layer's weights were last read a step ago), and the
    /// launch is queued while the memset runs, so the host's launch overhead is not in its time.
    pub fn bench_kernels(&self, entry: &str, reps: usize) -> Result<Vec<crate::cpu::KernelTiming>, String> {
        let plan = self.entry_plan(entry)?;
        let inputs = crate::cpu::bench_inputs(plan)?;
        self.run(entry, &inputs, &[])?;
        *self.last_inputs.borrow_mut() = None;
        self.held.borrow_mut().clear();
        let staged = self.stage(plan, entry, &inputs, &[])?;
        let flush = DeviceBuffer::new(256 << 20, "the L2 flush buffer")?;
        let event = |what: &str| result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(cuda(what));
        let (start, end) = (event("cuEventCreate")?, event("cuEventCreate")?);
        let mut per_launch = Vec::new();
        for (i, a) in staged.actions.iter().enumerate() {
            let Action::Kernel(k) = a else { continue };
            let mut times = Vec::with_capacity(reps);
            for rep in 0..=reps {
                // SAFETY: events, stream and buffer of this context.
                unsafe {
                    result::memset_d8_async(flush.ptr, 0, flush.bytes, self.stream).map_err(cuda("flushing L2"))?;
                    result::event::record(start, self.stream).map_err(cuda("cuEventRecord"))?;
                }
                self.launch(entry, &staged, i)?;
                // SAFETY: as above.
                let ms = unsafe {
                    result::event::record(end, self.stream).map_err(cuda("cuEventRecord"))?;
                    result::event::synchronize(end).map_err(cuda(&format!("{entry}: {}", k.kernel)))?;
                    result::event::elapsed(start, end).map_err(cuda("cuEventElapsedTime"))?
                };
                if rep > 0 {
                    times.push(ms as f64);
                }
            }
            times.sort_by(f64::total_cmp);
            per_launch.push((k.kernel.clone(), times.get(times.len() / 2).copied().unwrap_or(0.0)));
        }
        // SAFETY: events created above, not used after.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        Ok(crate::cpu::kernel_timings(per_launch))
    }

    /// The device this artifact runs on.
    pub fn device(&self) -> sys::CUdevice {
        self.device
    }
}

impl crate::optimizer::Device for GpuArtifact {
    fn alloc_zeroed(&mut self, bytes: usize, what: &str) -> Result<u64, String> {
        let mut memory = DeviceMemory(std::mem::take(&mut self.memory));
        let addr = crate::gpu::Memory::alloc(&mut memory, bytes, what);
        self.memory = memory.0;
        addr
    }

    fn write(&mut self, addr: u64, bytes: &[u8], what: &str) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: the caller's region, at least `bytes.len()` long (its own allocations).
        unsafe { result::memcpy_htod_sync(addr, bytes) }.map_err(cuda(&format!("writing {what}")))
    }

    fn read(&mut self, addr: u64, bytes: usize, what: &str) -> Result<Vec<u8>, String> {
        let mut host = vec![0u8; bytes];
        if bytes > 0 {
            // SAFETY: as above.
            unsafe { result::memcpy_dtoh_sync(&mut host, addr) }.map_err(cuda(&format!("reading {what}")))?;
        }
        Ok(host)
    }

    fn launch(&mut self, launches: &[crate::abi::KernelLaunch]) -> Result<(), String> {
        for k in launches {
            self.enqueue("the optimizer", k, 0)?;
        }
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda("the optimizer's launches"))
    }

    fn bindings(&self) -> &Bindings {
        &self.bindings
    }

    fn free_bytes(&self) -> Option<usize> {
        result::mem_get_info().ok().map(|(free, _)| free)
    }
}

impl crate::training::EntryRunner for GpuArtifact {
    fn dir(&self) -> String {
        self.artifact.dir.display().to_string()
    }

    fn artifact(&self) -> Option<&Artifact> {
        Some(&self.artifact)
    }

    fn device(&mut self) -> Option<&mut dyn crate::optimizer::Device> {
        Some(self)
    }

    fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
        GpuArtifact::entry_plan(self, entry)
    }

    fn weight_names(&self) -> Vec<String> {
        crate::gpu::rebindable_weights(&self.bindings)
    }

    fn set_weight(&mut self, name: &str, weight: HostBuffer) -> Result<(), String> {
        let (addr, bytes) = crate::gpu::rebind(&self.bindings, &self.artifact, name, &weight)?;
        // SAFETY: the weight's own allocation, sized by the plan for these bytes (shape checked).
        unsafe { result::memcpy_htod_sync(addr, &bytes) }.map_err(cuda(&format!("uploading weight {name}")))
    }

    fn run(
        &mut self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        GpuArtifact::run(self, entry, inputs, wanted)
    }
}

/// Row `r` of `logits` (`[rows, vocab]` f32 on the device), read back; `r` below its rows.
fn read_row(logits: &crate::abi::Buf, r: usize) -> Result<Vec<f32>, String> {
    let vocab = logits.shape.get(1).copied().unwrap_or(0);
    let mut row = vec![0u8; 4 * vocab];
    // SAFETY: row r of the logits, `vocab` f32 within the arena (the caller checked r).
    unsafe { result::memcpy_dtoh_sync(&mut row, logits.addr + (4 * vocab * r) as u64) }
        .map_err(cuda("reading a row of logits"))?;
    Ok(row.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Where [`GpuArtifact::scores_last`]'s device buffer holds the scoring kernel's operands for
/// `rows` rows and `top` alternatives a row, each a contiguous array from its offset (bytes): the
/// sums (f64 bits, 8 a row), the maxima, the tokens' logits (4 a row each), the most probable
/// tokens and their logits (`4 top` a row each), the tokens scored (4 a row) — the first five read
/// back from the start.
#[derive(Debug, Clone, Copy)]
struct ScoreLayout {
    rows: usize,
    top: usize,
}

impl ScoreLayout {
    /// Bytes a row of each operand takes, in the buffer's order.
    fn widths(&self) -> [usize; 6] {
        [8, 4, 4, 4 * self.top, 4 * self.top, 4]
    }

    /// Each operand's offset: sum, max, logit, top_id, top_logit, token.
    fn offsets(&self) -> [usize; 6] {
        let mut at = 0;
        self.widths().map(|w| {
            let o = at;
            at += w * self.rows;
            o
        })
    }

    fn bytes(&self) -> usize {
        self.widths().iter().sum::<usize>() * self.rows
    }

    /// Bytes to read back from the start: the sums, maxima and logits; with alternatives, the most
    /// probable tokens and theirs too.
    fn read(&self, alternatives: usize) -> usize {
        self.offsets()[if alternatives > 0 { 5 } else { 3 }]
    }

    /// The rows' scores from the bytes read back (`out`, [`ScoreLayout::read`] of them): each row's
    /// [`v3c_models::sampling::RowScore`] and its first `alternatives` most probable tokens (up to
    /// the first -1: past the row's tokens).
    fn parse(&self, out: &[u8], alternatives: usize) -> Vec<crate::session::Scores> {
        let [_, max, logit, top_id, top_logit, _] = self.offsets();
        let word = |o: usize| [out[o], out[o + 1], out[o + 2], out[o + 3]];
        let row = |r: usize| {
            let row = v3c_models::sampling::RowScore {
                sum: f64::from_bits(u64::from_le_bytes(std::array::from_fn(|i| out[8 * r + i]))),
                max: f32::from_le_bytes(word(max + 4 * r)),
                logit: f32::from_le_bytes(word(logit + 4 * r)),
            };
            let at = |i: usize| 4 * (r * self.top + i);
            let alternative = |i: usize| {
                let id = i32::from_le_bytes(word(top_id + at(i)));
                u32::try_from(id).ok().map(|id| (id, f32::from_le_bytes(word(top_logit + at(i)))))
            };
            crate::session::Scores { row, top: (0..alternatives).map_while(alternative).collect() }
        };
        (0..self.rows).map(row).collect()
    }
}

/// What a run of `entry` is staged under ([`GpuArtifact::stage`]): the entry's name for its whole
/// plan, what the run keeps for a plan left short (`pruned`; [`crate::plan::run_label`]).
fn stage_key(entry: &str, pruned: bool, wanted: &[&str], carry: &[&str]) -> String {
    match pruned {
        true => crate::plan::run_label(entry, wanted, carry),
        false => entry.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operands lie one after another without overlap, each its kernel argument's size
    /// (`[rows]` of 8 or 4 bytes, `[rows, top]` of 4), the tokens last (not read back); a buffer
    /// written as the kernel writes each operand's arrays parses to each row's values.
    #[test]
    fn score_buffers_parse_as_the_kernel_writes_them() {
        let (rows, top) = (3, crate::lowering::SCORES_TOP);
        let layout = ScoreLayout { rows, top };
        let o = layout.offsets();
        assert_eq!(o, [0, 24, 36, 48, 48 + 240, 48 + 480]);
        assert_eq!((layout.bytes(), layout.read(0), layout.read(5)), (48 + 480 + 12, 48, 48 + 480));
        let mut buffer = vec![0u8; layout.bytes()];
        let mut put = |at: usize, bytes: &[u8]| buffer[at..at + bytes.len()].copy_from_slice(bytes);
        for r in 0..rows {
            put(o[0] + 8 * r, &(1.5 + r as f64).to_bits().to_le_bytes());
            put(o[1] + 4 * r, &(10.0 + r as f32).to_le_bytes());
            put(o[2] + 4 * r, &(-1.0 - r as f32).to_le_bytes());
            for i in 0..top {
                // Row 2 has only 2 tokens.
                let id = if r == 2 && i >= 2 { -1 } else { (100 * r + i) as i32 };
                put(o[3] + 4 * (r * top + i), &id.to_le_bytes());
                put(o[4] + 4 * (r * top + i), &(r as f32 - i as f32).to_le_bytes());
            }
        }
        let got = layout.parse(&buffer[..layout.read(5)], 5);
        for (r, s) in got.iter().enumerate() {
            let want =
                v3c_models::sampling::RowScore { sum: 1.5 + r as f64, max: 10.0 + r as f32, logit: -1.0 - r as f32 };
            assert_eq!(s.row, want);
            let n = if r == 2 { 2 } else { 5 };
            let alternatives: Vec<(u32, f32)> = (0..n).map(|i| ((100 * r + i) as u32, r as f32 - i as f32)).collect();
            assert_eq!(s.top, alternatives, "row {r}");
        }
        assert!(layout.parse(&buffer[..layout.read(0)], 0).iter().all(|s| s.top.is_empty()));
    }
}
