//! Benchmarks for v3c. CPU benchmarks are criterion benches in this folder (`cargo bench -p
//! v3c-benches`); GPU timing lives in `benches/device/` (one prepared script, see
//! `shared/design/GPU-CHECKS.md`), never in timed tests.

use v3c_models::ModelConfig;

/// The CPU benchmarks' model (hidden 512, 2 layers, 8 heads, 16 experts of which 4 routed per token,
/// head dims 64/32/64, vocabulary 2048), with `changes` (config.json keys) applied; tests that need
/// the same shapes use it too.
pub fn bench_config(changes: &[(&str, usize)]) -> ModelConfig {
    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    for (k, v) in [
        ("hidden_size", 512),
        ("intermediate_size", 1024),
        ("moe_intermediate_size", 256),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 8),
        ("n_routed_experts", 16),
        ("num_experts_per_tok", 4),
        ("n_group", 4),
        ("topk_group", 2),
        ("q_lora_rank", 256),
        ("kv_lora_rank", 128),
        ("qk_nope_head_dim", 64),
        ("qk_rope_head_dim", 32),
        ("v_head_dim", 64),
        ("vocab_size", 2048),
        ("num_nextn_predict_layers", 0),
    ] {
        j[k] = v.into();
    }
    for &(k, v) in changes {
        j[k] = v.into();
    }
    ModelConfig::from_json_str(&j.to_string(), "bench").unwrap()
}

/// The `v3c` binary for benches that compile an artifact with it: `$V3C`, else the one in the
/// target directory the bench was built into (`cargo build --release -p v3c-compiler` first).
pub fn v3c_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("V3C") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the bench's path");
    // target/<profile>/deps/<bench> -> target/<profile>/v3c, else target/release/v3c.
    let profile = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    [profile.join("v3c"), profile.parent().expect("target").join("release/v3c")]
        .into_iter()
        .find(|p| p.exists())
        .expect("no v3c binary: cargo build --release -p v3c-compiler (or set V3C)")
}

/// `v3c compile --model MODEL --target sm_90a --out OUT` by [`v3c_binary`], which must succeed.
pub fn compile_for_sm90a(model: &std::ffi::OsStr, out: &std::path::Path) {
    let compiled = std::process::Command::new(v3c_binary())
        .args(["compile", "--target", "sm_90a", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .output()
        .expect("v3c runs");
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
}
