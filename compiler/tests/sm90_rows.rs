//! The row kernels' sm_90a lowering: PTX for every kind, assembled by ptxas (when present) without
//! spills or local memory. Their numerics are checked through the CPU lowering of the same
//! template (unit tests of `conversion::sm90::rows`) and on the device by benches/device/rows_check.py.

use v3c_compiler::conversion::sm90::{self, rows::RowKernel, rows::RowOp};
use v3c_compiler::{target, toolchain};

fn kernels() -> Vec<RowKernel> {
    let norm = |keep, quantize, d, w| RowKernel::new(RowOp::RmsNorm { eps: 1e-6, keep, quantize }, d, w);
    vec![
        RowKernel::new(RowOp::Embed, 7168, "bf16"),
        norm(false, true, 7168, "bf16"),
        norm(true, true, 7168, "bf16"),
        norm(true, false, 7168, "bf16"),
        norm(true, false, 1536, "f32"),
        norm(false, true, 1000, "bf16"),
        RowKernel::new(RowOp::Latent { eps: 1e-6, rope: 64, interleave: true, append: false }, 512, "bf16"),
        RowKernel::new(RowOp::Latent { eps: 1e-6, rope: 64, interleave: false, append: true }, 512, "f32"),
        RowKernel::new(RowOp::SplitRope { heads: 128, nope: 128, rope: 64, interleave: true }, 128 * 192, "f32"),
        RowKernel::new(RowOp::SiluMul { quantize: true }, 18432, "f32"),
        RowKernel::new(RowOp::SiluMul { quantize: false }, 2048, "f32"),
    ]
}

#[test]
fn row_kernels_compile_to_sm90a_without_spills() {
    let context = v3c_compiler::mlir::new_context();
    let ptxas = toolchain::find(toolchain::Tool::Ptxas).ok();
    for k in kernels() {
        let kernel = sm90::compile_rows(&context, &k, &target::SM90A).unwrap_or_else(|e| panic!("{e}"));
        let name = &kernel.name;
        assert!(kernel.ptx.contains(&format!(".entry {name}(")), "{name}");
        // No libdevice is linked: a `__nv_*` call would not assemble.
        assert!(!kernel.ptx.contains("__nv_"), "{name}: libdevice call");
        assert!(kernel.ptx.contains(&format!(".maxntid {}, 1, 1", k.threads)), "{name}: block size");
        match k.op {
            RowOp::Embed => assert!(!kernel.ptx.contains("bar.sync"), "{name}: one phase, no barrier"),
            RowOp::SplitRope { .. } => assert!(!kernel.ptx.contains("bar.sync"), "{name}: one phase"),
            RowOp::SiluMul { quantize } => {
                assert_eq!(kernel.ptx.matches("bar.sync").count(), if quantize { 2 } else { 0 }, "{name}: barriers");
                assert!(kernel.ptx.contains("ex2.approx.ftz.f32"), "{name}: exp");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), quantize, "{name}");
            }
            RowOp::Latent { .. } => {
                let phases = 2 + k.threads.trailing_zeros() as usize;
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                assert!(kernel.ptx.contains("sqrt.rn.f32"), "{name}: sqrt");
            }
            RowOp::RmsNorm { quantize, .. } => {
                // One barrier between consecutive phases: 1 + log2(threads) (+ 2 for quantization).
                let phases = 2 + k.threads.trailing_zeros() as usize + if quantize { 3 } else { 0 };
                assert_eq!(kernel.ptx.matches("bar.sync").count(), phases - 1, "{name}: barriers");
                assert_eq!(kernel.ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), quantize, "{name}");
                assert!(kernel.ptx.contains("sqrt.rn.f32"), "{name}: sqrt");
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
