//! Building the DeepSeek-V3 definition in the DSL: the full 671B model (61 layers + MTP, both entry
//! points) and the tiny preset. Building allocates no weight memory, so this measures the graph only.

use criterion::{criterion_group, criterion_main, Criterion};
use v3c_models::{build, BuildOptions, Entry, ModelConfig};

fn graph_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("graph_build");
    group.sample_size(20);
    for name in ["deepseek-v3", "deepseek-v3-tiny"] {
        let config = ModelConfig::preset(name).expect("preset");
        for entry in Entry::ALL {
            group.bench_function(format!("{name}/{}", entry.name()), |b| {
                b.iter(|| build(&config, entry, &BuildOptions::default()).expect("build"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, graph_build);
criterion_main!(benches);
