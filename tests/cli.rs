//! Behaviour of the `v3c` and `v3r` command lines: help that teaches, one-line usage errors with
//! exit code 2, doctor reports that work with and without a GPU, clean errors for bad paths.

use std::path::Path;

use v3c_tests::{candidates_launch_as_their_ptx_declares, gpu_or_skip, run_binary, run_binary_env};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn v3c_help_lists_every_subcommand() {
    let out = run_binary("v3c", &["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for sub in ["compile", "dump-ir", "logits", "run", "tune", "init-weights", "doctor", "cache"] {
        assert!(help.contains(&format!("  {sub} ")), "missing {sub} in:\n{help}");
    }
    assert!(help.contains("Examples:"), "{help}");
}

#[test]
fn v3r_help_lists_every_subcommand() {
    let out = run_binary("v3r", &["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for sub in ["info", "run", "doctor"] {
        assert!(help.contains(&format!("  {sub} ")), "missing {sub} in:\n{help}");
    }
}

#[test]
fn usage_errors_are_one_line_with_exit_code_2() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("v3c", &["--bogus"], "v3c: error: unexpected argument '--bogus' found"),
        ("v3c", &["compile", "--target", "sm_80"], "unknown target 'sm_80' (known: sm_90a, cpu)"),
        ("v3c", &["dump-ir", "--stage", "llvm"], "invalid value 'llvm' for '--stage <STAGE>'"),
        ("v3c", &["compile", "--decode-attention", "fast"], "invalid value 'fast' for '--decode-attention <WHERE>'"),
        ("v3c", &["logits", "--tokens", "1 2"], "the following required arguments were not provided"),
        (
            "v3c",
            &["run", "--model-dir", "x", "--prompt-tokens", "1", "--max-new-tokens", "-3"],
            "invalid value '-3' for '--max-new-tokens <N>': invalid digit found in string",
        ),
        // Counts there must be at least one of; before, a plan for 0 rows was written.
        ("v3c", &["compile", "--max-rows", "0"], "invalid value '0' for '--max-rows <N>': must be at least 1"),
        ("v3c", &["compile", "--max-batch", "0"], "invalid value '0' for '--max-batch <N>': must be at least 1"),
        ("v3c", &["compile", "-j", "0"], "invalid value '0' for '--jobs <N>': must be at least 1"),
        ("v3c", &["dump-ir", "--max-context", "0"], "invalid value '0' for '--max-context <N>': must be at least 1"),
        // Sizes whose plan overflowed 64-bit byte counts: before, `--max-rows 4611686018427387904`
        // wrote a plan with a wrapped 4.7 MB arena.
        (
            "v3c",
            &["compile", "--max-rows", "4611686018427387904"],
            "invalid value '4611686018427387904' for '--max-rows <N>': must be at most 16777216 (2^24)",
        ),
        ("v3c", &["compile", "--max-context", "16777217"], "'--max-context <N>': must be at most 16777216 (2^24)"),
        ("v3c", &["dump-ir", "--max-batch", "16777217"], "'--max-batch <N>': must be at most 16777216 (2^24)"),
        ("v3r", &["bench-kernels", "art", "--weights", "w", "--reps", "0"], "invalid value '0' for '--reps <N>'"),
        ("v3r", &["doctor", "--verbose-ish"], "v3r: error: unexpected argument '--verbose-ish' found"),
        ("v3r", &["run", "art", "--weights", "w", "--prompt-tokens", "1", "--device", "gpu0"], "invalid value 'gpu0'"),
    ];
    for (tool, args, expected) in cases {
        let out = run_binary(tool, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{tool} {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{tool} {args:?} printed more than one line:\n{err}");
        assert!(err.contains(expected), "{tool} {args:?}: expected '{expected}' in: {err}");
        assert!(out.stdout.is_empty(), "{tool} {args:?} wrote to stdout");
    }
}

/// A negative number is a flag's value, refused (exit 1) by what checks it, naming the flag and
/// the range; before, clap took `-1` for an unknown flag. Nothing is read or compiled first.
#[test]
fn negative_values_are_refused_by_their_checks() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "v3c",
            &["run", "--model-dir", "x", "--prompt-tokens", "1", "--temperature", "-1"],
            "--temperature -1 must be >= 0",
        ),
        (
            "v3c",
            &["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--train", "--balance-alpha", "-0.5"],
            "--balance-alpha -0.5: must be a finite number >= 0",
        ),
        (
            "v3r",
            &["run", "x", "--weights", "w", "--prompt-tokens", "1", "--top-p", "-1"],
            "--top-p -1 must be in (0, 1]",
        ),
    ];
    for (tool, args, expected) in cases {
        let out = run_binary(tool, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{tool} {args:?}: {err}");
        assert_eq!(err.trim_end(), format!("{tool}: error: {expected}"), "{tool} {args:?}");
    }
}

/// Where attention runs is a GPU target's choice: on the CPU target the flags are refused in one
/// line, before anything is compiled.
#[test]
fn attention_flags_are_for_gpu_targets() {
    for flag in ["--prefill-attention", "--decode-attention"] {
        let out = run_binary("v3c", &["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", flag, "rows"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(
            err.trim_end(),
            "v3c: error: --prefill-attention / --decode-attention: the CPU backend's attention is one kernel (GPU \
             targets only)"
        );
    }
}

#[test]
fn v3r_doctor_reports_cleanly_on_any_machine() {
    let out = run_binary("v3r", &["doctor"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("CUDA driver:"), "{report}");
    assert!(report.contains("GPU:"), "{report}");
    assert!(!text(&out.stderr).contains("panicked"));

    let json = run_binary("v3r", &["doctor", "--json"]);
    assert_eq!(json.status.code(), Some(0));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("doctor --json prints JSON");
    assert!(value["devices"].is_array());
    match gpu_or_skip("v3r_doctor_lists_the_gpu") {
        Some(device) => assert_eq!(value["devices"][0]["name"], device.name.as_str()),
        None => assert!(value["problem"].as_str().unwrap().starts_with("no CUDA")),
    }
}

#[test]
fn v3c_doctor_checks_the_toolchain_and_exits_0() {
    let out = run_binary("v3c", &["doctor"]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}{}", text(&out.stderr));
    assert!(report.contains("ok  LLVM "), "{report}");
    assert!(report.contains("ok  MLIR "), "{report}");
    assert!(report.contains("ok  LLVM -> PTX sm_90a"), "{report}");
    assert!(report.contains("CUDA driver"), "{report}");
    // ptxas is either found (then the cubin line exists) or reported with what is lost.
    assert!(
        report.contains("ok  PTX -> cubin sm_90a") || report.contains("no ptxas: emitting PTX only, no cubin"),
        "{report}"
    );
    // Tests run with the kernel cache off; a named cache is reported with what it holds.
    assert!(report.contains("ok  kernel cache         off (V3C_KERNEL_CACHE=off"), "{report}");
    let dir = tempfile::tempdir().unwrap();
    let out = run_binary_env("v3c", &["doctor"], &[("V3C_KERNEL_CACHE", dir.path().to_str().unwrap())]);
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!(
            "kernel cache         {}: 0 CPU kernels, 0 PTX, 0 cubins, 0.0 MiB",
            dir.path().display()
        )),
        "{report}"
    );
}

#[test]
fn runtime_commands_reject_missing_artifacts_by_path() {
    let out = run_binary("v3r", &["info", "/nonexistent/artifact"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).trim_end(), "v3r: error: /nonexistent/artifact: no such artifact directory");
    let dir = std::env::temp_dir().join(format!("v3c-cli-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = run_binary("v3r", &["info", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("manifest.json: missing (not a v3c artifact)"), "{}", text(&out.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

/// `v3r info` validates an artifact before anything runs: a byte flipped in any file, a missing file,
/// corrupt JSON, another format version, a tampered model config or a GPU target without its lowering is
/// one line naming the file, exit 1.
#[test]
fn v3r_info_validates_artifacts_file_by_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let art = dir.path().join("art");
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let args = ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--out", art.to_str().unwrap()];
    let out = run_binary_env("v3c", &args, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = run_binary("v3r", &["info", art.to_str().unwrap()]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    let report = text(&info.stdout);
    for want in [
        "model: deepseek-v3-tiny (f32 graph)",
        "target: cpu (",
        "kernels: 17 (every file's sha256 verified)",
        "runs here: yes",
        " launches of 17 kernels at the planned sizes, each as its kernel's code says it takes",
        "a prompt's last chunk (its caches, its last row of logits): 40 launches, on its last row alone: lm_head_0",
    ] {
        assert!(report.contains(want), "{want}: {report}");
    }
    // Weights against the plan: a checkpoint of the model matches (fp8 too: dequantized at load); one of
    // a model with wider experts is named by file and tensor.
    let ckpt = dir.path().join("ckpt");
    let out =
        run_binary("v3c", &["init-weights", "--model", "deepseek-v3-tiny", "--out", ckpt.to_str().unwrap(), "--fp8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = run_binary("v3r", &["info", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap()]);
    assert!(text(&info.stdout).contains("matches the plan (72 weight bindings"), "{}", text(&info.stderr));
    let wide = dir.path().join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    config["moe_intermediate_size"] = (config["moe_intermediate_size"].as_u64().unwrap() * 2).into();
    std::fs::write(wide.join("config.json"), config.to_string()).unwrap();
    let wide_ckpt = dir.path().join("wide_ckpt");
    let out =
        run_binary("v3c", &["init-weights", "--model", wide.to_str().unwrap(), "--out", wide_ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = run_binary("v3r", &["info", art.to_str().unwrap(), "--weights", wide_ckpt.to_str().unwrap()]);
    assert_eq!(info.status.code(), Some(1));
    let err = text(&info.stderr);
    assert!(err.contains("model.safetensors: model.layers.") && err.contains("the artifact's plan expects"), "{err}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    let kernel = manifest["kernels"][0]["file"].as_str().unwrap().to_string();
    // Each case: a fresh copy, one change, the expected message.
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(to.join("kernels")).unwrap();
        for entry in walk(&art) {
            let rel = entry.strip_prefix(&art).unwrap();
            std::fs::copy(&entry, to.join(rel)).unwrap();
        }
        to
    };
    let check = |case: &Path, want: &str| {
        let out = run_binary("v3r", &["info", case.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{want}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("v3r: error: ") && err.contains(want), "{want}: {err}");
    };
    let flipped = copy("flipped");
    let mut bytes = std::fs::read(flipped.join(&kernel)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(flipped.join(&kernel), bytes).unwrap();
    check(&flipped, &format!("{}: content hash mismatch", flipped.join(&kernel).display()));
    let missing = copy("missing");
    std::fs::remove_file(missing.join(&kernel)).unwrap();
    check(&missing, &format!("{}: missing (listed in manifest.json)", missing.join(&kernel).display()));
    let plan = copy("plan");
    let p = std::fs::read_to_string(plan.join("plan.json")).unwrap().replacen("\"decode\"", "\"decodE\"", 1);
    std::fs::write(plan.join("plan.json"), p).unwrap();
    check(&plan, "plan.json: content hash mismatch");
    let json = copy("json");
    let m = std::fs::read_to_string(json.join("manifest.json")).unwrap();
    std::fs::write(json.join("manifest.json"), &m[..m.len() / 2]).unwrap();
    check(&json, "manifest.json: invalid JSON");
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = copy(name);
        let mut v = manifest.clone();
        f(&mut v);
        std::fs::write(d.join("manifest.json"), serde_json::to_string_pretty(&v).unwrap()).unwrap();
        d
    };
    check(&edit("version", &|v| v["format_version"] = 99.into()), "format_version 99, this v3r reads 1");
    check(&edit("config", &|v| v["model"]["config"]["num_hidden_layers"] = 61.into()), "model.config does not match");
    check(&edit("escape", &|v| v["kernels"][0]["file"] = "../outside.so".into()), "lies outside the artifact");
    let unflagged = edit("unflagged", &|v| {
        v["kernels"][0].as_object_mut().unwrap().remove("partitioned");
    });
    check(&unflagged, "a cpu kernel needs its symbol and partitioned flag");
    let kernel0 = manifest["kernels"][0]["name"].as_str().unwrap().to_string();
    check(
        &edit("abi", &|v| v["kernels"][0]["abi"] = serde_json::json!({ "MlaDecode": { "kv": 96, "rope": 64 } })),
        &format!("manifest.json: kernel {kernel0}: decode attention with a latent width of 96"),
    );
    // A plan edited with its hash updated gets past the hashes but not the plan's own checks (before,
    // a launch naming a buffer past the entry's panicked, an arena buffer past the arena was run).
    let plan_text = std::fs::read_to_string(art.join("plan.json")).unwrap();
    let edit_plan = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut plan: serde_json::Value = serde_json::from_str(&plan_text).unwrap();
        f(&mut plan);
        let bytes = serde_json::to_vec(&plan).unwrap();
        let d = edit(name, &|v| v["plan"]["sha256"] = v3c_runtime::artifact::sha256_hex(&bytes).into());
        std::fs::write(d.join("plan.json"), &bytes).unwrap();
        d
    };
    check(
        &edit_plan("arg", &|p| p["entries"][0]["launches"][0]["args"][0] = 1_000_000.into()),
        "plan.json: entry prefill: launch 0 (embed_0) names buffer 1000000 of",
    );
    check(
        &edit_plan("arena", &|p| p["entries"][1]["arena_bytes"] = 256.into()),
        "bytes at offset 0 of an arena of 256 bytes (aligned to 256)",
    );
    check(
        &edit_plan("bytes", &|p| p["entries"][0]["buffers"][0]["bytes"] = 1.into()),
        "plan.json: entry prefill: buffer 0 (input 'tokens'): 1 bytes, its [64] i64 has 512",
    );
    check(
        &edit_plan("shape", &|p| p["entries"][0]["buffers"][0]["dims"][0]["rows"] = (1u64 << 62).into()),
        "plan.json: entry prefill: buffer 0 (input 'tokens'): shape [64] is not its dims",
    );
    check(
        &edit_plan("output", &|p| p["entries"][0]["outputs"][0][1] = 99_999.into()),
        "plan.json: entry prefill: output 'logits' is buffer 99999 of",
    );
    // Kernel timings of the cpu artifact, as the tuner reads them.
    let json = dir.path().join("bench.json");
    let args = ["bench-kernels", art.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--reps", "2"];
    let bench = run_binary("v3r", &[&args[..], &["--entry", "decode", "--out", json.to_str().unwrap()]].concat());
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    assert!(text(&bench.stdout).starts_with("entry decode: "), "{}", text(&bench.stdout));
    let timings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let decode = timings["entries"]["decode"].as_array().unwrap();
    assert_eq!(decode.len(), 15, "every kernel of decode");
    assert!(decode.iter().all(|t| t["median_ms"].as_f64().unwrap() > 0.0 && t["launches"].as_u64().unwrap() > 0));
    // The same without a checkpoint: made-up weights (check.sh times the full-width slice so).
    let args = ["bench-kernels", art.to_str().unwrap(), "--random-weights", "3", "--reps", "1", "--entry", "decode"];
    let bench = run_binary("v3r", &args);
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    assert!(text(&bench.stdout).starts_with("entry decode: ") && text(&bench.stdout).contains("(15 kernels"));
    // What the plans and the manifest say of the kernels is checked against what the kernels' code
    // says it takes, when `v3r` loads them: a launch bound to a buffer of the launch's shape but
    // another element type (before: a segfault), and a kernel listed with the wrong partitioned flag
    // (its code would misread its arguments), each one line.
    let loads = |case: &Path, want: &str| {
        let args = ["run", case.to_str().unwrap(), "--weights", ckpt.to_str().unwrap(), "--prompt-tokens", "1 2 3"];
        let out = run_binary("v3r", &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{want}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("v3r: error: ") && err.contains(want), "{want}: {err}");
    };
    let plan: serde_json::Value = serde_json::from_str(&plan_text).unwrap();
    let (entry, launch, slot, other) =
        same_shape_other_type(&plan).expect("a buffer of another type at a launch's shape");
    let e = &plan["entries"][entry];
    let kernel = e["launches"][launch]["kernel"].as_str().unwrap();
    let id = e["launches"][launch]["args"][slot].as_u64().unwrap() as usize;
    let (shape, dtype, was) =
        (&e["buffers"][other]["shape"], &e["buffers"][other]["dtype"], &e["buffers"][id]["dtype"]);
    let swapped = edit_plan("swapped", &|p| p["entries"][entry]["launches"][launch]["args"][slot] = other.into());
    let shape: Vec<u64> = serde_json::from_value(shape.clone()).unwrap();
    loads(
        &swapped,
        &format!("plan.json: entry {}, launch {launch} (kernel {kernel}): buffer {other}", e["name"].as_str().unwrap()),
    );
    loads(&swapped, &format!("is {shape:?} {}; the kernel takes ", dtype.as_str().unwrap()));
    loads(&swapped, &format!("x{} there", was.as_str().unwrap()));
    // `v3r info` reads the signatures from the kernels' symbol tables, without loading their code.
    check(&swapped, &format!("launch {launch} (kernel {kernel}): buffer {other}"));
    let k = manifest["kernels"].as_array().unwrap().iter().position(|k| k["partitioned"] == true).unwrap();
    let name = manifest["kernels"][k]["name"].as_str().unwrap().to_string();
    let unpartitioned = edit("unpartitioned", &|v| v["kernels"][k]["partitioned"] = false.into());
    loads(&unpartitioned, &format!("manifest.json: kernel {name} is listed as partitioned false"));
    loads(&unpartitioned, "is partitioned true");
    check(&unpartitioned, &format!("manifest.json: kernel {name} is listed as partitioned false"));
    // A cpu artifact relabelled for a GPU lacks the lowering a GPU artifact carries.
    let gpu = edit("gpu", &|v| {
        v["target"] = serde_json::json!({ "name": "sm_90a", "compute_capability": [9, 0] });
    });
    check(&gpu, "manifest.json: a GPU artifact without its lowering file");
}

/// In `plan` (plan.json), a launch argument and a buffer of the same entry with its shape but another
/// element type: `(entry, launch, argument, buffer id)`.
fn same_shape_other_type(plan: &serde_json::Value) -> Option<(usize, usize, usize, usize)> {
    for (i, e) in plan["entries"].as_array()?.iter().enumerate() {
        let buffers = e["buffers"].as_array()?;
        for (j, l) in e["launches"].as_array()?.iter().enumerate() {
            for (k, arg) in l["args"].as_array()?.iter().enumerate() {
                let b = &buffers[arg.as_u64()? as usize];
                if let Some(o) = buffers.iter().position(|o| o["shape"] == b["shape"] && o["dtype"] != b["dtype"]) {
                    return Some((i, j, k, o));
                }
            }
        }
    }
    None
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

/// The split tuning flow without a GPU: `v3c tune --emit-candidates` compiles the cost model's
/// candidates (PTX + candidates.json) for every GEMM, the grouped MoE ones included; a database of
/// their timings (written here as the GPU machine's tune_check.py would) steers `v3c compile
/// --tuning`, which says per kernel which entry it used or why it ignored one; `v3c tune --report`
/// shows default vs tuned.
/// `v3c tune --train`: the training step's kernels — the FP8 recipe's Fprop, Dgrad and Wgrad GEMMs and
/// the routed experts' grouped ones over the blocks each step quantizes — at a 4096-token window, and
/// no sampling argmax.
#[test]
fn tuning_covers_the_training_step() {
    let dir = tempfile::tempdir().unwrap();
    let cands = dir.path().join("cands");
    let args = ["tune", "--model", "deepseek-v3-tiny", "--train", "--precision", "fp8", "--top", "1"];
    let out = run_binary("v3c", &[&args[..], &["--emit-candidates", cands.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cands.join("candidates.json")).unwrap()).unwrap();
    let kernels: Vec<&str> =
        manifest["problems"].as_array().unwrap().iter().map(|p| p["kernel"].as_str().unwrap()).collect();
    for want in [
        "grouped contig fp8->f32 n48 k96 e8+0 top3 +b1x128",
        "grouped contig fp8->f32 n96 k48 e8+0 top3 +rowscale +b1x128",
        "grouped contig fp8->f32 n48 k96 e8+0 top3 +b1x128",
        "wgrad fp8->f32 m96 n48",
        // An expert's Wgrad (K: its pairs, a range the device holds).
        "wgrad fp8->f32 m96 n48 +krange",
    ] {
        assert!(kernels.contains(&want), "{want}: {kernels:?}");
    }
    assert!(!kernels.iter().any(|k| k.contains("argmax")), "{kernels:?}");
    candidates_launch_as_their_ptx_declares(&cands);
}

/// `v3c tune --prefill-rows`: the GEMMs prefill runs, tuned at those buckets too (where `v3c
/// compile` picks kernels for shorter chunks); a row count that is no bucket is refused.
#[test]
fn tuning_covers_the_smaller_prefill_buckets_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let cands = dir.path().join("cands");
    let args = ["tune", "--model", "deepseek-v3-tiny", "--top", "1", "--only", "gemm", "--prefill-rows", "128,512"];
    let out = run_binary("v3c", &[&args[..], &["--emit-candidates", cands.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cands.join("candidates.json")).unwrap()).unwrap();
    let problems = manifest["problems"].as_array().unwrap();
    let rows_of = |kernel: &str| -> Vec<u64> {
        problems.iter().filter(|p| p["kernel"] == kernel).map(|p| p["m"].as_u64().unwrap()).collect()
    };
    let signatures: std::collections::BTreeSet<&str> = problems.iter().map(|p| p["kernel"].as_str().unwrap()).collect();
    for signature in &signatures {
        let rows = rows_of(signature);
        // Prefill's (4096) at 128 and 512 too; decode's alone at 64.
        assert_eq!(rows.contains(&4096), rows.contains(&128) && rows.contains(&512), "{signature}: {rows:?}");
    }
    assert!(signatures.iter().any(|s| rows_of(s).contains(&128)), "{signatures:?}");
    let bad = run_binary("v3c", &["tune", "--model", "deepseek-v3-tiny", "--prefill-rows", "100"]);
    let err = text(&bad.stderr);
    assert!(!bad.status.success() && err.contains("100: a bucket is a power of two from 64 to 2048"), "{err}");
}

#[test]
fn tuning_database_steers_compile() {
    let dir = tempfile::tempdir().unwrap();
    let cands = dir.path().join("cands");
    let out = run_binary(
        "v3c",
        &["tune", "--model", "deepseek-v3", "--emit-candidates", cands.to_str().unwrap(), "--top", "2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cands.join("candidates.json")).unwrap()).unwrap();
    let problems = manifest["problems"].as_array().unwrap();
    // Every GEMM signature x the regimes its entries run it in: the fused GEMM kernels (3) and the
    // GEMM steps of multi-launch kernels (the MLA query up-projection, the dense SwiGLU, the head's
    // one GEMM over hi + lo, the MTP projection's, the two grouped MoE GEMMs) at decode and prefill,
    // prefill attention's kv_b up-projection and the router gate's GEMM at prefill only; and the attention kernels' ring depths:
    // decode's (bf16 pages and the fp8 cache's rows) at 64 sequences, prefill's at 4096 tokens.
    // And the norms' block widths: 4 RMSNorm kernels (the d7168 norms, two quantized, and the
    // query's d1536 one) at decode and prefill; greedy sampling's argmax at decode.
    assert_eq!(
        problems.len(),
        32,
        "9 GEMM signatures x decode and prefill, kv_b's and the router gate's at prefill, 3 attention, 8 norms, the \
         argmax"
    );
    // The gate's GEMM is prefill's only (decode routes on the CUDA cores).
    let gate: Vec<&serde_json::Value> =
        problems.iter().filter(|p| p["kernel"] == "gemm bf16->f32 n256 k7168 +a2").map(|p| &p["m"]).collect();
    assert_eq!(gate, [&serde_json::Value::from(4096)]);
    let head = problems.iter().find(|p| p["kernel"] == "gemm bf16->f32 n129280 k7168 +a2" && p["m"] == 64).unwrap();
    assert!(head["candidates"].as_array().unwrap().iter().all(|c| c["name"]
        .as_str()
        .unwrap()
        .trim_end_matches("_kp")
        .ends_with("_a2")));
    let argmax = problems.iter().find(|p| p["kernel"] == "rows_argmax_d129280").unwrap();
    assert_eq!((&argmax["m"], &argmax["default"]), (&64.into(), &"rows_argmax_d129280_t1024".into()));
    assert_eq!(argmax["rows"]["argmax"], true);
    let norm = problems.iter().find(|p| p["kernel"] == "rows_rmsnorm_bf16_d7168_eps1em6_y_q" && p["m"] == 64).unwrap();
    assert_eq!(norm["default"], "rows_rmsnorm_bf16_d7168_t1024_eps1em6_y_q");
    assert!((norm["rows"]["rmsnorm_eps"].as_f64().unwrap() - 1e-6).abs() < 1e-12, "{norm}");
    assert_eq!(
        norm["rows"]["operands"][4],
        serde_json::json!({"name": "scale", "shape": [64, 56], "element": "f32", "output": true})
    );
    let attention: Vec<&serde_json::Value> = problems.iter().filter(|p| p["attention"].is_object()).collect();
    let kernels: Vec<(&str, &serde_json::Value)> =
        attention.iter().map(|p| (p["kernel"].as_str().unwrap(), &p["m"])).collect();
    assert_eq!(
        kernels,
        [
            ("mla_prefill qk192 v128 h128", &serde_json::json!(4096)),
            ("mla_decode kv512 r64 h128", &serde_json::json!(64)),
            ("mla_decode kv512 r64 h128 fp8cache", &serde_json::json!(64)),
        ]
    );
    // The cost model's best two of each: prefill's ring depths; decode's two page buffers in the
    // serial loop (a page loaded ahead) in clusters of 2 (a sequence's two 64-head blocks share
    // each page), then without.
    assert_eq!(attention[0]["default"], "mla_prefill_qk192_v128_s4");
    assert_eq!(attention[1]["default"], "mla_decode_kv512_r64_p64_s2_cl2_serial");
    assert_eq!(attention[1]["candidates"][1]["name"], "mla_decode_kv512_r64_p64_s2_serial");
    let kv_b: Vec<&serde_json::Value> =
        problems.iter().filter(|p| p["kernel"].as_str().unwrap().contains("n32768 k512")).collect();
    assert_eq!(kv_b.len(), 1, "{kv_b:?}");
    assert_ne!(kv_b[0]["m"], 64, "{kv_b:?}");
    let grouped = problems.iter().find(|p| p["kernel"] == "grouped contig fp8->f32 n4096 k7168 e256+1 top8").unwrap();
    assert_eq!(grouped["grouped"], serde_json::json!({ "routed": 256, "shared": 1, "top_k": 8 }));
    assert!(problems
        .iter()
        .any(|p| p["kernel"] == "grouped contig fp8->f32 n7168 k2048 e256+1 top8 +rowscale +scatter"));
    for p in problems {
        for c in p["candidates"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            assert!(cands.join("kernels").join(format!("{name}.ptx")).is_file(), "{name}");
        }
    }
    candidates_launch_as_their_ptx_declares(&cands);
    let again = run_binary("v3c", &["tune", "--model", "deepseek-v3", "--emit-candidates", cands.to_str().unwrap()]);
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
    // The decode problem of the MLA projections: its second candidate measured faster than the default.
    let p = problems.iter().find(|p| p["kernel"] == "gemm fp8->f32 n2112 k7168" && p["m"] == 64).unwrap();
    let (default, other) = (p["default"].as_str().unwrap(), p["candidates"][1]["name"].as_str().unwrap());
    let entry = |gpu: &str| {
        serde_json::json!({
            "compiler_version": manifest["compiler_version"], "gpu": gpu, "compute_capability": [9, 0],
            "kernel": p["kernel"], "m_bucket": 64, "candidates_sha256": p["candidates_sha256"],
            "default_config": default, "timings": [[default, 0.0200], [other, 0.0150]], "rejected": [],
            "measured_at": "2026-11-29T00:00:00Z", "measured_on": "test"
        })
    };
    let db = dir.path().join("tuning.json");
    let residual =
        problems.iter().find(|p| p["kernel"] == "gemm fp8->f32 n7168 k16384 +residual" && p["m"] == 64).unwrap();
    let mut foreign = entry("H100");
    foreign["kernel"] = residual["kernel"].clone();
    foreign["candidates_sha256"] = residual["candidates_sha256"].clone();
    // The MoE gate/up's decode problem: its second candidate measured faster too.
    let moe = problems.iter().find(|p| p["kernel"] == grouped["kernel"] && p["m"] == 64).unwrap();
    let (moe_default, moe_other) = (moe["default"].as_str().unwrap(), moe["candidates"][1]["name"].as_str().unwrap());
    let mut moe_entry = entry("H200");
    moe_entry["kernel"] = moe["kernel"].clone();
    moe_entry["candidates_sha256"] = moe["candidates_sha256"].clone();
    moe_entry["default_config"] = moe_default.into();
    moe_entry["timings"] = serde_json::json!([[moe_default, 1.7], [moe_other, 1.6]]);
    // Decode attention's second candidate (no cluster) measured faster than the default.
    let decode = attention[1];
    let (attn_default, attn_other) =
        (decode["default"].as_str().unwrap(), decode["candidates"][1]["name"].as_str().unwrap());
    let mut attn_entry = entry("H200");
    attn_entry["kernel"] = decode["kernel"].clone();
    attn_entry["candidates_sha256"] = decode["candidates_sha256"].clone();
    attn_entry["default_config"] = attn_default.into();
    attn_entry["timings"] = serde_json::json!([[attn_default, 0.3], [attn_other, 0.25]]);
    // The decode norm's 512-thread width measured faster than the cost model's 1024.
    let norm_other = norm["candidates"][1]["name"].as_str().unwrap();
    assert_eq!(norm_other, "rows_rmsnorm_bf16_d7168_t512_eps1em6_y_q");
    let mut norm_entry = entry("H200");
    norm_entry["kernel"] = norm["kernel"].clone();
    norm_entry["candidates_sha256"] = norm["candidates_sha256"].clone();
    norm_entry["default_config"] = norm["default"].clone();
    norm_entry["timings"] = serde_json::json!([[norm["default"], 0.004], [norm_other, 0.003]]);
    let entries = [entry("H200"), foreign, moe_entry, attn_entry, norm_entry];
    let json = serde_json::json!({ "format_version": 1, "entries": entries });
    std::fs::write(&db, json.to_string()).unwrap();
    let out = run_binary(
        "v3c",
        &["compile", "--model", "deepseek-v3", "--target", "sm_90a", "--tuning", db.to_str().unwrap()],
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "compile: mla_projections_0 (N 2112 K 7168) decode -> {other} [tuning database: 0.0150 ms measured on H200"
        )),
        "{err}"
    );
    assert!(err.contains("default 0.0200 ms]"), "{err}");
    assert!(
        err.contains(&format!(
            "compile: moe_gate_up_quantize_0.grouped (N 4096 K 7168) decode -> {moe_other} [tuning database: 1.6000 ms"
        )),
        "{err}"
    );
    assert!(
        err.contains("warning: ") && err.contains("entry for gemm_residual_0 at M 64 ignored: measured on H100 (compute capability 9.0), compiling for H200"),
        "{err}"
    );
    assert!(
        err.contains("compile: mla_projections_0 (N 2112 K 7168) prefill -> ")
            && err.contains("(no tuning database entry)]"),
        "{err}"
    );
    assert!(
        err.contains(
            "compile: attention_decode_quantize_0 (128 heads) decode -> mla_decode_kv512_r64_p64_s2_serial [tuning database: \
             0.2500 ms measured on H200"
        ) && err.contains("mla_decode_kv512_r64_p64_s2_serial (128 heads, split K, tensor cores)"),
        "{err}"
    );
    assert!(
        err.contains(
            "compile: norm_quantize_1 -> decode rows_rmsnorm_bf16_d7168_t512_eps1em6_y_q, prefill \
             rows_rmsnorm_bf16_d7168_t256_eps1em6_y_q [row kernel"
        ) && err.contains("compile: norm_quantize_1 (d 7168) decode -> rows_rmsnorm_bf16_d7168_t512_eps1em6_y_q [tuning database: 0.0030 ms"),
        "{err}"
    );
    assert!(
        err.contains("compile: attention_quantize_0 (128 heads) prefill -> mla_prefill_qk192_v128_s4 [cost model: ")
            && err.contains("compile: mla_decode_kv512_r64_p64_s2_serial: 256 threads"),
        "{err}"
    );
    let report = run_binary("v3c", &["tune", "--model", "deepseek-v3", "--report", "--tuning", db.to_str().unwrap()]);
    let table = text(&report.stdout);
    assert!(table.contains(&format!("    0.0200     0.0150    1.33x  {other}")), "{table}");
    assert!(
        table.contains("mla_decode kv512 r64 h128") && table.contains("1.20x  mla_decode_kv512_r64_p64_s2_serial"),
        "{table}"
    );
    assert!(table.contains("mla_prefill qk192 v128 h128") && table.contains("no entry"), "{table}");
    assert!(table.contains("ignored: measured on H100"), "{table}");
}

/// A temporary directory with the tiny model's random checkpoint (`ckpt`), and the paths of a run's
/// output (`run`, not made) and its data file (`data.txt`, not written).
fn tiny_training_run() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, out, data) = (dir.path().join("ckpt"), dir.path().join("run"), dir.path().join("data.txt"));
    let init = run_binary("v3c", &["init-weights", "--model", "deepseek-v3-tiny", "--out", ckpt.to_str().unwrap()]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    (dir, ckpt, out, data)
}

/// A held-out loss (`--eval-data`): measured before the first step, every `--eval-every` steps
/// and after the last, into eval.csv — without touching the training (its loss log equals a run
/// without evaluation, bit for bit); the optimizer flags change the steps; bad values refused.
#[test]
fn training_measures_a_held_out_loss_without_changing_the_steps() {
    let (dir, ckpt, out, data) = tiny_training_run();
    std::fs::write(&data, (0..200).map(|i| (i % 13 + 2).to_string()).collect::<Vec<_>>().join(" ")).unwrap();
    let held_out = dir.path().join("held_out.txt");
    std::fs::write(&held_out, (0..60).map(|i| (i % 7 + 3).to_string()).collect::<Vec<_>>().join(" ")).unwrap();
    let base = ["train", "--model-dir", ckpt.to_str().unwrap(), "--data", data.to_str().unwrap()];
    let run = |out: &std::path::Path, extra: &[&str]| {
        let args = [&base[..], &["--out", out.to_str().unwrap(), "--batch", "1", "--seq", "8", "--steps", "3"], extra];
        run_binary("v3c", &args.concat())
    };
    let evaluated = run(&out, &["--eval-data", held_out.to_str().unwrap(), "--eval-every", "2", "--eval-windows", "2"]);
    assert!(evaluated.status.success(), "{}", text(&evaluated.stderr));
    assert!(text(&evaluated.stderr).contains("held-out loss after step 3: "), "{}", text(&evaluated.stderr));
    let eval = std::fs::read_to_string(out.join("eval.csv")).unwrap();
    let rows: Vec<(usize, f32)> = eval
        .lines()
        .skip(1)
        .map(|l| l.split_once(',').map(|(s, v)| (s.parse().unwrap(), v.parse().unwrap())).unwrap())
        .collect();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 2, 3], "{eval}");
    assert!(rows.iter().all(|r| r.1.is_finite() && r.1 > 0.0), "{eval}");
    let plain = dir.path().join("plain");
    let not_evaluated = run(&plain, &[]);
    assert!(not_evaluated.status.success(), "{}", text(&not_evaluated.stderr));
    let log = |d: &std::path::Path| std::fs::read_to_string(d.join("loss.csv")).unwrap();
    assert_eq!(log(&out), log(&plain), "evaluating changed the steps");
    assert!(!plain.join("eval.csv").exists());
    // Weight decay, clipping and warm-up reach the optimizer: other steps.
    let tuned = dir.path().join("tuned");
    let other = run(&tuned, &["--weight-decay", "0", "--clip-norm", "0.05", "--warmup-steps", "1"]);
    assert!(other.status.success(), "{}", text(&other.stderr));
    assert_ne!(log(&tuned).lines().nth(2), log(&plain).lines().nth(2));
    for (extra, err) in [
        (&["--clip-norm", "0"][..], "--clip-norm 0: gradients are clipped to a positive norm"),
        (&["--weight-decay=-1"][..], "--weight-decay -1: must be a finite number >= 0"),
        (&["--eval-every", "2"][..], "--eval-data"),
        (&["--eval-data", data.to_str().unwrap(), "--eval-windows", "0"][..], "--eval-windows must be positive"),
        (&["--eval-data", ckpt.join("config.json").to_str().unwrap()][..], "config.json"),
    ] {
        let bad = run(&dir.path().join("bad"), extra);
        assert!(!bad.status.success() && text(&bad.stderr).contains(err), "{extra:?}: {}", text(&bad.stderr));
        assert!(!dir.path().join("bad").exists(), "{extra:?}: output left behind");
    }
}

/// `--tokenizer`: the data as text (a .jsonl file a document a line), trained on as the token ids
/// the tokenizer gives it — the same steps as those ids in a token file; a text whose tokens the
/// model does not have is refused by name.
#[test]
fn training_reads_text_through_a_tokenizer() {
    let (dir, ckpt, out, data) = tiny_training_run();
    let tokenizer_json = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/tokenizer.json");
    let tokenizer = v3c_runtime::tokenizer::Tokenizer::from_file(&tokenizer_json).unwrap();
    let documents = ["kq#zv!".repeat(20), "zqxj".repeat(25)];
    let jsonl = dir.path().join("corpus.jsonl");
    let lines: Vec<String> = documents.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n\n")).unwrap();
    let ids: Vec<String> = documents.iter().flat_map(|d| tokenizer.encode(d, true)).map(|t| t.to_string()).collect();
    std::fs::write(&data, ids.join(" ")).unwrap();
    let run = |out: &std::path::Path, data: &std::path::Path, extra: &[&str]| {
        let args = [
            &["train", "--model-dir", ckpt.to_str().unwrap(), "--data", data.to_str().unwrap()][..],
            &["--out", out.to_str().unwrap(), "--batch", "1", "--seq", "8", "--steps", "2"],
            extra,
        ];
        run_binary("v3c", &args.concat())
    };
    let from_text = run(&out, &jsonl, &["--tokenizer", tokenizer_json.to_str().unwrap()]);
    assert!(from_text.status.success(), "{}", text(&from_text.stderr));
    let from_ids = dir.path().join("ids");
    assert!(run(&from_ids, &data, &[]).status.success());
    let log = |d: &std::path::Path| std::fs::read_to_string(d.join("loss.csv")).unwrap();
    assert_eq!(log(&out), log(&from_ids));
    let foreign = dir.path().join("foreign.txt");
    std::fs::write(&foreign, "The quick brown fox jumps over the lazy dog.").unwrap();
    let bad = run(&dir.path().join("bad"), &foreign, &["--tokenizer", tokenizer_json.to_str().unwrap()]);
    assert!(
        text(&bad.stderr).contains("outside the model's vocabulary (0..320): a tokenizer of another model?"),
        "{}",
        text(&bad.stderr)
    );
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"zq\"}\n{\"txt\": 1}\n").unwrap();
    let bad = run(&dir.path().join("bad"), &broken, &["--tokenizer", tokenizer_json.to_str().unwrap()]);
    assert!(text(&bad.stderr).contains("broken.jsonl:2: no \"text\" string"), "{}", text(&bad.stderr));
    assert!(!dir.path().join("bad").exists());
}

/// Ctrl-C stops a training run after the step under way with its checkpoint and optimizer state
/// saved (exit 1, a one-line message naming the step), and `--resume` continues from there.
#[cfg(unix)]
#[test]
fn an_interrupted_training_run_saves_and_resumes() {
    let (_dir, ckpt, out, data) = tiny_training_run();
    std::fs::write(&data, (0..200).map(|i| (i % 13 + 2).to_string()).collect::<Vec<_>>().join(" ")).unwrap();
    let base = ["train", "--model-dir", ckpt.to_str().unwrap(), "--data", data.to_str().unwrap()];
    let args = [&base[..], &["--out", out.to_str().unwrap(), "--batch", "1", "--seq", "8"]].concat();
    let child = std::process::Command::new(v3c_tests::workspace_binary("v3c"))
        .args([&args[..], &["--steps", "100000"]].concat())
        .env("V3C_KERNEL_CACHE", "off")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once a step is logged, Ctrl-C.
    let log = out.join("loss.csv");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 2 {
        assert!(started.elapsed().as_secs() < 300, "no step logged in 300 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let stopped = child.wait_with_output().unwrap();
    let said = text(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(1), "{said}");
    let step: usize = said
        .split("interrupted after step ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(said.contains("(--resume continues)"), "{said}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1 + step, "every step taken is logged");
    for f in ["config.json", "model.safetensors", "optimizer/state.safetensors"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let resumed = run_binary("v3c", &[&args[..], &["--steps", "1", "--resume"]].concat());
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert!(text(&resumed.stderr).contains(&format!("(now at step {})", step + 1)), "{}", text(&resumed.stderr));
}

/// `v3c train` (reference backend) on a repeating pattern: the loss log falls, the run saves along
/// the way and resumes where it stopped, the trained checkpoint (MTP module kept) loads for
/// inference, and bad data or a backend without backward kernels are one-line errors.
#[test]
fn train_learns_resumes_and_writes_a_checkpoint() {
    let (dir, ckpt, out, data) = tiny_training_run();
    let pattern = [5, 9, 2, 7, 11, 3, 42, 17];
    let tokens: Vec<String> = (0..300).map(|i| pattern[i % 8].to_string()).collect();
    std::fs::write(&data, tokens.join(" ")).unwrap();
    let base = [
        "train",
        "--model-dir",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let args =
        [&base[..], &["--steps", "20", "--batch", "2", "--seq", "16", "--lr", "0.01", "--save-every", "7"]].concat();
    let run = run_binary("v3c", &args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    // Saved along the way (each file replaced whole: none left half-written beside it).
    for step in [7, 14] {
        let said = format!("saved the checkpoint and optimizer state at step {step} in ");
        assert!(text(&run.stderr).contains(&said), "{}", text(&run.stderr));
    }
    let leftovers: Vec<_> = walk(&out).into_iter().filter(|p| p.extension().is_some_and(|e| e == "tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let log = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let losses: Vec<f32> = log.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 20);
    assert!(losses[19] < 0.2 * losses[0], "loss {} -> {}", losses[0], losses[19]);
    for f in ["config.json", "model.safetensors", "optimizer/state.safetensors", "expert_load.csv"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let again = run_binary("v3c", &args);
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
    let resume = [&base[..], &["--steps", "3", "--batch", "2", "--seq", "16", "--resume"]].concat();
    let resumed = run_binary("v3c", &resume);
    assert!(text(&resumed.stderr).contains("(now at step 23)"), "{}", text(&resumed.stderr));
    assert_eq!(std::fs::read_to_string(out.join("loss.csv")).unwrap().lines().count(), 1 + 23);
    let logits = run_binary(
        "v3c",
        &[
            "logits",
            "--model-dir",
            out.to_str().unwrap(),
            "--tokens",
            "5 9 2",
            "--out",
            dir.path().join("l.safetensors").to_str().unwrap(),
        ],
    );
    assert!(text(&logits.stderr).contains("and mtp_logits"), "the MTP module is kept: {}", text(&logits.stderr));
    std::fs::write(&data, "5 9 999999").unwrap();
    let bad = run_binary("v3c", &[&base[..], &["--steps", "1", "--resume"]].concat());
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("token 2 is 999999, outside the vocabulary"), "{}", text(&bad.stderr));
    // FP8 training: the recipe's e4m3 GEMMs, said in the report.
    let fp8_out = dir.path().join("fp8");
    let fp8_args = [
        "train",
        "--model-dir",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        fp8_out.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "1",
        "--seq",
        "8",
        "--precision",
        "fp8",
    ];
    std::fs::write(&data, tokens.join(" ")).unwrap();
    let fp8 = run_binary("v3c", &fp8_args);
    assert!(fp8.status.success(), "{}", text(&fp8.stderr));
    assert!(text(&fp8.stderr).contains("on the reference backend (FP8 GEMMs, "), "{}", text(&fp8.stderr));
    std::fs::write(&data, "5 9 999999").unwrap();
    let negative = run_binary("v3c", &[&base[..], &["--steps", "1", "--resume", "--balance-alpha=-1"]].concat());
    assert_eq!(negative.status.code(), Some(1));
    assert!(
        text(&negative.stderr).contains("--balance-alpha -1: must be a finite number >= 0"),
        "{}",
        text(&negative.stderr)
    );
    std::fs::write(&data, tokens.join(" ")).unwrap();
    // `logits` and `run` on `--backend cuda` need the GPU before compiling anything.
    if v3c_runtime::device::probe_device(0).is_err() {
        let logits_out = dir.path().join("cuda_logits.safetensors");
        let logits =
            ["logits", "--model-dir", ckpt.to_str().unwrap(), "--tokens", "1 2 3", "--backend", "cuda", "--out"];
        for args in [
            [&logits[..], &[logits_out.to_str().unwrap()]].concat(),
            vec!["run", "--model-dir", ckpt.to_str().unwrap(), "--prompt-tokens", "1 2 3", "--backend", "cuda"],
        ] {
            let r = run_binary("v3c", &args);
            assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
            let err = text(&r.stderr);
            assert!(
                err.starts_with("v3c: error: --backend cuda needs this machine's GPU: ") && !err.contains("compile: "),
                "{err}"
            );
        }
        assert!(!logits_out.exists());
    }
    // No GPU here: `--backend cuda` stops before compiling anything (the run's log unchanged).
    let log_before = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let cuda = run_binary("v3c", &[&base[..], &["--steps", "1", "--resume", "--backend", "cuda"]].concat());
    if v3c_runtime::device::probe_device(0).is_err() {
        assert_eq!(cuda.status.code(), Some(1));
        let err = text(&cuda.stderr);
        assert!(
            err.starts_with("v3c: error: --backend cuda needs this machine's GPU: ") && !err.contains("compile: "),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(out.join("loss.csv")).unwrap(), log_before);
    }
    // The cpu backend trains the MoE layers, the MTP module and the FP8 recipe too.
    let cpu =
        run_binary("v3c", &[&base[..], &["--steps", "2", "--batch", "1", "--resume", "--backend", "cpu"]].concat());
    assert!(cpu.status.success(), "{}", text(&cpu.stderr));
    assert!(text(&cpu.stderr).contains("(now at step 25) in"), "{}", text(&cpu.stderr));
    assert!(text(&cpu.stderr).contains("on the cpu backend"), "{}", text(&cpu.stderr));
    let mut fp8_cpu = fp8_args.to_vec();
    let fp8_cpu_out = dir.path().join("fp8-cpu");
    fp8_cpu[6] = fp8_cpu_out.to_str().unwrap();
    fp8_cpu.extend(["--backend", "cpu"]);
    let fp8_run = run_binary("v3c", &fp8_cpu);
    assert!(fp8_run.status.success(), "{}", text(&fp8_run.stderr));
    assert!(text(&fp8_run.stderr).contains("on the cpu backend (FP8 GEMMs, "), "{}", text(&fp8_run.stderr));
}

/// Full-width models compile for sm_90a: DeepSeek-V3's training step (a dense layer and a MoE layer:
/// every GEMM shape of the model's step) in both precisions, and a Moonlight-shaped model (hidden
/// 2048, 64 experts of 1408, two shared, no q LoRA) for inference: each GEMM finds a configuration
/// ptxas assembles without spills or serialized wgmma among the cost model's first tries.
/// (2026-12-06, with `validate`'s register headroom lowered: the FP8 recipe's Wgrad with per-row B
/// scales, and the Moonlight-shaped MoE down GEMM's scatter, ranked only 192-accumulator K-pipelined
/// forms first, which spill: "none of the 8 configurations tried".)
#[test]
fn full_width_models_compile_for_sm90a() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = two_layer_model(dir.path(), "v3", serde_json::json!({}));
    let moonlight = two_layer_model(dir.path(), "moonlight", moonlight_shape());
    // DeepSeek-V2-Lite whole (bf16: the f32 graph; softmax routing over 64 experts, 16 heads).
    let v2_lite = "deepseek-v2-lite".to_string();
    for (model, extra) in [
        (&v3, &["--train", "--precision", "fp8"][..]),
        (&v3, &["--train", "--precision", "f32"]),
        (&moonlight, &[]),
        (&v2_lite, &[]),
    ] {
        let out =
            run_binary("v3c", &[&["compile", "--model", model.as_str(), "--target", "sm_90a"][..], extra].concat());
        let err = text(&out.stderr);
        assert!(out.status.success(), "{model} {extra:?}: {err}");
        let last = err.lines().last().unwrap();
        assert!(last.starts_with("compile: all ") && last.contains("lower for sm_90a"), "{model} {extra:?}: {err}");
        // A pick made after the model's first was passed over says whose estimate its source quotes,
        // and that one was passed over. (With ptxas 13.0 the Moonlight-shaped MoE GEMMs' K-pipelined
        // forms spill.)
        let passed: Vec<&str> = err
            .lines()
            .filter_map(|l| Some(l.strip_prefix("compile: ")?.split_once(" passed over: ptxas")?.0))
            .collect();
        let quoted: Vec<&str> = err
            .lines()
            .filter_map(|l| {
                l.split_once("(of ")?.1.split_once(", passed over by ptxas; this is the next that assembles)]")
            })
            .map(|(name, _)| name)
            .collect();
        assert!(quoted.iter().all(|name| passed.contains(name)), "{quoted:?} {passed:?}");
        if model == &moonlight && !passed.is_empty() {
            assert!(!quoted.is_empty(), "{err}");
        }
    }
}

/// A checkpoint directory `dir/name` with DeepSeek-V3's config.json cut to two layers (a dense one,
/// a MoE one; no MTP module) and `changes` made to it: its path.
fn two_layer_model(dir: &Path, name: &str, changes: serde_json::Value) -> String {
    let mut config: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_JSON).unwrap();
    config["num_hidden_layers"] = 2.into();
    config["first_k_dense_replace"] = 1.into();
    config["num_nextn_predict_layers"] = 0.into();
    for (key, value) in changes.as_object().unwrap() {
        config[key] = value.clone();
    }
    let path = dir.join(name);
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("config.json"), config.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// Moonlight's shape over DeepSeek-V3's config: hidden 2048, 64 experts of 1408, two shared, no q
/// LoRA.
fn moonlight_shape() -> serde_json::Value {
    serde_json::json!({"hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": null, "vocab_size": 163840, "n_group": 1, "topk_group": 1})
}

/// `v3c compile --jobs N` compiles the kernels on N threads, ahead of the walk that takes them, and
/// writes what one thread writes: the same report, kernels (PTX), plan, lowering and manifest. The
/// Moonlight-shaped model's walk also compiles inline what it could not foresee: the next
/// configurations after the K-pipelined MoE forms ptxas passes over. Cubins are compared by name
/// only: ptxas 13.0 does not always assemble the same PTX into the same code (2026-12-06: six runs
/// on `gemm_bf16_f32_128x192x64_s4_a2_kp`'s PTX gave five cubins, their SASS scheduled differently,
/// 230 registers each).
#[test]
fn compiling_on_several_threads_writes_what_one_thread_writes() {
    let dir = tempfile::tempdir().unwrap();
    let model = two_layer_model(dir.path(), "moonlight", moonlight_shape());
    let compile = |jobs: &str| {
        let (art, cache) = (dir.path().join(format!("art{jobs}")), dir.path().join(format!("cache{jobs}")));
        let (art, cache) = (art.to_str().unwrap().to_string(), cache.to_str().unwrap().to_string());
        let args = ["compile", "--model", &model, "--target", "sm_90a", "--jobs", jobs, "--out", &art];
        let out = run_binary_env("v3c", &args, &[("V3C_KERNEL_CACHE", &cache)]);
        let err = text(&out.stderr);
        assert!(out.status.success(), "--jobs {jobs}: {err}");
        (art.clone(), err.replace(&art, "ART").replace(&cache, "CACHE"))
    };
    let ((one, one_report), (four, four_report)) = (compile("1"), compile("4"));
    // ptxas's resource lines name the same kernels in the same order (their registers come from
    // ptxas's run-to-run schedules, which the threads have nothing to do with).
    let report = |r: &str| -> Vec<String> {
        r.lines()
            .map(|l| match l.split_once(" threads, ") {
                Some((kernel, _)) if l.starts_with("compile: ") => kernel.to_string(),
                _ => l.to_string(),
            })
            .collect()
    };
    assert_eq!(report(&one_report), report(&four_report));
    assert!(one_report.contains(" passed over: ptxas"), "{one_report}");
    let files = |art: &str| {
        let mut names: Vec<String> = ["plan.json", "lowering.json", "manifest.json"].map(String::from).to_vec();
        let kernels = std::fs::read_dir(Path::new(art).join("kernels")).unwrap();
        names.extend(kernels.map(|e| format!("kernels/{}", e.unwrap().file_name().to_str().unwrap())));
        names.sort();
        names
    };
    assert_eq!(files(&one), files(&four));
    let manifest = |art: &str| {
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(Path::new(art).join("manifest.json")).unwrap()).unwrap();
        for k in m["kernels"].as_array_mut().unwrap() {
            k["cubin"]["sha256"] = serde_json::Value::Null;
        }
        m
    };
    assert_eq!(manifest(&one), manifest(&four));
    for name in files(&one).iter().filter(|n| !n.ends_with(".cubin") && *n != "manifest.json") {
        let read = |art: &str| std::fs::read(Path::new(art).join(name)).unwrap();
        assert!(read(&one) == read(&four), "{name} differs");
    }
}

/// `v3c compile --target sm_90a --train` lowers every kernel of the f32 training step (CUDA-core
/// matmuls, the gradients' row kernels, multi-launch ones) and writes an artifact whose every
/// launch `v3r info` checks against its kernel's PTX (`v3r train` runs it on a GPU: exit 3 here),
/// and so does the FP8 recipe's step (the experts' Wgrad per expert on the GEMM template); its host
/// emulation has `v3c train --backend cpu`'s loss.
#[test]
fn compile_for_sm90a_lowers_the_training_step() {
    let out = run_binary("v3c", &["compile", "--model", "deepseek-v3-tiny", "--target", "sm_90a", "--train"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    for line in [
        // f32 matmuls on the tensor cores: both operands split into bf16 hi + lo, two GEMMs (the
        // first over both of A's halves, the second adding hi.lo).
        "compile: matmul_0 -> 4 launches: rows_splitbf16_d96_t32 -> rows_splitbf16_d96_t32 -> GEMM N 8 K 96 (",
        // The tokens sorted by id, then each table row summing its own.
        "compile: embed_grad_0 -> 2 launches: rows_idrank_d256_t256 -> rows_embedgrad_d96_t32",
        "compile: rope_grad_1 -> rows_rope_d16_h4_t32_il_inv [row kernel",
        "compile: rms_norm_grad_0 -> 2 launches: rows_rmsnormgrad_f32_d96_t32_eps1em6 -> rows_rmsnormdw_d96_t32",
        "compile: linear_1 -> 7 launches: rows_splitbf16_d48_t32 -> rows_splitbf16_d48_t32 -> GEMM N 160 K 48 (",
    ] {
        assert!(err.contains(line), "{line}: {err}");
    }
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("compile: all 67 kernels lower for sm_90a"), "{last}");
    // Written, it plans windows of 64 tokens by default (a GPU's inference entries: 4096-token chunks).
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("train");
    let args =
        ["compile", "--model", "deepseek-v3-tiny", "--target", "sm_90a", "--train", "--out", art.to_str().unwrap()];
    let written = text(&run_binary("v3c", &args).stderr);
    assert!(written.contains("plan for rows 64 / context 0"), "{written}");
    assert!(err.contains("compile: moe_experts_grad_0 -> 28 launches: rows_moehidden_d48_k3_t32_keep"), "{err}");
    // The FP8 recipe's step lowers whole too: the projections on the fp8 GEMM template, the experts
    // from their per-expert blocks and 128-pair tiles.
    let fp8 = run_binary(
        "v3c",
        &["compile", "--model", "deepseek-v3-tiny", "--target", "sm_90a", "--train", "--precision", "fp8"],
    );
    let err = text(&fp8.stderr);
    assert!(fp8.status.success(), "{err}");
    assert!(err.lines().last().unwrap().starts_with("compile: all 67 kernels lower for sm_90a"), "{err}");
    // Each expert's Wgrad: the template over the expert's padded pair columns (a K range the device holds).
    let wgrad = "-> rows_padoffsets_d8_t32 -> rows_qpairs_d96_t32 -> ";
    assert!(err.contains("compile: moe_experts_grad_0 -> ") && err.contains(wgrad), "{err}");
    assert!(
        err.contains("-> GEMM M 96 N 48 K an expert's pairs (prefill gemm_fp8_f32_")
            && (err.contains("_krange) ->") || err.contains("_krange_kp) ->")),
        "{err}"
    );
    // The artifact: every launch of the step checked against its kernel's PTX by `v3r info`.
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("a");
    let args = ["compile", "--model", "deepseek-v3-tiny", "--target", "sm_90a", "--train", "--max-rows", "32", "--out"];
    let wrote = run_binary("v3c", &[&args[..], &[art.to_str().unwrap()]].concat());
    assert!(wrote.status.success(), "{}", text(&wrote.stderr));
    let info = run_binary("v3r", &["info", art.to_str().unwrap()]);
    let shown = text(&info.stdout);
    assert!(info.status.success(), "{}", text(&info.stderr));
    assert!(shown.contains("target: sm_90a") && shown.contains("entry train_step: 286 launches"), "{shown}");
    assert!(shown.contains(" template launches of ") && shown.contains("each as its PTX declares"), "{shown}");
    assert!(shown.contains("training: MTP loss weight 0.3"), "{shown}");
    let train = run_binary(
        "v3r",
        &["train", art.to_str().unwrap(), "--weights", "w", "--data", "d", "--steps", "1", "--out", "o"],
    );
    // Its host emulation on one window (the runtime's launch expansion; `--dump` is what a GPU run
    // with V3R_DUMP_DIR is compared against) has the loss `v3c train --backend cpu` logs for it.
    let ckpt = dir.path().join("ckpt");
    let init = run_binary("v3c", &["init-weights", "--model", "deepseek-v3-tiny", "--out", ckpt.to_str().unwrap()]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let window: Vec<String> = (0..34).map(|i| ((i * 7) % 97 + 3).to_string()).collect();
    let data = dir.path().join("window.txt");
    std::fs::write(&data, window.join(" ")).unwrap();
    let emulated = dir.path().join("emulated.safetensors");
    let emulate = run_binary(
        "v3c",
        &[
            "emulate",
            art.to_str().unwrap(),
            "--weights",
            ckpt.to_str().unwrap(),
            "--tokens",
            &window.join(" "),
            "--out",
            emulated.to_str().unwrap(),
        ],
    );
    let err = text(&emulate.stderr);
    assert!(emulate.status.success(), "{err}");
    let loss_of =
        |s: &str| s.split("loss ").nth(1).and_then(|l| l.split(';').next()).map(|l| l.parse::<f32>().unwrap());
    let emulated_loss = loss_of(&err).unwrap_or_else(|| panic!("{err}"));
    assert!(err.contains("on a window of 32 tokens") && emulated.exists(), "{err}");
    let run = dir.path().join("run");
    let cpu = run_binary(
        "v3c",
        &[
            "train",
            "--model-dir",
            ckpt.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
            "--batch",
            "1",
            "--seq",
            "32",
            "--backend",
            "cpu",
            "--out",
            run.to_str().unwrap(),
        ],
    );
    assert!(cpu.status.success(), "{}", text(&cpu.stderr));
    let log = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    let cpu_loss: f32 = log.lines().nth(1).unwrap().split(',').nth(1).unwrap().parse().unwrap();
    assert!((emulated_loss - cpu_loss).abs() <= 1e-5 * cpu_loss.abs(), "emulated {emulated_loss} vs cpu {cpu_loss}");
    // No GPU here: exit 3, nothing written.
    assert_eq!(train.status.code(), Some(3), "{}", text(&train.stderr));
    assert!(text(&train.stderr).starts_with("v3r: error: no CUDA"), "{}", text(&train.stderr));
    assert!(!std::path::Path::new("o").exists());
    let bench = run_binary("v3r", &["bench-train", art.to_str().unwrap(), "--random-weights", "1", "--out", "b.json"]);
    assert_eq!(bench.status.code(), Some(3), "{}", text(&bench.stderr));
    assert!(!std::path::Path::new("b.json").exists());
    // The FP8 recipe with dense layers lowers whole: its fp8 GEMM launches (B a temporary: the
    // master weight quantized in the step) check against the template's PTX too.
    let dense = dir.path().join("dense");
    std::fs::create_dir(&dense).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    config["first_k_dense_replace"] = config["num_hidden_layers"].clone();
    config["num_nextn_predict_layers"] = 0.into();
    std::fs::write(dense.join("config.json"), config.to_string()).unwrap();
    let fp8_art = dir.path().join("fp8");
    let wrote = run_binary(
        "v3c",
        &[
            "compile",
            "--model",
            dense.to_str().unwrap(),
            "--target",
            "sm_90a",
            "--train",
            "--precision",
            "fp8",
            "--max-rows",
            "256",
            "--out",
            fp8_art.to_str().unwrap(),
        ],
    );
    let err = text(&wrote.stderr);
    assert!(wrote.status.success(), "{err}");
    let fprop =
        "compile: fp8_linear_0 -> 4 launches: rows_quantize_d96_t32 -> rows_qblocks_d128_b1_t256 -> GEMM N 48 K 96";
    assert!(err.contains(fprop), "{err}");
    assert!(
        err.contains(
            "compile: fp8_linear_wgrad_0 -> 3 launches: rows_qcolst_d96_t32 -> rows_qcolst_d160_t32 -> GEMM M 96 N 160 \
             K tokens (prefill gemm_fp8_f32_"
        ),
        "{err}"
    );
    let info = run_binary("v3r", &["info", fp8_art.to_str().unwrap()]);
    let shown = text(&info.stdout);
    assert!(info.status.success() && shown.contains("each as its PTX declares"), "{shown}{}", text(&info.stderr));
    assert!(shown.contains("FP8 recipe"), "{shown}");
}

/// `v3c train --backend cpu`: the training graph compiled for this CPU trains a dense tiny model on
/// a repeating pattern like the reference backend does (the same loss log to 1e-4), and the
/// trained checkpoint loads.
#[test]
fn train_on_the_cpu_backend_follows_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (config_dir, ckpt, data) = (dir.path().join("config"), dir.path().join("ckpt"), dir.path().join("data.txt"));
    let mut config: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    config["num_nextn_predict_layers"] = 0.into();
    config["first_k_dense_replace"] = config["num_hidden_layers"].clone();
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("config.json"), config.to_string()).unwrap();
    let init =
        run_binary("v3c", &["init-weights", "--model", config_dir.to_str().unwrap(), "--out", ckpt.to_str().unwrap()]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let pattern = [5, 9, 2, 7, 11, 3, 42, 17];
    let tokens: Vec<String> = (0..300).map(|i| pattern[i % 8].to_string()).collect();
    std::fs::write(&data, tokens.join(" ")).unwrap();
    let mut logs = Vec::new();
    for backend in ["cpu", "reference"] {
        let out = dir.path().join(backend);
        let run = run_binary(
            "v3c",
            &[
                "train",
                "--model-dir",
                ckpt.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "12",
                "--batch",
                "2",
                "--seq",
                "16",
                "--lr",
                "0.01",
                "--backend",
                backend,
            ],
        );
        assert!(run.status.success(), "{backend}: {}", text(&run.stderr));
        assert!(text(&run.stderr).contains(&format!("on the {backend} backend")), "{}", text(&run.stderr));
        let log = std::fs::read_to_string(out.join("loss.csv")).unwrap();
        let losses: Vec<f32> = log.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
        logs.push(losses);
    }
    assert!(logs[0][11] < 0.5 * logs[0][0], "cpu loss {} -> {}", logs[0][0], logs[0][11]);
    for (step, (c, r)) in logs[0].iter().zip(&logs[1]).enumerate() {
        assert!((c - r).abs() <= 1e-4 * r.abs().max(1.0), "step {}: cpu loss {c}, reference {r}", step + 1);
    }
}

/// `v3c tune` measures on this machine's GPU only with somewhere to write (`--out`), and without a
/// GPU says so and names the split flow, before compiling any candidate; `v3r tune` without a GPU
/// exits 3, and refuses a directory that holds no candidate set.
#[test]
fn tuning_without_a_gpu_names_the_split_flow() {
    let out = run_binary("v3c", &["tune", "--model", "deepseek-v3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("give --out tuning.json to measure on this machine's GPU"),
        "{}",
        text(&out.stderr)
    );
    if gpu_or_skip("tuning_without_a_gpu_names_the_split_flow").is_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tuning.json");
        let out = run_binary("v3c", &["tune", "--model", "deepseek-v3", "--out", db.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains("measuring needs this machine's GPU: no CUDA") && err.contains("`v3r tune DIR"), "{err}");
        assert!(!db.exists());
        let out = run_binary("v3r", &["tune", dir.path().to_str().unwrap(), "--out", db.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("candidates.json"), "{}", text(&out.stderr));
    }
}

/// The help texts are part of the interface: flags are stable, so a change shows up here for review.
#[test]
fn help_texts_are_stable() {
    for (tool, args, name) in [
        ("v3c", &["--help"][..], "v3c_help"),
        ("v3c", &["compile", "--help"][..], "v3c_compile_help"),
        ("v3c", &["dump-ir", "--help"][..], "v3c_dump_ir_help"),
        ("v3r", &["--help"][..], "v3r_help"),
        ("v3r", &["run", "--help"][..], "v3r_run_help"),
    ] {
        let out = run_binary(tool, args);
        assert!(out.status.success());
        insta::assert_snapshot!(name, text(&out.stdout));
    }
}

/// `v3c logits` on a committed HF fixture reproduces transformers' logits through the CLI, and
/// `v3c run` generates deterministically (greedy twice, seeded sampling twice).
#[test]
fn logits_and_run_work_on_a_committed_fixture() {
    use v3c_models::checkpoint::Checkpoint;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf/fp8_yarn_mtp");
    let expected = Checkpoint::open_file(&fixture.join("expected.safetensors")).unwrap();
    let tokens: Vec<String> =
        expected.read("tokens").unwrap().as_ids().unwrap().iter().map(|t| t.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let r = run_binary(
        "v3c",
        &[
            "logits",
            "--model-dir",
            fixture.to_str().unwrap(),
            "--tokens",
            &tokens.join(" "),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(r.status.success(), "{}", text(&r.stderr));
    let got = Checkpoint::open_file(&out).unwrap();
    for name in ["logits", "mtp_logits"] {
        let (a, b) = (got.read(name).unwrap(), expected.read(name).unwrap());
        assert_eq!(a.shape, b.shape);
        let diff =
            a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0f32, max_or_nan);
        assert!(diff <= 1e-3, "{name}: {diff}");
    }
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model-dir",
            fixture.to_str().unwrap(),
            "--prompt-tokens",
            "3 1 4 1 5",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        let r = run_binary("v3c", &args);
        assert!(r.status.success(), "{}", text(&r.stderr));
        assert!(text(&r.stderr).contains("tok/s"));
        text(&r.stdout).trim().to_string()
    };
    let greedy = run(&[]);
    assert_eq!(greedy.split(' ').count(), 6, "{greedy}");
    assert_eq!(greedy, run(&[]));
    let sampled = run(&["--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]);
    assert_eq!(sampled, run(&["--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]));
}

/// DeepSeek-V3.2 through the CLI: `v3c logits` (reference and cpu backends) gives transformers'
/// logits for a committed fixture; the built-in `deepseek-v3.2` lowers for sm_90a (its indexer's
/// kernels at full size among them), an fp8 cache is refused in one line; training is refused by
/// name, no checkpoint left.
#[test]
fn deepseek_v32_runs_on_the_cpu_lowers_for_sm90a_and_refuses_training() {
    use v3c_models::checkpoint::Checkpoint;
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf/v32_sparse_f32");
    let expected = Checkpoint::open_file(&fixture.join("expected.safetensors")).unwrap();
    let tokens: Vec<String> =
        expected.read("tokens").unwrap().as_ids().unwrap().iter().map(|t| t.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    for backend in ["reference", "cpu"] {
        let out = dir.path().join(format!("{backend}.safetensors"));
        let args = ["logits", "--model-dir", fixture.to_str().unwrap(), "--tokens", &tokens.join(" ")];
        let r = run_binary("v3c", &[&args[..], &["--backend", backend, "--out", out.to_str().unwrap()]].concat());
        assert!(r.status.success(), "{backend}: {}", text(&r.stderr));
        let (a, b) = (Checkpoint::open_file(&out).unwrap().read("logits").unwrap(), expected.read("logits").unwrap());
        let diff =
            a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0f32, max_or_nan);
        assert!(diff <= 1e-4, "{backend}: {diff}");
    }
    let r = run_binary("v3c", &["compile", "--model", "deepseek-v3.2", "--target", "sm_90a"]);
    let said = text(&r.stderr);
    assert!(r.status.success(), "{said}");
    assert!(said.contains("all 25 kernels lower for sm_90a"), "{said}");
    for kernel in [
        // The indexer's key projection (wk, 128 columns) between q_a's and kv_a's in one GEMM.
        "mla_projections_0 (N 2240 K 7168) decode -> ",
        // The cache row: the latent's norm and rope and the key's LayerNorm and rope, one launch.
        "mla_latent_0 -> rows_latentkey_bf16_d512_r64_k128_t64_eps1em6_keps1em6_il [row kernel",
        // The query latent's two GEMMs (q_b, the indexer's wq_b), each with its heads' RoPE row.
        "-> rows_splitrope_h128_n128_r64_t256_il, + a RoPE table",
        "-> rows_headsrope_h64_d8192_r64_t256, + a RoPE table",
        // Decode's over the caches' bf16 rows (f32 rows: 32.0 us est.).
        "sparse_index_1 -> 2 launches: rows_indexscores_d128_h64_k2048_t128_decode_mma_bf16 [cost model: 18.0 us \
         est., 262144 pairs, memory-bound] -> rows_topkeys_d2048_t256_decode",
        // Prefill's at 4096 queries (over f32 rows 319.9 us est.; the CUDA-core scores',
        // `--prefill-attention rows`: 4390.5 us est.).
        "sparse_index_0 -> 2 launches: rows_indexscores_d128_h64_k2048_t128_prefill_mma_bf16 [cost model: 214.6 us \
         est., 6292480 pairs, tensor-bound]",
        // The attention gathers each query's selected rows itself from the caches' bf16 rows,
        // prefill's and decode's (`_sel16`; decode's over f32 rows, `_sel`: 106.5 us est.).
        "sparse_attention_0 (128 heads) prefill -> mla_decode_kv512_r64_p64_s2_sel16 [cost model:",
        "sparse_attention_1 (128 heads) decode -> mla_decode_kv512_r64_p64_s2_sel16 [cost model: 65.2 us est.",
        "sparse_attention_0 -> 4 launches: rows_mlaabsorbmma_h128_n128_r64_v128_kv512_t128 -> \
         mla_decode_kv512_r64_p64_s2_sel16 (128 heads, split K",
        "sparse_attention_1 -> 4 launches: rows_mlaabsorbmma_h128_n128_r64_v128_kv512_t128 -> \
         mla_decode_kv512_r64_p64_s2_sel16 (128 heads, split K",
        // The caches' new rows: decode's written in place, prefill's after the old rows.
        "cache_write_0 -> rows_cachewrite_d704_t128_bf16",
        "launches: rows_appendbf16_d704_t128_old -> rows_appendbf16_d704_t128_new",
    ] {
        assert!(said.contains(kernel), "{kernel}: {said}");
    }
    // Its caches hold f32 or bf16 rows (the indexer reads its keys beside the latent): no fp8 cache.
    let r = run_binary("v3c", &["compile", "--model", "deepseek-v3.2", "--target", "sm_90a", "--kv-cache", "fp8"]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    assert!(text(&r.stderr).contains("sparse attention reads f32 or bf16 cache rows"), "{}", text(&r.stderr));
    let data = dir.path().join("tokens.txt");
    std::fs::write(&data, (0..64).map(|i| ((i * 7 + 3) % 128).to_string()).collect::<Vec<_>>().join(" ")).unwrap();
    let trained = dir.path().join("trained");
    let args = ["train", "--model-dir", fixture.to_str().unwrap(), "--data", data.to_str().unwrap(), "--seq", "8"];
    let r = run_binary("v3c", &[&args[..], &["--steps", "1", "--out", trained.to_str().unwrap()]].concat());
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    assert!(text(&r.stderr).contains("training DeepSeek Sparse Attention"), "{}", text(&r.stderr));
    assert!(!trained.exists());
}

/// `v3r train` on a training-step artifact (`v3c compile --target cpu --train`) is `v3c train
/// --backend cpu` without the compiler: the same loss log and a byte-identical checkpoint (the MoE +
/// MTP tiny model); it resumes, and refuses an inference artifact and windows longer than planned.
#[test]
fn v3r_trains_from_a_training_artifact_like_v3c_train() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let init = run_binary("v3c", &["init-weights", "--model", "deepseek-v3-tiny", "--out", &p("ckpt")]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let pattern = [5, 9, 2, 7, 11, 3, 42, 17];
    let tokens: Vec<String> = (0..300).map(|i| pattern[i % 8].to_string()).collect();
    std::fs::write(p("data.txt"), tokens.join(" ")).unwrap();
    let compile = run_binary(
        "v3c",
        &["compile", "--model", &p("ckpt"), "--target", "cpu", "--train", "--max-rows", "16", "--out", &p("art")],
    );
    assert!(compile.status.success(), "{}", text(&compile.stderr));
    let common = ["--data", &p("data.txt"), "--steps", "4", "--batch", "2"];
    let v3r =
        run_binary("v3r", &[&["train", &p("art"), "--weights", &p("ckpt"), "--out", &p("v3r")], &common[..]].concat());
    assert!(v3r.status.success(), "{}", text(&v3r.stderr));
    assert!(text(&v3r.stderr).contains("on the cpu artifact backend"), "{}", text(&v3r.stderr));
    let v3c = run_binary(
        "v3c",
        &[&["train", "--model-dir", &p("ckpt"), "--out", &p("v3c"), "--seq", "16", "--backend", "cpu"], &common[..]]
            .concat(),
    );
    assert!(v3c.status.success(), "{}", text(&v3c.stderr));
    let log = |run: &str| std::fs::read_to_string(dir.path().join(run).join("loss.csv")).unwrap();
    assert_eq!(log("v3r"), log("v3c"));
    let weights = |run: &str| std::fs::read(dir.path().join(run).join("model.safetensors")).unwrap();
    assert!(weights("v3r") == weights("v3c"), "the checkpoints differ");
    let resumed = run_binary(
        "v3r",
        &[
            "train",
            &p("art"),
            "--weights",
            &p("ckpt"),
            "--out",
            &p("v3r"),
            "--data",
            &p("data.txt"),
            "--steps",
            "1",
            "--resume",
        ],
    );
    assert!(text(&resumed.stderr).contains("(now at step 5)"), "{}", text(&resumed.stderr));
    let long = run_binary(
        "v3r",
        &[&["train", &p("art"), "--weights", &p("ckpt"), "--out", &p("long"), "--seq", "17"], &common[..]].concat(),
    );
    assert_eq!(long.status.code(), Some(1));
    assert!(text(&long.stderr).contains("planned for windows of up to 16 tokens"), "{}", text(&long.stderr));
    let inference = run_binary("v3c", &["compile", "--model", &p("ckpt"), "--target", "cpu", "--out", &p("inf")]);
    assert!(inference.status.success(), "{}", text(&inference.stderr));
    let refused =
        run_binary("v3r", &[&["train", &p("inf"), "--weights", &p("ckpt"), "--out", &p("x")], &common[..]].concat());
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("not a training-step artifact"), "{}", text(&refused.stderr));
    assert!(!dir.path().join("x").exists() && !dir.path().join("long").exists(), "nothing written");
    // `v3r bench-train` times whole optimizer steps: with made-up near-zero parameters the first
    // loss is that of uniform logits, (1 + MTP weight) ln(vocab); with the checkpoint's it trains.
    let bench = run_binary(
        "v3r",
        &["bench-train", &p("art"), "--random-weights", "3", "--steps", "3", "--batch", "2", "--out", &p("b.json")],
    );
    let shown = text(&bench.stdout);
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    assert!(
        shown.starts_with("train step of 2 x 16 tokens: ") && shown.contains(" tokens/s (cpu artifact, f32)"),
        "{shown}"
    );
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p("b.json")).unwrap()).unwrap();
    let steps = json["steps"].as_array().unwrap();
    assert_eq!((steps.len(), json["batch"].as_u64(), json["seq"].as_u64()), (3, Some(2), Some(16)), "{json}");
    assert_eq!(json["optimizer"], "host", "a cpu artifact's AdamW: {json}");
    let vocab = v3c_models::config::ModelConfig::from_path(std::path::Path::new(&p("ckpt"))).unwrap().vocab_size;
    let uniform = 1.3 * (vocab as f64).ln();
    let first = steps[0]["loss"].as_f64().unwrap();
    assert!((first - uniform).abs() < 0.05, "first loss {first} vs uniform logits' {uniform}");
    for s in steps {
        let parts = ["bind_ms", "run_ms", "optimizer_ms"].map(|k| s[k].as_f64().unwrap());
        assert!(parts.iter().all(|&v| v >= 0.0), "{s}");
        assert!(parts.iter().sum::<f64>() <= s["step_ms"].as_f64().unwrap() * 1.001 + 1e-3, "{s}");
    }
    assert!(json["tokens_per_s"].as_f64().unwrap() > 0.0, "{json}");
    let trained = run_binary("v3r", &["bench-train", &p("art"), "--weights", &p("ckpt"), "--steps", "2"]);
    assert!(trained.status.success(), "{}", text(&trained.stderr));
    let neither = run_binary("v3r", &["bench-train", &p("art")]);
    assert_eq!(neither.status.code(), Some(2), "{}", text(&neither.stderr));
    let not_training = run_binary("v3r", &["bench-train", &p("inf"), "--random-weights", "1"]);
    assert_eq!(not_training.status.code(), Some(1));
    assert!(text(&not_training.stderr).contains("not a training-step artifact"), "{}", text(&not_training.stderr));
    // The targets planned as one row (bound and hash to match): the cross-entropy kernel reads a
    // target per row of logits, as its code's signature says; refused when the kernels load.
    let edited = dir.path().join("edited");
    std::fs::create_dir(&edited).unwrap();
    for e in walk(Path::new(&p("art"))) {
        let to = edited.join(e.strip_prefix(p("art")).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&e, to).unwrap();
    }
    let mut plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(edited.join("plan.json")).unwrap()).unwrap();
    let entry = &mut plan["entries"][0];
    let targets =
        entry["buffers"].as_array().unwrap().iter().position(|b| b["kind"]["Input"]["name"] == "targets").unwrap();
    entry["buffers"][targets]["dims"] = serde_json::json!([{ "constant": 1, "rows": 0, "context": 0 }]);
    entry["buffers"][targets]["shape"] = serde_json::json!([1]);
    entry["buffers"][targets]["bytes"] = 8.into();
    entry["bounds"]["targets"] = serde_json::json!([1]);
    let bytes = serde_json::to_vec(&plan).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(edited.join("manifest.json")).unwrap()).unwrap();
    manifest["plan"]["sha256"] = v3c_runtime::artifact::sha256_hex(&bytes).into();
    std::fs::write(edited.join("plan.json"), &bytes).unwrap();
    std::fs::write(edited.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let out = run_binary(
        "v3r",
        &[&["train", edited.to_str().unwrap(), "--weights", &p("ckpt"), "--out", &p("e")], &common[..]].concat(),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let said = format!("(kernel cross_entropy_0): buffer {targets} (input 'targets') is [1] and buffer ");
    assert!(
        err.contains(&said) && err.ends_with(&format!(", {vocab}]; the kernel reads dim 0 of both as one size\n")),
        "{err}"
    );
    assert!(!dir.path().join("e").exists(), "nothing written");
}

/// `dump-ir --entry train-step`: the training graph in the v3 dialect (its VJPs as dialect ops),
/// its kernels, their CPU lowering and its plan.
#[test]
fn dump_ir_prints_the_training_step() {
    let dump = |extra: &[&str]| {
        run_binary("v3c", &[&["dump-ir", "--model", "deepseek-v3-tiny", "--entry", "train-step"], extra].concat())
    };
    let v3 = dump(&["--stage", "v3"]);
    assert!(v3.status.success(), "{}", text(&v3.stderr));
    for op in ["v3.cross_entropy_grad", "v3.attention_grad", "v3.moe_experts_grad", "v3.balance_loss_grad", "v3.matmul"]
    {
        assert!(text(&v3.stdout).contains(op), "no {op}");
    }
    let fp8 = dump(&["--stage", "v3", "--precision", "fp8"]);
    assert!(text(&fp8.stdout).contains("v3.fp8_linear_wgrad"), "{}", text(&fp8.stderr));
    let kernel = dump(&["--stage", "cpu", "--kernel", "rms_norm_grad_0"]);
    assert!(text(&kernel.stdout).contains("func.func @rms_norm_grad_0("), "{}", text(&kernel.stderr));
    let plan = dump(&["--stage", "plan", "--report", "--max-rows", "16"]);
    assert!(plan.status.success(), "{}", text(&plan.stderr));
    assert!(text(&plan.stderr).contains("report: train_step: "), "{}", text(&plan.stderr));
    assert!(text(&plan.stdout).contains("\"name\": \"train_step\""), "{}", text(&plan.stdout));
}

/// `dump-ir` prints a stage, dumps every stage under V3C_DUMP_DIR/<model>/NN-<stage>.mlir, restarts
/// from a dump with `--from`, and names stages that do not exist yet.
#[test]
fn dump_ir_prints_dumps_and_restarts_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let dump_dir = dir.path().to_str().unwrap();
    let out = v3c_tests::run_binary_env(
        "v3c",
        &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "v3", "--entry", "decode", "--layers", "0..2"],
        &[("V3C_DUMP_DIR", dump_dir)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains("func.func @decode(") && !printed.contains("@prefill"));
    assert!(printed.contains("model.layers.1.mlp.experts.*.gate_proj.weight") && !printed.contains("model.layers.2."));
    let dump = dir.path().join("deepseek-v3-tiny/00-v3.mlir");
    assert_eq!(std::fs::read_to_string(&dump).unwrap(), printed, "the dump is the printed stage");

    let again = run_binary("v3c", &["dump-ir", "--from", dump.to_str().unwrap(), "--stage", "v3"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), printed, "print -> parse -> print is identical");

    let broken = dir.path().join("broken.mlir");
    std::fs::write(&broken, printed.replacen("tensor<?xi64>", "tensor<?xi64", 1)).unwrap();
    let err = run_binary("v3c", &["dump-ir", "--from", broken.to_str().unwrap(), "--stage", "v3"]);
    assert_eq!(err.status.code(), Some(1));
    let msg = text(&err.stderr);
    assert!(msg.starts_with(&format!("v3c: error: MLIR parse failed: {}:2:", broken.display())), "{msg}");
    assert!(msg.contains("expected '>'"), "{msg}");

    let later = run_binary("v3c", &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "gpu"]);
    assert_eq!(later.status.code(), Some(1));
    assert_eq!(
        text(&later.stderr).trim_end(),
        "v3c: error: stage 'gpu' is not implemented yet (available: v3, fused, cpu)"
    );
    let bad = run_binary("v3c", &["dump-ir", "--model", "deepseek-v3-tiny", "--layers", "2..9"]);
    assert_eq!(text(&bad.stderr).trim_end(), "v3c: error: --layers 2..9: the model has 3 layers");
}

/// `dump-ir --stage fused --report` forms deduplicated kernels and reports launches per layer.
#[test]
fn fused_stage_reports_kernels_and_launches() {
    let out = run_binary(
        "v3c",
        &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "fused", "--entry", "decode", "--report"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stderr);
    assert!(report.contains("report: decode: "), "{report}");
    assert!(report.contains("layers 1..3: "), "MoE layers 1 and 2 report the same count: {report}");
    let ir = text(&out.stdout);
    for kind in ["moe_dispatch", "moe_gate_up", "moe_down"] {
        assert!(ir.contains(&format!("attributes {{v3.kernel = \"{kind}\"}}")), "{kind}");
        assert_eq!(ir.matches(&format!("func.func private @{kind}_")).count(), 1, "MoE layers share one {kind} kernel");
        assert_eq!(ir.matches(&format!("call @{kind}_0(")).count(), 3, "{kind} launched for layers 1, 2 and MTP");
    }
    assert!(!ir.contains("v3.moe_experts") && !ir.contains("v3.moe_route"), "fuse-moe rewrote every MoE block");
}

/// `--stage cpu` prints every kernel lowered for the CPU; `--kernel` follows one kernel through the
/// stages; fp8 models say what the CPU does not lower yet.
#[test]
fn cpu_stage_and_single_kernel_dumps() {
    let out = run_binary("v3c", &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "cpu"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ir = text(&out.stdout);
    assert!(ir.contains("func.func @attention_decode_0(") && ir.contains("linalg.generic") && !ir.contains("\"v3."));
    let one =
        run_binary("v3c", &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "cpu", "--kernel", "moe_dispatch_0"]);
    let dump = text(&one.stdout);
    assert!(dump.starts_with("// ----- stage fused: moe_dispatch_0\n"), "{dump}");
    assert!(dump.contains("// ----- stage cpu: moe_dispatch_0\n"), "{dump}");
    assert!(!dump.contains("llvm.func"), "the LLVM dialect only with --llvm");
    let llvm = run_binary(
        "v3c",
        &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "cpu", "--kernel", "moe_dispatch_0", "--llvm"],
    );
    let llvm = text(&llvm.stdout);
    let header =
        llvm.lines().find(|l| l.starts_with("// ----- llvm dialect: moe_dispatch_0 (kernel cache key ")).unwrap();
    let key = header.trim_end_matches(')').rsplit(' ').next().unwrap();
    assert!(key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()), "{header}");
    let body = &llvm[llvm.find(header).unwrap()..];
    assert!(body.contains("llvm.func @_mlir_ciface_moe_dispatch_0(") && !body.contains("linalg."), "{body}");
    let missing = run_binary("v3c", &["dump-ir", "--model", "deepseek-v3-tiny", "--stage", "cpu", "--kernel", "nope"]);
    assert!(
        text(&missing.stderr).starts_with("v3c: error: no kernel 'nope' (kernels: embed_0, "),
        "{}",
        text(&missing.stderr)
    );
    // The full model (fp8 weights) lowers for the CPU in both precisions.
    for precision in ["f32", "fp8"] {
        let full =
            run_binary("v3c", &["dump-ir", "--model", "deepseek-v3", "--stage", "cpu", "--precision", precision]);
        assert!(full.status.success(), "{precision}: {}", text(&full.stderr));
        // e4m3 weights decoded in the templates (bits widened: `arith.extui ... : i8 to i32`).
        assert!(text(&full.stdout).contains(" : i8 to i32"), "{precision}");
    }
}

/// `dump-ir --stage plan` prints the plan as JSON (serde types of the runtime) and reports arenas.
#[test]
fn plan_stage_prints_json_and_reports_arena_peaks() {
    let out = run_binary(
        "v3c",
        &[
            "dump-ir",
            "--model",
            "deepseek-v3-tiny",
            "--stage",
            "plan",
            "--max-rows",
            "2",
            "--max-context",
            "9",
            "--report",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: v3c_runtime::plan::Plan = serde_json::from_slice(&out.stdout).expect("the plan is JSON");
    assert_eq!(plan.format_version, v3c_runtime::plan::PLAN_FORMAT_VERSION);
    assert_eq!(plan.entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["prefill", "decode"]);
    let report = text(&out.stderr);
    assert!(report.contains("report: decode: 49 launches, arena "), "{report}");
    assert!(report.contains(" KiB peak (rows 2, context 9)"), "{report}");
}

/// What the GPU lowering makes is kept in the kernel cache: a second compile takes each kernel's
/// PTX (and, with ptxas, its cubin and ptxas's report) from there — an entry edited in the cache is
/// what the compile then writes or prints — and writes the same artifact; a damaged entry is named,
/// made again and replaced; with the cache off nothing is kept.
#[test]
fn gpu_kernels_are_kept_in_the_kernel_cache() {
    use v3c_compiler::kernel_cache::KernelCache;
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = KernelCache::new(&cache_dir);
    // The artifact's files by name, and what the compile printed.
    let compile = |out: &str| {
        let out = dir.path().join(out);
        let args = ["compile", "--model", "deepseek-v3-tiny", "--target", "sm_90a", "--out", out.to_str().unwrap()];
        let run = run_binary_env("v3c", &args, &[("V3C_KERNEL_CACHE", cache_dir.to_str().unwrap())]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        let mut files: std::collections::BTreeMap<String, Vec<u8>> = std::fs::read_dir(out.join("kernels"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
            .collect();
        for name in ["manifest.json", "plan.json", "lowering.json"] {
            files.insert(name.into(), std::fs::read(out.join(name)).unwrap());
        }
        (text(&run.stderr), files)
    };
    let entries = |ext: &str| -> Vec<String> {
        let paths = std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().path());
        paths
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let only = |files: &std::collections::BTreeMap<String, Vec<u8>>, ext: &str| {
        files.iter().filter(|(name, _)| name.ends_with(ext)).map(|(n, b)| (n.clone(), b.clone())).collect::<Vec<_>>()
    };
    let (first, artifact) = compile("a");
    // Planned by default for prompts in chunks of 4096 tokens (the rows prefill kernels are picked
    // at) and decode steps of 64 sequences.
    assert!(first.contains("plan for rows 4096 (decode: 64 sequences) / context 4096"), "{first}");
    let ptxas = artifact.keys().any(|name| name.ends_with(".cubin"));
    assert!(entries("ptx").len() >= only(&artifact, ".ptx").len());
    assert!(entries("cubin").len() >= only(&artifact, ".cubin").len());
    // The embedding's PTX edited in the cache is what the next compile writes.
    let (ptx_key, ptx) = entries("ptx")
        .into_iter()
        .map(|k| {
            let ptx = cache.load_ptx(&k).expect("a whole entry");
            (k, ptx)
        })
        .find(|(_, ptx)| ptx.contains(".entry rows_embed_bf16_d96_t32("))
        .expect("the tiny model's embedding is kept");
    cache.store_ptx(&ptx_key, &format!("{ptx}// kept in the cache\n")).unwrap();
    // With ptxas: a GEMM's report edited in the cache is what the next compile prints.
    let gemm = "gemm_bf16_f32_64x64x64_s5_a2_kp";
    let shown = |report: &str, registers: &str| {
        report
            .lines()
            .any(|l| l.starts_with(&format!("compile: {gemm}: ")) && l.contains(&format!(", {registers} registers,")))
    };
    let kept_cubin = ptxas.then(|| {
        let (key, cubin, log) = entries("cubin")
            .into_iter()
            .map(|k| {
                let (cubin, log) = cache.load_cubin(&k).expect("a whole entry");
                (k, cubin, log)
            })
            .find(|(_, _, log)| log.contains(&format!("entry function '{gemm}'")))
            .expect("the tiny model's bf16 GEMM is kept");
        let registers = log.split("Used ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        assert!(shown(&first, &registers), "{first}");
        let edited = log.replace(&format!("Used {registers} registers"), "Used 250 registers");
        cache.store_cubin(&key, &cubin, &edited).unwrap();
        (key, registers)
    });
    let (second, edited) = compile("b");
    assert!(kept_cubin.is_none() || shown(&second, "250"), "{second}");
    let embedding = "rows_embed_bf16_d96_t32.ptx";
    assert!(edited[embedding].ends_with(b"}\n// kept in the cache\n"));
    for (name, bytes) in &artifact {
        if !name.starts_with("rows_embed_bf16_d96_t32.") && name != "manifest.json" {
            assert!(edited[name] == *bytes, "{name} differs");
        }
    }
    // Put back, every kernel is the cache's: the same artifact.
    cache.store_ptx(&ptx_key, &ptx).unwrap();
    let (reused, again) = compile("c");
    assert!(again == artifact, "a compile from the cache writes the same artifact");
    let counts = reused.lines().find(|l| l.starts_with("compile: kernel cache ")).unwrap_or_default();
    let made = if ptxas { ", 0 lowered; " } else { ", 0 lowered; 0 cubins reused, 0 assembled" };
    assert!(counts.contains(made) && !counts.contains("PTX of 0 kernels reused"), "{reused}");
    // Damaged entries are misses: named, made again and replaced (ptxas need not make the same
    // bytes twice: the PTX is compared).
    std::fs::write(cache.ptx_path(&ptx_key), b"v3c-ptx-1\n\x05").unwrap();
    if let Some((key, _)) = &kept_cubin {
        std::fs::write(cache.cubin_path(key), b"not an entry").unwrap();
    }
    let (third, rebuilt) = compile("d");
    assert!(third.contains(&format!("{} is unusable (truncated)", cache.ptx_path(&ptx_key).display())), "{third}");
    assert_eq!(only(&rebuilt, ".ptx"), only(&artifact, ".ptx"));
    assert_eq!(cache.load_ptx(&ptx_key), Some(ptx));
    if let Some((key, registers)) = kept_cubin {
        let named = format!("{} is unusable (not a v3c entry of this kind)", cache.cubin_path(&key).display());
        assert!(third.contains(&named), "{third}");
        assert!(shown(&third, &registers), "{third}");
        assert!(third.contains(", 1 lowered; ") && third.contains(" cubins reused, 1 assembled\n"), "{third}");
        let (_, log) = cache.load_cubin(&key).expect("replaced");
        assert!(log.contains(&format!("Used {registers} registers")), "{log}");
    }
    // The cache off keeps nothing.
    let held = std::fs::read_dir(&cache_dir).unwrap().count();
    let off = dir.path().join("off");
    let args = ["compile", "--model", "deepseek-v3-tiny", "--target", "sm_90a", "--out", off.to_str().unwrap()];
    assert!(run_binary("v3c", &args).status.success());
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), held);
}

/// `v3c compile` for sm_90a runs the pipeline, lowers every kernel onto the Hopper templates
/// (reporting the kernels it picked) and writes a whole artifact — PTX and cubins, the plan, the
/// lowering of every fused kernel, the manifest — that `v3r info` validates; a flipped byte in a
/// kernel is named; `v3r run` of it needs the GPU (exit 3 without one); the f32 graph's GEMMs on f32
/// activations are named as unsupported.
#[test]
fn compile_for_sm90a_writes_an_artifact_v3r_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("artifact");
    let out = run_binary(
        "v3c",
        &["compile", "--model", "deepseek-v3", "--target", "sm_90a", "--out", out_dir.to_str().unwrap()],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("compile: gemm_residual_0 (N 7168 K 16384) decode -> gemm_fp8_f32_64x"), "{err}");
    assert!(["_res [cost model: ", "_res_kp [cost model: "].iter().any(|r| err.contains(r)), "{err}");
    assert!(err.contains("-bound]"), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("wrote {} (", out_dir.display())) && last.contains("lowering, manifest)"),
        "{err}"
    );
    assert!(err.contains("\ncaches: prefill bf16, decode bf16 in a pool of 64-row pages\n"), "{err}");
    for (fused, kernel) in [
        (
            "attention_decode_quantize_0",
            "5 launches: rows_mlaabsorbmma_h128_n128_r64_v128_kv512_t128 -> rows_mlalengths_t32 -> \
             mla_decode_kv512_r64_p64_s2_cl2_serial (128 heads, split K, tensor cores) -> rows_mlacombine_d512_t512",
        ),
        (
            "attention_quantize_0",
            "6 launches: rows_quantize_bf16_d512_t64 -> GEMM N 32768 K 512 (prefill gemm_fp8_bf16_",
        ),
        (
            "norm_quantize_0",
            "decode rows_rmsnorm_bf16_d7168_t1024_eps1em6_q, prefill rows_rmsnorm_bf16_d7168_t256_eps1em6_q [row kernel",
        ),
        ("mla_latent_1", "rows_latent_bf16_d512_r64_t64_eps1em6_il_writebf16 [row kernel"),
        ("lm_head_0", "2 launches: rows_splitbf16_d7168_t256 -> GEMM N 129280 K 7168"),
        // Routing: decode's logits in the reference's split order on the CUDA cores; prefill's on the
        // tensor cores (x as bf16 hi + lo through one dual-A GEMM), the selection over whole logits.
        (
            "moe_dispatch_0",
            "6 launches: decode only rows_routelogits_bf16_d7168_e256_t256_b4 -> decode only \
             rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256 -> prefill only rows_splitbf16_d7168_t256 -> GEMM N 256 \
             K 7168 (prefill only gemm_bf16_f32_",
        ),
        ("moe_down_0", "2 launches: rows_copy_d7168_t256 -> grouped GEMM over 257 experts"),
        // The tokens' rows copied into expert order, then a contiguous grouped GEMM (not one gathering
        // each row by TMA).
        (
            "moe_gate_up_quantize_0",
            "3 launches: rows_gatherfp8_d7168_t256 -> grouped GEMM over 257 experts, N 4096 K 7168 (decode \
             gemm_fp8_f32_64x64x128_s5_ws_persist_contig, prefill gemm_fp8_f32_",
        ),
        ("swiglu_0", "2 launches: GEMM N 36864 K 7168 (decode gemm_fp8_f32_"),
    ] {
        assert!(err.contains(&format!("compile: {fused} -> {kernel}")), "{fused}: {err}");
    }
    // Prefill's gate/up is contiguous too (K-pipelined or not).
    let gate_up = err.lines().find(|l| l.starts_with("compile: moe_gate_up_quantize_0 -> ")).unwrap();
    let prefill = gate_up.split("prefill ").nth(1).and_then(|p| p.split(')').next()).unwrap();
    assert!(prefill.trim_end_matches("_kp").ends_with("_persist_contig"), "{gate_up}");
    // The gate's dual-A GEMM (K-pipelined or not) then the selection.
    let gate = ") -> prefill only rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8_p1 -> rows_dispatch";
    assert!(["_a2", "_a2_kp"].iter().any(|form| err.contains(&format!("{form}{gate}"))), "{err}");
    assert!(err.contains("compile: decode: 1300 sm_90a launches per run (627 fused kernels)"), "{err}");
    assert!(err.contains("compile: prefill: 1421 sm_90a launches per run (627 fused kernels)"), "{err}");
    // The manifest records each tunable kernel's configuration per regime and where it came from.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap()).unwrap();
    let tuning = &manifest["tuning"];
    assert_eq!(tuning["source"], "cost-model");
    let choice = |kernel: &str, regime: &str| {
        let all = tuning["choices"].as_array().unwrap();
        all.iter().find(|c| c["kernel"] == kernel && c["regime"] == regime).cloned().unwrap_or_default()
    };
    let decode = choice("attention_decode_quantize_0", "decode");
    assert_eq!(
        (&decode["signature"], &decode["config"]),
        (&"mla_decode kv512 r64 h128".into(), &"mla_decode_kv512_r64_p64_s2_cl2_serial".into())
    );
    assert!(decode["source"].as_str().unwrap().starts_with("cost model: "), "{decode}");
    assert_eq!(choice("attention_quantize_0", "prefill")["config"], "mla_prefill_qk192_v128_s4");
    let o_proj = choice("gemm_residual_0", "decode");
    assert_eq!(o_proj["signature"], "gemm fp8->f32 n7168 k16384 +residual");
    assert!(o_proj["config"].as_str().unwrap().starts_with("gemm_fp8_f32_64x"), "{o_proj}");
    assert_eq!(choice("attention_decode_quantize_0", "prefill"), serde_json::Value::Null, "decode's only");
    // The head: one GEMM over the activations' bf16 hi + lo halves (its weights read once).
    let head = choice("lm_head_0.gemm", "decode");
    assert_eq!(head["signature"], "gemm bf16->f32 n129280 k7168 +a2");
    assert!(head["config"].as_str().unwrap().trim_end_matches("_kp").ends_with("_a2"), "{head}");
    // The norms' widths: decode's few rows on the widest blocks.
    assert_eq!(choice("norm_quantize_0", "decode")["config"], "rows_rmsnorm_bf16_d7168_t1024_eps1em6_q");
    assert_eq!(choice("mla_q_up_0.0", "prefill")["signature"], "rows_rmsnorm_bf16_d1536_eps1em6_q");
    // Greedy sampling's argmax over the vocabulary: one block a row, as wide as they come.
    let argmax = choice("argmax", "decode");
    assert_eq!(
        (&argmax["signature"], &argmax["config"]),
        (&"rows_argmax_d129280".into(), &"rows_argmax_d129280_t1024".into())
    );
    // The runtime reads it back.
    let info = run_binary("v3r", &["info", out_dir.to_str().unwrap()]);
    let stdout = text(&info.stdout);
    assert!(info.status.success(), "{}", text(&info.stderr));
    assert!(stdout.contains("target: sm_90a (compute capability 9.0)"), "{stdout}");
    assert!(
        stdout.contains(
            "lowering: 19 fused kernels as 41 launches (9 with temporaries, 3 reading a RoPE table, 5 in one regime only)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "\n  decode attention_decode_quantize_0 [mla_decode kv512 r64 h128] -> mla_decode_kv512_r64_p64_s2_cl2_serial (cost \
             model: "
        ),
        "{stdout}"
    );
    assert!(stdout.contains("entry decode: 627 launches"), "{stdout}");
    // Shorter prefill chunks' kernels: o_proj at up to 128 rows splits K.
    assert!(
        stdout.contains(
            "\n  prefill (up to 128 rows) gemm_residual_0 [gemm fp8->f32 n7168 k16384 +residual] -> \
             gemm_fp8_f32_128x64x128_s4_splitk_res_kp (cost model: "
        ),
        "{stdout}"
    );
    // A prompt's last chunk: the MTP module's tail left out, the head on the chunk's last row.
    assert!(
        stdout.contains(
            "\n  a prompt's last chunk (its caches, its last row of logits): 618 launches, on its last row alone: lm_head_0\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "tokens picked on the device: greedy by rows_argmax_d129280_t1024, sampled by rows_sample_d129280_t256"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("tokens scored on the device (perplexity): by rows_scores_d129280_t256"), "{stdout}");
    assert!(
        stdout.contains(
            "template launches of 66 kernels at the planned sizes and 6 smaller prefill runs' (where GEMMs take \
             kernels picked for fewer rows), each as its PTX declares"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("device memory: 17.60 GiB weights + 623.68 GiB re-laid out"), "{stdout}");
    // Planned by default for prompts in 4096-token chunks and decode steps of 64 sequences.
    // (4710 MiB: the most bytes live at one launch, where the arena places its largest buffers first.)
    assert!(stdout.contains("entry prefill: 627 launches, 1721 weights, arena 4710.0 MiB for 4096 tokens"), "{stdout}");
    assert!(stdout.contains("arena 64.9 MiB for 64 sequences and 4096 cache rows"), "{stdout}");
    // Tensor-core attention's temporaries: prefill's up-projected keys and values and their bf16
    // heads over 4096 + 4096 rows, decode's pages and splits (587.1 MiB when prompts were planned
    // in 64-token chunks).
    assert!(stdout.contains(", temporaries 1156.1 MiB"), "{stdout}");
    let json = run_binary("v3r", &["info", out_dir.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    // Decode's 1300 launches, prefill's 1421 (a launch of a regime runs in its entries only), the
    // argmax, the sampling and the scoring kernel; and prefill's 1421 again at each of the 6 row
    // counts below which a GEMM launches a kernel picked for fewer rows (64 .. 2048).
    assert_eq!(report["launch_check"]["smaller_runs"], 6, "{report}");
    assert_eq!(report["launch_check"]["launches"], 2724 + 6 * 1421, "{report}");
    assert_eq!(report["device_picks"]["sample"], "rows_sample_d129280_t256", "{report}");
    assert_eq!(report["device_scores"], "rows_scores_d129280_t256", "{report}");
    assert_eq!(report["entries"][1]["name"], "decode");
    assert_eq!(report["target"]["name"], "sm_90a");
    // Every launch the GPU executor would make matches its kernel's PTX, at the planned sizes and
    // at a one-sequence decode (caches of whole 64-row pages) and a short prefill.
    // (One sequence over the whole context: the most splits a sequence takes, within the temporaries
    // region the plan's sizes give.)
    let sizes = [
        ("decode", v3c_runtime::plan::Sizes { pages: 2, ..v3c_runtime::plan::Sizes::new(1, 128) }),
        ("decode", v3c_runtime::plan::Sizes { pages: 64, ..v3c_runtime::plan::Sizes::new(1, 4096) }),
        ("prefill", v3c_runtime::plan::Sizes::new(3, 0)),
    ];
    let (launches, kernels) = v3c_tests::check_gpu_launches(&out_dir, &sizes);
    assert!(launches > 3000 && kernels > 30, "{launches} launches of {kernels} kernels");
    // Running it needs the GPU, asked for before any checkpoint is read: exit 3 without one.
    if gpu_or_skip("v3r_run_without_a_gpu_exits_3").is_none() {
        assert!(stdout.contains("runs here: no ("), "{stdout}");
        let weights = dir.path().to_str().unwrap();
        let run =
            run_binary("v3r", &["run", out_dir.to_str().unwrap(), "--weights", weights, "--prompt-tokens", "1 2"]);
        assert_eq!(run.status.code(), Some(3), "{}", text(&run.stderr));
        let serve = run_binary("v3r", &["serve", out_dir.to_str().unwrap(), "--weights", weights]);
        assert_eq!(serve.status.code(), Some(3), "{}", text(&serve.stderr));
        assert_eq!(text(&serve.stderr).lines().count(), 1, "{}", text(&serve.stderr));
        let bench = run_binary("v3r", &["bench-prefill", out_dir.to_str().unwrap(), "--random-weights", "1"]);
        assert_eq!(bench.status.code(), Some(3), "{}", text(&bench.stderr));
        assert_eq!(text(&bench.stderr).lines().count(), 1, "{}", text(&bench.stderr));
    }
    // Not over an existing artifact without --force; a flipped byte in a kernel is named.
    let again = run_binary(
        "v3c",
        &["compile", "--model", "deepseek-v3", "--target", "sm_90a", "--out", out_dir.to_str().unwrap()],
    );
    assert!(text(&again.stderr).contains("already exists (pass --force to replace it)"), "{}", text(&again.stderr));
    let ptx = std::fs::read_dir(out_dir.join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "ptx"))
        .unwrap();
    let mut bytes = std::fs::read(&ptx).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&ptx, bytes).unwrap();
    let corrupt = run_binary("v3r", &["info", out_dir.to_str().unwrap()]);
    assert_eq!(corrupt.status.code(), Some(1));
    assert!(text(&corrupt.stderr).contains("content hash mismatch"), "{}", text(&corrupt.stderr));
    let mut bytes = std::fs::read(&ptx).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&ptx, bytes).unwrap();
    // A calling convention that disagrees with its kernel's PTX is named before any device is asked.
    let manifest_path = out_dir.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let row = manifest["kernels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|k| k["name"].as_str().unwrap().starts_with("rows_rmsnorm"))
        .unwrap();
    row["abi"]["Memrefs"]["ranks"][0] = serde_json::json!(3);
    let name = row["name"].as_str().unwrap().to_string();
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let wrong = run_binary("v3r", &["info", out_dir.to_str().unwrap()]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong.stdout));
    let err = text(&wrong.stderr);
    assert!(
        err.contains(&name) && (err.contains("its PTX declares") || err.contains("cannot be seen as rank 3")),
        "{err}"
    );
    // A kernel of several launches dumps each of them.
    let dump = run_binary(
        "v3c",
        &["dump-ir", "--stage", "gpu", "--precision", "fp8", "--kernel", "swiglu_0", "--layers", "0..1"],
    );
    let stdout = text(&dump.stdout);
    assert!(dump.status.success(), "{}", text(&dump.stderr));
    assert!(stdout.contains("// swiglu_0: 2 launches through 1 temporaries"), "{stdout}");
    assert!(stdout.contains("// ----- stage gpu: rows_silumul_d18432_t256_q"), "{stdout}");
    // Its GEMMs are the kernels the compile took, after those ptxas passed over (the MoE gate/up's
    // K-pipelined prefill forms spill with ptxas 13.0): before 2026-12-06 the dump showed the cost
    // model's first configuration, which the artifact may not launch. The f32 graph (dump-ir's
    // default) has no such kernel, and the error says which graph the compile built.
    let args =
        ["dump-ir", "--stage", "gpu", "--precision", "fp8", "--kernel", "moe_gate_up_quantize_0", "--layers", "3..4"];
    let dump = run_binary("v3c", &args);
    let stdout = text(&dump.stdout);
    assert!(dump.status.success(), "{}", text(&dump.stderr));
    let shipped: Vec<&str> =
        manifest["kernels"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    let gemms: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("// ----- stage gpu: "))
        .filter(|k| k.starts_with("gemm_"))
        .collect();
    assert_eq!(gemms.len(), 2, "{stdout}");
    assert!(gemms.iter().all(|k| shipped.contains(k)), "{gemms:?} not all in {shipped:?}");
    let passed: Vec<&str> =
        stdout.lines().filter_map(|l| l.strip_prefix("// ")?.split_once(" passed over: ")).map(|p| p.0).collect();
    let compiled = text(&out.stderr);
    assert!(
        passed.iter().all(|k| !shipped.contains(k) && compiled.contains(&format!("compile: {k} passed over: "))),
        "{stdout}"
    );
    let f32 = run_binary("v3c", &args[..3].iter().chain(&args[5..]).copied().collect::<Vec<_>>());
    let why = text(&f32.stderr);
    assert!(why.contains("`v3c compile` builds the fp8 graph of this fp8 checkpoint: --precision fp8"), "{why}");
    // The f32 graph's GEMMs read f32 activations: the message says why, and nothing is written.
    let f32_dir = dir.path().join("f32");
    let f32 = run_binary(
        "v3c",
        &[
            "compile",
            "--model",
            "deepseek-v3",
            "--target",
            "sm_90a",
            "--precision",
            "f32",
            "--out",
            f32_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(f32.status.code(), Some(1));
    let err = text(&f32.stderr);
    assert!(err.contains("of 17 kernels") && err.contains("gemm_residual_0 (linear on f32 activations"), "{err}");
    assert!(!f32_dir.exists(), "no partial artifact");
}

/// `v3c compile --target cpu`: cold, every kernel is JIT-compiled and stored in the kernel cache;
/// warm, every kernel comes from it. `--out` writes a whole artifact, never over an existing one.
#[test]
fn compile_for_the_cpu_fills_and_reuses_the_kernel_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let env = [("V3C_KERNEL_CACHE", cache.to_str().unwrap())];
    let out = run_binary_env("v3c", &["compile", "--model", "deepseek-v3-tiny", "--target", "cpu"], &env);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let count = |s: &str, what: &str| -> usize {
        let at = s.find(what).unwrap_or_else(|| panic!("no '{what}' in: {s}"));
        s[..at].rsplit(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let kernels = count(&err, " kernels (");
    assert!(kernels > 5, "{err}");
    assert_eq!(count(&err, " JIT-compiled)"), kernels, "cold: {err}");
    let stored = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "so"))
        .count();
    assert_eq!(stored, kernels);
    let artifact = dir.path().join("artifact");
    let args = ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--out", artifact.to_str().unwrap()];
    let out = run_binary_env("v3c", &args, &env);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(count(&err, " from the kernel cache"), kernels, "warm: {err}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(artifact.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["target"]["name"], "cpu");
    let listed = manifest["kernels"].as_array().unwrap();
    assert_eq!(listed.len(), kernels);
    for k in listed {
        assert!(artifact.join(k["file"].as_str().unwrap()).is_file(), "{k}");
    }
    let plan: v3c_runtime::plan::Plan =
        serde_json::from_str(&std::fs::read_to_string(artifact.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan.entries.len(), 2);
    // Existing output: refused, untouched, and nothing staged is left beside it.
    let out = run_binary_env("v3c", &args, &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already exists (pass --force to replace it)"), "{}", text(&out.stderr));
    assert!(artifact.join("manifest.json").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".v3c-artifact"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // `v3c cache` says what is held; a cache over V3C_KERNEL_CACHE_MAX is trimmed after the
    // command, least recently used first; `--trim` and `--clear` on demand.
    let show = |extra: &[&str], env: &[(&str, &str)]| {
        let out = run_binary_env("v3c", &[&["cache"][..], extra].concat(), env);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let held = show(&[], &env);
    let line = format!("kernel cache {}: {kernels} CPU kernels, 0 PTX, 0 cubins, ", cache.display());
    assert!(held.contains(&line) && held.contains("; held to 2048.0 MiB (V3C_KERNEL_CACHE_MAX)"), "{held}");
    let objects = || -> Vec<std::path::PathBuf> {
        let paths = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path());
        paths.filter(|p| p.extension().is_some_and(|x| x == "so")).collect()
    };
    // The kernels last used an hour ago; compiling the training step under a 1-byte limit then
    // removes every one it does not use, and spares those it used (within the last ten minutes:
    // another compiler might be copying them).
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for p in objects() {
        std::fs::File::options().append(true).open(&p).unwrap().set_modified(hour_ago).unwrap();
    }
    let bounded = [env[0], ("V3C_KERNEL_CACHE_MAX", "1")];
    let train = ["compile", "--model", "deepseek-v3-tiny", "--target", "cpu", "--train"];
    let out = run_binary_env("v3c", &train, &bounded);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let used = count(&err, " kernels (");
    let fresh = |p: &std::path::PathBuf| std::fs::metadata(p).unwrap().modified().unwrap() > hour_ago;
    let kept = objects();
    assert!(kept.len() == used && kept.iter().all(fresh), "{err}");
    let removed = kernels + count(&err, " JIT-compiled)") - used;
    assert!(removed > 0, "{err}");
    let said = format!("kernel cache {}: removed the {removed} least recently used entries (", cache.display());
    assert!(err.contains(&said), "{err}");
    let kept = kept.len();
    let bad = run_binary_env("v3c", &["cache"], &[env[0], ("V3C_KERNEL_CACHE_MAX", "2 parsecs")]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("V3C_KERNEL_CACHE_MAX=2 parsecs: unknown unit 'parsecs'"),
        "{}",
        text(&bad.stderr)
    );
    let trimmed = show(&["--trim", "0"], &env);
    assert!(trimmed.contains(&format!("removed {kept} entries")), "{trimmed}");
    assert!(trimmed.contains(": 0 CPU kernels, 0 PTX, 0 cubins, 0.0 MiB;"), "{trimmed}");
    let out = run_binary_env("v3c", &["compile", "--model", "deepseek-v3-tiny", "--target", "cpu"], &env);
    assert_eq!(count(&text(&out.stderr), " JIT-compiled)"), kernels, "emptied: {}", text(&out.stderr));
    let cleared = show(&["--clear"], &env);
    assert!(
        cleared.contains(&format!("removed {kernels} entries")) && cleared.contains(": 0 CPU kernels"),
        "{cleared}"
    );
    assert!(show(&[], &[("V3C_KERNEL_CACHE", "off")]).starts_with("kernel cache off"));
}

/// `dump-ir --stage gpu|nvvm|ptx --kernel NAME` follows a Hopper template kernel down to PTX (with
/// ptxas's report when present); a kernel without a Hopper lowering says so and exits 1.
#[test]
fn gpu_stages_of_a_template_kernel() {
    let out = run_binary("v3c", &["dump-ir", "--stage", "ptx", "--kernel", "gemm_bf16_bf16_128x128x64_s4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dump = text(&out.stdout);
    for header in ["// ----- stage gpu: ", "// ----- stage nvvm: ", "// ----- stage ptx: "] {
        assert!(dump.contains(&format!("{header}gemm_bf16_bf16_128x128x64_s4")), "{header}");
    }
    assert!(dump.contains("nvgpu.tma.async.load") && dump.contains("nvvm.wgmma.mma_async"));
    assert!(
        dump.contains(".entry gemm_bf16_bf16_128x128x64_s4(")
            && dump.contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16")
    );
    let gpu = run_binary("v3c", &["dump-ir", "--stage", "gpu", "--kernel", "gemm_fp8_f32_64x128x128_s6"]);
    assert!(gpu.status.success(), "{}", text(&gpu.stderr));
    assert!(!text(&gpu.stdout).contains("// ----- stage nvvm"), "stage gpu stops at the gpu module");
    let none = run_binary("v3c", &["dump-ir", "--stage", "ptx", "--kernel", "attention_0"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        text(&none.stderr).starts_with("v3c: error: unsupported on sm_90a: attention_0 "),
        "{}",
        text(&none.stderr)
    );
    let bad = run_binary("v3c", &["dump-ir", "--stage", "ptx", "--kernel", "gemm_bf16_f32_96x128x64_s4"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("block_m 96 is not a multiple of 64"), "{}", text(&bad.stderr));
    // A kernel of the model that is a GEMM: its fused function, then both template kernels it launches.
    let args = ["dump-ir", "--stage", "nvvm", "--kernel", "gemm_residual_0", "--precision", "fp8", "--layers", "0..1"];
    let model = run_binary("v3c", &args);
    assert!(model.status.success(), "{}", text(&model.stderr));
    let dump = text(&model.stdout);
    assert!(dump.starts_with("// ----- stage fused: gemm_residual_0\n"), "{dump}");
    assert_eq!(dump.matches("// ----- stage nvvm: gemm_fp8_f32_").count(), 2, "decode and prefill kernels");
    assert!(dump.contains("decode launches gemm_fp8_f32_64x") && dump.contains("(cost model: "), "{dump}");
    // And the kernels of shorter prefill chunks (o_proj at up to 128 rows splits K).
    assert!(dump.contains("\n// a prefill chunk of up to 128 rows launches gemm_fp8_f32_128x64x128_"), "{dump}");
    let typo =
        run_binary("v3c", &["dump-ir", "--stage", "ptx", "--kernel", "gemm_bf16_f32_128x128x64", "--layers", "0..1"]);
    assert_eq!(typo.status.code(), Some(1));
    assert!(text(&typo.stderr).contains("not a template kernel (gemm_<bf16|fp8>_"), "{}", text(&typo.stderr));
}

/// The larger of a running max of differences and the next one, NaN once either is NaN (an
/// unwritten output poisoned with NaN, or a NaN result, must fail a tolerance check, which
/// `f32::max` would hide by ignoring NaN).
fn max_or_nan(m: f32, d: f32) -> f32 {
    if m.is_nan() || d.is_nan() {
        f32::NAN
    } else {
        m.max(d)
    }
}
