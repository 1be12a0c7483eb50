//! The routed SwiGLU experts of a training graph on the CPU (f32; the fp8 recipe's are in
//! [`super::train_fp8`]): the unfused forward op and its gradient, per token and slot as the
//! reference interpreter computes them, vectorized: dot products over a weight row in lanes
//! summed at the end (another order than the reference's sequential sums: f32 results within
//! rounding of it; no fp8 quantization follows here), outer-product updates and the products
//! over weight columns (dh) across their output lanes (those in the reference's order). No
//! weight is copied or transposed.

use super::rows::lanes;
use super::train::swiglu_grad_text;
use super::*;

/// SSA names and sizes shared by the expert templates.
struct Dims {
    e: usize,
    i: usize,
    d: usize,
    li: usize,
    ld: usize,
}

impl Emitter {
    fn expert_dims(gate: &(String, Shape)) -> Dims {
        let (e, i, d) = (gate.1.dims[0].unwrap_or(0), gate.1.dims[1].unwrap_or(0), gate.1.dims[2].unwrap_or(0));
        Dims { e, i, d, li: lanes(Some(i)), ld: lanes(Some(d)) }
    }

    /// Text: the expert's gate and up rows of token `%mx_t` into `%mx_g`, `%mx_u` and SwiGLU into
    /// `%mx_h` (each `[I]`): per row, the products over the hidden size in `ld` lanes (contiguous
    /// loads of x and the weight row) then summed across the lanes.
    fn swiglu_rows(dims: &Dims, x: (&str, &str), gate: (&str, &str), up: (&str, &str)) -> String {
        let i = dims.i;
        let v = format!("vector<{}xf32>", dims.ld);
        format!(
            "scf.for %mx_i = %mx_c0 to %mx_I step %mx_c1 {{
  %mx_gu:2 = scf.for %mx_db = %mx_c0 to %mx_D step %mx_Ld iter_args(%mx_ga = %mx_zd, %mx_ua = %mx_zd) -> ({v}, {v}) {{
    %mx_xv = vector.load {xb}[%mx_t, %mx_db] : {xt}, {v}
    %mx_gw = vector.load {gb}[%mx_e, %mx_i, %mx_db] : {gty}, {v}
    %mx_uw = vector.load {ub}[%mx_e, %mx_i, %mx_db] : {uty}, {v}
    %mx_gp = arith.mulf %mx_xv, %mx_gw : {v}
    %mx_up = arith.mulf %mx_xv, %mx_uw : {v}
    %mx_ga2 = arith.addf %mx_ga, %mx_gp : {v}
    %mx_ua2 = arith.addf %mx_ua, %mx_up : {v}
    scf.yield %mx_ga2, %mx_ua2 : {v}, {v}
  }}
  %mx_gs = vector.reduction <add>, %mx_gu#0 : {v} into f32
  %mx_us = vector.reduction <add>, %mx_gu#1 : {v} into f32
  memref.store %mx_gs, %mx_g[%mx_i] : memref<{i}xf32>
  memref.store %mx_us, %mx_u[%mx_i] : memref<{i}xf32>
  %mx_n = arith.negf %mx_gs : f32
  %mx_ex = math.exp %mx_n : f32
  %mx_den = arith.addf %one, %mx_ex : f32
  %mx_silu = arith.divf %mx_gs, %mx_den : f32
  %mx_hv = arith.mulf %mx_silu, %mx_us : f32
  memref.store %mx_hv, %mx_h[%mx_i] : memref<{i}xf32>
}}",
            xb = x.0,
            xt = x.1,
            gb = gate.0,
            gty = gate.1,
            ub = up.0,
            uty = up.1,
        )
    }

    /// Constants and scratch rows the expert templates share (`%mx_*`).
    fn expert_prelude(dims: &Dims) -> String {
        let Dims { e, i, d, li, ld } = *dims;
        format!(
            "%mx_c0 = arith.constant 0 : index
%mx_c1 = arith.constant 1 : index
%mx_E = arith.constant {e} : index
%mx_I = arith.constant {i} : index
%mx_D = arith.constant {d} : index
%mx_Li = arith.constant {li} : index
%mx_Ld = arith.constant {ld} : index
%mx_nz = arith.constant -0.0 : f32
%mx_zv = arith.constant dense<-0.0> : vector<{li}xf32>
%mx_zd = arith.constant dense<-0.0> : vector<{ld}xf32>
%mx_onev = arith.constant dense<1.0> : vector<{li}xf32>
%mx_g = memref.alloc() : memref<{i}xf32>
%mx_u = memref.alloc() : memref<{i}xf32>
%mx_h = memref.alloc() : memref<{i}xf32>
%mx_y = memref.alloc() : memref<{d}xf32>
"
        )
    }

    /// Text: `%mx_y` [D] = the expert's down rows of `%mx_h`: per output, the products over the
    /// intermediate size in `li` lanes then summed across them.
    fn down_rows(dims: &Dims, down: (&str, &str)) -> String {
        let (i, d) = (dims.i, dims.d);
        let v = format!("vector<{}xf32>", dims.li);
        format!(
            "scf.for %mx_o = %mx_c0 to %mx_D step %mx_c1 {{
  %mx_ya = scf.for %mx_ib = %mx_c0 to %mx_I step %mx_Li iter_args(%mx_a = %mx_zv) -> ({v}) {{
    %mx_hv = vector.load %mx_h[%mx_ib] : memref<{i}xf32>, {v}
    %mx_dw = vector.load {db}[%mx_e, %mx_o, %mx_ib] : {dty}, {v}
    %mx_p = arith.mulf %mx_hv, %mx_dw : {v}
    %mx_a2 = arith.addf %mx_a, %mx_p : {v}
    scf.yield %mx_a2 : {v}
  }}
  %mx_ys = vector.reduction <add>, %mx_ya : {v} into f32
  memref.store %mx_ys, %mx_y[%mx_o] : memref<{d}xf32>
}}",
            db = down.0,
            dty = down.1,
        )
    }

    /// The routed SwiGLU experts (f32, unfused: a training graph's forward op): per token its slots
    /// in expert order (as the reference, after Hugging Face, sums them), the expert's gate and up
    /// rows, SwiGLU, the down rows, added times the slot's weight.
    pub(super) fn moe_experts(&mut self, [x, idx, w, gate, up, down]: [&(String, Shape); 6], dest: &str, out: &Shape) {
        let dims = Self::expert_dims(gate);
        let (gt, ut, dt) =
            ((gate.0.clone(), memref(&gate.1)), (up.0.clone(), memref(&up.1)), (down.0.clone(), memref(&down.1)));
        let (x_ty, i_ty, w_ty, o_ty) = (memref(&x.1), memref(&idx.1), memref(&w.1), memref(out));
        let v = format!("vector<{}xf32>", dims.ld);
        self.line(&format!("linalg.fill ins(%zero : f32) outs({dest} : {o_ty})"));
        let text = format!(
            "{prelude}%mx_T = memref.dim {xb}, %mx_c0 : {x_ty}
%mx_K = memref.dim {ib}, %mx_c1 : {i_ty}
scf.for %mx_t = %mx_c0 to %mx_T step %mx_c1 {{
  scf.for %mx_e = %mx_c0 to %mx_E step %mx_c1 {{
    scf.for %mx_k = %mx_c0 to %mx_K step %mx_c1 {{
      %mx_e32 = memref.load {ib}[%mx_t, %mx_k] : {i_ty}
      %mx_ei = arith.index_cast %mx_e32 : i32 to index
      %mx_mine = arith.cmpi eq, %mx_ei, %mx_e : index
      scf.if %mx_mine {{
{swiglu}
{down}
        %mx_w = memref.load {wb}[%mx_t, %mx_k] : {w_ty}
        %mx_wv = vector.broadcast %mx_w : f32 to {v}
        scf.for %mx_ob = %mx_c0 to %mx_D step %mx_Ld {{
          %mx_yv = vector.load %mx_y[%mx_ob] : memref<{d}xf32>, {v}
          %mx_wy = arith.mulf %mx_wv, %mx_yv : {v}
          %mx_old = vector.load {dest}[%mx_t, %mx_ob] : {o_ty}, {v}
          %mx_new = arith.addf %mx_old, %mx_wy : {v}
          vector.store %mx_new, {dest}[%mx_t, %mx_ob] : {o_ty}, {v}
        }}
      }}
    }}
  }}
}}
{frees}scf.yield",
            prelude = Self::expert_prelude(&dims),
            xb = x.0,
            ib = idx.0,
            wb = w.0,
            d = dims.d,
            swiglu = indent(&Self::swiglu_rows(&dims, (&x.0, &x_ty), (&gt.0, &gt.1), (&ut.0, &ut.1)), 8),
            down = indent(&Self::down_rows(&dims, (&dt.0, &dt.1)), 8),
            frees = Self::expert_frees(&dims),
        );
        self.line(&format!("scf.execute_region {{\n{}\n    }}", indent(&text, 6)));
    }

    fn expert_frees(dims: &Dims) -> String {
        let (i, d) = (dims.i, dims.d);
        format!(
            "memref.dealloc %mx_g : memref<{i}xf32>\nmemref.dealloc %mx_u : memref<{i}xf32>\nmemref.dealloc %mx_h : memref<{i}xf32>\nmemref.dealloc %mx_y : memref<{d}xf32>\n"
        )
    }

    /// The gradient of [`Emitter::moe_experts`] (the reference's f32 `moe_experts_grad`), expert
    /// by expert over its (token, slot) pairs in token order: per pair the forward recomputed,
    /// d weight = dy . y, dy_e = w dy, dh = dy_e . down, SwiGLU's gradient and dx; then the
    /// expert's weight gradients as products over its pairs (d down = dy_e^T h, d gate = dg^T x,
    /// d up = du^T x), each element summed over the pairs in token order — the reference's order —
    /// in registers and written once.
    pub(super) fn moe_experts_grad(
        &mut self,
        [x, idx, w, dy, gate, up, down]: [&(String, Shape); 7],
        dests: [(&str, &Shape); 5],
    ) {
        let dims = Self::expert_dims(gate);
        for (d, s) in dests {
            self.line(&format!("linalg.fill ins(%zero : f32) outs({d} : {})", memref(s)));
        }
        let [(dx, dx_s), (dwt, dwt_s), (dg, dg_s), (du, du_s), (dd, dd_s)] = dests;
        let (x_ty, i_ty, w_ty, y_ty) = (memref(&x.1), memref(&idx.1), memref(&w.1), memref(&dy.1));
        let (dx_ty, dwt_ty, dg_ty, du_ty, dd_ty) =
            (memref(dx_s), memref(dwt_s), memref(dg_s), memref(du_s), memref(dd_s));
        let (li, ld, i, d) = (dims.li, dims.ld, dims.i, dims.d);
        let (vi, vd) = (format!("vector<{li}xf32>"), format!("vector<{ld}xf32>"));
        let (gate_ty, up_ty, down_ty) = (memref(&gate.1), memref(&up.1), memref(&down.1));
        let text = format!(
            "{prelude}%mx_T = memref.dim {xb}, %mx_c0 : {x_ty}
%mx_K = memref.dim {ib}, %mx_c1 : {i_ty}
%mx_cap = arith.muli %mx_T, %mx_K : index
%mx_pt = memref.alloc(%mx_cap) : memref<?xindex>
%mx_pk = memref.alloc(%mx_cap) : memref<?xindex>
%mx_H = memref.alloc(%mx_cap) : memref<?x{i}xf32>
%mx_DYE = memref.alloc(%mx_cap) : memref<?x{d}xf32>
%mx_DG = memref.alloc(%mx_cap) : memref<?x{i}xf32>
%mx_DU = memref.alloc(%mx_cap) : memref<?x{i}xf32>
%mx_pzi = arith.constant dense<0.0> : {vi}
%mx_pzd = arith.constant dense<0.0> : {vd}
scf.for %mx_e = %mx_c0 to %mx_E step %mx_c1 {{
  %mx_m = scf.for %mx_st = %mx_c0 to %mx_T step %mx_c1 iter_args(%mx_n0 = %mx_c0) -> (index) {{
    %mx_n1 = scf.for %mx_sk = %mx_c0 to %mx_K step %mx_c1 iter_args(%mx_n2 = %mx_n0) -> (index) {{
      %mx_e32 = memref.load {ib}[%mx_st, %mx_sk] : {i_ty}
      %mx_ei = arith.index_cast %mx_e32 : i32 to index
      %mx_mine = arith.cmpi eq, %mx_ei, %mx_e : index
      %mx_n3 = scf.if %mx_mine -> (index) {{
        memref.store %mx_st, %mx_pt[%mx_n2] : memref<?xindex>
        memref.store %mx_sk, %mx_pk[%mx_n2] : memref<?xindex>
        %mx_n4 = arith.addi %mx_n2, %mx_c1 : index
        scf.yield %mx_n4 : index
      }} else {{
        scf.yield %mx_n2 : index
      }}
      scf.yield %mx_n3 : index
    }}
    scf.yield %mx_n1 : index
  }}
  scf.for %mx_r = %mx_c0 to %mx_m step %mx_c1 {{
    %mx_t = memref.load %mx_pt[%mx_r] : memref<?xindex>
    %mx_k = memref.load %mx_pk[%mx_r] : memref<?xindex>
{swiglu}
{down}
    %mx_wt = memref.load {wb}[%mx_t, %mx_k] : {w_ty}
    %mx_dwt = scf.for %mx_o = %mx_c0 to %mx_D step %mx_c1 iter_args(%mx_a = %mx_nz) -> (f32) {{
      %mx_gv = memref.load {dyb}[%mx_t, %mx_o] : {y_ty}
      %mx_yv = memref.load %mx_y[%mx_o] : memref<{d}xf32>
      %mx_p = arith.mulf %mx_gv, %mx_yv : f32
      %mx_a2 = arith.addf %mx_a, %mx_p : f32
      scf.yield %mx_a2 : f32
    }}
    memref.store %mx_dwt, {dwtb}[%mx_t, %mx_k] : {dwt_ty}
    %mx_wtv = vector.broadcast %mx_wt : f32 to {vd}
    scf.for %mx_ob = %mx_c0 to %mx_D step %mx_Ld {{
      %mx_gv = vector.load {dyb}[%mx_t, %mx_ob] : {y_ty}, {vd}
      %mx_ev = arith.mulf %mx_gv, %mx_wtv : {vd}
      vector.store %mx_ev, %mx_DYE[%mx_r, %mx_ob] : memref<?x{d}xf32>, {vd}
    }}
    scf.for %mx_ib = %mx_c0 to %mx_I step %mx_Li {{
      %mx_hv = vector.load %mx_h[%mx_ib] : memref<{i}xf32>, {vi}
      vector.store %mx_hv, %mx_H[%mx_r, %mx_ib] : memref<?x{i}xf32>, {vi}
      %mx_dha = scf.for %mx_o = %mx_c0 to %mx_D step %mx_c1 iter_args(%mx_a = %mx_zv) -> ({vi}) {{
        %mx_es = memref.load %mx_DYE[%mx_r, %mx_o] : memref<?x{d}xf32>
        %mx_eb = vector.broadcast %mx_es : f32 to {vi}
        %mx_dw = vector.load {downb}[%mx_e, %mx_o, %mx_ib] : {down_ty}, {vi}
        %mx_p = arith.mulf %mx_eb, %mx_dw : {vi}
        %mx_a2 = arith.addf %mx_a, %mx_p : {vi}
        scf.yield %mx_a2 : {vi}
      }}
      %mx_gi = vector.load %mx_g[%mx_ib] : memref<{i}xf32>, {vi}
      %mx_ui = vector.load %mx_u[%mx_ib] : memref<{i}xf32>, {vi}
{swiglu_grad}
      vector.store %mx_sg_dg, %mx_DG[%mx_r, %mx_ib] : memref<?x{i}xf32>, {vi}
      vector.store %mx_sg_du, %mx_DU[%mx_r, %mx_ib] : memref<?x{i}xf32>, {vi}
    }}
    scf.for %mx_i = %mx_c0 to %mx_I step %mx_c1 {{
      %mx_gs2 = memref.load %mx_DG[%mx_r, %mx_i] : memref<?x{i}xf32>
      %mx_us2 = memref.load %mx_DU[%mx_r, %mx_i] : memref<?x{i}xf32>
      %mx_gb = vector.broadcast %mx_gs2 : f32 to {vd}
      %mx_ub = vector.broadcast %mx_us2 : f32 to {vd}
      scf.for %mx_cb = %mx_c0 to %mx_D step %mx_Ld {{
        %mx_wg = vector.load {gateb}[%mx_e, %mx_i, %mx_cb] : {gate_ty}, {vd}
        %mx_wu = vector.load {upb}[%mx_e, %mx_i, %mx_cb] : {up_ty}, {vd}
        %mx_pg = arith.mulf %mx_gb, %mx_wg : {vd}
        %mx_pu = arith.mulf %mx_ub, %mx_wu : {vd}
        %mx_ps = arith.addf %mx_pg, %mx_pu : {vd}
        %mx_xo = vector.load {dxb}[%mx_t, %mx_cb] : {dx_ty}, {vd}
        %mx_xn = arith.addf %mx_xo, %mx_ps : {vd}
        vector.store %mx_xn, {dxb}[%mx_t, %mx_cb] : {dx_ty}, {vd}
      }}
    }}
  }}
  scf.for %mx_o = %mx_c0 to %mx_D step %mx_c1 {{
    scf.for %mx_ib = %mx_c0 to %mx_I step %mx_Li {{
      %mx_acc = scf.for %mx_r = %mx_c0 to %mx_m step %mx_c1 iter_args(%mx_a = %mx_pzi) -> ({vi}) {{
        %mx_es = memref.load %mx_DYE[%mx_r, %mx_o] : memref<?x{d}xf32>
        %mx_eb = vector.broadcast %mx_es : f32 to {vi}
        %mx_hv = vector.load %mx_H[%mx_r, %mx_ib] : memref<?x{i}xf32>, {vi}
        %mx_p = arith.mulf %mx_eb, %mx_hv : {vi}
        %mx_a2 = arith.addf %mx_a, %mx_p : {vi}
        scf.yield %mx_a2 : {vi}
      }}
      vector.store %mx_acc, {ddb}[%mx_e, %mx_o, %mx_ib] : {dd_ty}, {vi}
    }}
  }}
  scf.for %mx_i = %mx_c0 to %mx_I step %mx_c1 {{
    scf.for %mx_cb = %mx_c0 to %mx_D step %mx_Ld {{
      %mx_gu2:2 = scf.for %mx_r = %mx_c0 to %mx_m step %mx_c1 iter_args(%mx_ag = %mx_pzd, %mx_au = %mx_pzd) -> ({vd}, {vd}) {{
        %mx_t = memref.load %mx_pt[%mx_r] : memref<?xindex>
        %mx_xv = vector.load {xb}[%mx_t, %mx_cb] : {x_ty}, {vd}
        %mx_gs2 = memref.load %mx_DG[%mx_r, %mx_i] : memref<?x{i}xf32>
        %mx_us2 = memref.load %mx_DU[%mx_r, %mx_i] : memref<?x{i}xf32>
        %mx_gb = vector.broadcast %mx_gs2 : f32 to {vd}
        %mx_ub = vector.broadcast %mx_us2 : f32 to {vd}
        %mx_pa = arith.mulf %mx_gb, %mx_xv : {vd}
        %mx_pb = arith.mulf %mx_ub, %mx_xv : {vd}
        %mx_ag2 = arith.addf %mx_ag, %mx_pa : {vd}
        %mx_au2 = arith.addf %mx_au, %mx_pb : {vd}
        scf.yield %mx_ag2, %mx_au2 : {vd}, {vd}
      }}
      vector.store %mx_gu2#0, {dgb}[%mx_e, %mx_i, %mx_cb] : {dg_ty}, {vd}
      vector.store %mx_gu2#1, {dub}[%mx_e, %mx_i, %mx_cb] : {du_ty}, {vd}
    }}
  }}
}}
memref.dealloc %mx_pt : memref<?xindex>
memref.dealloc %mx_pk : memref<?xindex>
memref.dealloc %mx_H : memref<?x{i}xf32>
memref.dealloc %mx_DYE : memref<?x{d}xf32>
memref.dealloc %mx_DG : memref<?x{i}xf32>
memref.dealloc %mx_DU : memref<?x{i}xf32>
{frees}scf.yield",
            prelude = Self::expert_prelude(&dims),
            xb = x.0,
            ib = idx.0,
            wb = w.0,
            dyb = dy.0,
            dwtb = dwt,
            ddb = dd,
            dgb = dg,
            dub = du,
            dxb = dx,
            downb = down.0,
            gateb = gate.0,
            upb = up.0,
            swiglu = indent(&Self::swiglu_rows(&dims, (&x.0, &x_ty), (&gate.0, &gate_ty), (&up.0, &up_ty)), 4),
            swiglu_grad = indent(&swiglu_grad_text("%mx_sg", ("%mx_gi", "%mx_ui", "%mx_dha"), ("%mx_onev", &vi)), 6),
            down = indent(&Self::down_rows(&dims, (&down.0, &down_ty)), 4),
            frees = Self::expert_frees(&dims),
        );
        self.line(&format!("scf.execute_region {{\n{}\n    }}", indent(&text, 6)));
    }
}
