//! Conversions from the `v3` dialect to code: `v3_to_cpu` (linalg -> LLVM -> JIT on this CPU) and
//! `sm90` (gpu/nvgpu/nvvm kernel templates -> PTX -> cubin for Hopper; templates so far, not yet
//! mapped onto the fused kernels).

pub mod sm90;
pub mod v3_to_cpu;
