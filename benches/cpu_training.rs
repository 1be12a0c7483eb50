//! One training window (forward, loss, backward: every parameter's gradient) of the CPU backend's
//! compiled training graph against the reference interpreter's, on the benchmarks' model (hidden
//! 512, 2 layers of which 1 MoE with 16 experts; `train_step_64_tokens`), in f32 and with the FP8
//! recipe. Compilation happens once, outside the timed loop; the optimizer update is not included.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use v3c_compiler::cpu_backend::CpuTrainStep;
use v3c_models::train::{load_params, Reference, StepBackend, TrainConfig, Trainer};

fn train_step(c: &mut Criterion) {
    for fp8 in [false, true] {
        let config = v3c_benches::bench_config(&[]);
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        v3c_models::init::write_random_checkpoint(&config, &ckpt, 1).unwrap();
        let checkpoint = v3c_models::checkpoint::Checkpoint::open(&ckpt).unwrap();
        let params = load_params(&config, &checkpoint).unwrap();
        let train = TrainConfig { fp8, ..Default::default() };
        let trainer = Trainer::new(&config, params, train).unwrap();
        let n_tokens = 64;
        let window: Vec<i64> = (0..n_tokens as i64 + 1).map(|i| (i * 37) % 2048).collect();
        let inputs = trainer.window_inputs(&window).unwrap();
        let names: Vec<String> = trainer.graph().outputs.iter().map(|(n, _)| n.clone()).collect();
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();

        let mut group = c.benchmark_group(if fp8 { "train_step_64_tokens_fp8" } else { "train_step_64_tokens" });
        group.sample_size(10);
        group.throughput(Throughput::Elements(n_tokens as u64));
        let mut reference = Reference::default();
        reference.load(trainer.graph(), &trainer.params).unwrap();
        group.bench_function("reference", |b| b.iter(|| reference.run(&inputs, &wanted).unwrap()));
        let context = v3c_compiler::mlir::new_context();
        let mut cpu = CpuTrainStep::new(&context, &trainer, None).unwrap();
        cpu.load(trainer.graph(), &trainer.params).unwrap();
        group.bench_function("cpu_backend", |b| b.iter(|| cpu.run(&inputs, &wanted).unwrap()));
        group.finish();
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
