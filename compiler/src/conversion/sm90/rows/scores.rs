//! Scoring on the device ([`RowOp::Scores`](super::RowOp::Scores)): what a row's log-probabilities
//! need — its largest logit, softmax's denominator `sum(e^(l - max))` in f64, and one token's
//! logit — so that a perplexity run, a scored prompt or a step asking for its token's
//! log-probability reads back 16 bytes a row, not the row (517 KB of DeepSeek-V3's vocabulary);
//! the host takes the logarithm ([`v3c_models::sampling::log_sum_exp`]'s, bit for bit).
//!
//! The host's order, kept here ([`v3c_models::sampling::exp_sum`]): `l - max` in f32, widened,
//! `e^x` by [`v3c_models::sampling::exp64`]'s polynomial operation for operation (no fused
//! multiply-adds); column `c`'s term into running sum `c % 256` in column order — thread `c % 256`
//! of the block, its loads coalesced, [`UNROLL`] of them before their first use — then the sums
//! added pairwise (`i + h` into `i`, `h` = 128 .. 1) into the row's. The largest logit is the
//! sampling kernel's ([`super::sample::max_phase`]).

use std::fmt::Write;

use v3c_models::sampling::{EXP_F64, SCORE_LANES};

use super::sample::{exp_reduced, max_phase, max_tree, ExpConstants};
use super::{aligned, indent2, indent4, tree_phases, Lowering, RowKernel};

/// Columns a thread loads before adding their terms.
const UNROLL: usize = 8;

/// The most probable tokens a row's scores give, most probable first: OpenAI's most
/// `top_logprobs` ([`v3c_runtime::lowering::SCORES_TOP`]).
pub const TOP: usize = v3c_runtime::lowering::SCORES_TOP;

/// The shared arrays: the threads' running sums, their lists of the [`TOP`] largest logits'
/// keys, their largest logits.
pub(super) fn shared(threads: usize) -> Vec<(&'static str, usize)> {
    vec![("sh_bsum", threads), ("sh_top", threads * TOP), ("sh_max", threads)]
}

/// `{p}_key` (i64): logit `{v}` (f32) of column `{col}` as a key whose unsigned order is the host's
/// `top_k` order: the value's bits in `f32::total_cmp`'s order (NaN above infinity, -0 below +0,
/// the sign flipped so that unsigned comparison keeps it) above `2^32 - 1 - column` (equal values:
/// the lower column larger). 0 is below every key (no column has it): an empty slot.
fn top_key(v: &str, col: &str, p: &str) -> String {
    format!(
        "{p}_bits = arith.bitcast {v} : f32 to i32
{p}_c31 = arith.constant 31 : i32
{p}_c1 = arith.constant 1 : i32
{p}_sgn = arith.shrsi {p}_bits, {p}_c31 : i32
{p}_mag = arith.shrui {p}_sgn, {p}_c1 : i32
{p}_tot = arith.xori {p}_bits, {p}_mag : i32
{p}_flip = arith.constant -2147483648 : i32
{p}_ord = arith.xori {p}_tot, {p}_flip : i32
{p}_o64 = arith.extui {p}_ord : i32 to i64
{p}_c32 = arith.constant 32 : i64
{p}_hi = arith.shli {p}_o64, {p}_c32 : i64
{p}_col64 = arith.index_cast {col} : index to i64
{p}_ones = arith.constant 4294967295 : i64
{p}_lo = arith.subi {p}_ones, {p}_col64 : i64
{p}_key = arith.ori {p}_hi, {p}_lo : i64
"
    )
}

/// The list `{list}0..` ([`TOP`] keys, largest first) with key `{p}_key` put in its place where it
/// beats the last (a chain of compare-exchanges), as `{p}_n0..`.
fn top_insert(list: &str, p: &str) -> String {
    let last = TOP - 1;
    let ty = ["i64"; TOP].join(", ");
    let old: Vec<String> = (0..TOP).map(|i| format!("{list}{i}")).collect();
    let mut chain = String::new();
    let mut x = format!("{p}_key");
    for (i, l) in old.iter().enumerate() {
        let _ = write!(
            chain,
            "  {p}_g{i} = arith.cmpi ugt, {x}, {l} : i64
  {p}_m{i} = arith.select {p}_g{i}, {x}, {l} : i64
  {p}_x{i} = arith.select {p}_g{i}, {l}, {x} : i64
"
        );
        x = format!("{p}_x{i}");
    }
    format!(
        "{p}_better = arith.cmpi ugt, {p}_key, {list}{last} : i64
{p}_n:{TOP} = scf.if {p}_better -> ({ty}) {{
{chain}  scf.yield {new} : {ty}
}} else {{
  scf.yield {old} : {ty}
}}
",
        new = (0..TOP).map(|i| format!("{p}_m{i}")).collect::<Vec<_>>().join(", "),
        old = old.join(", "),
    )
}

/// Why a scoring kernel of `threads` threads cannot give the host's sums: a thread is a running
/// sum.
pub(super) fn check(threads: usize) -> Result<(), String> {
    if threads != SCORE_LANES {
        return Err(format!("scoring runs {SCORE_LANES} threads, a running sum each (not {threads})"));
    }
    Ok(())
}

/// `{out}` (f64) = e^`{x}` (f64) as [`v3c_models::sampling::exp64`] computes it, operation for
/// operation: [`exp_reduced`], then `2^n` as two powers of two from the bits of `k + round`, NaN
/// kept.
fn exp_f64(x: &str, out: &str) -> String {
    let e = &EXP_F64;
    let values = [e.low, e.high, e.log2e, e.round, e.ln2_hi, e.ln2_lo];
    let mut s = exp_reduced(x, out, &ExpConstants::new("f64", values, &e.poly));
    let _ = write!(
        s,
        "{out}_half = arith.constant 0.5 : f64
{out}_quarter = arith.constant 0.25 : f64
{out}_nhalf = arith.mulf {out}_n, {out}_half : f64
{out}_nq = arith.subf {out}_nhalf, {out}_quarter : f64
{out}_ar = arith.addf {out}_nq, {out}_round : f64
{out}_a = arith.subf {out}_ar, {out}_round : f64
{out}_b = arith.subf {out}_n, {out}_a : f64
{out}_rbits = arith.bitcast {out}_round : f64 to i64
{out}_bias = arith.constant 1023 : i64
{out}_c52 = arith.constant 52 : i64
"
    );
    // 2^k from the bits of k + round: k's, less round's, plus the bias, shifted into the exponent.
    for k in ["a", "b"] {
        let _ = write!(
            s,
            "{out}_k{k} = arith.addf {out}_{k}, {out}_round : f64
{out}_k{k}b = arith.bitcast {out}_k{k} : f64 to i64
{out}_k{k}i = arith.subi {out}_k{k}b, {out}_rbits : i64
{out}_k{k}e = arith.addi {out}_k{k}i, {out}_bias : i64
{out}_k{k}s = arith.shli {out}_k{k}e, {out}_c52 : i64
{out}_p{k} = arith.bitcast {out}_k{k}s : i64 to f64
"
        );
    }
    let _ = write!(
        s,
        "{out}_y0 = arith.mulf {out}_er, {out}_pa : f64
{out}_y = arith.mulf {out}_y0, {out}_pb : f64
{out}_nan = arith.cmpf uno, {x}, {x} : f64
{out} = arith.select {out}_nan, {x}, {out}_y : f64
"
    );
    s
}

/// `{out}_v` (f32) = column `{col}`'s logit.
fn load(col: &str, out: &str) -> String {
    format!("{out}_v = memref.load %x[%row, {col}] : memref<?x?xf32>\n")
}

/// `{out}_dx` (f64): logit `{out}_v` less the largest, in f32, widened.
fn difference(out: &str) -> String {
    format!("{out}_d = arith.subf {out}_v, %m : f32\n{out}_dx = arith.extf {out}_d : f32 to f64\n")
}

/// `{out}` (f64) = the term of logit `{out}_v`: e^([`difference`]).
fn term(out: &str) -> String {
    exp_f64(&format!("{out}_dx"), out)
}

pub(super) fn phases(kernel: &RowKernel, lowering: Lowering) -> Vec<String> {
    let sh = |name: &str| kernel.shared_type(name, lowering);
    let (sh_max, sh_bsum, sh_top) = (sh("sh_max"), sh("sh_bsum"), sh("sh_top"));
    let gpu = lowering == Lowering::Gpu;
    let check = aligned("al", 16, &[("%x", "memref<?x?xf32>", 4)]);
    let wide = if gpu { "%al" } else { "%false_al" };
    let check = format!("{check}%false_al = arith.constant false\n");
    let mut phases = vec![max_phase(kernel, &check, wide, &sh_max)];
    phases.extend(max_tree(kernel.threads, &sh_max));
    // The thread's running sum: UNROLL columns a step (loaded first, added in order), then the
    // columns past the whole steps one at a time. Then, over the same columns again (from L2; in
    // one loop with the sums, ptxas held to 128 registers spills), its list of the TOP largest
    // logits' keys, each column's offered in column order.
    let mut loads = String::new();
    let mut adds = String::new();
    let mut top_loads = String::new();
    let mut keys = String::new();
    let mut differences = String::new();
    let mut inserts = String::new();
    let mut list = "%tl".to_string();
    for u in 0..UNROLL {
        let col = |p: &str| {
            format!(
                "%{p}o{u} = arith.constant {off} : index\n%{p}c{u} = arith.addi %c0u, %{p}o{u} : index\n",
                off = u * kernel.threads
            )
        };
        let _ = write!(loads, "{}{}", col("u"), load(&format!("%uc{u}"), &format!("%ut{u}")));
        // Every difference before the first term: the loads' first uses all up front.
        differences.push_str(&difference(&format!("%ut{u}")));
        let prev = if u == 0 { "%acc".to_string() } else { format!("%us{}", u - 1) };
        let _ = writeln!(adds, "{}%us{u} = arith.addf {prev}, %ut{u} : f64", term(&format!("%ut{u}")));
        let _ = write!(top_loads, "{}{}", col("k"), load(&format!("%kc{u}"), &format!("%kt{u}")));
        // Every key before the first insertion's branch: a load used past a branch would wait.
        let p = format!("%uk{u}");
        keys.push_str(&top_key(&format!("%kt{u}_v"), &format!("%kc{u}"), &p));
        inserts.push_str(&top_insert(&list, &p));
        list = format!("{p}_n#");
    }
    let last = UNROLL - 1;
    let top_ty = ["i64"; TOP].join(", ");
    let list_of = |p: &str| (0..TOP).map(|i| format!("{p}{i}")).collect::<Vec<_>>().join(", ");
    // The step's largest key against the list's last: one comparison passes over the step (the
    // usual case once the list holds the row's large logits), and it uses every key, so that their
    // loads are issued before any branch.
    let mut beats = String::from("%kmax0 = arith.addi %uk0_key, %tz : i64\n");
    for u in 1..UNROLL {
        let _ = writeln!(beats, "%kmax{u} = arith.maxui %kmax{}, %uk{u}_key : i64", u - 1);
    }
    let _ = writeln!(beats, "%kany = arith.cmpi ugt, %kmax{last}, %tl{} : i64", TOP - 1);
    let stores: String = (0..TOP)
        .map(|i| {
            format!(
                "%ts{i} = arith.constant {i} : index\n%tsi{i} = arith.addi %top_at, %ts{i} : index\nmemref.store %tr#{i}, %sh_top[%tsi{i}] : {sh_top}\n"
            )
        })
        .collect();
    phases.push(format!(
        "%m = memref.load %sh_max[%c0] : {sh_max}
%zd = arith.constant 0.0 : f64
%tz = arith.constant 0 : i64
%cStepU = arith.constant {step} : index
%whole_steps = arith.divui %cD, %cStepU : index
%whole_cols = arith.muli %whole_steps, %cStepU : index
%sw = scf.for %c0u = %tid to %whole_cols step %cStepU iter_args(%acc = %zd) -> (f64) {{
{loads}{differences}{adds}  scf.yield %us{last} : f64
}}
%rest0 = arith.addi %whole_cols, %tid : index
%s = scf.for %col = %rest0 to %cD step %cT iter_args(%acc = %sw) -> (f64) {{
{rest}  %n = arith.addf %acc, %rt : f64
  scf.yield %n : f64
}}
memref.store %s, %sh_bsum[%tid] : {sh_bsum}
%tw:{TOP} = scf.for %c0u = %tid to %whole_cols step %cStepU iter_args({zero_list}) -> ({top_ty}) {{
{top_loads}{keys}{beats}  %tu:{TOP} = scf.if %kany -> ({top_ty}) {{
{inserts}    scf.yield {final_list} : {top_ty}
  }} else {{
    scf.yield {list_in} : {top_ty}
  }}
  scf.yield {list_out} : {top_ty}
}}
%tr:{TOP} = scf.for %col = %rest0 to %cD step %cT iter_args({carried}) -> ({top_ty}) {{
{top_rest}  scf.yield {rest_list} : {top_ty}
}}
%cTop = arith.constant {TOP} : index
%top_at = arith.muli %tid, %cTop : index
{stores}",
        step = UNROLL * kernel.threads,
        zero_list = (0..TOP).map(|i| format!("%tl{i} = %tz")).collect::<Vec<_>>().join(", "),
        final_list = list_of(&list),
        carried = (0..TOP).map(|i| format!("%tl{i} = %tw#{i}")).collect::<Vec<_>>().join(", "),
        loads = indent2(&loads),
        adds = indent2(&adds),
        differences = indent2(&differences),
        top_loads = indent2(&top_loads),
        inserts = indent4(&inserts),
        beats = indent2(&beats),
        keys = indent2(&keys),
        list_in = list_of("%tl"),
        list_out = list_of("%tu#"),
        rest = indent2(&(load("%col", "%rt") + &difference("%rt") + &term("%rt"))),
        top_rest = indent2(&(load("%col", "%rk") + &top_key("%rk_v", "%col", "%rk") + &top_insert("%tl", "%rk"))),
        rest_list = list_of("%rk_n#"),
    ));
    // The threads' lists merged pairwise (thread t's with thread t + h's, h = 128 .. 1): the
    // largest TOP of the two, largest first, into thread t's.
    let mut h = kernel.threads / 2;
    while h >= 1 {
        phases.push(top_merge(h, &sh_top));
        h /= 2;
    }
    phases.extend(tree_phases(
        kernel.threads,
        &format!(
            "%a = memref.load %sh_bsum[%tid] : {sh_bsum}
%b = memref.load %sh_bsum[%other] : {sh_bsum}
%n = arith.addf %a, %b : f64
memref.store %n, %sh_bsum[%tid] : {sh_bsum}"
        ),
    ));
    // Thread 0: the sum's bits, the largest logit, the token's logit (NaN past the row).
    phases.push(format!(
        "%first = arith.cmpi eq, %tid, %c0 : index
scf.if %first {{
  %total = memref.load %sh_bsum[%c0] : {sh_bsum}
  %bits = arith.bitcast %total : f64 to i64
  memref.store %bits, %sum[%row] : memref<?xi64>
  %m = memref.load %sh_max[%c0] : {sh_max}
  memref.store %m, %max[%row] : memref<?xf32>
  %tok = memref.load %token[%row] : memref<?xi32>
  %tok_zero = arith.constant 0 : i32
  %dd = arith.index_cast %cD : index to i32
  %nonneg = arith.cmpi sge, %tok, %tok_zero : i32
  %below = arith.cmpi slt, %tok, %dd : i32
  %inside = arith.andi %nonneg, %below : i1
  %col0 = arith.index_cast %tok : i32 to index
  %col = arith.select %inside, %col0, %c0 : index
  %l = memref.load %x[%row, %col] : memref<?x?xf32>
  %nan = arith.constant 0x7FC00000 : f32
  %tok_logit = arith.select %inside, %l, %nan : f32
  memref.store %tok_logit, %logit[%row] : memref<?xf32>
{outs}}}
",
        outs = indent2(&top_outputs(&sh_top)),
    ));
    phases
}

/// Thread t < `h`: its list (`%sh_top`, [`TOP`] keys from `t TOP`, largest first) and thread
/// t + h's merged: the TOP largest of both, largest first, back into its own (read first, then
/// written: no other thread reads it at this step).
fn top_merge(h: usize, sh_top: &str) -> String {
    let mut steps = String::new();
    let mut stores = String::new();
    for i in 0..TOP {
        let (ia, ib) =
            if i == 0 { ("%c0".to_string(), "%c0".to_string()) } else { (format!("%ia{i}"), format!("%ib{i}")) };
        let _ = write!(
            steps,
            "%pa{i} = arith.addi %abase, {ia} : index
%pb{i} = arith.addi %bbase, {ib} : index
%ka{i} = memref.load %sh_top[%pa{i}] : {sh_top}
%kb{i} = memref.load %sh_top[%pb{i}] : {sh_top}
%ta{i} = arith.cmpi uge, %ka{i}, %kb{i} : i64
%mk{i} = arith.select %ta{i}, %ka{i}, %kb{i} : i64
%na{i} = arith.addi {ia}, %c1 : index
%nb{i} = arith.addi {ib}, %c1 : index
%ia{next} = arith.select %ta{i}, %na{i}, {ia} : index
%ib{next} = arith.select %ta{i}, {ib}, %nb{i} : index
",
            next = i + 1,
        );
        let _ = write!(
            stores,
            "%so{i} = arith.constant {i} : index
%sp{i} = arith.addi %abase, %so{i} : index
memref.store %mk{i}, %sh_top[%sp{i}] : {sh_top}
"
        );
    }
    format!(
        "%half = arith.constant {h} : index
%merging = arith.cmpi ult, %tid, %half : index
scf.if %merging {{
  %cTopM = arith.constant {TOP} : index
  %abase = arith.muli %tid, %cTopM : index
  %other = arith.addi %tid, %half : index
  %bbase = arith.muli %other, %cTopM : index
{steps}{stores}}}
",
        steps = indent2(&steps),
        stores = indent2(&stores),
    )
}

/// Thread 0: the merged list's keys (`%sh_top` from 0) as the tokens (-1 for an empty slot) and
/// their logits (the key's high word back to the value's bits).
fn top_outputs(sh_top: &str) -> String {
    let mut s = String::from(
        "%to_ones = arith.constant 4294967295 : i64
%to_c32 = arith.constant 32 : i64
%to_c31 = arith.constant 31 : i32
%to_c1 = arith.constant 1 : i32
%to_flip = arith.constant -2147483648 : i32
%to_none = arith.constant -1 : i32
%to_zero = arith.constant 0 : i64
",
    );
    for i in 0..TOP {
        let _ = write!(
            s,
            "%to{i}_i = arith.constant {i} : index
%to{i}_k = memref.load %sh_top[%to{i}_i] : {sh_top}
%to{i}_lo = arith.andi %to{i}_k, %to_ones : i64
%to{i}_c64 = arith.subi %to_ones, %to{i}_lo : i64
%to{i}_c = arith.trunci %to{i}_c64 : i64 to i32
%to{i}_empty = arith.cmpi eq, %to{i}_k, %to_zero : i64
%to{i}_id = arith.select %to{i}_empty, %to_none, %to{i}_c : i32
memref.store %to{i}_id, %top_id[%row, %to{i}_i] : memref<?x?xi32>
%to{i}_hi = arith.shrui %to{i}_k, %to_c32 : i64
%to{i}_ord = arith.trunci %to{i}_hi : i64 to i32
%to{i}_tot = arith.xori %to{i}_ord, %to_flip : i32
%to{i}_sgn = arith.shrsi %to{i}_tot, %to_c31 : i32
%to{i}_mag = arith.shrui %to{i}_sgn, %to_c1 : i32
%to{i}_bits = arith.xori %to{i}_tot, %to{i}_mag : i32
%to{i}_v = arith.bitcast %to{i}_bits : i32 to f32
memref.store %to{i}_v, %top_logit[%row, %to{i}_i] : memref<?x?xf32>
"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::tests::{raw, run_cpu, run_simulated, values};
    use super::super::RowOp;
    use super::*;
    use v3c_models::sampling::{log_sum_exp, top_k};

    /// Rows of `d` logits at several scales, with -inf (masked tokens), one with a NaN, one all
    /// -inf, one of equal logits; tokens inside and outside the row.
    fn case(d: usize, seed: u64) -> (Vec<f32>, Vec<i32>) {
        let mut x = Vec::new();
        let mut tokens = Vec::new();
        for (k, scale) in [0.5f32, 4.0, 20.0, 60.0, 300.0].into_iter().enumerate() {
            x.extend(values(d, seed * 10 + k as u64, scale));
            tokens.push((k * 7919 % d) as i32);
        }
        let mut masked = values(d, seed + 5, 8.0);
        masked.iter_mut().step_by(3).for_each(|v| *v = f32::NEG_INFINITY);
        x.extend(masked);
        tokens.push((d - 1) as i32);
        let mut nan = values(d, seed + 6, 8.0);
        nan[d / 2] = f32::NAN;
        x.extend(nan);
        tokens.push(0);
        x.extend(vec![f32::NEG_INFINITY; d]);
        tokens.push(1.min(d as i32 - 1));
        x.extend(vec![2.5f32; d]);
        tokens.extend([-1]);
        // Ties among the largest (the lower column first), -0 and +0, infinities.
        let mut ties = values(d, seed + 8, 2.0);
        for (k, c) in [d / 2, 3 % d, d - 1, d / 3].into_iter().enumerate() {
            ties[c] = [5.0, 5.0, f32::INFINITY, -0.0][k];
        }
        ties[d / 5] = 0.0;
        x.extend(ties);
        tokens.push((d / 2) as i32);
        x.extend(values(d, seed + 7, 1.0));
        tokens.push(d as i32);
        (x, tokens)
    }

    /// A row's results: the sum, the largest logit, the token's logit, the most probable tokens
    /// with their logits.
    type Scored = (f64, f32, f32, Vec<(i32, f32)>);

    /// The kernel's results for each row of `x`, through the CPU lowering or the PTX simulated.
    fn run(kernel: &RowKernel, x: &[f32], tokens: &[i32], simulated: bool) -> Vec<Scored> {
        let (rows, d) = (tokens.len(), kernel.d);
        let mut x = x.to_vec();
        let mut tok = tokens.to_vec();
        let (mut sum, mut max, mut logit) = (vec![0i64; rows], vec![0f32; rows], vec![0f32; rows]);
        let (mut top_id, mut top_logit) = (vec![i32::MIN; rows * TOP], vec![0f32; rows * TOP]);
        let buffers = [
            raw(&mut x, &[rows, d], "f32"),
            raw(&mut tok, &[rows], "i32"),
            raw(&mut sum, &[rows], "i64"),
            raw(&mut max, &[rows], "f32"),
            raw(&mut logit, &[rows], "f32"),
            raw(&mut top_id, &[rows, TOP], "i32"),
            raw(&mut top_logit, &[rows, TOP], "f32"),
        ];
        match simulated {
            true => {
                run_simulated(kernel, &buffers, rows);
            }
            false => run_cpu(kernel, &buffers),
        }
        let top = |r: usize| (0..TOP).map(|i| (top_id[r * TOP + i], top_logit[r * TOP + i])).collect();
        (0..rows).map(|r| (f64::from_bits(sum[r] as u64), max[r], logit[r], top(r))).collect()
    }

    /// Each row's results give the host's `log_sum_exp`, the token's logit and the host's
    /// `top_k(row, 20)` (-1 past the row's tokens), bit for bit (a NaN's sign aside).
    fn assert_host_bits(x: &[f32], tokens: &[i32], d: usize, got: &[Scored], name: &str) {
        for (r, ((sum, max, logit, top), &t)) in got.iter().zip(tokens).enumerate() {
            let (sum, max, logit) = (*sum, *max, *logit);
            let row = &x[r * d..(r + 1) * d];
            let mut want: Vec<(i32, u32)> = top_k(row, TOP).into_iter().map(|(i, v)| (i as i32, v.to_bits())).collect();
            want.resize(TOP, (-1, 0));
            let got: Vec<(i32, u32)> = top.iter().map(|&(i, v)| (i, if i < 0 { 0 } else { v.to_bits() })).collect();
            assert_eq!(got, want, "{name}: row {r}'s most probable");
            let (want_max, want_log) = log_sum_exp(row);
            let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(same(sum.ln(), want_log), "{name}: row {r}: ln {} against {want_log}", sum.ln());
            assert_eq!(max.to_bits(), want_max.to_bits(), "{name}: row {r}");
            let want = usize::try_from(t).ok().and_then(|t| row.get(t).copied()).unwrap_or(f32::NAN);
            assert!(logit.to_bits() == want.to_bits() || (logit.is_nan() && want.is_nan()), "{name}: row {r}");
        }
    }

    /// The CPU lowering gives the host's sums: DeepSeek-V3's vocabulary, widths with a partial
    /// last step, fewer columns than threads.
    #[test]
    fn scored_rows_are_the_hosts_log_sum_exp() {
        for (d, seed) in [(129_280, 1), (1003, 2), (2048, 3), (5, 4)] {
            let kernel = RowKernel::new(RowOp::Scores, d, "f32");
            assert_eq!(kernel.threads, SCORE_LANES);
            assert_eq!(RowKernel::from_name(&kernel.kernel_name()), Some(kernel.clone()));
            let (x, tokens) = case(d, seed);
            assert_host_bits(&x, &tokens, d, &run(&kernel, &x, &tokens, false), &kernel.kernel_name());
        }
        let mut narrow = RowKernel::new(RowOp::Scores, 1000, "f32");
        narrow.threads = 128;
        assert!(check(narrow.threads).is_err() && narrow.validate(&crate::target::SM90A).is_err());
    }

    /// The sm_90a PTX, simulated, gives the same bits (no fused multiply-add in it).
    #[test]
    fn scored_rows_simulated_are_the_hosts_log_sum_exp() {
        for (d, seed) in [(4100, 11), (1003, 12)] {
            let kernel = RowKernel::new(RowOp::Scores, d, "f32");
            let (x, tokens) = case(d, seed);
            let name = format!("{} (simulated)", kernel.kernel_name());
            assert_host_bits(&x, &tokens, d, &run(&kernel, &x, &tokens, true), &name);
        }
        if std::env::var("V3C_SCORE_STATS").is_ok() {
            // One row of DeepSeek-V3's vocabulary.
            let (d, (x, tokens)) = (129_280, case(129_280, 13));
            let kernel = RowKernel::new(RowOp::Scores, d, "f32");
            let (mut row, mut tok) = (x[..d].to_vec(), vec![tokens[0]]);
            let (mut sum, mut max, mut logit) = (vec![0i64], vec![0f32], vec![0f32]);
            let (mut top_id, mut top_logit) = (vec![0i32; TOP], vec![0f32; TOP]);
            let buffers = [
                raw(&mut row, &[1, d], "f32"),
                raw(&mut tok, &[1], "i32"),
                raw(&mut sum, &[1], "i64"),
                raw(&mut max, &[1], "f32"),
                raw(&mut logit, &[1], "f32"),
                raw(&mut top_id, &[1, TOP], "i32"),
                raw(&mut top_logit, &[1, TOP], "f32"),
            ];
            let stats = run_simulated(&kernel, &buffers, 1);
            eprintln!(
                "{}: {} instructions, {} longest thread, {} load rounds",
                kernel.kernel_name(),
                stats.instructions,
                stats.longest_thread,
                stats.load_rounds
            );
        }
        let context = crate::mlir::new_context();
        let kernel = RowKernel::new(RowOp::Scores, 129_280, "f32");
        let ptx = crate::conversion::sm90::compile_rows(&context, &kernel, &crate::target::SM90A).unwrap().ptx;
        assert!(!ptx.contains("fma.") && !ptx.contains(".approx"), "{ptx}");
    }
}
