//! A content-addressed cache of CPU kernels compiled to machine code.
//!
//! The key of a kernel is the SHA-256 of everything its machine code depends on: the kernel's
//! `cpu`-stage MLIR, the pass pipeline that lowers it to LLVM, the JIT's optimization level, this
//! compiler's version, the LLVM it runs with and the host CPU (model and the vector features LLVM selects code for). An
//! entry is one shared object, `<key>.so`, linked by the system `cc` from the object file MLIR's
//! ExecutionEngine emits; a hit is `dlopen`ed instead of lowered and JIT-compiled again.
//!
//! Entries are written to a temporary file and renamed into place, so concurrent compilers never
//! see a partial entry. An entry that fails to load (truncated, foreign, missing its symbol) is a
//! miss: it is rebuilt and replaced, with a warning naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Bumped when the entry format (not the kernels) changes.
const FORMAT: &str = "v3c-cpu-kernel-1";

/// A directory of compiled kernels.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

/// Where the cache lives unless `V3C_KERNEL_CACHE` says otherwise.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("v3c").join("kernels"))
}

impl KernelCache {
    /// A cache in `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    /// The cache the command line uses: `V3C_KERNEL_CACHE=<dir>`, `V3C_KERNEL_CACHE=off` for none,
    /// else [`default_dir`].
    pub fn from_env() -> Option<KernelCache> {
        match std::env::var_os("V3C_KERNEL_CACHE") {
            Some(v) if v == "off" || v == "0" || v.is_empty() => None,
            Some(v) => Some(KernelCache::new(v)),
            None => default_dir().map(KernelCache::new),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a kernel whose `cpu`-stage text is `text`, lowered by `pipeline` at `opt_level`.
    pub fn key(text: &str, pipeline: &str, opt_level: usize) -> String {
        let mut h = Sha256::new();
        for part in [FORMAT, env!("CARGO_PKG_VERSION"), environment(), pipeline, &opt_level.to_string(), text] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The shared object of `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.so"))
    }

    /// Loads the entry of `key` and its packed entry point `symbol`; `None` when absent or unusable
    /// (an unusable entry is reported on stderr and will be replaced).
    pub fn load(&self, key: &str, symbol: &str) -> Option<CachedKernel> {
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        // SAFETY: the library is one this cache wrote (named by the hash of its source); it has
        // no initializers beyond the C runtime's.
        let loaded = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string()).and_then(|lib| {
            // SAFETY: the packed entry point MLIR's ExecutionEngine emits: `void(void**)`.
            let entry = unsafe { lib.get::<PackedFn>(symbol.as_bytes()) }.map(|s| *s).map_err(|e| e.to_string())?;
            Ok(CachedKernel { entry, _library: lib })
        });
        match loaded {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!("kernel cache entry {} is unusable ({e}); rebuilding it", path.display());
                None
            }
        }
    }

    /// Links `object` (an object file from the JIT) into the entry of `key`.
    pub fn store(&self, key: &str, object: &Path) -> Result<PathBuf, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("kernel cache {}: {e}", self.dir.display()))?;
        let target = self.path(key);
        let partial = tempfile::Builder::new()
            .prefix(&format!(".{key}."))
            .suffix(".so")
            .tempfile_in(&self.dir)
            .map_err(|e| format!("kernel cache {}: {e}", self.dir.display()))?;
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(&cc)
            .args(["-shared", "-o"])
            .arg(partial.path())
            .arg(object)
            .arg("-lm")
            .output()
            .map_err(|e| format!("kernel cache: cannot run '{cc}' to link kernels: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "kernel cache: '{cc} -shared' failed on {}: {}",
                object.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        partial.persist(&target).map_err(|e| format!("kernel cache {}: {e}", target.display()))?;
        Ok(target)
    }
}

/// MLIR's packed calling convention: one pointer to an array of argument pointers.
pub type PackedFn = unsafe extern "C" fn(*mut *mut ());

/// A kernel loaded from the cache.
pub struct CachedKernel {
    pub entry: PackedFn,
    // Keeps `entry` mapped.
    _library: libloading::Library,
}

/// The LLVM this process runs with and the host CPU: read once, the same for every key.
fn environment() -> &'static str {
    static ENVIRONMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let (major, minor, patch) = inkwell::support::get_llvm_version();
        format!("llvm {major}.{minor}.{patch} {}", host_cpu())
    })
}

/// The host CPU as far as generated code depends on it.
fn host_cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
        .unwrap_or_default();
    let mut features = String::new();
    #[cfg(target_arch = "x86_64")]
    for (name, on) in [
        ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
        ("avx", std::arch::is_x86_feature_detected!("avx")),
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
        ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
        ("avx512bf16", std::arch::is_x86_feature_detected!("avx512bf16")),
    ] {
        if on {
            features.push_str(name);
            features.push(',');
        }
    }
    format!("{} {model} {features}", std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_every_input() {
        let base = KernelCache::key("func", "pipe", 2);
        assert_eq!(base.len(), 64);
        assert_eq!(base, KernelCache::key("func", "pipe", 2));
        assert_ne!(base, KernelCache::key("func ", "pipe", 2));
        assert_ne!(base, KernelCache::key("func", "pipe,x", 2));
        assert_ne!(base, KernelCache::key("func", "pipe", 3));
        // Length-prefixed parts: moving a boundary changes the key.
        assert_ne!(KernelCache::key("ab", "c", 2), KernelCache::key("a", "bc", 2));
    }

    #[test]
    fn corrupt_entry_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        std::fs::write(cache.path("k"), b"not an ELF file").unwrap();
        assert!(cache.load("k", "_mlir_x").is_none());
        assert!(cache.load("absent", "_mlir_x").is_none());
    }
}
