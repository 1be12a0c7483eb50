//! A content-addressed cache of compiled kernels: CPU kernels' shared objects, GPU kernels' PTX and
//! cubins.
//!
//! The key of a CPU kernel is the SHA-256 of everything its machine code depends on: the kernel's
//! `cpu`-stage MLIR, the pass pipeline that lowers it to LLVM, the JIT's optimization level, this
//! compiler's version, the LLVM it runs with and the host CPU (model and the vector features LLVM selects code for). An
//! entry is one shared object, `<key>.so`, linked by the system `cc` from the object file MLIR's
//! ExecutionEngine emits; a hit is `dlopen`ed instead of lowered and JIT-compiled again.
//!
//! GPU kernels are kept too, when the program asks ([`keep_gpu_kernels_in`]; `v3c` does): the PTX a
//! template's `gpu.module` lowers to, as `<key>.ptx`, keyed by the module's MLIR, the lowering
//! pipeline, the target, LLVM's version and this compiler's executable (its path, size and
//! modification time: the lowering's own code is in it); and what ptxas made of the PTX (the cubin
//! and ptxas's `-v` report), as `<key>.cubin`, keyed by the PTX, the target, ptxas's arguments and
//! the ptxas binary (its version, path, size and modification time).
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
        let parts = [FORMAT, env!("CARGO_PKG_VERSION"), environment(), pipeline, &opt_level.to_string(), text];
        key_of(parts.iter().map(|p| p.as_bytes()))
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

/// The cache GPU kernels are kept in (their PTX by [`crate::conversion::sm90`], cubins by
/// [`crate::target::assemble`]): none unless the program chose one.
static GPU_KERNELS: std::sync::OnceLock<Option<KernelCache>> = std::sync::OnceLock::new();

/// Has the GPU lowering keep what it makes (PTX, and what ptxas makes of it) in `cache` from now on
/// (the `v3c` command line passes [`KernelCache::from_env`]; a library user that never calls this
/// lowers and assembles afresh every time). Only the first call counts: false when a cache was
/// chosen before.
pub fn keep_gpu_kernels_in(cache: Option<KernelCache>) -> bool {
    GPU_KERNELS.set(cache).is_ok()
}

/// The cache GPU kernels are kept in, if the program chose one ([`keep_gpu_kernels_in`]).
pub fn gpu_cache() -> Option<&'static KernelCache> {
    GPU_KERNELS.get().and_then(Option::as_ref)
}

/// What the GPU kernel cache gave and took so far in this process: PTX taken from it and made
/// (lowered), cubins taken from it and made (assembled by ptxas).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GpuCacheCounts {
    pub ptx_kept: usize,
    pub ptx_made: usize,
    pub cubins_kept: usize,
    pub cubins_made: usize,
}

static GPU_COUNTS: std::sync::Mutex<GpuCacheCounts> =
    std::sync::Mutex::new(GpuCacheCounts { ptx_kept: 0, ptx_made: 0, cubins_kept: 0, cubins_made: 0 });

/// The counts so far ([`GpuCacheCounts`]).
pub fn gpu_cache_counts() -> GpuCacheCounts {
    *GPU_COUNTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one kernel's PTX or cubin as taken from the cache (`kept`) or made.
pub(crate) fn count(cubin: bool, kept: bool) {
    let mut c = GPU_COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    *match (cubin, kept) {
        (false, true) => &mut c.ptx_kept,
        (false, false) => &mut c.ptx_made,
        (true, true) => &mut c.cubins_kept,
        (true, false) => &mut c.cubins_made,
    } += 1;
}

/// The first bytes of a cubin entry (the format's version is in them): ptxas's log, the cubin.
const CUBIN_MAGIC: &[u8] = b"v3c-cubin-1\n";
/// The first bytes of a PTX entry: the PTX of one `gpu.module`.
const PTX_MAGIC: &[u8] = b"v3c-ptx-1\n";

/// SHA-256 of `parts`, each length-prefixed (moving a boundary changes the key), lowercase hex.
fn key_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl KernelCache {
    /// The key of what `ptxas` makes of `ptx` for `arch` with `args`: None when the ptxas binary
    /// cannot be identified (its version, path, size and modification time), so nothing is kept.
    pub fn cubin_key(ptx: &str, arch: &str, args: &[&str], ptxas: &Path) -> Option<String> {
        let identity = ptxas_identity(ptxas)?;
        let head = [CUBIN_MAGIC, env!("CARGO_PKG_VERSION").as_bytes(), identity.as_bytes(), arch.as_bytes()];
        Some(key_of(head.into_iter().chain(args.iter().map(|a| a.as_bytes())).chain([ptx.as_bytes()])))
    }

    /// The key of the PTX `mlir` (a `gpu.module`) lowers to by `pipeline` for `target` (its
    /// [`Debug`] form: name, PTX ISA, features): None when this compiler's executable cannot be
    /// identified (its path, size and modification time: the lowering's own code is in it).
    pub fn ptx_key(mlir: &str, pipeline: &str, target: &str) -> Option<String> {
        let compiler = compiler_identity()?;
        let (major, minor, patch) = inkwell::support::get_llvm_version();
        let llvm = format!("llvm {major}.{minor}.{patch}");
        let parts = [PTX_MAGIC, env!("CARGO_PKG_VERSION").as_bytes(), compiler.as_bytes(), llvm.as_bytes()];
        Some(key_of(parts.into_iter().chain([target.as_bytes(), pipeline.as_bytes(), mlir.as_bytes()])))
    }

    /// The cubin entry of `key`.
    pub fn cubin_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cubin"))
    }

    /// The PTX entry of `key`.
    pub fn ptx_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.ptx"))
    }

    /// The cubin and ptxas's log kept under `key`; None when absent or unreadable (a damaged entry
    /// is reported on stderr and will be replaced).
    pub fn load_cubin(&self, key: &str) -> Option<(Vec<u8>, String)> {
        let path = self.cubin_path(key);
        let [log, cubin] = load_entry(&path, CUBIN_MAGIC, |[log, cubin]: [Vec<u8>; 2]| {
            // Every cubin is an ELF file.
            if cubin.starts_with(b"\x7fELF") {
                Ok([log, cubin])
            } else {
                Err("the cubin is not an ELF file")
            }
        })?;
        Some((cubin, utf8(&path, log)?))
    }

    /// Keeps `cubin` and ptxas's `log` under `key` (written whole or not at all).
    pub fn store_cubin(&self, key: &str, cubin: &[u8], log: &str) -> Result<(), String> {
        self.store_entry(&self.cubin_path(key), CUBIN_MAGIC, &[log.as_bytes(), cubin])
    }

    /// The PTX kept under `key`; None when absent or unreadable (a damaged entry is reported on
    /// stderr and will be replaced).
    pub fn load_ptx(&self, key: &str) -> Option<String> {
        let path = self.ptx_path(key);
        let [ptx] = load_entry(&path, PTX_MAGIC, Ok)?;
        utf8(&path, ptx)
    }

    /// Keeps the PTX a `gpu.module` lowers to under `key`.
    pub fn store_ptx(&self, key: &str, ptx: &str) -> Result<(), String> {
        self.store_entry(&self.ptx_path(key), PTX_MAGIC, &[ptx.as_bytes()])
    }

    /// Writes `magic` and `parts` (each length-prefixed) to `path` whole or not at all.
    fn store_entry(&self, path: &Path, magic: &[u8], parts: &[&[u8]]) -> Result<(), String> {
        use std::io::Write;
        let failed = |e: std::io::Error| format!("kernel cache {}: {e}", self.dir.display());
        std::fs::create_dir_all(&self.dir).map_err(failed)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let mut partial =
            tempfile::Builder::new().prefix(&format!(".{name}.")).tempfile_in(&self.dir).map_err(failed)?;
        let mut entry = magic.to_vec();
        for part in parts {
            entry.extend_from_slice(&(part.len() as u64).to_le_bytes());
            entry.extend_from_slice(part);
        }
        partial.write_all(&entry).map_err(failed)?;
        partial.persist(path).map_err(|e| failed(e.error))?;
        Ok(())
    }
}

/// The `N` parts of the entry at `path` (written by [`KernelCache::store_entry`] after `magic`),
/// checked by `check`; None when absent, or unreadable (then reported on stderr).
fn load_entry<const N: usize>(
    path: &Path,
    magic: &[u8],
    check: impl FnOnce([Vec<u8>; N]) -> Result<[Vec<u8>; N], &'static str>,
) -> Option<[Vec<u8>; N]> {
    let bytes = std::fs::read(path).ok()?;
    let parts = (|| {
        let mut rest = bytes.strip_prefix(magic).ok_or("not a v3c entry of this kind")?;
        let mut parts: [Vec<u8>; N] = std::array::from_fn(|_| Vec::new());
        for part in &mut parts {
            let (len, after) = rest.split_first_chunk::<8>().ok_or("truncated")?;
            let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| "truncated")?;
            if len > after.len() {
                return Err("truncated");
            }
            *part = after[..len].to_vec();
            rest = &after[len..];
        }
        if !rest.is_empty() {
            return Err("bytes past its end");
        }
        check(parts)
    })();
    parts.map_err(|e| unusable(path, e)).ok()
}

/// `bytes` as text, or None with the entry at `path` reported unusable.
fn utf8(path: &Path, bytes: Vec<u8>) -> Option<String> {
    String::from_utf8(bytes).map_err(|_| unusable(path, "text that is not UTF-8")).ok()
}

fn unusable(path: &Path, why: &str) {
    tracing::warn!("kernel cache entry {} is unusable ({why}); making it again", path.display());
}

/// What identifies a binary: where it is, its size and when it was last modified.
fn file_identity(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(format!("{} {} {}", path.display(), meta.len(), modified.as_nanos()))
}

/// What identifies this compiler's executable (read once).
fn compiler_identity() -> Option<&'static str> {
    static IDENTITY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(|| file_identity(&std::env::current_exe().ok()?)).as_deref()
}

/// What identifies a ptxas binary: its `--version` answer and [`file_identity`] (read once per
/// binary).
fn ptxas_identity(ptxas: &Path) -> Option<String> {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, Option<String>)>> = std::sync::Mutex::new(Vec::new());
    if let Some((_, id)) = KNOWN.lock().ok()?.iter().find(|(p, _)| p == ptxas) {
        return id.clone();
    }
    let id = (|| {
        let file = file_identity(ptxas)?;
        let out = Command::new(ptxas).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        Some(format!("{file} {}", String::from_utf8_lossy(&out.stdout).trim()))
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
    fn ptx_entries_round_trip_and_their_keys_change_with_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        let ptx = ".version 8.0\n.target sm_90a\n";
        assert!(cache.load_ptx("k").is_none());
        cache.store_ptx("k", ptx).unwrap();
        assert_eq!(cache.load_ptx("k").as_deref(), Some(ptx));
        // A cubin entry is not a PTX entry, nor is a PTX entry with bytes after it or not UTF-8.
        cache.store_cubin("c", b"\x7fELF", "log").unwrap();
        std::fs::rename(cache.cubin_path("c"), cache.ptx_path("c")).unwrap();
        assert!(cache.load_ptx("c").is_none());
        let mut longer = std::fs::read(cache.ptx_path("k")).unwrap();
        longer.push(0);
        std::fs::write(cache.ptx_path("k"), &longer).unwrap();
        assert!(cache.load_ptx("k").is_none());
        cache.store_entry(&cache.ptx_path("k"), PTX_MAGIC, &[b"\xff\xfe"]).unwrap();
        assert!(cache.load_ptx("k").is_none());

        let key = |mlir: &str, pipeline: &str, target: &str| KernelCache::ptx_key(mlir, pipeline, target).unwrap();
        let base = key("gpu.module", "lower", "sm_90a");
        assert_eq!(base, key("gpu.module", "lower", "sm_90a"));
        assert_ne!(base, key("gpu.module ", "lower", "sm_90a"));
        assert_ne!(base, key("gpu.module", "lower,cse", "sm_90a"));
        assert_ne!(base, key("gpu.module", "lower", "sm_90a ptx 8.1"));
        assert_ne!(key("ab", "c", "t"), key("a", "bc", "t"));
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
