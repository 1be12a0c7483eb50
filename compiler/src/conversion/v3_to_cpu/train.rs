//! The training ops (losses and the vector-Jacobian products autodiff emits, see
//! `models/src/autodiff.rs`) on the CPU.
//!
//! Through the transform dialect: `matmul` (the order-preserving GEMM of [`super::fp8_tiled`]
//! behind [`Emitter::exact_gemm`]: each output a sequential sum in the reference interpreter's
//! order; a transposed operand copied transposed first by a row template), the SwiGLU gradient, the
//! inverse RoPE rotation and the pieces of `concat_grad` / `split_grad` as row templates. In scf
//! loops, each in the reference's order of operations (its bits, not only its values, are the
//! target): the cross-entropy and its gradient (sums in f64, as the reference), the RMSNorm
//! gradient (its weight gradient a sum over rows), the embedding gradient (a scatter-add of rows
//! in token order), the router's and the balance loss's gradients to the router logits, and the
//! naive-form MLA gradient (forward recomputed per head and query; its three large products —
//! the latent's expansion, d latent's and d kv_b's — vectorized across output lanes, each lane
//! the reference's sequential sum). The routed experts are in [`super::train_moe`] and the FP8
//! recipe's GEMMs in [`super::train_fp8`].

use super::mla::Columns;
use super::rows::{subview_type, tensor_type};
use super::*;

/// The gradient of `silu(g) * u` for the output gradient `d` (SSA values of type `ty`, `one` a
/// 1.0 of it): defines `{p}_dg = d * u * s * (1 + g * (1 - s))` with `s = sigmoid(g)` and
/// `{p}_du = d * silu(g)`, in the reference's order of operations. Shared by the row template, the
/// routed experts' vector loops and the fp8 experts' scalar loops.
pub(super) fn swiglu_grad_text(p: &str, (g, u, d): (&str, &str, &str), (one, ty): (&str, &str)) -> String {
    format!(
        "{p}_n = arith.negf {g} : {ty}
{p}_x = math.exp {p}_n : {ty}
{p}_den = arith.addf {one}, {p}_x : {ty}
{p}_s = arith.divf {one}, {p}_den : {ty}
{p}_t0 = arith.mulf {d}, {u} : {ty}
{p}_t1 = arith.mulf {p}_t0, {p}_s : {ty}
{p}_oms = arith.subf {one}, {p}_s : {ty}
{p}_gm = arith.mulf {g}, {p}_oms : {ty}
{p}_f = arith.addf {one}, {p}_gm : {ty}
{p}_dg = arith.mulf {p}_t1, {p}_f : {ty}
{p}_silu = arith.divf {g}, {p}_den : {ty}
{p}_du = arith.mulf {d}, {p}_silu : {ty}"
    )
}

/// A float attribute's value as MLIR text (`1.0e-06 : f32` -> `1.0e-06`).
pub(super) fn float_attr(op: &OperationRef, name: &str) -> Option<String> {
    let text = op.attribute(name).ok()?.to_string();
    Some(text.split(':').next()?.trim().to_string())
}

impl Emitter {
    /// `dest = a' @ b'` (2-D; ' the transposes asked for): operands not in the GEMM's layout
    /// (a' row-major [M, K], b' K-major [K, N]) are first copied transposed.
    pub(super) fn matmul(
        &mut self,
        (a, b): (&(String, Shape), &(String, Shape)),
        (ta, tb): (bool, bool),
        dest: &str,
        out: &Shape,
    ) -> Result<(), String> {
        let n = out.dims[1].ok_or("matmul with a dynamic column count")?;
        let x = if ta { self.transposed(a) } else { a.clone() };
        let w = if tb { self.transposed(b) } else { b.clone() };
        let k = x.1.dims[1];
        let xt = self.tensor_of(&x);
        let wt = self.tensor_of(&w);
        let ks = k.map_or("?".to_string(), |k| k.to_string());
        let (x_tty, w_tty, o_ty) = (tensor_type(&x.1), tensor_type(&w.1), memref(out));
        let k_count = k.map_or("%mm_k".to_string(), |k| k.to_string());
        let text = self.exact_gemm(
            "mm",
            ("%mm_x3", "%mm_rows", k),
            (Columns::Static(n), "f32"),
            &|j, width| super::mla::k_major_tile("mm", (&wt, &w_tty), ("0", &k_count), j, width),
            &|j, width| {
                let ty = format!("memref<?x{width}xf32, strided<[{n}, 1], offset: ?>>");
                (format!("%mmd{width} = memref.subview {dest}[0, {j}] [%mm_rows, {width}] [1, 1] : {o_ty} to {ty}"), ty)
            },
        );
        self.line(&format!(
            "scf.execute_region {{
      %m_c0 = arith.constant 0 : index
      %m_c1 = arith.constant 1 : index
      %m_c16 = arith.constant 16 : index
      %mm_rows = tensor.dim {xt}, %m_c0 : {x_tty}
      %mm_k = tensor.dim {xt}, %m_c1 : {x_tty}
      %mm_x2 = tensor.cast {xt} : {x_tty} to tensor<?x{ks}xf32>
      %mm_x3 = tensor.expand_shape %mm_x2 [[0], [1, 2]] output_shape [%mm_rows, 1, {k_count}] : tensor<?x{ks}xf32> into tensor<?x1x{ks}xf32>
{}
      scf.yield
    }}",
            indent(&text, 6)
        ));
        Ok(())
    }

    /// A new buffer holding the transpose of the 2-D `v` (a row template reading it transposed).
    fn transposed(&mut self, v: &(String, Shape)) -> (String, Shape) {
        let shape = Shape { dims: vec![v.1.dims[1], v.1.dims[0]], element: v.1.element.clone() };
        let mut dyn_sizes = Vec::new();
        for (i, d) in shape.dims.iter().enumerate() {
            if d.is_none() {
                let c = self.constant_index(1 - i);
                let s = self.fresh();
                self.line(&format!("{s} = memref.dim {}, {c} : {}", v.0, memref(&v.1)));
                dyn_sizes.push(s);
            }
        }
        let buf = self.fresh();
        self.line(&format!("{buf} = memref.alloc({}) : {}", dyn_sizes.join(", "), memref(&shape)));
        self.allocs.push(format!("memref.dealloc {buf} : {}", memref(&shape)));
        let ins = [self.indexed_by(v, 2, &[1, 0])];
        let el = storage(&v.1.element).to_string();
        self.row_generic((&buf, &memref(&shape)), &shape, &ins, (&format!("%a: {el}"), "", "%a"));
        (buf, shape)
    }

    /// `(d gate, d up)` of `silu(gate) * up` ([`swiglu_grad_text`]), one row template each.
    pub(super) fn silu_mul_grad(
        &mut self,
        [g, u, dy]: [&(String, Shape); 3],
        [(dg, dg_shape), (du, du_shape)]: [(&str, &Shape); 2],
    ) {
        let body = swiglu_grad_text("%sw", ("%g", "%u", "%d"), ("%one", "f32"));
        let ins = [self.same_index(g), self.same_index(u), self.same_index(dy)];
        self.row_generic((dg, &memref(dg_shape)), dg_shape, &ins, ("%g: f32, %u: f32, %d: f32", &body, "%sw_dg"));
        let ins = [self.same_index(g), self.same_index(u), self.same_index(dy)];
        self.row_generic((du, &memref(du_shape)), du_shape, &ins, ("%g: f32, %u: f32, %d: f32", &body, "%sw_du"));
    }

    /// `(d lhs, d rhs)` of `concat(lhs, rhs)` along `axis`: the two pieces of `dy`, the second
    /// starting where the first ends (sizes as `lhs` and `rhs` have them, at run time).
    pub(super) fn concat_grad(
        &mut self,
        dy: &(String, Shape),
        (axis, operands): (usize, [&(String, Shape); 2]),
        parts: [(&str, &Shape); 2],
    ) {
        let dt = self.tensor_of(dy);
        let mut offset = self.constant_index(0);
        for (k, (dest, shape)) in parts.into_iter().enumerate() {
            let sizes = self.buffer_sizes(&operands[k].0, &operands[k].1);
            let offsets: Vec<String> =
                (0..shape.dims.len()).map(|i| if i == axis { offset.clone() } else { "0".into() }).collect();
            let piece = self.fresh();
            let ty = tensor_type(shape);
            self.line(&format!(
                "{piece} = tensor.extract_slice {dt}[{}] [{}] [{}] : {} to {ty}",
                offsets.join(", "),
                sizes.join(", "),
                vec!["1"; shape.dims.len()].join(", "),
                tensor_type(&dy.1),
            ));
            self.copy_rows((&piece, &ty), (dest, &memref(shape)), shape);
            if k == 0 {
                let next = self.fresh();
                let size = self.dim_of(operands[0], axis);
                self.line(&format!("{next} = arith.addi {offset}, {size} : index"));
                offset = next;
            }
        }
    }

    /// `dest` (the shape of a split's input) := the pieces' gradients at their places along
    /// `axis`, zeros where a piece has none.
    pub(super) fn split_grad(
        &mut self,
        pieces: [Option<&(String, Shape)>; 2],
        (axis, sizes): (usize, [usize; 2]),
        dest: &str,
        out: &Shape,
    ) {
        let rank = out.dims.len();
        let out_ty = memref(out);
        let full = self.buffer_sizes(dest, out);
        let mut start = 0;
        for (piece, size) in pieces.into_iter().zip(sizes) {
            let mut dims = out.dims.clone();
            dims[axis] = Some(size);
            let shape = Shape { dims: dims.clone(), element: out.element.clone() };
            let mut view_sizes = full.clone();
            view_sizes[axis] = size.to_string();
            // SSA offsets: the views' type has a dynamic offset.
            let (zero, at) = (self.constant_index(0), self.constant_index(start));
            let offsets: Vec<String> = (0..rank).map(|i| if i == axis { at.clone() } else { zero.clone() }).collect();
            let (view, view_ty) = (self.fresh(), subview_type(out, &dims));
            self.line(&format!(
                "{view} = memref.subview {dest}[{}] [{}] [{}] : {out_ty} to {view_ty}",
                offsets.join(", "),
                view_sizes.join(", "),
                vec!["1"; rank].join(", ")
            ));
            match piece {
                Some(p) => {
                    let t = self.tensor_of(p);
                    self.copy_rows((&t, &tensor_type(&p.1)), (&view, &view_ty), &shape);
                }
                None => self.row_generic((&view, &view_ty), &shape, &[], ("", "", "%zero")),
            }
            start += size;
        }
    }

    /// The sizes of buffer `buf` of `shape`: static ones as numbers, dynamic ones read.
    fn buffer_sizes(&mut self, buf: &str, shape: &Shape) -> Vec<String> {
        let mut sizes = Vec::new();
        for (i, d) in shape.dims.iter().enumerate() {
            sizes.push(match d {
                Some(n) => n.to_string(),
                None => {
                    let c = self.constant_index(i);
                    let s = self.fresh();
                    self.line(&format!("{s} = memref.dim {buf}, {c} : {}", memref(shape)));
                    s
                }
            });
        }
        sizes
    }

    /// The SSA index of dim `d` of buffer `v` (a constant when static).
    pub(super) fn dim_of(&mut self, v: &(String, Shape), d: usize) -> String {
        if let Some(n) = v.1.dims[d] {
            return self.constant_index(n);
        }
        let c = self.constant_index(d);
        let s = self.fresh();
        self.line(&format!("{s} = memref.dim {}, {c} : {}", v.0, memref(&v.1)));
        s
    }

    /// The weighted mean cross-entropy of `logits` [N, V] against `targets` [N] (`grad` false:
    /// into `dest` [1]) or its gradient `weight * (softmax - onehot) / N` (`grad` true: into
    /// `dest` [N, V]); per row the max in f32, the sum of exponentials, the log-sum-exp and the
    /// probabilities in f64, as the reference computes them.
    pub(super) fn cross_entropy(
        &mut self,
        (logits, targets): (&(String, Shape), &(String, Shape)),
        weight: &str,
        grad: bool,
        dest: &str,
        out: &Shape,
    ) {
        let (l, l_ty) = (&logits.0, memref(&logits.1));
        let (t, t_ty, t_el) = (&targets.0, memref(&targets.1), &targets.1.element);
        let o_ty = memref(out);
        let row_stats = format!(
            "%ce_max = scf.for %ce_j = %ce_c0 to %ce_v step %ce_c1 iter_args(%ce_m = %ce_ninf) -> (f32) {{
  %ce_x = memref.load {l}[%ce_r, %ce_j] : {l_ty}
  %ce_m2 = arith.maxnumf %ce_m, %ce_x : f32
  scf.yield %ce_m2 : f32
}}
%ce_maxd = arith.extf %ce_max : f32 to f64
%ce_sum = scf.for %ce_j = %ce_c0 to %ce_v step %ce_c1 iter_args(%ce_s = %ce_zd) -> (f64) {{
  %ce_x = memref.load {l}[%ce_r, %ce_j] : {l_ty}
  %ce_xd = arith.extf %ce_x : f32 to f64
  %ce_d = arith.subf %ce_xd, %ce_maxd : f64
  %ce_e = math.exp %ce_d : f64
  %ce_s2 = arith.addf %ce_s, %ce_e : f64
  scf.yield %ce_s2 : f64
}}
%ce_t64 = memref.load {t}[%ce_r] : {t_ty}
%ce_t = arith.index_cast %ce_t64 : {t_el} to index"
        );
        let per_row = if grad {
            format!(
                "scf.for %ce_r = %ce_c0 to %ce_n step %ce_c1 {{
{}
  scf.for %ce_j = %ce_c0 to %ce_v step %ce_c1 {{
    %ce_x = memref.load {l}[%ce_r, %ce_j] : {l_ty}
    %ce_xd = arith.extf %ce_x : f32 to f64
    %ce_d = arith.subf %ce_xd, %ce_maxd : f64
    %ce_e = math.exp %ce_d : f64
    %ce_p = arith.divf %ce_e, %ce_sum : f64
    %ce_hit = arith.cmpi eq, %ce_j, %ce_t : index
    %ce_oh = arith.select %ce_hit, %ce_od, %ce_zd : f64
    %ce_g = arith.subf %ce_p, %ce_oh : f64
    %ce_gn = arith.divf %ce_g, %ce_nd : f64
    %ce_g32 = arith.truncf %ce_gn : f64 to f32
    %ce_w = arith.mulf %ce_weight, %ce_g32 : f32
    memref.store %ce_w, {dest}[%ce_r, %ce_j] : {o_ty}
  }}
}}",
                indent(&row_stats, 2)
            )
        } else {
            format!(
                "%ce_total = scf.for %ce_r = %ce_c0 to %ce_n step %ce_c1 iter_args(%ce_acc = %ce_zd) -> (f64) {{
{}
  %ce_lg = math.log %ce_sum : f64
  %ce_lse = arith.addf %ce_maxd, %ce_lg : f64
  %ce_xt = memref.load {l}[%ce_r, %ce_t] : {l_ty}
  %ce_xtd = arith.extf %ce_xt : f32 to f64
  %ce_li = arith.subf %ce_lse, %ce_xtd : f64
  %ce_acc2 = arith.addf %ce_acc, %ce_li : f64
  scf.yield %ce_acc2 : f64
}}
%ce_mean = arith.divf %ce_total, %ce_nd : f64
%ce_m32 = arith.truncf %ce_mean : f64 to f32
%ce_loss = arith.mulf %ce_weight, %ce_m32 : f32
memref.store %ce_loss, {dest}[%ce_c0] : {o_ty}",
                indent(&row_stats, 2)
            )
        };
        self.line(&format!(
            "scf.execute_region {{
      %ce_c0 = arith.constant 0 : index
      %ce_c1 = arith.constant 1 : index
      %ce_zd = arith.constant 0.0 : f64
      %ce_od = arith.constant 1.0 : f64
      %ce_ninf = arith.constant 0xFF800000 : f32
      %ce_weight = arith.constant {weight} : f32
      %ce_n = memref.dim {l}, %ce_c0 : {l_ty}
      %ce_v = memref.dim {l}, %ce_c1 : {l_ty}
      %ce_n64 = arith.index_cast %ce_n : index to i64
      %ce_nd = arith.sitofp %ce_n64 : i64 to f64
{}
      scf.yield
    }}",
            indent(&per_row, 6)
        ));
    }

    /// `dest` [vocab, D] := zeros, then each row of `dy` added to its id's row, in token order
    /// (ids outside the table are skipped; the executor rejects them before launch).
    pub(super) fn embed_grad(&mut self, ids: &(String, Shape), dy: &(String, Shape), dest: &str, out: &Shape) {
        let (i_ty, i_el, d_ty, o_ty) = (memref(&ids.1), &ids.1.element, memref(&dy.1), memref(out));
        self.line(&format!("linalg.fill ins(%zero : f32) outs({dest} : {o_ty})"));
        self.line(&format!(
            "scf.execute_region {{
      %eg_c0 = arith.constant 0 : index
      %eg_c1 = arith.constant 1 : index
      %eg_n = memref.dim {dy}, %eg_c0 : {d_ty}
      %eg_d = memref.dim {dy}, %eg_c1 : {d_ty}
      %eg_vocab = memref.dim {dest}, %eg_c0 : {o_ty}
      scf.for %eg_r = %eg_c0 to %eg_n step %eg_c1 {{
        %eg_id64 = memref.load {ids}[%eg_r] : {i_ty}
        %eg_id = arith.index_cast %eg_id64 : {i_el} to index
        %eg_in = arith.cmpi ult, %eg_id, %eg_vocab : index
        scf.if %eg_in {{
          scf.for %eg_j = %eg_c0 to %eg_d step %eg_c1 {{
            %eg_t = memref.load {dest}[%eg_id, %eg_j] : {o_ty}
            %eg_g = memref.load {dy}[%eg_r, %eg_j] : {d_ty}
            %eg_s = arith.addf %eg_t, %eg_g : f32
            memref.store %eg_s, {dest}[%eg_id, %eg_j] : {o_ty}
          }}
        }}
      }}
      scf.yield
    }}",
            ids = ids.0,
            dy = dy.0,
        ));
    }

    /// `(dx, dw)` of RMSNorm over rows of x [N, D] (see `rms_norm_grad` of the reference): with
    /// `r = 1 / sqrt(mean(x^2) + eps)`, `dw = sum_rows dy * x * r` (rows in order) and
    /// `dx = r * dy * w - x * r^3 / D * sum(dy * w * x)`.
    pub(super) fn rms_norm_grad(
        &mut self,
        [x, w, dy]: [&(String, Shape); 3],
        eps: &str,
        [(dx, dx_shape), (dw, dw_shape)]: [(&str, &Shape); 2],
    ) {
        let (x_ty, w_ty, g_ty, dx_ty, dw_ty) =
            (memref(&x.1), memref(&w.1), memref(&dy.1), memref(dx_shape), memref(dw_shape));
        let d = x.1.dims[1].map_or("0".to_string(), |d| d.to_string());
        let load_w = load_f32(&w.1.element, "%rg_wv", "%rg_w");
        self.line(&format!("linalg.fill ins(%zero : f32) outs({dw} : {dw_ty})"));
        self.line(&format!(
            "scf.execute_region {{
      %rg_c0 = arith.constant 0 : index
      %rg_c1 = arith.constant 1 : index
      %rg_nz = arith.constant -0.0 : f32
      %rg_eps = arith.constant {eps} : f32
      %rg_width = arith.constant {d}.0 : f32
      %rg_n = memref.dim {x}, %rg_c0 : {x_ty}
      %rg_d = memref.dim {x}, %rg_c1 : {x_ty}
      scf.for %rg_r = %rg_c0 to %rg_n step %rg_c1 {{
        %rg_ss = scf.for %rg_i = %rg_c0 to %rg_d step %rg_c1 iter_args(%rg_a = %rg_nz) -> (f32) {{
          %rg_x = memref.load {x}[%rg_r, %rg_i] : {x_ty}
          %rg_sq = arith.mulf %rg_x, %rg_x : f32
          %rg_a2 = arith.addf %rg_a, %rg_sq : f32
          scf.yield %rg_a2 : f32
        }}
        %rg_mean = arith.divf %rg_ss, %rg_width : f32
        %rg_me = arith.addf %rg_mean, %rg_eps : f32
        %rg_root = math.sqrt %rg_me : f32
        %rg_inv = arith.divf %one, %rg_root : f32
        %rg_dot = scf.for %rg_i = %rg_c0 to %rg_d step %rg_c1 iter_args(%rg_a = %rg_nz) -> (f32) {{
          %rg_x = memref.load {x}[%rg_r, %rg_i] : {x_ty}
          %rg_g = memref.load {dy}[%rg_r, %rg_i] : {g_ty}
          %rg_wv = memref.load {w}[%rg_i] : {w_ty}
          {load_w}
          %rg_gw = arith.mulf %rg_g, %rg_w : f32
          %rg_p = arith.mulf %rg_gw, %rg_x : f32
          %rg_a2 = arith.addf %rg_a, %rg_p : f32
          scf.yield %rg_a2 : f32
        }}
        scf.for %rg_i = %rg_c0 to %rg_d step %rg_c1 {{
          %rg_x = memref.load {x}[%rg_r, %rg_i] : {x_ty}
          %rg_g = memref.load {dy}[%rg_r, %rg_i] : {g_ty}
          %rg_wv = memref.load {w}[%rg_i] : {w_ty}
          {load_w}
          %rg_gx = arith.mulf %rg_g, %rg_x : f32
          %rg_gxr = arith.mulf %rg_gx, %rg_inv : f32
          %rg_dw0 = memref.load {dw}[%rg_i] : {dw_ty}
          %rg_dw1 = arith.addf %rg_dw0, %rg_gxr : f32
          memref.store %rg_dw1, {dw}[%rg_i] : {dw_ty}
          %rg_rg = arith.mulf %rg_inv, %rg_g : f32
          %rg_a = arith.mulf %rg_rg, %rg_w : f32
          %rg_x1 = arith.mulf %rg_x, %rg_inv : f32
          %rg_x2 = arith.mulf %rg_x1, %rg_inv : f32
          %rg_x3 = arith.mulf %rg_x2, %rg_inv : f32
          %rg_x4 = arith.divf %rg_x3, %rg_width : f32
          %rg_b = arith.mulf %rg_x4, %rg_dot : f32
          %rg_dx = arith.subf %rg_a, %rg_b : f32
          memref.store %rg_dx, {dx}[%rg_r, %rg_i] : {dx_ty}
        }}
      }}
      scf.yield
    }}",
            x = x.0,
            w = w.0,
            dy = dy.0,
        ));
    }

    /// The naive-form MLA gradient over one sequence (see `mla_grad` of the reference): keys and
    /// values `latent . kv_b^T` recomputed into a scratch, then per head and query the causal
    /// scores, softmax and their gradient, accumulated into d q_nope, d q_pe, the keys' and values'
    /// gradient (a scratch) and the rotary half of d latent; finally that scratch times `kv_b`
    /// into d latent's first `kv` columns and, transposed, times the latent into d kv_b.
    pub(super) fn attention_grad(
        &mut self,
        spec: &AttentionSpec,
        [qn, qp, lat, kvb, dout]: [&(String, Shape); 5],
        dests: [(&str, &Shape); 4],
    ) {
        let AttentionSpec { h, dn, dr, dv, kv, ref scale, .. } = *spec;
        let (per, hp) = (dn + dv, h * (dn + dv));
        let [(dqn, dqn_s), (dqp, dqp_s), (dlat, dlat_s), (dkvb, dkvb_s)] = dests;
        for (d, s) in dests {
            self.line(&format!("linalg.fill ins(%zero : f32) outs({d} : {})", memref(s)));
        }
        let (qn_ty, qp_ty, lat_ty, kvb_ty, g_ty) =
            (memref(&qn.1), memref(&qp.1), memref(&lat.1), memref(&kvb.1), memref(&dout.1));
        let (dqn_ty, dqp_ty, dlat_ty, dkvb_ty) = (memref(dqn_s), memref(dqp_s), memref(dlat_s), memref(dkvb_s));
        let (qn, qp, lat, kvb, g) = (&qn.0, &qp.0, &lat.0, &kvb.0, &dout.0);
        let x_ty = format!("memref<?x{hp}xf32>");
        // A sequential dot product `name` of `n` terms `a(i) * b(i)` (loads text per index `i`).
        let dot = |name: &str, n: &str, a: &str, b: &str| {
            format!(
                "%{name} = scf.for %{name}_i = %ag_c0 to {n} step %ag_c1 iter_args(%{name}_a = %ag_nz) -> (f32) {{
  {}
  {}
  %{name}_p = arith.mulf %{name}_x, %{name}_y : f32
  %{name}_s = arith.addf %{name}_a, %{name}_p : f32
  scf.yield %{name}_s : f32
}}",
                a.replace("$i", &format!("%{name}_i")).replace("$v", &format!("%{name}_x")),
                b.replace("$i", &format!("%{name}_i")).replace("$v", &format!("%{name}_y")),
            )
        };
        let add_into = |name: &str, buf: &str, ty: &str, idx: &str, v: &str| {
            format!(
                "%{name}_o = memref.load {buf}[{idx}] : {ty}\n%{name}_n = arith.addf %{name}_o, {v} : f32\nmemref.store %{name}_n, {buf}[{idx}] : {ty}"
            )
        };
        let s_nope = dot(
            "ag_sn",
            "%ag_dnn",
            &format!("$v = memref.load {qn}[%ag_i, %ag_h, $i] : {qn_ty}"),
            &format!("%ag_sn_c = arith.addi %ag_hb, $i : index\n  $v = memref.load %ag_kvx[%ag_j, %ag_sn_c] : {x_ty}"),
        );
        let s_rope = dot(
            "ag_sr",
            "%ag_drn",
            &format!("$v = memref.load {qp}[%ag_i, %ag_h, $i] : {qp_ty}"),
            &format!("%ag_sr_c = arith.addi %ag_kvn, $i : index\n  $v = memref.load {lat}[%ag_j, %ag_sr_c] : {lat_ty}"),
        );
        let d_p = dot(
            "ag_dv",
            "%ag_dvn",
            &format!("$v = memref.load {g}[%ag_i, %ag_h, $i] : {g_ty}"),
            &format!("%ag_dv_c = arith.addi %ag_hv, $i : index\n  $v = memref.load %ag_kvx[%ag_j, %ag_dv_c] : {x_ty}"),
        );
        let mean = dot(
            "ag_mn",
            "%ag_nk",
            "$v = memref.load %ag_p[$i] : memref<?xf32>",
            "$v = memref.load %ag_dp[$i] : memref<?xf32>",
        );
        let update_nope = [
            "%ag_un_c = arith.addi %ag_hb, %ag_d : index".to_string(),
            format!("%ag_un_k = memref.load %ag_kvx[%ag_j, %ag_un_c] : {x_ty}"),
            format!("%ag_un_q = memref.load {qn}[%ag_i, %ag_h, %ag_d] : {qn_ty}"),
            "%ag_un_a = arith.mulf %ag_ds, %ag_un_k : f32".into(),
            add_into("ag_un1", dqn, &dqn_ty, "%ag_i, %ag_h, %ag_d", "%ag_un_a"),
            "%ag_un_b = arith.mulf %ag_ds, %ag_un_q : f32".into(),
            add_into("ag_un2", "%ag_dkx", &x_ty, "%ag_j, %ag_un_c", "%ag_un_b"),
        ]
        .join("\n");
        let update_rope = [
            "%ag_ur_c = arith.addi %ag_kvn, %ag_r : index".to_string(),
            format!("%ag_ur_k = memref.load {lat}[%ag_j, %ag_ur_c] : {lat_ty}"),
            format!("%ag_ur_q = memref.load {qp}[%ag_i, %ag_h, %ag_r] : {qp_ty}"),
            "%ag_ur_a = arith.mulf %ag_ds, %ag_ur_k : f32".into(),
            add_into("ag_ur1", dqp, &dqp_ty, "%ag_i, %ag_h, %ag_r", "%ag_ur_a"),
            "%ag_ur_b = arith.mulf %ag_ds, %ag_ur_q : f32".into(),
            add_into("ag_ur2", dlat, &dlat_ty, "%ag_j, %ag_ur_c", "%ag_ur_b"),
        ]
        .join("\n");
        let update_v = [
            "%ag_uv_c = arith.addi %ag_hv, %ag_e : index".to_string(),
            format!("%ag_uv_g = memref.load {g}[%ag_i, %ag_h, %ag_e] : {g_ty}"),
            "%ag_uv_a = arith.mulf %ag_pj, %ag_uv_g : f32".into(),
            add_into("ag_uv1", "%ag_dkx", &x_ty, "%ag_j, %ag_uv_c", "%ag_uv_a"),
        ]
        .join("\n");
        let text = format!(
            "%ag_c0 = arith.constant 0 : index
%ag_c1 = arith.constant 1 : index
%ag_nz = arith.constant -0.0 : f32
%ag_ninf = arith.constant 0xFF800000 : f32
%ag_scale = arith.constant {scale} : f32
%ag_kvn = arith.constant {kv} : index
%ag_hpn = arith.constant {hp} : index
%ag_per = arith.constant {per} : index
%ag_dnn = arith.constant {dn} : index
%ag_drn = arith.constant {dr} : index
%ag_dvn = arith.constant {dv} : index
%ag_hn = arith.constant {h} : index
%ag_T = memref.dim {qn}, %ag_c0 : {qn_ty}
%ag_S = memref.dim {lat}, %ag_c0 : {lat_ty}
%ag_off = arith.subi %ag_S, %ag_T : index
%ag_kvx = memref.alloc(%ag_S) : {x_ty}
%ag_dkx = memref.alloc(%ag_S) : {x_ty}
%ag_p = memref.alloc(%ag_S) : memref<?xf32>
%ag_dp = memref.alloc(%ag_S) : memref<?xf32>
linalg.fill ins(%zero : f32) outs(%ag_dkx : {x_ty})
%ag_kbT = memref.alloc() : memref<{kv}x{hp}xf32>
scf.for %ag_col = %ag_c0 to %ag_hpn step %ag_c1 {{
  scf.for %ag_k = %ag_c0 to %ag_kvn step %ag_c1 {{
    %ag_tv = memref.load {kvb}[%ag_col, %ag_k] : {kvb_ty}
    memref.store %ag_tv, %ag_kbT[%ag_k, %ag_col] : memref<{kv}x{hp}xf32>
  }}
}}
%ag_Lh = arith.constant {lh} : index
%ag_Lk = arith.constant {lk} : index
%ag_zh = arith.constant dense<-0.0> : vector<{lh}xf32>
%ag_zk = arith.constant dense<-0.0> : vector<{lk}xf32>
scf.for %ag_j = %ag_c0 to %ag_S step %ag_c1 {{
  scf.for %ag_cb = %ag_c0 to %ag_hpn step %ag_Lh {{
    %ag_kx = scf.for %ag_k = %ag_c0 to %ag_kvn step %ag_c1 iter_args(%ag_a = %ag_zh) -> (vector<{lh}xf32>) {{
      %ag_ls = memref.load {lat}[%ag_j, %ag_k] : {lat_ty}
      %ag_lb = vector.broadcast %ag_ls : f32 to vector<{lh}xf32>
      %ag_w = vector.load %ag_kbT[%ag_k, %ag_cb] : memref<{kv}x{hp}xf32>, vector<{lh}xf32>
      %ag_pr = arith.mulf %ag_lb, %ag_w : vector<{lh}xf32>
      %ag_a2 = arith.addf %ag_a, %ag_pr : vector<{lh}xf32>
      scf.yield %ag_a2 : vector<{lh}xf32>
    }}
    vector.store %ag_kx, %ag_kvx[%ag_j, %ag_cb] : {x_ty}, vector<{lh}xf32>
  }}
}}
memref.dealloc %ag_kbT : memref<{kv}x{hp}xf32>
scf.for %ag_h = %ag_c0 to %ag_hn step %ag_c1 {{
  %ag_hb = arith.muli %ag_h, %ag_per : index
  %ag_hv = arith.addi %ag_hb, %ag_dnn : index
  scf.for %ag_i = %ag_c0 to %ag_T step %ag_c1 {{
    %ag_last = arith.addi %ag_off, %ag_i : index
    %ag_nk = arith.addi %ag_last, %ag_c1 : index
    scf.for %ag_j = %ag_c0 to %ag_nk step %ag_c1 {{
{s_nope}
{s_rope}
      %ag_sum = arith.addf %ag_sn, %ag_sr : f32
      %ag_sc = arith.mulf %ag_sum, %ag_scale : f32
      memref.store %ag_sc, %ag_p[%ag_j] : memref<?xf32>
    }}
    %ag_max = scf.for %ag_j = %ag_c0 to %ag_nk step %ag_c1 iter_args(%ag_m = %ag_ninf) -> (f32) {{
      %ag_v = memref.load %ag_p[%ag_j] : memref<?xf32>
      %ag_m2 = arith.maxnumf %ag_m, %ag_v : f32
      scf.yield %ag_m2 : f32
    }}
    %ag_den = scf.for %ag_j = %ag_c0 to %ag_nk step %ag_c1 iter_args(%ag_a = %zero) -> (f32) {{
      %ag_v = memref.load %ag_p[%ag_j] : memref<?xf32>
      %ag_d0 = arith.subf %ag_v, %ag_max : f32
      %ag_e = math.exp %ag_d0 : f32
      memref.store %ag_e, %ag_p[%ag_j] : memref<?xf32>
      %ag_a2 = arith.addf %ag_a, %ag_e : f32
      scf.yield %ag_a2 : f32
    }}
    scf.for %ag_j = %ag_c0 to %ag_nk step %ag_c1 {{
      %ag_v = memref.load %ag_p[%ag_j] : memref<?xf32>
      %ag_q = arith.divf %ag_v, %ag_den : f32
      memref.store %ag_q, %ag_p[%ag_j] : memref<?xf32>
{d_p}
      memref.store %ag_dv, %ag_dp[%ag_j] : memref<?xf32>
    }}
{mean}
    scf.for %ag_j = %ag_c0 to %ag_nk step %ag_c1 {{
      %ag_pj = memref.load %ag_p[%ag_j] : memref<?xf32>
      %ag_dpj = memref.load %ag_dp[%ag_j] : memref<?xf32>
      %ag_dm = arith.subf %ag_dpj, %ag_mn : f32
      %ag_pd = arith.mulf %ag_pj, %ag_dm : f32
      %ag_ds = arith.mulf %ag_pd, %ag_scale : f32
      scf.for %ag_d = %ag_c0 to %ag_dnn step %ag_c1 {{
{update_nope}
      }}
      scf.for %ag_r = %ag_c0 to %ag_drn step %ag_c1 {{
{update_rope}
      }}
      scf.for %ag_e = %ag_c0 to %ag_dvn step %ag_c1 {{
{update_v}
      }}
    }}
  }}
}}
scf.for %ag_j = %ag_c0 to %ag_S step %ag_c1 {{
  scf.for %ag_kb = %ag_c0 to %ag_kvn step %ag_Lk {{
    %ag_dc = scf.for %ag_q = %ag_c0 to %ag_hpn step %ag_c1 iter_args(%ag_a = %ag_zk) -> (vector<{lk}xf32>) {{
      %ag_ds0 = memref.load %ag_dkx[%ag_j, %ag_q] : {x_ty}
      %ag_db = vector.broadcast %ag_ds0 : f32 to vector<{lk}xf32>
      %ag_w = vector.load {kvb}[%ag_q, %ag_kb] : {kvb_ty}, vector<{lk}xf32>
      %ag_pr = arith.mulf %ag_db, %ag_w : vector<{lk}xf32>
      %ag_a2 = arith.addf %ag_a, %ag_pr : vector<{lk}xf32>
      scf.yield %ag_a2 : vector<{lk}xf32>
    }}
    %ag_lo = vector.load {dlat}[%ag_j, %ag_kb] : {dlat_ty}, vector<{lk}xf32>
    %ag_ln = arith.addf %ag_lo, %ag_dc : vector<{lk}xf32>
    vector.store %ag_ln, {dlat}[%ag_j, %ag_kb] : {dlat_ty}, vector<{lk}xf32>
  }}
}}
scf.for %ag_row = %ag_c0 to %ag_hpn step %ag_c1 {{
  scf.for %ag_kb = %ag_c0 to %ag_kvn step %ag_Lk {{
    %ag_dw = scf.for %ag_j = %ag_c0 to %ag_S step %ag_c1 iter_args(%ag_a = %ag_zk) -> (vector<{lk}xf32>) {{
      %ag_ds0 = memref.load %ag_dkx[%ag_j, %ag_row] : {x_ty}
      %ag_db = vector.broadcast %ag_ds0 : f32 to vector<{lk}xf32>
      %ag_l = vector.load {lat}[%ag_j, %ag_kb] : {lat_ty}, vector<{lk}xf32>
      %ag_pr = arith.mulf %ag_db, %ag_l : vector<{lk}xf32>
      %ag_a2 = arith.addf %ag_a, %ag_pr : vector<{lk}xf32>
      scf.yield %ag_a2 : vector<{lk}xf32>
    }}
    vector.store %ag_dw, {dkvb}[%ag_row, %ag_kb] : {dkvb_ty}, vector<{lk}xf32>
  }}
}}
memref.dealloc %ag_kvx : {x_ty}
memref.dealloc %ag_dkx : {x_ty}
memref.dealloc %ag_p : memref<?xf32>
memref.dealloc %ag_dp : memref<?xf32>
scf.yield",
            s_nope = indent(&s_nope, 6),
            s_rope = indent(&s_rope, 6),
            d_p = indent(&d_p, 6),
            mean = indent(&mean, 4),
            update_nope = indent(&update_nope, 8),
            update_rope = indent(&update_rope, 8),
            update_v = indent(&update_v, 8),
            lh = super::rows::lanes(Some(hp)),
            lk = super::rows::lanes(Some(kv)),
        );
        self.line(&format!("scf.execute_region {{\n{}\n    }}", indent(&text, 6)));
    }

    /// The routing's gradient to its logits, per row as the reference's `route_grad`: sigmoid
    /// scores, the selected ones' gradient through their normalization (when normalized) and the
    /// routed scaling factor, then through the sigmoid into the selected logits.
    ///
    /// `softmax` (DeepSeek-V2): each row's softmax, `ds_k = factor dw_k` and
    /// `dl_j = s_j (ds_j - sum_k ds_k s_{i_k})`, in the reference's order.
    pub(super) fn route_logits_grad(
        &mut self,
        [logits, idx, dw]: [&(String, Shape); 3],
        (norm, factor, softmax): (bool, &str, bool),
        dest: &str,
        out: &Shape,
    ) {
        let (l_ty, i_ty, w_ty, o_ty) = (memref(&logits.1), memref(&idx.1), memref(&dw.1), memref(out));
        let (l, idx, dw) = (&logits.0, &idx.0, &dw.0);
        if softmax {
            let exp_sum = super::moe::softmax_exp_sum(
                "rl_",
                ("%rl_c0", "%rl_c1", "%rl_E"),
                &|j| format!("%rl_v = memref.load {l}[%rl_t, {j}] : {l_ty}"),
                &|x, j| format!("memref.store {x}, %rl_s[{j}] : memref<?xf32>"),
            );
            let text = format!(
                "%rl_c0 = arith.constant 0 : index
%rl_c1 = arith.constant 1 : index
%rl_f = arith.constant {factor} : f32
%rl_T = memref.dim {l}, %rl_c0 : {l_ty}
%rl_E = memref.dim {l}, %rl_c1 : {l_ty}
%rl_K = memref.dim {idx}, %rl_c1 : {i_ty}
%rl_s = memref.alloc(%rl_E) : memref<?xf32>
scf.for %rl_t = %rl_c0 to %rl_T step %rl_c1 {{
{exp_sum}
  scf.for %rl_j = %rl_c0 to %rl_E step %rl_c1 {{
    %rl_x = memref.load %rl_s[%rl_j] : memref<?xf32>
    %rl_q = arith.divf %rl_x, %rl_sum : f32
    memref.store %rl_q, %rl_s[%rl_j] : memref<?xf32>
  }}
  %rl_cross = scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 iter_args(%rl_a = %zero) -> (f32) {{
    %rl_e32 = memref.load {idx}[%rl_t, %rl_k] : {i_ty}
    %rl_e = arith.index_cast %rl_e32 : i32 to index
    %rl_gv = memref.load {dw}[%rl_t, %rl_k] : {w_ty}
    %rl_ds = arith.mulf %rl_f, %rl_gv : f32
    %rl_sv = memref.load %rl_s[%rl_e] : memref<?xf32>
    %rl_p = arith.mulf %rl_ds, %rl_sv : f32
    %rl_a2 = arith.addf %rl_a, %rl_p : f32
    scf.yield %rl_a2 : f32
  }}
  scf.for %rl_j = %rl_c0 to %rl_E step %rl_c1 {{
    %rl_sv = memref.load %rl_s[%rl_j] : memref<?xf32>
    %rl_ns = arith.negf %rl_sv : f32
    %rl_v = arith.mulf %rl_ns, %rl_cross : f32
    memref.store %rl_v, {dest}[%rl_t, %rl_j] : {o_ty}
  }}
  scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 {{
    %rl_e32 = memref.load {idx}[%rl_t, %rl_k] : {i_ty}
    %rl_e = arith.index_cast %rl_e32 : i32 to index
    %rl_gv = memref.load {dw}[%rl_t, %rl_k] : {w_ty}
    %rl_ds = arith.mulf %rl_f, %rl_gv : f32
    %rl_sv = memref.load %rl_s[%rl_e] : memref<?xf32>
    %rl_p = arith.mulf %rl_sv, %rl_ds : f32
    %rl_old = memref.load {dest}[%rl_t, %rl_e] : {o_ty}
    %rl_new = arith.addf %rl_old, %rl_p : f32
    memref.store %rl_new, {dest}[%rl_t, %rl_e] : {o_ty}
  }}
}}
memref.dealloc %rl_s : memref<?xf32>
scf.yield"
            );
            self.line(&format!("scf.execute_region {{\n{}\n    }}", indent(&text, 6)));
            return;
        }
        let ds = if norm {
            format!(
                "%rl_ss = scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 iter_args(%rl_a = %rl_nz) -> (f32) {{
  %rl_sv = memref.load %rl_sel[%rl_k] : memref<?xf32>
  %rl_a2 = arith.addf %rl_a, %rl_sv : f32
  scf.yield %rl_a2 : f32
}}
%rl_tiny = arith.constant 1.0e-20 : f32
%rl_sum = arith.addf %rl_ss, %rl_tiny : f32
%rl_cross = scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 iter_args(%rl_a = %rl_nz) -> (f32) {{
  %rl_gv = memref.load {dw}[%rl_t, %rl_k] : {w_ty}
  %rl_sv = memref.load %rl_sel[%rl_k] : memref<?xf32>
  %rl_p = arith.mulf %rl_gv, %rl_sv : f32
  %rl_a2 = arith.addf %rl_a, %rl_p : f32
  scf.yield %rl_a2 : f32
}}
%rl_sq = arith.mulf %rl_sum, %rl_sum : f32
%rl_cq = arith.divf %rl_cross, %rl_sq : f32
scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 {{
  %rl_gv = memref.load {dw}[%rl_t, %rl_k] : {w_ty}
  %rl_gs = arith.divf %rl_gv, %rl_sum : f32
  %rl_df = arith.subf %rl_gs, %rl_cq : f32
  %rl_d = arith.mulf %rl_f, %rl_df : f32
  memref.store %rl_d, %rl_ds[%rl_k] : memref<?xf32>
}}"
            )
        } else {
            format!(
                "scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 {{
  %rl_gv = memref.load {dw}[%rl_t, %rl_k] : {w_ty}
  %rl_d = arith.mulf %rl_f, %rl_gv : f32
  memref.store %rl_d, %rl_ds[%rl_k] : memref<?xf32>
}}"
            )
        };
        let text = format!(
            "%rl_c0 = arith.constant 0 : index
%rl_c1 = arith.constant 1 : index
%rl_nz = arith.constant -0.0 : f32
%rl_f = arith.constant {factor} : f32
%rl_T = memref.dim {l}, %rl_c0 : {l_ty}
%rl_K = memref.dim {idx}, %rl_c1 : {i_ty}
%rl_sel = memref.alloc(%rl_K) : memref<?xf32>
%rl_ds = memref.alloc(%rl_K) : memref<?xf32>
linalg.fill ins(%zero : f32) outs({dest} : {o_ty})
scf.for %rl_t = %rl_c0 to %rl_T step %rl_c1 {{
  scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 {{
    %rl_e32 = memref.load {idx}[%rl_t, %rl_k] : {i_ty}
    %rl_e = arith.index_cast %rl_e32 : i32 to index
    %rl_lv = memref.load {l}[%rl_t, %rl_e] : {l_ty}
    %rl_n = arith.negf %rl_lv : f32
    %rl_x = math.exp %rl_n : f32
    %rl_den = arith.addf %one, %rl_x : f32
    %rl_s = arith.divf %one, %rl_den : f32
    memref.store %rl_s, %rl_sel[%rl_k] : memref<?xf32>
  }}
{ds}
  scf.for %rl_k = %rl_c0 to %rl_K step %rl_c1 {{
    %rl_e32 = memref.load {idx}[%rl_t, %rl_k] : {i_ty}
    %rl_e = arith.index_cast %rl_e32 : i32 to index
    %rl_s = memref.load %rl_sel[%rl_k] : memref<?xf32>
    %rl_d = memref.load %rl_ds[%rl_k] : memref<?xf32>
    %rl_p = arith.mulf %rl_d, %rl_s : f32
    %rl_oms = arith.subf %one, %rl_s : f32
    %rl_q = arith.mulf %rl_p, %rl_oms : f32
    %rl_old = memref.load {dest}[%rl_t, %rl_e] : {o_ty}
    %rl_new = arith.addf %rl_old, %rl_q : f32
    memref.store %rl_new, {dest}[%rl_t, %rl_e] : {o_ty}
  }}
}}
memref.dealloc %rl_sel : memref<?xf32>
memref.dealloc %rl_ds : memref<?xf32>
scf.yield",
            ds = indent(&ds, 2)
        );
        self.line(&format!("scf.execute_region {{\n{}\n    }}", indent(&text, 6)));
    }

    /// The sequence-wise balance loss of router `logits` [T, E] and expert `indices` [T, K] (`grad`
    /// false: into `dest` [1]) or its gradient to the logits (`grad` true: into `dest` [T, E]), in
    /// f64 as the reference's `balance_loss`: f_i accumulated per routed slot, per token the
    /// sigmoid scores, their sum and the f-weighted mean.
    ///
    /// `softmax` (DeepSeek-V2): the affinities `exp(l - max)` per token, their gradient to the logits
    /// `ds_j s_j` (the reference's `balance_loss`).
    pub(super) fn balance_loss(
        &mut self,
        (logits, idx): (&(String, Shape), &(String, Shape)),
        (alpha, softmax): (&str, bool),
        grad: bool,
        dest: &str,
        out: &Shape,
    ) {
        let (l_ty, i_ty, o_ty) = (memref(&logits.1), memref(&idx.1), memref(out));
        let (l, idx) = (&logits.0, &idx.0);
        let scores = "%bl_sg = memref.load %bl_s[%bl_j] : memref<?xf64>".to_string();
        let per_token = if grad {
            format!(
                "scf.for %bl_j = %bl_c0 to %bl_E step %bl_c1 {{
  {scores}
  %bl_fj = memref.load %bl_f[%bl_j] : memref<?xf64>
  %bl_fw = arith.subf %bl_fj, %bl_wtd : f64
  %bl_a = arith.mulf %bl_at, %bl_fw : f64
  %bl_ds = arith.divf %bl_a, %bl_sum : f64
  %bl_p = arith.mulf %bl_ds, %bl_sg : f64
{jacobian}
  %bl_q32 = arith.truncf %bl_q : f64 to f32
  memref.store %bl_q32, {dest}[%bl_t, %bl_j] : {o_ty}
}}
scf.yield %bl_acc : f64",
                jacobian = if softmax {
                    "  %bl_q = arith.addf %bl_p, %bl_nzd : f64"
                } else {
                    "  %bl_oms = arith.subf %bl_od, %bl_sg : f64\n  %bl_q = arith.mulf %bl_p, %bl_oms : f64"
                },
            )
        } else {
            "%bl_term = arith.mulf %bl_at, %bl_wtd : f64\n%bl_acc2 = arith.addf %bl_acc, %bl_term : f64\nscf.yield %bl_acc2 : f64"
                .to_string()
        };
        let finish = if grad {
            String::new()
        } else {
            format!("%bl_l32 = arith.truncf %bl_loss : f64 to f32\nmemref.store %bl_l32, {dest}[%bl_c0] : {o_ty}")
        };
        let text = format!(
            "%bl_c0 = arith.constant 0 : index
%bl_c1 = arith.constant 1 : index
%bl_zd = arith.constant 0.0 : f64
%bl_nzd = arith.constant -0.0 : f64
%bl_od = arith.constant 1.0 : f64
%bl_alpha32 = arith.constant {alpha} : f32
%bl_alpha = arith.extf %bl_alpha32 : f32 to f64
%bl_T = memref.dim {l}, %bl_c0 : {l_ty}
%bl_E = memref.dim {l}, %bl_c1 : {l_ty}
%bl_K = memref.dim {idx}, %bl_c1 : {i_ty}
%bl_T64 = arith.index_cast %bl_T : index to i64
%bl_Td = arith.sitofp %bl_T64 : i64 to f64
%bl_E64 = arith.index_cast %bl_E : index to i64
%bl_Ed = arith.sitofp %bl_E64 : i64 to f64
%bl_KT = arith.muli %bl_K, %bl_T : index
%bl_KT64 = arith.index_cast %bl_KT : index to i64
%bl_KTd = arith.sitofp %bl_KT64 : i64 to f64
%bl_inc = arith.divf %bl_Ed, %bl_KTd : f64
%bl_at = arith.divf %bl_alpha, %bl_Td : f64
%bl_f = memref.alloc(%bl_E) : memref<?xf64>
%bl_s = memref.alloc(%bl_E) : memref<?xf64>
linalg.fill ins(%bl_zd : f64) outs(%bl_f : memref<?xf64>)
scf.for %bl_t = %bl_c0 to %bl_T step %bl_c1 {{
  scf.for %bl_k = %bl_c0 to %bl_K step %bl_c1 {{
    %bl_e32 = memref.load {idx}[%bl_t, %bl_k] : {i_ty}
    %bl_e = arith.index_cast %bl_e32 : i32 to index
    %bl_fo = memref.load %bl_f[%bl_e] : memref<?xf64>
    %bl_fn = arith.addf %bl_fo, %bl_inc : f64
    memref.store %bl_fn, %bl_f[%bl_e] : memref<?xf64>
  }}
}}
%bl_loss = scf.for %bl_t = %bl_c0 to %bl_T step %bl_c1 iter_args(%bl_acc = %bl_zd) -> (f64) {{
{max}  %bl_sum = scf.for %bl_j = %bl_c0 to %bl_E step %bl_c1 iter_args(%bl_a = %bl_nzd) -> (f64) {{
    %bl_lv = memref.load {l}[%bl_t, %bl_j] : {l_ty}
{score}    memref.store %bl_sv, %bl_s[%bl_j] : memref<?xf64>
    %bl_a2 = arith.addf %bl_a, %bl_sv : f64
    scf.yield %bl_a2 : f64
  }}
  %bl_fs = scf.for %bl_j = %bl_c0 to %bl_E step %bl_c1 iter_args(%bl_a = %bl_nzd) -> (f64) {{
    %bl_fj = memref.load %bl_f[%bl_j] : memref<?xf64>
    {scores}
    %bl_p = arith.mulf %bl_fj, %bl_sg : f64
    %bl_a2 = arith.addf %bl_a, %bl_p : f64
    scf.yield %bl_a2 : f64
  }}
  %bl_wtd = arith.divf %bl_fs, %bl_sum : f64
{per_token}
}}
{finish}
memref.dealloc %bl_f : memref<?xf64>
memref.dealloc %bl_s : memref<?xf64>
scf.yield",
            per_token = indent(&per_token, 2),
            max = if softmax {
                format!(
                    "  %bl_ninf = arith.constant 0xFFF0000000000000 : f64
  %bl_mx = scf.for %bl_j = %bl_c0 to %bl_E step %bl_c1 iter_args(%bl_m = %bl_ninf) -> (f64) {{
    %bl_lv = memref.load {l}[%bl_t, %bl_j] : {l_ty}
    %bl_ld = arith.extf %bl_lv : f32 to f64
    %bl_gt = arith.cmpf ogt, %bl_ld, %bl_m : f64
    %bl_m2 = arith.select %bl_gt, %bl_ld, %bl_m : f64
    scf.yield %bl_m2 : f64
  }}
"
                )
            } else {
                String::new()
            },
            score = if softmax {
                "    %bl_ld = arith.extf %bl_lv : f32 to f64\n    %bl_d = arith.subf %bl_ld, %bl_mx : f64\n    %bl_sv = math.exp %bl_d : f64\n"
            } else {
                "    %bl_n32 = arith.negf %bl_lv : f32\n    %bl_n = arith.extf %bl_n32 : f32 to f64\n    %bl_x = math.exp %bl_n : f64\n    %bl_den = arith.addf %bl_od, %bl_x : f64\n    %bl_sv = arith.divf %bl_od, %bl_den : f64\n"
            },
        );
        self.line(&format!("scf.execute_region {{\n{}\n    }}", indent(&text, 6)));
    }
}
