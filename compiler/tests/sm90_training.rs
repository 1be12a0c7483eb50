//! The training step's sm_90a lowering, checked whole without a GPU: the CPU backend's training
//! step with every kernel that lowers onto sm_90a row kernels run through those launches instead
//! (each row kernel through its CPU lowering: the same template as the `gpu.func`) gives the CPU
//! backend's loss and gradients. What is checked is the mapping — operand order, views of the
//! buffers, temporaries, column copies, RoPE tables — not the GPU's arithmetic.

use std::collections::BTreeSet;

use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use v3c_compiler::conversion::sm90::host::HostRows;
use v3c_compiler::cpu_backend::CpuTrainStep;
use v3c_models::checkpoint::Checkpoint;
use v3c_models::train::{load_params, StepBackend, TrainConfig, Trainer};
use v3c_models::ModelConfig;

/// The tiny DeepSeek-V3 (3 layers, the last two MoE, with its MTP module), or dense layers only.
fn tiny(seed: u64, dense: bool) -> (ModelConfig, Checkpoint, tempfile::TempDir) {
    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    if dense {
        j["first_k_dense_replace"] = j["num_hidden_layers"].clone();
        j["num_nextn_predict_layers"] = 0.into();
    }
    let config = ModelConfig::from_json_str(&j.to_string(), "tiny-train").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    v3c_models::init::write_random_checkpoint(&config, &ckpt, seed).unwrap();
    let checkpoint = Checkpoint::open(&ckpt).unwrap();
    (config, checkpoint, dir)
}

/// Runs one window through the CPU backend, then again with the sm_90a launches standing in;
/// returns the kernels that ran as sm_90a launches and the worst relative error of any output.
fn compare(dense: bool, tokens: usize) -> (BTreeSet<String>, BTreeSet<String>, f32) {
    let (config, checkpoint, _dir) = tiny(7, dense);
    let train = TrainConfig { balance_alpha: 0.3, mtp_weight: if dense { 0.0 } else { 0.3 }, ..Default::default() };
    let trainer = Trainer::new(&config, load_params(&config, &checkpoint).unwrap(), train).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let mut cpu = CpuTrainStep::new(&context, &trainer, None).unwrap();
    cpu.load(trainer.graph(), &trainer.params).unwrap();
    let names: Vec<String> = trainer.graph().outputs.iter().map(|(n, _)| n.clone()).collect();
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids: Vec<i64> = (0..=tokens).map(|i| ((i * 37 + 5) % config.vocab_size) as i64).collect();
    let inputs = trainer.window_inputs(&ids).unwrap();
    let want = cpu.run(&inputs, &wanted).unwrap();
    let mut rows = HostRows::new(&context);
    let (mut lowered, mut kept) = (BTreeSet::new(), BTreeSet::new());
    let got = cpu
        .run_instead(&inputs, &wanted, &mut |module, kernel, ins, outs| {
            let mut op = module.body().first_operation();
            while let Some(f) = op {
                op = f.next_in_block();
                if f.attribute("sym_name").is_ok_and(|a| a.to_string() == format!("\"{kernel}\"")) {
                    let ran = rows.run_fused(&f, tokens, ins, outs)?;
                    if ran { &mut lowered } else { &mut kept }.insert(kernel.to_string());
                    return Ok(ran);
                }
            }
            Err(format!("no kernel {kernel}"))
        })
        .unwrap();
    let mut worst = 0.0f32;
    for name in &wanted {
        let (Some(w), Some(g)) = (want[*name].as_f32(), got[*name].as_f32()) else {
            // Integer outputs (the experts' loads): exactly equal.
            assert_eq!(want[*name], got[*name], "{tokens} tokens: {name}");
            continue;
        };
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
        let err = w.iter().zip(g).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err < 1e-5, "{tokens} tokens: {name}: relative error {err:e}");
        worst = worst.max(err);
    }
    (lowered, kept, worst)
}

#[test]
fn the_training_step_through_its_sm90a_row_kernels_equals_the_cpu_backend() {
    for (dense, tokens) in [(false, 9), (true, 1), (true, 13)] {
        let (lowered, kept, worst) = compare(dense, tokens);
        eprintln!(
            "dense {dense}, {tokens} tokens: {} kernels as sm_90a launches, {} kept on the CPU backend ({}); worst \
             relative error {worst:e}",
            lowered.len(),
            kept.len(),
            kept.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        assert!(kept.is_empty(), "kernels without an sm_90a lowering: {kept:?}");
        // Every kind the lowering maps took part.
        for kind in [
            "matmul_",
            "linear_",
            "rms_norm_grad_",
            "silu_mul_grad_",
            "rope_grad_",
            "embed_grad_",
            "concat_",
            "concat_grad_",
            "split_grad_",
            "cross_entropy_",
            "cross_entropy_grad_",
            "attention_",
            "attention_grad_",
        ] {
            assert!(lowered.iter().any(|k| k.starts_with(kind)), "no {kind}* kernel lowered: {lowered:?}");
        }
        if !dense {
            for kernel in [
                "moe_route_0",
                "balance_loss_0",
                "balance_loss_grad_0",
                "route_logits_grad_0",
                "moe_experts_0",
                "moe_experts_grad_0",
            ] {
                assert!(lowered.contains(kernel), "{kernel}: {lowered:?}");
            }
        }
    }
}
