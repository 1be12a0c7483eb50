//! Checkpoints in the Hugging Face layout: safetensors files (single, or sharded with
//! `model.safetensors.index.json`), memory-mapped; f32, bf16 and F8_E4M3 with `weight_scale_inv`.
//!
//! Opening a checkpoint parses and validates every header (through the `safetensors` crate, which
//! rejects truncated files, headers that lie about offsets and non-safetensors data) without reading
//! tensor data. [`Checkpoint::check`] matches the tensors against a graph's parameters and names the
//! tensor, what was expected and what was found. Tensors the graph does not use are reported at
//! debug level. Loading converts to the interpreter's [`Tensor`]: dense weights to f32, fp8 weights
//! to bits + block scales (+ dequantized values).
//!
//! Name fallbacks: the MTP module's own `embed_tokens` / `shared_head.head` may be absent; the main
//! model's `model.embed_tokens.weight` / `lm_head.weight` are used instead ([`fallback_name`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::dtype::{bf16_to_f32, DType};
use crate::graph::{Graph, TensorType, WeightFormat};
use crate::tensor::Tensor;

/// A checkpoint problem; every variant names the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error("{path}: not a valid safetensors file: {problem}")]
    Format { path: String, problem: String },
    #[error("{dir}: missing tensor '{name}' (expected {expected})")]
    Missing { dir: String, name: String, expected: String },
    #[error("{file}: tensor '{name}': expected {expected}, found {found}")]
    Mismatch { file: String, name: String, expected: String, found: String },
}

struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range of the data within the file.
    start: usize,
    end: usize,
}

/// An opened, validated checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    tensors: BTreeMap<String, TensorEntry>,
}

/// The name to try when `name` is absent from a checkpoint (MTP modules may share the main
/// model's embedding and head).
pub fn fallback_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.layers.")?;
    let (_, tail) = rest.split_once('.')?;
    match tail {
        "embed_tokens.weight" => Some("model.embed_tokens.weight".into()),
        "shared_head.head.weight" => Some("lm_head.weight".into()),
        _ => None,
    }
}

/// Block size of fp8 weights loaded where dense values are wanted (DeepSeek-V3's 128 x 128).
const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Checkpoint {
    /// Opens `dir`: `model.safetensors.index.json` when present, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let file_err =
            |path: &Path, problem: String| CheckpointError::File { path: path.display().to_string(), problem };
        if !dir.is_dir() {
            return Err(file_err(dir, "not a checkpoint directory".into()));
        }
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, format!("cannot read: {e}")))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_err(&index, "no \"weight_map\" object".into()))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| file_err(&index, format!("weight_map[\"{tensor}\"] is not a file name")))?;
                if file.contains('/') || file.contains("..") {
                    return Err(file_err(
                        &index,
                        format!("weight_map[\"{tensor}\"] = \"{file}\" leaves the directory"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            for n in &names {
                if !dir.join(n).is_file() {
                    return Err(file_err(&index, format!("names shard \"{n}\", which does not exist")));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| file_err(dir, format!("cannot list: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(file_err(dir, "no *.safetensors files and no model.safetensors.index.json".into()));
            }
            found
        };
        let mut checkpoint = Checkpoint { dir: dir.to_path_buf(), files: Vec::new(), tensors: BTreeMap::new() };
        for path in files {
            checkpoint.add_file(&path)?;
        }
        Ok(checkpoint)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), CheckpointError> {
        let shown = path.display().to_string();
        let file = File::open(path)
            .map_err(|e| CheckpointError::File { path: shown.clone(), problem: format!("cannot open: {e}") })?;
        // SAFETY: the map is read-only; checkpoint files are not modified while a process reads
        // them (the same contract every safetensors loader has).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| CheckpointError::File { path: shown.clone(), problem: format!("cannot map: {e}") })?;
        let parsed = SafeTensors::deserialize(&map)
            .map_err(|e| CheckpointError::Format { path: shown.clone(), problem: format!("{e}") })?;
        let base = map.as_ptr() as usize;
        let index = self.files.len();
        for (name, view) in parsed.tensors() {
            let start = view.data().as_ptr() as usize - base;
            let entry = TensorEntry {
                file: index,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                start,
                end: start + view.data().len(),
            };
            if let Some(old) = self.tensors.insert(name.clone(), entry) {
                let first = self.files[old.file].0.display().to_string();
                return Err(CheckpointError::File {
                    path: shown,
                    problem: format!("tensor '{name}' is also in {first}"),
                });
            }
        }
        self.files.push((path.to_path_buf(), map));
        Ok(())
    }

    /// Opens one safetensors file on its own (e.g. a file of expected outputs).
    pub fn open_file(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut checkpoint = Checkpoint { dir, files: Vec::new(), tensors: BTreeMap::new() };
        checkpoint.add_file(path)?;
        Ok(checkpoint)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The stored tensor `name` resolves to (itself or its fallback): its stored name, the file that
    /// holds it, its shape and its safetensors dtype name (`BF16`, `F32`, `F8_E4M3`).
    pub fn describe(&self, name: &str) -> Option<(String, String, Vec<usize>, String)> {
        let (stored, e) = self.resolve(name)?;
        Some((stored, self.file_of(e), e.shape.clone(), dtype_name(e.dtype)))
    }

    /// Does the checkpoint hold any tensor of decoder layer `layer` (e.g. the MTP module)?
    pub fn has_layer(&self, layer: usize) -> bool {
        let prefix = format!("model.layers.{layer}.");
        self.tensors.range(prefix.clone()..).next().is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    /// The stored name for `name` (itself or its fallback).
    fn resolve<'a>(&'a self, name: &str) -> Option<(String, &'a TensorEntry)> {
        if let Some(e) = self.tensors.get(name) {
            return Some((name.to_string(), e));
        }
        let alt = fallback_name(name)?;
        self.tensors.get(&alt).map(|e| (alt, e))
    }

    fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.files[e.file].1[e.start..e.end]
    }

    /// A tensor's bytes as stored (the MTP module's fallbacks resolved), with its safetensors dtype
    /// (`F8_E4M3`, `BF16`, `F32`, ...) and shape: for loaders that take data as it is stored (the GPU
    /// runtime uploads e4m3 bits, their scales and bf16 tensors without converting them).
    pub fn raw(&self, name: &str) -> Option<(&[u8], String, &[usize])> {
        let (_, e) = self.resolve(name)?;
        Some((self.bytes(e), dtype_name(e.dtype), &e.shape))
    }

    fn file_of(&self, e: &TensorEntry) -> String {
        self.files[e.file].0.display().to_string()
    }

    /// Checks one parameter; returns the stored name it resolves to.
    fn check_param(&self, name: &str, ty: &TensorType, format: WeightFormat) -> Result<String, CheckpointError> {
        let shape: Vec<usize> = ty.shape.iter().map(|d| d.clone().fixed().unwrap_or(0)).collect();
        let expected = match format {
            WeightFormat::Dense(_) => format!("{shape:?} F32 or BF16"),
            WeightFormat::Fp8Block { block } => format!("{shape:?} F8_E4M3 with {block:?} block scales"),
        };
        let Some((stored, e)) = self.resolve(name) else {
            return Err(CheckpointError::Missing { dir: self.dir.display().to_string(), name: name.into(), expected });
        };
        let mismatch = |found: String| CheckpointError::Mismatch {
            file: self.file_of(e),
            name: stored.clone(),
            expected: expected.clone(),
            found,
        };
        let found = format!("{:?} {}", e.shape, dtype_name(e.dtype));
        if e.shape != shape {
            return Err(mismatch(found));
        }
        match format {
            WeightFormat::Dense(_) if e.dtype == Dtype::F8_E4M3 && shape.len() == 2 => {
                // An fp8 tensor where dense values are wanted: dequantized at load with its scales.
                self.check_scales(&stored, &shape, DEFAULT_FP8_BLOCK)?;
            }
            WeightFormat::Dense(_) => {
                if !matches!(e.dtype, Dtype::F32 | Dtype::BF16) {
                    return Err(mismatch(found));
                }
            }
            WeightFormat::Fp8Block { block } => {
                if e.dtype != Dtype::F8_E4M3 {
                    return Err(mismatch(format!("{found} (the config's quantization_config says fp8)")));
                }
                self.check_scales(&stored, &shape, block)?;
            }
        }
        Ok(stored)
    }

    /// Checks that `stored`'s `weight_scale_inv` exists with one f32 per `block` of `shape`.
    fn check_scales(&self, stored: &str, shape: &[usize], block: [usize; 2]) -> Result<(), CheckpointError> {
        let scale_name = format!("{stored}_scale_inv");
        let want = vec![shape[0].div_ceil(block[0]), shape[1].div_ceil(block[1])];
        match self.tensors.get(&scale_name) {
            None => Err(CheckpointError::Missing {
                dir: self.dir.display().to_string(),
                name: scale_name,
                expected: format!("{want:?} F32"),
            }),
            Some(s) if s.dtype != Dtype::F32 || s.shape != want => Err(CheckpointError::Mismatch {
                file: self.file_of(s),
                name: scale_name,
                expected: format!("{want:?} F32"),
                found: format!("{:?} {}", s.shape, dtype_name(s.dtype)),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Checks that every parameter of `graph` is present with the right shape and dtype. Unused
    /// tensors are logged at debug level.
    pub fn check(&self, graph: &Graph) -> Result<(), CheckpointError> {
        let mut used: HashMap<String, ()> = HashMap::new();
        for (name, ty, format, _) in graph.params() {
            let stored = self.check_param(name, ty, format)?;
            if matches!(format, WeightFormat::Fp8Block { .. }) {
                used.insert(format!("{stored}_scale_inv"), ());
            }
            used.insert(stored, ());
        }
        let unused: Vec<&str> = self.tensor_names().filter(|n| !used.contains_key(*n)).collect();
        if !unused.is_empty() {
            tracing::debug!(count = unused.len(), first = unused[0], "checkpoint tensors not used by {}", graph.name);
        }
        Ok(())
    }

    /// Loads a parameter (checked as in [`Checkpoint::check`]) as an interpreter tensor.
    pub fn load(&self, name: &str, ty: &TensorType, format: WeightFormat) -> Result<Tensor, CheckpointError> {
        let stored = self.check_param(name, ty, format)?;
        let e = &self.tensors[&stored];
        let bytes = self.bytes(e);
        let fp8 = |block: [usize; 2]| {
            let s = &self.tensors[&format!("{stored}_scale_inv")];
            let scale = decode_f32(self.bytes(s), Dtype::F32);
            Tensor::f8_block([e.shape[0], e.shape[1]], bytes.to_vec(), scale, block)
        };
        match format {
            WeightFormat::Dense(_) if e.dtype == Dtype::F8_E4M3 => {
                let t = fp8(DEFAULT_FP8_BLOCK);
                Ok(Tensor::f32(e.shape.clone(), t.as_f32().unwrap_or_default().to_vec()))
            }
            WeightFormat::Dense(_) => Ok(Tensor::f32(e.shape.clone(), decode_f32(bytes, e.dtype))),
            WeightFormat::Fp8Block { block } => Ok(fp8(block)),
        }
    }

    /// Any tensor by stored name, converted to a host tensor (f32 for floats, i64 for ints).
    pub fn read(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let e = self.tensors.get(name).ok_or_else(|| CheckpointError::Missing {
            dir: self.dir.display().to_string(),
            name: name.into(),
            expected: "any tensor".into(),
        })?;
        let bytes = self.bytes(e);
        match e.dtype {
            Dtype::F32 | Dtype::BF16 => Ok(Tensor::f32(e.shape.clone(), decode_f32(bytes, e.dtype))),
            Dtype::I64 => Ok(Tensor::i64(
                e.shape.clone(),
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
            )),
            other => Err(CheckpointError::Mismatch {
                file: self.file_of(e),
                name: name.into(),
                expected: "F32, BF16 or I64".into(),
                found: dtype_name(other),
            }),
        }
    }
}

fn decode_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        _ => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    }
}

/// The safetensors dtype of a DSL dtype.
pub fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F8E4M3 => Dtype::F8_E4M3,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
    }
}

/// Writes f32/i64 host tensors to one safetensors file, atomically (a temporary sibling renamed into
/// place): on error nothing is left at `path`.
pub fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<(), CheckpointError> {
    use crate::tensor::TensorData;
    let err = |problem: String| CheckpointError::File { path: path.display().to_string(), problem };
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let (dtype, bytes) = match &t.data {
            TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            _ => return Err(err(format!("tensor '{name}': only f32/i32/i64 tensors can be saved"))),
        };
        owned.push((name.to_string(), dtype, t.shape.clone(), bytes));
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("{e}")))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let staging = path.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
    let written = safetensors::tensor::serialize_to_file(views, None, &staging)
        .map_err(|e| err(format!("cannot write: {e}")))
        .and_then(|_| std::fs::rename(&staging, path).map_err(|e| err(format!("cannot write: {e}"))));
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}
