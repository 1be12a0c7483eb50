//! `v3` kernels -> CPU machine code: each kernel function (stage `fused`) becomes a function on
//! memrefs in destination-passing style (its inputs, then one caller-allocated buffer per result),
//! written with `linalg.generic`, lowered to LLVM and JIT-compiled by MLIR's ExecutionEngine.
//!
//! Covered so far: `linear` and `lm_head` with f32/bf16 weights (rank-2 activations), `rms_norm`,
//! `add`, `silu_mul`, `embed`, and any kernel made of them (`gemm_residual`, `swiglu`, ...).
//! Everything else is reported as `unsupported on cpu: v3.<op>` — never run some other way.
//! Not yet: tiling and vectorization through the transform dialect (the loops are plain), views,
//! RoPE, MLA attention, MoE routing/experts, fp8.

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};
use melior::pass::PassManager;
use melior::{Context, ExecutionEngine};

use crate::verify::Shape;

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

fn memref(shape: &Shape) -> String {
    let dims: Vec<String> = shape.dims.iter().map(|d| d.map_or("?".into(), |n| n.to_string())).collect();
    if dims.is_empty() {
        format!("memref<{}>", shape.element)
    } else {
        format!("memref<{}x{}>", dims.join("x"), shape.element)
    }
}

/// Emits the text of one kernel; values are named `%v<n>`.
struct Emitter {
    body: String,
    next: usize,
    /// MLIR value (raw pointer) -> (memref SSA name, shape).
    values: HashMap<usize, (String, Shape)>,
    allocs: Vec<String>,
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

/// Lowers the kernel function `kernel` to CPU MLIR text: `func.func @<name>` on memrefs.
pub fn lower_kernel(kernel: &OperationRef) -> Result<(String, Vec<Shape>, Vec<Shape>), CpuError> {
    let name = kernel.attribute("sym_name").map(|a| a.to_string().trim_matches('"').to_string()).unwrap_or_default();
    let lowering = |problem: String| CpuError::Lowering { kernel: name.clone(), problem };
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or_else(|| lowering("no body".into()))?;
    let mut e = Emitter { body: String::new(), next: 0, values: HashMap::new(), allocs: Vec::new() };
    let mut inputs = Vec::new();
    for i in 0..block.argument_count() {
        let arg = block.argument(i).map_err(|err| lowering(err.to_string()))?;
        let shape =
            Shape::parse(&arg.r#type().to_string()).ok_or_else(|| lowering(format!("argument {i} is not a tensor")))?;
        e.values.insert(arg.to_raw().ptr as usize, (format!("%in{i}"), shape.clone()));
        inputs.push(shape);
    }
    // Results returned by the kernel are written straight into the output buffers.
    let terminator = block.terminator().ok_or_else(|| lowering("no return".into()))?;
    let mut outputs = Vec::new();
    let mut output_of: HashMap<usize, String> = HashMap::new();
    for i in 0..terminator.operand_count() {
        let v = terminator.operand(i).map_err(|err| lowering(err.to_string()))?;
        let shape = Shape::parse(&v.r#type().to_string()).ok_or_else(|| lowering("result is not a tensor".into()))?;
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
        let result = o.result(0).map_err(|err| lowering(err.to_string()))?;
        let rshape =
            Shape::parse(&result.r#type().to_string()).ok_or_else(|| lowering("result is not a tensor".into()))?;
        let key = result.to_raw().ptr as usize;
        let dest = match output_of.get(&key) {
            Some(out) => out.clone(),
            None => e.alloc(&rshape, &args[0]),
        };
        let out_ty = memref(&rshape);
        match kind.as_str() {
            "add" | "silu_mul" => {
                let rank = rshape.dims.len();
                let dims: Vec<String> = (0..rank).map(|i| format!("d{i}")).collect();
                let d: Vec<&str> = dims.iter().map(String::as_str).collect();
                let id = affine(&d, &d);
                let iters = vec!["\"parallel\""; rank].join(", ");
                let body = if kind == "add" {
                    "%r = arith.addf %a, %b : f32".to_string()
                } else {
                    "%n = arith.negf %a : f32\n      %x = math.exp %n : f32\n      %den = arith.addf %one, %x : f32\n      %s = arith.divf %a, %den : f32\n      %r = arith.mulf %s, %b : f32".to_string()
                };
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{id}, {id}, {id}], iterator_types = [{iters}]}} ins({}, {} : {}, {}) outs({dest} : {out_ty}) {{\n    ^bb0(%a: f32, %b: f32, %c: f32):\n      {body}\n      linalg.yield %r : f32\n    }}",
                    args[0].0, args[1].0, memref(&args[0].1), memref(&args[1].1)
                ));
            }
            "linear" | "lm_head" => {
                if args.len() != 2 || args[0].1.dims.len() != 2 {
                    return Err(CpuError::Unsupported(format!(
                        "{full} with fp8 operands or rank-{} activations",
                        args[0].1.dims.len()
                    )));
                }
                let (x, w) = (&args[0], &args[1]);
                e.line(&format!("linalg.fill ins(%zero : f32) outs({dest} : {out_ty})"));
                let maps = [
                    affine(&["m", "n", "k"], &["m", "k"]),
                    affine(&["m", "n", "k"], &["n", "k"]),
                    affine(&["m", "n", "k"], &["m", "n"]),
                ];
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{}], iterator_types = [\"parallel\", \"parallel\", \"reduction\"]}} ins({}, {} : {}, {}) outs({dest} : {out_ty}) {{\n    ^bb0(%a: f32, %b: {}, %c: f32):\n      {}\n      %p = arith.mulf %a, %bf : f32\n      %r = arith.addf %c, %p : f32\n      linalg.yield %r : f32\n    }}",
                    maps.join(", "), x.0, w.0, memref(&x.1), memref(&w.1), w.1.element, load_f32(&w.1.element, "%b", "%bf")
                ));
            }
            "rms_norm" => {
                let (x, w) = (&args[0], &args[1]);
                if x.1.dims.len() != 2 {
                    return Err(CpuError::Unsupported(format!("{full} of rank {}", x.1.dims.len())));
                }
                let d = x.1.dims[1].ok_or_else(|| lowering("rms_norm needs a static width".into()))?;
                let eps = o.attribute("eps").map_err(|_| lowering("rms_norm without eps".into()))?.to_string();
                let eps = eps.split(':').next().unwrap_or("1.0e-6").trim().to_string();
                let sums = e.alloc(&Shape { dims: vec![x.1.dims[0]], element: "f32".into() }, x);
                e.line(&format!(
                    "linalg.fill ins(%zero : f32) outs({sums} : {})",
                    memref(&Shape { dims: vec![x.1.dims[0]], element: "f32".into() })
                ));
                let sum_ty = memref(&Shape { dims: vec![x.1.dims[0]], element: "f32".into() });
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{}, {}], iterator_types = [\"parallel\", \"reduction\"]}} ins({} : {}) outs({sums} : {sum_ty}) {{\n    ^bb0(%a: f32, %c: f32):\n      %sq = arith.mulf %a, %a : f32\n      %r = arith.addf %c, %sq : f32\n      linalg.yield %r : f32\n    }}",
                    affine(&["m", "d"], &["m", "d"]), affine(&["m", "d"], &["m"]), x.0, memref(&x.1)
                ));
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{}, {}, {}, {}], iterator_types = [\"parallel\", \"parallel\"]}} ins({}, {sums}, {} : {}, {sum_ty}, {}) outs({dest} : {out_ty}) {{\n    ^bb0(%a: f32, %s: f32, %wv: {}, %c: f32):\n      %width = arith.constant {d}.0 : f32\n      %eps = arith.constant {eps} : f32\n      %mean = arith.divf %s, %width : f32\n      %me = arith.addf %mean, %eps : f32\n      %root = math.sqrt %me : f32\n      %inv = arith.divf %one, %root : f32\n      %xn = arith.mulf %a, %inv : f32\n      {}\n      %r = arith.mulf %wf, %xn : f32\n      linalg.yield %r : f32\n    }}",
                    affine(&["m", "d"], &["m", "d"]), affine(&["m", "d"], &["m"]), affine(&["m", "d"], &["d"]), affine(&["m", "d"], &["m", "d"]),
                    x.0, w.0, memref(&x.1), memref(&w.1), w.1.element, load_f32(&w.1.element, "%wv", "%wf")
                ));
            }
            "embed" => {
                let (table, ids) = (&args[0], &args[1]);
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{}, {}], iterator_types = [\"parallel\", \"parallel\"]}} ins({} : {}) outs({dest} : {out_ty}) {{\n    ^bb0(%id: {}, %c: f32):\n      %row = arith.index_cast %id : {} to index\n      %col = linalg.index 1 : index\n      %t = memref.load {}[%row, %col] : {}\n      {}\n      linalg.yield %r : f32\n    }}",
                    affine(&["n", "d"], &["n"]), affine(&["n", "d"], &["n", "d"]), ids.0, memref(&ids.1), ids.1.element, ids.1.element,
                    table.0, memref(&table.1), load_f32(&table.1.element, "%t", "%r")
                ));
            }
            _ => return Err(CpuError::Unsupported(full)),
        }
        e.values.insert(key, (dest, rshape));
    }
    let mut params: Vec<String> = inputs.iter().enumerate().map(|(i, s)| format!("%in{i}: {}", memref(s))).collect();
    params.extend(outputs.iter().enumerate().map(|(i, s)| format!("%out{i}: {}", memref(s))));
    let deallocs: String = e.allocs.iter().map(|d| format!("    {d}\n")).collect();
    let text = format!(
        "func.func @{name}({}) attributes {{llvm.emit_c_interface}} {{\n{}{deallocs}    return\n  }}\n",
        params.join(", "),
        e.body
    );
    Ok((text, inputs, outputs))
}

/// The pass pipeline from linalg on memrefs to the LLVM dialect.
pub const LOWER_TO_LLVM: &str = "builtin.module(func.func(convert-linalg-to-loops), convert-scf-to-cf, \
    convert-math-to-llvm, expand-strided-metadata, finalize-memref-to-llvm, convert-arith-to-llvm, \
    convert-func-to-llvm, convert-cf-to-llvm, convert-index-to-llvm, convert-ub-to-llvm, reconcile-unrealized-casts)";

/// A host buffer handed to a CPU kernel: element storage plus shape.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostBuffer {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostBuffer {
    fn element(&self) -> &'static str {
        match self.data {
            HostData::F32(_) => "f32",
            HostData::Bf16(_) => "bf16",
            HostData::I64(_) => "i64",
        }
    }

    fn ptr(&mut self) -> *mut () {
        match &mut self.data {
            HostData::F32(v) => v.as_mut_ptr() as *mut (),
            HostData::Bf16(v) => v.as_mut_ptr() as *mut (),
            HostData::I64(v) => v.as_mut_ptr() as *mut (),
        }
    }
}

/// A JIT-compiled CPU kernel.
pub struct CpuKernel {
    engine: ExecutionEngine,
    pub name: String,
    pub inputs: Vec<Shape>,
    pub outputs: Vec<Shape>,
}

impl CpuKernel {
    /// Lowers and JIT-compiles `kernel` (a kernel function of the `fused` stage).
    pub fn compile(context: &Context, kernel: &OperationRef) -> Result<CpuKernel, CpuError> {
        let (text, inputs, outputs) = lower_kernel(kernel)?;
        let name =
            kernel.attribute("sym_name").map(|a| a.to_string().trim_matches('"').to_string()).unwrap_or_default();
        let lowering = |problem: String| CpuError::Lowering { kernel: name.clone(), problem };
        let mut module =
            crate::mlir::parse_module(context, &text, &format!("{name} (cpu)")).map_err(|e| lowering(e.to_string()))?;
        melior::utility::register_all_passes();
        let manager = PassManager::new(context);
        melior::utility::parse_pass_pipeline(manager.as_operation_pass_manager(), LOWER_TO_LLVM)
            .map_err(|e| lowering(format!("pass pipeline: {e}")))?;
        manager.run(&mut module).map_err(|e| lowering(format!("lowering to LLVM failed: {e}")))?;
        // ExecutionEngine reports no error: check that only the LLVM dialect is left first.
        let llvm = module.as_operation().to_string();
        if let Some(line) =
            llvm.lines().find(|l| l.contains(" = ") && !l.contains("llvm.") && !l.trim_start().starts_with('^'))
        {
            return Err(lowering(format!("non-LLVM op left after lowering: {}", line.trim())));
        }
        let engine = ExecutionEngine::new(&module, 2, &[], false, false);
        Ok(CpuKernel { engine, name, inputs, outputs })
    }

    /// Runs the kernel on `inputs`, writing `outputs` (allocated by the caller with matching shapes).
    pub fn run(&self, inputs: &mut [HostBuffer], outputs: &mut [HostBuffer]) -> Result<(), CpuError> {
        let err = |problem: String| CpuError::Run { kernel: self.name.clone(), problem };
        if inputs.len() != self.inputs.len() || outputs.len() != self.outputs.len() {
            return Err(err(format!("expected {} inputs and {} outputs", self.inputs.len(), self.outputs.len())));
        }
        let declared = self.inputs.iter().chain(&self.outputs);
        let mut descriptors: Vec<Vec<u64>> = Vec::new();
        for (i, (buf, shape)) in inputs.iter_mut().chain(outputs.iter_mut()).zip(declared).enumerate() {
            let fits = buf.element() == shape.element
                && buf.shape.len() == shape.dims.len()
                && buf.shape.iter().zip(&shape.dims).all(|(a, b)| b.is_none_or(|b| b == *a));
            if !fits {
                return Err(err(format!("buffer {i}: {:?} {} does not fit {shape}", buf.shape, buf.element())));
            }
            // memref descriptor: allocated ptr, aligned ptr, offset, sizes[rank], strides[rank].
            let ptr = buf.ptr() as u64;
            let mut d = vec![ptr, ptr, 0];
            d.extend(buf.shape.iter().map(|&s| s as u64));
            let mut stride = 1u64;
            let mut strides = vec![0u64; buf.shape.len()];
            for (k, &s) in buf.shape.iter().enumerate().rev() {
                strides[k] = stride;
                stride *= s as u64;
            }
            d.extend(strides);
            descriptors.push(d);
        }
        let mut pointers: Vec<*mut u64> = descriptors.iter_mut().map(|d| d.as_mut_ptr()).collect();
        let mut args: Vec<*mut ()> = pointers.iter_mut().map(|p| p as *mut *mut u64 as *mut ()).collect();
        // SAFETY: each argument points at a pointer to a descriptor matching the kernel's memref
        // type (checked above); the buffers outlive the call.
        unsafe { self.engine.invoke_packed(&self.name, &mut args) }.map_err(|e| err(e.to_string()))
    }
}
