//! Host time to stage a run of DeepSeek-V3's sm_90a artifact (`gpu::Expander::expand`: every
//! launch's kernel, grid, parameters, tensor maps and operands at the run's sizes), as
//! `cuda::GpuArtifact` does before launching whenever a run's input shapes are not among those
//! staged — every chunk of a prompt (its caches grow chunk by chunk), a decode step at a row count
//! not yet run. The GPU waits meanwhile. The artifact is the Quickstart's (`v3c compile --model
//! deepseek-v3 --target sm_90a`: 64-row chunks, 4096-row context), written by the `v3c` binary next
//! to this bench's (`cargo build --release -p v3c-compiler` first) or `$V3C`; addresses are
//! placeholders (nothing is allocated).

use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;
use v3c_runtime::gpu::{Bindings, Expander};
use v3c_runtime::plan::BufferKind;

/// Placeholder addresses for every buffer, prepared weight and table the artifact's plans name.
fn placeholder_bindings(expander: &Expander) -> Bindings {
    let mut b = Bindings::default();
    let mut next = 1u64 << 40;
    let mut take = || {
        next += 1 << 32;
        next
    };
    for e in &expander.artifact.plan.entries {
        for buf in &e.buffers {
            match &buf.kind {
                BufferKind::Weight { name } => b.weights.entry(name.clone()).or_insert_with(&mut take),
                BufferKind::Input { name } => b.inputs.entry(name.clone()).or_insert_with(&mut take),
                BufferKind::Arena { .. } => continue,
            };
        }
    }
    for p in expander.prepared_weights().expect("prepared weights") {
        b.prepared.insert(p.key.clone(), (take(), Some(take())));
    }
    for (table, _) in expander.rope_tables() {
        b.rope.insert(v3c_runtime::gpu::rope_key(&table), take());
    }
    (b.arena, b.temps, b.workspace, b.counters) = (take(), take(), take(), take());
    b.temps_bytes = expander.temp_bytes().expect("temporaries");
    b
}

fn host_staging(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("deepseek-v3");
    v3c_benches::compile_for_sm90a("deepseek-v3".as_ref(), &out);
    let artifact = v3c_runtime::artifact::Artifact::open(&out).expect("the artifact");
    let expander = Expander::new(&artifact).expect("an sm_90a artifact");
    let bindings = placeholder_bindings(&expander);
    let mut g = c.benchmark_group("stage_deepseek_v3_sm90a");
    g.sample_size(30);
    // A 64-row chunk after 1024 rows of the prompt; a decode step of 64 sequences.
    for (entry, name, rows, context) in
        [("prefill", "prefill_chunk_64_after_1024", 64, 1024), ("decode", "decode_step_64", 64, 0)]
    {
        let plan = expander.entry(entry).expect("the entry");
        let mut shapes: BTreeMap<String, Vec<usize>> = plan.bounds.clone().into_iter().collect();
        for (input, shape) in shapes.iter_mut() {
            match input.as_str() {
                "tokens" | "positions" | "mtp_tokens" => *shape = vec![rows],
                c if entry == "prefill" && c.starts_with("kv_cache.") => shape[0] = context,
                _ => {}
            }
        }
        let sizes = plan.bind(&shapes).expect("sizes");
        g.bench_function(name, |b| b.iter(|| expander.expand(plan, sizes, &bindings, 132).expect("expands")));
    }
    g.finish();
}

criterion_group!(benches, host_staging);
criterion_main!(benches);
