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
//!
//! The cache is held to a size ([`max_bytes_from_env`]: 2 GiB unless `V3C_KERNEL_CACHE_MAX` says
//! otherwise): [`KernelCache::trim`] removes the least recently used entries (a hit renews an
//! entry's modification time) until the rest fit; `v3c` does after each command that may store
//! kernels, and `v3c cache` reports, trims or clears it on demand.

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
            Ok(k) => {
                used(&path);
                Some(k)
            }
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
    let parts = parts.map_err(|e| unusable(path, e)).ok()?;
    used(path);
    Some(parts)
}

/// Renews the modification time of the entry at `path`, which [`KernelCache::trim`] reads as its
/// last use (best effort: a read-only cache is still a cache).
fn used(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// The kinds of entries, by file extension: CPU kernels' shared objects, PTX, cubins.
const KINDS: [&str; 3] = ["so", "ptx", "cubin"];

/// Partial entries older than this are left over from a compiler that died while writing them.
const ABANDONED: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How long after its last use an entry is spared by the trimming after each command (another
/// compiler may be using it): [`KernelCache::trim_sparing`].
pub const SPARED_AFTER_USE: std::time::Duration = std::time::Duration::from_secs(600);

/// The size a cache is held to unless `V3C_KERNEL_CACHE_MAX` says otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

/// What a cache holds: entries (and their bytes) per kind, and partial entries being written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Entries of each of [`KINDS`]: CPU kernels, PTX, cubins.
    pub entries: [usize; 3],
    pub bytes: [u64; 3],
    /// Partial entries (hidden files being written, or abandoned).
    pub partial: usize,
}

impl Usage {
    pub fn total_entries(&self) -> usize {
        self.entries.iter().sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [so, ptx, cubins] = self.entries;
        write!(f, "{so} CPU kernels, {ptx} PTX, {cubins} cubins, {}", mib(self.total_bytes()))
    }
}

/// `bytes` in MiB, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// What [`KernelCache::trim`] or [`KernelCache::clear`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub entries: usize,
    pub bytes: u64,
    /// Abandoned partial entries.
    pub partial: usize,
}

/// One file of the cache directory.
struct Listed {
    path: PathBuf,
    kind: Option<usize>,
    bytes: u64,
    modified: std::time::SystemTime,
}

impl KernelCache {
    /// Every entry and partial entry in the directory (nothing when it does not exist yet); other
    /// files are not the cache's and are left alone.
    fn list(&self) -> Result<Vec<Listed>, String> {
        let dir = match std::fs::read_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("kernel cache {}: {e}", self.dir.display())),
        };
        let mut files = Vec::new();
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // An entry is `<key>.<kind>`; a partial one a hidden `.<key>.<...>` (`.<key>.<random>.so`,
            // `.<key>.ptx.<random>`).
            let keyed = |n: &str| {
                n.len() > 65 && n.as_bytes()[..64].iter().all(u8::is_ascii_hexdigit) && n.as_bytes()[64] == b'.'
            };
            let kind = match name.strip_prefix('.') {
                Some(rest) if keyed(rest) => None,
                Some(_) => continue,
                None if keyed(&name) => match KINDS.iter().position(|k| name[65..] == **k) {
                    Some(k) => Some(k),
                    None => continue,
                },
                None => continue,
            };
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            files.push(Listed { path: e.path(), kind, bytes: meta.len(), modified });
        }
        Ok(files)
    }

    /// What the cache holds.
    pub fn usage(&self) -> Result<Usage, String> {
        let mut usage = Usage::default();
        for f in self.list()? {
            match f.kind {
                Some(k) => {
                    usage.entries[k] += 1;
                    usage.bytes[k] += f.bytes;
                }
                None => usage.partial += 1,
            }
        }
        Ok(usage)
    }

    /// Removes the least recently used entries until the rest take at most `max_bytes`, and
    /// partial entries abandoned for a day. An entry another process has loaded stays mapped there;
    /// one it is about to load becomes a miss and is made again.
    pub fn trim(&self, max_bytes: u64) -> Result<Removed, String> {
        self.trim_sparing(max_bytes, std::time::Duration::ZERO)
    }

    /// As [`KernelCache::trim`], sparing the entries used within `recent` (they may be some running
    /// compiler's, about to be copied into its artifact): the cache may stay over `max_bytes` for
    /// that long.
    pub fn trim_sparing(&self, max_bytes: u64, recent: std::time::Duration) -> Result<Removed, String> {
        let mut files = self.list()?;
        let now = std::time::SystemTime::now();
        let mut removed = Removed::default();
        let remove = |f: &Listed| match std::fs::remove_file(&f.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("kernel cache: cannot remove {}: {e}", f.path.display())),
        };
        for f in files.iter().filter(|f| f.kind.is_none()) {
            if now.duration_since(f.modified).is_ok_and(|age| age > ABANDONED) && remove(f)? {
                removed.partial += 1;
            }
        }
        files.retain(|f| f.kind.is_some());
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        // Oldest first; the path orders entries used at the same instant, so trimming is
        // deterministic.
        files.sort_by(|a, b| a.modified.cmp(&b.modified).then_with(|| a.path.cmp(&b.path)));
        for f in &files {
            if total <= max_bytes || now.duration_since(f.modified).map_or(true, |age| age < recent) {
                break;
            }
            total -= f.bytes;
            if remove(f)? {
                removed.entries += 1;
                removed.bytes += f.bytes;
            }
        }
        Ok(removed)
    }

    /// Removes every entry, and every partial entry (a compiler writing one then fails to store
    /// it, and makes it again next time).
    pub fn clear(&self) -> Result<Removed, String> {
        let mut removed = Removed::default();
        for f in self.list()? {
            match std::fs::remove_file(&f.path) {
                Ok(()) if f.kind.is_some() => {
                    removed.entries += 1;
                    removed.bytes += f.bytes;
                }
                Ok(()) => removed.partial += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("kernel cache: cannot remove {}: {e}", f.path.display())),
            }
        }
        Ok(removed)
    }
}

/// The size the cache is held to: `V3C_KERNEL_CACHE_MAX` (bytes, or with a unit: `500M`, `2G`,
/// `1.5GiB`; `unlimited` for no limit), else [`DEFAULT_MAX_BYTES`]. None: no limit.
pub fn max_bytes_from_env() -> Result<Option<u64>, String> {
    match std::env::var("V3C_KERNEL_CACHE_MAX") {
        Err(_) => Ok(Some(DEFAULT_MAX_BYTES)),
        Ok(v) if v.trim().is_empty() => Ok(Some(DEFAULT_MAX_BYTES)),
        Ok(v) if v.trim() == "unlimited" => Ok(None),
        Ok(v) => parse_size(&v).map(Some).map_err(|e| format!("V3C_KERNEL_CACHE_MAX={v}: {e}")),
    }
}

/// The size limit as `v3c cache` and `v3c doctor` state it.
pub fn limit_text() -> Result<String, String> {
    Ok(match max_bytes_from_env()? {
        Some(max) => format!("held to {} (V3C_KERNEL_CACHE_MAX)", mib(max)),
        None => "no size limit (V3C_KERNEL_CACHE_MAX=unlimited)".into(),
    })
}

/// A size in bytes: a number with an optional unit (`K`, `M`, `G`, `T`, powers of 1024, with or
/// without `iB`/`B`; case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("unknown unit '{unit}' (use K, M, G or T)")),
    };
    let value: f64 =
        number.parse().map_err(|_| "not a size (a number of bytes, or with a unit: 500M, 2G, 1.5GiB)".to_string())?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err("too large".into());
    }
    Ok(bytes as u64)
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

    /// A 64-digit key like the cache's own, from `n`.
    fn key(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// Sets the modification time of `path` to `secs` seconds after the epoch.
    fn age(path: &Path, secs: u64) {
        let file = std::fs::File::options().append(true).open(path).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).unwrap();
    }

    #[test]
    fn trimming_removes_the_least_recently_used_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        assert_eq!(cache.usage().unwrap(), Usage::default(), "a cache not made yet is empty");
        // Four entries of 1,000 bytes of PTX (plus the entry's header), used at times 40, 10, 30, 20.
        let ptx = "p".repeat(1000);
        for (n, at) in [(1, 40), (2, 10), (3, 30), (4, 20)] {
            cache.store_ptx(&key(n), &ptx).unwrap();
            age(&cache.ptx_path(&key(n)), 1_000_000 + at);
        }
        let entry = std::fs::metadata(cache.ptx_path(&key(1))).unwrap().len();
        // Files that are not the cache's are neither counted nor removed.
        for foreign in ["notes.txt", "short.ptx", &format!("{}.txt", key(5)), &format!(".{}", key(6))] {
            std::fs::write(dir.path().join(foreign), "x").unwrap();
        }
        let usage = cache.usage().unwrap();
        assert_eq!((usage.entries, usage.total_bytes(), usage.partial), ([0, 4, 0], 4 * entry, 0));
        assert_eq!(usage.to_string(), "0 CPU kernels, 4 PTX, 0 cubins, 0.0 MiB");
        // Used since: entry 2 is now the most recent.
        assert!(cache.load_ptx(&key(2)).is_some());
        // Room for two and a half: the two used longest ago (4, then 3) go.
        let removed = cache.trim(2 * entry + entry / 2).unwrap();
        assert_eq!(removed, Removed { entries: 2, bytes: 2 * entry, partial: 0 });
        let left = |c: &KernelCache| [1, 2, 3, 4].map(|n| c.ptx_path(&key(n)).exists());
        assert_eq!(left(&cache), [true, true, false, false]);
        // Within the size already: nothing goes.
        assert_eq!(cache.trim(2 * entry).unwrap(), Removed::default());
        assert_eq!(cache.trim(2 * entry - 1).unwrap().entries, 1);
        assert_eq!(left(&cache), [false, true, false, false]);
        // Entries used within the spared time stay, over the size or not.
        cache.store_ptx(&key(7), &ptx).unwrap();
        age(&cache.ptx_path(&key(2)), 1_000_000);
        let spared = cache.trim_sparing(0, std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!(spared.entries, 1, "entry 2, used long ago, goes; entry 7, made now, stays");
        assert!(cache.ptx_path(&key(7)).exists() && !cache.ptx_path(&key(2)).exists());
        assert_eq!(cache.trim(0).unwrap().entries, 1);
        assert_eq!(cache.usage().unwrap().total_entries(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4, "the foreign files stay");
    }

    #[test]
    fn abandoned_partial_entries_are_removed_and_clearing_empties_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        cache.store_cubin(&key(1), b"\x7fELF", "log").unwrap();
        cache.store_ptx(&key(2), "ptx").unwrap();
        std::fs::write(cache.path(&key(3)), b"a shared object").unwrap();
        // Partial entries as the stores name them: one being written now, one from a day ago.
        let (fresh, old) =
            (dir.path().join(format!(".{}.ptx.a1b2c3", key(4))), dir.path().join(format!(".{}.x9.so", key(5))));
        for p in [&fresh, &old] {
            std::fs::write(p, "partial").unwrap();
        }
        age(&old, 0);
        let usage = cache.usage().unwrap();
        assert_eq!((usage.entries, usage.partial), ([1, 1, 1], 2));
        let removed = cache.trim(u64::MAX).unwrap();
        assert_eq!(removed, Removed { entries: 0, bytes: 0, partial: 1 });
        assert!(fresh.exists() && !old.exists());
        let removed = cache.clear().unwrap();
        assert_eq!((removed.entries, removed.partial), (3, 1));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        for (text, bytes) in [
            ("0", 0),
            ("1234", 1234),
            ("4K", 4096),
            ("500M", 500 << 20),
            ("2G", 2 << 30),
            ("2g", 2 << 30),
            ("1.5GiB", 3 << 29),
            ("3 MB", 3 << 20),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "M", "-1", "5Q", "1e3", "2GG", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
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
