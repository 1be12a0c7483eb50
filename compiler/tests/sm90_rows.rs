//! The row kernels' sm_90a lowering: PTX for every kind, assembled by ptxas (when present) without
//! spills or local memory. Their numerics are checked through the CPU lowering of the same
//! template (unit tests of `conversion::sm90::rows`) and on the device by benches/device/rows_check.py.

use v3c_compiler::conversion::sm90::{self, rows::CacheRows, rows::Mla, rows::RowKernel, rows::RowOp, rows::TrainRow};
use v3c_compiler::{target, toolchain};
use v3c_models::interp::kernels::ROUTER_SPLITS;

fn kernels() -> Vec<RowKernel> {
    let norm = |keep, quantize, d, w| RowKernel::new(RowOp::RmsNorm { eps: 1e-6, keep, quantize }, d, w);
    // DeepSeek-V3's routing selection, `tokens` a block, over the logits' 16 pieces.
    let route = |tokens| {
        let (top_k, n_group, topk_group, pieces) = (8, 8, 4, ROUTER_SPLITS);
        let op = RowOp::Route {
            experts: 256,
            top_k,
            n_group,
            topk_group,
            norm: true,
            scale: 2.5,
            tokens,
            pieces,
            softmax: false,
        };
        RowKernel::new(op, 256, "f32")
    };
    // DeepSeek-V2-Lite's: a softmax over 64 experts, 6 picked from one group.
    let softmax_route = |tokens, pieces| {
        let op = RowOp::Route {
            experts: 64,
            top_k: 6,
            n_group: 1,
            topk_group: 1,
            norm: false,
            scale: 1.0,
            tokens,
            pieces,
            softmax: true,
        };
        RowKernel::new(op, 64, "f32")
    };
    vec![
        RowKernel::new(RowOp::Embed, 7168, "bf16"),
        RowKernel::new(RowOp::SiluMul { quantize: true }, 2048, "f32"),
        norm(false, true, 7168, "bf16"),
        norm(true, true, 7168, "bf16"),
        norm(true, false, 7168, "bf16"),
        norm(true, false, 1536, "f32"),
        norm(false, true, 1000, "bf16"),
        RowKernel::new(
            RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: false, cache: CacheRows::F32 },
            512,
            "bf16",
        ),
        RowKernel::new(
            RowOp::Latent { eps: 1e-6, rope: 64, interleave: false, append: true, cache: CacheRows::F32 },
            512,
            "f32",
        ),
        RowKernel::new(
            RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: false, cache: CacheRows::Bf16 },
            512,
            "bf16",
        ),
        RowKernel::new(
            RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: false, cache: CacheRows::Fp8 },
            512,
            "bf16",
        ),
        RowKernel::new(RowOp::SplitRope { heads: 128, nope: 128, rope: 64, interleave: true }, 128 * 192, "f32"),
        RowKernel::new(RowOp::SiluMul { quantize: true }, 18432, "f32"),
        RowKernel::new(RowOp::SiluMul { quantize: false }, 2048, "f32"),
        RowKernel::new(RowOp::Copy, 7168, "f32"),
        // The fp8 MoE gate/up's rows copied into expert order.
        RowKernel::new(RowOp::GatherFp8, 7168, "f32"),
        // Routing: decode's logits 4 tokens a block and its selection one, prefill's 8.
        RowKernel::new(RowOp::RouteLogits { experts: 256, tokens: 4 }, 7168, "bf16"),
        RowKernel::new(RowOp::RouteLogits { experts: 256, tokens: 8 }, 7168, "bf16"),
        route(1),
        route(8),
        softmax_route(1, ROUTER_SPLITS),
        softmax_route(8, 1),
        RowKernel::new(RowOp::Dispatch { experts: 256, shared: 1 }, 257, "f32"),
        RowKernel::new(RowOp::SplitBf16, 7168, "f32"),
        RowKernel::new(RowOp::SplitBf16T, 7168, "f32"),
        RowKernel::new(RowOp::Concat { second: 7168 }, 7168, "f32"),
        RowKernel::new(RowOp::MlaCombine, 512, "f32"),
        RowKernel::new(RowOp::MlaKeys { heads: 128, nope: 128, rope: 64, v: 128, cache: CacheRows::F32 }, 512, "f32"),
        RowKernel::new(RowOp::MlaKeys { heads: 128, nope: 128, rope: 64, v: 128, cache: CacheRows::Bf16 }, 512, "bf16"),
        RowKernel::new(RowOp::MlaKeys { heads: 128, nope: 128, rope: 64, v: 128, cache: CacheRows::Fp8 }, 512, "bf16"),
        RowKernel::new(RowOp::Fp8Latent, 512, "f32"),
        RowKernel::new(
            RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: true, cache: CacheRows::Fp8 },
            512,
            "bf16",
        ),
        RowKernel::new(RowOp::Train(TrainRow::Quantize), 512, "bf16"),
        RowKernel::new(
            RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: true, cache: CacheRows::Bf16 },
            512,
            "bf16",
        ),
        RowKernel::new(RowOp::MlaQueries { heads: 128, nope: 128, rope: 64 }, 128 * 192, "f32"),
        RowKernel::new(RowOp::MlaAbsorb { heads: 128, nope: 128, rope: 64, v: 128, tokens: 8 }, 512, "f8E4M3FN"),
        RowKernel::new(RowOp::MlaAbsorbMma { heads: 128, nope: 128, rope: 64, v: 128 }, 512, "f8E4M3FN"),
        RowKernel::new(RowOp::MlaAbsorbMma { heads: 128, nope: 128, rope: 64, v: 128 }, 512, "bf16"),
        RowKernel::new(RowOp::MlaUpV { heads: 128, nope: 128, v: 128, tokens: 8 }, 512, "f8E4M3FN"),
        RowKernel::new(RowOp::MlaUpVMma { heads: 128, nope: 128, v: 128 }, 512, "f8E4M3FN"),
        RowKernel::new(RowOp::MlaUpVMma { heads: 128, nope: 128, v: 128 }, 512, "bf16"),
        RowKernel::new(RowOp::MlaLengths, 64, "f32"),
        RowKernel::new(RowOp::MlaHeadsOut { heads: 128, quantize: true }, 128 * 128, "f32"),
        RowKernel::new(RowOp::MlaHeadsOut { heads: 128, quantize: false }, 128 * 128, "f32"),
        RowKernel::new(RowOp::Argmax, 129_280, "f32"),
        RowKernel::new(RowOp::Sample, 129_280, "f32"),
        RowKernel::new(RowOp::Scores, 129_280, "f32"),
        RowKernel::new(v3_attention(false, false), 512, "f8E4M3FN"),
        RowKernel::new(v3_attention(true, false), 512, "f8E4M3FN"),
    ]
    .into_iter()
    .chain(sparse_attention_kernels())
    .chain(training_kernels())
    .chain(tuned_norms())
    .collect()
}

/// DeepSeek-V3's norms at every block width the tuner may pick besides the template's own (at 1024
/// threads ptxas holds a block to 32 registers a thread).
fn tuned_norms() -> Vec<RowKernel> {
    let norms = [(7168, true, true), (7168, true, false), (7168, false, true), (1536, false, true)];
    let mut all = Vec::new();
    for (d, keep, quantize) in norms {
        let own = RowKernel::new(RowOp::RmsNorm { eps: 1e-6, keep, quantize }, d, "bf16");
        for threads in [32, 64, 128, 256, 512, 1024].into_iter().filter(|&t| t != own.threads) {
            all.push(RowKernel { threads, ..own.clone() });
        }
    }
    all
}

/// The training step's row kernels at DeepSeek-V3's widths.
fn training_kernels() -> Vec<RowKernel> {
    let train = |op, d, w| RowKernel::new(RowOp::Train(op), d, w);
    let mut kernels: Vec<RowKernel> = [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .map(|(transpose_a, transpose_b)| train(TrainRow::Matmul { transpose_a, transpose_b }, 7168, "f32"))
        .collect();
    kernels.extend([
        train(TrainRow::Add, 7168, "f32"),
        train(TrainRow::SiluMul, 18432, "f32"),
        train(TrainRow::SiluMulGrad, 18432, "f32"),
        train(TrainRow::Columns { start: 1536, stride: 2112 }, 512, "f32"),
        train(TrainRow::Rope { heads: 128, interleave: true, inverse: false }, 64, "f32"),
        train(TrainRow::Rope { heads: 1, interleave: false, inverse: true }, 64, "f32"),
        train(TrainRow::RmsNormGrad { eps: 1e-6 }, 7168, "bf16"),
        train(TrainRow::RmsNormGrad { eps: 1e-6 }, 1536, "f32"),
        train(TrainRow::RmsNormDw, 7168, "f32"),
        train(TrainRow::EmbedGrad, 7168, "f32"),
        train(TrainRow::IdRank, 256, "f32"),
        train(TrainRow::RowRange { into: true, shifted: true }, 576, "f32"),
        train(TrainRow::RowRange { into: false, shifted: false }, 576, "f32"),
        train(TrainRow::CrossEntropy { grad: true, weight: 0.3 }, 129_280, "f32"),
        train(TrainRow::CrossEntropy { grad: false, weight: 1.0 }, 129_280, "f32"),
        train(TrainRow::LossMean { weight: 1e-4 }, 1, "f32"),
        train(TrainRow::ExpertFreq, 256, "f32"),
        train(TrainRow::BalanceRows { grad: true, alpha: 1e-4, softmax: false }, 256, "f32"),
        train(TrainRow::BalanceRows { grad: false, alpha: 1e-4, softmax: false }, 256, "f32"),
        train(TrainRow::RouteGrad { norm: true, scale: 2.5, softmax: false }, 256, "f32"),
        // DeepSeek-V2-Lite's: softmax affinities over 64 experts.
        train(TrainRow::BalanceRows { grad: true, alpha: 1e-3, softmax: true }, 64, "f32"),
        train(TrainRow::RouteGrad { norm: false, scale: 1.0, softmax: true }, 64, "f32"),
        train(TrainRow::Slice { start: 0 }, 512, "f32"),
        train(TrainRow::Join { second: 64 }, 512, "f32"),
        train(TrainRow::SumHeads { heads: 128 }, 64, "f32"),
        // Flash attention's backward: dout and D in, dQ, dK and dV back to their rows.
        train(TrainRow::FlashDout { heads: 128 }, 128, "f32"),
        train(TrainRow::FlashDq { heads: 128, nope: 128 }, 192, "f32"),
        train(TrainRow::FlashDkv { heads: 128, nope: 128, v: 128 }, 192, "f32"),
    ]);
    // DeepSeek-V3's attention as the training lowering takes it: 8 queries (keys) a block, 1024
    // keys at a time forward, 512 (queries) in the gradients.
    let mla = |context| Mla { heads: 128, nope: 128, rope: 64, v: 128, kv: 512, context, group: 8, scale: 0.1352 };
    kernels.extend(
        [TrainRow::MlaForward(mla(1024)), TrainRow::MlaGradQ(mla(512)), TrainRow::MlaGradKv(mla(512))]
            .map(|op| train(op, 512, "f32")),
    );
    // Their operands transposed along the keys (queries): kvb, the latent's rope columns, the
    // queries' nope and rope heads (the output gradient's heads as wide as the nope ones).
    kernels.extend([
        train(TrainRow::Transpose { start: 0, heads: 0 }, 32768, "f32"),
        train(TrainRow::Transpose { start: 512, heads: 0 }, 64, "f32"),
        train(TrainRow::Transpose { start: 0, heads: 128 }, 16384, "f32"),
        train(TrainRow::Transpose { start: 0, heads: 128 }, 8192, "f32"),
    ]);
    // DeepSeek-V3's routed experts: 8 of 256, intermediate 2048, hidden 7168.
    kernels.extend([
        train(TrainRow::MoeHidden { k: 8, keep: false }, 2048, "f32"),
        train(TrainRow::MoeHidden { k: 8, keep: true }, 2048, "f32"),
        train(TrainRow::MoeCombine { k: 8 }, 7168, "f32"),
        train(TrainRow::MoeGradToken { k: 8 }, 2048, "f32"),
        train(TrainRow::MoeGradX { k: 8 }, 7168, "f32"),
        train(TrainRow::PairSort, 256, "f32"),
        train(TrainRow::MoeGradW { down: true }, 2048, "f32"),
        train(TrainRow::MoeGradW { down: false }, 7168, "f32"),
        // The FP8 recipe: q_b's 1536-wide input rows, a [24576, 1536] master's blocks both ways,
        // 128x1 tiles of 7168 columns transposed (Wgrad's GEMM operands).
        train(TrainRow::Quantize, 1536, "f32"),
        train(TrainRow::QuantizeBlocks { tiles: 12, transposed: false, matrix_rows: 0 }, 128, "f32"),
        train(TrainRow::QuantizeBlocks { tiles: 192, transposed: true, matrix_rows: 0 }, 128, "f32"),
        train(TrainRow::QuantizeCols, 7168, "f32"),
        // The FP8 recipe's routed experts: each expert's master in blocks of its own (both ways)
        // and their scales per row, the sorted pairs' rows for the grouped GEMMs, the per-token
        // combines, the routing weights' gradient, Wgrad's 128-pair tiles.
        train(TrainRow::QuantizeBlocks { tiles: 56, transposed: false, matrix_rows: 2048 }, 128, "f32"),
        train(TrainRow::QuantizeBlocks { tiles: 56, transposed: true, matrix_rows: 7168 }, 128, "f32"),
        train(TrainRow::RowScales { matrix_rows: 2048 }, 56, "f32"),
        train(TrainRow::PairRows { k: 8 }, 8, "f32"),
        train(TrainRow::PairCombine { k: 8, two: false }, 7168, "f32"),
        train(TrainRow::PairCombine { k: 8, two: true }, 7168, "f32"),
        train(TrainRow::PairGrad { k: 8 }, 7168, "f32"),
        train(TrainRow::QuantizePairs { by_token: true }, 7168, "f32"),
        train(TrainRow::QuantizePairs { by_token: false }, 2048, "f32"),
        train(TrainRow::PadOffsets, 256, "f32"),
    ]);
    // The optimizer on the device, as every training artifact carries it.
    kernels.extend(
        [
            TrainRow::GradAccum { first: true },
            TrainRow::GradAccum { first: false },
            TrainRow::SumSquares,
            TrainRow::AdamW,
        ]
        .map(|op| train(op, sm90::OPTIMIZER_CHUNK, "f32")),
    );
    kernels
}

/// DeepSeek-V3's MLA row (its head dims and softmax scale), over keys by position or `selected`.
fn v3_attention(prefill: bool, selected: bool) -> RowOp {
    RowOp::MlaDecode { heads: 128, nope: 128, rope: 64, v: 128, context: 8192, scale: 0.1352, prefill, selected }
}

/// DeepSeek-V3.2's at the full model's sizes: the indexer key's LayerNorm, the scores and the top
/// keys (64 heads of 128, 2048 keys; on the tensor cores over f32 and bf16 rows), decode's cache
/// write (704-wide rows, f32 and bf16), the selected rows' gather, the attention reading them in
/// place, decode's pages of them for the tensor cores, the cache row with the key, and the indexer's
/// query heads.
fn sparse_attention_kernels() -> Vec<RowKernel> {
    use sm90::rows::SparseRow;
    let mut kernels = vec![RowKernel::new(RowOp::Sparse(SparseRow::LayerNorm { eps: 1e-6 }), 128, "bf16")];
    for decode in [false, true] {
        for (mma, bf16_keys) in [(false, false), (true, false), (true, true)] {
            let op = SparseRow::IndexScores { heads: 64, decode, top_k: 2048, mma, bf16_keys };
            kernels.push(RowKernel::new(RowOp::Sparse(op), 128, "f32"));
        }
        kernels.push(RowKernel::new(RowOp::Sparse(SparseRow::TopKeys { decode }), 2048, "f32"));
        kernels.push(RowKernel::new(RowOp::Sparse(SparseRow::GatherRows { decode }), 576, "f32"));
        kernels.push(RowKernel::new(v3_attention(!decode, true), 512, "f8E4M3FN"));
    }
    for bf16 in [false, true] {
        kernels.push(RowKernel::new(RowOp::Sparse(SparseRow::CacheWrite { bf16 }), 704, "f32"));
        // Prefill's bf16 cache rows: the old copied, the new rounded after them.
        kernels.push(RowKernel::new(RowOp::Sparse(SparseRow::AppendBf16 { new: bf16 }), 704, "f32"));
    }
    // Prefill's key rows in bf16 for the tensor cores' gathers (`_sel16`).
    kernels.push(RowKernel::new(RowOp::Train(TrainRow::Slice { start: 0 }), 576, "bf16"));
    // The cache row: the latent's norm and RoPE, the key's LayerNorm and RoPE in halves.
    let op = RowOp::LatentKey { eps: 1e-6, rope: 64, interleave: true, key: 128, key_eps: 1e-6 };
    kernels.push(RowKernel::new(op, 512, "bf16"));
    // The indexer's 64 query heads of 128, their first 64 columns rotated in halves.
    kernels.push(RowKernel::new(RowOp::HeadsRope { heads: 64, rope: 64, interleave: false }, 64 * 128, "f32"));
    kernels
}

#[test]
fn row_kernels_compile_to_sm90a_without_spills() {
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    for k in kernels() {
        // What `v3c dump-ir --kernel` and the artifact's lowering read back.
        assert_eq!(RowKernel::from_name(&k.kernel_name()), Some(k.clone()), "{}", k.kernel_name());
        let kernel = sm90::compile_rows(&context, &k, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        let name = &kernel.name;
        assert!(kernel.ptx.contains(&format!(".entry {name}(")), "{name}");
        // No libdevice is linked: a `__nv_*` call would not assemble.
        assert!(!kernel.ptx.contains("__nv_"), "{name}: libdevice call");
        assert!(kernel.ptx.contains(&format!(".maxntid {}, 1, 1", k.threads)), "{name}: block size");
        match k.op {
            RowOp::Embed => {
                assert!(!kernel.ptx.contains("bar.sync"), "{name}: one phase, no barrier");
                // DeepSeek-V3's: a bf16 table row's 4 columns a load, the f32 row's a store.
                assert!(kernel.ptx.contains("st.global.v4.b32"), "{name}: 16-byte stores");
            }
            RowOp::SplitRope { .. }
            | RowOp::HeadsRope { .. }
            | RowOp::Copy
            | RowOp::SplitBf16
            | RowOp::SplitBf16T
            | RowOp::Concat { .. }
            | RowOp::MlaKeys { .. }
            | RowOp::MlaLengths
            | RowOp::Fp8Latent
            | RowOp::GatherFp8
            | RowOp::MlaQueries { .. } => {
                assert!(!kernel.ptx.contains("bar.sync"), "{name}: one phase");
                // DeepSeek-V3's widths: 16 bytes of f32 a load (the copies and the splits), a
                // head's 4 bf16 columns in one 8-byte store (the keys and queries).
                match k.op {
                    RowOp::SplitRope { .. } | RowOp::Copy | RowOp::Concat { .. } => {
                        assert!(kernel.ptx.contains("ld.global.v4.b32"), "{name}: 16-byte loads");
                        assert!(kernel.ptx.contains("st.global.v4.b32"), "{name}: 16-byte stores");
                    }
                    RowOp::SplitBf16 | RowOp::MlaQueries { .. } => {
                        assert!(kernel.ptx.contains("ld.global.v4.b32"), "{name}: 16-byte loads");
                        assert!(kernel.ptx.contains("st.global.v2.b32"), "{name}: 8-byte stores");
                    }
                    RowOp::MlaKeys { .. } => {
                        assert!(kernel.ptx.contains("st.global.v2.b32"), "{name}: 8-byte stores");
                    }
                    _ => {}
                }
            }
            RowOp::Argmax => {
                let phases = 2 + k.threads.trailing_zeros() as usize;
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: scan, tree, write");
            }
            RowOp::Sample => {
                // The maximum (a scan, a tree), the blocks' sums, the draw's block, its weights,
                // the walk; top-p's candidates, their bitonic sort, the nucleus's draw.
                let m = sm90::rows::NUCLEUS_CAP.min(k.d.next_power_of_two()).trailing_zeros() as usize;
                let phases = 5 + k.threads.trailing_zeros() as usize + 2 + m * (m + 1) / 2;
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                // The host's arithmetic: IEEE division, no fused multiply-add, f64 sums.
                assert!(kernel.ptx.contains("div.rn.f32") && kernel.ptx.contains("add.rn.f64"), "{name}");
                assert!(!kernel.ptx.contains("fma.") && !kernel.ptx.contains("approx"), "{name}");
            }
            RowOp::Scores => {
                // The maximum (a scan, a tree), the running sums (and the threads' most probable),
                // their tree, the lists' merges, the write.
                let levels = k.threads.trailing_zeros() as usize;
                let phases = 2 * (1 + levels) + levels + 1;
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                // The host's exp64: f64 arithmetic, no fused multiply-add; the logits' loads coalesced.
                assert!(kernel.ptx.contains("mul.rn.f64") && kernel.ptx.contains("add.rn.f64"), "{name}");
                assert!(!kernel.ptx.contains("fma.") && !kernel.ptx.contains("approx"), "{name}");
            }
            RowOp::MlaCombine => {
                assert!(!kernel.ptx.contains("bar.sync"), "{name}: one phase");
                assert!(kernel.ptx.contains("ex2.approx.ftz.f32"), "{name}: exp");
            }
            RowOp::Sparse(op) => {
                use sm90::rows::SparseRow;
                let barriers = kernel.ptx.matches("bar.sync").count();
                match op {
                    // One thread's sums, then the columns.
                    SparseRow::LayerNorm { .. } => assert_eq!(barriers, 1, "{name}"),
                    // The query into shared memory, then a thread a key (on the tensor cores: 64
                    // keys a warpgroup, 3 wgmmas a 16-column step — 2 over bf16 keys —, a key's
                    // heads joined by two shuffles in its quad).
                    SparseRow::IndexScores { mma, bf16_keys, .. } => {
                        assert_eq!(barriers, 1, "{name}");
                        let wgmmas = kernel.ptx.matches("wgmma.mma_async.sync.aligned.m64n64k16").count();
                        let products = if bf16_keys { 2 } else { 3 };
                        assert_eq!(wgmmas, if mma { products * k.d / 16 } else { 0 }, "{name}");
                        assert_eq!(kernel.ptx.matches("shfl.sync.bfly").count(), if mma { 4 } else { 0 }, "{name}");
                        assert_eq!(kernel.ptx.contains("fence.proxy.async"), mma, "{name}");
                    }
                    // The radix pass loop: the bins cleared, counted (shared-memory atomics), summed
                    // in groups, walked (each iteration ending in a barrier); the first phase, the
                    // chunks' counts, the scan, the writes.
                    SparseRow::TopKeys { .. } => {
                        assert_eq!(barriers, 1 + 4 + 2, "{name}");
                        assert!(kernel.ptx.contains("atom.shared.add.u32"), "{name}: the bins' counts");
                    }
                    SparseRow::GatherRows { .. } | SparseRow::CacheWrite { .. } | SparseRow::AppendBf16 { .. } => {
                        assert_eq!(barriers, 0, "{name}")
                    }
                }
            }
            RowOp::MlaDecode { .. } => {
                // Three phases, loops over the key chunks of 2, 3 and 4 phases (each iteration
                // ending in a barrier), three phases.
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 14, "{name}: barriers");
                assert!(
                    kernel.ptx.contains("ex2.approx.ftz.f32") && kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32")
                );
            }
            RowOp::MlaAbsorb { .. } => {
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 1, "{name}: q_nope shared, then q_abs");
            }
            RowOp::MlaAbsorbMma { nope, .. } => {
                // A staged, then per latent chunk B staged and multiplied (a barrier before the
                // next staging).
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 3, "{name}: A, then B, then products");
                assert_eq!(kernel.ptx.matches("wgmma.mma_async").count(), nope / 16, "{name}: a chunk's k16 steps");
                assert!(kernel.ptx.contains("st.shared.v2.b32"), "{name}: B's word pairs in one store");
                assert!(
                    kernel.ptx.contains("fence.proxy.async"),
                    "{name}: threads' writes before the tensor cores' reads"
                );
            }
            RowOp::MlaUpVMma { .. } => {
                // Per latent chunk: staged, then multiplied (a barrier before the next staging).
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 2, "{name}: barriers");
                assert_eq!(kernel.ptx.matches("wgmma.mma_async").count(), 4, "{name}: a chunk's k16 steps");
                assert!(kernel.ptx.contains("st.shared.v2.b32"), "{name}: B's word pairs in one store");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), k.weight != "bf16", "{name}");
            }
            RowOp::MlaUpV { .. } => {
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 3, "{name}: o shared, W_UV, scale, bytes");
                assert!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), "{name}");
            }
            RowOp::MlaHeadsOut { quantize, .. } => {
                let barriers = if quantize { 2 } else { 0 };
                assert_eq!(kernel.ptx.matches("bar.sync").count(), barriers, "{name}: |max| parts, scales, bytes");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), quantize, "{name}");
                // A head's 4 columns a load (unquantized, the row's 4 a store).
                assert!(kernel.ptx.contains("ld.global.v4.b32"), "{name}: 16-byte loads");
                assert_eq!(kernel.ptx.contains("st.global.v4.b32"), !quantize, "{name}: 16-byte stores");
            }
            RowOp::RouteLogits { .. } => {
                // Cleared; per gate tile (a loop): the tile loaded, the sums; the pieces stored.
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 3, "{name}: barriers")
            }
            RowOp::Route { softmax, .. } => {
                // Flags cleared; the logits and scores (softmax: the logits, then each token's
                // softmax); the selection.
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 2 + softmax as usize, "{name}: barriers")
            }
            RowOp::Dispatch { .. } => {
                // Counts cleared, counted per chunk, totalled, scanned, placed.
                assert_eq!(kernel.ptx.matches("bar.sync").count(), 4, "{name}: five phases")
            }
            RowOp::SiluMul { quantize } => {
                assert_eq!(kernel.ptx.matches("bar.sync").count(), if quantize { 2 } else { 0 }, "{name}: barriers");
                assert!(kernel.ptx.contains("ex2.approx.ftz.f32"), "{name}: exp");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), quantize, "{name}");
                // The gate and up halves 16 bytes a load; quantized, the bytes 4 a store (with the
                // scales' stores: two `st.global.b32`), else y 16 bytes a store.
                assert!(kernel.ptx.contains("ld.global.v4.b32"), "{name}: 16-byte loads");
                assert_eq!(kernel.ptx.contains("st.global.v4.b32"), !quantize, "{name}: 16-byte stores");
                if quantize {
                    assert_eq!(kernel.ptx.matches("st.global.b32").count(), 2, "{name}: 4 bytes a store");
                }
            }
            RowOp::Latent { cache, .. } => {
                // The norm's phases; the fp8 row's quantization adds three (|max| parts, scales,
                // bytes).
                let fp8 = cache == CacheRows::Fp8;
                let phases = 2 + k.threads.trailing_zeros() as usize + if fp8 { 3 } else { 0 };
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                assert!(kernel.ptx.contains("sqrt.rn.f32"), "{name}: sqrt");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), fp8, "{name}");
                assert!(kernel.ptx.contains("ld.global.v4.b32"), "{name}: the latent row 16 bytes a load");
            }
            RowOp::LatentKey { .. } => {
                // The key's mean and deviation (one thread), then the norm's phases.
                let phases = 3 + k.threads.trailing_zeros() as usize;
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                assert!(kernel.ptx.contains("sqrt.rn.f32"), "{name}: sqrt");
                assert!(kernel.ptx.contains("ld.global.v4.b32"), "{name}: the latent row 16 bytes a load");
                assert!(kernel.ptx.contains("st.global.v4.b32"), "{name}: its norm 16 bytes a store");
            }
            RowOp::Train(op) => {
                let tree = k.threads.trailing_zeros() as usize;
                let barriers = match op {
                    TrainRow::RmsNormGrad { .. } => 1 + tree,
                    // Max, then the sum: each a strided pass and a tree, then the last phase.
                    TrainRow::CrossEntropy { .. } => 2 * (1 + tree),
                    // (Softmax routing's gradient: one phase by one thread a token.)
                    TrainRow::RouteGrad { softmax: true, .. } => 0,
                    TrainRow::RouteGrad { .. }
                    | TrainRow::PairCombine { .. }
                    | TrainRow::PairGrad { .. }
                    | TrainRow::MoeCombine { .. }
                    | TrainRow::MoeGradToken { .. } => 1,
                    // Counts cleared, counted per chunk, totalled, scanned, placed.
                    TrainRow::PairSort => 4,
                    TrainRow::ExpertFreq => 2,
                    // The 1x128 quantization: group |max| parts, scales, bytes.
                    TrainRow::Quantize => 2,
                    TrainRow::QuantizeBlocks { .. } => 1 + tree,
                    // The strided pass, the tree, the part written.
                    TrainRow::SumSquares => 1 + tree,
                    // Attention: loops over the key (query) chunks, each iteration ending in a
                    // barrier.
                    TrainRow::MlaForward(_) => 10,
                    TrainRow::MlaGradQ(_) => 16,
                    TrainRow::MlaGradKv(_) => 3,
                    // The sums zeroed; per slice of the inner dimension, staged then added.
                    TrainRow::Matmul { .. } => 3,
                    // The tile staged, then written.
                    TrainRow::Transpose { .. } => 1,
                    _ => 0,
                };
                assert_eq!(kernel.ptx.matches("bar.sync").count(), barriers, "{name}: barriers");
                if let TrainRow::SiluMul
                | TrainRow::SiluMulGrad
                | TrainRow::CrossEntropy { .. }
                | TrainRow::BalanceRows { .. }
                | TrainRow::RouteGrad { .. }
                | TrainRow::MlaForward(_)
                | TrainRow::MlaGradQ(_)
                | TrainRow::MlaGradKv(_)
                | TrainRow::MoeHidden { .. }
                | TrainRow::MoeGradToken { .. } = op
                {
                    assert!(kernel.ptx.contains("ex2.approx.ftz.f32"), "{name}: exp");
                }
                if op == TrainRow::AdamW {
                    // The trainer's arithmetic: each product and sum rounded (no fused multiply-add),
                    // the correctly rounded square root and divisions.
                    assert!(!kernel.ptx.contains("fma.rn.f32"), "{name}: contracted");
                    assert!(kernel.ptx.contains("sqrt.rn.f32") && kernel.ptx.contains("div.rn.f32"), "{name}");
                }
                if let TrainRow::Matmul { .. } = op {
                    // The reference's rounding: each product rounded before it is added.
                    assert!(!kernel.ptx.contains("fma.rn.f32"), "{name}: contracted");
                }
            }
            RowOp::RmsNorm { keep, quantize, .. } => {
                // One barrier between consecutive phases: 1 + log2(threads) (+ 2 for quantization).
                let phases = 2 + k.threads.trailing_zeros() as usize + if quantize { 3 } else { 0 };
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), quantize, "{name}");
                assert!(kernel.ptx.contains("sqrt.rn.f32"), "{name}: sqrt");
                // Whole chunks of 4 columns: the row in and its outputs out 16 bytes at a time (a
                // row's bytes 4 a store), through 16-byte aligned shared memory.
                let vectors = k.d.is_multiple_of(4);
                for op in ["ld.global.v4.b32", "st.shared.v4.b32", "ld.shared.v4.b32", ".shared .align 16"] {
                    assert_eq!(kernel.ptx.contains(op), vectors, "{name}: {op}");
                }
                assert_eq!(kernel.ptx.contains("st.global.v4.b32"), vectors && keep, "{name}: y in 16 bytes a store");
            }
        }
        let Some(ptxas) = &ptxas else {
            eprintln!("{name}: PTX only (no ptxas: run scripts/bootstrap.sh)");
            continue;
        };
        let cubin = target::assemble(&kernel.ptx, name, &target::SM90A, ptxas).unwrap_or_else(|e| panic!("{e}"));
        let r = &cubin.kernels[0];
        eprintln!("{name}: {} registers, {} B static shared memory", r.registers, r.shared_memory_bytes);
        assert_eq!((r.spill_stores_bytes, r.spill_loads_bytes), (0, 0), "{name}: spills");
        assert_eq!(r.shared_memory_bytes as usize, k.shared_memory_bytes(), "{name}: shared memory");
    }
}

/// Fused kernels map onto row kernels only in the template's argument order; others are named.
#[test]
fn fused_kernels_map_onto_row_kernels_in_argument_order() {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let kernel = |results: &str, ret: &str| {
        format!(
            "module {{
  func.func private @k(%arg0: tensor<?x256xf32>, %arg1: tensor<256xbf16>) -> ({results}) attributes {{v3.kernel = \"k\"}} {{
    %0 = \"v3.rms_norm\"(%arg0, %arg1) {{eps = 1.0E-5 : f32}} : (tensor<?x256xf32>, tensor<256xbf16>) -> tensor<?x256xf32>
    %1:2 = \"v3.quantize_fp8\"(%0) {{group = 128 : i64}} : (tensor<?x256xf32>) -> (tensor<?x256xf8E4M3FN>, tensor<?x2xf32>)
    return {ret}
  }}
}}"
        )
    };
    let map = |text: String| {
        let module = v3c_compiler::mlir::parse_module(&context, &text, "k").unwrap();
        let f = module.body().first_operation().unwrap();
        assert!(f.attribute("v3.kernel").is_ok());
        sm90::lower::row_of_kernel(&f).map(|k| k.kernel.kernel_name())
    };
    let (y, q, s) = ("tensor<?x256xf32>", "tensor<?x256xf8E4M3FN>", "tensor<?x2xf32>");
    assert_eq!(
        map(kernel(&format!("{y}, {q}, {s}"), &format!("%0, %1#0, %1#1 : {y}, {q}, {s}"))).as_deref(),
        Ok("rows_rmsnorm_bf16_d256_t32_eps1em5_y_q")
    );
    assert_eq!(
        map(kernel(&format!("{q}, {s}"), &format!("%1#0, %1#1 : {q}, {s}"))).as_deref(),
        Ok("rows_rmsnorm_bf16_d256_t32_eps1em5_q")
    );
    let err = map(kernel(&format!("{q}, {s}, {y}"), &format!("%1#0, %1#1, %0 : {q}, {s}, {y}"))).unwrap_err();
    assert_eq!(err, "rms_norm results other than (y), (q, scale) or (y, q, scale)");
    let err = map(kernel(&format!("{s}, {q}"), &format!("%1#1, %1#0 : {s}, {q}"))).unwrap_err();
    assert_eq!(err, "rms_norm results other than (y), (q, scale) or (y, q, scale)");
}

/// The multi-launch lowerings (MLA's query up-projection; the dense SwiGLU MLP; the MoE gate/up and
/// down grouped GEMMs) executed on the CPU
/// — row steps through the row template's CPU lowering, GEMM steps by the reference's fp8 GEMM
/// over the weights concatenated as the step says, temporaries and the RoPE table as the steps bind
/// them — give what the CPU backend's fused kernels give on the same inputs: the steps' wiring is
/// the one the GPU runtime will follow.
#[test]
fn multi_launch_lowerings_compute_what_the_fused_kernels_do() {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    use melior::ir::{RegionLike, ValueLike};
    use v3c_compiler::conversion::sm90::lower::{self, Operand, StepKernel};
    use v3c_models::dtype::{f32_to_bf16, f32_to_f8e4m3};
    use v3c_runtime::host::{call_packed, RawBuffer};

    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    for (k, v) in [
        ("hidden_size", 256),
        ("intermediate_size", 384),
        ("moe_intermediate_size", 128),
        ("q_lora_rank", 256),
        ("num_attention_heads", 2),
    ] {
        j[k] = v.into();
    }
    let config =
        v3c_models::init::with_fp8(&v3c_models::config::ModelConfig::from_json_str(&j.to_string(), "t").unwrap());
    let context = v3c_compiler::mlir::new_context();
    let options = v3c_models::BuildOptions { precision: v3c_models::Precision::Fp8, ..Default::default() };
    let module = v3c_compiler::pipeline::Driver::quiet()
        .run_model(&context, &config, &[v3c_models::Entry::Prefill], &options, "fused")
        .unwrap();
    let mut state = 17u64;
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * scale
            })
            .collect()
    };
    let rows = 3;
    let mut checked = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        let name = f.attribute("sym_name").map(|a| a.to_string().trim_matches('"').to_string()).unwrap_or_default();
        let Ok(steps) = lower::steps_of_kernel(&f) else { continue };
        // Inputs by argument type: rows of activations, weights, scales, positions; a MoE kernel's
        // routing (offsets, the token of each sorted row, weights) from a synthetic dispatch.
        let block = f.region(0).unwrap().first_block().unwrap();
        let moe = name.starts_with("moe_");
        let (experts, per_token) = (config.n_routed_experts, config.num_experts_per_tok + config.n_shared_experts);
        let groups = experts + config.n_shared_experts;
        let mut sorted: Vec<(usize, usize)> = Vec::new(); // (group, token)
        for t in 0..rows {
            let mut chosen: Vec<usize> = (0..experts).map(|e| (e * 5 + t * 3) % experts).collect();
            chosen.dedup();
            chosen.truncate(config.num_experts_per_tok);
            sorted.extend(chosen.into_iter().map(|e| (e, t)));
            sorted.extend((0..config.n_shared_experts).map(|s| (experts + s, t)));
        }
        sorted.sort();
        let mut offsets = vec![0i32; groups + 1];
        for &(g, _) in &sorted {
            offsets[g + 1] += 1;
        }
        for g in 0..groups {
            offsets[g + 1] += offsets[g];
        }
        let perm: Vec<i32> = sorted.iter().map(|&(_, t)| t as i32).collect();
        let mut args: Vec<(Vec<u8>, Vec<usize>, String)> = Vec::new();
        for i in 0..block.argument_count() {
            let ty = v3c_compiler::verify::Shape::parse(&block.argument(i).unwrap().r#type().to_string()).unwrap();
            let shape: Vec<usize> = ty.dims.iter().map(|d| d.unwrap_or(rows)).collect();
            let n: usize = shape.iter().product();
            let bytes: Vec<u8> = match ty.element.as_str() {
                "i32" if moe && i == 2 => offsets.iter().flat_map(|v| v.to_le_bytes()).collect(),
                "i32" if moe && i == 3 => perm.iter().flat_map(|v| v.to_le_bytes()).collect(),
                "f32" if moe && i == 4 && name.starts_with("moe_down") => {
                    rnd(n, 1.0).iter().flat_map(|v| (v.abs() + 0.1).to_le_bytes()).collect()
                    // routing weights
                }
                "f32" if i > 0 && shape.len() == 2 && ty.dims[0].is_some() => {
                    rnd(n, 0.02).iter().flat_map(|v| (v.abs() + 1e-3).to_le_bytes()).collect()
                    // weight scales
                }
                "f32" if shape.len() == 2 && ty.dims[0].is_none() && ty.dims[1].is_some_and(|c| c < 64) => {
                    rnd(n, 0.1).iter().flat_map(|v| (v.abs() + 0.01).to_le_bytes()).collect()
                    // activation scales
                }
                "f32" => rnd(n, 4.0).iter().flat_map(|v| v.to_le_bytes()).collect(),
                "bf16" => rnd(n, 1.0).iter().flat_map(|v| f32_to_bf16(v + 1.0).to_le_bytes()).collect(),
                "f8E4M3FN" => rnd(n, 400.0).iter().map(|&v| f32_to_f8e4m3(v)).collect(),
                "i64" => (0..n as i64).flat_map(|p| (p * 5).to_le_bytes()).collect(),
                other => panic!("{name}: argument of {other}"),
            };
            args.push((bytes, shape, ty.element));
        }
        // The CPU backend's fused kernel.
        let cpu = v3c_compiler::conversion::v3_to_cpu::CpuKernel::compile(&context, &f).unwrap();
        let out_shapes = cpu.output_shapes(&args.iter().map(|a| a.1.clone()).collect::<Vec<_>>()).unwrap();
        let width = |e: &str| v3c_runtime::plan::element_bytes(e).unwrap() as usize;
        let mut fused_out: Vec<Vec<u8>> = out_shapes
            .iter()
            .zip(&cpu.signature.outputs)
            .map(|(s, o)| vec![0u8; s.iter().product::<usize>() * width(&o.element)])
            .collect();
        let raw = |b: &mut Vec<u8>, shape: &[usize], element: &str| RawBuffer {
            ptr: b.as_mut_ptr() as *mut (),
            shape: shape.to_vec(),
            element: element.to_string(),
        };
        let mut buffers: Vec<RawBuffer> = args.iter_mut().map(|(b, s, e)| raw(b, s, e)).collect();
        for (k, b) in fused_out.iter_mut().enumerate() {
            buffers.push(raw(b, &out_shapes[k], &cpu.signature.outputs[k].element));
        }
        // SAFETY: buffers sized by the kernel's own shape rules.
        unsafe { cpu.run_raw(&buffers) }.unwrap();

        // The steps.
        let mut temps: Vec<(Vec<u8>, Vec<usize>, String)> = steps
            .temps
            .iter()
            .map(|t| {
                let (r, c) = (t.rows(rows), t.cols(rows));
                (vec![0u8; r * c * width(&t.element)], vec![r, c], t.element.clone())
            })
            .collect();
        assert!(!moe || per_token == out_shapes.first().map_or(0, |s| if s.len() == 3 { s[1] } else { per_token }));
        let mut results: Vec<Vec<u8>> = fused_out.iter().map(|b| vec![0xAAu8; b.len()]).collect();
        // The RoPE table as the runtime prepares it.
        let table = steps.rope_table.as_ref().map(|t| {
            let spec = v3c_runtime::lowering::RopeTableSpec {
                dim: t.dim,
                inv_freq: t.inv_freq.clone(),
                attention_factor: t.attention_factor,
            };
            let v: Vec<u8> = v3c_runtime::prepare::rope_table(&spec, 64).iter().flat_map(|x| x.to_le_bytes()).collect();
            (v, t.dim)
        });
        for step in &steps.steps {
            // The step's operand buffers, in order.
            let mut bufs: Vec<RawBuffer> = Vec::new();
            for o in &step.operands {
                bufs.push(match *o {
                    Operand::Arg(i) => {
                        let (b, shape, e) = &mut args[i];
                        raw(b, shape, e)
                    }
                    Operand::Temp(i) => {
                        let (b, shape, e) = &mut temps[i];
                        raw(b, shape, e)
                    }
                    Operand::Result(i) => raw(&mut results[i], &out_shapes[i], &cpu.signature.outputs[i].element),
                    Operand::TempRows { .. } | Operand::TempRowsOf { .. } => {
                        panic!("inference lowerings view no temporaries' rows")
                    }
                    Operand::RopeTable => {
                        let (v, dim) = table.as_ref().unwrap();
                        RawBuffer { ptr: v.as_ptr() as *mut (), shape: vec![64, *dim], element: "f32".into() }
                    }
                });
            }
            match &step.kernel {
                StepKernel::Row(k) => {
                    let text = k.emit_cpu().unwrap();
                    let m = v3c_compiler::conversion::v3_to_cpu::lower_to_llvm(&context, &text, "step").unwrap();
                    let engine = melior::ExecutionEngine::new(&m, 2, &[], false, false);
                    // SAFETY: operands bound as the step says, sized as the fused kernel's.
                    unsafe { call_packed(&bufs, false, 0, 1, |a| engine.invoke_packed(&k.kernel_name(), a).unwrap()) };
                }
                // SAFETY: as above.
                StepKernel::MlaPrefill(a) => unsafe {
                    v3c_compiler::conversion::sm90::host::mla_prefill(a.heads, a.scale, &bufs).unwrap()
                },
                // SAFETY: as above.
                StepKernel::MlaDecode(a) => unsafe {
                    v3c_compiler::conversion::sm90::host::mla_decode(a.heads, a.scale, &bufs).unwrap()
                },
                StepKernel::Gemm(g) if g.grouped.is_some() => {
                    let gr = g.grouped.as_ref().unwrap();
                    let bytes = |b: &RawBuffer| -> Vec<u8> {
                        let n: usize = b.shape.iter().product::<usize>() * width(&b.element);
                        // SAFETY: the buffer holds its shape's elements.
                        unsafe { std::slice::from_raw_parts(b.ptr as *const u8, n).to_vec() }
                    };
                    let f32s = |b: &RawBuffer| -> Vec<f32> {
                        bytes(b).chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                    };
                    let i32s = |b: &RawBuffer| -> Vec<i32> {
                        bytes(b).chunks(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                    };
                    let (a, a_scale) = (bytes(&bufs[g.a]), f32s(&bufs[g.a_scale.unwrap()]));
                    let (offs, tokens) = (i32s(&bufs[gr.offsets]), i32s(&bufs[gr.perm]));
                    let row_scale = gr.row_scale.map(|i| f32s(&bufs[i]));
                    let kb = g.k.div_ceil(128);
                    let out = bufs.last().unwrap();
                    let mut result = f32s(out);
                    // B laid out per group as the runtime prepares it at load.
                    // Per weight: routed bits, scales, shared bits, scales (owned copies to borrow from).
                    type Parts = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>);
                    let parts: Vec<Parts> = gr
                        .weights
                        .iter()
                        .map(|w| {
                            let shared = |i: Option<usize>| i.map(|i| bytes(&bufs[i])).unwrap_or_default();
                            let shared_f = |i: Option<usize>| i.map(|i| f32s(&bufs[i])).unwrap_or_default();
                            (
                                bytes(&bufs[w.routed]),
                                f32s(&bufs[w.routed_scale.unwrap()]),
                                shared(w.shared),
                                shared_f(w.shared_scale),
                            )
                        })
                        .collect();
                    let weights: Vec<v3c_runtime::prepare::GroupedWeight> = parts
                        .iter()
                        .zip(&gr.weights)
                        .map(|((r, rs, s, ss), w)| v3c_runtime::prepare::GroupedWeight {
                            routed: v3c_runtime::prepare::Stacked::Whole(r),
                            routed_scale: rs,
                            shared: w.shared.map(|_| &s[..]),
                            shared_scale: w.shared_scale.map(|_| &ss[..]),
                            rows: w.rows,
                        })
                        .collect();
                    let spec = v3c_runtime::lowering::GroupedSpec {
                        grouping: String::new(),
                        groups: gr.groups,
                        routed: gr.routed,
                        offsets: gr.offsets,
                        perm: gr.perm,
                        row_scale: gr.row_scale,
                        scatter: gr.scatter,
                        weights: Vec::new(),
                    };
                    let (all_wq, all_ws) = v3c_runtime::prepare::grouped_b(&spec, g.k, 1, &weights).unwrap();
                    let per_group = g.n * g.k;
                    for grp in 0..gr.groups {
                        let wq = &all_wq[grp * per_group..(grp + 1) * per_group];
                        let ws = &all_ws[grp * g.n / 128 * kb..(grp + 1) * g.n / 128 * kb];
                        for p in offs[grp] as usize..offs[grp + 1] as usize {
                            let token = tokens[p] as usize;
                            let src = if gr.grouping == v3c_compiler::conversion::sm90::gemm::GemmGrouping::Gather {
                                token
                            } else {
                                p
                            };
                            let mut y = v3c_models::interp::kernels::matmul_fp8(
                                &a[src * g.k..(src + 1) * g.k],
                                &a_scale[src * kb..(src + 1) * kb],
                                wq,
                                ws,
                                1,
                                g.k,
                                g.n,
                                128,
                                128,
                                kb,
                            );
                            if let Some(w) = &row_scale {
                                y.iter_mut().for_each(|v| *v *= w[p]);
                            }
                            let dst = if gr.scatter { token } else { p };
                            for (c, v) in y.iter().enumerate() {
                                if gr.scatter {
                                    result[dst * g.n + c] += v;
                                } else {
                                    result[dst * g.n + c] = *v;
                                }
                            }
                        }
                    }
                    // SAFETY: the output operand holds its shape's f32.
                    unsafe { std::ptr::copy_nonoverlapping(result.as_ptr(), out.ptr as *mut f32, result.len()) };
                }
                StepKernel::Gemm(g) if g.input == v3c_compiler::conversion::sm90::gemm::GemmInput::Bf16 => {
                    // bf16 operands, f32 sums (+ the residual, which may be the output itself).
                    let bf16s = |b: &RawBuffer| -> Vec<f32> {
                        let n: usize = b.shape.iter().product();
                        // SAFETY: the buffer holds n bf16.
                        let bits = unsafe { std::slice::from_raw_parts(b.ptr as *const u16, n) };
                        bits.iter().map(|&v| v3c_models::dtype::bf16_to_f32(v)).collect()
                    };
                    let a = bf16s(&bufs[g.a]);
                    let w = bf16s(&bufs[g.weights[0].0]);
                    let mut y = v3c_models::interp::kernels::matmul_nt(&a, &w, rows, g.k, g.n);
                    // A second A (the activations' lo half): its product with the same weights.
                    if let Some(a2) = g.a2 {
                        let lo = v3c_models::interp::kernels::matmul_nt(&bf16s(&bufs[a2]), &w, rows, g.k, g.n);
                        y.iter_mut().zip(lo).for_each(|(v, l)| *v += l);
                    }
                    if let Some(r) = g.residual {
                        // SAFETY: the residual holds rows x n f32.
                        let res = unsafe { std::slice::from_raw_parts(bufs[r].ptr as *const f32, rows * g.n) };
                        y.iter_mut().zip(res).for_each(|(v, r)| *v += r);
                    }
                    let out = bufs.last().unwrap();
                    // SAFETY: the output operand holds rows x n f32.
                    unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), out.ptr as *mut f32, y.len()) };
                }
                StepKernel::Gemm(g) => {
                    let read = |b: &RawBuffer, n: usize| -> Vec<u8> {
                        // SAFETY: the buffer holds n bytes.
                        unsafe { std::slice::from_raw_parts(b.ptr as *const u8, n).to_vec() }
                    };
                    let f32s = |b: &RawBuffer| -> Vec<f32> {
                        let n: usize = b.shape.iter().product();
                        read(b, 4 * n).chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                    };
                    let a = read(&bufs[g.a], rows * g.k);
                    let a_scale = f32s(&bufs[g.a_scale.unwrap()]);
                    let (mut w, mut ws) = (Vec::new(), Vec::new());
                    for &(wi, si) in &g.weights {
                        let n: usize = bufs[wi].shape.iter().product();
                        w.extend(read(&bufs[wi], n));
                        ws.extend(f32s(&bufs[si.unwrap()]));
                    }
                    let y = v3c_models::interp::kernels::matmul_fp8(
                        &a,
                        &a_scale,
                        &w,
                        &ws,
                        rows,
                        g.k,
                        g.n,
                        128,
                        128,
                        g.k.div_ceil(128),
                    );
                    let out = bufs.last().unwrap();
                    // SAFETY: the output operand holds rows x n f32.
                    unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), out.ptr as *mut f32, y.len()) };
                }
            }
        }
        for (k, (got, want)) in results.iter().zip(&fused_out).enumerate() {
            match cpu.signature.outputs[k].element.as_str() {
                "f32" => {
                    let f = |b: &[u8]| {
                        b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>()
                    };
                    let (g, w) = (f(got), f(want));
                    let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                        // The split-bf16 GEMMs are f32's to ~2^-16; fp8 steps requantize (ties).
                        let tol = if name.starts_with("lm_head") || name.starts_with("linear") { 2e-5 } else { 2e-3 };
                        assert!((a - b).abs() <= tol * max, "{name}: result {k}[{i}] = {a}, fused kernel {b}");
                    }
                }
                "i32" => assert_eq!(got, want, "{name}: result {k} (indices) differs"),
                _ => {
                    let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
                    assert!(differ * 100 <= got.len(), "{name}: result {k}: {differ} of {} bytes differ", got.len());
                }
            }
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        vec![
            "linear_0",
            "lm_head_0",
            "mla_q_up_0",
            "moe_dispatch_0",
            "moe_down_0",
            "moe_gate_up_quantize_0",
            "swiglu_0"
        ]
    );
}

/// Decode attention on the tensor cores, its five launches on the host (rows through their CPU
/// lowering, the split-K kernel as its semantics say): the merged latent output equals float64
/// absorbed attention over each sequence's keys up to its position (the bf16 cache's values, the
/// absorbed queries rounded to bf16 as the kernel feeds them to the tensor cores) within 1e-3 (P's
/// rounding to bf16: 1.0e-4 to 4.8e-4 measured; 1.1e-3 to 9.3e-3 against float64 queries) — over a
/// pool of bf16 64-row pages read in place through a block table with holes (each sequence's
/// pages scattered over the pool, out of order, -1 past them; the pages no sequence holds large
/// values), the same bits as the identity layout: 3 and 16 heads (a sequence's rows fill part of
/// a 64-row block, the rest masked) over 1, 71 and 151 keys (partial pages, empty splits) and over
/// 5000, 64, 65 and 2501 keys (the most splits, full and one-row pages).
#[test]
fn tensor_core_decode_attention_steps_compute_absorbed_attention() {
    check_tensor_core_decode_steps(3, &[0, 70, 150], 5);
    check_tensor_core_decode_steps(16, &[0, 70, 150], 6);
    check_tensor_core_decode_steps(3, &[4999, 63, 64, 2500], 6);
    check_tensor_core_decode_steps(16, &[4999, 63, 64, 2500], 6);
}

fn check_tensor_core_decode_steps(heads: usize, positions: &[i64], seed: u64) {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    use melior::ir::RegionLike;
    use v3c_compiler::conversion::sm90::{host::HostRows, lower};
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16, f32_to_f8e4m3, f8e4m3_to_f32};
    use v3c_runtime::host::{HostBuffer, HostData};
    let mut j: serde_json::Value = serde_json::from_str(v3c_models::config::DEEPSEEK_V3_TINY_JSON).unwrap();
    let (nope, rope, v, kv) = (128usize, 64usize, 128usize, 128usize);
    for (k, val) in [
        ("hidden_size", 256),
        ("kv_lora_rank", kv),
        ("q_lora_rank", 128),
        ("qk_nope_head_dim", nope),
        ("qk_rope_head_dim", rope),
        ("v_head_dim", v),
        ("num_attention_heads", heads),
        ("num_key_value_heads", heads),
    ] {
        j[k] = val.into();
    }
    let config =
        v3c_models::init::with_fp8(&v3c_models::config::ModelConfig::from_json_str(&j.to_string(), "t").unwrap());
    let context = v3c_compiler::mlir::new_context();
    let options = v3c_models::BuildOptions { precision: v3c_models::Precision::Fp8, ..Default::default() };
    let module = v3c_compiler::pipeline::Driver::quiet()
        .run_model(&context, &config, &[v3c_models::Entry::Decode], &options, "fused")
        .unwrap();
    let mut op = module.body().first_operation();
    let mut kernel = None;
    while let Some(f) = op {
        op = f.next_in_block();
        if lower::mla_decode_steps(&f, false).is_ok() {
            kernel = Some(f);
            break;
        }
    }
    let f = kernel.expect("a decode attention kernel the tensor cores take");
    assert!(f.region(0).unwrap().first_block().unwrap().argument_count() == 6);
    let steps = lower::mla_decode_steps(&f, false).unwrap();
    let scale = match steps.steps[2].kernel {
        lower::StepKernel::MlaDecode(a) => a.scale,
        _ => panic!("the third launch is the attention"),
    };
    let b = positions.len();
    let (width, per) = (kv + rope, nope + v);
    // Table columns: the longest sequence's pages; each sequence holds its own, -1 past them.
    let held: Vec<usize> = positions.iter().map(|&p| (p as usize + 1).div_ceil(64)).collect();
    let cols = *held.iter().max().unwrap();
    let mut state = seed;
    let mut rnd = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * s
            })
            .collect()
    };
    let kv_b: Vec<u8> = rnd(heads * per * kv, 300.0).iter().map(|&x| f32_to_f8e4m3(x)).collect();
    let kv_scale: Vec<f32> = (0..heads * per / 128).map(|i| 0.01 + 0.002 * i as f32).collect();
    let w = |row: usize, col: usize| f8e4m3_to_f32(kv_b[row * kv + col]) as f64 * kv_scale[row / 128] as f64;
    let (q_nope, q_pe) = (rnd(b * heads * nope, 2.0), rnd(b * heads * rope, 2.0));
    // Each sequence's rows (`cols` pages), then laid into a pool of two more pages than they hold,
    // in a scrambled order, as the table says.
    let rows: Vec<u16> = rnd(b * cols * 64 * width, 2.0).iter().map(|&x| f32_to_bf16(x)).collect();
    let pool_pages = held.iter().sum::<usize>() + 2;
    let mut order: Vec<i32> = (0..pool_pages as i32).map(|p| (p * 7 + 3) % pool_pages as i32).collect();
    order.retain(|&p| p != 1); // one page no sequence holds (the other: the last of the order)
    let mut table = vec![-1i32; b * cols];
    let mut next = order.into_iter();
    for (seq, &n) in held.iter().enumerate() {
        for j in 0..n {
            table[seq * cols + j] = next.next().unwrap();
        }
    }
    let mut cache = vec![f32_to_bf16(1e4); pool_pages * 64 * width];
    for (i, &page) in table.iter().enumerate().filter(|(_, &p)| p >= 0) {
        let (seq, j) = (i / cols, i % cols);
        cache[page as usize * 64 * width..][..64 * width]
            .copy_from_slice(&rows[(seq * cols + j) * 64 * width..][..64 * width]);
    }
    let f32s = |shape: Vec<usize>, v: &[f32]| HostBuffer { shape, data: HostData::F32(v.to_vec()) };
    // The merged output over a pool laid out as `table` says.
    let merged = |pool: &[u16], pages: usize, table: &[i32]| -> Vec<f32> {
        let ins = [
            f32s(vec![b, heads, nope], &q_nope),
            f32s(vec![b, heads, rope], &q_pe),
            HostBuffer { shape: vec![pages, 64, width], data: HostData::Bf16(pool.to_vec()) },
            HostBuffer { shape: vec![b], data: HostData::I64(positions.to_vec()) },
            HostBuffer { shape: vec![heads * per, kv], data: HostData::F8(kv_b.clone()) },
            f32s(vec![heads * per / 128, 1], &kv_scale),
            HostBuffer { shape: vec![b, cols], data: HostData::I32(table.to_vec()) },
        ];
        let mut outs = [
            HostBuffer { shape: vec![b, heads * v], data: HostData::F8(vec![0; b * heads * v]) },
            f32s(vec![b, heads], &vec![0.0; b * heads]),
        ];
        let ins_ref: Vec<&HostBuffer> = ins.iter().collect();
        let temps = HostRows::new(&context).run_steps(&steps, b, &ins_ref, &mut outs).unwrap();
        let HostData::F32(o) = &temps[4].data else { panic!("the merged output is f32") };
        o.clone()
    };
    let o = merged(&cache, pool_pages, &table);
    // The same bits as each sequence's pages in order (the rows as they were, the identity table).
    let identity: Vec<i32> = (0..(b * cols) as i32).collect();
    assert!(merged(&rows, b * cols, &identity) == o, "the layout changes the result");
    let (mut err2, mut norm2) = (0f64, 0f64);
    for seq in 0..b {
        let keys = positions[seq] as usize + 1;
        for h in 0..heads {
            let row = seq * heads + h;
            // The absorbed query as the kernel feeds the tensor cores: from q_nope rounded to bf16
            // (`rows_mlaabsorbmma`), itself rounded to bf16.
            let q16 = |d: usize| bf16_to_f32(f32_to_bf16(q_nope[row * nope + d])) as f64;
            let q_abs: Vec<f64> = (0..kv)
                .map(|a| (0..nope).map(|d| q16(d) * w(h * per + d, a)).sum::<f64>())
                .map(|x| bf16_to_f32(f32_to_bf16(x as f32)) as f64)
                .collect();
            let q_pe16 = |r: usize| bf16_to_f32(f32_to_bf16(q_pe[row * rope + r])) as f64;
            let lat = |k: usize, c: usize| {
                let page = table[seq * cols + k / 64] as usize;
                bf16_to_f32(cache[(page * 64 + k % 64) * width + c]) as f64
            };
            let s: Vec<f64> = (0..keys)
                .map(|k| {
                    let nope_part: f64 = (0..kv).map(|a| q_abs[a] * lat(k, a)).sum();
                    let rope_part: f64 = (0..rope).map(|r| q_pe16(r) * lat(k, kv + r)).sum();
                    (nope_part + rope_part) * scale as f64
                })
                .collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
            let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for a in 0..kv {
                let want: f64 = (0..keys).map(|k| (s[k] - m).exp() * lat(k, a)).sum::<f64>() / l;
                let got = o[row * kv + a] as f64;
                err2 += (got - want).powi(2);
                norm2 += want.powi(2);
            }
        }
    }
    let rel = (err2 / norm2).sqrt();
    eprintln!("decode attention on the tensor cores (host), {heads} heads: relative error {rel:.2e} (Frobenius)");
    assert!(rel <= 1e-3, "{rel}");
}
