//! LLVM IR -> PTX through LLVM's NVPTX backend, linked statically through inkwell.
//!
//! Why inkwell rather than MLIR's `gpu-module-to-binary`: the same static LLVM is already linked for
//! melior, the target machine's options (CPU, PTX ISA feature, optimization level) are set in one
//! place from [`GpuTarget`], and the PTX comes back as a string without temporary files.

use std::sync::Once;

use inkwell::context::Context;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;

use super::GpuTarget;

/// Why PTX could not be produced; every variant names the module or target involved.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PtxError {
    #[error("{module}: invalid LLVM IR: {reason}")]
    InvalidIr { module: String, reason: String },
    #[error("LLVM has no NVPTX backend for {triple}: {reason}")]
    NoBackend { triple: String, reason: String },
    #[error("LLVM cannot create a target machine for {target}")]
    TargetMachine { target: String },
    #[error("{module}: PTX emission for {target} failed: {reason}")]
    Emit { module: String, target: String, reason: String },
}

fn init_nvptx() {
    static INIT: Once = Once::new();
    INIT.call_once(|| Target::initialize_nvptx(&InitializationConfig::default()));
}

/// Compiles LLVM IR text (`module_name` names it in errors) to PTX for `target`.
pub fn emit_ptx(llvm_ir: &str, module_name: &str, target: &GpuTarget) -> Result<String, PtxError> {
    init_nvptx();
    let context = Context::create();
    let buffer = MemoryBuffer::create_from_memory_range_copy(llvm_ir.as_bytes(), module_name);
    let module = context
        .create_module_from_ir(buffer)
        .map_err(|e| PtxError::InvalidIr { module: module_name.into(), reason: e.to_string().trim().to_string() })?;
    let triple = TargetTriple::create(target.llvm_triple());
    module.set_triple(&triple);
    let llvm_target = Target::from_triple(&triple)
        .map_err(|e| PtxError::NoBackend { triple: target.llvm_triple().into(), reason: e.to_string() })?;
    let machine: TargetMachine = llvm_target
        .create_target_machine(
            &triple,
            target.name,
            &target.llvm_features(),
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| PtxError::TargetMachine { target: target.name.into() })?;
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let ptx = machine.write_to_memory_buffer(&module, FileType::Assembly).map_err(|e| PtxError::Emit {
        module: module_name.into(),
        target: target.name.into(),
        reason: e.to_string(),
    })?;
    String::from_utf8(ptx.as_slice().to_vec()).map_err(|_| PtxError::Emit {
        module: module_name.into(),
        target: target.name.into(),
        reason: "LLVM produced PTX that is not UTF-8".into(),
    })
}

/// `out[i] = a[i] + b[i]` for `i = threadIdx.x`: the smallest real kernel, used by `v3c doctor`
/// and the toolchain tests to prove LLVM IR -> PTX -> cubin works end to end.
pub const SMOKE_KERNEL_LL: &str = r#"
declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
define ptx_kernel void @vadd(ptr addrspace(1) %a, ptr addrspace(1) %b, ptr addrspace(1) %out) {
  %i = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %pa = getelementptr float, ptr addrspace(1) %a, i32 %i
  %pb = getelementptr float, ptr addrspace(1) %b, i32 %i
  %po = getelementptr float, ptr addrspace(1) %out, i32 %i
  %x = load float, ptr addrspace(1) %pa
  %y = load float, ptr addrspace(1) %pb
  %s = fadd float %x, %y
  store float %s, ptr addrspace(1) %po
  ret void
}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::SM90A;

    #[test]
    fn emits_a_kernel_for_sm90a() {
        let ptx = emit_ptx(SMOKE_KERNEL_LL, "vadd.ll", &SM90A).unwrap();
        assert!(ptx.contains(".target sm_90a"), "{ptx}");
        assert!(ptx.contains(".version 8.0"), "{ptx}");
        assert!(ptx.contains(".entry vadd"), "{ptx}");
        assert!(ptx.contains("add.f32") || ptx.contains("add.rn.f32"), "{ptx}");
    }

    #[test]
    fn bad_ir_names_the_module() {
        let err = emit_ptx("define void @f( {", "broken.ll", &SM90A).unwrap_err();
        assert!(err.to_string().starts_with("broken.ll: invalid LLVM IR:"), "{err}");
    }
}
