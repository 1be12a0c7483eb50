//! A GPU artifact run on the host: the runtime's whole walk ([`v3c_runtime::gpu`]: weights bound
//! and re-laid out, inputs, temporaries, RoPE tables, every template launch with its parameters, the
//! strided result copies) over host memory, with row kernels run through their CPU lowering (the
//! same template, JIT-compiled) and GEMMs computed from their launch parameters the way the kernel
//! reads them. What it gives is what the GPU must give, launch by launch: `v3c emulate --dump DIR`
//! writes each launch's buffers as `V3R_DUMP_DIR` makes `v3r` write them on the GPU, and
//! `benches/device/dump_compare.py` finds the first launch where the two part.

use std::collections::HashMap;
use std::path::Path;

use melior::{Context, ExecutionEngine};
pub use v3c_ptxsim::Checks;
use v3c_runtime::abi::{GemmAbi, KernelAbi, KernelLaunch, Param, TensorMapSpec};
use v3c_runtime::artifact::Artifact;
use v3c_runtime::gpu::{bind, host_buffer, plan_bytes, Action, Bindings, Expander, Memory, Weights};
use v3c_runtime::host::{call_packed, HostBuffer, RawBuffer};
use v3c_runtime::plan::{element_bytes, shape_at};

/// Host memory standing in for the device: 256-byte aligned, zeroed allocations kept alive, and
/// where each lies (what a simulated kernel may touch).
#[derive(Default)]
pub struct HostMemory {
    blocks: Vec<Vec<u64>>,
    /// (address, bytes) of every allocation, sorted by address.
    regions: Vec<(u64, usize)>,
}

impl HostMemory {
    /// Where the allocations lie: (address, bytes), sorted by address.
    pub fn regions(&self) -> &[(u64, usize)] {
        &self.regions
    }
}

impl Memory for HostMemory {
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<u64, String> {
        // Fallible: a plan or lowering sized past this machine's memory is an error, not an abort.
        let failed = || format!("cannot allocate {bytes} bytes of host memory for {what} (the emulated device)");
        let words = bytes.div_ceil(8) + 32;
        let layout = std::alloc::Layout::array::<u64>(words).map_err(|_| failed())?;
        // Zeroed as `vec![0u64; words]` would be (untouched pages stay unmapped), but an error when
        // the allocator refuses.
        // SAFETY: a non-zero size; on success the memory holds `words` zeroed u64s, allocated by the
        // global allocator with the layout `Vec<u64>` frees it with.
        let mut v = unsafe {
            let p = std::alloc::alloc_zeroed(layout).cast::<u64>();
            if p.is_null() {
                return Err(failed());
            }
            Vec::from_raw_parts(p, words, words)
        };
        let addr = (v.as_mut_ptr() as u64).next_multiple_of(256);
        self.blocks.push(v);
        let at = self.regions.partition_point(|r| r.0 < addr);
        self.regions.insert(at, (addr, bytes));
        Ok(addr)
    }

    fn upload(&mut self, bytes: &[u8], what: &str) -> Result<u64, String> {
        let addr = self.alloc(bytes.len(), what)?;
        self.write(addr, bytes, what)?;
        Ok(addr)
    }

    fn write(&mut self, addr: u64, bytes: &[u8], what: &str) -> Result<(), String> {
        let inside = self.regions.iter().any(|&(at, n)| addr >= at && addr + bytes.len() as u64 <= at + n as u64);
        if !inside {
            return Err(format!("writing {what}: {} bytes at {addr:#x} are outside every allocation", bytes.len()));
        }
        // SAFETY: within one of our allocations (checked above), which outlive this call.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }
}

/// What a flash-attention launch computes ([`crate::conversion::sm90::host::mla_prefill`],
/// [`crate::conversion::sm90::host::mla_grad`]), read from its parameters as the kernel reads them:
/// q, k, v (and a gradient's dout) from their tensor maps, the memrefs (out, a forward's lse; a
/// gradient's lse, D and out), the query and key lengths, the scale's bits.
///
/// # Safety
/// Every address in the launch must be live host memory of the sizes it names.
pub unsafe fn emulate_prefill(l: &KernelLaunch, kind: v3c_runtime::abi::FlashKind) -> Result<(), String> {
    use crate::conversion::sm90::mla::GradOf;
    use v3c_runtime::abi::FlashKind;
    let grad = match kind {
        FlashKind::Forward | FlashKind::Lse => None,
        FlashKind::GradQ => Some(GradOf::Queries),
        FlashKind::GradK => Some(GradOf::Keys),
        FlashKind::GradV => Some(GradOf::Values),
    };
    let maps = if grad.is_some() { 4 } else { 3 };
    let v = values_after_maps(l, maps)?;
    // Memrefs: allocated, aligned, offset, sizes, strides; then T, S, the scale's bits.
    let ranks: &[usize] = match kind {
        FlashKind::Forward => &[2],
        FlashKind::Lse => &[2, 1],
        _ => &[1, 1, 2],
    };
    if v.len() != ranks.iter().map(|r| 3 + 2 * r).sum::<usize>() + 3 {
        return Err(format!("{}: {} parameters after the tensor maps", l.kernel, v.len()));
    }
    let mut at = 0;
    let mut memrefs = Vec::new();
    for &rank in ranks {
        let shape = v[at + 3..at + 3 + rank].iter().map(|&d| d as usize).collect();
        memrefs.push(RawBuffer { ptr: v[at + 1] as *mut (), shape, element: "f32".into() });
        at += 3 + 2 * rank;
    }
    let (t, s, scale) = (v[at] as usize, v[at + 1] as usize, f32::from_bits(v[at + 2] as u32));
    let map = |i: usize| mapped(l, i);
    let (q, k) = (map(0)?, map(1)?);
    if t == 0 || q.shape[0] % t != 0 || k.shape[0] != s * (q.shape[0] / t) {
        return Err(format!("{}: q rows {} and k rows {} for T {t}, S {s}", l.kernel, q.shape[0], k.shape[0]));
    }
    let heads = q.shape[0] / t;
    let mut bufs = vec![q, k, map(2)?];
    match grad {
        None => {
            bufs.extend(memrefs);
            crate::conversion::sm90::host::mla_prefill(heads, scale, &bufs)
        }
        Some(of) => {
            bufs.push(map(3)?);
            bufs.extend(memrefs);
            crate::conversion::sm90::host::mla_grad(of, heads, scale, &bufs)
        }
    }
}

/// What a decode attention launch computes ([`crate::conversion::sm90::host::mla_decode`]), read
/// from its parameters as the kernel reads them: q and the cache from their tensor maps, the block
/// table, lengths, split outputs and lse from their memrefs, the heads and the scale's bits.
///
/// # Safety
/// Every address in the launch must be live host memory of the sizes it names.
///
/// With the fp8 cache (three tensor maps: q, the e4m3 latent, the bf16 RoPE key; the scales' memref
/// first after them), the cache is decoded as the kernel decodes each page — `bf16(e4m3 * scale)`
/// — into a bf16 copy the same function reads.
pub unsafe fn emulate_decode(l: &KernelLaunch) -> Result<(), String> {
    if l.tensor_maps.len() == 1 {
        // The attention over the selected rows: q's map, then keys, selection, outputs, lse.
        let v = values_after_maps(l, 1)?;
        if v.len() != 7 + 7 + 9 + 7 + 4 {
            return Err(format!("{}: {} parameters after the tensor map", l.kernel, v.len()));
        }
        let memref = |at: usize, rank: usize, element: &str| RawBuffer {
            ptr: v[at + 1] as *mut (),
            shape: v[at + 3..at + 3 + rank].iter().map(|&d| d as usize).collect(),
            element: element.into(),
        };
        // The keys' element type is the kernel's (`_sel16`: bf16 rows).
        let rows16 = crate::conversion::sm90::mla::MlaDecodeConfig::from_name(&l.kernel).is_some_and(|c| c.bf16_rows);
        let mut keys = memref(0, 2, if rows16 { "bf16" } else { "f32" });
        let (heads, scale, seq_rows) = (v[31] as usize, f32::from_bits(v[32] as u32), v[33] as usize);
        if seq_rows > 0 {
            // Each query's own rows (decode: its sequence's cache).
            keys.shape = vec![keys.shape[0] / seq_rows, seq_rows, keys.shape[1]];
        }
        let bufs = [mapped(l, 0)?, keys, memref(7, 2, "i32"), memref(14, 3, "f32"), memref(23, 2, "f32")];
        return crate::conversion::sm90::host::mla_decode_selected(heads, scale, &bufs);
    }
    let fp8 = l.tensor_maps.len() == 3;
    let maps = if fp8 { 3 } else { 2 };
    let v = values_after_maps(l, maps)?;
    if v.len() != 7 + 5 + 9 + 7 + 3 + if fp8 { 7 } else { 0 } {
        return Err(format!("{}: {} parameters after the tensor maps", l.kernel, v.len()));
    }
    let mut at = 0;
    let mut memref = |rank: usize, element: &str| {
        let (ptr, shape) = (v[at + 1], v[at + 3..at + 3 + rank].iter().map(|&d| d as usize).collect());
        let strides: Vec<usize> = v[at + 3 + rank..at + 3 + 2 * rank].iter().map(|&d| d as usize).collect();
        at += 3 + 2 * rank;
        (RawBuffer { ptr: ptr as *mut (), shape, element: element.into() }, strides)
    };
    let mut decoded: Vec<u16> = Vec::new();
    let cache = if fp8 {
        let (scales, strides) = memref(2, "f32");
        let (latent, rope) = (&l.tensor_maps[1], &l.tensor_maps[2]);
        let (rows, kv, width) = (latent.rows, latent.cols, latent.cols + rope.cols);
        if scales.shape != [rows, kv.div_ceil(128)] || strides[1] != 1 || rope.rows != rows {
            return Err(format!("{}: scales {:?} (strides {strides:?}) for {rows} rows", l.kernel, scales.shape));
        }
        decoded.resize(rows * width, 0);
        for (r, out) in decoded.chunks_exact_mut(width).enumerate() {
            let bytes = std::slice::from_raw_parts((latent.addr as usize + r * latent.pitch) as *const u8, kv);
            let keys = std::slice::from_raw_parts((rope.addr as usize + r * rope.pitch) as *const u16, rope.cols);
            for (c, (o, &b)) in out.iter_mut().zip(bytes).enumerate() {
                let s = *(scales.ptr as *const f32).add(r * strides[0] + c / 128);
                *o = v3c_models::dtype::f32_to_bf16(v3c_models::dtype::f8e4m3_to_f32(b) * s);
            }
            out[kv..].copy_from_slice(keys);
        }
        RawBuffer { ptr: decoded.as_mut_ptr() as *mut (), shape: vec![rows, width], element: "bf16".into() }
    } else {
        mapped(l, 1)?
    };
    let (table, seqlens, o_part, lse) =
        (memref(2, "i32").0, memref(1, "i32").0, memref(3, "f32").0, memref(2, "f32").0);
    let (heads, scale) = (v[at + 1] as usize, f32::from_bits(v[at + 2] as u32));
    crate::conversion::sm90::host::mla_decode(heads, scale, &[mapped(l, 0)?, cache, table, seqlens, o_part, lse])
}

/// Runs `launch` (of `kernel`'s PTX, `threads` a block and `dynamic_shared` bytes) in the PTX
/// simulator: tensor-map parameters passed as the simulator names them, the maps as the runtime
/// would encode them; with `regions`, global accesses outside them fail the launch; run and
/// checked as `checks` says (the threads' order, races).
///
/// # Safety
/// Every address the launch names must be live host memory of the sizes it names (outside
/// `regions`, when given, nothing is touched).
pub unsafe fn simulate_launch(
    kernel: &v3c_ptxsim::Kernel,
    launch: &KernelLaunch,
    threads: usize,
    dynamic_shared: usize,
    regions: Option<&[(u64, usize)]>,
    checks: v3c_ptxsim::Checks,
) -> Result<v3c_ptxsim::Stats, String> {
    let params: Vec<u64> = launch
        .params
        .iter()
        .map(|p| match *p {
            Param::Value(v) => v,
            Param::TensorMap(i) => v3c_ptxsim::TENSOR_MAP_BASE + 128 * i as u64,
        })
        .collect();
    let maps: Vec<v3c_ptxsim::TensorMap> = launch
        .tensor_maps
        .iter()
        .map(|m| v3c_ptxsim::TensorMap {
            addr: m.addr,
            rows: m.rows,
            cols: m.cols,
            element_bytes: m.element_bytes(),
            box_rows: m.box_rows,
            box_cols: m.box_cols,
            pitch: m.pitch,
            swizzle: m.swizzle,
        })
        .collect();
    let sim = v3c_ptxsim::Launch {
        grid: [launch.grid as u32, launch.grid_y as u32],
        threads: threads as u32,
        dynamic_shared,
        params: &params,
        tensor_maps: &maps,
        regions,
        max_instructions: 1 << 34,
        checks,
    };
    // SAFETY: the caller's promise.
    unsafe { v3c_ptxsim::run(kernel, &sim) }
}

/// A launch's parameters after its `maps` tensor maps, as values.
fn values_after_maps(l: &KernelLaunch, maps: usize) -> Result<Vec<u64>, String> {
    l.params[maps.min(l.params.len())..]
        .iter()
        .map(|p| match p {
            Param::Value(v) => Ok(*v),
            Param::TensorMap(_) => Err(format!("{}: a tensor map past the first {maps} parameters", l.kernel)),
        })
        .collect()
}

/// The matrix a launch's tensor map `i` maps, as a buffer.
fn mapped(l: &KernelLaunch, i: usize) -> Result<RawBuffer, String> {
    let m: &TensorMapSpec = l.tensor_maps.get(i).ok_or_else(|| format!("{}: tensor map {i} missing", l.kernel))?;
    if m.pitch != m.cols * m.element_bytes() {
        return Err(format!("{}: tensor map {i} has rows {} bytes apart (read as contiguous)", l.kernel, m.pitch));
    }
    Ok(RawBuffer { ptr: m.addr as *mut (), shape: vec![m.rows, m.cols], element: m.element.to_string() })
}

/// What a GEMM template launch computes, read from its parameters as the kernel reads them (tensor
/// maps for A and B, then the memrefs in the template's order): `out = A . B^T` per 128-wide K
/// block with the 1x128 / 128x128 (`b_row_scales`: 1x128) scales (fp8), grouped rows by offsets
/// (gathered through the permutation, weighted by the row scale, scattered into token rows), plus
/// the residual; a second A (tensor map 2) adds its product with the same B.
///
/// # Safety
/// Every address in the launch must be live host memory of the sizes it names.
pub unsafe fn emulate_gemm(abi: &GemmAbi, l: &KernelLaunch) -> Result<(), String> {
    use v3c_models::dtype::{bf16_to_f32, f8e4m3_to_f32};
    let maps = 2 + usize::from(abi.dual_a);
    let v = values_after_maps(l, maps)?;
    let mut at = 0;
    let mut memref = |rank: usize| {
        let (ptr, sizes) = (v[at + 1], v[at + 3..at + 3 + rank].iter().map(|&d| d as usize).collect::<Vec<usize>>());
        at += 3 + 2 * rank;
        (ptr, sizes)
    };
    let out = memref(2);
    let fp8 = abi.input == "fp8";
    let (a_scale, b_scale) = if fp8 { (Some(memref(2)), Some(memref(2))) } else { (None, None) };
    let (mut offsets, mut perm) = (None, None);
    match abi.grouping.as_str() {
        "dense" => {}
        "contiguous" => {
            offsets = Some(memref(1));
            if abi.scatter {
                perm = Some(memref(1));
            }
        }
        "gather" => {
            offsets = Some(memref(1));
            perm = Some(memref(1));
        }
        other => return Err(format!("{}: {other} grouping is not emulated", l.kernel)),
    }
    let k_range = abi.k_range.then(|| memref(1));
    let row_scale = abi.row_scale.then(|| memref(1));
    let residual = abi.residual.then(|| memref(2));
    let k = *v.last().ok_or("no parameters")? as usize;
    let (a, b) = (&l.tensor_maps[0], &l.tensor_maps[1]);
    let a2 =
        if abi.dual_a { Some(l.tensor_maps.get(2).ok_or("a dual-A GEMM without its third tensor map")?) } else { None };
    // SAFETY (all accesses below): the caller's promise.
    let f32_at = |ptr: u64, i: usize| unsafe { *(ptr as *const f32).add(i) };
    let i32_at = |ptr: u64, i: usize| unsafe { *(ptr as *const i32).add(i) };
    let el = |t: &TensorMapSpec, row: usize, col: usize| unsafe {
        if fp8 {
            f8e4m3_to_f32(*(t.addr as *const u8).add(row * t.cols + col))
        } else {
            bf16_to_f32(*(t.addr as *const u16).add(row * t.cols + col))
        }
    };
    // The K blocks summed: all, or those of the device's range (from the one holding its start).
    let blocks = match &k_range {
        Some((ptr, _)) => {
            let (start, end) = (i32_at(*ptr, 0).max(0) as usize, i32_at(*ptr, 1).max(0) as usize);
            start / 128..end.max(start).div_ceil(128).min(k.div_ceil(128))
        }
        None => 0..k.div_ceil(128),
    };
    let dot = |arow: usize, brow: usize| -> f32 {
        let mut acc = 0f32;
        for blk in blocks.clone() {
            let mut part = 0f32;
            for c in blk * 128..((blk + 1) * 128).min(k) {
                let bv = el(b, brow, c);
                part += el(a, arow, c) * bv + a2.map_or(0.0, |a2| el(a2, arow, c) * bv);
            }
            let scale = match (&a_scale, &b_scale) {
                (Some((sa, sas)), Some((sb, sbs))) => {
                    f32_at(*sa, arow * sas[1] + blk) * f32_at(*sb, abi.b_scale_row(brow) * sbs[1] + blk)
                }
                _ => 1.0,
            };
            acc += part * scale;
        }
        acc
    };
    let (optr, n_out) = (out.0, out.1[1]);
    // The output (and the residual, of the output's type): f32, or bf16 rounded to nearest even.
    let bf16_out = abi.output == "bf16";
    let out_at = |ptr: u64, i: usize| unsafe {
        if bf16_out {
            bf16_to_f32(*(ptr as *const u16).add(i))
        } else {
            *(ptr as *const f32).add(i)
        }
    };
    let write = |row: usize, col: usize, value: f32, add: bool| unsafe {
        let i = row * n_out + col;
        let v = if add { out_at(optr, i) + value } else { value };
        if bf16_out {
            *(optr as *mut u16).add(i) = v3c_models::dtype::f32_to_bf16(v);
        } else {
            *(optr as *mut f32).add(i) = v;
        }
    };
    match offsets {
        None => {
            for m in 0..out.1[0] {
                for n in 0..n_out {
                    let r = residual.as_ref().map_or(0.0, |(p, _)| out_at(*p, m * n_out + n));
                    write(m, n, dot(m, n) + r, false);
                }
            }
        }
        Some((offsets, sizes)) => {
            let groups = sizes[0] - 1;
            let n = b.rows / groups;
            for g in 0..groups {
                for p in i32_at(offsets, g) as usize..i32_at(offsets, g + 1) as usize {
                    let token = perm.as_ref().map(|(pp, _)| i32_at(*pp, p) as usize);
                    let arow = if abi.grouping == "gather" { token.unwrap_or(p) } else { p };
                    let w = row_scale.as_ref().map_or(1.0, |(rp, _)| f32_at(*rp, p));
                    for col in 0..n {
                        let value = dot(arow, g * n + col) * w;
                        match (abi.scatter, token) {
                            (true, Some(t)) => write(t, col, value, true),
                            _ => write(p, col, value, false),
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A GPU artifact loaded into host memory, run launch by launch.
pub struct Emulator<'a, 'c> {
    artifact: &'a Artifact,
    expander: Expander<'a>,
    bindings: Bindings,
    input_bytes: HashMap<String, usize>,
    memory: HostMemory,
    context: &'c Context,
    engines: HashMap<String, ExecutionEngine>,
    /// Runs dumped per entry.
    dumped: HashMap<String, usize>,
    /// What the inputs' buffers hold between runs, as a GPU keeps the books.
    held: v3c_runtime::gpu::HeldInputs,
    /// Run every launch's PTX in the simulator ([`Emulator::simulate_ptx`]): the kernels parsed so
    /// far, by name.
    ptx: Option<HashMap<String, v3c_ptxsim::Kernel>>,
    /// How the simulated launches run and are checked.
    checks: v3c_ptxsim::Checks,
    /// What the simulated launches executed, by kernel: launches and their stats.
    simulated: std::collections::BTreeMap<String, (usize, v3c_ptxsim::Stats)>,
    /// The plans of runs that leave launches out.
    run_plans: v3c_runtime::plan::RunPlans,
}

impl<'a, 'c> Emulator<'a, 'c> {
    /// Binds `artifact`'s weights (from `weights`) and regions in host memory.
    pub fn new(context: &'c Context, artifact: &'a Artifact, weights: &Weights) -> Result<Emulator<'a, 'c>, String> {
        let expander = Expander::new(artifact)?;
        // What `v3r` checks before it touches a GPU: every launch against its kernel's PTX.
        expander.check(&[])?;
        let mut memory = HostMemory::default();
        let (bindings, input_bytes) = bind(&expander, weights, &mut memory, &mut |_| {})?;
        Ok(Emulator {
            artifact,
            expander,
            bindings,
            input_bytes,
            memory,
            context,
            engines: HashMap::new(),
            dumped: HashMap::new(),
            held: v3c_runtime::gpu::HeldInputs::default(),
            ptx: None,
            checks: v3c_ptxsim::Checks::default(),
            simulated: Default::default(),
            run_plans: Default::default(),
        })
    }

    /// The simulated launches so far, by kernel: how many and what they executed (instructions,
    /// global sectors and shared wavefronts: [`v3c_ptxsim::Stats`]).
    pub fn simulated(&self) -> &std::collections::BTreeMap<String, (usize, v3c_ptxsim::Stats)> {
        &self.simulated
    }

    /// From now on, runs every launch by simulating the artifact's PTX ([`v3c_ptxsim`]) — the GPU
    /// kernels' own instructions — instead of the row kernels' CPU lowering and the GEMM and
    /// attention kernels' semantics; every global access is checked against the emulated
    /// device's allocations; each launch run and checked as `checks` says (with
    /// [`v3c_ptxsim::Checks::races`], a data race on shared memory, or on global memory between
    /// CTAs, fails it).
    pub fn simulate_ptx(&mut self, checks: v3c_ptxsim::Checks) {
        self.ptx.get_or_insert_with(HashMap::new);
        self.checks = checks;
    }

    /// Runs a launch through the PTX simulator.
    ///
    /// # Safety
    /// The launch's addresses must be this emulator's allocations (each access is checked against
    /// them).
    unsafe fn run_ptx(&mut self, k: &KernelLaunch) -> Result<(), String> {
        let entry = self
            .artifact
            .manifest
            .kernels
            .iter()
            .find(|e| e.name == k.kernel)
            .ok_or_else(|| format!("kernel {} is not in the manifest", k.kernel))?;
        let cache = self.ptx.get_or_insert_with(HashMap::new);
        if !cache.contains_key(&k.kernel) {
            let path = self.artifact.path(&entry.file);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let module = v3c_ptxsim::Module::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let kernel = module
                .kernels
                .into_iter()
                .find(|x| x.name == k.kernel)
                .ok_or_else(|| format!("{}: no entry {}", path.display(), k.kernel))?;
            cache.insert(k.kernel.clone(), kernel);
        }
        let kernel = &cache[&k.kernel];
        let threads = entry.threads.ok_or_else(|| format!("kernel {} has no thread count", k.kernel))?;
        let shared = entry.dynamic_shared_memory.unwrap_or(0);
        // SAFETY: the caller's promise; every access is checked against the regions.
        let stats = unsafe { simulate_launch(kernel, k, threads, shared, Some(&self.memory.regions), self.checks) }?;
        tracing::debug!("{}: {} CTAs, {} instructions simulated", k.kernel, stats.ctas, stats.instructions);
        let e = self.simulated.entry(k.kernel.clone()).or_default();
        e.0 += 1;
        e.1.add(&stats);
        Ok(())
    }

    pub fn bindings(&self) -> &Bindings {
        &self.bindings
    }

    pub fn expander(&self) -> &Expander<'a> {
        &self.expander
    }

    /// Runs a row kernel's launch through its CPU lowering.
    ///
    /// # Safety
    /// The launch's buffers must be live host memory of the sizes its parameters name.
    pub unsafe fn run_row(&mut self, k: &KernelLaunch, ranks: &[usize]) -> Result<(), String> {
        let row = crate::conversion::sm90::rows::RowKernel::from_name(&k.kernel)
            .ok_or_else(|| format!("{}: not a row kernel name", k.kernel))?;
        if !self.engines.contains_key(&k.kernel) {
            let text = row.emit_cpu()?;
            let m = crate::conversion::v3_to_cpu::lower_to_llvm(self.context, &text, "step")?;
            self.engines.insert(k.kernel.clone(), ExecutionEngine::new(&m, 2, &[], false, false));
        }
        let engine = &self.engines[&k.kernel];
        let values: Vec<u64> = k
            .params
            .iter()
            .map(|p| match p {
                Param::Value(v) => Ok(*v),
                Param::TensorMap(_) => Err(format!("{}: a row kernel with a tensor map", k.kernel)),
            })
            .collect::<Result<_, _>>()?;
        let mut at = 0;
        let mut bufs = Vec::new();
        for &r in ranks {
            bufs.push(RawBuffer {
                ptr: values[at + 1] as *mut (),
                shape: values[at + 3..at + 3 + r].iter().map(|&d| d as usize).collect(),
                element: String::new(),
            });
            at += 3 + 2 * r;
        }
        let name = row.kernel_name();
        let mut failed = None;
        // SAFETY: the caller's promise; the buffers are the kernel's arguments in order.
        unsafe {
            call_packed(&bufs, false, 0, 1, |args| {
                failed = engine.invoke_packed(&name, args).err().map(|e| e.to_string());
            })
        };
        failed.map_or(Ok(()), |e| Err(format!("{name}: {e}")))
    }

    /// Runs `entry` on `inputs` and returns the outputs named in `wanted`; with `dump`, writes
    /// every launch's buffers there after it runs (see [`v3c_runtime::gpu::dump_launch`]).
    pub fn run(
        &mut self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        dump: Option<&Path>,
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.run_carrying(entry, inputs, wanted, &[], &[], dump)
    }

    /// As [`Emulator::run`], as a GPU runs it ([`v3c_runtime::cuda::GpuArtifact::run_carrying`]):
    /// the inputs named in `resident` not written (their buffers hold what earlier runs and moves
    /// left, checked as the GPU checks it), then the outputs named in `carry` copied into the
    /// inputs of their names.
    pub fn run_carrying(
        &mut self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        carry: &[&str],
        dump: Option<&Path>,
    ) -> Result<HashMap<String, HostBuffer>, String> {
        let mut held = std::mem::take(&mut self.held);
        let outs = self.run_holding(&mut held, entry, inputs, wanted, resident, carry, dump)?;
        self.held = held;
        Ok(outs)
    }

    /// Copies rows of input `name`'s buffer as [`v3c_runtime::cuda::GpuArtifact::move_rows`] does.
    pub fn move_rows(&mut self, name: &str, from: usize, to: usize, n: usize) -> Result<(), String> {
        let room = self.input_bytes.get(name).copied().unwrap_or(0);
        let row = self.held.moved(name, from, to, n, room)?;
        let base = self.bindings.inputs[name] as usize;
        // SAFETY: both ranges lie in the input's allocation (checked by `moved`) and do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping((base + from * row) as *const u8, (base + to * row) as *mut u8, n * row)
        };
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_holding(
        &mut self,
        held: &mut v3c_runtime::gpu::HeldInputs,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        carry: &[&str],
        dump: Option<&Path>,
    ) -> Result<HashMap<String, HostBuffer>, String> {
        let full = self.expander.entry(entry)?;
        let pruned = self.run_plans.get(full, wanted, carry);
        let plan = pruned.as_deref().unwrap_or(full);
        held.check_resident(entry, plan, inputs, resident)?;
        let shapes = inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect();
        let sizes = plan.bind(&shapes)?;
        let (_, need) = self.expander.expand(plan, sizes, &self.bindings, 132)?;
        self.bindings.workspace = self.memory.alloc(need.workspace_bytes, "workspace")?;
        self.bindings.counters = self.memory.alloc(need.counters * 4, "counters")?;
        let (actions, _) = self.expander.expand(plan, sizes, &self.bindings, 132)?;
        for (name, b) in inputs {
            let Some(planned) = plan.input(name) else { continue };
            if resident.contains(&name.as_str()) {
                continue;
            }
            let bytes = plan_bytes(b, &planned.dtype)?;
            if bytes.len() > self.input_bytes[name] {
                return Err(format!("input {name}: larger than planned"));
            }
            // SAFETY: within the input's allocation (checked).
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.bindings.inputs[name] as *mut u8, bytes.len())
            };
        }
        let label = dump.map(|_| {
            let n = self.dumped.entry(entry.to_string()).or_insert(0);
            *n += 1;
            v3c_runtime::gpu::dump_label(entry, *n - 1)
        });
        let abis: HashMap<&str, &KernelAbi> =
            self.artifact.manifest.kernels.iter().filter_map(|k| Some((k.name.as_str(), k.abi.as_ref()?))).collect();
        for (seq, a) in actions.iter().enumerate() {
            match a {
                Action::Kernel(k) => {
                    match abis.get(k.kernel.as_str()) {
                        // SAFETY: the expansion's addresses are this emulator's host allocations.
                        Some(_) if self.ptx.is_some() => unsafe { self.run_ptx(k)? },
                        // SAFETY: the expansion's addresses are this emulator's host allocations.
                        Some(KernelAbi::Gemm(g)) => unsafe { emulate_gemm(g, k)? },
                        Some(KernelAbi::Memrefs { ranks }) => unsafe { self.run_row(k, ranks)? },
                        // SAFETY: as above.
                        Some(KernelAbi::MlaPrefill(a)) => unsafe { emulate_prefill(k, a.kind)? },
                        // SAFETY: as above.
                        Some(KernelAbi::MlaDecode(_)) => unsafe { emulate_decode(k)? },
                        None => return Err(format!("kernel {} has no abi", k.kernel)),
                    }
                    if let Some(dir) = dump {
                        let bindings = &self.bindings;
                        // SAFETY: as above.
                        let read = |b: &v3c_runtime::abi::Buf| -> Result<Vec<u8>, String> {
                            let n = b.elements() * element_bytes(&b.element).unwrap_or(4) as usize;
                            Ok(unsafe { std::slice::from_raw_parts(b.addr as *const u8, n) }.to_vec())
                        };
                        v3c_runtime::gpu::dump_launch(dir, label.as_deref().unwrap_or(entry), seq, k, bindings, &read)?;
                    }
                }
                Action::Copy2D { src, src_pitch, dst, dst_pitch, width, rows } => {
                    for r in 0..*rows {
                        // SAFETY: rows inside the buffers the expansion named.
                        unsafe {
                            std::ptr::copy(
                                (*src as usize + r * src_pitch) as *const u8,
                                (*dst as usize + r * dst_pitch) as *mut u8,
                                *width,
                            )
                        };
                    }
                }
            }
        }
        held.ran(plan, inputs);
        for name in carry {
            let room = self.input_bytes.get(*name).copied().unwrap_or(0);
            let (offset, bytes) = held.carry(entry, plan, sizes, name, room)?;
            let (to, from) = (self.bindings.inputs[*name] as usize, (self.bindings.arena + offset) as usize);
            // SAFETY: the arena's output and the input's allocation (`carry` checked its room).
            unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, bytes) };
        }
        let mut outs = HashMap::new();
        for (name, id) in &plan.outputs {
            let b = &plan.buffers[*id];
            let shape = shape_at(&b.dims, sizes);
            let Some((key, shape, bytes)) = v3c_runtime::plan::wanted_bytes(wanted, name, shape, &b.dtype) else {
                continue;
            };
            let addr = self.bindings.address(&b.kind)? as usize + bytes.start;
            // SAFETY: the rows lie in the output, in memory the plan sized.
            let host = unsafe { std::slice::from_raw_parts(addr as *const u8, bytes.len()) };
            outs.insert(key, host_buffer(host, shape, &b.dtype)?);
        }
        Ok(outs)
    }
}

/// The emulation as a session's [`v3c_runtime::session::Program`]: generation, batches over the
/// decode pool of pages, all run on the host through the GPU executor's launches — caches crossing
/// as f32 each run, as sessions keep them, or ([`EmulatedProgram::on_device`]) kept in the
/// emulated device's buffers between runs as a GPU keeps them: decode steps in place, prefills
/// carried over, rows moved.
pub struct EmulatedProgram<'a, 'c> {
    artifact: &'a Artifact,
    emulator: std::cell::RefCell<Emulator<'a, 'c>>,
    keeps: bool,
}

impl<'a, 'c> EmulatedProgram<'a, 'c> {
    pub fn new(emulator: Emulator<'a, 'c>) -> EmulatedProgram<'a, 'c> {
        EmulatedProgram { artifact: emulator.artifact, emulator: std::cell::RefCell::new(emulator), keeps: false }
    }

    /// As [`EmulatedProgram::new`], keeping inputs and carrying outputs as a GPU does.
    pub fn on_device(emulator: Emulator<'a, 'c>) -> EmulatedProgram<'a, 'c> {
        EmulatedProgram { keeps: true, ..EmulatedProgram::new(emulator) }
    }
}

impl v3c_runtime::session::Program for EmulatedProgram<'_, '_> {
    fn entry_plan(&self, entry: &str) -> Result<&v3c_runtime::plan::EntryPlan, String> {
        self.artifact.plan.entries.iter().find(|e| e.name == entry).ok_or_else(|| format!("no entry '{entry}'"))
    }

    fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.emulator.borrow_mut().run(entry, inputs, wanted, None).map(v3c_runtime::session::f32_caches)
    }

    fn cache_rows_multiple(&self) -> usize {
        self.artifact.lowering.as_ref().and_then(|l| l.cache_rows_multiple).unwrap_or(1)
    }

    fn keeps_inputs(&self) -> bool {
        self.keeps
    }

    fn carries_outputs(&self) -> bool {
        self.keeps
    }

    fn run_keeping(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        self.run_carrying(entry, inputs, wanted, resident, &[])
    }

    fn run_carrying(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        carry: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        if !self.keeps && (!resident.is_empty() || !carry.is_empty()) {
            return Err("this emulation keeps nothing between runs".into());
        }
        let mut emulator = self.emulator.borrow_mut();
        emulator.run_carrying(entry, inputs, wanted, resident, carry, None).map(v3c_runtime::session::f32_caches)
    }

    fn move_rows(&self, name: &str, from: usize, to: usize, n: usize) -> Result<(), String> {
        match self.keeps {
            true => self.emulator.borrow_mut().move_rows(name, from, to, n),
            false => Err(format!("this emulation keeps no {name} between runs")),
        }
    }

    fn reclaim_rows(&self, name: &str, rows: usize) -> Result<(), String> {
        match self.keeps {
            true => self.emulator.borrow_mut().held.reclaim(name, rows),
            false => Err(format!("this emulation keeps no {name} between runs")),
        }
    }
}

/// Host memory as the device of the optimizer's launches (row kernels, through their CPU lowering).
impl v3c_runtime::optimizer::Device for Emulator<'_, '_> {
    fn alloc_zeroed(&mut self, bytes: usize, what: &str) -> Result<u64, String> {
        self.memory.alloc(bytes, what)
    }

    fn write(&mut self, addr: u64, bytes: &[u8], _: &str) -> Result<(), String> {
        // SAFETY: the caller's region of this emulator's memory, at least `bytes.len()` long.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    fn read(&mut self, addr: u64, bytes: usize, _: &str) -> Result<Vec<u8>, String> {
        // SAFETY: as above.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, bytes) }.to_vec())
    }

    fn launch(&mut self, launches: &[KernelLaunch]) -> Result<(), String> {
        for k in launches {
            let Some(KernelAbi::Memrefs { ranks }) =
                self.artifact.manifest.kernels.iter().find(|m| m.name == k.kernel).and_then(|m| m.abi.clone())
            else {
                return Err(format!("{}: not a row kernel of the artifact", k.kernel));
            };
            // SAFETY: the launches' buffers are this emulator's allocations of their sizes.
            unsafe { self.run_row(k, &ranks)? };
        }
        Ok(())
    }

    fn bindings(&self) -> &Bindings {
        &self.bindings
    }
}

impl v3c_runtime::training::EntryRunner for Emulator<'_, '_> {
    fn dir(&self) -> String {
        format!("{} (emulated)", self.artifact.dir.display())
    }

    fn artifact(&self) -> Option<&Artifact> {
        Some(self.artifact)
    }

    fn device(&mut self) -> Option<&mut dyn v3c_runtime::optimizer::Device> {
        Some(self)
    }

    fn entry_plan(&self, entry: &str) -> Result<&v3c_runtime::plan::EntryPlan, String> {
        self.expander.entry(entry)
    }

    fn weight_names(&self) -> Vec<String> {
        v3c_runtime::gpu::rebindable_weights(&self.bindings)
    }

    fn set_weight(&mut self, name: &str, weight: HostBuffer) -> Result<(), String> {
        let (addr, bytes) = v3c_runtime::gpu::rebind(&self.bindings, self.artifact, name, &weight)?;
        // SAFETY: the weight's own host allocation, sized by the plan for these bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    fn run(
        &mut self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        Emulator::run(self, entry, inputs, wanted, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v3c_runtime::abi::{Buf, MlaDecodeAbi};
    use v3c_runtime::plan::Fp8LatentRow;

    /// The emulated device's memory is zeroed and aligned; an allocation past any machine's (a
    /// lowering's temporaries sized for 2^32 columns, say) is an error naming it, not an abort.
    #[test]
    fn host_memory_refuses_what_it_cannot_allocate() {
        use v3c_runtime::gpu::Memory;
        let mut memory = HostMemory::default();
        let addr = memory.alloc(1000, "a buffer").unwrap();
        assert_eq!(addr % 256, 0);
        // SAFETY: 1000 bytes past `addr` were just allocated.
        assert!(unsafe { std::slice::from_raw_parts(addr as *const u8, 1000) }.iter().all(|&b| b == 0));
        assert_eq!(memory.regions(), &[(addr, 1000)]);
        for bytes in [1usize << 62, usize::MAX] {
            let err = memory.alloc(bytes, "the temporaries").unwrap_err();
            assert_eq!(
                err,
                format!("cannot allocate {bytes} bytes of host memory for the temporaries (the emulated device)")
            );
        }
        assert_eq!(memory.regions().len(), 1);
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// A decode launch as the runtime makes it over a pool of `kv + rope`-wide rows (bf16, or
    /// `fp8_cache`: packed fp8 rows seen through the latent's and the rope key's tensor maps and the
    /// scales' strided memref) — pages out of order, a sequence of one key, one of three whole pages
    /// (the kernel's unmasked pages end where its earliest token's keys do, or one key before with
    /// two tokens), one past five (its splits hold three pages each: more than a ring of two
    /// buffers, which refills and turns its barriers' phase) —, `tokens` new tokens a sequence (causal among themselves:
    /// token t of T sees the keys before `len - T + t + 1`; the shortest sequence has T keys), run
    /// by `run`: the relative (Frobenius) error of its splits merged against float64 attention over
    /// the rows' values, and the log-sum-exps.
    fn decode_case(
        kv: usize,
        rope: usize,
        heads: usize,
        tokens: usize,
        fp8_cache: bool,
        run: impl FnOnce(&KernelLaunch),
    ) -> (f64, Vec<f32>) {
        let (pages, splits) = (6, 2);
        let (b, width, scale) = (3, kv + rope, 0.07f32);
        let rows = b * pages * 64;
        // Magnitudes that differ by row and 128-column group (powers of two 1/4 to 4), so the fp8
        // cache's scales do too: a unit converted with another row's or group's scale is wrong.
        let mut rows32 = values(rows * width, 3, 6.0);
        for (r, row) in rows32.chunks_exact_mut(width).enumerate() {
            for (c, x) in row[..kv].iter_mut().enumerate() {
                *x *= (2f32).powi(((r * 3 + c / 128) % 5) as i32 - 2);
            }
        }
        let (cache, decoded, element, cols) = if fp8_cache {
            let row = Fp8LatentRow::of(width).unwrap();
            let mut packed = vec![0u8; rows * row.bytes()];
            let mut decoded = vec![0f32; rows * width];
            for ((r32, r8), d) in rows32
                .chunks_exact(width)
                .zip(packed.chunks_exact_mut(row.bytes()))
                .zip(decoded.chunks_exact_mut(width))
            {
                row.pack(r32, r8);
                row.unpack(r8, d);
            }
            (packed, decoded, "i8", row.bytes())
        } else {
            let bits: Vec<u16> = rows32.iter().map(|&x| v3c_models::dtype::f32_to_bf16(x)).collect();
            let decoded = bits.iter().map(|&x| v3c_models::dtype::bf16_to_f32(x)).collect();
            (bits.iter().flat_map(|x| x.to_le_bytes()).collect(), decoded, "bf16", width)
        };
        // Query rows a sequence: its tokens' heads, token by token.
        let per = tokens * heads;
        let q: Vec<u16> = values(b * per * width, 4, 2.0).iter().map(|&x| v3c_models::dtype::f32_to_bf16(x)).collect();
        // The pool's pages, out of order (7 is prime to the pool's 18).
        let table: Vec<i32> = (0..b * pages).map(|i| ((i * 7 + 5) % (b * pages)) as i32).collect();
        let lens: Vec<i32> = vec![tokens as i32, 3 * 64, 5 * 64 + 1];
        let mut o_part = vec![f32::NAN; splits * b * per * kv];
        let mut lse = vec![f32::NAN; splits * b * per];
        let buf = |addr: *const u8, shape: &[usize], element: &'static str| Buf {
            addr: addr as u64,
            shape: shape.to_vec(),
            element,
        };
        let ops = [
            buf(q.as_ptr() as *const u8, &[b * per, width], "bf16"),
            buf(cache.as_ptr(), &[rows, cols], element),
            buf(table.as_ptr() as *const u8, &[b, pages], "i32"),
            buf(lens.as_ptr() as *const u8, &[b], "i32"),
            buf(o_part.as_mut_ptr() as *const u8, &[splits, b * per, kv], "f32"),
            buf(lse.as_mut_ptr() as *const u8, &[splits, b * per], "f32"),
        ];
        let abi = MlaDecodeAbi { kv, rope, fp8_cache, selected: false, bf16_rows: false };
        let launch = abi.launch("mla_decode", [&ops[0], &ops[1], &ops[2], &ops[3], &ops[4], &ops[5]], heads, scale);
        run(&launch.unwrap());
        let (mut err2, mut norm2) = (0f64, 0f64);
        let splits_of = Splits { o_part: &o_part, lse: &lse, all: b * per, kv };
        for seq in 0..b {
            let keys: Vec<usize> =
                (0..lens[seq] as usize).map(|j| table[seq * pages + j / 64] as usize * 64 + j % 64).collect();
            for row in 0..per {
                let r = seq * per + row;
                let keys = &keys[..keys.len() + row / heads + 1 - tokens];
                let qv = |c: usize| v3c_models::dtype::bf16_to_f32(q[r * width + c]) as f64;
                let (e, n) = splits_of.error(r, width, scale, qv, keys, |k, c| decoded[k * width + c] as f64);
                (err2, norm2) = (err2 + e, norm2 + n);
            }
        }
        ((err2 / norm2).sqrt(), lse)
    }

    /// The splits' outputs `o_part [Z, all, kv]` and log-sum-exps `lse [Z, all]` of a split-K
    /// attention launch.
    struct Splits<'a> {
        o_part: &'a [f32],
        lse: &'a [f32],
        all: usize,
        kv: usize,
    }

    impl Splits<'_> {
        /// Row `r`'s splits merged by their log-sum-exps against float64 attention of its query
        /// (`query(c)`, `width` columns) over the rows `keys` (`key(k, c)`; the values their first
        /// `kv` columns): the squared error and the squared norm of the wanted output.
        fn error(
            &self,
            r: usize,
            width: usize,
            scale: f32,
            query: impl Fn(usize) -> f64,
            keys: &[usize],
            key: impl Fn(usize, usize) -> f64,
        ) -> (f64, f64) {
            let splits = self.lse.len() / self.all;
            let s: Vec<f64> =
                keys.iter().map(|&k| (0..width).map(|c| query(c) * key(k, c)).sum::<f64>() * scale as f64).collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
            let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let lz: Vec<f64> = (0..splits).map(|z| self.lse[z * self.all + r] as f64).collect();
            let top = lz.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
            let wz: Vec<f64> = lz.iter().map(|&x| if x.is_finite() { (x - top).exp() } else { 0.0 }).collect();
            let (mut err2, mut norm2) = (0f64, 0f64);
            for c in 0..self.kv {
                let want: f64 = keys.iter().zip(&s).map(|(&k, &sk)| (sk - m).exp() * key(k, c)).sum::<f64>() / l;
                let got =
                    (0..splits).map(|z| wz[z] * self.o_part[(z * self.all + r) * self.kv + c] as f64).sum::<f64>()
                        / wz.iter().sum::<f64>();
                err2 += (got - want).powi(2);
                norm2 += want.powi(2);
            }
            (err2, norm2)
        }
    }

    /// `kernel`'s launch `l` (`module`: its PTX, parsed) in the simulator, run and checked as
    /// `checks` says (no memory regions: the tests' vectors are the launch's own).
    ///
    /// # Safety
    /// As [`simulate_launch`]'s.
    unsafe fn simulate(
        kernel: &crate::conversion::sm90::GpuKernel,
        module: &v3c_ptxsim::Module,
        l: &KernelLaunch,
        checks: Checks,
    ) -> Result<v3c_ptxsim::Stats, String> {
        simulate_launch(&module.kernels[0], l, kernel.threads, kernel.shared_memory_bytes, None, checks)
    }

    /// [`simulate`] that must pass, its figures printed.
    ///
    /// # Safety
    /// As [`simulate_launch`]'s.
    unsafe fn simulated(
        kernel: &crate::conversion::sm90::GpuKernel,
        module: &v3c_ptxsim::Module,
        l: &KernelLaunch,
        checks: Checks,
    ) {
        let stats = simulate(kernel, module, l, checks).unwrap();
        eprintln!("{}: {} CTAs, {} instructions simulated", kernel.name, stats.ctas, stats.instructions);
    }

    /// DeepSeek-V3.2's attention over each query's selected rows, launched as the runtime makes it:
    /// f32 key rows of 704 columns (NaN past the 576 the attention reads, and in row 0, which no
    /// query selects: a row gathered past a selection reads row 0 and must be zeroed) — 300 rows
    /// every query selects from (prefill), or each query's own 300 (`decode`: its sequence's
    /// cache) —, 4 queries of `heads` heads selecting 200 (three pages and 8 keys), 1, 64 and no
    /// rows (ascending, -1 padded, out of key order with one another), 2 splits; run by `run`: the
    /// relative (Frobenius) error of the merged splits against float64 attention over the selected
    /// rows rounded to bf16, and the log-sum-exps. `rows16`: the same rows in bf16, launched for
    /// `_sel16`.
    fn selected_case(heads: usize, decode: bool, rows16: bool, run: impl FnOnce(&KernelLaunch)) -> (f64, Vec<f32>) {
        let (kv, rope, cols, keys_n, k_width, splits) = (512, 64, 704, 300, 200, 2);
        let (width, scale, t_count) = (kv + rope, 0.07f32, 4);
        let sets = if decode { t_count } else { 1 };
        let mut keys = values(sets * keys_n * cols, 5, 6.0);
        for (r, row) in keys.chunks_exact_mut(cols).enumerate() {
            row[width..].fill(f32::NAN);
            if r % keys_n == 0 {
                row.fill(f32::NAN);
            }
        }
        let key_shape = if decode { vec![t_count, keys_n, cols] } else { vec![keys_n, cols] };
        let counts = [200usize, 1, 64, 0];
        let mut selected = vec![-1i32; t_count * k_width];
        for (t, &n) in counts.iter().enumerate() {
            // Distinct rows 1..300 (7 is prime to 299), ascending.
            let mut rows: Vec<i32> = (0..n).map(|i| 1 + ((i * 7 + t * 31) % (keys_n - 1)) as i32).collect();
            rows.sort_unstable();
            selected[t * k_width..][..n].copy_from_slice(&rows);
        }
        let q: Vec<u16> =
            values(t_count * heads * width, 6, 2.0).iter().map(|&x| v3c_models::dtype::f32_to_bf16(x)).collect();
        let all = t_count * heads;
        let mut o_part = vec![f32::NAN; splits * all * kv];
        let mut lse = vec![f32::NAN; splits * all];
        let buf = |addr: *const u8, shape: &[usize], element: &'static str| Buf {
            addr: addr as u64,
            shape: shape.to_vec(),
            element,
        };
        let keys16: Vec<u16> = keys.iter().map(|&x| v3c_models::dtype::f32_to_bf16(x)).collect();
        let ops = [
            buf(q.as_ptr() as *const u8, &[all, width], "bf16"),
            match rows16 {
                true => buf(keys16.as_ptr() as *const u8, &key_shape, "bf16"),
                false => buf(keys.as_ptr() as *const u8, &key_shape, "f32"),
            },
            buf(selected.as_ptr() as *const u8, &[t_count, k_width], "i32"),
            buf(o_part.as_mut_ptr() as *const u8, &[splits, all, kv], "f32"),
            buf(lse.as_mut_ptr() as *const u8, &[splits, all], "f32"),
        ];
        let abi = MlaDecodeAbi { kv, rope, fp8_cache: false, selected: true, bf16_rows: rows16 };
        let config = crate::conversion::sm90::mla::MlaDecodeConfig {
            bf16_rows: rows16,
            ..crate::conversion::sm90::mla::MlaDecodeConfig::DEEPSEEK_V32_SELECTED
        };
        let name = config.kernel_name();
        run(&abi.launch_selected(&name, [&ops[0], &ops[1], &ops[2], &ops[3], &ops[4]], heads, scale).unwrap());
        let bf = |x: f32| v3c_models::dtype::bf16_to_f32(v3c_models::dtype::f32_to_bf16(x)) as f64;
        let (mut err2, mut norm2) = (0f64, 0f64);
        let splits_of = Splits { o_part: &o_part, lse: &lse, all, kv };
        // A query without rows has no attention to compare (the callers check its lse).
        for (t, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0) {
            let first = if decode { t * keys_n } else { 0 };
            let rows: Vec<usize> = selected[t * k_width..][..n].iter().map(|&r| first + r as usize).collect();
            for h in 0..heads {
                let r = t * heads + h;
                let qv = |c: usize| v3c_models::dtype::bf16_to_f32(q[r * width + c]) as f64;
                let (e, n) = splits_of.error(r, width, scale, qv, &rows, |k, c| bf(keys[k * cols + c]));
                (err2, norm2) = (err2 + e, norm2 + n);
            }
        }
        ((err2 / norm2).sqrt(), lse)
    }

    /// The selected rows' launch emulated from its parameters (the host's attention over them) and
    /// DeepSeek-V3.2's kernels (`_sel`, 128 heads: two blocks a query; and 64 heads; `_sel16`, of
    /// bf16 rows) simulated from their PTX, the threads run both ways (races checked), prefill's
    /// rows and decode's: float64 attention over the selected rows within bf16's rounding of q and
    /// P; a query selecting one row leaves its second split empty.
    #[test]
    fn selected_rows_attention_simulated_from_its_ptx_computes_attention() {
        use crate::conversion::sm90::mla::MlaDecodeConfig;
        // SAFETY: every address is one of the case's vectors, of the launch's shapes.
        for (decode, rows16) in [(false, false), (true, false), (false, true), (true, true)] {
            let (rel, lse) = selected_case(128, decode, rows16, |l| unsafe { emulate_decode(l).unwrap() });
            eprintln!(
                "selected rows' attention (host, decode {decode}, bf16 rows {rows16}) vs float64: relative error {rel:.2e}"
            );
            assert!(rel <= 1e-3, "relative error {rel:.2e}");
            // Query 1's one row: its second split is empty; query 3 selects nothing: neither has keys.
            let no_keys = |i: usize| lse[i].is_infinite() && lse[i] < 0.0;
            assert!(no_keys(4 * 128 + 128), "one row: its second split is empty");
            assert!((0..2).all(|z| no_keys(z * 4 * 128 + 3 * 128)), "no rows: no split has keys");
        }
        let context = crate::mlir::new_context();
        let config = MlaDecodeConfig::DEEPSEEK_V32_SELECTED;
        let kernel = crate::conversion::sm90::compile_mla(&context, &config, &crate::target::SM90A).unwrap();
        let module = v3c_ptxsim::Module::parse(&kernel.ptx).unwrap();
        let config16 = MlaDecodeConfig { bf16_rows: true, ..config };
        let kernel16 = crate::conversion::sm90::compile_mla(&context, &config16, &crate::target::SM90A).unwrap();
        let module16 = v3c_ptxsim::Module::parse(&kernel16.ptx).unwrap();
        let runs = [(128, false, false, false), (128, true, false, false), (64, false, true, false)];
        let runs16 = [(128, false, false, true), (128, true, false, true)];
        for (heads, reversed, decode, rows16) in runs.into_iter().chain(runs16) {
            let (kernel, module) = if rows16 { (&kernel16, &module16) } else { (&kernel, &module) };
            let (rel, lse) = selected_case(heads, decode, rows16, |l| {
                // SAFETY: the case's vectors, of the launch's shapes.
                unsafe { simulated(kernel, module, l, Checks { reversed, races: !reversed }) }
            });
            eprintln!(
                "{} ({heads} heads, reversed {reversed}, decode {decode}): relative error {rel:.2e}",
                kernel.name
            );
            assert!(rel <= 1e-3, "{}: relative error {rel:.2e}", kernel.name);
            let no_keys = |i: usize| lse[i].is_infinite() && lse[i] < 0.0;
            assert!(no_keys(4 * heads + heads) && (0..2).all(|z| no_keys(z * 4 * heads + 3 * heads)));
        }
        // Its synchronization is what the race check asks for: without the proxy fences the
        // tensor cores read the gathered rows (and P) unfenced; without the block barriers
        // warpgroup 1 gathers into a buffer the tensor cores still read.
        let race = |ptx: &str| -> String {
            let module = v3c_ptxsim::Module::parse(ptx).unwrap();
            let mut err = String::new();
            selected_case(64, false, false, |l| {
                // SAFETY: the case's vectors, of the launch's shapes.
                let r = unsafe { simulate(&kernel, &module, l, Checks { reversed: false, races: true }) };
                err = r.err().unwrap_or_default();
            });
            err
        };
        let unfenced = race(&kernel.ptx.replace("fence.proxy.async.shared::cta;", ""));
        assert!(unfenced.contains("without a fence.proxy.async"), "{unfenced}");
        let unordered = race(&kernel.ptx.replace("bar.sync", "membar.cta;//"));
        assert!(unordered.contains("data race on shared byte"), "{unordered}");
    }

    /// The fp8-cache decode launch emulated from its parameters: its splits merged equal float64
    /// attention over the rows' values, within bf16's rounding of q and P.
    #[test]
    fn fp8_cache_decode_launch_computes_attention_over_the_rows_values() {
        let (heads, b) = (3, 3);
        // SAFETY: every address is one of the case's vectors, of the launch's shapes.
        let (rel, lse) = decode_case(128, 64, heads, 1, true, |l| unsafe { emulate_decode(l).unwrap() });
        eprintln!("fp8-cache decode attention (host) vs float64: relative error {rel:.2e} (Frobenius)");
        assert!(rel <= 1e-3, "relative error {rel:.2e}");
        // The sequence of one key: its second split saw none.
        assert!(lse[b * heads].is_infinite() && lse[b * heads] < 0.0);
    }

    /// DeepSeek-V3's decode attention kernel (512 + 64 columns, 128 heads: two CTAs of 64 query
    /// rows a sequence and split, in clusters sharing the pages or not), bf16 and fp8 caches, its
    /// PTX simulated with the threads run first to last and last to first (and MTP's two tokens a
    /// sequence in clusters; and the bf16 cache's page loop a page ahead, not serial, both ways):
    /// float64 attention over the rows within bf16's rounding of q and P.
    #[test]
    fn deepseek_v3_decode_attention_simulated_from_its_ptx_computes_attention() {
        use crate::conversion::sm90::mla::MlaDecodeConfig;
        let context = crate::mlir::new_context();
        let runs = [(false, false), (true, false), (false, true), (true, true)];
        let mut runs: Vec<(usize, bool, bool, usize, bool)> =
            [2, 1].into_iter().flat_map(|c| runs.map(|(f, r)| (c, f, r, 1, !f))).collect();
        // MTP's two tokens a sequence: four 64-row blocks, two clusters, reading the same pages.
        runs.push((2, false, false, 2, true));
        runs.extend([(2, false, false, 1, false), (2, false, true, 2, false)]);
        for (cluster, fp8_cache, reversed, tokens, serial) in runs {
            let config = MlaDecodeConfig { fp8_cache, cluster, serial, ..MlaDecodeConfig::DEEPSEEK_V3 };
            let kernel = crate::conversion::sm90::compile_mla(&context, &config, &crate::target::SM90A).unwrap();
            let module = v3c_ptxsim::Module::parse(&kernel.ptx).unwrap();
            let (rel, _) = decode_case(config.kv, config.rope, 128, tokens, fp8_cache, |l| {
                // SAFETY: the case's vectors, of the launch's shapes.
                unsafe { simulated(&kernel, &module, l, Checks { reversed, races: !reversed }) }
            });
            eprintln!(
                "{} ({tokens} tokens, threads reversed: {reversed}): relative error {rel:.2e} (Frobenius) vs float64",
                kernel.name
            );
            assert!(rel <= 1e-3, "{}: relative error {rel:.2e}", kernel.name);
        }
    }

    /// The race check sees what the decode kernel's synchronization is for: without its proxy
    /// fences the tensor cores read P unfenced, and without its block barriers threads read shared
    /// memory the others write unordered; in a cluster, a block that refills a buffer without
    /// waiting for its peer's release multicasts into a page the peer still reads (each found,
    /// naming the lines, on the first launch).
    #[test]
    fn the_decode_attention_kernel_without_its_fences_or_barriers_is_caught_racing() {
        use crate::conversion::sm90::mla::MlaDecodeConfig;
        let context = crate::mlir::new_context();
        let config = MlaDecodeConfig { cluster: 1, ..MlaDecodeConfig::DEEPSEEK_V3 };
        let kernel = crate::conversion::sm90::compile_mla(&context, &config, &crate::target::SM90A).unwrap();
        let race_at = |ptx: &str, heads: usize| -> String {
            let module = v3c_ptxsim::Module::parse(ptx).unwrap();
            let mut err = String::new();
            decode_case(config.kv, config.rope, heads, 1, false, |l| {
                if err.is_empty() {
                    // SAFETY: the case's vectors, of the launch's shapes.
                    let r = unsafe { simulate(&kernel, &module, l, Checks { reversed: false, races: true }) };
                    err = r.err().unwrap_or_default();
                }
            });
            err
        };
        let race = |ptx: &str| race_at(ptx, 64);
        assert_eq!(race(&kernel.ptx), "");
        let fences = kernel.ptx.matches("fence.proxy.async").count();
        assert!(fences > 0);
        let unfenced = race(&kernel.ptx.replace("fence.proxy.async.shared::cta;", ""));
        eprintln!("without its {fences} proxy fences: {unfenced}");
        assert!(unfenced.contains("wgmma") && unfenced.contains("without a fence.proxy.async"), "{unfenced}");
        let unordered = race(&kernel.ptx.replace("bar.sync", "membar.cta;//"));
        eprintln!("without its barriers: {unordered}");
        assert!(unordered.contains("data race on shared byte"), "{unordered}");
        // The cluster's kernel (128 heads: two blocks a sequence), its refill's wait on the empty
        // barrier (the wait after the arrival on the peer's) made to pass at once: parity 1 is the
        // phase before the first.
        let clustered = MlaDecodeConfig::DEEPSEEK_V3;
        let kernel = crate::conversion::sm90::compile_mla(&context, &clustered, &crate::target::SM90A).unwrap();
        assert_eq!(race_at(&kernel.ptx, 128), "");
        let (before, after) = kernel.ptx.split_once("mbarrier.arrive.shared::cluster").unwrap();
        let (wait, rest) = after.split_once("mbarrier.try_wait.parity.shared.b64 P1, ").unwrap();
        let (address, rest) = rest.split_once(", ").unwrap();
        let (_parity, rest) = rest.split_once(", ").unwrap();
        let unreleased = format!(
            "{before}mbarrier.arrive.shared::cluster{wait}mbarrier.try_wait.parity.shared.b64 P1, {address}, 1, {rest}"
        );
        let early = race_at(&unreleased, 128);
        eprintln!("refilling without the peer's release: {early}");
        assert!(early.contains("data race on shared byte"), "{early}");
    }

    /// DeepSeek-V3's flash attention kernels (q and k heads of 192, v of 128; causal; 70 queries
    /// after 150 keys' start, and 191 after 253, two heads): inference's forward, training's forward with its
    /// log-sum-exps and the dQ, dK and dV kernels, their PTX simulated with the threads run both
    /// ways, give what their launches' semantics give (the gradients from the forward's
    /// statistics, D = rowsum(dout out)).
    #[test]
    fn deepseek_v3_flash_attention_kernels_simulated_from_their_ptx_compute_their_semantics() {
        use crate::conversion::sm90::mla::{FlashMode, GradOf, MlaPrefillConfig};
        use v3c_runtime::abi::MlaPrefillAbi;
        let context = crate::mlir::new_context();
        // A second shape whose streamed tiles include interior ones after the first (dV a tile
        // ahead takes its unmasked branch only for the next tile), and whose limits fall a key
        // short of a tile's end (a past of 62, T of 64 x 3 - 1): interior tiles decided a key
        // too generously are caught.
        for (t, s) in [(70usize, 150usize), (191, 253)] {
            let (heads, scale) = (2usize, 0.07f32);
            let (qk, v) = (MlaPrefillConfig::DEEPSEEK_V3.qk, MlaPrefillConfig::DEEPSEEK_V3.v);
            let bf16 = |n: usize, seed: u64, sc: f32| -> Vec<u16> {
                values(n, seed, sc).iter().map(|&x| v3c_models::dtype::f32_to_bf16(x)).collect()
            };
            let (q, k, vv, dout) = (
                bf16(heads * t * qk, 1, 2.0),
                bf16(heads * s * qk, 2, 2.0),
                bf16(heads * s * v, 3, 2.0),
                bf16(heads * t * v, 4, 1.0),
            );
            let buf = |addr: *const u8, shape: &[usize], element: &'static str| Buf {
                addr: addr as u64,
                shape: shape.to_vec(),
                element,
            };
            let (bq, bk, bv, bd) = (
                buf(q.as_ptr() as *const u8, &[heads * t, qk], "bf16"),
                buf(k.as_ptr() as *const u8, &[heads * s, qk], "bf16"),
                buf(vv.as_ptr() as *const u8, &[heads * s, v], "bf16"),
                buf(dout.as_ptr() as *const u8, &[heads * t, v], "bf16"),
            );
            // The forward's output and statistics, by the semantics.
            let (mut out, mut lse) = (vec![0f32; heads * t * v], vec![0f32; heads * t]);
            let (bo, bl) = (
                buf(out.as_mut_ptr() as *const u8, &[heads * t, v], "f32"),
                buf(lse.as_mut_ptr() as *const u8, &[heads * t], "f32"),
            );
            let abi = MlaPrefillAbi { qk, v, kind: v3c_runtime::abi::FlashKind::Lse };
            let launch = abi.launch("forward", &[&bq, &bk, &bv, &bo, &bl], heads, scale).unwrap();
            // SAFETY: the vectors above, of the launch's shapes.
            unsafe { emulate_prefill(&launch, abi.kind).unwrap() };
            let d: Vec<f32> = (0..heads * t)
                .map(|r| (0..v).map(|c| v3c_models::dtype::bf16_to_f32(dout[r * v + c]) * out[r * v + c]).sum())
                .collect();
            let bdd = buf(d.as_ptr() as *const u8, &[heads * t], "f32");
            // The forward's log-sum-exps as the gradients' operand.
            let bls = buf(lse.as_ptr() as *const u8, &[heads * t], "f32");
            let modes = [
                FlashMode::Forward,
                FlashMode::Lse,
                FlashMode::Grad(GradOf::Queries),
                FlashMode::Grad(GradOf::Keys),
                FlashMode::Grad(GradOf::Values),
            ];
            let mut configs = modes.map(|mode| MlaPrefillConfig { mode, ..MlaPrefillConfig::DEEPSEEK_V3 }).to_vec();
            // The forward and dV a tile ahead (two buffers or more) and one tile after the other (one).
            assert!(configs[0].pipelined() && configs[4].pipelined());
            configs.push(MlaPrefillConfig { stages: 1, ..configs[0] });
            configs.push(MlaPrefillConfig { stages: 1, ..configs[4] });
            assert!(!configs[5].pipelined() && !configs[6].pipelined());
            for config in configs {
                let mode = config.mode;
                let kernel =
                    crate::conversion::sm90::compile_mla_prefill(&context, &config, &crate::target::SM90A).unwrap();
                let module = v3c_ptxsim::Module::parse(&kernel.ptx).unwrap();
                let abi = MlaPrefillAbi { qk, v, kind: config.flash_kind() };
                let shape = match mode {
                    FlashMode::Forward | FlashMode::Lse => [heads * t, v],
                    FlashMode::Grad(GradOf::Queries) => [heads * t, qk],
                    FlashMode::Grad(GradOf::Keys) => [heads * s, qk],
                    FlashMode::Grad(GradOf::Values) => [heads * s, v],
                };
                // The semantics' result, then the simulation's both ways.
                let mut results = Vec::new();
                for run in 0..3 {
                    let (mut o, mut l) = (vec![0f32; shape[0] * shape[1]], vec![0f32; heads * t]);
                    let (bo, bl) = (
                        buf(o.as_mut_ptr() as *const u8, &shape, "f32"),
                        buf(l.as_mut_ptr() as *const u8, &[heads * t], "f32"),
                    );
                    let ops: Vec<&Buf> = match mode {
                        FlashMode::Forward => vec![&bq, &bk, &bv, &bo],
                        FlashMode::Lse => vec![&bq, &bk, &bv, &bo, &bl],
                        FlashMode::Grad(_) => vec![&bq, &bk, &bv, &bd, &bls, &bdd, &bo],
                    };
                    let launch = abi.launch(&kernel.name, &ops, heads, scale).unwrap();
                    match run {
                        // SAFETY: the vectors above, of the launch's shapes.
                        0 => unsafe { emulate_prefill(&launch, abi.kind).unwrap() },
                        // SAFETY: as above.
                        _ => unsafe {
                            simulated(&kernel, &module, &launch, Checks { reversed: run == 2, races: run == 1 })
                        },
                    }
                    results.push((o, l));
                }
                let (want, want_lse) = &results[0];
                let scale_of = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (got, got_lse) in &results[1..] {
                    let diff = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                    eprintln!("{}: max |diff| {diff:.3e} of max |value| {scale_of:.3e}", kernel.name);
                    // P (and dS) in bf16 after a running maximum that is not the semantics' global one: bf16's
                    // rounding apart.
                    assert!(scale_of > 0.0 && diff <= 1e-2 * scale_of, "{}: {diff} of {scale_of}", kernel.name);
                    if mode == FlashMode::Lse {
                        let dl = got_lse.iter().zip(want_lse).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                        assert!(dl <= 1e-4, "{}: log-sum-exps {dl}", kernel.name);
                    }
                }
            }
        }
    }
}
