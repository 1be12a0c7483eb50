//! `v3r tune`: the GPU half of the split tuning flow. Measures the GEMM, MLA attention and
//! reduction candidates `v3c tune --emit-candidates DIR` compiled and merges the timings into a
//! tuning database ([`crate::tuning::TuningDb`]) that `v3c compile --tuning` reads. Reductions
//! (row kernels of several widths): made-up rows ([`row_launch`]), an RMSNorm's default against the
//! host's on sampled rows, every width against the default's outputs.
//!
//! Attention problems: made-up queries and caches (decode: 64-row pages through
//! a shuffled block table, bf16 or the fp8 cache's rows; prefill: head-major q, k, v), launched as
//! the executor launches them ([`attention_launch`]); the default's output is checked on sampled
//! query rows against the host's f64 attention (decode: the splits merged by their log-sum-exps),
//! every other candidate's against the default's (1e-2: P is bf16).
//!
//! Per problem (a kernel signature at decode or prefill M): made-up operands of its shape (grouped
//! problems with tokens routed to `top_k` experts plus the shared ones, [`crate::tuning::route`]),
//! launched through the same parameter code the executor uses ([`crate::abi::GemmAbi::launch`]).
//! The default configuration's output is checked on sampled rows against the product computed on
//! the host — a wrong launch or kernel stops the problem — and every other candidate's output must
//! match the default's (relative error 1e-3 for fp8, 1e-2 for bf16) or it is rejected. Timing:
//! the median of `reps` launches after two warm-ups, each after a 256 MiB memset that evicts L2,
//! between CUDA events.

use std::ffi::{c_void, CString};
use std::path::Path;

use cudarc::driver::{result, sys};

use crate::abi::{Buf, FlashKind, GemmAbi, GemmOperands, GemmProblem, KernelLaunch, Param};
use crate::cuda::{cuda, encode, open_device, DeviceBuffer};
use crate::tuning::{route, AttentionProblem, Candidates, DbEntry, Problem, TuningDb};

/// Made-up operand values: e4m3 bytes of magnitude below 2, bf16 in +-1, positive f32 scales.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn operand(&mut self, n: usize, fp8: bool) -> Vec<u8> {
        if fp8 {
            (0..n).map(|_| (self.next() as u8) & 0xBF).collect()
        } else {
            (0..n).flat_map(|_| v3c_models::dtype::f32_to_bf16(self.unit() * 2.0 - 1.0).to_le_bytes()).collect()
        }
    }
    fn floats(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.unit()).collect()
    }
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn ints_of(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One problem's operands on the host and the device.
struct Operands {
    fp8: bool,
    k: usize,
    n: usize,
    a: Vec<u8>,
    /// A dual-A kernel's second A (A's shape).
    a2: Option<Vec<u8>>,
    a_scale: Vec<f32>,
    b: Vec<u8>,
    b_scale: Vec<f32>,
    residual: Option<Vec<f32>>,
    offsets: Vec<i32>,
    perm: Vec<i32>,
    row_scale: Vec<f32>,
    device: Vec<DeviceBuffer>,
}

impl Operands {
    fn element(&self, data: &[u8], row: usize, col: usize) -> f32 {
        if self.fp8 {
            v3c_models::dtype::f8e4m3_to_f32(data[row * self.k + col])
        } else {
            let i = 2 * (row * self.k + col);
            v3c_models::dtype::bf16_to_f32(u16::from_le_bytes([data[i], data[i + 1]]))
        }
    }

    /// A row of A times a row of B, per 128-wide K block with the scales (fp8).
    fn dot(&self, abi: &GemmAbi, a_row: usize, b_row: usize) -> f64 {
        let kb = self.k.div_ceil(128);
        let mut acc = 0f64;
        for blk in 0..kb {
            let mut part = 0f64;
            for c in blk * 128..((blk + 1) * 128).min(self.k) {
                let b = f64::from(self.element(&self.b, b_row, c));
                part += f64::from(self.element(&self.a, a_row, c)) * b;
                if let Some(a2) = &self.a2 {
                    part += f64::from(self.element(a2, a_row, c)) * b;
                }
            }
            let scale = if self.fp8 {
                f64::from(self.a_scale[a_row * kb + blk]) * f64::from(self.b_scale[abi.b_scale_row(b_row) * kb + blk])
            } else {
                1.0
            };
            acc += part * scale;
        }
        acc
    }

    /// The expected output row `row` (a token row when scattering) over columns `0..n_out`.
    fn expected_row(&self, abi: &GemmAbi, row: usize, n_out: usize) -> Vec<f64> {
        let mut out = vec![0f64; n_out];
        if abi.grouping == "dense" {
            for (c, o) in out.iter_mut().enumerate() {
                *o = self.dot(abi, row, c) + self.residual.as_ref().map_or(0.0, |r| f64::from(r[row * n_out + c]));
            }
            return out;
        }
        let groups = self.offsets.len() - 1;
        for g in 0..groups {
            for p in self.offsets[g] as usize..self.offsets[g + 1] as usize {
                let token = self.perm[p] as usize;
                let mine = if abi.scatter { token == row } else { p == row };
                if !mine {
                    continue;
                }
                let a_row = if abi.grouping == "gather" { token } else { p };
                let w = if abi.row_scale { f64::from(self.row_scale[p]) } else { 1.0 };
                for (c, o) in out.iter_mut().enumerate() {
                    *o += self.dot(abi, a_row, g * self.n + c) * w;
                }
            }
        }
        out
    }
}

fn upload(bytes: &[u8], what: &str, held: &mut Vec<DeviceBuffer>) -> Result<u64, String> {
    let b = DeviceBuffer::upload(bytes, what)?;
    let ptr = b.ptr;
    held.push(b);
    Ok(ptr)
}

/// `n` bf16 at `ptr`, widened to f32.
fn download_bf16(ptr: u64, n: usize, what: &str) -> Result<Vec<f32>, String> {
    let mut bytes = vec![0u8; 2 * n];
    // SAFETY: the buffer holds `n` bf16 (allocated for it).
    unsafe { result::memcpy_dtoh_sync(&mut bytes, ptr) }.map_err(cuda(what))?;
    Ok(bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect())
}

fn download(ptr: u64, n: usize, what: &str) -> Result<Vec<f32>, String> {
    let mut bytes = vec![0u8; 4 * n];
    // SAFETY: the buffer holds `n` f32 (allocated for it).
    unsafe { result::memcpy_dtoh_sync(&mut bytes, ptr) }.map_err(cuda(what))?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Measures every problem of `dir`'s candidate set on device `ordinal` and merges the entries into
/// the database at `out` (created when absent; rewritten after each problem measured), skipping problems it already holds for this GPU,
/// compiler and candidate set unless `again`. `report` gets one line per candidate. Returns the
/// entries written.
pub fn tune(
    dir: &Path,
    out: &Path,
    reps: usize,
    ordinal: usize,
    again: bool,
    report: &mut dyn FnMut(&str),
) -> Result<usize, String> {
    let candidates = Candidates::read(dir)?;
    let info = crate::device::probe_device(ordinal).map_err(|e| e.to_string())?;
    if info.compute_capability != candidates.compute_capability {
        return Err(format!(
            "{}: candidates for {} (compute capability {}.{}); device {} is {} ({}.{})",
            dir.display(),
            candidates.gpu,
            candidates.compute_capability.0,
            candidates.compute_capability.1,
            ordinal,
            info.name,
            info.compute_capability.0,
            info.compute_capability.1
        ));
    }
    let mut db = if out.exists() { TuningDb::read(out)? } else { TuningDb::new() };
    let (_, stream) = open_device(ordinal)?;
    let driver = crate::device::probe_driver().map(|d| d.version.to_string()).unwrap_or_default();
    let measured_on = format!("{}, CUDA driver {driver}, v3r {}", info.name, env!("CARGO_PKG_VERSION"));
    let flush = DeviceBuffer::new(256 << 20, "the L2 flush buffer")?;
    let mut written = 0;
    let gpu = crate::tuning::gpu_short_name(&info.name);
    for (i, problem) in candidates.problems.iter().enumerate() {
        // Re-tuning only what changed: an entry for this GPU, compiler and candidate set stands.
        let measured = db.entries.iter().any(|e| {
            e.gpu == gpu
                && e.compiler_version == candidates.compiler_version
                && e.kernel == problem.kernel
                && e.m_bucket == problem.m_bucket
                && e.candidates_sha256 == problem.candidates_sha256
        });
        if measured && !again {
            report(&format!(
                "{} M {}: measured already (same GPU, compiler and candidates; --again to redo)",
                problem.kernel, problem.m
            ));
            continue;
        }
        match measure(dir, problem, i as u64, reps, info.multiprocessors as usize, stream, &flush, report) {
            Ok((timings, rejected)) => {
                db.insert(DbEntry {
                    compiler_version: candidates.compiler_version.clone(),
                    gpu: gpu.clone(),
                    compute_capability: info.compute_capability,
                    kernel: problem.kernel.clone(),
                    m_bucket: problem.m_bucket,
                    candidates_sha256: problem.candidates_sha256.clone(),
                    default_config: problem.default.clone(),
                    timings,
                    rejected,
                    measured_at: now_rfc3339(),
                    measured_on: measured_on.clone(),
                });
                written += 1;
                // Written as each problem ends: a run cut short (the H200 check's time ran out in the
                // lm_head's candidates) keeps what it measured.
                db.write(out)?;
            }
            Err(e) => report(&format!("{} M {}: not measured: {e}", problem.kernel, problem.m)),
        }
    }
    db.write(out)?;
    Ok(written)
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (days from the civil calendar algorithm).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

type Measured = (Vec<(String, f64)>, Vec<String>);

/// A problem's operands on the device, and what launching and checking its candidates needs.
trait Bench {
    /// Candidate `name`'s launch over the operands.
    fn launch(&self, name: &str, sms: usize) -> Result<KernelLaunch, String>;
    /// Zeroes what the kernels write (a scatter adds into its output).
    fn clear(&self) -> Result<(), String>;
    /// What a launch wrote, compared between candidates.
    fn output(&self) -> Result<Vec<f32>, String>;
    /// The default's output against the host's arithmetic on sampled rows (`Err`: which row, how far).
    fn check_default(&self, got: &[f32], tolerance: f64) -> Result<(), String>;
    /// Relative error allowed (against the host, and between candidates).
    fn tolerance(&self) -> f64;
    /// The rate a launch of `ms` milliseconds reaches (`TFLOP/s`, and `GB/s` where memory bounds it).
    fn rate(&self, ms: f64) -> String;
}

/// Each candidate of `problem` launched over its kind's made-up operands ([`Bench`], from `seed`):
/// the default first, checked against the host; every other against the default's output; then
/// timed.
#[allow(clippy::too_many_arguments)]
fn measure(
    dir: &Path,
    problem: &Problem,
    seed: u64,
    reps: usize,
    sms: usize,
    stream: sys::CUstream,
    flush: &DeviceBuffer,
    report: &mut dyn FnMut(&str),
) -> Result<Measured, String> {
    let bench: Box<dyn Bench> = match (problem.attention, &problem.rows) {
        (Some(_), _) => Box::new(AttentionBench::new(problem, seed, sms)?),
        (None, Some(r)) => Box::new(RowBench::new(r, seed)?),
        (None, None) => Box::new(GemmBench::new(problem, seed, sms)?),
    };
    let bench = bench.as_ref();
    let m = problem.m;
    let maps = DeviceBuffer::new(128 * MAX_TENSOR_MAPS, "tensor maps")?;
    let mut order: Vec<&str> = vec![problem.default.as_str()];
    order.extend(problem.candidates.iter().map(|c| c.name.as_str()).filter(|n| *n != problem.default));
    let (mut timings, mut rejected) = (Vec::new(), Vec::new());
    let mut reference: Vec<f64> = Vec::new();
    let tolerance = bench.tolerance();
    for name in order {
        let c = problem.candidates.iter().find(|c| c.name == name).ok_or("candidate vanished")?;
        let launch = bench.launch(name, sms)?;
        if launch.tensor_maps.len() > MAX_TENSOR_MAPS {
            return Err(format!("{name}: {} tensor maps", launch.tensor_maps.len()));
        }
        let mut encoded = Vec::new();
        for t in &launch.tensor_maps {
            encoded.extend(encode(t)?);
        }
        // SAFETY: at most MAX_TENSOR_MAPS 128-byte maps into a buffer of as many.
        unsafe { result::memcpy_htod_sync(maps.ptr, &encoded) }.map_err(cuda("uploading tensor maps"))?;
        let mut ptx = std::fs::read(dir.join("kernels").join(format!("{name}.ptx")))
            .map_err(|e| format!("{}/kernels/{name}.ptx: {e}", dir.display()))?;
        ptx.push(0);
        // SAFETY: PTX text, NUL-terminated, outliving the call.
        let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }
            .map_err(cuda(&format!("{name}: cuModuleLoadData")))?;
        let symbol = CString::new(name).map_err(|_| format!("kernel name {name}"))?;
        // SAFETY: a module just loaded.
        let function = unsafe { result::module::get_function(module, symbol) }
            .map_err(cuda(&format!("{name}: cuModuleGetFunction")))?;
        // Opted in whatever the size: the static mbarriers count against the 48 KiB without it.
        if c.dynamic_shared_memory_bytes > 0 {
            // SAFETY: a valid function handle.
            unsafe {
                result::function::set_function_attribute(
                    function,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    c.dynamic_shared_memory_bytes as i32,
                )
            }
            .map_err(cuda(&format!("{name}: dynamic shared memory")))?;
        }
        let mut values: Vec<u64> = launch
            .params
            .iter()
            .map(|p| match *p {
                Param::Value(v) => v,
                Param::TensorMap(t) => maps.ptr + 128 * t as u64,
            })
            .collect();
        let run = |values: &mut Vec<u64>| -> Result<(), String> {
            let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
            // SAFETY: parameters in the template's order over buffers sized for the problem.
            unsafe {
                result::launch_kernel(
                    function,
                    (launch.grid as u32, launch.grid_y as u32, 1),
                    (c.threads as u32, 1, 1),
                    c.dynamic_shared_memory_bytes as u32,
                    stream,
                    &mut pointers,
                )
            }
            .map_err(cuda(&format!("{name}: cuLaunchKernel")))
        };
        // Correctness first: zeroed outputs, one launch.
        bench.clear()?;
        run(&mut values)?;
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(stream) }.map_err(cuda(&format!("{name}: running")))?;
        let got = bench.output()?;
        if reference.is_empty() {
            bench.check_default(&got, tolerance).map_err(|e| format!("{name} (the default) differs from {e}"))?;
            reference = got.iter().map(|&x| f64::from(x)).collect();
        } else {
            let rel = relative(&got, &reference);
            if rel.is_nan() || rel > tolerance {
                report(&format!(
                    "{:40} M {m:5}  {name:52} REJECTED (differs from the default by {rel:.2e})",
                    problem.kernel
                ));
                rejected.push(name.to_string());
                // SAFETY: loaded above, no launch in flight.
                let _ = unsafe { result::module::unload(module) };
                continue;
            }
        }
        let event = |what: &str| result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(cuda(what));
        let (start, end) = (event("cuEventCreate")?, event("cuEventCreate")?);
        let mut times = Vec::new();
        for rep in 0..reps + 2 {
            // SAFETY: our stream, events and buffers.
            let ms = unsafe {
                result::memset_d8_async(flush.ptr, 0, flush.bytes, stream).map_err(cuda("flushing L2"))?;
                result::event::record(start, stream).map_err(cuda("cuEventRecord"))?;
                run(&mut values)?;
                result::event::record(end, stream).map_err(cuda("cuEventRecord"))?;
                result::event::synchronize(end).map_err(cuda(&format!("{name}: timing")))?;
                result::event::elapsed(start, end).map_err(cuda("cuEventElapsedTime"))?
            };
            if rep >= 2 {
                times.push(f64::from(ms));
            }
        }
        // SAFETY: created above; the module has no launch in flight.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
            let _ = result::module::unload(module);
        }
        times.sort_by(f64::total_cmp);
        let ms = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let estimate = c
            .estimate_us
            .map_or(String::new(), |e| format!("  (cost model {e:.1} us, measured/estimate {:.2})", ms * 1e3 / e));
        report(&format!("{:40} M {m:5}  {name:52} {ms:9.4} ms  {}{estimate}", problem.kernel, bench.rate(ms)));
        timings.push((name.to_string(), ms));
    }
    timings.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((timings, rejected))
}

/// Tensor maps a launch may take (the fp8 cache's decode: the queries, the latent, the RoPE key).
const MAX_TENSOR_MAPS: usize = 4;

/// Relative L2 distance of `got` from `want`.
fn relative(got: &[f32], want: &[f64]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        diff += (f64::from(*g) - w).powi(2);
        norm += w * w;
    }
    (diff / norm.max(1e-30)).sqrt()
}

/// A GEMM problem's operands: made-up values of its shape (grouped: tokens routed by
/// [`route`]), launched through [`GemmAbi::launch`].
struct GemmBench {
    ops: Operands,
    abis: Vec<(String, GemmAbi)>,
    /// The default candidate's (the host's product follows its epilogue and grouping).
    default: GemmAbi,
    bufs: Vec<Buf>,
    a2: Option<Buf>,
    residual: Option<Buf>,
    offsets: Option<Buf>,
    perm: Option<Buf>,
    /// A device-decided K range (Wgrad over one expert's pairs): all of K.
    k_range: Option<Buf>,
    out: DeviceBuffer,
    out_buf: Buf,
    workspace: DeviceBuffer,
    counters: DeviceBuffer,
    rows: usize,
    out_rows: usize,
    n_out: usize,
}

impl GemmBench {
    fn new(problem: &Problem, seed: u64, sms: usize) -> Result<GemmBench, String> {
        let abis: Vec<(String, GemmAbi)> = problem
            .candidates
            .iter()
            .map(|c| {
                c.abi.clone().map(|a| (c.name.clone(), a)).ok_or_else(|| format!("{}: no launch convention", c.name))
            })
            .collect::<Result<_, String>>()?;
        let default = abis
            .iter()
            .find(|(n, _)| *n == problem.default)
            .map(|(_, a)| a.clone())
            .ok_or_else(|| format!("no candidate {}", problem.default))?;
        let fp8 = default.input == "fp8";
        // The output as the kernels write it (a bf16 output read as f32 was garbage: the H200 run's
        // kv_b problem "differs from the host's product on row 0 by 1.38e0").
        let out_el = match default.output.as_str() {
            "f32" => "f32",
            "bf16" => "bf16",
            other => return Err(format!("{}: {other} outputs are not measured (f32 and bf16 are)", problem.default)),
        };
        let (m, n, k) = (problem.m, problem.n, problem.k);
        let (offsets, perm) = match problem.grouped {
            Some(r) => route(m, r, seed),
            None => (vec![0, m as i32], Vec::new()),
        };
        let groups = offsets.len() - 1;
        let rows = if problem.grouped.is_some() { perm.len() } else { m };
        let a_rows = if default.grouping == "gather" { m } else { rows };
        let n_out = if default.swiglu { n / 2 } else { n };
        let out_rows = if default.scatter { m } else { rows };
        let kb = k.div_ceil(128);
        let b_scale_rows = if default.b_row_scales { groups * n } else { (groups * n).div_ceil(128) };
        let mut rand = Rand(0x9E37_79B9_7F4A_7C15 ^ (seed + 1));
        let mut ops = Operands {
            fp8,
            k,
            n,
            a: rand.operand(a_rows * k, fp8),
            a2: default.dual_a.then(|| rand.operand(a_rows * k, fp8)),
            a_scale: rand.floats(a_rows * kb, 1e-3, 1e-2),
            b: rand.operand(groups * n * k, fp8),
            b_scale: rand.floats(b_scale_rows * kb, 1e-3, 1e-2),
            residual: problem.residual.then(|| rand.floats(m * n_out, -1.0, 1.0)),
            row_scale: rand.floats(rows.max(1), 0.0, 1.0),
            offsets,
            perm,
            device: Vec::new(),
        };
        let in_el = if fp8 { "f8E4M3FN" } else { "bf16" };
        let mut held = Vec::new();
        let buf = |addr: u64, shape: Vec<usize>, element: &'static str| Buf { addr, shape, element };
        let a = buf(upload(&ops.a, "A", &mut held)?, vec![a_rows, k], in_el);
        let a2 = match &ops.a2 {
            Some(a2) => Some(buf(upload(a2, "the second A", &mut held)?, vec![a_rows, k], in_el)),
            None => None,
        };
        let b = buf(upload(&ops.b, "B", &mut held)?, vec![groups * n, k], in_el);
        let a_scale = buf(upload(&bytes_of(&ops.a_scale), "A scales", &mut held)?, vec![a_rows, kb], "f32");
        let b_scale = buf(upload(&bytes_of(&ops.b_scale), "B scales", &mut held)?, vec![b_scale_rows, kb], "f32");
        let residual = match &ops.residual {
            Some(r) => Some(buf(upload(&bytes_of(r), "residual", &mut held)?, vec![m, n_out], "f32")),
            None => None,
        };
        let grouped = problem.grouped.is_some();
        let offsets = grouped.then(|| upload(&ints_of(&ops.offsets), "offsets", &mut held)).transpose()?;
        let offsets = offsets.map(|a| buf(a, vec![groups + 1], "i32"));
        let perm = grouped.then(|| upload(&ints_of(&ops.perm), "permutation", &mut held)).transpose()?;
        let perm = perm.map(|a| buf(a, vec![rows], "i32"));
        let row_scale = buf(upload(&bytes_of(&ops.row_scale), "row scales", &mut held)?, vec![rows], "f32");
        let whole_k = [0, k as i32];
        let k_range = default.k_range.then(|| upload(&ints_of(&whole_k), "K range", &mut held)).transpose()?;
        let k_range = k_range.map(|a| buf(a, vec![2], "i32"));
        let out = DeviceBuffer::new(if out_el == "bf16" { 2 } else { 4 } * out_rows * n_out, "the output")?;
        let out_buf = buf(out.ptr, vec![out_rows, n_out], out_el);
        let problem_size = GemmProblem { m: rows, n, k, groups };
        let mut scratch = crate::abi::SplitScratch::default();
        for (_, abi) in &abis {
            let s = abi.scratch(problem_size, sms);
            scratch.workspace_bytes = scratch.workspace_bytes.max(s.workspace_bytes);
            scratch.counters = scratch.counters.max(s.counters);
        }
        let workspace = DeviceBuffer::new(scratch.workspace_bytes, "the split-K workspace")?;
        let counters = DeviceBuffer::new(4 * scratch.counters, "the split-K counters")?;
        // SAFETY: allocations just made; the kernels expect zero counters.
        unsafe { result::memset_d8_sync(counters.ptr, 0, counters.bytes) }.map_err(cuda("zeroing counters"))?;
        ops.device = held;
        Ok(GemmBench {
            ops,
            abis,
            default,
            bufs: vec![a, a_scale, b, b_scale, row_scale],
            a2,
            residual,
            offsets,
            perm,
            k_range,
            out,
            out_buf,
            workspace,
            counters,
            rows,
            out_rows,
            n_out,
        })
    }

    fn abi(&self, name: &str) -> Result<&GemmAbi, String> {
        self.abis.iter().find(|(n, _)| n == name).map(|(_, a)| a).ok_or_else(|| format!("no candidate {name}"))
    }
}

impl Bench for GemmBench {
    fn launch(&self, name: &str, sms: usize) -> Result<KernelLaunch, String> {
        let [a, a_scale, b, b_scale, row_scale] = &self.bufs[..] else { unreachable!("five operands") };
        let fp8 = self.ops.fp8;
        let operands = GemmOperands {
            a,
            a2: self.a2.as_ref(),
            a_scale: fp8.then_some(a_scale),
            b,
            b_scale: fp8.then_some(b_scale),
            out: &self.out_buf,
            residual: self.residual.as_ref(),
            offsets: self.offsets.as_ref(),
            perm: self.perm.as_ref(),
            row_scale: Some(row_scale),
            k_range: self.k_range.as_ref(),
            workspace: Some(self.workspace.ptr),
            counters: Some(self.counters.ptr),
        };
        self.abi(name)?.launch(name, &operands, sms)
    }

    fn clear(&self) -> Result<(), String> {
        // SAFETY: our allocation.
        unsafe { result::memset_d8_sync(self.out.ptr, 0, self.out.bytes) }.map_err(cuda("zeroing the output"))
    }

    fn output(&self) -> Result<Vec<f32>, String> {
        match self.out_buf.element {
            "bf16" => download_bf16(self.out.ptr, self.out_rows * self.n_out, "reading the output"),
            _ => download(self.out.ptr, self.out_rows * self.n_out, "reading the output"),
        }
    }

    fn check_default(&self, got: &[f32], tolerance: f64) -> Result<(), String> {
        let n_out = self.n_out;
        for row in [0, self.out_rows / 2, self.out_rows.saturating_sub(1)] {
            let want = self.ops.expected_row(&self.default, row, n_out);
            let rel = relative(&got[row * n_out..][..n_out], &want);
            if rel.is_nan() || rel > tolerance {
                return Err(format!("the host's product on row {row} by {rel:.2e}"));
            }
        }
        Ok(())
    }

    fn tolerance(&self) -> f64 {
        // A bf16 output's rounding alone is ~1.7e-3 relative (measured on the H200).
        if self.ops.fp8 && self.out_buf.element != "bf16" {
            1e-3
        } else {
            1e-2
        }
    }

    fn rate(&self, ms: f64) -> String {
        // The tensor cores' FLOPs: a second A is a second product.
        let products = if self.a2.is_some() { 2.0 } else { 1.0 };
        let tflops = 2.0 * products * self.rows as f64 * self.ops.n as f64 * self.ops.k as f64 / (ms * 1e-3) / 1e12;
        format!("{tflops:7.1} TFLOP/s")
    }
}

/// An MLA attention problem's made-up operands on the host: queries and keys (bf16 in +-1; the
/// fp8 cache's rows packed from such values), decode's pages laid out through a shuffled block
/// table, a gradient's output gradient (bf16 in +-1) and statistics; and the host's f64 attention
/// (gradient) of sampled rows, which the default candidate's output must match (decode: its splits
/// merged by their log-sum-exps, as the combine kernel does).
struct AttentionHost {
    problem: AttentionProblem,
    /// Sequences (decode) or tokens (prefill).
    m: usize,
    q: Vec<u8>,
    /// Decode: the pool of pages' rows; prefill: the keys.
    keys: Vec<u8>,
    values: Vec<u8>,
    table: Vec<i32>,
    /// Decode's K splits on the device's SMs.
    splits: usize,
    /// A gradient's inputs: dout `[H m, v]` (bf16), each query row's base-2 log-sum-exp and `D`.
    /// Made up, not the forward's (a log-sum-exp of `log2(t + 1)`, as if query t's scores were
    /// all zero; `D` in +-1): the kernels' arithmetic is defined for any, and the host follows it.
    dout: Vec<u8>,
    lse: Vec<f32>,
    dd: Vec<f32>,
}

/// The flash kernel of a prefill attention problem (decode: None).
fn flash_of(attention: &AttentionProblem) -> Option<FlashKind> {
    match *attention {
        AttentionProblem::Prefill { flash, .. } => Some(flash),
        AttentionProblem::Decode { .. } => None,
    }
}

/// A bf16 value of little-endian `bytes` at element `i`.
fn bf16_at(bytes: &[u8], i: usize) -> f64 {
    f64::from(v3c_models::dtype::bf16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])))
}

/// Attention of query `q` over keys `keys` in f64: `key(j)` is key j's columns (as many as `q`'s)
/// then its value's `width` columns; the softmax of `scale * q . key` weighs the values. Returns the
/// output and the log-sum-exp of the scores (no keys: zeros and `-inf`).
fn attend(
    q: &[f64],
    keys: std::ops::Range<usize>,
    scale: f64,
    key: impl Fn(usize) -> Vec<f64>,
    width: usize,
) -> (Vec<f64>, f64) {
    let all: Vec<Vec<f64>> = keys.map(key).collect();
    let scores: Vec<f64> = all.iter().map(|k| scale * k.iter().zip(q).map(|(a, b)| a * b).sum::<f64>()).collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0f64; width];
    for (w, k) in weights.iter().zip(&all) {
        for (o, x) in out.iter_mut().zip(&k[k.len() - width..]) {
            *o += w * x / total;
        }
    }
    (out, max + total.ln())
}

impl AttentionHost {
    fn new(attention: AttentionProblem, m: usize, seed: u64, sms: usize) -> Result<AttentionHost, String> {
        let mut rand = Rand(0x9E37_79B9_7F4A_7C15 ^ (seed + 1));
        match attention {
            AttentionProblem::Decode { heads, kv, rope, fp8_cache, context, .. } => {
                let width = kv + rope;
                let pages = m * context.div_ceil(crate::abi::PAGE_ROWS);
                // The pages in a shuffled order: sequence b's page p is page table[b, p].
                let mut table: Vec<i32> = (0..pages as i32).collect();
                for i in (1..pages).rev() {
                    table.swap(i, (rand.next() % (i as u64 + 1)) as usize);
                }
                let q = rand.operand(m * heads * width, false);
                let rows = pages * crate::abi::PAGE_ROWS;
                let keys = match fp8_cache {
                    false => rand.operand(rows * width, false),
                    true => {
                        let layout = Self::fp8_row(kv, rope)?;
                        let mut bytes = vec![0u8; rows * layout.bytes()];
                        for row in bytes.chunks_exact_mut(layout.bytes()) {
                            layout.pack(&rand.floats(width, -1.0, 1.0), row);
                        }
                        bytes
                    }
                };
                let splits = crate::lowering::attention_splits(m, heads, context, sms);
                let (dout, lse, dd, values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                Ok(AttentionHost { problem: attention, m, q, keys, values, table, splits, dout, lse, dd })
            }
            AttentionProblem::Prefill { heads, qk, v, flash, .. } => {
                let q = rand.operand(heads * m * qk, false);
                let keys = rand.operand(heads * m * qk, false);
                let values = rand.operand(heads * m * v, false);
                let (mut dout, mut lse, mut dd) = (Vec::new(), Vec::new(), Vec::new());
                if flash.gradient() {
                    dout = rand.operand(heads * m * v, false);
                    lse = (0..heads * m).map(|r| ((r % m + 1) as f32).log2()).collect();
                    dd = rand.floats(heads * m, -1.0, 1.0);
                }
                Ok(AttentionHost {
                    problem: attention,
                    m,
                    q,
                    keys,
                    values,
                    table: Vec::new(),
                    splits: 1,
                    dout,
                    lse,
                    dd,
                })
            }
        }
    }

    fn fp8_row(kv: usize, rope: usize) -> Result<crate::plan::Fp8LatentRow, String> {
        crate::plan::Fp8LatentRow::of(kv + rope)
            .filter(|r| r.latent == kv)
            .ok_or_else(|| format!("an fp8 cache of rows of {kv} + {rope}"))
    }

    /// Rows of the output (query rows; a key gradient's key rows), and the columns of one.
    fn rows_and_width(&self) -> (usize, usize) {
        match self.problem {
            AttentionProblem::Decode { heads, kv, .. } => (self.m * heads, kv),
            AttentionProblem::Prefill { heads, qk, v, flash, .. } => match flash {
                FlashKind::GradQ | FlashKind::GradK => (heads * self.m, qk),
                _ => (heads * self.m, v),
            },
        }
    }

    /// The host's gradient row `row` of a gradient kernel's output (dQ: query row; dK, dV: key row
    /// `row`, of head `row / m`), in f64 from the same bf16 values and statistics, as the kernels
    /// define it: `P = 2^(scale log2(e) q.k - lse)`, `dS = P (dout . v - D)`, P (dV) and dS (dQ,
    /// dK) rounded to bf16 as they feed the tensor cores; dQ and dK times `scale`.
    fn gradient(&self, row: usize) -> Vec<f64> {
        let AttentionProblem::Prefill { qk, v, scale, flash, .. } = self.problem else { return Vec::new() };
        let (m, head, own) = (self.m, row / self.m, row % self.m);
        let take = |bytes: &[u8], r: usize, width: usize| -> Vec<f64> {
            (0..width).map(|c| bf16_at(bytes, (head * m + r) * width + c)).collect()
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let round = |x: f64| f64::from(v3c_models::dtype::bf16_to_f32(v3c_models::dtype::f32_to_bf16(x as f32)));
        let scale_log2 = f64::from(scale) * std::f64::consts::LOG2_E;
        // Query t and key j's (P, dS).
        let p_ds = |t: usize, j: usize| -> (f64, f64) {
            let (query, key) = (take(&self.q, t, qk), take(&self.keys, j, qk));
            let p = (dot(&query, &key) * scale_log2 - f64::from(self.lse[head * m + t])).exp2();
            let dp = dot(&take(&self.dout, t, v), &take(&self.values, j, v));
            (p, p * (dp - f64::from(self.dd[head * m + t])))
        };
        let (width, pairs): (usize, Vec<(usize, usize)>) = match flash {
            FlashKind::GradQ => (qk, (0..=own).map(|j| (own, j)).collect()),
            FlashKind::GradK => (qk, (own..m).map(|t| (t, own)).collect()),
            _ => (v, (own..m).map(|t| (t, own)).collect()),
        };
        let mut out = vec![0f64; width];
        for (t, j) in pairs {
            let (p, ds) = p_ds(t, j);
            let (factor, from) = match flash {
                FlashKind::GradQ => (round(ds), take(&self.keys, j, qk)),
                FlashKind::GradK => (round(ds), take(&self.q, t, qk)),
                _ => (round(p), take(&self.dout, t, v)),
            };
            out.iter_mut().zip(&from).for_each(|(o, x)| *o += factor * x);
        }
        if flash != FlashKind::GradV {
            out.iter_mut().for_each(|o| *o *= f64::from(scale));
        }
        out
    }

    /// The host's attention of query row `row` over its keys `keys` (decode: sequence `row /
    /// heads`'s, read through the block table; prefill: head `row / m`'s, causal: query t sees keys
    /// `0..=t`; None: all it sees), in f64 from the same bf16 (and fp8) values; and the log-sum-exp.
    fn attention(&self, row: usize, keys: Option<std::ops::Range<usize>>) -> (Vec<f64>, f64) {
        match self.problem {
            AttentionProblem::Decode { heads, kv, rope, fp8_cache, context, scale } => {
                let width = kv + rope;
                let q: Vec<f64> = (0..width).map(|c| bf16_at(&self.q, row * width + c)).collect();
                let b = row / heads;
                let pages_each = context.div_ceil(crate::abi::PAGE_ROWS);
                let layout = crate::plan::Fp8LatentRow { latent: kv };
                // Key j's columns, then its value: the latent, its first kv columns.
                let key_and_value = |j: usize| -> Vec<f64> {
                    let page = self.table[b * pages_each + j / crate::abi::PAGE_ROWS] as usize;
                    let r = page * crate::abi::PAGE_ROWS + j % crate::abi::PAGE_ROWS;
                    let mut k: Vec<f64> = if fp8_cache {
                        let mut v = vec![0f32; width];
                        layout.unpack(&self.keys[r * layout.bytes()..][..layout.bytes()], &mut v);
                        v.into_iter().map(f64::from).collect()
                    } else {
                        (0..width).map(|c| bf16_at(&self.keys, r * width + c)).collect()
                    };
                    k.extend_from_within(..kv);
                    k
                };
                attend(&q, keys.unwrap_or(0..context), f64::from(scale), key_and_value, kv)
            }
            AttentionProblem::Prefill { qk, v, scale, .. } => {
                let (head, t) = (row / self.m, row % self.m);
                let q: Vec<f64> = (0..qk).map(|c| bf16_at(&self.q, row * qk + c)).collect();
                let key_and_value = |j: usize| {
                    let r = head * self.m + j;
                    let mut both: Vec<f64> = (0..qk).map(|c| bf16_at(&self.keys, r * qk + c)).collect();
                    both.extend((0..v).map(|c| bf16_at(&self.values, r * v + c)));
                    both
                };
                attend(&q, keys.unwrap_or(0..t + 1), f64::from(scale), key_and_value, v)
            }
        }
    }

    /// `got` (decode: the splits' outputs `[splits, rows, kv]` then their log-sum-exps `[splits,
    /// rows]`; prefill: the output `[rows, v]`, then training's forward's log-sum-exps `[rows]`; a
    /// gradient: `[rows, width]`) against the host's attention (gradient) on sampled rows.
    fn check(&self, got: &[f32], tolerance: f64) -> Result<(), String> {
        let (rows, width) = self.rows_and_width();
        let flash = flash_of(&self.problem);
        if flash.is_some_and(FlashKind::gradient) {
            for row in [0, rows / 2, rows.saturating_sub(1)] {
                let rel = relative(&got[row * width..][..width], &self.gradient(row));
                if rel.is_nan() || rel > tolerance {
                    return Err(format!("the host's gradient on row {row} by {rel:.2e}"));
                }
            }
            return Ok(());
        }
        for row in [0, rows / 2, rows.saturating_sub(1)] {
            if flash == Some(FlashKind::Lse) {
                // Base 2, as the gradient kernels read it.
                let want = self.attention(row, None).1 * std::f64::consts::LOG2_E;
                let lse = f64::from(got[rows * width + row]);
                if (lse - want).is_nan() || (lse - want).abs() > tolerance * want.abs().max(1.0) {
                    return Err(format!("the host's log-sum-exp of query row {row}: {lse} for {want}"));
                }
            }
            let row_out: Vec<f32> = match self.problem {
                AttentionProblem::Decode { .. } => {
                    let lse = &got[self.splits * rows * width..];
                    let max = (0..self.splits).map(|z| lse[z * rows + row]).fold(f32::NEG_INFINITY, f32::max);
                    let weights: Vec<f64> =
                        (0..self.splits).map(|z| f64::from(lse[z * rows + row] - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    (0..width)
                        .map(|c| {
                            let sum: f64 = (0..self.splits)
                                .filter(|&z| weights[z] > 0.0)
                                .map(|z| weights[z] * f64::from(got[(z * rows + row) * width + c]))
                                .sum();
                            (sum / total) as f32
                        })
                        .collect()
                }
                AttentionProblem::Prefill { .. } => got[row * width..][..width].to_vec(),
            };
            let rel = relative(&row_out, &self.attention(row, None).0);
            if rel.is_nan() || rel > tolerance {
                return Err(format!("the host's attention on query row {row} by {rel:.2e}"));
            }
        }
        Ok(())
    }
}

/// The shapes and elements of an attention problem's launch operands for `m` sequences (decode)
/// or tokens (prefill) with `splits` K splits, in the launch's order: the inputs, then the outputs
/// (decode: the splits' outputs and log-sum-exps; prefill: the output, f32, and training's
/// forward's log-sum-exps; a gradient's inputs are also dout, lse and D, its output the gradient).
fn attention_operands(
    attention: AttentionProblem,
    m: usize,
    splits: usize,
) -> Result<Vec<(Vec<usize>, &'static str)>, String> {
    Ok(match attention {
        AttentionProblem::Decode { heads, kv, rope, fp8_cache, context, .. } => {
            let width = kv + rope;
            let pages_each = context.div_ceil(crate::abi::PAGE_ROWS);
            let (element, cols) = match fp8_cache {
                true => ("i8", AttentionHost::fp8_row(kv, rope)?.bytes()),
                false => ("bf16", width),
            };
            let rows = m * heads;
            vec![
                (vec![rows, width], "bf16"),
                (vec![m * pages_each, crate::abi::PAGE_ROWS, cols], element),
                (vec![m, pages_each], "i32"),
                (vec![m], "i32"),
                (vec![splits, rows, kv], "f32"),
                (vec![splits, rows], "f32"),
            ]
        }
        AttentionProblem::Prefill { heads, qk, v, flash, .. } => {
            let rows = heads * m;
            let mut operands = vec![(vec![rows, qk], "bf16"), (vec![rows, qk], "bf16"), (vec![rows, v], "bf16")];
            match flash {
                FlashKind::Forward => operands.push((vec![rows, v], "f32")),
                FlashKind::Lse => operands.extend([(vec![rows, v], "f32"), (vec![rows], "f32")]),
                _ => {
                    let width = if flash == FlashKind::GradV { v } else { qk };
                    operands.extend([
                        (vec![rows, v], "bf16"),
                        (vec![rows], "f32"),
                        (vec![rows], "f32"),
                        (vec![rows, width], "f32"),
                    ]);
                }
            }
            operands
        }
    })
}

/// Decode's K splits for `m` sequences on `sms` SMs, as the runtime picks them (prefill: 1).
fn attention_splits(attention: AttentionProblem, m: usize, sms: usize) -> usize {
    match attention {
        AttentionProblem::Decode { heads, context, .. } => crate::lowering::attention_splits(m, heads, context, sms),
        AttentionProblem::Prefill { .. } => 1,
    }
}

/// The launch of attention candidate `name` of `problem` on a device of `sms` SMs over operands
/// at `addrs` (in the order of the launch: decode's queries, pool of pages, block table, lengths,
/// splits' outputs, log-sum-exps; prefill's queries, keys, values, output — [`FlashKind::operands`]
/// for training's) — what `v3r tune` launches, checkable without a GPU.
pub fn attention_launch(problem: &Problem, name: &str, addrs: &[u64], sms: usize) -> Result<KernelLaunch, String> {
    let attention = problem.attention.ok_or_else(|| format!("{}: not an attention problem", problem.kernel))?;
    let operands = attention_operands(attention, problem.m, attention_splits(attention, problem.m, sms))?;
    if addrs.len() != operands.len() {
        return Err(format!("{name}: {} operand addresses for {} operands", addrs.len(), operands.len()));
    }
    let b: Vec<Buf> = operands
        .into_iter()
        .zip(addrs)
        .map(|((shape, element), &addr)| Buf { addr, shape, element: element.into() })
        .collect();
    match attention {
        AttentionProblem::Decode { heads, kv, rope, fp8_cache, scale, .. } => {
            let abi = crate::abi::MlaDecodeAbi { kv, rope, fp8_cache, selected: false, bf16_rows: false };
            abi.launch(name, [&b[0], &b[1], &b[2], &b[3], &b[4], &b[5]], heads, scale)
        }
        AttentionProblem::Prefill { heads, qk, v, scale, flash } => {
            let abi = crate::abi::MlaPrefillAbi { qk, v, kind: flash };
            abi.launch(name, &b.iter().collect::<Vec<_>>(), heads, scale)
        }
    }
}

/// An attention problem's operands on the device ([`attention_launch`] launches over them).
struct AttentionBench {
    problem: Problem,
    case: AttentionCase,
    addrs: Vec<u64>,
    /// The outputs' addresses and f32 elements.
    outputs: Vec<(u64, usize)>,
    _held: Vec<DeviceBuffer>,
}

/// An attention problem as `v3r tune` measures it, on the host: its operands' shapes and elements
/// in the launch's order, the made-up inputs (the first operands, [`AttentionCase::inputs`]; the
/// outputs are f32), and the host's check of the default candidate's outputs — public so that the
/// check is held to the kernels' definitions where those are (the compiler's host semantics).
pub struct AttentionCase {
    host: AttentionHost,
    pub operands: Vec<(Vec<usize>, &'static str)>,
}

impl AttentionCase {
    /// `problem`'s operands at its `m` (made up from `seed`; decode split for `sms` SMs).
    pub fn new(problem: &Problem, seed: u64, sms: usize) -> Result<AttentionCase, String> {
        let attention = problem.attention.ok_or_else(|| format!("{}: not an attention problem", problem.kernel))?;
        let m = problem.m;
        let host = AttentionHost::new(attention, m, seed, sms)?;
        let operands = attention_operands(attention, m, host.splits)?;
        Ok(AttentionCase { host, operands })
    }

    /// The inputs' bytes in the launch's order, and what each is (the host's own where it keeps
    /// them).
    pub fn inputs(&self) -> Vec<(std::borrow::Cow<'_, [u8]>, &'static str)> {
        use std::borrow::Cow::{Borrowed, Owned};
        let h = &self.host;
        let mut inputs = match h.problem {
            AttentionProblem::Decode { context, .. } => vec![
                (Borrowed(&h.q[..]), "queries"),
                (Borrowed(&h.keys[..]), "the cache"),
                (Owned(ints_of(&h.table)), "the block table"),
                (Owned(ints_of(&vec![context as i32; h.m])), "the lengths"),
            ],
            AttentionProblem::Prefill { .. } => {
                vec![
                    (Borrowed(&h.q[..]), "queries"),
                    (Borrowed(&h.keys[..]), "keys"),
                    (Borrowed(&h.values[..]), "values"),
                ]
            }
        };
        if !h.dout.is_empty() {
            inputs.extend([
                (Borrowed(&h.dout[..]), "dout"),
                (Owned(bytes_of(&h.lse)), "lse"),
                (Owned(bytes_of(&h.dd)), "D"),
            ]);
        }
        inputs
    }

    /// How many of the operands are inputs ([`AttentionCase::inputs`]).
    pub fn input_count(&self) -> usize {
        match self.host.problem {
            AttentionProblem::Decode { .. } => 4,
            AttentionProblem::Prefill { .. } if self.host.dout.is_empty() => 3,
            AttentionProblem::Prefill { .. } => 6,
        }
    }

    /// The outputs' shapes (f32), after the inputs.
    pub fn output_shapes(&self) -> impl Iterator<Item = &Vec<usize>> {
        self.operands[self.input_count()..].iter().map(|(shape, _)| shape)
    }

    /// The default candidate's outputs (concatenated) against the host's on sampled rows.
    pub fn check(&self, got: &[f32]) -> Result<(), String> {
        self.host.check(got, self.tolerance())
    }

    /// Relative error allowed: P in bf16 (and the fp8 cache's latent converted to bf16); a
    /// gradient's dS too, from differences.
    pub fn tolerance(&self) -> f64 {
        if self.host.dout.is_empty() {
            1e-2
        } else {
            2e-2
        }
    }
}

impl AttentionBench {
    fn new(problem: &Problem, seed: u64, sms: usize) -> Result<AttentionBench, String> {
        let case = AttentionCase::new(problem, seed, sms)?;
        let mut held = Vec::new();
        let mut addrs = Vec::new();
        for (bytes, what) in &case.inputs() {
            addrs.push(upload(bytes, what, &mut held)?);
        }
        let mut outputs = Vec::new();
        for shape in case.output_shapes() {
            let elements = shape.iter().product::<usize>();
            let d = DeviceBuffer::new(4 * elements, "an output")?;
            addrs.push(d.ptr);
            outputs.push((d.ptr, elements));
            held.push(d);
        }
        Ok(AttentionBench { problem: problem.clone(), case, addrs, outputs, _held: held })
    }
}

impl Bench for AttentionBench {
    fn launch(&self, name: &str, sms: usize) -> Result<KernelLaunch, String> {
        attention_launch(&self.problem, name, &self.addrs, sms)
    }

    fn clear(&self) -> Result<(), String> {
        for &(addr, elements) in &self.outputs {
            // SAFETY: our allocation of `elements` f32.
            unsafe { result::memset_d8_sync(addr, 0, 4 * elements) }.map_err(cuda("zeroing the output"))?;
        }
        Ok(())
    }

    fn output(&self) -> Result<Vec<f32>, String> {
        let mut all = Vec::new();
        for &(addr, elements) in &self.outputs {
            all.extend(download(addr, elements, "reading the output")?);
        }
        Ok(all)
    }

    fn check_default(&self, got: &[f32], tolerance: f64) -> Result<(), String> {
        self.case.host.check(got, tolerance)
    }

    fn tolerance(&self) -> f64 {
        self.case.tolerance()
    }

    fn rate(&self, ms: f64) -> String {
        let (seconds, m) = (ms * 1e-3, self.case.host.m);
        match self.case.host.problem {
            AttentionProblem::Decode { heads, kv, rope, context, .. } => {
                let flops = 2.0 * (m * heads * context * (2 * kv + rope)) as f64;
                let bytes = (self.case.host.keys.len() + self.case.host.q.len()) as f64;
                format!("{:7.1} TFLOP/s {:6.0} GB/s", flops / seconds / 1e12, bytes / seconds / 1e9)
            }
            AttentionProblem::Prefill { heads, qk, v, flash, .. } => {
                // The causal triangle's products: S and P V; dQ, dK: S, dP and dS K (Q); dV: S and P^T dO.
                let widths = match flash {
                    FlashKind::GradQ | FlashKind::GradK => 2 * qk + v,
                    _ => qk + v,
                };
                let flops = 2.0 * heads as f64 * (m * (m + 1) / 2) as f64 * widths as f64;
                format!("{:7.1} TFLOP/s", flops / seconds / 1e12)
            }
        }
    }
}

/// A row kernel's operands on the device: made-up inputs (f32 and bf16 in +-1), zeroed outputs;
/// every width launched as the executor launches a row kernel (a memref per operand, a block per
/// row). An RMSNorm's default is checked on sampled rows against the host's ([`check_rmsnorm`]),
/// an argmax's against the host's argmax ([`check_argmax`]); every other width against the default's
/// outputs.
struct RowBench {
    problem: crate::tuning::RowProblem,
    addrs: Vec<u64>,
    outputs: Vec<Buf>,
    /// The inputs' bytes by operand name (what the host checks the default with).
    inputs: std::collections::HashMap<String, Vec<u8>>,
    bytes: usize,
    _held: Vec<DeviceBuffer>,
}

/// The host's RMSNorm of sampled rows of `problem` (inputs `x` f32 `[rows, d]`, `w` bf16 or f32
/// `[d]` as `inputs` hold them) in f64: `w * (x / sqrt(mean(x^2) + eps))`, against `got` — the
/// outputs in operand order, f32 (`y`; `q` decoded from e4m3; `scale`) — `y` within `tolerance`,
/// `q * scale` within e4m3's rounding (5e-2).
fn check_rmsnorm(
    problem: &crate::tuning::RowProblem,
    eps: f32,
    inputs: &std::collections::HashMap<String, Vec<u8>>,
    got: &[f32],
    tolerance: f64,
) -> Result<(), String> {
    let operand = |name: &str| problem.operands.iter().find(|o| o.name == name);
    let (Some(x), Some(w)) = (operand("x"), operand("w")) else { return Err("an RMSNorm without x and w".into()) };
    let (rows, d) = (x.shape[0], x.shape[1]);
    let value = |name: &str, element: &str, i: usize| -> f64 {
        let b = &inputs[name];
        match element {
            "bf16" => bf16_at(b, i),
            _ => f64::from(f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])),
        }
    };
    // Where each output starts in `got`.
    let mut at = std::collections::HashMap::new();
    let mut offset = 0;
    for o in problem.operands.iter().filter(|o| o.output) {
        at.insert(o.name.as_str(), offset);
        offset += o.shape.iter().product::<usize>();
    }
    for row in [0, rows / 2, rows.saturating_sub(1)] {
        let xs: Vec<f64> = (0..d).map(|c| value("x", &x.element, row * d + c)).collect();
        let inv = 1.0 / (xs.iter().map(|v| v * v).sum::<f64>() / d as f64 + f64::from(eps)).sqrt();
        let want: Vec<f64> = (0..d).map(|c| value("w", &w.element, c) * (xs[c] * inv)).collect();
        if let Some(&y) = at.get("y") {
            let rel = relative(&got[y + row * d..][..d], &want);
            if rel.is_nan() || rel > tolerance {
                return Err(format!("the host's RMSNorm (y) on row {row} by {rel:.2e}"));
            }
        }
        if let (Some(&q), Some(&s)) = (at.get("q"), at.get("scale")) {
            let groups = d.div_ceil(128);
            let deq: Vec<f32> = (0..d).map(|c| got[q + row * d + c] * got[s + row * groups + c / 128]).collect();
            let rel = relative(&deq, &want);
            if rel.is_nan() || rel > 5e-2 {
                return Err(format!("the host's RMSNorm (q x scale) on row {row} by {rel:.2e}"));
            }
        }
    }
    Ok(())
}

/// The host's argmax of sampled rows of `problem` (input `x` f32 `[rows, d]` as `inputs` holds it;
/// the first of equal maxima, as the kernel breaks ties) against `got` (the indices as f32).
fn check_argmax(
    problem: &crate::tuning::RowProblem,
    inputs: &std::collections::HashMap<String, Vec<u8>>,
    got: &[f32],
) -> Result<(), String> {
    let Some(x) = problem.operands.iter().find(|o| o.name == "x") else { return Err("an argmax without x".into()) };
    let (rows, d) = (x.shape[0], x.shape[1]);
    let b = &inputs["x"];
    let value = |i: usize| f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    for row in [0, rows / 2, rows.saturating_sub(1)] {
        let mut best = 0;
        for c in 1..d {
            if value(row * d + c) > value(row * d + best) {
                best = c;
            }
        }
        if got.get(row) != Some(&(best as f32)) {
            return Err(format!("the host's argmax on row {row}: column {best}, the kernel's {:?}", got.get(row)));
        }
    }
    Ok(())
}

/// A row kernel operand's element type, as buffers name it.
fn operand_element(element: &str) -> Result<&'static str, String> {
    crate::abi::element_name(element).ok_or_else(|| format!("a row kernel operand of {element}"))
}

/// Bytes of one element of a row kernel operand.
fn row_element_bytes(element: &str) -> Result<usize, String> {
    match element {
        "f32" | "i32" => Ok(4),
        "bf16" => Ok(2),
        "i8" => Ok(1),
        other => Err(format!("a row kernel operand of {other}")),
    }
}

impl RowBench {
    fn new(problem: &crate::tuning::RowProblem, seed: u64) -> Result<RowBench, String> {
        let mut rand = Rand(0x9E37_79B9_7F4A_7C15 ^ (seed + 1));
        let (mut held, mut addrs, mut outputs, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
        let mut inputs = std::collections::HashMap::new();
        for o in &problem.operands {
            let n: usize = o.shape.iter().product();
            let size = n * row_element_bytes(&o.element)?;
            bytes += size;
            let addr = match (o.output, o.element.as_str()) {
                (true, _) => {
                    let d = DeviceBuffer::new(size.max(1), &o.name)?;
                    let addr = d.ptr;
                    held.push(d);
                    outputs.push(Buf { addr, shape: o.shape.clone(), element: operand_element(&o.element)? });
                    addr
                }
                (false, element) => {
                    let data = match element {
                        "f32" => bytes_of(&rand.floats(n, -1.0, 1.0)),
                        "bf16" => rand.operand(n, false),
                        other => return Err(format!("{}: an input of {other}", o.name)),
                    };
                    let addr = upload(&data, &o.name, &mut held)?;
                    inputs.insert(o.name.clone(), data);
                    addr
                }
            };
            addrs.push(addr);
        }
        Ok(RowBench { problem: problem.clone(), addrs, outputs, inputs, bytes, _held: held })
    }
}

/// The launch of row-kernel candidate `name` of `problem` over operands at `addrs` (its arguments'
/// order): a memref per operand, a block per row of the first — what `v3r tune` launches,
/// checkable without a GPU.
pub fn row_launch(problem: &crate::tuning::RowProblem, name: &str, addrs: &[u64]) -> Result<KernelLaunch, String> {
    if addrs.len() != problem.operands.len() {
        return Err(format!("{name}: {} operand addresses for {} operands", addrs.len(), problem.operands.len()));
    }
    let bufs: Vec<Buf> = problem
        .operands
        .iter()
        .zip(addrs)
        .map(|(o, &addr)| Ok(Buf { addr, shape: o.shape.clone(), element: operand_element(&o.element)? }))
        .collect::<Result<_, String>>()?;
    let mut params = Vec::new();
    for b in &bufs {
        params.extend(crate::abi::memref(b, b.shape.len()).map_err(|e| format!("{name}: {e}"))?);
    }
    let grid = bufs.first().and_then(|b| b.shape.first().copied()).ok_or_else(|| format!("{name}: no rows operand"))?;
    Ok(KernelLaunch { kernel: name.to_string(), grid, grid_y: 1, params, tensor_maps: Vec::new(), operands: bufs })
}

impl Bench for RowBench {
    fn launch(&self, name: &str, _sms: usize) -> Result<KernelLaunch, String> {
        row_launch(&self.problem, name, &self.addrs)
    }

    fn clear(&self) -> Result<(), String> {
        for o in &self.outputs {
            let size = o.elements() * row_element_bytes(&o.element)?;
            // SAFETY: our allocation of `size` bytes.
            unsafe { result::memset_d8_sync(o.addr, 0, size) }.map_err(cuda("zeroing the output"))?;
        }
        Ok(())
    }

    /// The outputs as f32 (e4m3 bytes decoded).
    fn output(&self) -> Result<Vec<f32>, String> {
        let mut all = Vec::new();
        for o in &self.outputs {
            let n = o.elements();
            let mut bytes = vec![0u8; n * row_element_bytes(&o.element)?];
            // SAFETY: the buffer holds these bytes (allocated for them).
            unsafe { result::memcpy_dtoh_sync(&mut bytes, o.addr) }.map_err(cuda("reading the output"))?;
            match o.element {
                "i8" => all.extend(bytes.iter().map(|&b| v3c_models::dtype::f8e4m3_to_f32(b))),
                "i32" => all.extend(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)),
                _ => all.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            }
        }
        Ok(all)
    }

    fn check_default(&self, got: &[f32], tolerance: f64) -> Result<(), String> {
        match self.problem.rmsnorm_eps {
            Some(eps) => check_rmsnorm(&self.problem, eps, &self.inputs, got, tolerance),
            None if self.problem.argmax => check_argmax(&self.problem, &self.inputs, got),
            None => Ok(()),
        }
    }

    fn tolerance(&self) -> f64 {
        if self.problem.argmax {
            // Indices: any width picks the same one.
            0.0
        } else {
            // Another tree order of the sum of squares may move an e4m3 byte by one step.
            1e-3
        }
    }

    fn rate(&self, ms: f64) -> String {
        format!("{:7.0} GB/s", self.bytes as f64 / (ms * 1e-3) / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's check of a decode output: splits over any partition of the keys (one empty),
    /// merged by their log-sum-exps, are the attention over them all; a wrong value is caught.
    /// (`v3r tune` holds the default candidate's output to it.)
    #[test]
    fn decode_splits_merge_into_the_hosts_attention() {
        for fp8_cache in [false, true] {
            let problem =
                AttentionProblem::Decode { heads: 3, kv: 128, rope: 64, fp8_cache, context: 1050, scale: 0.125 };
            let host = AttentionHost::new(problem, 2, 7, 132).unwrap();
            assert_eq!(host.splits, 3, "one per 8 of the 17 pages of 1050 keys");
            let (rows, width) = host.rows_and_width();
            assert_eq!((rows, width), (6, 128));
            let parts = [0..700, 700..700, 700..1050];
            let mut got = vec![0f32; 3 * rows * width + 3 * rows];
            for row in 0..rows {
                for (z, keys) in parts.iter().enumerate() {
                    let (out, lse) = host.attention(row, Some(keys.clone()));
                    for (c, v) in out.iter().enumerate() {
                        got[(z * rows + row) * width + c] = if keys.is_empty() { 0.0 } else { *v as f32 };
                    }
                    got[3 * rows * width + z * rows + row] = lse as f32;
                }
            }
            host.check(&got, 1e-5).unwrap();
            got[(2 * rows + rows / 2) * width + 5] += 0.5;
            let e = host.check(&got, 1e-5).unwrap_err();
            assert!(e.starts_with("the host's attention on query row 3 by"), "{e}");
        }
    }

    /// Prefill is causal: the first query sees only the first key (its output is that value), and
    /// the block table of decode names every page once.
    #[test]
    fn prefill_is_causal_and_decode_pages_are_a_permutation() {
        let problem = AttentionProblem::Prefill { heads: 2, qk: 64, v: 64, scale: 0.125, flash: FlashKind::Forward };
        let host = AttentionHost::new(problem, 5, 3, 132).unwrap();
        let (first, lse) = host.attention(5, None);
        let value: Vec<f64> = (0..64).map(|c| bf16_at(&host.values, 5 * 64 + c)).collect();
        assert_eq!(first, value, "head 1's first query");
        assert!(lse.is_finite());
        let decode =
            AttentionProblem::Decode { heads: 1, kv: 128, rope: 64, fp8_cache: false, context: 640, scale: 1.0 };
        let host = AttentionHost::new(decode, 4, 3, 132).unwrap();
        let mut pages = host.table.clone();
        pages.sort();
        assert_eq!(pages, (0..40).collect::<Vec<i32>>());
        assert_ne!(host.table, pages, "shuffled");
    }

    /// The host's RMSNorm check of a default's outputs: the reference interpreter's rows (y, and q
    /// with its scales) pass; a wrong y or a wrong scale is caught.
    #[test]
    fn rmsnorm_defaults_are_checked_against_the_host() {
        use crate::tuning::{RowOperand, RowProblem};
        let (rows, d, eps) = (5, 300, 1e-6f32);
        let operand = |name: &str, shape: Vec<usize>, element: &str, output: bool| RowOperand {
            name: name.into(),
            shape,
            element: element.into(),
            output,
        };
        let problem = RowProblem {
            operands: vec![
                operand("x", vec![rows, d], "f32", false),
                operand("w", vec![d], "bf16", false),
                operand("y", vec![rows, d], "f32", true),
                operand("q", vec![rows, d], "i8", true),
                operand("scale", vec![rows, 3], "f32", true),
            ],
            rmsnorm_eps: Some(eps),
            argmax: false,
        };
        let mut rand = Rand(3);
        let x = rand.floats(rows * d, -1.0, 1.0);
        let w = rand.operand(d, false);
        let w32: Vec<f32> = (0..d).map(|c| bf16_at(&w, c) as f32).collect();
        let inputs = [("x".to_string(), bytes_of(&x)), ("w".to_string(), w.clone())].into_iter().collect();
        let y = v3c_models::interp::kernels::rms_norm(&x, &w32, eps);
        let (q, scales) = v3c_models::interp::kernels::quantize_fp8(&y, d, 128);
        let mut got: Vec<f32> = y.clone();
        got.extend(q.iter().map(|&b| v3c_models::dtype::f8e4m3_to_f32(b)));
        got.extend(&scales);
        check_rmsnorm(&problem, eps, &inputs, &got, 1e-5).unwrap();
        let mut wrong = got.clone();
        wrong[2 * d + 7] += 1.0;
        assert!(check_rmsnorm(&problem, eps, &inputs, &wrong, 1e-5).unwrap_err().contains("(y) on row 2"));
        let mut wrong = got.clone();
        wrong[2 * rows * d + 3 * (rows - 1) + 1] *= 2.0;
        assert!(check_rmsnorm(&problem, eps, &inputs, &wrong, 1e-5).unwrap_err().contains("(q x scale) on row 4"));
    }

    /// The host's argmax of an argmax problem's sampled rows: the first of equal maxima; a wrong
    /// index is caught.
    #[test]
    fn the_argmax_default_is_checked_on_the_host() {
        let (rows, d) = (5, 300);
        let problem = crate::tuning::RowProblem {
            operands: vec![
                crate::tuning::RowOperand {
                    name: "x".into(),
                    shape: vec![rows, d],
                    element: "f32".into(),
                    output: false,
                },
                crate::tuning::RowOperand {
                    name: "idx".into(),
                    shape: vec![rows],
                    element: "i32".into(),
                    output: true,
                },
            ],
            rmsnorm_eps: None,
            argmax: true,
        };
        let mut x = Rand(5).floats(rows * d, -1.0, 1.0);
        // Row 2: its maximum twice (the first counts).
        x[2 * d + 40] = 2.0;
        x[2 * d + 90] = 2.0;
        let inputs = [("x".to_string(), bytes_of(&x))].into_iter().collect();
        let best = |r: usize| (0..d).fold(0, |b, c| if x[r * d + c] > x[r * d + b] { c } else { b }) as f32;
        let got: Vec<f32> = (0..rows).map(best).collect();
        assert_eq!(got[2], 40.0);
        check_argmax(&problem, &inputs, &got).unwrap();
        let mut wrong = got.clone();
        wrong[2] = 90.0;
        assert!(check_argmax(&problem, &inputs, &wrong).unwrap_err().contains("on row 2: column 40"));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T", "{t}");
        assert!(t.as_str() >= "2026-01-01T00:00:00Z", "{t}");
    }
}
