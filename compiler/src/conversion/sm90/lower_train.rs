//! The training step's `fused`-stage kernels -> sm_90a launches ([`super::rows::TrainRow`], and the
//! inference templates where one fits: the bf16 GEMM for the f32 recipe's matmuls (split `hi + lo`),
//! the fp8 GEMM for the FP8 recipe's Fprop, Dgrad and Wgrad, the grouped fp8 GEMM for its routed
//! experts, the routing and concatenation rows). The training graph's kernels are single ops (its fused stage
//! only forms kernels), some with view tails (a linear's output reshaped and split into heads, the
//! experts' stacked gradients split per expert). Called by [`super::lower::row_of_kernel`] and
//! [`super::lower::steps_of_kernel`] for the ops they do not know; `None`: not a training kernel
//! (their own reason stands).
//!
//! Temporaries have the run's rows (`Temp::per_row`) or fixed ones (quantized master weights,
//! per-expert offsets); a launch that writes a kernel result takes its grid from a real operand,
//! never from a temporary (the MTP module's tensors have one row fewer than the run's), or bounds
//! its rows by one ([`TrainRow::PairGrad`]).

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, Value, ValueLike};

use super::gemm::GemmGrouping::{self, Contiguous};
use super::gemm::{GemmInput, GemmOutput};
use super::lower::{
    rope_table_of, route_steps, GemmKernel, KRange, Operand, RowLaunch, RunCols, Step, StepKernel, Steps, Temp,
};
use super::rows::{Mla, RowKernel, RowOp, TrainRow, GROUP};
use crate::verify::Shape;

/// A kernel's body: its ops (without the return), the returned values and the arguments.
pub(super) struct Body<'c, 'a> {
    /// The fused kernel's name.
    pub(super) name: String,
    pub(super) ops: Vec<OperationRef<'c, 'a>>,
    pub(super) names: Vec<String>,
    pub(super) returned: Vec<Value<'c, 'a>>,
    pub(super) args: Vec<Value<'c, 'a>>,
}

impl<'c, 'a> Body<'c, 'a> {
    pub(super) fn of(kernel: &OperationRef<'c, 'a>) -> Option<Body<'c, 'a>> {
        let block = kernel.region(0).ok()?.first_block()?;
        let args = (0..block.argument_count()).filter_map(|i| block.argument(i).ok().map(Value::from)).collect();
        let (mut ops, mut returned) = (Vec::new(), Vec::new());
        let mut op = block.first_operation();
        while let Some(o) = op {
            op = o.next_in_block();
            if o.name().as_string_ref().as_str() == Ok("func.return") {
                returned = (0..o.operand_count()).filter_map(|i| o.operand(i).ok()).collect();
            } else {
                ops.push(o);
            }
        }
        let names = ops
            .iter()
            .map(|o| o.name().as_string_ref().as_str().unwrap_or_default().trim_start_matches("v3.").into())
            .collect();
        let name = kernel.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
        Some(Body { name, ops, names, returned, args })
    }

    /// The argument index `v` is.
    pub(super) fn arg(&self, v: Value) -> Option<usize> {
        self.args.iter().position(|a| raw(*a) == raw(v))
    }

    /// Whether op `o`'s operands are the kernel's arguments in order.
    pub(super) fn operands_are_args(&self, o: &OperationRef) -> bool {
        (0..o.operand_count()).all(|i| o.operand(i).ok().and_then(|v| self.arg(v)) == Some(i))
    }

    /// Whether the kernel returns exactly op `o`'s results, in order.
    pub(super) fn returns_results_of(&self, o: &OperationRef) -> bool {
        self.returned.len() == o.result_count()
            && self.returned.iter().enumerate().all(|(i, v)| o.result(i).is_ok_and(|r| raw(r.into()) == raw(*v)))
    }
}

pub(super) fn raw(v: Value) -> usize {
    v.to_raw().ptr as usize
}

fn shape(v: Value) -> Result<Shape, String> {
    Shape::of(v.r#type()).ok_or_else(|| "a non-tensor value".to_string())
}

pub(super) fn operand_shape(o: &OperationRef, i: usize) -> Result<Shape, String> {
    shape(o.operand(i).map_err(|e| e.to_string())?)
}

pub(super) fn result_shape(o: &OperationRef, i: usize) -> Result<Shape, String> {
    shape(o.result(i).map_err(|e| e.to_string())?.into())
}

/// The static last dimension of a shape (the row width of its 2-D view).
pub(super) fn width(s: &Shape) -> Result<usize, String> {
    s.dims.last().copied().flatten().ok_or_else(|| format!("{s} has a dynamic width"))
}

fn flag(o: &OperationRef, name: &str) -> bool {
    o.attribute(name).ok().and_then(crate::mlir::bool_value).unwrap_or(false)
}

pub(super) fn int_attr(o: &OperationRef, name: &str) -> Option<i64> {
    o.attribute(name).ok().and_then(crate::mlir::int_value)
}

/// Every operand and result f32.
fn all_f32(o: &OperationRef) -> bool {
    let f32 = |s: Result<Shape, String>| s.is_ok_and(|s| s.element == "f32");
    (0..o.operand_count()).all(|i| f32(operand_shape(o, i))) && (0..o.result_count()).all(|i| f32(result_shape(o, i)))
}

fn train_kernel(op: TrainRow, d: usize, weight: &str) -> RowKernel {
    RowKernel::new(RowOp::Train(op), d, weight)
}

/// The training kernel `kernel` as one row-kernel launch (`None`: not one of these ops).
pub fn row_of_train_kernel(kernel: &OperationRef) -> Option<Result<RowLaunch, String>> {
    let body = Body::of(kernel)?;
    let [name] = &body.names[..] else { return None };
    let o = &body.ops[0];
    if f32_recipe(kernel) && tensor_core_matmul(&body).is_some() {
        return None;
    }
    let launch = row_of_op(&body, o, name)?;
    if !body.returns_results_of(o) {
        return Some(Err(format!("{name} with its results in another order")));
    }
    Some(launch)
}

/// Op `o` (named `name`) of a kernel as one row-kernel launch writing its results as the kernel's
/// results in order (`None`: not one of these ops).
fn row_of_op(body: &Body, o: &OperationRef, name: &str) -> Option<Result<RowLaunch, String>> {
    let launch = |k: RowKernel, operands: Vec<Operand>| RowLaunch { kernel: k, rope_table: None, operands };
    let in_order = || (0..o.operand_count()).map(Operand::Arg).chain((0..o.result_count()).map(Operand::Result));
    let name = name.to_string();
    let row = || -> Result<RowLaunch, String> {
        if !body.operands_are_args(o) {
            return Err(format!("{name} with its operands in another order"));
        }
        let out = result_shape(o, 0)?;
        match name.as_str() {
            "add" | "silu_mul" | "silu_mul_grad" => {
                if !all_f32(o) {
                    return Err(format!("{name} of non-f32 values"));
                }
                let op = match name.as_str() {
                    "add" if out.dims.len() == 1 => TrainRow::AddFlat,
                    "add" => TrainRow::Add,
                    "silu_mul" => TrainRow::SiluMul,
                    _ => TrainRow::SiluMulGrad,
                };
                Ok(launch(train_kernel(op, width(&out)?, "f32"), in_order().collect()))
            }
            "matmul" | "linear" | "lm_head" => {
                // The f32 GEMMs of the training graph (master weights: f32 x f32) on CUDA cores.
                if o.operand_count() != 2 || !all_f32(o) || out.dims.len() != 2 {
                    return Err(format!("{name} that is not of two f32 matrices"));
                }
                let (ta, tb) =
                    if name == "matmul" { (flag(o, "transpose_a"), flag(o, "transpose_b")) } else { (false, true) };
                let op = TrainRow::Matmul { transpose_a: ta, transpose_b: tb };
                Ok(launch(train_kernel(op, width(&out)?, "f32"), in_order().collect()))
            }
            "rope" | "rope_grad" => {
                let x = operand_shape(o, 0)?;
                if x.element != "f32" || x.dims.len() < 2 {
                    return Err(format!("{name} of {x}"));
                }
                let heads: usize =
                    x.dims[1..x.dims.len() - 1].iter().map(|d| d.ok_or("dynamic heads")).product::<Result<_, _>>()?;
                let (table, interleave) = rope_table_of(o)?;
                if table.dim != width(&x)? {
                    return Err(format!("{name} of width {} on rows of {}", table.dim, width(&x)?));
                }
                let op = TrainRow::Rope { heads, interleave, inverse: name == "rope_grad" };
                let kernel = train_kernel(op, table.dim, "f32");
                let operands = vec![Operand::Arg(0), Operand::Arg(1), Operand::RopeTable, Operand::Result(0)];
                Ok(RowLaunch { kernel, rope_table: Some(table), operands })
            }
            "cross_entropy_grad" => {
                let weight = weight_attr(o)?;
                if operand_shape(o, 0)?.element != "f32" {
                    return Err("cross_entropy_grad of non-f32 logits".into());
                }
                let op = TrainRow::CrossEntropy { grad: true, weight };
                Ok(launch(train_kernel(op, width(&operand_shape(o, 0)?)?, "f32"), in_order().collect()))
            }
            "route_logits_grad" => {
                let (logits, idx) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
                if logits.element != "f32" || idx.element != "i32" {
                    return Err(format!("route_logits_grad of {logits} and {idx}"));
                }
                let scale = o
                    .attribute("routed_scaling_factor")
                    .ok()
                    .and_then(|a| a.to_string().split(':').next().and_then(|n| n.trim().parse::<f32>().ok()))
                    .unwrap_or(1.0);
                let softmax = crate::mlir::softmax_scoring(o);
                let op = TrainRow::RouteGrad { norm: flag(o, "norm_topk_prob"), scale, softmax };
                Ok(launch(train_kernel(op, width(&logits)?, "f32"), in_order().collect()))
            }
            "split_grad" => {
                // Both pieces' gradients: their concatenation (x, the first operand, only shapes it).
                let segments = o.attribute("operandSegmentSizes").map(|a| a.to_string()).unwrap_or_default();
                let axis = int_attr(o, "axis").ok_or("split_grad without axis")?;
                let (head, tail) = (operand_shape(o, 1)?, operand_shape(o, 2).ok());
                if !segments.contains("1, 1, 1") || axis as usize + 1 != out.dims.len() || !all_f32(o) {
                    return Err("split_grad of one piece, or not along the last axis".into());
                }
                let second = width(&tail.ok_or("split_grad without its second piece")?)?;
                let kernel = RowKernel::new(RowOp::Concat { second }, width(&head)?, "f32");
                Ok(launch(kernel, vec![Operand::Arg(1), Operand::Arg(2), Operand::Result(0)]))
            }
            _ => Err(name.clone()),
        }
    };
    match name.as_str() {
        "add" | "silu_mul" | "silu_mul_grad" | "matmul" | "linear" | "lm_head" | "rope" | "rope_grad"
        | "split_grad" | "cross_entropy_grad" | "route_logits_grad" => Some(row()),
        _ => None,
    }
}

/// The training kernel `kernel` as several launches (`None`: not one of these kernels):
/// - `rms_norm_grad`: dx per row (writing each row's r to a temporary), then dw over the rows;
/// - `concat_grad` along the last axis: each returned piece a column range of dy;
/// - an f32 `matmul` / `linear` / `lm_head` on the tensor cores ([`matmul_steps`]) where its
///   shapes allow;
/// - an f32 `linear` whose output is returned whole and/or reshaped and split into column
///   pieces: the matmul, then each piece copied out of it.
pub fn steps_of_train_kernel(kernel: &OperationRef) -> Option<Result<Steps, String>> {
    let body = Body::of(kernel)?;
    let names: Vec<&str> = body.names.iter().map(String::as_str).collect();
    let tensor_cores = f32_recipe(kernel);
    if let Some(steps) = tensor_cores.then(|| tensor_core_matmul(&body)).flatten() {
        return Some(Ok(steps));
    }
    match names[..] {
        ["rms_norm_grad"] => Some(rms_norm_grad(&body)),
        ["embed_grad"] => Some(embed_grad(&body)),
        ["concat_grad"] => Some(concat_grad(&body)),
        ["linear", "split"] | ["linear", "reshape", "split"] => Some(linear_pieces(&body, tensor_cores)),
        ["concat"] => Some(concat_rows(&body)),
        ["attention", "reshape"] | ["attention_grad"] => Some(attention(&body, tensor_cores)),
        ["moe_experts"] => Some(moe_experts(&body)),
        ["fp8_linear" | "fp8_linear_dgrad", ..] => Some(fp8_projection(&body)),
        ["fp8_linear_wgrad"] => Some(fp8_wgrad(&body)),
        ["moe_experts_grad", ..] => Some(moe_experts_grad(&body)),
        ["cross_entropy"] => Some(cross_entropy(&body)),
        ["balance_loss"] | ["balance_loss_grad"] => Some(balance_loss(&body)),
        ["moe_route"] => Some(moe_route(&body)),
        [name, "reshape"] => row_of_op(&body, &body.ops[0], name).map(|launch| reshaped(&body, launch?)),
        _ => None,
    }
}

/// `moe_route` of the step's f32 activations: the logits' pieces, then the selection
/// ([`route_steps`]), the indices and weights its results.
fn moe_route(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    if !body.operands_are_args(o) || !body.returns_results_of(o) {
        return Err("moe_route with its operands or results in another order".into());
    }
    let (x, gate) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
    if x.element != "f32" {
        return Err(format!("routing of {} activations", x.element));
    }
    let experts = gate.dims.first().copied().flatten().ok_or("a dynamic expert count")?;
    let operands = [Operand::Arg(0), Operand::Arg(1), Operand::Arg(2), Operand::Result(0), Operand::Result(1)];
    let biased = o.operand_count() > 2;
    let (steps, temps) = route_steps(o, &body.name, experts, (width(&x)?, &gate.element), operands, 0, biased)?;
    Ok(Steps { steps, temps, rope_table: None })
}

/// A one-op kernel whose result is returned reshaped: the op's launch writes a temporary in its
/// result's shape, copied flat into the reshaped result (its rows as the runtime views them).
fn reshaped(body: &Body, launch: RowLaunch) -> Result<Steps, String> {
    let (o, reshape) = (&body.ops[0], &body.ops[1]);
    let chained = o.result_count() == 1
        && reshape.operand(0).is_ok_and(|v| o.result(0).is_ok_and(|r| raw(r.into()) == raw(v)))
        && body.returns_results_of(reshape);
    if !chained {
        return Err("a reshape of another value than the op's one result".into());
    }
    let (inner, outer) = (result_shape(o, 0)?, result_shape(reshape, 0)?);
    if inner.dims.len() < 2 || inner.dims[0].is_some() || outer.dims.first() != Some(&None) || inner.element != "f32" {
        return Err(format!("a reshape of {inner} to {outer} (token rows of f32 only)"));
    }
    let rows_factor = inner.dims[1..inner.dims.len() - 1]
        .iter()
        .map(|d| d.ok_or("a dynamic inner dim"))
        .product::<Result<usize, _>>()?;
    let temp = Temp::per_row(rows_factor, width(&inner)?, "f32");
    let operands =
        launch.operands.iter().map(|&op| if op == Operand::Result(0) { Operand::Temp(0) } else { op }).collect();
    let w = width(&outer)?;
    let copy = train_kernel(TrainRow::Columns { start: 0, stride: w }, w, "f32");
    Ok(Steps {
        steps: vec![
            Step { only: None, kernel: StepKernel::Row(launch.kernel), operands },
            Step { only: None, kernel: StepKernel::Row(copy), operands: vec![Operand::Temp(0), Operand::Result(0)] },
        ],
        temps: vec![temp],
        rope_table: launch.rope_table,
    })
}

/// Queries an attention block takes (keys, for the keys' gradient), sharing each key's loads.
const ATTENTION_GROUP: usize = 8;
/// Shared memory an attention block's score arrays take: `ATTENTION_GROUP` queries (keys) x the
/// keys (queries) it keeps at a time — longer windows go in chunks (their scores recomputed per
/// pass).
const ATTENTION_SHARED: usize = 32 * 1024;

/// A training attention kernel's widths and the steps every form of it starts with.
struct AttentionFront {
    grad: bool,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    kv: usize,
    hp: usize,
    scale: f32,
    steps: Vec<Step>,
    temps: Vec<Temp>,
}

/// A training attention kernel (`attention` + `reshape`, or `attention_grad`, the naive form's f32
/// operands) checked and its front built: the latent's first `kv` columns copied out (temporary
/// 0, ckv `[S, kv]`) and expanded through kv_b into per-head keys and values (temporary 1, kvb
/// `[S, hp]`). `key_rows`: those temporaries have the latent's rows (else the run's, the rows past
/// the latent's zeros).
fn attention_front(body: &Body, tensor_cores: bool, key_rows: bool) -> Result<AttentionFront, String> {
    let o = &body.ops[0];
    let grad = body.names[0] == "attention_grad";
    let form = o.attribute("form").map(|a| a.to_string()).unwrap_or_default();
    if !body.operands_are_args(o) || (!grad && !form.contains("naive")) || !all_f32(o) {
        return Err(format!("{} (the naive form's f32 operands in order)", body.names[0]));
    }
    let returns = if grad { body.returns_results_of(o) } else { body.returns_results_of(&body.ops[1]) };
    if !returns {
        return Err(format!("{} returning other values", body.names[0]));
    }
    let dim = |v: &Shape, i: usize| v.dims.get(i).copied().flatten().ok_or_else(|| format!("{v}: a dynamic dim {i}"));
    let (qn, qp, kv_b) = (operand_shape(o, 0)?, operand_shape(o, 1)?, operand_shape(o, 3)?);
    let (heads, nope, rope) = (dim(&qn, 1)?, dim(&qn, 2)?, dim(&qp, 2)?);
    let (hp, kv) = (dim(&kv_b, 0)?, dim(&kv_b, 1)?);
    let scale = o
        .attribute("scale")
        .ok()
        .and_then(|a| a.to_string().split(':').next().and_then(|n| n.trim().parse::<f32>().ok()))
        .ok_or("attention without a scale")?;
    if hp % heads != 0 || hp / heads <= nope {
        return Err(format!("kv_b of {hp} rows for {heads} heads of {nope} key columns"));
    }
    let mut front = AttentionFront {
        grad,
        heads,
        nope,
        rope,
        v: hp / heads - nope,
        kv,
        hp,
        scale,
        steps: vec![Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(TrainRow::Slice { start: 0 }, kv, "f32")),
            operands: vec![Operand::Arg(2), Operand::Temp(0)],
        }],
        temps: vec![Temp::per_row(1, kv, "f32"), Temp::per_row(1, hp, "f32")],
    };
    if key_rows {
        front.temps.iter_mut().for_each(|t| t.rows_of = Some(2));
    }
    // kvb = ckv kv_b^T.
    front.matmul(
        body,
        tensor_cores,
        "kvb",
        (Operand::Temp(0), false, kv),
        (Operand::Arg(3), true),
        Operand::Temp(1),
    )?;
    Ok(front)
}

impl AttentionFront {
    /// `out = op(a) . op(b)` of run rows `a` (`cols` wide; transposed when its flag says) and kv_b
    /// (`Arg(3)`) or other run rows `b` of kv columns, appended: on the tensor cores when
    /// `tensor_cores` ([`matmul_steps`]), else the CUDA-core matmul in the reference's order.
    fn matmul(
        &mut self,
        body: &Body,
        tensor_cores: bool,
        name: &str,
        (a, ta, cols): (Operand, bool, usize),
        (b, tb): (Operand, bool),
        out: Operand,
    ) -> Result<(), String> {
        let (hp, kv) = (self.hp, self.kv);
        let run_rows = |cols: usize| Shape { dims: vec![None, Some(cols)], element: "f32".into() };
        let b_shape = match b {
            Operand::Arg(3) => Shape { dims: vec![Some(hp), Some(kv)], element: "f32".into() },
            _ => run_rows(kv),
        };
        let steps = if tensor_cores {
            let fused = format!("{}.{name}", body.name);
            matmul_steps(&fused, (a, &run_rows(cols)), (b, &b_shape), (ta, tb), out, &mut self.temps)?
        } else {
            // Output columns: kv_b's rows (hp), or kv.
            let d = if b == Operand::Arg(3) && tb { hp } else { kv };
            let kernel = train_kernel(TrainRow::Matmul { transpose_a: ta, transpose_b: tb }, d, "f32");
            vec![Step { only: None, kernel: StepKernel::Row(kernel), operands: vec![a, b, out] }]
        };
        self.steps.extend(steps);
        Ok(())
    }

    /// The gradient's end, from dkvb (the gradient of kvb, `[S, hp]`) and the rope key's `dpe [S,
    /// rope]`: d ckv = dkvb kv_b, the latent's gradient `[d ckv | dpe]` (result 2), d kv_b = dkvb^T
    /// ckv (result 3).
    fn latent_gradients(&mut self, body: &Body, tensor_cores: bool, dkvb: Operand, dpe: Operand) -> Result<(), String> {
        let (hp, kv, rope) = (self.hp, self.kv, self.rope);
        let dckv = self.temp(Temp::per_row(1, kv, "f32"));
        self.matmul(body, tensor_cores, "dckv", (dkvb, false, hp), (Operand::Arg(3), false), dckv)?;
        self.steps.push(Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(TrainRow::Join { second: rope }, kv, "f32")),
            operands: vec![dckv, dpe, Operand::Result(2)],
        });
        self.matmul(body, tensor_cores, "dkvb", (dkvb, true, hp), (Operand::Temp(0), false), Operand::Result(3))
    }

    fn temp(&mut self, t: Temp) -> Operand {
        self.temps.push(t);
        Operand::Temp(self.temps.len() - 1)
    }

    /// `source`'s `cols` columns transposed by `op` ([`TrainRow::Transpose`]) into a new
    /// temporary `[cols, run rows]`.
    fn transposed(&mut self, source: Operand, op: TrainRow, cols: usize) -> Operand {
        let t = self.temp(Temp::transposed(cols, RunCols::new(1, 1), "f32"));
        self.steps.push(Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(op, cols, "f32")),
            operands: vec![source, t],
        });
        t
    }
}

/// Naive-form MLA and its gradient on CUDA cores (temporaries have the run's rows, at least the
/// latent's: per-key temporaries past the latent's rows are zeros, and no launch takes its row
/// count from a temporary when it writes a result): after [`attention_front`], one block per
/// (group of queries, head) — forward, or the queries' gradients and the softmax statistics — and
/// for the gradient one block per (group of keys, head) for the keys' and values' gradients, the
/// heads' rope parts summed, and the matmuls back to the latent and kv_b. `tensor_cores` (the f32
/// recipe): the matmuls through kv_b — the keys' and values' expansion, and the gradient's two
/// back — on the tensor cores ([`matmul_steps`]); else on CUDA cores in the reference's order.
fn attention(body: &Body, tensor_cores: bool) -> Result<Steps, String> {
    let mut f = attention_front(body, tensor_cores, false)?;
    let (heads, nope, rope, v, kv, hp, scale) = (f.heads, f.nope, f.rope, f.v, f.kv, f.hp, f.scale);
    // Keys (queries) kept at a time: the forward keeps one array of them, the gradients two.
    let mla = |arrays: usize| Mla {
        heads,
        nope,
        rope,
        v,
        kv,
        context: ATTENTION_SHARED / (4 * ATTENTION_GROUP * arrays),
        group: ATTENTION_GROUP,
        scale,
    };
    let row = |op| StepKernel::Row(train_kernel(op, kv, "f32"));
    let f32_temp = |rows_factor, cols| Temp::per_row(rows_factor, cols, "f32");
    use Operand::{Arg, Result as Res};
    // With the gradient: stats [T * H, 3], dkvb [S, hp], part [S * H, rope], d pe [S, rope].
    let grad = f.grad.then(|| {
        [f.temp(f32_temp(heads, 3)), f.temp(f32_temp(1, hp)), f.temp(f32_temp(heads, rope)), f.temp(f32_temp(1, rope))]
    });
    // What a thread per key (per query, in the keys' gradient) reads, transposed along the keys
    // (queries): kvb [hp, S], the latent's rope columns [rope, S]; q_nope, q_pe and dout [H x, T].
    let kvbt = f.transposed(Operand::Temp(1), TrainRow::Transpose { start: 0, heads: 0 }, hp);
    let latt = f.transposed(Arg(2), TrainRow::Transpose { start: kv, heads: 0 }, rope);
    let kvb = Operand::Temp(1);
    let Some([stats, dkvb, part, dpe]) = grad else {
        f.steps.push(Step {
            only: None,
            kernel: row(TrainRow::MlaForward(mla(1))),
            operands: vec![Arg(0), Arg(1), Arg(2), kvb, kvbt, latt, Res(0)],
        });
        return Ok(Steps { steps: f.steps, temps: f.temps, rope_table: None });
    };
    let by_heads = TrainRow::Transpose { start: 0, heads };
    let qnt = f.transposed(Arg(0), by_heads, heads * nope);
    let qpt = f.transposed(Arg(1), by_heads, heads * rope);
    let doutt = f.transposed(Arg(4), by_heads, heads * v);
    f.steps.extend([
        Step {
            only: None,
            kernel: row(TrainRow::MlaGradQ(mla(2))),
            operands: vec![Arg(0), Arg(1), Arg(2), kvb, kvbt, latt, Arg(4), Res(0), Res(1), stats],
        },
        Step {
            only: None,
            kernel: row(TrainRow::MlaGradKv(mla(2))),
            operands: vec![Arg(0), Arg(1), Arg(2), kvb, qnt, qpt, doutt, Arg(4), stats, dkvb, part],
        },
        Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(TrainRow::SumHeads { heads }, rope, "f32")),
            operands: vec![part, dpe],
        },
    ]);
    f.latent_gradients(body, tensor_cores, dkvb, dpe)?;
    Ok(Steps { steps: f.steps, temps: f.temps, rope_table: None })
}

/// Training attention on the tensor cores (DeepSeek-V3's recipe: the attention core in bf16), as
/// flash attention: after [`attention_front`], the keys and values head-major in bf16
/// (`rows_mlakeys`), the queries likewise (`rows_mlaqueries`), then
/// - forward: `mla_prefill_*` (causal), its head-major output back to token rows (`rows_mlaheadsout`);
/// - gradient: the forward again with its rows' log-sum-exps (`_lse`: the output and statistics
///   are recomputed rather than kept), dout head-major in bf16 with `D = rowsum(bf16(dout) * out)`
///   (`rows_flashdout`), FlashAttention-2's backward as three kernels (`mla_grad{q,k,v}`), dQ back
///   to the queries' rows (`rows_flashdq`), dK and dV to kvb's and the rope key's gradients
///   (`rows_flashdkv`), then the matmuls back to the latent and kv_b.
///
/// q, k, v, P and dS are bf16 (their products summed in f32): the step's results differ from
/// the reference's f32 attention by bf16's rounding. The matmuls through kv_b run on the tensor
/// cores as bf16 hi + lo GEMMs ([`matmul_steps`]) in both recipes. `Err`: not a training attention kernel, or
/// head widths the kernels do not take.
pub fn flash_attention_steps(kernel: &OperationRef) -> Option<Result<Steps, String>> {
    let body = Body::of(kernel)?;
    let names: Vec<&str> = body.names.iter().map(String::as_str).collect();
    if !matches!(names[..], ["attention", "reshape"] | ["attention_grad"]) {
        return None;
    }
    // kv_b's products on the tensor cores too (bf16 hi + lo, ~1e-5 of f32) in either recipe: the
    // attention around them rounds to bf16 already.
    Some(flash_attention(&body, true))
}

fn flash_attention(body: &Body, tensor_cores: bool) -> Result<Steps, String> {
    use super::mla::{FlashMode, GradOf, MlaPrefillConfig};
    let mut f = attention_front(body, tensor_cores, true)?;
    let (heads, nope, rope, v, kv, scale) = (f.heads, f.nope, f.rope, f.v, f.kv, f.scale);
    let qk = nope + rope;
    let config = |mode| MlaPrefillConfig { qk, v, stages: 2, mode };
    config(FlashMode::Forward).validate(&crate::target::SM90A)?;
    let flash = |mode| StepKernel::MlaPrefill(super::lower::MlaPrefillLaunch { config: config(mode), heads, scale });
    let step = |kernel: StepKernel, operands: Vec<Operand>| Step { only: None, kernel, operands };
    let row = |op: RowOp, d: usize| StepKernel::Row(RowKernel::new(op, d, "f32"));
    let train_row = |op: TrainRow, d: usize| StepKernel::Row(train_kernel(op, d, "f32"));
    use Operand::{Arg, Result as Res};
    // Head-major temporaries of the queries' rows (argument 0: the MTP module's are one fewer
    // than the run's) and of the keys' (the latent, argument 2): the kernels take T and S from
    // them.
    let query_rows = |cols, element: &str| Temp::per_row_of(0, heads, cols, element);
    let key_rows = |factor, cols, element: &str| Temp::per_row_of(2, factor, cols, element);
    let (keys, values) = (f.temp(key_rows(heads, qk, "bf16")), f.temp(key_rows(heads, v, "bf16")));
    let (queries, out) = (f.temp(query_rows(qk, "bf16")), f.temp(query_rows(v, "f32")));
    let cache = super::rows::CacheRows::F32;
    f.steps.extend([
        step(row(RowOp::MlaKeys { heads, nope, rope, v, cache }, kv), vec![Operand::Temp(1), Arg(2), keys, values]),
        step(row(RowOp::MlaQueries { heads, nope, rope }, heads * qk), vec![Arg(0), Arg(1), queries]),
    ]);
    if !f.grad {
        f.steps.extend([
            step(flash(FlashMode::Forward), vec![queries, keys, values, out]),
            step(row(RowOp::MlaHeadsOut { heads, quantize: false }, heads * v), vec![out, Res(0)]),
        ]);
        return Ok(Steps { steps: f.steps, temps: f.temps, rope_table: None });
    }
    let lse = f.temp(query_rows(1, "f32"));
    let (dout, dd) = (f.temp(query_rows(v, "bf16")), f.temp(query_rows(1, "f32")));
    let (dq, dk, dv) =
        (f.temp(query_rows(qk, "f32")), f.temp(key_rows(heads, qk, "f32")), f.temp(key_rows(heads, v, "f32")));
    let (dkvb, dpe) = (f.temp(key_rows(1, f.hp, "f32")), f.temp(key_rows(1, rope, "f32")));
    let grad_of = |of: GradOf, into| step(flash(FlashMode::Grad(of)), vec![queries, keys, values, dout, lse, dd, into]);
    f.steps.extend([
        step(flash(FlashMode::Lse), vec![queries, keys, values, out, lse]),
        step(train_row(TrainRow::FlashDout { heads }, v), vec![Arg(4), out, dout, dd]),
        grad_of(GradOf::Queries, dq),
        grad_of(GradOf::Keys, dk),
        grad_of(GradOf::Values, dv),
        step(train_row(TrainRow::FlashDq { heads, nope }, qk), vec![dq, Res(0), Res(1)]),
        step(train_row(TrainRow::FlashDkv { heads, nope, v }, qk), vec![dk, dv, dkvb, dpe]),
    ]);
    f.latent_gradients(body, tensor_cores, dkvb, dpe)?;
    Ok(Steps { steps: f.steps, temps: f.temps, rope_table: None })
}

/// The routed experts (f32, no shared experts in the op) on CUDA cores: each (token, slot)'s
/// hidden row, then each token's output over its slots in expert order.
fn moe_experts(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let segments = o.attribute("operandSegmentSizes").map(|a| a.to_string()).unwrap_or_default();
    if !body.operands_are_args(o) || !body.returns_results_of(o) || !all_f32_but_idx(o) {
        return Err("moe_experts (f32 masters, its operands in order)".into());
    }
    if !segments.contains("1, 1, 1, 1, 1, 1, 0, 0, 0") {
        return Err("moe_experts with shared experts in the op".into());
    }
    let (idx, gate, x) = (operand_shape(o, 1)?, operand_shape(o, 3)?, operand_shape(o, 0)?);
    let (k, inter, d) = (width(&idx)?, stacked_rows(&gate)?, width(&x)?);
    use Operand::{Arg, Result as Res, Temp as Tmp};
    let row = |op, d| StepKernel::Row(train_kernel(op, d, "f32"));
    if flag(o, "fp8_activations") {
        return moe_experts_fp8(&body.name, gate.dims[0].ok_or("a dynamic expert count")?, k, inter, d);
    }
    Ok(Steps {
        steps: vec![
            Step {
                only: None,
                kernel: row(TrainRow::MoeHidden { k, keep: false }, inter),
                operands: vec![Arg(0), Arg(1), Arg(3), Arg(4), Tmp(0)],
            },
            Step {
                only: None,
                kernel: row(TrainRow::MoeCombine { k }, d),
                operands: vec![Tmp(0), Arg(1), Arg(2), Arg(5), Res(0)],
            },
        ],
        temps: vec![Temp::per_row(k, inter, "f32")],
        rope_table: None,
    })
}

/// The FP8 recipe's routed experts (forward) on the tensor cores ([`Experts::forward`]), each
/// pair's output row times its routing weight, and per token its slots' rows summed in expert order
/// (no atomics: the reference's order).
fn moe_experts_fp8(kernel: &str, experts: usize, k: usize, inter: usize, d: usize) -> Result<Steps, String> {
    use Operand::{Arg, Result as Res};
    let mut ex = Experts::new(kernel, experts, k, inter, d)?;
    let f = ex.forward([Arg(0), Arg(1), Arg(2), Arg(3), Arg(4), Arg(5)], false);
    let ys = ex.per_pair(d, "f32");
    ex.gemm("down", Contiguous, (f.hq, f.hs), f.down, (d, inter), Some(f.wt), ys);
    ex.row(TrainRow::PairCombine { k, two: false }, d, vec![ys, Arg(1), f.pos, Res(0)]);
    Ok(ex.into_steps())
}

/// An expert weight's e4m3 blocks for the grouped GEMMs: the blocks (`[E * rows, K]`) and their
/// 128x128 scales repeated per row.
#[derive(Clone, Copy)]
struct ExpertBlocks {
    q: Operand,
    row_scale: Operand,
}

/// What [`Experts::forward`] leaves for the steps after it: down's blocks, the pairs sorted by
/// expert (`offsets`, `pairs`) and per sorted row its token, routing weight and place (`pos`), the
/// gate and up products, the hidden rows quantized (and in f32 when kept), all in sorted order.
struct Forward {
    down: ExpertBlocks,
    offsets: Operand,
    pairs: Operand,
    tok: Operand,
    wt: Operand,
    pos: Operand,
    g: Operand,
    u: Operand,
    hq: Operand,
    hs: Operand,
    h: Option<Operand>,
}

/// The steps of the FP8 experts on the tensor cores (one fused kernel's), with their temporaries.
/// Rows are (token, slot) pairs sorted by expert; every GEMM is the grouped fp8 template over
/// blocks the steps quantize from the f32 masters (per-row B scales: experts of any row count).
struct Experts {
    kernel: String,
    experts: usize,
    k: usize,
    inter: usize,
    d: usize,
    steps: Vec<Step>,
    temps: Vec<Temp>,
    /// The expert offsets and the sorted rows' tokens, once sorted.
    sorted: Option<(Operand, Operand)>,
}

impl Experts {
    fn new(kernel: &str, experts: usize, k: usize, inter: usize, d: usize) -> Result<Experts, String> {
        // TMA rows of e4m3: 16-byte multiples.
        if !d.is_multiple_of(16) || !inter.is_multiple_of(16) {
            return Err(format!("fp8 experts of hidden {d} x intermediate {inter} (TMA needs multiples of 16)"));
        }
        Ok(Experts {
            kernel: kernel.to_string(),
            experts,
            k,
            inter,
            d,
            steps: Vec::new(),
            temps: Vec::new(),
            sorted: None,
        })
    }

    fn temp(&mut self, t: Temp) -> Operand {
        self.temps.push(t);
        Operand::Temp(self.temps.len() - 1)
    }

    /// A temporary of one row per pair.
    fn per_pair(&mut self, cols: usize, element: &str) -> Operand {
        self.temp(Temp::per_row(self.k, cols, element))
    }

    fn fixed(&mut self, rows: usize, cols: usize, element: &str) -> Operand {
        let mut t = Temp::per_row(1, cols, element);
        t.fixed_rows = Some(rows);
        self.temp(t)
    }

    fn row(&mut self, op: TrainRow, d: usize, operands: Vec<Operand>) {
        self.steps.push(Step { only: None, kernel: StepKernel::Row(train_kernel(op, d, "f32")), operands });
    }

    /// `x`'s rows (`cols` wide) quantized 1x128 into new temporaries.
    fn quantize(&mut self, x: Operand, cols: usize) -> (Operand, Operand) {
        let (q, s) = (self.per_pair(cols, "f8E4M3FN"), self.per_pair(cols.div_ceil(GROUP), "f32"));
        self.row(TrainRow::Quantize, cols, vec![x, q, s]);
        (q, s)
    }

    /// The stacked master `w [E * rows, cols]` in 128x128 blocks per expert (`transposed`: each
    /// expert's `[cols, rows]`), with the scales per row of the blocks.
    fn blocks(&mut self, w: Operand, rows: usize, cols: usize, transposed: bool) -> ExpertBlocks {
        let e = self.experts;
        // The blocks' rows and columns per expert.
        let (r, c) = if transposed { (cols, rows) } else { (rows, cols) };
        let tiles = c.div_ceil(GROUP);
        let q = self.fixed(e * r, c, "f8E4M3FN");
        let scale = self.fixed(e * r.div_ceil(GROUP), tiles, "f32");
        let row_scale = self.fixed(e * r, tiles, "f32");
        self.row(TrainRow::QuantizeBlocks { tiles, transposed, matrix_rows: rows }, GROUP, vec![w, q, scale]);
        self.row(TrainRow::RowScales { matrix_rows: r }, tiles, vec![scale, row_scale]);
        ExpertBlocks { q, row_scale }
    }

    /// The grouped fp8 GEMM `out [pairs, n] = a . b_e^T` per expert e over its sorted rows (A's
    /// rows gathered by token, or A in sorted order), times `row_scale` per row when given.
    /// Operands: A, its scales, B, its per-row scales, offsets, the rows' tokens, (row scale,) out.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        name: &str,
        grouping: GemmGrouping,
        (a, a_scale): (Operand, Operand),
        b: ExpertBlocks,
        (n, k): (usize, usize),
        row_scale: Option<Operand>,
        out: Operand,
    ) {
        let (offsets, tok) = self.sorted.expect("the pairs are sorted before a grouped GEMM");
        let gemm = GemmKernel {
            grouped: Some(super::lower::Grouped {
                grouping,
                groups: self.experts,
                routed: self.experts,
                per_token: self.k,
                offsets: 4,
                perm: 5,
                row_scale: row_scale.map(|_| 6),
                scatter: false,
                weights: Vec::new(),
                b_row_scales: true,
            }),
            ..GemmKernel::fp8(format!("{}.{name}", self.kernel), n, k)
        };
        let mut operands = vec![a, a_scale, b.q, b.row_scale, offsets, tok];
        operands.extend(row_scale);
        operands.push(out);
        self.steps.push(Step { only: None, kernel: StepKernel::Gemm(gemm), operands });
    }

    /// The experts' forward from the kernel's `[x, idx, w, gate, up, down]`: x quantized 1x128, each
    /// master in blocks as its GEMM comes (down's last, for the caller), the pairs sorted by expert ([`TrainRow::PairSort`], [`TrainRow::PairRows`]),
    /// the pairs' token rows copied into expert order through gate and up, SwiGLU in f32 quantized 1x128 (`keep`: and
    /// kept in f32, for the gradient).
    fn forward(&mut self, [x, idx, w, gate, up, down]: [Operand; 6], keep: bool) -> Forward {
        let (e, k, inter, d) = (self.experts, self.k, self.inter, self.d);
        let (xq, xs) =
            (self.temp(Temp::per_row(1, d, "f8E4M3FN")), self.temp(Temp::per_row(1, d.div_ceil(GROUP), "f32")));
        self.row(TrainRow::Quantize, d, vec![x, xq, xs]);
        let offsets = self.fixed(e + 1, 1, "i32");
        let (pairs, tok, wt, pos) =
            (self.per_pair(1, "i32"), self.per_pair(1, "i32"), self.per_pair(1, "f32"), self.per_pair(1, "i32"));
        self.row(TrainRow::PairSort, e, vec![idx, offsets, pairs]);
        self.row(TrainRow::PairRows { k }, k, vec![pairs, w, tok, wt, pos]);
        self.sorted = Some((offsets, tok));
        let (g, u, gu) = (self.per_pair(inter, "f32"), self.per_pair(inter, "f32"), self.per_pair(2 * inter, "f32"));
        // The pairs' token rows copied into expert order (`tok [P, 1]`: one slot a row), read by
        // contiguous grouped GEMMs — gathering each row by TMA in the GEMM ran at a fifth of their
        // speed on the H200 (92 against 430-473 TFLOP/s).
        let (xq_sorted, xs_sorted) = (self.per_pair(d, "f8E4M3FN"), self.per_pair(d.div_ceil(GROUP), "f32"));
        self.steps.push(Step {
            only: None,
            kernel: StepKernel::Row(RowKernel::new(RowOp::GatherFp8, d, "f32")),
            operands: vec![xq, xs, tok, xq_sorted, xs_sorted],
        });
        // Each weight's blocks made as its GEMM reads them: one set live at a time (the
        // temporaries of launches that do not overlap share bytes).
        let gate = self.blocks(gate, inter, d, false);
        self.gemm("gate", Contiguous, (xq_sorted, xs_sorted), gate, (inter, d), None, g);
        let up = self.blocks(up, inter, d, false);
        self.gemm("up", Contiguous, (xq_sorted, xs_sorted), up, (inter, d), None, u);
        self.row(TrainRow::Join { second: inter }, inter, vec![g, u, gu]);
        let (hq, hs) = (self.per_pair(inter, "f8E4M3FN"), self.per_pair(inter.div_ceil(GROUP), "f32"));
        let silu = |quantize| StepKernel::Row(RowKernel::new(RowOp::SiluMul { quantize }, inter, "f32"));
        self.steps.push(Step { only: None, kernel: silu(true), operands: vec![gu, hq, hs] });
        let h = keep.then(|| self.per_pair(inter, "f32"));
        if let Some(h) = h {
            self.steps.push(Step { only: None, kernel: silu(false), operands: vec![gu, h] });
        }
        let down = self.blocks(down, d, inter, false);
        Forward { down, offsets, pairs, tok, wt, pos, g, u, hq, hs, h }
    }

    fn into_steps(self) -> Steps {
        Steps { steps: self.steps, temps: self.temps, rope_table: None }
    }
}

/// The rows per expert of stacked expert weights `[E, rows, cols]`.
fn stacked_rows(s: &Shape) -> Result<usize, String> {
    match s.dims[..] {
        [Some(_), Some(rows), Some(_)] => Ok(rows),
        _ => Err(format!("expert weights of {s} (not [E, rows, cols])")),
    }
}

/// Every operand f32 but the experts' indices (i32, the second).
fn all_f32_but_idx(o: &OperationRef) -> bool {
    (0..o.operand_count()).all(|i| operand_shape(o, i).is_ok_and(|s| s.element == if i == 1 { "i32" } else { "f32" }))
}

/// The routed experts' gradients (f32) on CUDA cores: the forward's hidden rows kept, per (token,
/// slot) the expert's output, SwiGLU's gradient and the routing weight's; per token the input
/// gradient; the pairs sorted by expert; then per expert one launch per weight gradient, written
/// straight into the kernel's per-expert results (the stacked gradients' split and reshape chain).
fn moe_experts_grad(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    if !body.operands_are_args(o) || !all_f32_but_idx(o) || o.result_count() != 5 {
        return Err("moe_experts_grad (f32 masters, its operands in order)".into());
    }
    let (x, idx, gate, down) = (operand_shape(o, 0)?, operand_shape(o, 1)?, operand_shape(o, 4)?, operand_shape(o, 6)?);
    let (k, inter, d) = (width(&idx)?, stacked_rows(&gate)?, width(&x)?);
    let experts = gate.dims[0].ok_or("a dynamic expert count")?;
    if stacked_rows(&down)? != d {
        return Err(format!("down weights of {down} for rows of {d}"));
    }
    // Which stacked gradient (0 gate, 1 up, 2 down) and experts each value of the chain is.
    let mut traced: std::collections::HashMap<usize, (usize, usize, usize)> = std::collections::HashMap::new();
    for which in 0..3 {
        traced.insert(raw(o.result(2 + which).map_err(|e| e.to_string())?.into()), (which, 0, experts));
    }
    for (op, name) in body.ops.iter().zip(&body.names).skip(1) {
        let source = op.operand(0).map_err(|e| e.to_string())?;
        let &(which, first, count) = traced.get(&raw(source)).ok_or("a split of another value than the gradients")?;
        match name.as_str() {
            "split" if int_attr(op, "axis") == Some(0) => {
                let mut at = first;
                for piece in 0..op.result_count() {
                    let n = result_shape(op, piece)?.dims[0].ok_or("a dynamic piece")?;
                    traced.insert(raw(op.result(piece).map_err(|e| e.to_string())?.into()), (which, at, n));
                    at += n;
                }
            }
            "reshape" if count == 1 => {
                traced.insert(raw(op.result(0).map_err(|e| e.to_string())?.into()), (which, first, 1));
            }
            other => return Err(format!("moe_experts_grad followed by {other}")),
        }
    }
    let returned_is = |i: usize, r: usize| o.result(r).is_ok_and(|v| raw(v.into()) == raw(body.returned[i]));
    if body.returned.len() < 2 || !returned_is(0, 0) || !returned_is(1, 1) {
        return Err("moe_experts_grad returning other values first than dx and the weights' gradient".into());
    }
    // Per result after dx and dw: which gradient (0 gate, 1 up, 2 down) of which expert.
    let mut pieces = Vec::new();
    for (i, v) in body.returned.iter().enumerate().skip(2) {
        let &(which, e, count) = traced.get(&raw(*v)).ok_or("a result that is not an expert's gradient")?;
        if count != 1 || shape(*v)?.dims.len() != 2 {
            return Err("a result that is not one expert's gradient".into());
        }
        pieces.push((i, which, e));
    }
    if flag(o, "fp8") {
        return moe_experts_grad_fp8(&body.name, experts, k, inter, d, &pieces);
    }
    use Operand::{Arg, Result as Res, Temp as Tmp};
    let row = |op, d| StepKernel::Row(train_kernel(op, d, "f32"));
    let mut steps = vec![
        Step {
            only: None,
            kernel: row(TrainRow::MoeHidden { k, keep: true }, inter),
            operands: vec![Arg(0), Arg(1), Arg(4), Arg(5), Tmp(2), Tmp(0), Tmp(1)],
        },
        Step {
            only: None,
            kernel: row(TrainRow::MoeGradToken { k }, inter),
            operands: vec![Arg(3), Arg(1), Arg(2), Arg(6), Tmp(0), Tmp(1), Tmp(2), Tmp(3), Tmp(4), Tmp(5), Res(1)],
        },
        Step {
            only: None,
            kernel: row(TrainRow::MoeGradX { k }, d),
            operands: vec![Tmp(4), Tmp(5), Arg(1), Arg(4), Arg(5), Res(0)],
        },
        Step { only: None, kernel: row(TrainRow::PairSort, experts), operands: vec![Arg(1), Tmp(6), Tmp(7)] },
    ];
    for &(i, which, e) in &pieces {
        let offsets = Operand::TempRows { temp: 6, first: e, rows: 2 };
        steps.push(match which {
            2 => Step {
                only: None,
                kernel: row(TrainRow::MoeGradW { down: true }, inter),
                operands: vec![offsets, Tmp(7), Arg(2), Tmp(2), Arg(3), Res(i)],
            },
            _ => Step {
                only: None,
                kernel: row(TrainRow::MoeGradW { down: false }, d),
                operands: vec![offsets, Tmp(7), Arg(2), Tmp(4 + which), Arg(0), Res(i)],
            },
        });
    }
    let mut offsets = Temp::per_row(1, 1, "i32");
    offsets.fixed_rows = Some(experts + 1);
    let temps = vec![
        Temp::per_row(k, inter, "f32"),
        Temp::per_row(k, inter, "f32"),
        Temp::per_row(k, inter, "f32"),
        Temp::per_row(k, d, "f32"),
        Temp::per_row(k, inter, "f32"),
        Temp::per_row(k, inter, "f32"),
        offsets,
        Temp::per_row(k, 1, "i32"),
    ];
    Ok(Steps { steps, temps, rope_table: None })
}

/// The FP8 recipe's Fprop (`fp8_linear`: `x [T, K]`, master `w [N, K]`) or Dgrad
/// (`fp8_linear_dgrad`: `dy [T, N]`, `w` -> `[T, K]`) on the tensor cores: the activation rows
/// quantized 1x128, the master weight in 128x128 blocks (transposed for Dgrad), the fp8 GEMM
/// template into a temporary of the run's rows, then copied into the results (the output whole,
/// reshaped into heads, and/or its column pieces).
fn fp8_projection(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let dgrad = body.names[0] == "fp8_linear_dgrad";
    if !body.operands_are_args(o) || !all_f32(o) || o.operand_count() != 2 {
        return Err(format!("{} (two f32 operands in order)", body.names[0]));
    }
    let (act, w) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
    let dim = |s: &Shape, i: usize| s.dims.get(i).copied().flatten().ok_or_else(|| format!("{s}: a dynamic dim"));
    let (rows, cols) = (dim(&w, 0)?, dim(&w, 1)?);
    // The GEMM's N (output columns) and K (the contraction).
    let (n, k) = if dgrad { (cols, rows) } else { (rows, cols) };
    if width(&act)? != k {
        return Err(format!("{} of {act} with weights {w}", body.names[0]));
    }
    let group = GROUP;
    let mut blocks = Temp::per_row(1, k, "f8E4M3FN");
    blocks.fixed_rows = Some(n);
    let mut block_scales = Temp::per_row(1, k.div_ceil(group), "f32");
    block_scales.fixed_rows = Some(n.div_ceil(group));
    let temps = vec![
        Temp::per_row(1, n, "f32"),
        Temp::per_row(1, k, "f8E4M3FN"),
        Temp::per_row(1, k.div_ceil(group), "f32"),
        blocks,
        block_scales,
    ];
    use Operand::{Arg, Temp as Tmp};
    let quantize_blocks = TrainRow::QuantizeBlocks { tiles: k.div_ceil(group), transposed: dgrad, matrix_rows: 0 };
    let gemm = GemmKernel::fp8(format!("{}.gemm", body.name), n, k);
    let mut steps = vec![
        Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(TrainRow::Quantize, k, "f32")),
            operands: vec![Arg(0), Tmp(1), Tmp(2)],
        },
        Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(quantize_blocks, group, "f32")),
            operands: vec![Arg(1), Tmp(3), Tmp(4)],
        },
        Step { only: None, kernel: StepKernel::Gemm(gemm), operands: vec![Tmp(1), Tmp(2), Tmp(3), Tmp(4), Tmp(0)] },
    ];
    steps.extend(copies_from(body, 0, n)?);
    Ok(Steps { steps, temps, rope_table: None })
}

/// The copies of temporary `temp` (the first op's `[T, n]` output) into the kernel's results:
/// each returned value is the output, its reshape into heads, or a column piece of either.
fn copies_from(body: &Body, temp: usize, n: usize) -> Result<Vec<Step>, String> {
    // Per value: (row stride, first column, columns) in the temporary's flat rows.
    let mut traced: std::collections::HashMap<usize, (usize, usize, usize)> = std::collections::HashMap::new();
    traced.insert(raw(body.ops[0].result(0).map_err(|e| e.to_string())?.into()), (n, 0, n));
    for (op, name) in body.ops.iter().zip(&body.names).skip(1) {
        let source = op.operand(0).map_err(|e| e.to_string())?;
        let &(stride, start, cols) = traced.get(&raw(source)).ok_or("a view of another value than the output")?;
        let last_axis = shape(source)?.dims.len() - 1;
        match name.as_str() {
            "reshape" if start == 0 && cols == stride => {
                let w = width(&result_shape(op, 0)?)?;
                traced.insert(raw(op.result(0).map_err(|e| e.to_string())?.into()), (w, 0, w));
            }
            "split" if int_attr(op, "axis") == Some(last_axis as i64) => {
                let mut at = start;
                for piece in 0..op.result_count() {
                    let w = width(&result_shape(op, piece)?)?;
                    traced.insert(raw(op.result(piece).map_err(|e| e.to_string())?.into()), (stride, at, w));
                    at += w;
                }
            }
            other => return Err(format!("{} followed by {other}", body.names[0])),
        }
    }
    body.returned
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let &(stride, start, cols) = traced.get(&raw(*v)).ok_or("a result that is not a view of the output")?;
            let kernel = train_kernel(TrainRow::Columns { start, stride }, cols, "f32");
            Ok(Step {
                only: None,
                kernel: StepKernel::Row(kernel),
                operands: vec![Operand::Temp(temp), Operand::Result(i)],
            })
        })
        .collect()
}

/// The FP8 recipe's Wgrad (`dy [T, N]`, `x [T, K]` -> `[N, K]`) on the tensor cores: both
/// quantized in 128x1 token tiles into their transposes (`dy^T [N, T]`, `x^T [K, T]`, 1x128 rows
/// along the tokens), then the fp8 GEMM template in Wgrad's form (M = N fixed, K = the tokens, B
/// scales per row) straight into the result.
fn fp8_wgrad(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    if !body.operands_are_args(o) || !body.returns_results_of(o) || !all_f32(o) {
        return Err("fp8_linear_wgrad (f32 operands in order)".into());
    }
    let (n, k) = (width(&operand_shape(o, 0)?)?, width(&operand_shape(o, 1)?)?);
    use Operand::{Arg, Result as Res, Temp as Tmp};
    let group = GROUP;
    let cols = |c| StepKernel::Row(train_kernel(TrainRow::QuantizeCols, c, "f32"));
    // The tokens padded to 16 bytes of e4m3 (TMA's row pitch); one scale per 128 tokens.
    let (tokens, groups) = (RunCols::new(1, 16), RunCols::new(group, 1));
    let gemm =
        GemmKernel { results: Vec::new(), fixed_m: Some(n), ..GemmKernel::fp8(format!("{}.gemm", body.name), k, 0) };
    Ok(Steps {
        steps: vec![
            Step { only: None, kernel: cols(n), operands: vec![Arg(0), Tmp(0), Tmp(1)] },
            Step { only: None, kernel: cols(k), operands: vec![Arg(1), Tmp(2), Tmp(3)] },
            Step { only: None, kernel: StepKernel::Gemm(gemm), operands: vec![Tmp(0), Tmp(1), Tmp(2), Tmp(3), Res(0)] },
        ],
        temps: vec![
            Temp::transposed(n, tokens, "f8E4M3FN"),
            Temp::transposed(n, groups, "f32"),
            Temp::transposed(k, tokens, "f8E4M3FN"),
            Temp::transposed(k, groups, "f32"),
        ],
        rope_table: None,
    })
}

/// The FP8 recipe's routed experts' gradients (the reference's `moe_experts_grad_fp8`): the
/// forward recomputed on the tensor cores ([`Experts::forward`], the hidden rows kept), each pair's
/// output row; per sorted row `dye = dy * w` and the routing weight's gradient; Dgrad through down
/// (its blocks transposed per expert) and SwiGLU's gradient, Dgrad through gate and up (transposed
/// blocks) summed per token over its slots in expert order — all grouped GEMMs; then per expert
/// and weight a Wgrad GEMM over the expert's 128-pair tiles of its sorted rows (transposed, each
/// expert's from a 128-aligned column: its K range, which only the device knows), into its result.
fn moe_experts_grad_fp8(
    kernel: &str,
    experts: usize,
    k: usize,
    inter: usize,
    d: usize,
    pieces: &[(usize, usize, usize)],
) -> Result<Steps, String> {
    use Operand::{Arg, Result as Res};
    let mut ex = Experts::new(kernel, experts, k, inter, d)?;
    // Arguments: x, idx, w, dy, gate, up, down.
    let f = ex.forward([Arg(0), Arg(1), Arg(2), Arg(4), Arg(5), Arg(6)], true);
    let y = ex.per_pair(d, "f32");
    ex.gemm("down", Contiguous, (f.hq, f.hs), f.down, (d, inter), None, y);
    let dye = ex.per_pair(d, "f32");
    ex.row(TrainRow::PairGrad { k }, d, vec![Arg(3), y, f.tok, f.wt, f.pairs, dye, Res(1)]);
    let dye_q = ex.quantize(dye, d);
    let down_t = ex.blocks(Arg(6), d, inter, true);
    let dh = ex.per_pair(inter, "f32");
    ex.gemm("down_dgrad", Contiguous, dye_q, down_t, (inter, d), None, dh);
    let (gg, uu) = (ex.per_pair(inter, "f32"), ex.per_pair(inter, "f32"));
    ex.row(TrainRow::SiluMulGrad, inter, vec![f.g, f.u, dh, gg, uu]);
    let (gg_q, uu_q) = (ex.quantize(gg, inter), ex.quantize(uu, inter));
    // Each weight's transposed blocks made as its Dgrad reads them (one set live at a time).
    let (dxg, dxu) = (ex.per_pair(d, "f32"), ex.per_pair(d, "f32"));
    let gate_t = ex.blocks(Arg(4), inter, d, true);
    ex.gemm("gate_dgrad", Contiguous, gg_q, gate_t, (d, inter), None, dxg);
    let up_t = ex.blocks(Arg(5), inter, d, true);
    ex.gemm("up_dgrad", Contiguous, uu_q, up_t, (d, inter), None, dxu);
    ex.row(TrainRow::PairCombine { k, two: true }, d, vec![dxg, dxu, Arg(1), f.pos, Res(0)]);
    // Wgrad's operands: each expert's sorted rows (x's by token) quantized in 128-pair groups and
    // transposed, every expert's pairs from a 128-aligned column (padded with zeros).
    let h = f.h.expect("kept");
    let padded = ex.fixed(experts + 1, 1, "i32");
    ex.row(TrainRow::PadOffsets, experts, vec![f.offsets, padded]);
    // The pairs, each expert's padded to whole groups of 128.
    let pairs = RunCols { factor: k, extra: experts * GROUP, ..RunCols::new(1, 16) };
    let groups = RunCols { group: GROUP, ..pairs };
    let mut tiles = |src: Operand, by_token: bool, cols: usize| {
        let (q, s) =
            (ex.temp(Temp::transposed(cols, pairs, "f8E4M3FN")), ex.temp(Temp::transposed(cols, groups, "f32")));
        ex.row(TrainRow::QuantizePairs { by_token }, cols, vec![f.offsets, padded, f.pairs, Arg(2), src, q, s]);
        (q, s)
    };
    let (dye_t, h_t, gg_t, uu_t, x_t) = (
        tiles(dye, false, d),
        tiles(h, false, inter),
        tiles(gg, false, inter),
        tiles(uu, false, inter),
        tiles(Arg(0), true, d),
    );
    let Operand::Temp(padded) = padded else { unreachable!("a temporary") };
    // Per expert, the fp8 GEMM template in Wgrad's form over the expert's padded pair columns (its
    // K range, from the device), straight into the expert's result.
    let names = ["gate", "up", "down"];
    for &(i, which, e) in pieces {
        let range = Operand::TempRows { temp: padded, first: e, rows: 2 };
        // d down [D, I] = dye^T h; d gate [I, D] = gg^T x; d up = uu^T x.
        let (a, b, m, n) = match which {
            2 => (dye_t, h_t, d, inter),
            0 => (gg_t, x_t, inter, d),
            _ => (uu_t, x_t, inter, d),
        };
        let gemm = GemmKernel {
            results: Vec::new(),
            fixed_m: Some(m),
            k_range: Some(KRange { operand: 4, per_token: k, groups: experts }),
            a2: None,
            ..GemmKernel::fp8(format!("{kernel}.wgrad_{}", names[which]), n, 0)
        };
        ex.steps.push(Step {
            only: None,
            kernel: StepKernel::Gemm(gemm),
            operands: vec![a.0, a.1, b.0, b.1, range, Res(i)],
        });
    }
    Ok(ex.into_steps())
}

/// The loss weight of a `cross_entropy(_grad)`.
fn weight_attr(o: &OperationRef) -> Result<f32, String> {
    o.attribute("weight")
        .ok()
        .and_then(|a| a.to_string().split(':').next().and_then(|n| n.trim().parse::<f32>().ok()))
        .ok_or_else(|| "cross-entropy without a weight".to_string())
}

/// The mean cross-entropy: each row's loss into a temporary, then their weighted mean.
fn cross_entropy(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let logits = operand_shape(o, 0)?;
    if !body.operands_are_args(o) || !body.returns_results_of(o) || logits.element != "f32" {
        return Err("cross_entropy with its operands in another order".into());
    }
    let weight = weight_attr(o)?;
    let per_row = train_kernel(TrainRow::CrossEntropy { grad: false, weight: 1.0 }, width(&logits)?, "f32");
    Ok(Steps {
        steps: vec![
            Step {
                only: None,
                kernel: StepKernel::Row(per_row),
                operands: vec![Operand::Arg(0), Operand::Arg(1), Operand::Temp(0)],
            },
            Step {
                only: None,
                kernel: StepKernel::Row(train_kernel(TrainRow::LossMean { weight }, 1, "f32")),
                operands: vec![Operand::Arg(0), Operand::Temp(0), Operand::Result(0)],
            },
        ],
        temps: vec![Temp::per_row(1, 1, "f32")],
        rope_table: None,
    })
}

/// The balance loss (or its gradient): the experts' frequencies into a temporary, then per token
/// its term (into a temporary, then the mean) or its logits' gradient.
fn balance_loss(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let (logits, idx) = (operand_shape(o, 0)?, operand_shape(o, 1)?);
    if !body.operands_are_args(o) || !body.returns_results_of(o) || logits.element != "f32" || idx.element != "i32" {
        return Err(format!("{} of {logits} and {idx}", body.names[0]));
    }
    let alpha = o
        .attribute("alpha")
        .ok()
        .and_then(|a| a.to_string().split(':').next().and_then(|n| n.trim().parse::<f32>().ok()))
        .ok_or("balance loss without alpha")?;
    let experts = width(&logits)?;
    let grad = body.names[0] == "balance_loss_grad";
    let softmax = crate::mlir::softmax_scoring(o);
    let row = |op| StepKernel::Row(train_kernel(op, experts, "f32"));
    let mut steps =
        vec![Step { only: None, kernel: row(TrainRow::ExpertFreq), operands: vec![Operand::Arg(1), Operand::Temp(0)] }];
    let mut temps = vec![Temp::per_row(1, experts, "f32")];
    if grad {
        steps.push(Step {
            only: None,
            kernel: row(TrainRow::BalanceRows { grad: true, alpha, softmax }),
            operands: vec![Operand::Arg(0), Operand::Temp(0), Operand::Result(0)],
        });
    } else {
        temps.push(Temp::per_row(1, 1, "f32"));
        steps.push(Step {
            only: None,
            kernel: row(TrainRow::BalanceRows { grad: false, alpha, softmax }),
            operands: vec![Operand::Arg(0), Operand::Temp(0), Operand::Temp(1)],
        });
        steps.push(Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(TrainRow::LossMean { weight: alpha }, 1, "f32")),
            operands: vec![Operand::Arg(0), Operand::Temp(1), Operand::Result(0)],
        });
    }
    Ok(Steps { steps, temps, rope_table: None })
}

/// A concatenation along rows (the latent after the cache's rows): each part copied into its rows.
fn concat_rows(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let axis = int_attr(o, "axis").ok_or("concat without axis")?;
    let out = result_shape(o, 0)?;
    if axis != 0 || !body.operands_are_args(o) || !body.returns_results_of(o) || !all_f32(o) || out.dims.len() != 2 {
        return Err("concat (of other than two f32 matrices' rows)".into());
    }
    let d = width(&out)?;
    let copy = |shifted: bool| StepKernel::Row(train_kernel(TrainRow::RowRange { into: true, shifted }, d, "f32"));
    Ok(Steps {
        steps: vec![
            Step { only: None, kernel: copy(false), operands: vec![Operand::Arg(0), Operand::Result(0)] },
            Step {
                only: None,
                kernel: copy(true),
                operands: vec![Operand::Arg(1), Operand::Arg(0), Operand::Result(0)],
            },
        ],
        temps: Vec::new(),
        rope_table: None,
    })
}

/// Where the kernel returns value `v` (as which result), if it does.
pub(super) fn returned_as(body: &Body, v: Value) -> Option<usize> {
    body.returned.iter().position(|r| raw(*r) == raw(v))
}

/// The embedding table's gradient: the tokens sorted by id (temporary 0, `order`), then each
/// table row summing its own tokens' rows ([`TrainRow::EmbedGrad`]).
fn embed_grad(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let dy = operand_shape(o, 1)?;
    if !body.operands_are_args(o) || !body.returns_results_of(o) || dy.element != "f32" {
        return Err(format!("embed_grad of {dy} (its operands in order, its result returned)"));
    }
    let rank = train_kernel(TrainRow::IdRank, ID_RANK_TOKENS, "f32");
    let grad = train_kernel(TrainRow::EmbedGrad, width(&dy)?, "f32");
    let steps = vec![
        Step { only: None, kernel: StepKernel::Row(rank), operands: vec![Operand::Arg(0), Operand::Temp(0)] },
        Step {
            only: None,
            kernel: StepKernel::Row(grad),
            operands: vec![Operand::Arg(0), Operand::Temp(0), Operand::Arg(1), Operand::Result(0)],
        },
    ];
    Ok(Steps { steps, temps: vec![Temp { rows_of: Some(0), ..Temp::per_row(1, 1, "i32") }], rope_table: None })
}

/// Tokens a block of [`TrainRow::IdRank`] sorts (a thread each).
const ID_RANK_TOKENS: usize = 256;

fn rms_norm_grad(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    if !body.operands_are_args(o) {
        return Err("rms_norm_grad with its operands in another order".into());
    }
    let (x, w, dy) = (operand_shape(o, 0)?, operand_shape(o, 1)?, operand_shape(o, 2)?);
    if x.element != "f32" || dy.element != "f32" || x.dims.len() != 2 {
        return Err(format!("rms_norm_grad of {x} and {dy}"));
    }
    let d = width(&x)?;
    let eps = o
        .attribute("eps")
        .ok()
        .and_then(|a| a.to_string().split(':').next().and_then(|n| n.trim().parse::<f32>().ok()))
        .ok_or("rms_norm_grad without an eps")?;
    let result = |i: usize| o.result(i).map(|r| returned_as(body, r.into())).map_err(|e| e.to_string());
    let (dx, dw) = (result(0)?, result(1)?);
    if body.returned.len() != usize::from(dx.is_some()) + usize::from(dw.is_some()) {
        return Err("rms_norm_grad returning other values".into());
    }
    // Temporaries: each row's r, then dx when it is not returned.
    let mut temps = vec![Temp::per_row(1, 1, "f32")];
    let dx_operand = match dx {
        Some(i) => Operand::Result(i),
        None => {
            temps.push(Temp::per_row(1, d, "f32"));
            Operand::Temp(1)
        }
    };
    let mut steps = vec![Step {
        only: None,
        kernel: StepKernel::Row(train_kernel(TrainRow::RmsNormGrad { eps }, d, &w.element)),
        operands: vec![Operand::Arg(0), Operand::Arg(1), Operand::Arg(2), dx_operand, Operand::Temp(0)],
    }];
    if let Some(i) = dw {
        steps.push(Step {
            only: None,
            kernel: StepKernel::Row(train_kernel(TrainRow::RmsNormDw, d, "f32")),
            operands: vec![Operand::Arg(0), Operand::Arg(2), Operand::Temp(0), Operand::Result(i)],
        });
    }
    Ok(Steps { steps, temps, rope_table: None })
}

fn concat_grad(body: &Body) -> Result<Steps, String> {
    let o = &body.ops[0];
    let dy = operand_shape(o, 0)?;
    let axis = int_attr(o, "axis").ok_or("concat_grad without axis")? as usize;
    if !body.operands_are_args(o) || !all_f32(o) {
        return Err(format!("concat_grad of {dy} with its operands in another order"));
    }
    if axis == 0 && dy.dims.len() == 2 {
        // Row pieces: d lhs the first rows of dy, d rhs the rows after lhs's.
        let d = width(&dy)?;
        let mut steps = Vec::new();
        for (piece, shifted) in [(0, false), (1, true)] {
            let r = o.result(piece).map_err(|e| e.to_string())?;
            if let Some(i) = returned_as(body, r.into()) {
                let kernel = train_kernel(TrainRow::RowRange { into: false, shifted }, d, "f32");
                let mut operands = vec![Operand::Arg(0)];
                if shifted {
                    operands.push(Operand::Arg(1));
                }
                operands.push(Operand::Result(i));
                steps.push(Step { only: None, kernel: StepKernel::Row(kernel), operands });
            }
        }
        if steps.len() != body.returned.len() {
            return Err("concat_grad returning other values".into());
        }
        return Ok(Steps { steps, temps: Vec::new(), rope_table: None });
    }
    if axis + 1 != dy.dims.len() {
        return Err(format!("concat_grad along axis {axis} of {dy} (rows of matrices or columns only)"));
    }
    let (lhs, stride) = (width(&operand_shape(o, 1)?)?, width(&dy)?);
    let mut steps = Vec::new();
    for (piece, start) in [(0, 0), (1, lhs)] {
        let r = o.result(piece).map_err(|e| e.to_string())?;
        if let Some(i) = returned_as(body, r.into()) {
            let kernel = train_kernel(TrainRow::Columns { start, stride }, width(&result_shape(o, piece)?)?, "f32");
            steps.push(Step {
                only: None,
                kernel: StepKernel::Row(kernel),
                operands: vec![Operand::Arg(0), Operand::Result(i)],
            });
        }
    }
    if steps.len() != body.returned.len() {
        return Err("concat_grad returning other values".into());
    }
    Ok(Steps { steps, temps: Vec::new(), rope_table: None })
}

/// [`tensor_core_matmul`] of a fused kernel of the f32 training recipe.
/// A training step whose attention runs in bf16 on the flash kernels ([`flash_attention_steps`])
/// has given up the reference's bits, so its f32 matmuls go to the tensor cores in either recipe:
/// the FP8 recipe's too (the head and its gradients, the router's, MTP's — on CUDA cores they keep
/// the reference's order for the e4m3 roundings downstream; the head alone is ~1 s of a 4096-token
/// window at full width there). `Some`: kernel's lowering with them as bf16 hi + lo GEMMs (a
/// one-op `matmul` / `linear` / `lm_head`, or a linear split into pieces); None: another kernel.
pub fn bf16_matmul_steps(kernel: &OperationRef) -> Option<Result<Steps, String>> {
    let body = Body::of(kernel)?;
    if let Some(steps) = tensor_core_matmul(&body) {
        return Some(Ok(steps));
    }
    let names: Vec<&str> = body.names.iter().map(String::as_str).collect();
    matches!(names[..], ["linear", "split"] | ["linear", "reshape", "split"]).then(|| linear_pieces(&body, true))
}

/// Whether `module` holds a training attention kernel the flash kernels take.
pub fn has_flash_attention(module: &melior::ir::Module) -> bool {
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if flash_attention_steps(&f).is_some_and(|s| s.is_ok()) {
            return true;
        }
    }
    false
}

pub fn tensor_core_matmul_of(kernel: &OperationRef) -> Option<Steps> {
    f32_recipe(kernel).then(|| tensor_core_matmul(&Body::of(kernel)?)).flatten()
}

/// Whether `kernel` belongs to a graph without FP8 projections (no `fp8_*` kernel beside it): its
/// f32 matmuls go to the tensor cores ([`matmul_steps`], ~1e-5 of f32). The FP8 recipe's stay on
/// CUDA cores in the reference's order: their outputs feed e4m3 quantizations downstream, where
/// differences that small flip roundings (a gradient then moves by up to an e4m3 step, ~6%).
fn f32_recipe(kernel: &OperationRef) -> bool {
    let Some(block) = kernel.block() else { return true };
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.attribute("sym_name").map(|a| a.to_string()).unwrap_or_default();
        if name.trim_matches('"').starts_with("fp8_") {
            return false;
        }
    }
    true
}

/// A one-op f32 `matmul` / `linear` / `lm_head` kernel through [`matmul_steps`] straight into its
/// result (`None`: another kernel, or shapes the tensor-core form does not take — the row kernel
/// runs it on CUDA cores).
fn tensor_core_matmul(body: &Body) -> Option<Steps> {
    let [name] = &body.names[..] else { return None };
    let o = &body.ops[0];
    if !matches!(name.as_str(), "matmul" | "linear" | "lm_head")
        || o.operand_count() != 2
        || !all_f32(o)
        || !body.operands_are_args(o)
        || !body.returns_results_of(o)
    {
        return None;
    }
    let (ta, tb) = if name == "matmul" { (flag(o, "transpose_a"), flag(o, "transpose_b")) } else { (false, true) };
    let (a, b) = (operand_shape(o, 0).ok()?, operand_shape(o, 1).ok()?);
    let mut temps = Vec::new();
    let steps = matmul_steps(
        &body.name,
        (Operand::Arg(0), &a),
        (Operand::Arg(1), &b),
        (ta, tb),
        Operand::Result(0),
        &mut temps,
    )
    .ok()?;
    Some(Steps { steps, temps, rope_table: None })
}

/// An f32 matmul `out = op(a) . op(b)` (2-D f32 operands, `op` transposing where asked) on the bf16
/// tensor cores to ~2^-16 relative: each operand split into bf16 `hi + lo` (`x = hi + lo`, round
/// to nearest even) laid out K-major as the GEMM template reads them — transposed by the split
/// where the contraction runs over its rows (padded to 8 columns: TMA's 16-byte rows) — then
/// `hi.hi + lo.hi` as one dual-A bf16 GEMM (b's hi read once for both) and `hi.lo` as a second
/// adding onto its f32 output (`lo.lo`, ~2^-18, is dropped). A contraction over the run's rows (a weight gradient) is the
/// template's Wgrad form (M fixed, K the tokens). Temporaries are appended to `temps`.
fn matmul_steps(
    fused: &str,
    (a, a_shape): (Operand, &Shape),
    (b, b_shape): (Operand, &Shape),
    (ta, tb): (bool, bool),
    out: Operand,
    temps: &mut Vec<Temp>,
) -> Result<Vec<Step>, String> {
    let dims = |s: &Shape| match s.dims[..] {
        [rows, Some(cols)] => Ok((rows, cols)),
        _ => Err(format!("{s}: not a matrix of static width")),
    };
    let ((ra, ca), (rb, cb)) = (dims(a_shape)?, dims(b_shape)?);
    // (M, K) of the A operand, (N, K) of B, as the template sees them.
    let (m, ka) = if ta { (Some(ca), ra) } else { (ra, Some(ca)) };
    let (n, kb) = if tb { (rb, Some(cb)) } else { (Some(cb), rb) };
    let n = n.ok_or("a matmul whose N is dynamic")?;
    if ka != kb {
        return Err(format!("a matmul of {a_shape} and {b_shape}: contraction mismatch"));
    }
    let fixed_m = match (ka, m) {
        (Some(k), _) if k % 8 != 0 => return Err(format!("a contraction of {k} (not a multiple of 8)")),
        (Some(_), _) => None,
        (None, Some(m)) => Some(m),
        (None, None) => return Err("a matmul over the run's rows into the run's rows".into()),
    };
    let mut steps = Vec::new();
    // Split x ([rows, cols] f32) into hi, lo temporaries: as rows, or transposed ([cols, rows]).
    let mut split = |x: Operand, (rows, cols): (Option<usize>, usize), transposed: bool| {
        let temp = |temps: &mut Vec<Temp>| {
            let t = match (transposed, rows) {
                (false, None) => Temp::per_row(1, cols, "bf16"),
                (false, Some(r)) => Temp { fixed_rows: Some(r), ..Temp::per_row(1, cols, "bf16") },
                (true, None) => Temp::transposed(cols, RunCols::new(1, 8), "bf16"),
                (true, Some(r)) => Temp { fixed_rows: Some(cols), ..Temp::per_row(1, r.next_multiple_of(8), "bf16") },
            };
            temps.push(t);
            Operand::Temp(temps.len() - 1)
        };
        let (hi, lo) = (temp(temps), temp(temps));
        let op = if transposed { RowOp::SplitBf16T } else { RowOp::SplitBf16 };
        steps.push(Step {
            only: None,
            kernel: StepKernel::Row(RowKernel::new(op, cols, "f32")),
            operands: vec![x, hi, lo],
        });
        // Rows that follow the run's: as many as x has (the MTP module's are one fewer).
        match (transposed, rows, x, hi, lo) {
            (false, None, Operand::Arg(arg), Operand::Temp(h), Operand::Temp(l)) => {
                Ok((Operand::TempRowsOf { temp: h, arg }, Operand::TempRowsOf { temp: l, arg }))
            }
            // A temporary has the run's rows, as the split's halves do.
            (false, None, Operand::Temp(_), ..) => Ok((hi, lo)),
            (false, None, ..) => Err("a matmul of dynamic rows that are not an argument's".to_string()),
            _ => Ok((hi, lo)),
        }
    };
    let (ah, al) = split(a, (ra, ca), ta)?;
    let (bh, bl) = split(b, (rb, cb), !tb)?;
    // Operands: A, B, then the second A (hi.hi + lo.hi) or the residual (hi.lo), then the output.
    for (i, (half, y, third)) in [("hi", bh, al), ("hilo", bl, out)].into_iter().enumerate() {
        let operands = vec![ah, y, third, out];
        let kernel = GemmKernel {
            kernel: format!("{fused}.{half}"),
            input: GemmInput::Bf16,
            output: GemmOutput::F32,
            n,
            k: ka.unwrap_or(0),
            a: 0,
            a_scale: None,
            weights: vec![(1, None)],
            residual: (i > 0).then_some(2),
            results: vec![(0, n)],
            grouped: None,
            fixed_m,
            k_range: None,
            a2: (i == 0).then_some(2),
        };
        steps.push(Step { only: None, kernel: StepKernel::Gemm(kernel), operands });
    }
    Ok(steps)
}

fn linear_pieces(body: &Body, tensor_cores: bool) -> Result<Steps, String> {
    let (linear, split) = (&body.ops[0], body.ops.last().expect("a split"));
    // Or the fp8 graph's: e4m3 activations and weights with their scales (inference's projections).
    let fp8 = linear.operand_count() == 4
        && operand_shape(linear, 0).is_ok_and(|s| s.element == "f8E4M3FN")
        && operand_shape(linear, 2).is_ok_and(|s| s.element == "f8E4M3FN");
    // Or the f32 graph's of a bf16 checkpoint: f32 activations, bf16 weights (split hi + lo).
    let bf16 = linear.operand_count() == 2
        && operand_shape(linear, 0).is_ok_and(|s| s.element == "f32")
        && operand_shape(linear, 1).is_ok_and(|s| s.element == "bf16");
    if !(fp8 || bf16 || linear.operand_count() == 2 && all_f32(linear)) || !body.operands_are_args(linear) {
        return Err("a linear with pieces that is not of two f32 matrices or an fp8 or bf16 projection".into());
    }
    let whole =
        if body.ops.len() == 3 { body.ops[1].result(0) } else { linear.result(0) }.map_err(|e| e.to_string())?;
    let split_input = split.operand(0).map_err(|e| e.to_string())?;
    let whole_shape = shape(whole.into())?;
    let axis = int_attr(split, "axis").ok_or("split without axis")? as usize;
    let chained = body.ops.len() == 2
        || body.ops[1].operand(0).is_ok_and(|v| linear.result(0).is_ok_and(|r| raw(r.into()) == raw(v)));
    if raw(split_input) != raw(whole.into()) || !chained || axis + 1 != whole_shape.dims.len() {
        return Err("a linear's pieces that are not column ranges of its output".into());
    }
    let n = width(&result_shape(linear, 0)?)?;
    // Rows of the split's input: the linear's output, or its heads when it was reshaped.
    let stride = width(&whole_shape)?;
    let (mut temps, mut steps) = (Vec::new(), Vec::new());
    if bf16 {
        // The split's hi and lo are temporaries 0 and 1; the GEMM's output the next.
        let k = width(&operand_shape(linear, 0)?)?;
        let g = GemmKernel::bf16(format!("{}.gemm", body.name), n, k);
        let split = super::lower::split_bf16_steps(&g, &body.name, Vec::new(), Some(Operand::Temp(2)));
        temps = split.temps;
        steps = split.steps;
    }
    let returned_whole = returned_as(body, whole.into());
    // The matmul writes the output as [T, n]: straight into the result when that is its shape.
    let target = match returned_whole {
        Some(i) if whole_shape.dims.len() == 2 && !bf16 => Operand::Result(i),
        _ => {
            temps.push(Temp::per_row(1, n, "f32"));
            Operand::Temp(temps.len() - 1)
        }
    };
    if fp8 {
        let k = width(&operand_shape(linear, 0)?)?;
        let g = GemmKernel::fp8(format!("{}.gemm", body.name), n, k);
        let operands = vec![Operand::Arg(0), Operand::Arg(1), Operand::Arg(2), Operand::Arg(3), target];
        steps.push(Step { only: None, kernel: StepKernel::Gemm(g), operands });
    }
    let (x, w) = (operand_shape(linear, 0)?, operand_shape(linear, if fp8 { 2 } else { 1 })?);
    let (x, w) = ((Operand::Arg(0), &x), (Operand::Arg(1), &w));
    match (!fp8 && !bf16)
        .then(|| tensor_cores.then(|| matmul_steps(&body.name, x, w, (false, true), target, &mut temps)))
    {
        None => {}
        Some(Some(Ok(tensor_cores))) => steps.extend(tensor_cores),
        Some(_) => {
            let op = TrainRow::Matmul { transpose_a: false, transpose_b: true };
            let matmul = StepKernel::Row(train_kernel(op, n, "f32"));
            steps.push(Step { only: None, kernel: matmul, operands: vec![Operand::Arg(0), Operand::Arg(1), target] });
        }
    }
    let copy = |start: usize, w: usize, to: usize| Step {
        only: None,
        kernel: StepKernel::Row(train_kernel(TrainRow::Columns { start, stride }, w, "f32")),
        operands: vec![target, Operand::Result(to)],
    };
    let mut covered = usize::from(returned_whole.is_some());
    if let (Some(i), Operand::Temp(_)) = (returned_whole, target) {
        // The reshaped output returned whole: the temporary copied into it as heads.
        steps.push(copy(0, stride, i));
    }
    let mut start = 0;
    for piece in 0..split.result_count() {
        let r = split.result(piece).map_err(|e| e.to_string())?;
        let w = width(&result_shape(split, piece)?)?;
        if let Some(i) = returned_as(body, r.into()) {
            steps.push(copy(start, w, i));
            covered += 1;
        }
        start += w;
    }
    if covered != body.returned.len() {
        return Err("a linear returning values other than its output and its pieces".into());
    }
    Ok(Steps { steps, temps, rope_table: None })
}
