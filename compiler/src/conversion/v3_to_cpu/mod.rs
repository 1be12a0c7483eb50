//! `v3` kernels -> CPU machine code: each kernel function (stage `fused`) becomes a function on
//! memrefs in destination-passing style (its inputs, then one caller-allocated buffer per result),
//! lowered to LLVM and JIT-compiled by MLIR's ExecutionEngine (or loaded from the kernel cache).
//!
//! Every op of the dialect has a template here. Through linalg on tensors and the kernel's
//! transform script (tiled, fused, vectorized, bufferized): dense GEMMs (`linear`, `lm_head`, the
//! GEMMs inside the fused MLA, SwiGLU and residual kernels, the routing's gate GEMM and the f32
//! grouped GEMMs' tiles; `gemm`), the order-preserving GEMM (`fp8_tiled`: one lane per output
//! column, each a sequential sum in the reference interpreter's order, rows eight at a time,
//! because a last-bit difference before a quantization moves values across e4m3 rounding
//! boundaries) behind the block-scaled fp8 GEMM, the fp8 grouped GEMMs and every product of MLA
//! attention (`mla`, with its softmax and transposes as row templates), norms, RoPE, the embedding
//! gather, views, elementwise ops, the routing's sigmoid and bias, cache writes and the
//! quantization of whole rows (`rows`, `fp8_tiled`). Left in scf loops, because they are
//! data-dependent picks or data movement rather than tensor computations: the routing's top-k
//! selection and the dispatch's counting sort (`moe`, `grouped`), the grouped kernels' row
//! gathers, scatters and epilogues, and the partitioned kernels' column shares of a quantization
//! (`fp8`). The training ops (losses and vector-Jacobian products, a training graph's kernels)
//! are in `train` (the matmuls through the order-preserving GEMM, the row-wise ones as row
//! templates, the rest in vectorized scf loops in the reference's order), `train_moe` (the
//! unfused routed experts and their gradient) and `train_fp8` (DeepSeek-V3's FP8 recipe on f32
//! masters). An op without a template is `unsupported on cpu: v3.<op>`, never run some other way.

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};
use melior::pass::PassManager;
use melior::{Context, ExecutionEngine};

use crate::kernel_cache::KernelCache;
use crate::shapes::{kernel_shapes, DimRule};
use crate::verify::Shape;
use v3c_runtime::signature::{BufferType, KernelSignature};

/// Why a kernel has no CPU lowering (yet), or failed to build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    #[error("unsupported on cpu: {0}")]
    Unsupported(String),
    #[error("cpu lowering of {kernel}: {problem}")]
    Lowering { kernel: String, problem: String },
    #[error("cpu kernel {kernel}: {problem}")]
    Run { kernel: String, problem: String },
}

mod fp8;
mod fp8_tiled;
mod gemm;
mod grouped;
mod mla;
mod moe;
mod rows;
mod sparse;
mod train;
mod train_fp8;
mod train_moe;

pub(crate) use fp8::fp8_helpers;
use mla::AttentionSpec;
use moe::RouteSpec;

/// The memref element of a tensor element: fp8 travels as its bits (`i8`); LLVM has no fp8 type.
fn storage(element: &str) -> &str {
    if element == "f8E4M3FN" {
        "i8"
    } else {
        element
    }
}

fn memref(shape: &Shape) -> String {
    let dims: Vec<String> = shape.dims.iter().map(|d| d.map_or("?".into(), |n| n.to_string())).collect();
    if dims.is_empty() {
        format!("memref<{}>", storage(&shape.element))
    } else {
        format!("memref<{}x{}>", dims.join("x"), storage(&shape.element))
    }
}

/// Emits the text of one kernel; values are named `%v<n>`.
struct Emitter {
    body: String,
    next: usize,
    /// MLIR value (raw pointer) -> (memref SSA name, shape).
    values: HashMap<usize, (String, Shape)>,
    allocs: Vec<String>,
    /// Module-level constants (RoPE frequency tables).
    globals: Vec<String>,
    /// The kernel's name, prefixing its module-level symbols.
    prefix: String,
    /// Whether the fp8 helper functions are needed.
    uses_fp8: bool,
    /// A partitioned kernel (grouped GEMMs): it takes `%part, %parts` and computes its share.
    partitioned: bool,
    /// Column tiles of the transform-dialect GEMMs emitted (their script blocks).
    column_tiles: Vec<usize>,
    /// Tiles of the row ops emitted (their script blocks).
    row_tiles: Vec<rows::RowTile>,
    /// Buffer -> its tensor (`bufferization.to_tensor`, one per buffer).
    tensors: HashMap<String, String>,
    /// Column-tile widths of the fp8 GEMMs emitted, scaled or not, and their row groups (their
    /// script blocks).
    fp8_widths: Vec<(usize, bool, usize)>,
    /// Lane widths of the transposing generics emitted (their script blocks).
    transposes: Vec<usize>,
}

impl Emitter {
    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    fn line(&mut self, s: &str) {
        self.body.push_str("    ");
        self.body.push_str(s);
        self.body.push('\n');
    }

    fn constant_index(&mut self, n: usize) -> String {
        let c = self.fresh();
        self.line(&format!("{c} = arith.constant {n} : index"));
        c
    }

    /// A new buffer of `shape`, dynamic dims taken from the same dims of `like`.
    fn alloc(&mut self, shape: &Shape, like: &(String, Shape)) -> String {
        let mut dyn_sizes = Vec::new();
        for (i, d) in shape.dims.iter().enumerate() {
            if d.is_none() {
                let c = self.constant_index(i);
                let s = self.fresh();
                self.line(&format!("{s} = memref.dim {}, {c} : {}", like.0, memref(&like.1)));
                dyn_sizes.push(s);
            }
        }
        let buf = self.fresh();
        self.line(&format!("{buf} = memref.alloc({}) : {}", dyn_sizes.join(", "), memref(shape)));
        self.allocs.push(format!("memref.dealloc {buf} : {}", memref(shape)));
        buf
    }
}

fn affine(dims: &[&str], results: &[&str]) -> String {
    format!("affine_map<({}) -> ({})>", dims.join(", "), results.join(", "))
}

fn load_f32(element: &str, v: &str, out: &str) -> String {
    if element == "f32" {
        format!("{out} = arith.addf {v}, %zero : f32")
    } else {
        format!("{out} = arith.extf {v} : {element} to f32")
    }
}

fn indent(text: &str, n: usize) -> String {
    text.lines().map(|l| format!("{}{l}", " ".repeat(n))).collect::<Vec<_>>().join("\n")
}

fn identity(rank: usize) -> String {
    let names: Vec<String> = (0..rank).map(|i| format!("d{i}")).collect();
    let d: Vec<&str> = names.iter().map(String::as_str).collect();
    affine(&d, &d)
}

fn int_attr(op: &OperationRef, name: &str) -> Option<i64> {
    op.attribute(name).ok().and_then(crate::mlir::int_value)
}

/// Lowers the kernel function `kernel` to CPU MLIR text: `func.func @<name>` on memrefs.
pub fn lower_kernel(kernel: &OperationRef) -> Result<LoweredKernel, CpuError> {
    let name = kernel.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
    let lowering = |problem: String| CpuError::Lowering { kernel: name.clone(), problem };
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or_else(|| lowering("no body".into()))?;
    let mut e = Emitter {
        body: String::new(),
        next: 0,
        values: HashMap::new(),
        allocs: Vec::new(),
        globals: Vec::new(),
        prefix: name.clone(),
        uses_fp8: false,
        partitioned: false,
        column_tiles: Vec::new(),
        row_tiles: Vec::new(),
        tensors: HashMap::new(),
        fp8_widths: Vec::new(),
        transposes: Vec::new(),
    };
    let mut inputs = Vec::new();
    for i in 0..block.argument_count() {
        let arg = block.argument(i).map_err(|err| lowering(err.to_string()))?;
        let shape = Shape::of(arg.r#type()).ok_or_else(|| lowering(format!("argument {i} is not a tensor")))?;
        e.values.insert(arg.to_raw().ptr as usize, (format!("%in{i}"), shape.clone()));
        inputs.push(shape);
    }
    // Results returned by the kernel are written straight into the output buffers.
    let terminator = block.terminator().ok_or_else(|| lowering("no return".into()))?;
    let mut outputs = Vec::new();
    let mut output_of: HashMap<usize, String> = HashMap::new();
    for i in 0..terminator.operand_count() {
        let v = terminator.operand(i).map_err(|err| lowering(err.to_string()))?;
        let shape = Shape::of(v.r#type()).ok_or_else(|| lowering("result is not a tensor".into()))?;
        output_of.entry(v.to_raw().ptr as usize).or_insert(format!("%out{i}"));
        outputs.push(shape);
    }
    e.line("%zero = arith.constant 0.0 : f32");
    e.line("%one = arith.constant 1.0 : f32");
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let full = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        if full == "func.return" {
            continue;
        }
        let kind = full.strip_prefix("v3.").ok_or_else(|| CpuError::Unsupported(full.clone()))?.to_string();
        let args: Vec<(String, Shape)> = (0..o.operand_count())
            .map(|i| {
                let v = o.operand(i).map_err(|err| lowering(err.to_string()))?;
                e.values
                    .get(&(v.to_raw().ptr as usize))
                    .cloned()
                    .ok_or_else(|| lowering(format!("{full}: operand {i} unknown")))
            })
            .collect::<Result<_, _>>()?;
        let mut dests = Vec::new();
        for r in 0..o.result_count() {
            let result = o.result(r).map_err(|err| lowering(err.to_string()))?;
            let shape = Shape::of(result.r#type()).ok_or_else(|| lowering("result is not a tensor".into()))?;
            let key = result.to_raw().ptr as usize;
            let dest = match output_of.get(&key) {
                Some(out) => out.clone(),
                // Dynamic sizes come from an operand dynamic at the same dims (the ids of an
                // embedding, not its table: a static table size once sized a kernel's rows).
                // A training op's gradient takes them from what it is the gradient of.
                None => {
                    let dynamic: Vec<usize> = (0..shape.dims.len()).filter(|&i| shape.dims[i].is_none()).collect();
                    let like = crate::shapes::shaped_like(&full, r)
                        .and_then(|k| args.get(k))
                        .or_else(|| args.iter().find(|a| dynamic.iter().all(|&i| a.1.dims.get(i) == Some(&None))))
                        .unwrap_or(&args[0])
                        .clone();
                    e.alloc(&shape, &like)
                }
            };
            dests.push((key, dest, shape));
        }
        let (key, dest, rshape) = dests[0].clone();
        match kind.as_str() {
            "add" | "silu_mul" => e.elementwise(&kind, &args[0], &args[1], &dest, &rshape),
            "linear" if args.len() == 4 => {
                e.linear_fp8(&args, &dest, &rshape);
            }
            "linear" if args.len() == 3 => {
                e.linear_dequant(&args, &dest, &rshape);
            }
            "quantize_fp8" => {
                let group =
                    int_attr(&o, "group").ok_or_else(|| lowering("quantize_fp8 without group".into()))? as usize;
                let (q_dest, q_shape) = (dests[0].1.clone(), dests[0].2.clone());
                let (s_dest, s_shape) = (dests[1].1.clone(), dests[1].2.clone());
                e.quantize(&args[0], group, (&q_dest, &q_shape), (&s_dest, &s_shape));
            }
            "linear" | "lm_head" => {
                if args.len() != 2 {
                    return Err(CpuError::Unsupported(format!("{full} with an fp8 weight and f32 activations")));
                }
                if args[0].1.dims.len() != 2 {
                    return Err(CpuError::Unsupported(format!("{full} on rank-{} activations", args[0].1.dims.len())));
                }
                e.gemm_vectorized(&args[0], &args[1], &dest, &rshape);
            }
            "rms_norm" => {
                let (x, w) = (&args[0], &args[1]);
                if x.1.dims.len() != 2 || x.1.dims[1].is_none() {
                    return Err(CpuError::Unsupported(format!("{full} of {}", x.1)));
                }
                let eps = o.attribute("eps").map_err(|_| lowering("rms_norm without eps".into()))?.to_string();
                let eps = eps.split(':').next().unwrap_or("1.0e-6").trim().to_string();
                e.rms_norm(x, w, &eps, &dest, &rshape);
            }
            "embed" => e.embed(&args[0], &args[1], &dest, &rshape),
            "reshape" => e.reshape(&args[0], &dest, &rshape).map_err(lowering)?,
            "split" => {
                let axis = int_attr(&o, "axis").ok_or_else(|| lowering("split without axis".into()))? as usize;
                let parts: Vec<(String, Shape)> = dests.iter().map(|(_, d, s)| (d.clone(), s.clone())).collect();
                e.split_rows(&args[0], axis, &parts).map_err(lowering)?;
            }
            "concat" => {
                let axis = int_attr(&o, "axis").ok_or_else(|| lowering("concat without axis".into()))? as usize;
                e.concat_rows((&args[0], &args[1]), axis, &dest, &rshape);
            }
            "cache_write" => e.cache_write(&args[0], &args[1], &args[2], &dest, &rshape),
            "layer_norm" => {
                let eps = o.attribute("eps").map_err(|_| lowering("layer_norm without eps".into()))?.to_string();
                let eps = eps.split(':').next().unwrap_or("1.0e-6").trim().to_string();
                e.layer_norm([&args[0], &args[1], &args[2]], &eps, &dest, &rshape).map_err(lowering)?;
            }
            "sparse_index" => {
                let top_k = int_attr(&o, "top_k").ok_or_else(|| lowering("sparse_index without top_k".into()))?;
                e.sparse_index([&args[0], &args[1], &args[2]], args.get(3), top_k as usize, &dest, &rshape)
                    .map_err(lowering)?;
            }
            "gather_rows" => {
                let (last, last_shape) = (dests[1].1.clone(), dests[1].2.clone());
                if int_attr(&o, "width").is_none() {
                    return Err(lowering("gather_rows without width".into()));
                }
                e.gather_rows(&args[0], &args[1], (&dest, &rshape), (&last, &last_shape)).map_err(lowering)?;
            }
            "rope" | "rope_grad" => {
                let (x, positions) = (&args[0], &args[1]);
                let dim = int_attr(&o, "dim").ok_or_else(|| lowering("rope without dim".into()))? as usize;
                let interleave = o.attribute("interleave").ok().and_then(crate::mlir::bool_value).unwrap_or(true);
                let factor = o.attribute("attention_factor").map(|a| a.to_string()).unwrap_or_default();
                let factor = factor.split(':').next().unwrap_or("1.0").trim().to_string();
                let inv = o
                    .attribute("inv_freq")
                    .map(|a| a.to_string())
                    .map_err(|_| lowering("rope without inv_freq".into()))?;
                let values = inv.trim_start_matches("array<f32:").trim_end_matches('>').trim().to_string();
                let global = format!("{name}_inv_freq_{}", e.next);
                e.globals.push(format!(
                    "memref.global \"private\" constant @{global} : memref<{}xf32> = dense<[{values}]>",
                    dim / 2
                ));
                let table = e.fresh();
                e.line(&format!("{table} = memref.get_global @{global} : memref<{}xf32>", dim / 2));
                let table = (table, Shape { dims: vec![Some(dim / 2)], element: "f32".into() });
                e.rope_rows(x, positions, &table, (interleave, &factor, kind == "rope_grad"), &dest, &rshape);
            }
            "attention" | "attention_decode" => {
                let decode = kind == "attention_decode";
                let form = o.attribute("form").map(|a| a.to_string()).unwrap_or_default();
                let absorbed = form.contains("absorbed");
                let scale = o.attribute("scale").map(|a| a.to_string()).unwrap_or_default();
                let scale = scale.split(':').next().unwrap_or("1.0").trim().to_string();
                let kv = int_attr(&o, "kv_lora_rank")
                    .ok_or_else(|| lowering("attention without kv_lora_rank".into()))?
                    as usize;
                let (qn, qp, lat) = (&args[0], &args[1], &args[2]);
                let kvb = &args[if decode { 4 } else { 3 }];
                let kvb_scale = args.get(if decode { 5 } else { 4 }).cloned();
                let positions = decode.then(|| args[3].clone());
                let (h, dn, dr) = (
                    qn.1.dims[1].ok_or_else(|| lowering("dynamic head count".into()))?,
                    qn.1.dims[2].ok_or_else(|| lowering("dynamic nope dim".into()))?,
                    qp.1.dims[2].ok_or_else(|| lowering("dynamic rope dim".into()))?,
                );
                let dv = rshape.dims[2].ok_or_else(|| lowering("dynamic v dim".into()))?;
                let spec = AttentionSpec { h, dn, dr, dv, kv, scale, absorbed, decode };
                e.attention(&spec, qn, qp, lat, (kvb, kvb_scale.as_ref()), positions.as_ref(), &dest, &rshape);
            }
            "moe_route" => {
                let r = route_spec(&o).map_err(lowering)?;
                let (idx_dest, idx_shape) = (dests[0].1.clone(), dests[0].2.clone());
                let (w_dest, w_shape) = (dests[1].1.clone(), dests[1].2.clone());
                e.route(&r, &args[0], &args[1], args.get(2), (&idx_dest, &idx_shape), (&w_dest, &w_shape));
            }
            "moe_dispatch" => {
                let r = route_spec(&o).map_err(lowering)?;
                let shared = int_attr(&o, "num_shared").unwrap_or(0) as usize;
                let outs = [(&dests[0].1, &dests[0].2), (&dests[1].1, &dests[1].2), (&dests[2].1, &dests[2].2)];
                let outs = outs.map(|(d, s)| (d.as_str(), s));
                e.dispatch(&r, shared, &args[0], &args[1], args.get(2), outs);
            }
            "moe_gate_up" | "moe_down" => {
                e.partitioned = true;
                let experts =
                    int_attr(&o, "num_experts").ok_or_else(|| lowering(format!("{full} without num_experts")))?;
                let shared = int_attr(&o, "num_shared").unwrap_or(0) as usize;
                // fp8 activations carry scales; fp8 weights (with f32 or fp8 activations) take the
                // fp8 templates.
                let fp8 = args[0].1.element == "f8E4M3FN";
                let base = if fp8 { 2 } else { 1 };
                let fp8_weights =
                    args.get(base + 2 + (kind == "moe_down") as usize).is_some_and(|w| w.1.element == "f8E4M3FN");
                let g = grouped::Grouped {
                    act: &args[0],
                    act_scale: fp8.then(|| &args[1]),
                    offsets: &args[base],
                    rows: &args[base + 1],
                    experts: experts as usize,
                    shared,
                };
                let rest = &args[base + 2..];
                let need = |n: usize| {
                    (rest.len() >= n).then_some(()).ok_or_else(|| lowering(format!("{full}: {} operands", args.len())))
                };
                match (kind.as_str(), fp8_weights) {
                    ("moe_gate_up", false) => {
                        need(2 + 2 * (shared > 0) as usize)?;
                        let sh = (shared > 0).then(|| [&rest[2], &rest[3]]);
                        e.gate_up(&g, [&rest[0], &rest[1]], sh, &dest, &rshape);
                    }
                    ("moe_gate_up", true) => {
                        need(4 + 4 * (shared > 0) as usize)?;
                        let sh = (shared > 0).then(|| [&rest[4], &rest[5], &rest[6], &rest[7]]);
                        e.gate_up_fp8(&g, [&rest[0], &rest[1], &rest[2], &rest[3]], sh, &dest, &rshape);
                    }
                    (_, false) => {
                        let n = 2 + (shared > 0) as usize;
                        need(n)?;
                        let sh = (shared > 0).then(|| &rest[2]);
                        e.down(&g, &rest[0], &rest[1], sh, rest.get(n), &dest, &rshape);
                    }
                    (_, true) => {
                        let n = 3 + 2 * (shared > 0) as usize;
                        need(n)?;
                        let sh = (shared > 0).then(|| [&rest[3], &rest[4]]);
                        e.down_fp8(&g, &rest[0], [&rest[1], &rest[2]], sh, rest.get(n), &dest, &rshape);
                    }
                }
            }
            "matmul" => {
                let flag = |n: &str| o.attribute(n).ok().and_then(crate::mlir::bool_value).unwrap_or(false);
                let (a, b) = (&args[0], &args[1]);
                if a.1.element != "f32" || b.1.element != "f32" {
                    return Err(CpuError::Unsupported(format!("{full} of {} and {}", a.1, b.1)));
                }
                e.matmul((a, b), (flag("transpose_a"), flag("transpose_b")), &dest, &rshape).map_err(lowering)?;
            }
            "cross_entropy" | "cross_entropy_grad" => {
                let weight =
                    train::float_attr(&o, "weight").ok_or_else(|| lowering(format!("{full} without weight")))?;
                e.cross_entropy((&args[0], &args[1]), &weight, kind == "cross_entropy_grad", &dest, &rshape);
            }
            "embed_grad" => e.embed_grad(&args[0], &args[1], &dest, &rshape),
            "rms_norm_grad" | "silu_mul_grad" => {
                let outs = [(dests[0].1.as_str(), &dests[0].2), (dests[1].1.as_str(), &dests[1].2)];
                if kind == "silu_mul_grad" {
                    e.silu_mul_grad([&args[0], &args[1], &args[2]], outs);
                } else {
                    if args[0].1.dims.len() != 2 {
                        return Err(CpuError::Unsupported(format!("{full} of {}", args[0].1)));
                    }
                    let eps = train::float_attr(&o, "eps").ok_or_else(|| lowering(format!("{full} without eps")))?;
                    e.rms_norm_grad([&args[0], &args[1], &args[2]], &eps, outs);
                }
            }
            "concat_grad" => {
                let axis = int_attr(&o, "axis").ok_or_else(|| lowering("concat_grad without axis".into()))? as usize;
                let outs = [(dests[0].1.as_str(), &dests[0].2), (dests[1].1.as_str(), &dests[1].2)];
                e.concat_grad(&args[0], (axis, [&args[1], &args[2]]), outs);
            }
            "split_grad" => {
                let axis = int_attr(&o, "axis").ok_or_else(|| lowering("split_grad without axis".into()))? as usize;
                let sizes = o.attribute("sizes").map(|a| a.to_string()).unwrap_or_default();
                let sizes: Vec<usize> = sizes
                    .trim_start_matches("array<i64:")
                    .trim_end_matches('>')
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect();
                let [head, tail] = sizes[..] else {
                    return Err(lowering(format!("split_grad sizes {sizes:?}")));
                };
                // operandSegmentSizes = [x, dhead, dtail]
                let segments = o.attribute("operandSegmentSizes").map(|a| a.to_string()).unwrap_or_default();
                let present: Vec<bool> = segments
                    .trim_start_matches("array<i32:")
                    .trim_end_matches('>')
                    .split(',')
                    .map(|v| v.trim() == "1")
                    .collect();
                let mut given = args[1..].iter();
                let mut piece = |k: usize| if present.get(k + 1) == Some(&true) { given.next() } else { None };
                let pieces = [piece(0), piece(1)];
                e.split_grad(pieces, (axis, [head, tail]), &dest, &rshape);
            }
            "attention_grad" => {
                let scale =
                    train::float_attr(&o, "scale").ok_or_else(|| lowering("attention_grad without scale".into()))?;
                let kv = int_attr(&o, "kv_lora_rank")
                    .ok_or_else(|| lowering("attention_grad without kv_lora_rank".into()))?
                    as usize;
                let (qn, qp) = (&args[0], &args[1]);
                let dims = (qn.1.dims[1], qn.1.dims[2], qp.1.dims[2], args[4].1.dims[2]);
                let (Some(h), Some(dn), Some(dr), Some(dv)) = dims else {
                    return Err(CpuError::Unsupported(format!("{full} with dynamic head dims")));
                };
                let spec = AttentionSpec { h, dn, dr, dv, kv, scale, absorbed: false, decode: false };
                let outs: Vec<(&str, &Shape)> = dests.iter().map(|(_, d, s)| (d.as_str(), s)).collect();
                let [a, b, c, d] = outs[..] else { return Err(lowering("attention_grad: four results".into())) };
                e.attention_grad(&spec, [&args[0], &args[1], &args[2], &args[3], &args[4]], [a, b, c, d]);
            }
            "moe_experts" => {
                // Unfused (a training graph): f32 experts, or the fp8 recipe on f32 masters.
                let fp8 = o.attribute("fp8_activations").ok().and_then(crate::mlir::bool_value).unwrap_or(false);
                if args.len() != 6 || args[3..].iter().any(|a| a.1.element != "f32") {
                    return Err(CpuError::Unsupported(format!("{full} unfused with fp8 weights")));
                }
                let operands = [&args[0], &args[1], &args[2], &args[3], &args[4], &args[5]];
                if fp8 {
                    e.moe_experts_fp8(operands, &dest, &rshape);
                } else {
                    e.moe_experts(operands, &dest, &rshape);
                }
            }
            "moe_experts_grad" => {
                if args[4..].iter().any(|a| a.1.element != "f32") {
                    return Err(CpuError::Unsupported(format!("{full} of fp8 experts")));
                }
                let fp8 = o.attribute("fp8").ok().and_then(crate::mlir::bool_value).unwrap_or(false);
                let a: Vec<&(String, Shape)> = args.iter().collect();
                let [x, idx, w, dy, gate, up, down] = a[..] else {
                    return Err(lowering(format!("{full}: {} operands", args.len())));
                };
                let outs: Vec<(&str, &Shape)> = dests.iter().map(|(_, d, s)| (d.as_str(), s)).collect();
                let [r0, r1, r2, r3, r4] = outs[..] else { return Err(lowering(format!("{full}: five results"))) };
                if fp8 {
                    e.moe_experts_grad_fp8([x, idx, w, dy, gate, up, down], [r0, r1, r2, r3, r4]);
                } else {
                    e.moe_experts_grad([x, idx, w, dy, gate, up, down], [r0, r1, r2, r3, r4]);
                }
            }
            "fp8_linear" | "fp8_linear_dgrad" | "fp8_linear_wgrad" => {
                e.fp8_training_gemm(&kind, (&args[0], &args[1]), &dest, &rshape).map_err(lowering)?;
            }
            "route_logits_grad" => {
                let r = route_spec(&o).map_err(lowering)?;
                e.route_logits_grad([&args[0], &args[1], &args[2]], (r.norm, &r.factor, r.softmax), &dest, &rshape);
            }
            "balance_loss" | "balance_loss_grad" => {
                let alpha = train::float_attr(&o, "alpha").ok_or_else(|| lowering(format!("{full} without alpha")))?;
                let softmax = crate::mlir::softmax_scoring(&o);
                e.balance_loss((&args[0], &args[1]), (&alpha, softmax), kind == "balance_loss_grad", &dest, &rshape);
            }
            _ => return Err(CpuError::Unsupported(full)),
        }
        for (key, dest, shape) in dests {
            e.values.insert(key, (dest, shape));
        }
        let _ = (key, rshape);
    }
    let mut params: Vec<String> = inputs.iter().enumerate().map(|(i, s)| format!("%in{i}: {}", memref(s))).collect();
    params.extend(outputs.iter().enumerate().map(|(i, s)| format!("%out{i}: {}", memref(s))));
    if e.partitioned {
        params.push("%part: index, %parts: index".into());
    }
    let deallocs: String = e.allocs.iter().map(|d| format!("    {d}\n")).collect();
    let mut globals: String = e.globals.iter().map(|g| format!("{g}\n")).collect();
    if e.uses_fp8 {
        globals.push_str(&fp8_helpers(&name));
    }
    if !e.column_tiles.is_empty() || !e.row_tiles.is_empty() || !e.fp8_widths.is_empty() {
        let mut blocks: String = e.transposes.iter().map(|&w| fp8_tiled::transpose_script(w)).collect();
        blocks.extend(e.fp8_widths.iter().map(|&w| fp8_tiled::script(w)));
        blocks.extend(e.row_tiles.iter().map(rows::RowTile::script));
        globals.push_str(&gemm::transform_script(&e.column_tiles, &blocks));
    }
    let (output_rules, equal_dims) = kernel_shapes(kernel).map_err(lowering)?;
    let row_split = row_split(kernel, &inputs, &outputs, &output_rules);
    let signature = KernelSignature {
        inputs: inputs.iter().map(buffer_type).collect(),
        outputs: outputs.iter().map(buffer_type).collect(),
        output_rules,
        partitioned: e.partitioned,
        row_split,
        equal_dims,
    };
    globals.push_str(&signature_global(&name, &signature));
    let text = format!(
        "{globals}func.func @{name}({}) attributes {{llvm.emit_c_interface}} {{\n{}{deallocs}    return\n  }}\n",
        params.join(", "),
        e.body
    );
    Ok(LoweredKernel { text, signature })
}

fn buffer_type(s: &Shape) -> BufferType {
    BufferType { dims: s.dims.clone(), element: s.element.clone() }
}

/// The global that carries `signature` in the kernel's code (read back by the runtime,
/// [`v3c_runtime::signature`]): its JSON, NUL-terminated, as an MLIR string (quotes and
/// backslashes escaped in hex).
fn signature_global(kernel: &str, signature: &KernelSignature) -> String {
    let json = signature.to_json();
    let escaped: String = json
        .chars()
        .map(|c| match c {
            '"' => "\\22".to_string(),
            '\\' => "\\5C".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!(
        "llvm.mlir.global external constant @{}(\"{escaped}\\00\") {{addr_space = 0 : i32}} : !llvm.array<{} x i8>\n",
        KernelSignature::symbol(kernel),
        json.len() + 1
    )
}

/// Whether `kernel`'s rows may run on different threads: a row-independent kind whose outputs take
/// their rows from dim 0 of row inputs (dynamic dim 0), every row input sharing that dim.
fn row_split(
    kernel: &OperationRef,
    inputs: &[Shape],
    outputs: &[Shape],
    output_rules: &[Vec<DimRule>],
) -> Option<RowSplit> {
    let kind = kernel.attribute(v3c_dialects::KERNEL_ATTR).map(crate::mlir::attribute_text).unwrap_or_default();
    let row_inputs: Vec<bool> = inputs.iter().map(|s| s.dims.first().is_some_and(|d| d.is_none())).collect();
    let rows_follow =
        output_rules.iter().all(|r| matches!(r.first(), Some(DimRule::Input { input, dim: 0 }) if row_inputs[*input]));
    let row_outputs: Vec<bool> = outputs.iter().map(|s| s.dims.first().is_some_and(|d| d.is_none())).collect();
    (ROW_INDEPENDENT.contains(&kind.as_str())
        && rows_follow
        && row_outputs.iter().all(|&r| r)
        && row_inputs.iter().any(|&r| r))
    .then(|| RowSplit {
        rows: row_inputs.into_iter().chain(row_outputs).collect(),
        min_rows: if kind.starts_with("attention_decode") { 1 } else { 8 },
    })
}

/// The routing attributes of `moe_route` / `moe_dispatch`.
fn route_spec(o: &OperationRef) -> Result<RouteSpec, String> {
    let int = |n: &str| int_attr(o, n).map(|v| v as usize).ok_or_else(|| format!("routing without {n}"));
    Ok(RouteSpec {
        top_k: int("top_k")?,
        n_group: int("n_group")?,
        topk_group: int("topk_group")?,
        norm: o.attribute("norm_topk_prob").ok().and_then(crate::mlir::bool_value).unwrap_or(false),
        softmax: crate::mlir::softmax_scoring(&o),
        factor: o
            .attribute("routed_scaling_factor")
            .map(|a| a.to_string())
            .unwrap_or_default()
            .split(':')
            .next()
            .unwrap_or("1.0")
            .trim()
            .to_string(),
    })
}

/// A kernel lowered to CPU MLIR text, with its signature (the text embeds it too).
#[derive(Debug, Clone)]
pub struct LoweredKernel {
    pub text: String,
    pub signature: KernelSignature,
}

/// The pass pipeline from linalg on memrefs to the LLVM dialect.
pub const LOWER_TO_LLVM: &str =
    "builtin.module(func.func(convert-linalg-to-loops), convert-vector-to-scf{full-unroll=true}, \
    lower-affine, convert-scf-to-cf, \
    convert-vector-to-llvm, \
    convert-math-to-llvm, expand-strided-metadata, lower-affine, finalize-memref-to-llvm, convert-arith-to-llvm, \
    convert-func-to-llvm, convert-cf-to-llvm, convert-index-to-llvm, convert-ub-to-llvm, reconcile-unrealized-casts)";

pub use v3c_runtime::host::{HostBuffer, HostData, RawBuffer, RowSplit};

/// A JIT-compiled CPU kernel.
pub struct CpuKernel {
    code: KernelCode,
    pub name: String,
    /// Where the machine code came from: the kernel cache (true) or this process's JIT.
    pub from_cache: bool,
    /// The kernel's content address (empty when compiled without a cache).
    pub key: String,
    /// What the code takes: its buffers (`inputs`, then `outputs`), how its outputs' dims follow from its inputs', the input
    /// dims it reads as one size, whether it takes `(part, parts)` ([`CpuKernel::run_part`]
    /// computes one share of the outputs, disjoint columns, so shares can run on different
    /// threads) and its row split (rows, dim 0 of the buffers marked true, are independent: the
    /// kernel may run on disjoint row ranges concurrently, from `min_rows` per thread — 8, but 1
    /// for decode attention, a row being a whole sequence's attention over its cache; weights are
    /// shared whole).
    pub signature: KernelSignature,
}

/// Lowers a kernel's `cpu`-stage `text` to LLVM and JIT-compiles it (position-independent code
/// kept for an object file when `for_object`).
fn jit(context: &Context, text: &str, name: &str, for_object: bool) -> Result<ExecutionEngine, String> {
    let module = lower_to_llvm(context, text, name)?;
    let engine = ExecutionEngine::new(&module, OPT_LEVEL, &[], for_object, for_object);
    // Looking the entry up makes the JIT generate machine code now (and proves it exists).
    if engine.lookup(&format!("_mlir_ciface_{name}")).is_null() {
        return Err("the JIT produced no entry point".into());
    }
    Ok(engine)
}

/// Lowers a kernel's `cpu`-stage `text` to the LLVM dialect ([`LOWER_TO_LLVM`]), checking that
/// nothing else is left (the JIT would not say).
pub fn lower_to_llvm<'c>(context: &'c Context, text: &str, name: &str) -> Result<melior::ir::Module<'c>, String> {
    let mut module = transformed(context, text, name)?;
    let manager = PassManager::new(context);
    melior::utility::parse_pass_pipeline(manager.as_operation_pass_manager(), LOWER_TO_LLVM)
        .map_err(|e| format!("pass pipeline: {e}"))?;
    manager.run(&mut module).map_err(|e| format!("lowering to LLVM failed: {e}"))?;
    // ExecutionEngine reports no error: check that only the LLVM dialect is left first.
    let llvm = module.as_operation().to_string();
    if let Some(line) =
        llvm.lines().find(|l| l.contains(" = ") && !l.contains("llvm.") && !l.trim_start().starts_with('^'))
    {
        return Err(format!("non-LLVM op left after lowering: {}", line.trim()));
    }
    Ok(module)
}

/// A kernel's `cpu`-stage `text` after its transform script (tiling, vectorization and
/// bufferization of its GEMMs and row templates), the script itself removed: memrefs, vector, scf.
pub fn transformed<'c>(context: &'c Context, text: &str, name: &str) -> Result<melior::ir::Module<'c>, String> {
    let mut module = crate::mlir::parse_module(context, text, &format!("{name} (cpu)")).map_err(|e| e.to_string())?;
    melior::utility::register_all_passes();
    if text.contains(TRANSFORM_ENTRY) {
        let interpreter = PassManager::new(context);
        melior::utility::parse_pass_pipeline(
            interpreter.as_operation_pass_manager(),
            "builtin.module(transform-interpreter)",
        )
        .map_err(|e| format!("pass pipeline: {e}"))?;
        interpreter.run(&mut module).map_err(|e| format!("transform script failed: {e}"))?;
        remove_transform_modules(&module);
    }
    Ok(module)
}

/// The entry of the transform scripts kernels carry.
const TRANSFORM_ENTRY: &str = "transform.named_sequence @__transform_main";

/// Erases the nested `module attributes {transform.with_named_sequence}` ops (transform scripts).
fn remove_transform_modules(module: &melior::ir::Module) {
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let is_script = o.name().as_string_ref().as_str().ok() == Some("builtin.module")
            && o.attribute("transform.with_named_sequence").is_ok();
        if is_script {
            // SAFETY: `o` is a live op of `module`'s body with no uses (a module defines no values).
            unsafe {
                mlir_sys::mlirOperationRemoveFromParent(o.to_raw());
                mlir_sys::mlirOperationDestroy(o.to_raw());
            }
        }
    }
}

/// The kernel-cache key of a kernel whose `cpu`-stage text is `text`.
pub fn cache_key(text: &str) -> String {
    KernelCache::key(text, LOWER_TO_LLVM, OPT_LEVEL)
}

/// A kernel's machine code.
enum KernelCode {
    Jit(ExecutionEngine),
    Cached(crate::kernel_cache::CachedKernel),
}

/// The JIT's LLVM optimization level.
const OPT_LEVEL: usize = 3;

/// Kernel kinds whose every row (token) is computed from the same row of its row inputs alone.
const ROW_INDEPENDENT: &[&str] = &[
    "embed",
    "linear",
    "lm_head",
    "rms_norm",
    "norm_quantize",
    "silu_mul",
    "add",
    "quantize_fp8",
    "swiglu",
    "gemm_residual",
    "moe_route",
    "mla_projections",
    "mla_q_up",
    // Decode attention: a row is one sequence (its query, cache rows and position); the output's
    // reshape and 1x128 quantization are per row too.
    "attention_decode",
    "attention_decode_quantize",
];

impl CpuKernel {
    /// Lowers and JIT-compiles `kernel` (a kernel function of the `fused` stage).
    pub fn compile(context: &Context, kernel: &OperationRef) -> Result<CpuKernel, CpuError> {
        CpuKernel::compile_cached(context, kernel, None)
    }

    /// As [`CpuKernel::compile`], taking the machine code from `cache` when it holds this kernel
    /// and storing it there when not.
    pub fn compile_cached(
        context: &Context,
        kernel: &OperationRef,
        cache: Option<&KernelCache>,
    ) -> Result<CpuKernel, CpuError> {
        let LoweredKernel { text, signature } = lower_kernel(kernel)?;
        let name = kernel.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
        let lowering = |problem: String| CpuError::Lowering { kernel: name.clone(), problem };
        // The packed wrapper of the C interface: what `ExecutionEngine::invoke_packed(name)` calls.
        let packed = format!("_mlir__mlir_ciface_{name}");
        let key = cache.map(|_| cache_key(&text));
        let hit = cache.zip(key.as_deref()).and_then(|(c, k)| c.load(k, &packed));
        let from_cache = hit.is_some();
        let code = match hit {
            Some(k) => KernelCode::Cached(k),
            None => {
                let engine = jit(context, &text, &name, cache.is_some()).map_err(lowering)?;
                if let (Some(cache), Some(key)) = (cache, &key) {
                    // The cache only saves time: a kernel that cannot be stored still runs from the JIT.
                    let stored = tempfile::Builder::new().suffix(".o").tempfile().map_err(|e| e.to_string()).and_then(
                        |object| {
                            engine.dump_to_object_file(&object.path().to_string_lossy());
                            cache.store(key, object.path())
                        },
                    );
                    if let Err(e) = stored {
                        tracing::warn!("{name}: not stored in the kernel cache: {e}");
                    }
                }
                KernelCode::Jit(engine)
            }
        };
        Ok(CpuKernel { code, name, from_cache, key: key.unwrap_or_default(), signature })
    }

    /// The shapes of the outputs for inputs of `input_shapes` (what [`CpuKernel::run`] requires).
    pub fn output_shapes(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<Vec<usize>>, CpuError> {
        self.signature
            .output_rules
            .iter()
            .map(|rules| {
                rules.iter().map(|r| r.eval(input_shapes)).collect::<Option<Vec<usize>>>().ok_or_else(|| {
                    CpuError::Run { kernel: self.name.clone(), problem: "cannot infer output shapes".into() }
                })
            })
            .collect()
    }

    /// Runs the kernel on `inputs`, writing `outputs`.
    ///
    /// # Safety
    /// The buffers are checked against the kernel's signature here (element types, ranks, static
    /// dims, the input dims it reads as one size, and each output's dims, which must be exactly
    /// those the kernel computes from its inputs'); what is left to the caller is that ids and
    /// positions are in range (embedding rows, cache rows). The entry-level executor derives those
    /// from the plan before launching.
    pub unsafe fn run(&self, inputs: &mut [HostBuffer], outputs: &mut [HostBuffer]) -> Result<(), CpuError> {
        let (ins, outs) = (self.signature.inputs.len(), self.signature.outputs.len());
        if inputs.len() != ins || outputs.len() != outs {
            return Err(CpuError::Run {
                kernel: self.name.clone(),
                problem: format!("expected {ins} inputs and {outs} outputs"),
            });
        }
        let views: Vec<RawBuffer> = inputs.iter_mut().chain(outputs.iter_mut()).map(|b| b.raw()).collect();
        // SAFETY: forwarded contract; the host buffers outlive the call.
        unsafe { self.run_raw(&views) }
    }

    /// Runs the kernel on raw buffers (inputs then outputs), e.g. slices of one arena.
    ///
    /// # Safety
    /// As [`CpuKernel::run`], and every pointer must address `shape`'s elements of `element`.
    pub unsafe fn run_raw(&self, buffers: &[RawBuffer]) -> Result<(), CpuError> {
        // SAFETY: forwarded contract; one part is the whole kernel.
        unsafe { self.run_part(buffers, 0, 1) }
    }

    /// Runs share `part` of `parts` of a partitioned kernel (any other kernel needs `0, 1`).
    ///
    /// # Safety
    /// As [`CpuKernel::run_raw`]; shares of one launch may run concurrently (they write disjoint
    /// parts of the outputs), nothing else may touch the buffers meanwhile.
    pub unsafe fn run_part(&self, buffers: &[RawBuffer], part: usize, parts: usize) -> Result<(), CpuError> {
        let err = |problem: String| CpuError::Run { kernel: self.name.clone(), problem };
        let shapes: Vec<(&[usize], &str)> = buffers.iter().map(|b| (&b.shape[..], b.element.as_str())).collect();
        self.signature.check(&shapes, &|i| format!("buffer {i}")).map_err(err)?;
        let partitioned = self.signature.partitioned;
        if !partitioned && (part, parts) != (0, 1) {
            return Err(err(format!("not a partitioned kernel (asked for part {part} of {parts})")));
        }
        let mut result = Ok(());
        // SAFETY: every buffer matches the kernel's memref type at its position (checked above);
        // the buffers outlive the call.
        unsafe {
            v3c_runtime::host::call_packed(buffers, partitioned, part, parts, |args| match &self.code {
                KernelCode::Jit(engine) => {
                    result = engine.invoke_packed(&self.name, args).map_err(|e| err(e.to_string()));
                }
                // `entry` is the same packed wrapper the JIT would call.
                KernelCode::Cached(k) => (k.entry)(args.as_mut_ptr()),
            })
        };
        result
    }
}
