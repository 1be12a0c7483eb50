//! Host time and memory to load a GPU artifact's weights (`gpu::bind`, as `cuda::GpuArtifact::load`
//! does before any run): every weight read, the prepared ones re-laid out (dense GEMMs'
//! concatenations, the MoE's experts stacked per group) and all of it uploaded. The artifact is a
//! full-width DeepSeek-V3 cut to two layers (a dense one and a MoE one) with 64 routed experts,
//! compiled for sm_90a by the `v3c` binary (`cargo build --release -p v3c-compiler` first, or
//! `$V3C`). Two sources of weights: made up (`gpu::Weights::Random`, as `v3r bench-kernels
//! --random-weights` takes them), and a checkpoint that stores every weight as the plan has it
//! (written here once, 7 GB: e4m3 with f32 block scales, bf16, one tensor per expert as DeepSeek-V3's
//! files do; read through the page cache). Uploads are counted, not kept: the host side alone.
//! Before the timed runs, one bind of each prints the process's peak resident memory over it
//! (`VmHWM`, reset first).

use criterion::{criterion_group, criterion_main, Criterion};
use v3c_runtime::gpu::{Expander, Memory, Weights};

/// Device memory that keeps nothing: addresses handed out, uploaded bytes counted.
#[derive(Default)]
struct Counted {
    next: u64,
    uploaded: usize,
}

impl Memory for Counted {
    fn alloc(&mut self, bytes: usize, _: &str) -> Result<u64, String> {
        let at = (self.next + 255) / 256 * 256 + 256;
        self.next = at + bytes as u64;
        Ok(at)
    }

    fn upload(&mut self, bytes: &[u8], what: &str) -> Result<u64, String> {
        self.uploaded += bytes.len();
        self.alloc(bytes.len(), what)
    }

    fn write(&mut self, _: u64, bytes: &[u8], _: &str) -> Result<(), String> {
        self.uploaded += bytes.len();
        Ok(())
    }
}

/// The process's peak resident memory (`VmHWM`), in MiB.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib / 1024.0
}

fn weight_load(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config: serde_json::Value =
        serde_json::from_str(v3c_models::config::DEEPSEEK_V3_JSON).expect("DeepSeek-V3's config");
    for (key, value) in [("num_hidden_layers", 2), ("first_k_dense_replace", 1), ("num_nextn_predict_layers", 0)] {
        config[key] = value.into();
    }
    config["n_routed_experts"] = 64.into();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).expect("the model directory");
    std::fs::write(model.join("config.json"), config.to_string()).expect("config.json");
    let out = dir.path().join("artifact");
    v3c_benches::compile_for_sm90a(model.as_os_str(), &out);
    let artifact = v3c_runtime::artifact::Artifact::open(&out).expect("the artifact");
    let expander = Expander::new(&artifact).expect("an sm_90a artifact");
    write_checkpoint(&model, &artifact);
    let checkpoint = v3c_models::checkpoint::Checkpoint::open(&model).expect("the checkpoint");
    let mut g = c.benchmark_group("weight_load");
    g.sample_size(10);
    for (name, weights) in [("random", Weights::Random(7)), ("checkpoint", Weights::Checkpoint(&checkpoint))] {
        let bind = || {
            let mut memory = Counted::default();
            v3c_runtime::gpu::bind(&expander, &weights, &mut memory, &mut |_| {}).expect("bound");
            memory.uploaded
        };
        // Linux: writing 5 to clear_refs resets VmHWM to the current resident size.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let before = peak_mib();
        let uploaded = bind();
        eprintln!(
            "weight_load {name}: {:.0} MiB uploaded; peak resident {:.0} MiB{} ({before:.0} MiB before)",
            uploaded as f64 / (1 << 20) as f64,
            peak_mib(),
            if reset { "" } else { " (VmHWM not reset: since the process started)" }
        );
        g.bench_function(format!("bind_deepseek_v3_2_layers_64_experts_{name}"), |b| b.iter(bind));
    }
    g.finish();
}

/// `model/model.safetensors`: every weight the artifact's plan binds, stored as the plan has it (the
/// experts of a stacked weight one tensor each), made up as `Weights::Random` makes them.
fn write_checkpoint(model: &std::path::Path, artifact: &v3c_runtime::artifact::Artifact) {
    let mut planned = std::collections::BTreeMap::new();
    for b in artifact.plan.entries.iter().flat_map(|e| &e.buffers) {
        if let v3c_runtime::plan::BufferKind::Weight { name } = &b.kind {
            planned.entry(name.clone()).or_insert((b.shape.clone(), b.dtype.clone()));
        }
    }
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, (shape, dtype)) in planned {
        let stored = match dtype.as_str() {
            "f8E4M3FN" => safetensors::Dtype::F8_E4M3,
            "bf16" => safetensors::Dtype::BF16,
            "f32" => safetensors::Dtype::F32,
            other => panic!("{name}: {other}"),
        };
        let (names, each): (Vec<String>, &[usize]) = match name.contains(".experts.*.") {
            true => {
                ((0..shape[0]).map(|e| name.replace(".experts.*.", &format!(".experts.{e}."))).collect(), &shape[1..])
            }
            false => (vec![name.clone()], &shape[..]),
        };
        for one in names {
            let bytes = v3c_runtime::gpu::random_weight(&one, each.iter().product(), &dtype, 7);
            tensors.push((one, stored, each.to_vec(), bytes));
        }
    }
    let views = tensors.iter().map(|(n, d, s, b)| {
        (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("a tensor view"))
    });
    safetensors::tensor::serialize_to_file(views, None, &model.join("model.safetensors")).expect("written");
}

criterion_group!(benches, weight_load);
criterion_main!(benches);
