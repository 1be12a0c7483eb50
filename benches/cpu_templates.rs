//! CPU backend templates at DeepSeek-V3's widths, one kernel each. `cpu_row_kernels_256_tokens`:
//! RMSNorm over 7168 (bf16 weight), RoPE over q_pe (128 heads x 64, interleaved), SwiGLU's
//! silu_mul over 2048, the residual add over 7168 and the 1x128 fp8 quantization of 7168-wide
//! rows, throughput in bytes read + written.
//! `cpu_fp8_gemm`: the block-scaled e4m3 GEMM of q_a_proj + kv_a_proj (7168 -> 2112) for one
//! decode token and for 64 prefill tokens, throughput in multiply-adds; `cpu_fp8_weight_gemm`:
//! the same weights with f32 activations (f32 precision of an fp8 checkpoint).
//! `cpu_mla_attention`: MLA at DeepSeek-V3's head widths (nope 128, rope 64, v 128, latent 512,
//! bf16 kv_b), absorbed decode of one sequence with all 128 heads over 1024 cached rows (W_UV's
//! per-launch transpose included; again with an e4m3 kv_b, dequantized per launch), and naive
//! causal prefill of 256 tokens with 16 heads (the latent's expansion included), throughput in
//! queries.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use v3c_compiler::conversion::v3_to_cpu::{CpuKernel, HostBuffer, HostData};

const TOKENS: usize = 256;

/// (name, kernel function text in the v3 dialect, input buffers, output buffers).
fn cases() -> Vec<(&'static str, String, Vec<HostBuffer>, Vec<HostBuffer>)> {
    let f32s = |shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        HostBuffer { shape, data: HostData::F32((0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()) }
    };
    let inv: Vec<String> = (0..32).map(|i| format!("{:.9e}", 1.0f32 / 10000f32.powf(i as f32 / 32.0))).collect();
    vec![
        (
            "rms_norm_7168",
            "func.func private @norm(%x: tensor<?x7168xf32>, %w: tensor<7168xbf16>) -> tensor<?x7168xf32> attributes {v3.kernel = \"rms_norm\"} {
  %y = \"v3.rms_norm\"(%x, %w) {eps = 9.99999997E-7 : f32} : (tensor<?x7168xf32>, tensor<7168xbf16>) -> tensor<?x7168xf32>
  return %y : tensor<?x7168xf32>
}"
            .to_string(),
            vec![f32s(vec![TOKENS, 7168]), HostBuffer { shape: vec![7168], data: HostData::Bf16(vec![0x3f80; 7168]) }],
            vec![f32s(vec![TOKENS, 7168])],
        ),
        (
            "rope_128x64",
            format!(
                "func.func private @rope(%x: tensor<?x128x64xf32>, %p: tensor<?xi64>) -> tensor<?x128x64xf32> attributes {{v3.kernel = \"rope\"}} {{
  %y = \"v3.rope\"(%x, %p) {{attention_factor = 1.000000e+00 : f32, dim = 64 : i64, interleave = true, inv_freq = array<f32: {}>, theta = 1.000000e+04 : f64}} : (tensor<?x128x64xf32>, tensor<?xi64>) -> tensor<?x128x64xf32>
  return %y : tensor<?x128x64xf32>
}}",
                inv.join(", ")
            ),
            vec![
                f32s(vec![TOKENS, 128, 64]),
                HostBuffer { shape: vec![TOKENS], data: HostData::I64((0..TOKENS as i64).collect()) },
            ],
            vec![f32s(vec![TOKENS, 128, 64])],
        ),
        (
            "silu_mul_2048",
            "func.func private @swiglu(%g: tensor<?x2048xf32>, %u: tensor<?x2048xf32>) -> tensor<?x2048xf32> attributes {v3.kernel = \"silu_mul\"} {
  %y = \"v3.silu_mul\"(%g, %u) : (tensor<?x2048xf32>, tensor<?x2048xf32>) -> tensor<?x2048xf32>
  return %y : tensor<?x2048xf32>
}"
            .to_string(),
            vec![f32s(vec![TOKENS, 2048]), f32s(vec![TOKENS, 2048])],
            vec![f32s(vec![TOKENS, 2048])],
        ),
        (
            "quantize_fp8_7168",
            "func.func private @quantize(%x: tensor<?x7168xf32>) -> (tensor<?x7168xf8E4M3FN>, tensor<?x56xf32>) attributes {v3.kernel = \"quantize_fp8\"} {
  %q:2 = \"v3.quantize_fp8\"(%x) {group = 128 : i64} : (tensor<?x7168xf32>) -> (tensor<?x7168xf8E4M3FN>, tensor<?x56xf32>)
  return %q#0, %q#1 : tensor<?x7168xf8E4M3FN>, tensor<?x56xf32>
}"
            .to_string(),
            vec![f32s(vec![TOKENS, 7168])],
            vec![
                HostBuffer { shape: vec![TOKENS, 7168], data: HostData::F8(vec![0; TOKENS * 7168]) },
                f32s(vec![TOKENS, 56]),
            ],
        ),
        (
            "add_7168",
            "func.func private @residual(%a: tensor<?x7168xf32>, %b: tensor<?x7168xf32>) -> tensor<?x7168xf32> attributes {v3.kernel = \"add\"} {
  %y = \"v3.add\"(%a, %b) : (tensor<?x7168xf32>, tensor<?x7168xf32>) -> tensor<?x7168xf32>
  return %y : tensor<?x7168xf32>
}"
            .to_string(),
            vec![f32s(vec![TOKENS, 7168]), f32s(vec![TOKENS, 7168])],
            vec![f32s(vec![TOKENS, 7168])],
        ),
    ]
}

fn bytes(buffers: &[HostBuffer]) -> u64 {
    let size = |b: &HostBuffer| match b.element() {
        "f32" | "i32" => 4,
        "bf16" => 2,
        "i64" => 8,
        _ => 1,
    };
    buffers.iter().map(|b| b.shape.iter().product::<usize>() as u64 * size(b)).sum()
}

fn rows(c: &mut Criterion) {
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let mut group = c.benchmark_group("cpu_row_kernels_256_tokens");
    for (name, text, mut inputs, mut outputs) in cases() {
        let module = v3c_compiler::mlir::parse_module(&context, &text, name).unwrap();
        let f = module.body().first_operation().unwrap();
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        let _ = f.name();
        group.throughput(Throughput::Bytes(bytes(&inputs) + bytes(&outputs)));
        // SAFETY: the outputs have the shapes the kernels compute from the inputs.
        group.bench_function(name, |b| b.iter(|| unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap()));
    }
    group.finish();
}

/// e4m3 bits of a pseudo-random pattern (no NaN codes).
fn fp8(shape: Vec<usize>) -> HostBuffer {
    let n = shape.iter().product::<usize>();
    HostBuffer { shape, data: HostData::F8((0..n).map(|i| ((i * 7919 + 11) % 251) as u8 & 0xfe).collect()) }
}

fn fp8_gemm(c: &mut Criterion) {
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let (k, n) = (7168usize, 2112usize);
    let (kb, nb) = (k / 128, n.div_ceil(128));
    let text = format!(
        "func.func private @fp8_gemm(%x: tensor<?x{k}xf8E4M3FN>, %xs: tensor<?x{kb}xf32>, %w: tensor<{n}x{k}xf8E4M3FN>, %ws: tensor<{nb}x{kb}xf32>) -> tensor<?x{n}xf32> attributes {{v3.kernel = \"linear\"}} {{
  %y = \"v3.linear\"(%x, %xs, %w, %ws) {{operandSegmentSizes = array<i32: 1, 1, 1, 1>}} : (tensor<?x{k}xf8E4M3FN>, tensor<?x{kb}xf32>, tensor<{n}x{k}xf8E4M3FN>, tensor<{nb}x{kb}xf32>) -> tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}"
    );
    let module = v3c_compiler::mlir::parse_module(&context, &text, "fp8_gemm").unwrap();
    let f = module.body().first_operation().unwrap();
    let kernel = CpuKernel::compile(&context, &f).unwrap();
    let dequant_text = format!(
        "func.func private @dequant_gemm(%x: tensor<?x{k}xf32>, %w: tensor<{n}x{k}xf8E4M3FN>, %ws: tensor<{nb}x{kb}xf32>) -> tensor<?x{n}xf32> attributes {{v3.kernel = \"linear\"}} {{
  %y = \"v3.linear\"(%x, %w, %ws) {{operandSegmentSizes = array<i32: 1, 0, 1, 1>}} : (tensor<?x{k}xf32>, tensor<{n}x{k}xf8E4M3FN>, tensor<{nb}x{kb}xf32>) -> tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}"
    );
    let dequant_module = v3c_compiler::mlir::parse_module(&context, &dequant_text, "dequant_gemm").unwrap();
    let dequant = CpuKernel::compile(&context, &dequant_module.body().first_operation().unwrap()).unwrap();
    let mut group = c.benchmark_group("cpu_fp8_weight_gemm_7168x2112");
    group.sample_size(10);
    for m in [1usize, 64] {
        let mut inputs = vec![
            HostBuffer { shape: vec![m, k], data: HostData::F32(vec![0.5; m * k]) },
            fp8(vec![n, k]),
            HostBuffer { shape: vec![nb, kb], data: HostData::F32(vec![0.01; nb * kb]) },
        ];
        let mut outputs = vec![HostBuffer { shape: vec![m, n], data: HostData::F32(vec![0.0; m * n]) }];
        group.throughput(Throughput::Elements((m * n * k) as u64));
        // SAFETY: the output has the shape the kernel computes.
        group.bench_function(format!("tokens_{m}"), |b| {
            b.iter(|| unsafe { dequant.run(&mut inputs, &mut outputs) }.unwrap())
        });
    }
    group.finish();
    let mut group = c.benchmark_group("cpu_fp8_gemm_7168x2112");
    group.sample_size(10);
    for m in [1usize, 64] {
        let scales = |shape: Vec<usize>| {
            let count = shape.iter().product::<usize>();
            HostBuffer { shape, data: HostData::F32(vec![0.01; count]) }
        };
        let mut inputs = vec![fp8(vec![m, k]), scales(vec![m, kb]), fp8(vec![n, k]), scales(vec![nb, kb])];
        let mut outputs = vec![HostBuffer { shape: vec![m, n], data: HostData::F32(vec![0.0; m * n]) }];
        group.throughput(Throughput::Elements((m * n * k) as u64));
        // SAFETY: the output has the shape the kernel computes.
        group.bench_function(format!("tokens_{m}"), |b| {
            b.iter(|| unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap())
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let f32s = |shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        HostBuffer { shape, data: HostData::F32((0..n).map(|i| ((i * 7919) % 1000) as f32 / 2000.0 - 0.25).collect()) }
    };
    let bf16s = |shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        let v = (0..n).map(|i| v3c_models::dtype::f32_to_bf16(((i * 104729) % 1000) as f32 / 20000.0 - 0.025));
        HostBuffer { shape, data: HostData::Bf16(v.collect()) }
    };
    let mut group = c.benchmark_group("cpu_mla_attention");
    group.sample_size(10);
    // Absorbed decode: 128 heads, one sequence at position 1023.
    let (h, s) = (128usize, 1024usize);
    let text = format!(
        "func.func private @decode(%qn: tensor<?x{h}x128xf32>, %qp: tensor<?x{h}x64xf32>, %lat: tensor<?x?x576xf32>, %pos: tensor<?xi64>, %kvb: tensor<{hp}x512xbf16>) -> tensor<?x{h}x128xf32> attributes {{v3.kernel = \"attention_decode\"}} {{
  %o = \"v3.attention_decode\"(%qn, %qp, %lat, %pos, %kvb) {{form = \"absorbed\", kv_lora_rank = 512 : i64, scale = 0.135233775 : f32}} : (tensor<?x{h}x128xf32>, tensor<?x{h}x64xf32>, tensor<?x?x576xf32>, tensor<?xi64>, tensor<{hp}x512xbf16>) -> tensor<?x{h}x128xf32>
  return %o : tensor<?x{h}x128xf32>
}}",
        hp = h * 256
    );
    let module = v3c_compiler::mlir::parse_module(&context, &text, "decode").unwrap();
    let kernel = CpuKernel::compile(&context, &module.body().first_operation().unwrap()).unwrap();
    let mut inputs = vec![
        f32s(vec![1, h, 128]),
        f32s(vec![1, h, 64]),
        f32s(vec![1, s, 576]),
        HostBuffer { shape: vec![1], data: HostData::I64(vec![s as i64 - 1]) },
        bf16s(vec![h * 256, 512]),
    ];
    let mut outputs = vec![f32s(vec![1, h, 128])];
    group.throughput(Throughput::Elements(1));
    // SAFETY: the output has the shape the kernel computes.
    group.bench_function("decode_absorbed_h128_ctx1024", |b| {
        b.iter(|| unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap())
    });
    // The same with an e4m3 kv_b and its 128x128 scales (fp8 precision): dequantized per launch.
    let text = format!(
        "func.func private @decode8(%qn: tensor<?x{h}x128xf32>, %qp: tensor<?x{h}x64xf32>, %lat: tensor<?x?x576xf32>, %pos: tensor<?xi64>, %kvb: tensor<{hp}x512xf8E4M3FN>, %kvs: tensor<{nb}x4xf32>) -> tensor<?x{h}x128xf32> attributes {{v3.kernel = \"attention_decode\"}} {{
  %o = \"v3.attention_decode\"(%qn, %qp, %lat, %pos, %kvb, %kvs) {{form = \"absorbed\", kv_lora_rank = 512 : i64, scale = 0.135233775 : f32}} : (tensor<?x{h}x128xf32>, tensor<?x{h}x64xf32>, tensor<?x?x576xf32>, tensor<?xi64>, tensor<{hp}x512xf8E4M3FN>, tensor<{nb}x4xf32>) -> tensor<?x{h}x128xf32>
  return %o : tensor<?x{h}x128xf32>
}}",
        hp = h * 256,
        nb = h * 256 / 128
    );
    let module = v3c_compiler::mlir::parse_module(&context, &text, "decode8").unwrap();
    let kernel = CpuKernel::compile(&context, &module.body().first_operation().unwrap()).unwrap();
    inputs[4] = fp8(vec![h * 256, 512]);
    inputs.push(HostBuffer { shape: vec![h * 2, 4], data: HostData::F32(vec![0.01; h * 8]) });
    // SAFETY: the output has the shape the kernel computes.
    group.bench_function("decode_absorbed_fp8_kv_b_h128_ctx1024", |b| {
        b.iter(|| unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap())
    });
    // Naive causal prefill: 16 heads, 256 tokens.
    let (h, t) = (16usize, 256usize);
    let text = format!(
        "func.func private @prefill(%qn: tensor<?x{h}x128xf32>, %qp: tensor<?x{h}x64xf32>, %lat: tensor<?x576xf32>, %kvb: tensor<{hp}x512xbf16>) -> tensor<?x{h}x128xf32> attributes {{v3.kernel = \"attention\"}} {{
  %o = \"v3.attention\"(%qn, %qp, %lat, %kvb) {{form = \"naive\", kv_lora_rank = 512 : i64, scale = 0.135233775 : f32}} : (tensor<?x{h}x128xf32>, tensor<?x{h}x64xf32>, tensor<?x576xf32>, tensor<{hp}x512xbf16>) -> tensor<?x{h}x128xf32>
  return %o : tensor<?x{h}x128xf32>
}}",
        hp = h * 256
    );
    let module = v3c_compiler::mlir::parse_module(&context, &text, "prefill").unwrap();
    let kernel = CpuKernel::compile(&context, &module.body().first_operation().unwrap()).unwrap();
    let mut inputs = vec![f32s(vec![t, h, 128]), f32s(vec![t, h, 64]), f32s(vec![t, 576]), bf16s(vec![h * 256, 512])];
    let mut outputs = vec![f32s(vec![t, h, 128])];
    group.throughput(Throughput::Elements(t as u64));
    // SAFETY: the output has the shape the kernel computes.
    group.bench_function("prefill_naive_h16_256", |b| {
        b.iter(|| unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap())
    });
    group.finish();
}

criterion_group!(benches, rows, fp8_gemm, attention);
criterion_main!(benches);
