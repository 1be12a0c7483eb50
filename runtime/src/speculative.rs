//! Speculative decoding with DeepSeek-V3's MTP module, on an artifact compiled with
//! `v3c compile --speculative` (entries `prefill` and `draft`; the main entries output their
//! final-normed hidden state, `hidden`, which the MTP module reads).
//!
//! One sequence, every step in the prefill form (caches `[rows, 576]` that a step appends to; on a
//! program that carries outputs over — a GPU — they stay on its device between steps):
//! 1. the prompt is prefilled; its last logits give token x; the draft entry fills the MTP cache for
//!    every prompt position (hidden state i with token i + 1, the last one with x) and drafts d, the
//!    token after x.
//! 2. a verify step prefills [x, d]: if the main model accepts d ([`verify`]), the logits after d
//!    give one more token y — two tokens for one pass of the main model; else a token of its own
//!    replaces d and d's cache rows are dropped. The draft entry then writes the MTP cache rows of
//!    the new positions and drafts the next token.
//!
//! With K drafts a pass (`generate_speculative`'s `drafts`), the first is drafted as above and each
//! next one by the MTP module fed its own final-normed hidden state (`mtp_hidden`) in place of the
//! main model's, not yet computed, with the draft before it; the verify step prefills [x, d1..dK]
//! and the drafts are verified in order — the first rejected one replaced and the rest dropped, all
//! kept and one more token from the logits after dK. The chained MTP cache rows are replaced once
//! the main model's hidden states of those positions are known.
//!
//! Greedy, d is accepted when it is the main model's argmax, and every token emitted is the main
//! model's greedy choice after the tokens before it: the output is the plain greedy generation's
//! (up to the last-bit differences between one-token and two-token prefills), whatever the drafts
//! are. With a temperature (and top-p), the draft is drawn from the MTP head's distribution q and
//! kept by speculative sampling (Leviathan et al. 2023; Chen et al. 2023): with probability
//! min(1, p(d) / q(d)), else the token is drawn from max(0, p - q) renormalized — each token is
//! distributed as the main model's p after the tokens before it, as plain sampling's are (the
//! same distribution of outputs, not the same tokens for a seed: the draws differ).
//!
//! Sampling that shapes the logits by the tokens before (penalties, logit bias, `min_tokens`, a
//! grammar's constraint) holds too: p at each verified position is shaped by the sampler as the
//! tokens accepted before it left it (each token counted as it is taken), and a draft may be
//! drawn from any distribution q at all — the MTP head's, shaped by the sampler as it stood when
//! the draft was drawn (for chained drafts, before the drafts ahead of it were accepted) — as long
//! as q is the one it was drawn from: a token p does not allow (a grammar's, say) is then always
//! rejected and replaced from p.

use std::collections::HashMap;

use crate::host::{HostBuffer, HostData};
use crate::session::{Generation, Program, Speculated};
use v3c_models::reference::Sampler;

/// Row vectors (logits or hidden states of consecutive positions).
type Rows = Vec<Vec<f32>>;

fn ids(v: &[i64]) -> HostBuffer {
    HostBuffer { shape: vec![v.len()], data: HostData::I64(v.to_vec()) }
}

/// The rows of a `[n, width]` buffer, as vectors (one copy of each).
fn rows(b: &HostBuffer, what: &str) -> Result<Vec<Vec<f32>>, String> {
    let width = *b.shape.last().ok_or_else(|| format!("{what} has no shape"))?;
    let HostData::F32(v) = &b.data else { return Err(format!("{what} is not f32")) };
    Ok(v.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
}

/// Speculative sampling's verdict on a draft `d` drawn from `q`, the draft's distribution, with
/// `p` the main model's (both as [`Sampler::distribution`] gives them: (token, weight) pairs whose
/// weights need not sum to 1): `(token, accepted)`. d is kept with probability min(1, p(d) / q(d))
/// (one uniform draw); else the token is drawn from the residual max(0, p - q), renormalized. The
/// token is then distributed as p: P(x) = min(q(x), p(x)) + (1 - sum_y min(q(y), p(y))) r(x), and
/// (1 - sum min(q, p)) r(x) = max(0, p(x) - q(x)). Greedy distributions (one token, weight 1): d
/// is kept when it is p's token, else p's token replaces it.
///
/// The verdict on d needs p(d) and q(d) alone; only a rejected draft lays both distributions out
/// over the vocabulary for the residual (the same sums either way, so the same bits).
pub fn verify(p: &[(u32, f32)], q: &[(u32, f32)], d: u32, sampler: &mut Sampler) -> (u32, bool) {
    let mass = |dist: &[(u32, f32)]| dist.iter().map(|t| f64::from(t.1)).sum::<f64>();
    let (p_mass, q_mass) = (mass(p), mass(q));
    // A token's probability: its weights over their mass, summed in order.
    let of = |dist: &[(u32, f32)], mass: f64, x: u32| {
        dist.iter().filter(|t| t.0 == x).fold(0.0f64, |s, t| s + f64::from(t.1) / mass)
    };
    if sampler.uniform() * of(q, q_mass, d) < of(p, p_mass, d) {
        return (d, true);
    }
    // Both as probabilities over the tokens either names (dense: a vocabulary's worth at top-p 1).
    let tokens = p.iter().chain(q).map(|t| t.0 as usize + 1).max().unwrap_or(0).max(d as usize + 1);
    let dense = |dist: &[(u32, f32)], mass: f64| {
        let mut v = vec![0.0f64; tokens];
        for &(x, w) in dist {
            v[x as usize] += f64::from(w) / mass;
        }
        v
    };
    let (pp, qq) = (dense(p, p_mass), dense(q, q_mass));
    let residual: Vec<(u32, f32)> =
        p.iter().map(|&(x, _)| (x, (pp[x as usize] - qq[x as usize]).max(0.0) as f32)).filter(|t| t.1 > 0.0).collect();
    // Rounding can leave nothing above q where p(d) < q(d): then p itself.
    (sampler.draw(if residual.is_empty() { p } else { &residual }), false)
}

struct Caches<'a> {
    program: &'a dyn Program,
    /// Main caches and the MTP cache, `[rows, width]` each — their shapes only while the program's
    /// device holds them.
    main: HashMap<String, HostBuffer>,
    mtp: HostBuffer,
    width: usize,
    /// The program carries outputs over ([`Program::carries_outputs`]: a GPU): the caches stay on
    /// its device from step to step — a step uploads its tokens and hidden states and reads back
    /// logits and hidden states, not every cache row so far — and a rejected draft's rows are
    /// dropped there ([`Program::reclaim_rows`]).
    on_device: bool,
    /// The device holds the main caches / the MTP cache as the last run left them.
    main_held: bool,
    mtp_held: bool,
    /// The draft entry's MTP hidden states are read back (drafts chained through them).
    chain: bool,
}

/// An empty `[0, width]` cache.
fn empty(width: usize) -> HostBuffer {
    HostBuffer { shape: vec![0, width], data: HostData::F32(Vec::new()) }
}

impl<'a> Caches<'a> {
    fn new(program: &'a dyn Program, names: impl Iterator<Item = String>, width: usize) -> Caches<'a> {
        Caches {
            program,
            main: names.map(|n| (n, empty(width))).collect(),
            mtp: empty(width),
            width,
            on_device: program.carries_outputs(),
            main_held: false,
            mtp_held: false,
            chain: false,
        }
    }

    /// Runs `entry` on `inputs` with the caches `names` as `held` says, keeping them on the device
    /// where it may; returns the outputs and each cache as the host keeps it (grown to `rows`).
    fn run(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        outputs: &[&str],
        names: &[&str],
        (held, rows): (bool, usize),
    ) -> Result<(HashMap<String, HostBuffer>, Vec<HostBuffer>), String> {
        let mut wanted = outputs.to_vec();
        if !self.on_device {
            wanted.extend(names);
        }
        let carry: &[&str] = if self.on_device { names } else { &[] };
        let resident: &[&str] = if held { names } else { &[] };
        let mut out = self.program.run_carrying(entry, inputs, &wanted, resident, carry)?;
        let caches = names
            .iter()
            .map(|n| match self.on_device {
                true => Ok(HostBuffer { shape: vec![rows, self.width], data: HostData::F32(Vec::new()) }),
                false => out.remove(*n).ok_or_else(|| format!("{entry} gave no {n}")),
            })
            .collect::<Result<_, String>>()?;
        Ok((out, caches))
    }

    /// Prefills `tokens` at `start..` (main caches hold `start` rows) in chunks the plan holds;
    /// returns each token's logits (`every_row`; else the last token's alone, the only ones read
    /// back, and no chunk but the last runs the head) and hidden state.
    fn prefill(&mut self, tokens: &[u32], start: usize, every_row: bool) -> Result<(Rows, Rows), String> {
        let plan = self.program.entry_plan("prefill")?;
        let (chunk, cached) = (plan.sizes.rows.max(1), plan.sizes.context);
        let (mut logits, mut hidden) = (Vec::new(), Vec::new());
        let names: Vec<String> = self.main.keys().cloned().collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let chunks = tokens.len().div_ceil(chunk);
        let last_row = format!("logits{}", crate::plan::LAST_ROW);
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
            let read = match (every_row, k + 1 == chunks) {
                (true, _) => Some("logits"),
                (false, true) => Some(last_row.as_str()),
                (false, false) => None,
            };
            let outputs: Vec<&str> = read.into_iter().chain(["hidden", crate::plan::ONLY_WANTED]).collect();
            let (out, grown) = self.run("prefill", &inputs, &outputs, &names, (self.main_held, at + piece.len()))?;
            self.main = names.iter().map(|n| n.to_string()).zip(grown).collect();
            self.main_held = self.on_device;
            if let Some(name) = read {
                // A program that reads back whole outputs only gives every row.
                let b = out.get(name).or_else(|| out.get("logits")).ok_or("prefill gave no logits")?;
                let mut r = rows(b, "logits")?;
                if name != "logits" {
                    r.drain(..r.len().saturating_sub(1));
                }
                logits.extend(r);
            }
            hidden.extend(rows(
                out.get("hidden").ok_or("prefill gave no hidden state (compile with --speculative)")?,
                "hidden",
            )?);
        }
        Ok((logits, hidden))
    }

    /// Writes the MTP cache rows of `start..` (hidden state i with the token after it) and returns
    /// each row's draft logits and (where [`Caches::chain`]) MTP hidden state. Rows from `start`
    /// on are replaced.
    fn draft(&mut self, hidden: &[Vec<f32>], next: &[u32], start: usize) -> Result<(Rows, Rows), String> {
        let plan = self.program.entry_plan("draft")?;
        let (chunk, cached) = (plan.sizes.rows.max(1), plan.sizes.context);
        self.truncate_mtp(start)?;
        let (mut logits, mut states) = (Vec::new(), Vec::new());
        let wanted: &[&str] = if self.chain { &["mtp_logits", "mtp_hidden"] } else { &["mtp_logits"] };
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
            inputs.insert("kv_cache.mtp".into(), std::mem::replace(&mut self.mtp, empty(self.width)));
            let (out, mut grown) =
                self.run("draft", &inputs, wanted, &["kv_cache.mtp"], (self.mtp_held, at + h.len()))?;
            self.mtp = grown.pop().ok_or("draft gave no kv_cache.mtp")?;
            self.mtp_held = self.on_device;
            logits.extend(rows(out.get("mtp_logits").ok_or("draft gave no mtp_logits")?, "mtp_logits")?);
            if self.chain {
                states.extend(rows(out.get("mtp_hidden").ok_or("draft gave no mtp_hidden")?, "mtp_hidden")?);
            }
        }
        Ok((logits, states))
    }

    /// Keeps the first `n` rows of the main caches (a rejected draft's row leaves them).
    fn truncate_main(&mut self, n: usize) -> Result<(), String> {
        for (name, cache) in &mut self.main {
            truncate(self.program, name, cache, n, self.width, self.main_held)?;
        }
        Ok(())
    }

    /// Keeps the first `n` rows of the MTP cache.
    fn truncate_mtp(&mut self, n: usize) -> Result<(), String> {
        truncate(self.program, "kv_cache.mtp", &mut self.mtp, n, self.width, self.mtp_held)
    }
}

/// Keeps the first `n` rows of a `[rows, width]` cache: on the host, or where `held`, on the
/// program's device (the host keeping its shape).
fn truncate(
    program: &dyn Program,
    name: &str,
    cache: &mut HostBuffer,
    n: usize,
    width: usize,
    held: bool,
) -> Result<(), String> {
    let rows = cache.shape.first().copied().unwrap_or(0);
    if n > rows {
        return Err(format!("{name}: a cache of {rows} rows cut to {n}"));
    }
    if held {
        program.reclaim_rows(name, n)?;
    } else {
        let HostData::F32(v) = &mut cache.data else { return Err(format!("{name} is not f32")) };
        v.truncate(n * width);
    }
    cache.shape = vec![n, width];
    Ok(())
}

/// The drafts of one verify step: each token with the distribution it was drawn from.
type Drafts = Vec<(u32, Vec<(u32, f32)>)>;

/// What a speculative generation tells of each token it picks: the token and the main model's
/// logits it was picked from (the row of the position before it); it answers whether the
/// generation ends there.
pub type Emit<'e> = dyn FnMut(u32, &[f32]) -> Result<bool, String> + 'e;

/// Whether `program` can generate speculatively with `drafts` MTP drafts a pass: its MTP cache's
/// width, or why not.
pub fn check(program: &dyn Program, drafts: usize) -> Result<usize, String> {
    let prefill = program.entry_plan("prefill")?;
    let draft = program.entry_plan("draft").map_err(|_| {
        "the artifact has no draft entry: compile it with `v3c compile --speculative` (a model with an MTP module)"
            .to_string()
    })?;
    if !prefill.outputs.iter().any(|(n, _)| n == "hidden") {
        return Err("the artifact's prefill entry does not output its hidden state (compile with --speculative)".into());
    }
    if drafts == 0 {
        return Err("0 drafts a step: at least one".into());
    }
    if drafts > 1 && !draft.outputs.iter().any(|(n, _)| n == "mtp_hidden") {
        return Err(format!(
            "{drafts} drafts a step chain the MTP module through its own hidden state, which this artifact's draft \
             entry does not output (compile it again with `v3c compile --speculative`)"
        ));
    }
    draft
        .bounds
        .get("kv_cache.mtp")
        .and_then(|s| s.last().copied())
        .ok_or_else(|| "the draft entry has no MTP cache".into())
}

/// The most tokens, prompt and new ones together, a sequence generated speculatively with
/// `drafts` drafts a pass may hold on `program`: a pass writes the cache rows of its drafts
/// beyond the sequence's tokens, and each entry's chunks start within the rows its plan caches.
pub fn sequence_limit(program: &dyn Program, drafts: usize) -> Result<usize, String> {
    let cached = |entry| program.entry_plan(entry).map(|p| p.sizes.context);
    let rows = cached("prefill")?.min(cached("draft")?);
    match rows.checked_sub(drafts) {
        Some(limit) if limit > 1 => Ok(limit),
        _ => Err(format!(
            "{drafts} drafts a pass: the artifact caches {rows} rows a sequence (compile with a larger --max-context)"
        )),
    }
}

/// A sequence generated speculatively, one pass of the main model at a time: [`Speculator::start`]
/// prefills its prompt and picks its first token, each [`Speculator::pass`] verifies the drafts
/// after the token picked last and picks the tokens they give.
pub struct Speculator<'a> {
    caches: Caches<'a>,
    drafts: usize,
    /// The token picked last (its cache rows not yet written), its position and the drafts after it.
    x: u32,
    pos: usize,
    proposed: Drafts,
    /// How its drafts have fared so far.
    pub counts: Speculated,
}

/// A speculative generation's start ([`Speculator::start`]).
pub struct Started<'a> {
    /// What goes on with the generation (None: it ended at its first token).
    pub speculator: Option<Speculator<'a>>,
    /// The prompt's logits, a row a position (its last token's alone unless the start scored the
    /// prompt), and the prefill's seconds.
    pub prompt_logits: Rows,
    pub prefill_s: f64,
}

impl<'a> Speculator<'a> {
    /// Prefills `prompt` on `program`, picks the first token from its last logits with `sampler`
    /// (started on the prompt) and tells `emit`; unless that ends the generation, writes the prompt's MTP cache rows and
    /// drafts `drafts` tokens ahead (see the module doc). `score_prompt`: every prompt token's
    /// logits come back ([`Started::prompt_logits`]; else the last token's alone).
    pub fn start(
        program: &'a dyn Program,
        prompt: &[u32],
        drafts: usize,
        score_prompt: bool,
        sampler: &mut Sampler,
        emit: &mut Emit,
    ) -> Result<Started<'a>, String> {
        let width = check(program, drafts)?;
        if prompt.is_empty() {
            return Err("an empty prompt".into());
        }
        // The penalties count the prompt's tokens; a constraint starts over.
        sampler.start(prompt);
        let prefill = program.entry_plan("prefill")?;
        let names = prefill.bounds.keys().filter(|n| n.starts_with("kv_cache.")).cloned();
        let mut caches = Caches::new(program, names, width);
        caches.chain = drafts > 1;
        let start = std::time::Instant::now();
        let (prompt_logits, hidden) = caches.prefill(prompt, 0, score_prompt)?;
        let prefill_s = start.elapsed().as_secs_f64();
        let last = prompt_logits.last().ok_or("prefill gave no logits")?;
        let x = sampler.sample(last);
        if emit(x, last)? {
            return Ok(Started { speculator: None, prompt_logits, prefill_s });
        }
        // MTP rows of the prompt: hidden state i with token i + 1 (the last with x).
        let next: Vec<u32> = prompt[1..].iter().copied().chain([x]).collect();
        let pos = prompt.len();
        let first = caches_draft(&mut caches, &hidden, &next, 0)?;
        let proposed = chain(&mut caches, sampler, first, drafts, pos)?;
        let speculator = Speculator { caches, drafts, x, pos, proposed, counts: Speculated::default() };
        Ok(Started { speculator: Some(speculator), prompt_logits, prefill_s })
    }

    /// One pass of the main model over the token picked last and the drafts after it: the drafts
    /// in order, each kept or replaced (then the rest dropped), and with all kept one token more,
    /// told to `emit` until it ends the generation; then the next drafts. Returns whether it ended.
    pub fn pass(&mut self, sampler: &mut Sampler, emit: &mut Emit) -> Result<bool, String> {
        let (caches, pos) = (&mut self.caches, self.pos);
        let fed: Vec<u32> = std::iter::once(self.x).chain(self.proposed.iter().map(|d| d.0)).collect();
        let (logits, hidden) = caches.prefill(&fed, pos, true)?;
        self.counts.passes += 1;
        let mut kept = 0;
        let mut new = None;
        for (j, (d, q)) in self.proposed.iter().enumerate() {
            self.counts.drafted += 1;
            let (token, ok) = verify(&sampler.distribution(&logits[j]), q, *d, sampler);
            // Counted for the penalties and taken by the constraint before the next position's p.
            sampler.note(token);
            if emit(token, &logits[j])? {
                return Ok(true);
            }
            if !ok {
                new = Some(token);
                break;
            }
            (self.counts.accepted, kept) = (self.counts.accepted + 1, kept + 1);
        }
        let new = match new {
            Some(t) => t,
            None => {
                let row = &logits[self.proposed.len()];
                let t = sampler.sample(row);
                if emit(t, row)? {
                    return Ok(true);
                }
                t
            }
        };
        // The rejected drafts' rows leave the main caches; the MTP rows of the kept positions,
        // their chained stand-ins replaced.
        caches.truncate_main(pos + 1 + kept)?;
        let next: Vec<u32> = fed[1..=kept].iter().copied().chain([new]).collect();
        let first = caches_draft(caches, &hidden[..=kept], &next, pos)?;
        (self.x, self.pos) = (new, pos + kept + 1);
        self.proposed = chain(caches, sampler, first, self.drafts, self.pos)?;
        Ok(false)
    }
}

/// Generates up to `max_new` tokens after `prompt`, picked by `sampler` (greedy or with a
/// temperature), with `drafts` MTP drafts verified at a time (see the module doc), stopping after
/// `eos` when given.
pub fn generate_speculative(
    program: &dyn Program,
    prompt: &[u32],
    max_new: usize,
    drafts: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
) -> Result<Generation, String> {
    check(program, drafts)?;
    let start = std::time::Instant::now();
    let (mut tokens, mut stopped_at_eos) = (Vec::new(), false);
    let mut counts = Speculated::default();
    let mut prefill_s = 0.0;
    if max_new > 0 {
        let mut emit = |t: u32, _: &[f32]| -> Result<bool, String> {
            tokens.push(t);
            stopped_at_eos |= Some(t) == eos;
            Ok(stopped_at_eos || tokens.len() >= max_new)
        };
        let started = Speculator::start(program, prompt, drafts, false, sampler, &mut emit)?;
        prefill_s = started.prefill_s;
        if let Some(mut s) = started.speculator {
            while !s.pass(sampler, &mut emit)? {}
            counts = s.counts;
        }
    }
    let alone = Generation::alone(tokens, stopped_at_eos, prefill_s, start.elapsed().as_secs_f64());
    Ok(Generation { speculation: Some(counts), ..alone })
}

/// [`Caches::draft`]'s last row: its logits and (chaining) its MTP hidden state.
fn caches_draft(
    caches: &mut Caches,
    hidden: &[Vec<f32>],
    next: &[u32],
    start: usize,
) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
    let (mut logits, mut mtp_hidden) = caches.draft(hidden, next, start)?;
    Ok((logits.pop().ok_or("draft gave no logits")?, mtp_hidden.pop()))
}

/// `n` drafts: the first from `first`'s logits, each next one from the MTP module fed its own
/// hidden state (for the main model's, not yet computed) and the draft before it, at positions
/// `at..` (MTP cache rows the next verify step replaces).
fn chain(
    caches: &mut Caches,
    sampler: &mut Sampler,
    (logits, mut hidden): (Vec<f32>, Option<Vec<f32>>),
    n: usize,
    at: usize,
) -> Result<Drafts, String> {
    let q = sampler.distribution(&logits);
    let mut drafts = vec![(sampler.draw(&q), q)];
    for k in 1..n {
        let h = hidden.take().ok_or("the draft entry gave no mtp_hidden to chain drafts with")?;
        let previous = drafts[k - 1].0;
        let (logits, next_hidden) = caches_draft(caches, &[h], &[previous], at + k - 1)?;
        let q = sampler.distribution(&logits);
        drafts.push((sampler.draw(&q), q));
        hidden = next_hidden;
    }
    Ok(drafts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{EntryPlan, Sizes};
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use v3c_models::sampling::Shaping;

    const VOCAB: usize = 4;
    /// Cache rows: [token, position]; hidden states: [prefix hash, 0].
    const WIDTH: usize = 2;

    /// Folds a token into a prefix hash (below 2^24: exact in f32).
    fn fold(h: u32, t: u32) -> u32 {
        ((u64::from(h) * 31 + u64::from(t) + 1) % 16_777_213) as u32
    }

    /// The toy main model's logits after a prefix of hash `h`.
    fn main_logits(h: u32) -> Vec<f32> {
        let z = h.wrapping_mul(2_654_435_761);
        (0..VOCAB).map(|j| ((z >> (j * 5)) & 15) as f32 / 4.0).collect()
    }

    /// A model small enough to write down, with an MTP module: the main model's logits at a
    /// position follow the hash of every token so far (read back from its cache rows: wrong caches,
    /// other distributions); the draft's, the main model's after the next token shifted by what its
    /// own cache holds (drafts that are sometimes right, sometimes wrong).
    ///
    /// With a device (`device`), it keeps caches there as a GPU does: carried outputs stay, resident
    /// inputs are read there (the host giving only their shapes, no more rows than held), and it
    /// counts the cache rows given from the host.
    struct Toy {
        prefill: EntryPlan,
        draft: EntryPlan,
        device: Option<RefCell<HashMap<String, HostBuffer>>>,
        uploaded_rows: RefCell<usize>,
    }

    fn plan(name: &str, cache: &str) -> EntryPlan {
        EntryPlan {
            name: name.into(),
            sizes: Sizes::new(4, 64),
            bounds: BTreeMap::from([(cache.to_string(), vec![64, WIDTH])]),
            buffers: Vec::new(),
            launches: Vec::new(),
            outputs: vec![("hidden".to_string(), 0)],
            arena_bytes: 0,
        }
    }

    fn toy() -> Toy {
        let (prefill, mut draft) = (plan("prefill", "kv_cache.0"), plan("draft", "kv_cache.mtp"));
        draft.outputs = vec![("mtp_hidden".to_string(), 0)];
        Toy { prefill, draft, device: None, uploaded_rows: RefCell::new(0) }
    }

    fn toy_on_device() -> Toy {
        Toy { device: Some(RefCell::new(HashMap::new())), ..toy() }
    }

    fn floats(b: &HostBuffer) -> Vec<f32> {
        let HostData::F32(v) = &b.data else { panic!("not f32") };
        v.clone()
    }

    fn longs(b: &HostBuffer) -> Vec<i64> {
        let HostData::I64(v) = &b.data else { panic!("not i64") };
        v.clone()
    }

    fn matrix(rows: Vec<Vec<f32>>, width: usize) -> HostBuffer {
        HostBuffer { shape: vec![rows.len(), width], data: HostData::F32(rows.concat()) }
    }

    /// Appends `[token, position]` rows to a cache, checking the positions follow its rows.
    fn appended(cache: &HostBuffer, tokens: &[i64], positions: &[i64]) -> Result<Vec<f32>, String> {
        let mut rows = floats(cache);
        for (&t, &p) in tokens.iter().zip(positions) {
            if p as usize != rows.len() / WIDTH {
                return Err(format!("position {p} after {} cached rows", rows.len() / WIDTH));
            }
            rows.extend([t as f32, p as f32]);
        }
        Ok(rows)
    }

    impl Program for Toy {
        fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
            match entry {
                "prefill" => Ok(&self.prefill),
                "draft" => Ok(&self.draft),
                _ => Err(format!("no entry {entry}")),
            }
        }

        fn run(
            &self,
            entry: &str,
            inputs: &HashMap<String, HostBuffer>,
            _: &[&str],
        ) -> Result<HashMap<String, HostBuffer>, String> {
            for (name, b) in inputs.iter().filter(|(n, _)| n.starts_with("kv_cache.")) {
                assert_eq!(b.shape[0] * WIDTH, floats(b).len(), "{name}: a shape its rows do not fill");
            }
            let positions = longs(&inputs["positions"]);
            if entry == "prefill" {
                let tokens = longs(&inputs["tokens"]);
                let cache = appended(&inputs["kv_cache.0"], &tokens, &positions)?;
                let mut h = 0;
                let (mut logits, mut hidden) = (Vec::new(), Vec::new());
                for (i, row) in cache.chunks(WIDTH).enumerate() {
                    h = fold(h, row[0] as u32);
                    if i >= positions[0] as usize {
                        logits.push(main_logits(h));
                        hidden.push(vec![h as f32, 0.0]);
                    }
                }
                let rows = cache.len() / WIDTH;
                let cache = HostBuffer { shape: vec![rows, WIDTH], data: HostData::F32(cache) };
                return Ok(HashMap::from([
                    ("kv_cache.0".to_string(), cache),
                    ("logits".to_string(), matrix(logits, VOCAB)),
                    ("hidden".to_string(), matrix(hidden, WIDTH)),
                ]));
            }
            let tokens = longs(&inputs["mtp_tokens"]);
            let cache = appended(&inputs["kv_cache.mtp"], &tokens, &positions)?;
            let hidden = floats(&inputs["hidden"]);
            let (mut logits, mut states) = (Vec::new(), Vec::new());
            for (i, &t) in tokens.iter().enumerate() {
                let held: f32 = cache.chunks(WIDTH).take(positions[i] as usize + 1).map(|r| r[0]).sum();
                // Its own hidden state: the prefix with the token after it (what chained drafts
                // feed back for the main model's).
                let state = fold(hidden[i * WIDTH] as u32, t as u32);
                let shifted = main_logits(state);
                logits.push(shifted.iter().enumerate().map(|(j, l)| l + ((held as usize + j) % 3) as f32).collect());
                states.push(vec![state as f32, 0.0]);
            }
            let rows = cache.len() / WIDTH;
            Ok(HashMap::from([
                ("kv_cache.mtp".to_string(), HostBuffer { shape: vec![rows, WIDTH], data: HostData::F32(cache) }),
                ("mtp_logits".to_string(), matrix(logits, VOCAB)),
                ("mtp_hidden".to_string(), matrix(states, WIDTH)),
            ]))
        }

        fn carries_outputs(&self) -> bool {
            self.device.is_some()
        }

        fn run_carrying(
            &self,
            entry: &str,
            inputs: &HashMap<String, HostBuffer>,
            wanted: &[&str],
            resident: &[&str],
            carry: &[&str],
        ) -> Result<HashMap<String, HostBuffer>, String> {
            let Some(device) = &self.device else { return self.run(entry, inputs, wanted) };
            let given = inputs.iter().filter(|(n, _)| n.starts_with("kv_cache."));
            *self.uploaded_rows.borrow_mut() += given.map(|(_, b)| floats(b).len() / WIDTH).sum::<usize>();
            let mut inputs = inputs.clone();
            for name in resident {
                let held = device.borrow().get(*name).cloned().ok_or_else(|| format!("{name} not held"))?;
                let given = &inputs[*name];
                assert!(floats(given).is_empty(), "{name}: rows given for a resident input");
                if held.shape[0] > given.shape[0] {
                    return Err(format!("{name}: {} rows held, {} given", held.shape[0], given.shape[0]));
                }
                inputs.insert(name.to_string(), held);
            }
            let mut out = self.run(entry, &inputs, wanted)?;
            for name in carry {
                device.borrow_mut().insert(name.to_string(), out.remove(*name).ok_or("nothing to carry")?);
            }
            Ok(out)
        }

        fn reclaim_rows(&self, name: &str, rows: usize) -> Result<(), String> {
            let device = self.device.as_ref().ok_or("no device")?;
            let mut device = device.borrow_mut();
            let held = device.get_mut(name).ok_or_else(|| format!("{name} not held"))?;
            let HostData::F32(v) = &mut held.data else { panic!("f32") };
            assert!(rows <= held.shape[0], "{rows} rows reclaimed of {}", held.shape[0]);
            v.truncate(rows * WIDTH);
            held.shape[0] = rows;
            Ok(())
        }
    }

    /// The main model's probability of each continuation of `prompt` by `n` tokens, sampled
    /// plainly by `sampler` (its shaping too): the product of its distributions' normalized
    /// weights.
    fn plain_probabilities(prompt: &[u32], n: usize, sampler: &Sampler) -> HashMap<Vec<u32>, f64> {
        let mut paths = HashMap::from([(Vec::new(), 1.0f64)]);
        for _ in 0..n {
            let mut longer = HashMap::new();
            for (path, p) in paths {
                let h = prompt.iter().chain(&path).fold(0, |h, &t| fold(h, t));
                // Shaped as after the prompt and the path's tokens.
                let mut after = sampler.clone();
                after.start(prompt);
                path.iter().for_each(|&t| after.note(t));
                let dist = after.distribution(&main_logits(h));
                let mass: f64 = dist.iter().map(|t| f64::from(t.1)).sum();
                for (t, w) in dist {
                    let next: Vec<u32> = path.iter().copied().chain([t]).collect();
                    *longer.entry(next).or_insert(0.0) += p * f64::from(w) / mass;
                }
            }
            paths = longer;
        }
        paths
    }

    /// Greedy, the speculative tokens are plain greedy generation's, whatever the drafts, one or
    /// several a pass (chained through the MTP module's hidden state), with logits shaped by the
    /// tokens before or not — with the caches on a device too, where no cache row crosses from the
    /// host. A draft entry without its hidden state cannot chain: said.
    #[test]
    fn greedy_speculation_gives_the_greedy_tokens() {
        let toy = toy();
        let greedy = Sampler::new(0.0, 1.0, 0);
        // Shaped by the tokens before too: a penalty, a bias and a constraint; the end token 3
        // held back for 6 tokens.
        let ends = Shaping { repetition_penalty: 1.6, min_tokens: 6, ends: vec![3], ..Shaping::default() };
        let shaped_greedy = shaped(greedy.clone()).shaped(Shaping { logit_bias: vec![(1, 0.8)], ..ends });
        let cases = [(vec![1u32], 1), (vec![3, 0, 2], 1), (vec![2, 2, 2, 2, 2, 1, 0], 1), (vec![3, 0, 2], 3)];
        for ((prompt, k), sampler) in cases.into_iter().flat_map(|c| [(c.clone(), &greedy), (c, &shaped_greedy)]) {
            let g = generate_speculative(&toy, &prompt, 20, k, &mut sampler.clone(), None).unwrap();
            let on_device = toy_on_device();
            let d = generate_speculative(&on_device, &prompt, 20, k, &mut sampler.clone(), None).unwrap();
            assert_eq!((&d.tokens, d.speculation), (&g.tokens, g.speculation));
            assert_eq!(*on_device.uploaded_rows.borrow(), 0, "cache rows given from the host");
            // Plain greedy decoding, token by token.
            let (mut tokens, mut plain) = (prompt.clone(), sampler.clone());
            plain.start(&prompt);
            for _ in 0..20 {
                let h = tokens.iter().fold(0, |h, &t| fold(h, t));
                tokens.push(plain.sample(&main_logits(h)));
            }
            assert_eq!(g.tokens, tokens[prompt.len()..], "{prompt:?} {sampler:?}");
            let s = g.speculation.unwrap();
            assert!(s.drafted > 0 && s.accepted < s.drafted, "{} of {}", s.accepted, s.drafted);
            if k > 1 {
                let per_pass = s.tokens_per_pass(g.tokens.len() - 1);
                assert!(s.passes < s.drafted && per_pass > 1.0, "{} passes, {} drafts", s.passes, s.drafted);
            }
        }
        let mut unchained = super::tests::toy();
        unchained.draft.outputs.clear();
        let err = generate_speculative(&unchained, &[1], 5, 2, &mut greedy.clone(), None).unwrap_err();
        assert!(err.contains("does not output") && err.contains("v3c compile --speculative"), "{err}");
    }

    /// What [`serve_toy`] saw of a request: its tokens and scores as reported, and its end (its
    /// generation, and whether it was cancelled) or why it was refused.
    #[derive(Default)]
    struct Seen {
        tokens: Vec<u32>,
        scored: Vec<(f32, Vec<(u32, f32)>)>,
        ended: Option<(Generation, bool)>,
        refused: Option<String>,
    }

    /// An item of a serving script: once request `.0.0` has `.0.1` tokens or has ended (None: at
    /// once), a request arrives (Ok) or one is cancelled (Err: its number).
    type Scripted = (Option<(usize, usize)>, Result<crate::session::Request, usize>);

    /// Serves `script` speculatively on `toy`, `drafts` drafts a pass ([`crate::session::serve`]):
    /// what was seen of each request, in arrival order, and the cancellations refused.
    fn serve_toy(toy: &Toy, drafts: usize, script: Vec<Scripted>) -> (Vec<Seen>, Vec<usize>) {
        use crate::session::{serve, Arrival, Progress, Serving};
        let requests = script.iter().filter(|s| s.1.is_ok()).count();
        let seen = RefCell::new((0..requests).map(|_| Seen::default()).collect::<Vec<_>>());
        let mut script = script.into_iter().peekable();
        let mut next = |idle: bool| {
            let Some((when, _)) = script.peek() else { return Arrival::Closed };
            let waits = |(r, k): (usize, usize)| {
                let s = &seen.borrow()[r];
                s.tokens.len() < k && s.ended.is_none() && s.refused.is_none()
            };
            if when.is_some_and(waits) {
                assert!(!idle, "the script waits for tokens while nothing runs");
                return Arrival::NotYet;
            }
            match script.next().map(|s| s.1) {
                Some(Ok(r)) => Arrival::Request(r),
                Some(Err(id)) => Arrival::Cancel(id),
                None => Arrival::Closed,
            }
        };
        let mut refused_cancels = Vec::new();
        let mut report = |id: usize, p: Progress| -> Result<(), String> {
            if matches!(&p, Progress::Refused(e) if e.starts_with("cancel:")) {
                refused_cancels.push(id);
                return Ok(());
            }
            let mut seen = seen.borrow_mut();
            let s = &mut seen[id];
            assert!(s.ended.is_none() && s.refused.is_none(), "request {id}: a report after its end");
            match p {
                Progress::Scored(lp, top) => s.scored.push((lp, top)),
                Progress::Token(t) => s.tokens.push(t),
                Progress::Ended(g) => s.ended = Some((g, false)),
                Progress::Cancelled(g) => s.ended = Some((g, true)),
                Progress::Refused(e) => s.refused = Some(e),
            }
            Ok(())
        };
        let serving = Serving { speculative: Some(drafts), ..Serving::new(1, &[], 0, None) };
        serve(toy, &serving, &mut next, &mut report).unwrap();
        (seen.into_inner(), refused_cancels)
    }

    /// The toy main model's greedy tokens after `prompt`, `n` of them.
    fn greedy_tokens(prompt: &[u32], n: usize) -> Vec<u32> {
        let mut tokens = prompt.to_vec();
        for _ in 0..n {
            let h = tokens.iter().fold(0, |h, &t| fold(h, t));
            tokens.push(Sampler::new(0.0, 1.0, 0).sample(&main_logits(h)));
        }
        tokens.split_off(prompt.len())
    }

    /// Served speculatively, one at a time, each request gets what it would alone: greedy and
    /// sampled tokens as [`generate_speculative`] gives them (their drafts' counts too), each
    /// token's log-probability and alternatives under the main model's logits (reported before
    /// it), its prompt's scores, an end at its stop sequence — with the caches on a device too,
    /// each request starting from empty ones; a penalty shaping one's tokens as alone. Requests
    /// longer than the artifact holds are refused with the reason.
    #[test]
    fn served_speculatively_each_request_gets_its_own_generation() {
        use crate::session::{log_probability, top_log_probabilities, Ending, Request};
        let greedy = Sampler::new(0.0, 1.0, 0);
        let hot = Sampler::new(0.9, 0.9, 5);
        let expected = greedy_tokens(&[2, 2, 1], 20);
        let stop = expected[4..6].to_vec();
        let stops_at = (1..expected.len()).find(|&i| expected[i - 1..=i] == stop[..]).unwrap() + 1;
        for (k, on_device) in [(1, false), (3, false), (1, true), (3, true)] {
            let toy = if on_device { toy_on_device() } else { toy() };
            let mut scored = Request::new(vec![3, 0, 2], 12, greedy.clone());
            (scored.logprobs, scored.top_logprobs, scored.echo) = (true, 2, true);
            let mut stopping = Request::new(vec![2, 2, 1], 20, greedy.clone());
            stopping.stop = vec![stop.clone()];
            let penalized = hot.clone().shaped(Shaping { repetition_penalty: 1.3, ..Shaping::default() });
            let mut prompt_only = Request::new(vec![3, 0, 2], 0, greedy.clone());
            (prompt_only.logprobs, prompt_only.echo) = (true, true);
            let script: Vec<Scripted> = vec![
                (None, Ok(scored)),
                (None, Ok(Request::new(vec![1], 8, hot.clone()))),
                (None, Ok(stopping)),
                (None, Ok(Request::new(vec![1, 2], 4, penalized.clone()))),
                (None, Ok(Request::new(vec![1], 64, greedy.clone()))),
                (None, Ok(prompt_only)),
            ];
            let (seen, _) = serve_toy(&toy, k, script);
            let case = format!("{k} drafts, on a device: {on_device}");
            // Alone: the tokens and the drafts' counts.
            let alone = |prompt: &[u32], n: usize, sampler: &Sampler| {
                generate_speculative(&super::tests::toy(), prompt, n, k, &mut sampler.clone(), None).unwrap()
            };
            for (i, (prompt, n, sampler)) in [(vec![3, 0, 2], 12, &greedy), (vec![1], 8, &hot)].into_iter().enumerate()
            {
                let (g, cancelled) = seen[i].ended.clone().unwrap_or_else(|| panic!("{case}: request {i} did not end"));
                let a = alone(&prompt, n, sampler);
                assert!(!cancelled);
                assert_eq!((&g.tokens, g.speculation), (&a.tokens, a.speculation), "{case}: request {i}");
                assert_eq!((&seen[i].tokens, g.ending), (&a.tokens, Some(Ending::Length)), "{case}: request {i}");
            }
            assert_eq!(seen[0].tokens, greedy_tokens(&[3, 0, 2], 12), "{case}");
            // Request 0's scores: each token's under the main model's logits before it.
            let (g, _) = seen[0].ended.clone().unwrap();
            let logits_after = |tokens: &[u32]| main_logits(tokens.iter().fold(0, |h, &t| fold(h, t)));
            let sequence: Vec<u32> = [3, 0, 2].iter().chain(&g.tokens).copied().collect();
            for (i, &t) in g.tokens.iter().enumerate() {
                let row = logits_after(&sequence[..3 + i]);
                assert_eq!(g.logprobs[i], log_probability(&row, t), "{case}: token {i}");
                assert_eq!(g.top_logprobs[i], top_log_probabilities(&row, 2), "{case}: token {i}");
                assert_eq!(seen[0].scored[i], (g.logprobs[i], g.top_logprobs[i].clone()), "{case}: reported");
            }
            let prompt_scores: Vec<f32> =
                (1..3).map(|i| log_probability(&logits_after(&sequence[..i]), sequence[i])).collect();
            assert_eq!((g.prompt_logprobs, g.prompt_top_logprobs.len()), (prompt_scores.clone(), 2), "{case}");
            // Request 5 asks for no tokens, its prompt scored: none, and the same scores.
            let (g, _) = seen[5].ended.clone().unwrap();
            assert_eq!(
                (g.tokens.len(), g.ending, g.prompt_logprobs),
                (0, Some(Ending::Length), prompt_scores),
                "{case}"
            );
            assert!(seen[5].tokens.is_empty() && seen[5].scored.is_empty(), "{case}");
            assert!(seen[1].scored.is_empty() && seen[1].ended.as_ref().unwrap().0.logprobs.is_empty());
            // Request 2 ends at its stop sequence.
            let (g, _) = seen[2].ended.clone().unwrap();
            assert_eq!((g.tokens, g.ending), (expected[..stops_at].to_vec(), Some(Ending::Stop)), "{case}");
            // Request 3's penalty shapes its tokens as alone.
            let (g, _) = seen[3].ended.clone().unwrap();
            assert_eq!(g.tokens, alone(&[1, 2], 4, &penalized).tokens, "{case}");
            let refused = |i: usize| seen[i].refused.clone().unwrap_or_else(|| panic!("{case}: request {i} served"));
            assert!(
                refused(4).contains("1 + 64 tokens") && refused(4).contains(&format!("1..={}", 64 - k)),
                "{}",
                refused(4)
            );
        }
    }

    /// Cancelled while served speculatively: a waiting request leaves with no tokens, the running
    /// one with those it has (a prefix of its tokens alone) and its drafts' counts so far; the
    /// next then gets its tokens as alone; cancelling a request that has ended is refused.
    #[test]
    fn speculative_serving_cancels_waiting_and_running_requests() {
        use crate::session::Request;
        let greedy = Sampler::new(0.0, 1.0, 0);
        let script: Vec<Scripted> = vec![
            (None, Ok(Request::new(vec![3, 0, 2], 30, greedy.clone()))),
            (None, Ok(Request::new(vec![1], 5, greedy.clone()))),
            (None, Err(1)),
            (Some((0, 6)), Ok(Request::new(vec![2], 5, greedy.clone()))),
            (Some((0, 6)), Err(0)),
            (Some((2, 5)), Err(2)),
        ];
        let (seen, refused) = serve_toy(&toy(), 2, script);
        let ended = |i: usize| seen[i].ended.clone().unwrap_or_else(|| panic!("request {i} did not end"));
        assert_eq!((ended(1).0.tokens.len(), ended(1).1), (0, true));
        let (g, cancelled) = ended(0);
        assert!(cancelled && g.tokens.len() >= 6 && g.tokens.len() < 30, "{} tokens", g.tokens.len());
        assert_eq!(g.tokens, greedy_tokens(&[3, 0, 2], 30)[..g.tokens.len()]);
        assert!(g.speculation.is_some_and(|s| s.passes > 0 && s.drafted >= s.accepted), "{:?}", g.speculation);
        assert_eq!((ended(2).0.tokens, ended(2).1), (greedy_tokens(&[2], 5), false));
        assert_eq!(refused, vec![2]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Any script of requests (greedy or sampled, stop sequences, log-probabilities, no tokens
        /// at all) and cancellations (of waiting, running or ended requests), served speculatively:
        /// each request ends once, its reported tokens its generation's; one that ends gets its
        /// tokens alone up to its stop sequence, one cancelled a prefix of them.
        #[test]
        fn speculative_serving_keeps_each_request_its_own(
            drafts in 1usize..4,
            items in proptest::collection::vec(
                (proptest::collection::vec(0u32..4, 1..5), 0usize..10, proptest::option::of(0u64..50),
                 proptest::collection::vec(0u32..4, 0..3), proptest::bool::ANY,
                 proptest::option::of((0usize..8, 0usize..8, 0usize..6))),
                1..7),
        ) {
            use crate::session::{Ending, Request};
            let mut script: Vec<Scripted> = Vec::new();
            let mut requests = Vec::new();
            for (prompt, max_new, seed, stop, logprobs, cancel) in items {
                let sampler = seed.map_or(Sampler::new(0.0, 1.0, 0), |s| Sampler::new(0.9, 0.9, s));
                let mut r = Request::new(prompt, max_new, sampler);
                r.stop = vec![stop].into_iter().filter(|s| !s.is_empty()).collect();
                r.logprobs = logprobs;
                requests.push(r.clone());
                script.push((None, Ok(r)));
                // Request `which` cancelled once request `after` has `at` tokens (or has ended).
                if let Some((which, after, at)) = cancel {
                    let n = requests.len();
                    script.push((Some((after % n, at)), Err(which % (n + 1))));
                }
            }
            let (seen, _) = serve_toy(&toy(), drafts, script);
            for (i, (r, s)) in requests.iter().zip(&seen).enumerate() {
                let (g, cancelled) = s.ended.clone().unwrap_or_else(|| panic!("request {i} did not end"));
                proptest::prop_assert_eq!(&s.tokens, &g.tokens, "request {}: reported", i);
                proptest::prop_assert_eq!(g.logprobs.len(), if r.logprobs { g.tokens.len() } else { 0 });
                let alone = generate_speculative(&toy(), &r.prompt, r.max_new, drafts, &mut r.sampler.clone(), None)
                    .unwrap().tokens;
                // Alone, cut after the first stop sequence.
                let stop = r.stop.first();
                let cut = (1..=alone.len()).find(|&n| stop.is_some_and(|s| alone[..n].ends_with(s))).unwrap_or(alone.len());
                let expected = &alone[..cut];
                match cancelled {
                    true => proptest::prop_assert!(expected.starts_with(&g.tokens), "request {}: {:?} of {:?}", i, g.tokens, expected),
                    false => {
                        proptest::prop_assert_eq!(&g.tokens[..], expected, "request {}", i);
                        let how = if cut < alone.len() || (stop.is_some_and(|s| expected.ends_with(s)) && cut > 0) { Ending::Stop } else { Ending::Length };
                        proptest::prop_assert_eq!(g.ending, Some(how), "request {}", i);
                    }
                }
            }
        }
    }

    /// With a temperature and top-p, speculative sampling's continuations are distributed as plain
    /// sampling's: each 3-token continuation's frequency over 4000 seeds within 5 standard
    /// deviations of its probability — while drafts are both accepted and rejected; the caches
    /// kept on a device give the same tokens.
    #[test]
    fn sampled_speculation_draws_as_plain_sampling() {
        for k in [1, 3] {
            sampled_speculation_with(k, &Sampler::new(0.9, 0.9, 0));
            sampled_speculation_with(k, &shaped(Sampler::new(0.9, 0.9, 0)));
        }
    }

    /// `sampler` shaped by the tokens before: a presence penalty, a logit bias and a constraint
    /// (no token twice in a row).
    fn shaped(sampler: Sampler) -> Sampler {
        let shaping = Shaping { presence_penalty: 1.5, logit_bias: vec![(1, 0.8)], ..Shaping::default() };
        sampler.shaped(shaping).constrained(Box::new(NoRepeat(None)))
    }

    /// A constraint: no token twice in a row.
    #[derive(Debug, Clone)]
    struct NoRepeat(Option<u32>);

    impl v3c_models::sampling::Constraint for NoRepeat {
        fn mask(&self, logits: &mut [f32]) {
            if let Some(l) = self.0.and_then(|t| logits.get_mut(t as usize)) {
                *l = f32::NEG_INFINITY;
            }
        }
        fn advance(&mut self, token: u32) {
            self.0 = Some(token);
        }
        fn restart(&mut self) {
            self.0 = None;
        }
        fn boxed_clone(&self) -> Box<dyn v3c_models::sampling::Constraint> {
            Box::new(self.clone())
        }
    }

    /// [`sampled_speculation_draws_as_plain_sampling`] with `k` drafts a pass, picked as
    /// `settings` picks (its seed replaced).
    fn sampled_speculation_with(k: usize, settings: &Sampler) {
        let toy = toy();
        let (prompt, n, runs) = ([2u32, 0, 3], 3, 4000);
        let exact = plain_probabilities(&prompt, n, settings);
        let seeded = |seed: u64| {
            let s = Sampler::new(settings.temperature, settings.top_p, seed).shaped((*settings.shaping).clone());
            settings.constraint.as_ref().map_or(s.clone(), |c| s.constrained(c.clone()))
        };
        let mut seen: HashMap<Vec<u32>, usize> = HashMap::new();
        let (mut drafted, mut accepted) = (0, 0);
        for seed in 0..runs {
            let mut sampler = seeded(seed);
            let s = generate_speculative(&toy, &prompt, n, k, &mut sampler, None).unwrap();
            if seed % 8 == 0 {
                // The caches kept on a device: the same draws, the same tokens.
                let mut sampler = seeded(seed);
                let d = generate_speculative(&toy_on_device(), &prompt, n, k, &mut sampler, None).unwrap();
                assert_eq!(d.tokens, s.tokens, "seed {seed}");
            }
            let counts = s.speculation.unwrap();
            *seen.entry(s.tokens).or_insert(0) += 1;
            (drafted, accepted) = (drafted + counts.drafted, accepted + counts.accepted);
        }
        assert!(seen.keys().all(|k| exact.contains_key(k)), "a continuation plain sampling never gives");
        for (path, &p) in &exact {
            let f = *seen.get(path).unwrap_or(&0) as f64 / runs as f64;
            let sigma = (p * (1.0 - p) / runs as f64).sqrt();
            assert!((f - p).abs() <= 5.0 * sigma + 1e-3, "{k} drafts: {path:?}: {f} seen, {p} expected");
        }
        assert!(accepted > drafted / 10 && accepted < drafted * 9 / 10, "{accepted} of {drafted} drafts accepted");
    }

    /// [`verify`] gives what laying both distributions out over the vocabulary first gave (its form
    /// before it read p(d) and q(d) alone): the same token and verdict, and the sampler's stream
    /// where it was — over drafts kept and rejected, tokens named twice and drafts neither names.
    #[test]
    fn verify_is_the_dense_verdict() {
        fn dense_verify(p: &[(u32, f32)], q: &[(u32, f32)], d: u32, sampler: &mut Sampler) -> (u32, bool) {
            let tokens = p.iter().chain(q).map(|t| t.0 as usize + 1).max().unwrap_or(0).max(d as usize + 1);
            let dense = |dist: &[(u32, f32)]| {
                let mass: f64 = dist.iter().map(|t| f64::from(t.1)).sum();
                let mut v = vec![0.0f64; tokens];
                for &(x, w) in dist {
                    v[x as usize] += f64::from(w) / mass;
                }
                v
            };
            let (pp, qq) = (dense(p), dense(q));
            if sampler.uniform() * qq[d as usize] < pp[d as usize] {
                return (d, true);
            }
            let residual: Vec<(u32, f32)> = p
                .iter()
                .map(|&(x, _)| (x, (pp[x as usize] - qq[x as usize]).max(0.0) as f32))
                .filter(|t| t.1 > 0.0)
                .collect();
            (sampler.draw(if residual.is_empty() { p } else { &residual }), false)
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let (mut kept, mut rejected) = (0, 0);
        for _ in 0..400 {
            let dist = |next: &mut dyn FnMut(u64) -> u64| -> Vec<(u32, f32)> {
                (0..1 + next(12)).map(|_| (next(10) as u32, (1 + next(100)) as f32 / 7.0)).collect()
            };
            let (p, q) = (dist(&mut next), dist(&mut next));
            let d = next(12) as u32;
            let seed = next(1 << 40);
            let (mut a, mut b) = (Sampler::new(1.0, 1.0, seed), Sampler::new(1.0, 1.0, seed));
            let got = verify(&p, &q, d, &mut a);
            assert_eq!(got, dense_verify(&p, &q, d, &mut b), "{p:?} {q:?} draft {d}");
            assert_eq!(a.uniform().to_bits(), b.uniform().to_bits());
            if got.1 {
                kept += 1;
            } else {
                rejected += 1;
            }
        }
        assert!(kept > 40 && rejected > 40, "{kept} kept, {rejected} rejected: both paths seen");
    }

    /// [`verify`] alone: over draws of the draft from q, the token's frequencies are p's and the
    /// acceptance is sum min(p, q) — for drafts that put mass where p has none, equal
    /// distributions, disjoint ones and greedy ones.
    #[test]
    fn verified_drafts_are_distributed_as_the_main_model() {
        type Weighted = [(u32, f32)];
        let cases: [(&Weighted, &Weighted); 5] = [
            (&[(0, 0.5), (1, 0.5)], &[(0, 0.9), (1, 0.1)]),
            (&[(2, 0.3), (0, 0.2), (1, 0.1)], &[(3, 0.4), (0, 0.4), (2, 0.2)]),
            (&[(1, 0.6), (3, 0.4)], &[(1, 0.6), (3, 0.4)]),
            (&[(0, 1.0)], &[(2, 0.7), (1, 0.3)]),
            (&[(1, 1.0)], &[(2, 1.0)]),
        ];
        let runs = 100_000;
        for (p, q) in cases {
            let mut sampler = Sampler::new(1.0, 1.0, 7);
            let (mut counts, mut kept) = ([0usize; VOCAB], 0);
            for _ in 0..runs {
                let d = sampler.draw(q);
                let (t, accepted) = verify(p, q, d, &mut sampler);
                counts[t as usize] += 1;
                kept += usize::from(accepted);
            }
            let mass = |dist: &[(u32, f32)], x: usize| {
                let total: f32 = dist.iter().map(|t| t.1).sum();
                f64::from(dist.iter().find(|t| t.0 as usize == x).map_or(0.0, |t| t.1 / total))
            };
            let overlap: f64 = (0..VOCAB).map(|x| mass(p, x).min(mass(q, x))).sum();
            let sigma = |p: f64| 5.0 * (p * (1.0 - p) / runs as f64).max(0.0).sqrt() + 1e-4;
            for (x, &c) in counts.iter().enumerate() {
                let f = c as f64 / runs as f64;
                assert!((f - mass(p, x)).abs() <= sigma(mass(p, x)), "{p:?} {q:?}: token {x} at {f}");
            }
            let a = kept as f64 / runs as f64;
            assert!((a - overlap).abs() <= sigma(overlap), "{p:?} {q:?}: {a} accepted, {overlap} expected");
        }
    }
}
