//! A fused kernel's sm_90a row-kernel launches run on the host: each launch's row kernels through
//! their CPU lowering (the same template, JIT-compiled), its operands viewed as the runtime views
//! them (an argument of lower rank than its buffer sees the leading dims collapsed), temporaries
//! and the RoPE table allocated as the runtime allocates them. How the lowering of whole entries
//! (e.g. the training step) is checked against the CPU backend without a GPU. A GEMM template
//! launch (dense bf16 or fp8, no grouping) is computed from its operands as its semantics say (the
//! reference's block-scaled order), not as the kernel's instructions would: [`crate::emulate`]
//! and the device checks cover the template itself.

use std::collections::HashMap;

use melior::ir::operation::OperationRef;
use melior::{Context, ExecutionEngine};
use v3c_runtime::host::{call_packed, HostBuffer, HostData, RawBuffer};
use v3c_runtime::lowering::Regime;

use super::gemm::GemmInput;
use super::lower::{self, Operand, RopeTable, StepKernel, Steps};
use super::rows::RowKernel;

/// Row kernels JIT-compiled for the host, by name.
pub struct HostRows<'c> {
    context: &'c Context,
    engines: HashMap<String, ExecutionEngine>,
    /// A training step's attention through the flash kernels
    /// ([`super::lower_train::flash_attention_steps`], as `--prefill-attention tensor-cores`
    /// compiles it) rather than the CUDA-core rows, and its f32 matmuls on the tensor cores in
    /// either recipe ([`super::lower_train::bf16_matmul_steps`]).
    pub flash_attention: bool,
    /// The regime whose launches run ([`lower::Step::only`]): a training step's, prefill's, unless
    /// told decode's.
    pub regime: Regime,
}

impl<'c> HostRows<'c> {
    pub fn new(context: &'c Context) -> HostRows<'c> {
        HostRows { context, engines: HashMap::new(), flash_attention: false, regime: Regime::Prefill }
    }

    /// Runs `fused` (a `fused`-stage kernel) through its sm_90a lowering on `ins`, writing `outs`
    /// (allocated by the caller in the kernel's result shapes); `rows` sizes the temporaries (the
    /// runtime's rows) and the RoPE table covers positions `0..rows`. `Ok(false)`: the kernel has
    /// no sm_90a lowering made only of row kernels.
    pub fn run_fused(
        &mut self,
        fused: &OperationRef,
        rows: usize,
        ins: &[&HostBuffer],
        outs: &mut [HostBuffer],
    ) -> Result<bool, String> {
        let flash = self
            .flash_attention
            .then(|| {
                super::lower_train::flash_attention_steps(fused)
                    .or_else(|| super::lower_train::bf16_matmul_steps(fused))
            })
            .flatten();
        if let Some(steps) = flash {
            return self.run_steps(&steps?, rows, ins, outs).map(|_| true);
        }
        let steps = match (lower::row_of_kernel(fused), lower::steps_of_kernel(fused)) {
            (Ok(row), _) => Steps {
                steps: vec![lower::Step { only: None, kernel: StepKernel::Row(row.kernel), operands: row.operands }],
                temps: Vec::new(),
                rope_table: row.rope_table,
            },
            (_, Ok(steps)) => steps,
            _ => return Ok(false),
        };
        if steps.steps.iter().any(|s| matches!(&s.kernel, StepKernel::Gemm(g) if !computed(g))) {
            return Ok(false);
        }
        self.run_steps(&steps, rows, ins, outs).map(|_| true)
    }

    /// Runs `steps` (GEMMs over one B operand only) on `ins` into `outs` as [`HostRows::run_fused`]
    /// does, and returns the temporaries as the launches left them.
    pub fn run_steps(
        &mut self,
        steps: &Steps,
        rows: usize,
        ins: &[&HostBuffer],
        outs: &mut [HostBuffer],
    ) -> Result<Vec<HostBuffer>, String> {
        if let Some(g) = steps.steps.iter().find_map(|s| match &s.kernel {
            StepKernel::Gemm(g) if !computed(g) => Some(g),
            _ => None,
        }) {
            return Err(format!("{}: a GEMM over weights laid out at load (not computed on the host)", g.kernel));
        }
        let mut temps: Vec<HostBuffer> = steps
            .temps
            .iter()
            .map(|t| {
                let arg = |i: usize| ins.get(i).map(|b| b.shape.clone()).ok_or_else(|| format!("argument {i} missing"));
                // (An H200's SMs: the splits of decode attention, where there are any.)
                let shape = t.spec().shape(rows, &arg, 132)?;
                let n = shape.iter().product();
                let data = match t.element.as_str() {
                    "f32" => Ok(HostData::F32(vec![0.0; n])),
                    "i32" => Ok(HostData::I32(vec![0; n])),
                    // e4m3 NaNs: a launch reading bytes no launch before it wrote shows.
                    "f8E4M3FN" => Ok(HostData::F8(vec![0x7f; n])),
                    "bf16" => Ok(HostData::Bf16(vec![0; n])),
                    other => Err(format!("a temporary of {other}")),
                }?;
                Ok(HostBuffer { shape, data })
            })
            .collect::<Result<_, String>>()?;
        let mut table = steps.rope_table.as_ref().map(|t| rope_table(t, rows));
        let regime = self.regime;
        for step in steps.steps.iter().filter(|s| s.runs_in(regime)) {
            let ranks = match &step.kernel {
                StepKernel::Row(kernel) => kernel.argument_ranks(),
                // A, its scales, B, its scales, (the residual,) the output: matrices; grouped, the
                // offsets, the sorted rows' tokens and row scales: vectors. q, k, v, out.
                StepKernel::Gemm(g) => {
                    let mut ranks = vec![2; step.operands.len()];
                    if let Some(gr) = &g.grouped {
                        for i in [Some(gr.offsets), Some(gr.perm), gr.row_scale].into_iter().flatten() {
                            ranks[i] = 1;
                        }
                    }
                    if let Some(r) = g.k_range {
                        ranks[r.operand] = 1;
                    }
                    ranks
                }
                // q, k, v, out (, lse); the gradients' q, k, v, dout, lse, D, out.
                StepKernel::MlaPrefill(a) => match a.config.mode {
                    super::mla::FlashMode::Forward => vec![2; 4],
                    super::mla::FlashMode::Lse => vec![2, 2, 2, 2, 1],
                    super::mla::FlashMode::Grad(_) => vec![2, 2, 2, 2, 1, 1, 2],
                },
                // q, keys (decode: each query's cache rows, [T, S, C]), selection, split outputs, lse
                // (the selected rows').
                StepKernel::MlaDecode(a) if a.config.selected => {
                    let keys = match step.operands.get(1) {
                        Some(Operand::Arg(i)) => ins.get(*i).map_or(2, |b| b.shape.len()),
                        _ => 2,
                    };
                    vec![2, keys.clamp(2, 3), 2, 3, 2]
                }
                // q, cache, table, lengths, split outputs, lse.
                StepKernel::MlaDecode(_) => vec![2, 2, 2, 1, 3, 2],
            };
            let mut raw = Vec::new();
            for (operand, rank) in step.operands.iter().zip(ranks) {
                let buffer = match *operand {
                    Operand::Arg(i) => ins[i].raw_const(),
                    Operand::Result(i) => outs[i].raw(),
                    Operand::Temp(i) => temps[i].raw(),
                    Operand::TempRows { temp, first, rows } => {
                        let t = temps[temp].raw();
                        let (all, cols) = (t.shape[0], t.shape[1]);
                        if first + rows > all {
                            return Err(format!("rows {first}..{} of a temporary of {all}", first + rows));
                        }
                        let bytes = v3c_runtime::plan::element_bytes(&t.element)
                            .ok_or_else(|| format!("a temporary of {}", t.element))?
                            as usize;
                        // SAFETY: the rows are inside the temporary (checked above).
                        let ptr = unsafe { (t.ptr as *mut u8).add(first * cols * bytes) } as *mut ();
                        RawBuffer { ptr, shape: vec![rows, cols], element: t.element }
                    }
                    Operand::TempRowsOf { temp, arg } => {
                        let t = temps[temp].raw();
                        let x = ins.get(arg).ok_or_else(|| format!("argument {arg} missing"))?;
                        let seen = v3c_runtime::abi::Buf { addr: 0, shape: x.shape.clone(), element: "" };
                        let rows = seen.shape_at_rank(2)?[0];
                        if rows > t.shape[0] {
                            return Err(format!("{rows} rows of a temporary of {}", t.shape[0]));
                        }
                        RawBuffer { shape: vec![rows, t.shape[1]], ..t }
                    }
                    Operand::RopeTable => table.as_mut().ok_or("a RoPE operand without a table")?.raw(),
                };
                // Seen at the argument's rank as the runtime sees it (its own rule).
                let seen = v3c_runtime::abi::Buf { addr: 0, shape: buffer.shape.clone(), element: "" }
                    .shape_at_rank(rank)
                    .map_err(|e| format!("step {:?}: {e}", step.operands))?;
                raw.push(RawBuffer { shape: seen, ..buffer });
            }
            match &step.kernel {
                StepKernel::Row(kernel) => self.launch(kernel, &raw)?,
                // SAFETY: the views are the buffers' own shapes (checked by shape_at_rank).
                StepKernel::Gemm(g) => unsafe { gemm(g, &raw)? },
                // SAFETY: as above.
                StepKernel::MlaPrefill(a) => unsafe {
                    match a.config.mode {
                        super::mla::FlashMode::Grad(of) => mla_grad(of, a.heads, a.scale, &raw)?,
                        _ => mla_prefill(a.heads, a.scale, &raw)?,
                    }
                },
                // SAFETY: as above.
                StepKernel::MlaDecode(a) => unsafe {
                    match a.config.selected {
                        true => mla_decode_selected(a.heads, a.scale, &raw)?,
                        false => mla_decode(a.heads, a.scale, &raw)?,
                    }
                },
            }
        }
        Ok(temps)
    }

    fn launch(&mut self, kernel: &RowKernel, buffers: &[RawBuffer]) -> Result<(), String> {
        let name = kernel.kernel_name();
        if !self.engines.contains_key(&name) {
            let text = kernel.emit_cpu()?;
            let module = crate::conversion::v3_to_cpu::lower_to_llvm(self.context, &text, &name)?;
            self.engines.insert(name.clone(), ExecutionEngine::new(&module, 2, &[], false, false));
        }
        let engine = &self.engines[&name];
        let mut failed = None;
        // SAFETY: the buffers are viewed in the shapes the lowering gives the kernel's arguments
        // (contiguous, leading dims collapsed) and outlive the call; row kernels index within the
        // dims they are passed.
        unsafe {
            call_packed(buffers, false, 0, 1, |args| failed = engine.invoke_packed(&name, args).err());
        }
        failed.map_or(Ok(()), |e| Err(format!("{name}: {e}")))
    }
}

/// Whether [`HostRows::run_steps`] computes GEMM `g`: one B operand (dense, or grouped over a B
/// the steps stacked), not weights laid out at load.
fn computed(g: &lower::GemmKernel) -> bool {
    g.weights.len() == 1 && g.grouped.as_ref().is_none_or(|gr| gr.weights.is_empty() && !gr.scatter)
}

/// `out = A . B^T` of a GEMM step, f32 out plus the residual when it has one: bf16, the products
/// summed in order; fp8 (A `[M, K]` e4m3 with 1x128 scales, B `[N, K]` with 128x128 block scales —
/// Wgrad's form and grouped GEMMs over stacked B: per row, 1x128 as A's), per 128-wide K block the
/// e4m3 products summed in order, then scaled by A's and B's scales, as the reference's
/// `matmul_fp8`. Grouped: sorted row r of group e (`offsets`) reads A row `perm[r]` (gathered) or r,
/// B rows `e * N..`, times its row scale. A K range from the device ([`lower::KRange`]): the K
/// blocks from the one holding its start to the one holding its last column. A second A
/// ([`lower::GemmKernel::a2`]): each product `a b + a2 b`.
///
/// # Safety
/// The buffers address their shapes' elements.
unsafe fn gemm(g: &lower::GemmKernel, bufs: &[RawBuffer]) -> Result<(), String> {
    use v3c_models::dtype::{bf16_to_f32, f8e4m3_to_f32};
    let at = |i: usize| bufs.get(i).ok_or_else(|| format!("{}: operand {i} missing", g.kernel));
    let (a, b) = (at(g.a)?, at(g.weights[0].0)?);
    let out = bufs.last().ok_or("a GEMM without output")?;
    let ints = |buf: &RawBuffer| std::slice::from_raw_parts(buf.ptr as *const i32, buf.shape.iter().product());
    let floats = |buf: &RawBuffer| std::slice::from_raw_parts(buf.ptr as *const f32, buf.shape.iter().product());
    // Per output row written: (its row, A's row, B's first row, row scale).
    let mut rows: Vec<(usize, usize, usize, f32)> = Vec::new();
    let n = match &g.grouped {
        None => {
            // The rows both have: a kernel's buffers may hold more rows than its values (the MTP
            // module's T - 1 in buffers of T; on the device every such buffer has the run's rows).
            rows.extend((0..a.shape[0].min(out.shape[0])).map(|i| (i, i, 0, 1.0)));
            b.shape[0]
        }
        Some(gr) => {
            let (offsets, perm) = (ints(at(gr.offsets)?), ints(at(gr.perm)?));
            let weights = gr.row_scale.map(|i| at(i).map(floats)).transpose()?;
            let groups = offsets.len().saturating_sub(1);
            if groups == 0 || b.shape[0] % groups != 0 {
                return Err(format!("{}: B {:?} over {groups} groups", g.kernel, b.shape));
            }
            let n = b.shape[0] / groups;
            for e in 0..groups {
                for r in offsets[e] as usize..offsets[e + 1] as usize {
                    let arow = if gr.grouping == super::gemm::GemmGrouping::Gather { perm[r] as usize } else { r };
                    rows.push((r, arow, e * n, weights.map_or(1.0, |w| w[r])));
                }
            }
            n
        }
    };
    let k = a.shape[1];
    let bad_row = rows.iter().any(|&(r, arow, _, _)| arow >= a.shape[0] || r >= out.shape[0]);
    if b.shape[1] != k || out.shape.len() != 2 || out.shape[1] != n || bad_row {
        return Err(format!("{}: A {:?}, B {:?}, out {:?}", g.kernel, a.shape, b.shape, out.shape));
    }
    let values = |buf: &RawBuffer| -> Vec<f32> {
        let n = buf.shape.iter().product();
        if g.input == GemmInput::Fp8 {
            std::slice::from_raw_parts(buf.ptr as *const u8, n).iter().map(|&v| f8e4m3_to_f32(v)).collect()
        } else {
            std::slice::from_raw_parts(buf.ptr as *const u16, n).iter().map(|&v| bf16_to_f32(v)).collect()
        }
    };
    let (av, bv) = (values(a), values(b));
    let a2v = match g.a2.map(at).transpose()? {
        Some(a2) if a2.shape != a.shape => {
            return Err(format!("{}: A {:?} but the second A {:?}", g.kernel, a.shape, a2.shape));
        }
        a2 => a2.map(values),
    };
    let residual = g.residual.map(|r| at(r).map(|r| floats(r).to_vec())).transpose()?;
    // Scales (fp8): A's per row and 128 columns; B's per 128x128 block, or (Wgrad's form) per row.
    let scales = match (g.a_scale, g.weights[0].1) {
        (Some(sa), Some(sb)) if g.input == GemmInput::Fp8 => Some((at(sa)?, at(sb)?)),
        _ if g.input == GemmInput::Fp8 => return Err(format!("{}: an fp8 GEMM without its scales", g.kernel)),
        _ => None,
    };
    let per_row = g.fixed_m.is_some() || g.grouped.as_ref().is_some_and(|gr| gr.b_row_scales);
    let b_row = |j: usize| if per_row { j } else { j / 128 };
    // A bf16 output: each value rounded to nearest even (no residual on the host).
    let bf16_out = g.output == super::gemm::GemmOutput::Bf16;
    if bf16_out && residual.is_some() {
        return Err(format!("{}: a bf16 output with a residual (not computed on the host)", g.kernel));
    }
    let group = if scales.is_some() { 128 } else { k.max(1) };
    let blocks = match g.k_range {
        Some(r) => {
            let range = ints(at(r.operand)?);
            let &[start, end] = range else { return Err(format!("{}: a K range of {range:?}", g.kernel)) };
            let (start, end) = (start.max(0) as usize, (end.max(start)) as usize);
            start / group..end.div_ceil(group).min(k.div_ceil(group))
        }
        None => 0..k.div_ceil(group),
    };
    // The output's elements (each row written is inside it: checked above).
    let outputs = out.shape.iter().product();
    let (out_f32, out_bf16) = if bf16_out {
        (&mut [][..], std::slice::from_raw_parts_mut(out.ptr as *mut u16, outputs))
    } else {
        (std::slice::from_raw_parts_mut(out.ptr as *mut f32, outputs), &mut [][..])
    };
    for &(r, i, brow, weight) in &rows {
        for col in 0..n {
            let j = brow + col;
            let mut acc = 0.0f32;
            for block in blocks.clone() {
                let partial: f32 = (block * group..((block + 1) * group).min(k))
                    .map(|c| {
                        let b = bv[j * k + c];
                        av[i * k + c] * b + a2v.as_ref().map_or(0.0, |a2| a2[i * k + c] * b)
                    })
                    .sum();
                acc += match scales {
                    Some((sa, sb)) => {
                        partial * floats(sa)[i * sa.shape[1] + block] * floats(sb)[b_row(j) * sb.shape[1] + block]
                    }
                    None => partial,
                };
            }
            let value = residual.as_ref().map_or(acc * weight, |res| res[r * n + col] + acc);
            if bf16_out {
                out_bf16[r * n + col] = v3c_models::dtype::f32_to_bf16(value);
            } else {
                out_f32[r * n + col] = value;
            }
        }
    }
    Ok(())
}

/// The prefill attention kernel's semantics over `[q, k, v, out]` (head-major: q `[H T, qk]`, k
/// `[H S, qk]`, v `[H S, dv]` bf16, out `[H T, dv]` f32): per head, query t sees keys
/// `0..=S - T + t`; scores `q . k` in f32 times `scale`, softmax with P rounded to bf16 before
/// `P V` (as the kernel feeds the tensor cores) over the unrounded sum. Sums in key order, not the
/// kernel's: [`crate::emulate`] and the device checks hold the two within bf16's rounding.
///
/// # Safety
/// The buffers address their shapes' elements.
pub unsafe fn mla_prefill(heads: usize, scale: f32, bufs: &[RawBuffer]) -> Result<(), String> {
    let (q, k, v, out, lse) = match bufs {
        [q, k, v, out] => (q, k, v, out, None),
        [q, k, v, out, lse] => (q, k, v, out, Some(lse)),
        _ => return Err(format!("prefill attention of {} operands", bufs.len())),
    };
    let (qk, dv) = (q.shape[1], v.shape[1]);
    let heads = heads.max(1);
    let (t_len, s_len) = (q.shape[0] / heads, k.shape[0] / heads);
    if k.shape[1] != qk || v.shape[0] != k.shape[0] || out.shape != [q.shape[0], dv] || t_len > s_len {
        return Err(format!(
            "prefill attention of q {:?}, k {:?}, v {:?}, out {:?} ({heads} heads)",
            q.shape, k.shape, v.shape, out.shape
        ));
    }
    if lse.is_some_and(|l| l.shape.iter().product::<usize>() != q.shape[0]) {
        return Err(format!("prefill attention's log-sum-exps {:?} for {} query rows", lse.unwrap().shape, q.shape[0]));
    }
    let (qv, kv, vv) = (bf16_values(q), bf16_values(k), bf16_values(v));
    let o = std::slice::from_raw_parts_mut(out.ptr as *mut f32, q.shape[0] * dv);
    let mut lse = lse.map(|l| std::slice::from_raw_parts_mut(l.ptr as *mut f32, q.shape[0]));
    let mut p = vec![0f32; s_len];
    for h in 0..heads {
        for t in 0..t_len {
            let query = &qv[(h * t_len + t) * qk..][..qk];
            let seen = s_len - t_len + t + 1;
            for (j, pj) in p.iter_mut().enumerate().take(seen) {
                let key = &kv[(h * s_len + j) * qk..][..qk];
                *pj = query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let row = &mut o[(h * t_len + t) * dv..][..dv];
            let (max, sum) = softmax_pv(&mut p[..seen], |j| &vv[(h * s_len + j) * dv..][..dv], row);
            if let Some(lse) = lse.as_deref_mut() {
                // Base 2: what the backward subtracts from its scores scaled by log2(e).
                lse[h * t_len + t] = (max + sum.ln()) * std::f32::consts::LOG2_E;
            }
        }
    }
    Ok(())
}

/// A bf16 buffer's values as f32.
///
/// # Safety
/// The buffer addresses its shape's elements.
unsafe fn bf16_values(b: &RawBuffer) -> Vec<f32> {
    let n = b.shape.iter().product();
    std::slice::from_raw_parts(b.ptr as *const u16, n).iter().map(|&x| v3c_models::dtype::bf16_to_f32(x)).collect()
}

/// The flash-attention gradient kernels' semantics ([`super::mla::GradOf`]) over `[q, k, v, dout,
/// lse, D, out]` (head-major as [`mla_prefill`]'s, dout `[H T, dv]` bf16, lse (base 2) and D `[H
/// T]` f32): per head, query t sees keys `0..=S - T + t`; `P = 2^(scale log2(e) q.k - lse)`, `dP =
/// dout . v`, `dS = P (dP - D)`; dV `[H S, dv]` = `sum_t bf16(P) dout`, dQ `[H T, qk]` = `scale
/// sum_j bf16(dS) k`, dK `[H S, qk]` = `scale sum_t bf16(dS) q` — P and dS rounded to bf16 as the
/// kernels feed the tensor cores; sums in index order, not the kernels'.
///
/// # Safety
/// The buffers address their shapes' elements.
pub unsafe fn mla_grad(of: super::mla::GradOf, heads: usize, scale: f32, bufs: &[RawBuffer]) -> Result<(), String> {
    use super::mla::GradOf;
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
    let [q, k, v, dout, lse, dd, out] = bufs else {
        return Err(format!("attention gradient of {} operands", bufs.len()));
    };
    let (qk, dv) = (q.shape[1], v.shape[1]);
    let heads = heads.max(1);
    let (t_len, s_len) = (q.shape[0] / heads, k.shape[0] / heads);
    let own = if of == GradOf::Queries { q.shape[0] } else { k.shape[0] };
    let width = if of == GradOf::Values { dv } else { qk };
    let stats = |b: &RawBuffer| b.shape.iter().product::<usize>() == q.shape[0];
    if k.shape[1] != qk
        || v.shape[0] != k.shape[0]
        || dout.shape != [q.shape[0], dv]
        || t_len > s_len
        || !stats(lse)
        || !stats(dd)
        || out.shape != [own, width]
    {
        return Err(format!(
            "attention gradient of q {:?}, k {:?}, v {:?}, dout {:?}, lse {:?}, D {:?}, out {:?} ({heads} heads)",
            q.shape, k.shape, v.shape, dout.shape, lse.shape, dd.shape, out.shape
        ));
    }
    let (qv, kv, vv, gv) = (bf16_values(q), bf16_values(k), bf16_values(v), bf16_values(dout));
    let (lse, dd) = (
        std::slice::from_raw_parts(lse.ptr as *const f32, q.shape[0]),
        std::slice::from_raw_parts(dd.ptr as *const f32, q.shape[0]),
    );
    let o = std::slice::from_raw_parts_mut(out.ptr as *mut f32, own * width);
    o.fill(0.0);
    let round = |x: f32| bf16_to_f32(f32_to_bf16(x));
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    for h in 0..heads {
        for t in 0..t_len {
            let row = h * t_len + t;
            let (query, grad) = (&qv[row * qk..][..qk], &gv[row * dv..][..dv]);
            for j in 0..=(s_len - t_len + t) {
                let key_row = h * s_len + j;
                let (key, value) = (&kv[key_row * qk..][..qk], &vv[key_row * dv..][..dv]);
                // The kernel's exponent: one fused multiply-add.
                let p = dot(query, key).mul_add(scale_log2, -lse[row]).exp2();
                let (target, from, factor) = match of {
                    GradOf::Values => (key_row, grad, round(p)),
                    GradOf::Queries => (row, key, round(p * (dot(grad, value) - dd[row]))),
                    GradOf::Keys => (key_row, query, round(p * (dot(grad, value) - dd[row]))),
                };
                o[target * width..][..width].iter_mut().zip(from).for_each(|(x, &y)| *x += factor * y);
            }
        }
    }
    if of != GradOf::Values {
        o.iter_mut().for_each(|x| *x *= scale);
    }
    Ok(())
}

/// The decode attention kernel's semantics over `[q, cache, table, seqlens, o_part, lse]` (see
/// [`super::mla::emit`]): sequence b's R = `q rows / B` rows are its tokens' heads (T = R / heads
/// tokens; token t sees the keys before `len - T + t + 1`), key j lives at cache row `table[b, j /
/// 64] * 64 + j mod 64`; its pages are cut into `o_part`'s Z splits (`ceil(pages / Z)` each), and
/// each split writes its softmax-normalized `P V` (scores `q . k` over all columns times `scale`, P
/// rounded to bf16 before `P V`, the values the first `kv` columns) and its natural-log lse (`-inf`
/// and zeros for a row the split gives no key).
///
/// # Safety
/// The buffers address their shapes' elements.
pub unsafe fn mla_decode(heads: usize, scale: f32, bufs: &[RawBuffer]) -> Result<(), String> {
    use v3c_models::dtype::bf16_to_f32;
    let [q, cache, table, seqlens, o_part, lse] = bufs else {
        return Err(format!("decode attention of {} operands", bufs.len()));
    };
    let bf16 = |b: &RawBuffer| -> Vec<f32> {
        let n = b.shape.iter().product();
        std::slice::from_raw_parts(b.ptr as *const u16, n).iter().map(|&x| bf16_to_f32(x)).collect()
    };
    let ints = |b: &RawBuffer| std::slice::from_raw_parts(b.ptr as *const i32, b.shape.iter().product());
    let (width, b_count) = (q.shape[1], seqlens.shape.iter().product::<usize>());
    let (splits, kv) = (o_part.shape[0], o_part.shape[2]);
    let heads = heads.max(1);
    let rows = q.shape[0] / b_count.max(1);
    let tokens = rows / heads;
    let max_pages = table.shape[1];
    let (qv, cv, tv, lens) = (bf16(q), bf16(cache), ints(table), ints(seqlens));
    let o = std::slice::from_raw_parts_mut(o_part.ptr as *mut f32, o_part.shape.iter().product());
    let l_out = std::slice::from_raw_parts_mut(lse.ptr as *mut f32, lse.shape.iter().product());
    let all = q.shape[0];
    for b in 0..b_count {
        let len = lens[b].max(0) as usize;
        let pages = len.div_ceil(64);
        let per = pages.div_ceil(splits.max(1));
        for r in 0..rows {
            let row = b * rows + r;
            let query = &qv[row * width..][..width];
            let visible = (len + r / heads + 1).saturating_sub(tokens);
            for z in 0..splits {
                let (k0, k1) = ((z * per * 64).min(len), ((z + 1) * per * 64).min(len).min(visible));
                let out = &mut o[(z * all + row) * kv..][..kv];
                out.fill(0.0);
                if k0 >= k1 {
                    l_out[z * all + row] = f32::NEG_INFINITY;
                    continue;
                }
                let key_row = |j: usize| -> Result<usize, String> {
                    let page = *tv.get(b * max_pages + j / 64).ok_or("a block table too short")?;
                    let at = page.max(0) as usize * 64 + j % 64;
                    (at < cache.shape[0]).then_some(at).ok_or_else(|| format!("page {page} past the cache"))
                };
                let key_rows: Vec<usize> = (k0..k1).map(key_row).collect::<Result<_, _>>()?;
                let mut s: Vec<f32> = key_rows
                    .iter()
                    .map(|&r| query.iter().zip(&cv[r * width..][..width]).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let (m, l) = softmax_pv(&mut s, |i| &cv[key_rows[i] * width..][..kv], out);
                l_out[z * all + row] = m + l.ln();
            }
        }
    }
    Ok(())
}

/// What the attention over each query's selected rows computes ([`super::mla::MlaDecodeConfig::selected`])
/// over `[q, keys, selected, o_part, lse]`: query t's rows (its `heads` rows of q) see the key rows
/// its row of the selection names before the first -1 (f32 rows rounded to bf16, as the kernel
/// gathers them, or bf16 rows; keys `[T, S, C]`: its own S rows), split into the splits' runs of
/// 64-key pages as [`mla_decode`]'s pages.
///
/// # Safety
/// The buffers address their shapes' elements.
pub unsafe fn mla_decode_selected(heads: usize, scale: f32, bufs: &[RawBuffer]) -> Result<(), String> {
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
    let [q, keys, selected, o_part, lse] = bufs else {
        return Err(format!("attention over selected rows of {} operands", bufs.len()));
    };
    let (width, cols) = (q.shape[1], keys.shape[keys.shape.len() - 1]);
    let (t_count, k_width) = (selected.shape[0], selected.shape[1]);
    let (key_rows, seq_rows) = match keys.shape[..] {
        [b, s, _] if b >= t_count => (b * s, s),
        [rows, _] => (rows, 0),
        _ => return Err(format!("keys {:?} for {t_count} queries", keys.shape)),
    };
    let (splits, kv) = (o_part.shape[0], o_part.shape[2]);
    let heads = heads.max(1);
    if q.shape[0] != t_count * heads || width > cols {
        return Err(format!("q {:?}, keys {:?}, selection {:?}", q.shape, keys.shape, selected.shape));
    }
    let qv: Vec<f32> =
        std::slice::from_raw_parts(q.ptr as *const u16, q.shape[0] * width).iter().map(|&x| bf16_to_f32(x)).collect();
    if !matches!(keys.element.as_str(), "bf16" | "f32") {
        return Err(format!("keys of {}", keys.element));
    }
    // A key row's value: bf16 rows as they are, f32 rows rounded to bf16 (as the kernel gathers them).
    let key = |at: usize| match keys.element.as_str() {
        "bf16" => bf16_to_f32(*(keys.ptr as *const u16).add(at)),
        _ => bf16_to_f32(f32_to_bf16(*(keys.ptr as *const f32).add(at))),
    };
    let sel = std::slice::from_raw_parts(selected.ptr as *const i32, t_count * k_width);
    let o = std::slice::from_raw_parts_mut(o_part.ptr as *mut f32, o_part.shape.iter().product());
    let l_out = std::slice::from_raw_parts_mut(lse.ptr as *mut f32, lse.shape.iter().product());
    let all = q.shape[0];
    for t in 0..t_count {
        let row_sel = &sel[t * k_width..][..k_width];
        let len = row_sel.iter().position(|&k| k < 0).unwrap_or(k_width);
        let mut rows = Vec::with_capacity(len * width);
        for &k in &row_sel[..len] {
            let (k, own) = (k as usize, if seq_rows > 0 { seq_rows } else { key_rows });
            if k >= own {
                return Err(format!("query {t} selects row {k} of {own}"));
            }
            let at = t * seq_rows + k;
            rows.extend((0..width).map(|c| key(at * cols + c)));
        }
        let per = len.div_ceil(64).div_ceil(splits.max(1));
        for h in 0..heads {
            let row = t * heads + h;
            let query = &qv[row * width..][..width];
            for z in 0..splits {
                let (k0, k1) = ((z * per * 64).min(len), ((z + 1) * per * 64).min(len));
                let out = &mut o[(z * all + row) * kv..][..kv];
                out.fill(0.0);
                if k0 >= k1 {
                    l_out[z * all + row] = f32::NEG_INFINITY;
                    continue;
                }
                let mut s: Vec<f32> = (k0..k1)
                    .map(|j| query.iter().zip(&rows[j * width..][..width]).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let (m, l) = softmax_pv(&mut s, |i| &rows[(k0 + i) * width..][..kv], out);
                l_out[z * all + row] = m + l.ln();
            }
        }
    }
    Ok(())
}

/// The attention kernels' softmax and `P V` for one query row: `scores` become `exp(s - max)`, and
/// `out` the rows `value(j)` weighted by them rounded to bf16 (as the kernels feed the tensor cores),
/// over their unrounded sum, each summed in key order. Returns the max and the sum.
fn softmax_pv<'v>(scores: &mut [f32], value: impl Fn(usize) -> &'v [f32], out: &mut [f32]) -> (f32, f32) {
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for p in scores.iter_mut() {
        *p = (*p - max).exp();
        sum += *p;
    }
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        let pb = bf16_to_f32(f32_to_bf16(p));
        out.iter_mut().zip(value(j)).for_each(|(x, &v)| *x += pb * v);
    }
    out.iter_mut().for_each(|x| *x /= sum);
    (max, sum)
}

/// The RoPE table the runtime builds for positions `0..positions` (its own function).
fn rope_table(t: &RopeTable, positions: usize) -> HostBuffer {
    let spec = v3c_runtime::lowering::RopeTableSpec {
        dim: t.dim,
        inv_freq: t.inv_freq.clone(),
        attention_factor: t.attention_factor,
    };
    let data = v3c_runtime::prepare::rope_table(&spec, positions);
    HostBuffer { shape: vec![positions, t.dim], data: HostData::F32(data) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::sm90::mla::GradOf;
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};

    /// `L = sum(dout * O)` for `O = softmax(scale q k^T) v` (causal, query t seeing keys `0..=S - T
    /// + t`) differentiated by hand in f64, per head: (dq, dk, dv).
    #[allow(clippy::type_complexity)]
    fn f64_gradients(
        (q, k, v, g): (&[f32], &[f32], &[f32], &[f32]),
        (heads, t_len, s_len, qk, dv): (usize, usize, usize, usize, usize),
        scale: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dq, mut dk, mut dvv) =
            (vec![0.0; heads * t_len * qk], vec![0.0; heads * s_len * qk], vec![0.0; heads * s_len * dv]);
        for h in 0..heads {
            for t in 0..t_len {
                let row = h * t_len + t;
                let keys = s_len - t_len + t + 1;
                let s: Vec<f64> = (0..keys)
                    .map(|j| (0..qk).map(|c| q[row * qk + c] as f64 * k[(h * s_len + j) * qk + c] as f64).sum::<f64>())
                    .map(|x| x * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                // dP_j = g . v_j; dS_j = P_j (dP_j - sum_i P_i dP_i).
                let dp: Vec<f64> = (0..keys)
                    .map(|j| (0..dv).map(|c| g[row * dv + c] as f64 * v[(h * s_len + j) * dv + c] as f64).sum())
                    .collect();
                let d: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..keys {
                    let key_row = h * s_len + j;
                    let ds = p[j] * (dp[j] - d) * scale;
                    for c in 0..qk {
                        dq[row * qk + c] += ds * k[key_row * qk + c] as f64;
                        dk[key_row * qk + c] += ds * q[row * qk + c] as f64;
                    }
                    for c in 0..dv {
                        dvv[key_row * dv + c] += p[j] * g[row * dv + c] as f64;
                    }
                }
            }
        }
        (dq, dk, dvv)
    }

    fn max_relative(got: &[f32], want: &[f64]) -> f64 {
        let top = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs())) / top
    }

    /// The flash kernels' definitions: the forward's base-2 log-sum-exps and D = rowsum(dout * out)
    /// fed to the three gradient definitions give attention's gradients (within the bf16 rounding
    /// of P and dS), over more keys than queries and one query per key.
    #[test]
    fn flash_gradient_definitions_are_attentions_gradients() {
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for (heads, t_len, s_len, qk, dv) in [(2, 5, 9, 24, 16), (3, 33, 33, 16, 8)] {
            let scale = 0.3f32;
            let mut bf16 = |n: usize| -> HostBuffer {
                let data: Vec<u16> = (0..n).map(|_| f32_to_bf16(rand())).collect();
                HostBuffer { shape: vec![n], data: HostData::Bf16(data) }
            };
            let shaped = |mut b: HostBuffer, rows: usize| {
                let n = b.shape[0];
                b.shape = vec![rows, n / rows];
                b
            };
            let (q, k, v, g) = (
                shaped(bf16(heads * t_len * qk), heads * t_len),
                shaped(bf16(heads * s_len * qk), heads * s_len),
                shaped(bf16(heads * s_len * dv), heads * s_len),
                shaped(bf16(heads * t_len * dv), heads * t_len),
            );
            let zeros = |shape: Vec<usize>| HostBuffer::zeros(shape, "f32").unwrap();
            let (mut out, mut lse) = (zeros(vec![heads * t_len, dv]), zeros(vec![heads * t_len]));
            unsafe {
                mla_prefill(heads, scale, &[q.raw_const(), k.raw_const(), v.raw_const(), out.raw(), lse.raw()])
                    .unwrap();
            }
            let values = |b: &HostBuffer| match &b.data {
                HostData::Bf16(x) => x.iter().map(|&u| bf16_to_f32(u)).collect::<Vec<f32>>(),
                HostData::F32(x) => x.clone(),
                _ => unreachable!(),
            };
            let (o, gv) = (values(&out), values(&g));
            let d: Vec<f32> =
                (0..heads * t_len).map(|r| (0..dv).map(|c| o[r * dv + c] * gv[r * dv + c]).sum()).collect();
            let mut dd = HostBuffer { shape: vec![heads * t_len], data: HostData::F32(d) };
            let (qv, kv, vv) = (values(&q), values(&k), values(&v));
            let want = f64_gradients((&qv, &kv, &vv, &gv), (heads, t_len, s_len, qk, dv), scale as f64);
            for (of, rows, width, want) in [
                (GradOf::Queries, heads * t_len, qk, &want.0),
                (GradOf::Keys, heads * s_len, qk, &want.1),
                (GradOf::Values, heads * s_len, dv, &want.2),
            ] {
                let mut grad = zeros(vec![rows, width]);
                let bufs =
                    [q.raw_const(), k.raw_const(), v.raw_const(), g.raw_const(), lse.raw(), dd.raw(), grad.raw()];
                unsafe { mla_grad(of, heads, scale, &bufs).unwrap() };
                let err = max_relative(&values(&grad), want);
                assert!(err < 1e-2, "{of:?} ({heads} heads, T {t_len}, S {s_len}): relative error {err:e}");
            }
        }
    }

    /// What `v3r tune` holds a training flash kernel's default candidate to
    /// ([`v3c_runtime::measure::AttentionCase`]: made-up inputs, the host's rows) is what these
    /// definitions compute from its inputs — the forward's outputs and base-2 log-sum-exps, each
    /// gradient — and a wrong value in a sampled row fails it.
    #[test]
    fn the_tuners_flash_checks_follow_the_kernels_definitions() {
        use v3c_runtime::abi::FlashKind;
        use v3c_runtime::tuning::{AttentionProblem, Problem};
        let (heads, qk, dv, m, scale) = (2, 128, 64, 70, 0.09f32);
        for flash in [FlashKind::Forward, FlashKind::Lse, FlashKind::GradQ, FlashKind::GradK, FlashKind::GradV] {
            let problem = Problem {
                kernel: format!("{flash:?}"),
                m,
                m_bucket: 128,
                n: 0,
                k: 0,
                residual: false,
                grouped: None,
                attention: Some(AttentionProblem::Prefill { heads, qk, v: dv, scale, flash }),
                rows: None,
                candidates_sha256: String::new(),
                default: String::new(),
                candidates: Vec::new(),
            };
            let case = v3c_runtime::measure::AttentionCase::new(&problem, 11, 132).unwrap();
            let mut inputs: Vec<Vec<u8>> = case.inputs().into_iter().map(|(b, _)| b.into_owned()).collect();
            assert_eq!(inputs.len(), case.input_count(), "{flash:?}");
            let mut outputs: Vec<Vec<f32>> = case.output_shapes().map(|s| vec![0f32; s.iter().product()]).collect();
            let mut bufs: Vec<RawBuffer> = inputs
                .iter_mut()
                .zip(&case.operands)
                .map(|(b, (shape, element))| RawBuffer {
                    ptr: b.as_mut_ptr() as *mut (),
                    shape: shape.clone(),
                    element: element.to_string(),
                })
                .collect();
            for (o, (shape, _)) in outputs.iter_mut().zip(&case.operands[case.input_count()..]) {
                bufs.push(RawBuffer { ptr: o.as_mut_ptr() as *mut (), shape: shape.clone(), element: "f32".into() });
            }
            let of = match flash {
                FlashKind::GradQ => Some(GradOf::Queries),
                FlashKind::GradK => Some(GradOf::Keys),
                FlashKind::GradV => Some(GradOf::Values),
                _ => None,
            };
            // SAFETY: every buffer addresses its shape's elements, alive for the call.
            unsafe {
                match of {
                    Some(of) => mla_grad(of, heads, scale, &bufs).unwrap(),
                    None => mla_prefill(heads, scale, &bufs).unwrap(),
                }
            }
            let mut got: Vec<f32> = outputs.concat();
            assert!(got.iter().any(|&x| x != 0.0), "{flash:?}");
            case.check(&got).unwrap_or_else(|e| panic!("{flash:?}: {e}"));
            // Row rows/2 of the first output (keys' gradients: key 35 of head 1).
            let width = case.operands[case.input_count()].0[1];
            got[heads * m / 2 * width] += 0.5;
            let e = case.check(&got).unwrap_err();
            assert!(e.contains(&format!("row {}", heads * m / 2)), "{flash:?}: {e}");
            if flash == FlashKind::Lse {
                // A wrong log-sum-exp alone.
                got[heads * m / 2 * width] -= 0.5;
                got[heads * m * width + heads * m / 2] += 0.5;
                let e = case.check(&got).unwrap_err();
                assert!(e.starts_with("the host's log-sum-exp of query row"), "{e}");
            }
        }
    }
}
