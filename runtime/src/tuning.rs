//! The tuning database: a versioned JSON file of measured kernel timings users ship with a model.
//! Written by `v3r tune` (and the device check's `tune_check.py`), read by `v3c compile --tuning`
//! (which decides with `v3c_compiler::tune::db::Lookup` whether an entry applies).
//!
//! An entry is keyed by the compiler version, the GPU (name and compute capability), the kernel
//! signature and the M bucket, and carries the checksum of the candidate set it measured, every
//! candidate's median time, the default configuration it was compared with, and when and where it
//! was measured. The choice is deterministic: the fastest median, ties broken by kernel name.

use std::path::Path;

use serde::{Deserialize, Serialize};

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
                    "{}: tuning database format_version {v}, this version reads {DB_FORMAT_VERSION}",
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
}

impl Default for TuningDb {
    fn default() -> Self {
        TuningDb::new()
    }
}

/// `candidates.json`, written by `v3c tune --emit-candidates DIR` (the compiled candidates' PTX is
/// in `DIR/kernels/<name>.ptx`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    pub format_version: u32,
    pub compiler_version: String,
    pub gpu: String,
    pub compute_capability: (i32, i32),
    pub model: String,
    pub problems: Vec<Problem>,
}

/// One problem (a kernel signature at a decode or prefill M) and its candidate kernels: a GEMM, or
/// MLA attention ([`Problem::attention`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// The signature the database keys it by (`gemm fp8->f32 n2112 k7168`, `mla_decode kv512 r64 h128`).
    pub kernel: String,
    /// GEMMs: rows (grouped: tokens); attention: sequences (decode) or tokens (prefill).
    pub m: usize,
    pub m_bucket: usize,
    #[serde(default)]
    pub n: usize,
    #[serde(default)]
    pub k: usize,
    #[serde(default)]
    pub residual: bool,
    /// Grouped (MoE): tokens (`m`) routed to `top_k` of `routed` experts, each also to every shared one.
    #[serde(default)]
    pub grouped: Option<Routing>,
    /// An attention problem: its candidates share its launch convention (they differ in ring depth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionProblem>,
    /// A reduction (a row kernel): its candidates share its arguments (they differ in block width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<RowProblem>,
    pub candidates_sha256: String,
    /// The configuration the cost model picked (the reference every candidate is checked against).
    pub default: String,
    pub candidates: Vec<Candidate>,
}

/// MLA attention as `v3r tune` measures it (`m` of the problem: sequences or tokens).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AttentionProblem {
    /// Absorbed decode ([`crate::abi::MlaDecodeAbi`]): one new token of `heads` query rows per
    /// sequence over `context` keys in pages of the paged cache.
    Decode { heads: usize, kv: usize, rope: usize, fp8_cache: bool, context: usize, scale: f32 },
    /// Causal prefill ([`crate::abi::MlaPrefillAbi`]) of `m` tokens over as many keys: inference's
    /// forward, or a training step's kernel `flash` names (the forward with its log-sum-exps, a
    /// gradient).
    Prefill {
        heads: usize,
        qk: usize,
        v: usize,
        scale: f32,
        #[serde(default)]
        flash: crate::abi::FlashKind,
    },
}

/// A row kernel as `v3r tune` measures it: its arguments in order, at the problem's rows (one block
/// per row of the first); made-up inputs, zeroed outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowProblem {
    pub operands: Vec<RowOperand>,
    /// RMSNorm's epsilon: the host checks the default's rows (`x [rows, d]`, `w [d]`; outputs `y`
    /// and/or `q` e4m3 with `scale` per 128 columns). None: the candidates are only compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rmsnorm_eps: Option<f32>,
    /// Greedy sampling's argmax (`x [rows, d]` f32 -> `idx [rows]` i32): the host checks the
    /// default's rows, and the other widths must give the same indices exactly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub argmax: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowOperand {
    pub name: String,
    pub shape: Vec<usize>,
    /// `f32`, `bf16`, or `i8` (e4m3 bytes).
    pub element: String,
    pub output: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    pub routed: usize,
    pub shared: usize,
    pub top_k: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    pub threads: usize,
    pub dynamic_shared_memory_bytes: usize,
    /// How the kernel is launched (candidate sets from before it was recorded lack it).
    #[serde(default)]
    pub abi: Option<crate::abi::GemmAbi>,
    #[serde(default)]
    pub estimate_us: Option<f64>,
}

impl Candidates {
    /// Reads `DIR/candidates.json`; one-line errors name the file.
    pub fn read(dir: &Path) -> Result<Candidates, String> {
        let path = dir.join("candidates.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let c: Candidates =
            serde_json::from_str(&text).map_err(|e| format!("{}: not a candidate set: {e}", path.display()))?;
        if c.format_version != 1 {
            return Err(format!("{}: format_version {}, this version reads 1", path.display(), c.format_version));
        }
        let gemm = |p: &&Problem| p.attention.is_none() && p.rows.is_none();
        let unknown = |p: &&Problem| gemm(p) && p.candidates.iter().any(|k| k.abi.is_none());
        if let Some(p) = c.problems.iter().find(unknown) {
            return Err(format!(
                "{}: {} has candidates without their launch convention (emitted by an older v3c: emit them again)",
                path.display(),
                p.kernel
            ));
        }
        Ok(c)
    }
}

/// A routing of `tokens` for a grouped problem: each token to `top_k` distinct routed experts
/// (pseudo-random from `seed`) and to every shared expert (groups after the routed ones). Returns
/// the group boundaries `[groups + 1]` over the expert-sorted rows and each sorted row's token.
pub fn route(tokens: usize, r: Routing, seed: u64) -> (Vec<i32>, Vec<i32>) {
    let mut state = seed ^ 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let groups = r.routed + r.shared;
    let mut members: Vec<Vec<i32>> = vec![Vec::new(); groups];
    for t in 0..tokens {
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < r.top_k.min(r.routed) {
            let e = (next() % r.routed as u64) as usize;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for e in chosen {
            members[e].push(t as i32);
        }
        for s in 0..r.shared {
            members[r.routed + s].push(t as i32);
        }
    }
    let mut offsets = vec![0i32];
    let mut perm = Vec::new();
    for m in members {
        perm.extend(&m);
        offsets.push(perm.len() as i32);
    }
    (offsets, perm)
}

/// `NVIDIA H200` -> `H200` (the names the cost model and the database use).
pub fn gpu_short_name(device: &str) -> String {
    ["H200", "H100", "H800", "H20"]
        .iter()
        .find(|k| device.split_whitespace().any(|w| w == **k))
        .map_or_else(|| device.trim_start_matches("NVIDIA ").to_string(), |k| k.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_sends_every_token_to_top_k_distinct_experts_and_every_shared_one() {
        let r = Routing { routed: 8, shared: 1, top_k: 3 };
        let (offsets, perm) = route(37, r, 5);
        assert_eq!(offsets.len(), 10);
        assert_eq!(*offsets.last().unwrap() as usize, perm.len());
        assert_eq!(perm.len(), 37 * 4);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        for t in 0..37 {
            let groups: Vec<usize> =
                (0..9).filter(|&g| perm[offsets[g] as usize..offsets[g + 1] as usize].contains(&t)).collect();
            assert_eq!(groups.len(), 4, "token {t}");
            assert!(groups.contains(&8), "the shared expert takes every token");
        }
        assert_eq!(route(37, r, 5), (offsets, perm), "deterministic");
    }

    #[test]
    fn gpu_names_shorten_as_the_database_keys_them() {
        assert_eq!(gpu_short_name("NVIDIA H200"), "H200");
        assert_eq!(gpu_short_name("NVIDIA H20"), "H20");
        assert_eq!(gpu_short_name("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(gpu_short_name("NVIDIA A100-SXM4-80GB"), "A100-SXM4-80GB");
    }
}
