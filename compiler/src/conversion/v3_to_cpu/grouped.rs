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

use super::fp8::{DECODE_BODY, FP8_BLOCK};
use super::rows::{lanes, RowTile};

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
        bias: Option<&(String, Shape)>,
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

    /// Per expert `%expert` inside the expert loop: `{name}` = the shared view `shared` for shared
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

    /// The expert loop shared by both grouped GEMMs: for each expert `%expert` (routed then shared),
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

    /// The decoded weights of output columns `j0 .. j0 + width` of an expert's e4m3 `stack`
    /// (`[E, N, K]`, a tensor value of `stack_ty`; `%ex` the expert), transposed as the fp8 GEMM
    /// template reads them: `[KB, BL, width]` with `k = b * BL + kk` (zero past K), written by a
    /// tagged row template into the scratch buffer `buf` and returned as the tensor `%wt{sfx}`.
    /// With `scales` (the stack's block scales, a tensor value and type) each weight is
    /// dequantized (times its 128 x 128 block's scale), as f32 activations read them.
    fn expert_weight_tile(
        &mut self,
        (stack, stack_ty): (&str, &str),
        scales: Option<(&str, &str)>,
        (j0, width, k): (&str, usize, usize),
        (kb, bl): (usize, usize),
        (buf, sfx): (&str, &str),
    ) -> String {
        let tile_ty = format!("tensor<{kb}x{bl}x{width}xf32>");
        let buf_ty = format!("memref<{kb}x{bl}x{width}xf32>");
        if scales.is_none() && bl == FP8_BLOCK && k.is_multiple_of(FP8_BLOCK) {
            // Contiguous rows read and transposed in registers (`fp8_tiled::transpose_script`).
            let slice = format!(
                "%ws{sfx}r = tensor.extract_slice {stack}[%ex, {j0}, 0] [1, {width}, {k}] [1, 1, 1] : {stack_ty} to tensor<{width}x{k}xi8>"
            );
            let decode = self.transposed_decode(sfx, &format!("%ws{sfx}r"), (k, width), (buf, &buf_ty));
            return format!(
                "{slice}\n{decode}\n%wt{sfx} = bufferization.to_tensor {buf} restrict : {buf_ty} to {tile_ty}"
            );
        }
        let mut body = format!(
            "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%i2 = linalg.index 2 : index\n%col = arith.addi {j0}, %i2 : index\n%blk = arith.constant {FP8_BLOCK} : index\n%kbase = arith.muli %i0, %cbl : index\n%k = arith.addi %kbase, %i1 : index\n"
        );
        let ragged = kb * bl != k;
        if ragged {
            body.push_str(&format!(
                "%klen = arith.constant {k} : index\n%kin = arith.cmpi ult, %k, %klen : index\n%k0 = arith.constant 0 : index\n%kc = arith.select %kin, %k, %k0 : index\n"
            ));
        }
        let kk = if ragged { "%kc" } else { "%k" };
        body.push_str(&format!("%b = tensor.extract {stack}[%ex, %col, {kk}] : {stack_ty}\n{DECODE_BODY}\n"));
        let mut result = "%r";
        if let Some((st, st_ty)) = scales {
            body.push_str(&format!(
                "%nb = arith.divui %col, %blk : index\n%sb = arith.divui {kk}, %blk : index\n%sc = tensor.extract {st}[%ex, %nb, %sb] : {st_ty}\n%dq = arith.mulf %r, %sc : f32\n"
            ));
            result = "%dq";
        }
        if ragged {
            body.push_str(&format!("%y = arith.select %kin, {result}, %zero : f32\n"));
            result = "%y";
        }
        let tile =
            RowTile { sizes: vec![1, 1, lanes(Some(width))], fill_operand: None, interchange: false, reduced: 1 };
        self.use_tile(tile.clone());
        format!(
            "%cbl{sfx} = arith.constant {bl} : index
%we{sfx} = tensor.empty() : {tile_ty}
%wd{sfx} = linalg.generic {{indexing_maps = [{out}], iterator_types = [\"parallel\", \"parallel\", \"parallel\"]}} outs(%we{sfx} : {tile_ty}) attrs = {{v3c.rows = \"{tag}\"}} {{
^bb0(%c: f32):
{body}  linalg.yield {result} : f32
}} -> {tile_ty}
bufferization.materialize_in_destination %wd{sfx} in restrict writable {buf} : ({tile_ty}, {buf_ty}) -> ()
%wt{sfx} = bufferization.to_tensor {buf} restrict : {buf_ty} to {tile_ty}",
            out = identity(3),
            tag = tile.tag(),
            body = indent(&body.replace("%cbl", &format!("%cbl{sfx}")), 2),
        )
    }

    /// Output columns `[lo, hi)` of a partition of an `n`-column grouped fp8 GEMM in tiles of 16
    /// (the partition bounds are multiples of 16 or `n`), then the narrower last tile when
    /// `n % 16 != 0` and the partition ends at `n`: `tile(j0, width)` gives a tile's code.
    fn column_tiles(n: usize, (lo, hi): (&str, &str), tile: &mut dyn FnMut(&str, usize) -> String) -> String {
        let (full, tail) = (n - n % 16, n % 16);
        let mut text = format!(
            "%cfull = arith.constant {full} : index
%fhi = arith.minui {hi}, %cfull : index
scf.for %j0 = {lo} to %fhi step %c16 {{
{}
}}
",
            indent(&tile("%j0", 16), 2)
        );
        if tail > 0 {
            text.push_str(&format!(
                "%cn = arith.constant {n} : index
%owns_tail = arith.cmpi eq, {hi}, %cn : index
scf.if %owns_tail {{
  %jt = arith.constant {full} : index
{}
}}
",
                indent(&tile("%jt", tail), 2)
            ));
        }
        text
    }

    /// The activations of a grouped fp8 GEMM, decoded once per launch as the template reads them:
    /// `%xp` [P, KB, BL] f32 (P = the permuted rows, `k = b * BL + kk`, zero past K) and, with
    /// block-scaled activations, `%xsp` [P, KB]; `token` gathers row p from row `rflat[p]` of
    /// `x` (the gate/up GEMM), else row p itself (the down GEMM). Returns the text, the buffers
    /// to free, and the tensors (`%xpt`, `%xspt` or the given scales tensor).
    #[allow(clippy::too_many_arguments)]
    fn grouped_activations(
        &mut self,
        (x, x_el): (&str, &str),
        scales: Option<(&str, usize)>,
        (k, kb, bl): (usize, usize, usize),
        token: bool,
    ) -> (String, Vec<String>) {
        let x_ty = format!("memref<?x{k}x{}>", storage(x_el));
        let xt_ty = format!("tensor<?x{k}x{}>", storage(x_el));
        let row = if token { "%tok" } else { "%i0" };
        let gather = if token {
            "%tok32 = tensor.extract %rflatt[%i0] : tensor<?xi32>\n%tok = arith.index_cast %tok32 : i32 to index\n"
        } else {
            ""
        };
        let mut text = format!(
            "%np = memref.dim %rflat, %c0 : memref<?xi32>
%rflatt = bufferization.to_tensor %rflat restrict : memref<?xi32> to tensor<?xi32>
%xin = bufferization.to_tensor {x} restrict : {x_ty} to {xt_ty}
%xp = memref.alloc(%np) : memref<?x{kb}x{bl}xf32>
"
        );
        let mut frees = vec![format!("memref.dealloc %xp : memref<?x{kb}x{bl}xf32>")];
        // e4m3 activations are block-scaled: `bl` is the 128-wide block `decode_at` reads in.
        let value = if x_el == "f8E4M3FN" || x_el == "i8" {
            let (body, result) = super::fp8_tiled::decode_at("%xin", &xt_ty, row, ("%i1", "%i2"), k);
            (body + "\n", result)
        } else {
            (format!("%b = tensor.extract %xin[{row}, %i2] : {xt_ty}\n"), "%b")
        };
        let tile = RowTile { sizes: vec![1, 1, lanes(Some(bl))], fill_operand: None, interchange: false, reduced: 1 };
        self.use_tile(tile.clone());
        let ty = format!("tensor<?x{kb}x{bl}xf32>");
        text.push_str(&format!(
            "%xpe = tensor.empty(%np) : {ty}
%xpd = linalg.generic {{indexing_maps = [{out}], iterator_types = [\"parallel\", \"parallel\", \"parallel\"]}} outs(%xpe : {ty}) attrs = {{v3c.rows = \"{tag}\"}} {{
^bb0(%c: f32):
  %i0 = linalg.index 0 : index
  %i1 = linalg.index 1 : index
  %i2 = linalg.index 2 : index
{gather}{body}  linalg.yield {result} : f32
}} -> {ty}
bufferization.materialize_in_destination %xpd in restrict writable %xp : ({ty}, memref<?x{kb}x{bl}xf32>) -> ()
%xpt = bufferization.to_tensor %xp restrict : memref<?x{kb}x{bl}xf32> to {ty}
",
            out = identity(3),
            tag = tile.tag(),
            gather = indent(gather, 2),
            body = indent(&value.0, 2),
            result = value.1,
        ));
        if let Some((xs, cols)) = scales {
            let s_ty = format!("memref<?x{cols}xf32>");
            let st_ty = format!("tensor<?x{cols}xf32>");
            if token {
                let tile =
                    RowTile { sizes: vec![1, lanes(Some(kb))], fill_operand: None, interchange: false, reduced: 1 };
                self.use_tile(tile.clone());
                text.push_str(&format!(
                    "%xsin = bufferization.to_tensor {xs} restrict : {s_ty} to {st_ty}
%xsp = memref.alloc(%np) : memref<?x{kb}xf32>
%xspe = tensor.empty(%np) : tensor<?x{kb}xf32>
%xspd = linalg.generic {{indexing_maps = [{out}], iterator_types = [\"parallel\", \"parallel\"]}} outs(%xspe : tensor<?x{kb}xf32>) attrs = {{v3c.rows = \"{tag}\"}} {{
^bb0(%c: f32):
  %i0 = linalg.index 0 : index
  %i1 = linalg.index 1 : index
  %tok32 = tensor.extract %rflatt[%i0] : tensor<?xi32>
  %tok = arith.index_cast %tok32 : i32 to index
  %sv = tensor.extract %xsin[%tok, %i1] : {st_ty}
  linalg.yield %sv : f32
}} -> tensor<?x{kb}xf32>
bufferization.materialize_in_destination %xspd in restrict writable %xsp : (tensor<?x{kb}xf32>, memref<?x{kb}xf32>) -> ()
%xspt = bufferization.to_tensor %xsp restrict : memref<?x{kb}xf32> to tensor<?x{kb}xf32>
",
                    out = identity(2),
                    tag = tile.tag(),
                ));
                frees.push(format!("memref.dealloc %xsp : memref<?x{kb}xf32>"));
            } else {
                text.push_str(&format!("%xspt = bufferization.to_tensor {xs} restrict : {s_ty} to {st_ty}\n"));
            }
        }
        (text, frees)
    }

    /// Per expert `%expert` (`%ex` its weight index, `picks` selecting its weights): its permuted rows
    /// `[%glo, %ghi)`, then `body`.
    fn expert_ranges(g: &Grouped, picks: &str, body: &str) -> String {
        format!(
            "%ce = arith.constant {experts} : index
%ctot = arith.constant {total} : index
scf.for %expert = %c0 to %ctot step %c1 {{
  %is_shared = arith.cmpi uge, %expert, %ce : index
  %eshared = arith.subi %expert, %ce : index
  %ex = arith.select %is_shared, %eshared, %expert : index
{picks}
  %enext = arith.addi %expert, %c1 : index
  %glo32 = memref.load {off}[%expert] : {off_ty}
  %ghi32 = memref.load {off}[%enext] : {off_ty}
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

    /// The per-expert frame of a grouped fp8 GEMM: for an expert with rows (`%gn` of them from
    /// `%glo`), the tensors of its weight stacks (`(memref, its type, tensor name)`), its rows of
    /// the activations (`%xe`, and `%xse` the scales), then `tiles`.
    fn fp8_expert(stacks: &[(&str, &str, &str)], (kb, bl): (usize, usize), scaled: bool, tiles: &str) -> String {
        let tensors: String = stacks
            .iter()
            .map(|(m, ty, t)| {
                format!("{t} = bufferization.to_tensor {m} restrict : {ty} to {}\n", ty.replacen("memref", "tensor", 1))
            })
            .collect();
        let xse = if scaled {
            format!("%xse = tensor.extract_slice %xspt[%glo, 0] [%gn, {kb}] [1, 1] : tensor<?x{kb}xf32> to tensor<?x{kb}xf32>\n")
        } else {
            String::new()
        };
        format!(
            "%gn = arith.subi %ghi, %glo : index
%some = arith.cmpi ugt, %gn, %c0 : index
scf.if %some {{
{}
}}",
            indent(
                &format!(
                    "{tensors}%xe = tensor.extract_slice %xpt[%glo, 0, 0] [%gn, {kb}, {bl}] [1, 1, 1] : tensor<?x{kb}x{bl}xf32> to tensor<?x{kb}x{bl}xf32>\n{xse}{tiles}"
                ),
                2
            )
        )
    }

    /// One column tile of a grouped fp8 GEMM for the expert `%ex`: the stack's weights for
    /// columns `j0 ..` decoded (dequantized for f32 activations) into the scratch `%wb{name}{w}`,
    /// the tile's product with the expert's rows `%xe` through the fp8 GEMM template (block-scaled
    /// with `%xse` and the weights' scales for fp8 activations) into rows `%glo ..` of the scratch
    /// `%y{name}b` ([P, 16]); returns the text and the subview of the result.
    #[allow(clippy::too_many_arguments)]
    fn fp8_expert_tile(
        &mut self,
        name: &str,
        (stack, scales): (&str, &str),
        (n, k): (usize, usize),
        (kb, bl): (usize, usize),
        scaled: bool,
        (j0, w): (&str, usize),
    ) -> (String, String) {
        let (nb, kbs) = (n.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK));
        let stack_ty = format!("tensor<?x{n}x{k}xi8>");
        let scales_ty = format!("tensor<?x{nb}x{kbs}xf32>");
        let sfx = format!("{name}{w}");
        let decode = self.expert_weight_tile(
            (stack, &stack_ty),
            (!scaled).then_some((scales, scales_ty.as_str())),
            (j0, w, k),
            (kb, bl),
            (&format!("%wb{sfx}"), &sfx),
        );
        let ys_ty = format!("memref<?x{w}xf32, strided<[16, 1], offset: ?>>");
        let mut text = format!(
            "{decode}\n%ys{sfx} = memref.subview %y{name}b[%glo, 0] [%gn, {w}] [1, 1] : memref<?x16xf32> to {ys_ty}\n"
        );
        let ws = format!("%ws{sfx}");
        if scaled {
            text.push_str(&format!(
                "%nb{sfx} = arith.divui {j0}, %cblk : index\n{ws} = tensor.extract_slice {scales}[%ex, %nb{sfx}, 0] [1, 1, {kbs}] [1, 1, 1] : {scales_ty} to tensor<{kbs}xf32>\n"
            ));
        }
        let xs_ty = format!("tensor<?x{kb}xf32>");
        let generics = self.tile_generics(
            &sfx,
            "%gn",
            ("%xe", &format!("tensor<?x{kb}x{bl}xf32>")),
            (&format!("%wt{sfx}"), "f32"),
            scaled.then_some(("%xse", xs_ty.as_str(), ws.as_str())),
            (kb, Some(bl), w),
            (&format!("%ys{sfx}"), &ys_ty),
        );
        text.push_str(&generics);
        (text, format!("%ys{sfx}"))
    }

    /// Scratch buffers of the grouped fp8 GEMMs: per named stack the weight tiles (full and, when
    /// `n % 16 != 0`, the narrower last one) and the [P, 16] tile results (`%np` rows).
    fn fp8_scratch(names: &[&str], n: usize, (kb, bl): (usize, usize)) -> (String, String) {
        let mut buffers = Vec::new();
        for name in names {
            for w in [16, n % 16].into_iter().filter(|w| *w > 0) {
                buffers.push((format!("%wb{name}{w}"), format!("memref<{kb}x{bl}x{w}xf32>")));
            }
        }
        let (mut allocs, mut frees) = scratch(&buffers);
        for name in names {
            allocs.push(format!("%y{name}b = memref.alloc(%np) : memref<?x16xf32>"));
            frees.push(format!("memref.dealloc %y{name}b : memref<?x16xf32>"));
        }
        (allocs.join("\n"), frees.join("\n"))
    }

    /// Grouped gate/up on fp8 expert weights through the fp8 GEMM template: the gathered rows of
    /// the activations decoded once per launch (e4m3 with 1 x 128 scales: block-scaled in the
    /// reference's order; f32: one block spanning K against dequantized weights, the reference's
    /// sequential sum), per expert and tile of 16 intermediate columns of the partition the gate
    /// and up products, then SwiGLU (a row template) into the permuted output rows (fp8: quantized
    /// by the kernel's epilogue).
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
        let scaled = g.act_scale.is_some();
        let blocks = if scaled { (db, FP8_BLOCK) } else { (1, d) };
        let (act, act_frees) = self.grouped_activations(
            (&x.0, &x.1.element),
            g.act_scale.map(|xs| (xs.0.as_str(), db)),
            (d, blocks.0, blocks.1),
            true,
        );
        let (allocs, frees) = Self::fp8_scratch(&["g", "u"], inter, blocks);
        let silu_tile = |e: &mut Emitter, w: usize| {
            let tile = RowTile { sizes: vec![1, lanes(Some(w))], fill_operand: None, interchange: false, reduced: 1 };
            e.use_tile(tile.clone());
            tile.tag()
        };
        let mut tile = |j0: &str, w: usize| {
            let (gtext, gsub) = self.fp8_expert_tile("g", ("%wgT", "%wgsT"), (inter, d), blocks, scaled, (j0, w));
            let (utext, usub) = self.fp8_expert_tile("u", ("%wuT", "%wusT"), (inter, d), blocks, scaled, (j0, w));
            let tag = silu_tile(self, w);
            let t = format!("tensor<?x{w}xf32>");
            let ys_ty = format!("memref<?x{w}xf32, strided<[16, 1], offset: ?>>");
            let hs_ty = format!("memref<?x{w}xf32, strided<[{inter}, 1], offset: ?>>");
            format!(
                "{gtext}
{utext}
%gt{w} = bufferization.to_tensor {gsub} restrict : {ys_ty} to {t}
%ut{w} = bufferization.to_tensor {usub} restrict : {ys_ty} to {t}
%hs{w} = memref.subview %hflat[%glo, {j0}] [%gn, {w}] [1, 1] : memref<?x{inter}xf32> to {hs_ty}
%he{w} = tensor.empty(%gn) : {t}
%hv{w} = linalg.generic {{indexing_maps = [{id}, {id}, {id}], iterator_types = [\"parallel\", \"parallel\"]}} ins(%gt{w}, %ut{w} : {t}, {t}) outs(%he{w} : {t}) attrs = {{v3c.rows = \"{tag}\"}} {{
^bb0(%a: f32, %b: f32, %c: f32):
  %n = arith.negf %a : f32
  %x = math.exp %n : f32
  %den = arith.addf %one, %x : f32
  %s = arith.divf %a, %den : f32
  %r = arith.mulf %s, %b : f32
  linalg.yield %r : f32
}} -> {t}
bufferization.materialize_in_destination %hv{w} in restrict writable %hs{w} : ({t}, {hs_ty}) -> ()",
                id = identity(2),
            )
        };
        let tiles = Self::column_tiles(inter, ("%ilo", "%ihi"), &mut tile);
        let stacks =
            [("%wg", wty.as_str(), "%wgT"), ("%wu", &wty, "%wuT"), ("%wgs", &sty, "%wgsT"), ("%wus", &sty, "%wusT")];
        let body = Self::expert_ranges(g, &picks.join("\n"), &Self::fp8_expert(&stacks, blocks, scaled, &tiles));
        self.line(&format!(
            "scf.execute_region {{
%c0 = arith.constant 0 : index
%c1 = arith.constant 1 : index
%c16 = arith.constant 16 : index
%cblk = arith.constant {FP8_BLOCK} : index
%hflat = memref.collapse_shape {dest} [[0, 1], [2]] : {o_ty} into memref<?x{inter}xf32>
%rflat = memref.collapse_shape {rv} [[0, 1]] : memref<?x{width}xi32> into memref<?xi32>
{range}
{pre}
{act}
{allocs}
{body}
{frees}
{act_frees}
scf.yield
}}",
            o_ty = memref(out),
            rv = g.rows.0,
            range = partition_range(inter, GATE_UP_GRANULE, "%ilo", "%ihi"),
            pre = pre.join("\n"),
            act_frees = act_frees.join("\n"),
        ));
    }

    /// Grouped down GEMM with the combine on fp8 expert weights through the fp8 GEMM template (as
    /// [`Emitter::gate_up_fp8`]: the permuted rows decoded once, block-scaled or f32 against
    /// dequantized weights), per expert and tile of 16 output columns the product, scattered into
    /// the tokens' rows with the row weights; then the residual added.
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
        let h_el = storage(&h.1.element).to_string();
        let scaled = g.act_scale.is_some();
        let blocks = if scaled { (ib, FP8_BLOCK) } else { (1, inter) };
        let (act, act_frees) = self.grouped_activations(
            ("%hq", &h.1.element),
            scaled.then_some(("%hs", ib)),
            (inter, blocks.0, blocks.1),
            false,
        );
        let (allocs, frees) = Self::fp8_scratch(&["d"], d, blocks);
        let mut tile = |j0: &str, w: usize| {
            let (text, _) = self.fp8_expert_tile("d", ("%wdT", "%wdsT"), (d, inter), blocks, scaled, (j0, w));
            let v = format!("vector<{w}xf32>");
            format!(
                "{text}
scf.for %g = %glo to %ghi step %c1 {{
  %t32 = memref.load %rflat[%g] : memref<?xi32>
  %t = arith.index_cast %t32 : i32 to index
  %wt = memref.load %wflat[%g] : memref<?xf32>
  %yv = vector.load %ydb[%g, %c0] : memref<?x16xf32>, {v}
  %cur = vector.load {dest}[%t, {j0}] : {o_ty}, {v}
  %wtv = vector.broadcast %wt : f32 to {v}
  %wa = arith.mulf %wtv, %yv : {v}
  %sum = arith.addf %cur, %wa : {v}
  vector.store %sum, {dest}[%t, {j0}] : {o_ty}, {v}
}}"
            )
        };
        let tiles = Self::column_tiles(d, ("%olo", "%ohi"), &mut tile);
        let stacks = [("%wd", wty.as_str(), "%wdT"), ("%wds", &sty, "%wdsT")];
        let finish = Self::add_residual(residual, dest, &o_ty);
        let body = format!(
            "{act}\n{allocs}\n{}\n{frees}\n{}",
            Self::expert_ranges(g, &picks.join("\n"), &Self::fp8_expert(&stacks, blocks, scaled, &tiles)),
            act_frees.join("\n")
        );
        let header = format!(
            "%cblk = arith.constant {FP8_BLOCK} : index
%c16 = arith.constant 16 : index
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
