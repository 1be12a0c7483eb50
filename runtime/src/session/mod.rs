//! One generated sequence on an artifact (`cpu`, or GPU: [`Program`]): the prompt prefilled in chunks of at most the
//! prefill plan's rows (each chunk attends to the rows cached before it), then one decode step per
//! token over caches of `max_len` rows. The plans run at these sizes because they were planned for
//! larger ones ([`crate::plan::EntryPlan::bind`]). Several sequences run as one batch
//! ([`ArtifactBatch`], [`generate_batch`]): each prefilled alone, then one decode launch per step over all.
//! A decode entry over a pool of pages ([`crate::pages`]) gets the pool and a block table: each
//! sequence holds the pages its rows fill, taken as it grows, given back when it ends.
//! On a program that carries outputs over (a GPU) the caches stay on its device from prefill
//! chunk to chunk and into the decode steps ([`Program::run_carrying`], [`Program::move_rows`]).
//!
//! An artifact compiled with its MTP module has MTP inputs; plain generation feeds the MTP layer the
//! next prompt token where it is known and token 0 otherwise, keeps its cache like the others, and
//! does not read its logits (speculative decoding with it: [`crate::speculative`]).
//!
//! The parts: `program` (what runs entries, one step of a session), `sequence` (one sequence),
//! `batch` (several, and a queue of them), `request` (what a served request asks for), `serve`
//! (the serving loop); here, generation as the CLI and tests drive it, and the tests of all.

use std::collections::HashMap;

use crate::host::{HostBuffer, HostData};
use crate::pages::DecodeCaches;
use crate::plan::{EntryPlan, PAGE_POOL};
use v3c_models::sampling::RowScore;

mod batch;
mod program;
mod request;
mod sequence;
mod serve;

pub use batch::*;
pub use program::*;
pub use request::*;
pub use sequence::*;
pub use serve::*;

/// What generates a sequence: a prompt's logits, then one token's at a time.
pub trait Generator {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String>;
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String>;
    /// As `decode`; with `pick` (greedy, or draws), a session whose program picks tokens itself
    /// may give the token.
    fn decode_next(&mut self, token: u32, pick: &Pick) -> Result<Next, String> {
        Ok(Next::Logits(LogitRows::of(vec![self.decode(token)?])).drawn(pick))
    }
    /// Whether the session's program draws sampled tokens itself ([`Program::device_sample`]).
    fn device_sample(&self) -> bool {
        false
    }
}

impl Generator for ArtifactSession<'_> {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        ArtifactSession::prefill(self, tokens)
    }
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String> {
        ArtifactSession::decode(self, token)
    }
    fn decode_next(&mut self, token: u32, pick: &Pick) -> Result<Next, String> {
        ArtifactSession::decode_next(self, token, pick)
    }
    fn device_sample(&self) -> bool {
        self.program.device_sample()
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
    /// In a batch over a pool of cache pages: the pages the sequence held at its end, and the pool's.
    pub pages: Option<(usize, usize)>,
    /// Served ([`serve`]): seconds from its arrival to its joining the batch (the others: 0).
    pub queued_s: f64,
    /// Served: its prompt's tokens whose cache rows another request's pages held, shared instead
    /// of prefilled ([`Serving::reuse_prefixes`]; the others: 0).
    pub reused: usize,
    /// Served with [`Request::logprobs`]: each token's log-probability ([`log_probability`]);
    /// else empty.
    pub logprobs: Vec<f32>,
    /// Served with [`Request::top_logprobs`]: at each token, the most probable tokens and their
    /// log-probabilities ([`top_log_probabilities`]); else empty.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Served: why it ended (a cancelled one: None; the others: at the end token or its length).
    pub ending: Option<Ending>,
    /// Served with [`Request::echo`] and `logprobs`: each prompt token's after the first (its
    /// log-probability under the logits of the one before it); else empty.
    pub prompt_logprobs: Vec<f32>,
    /// And with `top_logprobs`, the most probable tokens at each of those positions.
    pub prompt_top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Generated speculatively ([`crate::speculative`]): how its MTP drafts fared.
    pub speculation: Option<Speculated>,
}

/// How a speculative generation's MTP drafts fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Speculated {
    /// Drafts verified (those after a rejected one are not), the ones kept, and passes of the
    /// main model after the prompt's.
    pub drafted: usize,
    pub accepted: usize,
    pub passes: usize,
}

impl std::ops::Add for Speculated {
    type Output = Speculated;
    fn add(self, other: Speculated) -> Speculated {
        let (drafted, accepted, passes) =
            (self.drafted + other.drafted, self.accepted + other.accepted, self.passes + other.passes);
        Speculated { drafted, accepted, passes }
    }
}

impl Speculated {
    /// `accepted / drafted`.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Tokens per pass of the main model, `later` being the tokens after each sequence's first
    /// (which its prompt's pass gives).
    pub fn tokens_per_pass(&self, later: usize) -> f64 {
        later as f64 / self.passes.max(1) as f64
    }

    /// The counts as JSON, with the acceptance and the tokens per pass (`later` as
    /// [`Speculated::tokens_per_pass`] takes it).
    pub fn json(&self, later: usize) -> serde_json::Value {
        serde_json::json!({
            "drafted": self.drafted, "accepted": self.accepted, "passes": self.passes,
            "acceptance": self.acceptance(), "tokens_per_pass": self.tokens_per_pass(later),
        })
    }
}

impl Generation {
    /// A sequence generated on its own: its tokens, whether the last is the end token (else it
    /// ended at its length), its prefill's seconds and all.
    pub fn alone(tokens: Vec<u32>, stopped_at_eos: bool, prefill_s: f64, total_s: f64) -> Generation {
        Generation {
            tokens,
            stopped_at_eos,
            prefill_s,
            total_s,
            pages: None,
            queued_s: 0.0,
            reused: 0,
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            ending: Some(if stopped_at_eos { Ending::Eos } else { Ending::Length }),
            prompt_logprobs: Vec::new(),
            prompt_top_logprobs: Vec::new(),
            speculation: None,
        }
    }

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
    generate_each(session, prompt, max_new, sampler, eos, &mut |_| {})
}

/// [`generate`], telling `picked` each token as it is picked (before the next decode step).
pub fn generate_each(
    session: &mut dyn Generator,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut v3c_models::reference::Sampler,
    eos: Option<u32>,
    picked: &mut dyn FnMut(u32),
) -> Result<Generation, String> {
    let start = std::time::Instant::now();
    let mut next = Next::Logits(LogitRows::of(vec![session.prefill(prompt)?]));
    let prefill_s = start.elapsed().as_secs_f64();
    sampler.start(prompt);
    let mut tokens = Vec::new();
    let mut stopped_at_eos = false;
    while tokens.len() < max_new {
        let token = next.pick(0, sampler);
        tokens.push(token);
        picked(token);
        if Some(token) == eos {
            stopped_at_eos = true;
            break;
        }
        if tokens.len() < max_new {
            let pick = Pick::of(session.device_sample(), [Some((&mut *sampler, false))]);
            next = session.decode_next(token, &pick)?;
        }
    }
    let total_s = start.elapsed().as_secs_f64();
    Ok(Generation::alone(tokens, stopped_at_eos, prefill_s, total_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Sizes;
    use std::cell::RefCell;

    const VOCAB: usize = 11;
    const WIDTH: usize = 3;

    fn plan(name: &str, rows: usize, context: usize, cache: Vec<usize>) -> EntryPlan {
        EntryPlan {
            name: name.into(),
            sizes: Sizes::new(rows, context),
            bounds: [
                ("tokens".to_string(), vec![rows]),
                ("positions".to_string(), vec![rows]),
                ("kv_cache.0".to_string(), cache),
            ]
            .into(),
            buffers: Vec::new(),
            launches: Vec::new(),
            outputs: Vec::new(),
            arena_bytes: 0,
        }
    }

    /// A model small enough to write down: the cache row of a token is the token; the logits at a
    /// position peak at (sum of the sequence's cache rows so far) mod VOCAB — wrong caches, wrong
    /// tokens. `keeps` makes it keep decode caches between runs, as a GPU does, counting uploads.
    struct Toy {
        prefill: EntryPlan,
        decode: EntryPlan,
        keeps: bool,
        device: RefCell<Option<HostBuffer>>,
        uploads: RefCell<usize>,
        /// Picks greedy tokens itself (from the last decode's logits, kept here).
        argmax: bool,
        /// Draws sampled tokens itself too (as the device's sampling kernel: the host's draws).
        sample: bool,
        /// Scores tokens itself (as the device's scoring kernel: the host's bits), from the last
        /// run's logits.
        scores: bool,
        last_logits: RefCell<Vec<Vec<f32>>>,
        logits_read: RefCell<usize>,
        /// Decode caches' rows must be a multiple of this; they come back in bf16 when `bf16`.
        multiple: usize,
        bf16: bool,
        /// Rows per sequence of the last decode's caches.
        slots: RefCell<usize>,
        /// Decode takes its caches as a pool of pages through a block table; the last pool's pages.
        paged: bool,
        pool_pages: RefCell<usize>,
        /// Prefill runs that took their caches as the device held them.
        carried_in: RefCell<usize>,
        /// Rows moved on the device.
        moved: RefCell<usize>,
        /// Prefill chunks that took their caches back after decode steps.
        reclaimed: RefCell<usize>,
        /// Prefill chunks after the first of a prompt run right after a decode step, and the
        /// entry of the last run.
        interleaved: RefCell<usize>,
        last_entry: RefCell<String>,
        /// Tokens the prefill entry ran.
        prefilled: RefCell<usize>,
        /// Rows of each decode step.
        decode_rows: RefCell<Vec<usize>>,
    }

    impl Toy {
        fn new(keeps: bool) -> Toy {
            Toy {
                prefill: plan("prefill", 4, 32, vec![32, WIDTH]),
                decode: plan("decode", 2, 32, vec![2, 32, WIDTH]),
                keeps,
                device: RefCell::new(None),
                uploads: RefCell::new(0),
                argmax: false,
                sample: false,
                scores: false,
                last_logits: RefCell::new(Vec::new()),
                logits_read: RefCell::new(0),
                multiple: 1,
                bf16: false,
                slots: RefCell::new(0),
                paged: false,
                pool_pages: RefCell::new(0),
                carried_in: RefCell::new(0),
                moved: RefCell::new(0),
                reclaimed: RefCell::new(0),
                interleaved: RefCell::new(0),
                last_entry: RefCell::new(String::new()),
                prefilled: RefCell::new(0),
                decode_rows: RefCell::new(Vec::new()),
            }
        }

        /// A toy whose decode takes a pool of 64-row pages (plans of 128 rows of context).
        fn paged() -> Toy {
            let mut t = Toy::new(false);
            t.prefill = plan("prefill", 4, 128, vec![128, WIDTH]);
            t.decode = plan("decode", 3, 128, vec![6, 64, WIDTH]);
            t.decode.bounds.insert(PAGE_POOL.into(), vec![3, 2]);
            (t.paged, t.multiple) = (true, 64);
            t
        }
    }

    fn f32s(b: &HostBuffer) -> &Vec<f32> {
        let HostData::F32(v) = &b.data else { panic!("not f32") };
        v
    }

    fn i64s(b: &HostBuffer) -> &Vec<i64> {
        let HostData::I64(v) = &b.data else { panic!("not i64") };
        v
    }

    fn logits_row(sum: f32) -> Vec<f32> {
        let peak = (sum as usize) % VOCAB;
        (0..VOCAB).map(|j| -((j as f32) - peak as f32).abs()).collect()
    }

    impl Program for Toy {
        fn entry_plan(&self, entry: &str) -> Result<&EntryPlan, String> {
            Ok(if entry == "prefill" { &self.prefill } else { &self.decode })
        }

        fn run(
            &self,
            entry: &str,
            inputs: &HashMap<String, HostBuffer>,
            wanted: &[&str],
        ) -> Result<HashMap<String, HostBuffer>, String> {
            self.run_keeping(entry, inputs, wanted, &[])
        }

        fn keeps_inputs(&self) -> bool {
            self.keeps
        }

        fn carries_outputs(&self) -> bool {
            self.keeps
        }

        fn move_rows(&self, name: &str, from: usize, to: usize, n: usize) -> Result<(), String> {
            assert_eq!(name, "kv_cache.0");
            assert!(from + n <= to || to + n <= from, "overlapping rows");
            let mut device = self.device.borrow_mut();
            let held = device.as_mut().ok_or("nothing resident")?;
            let HostData::F32(region) = &mut held.data else { panic!("f32") };
            if region.len() < (to + n) * WIDTH {
                region.resize((to + n) * WIDTH, 1000.0);
            }
            region.copy_within(from * WIDTH..(from + n) * WIDTH, to * WIDTH);
            held.shape[0] = held.shape[0].max(to + n);
            *self.moved.borrow_mut() += n;
            Ok(())
        }

        fn reclaim_rows(&self, name: &str, rows: usize) -> Result<(), String> {
            assert_eq!(name, "kv_cache.0");
            let mut device = self.device.borrow_mut();
            let held = device.as_mut().ok_or("nothing resident")?;
            let n: usize = held.shape[..held.shape.len() - 1].iter().product();
            if rows > n {
                return Err(format!("{rows} rows reclaimed of {n}"));
            }
            held.shape = vec![rows, WIDTH];
            *self.reclaimed.borrow_mut() += 1;
            Ok(())
        }

        fn device_argmax(&self) -> bool {
            self.argmax
        }

        fn cache_rows_multiple(&self) -> usize {
            self.multiple
        }

        fn argmax_last(&self, _: &str) -> Result<Vec<u32>, String> {
            let mut greedy = v3c_models::reference::Sampler::new(0.0, 1.0, 0);
            Ok(self.last_logits.borrow().iter().map(|l| greedy.sample(l)).collect())
        }

        fn device_sample(&self) -> bool {
            self.sample
        }

        fn sample_last(&self, entry: &str, draws: &[Draw]) -> Result<Vec<u32>, String> {
            let logits = self.last_logits.borrow();
            if draws.len() != logits.len() {
                return Err(format!("{entry}: {} draws for {} rows", draws.len(), logits.len()));
            }
            let argmax = self.argmax_last(entry)?;
            let draw = |(r, d): (usize, &Draw)| match d.temperature > 0.0 {
                true => v3c_models::sampling::draw_plain(&logits[r], d),
                false => argmax[r],
            };
            Ok(draws.iter().enumerate().map(draw).collect())
        }

        fn device_scores(&self) -> bool {
            self.scores
        }

        fn logits_row_last(&self, entry: &str, r: usize) -> Result<Vec<f32>, String> {
            self.last_logits.borrow().get(r).cloned().ok_or_else(|| format!("{entry}: no row {r}"))
        }

        fn scores_last(&self, entry: &str, tokens: &[i32], alternatives: usize) -> Result<Vec<Scores>, String> {
            let logits = self.last_logits.borrow();
            if tokens.len() != logits.len() {
                return Err(format!("{entry}: {} tokens for {} rows", tokens.len(), logits.len()));
            }
            let score = |(l, &t): (&Vec<f32>, &i32)| Scores {
                row: RowScore::of(l, u32::try_from(t).unwrap_or(u32::MAX)),
                top: v3c_models::sampling::top_k(l, alternatives),
            };
            Ok(logits.iter().zip(tokens).map(score).collect())
        }

        fn run_keeping(
            &self,
            entry: &str,
            inputs: &HashMap<String, HostBuffer>,
            wanted: &[&str],
            resident: &[&str],
        ) -> Result<HashMap<String, HostBuffer>, String> {
            self.run_carrying(entry, inputs, wanted, resident, &[])
        }

        /// As a GPU does: the device holds one `kv_cache.0` (a decode's, updated in place, or what
        /// a prefill carried over); a decode taking a prefill's `[P, W]` sees its rows first, then
        /// rows of garbage (1000: read before written, they would change the tokens).
        fn run_carrying(
            &self,
            entry: &str,
            inputs: &HashMap<String, HostBuffer>,
            wanted: &[&str],
            resident: &[&str],
            carry: &[&str],
        ) -> Result<HashMap<String, HostBuffer>, String> {
            let (tokens, positions) = (i64s(&inputs["tokens"]), i64s(&inputs["positions"]));
            let after = self.last_entry.replace(entry.to_string());
            if entry == "prefill" && positions[0] > 0 && after == "decode" {
                *self.interleaved.borrow_mut() += 1;
            }
            let mut out = HashMap::new();
            let given = &inputs["kv_cache.0"];
            // The device's region: what it holds (its shape) first, then what runs and moves left
            // there, then garbage (read before written, it would change the tokens).
            let held = || -> Result<HostBuffer, String> {
                assert!(self.keeps, "resident inputs on a program that keeps none");
                let held = self.device.borrow().clone().ok_or("nothing resident")?;
                let (n, want) =
                    (held.shape[..held.shape.len() - 1].iter().product::<usize>(), given.shape.iter().product());
                if held.shape.last() != given.shape.last() || n * WIDTH > want {
                    return Err(format!("held {:?}, given {:?}", held.shape, given.shape));
                }
                let mut data = f32s(&held).clone();
                data.resize(want, 1000.0);
                Ok(HostBuffer { shape: given.shape.clone(), data: HostData::F32(data) })
            };
            if entry == "prefill" {
                *self.prefilled.borrow_mut() += tokens.len();
                let mut cache = match resident.contains(&"kv_cache.0") {
                    true => f32s(&held()?).clone(),
                    false => f32s(given).clone(),
                };
                if !resident.is_empty() {
                    *self.carried_in.borrow_mut() += 1;
                }
                let mut logits = Vec::new();
                for &t in tokens {
                    cache.extend([t as f32; WIDTH]);
                    logits.extend(logits_row(cache.iter().step_by(WIDTH).sum()));
                }
                let rows = cache.len() / WIDTH;
                if carry.contains(&"kv_cache.0") {
                    // Into the device's region: the rows past these stay as they were.
                    let mut region = self.device.borrow_mut().take().map(|d| f32s(&d).clone()).unwrap_or_default();
                    if region.len() < cache.len() {
                        region.resize(cache.len(), 1000.0);
                    }
                    region[..cache.len()].copy_from_slice(&cache);
                    *self.device.borrow_mut() =
                        Some(HostBuffer { shape: vec![rows, WIDTH], data: HostData::F32(region) });
                }
                let cache = HostBuffer { shape: vec![rows, WIDTH], data: HostData::F32(cache) };
                if wanted.contains(&"kv_cache.0") {
                    out.insert("kv_cache.0".into(), cache);
                }
                *self.last_logits.borrow_mut() = logits.chunks(VOCAB).map(<[f32]>::to_vec).collect();
                if wanted.contains(&"logits") {
                    *self.logits_read.borrow_mut() += 1;
                }
                out.insert(
                    "logits".into(),
                    HostBuffer { shape: vec![tokens.len(), VOCAB], data: HostData::F32(logits) },
                );
                return Ok(out);
            }
            let mut cache = if resident.contains(&"kv_cache.0") {
                held()?
            } else {
                if f32s(given).len() != given.shape.iter().product::<usize>() {
                    return Err("kv_cache.0: no data for its shape".into());
                }
                *self.uploads.borrow_mut() += 1;
                given.clone()
            };
            self.decode_rows.borrow_mut().push(tokens.len());
            let mut logits = Vec::new();
            if self.paged {
                // Row p of sequence b: row p mod 64 of page table[b, p / 64] (-1: no page).
                let table = &inputs[PAGE_POOL];
                let (HostData::I32(t), &[_, n]) = (&table.data, &table.shape[..]) else { return Err("a table".into()) };
                *self.pool_pages.borrow_mut() = cache.shape[0];
                *self.slots.borrow_mut() = n * 64;
                let HostData::F32(rows) = &mut cache.data else { unreachable!() };
                let at = |b: usize, p: usize| -> Option<usize> {
                    let page = *t.get(b * n + p / 64)?;
                    (page >= 0).then(|| (page as usize * 64 + p % 64) * WIDTH)
                };
                for (b, (&tok, &p)) in tokens.iter().zip(positions).enumerate() {
                    if let Some(a) = at(b, p as usize) {
                        rows[a..a + WIDTH].fill(tok as f32);
                    }
                    let sum: f32 = (0..=p as usize).map(|j| at(b, j).map_or(0.0, |a| rows[a])).sum();
                    logits.extend(logits_row(sum));
                }
            } else {
                let slots = cache.shape[1];
                if slots % self.multiple != 0 {
                    return Err(format!("caches of {slots} rows"));
                }
                *self.slots.borrow_mut() = slots;
                let HostData::F32(rows) = &mut cache.data else { unreachable!() };
                for (b, (&t, &p)) in tokens.iter().zip(positions).enumerate() {
                    let seq = &mut rows[b * slots * WIDTH..(b + 1) * slots * WIDTH];
                    seq[p as usize * WIDTH..(p as usize + 1) * WIDTH].fill(t as f32);
                    logits.extend(logits_row(seq[..(p as usize + 1) * WIDTH].iter().step_by(WIDTH).sum()));
                }
            }
            if self.keeps {
                *self.device.borrow_mut() = Some(cache.clone());
            }
            if wanted.contains(&"kv_cache.0") {
                let bf16 = |v: &[f32]| HostData::Bf16(v.iter().map(|&x| v3c_models::dtype::f32_to_bf16(x)).collect());
                if let (true, HostData::F32(v)) = (self.bf16, &cache.data) {
                    cache.data = bf16(v);
                }
                out.insert("kv_cache.0".into(), cache);
            }
            *self.last_logits.borrow_mut() = logits.chunks(VOCAB).map(<[f32]>::to_vec).collect();
            if wanted.contains(&"logits") {
                *self.logits_read.borrow_mut() += 1;
            }
            out.insert("logits".into(), HostBuffer { shape: vec![tokens.len(), VOCAB], data: HostData::F32(logits) });
            Ok(out)
        }
    }

    /// The toy with prefill and decode caches of one element (f32), as a GPU artifact whose
    /// prefills may leave their caches on the device for the decode steps.
    fn one_element(mut t: Toy) -> Toy {
        for p in [&mut t.prefill, &mut t.decode] {
            p.buffers.push(crate::plan::Buffer {
                id: 0,
                kind: crate::plan::BufferKind::Input { name: "kv_cache.0".into() },
                dims: Vec::new(),
                shape: Vec::new(),
                dtype: "f32".into(),
                bytes: 0,
            });
        }
        t
    }

    #[test]
    fn caches_kept_on_the_device_give_the_tokens_of_caches_sent_each_step() {
        let greedy = || v3c_models::reference::Sampler::new(0.0, 1.0, 0);
        let (host, device) = (Toy::new(false), Toy::new(true));
        let prompt = [3, 5, 1, 7, 2, 9];
        let mut a = ArtifactSession::new(&host, 20).unwrap();
        let mut b = ArtifactSession::new(&device, 20).unwrap();
        let one = generate(&mut a, &prompt, 10, &mut greedy(), None).unwrap();
        let kept = generate(&mut b, &prompt, 10, &mut greedy(), None).unwrap();
        assert_eq!(one.tokens, kept.tokens);
        assert_eq!(*host.uploads.borrow(), 9, "every step sends the caches");
        assert_eq!(*device.uploads.borrow(), 1, "only the first decode step sends them");
        // A batch: the same tokens per sequence, one upload.
        let prompts = vec![vec![3, 5, 1], vec![8, 8, 2, 4, 4]];
        let (host, device) = (Toy::new(false), Toy::new(true));
        let mut samplers = vec![greedy(), greedy()];
        let sent = generate_batch(&host, &prompts, 6, &mut samplers, None).unwrap();
        let mut samplers = vec![greedy(), greedy()];
        let kept = generate_batch(&device, &prompts, 6, &mut samplers, None).unwrap();
        for (x, y) in sent.iter().zip(&kept) {
            assert_eq!(x.tokens, y.tokens);
        }
        assert_eq!(*device.uploads.borrow(), 1);
        // Greedy on a program that picks tokens itself: the same tokens, no logits read back after
        // the prefill; sampling with a temperature still reads them.
        let mut picker = Toy::new(true);
        picker.argmax = true;
        let mut s = ArtifactSession::new(&picker, 20).unwrap();
        let picked = generate(&mut s, &prompt, 10, &mut greedy(), None).unwrap();
        assert_eq!(picked.tokens, one.tokens);
        assert_eq!(*picker.logits_read.borrow(), 0);
        let mut samplers = vec![greedy(), greedy()];
        let both = generate_batch(&picker, &prompts, 6, &mut samplers, None).unwrap();
        assert_eq!(
            both.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(),
            sent.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>()
        );
        assert_eq!(*picker.logits_read.borrow(), 0);
        let mut s = ArtifactSession::new(&picker, 20).unwrap();
        generate(&mut s, &prompt, 4, &mut v3c_models::reference::Sampler::new(0.8, 0.9, 3), None).unwrap();
        assert_eq!(*picker.logits_read.borrow(), 3);
        // So does greedy with a penalty or a bias (the argmax of logits the host changes): the
        // tokens of a program that leaves picking to the host.
        let shaping = v3c_models::sampling::Shaping { logit_bias: vec![(2, 1.5)], ..Default::default() };
        let penalized = || greedy().shaped(shaping.clone());
        let picker = Toy::new(true);
        let mut s = ArtifactSession::new(&picker, 20).unwrap();
        let got = generate(&mut s, &prompt, 10, &mut penalized(), None).unwrap();
        let want =
            generate(&mut ArtifactSession::new(&Toy::new(false), 20).unwrap(), &prompt, 10, &mut penalized(), None);
        assert_eq!(got.tokens, want.unwrap().tokens);
        assert_ne!(got.tokens, one.tokens, "the penalty changes the picks");
        assert_eq!(*picker.logits_read.borrow(), 9);
        let mut samplers = vec![penalized(), greedy()];
        let both = generate_batch(&picker, &prompts, 6, &mut samplers, None).unwrap();
        let mut samplers = vec![penalized(), greedy()];
        let want = generate_batch(&Toy::new(false), &prompts, 6, &mut samplers, None).unwrap();
        assert_eq!(
            both.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(),
            want.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>()
        );
        // A failed step is not taken for kept caches: with nothing on the device, the session's
        // shape-only copy is refused instead of sent as zeros.
        let device = Toy::new(true);
        let mut s = ArtifactSession::new(&device, 20).unwrap();
        s.prefill(&prompt).unwrap();
        s.decode(4).unwrap();
        *device.device.borrow_mut() = None;
        assert_eq!(s.decode(4).unwrap_err(), "nothing resident");
        assert_eq!(s.decode(4).unwrap_err(), "kv_cache.0: no data for its shape");
    }

    /// A program that scores tokens itself (as the device's scoring kernel does) gives a stream's
    /// perplexity with the host's bits and reads no prompt's logits back: windows of several
    /// chunks, overlapping and not; a session's prompt scored row by row as the host scores it.
    #[test]
    fn tokens_scored_where_the_program_runs_are_the_hosts() {
        let stream: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
        for (window, stride) in [(10, 10), (13, 5), (32, 32)] {
            let host = Toy::new(true);
            let want = crate::perplexity::perplexity(&host, &stream, window, stride, &mut |_, _| {}).unwrap();
            assert!(*host.logits_read.borrow() > 0);
            let scoring = Toy { scores: true, ..Toy::new(true) };
            let got = crate::perplexity::perplexity(&scoring, &stream, window, stride, &mut |_, _| {}).unwrap();
            assert_eq!((got.tokens, got.nll.to_bits()), (want.tokens, want.nll.to_bits()), "{window} / {stride}");
            assert_eq!(*scoring.logits_read.borrow(), 0, "no logits read back");
            assert!(got.nll.is_finite() && got.nll > 0.0);
        }
        let scoring = Toy { scores: true, ..Toy::new(true) };
        let prompt = [3u32, 5, 1, 7, 2, 9, 4, 4, 8, 1];
        let scores = ArtifactSession::new(&scoring, 16).unwrap().prefill_scores(&prompt).unwrap().unwrap();
        let (rows, vocab) = ArtifactSession::new(&Toy::new(true), 16).unwrap().prefill_rows(&prompt).unwrap();
        assert_eq!(scores.len(), prompt.len());
        for (i, s) in scores.iter().enumerate() {
            let row = &rows[i * vocab..(i + 1) * vocab];
            match prompt.get(i + 1) {
                Some(&t) => assert_eq!(*s, RowScore::of(row, t)),
                None => assert!(s.logit.is_nan() && s.sum == RowScore::of(row, 0).sum),
            }
        }
        assert!(ArtifactSession::new(&Toy::new(true), 16).unwrap().prefill_scores(&prompt).unwrap().is_none());
    }

    /// A program that draws sampled tokens itself (as the device's sampling kernel does) gives the
    /// tokens of the host's samplers with the same seeds and reads no logits back: one sequence,
    /// and a batch mixing sampled and greedy sequences, with top-p, top-k and min-p too; a sampler
    /// it cannot draw for (a penalty, a bias) has the batch's logits read back, its tokens the host's; a program whose steps
    /// hand the logits back anyway draws the same tokens from them on the host.
    #[test]
    fn tokens_drawn_where_the_program_runs_are_the_host_samplers() {
        use v3c_models::reference::Sampler;
        let prompt = [3, 5, 1, 7, 2, 9];
        let host = Toy::new(true);
        let mut drawing = Toy::new(true);
        (drawing.argmax, drawing.sample) = (true, true);
        let sampled = |seed| Sampler::new(2.0, 1.0, seed);
        let want = generate(&mut ArtifactSession::new(&host, 20).unwrap(), &prompt, 12, &mut sampled(5), None).unwrap();
        let got =
            generate(&mut ArtifactSession::new(&drawing, 20).unwrap(), &prompt, 12, &mut sampled(5), None).unwrap();
        assert_eq!(got.tokens, want.tokens);
        assert_eq!(*drawing.logits_read.borrow(), 0);
        let distinct: std::collections::HashSet<_> = want.tokens.iter().collect();
        assert!(distinct.len() > 3, "the draws vary: {:?}", want.tokens);
        let greedy =
            generate(&mut ArtifactSession::new(&host, 20).unwrap(), &prompt, 12, &mut Sampler::new(0.0, 1.0, 5), None);
        assert_ne!(greedy.unwrap().tokens, want.tokens, "sampled, not greedy");
        // A batch: sampled and greedy sequences together.
        let prompts = vec![vec![3, 5, 1], vec![8, 8, 2, 4, 4]];
        let samplers = || vec![sampled(1), Sampler::new(0.0, 1.0, 0)];
        let tokens = |g: Vec<Generation>| g.into_iter().map(|g| g.tokens).collect::<Vec<_>>();
        let want = tokens(generate_batch(&Toy::new(true), &prompts, 8, &mut samplers(), None).unwrap());
        let drawing_batch = Toy { argmax: true, sample: true, ..Toy::new(true) };
        assert_eq!(tokens(generate_batch(&drawing_batch, &prompts, 8, &mut samplers(), None).unwrap()), want);
        assert_eq!(*drawing_batch.logits_read.borrow(), 0);
        // Steps that hand the logits back (caches through the host): the same draws, on the host.
        let handing = Toy { argmax: true, sample: true, ..Toy::new(false) };
        assert_eq!(tokens(generate_batch(&handing, &prompts, 8, &mut samplers(), None).unwrap()), want);
        // Top-p, top-k and min-p too are drawn where the program runs; a penalty or a bias is the
        // host's sampler's, from logits read back.
        let top_k = v3c_models::sampling::Shaping { top_k: 3, ..Default::default() };
        let min_p = v3c_models::sampling::Shaping { min_p: 0.2, ..Default::default() };
        let top_p = || vec![sampled(1).shaped(top_k.clone()), Sampler::new(2.0, 0.8, 7).shaped(min_p.clone())];
        let want = tokens(generate_batch(&Toy::new(true), &prompts, 8, &mut top_p(), None).unwrap());
        let drawing = Toy { argmax: true, sample: true, ..Toy::new(true) };
        assert_eq!(tokens(generate_batch(&drawing, &prompts, 8, &mut top_p(), None).unwrap()), want);
        assert_eq!(*drawing.logits_read.borrow(), 0);
        let penalty = v3c_models::sampling::Shaping { presence_penalty: 0.5, ..Default::default() };
        let bias = v3c_models::sampling::Shaping { logit_bias: vec![(2, 1.5)], ..Default::default() };
        for odd in [sampled(7).shaped(bias), sampled(7).shaped(penalty)] {
            let with = || vec![sampled(1), odd.clone()];
            let want = tokens(generate_batch(&Toy::new(true), &prompts, 8, &mut with(), None).unwrap());
            let reading = Toy { argmax: true, sample: true, ..Toy::new(true) };
            assert_eq!(tokens(generate_batch(&reading, &prompts, 8, &mut with(), None).unwrap()), want);
            assert!(*reading.logits_read.borrow() > 0);
        }
    }

    /// A program whose decode caches are whole pages of rows, handed back in bf16 (a GPU artifact
    /// whose decode attention reads bf16 pages in place): sessions round their caches up, keep f32
    /// on the host, and give the tokens of a program without either; caches that cannot be whole
    /// pages within the plan are refused up front.
    #[test]
    fn caches_of_whole_pages_in_bf16_give_the_same_tokens() {
        let greedy = || v3c_models::reference::Sampler::new(0.0, 1.0, 0);
        let prompt = [3, 5, 1, 7, 2, 9];
        let plain = Toy::new(false);
        let mut paged = Toy::new(false);
        (paged.multiple, paged.bf16) = (16, true);
        let one = generate(&mut ArtifactSession::new(&plain, 12).unwrap(), &prompt, 6, &mut greedy(), None).unwrap();
        let mut s = ArtifactSession::new(&paged, 12).unwrap();
        let two = generate(&mut s, &prompt, 6, &mut greedy(), None).unwrap();
        assert_eq!(one.tokens, two.tokens);
        assert_eq!((*plain.slots.borrow(), *paged.slots.borrow()), (12, 16));
        let prompts = vec![vec![3, 5, 1], vec![8, 8, 2, 4, 4]];
        let batch = |p: &Toy| {
            let mut samplers = vec![greedy(), greedy()];
            generate_batch(p, &prompts, 6, &mut samplers, None)
                .unwrap()
                .into_iter()
                .map(|g| g.tokens)
                .collect::<Vec<_>>()
        };
        assert_eq!(batch(&plain), batch(&paged));
        assert_eq!(*paged.slots.borrow(), 16);
        paged.multiple = 64;
        let err = ArtifactSession::new(&paged, 12).err().unwrap();
        assert!(err.contains("caches of 64 rows in whole pages") && err.contains("at most 32 rows"), "{err}");
    }

    /// A decode entry over a pool of pages: sessions lay the prefilled rows into pages, hand out a
    /// page as a sequence crosses into it, and give the tokens of caches per sequence; a batch's
    /// pool holds the pages its sequences may fill (not the longest's for each), and a sequence
    /// that ends gives its pages back (its later rows are written nowhere).
    #[test]
    fn a_pool_of_pages_gives_the_tokens_of_caches_per_sequence() {
        let greedy = || v3c_models::reference::Sampler::new(0.0, 1.0, 0);
        let long: Vec<u32> = (0..60).map(|i| (i * 7 % 11) as u32).collect();
        let mut plain = Toy::new(false);
        plain.prefill = plan("prefill", 4, 128, vec![128, WIDTH]);
        plain.decode = plan("decode", 3, 128, vec![3, 128, WIDTH]);
        let paged = Toy::paged();
        let one = generate(&mut ArtifactSession::new(&plain, 75).unwrap(), &long, 15, &mut greedy(), None).unwrap();
        let two = generate(&mut ArtifactSession::new(&paged, 75).unwrap(), &long, 15, &mut greedy(), None).unwrap();
        assert_eq!(one.tokens, two.tokens, "across the page boundary at row 64");
        assert_eq!((*paged.pool_pages.borrow(), *paged.slots.borrow()), (2, 128));
        let prompts = vec![long.clone(), vec![8, 8, 2], long[..50].to_vec()];
        let batch = |p: &Toy, eos: Option<u32>| {
            let mut samplers = vec![greedy(), greedy(), greedy()];
            generate_batch(p, &prompts, 10, &mut samplers, eos)
                .unwrap()
                .into_iter()
                .map(|g| g.tokens)
                .collect::<Vec<_>>()
        };
        assert_eq!(batch(&plain, None), batch(&paged, None));
        assert_eq!(*paged.pool_pages.borrow(), 2 + 1 + 1, "70, 13 and 60 tokens: 4 pages, not 3 x 2");
        let mut samplers = vec![greedy(), greedy(), greedy()];
        let held: Vec<_> =
            generate_batch(&paged, &prompts, 10, &mut samplers, None).unwrap().into_iter().map(|g| g.pages).collect();
        assert_eq!(held, vec![Some((2, 4)), Some((1, 4)), Some((1, 4))], "the pages each held at its end");
        // Sequences ending early (at an eos): the others' tokens as before.
        let eos = batch(&plain, None)[1].get(2).copied();
        assert_eq!(batch(&plain, eos), batch(&paged, eos));
    }

    /// The caches cross to the host only where they must: a program that keeps inputs carries a
    /// prefill's caches from chunk to chunk on its device and, where its prefill and decode caches
    /// have one element, into the decode steps (the decode's first rows: contiguous, or the pool's
    /// first pages) — the tokens of caches sent each step, nothing uploaded for the decode; a
    /// batch's prefilled caches moved on the device to their rows, nothing uploaded either.
    #[test]
    fn prefill_caches_carried_on_the_device_give_the_same_tokens() {
        let greedy = || v3c_models::reference::Sampler::new(0.0, 1.0, 0);
        let long: Vec<u32> = (0..70).map(|i| (i * 5 % 11) as u32).collect();
        for paged in [false, true] {
            let make = |keeps: bool| {
                let mut t = if paged { Toy::paged() } else { Toy::new(keeps) };
                t.keeps = keeps;
                if !paged {
                    t.prefill = plan("prefill", 4, 128, vec![128, WIDTH]);
                    t.decode = plan("decode", 3, 128, vec![3, 128, WIDTH]);
                }
                one_element(t)
            };
            let (host, device) = (make(false), make(true));
            let sent = generate(&mut ArtifactSession::new(&host, 85).unwrap(), &long, 15, &mut greedy(), None).unwrap();
            let mut s = ArtifactSession::new(&device, 85).unwrap();
            assert!(s.decode_on_device);
            let kept = generate(&mut s, &long, 15, &mut greedy(), None).unwrap();
            assert_eq!(sent.tokens, kept.tokens, "paged {paged}");
            assert_eq!(*device.uploads.borrow(), 0, "paged {paged}: the decode steps never upload the caches");
            assert_eq!(*device.carried_in.borrow(), 70 / 4, "paged {paged}: every chunk after the first");
            // A batch: each prompt's caches moved on the device to their own rows (the one
            // prefilled last — the longest prompt in a pool, slot 0 otherwise — left where it is);
            // nothing uploaded.
            let prompts = vec![vec![8, 8, 2, 4, 4], long.clone(), vec![3; 66]];
            let run = |p: &Toy| {
                let mut samplers = vec![greedy(), greedy(), greedy()];
                generate_batch(p, &prompts, 6, &mut samplers, None)
                    .unwrap()
                    .into_iter()
                    .map(|g| g.tokens)
                    .collect::<Vec<_>>()
            };
            let device = make(true);
            assert_eq!(run(&host), run(&device), "paged {paged}");
            assert_eq!(*device.uploads.borrow(), 0, "paged {paged}");
            let moved = if paged { 5 + 66 } else { 70 + 66 };
            assert_eq!(*device.moved.borrow(), moved, "paged {paged}");
        }
        // Prefill and decode caches of different elements: the last chunk reads them back.
        let device = Toy::new(true);
        assert!(!ArtifactSession::new(&device, 20).unwrap().decode_on_device);
    }

    /// Requests join a running batch as sequences end: five prompts (multi-chunk ones among
    /// them) through two slots give each prompt's tokens generated alone — caches per sequence
    /// or a pool of pages on the host (rows laid into the vacated slot, pages reused), and a pool
    /// on the device (each prefill in the scratch pages, its rows moved to its own: nothing
    /// uploaded). A pool's requests wait for pages, not only for slots; caches per sequence on a
    /// device run the prompts in batches one after another.
    #[test]
    fn requests_joining_a_running_batch_get_the_tokens_they_get_alone() {
        let greedy = || v3c_models::reference::Sampler::new(0.0, 1.0, 0);
        let long: Vec<u32> = (0..45).map(|i| (i * 7 % 11) as u32).collect();
        let prompts = vec![vec![8, 8, 2], long.clone(), vec![5, 1, 9, 9, 4, 6, 2], long[..20].to_vec(), vec![1]];
        let plain = toy_plain;
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&mut ArtifactSession::new(&plain(), p.len() + 30).unwrap(), p, 30, &mut greedy(), None))
            .map(|g| g.unwrap().tokens)
            .collect();
        let serve = |p: &Toy, slots: usize, eos: Option<u32>| {
            let mut samplers = vec![greedy(); prompts.len()];
            generate_queue(p, &prompts, Queue::new(slots), 30, &mut samplers, eos).unwrap()
        };
        let tokens = |s: &Served| s.generations.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>();
        let mut device = Toy::paged();
        device.keeps = true;
        let device = one_element(device);
        for (name, toy) in [("per sequence", plain()), ("pool", Toy::paged()), ("pool on the device", device)] {
            let served = serve(&toy, 2, None);
            assert_eq!(tokens(&served), alone, "{name}");
            assert_eq!((served.slots, served.joined), (2, 3), "{name}");
            // A step runs the sequences decoding alone where it can: one row while the other slot
            // waits for its prompt's chunks (and in the end).
            let rows = toy.decode_rows.take();
            let alone_steps = rows.iter().filter(|&&r| r == 1).count();
            assert_eq!(rows.iter().filter(|&&r| r != 1 && r != 2).count(), 0, "{name}: {rows:?}");
            match toy.paged {
                true => assert!(alone_steps >= 10, "{name}: {rows:?}"),
                false => assert_eq!(alone_steps, 0, "{name}: a row per slot, its caches"),
            }
            // Sequences ending at an eos leave early: the tokens up to it.
            let eos = alone[1][3];
            let cut: Vec<Vec<u32>> = alone
                .iter()
                .map(|t| t.iter().position(|&x| x == eos).map_or(t.clone(), |at| t[..=at].to_vec()))
                .collect();
            assert_eq!(tokens(&serve(&toy, 2, Some(eos))), cut, "{name}");
            if toy.keeps {
                assert_eq!(*toy.uploads.borrow(), 0, "{name}: the caches never crossed to the device");
                assert!(*toy.moved.borrow() > 0 && *toy.reclaimed.borrow() > 0);
                // Pages: the longest prompt's scratch page, then the two longest sequences' 2 + 1.
                assert_eq!(*toy.pool_pages.borrow(), 1 + 2 + 1, "{name}");
            }
        }
        // A pool too small for two long sequences at once: the second waits for the first's pages.
        let mut small = Toy::paged();
        small.decode.bounds.insert("kv_cache.0".into(), vec![2, 64, WIDTH]);
        let twice = vec![long.clone(), long.clone()];
        let mut samplers = vec![greedy(), greedy()];
        let served = generate_queue(&small, &twice, Queue::new(2), 30, &mut samplers, None).unwrap();
        assert_eq!(tokens(&served), vec![alone[1].clone(), alone[1].clone()]);
        assert_eq!(served.joined, 1, "the second joined when the first ended");
        small.decode.bounds.insert("kv_cache.0".into(), vec![1, 64, WIDTH]);
        let mut samplers = vec![greedy(), greedy()];
        let err = generate_queue(&small, &twice, Queue::new(2), 30, &mut samplers, None).unwrap_err();
        assert!(err.contains("75 tokens needs 2 pages") && err.contains("pool holds 1"), "{err}");
        // Caches per sequence on a device: batches one after another, the same tokens.
        let mut waves = plain();
        waves.keeps = true;
        let waves = one_element(waves);
        assert!(!joins_running_batches(&waves).unwrap());
        let served = serve(&waves, 2, None);
        assert_eq!((tokens(&served), served.joined), (alone.clone(), 0));
    }

    /// A toy's sampler: greedy, or seeded sampling.
    /// Greedy without a seed; with one, sampling, shaped by the seed: plain, with top-k and a
    /// repetition penalty, or greedy with a frequency penalty and a logit bias (the penalties count
    /// the sequence's own tokens, wherever it runs).
    fn toy_sampler(seed: Option<u64>) -> v3c_models::reference::Sampler {
        use v3c_models::sampling::Shaping;
        let Some(seed) = seed else { return v3c_models::reference::Sampler::new(0.0, 1.0, 0) };
        let (t, shaping) = match seed % 3 {
            0 => (0.9, Shaping::default()),
            1 => (0.9, Shaping { top_k: 4, repetition_penalty: 1.5, ..Shaping::default() }),
            _ => (0.0, Shaping { frequency_penalty: 0.7, logit_bias: vec![(4, 0.3)], ..Shaping::default() }),
        };
        v3c_models::reference::Sampler::new(t, 0.8, seed).shaped(shaping)
    }

    /// A request to [`serve_requests`]: its prompt, its new tokens, the not-yet answers before it
    /// arrives, its sampler's seed (none: greedy).
    type ToyRequest = (Vec<u32>, usize, usize, Option<u64>);

    /// Serves `requests` on `toy` ([`serve`]); each request's tokens as reported at its end,
    /// checked equal to those reported as picked; every request ends once, none is refused.
    fn serve_requests(
        toy: &Toy,
        requests: &[ToyRequest],
        slots: usize,
        eos: Option<u32>,
        prefill_budget: Option<usize>,
    ) -> Vec<Vec<u32>> {
        serve_reusing(toy, requests, slots, eos, prefill_budget, false).into_iter().map(|g| g.0).collect()
    }

    /// As [`serve_requests`], prefixes reused where `reuse`: each request's tokens and its prompt's
    /// rows copied from another's.
    fn serve_reusing(
        toy: &Toy,
        requests: &[ToyRequest],
        slots: usize,
        eos: Option<u32>,
        prefill_budget: Option<usize>,
        reuse_prefixes: bool,
    ) -> Vec<(Vec<u32>, usize)> {
        let limits: Vec<usize> = requests.iter().map(|(p, n, _, _)| p.len() + n).collect();
        let longest = requests.iter().map(|(p, _, _, _)| p.len()).max().unwrap_or(0);
        let (mut arrived, mut waits) = (0, requests.first().map_or(0, |r| r.2));
        let mut next = |_: bool| {
            if arrived == requests.len() {
                return Arrival::Closed;
            }
            if waits > 0 {
                waits -= 1;
                return Arrival::NotYet;
            }
            let (prompt, max_new, _, seed) = requests[arrived].clone();
            arrived += 1;
            waits = requests.get(arrived).map_or(0, |r| r.2);
            Arrival::Request(Request::new(prompt, max_new, toy_sampler(seed)))
        };
        let mut got: Vec<Option<(Vec<u32>, usize)>> = vec![None; requests.len()];
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
        let mut report = |id: usize, p: Progress| -> Result<(), String> {
            match p {
                Progress::Scored(..) => {}
                Progress::Token(t) => streamed[id].push(t),
                Progress::Ended(g) => {
                    assert!(got[id].is_none(), "request {id} ended twice");
                    assert_eq!(g.stopped_at_eos, eos.is_some() && g.tokens.last() == eos.as_ref());
                    got[id] = Some((g.tokens, g.reused));
                }
                Progress::Refused(e) => return Err(format!("request {id} refused: {e}")),
                Progress::Cancelled(_) => return Err(format!("request {id} cancelled")),
            }
            Ok(())
        };
        let serving = Serving { prefill_budget, reuse_prefixes, ..Serving::new(slots, &limits, longest, eos) };
        serve(toy, &serving, &mut next, &mut report).unwrap();
        let got: Vec<(Vec<u32>, usize)> = got.into_iter().map(|g| g.expect("every request ends")).collect();
        assert_eq!(got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(), streamed, "the tokens reported as picked");
        got
    }

    /// A toy whose caches are per sequence, chunks of 4 tokens, sequences of up to 128.
    fn toy_plain() -> Toy {
        let mut t = Toy::new(false);
        t.prefill = plan("prefill", 4, 128, vec![128, WIDTH]);
        t.decode = plan("decode", 3, 128, vec![3, 128, WIDTH]);
        t
    }

    /// Each request generated alone.
    fn toy_alone(requests: &[ToyRequest], eos: Option<u32>) -> Vec<Vec<u32>> {
        let single = toy_plain();
        let generate_alone = |(p, n, _, seed): &ToyRequest| {
            let mut session = ArtifactSession::new(&single, p.len() + n).unwrap();
            generate(&mut session, p, *n, &mut toy_sampler(*seed), eos).unwrap().tokens
        };
        requests.iter().map(generate_alone).collect()
    }

    /// A long prompt joining while another sequence decodes prefills one chunk between decode
    /// steps by default, and as many as a budget holds (12 tokens: three chunks of 4) — the same
    /// tokens either way; on the device as on the host.
    #[test]
    fn a_joining_prompt_prefills_within_the_budget_between_decode_steps() {
        let long: Vec<u32> = (0..45).map(|i| (i * 7 % 11) as u32).collect();
        // The second arrives after the first's first decode steps.
        let requests: Vec<ToyRequest> = vec![(vec![3], 40, 0, None), (long, 5, 3, Some(7))];
        let alone = toy_alone(&requests, None);
        let mut device = Toy::paged();
        device.keeps = true;
        for (name, toy) in
            [("per sequence", toy_plain()), ("pool", Toy::paged()), ("pool on the device", one_element(device))]
        {
            let mut interleaved = Vec::new();
            for budget in [None, Some(12), Some(1)] {
                assert_eq!(serve_requests(&toy, &requests, 2, None, budget), alone, "{name}, {budget:?}");
                interleaved.push(toy.interleaved.replace(0));
            }
            // 12 chunks: the first after a decode step at position 0, the others each after one;
            // three a step: 4 steps, 3 after the first; a budget under a chunk: one a step.
            assert_eq!(interleaved, [11, 3, 11], "{name}");
        }
    }

    /// A request that arrived before `serve` read it (queued behind others) counts its wait from
    /// its arrival; one without an arrival time, from the reading.
    #[test]
    fn a_request_queued_before_it_is_read_counts_its_wait_from_its_arrival() {
        let toy = toy_plain();
        for (arrived, at_least) in [(Some(std::time::Duration::from_secs(2)), 2.0), (None, 0.0)] {
            let arrived = arrived.map(|d| std::time::Instant::now() - d);
            let mut request = Some(Request { arrived, ..Request::new(vec![1, 2], 2, toy_sampler(None)) });
            let mut next = |_: bool| request.take().map_or(Arrival::Closed, Arrival::Request);
            let mut queued = None;
            let mut report = |_: usize, p: Progress| {
                if let Progress::Ended(g) = p {
                    queued = Some(g.queued_s);
                }
                Ok(())
            };
            let serving = Serving { reuse_prefixes: true, ..Serving::new(1, &[4], 2, None) };
            serve(&toy, &serving, &mut next, &mut report).unwrap();
            let queued = queued.unwrap();
            assert!(queued >= at_least && queued < at_least + 1.0, "{arrived:?}: queued {queued} s");
        }
    }

    /// What a scripted client does: sends a request (prompt, new tokens) or cancels one (its
    /// number: requests are numbered in arrival order), once request `.0` has `.1` tokens (None:
    /// at once).
    type Scripted = (Option<(usize, usize)>, Result<(Vec<u32>, usize), usize>);

    /// Serves `script` on `toy`; per request its tokens and whether it was cancelled, and the
    /// requests whose cancellation was refused.
    #[allow(clippy::type_complexity)]
    fn serve_script(toy: &Toy, slots: usize, script: &[Scripted]) -> (Vec<Option<(Vec<u32>, bool)>>, Vec<usize>) {
        let picked = RefCell::new(vec![Vec::<u32>::new(); script.len()]);
        let limits: Vec<usize> = script.iter().filter_map(|(_, a)| a.as_ref().ok()).map(|(p, n)| p.len() + n).collect();
        let longest = script.iter().filter_map(|(_, a)| a.as_ref().ok()).map(|(p, _)| p.len()).max().unwrap_or(0);
        let mut at = 0;
        let mut next = |idle: bool| {
            let Some((when, what)) = script.get(at) else { return Arrival::Closed };
            if when.is_some_and(|(r, k)| picked.borrow()[r].len() < k) {
                assert!(!idle, "item {at} of the script waits for tokens while nothing runs");
                return Arrival::NotYet;
            }
            at += 1;
            match what {
                Ok((prompt, max_new)) => {
                    let (prompt, max_new) = (prompt.clone(), *max_new);
                    Arrival::Request(Request::new(prompt, max_new, toy_sampler(None)))
                }
                Err(id) => Arrival::Cancel(*id),
            }
        };
        let (mut done, mut refused) = (vec![None; script.len()], Vec::new());
        let mut report = |id: usize, p: Progress| -> Result<(), String> {
            match p {
                Progress::Scored(..) => {}
                Progress::Token(t) => picked.borrow_mut()[id].push(t),
                Progress::Ended(g) => done[id] = Some((g.tokens, false)),
                Progress::Cancelled(g) => {
                    assert_eq!(g.tokens, picked.borrow()[id], "a cancelled request's tokens so far");
                    done[id] = Some((g.tokens, true));
                }
                Progress::Refused(_) => refused.push(id),
            }
            Ok(())
        };
        let serving = Serving { reuse_prefixes: true, ..Serving::new(slots, &limits, longest, None) };
        serve(toy, &serving, &mut next, &mut report).unwrap();
        (done, refused)
    }

    /// Cancelled requests: one waiting for a slot leaves with no tokens, one decoding with the
    /// tokens it has (its pages to the next), one joining mid-prefill with none (its slot and
    /// scratch rows to the next); the others get their tokens alone, and cancelling one that is
    /// gone is refused — per sequence, pool, pool on the device.
    #[test]
    fn cancelled_requests_leave_the_batch_and_the_others_run_as_alone() {
        let long: Vec<u32> = (0..45).map(|i| (i * 7 % 11) as u32).collect();
        let alone = |p: &[u32], n: usize| toy_alone(&[(p.to_vec(), n, 0, None)], None).remove(0);
        let kinds = || {
            let mut device = Toy::paged();
            device.keeps = true;
            [("per sequence", toy_plain()), ("pool", Toy::paged()), ("pool on the device", one_element(device))]
        };
        for (name, toy) in kinds() {
            // One slot: the second and third wait while the first decodes.
            let script: Vec<Scripted> = vec![
                (None, Ok((vec![3], 20))),
                (None, Ok((long.clone(), 5))),
                (None, Ok((vec![1, 2], 5))),
                (Some((0, 3)), Err(1)),
                (Some((0, 6)), Err(0)),
            ];
            let (done, refused) = serve_script(&toy, 1, &script);
            let first = alone(&[3], 20)[..6].to_vec();
            assert_eq!(done[0], Some((first, true)), "{name}: cancelled while decoding");
            assert_eq!(done[1], Some((Vec::new(), true)), "{name}: cancelled while waiting");
            assert_eq!(done[2], Some((alone(&[1, 2], 5), false)), "{name}");
            assert!(refused.is_empty(), "{name}");
            // Two slots: the long prompt joins while the first decodes (a chunk a step) and is
            // cancelled halfway through its prefill; the next joins in its place.
            let script: Vec<Scripted> = vec![
                (None, Ok((vec![3], 30))),
                (Some((0, 2)), Ok((long.clone(), 5))),
                (Some((0, 5)), Err(1)),
                (None, Ok((vec![5, 5], 4))),
                (Some((2, 4)), Err(1)),
            ];
            let (done, refused) = serve_script(&toy, 2, &script);
            assert_eq!(done[0], Some((alone(&[3], 30), false)), "{name}");
            assert_eq!(done[1], Some((Vec::new(), true)), "{name}: cancelled while joining");
            assert_eq!(done[2], Some((alone(&[5, 5], 4), false)), "{name}: in the cancelled one's slot");
            assert_eq!(refused, [1], "{name}: cancelled already");
        }
    }

    /// A program that scores tokens itself serves requests asking for their tokens'
    /// log-probabilities (and up to 20 alternatives) with the host's values, greedy and sampled,
    /// joining and prefilled together, and reads no decode step's logits back; one that picks on
    /// the host (a penalty) reads them back, the same values.
    #[test]
    fn logprobs_scored_on_the_device_are_the_hosts() {
        let requests = || {
            let ask = |prompt: Vec<u32>, top: usize, sampler| Request {
                logprobs: true,
                top_logprobs: top,
                ..Request::new(prompt, 9, sampler)
            };
            vec![
                ask(vec![3, 5, 1], 0, toy_sampler(None)),
                ask(vec![2, 9], 1, v3c_models::reference::Sampler::new(1.3, 1.0, 7)),
                Request::new(vec![4, 4, 6], 9, toy_sampler(None)),
                ask(vec![7, 1, 1, 2], 1, toy_sampler(None)),
            ]
        };
        let run = |toy: &Toy, extra: Option<Request>| {
            let mut all = requests();
            all.extend(extra);
            let n = all.len();
            let mut arriving = all.into_iter();
            let mut next = |_: bool| arriving.next().map_or(Arrival::Closed, Arrival::Request);
            let mut ended: Vec<Option<Generation>> = vec![None; n];
            let mut report = |id: usize, p: Progress| {
                if let Progress::Ended(g) = p {
                    ended[id] = Some(g);
                }
                Ok(())
            };
            serve(toy, &Serving::new(2, &[15, 15], 4, None), &mut next, &mut report).unwrap();
            ended.into_iter().map(|g| g.expect("every request ends")).collect::<Vec<_>>()
        };
        let device = || {
            let mut t = Toy::paged();
            (t.keeps, t.argmax, t.sample, t.scores) = (true, true, true, true);
            one_element(t)
        };
        let want = run(&Toy::paged(), None);
        let scoring = device();
        let got = run(&scoring, None);
        assert_eq!(*scoring.logits_read.borrow(), 0, "no decode step's logits read back");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.tokens, &g.logprobs, &g.top_logprobs), (&w.tokens, &w.logprobs, &w.top_logprobs));
        }
        assert!(got[0].logprobs.iter().chain(&got[1].logprobs).all(|lp| lp.is_finite() && *lp <= 0.0));
        assert_eq!((got[1].top_logprobs.len(), got[1].top_logprobs[0].len()), (got[1].tokens.len(), 1));
        // Twenty alternatives (more than the vocabulary: all of its 11), still on the device; then
        // a request with a penalty: the steps' logits read back, the same values.
        let more = Request { logprobs: true, top_logprobs: 20, ..Request::new(vec![8, 3], 6, toy_sampler(None)) };
        let penalized =
            Request { logprobs: true, top_logprobs: 3, ..Request::new(vec![8, 3], 6, toy_sampler(Some(1))) };
        for (extra, reads) in [(more, false), (penalized, true)] {
            let want = run(&Toy::paged(), Some(extra.clone()));
            let program = device();
            let got = run(&program, Some(extra));
            assert_eq!(*program.logits_read.borrow() > 0, reads);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((&g.tokens, &g.logprobs, &g.top_logprobs), (&w.tokens, &w.logprobs, &w.top_logprobs));
            }
            let alternatives = if reads { 3 } else { VOCAB };
            assert!(!got[4].top_logprobs.is_empty() && got[4].top_logprobs.iter().all(|a| a.len() == alternatives));
        }
    }

    /// A streamed token's scores and (once it came) the token.
    type Streamed = (f32, Vec<(u32, f32)>, Option<u32>);

    /// Stop sequences end a request at their first occurrence (kept in its tokens: "stop"), its
    /// tokens a prefix of those it gets alone; log-probabilities asked for are each token's under
    /// its logits — read back even where the program picks greedy tokens itself, which it does
    /// again once no request asks for them.
    #[test]
    fn stop_sequences_end_requests_and_logprobs_follow_the_logits() {
        let prompt = vec![3u32, 5, 1];
        let alone = toy_alone(&[(prompt.clone(), 12, 0, None)], None).remove(0);
        let single = toy_plain();
        let mut session = ArtifactSession::new(&single, 15).unwrap();
        let mut logits = session.prefill(&prompt).unwrap();
        let mut want = Vec::new();
        for &t in &alone {
            want.push(log_probability(&logits, t));
            logits = session.decode(t).unwrap();
        }
        let stop = alone[4..6].to_vec();
        let end = (1..=alone.len()).find(|&e| alone[..e].ends_with(&stop)).unwrap();
        let picker = || {
            let mut t = Toy::paged();
            (t.keeps, t.argmax) = (true, true);
            one_element(t)
        };
        for (name, toy) in [("pool", Toy::paged()), ("picking on the device", picker())] {
            let asks = Request::new(prompt.clone(), 12, toy_sampler(None));
            let other = Request::new(vec![2, 9], 12, toy_sampler(None));
            let mut requests =
                vec![other, Request { stop: vec![vec![99], stop.clone()], logprobs: true, top_logprobs: 3, ..asks }]
                    .into_iter();
            let mut next = |_: bool| requests.next().map_or(Arrival::Closed, Arrival::Request);
            let mut ended: Vec<Option<Generation>> = vec![None, None];
            // Streamed: each token's scores just before it.
            let mut streamed: Vec<Vec<Streamed>> = vec![Vec::new(), Vec::new()];
            let mut report = |id: usize, p: Progress| {
                match p {
                    Progress::Ended(g) => ended[id] = Some(g),
                    Progress::Scored(lp, alts) => streamed[id].push((lp, alts, None)),
                    Progress::Token(t) => {
                        if let Some(last) = streamed[id].last_mut().filter(|s| s.2.is_none()) {
                            last.2 = Some(t);
                        }
                    }
                    _ => {}
                }
                Ok(())
            };
            let serving = Serving { reuse_prefixes: true, ..Serving::new(2, &[15, 15], 3, None) };
            serve(&toy, &serving, &mut next, &mut report).unwrap();
            let [Some(second), Some(first)] = ended.as_slice() else { panic!("{name}: both end") };
            assert_eq!((&first.tokens[..], first.ending), (&alone[..end], Some(Ending::Stop)), "{name}");
            assert_eq!(first.logprobs, want[..end], "{name}");
            // Greedy: the chosen token is the most probable, first of its alternatives.
            assert_eq!(first.top_logprobs.len(), end, "{name}");
            for ((alts, &t), &lp) in first.top_logprobs.iter().zip(&first.tokens).zip(&first.logprobs) {
                assert_eq!((alts.len(), alts[0]), (3, (t, lp)), "{name}");
                assert!(alts.windows(2).all(|w| w[0].1 >= w[1].1), "{name}: {alts:?}");
            }
            let streamed_scores: Vec<Streamed> = first
                .tokens
                .iter()
                .zip(&first.logprobs)
                .zip(&first.top_logprobs)
                .map(|((&t, &lp), alts)| (lp, alts.clone(), Some(t)))
                .collect();
            assert_eq!(streamed[1], streamed_scores, "{name}: scores streamed before their tokens");
            assert!(streamed[0].is_empty(), "{name}: none for a request not asking");
            let other_alone = toy_alone(&[(vec![2, 9], 12, 0, None)], None).remove(0);
            assert_eq!((&second.tokens, second.ending), (&other_alone, Some(Ending::Length)), "{name}");
            assert!(second.logprobs.is_empty(), "{name}");
        }
    }

    fn fixture_tokenizer() -> std::sync::Arc<crate::tokenizer::Tokenizer> {
        crate::tokenizer::fixture::shared()
    }

    /// A stop string ends a request at the token that completes it in the request's text (even
    /// across tokens), its tokens a prefix of those it gets alone.
    #[test]
    fn stop_strings_end_requests_where_their_text_first_holds_one() {
        let tokenizer = fixture_tokenizer();
        let prompt = vec![3u32, 5, 1];
        let alone = toy_alone(&[(prompt.clone(), 12, 0, None)], None).remove(0);
        let text = |ids: &[u32]| tokenizer.decode(ids, false);
        // Two tokens' text from the middle, and a string no text holds.
        let stop = text(&alone[5..7]);
        assert!(!stop.contains('\u{fffd}') && stop.chars().count() >= 2, "{stop:?} from {alone:?}");
        let end = (1..=alone.len()).find(|&e| text(&alone[..e]).contains(&stop)).unwrap();
        assert!(end <= 7);
        let stops =
            TextStops { tokenizer: tokenizer.clone(), strings: vec!["never in it \u{1f600}".into(), stop.clone()] };
        let mut requests =
            vec![Request { stop_text: Some(stops.clone()), ..Request::new(prompt.clone(), 12, toy_sampler(None)) }]
                .into_iter();
        let mut next = |_: bool| requests.next().map_or(Arrival::Closed, Arrival::Request);
        let mut ended = None;
        let mut report = |_: usize, p: Progress| {
            if let Progress::Ended(g) = p {
                ended = Some(g);
            }
            Ok(())
        };
        let serving = Serving { reuse_prefixes: true, ..Serving::new(1, &[15], 3, None) };
        serve(&Toy::paged(), &serving, &mut next, &mut report).unwrap();
        let g = ended.unwrap();
        assert_eq!((&g.tokens[..], g.ending), (&alone[..end], Some(Ending::Stop)));
        let shown = text(&g.tokens);
        assert_eq!(stops.cut(&shown), &shown[..shown.find(&stop).unwrap()]);
    }

    /// The load a server is told after each step's joins: requests running and waiting, and the
    /// share of the pool's pages held — here 6 pages of 64 rows, taken as sequences grow: three
    /// sequences of a page each, then of two, then the fourth alone.
    #[test]
    fn serving_tells_its_load() {
        let toy = Toy::paged();
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![1 + i, 2, 3, 4, 5]).collect();
        let mut requests = prompts.iter().map(|p| Request::new(p.clone(), 70, toy_sampler(None)));
        let mut next = |_: bool| requests.next().map_or(Arrival::Closed, Arrival::Request);
        let mut report = |_: usize, _: Progress| Ok(());
        let loads = RefCell::new(Vec::new());
        let record = |l: Load| loads.borrow_mut().push(l);
        let serving = Serving { load: Some(&record), ..Serving::new(3, &[80, 80, 80], 5, None) };
        serve(&toy, &serving, &mut next, &mut report).unwrap();
        let loads = loads.into_inner();
        let load =
            |running, waiting, pages: f64| Load { running, waiting, cache_usage: pages / 6.0, ..Load::default() };
        let usage = |l: &Load| Load { decode_steps: 0, rows_run: 0, rows_fed: 0, ..*l };
        assert_eq!(loads[0], load(3, 1, 3.0));
        assert!(loads.iter().map(usage).any(|l| l == load(3, 1, 6.0)), "{loads:?}");
        // The decode counts grow step by step: 3 rows a step while 3 decode.
        assert_eq!((loads[1].decode_steps, loads[1].rows_run, loads[1].rows_fed), (1, 3, 3));
        assert!(loads.windows(2).all(|w| w[1].decode_steps >= w[0].decode_steps && w[1].rows_run >= w[0].rows_run));
        let last = loads.last().unwrap();
        assert_eq!((last.running, last.waiting, (last.cache_usage * 6.0).round()), (1, 0, 2.0));
        assert!(loads.iter().all(|l| (l.cache_usage * 6.0 - (l.cache_usage * 6.0).round()).abs() < 1e-9));
    }

    /// Streamed text is held back while its end may begin a stop string, and never shows one.
    #[test]
    fn streamed_text_holds_back_what_may_begin_a_stop_string() {
        let stops = TextStops { tokenizer: fixture_tokenizer(), strings: vec!["</end>".into(), "ß!".into()] };
        for (text, settled) in [
            ("plain", 5),
            ("ends with </e", 10),
            ("ends with <", 10),
            ("a ß", 2),
            ("a ß!b", 2),
            ("x</end> and ß!", 1),
            ("ß", 0),
            ("", 0),
        ] {
            assert_eq!(stops.settled(text), settled, "{text:?}");
        }
        assert_eq!(stops.cut("ab</end>cd ß!"), "ab");
        assert_eq!(stops.cut("no stop"), "no stop");
        // Reached across tokens, ids the tokenizer does not have (no bytes) between them.
        let t = &stops.tokenizer;
        let ids: Vec<u32> = t.encode("x</end>", false);
        let unknown = t.vocab_size() as u32 + 7;
        let mut spread = Vec::new();
        for &id in &ids {
            spread.extend([id, unknown, unknown, unknown]);
        }
        spread.truncate(spread.len() - 3);
        assert!(stops.reached(&spread), "{spread:?}");
        assert!(!stops.reached(&spread[..spread.len() - 1]), "not before its last token");
    }

    /// A request with `echo` and `logprobs` gets every prompt token after the first scored by the
    /// logits of the one before it — those a prefill of the prompt alone gives, across its chunks —
    /// with the alternatives it asks for; it prefills its prompt whole though another's pages hold
    /// its start, and its tokens are those it gets alone. `max_new` 0: scored, no token. On a
    /// program that scores tokens itself, an echoed prompt (up to 20 alternatives) is scored
    /// there: the same log-probabilities and alternatives, the same tokens after it.
    #[test]
    fn echoed_prompts_are_scored_by_their_prefills_logits() {
        let prompt: Vec<u32> = (0..70).map(|i| (i * 5 % 11) as u32).collect();
        let single = toy_plain();
        let mut session = ArtifactSession::new(&single, 80).unwrap();
        let (rows, vocab) = session.prefill_rows(&prompt).unwrap();
        let want: Vec<f32> =
            (1..prompt.len()).map(|k| log_probability(&rows[(k - 1) * vocab..k * vocab], prompt[k])).collect();
        let alone = toy_alone(&[(prompt.clone(), 5, 0, None)], None).remove(0);
        for (on_device, scoring) in [(false, false), (true, false), (true, true)] {
            let mut t = Toy::paged();
            t.keeps = on_device;
            (t.scores, t.argmax) = (scoring, scoring);
            let t = if on_device { one_element(t) } else { t };
            let plain = Request::new(prompt.clone(), 5, toy_sampler(None));
            let echoed = Request { echo: true, logprobs: true, top_logprobs: 2, ..plain.clone() };
            let scored_only =
                Request { echo: true, logprobs: true, ..Request::new(prompt.clone(), 0, toy_sampler(None)) };
            let best = Request { echo: true, logprobs: true, top_logprobs: 1, ..plain.clone() };
            let mut requests = vec![plain, echoed, scored_only, best].into_iter();
            let mut next = |idle: bool| match idle {
                true => requests.next().map_or(Arrival::Closed, Arrival::Request),
                false => Arrival::NotYet,
            };
            let mut ended: Vec<Option<Generation>> = vec![None; 4];
            let mut report = |id: usize, p: Progress| {
                if let Progress::Ended(g) = p {
                    ended[id] = Some(g);
                }
                Ok(())
            };
            let serving = Serving { reuse_prefixes: true, ..Serving::new(1, &[80], 70, None) };
            serve(&t, &serving, &mut next, &mut report).unwrap();
            let [Some(plain), Some(echoed), Some(scored), Some(best)] = ended.as_slice() else { panic!("all end") };
            assert!(plain.prompt_logprobs.is_empty());
            assert_eq!((echoed.reused, &echoed.tokens), (0, &alone), "device {on_device}: prefilled whole");
            assert_eq!(echoed.prompt_logprobs, want, "device {on_device}");
            assert_eq!(echoed.prompt_top_logprobs.len(), want.len());
            for (alts, k) in echoed.prompt_top_logprobs.iter().zip(1..) {
                assert_eq!(alts, &top_log_probabilities(&rows[(k - 1) * vocab..k * vocab], 2));
            }
            assert_eq!((scored.tokens.len(), &scored.prompt_logprobs), (0, &want), "device {on_device}");
            assert!(scored.prompt_top_logprobs.is_empty());
            assert_eq!((&best.tokens, &best.prompt_logprobs), (&alone, &want), "scoring {scoring}");
            for (alts, k) in best.prompt_top_logprobs.iter().zip(1..) {
                assert_eq!(alts, &top_log_probabilities(&rows[(k - 1) * vocab..k * vocab], 1), "scoring {scoring}");
            }
            assert_eq!(best.prompt_top_logprobs.len(), want.len());
        }
    }

    /// The most probable tokens from a partial sort are a full sort's first ones (ties to the lower
    /// id), with [`log_probability`]'s values; [`scores_of`] many rows gives each row's.
    #[test]
    fn top_log_probabilities_are_a_full_sorts_first() {
        let rows: [Vec<f32>; 3] = [
            (0..5000).map(|j| ((j * 7919) % 1013) as f32 / 97.0).collect(),
            (0..300).map(|j| (j % 4) as f32).collect(),
            vec![0.5, -1.0],
        ];
        for row in &rows {
            for k in [0, 1, 5, 40, 10_000] {
                let mut all: Vec<(u32, f32)> =
                    (0..row.len()).map(|t| (t as u32, log_probability(row, t as u32))).collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                all.truncate(k);
                assert_eq!(top_log_probabilities(row, k), all, "k {k}");
            }
        }
        // Many rows at once, spread over the cores, in order: each row's own scores, bits and all.
        let many: Vec<(Vec<f32>, u32)> = (0..100)
            .map(|r| ((0..700).map(|j| ((j * 7919 + r * 31) % 1013) as f32 / 97.0).collect(), (r * 13 % 700) as u32))
            .collect();
        let got = scores_of(many.iter().map(|(row, t)| (row.as_slice(), *t)), 3);
        assert_eq!(got.len(), 100);
        for ((row, t), (lp, top)) in many.iter().zip(&got) {
            assert_eq!((lp.to_bits(), top), (log_probability(row, *t).to_bits(), &top_log_probabilities(row, 3)));
        }
        assert!(scores_of(std::iter::empty(), 5).is_empty());
        assert!(scores(&[1.0, 2.0], 9, 0).0.is_nan());
    }

    /// Logits kept in one buffer give each row as the rows given one by one: rows of one width,
    /// the last (moved when alone), none past the end; no rows, none.
    #[test]
    fn logit_rows_are_the_rows_given() {
        let rows: Vec<Vec<f32>> = (0..3).map(|r| (0..5).map(|j| (r * 10 + j) as f32).collect()).collect();
        let all = LogitRows::of(rows.clone());
        assert_eq!(all, LogitRows::new(rows.concat(), 5));
        assert_eq!((all.len(), all.get(3)), (3, None));
        for (i, r) in rows.iter().enumerate() {
            assert_eq!((all.get(i), &all[i]), (Some(&r[..]), &r[..]));
        }
        assert_eq!(all.into_last(), Some(rows[2].clone()));
        assert_eq!(LogitRows::of(vec![rows[1].clone()]).into_last(), Some(rows[1].clone()));
        for none in [LogitRows::of(Vec::new()), LogitRows::new(Vec::new(), 5), LogitRows::new(vec![1.0], 0)] {
            assert!(none.is_empty());
            assert_eq!(none.into_last(), None);
        }
        // A step that ran sequences 4, 1 and 2 of 6: their rows by sequence, the others none.
        let spread = LogitRows::of(rows.clone()).spread(&[4, 1, 2], 6);
        assert_eq!(spread.len(), 6);
        let by_sequence: Vec<Option<&[f32]>> = (0..7).map(|i| spread.get(i)).collect();
        let want = [None, Some(&rows[1][..]), Some(&rows[2][..]), None, Some(&rows[0][..]), None, None];
        assert_eq!(by_sequence, want);
        assert_eq!(spread.into_last(), None, "the last sequence did not run");
        let last = LogitRows::of(vec![rows[1].clone()]).spread(&[2], 3);
        assert_eq!(last.into_last(), Some(rows[1].clone()));
        let Next::Tokens(t) = Next::Tokens(vec![7, 8]).spread(&[3, 0], 4) else { panic!() };
        assert_eq!(t, vec![8, 0, 0, 7]);
    }

    /// Serving over a pool of pages, a decode step runs the decoding sequences' rows (and as few
    /// idle ones as make a power of two): requests of 3, 12 and 6 new tokens in 3 slots run 3, then
    /// 2, then 1 row a step; `every_slot` runs all 3 every step. The same tokens either way, each
    /// request's alone (one sampled; all greedy where the device picks them, its picks spread back
    /// to the slots).
    #[test]
    fn decode_steps_leave_out_idle_slots_unless_every_slot_runs() {
        for (every_slot, on_device) in [(false, false), (true, false), (false, true)] {
            let seed = (!on_device).then_some(1);
            let requests: Vec<ToyRequest> =
                vec![(vec![8, 8, 2], 3, 0, None), (vec![5, 1, 9, 9, 4, 6, 2], 12, 0, seed), (vec![1], 6, 0, None)];
            let alone = toy_alone(&requests, None);
            let limits: Vec<usize> = requests.iter().map(|(p, n, _, _)| p.len() + n).collect();
            let toy = match on_device {
                false => Toy::paged(),
                true => {
                    let mut t = Toy::paged();
                    (t.keeps, t.argmax) = (true, true);
                    one_element(t)
                }
            };
            let mut queue = requests.iter().map(|(p, n, _, seed)| Request::new(p.clone(), *n, toy_sampler(*seed)));
            let mut next = |_: bool| queue.next().map_or(Arrival::Closed, Arrival::Request);
            let mut got = vec![Vec::new(); 3];
            let mut report = |id: usize, p: Progress| {
                if let Progress::Ended(g) = p {
                    got[id] = g.tokens;
                }
                Ok(())
            };
            let serving = Serving { every_slot, ..Serving::new(3, &limits, 7, None) };
            let run = serve(&toy, &serving, &mut next, &mut report).unwrap();
            assert_eq!(got, alone, "every slot: {every_slot}, on the device: {on_device}");
            let rows = toy.decode_rows.take();
            let want = if every_slot { vec![3; 11] } else { [vec![3; 2], vec![2; 3], vec![1; 6]].concat() };
            assert_eq!(rows, want, "every slot: {every_slot}");
            let (steps, run_rows, fed) = (run.decode_steps, run.rows_run, run.rows_fed);
            assert_eq!((steps, run_rows, fed), (11, want.iter().sum(), 2 + 11 + 5), "every slot: {every_slot}");
            if on_device {
                assert_eq!(*toy.logits_read.borrow(), 0, "the device picked every token");
            }
        }
    }

    /// Serving sampled requests (every token weighed) on a program that draws them itself: each
    /// request's tokens are those the host's samplers draw from the same logits with the same
    /// seeds, with requests joining and leaving the running batch, and no logits read back.
    #[test]
    fn served_tokens_drawn_where_the_program_runs_are_the_host_samplers() {
        use v3c_models::reference::Sampler;
        let requests =
            [(vec![8, 8, 2], 3, 2.0), (vec![5, 1, 9, 9, 4, 6, 2], 12, 1.5), (vec![1], 6, 0.0), (vec![4], 9, 3.0)];
        let limits: Vec<usize> = requests.iter().map(|(p, n, _)| p.len() + n).collect();
        let served = |toy: &Toy| {
            let mut queue = requests
                .iter()
                .enumerate()
                .map(|(i, (p, n, t))| Request::new(p.clone(), *n, Sampler::new(*t, 1.0, 40 + i as u64)));
            let mut next = |_: bool| queue.next().map_or(Arrival::Closed, Arrival::Request);
            let mut got = vec![Vec::new(); requests.len()];
            let mut report = |id: usize, p: Progress| {
                if let Progress::Ended(g) = p {
                    got[id] = g.tokens;
                }
                Ok(())
            };
            serve(toy, &Serving::new(3, &limits, 7, None), &mut next, &mut report).unwrap();
            got
        };
        let want = served(&Toy::paged());
        let mut drawing = Toy::paged();
        (drawing.keeps, drawing.argmax, drawing.sample) = (true, true, true);
        let drawing = one_element(drawing);
        assert_eq!(served(&drawing), want);
        assert_eq!(*drawing.logits_read.borrow(), 0, "the program drew every token");
        let distinct: std::collections::HashSet<_> = want[1].iter().collect();
        assert!(distinct.len() > 2, "the draws vary: {:?}", want[1]);
    }

    /// A step over a pool of pages runs the active slots and the fewest others (the first ones)
    /// that make a power of two, in slot order; over caches per sequence, every slot.
    #[test]
    fn decode_steps_run_the_active_rows_up_to_a_power_of_two() {
        let rows = |fed: &str, paged: bool| batch::step_rows(&fed.chars().map(|c| c == '1').collect::<Vec<_>>(), paged);
        for (fed, run) in [
            ("0100", vec![1]),
            ("0101", vec![1, 3]),
            ("0111", vec![0, 1, 2, 3]),
            ("010101", vec![0, 1, 3, 5]),
            ("00000011111", vec![0, 1, 2, 6, 7, 8, 9, 10]),
            ("111", vec![0, 1, 2]),
            ("110", vec![0, 1]),
            ("000", vec![0]),
        ] {
            assert_eq!(rows(fed, true), run, "{fed}");
            assert_eq!(rows(fed, false), (0..fed.len()).collect::<Vec<_>>(), "{fed}, caches per sequence");
        }
    }

    /// Picking the batch's tokens together (spread over the cores) gives each sequence the token
    /// its own sampler picks alone, greedy or not, from logits or from the device's tokens.
    #[test]
    fn tokens_picked_together_are_those_picked_one_by_one() {
        use v3c_models::reference::Sampler;
        let rows: Vec<Vec<f32>> =
            (0..9).map(|r| (0..5000).map(|j| ((r * 7919 + j * 104_729) % 1000) as f32 / 150.0).collect()).collect();
        let logits = Next::Logits(LogitRows::of(rows));
        let samplers = |k: u64| -> Vec<Sampler> {
            (0..9).map(|i| if i % 4 == 0 { Sampler::new(0.0, 1.0, 0) } else { Sampler::new(0.8, 0.9, k + i) }).collect()
        };
        for k in 0..5 {
            let (mut together, mut alone) = (samplers(k), samplers(k));
            let mut wanted: Vec<(usize, &mut Sampler)> =
                together.iter_mut().enumerate().filter(|(i, _)| i % 3 != 1).collect();
            let got = logits.pick_each(&mut wanted);
            let want: Vec<u32> =
                alone.iter_mut().enumerate().filter(|(i, _)| i % 3 != 1).map(|(i, s)| logits.pick(i, s)).collect();
            assert_eq!(got, want, "round {k}");
        }
        let device = Next::Tokens(vec![4, 5, 6]);
        let mut s = [Sampler::new(0.0, 1.0, 0), Sampler::new(0.0, 1.0, 0)];
        let [a, b] = &mut s;
        assert_eq!(device.pick_each(&mut [(2, a), (0, b)]), [6, 4]);
    }

    /// Prompts sharing whole pages with a running one hold those pages with it instead of their
    /// own copies: in a pool of 3 pages, requests of 2 pages each whose prompts share 1 run two at
    /// a time (the second taking one page of its own), where without reuse they run one at a
    /// time — the tokens as alone either way, on the host and on the device.
    #[test]
    fn prompts_sharing_whole_pages_hold_them_together() {
        let shared: Vec<u32> = (0..65).map(|i| (i * 7 % 13) as u32).collect();
        let requests: Vec<ToyRequest> = (0..3u32).map(|k| ([&shared[..], &[k + 1]].concat(), 10, 0, None)).collect();
        let alone = toy_alone(&requests, None);
        for on_device in [false, true] {
            for reuse in [true, false] {
                let mut t = Toy::paged();
                let scratch = if on_device { 2 } else { 0 };
                t.decode.bounds.insert("kv_cache.0".into(), vec![3 + scratch, 64, WIDTH]);
                t.keeps = on_device;
                let t = if on_device { one_element(t) } else { t };
                let mut pending = requests.clone().into_iter();
                let mut next = |_: bool| match pending.next() {
                    Some((p, n, _, _)) => Arrival::Request(Request::new(p, n, toy_sampler(None))),
                    None => Arrival::Closed,
                };
                let mut events: Vec<(usize, bool)> = Vec::new();
                let mut ended: Vec<Option<Generation>> = vec![None; 3];
                let mut report = |id: usize, p: Progress| {
                    match p {
                        Progress::Token(_) => events.push((id, false)),
                        Progress::Ended(g) => {
                            events.push((id, true));
                            ended[id] = Some(g);
                        }
                        _ => return Err(format!("request {id} refused or cancelled")),
                    }
                    Ok(())
                };
                let serving = Serving { reuse_prefixes: reuse, ..Serving::new(3, &[76; 3], 66, None) };
                serve(&t, &serving, &mut next, &mut report).unwrap();
                let name = format!("device {on_device}, reuse {reuse}");
                let ended: Vec<Generation> = ended.into_iter().map(Option::unwrap).collect();
                assert_eq!(ended.iter().map(|g| g.tokens.clone()).collect::<Vec<_>>(), alone, "{name}");
                let first_of_1 = events.iter().position(|&e| e == (1, false)).unwrap();
                let end_of_0 = events.iter().position(|&e| e == (0, true)).unwrap();
                assert_eq!(first_of_1 < end_of_0, reuse, "{name}: the second runs beside the first");
                let reused: Vec<usize> = ended.iter().map(|g| g.reused).collect();
                assert_eq!(reused, if reuse { [0, 64, 64] } else { [0, 0, 0] }, "{name}");
                // Its pages at its end: the shared one and its own.
                assert_eq!(ended[1].pages, Some((2, 3 + scratch)), "{name}");
            }
        }
    }

    /// Prompts sharing whole pages with a served prompt take its rows instead of prefilling them:
    /// from an ended request's kept pages (one slot), from a running one's (two), from an ended
    /// one's generated tokens too (a conversation's next turn), not where the shared tokens end at
    /// a page's last row (the token after it differs) or when the pool needed the kept pages for
    /// another request, nor with reuse off — the tokens as alone each time, on a pool on the host
    /// and on the device.
    #[test]
    fn prompts_sharing_whole_pages_copy_their_rows_instead_of_prefilling() {
        let shared: Vec<u32> = (0..100).map(|i| (i * 5 % 11) as u32).collect();
        let starting = |n: usize, tail: &[u32]| [&shared[..n], tail].concat();
        let unrelated: Vec<u32> = (0..120).map(|i| (i * 3 % 7) as u32).collect();
        // One slot, a pool of two pages: each request's placement takes the kept page back.
        let requests: Vec<ToyRequest> = vec![
            (shared.clone(), 5, 0, None),
            (starting(90, &[1, 2, 3]), 6, 0, Some(4)),
            (starting(65, &[7, 7]), 4, 0, None),
            (starting(64, &[5]), 4, 0, None),
            (unrelated.clone(), 5, 0, None),
            (starting(100, &[9]), 3, 0, None),
        ];
        let alone = toy_alone(&requests, None);
        let prompt_tokens: usize = requests.iter().map(|r| r.0.len()).sum();
        for on_device in [false, true] {
            let toy = || {
                let mut t = Toy::paged();
                // Pages for one 2-page sequence beside the prefills' scratch pages.
                let scratch = if on_device { 2 } else { 0 };
                t.decode.bounds.insert("kv_cache.0".into(), vec![2 + scratch, 64, WIDTH]);
                t.keeps = on_device;
                if on_device {
                    t = one_element(t);
                }
                t
            };
            let name = if on_device { "device" } else { "host" };
            let t = toy();
            let got = serve_reusing(&t, &requests, 1, None, None, true);
            let reused: Vec<usize> = got.iter().map(|g| g.1).collect();
            assert_eq!(got.into_iter().map(|g| g.0).collect::<Vec<_>>(), alone, "{name}");
            // 90 shared: a page; 65: a page (of the second's, kept); 64: none (row 63's next token
            // differs); after the unrelated prompt, whose placement took the kept page back: none.
            assert_eq!(reused, [0, 64, 64, 0, 0, 0], "{name}");
            assert_eq!(*t.prefilled.borrow(), prompt_tokens - 128, "{name}: prefilled tokens");
            let t = toy();
            let got = serve_reusing(&t, &requests, 1, None, None, false);
            assert!(got.iter().all(|g| g.1 == 0), "{name}: reuse off");
            assert_eq!(*t.prefilled.borrow(), prompt_tokens, "{name}");
            // Two slots: the second joins while the first decodes, sharing its page.
            let mut t = Toy::paged();
            t.keeps = on_device;
            let t = if on_device { one_element(t) } else { t };
            let pair: Vec<ToyRequest> = vec![(shared.clone(), 20, 0, None), (starting(80, &[4]), 5, 3, None)];
            let got = serve_reusing(&t, &pair, 2, None, None, true);
            assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [0, 64], "{name}: from a running request");
            assert_eq!(got.into_iter().map(|g| g.0).collect::<Vec<_>>(), toy_alone(&pair, None), "{name}");
        }
        // A conversation's next turn: the first request's prompt and 30 of its tokens, then its
        // own — a page of rows copied, prompt and generated tokens alike.
        let first: Vec<u32> = (0..40).map(|i| (i * 3 % 10) as u32).collect();
        let answer = toy_alone(&[(first.clone(), 50, 0, None)], None).remove(0);
        let turn = [&first[..], &answer[..30], &[7]].concat();
        let turns: Vec<ToyRequest> = vec![(first, 50, 0, None), (turn, 5, 0, None)];
        for on_device in [false, true] {
            let mut t = Toy::paged();
            t.keeps = on_device;
            let t = if on_device { one_element(t) } else { t };
            let got = serve_reusing(&t, &turns, 1, None, None, true);
            assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), [0, 64], "device: {on_device}");
            assert_eq!(got.into_iter().map(|g| g.0).collect::<Vec<_>>(), toy_alone(&turns, None));
        }
        // A queue whose prompts share a page joins them one after another to copy it, though
        // the batch holds them all; without reuse, one batch — the same tokens.
        let prompts: Vec<Vec<u32>> = (0..3u32).map(|k| starting(70, &[k, k + 1])).collect();
        let alone = toy_alone(&prompts.iter().map(|p| (p.clone(), 8, 0, None)).collect::<Vec<_>>(), None);
        for reuse_prefixes in [true, false] {
            let queue = Queue { reuse_prefixes, ..Queue::new(3) };
            let mut samplers = vec![toy_sampler(None); 3];
            let served = generate_queue(&Toy::paged(), &prompts, queue, 8, &mut samplers, None).unwrap();
            let reused: Vec<usize> = served.generations.iter().map(|g| g.reused).collect();
            assert_eq!(reused, if reuse_prefixes { [0, 64, 64] } else { [0, 0, 0] });
            assert_eq!(served.generations.into_iter().map(|g| g.tokens).collect::<Vec<_>>(), alone);
        }
        assert_eq!((shared_pages(&shared, &shared[..64]), shared_pages(&shared, &shared[..65])), (0, 1));
        assert_eq!(shared_pages(&shared[..65], &shared), 1, "a token left to prefill");
        assert_eq!(shared_pages(&shared[..64], &shared), 0);
    }

    proptest::proptest! {
        /// Text shown a token at a time, held back and cut at stop strings, is the whole
        /// generation's text cut at the first stop string — whatever tokens follow it.
        #[test]
        fn text_shown_a_token_at_a_time_is_the_whole_text(
            ids in proptest::collection::vec(0u32..980, 0..30),
            from in 0usize..30,
            len in 1usize..4,
        ) {
            let tokenizer = fixture_tokenizer();
            let from = from.min(ids.len());
            let stop = tokenizer.decode(&ids[from..(from + len).min(ids.len())], true);
            let stops = TextStops { tokenizer: tokenizer.clone(), strings: vec![stop, "Ġ\n".into()] };
            for stops in [None, Some(&stops)] {
                let mut so_far = TextSoFar::new(&tokenizer, stops);
                let mut shown: String = ids.iter().map(|&t| so_far.push(t)).collect();
                shown.push_str(&so_far.finish());
                proptest::prop_assert_eq!(shown, generation_text(&tokenizer, &ids, stops));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

        /// Requests of any lengths and token budgets, greedy or sampled (each its own seed),
        /// arriving at any steps (a few not-yet answers before each), through one to three slots,
        /// with or without an end token, any prefill budget between decode steps, prompts
        /// starting with some of a shared prefix, whose rows are reused or not: each request's
        /// tokens — reported as picked, and at its end — are those it gets generated alone,
        /// whether the caches are per sequence, a pool of pages on the host, or a pool on the
        /// device; none is refused (they all fit), and each ends once.
        #[test]
        fn served_requests_get_their_tokens_alone(
            parts in proptest::collection::vec(
                (
                    proptest::collection::vec(0u32..11, 1..60),
                    1usize..28,
                    0usize..4,
                    proptest::option::of(0u64..1000),
                    0usize..100,
                ),
                1..7,
            ),
            prefix in proptest::collection::vec(0u32..11, 64..100),
            slots in 1usize..4,
            eos in proptest::option::of(0u32..11),
            kind in 0usize..3,
            budget in proptest::option::of(1usize..16),
            reuse in proptest::bool::ANY,
        ) {
            // Each prompt: its first `shared` tokens of the prefix, then its own; 100 at most.
            let requests: Vec<ToyRequest> = parts
                .into_iter()
                .map(|(own, new, waits, seed, shared)| {
                    let mut prompt: Vec<u32> = prefix[..shared.min(prefix.len())].to_vec();
                    prompt.extend(own);
                    prompt.truncate(100);
                    (prompt, new, waits, seed)
                })
                .collect();
            let toy = match kind {
                0 => toy_plain(),
                1 => Toy::paged(),
                _ => {
                    let mut t = Toy::paged();
                    t.keeps = true;
                    one_element(t)
                }
            };
            let got = serve_reusing(&toy, &requests, slots, eos, budget, reuse);
            let reused: usize = got.iter().map(|g| g.1).sum();
            proptest::prop_assert!(reused == 0 || (reuse && kind > 0), "rows reused where they may not be");
            let tokens: Vec<Vec<u32>> = got.into_iter().map(|g| g.0).collect();
            proptest::prop_assert_eq!(tokens, toy_alone(&requests, eos));
        }
    }
}
