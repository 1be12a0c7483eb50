//! The GPU executor's launches, checked without a GPU: a small fp8 model with DeepSeek-V3's head
//! dims compiled for sm_90a, every entry expanded into kernel launches whose parameter lists must
//! match the kernels' PTX, and the prepared weights built from its checkpoint.

use v3c_runtime::plan::Sizes;
use v3c_tests::{check_gpu_launches, run_binary};

/// A config the sm_90a templates take (head dims 128/64/128, 128-wide latent), small enough for a test.
fn small_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    for (k, v) in [
        ("hidden_size", 256),
        ("intermediate_size", 512),
        ("moe_intermediate_size", 128),
        ("kv_lora_rank", 128),
        ("q_lora_rank", 128),
        ("qk_nope_head_dim", 128),
        ("qk_rope_head_dim", 64),
        ("v_head_dim", 128),
        ("num_attention_heads", 2),
        ("num_key_value_heads", 2),
        ("vocab_size", 512),
        ("num_hidden_layers", 2),
    ] {
        j[k] = v.into();
    }
    let config = v3c_models::config::ModelConfig::from_json_str(&j.to_string(), "small").unwrap();
    let ckpt = dir.join("ckpt");
    v3c_models::init::write_random_checkpoint(&v3c_models::init::with_fp8(&config), &ckpt, 3).unwrap();
    ckpt
}

#[test]
fn every_launch_of_a_small_model_matches_its_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = small_checkpoint(dir.path());
    let out = dir.path().join("artifact");
    let compiled = run_binary(
        "v3c",
        &[
            "compile",
            "--model",
            ckpt.to_str().unwrap(),
            "--target",
            "sm_90a",
            "--max-rows",
            "64",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let sizes = [
        ("prefill", Sizes { rows: 1, context: 0 }),
        ("prefill", Sizes { rows: 37, context: 100 }),
        ("decode", Sizes { rows: 1, context: 17 }),
        ("decode", Sizes { rows: 5, context: 4096 }),
    ];
    let (launches, kernels) = check_gpu_launches(&out, &sizes);
    eprintln!("{launches} launches of {kernels} kernels checked");
    assert!(launches > 300, "{launches} launches");
    assert!(kernels >= 25, "{kernels} kernels");

    // Prepared weights from the checkpoint: as many bytes as the kernels will read.
    let artifact = v3c_runtime::artifact::Artifact::open(&out).unwrap();
    let expander = v3c_runtime::gpu::Expander::new(&artifact).unwrap();
    let prepared = expander.prepared_weights().unwrap();
    let grouped = prepared.iter().filter(|p| p.key.starts_with("grouped:")).count();
    assert_eq!(grouped, 4, "gate/up and down of the 2 MoE layers (the MTP one included)");
    let ck = v3c_models::checkpoint::Checkpoint::open(&ckpt).unwrap();
    let shapes: std::collections::HashMap<String, (Vec<usize>, String)> = artifact
        .plan
        .entries
        .iter()
        .flat_map(|e| e.buffers.iter())
        .filter_map(|b| match &b.kind {
            v3c_runtime::plan::BufferKind::Weight { name } => Some((name.clone(), (b.shape.clone(), b.dtype.clone()))),
            _ => None,
        })
        .collect();
    let source = |name: &str| -> Result<Vec<u8>, String> {
        let (shape, dtype) = &shapes[name];
        let w = v3c_runtime::cpu::load_weight(&ck, name, shape, dtype).map_err(|e| e.to_string())?;
        Ok(match w.data {
            v3c_runtime::host::HostData::F8(b) => b,
            v3c_runtime::host::HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            other => panic!("{name}: {other:?}"),
        })
    };
    for p in &prepared {
        let (b, s) = v3c_runtime::gpu::prepare_weight(p, &source).unwrap();
        assert_eq!(b.len(), p.rows * p.k, "{}", p.key);
        let s = s.expect("fp8 weights come with scales");
        assert_eq!(s.len(), 4 * p.rows.div_ceil(128) * p.k.div_ceil(128), "{}", p.key);
    }
}
