//! The tuning database: a versioned JSON file of measured timings users ship with a model.
//!
//! An entry is keyed by the compiler version, the GPU (name and compute capability), the kernel
//! signature ([`super::GemmShape::signature`]) and the M bucket, and carries the checksum of the
//! candidate set it measured ([`super::candidates_sha256`]), every candidate's median time, the
//! default configuration it was compared with, and when and where it was measured. The choice is
//! deterministic: the fastest median, ties broken by kernel name. [`TuningDb::lookup`] says why an
//! entry does not apply (another GPU, another compiler, a changed search space, missing).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::conversion::sm90::gemm::GemmConfig;
use crate::target::DeviceModel;

pub const DB_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningDb {
    pub format_version: u32,
    pub entries: Vec<DbEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbEntry {
    pub compiler_version: String,
    pub gpu: String,
    pub compute_capability: (i32, i32),
    /// `gemm fp8->f32 n7168 k16384 +residual`.
    pub kernel: String,
    pub m_bucket: usize,
    pub candidates_sha256: String,
    /// The configuration compile would use without the entry (the cost model's pick).
    pub default_config: String,
    /// Every measured candidate: kernel name and median milliseconds.
    pub timings: Vec<(String, f64)>,
    /// Candidates whose output differed from the default configuration's (never winners).
    #[serde(default)]
    pub rejected: Vec<String>,
    /// When (RFC 3339, UTC) and on what (device and driver as the measuring tool saw them).
    pub measured_at: String,
    pub measured_on: String,
}

impl DbEntry {
    /// The fastest measured candidate (ties: the first name in order).
    pub fn winner(&self) -> Option<(&str, f64)> {
        self.timings
            .iter()
            .filter(|(_, ms)| ms.is_finite() && *ms > 0.0)
            .min_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
            .map(|(n, ms)| (n.as_str(), *ms))
    }

    /// The default configuration's measured time, if it was measured.
    pub fn default_ms(&self) -> Option<f64> {
        self.timings.iter().find(|(n, _)| *n == self.default_config).map(|(_, ms)| *ms)
    }
}

/// What the database holds for one kernel and bucket.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup<'a> {
    Tuned {
        config: GemmConfig,
        entry: &'a DbEntry,
    },
    /// An entry exists but may not be used: why.
    Ignored(String),
    Missing,
}

impl TuningDb {
    pub fn new() -> TuningDb {
        TuningDb { format_version: DB_FORMAT_VERSION, entries: Vec::new() }
    }

    /// Reads a database; one-line errors name the file.
    pub fn read(path: &Path) -> Result<TuningDb, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
        match raw.get("format_version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(DB_FORMAT_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "{}: tuning database format_version {v}, this v3c reads {DB_FORMAT_VERSION}",
                    path.display()
                ))
            }
            None => return Err(format!("{}: not a tuning database (no format_version)", path.display())),
        }
        serde_json::from_value(raw).map_err(|e| format!("{}: unexpected layout: {e}", path.display()))
    }

    /// Writes the database (entries sorted by key: the file diffs cleanly), atomically.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let mut sorted = self.clone();
        sorted.entries.sort_by(|a, b| {
            (&a.gpu, &a.kernel, a.m_bucket, &a.compiler_version).cmp(&(
                &b.gpu,
                &b.kernel,
                b.m_bucket,
                &b.compiler_version,
            ))
        });
        let text = serde_json::to_string_pretty(&sorted).map_err(|e| e.to_string())? + "\n";
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Adds `entry`, replacing one with the same key (re-tuning what changed).
    pub fn insert(&mut self, entry: DbEntry) {
        self.entries.retain(|e| {
            (&e.gpu, &e.kernel, e.m_bucket, &e.compiler_version)
                != (&entry.gpu, &entry.kernel, entry.m_bucket, &entry.compiler_version)
        });
        self.entries.push(entry);
    }

    /// The entry for `kernel` at `m_bucket` on `device` for this compiler and candidate set.
    pub fn lookup(
        &self,
        kernel: &str,
        m_bucket: usize,
        device: &DeviceModel,
        compiler_version: &str,
        candidates_sha256: &str,
    ) -> Lookup<'_> {
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
                match e.winner().and_then(|(name, _)| GemmConfig::from_name(name).map(|c| (name, c))) {
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

impl Default for TuningDb {
    fn default() -> Self {
        TuningDb::new()
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
        let Lookup::Ignored(why) = db.lookup(kernel, 64, &h200, "0.1.0", "abc") else { panic!() };
        assert!(why.contains("measured on H100") && why.contains("compiling for H200"), "{why}");
        db.insert(entry("H200", "0.0.9", "abc"));
        db.entries.retain(|e| e.gpu == "H200");
        let Lookup::Ignored(why) = db.lookup(kernel, 64, &h200, "0.1.0", "abc") else { panic!() };
        assert!(why.contains("measured with v3c 0.0.9"), "{why}");
        db.insert(entry("H200", "0.1.0", "abc"));
        db.entries.retain(|e| e.compiler_version == "0.1.0");
        let Lookup::Ignored(why) = db.lookup(kernel, 64, &h200, "0.1.0", "other") else { panic!() };
        assert!(why.starts_with("stale"), "{why}");
        let Lookup::Tuned { config, .. } = db.lookup(kernel, 64, &h200, "0.1.0", "abc") else { panic!() };
        assert_eq!(config.kernel_name(), "gemm_fp8_f32_128x64x128_s6_ws_splitk");
        assert_eq!(db.lookup(kernel, 128, &h200, "0.1.0", "abc"), Lookup::Missing);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, "{\"format_version\": 7, \"entries\": []}").unwrap();
        assert!(TuningDb::read(&path).unwrap_err().contains("format_version 7, this v3c reads 1"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(TuningDb::read(&path).unwrap_err().contains("invalid JSON"));
    }
}
