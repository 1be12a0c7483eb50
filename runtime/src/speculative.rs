//! Greedy speculative decoding with DeepSeek-V3's MTP module, on an artifact compiled with
//! `v3c compile --speculative` (entries `prefill` and `draft`; the main entries output their
//! final-normed hidden state, `hidden`, which the MTP module reads).
//!
//! One sequence, every step in the prefill form (caches `[rows, 576]` that a step appends to):
//! 1. the prompt is prefilled; its last logits give token x; the draft entry fills the MTP cache for
//!    every prompt position (hidden state i with token i + 1, the last one with x) and drafts d, the
//!    token after x.
//! 2. a verify step prefills [x, d]: if the main model's token after x is d, d is accepted and the
//!    logits after d give one more token y — two tokens for one pass of the main model; else its own
//!    token replaces d and d's cache rows are dropped. The draft entry then writes the MTP cache rows
//!    of the new positions and drafts the next token.
//!
//! Every token emitted is the main model's greedy choice after the tokens before it: the output is
//! the plain greedy generation's (up to the last-bit differences between one-token and two-token
//! prefills), whatever the drafts are. Sampling with a temperature needs the drafts' probabilities
//! (rejection sampling) and is not built: greedy only.

use std::collections::HashMap;

use crate::host::{HostBuffer, HostData};
use crate::session::{Generation, Program};

/// A speculative generation and how its drafts fared.
#[derive(Debug, Clone, PartialEq)]
pub struct Speculation {
    pub generation: Generation,
    /// Verify steps (one draft each) and the drafts the main model agreed with.
    pub drafted: usize,
    pub accepted: usize,
}

impl Speculation {
    /// `accepted / drafted`.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

/// Row vectors (logits or hidden states of consecutive positions).
type Rows = Vec<Vec<f32>>;

fn ids(v: &[i64]) -> HostBuffer {
    HostBuffer { shape: vec![v.len()], data: HostData::I64(v.to_vec()) }
}

fn f32s(b: &HostBuffer, what: &str) -> Result<Vec<f32>, String> {
    match &b.data {
        HostData::F32(v) => Ok(v.clone()),
        _ => Err(format!("{what} is not f32")),
    }
}

/// The rows of a `[n, width]` buffer, as vectors.
fn rows(b: &HostBuffer, what: &str) -> Result<Vec<Vec<f32>>, String> {
    let width = *b.shape.last().ok_or_else(|| format!("{what} has no shape"))?;
    Ok(f32s(b, what)?.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
}

/// Greedy choice, as the sampler at temperature 0 makes it.
fn greedy(logits: &[f32]) -> u32 {
    v3c_models::reference::Sampler::new(0.0, 1.0, 0).sample(logits)
}

struct Caches<'a> {
    program: &'a dyn Program,
    /// Main caches and the MTP cache, `[rows, width]` each.
    main: HashMap<String, HostBuffer>,
    mtp: HostBuffer,
    width: usize,
}

impl Caches<'_> {
    /// Prefills `tokens` at `start..` (main caches hold `start` rows) in chunks the plan holds;
    /// returns each token's logits and hidden state.
    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<(Rows, Rows), String> {
        let plan = self.program.entry_plan("prefill")?;
        let (chunk, cached) = (plan.sizes.rows.max(1), plan.sizes.context);
        let (mut logits, mut hidden) = (Vec::new(), Vec::new());
        for (k, piece) in tokens.chunks(chunk).enumerate() {
            let at = start + k * chunk;
            if at > cached {
                return Err(format!(
                    "position {at}: the prefill plan holds {cached} cached rows (compile with a larger --max-context)"
                ));
            }
            let mut inputs: HashMap<String, HostBuffer> = std::mem::take(&mut self.main);
            inputs.insert("tokens".into(), ids(&piece.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()));
            inputs.insert("positions".into(), ids(&(at as i64..(at + piece.len()) as i64).collect::<Vec<_>>()));
            let names: Vec<String> = inputs.keys().filter(|n| n.starts_with("kv_cache.")).cloned().collect();
            let mut wanted: Vec<&str> = names.iter().map(String::as_str).collect();
            wanted.extend(["logits", "hidden"]);
            let ran = self.program.run("prefill", &inputs, &wanted);
            let mut out = match ran {
                Ok(out) => out,
                Err(e) => {
                    self.main = inputs.into_iter().filter(|(n, _)| n.starts_with("kv_cache.")).collect();
                    return Err(e);
                }
            };
            for n in names {
                let grown = out.remove(&n).ok_or_else(|| format!("prefill gave no {n}"))?;
                self.main.insert(n, grown);
            }
            logits.extend(rows(out.get("logits").ok_or("prefill gave no logits")?, "logits")?);
            hidden.extend(rows(
                out.get("hidden").ok_or("prefill gave no hidden state (compile with --speculative)")?,
                "hidden",
            )?);
        }
        Ok((logits, hidden))
    }

    /// Writes the MTP cache rows of `start..` (hidden state i with the token after it) and returns
    /// each row's draft logits. Rows from `start` on are replaced.
    fn draft(&mut self, hidden: &[Vec<f32>], next: &[u32], start: usize) -> Result<Vec<Vec<f32>>, String> {
        let plan = self.program.entry_plan("draft")?;
        let (chunk, cached) = (plan.sizes.rows.max(1), plan.sizes.context);
        truncate(&mut self.mtp, start, self.width)?;
        let mut logits = Vec::new();
        for (k, (h, t)) in hidden.chunks(chunk).zip(next.chunks(chunk)).enumerate() {
            let at = start + k * chunk;
            if at > cached {
                return Err(format!(
                    "position {at}: the draft plan holds {cached} cached rows (compile with a larger --max-context)"
                ));
            }
            let d = h.first().map_or(0, Vec::len);
            let mut inputs = HashMap::new();
            inputs
                .insert("hidden".to_string(), HostBuffer { shape: vec![h.len(), d], data: HostData::F32(h.concat()) });
            inputs.insert("mtp_tokens".into(), ids(&t.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()));
            inputs.insert("positions".into(), ids(&(at as i64..(at + h.len()) as i64).collect::<Vec<_>>()));
            let empty = HostBuffer { shape: vec![0, self.width], data: HostData::F32(Vec::new()) };
            inputs.insert("kv_cache.mtp".into(), std::mem::replace(&mut self.mtp, empty));
            let ran = self.program.run("draft", &inputs, &["mtp_logits", "kv_cache.mtp"]);
            let mut out = match ran {
                Ok(out) => out,
                Err(e) => {
                    self.mtp = inputs.remove("kv_cache.mtp").unwrap_or_else(|| self.mtp.clone());
                    return Err(e);
                }
            };
            self.mtp = out.remove("kv_cache.mtp").ok_or("draft gave no kv_cache.mtp")?;
            logits.extend(rows(out.get("mtp_logits").ok_or("draft gave no mtp_logits")?, "mtp_logits")?);
        }
        Ok(logits)
    }
}

/// Keeps the first `n` rows of a `[rows, width]` cache.
fn truncate(cache: &mut HostBuffer, n: usize, width: usize) -> Result<(), String> {
    let HostData::F32(v) = &mut cache.data else { return Err("a cache is not f32".into()) };
    if n * width > v.len() {
        return Err(format!("a cache of {} rows cut to {n}", v.len() / width.max(1)));
    }
    v.truncate(n * width);
    cache.shape = vec![n, width];
    Ok(())
}

/// Generates up to `max_new` greedy tokens after `prompt` with MTP drafts verified two tokens at a
/// time (see the module doc), stopping after `eos` when given.
pub fn generate_speculative(
    program: &dyn Program,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
) -> Result<Speculation, String> {
    let prefill = program.entry_plan("prefill")?;
    let draft = program.entry_plan("draft").map_err(|_| {
        "the artifact has no draft entry: compile it with `v3c compile --speculative` (a model with an MTP module)"
            .to_string()
    })?;
    if !prefill.outputs.iter().any(|(n, _)| n == "hidden") {
        return Err("the artifact's prefill entry does not output its hidden state (compile with --speculative)".into());
    }
    let width =
        draft.bounds.get("kv_cache.mtp").and_then(|s| s.last().copied()).ok_or("the draft entry has no MTP cache")?;
    if prompt.is_empty() {
        return Err("an empty prompt".into());
    }
    let main = prefill
        .bounds
        .keys()
        .filter(|n| n.starts_with("kv_cache."))
        .map(|n| (n.clone(), HostBuffer { shape: vec![0, width], data: HostData::F32(Vec::new()) }))
        .collect();
    let mut caches =
        Caches { program, main, mtp: HostBuffer { shape: vec![0, width], data: HostData::F32(Vec::new()) }, width };
    let start = std::time::Instant::now();
    let (logits, hidden) = caches.prefill(prompt, 0)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let (mut tokens, mut stopped_at_eos) = (Vec::new(), false);
    let mut emit = |t: u32, tokens: &mut Vec<u32>| -> bool {
        tokens.push(t);
        if Some(t) == eos {
            stopped_at_eos = true;
        }
        stopped_at_eos || tokens.len() >= max_new
    };
    let (mut drafted, mut accepted) = (0, 0);
    let last = logits.last().ok_or("prefill gave no logits")?;
    let mut x = greedy(last);
    let generated = |tokens, stopped_at_eos| {
        let total_s = start.elapsed().as_secs_f64();
        Generation { tokens, stopped_at_eos, prefill_s, total_s, pages: None, queued_s: 0.0 }
    };
    if max_new == 0 || emit(x, &mut tokens) {
        return Ok(Speculation { generation: generated(tokens, stopped_at_eos), drafted, accepted });
    }
    // MTP rows of the prompt: hidden state i with token i + 1 (the last with x).
    let next: Vec<u32> = prompt[1..].iter().copied().chain([x]).collect();
    let mut d = greedy(caches.draft(&hidden, &next, 0)?.last().ok_or("draft gave no logits")?);
    let mut pos = prompt.len();
    loop {
        let (logits, hidden) = caches.prefill(&[x, d], pos)?;
        drafted += 1;
        let mine = greedy(&logits[0]);
        let drafts = if mine == d {
            accepted += 1;
            let after = greedy(&logits[1]);
            if emit(d, &mut tokens) || emit(after, &mut tokens) {
                break;
            }
            let drafts = caches.draft(&hidden, &[d, after], pos)?;
            (x, pos) = (after, pos + 2);
            drafts
        } else {
            if emit(mine, &mut tokens) {
                break;
            }
            // The draft's rows leave the main caches.
            for cache in caches.main.values_mut() {
                truncate(cache, pos + 1, width)?;
            }
            let drafts = caches.draft(&hidden[..1], &[mine], pos)?;
            (x, pos) = (mine, pos + 1);
            drafts
        };
        d = greedy(drafts.last().ok_or("draft gave no logits")?);
    }
    Ok(Speculation { generation: generated(tokens, stopped_at_eos), drafted, accepted })
}
