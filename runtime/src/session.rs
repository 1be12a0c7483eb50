//! One generated sequence on an artifact (`cpu`, or GPU: [`Program`]): the prompt prefilled in chunks of at most the
//! prefill plan's rows (each chunk attends to the rows cached before it), then one decode step per
//! token over caches of `max_len` rows. The plans run at these sizes because they were planned for
//! larger ones ([`crate::plan::EntryPlan::bind`]). Several sequences run as one batch
//! ([`ArtifactBatch`], [`generate_batch`]): each prefilled alone, then one decode launch per step over all.
//!
//! An artifact compiled with its MTP module has MTP inputs; plain generation feeds the MTP layer the
//! next prompt token where it is known and token 0 otherwise, keeps its cache like the others, and
//! does not read its logits (speculative decoding with it is not built yet).

use std::collections::HashMap;

use crate::host::{HostBuffer, HostData};
use crate::plan::EntryPlan;

/// What a session runs its entries on: a `cpu` artifact ([`crate::cpu::CpuArtifact`]) or a GPU
/// one ([`crate::cuda::GpuArtifact`]).
pub trait Program {
    /// The plan of entry `entry`.
    fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String>;
    /// Runs entry `entry` on `inputs` (shapes within its plan's) and returns the outputs in `wanted`.
    fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String>;
    /// Milliseconds of each of `reps` runs of `entry` on `inputs` after one warm-up, outputs left
    /// where they are (the GPU times its launches with CUDA events, inputs uploaded once).
    fn time_entry(&self, entry: &str, inputs: &HashMap<String, HostBuffer>, reps: usize) -> Result<Vec<f64>, String> {
        let mut times = Vec::with_capacity(reps);
        for rep in 0..=reps {
            let start = std::time::Instant::now();
            self.run(entry, inputs, &[])?;
            if rep > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(times)
    }
}

impl Program for crate::cpu::CpuArtifact {
    fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
        crate::cpu::CpuArtifact::entry_plan(self, entry)
    }
    fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cpu::CpuArtifact::run(self, entry, inputs, wanted)
    }
}

impl Program for crate::cuda::GpuArtifact {
    fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
        crate::cuda::GpuArtifact::entry_plan(self, entry)
    }
    fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cuda::GpuArtifact::run(self, entry, inputs, wanted)
    }
    fn time_entry(&self, entry: &str, inputs: &HashMap<String, HostBuffer>, reps: usize) -> Result<Vec<f64>, String> {
        crate::cuda::GpuArtifact::time_entry(self, entry, inputs, reps)
    }
}

/// A sequence being generated.
pub struct ArtifactSession<'a> {
    program: &'a dyn Program,
    /// Cache inputs of the entries (`kv_cache.<layer>`, `kv_cache.mtp`).
    caches: Vec<String>,
    /// Width of a cache row (the latent plus the rope key).
    width: usize,
    /// The caches: `[position, width]` while prefilling, `[1, max_len, width]` once decoding.
    state: HashMap<String, HostBuffer>,
    decoding: bool,
    position: usize,
    max_len: usize,
    has_mtp: bool,
}

fn ids(v: Vec<i64>) -> HostBuffer {
    HostBuffer { shape: vec![v.len()], data: HostData::I64(v) }
}

impl<'a> ArtifactSession<'a> {
    /// A session for sequences of at most `max_len` tokens (prompt and generated).
    pub fn new(program: &'a dyn Program, max_len: usize) -> Result<ArtifactSession<'a>, String> {
        let (prefill, decode) = (program.entry_plan("prefill")?, program.entry_plan("decode")?);
        let caches: Vec<String> = prefill.bounds.keys().filter(|n| n.starts_with("kv_cache.")).cloned().collect();
        let width =
            caches.first().and_then(|c| prefill.bounds[c].last().copied()).ok_or("the prefill plan has no caches")?;
        if max_len > decode.sizes.context {
            return Err(format!(
                "{max_len} tokens (prompt + new): the artifact's decode plan holds caches of at most {} rows \
                 (compile with a larger --max-context)",
                decode.sizes.context
            ));
        }
        if decode.sizes.rows == 0 || prefill.sizes.rows == 0 {
            return Err("the artifact's plans hold no rows (compiled with --max-rows 0)".into());
        }
        let state = caches
            .iter()
            .map(|c| (c.clone(), HostBuffer { shape: vec![0, width], data: HostData::F32(Vec::new()) }))
            .collect();
        let has_mtp = prefill.bounds.contains_key("mtp_tokens");
        Ok(ArtifactSession { program, caches, width, state, decoding: false, position: 0, max_len, has_mtp })
    }

    fn last_row(out: &HashMap<String, HostBuffer>) -> Result<Vec<f32>, String> {
        let logits = out.get("logits").ok_or("the entry has no logits")?;
        match &logits.data {
            HostData::F32(v) => Ok(v[v.len() - logits.shape[1]..].to_vec()),
            _ => Err("logits are not f32".into()),
        }
    }

    fn wanted(&self) -> Vec<&str> {
        let mut w: Vec<&str> = self.caches.iter().map(String::as_str).collect();
        w.push("logits");
        w
    }

    /// Feeds the prompt (in chunks the prefill plan holds); returns the logits of its last token.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let (rows, vocab) = self.prefill_rows(tokens)?;
        Ok(rows[rows.len() - vocab..].to_vec())
    }

    /// As [`ArtifactSession::prefill`], returning the logits of every prompt token (`[tokens,
    /// vocab]` row-major) and the vocabulary size.
    pub fn prefill_rows(&mut self, tokens: &[u32]) -> Result<(Vec<f32>, usize), String> {
        if self.decoding {
            return Err("prefill after decoding started".into());
        }
        if tokens.is_empty() || self.position + tokens.len() > self.max_len {
            return Err(format!(
                "prompt of {} tokens after {} (the session holds 1..={})",
                tokens.len(),
                self.position,
                self.max_len
            ));
        }
        let plan: &EntryPlan = self.program.entry_plan("prefill")?;
        let (chunk, cached) = (plan.sizes.rows, plan.sizes.context);
        let last_start = self.position + (tokens.len().div_ceil(chunk) - 1) * chunk;
        if last_start > cached {
            return Err(format!(
                "prompt of {} tokens: its last chunk of {chunk} would follow {last_start} cached rows, the prefill \
                 plan holds {cached} (compile with a larger --max-context)",
                tokens.len()
            ));
        }
        let (mut logits, mut vocab) = (Vec::new(), 0);
        for (k, piece) in tokens.chunks(chunk).enumerate() {
            let start = self.position as i64;
            let mut inputs = std::mem::take(&mut self.state);
            inputs.insert("tokens".into(), ids(piece.iter().map(|&t| t as i64).collect()));
            inputs.insert("positions".into(), ids((start..start + piece.len() as i64).collect()));
            if self.has_mtp {
                // The MTP layer at position i reads token i + 1: known inside the prompt.
                let next = tokens.iter().skip(k * chunk + 1).map(|&t| t as i64).chain(std::iter::repeat(0));
                inputs.insert("mtp_tokens".into(), ids(next.take(piece.len()).collect()));
            }
            let mut out = self.program.run("prefill", &inputs, &self.wanted())?;
            let rows = out.get("logits").ok_or("the entry has no logits")?;
            let (HostData::F32(v), &[_, v_size]) = (&rows.data, &rows.shape[..]) else {
                return Err("logits are not f32 [tokens, vocab]".into());
            };
            vocab = v_size;
            logits.extend_from_slice(v);
            for c in &self.caches {
                let grown = out.remove(c).ok_or_else(|| format!("prefill gave no {c}"))?;
                self.state.insert(c.clone(), grown);
            }
            self.position += piece.len();
        }
        Ok((logits, vocab))
    }

    /// Feeds one token at the next position; returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, String> {
        if self.position >= self.max_len {
            return Err(format!("the session is full ({} tokens)", self.max_len));
        }
        if !self.decoding {
            // The prefilled rows into caches of max_len rows (one sequence).
            for c in &self.caches {
                let HostData::F32(rows) = &self.state[c].data else { return Err(format!("{c} is not f32")) };
                let mut full = vec![0.0f32; self.max_len * self.width];
                full[..rows.len()].copy_from_slice(rows);
                self.state.insert(
                    c.clone(),
                    HostBuffer { shape: vec![1, self.max_len, self.width], data: HostData::F32(full) },
                );
            }
            self.decoding = true;
        }
        let mut inputs = std::mem::take(&mut self.state);
        inputs.insert("tokens".into(), ids(vec![token as i64]));
        inputs.insert("positions".into(), ids(vec![self.position as i64]));
        if self.has_mtp {
            inputs.insert("mtp_tokens".into(), ids(vec![0]));
        }
        let mut out = self.program.run("decode", &inputs, &self.wanted())?;
        for c in &self.caches {
            let updated = out.remove(c).ok_or_else(|| format!("decode gave no {c}"))?;
            self.state.insert(c.clone(), updated);
        }
        self.position += 1;
        Self::last_row(&out)
    }
}

/// Several sequences generated together on a `cpu` artifact: each prompt prefilled on its own (in
/// chunks, as [`ArtifactSession`] does), then one decode launch per step over all of them — each row its
/// sequence's next token at its own position over its own cache rows. A sequence that has stopped
/// stays in the batch (its row is computed and ignored) so that the others keep their rows.
pub struct ArtifactBatch<'a> {
    program: &'a dyn Program,
    caches: Vec<String>,
    /// Per cache input: `[sequences, max_len, width]`.
    state: HashMap<String, HostBuffer>,
    positions: Vec<usize>,
    max_len: usize,
    has_mtp: bool,
}

impl<'a> ArtifactBatch<'a> {
    /// Prefills `prompts` (each on its own) for sequences of at most `max_len` tokens; returns the
    /// batch and each prompt's last logits.
    pub fn prefill(
        program: &'a dyn Program,
        prompts: &[Vec<u32>],
        max_len: usize,
    ) -> Result<(ArtifactBatch<'a>, Vec<Vec<f32>>), String> {
        let rows = program.entry_plan("decode")?.sizes.rows;
        if prompts.is_empty() || prompts.len() > rows {
            return Err(format!(
                "{} sequences: the artifact's decode plan holds 1..={rows} (compile with a larger --max-rows)",
                prompts.len()
            ));
        }
        let mut logits = Vec::new();
        let mut state: HashMap<String, HostBuffer> = HashMap::new();
        let (mut caches, mut has_mtp) = (Vec::new(), false);
        for (i, prompt) in prompts.iter().enumerate() {
            let mut one = ArtifactSession::new(program, max_len)?;
            logits.push(one.prefill(prompt).map_err(|e| format!("sequence {i}: {e}"))?);
            let width = one.width;
            (caches, has_mtp) = (one.caches.clone(), one.has_mtp);
            for c in &caches {
                let HostData::F32(rows) = &one.state[c].data else { return Err(format!("{c} is not f32")) };
                let all = state.entry(c.clone()).or_insert_with(|| HostBuffer {
                    shape: vec![prompts.len(), max_len, width],
                    data: HostData::F32(vec![0.0; prompts.len() * max_len * width]),
                });
                let HostData::F32(all) = &mut all.data else { unreachable!("made f32 above") };
                all[i * max_len * width..i * max_len * width + rows.len()].copy_from_slice(rows);
            }
        }
        let positions = prompts.iter().map(Vec::len).collect();
        Ok((ArtifactBatch { program, caches, state, positions, max_len, has_mtp }, logits))
    }

    /// Feeds `tokens[i]` to sequence i at its next position, for the sequences where `active[i]`
    /// (the others are fed again at their last position: computed, ignored); returns every
    /// sequence's logits.
    pub fn decode(&mut self, tokens: &[u32], active: &[bool]) -> Result<Vec<Vec<f32>>, String> {
        let n = self.positions.len();
        if tokens.len() != n || active.len() != n {
            return Err(format!("{} tokens and {} flags for {n} sequences", tokens.len(), active.len()));
        }
        if let Some(i) = (0..n).find(|&i| active[i] && self.positions[i] >= self.max_len) {
            return Err(format!("sequence {i} is full ({} tokens)", self.max_len));
        }
        let at: Vec<i64> = (0..n)
            .map(|i| if active[i] { self.positions[i] } else { self.positions[i].saturating_sub(1) } as i64)
            .collect();
        let mut inputs = std::mem::take(&mut self.state);
        inputs.insert("tokens".into(), ids(tokens.iter().map(|&t| t as i64).collect()));
        inputs.insert("positions".into(), ids(at));
        if self.has_mtp {
            inputs.insert("mtp_tokens".into(), ids(vec![0; n]));
        }
        let mut wanted: Vec<&str> = self.caches.iter().map(String::as_str).collect();
        wanted.push("logits");
        let mut out = self.program.run("decode", &inputs, &wanted)?;
        for c in &self.caches {
            let updated = out.remove(c).ok_or_else(|| format!("decode gave no {c}"))?;
            self.state.insert(c.clone(), updated);
        }
        for (i, p) in self.positions.iter_mut().enumerate() {
            if active[i] {
                *p += 1;
            }
        }
        let logits = out.get("logits").ok_or("the entry has no logits")?;
        let HostData::F32(v) = &logits.data else { return Err("logits are not f32".into()) };
        let vocab = logits.shape[logits.shape.len() - 1];
        Ok(v.chunks(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// Generates up to `max_new` tokens after each of `prompts` in one batch, each sequence with its own
/// sampler (`samplers[i]`), each stopping after `eos` when given. Returns each sequence's generation
/// (its prefill time is the batch's).
pub fn generate_batch(
    program: &dyn Program,
    prompts: &[Vec<u32>],
    max_new: usize,
    samplers: &mut [v3c_models::reference::Sampler],
    eos: Option<u32>,
) -> Result<Vec<Generation>, String> {
    let start = std::time::Instant::now();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new;
    let (mut batch, mut logits) = ArtifactBatch::prefill(program, prompts, max_len)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let n = prompts.len();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut active = vec![max_new > 0; n];
    let mut stopped = vec![false; n];
    let mut done_at = vec![0.0; n];
    while active.iter().any(|&a| a) {
        let mut next = vec![0u32; n];
        for i in 0..n {
            if !active[i] {
                next[i] = tokens[i].last().copied().unwrap_or(0);
                continue;
            }
            let t = samplers[i].sample(&logits[i]);
            tokens[i].push(t);
            next[i] = t;
            if Some(t) == eos || tokens[i].len() == max_new {
                (active[i], stopped[i]) = (false, Some(t) == eos);
                done_at[i] = start.elapsed().as_secs_f64();
            }
        }
        if active.iter().any(|&a| a) {
            logits = batch.decode(&next, &active)?;
        }
    }
    Ok((0..n)
        .map(|i| Generation {
            tokens: std::mem::take(&mut tokens[i]),
            stopped_at_eos: stopped[i],
            prefill_s,
            total_s: done_at[i].max(prefill_s),
        })
        .collect())
}

/// What generates a sequence: a prompt's logits, then one token's at a time.
pub trait Generator {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String>;
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String>;
}

impl Generator for ArtifactSession<'_> {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        ArtifactSession::prefill(self, tokens)
    }
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String> {
        ArtifactSession::decode(self, token)
    }
}

/// A generated sequence and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Stopped at the end-of-sequence token (which is the last of `tokens`).
    pub stopped_at_eos: bool,
    pub prefill_s: f64,
    pub total_s: f64,
}

impl Generation {
    /// Decode speed: tokens after the first (which the prefill's logits give) per second of decoding.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / (self.total_s - self.prefill_s).max(1e-9)
    }

    /// The one-line report both tools print: `generated N tokens: prefill P tokens in S s, decode R tok/s`.
    pub fn summary(&self, prompt: usize) -> String {
        format!(
            "generated {} tokens{}: prefill {prompt} tokens in {:.3} s, decode {:.2} tok/s",
            self.tokens.len(),
            if self.stopped_at_eos { " (stopped at eos)" } else { "" },
            self.prefill_s,
            self.decode_tokens_per_s()
        )
    }
}

/// Generates up to `max_new` tokens after `prompt`, each picked by `sampler`, stopping after `eos`
/// when given.
pub fn generate(
    session: &mut dyn Generator,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut v3c_models::reference::Sampler,
    eos: Option<u32>,
) -> Result<Generation, String> {
    let start = std::time::Instant::now();
    let mut logits = session.prefill(prompt)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let mut tokens = Vec::new();
    let mut stopped_at_eos = false;
    while tokens.len() < max_new {
        let token = sampler.sample(&logits);
        tokens.push(token);
        if Some(token) == eos {
            stopped_at_eos = true;
            break;
        }
        if tokens.len() < max_new {
            logits = session.decode(token)?;
        }
    }
    Ok(Generation { tokens, stopped_at_eos, prefill_s, total_s: start.elapsed().as_secs_f64() })
}
