//! End-to-end use of the reference interpreter on a checkpoint: logits for a token sequence
//! (`v3c logits --backend reference`) and generation with the latent KV cache (`v3c run`).
//!
//! A session builds the `prefill` and `decode` graphs once, loads the weights once, and keeps one
//! latent cache per layer: prefill fills rows 0..T, each decode step writes row `position`.
//! MTP: logits include `mtp_logits` when the checkpoint holds the MTP module (a config that declares
//! one without its weights, as transformers writes, runs without it and says so at info level).

use std::collections::HashMap;
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::deepseek_v3::{build, BuildOptions, Entry, Precision};
use crate::graph::Graph;
use crate::interp::{InterpError, Interpreter};
pub use crate::sampling::{Sampler, Shaping};
use crate::tensor::Tensor;

/// Logits of a prefill.
#[derive(Debug, Clone)]
pub struct Logits {
    /// [T, vocab]
    pub logits: Tensor,
    /// [T - 1, vocab], row i predicting token i + 2, when the checkpoint has an MTP module.
    pub mtp_logits: Option<Tensor>,
}

/// A model loaded for the reference interpreter.
pub struct Model {
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    pub has_mtp: bool,
    pub precision: Precision,
}

/// Errors of the reference path: config, checkpoint or evaluation, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error("{0}")]
    Invalid(String),
}

impl Model {
    /// Opens `dir` (config.json + safetensors).
    pub fn open(dir: &Path, precision: Precision) -> Result<Model, ReferenceError> {
        let config = ModelConfig::from_path(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        let declared = config.num_nextn_predict_layers > 0;
        let has_mtp = declared && checkpoint.has_layer(config.num_hidden_layers);
        if declared && !has_mtp {
            tracing::info!(
                "{}: config declares an MTP module but the checkpoint has no model.layers.{}.* tensors: running without MTP",
                dir.display(),
                config.num_hidden_layers
            );
        }
        Ok(Model { config, checkpoint, has_mtp, precision })
    }

    fn graph(&self, entry: Entry, mtp: bool) -> Result<Graph, ReferenceError> {
        let options = BuildOptions { precision: self.precision, skip_mtp: !mtp, ..Default::default() };
        Ok(build(&self.config, entry, &options)?)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ReferenceError> {
        if tokens.is_empty() {
            return Err(ReferenceError::Invalid("no tokens given".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ReferenceError::Invalid(format!(
                "token id {t} is outside the vocabulary of {} (0..{})",
                self.config.name, self.config.vocab_size
            )));
        }
        Ok(())
    }

    fn empty_caches(&self, graph: &Graph, inputs: &mut HashMap<String, Tensor>) {
        for (name, _) in &graph.inputs {
            if name.starts_with("kv_cache.") {
                inputs.insert(name.clone(), Tensor::zeros(vec![0, self.config.cache_dim()]));
            }
        }
    }

    /// Logits of one sequence from position `first_position` (prefill of an empty cache).
    pub fn logits(&self, tokens: &[u32], first_position: i64) -> Result<Logits, ReferenceError> {
        self.check_tokens(tokens)?;
        let interp = Interpreter::new(self.graph(Entry::Prefill, self.has_mtp)?, &self.checkpoint)?;
        let t = tokens.len();
        let mut inputs = HashMap::new();
        inputs.insert("tokens".into(), ids(tokens.iter().map(|&x| x as i64)));
        inputs.insert("positions".into(), ids((0..t as i64).map(|i| i + first_position)));
        self.empty_caches(interp.graph(), &mut inputs);
        let mut wanted = vec!["logits"];
        if self.has_mtp {
            // Row i of the MTP module sees token i + 1; the last row has no next token and is dropped.
            let next = tokens[1..].iter().map(|&x| x as i64).chain([0]);
            inputs.insert("mtp_tokens".into(), ids(next));
            wanted.push("mtp_logits");
        }
        let mut out = interp.run(&inputs, &wanted)?;
        let logits = out.remove("logits").expect("requested");
        let mtp_logits = out.remove("mtp_logits").map(|m| first_rows(&m, t - 1));
        Ok(Logits { logits, mtp_logits })
    }

    /// A generation session over this model.
    pub fn session(&self, max_len: usize) -> Result<Session<'_>, ReferenceError> {
        Session::new(self, max_len)
    }
}

fn ids(values: impl Iterator<Item = i64>) -> Tensor {
    let v: Vec<i64> = values.collect();
    Tensor::i64(vec![v.len()], v)
}

fn first_rows(t: &Tensor, rows: usize) -> Tensor {
    let width = t.shape[1];
    Tensor::f32(vec![rows, width], t.as_f32().expect("f32 logits")[..rows * width].to_vec())
}

/// One sequence being generated: prefill once, then one decode step per token.
pub struct Session<'m> {
    model: &'m Model,
    prefill: Interpreter,
    decode: Interpreter,
    /// Per layer name: [1, max_len, C] latent caches for decode.
    caches: HashMap<String, Tensor>,
    position: usize,
    max_len: usize,
}

impl<'m> Session<'m> {
    fn new(model: &'m Model, max_len: usize) -> Result<Session<'m>, ReferenceError> {
        Ok(Session {
            model,
            prefill: Interpreter::new(model.graph(Entry::Prefill, false)?, &model.checkpoint)?,
            decode: Interpreter::new(model.graph(Entry::Decode, false)?, &model.checkpoint)?,
            caches: HashMap::new(),
            position: 0,
            max_len,
        })
    }

    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Runs the prompt; returns the logits of its last token `[vocab]`.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ReferenceError> {
        self.model.check_tokens(tokens)?;
        if tokens.len() > self.max_len {
            return Err(ReferenceError::Invalid(format!(
                "prompt of {} tokens exceeds the session length {}",
                tokens.len(),
                self.max_len
            )));
        }
        let t = tokens.len();
        let mut inputs = HashMap::new();
        inputs.insert("tokens".into(), ids(tokens.iter().map(|&x| x as i64)));
        inputs.insert("positions".into(), ids(0..t as i64));
        self.model.empty_caches(self.prefill.graph(), &mut inputs);
        let cache_names: Vec<String> = self
            .prefill
            .graph()
            .outputs
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n.starts_with("kv_cache."))
            .collect();
        let mut wanted: Vec<&str> = vec!["logits"];
        wanted.extend(cache_names.iter().map(String::as_str));
        let out = self.prefill.run(&inputs, &wanted)?;
        let c = self.model.config.cache_dim();
        for name in &cache_names {
            let rows = out[name].as_f32().expect("f32 cache");
            let mut cache = vec![0.0f32; self.max_len * c];
            cache[..rows.len()].copy_from_slice(rows);
            self.caches.insert(name.clone(), Tensor::f32(vec![1, self.max_len, c], cache));
        }
        self.position = t;
        let logits = out["logits"].as_f32().expect("f32 logits");
        let v = self.model.config.vocab_size;
        Ok(logits[(t - 1) * v..t * v].to_vec())
    }

    /// Feeds one token at the next position; returns its logits `[vocab]`.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, ReferenceError> {
        self.model.check_tokens(&[token])?;
        if self.position >= self.max_len {
            return Err(ReferenceError::Invalid(format!("session is full ({} tokens)", self.max_len)));
        }
        let mut inputs: HashMap<String, Tensor> = self.caches.clone();
        inputs.insert("tokens".into(), ids([token as i64].into_iter()));
        inputs.insert("positions".into(), ids([self.position as i64].into_iter()));
        let names: Vec<String> = self.caches.keys().cloned().collect();
        let mut wanted: Vec<&str> = vec!["logits"];
        wanted.extend(names.iter().map(String::as_str));
        let mut out = self.decode.run(&inputs, &wanted)?;
        for name in names {
            self.caches.insert(name.clone(), out.remove(&name).expect("requested"));
        }
        self.position += 1;
        Ok(out.remove("logits").expect("requested").as_f32().expect("f32").to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{with_fp8, write_random_checkpoint};

    fn tiny(dir: &Path, fp8: bool) -> Model {
        let c = ModelConfig::preset("deepseek-v3-tiny").unwrap();
        let c = if fp8 { with_fp8(&c) } else { c };
        write_random_checkpoint(&c, &dir.join("ckpt"), 11).unwrap();
        Model::open(&dir.join("ckpt"), Precision::F32).unwrap()
    }

    #[test]
    fn prefill_then_decode_matches_one_long_prefill() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(dir.path(), false);
        session_matches_one_prefill(&model, &[3, 17, 250, 9, 44, 101, 7, 2, 66], 5);
    }

    /// A session's prefill of `tokens[..split]` then decode of the rest gives one long prefill's
    /// logits row by row (naive prefill vs absorbed decode: within 1e-4).
    fn session_matches_one_prefill(model: &Model, tokens: &[u32], split: usize) {
        let full = model.logits(tokens, 0).unwrap().logits;
        let full = full.as_f32().unwrap();
        let v = model.config.vocab_size;
        let mut session = model.session(16).unwrap();
        let mut rows = vec![session.prefill(&tokens[..split]).unwrap()];
        for &t in &tokens[split..] {
            rows.push(session.decode(t).unwrap());
        }
        // Row r of `rows` is the logits after token split - 1 + r.
        for (r, row) in rows.iter().enumerate() {
            let want = &full[(split - 1 + r) * v..(split + r) * v];
            let diff = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-4, "position {}: prefill vs decode differ by {diff}", split - 1 + r);
        }
        assert_eq!(session.position(), tokens.len());
    }

    /// DeepSeek-V3.2: decode's selection over the cache is prefill's over the prompt, so a session's
    /// rows are one long prefill's; from the 4th key on, each query drops keys.
    #[test]
    fn sparse_prefill_then_decode_matches_one_long_prefill() {
        let dir = tempfile::tempdir().unwrap();
        let c = crate::deepseek_v3::tests::v32_tiny();
        write_random_checkpoint(&c, &dir.path().join("ckpt"), 12).unwrap();
        let model = Model::open(&dir.path().join("ckpt"), Precision::F32).unwrap();
        session_matches_one_prefill(&model, &[3, 17, 250, 9, 44, 101, 7, 2, 66, 12], 2);
    }

    #[test]
    fn fp8_precision_stays_close_to_f32() {
        let dir = tempfile::tempdir().unwrap();
        let f32_model = tiny(dir.path(), true);
        let fp8_model = Model::open(&dir.path().join("ckpt"), Precision::Fp8).unwrap();
        let tokens = [1u32, 2, 3, 200, 150, 4];
        let a = f32_model.logits(&tokens, 0).unwrap().logits;
        let b = fp8_model.logits(&tokens, 0).unwrap().logits;
        let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
        let den: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        // e4m3 activations carry ~3 significant bits: a few percent, never identical.
        assert!(num / den < 0.1 && num > 0.0, "relative error {}", num / den);
    }

    #[test]
    fn bad_tokens_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(dir.path(), false);
        let e = model.logits(&[1, 320], 0).unwrap_err().to_string();
        assert_eq!(
            e,
            "token id 320 is outside the vocabulary of deepseek_v3 (0..320)".replace("deepseek_v3", &model.config.name)
        );
        assert_eq!(model.logits(&[], 0).unwrap_err().to_string(), "no tokens given");
    }
}
