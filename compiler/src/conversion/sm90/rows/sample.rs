//! Sampling on the device ([`RowOp::Sample`](super::RowOp::Sample)): a row's token drawn at a
//! temperature with every token weighed, the host sampler's draw
//! ([`v3c_models::sampling::draw_every_token`]) bit for bit, so that a decode step's sampled tokens
//! need neither the logits read back (33 MB a step at 64 rows of DeepSeek-V3's vocabulary) nor the
//! host's time on them, and are the tokens the host would have drawn from the same logits.
//!
//! The host's order of operations, kept here: the row's largest logit `m`; each token's weight
//! `exp((l - m) / t)` in f32 by [`v3c_models::sampling::exp`]'s polynomial, op for op (no fused
//! multiply-adds on either lowering); per block of [`DRAW_BLOCK`] tokens the weights summed in f64
//! in [`LANES`] running sums (token `8i + j` of the block into lane `j`, in order), the lanes then
//! added in order, then a partial block's last tokens past its whole chunks of 8; the blocks' sums
//! added in order into the total; `r = u * total`; then the walk: blocks skipped while `r` is at
//! least their sum (each subtracted), the first other block's tokens walked in order (`r < p`
//! picks, else `r -= p`), and where rounding leaves `r` past that block's last token, on to the
//! next blocks; the last token where it runs past the row.
//!
//! Phases: the maximum (a strided share a thread, then a tree); every (block, lane) sum, a unit a
//! thread; every block's sum from its lanes and its tail; thread 0 adds the blocks and finds the
//! block the draw falls in; that block's weights computed a thread each; thread 0 walks them.

use std::fmt::Write;

use v3c_models::sampling::{DRAW_BLOCK, EXP_F32};

use super::{aligned, indent2, indent4, indent6, tree_phases, Lowering, RowKernel, VEC};

/// The running sums a block's weights are added in (the host's `weight_sum`).
const LANES: usize = 8;

const _: () = assert!(DRAW_BLOCK % (UNROLL * VEC) == 0 && (UNROLL * VEC) % LANES == 0);

/// The shared arrays (the f64 ones first: nothing pads them to 8 bytes): every block's sum; what
/// is left of the draw in the drawn block; the threads' maxima; that block's weights; the drawn
/// block.
pub(super) fn shared(d: usize, threads: usize) -> Vec<(&'static str, usize)> {
    let blocks = d.div_ceil(DRAW_BLOCK);
    vec![("sh_bsum", blocks), ("sh_r", 1), ("sh_max", threads), ("sh_w", DRAW_BLOCK), ("sh_hit", 1)]
}

/// Chunks of [`VEC`] columns a thread loads before using them (the maximum's scan, a block's sums
/// where the row is on 16 bytes).
const UNROLL: usize = 8;

/// `{out} = exp({x})` (f32) as [`v3c_models::sampling::exp`] computes it, operation for operation:
/// the clamps, the reduction by `n ln 2` in two parts, Horner's rule over its coefficients (a
/// multiply then an add each), `2^n` as two powers of two from the rounded sum's bits, NaN kept.
fn exp_f32(x: &str, out: &str) -> String {
    let e = &EXP_F32;
    let c = |v: f32| format!("arith.constant 0x{:08X} : f32", v.to_bits());
    let mut s = format!(
        "{out}_lo = {lo}
{out}_hi = {hi}
{out}_below = arith.cmpf olt, {x}, {out}_lo : f32
{out}_c0 = arith.select {out}_below, {out}_lo, {x} : f32
{out}_above = arith.cmpf ogt, {out}_c0, {out}_hi : f32
{out}_c = arith.select {out}_above, {out}_hi, {out}_c0 : f32
{out}_log2e = {log2e}
{out}_round = {round}
{out}_t0 = arith.mulf {out}_c, {out}_log2e : f32
{out}_t = arith.addf {out}_t0, {out}_round : f32
{out}_n = arith.subf {out}_t, {out}_round : f32
{out}_ln2hi = {ln2hi}
{out}_ln2lo = {ln2lo}
{out}_nh = arith.mulf {out}_n, {out}_ln2hi : f32
{out}_r0 = arith.subf {out}_c, {out}_nh : f32
{out}_nl = arith.mulf {out}_n, {out}_ln2lo : f32
{out}_r = arith.subf {out}_r0, {out}_nl : f32
{out}_p0 = {p0}
",
        lo = c(e.low),
        hi = c(e.high),
        log2e = c(e.log2e),
        round = c(e.round),
        ln2hi = c(e.ln2_hi),
        ln2lo = c(e.ln2_lo),
        p0 = c(e.poly[0]),
    );
    for (k, &coefficient) in e.poly.iter().enumerate().skip(1) {
        let _ = write!(
            s,
            "{out}_pm{k} = arith.mulf {out}_p{prev}, {out}_r : f32
{out}_pc{k} = {coefficient}
{out}_p{k} = arith.addf {out}_pm{k}, {out}_pc{k} : f32
",
            prev = k - 1,
            coefficient = c(coefficient),
        );
    }
    let last = e.poly.len() - 1;
    let _ = write!(
        s,
        "{out}_pr = arith.mulf {out}_p{last}, {out}_r : f32
{out}_prr = arith.mulf {out}_pr, {out}_r : f32
{out}_s = arith.addf {out}_prr, {out}_r : f32
{out}_one = {one}
{out}_er = arith.addf {out}_s, {out}_one : f32
{out}_tb = arith.bitcast {out}_t : f32 to i32
{out}_rb = arith.constant {round_bits} : i32
{out}_ni = arith.subi {out}_tb, {out}_rb : i32
{out}_c1i = arith.constant 1 : i32
{out}_a = arith.shrsi {out}_ni, {out}_c1i : i32
{out}_b = arith.subi {out}_ni, {out}_a : i32
{out}_bias = arith.constant 127 : i32
{out}_c23 = arith.constant 23 : i32
{out}_ab = arith.addi {out}_a, {out}_bias : i32
{out}_as = arith.shli {out}_ab, {out}_c23 : i32
{out}_pa = arith.bitcast {out}_as : i32 to f32
{out}_bb = arith.addi {out}_b, {out}_bias : i32
{out}_bs = arith.shli {out}_bb, {out}_c23 : i32
{out}_pb = arith.bitcast {out}_bs : i32 to f32
{out}_y0 = arith.mulf {out}_er, {out}_pa : f32
{out}_y = arith.mulf {out}_y0, {out}_pb : f32
{out}_nan = arith.cmpf uno, {x}, {x} : f32
{out} = arith.select {out}_nan, {x}, {out}_y : f32
",
        one = c(1.0),
        round_bits = e.round.to_bits() as i32,
    );
    s
}

/// `{out}` (f32) = the weight of column `{col}` of the row: `exp((x - %m) / %t)`.
fn weight(col: &str, out: &str) -> String {
    format!(
        "{out}_v = memref.load %x[%row, {col}] : memref<?x?xf32>
{out}_d = arith.subf {out}_v, %m : f32
{out}_x = arith.divf {out}_d, %t : f32
{}",
        exp_f32(&format!("{out}_x"), out)
    )
}

/// The row's largest logit and its temperature into `%m` and `%t`; block constants.
fn row_values(kernel: &RowKernel, sh_max: &str) -> String {
    format!(
        "%m = memref.load %sh_max[%c0] : {sh_max}
%t = memref.load %temperature[%row] : memref<?xf32>
%cBlk = arith.constant {DRAW_BLOCK} : index
%cLanes = arith.constant {LANES} : index
%cBlocks = arith.constant {blocks} : index
%zd = arith.constant 0.0 : f64
",
        blocks = kernel.d.div_ceil(DRAW_BLOCK)
    )
}

/// Block `{b}`'s first column and columns into `{p}_start`, `{p}_len`.
fn block_span(b: &str, p: &str) -> String {
    format!(
        "{p}_start = arith.muli {b}, %cBlk : index
{p}_end0 = arith.addi {p}_start, %cBlk : index
{p}_end = arith.minui {p}_end0, %cD : index
{p}_len = arith.subi {p}_end, {p}_start : index
"
    )
}

pub(super) fn phases(kernel: &RowKernel, lowering: Lowering) -> Vec<String> {
    let sh = |name: &str| kernel.shared_type(name, lowering);
    let (sh_max, sh_bsum, sh_w, sh_hit, sh_r) = (sh("sh_max"), sh("sh_bsum"), sh("sh_w"), sh("sh_hit"), sh("sh_r"));
    let values = row_values(kernel, &sh_max);
    // The row's base and stride on 16 bytes: its columns 4 at a time (the sm_90a lowering).
    let gpu = lowering == Lowering::Gpu;
    let check = aligned("al", 16, &[("%x", "memref<?x?xf32>", 4)]);
    let wide = if gpu { "%al" } else { "%false_al" };
    let check = format!("{check}%false_al = arith.constant false\n");
    // The largest logit: NaNs passed over (a comparison a NaN never wins), -inf for none. Where
    // wide, UNROLL chunks of 4 columns a step (their loads first; a chunk past the row's whole
    // chunks is chunk 0 again), then the columns past the whole chunks; else a column at a time.
    let mut loads = String::new();
    let mut maxes = String::new();
    for u in 0..UNROLL {
        let _ = write!(
            loads,
            "    %ch{u} = arith.addi %c0u, %cT{u} : index
    %in{u} = arith.cmpi ult, %ch{u}, %cVecs : index
    %cs{u} = arith.select %in{u}, %ch{u}, %c0u : index
    %col{u} = arith.muli %cs{u}, %cVec : index
    %v{u} = vector.load %x[%row, %col{u}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
"
        );
        let prev = if u == 0 { "%mm".to_string() } else { format!("%m{}_3", u - 1) };
        for e in 0..VEC {
            let before = if e == 0 { prev.clone() } else { format!("%m{u}_{}", e - 1) };
            let _ = write!(
                maxes,
                "    %e{u}_{e} = vector.extract %v{u}[{e}] : f32 from vector<4xf32>
    %g{u}_{e} = arith.cmpf ogt, %e{u}_{e}, {before} : f32
    %m{u}_{e} = arith.select %g{u}_{e}, %e{u}_{e}, {before} : f32
"
            );
        }
    }
    let mut steps = String::new();
    for u in 0..UNROLL {
        let _ = writeln!(steps, "%cT{u} = arith.constant {} : index", u * kernel.threads);
    }
    let last = UNROLL - 1;
    let mut phases = vec![format!(
        "{check}%ninf = arith.constant 0xFF800000 : f32
%cVec = arith.constant {VEC} : index
%cVecs = arith.divui %cD, %cVec : index
%cStep = arith.constant {step} : index
{steps}%scalar_from = scf.if {wide} -> (index) {{
  %wcols = arith.muli %cVecs, %cVec : index
  scf.yield %wcols : index
}} else {{
  scf.yield %c0 : index
}}
%mw = scf.if {wide} -> (f32) {{
  %mv = scf.for %c0u = %tid to %cVecs step %cStep iter_args(%mm = %ninf) -> (f32) {{
{loads}{maxes}    scf.yield %m{last}_3 : f32
  }}
  scf.yield %mv : f32
}} else {{
  scf.yield %ninf : f32
}}
%first_col = arith.addi %scalar_from, %tid : index
%mx = scf.for %i = %first_col to %cD step %cT iter_args(%mm = %mw) -> (f32) {{
  %v = memref.load %x[%row, %i] : memref<?x?xf32>
  %gt = arith.cmpf ogt, %v, %mm : f32
  %n = arith.select %gt, %v, %mm : f32
  scf.yield %n : f32
}}
memref.store %mx, %sh_max[%tid] : {sh_max}
",
        step = UNROLL * kernel.threads,
    )];
    phases.extend(tree_phases(
        kernel.threads,
        &format!(
            "%a = memref.load %sh_max[%tid] : {sh_max}
%b = memref.load %sh_max[%other] : {sh_max}
%gt = arith.cmpf ogt, %b, %a : f32
%n = arith.select %gt, %b, %a : f32
memref.store %n, %sh_max[%tid] : {sh_max}"
        ),
    ));
    // Every block's sum, a thread's: its LANES running sums over its whole chunks of 8 in order
    // (where wide and the block whole, UNROLL chunks of 4 columns a step, loaded first), the lanes
    // added in order, then its columns past its whole chunks.
    let lanes_ty = vec!["f64"; LANES].join(", ");
    let lanes_in: Vec<String> = (0..LANES).map(|j| format!("%l{j}")).collect();
    // The weights of `logits` (SSA names, in column order) added in order, the k-th into lane
    // k % LANES (from the lanes `%l0..`): the text and the lanes' new names.
    let add_weights = |logits: &[String], prefix: &str| -> (String, Vec<String>) {
        let mut text = String::new();
        let mut lanes = lanes_in.clone();
        for (k, v) in logits.iter().enumerate() {
            let w = format!("%{prefix}w{k}");
            let _ = write!(
                text,
                "{w}_d = arith.subf {v}, %m : f32\n{w}_x = arith.divf {w}_d, %t : f32\n{}{w}_f = arith.extf {w} : f32 to f64\n%{prefix}s{k} = arith.addf {}, {w}_f : f64\n",
                exp_f32(&format!("{w}_x"), &w),
                lanes[k % LANES],
            );
            lanes[k % LANES] = format!("%{prefix}s{k}");
        }
        (text, lanes)
    };
    // Wide: 4 chunks of 8 (8 loads of 4) a step.
    let group = UNROLL * VEC;
    let mut wide_loads = String::new();
    let mut wide_logits = Vec::new();
    for u in 0..UNROLL {
        let _ = write!(
            wide_loads,
            "%wo{u} = arith.constant {} : index
%wc{u} = arith.addi %gcol, %wo{u} : index
%wv{u} = vector.load %x[%row, %wc{u}] {{alignment = 16 : i64}} : memref<?x?xf32>, vector<4xf32>
",
            u * VEC
        );
        for e in 0..VEC {
            let _ = writeln!(wide_loads, "%wx{u}_{e} = vector.extract %wv{u}[{e}] : f32 from vector<4xf32>");
            wide_logits.push(format!("%wx{u}_{e}"));
        }
    }
    let (wide_sums, wide_out) = add_weights(&wide_logits, "v");
    let mut chunk_loads = String::new();
    let mut chunk_logits = Vec::new();
    for k in 0..LANES {
        let _ = write!(
            chunk_loads,
            "%so{k} = arith.constant {k} : index
%sc{k} = arith.addi %ccol, %so{k} : index
%sx{k} = memref.load %x[%row, %sc{k}] : memref<?x?xf32>
"
        );
        chunk_logits.push(format!("%sx{k}"));
    }
    let (chunk_sums, chunk_out) = add_weights(&chunk_logits, "c");
    let mut fold = String::new();
    for j in 0..LANES {
        let prev = if j == 0 { "%zd".to_string() } else { format!("%f{}", j - 1) };
        let _ = writeln!(fold, "  %f{j} = arith.addf {prev}, %lanes#{j} : f64");
    }
    let lane_args = |from: &str| (0..LANES).map(|j| format!("%l{j} = {from}")).collect::<Vec<_>>().join(", ");
    phases.push(format!(
        "{values}{check}%cGroup = arith.constant {group} : index
%cGroups = arith.constant {groups} : index
%cChunk = arith.constant {LANES} : index
%cBlkT = arith.constant {DRAW_BLOCK} : index
scf.for %b = %tid to %cBlocks step %cT {{
{span}  %whole_block = arith.cmpi eq, %u_len, %cBlkT : index
  %vec = arith.andi {wide}, %whole_block : i1
  %lanes:{LANES} = scf.if %vec -> ({lanes_ty}) {{
    %wl:{LANES} = scf.for %g = %c0 to %cGroups step %c1 iter_args({wide_args}) -> ({lanes_ty}) {{
      %goff = arith.muli %g, %cGroup : index
      %gcol = arith.addi %u_start, %goff : index
{wide_loads}{wide_sums}      scf.yield {wide_out} : {lanes_ty}
    }}
    scf.yield {wl} : {lanes_ty}
  }} else {{
    %full = arith.divui %u_len, %cChunk : index
    %sl:{LANES} = scf.for %i = %c0 to %full step %c1 iter_args({chunk_args}) -> ({lanes_ty}) {{
      %coff = arith.muli %i, %cChunk : index
      %ccol = arith.addi %u_start, %coff : index
{chunk_loads}{chunk_sums}      scf.yield {chunk_out} : {lanes_ty}
    }}
    scf.yield {sl} : {lanes_ty}
  }}
{fold}  %full_t = arith.divui %u_len, %cChunk : index
  %whole = arith.muli %full_t, %cChunk : index
  %tail0 = arith.addi %u_start, %whole : index
  %s = scf.for %col = %tail0 to %u_end step %c1 iter_args(%acc = %f{last_lane}) -> (f64) {{
{w}    %wd = arith.extf %w : f32 to f64
    %n = arith.addf %acc, %wd : f64
    scf.yield %n : f64
  }}
  memref.store %s, %sh_bsum[%b] : {sh_bsum}
}}
",
        groups = DRAW_BLOCK / group,
        span = indent2(&block_span("%b", "%u")),
        wide_args = lane_args("%zd"),
        chunk_args = lane_args("%zd"),
        wide_loads = indent6(&wide_loads),
        wide_sums = indent6(&wide_sums),
        wide_out = wide_out.join(", "),
        wl = (0..LANES).map(|j| format!("%wl#{j}")).collect::<Vec<_>>().join(", "),
        chunk_loads = indent6(&chunk_loads),
        chunk_sums = indent6(&chunk_sums),
        chunk_out = chunk_out.join(", "),
        sl = (0..LANES).map(|j| format!("%sl#{j}")).collect::<Vec<_>>().join(", "),
        last_lane = LANES - 1,
        w = indent2(&indent2(&weight("%col", "%w"))),
    ));
    // Thread 0: the total, the draw, the first block it does not pass (every block's sum read, the
    // loop of fixed length: its loads need not wait for the comparisons).
    phases.push(format!(
        "{values}%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %total = scf.for %b = %c0 to %cBlocks step %c1 iter_args(%acc = %zd) -> (f64) {{
    %s = memref.load %sh_bsum[%b] : {sh_bsum}
    %n = arith.addf %acc, %s : f64
    scf.yield %n : f64
  }}
  %ub = memref.load %uniform[%row] : memref<?xi64>
  %u = arith.bitcast %ub : i64 to f64
  %r0 = arith.mulf %u, %total : f64
  %true = arith.constant true
  %walk:2 = scf.for %b = %c0 to %cBlocks step %c1 iter_args(%r = %r0, %at = %cBlocks) -> (f64, index) {{
    %s = memref.load %sh_bsum[%b] : {sh_bsum}
    %open = arith.cmpi eq, %at, %cBlocks : index
    %ge = arith.cmpf oge, %r, %s : f64
    %pass = arith.andi %open, %ge : i1
    %less = arith.subf %r, %s : f64
    %nr = arith.select %pass, %less, %r : f64
    %short = arith.xori %ge, %true : i1
    %stop = arith.andi %open, %short : i1
    %nat = arith.select %stop, %b, %at : index
    scf.yield %nr, %nat : f64, index
  }}
  %hit = arith.index_cast %walk#1 : index to i32
  memref.store %hit, %sh_hit[%c0] : {sh_hit}
  memref.store %walk#0, %sh_r[%c0] : {sh_r}
}}
",
    ));
    // That block's weights, a thread each (strided where the block is narrower than the draw's).
    phases.push(format!(
        "{values}%hit32 = memref.load %sh_hit[%c0] : {sh_hit}
%hit = arith.index_cast %hit32 : i32 to index
%inb = arith.cmpi ult, %hit, %cBlocks : index
scf.if %inb {{
{span}  scf.for %i = %tid to %u_len step %cT {{
    %col = arith.addi %u_start, %i : index
{w}    memref.store %w, %sh_w[%i] : {sh_w}
  }}
}}
",
        span = indent2(&block_span("%hit", "%u")),
        w = indent2(&indent2(&weight("%col", "%w"))),
    ));
    // Thread 0: the walk through that block's weights (a loop of fixed length), then — rounding left
    // the draw past its last token — on through the next blocks, their weights computed again; the
    // last column where it runs past the row; -1 for a temperature not above 0.
    phases.push(format!(
        "{values}%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %hit32 = memref.load %sh_hit[%c0] : {sh_hit}
  %hit = arith.index_cast %hit32 : i32 to index
  %r0 = memref.load %sh_r[%c0] : {sh_r}
  %none = arith.constant -1 : i32
  %true = arith.constant true
  %inb = arith.cmpi ult, %hit, %cBlocks : index
  %cached:2 = scf.if %inb -> (f64, i32) {{
{span_hit}    %in:2 = scf.for %i = %c0 to %h_len step %c1 iter_args(%ri = %r0, %fi = %none) -> (f64, i32) {{
      %wc = memref.load %sh_w[%i] : {sh_w}
{step}      scf.yield %nr, %nf : f64, i32
    }}
    scf.yield %in#0, %in#1 : f64, i32
  }} else {{
    scf.yield %r0, %none : f64, i32
  }}
  %after = arith.addi %hit, %c1 : index
  %walk:3 = scf.while (%b = %after, %r = %cached#0, %f = %cached#1) : (index, f64, i32) -> (index, f64, i32) {{
    %inb2 = arith.cmpi ult, %b, %cBlocks : index
    %open = arith.cmpi slt, %f, %c0_i32 : i32
    %go = arith.andi %inb2, %open : i1
    scf.condition(%go) %b, %r, %f : index, f64, i32
  }} do {{
  ^bb0(%b: index, %r: f64, %f: i32):
{skip}    %landed = arith.cmpi ult, %past#0, %cBlocks : index
    %res:2 = scf.if %landed -> (f64, i32) {{
{span}      %in:2 = scf.for %i = %c0 to %u_len step %c1 iter_args(%ri = %past#1, %fi = %none) -> (f64, i32) {{
        %col = arith.addi %u_start, %i : index
{w}{step2}        scf.yield %nr, %nf : f64, i32
      }}
      scf.yield %in#0, %in#1 : f64, i32
    }} else {{
      scf.yield %past#1, %none : f64, i32
    }}
    %next = arith.addi %past#0, %c1 : index
    scf.yield %next, %res#0, %res#1 : index, f64, i32
  }}
  %found = arith.cmpi sge, %walk#2, %c0_i32 : i32
  %lastcol = arith.subi %cD, %c1 : index
  %last32 = arith.index_cast %lastcol : index to i32
  %picked = arith.select %found, %walk#2, %last32 : i32
  %sampled = arith.cmpf ogt, %t, %zf : f32
  %out = arith.select %sampled, %picked, %none : i32
  memref.store %out, %idx[%row] : memref<?xi32>
}}
",
        values = values.clone() + "%c0_i32 = arith.constant 0 : i32\n%zf = arith.constant 0.0 : f32\n",
        span_hit = indent4(&block_span("%hit", "%h")),
        span = indent6(&block_span("%past#0", "%u")),
        step = indent6(&walk_step("%h_start", "%wc")),
        step2 = indent4(&indent4(&walk_step("%u_start", "%w"))),
        w = indent4(&indent4(&weight("%col", "%w"))),
        skip = indent4(&skip_blocks("%b", "%r", "%past", &sh_bsum)),
    ));
    phases
}

/// `{out}:2` = (the first block from `{from}` whose sum `{r}` falls short of, `{r}` less the
/// sums of the blocks before it): the host's `if r >= sum { r -= sum; continue }`.
fn skip_blocks(from: &str, r: &str, out: &str, sh_bsum: &str) -> String {
    format!(
        "{out}:2 = scf.while (%sb = {from}, %sr = {r}) : (index, f64) -> (index, f64) {{
  %sin = arith.cmpi ult, %sb, %cBlocks : index
  %spass = scf.if %sin -> (i1) {{
    %ss = memref.load %sh_bsum[%sb] : {sh_bsum}
    %sge = arith.cmpf oge, %sr, %ss : f64
    scf.yield %sge : i1
  }} else {{
    %sno = arith.constant false
    scf.yield %sno : i1
  }}
  scf.condition(%spass) %sb, %sr : index, f64
}} do {{
^bb0(%sb: index, %sr: f64):
  %ss = memref.load %sh_bsum[%sb] : {sh_bsum}
  %snr = arith.subf %sr, %ss : f64
  %snb = arith.addi %sb, %c1 : index
  scf.yield %snb, %snr : index, f64
}}
"
    )
}

/// One token of a block's walk: its weight `weight` (f32) against what is left of the draw `%ri`,
/// the token found so far `%fi` (-1: none): the host's `if r < p { return i } r -= p`, column
/// `start + %i`; into `%nr`, `%nf`.
fn walk_step(start: &str, weight: &str) -> String {
    format!(
        "%p = arith.extf {weight} : f32 to f64
%opened = arith.cmpi slt, %fi, %c0_i32 : i32
%lt = arith.cmpf olt, %ri, %p : f64
%take = arith.andi %opened, %lt : i1
%col_i = arith.addi {start}, %i : index
%col32 = arith.index_cast %col_i : index to i32
%nf = arith.select %take, %col32, %fi : i32
%short = arith.xori %lt, %true : i1
%sub = arith.andi %opened, %short : i1
%less = arith.subf %ri, %p : f64
%nr = arith.select %sub, %less, %ri : f64
"
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::{placed, raw, requests_of, run_cpu, run_simulated, values};
    use super::super::RowOp;
    use super::*;
    use v3c_models::sampling::draw_every_token;

    /// Rows of `d` logits with a (temperature, uniform draw) each, and what the host draws.
    struct Case {
        d: usize,
        x: Vec<f32>,
        draws: Vec<(f32, f64)>,
    }

    impl Case {
        fn rows(&self) -> usize {
            self.draws.len()
        }

        /// The host sampler's tokens (-1 where the temperature is not above 0).
        fn want(&self) -> Vec<i32> {
            let d = self.d;
            (0..self.rows())
                .map(|r| {
                    let (t, u) = self.draws[r];
                    if t > 0.0 {
                        draw_every_token(&self.x[r * d..(r + 1) * d], t, u) as i32
                    } else {
                        -1
                    }
                })
                .collect()
        }

        /// The kernel's tokens, through the CPU lowering or the PTX simulated (the logits
        /// `shift` elements past 128 bytes), and the simulated launch's 16-byte load requests.
        fn run(&self, kernel: &RowKernel, simulated: bool, shift: usize) -> (Vec<i32>, u64) {
            let rows = self.rows();
            let mut x = placed(&self.x, shift);
            let mut t: Vec<f32> = self.draws.iter().map(|d| d.0).collect();
            let mut u: Vec<i64> = self.draws.iter().map(|d| d.1.to_bits() as i64).collect();
            let mut idx = vec![i32::MIN; rows];
            let buffers = [
                raw(x.slice(), &[rows, self.d], "f32"),
                raw(&mut t, &[rows], "f32"),
                raw(&mut u, &[rows], "i64"),
                raw(&mut idx, &[rows], "i32"),
            ];
            let wide = match simulated {
                true => requests_of(&run_simulated(kernel, &buffers, rows), &["ld.global.v4"]),
                false => {
                    run_cpu(kernel, &buffers);
                    0
                }
            };
            (idx, wide)
        }
    }

    /// Rows of `d` logits: random ones at several scales and temperatures, draws over [0, 1) and
    /// at its ends, and draws on the blocks' boundaries (the total's share before each block, and
    /// a few ulps either side: where `r >= sum` and the walk's rounding decide); a row with -inf
    /// logits (masked tokens), one with a NaN, one all -inf, one whose weights are one token's,
    /// and rows at temperatures 0 and below (not sampled: -1).
    fn case(d: usize, seed: u64) -> Case {
        let mut x = Vec::new();
        let mut draws = Vec::new();
        let mut row = |logits: Vec<f32>, t: f32, u: f64| {
            assert_eq!(logits.len(), d);
            x.extend(logits);
            draws.push((t, u));
        };
        let us = values(16, seed, 1.0);
        for (k, &v) in us.iter().enumerate() {
            let scale = [0.5f32, 4.0, 20.0, 60.0][k % 4];
            let t = [0.7f32, 1.0, 0.05, 1.7][k / 4 % 4];
            row(values(d, seed * 100 + k as u64, scale), t, f64::from(v) + 0.5);
        }
        let base = values(d, seed + 7, 8.0);
        for u in [0.0, 1.0 - f64::EPSILON / 2.0, 0.5] {
            row(base.clone(), 0.8, u);
        }
        // The block boundaries of `base` at 0.8: u = (sum of the blocks before) / total, nudged.
        let max = base.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        let weights: Vec<f64> = base.iter().map(|&l| f64::from(v3c_models::sampling::exp((l - max) / 0.8))).collect();
        let total: f64 = weights.iter().sum();
        let mut before = 0.0;
        for b in 1..d.div_ceil(DRAW_BLOCK).min(4) {
            before += weights[(b - 1) * DRAW_BLOCK..b * DRAW_BLOCK].iter().sum::<f64>();
            let u = before / total;
            for ulps in -4i64..=4 {
                row(base.clone(), 0.8, f64::from_bits((u.to_bits() as i64 + ulps) as u64));
            }
        }
        let mut masked = values(d, seed + 8, 8.0);
        masked.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY);
        row(masked, 1.0, 0.37);
        let mut nan = values(d, seed + 9, 8.0);
        nan[d / 2] = f32::NAN;
        row(nan, 1.0, 0.61);
        row(vec![f32::NEG_INFINITY; d], 1.0, 0.2);
        let mut one = vec![-1e4f32; d];
        one[d - 1] = 3.0;
        row(one, 1.0, 0.9);
        row(base.clone(), 0.0, 0.5);
        row(base, -1.0, 0.5);
        Case { d, x, draws }
    }

    /// The CPU lowering draws the host sampler's tokens, bit for bit: at DeepSeek-V3's vocabulary
    /// (whole blocks of 256), and at widths with a partial last block, a tail past its whole
    /// chunks of 8, or less than one chunk; blocks of 1024 threads and of 32.
    #[test]
    fn sampled_rows_are_the_host_samplers_draws() {
        for (d, threads, seed) in [(129_280, 1024, 1), (1003, 1024, 2), (1003, 32, 3), (5, 32, 4), (2051, 64, 5)] {
            let case = case(d, seed);
            let mut kernel = RowKernel::new(RowOp::Sample, d, "f32");
            kernel.threads = threads;
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()));
            let want = case.want();
            assert_eq!(case.run(&kernel, false, 0).0, want, "{}", kernel.kernel_name());
            // Not every draw the same token: the random rows' draws reach into them.
            let distinct: std::collections::HashSet<_> = want[..16].iter().collect();
            assert!(distinct.len() >= 12.min(d), "{want:?}");
        }
    }

    /// The sm_90a PTX, simulated, draws the same tokens (no fused multiply-add or approximate
    /// division in it: they would move the weights' bits): with the rows on 16 bytes (whole blocks'
    /// columns and the maximum's 4 at a time) and an element off (one at a time); rows of whole
    /// blocks and with a partial one.
    #[test]
    fn sampled_rows_simulated_are_the_host_samplers_draws() {
        for (d, threads, seed) in [(1004, 128, 11), (2048, 512, 12), (1003, 64, 14)] {
            let case = case(d, seed);
            let mut kernel = RowKernel::new(RowOp::Sample, d, "f32");
            kernel.threads = threads;
            for shift in [0, 1] {
                let (got, wide) = case.run(&kernel, true, shift);
                let name = format!("{} (PTX simulated, logits {shift} past 128 bytes)", kernel.kernel_name());
                assert_eq!(got, case.want(), "{name}");
                assert_eq!(wide > 0, shift == 0 && d % 4 == 0, "{name}: 16-byte loads");
            }
        }
        if std::env::var("V3C_SAMPLE_STATS").is_ok() {
            let case = case(129_280, 13);
            let kernel = RowKernel::new(RowOp::Sample, 129_280, "f32");
            let rows = 1;
            let mut x = case.x[..129_280].to_vec();
            let (mut t, mut u, mut idx) = (vec![case.draws[0].0], vec![case.draws[0].1.to_bits() as i64], vec![0i32]);
            let stats = run_simulated(
                &kernel,
                &[
                    raw(&mut x, &[rows, 129_280], "f32"),
                    raw(&mut t, &[rows], "f32"),
                    raw(&mut u, &[rows], "i64"),
                    raw(&mut idx, &[rows], "i32"),
                ],
                rows,
            );
            eprintln!(
                "{}: {} instructions, {} longest thread, {} load rounds",
                kernel.kernel_name(),
                stats.instructions,
                stats.longest_thread,
                stats.load_rounds
            );
        }
        let context = crate::mlir::new_context();
        let kernel = RowKernel::new(RowOp::Sample, 129_280, "f32");
        let ptx = crate::conversion::sm90::compile_rows(&context, &kernel, &crate::target::SM90A).unwrap().ptx;
        assert!(!ptx.contains("fma.") && !ptx.contains(".approx") && !ptx.contains(".ftz"), "{ptx}");
        assert!(ptx.contains("div.rn.f32"), "IEEE division");
    }
}
