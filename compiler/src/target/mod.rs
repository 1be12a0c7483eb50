//! GPU targets: the ONLY place in the project that knows architecture facts (SM names, PTX ISA
//! versions, shared-memory and register limits), and the LLVM IR -> PTX step.
//!
//! Level in: LLVM IR text (from MLIR's NVVM -> LLVM translation, later stages). Level out: PTX text
//! for one target, then cubin through ptxas when it is present ([`crate::toolchain`] finds it).
//!
//! Not handled here: choosing tile configurations (the templates do, checking against these limits).

mod cubin;
mod ptx;

pub use cubin::{assemble, assemble_with, parse_resource_report, AssembleError, Assembled, KernelResources};
pub use ptx::{emit_ptx, PtxError, SMOKE_KERNEL_LL};

/// Everything the compiler needs to know about one GPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuTarget {
    /// The name users type (`--target sm_90a`) and LLVM's CPU name.
    pub name: &'static str,
    /// Compute capability of the devices that run this target's code (major, minor).
    pub compute_capability: (i32, i32),
    /// PTX ISA version emitted (major, minor).
    pub ptx_isa: (u32, u32),
    /// True for arch-specific targets (`a` suffix): the PTX runs only on exactly this compute
    /// capability (wgmma, setmaxnreg are sm_90a-only).
    pub arch_specific: bool,
    /// Shared memory per thread block with the opt-in attribute, in bytes.
    pub max_shared_memory_per_block: u32,
    /// Shared memory per SM, in bytes.
    pub shared_memory_per_sm: u32,
    /// 32-bit registers per SM, and the most one thread may use.
    pub registers_per_sm: u32,
    pub max_registers_per_thread: u32,
    pub max_threads_per_block: u32,
    pub warp_size: u32,
    /// Largest thread-block cluster without the non-portable opt-in.
    pub max_portable_cluster_size: u32,
}

/// NVIDIA Hopper (H100, H200, H800, H20) with the architecture-specific features v3c relies on:
/// wgmma, TMA (`cp.async.bulk.tensor`), mbarrier transactions, clusters, `setmaxnreg`.
pub const SM90A: GpuTarget = GpuTarget {
    name: "sm_90a",
    compute_capability: (9, 0),
    // PTX 8.0 is the first ISA with sm_90a, wgmma and cp.async.bulk.tensor; every CUDA >= 12.0
    // driver and ptxas accepts it.
    ptx_isa: (8, 0),
    arch_specific: true,
    max_shared_memory_per_block: 227 * 1024,
    shared_memory_per_sm: 228 * 1024,
    registers_per_sm: 64 * 1024,
    max_registers_per_thread: 255,
    max_threads_per_block: 1024,
    warp_size: 32,
    max_portable_cluster_size: 8,
};

/// Published figures of one GPU model (dense tensor-core peaks, memory): what the tuning cost model
/// ranks configurations with. Specification sheet numbers, not measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceModel {
    /// As `v3r doctor` / the CUDA driver names it, without the vendor prefix (`H200`).
    pub name: &'static str,
    pub target: GpuTarget,
    pub sm_count: u32,
    /// Dense tensor-core peaks, TFLOP/s.
    pub bf16_tflops: f64,
    pub fp8_tflops: f64,
    /// DRAM bandwidth, TB/s, and L2 capacity, bytes.
    pub dram_tbps: f64,
    pub l2_bytes: u64,
}

const H100: DeviceModel = DeviceModel {
    name: "H100",
    target: SM90A,
    sm_count: 132,
    bf16_tflops: 989.0,
    fp8_tflops: 1979.0,
    dram_tbps: 3.35,
    l2_bytes: 50 << 20,
};

/// The Hopper devices the cost model knows (SXM forms; H20 is the export part).
pub const DEVICES: &[DeviceModel] = &[
    DeviceModel {
        name: "H200",
        target: SM90A,
        sm_count: 132,
        bf16_tflops: 989.0,
        fp8_tflops: 1979.0,
        dram_tbps: 4.8,
        l2_bytes: 50 << 20,
    },
    H100,
    DeviceModel { name: "H800", ..H100 },
    DeviceModel {
        name: "H20",
        target: SM90A,
        sm_count: 78,
        bf16_tflops: 148.0,
        fp8_tflops: 296.0,
        dram_tbps: 4.0,
        l2_bytes: 60 << 20,
    },
];

impl DeviceModel {
    /// Looks a device up by name (case-insensitive; `NVIDIA H200` works too); the error lists them.
    pub fn by_name(name: &str) -> Result<DeviceModel, String> {
        let wanted = name.trim().trim_start_matches("NVIDIA ").to_ascii_uppercase();
        DEVICES.iter().copied().find(|d| wanted.starts_with(d.name)).ok_or_else(|| {
            let known: Vec<_> = DEVICES.iter().map(|d| d.name).collect();
            format!("unknown GPU '{name}' (the cost model knows: {})", known.join(", "))
        })
    }
}

/// Every target the compiler can generate code for.
pub const TARGETS: &[GpuTarget] = &[SM90A];

impl GpuTarget {
    /// Looks a target up by the name users type; the error lists what exists.
    pub fn by_name(name: &str) -> Result<GpuTarget, String> {
        TARGETS.iter().copied().find(|t| t.name == name).ok_or_else(|| {
            let known: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
            format!("unknown target '{name}' (known: {})", known.join(", "))
        })
    }

    /// The LLVM target triple for NVIDIA GPUs with 64-bit addressing.
    pub fn llvm_triple(&self) -> &'static str {
        "nvptx64-nvidia-cuda"
    }

    /// LLVM NVPTX subtarget features, e.g. `+ptx80`.
    pub fn llvm_features(&self) -> String {
        format!("+ptx{}{}", self.ptx_isa.0, self.ptx_isa.1)
    }

    /// Can code for this target run on a device of compute capability `cc`?
    pub fn runs_on(&self, cc: (i32, i32)) -> bool {
        if self.arch_specific {
            cc == self.compute_capability
        } else {
            cc >= self.compute_capability
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm90a_is_hopper_only() {
        assert!(SM90A.runs_on((9, 0)));
        assert!(!SM90A.runs_on((10, 0)));
        assert!(!SM90A.runs_on((8, 9)));
        assert_eq!(SM90A.llvm_features(), "+ptx80");
    }

    #[test]
    fn unknown_target_lists_known_ones() {
        assert_eq!(GpuTarget::by_name("sm_90a").unwrap(), SM90A);
        assert_eq!(GpuTarget::by_name("sm_80").unwrap_err(), "unknown target 'sm_80' (known: sm_90a)");
    }
}
