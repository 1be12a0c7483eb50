//! Dense GEMMs as vectorized dot products (`vector.fma`) with scalar tails.

use super::*;

/// `out = f32 lanes of v` for a vector of `element`s.
pub(super) fn widen_vector(element: &str, v: &str, out: &str) -> String {
    if element == "f32" {
        format!("{out} = arith.addf {v}, %zv : vector<{LANES}xf32>")
    } else {
        format!("{out} = arith.extf {v} : vector<{LANES}x{}> to vector<{LANES}xf32>", storage(element))
    }
}

/// Lanes of the vectorized dot products of dense GEMMs.
pub(super) const LANES: usize = 16;

impl Emitter {
    /// y = x @ w^T for x [M, K] f32 and a dense w [N, K] (f32 or bf16): each output a dot product
    /// over K, `LANES` at a time with `vector.fma` (then a scalar tail), reduced once at the end.
    /// Rows go four at a time so each weight vector loaded serves four outputs; leftover rows one
    /// at a time.
    pub(super) fn gemm_vectorized(&mut self, x: &(String, Shape), w: &(String, Shape), dest: &str, out: &Shape) {
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
      %c4 = arith.constant 4 : index
      %rrem = arith.remui %rows, %c4 : index
      %rows4 = arith.subi %rows, %rrem : index
      scf.for %m = %c0 to %rows4 step %c4 {{
        %m1 = arith.addi %m, %c1 : index
        %m2 = arith.addi %m1, %c1 : index
        %m3 = arith.addi %m2, %c1 : index
        scf.for %j = %c0 to %cn step %c1 {{
          %acc:4 = scf.for %i = %c0 to %ckv step %cl iter_args(%a0 = %zv, %a1 = %zv, %a2 = %zv, %a3 = %zv) -> (vector<{LANES}xf32>, vector<{LANES}xf32>, vector<{LANES}xf32>, vector<{LANES}xf32>) {{
            %wv0 = vector.load {wvv}[%j, %i] : {w_ty}, vector<{LANES}x{el}>
            {widen}
            %x0 = vector.load {xv}[%m, %i] : {x_ty}, vector<{LANES}xf32>
            %x1 = vector.load {xv}[%m1, %i] : {x_ty}, vector<{LANES}xf32>
            %x2 = vector.load {xv}[%m2, %i] : {x_ty}, vector<{LANES}xf32>
            %x3 = vector.load {xv}[%m3, %i] : {x_ty}, vector<{LANES}xf32>
            %f0 = vector.fma %x0, %wv, %a0 : vector<{LANES}xf32>
            %f1 = vector.fma %x1, %wv, %a1 : vector<{LANES}xf32>
            %f2 = vector.fma %x2, %wv, %a2 : vector<{LANES}xf32>
            %f3 = vector.fma %x3, %wv, %a3 : vector<{LANES}xf32>
            scf.yield %f0, %f1, %f2, %f3 : vector<{LANES}xf32>, vector<{LANES}xf32>, vector<{LANES}xf32>, vector<{LANES}xf32>
          }}
          %s0 = vector.reduction <add>, %acc#0 : vector<{LANES}xf32> into f32
          %s1 = vector.reduction <add>, %acc#1 : vector<{LANES}xf32> into f32
          %s2 = vector.reduction <add>, %acc#2 : vector<{LANES}xf32> into f32
          %s3 = vector.reduction <add>, %acc#3 : vector<{LANES}xf32> into f32
          %sum:4 = scf.for %i = %ckv to %ck step %c1 iter_args(%t0 = %s0, %t1 = %s1, %t2 = %s2, %t3 = %s3) -> (f32, f32, f32, f32) {{
            %wb = memref.load {wvv}[%j, %i] : {w_ty}
            {widen_scalar}
            %y0 = memref.load {xv}[%m, %i] : {x_ty}
            %y1 = memref.load {xv}[%m1, %i] : {x_ty}
            %y2 = memref.load {xv}[%m2, %i] : {x_ty}
            %y3 = memref.load {xv}[%m3, %i] : {x_ty}
            %p0 = arith.mulf %y0, %wf : f32
            %p1 = arith.mulf %y1, %wf : f32
            %p2 = arith.mulf %y2, %wf : f32
            %p3 = arith.mulf %y3, %wf : f32
            %n0 = arith.addf %t0, %p0 : f32
            %n1 = arith.addf %t1, %p1 : f32
            %n2 = arith.addf %t2, %p2 : f32
            %n3 = arith.addf %t3, %p3 : f32
            scf.yield %n0, %n1, %n2, %n3 : f32, f32, f32, f32
          }}
          memref.store %sum#0, {dest}[%m, %j] : {o_ty}
          memref.store %sum#1, {dest}[%m1, %j] : {o_ty}
          memref.store %sum#2, {dest}[%m2, %j] : {o_ty}
          memref.store %sum#3, {dest}[%m3, %j] : {o_ty}
        }}
      }}
      scf.for %m = %rows4 to %rows step %c1 {{
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
