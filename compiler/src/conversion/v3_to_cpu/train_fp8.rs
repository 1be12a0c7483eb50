//! DeepSeek-V3's FP8 training GEMMs on the CPU (see `fp8_fprop`, `fp8_dgrad` and `fp8_wgrad` of
//! the reference interpreter's kernels): the operands quantized as the recipe says — activations
//! and output gradients in 1x128 tiles along the contraction, the f32 master weight in 128x128
//! blocks (read transposed by Dgrad: the same bits, the block scales transposed), both Wgrad
//! operands in 128x1 tiles over the tokens — into scratch buffers of their decoded e4m3 values, then
//! the block-scaled product: per 128-wide block of the contraction a sequential dot product, times
//! both scales, added to the f32 accumulator. Scalar scf loops in the reference's order (its bits
//! are the target); the transform-dialect fp8 GEMM takes weights quantized ahead of time, these
//! quantize f32 masters at every step.

use super::fp8::FP8_BLOCK;
use super::*;

/// An f32 scratch `[rows, cols]` (SSA sizes) as (name, type), freed with the kernel.
fn scratch(e: &mut Emitter, rows: &str, cols: &str) -> (String, String) {
    let buf = e.fresh();
    let ty = "memref<?x?xf32>".to_string();
    e.line(&format!("{buf} = memref.alloc({rows}, {cols}) : {ty}"));
    e.allocs.push(format!("memref.dealloc {buf} : {ty}"));
    (buf, ty)
}

impl Emitter {
    /// The SSA index of dim `d` of buffer `v`.
    fn dim_of(&mut self, v: &(String, Shape), d: usize) -> String {
        if let Some(n) = v.1.dims[d] {
            return self.constant_index(n);
        }
        let c = self.constant_index(d);
        let s = self.fresh();
        self.line(&format!("{s} = memref.dim {}, {c} : {}", v.0, memref(&v.1)));
        s
    }

    /// `(decode, encode)` helper names (the kernel then carries them).
    fn fp8_codec(&mut self) -> (String, String) {
        let enc = self.encode();
        (format!("@{}_f8_decode", self.prefix), enc)
    }

    /// Rows `0..rows` of the matrix `load(r, c)` (text defining `%ld`) quantized 1 x 128 along its
    /// `cols`: decoded e4m3 values into `q` [rows, cols], scales `max(amax, 1e-4) / 448` into `s`
    /// [rows, ceil(cols / 128)].
    fn quantize_tiles(
        &mut self,
        (rows, cols): (&str, &str),
        load: &dyn Fn(&str, &str) -> String,
        (q, s): (&(String, String), &(String, String)),
    ) {
        let (dec, enc) = self.fp8_codec();
        let p = self.fresh().replace('%', "");
        let text = format!(
            "%{p}_c0 = arith.constant 0 : index
%{p}_c1 = arith.constant 1 : index
%{p}_g = arith.constant {FP8_BLOCK} : index
%{p}_floor = arith.constant 1.0e-04 : f32
%{p}_fmax = arith.constant 448.0 : f32
%{p}_nb = arith.ceildivui {cols}, %{p}_g : index
scf.for %{p}_r = %{p}_c0 to {rows} step %{p}_c1 {{
  scf.for %{p}_b = %{p}_c0 to %{p}_nb step %{p}_c1 {{
    %{p}_lo = arith.muli %{p}_b, %{p}_g : index
    %{p}_hi0 = arith.addi %{p}_lo, %{p}_g : index
    %{p}_hi = arith.minui %{p}_hi0, {cols} : index
    %{p}_amax = scf.for %{p}_i = %{p}_lo to %{p}_hi step %{p}_c1 iter_args(%{p}_a = %zero) -> (f32) {{
{load_a}
      %{p}_av = math.absf %ld : f32
      %{p}_m = arith.maxnumf %{p}_a, %{p}_av : f32
      scf.yield %{p}_m : f32
    }}
    %{p}_am = arith.maxnumf %{p}_amax, %{p}_floor : f32
    %{p}_s = arith.divf %{p}_am, %{p}_fmax : f32
    memref.store %{p}_s, {sb}[%{p}_r, %{p}_b] : {st}
    scf.for %{p}_i = %{p}_lo to %{p}_hi step %{p}_c1 {{
{load_a}
      %{p}_d = arith.divf %ld, %{p}_s : f32
      %{p}_bits = func.call {enc}(%{p}_d) : (f32) -> i8
      %{p}_f = func.call {dec}(%{p}_bits) : (i8) -> f32
      memref.store %{p}_f, {qb}[%{p}_r, %{p}_i] : {qt}
    }}
  }}
}}",
            load_a = indent(&load(&format!("%{p}_r"), &format!("%{p}_i")), 6),
            sb = s.0,
            st = s.1,
            qb = q.0,
            qt = q.1,
        );
        self.line(&format!("scf.execute_region {{\n{}\n      scf.yield\n    }}", indent(&text, 6)));
    }

    /// An f32 master weight `w` [n, k] in 128 x 128 blocks: decoded e4m3 values into `q` [n, k],
    /// block scales `max(amax, 1e-12) / 448` into `s` [ceil(n / 128), ceil(k / 128)].
    fn quantize_blocks(&mut self, w: &(String, Shape), (q, s): (&(String, String), &(String, String))) {
        let (dec, enc) = self.fp8_codec();
        let p = self.fresh().replace('%', "");
        let (n, k) = (w.1.dims[0].unwrap_or(0), w.1.dims[1].unwrap_or(0));
        let (wb, wt) = (&w.0, memref(&w.1));
        let text = format!(
            "%{p}_c0 = arith.constant 0 : index
%{p}_c1 = arith.constant 1 : index
%{p}_n = arith.constant {n} : index
%{p}_k = arith.constant {k} : index
%{p}_g = arith.constant {FP8_BLOCK} : index
%{p}_floor = arith.constant 1.0e-12 : f32
%{p}_fmax = arith.constant 448.0 : f32
linalg.fill ins(%zero : f32) outs({sb} : {st})
scf.for %{p}_r = %{p}_c0 to %{p}_n step %{p}_c1 {{
  %{p}_rb = arith.divui %{p}_r, %{p}_g : index
  scf.for %{p}_i = %{p}_c0 to %{p}_k step %{p}_c1 {{
    %{p}_cb = arith.divui %{p}_i, %{p}_g : index
    %{p}_v = memref.load {wb}[%{p}_r, %{p}_i] : {wt}
    %{p}_av = math.absf %{p}_v : f32
    %{p}_so = memref.load {sb}[%{p}_rb, %{p}_cb] : {st}
    %{p}_sn = arith.maxnumf %{p}_so, %{p}_av : f32
    memref.store %{p}_sn, {sb}[%{p}_rb, %{p}_cb] : {st}
  }}
}}
%{p}_nb = arith.ceildivui %{p}_n, %{p}_g : index
%{p}_kb = arith.ceildivui %{p}_k, %{p}_g : index
scf.for %{p}_a = %{p}_c0 to %{p}_nb step %{p}_c1 {{
  scf.for %{p}_b = %{p}_c0 to %{p}_kb step %{p}_c1 {{
    %{p}_m = memref.load {sb}[%{p}_a, %{p}_b] : {st}
    %{p}_mf = arith.maxnumf %{p}_m, %{p}_floor : f32
    %{p}_s = arith.divf %{p}_mf, %{p}_fmax : f32
    memref.store %{p}_s, {sb}[%{p}_a, %{p}_b] : {st}
  }}
}}
scf.for %{p}_r = %{p}_c0 to %{p}_n step %{p}_c1 {{
  %{p}_rb = arith.divui %{p}_r, %{p}_g : index
  scf.for %{p}_i = %{p}_c0 to %{p}_k step %{p}_c1 {{
    %{p}_cb = arith.divui %{p}_i, %{p}_g : index
    %{p}_v = memref.load {wb}[%{p}_r, %{p}_i] : {wt}
    %{p}_s = memref.load {sb}[%{p}_rb, %{p}_cb] : {st}
    %{p}_d = arith.divf %{p}_v, %{p}_s : f32
    %{p}_bits = func.call {enc}(%{p}_d) : (f32) -> i8
    %{p}_f = func.call {dec}(%{p}_bits) : (i8) -> f32
    memref.store %{p}_f, {qb}[%{p}_r, %{p}_i] : {qt}
  }}
}}",
            sb = s.0,
            st = s.1,
            qb = q.0,
            qt = q.1,
        );
        self.line(&format!("scf.execute_region {{\n{}\n      scf.yield\n    }}", indent(&text, 6)));
    }

    /// `dest[i, j] = sum over 128-blocks b of the contraction (length `len`) of
    /// dot(a[i, b], B[j, b]) * a_s[i, b] * B_s(j, b)`, the dot sequential, the sum from zero:
    /// `b_load(j, c)` and `b_scale(j, b)` are texts defining `%bv` and `%bs`.
    #[allow(clippy::too_many_arguments)]
    fn block_scaled_gemm(
        &mut self,
        (m, n, len): (&str, &str, &str),
        (a, a_s): (&(String, String), &(String, String)),
        b_load: &dyn Fn(&str, &str) -> String,
        b_scale: &dyn Fn(&str, &str) -> String,
        (dest, dest_ty): (&str, &str),
    ) {
        let p = self.fresh().replace('%', "");
        let text = format!(
            "%{p}_c0 = arith.constant 0 : index
%{p}_c1 = arith.constant 1 : index
%{p}_g = arith.constant {FP8_BLOCK} : index
%{p}_nz = arith.constant -0.0 : f32
%{p}_nb = arith.ceildivui {len}, %{p}_g : index
scf.for %{p}_i = %{p}_c0 to {m} step %{p}_c1 {{
  scf.for %{p}_j = %{p}_c0 to {n} step %{p}_c1 {{
    %{p}_acc = scf.for %{p}_b = %{p}_c0 to %{p}_nb step %{p}_c1 iter_args(%{p}_y = %zero) -> (f32) {{
      %{p}_lo = arith.muli %{p}_b, %{p}_g : index
      %{p}_hi0 = arith.addi %{p}_lo, %{p}_g : index
      %{p}_hi = arith.minui %{p}_hi0, {len} : index
      %{p}_dot = scf.for %{p}_c = %{p}_lo to %{p}_hi step %{p}_c1 iter_args(%{p}_s = %{p}_nz) -> (f32) {{
        %{p}_av = memref.load {ab}[%{p}_i, %{p}_c] : {at}
{load_b}
        %{p}_pr = arith.mulf %{p}_av, %bv : f32
        %{p}_s2 = arith.addf %{p}_s, %{p}_pr : f32
        scf.yield %{p}_s2 : f32
      }}
      %{p}_as = memref.load {asb}[%{p}_i, %{p}_b] : {ast}
{scale_b}
      %{p}_t0 = arith.mulf %{p}_dot, %{p}_as : f32
      %{p}_t1 = arith.mulf %{p}_t0, %bs : f32
      %{p}_y2 = arith.addf %{p}_y, %{p}_t1 : f32
      scf.yield %{p}_y2 : f32
    }}
    memref.store %{p}_acc, {dest}[%{p}_i, %{p}_j] : {dest_ty}
  }}
}}",
            ab = a.0,
            at = a.1,
            asb = a_s.0,
            ast = a_s.1,
            load_b = indent(&b_load(&format!("%{p}_j"), &format!("%{p}_c")), 8),
            scale_b = indent(&b_scale(&format!("%{p}_j"), &format!("%{p}_b")), 6),
        );
        self.line(&format!("scf.execute_region {{\n{}\n      scf.yield\n    }}", indent(&text, 6)));
    }

    /// Fprop `y = x W^T` (x [M, K] 1x128, W [N, K] 128x128), Dgrad `dx = dy W` (dy [M, N] 1x128
    /// along N, W's blocks read transposed) or Wgrad `dW = dy^T x` (both 128x1 over the M tokens),
    /// into `dest`.
    pub(super) fn fp8_training_gemm(
        &mut self,
        kind: &str,
        (a, b): (&(String, Shape), &(String, Shape)),
        dest: &str,
        out: &Shape,
    ) -> Result<(), String> {
        if a.1.dims.len() != 2 || b.1.dims.len() != 2 {
            return Err(format!("{kind} of {} and {}", a.1, b.1));
        }
        let dest_ty = memref(out);
        let g = self.constant_index(FP8_BLOCK);
        let blocks = |e: &mut Emitter, n: &str| {
            let s = e.fresh();
            e.line(&format!("{s} = arith.ceildivui {n}, {g} : index"));
            s
        };
        let load = |buf: &(String, Shape), transposed: bool| {
            let (name, ty) = (buf.0.clone(), memref(&buf.1));
            move |r: &str, c: &str| {
                let (i, j) = if transposed { (c, r) } else { (r, c) };
                format!("%ld = memref.load {name}[{i}, {j}] : {ty}")
            }
        };
        match kind {
            "fp8_linear" | "fp8_linear_dgrad" => {
                // a: x [M, K] (Fprop) or dy [M, N] (Dgrad); b: the master W [N, K].
                let (m, ka) = (self.dim_of(a, 0), self.dim_of(a, 1));
                let (wn, wk) = (self.dim_of(b, 0), self.dim_of(b, 1));
                let (aq, a_s) = (scratch(self, &m, &ka), {
                    let nb = blocks(self, &ka);
                    scratch(self, &m, &nb)
                });
                self.quantize_tiles((&m, &ka), &load(a, false), (&aq, &a_s));
                let wq = scratch(self, &wn, &wk);
                let (wnb, wkb) = (blocks(self, &wn), blocks(self, &wk));
                let ws = scratch(self, &wnb, &wkb);
                self.quantize_blocks(b, (&wq, &ws));
                let (wqb, ws_b) = (wq.0.clone(), ws.0.clone());
                if kind == "fp8_linear" {
                    let b_load = |j: &str, c: &str| format!("%bv = memref.load {wqb}[{j}, {c}] : memref<?x?xf32>");
                    let b_scale = |j: &str, kb: &str| {
                        format!(
                            "%jb_{kb_} = arith.divui {j}, {g} : index\n%bs = memref.load {ws_b}[%jb_{kb_}, {kb}] : memref<?x?xf32>",
                            kb_ = kb.replace('%', "")
                        )
                    };
                    self.block_scaled_gemm((&m, &wn, &ka), (&aq, &a_s), &b_load, &b_scale, (dest, &dest_ty));
                } else {
                    // dx [M, K]: the contraction over N, W read as W^T [K, N].
                    let b_load = |j: &str, c: &str| format!("%bv = memref.load {wqb}[{c}, {j}] : memref<?x?xf32>");
                    let b_scale = |j: &str, nb: &str| {
                        format!(
                            "%jb_{nb_} = arith.divui {j}, {g} : index\n%bs = memref.load {ws_b}[{nb}, %jb_{nb_}] : memref<?x?xf32>",
                            nb_ = nb.replace('%', "")
                        )
                    };
                    self.block_scaled_gemm((&m, &wk, &ka), (&aq, &a_s), &b_load, &b_scale, (dest, &dest_ty));
                }
            }
            "fp8_linear_wgrad" => {
                // a: dy [M, N], b: x [M, K] -> dW [N, K]; both transposed and quantized 1x128 over M.
                let (m, n, k) = (self.dim_of(a, 0), self.dim_of(a, 1), self.dim_of(b, 1));
                let mb = blocks(self, &m);
                let (aq, a_s) = (scratch(self, &n, &m), scratch(self, &n, &mb));
                self.quantize_tiles((&n, &m), &load(a, true), (&aq, &a_s));
                let (bq, b_s) = (scratch(self, &k, &m), scratch(self, &k, &mb));
                self.quantize_tiles((&k, &m), &load(b, true), (&bq, &b_s));
                let (bqb, bsb) = (bq.0.clone(), b_s.0.clone());
                let b_load = |j: &str, c: &str| format!("%bv = memref.load {bqb}[{j}, {c}] : memref<?x?xf32>");
                let b_scale = |j: &str, kb: &str| format!("%bs = memref.load {bsb}[{j}, {kb}] : memref<?x?xf32>");
                self.block_scaled_gemm((&n, &k, &m), (&aq, &a_s), &b_load, &b_scale, (dest, &dest_ty));
            }
            other => return Err(format!("{other} is not an fp8 training GEMM")),
        }
        Ok(())
    }
}
