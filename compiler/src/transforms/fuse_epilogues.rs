//! `fuse-epilogues`: the GEMM epilogues and prologues every DeepSeek-V3 layer needs.
//!
//! Level: `v3` ops of an entry, after the MLA fusion, before `form-kernels`. Groups, by dataflow:
//! 1. SwiGLU: two linears on the same activations whose results meet in one `silu_mul` (dense MLP,
//!    shared expert): one GEMM with N = 2 x intermediate and the activation in its epilogue;
//! 2. residual add: a linear (o_proj, down_proj) whose result is added to the residual stream takes
//!    the add into its epilogue; for MoE, the shared expert's down projection also takes the add of
//!    the routed experts' output (the combine) and the residual add;
//! 3. sparse attention (DeepSeek-V3.2): `gather_rows` whose rows only the `attention_decode` after
//!    it reads joins it (`sparse_attention`: the attention reads the selected rows in place, the
//!    gathered rows are never written);
//! 4. fp8: `quantize_fp8` joins the kernel producing its input (1x128 quantization in that
//!    kernel's epilogue: RMSNorm, SwiGLU, attention).
//! Matches that cannot be scheduled as one launch are left alone.

use melior::ir::operation::OperationRef;
use melior::Context;

use super::op_graph::{Groups, OpGraph, Source};
use super::PassError;

fn sole_user(g: &OpGraph, op: usize) -> Option<usize> {
    match g.all_users(op)[..] {
        [u] => Some(u),
        _ => None,
    }
}

pub fn plan(g: &OpGraph, groups: &mut Groups) {
    let n = g.ops.len();
    // 1. SwiGLU dual GEMM.
    for s in 0..n {
        if g.ops[s].name != "silu_mul" {
            continue;
        }
        let (Some(a), Some(b)) = (g.producer(s, 0), g.producer(s, 1)) else { continue };
        let activations = |o: usize| {
            (0..g.ops[o].operands.len())
                .filter(|&k| g.param(o, k).is_none())
                .map(|k| g.ops[o].operands[k])
                .collect::<Vec<_>>()
        };
        if g.ops[a].name == "linear" && g.ops[b].name == "linear" && activations(a) == activations(b) {
            let mut m = vec![a, b, s];
            m.sort();
            groups.try_new(g, "swiglu", &m);
        }
    }
    // 2. Residual adds into the producing linear.
    for add in 0..n {
        if g.ops[add].name != "add" || groups.group_of(add).is_some() {
            continue;
        }
        let producers: Vec<usize> = (0..2).filter_map(|k| g.producer(add, k)).collect();
        // MoE combine: add(routed, shared_down) then add(residual, combined).
        let linear = producers.iter().copied().find(|&p| g.ops[p].name == "linear" && sole_user(g, p) == Some(add));
        let Some(linear) = linear else { continue };
        let mut members = vec![linear, add];
        if let Some(next) = sole_user(g, add) {
            if g.ops[next].name == "add" {
                members.push(next);
            }
        }
        if groups.try_new(g, "gemm_residual", &members).is_none() {
            groups.try_new(g, "gemm_residual", &[linear, add]);
        }
    }
    // 3. The selected rows' gather into the attention over them.
    for gather in 0..n {
        if g.ops[gather].name != "gather_rows" || groups.group_of(gather).is_some() {
            continue;
        }
        let [att] = g.all_users(gather)[..] else { continue };
        let reads = |k: usize, r: usize| matches!(g.ops[att].operands.get(k), Some(Source::Op(p, x)) if *p == gather && *x == r);
        if g.ops[att].name == "attention_decode" && reads(2, 0) && reads(3, 1) {
            groups.try_new(g, "sparse_attention", &[gather, att]);
        }
    }
    // 4. fp8 activation quantization in the producer's epilogue (through views: a reshape of the
    //    attention output is the attention kernel's own layout).
    for q in 0..n {
        if g.ops[q].name != "quantize_fp8" || groups.group_of(q).is_some() {
            continue;
        }
        let mut chain = Vec::new();
        let mut producer = g.producer(q, 0);
        while let Some(p) = producer.filter(|&p| matches!(g.ops[p].name.as_str(), "reshape" | "split")) {
            chain.push(p);
            producer = g.producer(p, 0);
        }
        let Some(p) = producer else { continue };
        chain.push(q);
        match groups.group_of(p) {
            Some(grp) => {
                groups.try_extend(g, grp, &chain);
            }
            None => {
                let kind = if g.ops[p].name == "rms_norm" {
                    "norm_quantize".to_string()
                } else {
                    format!("{}_quantize", g.ops[p].name)
                };
                chain.push(p);
                groups.try_new(g, &kind, &chain);
            }
        }
    }
}

/// Runs the pass on every entry function of `module_op`.
pub fn fuse_epilogues(context: &Context, module_op: &OperationRef) -> Result<(), PassError> {
    super::tag_groups(context, module_op, "fuse-epilogues", plan)
}
