//! MoE routing (sigmoid, bias, group-limited top-k) and routed SwiGLU experts as scf loops.

use super::gemm::{widen_vector, LANES};
use super::*;

/// Static facts of one routing op.
pub(super) struct RouteSpec {
    pub(super) top_k: usize,
    pub(super) n_group: usize,
    pub(super) topk_group: usize,
    pub(super) norm: bool,
    pub(super) factor: String,
}

impl Emitter {
    /// Group-limited top-k routing (spec section 4), one token at a time with scf loops. Ties go to
    /// the lower index, as in the reference.
    pub(super) fn route(
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

    /// Routed SwiGLU experts: out[t] = sum_k w[t,k] * down_e(silu(gate_e x) * up_e x), expert by
    /// expert: each expert's tokens are gathered into a list (the permutation), then go four at a
    /// time through its gate/up and down weights (each weight vector loaded serves four tokens);
    /// leftover tokens one at a time. The weighted results are added into their tokens' rows.
    pub(super) fn experts(&mut self, a: &[(String, Shape)], dest: &str, out_shape: &Shape) {
        let (x, idx, w, gate, up, down) = (&a[0], &a[1], &a[2], &a[3], &a[4], &a[5]);
        let experts = gate.1.dims[0].unwrap_or(0);
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
        let vf = format!("vector<{LANES}xf32>");
        let gl = load_f32(&gate.1.element, "%graw", "%gv");
        let ul = load_f32(&up.1.element, "%uraw", "%uv");
        let dl = load_f32(&down.1.element, "%draw", "%dv");
        let (gel, uel, del) = (storage(&gate.1.element), storage(&up.1.element), storage(&down.1.element));
        let (gwiden, uwiden, dwiden) = (
            widen_vector(&gate.1.element, "%gv0", "%gvv"),
            widen_vector(&up.1.element, "%uv0", "%uvv"),
            widen_vector(&down.1.element, "%dv0", "%dvv"),
        );
        // Four tokens %t0..%t3 (list entries %g..%g+3) through expert %e.
        let r4 = |f: &dyn Fn(usize) -> String| (0..4).map(f).collect::<Vec<_>>().join("\n");
        let list4 = |f: &dyn Fn(usize) -> String| (0..4).map(f).collect::<Vec<_>>().join(", ");
        let group = format!(
            "{tok}
scf.for %i = %c0 to %ci step %c1 {{
  %va:8 = scf.for %j = %c0 to %cdv step %cl iter_args({va_args}) -> ({vf8}) {{
    %gv0 = vector.load {gate}[%e, %i, %j] : {g_ty}, vector<{LANES}x{gel}>
    {gwiden}
    %uv0 = vector.load {up}[%e, %i, %j] : {u_ty}, vector<{LANES}x{uel}>
    {uwiden}
{xload}
{fmas}
    scf.yield {yields} : {vf8}
  }}
{reduce}
  %sa:8 = scf.for %j = %cdv to %cd step %c1 iter_args({sa_args}) -> ({f8}) {{
    %graw = memref.load {gate}[%e, %i, %j] : {g_ty}
    {gl}
    %uraw = memref.load {up}[%e, %i, %j] : {u_ty}
    {ul}
{stail}
    scf.yield {syields} : {f8}
  }}
{silu}
}}
scf.for %o = %c0 to %cd step %c1 {{
  %vd:4 = scf.for %i = %c0 to %civ step %cl iter_args({vd_args}) -> ({vf4}) {{
    %dv0 = vector.load {down}[%e, %o, %i] : {dn_ty}, vector<{LANES}x{del}>
    {dwiden}
{hload}
    scf.yield {dyields} : {vf4}
  }}
{dreduce}
  %sd:4 = scf.for %i = %civ to %ci step %c1 iter_args({sd_args}) -> (f32, f32, f32, f32) {{
    %draw = memref.load {down}[%e, %o, %i] : {dn_ty}
    {dl}
{dtail}
    scf.yield {dsyields} : f32, f32, f32, f32
  }}
{accumulate}
}}",
            tok = r4(&|r| {
                format!(
                "%gi{r} = arith.addi %g, %c{r} : index\n%t{r} = memref.load %list[%gi{r}] : memref<?xindex>\n%w{r} = memref.load %wlist[%gi{r}] : memref<?xf32>"
            )
            }),
            va_args = (0..4).map(|r| format!("%ag{r} = %zv, %au{r} = %zv")).collect::<Vec<_>>().join(", "),
            vf8 = vec![vf.clone(); 8].join(", "),
            vf4 = vec![vf.clone(); 4].join(", "),
            f8 = vec!["f32"; 8].join(", "),
            xload = r4(&|r| format!("    %x{r} = vector.load {x}[%t{r}, %j] : {x_ty}, {vf}", x = x.0)),
            fmas = r4(&|r| format!(
                "    %fg{r} = vector.fma %x{r}, %gvv, %ag{r} : {vf}\n    %fu{r} = vector.fma %x{r}, %uvv, %au{r} : {vf}"
            )),
            yields = list4(&|r| format!("%fg{r}, %fu{r}")),
            reduce = r4(&|r| {
                format!(
                "  %rg{r} = vector.reduction <add>, %va#{g} : {vf} into f32\n  %ru{r} = vector.reduction <add>, %va#{u} : {vf} into f32",
                g = 2 * r,
                u = 2 * r + 1
            )
            }),
            sa_args = (0..4).map(|r| format!("%sg{r} = %rg{r}, %su{r} = %ru{r}")).collect::<Vec<_>>().join(", "),
            stail = r4(&|r| {
                format!(
                "    %xs{r} = memref.load {x}[%t{r}, %j] : {x_ty}\n    %mg{r} = arith.mulf %xs{r}, %gv : f32\n    %mu{r} = arith.mulf %xs{r}, %uv : f32\n    %ng{r} = arith.addf %sg{r}, %mg{r} : f32\n    %nu{r} = arith.addf %su{r}, %mu{r} : f32",
                x = x.0
            )
            }),
            syields = list4(&|r| format!("%ng{r}, %nu{r}")),
            silu = r4(&|r| {
                format!(
                "  %neg{r} = arith.negf %sa#{g} : f32\n  %ex{r} = math.exp %neg{r} : f32\n  %dn{r} = arith.addf %one, %ex{r} : f32\n  %sl{r} = arith.divf %sa#{g}, %dn{r} : f32\n  %hv{r} = arith.mulf %sl{r}, %sa#{u} : f32\n  memref.store %hv{r}, %h4[%c{r}, %i] : memref<4x{inter}xf32>",
                g = 2 * r,
                u = 2 * r + 1
            )
            }),
            vd_args = list4(&|r| format!("%ad{r} = %zv")),
            hload = r4(&|r| {
                format!(
                "    %hh{r} = vector.load %h4[%c{r}, %i] : memref<4x{inter}xf32>, {vf}\n    %fd{r} = vector.fma %hh{r}, %dvv, %ad{r} : {vf}"
            )
            }),
            dyields = list4(&|r| format!("%fd{r}")),
            dreduce = r4(&|r| format!("  %rd{r} = vector.reduction <add>, %vd#{r} : {vf} into f32")),
            sd_args = list4(&|r| format!("%td{r} = %rd{r}")),
            dtail = r4(&|r| {
                format!(
                "    %hs{r} = memref.load %h4[%c{r}, %i] : memref<4x{inter}xf32>\n    %md{r} = arith.mulf %hs{r}, %dv : f32\n    %nd{r} = arith.addf %td{r}, %md{r} : f32"
            )
            }),
            dsyields = list4(&|r| format!("%nd{r}")),
            accumulate = r4(&|r| {
                format!(
                "  %cur{r} = memref.load {dest}[%t{r}, %o] : {o_ty}\n  %wa{r} = arith.mulf %w{r}, %sd#{r} : f32\n  %sum{r} = arith.addf %cur{r}, %wa{r} : f32\n  memref.store %sum{r}, {dest}[%t{r}, %o] : {o_ty}"
            )
            }),
            gate = gate.0,
            up = up.0,
            down = down.0,
        );
        let single = format!(
            "%t = memref.load %list[%g] : memref<?xindex>
%wt = memref.load %wlist[%g] : memref<?xf32>
scf.for %i = %c0 to %ci step %c1 {{
  %vacc:2 = scf.for %j = %c0 to %cdv step %cl iter_args(%vg = %zv, %vu = %zv) -> ({vf}, {vf}) {{
    %xvv = vector.load {x}[%t, %j] : {x_ty}, {vf}
    %gv0 = vector.load {gate}[%e, %i, %j] : {g_ty}, vector<{LANES}x{gel}>
    {gwiden}
    %uv0 = vector.load {up}[%e, %i, %j] : {u_ty}, vector<{LANES}x{uel}>
    {uwiden}
    %fg = vector.fma %xvv, %gvv, %vg : {vf}
    %fu = vector.fma %xvv, %uvv, %vu : {vf}
    scf.yield %fg, %fu : {vf}, {vf}
  }}
  %sg0 = vector.reduction <add>, %vacc#0 : {vf} into f32
  %su0 = vector.reduction <add>, %vacc#1 : {vf} into f32
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
  %dacc = scf.for %i = %c0 to %civ step %cl iter_args(%vd = %zv) -> ({vf}) {{
    %hvv = vector.load %h[%i] : memref<{inter}xf32>, {vf}
    %dv0 = vector.load {down}[%e, %o, %i] : {dn_ty}, vector<{LANES}x{del}>
    {dwiden}
    %fd = vector.fma %hvv, %dvv, %vd : {vf}
    scf.yield %fd : {vf}
  }}
  %sd0 = vector.reduction <add>, %dacc : {vf} into f32
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
}}",
            x = x.0,
            gate = gate.0,
            up = up.0,
            down = down.0,
        );
        let text = format!(
            "scf.execute_region {{
%c0 = arith.constant 0 : index
%c1 = arith.constant 1 : index
%c2 = arith.constant 2 : index
%c3 = arith.constant 3 : index
%c4 = arith.constant 4 : index
%ci = arith.constant {inter} : index
%cd = arith.constant {d} : index
%ck = arith.constant {k} : index
%cne = arith.constant {experts} : index
%cdv = arith.constant {dv_main} : index
%civ = arith.constant {iv_main} : index
%cl = arith.constant {LANES} : index
%zv = arith.constant dense<0.0> : {vf}
%nt = memref.dim {x}, %c0 : {x_ty}
%nlist = arith.muli %nt, %ck : index
%list = memref.alloc(%nlist) : memref<?xindex>
%wlist = memref.alloc(%nlist) : memref<?xf32>
%h = memref.alloc() : memref<{inter}xf32>
%h4 = memref.alloc() : memref<4x{inter}xf32>
scf.for %t = %c0 to %nt step %c1 {{
  scf.for %o = %c0 to %cd step %c1 {{
    memref.store %zero, {dest}[%t, %o] : {o_ty}
  }}
}}
scf.for %e = %c0 to %cne step %c1 {{
  %cnt = scf.for %t = %c0 to %nt step %c1 iter_args(%n0 = %c0) -> (index) {{
    %n2 = scf.for %slot = %c0 to %ck step %c1 iter_args(%n1 = %n0) -> (index) {{
      %e32 = memref.load {idx}[%t, %slot] : {i_ty}
      %ei = arith.index_cast %e32 : i32 to index
      %hit = arith.cmpi eq, %ei, %e : index
      %nn = scf.if %hit -> (index) {{
        %wsel = memref.load {w}[%t, %slot] : {w_ty}
        memref.store %t, %list[%n1] : memref<?xindex>
        memref.store %wsel, %wlist[%n1] : memref<?xf32>
        %inc = arith.addi %n1, %c1 : index
        scf.yield %inc : index
      }} else {{
        scf.yield %n1 : index
      }}
      scf.yield %nn : index
    }}
    scf.yield %n2 : index
  }}
  %crem = arith.remui %cnt, %c4 : index
  %cnt4 = arith.subi %cnt, %crem : index
  scf.for %g = %c0 to %cnt4 step %c4 {{
{group}
  }}
  scf.for %g = %cnt4 to %cnt step %c1 {{
{single}
  }}
}}
memref.dealloc %h4 : memref<4x{inter}xf32>
memref.dealloc %h : memref<{inter}xf32>
memref.dealloc %wlist : memref<?xf32>
memref.dealloc %list : memref<?xindex>
scf.yield
}}",
            x = x.0,
            idx = idx.0,
            w = w.0,
            dv_main = d - d % LANES,
            iv_main = inter - inter % LANES,
            group = indent(&group, 4),
            single = indent(&single, 4),
        );
        self.line(&text);
    }
}
