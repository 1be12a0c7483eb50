//! Prefill throughput of the CPU backend (kernels JIT-compiled from MLIR) against the reference
//! interpreter, on two configs: `prefill_64_tokens` (hidden 512, 2 layers of which 1 MoE with 16
//! experts, 64 tokens) and `prefill_256_tokens_h1024` (hidden 1024, 4 layers of which 3 MoE with 32
//! experts, 256 tokens). Compilation and weight loading happen once, outside the timed loop.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use v3c_compiler::conversion::v3_to_cpu::{HostBuffer, HostData};
use v3c_compiler::cpu_backend::CpuProgram;
use v3c_models::interp::Interpreter;
use v3c_models::reference::Model;
use v3c_models::tensor::Tensor;
use v3c_models::{build, BuildOptions, Entry, Precision};

fn prefill(c: &mut Criterion) {
    prefill_group(c, "prefill_64_tokens", 64, &[]);
    let large = [
        ("hidden_size", 1024),
        ("intermediate_size", 2048),
        ("moe_intermediate_size", 512),
        ("num_hidden_layers", 4),
        ("n_routed_experts", 32),
        ("num_experts_per_tok", 4),
    ];
    prefill_group(c, "prefill_256_tokens_h1024", 256, &large);
}

fn prefill_group(c: &mut Criterion, name: &str, n_tokens: usize, changes: &[(&str, usize)]) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    v3c_models::init::write_random_checkpoint(&v3c_benches::bench_config(changes), &ckpt, 1).unwrap();
    let model = Model::open(&ckpt, Precision::F32).unwrap();
    let tokens: Vec<i64> = (0..n_tokens as i64).map(|i| (i * 37) % 2048).collect();
    let positions: Vec<i64> = (0..n_tokens as i64).collect();
    let latent = model.config.latent_dim();

    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.throughput(Throughput::Elements(n_tokens as u64));

    let graph = build(&model.config, Entry::Prefill, &BuildOptions { skip_mtp: true, ..Default::default() }).unwrap();
    let interp = Interpreter::new(graph, &model.checkpoint).unwrap();
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    inputs.insert("tokens".into(), Tensor::i64(vec![n_tokens], tokens.clone()));
    inputs.insert("positions".into(), Tensor::i64(vec![n_tokens], positions.clone()));
    for l in 0..model.config.num_hidden_layers {
        inputs.insert(format!("kv_cache.{l}"), Tensor::zeros(vec![0, latent]));
    }
    group.bench_function("reference", |b| b.iter(|| interp.run(&inputs, &["logits"]).unwrap()));

    let context = v3c_compiler::mlir::new_context();
    let program =
        CpuProgram::new(&context, &model.config, &[Entry::Prefill], true, Precision::F32, &model.checkpoint).unwrap();
    let mut host: HashMap<String, HostBuffer> = HashMap::new();
    host.insert("tokens".into(), HostBuffer { shape: vec![n_tokens], data: HostData::I64(tokens) });
    host.insert("positions".into(), HostBuffer { shape: vec![n_tokens], data: HostData::I64(positions) });
    for l in 0..model.config.num_hidden_layers {
        host.insert(format!("kv_cache.{l}"), HostBuffer { shape: vec![0, latent], data: HostData::F32(Vec::new()) });
    }
    group.bench_function("cpu_backend", |b| b.iter(|| program.run("prefill", &host, &["logits"]).unwrap()));
    group.finish();
}

criterion_group!(benches, prefill);
criterion_main!(benches);
