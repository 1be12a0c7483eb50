//! A content-addressed cache of kernels compiled to machine code: CPU kernels' shared objects and
//! GPU kernels' cubins.
//!
//! The key of a CPU kernel is the SHA-256 of everything its machine code depends on: the kernel's
//! `cpu`-stage MLIR, the pass pipeline that lowers it to LLVM, the JIT's optimization level, this
//! compiler's version, the LLVM it runs with and the host CPU (model and the vector features LLVM selects code for). An
//! entry is one shared object, `<key>.so`, linked by the system `cc` from the object file MLIR's
//! ExecutionEngine emits; a hit is `dlopen`ed instead of lowered and JIT-compiled again.
//!
//! GPU kernels are kept too: what ptxas made of a PTX module (the cubin and ptxas's `-v` report), as
//! `<key>.cubin`, keyed by the PTX, the target, ptxas's arguments and the ptxas binary (its version,
//! path, size and modification time).
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

/// The cache [`crate::target::assemble`] keeps cubins in: none unless the program chose one.
static CUBINS: std::sync::OnceLock<Option<KernelCache>> = std::sync::OnceLock::new();

/// Has [`crate::target::assemble`] keep what ptxas makes in `cache` from now on (the `v3c` command
/// line passes [`KernelCache::from_env`]; a library user that never calls this assembles afresh
/// every time). Only the first call counts: false when a cache was chosen before.
pub fn keep_cubins_in(cache: Option<KernelCache>) -> bool {
    CUBINS.set(cache).is_ok()
}

/// The cache cubins are kept in, if the program chose one ([`keep_cubins_in`]).
pub fn cubin_cache() -> Option<&'static KernelCache> {
    CUBINS.get().and_then(Option::as_ref)
}

/// The first bytes of a cubin entry; the format's version is in them.
const CUBIN_MAGIC: &[u8; 12] = b"v3c-cubin-1\n";

impl KernelCache {
    /// The key of what `ptxas` makes of `ptx` for `arch` with `args`: None when the ptxas binary
    /// cannot be identified (its version, path, size and modification time), so nothing is kept.
    pub fn cubin_key(ptx: &str, arch: &str, args: &[&str], ptxas: &Path) -> Option<String> {
        let identity = ptxas_identity(ptxas)?;
        let mut h = Sha256::new();
        for part in [CUBIN_MAGIC.as_slice(), env!("CARGO_PKG_VERSION").as_bytes(), identity.as_bytes(), arch.as_bytes()]
            .into_iter()
            .chain(args.iter().map(|a| a.as_bytes()))
            .chain([ptx.as_bytes()])
        {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The cubin entry of `key`.
    pub fn cubin_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cubin"))
    }

    /// The cubin and ptxas's log kept under `key`; None when absent or unreadable (a damaged entry
    /// is reported on stderr and will be replaced).
    pub fn load_cubin(&self, key: &str) -> Option<(Vec<u8>, String)> {
        let path = self.cubin_path(key);
        let bytes = std::fs::read(&path).ok()?;
        let entry = (|| {
            let rest = bytes.strip_prefix(CUBIN_MAGIC.as_slice()).ok_or("not a v3c cubin entry")?;
            let (len, rest) = rest.split_first_chunk::<8>().ok_or("truncated")?;
            let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| "truncated")?;
            if len > rest.len() {
                return Err("truncated");
            }
            let (log, cubin) = rest.split_at(len);
            let log = std::str::from_utf8(log).map_err(|_| "ptxas log is not UTF-8")?;
            // Every cubin is an ELF file.
            if !cubin.starts_with(b"\x7fELF") {
                return Err("the cubin is not an ELF file");
            }
            Ok((cubin.to_vec(), log.to_string()))
        })();
        match entry {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!("kernel cache entry {} is unusable ({e}); assembling it again", path.display());
                None
            }
        }
    }

    /// Keeps `cubin` and ptxas's `log` under `key` (written whole or not at all).
    pub fn store_cubin(&self, key: &str, cubin: &[u8], log: &str) -> Result<(), String> {
        use std::io::Write;
        let failed = |e: std::io::Error| format!("kernel cache {}: {e}", self.dir.display());
        std::fs::create_dir_all(&self.dir).map_err(failed)?;
        let mut partial = tempfile::Builder::new()
            .prefix(&format!(".{key}."))
            .suffix(".cubin")
            .tempfile_in(&self.dir)
            .map_err(failed)?;
        let mut entry = Vec::with_capacity(CUBIN_MAGIC.len() + 8 + log.len() + cubin.len());
        entry.extend_from_slice(CUBIN_MAGIC);
        entry.extend_from_slice(&(log.len() as u64).to_le_bytes());
        entry.extend_from_slice(log.as_bytes());
        entry.extend_from_slice(cubin);
        partial.write_all(&entry).map_err(failed)?;
        partial.persist(self.cubin_path(key)).map_err(|e| failed(e.error))?;
        Ok(())
    }
}

/// What identifies a ptxas binary: its `--version` answer, where it is, its size and when it was
/// last modified (read once per binary).
fn ptxas_identity(ptxas: &Path) -> Option<String> {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, Option<String>)>> = std::sync::Mutex::new(Vec::new());
    if let Some((_, id)) = KNOWN.lock().ok()?.iter().find(|(p, _)| p == ptxas) {
        return id.clone();
    }
    let id = (|| {
        let path = std::fs::canonicalize(ptxas).ok()?;
        let meta = std::fs::metadata(&path).ok()?;
        let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        let out = Command::new(&path).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let version = String::from_utf8_lossy(&out.stdout);
        Some(format!("{} {} {} {}", path.display(), meta.len(), modified.as_nanos(), version.trim()))
    })();
    KNOWN.lock().ok()?.push((ptxas.to_path_buf(), id.clone()));
    id
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
    fn cubin_entries_round_trip_and_damaged_ones_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path().join("cache"));
        let cubin = b"\x7fELF and the rest".to_vec();
        let log = "ptxas info    : Used 8 registers";
        assert!(cache.load_cubin("k").is_none());
        cache.store_cubin("k", &cubin, log).unwrap();
        assert_eq!(cache.load_cubin("k"), Some((cubin.clone(), log.to_string())));
        // No partial file is left beside the entry.
        let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k.cubin")]);
        let whole = std::fs::read(cache.cubin_path("k")).unwrap();
        for damaged in
            [&whole[..whole.len() - cubin.len() - 3], &whole[..10], b"v3c-cubin-1\n\xff\xff\xff\xff\xff\xff\xff\xff"]
        {
            std::fs::write(cache.cubin_path("k"), damaged).unwrap();
            assert!(cache.load_cubin("k").is_none(), "{damaged:?}");
        }
        let mut not_elf = whole.clone();
        let at = whole.len() - cubin.len();
        not_elf[at] = b'X';
        std::fs::write(cache.cubin_path("k"), not_elf).unwrap();
        assert!(cache.load_cubin("k").is_none());
    }

    #[test]
    fn cubin_keys_change_with_the_ptx_target_arguments_and_ptxas() {
        let dir = tempfile::tempdir().unwrap();
        let tool = |name: &str, version: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\necho 'Cuda compilation tools, release {version}'\n")).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            p
        };
        let (a, b) = (tool("ptxas-a", "13.0, V13.0.88"), tool("ptxas-b", "13.1, V13.1.2"));
        let key = |ptx: &str, arch: &str, args: &[&str], p: &Path| KernelCache::cubin_key(ptx, arch, args, p).unwrap();
        let base = key("ptx", "sm_90a", &["-v"], &a);
        assert_eq!(base, key("ptx", "sm_90a", &["-v"], &a));
        assert_ne!(base, key("ptx ", "sm_90a", &["-v"], &a));
        assert_ne!(base, key("ptx", "sm_90", &["-v"], &a));
        assert_ne!(base, key("ptx", "sm_90a", &["-v", "-O2"], &a));
        assert_ne!(base, key("ptx", "sm_90a", &["-v"], &b));
        // A ptxas that cannot say what it is keeps nothing.
        assert!(KernelCache::cubin_key("ptx", "sm_90a", &[], &dir.path().join("absent")).is_none());
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
