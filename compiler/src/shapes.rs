//! Run-time shapes of kernel results: each dynamic dim of a kernel function's results as a rule over
//! its input sizes ([`DimRule`]), derived from the `v3` ops of the kernel. Target-independent: the
//! CPU backend allocates outputs with it, and the plan sizes buffers with it.
//!
//! Rules: a concatenation along a dynamic axis sums its operands' sizes; an embedding has as many
//! rows as ids; a training op's result follows the operand it is the gradient of (a matmul's the
//! rows of `a'` and columns of `b'`); any other dynamic result dim follows the first operand with a
//! dynamic dim at the same position (rows of activations, batch of caches).

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};

use crate::verify::Shape;

pub use v3c_runtime::plan::DimRule;

/// Per result of `kernel` (a kernel function), per dim, its rule.
pub fn kernel_shape_rules(kernel: &OperationRef) -> Result<Vec<Vec<DimRule>>, String> {
    let block = kernel.region(0).ok().and_then(|r| r.first_block()).ok_or("kernel without a body")?;
    let mut rules: HashMap<usize, Vec<DimRule>> = HashMap::new();
    let shape_of = |t: melior::ir::Type| Shape::of(t).ok_or_else(|| format!("{t} is not a ranked tensor"));
    for i in 0..block.argument_count() {
        let arg = block.argument(i).map_err(|e| e.to_string())?;
        let shape = shape_of(arg.r#type())?;
        let r = shape
            .dims
            .iter()
            .enumerate()
            .map(|(d, n)| n.map_or(DimRule::Input { input: i, dim: d }, DimRule::Const))
            .collect();
        rules.insert(arg.to_raw().ptr as usize, r);
    }
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        let operand_rules: Vec<Vec<DimRule>> = (0..o.operand_count())
            .map(|i| o.operand(i).ok().and_then(|v| rules.get(&(v.to_raw().ptr as usize)).cloned()).unwrap_or_default())
            .collect();
        if name == "func.return" {
            return Ok(operand_rules);
        }
        let transposes = |key: &str| o.attribute(key).map(|a| a.to_string() == "true").unwrap_or(false);
        let matmul_t = (transposes("transpose_a"), transposes("transpose_b"));
        let concat_axis = (name == "v3.concat")
            .then(|| o.attribute("axis").ok()?.to_string().split(':').next()?.trim().parse::<usize>().ok())
            .flatten();
        for r in 0..o.result_count() {
            let result = o.result(r).map_err(|e| e.to_string())?;
            let shape = shape_of(result.r#type())?;
            let dims = shape
                .dims
                .iter()
                .enumerate()
                .map(|(d, n)| match (n, follows(&name, r, d, matmul_t)) {
                    (Some(n), _) => Ok(DimRule::Const(*n)),
                    (None, _) if concat_axis == Some(d) => {
                        Ok(DimRule::Sum(Box::new(operand_rules[0][d].clone()), Box::new(operand_rules[1][d].clone())))
                    }
                    (None, _) if name == "v3.embed" => Ok(operand_rules[1][0].clone()),
                    (None, Some((k, dim))) => operand_rules
                        .get(k)
                        .and_then(|rule| rule.get(dim))
                        .cloned()
                        .ok_or_else(|| format!("{name}: operand {k} has no dim {dim}")),
                    (None, None) => operand_rules
                        .iter()
                        .find_map(|r| r.get(d).filter(|x| !matches!(x, DimRule::Const(_))).cloned())
                        .ok_or_else(|| format!("{name}: no rule for dynamic result dim {d}")),
                })
                .collect::<Result<Vec<_>, String>>()?;
            rules.insert(result.to_raw().ptr as usize, dims);
        }
    }
    Err("kernel without a return".into())
}

/// The operand and dim that dim `d` of result `r` of a training op copies: a gradient is shaped
/// like what it is the gradient of; `a' @ b'` has the rows of `a'` and the columns of `b'`.
fn follows(name: &str, r: usize, d: usize, (ta, tb): (bool, bool)) -> Option<(usize, usize)> {
    match name {
        "v3.matmul" => Some(match d {
            0 => (0, usize::from(ta)),
            _ => (1, usize::from(!tb)),
        }),
        _ => shaped_like(name, r).map(|k| (k, d)),
    }
}

/// The operand result `r` of a training op is shaped like (the value it is the gradient of).
pub fn shaped_like(name: &str, r: usize) -> Option<usize> {
    match name {
        "v3.rms_norm_grad" | "v3.silu_mul_grad" | "v3.attention_grad" => Some(r),
        "v3.concat_grad" => Some(r + 1),
        // (dx, d weights) of (x, indices, weights, ...); the stacked weight gradients are static.
        "v3.moe_experts_grad" => [0, 2].get(r).copied(),
        _ => None,
    }
}

/// For each result of `kernel`: the input it updates in place, if any. A `cache_write` result whose
/// cache is a kernel argument is that argument's buffer with one row per sequence written: the plan
/// binds both to the same buffer (decode caches are never copied).
pub fn kernel_in_place(kernel: &OperationRef) -> Vec<Option<usize>> {
    let Some(block) = kernel.region(0).ok().and_then(|r| r.first_block()) else { return Vec::new() };
    let args: Vec<usize> =
        (0..block.argument_count()).filter_map(|i| block.argument(i).ok().map(|a| a.to_raw().ptr as usize)).collect();
    let mut updates: HashMap<usize, usize> = HashMap::new();
    let mut op = block.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
        if name == "v3.cache_write" {
            if let (Ok(cache), Ok(result)) = (o.operand(0), o.result(0)) {
                if let Some(j) = args.iter().position(|&a| a == cache.to_raw().ptr as usize) {
                    updates.insert(result.to_raw().ptr as usize, j);
                }
            }
        }
        if name == "func.return" {
            return (0..o.operand_count())
                .map(|k| o.operand(k).ok().and_then(|v| updates.get(&(v.to_raw().ptr as usize)).copied()))
                .collect();
        }
    }
    Vec::new()
}
