//! The `v3` shape verifier: the relations between operand and result shapes that IRDL cannot express
//! (a linear's K, attention's head dims, matching elementwise operands, ...). Runs after MLIR's own
//! verifier in the pipeline driver, so hand-written or edited IR gets the same checks as imported IR.
//!
//! Dynamic dims (`?`) are wildcards: they match anything. Each failure names the op, its location and
//! the shapes involved.

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::r#type::{DimSize, RankedTensorType, ShapedTypeLike, TypeLike};
use melior::ir::{Module, RegionLike, Type, ValueLike};

/// A tensor type read from MLIR: dims (None = dynamic) and element type.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub dims: Vec<Option<usize>>,
    pub element: String,
}

impl Shape {
    /// Parses `tensor<?x64xf32>`; None for anything else.
    pub fn parse(text: &str) -> Option<Shape> {
        let inner = text.strip_prefix("tensor<")?.strip_suffix('>')?;
        let mut parts: Vec<&str> = inner.split('x').collect();
        let element = parts.pop()?.to_string();
        let dims = parts
            .iter()
            .map(|p| if *p == "?" { Some(None) } else { p.parse().ok().map(Some) })
            .collect::<Option<Vec<_>>>()?;
        Some(Shape { dims, element })
    }

    /// The shape of a ranked tensor type, read through MLIR's API (as [`Shape::parse`] of its text,
    /// without printing it: each print builds an MLIR `AsmState`, which sorts every loaded dialect,
    /// about a third of a large model's compile); None for anything else.
    pub fn of(t: Type) -> Option<Shape> {
        let tensor = RankedTensorType::try_from(t).ok()?;
        if tensor.encoding().is_some() {
            return Shape::parse(&t.to_string());
        }
        let dims = (0..tensor.rank())
            .map(|i| match tensor.dim_size(i) {
                Ok(DimSize::Static(n)) => Some(Some(n as usize)),
                Ok(DimSize::Dynamic) => Some(None),
                Err(_) => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Shape { dims, element: element_name(tensor.element()) })
    }

    fn rank(&self) -> usize {
        self.dims.len()
    }

    fn dim(&self, i: usize) -> Option<usize> {
        self.dims.get(i).copied().flatten()
    }

    fn last(&self) -> Option<usize> {
        self.dims.last().copied().flatten()
    }
}

/// MLIR's name of an element type (`f32`, `bf16`, `f8E4M3FN`, `i64`, ...), printed only when it is
/// none of the common ones.
pub fn element_name(t: Type) -> String {
    use mlir_sys::*;
    let raw = t.to_raw();
    // SAFETY: `raw` is a live type of its context; these only inspect it.
    unsafe {
        let named = [
            (mlirTypeIsAF32(raw), "f32"),
            (mlirTypeIsABF16(raw), "bf16"),
            (mlirTypeIsAF16(raw), "f16"),
            (mlirTypeIsAF64(raw), "f64"),
            (mlirTypeIsAFloat8E4M3FN(raw), "f8E4M3FN"),
            (mlirTypeIsAIndex(raw), "index"),
        ];
        if let Some((_, name)) = named.iter().find(|(is, _)| *is) {
            return (*name).to_string();
        }
        if mlirTypeIsAInteger(raw) && mlirIntegerTypeIsSignless(raw) {
            return format!("i{}", mlirIntegerTypeGetWidth(raw));
        }
    }
    t.to_string()
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d: Vec<String> = self.dims.iter().map(|d| d.map_or("?".into(), |n| n.to_string())).collect();
        write!(f, "[{}] {}", d.join(", "), self.element)
    }
}

/// Do two dims agree (a dynamic dim agrees with anything)?
fn agree(a: Option<usize>, b: Option<usize>) -> bool {
    a.is_none() || b.is_none() || a == b
}

fn same_shape(a: &Shape, b: &Shape) -> bool {
    a.rank() == b.rank() && a.dims.iter().zip(&b.dims).all(|(x, y)| agree(*x, *y))
}

/// Checks every `v3` op in `module`; returns one message per violation.
pub fn verify_shapes(module: &Module) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let mut func = module.body().first_operation();
    while let Some(f) = func {
        if let Ok(region) = f.region(0) {
            let mut block = region.first_block();
            while let Some(b) = block {
                let mut op = b.first_operation();
                while let Some(o) = op {
                    if let Err(e) = check_op(&o) {
                        errors.push(format!(
                            "{}: {}: {e}",
                            o.location(),
                            o.name().as_string_ref().as_str().unwrap_or("?")
                        ));
                    }
                    op = o.next_in_block();
                }
                block = b.next_in_region();
            }
        }
        func = f.next_in_block();
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn check_op(op: &OperationRef) -> Result<(), String> {
    let name = op.name().as_string_ref().as_str().unwrap_or("").to_string();
    let Some(kind) = name.strip_prefix("v3.") else { return Ok(()) };
    let operands: Vec<Shape> = (0..op.operand_count())
        .map(|i| op.operand(i).ok().and_then(|v| Shape::of(v.r#type())))
        .collect::<Option<_>>()
        .ok_or("operands must be ranked tensors")?;
    let results: Vec<Shape> = (0..op.result_count())
        .map(|i| op.result(i).ok().and_then(|v| Shape::of(v.r#type())))
        .collect::<Option<_>>()
        .ok_or("results must be ranked tensors")?;
    let int_attr = |n: &str| op.attribute(n).ok().and_then(crate::mlir::int_value);
    let fail = |msg: String| Err(msg);
    let r0 = results.first().ok_or("no result")?;
    match kind {
        "linear" => {
            // operandSegmentSizes = [x, x_scale, w, w_scale]
            let segments = op.attribute("operandSegmentSizes").map(|a| a.to_string()).unwrap_or_default();
            let has_x_scale = segments
                .split(':')
                .nth(1)
                .and_then(|s| s.split(',').nth(1))
                .map(|s| s.trim().trim_end_matches('>').trim())
                == Some("1");
            let x = &operands[0];
            let w = operands.get(if has_x_scale { 2 } else { 1 }).ok_or("missing weight operand")?;
            if w.rank() != 2 || !agree(x.last(), w.dim(1)) {
                return fail(format!("input {x} does not fit weight {w} ([out, in])"));
            }
            if r0.rank() != x.rank()
                || !agree(r0.last(), w.dim(0))
                || !x.dims[..x.rank() - 1].iter().zip(&r0.dims).all(|(a, b)| agree(*a, *b))
            {
                return fail(format!("result {r0} does not follow from input {x} and weight {w}"));
            }
        }
        "rms_norm" => {
            let (x, w) = (&operands[0], &operands[1]);
            if w.rank() != 1 || !agree(x.last(), w.dim(0)) || !same_shape(x, r0) {
                return fail(format!("input {x}, weight {w}, result {r0} do not fit"));
            }
        }
        "layer_norm" => {
            let (x, w, b) = (&operands[0], &operands[1], &operands[2]);
            if w.rank() != 1 || !agree(x.last(), w.dim(0)) || !same_shape(w, b) || !same_shape(x, r0) {
                return fail(format!("input {x}, weight {w}, bias {b}, result {r0} do not fit"));
            }
        }
        "sparse_index" => {
            // (q [T, H, D], w [T, H], keys [S, D]) or decode's (.., keys [B, S, D], positions [B]).
            let (q, w, keys) = (&operands[0], &operands[1], &operands[2]);
            let top_k = int_attr("top_k").ok_or("missing integer attribute 'top_k'")?;
            let decode = operands.len() == 4;
            let fits = q.rank() == 3
                && w.rank() == 2
                && keys.rank() == if decode { 3 } else { 2 }
                && agree(w.dim(0), q.dim(0))
                && agree(w.dim(1), q.dim(1))
                && keys.last().zip(q.dim(2)).is_none_or(|(c, d)| c >= d)
                && (!decode || (agree(keys.dim(0), q.dim(0)) && agree(operands[3].dim(0), q.dim(0))))
                && r0.rank() == 2
                && agree(r0.dim(0), q.dim(0))
                && r0.dim(1) == Some(top_k as usize)
                && r0.element == "i32";
            if !fits {
                return fail(format!("queries {q}, weights {w}, keys {keys}, result {r0} do not fit (top_k {top_k})"));
            }
        }
        "gather_rows" => {
            // (cache [S, C] or [T, S, C], selected [T, K]) -> (rows [T, K, width], last [T]).
            let (latent, sel) = (&operands[0], &operands[1]);
            let last = results.get(1).ok_or("expected two results (rows, last)")?;
            let width = int_attr("width").ok_or("missing integer attribute 'width'")? as usize;
            let fits = sel.rank() == 2
                && sel.element == "i32"
                && (latent.rank() == 2 || (latent.rank() == 3 && agree(latent.dim(0), sel.dim(0))))
                && r0.rank() == 3
                && agree(r0.dim(0), sel.dim(0))
                && agree(r0.dim(1), sel.dim(1))
                && r0.dim(2) == Some(width)
                && latent.last().is_none_or(|c| c >= width)
                && last.rank() == 1
                && agree(last.dim(0), sel.dim(0))
                && last.element == "i64";
            if !fits {
                return fail(format!("latent {latent}, selected {sel}, results {r0} and {last} do not fit"));
            }
        }
        "rope" => {
            let (x, p) = (&operands[0], &operands[1]);
            let dim = int_attr("dim").ok_or("missing integer attribute 'dim'")?;
            if p.rank() != 1 || !agree(x.dim(0), p.dim(0)) || !agree(x.last(), Some(dim as usize)) || !same_shape(x, r0)
            {
                return fail(format!("input {x}, positions {p}, dim {dim}, result {r0} do not fit"));
            }
        }
        "embed" => {
            let (t, ids) = (&operands[0], &operands[1]);
            if t.rank() != 2
                || ids.rank() != 1
                || r0.rank() != 2
                || !agree(r0.dim(0), ids.dim(0))
                || !agree(r0.dim(1), t.dim(1))
            {
                return fail(format!("table {t}, ids {ids}, result {r0} do not fit"));
            }
        }
        "add" | "silu_mul" | "cache_write" => {
            let (a, b) = (&operands[0], &operands[1]);
            let ok = if kind == "cache_write" {
                a.rank() == 3
                    && b.rank() == 2
                    && agree(a.dim(0), b.dim(0))
                    && agree(a.dim(2), b.dim(1))
                    && same_shape(a, r0)
            } else {
                same_shape(a, b) && same_shape(a, r0)
            };
            if !ok {
                return fail(format!("operands {a} and {b} with result {r0} do not fit"));
            }
        }
        "lm_head" => {
            let (x, w) = (&operands[0], &operands[1]);
            if x.rank() != 2 || w.rank() != 2 || !agree(x.dim(1), w.dim(1)) || !agree(r0.dim(1), w.dim(0)) {
                return fail(format!("input {x} does not fit head {w} (result {r0})"));
            }
        }
        "concat" => {
            let axis = int_attr("axis").ok_or("missing integer attribute 'axis'")? as usize;
            let first = &operands[0];
            for o in &operands[1..] {
                let fits =
                    o.rank() == first.rank() && (0..o.rank()).all(|i| i == axis || agree(o.dim(i), first.dim(i)));
                if !fits {
                    return fail(format!("operands {first} and {o} differ off axis {axis}"));
                }
            }
        }
        "attention" | "attention_decode" => {
            let (qn, qp, lat) = (&operands[0], &operands[1], &operands[2]);
            let kv_b = &operands[if kind == "attention" { 3 } else { 4 }];
            let kv = int_attr("kv_lora_rank").ok_or("missing integer attribute 'kv_lora_rank'")? as usize;
            let ok = qn.rank() == 3
                && qp.rank() == 3
                && agree(qn.dim(1), qp.dim(1))
                && agree(lat.last(), qp.dim(2).map(|d| d + kv))
                && agree(kv_b.dim(1), Some(kv))
                && match (kv_b.dim(0), qn.dim(1), qn.dim(2), r0.dim(2)) {
                    (Some(rows), Some(h), Some(dn), Some(dv)) => rows == h * (dn + dv),
                    _ => true,
                };
            if !ok {
                return fail(format!(
                    "q_nope {qn}, q_pe {qp}, latent {lat}, kv_b {kv_b}, result {r0} do not fit (kv_lora_rank {kv})"
                ));
            }
        }
        "matmul" => {
            let (a, b) = (&operands[0], &operands[1]);
            let flag = |n: &str| op.attribute(n).ok().and_then(crate::mlir::bool_value).unwrap_or(false);
            let (ta, tb) = (usize::from(flag("transpose_a")), usize::from(flag("transpose_b")));
            let ok = a.rank() == 2
                && b.rank() == 2
                && r0.rank() == 2
                && agree(a.dim(1 - ta), b.dim(tb))
                && agree(r0.dim(0), a.dim(ta))
                && agree(r0.dim(1), b.dim(1 - tb));
            if !ok {
                return fail(format!("a {a}, b {b} (transposed: {}, {}), result {r0} do not fit", ta == 1, tb == 1));
            }
        }
        "cross_entropy" | "cross_entropy_grad" => {
            let (logits, targets) = (&operands[0], &operands[1]);
            let result_ok = if kind == "cross_entropy" { r0.dims == [Some(1)] } else { same_shape(logits, r0) };
            if logits.rank() != 2 || targets.rank() != 1 || !agree(logits.dim(0), targets.dim(0)) || !result_ok {
                return fail(format!("logits {logits}, targets {targets}, result {r0} do not fit"));
            }
        }
        "rms_norm_grad" | "silu_mul_grad" => {
            // (x, w, dy) -> (dx, dw) / (gate, up, dy) -> (d gate, d up): each result shaped like
            // its operand; dy like the first.
            let fits = same_shape(&operands[2], &operands[0])
                && results.len() == 2
                && same_shape(&results[0], &operands[0])
                && same_shape(&results[1], &operands[1]);
            if !fits {
                return fail(format!(
                    "operands {}, {}, {} with results do not fit",
                    operands[0], operands[1], operands[2]
                ));
            }
        }
        "embed_grad" => {
            let (ids, dy) = (&operands[0], &operands[1]);
            let vocab = int_attr("vocab").ok_or("missing integer attribute 'vocab'")? as usize;
            if ids.rank() != 1 || dy.rank() != 2 || r0.dims != [Some(vocab), dy.dim(1)] || !agree(ids.dim(0), dy.dim(0))
            {
                return fail(format!("ids {ids}, dy {dy}, result {r0} do not fit (vocab {vocab})"));
            }
        }
        "attention_grad" | "concat_grad" => {
            // Each gradient shaped like the operand it is the gradient of.
            let first = usize::from(kind == "concat_grad");
            for (k, res) in results.iter().enumerate() {
                if !same_shape(res, &operands[k + first]) {
                    return fail(format!(
                        "result {k} {res} is not shaped like operand {} {}",
                        k + first,
                        operands[k + first]
                    ));
                }
            }
        }
        "split_grad" | "rope_grad" if !same_shape(&operands[0], r0) => {
            return fail(format!("result {r0} is not shaped like {}", operands[0]));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_with_dynamic_dims() {
        let s = Shape::parse("tensor<?x64xf8E4M3FN>").unwrap();
        assert_eq!(s.dims, vec![None, Some(64)]);
        assert_eq!(s.to_string(), "[?, 64] f8E4M3FN");
        assert!(Shape::parse("memref<4xf32>").is_none());
    }

    #[test]
    fn shapes_read_through_the_api_are_those_of_the_printed_types() {
        let context = crate::mlir::new_context();
        for text in [
            "tensor<?x64xf8E4M3FN>",
            "tensor<2x?x7168xbf16>",
            "tensor<f32>",
            "tensor<8xi64>",
            "tensor<?x8xi32>",
            "tensor<4xi1>",
            "tensor<2xf16>",
            "tensor<2xf64>",
            "tensor<2xf8E5M2>",
            "tensor<2xui8>",
            "memref<4xf32>",
            "vector<4xf32>",
            "f32",
        ] {
            let t = Type::parse(&context, text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(Shape::of(t), Shape::parse(&t.to_string()), "{text}");
        }
        assert!(Shape::of(Type::parse(&context, "tensor<?x64xf32>").unwrap()).is_some());
    }
}
