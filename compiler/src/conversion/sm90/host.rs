//! A fused kernel's sm_90a row-kernel launches run on the host: each launch's row kernels through
//! their CPU lowering (the same template, JIT-compiled), its operands viewed as the runtime views
//! them (an argument of lower rank than its buffer sees the leading dims collapsed), temporaries
//! and the RoPE table allocated as the runtime allocates them. How the lowering of whole entries
//! (e.g. the training step) is checked against the CPU backend without a GPU. A GEMM template
//! launch (dense fp8, no grouping) is computed from its operands as its semantics say (the
//! reference's block-scaled order), not as the kernel's instructions would: [`crate::emulate`]
//! and the device checks cover the template itself.

use std::collections::HashMap;

use melior::ir::operation::OperationRef;
use melior::{Context, ExecutionEngine};
use v3c_runtime::host::{call_packed, HostBuffer, HostData, RawBuffer};

use super::gemm::GemmInput;
use super::lower::{self, Operand, RopeTable, StepKernel, Steps};
use super::rows::RowKernel;

/// Row kernels JIT-compiled for the host, by name.
pub struct HostRows<'c> {
    context: &'c Context,
    engines: HashMap<String, ExecutionEngine>,
}

impl<'c> HostRows<'c> {
    pub fn new(context: &'c Context) -> HostRows<'c> {
        HostRows { context, engines: HashMap::new() }
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
        let steps = match (lower::row_of_kernel(fused), lower::steps_of_kernel(fused)) {
            (Ok(row), _) => Steps {
                steps: vec![lower::Step { kernel: StepKernel::Row(row.kernel), operands: row.operands }],
                temps: Vec::new(),
                rope_table: row.rope_table,
            },
            (_, Ok(steps)) => steps,
            _ => return Ok(false),
        };
        let emulated = |g: &lower::GemmKernel| g.input == GemmInput::Fp8 && g.grouped.is_none() && g.weights.len() == 1;
        if steps.steps.iter().any(|s| matches!(&s.kernel, StepKernel::Gemm(g) if !emulated(g))) {
            return Ok(false);
        }
        let mut temps: Vec<HostBuffer> = steps
            .temps
            .iter()
            .map(|t| {
                let n = t.rows(rows) * t.cols;
                let data = match t.element.as_str() {
                    "f32" => Ok(HostData::F32(vec![0.0; n])),
                    "i32" => Ok(HostData::I32(vec![0; n])),
                    "f8E4M3FN" => Ok(HostData::F8(vec![0; n])),
                    other => Err(format!("a temporary of {other}")),
                }?;
                Ok(HostBuffer { shape: vec![t.rows(rows), t.cols], data })
            })
            .collect::<Result<_, String>>()?;
        let mut table = steps.rope_table.as_ref().map(|t| rope_table(t, rows));
        for step in &steps.steps {
            let ranks = match &step.kernel {
                StepKernel::Row(kernel) => kernel.argument_ranks(),
                // A, its scales, B, its scales, (the residual,) the output: matrices.
                StepKernel::Gemm(_) => vec![2; step.operands.len()],
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
                    Operand::RopeTable => table.as_mut().ok_or("a RoPE operand without a table")?.raw(),
                };
                // Seen at the argument's rank as the runtime sees it (its own rule).
                let seen = v3c_runtime::abi::Buf { addr: 0, shape: buffer.shape.clone(), element: String::new() }
                    .shape_at_rank(rank)
                    .map_err(|e| format!("step {:?}: {e}", step.operands))?;
                raw.push(RawBuffer { shape: seen, ..buffer });
            }
            match &step.kernel {
                StepKernel::Row(kernel) => self.launch(kernel, &raw)?,
                // SAFETY: the views are the buffers' own shapes (checked by shape_at_rank).
                StepKernel::Gemm(g) => unsafe { fp8_gemm(g, &raw)? },
            }
        }
        Ok(true)
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

/// `out = A . B^T` of an fp8 GEMM step (A `[M, K]` e4m3 with 1x128 scales, B `[N, K]` with
/// 128x128 block scales, f32 out, plus the residual when it has one): per 128-wide K block the
/// e4m3 products summed in order, then scaled by A's and B's scales, as the reference's
/// `matmul_fp8`.
///
/// # Safety
/// The buffers address their shapes' elements.
unsafe fn fp8_gemm(g: &lower::GemmKernel, bufs: &[RawBuffer]) -> Result<(), String> {
    use v3c_models::dtype::f8e4m3_to_f32;
    let at = |i: usize| bufs.get(i).ok_or_else(|| format!("{}: operand {i} missing", g.kernel));
    let (a, sa) = (at(g.a)?, at(g.a_scale.ok_or("an fp8 GEMM without A scales")?)?);
    let (b, sb) = (at(g.weights[0].0)?, at(g.weights[0].1.ok_or("an fp8 GEMM without B scales")?)?);
    let out = bufs.last().ok_or("a GEMM without output")?;
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[0]);
    if b.shape[1] != k || out.shape != [m, n] {
        return Err(format!("{}: A {:?}, B {:?}, out {:?}", g.kernel, a.shape, b.shape, out.shape));
    }
    let slice = |buf: &RawBuffer| std::slice::from_raw_parts(buf.ptr as *const u8, buf.shape.iter().product());
    let floats = |buf: &RawBuffer| std::slice::from_raw_parts(buf.ptr as *const f32, buf.shape.iter().product());
    let (a, b, sa, sb) = (slice(a), slice(b), floats(sa), floats(sb));
    let residual = g.residual.map(|r| at(r).map(|r| floats(r).to_vec())).transpose()?;
    let (kb, a_cols, b_cols) =
        (k.div_ceil(128), bufs[g.a_scale.unwrap_or(0)].shape[1], bufs[g.weights[0].1.unwrap_or(0)].shape[1]);
    let o = std::slice::from_raw_parts_mut(out.ptr as *mut f32, m * n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for block in 0..kb {
                let partial: f32 = (block * 128..((block + 1) * 128).min(k))
                    .map(|c| f8e4m3_to_f32(a[i * k + c]) * f8e4m3_to_f32(b[j * k + c]))
                    .sum();
                acc += partial * sa[i * a_cols + block] * sb[(j / 128) * b_cols + block];
            }
            o[i * n + j] = residual.as_ref().map_or(acc, |r| r[i * n + j] + acc);
        }
    }
    Ok(())
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
