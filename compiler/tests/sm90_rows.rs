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
