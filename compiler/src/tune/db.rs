//! The tuning database: a versioned JSON file of measured timings users ship with a model.
//!
//! An entry is keyed by the compiler version, the GPU (name and compute capability), the kernel
//! signature ([`super::GemmShape::signature`]) and the M bucket, and carries the checksum of the
//! candidate set it measured ([`super::candidates_sha256`]), every candidate's median time, the
//! default configuration it was compared with, and when and where it was measured. The choice is
//! deterministic: the fastest median, ties broken by kernel name. [`TuningDb::lookup`] says why an
//! entry does not apply (another GPU, another compiler, a changed search space, missing).

use crate::conversion::sm90::gemm::GemmConfig;
use crate::target::{DeviceModel, GpuTarget};
pub use v3c_runtime::tuning::{DbEntry, TuningDb, DB_FORMAT_VERSION};

/// A configuration a database entry can name: its kernel name parses back to it, and it says
/// whether it fits a target (GEMMs, and the attention kernels: [`super::attention::AttentionConfig`]).
pub trait Tunable: Sized {
    fn from_name(name: &str) -> Option<Self>;
    fn validate(&self, target: &GpuTarget) -> Result<(), String>;
}

impl Tunable for GemmConfig {
    fn from_name(name: &str) -> Option<GemmConfig> {
        GemmConfig::from_name(name)
    }
    fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        GemmConfig::validate(self, target)
    }
}

/// What the database holds for one kernel and bucket.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup<'a, C = GemmConfig> {
    Tuned {
        config: C,
        entry: &'a DbEntry,
    },
    /// An entry exists but may not be used: why.
    Ignored(String),
    Missing,
}

/// Whether a database entry applies to a kernel being compiled.
pub trait DbLookup {
    /// The entry for `kernel` at `m_bucket` on `device` for this compiler and candidate set.
    fn lookup<C: Tunable>(
        &self,
        kernel: &str,
        m_bucket: usize,
        device: &DeviceModel,
        compiler_version: &str,
        candidates_sha256: &str,
    ) -> Lookup<'_, C>;
}

impl DbLookup for TuningDb {
    /// The entry for `kernel` at `m_bucket` on `device` for this compiler and candidate set.
    fn lookup<C: Tunable>(
        &self,
        kernel: &str,
        m_bucket: usize,
        device: &DeviceModel,
        compiler_version: &str,
        candidates_sha256: &str,
    ) -> Lookup<'_, C> {
        let same_kernel: Vec<&DbEntry> =
            self.entries.iter().filter(|e| e.kernel == kernel && e.m_bucket == m_bucket).collect();
        if same_kernel.is_empty() {
            return Lookup::Missing;
        }
        let cc = device.target.compute_capability;
        let mut why = String::new();
        for e in &same_kernel {
            why = if e.gpu != device.name || e.compute_capability != cc {
                format!(
                    "measured on {} (compute capability {}.{}), compiling for {} ({}.{})",
                    e.gpu, e.compute_capability.0, e.compute_capability.1, device.name, cc.0, cc.1
                )
            } else if e.compiler_version != compiler_version {
                format!("measured with v3c {}, this is v3c {compiler_version}", e.compiler_version)
            } else if e.candidates_sha256 != candidates_sha256 {
                "stale: the candidate set changed since it was measured".to_string()
            } else {
                match e.winner().and_then(|(name, _)| C::from_name(name).map(|c| (name, c))) {
                    Some((_, config)) if config.validate(&device.target).is_ok() => {
                        return Lookup::Tuned { config, entry: e }
                    }
                    Some((name, _)) => format!("its winner {name} does not fit {}", device.target.name),
                    None => "no usable timing".to_string(),
                }
            };
        }
        Lookup::Ignored(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(gpu: &str, version: &str, sha: &str) -> DbEntry {
        DbEntry {
            compiler_version: version.into(),
            gpu: gpu.into(),
            compute_capability: (9, 0),
            kernel: "gemm fp8->f32 n2112 k7168".into(),
            m_bucket: 64,
            candidates_sha256: sha.into(),
            default_config: "gemm_fp8_f32_64x128x128_s8_ws_splitk".into(),
            timings: vec![
                ("gemm_fp8_f32_64x128x128_s8_ws_splitk".into(), 0.020),
                ("gemm_fp8_f32_64x64x128_s8_ws_splitk".into(), 0.015),
                ("gemm_fp8_f32_128x64x128_s6_ws_splitk".into(), 0.015),
            ],
            rejected: vec![],
            measured_at: "2026-11-29T00:00:00Z".into(),
            measured_on: "NVIDIA H200, driver 13.0".into(),
        }
    }

    #[test]
    fn round_trip_and_deterministic_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        let mut db = TuningDb::new();
        db.insert(entry("H200", "0.1.0", "abc"));
        db.insert(entry("H100", "0.1.0", "abc"));
        db.insert(entry("H200", "0.1.0", "abc")); // replaces, not duplicates
        assert_eq!(db.entries.len(), 2);
        db.write(&path).unwrap();
        let back = TuningDb::read(&path).unwrap();
        assert_eq!(back.entries.len(), 2);
        assert_eq!(back.entries[0].gpu, "H100", "sorted by key");
        // Two candidates tie at 0.015 ms: the first name wins, every time.
        assert_eq!(back.entries[1].winner(), Some(("gemm_fp8_f32_128x64x128_s6_ws_splitk", 0.015)));
        assert_eq!(back.entries[1].default_ms(), Some(0.020));
    }

    #[test]
    fn foreign_stale_and_missing_entries_say_why() {
        let h200 = DeviceModel::by_name("H200").unwrap();
        let mut db = TuningDb::new();
        db.insert(entry("H100", "0.1.0", "abc"));
        let kernel = "gemm fp8->f32 n2112 k7168";
        let Lookup::Ignored(why) = db.lookup::<GemmConfig>(kernel, 64, &h200, "0.1.0", "abc") else { panic!() };
        assert!(why.contains("measured on H100") && why.contains("compiling for H200"), "{why}");
        db.insert(entry("H200", "0.0.9", "abc"));
        db.entries.retain(|e| e.gpu == "H200");
        let Lookup::Ignored(why) = db.lookup::<GemmConfig>(kernel, 64, &h200, "0.1.0", "abc") else { panic!() };
        assert!(why.contains("measured with v3c 0.0.9"), "{why}");
        db.insert(entry("H200", "0.1.0", "abc"));
        db.entries.retain(|e| e.compiler_version == "0.1.0");
        let Lookup::Ignored(why) = db.lookup::<GemmConfig>(kernel, 64, &h200, "0.1.0", "other") else { panic!() };
        assert!(why.starts_with("stale"), "{why}");
        let Lookup::Tuned { config, .. } = db.lookup::<GemmConfig>(kernel, 64, &h200, "0.1.0", "abc") else { panic!() };
        assert_eq!(config.kernel_name(), "gemm_fp8_f32_128x64x128_s6_ws_splitk");
        assert_eq!(db.lookup::<GemmConfig>(kernel, 128, &h200, "0.1.0", "abc"), Lookup::Missing);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, "{\"format_version\": 7, \"entries\": []}").unwrap();
        assert!(TuningDb::read(&path).unwrap_err().contains("format_version 7, this version reads 1"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(TuningDb::read(&path).unwrap_err().contains("invalid JSON"));
    }
}
