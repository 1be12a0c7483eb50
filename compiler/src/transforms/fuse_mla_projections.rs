//! `fuse-mla-projections`: the MLA front end of a layer as three launches instead of ten.
//!
//! Level: `v3` ops of an entry, before `form-kernels`. Matches, by dataflow (not by weight names):
//! 1. the two projections that read the same normed activations, `q_a_proj` (result -> RMSNorm) and
//!    `kv_a_proj_with_mqa` (result -> split [latent | rope]): one GEMM with N = q_lora + kv_lora + rope;
//!    with DeepSeek-V3.2's indexer, its key projection `wk` (result -> LayerNorm) too, between them
//!    (N = q_lora + index_head_dim + kv_lora + rope) where q_lora and index_head_dim are whole
//!    128-row blocks of the fp8 weights' scales;
//! 2. the small "latent" kernel: RMSNorm of the kv latent, RoPE of k_pe, the (ckv, k_pe) row and its
//!    write into the latent cache; with DeepSeek-V3.2's indexer, the row is followed by the indexer's
//!    key (its LayerNorm and RoPE in the kernel too) and stored by a kernel of its own;
//! 3. `q_b_proj` with the query latent's RMSNorm as prologue, and its head split and RoPE of q_pe as
//!    epilogue.
//! With DeepSeek-V3.2's indexer the query latent is also the indexer's input: the norm is a kernel
//! of its own, and q_b and the indexer's `wq_b` each take their heads' split and RoPE as epilogue.
//! Each match is tagged as a fusion group; a match that cannot be scheduled as one launch is left
//! alone (the pass never fails on a graph it does not recognise). MLA without q LoRA (one q_proj):
//! group 1 is q_proj and kv_a_proj_with_mqa, and q_proj's head split and the RoPE of q_pe are a
//! kernel of their own (`mla_q_rope`) in place of group 3.

use melior::ir::operation::OperationRef;
use melior::Context;

use super::op_graph::{Groups, OpGraph, Source};
use super::PassError;

/// Ops reached from `op`'s results through view ops (reshape, split), with the views themselves.
fn through_views(g: &OpGraph, op: usize) -> (Vec<usize>, Vec<usize>) {
    let (mut views, mut ends) = (Vec::new(), Vec::new());
    let mut stack = g.all_users(op);
    while let Some(u) = stack.pop() {
        if matches!(g.ops[u].name.as_str(), "reshape" | "split") {
            views.push(u);
            stack.extend(g.all_users(u));
        } else {
            ends.push(u);
        }
    }
    (views, ends)
}

/// Rows of an fp8 weight's scale block: weights concatenated along N start on one.
const FP8_BLOCK: usize = 128;

/// The static last dimension of op `o`'s first result (a linear's output columns).
fn width(g: &OpGraph, o: usize) -> Option<usize> {
    // SAFETY: `raw` is a live op of the entry the graph reads; its result 0 exists (a linear's).
    let result = unsafe { melior::ir::Value::from_raw(mlir_sys::mlirOperationGetResult(g.ops[o].raw, 0)) };
    crate::verify::Shape::of(melior::ir::ValueLike::r#type(&result))?.dims.last().copied().flatten()
}

/// Activation operands of a linear: everything that is not a parameter argument.
fn activations(g: &OpGraph, op: usize) -> Vec<Source> {
    (0..g.ops[op].operands.len()).filter(|&k| g.param(op, k).is_none()).map(|k| g.ops[op].operands[k]).collect()
}

/// A linear's rows split into heads with RoPE: `reshape -> split ->` RoPE of the second piece (MLA's
/// query: q_nope returned as it is, q_pe rotated), or of the first joined back to the second by a
/// `concat` (the indexer's query, its heads' first columns rotated). The kernel's ops, if so.
fn heads_epilogue(g: &OpGraph, linear: usize) -> Option<Vec<usize>> {
    let [reshape] = g.all_users(linear)[..] else { return None };
    let [split] = g.all_users(reshape)[..] else { return None };
    if g.ops[reshape].name != "reshape" || g.ops[split].name != "split" || g.ops[split].users.len() != 2 {
        return None;
    }
    let is = |o: usize, name: &str| g.ops[o].name == name;
    match (&g.ops[split].users[0][..], &g.ops[split].users[1][..]) {
        // (q_nope read elsewhere: the kernel returns it and q_pe, as its lowering takes them.)
        (first, &[rope]) if is(rope, "rope") && !first.is_empty() && !first.contains(&rope) => {
            Some(vec![linear, reshape, split, rope])
        }
        (&[rope], &[join]) if is(rope, "rope") && is(join, "concat") => {
            let wired =
                g.all_users(rope) == [join] && g.ops[join].operands[..] == [Source::Op(rope, 0), Source::Op(split, 1)];
            wired.then(|| vec![linear, reshape, split, rope, join])
        }
        _ => None,
    }
}

/// DeepSeek-V3.2's indexer key as `join`, the row `concat(latent row, key)`, reads it: the ops
/// `layer_norm -> split -> (rope of the head, the tail) -> concat`, when nothing else reads them.
fn index_key_ops(g: &OpGraph, join: usize) -> Option<Vec<usize>> {
    let Source::Op(key, 0) = *g.ops[join].operands.get(1)? else { return None };
    let [Source::Op(rope, 0), Source::Op(split, 1)] = g.ops[key].operands[..] else { return None };
    let Source::Op(norm, 0) = *g.ops[split].operands.first()? else { return None };
    let wired = g.ops[key].name == "concat"
        && g.ops[rope].name == "rope"
        && g.ops[split].name == "split"
        && g.ops[norm].name == "layer_norm"
        && g.ops[rope].operands.first() == Some(&Source::Op(split, 0))
        && g.all_users(key) == [join]
        && g.all_users(rope) == [key]
        && g.ops[split].users.iter().map(Vec::as_slice).eq([&[rope][..], &[key][..]])
        && g.all_users(norm) == [split];
    wired.then(|| vec![norm, split, rope, key])
}

pub fn plan(g: &OpGraph, groups: &mut Groups) {
    let n = g.ops.len();
    // The linears by the activations they read, in block order (found once: a search of the whole
    // entry per layer made the pass quadratic in layers).
    let mut linears: std::collections::HashMap<Vec<Source>, Vec<usize>> = std::collections::HashMap::new();
    for o in (0..n).filter(|&o| g.ops[o].name == "linear") {
        linears.entry(activations(g, o)).or_default().push(o);
    }
    for kv_a in 0..n {
        if g.ops[kv_a].name != "linear" {
            continue;
        }
        // kv_a: result -> split whose head -> rms_norm and tail -> rope.
        let users = g.all_users(kv_a);
        let [split] = users[..] else { continue };
        if g.ops[split].name != "split" || g.ops[split].users.len() != 2 {
            continue;
        }
        let (head_users, tail_users) = (&g.ops[split].users[0], &g.ops[split].users[1]);
        let (&[kv_norm], &[k_rope]) = (&head_users[..], &tail_users[..]) else { continue };
        if g.ops[kv_norm].name != "rms_norm" || g.ops[k_rope].name != "rope" {
            continue;
        }
        // The latent row: concat(kv_norm, k_rope) -> cache (concat along rows, or cache_write).
        let row_users = g.all_users(kv_norm);
        let [row] = row_users[..] else { continue };
        if g.ops[row].name != "concat" || g.all_users(k_rope) != vec![row] {
            continue;
        }
        let cache_users = g.all_users(row);
        let [cache] = cache_users[..] else { continue };
        if !matches!(g.ops[cache].name.as_str(), "concat" | "cache_write") {
            continue;
        }
        // q_a: another linear on the same activations, result -> rms_norm -> q_b linear.
        let q_a = linears[&activations(g, kv_a)].iter().copied().find(|&o| o != kv_a);
        let q_norm = q_a.and_then(|q| match g.all_users(q)[..] {
            [u] if g.ops[u].name == "rms_norm" => Some(u),
            _ => None,
        });
        if let Some(q_a) = q_a {
            // Without q LoRA (q_a is q_proj itself, its heads read straight off it), the head split
            // and RoPE of q_pe are their own launch, first: the GEMM then writes q's rows whole, as
            // it writes the q latent with LoRA.
            if q_norm.is_none() {
                let (mut members, ends) = through_views(g, q_a);
                members.extend(ends.iter().copied().filter(|&e| g.ops[e].name == "rope"));
                if members.len() > 1 {
                    groups.try_new(g, "mla_q_rope", &members);
                }
            }
            // DeepSeek-V3.2's indexer key projection (`wk`): another linear on the same activations,
            // its result LayerNorm'ed. It joins the GEMM where it comes before kv_a (whose latent +
            // rope columns, 576 in V3.2, are not a whole number of the fp8 weights' 128-row scale
            // blocks: they stay the GEMM's last).
            // Every weight before kv_a starts on such a block (q_a's and wk's widths whole blocks:
            // the full model's 1536 and 128), or wk stays a GEMM of its own.
            let blocks = |o: usize| width(g, o).is_some_and(|w| w % FP8_BLOCK == 0);
            let key = linears[&activations(g, kv_a)].iter().copied().find(|&o| {
                o != q_a
                    && o < kv_a
                    && blocks(o)
                    && blocks(q_a)
                    && matches!(g.all_users(o)[..], [u] if g.ops[u].name == "layer_norm")
            });
            let mut gemm: Vec<usize> = [q_a, kv_a, split].into_iter().chain(key).collect();
            gemm.sort();
            groups.try_new(g, "mla_projections", &gemm);
        }
        // DeepSeek-V3.2: the row is the latent row and the indexer's key (`cache` is their concat,
        // stored by a kernel of its own): the key's LayerNorm and RoPE join the latent's kernel.
        let mut latent = vec![kv_norm, k_rope, row, cache];
        if g.ops[cache].name == "concat" && g.ops[cache].operands.first() == Some(&Source::Op(row, 0)) {
            latent.extend(index_key_ops(g, cache).unwrap_or_default());
        }
        groups.try_new(g, "mla_latent", &latent);
        // q_b: the linear reading the q latent norm (which it takes as prologue), its head views,
        // and RoPE of q_pe as epilogue.
        if let Some(q_norm) = q_norm {
            // With fp8 activations a quantization sits between the norm and the GEMM: it joins too.
            let mut prologue = vec![q_norm];
            let mut next = g.all_users(q_norm);
            if let [q] = next[..] {
                if g.ops[q].name == "quantize_fp8" {
                    prologue.push(q);
                    next = g.all_users(q);
                }
            }
            if next.len() > 1 {
                // DeepSeek-V3.2: the query latent is read by q_b and by the indexer's wq_b. The norm
                // (and quantization) is a launch of its own; each GEMM takes its heads' split and
                // RoPE as epilogue.
                for &linear in next.iter().filter(|&&u| g.ops[u].name == "linear") {
                    if let Some(members) = heads_epilogue(g, linear) {
                        groups.try_new(g, "mla_q_up", &members);
                    }
                }
            }
            if let [q_b] = next[..] {
                if g.ops[q_b].name == "linear" {
                    let (views, ends) = through_views(g, q_b);
                    let ropes: Vec<usize> = ends.iter().copied().filter(|&e| g.ops[e].name == "rope").collect();
                    let mut members = prologue;
                    members.push(q_b);
                    members.extend(views);
                    members.extend(ropes);
                    groups.try_new(g, "mla_q_up", &members);
                }
            }
        }
    }
}

/// Runs the pass on every entry function of `module_op`.
pub fn fuse_mla_projections(context: &Context, module_op: &OperationRef) -> Result<(), PassError> {
    super::tag_groups(context, module_op, "fuse-mla-projections", plan)
}
