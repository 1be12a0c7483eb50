//! `v3` kernels -> CPU machine code: each kernel function (stage `fused`) becomes a function on
//! memrefs in destination-passing style (its inputs, then one caller-allocated buffer per result),
//! written with `linalg.generic`, lowered to LLVM and JIT-compiled by MLIR's ExecutionEngine.
//!
//! Covered so far: `linear` and `lm_head` with f32/bf16 weights (rank-2 activations), `rms_norm`,
//! `add`, `silu_mul`, `embed`, `reshape`, `split`, `concat`, `cache_write`, `rope` (interleaved or
//! half rotation, YaRN tables as module constants), and every kernel made of them (the fused MLA
//! projection, q-up and latent kernels, `gemm_residual`, `swiglu`, ...). Everything else is reported
//! as `unsupported on cpu: v3.<op>` — never run some other way.
//! Not yet: MLA attention, MoE routing/experts, fp8 operands, the entry-level executor and plan, and
//! tiling + vectorization through the transform dialect (the loops are plain).

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};
use melior::pass::PassManager;
use melior::{Context, ExecutionEngine};

use crate::shapes::{kernel_shape_rules, DimRule};
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

/// Helper functions every fp8 kernel module carries (names prefixed by the kernel's): e4m3 bits
/// to f32 and f32 to e4m3 bits, round to nearest even, |x| >= 464 -> NaN, exactly as
/// `v3c_models::dtype` does.
fn fp8_helpers(prefix: &str) -> String {
    format!(
        "func.func private @{prefix}_f8_decode(%b: i8) -> f32 {{
    %bi = arith.extui %b : i8 to i32
    %c3 = arith.constant 3 : i32
    %c7 = arith.constant 7 : i32
    %c15 = arith.constant 15 : i32
    %c20 = arith.constant 20 : i32
    %c23 = arith.constant 23 : i32
    %c24 = arith.constant 24 : i32
    %c120 = arith.constant 120 : i32
    %c128 = arith.constant 128 : i32
    %sign = arith.andi %bi, %c128 : i32
    %signbit = arith.shli %sign, %c24 : i32
    %eraw = arith.shrui %bi, %c3 : i32
    %e = arith.andi %eraw, %c15 : i32
    %m = arith.andi %bi, %c7 : i32
    %eb = arith.addi %e, %c120 : i32
    %es = arith.shli %eb, %c23 : i32
    %ms = arith.shli %m, %c20 : i32
    %n0 = arith.ori %es, %ms : i32
    %n1 = arith.ori %n0, %signbit : i32
    %normal = arith.bitcast %n1 : i32 to f32
    %mf = arith.uitofp %m : i32 to f32
    %tiny = arith.constant 1.953125e-03 : f32
    %subabs = arith.mulf %mf, %tiny : f32
    %subneg = arith.negf %subabs : f32
    %zero_i = arith.constant 0 : i32
    %neg = arith.cmpi ne, %sign, %zero_i : i32
    %sub = arith.select %neg, %subneg, %subabs : f32
    %issub = arith.cmpi eq, %e, %zero_i : i32
    %v = arith.select %issub, %sub, %normal : f32
    %emax = arith.cmpi eq, %e, %c15 : i32
    %mmax = arith.cmpi eq, %m, %c7 : i32
    %isnan = arith.andi %emax, %mmax : i1
    %nan = arith.constant 0x7FC00000 : f32
    %r = arith.select %isnan, %nan, %v : f32
    return %r : f32
  }}
  func.func private @{prefix}_f8_encode(%x: f32) -> i8 {{
    %bits = arith.bitcast %x : f32 to i32
    %c24 = arith.constant 24 : i32
    %c128 = arith.constant 128 : i32
    %sh = arith.shrui %bits, %c24 : i32
    %sign = arith.andi %sh, %c128 : i32
    %a = math.absf %x : f32
    %ab = arith.bitcast %a : f32 to i32
    %c23 = arith.constant 23 : i32
    %c20 = arith.constant 20 : i32
    %c1 = arith.constant 1 : i32
    %c3 = arith.constant 3 : i32
    %c7 = arith.constant 7 : i32
    %c120 = arith.constant 120 : i32
    %mask23 = arith.constant 8388607 : i32
    %half = arith.constant 524287 : i32
    %e = arith.shrui %ab, %c23 : i32
    %mant = arith.andi %ab, %mask23 : i32
    %lsb0 = arith.shrui %mant, %c20 : i32
    %lsb = arith.andi %lsb0, %c1 : i32
    %inc = arith.addi %half, %lsb : i32
    %rounded = arith.addi %mant, %inc : i32
    %m3 = arith.shrui %rounded, %c20 : i32
    %carry = arith.shrui %m3, %c3 : i32
    %mm = arith.andi %m3, %c7 : i32
    %e8a = arith.subi %e, %c120 : i32
    %e8 = arith.addi %e8a, %carry : i32
    %eb = arith.shli %e8, %c3 : i32
    %normal = arith.ori %eb, %mm : i32
    %scaled = arith.constant 512.0 : f32
    %q = arith.mulf %a, %scaled : f32
    %qr = math.roundeven %q : f32
    %sub = arith.fptoui %qr : f32 to i32
    %minnormal = arith.constant 0.015625 : f32
    %issub = arith.cmpf olt, %a, %minnormal : f32
    %code0 = arith.select %issub, %sub, %normal : i32
    %limit = arith.constant 464.0 : f32
    %over = arith.cmpf oge, %a, %limit : f32
    %isnan = arith.cmpf uno, %x, %x : f32
    %bad = arith.ori %over, %isnan : i1
    %c127 = arith.constant 127 : i32
    %code = arith.select %bad, %c127, %code0 : i32
    %withsign = arith.ori %code, %sign : i32
    %r = arith.trunci %withsign : i32 to i8
    return %r : i8
  }}
"
    )
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
}

impl Emitter {
    /// `dest[i] = src[f(i)]` over every index `i` of `dest`, `f` given as one affine expression per
    /// source dim over `d0..`. The loops run over `dest` only, so bounds never come from `src`.
    fn gather_copy(&mut self, src: &(String, Shape), dest: &str, dest_shape: &Shape, exprs: &[String]) {
        let rank = dest_shape.dims.len();
        let dims: Vec<String> = (0..rank).map(|i| format!("d{i}")).collect();
        let idx: Vec<String> = (0..rank).map(|i| format!("%i{i}")).collect();
        let mut body: String = (0..rank).map(|i| format!("      %i{i} = linalg.index {i} : index\n")).collect();
        let mut src_idx = Vec::new();
        for (j, expr) in exprs.iter().enumerate() {
            body.push_str(&format!(
                "      %s{j} = affine.apply affine_map<({}) -> ({expr})>({})\n",
                dims.join(", "),
                idx.join(", ")
            ));
            src_idx.push(format!("%s{j}"));
        }
        self.line(&format!(
            "linalg.generic {{indexing_maps = [{}], iterator_types = [{}]}} outs({dest} : {}) {{\n    ^bb0(%c: f32):\n{body}      %v = memref.load {}[{}] : {}\n      linalg.yield %v : f32\n    }}",
            identity(rank), vec!["\"parallel\""; rank].join(", "), memref(dest_shape), src.0, src_idx.join(", "), memref(&src.1)
        ));
    }

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

/// Static facts of one MLA op.
struct AttentionSpec {
    h: usize,
    dn: usize,
    dr: usize,
    dv: usize,
    kv: usize,
    scale: String,
    absorbed: bool,
    decode: bool,
}

impl Emitter {
    /// MLA with scf loops (spec section 3). Single sequence: query t sees latent rows 0..=S-T+t.
    /// Decode: sequence b's one query sees rows 0..=positions[b] of its own cache.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        a: &AttentionSpec,
        qn: &(String, Shape),
        qp: &(String, Shape),
        lat: &(String, Shape),
        (kvb, kvb_scale): (&(String, Shape), Option<&(String, Shape)>),
        positions: Option<&(String, Shape)>,
        dest: &str,
        out_shape: &Shape,
    ) {
        let AttentionSpec { h, dn, dr, dv, kv, absorbed, decode, .. } = *a;
        let dec = if kvb_scale.is_some() { self.decode() } else { String::new() };
        let per_head = dn + dv;
        let (qn_ty, qp_ty, lat_ty, kvb_ty, out_ty) =
            (memref(&qn.1), memref(&qp.1), memref(&lat.1), memref(&kvb.1), memref(out_shape));
        let kvb_load = |row: &str, col: &str, out: &str| {
            match kvb_scale {
            // fp8 kv_b_proj: bits decoded and scaled by their 128 x 128 block's scale.
            Some(scale) => format!(
                "%kraw = memref.load {}[{row}, {col}] : {kvb_ty}\n%kdec = func.call {dec}(%kraw) : (i8) -> f32\n%krb = arith.divui {row}, %c128 : index\n%kcb = arith.divui {col}, %c128 : index\n%ksc = memref.load {}[%krb, %kcb] : {}\n{out} = arith.mulf %kdec, %ksc : f32",
                kvb.0,
                scale.0,
                memref(&scale.1)
            ),
            None => {
                let conv = if kvb.1.element == "f32" {
                    format!("{out} = arith.addf %kraw, %zero : f32")
                } else {
                    format!("{out} = arith.extf %kraw : {} to f32", kvb.1.element)
                };
                format!("%kraw = memref.load {}[{row}, {col}] : {kvb_ty}\n{conv}", kvb.0)
            }
        }
        };
        // The latent row j of the current sequence.
        let lat_idx = |j: &str, c: &str| if decode { format!("%seq, {j}, {c}") } else { format!("{j}, {c}") };
        let mut t = String::new();
        let w = |t: &mut String, s: &str| {
            for line in s.lines() {
                t.push_str("    ");
                t.push_str(line);
                t.push('\n');
            }
        };
        w(&mut t, &format!("%c0 = arith.constant 0 : index\n%c1 = arith.constant 1 : index\n%ninf = arith.constant 0xFF800000 : f32\n%scale = arith.constant {} : f32", a.scale));
        let (rows_dim, queries) = if decode { (1, "%nb") } else { (0, "%nt") };
        w(&mut t, &format!("%c_rows = arith.constant {rows_dim} : index\n%srows = memref.dim {}, %c_rows : {lat_ty}\n%nq = memref.dim {}, %c0 : {qn_ty}", lat.0, qn.0));
        let _ = queries;
        w(&mut t, "%scores = memref.alloc(%srows) : memref<?xf32>");
        if absorbed {
            w(&mut t, &format!("%qabs = memref.alloc() : memref<{kv}xf32>\n%olat = memref.alloc() : memref<{kv}xf32>"));
        } else {
            // kvb[j, r] = sum_c latent[j, c] * kv_b[r, c] over the kv_lora_rank latent columns.
            w(&mut t, &format!("%kvb = memref.alloc(%srows) : memref<?x{}xf32>", h * per_head));
        }
        // Loop over queries (decode: one per sequence).
        // kvb[j, r] = sum_c latent[j, c] * kv_b[r, c] for the rows a query may see.
        let expand = |pad: &str, rows: &str| {
            format!(
                "{pad}scf.for %j = %c0 to {rows} step %c1 {{\n{pad}  scf.for %r = %c0 to %c{hp} step %c1 {{\n{pad}    %acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %l = memref.load {}[{}] : {lat_ty}\n{}\n        %m = arith.mulf %l, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, %kvb[%j, %r] : memref<?x{hp}xf32>\n    }}\n  }}",
                lat.0,
                lat_idx("%j", "%c"),
                indent(&kvb_load("%r", "%c", "%kf"), 8),
                hp = h * per_head
            )
        };
        if !absorbed && !decode {
            // Prefill (naive form): every latent row is expanded once, before the queries.
            w(&mut t, &expand("", "%srows"));
        }
        w(&mut t, "scf.for %q = %c0 to %nq step %c1 {");
        if decode {
            let p = positions.expect("decode has positions");
            w(&mut t, &format!("  %seq = arith.addi %q, %c0 : index\n  %p64 = memref.load {}[%q] : {}\n  %last = arith.index_cast %p64 : i64 to index", p.0, memref(&p.1)));
        } else {
            w(&mut t, "  %tq = arith.subi %srows, %nq : index\n  %last = arith.addi %tq, %q : index");
        }
        w(&mut t, "  %nkeys = arith.addi %last, %c1 : index");
        if !absorbed && decode {
            // Decode (naive form): each sequence expands its own visible rows.
            w(&mut t, &expand("  ", "%nkeys"));
        }
        w(
            &mut t,
            &format!("  scf.for %hh = %c0 to %c{h} step %c1 {{\n    %hbase = arith.muli %hh, %c{per_head} : index"),
        );
        if absorbed {
            // q_abs = q_nope[q, h] @ W_UK[h]  ([dn] x [dn, kv])
            w(&mut t, &format!(
                "    scf.for %c = %c0 to %c{kv} step %c1 {{\n      %acc = scf.for %d = %c0 to %c{dn} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %qv = memref.load {}[%q, %hh, %d] : {qn_ty}\n        %row = arith.addi %hbase, %d : index\n{}\n        %m = arith.mulf %qv, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, %qabs[%c] : memref<{kv}xf32>\n    }}",
                qn.0, indent(&kvb_load("%row", "%c", "%kf"), 8)
            ));
        }
        // Scores and their max.
        let nope_dot = if absorbed {
            format!("%dn_acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n  %qa = memref.load %qabs[%c] : memref<{kv}xf32>\n  %l = memref.load {}[{}] : {lat_ty}\n  %m = arith.mulf %qa, %l : f32\n  %n = arith.addf %s, %m : f32\n  scf.yield %n : f32\n}}", lat.0, lat_idx("%j", "%c"))
        } else {
            format!("%dn_acc = scf.for %d = %c0 to %c{dn} step %c1 iter_args(%s = %zero) -> (f32) {{\n  %qv = memref.load {}[%q, %hh, %d] : {qn_ty}\n  %col = arith.addi %hbase, %d : index\n  %k = memref.load %kvb[%j, %col] : memref<?x{}xf32>\n  %m = arith.mulf %qv, %k : f32\n  %n = arith.addf %s, %m : f32\n  scf.yield %n : f32\n}}", qn.0, h * per_head)
        };
        let rope_dot = format!("%dr_acc = scf.for %r = %c0 to %c{dr} step %c1 iter_args(%s = %zero) -> (f32) {{\n  %qv = memref.load {}[%q, %hh, %r] : {qp_ty}\n  %col = arith.addi %r, %c{kv} : index\n  %l = memref.load {}[{}] : {lat_ty}\n  %m = arith.mulf %qv, %l : f32\n  %n = arith.addf %s, %m : f32\n  scf.yield %n : f32\n}}", qp.0, lat.0, lat_idx("%j", "%col"));
        w(&mut t, &format!(
            "    %max = scf.for %j = %c0 to %nkeys step %c1 iter_args(%mx = %ninf) -> (f32) {{\n{}\n{}\n      %sum_s = arith.addf %dn_acc, %dr_acc : f32\n      %sc = arith.mulf %sum_s, %scale : f32\n      memref.store %sc, %scores[%j] : memref<?xf32>\n      %nm = arith.maximumf %mx, %sc : f32\n      scf.yield %nm : f32\n    }}",
            indent(&nope_dot, 6), indent(&rope_dot, 6)
        ));
        w(&mut t, "    %den = scf.for %j = %c0 to %nkeys step %c1 iter_args(%sm = %zero) -> (f32) {\n      %sc = memref.load %scores[%j] : memref<?xf32>\n      %z = arith.subf %sc, %max : f32\n      %ex = math.exp %z : f32\n      memref.store %ex, %scores[%j] : memref<?xf32>\n      %ns = arith.addf %sm, %ex : f32\n      scf.yield %ns : f32\n    }".replace("\\n", "\n").as_str());
        if absorbed {
            w(&mut t, &format!(
                "    scf.for %c = %c0 to %c{kv} step %c1 {{\n      %acc = scf.for %j = %c0 to %nkeys step %c1 iter_args(%s = %zero) -> (f32) {{\n        %pj = memref.load %scores[%j] : memref<?xf32>\n        %l = memref.load {}[{}] : {lat_ty}\n        %m = arith.mulf %pj, %l : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      %norm = arith.divf %acc, %den : f32\n      memref.store %norm, %olat[%c] : memref<{kv}xf32>\n    }}\n    scf.for %e = %c0 to %c{dv} step %c1 {{\n      %vrow0 = arith.addi %hbase, %c{dn} : index\n      %vrow = arith.addi %vrow0, %e : index\n      %acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %ol = memref.load %olat[%c] : memref<{kv}xf32>\n{}\n        %m = arith.mulf %ol, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, {dest}[%q, %hh, %e] : {out_ty}\n    }}",
                lat.0, lat_idx("%j", "%c"), indent(&kvb_load("%vrow", "%c", "%kf"), 8)
            ));
        } else {
            w(&mut t, &format!(
                "    scf.for %e = %c0 to %c{dv} step %c1 {{\n      %vcol0 = arith.addi %hbase, %c{dn} : index\n      %vcol = arith.addi %vcol0, %e : index\n      %acc = scf.for %j = %c0 to %nkeys step %c1 iter_args(%s = %zero) -> (f32) {{\n        %pj = memref.load %scores[%j] : memref<?xf32>\n        %v = memref.load %kvb[%j, %vcol] : memref<?x{}xf32>\n        %m = arith.mulf %pj, %v : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      %norm = arith.divf %acc, %den : f32\n      memref.store %norm, {dest}[%q, %hh, %e] : {out_ty}\n    }}",
                h * per_head
            ));
        }
        w(&mut t, "  }\n}");
        w(&mut t, "memref.dealloc %scores : memref<?xf32>");
        if absorbed {
            w(&mut t, &format!("memref.dealloc %qabs : memref<{kv}xf32>\nmemref.dealloc %olat : memref<{kv}xf32>"));
        } else {
            w(&mut t, &format!("memref.dealloc %kvb : memref<?x{}xf32>", h * per_head));
        }
        // Constants used above.
        let mut consts = String::new();
        for n in [h, dn, dr, dv, kv, per_head, h * per_head, 128] {
            let line = format!("    %c{n} = arith.constant {n} : index\n");
            if !consts.contains(&line) {
                consts.push_str(&line);
            }
        }
        // Each MLA op gets its own region so the fixed names above never clash with other ops.
        self.line(&format!("scf.execute_region {{\n{consts}{t}    scf.yield\n    }}"));
    }
}

/// Static facts of one routing op.
struct RouteSpec {
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    norm: bool,
    factor: String,
}

impl Emitter {
    /// Group-limited top-k routing (spec section 4), one token at a time with scf loops. Ties go to
    /// the lower index, as in the reference.
    fn route(
        &mut self,
        r: &RouteSpec,
        x: &(String, Shape),
        gate: &(String, Shape),
        bias: &(String, Shape),
        idx_out: (&str, &Shape),
        w_out: (&str, &Shape),
    ) {
        let e_count = gate.1.dims[0].unwrap_or(0);
        let d = gate.1.dims[1].unwrap_or(0);
        let per_group = e_count / r.n_group.max(1);
        let (x_ty, g_ty, b_ty) = (memref(&x.1), memref(&gate.1), memref(&bias.1));
        let (i_ty, w_ty) = (memref(idx_out.1), memref(w_out.1));
        let gl = load_f32(&gate.1.element, "%graw", "%gv");
        let bl = load_f32(&bias.1.element, "%braw", "%bv");
        let norm = if r.norm {
            "      %wsum = scf.for %k = %c0 to %ck step %c1 iter_args(%a = %zero) -> (f32) {\n        %wv = memref.load WOUT[%t, %k] : WTY\n        %n = arith.addf %a, %wv : f32\n        scf.yield %n : f32\n      }\n      %tiny = arith.constant 1.0e-20 : f32\n      %den = arith.addf %wsum, %tiny : f32\n".to_string()
        } else {
            "      %den = arith.addf %one, %zero : f32\n".to_string()
        };
        let text = format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ce = arith.constant {e_count} : index
      %cd = arith.constant {d} : index
      %cg = arith.constant {ng} : index
      %cpg = arith.constant {per_group} : index
      %ck = arith.constant {top_k} : index
      %ckg = arith.constant {topk_group} : index
      %ninf = arith.constant 0xFF800000 : f32
      %factor = arith.constant {factor} : f32
      %nt = memref.dim {x}, %c0 : {x_ty}
      %s = memref.alloc() : memref<{e_count}xf32>
      %cand = memref.alloc() : memref<{e_count}xf32>
      %gs = memref.alloc() : memref<{ng}xf32>
      scf.for %t = %c0 to %nt step %c1 {{
        scf.for %e = %c0 to %ce step %c1 {{
          %logit = scf.for %k = %c0 to %cd step %c1 iter_args(%a = %zero) -> (f32) {{
            %xv = memref.load {x}[%t, %k] : {x_ty}
            %graw = memref.load {gate}[%e, %k] : {g_ty}
            {gl}
            %m = arith.mulf %xv, %gv : f32
            %n = arith.addf %a, %m : f32
            scf.yield %n : f32
          }}
          %neg = arith.negf %logit : f32
          %ex = math.exp %neg : f32
          %dn = arith.addf %one, %ex : f32
          %sig = arith.divf %one, %dn : f32
          memref.store %sig, %s[%e] : memref<{e_count}xf32>
          %braw = memref.load {bias}[%e] : {b_ty}
          {bl}
          %sb = arith.addf %sig, %bv : f32
          memref.store %sb, %cand[%e] : memref<{e_count}xf32>
        }}
        scf.for %g = %c0 to %cg step %c1 {{
          %base = arith.muli %g, %cpg : index
          %top:2 = scf.for %i = %c0 to %cpg step %c1 iter_args(%m1 = %ninf, %m2 = %ninf) -> (f32, f32) {{
            %ei = arith.addi %base, %i : index
            %v = memref.load %cand[%ei] : memref<{e_count}xf32>
            %gt1 = arith.cmpf ogt, %v, %m1 : f32
            %gt2 = arith.cmpf ogt, %v, %m2 : f32
            %n2a = arith.select %gt2, %v, %m2 : f32
            %n2 = arith.select %gt1, %m1, %n2a : f32
            %n1 = arith.select %gt1, %v, %m1 : f32
            scf.yield %n1, %n2 : f32, f32
          }}
          %two = arith.cmpi ugt, %cpg, %c1 : index
          %second = arith.select %two, %top#1, %zero : f32
          %gsum = arith.addf %top#0, %second : f32
          memref.store %gsum, %gs[%g] : memref<{ng}xf32>
        }}
        // Keep the best topk_group groups: pick them one by one, marking picked groups -inf and
        // remembering them as +inf in a second pass.
        %kept = memref.alloc() : memref<{ng}xi1>
        %false = arith.constant false
        %true = arith.constant true
        scf.for %g = %c0 to %cg step %c1 {{
          memref.store %false, %kept[%g] : memref<{ng}xi1>
        }}
        scf.for %pick = %c0 to %ckg step %c1 {{
          %best:2 = scf.for %g = %c0 to %cg step %c1 iter_args(%bv2 = %ninf, %bi = %c0) -> (f32, index) {{
            %v = memref.load %gs[%g] : memref<{ng}xf32>
            %k = memref.load %kept[%g] : memref<{ng}xi1>
            %better = arith.cmpf ogt, %v, %bv2 : f32
            %free = arith.xori %k, %true : i1
            %take0 = arith.andi %better, %free : i1
            %first = arith.cmpi eq, %g, %c0 : index
            %isninf = arith.cmpf oeq, %bv2, %ninf : f32
            %firstfree = arith.andi %isninf, %free : i1
            %take = arith.ori %take0, %firstfree : i1
            %nv = arith.select %take, %v, %bv2 : f32
            %ni = arith.select %take, %g, %bi : index
            scf.yield %nv, %ni : f32, index
          }}
          memref.store %true, %kept[%best#1] : memref<{ng}xi1>
        }}
        scf.for %e = %c0 to %ce step %c1 {{
          %g = arith.divui %e, %cpg : index
          %k = memref.load %kept[%g] : memref<{ng}xi1>
          scf.if %k {{
          }} else {{
            memref.store %ninf, %cand[%e] : memref<{e_count}xf32>
          }}
        }}
        memref.dealloc %kept : memref<{ng}xi1>
        scf.for %k = %c0 to %ck step %c1 {{
          %best:2 = scf.for %e = %c0 to %ce step %c1 iter_args(%bv2 = %ninf, %bi = %c0) -> (f32, index) {{
            %v = memref.load %cand[%e] : memref<{e_count}xf32>
            %better = arith.cmpf ogt, %v, %bv2 : f32
            %nv = arith.select %better, %v, %bv2 : f32
            %ni = arith.select %better, %e, %bi : index
            scf.yield %nv, %ni : f32, index
          }}
          memref.store %ninf, %cand[%best#1] : memref<{e_count}xf32>
          %i32 = arith.index_cast %best#1 : index to i32
          memref.store %i32, {idx}[%t, %k] : {i_ty}
          %sv = memref.load %s[%best#1] : memref<{e_count}xf32>
          memref.store %sv, {wout}[%t, %k] : {w_ty}
        }}
{norm}        scf.for %k = %c0 to %ck step %c1 {{
          %wv = memref.load {wout}[%t, %k] : {w_ty}
          %wn = arith.divf %wv, %den : f32
          %ws = arith.mulf %wn, %factor : f32
          memref.store %ws, {wout}[%t, %k] : {w_ty}
        }}
      }}
      memref.dealloc %s : memref<{e_count}xf32>
      memref.dealloc %cand : memref<{e_count}xf32>
      memref.dealloc %gs : memref<{ng}xf32>
      scf.yield
    }}",
            ng = r.n_group,
            top_k = r.top_k,
            topk_group = r.topk_group,
            factor = r.factor,
            x = x.0,
            gate = gate.0,
            bias = bias.0,
            idx = idx_out.0,
            wout = w_out.0,
            norm = norm.replace("WOUT", w_out.0).replace("WTY", &w_ty),
        );
        self.line(&text);
    }

    /// Routed SwiGLU experts, token by token: out[t] = sum_k w[t,k] * down_e(silu(gate_e x) * up_e x).
    fn experts(&mut self, a: &[(String, Shape)], dest: &str, out_shape: &Shape) {
        let (x, idx, w, gate, up, down) = (&a[0], &a[1], &a[2], &a[3], &a[4], &a[5]);
        let inter = gate.1.dims[1].unwrap_or(0);
        let d = gate.1.dims[2].unwrap_or(0);
        let k = idx.1.dims[1].unwrap_or(0);
        let (x_ty, i_ty, w_ty, g_ty, u_ty, dn_ty, o_ty) = (
            memref(&x.1),
            memref(&idx.1),
            memref(&w.1),
            memref(&gate.1),
            memref(&up.1),
            memref(&down.1),
            memref(out_shape),
        );
        let gl = load_f32(&gate.1.element, "%graw", "%gv");
        let ul = load_f32(&up.1.element, "%uraw", "%uv");
        let dl = load_f32(&down.1.element, "%draw", "%dv");
        let text = format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ci = arith.constant {inter} : index
      %cd = arith.constant {d} : index
      %ck = arith.constant {k} : index
      %cdv = arith.constant {dv_main} : index
      %civ = arith.constant {iv_main} : index
      %cl = arith.constant {lanes} : index
      %zv = arith.constant dense<0.0> : vector<{lanes}xf32>
      %nt = memref.dim {x}, %c0 : {x_ty}
      %h = memref.alloc() : memref<{inter}xf32>
      scf.for %t = %c0 to %nt step %c1 {{
        scf.for %o = %c0 to %cd step %c1 {{
          memref.store %zero, {dest}[%t, %o] : {o_ty}
        }}
        scf.for %slot = %c0 to %ck step %c1 {{
          %e32 = memref.load {idx}[%t, %slot] : {i_ty}
          %e = arith.index_cast %e32 : i32 to index
          %wt = memref.load {w}[%t, %slot] : {w_ty}
          scf.for %i = %c0 to %ci step %c1 {{
            %vacc:2 = scf.for %j = %c0 to %cdv step %cl iter_args(%vg = %zv, %vu = %zv) -> (vector<{lanes}xf32>, vector<{lanes}xf32>) {{
              %xvv = vector.load {x}[%t, %j] : {x_ty}, vector<{lanes}xf32>
              %gv0 = vector.load {gate}[%e, %i, %j] : {g_ty}, vector<{lanes}x{gel}>
              {gwiden}
              %uv0 = vector.load {up}[%e, %i, %j] : {u_ty}, vector<{lanes}x{uel}>
              {uwiden}
              %fg = vector.fma %xvv, %gvv, %vg : vector<{lanes}xf32>
              %fu = vector.fma %xvv, %uvv, %vu : vector<{lanes}xf32>
              scf.yield %fg, %fu : vector<{lanes}xf32>, vector<{lanes}xf32>
            }}
            %sg0 = vector.reduction <add>, %vacc#0 : vector<{lanes}xf32> into f32
            %su0 = vector.reduction <add>, %vacc#1 : vector<{lanes}xf32> into f32
            %acc:2 = scf.for %j = %cdv to %cd step %c1 iter_args(%ag = %sg0, %au = %su0) -> (f32, f32) {{
              %xv = memref.load {x}[%t, %j] : {x_ty}
              %graw = memref.load {gate}[%e, %i, %j] : {g_ty}
              {gl}
              %uraw = memref.load {up}[%e, %i, %j] : {u_ty}
              {ul}
              %mg = arith.mulf %xv, %gv : f32
              %mu = arith.mulf %xv, %uv : f32
              %ng = arith.addf %ag, %mg : f32
              %nu = arith.addf %au, %mu : f32
              scf.yield %ng, %nu : f32, f32
            }}
            %neg = arith.negf %acc#0 : f32
            %ex = math.exp %neg : f32
            %dn = arith.addf %one, %ex : f32
            %sg = arith.divf %acc#0, %dn : f32
            %hv = arith.mulf %sg, %acc#1 : f32
            memref.store %hv, %h[%i] : memref<{inter}xf32>
          }}
          scf.for %o = %c0 to %cd step %c1 {{
            %dacc = scf.for %i = %c0 to %civ step %cl iter_args(%vd = %zv) -> (vector<{lanes}xf32>) {{
              %hvv = vector.load %h[%i] : memref<{inter}xf32>, vector<{lanes}xf32>
              %dv0 = vector.load {down}[%e, %o, %i] : {dn_ty}, vector<{lanes}x{del}>
              {dwiden}
              %fd = vector.fma %hvv, %dvv, %vd : vector<{lanes}xf32>
              scf.yield %fd : vector<{lanes}xf32>
            }}
            %sd0 = vector.reduction <add>, %dacc : vector<{lanes}xf32> into f32
            %acc = scf.for %i = %civ to %ci step %c1 iter_args(%a2 = %sd0) -> (f32) {{
              %hv = memref.load %h[%i] : memref<{inter}xf32>
              %draw = memref.load {down}[%e, %o, %i] : {dn_ty}
              {dl}
              %m = arith.mulf %hv, %dv : f32
              %n = arith.addf %a2, %m : f32
              scf.yield %n : f32
            }}
            %cur = memref.load {dest}[%t, %o] : {o_ty}
            %wa = arith.mulf %wt, %acc : f32
            %sum = arith.addf %cur, %wa : f32
            memref.store %sum, {dest}[%t, %o] : {o_ty}
          }}
        }}
      }}
      memref.dealloc %h : memref<{inter}xf32>
      scf.yield
    }}",
            x = x.0,
            idx = idx.0,
            w = w.0,
            gate = gate.0,
            up = up.0,
            down = down.0,
            lanes = LANES,
            dv_main = d - d % LANES,
            iv_main = inter - inter % LANES,
            gel = storage(&gate.1.element),
            uel = storage(&up.1.element),
            del = storage(&down.1.element),
            gwiden = widen_vector(&gate.1.element, "%gv0", "%gvv"),
            uwiden = widen_vector(&up.1.element, "%uv0", "%uvv"),
            dwiden = widen_vector(&down.1.element, "%dv0", "%dvv"),
        );
        self.line(&text);
    }
}

/// `out = f32 lanes of v` for a vector of `element`s.
fn widen_vector(element: &str, v: &str, out: &str) -> String {
    if element == "f32" {
        format!("{out} = arith.addf {v}, %zv : vector<{LANES}xf32>")
    } else {
        format!("{out} = arith.extf {v} : vector<{LANES}x{}> to vector<{LANES}xf32>", storage(element))
    }
}

/// Lanes of the vectorized dot products of dense GEMMs.
const LANES: usize = 16;

impl Emitter {
    /// y = x @ w^T for x [M, K] f32 and a dense w [N, K] (f32 or bf16): each output a dot product
    /// over K, `LANES` at a time with `vector.fma` (then a scalar tail), reduced once at the end.
    fn gemm_vectorized(&mut self, x: &(String, Shape), w: &(String, Shape), dest: &str, out: &Shape) {
        let k = x.1.dims[1].unwrap_or(0);
        let n = w.1.dims[0].unwrap_or(0);
        let kv = k - k % LANES;
        let el = storage(&w.1.element).to_string();
        let widen = if el == "f32" {
            "%wv = arith.addf %wv0, %zv : vector<LANESxf32>".replace("LANES", &LANES.to_string())
        } else {
            format!("%wv = arith.extf %wv0 : vector<{LANES}x{el}> to vector<{LANES}xf32>")
        };
        let widen_scalar = load_f32(&w.1.element, "%wb", "%wf");
        let (x_ty, w_ty, o_ty) = (memref(&x.1), memref(&w.1), memref(out));
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %cn = arith.constant {n} : index
      %ck = arith.constant {k} : index
      %ckv = arith.constant {kv} : index
      %cl = arith.constant {LANES} : index
      %zv = arith.constant dense<0.0> : vector<{LANES}xf32>
      %rows = memref.dim {xv}, %c0 : {x_ty}
      scf.for %m = %c0 to %rows step %c1 {{
        scf.for %j = %c0 to %cn step %c1 {{
          %accv = scf.for %i = %c0 to %ckv step %cl iter_args(%a = %zv) -> (vector<{LANES}xf32>) {{
            %xv = vector.load {xv}[%m, %i] : {x_ty}, vector<{LANES}xf32>
            %wv0 = vector.load {wvv}[%j, %i] : {w_ty}, vector<{LANES}x{el}>
            {widen}
            %f = vector.fma %xv, %wv, %a : vector<{LANES}xf32>
            scf.yield %f : vector<{LANES}xf32>
          }}
          %s0 = vector.reduction <add>, %accv : vector<{LANES}xf32> into f32
          %sum = scf.for %i = %ckv to %ck step %c1 iter_args(%t = %s0) -> (f32) {{
            %xs = memref.load {xv}[%m, %i] : {x_ty}
            %wb = memref.load {wvv}[%j, %i] : {w_ty}
            {widen_scalar}
            %p = arith.mulf %xs, %wf : f32
            %nt = arith.addf %t, %p : f32
            scf.yield %nt : f32
          }}
          memref.store %sum, {dest}[%m, %j] : {o_ty}
        }}
      }}
      scf.yield
    }}",
            xv = x.0,
            wvv = w.0
        ));
    }
}

/// fp8 activation group and weight block edge (DeepSeek-V3: 1x128 activations, 128x128 weights).
const FP8_BLOCK: usize = 128;

impl Emitter {
    fn decode(&mut self) -> String {
        self.uses_fp8 = true;
        format!("@{}_f8_decode", self.prefix)
    }

    fn encode(&mut self) -> String {
        self.uses_fp8 = true;
        format!("@{}_f8_encode", self.prefix)
    }

    /// 1 x `group` quantization of rows: s = max(amax, 1e-4) / 448, xq = e4m3(x / s).
    fn quantize(&mut self, x: &(String, Shape), group: usize, q: (&str, &Shape), scales: (&str, &Shape)) {
        let k = x.1.dims.last().copied().flatten().unwrap_or(0);
        let groups = k.div_ceil(group);
        let enc = self.encode();
        let (x_ty, q_ty, s_ty) = (memref(&x.1), memref(q.1), memref(scales.1));
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ck = arith.constant {k} : index
      %cg = arith.constant {group} : index
      %cb = arith.constant {groups} : index
      %floor = arith.constant 1.0e-04 : f32
      %fmax = arith.constant 448.0 : f32
      %rows = memref.dim {x}, %c0 : {x_ty}
      scf.for %r = %c0 to %rows step %c1 {{
        scf.for %b = %c0 to %cb step %c1 {{
          %lo = arith.muli %b, %cg : index
          %hi0 = arith.addi %lo, %cg : index
          %hi = arith.minui %hi0, %ck : index
          %amax = scf.for %i = %lo to %hi step %c1 iter_args(%a = %zero) -> (f32) {{
            %v = memref.load {x}[%r, %i] : {x_ty}
            %av = math.absf %v : f32
            %m = arith.maximumf %a, %av : f32
            scf.yield %m : f32
          }}
          %am = arith.maximumf %amax, %floor : f32
          %s = arith.divf %am, %fmax : f32
          memref.store %s, {sc}[%r, %b] : {s_ty}
          scf.for %i = %lo to %hi step %c1 {{
            %v = memref.load {x}[%r, %i] : {x_ty}
            %d = arith.divf %v, %s : f32
            %bits = func.call {enc}(%d) : (f32) -> i8
            memref.store %bits, {qd}[%r, %i] : {q_ty}
          }}
        }}
      }}
      scf.yield
    }}",
            x = x.0,
            sc = scales.0,
            qd = q.0
        ));
    }

    /// f32 activations with an fp8 weight: y[m, n] = sum_k x[m,k] * (e4m3(w[n,k]) * ws[n/128, k/128]),
    /// the weight dequantized as it is read (what the reference computes on dequantized weights).
    fn linear_dequant(&mut self, a: &[(String, Shape)], dest: &str, out: &Shape) {
        let (x, w, ws) = (&a[0], &a[1], &a[2]);
        let k = x.1.dims[1].unwrap_or(0);
        let n = w.1.dims[0].unwrap_or(0);
        let dec = self.decode();
        let (x_ty, w_ty, ws_ty, o_ty) = (memref(&x.1), memref(&w.1), memref(&ws.1), memref(out));
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ck = arith.constant {k} : index
      %cn = arith.constant {n} : index
      %cblk = arith.constant {FP8_BLOCK} : index
      %rows = memref.dim {xv}, %c0 : {x_ty}
      scf.for %m = %c0 to %rows step %c1 {{
        scf.for %j = %c0 to %cn step %c1 {{
          %nb = arith.divui %j, %cblk : index
          %acc = scf.for %i = %c0 to %ck step %c1 iter_args(%a = %zero) -> (f32) {{
            %kb = arith.divui %i, %cblk : index
            %xf = memref.load {xv}[%m, %i] : {x_ty}
            %wb = memref.load {wv}[%j, %i] : {w_ty}
            %wd = func.call {dec}(%wb) : (i8) -> f32
            %sw = memref.load {wsv}[%nb, %kb] : {ws_ty}
            %wf = arith.mulf %wd, %sw : f32
            %pr = arith.mulf %xf, %wf : f32
            %na = arith.addf %a, %pr : f32
            scf.yield %na : f32
          }}
          memref.store %acc, {dest}[%m, %j] : {o_ty}
        }}
      }}
      scf.yield
    }}",
            xv = x.0,
            wv = w.0,
            wsv = ws.0
        ));
    }

    /// y[m, n] = sum over K blocks kb of (sum_k xq[m,k] wq[n,k]) * xs[m,kb] * ws[n/128, kb].
    fn linear_fp8(&mut self, a: &[(String, Shape)], dest: &str, out: &Shape) {
        let (x, xs, w, ws) = (&a[0], &a[1], &a[2], &a[3]);
        let k = x.1.dims[1].unwrap_or(0);
        let n = w.1.dims[0].unwrap_or(0);
        let kb = k.div_ceil(FP8_BLOCK);
        let dec = self.decode();
        let (x_ty, xs_ty, w_ty, ws_ty, o_ty) = (memref(&x.1), memref(&xs.1), memref(&w.1), memref(&ws.1), memref(out));
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ck = arith.constant {k} : index
      %cn = arith.constant {n} : index
      %ckb = arith.constant {kb} : index
      %cblk = arith.constant {FP8_BLOCK} : index
      %rows = memref.dim {xv}, %c0 : {x_ty}
      scf.for %m = %c0 to %rows step %c1 {{
        scf.for %j = %c0 to %cn step %c1 {{
          %nb = arith.divui %j, %cblk : index
          %acc = scf.for %b = %c0 to %ckb step %c1 iter_args(%a = %zero) -> (f32) {{
            %lo = arith.muli %b, %cblk : index
            %hi0 = arith.addi %lo, %cblk : index
            %hi = arith.minui %hi0, %ck : index
            %part = scf.for %i = %lo to %hi step %c1 iter_args(%p = %zero) -> (f32) {{
              %xb = memref.load {xv}[%m, %i] : {x_ty}
              %wb = memref.load {wv}[%j, %i] : {w_ty}
              %xf = func.call {dec}(%xb) : (i8) -> f32
              %wf = func.call {dec}(%wb) : (i8) -> f32
              %pr = arith.mulf %xf, %wf : f32
              %np = arith.addf %p, %pr : f32
              scf.yield %np : f32
            }}
            %sx = memref.load {xsv}[%m, %b] : {xs_ty}
            %sw = memref.load {wsv}[%nb, %b] : {ws_ty}
            %t1 = arith.mulf %part, %sx : f32
            %t2 = arith.mulf %t1, %sw : f32
            %na = arith.addf %a, %t2 : f32
            scf.yield %na : f32
          }}
          memref.store %acc, {dest}[%m, %j] : {o_ty}
        }}
      }}
      scf.yield
    }}",
            xv = x.0,
            xsv = xs.0,
            wv = w.0,
            wsv = ws.0
        ));
    }
}

/// Quantizes the 1-D f32 row `src` (`len` values) 1 x 128 into `q` (bits) and `s` (scales); SSA
/// names are local to the returned region.
fn quant_row(src: &str, len: usize, q: &str, s: &str, enc: &str) -> String {
    let blocks = len.div_ceil(FP8_BLOCK);
    format!(
        "scf.execute_region {{
        %qc0 = arith.constant 0 : index
        %qc1 = arith.constant 1 : index
        %qlen = arith.constant {len} : index
        %qblk = arith.constant {FP8_BLOCK} : index
        %qnb = arith.constant {blocks} : index
        %qfloor = arith.constant 1.0e-04 : f32
        %qmax = arith.constant 448.0 : f32
        scf.for %qb = %qc0 to %qnb step %qc1 {{
          %qlo = arith.muli %qb, %qblk : index
          %qhi0 = arith.addi %qlo, %qblk : index
          %qhi = arith.minui %qhi0, %qlen : index
          %qamax = scf.for %qi = %qlo to %qhi step %qc1 iter_args(%qa = %zero) -> (f32) {{
            %qv = memref.load {src}[%qi] : memref<{len}xf32>
            %qav = math.absf %qv : f32
            %qm = arith.maximumf %qa, %qav : f32
            scf.yield %qm : f32
          }}
          %qam = arith.maximumf %qamax, %qfloor : f32
          %qs = arith.divf %qam, %qmax : f32
          memref.store %qs, {s}[%qb] : memref<{blocks}xf32>
          scf.for %qi = %qlo to %qhi step %qc1 {{
            %qv = memref.load {src}[%qi] : memref<{len}xf32>
            %qd = arith.divf %qv, %qs : f32
            %qbits = func.call {enc}(%qd) : (f32) -> i8
            memref.store %qbits, {q}[%qi] : memref<{len}xi8>
          }}
        }}
        scf.yield
      }}"
    )
}

impl Emitter {
    /// Routed SwiGLU experts with fp8 activations: each token's row is quantized 1 x 128, the
    /// gate/up GEMVs are block-scaled, the SwiGLU output is quantized again for down.
    fn experts_fp8(&mut self, a: &[(String, Shape)], dest: &str, out_shape: &Shape) {
        let (x, idx, w, gate, up, down, gs, us, ds) = (&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8]);
        let inter = gate.1.dims[1].unwrap_or(0);
        let d = gate.1.dims[2].unwrap_or(0);
        let k = idx.1.dims[1].unwrap_or(0);
        let (db, ib) = (d.div_ceil(FP8_BLOCK), inter.div_ceil(FP8_BLOCK));
        let (dec, enc) = (self.decode(), self.encode());
        let ty = |s: &(String, Shape)| memref(&s.1);
        // One block-scaled GEMV row: `len` values in `nblocks` K blocks (SSA constants `bound`, `nb`).
        #[allow(clippy::too_many_arguments)]
        let gemv = |acc: &str,
                    q: &str,
                    sc: &str,
                    (len, bound): (usize, &str),
                    (nblocks, nb): (usize, &str),
                    wt: &(String, Shape),
                    wsc: &(String, Shape),
                    row: &str| {
            format!(
                "%{acc} = scf.for %b = %c0 to {nb} step %c1 iter_args(%a = %zero) -> (f32) {{
              %lo = arith.muli %b, %cblk : index
              %hi0 = arith.addi %lo, %cblk : index
              %hi = arith.minui %hi0, {bound} : index
              %part = scf.for %j = %lo to %hi step %c1 iter_args(%p = %zero) -> (f32) {{
                %qb = memref.load {q}[%j] : memref<{len}xi8>
                %wb = memref.load {wv}[%e, {row}, %j] : {wty}
                %qf = func.call {dec}(%qb) : (i8) -> f32
                %wf = func.call {dec}(%wb) : (i8) -> f32
                %pr = arith.mulf %qf, %wf : f32
                %np = arith.addf %p, %pr : f32
                scf.yield %np : f32
              }}
              %sx = memref.load {sc}[%b] : memref<{nblocks}xf32>
              %rb = arith.divui {row}, %cblk : index
              %sw = memref.load {wsv}[%e, %rb, %b] : {wsty}
              %t1 = arith.mulf %part, %sx : f32
              %t2 = arith.mulf %t1, %sw : f32
              %na = arith.addf %a, %t2 : f32
              scf.yield %na : f32
            }}",
                wv = wt.0,
                wty = ty(wt),
                wsv = wsc.0,
                wsty = ty(wsc)
            )
        };
        let text = format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %cdim = arith.constant {d} : index
      %cinter = arith.constant {inter} : index
      %cdb = arith.constant {db} : index
      %cib = arith.constant {ib} : index
      %ck = arith.constant {k} : index
      %cblk = arith.constant {FP8_BLOCK} : index
      %nt = memref.dim {xv}, %c0 : {xty}
      %row = memref.alloc() : memref<{d}xf32>
      %xq = memref.alloc() : memref<{d}xi8>
      %xs = memref.alloc() : memref<{db}xf32>
      %h = memref.alloc() : memref<{inter}xf32>
      %hq = memref.alloc() : memref<{inter}xi8>
      %hs = memref.alloc() : memref<{ib}xf32>
      scf.for %t = %c0 to %nt step %c1 {{
        scf.for %o = %c0 to %cdim step %c1 {{
          memref.store %zero, {dest}[%t, %o] : {oty}
          %xv = memref.load {xv}[%t, %o] : {xty}
          memref.store %xv, %row[%o] : memref<{d}xf32>
        }}
        {quant_x}
        scf.for %slot = %c0 to %ck step %c1 {{
          %e32 = memref.load {iv}[%t, %slot] : {ity}
          %e = arith.index_cast %e32 : i32 to index
          %wt = memref.load {wv}[%t, %slot] : {wty}
          scf.for %i = %c0 to %cinter step %c1 {{
            {gemv_gate}
            {gemv_up}
            %neg = arith.negf %g : f32
            %ex = math.exp %neg : f32
            %dn = arith.addf %one, %ex : f32
            %sg = arith.divf %g, %dn : f32
            %hv = arith.mulf %sg, %u : f32
            memref.store %hv, %h[%i] : memref<{inter}xf32>
          }}
          {quant_h}
          scf.for %o = %c0 to %cdim step %c1 {{
            {gemv_down}
            %cur = memref.load {dest}[%t, %o] : {oty}
            %wa = arith.mulf %wt, %dd : f32
            %sum = arith.addf %cur, %wa : f32
            memref.store %sum, {dest}[%t, %o] : {oty}
          }}
        }}
      }}
      memref.dealloc %row : memref<{d}xf32>
      memref.dealloc %xq : memref<{d}xi8>
      memref.dealloc %xs : memref<{db}xf32>
      memref.dealloc %h : memref<{inter}xf32>
      memref.dealloc %hq : memref<{inter}xi8>
      memref.dealloc %hs : memref<{ib}xf32>
      scf.yield
    }}",
            xv = x.0,
            xty = ty(x),
            iv = idx.0,
            ity = ty(idx),
            wv = w.0,
            wty = ty(w),
            oty = memref(out_shape),
            quant_x = quant_row("%row", d, "%xq", "%xs", &enc),
            quant_h = quant_row("%h", inter, "%hq", "%hs", &enc),
            gemv_gate = gemv("g", "%xq", "%xs", (d, "%cdim"), (db, "%cdb"), gate, gs, "%i"),
            gemv_up = gemv("u", "%xq", "%xs", (d, "%cdim"), (db, "%cdb"), up, us, "%i"),
            gemv_down = gemv("dd", "%hq", "%hs", (inter, "%cinter"), (ib, "%cib"), down, ds, "%o"),
        );
        self.line(&text);
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
    op.attribute(name).ok()?.to_string().split(':').next()?.trim().parse().ok()
}

/// For a reshape: the input index of every input dim as an affine expression of the output indices
/// `d0..` (row-major, same element count; a dynamic leading dim must stay the leading dim).
fn reshape_exprs(input: &Shape, output: &Shape) -> Option<Vec<String>> {
    let out_rank = output.dims.len();
    let names: Vec<String> = (0..out_rank).map(|i| format!("d{i}")).collect();
    let keep_leading = input.dims.first()?.is_none();
    if keep_leading != output.dims.first()?.is_none() {
        return None;
    }
    let start = usize::from(keep_leading);
    // Linear offset over the output's (static) trailing dims.
    let mut terms = Vec::new();
    let mut stride = 1usize;
    for i in (start..out_rank).rev() {
        terms.push(format!("{} * {stride}", names[i]));
        stride *= output.dims[i]?;
    }
    let linear = if terms.is_empty() { "0".to_string() } else { terms.join(" + ") };
    let mut exprs = Vec::new();
    if keep_leading {
        exprs.push("d0".to_string());
    }
    let mut in_strides = vec![1usize; input.dims.len()];
    for j in (start..input.dims.len()).rev() {
        if j + 1 < input.dims.len() {
            in_strides[j] = in_strides[j + 1] * input.dims[j + 1]?;
        }
    }
    for j in start..input.dims.len() {
        exprs.push(format!("(({linear}) floordiv {}) mod {}", in_strides[j], input.dims[j]?));
    }
    Some(exprs)
}

/// Lowers the kernel function `kernel` to CPU MLIR text: `func.func @<name>` on memrefs.
pub fn lower_kernel(kernel: &OperationRef) -> Result<LoweredKernel, CpuError> {
    let name = kernel.attribute("sym_name").map(|a| a.to_string().trim_matches('"').to_string()).unwrap_or_default();
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
    };
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
        let mut dests = Vec::new();
        for r in 0..o.result_count() {
            let result = o.result(r).map_err(|err| lowering(err.to_string()))?;
            let shape =
                Shape::parse(&result.r#type().to_string()).ok_or_else(|| lowering("result is not a tensor".into()))?;
            let key = result.to_raw().ptr as usize;
            let dest = match output_of.get(&key) {
                Some(out) => out.clone(),
                None => e.alloc(&shape, &args[0]),
            };
            dests.push((key, dest, shape));
        }
        let (key, dest, rshape) = dests[0].clone();
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
            "reshape" => {
                let (src, out) = (&args[0], &rshape);
                let exprs =
                    reshape_exprs(&src.1, out).ok_or_else(|| lowering(format!("reshape {} -> {out}", src.1)))?;
                e.gather_copy(src, &dest, out, &exprs);
            }
            "split" => {
                let axis = int_attr(&o, "axis").ok_or_else(|| lowering("split without axis".into()))? as usize;
                let src = &args[0];
                let mut offset = 0;
                for (_, part_dest, part_shape) in &dests {
                    let exprs: Vec<String> = (0..part_shape.dims.len())
                        .map(|i| if i == axis { format!("d{i} + {offset}") } else { format!("d{i}") })
                        .collect();
                    e.gather_copy(src, part_dest, part_shape, &exprs);
                    offset += part_shape.dims[axis].ok_or_else(|| lowering("split along a dynamic axis".into()))?;
                }
            }
            "concat" => {
                let axis = int_attr(&o, "axis").ok_or_else(|| lowering("concat without axis".into()))? as usize;
                let (lhs, rhs) = (&args[0], &args[1]);
                let rank = rshape.dims.len();
                let split_at = match lhs.1.dims[axis] {
                    Some(n) => {
                        let c = e.fresh();
                        e.line(&format!("{c} = arith.constant {n} : index"));
                        c
                    }
                    None => {
                        let a = e.constant_index(axis);
                        let d = e.fresh();
                        e.line(&format!("{d} = memref.dim {}, {a} : {}", lhs.0, memref(&lhs.1)));
                        d
                    }
                };
                let idx: Vec<String> = (0..rank).map(|i| format!("%i{i}")).collect();
                let index_lines: String =
                    (0..rank).map(|i| format!("      %i{i} = linalg.index {i} : index\n")).collect();
                let mut shifted = idx.clone();
                shifted[axis] = "%shifted".into();
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{}], iterator_types = [{}]}} outs({dest} : {out_ty}) {{\n    ^bb0(%c: f32):\n{index_lines}      %in_lhs = arith.cmpi ult, %i{axis}, {split_at} : index\n      %r = scf.if %in_lhs -> (f32) {{\n        %l = memref.load {}[{}] : {}\n        scf.yield %l : f32\n      }} else {{\n        %shifted = arith.subi %i{axis}, {split_at} : index\n        %v = memref.load {}[{}] : {}\n        scf.yield %v : f32\n      }}\n      linalg.yield %r : f32\n    }}",
                    identity(rank), vec!["\"parallel\""; rank].join(", "),
                    lhs.0, idx.join(", "), memref(&lhs.1), rhs.0, shifted.join(", "), memref(&rhs.1)
                ));
            }
            "cache_write" => {
                let (cache, entries, positions) = (&args[0], &args[1], &args[2]);
                e.line(&format!("memref.copy {}, {dest} : {} to {out_ty}", cache.0, memref(&cache.1)));
                let (c0, c1, c2) = (e.constant_index(0), e.constant_index(1), e.constant_index(2));
                let (b, s, w) = (e.fresh(), e.fresh(), e.fresh());
                e.line(&format!("{b} = memref.dim {dest}, {c0} : {out_ty}"));
                e.line(&format!("{s} = memref.dim {dest}, {c1} : {out_ty}"));
                e.line(&format!("{w} = memref.dim {dest}, {c2} : {out_ty}"));
                // Rows outside the cache are skipped here; the executor rejects them before launch.
                e.line(&format!(
                    "scf.for %b = {c0} to {b} step {c1} {{\n      %p64 = memref.load {}[%b] : {}\n      %p = arith.index_cast %p64 : i64 to index\n      %inside = arith.cmpi ult, %p, {s} : index\n      scf.if %inside {{\n        scf.for %c = {c0} to {w} step {c1} {{\n          %v = memref.load {}[%b, %c] : {}\n          memref.store %v, {dest}[%b, %p, %c] : {out_ty}\n        }}\n      }}\n    }}",
                    positions.0, memref(&positions.1), entries.0, memref(&entries.1)
                ));
            }
            "rope" => {
                let (x, positions) = (&args[0], &args[1]);
                let dim = int_attr(&o, "dim").ok_or_else(|| lowering("rope without dim".into()))? as usize;
                let interleave = o.attribute("interleave").map(|a| a.to_string() == "true").unwrap_or(true);
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
                let rank = rshape.dims.len();
                let last = rank - 1;
                let idx: Vec<String> = (0..rank).map(|i| format!("%i{i}")).collect();
                let index_lines: String =
                    (0..rank).map(|i| format!("      %i{i} = linalg.index {i} : index\n")).collect();
                let mut partner = idx.clone();
                partner[last] = "%partner".into();
                let half = dim / 2;
                let pair = if interleave {
                    format!("      %c2 = arith.constant 2 : index\n      %c1 = arith.constant 1 : index\n      %f = arith.divui %i{last}, %c2 : index\n      %odd = arith.remui %i{last}, %c2 : index\n      %first = arith.cmpi eq, %odd, %zero_i : index\n      %up = arith.addi %i{last}, %c1 : index\n      %down = arith.subi %i{last}, %c1 : index\n      %partner = arith.select %first, %up, %down : index\n")
                } else {
                    format!("      %h = arith.constant {half} : index\n      %first = arith.cmpi ult, %i{last}, %h : index\n      %f = arith.remui %i{last}, %h : index\n      %up = arith.addi %i{last}, %h : index\n      %down = arith.subi %i{last}, %h : index\n      %partner = arith.select %first, %up, %down : index\n")
                };
                e.line(&format!(
                    "linalg.generic {{indexing_maps = [{}, {}], iterator_types = [{}]}} ins({} : {}) outs({dest} : {out_ty}) {{\n    ^bb0(%a: f32, %c: f32):\n{index_lines}      %zero_i = arith.constant 0 : index\n{pair}      %pos64 = memref.load {}[%i0] : {}\n      %pos = arith.sitofp %pos64 : i64 to f32\n      %freq = memref.load {table}[%f] : memref<{half}xf32>\n      %angle = arith.mulf %pos, %freq : f32\n      %cos0 = math.cos %angle : f32\n      %sin0 = math.sin %angle : f32\n      %af = arith.constant {factor} : f32\n      %cos = arith.mulf %cos0, %af : f32\n      %sin = arith.mulf %sin0, %af : f32\n      %b = memref.load {}[{}] : {}\n      %ac = arith.mulf %a, %cos : f32\n      %bs = arith.mulf %b, %sin : f32\n      %minus = arith.subf %ac, %bs : f32\n      %plus = arith.addf %ac, %bs : f32\n      %r = arith.select %first, %minus, %plus : f32\n      linalg.yield %r : f32\n    }}",
                    identity(rank), identity(rank), vec!["\"parallel\""; rank].join(", "), x.0, memref(&x.1),
                    positions.0, memref(&positions.1), x.0, partner.join(", "), memref(&x.1)
                ));
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
                let r = RouteSpec {
                    top_k: int_attr(&o, "top_k").ok_or_else(|| lowering("moe_route without top_k".into()))? as usize,
                    n_group: int_attr(&o, "n_group").ok_or_else(|| lowering("moe_route without n_group".into()))?
                        as usize,
                    topk_group: int_attr(&o, "topk_group")
                        .ok_or_else(|| lowering("moe_route without topk_group".into()))?
                        as usize,
                    norm: o.attribute("norm_topk_prob").map(|a| a.to_string() == "true").unwrap_or(false),
                    factor: o
                        .attribute("routed_scaling_factor")
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                        .split(':')
                        .next()
                        .unwrap_or("1.0")
                        .trim()
                        .to_string(),
                };
                let (idx_dest, idx_shape) = (dests[0].1.clone(), dests[0].2.clone());
                let (w_dest, w_shape) = (dests[1].1.clone(), dests[1].2.clone());
                e.route(&r, &args[0], &args[1], &args[2], (&idx_dest, &idx_shape), (&w_dest, &w_shape));
            }
            "moe_experts" if args.len() == 9 => e.experts_fp8(&args, &dest, &rshape),
            "moe_experts" => e.experts(&args, &dest, &rshape),
            _ => return Err(CpuError::Unsupported(full)),
        }
        for (key, dest, shape) in dests {
            e.values.insert(key, (dest, shape));
        }
        let _ = (key, rshape);
    }
    let mut params: Vec<String> = inputs.iter().enumerate().map(|(i, s)| format!("%in{i}: {}", memref(s))).collect();
    params.extend(outputs.iter().enumerate().map(|(i, s)| format!("%out{i}: {}", memref(s))));
    let deallocs: String = e.allocs.iter().map(|d| format!("    {d}\n")).collect();
    let mut globals: String = e.globals.iter().map(|g| format!("{g}\n")).collect();
    if e.uses_fp8 {
        globals.push_str(&fp8_helpers(&name));
    }
    let text = format!(
        "{globals}func.func @{name}({}) attributes {{llvm.emit_c_interface}} {{\n{}{deallocs}    return\n  }}\n",
        params.join(", "),
        e.body
    );
    let output_rules = kernel_shape_rules(kernel).map_err(lowering)?;
    Ok(LoweredKernel { text, inputs, outputs, output_rules })
}

/// A kernel lowered to CPU MLIR text, with its buffer signature.
#[derive(Debug, Clone)]
pub struct LoweredKernel {
    pub text: String,
    pub inputs: Vec<Shape>,
    pub outputs: Vec<Shape>,
    /// Per output, per dim: how its size follows from the input sizes.
    pub output_rules: Vec<Vec<DimRule>>,
}

/// The pass pipeline from linalg on memrefs to the LLVM dialect.
pub const LOWER_TO_LLVM: &str = "builtin.module(func.func(convert-linalg-to-loops), lower-affine, convert-scf-to-cf, \
    convert-vector-to-llvm, \
    convert-math-to-llvm, expand-strided-metadata, finalize-memref-to-llvm, convert-arith-to-llvm, \
    convert-func-to-llvm, convert-cf-to-llvm, convert-index-to-llvm, convert-ub-to-llvm, reconcile-unrealized-casts)";

/// A host buffer handed to a CPU kernel: element storage plus shape.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    /// e4m3 bits.
    F8(Vec<u8>),
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
            HostData::I32(_) => "i32",
            HostData::F8(_) => "f8E4M3FN",
        }
    }

    fn ptr(&mut self) -> *mut () {
        match &mut self.data {
            HostData::F32(v) => v.as_mut_ptr() as *mut (),
            HostData::Bf16(v) => v.as_mut_ptr() as *mut (),
            HostData::I64(v) => v.as_mut_ptr() as *mut (),
            HostData::I32(v) => v.as_mut_ptr() as *mut (),
            HostData::F8(v) => v.as_mut_ptr() as *mut (),
        }
    }
}

/// A JIT-compiled CPU kernel.
pub struct CpuKernel {
    engine: ExecutionEngine,
    pub name: String,
    pub inputs: Vec<Shape>,
    pub outputs: Vec<Shape>,
    output_rules: Vec<Vec<DimRule>>,
}

impl CpuKernel {
    /// Lowers and JIT-compiles `kernel` (a kernel function of the `fused` stage).
    pub fn compile(context: &Context, kernel: &OperationRef) -> Result<CpuKernel, CpuError> {
        let LoweredKernel { text, inputs, outputs, output_rules } = lower_kernel(kernel)?;
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
        Ok(CpuKernel { engine, name, inputs, outputs, output_rules })
    }

    /// The shapes of the outputs for inputs of `input_shapes` (what [`CpuKernel::run`] requires).
    pub fn output_shapes(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<Vec<usize>>, CpuError> {
        self.output_rules
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
    /// Every output buffer must have exactly the shape the kernel computes from its inputs (ranks,
    /// element types and static dims are checked here; dynamic output dims are not: the kernel
    /// writes as many rows as its inputs imply). Ids and positions must be in range (embedding rows,
    /// cache rows). The entry-level executor derives both from the plan before launching.
    pub unsafe fn run(&self, inputs: &mut [HostBuffer], outputs: &mut [HostBuffer]) -> Result<(), CpuError> {
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
