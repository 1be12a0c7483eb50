//! melior (MLIR) and inkwell (LLVM) link the same static LLVM and work in one process: an MLIR
//! module in the LLVM + NVVM dialects is parsed, verified, translated to LLVM IR by MLIR, compiled to
//! PTX for sm_90a by LLVM's NVPTX backend through inkwell, and (when ptxas is present) assembled.

use v3c_compiler::{mlir, target, toolchain};

const KERNEL: &str = r#"
module {
  llvm.func @scale(%x: !llvm.ptr<1>, %s: f32) attributes {nvvm.kernel} {
    %tid = nvvm.read.ptx.sreg.tid.x : i32
    %p = llvm.getelementptr %x[%tid] : (!llvm.ptr<1>, i32) -> !llvm.ptr<1>, f32
    %v = llvm.load %p : !llvm.ptr<1> -> f32
    %r = llvm.fmul %v, %s : f32
    llvm.store %r, %p : f32, !llvm.ptr<1>
    llvm.return
  }
}
"#;

#[test]
fn melior_and_inkwell_coexist_mlir_to_ptx_for_sm90a() {
    let context = mlir::new_context();
    let module = mlir::parse_module(&context, KERNEL, "scale.mlir").expect("parse");
    mlir::verify(&context, &module, "scale.mlir").expect("verify");

    let llvm_ir = mlir::translate_to_llvm_ir(&context, &module, "scale.mlir").expect("translate");
    assert!(llvm_ir.contains("define ptx_kernel void @scale"), "{llvm_ir}");

    let ptx = target::emit_ptx(&llvm_ir, "scale.ll", &target::SM90A).expect("ptx");
    assert!(ptx.contains(".target sm_90a"), "{ptx}");
    assert!(ptx.contains(".entry scale("), "{ptx}");
    assert!(ptx.contains("mul.rn.f32") || ptx.contains("mul.f32"), "{ptx}");

    match toolchain::find(toolchain::Tool::Ptxas) {
        Ok(ptxas) => {
            let cubin = target::assemble(&ptx, "scale.ptx", &target::SM90A, &ptxas).expect("ptxas");
            assert!(cubin.cubin.starts_with(b"\x7fELF"), "a cubin is an ELF file");
            assert_eq!(cubin.kernels.len(), 1);
            assert_eq!(cubin.kernels[0].name, "scale");
            assert!(cubin.kernels[0].registers > 0);
            assert_eq!(cubin.kernels[0].spill_stores_bytes, 0);
        }
        Err(missing) => eprintln!("skipped cubin assembly: {missing}"),
    }
}

#[test]
fn ptxas_failure_names_the_module_in_one_line() {
    let Ok(ptxas) = toolchain::find(toolchain::Tool::Ptxas) else {
        eprintln!("skipped: no ptxas (run scripts/bootstrap.sh)");
        return;
    };
    let ptx = target::emit_ptx(target::SMOKE_KERNEL_LL, "vadd.ll", &target::SM90A).unwrap();
    // Broken PTX: the error names the module and carries ptxas's message on one line.
    let broken = ptx.replace(".entry vadd", ".entry vadd garbage");
    let err = target::assemble(&broken, "vadd.ptx", &target::SM90A, &ptxas).unwrap_err().to_string();
    assert!(err.starts_with("vadd.ptx: ptxas ("), "{err}");
    assert!(!err.contains('\n'), "{err}");
}
