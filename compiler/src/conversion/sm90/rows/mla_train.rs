//! Naive-form MLA attention of the training step on CUDA cores, a group of queries (or, for the
//! keys' gradient, of keys) a block ([`Mla::group`]): the group's query rows (keys' rows) are
//! staged in shared memory once, and each key row (query row) the block then reads from global
//! memory serves the whole group — a block reads what a block of one query read, for `group`
//! queries — while the group's softmax maxima and sums run in parallel, a thread a query. Where a
//! thread per key (query) walks a key's (query's) columns, it reads them from copies transposed
//! along the keys (`kvbt [heads * (nope + v), S]`, `latt [rope, S]`; `qnt`, `qpt`, `doutt`
//! `[heads * width, T]`: [`super::TrainRow::Transpose`]), so that a warp's 32 threads read 32
//! consecutive values — in the rows' own layout each of them touched another cache line. Every
//! value is still computed by one thread in the reference's order (scores, `dout . v`, each
//! output's sum over the keys, each key's over the queries), so the bits are those of one query a
//! block: a query's sums skip the keys it does not see (a select: the causal mask) rather than
//! adding zeros.
//!
//! Queries of a group: `%bq{i}` (the row; past the block's last query the last, whose values are
//! never stored), `%ok{i}` (a query of the block); query `i` sees key `j` when `j - %kb0 <= i`
//! (`%kb0` = `S - T + %b0`). Keys of a group (the gradient): `%jr{k}` (the row of `dkvb`),
//! `%okk{k}` (a row of `dkvb`), `%i0_{k}` (its first query).
//!
//! Shared memory: `[group * context]` arrays, query (key) `i`'s `context` scores from `i *
//! context`; `sh_red [group * 4]`: query `i`'s running max, sum and `sum(p dp)` from `4 i`;
//! `sh_q [group * (nope + rope)]` the queries (`sh_g [group * v]` their output gradients),
//! `sh_k [group * (nope + v + rope)]` the keys' head columns and rope columns.

use std::fmt::Write;

use super::train::Mla;
use super::{exp, loop_phases, Lowering, MLA_CHUNK, MLA_CHUNKS};

/// `f(i)` for each member of the group, concatenated.
fn each(group: usize, f: impl Fn(usize) -> String) -> String {
    (0..group).map(f).collect()
}

/// `%{name}0, %{name}1, ...` and `f32, f32, ...` for a group's loop-carried values.
fn carried(group: usize, name: &str) -> (String, String) {
    let names: Vec<String> = (0..group).map(|i| format!("%{name}{i}")).collect();
    (names.join(", "), vec!["f32"; group].join(", "))
}

/// `iter_args(%a0 = {init}0, ...) -> (f32, ...)` of a group (`init` a name prefix, or `%zero` for
/// every member when `init` is empty).
fn iter_args(group: usize, init: &str) -> String {
    let args: Vec<String> = (0..group)
        .map(|i| if init.is_empty() { format!("%a{i} = %zero") } else { format!("%a{i} = {init}{i}") })
        .collect();
    format!("iter_args({}) -> ({})", args.join(", "), vec!["f32"; group].join(", "))
}

/// `%{out}:group` = a sequential dot product per member over `%d` in `0..{count}`: `shared`
/// (lines, loaded once an iteration) and each member's `own` (lines defining its operand), the
/// product `first * second` (names with `{i}` for the member) added to its sum.
fn dots(
    group: usize,
    out: &str,
    count: &str,
    shared: &str,
    own: impl Fn(usize) -> String,
    product: (&str, &str),
) -> String {
    let (yields, types) = carried(group, "y");
    let mut s = format!("%{out}:{group} = scf.for %d = %c0 to {count} step %c1 {} {{\n{shared}", iter_args(group, ""));
    for i in 0..group {
        s.push_str(&own(i));
        let (a, b) = (product.0.replace("{i}", &i.to_string()), product.1.replace("{i}", &i.to_string()));
        let _ = writeln!(s, "%x{i} = arith.mulf {a}, {b} : f32\n%y{i} = arith.addf %a{i}, %x{i} : f32");
    }
    let _ = writeln!(s, "scf.yield {yields} : {types}\n}}");
    s
}

/// One operand of a score's dot product: lines loading what every member shares (defining
/// `{product.0}` or `{product.1}`), each member's own lines, the product's two names.
type Operand<'a> = (&'a str, &'a dyn Fn(usize) -> String, (&'a str, &'a str));

/// `%s{i}` = each member's score, `(nope . nope + rope . rope) * scale`: the two dot products
/// ([`dots`]: `%sn`, `%sp`) summed, then scaled (the reference's `dot`s and order).
fn scores(group: usize, nope: Operand, rope: Operand) -> String {
    let ((nope_shared, nope_own, nope_product), (rope_shared, rope_own, rope_product)) = (nope, rope);
    dots(group, "sn", "%cNope", nope_shared, nope_own, nope_product)
        + &dots(group, "sp", "%cRope", rope_shared, rope_own, rope_product)
        + &each(group, |i| {
            format!("%snp{i} = arith.addf %sn#{i}, %sp#{i} : f32\n%s{i} = arith.mulf %snp{i}, %softmax_scale : f32\n")
        })
}

/// The prologue of the queries' kernels (forward and the queries' gradient): the block's head
/// and queries `%b0..%b_end` (`%nq` of them), the keys its last query sees (`%nkeys`), the
/// group's members and the chunks.
pub(super) fn query_prologue(m: &Mla) -> String {
    let mut s = String::from(
        "%T = memref.dim %q_nope, %c0 : memref<?x?x?xf32>
%nqb = arith.ceildivui %T, %cG : index
%h = arith.divui %row, %nqb : index
%qb = arith.remui %row, %nqb : index
%b0 = arith.muli %qb, %cG : index
%b_end0 = arith.addi %b0, %cG : index
%b_end = arith.minui %b_end0, %T : index
%nq = arith.subi %b_end, %b0 : index
%b_last = arith.subi %b_end, %c1 : index
%S = memref.dim %latent, %c0 : memref<?x?xf32>
%first_key = arith.subi %S, %T : index
%nkeys = arith.addi %first_key, %b_end : index
%kb0 = arith.addi %first_key, %b0 : index
%hbase = arith.muli %h, %cPerHead : index
%vbase = arith.addi %hbase, %cNope : index
",
    );
    s.push_str(&each(m.group, |i| {
        format!(
            "%ci{i} = arith.constant {i} : index
%bq{i}_0 = arith.addi %b0, %ci{i} : index
%bq{i} = arith.minui %bq{i}_0, %b_last : index
%ok{i} = arith.cmpi ult, %ci{i}, %nq : index
%po{i}_base = arith.muli %ci{i}, %cCtx : index
%qo{i} = arith.constant {qo} : index
%qr{i} = arith.constant {qr} : index
%go{i} = arith.constant {go} : index
",
            qo = i * (m.nope + m.rope),
            qr = i * (m.nope + m.rope) + m.nope,
            go = i * m.v,
        )
    }));
    s + MLA_CHUNKS
}

/// The keys' gradient's prologue: the block's head and keys `%j0..` of `dkvb`'s rows, the group's
/// members, and the queries the block's first key sees (`%i0..%T`, in chunks; none when that key
/// is past the latent's).
pub(super) fn key_prologue(m: &Mla) -> String {
    let mut s = String::from(
        "%R = memref.dim %dkvb, %c0 : memref<?x?xf32>
%nkb = arith.ceildivui %R, %cG : index
%h = arith.divui %row, %nkb : index
%kb = arith.remui %row, %nkb : index
%j0 = arith.muli %kb, %cG : index
%T = memref.dim %q_nope, %c0 : memref<?x?x?xf32>
%S = memref.dim %latent, %c0 : memref<?x?xf32>
%first_key = arith.subi %S, %T : index
%S1 = arith.maxui %S, %c1 : index
%s_last = arith.subi %S1, %c1 : index
%r_last = arith.subi %R, %c1 : index
%hbase = arith.muli %h, %cPerHead : index
%vbase = arith.addi %hbase, %cNope : index
%hn = arith.muli %h, %cNope : index
%hr = arith.muli %h, %cRope : index
%hv = arith.muli %h, %cV : index
",
    );
    s.push_str(&each(m.group, |k| {
        format!(
            "%ck{k} = arith.constant {k} : index
%jr{k}_0 = arith.addi %j0, %ck{k} : index
%jr{k} = arith.minui %jr{k}_0, %r_last : index
%okk{k} = arith.cmpi ult, %jr{k}_0, %R : index
%late{k} = arith.cmpi ugt, %jr{k}, %first_key : index
%joff{k} = arith.subi %jr{k}, %first_key : index
%i0_{k} = arith.select %late{k}, %joff{k}, %c0 : index
%kh{k}_0 = arith.muli %jr{k}, %cH : index
%kh{k} = arith.addi %kh{k}_0, %h : index
%pk{k}_base = arith.muli %ck{k}, %cCtx : index
%ko{k} = arith.constant {ko} : index
%kvo{k} = arith.constant {kvo} : index
%kp{k} = arith.constant {kp} : index
",
            ko = k * (m.nope + m.v + m.rope),
            kvo = k * (m.nope + m.v + m.rope) + m.nope,
            kp = k * (m.nope + m.v + m.rope) + m.nope + m.v,
        )
    }));
    s.push_str(
        "%i0 = arith.addi %i0_0, %c0 : index
%key = arith.cmpi ult, %j0, %S : index
%i0_safe = arith.select %key, %i0, %T : index
%nq = arith.subi %T, %i0_safe : index
%nchunks = arith.ceildivui %nq, %cCtx : index
",
    );
    s
}

/// The group's query `index` (the thread's own, `%tid`, or a loop's): its row `%b{s}`, the keys of
/// the chunk it sees up to `%k1{s}`, its scores from `%base{s}` and its `sh_red` cells from `%ri{s}`.
fn query_of(index: &str, s: &str) -> String {
    format!(
        "%b{s} = arith.addi %b0, {index} : index
%nk{s}0 = arith.addi %first_key, %b{s} : index
%nk{s} = arith.addi %nk{s}0, %c1 : index
%k1{s} = arith.minui %k1, %nk{s} : index
%base{s} = arith.muli {index}, %cCtx : index
%ri{s} = arith.muli {index}, %c4 : index
"
    )
}

/// One thread per query folds the chunk's keys it sees into `sh_red[4 i + cell]`: the slot's `%v`
/// of `sh_p`, or what `extra` (lines) makes of it (`value`) — the max (`max`) or a sum.
fn per_query_fold(cell: usize, max: bool, red: &str, p: &str, (extra, value): (&str, &str)) -> String {
    let fold = if max {
        format!("%gt = arith.cmpf ogt, {value}, %a : f32\n    %a2 = arith.select %gt, {value}, %a : f32")
    } else {
        format!("%a2 = arith.addf %a, {value} : f32")
    };
    format!(
        "%mine = arith.cmpi ult, %tid, %nq : index
scf.if %mine {{
{q}  %cell_off = arith.constant {cell} : index
  %cell = arith.addi %rit, %cell_off : index
  %f0 = memref.load %sh_red[%cell] : {red}
  %f = scf.for %j = %k0 to %k1t step %c1 iter_args(%a = %f0) -> (f32) {{
    %slot = arith.subi %j, %k0 : index
    %at = arith.addi %baset, %slot : index
    %v = memref.load %sh_p[%at] : {p}
{extra}    {fold}
    scf.yield %a2 : f32
  }}
  memref.store %f, %sh_red[%cell] : {red}
}}
",
        q = super::indent2(&query_of("%tid", "t")),
    )
}

/// Every query of the group, every key of the chunk it sees, strided over the threads: `body`
/// (lines, at the key's `%at` of query `%i`).
fn per_query_keys(body: &str) -> String {
    format!(
        "scf.for %i = %c0 to %nq step %c1 {{
{q}  %j_first_i = arith.addi %k0, %tid : index
  scf.for %j = %j_first_i to %k1i step %cT {{
    %slot = arith.subi %j, %k0 : index
    %at = arith.addi %basei, %slot : index
{body}  }}
}}
",
        q = super::indent2(&query_of("%i", "i")),
        body = super::indent2(&super::indent2(body)),
    )
}

/// The forward's (`grad` false) or the queries' gradient's phases.
pub(super) fn query_phases(m: &Mla, grad: bool, lowering: Lowering, sh: &dyn Fn(&str) -> String) -> Vec<String> {
    let g = m.group;
    let (red, p, q) = (&sh("sh_red"), &sh("sh_p"), &sh("sh_q"));
    let (dp, gq) = if grad { (sh("sh_dp"), sh("sh_g")) } else { (String::new(), String::new()) };
    let (dp, gq) = (&dp, &gq);
    let chunk = MLA_CHUNK;
    // Every key of the chunk, strided: the group's scores into `sh_p`.
    let (q_nope, q_rope) = (
        |i| format!("%qa{i} = arith.addi %qo{i}, %d : index\n%qv{i} = memref.load %sh_q[%qa{i}] : {q}\n"),
        |i| format!("%qa{i} = arith.addi %qr{i}, %d : index\n%qv{i} = memref.load %sh_q[%qa{i}] : {q}\n"),
    );
    let scores = format!(
        "scf.for %j = %j_first to %k1 step %cT {{
%slot = arith.subi %j, %k0 : index
{scores}{store}}}
",
        scores = scores(
            g,
            (
                "%col = arith.addi %hbase, %d : index\n%kv_v = memref.load %kvbt[%col, %j] : memref<?x?xf32>\n",
                &q_nope,
                ("%qv{i}", "%kv_v"),
            ),
            ("%pe = memref.load %latt[%d, %j] : memref<?x?xf32>\n", &q_rope, ("%qv{i}", "%pe")),
        ),
        store = each(g, |i| format!(
            "%po{i} = arith.addi %po{i}_base, %slot : index
memref.store %s{i}, %sh_p[%po{i}] : {p}
"
        )),
    );
    let recompute = format!("scf.if %several {{\n{scores}}}\n");
    let exps = per_query_keys(&format!(
        "%max = memref.load %sh_red[%rii] : {red}
%v = memref.load %sh_p[%at] : {p}
%xm = arith.subf %v, %max : f32
{e}memref.store %e, %sh_p[%at] : {p}
",
        e = exp(lowering, "%xm", "%e")
    ));
    // p = e / sum; the gradient's dp = dout . v beside it, every key of the chunk.
    let mut normalize = per_query_keys(&format!(
        "%sum_at = arith.addi %rii, %c1 : index
%sum = memref.load %sh_red[%sum_at] : {red}
%v = memref.load %sh_p[%at] : {p}
%pv = arith.divf %v, %sum : f32
memref.store %pv, %sh_p[%at] : {p}
"
    ));
    if grad {
        let _ = write!(
            normalize,
            "scf.for %j = %j_first to %k1 step %cT {{
%slot = arith.subi %j, %k0 : index
{dots}{store}}}
",
            dots = dots(
                g,
                "dpv",
                "%cV",
                "%col = arith.addi %vbase, %d : index\n%vv = memref.load %kvbt[%col, %j] : memref<?x?xf32>\n",
                |i| format!("%ga{i} = arith.addi %go{i}, %d : index\n%gv{i} = memref.load %sh_g[%ga{i}] : {gq}\n"),
                ("%gv{i}", "%vv"),
            ),
            store = each(g, |i| format!(
                "%po{i} = arith.addi %po{i}_base, %slot : index\nmemref.store %dpv#{i}, %sh_dp[%po{i}] : {dp}\n"
            )),
        );
    }
    let width = if grad { "%cOut" } else { "%cV" };
    let zero_outputs = if grad {
        "    %is_nope = arith.cmpi ult, %o, %cNope : index
    %r = arith.subi %o, %cNope : index
    scf.if %is_nope {
      memref.store %zero, %dq_nope[%bz, %h, %o] : memref<?x?x?xf32>
    } else {
      memref.store %zero, %dq_pe[%bz, %h, %r] : memref<?x?x?xf32>
    }
"
        .to_string()
    } else {
        "    %hv = arith.muli %h, %cV : index
    %ocol = arith.addi %hv, %o : index
    memref.store %zero, %out[%bz, %ocol] : memref<?x?xf32>
"
        .to_string()
    };
    // The group's queries (and output gradients) into shared memory, `[query | rope]` a row (the
    // last query's past the block's).
    let mut stage = format!(
        "%cQW = arith.addi %cNope, %cRope : index
%q_all = arith.muli %cG, %cQW : index
scf.for %x = %tid to %q_all step %cT {{
  %qi = arith.divui %x, %cQW : index
  %qc = arith.remui %x, %cQW : index
  %qrow0 = arith.addi %b0, %qi : index
  %qrow = arith.minui %qrow0, %b_last : index
  %in_nope = arith.cmpi ult, %qc, %cNope : index
  %qcr = arith.subi %qc, %cNope : index
  %qx = scf.if %in_nope -> (f32) {{
    %v = memref.load %q_nope[%qrow, %h, %qc] : memref<?x?x?xf32>
    scf.yield %v : f32
  }} else {{
    %v = memref.load %q_pe[%qrow, %h, %qcr] : memref<?x?x?xf32>
    scf.yield %v : f32
  }}
  memref.store %qx, %sh_q[%x] : {q}
}}
"
    );
    if grad {
        let _ = write!(
            stage,
            "%g_all = arith.muli %cG, %cV : index
scf.for %x = %tid to %g_all step %cT {{
  %gi = arith.divui %x, %cV : index
  %gc = arith.remui %x, %cV : index
  %grow0 = arith.addi %b0, %gi : index
  %grow = arith.minui %grow0, %b_last : index
  %gx = memref.load %dout[%grow, %h, %gc] : memref<?x?x?xf32>
  memref.store %gx, %sh_g[%x] : {gq}
}}
"
        );
    }
    let mut phases = vec![format!(
        "%init = arith.cmpi ult, %tid, %cG : index
scf.if %init {{
  %ri = arith.muli %tid, %c4 : index
  %ri1 = arith.addi %ri, %c1 : index
  %ri2 = arith.addi %ri, %c2 : index
  memref.store %ninf, %sh_red[%ri] : {red}
  memref.store %zero, %sh_red[%ri1] : {red}
  memref.store %zero, %sh_red[%ri2] : {red}
}}
%cOut = arith.addi %cNope, %cRope : index
scf.for %i = %c0 to %nq step %c1 {{
  %bz = arith.addi %b0, %i : index
  scf.for %o = %tid to {width} step %cT {{
{zero_outputs}  }}
}}
{stage}"
    )];
    phases.extend(loop_phases(
        "chunk",
        "nchunks",
        vec![format!("{chunk}{scores}"), format!("{chunk}{}", per_query_fold(0, true, red, p, ("", "%v")))],
    ));
    phases.extend(loop_phases(
        "chunk",
        "nchunks",
        vec![
            format!("{chunk}{recompute}"),
            format!("{chunk}{exps}"),
            format!("{chunk}{}", per_query_fold(1, false, red, p, ("", "%v"))),
        ],
    ));
    let probabilities = vec![
        format!("{chunk}{recompute}"),
        format!("{chunk}scf.if %several {{\n{exps}}}\n"),
        format!("{chunk}{normalize}"),
    ];
    if !grad {
        let mut body = probabilities;
        body.push(format!("{chunk}{}", accumulate_over_keys(g, p, Output::Values)));
        phases.extend(loop_phases("chunk", "nchunks", body));
        return phases;
    }
    // The mean of p dp over the keys each query sees, in order (a thread a query).
    let mut body = probabilities.clone();
    body.push(format!(
        "{chunk}{}",
        per_query_fold(
            2,
            false,
            red,
            p,
            (&format!("    %dpv = memref.load %sh_dp[%at] : {dp}\n    %w = arith.mulf %v, %dpv : f32\n"), "%w")
        )
    ));
    phases.extend(loop_phases("chunk", "nchunks", body));
    phases.push(format!(
        "%mine = arith.cmpi ult, %tid, %nq : index
scf.if %mine {{
  %bt = arith.addi %b0, %tid : index
  %ri = arith.muli %tid, %c4 : index
  %ri1 = arith.addi %ri, %c1 : index
  %ri2 = arith.addi %ri, %c2 : index
  %max = memref.load %sh_red[%ri] : {red}
  %sum = memref.load %sh_red[%ri1] : {red}
  %mean = memref.load %sh_red[%ri2] : {red}
  %qh0 = arith.muli %bt, %cH : index
  %qh = arith.addi %qh0, %h : index
  memref.store %max, %stats[%qh, %c0] : memref<?x?xf32>
  memref.store %sum, %stats[%qh, %c1] : memref<?x?xf32>
  memref.store %mean, %stats[%qh, %c2] : memref<?x?xf32>
}}
"
    ));
    // ds = p (dp - mean) scale, then dq accumulated over the keys in order (a single chunk's p
    // and dp kept from above).
    let mut body: Vec<String> =
        probabilities.iter().map(|ph| format!("{chunk}scf.if %several {{\n{}}}\n", &ph[chunk.len()..])).collect();
    body.push(format!(
        "{chunk}{}",
        per_query_keys(&format!(
            "%mean_at = arith.addi %rii, %c2 : index
%mean = memref.load %sh_red[%mean_at] : {red}
%pv = memref.load %sh_p[%at] : {p}
%dpv = memref.load %sh_dp[%at] : {dp}
%dm = arith.subf %dpv, %mean : f32
%pdm = arith.mulf %pv, %dm : f32
%ds = arith.mulf %pdm, %softmax_scale : f32
memref.store %ds, %sh_dp[%at] : {dp}
"
        ))
    ));
    body.push(format!(
        "{chunk}{}{}",
        accumulate_over_keys(g, dp, Output::QueryNope),
        accumulate_over_keys(g, dp, Output::QueryRope)
    ));
    phases.extend(loop_phases("chunk", "nchunks", body));
    phases
}

/// What [`accumulate_over_keys`] sums.
#[derive(Clone, Copy)]
enum Output {
    /// `out[b, h v + e] += p v[e]`.
    Values,
    /// `dq_nope[b, h, o] += ds k_nope[o]`.
    QueryNope,
    /// `dq_pe[b, h, o] += ds k_pe[o]`.
    QueryRope,
}

/// Each output column (strided over the threads) of every query of the group, summed over the
/// chunk's keys in order from its stored value: the key's element loaded once, times the query's
/// coefficient in `sh` (`p` or `ds`), added where the query sees the key.
fn accumulate_over_keys(g: usize, sh: &str, output: Output) -> String {
    let m2 = "memref<?x?xf32>";
    let m3 = "memref<?x?x?xf32>";
    // (coefficients, columns, the column's setup, the output at query i, the key's element)
    let (coefficient, columns, header, at, element) = match output {
        Output::Values => (
            "sh_p",
            "%cV",
            "%hv = arith.muli %h, %cV : index\n%ocol = arith.addi %hv, %o : index\n%ecol = arith.addi %vbase, %o : index\n",
            ("%out", "%ocol", m2),
            format!("%ke = memref.load %kvb[%j, %ecol] : {m2}\n"),
        ),
        Output::QueryNope => (
            "sh_dp",
            "%cNope",
            "%ecol = arith.addi %hbase, %o : index\n",
            ("%dq_nope", "%h, %o", m3),
            format!("%ke = memref.load %kvb[%j, %ecol] : {m2}\n"),
        ),
        Output::QueryRope => (
            "sh_dp",
            "%cRope",
            "%ecol = arith.addi %cKv, %o : index\n",
            ("%dq_pe", "%h, %o", m3),
            format!("%ke = memref.load %latent[%j, %ecol] : {m2}\n"),
        ),
    };
    let (buffer, columns_at, ty) = at;
    let load = each(g, |i| format!("%o{i} = memref.load {buffer}[%bq{i}, {columns_at}] : {ty}\n"));
    let store =
        each(g, |i| format!("scf.if %ok{i} {{\n  memref.store %acc#{i}, {buffer}[%bq{i}, {columns_at}] : {ty}\n}}\n"));
    let (yields, types) = carried(g, "z");
    let add = each(g, |i| {
        format!(
            "%cf{i} = memref.load %{coefficient}[%pc{i}] : {sh}
%x{i} = arith.mulf %cf{i}, %ke : f32
%y{i} = arith.addf %a{i}, %x{i} : f32
%vis{i} = arith.cmpi sle, %rel, %ci{i} : index
%z{i} = arith.select %vis{i}, %y{i}, %a{i} : f32
"
        )
    });
    let slots = each(g, |i| format!("%pc{i} = arith.addi %po{i}_base, %slot : index\n"));
    format!(
        "scf.for %o = %tid to {columns} step %cT {{
{header}{load}%acc:{g} = scf.for %j = %k0 to %k1 step %c1 {args} {{
%slot = arith.subi %j, %k0 : index
%rel = arith.subi %j, %kb0 : index
{slots}{element}{add}scf.yield {yields} : {types}
}}
{store}}}
",
        args = iter_args(g, "%o"),
    )
}

/// The keys' gradient's phases: per chunk of the queries the block's first key sees, each query
/// (strided over the threads) has its `p` and `ds` for every key of the group recomputed from
/// `stats`; then each of the key's columns sums them over the queries in order.
pub(super) fn key_phases(m: &Mla, lowering: Lowering, sh: &dyn Fn(&str) -> String) -> Vec<String> {
    let g = m.group;
    let (pi, dsi, keys) = (&sh("sh_pi"), &sh("sh_dsi"), &sh("sh_k"));
    let chunk = "%q0 = arith.muli %chunk, %cCtx : index
%i_lo = arith.addi %i0_safe, %q0 : index
%i_hi0 = arith.addi %i_lo, %cCtx : index
%i_hi = arith.minui %i_hi0, %T : index
%i_first = arith.addi %i_lo, %tid : index
";
    let zero = each(g, |k| {
        format!(
            "scf.if %okk{k} {{
  scf.for %o = %tid to %cKeyCols step %cT {{
    %is_pe = arith.cmpi uge, %o, %cPerHead : index
    %r = arith.subi %o, %cPerHead : index
    scf.if %is_pe {{
      memref.store %zero, %part[%kh{k}, %r] : memref<?x?xf32>
    }} else {{
      %col = arith.addi %hbase, %o : index
      memref.store %zero, %dkvb[%jr{k}, %col] : memref<?x?xf32>
    }}
  }}
}}
"
        )
    });
    // The group's keys into shared memory: each row's head columns `[nope | v]` of kvb, then its
    // rope columns of the latent.
    let stage = format!(
        "%k_all = arith.muli %cG, %cKeyCols : index
scf.for %x = %tid to %k_all step %cT {{
  %kk = arith.divui %x, %cKeyCols : index
  %kc = arith.remui %x, %cKeyCols : index
  %krow0 = arith.addi %j0, %kk : index
  %krow = arith.minui %krow0, %s_last : index
  %in_head = arith.cmpi ult, %kc, %cPerHead : index
  %kcr = arith.subi %kc, %cPerHead : index
  %kx = scf.if %in_head -> (f32) {{
    %col = arith.addi %hbase, %kc : index
    %v = memref.load %kvb[%krow, %col] : memref<?x?xf32>
    scf.yield %v : f32
  }} else {{
    %col = arith.addi %cKv, %kcr : index
    %v = memref.load %latent[%krow, %col] : memref<?x?xf32>
    scf.yield %v : f32
  }}
  memref.store %kx, %sh_k[%x] : {keys}
}}
"
    );
    let mut phases = vec![format!("%cKeyCols = arith.addi %cPerHead, %cRope : index\n{zero}{stage}")];
    let (k_nope, k_rope) = (
        |k| format!("%ka{k} = arith.addi %ko{k}, %d : index\n%kv{k} = memref.load %sh_k[%ka{k}] : {keys}\n"),
        |k| format!("%ka{k} = arith.addi %kp{k}, %d : index\n%pe{k} = memref.load %sh_k[%ka{k}] : {keys}\n"),
    );
    let probabilities = format!(
        "scf.for %i = %i_first to %i_hi step %cT {{
%slot = arith.subi %i, %i_lo : index
{scores}%hq = arith.muli %i, %cH : index
%qrow = arith.addi %hq, %h : index
%max = memref.load %stats[%qrow, %c0] : memref<?x?xf32>
%sum = memref.load %stats[%qrow, %c1] : memref<?x?xf32>
%mean = memref.load %stats[%qrow, %c2] : memref<?x?xf32>
{p}{dp}{ds}}}
",
        scores = scores(
            g,
            (
                "%qc = arith.addi %hn, %d : index\n%qv = memref.load %qnt[%qc, %i] : memref<?x?xf32>\n",
                &k_nope,
                ("%qv", "%kv{i}"),
            ),
            (
                "%qc = arith.addi %hr, %d : index\n%qv = memref.load %qpt[%qc, %i] : memref<?x?xf32>\n",
                &k_rope,
                ("%qv", "%pe{i}"),
            ),
        ),
        p = each(g, |k| format!(
            "%xm{k} = arith.subf %s{k}, %max : f32
{e}%pv{k} = arith.divf %e{k}, %sum : f32
",
            e = exp(lowering, &format!("%xm{k}"), &format!("%e{k}"))
        )),
        dp = dots(
            g,
            "dpv",
            "%cV",
            "%gc = arith.addi %hv, %d : index\n%gv = memref.load %doutt[%gc, %i] : memref<?x?xf32>\n",
            |k| format!("%ka{k} = arith.addi %kvo{k}, %d : index\n%vv{k} = memref.load %sh_k[%ka{k}] : {keys}\n"),
            ("%gv", "%vv{i}"),
        ),
        ds = each(g, |k| format!(
            "%dm{k} = arith.subf %dpv#{k}, %mean : f32
%pdm{k} = arith.mulf %pv{k}, %dm{k} : f32
%ds{k} = arith.mulf %pdm{k}, %softmax_scale : f32
%at{k} = arith.addi %pk{k}_base, %slot : index
memref.store %pv{k}, %sh_pi[%at{k}] : {pi}
memref.store %ds{k}, %sh_dsi[%at{k}] : {dsi}
"
        )),
    );
    let (yields, types) = carried(g, "z");
    let sums = format!(
        "%cKeyCols = arith.addi %cPerHead, %cRope : index
scf.for %o = %tid to %cKeyCols step %cT {{
%is_key = arith.cmpi ult, %o, %cNope : index
%is_pe = arith.cmpi uge, %o, %cPerHead : index
%not_key = arith.cmpi uge, %o, %cNope : index
%not_pe = arith.cmpi ult, %o, %cPerHead : index
%is_value = arith.andi %not_key, %not_pe : i1
%e_col = arith.subi %o, %cNope : index
%r = arith.subi %o, %cPerHead : index
%col = arith.addi %hbase, %o : index
{load}%acc:{g} = scf.for %i = %i_lo to %i_hi step %c1 {args} {{
%slot = arith.subi %i, %i_lo : index
%qx = scf.if %is_key -> (f32) {{
  %qn = memref.load %q_nope[%i, %h, %o] : memref<?x?x?xf32>
  scf.yield %qn : f32
}} else {{
  %y = scf.if %is_pe -> (f32) {{
    %qp = memref.load %q_pe[%i, %h, %r] : memref<?x?x?xf32>
    scf.yield %qp : f32
  }} else {{
    %gd = memref.load %dout[%i, %h, %e_col] : memref<?x?x?xf32>
    scf.yield %gd : f32
  }}
  scf.yield %y : f32
}}
{add}scf.yield {yields} : {types}
}}
{store}}}
",
        load = each(g, |k| format!(
            "%w{k} = scf.if %is_pe -> (f32) {{
  %v = memref.load %part[%kh{k}, %r] : memref<?x?xf32>
  scf.yield %v : f32
}} else {{
  %v = memref.load %dkvb[%jr{k}, %col] : memref<?x?xf32>
  scf.yield %v : f32
}}
"
        )),
        args = iter_args(g, "%w"),
        add = each(g, |k| format!(
            "%at{k} = arith.addi %pk{k}_base, %slot : index
%dsk{k} = memref.load %sh_dsi[%at{k}] : {dsi}
%pvk{k} = memref.load %sh_pi[%at{k}] : {pi}
%cf{k} = arith.select %is_value, %pvk{k}, %dsk{k} : f32
%x{k} = arith.mulf %cf{k}, %qx : f32
%y{k} = arith.addf %a{k}, %x{k} : f32
%vis{k} = arith.cmpi uge, %i, %i0_{k} : index
%z{k} = arith.select %vis{k}, %y{k}, %a{k} : f32
"
        )),
        store = each(g, |k| format!(
            "scf.if %okk{k} {{
  scf.if %is_pe {{
    memref.store %acc#{k}, %part[%kh{k}, %r] : memref<?x?xf32>
  }} else {{
    memref.store %acc#{k}, %dkvb[%jr{k}, %col] : memref<?x?xf32>
  }}
}}
"
        )),
    );
    phases.extend(loop_phases("chunk", "nchunks", vec![format!("{chunk}{probabilities}"), format!("{chunk}{sums}")]));
    phases
}
