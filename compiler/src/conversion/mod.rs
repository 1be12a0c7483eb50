//! Conversions from the `v3` dialect to code: `v3_to_cpu` (linalg -> LLVM -> JIT on this CPU); the
//! sm90 lowering (nvgpu/nvvm -> PTX) arrives with the Hopper codegen work.

pub mod sm90;
pub mod v3_to_cpu;
