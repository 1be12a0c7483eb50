//! Compile time of the pipeline on the full DeepSeek-V3 (61 layers + MTP, both entry points):
//! build + import + verify (stage `v3`), through the fusion passes and `form-kernels` (`fused`), and
//! the cold JIT compilation of every CPU kernel.

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
    // Cold JIT of every CPU kernel of the full model (f32 precision, dense weights), no kernel cache.
    group.bench_function("deepseek-v3/cpu_jit_all_kernels", |b| {
        use melior::ir::block::BlockLike;
        use melior::ir::operation::OperationLike;
        b.iter(|| {
            let context = v3c_compiler::mlir::new_context();
            let options = BuildOptions { dense_f32_weights: true, ..Default::default() };
            let module =
                Driver::quiet().run_model(&context, &config, &Entry::ALL, &options, "fused").expect("pipeline");
            let mut op = module.body().first_operation();
            let mut compiled = 0;
            while let Some(f) = op {
                op = f.next_in_block();
                if f.attribute(v3c_dialects::KERNEL_ATTR).is_ok() {
                    v3c_compiler::conversion::v3_to_cpu::CpuKernel::compile(&context, &f).expect("kernel");
                    compiled += 1;
                }
            }
            assert!(compiled > 10);
        })
    });
    group.finish();
}

criterion_group!(benches, compile_stages);
criterion_main!(benches);
