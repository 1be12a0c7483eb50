//! PTX -> cubin with ptxas, and ptxas's resource report (registers, spills, shared memory).
//!
//! ptxas is optional: without it the artifact carries PTX only and the driver JIT-compiles it at
//! load. Callers find it with [`crate::toolchain::find`] and decide what to do when it is missing.
//! Its cubins and reports are kept in the program's kernel cache ([`crate::kernel_cache`]), keyed by
//! the PTX, the target and the ptxas binary, so a model compiled again skips the kernels it
//! assembled before.

use std::process::Command;

use super::GpuTarget;
use crate::kernel_cache::KernelCache;
use crate::toolchain::FoundTool;

/// ptxas's verdict on one kernel (`ptxas -v` prints one such block per entry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub spill_stores_bytes: u32,
    pub spill_loads_bytes: u32,
    pub shared_memory_bytes: u32,
    /// ptxas serialized the kernel's wgmma (a performance notice, C7514/C7520: accumulators
    /// touched while in flight, or a warpgroup arrive it had to insert): each chain then waits
    /// for the one before, and the kernel runs far below what its configuration is for.
    pub wgmma_serialized: bool,
}

impl KernelResources {
    /// Why a tuned configuration should not be used although it assembled: ptxas spilled its
    /// registers or serialized its wgmma; None when neither.
    pub fn unfit(&self) -> Option<String> {
        if self.spill_stores_bytes + self.spill_loads_bytes > 0 {
            Some(format!(
                "ptxas reports spills ({} B stored, {} B loaded)",
                self.spill_stores_bytes, self.spill_loads_bytes
            ))
        } else if self.wgmma_serialized {
            Some("ptxas serialized its wgmma".into())
        } else {
            None
        }
    }
}

/// A cubin and what ptxas said about it.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub cubin: Vec<u8>,
    pub kernels: Vec<KernelResources>,
    /// ptxas's full `-v` output, for dumps.
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("{module}: cannot prepare ptxas input: {source}")]
    Io { module: String, source: std::io::Error },
    #[error("{module}: ptxas ({ptxas}) failed for {target}: {log}")]
    Failed { module: String, ptxas: String, target: String, log: String },
}

/// Assembles `ptx` (named `module` in errors) for `target` with `ptxas -v`; what ptxas made of
/// the same PTX before is taken from the program's cubin cache instead, when it chose one
/// ([`crate::kernel_cache::keep_gpu_kernels_in`]).
pub fn assemble(ptx: &str, module: &str, target: &GpuTarget, ptxas: &FoundTool) -> Result<Assembled, AssembleError> {
    assemble_with(ptx, module, target, ptxas, crate::kernel_cache::gpu_cache())
}

/// [`assemble`] with the cache given: ptxas runs only for PTX the cache has no cubin of (by this
/// ptxas, for this target), and what it assembles is kept there. Failures are not kept.
pub fn assemble_with(
    ptx: &str,
    module: &str,
    target: &GpuTarget,
    ptxas: &FoundTool,
    cache: Option<&KernelCache>,
) -> Result<Assembled, AssembleError> {
    let key = cache.and_then(|_| KernelCache::cubin_key(ptx, target.name, &PTXAS_ARGS, &ptxas.path));
    let kept = cache.zip(key.as_deref());
    if let Some((cubin, log)) = kept.and_then(|(cache, key)| cache.load_cubin(key)) {
        crate::kernel_cache::count(true, true);
        return Ok(Assembled { cubin, kernels: parse_resource_report(&log), log });
    }
    let assembled = run_ptxas(ptx, module, target, ptxas)?;
    if let Some((cache, key)) = kept {
        crate::kernel_cache::count(true, false);
        if let Err(e) = cache.store_cubin(key, &assembled.cubin, &assembled.log) {
            tracing::warn!("{module}: the cubin is not kept: {e}");
        }
    }
    Ok(assembled)
}

/// The arguments ptxas gets besides the target and the files.
const PTXAS_ARGS: [&str; 1] = ["-v"];

fn run_ptxas(ptx: &str, module: &str, target: &GpuTarget, ptxas: &FoundTool) -> Result<Assembled, AssembleError> {
    let io = |source| AssembleError::Io { module: module.into(), source };
    let dir = tempfile::tempdir().map_err(io)?;
    let input = dir.path().join("kernel.ptx");
    let output = dir.path().join("kernel.cubin");
    std::fs::write(&input, ptx).map_err(io)?;
    let out = Command::new(&ptxas.path)
        .arg(format!("-arch={}", target.name))
        .args(PTXAS_ARGS)
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .map_err(io)?;
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let log = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" | ");
        return Err(AssembleError::Failed {
            module: module.into(),
            ptxas: ptxas.path.display().to_string(),
            target: target.name.into(),
            log,
        });
    }
    let cubin = std::fs::read(&output).map_err(io)?;
    Ok(Assembled { cubin, kernels: parse_resource_report(&log), log })
}

/// Reads `ptxas -v` output:
/// ```text
/// ptxas info    : Compiling entry function 'vadd' for 'sm_90a'
/// ptxas info    : Function properties for vadd
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 8 registers, used 0 barriers, 1024 bytes smem, 384 bytes cmem[0]
/// ```
pub fn parse_resource_report(log: &str) -> Vec<KernelResources> {
    fn number_before(text: &str, unit: &str) -> Option<u32> {
        let at = text.find(unit)?;
        text[..at].split_whitespace().last()?.parse().ok()
    }
    let mut kernels: Vec<KernelResources> = Vec::new();
    // ptxas names a function whose wgmma it serialized before it reports the function.
    let mut serialized = Vec::new();
    for line in log.lines() {
        if line.contains("wgmma.mma_async instructions are serialized") {
            if let Some(rest) = line.split("in the function '").nth(1) {
                serialized.push(rest.split('\'').next().unwrap_or_default().to_string());
            }
            continue;
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            kernels.push(KernelResources { name, ..Default::default() });
            continue;
        }
        let Some(k) = kernels.last_mut() else {
            continue;
        };
        if line.contains("spill stores") {
            k.spill_stores_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.shared_memory_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    for k in &mut kernels {
        k.wgmma_serialized = serialized.contains(&k.name);
    }
    kernels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_registers_spills_and_smem() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'gemm' for 'sm_90a'\n\
                   ptxas info    : Function properties for gemm\n    \
                   0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers, 197632 bytes smem, 400 bytes cmem[0]\n";
        let k = parse_resource_report(log);
        assert_eq!(
            k,
            vec![KernelResources {
                name: "gemm".into(),
                registers: 168,
                spill_stores_bytes: 8,
                spill_loads_bytes: 12,
                shared_memory_bytes: 197632,
                wgmma_serialized: false,
            }]
        );
        assert_eq!(k[0].unfit().unwrap(), "ptxas reports spills (8 B stored, 12 B loaded)");
    }

    /// ptxas 13.0's notice (on a bf16 K-pipelined GEMM with two row tiles a consumer, before its
    /// first chain started from zero), which names the function before its report.
    #[test]
    fn reads_a_serialization_notice() {
        let log = "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized \
                   due to program dependence on compiler-inserted WG.AR in divergent path in the function 'g2'\n\
                   ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'g1' for 'sm_90a'\n\
                   ptxas info    : Used 90 registers, used 1 barriers, 1024 bytes smem\n\
                   ptxas info    : Compiling entry function 'g2' for 'sm_90a'\n\
                   ptxas info    : Function properties for g2\n    \
                   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 230 registers, used 1 barriers, 1024 bytes smem\n";
        let k = parse_resource_report(log);
        assert_eq!((k[0].wgmma_serialized, k[1].wgmma_serialized), (false, true));
        assert_eq!(k[0].unfit(), None);
        assert_eq!(k[1].unfit().unwrap(), "ptxas serialized its wgmma");
        assert_eq!(k[1].registers, 230);
    }
}
