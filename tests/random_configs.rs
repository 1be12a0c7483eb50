//! Random small configs: the model builds for both entry points, a random checkpoint of it loads,
//! logits are finite, and prefill-then-decode (absorbed MLA over the latent cache) agrees with one
//! long prefill (naive MLA). Awkward sizes on purpose: odd head counts, dims that are not powers of 2.

use proptest::prelude::*;
use v3c_models::config::{ModelConfig, DEEPSEEK_V3_TINY_JSON};
use v3c_models::init::write_random_checkpoint;
use v3c_models::reference::Model;
use v3c_models::{build, BuildOptions, Entry, Precision};

#[allow(clippy::too_many_arguments)]
fn config(
    heads: usize,
    half_rope: usize,
    nope: usize,
    v: usize,
    kv: usize,
    q_lora: Option<usize>,
    layers: usize,
    dense: usize,
    groups: usize,
    per_group: usize,
    topk_group: usize,
    top_k: usize,
    yarn: bool,
    mtp: bool,
) -> ModelConfig {
    let mut j: serde_json::Value = serde_json::from_str(DEEPSEEK_V3_TINY_JSON).unwrap();
    j["hidden_size"] = 40.into();
    j["intermediate_size"] = 56.into();
    j["moe_intermediate_size"] = 24.into();
    j["vocab_size"] = 77.into();
    j["num_attention_heads"] = heads.into();
    j["qk_rope_head_dim"] = (2 * half_rope).into();
    j["qk_nope_head_dim"] = nope.into();
    j["v_head_dim"] = v.into();
    j["kv_lora_rank"] = kv.into();
    j["q_lora_rank"] = q_lora.into();
    j["num_hidden_layers"] = layers.into();
    j["first_k_dense_replace"] = dense.min(layers).into();
    j["n_group"] = groups.into();
    j["n_routed_experts"] = (groups * per_group).into();
    j["topk_group"] = topk_group.into();
    j["num_experts_per_tok"] = top_k.into();
    j["num_nextn_predict_layers"] = (mtp as usize).into();
    j["eos_token_id"] = 1.into();
    if !yarn {
        j["rope_scaling"] = serde_json::Value::Null;
    }
    ModelConfig::from_json_str(&j.to_string(), "random").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_configs_build_run_and_agree_across_mla_forms(
        heads in 1usize..4, half_rope in 1usize..5, nope in 1usize..9, v in 1usize..9, kv in 3usize..20,
        q_lora in prop::option::of(4usize..20), layers in 1usize..3, dense in 0usize..3,
        groups in 1usize..4, per_group in 2usize..4, yarn in any::<bool>(), mtp in any::<bool>(),
        pick in (0usize..100, 0usize..100), seed in 0u64..1000,
    ) {
        let topk_group = 1 + pick.0 % groups;
        let top_k = 1 + pick.1 % (topk_group * per_group);
        let c = config(heads, half_rope, nope, v, kv, q_lora, layers, dense, groups, per_group, topk_group, top_k, yarn, mtp);
        for entry in Entry::ALL {
            build(&c, entry, &BuildOptions::default()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        write_random_checkpoint(&c, &ckpt, seed).unwrap();
        let model = Model::open(&ckpt, Precision::F32).unwrap();
        let tokens = [2u32, 40, 76, 5, 11, 60];
        let full = model.logits(&tokens, 0).unwrap();
        prop_assert!(full.logits.as_f32().unwrap().iter().all(|x| x.is_finite()));
        prop_assert_eq!(full.mtp_logits.is_some(), mtp);
        let full = full.logits.as_f32().unwrap().to_vec();
        let mut s = model.session(tokens.len()).unwrap();
        let mut rows = vec![s.prefill(&tokens[..3]).unwrap()];
        for &t in &tokens[3..] {
            rows.push(s.decode(t).unwrap());
        }
        for (r, row) in rows.iter().enumerate() {
            let want = &full[(2 + r) * 77..(3 + r) * 77];
            let diff = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            prop_assert!(diff < 1e-4, "row {}: {}", 2 + r, diff);
        }
    }
}
