//! Picking the next token from a row of logits: greedy, or drawn from a seeded stream after the
//! shaping serving APIs offer. In the order applied to a row (vLLM's, and Hugging Face
//! transformers' for the parts it has):
//!
//! 1. `logit_bias` (OpenAI's): added to the named tokens' logits;
//! 2. `repetition_penalty` (transformers' and vLLM's): a token of the prompt or generated so far
//!    has its logit divided by it when positive, multiplied by it otherwise;
//! 3. `frequency_penalty` and `presence_penalty` (OpenAI's): subtracted from a generated token's
//!    logit, the first as many times as the token was generated, the second once;
//! 4. the temperature (0: greedy, the argmax of what 1-3 left), then `top_k`, `top_p` and `min_p`
//!    keep the most probable tokens to draw from.
//!
//! Before `min_tokens` are picked, the tokens that would end the sequence are left out (vLLM's).
//!
//! A [`Constraint`] (e.g. a grammar the output must follow) then leaves only the tokens it
//! allows, before the temperature. Log-probabilities a request asks for are the model's own,
//! before any of this (vLLM's default).

use std::borrow::Cow;
use std::collections::HashMap;

/// What reshapes a row of logits before a token is picked, beyond the temperature and top-p (see
/// the module's order). The default changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Shaping {
    /// Only the k most probable tokens are drawn from (0: no limit).
    pub top_k: usize,
    /// Only tokens at least this fraction as probable as the most probable one (0: no limit).
    pub min_p: f32,
    /// 1: none.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// (token, bias) pairs, each token once.
    pub logit_bias: Vec<(u32, f32)>,
    /// `ends` (the tokens that would end the sequence: its end token, stop tokens) are not
    /// picked before this many tokens are (vLLM's `min_tokens`).
    pub min_tokens: usize,
    pub ends: Vec<u32>,
}

impl Default for Shaping {
    fn default() -> Shaping {
        Shaping {
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            ends: Vec::new(),
        }
    }
}

impl Shaping {
    /// Whether the logits themselves change for the whole sequence (bias or a penalty), not only
    /// which tokens are drawn from: then even greedy picking needs them on the host, and the
    /// tokens so far. (`min_tokens` changes them only until they are picked:
    /// [`Sampler::changes_logits`].)
    pub fn changes_logits(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
    }

    /// The settings are in range, named as the command line names them (`min-p 2 must be in
    /// [0, 1]`): min-p in [0, 1], the repetition penalty positive, the presence and frequency
    /// penalties in [-2, 2] and each bias in [-100, 100] (OpenAI's ranges), each token biased once.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition-penalty {} must be > 0", self.repetition_penalty));
        }
        for (name, x) in [("presence-penalty", self.presence_penalty), ("frequency-penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&x) {
                return Err(format!("{name} {x} must be in [-2, 2]"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for &(t, b) in &self.logit_bias {
            if !(-100.0..=100.0).contains(&b) {
                return Err(format!("logit-bias {b} of token {t} must be in [-100, 100]"));
            }
            if !seen.insert(t) {
                return Err(format!("logit-bias: token {t} given twice"));
            }
        }
        Ok(())
    }
}

/// What limits the tokens a sequence may go on with, beyond its shaping (a grammar its output
/// must follow): told each token picked.
pub trait Constraint: Send + Sync + std::fmt::Debug {
    /// Sets the logits of the tokens it does not allow next to -inf.
    fn mask(&self, logits: &mut [f32]);
    /// The sequence went on with `token`.
    fn advance(&mut self, token: u32);
    /// Back to where a sequence starts.
    fn restart(&mut self);
    fn boxed_clone(&self) -> Box<dyn Constraint>;
}

impl Clone for Box<dyn Constraint> {
    fn clone(&self) -> Box<dyn Constraint> {
        self.boxed_clone()
    }
}

/// A sequence's sampler: temperature 0 is greedy; otherwise softmax(logits / T) over the tokens
/// [`Shaping`] and top-p keep, drawn from a seeded stream (the same seed, settings and logits:
/// the same tokens). It counts the tokens it picks for the penalties, after the prompt
/// [`Sampler::start`] gives.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    /// Boxed: a sampler travels in every request.
    pub shaping: Box<Shaping>,
    state: u64,
    /// What the penalties count (kept only when the logits change).
    seen: Option<Box<Seen>>,
    /// Tokens picked since [`Sampler::start`].
    picks: usize,
    /// What the tokens must follow, if anything.
    pub constraint: Option<Box<dyn Constraint>>,
}

/// The tokens of a sequence the penalties count.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The prompt's distinct tokens, sorted (kept only for a repetition penalty).
    prompt: Vec<u32>,
    /// How many times each token was picked.
    picked: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_p,
            shaping: Box::default(),
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            seen: None,
            picks: 0,
            constraint: None,
        }
    }

    /// This sampler with `shaping`.
    pub fn shaped(self, shaping: Shaping) -> Sampler {
        Sampler { shaping: Box::new(shaping), ..self }
    }

    /// This sampler, its tokens limited by `constraint`.
    pub fn constrained(self, constraint: Box<dyn Constraint>) -> Sampler {
        Sampler { constraint: Some(constraint), ..self }
    }

    /// Whether the logits themselves change before a token is picked (bias, a penalty, a
    /// constraint): then even greedy picking needs them on the host.
    pub fn changes_logits(&self) -> bool {
        self.shaping.changes_logits() || self.constraint.is_some() || self.holds_back_ends()
    }

    /// Whether the ends are still held back (`min_tokens` not yet picked).
    fn holds_back_ends(&self) -> bool {
        self.picks < self.shaping.min_tokens && !self.shaping.ends.is_empty()
    }

    /// A new sequence after `prompt`: the penalties count its tokens and the picks from here on,
    /// the constraint starts over.
    pub fn start(&mut self, prompt: &[u32]) {
        (self.seen, self.picks) = (None, 0);
        if let Some(c) = self.constraint.as_mut() {
            c.restart();
        }
        if self.shaping.repetition_penalty != 1.0 {
            let mut prompt = prompt.to_vec();
            prompt.sort_unstable();
            prompt.dedup();
            self.seen = Some(Box::new(Seen { prompt, ..Seen::default() }));
        }
    }

    /// Counts `token` as picked for the sequence (what [`Sampler::sample`] does with its picks),
    /// and takes the constraint past it.
    pub fn note(&mut self, token: u32) {
        self.picks += 1;
        if let Some(c) = self.constraint.as_mut() {
            c.advance(token);
        }
        if self.shaping.changes_logits() {
            *self.seen.get_or_insert_default().picked.entry(token).or_insert(0) += 1;
        }
    }

    /// The next uniform draw in [0, 1) of the sampler's seeded stream (splitmix64, 53 bits).
    pub fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether the sampler picks the argmax (temperature 0), of the shaped logits.
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether it picks the argmax of the model's own logits (greedy, and nothing changes them):
    /// what a device may pick itself.
    pub fn plain_greedy(&self) -> bool {
        self.greedy() && !self.changes_logits()
    }

    /// The row as bias and penalties leave it, after the prompt and the tokens picked so far
    /// (tokens past the row are left out), then the constraint.
    pub fn shape<'a>(&self, logits: &'a [f32]) -> Cow<'a, [f32]> {
        let s = &self.shaping;
        if !self.changes_logits() {
            return Cow::Borrowed(logits);
        }
        let mut row = logits.to_vec();
        let none = Seen::default();
        let seen = self.seen.as_deref().unwrap_or(&none);
        for &(t, b) in &s.logit_bias {
            if let Some(l) = row.get_mut(t as usize) {
                *l += b;
            }
        }
        if s.repetition_penalty != 1.0 {
            let r = s.repetition_penalty;
            let once = |t: &u32| seen.prompt.binary_search(t).is_err();
            for t in seen.prompt.iter().copied().chain(seen.picked.keys().copied().filter(once)) {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        for (&t, &c) in &seen.picked {
            if let Some(l) = row.get_mut(t as usize) {
                *l -= s.frequency_penalty * c as f32;
                *l -= s.presence_penalty;
            }
        }
        if let Some(c) = &self.constraint {
            c.mask(&mut row);
        }
        if self.holds_back_ends() {
            for &t in &s.ends {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Cow::Owned(row)
    }

    /// What [`Sampler::sample`] draws from, as (token, weight) pairs whose weights are in
    /// proportion to the probabilities (they need not sum to 1), from the row [`Sampler::shape`]
    /// gives: greedy, the argmax alone (f32 total order, ties to the lower id); with no top-k, top-p 1
    /// and no min-p, every token in id order, weighted exp((logit - max) / T); else the most
    /// probable tokens (ties: the lower id first), in that order: the top k (when given), then of
    /// those the nucleus, the first whose weights reach top-p of theirs, then of those the ones
    /// with at least min-p of the largest weight. The nucleus is found by binning the weights and
    /// sorting only the tokens of the top bins that reach top-p ([`nucleus`]), not the whole
    /// vocabulary (129280 tokens for DeepSeek-V3).
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let logits = self.shape(logits);
        if self.greedy() {
            return vec![(argmax(&logits).map_or(0, |i| i as u32), 1.0)];
        }
        let max = largest(&logits);
        let k = self.shaping.top_k;
        let mut weights = if k > 0 && k < logits.len() {
            let mut weights = top_k(&exp_row(&logits, max, self.temperature), k);
            if self.top_p < 1.0 {
                nucleus(&mut weights, self.top_p);
            }
            weights
        } else if self.top_p < 1.0 {
            // The row's nucleus from its bare weights: pairs only for the tokens it keeps.
            row_nucleus(&exp_row(&logits, max, self.temperature), self.top_p)
        } else {
            exp_weights(&logits, max, self.temperature)
        };
        if self.shaping.min_p > 0.0 {
            // The most probable token's weight is exp(0) = 1.
            weights.retain(|w| w.1 >= self.shaping.min_p);
        }
        weights
    }

    /// Draws a token from `(token, weight)` pairs in their order, in proportion to the weights
    /// (one uniform draw; sums in f64); the last token when rounding leaves the draw past the end.
    /// The weights are summed a block of [`DRAW_BLOCK`] at a time (8 running sums each, which
    /// vectorize; one sum in order is a chain of dependent adds), the draw walks the blocks' sums,
    /// then the tokens of the block it falls in.
    pub fn draw(&mut self, weighted: &[(u32, f32)]) -> u32 {
        let u = self.uniform();
        draw_at(weighted, u)
    }

    /// Picks the next token from `logits`: greedy without a draw, else one draw from
    /// [`Sampler::distribution`]; the token is counted for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if self.weighs_every_token(logits.len()) {
            // The same draw over the same weights as `draw(&distribution(..))`, without laying
            // the weights out (1 MiB of pairs for DeepSeek-V3's vocabulary).
            let logits = self.shape(logits);
            let max = largest(&logits);
            let u = self.uniform();
            draw_exp(&logits, max, self.temperature, u)
        } else {
            let weighted = self.distribution(logits);
            if self.greedy() {
                weighted[0].0
            } else {
                self.draw(&weighted)
            }
        };
        self.note(token);
        token
    }

    /// Where a device may draw this sampler's next token itself ([`draw_plain`]: sampled at a
    /// temperature, with top-k, top-p and min-p or every token weighed, nothing changing the
    /// logits): the temperature, top-p, top-k, min-p and the uniform draw [`Sampler::sample`]
    /// would take (the stream advanced); None (nothing drawn) where the host must pick. The token
    /// the device gives goes to [`Sampler::note`].
    pub fn device_draw(&mut self) -> Option<Draw> {
        if !self.device_drawable() {
            return None;
        }
        let top_k = u32::try_from(self.shaping.top_k).unwrap_or(u32::MAX);
        let (temperature, top_p, min_p) = (self.temperature, self.top_p, self.shaping.min_p);
        Some(Draw { temperature, top_p, top_k, min_p, uniform: self.uniform() })
    }

    /// Whether [`Sampler::device_draw`] draws (it does not change the sampler).
    pub fn device_drawable(&self) -> bool {
        !self.greedy() && !self.changes_logits() && self.temperature.is_finite()
    }

    /// Whether [`Sampler::distribution`] of a row of `n` logits weighs every token in id order:
    /// sampled, with no top-k below `n`, top-p 1 and no min-p.
    fn weighs_every_token(&self, n: usize) -> bool {
        let top_k = self.shaping.top_k > 0 && self.shaping.top_k < n;
        !self.greedy() && !top_k && self.top_p >= 1.0 && self.shaping.min_p <= 0.0
    }
}

/// What a device draws a sampled token with ([`Sampler::device_draw`], [`draw_plain`]); a
/// temperature of 0 stands for greedy (the argmax), a top-k and a min-p of 0 for none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Draw {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub uniform: f64,
}

/// The token a sampler that weighs every token ([`Sampler::device_draw`]) picks from `logits` at
/// temperature `t` for the uniform draw `u`: what the device's sampling kernel (`rows_sample_*`)
/// must give, bit for bit.
pub fn draw_every_token(logits: &[f32], t: f32, u: f64) -> u32 {
    draw_exp(logits, largest(logits), t, u)
}

/// The token a sampler with `draw`'s temperature, top-p, top-k and min-p (and nothing changing
/// the logits: [`Sampler::device_draw`]) picks from `logits` for its uniform draw: what
/// [`Sampler::sample`] picks, that draw given — what the device's sampling kernel gives, or leaves
/// to the host.
pub fn draw_plain(logits: &[f32], draw: &Draw) -> u32 {
    let top_k = usize::try_from(draw.top_k).unwrap_or(usize::MAX);
    let shaping = Shaping { top_k, min_p: draw.min_p, ..Shaping::default() };
    let sampler = Sampler::new(draw.temperature, draw.top_p, 0).shaped(shaping);
    if sampler.weighs_every_token(logits.len()) {
        return draw_every_token(logits, draw.temperature, draw.uniform);
    }
    draw_at(&sampler.distribution(logits), draw.uniform)
}

/// [`draw_at`] over [`exp_weights`]'s pairs for `(logits, max, t)`, the same sums and the same
/// token, without the pairs: each block's weights are summed as they are computed, and only the
/// block the draw falls in is computed again to walk it.
fn draw_exp(logits: &[f32], max: f32, t: f32, u: f64) -> u32 {
    let sums = exp_block_sums(logits, max, t);
    let total: f64 = sums.iter().sum();
    let mut r = u * total;
    let mut weights = [0f32; DRAW_BLOCK];
    for (b, (block, &sum)) in logits.chunks(DRAW_BLOCK).zip(&sums).enumerate() {
        if r >= sum {
            r -= sum;
            continue;
        }
        let weights = &mut weights[..block.len()];
        for (w, &l) in weights.iter_mut().zip(block) {
            *w = exp((l - max) / t);
        }
        for (i, &p) in weights.iter().enumerate() {
            let p = f64::from(p);
            if r < p {
                return (b * DRAW_BLOCK + i) as u32;
            }
            r -= p;
        }
        // Rounding left the draw past this block's last token: on to the next.
    }
    logits.len().saturating_sub(1) as u32
}

/// [`Sampler::draw`] for the uniform draw `u` in `[0, 1)`.
fn draw_at(weighted: &[(u32, f32)], u: f64) -> u32 {
    let sums: Vec<f64> = weighted.chunks(DRAW_BLOCK).map(block_sum).collect();
    let total: f64 = sums.iter().sum();
    let mut r = u * total;
    for (block, &sum) in weighted.chunks(DRAW_BLOCK).zip(&sums) {
        if r >= sum {
            r -= sum;
            continue;
        }
        for &(i, p) in block {
            let p = f64::from(p);
            if r < p {
                return i;
            }
            r -= p;
        }
        // Rounding left the draw past this block's last token: on to the next.
    }
    weighted.last().map_or(0, |p| p.0)
}

/// Weights [`Sampler::draw`] sums a block at a time.
pub const DRAW_BLOCK: usize = 256;

/// The weights' sum in f64, in 8 running sums.
fn block_sum(block: &[(u32, f32)]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = block.chunks_exact(8);
    for c in &mut chunks {
        for (l, p) in lanes.iter_mut().zip(c) {
            *l += f64::from(p.1);
        }
    }
    chunks.remainder().iter().fold(lanes.iter().sum(), |s, p| s + f64::from(p.1))
}

/// [`block_sum`] of bare weights: the same running sums in the same order.
#[inline(always)]
fn weight_sum(weights: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = weights.chunks_exact(8);
    for c in &mut chunks {
        for (l, &w) in lanes.iter_mut().zip(c) {
            *l += f64::from(w);
        }
    }
    chunks.remainder().iter().fold(lanes.iter().sum(), |s, &w| s + f64::from(w))
}

/// The largest of `row` (NaNs passed over, as [`f32::max`] does; -inf for none), in 8 running
/// maxima the compiler vectorizes.
#[inline(always)]
fn largest(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Defines `fn` so that its body runs compiled for the widest vectors this CPU has — AVX-512F,
/// else AVX2, else x86-64's baseline SSE2 (the body inlined into a copy built for each; the
/// loops of [`exp`] and [`exp64`] vectorize 4 and 2 times wider than SSE2 allows). No fused
/// multiply-adds: every width gives the same bits.
macro_rules! widest {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn any($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                // (`unsafe fn`s: a safe `fn` with a target feature needs Rust 1.86.)
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    any($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    any($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: this CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            any($($arg),*)
        }
    };
}

widest! {
/// `(token, exp((logit - max) / t))` of every logit in id order: the exponentials [`exp`]
/// computes, in a loop the compiler vectorizes (libm's `expf` is a call per logit: 129280 of them
/// a row of DeepSeek-V3's).
fn exp_weights(logits: &[f32], max: f32, t: f32) -> Vec<(u32, f32)> {
    // Written into the spare capacity: a zeroed vector first cost a memset of the whole row.
    let mut out = Vec::with_capacity(logits.len());
    for (i, (o, &l)) in out.spare_capacity_mut().iter_mut().zip(logits).enumerate() {
        o.write((i as u32, exp((l - max) / t)));
    }
    // SAFETY: the loop wrote every one of the `logits.len()` elements.
    unsafe { out.set_len(logits.len()) };
    out
}
}

widest! {
/// Per block of [`DRAW_BLOCK`] logits, the sum of its weights `exp((l - max) / t)` as
/// [`block_sum`] sums [`exp_weights`]'s pairs of the block: the same bits.
fn exp_block_sums(logits: &[f32], max: f32, t: f32) -> Vec<f64> {
    // (Loops, not a closure: a closure is compiled without the copy's target feature.)
    let mut sums = Vec::with_capacity(logits.len().div_ceil(DRAW_BLOCK));
    let mut weights = [0f32; DRAW_BLOCK];
    for block in logits.chunks(DRAW_BLOCK) {
        let weights = &mut weights[..block.len()];
        for (w, &l) in weights.iter_mut().zip(block) {
            *w = exp((l - max) / t);
        }
        sums.push(weight_sum(weights));
    }
    sums
}
}

widest! {
/// `exp((logit - max) / t)` of every logit in id order, as [`exp_weights`] has them.
fn exp_row(logits: &[f32], max: f32, t: f32) -> Vec<f32> {
    // (Into the spare capacity, as [`exp_weights`].)
    let mut out = Vec::with_capacity(logits.len());
    for (o, &l) in out.spare_capacity_mut().iter_mut().zip(logits) {
        o.write(exp((l - max) / t));
    }
    // SAFETY: the loop wrote every one of the `logits.len()` elements.
    unsafe { out.set_len(logits.len()) };
    out
}
}

/// The largest of `row` ([`f32::max`]'s: NaNs passed over, -inf for none) and
/// ln(sum(e^(l - largest))) over every `l` of `row`, the exponentials and their sum in f64 — the
/// log of softmax's denominator ([`exp_sum`]'s sum, its order the device's).
pub fn log_sum_exp(row: &[f32]) -> (f32, f64) {
    let max = largest(row);
    (max, exp_sum(row, max).ln())
}

/// What a token's log-probability under softmax(row) needs ([`RowScore::of`]): the row's largest
/// logit, softmax's denominator `sum(e^(l - max))` ([`exp_sum`]) and the token's logit (NaN for a
/// token past the row). The device's scoring kernel (`rows_scores_*`) gives the same bits, so the
/// log-probabilities taken from either are the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScore {
    pub max: f32,
    pub sum: f64,
    pub logit: f32,
}

impl RowScore {
    /// The score of `token` under `row` (as [`log_sum_exp`] takes the denominator).
    pub fn of(row: &[f32], token: u32) -> RowScore {
        let max = largest(row);
        let logit = row.get(token as usize).copied().unwrap_or(f32::NAN);
        RowScore { max, sum: exp_sum(row, max), logit }
    }

    /// The token's negative log-likelihood, in f64: `ln(sum) - (logit - max)`.
    pub fn nll(&self) -> f64 {
        self.sum.ln() - f64::from(self.logit - self.max)
    }

    /// The token's log-probability, as [`log_sum_exp`]'s users round it: `(logit - max) - ln(sum)`
    /// in f64, then f32.
    pub fn log_probability(&self) -> f32 {
        (f64::from(self.logit - self.max) - self.sum.ln()) as f32
    }
}

/// Running sums [`exp_sum`] adds a row's exponentials in: column `c` into sum `c % SCORE_LANES`.
pub const SCORE_LANES: usize = 256;

widest! {
/// sum(e^(l - max)) over every `l` of `row`, in f64 by [`exp64`] (`l - max` in f32, then
/// widened): column `c`'s term into running sum `c % SCORE_LANES`, in column order, then the sums
/// added pairwise — sum `i` plus sum `i + h` for `h` = 128, 64, ..., 1 — into sum 0. The order of
/// the device's scoring kernel (`rows_scores_*`: a thread a running sum, its loads coalesced, then
/// a tree), which gives the same bits; on the host a loop the compiler vectorizes (`widest!`),
/// where libm's `exp` is a call per logit.
pub fn exp_sum(row: &[f32], max: f32) -> f64 {
    let mut lanes = [0f64; SCORE_LANES];
    for chunk in row.chunks(SCORE_LANES) {
        for (s, &l) in lanes.iter_mut().zip(chunk) {
            *s += exp64(f64::from(l - max));
        }
    }
    let mut half = SCORE_LANES / 2;
    while half >= 1 {
        let (low, high) = lanes.split_at_mut(half);
        for (a, &b) in low.iter_mut().zip(&high[..half]) {
            *a += b;
        }
        half /= 2;
    }
    lanes[0]
}
}

/// The `k` largest of `values` in f32's total order ([`f32::total_cmp`]: NaN above infinity) as
/// `(index, value)`, largest first, the lower index first among equals — what sorting every
/// `(index, value)` that way and keeping the first `k` gives. A small `k` (at most
/// [`TOP_K_SCAN`]) in one pass that keeps the best `k` so far in order and passes over each block
/// of 8 values none of which beats the k-th (one comparison of the block's largest: nearly every
/// block of a row of logits); a larger one by a partial sort of them all.
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k > TOP_K_SCAN {
        let mut all: Vec<(u32, f32)> = values.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        if k < all.len() {
            all.select_nth_unstable_by(k - 1, most_probable_first);
            all.truncate(k);
        }
        all.sort_unstable_by(most_probable_first);
        return all;
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    // What a value must beat once there are k: the k-th's key (an equal value comes later, so
    // loses).
    let floor = |best: &[(u32, f32)]| if best.len() == k { total_key(best[k - 1].1) } else { i32::MIN };
    let offer = |best: &mut Vec<(u32, f32)>, i: usize, v: f32| {
        let kv = total_key(v);
        if best.len() == k && kv <= floor(best) {
            return;
        }
        let at = best.partition_point(|b| total_key(b.1) >= kv);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    };
    let mut chunks = values.chunks_exact(8);
    let mut i = 0;
    for c in &mut chunks {
        let top = c.iter().fold(i32::MIN, |m, &v| m.max(total_key(v)));
        if best.len() < k || top > floor(&best) {
            for (j, &v) in c.iter().enumerate() {
                offer(&mut best, i + j, v);
            }
        }
        i += 8;
    }
    for (j, &v) in chunks.remainder().iter().enumerate() {
        offer(&mut best, i + j, v);
    }
    best
}

/// `(token, weight)` pairs' order, most probable first: the larger weight in f32's total order,
/// then the lower token.
fn most_probable_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The largest `k` [`top_k`] takes in one pass.
pub const TOP_K_SCAN: usize = 64;

/// [`f32::total_cmp`]'s key: a float's bits as an i32, the magnitude bits flipped where it is
/// negative, so that the keys' order is the floats' total order.
#[inline(always)]
fn total_key(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// e^x in f64 without a libm call, so that a loop of them vectorizes: within 1 ulp of libm's
/// where that is a normal double, 0 below -746 (where e^x rounds to 0), infinity above 710, NaN
/// for NaN. [`exp`]'s reduction in f64: `x = n ln 2 + r` with `|r| <= ln 2 / 2` (ln 2 in two
/// parts, the first with 32 trailing zero bits, so `r` is exact), e^r by its Taylor polynomial of
/// degree 13 (the next term is under 2^-57), then times 2^n as two powers of two, each a normal
/// double. The integers stay in f64 until their bits are taken (an i64 shift does not vectorize
/// before AVX-512).
#[inline(always)]
pub fn exp64(x: f64) -> f64 {
    const LOG2E: f64 = EXP_F64.log2e;
    const LN2_HI: f64 = EXP_F64.ln2_hi;
    const LN2_LO: f64 = EXP_F64.ln2_lo;
    // Round to nearest by adding 1.5 * 2^52 (the sum's last bit is the integer's).
    const ROUND: f64 = EXP_F64.round;
    let c = if x < EXP_F64.low { EXP_F64.low } else { x };
    let c = if c > EXP_F64.high { EXP_F64.high } else { c };
    let n = (c * LOG2E + ROUND) - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = horner(r, &EXP_F64.poly);
    let er = (p * r) * r + r + 1.0;
    // 2^n as 2^a 2^b, a = floor(n / 2) (n / 2 - 1/4 rounded to nearest) and b = n - a: both
    // within -538..=512, normal doubles.
    let a = ((n * 0.5 - 0.25) + ROUND) - ROUND;
    let pow2 = |k: f64| f64::from_bits((k + ROUND).to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(1023) << 52);
    let y = er * pow2(a) * pow2(n - a);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// [`exp64`]'s constants, public so that a kernel computing the same exponentials (the device's
/// scoring, `rows_scores_*`) takes the same bits; the same steps as [`ExpF32`]'s, then `2^n` as
/// `2^a 2^(n - a)` with `a = ((n 0.5 - 0.25) + round) - round`, each power from the bits of
/// `k + round` less those of `round`, plus 1023, shifted left 52.
pub struct ExpF64 {
    pub log2e: f64,
    pub ln2_hi: f64,
    pub ln2_lo: f64,
    pub round: f64,
    pub low: f64,
    pub high: f64,
    /// 1/13!, 1/12!, ..., 1/2!
    pub poly: [f64; 12],
}

pub const EXP_F64: ExpF64 = ExpF64 {
    log2e: std::f64::consts::LOG2_E,
    ln2_hi: 0.693_147_180_369_123_8,
    ln2_lo: 1.908_214_929_270_587_7e-10,
    round: 6_755_399_441_055_744.0,
    low: -746.0,
    high: 710.0,
    poly: [
        1.605_904_383_682_161_3e-10,
        2.087_675_698_786_81e-9,
        2.505_210_838_544_172e-8,
        2.755_731_922_398_589e-7,
        2.755_731_922_398_589_3e-6,
        2.480_158_730_158_73e-5,
        1.984_126_984_126_984e-4,
        1.388_888_888_888_889e-3,
        8.333_333_333_333_333e-3,
        4.166_666_666_666_666_4e-2,
        1.666_666_666_666_666_6e-1,
        0.5,
    ],
};

/// [`exp`]'s constants, public so that a kernel computing the same exponentials (the device's
/// sampling, `rows_sample_*`) takes the same bits: `e^x = 2^n e^r`, `n` the nearest integer to
/// `x log2(e)` (by adding and subtracting `round`), `r = (x - n ln2_hi) - n ln2_lo`, e^r as
/// `((p r) r + r) + 1` with `p` by Horner's rule over `poly`; `x` held to `low..=high` first.
pub struct ExpF32 {
    pub log2e: f32,
    pub ln2_hi: f32,
    pub ln2_lo: f32,
    pub round: f32,
    pub low: f32,
    pub high: f32,
    pub poly: [f32; 6],
}

pub const EXP_F32: ExpF32 = ExpF32 {
    log2e: std::f32::consts::LOG2_E,
    ln2_hi: 0.693_359_4,
    ln2_lo: -2.121_944_4e-4,
    round: 12_582_912.0,
    low: -104.0,
    high: 89.0,
    poly: [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5],
};

/// e^x in f32 without a libm call, so that a loop of them vectorizes: within 2 ulp of the
/// correctly rounded value where that is a normal float (ties of the subnormal range within one
/// subnormal step), 0 below -104 (where e^x rounds to 0 anyway), infinity above 89, NaN for NaN.
/// The classic reduction: `x = n ln 2 + r` with `|r| <= ln 2 / 2` (ln 2 in two parts, so `r` is
/// exact), e^r by its degree-6 polynomial, then times 2^n as two powers of two (each a normal
/// float: results down to the subnormals come out right).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = EXP_F32.log2e;
    // ln 2 = LN2_HI + LN2_LO; LN2_HI (355 / 512 exactly) has few mantissa bits, so n * LN2_HI is
    // exact for |n| < 2^15.
    const LN2_HI: f32 = EXP_F32.ln2_hi;
    const LN2_LO: f32 = EXP_F32.ln2_lo;
    // Round to nearest by adding 1.5 * 2^23 (the sum's last bit is the integer's).
    const ROUND: f32 = EXP_F32.round;
    // (Comparisons, not `clamp`, and the integer from the rounded sum's bits, not a cast: kept to
    // what vectorizes.) NaN passes the comparisons through.
    let c = if x < EXP_F32.low { EXP_F32.low } else { x };
    let c = if c > EXP_F32.high { EXP_F32.high } else { c };
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = horner(r, &EXP_F32.poly);
    let er = (p * r) * r + r + 1.0;
    // 2^n as 2^a 2^b, a = floor(n / 2) and b = n - a: both within -75..=64, normal floats.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let a = n >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = er * pow2(a) * pow2(n - a);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `cs[0] r^(n-1) + cs[1] r^(n-2) + ... + cs[n-1]` by Horner's rule (a multiply and an add a
/// coefficient, in that order: no fused multiply-adds). `cs` not empty.
#[inline(always)]
fn horner<T: Copy + std::ops::Mul<Output = T> + std::ops::Add<Output = T>>(r: T, cs: &[T]) -> T {
    cs[1..].iter().fold(cs[0], |p, &c| p * r + c)
}

/// The index of the largest value of `row` in f32's total order ([`f32::total_cmp`]: NaN above
/// infinity, -0 below 0), the lowest such index on ties; None for no values. Two passes the
/// compiler vectorizes — the largest value's key, then its first place — not a comparison chain.
pub fn argmax(row: &[f32]) -> Option<usize> {
    let best = row.iter().fold(None, |m: Option<i32>, &x| Some(m.map_or(total_key(x), |m| m.max(total_key(x)))))?;
    row.iter().position(|&x| total_key(x) == best)
}

/// Cuts `weights` to the most probable tokens, sorted most probable first
/// ([`most_probable_first`]), whose weights first reach `top_p` of all of theirs (their sum as a
/// draw takes it, [`draw_total`]: blocks of [`DRAW_BLOCK`] apart, then added — what a device that
/// sums a row's blocks apart can give exactly; the nucleus's own sum in sorted order).
///
/// The weights (in (0, 1]: the largest is exp(0)) are binned by their top bits ([`weight_bin`]:
/// exponent and 3 bits of mantissa, so binning keeps their order) with each bin's mass: the bins
/// from the top down to the first that brings the mass to `top_p` hold every token of the nucleus,
/// and every token outside them weighs less than every token in them — so those tokens, sorted,
/// are a prefix of the full sort. One pass to bin, one to keep the candidates, a sort of a few of
/// them (where rounding leaves the candidates' own sum short, or a weight is NaN, the tokens are
/// sorted in growing rounds of the most probable instead: 64, then 8 times as many).
fn nucleus(weights: &mut Vec<(u32, f32)>, top_p: f32) {
    // Binned by their positions (top-k's order: ties already lower id first, so a position's
    // order is its token's), then the positions named by their tokens.
    let values: Vec<f32> = weights.iter().map(|w| w.1).collect();
    let want = f64::from(top_p) * draw_total(&values);
    if let Some(kept) = nucleus_by_bins(&values, want) {
        *weights = kept.into_iter().map(|(i, w)| (weights[i as usize].0, w)).collect();
        return;
    }
    nucleus_by_rounds(weights, want);
}

/// [`nucleus`] of every token of a row in id order, from its bare weights `row` (token i's at
/// i): the same tokens in the same order as `nucleus` of [`exp_weights`]'s pairs.
fn row_nucleus(row: &[f32], top_p: f32) -> Vec<(u32, f32)> {
    let want = f64::from(top_p) * draw_total(row);
    if let Some(kept) = nucleus_by_bins(row, want) {
        return kept;
    }
    let mut weights: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect();
    nucleus_by_rounds(&mut weights, want);
    weights
}

/// The sum of `weights` as a draw over them in their order takes it ([`draw_at`], [`draw_exp`]):
/// each block of [`DRAW_BLOCK`] summed by [`weight_sum`], the blocks' sums added in order. What
/// top-p's share is of (a device sums a row's blocks apart, then adds them).
fn draw_total(weights: &[f32]) -> f64 {
    weights.chunks(DRAW_BLOCK).map(weight_sum).sum()
}

/// [`nucleus`]'s fallback: sorts of growing rounds of the most probable, to the first that
/// reaches `want`.
fn nucleus_by_rounds(weights: &mut Vec<(u32, f32)>, want: f64) {
    let n = weights.len();
    let mut k = n.min(64);
    loop {
        if k < n {
            weights.select_nth_unstable_by(k - 1, most_probable_first);
        }
        weights[..k].sort_unstable_by(most_probable_first);
        let mut kept = 0.0f64;
        for i in 0..k {
            kept += f64::from(weights[i].1);
            if kept >= want {
                weights.truncate(i + 1);
                return;
            }
        }
        if k == n {
            return;
        }
        k = n.min(k * 8);
    }
}

/// A weight's bin: its sign, exponent and 3 mantissa bits (non-negative floats order as their bits).
fn weight_bin(w: f32) -> usize {
    (w.to_bits() >> 20) as usize
}

/// [`nucleus`] by bins: the nucleus when the candidates reach `want` in sorted order, else None.
fn nucleus_by_bins(weights: &[f32], want: f64) -> Option<Vec<(u32, f32)>> {
    const BINS: usize = 1 << 12;
    const PARTS: usize = 8;
    // Negative and NaN weights (no exp gives them) go to the fallback's care (a fold with no early
    // exit: it vectorizes).
    if weights.iter().fold(false, |bad, &w| bad | w.is_nan() | (w < 0.0)) {
        return None;
    }
    // Each bin's mass in PARTS parts, weight i adding to part i % PARTS: a row's long flat tail
    // falls in one bin, and one sum would be a chain of dependent adds.
    let mut mass = vec![[0.0f64; PARTS]; BINS];
    let mut chunks = weights.chunks_exact(PARTS);
    for c in &mut chunks {
        for (part, &w) in c.iter().enumerate() {
            mass[weight_bin(w)][part] += f64::from(w);
        }
    }
    for &w in chunks.remainder() {
        mass[weight_bin(w)][0] += f64::from(w);
    }
    let mut reached = 0.0f64;
    let cut = (0..BINS).rev().find(|&b| {
        reached += mass[b].iter().sum::<f64>();
        reached >= want
    })?;
    // The top bins' weights with their positions, in order: a block of 16 with none of them is
    // passed over after one vectorized test (`weight_bin(w) >= cut` is `bits >= cut << 20`).
    let floor = (cut as u32) << 20;
    let mut kept: Vec<(u32, f32)> = Vec::new();
    for (b, block) in weights.chunks(16).enumerate() {
        if block.iter().fold(false, |any, w| any | (w.to_bits() >= floor)) {
            for (i, &w) in block.iter().enumerate() {
                if w.to_bits() >= floor {
                    kept.push(((b * 16 + i) as u32, w));
                }
            }
        }
    }
    kept.sort_unstable_by(most_probable_first);
    let mut sum = 0.0f64;
    let end = kept.iter().position(|w| {
        sum += f64::from(w.1);
        sum >= want
    })?;
    kept.truncate(end + 1);
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a device draws with a sampler's `device_draw` (`draw_plain`) is the token the sampler
    /// itself samples from the same row with the same stream: every token weighed, top-p, top-k,
    /// min-p, each pair of them, all three, and a top-k of the row's width or more (none);
    /// penalties, a bias and greedy picking draw nothing.
    #[test]
    fn device_draws_are_the_samplers_own_picks() {
        let n = 3000;
        for (r, (t, top_p, top_k, min_p)) in [
            (0.7, 1.0, 0, 0.0),
            (1.0, 0.9, 0, 0.0),
            (0.5, 0.95, 0, 0.0),
            (0.8, 1.0, 40, 0.0),
            (1.2, 0.8, 200, 0.0),
            (1.0, 1.0, n, 0.0),
            (1.0, 0.9, n + 5, 0.0),
            (1.0, 1.0, 0, 0.3),
            (1.0, 0.9, 0, 0.5),
            (0.9, 1.0, 100, 0.2),
            (1.1, 0.7, 300, 0.4),
            (1.0, 1.0, n, 0.6),
        ]
        .into_iter()
        .enumerate()
        {
            let row: Vec<f32> = (0..n).map(|j| ((j * 7919 + r * 104_729) % 1009) as f32 / 60.0).collect();
            let shaping = Shaping { top_k, min_p, ..Shaping::default() };
            let mut own = Sampler::new(t, top_p, 17 + r as u64).shaped(shaping);
            let mut device = own.clone();
            let mut picks = std::collections::HashSet::new();
            for _ in 0..20 {
                let token = draw_plain(&row, &device.device_draw().expect("drawable"));
                device.note(token);
                assert_eq!(token, own.sample(&row), "t {t} top-p {top_p} top-k {top_k} min-p {min_p}");
                picks.insert(token);
            }
            assert!(picks.len() > 1, "the draws vary");
        }
        let penalty = Sampler::new(1.0, 1.0, 0).shaped(Shaping { presence_penalty: 0.5, ..Shaping::default() });
        let bias = Sampler::new(1.0, 1.0, 0).shaped(Shaping { logit_bias: vec![(3, 1.0)], ..Shaping::default() });
        for mut s in [penalty, bias, Sampler::new(0.0, 1.0, 0)] {
            assert!(s.device_draw().is_none());
        }
    }

    /// The largest value, 8 lanes at a time, is the in-order fold of `f32::max` (NaNs passed over,
    /// -inf for no values or all NaN); a draw walking blocks' sums picks the token the in-order
    /// walk does (never a zero weight; the last token when the draw runs past the end).
    #[test]
    fn blocked_max_and_draw_follow_the_in_order_ones() {
        for n in [0usize, 1, 7, 8, 9, 31, 100] {
            for nan_at in [None, Some(0), Some(n / 2), Some(n.saturating_sub(1))] {
                let mut row: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
                if let Some(k) = nan_at.filter(|&k| k < n) {
                    row[k] = f32::NAN;
                }
                let want = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                assert_eq!(largest(&row).to_bits(), want.to_bits(), "{n} values, NaN at {nan_at:?}");
            }
        }
        assert_eq!(largest(&[f32::NAN; 9]), f32::NEG_INFINITY);
        let in_order = |weighted: &[(u32, f32)], u: f64| {
            let total: f64 = weighted.iter().map(|p| f64::from(p.1)).sum();
            let mut r = u * total;
            for &(i, p) in weighted {
                if r < f64::from(p) {
                    return i;
                }
                r -= f64::from(p);
            }
            weighted.last().map_or(0, |p| p.0)
        };
        // Over 5 blocks and a part: weights of several magnitudes, every seventh zero.
        let weighted: Vec<(u32, f32)> = (0..1300u32)
            .map(|i| (i, if i % 7 == 0 { 0.0 } else { ((i * 7919 % 1000) as f32 / 100.0).exp() * 1e-3 }))
            .collect();
        let mut differ = 0;
        for k in 0..20_000 {
            let u = (f64::from(k) + 0.5) / 20_000.0;
            let (got, want) = (draw_at(&weighted, u), in_order(&weighted, u));
            assert_ne!(got % 7, 0, "a zero weight drawn at {u}");
            differ += usize::from(got != want);
        }
        assert_eq!(differ, 0, "draws parted from the in-order walk");
        // Past the end (u at 1 in rounding's way) and no weights.
        assert_eq!(draw_at(&weighted, 1.0), 1299);
        assert_eq!(draw_at(&[], 0.5), 0);
        assert_eq!(draw_at(&[(4, 0.0), (9, 2.0)], 0.0), 9);
    }

    /// The vectorizable [`exp`] against e^x in f64 rounded to f32 (the correctly rounded value but
    /// for double rounding's rare ties): within 2 ulp of normal results, 2 subnormal steps of
    /// subnormal ones, over every 61st float from -110 to 90 and the edges; 0, infinity and NaN
    /// where libm gives them. And the weights of a row are `exp((l - max) / t)` of each logit.
    #[test]
    fn the_vectorized_exp_is_within_two_ulp() {
        let check = |x: f32| {
            let want = (f64::from(x)).exp() as f32;
            let got = exp(x);
            if want.is_nan() || want.is_infinite() || want == 0.0 {
                assert!(
                    got.to_bits() == want.to_bits() || (want == 0.0 && got < 3e-45),
                    "exp({x:e}) = {got:e}, not {want:e}"
                );
                return 0;
            }
            let ulps = (i64::from(got.to_bits()) - i64::from(want.to_bits())).unsigned_abs();
            assert!(ulps <= 2, "exp({x:e}) = {got:e}, {ulps} ulp from {want:e}");
            ulps
        };
        let (lo, hi) = (-110f32, 90f32);
        let mut worst = 0;
        // Negative floats from -0 down to -110 (bits ascend as they fall), then 0 up to 90.
        for b in (0x8000_0000u32..=lo.to_bits()).step_by(61).chain((0..=hi.to_bits()).step_by(61)) {
            worst = worst.max(check(f32::from_bits(b)));
        }
        for x in [0.0, -0.0, -87.336_55, -103.278_93, -103.972_08, -104.0, -104.5, 88.722_83, 88.8, 89.0, -1e-30, 1e-30]
        {
            worst = worst.max(check(x));
        }
        assert!(worst >= 1, "a sweep that never saw a rounding difference checked nothing");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // The weights, 8 at a time and the rest one by one.
        let logits: Vec<f32> = (0..21).map(|i| (i as f32 * 0.77).sin() * 9.0).collect();
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let weights = exp_weights(&logits, max, 0.7);
        assert_eq!(weights.len(), 21);
        for (i, (&l, &(t, w))) in logits.iter().zip(&weights).enumerate() {
            assert_eq!((t as usize, w.to_bits()), (i, exp((l - max) / 0.7).to_bits()));
        }
        let row = exp_row(&logits, max, 0.7);
        assert_eq!(
            row.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
            weights.iter().map(|w| w.1.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn greedy_sampling_is_argmax_and_seeded_sampling_repeats() {
        let logits = [0.1f32, 3.0, -1.0, 2.9];
        assert_eq!(Sampler::new(0.0, 1.0, 0).sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 0.9, seed);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        // top-p 0.9 keeps tokens 1 and 3 (and maybe 0), never the least likely one.
        assert!(draw(6).iter().all(|&t| t != 2));
    }

    /// The nucleus found by binning the weights and sorting only the most probable tokens is a
    /// full sort's: the same tokens in the same order (ties to the lower id), cut where their
    /// weights first reach top-p of all — over a vocabulary of DeepSeek-V3's size with a peaked
    /// row, a flat one, ties and a NaN; top-p 1 gives every token in id order; draws follow the
    /// weights.
    #[test]
    fn the_nucleus_is_a_full_sorts_prefix() {
        let vocab = 129_280;
        let hash = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        let peaked: Vec<f32> =
            (0..vocab).map(|i| if hash(i) % 300 == 0 { 6.0 + (hash(i) % 97) as f32 / 30.0 } else { -3.0 }).collect();
        let flat: Vec<f32> = (0..vocab).map(|i| (hash(i) % 1000) as f32 / 1000.0).collect();
        let ties: Vec<f32> = (0..vocab).map(|i| (i % 3) as f32).collect();
        // A NaN logit: binning gives up, the rounds of sorts answer.
        let mut nan = peaked.clone();
        nan[77] = f32::NAN;
        for (name, logits) in [("peaked", &peaked), ("flat", &flat), ("ties", &ties), ("nan", &nan)] {
            for top_p in [0.05f32, 0.5, 0.9, 0.999, 1.0] {
                let sampler = Sampler::new(0.8, top_p, 0);
                let got = sampler.distribution(logits);
                let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut all: Vec<(u32, f32)> = exp_weights(logits, max, 0.8);
                if top_p < 1.0 {
                    let total = block_sum(&all);
                    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    let mut kept = 0.0;
                    let cut = all.iter().position(|w| {
                        kept += f64::from(w.1);
                        kept >= f64::from(top_p) * total
                    });
                    all.truncate(cut.map_or(vocab, |c| c + 1));
                }
                // As bits: a NaN weight equals itself.
                let bits = |d: &[(u32, f32)]| d.iter().map(|w| (w.0, w.1.to_bits())).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&all), "{name}, top-p {top_p}");
                // After a top-k (the nucleus of the k most probable, binned by their positions).
                let shaped = Sampler::new(0.8, top_p, 0).shaped(Shaping { top_k: 1000, ..Shaping::default() });
                let mut top: Vec<(u32, f32)> = exp_weights(logits, max, 0.8);
                top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                top.truncate(1000);
                if top_p < 1.0 {
                    let want = f64::from(top_p) * block_sum(&top);
                    let mut kept = 0.0;
                    let cut = top.iter().position(|w| {
                        kept += f64::from(w.1);
                        kept >= want
                    });
                    top.truncate(cut.map_or(1000, |c| c + 1));
                }
                assert_eq!(bits(&shaped.distribution(logits)), bits(&top), "{name}, top-k 1000, top-p {top_p}");
            }
        }
        // Draws in proportion: three tokens of weights 1, 2, 1 (others far below).
        let mut row = vec![-40.0f32; 1000];
        (row[10], row[500], row[999]) = (0.0, 2f32.ln(), 0.0);
        let mut s = Sampler::new(1.0, 1.0, 3);
        let mut seen = [0usize; 3];
        for _ in 0..40_000 {
            match s.sample(&row) {
                10 => seen[0] += 1,
                500 => seen[1] += 1,
                999 => seen[2] += 1,
                t => panic!("token {t} drawn"),
            }
        }
        let f: Vec<f64> = seen.iter().map(|&c| c as f64 / 40_000.0).collect();
        assert!((f[0] - 0.25).abs() < 0.012 && (f[1] - 0.5).abs() < 0.012 && (f[2] - 0.25).abs() < 0.012, "{f:?}");
    }

    /// The vectorized argmax is `max_by(total_cmp)` with ties to the lower index, whatever the
    /// row holds: NaNs of both signs, infinities, zeros of both signs, ties, one value, none.
    #[test]
    fn argmax_is_the_total_orders_first_largest() {
        let reference =
            |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i);
        for row in odd_rows(&[0, 1, 2, 7, 64, 1000], 200) {
            assert_eq!(argmax(&row), reference(&row), "{row:?}");
        }
        assert_eq!(argmax(&[-0.0, 0.0, 0.0]), Some(1));
        assert_eq!(argmax(&[3.0, f32::NAN, 3.0]), Some(1));
    }

    /// `count` rows of each length in `lens` (a fixed sequence): NaNs of both signs, infinities,
    /// zeros of both signs and the smallest normal, ties among a few small integers, values spread
    /// over -100..100.
    fn odd_rows(lens: &[usize], count: usize) -> Vec<Vec<f32>> {
        let specials = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0, -1.0, f32::MIN_POSITIVE];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        let mut rows = Vec::new();
        for &len in lens {
            for _ in 0..count {
                rows.push(
                    (0..len)
                        .map(|_| match next() % 4 {
                            0 => specials[(next() % specials.len() as u64) as usize],
                            1 => (next() % 5) as f32,
                            _ => (next() % 20_000) as f32 / 100.0 - 100.0,
                        })
                        .collect(),
                );
            }
        }
        rows
    }

    /// With every token weighed, a draw needs no pairs ([`draw_exp`]): it picks the token
    /// [`draw_at`] picks from [`exp_weights`]'s pairs, over odd rows (NaNs, infinities, ties,
    /// lengths about a block's) and logit-like rows of DeepSeek-V3's vocabulary, at several
    /// temperatures and draws (0 and 1 among them); and a sampler's tokens are those of
    /// `draw(&distribution(..))`, its stream left at the same place.
    #[test]
    fn drawing_from_every_tokens_weight_lays_no_pairs_out() {
        let mut rows = odd_rows(&[0, 1, 7, 255, 256, 257, 1300], 4);
        rows.extend((0..3u32).map(|s| {
            (0..129_280u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(s) % 4000) as f32 / 200.0 - 10.0)
                .collect()
        }));
        for row in &rows {
            let max = largest(row);
            for t in [0.3f32, 0.7, 1.0, 1.7] {
                let pairs = exp_weights(row, max, t);
                let sums: Vec<u64> = pairs.chunks(DRAW_BLOCK).map(|b| block_sum(b).to_bits()).collect();
                let fused: Vec<u64> = exp_block_sums(row, max, t).iter().map(|x| x.to_bits()).collect();
                assert_eq!(fused, sums, "{} logits, T {t}", row.len());
                for u in (0..20).map(|k| (f64::from(k) + 0.37) / 20.0).chain([0.0, 1.0 - f64::EPSILON, 1.0]) {
                    assert_eq!(draw_exp(row, max, t, u), draw_at(&pairs, u), "{} logits, T {t}, u {u}", row.len());
                }
            }
        }
        for (seed, row) in rows.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let mut fast = Sampler::new(0.8, 1.0, seed as u64);
            let mut pairs = fast.clone();
            assert!(fast.weighs_every_token(row.len()));
            for _ in 0..4 {
                let weighted = pairs.distribution(row);
                let want = pairs.draw(&weighted);
                pairs.note(want);
                assert_eq!(fast.sample(row), want, "{} logits, seed {seed}", row.len());
            }
            assert_eq!(fast.uniform().to_bits(), pairs.uniform().to_bits());
        }
    }

    /// [`top_k`] is the first `k` of every `(index, value)` sorted most probable first (total
    /// order, ties to the lower index), as bits: over odd rows, `k` from 0 past the row's length,
    /// through both the one-pass scan and the partial sort past [`TOP_K_SCAN`]; and a sampler's
    /// top-k keeps those tokens of its weights.
    #[test]
    fn top_k_is_a_full_sorts_first_k() {
        let bits = |d: &[(u32, f32)]| d.iter().map(|w| (w.0, w.1.to_bits())).collect::<Vec<_>>();
        for row in odd_rows(&[0, 1, 2, 7, 8, 9, 64, 1000, 3000], 30) {
            let mut all: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            all.sort_by(most_probable_first);
            for k in [0, 1, 2, 5, 8, 20, TOP_K_SCAN, TOP_K_SCAN + 1, 200, row.len(), row.len() + 3] {
                let want = &all[..k.min(all.len())];
                assert_eq!(bits(&top_k(&row, k)), bits(want), "k {k} of {row:?}");
            }
        }
        // Every value equal: the lowest indices.
        assert_eq!(top_k(&[2.0; 20], 3), [(0, 2.0), (1, 2.0), (2, 2.0)]);
        // A sampler's top 3 of 10: the three largest logits' weights, most probable first.
        let logits = [0.5f32, 3.0, -1.0, 3.0, 2.0, 0.0, 1.0, 2.5, -2.0, 0.1];
        let got = Sampler::new(1.0, 1.0, 0).shaped(Shaping { top_k: 3, ..Shaping::default() }).distribution(&logits);
        assert_eq!(got.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 3, 7]);
        assert_eq!(got[2].1, exp(2.5 - 3.0));
    }

    /// The vectorizable [`exp64`] against libm's e^x: within 1 ulp of normal results (a
    /// polynomial of degree 12 is 2 ulp off in places) over a sweep
    /// of 600,000 doubles from -750 to 720 and the edges (where the result turns subnormal, 0 and
    /// infinite), and 0, infinity and NaN where libm gives them.
    #[test]
    fn the_vectorized_exp64_is_within_one_ulp() {
        let mut worst = 0;
        let mut check = |x: f64| {
            let (want, got) = (x.exp(), exp64(x));
            if !want.is_normal() {
                let close = (got - want).abs() <= 2.0 * 5e-324 || got.to_bits() == want.to_bits();
                assert!(close || (want.is_nan() && got.is_nan()), "exp64({x:e}) = {got:e}, not {want:e}");
                return;
            }
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
            assert!(ulps <= 1, "exp64({x:e}) = {got:e}, {ulps} ulp from {want:e}");
            worst = worst.max(ulps);
        };
        for i in 0..600_000 {
            check(-750.0 + 1470.0 * f64::from(i) / 600_000.0 + 1e-7 * f64::from(i % 13));
        }
        for x in [0.0, -0.0, 1e-300, -1e-300, -708.39, -708.4, -745.13, -745.14, -746.0, -800.0, 709.78, 709.79, 710.0]
        {
            check(x);
        }
        assert!(worst >= 1, "a sweep that never saw a rounding difference checked nothing");
        assert_eq!(exp64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp64(f64::INFINITY), f64::INFINITY);
        assert!(exp64(f64::NAN).is_nan());
    }

    /// [`log_sum_exp`] is ln(sum(e^(l - max))) in f64 with libm's exponentials summed in order, to
    /// 1e-14, over odd rows: NaN where a NaN or only infinities make it one, -inf for no logits.
    /// And it gives the bits of its sums done one by one here (scalar code): the vector widths
    /// this CPU picks change nothing.
    #[test]
    fn log_sum_exp_is_the_f64_sums() {
        for row in odd_rows(&[0, 1, 2, 7, 9, 64, 255, 256, 257, 1000, 2051], 50) {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let want = row.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln();
            let (got_max, got) = log_sum_exp(&row);
            assert_eq!(got_max.to_bits(), max.to_bits());
            assert!(
                (got - want).abs() <= 1e-14 || (got.is_nan() && want.is_nan()) || got == want,
                "{got} against {want} of {row:?}"
            );
            // Column c into sum c % 256 in order, then the sums pairwise into sum 0.
            let mut lanes = vec![0f64; SCORE_LANES];
            for (i, &l) in row.iter().enumerate() {
                lanes[i % SCORE_LANES] += std::hint::black_box(exp64(f64::from(l - max)));
            }
            while lanes.len() > 1 {
                let half = lanes.len() / 2;
                lanes = (0..half).map(|i| lanes[i] + lanes[i + half]).collect();
            }
            // (A NaN's sign is whichever operand's the adds met first.)
            assert!(got.to_bits() == lanes[0].ln().to_bits() || (got.is_nan() && lanes[0].is_nan()), "{row:?}");
        }
        let (_, one) = log_sum_exp(&[3.0, 3.0]);
        assert!((one - 2f64.ln()).abs() < 1e-15);
    }

    /// Transformers' processors and warpers (`tests/fixtures/gen_sampling.py`): the same tokens
    /// survive, with the same probabilities, over 156 random rows and settings (bias, repetition,
    /// presence and frequency penalties, temperature, top-k, top-p, min-p; greedy among them).
    #[test]
    fn distributions_are_transformers_processors() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sampling/expected.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 156);
        let ids = |x: &serde_json::Value| -> Vec<u32> {
            x.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
        };
        let float = |x: &serde_json::Value| x.as_f64().unwrap() as f32;
        let mut greedy = 0;
        for (n, c) in cases.iter().enumerate() {
            let logits: Vec<f32> = c["logits"].as_array().unwrap().iter().map(float).collect();
            let shaping = Shaping {
                top_k: c["top_k"].as_u64().unwrap() as usize,
                min_p: float(&c["min_p"]),
                repetition_penalty: float(&c["repetition_penalty"]),
                presence_penalty: float(&c["presence_penalty"]),
                frequency_penalty: float(&c["frequency_penalty"]),
                logit_bias: c["logit_bias"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p[0].as_u64().unwrap() as u32, float(&p[1])))
                    .collect(),
                ..Shaping::default()
            };
            shaping.check().unwrap();
            let mut sampler = Sampler::new(float(&c["temperature"]), float(&c["top_p"]), 0).shaped(shaping);
            sampler.start(&ids(&c["prompt"]));
            for t in ids(&c["generated"]) {
                sampler.note(t);
            }
            let got = sampler.distribution(&logits);
            let total: f64 = got.iter().map(|w| f64::from(w.1)).sum();
            // Tokens whose weight underflows to 0 are never drawn; transformers' softmax leaves them out.
            let mut got: Vec<(u32, f64)> =
                got.iter().filter(|w| w.1 > 0.0).map(|&(t, w)| (t, f64::from(w) / total)).collect();
            got.sort_by_key(|w| w.0);
            let want: Vec<(u32, f64)> = c["expected"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
                .collect();
            greedy += usize::from(sampler.greedy());
            assert_eq!(
                got.iter().map(|w| w.0).collect::<Vec<_>>(),
                want.iter().map(|w| w.0).collect::<Vec<_>>(),
                "case {n}: the tokens kept"
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g.1 - w.1).abs() <= 1e-5 + 1e-4 * w.1, "case {n}, token {}: {} vs {}", g.0, g.1, w.1);
            }
        }
        assert!(greedy > 10 && greedy < 100, "{greedy} greedy cases");
    }

    /// Picks are counted: a greedy sampler with a frequency penalty moves off a token it picked
    /// once its lead is spent, a logit bias moves the argmax, and a new prompt starts the counts
    /// again; the repetition penalty counts a token of the prompt once however often it appears.
    #[test]
    fn penalties_count_the_sequences_tokens() {
        let logits = [2.0f32, 1.0, 0.5, -1.0];
        let shaping = |f: f32| Shaping { frequency_penalty: f, ..Shaping::default() };
        let mut s = Sampler::new(0.0, 1.0, 0).shaped(shaping(0.6));
        assert!(s.greedy() && !s.plain_greedy());
        s.start(&[0, 0, 0]);
        let picks: Vec<u32> = (0..5).map(|_| s.sample(&logits)).collect();
        // Token 0 at 2.0, 1.4, 0.8, 0.8, 0.2; token 1 at 1.0, 1.0, 1.0, 0.4, 0.4; token 2 at 0.5.
        assert_eq!(picks, [0, 0, 1, 0, 2]);
        s.start(&[]);
        assert_eq!(s.sample(&logits), 0);
        let bias = Shaping { logit_bias: vec![(3, 3.5)], ..Shaping::default() };
        assert_eq!(Sampler::new(0.0, 1.0, 0).shaped(bias).sample(&logits), 3);
        assert!(Sampler::new(0.0, 1.0, 0).plain_greedy());
        let mut r = Sampler::new(0.0, 1.0, 0).shaped(Shaping { repetition_penalty: 2.0, ..Shaping::default() });
        r.start(&[0, 0, 3, 0]);
        r.note(0);
        assert_eq!(r.shape(&logits).as_ref(), [1.0, 1.0, 0.5, -2.0]);
        // Top-k and min-p only choose among tokens: plain greedy, and no counts are kept.
        let cut = Sampler::new(0.0, 1.0, 0).shaped(Shaping { top_k: 2, min_p: 0.5, ..Shaping::default() });
        assert!(cut.plain_greedy());
    }

    /// `min_tokens`: the ends are left out until that many tokens are picked, and only then —
    /// the logits are the model's again after (plain greedy: a device may pick).
    #[test]
    fn ends_wait_for_min_tokens() {
        let logits = [0.0f32, 5.0, 1.0, -1.0];
        let shaping = Shaping { min_tokens: 2, ends: vec![1, 3], ..Shaping::default() };
        let mut s = Sampler::new(0.0, 1.0, 0).shaped(shaping);
        s.start(&[7, 8]);
        assert!(!s.plain_greedy());
        assert_eq!([s.sample(&logits), s.sample(&logits)], [2, 2]);
        assert!(s.plain_greedy());
        assert_eq!(s.sample(&logits), 1);
        s.start(&[]);
        assert_eq!(s.sample(&logits), 2, "held back again for a new sequence");
    }

    #[test]
    fn shaping_out_of_range_is_named() {
        let bad = |s: Shaping| s.check().unwrap_err();
        assert_eq!(bad(Shaping { min_p: 1.5, ..Shaping::default() }), "min-p 1.5 must be in [0, 1]");
        assert_eq!(bad(Shaping { repetition_penalty: 0.0, ..Shaping::default() }), "repetition-penalty 0 must be > 0");
        assert_eq!(
            bad(Shaping { presence_penalty: -3.0, ..Shaping::default() }),
            "presence-penalty -3 must be in [-2, 2]"
        );
        assert_eq!(
            bad(Shaping { frequency_penalty: f32::NAN, ..Shaping::default() }),
            "frequency-penalty NaN must be in [-2, 2]"
        );
        assert_eq!(
            bad(Shaping { logit_bias: vec![(7, 101.0)], ..Shaping::default() }),
            "logit-bias 101 of token 7 must be in [-100, 100]"
        );
        assert_eq!(
            bad(Shaping { logit_bias: vec![(7, 1.0), (7, 2.0)], ..Shaping::default() }),
            "logit-bias: token 7 given twice"
        );
    }
}
