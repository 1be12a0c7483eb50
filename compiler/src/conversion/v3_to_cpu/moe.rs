//! MoE routing: the gate GEMM (the dense GEMM template), the sigmoid and the bias (row templates),
//! then the group-limited top-k selection as scf loops over each token's experts (a selection is
//! a sequence of data-dependent picks, not a tensor computation to tile); `moe_dispatch` builds on
//! it. DeepSeek-V2's softmax routing takes each token's softmax in scf loops too (max, then the
//! exponentials summed in expert order: the reference's order) and scores a group by its best.

use super::*;

/// Static facts of one routing op.
pub(super) struct RouteSpec {
    pub(super) top_k: usize,
    pub(super) n_group: usize,
    pub(super) topk_group: usize,
    pub(super) norm: bool,
    pub(super) factor: String,
    /// DeepSeek-V2's softmax scores, no bias, groups by their best expert.
    pub(super) softmax: bool,
}

/// The first half of a row's softmax as [`v3c_models::interp::kernels::softmax_scores`] takes
/// it: `%{p}mx`, the largest value (strictly greater wins), then each `exp(v - max)` stored by
/// `store(value, index)` and summed in order from 0 into `%{p}sum`; the caller divides. `load(j)`
/// defines `%{p}v` at index `j`; `(c0, c1, count)` bound the loops.
pub(super) fn softmax_exp_sum(
    p: &str,
    (c0, c1, count): (&str, &str, &str),
    load: &dyn Fn(&str) -> String,
    store: &dyn Fn(&str, &str) -> String,
) -> String {
    let j = format!("%{p}j");
    format!(
        "%{p}ninf = arith.constant 0xFF800000 : f32
%{p}mx = scf.for {j} = {c0} to {count} step {c1} iter_args(%{p}m = %{p}ninf) -> (f32) {{
  {load_j}
  %{p}gt = arith.cmpf ogt, %{p}v, %{p}m : f32
  %{p}m2 = arith.select %{p}gt, %{p}v, %{p}m : f32
  scf.yield %{p}m2 : f32
}}
%{p}sum = scf.for {j} = {c0} to {count} step {c1} iter_args(%{p}a = %zero) -> (f32) {{
  {load_j}
  %{p}d = arith.subf %{p}v, %{p}mx : f32
  %{p}x = math.exp %{p}d : f32
  {store_j}
  %{p}a2 = arith.addf %{p}a, %{p}x : f32
  scf.yield %{p}a2 : f32
}}",
        load_j = load(&j),
        store_j = store(&format!("%{p}x"), &j),
    )
}

impl Emitter {
    /// Group-limited top-k routing (spec section 4): the affinities of all tokens through the
    /// transform-dialect templates, then the selection one token at a time. Ties go to the lower
    /// index, as in the reference.
    pub(super) fn route(
        &mut self,
        r: &RouteSpec,
        x: &(String, Shape),
        gate: &(String, Shape),
        bias: Option<&(String, Shape)>,
        idx_out: (&str, &Shape),
        w_out: (&str, &Shape),
    ) {
        let e_count = gate.1.dims[0].unwrap_or(0);
        let per_group = e_count / r.n_group.max(1);
        // The affinities of every token at once: the gate GEMM through the dense GEMM template,
        // then the sigmoid and the biased copy that the selection masks, as row templates.
        let scores_shape = Shape { dims: vec![None, Some(e_count)], element: "f32".into() };
        let s_ty = memref(&scores_shape);
        let logits = (self.alloc(&scores_shape, x), scores_shape.clone());
        self.gemm_vectorized(x, gate, &logits.0, &scores_shape);
        let scores = self.alloc(&scores_shape, x);
        let cand = self.alloc(&scores_shape, x);
        match bias.filter(|_| !r.softmax) {
            Some(bias) => {
                let ins = [self.same_index(&logits)];
                let sigmoid = "%n = arith.negf %a : f32\n%e = math.exp %n : f32\n%den = arith.addf %one, %e : f32\n%r = arith.divf %one, %den : f32";
                self.row_generic((&scores, &s_ty), &scores_shape, &ins, ("%a: f32", sigmoid, "%r"));
                let ins = [self.same_index(&(scores.clone(), scores_shape.clone())), self.indexed_by(bias, 2, &[1])];
                let biased = format!("{}\n%r = arith.addf %a, %bf : f32", load_f32(&bias.1.element, "%bv", "%bf"));
                let args = format!("%a: f32, %bv: {}", bias.1.element);
                self.row_generic((&cand, &s_ty), &scores_shape, &ins, (&args, &biased, "%r"));
            }
            None => self.softmax_scores(&logits.0, [&scores, &cand], e_count, &s_ty, &x.0, &memref(&x.1)),
        }
        let x_ty = memref(&x.1);
        let (i_ty, w_ty) = (memref(idx_out.1), memref(w_out.1));
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
      %cg = arith.constant {ng} : index
      %cpg = arith.constant {per_group} : index
      %ck = arith.constant {top_k} : index
      %ckg = arith.constant {topk_group} : index
      %ninf = arith.constant 0xFF800000 : f32
      %factor = arith.constant {factor} : f32
      %nt = memref.dim {x}, %c0 : {x_ty}
      %gs = memref.alloc() : memref<{ng}xf32>
      scf.for %t = %c0 to %nt step %c1 {{
        scf.for %g = %c0 to %cg step %c1 {{
          %base = arith.muli %g, %cpg : index
          %top:2 = scf.for %i = %c0 to %cpg step %c1 iter_args(%m1 = %ninf, %m2 = %ninf) -> (f32, f32) {{
            %ei = arith.addi %base, %i : index
            %v = memref.load {cand}[%t, %ei] : {s_ty}
            %gt1 = arith.cmpf ogt, %v, %m1 : f32
            %gt2 = arith.cmpf ogt, %v, %m2 : f32
            %n2a = arith.select %gt2, %v, %m2 : f32
            %n2 = arith.select %gt1, %m1, %n2a : f32
            %n1 = arith.select %gt1, %v, %m1 : f32
            scf.yield %n1, %n2 : f32, f32
          }}
          %two = arith.cmpi ugt, %cpg, %c1 : index
          %second = arith.select %two, %top#1, %zero : f32
          {group_score}
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
            memref.store %ninf, {cand}[%t, %e] : {s_ty}
          }}
        }}
        memref.dealloc %kept : memref<{ng}xi1>
        scf.for %k = %c0 to %ck step %c1 {{
          %best:2 = scf.for %e = %c0 to %ce step %c1 iter_args(%bv2 = %ninf, %bi = %c0) -> (f32, index) {{
            %v = memref.load {cand}[%t, %e] : {s_ty}
            %better = arith.cmpf ogt, %v, %bv2 : f32
            %nv = arith.select %better, %v, %bv2 : f32
            %ni = arith.select %better, %e, %bi : index
            scf.yield %nv, %ni : f32, index
          }}
          memref.store %ninf, {cand}[%t, %best#1] : {s_ty}
          %i32 = arith.index_cast %best#1 : index to i32
          memref.store %i32, {idx}[%t, %k] : {i_ty}
          %sv = memref.load {scores}[%t, %best#1] : {s_ty}
          memref.store %sv, {wout}[%t, %k] : {w_ty}
        }}
{norm}        scf.for %k = %c0 to %ck step %c1 {{
          %wv = memref.load {wout}[%t, %k] : {w_ty}
          %wn = arith.divf %wv, %den : f32
          %ws = arith.mulf %wn, %factor : f32
          memref.store %ws, {wout}[%t, %k] : {w_ty}
        }}
      }}
      memref.dealloc %gs : memref<{ng}xf32>
      scf.yield
    }}",
            ng = r.n_group,
            top_k = r.top_k,
            topk_group = r.topk_group,
            factor = r.factor,
            x = x.0,
            idx = idx_out.0,
            wout = w_out.0,
            norm = norm.replace("WOUT", w_out.0).replace("WTY", &w_ty),
            group_score = if r.softmax {
                "%gsum = arith.addf %top#0, %zero : f32"
            } else {
                "%gsum = arith.addf %top#0, %second : f32"
            },
        );
        self.line(&text);
    }

    /// Each token's softmax over its `e` logits into `outs` (scores and the selection's copy), as
    /// [`v3c_models::interp::kernels::softmax_scores`] takes it: the max, `exp(l - max)` summed in
    /// expert order, each divided by the sum.
    fn softmax_scores(&mut self, logits: &str, outs: [&str; 2], e: usize, s_ty: &str, x: &str, x_ty: &str) {
        let [scores, cand] = outs;
        let exp_sum = softmax_exp_sum(
            "sm_",
            ("%c0", "%c1", "%ce"),
            &|j| format!("%sm_v = memref.load {logits}[%t, {j}] : {s_ty}"),
            &|x, j| format!("memref.store {x}, {scores}[%t, {j}] : {s_ty}"),
        );
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ce = arith.constant {e} : index
      %nt = memref.dim {x}, %c0 : {x_ty}
      scf.for %t = %c0 to %nt step %c1 {{
{exp_sum}
        scf.for %e = %c0 to %ce step %c1 {{
          %x = memref.load {scores}[%t, %e] : {s_ty}
          %q = arith.divf %x, %sm_sum : f32
          memref.store %q, {scores}[%t, %e] : {s_ty}
          memref.store %q, {cand}[%t, %e] : {s_ty}
        }}
      }}
      scf.yield
    }}"
        ));
    }
}
