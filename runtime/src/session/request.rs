//! What a served request asks for ([`Request`]: its prompt, budget, sampling, stops and tools)
//! and how it ended ([`Ending`]); the text of what it generated, and its tokens' log-probabilities.

use v3c_models::sampling::{log_sum_exp, top_k};

/// A request to [`serve`](super::serve): a prompt, how many tokens to generate at most, how to pick them.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub sampler: v3c_models::reference::Sampler,
    /// When it arrived, if before [`serve`](super::serve) reads it (a line read while earlier requests wait):
    /// its `queued_s` counts from then.
    pub arrived: Option<std::time::Instant>,
    /// It ends once its tokens end with one of these (kept in its tokens, as the end token is).
    pub stop: Vec<Vec<u32>>,
    /// Report each token's log-probability under the model ([`Generation::logprobs`](super::Generation::logprobs)).
    pub logprobs: bool,
    /// With `logprobs`, also this many of the most probable tokens at each step, with theirs
    /// ([`Generation::top_logprobs`](super::Generation::top_logprobs)).
    pub top_logprobs: usize,
    /// It ends once the text of its tokens holds one of these strings ([`TextStops::cut`] takes
    /// it off the text; the tokens keep it).
    pub stop_text: Option<TextStops>,
    /// Its prompt is given back with its tokens (a reply's business); with `logprobs`, scored
    /// too ([`Generation::prompt_logprobs`](super::Generation::prompt_logprobs); then prefilled whole).
    pub echo: bool,
    /// The end token does not end it (as `--ignore-eos` for every request).
    pub ignore_eos: bool,
    /// The functions it may call (its completion is read for calls: a reply's business).
    pub tools: Option<std::sync::Arc<crate::tools::Tools>>,
    /// Its completion parts into reasoning and answer (a reply's business).
    pub reasoning: Option<crate::reasoning::Reasoning>,
}

/// Stop strings, matched in the text of a request's tokens.
#[derive(Clone)]
pub struct TextStops {
    pub tokenizer: std::sync::Arc<crate::tokenizer::Tokenizer>,
    pub strings: Vec<String>,
}

/// A request's text as its tokens come (special tokens left out): what can be shown so far,
/// held back while it may be the start of a stop string, and cut at one.
pub struct TextSoFar {
    stream: crate::tokenizer::TextStream,
    text: String,
    shown: usize,
    stops: Option<TextStops>,
}

impl TextSoFar {
    pub fn new(tokenizer: &std::sync::Arc<crate::tokenizer::Tokenizer>, stops: Option<&TextStops>) -> TextSoFar {
        TextSoFar { stream: tokenizer.stream(true), text: String::new(), shown: 0, stops: stops.cloned() }
    }

    /// The text that token `t` settles (often empty).
    pub fn push(&mut self, t: u32) -> String {
        self.text.push_str(&self.stream.push(t));
        let settled = self.stops.as_ref().map_or(self.text.len(), |s| s.settled(&self.text));
        self.take(settled)
    }

    /// The rest of the text, up to a stop string.
    pub fn finish(mut self) -> String {
        let rest = self.stream.finish();
        self.text.push_str(&rest);
        let end = self.stops.as_ref().map_or(self.text.len(), |s| s.cut(&self.text).len());
        self.take(end)
    }

    fn take(&mut self, end: usize) -> String {
        let piece = self.text.get(self.shown..end.max(self.shown)).unwrap_or("").to_string();
        self.shown = self.shown.max(end);
        piece
    }
}

/// The text of a whole generation as [`TextSoFar`] shows it, all at once.
pub fn generation_text(tokenizer: &crate::tokenizer::Tokenizer, tokens: &[u32], stops: Option<&TextStops>) -> String {
    let text = tokenizer.decode(tokens, true);
    match stops {
        Some(s) => s.cut(&text).to_string(),
        None => text,
    }
}

impl std::fmt::Debug for TextStops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextStops").field("strings", &self.strings).finish_non_exhaustive()
    }
}

impl TextStops {
    /// Whether the newest of `tokens` completes a stop string. Only the last tokens are decoded:
    /// a stop string of n bytes first held once the newest token came ends in it, so its other
    /// bytes lie in the n - 1 bytes before it — the tokens before the newest are taken until they
    /// stand for n bytes (a token may stand for none: an id the tokenizer does not have).
    pub(super) fn reached(&self, tokens: &[u32]) -> bool {
        let longest = self.strings.iter().map(String::len).max().unwrap_or(0);
        let Some((_, before)) = tokens.split_last() else { return false };
        let (mut start, mut bytes) = (before.len(), 0);
        while start > 0 && bytes < longest {
            start -= 1;
            bytes += self.tokenizer.token_bytes_of(before[start]).len();
        }
        let text = self.tokenizer.decode(&tokens[start..], false);
        self.strings.iter().any(|s| !s.is_empty() && text.contains(s.as_str()))
    }

    /// `text` up to the first stop string in it (all of it when there is none).
    pub fn cut<'a>(&self, text: &'a str) -> &'a str {
        let end = self.strings.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
        &text[..end.unwrap_or(text.len())]
    }

    /// How much of `text` can be shown before the tokens after it are known: all but its longest
    /// end that begins a stop string (it may become one), and nothing from a stop string on.
    pub fn settled(&self, text: &str) -> usize {
        let cut = self.cut(text).len();
        if cut < text.len() {
            return cut;
        }
        let pending = self
            .strings
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n])))
            .max()
            .unwrap_or(0);
        text.len() - pending
    }
}

impl Request {
    /// `max_new` tokens after `prompt` picked by `sampler`; no stop sequences, no log-probabilities.
    pub fn new(prompt: Vec<u32>, max_new: usize, sampler: v3c_models::reference::Sampler) -> Request {
        Request {
            prompt,
            max_new,
            sampler,
            arrived: None,
            stop: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
            stop_text: None,
            echo: false,
            ignore_eos: false,
            tools: None,
            reasoning: None,
        }
    }

    /// What in it names a token past a vocabulary of `vocab` (its prompt, its logit bias, the
    /// opening marker of the calls it may make).
    pub fn outside(&self, vocab: usize) -> Option<String> {
        let past = |t: &u32| *t as usize >= vocab;
        if let Some(t) = self.prompt.iter().find(|t| past(t)) {
            return Some(format!("prompt: token id {t} is outside the vocabulary (0..{vocab})"));
        }
        if let Some(t) = self.tools.as_ref().filter(|t| t.calling() && past(&t.trigger)) {
            return Some(format!(
                "tools: the calls' opening marker (token id {}) is outside the model's vocabulary (0..{vocab})",
                t.trigger
            ));
        }
        let bias = self.sampler.shaping.logit_bias.iter().find(|b| past(&b.0));
        bias.map(|(t, _)| format!("logit_bias: token id {t} is outside the vocabulary (0..{vocab})"))
    }

    /// Whether `tokens` (its tokens so far) end it: at the end token or one of its stop sequences.
    pub(super) fn ends(&self, tokens: &[u32], eos: Option<u32>) -> Option<Ending> {
        if eos.is_some() && tokens.last().copied() == eos {
            return Some(Ending::Eos);
        }
        if self.stop.iter().any(|s| !s.is_empty() && tokens.ends_with(s))
            || self.stop_text.as_ref().is_some_and(|t| t.reached(tokens))
        {
            return Some(Ending::Stop);
        }
        (tokens.len() >= self.max_new).then_some(Ending::Length)
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// At the end-of-sequence token (the last of its tokens).
    Eos,
    /// At one of its stop sequences (the last of its tokens).
    Stop,
    /// With its most new tokens.
    Length,
}

impl Ending {
    /// `eos`, `stop`, `length`.
    pub fn name(self) -> &'static str {
        match self {
            Ending::Eos => "eos",
            Ending::Stop => "stop",
            Ending::Length => "length",
        }
    }
}

/// The log-probability of `token` under softmax(`logits`) (the model's own distribution: no
/// temperature, no nucleus), its denominator summed in f64 ([`log_sum_exp`]).
pub fn log_probability(logits: &[f32], token: u32) -> f32 {
    scores(logits, token, 0).0
}

/// [`log_probability`] of `token` and [`top_log_probabilities`] of the `k` most probable under
/// `logits`, softmax's denominator taken once for both.
pub fn scores(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let (max, log_sum) = log_sum_exp(logits);
    let of = |l: f32| (f64::from(l - max) - log_sum) as f32;
    let top = if k == 0 { Vec::new() } else { top_k(logits, k).into_iter().map(|(t, l)| (t, of(l))).collect() };
    (logits.get(token as usize).map_or(f32::NAN, |&l| of(l)), top)
}

/// [`scores`] of each `(row, token)` with the `k` most probable, in order, the rows spread over
/// the host's cores — a scored prompt's: its every token by the row before it, a fraction of a
/// millisecond each over DeepSeek-V3's vocabulary.
pub fn scores_of<'a>(rows: impl IntoIterator<Item = (&'a [f32], u32)>, k: usize) -> Vec<(f32, Vec<(u32, f32)>)> {
    let rows: Vec<(&[f32], u32)> = rows.into_iter().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.len() / 8).max(1);
    let score = |some: &[(&[f32], u32)]| some.iter().map(|&(row, t)| scores(row, t, k)).collect::<Vec<_>>();
    if threads == 1 {
        return score(&rows);
    }
    std::thread::scope(|scope| {
        let parts: Vec<_> =
            rows.chunks(rows.len().div_ceil(threads)).map(|some| scope.spawn(move || score(some))).collect();
        parts.into_iter().flat_map(|p| p.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// The `k` most probable tokens under softmax(`logits`) (ties: the lower id first), most probable
/// first ([`top_k`]: one pass for OpenAI's up to 20), with their log-probabilities as
/// [`log_probability`] gives them.
pub fn top_log_probabilities(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    scores(logits, 0, k).1
}
