//! The Hopper GEMM template: every configuration the model needs generates, lowers to LLVM, emits
//! PTX for sm_90a, and (with ptxas present, as in CI after bootstrap) assembles with no spills; the
//! SASS uses the tensor cores the way the template says (HGMMA for bf16, QGMMA for e4m3, UTMALDG for
//! TMA loads) with no local-memory traffic. Nothing here runs on a GPU.

use std::process::Command;

use v3c_compiler::conversion::sm90::gemm::{GemmConfig, GemmGrouping, GemmInput, GemmOutput};
use v3c_compiler::conversion::sm90::{self};
use v3c_compiler::{target, toolchain};
use v3c_runtime::lowering::Regime;

fn configs() -> Vec<GemmConfig> {
    let mut v = Vec::new();
    for (input, block_m, block_n, stages) in [
        (GemmInput::Bf16, 128, 128, 4),
        (GemmInput::Bf16, 64, 256, 4),
        (GemmInput::Bf16, 64, 64, 2),
        (GemmInput::Fp8, 64, 128, 6),
        (GemmInput::Fp8, 128, 64, 4),
    ] {
        for output in [GemmOutput::F32, GemmOutput::Bf16] {
            v.push(GemmConfig::new(input, output, block_m, block_n, stages));
        }
    }
    v.extend(variants());
    v
}

/// The scheduling and epilogue variants: two consumer warpgroups, a producer warpgroup, persistent
/// rasterized tile loops, split K with the workspace reduction, the residual epilogue, per-row B
/// scales.
fn variants() -> Vec<GemmConfig> {
    let bf16 = GemmConfig::new(GemmInput::Bf16, GemmOutput::Bf16, 128, 128, 4);
    let fp8 = GemmConfig::new(GemmInput::Fp8, GemmOutput::Bf16, 128, 128, 6);
    vec![
        GemmConfig { consumers: 2, ..bf16 },
        GemmConfig { consumers: 2, specialized: true, persistent: true, raster: 8, ..bf16 },
        GemmConfig { block_m: 64, specialized: true, ..bf16 },
        GemmConfig { consumers: 2, specialized: true, persistent: true, raster: 8, ..fp8 },
        GemmConfig { consumers: 2, specialized: true, persistent: true, raster: 4, residual: true, ..fp8 },
        GemmConfig { block_m: 64, stages: 8, specialized: true, split_k: true, residual: true, ..fp8 },
        GemmConfig { output: GemmOutput::F32, block_m: 64, stages: 6, split_k: true, ..bf16 },
        // A cluster of two: B tiles multicast to both blocks.
        GemmConfig { consumers: 2, specialized: true, persistent: true, raster: 8, cluster: 2, ..fp8 },
        // Wgrad's form (B scales per row, each output column promoted with its own): as the FP8
        // training step picks it, and with split K over few tokens.
        GemmConfig { output: GemmOutput::F32, consumers: 2, specialized: true, b_row_scales: true, ..fp8 },
        GemmConfig { output: GemmOutput::F32, block_m: 64, stages: 5, split_k: true, b_row_scales: true, ..fp8 },
        // One expert's Wgrad: K (its pairs) a range the device holds.
        GemmConfig {
            output: GemmOutput::F32,
            consumers: 2,
            specialized: true,
            persistent: true,
            b_row_scales: true,
            k_range: true,
            ..fp8
        },
        // A second A (f32 activations as bf16 hi + lo, the weights read once): one block per tile,
        // split K with the residual (decode's head), and a producer with a cluster of two.
        GemmConfig { output: GemmOutput::F32, dual_a: true, ..bf16 },
        GemmConfig {
            output: GemmOutput::F32,
            block_m: 64,
            stages: 6,
            split_k: true,
            residual: true,
            dual_a: true,
            ..bf16
        },
        GemmConfig {
            output: GemmOutput::F32,
            consumers: 2,
            specialized: true,
            persistent: true,
            raster: 8,
            cluster: 2,
            residual: true,
            dual_a: true,
            ..bf16
        },
        // K tiles pipelined through the tensor cores (`wgmma.wait_group 1`): fp8 decode's split K
        // with the residual (one consumer, a block barrier a tile), two consumers over a ring of
        // two, a producer with a cluster of two, per-row B scales; bf16 persistent, and split K
        // with a second A.
        GemmConfig {
            output: GemmOutput::F32,
            block_m: 64,
            block_n: 64,
            stages: 5,
            split_k: true,
            residual: true,
            k_pipelined: true,
            ..fp8
        },
        GemmConfig { output: GemmOutput::F32, block_n: 64, consumers: 2, stages: 2, k_pipelined: true, ..fp8 },
        GemmConfig {
            output: GemmOutput::F32,
            block_n: 64,
            consumers: 2,
            specialized: true,
            persistent: true,
            raster: 8,
            cluster: 2,
            k_pipelined: true,
            ..fp8
        },
        GemmConfig {
            output: GemmOutput::F32,
            block_m: 64,
            block_n: 64,
            stages: 3,
            split_k: true,
            b_row_scales: true,
            k_pipelined: true,
            ..fp8
        },
        GemmConfig { consumers: 2, specialized: true, persistent: true, raster: 8, k_pipelined: true, ..bf16 },
        GemmConfig {
            output: GemmOutput::F32,
            block_m: 64,
            stages: 3,
            split_k: true,
            dual_a: true,
            k_pipelined: true,
            ..bf16
        },
        // The prefill picks' K-pipelined forms with 192 accumulator registers a thread: fp8 128x128
        // with two consumers and the residual (o_proj, MLP down), two 64-row tiles a consumer
        // (256x64: the MLA projections), and bf16 dual-A 128x192 with one consumer (the head).
        GemmConfig { output: GemmOutput::F32, consumers: 2, stages: 5, residual: true, k_pipelined: true, ..fp8 },
        GemmConfig {
            output: GemmOutput::F32,
            block_m: 256,
            block_n: 64,
            consumers: 2,
            stages: 5,
            k_pipelined: true,
            ..fp8
        },
        GemmConfig { output: GemmOutput::F32, block_n: 192, stages: 4, dual_a: true, k_pipelined: true, ..bf16 },
    ]
    .into_iter()
    .chain(grouped())
    .collect()
}

/// The grouped (MoE) forms: gathered A rows (gate/up on the tokens, SwiGLU for bf16), contiguous
/// group-sorted rows with the routing weight per row (down), decode's masked layout.
fn grouped() -> Vec<GemmConfig> {
    use GemmGrouping::*;
    let g =
        |grouping, input, output, block_m, stages| GemmConfig::grouped(grouping, input, output, block_m, 128, stages);
    vec![
        GemmConfig { consumers: 2, persistent: true, ..g(Gather, GemmInput::Fp8, GemmOutput::Bf16, 128, 6) },
        GemmConfig { consumers: 2, swiglu: true, ..g(Gather, GemmInput::Bf16, GemmOutput::Bf16, 128, 6) },
        GemmConfig {
            consumers: 2,
            persistent: true,
            row_scale: true,
            ..g(Contiguous, GemmInput::Fp8, GemmOutput::F32, 128, 6)
        },
        GemmConfig { row_scale: true, ..g(Masked, GemmInput::Fp8, GemmOutput::F32, 64, 8) },
        // The MoE down GEMM combining into token rows (atomics) with the routing weights.
        GemmConfig {
            consumers: 2,
            persistent: true,
            row_scale: true,
            scatter: true,
            ..g(Contiguous, GemmInput::Fp8, GemmOutput::F32, 128, 6)
        },
        GemmConfig { swiglu: true, ..g(Masked, GemmInput::Bf16, GemmOutput::Bf16, 64, 8) },
        // The f32 graph's experts: f32 activations as bf16 hi + lo, one GEMM reading each expert's
        // weights once — gate/up gathered by token, down scattered with the routing weights.
        GemmConfig { dual_a: true, ..g(Gather, GemmInput::Bf16, GemmOutput::F32, 128, 4) },
        GemmConfig {
            consumers: 2,
            persistent: true,
            row_scale: true,
            scatter: true,
            dual_a: true,
            ..g(Contiguous, GemmInput::Bf16, GemmOutput::F32, 128, 4)
        },
        // fp8 outputs with their 1x128 scales: a dense bf16 GEMM, the bf16 SwiGLU gate/up (256 wide:
        // 128 output columns), an fp8 grouped GEMM.
        GemmConfig {
            consumers: 2,
            specialized: true,
            ..GemmConfig::new(GemmInput::Bf16, GemmOutput::Fp8, 128, 128, 6)
        },
        GemmConfig {
            block_n: 256,
            stages: 4,
            swiglu: true,
            row_scale: true,
            ..g(Gather, GemmInput::Bf16, GemmOutput::Fp8, 64, 4)
        },
        GemmConfig { consumers: 2, persistent: true, ..g(Contiguous, GemmInput::Fp8, GemmOutput::Fp8, 128, 6) },
        // The MoE gate/up of prefill (rows copied into expert order) with its K tiles pipelined.
        GemmConfig {
            consumers: 2,
            persistent: true,
            k_pipelined: true,
            ..g(Contiguous, GemmInput::Fp8, GemmOutput::F32, 128, 4)
        },
        // The MoE down GEMM of decode with its K tiles pipelined.
        GemmConfig {
            block_n: 64,
            persistent: true,
            row_scale: true,
            scatter: true,
            k_pipelined: true,
            ..g(Contiguous, GemmInput::Fp8, GemmOutput::F32, 64, 5)
        },
    ]
}

/// SASS of a cubin through cuobjdump, or None without the tools.
fn sass(cubin: &[u8]) -> Option<String> {
    let cuobjdump = toolchain::find(toolchain::Tool::Cuobjdump).ok()?;
    toolchain::find(toolchain::Tool::Nvdisasm).ok()?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.cubin");
    std::fs::write(&path, cubin).unwrap();
    let mut cmd = Command::new(&cuobjdump.path);
    if let Some(bin) = cuobjdump.path.parent() {
        let path_var = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path_var}", bin.display()));
    }
    let out = cmd.arg("-sass").arg(&path).output().unwrap();
    assert!(out.status.success(), "cuobjdump: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn gemm_configs_compile_to_sm90a_tensor_core_code_without_spills() {
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    for config in configs() {
        let kernel = sm90::compile_gemm(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        assert!(kernel.ptx.contains(".target sm_90a"), "{}", kernel.name);
        assert!(kernel.ptx.contains(&format!(".entry {}(", kernel.name)), "{}", kernel.name);
        assert!(kernel.ptx.contains("wgmma.mma_async.sync.aligned"), "{}", kernel.name);
        assert!(kernel.ptx.contains("cp.async.bulk.tensor.2d"), "{}", kernel.name);
        let Some(ptxas) = &ptxas else {
            eprintln!("{}: PTX only (no ptxas: run scripts/bootstrap.sh)", kernel.name);
            continue;
        };
        let cubin =
            target::assemble(&kernel.ptx, &kernel.name, &target::SM90A, ptxas).unwrap_or_else(|e| panic!("{e}"));
        let r = &cubin.kernels[0];
        // ptxas says when it had to serialize wgmma (accumulators touched while in flight).
        assert!(!cubin.log.contains("wgmma.mma_async instructions are serialized"), "{}: {}", kernel.name, cubin.log);
        // ... and when it drops a producer warpgroup's register handover.
        assert!(!cubin.log.contains("'setmaxnreg' ignored"), "{}: {}", kernel.name, cubin.log);
        assert_eq!(kernel.ptx.contains("setmaxnreg"), config.specialized, "{}", kernel.name);
        // K-pipelined: the loop waits for all but the chain it just issued.
        let waits_for_one_behind = kernel.ptx.contains("wgmma.wait_group.sync.aligned \t1;");
        assert_eq!(waits_for_one_behind, config.k_pipelined, "{}", kernel.name);
        eprintln!(
            "{}: {} registers, {} B smem (dynamic {}), spills {}/{}",
            kernel.name,
            r.registers,
            r.shared_memory_bytes,
            kernel.shared_memory_bytes,
            r.spill_stores_bytes,
            r.spill_loads_bytes
        );
        assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{}: spills", kernel.name);
        // The dynamic ring starts 1024-byte aligned after the (padded) static mbarriers.
        assert!(r.shared_memory_bytes as usize <= sm90::gemm::STATIC_SHARED_BYTES, "{}: static smem", kernel.name);
        assert!(kernel.ptx.contains(".extern .shared .align 1024 .b8 __dynamic_shmem__0[];"), "{}", kernel.name);
        if let Some(sass) = sass(&cubin.cubin) {
            let mma = match config.input {
                GemmInput::Bf16 => "HGMMA.64x",
                GemmInput::Fp8 => "QGMMA.64x",
            };
            assert!(sass.contains(mma), "{}: no {mma} in SASS", kernel.name);
            assert!(sass.contains("UTMALDG.2D"), "{}: no TMA loads in SASS", kernel.name);
            assert!(!sass.contains("LDL") && !sass.contains("STL"), "{}: local memory traffic", kernel.name);
            // ... and so does the SASS: the tensor cores hold the next tile's chain while the
            // warpgroup releases (and promotes) the one before.
            assert_eq!(sass.contains("WARPGROUP.DEPBAR.LE gsb0, 0x1"), config.k_pipelined, "{}", kernel.name);
            eprintln!(
                "  SASS: {} x {mma}.., {} x UTMALDG.2D",
                sass.matches(mma).count(),
                sass.matches("UTMALDG.2D").count()
            );
        }
    }
}

/// An MLA attention kernel's tensor-core code: `s_steps` wgmma of `s_n` keys for S = Q K^T (K-major
/// B) and `pv_steps` of `pv_n` columns for P V (transposed B: all the accumulated columns in one
/// instruction; `p_registers`: A, the bf16 P, from registers, else from shared memory behind a
/// proxy fence) in the PTX; with ptxas, no spills, no serialized wgmma, and as many
/// HGMMA.64x<s_n>x16 and HGMMA.64x<pv_n>x16 in the SASS plus TMA loads and no local memory.
fn assert_attention_tensor_core_code(
    kernel: &sm90::GpuKernel,
    (s_steps, s_n): (usize, usize),
    (pv_steps, pv_n): (usize, usize),
    p_registers: bool,
    outputs: usize,
    ptxas: Option<&toolchain::FoundTool>,
) {
    // The trailing immediates: scale-a, scale-b, transpose-a, transpose-b (A from registers: no
    // transpose-a).
    let wgmma = |transposed: u8| kernel.ptx.matches(&format!("p, 1,  1, 0,  {transposed};")).count();
    let registers_a = kernel.ptx.matches("p, 1, 1, 1;").count();
    let ptx_shape =
        |n: usize| kernel.ptx.matches(&format!("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16")).count();
    let (s_shape, pv_shape) = (format!("HGMMA.64x{s_n}x16.F32.BF16"), format!("HGMMA.64x{pv_n}x16.F32.BF16"));
    if s_n == pv_n {
        assert_eq!(ptx_shape(s_n), s_steps + pv_steps, "{}", kernel.name);
    } else {
        assert_eq!((ptx_shape(s_n), ptx_shape(pv_n)), (s_steps, pv_steps), "{}", kernel.name);
    }
    assert_eq!(wgmma(0), s_steps, "{}: S = Q K^T wgmma (K-major B)", kernel.name);
    let want = if p_registers { (0, pv_steps) } else { (pv_steps, 0) };
    assert_eq!((wgmma(1), registers_a), want, "{}: P V wgmma (transposed B; A shared, registers)", kernel.name);
    if !p_registers {
        assert!(kernel.ptx.contains("fence.proxy.async.shared::cta"), "{}: P's generic-to-async fence", kernel.name);
    } else {
        // The flash kernels' one block barrier publishes the initialized mbarriers: a tile's buffer
        // is released on its empty mbarrier (an arrival a thread), not at a block barrier.
        assert_eq!(kernel.ptx.matches("bar.sync \t0;").count(), 1, "{}: block barriers", kernel.name);
        assert_eq!(kernel.ptx.matches("mbarrier.arrive.shared.b64").count(), 1, "{}: the release", kernel.name);
        // dK's and dV's streamed queries' statistics are staged a tile at a time in shared memory
        // behind the warpgroup's named barrier: one global load a thread (dV's prologue tile
        // and loop: two sites), not one a column (32 before); the other kernels have no
        // named barrier.
        let named = kernel.ptx.matches("bar.sync \t%r").count();
        let loads = kernel.ptx.matches("ld.global").count();
        if kernel.name.starts_with("mla_gradk") || kernel.name.starts_with("mla_gradv") {
            assert!((1..=2).contains(&named) && loads <= 2, "{}: {named} named barriers, {loads} loads", kernel.name);
        } else {
            assert_eq!(named, 0, "{}: named barriers", kernel.name);
        }
    }
    // A thread's share of its warpgroup's 64 output rows of `outputs` columns, stored in column
    // pairs (8 bytes each); scalar stores only for the log-sum-exps (one a row half).
    let pairs = kernel.ptx.matches("st.global.v2.b32").count();
    assert_eq!(pairs, outputs / 4, "{}: the outputs' 8-byte stores", kernel.name);
    assert!(kernel.ptx.matches("st.global.b32").count() <= 2, "{}: scalar output stores", kernel.name);
    // P (and the fp8 cache's decoded page) rounded to bf16 in column pairs, a word a store.
    assert!(kernel.ptx.contains("cvt.rn.bf16x2.f32"), "{}: bf16 pairs", kernel.name);
    assert!(!kernel.ptx.contains("st.shared.b16"), "{}: bf16 stored one element at a time", kernel.name);
    let Some(ptxas) = ptxas else {
        eprintln!("{}: PTX only (no ptxas: run scripts/bootstrap.sh)", kernel.name);
        return;
    };
    let cubin = target::assemble(&kernel.ptx, &kernel.name, &target::SM90A, ptxas).unwrap_or_else(|e| panic!("{e}"));
    let r = &cubin.kernels[0];
    assert!(!cubin.log.contains("wgmma.mma_async instructions are serialized"), "{}: {}", kernel.name, cubin.log);
    eprintln!("{}: {} registers, spills {}/{}", kernel.name, r.registers, r.spill_stores_bytes, r.spill_loads_bytes);
    assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{}: spills", kernel.name);
    assert!(r.shared_memory_bytes as usize <= sm90::gemm::STATIC_SHARED_BYTES, "{}: static smem", kernel.name);
    if let Some(sass) = sass(&cubin.cubin) {
        let (s_count, pv_count) = (sass.matches(s_shape.as_str()).count(), sass.matches(pv_shape.as_str()).count());
        if s_n == pv_n {
            assert_eq!(s_count, s_steps + pv_steps, "{}", kernel.name);
        } else {
            assert_eq!((s_count, pv_count), (s_steps, pv_steps), "{}", kernel.name);
        }
        assert!(sass.contains("UTMALDG.2D"), "{}: no TMA loads in SASS", kernel.name);
        assert!(!sass.contains("LDL") && !sass.contains("STL"), "{}: local memory traffic", kernel.name);
        eprintln!(
            "  SASS: {s_steps} x {s_shape}, {pv_steps} x {pv_shape}, {} x UTMALDG.2D",
            sass.matches("UTMALDG.2D").count()
        );
    }
}

/// DeepSeek-V3.2's indexer scores on the tensor cores (64 heads of 128, prefill and decode): the 24
/// wgmmas of a 64-key tile (8 steps of hi.hi, hi.lo, lo.hi; A the keys from registers, B the
/// query's heads K-major) as 24 HGMMA.64x64x16 in the SASS, not serialized, no local memory; over
/// bf16 key rows 16 (no lo.hi), a thread's 64 values of a tile as 32 loads of two.
#[test]
fn indexer_scores_compile_to_hgmma_without_spills() {
    use sm90::rows::{RowKernel, RowOp, SparseRow};
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    let mut f32_loads = [0; 2];
    for (decode, bf16_keys) in [(false, false), (true, false), (false, true), (true, true)] {
        let op = SparseRow::IndexScores { heads: 64, decode, top_k: 2048, mma: true, bf16_keys };
        let k = RowKernel::new(RowOp::Sparse(op), 128, "f32");
        let kernel = sm90::compile_rows(&context, &k, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        let wgmmas = if bf16_keys { 16 } else { 24 };
        // A from registers, B K-major (no transpose).
        assert_eq!(kernel.ptx.matches("p, 1, 1, 0;").count(), wgmmas, "{}", kernel.name);
        // A tile's 64 key values a thread as 32-bit loads (f32), or its 32 words (bf16 pairs).
        let loads = kernel.ptx.matches("ld.global.b32").count();
        match bf16_keys {
            false => f32_loads[usize::from(decode)] = loads,
            true => assert_eq!(loads + 32, f32_loads[usize::from(decode)], "{}", kernel.name),
        }
        let Some(ptxas) = &ptxas else {
            eprintln!("{}: PTX only (no ptxas: run scripts/bootstrap.sh)", kernel.name);
            continue;
        };
        let cubin =
            target::assemble(&kernel.ptx, &kernel.name, &target::SM90A, ptxas).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cubin.log.contains("wgmma.mma_async instructions are serialized"), "{}: {}", kernel.name, cubin.log);
        let r = &cubin.kernels[0];
        eprintln!(
            "{}: {} registers, spills {}/{}",
            kernel.name, r.registers, r.spill_stores_bytes, r.spill_loads_bytes
        );
        assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{}: spills", kernel.name);
        if let Some(sass) = sass(&cubin.cubin) {
            let hgmma = sass.matches("HGMMA.64x64x16.F32.BF16").count();
            eprintln!("  SASS: {hgmma} x HGMMA.64x64x16.F32.BF16");
            assert_eq!(hgmma, wgmmas, "{}", kernel.name);
            assert!(!sass.contains("LDL") && !sass.contains("STL"), "{}: local memory traffic", kernel.name);
        }
    }
}

/// DeepSeek-V3.2 (fp8, decode): the indexer's key projection (`wk`, 128 columns of the same normed
/// activations) joins the MLA down-projections' GEMM between q_a and kv_a — kv_a's 576 columns
/// last, so that every weight before them starts on a 128-row fp8 scale block — and no GEMM of its
/// own is left: one GEMM of N 2240 whose results are q_a's, wk's, and kv_a's latent and rope. A key
/// of 96 columns (not a whole block) stays a GEMM of its own, and q_a / kv_a one of 2112.
#[test]
fn the_indexer_key_projection_joins_the_mla_projections_gemm() {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    use v3c_compiler::pipeline::Driver;
    use v3c_models::{config::ModelConfig, BuildOptions, Entry, Precision};
    let context = v3c_compiler::mlir::new_context();
    let gemms = |key: usize| {
        let mut config = ModelConfig::resolve("deepseek-v3.2").unwrap();
        config.indexer.as_mut().unwrap().head_dim = key;
        let options = BuildOptions { precision: Precision::Fp8, ..Default::default() };
        let module = Driver::quiet().run_model(&context, &config, &[Entry::Decode], &options, "fused").unwrap();
        let mut gemms = Vec::new();
        let mut op = module.body().first_operation();
        while let Some(f) = op {
            op = f.next_in_block();
            if let Ok(g) = sm90::lower::gemm_of_kernel(&f) {
                gemms.push(g);
            }
        }
        gemms
    };
    let full = gemms(128);
    let proj = full.iter().find(|g| g.kernel == "mla_projections_0").expect("mla_projections_0 is a GEMM");
    assert_eq!((proj.n, proj.k, proj.weights.len(), proj.input), (2240, 7168, 3, GemmInput::Fp8));
    assert_eq!(proj.results, vec![(0, 1536), (1536, 1664), (1664, 2176), (2176, 2240)]);
    let skinny: Vec<_> = full.iter().filter(|g| g.n == 128 && g.k == 7168).map(|g| &g.kernel).collect();
    assert!(skinny.is_empty(), "wk as a GEMM of its own: {skinny:?}");
    let ragged = gemms(96);
    let proj = ragged.iter().find(|g| g.kernel == "mla_projections_0").expect("mla_projections_0 is a GEMM");
    assert_eq!((proj.n, proj.weights.len()), (2112, 2));
    assert_eq!(ragged.iter().filter(|g| g.n == 96 && g.k == 7168).count(), 1, "wk of 96 columns alone");
}

/// A flash kernel's tile loop takes its interior tiles (every key visible to every row of the
/// warpgroup) without the per-element masks: the loop's exponentials in two copies, masked and
/// not; tile 0's before a loop a tile ahead in one, masked. A tile's exponentials: a thread's 32
/// P, and the forward's two rows' rescale factors.
fn assert_interior_tiles_unmasked(kernel: &sm90::GpuKernel, config: &sm90::mla::MlaPrefillConfig) {
    use sm90::mla::FlashMode;
    let per_tile = 32 + if matches!(config.mode, FlashMode::Forward | FlashMode::Lse) { 2 } else { 0 };
    let copies = 2 + usize::from(config.pipelined());
    let exponentials = kernel.ptx.matches("ex2.approx.ftz.f32").count();
    assert_eq!(exponentials, copies * per_tile, "{}: the exponentials' copies", kernel.name);
}

/// The tensor-core MLA decode kernel (DeepSeek-V3's 512 + 64 columns in clusters of 2 and not, its
/// fp8-cache form, and a narrower latent): the 36 HGMMA.64x64 of S = Q K^T (9 chunks x 4 k16 steps,
/// the first warpgroup's, the page's 64 keys) and the 4 HGMMA.64x256 of P V (4 k16 steps over the
/// warpgroup's half of the values, transposed B) — twice each where warpgroup 0 runs a page ahead
/// —, TMA loads (multicast in a cluster: each block half of a page's boxes, in the prologue's loads
/// and the refill's), no spills; the fp8 cache's pages are converted 16 bytes at a time. DeepSeek-V3.2's
/// `_sel` kernel gathers its pages itself: the query tile's TMA loads alone, the selected rows' f32
/// read 16 bytes a load (a batch of them issued in the prologue's gather and in warpgroup 1's), each
/// 4 columns rounded in two bf16 pairs and stored as one 8-byte shared store; `_sel16`'s bf16 rows
/// 8 columns a load, stored as they are (16 bytes).
#[test]
fn mla_decode_compiles_to_hgmma_and_tma_without_spills() {
    use sm90::mla::MlaDecodeConfig;
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    let fp8 = MlaDecodeConfig { fp8_cache: true, serial: false, ..MlaDecodeConfig::DEEPSEEK_V3 };
    assert_eq!(MlaDecodeConfig::from_name(&fp8.kernel_name()), Some(fp8));
    for config in [
        MlaDecodeConfig::DEEPSEEK_V3,
        MlaDecodeConfig { serial: false, ..MlaDecodeConfig::DEEPSEEK_V3 },
        MlaDecodeConfig { cluster: 1, ..MlaDecodeConfig::DEEPSEEK_V3 },
        MlaDecodeConfig {
            kv: 256,
            rope: 64,
            stages: 3,
            fp8_cache: false,
            cluster: 1,
            serial: false,
            selected: false,
            bf16_rows: false,
        },
        fp8,
        MlaDecodeConfig::DEEPSEEK_V32_SELECTED,
        MlaDecodeConfig { bf16_rows: true, ..MlaDecodeConfig::DEEPSEEK_V32_SELECTED },
    ] {
        assert_eq!(MlaDecodeConfig::from_name(&config.kernel_name()), Some(config));
        let kernel = sm90::compile_mla(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        let tma = kernel.ptx.matches("cp.async.bulk.tensor.2d").count();
        let gathers = (kernel.ptx.matches("ld.global.v4.b32").count(), kernel.ptx.matches("st.shared.b64").count());
        if config.bf16_rows {
            assert_eq!(tma, config.dim() / 64, "{}: the query tile's boxes alone", kernel.name);
            // 18 loads a thread of the block, 36 of warpgroup 1 (6 a batch each); 16-byte stores.
            assert_eq!(gathers, (6 + 6, 0), "{}: 16-byte loads, no 8-byte stores", kernel.name);
        } else if config.selected {
            assert_eq!(tma, config.dim() / 64, "{}: the query tile's boxes alone", kernel.name);
            // 36 quads a thread of the block (4 a batch), 72 of warpgroup 1 (8 a batch).
            assert_eq!(gathers, (4 + 8, 4 + 8), "{}: 16-byte loads, 8-byte stores", kernel.name);
        } else {
            assert!(tma > config.dim() / 64 && gathers == (0, 0), "{}: {tma} TMA loads, {gathers:?}", kernel.name);
        }
        let converts = kernel.ptx.contains("cvt.rn.f16x2.e4m3x2");
        assert_eq!(converts, config.fp8_cache, "{}: the fp8 cache's conversion", kernel.name);
        // The conversion moves 16 bytes at a time: a unit of 16 e4m3 in, its 16 bf16 out as two
        // units of the swizzled chunk.
        let (loads, stores) =
            (kernel.ptx.matches("ld.shared.v4.b32").count(), kernel.ptx.matches("st.shared.v4.b32").count());
        let want = match (config.fp8_cache, config.bf16_rows) {
            (true, _) => (1, 2),
            (false, true) => (0, 6 + 6),
            (false, false) => (0, 0),
        };
        assert_eq!((loads, stores), want, "{}", kernel.name);
        assert!(!kernel.ptx.contains("ld.shared.b16"), "{}: 2-byte shared loads", kernel.name);
        // Boxes a page: the bf16 chunks, or the fp8 latent's 128-byte boxes and the rope's chunks.
        let boxes = if config.fp8_cache { config.kv / 128 + config.rope / 64 } else { config.dim() / 64 };
        let multicasts = kernel.ptx.matches(".multicast::cluster").count();
        assert_eq!(multicasts, if config.cluster > 1 { 2 * boxes } else { 0 }, "{}", kernel.name);
        assert_eq!(kernel.ptx.contains(".reqnctapercluster 2, 1, 1"), config.cluster > 1, "{}", kernel.name);
        // A page ahead (two page buffers or more, the bf16 cache): S of page 0 before the loop and
        // of the next page in it, P V in each warpgroup's branch.
        let copies = if config.pipelined() { 2 } else { 1 };
        let pipelined = config.stages >= 2 && !config.fp8_cache && !config.serial && !config.selected;
        assert_eq!(config.pipelined(), pipelined, "{}", kernel.name);
        assert_attention_tensor_core_code(
            &kernel,
            (copies * config.dim() / 16, 64),
            (copies * 4, config.kv / 2),
            false,
            config.kv / 2,
            ptxas.as_ref(),
        );
    }
}

/// The tensor-core MLA prefill (flash attention, causal; DeepSeek-V3's 192/128 heads, a 3-stage
/// ring of narrower ones and a ring of one): HGMMA for S = Q K^T (qk / 16 steps; twice where the
/// loop runs a tile ahead: tile 0's before it) and P V (4 steps over all the value columns), TMA
/// loads, no spills.
#[test]
fn mla_prefill_compiles_to_hgmma_and_tma_without_spills() {
    use sm90::mla::MlaPrefillConfig;
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    let narrow = MlaPrefillConfig { qk: 128, v: 64, stages: 3, ..MlaPrefillConfig::DEEPSEEK_V3 };
    let single = MlaPrefillConfig { stages: 1, ..MlaPrefillConfig::DEEPSEEK_V3 };
    for config in [MlaPrefillConfig::DEEPSEEK_V3, narrow, single] {
        assert_eq!(MlaPrefillConfig::from_name(&config.kernel_name()), Some(config));
        assert_eq!(config.pipelined(), config.stages >= 2, "{}", config.kernel_name());
        let kernel = sm90::compile_mla_prefill(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        let s_steps = if config.pipelined() { 2 } else { 1 } * config.qk / 16;
        assert_attention_tensor_core_code(&kernel, (s_steps, 64), (4, config.v), true, config.v, ptxas.as_ref());
        assert_interior_tiles_unmasked(&kernel, &config);
    }
    let err = MlaPrefillConfig { v: 320, ..MlaPrefillConfig::DEEPSEEK_V3 }.validate(&target::SM90A).unwrap_err();
    assert!(err.contains("a value width of 320"), "{err}");
    let err =
        MlaPrefillConfig { qk: 512, stages: 4, ..MlaPrefillConfig::DEEPSEEK_V3 }.validate(&target::SM90A).unwrap_err();
    assert!(err.contains("B of shared memory"), "{err}");
}

/// Training's flash attention: the forward with its log-sum-exps (`_lse`: one `lg2` per row half
/// stored; a tile ahead: S twice), and the three gradient kernels — dQ and dK recompute S (qk / 16
/// steps) and dP (v / 16),
/// then multiply dS by the keys (queries) as the transposed B (both 4 steps of m64n<qk>); dV
/// recomputes S (a tile ahead: twice, and with a ring of one once) and multiplies P by dout (4 of
/// m64n<v>); the forward's P V is 4 steps of m64n<v>; P and dS the A of those products from
/// registers. HGMMA, TMA, no spills.
#[test]
fn mla_training_attention_compiles_to_hgmma_and_tma_without_spills() {
    use sm90::mla::{FlashMode, GradOf, MlaPrefillConfig};
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    for (qk, v) in [(192, 128), (128, 64)] {
        let base = MlaPrefillConfig { qk, v, ..MlaPrefillConfig::DEEPSEEK_V3 };
        for (mode, stages) in [
            (FlashMode::Lse, 2),
            (FlashMode::Grad(GradOf::Queries), 2),
            (FlashMode::Grad(GradOf::Keys), 2),
            (FlashMode::Grad(GradOf::Values), 2),
            (FlashMode::Grad(GradOf::Values), 1),
        ] {
            let config = MlaPrefillConfig { mode, stages, ..base };
            assert_eq!(MlaPrefillConfig::from_name(&config.kernel_name()), Some(config));
            let kernel = sm90::compile_mla_prefill(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
            // P V's 4 k16 steps over all the accumulated columns; the output's columns.
            // A tile ahead: tile 0's S before the loop, the next tile's in it.
            let ahead = if config.pipelined() { 2 } else { 1 };
            let (s_steps, pv, outputs) = match mode {
                FlashMode::Grad(GradOf::Values) => (ahead * qk / 16, (4, v), v),
                FlashMode::Grad(GradOf::Keys | GradOf::Queries) => (qk / 16 + v / 16, (4, qk), qk),
                _ => (ahead * qk / 16, (4, v), v),
            };
            let ahead_modes = [FlashMode::Lse, FlashMode::Grad(GradOf::Values)];
            assert_eq!(config.pipelined(), stages >= 2 && ahead_modes.contains(&mode), "{}", kernel.name);
            assert_eq!(kernel.ptx.contains("lg2.approx"), mode == FlashMode::Lse, "{}", kernel.name);
            assert_attention_tensor_core_code(&kernel, (s_steps, 64), pv, true, outputs, ptxas.as_ref());
            assert_interior_tiles_unmasked(&kernel, &config);
        }
    }
    for bad in ["mla_gradx_qk192_v128_s2", "mla_gradq_qk192_v128_s2_lse", "mla_prefill_qk192_v128_s2_ls"] {
        assert_eq!(MlaPrefillConfig::from_name(bad), None, "{bad}");
    }
}

#[test]
fn configs_that_do_not_fit_are_rejected_before_codegen() {
    let base = GemmConfig::new(GemmInput::Bf16, GemmOutput::F32, 128, 128, 4);
    let t = &target::SM90A;
    let err = GemmConfig { stages: 8, block_n: 256, ..base }.validate(t).unwrap_err();
    assert!(err.contains("shared memory") && err.contains("sm_90a"), "{err}");
    let err = GemmConfig { input: GemmInput::Fp8, block_m: 256, ..base }.validate(t).unwrap_err();
    assert!(err.contains("registers"), "{err}");
    let err = GemmConfig { block_m: 96, ..base }.validate(t).unwrap_err();
    assert!(err.contains("block_m 96"), "{err}");
    let err = GemmConfig { block_n: 100, ..base }.validate(t).unwrap_err();
    assert!(err.contains("block_n 100"), "{err}");
    // Two consumer warpgroups need 64 rows each; with a producer they share what setmaxnreg leaves.
    let err = GemmConfig { block_m: 64, consumers: 2, ..base }.validate(t).unwrap_err();
    assert!(err.contains("block_m 64 is not a multiple of 128"), "{err}");
    let wide = GemmConfig { block_m: 256, block_n: 208, stages: 2, consumers: 2, ..base };
    wide.validate(t).unwrap();
    let err = GemmConfig { specialized: true, ..wide }.validate(t).unwrap_err();
    assert!(err.contains("exceed the 232 registers") && err.contains("384 threads"), "{err}");
    // What a configuration adds to its registers counts too (ptxas 13.0 spilled these): fp8's per-row
    // B scales on a K-pipelined 128x128 tile (192 accumulators + 40 + a fragment of scales), bf16's
    // split-K epilogue at 192 accumulators; their plain forms fit.
    let wgrad = GemmConfig::from_name("gemm_fp8_f32_128x128x128_s5_wg2_b1x128_kp").unwrap();
    let err = wgrad.validate(t).unwrap_err();
    assert!(err.contains("192 accumulator registers per thread (+104) exceed the 255"), "{err}");
    GemmConfig { b_row_scales: false, ..wgrad }.validate(t).unwrap();
    GemmConfig { k_pipelined: false, ..wgrad }.validate(t).unwrap();
    let head = GemmConfig::from_name("gemm_bf16_f32_128x192x64_s4_a2").unwrap();
    head.validate(t).unwrap();
    let err = GemmConfig { split_k: true, ..head }.validate(t).unwrap_err();
    assert!(err.contains("192 accumulator registers per thread (+80) exceed the 255"), "{err}");
    let err = GemmConfig { consumers: 3, block_m: 192, ..base }.validate(t).unwrap_err();
    assert!(err.contains("3 consumer warpgroups"), "{err}");
    let err = GemmConfig { raster: 3, ..base }.validate(t).unwrap_err();
    assert!(err.contains("raster 3"), "{err}");
    let grouped = GemmConfig::grouped(GemmGrouping::Gather, GemmInput::Fp8, GemmOutput::F32, 128, 128, 4);
    let err = GemmConfig { specialized: false, ..grouped }.validate(t).unwrap_err();
    assert!(err.contains("a grouped GEMM needs the producer warpgroup"), "{err}");
    let err = GemmConfig { split_k: true, ..grouped }.validate(t).unwrap_err();
    assert!(err.contains("a grouped GEMM cannot split K"), "{err}");
    let err = GemmConfig { scatter: true, ..base }.validate(t).unwrap_err();
    assert!(err.contains("the scatter epilogue needs the sorted rows' tokens"), "{err}");
    let err = GemmConfig { scatter: true, output: GemmOutput::Bf16, ..grouped }.validate(t).unwrap_err();
    assert!(err.contains("f32 atomics"), "{err}");
    let err = GemmConfig { swiglu: true, ..grouped }.validate(t).unwrap_err();
    assert!(err.contains("fp8 SwiGLU"), "{err}");
    let err = GemmConfig { output: GemmOutput::Fp8, block_n: 64, ..base }.validate(t).unwrap_err();
    assert!(err.contains("fp8 output tiles 64 columns wide"), "{err}");
    let err = GemmConfig { cluster: 2, ..base }.validate(t).unwrap_err();
    assert!(err.contains("cluster size 2: needs the producer warpgroup"), "{err}");
    let err = GemmConfig { cluster: 4, specialized: true, ..base }.validate(t).unwrap_err();
    assert!(err.contains("only clusters of 2"), "{err}");
    let err = GemmConfig { b_row_scales: true, ..base }.validate(t).unwrap_err();
    assert!(err.contains("per-row B scales go with fp8 GEMMs (dense, or sorted-row grouped) only"), "{err}");
    let masked = GemmConfig::grouped(GemmGrouping::Masked, GemmInput::Fp8, GemmOutput::F32, 128, 128, 4);
    let err = GemmConfig { b_row_scales: true, ..masked }.validate(t).unwrap_err();
    assert!(err.contains("per-row B scales go with fp8 GEMMs (dense, or sorted-row grouped) only"), "{err}");
    // The training experts' grouped GEMMs: per-row scales, any block_n (no 128-row scale block).
    let rows = GemmConfig::grouped(GemmGrouping::Gather, GemmInput::Fp8, GemmOutput::F32, 128, 64, 4);
    GemmConfig { b_row_scales: true, ..rows }.validate(t).unwrap();
    // A K range from the device: dense fp8 GEMMs without split K only.
    let fp8 = GemmConfig::new(GemmInput::Fp8, GemmOutput::F32, 64, 128, 4);
    GemmConfig { k_range: true, b_row_scales: true, ..fp8 }.validate(t).unwrap();
    for bad in [
        GemmConfig { k_range: true, split_k: true, ..fp8 },
        GemmConfig { k_range: true, b_row_scales: true, ..rows },
        GemmConfig { k_range: true, ..base },
    ] {
        let err = bad.validate(t).unwrap_err();
        assert!(err.contains("a K range from the device goes with dense fp8 GEMMs without split K"), "{err}");
    }
    // A second A: dense bf16 GEMMs without SwiGLU only.
    GemmConfig { dual_a: true, split_k: true, residual: true, ..base }.validate(t).unwrap();
    let masked_bf16 = GemmConfig::grouped(GemmGrouping::Masked, GemmInput::Bf16, GemmOutput::F32, 64, 128, 4);
    for bad in [
        GemmConfig { dual_a: true, ..fp8 },
        GemmConfig { dual_a: true, swiglu: true, ..base },
        GemmConfig { dual_a: true, ..masked_bf16 },
    ] {
        let err = bad.validate(t).unwrap_err();
        assert!(
            err.contains("a second A goes with bf16 GEMMs (dense, gathered or contiguous) without SwiGLU"),
            "{err}"
        );
    }
    let context = v3c_compiler::mlir::new_context();
    let err = sm90::compile_gemm(&context, &GemmConfig { stages: 1, ..base }, t).unwrap_err().to_string();
    assert!(err.starts_with("gemm_bf16_f32_128x128x64_s1: "), "{err}");
}

#[test]
fn launch_grids_cover_every_unit() {
    let c = GemmConfig::new(GemmInput::Fp8, GemmOutput::Bf16, 64, 128, 6);
    // Decode: 64 x 2112 is 17 tiles; a 4-way K split makes 68 units, one block each.
    assert_eq!(c.tiles(64, 2112), 17);
    assert_eq!(c.grid(64, 2112, 4, 132), 68);
    let p = GemmConfig { persistent: true, consumers: 1, specialized: true, ..c };
    assert_eq!(p.grid(4096, 7168, 1, 132), 132);
    assert_eq!(p.grid(64, 256, 1, 132), 2);
    assert_eq!(p.threads(), 256);
    // Clusters of two launch whole clusters: 5 row tiles make 3 pairs.
    let cl = GemmConfig { cluster: 2, ..p };
    assert_eq!(cl.grid(5 * 64, 256, 1, 132), 3 * 2 * 2);
    assert_eq!(cl.grid(4096, 7168, 1, 132), 132);
    // Grouped: 300 sorted rows over 9 groups can form at most ceil(300 / 128) + 9 row tiles.
    let g = GemmConfig::grouped(GemmGrouping::Contiguous, GemmInput::Fp8, GemmOutput::F32, 128, 128, 6);
    assert_eq!(g.grouped_grid(300, 9, 256, 132), (3 + 9) * 2);
    assert_eq!(GemmConfig { persistent: true, ..g }.grouped_grid(300, 9, 7168, 132), 132);
}

#[test]
fn kernel_names_round_trip_to_configs() {
    for config in configs() {
        assert_eq!(GemmConfig::from_name(&config.kernel_name()), Some(config));
    }
    assert_eq!(variants()[4].kernel_name(), "gemm_fp8_bf16_128x128x128_s6_wg2_ws_persist_r4_res");
    assert_eq!(grouped()[2].kernel_name(), "gemm_fp8_f32_128x128x128_s6_wg2_ws_persist_contig_rowscale");
    assert_eq!(variants()[9].kernel_name(), "gemm_fp8_f32_64x128x128_s5_splitk_b1x128");
    assert_eq!(variants()[10].kernel_name(), "gemm_fp8_f32_128x128x128_s6_wg2_ws_persist_b1x128_krange");
    for bad in [
        "gemm_bf16_f32_128x128x128_s4",
        "gemm_f16_f32_128x128x64_s4",
        "gemm_bf16_f32_128x128x64",
        "attention_0",
        "gemm_bf16_f32_128x128x64_s4_ws_wg2",
        "gemm_bf16_f32_128x128x64_s4_wg1",
        "gemm_bf16_f32_128x128x64_s4_res_res",
        "gemm_bf16_f32_128x128x64_s4_fast",
        "gemm_bf16_f32_128x128x64_s4_ws_rowscale_swiglu",
        "gemm_bf16_f32_128x128x64_s4_ws_gather_masked",
        "gemm_fp8_f32_128x128x128_s4_b1x128_res",
        "gemm_fp8_f32_128x128x128_s4_krange_b1x128",
    ] {
        assert_eq!(GemmConfig::from_name(bad), None, "{bad}");
    }
}

/// The PTX of a small configuration, snapshotted (only LLVM's producer banner is normalized): a
/// change in the template or the lowering shows up as a reviewable diff.
#[test]
fn ptx_of_a_small_gemm_is_stable() {
    let context = v3c_compiler::mlir::new_context();
    let config = GemmConfig::new(GemmInput::Bf16, GemmOutput::F32, 64, 64, 2);
    let kernel = sm90::compile_gemm(&context, &config, &target::SM90A).unwrap();
    let ptx: String = kernel
        .ptx
        .lines()
        .map(|l| {
            if l.starts_with("// Generated by LLVM NVPTX Back-End") {
                "// Generated by LLVM NVPTX Back-End"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    insta::assert_snapshot!("ptx_gemm_bf16_f32_64x64x64_s2", ptx);
}

/// The full-size DeepSeek-V3 (fp8, both entry points): every kernel that is GEMM-shaped maps onto
/// the template (the MLA down-projections as one GEMM over the concatenated q_a / kv_a weights, the
/// output projections and MLP down-projections with the residual epilogue), and each of their
/// decode and prefill kernels assembles without spills. The kernels with no sm_90a lowering yet are
/// named with the op that stops them.
#[test]
fn every_gemm_kernel_of_the_full_model_assembles_without_spills() {
    use v3c_compiler::pipeline::Driver;
    use v3c_models::{config::ModelConfig, BuildOptions, Entry, Precision};
    let context = v3c_compiler::mlir::new_context();
    let config = ModelConfig::resolve("deepseek-v3").unwrap();
    let options = BuildOptions { precision: Precision::Fp8, ..Default::default() };
    let module = Driver::quiet().run_model(&context, &config, &Entry::ALL, &options, "fused").unwrap();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    let h200 = target::DeviceModel::by_name("H200").unwrap();
    let mut choose = v3c_compiler::tune::ModelChooser::new(&h200, None);
    // As `v3c compile` plans it: prefill chunks of up to 4096 rows, its GEMMs picked again for fewer.
    choose.prefill_rows = v3c_compiler::tune::prefill_rows(v3c_compiler::tune::PREFILL_M);
    let attention = sm90::AttentionKernels::default();
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (lowered, ()) = sm90::compile_model(
        &context,
        &module,
        &target::SM90A,
        ptxas.as_ref(),
        attention,
        &mut choose,
        jobs,
        |_| {},
        |_, _| Ok(()),
    )
    .unwrap();
    let gemm = |name: &str| lowered.gemms.iter().find(|(g, _)| g.kernel == name).map(|(g, _)| g.clone());
    let proj = gemm("mla_projections_0").expect("mla_projections_0 is a GEMM");
    assert_eq!((proj.n, proj.k, proj.weights.len()), (2112, 7168, 2));
    assert_eq!(proj.results, vec![(0, 1536), (1536, 2048), (2048, 2112)]);
    assert_eq!(proj.residual, None);
    let o_proj = gemm("gemm_residual_0").expect("gemm_residual_0 is a GEMM");
    assert_eq!((o_proj.n, o_proj.k, o_proj.input), (7168, 16384, GemmInput::Fp8));
    assert_eq!((o_proj.a, o_proj.a_scale, o_proj.residual), (0, Some(1), Some(4)));
    assert!(gemm("gemm_residual_1").is_some());
    // The cost model's picks: decode kernels on 64-row tiles (split K where the tiles are too few
    // to stream the weights on every SM), prefill kernels with two consumer warpgroups.
    // Smaller prefill runs: kernels of their own where the cost model picks others for their rows,
    // each bound's differing from the next larger's.
    for (g, kernels) in &lowered.gemms {
        let (decode, prefill) = (&kernels.decode, &kernels.prefill);
        let (d, p) = (GemmConfig::from_name(decode).unwrap(), GemmConfig::from_name(prefill).unwrap());
        assert_eq!(d.block_m, 64, "{}: {decode}", g.kernel);
        assert!(p.consumers == 2 && !p.split_k, "{}: {prefill}", g.kernel);
        assert_eq!((d.residual, p.residual), (g.residual.is_some(), g.residual.is_some()));
        let bounds: Vec<usize> = kernels.prefill_under.iter().map(|(rows, _)| *rows).collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|&b| (64..4096).contains(&b)));
        let mut next = kernels.prefill_under.iter().map(|(_, k)| k).skip(1).chain([prefill]);
        for (rows, kernel) in &kernels.prefill_under {
            assert_ne!(Some(kernel), next.next(), "{} up to {rows} rows", g.kernel);
            assert_eq!(GemmConfig::from_name(kernel).unwrap().residual, g.residual.is_some());
        }
    }
    // The q_a | kv_a projection (N 2112) at 128 rows: 17 tiles of 256 rows would leave the
    // SMs idle, its own pick splits K.
    let (_, proj_kernels) = &lowered.gemms[0];
    let (_, at_128) = &proj_kernels.prefill_under.iter().find(|(rows, _)| *rows >= 128).unwrap();
    assert!(GemmConfig::from_name(at_128).unwrap().split_k, "{proj_kernels:?}");
    let proj_decode = &proj_kernels.decode;
    assert!(GemmConfig::from_name(proj_decode).unwrap().split_k, "17 tiles of N 2112 need a K split: {proj_decode}");
    for k in lowered.kernels.iter().filter(|k| k.name.starts_with("gemm_")) {
        assert!(k.ptx.contains("wgmma.mma_async"), "{}", k.name);
        if let Some(r) = &k.resources {
            assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{}: spills", k.name);
        }
        // The kernel the artifact ships, its PTX simulated on a small ragged problem.
        let config = GemmConfig::from_name(&k.name).unwrap_or_else(|| panic!("{}: not a GEMM name", k.name));
        assert!(launched(&config), "{}", k.name);
        simulate_gemm(&config, k, false, false);
        if config.input == GemmInput::Fp8 {
            simulate_gemm(&config, k, false, true);
        }
    }
    // The embedding, the norms and their quantization are row kernels.
    let row = |name: &str| lowered.rows.iter().find(|(k, _)| k == name).map(|(_, r)| r.kernel.kernel_name());
    assert_eq!(row("embed_0").as_deref(), Some("rows_embed_bf16_d7168_t256"));
    assert_eq!(row("norm_quantize_0").as_deref(), Some("rows_rmsnorm_bf16_d7168_t256_eps1em6_q"));
    assert_eq!(row("norm_quantize_1").as_deref(), Some("rows_rmsnorm_bf16_d7168_t256_eps1em6_y_q"));
    assert_eq!(row("rms_norm_0").as_deref(), Some("rows_rmsnorm_bf16_d7168_t256_eps1em6_y"));
    assert_eq!(row("mla_latent_0").as_deref(), Some("rows_latent_bf16_d512_r64_t64_eps1em6_il_appendbf16"));
    // Decode's latent row stores the bf16 pages the tensor-core decode attention reads in place.
    assert_eq!(row("mla_latent_1").as_deref(), Some("rows_latent_bf16_d512_r64_t64_eps1em6_il_writebf16"));
    use sm90::rows::CacheRows;
    assert_eq!(lowered.caches, sm90::CacheFormats { prefill: CacheRows::Bf16, decode: CacheRows::Bf16, sparse: false });
    let (_, latent) = lowered.rows.iter().find(|(k, _)| k == "mla_latent_1").unwrap();
    let table = latent.rope_table.as_ref().expect("the latent row reads a RoPE table");
    assert_eq!((table.dim, table.inv_freq.len(), table.inv_freq[0]), (64, 32, 1.0));
    // MLA's query up-projection, the dense SwiGLU MLP, routing, the MoE GEMMs, the head are several
    // launches.
    let compound =
        |name: &str| lowered.compound.iter().find(|(k, _, _)| k == name).map(|(_, s, p)| (s.clone(), p.clone()));
    let (q_up, q_up_gemms) = compound("mla_q_up_0").expect("mla_q_up_0 lowers to launches");
    assert_eq!(q_up.steps.len(), 3);
    assert!(q_up_gemms[1].is_some() && q_up.rope_table.is_some());
    let (swiglu, _) = compound("swiglu_0").expect("swiglu_0 lowers to launches");
    use v3c_compiler::conversion::sm90::lower::StepKernel;
    let StepKernel::Gemm(g) = &swiglu.steps[0].kernel else { panic!("a GEMM") };
    assert_eq!((g.n, g.k, g.weights.len()), (2 * 18432, 7168, 2));
    assert!(lowered.unsupported.is_empty(), "{:?}", lowered.unsupported);
    // Prefill attention on the tensor cores (the default): the latent quantized, kv_b's fp8 GEMM,
    // keys/values and queries head-major in bf16, flash attention, back to token rows quantized.
    let (prefill, picks) = compound("attention_quantize_0").expect("prefill attention lowers to launches");
    let names: Vec<String> = prefill
        .steps
        .iter()
        .map(|s| match &s.kernel {
            StepKernel::Row(k) => k.kernel_name(),
            StepKernel::Gemm(g) => format!("GEMM {}", g.dims()),
            StepKernel::MlaPrefill(a) => a.config.kernel_name(),
            StepKernel::MlaDecode(a) => a.config.kernel_name(),
        })
        .collect();
    assert_eq!(
        names,
        [
            "rows_quantize_bf16_d512_t64",
            "GEMM N 32768 K 512",
            "rows_mlakeys_h128_n128_r64_v128_kv512_t256_bf16_c16",
            "rows_mlaqueries_h128_n128_r64_t256",
            "mla_prefill_qk192_v128_s4",
            "rows_mlaheadsout_h128_d16384_t256_q",
        ]
    );
    assert!(picks[1].is_some());
    // The ring depth the cost model ranks first (no database here): 4 tile buffers.
    let shape = v3c_compiler::tune::attention::AttentionShape::of_step(&prefill.steps[4].kernel).unwrap();
    let key = v3c_compiler::tune::ModelChooser::attention_key("attention_quantize_0", &shape);
    assert_eq!(key, "attention_quantize_0 [mla_prefill qk192 v128 h128]");
    let source = choose.source(&key, v3c_compiler::tune::PREFILL_M).unwrap();
    assert!(source.starts_with("cost model: ") && source.ends_with("compute-bound"), "{source}");
    let attention = lowered.kernels.iter().find(|k| k.name == "mla_prefill_qk192_v128_s4").expect("compiled");
    assert!(attention.ptx.contains("wgmma.mma_async") && attention.ptx.contains("cp.async.bulk.tensor"));
    if let Some(r) = &attention.resources {
        assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{}: spills", attention.name);
    }
    // Decode attention on the tensor cores (the default): absorbed queries (tensor cores), the
    // block table over the caches (bf16 pages read in place), split-K attention, the splits
    // merged, W_UV + quantization (tensor cores).
    let (decode, _) = compound("attention_decode_quantize_0").expect("decode attention lowers to launches");
    let names: Vec<String> = decode
        .steps
        .iter()
        .map(|s| match &s.kernel {
            StepKernel::Row(k) => k.kernel_name(),
            StepKernel::MlaDecode(a) => a.config.kernel_name(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "rows_mlaabsorbmma_h128_n128_r64_v128_kv512_t128",
            "rows_mlalengths_t32",
            "mla_decode_kv512_r64_p64_s2_cl2_serial",
            "rows_mlacombine_d512_t512",
            "rows_mlaupvmma_h128_n128_v128_kv512_t128",
        ]
    );
    let attention =
        lowered.kernels.iter().find(|k| k.name == "mla_decode_kv512_r64_p64_s2_cl2_serial").expect("compiled");
    if let Some(r) = &attention.resources {
        assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{}: spills", attention.name);
    }
    // The head: split into bf16 hi + lo, then one GEMM reading the weights once for both.
    let (head, picks) = compound("lm_head_0").expect("the head: split into bf16 hi + lo, one dual-A GEMM");
    assert_eq!(head.steps.len(), 2);
    let StepKernel::Gemm(g) = &head.steps[1].kernel else { panic!("a GEMM") };
    assert_eq!((g.n, g.k, g.a, g.a2), (129280, 7168, 0, Some(1)));
    let head_kernels = picks[1].as_ref().unwrap();
    assert!(head_kernels.names().iter().all(|k| k.trim_end_matches("_kp").ends_with("_a2")), "{head_kernels:?}");
    let (dispatch, picks) = compound("moe_dispatch_0").expect("routing lowers to launches");
    // Decode: the logits' pieces on the CUDA cores, the selection summing them. Prefill: the
    // activations split into bf16 hi + lo, the gate's dual-A GEMM into whole logits, the selection
    // on them. Then the counting sort, in both.
    let only: Vec<Option<Regime>> = dispatch.steps.iter().map(|s| s.only).collect();
    let (decode, prefill) = (Some(Regime::Decode), Some(Regime::Prefill));
    assert_eq!(only, [decode, decode, prefill, prefill, prefill, None]);
    let StepKernel::Gemm(g) = &dispatch.steps[3].kernel else { panic!("the gate's GEMM") };
    assert_eq!((g.n, g.k, g.a, g.a2, &g.weights[..]), (256, 7168, 0, Some(1), &[(2, None)][..]));
    assert!(picks[3].as_ref().unwrap().prefill.trim_end_matches("_kp").ends_with("_a2"), "{:?}", picks[3]);
    let names: Vec<String> = [0, 1, 2, 4]
        .map(|i| match &dispatch.steps[i].kernel {
            StepKernel::Row(k) => k.kernel_name(),
            other => panic!("{other:?}"),
        })
        .into();
    assert_eq!(
        names,
        [
            "rows_routelogits_bf16_d7168_e256_t256_b8",
            "rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8",
            "rows_splitbf16_d7168_t256",
            "rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8_p1",
        ]
    );
    // The decode-only rows launch decode's forms (a token a block), the prefill-only selection prefill's.
    assert_eq!(picks[1].as_ref().unwrap().decode, "rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256");
    assert_eq!(picks[4].as_ref().unwrap().prefill, "rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8_p1");
    // The MoE grouped GEMMs: the tokens' rows copied into expert order, the contiguous gate|up over
    // 257 groups (256 routed + 1 shared), then the down projection scattering into the residual.
    let (gate_up, picks) = compound("moe_gate_up_quantize_0").expect("the gate/up grouped GEMM");
    let StepKernel::Row(copy) = &gate_up.steps[0].kernel else { panic!("a row kernel") };
    assert_eq!(copy.kernel_name(), "rows_gatherfp8_d7168_t256");
    let StepKernel::Gemm(g) = &gate_up.steps[1].kernel else { panic!("a GEMM") };
    let gr = g.grouped.as_ref().unwrap();
    assert_eq!((g.n, g.k, gr.groups, gr.routed, gr.weights.len()), (4096, 7168, 257, 256, 2));
    assert_eq!(gr.grouping, v3c_compiler::conversion::sm90::gemm::GemmGrouping::Contiguous);
    assert!(picks[1].as_ref().unwrap().decode.trim_end_matches("_kp").ends_with("_contig"), "{:?}", picks[1]);
    let (down, picks) = compound("moe_down_0").expect("the down grouped GEMM");
    let StepKernel::Gemm(g) = &down.steps[1].kernel else { panic!("a GEMM") };
    assert!(g.grouped.as_ref().unwrap().scatter && g.grouped.as_ref().unwrap().row_scale.is_some());
    assert!(
        picks[1].as_ref().unwrap().decode.trim_end_matches("_kp").ends_with("_contig_rowscale_scatter"),
        "{:?}",
        picks[1]
    );
    // The MTP's projection on f32 activations: split into bf16 hi + lo like the head.
    assert_eq!(compound("linear_0").map(|(s, _)| s.steps.len()), Some(2));
}

/// Static pruning by ptxas: a kernel that fits on paper but spills is passed over for the next one.
/// A dK flash kernel for 384-wide heads spills (its accumulators alone are 192 registers a
/// thread); DeepSeek-V3's (192) does not, with any ring (until 2026-12-03 its ring of one spilled:
/// at 255 registers which depths spill moved with every change to the kernel). The
/// GEMM configuration this test used to hold, 128x256 bf16 output over two consumer warpgroups,
/// spilled until the epilogue stored column pairs; it assembles without spills now.
#[test]
fn configurations_that_spill_are_pruned() {
    use v3c_compiler::conversion::sm90::mla::{FlashMode, GradOf, MlaPrefillConfig};
    let Some(ptxas) = toolchain::find(toolchain::Tool::Ptxas).ok() else {
        eprintln!("skipped: no ptxas (run scripts/bootstrap.sh)");
        return;
    };
    let context = v3c_compiler::mlir::new_context();
    let dk = |qk, stages| {
        let config =
            MlaPrefillConfig { qk, stages, mode: FlashMode::Grad(GradOf::Keys), ..MlaPrefillConfig::DEEPSEEK_V3 };
        config.validate(&target::SM90A).unwrap();
        let kernel = sm90::compile_mla_prefill(&context, &config, &target::SM90A).unwrap();
        sm90::unspilled(kernel, &target::SM90A, Some(&ptxas)).unwrap()
    };
    assert!(dk(384, 1).is_err_and(|why| why.contains("spills")), "384-wide heads' dK spills");
    for stages in [1, 2, 3] {
        let kernel = dk(192, stages).unwrap_or_else(|why| panic!("DeepSeek-V3's dK with a ring of {stages}: {why}"));
        assert_eq!(kernel.resources.unwrap().spill_stores_bytes, 0);
    }
    // Fits `validate`'s count (192 accumulators + 40 of the producer's 240) but not ptxas's (24
    // bytes spilled with ptxas 13.0; with split K, or with two consumers of 64 rows each, it fits).
    let one_consumer = GemmConfig::from_name("gemm_fp8_f32_128x64x128_s2_ws_kp").unwrap();
    one_consumer.validate(&target::SM90A).unwrap();
    let pruned = sm90::compile_unspilled(&context, &one_consumer, &target::SM90A, Some(&ptxas)).unwrap();
    assert!(pruned.is_err_and(|why| why.starts_with("ptxas reports spills")));
    let wide = GemmConfig {
        consumers: 2,
        specialized: true,
        ..GemmConfig::new(GemmInput::Bf16, GemmOutput::Bf16, 128, 256, 4)
    };
    wide.validate(&target::SM90A).unwrap();
    let kernel = sm90::compile_unspilled(&context, &wide, &target::SM90A, Some(&ptxas)).unwrap();
    assert_eq!(kernel.expect("no spills").resources.unwrap().spill_stores_bytes, 0);
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Host memory of one simulated launch (the emulator's, its allocations the simulator's regions).
#[derive(Default)]
struct Host(v3c_compiler::emulate::HostMemory);

impl Host {
    fn buf(&mut self, bytes: &[u8], shape: &[usize], element: &'static str) -> v3c_runtime::abi::Buf {
        use v3c_runtime::gpu::Memory;
        let addr = self.0.upload(bytes, element).unwrap();
        v3c_runtime::abi::Buf { addr, shape: shape.to_vec(), element }
    }

    fn f32s(&mut self, v: &[f32], shape: &[usize]) -> v3c_runtime::abi::Buf {
        self.buf(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(), shape, "f32")
    }

    fn i32s(&mut self, v: &[i32], shape: &[usize]) -> v3c_runtime::abi::Buf {
        self.buf(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(), shape, "i32")
    }

    /// An input matrix of `input`'s element: e4m3 bytes (values spread over its range) or bf16.
    fn matrix(&mut self, input: GemmInput, shape: [usize; 2], seed: u64) -> v3c_runtime::abi::Buf {
        let v = values(shape[0] * shape[1], seed);
        match input {
            GemmInput::Fp8 => {
                let bytes: Vec<u8> = v.iter().map(|x| v3c_models::dtype::f32_to_f8e4m3(x * 8.0)).collect();
                self.buf(&bytes, &shape, "f8E4M3FN")
            }
            GemmInput::Bf16 => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| v3c_models::dtype::f32_to_bf16(*x).to_le_bytes()).collect();
                self.buf(&bytes, &shape, "bf16")
            }
        }
    }
}

/// Every GEMM configuration the runtime launches (dense, gathered and contiguous grouped forms;
/// f32 and bf16 outputs; split K, residual, row scales, scattered rows, B scales per row, a device
/// K range), its PTX simulated instruction by instruction (`v3c_ptxsim`) on a problem with ragged
/// edges (M, N and K not multiples of the tiles; an empty group), gives what the launch's semantics
/// give ([`v3c_compiler::emulate::emulate_gemm`], which the model-level tests hold against the CPU
/// backend); a cluster of two blocks (B multicast to both, the consumers releasing stages in
/// either block) too.
#[test]
fn every_launched_gemm_configuration_simulated_from_its_ptx_computes_its_semantics() {
    let context = v3c_compiler::mlir::new_context();
    let mut checked = 0;
    for config in configs() {
        if !launched(&config) {
            continue;
        }
        let kernel = sm90::compile_gemm(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        // Every other configuration with an odd N: its rows' column pairs are not 8-byte aligned,
        // so the epilogue stores each column on its own (the others store pairs).
        simulate_gemm(&config, &kernel, checked % 2 == 1, false);
        checked += 1;
    }
    assert!(checked >= 15, "{checked} configurations simulated");
}

/// Over 8 K tiles (split K: two ranges of 4, each summed by the last unit two splits a step) every
/// K tile of an fp8 GEMM is promoted with its own scales, and a unit reads no scale outside its
/// range. The 3 K tiles of the other simulations leave a main loop of at most 3 steps.
#[test]
fn fp8_gemms_over_many_k_tiles_promote_each_with_its_own_scales() {
    let context = v3c_compiler::mlir::new_context();
    let mut checked = 0;
    for config in configs() {
        if !launched(&config) || config.input != GemmInput::Fp8 || config.k_pipelined {
            continue;
        }
        let kernel = sm90::compile_gemm(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        simulate_gemm(&config, &kernel, false, true);
        checked += 1;
    }
    assert!(checked >= 8, "{checked} configurations simulated");
}

/// K-pipelined GEMMs over 8 K tiles (split K: 4 a unit, bf16's 64-wide tiles 15): each tile's
/// chain waited for before its block is read or its stage refilled — the loop's `wait_group 1`
/// made a `wait_group 2` (one chain fewer waited for) fails.
#[test]
fn k_pipelined_gemms_wait_for_each_chain_before_its_stage_and_block() {
    let context = v3c_compiler::mlir::new_context();
    let mut checked = 0;
    for config in configs() {
        if !launched(&config) || !config.k_pipelined {
            continue;
        }
        let kernel = sm90::compile_gemm(&context, &config, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        simulate_gemm(&config, &kernel, false, true);
        checked += 1;
    }
    assert!(checked >= 7, "{checked} configurations simulated");
}

/// The GEMM forms the runtime launches (not the masked grouping, the SwiGLU epilogue or fp8
/// outputs).
fn launched(config: &GemmConfig) -> bool {
    !config.swiglu && config.output != GemmOutput::Fp8 && config.grouping != GemmGrouping::Masked
}

/// Simulates `kernel` (the PTX of `config`) on a problem with ragged edges (`odd_n`: an odd N, but
/// for grouped fp8 weights) and holds its output to what the launch's semantics give. `long_k`: 8 K
/// tiles instead of 3, on 8 SMs (a split-K launch's units take 4 K tiles each).
fn simulate_gemm(config: &GemmConfig, kernel: &sm90::GpuKernel, odd_n: bool, long_k: bool) {
    use v3c_runtime::abi::GemmOperands;
    let abi = config.host_abi();
    let mut host = Host::default();
    let fp8 = config.input == GemmInput::Fp8;
    let grouped = config.grouping != GemmGrouping::Dense;
    // K: two whole 128-blocks (`long_k`: seven) and a 16-wide tail; N: a partial tile past whole
    // ones (an fp8 expert's N in whole 128-row scale blocks, as the runtime requires of grouped
    // weights).
    let k = if long_k { 912 } else { 272 };
    let n = if grouped && fp8 { 384 } else { config.block_n + 40 + usize::from(odd_n) };
    // Grouped: 40 groups (two chunks of the warps' scan), 37 sorted rows in group 1 and 64 in
    // group 34, the others empty (gathered from 90 tokens, scattered back).
    let (groups, offsets) = if grouped {
        let rows = |g: usize| match g {
            1 => 37,
            34 => 64,
            _ => 0,
        };
        (40, (0..=40).map(|g| (0..g).map(rows).sum::<i32>()).collect())
    } else {
        (1, vec![0, 100])
    };
    let rows = *offsets.last().unwrap() as usize;
    let tokens = 90;
    let a_rows = if config.grouping == GemmGrouping::Gather { tokens } else { rows };
    let a = host.matrix(config.input, [a_rows, k], 1);
    let a2 = config.dual_a.then(|| host.matrix(config.input, [a_rows, k], 7));
    let b = host.matrix(config.input, [groups * n, k], 2);
    let kb = k.div_ceil(128);
    let a_scale = fp8
        .then(|| host.f32s(&values(a_rows * kb, 3).iter().map(|x| 0.5 + x.abs()).collect::<Vec<_>>(), &[a_rows, kb]));
    let b_scale_rows = if config.b_row_scales { groups * n } else { (groups * n).div_ceil(128) };
    let b_scale = fp8.then(|| {
        host.f32s(&values(b_scale_rows * kb, 4).iter().map(|x| 0.5 + x.abs()).collect::<Vec<_>>(), &[b_scale_rows, kb])
    });
    let out_rows = if config.scatter { tokens } else { rows };
    let out_el = if config.output == GemmOutput::Bf16 { "bf16" } else { "f32" };
    let out_bytes = out_rows * n * if out_el == "bf16" { 2 } else { 4 };
    let out = host.buf(&vec![0u8; out_bytes], &[out_rows, n], out_el);
    let residual = config.residual.then(|| {
        let v = values(out_rows * n, 5);
        match out_el {
            "bf16" => host.buf(
                &v.iter().flat_map(|x| v3c_models::dtype::f32_to_bf16(*x).to_le_bytes()).collect::<Vec<u8>>(),
                &[out_rows, n],
                "bf16",
            ),
            _ => host.f32s(&v, &[out_rows, n]),
        }
    });
    let offsets_buf = grouped.then(|| host.i32s(&offsets, &[groups + 1]));
    // Sorted row p holds token (7 p) mod 90 (scatter: each token at most twice).
    let perm =
        grouped.then(|| host.i32s(&(0..rows as i32).map(|p| (7 * p) % tokens as i32).collect::<Vec<_>>(), &[rows]));
    let row_scale = config.row_scale.then(|| host.f32s(&values(rows, 6), &[rows]));
    let k_range = config.k_range.then(|| host.i32s(&[128, k as i32], &[2]));
    let problem = v3c_runtime::abi::GemmProblem { m: rows, n, k, groups };
    let scratch = abi.scratch(problem, 132);
    let workspace =
        config.split_k.then(|| host.buf(&vec![0u8; scratch.workspace_bytes], &[scratch.workspace_bytes], "i8").addr);
    let counters = config.split_k.then(|| host.buf(&vec![0u8; scratch.counters * 4], &[scratch.counters], "i32").addr);
    let ops = GemmOperands {
        a: &a,
        a2: a2.as_ref(),
        a_scale: a_scale.as_ref(),
        b: &b,
        b_scale: b_scale.as_ref(),
        out: &out,
        residual: residual.as_ref(),
        offsets: offsets_buf.as_ref(),
        perm: if config.grouping == GemmGrouping::Contiguous && !config.scatter { None } else { perm.as_ref() },
        row_scale: row_scale.as_ref(),
        k_range: k_range.as_ref(),
        workspace,
        counters,
    };
    // A grouped GEMM on 4 SMs: each block walks several units, resuming its scan of the groups.
    // `long_k` on 8: split K cuts 8 K tiles in two.
    let sm_count = match (grouped, long_k) {
        (true, _) => 4,
        (false, true) => 8,
        (false, false) => 132,
    };
    let launch = abi.launch(&kernel.name, &ops, sm_count).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: the launch's buffers are `host`'s.
    unsafe { v3c_compiler::emulate::emulate_gemm(&abi, &launch) }.unwrap();
    let read = |b: &v3c_runtime::abi::Buf| -> Vec<f32> {
        // SAFETY: the output's allocation.
        let bytes = unsafe { std::slice::from_raw_parts(b.addr as *const u8, out_bytes) };
        match out_el {
            "bf16" => {
                bytes.chunks(2).map(|c| v3c_models::dtype::bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
            _ => bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    };
    let want = read(&out);
    // The launch of `ptx` (the kernel's, or a variant) simulated as `checks` says.
    let simulate = |ptx: &str, checks: v3c_ptxsim::Checks| {
        let module = v3c_ptxsim::Module::parse(ptx).unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
        // SAFETY: every access is checked against `host`'s regions.
        unsafe {
            v3c_compiler::emulate::simulate_launch(
                &module.kernels[0],
                &launch,
                kernel.threads,
                kernel.shared_memory_bytes,
                Some(host.0.regions()),
                checks,
            )
        }
    };
    // Two schedules: each CTA's threads first to last, and last to first.
    for reversed in [false, true] {
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(out.addr as *mut u8, 0, out_bytes) };
        let stats =
            simulate(&kernel.ptx, v3c_ptxsim::Checks { reversed, races: !reversed }).unwrap_or_else(|e| panic!("{e}"));
        let got = read(&out);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        let used = stats.global_efficiency();
        eprintln!(
            "{} (threads reversed: {reversed}): {} CTAs, {} instructions simulated, {} load rounds, {:.0}% of the \
             global sectors' bytes used; max |diff| {diff:.3e} of max |value| {scale:.3e}",
            kernel.name,
            stats.ctas,
            stats.instructions,
            stats.load_rounds,
            100.0 * used
        );
        // f32 sums in another order (a bf16 output: one rounding apart).
        let tolerance = if out_el == "bf16" { 1e-2 } else { 1e-5 };
        assert!(scale > 0.0 && diff <= tolerance * scale, "{} (reversed {reversed}): {diff} of {scale}", kernel.name);
    }
    if config.k_pipelined && long_k {
        // Waiting for all but two chains where the loop waits for all but one reads a block, or
        // gives its stage back for a refill, before the tensor cores are done with it: a race on
        // the stage, or a wrong output.
        let early = kernel.ptx.replace("wgmma.wait_group.sync.aligned \t1;", "wgmma.wait_group.sync.aligned \t2;");
        assert_ne!(early, kernel.ptx, "{}: no wait_group 1", kernel.name);
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(out.addr as *mut u8, 0, out_bytes) };
        if let Some(c) = counters {
            // SAFETY: the counters' allocation (a failed run may leave them counted).
            unsafe { std::ptr::write_bytes(c as *mut u8, 0, scratch.counters * 4) };
        }
        match simulate(&early, v3c_ptxsim::Checks { reversed: false, races: true }) {
            Err(e) => assert!(e.contains("race") || e.contains("wgmma"), "{}: {e}", kernel.name),
            Ok(_) => assert_ne!(read(&out), want, "{}: waiting a chain early went unnoticed", kernel.name),
        }
    }
    if config.split_k {
        // The kernel leaves its counters zero for the next launch.
        let c = counters.unwrap();
        // SAFETY: the counters' allocation.
        let left = unsafe { std::slice::from_raw_parts(c as *const i32, scratch.counters) };
        assert!(left.iter().all(|&x| x == 0), "{}: counters {left:?}", kernel.name);
        // Without the fence before its count, a unit's partial tile is not released to the last
        // unit, whose reads of it race (found by the launch's global happens-before).
        let unfenced = kernel.ptx.replacen("membar.gl;", "membar.cta;", 1);
        assert_ne!(unfenced, kernel.ptx, "{}: a split-K epilogue fences before it counts", kernel.name);
        let e = simulate(&unfenced, v3c_ptxsim::Checks { reversed: false, races: true }).unwrap_err();
        assert!(e.contains("data race on global byte") && e.contains("no GPU-scope fence and atomic hand-off"), "{e}");
    }
}
