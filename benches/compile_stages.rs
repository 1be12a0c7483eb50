//! Compile time of the pipeline on the full DeepSeek-V3 (61 layers + MTP, both entry points):
//! build + import + verify (stage `v3`), and through the fusion passes and `form-kernels` (`fused`).

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
    group.finish();
}

criterion_group!(benches, compile_stages);
criterion_main!(benches);
