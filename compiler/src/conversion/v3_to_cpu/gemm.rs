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
