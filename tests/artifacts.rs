//! A `cpu` artifact runs with the runtime alone (kernels `dlopen`ed from the artifact, the plan's
//! launches over one arena, weights loaded as the plan binds them) and gives the same logits and
//! caches as the compiler's CPU backend on the same checkpoint.

use std::collections::HashMap;

use v3c_compiler::cpu_backend::CpuProgram;
use v3c_models::{config::ModelConfig, Entry, Precision};
use v3c_runtime::artifact::Artifact;
use v3c_runtime::cpu::CpuArtifact;
use v3c_runtime::host::{HostBuffer, HostData};
use v3c_tests::run_binary_env;

fn ids(v: Vec<i64>) -> HostBuffer {
    HostBuffer { shape: vec![v.len()], data: HostData::I64(v) }
}

#[test]
fn a_cpu_artifact_runs_without_the_compiler_and_matches_the_cpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (art, ckpt, cache) = (dir.path().join("art"), dir.path().join("ckpt"), dir.path().join("cache"));
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 5).unwrap();
    // The plan is made for 5 prefill rows after 2 cached ones (prefill) and 5 sequences over
    // 2-row caches (decode).
    let args = ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--max-rows", "5", "--max-context", "2"];
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["--out", art.to_str().unwrap()]);
    let out = run_binary_env("v3c", &args, &[("V3C_KERNEL_CACHE", cache.to_str().unwrap())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let runtime = CpuArtifact::load(Artifact::open(&art).unwrap(), &ckpt).unwrap();
    let model = v3c_models::reference::Model::open(&ckpt, Precision::F32).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let program = CpuProgram::new(&context, &config, &Entry::ALL, false, Precision::F32, &model.checkpoint).unwrap();

    let c = config.latent_dim();
    let caches: Vec<String> =
        (0..config.num_hidden_layers).map(|l| format!("kv_cache.{l}")).chain(["kv_cache.mtp".to_string()]).collect();
    let mut inputs = HashMap::new();
    inputs.insert("tokens".to_string(), ids(vec![3, 9, 27, 81, 243]));
    inputs.insert("positions".to_string(), ids(vec![2, 3, 4, 5, 6]));
    inputs.insert("mtp_tokens".to_string(), ids(vec![9, 27, 81, 243, 0]));
    for (i, name) in caches.iter().enumerate() {
        let data = (0..2 * c).map(|k| ((k * 7 + i * 3) % 23) as f32 / 23.0 - 0.5).collect();
        inputs.insert(name.clone(), HostBuffer { shape: vec![2, c], data: HostData::F32(data) });
    }
    let mut wanted: Vec<&str> = vec!["logits", "mtp_logits"];
    wanted.extend(caches.iter().map(String::as_str));
    let from_artifact = runtime.run("prefill", &inputs, &wanted).unwrap();
    let direct = program.run("prefill", &inputs, &wanted).unwrap();
    for name in &wanted {
        assert_eq!(from_artifact[*name], direct[*name], "prefill: {name}");
    }
    let HostData::F32(logits) = &from_artifact["logits"].data else { panic!("logits are f32") };
    assert_eq!(logits.len(), 5 * config.vocab_size);
    assert!(logits.iter().all(|v| v.is_finite()));
    // A prompt's last chunk reads back its last row of logits alone (and a cache's last row).
    let last = runtime.run("prefill", &inputs, &["logits[-1]", "mtp_logits", "kv_cache.0[-1]"]).unwrap();
    assert_eq!(last.len(), 3, "{:?}", last.keys());
    assert_eq!(last["logits[-1]"].shape, vec![1, config.vocab_size]);
    assert_eq!(last["logits[-1]"].data, HostData::F32(logits[4 * config.vocab_size..].to_vec()));
    assert_eq!(last["mtp_logits"], from_artifact["mtp_logits"]);
    let HostData::F32(cache) = &from_artifact["kv_cache.0"].data else { panic!("caches are f32") };
    assert_eq!(last["kv_cache.0[-1]"].shape, vec![1, c]);
    assert_eq!(last["kv_cache.0[-1]"].data, HostData::F32(cache[6 * c..].to_vec()));
    // A run that asks for only what it wants leaves out the launches nothing wanted needs. A
    // prompt's chunk needs its caches (and the logits of its last, to sample from): not the MTP
    // module's attention and experts (its cache row is written before them) and head, nor, but
    // for the logits, the model's head.
    let plan = runtime.entry_plan("prefill").unwrap();
    let dropped = |kept: &[&str]| -> Vec<String> {
        let short = plan.needing(kept, &[]).unwrap();
        let mut rest = short.launches.iter().peekable();
        let out: Vec<String> = plan
            .launches
            .iter()
            .filter(|l| if rest.peek() == Some(l) { rest.next().is_none() } else { true })
            .map(|l| l.kernel.clone())
            .collect();
        assert_eq!(out.len() + short.launches.len(), plan.launches.len(), "{kept:?}");
        out
    };
    let names: Vec<&str> = caches.iter().map(String::as_str).collect();
    let with_logits: Vec<&str> = names.iter().copied().chain(["logits"]).collect();
    let mtp_tail = dropped(&with_logits);
    eprintln!("left out for the caches and logits: {mtp_tail:?} of {} launches", plan.launches.len());
    assert!(mtp_tail.len() > 4 && mtp_tail.iter().any(|k| k.starts_with("moe_")), "{mtp_tail:?}");
    assert_eq!(mtp_tail.iter().filter(|k| k.starts_with("lm_head")).count(), 1, "the MTP module's head");
    let heads = dropped(&names);
    assert_eq!(heads.len(), mtp_tail.len() + 1, "{heads:?}");
    assert!(plan.needing(&wanted, &[]).is_none(), "every launch feeds an output");
    for kept in [&names, &with_logits] {
        let only: Vec<&str> = kept.iter().copied().chain([v3c_runtime::plan::ONLY_WANTED]).collect();
        let cached = runtime.run("prefill", &inputs, &only).unwrap();
        assert_eq!(cached.len(), kept.len());
        for name in kept {
            assert_eq!(cached[*name], from_artifact[*name], "{name} of a run that left out launches");
        }
    }
    // A prompt's last chunk wants its last row of logits alone: the head runs on that row, and
    // gives its bits. (The final norm runs whole: the MTP module, whose cache rows are wanted,
    // reads every row of it.)
    let short = plan.needing(&names, &["logits"]).unwrap();
    let on_last_row: Vec<&str> = short.launches.iter().filter(|l| l.last_row).map(|l| l.kernel.as_str()).collect();
    assert_eq!(on_last_row, ["lm_head_0"]);
    let last_only: Vec<&str> = names.iter().copied().chain(["logits[-1]", v3c_runtime::plan::ONLY_WANTED]).collect();
    let cached = runtime.run("prefill", &inputs, &last_only).unwrap();
    assert_eq!(cached["logits[-1]"], last["logits[-1]"], "the last row of a run narrowed to it");
    for name in &names {
        assert_eq!(cached[*name], from_artifact[*name], "{name} of a run narrowed to the last row of logits");
    }

    // Bad inputs are refused before any kernel runs.
    let mut bad = inputs.clone();
    bad.insert("tokens".to_string(), ids(vec![3, 9, 27, 81, config.vocab_size as i64]));
    let err = runtime.run("prefill", &bad, &["logits"]).unwrap_err();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let mut short = inputs.clone();
    short.insert("tokens".to_string(), ids(vec![3, 9]));
    let err = runtime.run("prefill", &short, &["logits"]).unwrap_err();
    assert!(err.contains("input 'positions': shape [5] disagrees with the other inputs' sizes"), "{err}");
    let mut long = inputs.clone();
    for name in ["tokens", "positions", "mtp_tokens"] {
        long.insert(name.to_string(), ids(vec![1; 6]));
    }
    let err = runtime.run("prefill", &long, &["logits"]).unwrap_err();
    assert!(err.contains("6 rows and 2 cached rows given, the plan holds at most 5 and 2"), "{err}");

    // The plan runs smaller sizes too: 3 rows after 1 cached row (prefill), 2 sequences over 1-row caches (decode).
    let mut small = HashMap::new();
    small.insert("tokens".to_string(), ids(vec![5, 6, 7]));
    small.insert("positions".to_string(), ids(vec![1, 2, 3]));
    small.insert("mtp_tokens".to_string(), ids(vec![6, 7, 0]));
    for name in &caches {
        small.insert(name.clone(), HostBuffer { shape: vec![1, c], data: HostData::F32(vec![0.25; c]) });
    }
    let from_artifact = runtime.run("prefill", &small, &wanted).unwrap();
    let direct = program.run("prefill", &small, &wanted).unwrap();
    for name in &wanted {
        assert_eq!(from_artifact[*name], direct[*name], "prefill at smaller sizes: {name}");
    }
    assert_eq!(from_artifact["kv_cache.0"].shape, vec![4, c]);
    let mut step = HashMap::new();
    step.insert("tokens".to_string(), ids(vec![5, 8]));
    step.insert("positions".to_string(), ids(vec![0, 0]));
    step.insert("mtp_tokens".to_string(), ids(vec![8, 9]));
    for name in &caches {
        step.insert(name.clone(), HostBuffer { shape: vec![2, 1, c], data: HostData::F32(vec![0.0; 2 * c]) });
    }
    let decode_wanted: Vec<&str> = wanted.iter().copied().filter(|w| *w != "mtp_logits").collect();
    let from_artifact = runtime.run("decode", &step, &decode_wanted).unwrap();
    let direct = program.run("decode", &step, &decode_wanted).unwrap();
    for name in &decode_wanted {
        assert_eq!(from_artifact[*name], direct[*name], "decode at smaller sizes: {name}");
    }
    assert!(runtime.run("train", &inputs, &["logits"]).unwrap_err().starts_with("no entry 'train'"));

    // Decode as a session runs it: the first step keeps its caches (updated in place) in the
    // runtime; the next one takes them as they are, the session passing their shapes only.
    let first = runtime.run_keeping("decode", &step, &decode_wanted, &[]).unwrap();
    for name in &decode_wanted {
        assert_eq!(first[*name], from_artifact[*name], "kept decode step: {name}");
    }
    let mut next = step.clone();
    next.insert("tokens".to_string(), ids(vec![11, 4]));
    let mut shapes_only = next.clone();
    for name in &caches {
        next.insert(name.clone(), first[name].clone());
        shapes_only.insert(name.clone(), HostBuffer { shape: vec![2, 1, c], data: HostData::F32(Vec::new()) });
    }
    let resident: Vec<&str> = caches.iter().map(String::as_str).collect();
    let kept = runtime.run_keeping("decode", &shapes_only, &decode_wanted, &resident).unwrap();
    let direct = program.run("decode", &next, &decode_wanted).unwrap();
    for name in &decode_wanted {
        assert_eq!(kept[*name], direct[*name], "decode on kept caches: {name}");
    }
    // In place (a batch's steps on host caches): the caches updated in the caller's map, not
    // copied out; the other outputs as a plain run gives them. A refused run leaves every input.
    let mut in_place = next.clone();
    let out = runtime.run_in_place("decode", &mut in_place, &decode_wanted).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), vec!["logits"]);
    assert_eq!(out["logits"], direct["logits"]);
    for name in &caches {
        assert_eq!(in_place[name], direct[name], "decode in place: {name}");
    }
    let mut refused = shapes_only.clone();
    let err = runtime.run_in_place("decode", &mut refused, &decode_wanted).unwrap_err();
    assert!(err.contains("0 values for shape [2, 1, "), "{err}");
    assert_eq!(refused, shapes_only);
    // Shapes without values are refused unless kept; kept caches only serve the same shapes.
    let err = runtime.run("decode", &shapes_only, &["logits"]).unwrap_err();
    assert!(err.contains("input kv_cache.") && err.contains("0 values for shape [2, 1, "), "{err}");
    let mut other = shapes_only.clone();
    for name in ["tokens", "positions", "mtp_tokens"] {
        other.insert(name.to_string(), ids(vec![0]));
    }
    for name in &caches {
        other.insert(name.clone(), HostBuffer { shape: vec![1, 1, c], data: HostData::F32(Vec::new()) });
    }
    let err = runtime.run_keeping("decode", &other, &["logits"], &resident).unwrap_err();
    assert!(err.contains("are not kept from a previous decode run of these shapes"), "{err}");
}

/// The tiny model's random checkpoint (from `seed`) and its cpu artifact (at most 4 rows a
/// prefill chunk, 24 tokens a sequence), in a temporary directory with a kernel cache: the
/// directory, artifact, checkpoint, cache and config.
fn tiny_cpu_artifact(
    seed: u64,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf, ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    let (art, ckpt, cache) = (dir.path().join("art"), dir.path().join("ckpt"), dir.path().join("cache"));
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, seed).unwrap();
    let compile =
        ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--max-rows", "4", "--max-context", "24"];
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let out = run_binary_env("v3c", &[&compile[..], &["--out", art.to_str().unwrap()]].concat(), &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, art, ckpt, cache, config)
}

/// `v3r serve ART --weights CKPT ARGS` (kernels cached in `cache`), `input` its stdin, run to its end.
fn serve_stdin(
    art: &std::path::Path,
    ckpt: &std::path::Path,
    cache: &std::path::Path,
    args: &[&str],
    input: &str,
) -> std::process::Output {
    v3r_stdin("serve", art, ckpt, cache, args, input.as_bytes())
}

/// `v3r serve`'s reply lines (JSON, each with a string `id`), by their ids.
fn replies_by_id(stdout: &[u8]) -> HashMap<String, serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect()
}

/// `v3r COMMAND ART --weights CKPT ARGS` (kernels cached in `cache`), `input` its stdin, run to
/// its end.
fn v3r_stdin(
    command: &str,
    art: &std::path::Path,
    ckpt: &std::path::Path,
    cache: &std::path::Path,
    args: &[&str],
    input: &[u8],
) -> std::process::Output {
    let mut child = std::process::Command::new(v3c_tests::workspace_binary("v3r"))
        .args([command, art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()])
        .args(args)
        .env("V3C_KERNEL_CACHE", cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
    child.wait_with_output().unwrap()
}

/// DeepSeek-V3.2 (sparse attention) through a cpu artifact: `v3r run` generates the reference
/// interpreter's greedy tokens (`v3c run`) for a prompt prefilled in chunks of 4 rows (each chunk's
/// indexer scoring the cached rows before it too) and decoded past `index_topk` (6) keys, alone and
/// batched with a second prompt.
#[test]
fn a_v32_cpu_artifact_generates_the_reference_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf/v32_sparse_yarn_bf16");
    let (art, cache) = (dir.path().join("art"), dir.path().join("cache"));
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let compile = ["compile", "--model", ckpt.to_str().unwrap(), "--target", "cpu", "--max-rows", "4"];
    let out =
        run_binary_env("v3c", &[&compile[..], &["--max-context", "32", "--out", art.to_str().unwrap()]].concat(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (first, second) = ("3 17 4 29 11 5 8 2 40 1", "7 7 2 90");
    let mut alone = Vec::new();
    for prompt in [first, second] {
        let common = ["--prompt-tokens", prompt, "--max-new-tokens", "12", "--ignore-eos"];
        let v3r = run_binary_env(
            "v3r",
            &[&["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()][..], &common].concat(),
            &env,
        );
        assert!(v3r.status.success(), "{}", text(&v3r.stderr));
        let v3c = run_binary_env("v3c", &[&["run", "--model-dir", ckpt.to_str().unwrap()][..], &common].concat(), &env);
        assert!(v3c.status.success(), "{}", text(&v3c.stderr));
        assert_eq!(text(&v3r.stdout), text(&v3c.stdout), "{prompt}");
        assert_eq!(text(&v3r.stdout).split_whitespace().count(), 12);
        alone.push(text(&v3r.stdout).trim().to_string());
    }
    let batch = [
        "run",
        art.to_str().unwrap(),
        "--weights",
        ckpt.to_str().unwrap(),
        "--prompt-tokens",
        first,
        "--prompt-tokens",
        second,
        "--max-new-tokens",
        "12",
        "--ignore-eos",
    ];
    let together = run_binary_env("v3r", &batch, &env);
    assert!(together.status.success(), "{}", text(&together.stderr));
    let rows: Vec<String> = text(&together.stdout).lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(rows, alone, "batched vs alone");
}

/// DeepSeek-V3.2 with an MTP module (its layer with an indexer too), compiled for speculative
/// decoding: one and three chained drafts a pass give the plain greedy tokens (drafts verified by a
/// sparse prefill over the cache; made-up weights, so most drafts are rejected and both paths run).
#[test]
fn a_v32_model_with_mtp_decodes_speculatively_to_the_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf/v32_sparse_f32");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    config["num_nextn_predict_layers"] = 1.into();
    let (model, ckpt, art) = (dir.path().join("model"), dir.path().join("ckpt"), dir.path().join("art"));
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let cache = dir.path().join("cache");
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let init = ["init-weights", "--model", model.to_str().unwrap(), "--out", ckpt.to_str().unwrap()];
    let out = run_binary_env("v3c", &init, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let compile = ["compile", "--model", ckpt.to_str().unwrap(), "--target", "cpu", "--speculative"];
    let out = run_binary_env("v3c", &[&compile[..], &["--out", art.to_str().unwrap()]].concat(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = |extra: &[&str]| {
        let args = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()];
        let common = ["--prompt-tokens", "5 9 17 3 44 100 2 7 61 12", "--max-new-tokens", "20", "--ignore-eos"];
        let out = run_binary_env("v3r", &[&args[..], &common, extra].concat(), &env);
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    };
    let (greedy, _) = run(&[]);
    assert_eq!(greedy.split_whitespace().count(), 20);
    for extra in [&["--speculative"][..], &["--speculative", "--draft-tokens", "3"]] {
        let (tokens, said) = run(extra);
        assert_eq!(tokens, greedy, "{extra:?}");
        assert!(said.contains("MTP drafts accepted"), "{said}");
    }
}

/// `v3r run` generates from a cpu artifact what `v3c run` generates from the checkpoint: a prompt
/// longer than the prefill plan's rows is prefilled in chunks, the decode plan runs one sequence over
/// caches smaller than planned; greedy and seeded sampling agree token for token. Several prompts
/// run as one batch give each sequence its tokens alone.
#[test]
fn v3r_runs_a_cpu_artifact_like_v3c_run() {
    let (dir, art, ckpt, cache, _) = tiny_cpu_artifact(9);
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let compile = ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu"];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let prompt = "3 17 4 29 11 5 8 2 40 1";
    // Greedy; seeded; greedy with penalties (the argmax of logits the host changes: here they
    // change the tokens); seeded with top-k, min-p and penalties.
    let penalized = ["--repetition-penalty", "0.6", "--frequency-penalty", "1.5", "--logit-bias", "17=-100"];
    let shaped =
        ["--temperature", "0.8", "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.3", "--seed", "3"];
    let seeded = ["--temperature", "0.9", "--top-p", "0.8", "--seed", "4"];
    let mut outputs = Vec::new();
    for sampling in [&[][..], &seeded, &penalized, &[&shaped[..], &["--presence-penalty", "-1"]].concat()] {
        let common = [&["--prompt-tokens", prompt, "--max-new-tokens", "10", "--ignore-eos"][..], sampling].concat();
        let v3r = run_binary_env(
            "v3r",
            &[&["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()][..], &common].concat(),
            &env,
        );
        assert!(v3r.status.success(), "{}", text(&v3r.stderr));
        assert!(text(&v3r.stderr).contains("generated 10 tokens: prefill 10 tokens in "), "{}", text(&v3r.stderr));
        let v3c = run_binary_env("v3c", &[&["run", "--model-dir", ckpt.to_str().unwrap()][..], &common].concat(), &env);
        assert!(v3c.status.success(), "{}", text(&v3c.stderr));
        assert_eq!(text(&v3r.stdout), text(&v3c.stdout), "{sampling:?}");
        assert_eq!(text(&v3r.stdout).split_whitespace().count(), 10);
        outputs.push(text(&v3r.stdout));
    }
    assert_ne!(outputs[0], outputs[2], "the penalties change greedy tokens");
    assert!(!outputs[2].split_whitespace().any(|t| t == "17"), "{}", outputs[2]);
    // A bias of 100 all but forces its token; one past the vocabulary is refused by both.
    let args = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", prompt];
    let forced =
        run_binary_env("v3r", &[&args[..], &["--max-new-tokens", "4", "--logit-bias", "5=100"]].concat(), &env);
    assert_eq!(text(&forced.stdout).trim(), "5 5 5 5", "{}", text(&forced.stderr));
    let past = ["--logit-bias", "7=1", "--logit-bias", "100000=-5"];
    let refused = run_binary_env("v3r", &[&args[..], &past].concat(), &env);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("--logit-bias: token id 100000 is outside the model's vocabulary"));
    let model = ["run", "--model-dir", ckpt.to_str().unwrap(), "--prompt-tokens", prompt];
    let refused = run_binary_env("v3c", &[&model[..], &past].concat(), &env);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("--logit-bias: token id 100000 is outside the model's vocabulary"));
    // So is a prompt's token past it, named by where the prompt came from (here the second of two).
    let past = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", prompt];
    let refused = run_binary_env("v3r", &[&past[..], &["--prompt-tokens", "1 100000"]].concat(), &env);
    assert_eq!(refused.status.code(), Some(1));
    let said = text(&refused.stderr);
    assert!(said.contains("--prompt-tokens 2: token id 100000 is outside the model's vocabulary"), "{said}");
    let logits = ["logits", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--tokens", "1 100000"];
    let unwritten = dir.path().join("unwritten.safetensors");
    let refused = run_binary_env("v3r", &[&logits[..], &["--out", unwritten.to_str().unwrap()]].concat(), &env);
    let said = text(&refused.stderr);
    assert!(said.contains("--tokens: token id 100000 is outside the model's vocabulary"), "{said}");
    assert!(!unwritten.exists());
    // Several prompts of different lengths in one batch (one decode launch per step over all of
    // them): each sequence's tokens are the ones it gets alone, greedy and seeded; a sequence that
    // stops early (fewer new tokens than the others would not: all run to --max-new-tokens with
    // --ignore-eos) keeps the others' rows.
    let prompts = ["3 17 4 29 11 5 8 2 40 1", "7 7 2", "9"];
    for sampling in [&[][..], &seeded, &penalized, &shaped] {
        let mut batch = vec!["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()];
        for p in prompts {
            batch.extend(["--prompt-tokens", p]);
        }
        batch.extend(["--max-new-tokens", "8", "--ignore-eos"]);
        batch.extend(sampling);
        let together = run_binary_env("v3r", &batch, &env);
        assert!(together.status.success(), "{}", text(&together.stderr));
        assert!(text(&together.stderr).contains("generated 24 tokens for 3 sequences: prefill 14 tokens in "));
        let lines: Vec<String> = text(&together.stdout).lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        // Two at a time from a file: the third joins the running batch when a sequence ends.
        let file = dir.path().join("prompts.txt");
        std::fs::write(&file, format!("{}\n\n{}\n{}\n", prompts[0], prompts[1], prompts[2])).unwrap();
        let queue = [
            &["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()][..],
            &["--prompts-file", file.to_str().unwrap(), "--batch", "2", "--max-new-tokens", "8", "--ignore-eos"],
            sampling,
        ]
        .concat();
        let queued = run_binary_env("v3r", &queue, &env);
        assert!(queued.status.success(), "{}", text(&queued.stderr));
        assert!(text(&queued.stderr).contains("for 3 sequences, 2 at a time: 1 joined the running batch"));
        assert_eq!(text(&queued.stdout), text(&together.stdout), "{sampling:?}");
        for (p, line) in prompts.iter().zip(&lines) {
            let alone = [
                &["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", p][..],
                &["--max-new-tokens", "8", "--ignore-eos"][..],
                sampling,
            ]
            .concat();
            let alone = run_binary_env("v3r", &alone, &env);
            assert_eq!(text(&alone.stdout).trim(), line, "prompt {p} {sampling:?}");
        }
    }
    // `v3r serve`: requests from stdin, two at a time, each one's tokens as `v3r run` gives them
    // alone (its own new tokens and sampling); a bad line and a request too long for the caches
    // refused by id, the others served.
    let requests = "3 17 4 29 11 5 8 2 40 1\n\n{\"prompt\": [7, 7, 2], \"max_new_tokens\": 5, \"id\": \"b\"}\n1 x\n\
        {\"prompt\": \"9\", \"temperature\": 0.9, \"top_p\": 0.8, \"seed\": 4}\n{\"prompt\": \"1 2 3\", \"max_new_tokens\": 30}\n\
        {\"prompt\": [7, 7, 2], \"repetition_penalty\": 0.6, \"frequency_penalty\": 1.5, \"id\": \"p\"}\n\
        {\"prompt\": [1, 2, 320], \"id\": \"v\"}\n{\"prompt\": [9], \"logit_bias\": {\"5\": 100}, \"max_new_tokens\": 3, \"id\": \"l\"}\n";
    let serve_with = |args: &[&str], input: &str| serve_stdin(&art, &ckpt, &cache, args, input);
    let serve = |input: &str, extra: &[&str]| {
        serve_with(&[&["--batch", "2", "--max-new-tokens", "8", "--ignore-eos"][..], extra].concat(), input)
    };
    // A prompt's new tokens by `v3r run` alone.
    let alone = |prompt: &str, new: usize| -> Vec<u64> {
        let new = new.to_string();
        let args = [
            &["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", prompt][..],
            &["--max-new-tokens", &new, "--ignore-eos"],
        ]
        .concat();
        text(&run_binary_env("v3r", &args, &env).stdout).split_whitespace().map(|t| t.parse().unwrap()).collect()
    };
    let served = serve(requests, &[]);
    assert!(served.status.success(), "{}", text(&served.stderr));
    assert!(
        text(&served.stderr).contains("served 5 requests (3 refused, 0 cancelled), 2 at most at a time"),
        "{}",
        text(&served.stderr)
    );
    let replies: std::collections::HashMap<String, serde_json::Value> = text(&served.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["id"].to_string(), v))
        .collect();
    assert!(replies["4"]["error"].as_str().unwrap().contains("line 4: prompt: 'x' is not a token id"));
    assert!(replies["6"]["error"].as_str().unwrap().contains("3 + 30 tokens: the batch holds"), "{replies:?}");
    // A token id past the vocabulary is that request's error, not the batch's.
    assert_eq!(replies["\"v\""]["error"], "prompt: token id 320 is outside the vocabulary (0..320)");
    assert_eq!(replies["\"l\""]["tokens"], serde_json::json!([5, 5, 5]), "{replies:?}");
    for (id, prompt, flags) in [
        ("1", "3 17 4 29 11 5 8 2 40 1", &["--max-new-tokens", "8"][..]),
        ("\"b\"", "7 7 2", &["--max-new-tokens", "5"][..]),
        ("5", "9", &["--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.8", "--seed", "4"][..]),
        ("\"p\"", "7 7 2", &["--max-new-tokens", "8", "--repetition-penalty", "0.6", "--frequency-penalty", "1.5"][..]),
    ] {
        let alone = [
            &["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", prompt][..],
            flags,
            &["--ignore-eos"],
        ]
        .concat();
        let alone = text(&run_binary_env("v3r", &alone, &env).stdout);
        let tokens: Vec<String> = replies[id]["tokens"].as_array().unwrap().iter().map(|t| t.to_string()).collect();
        assert_eq!(tokens.join(" "), alone.trim(), "request {id}");
    }
    assert_eq!(replies["1"]["finish_reason"], "length", "{replies:?}");
    // A stop sequence (the 3rd and 4th of its tokens alone) ends a request at its first
    // occurrence, kept in its tokens; log-probabilities asked for: one per token, each below 0.
    let first = alone("3 17 4 29 11 5 8 2 40 1", 8);
    let stop = &first[2..4];
    let end = (2..=first.len()).find(|&e| first[..e].ends_with(stop)).unwrap();
    let line = format!(
        "{{\"prompt\": [3, 17, 4, 29, 11, 5, 8, 2, 40, 1], \"stop\": [{stop:?}, [9999]], \"logprobs\": true, \"id\": \"s\"}}\n"
    );
    let out = serve(&line, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let got: Vec<u64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!((&got[..], &v["finish_reason"]), (&first[..end], &serde_json::json!("stop")), "{v}");
    let lp = v["logprobs"].as_array().unwrap();
    assert!(lp.len() == end && lp.iter().all(|x| x.as_f64().is_some_and(|x| x <= 0.0)), "{v}");
    // Per request, as vLLM takes them: `ignore_eos`, `min_tokens` (the end and stop tokens held
    // back until then) and `stop_token_ids` — on a server that ends requests at the end token,
    // made certain by a bias.
    let eos = v3c_models::ModelConfig::preset("deepseek-v3-tiny").unwrap().eos_token_id.unwrap();
    assert!(!first[..3].contains(&u64::from(eos)), "{first:?}");
    let forced = format!("\"prompt\": [3, 17, 4], \"logit_bias\": {{\"{eos}\": 100}}");
    let lines = format!(
        "{{{forced}, \"id\": \"e\"}}\n{{{forced}, \"min_tokens\": 3, \"id\": \"m\"}}\n\
         {{{forced}, \"ignore_eos\": true, \"id\": \"i\"}}\n\
         {{\"prompt\": [3, 17, 4, 29, 11, 5, 8, 2, 40, 1], \"stop_token_ids\": [{}], \"id\": \"t\"}}\n",
        first[2]
    );
    let out = serve_with(&["--max-new-tokens", "6"], &lines);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let by_id = replies_by_id(&out.stdout);
    let tokens = |id: &str| -> Vec<u64> {
        by_id[id]["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
    };
    let eos = u64::from(eos);
    assert_eq!((tokens("e"), &by_id["e"]["finish_reason"]), (vec![eos], &"eos".into()), "{by_id:?}");
    let m = tokens("m");
    assert!(m.len() == 4 && m[3] == eos && !m[..3].contains(&eos), "{m:?}");
    assert_eq!((tokens("i"), &by_id["i"]["finish_reason"]), (vec![eos; 6], &"length".into()), "{by_id:?}");
    let at = first.iter().position(|&t| t == first[2]).unwrap();
    assert_eq!((tokens("t"), &by_id["t"]["finish_reason"]), (first[..=at].to_vec(), &"stop".into()), "{by_id:?}");
    // Streamed: each token a line as it is picked, in order, then the request's line as before
    // (here with a budget of 24 prefill tokens between decode steps: the same tokens).
    let streamed = serve(requests, &["--stream", "--prefill-budget", "24"]);
    let mut picked: std::collections::HashMap<String, Vec<serde_json::Value>> = Default::default();
    for v in text(&streamed.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        match v.get("token") {
            Some(t) => picked.entry(v["id"].to_string()).or_default().push(t.clone()),
            None => assert_eq!(v.get("tokens"), replies[&v["id"].to_string()].get("tokens")),
        }
    }
    for id in ["1", "\"b\"", "5"] {
        assert_eq!(&picked[id], replies[id]["tokens"].as_array().unwrap(), "request {id}");
    }
    // Cancelled: a request and its cancellation sent together leave with the tokens it had (a
    // prefix of its tokens alone; in the rare case it ended first, the cancellation is refused);
    // cancelling an id no request has is an error line; the next request is served as alone.
    let cancel_lines = "{\"prompt\": [1, 2, 3], \"max_new_tokens\": 20, \"id\": \"long\"}\n{\"cancel\": \"long\"}\n\
        {\"cancel\": \"nobody\"}\n3 17 4\n";
    let out = serve(cancel_lines, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |id: serde_json::Value| lines.iter().filter(|v| v["id"] == id).cloned().collect::<Vec<_>>();
    let long_alone = alone("1 2 3", 20);
    let long = of(serde_json::json!("long"));
    match long.iter().find(|v| v["cancelled"] == true) {
        Some(v) => {
            let got: Vec<u64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
            assert!(got.len() < 20 && long_alone.starts_with(&got), "{got:?} of {long_alone:?}");
        }
        None => assert!(
            long.iter().any(|v| v["error"].as_str().is_some_and(|e| e.contains("no longer waiting"))),
            "{long:?}"
        ),
    }
    let nobody = of(serde_json::json!("nobody"));
    assert!(
        nobody[0]["error"].as_str().unwrap().contains("line 3: cancel: no request has the id \"nobody\""),
        "{nobody:?}"
    );
    let after = of(serde_json::json!(4));
    let want: Vec<serde_json::Value> = alone("3 17 4", 8).into_iter().map(serde_json::Value::from).collect();
    assert_eq!(after[0]["tokens"].as_array().unwrap(), &want, "{after:?}");
    assert!(text(&out.stderr).contains(" cancelled), "), "{}", text(&out.stderr));
    // Over HTTP (`--http`, OpenAI's completions with token ids): a completion, a streamed one and a
    // stop sequence from clients at once, each as `v3r run` alone; other paths and bad bodies
    // answered with their status and why.
    let server = v3c_tests::HttpServer::start(
        &[art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--batch", "2", "--ignore-eos"],
        &env,
    );
    let http = |method: &str, path: &str, body: &str| server.request(method, path, body);
    let ids =
        |v: &serde_json::Value| -> Vec<u64> { v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect() };
    let first = alone("3 17 4 29 11 5 8 2 40 1", 8);
    let stop = format!("{:?}", &first[3..5]);
    let replies = std::thread::scope(|scope| {
        let whole = scope
            .spawn(|| http("POST", "/v1/completions", r#"{"prompt": [3, 17, 4], "max_tokens": 6, "logprobs": 2}"#));
        let streamed = scope.spawn(|| {
            http(
                "POST",
                "/v1/completions",
                r#"{"prompt": [[7, 7, 2]], "max_tokens": 5, "stream": true, "logprobs": 2}"#,
            )
        });
        let body = format!(r#"{{"prompt": [3, 17, 4, 29, 11, 5, 8, 2, 40, 1], "max_tokens": 8, "stop": [{stop}]}}"#);
        let stopped = scope.spawn(move || http("POST", "/v1/completions", &body));
        [whole.join().unwrap(), streamed.join().unwrap(), stopped.join().unwrap()]
    });
    let [(status, whole), (_, streamed), (_, stopped)] = &replies;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let whole: serde_json::Value = serde_json::from_str(whole).unwrap();
    assert_eq!(ids(&whole["choices"][0]["tokens"]), alone("3 17 4", 6), "{whole}");
    assert_eq!((&whole["choices"][0]["finish_reason"], &whole["usage"]["total_tokens"]), (&"length".into(), &9.into()));
    // "logprobs": 2 — each greedy token the likelier of its two alternatives, at its own value.
    let lp = &whole["choices"][0]["logprobs"];
    for (k, t) in ids(&whole["choices"][0]["tokens"]).iter().enumerate() {
        let alts = lp["top_logprobs"][k].as_object().unwrap();
        assert_eq!((alts.len(), &alts[&t.to_string()]), (2, &lp["token_logprobs"][k]), "{lp}");
    }
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
    let chunks = v3c_tests::HttpServer::events(streamed);
    let tokens: Vec<u64> = chunks.iter().flat_map(|c| ids(&c["choices"][0]["tokens"])).collect();
    assert_eq!(tokens, alone("7 7 2", 5), "{streamed}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // "logprobs": 2 streamed: each token's chunk carries its log-probability, the likelier of its
    // two alternatives (greedy).
    for c in chunks.iter().filter(|c| !c["choices"][0]["tokens"].as_array().unwrap().is_empty()) {
        let lp = &c["choices"][0]["logprobs"];
        let (t, value) = (ids(&lp["tokens"])[0].to_string(), &lp["token_logprobs"][0]);
        assert_eq!((lp["top_logprobs"][0].as_object().unwrap().len(), &lp["top_logprobs"][0][&t]), (2, value), "{c}");
    }
    let stopped: serde_json::Value = serde_json::from_str(stopped).unwrap();
    let end = (4..=8).find(|&e| first[..e].ends_with(&first[3..5])).unwrap();
    assert_eq!(ids(&stopped["choices"][0]["tokens"]), first[..end], "{stopped}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    for (method, path, body, want, why) in [
        ("GET", "/v1/models", "", "200 OK", "\"object\":\"model\""),
        ("GET", "/health", "", "200 OK", "ok"),
        ("GET", "/v2/anything", "", "404 Not Found", "served are POST /v1/completions"),
        ("GET", "/v1/responses", "", "405 Method Not Allowed", "GET /v1/responses"),
        ("GET", "/v1/models/nope", "", "404 Not Found", "model nope: served here is"),
        (
            "POST",
            "/v1/responses",
            "{\"input\": \"x\", \"previous_response_id\": \"resp_1\"}",
            "400 Bad Request",
            "resp_1 is not a response kept here",
        ),
        ("POST", "/v1/responses", "{\"input\": \"x\"}", "400 Bad Request", "chat needs a tokenizer"),
        (
            "POST",
            "/v1/messages",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
            "400 Bad Request",
            "\"type\":\"error\"",
        ),
        ("GET", "/v1/completions", "", "405 Method Not Allowed", "GET /v1/completions"),
        ("POST", "/v1/completions", "{\"prompt\": \"hi\"}", "400 Bad Request", "prompt: text needs a tokenizer"),
        ("POST", "/v1/completions", "{\"prompt\": [1], \"max_tokens\": 99}", "400 Bad Request", "the batch holds"),
        (
            "POST",
            "/v1/completions",
            "{\"prompt\": [1, 400]}",
            "400 Bad Request",
            "token id 400 is outside the vocabulary",
        ),
        (
            "POST",
            "/v1/completions",
            "{\"prompt\": [1], \"logit_bias\": {\"320\": 1}}",
            "400 Bad Request",
            "logit_bias: token id 320",
        ),
        (
            "POST",
            "/v1/completions",
            "{\"prompt\": [1], \"min_p\": -1}",
            "400 Bad Request",
            "min-p -1 must be in [0, 1]",
        ),
    ] {
        let (status, body) = http(method, path, body);
        assert_eq!(status, format!("HTTP/1.1 {want}"), "{method} {path}: {body}");
        assert!(body.contains(why), "{method} {path}: {body}");
    }
    // Two prompts, and a sampled prompt with n 2: a choice each, in order, each as `v3r run` gives
    // it alone (choice k of a prompt seeded with the seed plus k); usage counts each prompt once.
    let (_, two) = http("POST", "/v1/completions", r#"{"prompt": [[3, 17, 4], [7, 7, 2]], "max_tokens": 3}"#);
    let two: serde_json::Value = serde_json::from_str(&two).unwrap();
    assert_eq!(ids(&two["choices"][0]["tokens"]), alone("3 17 4", 3), "{two}");
    assert_eq!((ids(&two["choices"][1]["tokens"]), &two["choices"][1]["index"]), (alone("7 7 2", 3), &1.into()));
    assert_eq!((&two["usage"]["prompt_tokens"], &two["usage"]["completion_tokens"]), (&6.into(), &6.into()));
    let body = r#"{"prompt": [9, 4, 2], "max_tokens": 4, "n": 2, "temperature": 0.9, "top_p": 0.8, "seed": 4}"#;
    let (_, sampled) = http("POST", "/v1/completions", body);
    let sampled: serde_json::Value = serde_json::from_str(&sampled).unwrap();
    for k in 0..2 {
        let seed = (4 + k).to_string();
        let args = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", "9 4 2"];
        let flags =
            ["--max-new-tokens", "4", "--ignore-eos", "--temperature", "0.9", "--top-p", "0.8", "--seed", &seed];
        let want: Vec<u64> = text(&run_binary_env("v3r", &[&args[..], &flags].concat(), &env).stdout)
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        assert_eq!(ids(&sampled["choices"][k]["tokens"]), want, "choice {k}: {sampled}");
    }
    assert_eq!(sampled["usage"]["prompt_tokens"], 3, "{sampled}");
    // Streamed, two prompts with n 2: each chunk names its choice; each choice's tokens are the
    // whole reply's; with `include_usage` every chunk says `usage` (null), and the last, of no
    // choices, the usage of them all.
    let body = r#"{"prompt": [[9, 4, 2], [7, 7]], "max_tokens": 4, "n": 2, "temperature": 0.9, "seed": 4}"#;
    let (_, whole) = http("POST", "/v1/completions", body);
    let whole: serde_json::Value = serde_json::from_str(&whole).unwrap();
    let streamed =
        body.replace("\"seed\": 4", "\"seed\": 4, \"stream\": true, \"stream_options\": {\"include_usage\": true}");
    let (status, streamed) = http("POST", "/v1/completions", &streamed);
    assert_eq!(status, "HTTP/1.1 200 OK", "{streamed}");
    let chunks = v3c_tests::HttpServer::events(&streamed);
    let (last, chunks) = chunks.split_last().unwrap();
    assert_eq!((last["choices"].as_array().unwrap().len(), &last["usage"]), (0, &whole["usage"]), "{streamed}");
    for k in 0..4 {
        let of_k: Vec<&serde_json::Value> = chunks.iter().filter(|c| c["choices"][0]["index"] == k).collect();
        let tokens: Vec<u64> = of_k.iter().flat_map(|c| ids(&c["choices"][0]["tokens"])).collect();
        assert_eq!(tokens, ids(&whole["choices"][k]["tokens"]), "choice {k}: {streamed}");
        assert_eq!(of_k.last().unwrap()["choices"][0]["finish_reason"], "length");
        assert!(of_k.iter().all(|c| c["usage"].is_null()), "{streamed}");
    }
    // OpenAI's penalties and vLLM's repetition penalty and top-k: `v3r run`'s tokens with those flags.
    let body = r#"{"prompt": [7, 7, 2], "max_tokens": 8, "frequency_penalty": 1.5, "repetition_penalty": 0.6,
        "top_k": 3, "temperature": 0.5, "seed": 2}"#;
    let (_, shaped) = http("POST", "/v1/completions", body);
    let shaped: serde_json::Value = serde_json::from_str(&shaped).unwrap();
    let args = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", "7 7 2"];
    let flags = ["--max-new-tokens", "8", "--ignore-eos", "--frequency-penalty", "1.5", "--repetition-penalty", "0.6"];
    let more = ["--top-k", "3", "--temperature", "0.5", "--seed", "2"];
    let want = text(&run_binary_env("v3r", &[&args[..], &flags, &more].concat(), &env).stdout);
    let want: Vec<u64> = want.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(ids(&shaped["choices"][0]["tokens"]), want, "{shaped}");
    // "echo" with "logprobs" (as evaluation harnesses score a text): the prompt's tokens first,
    // each after the first scored by the logits `v3r logits` gives the prompt's token before it;
    // then the generated token.
    let scored: Vec<u32> = vec![3, 17, 4, 29, 11, 5, 8, 2, 40, 1];
    let body = serde_json::json!({"prompt": scored, "max_tokens": 1, "echo": true, "logprobs": 1}).to_string();
    let (status, echoed) = http("POST", "/v1/completions", &body);
    assert_eq!(status, "HTTP/1.1 200 OK", "{echoed}");
    let echoed: serde_json::Value = serde_json::from_str(&echoed).unwrap();
    let lp = &echoed["choices"][0]["logprobs"];
    let tokens: Vec<u64> = ids(&lp["tokens"]);
    assert_eq!((&tokens[..10], &tokens[10..]), (&[3u64, 17, 4, 29, 11, 5, 8, 2, 40, 1][..], &first[..1]), "{echoed}");
    let rows_file = dir.path().join("prompt_logits.safetensors");
    let spelled: Vec<String> = scored.iter().map(u32::to_string).collect();
    let args = ["logits", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--tokens", &spelled.join(" ")];
    let logits = run_binary_env("v3r", &[&args[..], &["--out", rows_file.to_str().unwrap()]].concat(), &env);
    assert!(logits.status.success(), "{}", text(&logits.stderr));
    let rows = v3c_models::checkpoint::Checkpoint::open_file(&rows_file).unwrap().read("logits").unwrap();
    let (rows, vocab) = (rows.as_f32().unwrap().to_vec(), rows.shape[1]);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    for k in 1..scored.len() {
        let row = &rows[(k - 1) * vocab..k * vocab];
        let want = v3c_runtime::session::log_probability(row, scored[k]);
        let got = lp["token_logprobs"][k].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-5, "token {k}: {got} vs {want}");
        assert_eq!(lp["top_logprobs"][k].as_object().unwrap().len(), 1);
    }
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 11);
    // Keep-alive: two requests on one connection (HTTP/1.1's default), the second closing it.
    let mut c = std::net::TcpStream::connect(&server.addr).unwrap();
    std::io::Write::write_all(&mut c, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reader = std::io::BufReader::new(c.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        assert!(!line.to_ascii_lowercase().starts_with("connection: close"), "{line}");
        if line == "\r\n" {
            break;
        }
    }
    let mut health = vec![0; length];
    std::io::Read::read_exact(&mut reader, &mut health).unwrap();
    assert_eq!(String::from_utf8_lossy(&health), r#"{"status":"ok"}"#);
    let body = r#"{"prompt": [3, 17, 4], "max_tokens": 2}"#;
    let second =
        format!("POST /v1/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    std::io::Write::write_all(&mut c, second.as_bytes()).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let reply: serde_json::Value = serde_json::from_str(rest.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(ids(&reply["choices"][0]["tokens"]), alone("3 17 4", 2), "{rest}");
    drop(server);
    // A serving benchmark over made-up weights: every request served with its new tokens, the
    // figures written; a range that is not one, and prompts the caches cannot hold, refused.
    let figures = dir.path().join("serve.json");
    let bench_args = [
        &["bench-serve", art.to_str().unwrap(), "--random-weights", "1", "--requests", "9", "--batch", "3"][..],
        &["--prompt-tokens", "2..10", "--new-tokens", "5", "--out", figures.to_str().unwrap()],
    ]
    .concat();
    let bench = run_binary_env("v3r", &bench_args, &env);
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    assert!(text(&bench.stdout).contains("served 9 requests (prompts of 2..10 tokens, 5 new each, 3 at a time"));
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    assert_eq!((f["generated_tokens"].as_u64(), f["joined"].as_u64()), (Some(45), Some(6)), "{f}");
    // Each request fed its first 4 tokens to decode steps (its first came from its prefill); the
    // cpu artifact's caches per sequence run every slot's row each step.
    let (steps, run) = (f["decode_steps"].as_u64().unwrap(), f["decode_rows_run"].as_u64().unwrap());
    assert_eq!((f["decode_rows_fed"].as_u64(), run), (Some(9 * 4), 3 * steps), "{f}");
    assert!(text(&bench.stdout).contains(&format!("decode rows           {run} run in {steps} steps (100.0% of 3")));
    // The default budget: one prefill chunk (the plan's rows) between decode steps.
    assert!(f["prefill_budget_tokens"].as_u64().is_some_and(|b| b > 0), "{f}");
    let per = f["per_request"].as_array().unwrap();
    assert!(per.iter().all(|r| r["tokens"] == 5 && (2..=10).contains(&r["prompt_tokens"].as_u64().unwrap())));
    assert!(f["time_to_first_token_s"]["p99"].as_f64().unwrap() >= f["time_to_first_token_s"]["p50"].as_f64().unwrap());
    // Sampled requests (--temperature, each seeded with --seed plus its number): as many tokens,
    // the temperature in the figures; a negative one refused.
    let sampled = [&bench_args[..], &["--temperature", "0.8"]].concat();
    let out = run_binary_env("v3r", &sampled, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    assert_eq!(f["generated_tokens"].as_u64(), Some(45), "{f}");
    assert!((f["temperature"].as_f64().unwrap() - 0.8).abs() < 1e-6 && f["pick_on_host"] == false, "{f}");
    let out = run_binary_env("v3r", &[&bench_args[..], &["--temperature", "-1"]].concat(), &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--temperature -1 must be >= 0"), "{}", text(&out.stderr));
    // Requests asking for log-probabilities (--logprobs N: and N alternatives): as many tokens, N
    // in the figures; more than OpenAI's 20 refused.
    let out = run_binary_env("v3r", &[&bench_args[..], &["--logprobs", "1"]].concat(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    assert_eq!((f["generated_tokens"].as_u64(), f["logprobs"].as_u64()), (Some(45), Some(1)), "{f}");
    let out = run_binary_env("v3r", &[&bench_args[..], &["--logprobs", "21"]].concat(), &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--logprobs 21: at most 20"), "{}", text(&out.stderr));
    // Prompts starting alike: said in the figures; a cpu artifact's caches per sequence reuse
    // nothing (prefix reuse needs a pool of pages: the session's tests).
    let shared = [&bench_args[..], &["--shared-prefix", "4"]].concat();
    let out = run_binary_env("v3r", &shared, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("0 of "), "{}", text(&out.stdout));
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    assert_eq!((f["shared_prefix_tokens"].as_u64(), f["reused_prompt_tokens"].as_u64()), (Some(4), Some(0)), "{f}");
    for (range, err) in
        [("5..3", "--prompt-tokens '5..3': a length N or a range"), ("20..30", "serves prompts of 1..=24")]
    {
        let args = ["bench-serve", art.to_str().unwrap(), "--random-weights", "1", "--prompt-tokens", range];
        let out = run_binary_env("v3r", &args, &env);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(err), "{}", text(&out.stderr));
    }
    // Requests from a file (serve's request lines: ids, JSON with its own new tokens), taken in
    // turn; one too long for the artifact skipped and counted.
    let file = dir.path().join("requests.jsonl");
    std::fs::write(
        &file,
        "3 17 4\n{\"prompt\": [7, 7, 2, 9], \"max_new_tokens\": 2}\n\n{\"prompt\": [1], \"max_new_tokens\": 40}\n",
    )
    .unwrap();
    let args = [
        &["bench-serve", art.to_str().unwrap(), "--random-weights", "1", "--requests", "4"][..],
        &["--prompts", file.to_str().unwrap(), "--new-tokens", "3", "--out", figures.to_str().unwrap()],
    ]
    .concat();
    let out = run_binary_env("v3r", &args, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 of its requests too long for the artifact skipped"), "{}", text(&out.stdout));
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    let per: Vec<(u64, u64)> = f["per_request"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["prompt_tokens"].as_u64().unwrap(), r["tokens"].as_u64().unwrap()))
        .collect();
    assert_eq!(per, [(3, 3), (4, 2), (3, 3), (4, 2)], "{f}");
    assert_eq!(f["skipped_requests"], 1);
    std::fs::write(&file, "{\"prompt\": [1], \"max_new_tokens\": 40}\n").unwrap();
    let none = run_binary_env("v3r", &args, &env);
    assert!(text(&none.stderr).contains("requests.jsonl: no request the artifact serves"), "{}", text(&none.stderr));
    std::fs::write(&file, "1 2\n{\"text\": \"hi\"}\n").unwrap();
    let bad = run_binary_env("v3r", &args, &env);
    assert!(text(&bad.stderr).contains("requests.jsonl:2: text: text needs a tokenizer"), "{}", text(&bad.stderr));
    // More sequences than the decode plan's rows: the fifth joins as one ends; asked to decode
    // more at once, said before anything runs; a bad prompts file names its line.
    let mut five = vec!["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()];
    for _ in 0..5 {
        five.extend(["--prompt-tokens", "1 2"]);
    }
    let served = run_binary_env("v3r", &[&five[..], &["--max-new-tokens", "3", "--ignore-eos"]].concat(), &env);
    assert!(text(&served.stderr).contains("5 sequences, 4 at a time: 1 joined"), "{}", text(&served.stderr));
    assert_eq!(text(&served.stdout).lines().collect::<std::collections::HashSet<_>>().len(), 1);
    let err = text(&run_binary_env("v3r", &[&five[..], &["--batch", "5"]].concat(), &env).stderr);
    assert!(err.contains("5 sequences: the artifact's decode plan holds 1..=4"), "{err}");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "1 2\n3 x\n").unwrap();
    let err =
        text(&run_binary_env("v3r", &[&five[..4], &["--prompts-file", bad.to_str().unwrap()]].concat(), &env).stderr);
    assert!(err.contains("bad.txt:2: 'x' is not a token id"), "{err}");
    // Prefill chunks of 16 tokens, decode steps of at most 3 sequences (--max-batch): the prompt
    // in one chunk, the same tokens; 4 sequences refused, naming the flag.
    let wide = dir.path().join("wide");
    let wide_args = ["--max-rows", "16", "--max-batch", "3", "--out", wide.to_str().unwrap()];
    let out = run_binary_env("v3c", &[&compile[..5], &["--max-context", "24"], &wide_args[..]].concat(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("arenas at rows 16 (decode: 3 sequences) / context 24"),
        "{}",
        text(&out.stderr)
    );
    let plan = v3c_runtime::artifact::Artifact::open(&wide).unwrap().plan;
    let rows: Vec<(String, usize)> = plan.entries.iter().map(|e| (e.name.clone(), e.sizes.rows)).collect();
    assert_eq!(rows, [("prefill".to_string(), 16), ("decode".to_string(), 3)]);
    // Neither flag: a cpu artifact plans 64 rows (a GPU's, 4096-token chunks and 64 sequences).
    let default = dir.path().join("default");
    let out = run_binary_env("v3c", &[&compile[..5], &["--out", default.to_str().unwrap()]].concat(), &env);
    assert!(text(&out.stderr).contains("arenas at rows 64 / context 4096"), "{}", text(&out.stderr));
    let run = |art: &std::path::Path| {
        let args = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", prompt];
        run_binary_env("v3r", &[&args[..], &["--max-new-tokens", "6", "--ignore-eos"]].concat(), &env)
    };
    let (narrow_run, wide_run) = (run(&art), run(&wide));
    assert!(wide_run.status.success(), "{}", text(&wide_run.stderr));
    assert_eq!(text(&wide_run.stdout), text(&narrow_run.stdout));
    // A prompt's chunks timed at (tokens, cached rows) points, by default the plan's 16 tokens;
    // chunks and contexts the plan does not hold refused, naming the flag to compile with.
    let chunks = dir.path().join("prefill.json");
    let bench = ["bench-prefill", wide.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--reps", "2"];
    let out = run_binary_env(
        "v3r",
        &[&bench[..], &["--tokens", "4,16", "--context", "0,8", "--out", chunks.to_str().unwrap()]].concat(),
        &env,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("prefill    16 tokens after     8 cached: "), "{}", text(&out.stdout));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&chunks).unwrap()).unwrap();
    let points: Vec<(u64, u64)> = json["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["tokens"].as_u64().unwrap(), p["context"].as_u64().unwrap()))
        .collect();
    assert_eq!(points, [(4, 0), (16, 0), (4, 8), (16, 8)]);
    assert!(json["chunks"][3]["tokens_per_s"].as_f64().unwrap() > 0.0 && json["weights"] == "checkpoint", "{json}");
    assert!(json["chunks"][3].get("all_launches").is_none(), "{json}");
    let default = run_binary_env("v3r", &["bench-prefill", wide.to_str().unwrap(), "--random-weights", "2"], &env);
    assert!(text(&default.stdout).contains("prefill    16 tokens after     0 cached: "), "{}", text(&default.stderr));
    // Every launch over the whole chunk (the head over every row, the MTP module's tail): the A/B
    // of what a prompt's last chunk leaves out, marked in the JSON.
    let every = run_binary_env(
        "v3r",
        &[&bench[..], &["--tokens", "4", "--all-launches", "--out", chunks.to_str().unwrap()]].concat(),
        &env,
    );
    assert!(every.status.success(), "{}", text(&every.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&chunks).unwrap()).unwrap();
    assert_eq!(json["chunks"][0]["all_launches"], true, "{json}");
    assert!(json["chunks"][0]["median_ms"].as_f64().unwrap() > 0.0, "{json}");
    for (flag, value, said) in [
        (
            "--tokens",
            "17",
            "--tokens 17: the prefill plan takes 1..=16 tokens a chunk (compile with a larger --max-rows)",
        ),
        ("--context", "25", "--context 25: the prefill plan holds 0..=24 cached rows"),
        ("--plan-rows-kernels", "--reps=1", "is a cpu artifact; its GEMMs have no kernels picked per rows"),
    ] {
        let out = run_binary_env(
            "v3r",
            &["bench-prefill", wide.to_str().unwrap(), "--random-weights", "1", flag, value],
            &env,
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(said), "{}", text(&out.stderr));
    }
    let mut four = vec!["run", wide.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--batch", "4"];
    for _ in 0..4 {
        four.extend(["--prompt-tokens", "1 2"]);
    }
    let err = text(&run_binary_env("v3r", &four, &env).stderr);
    assert!(
        err.contains("4 sequences: the artifact's decode plan holds 1..=3 (compile with a larger --max-batch)"),
        "{err}"
    );
    let train = run_binary_env("v3c", &[&compile[..5], &["--train", "--max-batch", "2"]].concat(), &env);
    assert_eq!(train.status.code(), Some(1));
    assert!(text(&train.stderr).contains("--max-batch with --train"), "{}", text(&train.stderr));
    // 10 + 20 tokens do not fit caches of 24 rows: said before anything runs.
    let long = run_binary_env(
        "v3r",
        &[
            "run",
            art.to_str().unwrap(),
            "--weights",
            ckpt.to_str().unwrap(),
            "--prompt-tokens",
            prompt,
            "--max-new-tokens",
            "20",
        ],
        &env,
    );
    assert_eq!(long.status.code(), Some(1));
    assert!(
        text(&long.stderr)
            .contains("30 tokens (prompt + new): the artifact's decode plan holds caches of at most 24 rows"),
        "{}",
        text(&long.stderr)
    );
    // Whole decode steps timed, with the checkpoint or made-up weights; sizes outside the plan refused.
    let timings = dir.path().join("decode.json");
    for source in [["--weights", ckpt.to_str().unwrap()], ["--random-weights", "3"]] {
        let mut bench = vec!["bench-decode", art.to_str().unwrap(), "--batch", "1,4", "--context", "20", "--reps", "3"];
        bench.extend(source);
        bench.extend(["--out", timings.to_str().unwrap()]);
        let out = run_binary_env("v3r", &bench, &env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let lines = text(&out.stdout);
        assert!(lines.contains("decode batch   4 context 20: ") && lines.contains(" tokens/s"), "{lines}");
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&timings).unwrap()).unwrap();
        assert_eq!(json["steps"].as_array().unwrap().len(), 2);
        assert!(json["steps"][1]["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    for (flag, value, said) in
        [("--batch", "5", "--batch 5: the decode plan holds 1..=4"), ("--context", "25", "--context 25")]
    {
        let bench = ["bench-decode", art.to_str().unwrap(), "--random-weights", "1", "--batch", "1", flag, value];
        let out = run_binary_env("v3r", &bench, &env);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(said), "{}", text(&out.stderr));
    }
}

/// An fp8 checkpoint compiles (by default, and with `--precision fp8`) to an fp8 cpu artifact —
/// once silently an f32 one — whose logits `v3r logits` writes equal to `v3c logits --backend cpu
/// --precision fp8`'s; `--precision f32` gives the f32 graph's.
/// Text in and out through the checkpoint's tokenizer.json (the fixture `tokenizers` wrote): `v3r
/// tokenize` both ways, `run --prompt` as `run --prompt-tokens` with its ids, and `serve` (stdin
/// and HTTP) with text prompts and stop strings, each completion's text that of its tokens.
#[test]
fn v3r_takes_and_gives_text_with_a_checkpoints_tokenizer() {
    use v3c_runtime::tokenizer::Tokenizer;
    let (dir, art, ckpt, cache, config) = tiny_cpu_artifact(9);
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/tokenizer.json");
    std::fs::copy(&fixture, ckpt.join("tokenizer.json")).unwrap();
    let tokenizer = std::sync::Arc::new(Tokenizer::from_file(&fixture).unwrap());
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let v3r = |args: &[&str]| {
        let out = run_binary_env("v3r", args, &env);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let prompt = "Hello world!";
    let ids = tokenizer.encode(prompt, true);
    assert!(ids.iter().all(|&t| (t as usize) < config.vocab_size), "{ids:?}: the tiny model's vocabulary");
    let spelled: Vec<String> = ids.iter().map(u32::to_string).collect();
    let spelled = spelled.join(" ");
    assert_eq!(v3r(&["tokenize", ckpt.to_str().unwrap(), prompt]).trim(), spelled);
    assert_eq!(v3r(&["tokenize", ckpt.to_str().unwrap(), "--no-special-tokens", prompt]).trim(), &spelled[2..]);
    assert_eq!(
        v3r(&["tokenize", fixture.to_str().unwrap(), "--decode", &spelled]),
        format!("<｜begin▁of▁sentence｜>{prompt}\n")
    );
    assert_eq!(
        v3r(&["tokenize", ckpt.to_str().unwrap(), "--decode", "--no-special-tokens", &spelled]),
        format!("{prompt}\n")
    );
    let bad = run_binary_env("v3r", &["tokenize", ckpt.to_str().unwrap(), "--decode", "3 99999"], &env);
    assert!(text(&bad.stderr).contains("argument 1: 99999 is not a token of"), "{}", text(&bad.stderr));
    // A conversation through the chat template (the fixture's, beside its tokenizer.json): its
    // text with --render, else its ids; another template with --chat-template.
    let fixtures = fixture.parent().unwrap().to_str().unwrap();
    let tools =
        serde_json::json!([{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]);
    let conversation = serde_json::json!({"messages": [{"role": "user", "content": "Hello!"}], "tools": tools,
        "add_generation_prompt": false});
    let file = dir.path().join("conversation.json");
    std::fs::write(&file, conversation.to_string()).unwrap();
    let file = file.to_str().unwrap();
    let rendered = tokenizer.render_conversation(&conversation).unwrap();
    assert!(rendered.contains("get") && rendered.contains("Hello!"), "{rendered}");
    assert_eq!(v3r(&["tokenize", fixtures, "--chat", file, "--render"]), rendered);
    let chat_ids: Vec<String> = tokenizer.encode(&rendered, false).iter().map(u32::to_string).collect();
    assert_eq!(v3r(&["tokenize", fixtures, "--chat", file]).trim(), chat_ids.join(" "));
    let template = dir.path().join("roles.jinja");
    std::fs::write(&template, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}").unwrap();
    let other = ["tokenize", fixtures, "--chat", file, "--render", "--chat-template", template.to_str().unwrap()];
    assert_eq!(v3r(&other), "[user] Hello!\n");
    std::fs::write(dir.path().join("bad.json"), r#"{"messages": [], "system": "x"}"#).unwrap();
    let bad = dir.path().join("bad.json");
    let refused = run_binary_env("v3r", &["tokenize", fixtures, "--chat", bad.to_str().unwrap()], &env);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("bad.json: unknown field 'system'"), "{}", text(&refused.stderr));
    // Guided decoding on a server that ends requests at the end token: vLLM's choice of strings
    // and regular expression, OpenAI's JSON schema — each completion matching whole, then ending.
    let schema = r#"{"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object",
        "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}}}"#;
    let lines = format!(
        "{{\"text\": \"Hello world!\", \"guided_choice\": [\"positive\", \"negative\", \"neutral\"], \"id\": \"c\"}}\n\
        {{\"text\": \"Hello world!\", \"guided_regex\": \"[0-9]{{3}}-[a-f]{{2}}\", \"temperature\": 1, \"seed\": 3, \"id\": \"r\"}}\n\
        {{\"text\": \"Hi\", \"max_new_tokens\": 20, \"response_format\": {}, \"id\": \"s\"}}\n",
        schema.replace('\n', " ")
    );
    let out = serve_stdin(&art, &ckpt, &cache, &["--max-new-tokens", "12"], &lines);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let guided = replies_by_id(&out.stdout);
    let (c, r) = (&guided["c"], &guided["r"]);
    assert!(["positive", "negative", "neutral"].contains(&c["text"].as_str().unwrap()), "{c}");
    let r_text = r["text"].as_str().unwrap().as_bytes();
    let digits = r_text.len() == 6 && r_text[..3].iter().all(u8::is_ascii_digit) && r_text[3] == b'-';
    assert!(digits && r_text[4..].iter().all(|b| (b'a'..=b'f').contains(b)), "{r}");
    assert_eq!((&c["finish_reason"], &r["finish_reason"]), (&"eos".into(), &"eos".into()), "{guided:?}");
    let s = &guided["s"];
    let instance: serde_json::Value = serde_json::from_str(s["text"].as_str().unwrap()).unwrap();
    assert!(instance.as_object().is_some_and(|o| o.len() == 1 && o["ok"].is_boolean()), "{s}");
    assert_eq!(s["finish_reason"], "eos", "{s}");
    // The same on the command line: `v3r run` (the cpu artifact) and `v3c run` (the reference
    // interpreter) give the same completion, held to a choice, a regular expression, a schema.
    // `v3r run ART --weights CKPT ARGS`.
    let v3r_run = |args: &[&str]| {
        run_binary_env(
            "v3r",
            &[&["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()][..], args].concat(),
            &env,
        )
    };
    let schema_file = dir.path().join("schema.json");
    let schema_text = r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}"#;
    std::fs::write(&schema_file, schema_text).unwrap();
    let grammar_file = dir.path().join("list.gbnf");
    std::fs::write(&grammar_file, "root ::= item (\",\" item){0,3}\nitem ::= \"a\" | \"bc\" | [0-9]").unwrap();
    for guide in [
        vec!["--guided-choice", "yes", "--guided-choice", "no"],
        vec!["--guided-regex", "[0-9]{2}x", "--temperature", "1", "--seed", "3"],
        vec!["--json-schema", schema_file.to_str().unwrap()],
        vec!["--guided-grammar", grammar_file.to_str().unwrap(), "--temperature", "1", "--seed", "4"],
    ] {
        let common = [&["--prompt", "Hi", "--max-new-tokens", "20"][..], &guide].concat();
        let out = v3r_run(&common);
        assert!(out.status.success(), "{guide:?}: {}", text(&out.stderr));
        let ours = text(&out.stdout);
        let oracle =
            run_binary_env("v3c", &[&["run", "--model-dir", ckpt.to_str().unwrap()][..], &common].concat(), &env);
        assert!(oracle.status.success(), "{}", text(&oracle.stderr));
        assert_eq!(ours, text(&oracle.stdout), "{guide:?}");
        let ours = ours.trim_end_matches('\n');
        let held = match guide[0] {
            "--guided-choice" => ours == "yes" || ours == "no",
            "--guided-regex" => ours.len() == 3 && ours[..2].bytes().all(|b| b.is_ascii_digit()) && ours.ends_with('x'),
            "--guided-grammar" => {
                let items: Vec<&str> = ours.split(',').collect();
                items.len() <= 4
                    && items
                        .iter()
                        .all(|i| *i == "a" || *i == "bc" || (i.len() == 1 && i.as_bytes()[0].is_ascii_digit()))
            }
            _ => serde_json::from_str::<serde_json::Value>(ours).is_ok_and(|v| v["ok"].is_boolean()),
        };
        assert!(held, "{guide:?}: {ours:?}");
    }
    let refused = v3r_run(&["--prompt", "Hi", "--guided-regex", "a", "--ignore-eos"]);
    assert!(text(&refused.stderr).contains("--guided-regex: needs the end token to end the match (not --ignore-eos)"));
    // `run --prompt`: the text of the tokens `run --prompt-tokens` gives for its ids.
    let run = |prompt: &[&str], new: &str| {
        let args = [
            &["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()][..],
            prompt,
            &["--max-new-tokens", new, "--ignore-eos"],
        ]
        .concat();
        v3r(&args)
    };
    let alone: Vec<u32> =
        run(&["--prompt-tokens", &spelled], "8").split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(run(&["--prompt", prompt], "8"), format!("{}\n", tokenizer.decode(&alone, true)));
    // `v3c run --prompt` on the checkpoint (the reference interpreter): the same text.
    let v3c = run_binary_env(
        "v3c",
        &["run", "--model-dir", ckpt.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "8", "--ignore-eos"],
        &env,
    );
    assert!(v3c.status.success(), "{}", text(&v3c.stderr));
    assert_eq!(text(&v3c.stdout), format!("{}\n", tokenizer.decode(&alone, true)));
    let two = run(&["--prompt", prompt, "--prompt", "Hi"], "4");
    let lines: Vec<serde_json::Value> = two.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0], serde_json::Value::from(tokenizer.decode(&alone[..4], true)), "{two}");
    assert_eq!(lines.len(), 2);
    let elsewhere = dir.path().join("no-tokenizer");
    std::fs::create_dir(&elsewhere).unwrap();
    let missing = v3r_run(&["--tokenizer", elsewhere.to_str().unwrap(), "--prompt", "x"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no-tokenizer/tokenizer.json: No such file"), "{}", text(&missing.stderr));
    // `serve` from stdin: a text prompt with a stop string — the text of two of its tokens alone
    // — ends at the token that completes it, its text cut before it.
    let stop = (1..alone.len() - 1)
        .filter(|&k| !tokenizer.is_special(alone[k]) && !tokenizer.is_special(alone[k + 1]))
        .map(|k| tokenizer.decode(&alone[k..k + 2], false))
        .find(|s| !s.contains('\u{fffd}') && !s.trim().is_empty())
        .unwrap_or_else(|| panic!("two tokens with text in {alone:?}"));
    let end = (1..=alone.len()).find(|&e| tokenizer.decode(&alone[..e], false).contains(&stop)).unwrap();
    let request = serde_json::json!({"text": prompt, "stop_text": [stop.clone()], "id": "t"}).to_string();
    let args = ["--max-new-tokens", "8", "--ignore-eos", "--stream"];
    let served = serve_stdin(&art, &ckpt, &cache, &args, &format!("{request}\n"));
    assert!(served.status.success(), "{}", text(&served.stderr));
    let lines: Vec<serde_json::Value> =
        text(&served.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = lines.last().unwrap();
    let got: Vec<u32> = last["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!((&got[..], &last["finish_reason"]), (&alone[..end], &"stop".into()), "{last}");
    let whole = tokenizer.decode(&got, true);
    assert_eq!(last["text"], whole[..whole.find(&stop).unwrap()], "{last}");
    // Streamed pieces never show the stop string, and add up to at most the text.
    let pieces: String = lines[..lines.len() - 1].iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert!(last["text"].as_str().unwrap().starts_with(&pieces), "{pieces:?} {last}");
    // Over HTTP: the prompt as text, the completion's text that of its tokens, whole or streamed.
    let server = v3c_tests::HttpServer::start(
        &[
            art.to_str().unwrap(),
            "--weights",
            ckpt.to_str().unwrap(),
            "--ignore-eos",
            "--tokenizer",
            fixture.to_str().unwrap(),
            "--api-key",
            "s3cret",
        ],
        &env,
    );
    let post = |body: &str| server.request("POST", "/v1/completions", body).1;
    // --api-key: every request but GET /health carries it, or is refused.
    for key in [None, Some("wrong"), Some("s3cre")] {
        let (status, body) = server.request_as("POST", "/v1/completions", r#"{"prompt": "x"}"#, key);
        assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{key:?}: {body}");
        assert!(body.contains("invalid_api_key"), "{body}");
    }
    assert_eq!(server.request_as("GET", "/health", "", None).0, "HTTP/1.1 200 OK");
    let models: serde_json::Value = serde_json::from_str(&server.request("GET", "/v1/models", "").1).unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 24, "{models}");
    // vLLM's /tokenize and /detokenize: the tokenizer's own ids (the template's, the chat
    // template's) and text; what is not ids of its vocabulary refused.
    let json = |body: &str, path: &str| -> serde_json::Value {
        let (status, reply) = server.request("POST", path, body);
        assert_eq!(status, "HTTP/1.1 200 OK", "{path} {body}: {reply}");
        serde_json::from_str(&reply).unwrap()
    };
    let tokenized = json(&serde_json::json!({"prompt": prompt}).to_string(), "/tokenize");
    assert_eq!(tokenized, serde_json::json!({"tokens": ids, "count": ids.len(), "max_model_len": 24}));
    let bare = json(&serde_json::json!({"prompt": prompt, "add_special_tokens": false}).to_string(), "/tokenize");
    assert_eq!(bare["tokens"], serde_json::json!(tokenizer.encode(prompt, false)));
    let hello = serde_json::json!([{"role": "user", "content": "Hello!"}]);
    let chat = json(&serde_json::json!({"messages": hello}).to_string(), "/tokenize");
    assert_eq!(chat["tokens"], serde_json::json!(tokenizer.chat(&hello, true).unwrap()));
    // With what the template is given beside the messages: the tools, the turn left closed.
    let tools =
        serde_json::json!([{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]);
    let asked = serde_json::json!({"messages": hello, "tools": tools, "add_generation_prompt": false});
    let with_tools = json(&asked.to_string(), "/tokenize");
    let rendered = tokenizer.render_conversation(&asked).unwrap();
    assert_eq!(with_tools["tokens"], serde_json::json!(tokenizer.encode(&rendered, false)));
    assert_ne!(with_tools["tokens"], chat["tokens"]);
    let back = json(&serde_json::json!({"tokens": ids}).to_string(), "/detokenize");
    assert_eq!(back["prompt"], tokenizer.decode(&ids, false));
    for (method, path, body, want, why) in [
        ("POST", "/detokenize", r#"{"tokens": [5, 99999]}"#, "400 Bad Request", "not token ids of a vocabulary of 980"),
        ("POST", "/tokenize", r#"{"prompt": 5}"#, "400 Bad Request", "prompt: 5 is not a string"),
        ("POST", "/tokenize", r#"{"text": "x"}"#, "400 Bad Request", "unknown field 'text'"),
        ("GET", "/tokenize", "", "405 Method Not Allowed", "GET /tokenize"),
    ] {
        let (status, reply) = server.request(method, path, body);
        assert_eq!(status, format!("HTTP/1.1 {want}"), "{path} {body}: {reply}");
        assert!(reply.contains(why), "{path} {body}: {reply}");
    }
    let whole: serde_json::Value =
        serde_json::from_str(&post(&serde_json::json!({"prompt": prompt, "max_tokens": 8}).to_string())).unwrap();
    assert_eq!(whole["choices"][0]["text"], tokenizer.decode(&alone, true), "{whole}");
    assert_eq!(whole["usage"]["prompt_tokens"], ids.len(), "{whole}");
    let streamed =
        post(&serde_json::json!({"prompt": [prompt], "max_tokens": 8, "stream": true, "stop": stop}).to_string());
    let pieces: String = v3c_tests::HttpServer::events(&streamed)
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pieces, last["text"].as_str().unwrap(), "{streamed}");
    // response_format json_object: whatever the model's logits, the text is on JSON's grammar
    // (an object opened first); without the end token (--ignore-eos) it stays so to the budget.
    for (sampling, stream) in
        [(serde_json::json!({}), false), (serde_json::json!({"temperature": 1.0, "seed": 5}), true)]
    {
        let mut body = serde_json::json!({"prompt": prompt, "max_tokens": 12, "stream": stream,
            "response_format": {"type": "json_object"}});
        body.as_object_mut().unwrap().extend(sampling.as_object().unwrap().clone());
        let reply = post(&body.to_string());
        let text: String = match stream {
            false => serde_json::from_str::<serde_json::Value>(&reply).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .into(),
            true => v3c_tests::HttpServer::events(&reply)
                .iter()
                .filter_map(|e| e["choices"][0]["text"].as_str().map(str::to_string))
                .collect(),
        };
        assert!(text.trim_start().starts_with('{'), "{text:?}");
        assert!(v3c_runtime::grammar::Json::new().feed(text.as_bytes()).is_some(), "{text:?}");
    }
    for (format, why) in [
        (r#"{"type": "json_schema"}"#, r#"response_format: json_schema needs {\"json_schema\": {\"schema\": ...}}"#),
        (
            r#"{"type": "json_schema", "json_schema": {"schema": {"type": "null"}}}"#,
            "response_format: needs the end token to end the match (not --ignore-eos)",
        ),
    ] {
        let body = format!(r#"{{"prompt": "x", "response_format": {format}}}"#);
        let (status, body) = server.request("POST", "/v1/completions", &body);
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
        assert!(body.contains(why), "{body}");
    }
    // Chat: the conversation as the chat template writes it, the reply the text of the tokens
    // `run` gives those ids; streamed, the role first, then the text in pieces.
    let messages = serde_json::json!([{"role": "user", "content": "Hello!"}]);
    let chat_ids = tokenizer.chat(&messages, true).unwrap();
    assert!(chat_ids.iter().all(|&t| (t as usize) < config.vocab_size), "{chat_ids:?}: the tiny model's vocabulary");
    let spelled: Vec<String> = chat_ids.iter().map(u32::to_string).collect();
    let chat_alone: Vec<u32> =
        run(&["--prompt-tokens", &spelled.join(" ")], "6").split_whitespace().map(|t| t.parse().unwrap()).collect();
    let common = ["run", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--chat", "Hello!"];
    let with_template =
        [&common[..], &["--tokenizer", fixture.to_str().unwrap(), "--max-new-tokens", "6", "--ignore-eos"]].concat();
    assert_eq!(v3r(&with_template), format!("{}\n", tokenizer.decode(&chat_alone, true)));
    let without = run_binary_env("v3r", &common, &env);
    assert!(text(&without.stderr).contains("--chat 1: no chat template"), "{}", text(&without.stderr));
    // --chat-template: a template for the checkpoint's tokenizer, which has none — the reply
    // that of the ids it writes.
    let template = dir.path().join("chat.jinja");
    std::fs::write(
        &template,
        "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>",
    )
    .unwrap();
    let templated = [&common[..], &["--chat-template", template.to_str().unwrap()]].concat();
    assert_eq!(
        v3r(&[&templated[..], &["--max-new-tokens", "6", "--ignore-eos"]].concat()),
        format!("{}\n", tokenizer.decode(&chat_alone, true))
    );
    // `v3r chat`: two turns from stdin, each reply what `run` gives the conversation so far.
    let args = ["--tokenizer", fixture.to_str().unwrap(), "--max-new-tokens", "3", "--ignore-eos"];
    let chatted = v3r_stdin("chat", &art, &ckpt, &cache, &args, b"Hello!\na\n");
    assert!(chatted.status.success(), "{}", text(&chatted.stderr));
    let first = run(&["--tokenizer", fixture.to_str().unwrap(), "--chat", "Hello!"], "3");
    let first = first.strip_suffix('\n').unwrap();
    let conversation = serde_json::json!([
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first}, {"role": "user", "content": "a"}
    ]);
    let second_ids = tokenizer.chat(&conversation, true).unwrap();
    assert!(second_ids.len() + 3 <= 24, "{second_ids:?}: the artifact's 24 tokens");
    let spelled: Vec<String> = second_ids.iter().map(u32::to_string).collect();
    let second: Vec<u32> =
        run(&["--prompt-tokens", &spelled.join(" ")], "3").split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(text(&chatted.stdout), format!("{first}\n{}\n", tokenizer.decode(&second, true)));
    let chat = |stream: bool| {
        let body = serde_json::json!({"messages": messages, "max_tokens": 6, "stream": stream, "logprobs": true});
        server.request("POST", "/v1/chat/completions", &body.to_string()).1
    };
    let whole: serde_json::Value = serde_json::from_str(&chat(false)).unwrap();
    let message = &whole["choices"][0]["message"];
    assert_eq!(
        (&message["role"], &message["content"]),
        (&"assistant".into(), &tokenizer.decode(&chat_alone, true).into()),
        "{whole}"
    );
    assert_eq!(
        (&whole["object"], &whole["usage"]["prompt_tokens"]),
        (&"chat.completion".into(), &chat_ids.len().into())
    );
    let content = whole["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), chat_alone.len(), "{whole}");
    for (entry, &t) in content.iter().zip(&chat_alone) {
        assert_eq!(entry["bytes"], serde_json::json!(tokenizer.token_bytes_of(t)), "{entry}");
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0, "{entry}");
    }
    let streamed = chat(true);
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
    let chunks = v3c_tests::HttpServer::events(&streamed);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{streamed}");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, message["content"].as_str().unwrap(), "{streamed}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length", "{streamed}");
    // GET /metrics (no key needed): the six requests served here, how each ended, none left.
    let (status, metrics) = server.request_as("GET", "/metrics", "", None);
    assert_eq!(status, "HTTP/1.1 200 OK");
    for line in [
        "v3r_requests_total{finish=\"length\"} 5",
        "v3r_requests_total{finish=\"stop\"} 1",
        "v3r_requests_in_flight 0",
        "v3r_time_to_first_token_seconds_count 6",
        "v3r_request_latency_seconds_count 6",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

/// `v3r perplexity` over a cpu artifact: the mean negative log-likelihood the reference
/// interpreter's logits give the same windows (`v3c logits --backend reference` for each), token
/// ids or text through a tokenizer alike; bad windows refused by flag.
#[test]
fn perplexity_through_an_artifact_is_the_reference_interpreters() {
    let (dir, art, ckpt, cache, config) = tiny_cpu_artifact(5);
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let tokens: Vec<u32> = (0..50u32).map(|i| (i * 37 + 11) % 300 + 3).collect();
    let data = dir.path().join("tokens.txt");
    std::fs::write(&data, tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")).unwrap();
    let (window, stride) = (16, 10);
    // The oracle: the reference interpreter's logits of each window, scored as the recipe says.
    let mut nll = 0.0f64;
    let mut scored = 0;
    let (mut begin, mut scored_to) = (0, 0);
    loop {
        let end = (begin + window).min(tokens.len());
        let ids: Vec<String> = tokens[begin..end].iter().map(u32::to_string).collect();
        let logits = dir.path().join(format!("w{begin}.safetensors"));
        let v3c = run_binary_env(
            "v3c",
            &["logits", "--model-dir", ckpt.to_str().unwrap(), "--tokens", &ids.join(" "), "--backend", "reference"]
                .into_iter()
                .chain(["--out", logits.to_str().unwrap()])
                .collect::<Vec<_>>(),
            &env,
        );
        assert!(v3c.status.success(), "{}", text(&v3c.stderr));
        let rows = v3c_models::checkpoint::Checkpoint::open_file(&logits).unwrap().read("logits").unwrap();
        let rows = rows.as_f32().unwrap();
        let v = config.vocab_size;
        for k in scored_to.max(begin + 1)..end {
            let row = &rows[(k - begin - 1) * v..(k - begin) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let z: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
            nll += z.ln() - f64::from(row[tokens[k] as usize] - max);
            scored += 1;
        }
        scored_to = end;
        if end == tokens.len() {
            break;
        }
        begin += stride;
    }
    assert_eq!(scored, tokens.len() - 1);
    let perplexity = |data: &std::path::Path, extra: &[&str]| {
        let args = [
            &[
                "perplexity",
                art.to_str().unwrap(),
                "--weights",
                ckpt.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ][..],
            &["--window", "16", "--stride", "10", "--json"],
            extra,
        ]
        .concat();
        let out = run_binary_env("v3r", &args, &env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str::<serde_json::Value>(text(&out.stdout).trim()).unwrap()
    };
    let got = perplexity(&data, &[]);
    assert_eq!((got["tokens_scored"].as_u64(), got["windows"].as_u64()), (Some(49), Some(5)), "{got}");
    let mean = nll / scored as f64;
    let relative = (got["mean_nll"].as_f64().unwrap() - mean).abs() / mean;
    assert!(relative < 1e-4, "{got}: the reference's mean NLL {mean} (relative difference {relative:e})");
    assert!((got["perplexity"].as_f64().unwrap() - mean.exp()).abs() / mean.exp() < 1e-3, "{got}");
    // Text through the tokenizer: the perplexity of its ids.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/tokenizer.json");
    let tokenizer = v3c_runtime::tokenizer::Tokenizer::from_file(&fixture).unwrap();
    let corpus = "kq#zv!".repeat(12);
    let ids: Vec<String> = tokenizer.encode(&corpus, true).iter().map(u32::to_string).collect();
    let (as_text, as_ids) = (dir.path().join("corpus.txt"), dir.path().join("corpus.ids"));
    std::fs::write(&as_text, &corpus).unwrap();
    std::fs::write(&as_ids, ids.join(" ")).unwrap();
    let from_text = perplexity(&as_text, &["--tokenizer", fixture.to_str().unwrap()]);
    assert_eq!(from_text["mean_nll"], perplexity(&as_ids, &[])["mean_nll"]);
    for (extra, err) in [
        (&["--window", "500"][..], "--window 500: the artifact's prefill takes at most"),
        (&["--window", "8", "--stride", "9"][..], "--stride 9: 1..=8"),
    ] {
        let args = [
            &[
                "perplexity",
                art.to_str().unwrap(),
                "--weights",
                ckpt.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        let bad = run_binary_env("v3r", &args, &env);
        assert!(!bad.status.success() && text(&bad.stderr).contains(err), "{extra:?}: {}", text(&bad.stderr));
    }
}

#[test]
fn an_fp8_checkpoint_gives_an_fp8_cpu_artifact_with_the_cpu_backends_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, cache) = (dir.path().join("ckpt"), dir.path().join("cache"));
    let config = v3c_models::init::with_fp8(&ModelConfig::preset("deepseek-v3-tiny").unwrap());
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 11).unwrap();
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let tokens = "3 17 4 29 11 5";
    let read = |path: &std::path::Path| -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    for (precision, flag) in [("fp8", None), ("fp8", Some("fp8")), ("f32", Some("f32"))] {
        let art = dir.path().join(format!("art-{precision}-{}", flag.is_some()));
        let mut compile = vec!["compile", "--model", ckpt.to_str().unwrap(), "--target", "cpu", "--max-rows", "8"];
        compile.extend(["--max-context", "16", "--out", art.to_str().unwrap()]);
        if let Some(f) = flag {
            compile.extend(["--precision", f]);
        }
        let out = run_binary_env("v3c", &compile, &env);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let manifest = Artifact::open(&art).unwrap().manifest;
        assert_eq!(manifest.model.precision, precision, "{flag:?}");
        let (from_artifact, direct) = (dir.path().join("a.safetensors"), dir.path().join("d.safetensors"));
        let v3r = run_binary_env(
            "v3r",
            &["logits", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--tokens", tokens, "--out"]
                .iter()
                .copied()
                .chain([from_artifact.to_str().unwrap()])
                .collect::<Vec<_>>(),
            &env,
        );
        assert!(v3r.status.success(), "{}", String::from_utf8_lossy(&v3r.stderr));
        let v3c = run_binary_env(
            "v3c",
            &["logits", "--model-dir", ckpt.to_str().unwrap(), "--tokens", tokens, "--backend", "cpu", "--precision"]
                .iter()
                .copied()
                .chain([precision, "--out", direct.to_str().unwrap()])
                .collect::<Vec<_>>(),
            &env,
        );
        assert!(v3c.status.success(), "{}", String::from_utf8_lossy(&v3c.stderr));
        assert_eq!(read(&from_artifact), read(&direct), "{precision} {flag:?}");
    }
}

/// Speculative decoding with the MTP module: a tiny model (fp8 at init) trained on a repeating
/// pattern — its checkpoint no longer claims fp8 block scaling for f32 weights — compiled with
/// `--speculative` generates with `v3r run --speculative` exactly the greedy tokens of `v3r run`,
/// with most MTP drafts accepted (the MTP head has learned the pattern too) — one draft a pass or
/// three chained — and samples with a temperature and top-p.
#[test]
fn speculative_decoding_with_the_mtp_module_gives_the_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (init, trained, art, cache) =
        (dir.path().join("init"), dir.path().join("trained"), dir.path().join("art"), dir.path().join("cache"));
    let config = v3c_models::init::with_fp8(&ModelConfig::preset("deepseek-v3-tiny").unwrap());
    v3c_models::init::write_random_checkpoint(&config, &init, 4).unwrap();
    let pattern = [5, 9, 12, 30, 7, 44];
    let data = dir.path().join("data.txt");
    let text: Vec<String> = (0..2000).map(|i| pattern[i % pattern.len()].to_string()).collect();
    std::fs::write(&data, text.join(" ")).unwrap();
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let train = [
        "train",
        "--model-dir",
        &s(&init),
        "--data",
        &s(&data),
        "--steps",
        "30",
        "--batch",
        "2",
        "--seq",
        "24",
        "--lr",
        "0.003",
        "--out",
        &s(&trained),
    ];
    let out = run_binary_env("v3c", &train, &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(trained.join("config.json")).unwrap()).unwrap();
    assert!(written.get("quantization_config").is_none(), "f32 weights under an fp8 config");
    let compile = [
        "compile",
        "--model",
        &s(&trained),
        "--target",
        "cpu",
        "--speculative",
        "--max-rows",
        "8",
        "--max-context",
        "64",
        "--out",
        &s(&art),
    ];
    let out = run_binary_env("v3c", &compile, &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entries = Artifact::open(&art).unwrap().manifest.entries;
    assert_eq!(entries, ["prefill", "decode", "draft"]);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let run = ["run", &s(&art), "--weights", &s(&trained), "--prompt-tokens", "5 9 12 30 7 44 5 9", "--max-new-tokens"];
    let run: Vec<&str> = run.iter().map(|x| x.as_ref()).chain(["30", "--ignore-eos"]).collect();
    let plain = run_binary_env("v3r", &run, &env);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let spec = run_binary_env("v3r", &[&run[..], &["--speculative"]].concat(), &env);
    assert!(spec.status.success(), "{}", text(&spec.stderr));
    assert_eq!(text(&spec.stdout), text(&plain.stdout));
    assert_eq!(text(&plain.stdout).split_whitespace().count(), 30);
    // "speculative: A of D MTP drafts accepted"
    let err = text(&spec.stderr);
    let said = err.split("speculative: ").nth(1).expect(&err);
    let nums: Vec<usize> = said.split_whitespace().filter_map(|w| w.parse().ok()).take(2).collect();
    assert!(nums[1] > 0 && 2 * nums[0] >= nums[1], "{err}");
    // Three drafts a pass, chained through the MTP module's own hidden state: the same tokens.
    let chained = run_binary_env("v3r", &[&run[..], &["--speculative", "--draft-tokens", "3"]].concat(), &env);
    assert!(chained.status.success(), "{}", text(&chained.stderr));
    assert_eq!(text(&chained.stdout), text(&plain.stdout));
    eprintln!("one draft a pass: {}three: {}", err.split("speculative: ").nth(1).unwrap(), text(&chained.stderr));
    // Sampling: speculative sampling's tokens (their distribution is plain sampling's: the
    // runtime's unit tests), the same for the same seed, drafts accepted.
    let hot = [&run[..], &["--speculative", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]].concat();
    let (first, again) = (run_binary_env("v3r", &hot, &env), run_binary_env("v3r", &hot, &env));
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(text(&first.stdout), text(&again.stdout));
    assert_eq!(text(&first.stdout).split_whitespace().count(), 30);
    assert!(text(&first.stderr).contains("MTP drafts accepted"), "{}", text(&first.stderr));
    // Served, requests in turn: each gets the tokens `v3r run` gives it alone (with two drafts a
    // pass; a repetition penalty shaping them as it does there), its drafts' counts and, where
    // asked, its tokens' log-probabilities; one too long is refused with the reason; the summary
    // says the drafts' acceptance.
    let alone = |prompt: &str, n: &str, more: &[&str]| {
        let args = ["run", &s(&art), "--weights", &s(&trained), "--prompt-tokens", prompt, "--max-new-tokens", n];
        let out = run_binary_env("v3r", &[&args[..], &["--ignore-eos"], more].concat(), &env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).split_whitespace().map(|t| t.parse::<u64>().unwrap()).collect::<Vec<_>>()
    };
    let lines = [
        r#"{"id": "a", "prompt": [5, 9, 12, 30, 7, 44, 5, 9], "max_new_tokens": 30}"#,
        r#"{"id": "b", "prompt": [12, 30], "max_new_tokens": 10, "logprobs": true}"#,
        r#"{"id": "c", "prompt": [5], "max_new_tokens": 12, "repetition_penalty": 1.2}"#,
        r#"{"id": "d", "prompt": [5], "max_new_tokens": 63}"#,
        r#"{"id": "e", "prompt": [5, 9, 12, 30, 7, 44, 5, 9], "max_new_tokens": 30, "echo": true, "logprobs": true}"#,
    ];
    let speculative = ["--speculative", "--draft-tokens", "2", "--ignore-eos"];
    let served = serve_stdin(&art, &trained, &cache, &speculative, &(lines.join("\n") + "\n"));
    assert!(served.status.success(), "{}", text(&served.stderr));
    let replies = replies_by_id(&served.stdout);
    let tokens = |id: &str| -> Vec<u64> {
        let reply = &replies[id];
        reply["tokens"].as_array().unwrap_or_else(|| panic!("{reply}")).iter().map(|t| t.as_u64().unwrap()).collect()
    };
    assert_eq!(tokens("a"), alone("5 9 12 30 7 44 5 9", "30", &[]));
    assert_eq!(tokens("b"), alone("12 30", "10", &[]));
    assert_eq!(tokens("c"), alone("5", "12", &["--repetition-penalty", "1.2"]));
    let drafts = &replies["a"]["speculation"];
    assert!(drafts["drafted"].as_u64() > Some(0) && drafts["passes"].as_u64() > Some(0), "{drafts}");
    let logprobs = replies["b"]["logprobs"].as_array().unwrap();
    assert!(logprobs.len() == 10 && logprobs.iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)), "{logprobs:?}");
    assert!(replies["d"]["error"].as_str().unwrap().contains("1 + 63 tokens"), "{}", replies["d"]);
    // Echoed, the prompt's tokens scored (every row of its logits read back; other prompts read
    // their last row alone): the tokens of the same prompt unscored.
    assert_eq!(tokens("e"), tokens("a"));
    let scored = replies["e"]["prompt_logprobs"].as_array().unwrap_or_else(|| panic!("{}", replies["e"]));
    assert!(scored.len() == 7 && scored.iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)), "{scored:?}");
    assert!(text(&served.stderr).contains("MTP drafts accepted"), "{}", text(&served.stderr));
    let batched = serve_stdin(&art, &trained, &cache, &["--speculative", "--batch", "2"], "");
    assert!(text(&batched.stderr).contains("--batch 2 with --speculative"), "{}", text(&batched.stderr));
    // `v3r chat --speculative`: two turns, the replies plain chat gives.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/tokenizer.json");
    let chat_args = ["--tokenizer", fixture.to_str().unwrap(), "--max-new-tokens", "5", "--ignore-eos"];
    let plain_chat = v3r_stdin("chat", &art, &trained, &cache, &chat_args, b"Hello!\na\n");
    let spec_args = [&chat_args[..], &speculative[..3]].concat();
    let spec_chat = v3r_stdin("chat", &art, &trained, &cache, &spec_args, b"Hello!\na\n");
    assert!(plain_chat.status.success() && spec_chat.status.success(), "{}", text(&spec_chat.stderr));
    assert_eq!(text(&spec_chat.stdout), text(&plain_chat.stdout));
    assert_eq!(text(&spec_chat.stdout).lines().count(), 2, "{}", text(&spec_chat.stdout));
    // bench-serve speculatively: the drafts' acceptance among its figures.
    let art_path = s(&art);
    let bench = ["bench-serve", &art_path, "--random-weights", "1", "--requests", "3", "--prompt-tokens", "4..8"];
    let bench = [&bench[..], &["--new-tokens", "6"], &speculative[..3]].concat();
    let out = run_binary_env("v3r", &bench, &env);
    let said = text(&out.stdout);
    assert!(out.status.success() && said.contains("MTP drafts"), "{said}{}", text(&out.stderr));
    // Several prompts: in turn, each its greedy tokens (those of the prompts as a batch).
    let two = [&run[..], &["--prompt-tokens", "5 9"]].concat();
    let (batched, spec) =
        (run_binary_env("v3r", &two, &env), run_binary_env("v3r", &[&two[..], &["--speculative"]].concat(), &env));
    assert!(spec.status.success() && batched.status.success(), "{}", text(&spec.stderr));
    assert_eq!(text(&spec.stdout), text(&batched.stdout));
    assert_eq!((text(&spec.stdout).lines().count(), text(&spec.stderr).matches("MTP drafts accepted").count()), (2, 2));
    let batch = run_binary_env("v3r", &[&two[..], &["--speculative", "--batch", "2"]].concat(), &env);
    assert!(text(&batch.stderr).contains("--batch 2 with --speculative"), "{}", text(&batch.stderr));
    // An artifact without a draft entry says how to get one.
    let plain_art = dir.path().join("plain");
    let compile = ["compile", "--model", &s(&trained), "--target", "cpu", "--max-rows", "8", "--max-context", "64"];
    let out = run_binary_env("v3c", &[&compile[..], &["--out", &s(&plain_art)]].concat(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut no_draft = run.clone();
    no_draft[1] = plain_art.to_str().unwrap();
    let out = run_binary_env("v3r", &[&no_draft[..], &["--speculative"]].concat(), &env);
    assert!(text(&out.stderr).contains("compile it with `v3c compile --speculative`"), "{}", text(&out.stderr));
}

/// SIGTERM stops `v3r serve --http` gracefully: the request streaming goes on to its end, the
/// server says it is unhealthy and refuses new requests (503) meanwhile, then it ends (exit 0,
/// its summary said).
#[test]
fn v3r_serve_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (art, ckpt, cache) = (dir.path().join("art"), dir.path().join("ckpt"), dir.path().join("cache"));
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 3).unwrap();
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let compile = ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--max-context", "320"];
    let out = run_binary_env("v3c", &[&compile[..], &["--out", art.to_str().unwrap()]].concat(), &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = v3c_tests::HttpServer::start(&[art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()], &env);
    // A long stream, its first chunk read before the signal.
    let body = r#"{"prompt": [1, 2, 3], "max_tokens": 300, "ignore_eos": true, "stream": true}"#;
    let mut c = std::net::TcpStream::connect(&server.addr).unwrap();
    let request = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    std::io::Write::write_all(&mut c, request.as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(c);
    let mut streamed = String::new();
    while !streamed.contains("data: ") {
        assert!(std::io::BufRead::read_line(&mut reader, &mut streamed).unwrap() > 0, "{streamed}");
    }
    server.signal("TERM");
    let (health, _) = server.request("GET", "/health", "");
    assert_eq!(health, "HTTP/1.1 503 Service Unavailable");
    let (status, refused) = server.request("POST", "/v1/completions", r#"{"prompt": [1], "max_tokens": 2}"#);
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{refused}");
    assert!(refused.contains("the server is stopping"), "{refused}");
    std::io::Read::read_to_string(&mut reader, &mut streamed).unwrap();
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
    let chunks = v3c_tests::HttpServer::events(streamed.split_once("\r\n\r\n").unwrap().1);
    let tokens: usize = chunks.iter().map(|c| c["choices"][0]["tokens"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!((tokens, &chunks.last().unwrap()["choices"][0]["finish_reason"]), (300, &"length".into()));
    let (ended, said) = server.wait();
    assert!(ended.success(), "{ended:?}: {said}");
    assert!(said.contains("stopping: no new requests") && said.contains("served 1 requests"), "{said}");
}

/// Tool calling end to end, on a model whose vocabulary holds DeepSeek-V3's tool markers (the
/// fixture tokenizer's, ids 971..979) and with its chat template: over HTTP, `tool_choice`
/// required (one call) and a named function (streamed) give well-formed calls — the message's
/// `tool_calls` (streamed: one `tool_calls` delta), content null, `finish_reason` tool_calls —
/// whose arguments are instances of their function's schema; `none` never opens calls; a serve
/// line from stdin gets its calls too; `v3r chat --tools` prints calls and reads their outputs.
/// DeepSeek-R1's reasoning told from the answer (`--reasoning-parser`), whole and streamed.
#[test]
fn v3r_serves_tool_calls_and_reasoning() {
    let dir = tempfile::tempdir().unwrap();
    let (art, ckpt, cache) = (dir.path().join("art"), dir.path().join("ckpt"), dir.path().join("cache"));
    let config = ModelConfig { vocab_size: 1024, ..ModelConfig::preset("deepseek-v3-tiny").unwrap() };
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 11).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures.join(file), ckpt.join(file)).unwrap();
    }
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let compile = ["compile", "--model", ckpt.to_str().unwrap(), "--target", "cpu", "--max-rows", "4"];
    let out = run_binary_env(
        "v3c",
        &[&compile[..], &["--max-context", "640", "--out", art.to_str().unwrap()]].concat(),
        &env,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ]);
    let messages = serde_json::json!([{"role": "user", "content": "Weather in Paris?"}]);
    // A call's function is a given one, its arguments an instance of its schema.
    let check_call = |call: &serde_json::Value, only: Option<&str>| {
        let (name, arguments) =
            (call["function"]["name"].as_str().unwrap(), call["function"]["arguments"].as_str().unwrap());
        let args: serde_json::Map<String, serde_json::Value> = serde_json::from_str(arguments).unwrap();
        match name {
            "get_weather" => {
                assert!(["Paris", "Oslo"].contains(&args["city"].as_str().unwrap()), "{call}");
                assert!(args.keys().all(|k| k == "city" || k == "unit"), "{call}");
            }
            "now" => assert!(args.is_empty(), "{call}"),
            other => panic!("{other}"),
        }
        assert!(only.is_none_or(|f| f == name), "{call}");
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    };
    let named = ["--served-model-name", "tiny-tools"];
    let server = v3c_tests::HttpServer::start(
        &[&[art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()][..], &named].concat(),
        &env,
    );
    let (_, models) = server.request("GET", "/v1/models", "");
    assert!(models.contains(r#""id":"tiny-tools""#), "{models}");
    let chat = |extra: serde_json::Value| {
        let mut body =
            serde_json::json!({"messages": messages, "tools": tools, "max_tokens": 120, "temperature": 1, "seed": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, reply) = server.request("POST", "/v1/chat/completions", &body.to_string());
        assert_eq!(status, "HTTP/1.1 200 OK", "{reply}");
        reply
    };
    for seed in [5, 6] {
        let reply = chat(serde_json::json!({"tool_choice": "required", "parallel_tool_calls": false, "seed": seed}));
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        let choice = &v["choices"][0];
        assert_eq!(v["model"], "tiny-tools");
        assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
        assert!(choice["message"]["content"].is_null(), "{reply}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{reply}");
        check_call(&calls[0], None);
    }
    let named = serde_json::json!({"type": "function", "function": {"name": "get_weather"}});
    let streamed = chat(serde_json::json!({"tool_choice": named, "stream": true}));
    let chunks = v3c_tests::HttpServer::events(&streamed);
    let deltas: Vec<&serde_json::Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    // The calls as a client puts them together: an index's first delta names the call, the
    // others add to its arguments — streamed as they are written, in more than one delta.
    let pieces: Vec<&serde_json::Value> =
        deltas.iter().filter_map(|d| d.get("tool_calls")).flat_map(|c| c.as_array().unwrap()).collect();
    let mut merged: Vec<serde_json::Value> = Vec::new();
    for d in &pieces {
        let i = d["index"].as_u64().unwrap() as usize;
        if i == merged.len() {
            let mut first = (*d).clone();
            first.as_object_mut().unwrap().remove("index");
            merged.push(first);
        } else {
            let more = d["function"]["arguments"].as_str().unwrap();
            let all = merged[i]["function"]["arguments"].as_str().unwrap().to_string() + more;
            merged[i]["function"]["arguments"] = all.into();
        }
    }
    assert!(pieces.len() > 2 && !merged.is_empty(), "{streamed}");
    check_call(&merged[0], Some("get_weather"));
    // The same calls as the whole reply's.
    let whole: serde_json::Value = serde_json::from_str(&chat(serde_json::json!({"tool_choice": named}))).unwrap();
    let functions = |calls: &[serde_json::Value]| calls.iter().map(|c| c["function"].clone()).collect::<Vec<_>>();
    assert_eq!(functions(&merged), functions(whole["choices"][0]["message"]["tool_calls"].as_array().unwrap()));
    assert!(deltas.iter().all(|d| d.get("content").is_none_or(|c| c == "")), "{streamed}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls", "{streamed}");
    // The Responses API: its flat function tools, the calls as function_call items (whole, and
    // streamed: each added, its arguments, done), their outputs fed back as input items.
    let functions: Vec<serde_json::Value> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let mut f = t["function"].clone();
            f["type"] = "function".into();
            f
        })
        .collect();
    let respond = |body: serde_json::Value| {
        let (status, reply) = server.request("POST", "/v1/responses", &body.to_string());
        assert_eq!(status, "HTTP/1.1 200 OK", "{reply}");
        reply
    };
    let body = serde_json::json!({"input": messages, "tools": functions, "tool_choice": "required",
        "max_output_tokens": 120, "temperature": 1, "seed": 5});
    let reply: serde_json::Value = serde_json::from_str(&respond(body)).unwrap();
    assert_eq!(
        (&reply["object"], &reply["status"], &reply["model"]),
        (&"response".into(), &"completed".into(), &"tiny-tools".into())
    );
    let items = reply["output"].as_array().unwrap();
    assert!(!items.is_empty() && items.iter().all(|i| i["type"] == "function_call"), "{reply}");
    let as_chat = |i: &serde_json::Value| serde_json::json!({"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}});
    for item in items {
        check_call(&as_chat(item), None);
    }
    let mut fed: Vec<serde_json::Value> = messages.as_array().unwrap().clone();
    fed.extend(items.iter().cloned());
    fed.extend(
        items
            .iter()
            .map(|i| serde_json::json!({"type": "function_call_output", "call_id": i["call_id"], "output": "sunny"})),
    );
    let body = serde_json::json!({"input": fed, "tools": functions, "max_output_tokens": 8, "temperature": 0});
    let next: serde_json::Value = serde_json::from_str(&respond(body)).unwrap();
    assert!(
        next["usage"]["input_tokens"].as_u64().unwrap() > reply["usage"]["input_tokens"].as_u64().unwrap(),
        "{next}"
    );
    // The same turn on the stored response: the conversation the store rebuilds is the one sent
    // whole (the same prompt, so the same greedy reply).
    let outputs: Vec<serde_json::Value> = fed[messages.as_array().unwrap().len() + items.len()..].to_vec();
    let body = serde_json::json!({"previous_response_id": reply["id"], "input": outputs, "tools": functions,
        "max_output_tokens": 8, "temperature": 0});
    let chained: serde_json::Value = serde_json::from_str(&respond(body)).unwrap();
    assert_eq!(chained["previous_response_id"], reply["id"]);
    for k in ["input_tokens", "output_tokens"] {
        assert_eq!(chained["usage"][k], next["usage"][k], "{k}: {chained} against {next}");
    }
    let text = |r: &serde_json::Value| {
        r["output"].as_array().unwrap().iter().map(|i| i["content"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(text(&chained), text(&next));
    // Retrieved, deleted, then gone; a response not stored is not kept.
    let id = reply["id"].as_str().unwrap();
    let (status, kept) = server.request("GET", &format!("/v1/responses/{id}"), "");
    assert_eq!(
        (status.as_str(), serde_json::from_str::<serde_json::Value>(&kept).unwrap()),
        ("HTTP/1.1 200 OK", reply.clone())
    );
    // Its input items, the last given first, and a page of the first one.
    let given = messages.as_array().unwrap();
    let (status, listed) = server.request("GET", &format!("/v1/responses/{id}/input_items"), "");
    assert_eq!(status, "HTTP/1.1 200 OK", "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), given.len().min(20), "{listed}");
    assert_eq!((&data[0]["type"], &data[0]["role"]), (&"message".into(), &given[given.len() - 1]["role"]));
    let (_, first) = server.request("GET", &format!("/v1/responses/{id}/input_items?order=asc&limit=1"), "");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (first["data"][0]["role"].clone(), first["has_more"].clone()),
        (given[0]["role"].clone(), (given.len() > 1).into())
    );
    let (status, deleted) = server.request("DELETE", &format!("/v1/responses/{id}"), "");
    assert_eq!(status, "HTTP/1.1 200 OK", "{deleted}");
    assert!(deleted.contains("\"deleted\":true"), "{deleted}");
    assert_eq!(server.request("GET", &format!("/v1/responses/{id}"), "").0, "HTTP/1.1 404 Not Found");
    let (status, gone) = server.request(
        "POST",
        "/v1/responses",
        &serde_json::json!({"previous_response_id": id, "input": "x"}).to_string(),
    );
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(gone.contains("is not a response kept here"), "{gone}");
    let unstored: serde_json::Value = serde_json::from_str(&respond(serde_json::json!({"input": "x", "store": false,
        "max_output_tokens": 2})))
    .unwrap();
    assert_eq!(unstored["store"], false);
    assert_eq!(
        server.request("GET", &format!("/v1/responses/{}", unstored["id"].as_str().unwrap()), "").0,
        "HTTP/1.1 404 Not Found"
    );
    let body = serde_json::json!({"input": messages, "tools": functions, "max_output_tokens": 120, "stream": true,
        "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 1, "seed": 5});
    let events = v3c_tests::HttpServer::events(&respond(body));
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
    assert!(events.iter().enumerate().all(|(k, e)| e["sequence_number"] == k), "{kinds:?}");
    let done: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["type"] == "response.output_item.done").map(|e| &e["item"]).collect();
    assert_eq!(done.len(), kinds.iter().filter(|k| **k == "response.output_item.added").count());
    assert_eq!(done[0]["type"], "function_call", "{kinds:?}");
    check_call(&as_chat(done[0]), Some("get_weather"));
    let final_items = events.last().unwrap()["response"]["output"].as_array().unwrap();
    assert_eq!(final_items.iter().collect::<Vec<_>>(), done);
    // A streamed response is kept too: as its last event says.
    let streamed_id = events.last().unwrap()["response"]["id"].as_str().unwrap();
    let (status, kept) = server.request("GET", &format!("/v1/responses/{streamed_id}"), "");
    assert_eq!(status, "HTTP/1.1 200 OK", "{kept}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&kept).unwrap(), events.last().unwrap()["response"]);
    // Anthropic's Messages API: tools with an input_schema, the calls as tool_use blocks
    // (whole, and streamed: the input as one input_json_delta), stop_reason tool_use.
    let anthropic: Vec<serde_json::Value> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| serde_json::json!({"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}))
        .collect();
    let send = |body: serde_json::Value| {
        let (status, reply) = server.request("POST", "/v1/messages", &body.to_string());
        assert_eq!(status, "HTTP/1.1 200 OK", "{reply}");
        reply
    };
    let as_call = |id: &serde_json::Value, name: &serde_json::Value, input: &str| serde_json::json!({"id": id, "type": "function", "function": {"name": name, "arguments": input}});
    let body = serde_json::json!({"messages": messages, "tools": anthropic, "tool_choice": {"type": "any"},
        "max_tokens": 120, "temperature": 1, "seed": 5});
    let reply: serde_json::Value = serde_json::from_str(&send(body)).unwrap();
    assert_eq!((&reply["type"], &reply["stop_reason"]), (&"message".into(), &"tool_use".into()), "{reply}");
    let blocks = reply["content"].as_array().unwrap();
    assert!(!blocks.is_empty() && blocks.iter().all(|b| b["type"] == "tool_use"), "{reply}");
    for b in blocks {
        check_call(&as_call(&b["id"], &b["name"], &b["input"].to_string()), None);
    }
    let body = serde_json::json!({"messages": messages, "tools": anthropic, "max_tokens": 120, "stream": true,
        "tool_choice": {"type": "tool", "name": "get_weather"}, "temperature": 1, "seed": 5});
    let events = v3c_tests::HttpServer::events(&send(body));
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!((kinds.first(), kinds.last()), (Some(&"message_start"), Some(&"message_stop")), "{kinds:?}");
    let start = events.iter().find(|e| e["type"] == "content_block_start").unwrap();
    assert_eq!(start["content_block"]["type"], "tool_use", "{kinds:?}");
    let input: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .map(|e| e["delta"]["partial_json"].as_str().unwrap())
        .collect();
    check_call(&as_call(&start["content_block"]["id"], &start["content_block"]["name"], &input), Some("get_weather"));
    let end = events.iter().find(|e| e["type"] == "message_delta").unwrap();
    assert_eq!(end["delta"]["stop_reason"], "tool_use");
    let none = chat(serde_json::json!({"tool_choice": "none", "max_tokens": 40}));
    let v: serde_json::Value = serde_json::from_str(&none).unwrap();
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{none}");
    assert!(!v["choices"][0]["tokens"].as_array().unwrap().contains(&971.into()), "{none}");
    // A serve line: the calls in its reply line.
    let line = serde_json::json!({"messages": messages, "tools": tools, "tool_choice": "required", "id": "t",
        "parallel_tool_calls": false, "max_new_tokens": 120});
    let out = serve_stdin(&art, &ckpt, &cache, &[], &format!("{line}\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["finish_reason"], "tool_calls", "{reply}");
    check_call(&reply["tool_calls"][0], None);
    // `v3r chat --tools`: a call printed, its output read from the next line, the model going on
    // (called again: every reply must call); an unknown function's name refused.
    let tools_file = dir.path().join("tools.json");
    std::fs::write(&tools_file, tools.to_string()).unwrap();
    let chat = |choice: &str, input: &[u8]| {
        let args = ["--max-new-tokens", "120", "--tools", tools_file.to_str().unwrap(), "--tool-choice", choice];
        v3r_stdin("chat", &art, &ckpt, &cache, &[&args[..], &["--temperature", "1"]].concat(), input)
    };
    let out = chat("get_weather", b"Weather in Paris?\n21C and sunny\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let calls: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tool call ")).collect();
    assert_eq!(calls.len(), 2, "{stdout}");
    for (k, line) in calls.iter().enumerate() {
        let (id, rest) = line["tool call ".len()..].split_once(": ").unwrap();
        let (name, arguments) = rest.split_once(' ').unwrap();
        let call =
            serde_json::json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
        check_call(&call, Some("get_weather"));
        assert_eq!(id, format!("call_{k}_0"));
    }
    let refused = chat("get_time", b"x\n");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("tool_choice: get_time is not among the tools"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // `--reasoning-parser deepseek-r1` with a template that opens the <think> itself (as R1's):
    // the reply's reasoning is its text before the first </think> (made likely by a bias), its
    // content the rest — whole, and streamed (the deltas adding up to the same, seed for seed).
    let template = dir.path().join("r1.jinja");
    std::fs::write(
        &template,
        "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜><think>\n",
    )
    .unwrap();
    let weights = ckpt.to_str().unwrap();
    let args = [art.to_str().unwrap(), "--weights", weights, "--chat-template", template.to_str().unwrap()];
    let server = v3c_tests::HttpServer::start(&[&args[..], &["--reasoning-parser", "deepseek-r1"]].concat(), &env);
    let tokenizer = v3c_runtime::tokenizer::Tokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let end = tokenizer.token_id("</think>").unwrap();
    let body = |stream: bool| {
        serde_json::json!({"messages": messages, "max_tokens": 24, "temperature": 1, "seed": 9, "stream": stream,
            "logit_bias": {end.to_string(): 3}})
        .to_string()
    };
    let (_, whole) = server.request("POST", "/v1/chat/completions", &body(false));
    let whole: serde_json::Value = serde_json::from_str(&whole).unwrap();
    let tokens: Vec<u32> =
        whole["choices"][0]["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let k = tokens.iter().position(|&t| t == end).expect("a </think> among the tokens");
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], tokenizer.decode(&tokens[..k], true), "{whole}");
    assert_eq!(message["content"], tokenizer.decode(&tokens[k + 1..], true), "{whole}");
    let (_, streamed) = server.request("POST", "/v1/chat/completions", &body(true));
    let deltas: Vec<serde_json::Value> =
        v3c_tests::HttpServer::events(&streamed).iter().map(|c| c["choices"][0]["delta"].clone()).collect();
    let joined = |key: &str| deltas.iter().filter_map(|d| d[key].as_str()).collect::<String>();
    assert_eq!(
        (joined("reasoning_content"), joined("content")),
        (message["reasoning_content"].as_str().unwrap().to_string(), message["content"].as_str().unwrap().to_string()),
        "{streamed}"
    );
    // The Responses API over the same completion: a reasoning item, then the message — whole,
    // and streamed (each item added then done, the deltas adding up to the whole).
    let response_body = |stream: bool| {
        serde_json::json!({"input": messages, "max_output_tokens": 24, "temperature": 1, "seed": 9, "stream": stream,
            "logit_bias": {end.to_string(): 3}})
        .to_string()
    };
    let (_, r) = server.request("POST", "/v1/responses", &response_body(false));
    let r: serde_json::Value = serde_json::from_str(&r).unwrap();
    let output = r["output"].as_array().unwrap();
    assert_eq!((&output[0]["type"], &output[1]["type"]), (&"reasoning".into(), &"message".into()), "{r}");
    assert_eq!(output[0]["content"][0]["text"], message["reasoning_content"], "{r}");
    assert_eq!(output[1]["content"][0]["text"], message["content"], "{r}");
    assert_eq!(r["usage"]["output_tokens_details"]["reasoning_tokens"], k, "{r}");
    let incomplete = whole["choices"][0]["finish_reason"] == "length";
    assert_eq!(r["status"], if incomplete { "incomplete" } else { "completed" }, "{r}");
    let (_, streamed) = server.request("POST", "/v1/responses", &response_body(true));
    let events = v3c_tests::HttpServer::events(&streamed);
    let deltas = |kind: &str| {
        events.iter().filter(|e| e["type"] == kind).map(|e| e["delta"].as_str().unwrap()).collect::<String>()
    };
    assert_eq!(deltas("response.reasoning_text.delta"), message["reasoning_content"].as_str().unwrap(), "{streamed}");
    assert_eq!(deltas("response.output_text.delta"), message["content"].as_str().unwrap(), "{streamed}");
    let last = &events.last().unwrap()["response"];
    let texts = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        r["output"].as_array().unwrap().iter().map(|i| i["content"][0]["text"].clone()).collect()
    };
    assert_eq!((texts(last), &last["status"]), (texts(&r), &r["status"]), "{streamed}");
    // And Anthropic's: a thinking block, then the text — whole, and streamed.
    let message_body = |stream: bool| {
        serde_json::json!({"messages": messages, "max_tokens": 24, "temperature": 1, "seed": 9, "stream": stream,
            "logit_bias": {end.to_string(): 3}})
        .to_string()
    };
    let (_, m) = server.request("POST", "/v1/messages", &message_body(false));
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(
        m["content"][0],
        serde_json::json!({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    );
    assert_eq!(m["content"][1], serde_json::json!({"type": "text", "text": message["content"]}), "{m}");
    assert_eq!(m["stop_reason"], if incomplete { "max_tokens" } else { "end_turn" }, "{m}");
    let (_, streamed) = server.request("POST", "/v1/messages", &message_body(true));
    let events = v3c_tests::HttpServer::events(&streamed);
    let deltas = |kind: &str, field: &str| {
        events
            .iter()
            .filter(|e| e["delta"]["type"] == kind)
            .map(|e| e["delta"][field].as_str().unwrap())
            .collect::<String>()
    };
    assert_eq!(deltas("thinking_delta", "thinking"), message["reasoning_content"].as_str().unwrap(), "{streamed}");
    assert_eq!(deltas("text_delta", "text"), message["content"].as_str().unwrap(), "{streamed}");
    drop(server);
    // Without the parser, all of it is content.
    let server = v3c_tests::HttpServer::start(&args, &env);
    let (_, plain) = server.request("POST", "/v1/chat/completions", &body(false));
    let plain: serde_json::Value = serde_json::from_str(&plain).unwrap();
    assert!(plain["choices"][0]["message"].get("reasoning_content").is_none(), "{plain}");
    assert_eq!(plain["choices"][0]["message"]["content"], tokenizer.decode(&tokens, true));
    drop(server);
    // `v3r chat --reasoning-parser`: the reasoning on stderr, the answer on stdout — what serve
    // parts the same completion into (a chat's first turn is seeded --seed + 1). The bias on
    // </think> (a flag here) makes one likely; this seed gives both parts.
    let template = template.to_str().unwrap();
    let parser = ["--chat-template", template, "--reasoning-parser", "deepseek-r1", "--temperature", "1"];
    let bias = format!("{end}=2.5");
    let line = format!(
        "{}\n",
        serde_json::json!({"messages": messages, "max_new_tokens": 24, "seed": 1, "logit_bias": {end.to_string(): 2.5}})
    );
    let served = v3r_stdin("serve", &art, &ckpt, &cache, &parser, line.as_bytes());
    let served: serde_json::Value = serde_json::from_slice(&served.stdout).unwrap();
    let (reasoning, text) = (served["reasoning_content"].as_str().unwrap(), served["text"].as_str().unwrap());
    assert!(!reasoning.is_empty() && !text.is_empty(), "{served}");
    let flags = [&parser[..], &["--max-new-tokens", "24", "--seed", "0", "--logit-bias", &bias]].concat();
    let chatted = v3r_stdin("chat", &art, &ckpt, &cache, &flags, b"Weather in Paris?\n");
    assert!(chatted.status.success(), "{}", String::from_utf8_lossy(&chatted.stderr));
    assert_eq!(String::from_utf8_lossy(&chatted.stdout), format!("{text}\n"));
    let stderr = String::from_utf8_lossy(&chatted.stderr);
    assert!(stderr.contains(&format!("{reasoning}\n")), "{stderr}");
    assert!(!stderr.contains(text), "{stderr}");
}
