//! The `fuse-moe` kernels: `moe_dispatch` (routing + the permutation by expert), and the grouped
//! GEMMs `moe_gate_up` (gathering permuted rows, SwiGLU) and `moe_down` (scattering into tokens'
//! rows with the routing weights, plus the residual).
//!
//! The grouped GEMMs are partitioned kernels: they take `%part, %parts` (the CPU's block index and
//! count) and compute the output columns of their share, so two threads write disjoint columns
//! of the same rows. Experts `0..E` read the stacked routed weights, experts `E..E+S` the shared
//! expert's (row blocks of [S*I, D] for gate/up, column blocks of [D, S*I] for down, both views).

use super::moe::RouteSpec;
use super::*;

/// Output columns a partition of a grouped GEMM owns: `[%lo, %hi)` of `n`, in `granule` steps.
pub(super) fn partition_range(n: usize, granule: usize, lo: &str, hi: &str) -> String {
    let granules = n.div_ceil(granule);
    format!(
        "{lo}pg = arith.constant {granules} : index
{lo}gr = arith.constant {granule} : index
{lo}n = arith.constant {n} : index
{lo}ch0 = arith.ceildivui {lo}pg, %parts : index
{lo}ch = arith.muli {lo}ch0, {lo}gr : index
{lo}0 = arith.muli %part, {lo}ch : index
{lo} = arith.minui {lo}0, {lo}n : index
{hi}0 = arith.addi {lo}, {lo}ch : index
{hi} = arith.minui {hi}0, {lo}n : index"
    )
}

/// Partition granule of the grouped gate/up GEMM: whole 1 x 128 groups, so that a quantization
/// of its output in the same kernel stays inside each partition's columns.
pub(super) const GATE_UP_GRANULE: usize = FP8_BLOCK;
/// Partition granule of the grouped down GEMM's output columns (whole 16-column tiles of the fp8
/// form, so that no tile straddles a 128-row weight scale block).
const DOWN_GRANULE: usize = 16;

use super::fp8::FP8_BLOCK;

/// A grouped GEMM's output columns in two halves at `granule` boundaries, the split the
/// partitioned kernels use: (half, first column, width), empty halves left out. Half h belongs
/// to share `h * parts / 2` (both halves to share 0 when the kernel runs whole).
fn halves(n: usize, granule: usize) -> Vec<(usize, usize, usize)> {
    let first = (n.div_ceil(granule).div_ceil(2) * granule).min(n);
    [(0, 0, first), (1, first, n - first)].into_iter().filter(|h| h.2 > 0).collect()
}

/// The index constants `%c<first>h` and `%c<width>w` the halves' code uses, each once.
fn half_constants(halves: &[(usize, usize, usize)]) -> Vec<String> {
    let mut consts: Vec<String> = Vec::new();
    for &(_, c0, w) in halves {
        for line in [format!("%c{c0}h = arith.constant {c0} : index"), format!("%c{w}w = arith.constant {w} : index")] {
            if !consts.contains(&line) {
                consts.push(line);
            }
        }
    }
    consts
}

/// `body` (the half's tiles), then `epilogue` for each column `%{var}` of the half, run only by
/// the share that owns half `h`.
fn owned_half((h, _, w): (usize, usize, usize), body: &str, var: &str, epilogue: &str) -> String {
    format!(
        "%own{h}a = arith.muli %parts, %c{h} : index\n%own{h}b = arith.divui %own{h}a, %c2 : index\n%own{h} = arith.cmpi eq, %own{h}b, %part : index\nscf.if %own{h} {{\n{}\nscf.for {var} = %c0 to %c{w}w step %c1 {{\n{epilogue}}}\n}}\n",
        indent(body, 2)
    )
}

/// Allocations of the kernel's scratch buffers `(name, type)` and their deallocations.
fn scratch(buffers: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let allocs = buffers.iter().map(|(n, t)| format!("{n} = memref.alloc() : {t}")).collect();
    let frees = buffers.iter().map(|(n, t)| format!("memref.dealloc {n} : {t}")).collect();
    (allocs, frees)
}

/// Operands of a grouped GEMM, by role.
pub(super) struct Grouped<'a> {
    pub(super) act: &'a (String, Shape),
    pub(super) act_scale: Option<&'a (String, Shape)>,
    pub(super) offsets: &'a (String, Shape),
    pub(super) rows: &'a (String, Shape),
    pub(super) experts: usize,
    pub(super) shared: usize,
}

impl Emitter {
    /// Routing as `route` does, then a counting sort of the (token, expert) pairs by expert:
    /// offsets per expert, and per permuted row its token and weight; shared experts take every
    /// token with weight 1 after the routed ones. Tokens stay in order within an expert.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dispatch(
        &mut self,
        r: &RouteSpec,
        shared: usize,
        x: &(String, Shape),
        gate: &(String, Shape),
        bias: &(String, Shape),
        outs: [(&str, &Shape); 3],
    ) {
        let experts = gate.1.dims[0].unwrap_or(0);
        let k = r.top_k;
        let pair = Shape { dims: vec![None, Some(k)], element: "i32".into() };
        let idx = self.alloc(&pair, x);
        let wshape = Shape { dims: vec![None, Some(k)], element: "f32".into() };
        let wts = self.alloc(&wshape, x);
        self.route(r, x, gate, bias, (&idx, &pair), (&wts, &wshape));
        let [(offsets, off_shape), (rows, rows_shape), (rw, rw_shape)] = outs;
        let width = rows_shape.dims[1].unwrap_or(0);
        let total = experts + shared;
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ck = arith.constant {k} : index
      %ce = arith.constant {experts} : index
      %cs = arith.constant {shared} : index
      %ctot = arith.constant {total} : index
      %nt = memref.dim {xv}, %c0 : {x_ty}
      %rflat = memref.collapse_shape {rows} [[0, 1]] : memref<?x{width}xi32> into memref<?xi32>
      %wflat = memref.collapse_shape {rw} [[0, 1]] : {rw_ty} into memref<?xf32>
      %cur = memref.alloc() : memref<{total_or_1}xindex>
      scf.for %e = %c0 to %ctot step %c1 {{
        %shared = arith.cmpi uge, %e, %ce : index
        %init = arith.select %shared, %nt, %c0 : index
        memref.store %init, %cur[%e] : memref<{total_or_1}xindex>
      }}
      scf.for %t = %c0 to %nt step %c1 {{
        scf.for %s = %c0 to %ck step %c1 {{
          %e32 = memref.load {idx}[%t, %s] : {i_ty}
          %e = arith.index_cast %e32 : i32 to index
          %n = memref.load %cur[%e] : memref<{total_or_1}xindex>
          %n1 = arith.addi %n, %c1 : index
          memref.store %n1, %cur[%e] : memref<{total_or_1}xindex>
        }}
      }}
      %end = scf.for %e = %c0 to %ctot step %c1 iter_args(%start = %c0) -> (index) {{
        %count = memref.load %cur[%e] : memref<{total_or_1}xindex>
        %s32 = arith.index_cast %start : index to i32
        memref.store %s32, {offsets}[%e] : {o_ty}
        memref.store %start, %cur[%e] : memref<{total_or_1}xindex>
        %next = arith.addi %start, %count : index
        scf.yield %next : index
      }}
      %end32 = arith.index_cast %end : index to i32
      memref.store %end32, {offsets}[%ctot] : {o_ty}
      scf.for %t = %c0 to %nt step %c1 {{
        %t32 = arith.index_cast %t : index to i32
        scf.for %s = %c0 to %ck step %c1 {{
          %e32 = memref.load {idx}[%t, %s] : {i_ty}
          %e = arith.index_cast %e32 : i32 to index
          %pos = memref.load %cur[%e] : memref<{total_or_1}xindex>
          %wv = memref.load {wts}[%t, %s] : {w_ty}
          memref.store %t32, %rflat[%pos] : memref<?xi32>
          memref.store %wv, %wflat[%pos] : memref<?xf32>
          %p1 = arith.addi %pos, %c1 : index
          memref.store %p1, %cur[%e] : memref<{total_or_1}xindex>
        }}
      }}
      scf.for %s = %c0 to %cs step %c1 {{
        %e = arith.addi %ce, %s : index
        %base = memref.load %cur[%e] : memref<{total_or_1}xindex>
        scf.for %t = %c0 to %nt step %c1 {{
          %t32 = arith.index_cast %t : index to i32
          %pos = arith.addi %base, %t : index
          memref.store %t32, %rflat[%pos] : memref<?xi32>
          memref.store %one, %wflat[%pos] : memref<?xf32>
        }}
      }}
      memref.dealloc %cur : memref<{total_or_1}xindex>
      scf.yield
    }}",
            xv = x.0,
            x_ty = memref(&x.1),
            rw_ty = memref(rw_shape),
            o_ty = memref(off_shape),
            i_ty = memref(&pair),
            w_ty = memref(&wshape),
            total_or_1 = total.max(1),
        ));
    }

    /// The frame both down GEMMs share: constants, the views of the permutation, the partition's
    /// columns of `dest` zeroed, the expert loop `body`, then `finish` (the residual).
    fn down_region(
        g: &Grouped,
        weights: &(String, Shape),
        (dest, o_ty, d): (&str, &str, usize),
        header: &str,
        pre: &str,
        body: &str,
        finish: &str,
    ) -> String {
        let width = g.rows.1.dims[1].unwrap_or(0);
        format!(
            "scf.execute_region {{
%c0 = arith.constant 0 : index
%c1 = arith.constant 1 : index
%c4 = arith.constant 4 : index
{header}
%rflat = memref.collapse_shape {rv} [[0, 1]] : memref<?x{width}xi32> into memref<?xi32>
%wflat = memref.collapse_shape {wv} [[0, 1]] : memref<?x{width}xf32> into memref<?xf32>
{range}
{pre}
%nt = memref.dim {dest}, %c0 : {o_ty}
scf.for %t = %c0 to %nt step %c1 {{
  scf.for %o = %olo to %ohi step %c1 {{
    memref.store %zero, {dest}[%t, %o] : {o_ty}
  }}
}}
{body}
{finish}
scf.yield
}}",
            rv = g.rows.0,
            wv = weights.0,
            range = partition_range(d, DOWN_GRANULE, "%olo", "%ohi"),
        )
    }

    /// After the scatter: out = residual + out on the partition's columns. With the experts summed
    /// in expert order from zero first, this is the order Hugging Face's DeepseekV3MoE adds in
    /// (index_add_ per expert, then + shared, then the residual add), which the reference follows.
    fn add_residual(residual: Option<&(String, Shape)>, dest: &str, o_ty: &str) -> String {
        let Some(r) = residual else { return String::new() };
        format!(
            "scf.for %t = %c0 to %nt step %c1 {{
  scf.for %o = %olo to %ohi step %c1 {{
    %rv = memref.load {}[%t, %o] : {}
    %mv = memref.load {dest}[%t, %o] : {o_ty}
    %sv = arith.addf %rv, %mv : f32
    memref.store %sv, {dest}[%t, %o] : {o_ty}
  }}
}}",
            r.0,
            memref(&r.1)
        )
    }

    /// Per expert `%e` inside the expert loop: `{name}` = the shared view `shared` for shared
    /// experts, else the routed weight; `pre` (before the loop) casts the routed weight to `ty`.
    fn select_weight(routed: &(String, Shape), shared: Option<&str>, ty: &str, name: &str) -> (String, String) {
        let pre = format!("{name}_r = memref.cast {} : {} to {ty}", routed.0, memref(&routed.1));
        let pick = match shared {
            Some(s) => format!(
                "{name} = scf.if %is_shared -> ({ty}) {{\n  scf.yield {s} : {ty}\n}} else {{\n  scf.yield {name}_r : {ty}\n}}"
            ),
            None => format!("{name} = memref.cast {name}_r : {ty} to {ty}"),
        };
        (pre, pick)
    }

    /// The expert loop shared by both grouped GEMMs: for each expert `%e` (routed then shared),
    /// `%is_shared`, `%ex` (index within its stack), `%glo..%ghi` its permuted rows, then `body4`
    /// on rows `%g..%g+3` and `body1` on leftover rows `%g`.
    fn expert_loop(g: &Grouped, picks: &str, body4: Option<&str>, body1: &str) -> String {
        let (rem, body4) = match body4 {
            Some(b) => ("arith.remui %gcount, %c4 : index", b),
            None => ("arith.addi %c0, %gcount : index", ""),
        };
        let rows = format!(
            "%gcount = arith.subi %ghi, %glo : index
%grem = {rem}
%g4 = arith.subi %ghi, %grem : index
scf.for %g = %glo to %g4 step %c4 {{
{}
}}
scf.for %g = %g4 to %ghi step %c1 {{
{}
}}",
            indent(body4, 2),
            indent(body1, 2),
        );
        Self::expert_ranges(g, picks, &rows)
    }

    /// Grouped gate/up GEMM with SwiGLU, f32 activations and f32/bf16 weights: rows of an expert
    /// four at a time (then one at a time) are gathered into a contiguous tile, and each half of the
    /// intermediate columns (whole 128-column groups; half `h` belongs to share `h * parts / 2`) is a
    /// pair of [`Emitter::gemm_tile`]s (gate, up) on the expert's weight rows, then SwiGLU into the
    /// permuted output rows.
    pub(super) fn gate_up(
        &mut self,
        g: &Grouped,
        [gate, up]: [&(String, Shape); 2],
        shared: Option<[&(String, Shape); 2]>,
        dest: &str,
        out: &Shape,
    ) {
        let (x, rows) = (g.act, g.rows);
        let (inter, d) = (gate.1.dims[1].unwrap_or(0), gate.1.dims[2].unwrap_or(0));
        let width = out.dims[1].unwrap_or(0);
        let el = storage(&gate.1.element).to_string();
        let wty = format!("memref<?x{inter}x{d}x{el}>");
        let mut pre = Vec::new();
        let mut views = [None, None];
        if let Some(sh) = shared {
            for (k, w) in sh.iter().enumerate() {
                let v = format!("%sh{k}");
                pre.push(format!(
                    "{v}3 = memref.expand_shape {} [[0, 1], [2]] output_shape [{s}, {inter}, {d}] : {} into memref<{s}x{inter}x{d}x{el}>\n{v} = memref.cast {v}3 : memref<{s}x{inter}x{d}x{el}> to {wty}",
                    w.0,
                    memref(&w.1),
                    s = g.shared
                ));
                views[k] = Some(v);
            }
        }
        let (pg, kg) = Self::select_weight(gate, views[0].as_deref(), &wty, "%wg");
        let (pu, ku) = Self::select_weight(up, views[1].as_deref(), &wty, "%wu");
        pre.extend([pg, pu]);
        let x_ty = memref(&x.1);
        // Halves of the intermediate columns at 128-column group boundaries.
        let halves = halves(inter, GATE_UP_GRANULE);
        let mut buffers = vec![
            ("%xg4".to_string(), format!("memref<4x{d}xf32>")),
            ("%xg1".to_string(), format!("memref<1x{d}xf32>")),
        ];
        for &(h, _, w) in &halves {
            for r in [4, 1] {
                for t in ["%gt", "%ut"] {
                    buffers.push((format!("{t}{r}_{h}"), format!("memref<{r}x{w}xf32>")));
                }
            }
        }
        let (temps, frees) = scratch(&buffers);
        // Rows %g.. of one expert: gather r rows, then per owned half gate and up tiles and SwiGLU.
        let mut group = |r: usize| {
            let mut t = String::new();
            for i in 0..r {
                t.push_str(&format!(
                    "%gi{i} = arith.addi %g, %c{i} : index\n%t{i}32 = memref.load %rflat[%gi{i}] : memref<?xi32>\n%t{i} = arith.index_cast %t{i}32 : i32 to index\n"
                ));
            }
            let copies: String = (0..r)
                .map(|i| format!("  %xv{i} = memref.load {xv}[%t{i}, %j] : {x_ty}\n  memref.store %xv{i}, %xg{r}[%c{i}, %j] : memref<{r}x{d}xf32>\n", xv = x.0))
                .collect();
            t.push_str(&format!(
                "scf.for %j = %c0 to %cd step %c1 {{\n{copies}}}\n%xgt = bufferization.to_tensor %xg{r} restrict : memref<{r}x{d}xf32> to tensor<{r}x{d}xf32>\n"
            ));
            for &(h, c0, w) in &halves {
                let sub = |wv: &str| {
                    format!("memref.subview {wv}[%ex, {c0}, 0] [1, {w}, {d}] [1, 1, 1] : {wty} to memref<{w}x{d}x{el}, strided<[{d}, 1], offset: ?>>")
                };
                let wsub_ty = format!("memref<{w}x{d}x{el}, strided<[{d}, 1], offset: ?>>");
                let tiles = [("%wg", "%gt", "g"), ("%wu", "%ut", "u")]
                    .iter()
                    .map(|(wv, dst, tag)| {
                        let sfx = format!("{tag}{r}_{h}");
                        format!(
                            "%ws{sfx} = {}\n{}\n{}",
                            sub(wv),
                            Self::gemm_weight(&format!("%ws{sfx}"), &wsub_ty, (w, d), &el, &format!("%w3{sfx}")),
                            self.gemm_tile(
                                ("%xgt", &format!("tensor<{r}x{d}xf32>")),
                                (&format!("{dst}{r}_{h}"), &format!("memref<{r}x{w}xf32>")),
                                &format!("%w3{sfx}"),
                                (r, w, d),
                                &el,
                                &sfx,
                            )
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let silu: String = (0..r)
                    .map(|i| {
                        format!(
                            "  %sg{i} = memref.load %gt{r}_{h}[%c{i}, %i] : memref<{r}x{w}xf32>\n  %su{i} = memref.load %ut{r}_{h}[%c{i}, %i] : memref<{r}x{w}xf32>\n  %sn{i} = arith.negf %sg{i} : f32\n  %se{i} = math.exp %sn{i} : f32\n  %sd{i} = arith.addf %one, %se{i} : f32\n  %ss{i} = arith.divf %sg{i}, %sd{i} : f32\n  %swi{i} = arith.mulf %ss{i}, %su{i} : f32\n  %col{i} = arith.addi %i, %c{c0}h : index\n  memref.store %swi{i}, %hflat[%gi{i}, %col{i}] : memref<?x{inter}xf32>\n"
                        )
                    })
                    .collect();
                t.push_str(&owned_half((h, c0, w), &tiles, "%i", &silu));
            }
            t
        };
        let (rows4, rows1) = (group(4), group(1));
        let consts: String = half_constants(&halves).iter().map(|l| format!("{l}\n")).collect();
        let body = Self::expert_loop(g, &format!("{kg}\n{ku}"), Some(&rows4), &rows1);
        self.line(&format!(
            "scf.execute_region {{
%c0 = arith.constant 0 : index
%c1 = arith.constant 1 : index
%c2 = arith.constant 2 : index
%c3 = arith.constant 3 : index
%c4 = arith.constant 4 : index
%cd = arith.constant {d} : index
%gz = arith.constant 0.0 : f32
{consts}%hflat = memref.collapse_shape {dest} [[0, 1], [2]] : {o_ty} into memref<?x{inter}xf32>
%rflat = memref.collapse_shape {rv} [[0, 1]] : memref<?x{width}xi32> into memref<?xi32>
{temps}
{pre}
{body}
{frees}
scf.yield
}}",
            o_ty = memref(out),
            rv = rows.0,
            temps = temps.join("\n"),
            pre = pre.join("\n"),
            frees = frees.join("\n"),
        ));
    }

    /// Grouped down GEMM with the combine: out = 0 on the partition's columns, then per expert,
    /// rows four at a time (then one at a time): per owned half of the output columns a
    /// [`Emitter::gemm_tile`] of the permuted rows (contiguous) against the expert's weight rows,
    /// scattered as out[token, o] += weight * tile[row, o]; then + residual.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn down(
        &mut self,
        g: &Grouped,
        weights: &(String, Shape),
        down: &(String, Shape),
        shared: Option<&(String, Shape)>,
        residual: Option<&(String, Shape)>,
        dest: &str,
        out: &Shape,
    ) {
        let (d, inter) = (down.1.dims[1].unwrap_or(0), down.1.dims[2].unwrap_or(0));
        let el = storage(&down.1.element).to_string();
        let wty = format!("memref<?x{d}x{inter}x{el}, strided<[?, ?, 1], offset: ?>>");
        let o_ty = memref(out);
        let mut pre = Vec::new();
        let view = shared.map(|sd| {
            let s = g.shared;
            pre.push(format!(
                "%sd3 = memref.expand_shape {} [[0], [1, 2]] output_shape [{d}, {s}, {inter}] : {} into memref<{d}x{s}x{inter}x{el}>
%sdt = memref.transpose %sd3 (d0, d1, d2) -> (d1, d0, d2) : memref<{d}x{s}x{inter}x{el}> to memref<{s}x{d}x{inter}x{el}, strided<[{inter}, {si}, 1]>>
%sdv = memref.cast %sdt : memref<{s}x{d}x{inter}x{el}, strided<[{inter}, {si}, 1]>> to {wty}",
                sd.0,
                memref(&sd.1),
                si = s * inter
            ));
            "%sdv".to_string()
        });
        let (pd, kd) = Self::select_weight(down, view.as_deref(), &wty, "%wd");
        pre.push(pd);
        let finish = Self::add_residual(residual, dest, &o_ty);
        // Halves of the output columns, at the partition's boundaries.
        let halves = halves(d, DOWN_GRANULE);
        let buffers: Vec<(String, String)> = halves
            .iter()
            .flat_map(|&(h, _, w)| [4, 1].map(|r| (format!("%dt{r}_{h}"), format!("memref<{r}x{w}xf32>"))))
            .collect();
        let (temps, frees) = scratch(&buffers);
        // Rows %g.. of one expert (contiguous in h): per owned half a GEMM tile on the expert's
        // weight rows, then each row's result scattered into its token's row with its weight.
        let mut group = |r: usize| {
            let mut t = String::new();
            for i in 0..r {
                t.push_str(&format!(
                    "%gi{i} = arith.addi %g, %c{i} : index\n%t{i}32 = memref.load %rflat[%gi{i}] : memref<?xi32>\n%t{i} = arith.index_cast %t{i}32 : i32 to index\n%w{i} = memref.load %wflat[%gi{i}] : memref<?xf32>\n"
                ));
            }
            let hs_ty = format!("memref<{r}x{inter}xf32, strided<[{inter}, 1], offset: ?>>");
            t.push_str(&format!(
                "%hrows = memref.subview %hflat[%g, 0] [{r}, {inter}] [1, 1] : memref<?x{inter}xf32> to {hs_ty}\n%hrt = bufferization.to_tensor %hrows restrict : {hs_ty} to tensor<{r}x{inter}xf32>\n"
            ));
            for &(h, c0, w) in &halves {
                let sfx = format!("d{r}_{h}");
                let wsub_ty = format!("memref<{w}x{inter}x{el}, strided<[?, 1], offset: ?>>");
                let tile = format!(
                    "%ws{sfx} = memref.subview %wd[%ex, {c0}, 0] [1, {w}, {inter}] [1, 1, 1] : {wty} to {wsub_ty}\n{}\n{}",
                    Self::gemm_weight(&format!("%ws{sfx}"), &wsub_ty, (w, inter), &el, &format!("%w3{sfx}")),
                    self.gemm_tile(
                        ("%hrt", &format!("tensor<{r}x{inter}xf32>")),
                        (&format!("%dt{r}_{h}"), &format!("memref<{r}x{w}xf32>")),
                        &format!("%w3{sfx}"),
                        (r, w, inter),
                        &el,
                        &sfx,
                    )
                );
                let scatter: String = (0..r)
                    .map(|i| {
                        format!(
                            "  %dv{i} = memref.load %dt{r}_{h}[%c{i}, %q] : memref<{r}x{w}xf32>\n  %oc{i} = arith.addi %q, %c{c0}h : index\n  %cur{i} = memref.load {dest}[%t{i}, %oc{i}] : {o_ty}\n  %wa{i} = arith.mulf %w{i}, %dv{i} : f32\n  %sum{i} = arith.addf %cur{i}, %wa{i} : f32\n  memref.store %sum{i}, {dest}[%t{i}, %oc{i}] : {o_ty}\n"
                        )
                    })
                    .collect();
                t.push_str(&owned_half((h, c0, w), &tile, "%q", &scatter));
            }
            t
        };
        let (rows4, rows1) = (group(4), group(1));
        let mut consts = vec![
            "%c2 = arith.constant 2 : index".to_string(),
            "%c3 = arith.constant 3 : index".to_string(),
            "%gz = arith.constant 0.0 : f32".to_string(),
        ];
        consts.extend(half_constants(&halves));
        pre.splice(0..0, temps.iter().cloned());
        let finish = format!("{finish}\n{}", frees.join("\n"));
        let body = Self::expert_loop(g, &kd, Some(&rows4), &rows1);
        let header = format!(
            "{}\n%hflat = memref.collapse_shape {hv} [[0, 1], [2]] : {h_ty} into memref<?x{inter}xf32>",
            consts.join("\n"),
            hv = g.act.0,
            h_ty = memref(&g.act.1),
        );
        self.line(&Self::down_region(g, weights, (dest, &o_ty, d), &header, &pre.join("\n"), &body, &finish));
    }

    /// fp8 views of the single shared expert's weight and block scales as one-expert stacks.
    fn shared_fp8_view(w: &(String, Shape), ty: &str, name: &str) -> String {
        let (a, b) = (w.1.dims[0].unwrap_or(0), w.1.dims[1].unwrap_or(0));
        let el = storage(&w.1.element);
        format!(
            "{name}3 = memref.expand_shape {} [[0, 1], [2]] output_shape [1, {a}, {b}] : {} into memref<1x{a}x{b}x{el}>\n{name} = memref.cast {name}3 : memref<1x{a}x{b}x{el}> to {ty}",
            w.0,
            memref(&w.1)
        )
    }

    /// Fills `tile` (`memref<{k}x16xf32>`) with 16 rows of an expert's fp8 weight, transposed so a
    /// K step reads the 16 values contiguously: row `c0 + c` (c < `jn`; the rest zero) decoded
    /// from `w_load` (`$r` the row, `$j` the K index), times its block scale when `scale_load` is
    /// given (`$b` the K block: the weight dequantized, for f32 activations).
    fn fp8_weight_tile(
        &mut self,
        tile: &str,
        k: usize,
        (c0, jn): (&str, &str),
        w_load: &str,
        scale_load: Option<&str>,
    ) -> String {
        let dec = self.decode();
        let p = tile.trim_start_matches('%');
        let value = match scale_load {
            Some(sl) => format!(
                "%{p}_q = func.call {dec}(%{p}_b) : (i8) -> f32
      %{p}_kb = arith.divui %{p}_j, %cblk : index
      %{p}_s = {}
      %{p}_v = arith.mulf %{p}_q, %{p}_s : f32",
                sl.replace("$b", &format!("%{p}_kb"))
            ),
            None => format!("%{p}_v = func.call {dec}(%{p}_b) : (i8) -> f32"),
        };
        format!(
            "%{p}_k = arith.constant {k} : index
scf.for %{p}_c = %c0 to %c16 step %c1 {{
  %{p}_live = arith.cmpi ult, %{p}_c, {jn} : index
  %{p}_r = arith.addi {c0}, %{p}_c : index
  scf.for %{p}_j = %c0 to %{p}_k step %c1 {{
    %{p}_w = scf.if %{p}_live -> (f32) {{
      %{p}_b = {}
      {value}
      scf.yield %{p}_v : f32
    }} else {{
      scf.yield %zero : f32
    }}
    memref.store %{p}_w, {tile}[%{p}_j, %{p}_c] : memref<{k}x16xf32>
  }}
}}",
            w_load.replace("$r", &format!("%{p}_r")).replace("$j", &format!("%{p}_j")),
        )
    }

    /// 16 dot products at once (one per lane, each in the reference's order) of an activation row
    /// (`a_at`, `$j` the K index) with a [`Emitter::fp8_weight_tile`]: with `scales` (activation,
    /// weight; `$b` the K block), per K block a sequential sum from zero, then `(part * a_s) * w_s`
    /// added; without, one sequential sum over the dequantized weights.
    fn fp8_dot16(
        acc: &str,
        (len, blocks): (usize, usize),
        a_at: &str,
        scales: Option<(&str, &str)>,
        tile: &str,
    ) -> String {
        let v = "vector<16xf32>";
        let step = |p: &str, j: &str| {
            format!(
                "%{acc}_x = {}
%{acc}_xv = vector.broadcast %{acc}_x : f32 to {v}
%{acc}_wv = vector.load {tile}[{j}, %c0] : memref<{len}x16xf32>, {v}
%{acc}_pr = arith.mulf %{acc}_xv, %{acc}_wv : {v}
%{acc}_np = arith.addf {p}, %{acc}_pr : {v}
scf.yield %{acc}_np : {v}",
                a_at.replace("$j", j)
            )
        };
        let Some((sa_at, sw_at)) = scales else {
            return format!(
                "%{acc}_len = arith.constant {len} : index
%{acc} = scf.for %{acc}_j = %c0 to %{acc}_len step %c1 iter_args(%{acc}_a = %vzero) -> ({v}) {{
{}
}}",
                indent(&step(&format!("%{acc}_a"), &format!("%{acc}_j")), 2)
            );
        };
        format!(
            "%{acc}_len = arith.constant {len} : index
%{acc}_nb = arith.constant {blocks} : index
%{acc} = scf.for %{acc}_b = %c0 to %{acc}_nb step %c1 iter_args(%{acc}_a = %vzero) -> ({v}) {{
  %{acc}_lo = arith.muli %{acc}_b, %cblk : index
  %{acc}_hi0 = arith.addi %{acc}_lo, %cblk : index
  %{acc}_hi = arith.minui %{acc}_hi0, %{acc}_len : index
  %{acc}_part = scf.for %{acc}_j = %{acc}_lo to %{acc}_hi step %c1 iter_args(%{acc}_p = %vzero) -> ({v}) {{
{}
  }}
  %{acc}_sa = {}
  %{acc}_sw = {}
  %{acc}_sav = vector.broadcast %{acc}_sa : f32 to {v}
  %{acc}_swv = vector.broadcast %{acc}_sw : f32 to {v}
  %{acc}_t1 = arith.mulf %{acc}_part, %{acc}_sav : {v}
  %{acc}_t2 = arith.mulf %{acc}_t1, %{acc}_swv : {v}
  %{acc}_na = arith.addf %{acc}_a, %{acc}_t2 : {v}
  scf.yield %{acc}_na : {v}
}}",
            indent(&step(&format!("%{acc}_p"), &format!("%{acc}_j")), 4),
            sa_at.replace("$b", &format!("%{acc}_b")),
            sw_at.replace("$b", &format!("%{acc}_b")),
        )
    }

    /// Per expert `%e` (`%ex` its weight index, `picks` selecting its weights): its permuted rows
    /// `[%glo, %ghi)`, then `body`.
    fn expert_ranges(g: &Grouped, picks: &str, body: &str) -> String {
        format!(
            "%ce = arith.constant {experts} : index
%ctot = arith.constant {total} : index
scf.for %e = %c0 to %ctot step %c1 {{
  %is_shared = arith.cmpi uge, %e, %ce : index
  %es = arith.subi %e, %ce : index
  %ex = arith.select %is_shared, %es, %e : index
{picks}
  %e1 = arith.addi %e, %c1 : index
  %glo32 = memref.load {off}[%e] : {off_ty}
  %ghi32 = memref.load {off}[%e1] : {off_ty}
  %glo = arith.index_cast %glo32 : i32 to index
  %ghi = arith.index_cast %ghi32 : i32 to index
{body}
}}",
            experts = g.experts,
            total = g.experts + g.shared,
            off = g.offsets.0,
            off_ty = memref(&g.offsets.1),
            picks = indent(picks, 2),
            body = indent(body, 2),
        )
    }

    /// Decodes `src` (`memref<?x{k}xi8>`, e4m3) into a new f32 buffer `dst` of the same shape.
    fn decode_rows(&mut self, src: &str, src_ty: &str, dst: &str, k: usize) -> String {
        let dec = self.decode();
        let p = dst.trim_start_matches('%');
        format!(
            "%{p}_n = memref.dim {src}, %c0 : {src_ty}
{dst} = memref.alloc(%{p}_n) : memref<?x{k}xf32>
%{p}_k = arith.constant {k} : index
scf.for %{p}_m = %c0 to %{p}_n step %c1 {{
  scf.for %{p}_i = %c0 to %{p}_k step %c1 {{
    %{p}_b = memref.load {src}[%{p}_m, %{p}_i] : {src_ty}
    %{p}_v = func.call {dec}(%{p}_b) : (i8) -> f32
    memref.store %{p}_v, {dst}[%{p}_m, %{p}_i] : memref<?x{k}xf32>
  }}
}}"
        )
    }

    /// Grouped gate/up on fp8 expert weights: gathered rows of the quantized activations (e4m3 +
    /// 1 x 128 scales) in block-scaled dot products, or (no activation scales) f32 rows against the
    /// weights dequantized as read; f32 SwiGLU output (fp8: quantized by the kernel's epilogue).
    pub(super) fn gate_up_fp8(
        &mut self,
        g: &Grouped,
        w: [&(String, Shape); 4],
        shared: Option<[&(String, Shape); 4]>,
        dest: &str,
        out: &Shape,
    ) {
        let [gate, up, gs, us] = w;
        let x = g.act;
        let (inter, d) = (gate.1.dims[1].unwrap_or(0), gate.1.dims[2].unwrap_or(0));
        let (ib, db) = (inter.div_ceil(FP8_BLOCK), d.div_ceil(FP8_BLOCK));
        let width = out.dims[1].unwrap_or(0);
        let wty = format!("memref<?x{inter}x{d}xi8>");
        let sty = format!("memref<?x{ib}x{db}xf32>");
        let mut pre = Vec::new();
        let mut views: [Option<String>; 4] = Default::default();
        if let Some(sh) = shared {
            for (k, w) in sh.iter().enumerate() {
                let name = format!("%sh{k}");
                pre.push(Self::shared_fp8_view(w, if k < 2 { &wty } else { &sty }, &name));
                views[k] = Some(name);
            }
        }
        let mut picks = Vec::new();
        for (k, (w, name)) in [(gate, "%wg"), (up, "%wu"), (gs, "%wgs"), (us, "%wus")].into_iter().enumerate() {
            let (p, pick) = Self::select_weight(w, views[k].as_deref(), if k < 2 { &wty } else { &sty }, name);
            pre.push(p);
            picks.push(pick);
        }
        // Vectorized across 16 intermediate columns (one lane each, the reference's order per
        // lane): per expert and column tile, the gate and up weight rows decoded once into
        // transposed tiles; fp8 activations decoded once per launch.
        let fp8_act = g.act_scale.is_some();
        let (x_pre, x_at) = if fp8_act {
            (self.decode_rows(&x.0, &memref(&x.1), "%xf", d), format!("memref.load %xf[%t, $j] : memref<?x{d}xf32>"))
        } else {
            (String::new(), format!("memref.load {}[%t, $j] : {}", x.0, memref(&x.1)))
        };
        // f32 activations read the weights dequantized; a tile's 16 rows share scale row block %ib.
        let dequant = |scale: &str| (!fp8_act).then(|| format!("memref.load {scale}[%ex, %ib, $b] : {sty}"));
        let (gate_scale, up_scale) = (dequant("%wgs"), dequant("%wus"));
        let gate_w = format!("memref.load %wg[%ex, $r, $j] : {wty}");
        let up_w = format!("memref.load %wu[%ex, $r, $j] : {wty}");
        let gate_tile = self.fp8_weight_tile("%wgt", d, ("%i0", "%jn"), &gate_w, gate_scale.as_deref());
        let up_tile = self.fp8_weight_tile("%wut", d, ("%i0", "%jn"), &up_w, up_scale.as_deref());
        let scales = |w: &str| {
            g.act_scale.map(|xs| {
                (
                    format!("memref.load {}[%t, $b] : {}", xs.0, memref(&xs.1)),
                    format!("memref.load {w}[%ex, %ib, $b] : {sty}"),
                )
            })
        };
        let (sg, su) = (scales("%wgs"), scales("%wus"));
        let dot_g = Self::fp8_dot16("dg", (d, db), &x_at, sg.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), "%wgt");
        let dot_u = Self::fp8_dot16("du", (d, db), &x_at, su.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), "%wut");
        let v = "vector<16xf32>";
        let tiles = format!(
            "%span = arith.subi %ihi, %ilo : index
%ntiles = arith.ceildivui %span, %c16 : index
scf.for %it = %c0 to %ntiles step %c1 {{
  %i0o = arith.muli %it, %c16 : index
  %i0 = arith.addi %ilo, %i0o : index
  %left = arith.subi %ihi, %i0 : index
  %jn = arith.minui %left, %c16 : index
  %ib = arith.divui %i0, %cblk : index
{gate_tile}
{up_tile}
  %mask = vector.create_mask %jn : vector<16xi1>
  scf.for %g = %glo to %ghi step %c1 {{
    %t32 = memref.load %rflat[%g] : memref<?xi32>
    %t = arith.index_cast %t32 : i32 to index
{dot_g}
{dot_u}
    %neg = arith.negf %dg : {v}
    %exn = math.exp %neg : {v}
    %dn = arith.addf %vone, %exn : {v}
    %sg = arith.divf %dg, %dn : {v}
    %hv = arith.mulf %sg, %du : {v}
    vector.maskedstore %hflat[%g, %i0], %mask, %hv : memref<?x{inter}xf32>, vector<16xi1>, {v}
  }}
}}",
            gate_tile = indent(&gate_tile, 2),
            up_tile = indent(&up_tile, 2),
            dot_g = indent(&dot_g, 4),
            dot_u = indent(&dot_u, 4),
        );
        let body = Self::expert_ranges(g, &picks.join("\n"), &tiles);
        let free = if fp8_act { format!("memref.dealloc %xf : memref<?x{d}xf32>") } else { String::new() };
        self.line(&format!(
            "scf.execute_region {{
%c0 = arith.constant 0 : index
%c1 = arith.constant 1 : index
%c16 = arith.constant 16 : index
%cblk = arith.constant {FP8_BLOCK} : index
%vzero = arith.constant dense<0.0> : vector<16xf32>
%vone = arith.constant dense<1.0> : vector<16xf32>
%hflat = memref.collapse_shape {dest} [[0, 1], [2]] : {o_ty} into memref<?x{inter}xf32>
%rflat = memref.collapse_shape {rv} [[0, 1]] : memref<?x{width}xi32> into memref<?xi32>
{range}
{pre}
{x_pre}
%wgt = memref.alloc() : memref<{d}x16xf32>
%wut = memref.alloc() : memref<{d}x16xf32>
{body}
memref.dealloc %wgt : memref<{d}x16xf32>
memref.dealloc %wut : memref<{d}x16xf32>
{free}
scf.yield
}}",
            o_ty = memref(out),
            rv = g.rows.0,
            range = partition_range(inter, GATE_UP_GRANULE, "%ilo", "%ihi"),
            pre = pre.join("\n"),
        ));
    }

    /// Grouped down GEMM with the combine on fp8 expert weights: quantized permuted rows (e4m3 +
    /// 1 x 128 scales) block-scaled, or f32 rows against dequantized weights; scattered with the
    /// row weights, then the residual added.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn down_fp8(
        &mut self,
        g: &Grouped,
        weights: &(String, Shape),
        [down, ds]: [&(String, Shape); 2],
        shared: Option<[&(String, Shape); 2]>,
        residual: Option<&(String, Shape)>,
        dest: &str,
        out: &Shape,
    ) {
        let (d, inter) = (down.1.dims[1].unwrap_or(0), down.1.dims[2].unwrap_or(0));
        let (ib, db) = (inter.div_ceil(FP8_BLOCK), d.div_ceil(FP8_BLOCK));
        let h = g.act;
        let wty = format!("memref<?x{d}x{inter}xi8>");
        let sty = format!("memref<?x{db}x{ib}xf32>");
        let o_ty = memref(out);
        let mut pre = Vec::new();
        let mut views: [Option<String>; 2] = Default::default();
        if let Some(sh) = shared {
            for (k, w) in sh.iter().enumerate() {
                let name = format!("%sh{k}");
                pre.push(Self::shared_fp8_view(w, if k == 0 { &wty } else { &sty }, &name));
                views[k] = Some(name);
            }
        }
        let mut picks = Vec::new();
        for (k, (w, name)) in [(down, "%wd"), (ds, "%wds")].into_iter().enumerate() {
            let (p, pick) = Self::select_weight(w, views[k].as_deref(), if k == 0 { &wty } else { &sty }, name);
            pre.push(p);
            picks.push(pick);
        }
        // Vectorized across 16 output columns as the gate/up GEMM is: per expert and column tile
        // (tiles of 16 inside one 128-row scale block), the down weight rows decoded once into a
        // transposed tile; fp8 permuted rows decoded once per launch.
        let h_el = storage(&h.1.element).to_string();
        let fp8_act = g.act_scale.is_some();
        let (h_pre, h_at) = if fp8_act {
            (
                self.decode_rows("%hq", &format!("memref<?x{inter}x{h_el}>"), "%hf", inter),
                format!("memref.load %hf[%g, $j] : memref<?x{inter}xf32>"),
            )
        } else {
            (String::new(), format!("memref.load %hq[%g, $j] : memref<?x{inter}x{h_el}>"))
        };
        let scale = (!fp8_act).then(|| format!("memref.load %wds[%ex, %ob, $b] : {sty}"));
        let down_w = format!("memref.load %wd[%ex, $r, $j] : {wty}");
        let tile = self.fp8_weight_tile("%wdt", inter, ("%o0", "%jn"), &down_w, scale.as_deref());
        let scales = g.act_scale.map(|_| {
            (format!("memref.load %hs[%g, $b] : memref<?x{ib}xf32>"), format!("memref.load %wds[%ex, %ob, $b] : {sty}"))
        });
        let pair = scales.as_ref().map(|(a, b)| (a.as_str(), b.as_str()));
        let dot = Self::fp8_dot16("dd", (inter, ib), &h_at, pair, "%wdt");
        let finish = Self::add_residual(residual, dest, &o_ty);
        let v = "vector<16xf32>";
        let tiles = format!(
            "%span = arith.subi %ohi, %olo : index
%ntiles = arith.ceildivui %span, %c16 : index
scf.for %it = %c0 to %ntiles step %c1 {{
  %o0o = arith.muli %it, %c16 : index
  %o0 = arith.addi %olo, %o0o : index
  %left = arith.subi %ohi, %o0 : index
  %jn = arith.minui %left, %c16 : index
  %ob = arith.divui %o0, %cblk : index
{tile}
  %mask = vector.create_mask %jn : vector<16xi1>
  scf.for %g = %glo to %ghi step %c1 {{
    %t32 = memref.load %rflat[%g] : memref<?xi32>
    %t = arith.index_cast %t32 : i32 to index
    %wt = memref.load %wflat[%g] : memref<?xf32>
{dot}
    %cur = vector.maskedload {dest}[%t, %o0], %mask, %vzero : {o_ty}, vector<16xi1>, {v} into {v}
    %wtv = vector.broadcast %wt : f32 to {v}
    %wa = arith.mulf %wtv, %dd : {v}
    %sum = arith.addf %cur, %wa : {v}
    vector.maskedstore {dest}[%t, %o0], %mask, %sum : {o_ty}, vector<16xi1>, {v}
  }}
}}",
            tile = indent(&tile, 2),
            dot = indent(&dot, 4),
        );
        let free = if fp8_act { format!("memref.dealloc %hf : memref<?x{inter}xf32>") } else { String::new() };
        let body = format!(
            "{h_pre}\n%wdt = memref.alloc() : memref<{inter}x16xf32>\n{}\nmemref.dealloc %wdt : memref<{inter}x16xf32>\n{free}",
            Self::expert_ranges(g, &picks.join("\n"), &tiles)
        );
        let header = format!(
            "%cblk = arith.constant {FP8_BLOCK} : index
%c16 = arith.constant 16 : index
%vzero = arith.constant dense<0.0> : vector<16xf32>
%hq = memref.collapse_shape {hv} [[0, 1], [2]] : {h_ty} into memref<?x{inter}x{h_el}>
{hs_view}",
            hv = h.0,
            h_ty = memref(&h.1),
            hs_view = g.act_scale.map_or(String::new(), |hs| format!(
                "%hs = memref.collapse_shape {} [[0, 1], [2]] : {} into memref<?x{ib}xf32>",
                hs.0,
                memref(&hs.1)
            )),
        );
        self.line(&Self::down_region(g, weights, (dest, &o_ty, d), &header, &pre.join("\n"), &body, &finish));
    }
}
