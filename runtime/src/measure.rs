//! `v3r tune`: the GPU half of the split tuning flow. Measures the GEMM candidates `v3c tune
//! --emit-candidates DIR` compiled and merges the timings into a tuning database
//! ([`crate::tuning::TuningDb`]) that `v3c compile --tuning` reads.
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

use crate::abi::{Buf, GemmAbi, GemmOperands, GemmProblem, Param};
use crate::cuda::{cuda, encode, open_device, DeviceBuffer};
use crate::tuning::{route, Candidates, DbEntry, Problem, TuningDb};

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
                part += f64::from(self.element(&self.a, a_row, c)) * f64::from(self.element(&self.b, b_row, c));
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

fn download(ptr: u64, n: usize, what: &str) -> Result<Vec<f32>, String> {
    let mut bytes = vec![0u8; 4 * n];
    // SAFETY: the buffer holds `n` f32 (allocated for it).
    unsafe { result::memcpy_dtoh_sync(&mut bytes, ptr) }.map_err(cuda(what))?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Measures every problem of `dir`'s candidate set on device `ordinal` and merges the entries into
/// the database at `out` (created when absent), skipping problems it already holds for this GPU,
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
    let abi_of = |name: &str| -> Result<GemmAbi, String> {
        problem
            .candidates
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.abi.clone())
            .ok_or_else(|| format!("no candidate {name}"))
    };
    let default = abi_of(&problem.default)?;
    let fp8 = default.input == "fp8";
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
    let buf = |addr: u64, shape: Vec<usize>, element: &str| Buf { addr, shape, element: element.into() };
    let a = buf(upload(&ops.a, "A", &mut held)?, vec![a_rows, k], in_el);
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
    let out = DeviceBuffer::new(4 * out_rows * n_out, "the output")?;
    let out_buf = buf(out.ptr, vec![out_rows, n_out], "f32");
    let problem_size = GemmProblem { m: rows, n, k, groups };
    let mut scratch = crate::abi::SplitScratch::default();
    for c in &problem.candidates {
        let s = c.abi.as_ref().map(|a| a.scratch(problem_size, sms)).unwrap_or_default();
        scratch.workspace_bytes = scratch.workspace_bytes.max(s.workspace_bytes);
        scratch.counters = scratch.counters.max(s.counters);
    }
    let workspace = DeviceBuffer::new(scratch.workspace_bytes, "the split-K workspace")?;
    let counters = DeviceBuffer::new(4 * scratch.counters, "the split-K counters")?;
    // SAFETY: allocations just made; the kernels expect zero counters.
    unsafe { result::memset_d8_sync(counters.ptr, 0, counters.bytes) }.map_err(cuda("zeroing counters"))?;
    let maps = DeviceBuffer::new(256, "tensor maps")?;
    ops.device = held;

    let mut order: Vec<&str> = vec![problem.default.as_str()];
    order.extend(problem.candidates.iter().map(|c| c.name.as_str()).filter(|n| *n != problem.default));
    let (mut timings, mut rejected) = (Vec::new(), Vec::new());
    let mut reference: Vec<f32> = Vec::new();
    let tolerance = if fp8 { 1e-3 } else { 1e-2 };
    for name in order {
        let c = problem.candidates.iter().find(|c| c.name == name).ok_or("candidate vanished")?;
        let abi = abi_of(name)?;
        let operands = GemmOperands {
            a: &a,
            a_scale: fp8.then_some(&a_scale),
            b: &b,
            b_scale: fp8.then_some(&b_scale),
            out: &out_buf,
            residual: residual.as_ref(),
            offsets: offsets.as_ref(),
            perm: perm.as_ref(),
            row_scale: Some(&row_scale),
            workspace: Some(workspace.ptr),
            counters: Some(counters.ptr),
        };
        let launch = abi.launch(name, &operands, sms)?;
        let mut encoded = Vec::new();
        for t in &launch.tensor_maps {
            encoded.extend(encode(t)?);
        }
        // SAFETY: two 128-byte maps into a 256-byte buffer.
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
        if c.dynamic_shared_memory_bytes > 48 * 1024 {
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
                    (launch.grid as u32, 1, 1),
                    (c.threads as u32, 1, 1),
                    c.dynamic_shared_memory_bytes as u32,
                    stream,
                    &mut pointers,
                )
            }
            .map_err(cuda(&format!("{name}: cuLaunchKernel")))
        };
        // Correctness first: a zeroed output (scatter adds into it), one launch.
        // SAFETY: our allocation and stream.
        unsafe {
            result::memset_d8_sync(out.ptr, 0, out.bytes).map_err(cuda("zeroing the output"))?;
        }
        run(&mut values)?;
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(stream) }.map_err(cuda(&format!("{name}: running")))?;
        let got = download(out.ptr, out_rows * n_out, "reading the output")?;
        if reference.is_empty() {
            // The default against the host's product on a few rows.
            for row in [0, out_rows / 2, out_rows.saturating_sub(1)] {
                let want = ops.expected_row(&abi, row, n_out);
                let (mut diff, mut norm) = (0f64, 0f64);
                for (c, w) in want.iter().enumerate() {
                    diff += (f64::from(got[row * n_out + c]) - w).powi(2);
                    norm += w * w;
                }
                let rel = (diff / norm.max(1e-30)).sqrt();
                if rel.is_nan() || rel > tolerance {
                    return Err(format!(
                        "{name} (the default) differs from the host's product on row {row} by {rel:.2e}"
                    ));
                }
            }
            reference = got;
        } else {
            let (mut diff, mut norm) = (0f64, 0f64);
            for (x, r) in got.iter().zip(&reference) {
                diff += (f64::from(*x) - f64::from(*r)).powi(2);
                norm += f64::from(*r).powi(2);
            }
            let rel = (diff / norm.max(1e-30)).sqrt();
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
        let tflops = 2.0 * rows as f64 * n as f64 * k as f64 / (ms * 1e-3) / 1e12;
        let estimate = c
            .estimate_us
            .map_or(String::new(), |e| format!("  (cost model {e:.1} us, measured/estimate {:.2})", ms * 1e3 / e));
        report(&format!("{:40} M {m:5}  {name:52} {ms:9.4} ms  {tflops:7.1} TFLOP/s{estimate}", problem.kernel));
        timings.push((name.to_string(), ms));
    }
    timings.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((timings, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T", "{t}");
        assert!(t.as_str() >= "2026-01-01T00:00:00Z", "{t}");
    }
}
