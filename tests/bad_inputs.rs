//! Bad inputs get one-line errors naming the file, key, tensor or token, a non-zero exit, no panic,
//! and no partial output: corrupt safetensors, missing tensors, wrong dtypes, bad configs,
//! out-of-vocabulary tokens. Also fuzzes the checkpoint reader with truncated and mutated files.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use v3c_models::checkpoint::Checkpoint;
use v3c_tests::run_binary;

fn fresh_checkpoint(dir: &Path, name: &str, fp8: bool) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["init-weights", "--model", "deepseek-v3-tiny", "--out", out.to_str().unwrap(), "--seed", "1"];
    if fp8 {
        args.push("--fp8");
    }
    let r = run_binary("v3c", &args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out
}

/// Runs `v3c logits` on `ckpt` and returns (exit code, stderr); asserts no output file and no panic.
fn logits_error(ckpt: &Path, tokens: &str) -> (Option<i32>, String) {
    let out = ckpt.with_extension("logits.safetensors");
    let r = run_binary(
        "v3c",
        &["logits", "--model-dir", ckpt.to_str().unwrap(), "--tokens", tokens, "--out", out.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "partial output left at {}", out.display());
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    (r.status.code(), err.trim_end().to_string())
}

/// Rewrites `model.safetensors` of `ckpt` with one tensor changed by `edit`.
fn rewrite(
    ckpt: &Path,
    edit: impl Fn(&str, safetensors::Dtype, Vec<usize>, Vec<u8>) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let file = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned = Vec::new();
    for (name, view) in st.tensors() {
        if let Some((d, s, b)) = edit(&name, view.dtype(), view.shape().to_vec(), view.data().to_vec()) {
            owned.push((name, d, s, b));
        }
    }
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let data = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(&file, data).unwrap();
}

#[test]
fn corrupt_and_truncated_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    let file = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let (code, err) = logits_error(&ckpt, "1 2");
    assert_eq!(code, Some(1));
    assert!(err.starts_with(&format!("v3c: error: {}: not a valid safetensors file:", file.display())), "{err}");

    std::fs::write(&file, b"this is not a safetensors file at all").unwrap();
    let (_, err) = logits_error(&ckpt, "1 2");
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn missing_tensor_is_named_with_its_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    rewrite(&ckpt, |name, d, s, b| (name != "model.layers.1.self_attn.kv_b_proj.weight").then_some((d, s, b)));
    let (code, err) = logits_error(&ckpt, "1 2");
    assert_eq!(code, Some(1));
    assert!(
        err.ends_with("missing tensor 'model.layers.1.self_attn.kv_b_proj.weight' (expected [192, 32] F32 or BF16)"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_and_shape_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    rewrite(&ckpt, |name, d, s, b| {
        if name == "model.norm.weight" {
            Some((safetensors::Dtype::I32, s.clone(), vec![0u8; s.iter().product::<usize>() * 4]))
        } else {
            Some((d, s, b))
        }
    });
    let (_, err) = logits_error(&ckpt, "1 2");
    assert!(err.ends_with("tensor 'model.norm.weight': expected [96] F32 or BF16, found [96] I32"), "{err}");

    let ckpt = fresh_checkpoint(dir.path(), "fp8", true);
    rewrite(&ckpt, |name, d, s, b| {
        if name == "model.layers.0.self_attn.q_a_proj.weight_scale_inv" {
            Some((d, vec![2, 1], vec![0u8; 8]))
        } else {
            Some((d, s, b))
        }
    });
    let (_, err) = logits_error(&ckpt, "1 2");
    assert!(
        err.ends_with(
            "tensor 'model.layers.0.self_attn.q_a_proj.weight_scale_inv': expected [1, 1] F32, found [2, 1] F32"
        ),
        "{err}"
    );
}

#[test]
fn bad_config_is_named_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    let cfg = ckpt.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"n_group\": 4", "\"n_group\": 3");
    std::fs::write(&cfg, text).unwrap();
    let (_, err) = logits_error(&ckpt, "1 2");
    assert_eq!(err, format!("v3c: error: {}: n_group: 3 groups do not divide n_routed_experts 8", cfg.display()));
    std::fs::write(&cfg, "{\"model_type\": \"deepseek_v3\"").unwrap();
    let (_, err) = logits_error(&ckpt, "1 2");
    assert!(err.contains("config.json: (json): not valid JSON"), "{err}");
}

/// Sizes past what the compiler builds are refused by key before anything is compiled; kernels the
/// sm_90a templates do not take are all named with the template's reason (a norm wider than any
/// row kernel's shared memory said "none of the 0 configurations tried assembles without
/// spilling"; an fp8 model's attention with value heads of 24 stopped at the first kernel). No
/// artifact is left behind.
#[test]
fn oversized_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let base: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    let fp8 = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
        "activation_scheme": "dynamic"});
    let cases = [
        (
            "num_hidden_layers",
            610_000.into(),
            "num_hidden_layers: 610000 is more than v3c supports: at most 1024 layers (the graph unrolls every layer)",
        ),
        (
            "num_attention_heads",
            (1u64 << 40).into(),
            "num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim): 43980465111040 columns of the queries; \
             kernels address a dimension with 32-bit coordinates (at most 2147483647)",
        ),
        (
            "hidden_size",
            65536.into(),
            "v3c: error: unsupported on sm_90a: 1 of 17 kernels have no sm_90a lowering yet: rms_norm_0 (no width of \
             rows_rmsnorm_bf16_d65536_eps1em6_y fits sm_90a: rows_rmsnorm_bf16_d65536_t256_eps1em6_y: 263168 B of \
             shared memory for rows of 65536 columns (at most 49152 B))",
        ),
        (
            "quantization_config",
            fp8,
            "v3c: error: unsupported on sm_90a: 4 of 19 kernels have no sm_90a lowering yet: ",
        ),
    ];
    for (key, value, expected) in cases {
        let mut config = base.clone();
        config[key] = value;
        let model = dir.path().join(key);
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        let out = dir.path().join(format!("{key}.art"));
        let r = run_binary("v3c", &["compile", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        let last = err.trim_end().lines().last().unwrap();
        assert!(last.ends_with(expected) || last.starts_with(expected), "{key}: {err}");
        assert!(!err.contains("panicked") && !out.exists(), "{key}: {err}");
        if key == "quantization_config" {
            for part in [
                "mla_projections_0 (fp8 weights concatenated at row 48 (not a 128-row scale block))",
                "attention_quantize_0 (rows_mlaprefill_h4_n24_r16_v24_",
                "attention_decode_quantize_0 (rows_mladecode_h4_n24_r16_v24_",
                "_t128: v heads of 24 (one head is one 128-wide quantization group))",
            ] {
                assert!(last.contains(part), "{part}: {last}");
            }
        }
    }
}

#[test]
fn out_of_vocabulary_token_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    let (code, err) = logits_error(&ckpt, "1 320");
    assert_eq!(code, Some(1));
    assert_eq!(err, format!("v3c: error: token id 320 is outside the vocabulary of {} (0..320)", ckpt.display()));
    let (code, err) = logits_error(&ckpt, "1 -2");
    assert_eq!(code, Some(1));
    assert!(err.contains("--tokens: '-2' is not a token id"), "{err}");
}

/// An output that cannot be written is named, with the system's reason as it reads (not as
/// `IoError(Os { .. })`, which it was).
#[test]
fn unwritable_output_is_named_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    let out = dir.path().join("missing").join("l.safetensors");
    let r = run_binary(
        "v3c",
        &["logits", "--model-dir", ckpt.to_str().unwrap(), "--tokens", "1 2", "--out", out.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        format!("v3c: error: {}: cannot write: I/O error: No such file or directory (os error 2)", out.display())
    );
}

#[test]
fn sharded_index_with_a_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fresh_checkpoint(dir.path(), "c", false);
    std::fs::write(
        ckpt.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let (_, err) = logits_error(&ckpt, "1");
    assert!(
        err.ends_with(
            "model.safetensors.index.json: names shard \"model-00001-of-00002.safetensors\", which does not exist"
        ),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Truncations, byte flips and lying header lengths never panic or read out of bounds.
    #[test]
    fn checkpoint_reader_never_panics(cut in 0usize..4000, flips in prop::collection::vec((0usize..4000, any::<u8>()), 0..8),
                                      header_len in prop::option::of(any::<u64>())) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_file();
        for (at, v) in flips {
            if !bytes.is_empty() { let n = bytes.len(); bytes[at % n] ^= v; }
        }
        if let Some(h) = header_len { bytes[..8].copy_from_slice(&h.to_le_bytes()); }
        bytes.truncate(cut.min(bytes.len()));
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(c) = Checkpoint::open_file(&path) {
            for name in c.tensor_names().map(String::from).collect::<Vec<_>>() {
                let _ = c.read(&name);
            }
        }
    }
}

fn valid_file() -> Vec<u8> {
    let a: Vec<u8> = (0..64u32).flat_map(|x| (x as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..24u16).flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        ("a".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 8], &a).unwrap()),
        ("b".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4, 6], &b).unwrap()),
    ];
    safetensors::tensor::serialize(views, None).unwrap()
}
