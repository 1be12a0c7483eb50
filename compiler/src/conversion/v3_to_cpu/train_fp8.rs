//! DeepSeek-V3's FP8 training GEMMs on the CPU (see `fp8_fprop`, `fp8_dgrad` and `fp8_wgrad` of
//! the reference interpreter's kernels): the operands quantized as the recipe says — activations
//! and output gradients in 1x128 tiles along the contraction, the f32 master weight in 128x128
//! blocks (read transposed by Dgrad: the same bits, the block scales transposed), both Wgrad
//! operands in 128x1 tiles over the tokens — into scratch buffers of their decoded e4m3 values, then
//! the block-scaled product: per 128-wide block of the contraction a sequential dot product, times
//! both scales, added to the f32 accumulator. Scalar scf loops in the reference's order (its bits
//! are the target); the transform-dialect fp8 GEMM takes weights quantized ahead of time, these
//! quantize f32 masters at every step.

use super::fp8::{FP8_BLOCK, VECTOR_CODEC_LANES};
use super::*;
use std::fmt::Write as _;

/// An f32 scratch `[rows, cols]` (SSA sizes) as (name, type), freed with the kernel.
fn scratch(e: &mut Emitter, rows: &str, cols: &str) -> (String, String) {
    let buf = e.fresh();
    let ty = "memref<?x?xf32>".to_string();
    e.line(&format!("{buf} = memref.alloc({rows}, {cols}) : {ty}"));
    e.allocs.push(format!("memref.dealloc {buf} : {ty}"));
    (buf, ty)
}

/// Loads of expert `ex`'s stacked master blocks read K-major (`q` [E, c, j]: the transposed copy
/// for Fprop, the master's own layout for Dgrad, whose block scales `s` are then transposed), as
/// [`Emitter::block_scaled_gemm`] takes them.
#[allow(clippy::type_complexity)]
fn stacked_expert(
    ex: &str,
    q: &(String, String),
    s: &(String, String),
    scale_transposed: bool,
) -> (impl Fn(&str, &str, &str) -> String, impl Fn(&str, &str, &str) -> String) {
    let (qb, qt, sb, st, exc, exc2) =
        (q.0.clone(), q.1.clone(), s.0.clone(), s.1.clone(), ex.to_string(), ex.to_string());
    let load = move |jb: &str, c: &str, v: &str| format!("%bv = vector.load {qb}[{exc}, {c}, {jb}] : {qt}, {v}");
    let scale = move |jb: &str, b: &str, v: &str| {
        let at = if scale_transposed { format!("{b}, %sj") } else { format!("%sj, {b}") };
        format!(
            "%sg = arith.constant {FP8_BLOCK} : index\n%sj = arith.divui {jb}, %sg : index\n%ss = memref.load {sb}[{exc2}, {at}] : {st}\n%bs = vector.broadcast %ss : f32 to {v}"
        )
    };
    (load, scale)
}

/// `%ld` = element (r, c) of `buf` (`transposed`: element (c, r)).
fn row_load(buf: &(String, String), transposed: bool) -> impl Fn(&str, &str) -> String {
    let (b, t) = (buf.0.clone(), buf.1.clone());
    move |r: &str, c: &str| {
        let (i, j) = if transposed { (c, r) } else { (r, c) };
        format!("%ld = memref.load {b}[{i}, {j}] : {t}")
    }
}

/// `src [n, k]` copied into `dst [k, n]` (`n`, `k` multiples of `lanes`, bound to `%{p}_n`,
/// `%{p}_k`; indices after `lead`) in `lanes` x `lanes` tiles: a tile's rows loaded as vectors,
/// transposed in registers (log2(lanes) rounds of shuffles, each swapping the off-diagonal blocks of
/// a width), stored as the destination's rows. Data movement only: the same values.
fn transpose_tiles(p: &str, lanes: usize, (sb, st): (&str, &str), (db, dt): (&str, &str), lead: &str) -> String {
    let v = format!("vector<{lanes}xf32>");
    let mut t = format!(
        "
%{p}_tl = arith.constant {lanes} : index
scf.for %{p}_r0 = %{p}_c0 to %{p}_n step %{p}_tl {{
  scf.for %{p}_i0 = %{p}_c0 to %{p}_k step %{p}_tl {{
"
    );
    let mut rows: Vec<String> = Vec::new();
    for r in 0..lanes {
        let _ = writeln!(
            t,
            "    %{p}_o{r} = arith.constant {r} : index\n    %{p}_sr{r} = arith.addi %{p}_r0, %{p}_o{r} : index\n    %{p}_x{r}_0 = vector.load {sb}[{lead}%{p}_sr{r}, %{p}_i0] : {st}, {v}"
        );
        rows.push(format!("%{p}_x{r}_0"));
    }
    let mut width = lanes / 2;
    let mut round = 1;
    while width > 0 {
        let mut next = rows.clone();
        for i in (0..lanes).filter(|i| i & width == 0) {
            let (a, b) = (&rows[i], &rows[i + width]);
            let low: Vec<String> =
                (0..lanes).map(|j| if j & width == 0 { j } else { lanes + j - width }.to_string()).collect();
            let high: Vec<String> =
                (0..lanes).map(|j| if j & width == 0 { j + width } else { lanes + j }.to_string()).collect();
            let (lo, hi) = (format!("%{p}_x{i}_{round}"), format!("%{p}_x{}_{round}", i + width));
            let _ = writeln!(t, "    {lo} = vector.shuffle {a}, {b} [{}] : {v}, {v}", low.join(", "));
            let _ = writeln!(t, "    {hi} = vector.shuffle {a}, {b} [{}] : {v}, {v}", high.join(", "));
            next[i] = lo;
            next[i + width] = hi;
        }
        rows = next;
        width /= 2;
        round += 1;
    }
    for (r, row) in rows.iter().enumerate() {
        let _ = writeln!(
            t,
            "    %{p}_dr{r} = arith.addi %{p}_i0, %{p}_o{r} : index\n    vector.store {row}, {db}[{lead}%{p}_dr{r}, %{p}_r0] : {dt}, {v}"
        );
    }
    t.push_str("  }\n}");
    t
}

impl Emitter {
    /// `(decode, encode)` helper names (the kernel then carries them).
    fn fp8_codec(&mut self) -> (String, String) {
        let enc = self.encode();
        (format!("@{}_f8_decode", self.prefix), enc)
    }

    /// Rows `0..rows` of the matrix `load(r, c)` (text defining `%ld`) quantized 1 x 128 along its
    /// `cols`: decoded e4m3 values into `q` [rows, cols], scales `max(amax, 1e-4) / 448` into `s`
    /// [rows, ceil(cols / 128)] (`transposed_out`: `q` [cols, rows], `s` [ceil(cols / 128), rows]).
    fn quantize_tiles(
        &mut self,
        (rows, cols): (&str, &str),
        load: &dyn Fn(&str, &str) -> String,
        (q, s): (&(String, String), &(String, String)),
        transposed_out: bool,
    ) {
        let (dec, enc) = self.fp8_codec();
        let p = self.fresh().replace('%', "");
        // Stored as [cols, rows] (and the scales [blocks, rows]) for a GEMM that reads them K-major.
        let (s_at, q_at) = if transposed_out {
            (format!("%{p}_b, %{p}_r"), format!("%{p}_i, %{p}_r"))
        } else {
            (format!("%{p}_r, %{p}_b"), format!("%{p}_r, %{p}_i"))
        };
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
    memref.store %{p}_s, {sb}[{s_at}] : {st}
    scf.for %{p}_i = %{p}_lo to %{p}_hi step %{p}_c1 {{
{load_a}
      %{p}_d = arith.divf %ld, %{p}_s : f32
      %{p}_bits = func.call {enc}(%{p}_d) : (f32) -> i8
      %{p}_f = func.call {dec}(%{p}_bits) : (i8) -> f32
      memref.store %{p}_f, {qb}[{q_at}] : {qt}
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

    /// An f32 master weight `w` [n, k] in 128 x 128 blocks: decoded e4m3 values into `q` [n, k]
    /// (and `transposed`, [k, n], copied from `q` in 16 x 16 tiles — in registers when `n` allows —
    /// so that the transposed rows stay in cache), block scales `max(amax, 1e-12) / 448` into `s`
    /// [ceil(n / 128), ceil(k / 128)]. Columns go [`VECTOR_CODEC_LANES`] at a time when `k` allows
    /// (a vector never spans two blocks; the e4m3 round trip through the vector helpers, the scalar
    /// ops lane by lane: the same bits), else one by one.
    fn quantize_blocks(
        &mut self,
        (wb, wt): (&str, &str),
        (n, k): (usize, usize),
        (q, s): (&(String, String), &(String, String)),
        lead: &str,
        transposed: Option<&(String, String)>,
    ) {
        let (dec, enc) = self.fp8_codec();
        let l = if k.is_multiple_of(VECTOR_CODEC_LANES) { VECTOR_CODEC_LANES } else { 1 };
        let p = self.fresh().replace('%', "");
        let (qb, qt, sb, st) = (&q.0, &q.1, &s.0, &s.1);
        let at = format!("{lead}%{p}_r, %{p}_i");
        // Per step of `l` columns: `%{p}_m`, their |max|; then their round trip stored into q.
        let (amax, round_trip) = if l > 1 {
            let v = format!("vector<{l}xf32>");
            (
                format!(
                    "%{p}_v = vector.load {wb}[{at}] : {wt}, {v}
    %{p}_av = math.absf %{p}_v : {v}
    %{p}_m = vector.reduction <maxnumf>, %{p}_av : {v} into f32"
                ),
                format!(
                    "%{p}_v = vector.load {wb}[{at}] : {wt}, {v}
    %{p}_sv = vector.broadcast %{p}_s : f32 to {v}
    %{p}_d = arith.divf %{p}_v, %{p}_sv : {v}
    %{p}_bits = func.call {enc}_v(%{p}_d) : ({v}) -> vector<{l}xi8>
    %{p}_f = func.call {dec}_v(%{p}_bits) : (vector<{l}xi8>) -> {v}
    vector.store %{p}_f, {qb}[{at}] : {qt}, {v}"
                ),
            )
        } else {
            (
                format!("%{p}_v = memref.load {wb}[{at}] : {wt}\n    %{p}_m = math.absf %{p}_v : f32"),
                format!(
                    "%{p}_v = memref.load {wb}[{at}] : {wt}
    %{p}_d = arith.divf %{p}_v, %{p}_s : f32
    %{p}_bits = func.call {enc}(%{p}_d) : (f32) -> i8
    %{p}_f = func.call {dec}(%{p}_bits) : (i8) -> f32
    memref.store %{p}_f, {qb}[{at}] : {qt}"
                ),
            )
        };
        let copy_t = transposed.map_or(String::new(), |(tb, tt)| {
            if l > 1 && n.is_multiple_of(l) {
                return transpose_tiles(&p, l, (qb, qt), (tb, tt), lead);
            }
            format!(
                "
%{p}_t = arith.constant 16 : index
scf.for %{p}_r0 = %{p}_c0 to %{p}_n step %{p}_t {{
  %{p}_r1a = arith.addi %{p}_r0, %{p}_t : index
  %{p}_r1 = arith.minui %{p}_r1a, %{p}_n : index
  scf.for %{p}_i0 = %{p}_c0 to %{p}_k step %{p}_t {{
    %{p}_i1a = arith.addi %{p}_i0, %{p}_t : index
    %{p}_i1 = arith.minui %{p}_i1a, %{p}_k : index
    scf.for %{p}_r = %{p}_r0 to %{p}_r1 step %{p}_c1 {{
      scf.for %{p}_i = %{p}_i0 to %{p}_i1 step %{p}_c1 {{
        %{p}_f = memref.load {qb}[{lead}%{p}_r, %{p}_i] : {qt}
        memref.store %{p}_f, {tb}[{lead}%{p}_i, %{p}_r] : {tt}
      }}
    }}
  }}
}}"
            )
        });
        let text = format!(
            "%{p}_c0 = arith.constant 0 : index
%{p}_c1 = arith.constant 1 : index
%{p}_n = arith.constant {n} : index
%{p}_k = arith.constant {k} : index
%{p}_L = arith.constant {l} : index
%{p}_g = arith.constant {FP8_BLOCK} : index
%{p}_floor = arith.constant 1.0e-12 : f32
%{p}_fmax = arith.constant 448.0 : f32
%{p}_nb0 = arith.ceildivui %{p}_n, %{p}_g : index
%{p}_kb0 = arith.ceildivui %{p}_k, %{p}_g : index
scf.for %{p}_a = %{p}_c0 to %{p}_nb0 step %{p}_c1 {{
  scf.for %{p}_b = %{p}_c0 to %{p}_kb0 step %{p}_c1 {{
    memref.store %zero, {sb}[{lead}%{p}_a, %{p}_b] : {st}
  }}
}}
scf.for %{p}_r = %{p}_c0 to %{p}_n step %{p}_c1 {{
  %{p}_rb = arith.divui %{p}_r, %{p}_g : index
  scf.for %{p}_i = %{p}_c0 to %{p}_k step %{p}_L {{
    %{p}_cb = arith.divui %{p}_i, %{p}_g : index
    {amax}
    %{p}_so = memref.load {sb}[{lead}%{p}_rb, %{p}_cb] : {st}
    %{p}_sn = arith.maxnumf %{p}_so, %{p}_m : f32
    memref.store %{p}_sn, {sb}[{lead}%{p}_rb, %{p}_cb] : {st}
  }}
}}
scf.for %{p}_a = %{p}_c0 to %{p}_nb0 step %{p}_c1 {{
  scf.for %{p}_b = %{p}_c0 to %{p}_kb0 step %{p}_c1 {{
    %{p}_mx = memref.load {sb}[{lead}%{p}_a, %{p}_b] : {st}
    %{p}_mf = arith.maxnumf %{p}_mx, %{p}_floor : f32
    %{p}_sc = arith.divf %{p}_mf, %{p}_fmax : f32
    memref.store %{p}_sc, {sb}[{lead}%{p}_a, %{p}_b] : {st}
  }}
}}
scf.for %{p}_r = %{p}_c0 to %{p}_n step %{p}_c1 {{
  %{p}_rb = arith.divui %{p}_r, %{p}_g : index
  scf.for %{p}_i = %{p}_c0 to %{p}_k step %{p}_L {{
    %{p}_cb = arith.divui %{p}_i, %{p}_g : index
    %{p}_s = memref.load {sb}[{lead}%{p}_rb, %{p}_cb] : {st}
    {round_trip}
  }}
}}{copy_t}"
        );
        self.line(&format!("scf.execute_region {{\n{}\n      scf.yield\n    }}", indent(&text, 6)));
    }

    /// `dest[i, j] = sum over 128-blocks b of the contraction (length `len`) of
    /// dot(a[i, b], B[j, b]) * a_s[i, b] * B_s(j, b)`, the dot sequential, the sum from zero (the
    /// reference's order), vectors of output columns at a time: `b_load(jb, c, vty)` defines
    /// `%bv`, the vector of B[jb.., c] (B read K-major), `b_scale(jb, b, vty)` defines `%bs`, the
    /// vector of the columns' scales of block `b`. `n` (columns) is static. Column strips outermost:
    /// a strip of B (`len` x lanes) stays in cache while every row runs over it.
    fn block_scaled_gemm(
        &mut self,
        (m, n, len): (&str, usize, &str),
        (a, a_s): (&(String, String), &(String, String)),
        b_load: &dyn Fn(&str, &str, &str) -> String,
        b_scale: &dyn Fn(&str, &str, &str) -> String,
        (dest, dest_ty, lead): (&str, &str, &str),
    ) {
        let p = self.fresh().replace('%', "");
        let lanes = super::rows::lanes(Some(n));
        let v = format!("vector<{lanes}xf32>");
        let load_b = indent(&b_load(&format!("%{p}_jb"), &format!("%{p}_c"), &v), 8);
        let scale_b = indent(&b_scale(&format!("%{p}_jb"), &format!("%{p}_b"), &v), 6);
        // `rows` consecutive rows from `%{p}_i`: independent accumulator chains sharing each load
        // of B (each row's sums exactly as alone).
        let rows_body = |rows: usize| {
            let list = |f: &dyn Fn(usize) -> String| (0..rows).map(f).collect::<Vec<_>>().join(", ");
            let types = list(&|_| v.clone());
            let mut t = String::new();
            for r in 0..rows {
                let _ = writeln!(
                    t,
                    "    %{p}_r{r} = arith.constant {r} : index\n    %{p}_i{r} = arith.addi %{p}_i, %{p}_r{r} : index"
                );
            }
            let _ = writeln!(
                t,
                "    %{p}_acc:{rows} = scf.for %{p}_b = %{p}_c0 to %{p}_nb step %{p}_c1 iter_args({}) -> ({types}) {{
      %{p}_lo = arith.muli %{p}_b, %{p}_g : index
      %{p}_hi0 = arith.addi %{p}_lo, %{p}_g : index
      %{p}_hi = arith.minui %{p}_hi0, {len} : index
      %{p}_dot:{rows} = scf.for %{p}_c = %{p}_lo to %{p}_hi step %{p}_c1 iter_args({}) -> ({types}) {{
{load_b}",
                list(&|r| format!("%{p}_y{r} = %{p}_zv")),
                list(&|r| format!("%{p}_s{r} = %{p}_nzv")),
            );
            for r in 0..rows {
                let _ = writeln!(
                    t,
                    "        %{p}_a{r} = memref.load {ab}[%{p}_i{r}, %{p}_c] : {at}
        %{p}_av{r} = vector.broadcast %{p}_a{r} : f32 to {v}
        %{p}_pr{r} = arith.mulf %{p}_av{r}, %bv : {v}
        %{p}_s{r}n = arith.addf %{p}_s{r}, %{p}_pr{r} : {v}",
                    ab = a.0,
                    at = a.1
                );
            }
            let _ =
                writeln!(t, "        scf.yield {} : {types}\n      }}\n{scale_b}", list(&|r| format!("%{p}_s{r}n")));
            for r in 0..rows {
                let _ = writeln!(
                    t,
                    "      %{p}_as{r} = memref.load {asb}[%{p}_i{r}, %{p}_b] : {ast}
      %{p}_asv{r} = vector.broadcast %{p}_as{r} : f32 to {v}
      %{p}_t{r}a = arith.mulf %{p}_dot#{r}, %{p}_asv{r} : {v}
      %{p}_t{r}b = arith.mulf %{p}_t{r}a, %bs : {v}
      %{p}_y{r}n = arith.addf %{p}_y{r}, %{p}_t{r}b : {v}",
                    asb = a_s.0,
                    ast = a_s.1
                );
            }
            let _ = writeln!(t, "      scf.yield {} : {types}\n    }}", list(&|r| format!("%{p}_y{r}n")));
            for r in 0..rows {
                let _ = writeln!(t, "    vector.store %{p}_acc#{r}, {dest}[{lead}%{p}_i{r}, %{p}_jb] : {dest_ty}, {v}");
            }
            t
        };
        const ROWS: usize = 4;
        let text = format!(
            "%{p}_c0 = arith.constant 0 : index
%{p}_c1 = arith.constant 1 : index
%{p}_n = arith.constant {n} : index
%{p}_L = arith.constant {lanes} : index
%{p}_g = arith.constant {FP8_BLOCK} : index
%{p}_R = arith.constant {ROWS} : index
%{p}_zv = arith.constant dense<0.0> : {v}
%{p}_nzv = arith.constant dense<-0.0> : {v}
%{p}_nb = arith.ceildivui {len}, %{p}_g : index
%{p}_groups = arith.divui {m}, %{p}_R : index
%{p}_mr = arith.muli %{p}_groups, %{p}_R : index
scf.for %{p}_jb = %{p}_c0 to %{p}_n step %{p}_L {{
  scf.for %{p}_i = %{p}_c0 to %{p}_mr step %{p}_R {{
{many}  }}
  scf.for %{p}_i = %{p}_mr to {m} step %{p}_c1 {{
{one}  }}
}}",
            many = rows_body(ROWS),
            one = rows_body(1),
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
        // The scale of a 128-block of columns: `ws[jb / 128, b]`, or `ws[b, jb / 128]` transposed.
        let block_scale = |ws: String, transposed: bool| {
            move |jb: &str, b: &str, v: &str| {
                let at = if transposed { format!("{b}, %sj") } else { format!("%sj, {b}") };
                format!(
                    "%sg = arith.constant {FP8_BLOCK} : index\n%sj = arith.divui {jb}, %sg : index\n%ss = memref.load {ws}[{at}] : memref<?x?xf32>\n%bs = vector.broadcast %ss : f32 to {v}"
                )
            }
        };
        let rows_of = |buf: String| {
            move |jb: &str, c: &str, v: &str| format!("%bv = vector.load {buf}[{c}, {jb}] : memref<?x?xf32>, {v}")
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
                self.quantize_tiles((&m, &ka), &load(a, false), (&aq, &a_s), false);
                let wq = scratch(self, &wn, &wk);
                let (wnb, wkb) = (blocks(self, &wn), blocks(self, &wk));
                let ws = scratch(self, &wnb, &wkb);
                let (n, k) = (b.1.dims[0].unwrap_or(0), b.1.dims[1].unwrap_or(0));
                // Both read W K-major: Fprop as W^T [K, N] (a transposed copy), Dgrad as W itself.
                let wqt = (kind == "fp8_linear").then(|| scratch(self, &wk, &wn));
                self.quantize_blocks((&b.0, &memref(&b.1)), (n, k), (&wq, &ws), "", wqt.as_ref());
                let fprop = kind == "fp8_linear";
                let (wkm, cols) = (wqt.map_or(wq.0.clone(), |t| t.0), if fprop { n } else { k });
                self.block_scaled_gemm(
                    (&m, cols, &ka),
                    (&aq, &a_s),
                    &rows_of(wkm),
                    &block_scale(ws.0.clone(), !fprop),
                    (dest, &dest_ty, ""),
                );
            }
            "fp8_linear_wgrad" => {
                // a: dy [M, N], b: x [M, K] -> dW [N, K]; both transposed and quantized 1x128 over
                // M, x^T stored K-major ([M, K], its scales [M / 128, K]).
                let (m, n, k) = (self.dim_of(a, 0), self.dim_of(a, 1), self.dim_of(b, 1));
                let mb = blocks(self, &m);
                let (aq, a_s) = (scratch(self, &n, &m), scratch(self, &n, &mb));
                self.quantize_tiles((&n, &m), &load(a, true), (&aq, &a_s), false);
                let (bq, b_s) = (scratch(self, &m, &k), scratch(self, &mb, &k));
                self.quantize_tiles((&k, &m), &load(b, true), (&bq, &b_s), true);
                let bsb = b_s.0.clone();
                let column_scales = |jb: &str, blk: &str, v: &str| {
                    format!("%bs = vector.load {bsb}[{blk}, {jb}] : memref<?x?xf32>, {v}")
                };
                let kc = b.1.dims[1].unwrap_or(0);
                self.block_scaled_gemm(
                    (&n, kc, &m),
                    (&aq, &a_s),
                    &rows_of(bq.0.clone()),
                    &column_scales,
                    (dest, &dest_ty, ""),
                );
            }
            other => return Err(format!("{other} is not an fp8 training GEMM")),
        }
        Ok(())
    }

    /// A static f32 scratch of `dims`, freed with the kernel.
    fn static_scratch(&mut self, dims: &[usize]) -> (String, String) {
        let d: Vec<String> = dims.iter().map(ToString::to_string).collect();
        let (buf, ty) = (self.fresh(), format!("memref<{}xf32>", d.join("x")));
        self.line(&format!("{buf} = memref.alloc() : {ty}"));
        self.allocs.push(format!("memref.dealloc {buf} : {ty}"));
        (buf, ty)
    }

    /// Every expert's three f32 master weights (gate/up [E, I, D], down [E, D, I]) quantized in
    /// 128 x 128 blocks: (decoded values, scales) per projection, stacked like the weights.
    /// With `transposed`, the decoded values also as `[E, k, n]` (what Dgrad reads by rows).
    #[allow(clippy::type_complexity)]
    fn quantized_experts(
        &mut self,
        weights: [&(String, Shape); 3],
        transposed: bool,
    ) -> [((String, String), (String, String), Option<(String, String)>); 3] {
        let e = weights[0].1.dims[0].unwrap_or(0);
        let ex = self.fresh();
        let quantized = weights.map(|w| {
            let (n, k) = (w.1.dims[1].unwrap_or(0), w.1.dims[2].unwrap_or(0));
            let q = self.static_scratch(&[e, n, k]);
            let s = self.static_scratch(&[e, n.div_ceil(FP8_BLOCK), k.div_ceil(FP8_BLOCK)]);
            let t = transposed.then(|| self.static_scratch(&[e, k, n]));
            (q, s, t)
        });
        let (c0, c1, ce) = (self.constant_index(0), self.constant_index(1), self.constant_index(e));
        self.line(&format!("scf.for {ex} = {c0} to {ce} step {c1} {{"));
        for (w, (q, s, t)) in weights.iter().zip(&quantized) {
            let (n, k) = (w.1.dims[1].unwrap_or(0), w.1.dims[2].unwrap_or(0));
            self.quantize_blocks((&w.0, &memref(&w.1)), (n, k), (q, s), &format!("{ex}, "), t.as_ref());
        }
        self.line("}");
        quantized
    }

    /// Expert `ex`'s forward on its `m` gathered rows `xe` (the recipe's Fprop): the rows 1x128
    /// into `xq`, `xs`; `g`, `u` = x W^T from the transposed masters `gt`, `ut` (scales `gs`, `us`);
    /// `h` = silu(g) u, 1x128 into `hq`, `hs`; `y` = h W_down^T (`dt`, `ds`).
    #[allow(clippy::type_complexity)]
    fn expert_fprop(
        &mut self,
        (ex, m): (&str, &str),
        (inter, d): (usize, usize),
        [(gt, gs), (ut, us), (dt, ds)]: [(&(String, String), &(String, String)); 3],
        (xe, xq, xs): (&(String, String), &(String, String), &(String, String)),
        (g, u, h, hq, hs): (
            &(String, String),
            &(String, String),
            &(String, String),
            &(String, String),
            &(String, String),
        ),
        y: &(String, String),
    ) {
        let (c0, c1) = (self.constant_index(0), self.constant_index(1));
        let (ci, cd) = (self.constant_index(inter), self.constant_index(d));
        self.quantize_tiles((m, &cd), &row_load(xe, false), (xq, xs), false);
        for (q, sc, dst) in [(gt, gs, g), (ut, us, u)] {
            let (load, scale) = stacked_expert(ex, q, sc, false);
            self.block_scaled_gemm((m, inter, &cd), (xq, xs), &load, &scale, (&dst.0, &dst.1, ""));
        }
        self.line(&format!(
            "scf.for %sh_r = {c0} to {m} step {c1} {{
      scf.for %sh_i = {c0} to {ci} step {c1} {{
        %sh_g = memref.load {gb}[%sh_r, %sh_i] : {ft}
        %sh_u = memref.load {ub}[%sh_r, %sh_i] : {ft}
        %sh_n = arith.negf %sh_g : f32
        %sh_x = math.exp %sh_n : f32
        %sh_den = arith.addf %one, %sh_x : f32
        %sh_silu = arith.divf %sh_g, %sh_den : f32
        %sh_h = arith.mulf %sh_silu, %sh_u : f32
        memref.store %sh_h, {hb}[%sh_r, %sh_i] : {ft}
      }}
    }}",
            gb = g.0,
            ub = u.0,
            hb = h.0,
            ft = g.1
        ));
        self.quantize_tiles((m, &ci), &row_load(h, false), (hq, hs), false);
        let (load, scale) = stacked_expert(ex, dt, ds, false);
        self.block_scaled_gemm((m, d, &ci), (hq, hs), &load, &scale, (&y.0, &y.1, ""));
    }

    /// `moe_experts` with fp8 activations on f32 master weights (the recipe's Fprop of the routed
    /// experts, see the reference interpreter): the masters quantized once, then per token its slots
    /// in expert order, each projection of a 1x128-quantized row block-scaled.
    pub(super) fn moe_experts_fp8(
        &mut self,
        [x, idx, w, gate, up, down]: [&(String, Shape); 6],
        dest: &str,
        out: &Shape,
    ) {
        let (experts, inter, d) =
            (gate.1.dims[0].unwrap_or(0), gate.1.dims[1].unwrap_or(0), gate.1.dims[2].unwrap_or(0));
        // Fprop reads the masters K-major: their transposed copies.
        let [(_, gs, gqt), (_, us, uqt), (_, ds, dqt)] = self.quantized_experts([gate, up, down], true);
        let (gq, uq, dq) = (gqt.unwrap_or_default(), uqt.unwrap_or_default(), dqt.unwrap_or_default());
        let o_ty = memref(out);
        self.line(&format!("linalg.fill ins(%zero : f32) outs({dest} : {o_ty})"));
        let (c0, c1) = (self.constant_index(0), self.constant_index(1));
        let (ci, cd) = (self.constant_index(inter), self.constant_index(d));
        let (db, ib) = (self.constant_index(d.div_ceil(FP8_BLOCK)), self.constant_index(inter.div_ceil(FP8_BLOCK)));
        // Expert by expert, its (token, slot) pairs as the rows of small GEMMs (each row's sums as
        // before: a row's result does not depend on the others); every token's output still adds
        // its experts' rows in expert order.
        let (t_rows, slots) = (self.dim_of(x, 0), self.dim_of(idx, 1));
        let cap = self.fresh();
        self.line(&format!("{cap} = arith.muli {t_rows}, {slots} : index"));
        let pairs_ty = "memref<?xindex>";
        let (pt, pk) = (self.fresh(), self.fresh());
        for p in [&pt, &pk] {
            self.line(&format!("{p} = memref.alloc({cap}) : {pairs_ty}"));
            self.allocs.push(format!("memref.dealloc {p} : {pairs_ty}"));
        }
        let rows = |e: &mut Emitter, cols: &str| scratch(e, &cap, cols);
        let (xe, xq, xs) = (rows(self, &cd), rows(self, &cd), rows(self, &db));
        let (g, u, h, hq, hs) = (rows(self, &ci), rows(self, &ci), rows(self, &ci), rows(self, &ci), rows(self, &ib));
        let o = rows(self, &cd);
        let (ex, m) = self.open_expert_pairs((x, idx), (&pt, &pk), &xe, (&t_rows, &slots), experts);
        self.expert_fprop(
            (&ex, &m),
            (inter, d),
            [(&gq, &gs), (&uq, &us), (&dq, &ds)],
            (&xe, &xq, &xs),
            (&g, &u, &h, &hq, &hs),
            &o,
        );
        // Each pair's row, weighted, onto its token's output.
        self.line(&format!(
            "scf.for %so_r = {c0} to {m} step {c1} {{
      %so_t = memref.load {pt}[%so_r] : {pairs_ty}
      %so_k = memref.load {pk}[%so_r] : {pairs_ty}
      %so_w = memref.load {wb}[%so_t, %so_k] : {w_ty}
      scf.for %so_c = {c0} to {cd} step {c1} {{
        %so_o = memref.load {ob}[%so_r, %so_c] : {ft}
        %so_wy = arith.mulf %so_w, %so_o : f32
        %so_old = memref.load {dest}[%so_t, %so_c] : {o_ty}
        %so_new = arith.addf %so_old, %so_wy : f32
        memref.store %so_new, {dest}[%so_t, %so_c] : {o_ty}
      }}
    }}
    }}
    }}",
            wb = w.0,
            w_ty = memref(&w.1),
            ob = o.0,
            ft = o.1,
        ));
    }

    /// Opens a loop over the `experts` experts (`ex`) that gathers expert `ex`'s (token, slot)
    /// pairs of `idx` in token order into `pt` / `pk` (`memref<?xindex>`) and their tokens' rows of
    /// `x` into `xe`, then opens `scf.if m > 0` (`m`: the pairs): the caller closes both. Returns
    /// (`ex`, `m`).
    fn open_expert_pairs(
        &mut self,
        (x, idx): (&(String, Shape), &(String, Shape)),
        (pt, pk): (&str, &str),
        xe: &(String, String),
        (t_rows, slots): (&str, &str),
        experts: usize,
    ) -> (String, String) {
        let pairs_ty = "memref<?xindex>";
        let (c0, c1, ce) = (self.constant_index(0), self.constant_index(1), self.constant_index(experts));
        let cd = self.dim_of(x, 1);
        let (x_ty, i_ty) = (memref(&x.1), memref(&idx.1));
        let (ex, m) = (self.fresh(), self.fresh());
        let (tt, kk, cnt, e32, ei, mine, cnt2, any) = (
            self.fresh(),
            self.fresh(),
            self.fresh(),
            self.fresh(),
            self.fresh(),
            self.fresh(),
            self.fresh(),
            self.fresh(),
        );
        self.line(&format!(
            "scf.for {ex} = {c0} to {ce} step {c1} {{
    {m} = scf.for {tt} = {c0} to {t_rows} step {c1} iter_args({cnt} = {c0}) -> (index) {{
      %pm_in = scf.for {kk} = {c0} to {slots} step {c1} iter_args({cnt2} = {cnt}) -> (index) {{
        {e32} = memref.load {idxb}[{tt}, {kk}] : {i_ty}
        {ei} = arith.index_cast {e32} : i32 to index
        {mine} = arith.cmpi eq, {ei}, {ex} : index
        %pm_next = scf.if {mine} -> (index) {{
          memref.store {tt}, {pt}[{cnt2}] : {pairs_ty}
          memref.store {kk}, {pk}[{cnt2}] : {pairs_ty}
          %pm_n = arith.addi {cnt2}, {c1} : index
          scf.yield %pm_n : index
        }} else {{
          scf.yield {cnt2} : index
        }}
        scf.yield %pm_next : index
      }}
      scf.yield %pm_in : index
    }}
    {any} = arith.cmpi ugt, {m}, {c0} : index
    scf.if {any} {{
    scf.for %gx_r = {c0} to {m} step {c1} {{
      %gx_t = memref.load {pt}[%gx_r] : {pairs_ty}
      scf.for %gx_c = {c0} to {cd} step {c1} {{
        %gx_v = memref.load {xb}[%gx_t, %gx_c] : {x_ty}
        memref.store %gx_v, {xeb}[%gx_r, %gx_c] : {ft}
      }}
    }}",
            idxb = idx.0,
            xb = x.0,
            xeb = xe.0,
            ft = xe.1,
        ));
        (ex, m)
    }

    /// The fp8 routed experts' gradient (the reference's `moe_experts_grad_fp8`): expert by
    /// expert over its (token, slot) pairs in token order, gathered into scratch rows, the forward
    /// recomputed with Fprop, then Wgrad and Dgrad of the down projection, SwiGLU's gradient in
    /// f32, Wgrad and Dgrad of gate and up, dx scattered back; every GEMM as the recipe quantizes.
    pub(super) fn moe_experts_grad_fp8(
        &mut self,
        [x, idx, w, dy, gate, up, down]: [&(String, Shape); 7],
        dests: [(&str, &Shape); 5],
    ) {
        let (experts, inter, d) =
            (gate.1.dims[0].unwrap_or(0), gate.1.dims[1].unwrap_or(0), gate.1.dims[2].unwrap_or(0));
        for (buf, shape) in dests {
            self.line(&format!("linalg.fill ins(%zero : f32) outs({buf} : {})", memref(shape)));
        }
        let [(dx, dx_s), (dwt, dwt_s), (dgate, dgate_s), (dup, dup_s), (ddown, ddown_s)] = dests;
        let [(gq, gs, gqt), (uq, us, uqt), (dq, ds, dqt)] = self.quantized_experts([gate, up, down], true);
        let (gqt, uqt, dqt) = (gqt.unwrap_or_default(), uqt.unwrap_or_default(), dqt.unwrap_or_default());
        let (c0, c1) = (self.constant_index(0), self.constant_index(1));
        let (ci, cd) = (self.constant_index(inter), self.constant_index(d));
        let (t_rows, slots) = (self.dim_of(x, 0), self.dim_of(idx, 1));
        let cap = self.fresh();
        self.line(&format!("{cap} = arith.muli {t_rows}, {slots} : index"));
        let g128 = self.constant_index(FP8_BLOCK);
        let cap_b = self.fresh();
        self.line(&format!("{cap_b} = arith.ceildivui {cap}, {g128} : index"));
        let (db, ib) = (self.constant_index(d.div_ceil(FP8_BLOCK)), self.constant_index(inter.div_ceil(FP8_BLOCK)));
        // Pairs and per-pair rows (capacity T x K).
        let pairs_ty = "memref<?xindex>";
        let (pt, pk) = (self.fresh(), self.fresh());
        for p in [&pt, &pk] {
            self.line(&format!("{p} = memref.alloc({cap}) : {pairs_ty}"));
            self.allocs.push(format!("memref.dealloc {p} : {pairs_ty}"));
        }
        let rows = |e: &mut Emitter, cols: &str| scratch(e, &cap, cols);
        let (xe, g, u, h, y, dye) =
            (rows(self, &cd), rows(self, &ci), rows(self, &ci), rows(self, &ci), rows(self, &cd), rows(self, &cd));
        let (dh, dg, du, dxg, dxu) =
            (rows(self, &ci), rows(self, &ci), rows(self, &ci), rows(self, &cd), rows(self, &cd));
        // Quantized operands.
        let (xq, xs, hq, hs) = (rows(self, &cd), rows(self, &db), rows(self, &ci), rows(self, &ib));
        let (yq, ys, gq2, gs2) = (rows(self, &cd), rows(self, &db), rows(self, &ci), rows(self, &ib));
        let (aq_d, as_d) = (scratch(self, &cd, &cap), scratch(self, &cd, &cap_b));
        let (aq_i, as_i) = (scratch(self, &ci, &cap), scratch(self, &ci, &cap_b));
        let (bq_d, bs_d) = (scratch(self, &cap, &cd), scratch(self, &cap_b, &cd));
        let (bq_i, bs_i) = (scratch(self, &cap, &ci), scratch(self, &cap_b, &ci));
        let (w_ty, y_ty) = (memref(&w.1), memref(&dy.1));
        let (ex, m) = self.open_expert_pairs((x, idx), (&pt, &pk), &xe, (&t_rows, &slots), experts);
        let ld = row_load;
        let stacked = |q: &(String, String), s: &(String, String), scale_transposed: bool| {
            stacked_expert(&ex, q, s, scale_transposed)
        };
        // Fprop: g, u = x_e W^T (x_e 1x128 along D), y = h W_down^T.
        self.expert_fprop(
            (&ex, &m),
            (inter, d),
            [(&gqt, &gs), (&uqt, &us), (&dqt, &ds)],
            (&xe, &xq, &xs),
            (&g, &u, &h, &hq, &hs),
            &y,
        );
        // d weights and dy_e = w dy per pair.
        self.line(&format!(
            "scf.for %dw_r = {c0} to {m} step {c1} {{
      %dw_t = memref.load {pt}[%dw_r] : {pairs_ty}
      %dw_k = memref.load {pk}[%dw_r] : {pairs_ty}
      %dw_nz = arith.constant -0.0 : f32
      %dw_dot = scf.for %dw_c = {c0} to {cd} step {c1} iter_args(%dw_a = %dw_nz) -> (f32) {{
        %dw_g = memref.load {dyb}[%dw_t, %dw_c] : {y_ty}
        %dw_y = memref.load {yb}[%dw_r, %dw_c] : {ft}
        %dw_p = arith.mulf %dw_g, %dw_y : f32
        %dw_a2 = arith.addf %dw_a, %dw_p : f32
        scf.yield %dw_a2 : f32
      }}
      memref.store %dw_dot, {dwtb}[%dw_t, %dw_k] : {dwt_ty}
      %dw_w = memref.load {wb}[%dw_t, %dw_k] : {w_ty}
      scf.for %dw_c = {c0} to {cd} step {c1} {{
        %dw_g = memref.load {dyb}[%dw_t, %dw_c] : {y_ty}
        %dw_e = arith.mulf %dw_g, %dw_w : f32
        memref.store %dw_e, {dyeb}[%dw_r, %dw_c] : {ft}
      }}
    }}",
            dyb = dy.0,
            yb = y.0,
            ft = y.1,
            dwtb = dwt,
            dwt_ty = memref(dwt_s),
            wb = w.0,
            dyeb = dye.0,
        ));
        // d down [D, I] = Wgrad(dy_e, h): both transposed, 1x128 over the pairs.
        let exs = format!("{ex}, ");
        self.quantize_tiles((&cd, &m), &ld(&dye, true), (&aq_d, &as_d), false);
        self.quantize_tiles((&ci, &m), &ld(&h, true), (&bq_i, &bs_i), true);
        self.wgrad_into((&cd, inter, &m), (&aq_d, &as_d), (&bq_i, &bs_i), (ddown, &memref(ddown_s), &exs));
        // dh = Dgrad(dy_e, W_down): dy_e 1x128 along D, W_down's blocks transposed.
        self.quantize_tiles((&m, &cd), &ld(&dye, false), (&yq, &ys), false);
        let (load, scale) = stacked(&dq, &ds, true);
        self.block_scaled_gemm((&m, inter, &cd), (&yq, &ys), &load, &scale, (&dh.0, &dh.1, ""));
        // SwiGLU's gradient in f32.
        self.line(&format!(
            "scf.for %sg_r = {c0} to {m} step {c1} {{
      scf.for %sg_i = {c0} to {ci} step {c1} {{
        %sg_g = memref.load {gb}[%sg_r, %sg_i] : {ft}
        %sg_u = memref.load {ub}[%sg_r, %sg_i] : {ft}
        %sg_d = memref.load {dhb}[%sg_r, %sg_i] : {ft}
{grad}
        memref.store %sg_g_dg, {dgb}[%sg_r, %sg_i] : {ft}
        memref.store %sg_g_du, {dub}[%sg_r, %sg_i] : {ft}
      }}
    }}",
            gb = g.0,
            ub = u.0,
            dhb = dh.0,
            dgb = dg.0,
            dub = du.0,
            ft = g.1,
            grad = indent(&super::train::swiglu_grad_text("%sg_g", ("%sg_g", "%sg_u", "%sg_d"), ("%one", "f32")), 8),
        ));
        // d gate, d up [I, D] = Wgrad(dg | du, x_e); dx_e = Dgrad(dg, W_gate) + Dgrad(du, W_up).
        self.quantize_tiles((&cd, &m), &ld(&xe, true), (&bq_d, &bs_d), true);
        for (grad, dest, dest_s, q, s, dxp) in
            [(&dg, dgate, dgate_s, &gq, &gs, &dxg), (&du, dup, dup_s, &uq, &us, &dxu)]
        {
            self.quantize_tiles((&ci, &m), &ld(grad, true), (&aq_i, &as_i), false);
            self.wgrad_into((&ci, d, &m), (&aq_i, &as_i), (&bq_d, &bs_d), (dest, &memref(dest_s), &exs));
            self.quantize_tiles((&m, &ci), &ld(grad, false), (&gq2, &gs2), false);
            let (load, scale) = stacked(q, s, true);
            self.block_scaled_gemm((&m, d, &ci), (&gq2, &gs2), &load, &scale, (&dxp.0, &dxp.1, ""));
        }
        self.line(&format!(
            "scf.for %sx_r = {c0} to {m} step {c1} {{
      %sx_t = memref.load {pt}[%sx_r] : {pairs_ty}
      scf.for %sx_c = {c0} to {cd} step {c1} {{
        %sx_g = memref.load {dxgb}[%sx_r, %sx_c] : {ft}
        %sx_u = memref.load {dxub}[%sx_r, %sx_c] : {ft}
        %sx_s = arith.addf %sx_g, %sx_u : f32
        %sx_o = memref.load {dx}[%sx_t, %sx_c] : {dx_ty}
        %sx_n = arith.addf %sx_o, %sx_s : f32
        memref.store %sx_n, {dx}[%sx_t, %sx_c] : {dx_ty}
      }}
    }}
    }}
    }}",
            dxgb = dxg.0,
            dxub = dxu.0,
            ft = dxg.1,
            dx_ty = memref(dx_s),
        ));
    }

    /// `dest[lead.., i, j] = sum over 128-blocks b of the pairs of dot(a[i], B[j]) * a_s[i, b] *
    /// b_s[b, j]` (a Wgrad: both operands quantized 1x128 along the contraction; B and its scales
    /// stored K-major, `[pairs, j]` and `[blocks, j]`).
    fn wgrad_into(
        &mut self,
        sizes: (&str, usize, &str),
        a: (&(String, String), &(String, String)),
        (bq, bs): (&(String, String), &(String, String)),
        dest: (&str, &str, &str),
    ) {
        let (qb, qt, sb, st) = (bq.0.clone(), bq.1.clone(), bs.0.clone(), bs.1.clone());
        self.block_scaled_gemm(
            sizes,
            a,
            &|jb, c, v| format!("%bv = vector.load {qb}[{c}, {jb}] : {qt}, {v}"),
            &|jb, b, v| format!("%bs = vector.load {sb}[{b}, {jb}] : {st}, {v}"),
            dest,
        );
    }
}
