//! Artifacts: the directory `v3c compile --out` writes and the runtime reads.
//!
//! ```text
//! ARTIFACT/
//!   manifest.json   format version, compiler version + git hash, target, model config (+ its hash),
//!                   entry points, every file with its SHA-256, tuning provenance
//!   plan.json       launches, buffers, arena layout, weight bindings (crate::plan::Plan)
//!   lowering.json   GPU targets: each fused kernel as template kernel launches (crate::lowering)
//!   kernels/        machine code: <kernel>.so (cpu; with its signature, crate::signature),
//!                   <kernel>.ptx (+ .cubin) (GPU targets)
//! ```
//!
//! [`Artifact::open`] validates everything before anything runs: the format version, every file's
//! presence and hash (a flipped byte is reported by file name), the plan against the manifest (entry
//! points, kernels), the model config against its hash. [`Artifact::runs_here`] then says whether
//! this machine can run the target. Every failure is one line naming the file (and the key). Loading a
//! cpu artifact's kernels ([`crate::cpu::CpuArtifact::load`]) then checks the plan against what each
//! kernel's code says it takes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lowering::{Lowering, LOWERING_FORMAT_VERSION};
use crate::plan::{Plan, PLAN_FORMAT_VERSION};

/// The artifact format this runtime reads and the compiler writes.
pub const ARTIFACT_FORMAT_VERSION: u32 = 1;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub compiler: CompilerInfo,
    pub target: TargetInfo,
    pub model: ModelInfo,
    /// Entry points, in the plan's order (`prefill`, `decode`).
    pub entries: Vec<String>,
    pub plan: FileEntry,
    /// GPU targets: how each fused kernel runs as template kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowering: Option<FileEntry>,
    pub kernels: Vec<KernelEntry>,
    pub tuning: TuningInfo,
    /// An artifact of a training step (entry `train_step`): the settings its graph was built with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingInfo>,
}

/// The loss weights and precision a compiled training step implements (what `v3r train` trains
/// with; see `v3c_models::train::TrainConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    pub mtp_weight: f32,
    pub balance_alpha: f32,
    /// DeepSeek-V3's FP8 recipe (e4m3 GEMMs on f32 masters).
    pub fp8: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompilerInfo {
    pub version: String,
    /// `git describe`-style commit of the compiler's source, or `unknown`.
    pub git_hash: String,
}

/// What the kernels were generated for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// `cpu` or a GPU target (`sm_90a`).
    pub name: String,
    /// cpu: the machine architecture (`x86_64`) and the CPU features the machine code may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
    /// GPU: the compute capability the code runs on (exactly, for arch-specific targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<(i32, i32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// `f32` or `fp8` (the graph the kernels implement).
    pub precision: String,
    /// The model's config in the Hugging Face layout, and the SHA-256 of its compact JSON text.
    pub config: serde_json::Value,
    pub config_sha256: String,
}

/// A file of the artifact and the SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub name: String,
    pub file: String,
    pub sha256: String,
    /// cpu: the entry symbol in the shared object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// cpu (required there): the kernel takes `(part, parts)` after its buffers (one share of its
    /// output columns). Calling a kernel without knowing this would misread its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitioned: Option<bool>,
    /// cpu: the kernel's rows are independent (which arguments' dim 0 are rows, and from how many
    /// rows per thread a launch is split over two threads). Absent: never split by rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_split: Option<crate::host::RowSplit>,
    /// GPU targets: the cubin ptxas assembled (the driver JIT-compiles the PTX when it is absent or
    /// the device differs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cubin: Option<FileEntry>,
    /// GPU targets: threads per block and the dynamic shared memory a launch requests (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_shared_memory: Option<usize>,
    /// GPU targets: how the kernel takes its arguments (what the runtime launches it with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abi: Option<crate::abi::KernelAbi>,
}

/// Where the kernels' configurations came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningInfo {
    /// `none` (fixed templates), `cost-model` or `database`.
    pub source: String,
    #[serde(default)]
    pub detail: String,
    /// Per tunable kernel and regime, the configuration compiled and where it came from (the
    /// database's entry, or the cost model and why no entry applied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<TuningChoice>,
}

/// One tunable kernel's configuration in one regime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningChoice {
    /// The GEMM (`mla_q_up_0.gemm`) or the fused kernel whose attention launch it is.
    pub kernel: String,
    /// What the database keys it by (`gemm fp8->f32 n24576 k1536`, `mla_decode kv512 r64 h128`).
    pub signature: String,
    /// `decode` or `prefill`.
    pub regime: String,
    /// Prefill's kernel for runs of at most this many rows (a GEMM's smaller prefill runs,
    /// [`crate::lowering::KernelChoice::PerRegime`]'s `prefill_under`); absent: the regime's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to_rows: Option<usize>,
    /// The kernel compiled (`gemm_fp8_f32_64x128x128_s4`, `mla_decode_kv512_r64_p64_s2`).
    pub config: String,
    pub source: String,
}

/// Why an artifact cannot be used: one line naming the file (and the key).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArtifactError {
    #[error("{0}: no such artifact directory")]
    NoDirectory(PathBuf),
    #[error("{0}: missing ({1})")]
    Missing(PathBuf, String),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
    #[error("{0}: content hash mismatch (expected sha256 {1}, found {2}): the file is corrupt or was modified")]
    HashMismatch(PathBuf, String, String),
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The hash a manifest records for a model config: SHA-256 of its compact JSON (keys sorted).
pub fn config_sha256(config: &serde_json::Value) -> String {
    sha256_hex(serde_json::to_string(&sorted(config)).unwrap_or_default().as_bytes())
}

/// `v` with every object's keys in sorted order (objects keep the order they are written in).
fn sorted(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            serde_json::Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&o[k]))).collect())
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sorted).collect()),
        x => x.clone(),
    }
}

/// A validated artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub plan: Plan,
    /// GPU targets: the fused kernels' launches.
    pub lowering: Option<Lowering>,
}

impl Artifact {
    /// Reads and validates the artifact in `dir` (see the module doc); touches no device.
    pub fn open(dir: &Path) -> Result<Artifact, ArtifactError> {
        if !dir.is_dir() {
            return Err(ArtifactError::NoDirectory(dir.to_path_buf()));
        }
        let manifest_path = dir.join("manifest.json");
        let text = read(&manifest_path, "not a v3c artifact")?;
        // The version first, so that a future format is named as such rather than as corrupt.
        let raw: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| ArtifactError::Invalid(manifest_path.clone(), format!("invalid JSON: {e}")))?;
        match raw.get("format_version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(ARTIFACT_FORMAT_VERSION) => {}
            Some(v) => {
                return Err(ArtifactError::Invalid(
                    manifest_path,
                    format!(
                        "format_version {v}, this v3r reads {ARTIFACT_FORMAT_VERSION} (compile the model again with a \
                         matching v3c)"
                    ),
                ))
            }
            None => return Err(ArtifactError::Invalid(manifest_path, "no format_version".into())),
        }
        let manifest: Manifest = serde_json::from_value(raw)
            .map_err(|e| ArtifactError::Invalid(manifest_path.clone(), format!("unexpected layout: {e}")))?;
        let config_hash = config_sha256(&manifest.model.config);
        if config_hash != manifest.model.config_sha256 {
            return Err(ArtifactError::Invalid(
                manifest_path,
                format!(
                    "model.config does not match model.config_sha256 (expected {}, found {config_hash})",
                    manifest.model.config_sha256
                ),
            ));
        }
        let plan_bytes = verified(dir, &manifest.plan.file, &manifest.plan.sha256)?;
        let plan_path = dir.join(&manifest.plan.file);
        let plan: Plan = serde_json::from_slice(&plan_bytes)
            .map_err(|e| ArtifactError::Invalid(plan_path.clone(), format!("invalid plan: {e}")))?;
        if plan.format_version != PLAN_FORMAT_VERSION {
            return Err(ArtifactError::Invalid(
                plan_path,
                format!("plan format_version {}, this v3r reads {PLAN_FORMAT_VERSION}", plan.format_version),
            ));
        }
        plan.check().map_err(|why| ArtifactError::Invalid(plan_path.clone(), why))?;
        let plan_entries: Vec<&str> = plan.entries.iter().map(|e| e.name.as_str()).collect();
        if plan_entries != manifest.entries.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(ArtifactError::Invalid(
                plan_path,
                format!("entry points {plan_entries:?} differ from the manifest's {:?}", manifest.entries),
            ));
        }
        for k in &manifest.kernels {
            if manifest.target.name == "cpu" && (k.symbol.is_none() || k.partitioned.is_none()) {
                return Err(ArtifactError::Invalid(
                    manifest_path,
                    format!("kernel {}: a cpu kernel needs its symbol and partitioned flag", k.name),
                ));
            }
            if let Some(why) = k.abi.as_ref().and_then(|a| a.check().err()) {
                return Err(ArtifactError::Invalid(manifest_path, format!("kernel {}: {why}", k.name)));
            }
            verified(dir, &k.file, &k.sha256)?;
            if let Some(c) = &k.cubin {
                verified(dir, &c.file, &c.sha256)?;
            }
        }
        let known = |name: &str| manifest.kernels.iter().any(|k| k.name == name);
        let lowering = match &manifest.lowering {
            None if manifest.target.name != "cpu" => {
                return Err(ArtifactError::Invalid(manifest_path, "a GPU artifact without its lowering file".into()))
            }
            None => None,
            Some(f) => {
                let path = dir.join(&f.file);
                let bytes = verified(dir, &f.file, &f.sha256)?;
                let lowering: Lowering = serde_json::from_slice(&bytes)
                    .map_err(|e| ArtifactError::Invalid(path.clone(), format!("invalid lowering: {e}")))?;
                if lowering.format_version != LOWERING_FORMAT_VERSION {
                    return Err(ArtifactError::Invalid(
                        path,
                        format!(
                            "lowering format_version {}, this v3r reads {LOWERING_FORMAT_VERSION}",
                            lowering.format_version
                        ),
                    ));
                }
                lowering.check(&known).map_err(|why| ArtifactError::Invalid(path.clone(), why))?;
                Some(lowering)
            }
        };
        // The plan launches fused kernels: machine code itself (cpu) or lowered (GPU targets).
        let runs = |fused: &str| match &lowering {
            Some(l) => l.kernels.iter().any(|k| k.fused == fused),
            None => known(fused),
        };
        for e in &plan.entries {
            if let Some(l) = e.launches.iter().find(|l| !runs(&l.kernel)) {
                return Err(ArtifactError::Invalid(
                    plan_path,
                    format!("entry {} launches kernel {} that the manifest does not list", e.name, l.kernel),
                ));
            }
        }
        Ok(Artifact { dir: dir.to_path_buf(), manifest, plan, lowering })
    }

    /// Whether this machine can run the artifact's code: `Err` says why not, naming both sides.
    /// GPU targets are checked against the device of `ordinal` (through the CUDA driver).
    pub fn runs_here(&self, ordinal: usize) -> Result<String, String> {
        let t = &self.manifest.target;
        if t.name == "cpu" {
            let arch = t.arch.as_deref().unwrap_or("?");
            if arch != std::env::consts::ARCH {
                return Err(format!("compiled for a {arch} CPU, this machine is {}", std::env::consts::ARCH));
            }
            let missing: Vec<&str> =
                t.cpu_features.iter().map(String::as_str).filter(|f| !host_has_cpu_feature(f)).collect();
            if !missing.is_empty() {
                return Err(format!("the kernels use CPU features this machine lacks: {}", missing.join(", ")));
            }
            return Ok(format!("this {arch} CPU has every feature the kernels use"));
        }
        let Some(cc) = t.compute_capability else {
            return Err(format!("target {} names no compute capability", t.name));
        };
        let device = crate::device::probe_device(ordinal).map_err(|e| e.to_string())?;
        if device.compute_capability != cc {
            return Err(format!(
                "a {} artifact needs compute capability {}.{}; device {} is {} (compute capability {}.{})",
                t.name,
                cc.0,
                cc.1,
                device.ordinal,
                device.name,
                device.compute_capability.0,
                device.compute_capability.1
            ));
        }
        Ok(format!("device {}: {}", device.ordinal, device.name))
    }

    /// Checks the checkpoint in `weights` against every weight the plan binds: present (under its
    /// name or the fallback the loader uses), same shape, a dtype the runtime loads into the plan's
    /// (f32 from F32, BF16 or block-scaled F8_E4M3; bf16 from BF16; e4m3 from F8_E4M3).
    pub fn check_weights(&self, weights: &Path) -> Result<usize, String> {
        let ckpt = v3c_models::checkpoint::Checkpoint::open(weights).map_err(|e| e.to_string())?;
        let mut checked = std::collections::BTreeSet::new();
        for e in &self.plan.entries {
            for b in &e.buffers {
                let crate::plan::BufferKind::Weight { name } = &b.kind else { continue };
                if !checked.insert(name.clone()) {
                    continue;
                }
                // Expert-stacked weights (`experts.*.`) are one tensor per expert in the checkpoint.
                let parts: Vec<(String, &[usize])> = match name.contains(".*.") {
                    true if !b.shape.is_empty() => {
                        (0..b.shape[0]).map(|i| (name.replace(".*.", &format!(".{i}.")), &b.shape[1..])).collect()
                    }
                    _ => vec![(name.clone(), &b.shape[..])],
                };
                for (part, want_shape) in parts {
                    let want = format!("{want_shape:?} {}", b.dtype);
                    let Some((stored, file, shape, dtype)) = ckpt.describe(&part) else {
                        return Err(format!(
                            "{}: no tensor {part} (the artifact's plan binds it as {want})",
                            weights.display()
                        ));
                    };
                    let loadable = match b.dtype.as_str() {
                        "f32" => {
                            matches!(dtype.as_str(), "F32" | "BF16")
                                || (dtype == "F8_E4M3" && ckpt.describe(&format!("{stored}_scale_inv")).is_some())
                        }
                        "bf16" => dtype == "BF16",
                        "f8E4M3FN" => dtype == "F8_E4M3",
                        _ => false,
                    };
                    if shape != want_shape || !loadable {
                        return Err(format!(
                            "{file}: {stored} is {shape:?} {dtype}; the artifact's plan expects {want} (weights of \
                             another model or precision?)"
                        ));
                    }
                }
            }
        }
        Ok(checked.len())
    }

    /// The path of a file of the artifact.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// CPU features the CPU kernels of an artifact compiled on this machine may use (recorded in the
/// manifest; checked by [`Artifact::runs_here`]).
pub fn host_cpu_features() -> Vec<String> {
    CPU_FEATURES.iter().filter(|f| host_has_cpu_feature(f)).map(|f| f.to_string()).collect()
}

/// The features LLVM's host code generation may pick up that decide whether machine code runs.
#[cfg(target_arch = "x86_64")]
const CPU_FEATURES: &[&str] = &["sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"];
#[cfg(not(target_arch = "x86_64"))]
const CPU_FEATURES: &[&str] = &[];

fn host_has_cpu_feature(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
            "avx" => std::arch::is_x86_feature_detected!("avx"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

fn read(path: &Path, missing: &str) -> Result<Vec<u8>, ArtifactError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ArtifactError::Missing(path.to_path_buf(), missing.to_string()),
        _ => ArtifactError::Invalid(path.to_path_buf(), e.to_string()),
    })
}

/// The bytes of `file` (relative to `dir`, inside it) after checking them against `sha256`.
fn verified(dir: &Path, file: &str, sha256: &str) -> Result<Vec<u8>, ArtifactError> {
    let path = dir.join(file);
    let relative = Path::new(file);
    if relative.is_absolute() || relative.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(ArtifactError::Invalid(
            dir.join("manifest.json"),
            format!("file {file:?} lies outside the artifact"),
        ));
    }
    let bytes = read(&path, "listed in manifest.json")?;
    let found = sha256_hex(&bytes);
    if found != sha256 {
        return Err(ArtifactError::HashMismatch(path, sha256.to_string(), found));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_text() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn config_hash_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": [1, 2]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a": [1, 2], "b": 1}"#).unwrap();
        assert_eq!(config_sha256(&a), config_sha256(&b));
    }

    #[test]
    fn this_machine_has_the_features_it_reports() {
        for f in host_cpu_features() {
            assert!(host_has_cpu_feature(&f), "{f}");
        }
        assert!(!host_has_cpu_feature("no-such-feature"));
    }
}
