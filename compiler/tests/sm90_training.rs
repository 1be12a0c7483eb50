//! The training step's sm_90a lowering, checked without a GPU against the CPU backend's step: each
//! kernel's sm_90a launches run on the host (row kernels through their CPU lowering — the same
//! template as the `gpu.func`; an fp8 GEMM template launch computed from its semantics), operands
//! viewed and temporaries sized as the runtime makes them. What is checked is the lowering —
//! operand order, views, temporaries, copies, RoPE tables, quantizers — not the GPU's arithmetic.

use std::collections::BTreeSet;

use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use v3c_compiler::conversion::sm90::host::HostRows;
use v3c_compiler::cpu_backend::CpuTrainStep;
use v3c_models::checkpoint::Checkpoint;
use v3c_models::tensor::Tensor;
use v3c_models::train::{load_params, StepBackend, TrainConfig, Trainer};
use v3c_models::ModelConfig;
use v3c_runtime::host::{HostBuffer, HostData};

/// The tiny DeepSeek-V3 (3 layers, the last two MoE, with its MTP module), or dense layers only,
/// and its trainer (balance loss 0.3, MTP loss 0.3 when it has the module).
fn trainer(dense: bool, fp8: bool) -> (ModelConfig, Trainer, tempfile::TempDir) {
    trainer_with(dense, fp8, false)
}

/// [`trainer`]; `wide_heads`: attention heads the flash kernels take (64-wide nope, rope and value
/// columns).
fn trainer_with(dense: bool, fp8: bool, wide_heads: bool) -> (ModelConfig, Trainer, tempfile::TempDir) {
    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    if wide_heads {
        for key in ["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"] {
            j[key] = 64.into();
        }
    }
    if dense {
        j["first_k_dense_replace"] = j["num_hidden_layers"].clone();
        j["num_nextn_predict_layers"] = 0.into();
    }
    let config = ModelConfig::from_json_str(&j.to_string(), "tiny-train").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 7).unwrap();
    let checkpoint = Checkpoint::open(&ckpt).unwrap();
    let mtp_weight = if dense { 0.0 } else { 0.3 };
    let train = TrainConfig { balance_alpha: 0.3, mtp_weight, fp8, ..Default::default() };
    let trainer = Trainer::new(&config, load_params(&config, &checkpoint).unwrap(), train).unwrap();
    (config, trainer, dir)
}

/// The fused kernel `name` of `module`.
fn fused<'c, 'a>(module: &'a Module<'c>, name: &str) -> Option<melior::ir::operation::OperationRef<'c, 'a>> {
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute("sym_name").is_ok_and(|a| a.to_string() == format!("\"{name}\"")) {
            return Some(f);
        }
    }
    None
}

/// Largest |a - b| over the largest |b| (integers: 0 or 1).
/// How close the f32 recipe's step comes to the CPU backend's: its f32 matmuls run as two bf16
/// tensor-core GEMMs of split operands (`hi.hi + lo.hi` in one, then `hi.lo`), ~1e-5 of f32
/// (measured: 1.8e-5 at worst, a one-token dense step, with three GEMMs and with two). The FP8 recipe's steps keep 1e-5 (their f32 matmuls stay on CUDA
/// cores in the reference's order).
const F32_TENSOR_CORES: f32 = 3e-5;

/// How close attention on the flash kernels comes to the CPU backend's f32 attention: q, k, v, P
/// and dS are rounded to bf16 (2^-9 relative each) on their way to the tensor cores (measured:
/// 5.9e-3 at worst, the queries' rope gradient over 150 tokens).
const BF16_ATTENTION: f32 = 1e-2;

fn relative_error(a: &HostData, b: &HostData) -> f32 {
    match (a, b) {
        (HostData::F32(a), HostData::F32(b)) => {
            let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
            a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        }
        (a, b) => f32::from(u8::from(a != b)),
    }
}

fn window(config: &ModelConfig, tokens: usize) -> Vec<i64> {
    (0..=tokens).map(|i| ((i * 37 + 5) % config.vocab_size) as i64).collect()
}

/// One window through the CPU backend, then again with every kernel's sm_90a launches standing in
/// (their outputs feeding the next kernels); every output within `tolerance`. Returns the kernels
/// that ran as sm_90a launches, those that did not, and the worst relative error.
fn whole_step(dense: bool, fp8: bool, tokens: usize, tolerance: f32) -> (BTreeSet<String>, BTreeSet<String>, f32) {
    whole_step_with(dense, fp8, tokens, tolerance, false)
}

/// The worst relative error of one output of `want` against `got`.
fn output_error(want: &Tensor, got: &Tensor) -> f32 {
    match (want.as_f32(), got.as_f32()) {
        (Some(w), Some(g)) => relative_error(&HostData::F32(g.to_vec()), &HostData::F32(w.to_vec())),
        _ => f32::from(u8::from(want != got)),
    }
}

/// [`whole_step`], the attention on the flash kernels when `flash`.
fn whole_step_with(
    dense: bool,
    fp8: bool,
    tokens: usize,
    tolerance: f32,
    flash: bool,
) -> (BTreeSet<String>, BTreeSet<String>, f32) {
    let (config, trainer, _dir) = trainer_with(dense, fp8, flash);
    whole_step_of(&config, &trainer, tokens, tolerance, flash)
}

/// [`whole_step_with`] for `trainer` (of `config`).
fn whole_step_of(
    config: &ModelConfig,
    trainer: &Trainer,
    tokens: usize,
    tolerance: f32,
    flash: bool,
) -> (BTreeSet<String>, BTreeSet<String>, f32) {
    let context = v3c_compiler::mlir::new_context();
    let mut cpu = CpuTrainStep::new(&context, trainer, None).unwrap();
    cpu.load(trainer.graph(), &trainer.params).unwrap();
    let names: Vec<String> = trainer.graph().outputs.iter().map(|(n, _)| n.clone()).collect();
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    let inputs = trainer.window_inputs(&window(config, tokens)).unwrap();
    let want = cpu.run(&inputs, &wanted).unwrap();
    let mut rows = HostRows::new(&context);
    rows.flash_attention = flash;
    let (mut lowered, mut kept) = (BTreeSet::new(), BTreeSet::new());
    let got = cpu
        .run_instead(&inputs, &wanted, &mut |module, kernel, ins, outs, _| {
            let f = fused(module, kernel).ok_or_else(|| format!("no kernel {kernel}"))?;
            let ran = rows.run_fused(&f, tokens, ins, outs)?;
            if ran { &mut lowered } else { &mut kept }.insert(kernel.to_string());
            Ok(ran)
        })
        .unwrap();
    let mut worst = 0.0f32;
    for name in &wanted {
        let err = output_error(&want[*name], &got[*name]);
        assert!(err < tolerance, "{tokens} tokens: {name}: relative error {err:e}");
        if flash && err > worst {
            eprintln!("  {name}: {err:e}");
        }
        worst = worst.max(err);
    }
    (lowered, kept, worst)
}

/// Every kernel call of one window run both ways on the same inputs (the CPU backend's outputs go
/// on): the worst relative error over every output of every call, the calls compared, and the
/// kernels without an sm_90a lowering (run on the CPU backend only).
fn per_kernel(dense: bool, fp8: bool, tokens: usize) -> (f32, String, usize, BTreeSet<String>) {
    per_kernel_with(dense, fp8, tokens, false, &|_| true)
}

/// [`per_kernel`], the attention on the flash kernels when `flash`, the worst over the kernels
/// `counted` names (all are compared and run).
fn per_kernel_with(
    dense: bool,
    fp8: bool,
    tokens: usize,
    flash: bool,
    counted: &dyn Fn(&str) -> bool,
) -> (f32, String, usize, BTreeSet<String>) {
    let (config, trainer, _dir) = trainer_with(dense, fp8, flash);
    let context = v3c_compiler::mlir::new_context();
    let mut cpu = CpuTrainStep::new(&context, &trainer, None).unwrap();
    cpu.load(trainer.graph(), &trainer.params).unwrap();
    let inputs = trainer.window_inputs(&window(&config, tokens)).unwrap();
    let mut rows = HostRows::new(&context);
    rows.flash_attention = flash;
    let (mut worst, mut at, mut calls, mut kept) = (0.0f32, String::new(), 0, BTreeSet::new());
    let _: std::collections::HashMap<String, Tensor> = cpu
        .run_instead(&inputs, &["loss"], &mut |module, kernel, ins, outs, launch| {
            let mut theirs: Vec<HostBuffer> = outs.to_vec();
            launch(ins, &mut theirs)?;
            let f = fused(module, kernel).ok_or_else(|| format!("no kernel {kernel}"))?;
            if !rows.run_fused(&f, tokens, ins, outs)? {
                kept.insert(kernel.to_string());
                outs.clone_from_slice(&theirs);
                return Ok(true);
            }
            calls += 1;
            for (i, (ours, cpu_out)) in outs.iter().zip(&theirs).enumerate() {
                let err = relative_error(&ours.data, &cpu_out.data);
                if err > worst && counted(kernel) {
                    (worst, at) = (err, format!("{kernel} result {i}"));
                }
            }
            outs.clone_from_slice(&theirs);
            Ok(true)
        })
        .unwrap();
    (worst, at, calls, kept)
}

/// The f32 step: every kernel lowers (67 of the tiny MoE + MTP model's, 44 of the dense one's) and
/// the whole step through them gives the CPU backend's loss and gradients.
#[test]
fn the_training_step_through_its_sm90a_launches_equals_the_cpu_backend() {
    for (dense, tokens) in [(false, 9), (true, 1), (true, 13), (true, 130)] {
        let (lowered, kept, worst) = whole_step(dense, false, tokens, F32_TENSOR_CORES);
        eprintln!("dense {dense}, {tokens} tokens: {} kernels as sm_90a launches; worst {worst:e}", lowered.len());
        assert!(kept.is_empty(), "kernels without an sm_90a lowering: {kept:?}");
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
            assert_eq!(lowered.len(), 67);
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

/// DeepSeek-V2's training step (the tiny model's shape routed by a softmax, `group_limited_greedy`,
/// no bias, no MTP; balance loss 0.3 over the softmax affinities): through its sm_90a launches —
/// the routing, the router's gradient and the balance loss's rows with `_sm` — as the CPU backend.
#[test]
fn the_v2_training_step_through_its_sm90a_launches_equals_the_cpu_backend() {
    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    for (k, v) in [
        ("model_type", serde_json::Value::from("deepseek_v2")),
        ("scoring_func", "softmax".into()),
        ("topk_method", "group_limited_greedy".into()),
        ("num_nextn_predict_layers", 0.into()),
        ("norm_topk_prob", false.into()),
    ] {
        j[k] = v;
    }
    let config = ModelConfig::from_json_str(&j.to_string(), "tiny-v2-train").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 7).unwrap();
    let checkpoint = Checkpoint::open(&ckpt).unwrap();
    let train = TrainConfig { balance_alpha: 0.3, mtp_weight: 0.0, ..Default::default() };
    let trainer = Trainer::new(&config, load_params(&config, &checkpoint).unwrap(), train).unwrap();
    let (lowered, kept, worst) = whole_step_of(&config, &trainer, 9, F32_TENSOR_CORES, false);
    eprintln!("DeepSeek-V2, 9 tokens: {} kernels as sm_90a launches; worst {worst:e}", lowered.len());
    assert!(kept.is_empty(), "kernels without an sm_90a lowering: {kept:?}");
    for kernel in ["moe_route_0", "balance_loss_0", "balance_loss_grad_0", "route_logits_grad_0"] {
        assert!(lowered.contains(kernel), "{kernel}: {lowered:?}");
    }
}

/// DeepSeek-V3's FP8 recipe: Fprop and Dgrad through the fp8 GEMM template's launches, the
/// quantizers and Wgrad through their row kernels; the routed experts' forward through the grouped
/// fp8 GEMM template (gate/up over the pairs' token rows copied into expert order, down over the
/// sorted pairs) and its pair rows.
/// A short window's whole step gives the CPU backend's; with more tokens than one 128-token group
/// kernel by kernel on the same inputs (whole, e4m3 rounding turns last-bit differences upstream —
/// the norms' tree sums — into 1e-2 ones downstream, as between the CPU backend and the reference).
#[test]
fn the_fp8_training_step_through_its_sm90a_launches_equals_the_cpu_backend() {
    let (lowered, kept, worst) = whole_step(true, true, 5, 1e-5);
    eprintln!("fp8, 5 tokens: {} kernels as sm_90a launches; worst {worst:e}", lowered.len());
    assert!(kept.is_empty(), "kernels without an sm_90a lowering: {kept:?}");
    for kind in ["fp8_linear_", "fp8_linear_dgrad_", "fp8_linear_wgrad_"] {
        assert!(lowered.iter().any(|k| k.starts_with(kind)), "no {kind}* kernel lowered: {lowered:?}");
    }
    let (worst, at, calls, kept) = per_kernel(true, true, 130);
    eprintln!("fp8, 130 tokens, kernel by kernel: {calls} calls; worst {worst:e} ({at})");
    assert!(worst < 1e-5 && kept.is_empty(), "{at}: relative error {worst:e}; not lowered: {kept:?}");
    // MoE layers whole: the experts' grouped GEMMs feed the rest of the step.
    let (lowered, kept, worst) = whole_step(false, true, 9, 1e-5);
    eprintln!("fp8 MoE + MTP, 9 tokens: {} kernels as sm_90a launches; worst {worst:e}", lowered.len());
    assert!(kept.is_empty() && lowered.contains("moe_experts_0"), "not lowered: {kept:?}");
    // Kernel by kernel: the fp8 experts (per-expert blocks; their gradient's 128-pair tiles, with
    // more pairs per expert than one tile, and more than one 128-row GEMM tile per expert).
    let (worst, at, calls, kept) = per_kernel(false, true, 400);
    eprintln!("fp8 MoE + MTP, 400 tokens (1200 pairs over 8 experts), kernel by kernel: {calls} calls; worst {worst:e} ({at})");
    assert!(worst < 1e-5 && kept.is_empty(), "{at}: relative error {worst:e}; not lowered: {kept:?}");
}

/// Kernel by kernel, the MoE + MTP model's f32 step at a window longer than the attention blocks'
/// threads and than one token group.
#[test]
fn every_sm90a_training_kernel_equals_the_cpu_kernel_on_its_inputs() {
    let (worst, at, calls, kept) = per_kernel(false, false, 150);
    eprintln!("f32 MoE + MTP, 150 tokens, kernel by kernel: {calls} calls; worst {worst:e} ({at})");
    assert!(worst < F32_TENSOR_CORES && kept.is_empty(), "{at}: relative error {worst:e}; not lowered: {kept:?}");
}

/// Training attention on the tensor cores (what `--prefill-attention tensor-cores` compiles: the
/// flash kernels' launches computed from their semantics — q, k, v, P and dS in bf16 — with the
/// layout rows through their CPU lowering): kernel by kernel, the attention kernels' outputs and
/// gradients within bf16's rounding of the CPU backend's f32 attention, every other kernel as
/// before; whole steps (f32 and the FP8 recipe) within the same.
#[test]
fn the_training_step_with_flash_attention_follows_the_cpu_backend() {
    let attention = |k: &str| k.starts_with("attention_");
    for (fp8, tokens) in [(false, 150), (true, 150)] {
        let (worst, at, calls, kept) = per_kernel_with(false, fp8, tokens, true, &attention);
        eprintln!(
            "flash, fp8 {fp8}, {tokens} tokens, kernel by kernel: {calls} calls; attention's worst {worst:e} ({at})"
        );
        assert!(kept.is_empty(), "not lowered: {kept:?}");
        assert!(worst < BF16_ATTENTION, "{at}: relative error {worst:e}");
        // The rest as before — but the FP8 recipe's f32 matmuls on the tensor cores too (its attention
        // in bf16 has given up the reference's bits): ~1e-5 of f32, as the f32 recipe's.
        let (worst, at, ..) = per_kernel_with(false, fp8, tokens, true, &|k| !attention(k));
        eprintln!("  the other kernels' worst {worst:e} ({at})");
        assert!(worst < F32_TENSOR_CORES, "{at}: relative error {worst:e}");
    }
    // Whole steps: the f32 one within bf16's rounding (measured 4.7e-3: a norm weight's gradient; one
    // token, where a query's gradient is exactly zero and dP - D must cancel: 2.8e-3);
    // the FP8 recipe's e4m3 quantizations downstream turn those differences into whole e4m3 steps
    // here and there (measured 7.2e-2, a norm weight's gradient summed over 5 tokens) — as far as
    // two e4m3 neighbours, not a wrong attention (~1).
    for (fp8, tokens, tolerance) in [(false, 1, BF16_ATTENTION), (false, 70, BF16_ATTENTION), (true, 5, 0.2)] {
        let (lowered, kept, worst) = whole_step_with(true, fp8, tokens, tolerance, true);
        eprintln!("flash, dense, fp8 {fp8}, {tokens} tokens, whole: {} kernels; worst {worst:e}", lowered.len());
        assert!(kept.is_empty() && lowered.contains("attention_grad_0"), "not lowered: {kept:?}");
    }
}

/// The artifact `v3c compile --target sm_90a --train` writes, run by the runtime's own launch
/// expansion over host memory (`v3c_compiler::emulate`: row kernels through their CPU lowering,
/// GEMM template launches emulated from their parameters): the first step's loss and gradients
/// are the CPU backend's. This covers what the runtime adds — plan, arena, weight bindings
/// (stacked experts), temporaries and their row views, grids, parameters — for f32 (MoE + MTP)
/// and the FP8 recipe (dense, and MoE + MTP).
#[test]
fn the_sm90a_training_artifact_emulated_equals_the_cpu_backend() {
    for (dense, fp8, tokens) in [(false, false, 11), (true, true, 6), (false, true, 9)] {
        let tolerance = if fp8 { 1e-5 } else { F32_TENSOR_CORES };
        artifact_step(dense, fp8, false, &[], tokens, tolerance, false, &|artifact| {
            if fp8 && !dense {
                // The routed experts on the tensor cores: grouped over the blocks each step quantizes.
                let signatures: Vec<&str> =
                    artifact.manifest.tuning.choices.iter().map(|c| c.signature.as_str()).collect();
                for want in [
                    "grouped contig fp8->f32 n48 k96 e8+0 top3 +b1x128",
                    "grouped contig fp8->f32 n96 k48 e8+0 top3 +rowscale +b1x128",
                ] {
                    assert!(signatures.contains(&want), "{want}: {signatures:?}");
                }
            }
        });
    }
}

/// The artifact of a model whose heads the flash kernels take: its attention and gradient on the
/// flash kernels (the default, `--prefill-attention tensor-cores`), the launches' parameters
/// (four tensor maps, the statistics' memrefs, dK's and dV's grids over the keys) emulated: the
/// step within bf16's rounding of the CPU backend's (f32, dense: measured 4.9e-3; 4.7e-3 from the
/// launches' semantics alone, [`the_training_step_with_flash_attention_follows_the_cpu_backend`]);
/// with `--prefill-attention rows`, the CUDA-core rows and f32 (2.1e-5: the f32 recipe's matmuls).
#[test]
fn the_sm90a_training_artifact_with_flash_attention_emulated_follows_the_cpu_backend() {
    let kernels = |artifact: &v3c_runtime::artifact::Artifact| -> Vec<String> {
        artifact.manifest.kernels.iter().map(|k| k.name.clone()).collect()
    };
    artifact_step(true, false, true, &[], 20, BF16_ATTENTION, false, &|artifact| {
        let kernels = kernels(artifact);
        for want in ["mla_prefill_qk128_v64_s4_lse", "mla_gradq_", "mla_gradk_", "mla_gradv_", "rows_flashdkv_"] {
            assert!(kernels.iter().any(|k| k.contains(want)), "{want}: {kernels:?}");
        }
    });
    // `--prefill-attention rows`: the same model's step on the CUDA-core rows, f32 as before.
    artifact_step(true, false, true, &["--prefill-attention", "rows"], 20, F32_TENSOR_CORES, false, &|artifact| {
        let kernels = kernels(artifact);
        assert!(kernels.iter().all(|k| !k.starts_with("mla_")), "{kernels:?}");
        assert!(kernels.iter().any(|k| k.starts_with("rows_mlagradkv_")), "{kernels:?}");
    });
}

/// The training step's PTX simulated instruction by instruction (`v3c_ptxsim`), every launch:
/// the flash attention forward and its dQ, dK and dV kernels (wgmma on transposed operands, four
/// tensor maps), the GEMMs' dgrad and wgrad forms, the rows — the loss and every gradient within
/// the bounds their semantics meet: the f32 graph on the flash kernels (measured 5.0e-3), the FP8
/// recipe's MoE + MTP step (1.1e-6).
#[test]
fn the_sm90a_training_steps_simulated_ptx_follows_the_cpu_backend() {
    artifact_step(true, false, true, &[], 20, BF16_ATTENTION, true, &|_| {});
    artifact_step(false, true, false, &[], 9, 1e-5, true, &|_| {});
}

/// `v3c compile --target sm_90a --train` (and `extra` arguments) of the [`trainer_with`] model
/// (`wide_heads`) into an artifact (`check` looks at it), run by the runtime's launch expansion over
/// host memory (`ptx`: every launch's PTX simulated): every output of one `tokens`-token window
/// within `tolerance` of the CPU backend's.
#[allow(clippy::too_many_arguments)]
fn artifact_step(
    dense: bool,
    fp8: bool,
    wide_heads: bool,
    extra: &[&str],
    tokens: usize,
    tolerance: f32,
    ptx: bool,
    check: &dyn Fn(&v3c_runtime::artifact::Artifact),
) {
    let (config, trainer, dir) = trainer_with(dense, fp8, wide_heads);
    // The model directory: its config beside the checkpoint.
    let model = dir.path().join("ckpt");
    let art = dir.path().join("art");
    let mut args = vec!["compile", "--model", model.to_str().unwrap(), "--target", "sm_90a", "--train"];
    args.extend(["--max-rows", "32", "--mtp-weight", if dense { "0" } else { "0.3" }, "--balance-alpha", "0.3"]);
    if fp8 {
        args.extend(["--precision", "fp8"]);
    }
    args.extend(extra);
    args.extend(["--out", art.to_str().unwrap()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_v3c")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let artifact = v3c_runtime::artifact::Artifact::open(&art).unwrap();
    check(&artifact);
    let checkpoint = Checkpoint::open(&model).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let weights = v3c_runtime::gpu::Weights::Checkpoint(&checkpoint);
    let mut emulator = v3c_compiler::emulate::Emulator::new(&context, &artifact, &weights).unwrap();
    if ptx {
        emulator.simulate_ptx(v3c_compiler::emulate::Checks { reversed: false, races: true });
    }
    let names: Vec<String> = trainer.graph().outputs.iter().map(|(n, _)| n.clone()).collect();
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    let inputs = trainer.window_inputs(&window(&config, tokens)).unwrap();
    let host = v3c_runtime::training::host_inputs(&inputs).unwrap();
    let got = emulator.run(v3c_runtime::training::TRAIN_ENTRY, &host, &wanted, None).unwrap();
    let mut cpu = CpuTrainStep::new(&context, &trainer, None).unwrap();
    cpu.load(trainer.graph(), &trainer.params).unwrap();
    let want = cpu.run(&inputs, &wanted).unwrap();
    let mut worst = 0.0f32;
    for name in &wanted {
        let g = &got[*name];
        let err = match want[*name].as_f32() {
            Some(w) => relative_error(&g.data, &HostData::F32(w.to_vec())),
            None => f32::from(u8::from(
                v3c_runtime::training::output_tensors([(name.to_string(), g.clone())].into()).unwrap()[*name]
                    != want[*name],
            )),
        };
        assert!(err < tolerance, "dense {dense}, fp8 {fp8}: {name}: relative error {err:e}");
        worst = worst.max(err);
    }
    eprintln!(
        "dense {dense}, fp8 {fp8}, ptx {ptx}, {tokens} tokens: {} outputs, worst relative error {worst:e}",
        wanted.len()
    );
}

/// `v3r train`'s GPU path with the device swapped for its host emulation: the sm_90a artifact as
/// the trainer's step backend (parameters rebound into its weights at every optimizer step,
/// gradients read back) follows the CPU backend's training for three AdamW steps (the losses to
/// 1e-5; the f32 recipe's tensor-core matmuls differ from f32 by ~1e-5, see [`F32_TENSOR_CORES`]).
#[test]
fn training_through_the_emulated_sm90a_artifact_follows_the_cpu_backend() {
    let (loss, params) = emulated_training(false);
    // AdamW's first steps move a weight by about lr * sign(g): a gradient near zero whose
    // tensor-core value has the other sign moves it by up to 2 lr (measured: 5.0e-4 at worst).
    assert!(loss <= 1e-5 && params < 1e-3, "losses {loss:e}, parameters {params:e}");
    // Attention in bf16 on the flash kernels (64-wide heads): the losses within its rounding
    // (measured 9.1e-6), the parameters as AdamW's sign-like first steps carry it (4.8e-3).
    let (loss, params) = emulated_training(true);
    eprintln!("flash attention, 3 AdamW steps: losses within {loss:e}, parameters {params:e}");
    assert!(loss <= 1e-4 && params < 1e-2, "losses {loss:e}, parameters {params:e}");
}

/// Three AdamW steps of two 12-token windows of the dense model (`wide_heads`: [`trainer_with`]) through
/// its emulated sm_90a artifact and through the CPU backend: the worst relative difference of the
/// losses and of the parameters after them.
fn emulated_training(wide_heads: bool) -> (f32, f32) {
    let (config, trainer, dir) = trainer_with(true, false, wide_heads);
    let model = dir.path().join("ckpt");
    let art = dir.path().join("art");
    let args = ["compile", "--model", model.to_str().unwrap(), "--target", "sm_90a", "--train", "--max-rows", "12"];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_v3c"))
        .args(args)
        .args(["--mtp-weight", "0", "--balance-alpha", "0.3", "--out", art.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let artifact = v3c_runtime::artifact::Artifact::open(&art).unwrap();
    let checkpoint = Checkpoint::open(&model).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let emulator =
        v3c_compiler::emulate::Emulator::new(&context, &artifact, &v3c_runtime::gpu::Weights::Checkpoint(&checkpoint))
            .unwrap();
    let mut on_gpu = trainer;
    let (_, mut on_cpu, _dir2) = trainer_with(true, false, wide_heads);
    let mut step = v3c_runtime::training::ArtifactStep::new(emulator, &on_gpu, 12).unwrap();
    let mut cpu = CpuTrainStep::new(&context, &on_cpu, None).unwrap();
    let mut worst_loss = 0.0f32;
    for s in 0..3 {
        let batch: Vec<Vec<i64>> = (0..2)
            .map(|b| (0..=12).map(|i| ((i * 29 + s * 7 + b * 13) % config.vocab_size) as i64).collect())
            .collect();
        let g = on_gpu.step_on(&mut step, &batch).unwrap();
        let c = on_cpu.step_on(&mut cpu, &batch).unwrap();
        worst_loss = worst_loss.max((g.loss - c.loss).abs() / c.loss.abs());
    }
    let mut worst_param = 0.0f32;
    for (name, p) in &on_cpu.params {
        let err = relative_error(
            &HostData::F32(on_gpu.params[name].as_f32().unwrap().to_vec()),
            &HostData::F32(p.as_f32().unwrap().to_vec()),
        );
        worst_param = worst_param.max(err);
    }
    (worst_loss, worst_param)
}

/// `v3r train`'s default on a GPU, AdamW on the device (parameters and moments kept there, the
/// windows' gradients summed there), with the device swapped for its host emulation: the tiny MoE
/// model with its MTP module, on the FP8 recipe (experts' masters inside their stacks, routing biases moved every
/// step) follows the same artifact with AdamW on the host for three steps of two windows and one
/// of one (AdamW then reads the run's gradients in place). Each step starts both from the device's
/// state (read back): its loss is the same bits, and the device's f32 sums (the host sums in f64)
/// part the two steps' results by rounding only — over several steps such a last-bit difference can
/// send a token at a near tie to another expert and the two runs apart for good (seen once the
/// router's logits changed their order of sums). A held-out loss evaluated before the first step
/// and between steps agrees and changes nothing.
#[test]
fn adamw_on_the_emulated_device_follows_adamw_on_the_host() {
    let (config, mut on_device, dir) = trainer(false, true);
    let (_, mut on_host, _dir2) = trainer(false, true);
    let model = dir.path().join("ckpt");
    let art = dir.path().join("art");
    let mut args = vec!["compile", "--model", model.to_str().unwrap(), "--target", "sm_90a", "--train"];
    args.extend(["--max-rows", "12", "--mtp-weight", "0.3", "--balance-alpha", "0.3", "--precision", "fp8"]);
    args.extend(["--out", art.to_str().unwrap()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_v3c")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let artifact = v3c_runtime::artifact::Artifact::open(&art).unwrap();
    assert!(artifact.lowering.as_ref().is_some_and(|l| l.optimizer.is_some()), "the optimizer's kernels");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let weights = v3c_runtime::gpu::Weights::Checkpoint(&checkpoint);
    let emulator = || v3c_compiler::emulate::Emulator::new(&context, &artifact, &weights).unwrap();
    let mut device = v3c_runtime::training::ArtifactStep::new(emulator(), &on_device, 12).unwrap().on_device().unwrap();
    let mut host = v3c_runtime::training::ArtifactStep::new(emulator(), &on_host, 12).unwrap();
    let start = on_host.params.clone();
    let bias = |n: &String| n.contains("e_score_correction_bias");
    let (mut worst, mut worst_moment) = (0.0f32, 0.0f32);
    // Held-out windows, evaluated before the first step (on the device: its first upload) and
    // between steps — which the steps after must not notice.
    let held_out: Vec<Vec<i64>> =
        (0..2).map(|b| (0..=13).map(|i| ((i * 17 + b * 3 + 1) % config.vocab_size) as i64).collect()).collect();
    let (d, h) = (on_device.evaluate(&mut device, &held_out).unwrap(), on_host.evaluate(&mut host, &held_out).unwrap());
    assert_eq!(d, h, "held-out loss before the first step");
    for s in 0..4 {
        if s == 2 {
            let d = on_device.evaluate(&mut device, &held_out).unwrap();
            let h = on_host.evaluate(&mut host, &held_out).unwrap();
            assert!((d - h).abs() <= 1e-4 * h.abs(), "held-out loss after two steps: {d} vs {h}");
        }
        let windows = if s < 3 { 2 } else { 1 };
        let batch: Vec<Vec<i64>> = (0..windows)
            .map(|b| (0..=13).map(|i| ((i * 31 + s * 5 + b * 11) % config.vocab_size) as i64).collect())
            .collect();
        let d = on_device.step_on(&mut device, &batch).unwrap();
        let h = on_host.step_on(&mut host, &batch).unwrap();
        eprintln!("step {s}: loss {} vs {}, gradient norm {} vs {}", d.loss, h.loss, d.grad_norm, h.grad_norm);
        // From the same state, the same launches: the same loss and experts; the norms part by
        // their sums' rounding.
        assert_eq!(d.loss, h.loss, "step {s}: loss");
        assert_eq!(d.expert_load, h.expert_load, "step {s}: experts' loads");
        assert!((d.grad_norm - h.grad_norm).abs() <= 1e-4 * h.grad_norm, "step {s}: norm");
        if s == 0 {
            // The device holds the trained state: the trainer's copy is the one it uploaded until
            // fetched (the routing biases, which no gradient trains, it moves itself).
            assert!(
                start.iter().all(|(n, p)| bias(n) || on_device.params[n] == *p),
                "parameters on the device, not yet read back"
            );
        }
        on_device.fetch(&mut device).unwrap();
        assert!(start.iter().all(|(n, p)| bias(n) || on_device.params[n] != *p), "the device's parameters came back");
        let (params, moments) = compare_state(&on_device, &on_host, s);
        (worst, worst_moment) = (worst.max(params), worst_moment.max(moments));
        // The next step from the device's state on both.
        on_host.params.clone_from(&on_device.params);
        on_host.m.clone_from(&on_device.m);
        on_host.v.clone_from(&on_device.v);
    }
    eprintln!(
        "over 4 steps: parameters within {worst:e}, moments within {worst_moment:e} of the host's step (relative \
         to each's largest)"
    );
}

/// The worst relative errors of `device`'s parameters and moments (read back) after step `s` from
/// `host`'s (each relative to its largest); the routing biases the same bits (the same loads).
fn compare_state(device: &Trainer, host: &Trainer, s: usize) -> (f32, f32) {
    let (mut worst, mut worst_moment) = (0.0f32, 0.0f32);
    for (name, p) in &host.params {
        let got = &device.params[name];
        let err = relative_error(
            &HostData::F32(got.as_f32().unwrap().to_vec()),
            &HostData::F32(p.as_f32().unwrap().to_vec()),
        );
        assert!(err < 1e-3, "{name} after step {s}: relative error {err:e}");
        worst = worst.max(err);
        if name.contains("e_score_correction_bias") {
            assert_eq!(got, p, "{name}: the same loads move it the same");
        }
    }
    for (name, m) in &host.m {
        for (got, want) in [(&device.m[name], m), (&device.v[name], &host.v[name])] {
            let err = relative_error(&HostData::F32(got.clone()), &HostData::F32(want.clone()));
            assert!(err < 1e-2, "{name}'s moments after step {s}: relative error {err:e}");
            worst_moment = worst_moment.max(err);
        }
    }
    (worst, worst_moment)
}
