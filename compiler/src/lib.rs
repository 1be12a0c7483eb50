//! `v3c-compiler`: lowers DeepSeek-V3 graphs (from `v3c-models`) through MLIR into PTX kernels for
//! NVIDIA Hopper (sm_90a) and a launch plan the runtime executes.
//!
//! Stages (see `shared/design/ARCHITECTURE.md`): import (graph -> `v3` dialect), transforms (fusion),
//! conversions (kernels -> CPU linalg / GPU nvgpu), target (LLVM IR -> PTX -> cubin), plan, artifact.
//! Today the crate holds the foundations every stage uses:
//! - [`mlir`]: MLIR context creation (all upstream dialects + LLVM translations), parsing with the
//!   diagnostics MLIR produced, verification;
//! - [`target`]: the only place that knows sm_90a facts, and PTX emission through LLVM's NVPTX backend;
//! - [`toolchain`]: finding ptxas / cuobjdump / nvdisasm and reporting what is lost without them;
//! - [`doctor`]: the `v3c doctor` report.

// Internal items' docs link to the private helpers they use (read them with
// `cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

pub mod conversion;
pub mod cpu_backend;
pub mod doctor;
pub mod emulate;
pub mod import;
pub mod kernel_cache;
pub mod mlir;
pub mod pipeline;
pub mod plan;
pub mod shapes;
pub mod target;
pub mod toolchain;
pub mod transforms;
pub mod tune;
pub mod verify;
