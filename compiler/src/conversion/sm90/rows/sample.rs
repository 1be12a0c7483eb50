//! Sampling on the device ([`RowOp::Sample`](super::RowOp::Sample)): a row's token drawn at a
//! temperature, with every token weighed or from a list (its top k, its top-p nucleus, its tokens
//! of at least min-p of the largest weight, or several of these), the host sampler's draw
//! ([`v3c_models::sampling::draw_plain`]) bit for bit, so that a decode step's sampled tokens need
//! neither the logits read back (33 MB a step at 64 rows of DeepSeek-V3's vocabulary) nor the
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
//! next blocks; the last token where it runs past the row. Top-p: the nucleus, the tokens most
//! probable first (ties: the lower column) while their sum in that order falls short of top-p of
//! the total, and the one that reaches it; the same draw over it in that order. Min-p: of the list
//! (most probable first: a prefix), the tokens of at least min-p (the largest weight is 1); alone,
//! every token of at least min-p in column order (the host weighs every token, in id order, then
//! thins them).
//!
//! Phases: the maximum (a strided share a thread, then a tree); every block's sum, a thread a
//! block (top-p: its weights binned too); thread 0 adds the blocks and finds the block the draw
//! falls in; that block's weights computed by the threads; thread 0 walks them (top-p: finds the
//! bins that hold the nucleus); top-p: the candidates gathered, bitonic-sorted, and thread 0's
//! nucleus and draw.

use std::fmt::Write;

use v3c_models::sampling::{DRAW_BLOCK, EXP_F32};

use super::{aligned, indent2, indent4, indent6, tree_phases, Lowering, RowKernel, VEC};

/// The running sums a block's weights are added in (the host's `weight_sum`).
const LANES: usize = 8;

const _: () = assert!(DRAW_BLOCK.is_multiple_of(UNROLL * VEC) && (UNROLL * VEC).is_multiple_of(LANES));

/// The shared arrays (the 8-byte ones first: nothing pads them): every block's sum (then the
/// nucleus's blocks'); what is left of the draw in the drawn block (top-p: the share to reach);
/// the nucleus's histogram of weights' masses by bin ([`BINS`]); its candidates' sort keys; the threads'
/// maxima; the drawn block's weights; the drawn block; the histogram's counts; each block's largest
/// weight's bits; the nucleus's bookkeeping ([`AUX`]).
pub(super) fn shared(d: usize, threads: usize) -> Vec<(&'static str, usize)> {
    let blocks = d.div_ceil(DRAW_BLOCK);
    vec![
        ("sh_bsum", blocks),
        ("sh_r", 1),
        ("sh_mass", BINS),
        ("sh_nkey", nucleus_cap(d)),
        ("sh_max", threads),
        ("sh_w", DRAW_BLOCK),
        ("sh_hit", 1),
        ("sh_cnt", BINS),
        ("sh_bmax", blocks),
        ("sh_aux", AUX),
    ]
}

/// Most candidates of a top-p nucleus the kernel sorts (a power of two, at most the row's width
/// rounded up to one): a row whose nucleus may need more is left to the host
/// ([`v3c_runtime::lowering::SAMPLE_ON_HOST`]).
pub const NUCLEUS_CAP: usize = 2048;

fn nucleus_cap(d: usize) -> usize {
    NUCLEUS_CAP.min(d.next_power_of_two())
}

/// Bins of the weights' histogram: a weight's bits' top 12 (sign, exponent, 3 mantissa bits: the
/// host's `weight_bin`), 1016 for 1.0, the largest weight.
const BINS: usize = 1024;

/// The nucleus's bookkeeping (`sh_aux`): a weight was NaN; the candidates' bin; their count; the
/// next free candidate slot; whether the kernel sorts them.
const AUX: usize = 5;
const AUX_BAD: usize = 0;
const AUX_CUT: usize = 1;
const AUX_COUNT: usize = 2;
const AUX_NEXT: usize = 3;
const AUX_GO: usize = 4;

/// How far over top-p's share the histogram's (unordered) masses must reach before their bins
/// are taken for the candidates: the sorted sum of the same weights differs by rounding only
/// (~n 2^-53 of it), so the candidates' own sum then reaches the share.
const CUT_MARGIN: f64 = 1e-9;

/// Chunks of [`VEC`] columns a thread loads before using them (the maximum's scan, a block's sums
/// where the row is on 16 bytes).
const UNROLL: usize = 8;

/// The constants of an exponential's reduction as MLIR constants of type `ty`: the clamps, log2 e,
/// the rounding constant, ln 2 in two parts, the polynomial's coefficients.
pub(super) struct ExpConstants {
    pub ty: &'static str,
    pub low: String,
    pub high: String,
    pub log2e: String,
    pub round: String,
    pub ln2_hi: String,
    pub ln2_lo: String,
    pub poly: Vec<String>,
}

impl ExpConstants {
    /// `[low, high, log2e, round, ln2_hi, ln2_lo]` and `poly` as constants of `ty` (`f32`: each
    /// value an f32's, exactly), by their bits.
    pub fn new(ty: &'static str, [low, high, log2e, round, ln2_hi, ln2_lo]: [f64; 6], poly: &[f64]) -> ExpConstants {
        let c = |v: f64| match ty {
            "f32" => format!("0x{:08X}", (v as f32).to_bits()),
            _ => format!("0x{:016X}", v.to_bits()),
        };
        let (low, high, log2e, round, ln2_hi, ln2_lo) = (c(low), c(high), c(log2e), c(round), c(ln2_hi), c(ln2_lo));
        ExpConstants { ty, low, high, log2e, round, ln2_hi, ln2_lo, poly: poly.iter().map(|&v| c(v)).collect() }
    }
}

/// The steps [`v3c_models::sampling::exp`] and [`v3c_models::sampling::exp64`] share, operation
/// for operation: `{x}` clamped, `{out}_n` its nearest integer multiple of ln 2 (by adding and
/// subtracting `round`: `{out}_t` the sum), `{out}_r` the reduced argument (ln 2 in two parts),
/// and `{out}_er` = e^r by Horner's rule over the coefficients (a multiply then an add each), then
/// `((p r) r + r) + 1`.
pub(super) fn exp_reduced(x: &str, out: &str, e: &ExpConstants) -> String {
    let ty = e.ty;
    let mut s = format!(
        "{out}_lo = arith.constant {lo} : {ty}
{out}_hi = arith.constant {hi} : {ty}
{out}_below = arith.cmpf olt, {x}, {out}_lo : {ty}
{out}_c0 = arith.select {out}_below, {out}_lo, {x} : {ty}
{out}_above = arith.cmpf ogt, {out}_c0, {out}_hi : {ty}
{out}_c = arith.select {out}_above, {out}_hi, {out}_c0 : {ty}
{out}_log2e = arith.constant {log2e} : {ty}
{out}_round = arith.constant {round} : {ty}
{out}_t0 = arith.mulf {out}_c, {out}_log2e : {ty}
{out}_t = arith.addf {out}_t0, {out}_round : {ty}
{out}_n = arith.subf {out}_t, {out}_round : {ty}
{out}_ln2hi = arith.constant {ln2hi} : {ty}
{out}_ln2lo = arith.constant {ln2lo} : {ty}
{out}_nh = arith.mulf {out}_n, {out}_ln2hi : {ty}
{out}_r0 = arith.subf {out}_c, {out}_nh : {ty}
{out}_nl = arith.mulf {out}_n, {out}_ln2lo : {ty}
{out}_r = arith.subf {out}_r0, {out}_nl : {ty}
{out}_p0 = arith.constant {p0} : {ty}
",
        lo = e.low,
        hi = e.high,
        log2e = e.log2e,
        round = e.round,
        ln2hi = e.ln2_hi,
        ln2lo = e.ln2_lo,
        p0 = e.poly[0],
    );
    for (k, coefficient) in e.poly.iter().enumerate().skip(1) {
        let _ = write!(
            s,
            "{out}_pm{k} = arith.mulf {out}_p{prev}, {out}_r : {ty}
{out}_pc{k} = arith.constant {coefficient} : {ty}
{out}_p{k} = arith.addf {out}_pm{k}, {out}_pc{k} : {ty}
",
            prev = k - 1,
        );
    }
    let last = e.poly.len() - 1;
    let _ = write!(
        s,
        "{out}_pr = arith.mulf {out}_p{last}, {out}_r : {ty}
{out}_prr = arith.mulf {out}_pr, {out}_r : {ty}
{out}_s = arith.addf {out}_prr, {out}_r : {ty}
{out}_one = arith.constant 1.0 : {ty}
{out}_er = arith.addf {out}_s, {out}_one : {ty}
"
    );
    s
}

/// `{out} = exp({x})` (f32) as [`v3c_models::sampling::exp`] computes it, operation for operation:
/// [`exp_reduced`], then `2^n` as two powers of two from the rounded sum's bits, NaN kept.
fn exp_f32(x: &str, out: &str) -> String {
    let e = &EXP_F32;
    let values = [e.low, e.high, e.log2e, e.round, e.ln2_hi, e.ln2_lo].map(f64::from);
    let mut s = exp_reduced(x, out, &ExpConstants::new("f32", values, &e.poly.map(f64::from)));
    let _ = write!(
        s,
        "{out}_tb = arith.bitcast {out}_t : f32 to i32
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
        round_bits = e.round.to_bits() as i32,
    );
    s
}

/// A top-p row's weight `w` (f32; `{w}_f` its f64 widening) into the histogram: its mass and
/// count into its bin (the host's `weight_bin`: its bits' top 12), its bits into block `%b`'s
/// largest (`%sh_bmax[%b]`); a NaN marks the row the host's (its bin held to the last). Each
/// weight right after it is computed, so that a step's weights are not all kept for it.
fn histogram(w: &str, sh: &Histogram) -> String {
    format!(
        "scf.if %nuc {{
  {w}_c20 = arith.constant 20 : i32
  {w}_h1 = arith.constant 1 : i32
  {w}_last = arith.constant {last} : index
  {w}_bits = arith.bitcast {w} : f32 to i32
  {w}_bin32 = arith.shrui {w}_bits, {w}_c20 : i32
  {w}_bin0 = arith.index_cast {w}_bin32 : i32 to index
  {w}_bin = arith.minui {w}_bin0, {w}_last : index
  {w}_om = memref.atomic_rmw addf {w}_f, %sh_mass[{w}_bin] : (f64, {mass}) -> f64
  {w}_oc = memref.atomic_rmw addi {w}_h1, %sh_cnt[{w}_bin] : (i32, {cnt}) -> i32
  {w}_ob = memref.atomic_rmw maxu {w}_bits, %sh_bmax[%b] : (i32, {bmax}) -> i32
  {w}_isnan = arith.cmpf uno, {w}, {w} : f32
  scf.if {w}_isnan {{
    {w}_cbad = arith.constant {AUX_BAD} : index
    memref.store {w}_h1, %sh_aux[{w}_cbad] : {aux}
  }}
}}
",
        last = BINS - 1,
        mass = sh.mass,
        cnt = sh.cnt,
        bmax = sh.bmax,
        aux = sh.aux,
    )
}

/// The histogram's shared arrays' types.
struct Histogram {
    mass: String,
    cnt: String,
    bmax: String,
    aux: String,
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
%topp = memref.load %top_p[%row] : memref<?xf32>
%one_f = arith.constant 1.0 : f32
%zero_f = arith.constant 0.0 : f32
%below_one = arith.cmpf olt, %topp, %one_f : f32
%warm = arith.cmpf ogt, %t, %zero_f : f32
%topk = memref.load %top_k[%row] : memref<?xi32>
%zero_k = arith.constant 0 : i32
%d_k = arith.constant {d} : i32
%k_pos = arith.cmpi sgt, %topk, %zero_k : i32
%k_less = arith.cmpi slt, %topk, %d_k : i32
%kact = arith.andi %k_pos, %k_less : i1
%by_weight = arith.ori %below_one, %kact : i1
%minp = memref.load %min_p[%row] : memref<?xf32>
%minp_act = arith.cmpf ogt, %minp, %zero_f : f32
%sorted_draw = arith.ori %by_weight, %minp_act : i1
%true_v = arith.constant true
%nuc = arith.andi %sorted_draw, %warm : i1
// Min-p alone: its tokens in column order (the host's, every token's order, thinned).
%not_by_weight = arith.xori %by_weight, %true_v : i1
%idord = arith.andi %minp_act, %not_by_weight : i1
// The bin of min-p's bits (0 without): a weight of at least min-p lies in it or above.
%minp_bits = arith.bitcast %minp : f32 to i32
%c20_mp = arith.constant 20 : i32
%minbin_raw = arith.shrui %minp_bits, %c20_mp : i32
%minbin = arith.select %minp_act, %minbin_raw, %zero_k : i32
// Min-p without top-k: only tokens of at least min-p are gathered.
%not_k_v = arith.xori %kact, %true_v : i1
%minp_cut = arith.andi %minp_act, %not_k_v : i1
%cBlk = arith.constant {DRAW_BLOCK} : index
%cLanes = arith.constant {LANES} : index
%cBlocks = arith.constant {blocks} : index
%zd = arith.constant 0.0 : f64
",
        blocks = kernel.d.div_ceil(DRAW_BLOCK),
        d = kernel.d,
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

/// The phase storing each thread's largest logit of the row into `%sh_max[%tid]` (after
/// `check`, which sets `wide`: the row on 16 bytes), NaNs passed over (a comparison a NaN never
/// wins), -inf for none: where wide, [`UNROLL`] chunks of 4 columns a step (their loads first; a
/// chunk past the row's whole chunks is chunk 0 again), then the columns past the whole chunks;
/// else a column at a time. Then [`max_tree`].
pub(super) fn max_phase(kernel: &RowKernel, check: &str, wide: &str, sh_max: &str) -> String {
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
    format!(
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
    )
}

/// The tree of phases taking the threads' largest logits (`%sh_max`) into `%sh_max[0]`.
pub(super) fn max_tree(threads: usize, sh_max: &str) -> Vec<String> {
    tree_phases(
        threads,
        &format!(
            "%a = memref.load %sh_max[%tid] : {sh_max}
%b = memref.load %sh_max[%other] : {sh_max}
%gt = arith.cmpf ogt, %b, %a : f32
%n = arith.select %gt, %b, %a : f32
memref.store %n, %sh_max[%tid] : {sh_max}"
        ),
    )
}

pub(super) fn phases(kernel: &RowKernel, lowering: Lowering) -> Vec<String> {
    let sh = |name: &str| kernel.shared_type(name, lowering);
    let (sh_max, sh_bsum, sh_w, sh_hit, sh_r) = (sh("sh_max"), sh("sh_bsum"), sh("sh_w"), sh("sh_hit"), sh("sh_r"));
    let (sh_mass, sh_cnt, sh_aux, sh_nkey) = (sh("sh_mass"), sh("sh_cnt"), sh("sh_aux"), sh("sh_nkey"));
    let sh_bmax = sh("sh_bmax");
    let hist = Histogram { mass: sh_mass.clone(), cnt: sh_cnt.clone(), bmax: sh_bmax.clone(), aux: sh_aux.clone() };
    let values = row_values(kernel, &sh_max);
    // The row's base and stride on 16 bytes: its columns 4 at a time (the sm_90a lowering).
    let gpu = lowering == Lowering::Gpu;
    let check = aligned("al", 16, &[("%x", "memref<?x?xf32>", 4)]);
    let wide = if gpu { "%al" } else { "%false_al" };
    let check = format!("{check}%false_al = arith.constant false\n");
    let mut phases = vec![format!(
        "{max}// The top-p histogram and bookkeeping, zeroed.
%cBins = arith.constant {BINS} : index
%zero_i = arith.constant 0 : i32
%zero_d = arith.constant 0.0 : f64
scf.for %i = %tid to %cBins step %cT {{
  memref.store %zero_d, %sh_mass[%i] : {sh_mass}
  memref.store %zero_i, %sh_cnt[%i] : {sh_cnt}
}}
%cAux = arith.constant {AUX} : index
%zaux = arith.cmpi ult, %tid, %cAux : index
scf.if %zaux {{
  memref.store %zero_i, %sh_aux[%tid] : {sh_aux}
}}
// The candidates' keys, 0 (below every candidate's) where none is gathered.
%cKeys = arith.constant {cap} : index
%zero_key = arith.constant 0 : i64
scf.for %i = %tid to %cKeys step %cT {{
  memref.store %zero_key, %sh_nkey[%i] : {sh_nkey}
}}
",
        max = max_phase(kernel, &check, wide, &sh_max),
        cap = nucleus_cap(kernel.d),
    )];
    phases.extend(max_tree(kernel.threads, &sh_max));
    // Every block's sum, a thread's: its LANES running sums over its whole chunks of 8 in order
    // (where wide and the block whole, UNROLL chunks of 4 columns a step, loaded first), the lanes
    // added in order, then its columns past its whole chunks.
    let lanes_ty = ["f64"; LANES].join(", ");
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
                "{w}_d = arith.subf {v}, %m : f32\n{w}_x = arith.divf {w}_d, %t : f32\n{}{w}_f = arith.extf {w} : f32 to f64\n%{prefix}s{k} = arith.addf {}, {w}_f : f64\n{}",
                exp_f32(&format!("{w}_x"), &w),
                lanes[k % LANES],
                histogram(&w, &hist),
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
%zero_bm = arith.constant 0 : i32
scf.for %b = %tid to %cBlocks step %cT {{
  memref.store %zero_bm, %sh_bmax[%b] : {sh_bmax}
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
{w}    %w_f = arith.extf %w : f32 to f64
    %n = arith.addf %acc, %w_f : f64
{tail_hist}    scf.yield %n : f64
  }}
  memref.store %s, %sh_bsum[%b] : {sh_bsum}
}}
",
        tail_hist = indent4(&histogram("%w", &hist)),
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
  // A listed row draws from its list, later: no walk here.
  %walked = arith.select %nuc, %c0, %cBlocks : index
  %walk:2 = scf.for %b = %c0 to %walked step %c1 iter_args(%r = %r0, %at = %cBlocks) -> (f64, index) {{
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
  // Top-p: no block drawn yet; the share of the total to reach.
  %pd = arith.extf %topp : f32 to f64
  %want = arith.mulf %pd, %total : f64
  %hit_at = arith.select %nuc, %cBlocks, %walk#1 : index
  %r_at = arith.select %nuc, %want, %walk#0 : f64
  %hit = arith.index_cast %hit_at : index to i32
  memref.store %hit, %sh_hit[%c0] : {sh_hit}
  memref.store %r_at, %sh_r[%c0] : {sh_r}
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
%true_c = arith.constant true
%notnuc = arith.xori %nuc, %true_c : i1
%walk_first = arith.andi %first, %notnuc : i1
scf.if %walk_first {{
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
%cut_first = arith.andi %first, %nuc : i1
scf.if %cut_first {{
{cut}}}
",
        values = values.clone() + "%c0_i32 = arith.constant 0 : i32\n%zf = arith.constant 0.0 : f32\n",
        cut = indent2(&nucleus_cut(kernel, &sh_r, &sh_mass, &sh_cnt, &sh_aux)),
        span_hit = indent4(&block_span("%hit", "%h")),
        span = indent6(&block_span("%past#0", "%u")),
        step = indent6(&walk_step("%h_start", "%wc")),
        step2 = indent4(&indent4(&walk_step("%u_start", "%w"))),
        w = indent4(&indent4(&weight("%col", "%w"))),
        skip = indent4(&skip_blocks("%b", "%r", "%past", &sh_bsum)),
    ));
    // Top-p: the candidates' sort keys, their sort, the nucleus's draw.
    phases.push(nucleus_gather(&values, &sh_nkey, &sh_aux, &sh_bmax));
    phases.extend(bitonic_phases(nucleus_cap(kernel.d), &sh_nkey, &sh_aux));
    phases.push(nucleus_draw(&values, &sh_bsum, &sh_r, &sh_nkey, &sh_aux));
    phases
}

/// Thread 0 of a listed row: the bins from the largest weights down to the first whose masses
/// reach the share (`%sh_r`) with [`CUT_MARGIN`] to spare (top-k: whose counts reach k; with
/// min-p and no top-k, not past min-p's bin: lighter tokens are never drawn), and their count:
/// the candidates, sorted here where they are at most the kernel's cap, else the row the host's
/// (as a row with a NaN weight is).
fn nucleus_cut(kernel: &RowKernel, sh_r: &str, sh_mass: &str, sh_cnt: &str, sh_aux: &str) -> String {
    let cap = nucleus_cap(kernel.d);
    format!(
        "%want = memref.load %sh_r[%c0] : {sh_r}
%margin = arith.constant {margin:e} : f64
%want_m = arith.mulf %want, %margin : f64
%zero_c = arith.constant 0 : i32
%cBins_c = arith.constant {BINS} : index
// From the top bin down while the masses fall short (a peaked row stops within a few bins); with
// min-p and no top-k, not past min-p's bin (top-p 1: to it).
%minbin_ix = arith.index_cast %minbin : i32 to index
%last_bin = arith.select %kact, %c0, %minbin_ix : index
%whole_p = arith.xori %below_one, %true_c : i1
%scan:3 = scf.while (%k = %cBins_c, %reached = %zd, %count = %zero_c) : (index, f64, i32) -> (index, f64, i32) {{
  %more = arith.cmpi ugt, %k, %last_bin : index
  %mass_short = arith.cmpf olt, %reached, %want_m : f64
  %count_short = arith.cmpi slt, %count, %topk : i32
  %p_short = arith.ori %mass_short, %whole_p : i1
  %short = arith.select %kact, %count_short, %p_short : i1
  %go_on = arith.andi %more, %short : i1
  scf.condition(%go_on) %k, %reached, %count : index, f64, i32
}} do {{
^bb0(%k: index, %reached: f64, %count: i32):
  %b = arith.subi %k, %c1 : index
  %mass = memref.load %sh_mass[%b] : {sh_mass}
  %cnt = memref.load %sh_cnt[%b] : {sh_cnt}
  %nreached = arith.addf %reached, %mass : f64
  %ncount = arith.addi %count, %cnt : i32
  scf.yield %b, %nreached, %ncount : index, f64, i32
}}
// The last bin taken (never reached: bin 0, the whole row).
%cut = arith.index_cast %scan#0 : index to i32
%cBadA = arith.constant {AUX_BAD} : index
%bad = memref.load %sh_aux[%cBadA] : {sh_aux}
%clean = arith.cmpi eq, %bad, %zero_c : i32
%capc = arith.constant {cap} : i32
%fits = arith.cmpi sle, %scan#2, %capc : i32
%go = arith.andi %clean, %fits : i1
%go32 = arith.extui %go : i1 to i32
%cCut = arith.constant {AUX_CUT} : index
%cCount = arith.constant {AUX_COUNT} : index
%cGo = arith.constant {AUX_GO} : index
memref.store %cut, %sh_aux[%cCut] : {sh_aux}
memref.store %scan#2, %sh_aux[%cCount] : {sh_aux}
memref.store %go32, %sh_aux[%cGo] : {sh_aux}
%host = arith.constant {host} : i32
%stay = arith.xori %go, %true_c : i1
scf.if %stay {{
  memref.store %host, %idx[%row] : memref<?xi32>
}}
",
        margin = 1.0 + CUT_MARGIN,
        host = v3c_runtime::lowering::SAMPLE_ON_HOST,
    )
}

/// `%go` (i1): this row is a top-p row whose candidates the kernel sorts.
fn nucleus_go(sh_aux: &str) -> String {
    format!(
        "%cGoF = arith.constant {AUX_GO} : index
%go32 = memref.load %sh_aux[%cGoF] : {sh_aux}
%zero_g = arith.constant 0 : i32
%go = arith.cmpi ne, %go32, %zero_g : i32
"
    )
}

/// A listed row's candidates (weights in the cut's bins or above; with min-p and no top-k, of at
/// least min-p too) as sort keys, a slot each in any order: the weight's bits above `0xFFFFFFFF -
/// column` (so that a larger key is a larger weight, or the same at a lower column: the host's
/// most-probable-first order), or with min-p alone the two words swapped (a larger key is a lower
/// column: the host's id order); the slots past them keep the keys of 0 the first phase stored,
/// below every candidate's. A thread a block, only blocks whose largest weight reaches the least
/// candidate's, their columns 8 loads at a time.
fn nucleus_gather(values: &str, sh_nkey: &str, sh_aux: &str, sh_bmax: &str) -> String {
    let mut loads = String::new();
    let mut keys = String::new();
    for k in 0..LANES {
        let _ = write!(
            loads,
            "%go{k} = arith.constant {k} : index
%gc{k} = arith.addi %gbase, %go{k} : index
%gin{k} = arith.cmpi ult, %gc{k}, %u_end : index
%gcs{k} = arith.select %gin{k}, %gc{k}, %u_start : index
%gv{k} = memref.load %x[%row, %gcs{k}] : memref<?x?xf32>
"
        );
        let _ = write!(
            keys,
            "%gw{k}_d = arith.subf %gv{k}, %m : f32
%gw{k}_x = arith.divf %gw{k}_d, %t : f32
{exp}%gbits{k} = arith.bitcast %gw{k} : f32 to i32
%gtop{k} = arith.cmpi uge, %gbits{k}, %floor : i32
%gcand{k} = arith.andi %gin{k}, %gtop{k} : i1
scf.if %gcand{k} {{
  %slot32 = memref.atomic_rmw addi %one_i, %sh_aux[%cNext] : (i32, {sh_aux}) -> i32
  %slot = arith.index_cast %slot32 : i32 to index
  %wb = arith.extui %gbits{k} : i32 to i64
  %col64 = arith.index_cast %gc{k} : index to i64
  %ncol = arith.subi %ones, %col64 : i64
  %hiw = arith.select %idord, %ncol, %wb : i64
  %low = arith.select %idord, %wb, %ncol : i64
  %hi = arith.shli %hiw, %c32_64 : i64
  %key = arith.ori %hi, %low : i64
  memref.store %key, %sh_nkey[%slot] : {sh_nkey}
}}
",
            exp = exp_f32(&format!("%gw{k}_x"), &format!("%gw{k}")),
        );
    }
    format!(
        "{values}{go}scf.if %go {{
  %cCutG = arith.constant {AUX_CUT} : index
  %cNext = arith.constant {AUX_NEXT} : index
  %cut = memref.load %sh_aux[%cCutG] : {sh_aux}
  %c20 = arith.constant 20 : i32
  %one_i = arith.constant 1 : i32
  %c32_64 = arith.constant 32 : i64
  %ones = arith.constant 4294967295 : i64
  %cEight = arith.constant {LANES} : index
  // The least candidate's bits: the cut's bin's first (a weight is in that bin or above when its
  // bits are at least those), or min-p's where it is larger and min-p thins the list here.
  %cut_bits = arith.shli %cut, %c20 : i32
  %minp_floor = arith.select %minp_cut, %minp_bits, %zero_k : i32
  %floor = arith.maxui %cut_bits, %minp_floor : i32
  scf.for %b = %tid to %cBlocks step %cT {{
    %bm = memref.load %sh_bmax[%b] : {sh_bmax}
    %reaches = arith.cmpi uge, %bm, %floor : i32
    scf.if %reaches {{
{span}      scf.for %gbase = %u_start to %u_end step %cEight {{
{loads}{keys}      }}
    }}
  }}
}}
",
        go = nucleus_go(sh_aux),
        span = indent6(&block_span("%b", "%u")),
        loads = indent4(&indent4(&loads)),
        keys = indent4(&indent4(&keys)),
    )
}

/// The bitonic network sorting `cap` keys in decreasing order, a phase per step (each thread a
/// strided share of the compare-exchanges), for top-p rows whose candidates the kernel sorts.
fn bitonic_phases(cap: usize, sh_nkey: &str, sh_aux: &str) -> Vec<String> {
    let mut phases = Vec::new();
    let mut k = 2;
    while k <= cap {
        let mut j = k / 2;
        while j >= 1 {
            phases.push(format!(
                "{go}scf.if %go {{
  %cHalf = arith.constant {half} : index
  %cj = arith.constant {j} : index
  %cj2 = arith.constant {j2} : index
  %ck = arith.constant {k} : index
  scf.for %p = %tid to %cHalf step %cT {{
    %q = arith.divui %p, %cj : index
    %rm = arith.remui %p, %cj : index
    %qb = arith.muli %q, %cj2 : index
    %i = arith.addi %qb, %rm : index
    %l = arith.addi %i, %cj : index
    %a = memref.load %sh_nkey[%i] : {sh_nkey}
    %b = memref.load %sh_nkey[%l] : {sh_nkey}
    %ik = arith.andi %i, %ck : index
    %down = arith.cmpi eq, %ik, %c0 : index
    %lt = arith.cmpi ult, %a, %b : i64
    %gt = arith.cmpi ugt, %a, %b : i64
    %swap = arith.select %down, %lt, %gt : i1
    scf.if %swap {{
      memref.store %b, %sh_nkey[%i] : {sh_nkey}
      memref.store %a, %sh_nkey[%l] : {sh_nkey}
    }}
  }}
}}
",
                go = nucleus_go(sh_aux),
                half = cap / 2,
                j2 = 2 * j,
            ));
            j /= 2;
        }
        k *= 2;
    }
    phases
}

/// `{p}_total` (f64) = the first `{n}` sorted candidates' sum as the host's draw takes it: blocks
/// of 256 each in 8 running sums over their whole chunks of 8 then the rest (`block_sum`), into
/// `%sh_bsum`, the blocks added in order; `{p}_blocks` of them.
fn sorted_blocks(n: &str, p: &str, sh_bsum: &str, sh_nkey: &str) -> String {
    let lane_names: Vec<String> = (0..LANES).map(|j| format!("{p}_l{j}")).collect();
    let mut lanes = String::new();
    for (j, lane) in lane_names.iter().enumerate() {
        let _ = write!(
            lanes,
            "{p}_o{j} = arith.constant {j} : index
{p}_e{j} = arith.addi {p}_ebase, {p}_o{j} : index
{p}_k{j} = memref.load %sh_nkey[{p}_e{j}] : {sh_nkey}
{w}{p}_n{j} = arith.addf {lane}, {p}_wd{j} : f64
",
            w = key_weight(&format!("{p}_k{j}"), &format!("{p}_wd{j}")),
        );
    }
    let mut fold = String::new();
    for j in 0..LANES {
        let prev = if j == 0 { "%zd".to_string() } else { format!("{p}_f{}", j - 1) };
        let _ = writeln!(fold, "{p}_f{j} = arith.addf {prev}, {p}_ls#{j} : f64");
    }
    let lanes_ty = ["f64"; LANES].join(", ");
    format!(
        "{p}_up = arith.addi {n}, %cBlk : index
{p}_up1 = arith.subi {p}_up, %c1 : index
{p}_blocks = arith.divui {p}_up1, %cBlk : index
{p}_total = scf.for {p}_b = %c0 to {p}_blocks step %c1 iter_args({p}_tacc = %zd) -> (f64) {{
  {p}_start = arith.muli {p}_b, %cBlk : index
  {p}_end0 = arith.addi {p}_start, %cBlk : index
  {p}_end = arith.minui {p}_end0, {n} : index
  {p}_len = arith.subi {p}_end, {p}_start : index
  {p}_full = arith.divui {p}_len, %cLanes : index
  {p}_ls:{LANES} = scf.for {p}_c = %c0 to {p}_full step %c1 iter_args({lane_args}) -> ({lanes_ty}) {{
    {p}_coff = arith.muli {p}_c, %cLanes : index
    {p}_ebase = arith.addi {p}_start, {p}_coff : index
{lanes}    scf.yield {new_lanes} : {lanes_ty}
  }}
{fold}  {p}_whole = arith.muli {p}_full, %cLanes : index
  {p}_rest0 = arith.addi {p}_start, {p}_whole : index
  {p}_bs = scf.for {p}_i = {p}_rest0 to {p}_end step %c1 iter_args({p}_racc = {p}_f{last}) -> (f64) {{
    {p}_key = memref.load %sh_nkey[{p}_i] : {sh_nkey}
{wr}    {p}_nr = arith.addf {p}_racc, {p}_wr : f64
    scf.yield {p}_nr : f64
  }}
  memref.store {p}_bs, %sh_bsum[{p}_b] : {sh_bsum}
  {p}_nt = arith.addf {p}_tacc, {p}_bs : f64
  scf.yield {p}_nt : f64
}}
",
        lane_args = lane_names.iter().map(|l| format!("{l} = %zd")).collect::<Vec<_>>().join(", "),
        lanes = indent4(&lanes),
        new_lanes = (0..LANES).map(|j| format!("{p}_n{j}")).collect::<Vec<_>>().join(", "),
        fold = indent2(&fold),
        last = LANES - 1,
        wr = indent4(&key_weight(&format!("{p}_key"), &format!("{p}_wr"))),
    )
}

/// Thread 0 of a row whose candidates are sorted: the list the host draws from — the top k (with
/// top-k), then of those (or of all) the nucleus, the most probable first while their sum in that
/// order falls short of top-p of theirs (with top-k: of the k's draw total; else of the row's, as
/// the share phase took it), and the one that reaches it (never reached: the k whole; without
/// top-k, the host's row, unless every token of at least min-p was gathered), then of those the
/// ones of at least min-p (a prefix; with min-p alone, the candidates in column order, all of
/// them) — then the host's draw over it (`draw_at`): its blocks summed
/// ([`sorted_blocks`]), `r = u * total`, blocks passed while `r` reaches their sum, the block it
/// falls in walked; the list's last token where it runs past.
fn nucleus_draw(values: &str, sh_bsum: &str, sh_r: &str, sh_nkey: &str, sh_aux: &str) -> String {
    format!(
        "{values}{go}%first = arith.cmpi eq, %tid, %c0 : index
%draw = arith.andi %go, %first : i1
scf.if %draw {{
  %cCountD = arith.constant {AUX_NEXT} : index
  %count32 = memref.load %sh_aux[%cCountD] : {sh_aux}
  %count = arith.index_cast %count32 : i32 to index
  %k_ix = arith.index_cast %topk : i32 to index
  %list = arith.select %kact, %k_ix, %count : index
  %row_want = memref.load %sh_r[%c0] : {sh_r}
  // With top-k and top-p: the share of the k's own draw total.
  %kwant = scf.if %kact -> (f64) {{
{k_total}    %pd = arith.extf %topp : f32 to f64
    %kw = arith.mulf %pd, %kt_total : f64
    scf.yield %kw : f64
  }} else {{
    scf.yield %row_want : f64
  }}
  %unset = arith.constant -1 : index
  %true = arith.constant true
  %ones = arith.constant 4294967295 : i64
  %nset:2 = scf.for %i = %c0 to %list step %c1 iter_args(%acc = %zd, %n = %unset) -> (f64, index) {{
    %key = memref.load %sh_nkey[%i] : {sh_nkey}
{wi}    %open = arith.cmpi eq, %n, %unset : index
    %sum = arith.addf %acc, %wdi : f64
    %reach = arith.cmpf oge, %sum, %kwant : f64
    %now = arith.andi %open, %reach : i1
    %i1 = arith.addi %i, %c1 : index
    %nn = arith.select %now, %i1, %n : index
    %nacc = arith.select %open, %sum, %acc : f64
    scf.yield %nacc, %nn : f64, index
  }}
  %never = arith.cmpi eq, %nset#1, %unset : index
  // Top-p 1 (top-k or min-p alone): the list whole; never reached with top-k: the k whole.
  %n_list = arith.select %never, %list, %nset#1 : index
  %n_p = arith.select %below_one, %n_list, %list : index
{min_end}  %n_pm = arith.minui %n_p, %n_m : index
  %short = arith.andi %never, %below_one : i1
  %not_k = arith.xori %kact, %true : i1
  // Never reached without top-k: the host's row, unless min-p's tokens were all gathered (then
  // they are the list).
  %cCutD = arith.constant {AUX_CUT} : index
  %cut_d = memref.load %sh_aux[%cCutD] : {sh_aux}
  %min_reached = arith.cmpi sle, %cut_d, %minbin : i32
  %covers = arith.andi %minp_act, %min_reached : i1
  %uncovered = arith.xori %covers, %true : i1
  %short_row = arith.andi %short, %not_k : i1
  %to_host0 = arith.andi %short_row, %uncovered : i1
  %empty = arith.cmpi eq, %n_pm, %c0 : index
  %to_host = arith.ori %to_host0, %empty : i1
  scf.if %to_host {{
    %host = arith.constant {host} : i32
    memref.store %host, %idx[%row] : memref<?xi32>
  }} else {{
    %n = arith.addi %n_pm, %c0 : index
{n_total}    %nblocks = arith.addi %nt_blocks, %c0 : index
    %ub = memref.load %uniform[%row] : memref<?xi64>
    %u = arith.bitcast %ub : i64 to f64
    %r0 = arith.mulf %u, %nt_total : f64
    %none = arith.constant -1 : i32
    %c0_n = arith.constant 0 : i32
    %walk:3 = scf.while (%b = %c0, %r = %r0, %f = %none) : (index, f64, i32) -> (index, f64, i32) {{
      %inb = arith.cmpi ult, %b, %nblocks : index
      %open = arith.cmpi slt, %f, %c0_n : i32
      %go_on = arith.andi %inb, %open : i1
      scf.condition(%go_on) %b, %r, %f : index, f64, i32
    }} do {{
    ^bb0(%b: index, %r: f64, %f: i32):
      %s = memref.load %sh_bsum[%b] : {sh_bsum}
      %pass = arith.cmpf oge, %r, %s : f64
      %res:2 = scf.if %pass -> (f64, i32) {{
        %less = arith.subf %r, %s : f64
        scf.yield %less, %none : f64, i32
      }} else {{
        %start = arith.muli %b, %cBlk : index
        %end0 = arith.addi %start, %cBlk : index
        %end = arith.minui %end0, %n : index
        %in:2 = scf.for %i = %start to %end step %c1 iter_args(%ri = %r, %fi = %none) -> (f64, i32) {{
          %key = memref.load %sh_nkey[%i] : {sh_nkey}
{wi3}          %p = arith.extf %wf : f32 to f64
          %opened = arith.cmpi slt, %fi, %c0_n : i32
          %lt = arith.cmpf olt, %ri, %p : f64
          %take = arith.andi %opened, %lt : i1
{id}          %nf = arith.select %take, %id, %fi : i32
          %nlt = arith.xori %lt, %true : i1
          %sub = arith.andi %opened, %nlt : i1
          %rl = arith.subf %ri, %p : f64
          %nr = arith.select %sub, %rl, %ri : f64
          scf.yield %nr, %nf : f64, i32
        }}
        scf.yield %in#0, %in#1 : f64, i32
      }}
      %nb = arith.addi %b, %c1 : index
      scf.yield %nb, %res#0, %res#1 : index, f64, i32
    }}
    // Past the list's end: its last token.
    %lastn = arith.subi %n, %c1 : index
    %lastk = memref.load %sh_nkey[%lastn] : {sh_nkey}
{last_id}    %found = arith.cmpi sge, %walk#2, %c0_n : i32
    %pick = arith.select %found, %walk#2, %lastid : i32
    memref.store %pick, %idx[%row] : memref<?xi32>
  }}
}}
",
        go = nucleus_go(sh_aux),
        host = v3c_runtime::lowering::SAMPLE_ON_HOST,
        wi = indent4(&key_weight("%key", "%wdi")),
        min_end = indent2(&min_p_end(sh_nkey)),
        k_total = indent4(&sorted_blocks("%k_ix", "%kt", sh_bsum, sh_nkey)),
        n_total = indent4(&sorted_blocks("%n", "%nt", sh_bsum, sh_nkey)),
        wi3 = indent4(&indent6(&key_weight_f32("%key", "%wf"))),
        id = indent4(&indent6(&key_column("%key", "%id"))),
        last_id = indent4(&key_column("%lastk", "%lastid")),
    )
}

/// `%n_m` (index) = where min-p ends a list sorted most probable first (`%list` keys): the first
/// key whose weight is below min-p — a key below `min-p's bits << 32` — by a binary search; the
/// list whole without min-p or with min-p alone (the keys in column order, all of at least min-p).
fn min_p_end(sh_nkey: &str) -> String {
    format!(
        "%mp_c32 = arith.constant 32 : i64
%mp_bits64 = arith.extui %minp_bits : i32 to i64
%mp_key = arith.shli %mp_bits64, %mp_c32 : i64
%mp_by_weight = arith.xori %idord, %true : i1
%mp_search = arith.andi %minp_act, %mp_by_weight : i1
%mp_hi0 = arith.select %mp_search, %list, %c0 : index
%mp_two = arith.constant 2 : index
%mp_end:2 = scf.while (%mp_lo = %c0, %mp_hi = %mp_hi0) : (index, index) -> (index, index) {{
  %mp_open = arith.cmpi ult, %mp_lo, %mp_hi : index
  scf.condition(%mp_open) %mp_lo, %mp_hi : index, index
}} do {{
^bb0(%mp_lo: index, %mp_hi: index):
  %mp_sum = arith.addi %mp_lo, %mp_hi : index
  %mp_mid = arith.divui %mp_sum, %mp_two : index
  %mp_k = memref.load %sh_nkey[%mp_mid] : {sh_nkey}
  %mp_below = arith.cmpi ult, %mp_k, %mp_key : i64
  %mp_next = arith.addi %mp_mid, %c1 : index
  %mp_nlo = arith.select %mp_below, %mp_lo, %mp_next : index
  %mp_nhi = arith.select %mp_below, %mp_mid, %mp_hi : index
  scf.yield %mp_nlo, %mp_nhi : index, index
}}
%n_m = arith.select %mp_search, %mp_end#0, %list : index
"
    )
}

/// `{out}` (i32) = the column in sort key `{key}`: `%ones` (2^32 - 1, as i64) less its low word,
/// its high word in column order (`%idord`).
fn key_column(key: &str, out: &str) -> String {
    format!(
        "{out}_lo = arith.andi {key}, %ones : i64
{out}_c32 = arith.constant 32 : i64
{out}_hi = arith.shrui {key}, {out}_c32 : i64
{out}_w = arith.select %idord, {out}_hi, {out}_lo : i64
{out}_64 = arith.subi %ones, {out}_w : i64
{out} = arith.trunci {out}_64 : i64 to i32
"
    )
}

/// `{out}` (f32) = the weight in sort key `{key}`: its high word, its low word in column order
/// (`%idord`).
fn key_weight_f32(key: &str, out: &str) -> String {
    format!(
        "{out}_c32 = arith.constant 32 : i64
{out}_hi = arith.shrui {key}, {out}_c32 : i64
{out}_b_hi = arith.trunci {out}_hi : i64 to i32
{out}_b_lo = arith.trunci {key} : i64 to i32
{out}_b = arith.select %idord, {out}_b_lo, {out}_b_hi : i32
{out} = arith.bitcast {out}_b : i32 to f32
"
    )
}

/// `{out}` (f64) = the weight in sort key `{key}`'s high word, widened.
fn key_weight(key: &str, out: &str) -> String {
    format!("{}{out} = arith.extf {out}_f : f32 to f64\n", key_weight_f32(key, &format!("{out}_f")))
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
    use v3c_models::sampling::{draw_plain, Draw};
    use v3c_runtime::lowering::SAMPLE_ON_HOST;

    /// Rows of `d` logits with a draw each, and what the host draws.
    struct Case {
        d: usize,
        x: Vec<f32>,
        draws: Vec<Draw>,
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
                    let w = self.draws[r];
                    if w.temperature > 0.0 {
                        draw_plain(&self.x[r * d..(r + 1) * d], &w) as i32
                    } else {
                        -1
                    }
                })
                .collect()
        }

        /// A top-k row's candidates as the kernel takes them: the weights in the k-th largest's bin
        /// (its bits' top 12) or above (0 for other rows).
        fn top_k_candidates(&self, r: usize) -> usize {
            let (w, row) = (self.draws[r], &self.x[r * self.d..(r + 1) * self.d]);
            if w.top_k == 0 || w.top_k as usize >= self.d {
                return 0;
            }
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            let mut bins: Vec<u32> =
                row.iter().map(|&l| v3c_models::sampling::exp((l - max) / w.temperature).to_bits() >> 20).collect();
            bins.sort_unstable_by(|a, b| b.cmp(a));
            let kth = bins[w.top_k as usize - 1];
            bins.iter().filter(|&&b| b >= kth).count()
        }

        /// Whether row `r` draws from a list (top-p below 1, a top-k below the row's width, or a
        /// min-p above 0).
        fn sorted(&self, r: usize) -> bool {
            let w = self.draws[r];
            w.top_p < 1.0 || (w.top_k > 0 && (w.top_k as usize) < self.d) || w.min_p > 0.0
        }

        /// Whether row `r` has a top-k below its width.
        fn top_k(&self, r: usize) -> bool {
            let w = self.draws[r];
            w.top_k > 0 && (w.top_k as usize) < self.d
        }

        /// The host's list of row `r`'s sorted draw, top-k then top-p then min-p (its number of
        /// tokens); with `min_p` false, before min-p.
        fn nucleus(&self, r: usize, min_p: bool) -> usize {
            let w = self.draws[r];
            let min_p = if min_p { w.min_p } else { 0.0 };
            let shaping = v3c_models::sampling::Shaping { top_k: w.top_k as usize, min_p, ..Default::default() };
            let sampler = v3c_models::reference::Sampler::new(w.temperature, w.top_p, 0).shaped(shaping);
            sampler.distribution(&self.x[r * self.d..(r + 1) * self.d]).len()
        }

        /// Row `r`'s weights in min-p's bin (its bits' top 12) or above: the candidates the kernel
        /// gathers for min-p without top-k at most.
        fn min_p_candidates(&self, r: usize) -> usize {
            let (w, row) = (self.draws[r], &self.x[r * self.d..(r + 1) * self.d]);
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            let bin = w.min_p.to_bits() >> 20;
            row.iter().filter(|&&l| v3c_models::sampling::exp((l - max) / w.temperature).to_bits() >> 20 >= bin).count()
        }

        /// `got` against the host's tokens: equal, but where the kernel left a row with a list to
        /// the host (then its list need not fit the kernel's cap, or its weights hold a NaN); rows
        /// the kernel must draw itself drawn: without min-p, those whose list is at most 64
        /// tokens; with min-p, those whose min-p (without top-k) or top-k candidates fit the cap.
        /// The rows left to the host, and the rows with a list the kernel drew.
        fn check(&self, got: &[i32], name: &str) -> (usize, usize) {
            let want = self.want();
            let (mut left, mut drawn) = (0, 0);
            let cap = nucleus_cap(self.d);
            for r in 0..self.rows() {
                if got[r] == SAMPLE_ON_HOST && self.sorted(r) {
                    let n = self.nucleus(r, false);
                    let nan = self.x[r * self.d..(r + 1) * self.d].iter().any(|v| v.is_nan());
                    let crowded = match (self.draws[r].min_p > 0.0, self.top_k(r)) {
                        (_, true) => self.top_k_candidates(r) > cap,
                        (true, false) => self.min_p_candidates(r) > cap,
                        (false, false) => n > 64,
                    };
                    assert!(nan || crowded, "{name}: row {r} (a list of {n}, {:?}) left to the host", self.draws[r]);
                    left += 1;
                    continue;
                }
                assert_eq!(got[r], want[r], "{name}: row {r} ({:?})", self.draws[r]);
                drawn += usize::from(self.sorted(r) && self.draws[r].temperature > 0.0);
            }
            (left, drawn)
        }

        /// The kernel's tokens, through the CPU lowering or the PTX simulated (the logits
        /// `shift` elements past 128 bytes), and the simulated launch's 16-byte load requests.
        fn run(&self, kernel: &RowKernel, simulated: bool, shift: usize) -> (Vec<i32>, u64) {
            let rows = self.rows();
            let mut x = placed(&self.x, shift);
            let mut t: Vec<f32> = self.draws.iter().map(|d| d.temperature).collect();
            let mut p: Vec<f32> = self.draws.iter().map(|d| d.top_p).collect();
            let mut k: Vec<i32> = self.draws.iter().map(|d| d.top_k as i32).collect();
            let mut mp: Vec<f32> = self.draws.iter().map(|d| d.min_p).collect();
            let mut u: Vec<i64> = self.draws.iter().map(|d| d.uniform.to_bits() as i64).collect();
            let mut idx = vec![i32::MIN; rows];
            let buffers = [
                raw(x.slice(), &[rows, self.d], "f32"),
                raw(&mut t, &[rows], "f32"),
                raw(&mut p, &[rows], "f32"),
                raw(&mut k, &[rows], "i32"),
                raw(&mut mp, &[rows], "f32"),
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
            draws.push(Draw { temperature: t, top_p: 1.0, top_k: 0, min_p: 0.0, uniform: u });
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
        // Top-p: peaked rows (a few tokens to a few hundred in the nucleus) at several shares and
        // draws, a flat row (most of the row in it), a NaN (the host's), temperature 0 (greedy).
        let mut listed = |logits: Vec<f32>, t: f32, (top_p, top_k, min_p): (f32, u32, f32), u: f64| {
            x.extend(logits);
            draws.push(Draw { temperature: t, top_p, top_k, min_p, uniform: u });
        };
        let mut sorted =
            |logits: Vec<f32>, t: f32, top_p: f32, top_k: u32, u: f64| listed(logits, t, (top_p, top_k, 0.0), u);
        let mut nucleus = |logits: Vec<f32>, t: f32, top_p: f32, u: f64| sorted(logits, t, top_p, 0, u);
        // A spread of logits with a few standing out, as a language model's: nuclei of a token to
        // a few hundred.
        let spiked = |spikes: usize, salt: u64| {
            let mut row = values(d, seed * 100 + 50 + salt, 8.0);
            for i in 0..spikes.min(d) {
                row[(i * 7919 + salt as usize * 31) % d] += 12.0 + (i % 5) as f32;
            }
            row
        };
        for (k, &v) in values(12, seed + 20, 1.0).iter().enumerate() {
            let spikes = [1usize, 6, 40, 300][k % 4];
            let top_p = [0.9f32, 0.5, 0.95][k / 4];
            nucleus(spiked(spikes, k as u64), 0.7, top_p, f64::from(v) + 0.5);
        }
        let peaked = spiked(20, 99);
        for u in [0.0, 1.0 - f64::EPSILON / 2.0] {
            nucleus(peaked.clone(), 1.0, 0.9, u);
        }
        nucleus(values(d, seed + 31, 0.5), 1.0, 0.9, 0.3);
        let mut nan = spiked(6, 98);
        nan[d / 3] = f32::NAN;
        nucleus(nan, 1.0, 0.9, 0.4);
        nucleus(peaked.clone(), 0.0, 0.9, 0.4);
        // Top-k, alone and with top-p; a k of the row's width or more is none (every token
        // weighed); spread rows (ties in the weights' bins past the k-th).
        for (k, &v) in values(8, seed + 40, 1.0).iter().enumerate() {
            let top_k = [1u32, 5, 50, 300][k % 4];
            let top_p = [1.0f32, 0.9][k / 4];
            let logits = if k % 2 == 0 { spiked(40, 60 + k as u64) } else { values(d, seed + 60 + k as u64, 3.0) };
            sorted(logits, 0.8, top_p, top_k, f64::from(v) + 0.5);
        }
        sorted(peaked.clone(), 1.0, 1.0, d as u32, 0.7);
        sorted(peaked.clone(), 1.0, 0.9, u32::MAX, 0.7);
        // Min-p: alone (its tokens in column order; a flat row's over several blocks, or more
        // than the kernel sorts), with top-p (a flat row's nucleus past min-p's), with top-k, all
        // three; min-p 1 over a tie for the largest; a NaN; temperature 0.
        for (k, &v) in values(8, seed + 70, 1.0).iter().enumerate() {
            let min_p = [0.05f32, 0.1, 0.3, 0.02][k % 4];
            let t = [0.7f32, 1.3][k / 4];
            listed(spiked([6, 40, 300, 1][k % 4], 70 + k as u64), t, (1.0, 0, min_p), f64::from(v) + 0.5);
        }
        let flat = values(d, seed + 80, 1.0);
        for u in [0.0, 0.45, 1.0 - f64::EPSILON / 2.0] {
            listed(flat.clone(), 1.0, (1.0, 0, 0.3), u);
        }
        listed(values(d, seed + 81, 0.5), 1.0, (0.9, 0, 0.5), 0.6);
        listed(spiked(40, 82), 0.8, (0.9, 0, 0.1), 0.3);
        listed(spiked(300, 83), 1.0, (0.5, 0, 0.02), 0.8);
        listed(spiked(40, 84), 0.8, (1.0, 50, 0.2), 0.55);
        listed(values(d, seed + 85, 3.0), 1.0, (1.0, 300, 0.05), 0.35);
        listed(spiked(300, 86), 1.2, (0.8, 100, 0.1), 0.65);
        let mut tie = values(d, seed + 87, 2.0);
        tie[d / 3] = 9.0;
        tie[d - 1] = 9.0;
        for u in [0.2, 0.7] {
            listed(tie.clone(), 1.0, (1.0, 0, 1.0), u);
        }
        let mut nan = spiked(6, 88);
        nan[d / 4] = f32::NAN;
        listed(nan, 1.0, (1.0, 0, 0.1), 0.4);
        listed(peaked, 0.0, (1.0, 0, 0.1), 0.4);
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
            let got = case.run(&kernel, false, 0).0;
            let (left, drawn) = case.check(&got, &kernel.kernel_name());
            assert!(drawn >= 10, "{}: {drawn} top-p rows drawn by the kernel", kernel.kernel_name());
            // Min-p lists the kernel drew: most of them, one over several blocks of the draw where
            // the row is wide enough and its candidates fit.
            let min_p: Vec<usize> = (0..case.rows())
                .filter(|&r| case.draws[r].min_p > 0.0 && case.draws[r].temperature > 0.0 && got[r] != SAMPLE_ON_HOST)
                .map(|r| case.nucleus(r, true))
                .collect();
            assert!(min_p.len() >= 12, "{}: min-p lists drawn {min_p:?}", kernel.kernel_name());
            let long = min_p.iter().any(|&n| n > DRAW_BLOCK);
            assert!(long || !(1000..=4096).contains(&d), "{}: min-p lists drawn {min_p:?}", kernel.kernel_name());
            // At least the rows whose nucleus outgrows the kernel's cap or holds a NaN (others only
            // as `check` allows).
            let cap = nucleus_cap(d);
            let must = (0..case.rows())
                .filter(|&r| case.sorted(r) && case.draws[r].temperature > 0.0)
                .filter(|&r| case.draws[r].min_p == 0.0)
                .filter(|&r| case.x[r * d..(r + 1) * d].iter().any(|v| v.is_nan()) || case.nucleus(r, false) > cap)
                .count();
            assert!(must >= 1 && left >= must, "{}: {left} rows left to the host, {must} must", kernel.kernel_name());
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
                let (_, drawn) = case.check(&got, &name);
                assert!(drawn >= 10, "{name}: {drawn} top-p rows drawn by the kernel");
                assert_eq!(wide > 0, shift == 0 && d % 4 == 0, "{name}: 16-byte loads");
            }
        }
        if std::env::var("V3C_SAMPLE_STATS").is_ok() {
            // One row of DeepSeek-V3's vocabulary: every token weighed, a peaked top-p row, a top-k
            // 50 row, a min-p 0.1 row.
            let (d, case) = (129_280, case(129_280, 13));
            let kernel = RowKernel::new(RowOp::Sample, d, "f32");
            let peaked = case.draws.iter().position(|w| w.top_p < 1.0).unwrap();
            let top_k = case.draws.iter().position(|w| w.top_k == 50).unwrap();
            let min_p = case.draws.iter().position(|w| w.min_p == 0.1).unwrap();
            for r in [0, peaked, top_k, min_p] {
                let w = case.draws[r];
                let mut x = case.x[r * d..(r + 1) * d].to_vec();
                let (mut t, mut p, mut k) = (vec![w.temperature], vec![w.top_p], vec![w.top_k as i32]);
                let (mut mp, mut u, mut idx) = (vec![w.min_p], vec![w.uniform.to_bits() as i64], vec![0i32]);
                let buffers = [
                    raw(&mut x, &[1, d], "f32"),
                    raw(&mut t, &[1], "f32"),
                    raw(&mut p, &[1], "f32"),
                    raw(&mut k, &[1], "i32"),
                    raw(&mut mp, &[1], "f32"),
                    raw(&mut u, &[1], "i64"),
                    raw(&mut idx, &[1], "i32"),
                ];
                let stats = run_simulated(&kernel, &buffers, 1);
                eprintln!(
                    "{} top-p {} top-k {} min-p {} (list {}, got {}): {} instructions, {} longest thread, {} load rounds",
                    kernel.kernel_name(),
                    w.top_p,
                    w.top_k,
                    w.min_p,
                    case.nucleus(r, true),
                    idx[0],
                    stats.instructions,
                    stats.longest_thread,
                    stats.load_rounds
                );
            }
        }
        let context = crate::mlir::new_context();
        let kernel = RowKernel::new(RowOp::Sample, 129_280, "f32");
        let ptx = crate::conversion::sm90::compile_rows(&context, &kernel, &crate::target::SM90A).unwrap().ptx;
        assert!(!ptx.contains("fma.") && !ptx.contains(".approx") && !ptx.contains(".ftz"), "{ptx}");
        assert!(ptx.contains("div.rn.f32"), "IEEE division");
    }
}
