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
    // Weights the GPU takes as stored (e4m3 bits, f32 scales, bf16) are the loader's values exactly.
    let weights = v3c_runtime::gpu::Weights::Checkpoint(&ck);
    for (name, (shape, dtype)) in &shapes {
        let planned = v3c_runtime::cpu::load_weight(&ck, name, shape, dtype).unwrap();
        let loaded = v3c_runtime::gpu::plan_bytes(&planned, dtype).unwrap();
        assert_eq!(weights.bytes(name, shape, dtype).unwrap(), loaded, "{name}");
    }
    for p in &prepared {
        let (b, s) = v3c_runtime::gpu::prepare_weight(p, &source).unwrap();
        assert_eq!(b.len(), p.rows * p.k, "{}", p.key);
        let s = s.expect("fp8 weights come with scales");
        assert_eq!(s.len(), 4 * p.rows.div_ceil(128) * p.k.div_ceil(128), "{}", p.key);
    }
}

/// Host memory standing in for the device: 256-byte aligned allocations kept alive.
#[derive(Default)]
struct HostMemory(Vec<Vec<u64>>);

impl HostMemory {
    fn alloc_zeroed(&mut self, bytes: usize) -> u64 {
        v3c_runtime::gpu::Memory::alloc(self, bytes, "scratch").unwrap()
    }
}

impl v3c_runtime::gpu::Memory for HostMemory {
    fn alloc(&mut self, bytes: usize, _: &str) -> Result<u64, String> {
        let mut v = vec![0u64; bytes.div_ceil(8) + 32];
        let addr = (v.as_mut_ptr() as u64).next_multiple_of(256);
        self.0.push(v);
        Ok(addr)
    }

    fn upload(&mut self, bytes: &[u8], what: &str) -> Result<u64, String> {
        let addr = self.alloc(bytes.len(), what)?;
        // SAFETY: the allocation holds `bytes.len()` bytes past its aligned address.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(addr)
    }
}

/// What a GEMM template launch computes, read from its parameters the way the kernel reads them
/// (tensor maps for A and B, then the memrefs in the template's order): `out = A . B^T` per
/// 128-wide K block with the 1x128 / 128x128 scales (fp8), grouped rows by offsets (gathered
/// through the permutation, weighted by the row scale, scattered into token rows), plus residual.
fn emulate_gemm(abi: &v3c_runtime::abi::GemmAbi, l: &v3c_runtime::abi::KernelLaunch) {
    use v3c_models::dtype::{bf16_to_f32, f8e4m3_to_f32};
    use v3c_runtime::abi::Param;
    let v: Vec<u64> =
        l.params[2..].iter().map(|p| if let Param::Value(v) = p { *v } else { panic!("{p:?}") }).collect();
    let mut at = 0;
    let mut memref = |rank: usize| {
        let (ptr, sizes) = (v[at + 1], v[at + 3..at + 3 + rank].iter().map(|&d| d as usize).collect::<Vec<usize>>());
        at += 3 + 2 * rank;
        (ptr, sizes)
    };
    let out = memref(2);
    let fp8 = abi.input == "fp8";
    let (a_scale, b_scale) = if fp8 { (Some(memref(2)), Some(memref(2))) } else { (None, None) };
    let (mut offsets, mut perm) = (None, None);
    match abi.grouping.as_str() {
        "dense" => {}
        "contiguous" => {
            offsets = Some(memref(1));
            if abi.scatter {
                perm = Some(memref(1));
            }
        }
        "gather" => {
            offsets = Some(memref(1));
            perm = Some(memref(1));
        }
        other => panic!("{other}"),
    }
    let row_scale = abi.row_scale.then(|| memref(1));
    let residual = abi.residual.then(|| memref(2));
    let k = *v.last().unwrap() as usize;
    let (a, b) = (&l.tensor_maps[0], &l.tensor_maps[1]);
    // SAFETY: every address is a live host allocation of the sizes the launch names.
    let f32_at = |ptr: u64, i: usize| unsafe { *(ptr as *const f32).add(i) };
    let i32_at = |ptr: u64, i: usize| unsafe { *(ptr as *const i32).add(i) };
    let el = |t: &v3c_runtime::abi::TensorMapSpec, row: usize, col: usize| unsafe {
        if fp8 {
            f8e4m3_to_f32(*(t.addr as *const u8).add(row * t.cols + col))
        } else {
            bf16_to_f32(*(t.addr as *const u16).add(row * t.cols + col))
        }
    };
    let kb = k.div_ceil(128);
    let dot = |arow: usize, brow: usize| -> f32 {
        let mut acc = 0f32;
        for blk in 0..kb {
            let mut part = 0f32;
            for c in blk * 128..((blk + 1) * 128).min(k) {
                part += el(a, arow, c) * el(b, brow, c);
            }
            let scale = match (&a_scale, &b_scale) {
                (Some((sa, sas)), Some((sb, sbs))) => {
                    f32_at(*sa, arow * sas[1] + blk) * f32_at(*sb, brow / 128 * sbs[1] + blk)
                }
                _ => 1.0,
            };
            acc += part * scale;
        }
        acc
    };
    let (optr, n_out) = (out.0, out.1[1]);
    let write = |row: usize, col: usize, value: f32, add: bool| unsafe {
        let p = (optr as *mut f32).add(row * n_out + col);
        *p = if add { *p + value } else { value };
    };
    match offsets {
        None => {
            for m in 0..out.1[0] {
                for n in 0..n_out {
                    let r = residual.as_ref().map_or(0.0, |(p, _)| f32_at(*p, m * n_out + n));
                    write(m, n, dot(m, n) + r, false);
                }
            }
        }
        Some((optr_offsets, osizes)) => {
            let groups = osizes[0] - 1;
            let n = b.rows / groups;
            for g in 0..groups {
                for p in i32_at(optr_offsets, g) as usize..i32_at(optr_offsets, g + 1) as usize {
                    let token = perm.as_ref().map(|(pp, _)| i32_at(*pp, p) as usize);
                    let arow = if abi.grouping == "gather" { token.unwrap() } else { p };
                    let w = row_scale.as_ref().map_or(1.0, |(rp, _)| f32_at(*rp, p));
                    for col in 0..n {
                        let value = dot(arow, g * n + col) * w;
                        if abi.scatter {
                            write(token.unwrap(), col, value, true);
                        } else {
                            write(p, col, value, false);
                        }
                    }
                }
            }
        }
    }
}

/// The GPU executor's whole walk — weights prepared and bound, inputs, temporaries, RoPE tables,
/// every template launch with its parameters, the strided result copies — run on the host: row
/// kernels through their CPU lowering (the same template, JIT-compiled), GEMMs by [`emulate_gemm`]
/// from their parameters. Prefill and a decode step give the CPU backend's logits: what is left
/// for the GPU to prove is the kernels themselves.
#[test]
fn the_gpu_launches_emulated_on_the_host_give_the_cpu_backends_logits() {
    use std::collections::HashMap;
    use v3c_runtime::abi::KernelAbi;
    use v3c_runtime::gpu::{Action, Expander};
    use v3c_runtime::host::{call_packed, HostBuffer, HostData, RawBuffer};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = small_checkpoint(dir.path());
    let out = dir.path().join("artifact");
    let compile = [
        "compile",
        "--model",
        ckpt.to_str().unwrap(),
        "--target",
        "sm_90a",
        "--max-rows",
        "8",
        "--max-context",
        "16",
        "--out",
        out.to_str().unwrap(),
    ];
    let compiled = run_binary("v3c", &compile);
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let artifact = v3c_runtime::artifact::Artifact::open(&out).unwrap();
    let expander = Expander::new(&artifact).unwrap();
    let checkpoint = v3c_models::checkpoint::Checkpoint::open(&ckpt).unwrap();
    let mut memory = HostMemory::default();
    let (mut bindings, input_bytes) = v3c_runtime::gpu::bind(
        &expander,
        &v3c_runtime::gpu::Weights::Checkpoint(&checkpoint),
        &mut memory,
        &mut |_| {},
    )
    .unwrap();
    // The routed experts' stacks feed the grouped weights only: they get no memory of their own.
    assert!(bindings.weights.keys().all(|w| !w.contains(".experts.*.")), "{:?}", bindings.weights.keys());
    assert!(bindings.weights.contains_key("model.layers.1.mlp.gate.weight"));
    let abis: HashMap<&str, &KernelAbi> =
        artifact.manifest.kernels.iter().map(|k| (k.name.as_str(), k.abi.as_ref().unwrap())).collect();
    let context = v3c_compiler::mlir::new_context();
    let mut engines: HashMap<String, melior::ExecutionEngine> = HashMap::new();

    // A row kernel's launch run through its CPU lowering (the same template), on host memory.
    let mut exec_row = |k: &v3c_runtime::abi::KernelLaunch, ranks: &[usize]| {
        let row = v3c_compiler::conversion::sm90::rows::RowKernel::from_name(&k.kernel).unwrap();
        let engine = engines.entry(k.kernel.clone()).or_insert_with(|| {
            let text = row.emit_cpu().unwrap();
            let m = v3c_compiler::conversion::v3_to_cpu::lower_to_llvm(&context, &text, "step").unwrap();
            melior::ExecutionEngine::new(&m, 2, &[], false, false)
        });
        let values: Vec<u64> = k
            .params
            .iter()
            .map(|p| match p {
                v3c_runtime::abi::Param::Value(v) => *v,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut at = 0;
        let bufs: Vec<RawBuffer> = ranks
            .iter()
            .map(|&r| {
                let b = RawBuffer {
                    ptr: values[at + 1] as *mut (),
                    shape: values[at + 3..at + 3 + r].iter().map(|&d| d as usize).collect(),
                    element: String::new(),
                };
                at += 3 + 2 * r;
                b
            })
            .collect();
        // SAFETY: buffers bound by the expansion, sized by the plan.
        unsafe { call_packed(&bufs, false, 0, 1, |args| engine.invoke_packed(&row.kernel_name(), args).unwrap()) };
    };

    let mut run = |entry: &str, inputs: &HashMap<String, HostBuffer>, wanted: &[&str]| {
        let plan = expander.entry(entry).unwrap();
        let sizes = plan.bind(&inputs.iter().map(|(n, b)| (n.clone(), b.shape.clone())).collect()).unwrap();
        let (_, need) = expander.expand(plan, sizes, &bindings, 132).unwrap();
        bindings.workspace = memory.alloc_zeroed(need.workspace_bytes);
        bindings.counters = memory.alloc_zeroed(need.counters * 4);
        let (actions, _) = expander.expand(plan, sizes, &bindings, 132).unwrap();
        for (name, b) in inputs {
            let dtype = &plan
                .buffers
                .iter()
                .find(|p| matches!(&p.kind, v3c_runtime::plan::BufferKind::Input { name: n } if n == name))
                .unwrap()
                .dtype;
            let bytes = v3c_runtime::gpu::plan_bytes(b, dtype).unwrap();
            assert!(bytes.len() <= input_bytes[name]);
            // SAFETY: within the input's allocation (checked).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), bindings.inputs[name] as *mut u8, bytes.len()) };
        }
        for a in &actions {
            match a {
                Action::Kernel(k) => match abis[k.kernel.as_str()] {
                    KernelAbi::Gemm(g) => emulate_gemm(g, k),
                    KernelAbi::Memrefs { ranks } => exec_row(k, ranks),
                },
                Action::Copy2D { src, src_pitch, dst, dst_pitch, width, rows } => {
                    for r in 0..*rows {
                        // SAFETY: rows inside the buffers the expansion named.
                        unsafe {
                            std::ptr::copy(
                                (*src as usize + r * src_pitch) as *const u8,
                                (*dst as usize + r * dst_pitch) as *mut u8,
                                *width,
                            )
                        };
                    }
                }
            }
        }
        let mut outs = HashMap::new();
        for (name, id) in &plan.outputs {
            if !wanted.contains(&name.as_str()) {
                continue;
            }
            let b = &plan.buffers[*id];
            let shape = v3c_runtime::plan::shape_at(&b.dims, sizes);
            let bytes = shape.iter().product::<usize>() * v3c_runtime::plan::element_bytes(&b.dtype).unwrap() as usize;
            let addr = match &b.kind {
                v3c_runtime::plan::BufferKind::Arena { offset } => bindings.arena + offset,
                v3c_runtime::plan::BufferKind::Input { name } => bindings.inputs[name],
                v3c_runtime::plan::BufferKind::Weight { name } => bindings.weights[name],
            };
            // SAFETY: the output lies in memory the plan sized.
            let host = unsafe { std::slice::from_raw_parts(addr as *const u8, bytes) };
            outs.insert(name.clone(), v3c_runtime::gpu::host_buffer(host, shape, &b.dtype).unwrap());
        }
        outs
    };

    // The CPU backend on the same checkpoint, fp8.
    let config = v3c_models::config::ModelConfig::from_json_str(
        &std::fs::read_to_string(ckpt.join("config.json")).unwrap(),
        "small",
    )
    .unwrap();
    let cpu_context = v3c_compiler::mlir::new_context();
    let program = v3c_compiler::cpu_backend::CpuProgram::new(
        &cpu_context,
        &config,
        &v3c_models::Entry::ALL,
        false,
        v3c_models::Precision::Fp8,
        &checkpoint,
    )
    .unwrap();
    let ids = |v: Vec<i64>| HostBuffer { shape: vec![v.len()], data: HostData::I64(v) };
    let width = config.latent_dim();
    let caches = ["kv_cache.0", "kv_cache.1", "kv_cache.mtp"];
    let mut inputs = HashMap::new();
    inputs.insert("tokens".to_string(), ids(vec![3, 90, 27, 311, 243, 7]));
    inputs.insert("positions".to_string(), ids((0..6).collect()));
    inputs.insert("mtp_tokens".to_string(), ids(vec![90, 27, 311, 243, 7, 0]));
    for c in caches {
        inputs.insert(c.to_string(), HostBuffer { shape: vec![0, width], data: HostData::F32(Vec::new()) });
    }
    let wanted = ["logits", "mtp_logits", "kv_cache.0", "kv_cache.1", "kv_cache.mtp"];
    let compare = |what: &str, got: &HostBuffer, want: &HostBuffer| {
        let (HostData::F32(g), HostData::F32(w)) = (&got.data, &want.data) else { panic!("{what}: not f32") };
        assert_eq!(got.shape, want.shape, "{what}");
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{what}: max |diff| {diff:.3e}, max |value| {scale:.3e}");
        assert!(diff <= 1e-3 * scale.max(1e-6), "{what}: max |diff| {diff} vs max |value| {scale}");
    };
    let gpu = run("prefill", &inputs, &wanted);
    let cpu = program.run("prefill", &inputs, &wanted).unwrap();
    for name in wanted {
        compare(&format!("prefill {name}"), &gpu[name], &cpu[name]);
    }
    // A second prefill chunk after the 6 cached rows (the latent rows appended, attention over
    // cached and new keys).
    let mut more = HashMap::new();
    more.insert("tokens".to_string(), ids(vec![44, 2, 19]));
    more.insert("positions".to_string(), ids(vec![6, 7, 8]));
    more.insert("mtp_tokens".to_string(), ids(vec![2, 19, 0]));
    for c in caches {
        more.insert(c.to_string(), cpu[c].clone());
    }
    let gpu = run("prefill", &more, &wanted);
    let chunk = program.run("prefill", &more, &wanted).unwrap();
    for name in wanted {
        compare(&format!("prefill after 6 {name}"), &gpu[name], &chunk[name]);
    }
    // A decode step of two sequences over caches of 11 rows: the first at position 6 after the
    // first prefill, the second at position 9 after both (then zeros).
    let mut step = HashMap::new();
    step.insert("tokens".to_string(), ids(vec![5, 77]));
    step.insert("positions".to_string(), ids(vec![6, 9]));
    step.insert("mtp_tokens".to_string(), ids(vec![0, 0]));
    for c in caches {
        let mut data = Vec::new();
        for seq in [&cpu[c], &chunk[c]] {
            let HostData::F32(rows) = &seq.data else { panic!() };
            let mut rows = rows.clone();
            rows.resize(11 * width, 0.0);
            data.extend(rows);
        }
        step.insert(c.to_string(), HostBuffer { shape: vec![2, 11, width], data: HostData::F32(data) });
    }
    let gpu = run("decode", &step, &wanted);
    let cpu = program.run("decode", &step, &wanted).unwrap();
    for name in wanted {
        compare(&format!("decode {name}"), &gpu[name], &cpu[name]);
    }
    // Greedy sampling on the device: the artifact's argmax kernel over the decode logits picks what
    // the host sampler picks.
    let mut logits = gpu["logits"].clone();
    let mut idx = vec![-1i32; logits.shape[0]];
    let buf =
        v3c_runtime::abi::Buf { addr: logits.ptr_mut() as u64, shape: logits.shape.clone(), element: "f32".into() };
    let launch = expander.argmax_launch(&buf, idx.as_mut_ptr() as u64).unwrap().expect("an argmax kernel");
    let KernelAbi::Memrefs { ranks } = abis[launch.kernel.as_str()] else { panic!("not a row kernel") };
    exec_row(&launch, ranks);
    let HostData::F32(rows) = &logits.data else { panic!() };
    let vocab = logits.shape[1];
    let host: Vec<i32> =
        rows.chunks(vocab).map(|r| v3c_models::reference::Sampler::new(0.0, 1.0, 0).sample(r) as i32).collect();
    assert_eq!(idx, host);
}
