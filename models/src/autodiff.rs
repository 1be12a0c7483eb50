//! Reverse-mode automatic differentiation as a graph-to-graph transform: [`backward`] appends to a
//! forward graph whose output is a scalar loss the ops that compute the gradient of the loss with
//! respect to every parameter, and names them as outputs `grad.<parameter name>`. The reference
//! interpreter runs the result like any graph (the oracle for training).
//!
//! Each op declares its vector-Jacobian product below: embedding, linear layers and the LM head (as
//! matmuls; fp8 linears as the recipe's e4m3 Dgrad and Wgrad), RMSNorm, SwiGLU's `silu(g) * u`
//! (its output recomputed for the weight gradient instead of kept), RoPE, MLA attention, MoE
//! routing (no gradient through the top-k selection) and experts, additions, reshapes,
//! concatenation and splits, and the losses (cross-entropy, the sequence-wise balance loss).
//! [`backward`] names the first op it meets without one.

use std::collections::HashMap;

use crate::graph::{Builder, Graph, GraphError, Op, ValueId};

/// Appends the backward pass of `loss` (a `cross_entropy` output, or a sum of weighted ones such as
/// next-token + lambda x MTP) to `graph`: one output
/// `grad.<name>` per parameter the loss depends on (parameters it does not reach get none).
pub fn backward(graph: Graph, loss: ValueId) -> Result<Graph, GraphError> {
    // The loss: a cross-entropy, or a sum of (weighted) cross-entropies; each gets the seed 1.
    let mut seeded = Vec::new();
    let mut pending = vec![loss];
    while let Some(v) = pending.pop() {
        let node = graph.producer(v);
        match node.op {
            Op::CrossEntropy { .. } | Op::BalanceLoss { .. } => seeded.push(v),
            Op::Add => pending.extend(node.inputs.iter().copied()),
            _ => {
                return Err(GraphError {
                    op: "backward".into(),
                    problem: format!(
                        "the loss must be a cross_entropy or balance_loss output or a sum of them, not {}",
                        node.op.name()
                    ),
                })
            }
        }
    }
    // Values the loss depends on (only those get gradients).
    let mut reaches = vec![false; graph.values.len()];
    reaches[loss.0 as usize] = true;
    for node in graph.nodes.iter().rev() {
        if node.outputs.iter().any(|o| reaches[o.0 as usize]) {
            for i in &node.inputs {
                reaches[i.0 as usize] = true;
            }
        }
    }
    let nodes = graph.nodes.clone();
    // SwiGLU outputs are recomputed where the backward pass needs them (the weight gradient of the
    // projection they feed) rather than kept from the forward pass: the recipe's activation memory
    // saving. Once per value, from the SwiGLU's own inputs (which the backward pass keeps anyway).
    let swiglu_inputs: HashMap<ValueId, (ValueId, ValueId)> = nodes
        .iter()
        .filter(|n| matches!(n.op, Op::SiluMul))
        .map(|n| (n.outputs[0], (n.inputs[0], n.inputs[1])))
        .collect();
    let mut recomputed: HashMap<ValueId, ValueId> = HashMap::new();
    let mut saved = |b: &mut Builder, v: ValueId| -> Result<ValueId, GraphError> {
        let Some(&(gate, up)) = swiglu_inputs.get(&v) else { return Ok(v) };
        if let Some(&r) = recomputed.get(&v) {
            return Ok(r);
        }
        let r = b.silu_mul(gate, up)?;
        recomputed.insert(v, r);
        Ok(r)
    };
    let params: Vec<(String, ValueId)> = graph.params().map(|(n, _, _, v)| (n.to_string(), v)).collect();
    let mut b = Builder::extend(graph);
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    // Gradients of a value used several times are summed; the loss's own gradient is folded into
    // the cross-entropy VJP (its seed is 1).
    fn add_grad(
        grads: &mut HashMap<ValueId, ValueId>,
        b: &mut Builder,
        v: ValueId,
        g: ValueId,
    ) -> Result<(), GraphError> {
        let total = match grads.get(&v) {
            Some(&prev) => b.add(prev, g)?,
            None => g,
        };
        grads.insert(v, total);
        Ok(())
    }
    for node in nodes.iter().rev() {
        if !node.outputs.iter().any(|o| reaches[o.0 as usize]) {
            continue;
        }
        let dy = |k: usize, grads: &HashMap<ValueId, ValueId>| grads.get(&node.outputs[k]).copied();
        let unsupported = || GraphError {
            op: node.op.name().to_string(),
            problem: "its vector-Jacobian product is not implemented yet".into(),
        };
        let inp = |k: usize| node.inputs[k];
        match &node.op {
            Op::Input { .. } | Op::Param { .. } => {}
            Op::CrossEntropy { weight } => {
                if !seeded.contains(&node.outputs[0]) {
                    return Err(unsupported());
                }
                let d = b.cross_entropy_grad(inp(0), inp(1), *weight)?;
                add_grad(&mut grads, &mut b, inp(0), d)?;
            }
            Op::BalanceLoss { alpha, scoring } => {
                if !seeded.contains(&node.outputs[0]) {
                    return Err(unsupported());
                }
                let (dx, dgate) = b.balance_loss_grad(inp(0), inp(1), inp(2), *alpha, *scoring)?;
                add_grad(&mut grads, &mut b, inp(0), dx)?;
                add_grad(&mut grads, &mut b, inp(1), dgate)?;
            }
            Op::Linear if node.inputs.len() == 2 => {
                let Some(g) = dy(0, &grads) else { continue };
                // y = x w^T: dx = dy w, dw = dy^T x (x as matrices [rows, K]).
                let dx = b.matmul(g, inp(1), false, false)?;
                let x = saved(&mut b, inp(0))?;
                let dw = b.matmul(g, x, true, false)?;
                add_grad(&mut grads, &mut b, inp(0), dx)?;
                add_grad(&mut grads, &mut b, inp(1), dw)?;
            }
            Op::Fp8Linear => {
                let Some(g) = dy(0, &grads) else { continue };
                // The recipe's backward GEMMs: Dgrad and Wgrad in e4m3 too.
                let dx = b.fp8_linear_dgrad(g, inp(1), inp(0))?;
                let x = saved(&mut b, inp(0))?;
                let dw = b.fp8_linear_wgrad(g, x, inp(1))?;
                add_grad(&mut grads, &mut b, inp(0), dx)?;
                add_grad(&mut grads, &mut b, inp(1), dw)?;
            }
            Op::LmHead => {
                let Some(g) = dy(0, &grads) else { continue };
                let dx = b.matmul(g, inp(1), false, false)?;
                let dw = b.matmul(g, inp(0), true, false)?;
                add_grad(&mut grads, &mut b, inp(0), dx)?;
                add_grad(&mut grads, &mut b, inp(1), dw)?;
            }
            Op::RmsNorm { eps } => {
                let Some(g) = dy(0, &grads) else { continue };
                let (dx, dw) = b.rms_norm_grad(inp(0), inp(1), g, *eps)?;
                add_grad(&mut grads, &mut b, inp(0), dx)?;
                add_grad(&mut grads, &mut b, inp(1), dw)?;
            }
            Op::SiluMul => {
                let Some(g) = dy(0, &grads) else { continue };
                let (dg, du) = b.silu_mul_grad(inp(0), inp(1), g)?;
                add_grad(&mut grads, &mut b, inp(0), dg)?;
                add_grad(&mut grads, &mut b, inp(1), du)?;
            }
            Op::Add => {
                let Some(g) = dy(0, &grads) else { continue };
                add_grad(&mut grads, &mut b, inp(0), g)?;
                add_grad(&mut grads, &mut b, inp(1), g)?;
            }
            Op::Embed => {
                let Some(g) = dy(0, &grads) else { continue };
                let vocab = b.ty(inp(0)).shape[0].clone().fixed().ok_or_else(unsupported)?;
                let d = b.embed_grad(inp(1), g, vocab)?;
                add_grad(&mut grads, &mut b, inp(0), d)?;
            }
            Op::Reshape => {
                let Some(g) = dy(0, &grads) else { continue };
                let shape = b.ty(inp(0)).shape.clone();
                let d = b.reshape(g, shape)?;
                add_grad(&mut grads, &mut b, inp(0), d)?;
            }
            Op::Concat { axis } => {
                let Some(g) = dy(0, &grads) else { continue };
                let pieces = b.concat_grad(g, &node.inputs, *axis)?;
                for (v, p) in node.inputs.clone().into_iter().zip(pieces) {
                    add_grad(&mut grads, &mut b, v, p)?;
                }
            }
            Op::Split { axis, sizes } => {
                let dys: Vec<Option<ValueId>> = (0..node.outputs.len()).map(|k| dy(k, &grads)).collect();
                if dys.iter().all(Option::is_none) {
                    continue;
                }
                let d = b.split_grad(inp(0), &dys, *axis, sizes)?;
                add_grad(&mut grads, &mut b, inp(0), d)?;
            }
            Op::Rope(attrs) => {
                let Some(g) = dy(0, &grads) else { continue };
                let d = b.rope_grad(g, inp(1), attrs)?;
                add_grad(&mut grads, &mut b, inp(0), d)?;
            }
            Op::MoeExperts { fp8_activations, .. } => {
                let Some(g) = dy(0, &grads) else { continue };
                let experts = node.inputs[3..].to_vec();
                // fp8 activations train on f32 master weights (quantized 128x128 as read); an
                // inference graph's e4m3 weights have no gradient.
                if *fp8_activations && experts.iter().any(|&e| b.ty(e).dtype != crate::dtype::DType::F32) {
                    return Err(unsupported());
                }
                let d = b.moe_experts_grad([inp(0), inp(1), inp(2)], g, &experts, *fp8_activations)?;
                add_grad(&mut grads, &mut b, inp(0), d[0])?;
                add_grad(&mut grads, &mut b, inp(2), d[1])?;
                for (v, dv) in experts.into_iter().zip(d[2..].iter().copied()) {
                    add_grad(&mut grads, &mut b, v, dv)?;
                }
            }
            Op::MoeRoute(routing) => {
                // Only the weights carry a gradient (the indices are a selection).
                let Some(g) = dy(1, &grads) else { continue };
                let (dx, dgate) = b.moe_route_grad([inp(0), inp(1), node.outputs[0]], g, routing)?;
                add_grad(&mut grads, &mut b, inp(0), dx)?;
                add_grad(&mut grads, &mut b, inp(1), dgate)?;
            }
            Op::Attention { form: crate::graph::AttentionForm::Naive, scale, kv_lora_rank } => {
                let Some(g) = dy(0, &grads) else { continue };
                let d = b.attention_grad(inp(0), inp(1), inp(2), inp(3), g, *scale, *kv_lora_rank)?;
                for (k, dk) in d.into_iter().enumerate() {
                    add_grad(&mut grads, &mut b, inp(k), dk)?;
                }
            }
            _ => return Err(unsupported()),
        }
    }
    for (name, v) in params {
        if let Some(&g) = grads.get(&v) {
            b.output(&format!("grad.{name}"), g)?;
        }
    }
    Ok(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::graph::{Dim, WeightFormat};
    use crate::interp::Interpreter;
    use crate::tensor::Tensor;
    use proptest::prelude::*;

    /// A small language model of the differentiable ops: embed -> RMSNorm -> SwiGLU MLP with a
    /// residual -> RMSNorm -> head -> cross-entropy. Returns the training graph and its parameters.
    fn model(d: usize, ff: usize, vocab: usize) -> (Graph, Vec<(String, Vec<usize>)>) {
        let (forward, loss, shapes) = forward_model(d, ff, vocab);
        (backward(forward, loss).unwrap(), shapes)
    }

    /// The forward graph of [`model`], its loss and its parameters.
    fn forward_model(d: usize, ff: usize, vocab: usize) -> (Graph, ValueId, Vec<(String, Vec<usize>)>) {
        let mut b = Builder::new("train_step");
        let dense = WeightFormat::Dense(DType::F32);
        let tokens = b.input("tokens", vec![Dim::dynamic("T")], DType::I64).unwrap();
        let targets = b.input("targets", vec![Dim::dynamic("T")], DType::I64).unwrap();
        let shapes = vec![
            ("embed".to_string(), vec![vocab, d]),
            ("norm1".to_string(), vec![d]),
            ("gate".to_string(), vec![ff, d]),
            ("up".to_string(), vec![ff, d]),
            ("down".to_string(), vec![d, ff]),
            ("norm2".to_string(), vec![d]),
            ("head".to_string(), vec![vocab, d]),
        ];
        let p: Vec<ValueId> = shapes.iter().map(|(n, s)| b.param(n, s, dense).unwrap()).collect();
        let x = b.embed(p[0], tokens).unwrap();
        let h = b.rms_norm(x, p[1], 1e-6).unwrap();
        let g = b.linear(h, p[2]).unwrap();
        let u = b.linear(h, p[3]).unwrap();
        let a = b.silu_mul(g, u).unwrap();
        let m = b.linear(a, p[4]).unwrap();
        let r = b.add(x, m).unwrap();
        let n = b.rms_norm(r, p[5], 1e-6).unwrap();
        let logits = b.lm_head(n, p[6]).unwrap();
        let loss = b.cross_entropy(logits, targets).unwrap();
        b.output("loss", loss).unwrap();
        (b.finish(), loss, shapes)
    }

    /// The backward pass recomputes the SwiGLU output for the down projection's weight gradient:
    /// no backward op reads the forward SwiGLU output, one recomputation does, from the same inputs.
    #[test]
    fn swiglu_is_recomputed_in_backward() {
        let (forward, loss, _) = forward_model(8, 16, 11);
        let n_forward = forward.nodes.len();
        let swiglu = forward.nodes.iter().find(|n| matches!(n.op, Op::SiluMul)).unwrap().clone();
        let graph = backward(forward, loss).unwrap();
        let backward_nodes = &graph.nodes[n_forward..];
        assert!(
            backward_nodes.iter().all(|n| !n.inputs.contains(&swiglu.outputs[0])),
            "a backward op reads the stored SwiGLU output"
        );
        let again: Vec<_> = backward_nodes.iter().filter(|n| matches!(n.op, Op::SiluMul)).collect();
        assert_eq!(again.len(), 1, "one recomputation");
        assert_eq!(again[0].inputs, swiglu.inputs);
    }

    fn rand(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    fn loss_and_grads(
        graph: &Graph,
        params: &HashMap<String, Tensor>,
        inputs: &HashMap<String, Tensor>,
        names: &[&str],
    ) -> HashMap<String, Tensor> {
        let interp = Interpreter::with_params(graph.clone(), params.clone()).unwrap();
        interp.run(inputs, names).unwrap()
    }

    /// Every parameter's gradient against central finite differences of the loss (f32 forward;
    /// a few coordinates per parameter), on random models and token sequences.
    fn check(d: usize, ff: usize, vocab: usize, len: usize, seed: u64) {
        let (graph, shapes) = model(d, ff, vocab);
        let mut s = seed.wrapping_add(1);
        let mut params: HashMap<String, Tensor> = HashMap::new();
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product();
            let scale = if shape.len() == 1 { 0.0 } else { 0.5 };
            let mut v = rand(n, &mut s, scale);
            if shape.len() == 1 {
                v.iter_mut().for_each(|x| *x += 1.0); // norm weights near 1
            }
            params.insert(name.clone(), Tensor::f32(shape.clone(), v));
        }
        let ids = |s: &mut u64| -> Vec<i64> {
            rand(len, s, 1.0).iter().map(|x| ((x.abs() * 997.0) as i64) % vocab as i64).collect()
        };
        let mut inputs = HashMap::new();
        inputs.insert("tokens".to_string(), Tensor::i64(vec![len], ids(&mut s)));
        inputs.insert("targets".to_string(), Tensor::i64(vec![len], ids(&mut s)));
        let grad_names: Vec<String> = shapes.iter().map(|(n, _)| format!("grad.{n}")).collect();
        let mut wanted: Vec<&str> = grad_names.iter().map(String::as_str).collect();
        wanted.push("loss");
        let out = loss_and_grads(&graph, &params, &inputs, &wanted);
        let loss_at = |params: &HashMap<String, Tensor>| -> f64 {
            loss_and_grads(&graph, params, &inputs, &["loss"])["loss"].as_f32().unwrap()[0] as f64
        };
        for (name, shape) in &shapes {
            let grad = out[&format!("grad.{name}")].as_f32().unwrap().to_vec();
            let n: usize = shape.iter().product();
            for probe in 0..3 {
                let i = (probe * 7919 + seed as usize * 31) % n;
                // Small enough for the curvature of a 2-wide RMSNorm (1e-2 was off by 10% there),
                // large enough for the f32 loss's rounding.
                let eps = 3e-3f32;
                let mut plus = params.clone();
                let mut minus = params.clone();
                let bump = |p: &mut HashMap<String, Tensor>, delta: f32| {
                    let t = p.get_mut(name).unwrap();
                    let mut v = t.as_f32().unwrap().to_vec();
                    v[i] += delta;
                    *t = Tensor::f32(shape.clone(), v);
                };
                bump(&mut plus, eps);
                bump(&mut minus, -eps);
                let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps as f64);
                let analytic = grad[i] as f64;
                let tol = 2e-3 + 3e-2 * numeric.abs().max(analytic.abs());
                assert!(
                    (numeric - analytic).abs() <= tol,
                    "d loss / d {name}[{i}]: autodiff {analytic:.6}, finite differences {numeric:.6} (d {d}, ff {ff}, vocab {vocab}, len {len})"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check(8, 16, 11, 5, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
        #[test]
        fn gradients_match_finite_differences_on_random_models(
            d in 2usize..12, ff in 1usize..20, vocab in 2usize..17, len in 1usize..7, seed in 0u64..1000
        ) {
            check(d, ff, vocab, len, seed);
        }
    }

    /// The DeepSeek-V3 graph itself (tiny, all layers dense: MLA with RoPE, SwiGLU MLPs, norms,
    /// head) differentiated end to end: every parameter's gradient against finite differences.
    #[test]
    fn deepseek_v3_dense_layers_differentiate() {
        deepseek_v3_differentiates(true, false);
    }

    /// ... and with each MoE layer's sequence-wise balance loss (alpha 1, next-token prediction
    /// weighted 0.01, so that the balance term dominates).
    #[test]
    fn deepseek_v3_with_the_balance_loss_differentiates() {
        deepseek_v3_differentiates_with(false, false, 1.0);
    }

    /// ... and with its MoE layers (routing with group-limited top-k, routed and shared experts).
    #[test]
    fn deepseek_v3_moe_layers_differentiate() {
        deepseek_v3_differentiates(false, false);
    }

    /// ... and with the MTP module: loss = next-token CE + 0.3 x MTP CE (predicting t + 2).
    #[test]
    fn deepseek_v3_with_the_mtp_loss_differentiates() {
        deepseek_v3_differentiates(false, true);
    }

    fn deepseek_v3_differentiates(dense_only: bool, mtp: bool) {
        deepseek_v3_differentiates_with(dense_only, mtp, 0.0);
    }

    fn deepseek_v3_differentiates_with(dense_only: bool, mtp: bool, balance: f32) {
        use crate::config::ModelConfig;
        use crate::deepseek_v3::{build, BuildOptions, Entry};
        let mut j: serde_json::Value = serde_json::from_str(crate::config::DEEPSEEK_V3_TINY_JSON).unwrap();
        if dense_only {
            j["first_k_dense_replace"] = j["num_hidden_layers"].clone();
        }
        j["num_nextn_predict_layers"] = usize::from(mtp).into();
        let config = ModelConfig::from_json_str(&j.to_string(), "tiny-dense").unwrap();
        let options = BuildOptions { dense_f32_weights: true, skip_mtp: !mtp, ..Default::default() };
        let forward = build(&config, Entry::Prefill, &options).unwrap();
        let logits = forward.output("logits").unwrap();
        let mtp_logits = forward.output("mtp_logits");
        let mut b = Builder::extend(forward);
        let targets = b.input("targets", vec![Dim::dynamic("T")], DType::I64).unwrap();
        // With the balance loss, next-token prediction is weighted down so that the balance term
        // dominates the gradients of everything before the MoE layers (its path through x).
        let ce_weight = if balance > 0.0 { 0.01 } else { 1.0 };
        let mut loss = b.cross_entropy_weighted(logits, targets, ce_weight).unwrap();
        if let Some(ml) = mtp_logits {
            let mtp_targets = b.input("mtp_targets", vec![Dim::dynamic("T")], DType::I64).unwrap();
            let mtp_loss = b.cross_entropy_weighted(ml, mtp_targets, 0.3).unwrap();
            loss = b.add(loss, mtp_loss).unwrap();
        }
        if balance > 0.0 {
            let routes: Vec<(ValueId, ValueId, ValueId)> = b
                .graph()
                .nodes
                .iter()
                .filter(|n| matches!(n.op, Op::MoeRoute(_)))
                .map(|n| (n.inputs[0], n.inputs[1], n.outputs[0]))
                .collect();
            assert!(!routes.is_empty());
            for (x, gate, idx) in routes {
                let bal = b.balance_loss(x, gate, idx, balance, crate::config::Scoring::Sigmoid).unwrap();
                loss = b.add(loss, bal).unwrap();
            }
        }
        b.output("loss", loss).unwrap();
        let graph = backward(b.finish(), loss).unwrap();

        let mut seed = 7u64;
        let mut params: HashMap<String, Tensor> = HashMap::new();
        let shapes: Vec<(String, Vec<usize>)> = graph
            .params()
            .map(|(n, ty, _, _)| (n.to_string(), ty.shape.iter().map(|d| d.clone().fixed().unwrap()).collect()))
            .collect();
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                rand(n, &mut seed, 0.2).iter().map(|x| x + 1.0).collect()
            } else {
                rand(n, &mut seed, 0.3)
            };
            params.insert(name.clone(), Tensor::f32(shape.clone(), v));
        }
        let len = 5;
        let c = config.latent_dim();
        let mut inputs = HashMap::new();
        inputs.insert("tokens".to_string(), Tensor::i64(vec![len], vec![3, 17, 4, 29, 11]));
        inputs.insert("targets".to_string(), Tensor::i64(vec![len], vec![17, 4, 29, 11, 2]));
        inputs.insert("positions".to_string(), Tensor::i64(vec![len], (0..len as i64).collect()));
        for l in 0..config.num_hidden_layers {
            inputs.insert(format!("kv_cache.{l}"), Tensor::f32(vec![0, c], vec![]));
        }
        if mtp {
            inputs.insert("mtp_tokens".to_string(), Tensor::i64(vec![len], vec![17, 4, 29, 11, 2]));
            inputs.insert("mtp_targets".to_string(), Tensor::i64(vec![len], vec![4, 29, 11, 2, 8]));
            inputs.insert("kv_cache.mtp".to_string(), Tensor::f32(vec![0, c], vec![]));
            assert!(shapes.iter().any(|(n, _)| n.starts_with("model.layers.3.")), "the MTP module's parameters");
        }
        // Every parameter gets a gradient but the routing bias (set by the balancing rule).
        let trained: Vec<&(String, Vec<usize>)> =
            shapes.iter().filter(|(n, _)| !n.ends_with("e_score_correction_bias")).collect();
        for (n, _) in &shapes {
            assert_eq!(graph.output(&format!("grad.{n}")).is_some(), trained.iter().any(|(t, _)| t == n), "{n}");
        }
        let grad_names: Vec<String> = trained.iter().map(|(n, _)| format!("grad.{n}")).collect();
        let mut wanted: Vec<&str> = grad_names.iter().map(String::as_str).collect();
        wanted.push("loss");
        let out = loss_and_grads(&graph, &params, &inputs, &wanted);
        let loss_at = |p: &HashMap<String, Tensor>| {
            loss_and_grads(&graph, p, &inputs, &["loss"])["loss"].as_f32().unwrap()[0] as f64
        };
        let mut checked = 0;
        for (name, shape) in trained {
            let grad = out[&format!("grad.{name}")].as_f32().unwrap().to_vec();
            let n: usize = shape.iter().product();
            // The coordinate with the largest gradient and one more: a signal above f32 noise.
            let big = (0..n).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
            for i in [big, (big * 31 + 7) % n] {
                // The MTP layer's routing has near ties on this input that a step of 1e-2 flips.
                let eps = if mtp { 1e-3f32 } else { 1e-2 };
                let bump = |delta: f32| {
                    let mut p = params.clone();
                    let t = p.get_mut(name).unwrap();
                    let mut v = t.as_f32().unwrap().to_vec();
                    v[i] += delta;
                    *t = Tensor::f32(shape.clone(), v);
                    p
                };
                let numeric = (loss_at(&bump(eps)) - loss_at(&bump(-eps))) / (2.0 * eps as f64);
                let analytic = grad[i] as f64;
                let tol = if mtp { 1e-2 } else { 2e-3 } + 5e-2 * numeric.abs().max(analytic.abs());
                assert!(
                    (numeric - analytic).abs() <= tol,
                    "d loss / d {name}[{i}]: autodiff {analytic:.6}, finite differences {numeric:.6}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2 * 20, "{checked} coordinates over {} parameters", shapes.len());
        if !dense_only {
            assert!(shapes.iter().any(|(n, _)| n.contains(".experts.")), "the graph has routed experts");
        }
    }

    /// FP8 training: every projection of the tiny DeepSeek-V3 is an `fp8_linear` whose backward
    /// runs FP8 Dgrad and Wgrad; the loss and every parameter's gradient stay near the f32 graph's.
    /// e4m3 keeps 3 mantissa bits: each GEMM is off by ~5% RMS, compounding over the layers to
    /// 8-24% per gradient here (measured); a wiring error is off by ~100%.
    #[test]
    fn fp8_training_gradients_follow_the_f32_ones() {
        use crate::config::ModelConfig;
        use crate::deepseek_v3::{build, BuildOptions, Entry};
        let mut j: serde_json::Value = serde_json::from_str(crate::config::DEEPSEEK_V3_TINY_JSON).unwrap();
        j["num_nextn_predict_layers"] = 0.into();
        // Dense layers only: an fp8 forward may route a token to another expert, after which no
        // gradient upstream is comparable.
        j["first_k_dense_replace"] = j["num_hidden_layers"].clone();
        let config = ModelConfig::from_json_str(&j.to_string(), "tiny").unwrap();
        let graph_for = |fp8_training: bool| {
            let options = BuildOptions { dense_f32_weights: true, skip_mtp: true, fp8_training, ..Default::default() };
            let forward = build(&config, Entry::Prefill, &options).unwrap();
            let logits = forward.output("logits").unwrap();
            let mut b = Builder::extend(forward);
            let targets = b.input("targets", vec![Dim::dynamic("T")], DType::I64).unwrap();
            let loss = b.cross_entropy(logits, targets).unwrap();
            b.output("loss", loss).unwrap();
            backward(b.finish(), loss).unwrap()
        };
        let (f32_graph, fp8_graph) = (graph_for(false), graph_for(true));
        let count = |g: &Graph, op: &str| g.nodes.iter().filter(|n| n.op.name() == op).count();
        let projections = count(&f32_graph, "linear");
        assert!(projections > 0 && count(&fp8_graph, "fp8_linear") > 0);
        assert_eq!(count(&fp8_graph, "fp8_linear"), count(&fp8_graph, "fp8_linear_dgrad"));
        assert_eq!(count(&fp8_graph, "fp8_linear"), count(&fp8_graph, "fp8_linear_wgrad"));
        let mut seed = 11u64;
        let mut params: HashMap<String, Tensor> = HashMap::new();
        for (name, ty, _, _) in f32_graph.params() {
            let shape: Vec<usize> = ty.shape.iter().map(|d| d.clone().fixed().unwrap()).collect();
            let n: usize = shape.iter().product();
            let v = if name.ends_with("norm.weight") {
                rand(n, &mut seed, 0.2).iter().map(|x| x + 1.0).collect()
            } else {
                rand(n, &mut seed, 0.08)
            };
            params.insert(name.to_string(), Tensor::f32(shape, v));
        }
        let len = 9;
        let c = config.latent_dim();
        let mut inputs = HashMap::new();
        inputs.insert("tokens".to_string(), Tensor::i64(vec![len], vec![3, 17, 4, 29, 11, 5, 8, 40, 2]));
        inputs.insert("targets".to_string(), Tensor::i64(vec![len], vec![17, 4, 29, 11, 5, 8, 40, 2, 9]));
        inputs.insert("positions".to_string(), Tensor::i64(vec![len], (0..len as i64).collect()));
        for l in 0..config.num_hidden_layers {
            inputs.insert(format!("kv_cache.{l}"), Tensor::f32(vec![0, c], vec![]));
        }
        let names: Vec<String> =
            f32_graph.outputs.iter().map(|(n, _)| n.clone()).filter(|n| n.starts_with("grad.")).collect();
        let mut wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        wanted.push("loss");
        let exact = loss_and_grads(&f32_graph, &params, &inputs, &wanted);
        let fp8 = loss_and_grads(&fp8_graph, &params, &inputs, &wanted);
        let (l32, l8) = (exact["loss"].as_f32().unwrap()[0], fp8["loss"].as_f32().unwrap()[0]);
        assert!((l32 - l8).abs() <= 0.01 * l32.abs(), "loss {l32} (f32) vs {l8} (fp8)");
        assert!(l32 != l8, "the fp8 graph quantizes");
        eprintln!("loss {l32} (f32) vs {l8} (fp8)");
        let mut worst = 0.0f32;
        for name in &names {
            let (a, b) = (exact[name].as_f32().unwrap(), fp8[name].as_f32().unwrap());
            let err: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
            let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            worst = worst.max(err / norm);
            assert!(err <= 0.35 * norm, "{name}: fp8 gradient off by {} relative", err / norm);
        }
        eprintln!("worst relative gradient error {worst:.3}");
    }

    /// fp8 routed experts in training: Fprop, Dgrad and Wgrad in e4m3 on f32 master weights
    /// (tokens grouped per expert for Wgrad's 128-token tiles), gradients near the f32 experts'
    /// (within e4m3's ~5% per GEMM); an expert no token reaches gets zero gradients.
    #[test]
    fn fp8_routed_experts_train_near_the_f32_ones() {
        let (t, d, inter, e, k, vocab) = (12, 160, 96, 4, 2, 7);
        let dense = WeightFormat::Dense(DType::F32);
        let graph_for = |fp8: bool| {
            let mut b = Builder::new("train_step");
            let x = b.input("x", vec![Dim::Fixed(t), Dim::Fixed(d)], DType::F32).unwrap();
            let idx = b.input("indices", vec![Dim::Fixed(t), Dim::Fixed(k)], DType::I32).unwrap();
            let w = b.input("weights", vec![Dim::Fixed(t), Dim::Fixed(k)], DType::F32).unwrap();
            let targets = b.input("targets", vec![Dim::Fixed(t)], DType::I64).unwrap();
            let experts: Vec<_> = (0..e)
                .map(|i| {
                    let mut p = |n: &str, s: &[usize]| b.param(&format!("e{i}.{n}"), s, dense).unwrap();
                    (p("gate", &[inter, d]), p("up", &[inter, d]), p("down", &[d, inter]))
                })
                .collect();
            let head = b.param("head", &[vocab, d], dense).unwrap();
            let y = b.moe_experts(x, idx, w, &experts, fp8).unwrap();
            let logits = b.lm_head(y, head).unwrap();
            let loss = b.cross_entropy(logits, targets).unwrap();
            b.output("loss", loss).unwrap();
            backward(b.finish(), loss).unwrap()
        };
        let (f32_graph, fp8_graph) = (graph_for(false), graph_for(true));
        assert!(fp8_graph.nodes.iter().any(|n| matches!(n.op, Op::MoeExpertsGrad { fp8: true, .. })));
        let mut seed = 5u64;
        let mut params = HashMap::new();
        for (name, ty, _, _) in f32_graph.params() {
            let shape: Vec<usize> = ty.shape.iter().map(|d| d.clone().fixed().unwrap()).collect();
            let v = rand(shape.iter().product(), &mut seed, 0.1);
            params.insert(name.to_string(), Tensor::f32(shape, v));
        }
        // Experts 0..3 in turn; expert 3 is never chosen.
        let indices: Vec<i32> = (0..t * k).map(|i| ((i / k + i % k) % 3) as i32).collect();
        let mut inputs = HashMap::new();
        inputs.insert("x".to_string(), Tensor::f32(vec![t, d], rand(t * d, &mut seed, 2.0)));
        inputs
            .insert("indices".to_string(), Tensor { shape: vec![t, k], data: crate::tensor::TensorData::I32(indices) });
        inputs.insert("weights".to_string(), Tensor::f32(vec![t, k], rand(t * k, &mut seed, 1.0)));
        inputs.insert("targets".to_string(), Tensor::i64(vec![t], (0..t as i64).map(|i| i % vocab as i64).collect()));
        let names: Vec<String> =
            f32_graph.outputs.iter().map(|(n, _)| n.clone()).filter(|n| n.starts_with("grad.")).collect();
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut worst = 0.0f32;
        let (exact, fp8) = (
            loss_and_grads(&f32_graph, &params, &inputs, &wanted),
            loss_and_grads(&fp8_graph, &params, &inputs, &wanted),
        );
        for name in &names {
            let (a, b) = (exact[name].as_f32().unwrap(), fp8[name].as_f32().unwrap());
            let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            if name.starts_with("grad.e3.") {
                assert!(norm == 0.0 && b.iter().all(|&v| v == 0.0), "{name}: the unused expert has a gradient");
                continue;
            }
            let err: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
            assert!(norm > 0.0 && err <= 0.2 * norm, "{name}: fp8 gradient off by {} relative", err / norm);
            assert!(a != b, "{name}: the fp8 graph quantizes");
            worst = worst.max(err / norm);
        }
        eprintln!("worst relative gradient error {worst:.3}");
    }

    #[test]
    fn ops_without_a_vjp_are_named() {
        let mut b = Builder::new("train_step");
        let dense = WeightFormat::Dense(DType::F32);
        let tokens = b.input("tokens", vec![Dim::dynamic("T")], DType::I64).unwrap();
        let w = b.param("w", &[4, 4], dense).unwrap();
        let x = b.embed(w, tokens).unwrap();
        let (q, _) = b.quantize_fp8(x, 4).unwrap();
        let _ = q;
        let head = b.param("head", &[4, 4], dense).unwrap();
        let logits = b.lm_head(x, head).unwrap();
        let loss = b.cross_entropy(logits, tokens).unwrap();
        b.output("loss", loss).unwrap();
        let g = backward(b.finish(), loss).unwrap();
        // The quantization does not reach the loss: no error, and both parameters get gradients.
        assert!(g.output("grad.w").is_some() && g.output("grad.head").is_some());
        // An op on the way to the loss without a VJP (an fp8 GEMM, for now) is named.
        let mut b = Builder::new("fp8");
        let tokens = b.input("tokens", vec![Dim::dynamic("T")], DType::I64).unwrap();
        let w = b.param("w", &[4, 128], dense).unwrap();
        let x = b.embed(w, tokens).unwrap();
        let (q, qs) = b.quantize_fp8(x, 128).unwrap();
        let w8 = b.param("w8", &[4, 128], WeightFormat::Fp8Block { block: [128, 128] }).unwrap();
        let y = b.linear_fp8(q, qs, w8).unwrap();
        let loss = b.cross_entropy(y, tokens).unwrap();
        let err = backward(b.finish(), loss).unwrap_err();
        assert_eq!(err.to_string(), "linear: its vector-Jacobian product is not implemented yet");
        let mut b = Builder::new("bad");
        let tokens = b.input("tokens", vec![Dim::dynamic("T")], DType::I64).unwrap();
        let w = b.param("w", &[4, 4], dense).unwrap();
        let x = b.embed(w, tokens).unwrap();
        let logits = b.lm_head(x, w).unwrap();
        let loss = b.linear(logits, w).unwrap();
        let err = backward(b.finish(), loss).unwrap_err();
        assert!(err.problem.contains("must be a cross_entropy or balance_loss output or a sum of them"), "{err}");
    }
}
