//! Snapshots of the `v3` IR (stage `v3`) of every block kind of the tiny preset, and of the whole
//! tiny model; plus the stock-tool check: the full DeepSeek-V3 IR is accepted by `mlir-opt` with the
//! dialect's IRDL file, and it has 61 decoder layers plus the MTP layer in both entry points.

use std::path::Path;
use std::process::Command;

use v3c_compiler::pipeline::Driver;
use v3c_models::{build_block, Block, BuildOptions, Entry, ModelConfig};

fn tiny() -> ModelConfig {
    ModelConfig::preset("deepseek-v3-tiny").unwrap()
}

fn block_ir(block: Block, entry: Entry, layer: usize) -> String {
    block_ir_of(&tiny(), block, entry, layer)
}

fn block_ir_of(config: &ModelConfig, block: Block, entry: Entry, layer: usize) -> String {
    let context = v3c_compiler::mlir::new_context();
    let graph = build_block(config, block, entry, layer, &BuildOptions::default()).unwrap();
    let module = v3c_compiler::import::import(&context, &[(entry.name(), &graph)]).unwrap();
    v3c_compiler::mlir::verify(&context, &module, "snapshot").unwrap();
    v3c_compiler::verify::verify_shapes(&module).unwrap();
    module.as_operation().to_string()
}

#[test]
fn mla_prefill() {
    insta::assert_snapshot!(block_ir(Block::Mla, Entry::Prefill, 0));
}

#[test]
fn mla_decode_absorbed() {
    let ir = block_ir(Block::Mla, Entry::Decode, 0);
    assert!(ir.contains("form = \"absorbed\""));
    insta::assert_snapshot!(ir);
}

#[test]
fn dense_mlp() {
    insta::assert_snapshot!(block_ir(Block::DenseMlp, Entry::Prefill, 0));
}

#[test]
fn moe() {
    insta::assert_snapshot!(block_ir(Block::Moe, Entry::Prefill, 1));
}

/// DeepSeek-V2's MoE block: `moe_route` with `scoring = "softmax"` and no bias operand.
#[test]
fn moe_softmax_routing() {
    let mut v2 = tiny();
    (v2.scoring, v2.n_group, v2.topk_group, v2.norm_topk_prob) = (v3c_models::config::Scoring::Softmax, 1, 1, false);
    let ir = block_ir_of(&v2, Block::Moe, Entry::Prefill, 1);
    assert!(ir.contains("scoring = \"softmax\"") && !ir.contains("e_score_correction_bias"));
    insta::assert_snapshot!(ir);
}

/// DeepSeek-V3.2's MLA block: the indexer (`layer_norm` of its key, its queries rotated in halves,
/// `sparse_index`), then `attention_decode` over each query's `gather_rows`; the cache row holds
/// the indexer's key after the latent.
#[test]
fn mla_sparse_attention() {
    let mut v32 = tiny();
    v32.indexer = Some(v3c_models::config::SparseIndexer { n_heads: 4, head_dim: 24, topk: 3 });
    for entry in Entry::ALL {
        let ir = block_ir_of(&v32, Block::Mla, entry, 0);
        assert!(ir.contains("v3.sparse_index") && ir.contains("v3.gather_rows") && ir.contains("v3.layer_norm"));
        assert!(ir.contains("interleave = false") && ir.contains("top_k = 3"));
        insta::assert_snapshot!(format!("mla_sparse_attention_{}", entry.name()), ir);
    }
}

#[test]
fn mtp() {
    insta::assert_snapshot!(block_ir(Block::Mtp, Entry::Prefill, 3));
}

#[test]
fn whole_tiny_model() {
    let context = v3c_compiler::mlir::new_context();
    let module = Driver::quiet().run_model(&context, &tiny(), &Entry::ALL, &BuildOptions::default(), "v3").unwrap();
    insta::assert_snapshot!(module.as_operation().to_string());
}

#[test]
fn fp8_linear_and_experts_carry_block_scales() {
    let mut c = tiny();
    c.quantization = Some(v3c_models::config::Fp8Quantization { weight_block: [128, 128] });
    let context = v3c_compiler::mlir::new_context();
    let options = BuildOptions { precision: v3c_models::Precision::Fp8, ..Default::default() };
    let module = Driver::quiet().run_model(&context, &c, &[Entry::Prefill], &options, "v3").unwrap();
    let ir = module.as_operation().to_string();
    assert!(
        ir.contains("tensor<48x96xf8E4M3FN> {v3.param = \"model.layers.0.self_attn.q_a_proj.weight\"}"),
        "fp8 weight argument"
    );
    assert!(
        ir.contains("tensor<1x1xf32> {v3.param = \"model.layers.0.self_attn.q_a_proj.weight_scale_inv\"}"),
        "scale argument"
    );
    assert!(
        ir.contains("tensor<8x48x96xf8E4M3FN> {v3.param = \"model.layers.1.mlp.experts.*.gate_proj.weight\"}"),
        "stacked experts"
    );
    assert!(ir.contains("\"v3.quantize_fp8\""));
    assert!(ir.contains("operandSegmentSizes = array<i32: 1, 1, 1, 1>"), "fp8 x fp8 linear");
    assert!(ir.contains("fp8_activations = true"));
}

/// `v3c dump-ir --model deepseek-v3 --stage v3` output is accepted by stock `mlir-opt` (and
/// DeepSeek-V2-Lite's, with its bias-less softmax routing, and DeepSeek-V3.2's, with its indexers).
#[test]
fn full_model_ir_is_accepted_by_stock_mlir_opt() {
    let mlir_opt = Path::new("/usr/lib/llvm-22/bin/mlir-opt");
    assert!(mlir_opt.is_file(), "{} missing: run scripts/bootstrap.sh (mlir-22-tools)", mlir_opt.display());
    let out = v3c_tests::run_binary("v3c", &["dump-ir", "--model", "deepseek-v3", "--stage", "v3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ir = String::from_utf8(out.stdout).unwrap();
    for entry in ["@prefill", "@decode"] {
        assert!(ir.contains(&format!("func.func {entry}(")), "{entry} missing");
    }
    // 61 decoder layers + the MTP layer, in both entry points.
    assert_eq!(ir.matches("\"v3.attention\"(").count(), 62);
    assert_eq!(ir.matches("\"v3.attention_decode\"(").count(), 62);
    assert_eq!(ir.matches("{v3.param = \"model.layers.61.eh_proj.weight\"}").count(), 2);
    assert_eq!(ir.matches("{v3.param = \"model.layers.60.mlp.experts.*.down_proj.weight\"}").count(), 2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v3.mlir");
    std::fs::write(&file, &ir).unwrap();
    let irdl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dialects/irdl/v3.irdl.mlir");
    let out = v3c_tests::run_binary("v3c", &["dump-ir", "--model", "deepseek-v2-lite", "--stage", "v3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v2 = String::from_utf8(out.stdout).unwrap();
    assert_eq!(v2.matches("scoring = \"softmax\"").count(), 2 * 26, "26 MoE layers in both entries");
    let v2_file = dir.path().join("v2.mlir");
    std::fs::write(&v2_file, &v2).unwrap();
    let out = v3c_tests::run_binary("v3c", &["dump-ir", "--model", "deepseek-v3.2", "--stage", "v3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v32 = String::from_utf8(out.stdout).unwrap();
    // Every MLA layer (61 + MTP) of both entries selects its keys and attends to the gathered rows.
    for op in ["\"v3.sparse_index\"(", "\"v3.gather_rows\"(", "\"v3.layer_norm\"(", "\"v3.attention_decode\"("] {
        assert_eq!(v32.matches(op).count(), 2 * 62, "{op}");
    }
    assert_eq!(v32.matches("\"v3.attention\"(").count(), 0);
    let v32_file = dir.path().join("v32.mlir");
    std::fs::write(&v32_file, &v32).unwrap();
    for file in [&file, &v2_file, &v32_file] {
        let check = Command::new(mlir_opt)
            .arg(format!("--irdl-file={}", irdl.display()))
            .arg(file)
            .arg("-o")
            .arg("/dev/null")
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "mlir-opt rejected {}: {}",
            file.display(),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// `form-kernels` moves every op into exactly one kernel and launches each kernel where its ops
/// stood: the ops launched per entry (each call counted with its kernel's ops) are exactly the ops
/// of the `v3` stage after `fuse-moe` (the one rewriting pass; it replaces every MoE block), for the
/// tiny model and the full DeepSeek-V3.
#[test]
fn every_op_lands_in_exactly_one_launched_kernel() {
    fn v3_ops(text: &str) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(i) = line.find("\"v3.") {
                let name = &line[i + 1..];
                *m.entry(name[..name.find('"').unwrap()].to_string()).or_insert(0) += 1;
            }
        }
        m
    }
    let presets = ["deepseek-v3", "deepseek-v2-lite", "deepseek-v3.2"];
    for config in [tiny()].into_iter().chain(presets.map(|p| ModelConfig::preset(p).unwrap())) {
        for entry in Entry::ALL {
            let context = v3c_compiler::mlir::new_context();
            let mut v3 =
                Driver::quiet().run_model(&context, &config, &[entry], &BuildOptions::default(), "v3").unwrap();
            let blocks = v3_ops(&v3.as_operation().to_string())["v3.moe_experts"];
            v3c_compiler::transforms::run_passes(&context, &mut v3, &["fuse-moe"]).unwrap();
            let rewritten = v3_ops(&v3.as_operation().to_string());
            assert_eq!(rewritten.get("v3.moe_dispatch"), Some(&blocks), "every MoE block rewritten");
            assert!(!rewritten.contains_key("v3.moe_experts") && !rewritten.contains_key("v3.moe_route"));
            let fused =
                Driver::quiet().run_model(&context, &config, &[entry], &BuildOptions::default(), "fused").unwrap();
            let text = fused.as_operation().to_string();
            // Kernel bodies by symbol, then launched op counts from the entry's calls.
            let mut bodies: std::collections::HashMap<String, std::collections::BTreeMap<String, usize>> =
                Default::default();
            for chunk in text.split("func.func private @").skip(1) {
                let name = chunk[..chunk.find('(').unwrap()].to_string();
                let body = &chunk[..chunk.find("\n  }").unwrap()];
                bodies.insert(name, v3_ops(body));
            }
            let entry_text = &text[text.find(&format!("func.func @{}(", entry.name())).unwrap()..];
            assert_eq!(v3_ops(entry_text).len(), 0, "no v3 op left outside kernels");
            let mut launched = std::collections::BTreeMap::new();
            for line in entry_text.lines().filter(|l| l.contains("call @")) {
                let callee = line.split("call @").nth(1).unwrap().split('(').next().unwrap();
                for (op, n) in &bodies[callee] {
                    *launched.entry(op.clone()).or_insert(0) += n;
                }
            }
            assert_eq!(launched, v3_ops(&v3.as_operation().to_string()), "{} {}", config.name, entry.name());
        }
    }
}

/// The plan: every launch binds existing buffers; arena buffers that are live at the same time never
/// overlap; decode caches are updated in place (the cache inputs are the cache outputs).
#[test]
fn plan_places_live_buffers_apart_and_updates_caches_in_place() {
    use v3c_runtime::plan::BufferKind;
    let context = v3c_compiler::mlir::new_context();
    let module = Driver::quiet().run_model(&context, &tiny(), &Entry::ALL, &BuildOptions::default(), "fused").unwrap();
    let plan = v3c_compiler::plan::build_plan(&module, v3c_compiler::plan::PlanSizes::new(3, 17)).unwrap();
    assert_eq!(plan.entries.len(), 2);
    for e in &plan.entries {
        let n = e.launches.len();
        // Live range of each arena buffer.
        let mut live: std::collections::HashMap<usize, (usize, usize)> = Default::default();
        for (i, l) in e.launches.iter().enumerate() {
            for &b in l.args.iter().chain(&l.results) {
                assert!(b < e.buffers.len());
                if matches!(e.buffers[b].kind, BufferKind::Arena { .. }) {
                    let r = live.entry(b).or_insert((i, i));
                    r.1 = i;
                }
            }
        }
        for (_, b) in &e.outputs {
            if let Some(r) = live.get_mut(b) {
                r.1 = n;
            }
        }
        let spans: Vec<(usize, (usize, usize))> = live.into_iter().collect();
        for (a, (a0, a1)) in &spans {
            for (b, (b0, b1)) in &spans {
                if a >= b || a1 < b0 || b1 < a0 {
                    continue;
                }
                let (BufferKind::Arena { offset: oa }, BufferKind::Arena { offset: ob }) =
                    (&e.buffers[*a].kind, &e.buffers[*b].kind)
                else {
                    unreachable!()
                };
                let (ea, eb) = (oa + e.buffers[*a].bytes, ob + e.buffers[*b].bytes);
                assert!(ea <= *ob || eb <= *oa, "{}: buffers {a} and {b} overlap while both live", e.name);
                assert!(ea <= e.arena_bytes && eb <= e.arena_bytes);
            }
        }
        if e.name == "decode" {
            let cache_in =
                e.buffers.iter().find(|b| b.kind == BufferKind::Input { name: "kv_cache.1".into() }).unwrap();
            assert_eq!(cache_in.shape, vec![3, 17, 48]);
            let out = e.outputs.iter().find(|(n, _)| n == "kv_cache.1").unwrap().1;
            assert_eq!(out, cache_in.id, "the decode cache is written in place");
        } else {
            let cache_out = e.outputs.iter().find(|(n, _)| n == "kv_cache.1").unwrap().1;
            assert_eq!(e.buffers[cache_out].shape, vec![17 + 3, 48], "prefill appends rows");
        }
    }
}
