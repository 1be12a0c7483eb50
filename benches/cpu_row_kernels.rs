//! The CPU backend's row templates at DeepSeek-V3's widths, one kernel each, 256 tokens: RMSNorm
//! over 7168 (bf16 weight), RoPE over q_pe (128 heads x 64, interleaved), SwiGLU's silu_mul over
//! 2048, and the residual add over 7168. Throughput in bytes read + written per run.

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

criterion_group!(benches, rows);
criterion_main!(benches);
