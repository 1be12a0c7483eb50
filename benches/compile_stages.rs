//! Compile time of the pipeline on the full DeepSeek-V3 (61 layers + MTP, both entry points):
//! build + import + verify (stage `v3`), through the fusion passes and `form-kernels` (`fused`), and
//! every CPU kernel compiled cold (lowered and JIT-compiled) and warm (from the kernel cache).

use criterion::{criterion_group, criterion_main, Criterion};
use v3c_compiler::pipeline::Driver;
use v3c_models::{BuildOptions, Entry, ModelConfig};

fn compile_stages(c: &mut Criterion) {
    let config = ModelConfig::preset("deepseek-v3").expect("preset");
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for stage in ["v3", "fused"] {
        group.bench_function(format!("deepseek-v3/{stage}"), |b| {
            b.iter(|| {
                let context = v3c_compiler::mlir::new_context();
                let module = Driver::quiet()
                    .run_model(&context, &config, &Entry::ALL, &BuildOptions::default(), stage)
                    .expect("pipeline");
                drop(module);
            })
        });
    }
    // Every CPU kernel of the full model (f32 precision, dense weights) from the `fused` stage:
    // cold (no kernel cache: lowered and JIT-compiled), and warm (every kernel loaded from a
    // content-addressed kernel cache filled beforehand).
    let cache_dir = tempfile::tempdir().expect("temporary directory");
    let cache = v3c_compiler::kernel_cache::KernelCache::new(cache_dir.path());
    for (name, cache) in [("cpu_cold", None), ("cpu_warm_cache", Some(&cache))] {
        let compile = || {
            let context = v3c_compiler::mlir::new_context();
            let compiled = v3c_compiler::cpu_backend::compile_model(
                &context,
                &config,
                &Entry::ALL,
                false,
                v3c_models::Precision::F32,
                cache,
                &mut |_, _, _| {},
            )
            .expect("compile");
            assert!(compiled.kernels.len() > 10);
            compiled.kernels.values().filter(|k| k.from_cache).count()
        };
        if cache.is_some() {
            compile();
        }
        group.bench_function(format!("deepseek-v3/{name}"), |b| {
            b.iter(|| {
                let hits = compile();
                assert_eq!(hits > 0, cache.is_some());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, compile_stages);
criterion_main!(benches);
