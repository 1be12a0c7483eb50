//! Random checkpoints in the Hugging Face layout, for tests and demos (`v3c init-weights`).
//!
//! Writes `config.json` (hub spelling) and `model.safetensors` holding every parameter the model's
//! graphs use, including the MTP module when the config has one; with `fp8`, every attention and
//! MLP/expert projection is stored as F8_E4M3 with `weight_scale_inv` block scales. Output goes to a
//! temporary sibling directory first and is renamed into place at the end: an error leaves nothing.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::config::{Fp8Quantization, ModelConfig};
use crate::deepseek_v3::{build, BuildOptions, Entry};
use crate::dtype::{f32_to_bf16, f32_to_f8e4m3, DType, F8E4M3_MAX};
use crate::graph::WeightFormat;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{path}: {problem}")]
    Io { path: String, problem: String },
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
}

/// A small deterministic normal generator (splitmix64 + Box-Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// The config with fp8 block-scaled projections switched on (weight block 128 x 128).
pub fn with_fp8(config: &ModelConfig) -> ModelConfig {
    let mut c = config.clone();
    c.quantization = Some(Fp8Quantization { weight_block: [128, 128] });
    c
}

/// Block-scaled e4m3 quantization of a [rows, cols] weight: (bits, weight_scale_inv).
pub fn quantize_weight(w: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    let (br, bc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let mut scale = vec![0.0f32; br * bc];
    for (i, v) in w.iter().enumerate() {
        let s = &mut scale[(i / cols / block[0]) * bc + (i % cols) / block[1]];
        *s = s.max(v.abs());
    }
    scale.iter_mut().for_each(|s| *s = s.max(1e-12) / F8E4M3_MAX);
    let bits = w
        .iter()
        .enumerate()
        .map(|(i, v)| f32_to_f8e4m3(v / scale[(i / cols / block[0]) * bc + (i % cols) / block[1]]))
        .collect();
    (bits, scale)
}

/// Writes a random checkpoint of `config` to `out` (which must not exist).
pub fn write_random_checkpoint(config: &ModelConfig, out: &Path, seed: u64) -> Result<usize, InitError> {
    let io =
        |path: &Path, e: std::io::Error| InitError::Io { path: path.display().to_string(), problem: e.to_string() };
    if out.exists() {
        return Err(InitError::Io {
            path: out.display().to_string(),
            problem: "already exists (choose a new directory)".into(),
        });
    }
    let graph = build(config, Entry::Prefill, &BuildOptions::default())?;
    let mut rng = Normal(seed);
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, ty, format, _) in graph.params() {
        let shape: Vec<usize> = ty.shape.iter().map(|d| d.clone().fixed().unwrap_or(0)).collect();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.sample()).collect()
        } else if name.ends_with("e_score_correction_bias") {
            (0..n).map(|_| 0.1 * rng.sample()).collect()
        } else if name.ends_with("embed_tokens.weight") {
            (0..n).map(|_| rng.sample()).collect()
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f32;
            (0..n).map(|_| rng.sample() * 0.5 / fan_in.sqrt()).collect()
        };
        match format {
            WeightFormat::Dense(DType::F32) => {
                tensors.insert(name.into(), (Dtype::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
            }
            WeightFormat::Dense(_) => {
                let bytes = values.iter().flat_map(|v| f32_to_bf16(*v).to_le_bytes()).collect();
                tensors.insert(name.into(), (Dtype::BF16, shape, bytes));
            }
            WeightFormat::Fp8Block { block } => {
                let (bits, scale) = quantize_weight(&values, shape[0], shape[1], block);
                let sshape = vec![shape[0].div_ceil(block[0]), shape[1].div_ceil(block[1])];
                tensors.insert(
                    format!("{name}_scale_inv"),
                    (Dtype::F32, sshape, scale.iter().flat_map(|v| v.to_le_bytes()).collect()),
                );
                tensors.insert(name.into(), (Dtype::F8_E4M3, shape, bits));
            }
        }
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    let result = (|| {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, (d, s, b))| TensorView::new(*d, s.clone(), b).map(|v| (k.clone(), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| InitError::Io { path: staging.display().to_string(), problem: format!("{e}") })?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let file = staging.join("model.safetensors");
        safetensors::tensor::serialize_to_file(views, Some(meta), &file)
            .map_err(|e| InitError::Io { path: file.display().to_string(), problem: format!("{e}") })?;
        let cfg = staging.join("config.json");
        let text = serde_json::to_string_pretty(&config.to_hf_json()).unwrap_or_default();
        std::fs::write(&cfg, text + "\n").map_err(|e| io(&cfg, e))?;
        std::fs::rename(&staging, out).map_err(|e| io(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|_| tensors.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Model;
    use crate::Precision;

    #[test]
    fn random_checkpoints_load_and_run_in_both_storages() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        for (name, config) in [("bf16", tiny.clone()), ("fp8", with_fp8(&tiny))] {
            let out = dir.path().join(name);
            write_random_checkpoint(&config, &out, 7).unwrap();
            let model = Model::open(&out, Precision::F32).unwrap();
            assert_eq!(model.config.quantization, config.quantization);
            assert!(model.has_mtp);
            let l = model.logits(&[0, 5, 17, 300], 0).unwrap();
            assert_eq!(l.logits.shape, vec![4, 320]);
            assert_eq!(l.mtp_logits.unwrap().shape, vec![3, 320]);
            assert!(l.logits.as_f32().unwrap().iter().all(|v| v.is_finite()));
        }
        let again = write_random_checkpoint(&tiny, &dir.path().join("bf16"), 7).unwrap_err();
        assert!(again.to_string().ends_with("already exists (choose a new directory)"), "{again}");
    }

    #[test]
    fn weight_quantization_round_trips_within_fp8_precision() {
        let w: Vec<f32> = (0..200 * 130).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let (bits, scale) = quantize_weight(&w, 200, 130, [128, 128]);
        assert_eq!(scale.len(), 2 * 2);
        let t = crate::tensor::Tensor::f8_block([200, 130], bits, scale, [128, 128]);
        for (a, b) in t.as_f32().unwrap().iter().zip(&w) {
            assert!((a - b).abs() <= b.abs() / 16.0 + 1e-6, "{a} vs {b}");
        }
    }
}
