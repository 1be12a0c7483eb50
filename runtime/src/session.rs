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

use std::collections::HashMap;

use crate::host::{HostBuffer, HostData};
use crate::pages::DecodeCaches;
use crate::plan::{EntryPlan, PAGE_POOL};

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
    /// Whether [`Program::run_keeping`] keeps inputs on a device between runs (GPU artifacts).
    fn keeps_inputs(&self) -> bool {
        false
    }
    /// Decode caches' rows must be a multiple of this (GPU artifacts whose decode attention reads
    /// them as bf16 pages: 64).
    fn cache_rows_multiple(&self) -> usize {
        1
    }
    /// As [`Program::run`], the inputs named in `resident` as the program keeps them — decode's
    /// caches as the previous step left them, updated in place, or as a prefill carried them over
    /// ([`Program::run_carrying`]) — rather than as given. Only where [`Program::keeps_inputs`].
    fn run_keeping(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        if !resident.is_empty() {
            return Err(format!("this program keeps no inputs between runs ({} given as kept)", resident.join(", ")));
        }
        self.run(entry, inputs, wanted)
    }
    /// Whether [`Program::run_carrying`] carries outputs over into inputs (GPU artifacts).
    fn carries_outputs(&self) -> bool {
        false
    }
    /// As [`Program::run_keeping`], then the outputs named in `carry` (caches the entry writes anew:
    /// a prefill's) kept on the program's device as the inputs of that name, which a later run may
    /// name resident: the next prefill chunk's caches, or a one-sequence decode's (its first rows).
    /// Only where [`Program::carries_outputs`].
    fn run_carrying(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        carry: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        if !carry.is_empty() {
            return Err(format!("this program keeps no outputs on a device ({} asked)", carry.join(", ")));
        }
        self.run_keeping(entry, inputs, wanted, resident)
    }
    /// Copies rows `from..from + n` of what the program's device holds as input `name` (rows of
    /// its last dim) to rows `to..to + n` (not overlapping). Only where [`Program::carries_outputs`].
    fn move_rows(&self, name: &str, from: usize, to: usize, n: usize) -> Result<(), String> {
        let _ = (from, to, n);
        Err(format!("this program keeps no {name} on a device"))
    }
    /// Takes the first `rows` rows of input `name` on the program's device as holding what was
    /// carried or moved there, though decode steps since ran over the input as a whole (they wrote
    /// none of those rows: a pool's scratch pages) — so that the next prefill chunk may name it
    /// resident. Only where [`Program::carries_outputs`].
    fn reclaim_rows(&self, name: &str, rows: usize) -> Result<(), String> {
        let _ = rows;
        Err(format!("this program keeps no {name} on a device"))
    }
    /// Whether [`Program::argmax_last`] picks greedy tokens where the program runs (GPU artifacts
    /// with an argmax kernel: the logits are then not read back).
    fn device_argmax(&self) -> bool {
        false
    }
    /// The greedy token of each `logits` row of the last run of `entry`, picked where the program
    /// keeps them (f32 total order, ties to the lower index: the host sampler's choice).
    fn argmax_last(&self, entry: &str) -> Result<Vec<u32>, String> {
        Err(format!("{entry}: this program picks no tokens itself"))
    }
    /// Milliseconds of each of `reps` runs of `entry` on `inputs` after one warm-up, outputs left
    /// where they are (the GPU times its launches with CUDA events, inputs uploaded once).
    fn time_entry(&self, entry: &str, inputs: &HashMap<String, HostBuffer>, reps: usize) -> Result<Vec<f64>, String> {
        time_runs(reps, || self.run(entry, inputs, &[]).map(drop))
    }
}

/// Milliseconds of each of `reps` calls of `run` after one warm-up call.
fn time_runs(reps: usize, mut run: impl FnMut() -> Result<(), String>) -> Result<Vec<f64>, String> {
    run()?;
    (0..reps)
        .map(|_| {
            let start = std::time::Instant::now();
            run()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
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
    fn keeps_inputs(&self) -> bool {
        true
    }
    fn run_keeping(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cpu::CpuArtifact::run_keeping(self, entry, inputs, wanted, resident)
    }
    /// Steps as a session runs them: the first with the given caches, the others on the caches the
    /// previous step left in place (no copies of them).
    fn time_entry(&self, entry: &str, inputs: &HashMap<String, HostBuffer>, reps: usize) -> Result<Vec<f64>, String> {
        crate::cpu::CpuArtifact::run_keeping(self, entry, inputs, &[], &[])?;
        let kept = self.kept_inputs();
        let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
        time_runs(reps, || crate::cpu::CpuArtifact::run_keeping(self, entry, inputs, &[], &kept).map(drop))
    }
}

/// Outputs with the caches in f32 (a GPU artifact's may be bf16: widened exactly), as sessions
/// keep them on the host.
pub fn f32_caches(out: HashMap<String, HostBuffer>) -> HashMap<String, HostBuffer> {
    out.into_iter().map(|(n, b)| if n.starts_with("kv_cache.") { (n, b.into_f32()) } else { (n, b) }).collect()
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
        crate::cuda::GpuArtifact::run(self, entry, inputs, wanted).map(f32_caches)
    }
    fn time_entry(&self, entry: &str, inputs: &HashMap<String, HostBuffer>, reps: usize) -> Result<Vec<f64>, String> {
        crate::cuda::GpuArtifact::time_entry(self, entry, inputs, reps)
    }
    fn keeps_inputs(&self) -> bool {
        true
    }
    fn run_keeping(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cuda::GpuArtifact::run_keeping(self, entry, inputs, wanted, resident).map(f32_caches)
    }
    /// Unless `V3R_CARRY=0` (caches through the host, as before: to tell the two apart).
    fn carries_outputs(&self) -> bool {
        std::env::var("V3R_CARRY").map_or(true, |v| v != "0")
    }
    fn move_rows(&self, name: &str, from: usize, to: usize, n: usize) -> Result<(), String> {
        crate::cuda::GpuArtifact::move_rows(self, name, from, to, n)
    }
    fn reclaim_rows(&self, name: &str, rows: usize) -> Result<(), String> {
        crate::cuda::GpuArtifact::reclaim_rows(self, name, rows)
    }
    fn run_carrying(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        resident: &[&str],
        carry: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cuda::GpuArtifact::run_carrying(self, entry, inputs, wanted, resident, carry).map(f32_caches)
    }
    fn device_argmax(&self) -> bool {
        self.artifact.lowering.as_ref().is_some_and(|l| l.argmax.is_some())
    }
    fn cache_rows_multiple(&self) -> usize {
        self.artifact.lowering.as_ref().and_then(|l| l.cache_rows_multiple).unwrap_or(1)
    }
    fn argmax_last(&self, entry: &str) -> Result<Vec<u32>, String> {
        crate::cuda::GpuArtifact::argmax_last(self, entry)?.ok_or_else(|| format!("{entry}: no argmax kernel"))
    }
}

/// One decode step: the caches uploaded and read back — or, on a program that keeps inputs, left
/// on the device after the first step (`resident` says whether they are there): only the logits
/// come back (the session's host copies of the caches go stale).
fn step(
    program: &dyn Program,
    inputs: &HashMap<String, HostBuffer>,
    caches: &[&str],
    resident: &mut bool,
    greedy: bool,
) -> Result<(HashMap<String, HostBuffer>, Next), String> {
    step_keeping(program, inputs, caches, resident, greedy, true)
}

/// As [`step`]; without `keep`, the caches come back every step (the session needs them on the
/// host: a batch that lays joining sequences' rows there).
fn step_keeping(
    program: &dyn Program,
    inputs: &HashMap<String, HostBuffer>,
    caches: &[&str],
    resident: &mut bool,
    greedy: bool,
    keep: bool,
) -> Result<(HashMap<String, HostBuffer>, Next), String> {
    if !program.keeps_inputs() || !keep {
        let wanted: Vec<&str> = caches.iter().copied().chain(["logits"]).collect();
        let out = f32_caches(program.run("decode", inputs, &wanted)?);
        let next = Next::logits_of(&out)?;
        return Ok((out, next));
    }
    let kept: &[&str] = if *resident { caches } else { &[] };
    // A failed step leaves the device caches in no known state: the next one uploads them.
    *resident = false;
    // Greedy on a program that picks tokens itself: the logits stay where they are.
    let on_device = greedy && program.device_argmax();
    let wanted: &[&str] = if on_device { &[] } else { &["logits"] };
    let out = program.run_keeping("decode", inputs, wanted, kept)?;
    *resident = true;
    let next = if on_device { Next::Tokens(program.argmax_last("decode")?) } else { Next::logits_of(&out)? };
    Ok((out, next))
}

/// What a decode step gives per sequence: its logits, or (greedy, picked on the device) its token.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Logits(Vec<Vec<f32>>),
    Tokens(Vec<u32>),
}

impl Next {
    fn logits_of(out: &HashMap<String, HostBuffer>) -> Result<Next, String> {
        let logits = out.get("logits").ok_or("the entry has no logits")?;
        let HostData::F32(v) = &logits.data else { return Err("logits are not f32".into()) };
        let vocab = logits.shape[logits.shape.len() - 1];
        Ok(Next::Logits(v.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect()))
    }

    /// Sequence `i`'s next token: picked on the device, or by `sampler` from its logits.
    pub fn pick(&self, i: usize, sampler: &mut v3c_models::reference::Sampler) -> u32 {
        match self {
            Next::Tokens(t) => t[i],
            Next::Logits(l) => sampler.sample(&l[i]),
        }
    }

    /// The next token of each sequence `wanted[k].0`, by its sampler `wanted[k].1`, as
    /// [`Next::pick`] picks it — from logits, the sequences spread over the host's cores (each
    /// sampler draws only for its own sequence: the tokens of one by one). A batch of 64 sampled
    /// over DeepSeek-V3's vocabulary is tens of milliseconds a step on one core.
    pub fn pick_each(&self, wanted: &mut [(usize, &mut v3c_models::reference::Sampler)]) -> Vec<u32> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(wanted.len());
        let Next::Logits(l) = self else { return wanted.iter_mut().map(|(i, s)| self.pick(*i, s)).collect() };
        if threads <= 1 {
            return wanted.iter_mut().map(|(i, s)| s.sample(&l[*i])).collect();
        }
        let per = wanted.len().div_ceil(threads);
        let mut picked = vec![0u32; wanted.len()];
        std::thread::scope(|scope| {
            for (some, into) in wanted.chunks_mut(per).zip(picked.chunks_mut(per)) {
                scope.spawn(move || {
                    for ((i, s), t) in some.iter_mut().zip(into) {
                        *t = s.sample(&l[*i]);
                    }
                });
            }
        });
        picked
    }
}

/// A cache the device holds is kept on the host by its shape only (its values there would be stale;
/// a full model's caches are tens of GiB): a later upload of it is refused by the program (no
/// data for its shape) rather than sending zeros.
fn kept_shape(cache: HostBuffer, resident: bool) -> HostBuffer {
    match (resident, cache.data) {
        (true, HostData::F32(_)) => HostBuffer { shape: cache.shape, data: HostData::F32(Vec::new()) },
        (_, data) => HostBuffer { shape: cache.shape, data },
    }
}

/// Puts the caches of a step's inputs back into the state after a failed step (the state is
/// moved into the inputs for the step).
fn restore(state: &mut HashMap<String, HostBuffer>, inputs: &mut HashMap<String, HostBuffer>, caches: &[String]) {
    for c in caches {
        if let Some(b) = inputs.remove(c) {
            state.insert(c.clone(), b);
        }
    }
}

/// The vocabulary a program's logits span (its decode entry's `logits` width), when it says.
pub fn vocabulary(program: &dyn Program) -> Option<usize> {
    let plan = program.entry_plan("decode").ok()?;
    let (_, id) = plan.outputs.iter().find(|(n, _)| n == "logits")?;
    plan.buffers.iter().find(|b| b.id == *id)?.shape.last().copied()
}

/// A sequence being generated.
pub struct ArtifactSession<'a> {
    program: &'a dyn Program,
    /// Cache inputs of the entries (`kv_cache.<layer>`, `kv_cache.mtp`).
    caches: Vec<String>,
    /// Width of a cache row (the latent plus the rope key).
    width: usize,
    /// The caches: `[position, width]` while prefilling, then as `layout` lays them out.
    state: HashMap<String, HostBuffer>,
    /// Once decoding: how the decode entry takes the caches (rows per sequence, or a pool of pages).
    layout: Option<DecodeCaches>,
    position: usize,
    max_len: usize,
    /// Rows of the decode caches: `max_len` rounded up as the program asks
    /// ([`Program::cache_rows_multiple`]).
    rows: usize,
    has_mtp: bool,
    /// The caches are on the program's device as the last decode step left them.
    resident: bool,
    /// The caches are on the program's device as the last prefill chunk carried them over (the
    /// host keeps their shape only).
    carried: bool,
    /// The last prefill chunk leaves the caches on the device for the decode steps (a program that
    /// carries outputs over, whose prefill and decode caches have one element); else it reads
    /// them back.
    pub(crate) decode_on_device: bool,
}

/// Rows of decode caches for sequences of `max_len` tokens: `max_len` in whole multiples of what
/// `program` asks, within its decode plan's caches.
fn cache_rows(program: &dyn Program, max_len: usize) -> Result<usize, String> {
    let (rows, bound) =
        (max_len.next_multiple_of(program.cache_rows_multiple().max(1)), program.entry_plan("decode")?.sizes.context);
    if rows > bound {
        return Err(format!(
            "{max_len} tokens (prompt + new{}): the artifact's decode plan holds caches of at most {bound} rows \
             (compile with a larger --max-context)",
            if rows > max_len { format!(", caches of {rows} rows in whole pages") } else { String::new() }
        ));
    }
    Ok(rows)
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
        let rows = cache_rows(program, max_len)?;
        if decode.sizes.rows == 0 || prefill.sizes.rows == 0 {
            return Err("the artifact's plans hold no rows (compiled with --max-rows 0)".into());
        }
        let state = caches
            .iter()
            .map(|c| (c.clone(), HostBuffer { shape: vec![0, width], data: HostData::F32(Vec::new()) }))
            .collect();
        let has_mtp = prefill.bounds.contains_key("mtp_tokens");
        let element = |plan: &'a EntryPlan, name: &str| plan.input(name).map(|b| b.dtype.as_str());
        let same_elements = caches.iter().all(|c| element(prefill, c).is_some_and(|e| Some(e) == element(decode, c)));
        Ok(ArtifactSession {
            program,
            caches,
            width,
            state,
            layout: None,
            position: 0,
            max_len,
            rows,
            has_mtp,
            resident: false,
            carried: false,
            decode_on_device: program.carries_outputs() && same_elements,
        })
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
        let chunks = self.prefill_chunks(tokens)?;
        let (mut logits, mut vocab) = (Vec::new(), 0);
        for k in 0..chunks {
            let (rows, v) = self.prefill_chunk(tokens, k)?;
            logits.extend_from_slice(&rows);
            vocab = v;
        }
        Ok((logits, vocab))
    }

    /// How many chunks of the prefill plan's rows feed `tokens` after the rows the session holds
    /// (refused where the session or the plan cannot hold them).
    fn prefill_chunks(&self, tokens: &[u32]) -> Result<usize, String> {
        if self.layout.is_some() {
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
        Ok(tokens.len().div_ceil(chunk))
    }

    /// Feeds chunk `k` of `tokens` (the prompt [`ArtifactSession::prefill_chunks`] counted; the
    /// chunks in order); returns its tokens' logits and the vocabulary size.
    fn prefill_chunk(&mut self, tokens: &[u32], k: usize) -> Result<(Vec<f32>, usize), String> {
        let chunk = self.program.entry_plan("prefill")?.sizes.rows;
        let chunks = tokens.len().div_ceil(chunk);
        let piece = tokens.chunks(chunk).nth(k).ok_or_else(|| format!("no chunk {k} of {chunks}"))?;
        let caches: Vec<&str> = self.caches.iter().map(String::as_str).collect();
        // A program that keeps inputs keeps the caches on its device from chunk to chunk (and
        // into the decode steps where it may): they cross to the host only when asked for.
        let carry = self.program.carries_outputs() && (k + 1 < chunks || self.decode_on_device);
        let resident: &[&str] = if self.carried { &caches } else { &[] };
        let start = self.position as i64;
        let mut inputs = std::mem::take(&mut self.state);
        inputs.insert("tokens".into(), ids(piece.iter().map(|&t| t as i64).collect()));
        inputs.insert("positions".into(), ids((start..start + piece.len() as i64).collect()));
        if self.has_mtp {
            // The MTP layer at position i reads token i + 1: known inside the prompt.
            let next = tokens.iter().skip(k * chunk + 1).map(|&t| t as i64).chain(std::iter::repeat(0));
            inputs.insert("mtp_tokens".into(), ids(next.take(piece.len()).collect()));
        }
        let (wanted, carried): (Vec<&str>, &[&str]) = match carry {
            true => (vec!["logits"], &caches),
            false => (self.wanted(), &[]),
        };
        let ran = self.program.run_carrying("prefill", &inputs, &wanted, resident, carried);
        let mut out = ran.inspect_err(|_| restore(&mut self.state, &mut inputs, &self.caches))?;
        let rows = out.remove("logits").ok_or("the entry has no logits")?;
        let (HostData::F32(v), &[_, vocab]) = (rows.data, &rows.shape[..]) else {
            return Err("logits are not f32 [tokens, vocab]".into());
        };
        for c in &self.caches {
            let grown = match carry {
                // On the device: the host keeps the shape.
                true => {
                    HostBuffer { shape: vec![self.position + piece.len(), self.width], data: HostData::F32(Vec::new()) }
                }
                false => out.remove(c).ok_or_else(|| format!("prefill gave no {c}"))?,
            };
            self.state.insert(c.clone(), grown);
        }
        self.carried = carry;
        self.position += piece.len();
        Ok((v, vocab))
    }

    /// Feeds one token at the next position; returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, String> {
        match self.decode_next(token, false)? {
            Next::Logits(mut l) => l.pop().ok_or_else(|| "decode gave no logits".into()),
            Next::Tokens(_) => Err("decode gave a token for logits".into()),
        }
    }

    /// As [`ArtifactSession::decode`]; `greedy` lets a program that picks tokens itself return the
    /// next token instead of the logits.
    pub fn decode_next(&mut self, token: u32, greedy: bool) -> Result<Next, String> {
        if self.position >= self.max_len {
            return Err(format!("the session is full ({} tokens)", self.max_len));
        }
        if self.layout.is_none() {
            // The prefilled rows into caches of self.rows rows (one sequence), or its pages.
            let paged = DecodeCaches::paged_entry(&self.program.entry_plan("decode")?.bounds);
            let mut layout = DecodeCaches::new(&[self.max_len], self.rows, self.width, paged);
            for c in &self.caches {
                let laid = match self.carried {
                    // The prefill left them on the device: the decode steps take them there.
                    true => layout.lay_out_held(self.position)?,
                    false => {
                        let HostData::F32(rows) = &self.state[c].data else { return Err(format!("{c} is not f32")) };
                        layout.lay_out(&[rows])?
                    }
                };
                self.state.insert(c.clone(), laid);
            }
            self.layout = Some(layout);
            self.resident = std::mem::take(&mut self.carried);
        }
        let table = self.layout.as_mut().map(|l| l.step(&[self.position], &[true])).transpose()?.flatten();
        let mut inputs = std::mem::take(&mut self.state);
        if let Some(t) = table {
            inputs.insert(PAGE_POOL.into(), t);
        }
        inputs.insert("tokens".into(), ids(vec![token as i64]));
        inputs.insert("positions".into(), ids(vec![self.position as i64]));
        if self.has_mtp {
            inputs.insert("mtp_tokens".into(), ids(vec![0]));
        }
        let caches: Vec<&str> = self.caches.iter().map(String::as_str).collect();
        let stepped = step(self.program, &inputs, &caches, &mut self.resident, greedy);
        let (mut out, next) = stepped.inspect_err(|_| restore(&mut self.state, &mut inputs, &self.caches))?;
        for c in &self.caches {
            let cache = out.remove(c).or_else(|| inputs.remove(c)).ok_or_else(|| format!("decode gave no {c}"))?;
            self.state.insert(c.clone(), kept_shape(cache, self.resident));
        }
        self.position += 1;
        Ok(next)
    }
}

/// Several sequences generated together on a `cpu` artifact: each prompt prefilled on its own (in
/// chunks, as [`ArtifactSession`] does), then one decode launch per step over all of them — each row its
/// sequence's next token at its own position over its own cache rows. A sequence that has stopped
/// stays in the batch (its row is computed and ignored) so that the others keep their rows.
pub struct ArtifactBatch<'a> {
    program: &'a dyn Program,
    caches: Vec<String>,
    /// Per cache input: as `layout` lays them out.
    state: HashMap<String, HostBuffer>,
    /// `[sequences, rows, width]` (rows: [`cache_rows`] of the longest limit), or one pool of the
    /// pages the sequences may fill.
    layout: DecodeCaches,
    positions: Vec<usize>,
    /// Most tokens of each sequence (prompt and generated).
    limits: Vec<usize>,
    has_mtp: bool,
    /// The caches are on the program's device as the last decode step left them.
    resident: bool,
    /// Prefills leave their caches on the program's device, and the steps take them there.
    on_device: bool,
    /// Per slot: it holds no sequence (none joined it, or its sequence finished).
    vacant: Vec<bool>,
    /// Sequences may join ([`ArtifactBatch::open`]).
    joinable: bool,
    /// A prompt being prefilled into a slot.
    joining: Option<Joining<'a>>,
    /// Per slot (where prefixes are reused): the tokens whose cache rows its pages hold — its
    /// prompt once placed, then each token a decode step fed it (else empty).
    sequences: Vec<Vec<u32>>,
    /// Sequences' prefixes whose cache pages outlived them ([`PagePool::keep`]): the tokens their
    /// rows hold and the one after (which the MTP layer's last row read), and their pages' id.
    kept: Vec<(Vec<u32>, u64)>,
    /// A joining prompt starting as a running or ended sequence's did holds that one's whole
    /// pages of cache rows they share instead of prefilling them
    /// ([`ArtifactBatch::reuse_prefixes`]).
    reuse: bool,
    /// The prompt scores of the join that ended last, where it asked for them
    /// ([`ArtifactBatch::start_join_scoring`]), until taken.
    scored: Vec<(f32, Vec<(u32, f32)>)>,
}

/// Whole pages of rows a sequence whose prompt is `prompt` may copy from one whose prompt was
/// `source`: a cache row depends on the tokens up to it and (the MTP layer's) the one after, so
/// the pages whose rows and following token both prompts share — at least one of `prompt`'s
/// tokens left to prefill, for its logits.
fn shared_pages(prompt: &[u32], source: &[u32]) -> usize {
    let common = prompt.iter().zip(source).take_while(|(a, b)| a == b).count();
    common.saturating_sub(1) / crate::pages::PAGE_ROWS
}

/// A prompt being prefilled into slot `slot`, chunk by chunk ([`ArtifactBatch::start_join`]).
struct Joining<'a> {
    slot: usize,
    prompt: Vec<u32>,
    limit: usize,
    session: ArtifactSession<'a>,
    chunks: usize,
    /// The next chunk to run.
    next: usize,
    /// The prompt's first rows, in another sequence's pages ([`ArtifactBatch::reuse_prefixes`]):
    /// the chunks prefill the tokens after them.
    reused: usize,
    /// Those pages, pinned until the joining sequence shares them ([`crate::pages::PagePool::pin`]).
    pin: Option<u64>,
    /// Score the prompt: with this many alternatives ([`ArtifactBatch::start_join_scoring`]).
    score: Option<usize>,
    /// The prompt's tokens after the first scored so far: each one's log-probability and the most
    /// probable tokens' at its position.
    scores: Vec<(f32, Vec<(u32, f32)>)>,
}

/// Whether sequences can join a running batch on `program` ([`ArtifactBatch::open`]): its caches
/// cross to the host, or its decode takes a pool of pages (whose first pages a device's prefill
/// may use). Caches per sequence on a device cannot: a prefill there writes the first rows, which
/// are a running sequence's.
pub fn joins_running_batches(program: &dyn Program) -> Result<bool, String> {
    let paged = DecodeCaches::paged_entry(&program.entry_plan("decode")?.bounds);
    Ok(paged || !ArtifactSession::new(program, 1)?.decode_on_device)
}

/// Pages of the decode plan's pool (None: caches per sequence).
fn pool_pages(program: &dyn Program) -> Result<Option<usize>, String> {
    let decode = program.entry_plan("decode")?;
    if !DecodeCaches::paged_entry(&decode.bounds) {
        return Ok(None);
    }
    let cache = decode.bounds.iter().find(|(n, _)| n.starts_with("kv_cache."));
    Ok(Some(cache.and_then(|(_, b)| b.first().copied()).ok_or("the decode plan's pool has no caches")?))
}

impl<'a> ArtifactBatch<'a> {
    /// An empty batch of `slots` sequences that requests join as others end
    /// ([`ArtifactBatch::join`]), for sequences of at most `max_len` tokens whose prompts have at
    /// most `max_prompt`. A pool of pages holds what the `slots` longest of `limits` (every
    /// request's most tokens) may fill, within the decode plan's pool, and — where prefills leave
    /// their caches on the device — scratch pages for the longest prompt before them: a prefill
    /// writes its caches' first rows, from where they move to the sequence's own pages.
    pub fn open(program: &'a dyn Program, slots: usize, limits: &[usize], max_prompt: usize) -> Result<Self, String> {
        let decode = program.entry_plan("decode")?;
        if slots == 0 || slots > decode.sizes.rows {
            return Err(format!(
                "{slots} sequences at once: the artifact's decode plan holds 1..={} (compile with a larger --max-batch)",
                decode.sizes.rows
            ));
        }
        let max_len = limits.iter().copied().max().unwrap_or(0);
        let rows = cache_rows(program, max_len)?;
        let probe = ArtifactSession::new(program, max_len)?;
        let (caches, has_mtp, width, on_device) =
            (probe.caches.clone(), probe.has_mtp, probe.width, probe.decode_on_device);
        let pool = match DecodeCaches::paged_entry(&decode.bounds) {
            false if on_device => {
                return Err("sequences cannot join a running batch whose caches per sequence stay on the device \
                            (a decode entry over a pool of pages can: v3c compile's default --decode-attention tensor-cores)"
                    .into())
            }
            false => None,
            true => {
                let bound = pool_pages(program)?.unwrap_or(0);
                let scratch = if on_device { max_prompt.div_ceil(crate::pages::PAGE_ROWS) } else { 0 };
                let mut pages: Vec<usize> = limits.iter().map(|&l| pages_of(l)).collect();
                pages.sort_unstable_by(|a, b| b.cmp(a));
                let want: usize = pages.iter().take(slots).sum();
                let room = want.min(bound.saturating_sub(scratch));
                if room < pages[0] {
                    return Err(format!(
                        "a sequence of {max_len} tokens needs {} pages of 64 rows; the decode plan's pool holds {bound}{} \
                         (compile with a larger --max-context or --max-batch)",
                        pages[0],
                        if scratch > 0 { format!(", {scratch} of them for a {max_prompt}-token prompt's prefill") } else { String::new() }
                    ));
                }
                Some((room, scratch))
            }
        };
        let layout = DecodeCaches::with_pool(slots, rows, width, pool);
        let mut held = layout.held();
        if !on_device {
            held.data = HostData::F32(vec![0.0; held.shape.iter().product()]);
        }
        let state = caches.iter().map(|c| (c.clone(), held.clone())).collect();
        Ok(ArtifactBatch {
            program,
            caches,
            state,
            layout,
            positions: vec![0; slots],
            limits: vec![0; slots],
            has_mtp,
            resident: on_device,
            on_device,
            vacant: vec![true; slots],
            joinable: true,
            joining: None,
            sequences: vec![Vec::new(); slots],
            kept: Vec::new(),
            reuse: false,
            scored: Vec::new(),
        })
    }

    /// Pages of the pool its sequences may hold (its scratch pages not counted); None: caches per
    /// sequence.
    pub fn room(&self) -> Option<usize> {
        self.layout.pool.as_ref().map(|p| p.pages() - p.scratch())
    }

    /// The share of the pool's pages (those sequences may take) held by sequences or joins; None
    /// without a pool.
    pub fn pool_usage(&self) -> Option<f64> {
        let pool = self.layout.pool.as_ref()?;
        let pages = pool.pages() - pool.scratch();
        Some(if pages == 0 { 0.0 } else { 1.0 - pool.available() as f64 / pages as f64 })
    }

    /// Request `prompt`, of at most `limit` tokens, joins the vacant slot `i` of an open batch: it
    /// is prefilled on its own and its caches go to the slot's rows or pages (moved there on the
    /// device from the prefill's scratch pages, or laid in on the host). Returns its last logits.
    pub fn join(&mut self, i: usize, prompt: &[u32], limit: usize) -> Result<Vec<f32>, String> {
        self.start_join(i, prompt, limit)?;
        loop {
            if let Some((_, logits)) = self.continue_join()? {
                return Ok(logits);
            }
        }
    }

    /// As [`ArtifactBatch::join`], the prefill in chunks that [`ArtifactBatch::continue_join`]
    /// runs, so that decode steps of the running sequences may go between them. One join at a
    /// time; slot `i` is taken (not decoded) until it ends.
    pub fn start_join(&mut self, i: usize, prompt: &[u32], limit: usize) -> Result<(), String> {
        self.start_join_scoring(i, prompt, limit, None)
    }

    /// As [`ArtifactBatch::start_join`]; with `score` (a count of alternatives), every prompt
    /// token after the first is scored as the chunks run — its log-probability under the logits
    /// of the token before it, and the `score` most probable tokens' there — taken once the join
    /// ends ([`ArtifactBatch::take_prompt_scores`]). A scored prompt is prefilled whole (shared
    /// rows have no logits).
    pub fn start_join_scoring(
        &mut self,
        i: usize,
        prompt: &[u32],
        limit: usize,
        score: Option<usize>,
    ) -> Result<(), String> {
        if !self.joinable {
            return Err("this batch was prefilled whole: no sequence joins it".into());
        }
        if let Some(j) = &self.joining {
            return Err(format!("slot {} is still being joined", j.slot));
        }
        if !self.vacant.get(i).copied().unwrap_or(false) {
            return Err(format!("slot {i} of {} holds a sequence", self.vacant.len()));
        }
        if limit > self.layout.rows {
            return Err(format!("{limit} tokens: the batch's sequences hold at most {}", self.layout.rows));
        }
        let scratch = self.layout.pool.as_ref().map_or(0, |p| p.scratch() * crate::pages::PAGE_ROWS);
        if self.on_device && prompt.len() > scratch {
            return Err(format!("a prompt of {} tokens: the batch's prefills have {scratch} rows", prompt.len()));
        }
        let mut session = ArtifactSession::new(self.program, limit)?;
        session.decode_on_device = self.on_device;
        let (reused, pin) = match score {
            None => self.copy_prefix(i, prompt, &mut session)?,
            Some(_) => (0, None),
        };
        let chunks = match session.prefill_chunks(&prompt[reused..]) {
            Ok(c) => c,
            Err(e) => {
                self.unpin(pin);
                return Err(e);
            }
        };
        self.vacant[i] = false;
        let scores = Vec::new();
        let (slot, prompt, next) = (i, prompt.to_vec(), 0);
        self.joining = Some(Joining { slot, prompt, limit, session, chunks, next, reused, pin, score, scores });
        Ok(())
    }

    /// The prompt scores of the join that ended last, where it asked for them (else none).
    pub fn take_prompt_scores(&mut self) -> Vec<(f32, Vec<(u32, f32)>)> {
        std::mem::take(&mut self.scored)
    }

    fn unpin(&mut self, pin: Option<u64>) {
        if let (Some(pool), Some(id)) = (self.layout.pool.as_mut(), pin) {
            pool.unpin(id);
        }
    }

    /// Joining prompts whose first tokens a running or ended sequence's tokens share (its prompt
    /// and the tokens fed after it: a conversation's next turn) hold the whole pages of its cache
    /// rows both share (`on`; read only: a sequence writes rows past its prompt), or prefill every
    /// token. A pool of pages only: an ended sequence keeps its pages until the pool needs them for
    /// another sequence (the least recently used given back first). The shared rows are those a prefill of the prompt would write up to
    /// rounding: of chunks that split differently, and of decode steps' kernels for the rows of
    /// generated tokens (whose MTP-layer rows saw no next token: that layer's cache, which plain
    /// generation never reads back, is then not a prefill's).
    pub fn reuse_prefixes(&mut self, on: bool) {
        self.reuse = on && self.joinable && self.layout.pool.is_some();
    }

    /// Rows of the prompt joining slot `i` that [`ArtifactBatch::reuse_prefixes`] shares with
    /// another sequence's pages (none joining: 0).
    pub fn reused_tokens(&self) -> usize {
        self.joining.as_ref().map_or(0, |j| j.reused)
    }

    /// The pages of the running or kept prompt sharing the most whole pages with `prompt` (joining
    /// slot `i`), the shared ones; none when prefixes are not reused.
    fn prefix_pages(&mut self, i: usize, prompt: &[u32]) -> Vec<u32> {
        let Some(pool) = self.layout.pool.as_mut().filter(|_| self.reuse) else { return Vec::new() };
        self.kept.retain(|(_, id)| pool.keeps(*id));
        let running = self.sequences.iter().enumerate().filter(|(s, _)| *s != i);
        let best_running =
            running.map(|(s, p)| (shared_pages(prompt, p), s)).max_by_key(|&(m, s)| (m, std::cmp::Reverse(s)));
        let best_kept = self.kept.iter().map(|(t, id)| (shared_pages(prompt, t), *id)).max_by_key(|&(m, _)| m);
        match (best_running, best_kept) {
            (Some((m, s)), kept) if m > 0 && kept.is_none_or(|(k, _)| k <= m) => pool.pages_held(s)[..m].to_vec(),
            (_, Some((m, id))) if m > 0 => pool.kept(id).map_or(Vec::new(), |p| p[..m].to_vec()),
            _ => Vec::new(),
        }
    }

    /// Copies into `session` (joining slot `i`) the cache rows of `prompt`'s first whole pages that
    /// another sequence's pages hold ([`ArtifactBatch::prefix_pages`]) — on the device into the
    /// scratch rows its prefill continues from, or on the host into its caches — and pins those
    /// pages, which the sequence will share once joined. Returns the rows and the pin.
    fn copy_prefix(
        &mut self,
        i: usize,
        prompt: &[u32],
        session: &mut ArtifactSession,
    ) -> Result<(usize, Option<u64>), String> {
        use crate::pages::PAGE_ROWS;
        let pages = self.prefix_pages(i, prompt);
        let (rows, width) = (pages.len() * PAGE_ROWS, session.width);
        if rows == 0 {
            return Ok((0, None));
        }
        for c in &self.caches {
            let copied = match self.on_device {
                true => {
                    // Runs of consecutive pages, to the scratch rows (the pool's first pages, which
                    // no sequence holds: no overlap).
                    let mut k = 0;
                    while k < pages.len() {
                        let run =
                            (k + 1..pages.len()).take_while(|&j| pages[j] == pages[k] + (j - k) as u32).count() + 1;
                        self.program.move_rows(c, pages[k] as usize * PAGE_ROWS, k * PAGE_ROWS, run * PAGE_ROWS)?;
                        k += run;
                    }
                    HostBuffer { shape: vec![rows, width], data: HostData::F32(Vec::new()) }
                }
                false => {
                    let HostData::F32(pool) = &self.state[c].data else { return Err(format!("{c} is not f32")) };
                    let mut v = Vec::with_capacity(rows * width);
                    for &p in &pages {
                        let at = p as usize * PAGE_ROWS * width;
                        v.extend_from_slice(pool.get(at..at + PAGE_ROWS * width).ok_or("a page past the pool")?);
                    }
                    HostBuffer { shape: vec![rows, width], data: HostData::F32(v) }
                }
            };
            session.state.insert(c.clone(), copied);
        }
        (session.position, session.carried) = (rows, self.on_device);
        let pin = self.layout.pool.as_mut().map(|pool| pool.pin(&pages));
        Ok((rows, pin))
    }

    /// Whether a prompt joining slot `i` with at most `limit` tokens fits beside the running
    /// sequences (`running`: each one's slot and limit, a join under way's included): the pages
    /// each may still take and the joining one's — less those it would share with another
    /// sequence or kept prefix — against the pages available ([`crate::pages::PagePool::available`],
    /// less the kept-only ones it would share). Caches per sequence: always.
    pub fn fits(&mut self, i: usize, prompt: &[u32], limit: usize, running: &[(usize, usize)], share: bool) -> bool {
        let shared = if share { self.prefix_pages(i, prompt) } else { Vec::new() };
        let joining = self.joining.as_ref().map(|j| (j.slot, j.reused / crate::pages::PAGE_ROWS));
        let Some(pool) = self.layout.pool.as_ref() else { return true };
        let holds = |s: usize| match joining {
            Some((slot, pinned)) if slot == s => pinned,
            _ => pool.holds(s),
        };
        let needed: usize = running.iter().map(|&(s, l)| pages_of(l).saturating_sub(holds(s))).sum();
        needed + pages_of(limit).saturating_sub(shared.len()) + pool.kept_only(&shared) <= pool.available()
    }

    /// Whether a join is under way.
    pub fn joining(&self) -> bool {
        self.joining.is_some()
    }

    /// Abandons the join under way: its slot is vacant again, the rows it prefilled (in its own
    /// session, or the scratch pages) dropped.
    pub fn cancel_join(&mut self) -> Result<(), String> {
        let j = self.joining.take().ok_or("no join under way")?;
        self.vacant[j.slot] = true;
        self.unpin(j.pin);
        Ok(())
    }

    /// Tokens of the join under way prefilled so far (none under way: 0).
    pub fn joined_tokens(&self) -> usize {
        self.joining.as_ref().map_or(0, |j| j.session.position)
    }

    /// The next chunk of the join under way — all of them where the prefill's caches cross to the
    /// device between chunks that decode steps would overwrite (a program that carries them over
    /// without keeping the decode's there). After the last: the caches go to the slot's rows or
    /// pages (moved on the device from the scratch pages, or laid in on the host) and the slot
    /// and its prompt's last logits come back.
    pub fn continue_join(&mut self) -> Result<Option<(usize, Vec<f32>)>, String> {
        let interleave = self.on_device || !self.program.carries_outputs();
        let j = self.joining.as_mut().ok_or("no join under way")?;
        let mut last = Vec::new();
        while j.next < j.chunks {
            if self.on_device && j.session.position > 0 {
                // Decode steps since the last chunk (or the copy of a prefix) gave the caches as
                // the whole pool; the scratch rows (no sequence's pages) still hold the prompt's
                // rows so far.
                for c in &self.caches {
                    self.program.reclaim_rows(c, j.session.position)?;
                }
            }
            let at = j.session.position;
            let (rows, vocab) = j.session.prefill_chunk(&j.prompt[j.reused..], j.next)?;
            j.next += 1;
            if let Some(top) = j.score {
                // Row r (position at + r) predicts the prompt's token at + r + 1.
                for (r, row) in rows.chunks(vocab.max(1)).enumerate() {
                    if let Some(&t) = j.prompt.get(at + r + 1) {
                        j.scores.push((log_probability(row, t), top_log_probabilities(row, top)));
                    }
                }
            }
            last = rows[rows.len() - vocab..].to_vec();
            if interleave && j.next < j.chunks {
                return Ok(None);
            }
        }
        let Some(mut j) = self.joining.take() else { return Err("no join under way".into()) };
        let (i, n) = (j.slot, j.prompt.len());
        self.scored = std::mem::take(&mut j.scores);
        // The shared pages are the sequence's first; its own rows go to the pages after them.
        if let (Some(pool), Some(pin)) = (self.layout.pool.as_mut(), j.pin) {
            pool.share_pinned(i, pin)?;
        }
        let runs = clip_runs(&self.layout.place_runs(i, n)?, j.reused);
        for c in &self.caches {
            match self.on_device {
                true => {
                    for &(from, to, len) in runs.iter().filter(|(from, to, _)| from != to) {
                        self.program.move_rows(c, from, to, len)?;
                    }
                }
                false => {
                    let HostData::F32(rows) = &j.session.state[c].data else { return Err(format!("{c} is not f32")) };
                    let HostData::F32(cache) =
                        &mut self.state.get_mut(c).ok_or_else(|| format!("no {c} in the batch"))?.data
                    else {
                        return Err(format!("{c} is not f32 on the host"));
                    };
                    let w = self.layout.width.max(1);
                    for &(from, to, len) in &runs {
                        cache
                            .get_mut(to * w..(to + len) * w)
                            .ok_or_else(|| format!("sequence {i}: rows {to}..{} past the caches", to + len))?
                            .copy_from_slice(&rows[from * w..(from + len) * w]);
                    }
                }
            }
        }
        (self.positions[i], self.limits[i]) = (n, j.limit);
        if self.reuse {
            self.sequences[i] = j.prompt;
        }
        Ok(Some((i, last)))
    }

    /// Prefills `prompts` (each on its own) for sequences of at most `max_len` tokens; returns the
    /// batch and each prompt's last logits.
    pub fn prefill(
        program: &'a dyn Program,
        prompts: &[Vec<u32>],
        max_len: usize,
    ) -> Result<(ArtifactBatch<'a>, Vec<Vec<f32>>), String> {
        ArtifactBatch::prefill_within(program, prompts, &vec![max_len; prompts.len()])
    }

    /// As [`ArtifactBatch::prefill`], sequence i of at most `limits[i]` tokens (a decode entry
    /// over a pool of pages holds the pages those fill, not the longest's for every sequence).
    pub fn prefill_within(
        program: &'a dyn Program,
        prompts: &[Vec<u32>],
        limits: &[usize],
    ) -> Result<(ArtifactBatch<'a>, Vec<Vec<f32>>), String> {
        let decode = program.entry_plan("decode")?;
        let rows = decode.sizes.rows;
        if prompts.is_empty() || prompts.len() > rows {
            return Err(format!(
                "{} sequences: the artifact's decode plan holds 1..={rows} (compile with a larger --max-batch)",
                prompts.len()
            ));
        }
        if limits.len() != prompts.len() {
            return Err(format!("{} limits for {} prompts", limits.len(), prompts.len()));
        }
        let cache_rows = cache_rows(program, limits.iter().copied().max().unwrap_or(0))?;
        let probe = ArtifactSession::new(program, limits[0])?;
        let (caches, has_mtp, width) = (probe.caches.clone(), probe.has_mtp, probe.width);
        // Where the program carries a prefill's caches over and its decode takes them as they are,
        // the caches stay on its device: each prompt's prefill leaves its rows at the caches' first
        // rows, from where they move to their own (device to device) before the next prefill; the
        // prompt prefilled last keeps them there — slot 0 of `[B, S, C]`, or the pool's first pages
        // for the longest prompt (no other prefill reaches past its rows).
        let on_device = probe.decode_on_device;
        let paged = DecodeCaches::paged_entry(&decode.bounds);
        let mut layout = DecodeCaches::new(limits, cache_rows, width, paged);
        let n = prompts.len();
        let last = match paged {
            true => (0..n).rev().max_by_key(|&i| prompts[i].len()).unwrap_or(0),
            false => 0,
        };
        let order: Vec<usize> = (0..n).filter(|&i| i != last).chain([last]).collect();
        if on_device {
            for &i in order.iter().rev() {
                layout.place(i, prompts[i].len())?;
            }
        }
        let mut logits = vec![Vec::new(); n];
        let mut prefilled: Vec<HashMap<String, HostBuffer>> = vec![HashMap::new(); n];
        for &i in &order {
            let mut one = ArtifactSession::new(program, limits[i])?;
            one.decode_on_device = on_device;
            logits[i] = one.prefill(&prompts[i]).map_err(|e| format!("sequence {i}: {e}"))?;
            if on_device {
                let (rows, first) = (prompts[i].len(), layout.place(i, prompts[i].len())?);
                for c in &caches {
                    if first != 0 {
                        program.move_rows(c, 0, first, rows).map_err(|e| format!("sequence {i}: {e}"))?;
                    }
                }
            } else {
                prefilled[i] = std::mem::take(&mut one.state);
            }
        }
        let mut state: HashMap<String, HostBuffer> = HashMap::new();
        for c in &caches {
            let laid = match on_device {
                true => layout.held(),
                false => {
                    let mut rows = Vec::new();
                    for seq in &prefilled {
                        let HostData::F32(r) = &seq[c].data else { return Err(format!("{c} is not f32")) };
                        rows.push(r.as_slice());
                    }
                    layout.lay_out(&rows)?
                }
            };
            state.insert(c.clone(), laid);
        }
        let positions = prompts.iter().map(Vec::len).collect();
        let limits = limits.to_vec();
        let (resident, vacant) = (on_device, vec![false; n]);
        Ok((
            ArtifactBatch {
                program,
                caches,
                state,
                layout,
                positions,
                limits,
                has_mtp,
                resident,
                on_device,
                vacant,
                joinable: false,
                joining: None,
                sequences: Vec::new(),
                kept: Vec::new(),
                reuse: false,
                scored: Vec::new(),
            },
            logits,
        ))
    }

    /// The cache pages sequence `i` holds and its pool's (None: caches per sequence).
    pub fn pages(&self, i: usize) -> Option<(usize, usize)> {
        self.layout.pages_of(i)
    }

    /// Sequence `i` will not be fed again: its pages (a pool's) go back — those of the whole pages
    /// of its rows (its prompt's and the tokens fed after it) kept for later prompts where
    /// [`ArtifactBatch::reuse_prefixes`], unless a kept sequence holds them already (a kept one
    /// this one holds goes back).
    pub fn finish(&mut self, i: usize) {
        if let Some(v) = self.vacant.get_mut(i) {
            *v = true;
        }
        let sequence = self.sequences.get_mut(i).map(std::mem::take).unwrap_or_default();
        let pages = sequence.len().saturating_sub(1) / crate::pages::PAGE_ROWS;
        let (Some(pool), true) = (self.layout.pool.as_mut(), self.reuse && pages > 0) else {
            return self.layout.finish(i);
        };
        let tokens = &sequence[..pages * crate::pages::PAGE_ROWS + 1];
        self.kept.retain(|(_, id)| pool.keeps(*id));
        if self.kept.iter().any(|(t, _)| t.starts_with(tokens)) {
            return self.layout.finish(i);
        }
        for (_, id) in self.kept.iter().filter(|(t, _)| tokens.starts_with(t)) {
            pool.unkeep(*id);
        }
        self.kept.retain(|(t, _)| !tokens.starts_with(t));
        if let Some(id) = pool.keep(i, pages) {
            self.kept.push((tokens.to_vec(), id));
        }
    }

    /// Feeds `tokens[i]` to sequence i at its next position, for the sequences where `active[i]`
    /// (the others are fed again at their last position: computed, ignored); returns every
    /// sequence's logits.
    pub fn decode(&mut self, tokens: &[u32], active: &[bool], greedy: bool) -> Result<Next, String> {
        let n = self.positions.len();
        if tokens.len() != n || active.len() != n {
            return Err(format!("{} tokens and {} flags for {n} sequences", tokens.len(), active.len()));
        }
        if let Some(i) = (0..n).find(|&i| active[i] && self.positions[i] >= self.limits[i]) {
            return Err(format!("sequence {i} is full ({} tokens)", self.limits[i]));
        }
        let at: Vec<i64> = (0..n)
            .map(|i| if active[i] { self.positions[i] } else { self.positions[i].saturating_sub(1) } as i64)
            .collect();
        let table = self.layout.step(&self.positions, active)?;
        let mut inputs = std::mem::take(&mut self.state);
        if let Some(t) = table {
            inputs.insert(PAGE_POOL.into(), t);
        }
        inputs.insert("tokens".into(), ids(tokens.iter().map(|&t| t as i64).collect()));
        inputs.insert("positions".into(), ids(at));
        if self.has_mtp {
            inputs.insert("mtp_tokens".into(), ids(vec![0; n]));
        }
        let caches: Vec<&str> = self.caches.iter().map(String::as_str).collect();
        // The steps may leave the caches on the device unless joining sequences' rows are laid
        // into them on the host.
        let keep = self.on_device || !self.joinable;
        let stepped = step_keeping(self.program, &inputs, &caches, &mut self.resident, greedy, keep);
        let (mut out, next) = stepped.inspect_err(|_| restore(&mut self.state, &mut inputs, &self.caches))?;
        for c in &self.caches {
            let cache = out.remove(c).or_else(|| inputs.remove(c)).ok_or_else(|| format!("decode gave no {c}"))?;
            self.state.insert(c.clone(), kept_shape(cache, self.resident));
        }
        for (i, p) in self.positions.iter_mut().enumerate() {
            if active[i] {
                *p += 1;
                // Its row is written: later prompts may copy it.
                if let Some(seq) = self.sequences.get_mut(i).filter(|s| !s.is_empty()) {
                    seq.push(tokens[i]);
                }
            }
        }
        Ok(next)
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
    let limits: Vec<usize> = prompts.iter().map(|p| p.len() + max_new).collect();
    let (mut batch, logits) = ArtifactBatch::prefill_within(program, prompts, &limits)?;
    let mut logits = Next::Logits(logits);
    // Every sequence greedy: a program that picks tokens itself does (the logits stay there).
    let greedy = samplers.iter().all(|s| s.plain_greedy());
    for (s, p) in samplers.iter_mut().zip(prompts) {
        s.start(p);
    }
    let prefill_s = start.elapsed().as_secs_f64();
    let n = prompts.len();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut active = vec![max_new > 0; n];
    let mut stopped = vec![false; n];
    let mut done_at = vec![0.0; n];
    let mut pages: Vec<Option<(usize, usize)>> = (0..n).map(|i| batch.pages(i)).collect();
    while active.iter().any(|&a| a) {
        let mut next = vec![0u32; n];
        let mut wanted: Vec<(usize, &mut _)> = samplers.iter_mut().enumerate().filter(|(i, _)| active[*i]).collect();
        let mut picked = vec![None; n];
        let tokens_of = logits.pick_each(&mut wanted);
        for ((i, _), t) in wanted.iter().zip(tokens_of) {
            picked[*i] = Some(t);
        }
        for i in 0..n {
            let Some(t) = picked[i] else {
                next[i] = tokens[i].last().copied().unwrap_or(0);
                continue;
            };
            tokens[i].push(t);
            next[i] = t;
            if Some(t) == eos || tokens[i].len() == max_new {
                (active[i], stopped[i]) = (false, Some(t) == eos);
                done_at[i] = start.elapsed().as_secs_f64();
                pages[i] = batch.pages(i);
                batch.finish(i);
            }
        }
        if active.iter().any(|&a| a) {
            logits = batch.decode(&next, &active, greedy)?;
        }
    }
    Ok((0..n)
        .map(|i| {
            let tokens = std::mem::take(&mut tokens[i]);
            Generation {
                pages: pages[i],
                ..Generation::alone(tokens, stopped[i], prefill_s, done_at[i].max(prefill_s))
            }
        })
        .collect())
}

/// Requests served by [`generate_queue`]: each one's generation (in a queue, its times count
/// from when it joined), and the run's.
#[derive(Debug, Clone)]
pub struct Served {
    pub generations: Vec<Generation>,
    /// Sequences decoding together at most.
    pub slots: usize,
    /// Requests that joined a running batch (as another ended).
    pub joined: usize,
    /// Seconds in prefills, and in all.
    pub prefill_s: f64,
    pub total_s: f64,
}

/// How [`generate_queue`] runs its prompts: at most `slots` sequences at once, and as
/// [`Serving`]'s fields say.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    pub slots: usize,
    pub prefill_budget: Option<usize>,
    pub reuse_prefixes: bool,
}

impl Queue {
    /// `slots` at once, the default budget (one chunk), prefixes reused.
    pub fn new(slots: usize) -> Queue {
        Queue { slots, prefill_budget: None, reuse_prefixes: true }
    }
}

/// Pages of 64 rows for `limit` rows.
fn pages_of(limit: usize) -> usize {
    limit.div_ceil(crate::pages::PAGE_ROWS)
}

/// Runs of rows (a sequence's first row, the caches', rows) from row `from` of the sequence on.
fn clip_runs(runs: &[(usize, usize, usize)], from: usize) -> Vec<(usize, usize, usize)> {
    runs.iter()
        .filter(|&&(first, _, len)| first + len > from)
        .map(|&(first, at, len)| {
            let skip = from.saturating_sub(first);
            (first + skip, at + skip, len - skip)
        })
        .collect()
}

/// Generates up to `max_new` tokens after each of `prompts` (sampler `samplers[i]` for prompt
/// i, stopping after `eos` when given) with at most `slots` sequences decoding together: the
/// first prompts start as a batch, and as a sequence ends the next waiting prompt joins the
/// running batch in its place ([`ArtifactBatch::join`]) — in order, once the pool has pages
/// for all its tokens beside those the running sequences may still fill. Where sequences
/// cannot join ([`joins_running_batches`]), the prompts run in batches of `slots`, one after
/// another. With `slots` at least the prompts' count, this is [`generate_batch`] (unless prompts
/// share whole pages that [`Queue::reuse_prefixes`] shares: then they join). Joining prompts
/// prefill `prefill_budget` tokens between decode steps ([`Serving::prefill_budget`]), and may
/// share cache pages of the prompts before them ([`Serving::reuse_prefixes`]).
pub fn generate_queue(
    program: &dyn Program,
    prompts: &[Vec<u32>],
    Queue { slots, prefill_budget, reuse_prefixes }: Queue,
    max_new: usize,
    samplers: &mut [v3c_models::reference::Sampler],
    eos: Option<u32>,
) -> Result<Served, String> {
    let n = prompts.len();
    if samplers.len() != n || n == 0 || slots == 0 {
        return Err(format!("{n} prompts, {} samplers, {slots} sequences at once", samplers.len()));
    }
    let start = std::time::Instant::now();
    let limits: Vec<usize> = prompts.iter().map(|p| p.len() + max_new).collect();
    // All at once where the pool (if any) holds every sequence's pages — unless prompts share
    // whole pages a pool could copy instead of prefilling (they then join one after another).
    let pool = pool_pages(program)?;
    let fits = pool.is_none_or(|bound| limits.iter().map(|&l| pages_of(l)).sum::<usize>() <= bound);
    let sharing =
        reuse_prefixes && pool.is_some() && (1..n).any(|j| (0..j).any(|i| shared_pages(&prompts[j], &prompts[i]) > 0));
    if (slots >= n && fits && !sharing) || !joins_running_batches(program)? {
        let slots = slots.min(n);
        let (mut generations, mut prefill_s) = (Vec::new(), 0.0);
        for (wave, pick) in prompts.chunks(slots).zip(samplers.chunks_mut(slots)) {
            let done = generate_batch(program, wave, max_new, pick, eos)?;
            prefill_s += done.first().map_or(0.0, |g| g.prefill_s);
            generations.extend(done);
        }
        let total_s = start.elapsed().as_secs_f64();
        return Ok(Served { generations, slots, joined: 0, prefill_s, total_s });
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut requests = prompts.iter().zip(samplers.iter());
    let mut next = |_: bool| match requests.next() {
        Some((p, s)) => Arrival::Request(Request::new(p.clone(), max_new, s.clone())),
        None => Arrival::Closed,
    };
    let mut done: Vec<Option<Generation>> = vec![None; n];
    let mut finished = |j: usize, p: Progress| -> Result<(), String> {
        match p {
            Progress::Token(_) | Progress::Scored(..) => {}
            Progress::Ended(g) => done[j] = Some(g),
            Progress::Refused(e) => return Err(format!("prompt {j}: {e}")),
            Progress::Cancelled(_) => return Err(format!("prompt {j} cancelled")),
        }
        Ok(())
    };
    let serving =
        Serving { slots, limits: &limits, max_prompt: longest, eos, prefill_budget, reuse_prefixes, load: None };
    let (joined, prefill_s) = serve(program, &serving, &mut next, &mut finished)?;
    let generations = done.into_iter().collect::<Option<Vec<_>>>().ok_or("a request was never served")?;
    let total_s = start.elapsed().as_secs_f64();
    Ok(Served { generations, slots, joined, prefill_s, total_s })
}

/// A request to [`serve`]: a prompt, how many tokens to generate at most, how to pick them.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub sampler: v3c_models::reference::Sampler,
    /// When it arrived, if before [`serve`] reads it (a line read while earlier requests wait):
    /// its `queued_s` counts from then.
    pub arrived: Option<std::time::Instant>,
    /// It ends once its tokens end with one of these (kept in its tokens, as the end token is).
    pub stop: Vec<Vec<u32>>,
    /// Report each token's log-probability under the model ([`Generation::logprobs`]).
    pub logprobs: bool,
    /// With `logprobs`, also this many of the most probable tokens at each step, with theirs
    /// ([`Generation::top_logprobs`]).
    pub top_logprobs: usize,
    /// It ends once the text of its tokens holds one of these strings ([`TextStops::cut`] takes
    /// it off the text; the tokens keep it).
    pub stop_text: Option<TextStops>,
    /// Its prompt is given back with its tokens (a reply's business); with `logprobs`, scored
    /// too ([`Generation::prompt_logprobs`]; then prefilled whole).
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
    fn reached(&self, tokens: &[u32]) -> bool {
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
    fn ends(&self, tokens: &[u32], eos: Option<u32>) -> Option<Ending> {
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
/// temperature, no nucleus), summed in f64.
pub fn log_probability(logits: &[f32], token: u32) -> f32 {
    let (max, log_sum) = log_sum_exp(logits);
    logits.get(token as usize).map_or(f32::NAN, |&l| (f64::from(l - max) - log_sum) as f32)
}

/// The largest logit and ln(sum(exp(logit - largest))), in f64.
fn log_sum_exp(logits: &[f32]) -> (f32, f64) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    (max, logits.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln())
}

/// The `k` most probable tokens under softmax(`logits`) (ties: the lower id first), most probable
/// first, with their log-probabilities as [`log_probability`] gives them (a partial sort).
pub fn top_log_probabilities(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let (max, log_sum) = log_sum_exp(logits);
    let mut order: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by);
    }
    order.truncate(k);
    order.sort_unstable_by(by);
    order.into_iter().map(|(t, l)| (t, (f64::from(l - max) - log_sum) as f32)).collect()
}

/// What [`serve`] asks for next: a request, a request to cancel (its number, in arrival order),
/// none yet (while others run or wait), or none ever again.
pub enum Arrival {
    Request(Request),
    Cancel(usize),
    NotYet,
    Closed,
}

/// What [`serve`] tells of a request: a token it picked (where it asks for log-probabilities,
/// just before: the token's and its alternatives', [`Progress::Scored`]), its end, its end when
/// cancelled (the tokens so far), or why it was refused (or cannot be cancelled).
pub enum Progress {
    Scored(f32, Vec<(u32, f32)>),
    Token(u32),
    Ended(Generation),
    Cancelled(Generation),
    Refused(String),
}

/// A request [`serve`] is generating, in its slot.
struct Running {
    id: usize,
    request: Request,
    tokens: Vec<u32>,
    /// Its prefill's logits until its first token is picked.
    prefilled: Option<Vec<f32>>,
    /// Its prompt is still being prefilled ([`ArtifactBatch::continue_join`]).
    joining: bool,
    /// Seconds since the start when it joined, its wait before, and its prefill's.
    joined_s: f64,
    queued_s: f64,
    prefill_s: f64,
    /// Its prompt's rows in another's pages, not prefilled.
    reused: usize,
    /// Its tokens' log-probabilities, and the most probable tokens' at each step (where it asks).
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    /// Its prompt's scores (where it asks: [`Request::echo`]).
    prompt_scores: Vec<(f32, Vec<(u32, f32)>)>,
}

impl Running {
    /// Its generation, ended (`ending`; None: cancelled) `total_s` after it joined, holding `pages`.
    fn generation(self, pages: Option<(usize, usize)>, ending: Option<Ending>, total_s: f64) -> Generation {
        Generation {
            tokens: self.tokens,
            stopped_at_eos: ending == Some(Ending::Eos),
            prefill_s: self.prefill_s,
            total_s,
            pages,
            queued_s: self.queued_s,
            reused: self.reused,
            logprobs: self.logprobs,
            top_logprobs: self.top,
            ending,
            prompt_logprobs: self.prompt_scores.iter().map(|s| s.0).collect(),
            prompt_top_logprobs: match self.request.top_logprobs {
                0 => Vec::new(),
                _ => self.prompt_scores.into_iter().map(|s| s.1).collect(),
            },
        }
    }
}

/// How [`serve`] runs its batch.
#[derive(Clone, Copy)]
pub struct Serving<'l> {
    /// At most this many sequences decode together.
    pub slots: usize,
    /// The batch is opened for sequences of these lengths and prompts of at most `max_prompt`
    /// tokens ([`ArtifactBatch::open`]).
    pub limits: &'l [usize],
    pub max_prompt: usize,
    pub eos: Option<u32>,
    /// Prompt tokens joining requests prefill between two decode steps while sequences decode, in
    /// the prefill plan's chunks, at least one (None: one chunk): more shortens a joining request's
    /// wait for its first token, fewer the running ones' time per token.
    pub prefill_budget: Option<usize>,
    /// Joining prompts hold the whole pages of cache rows their first tokens share with a running
    /// or ended request's tokens instead of prefilling them ([`ArtifactBatch::reuse_prefixes`]; a
    /// pool of pages only).
    pub reuse_prefixes: bool,
    /// Told the batch's load after each step's joins.
    pub load: Option<&'l dyn Fn(Load)>,
}

/// How loaded a serving batch is.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Requests in the batch (joining or decoding), and waiting to join.
    pub running: usize,
    pub waiting: usize,
    /// Of the cache pages sequences may take, the share held (pages only kept prefixes hold
    /// count as free: they are given back when needed); without a pool, the share of slots taken.
    pub cache_usage: f64,
}

/// Serves requests as they arrive with at most `o.slots` sequences decoding together: `next(idle)`
/// gives the next request (`idle`: nothing runs, so it may wait for one), numbered in arrival
/// order; each joins the running batch in a vacant slot ([`ArtifactBatch::join`]), in order, once
/// the pool has pages for all its tokens beside those the running sequences may still fill and the
/// step's prefill budget allows, and is prefilled chunk by chunk between decode steps (while none
/// decodes, without a budget); each ends at `eos` or its `max_new` tokens. `report(id, ...)` gets
/// each token as it is picked, then the generation (its times from when it joined) — or why the
/// batch cannot hold the request. Returns how many requests joined after the first decode step,
/// and the seconds in prefills.
pub fn serve(
    program: &dyn Program,
    o: &Serving,
    next: &mut dyn FnMut(bool) -> Arrival,
    report: &mut dyn FnMut(usize, Progress) -> Result<(), String>,
) -> Result<(usize, f64), String> {
    let (slots, limits, max_prompt, eos) = (o.slots, o.limits, o.max_prompt, o.eos);
    let start = std::time::Instant::now();
    let chunk = program.entry_plan("prefill")?.sizes.rows.max(1);
    let budget = o.prefill_budget.unwrap_or(chunk);
    let mut batch = ArtifactBatch::open(program, slots, limits, max_prompt)?;
    batch.reuse_prefixes(o.reuse_prefixes);
    let (room, rows) = (batch.room(), batch.layout.rows);
    let vocab = vocabulary(program);
    let mut running: Vec<Option<Running>> = (0..slots).map(|_| None).collect();
    let mut fed = vec![0u32; slots];
    // The requests waiting to join: their numbers and when they arrived.
    let mut waiting: std::collections::VecDeque<(usize, Request, f64)> = Default::default();
    let (mut arrived, mut closed) = (0, false);
    let (mut prefill_s, mut joined, mut started) = (0.0, 0, false);
    let mut logits = Next::Tokens(Vec::new());
    loop {
        // Every request and cancellation there is (waiting for one while nothing runs or waits).
        while !closed {
            let now = start.elapsed().as_secs_f64();
            match next(waiting.is_empty() && running.iter().all(Option::is_none)) {
                Arrival::Request(r) => {
                    // Token ids the model has no row for are one request's mistake, refused now:
                    // a step would fail for the whole batch.
                    if let Some(e) = vocab.and_then(|v| r.outside(v)) {
                        report(arrived, Progress::Refused(e))?;
                        arrived += 1;
                        continue;
                    }
                    let arrived_s = r.arrived.map_or(now, |t| now - t.elapsed().as_secs_f64());
                    waiting.push_back((arrived, r, arrived_s));
                    arrived += 1;
                }
                Arrival::Cancel(id) => {
                    let g = if let Some(w) = waiting.iter().position(|w| w.0 == id) {
                        let queued_s = waiting.remove(w).map_or(0.0, |(_, _, arrived_s)| now - arrived_s);
                        Generation { queued_s, ending: None, ..Generation::alone(Vec::new(), false, 0.0, 0.0) }
                    } else if let Some(s) = running.iter().position(|r| r.as_ref().is_some_and(|r| r.id == id)) {
                        let Some(r) = running[s].take() else { continue };
                        let pages = match r.joining {
                            true => batch.cancel_join().map(|()| None)?,
                            false => {
                                let pages = batch.pages(s);
                                batch.finish(s);
                                pages
                            }
                        };
                        let total_s = now - r.joined_s;
                        r.generation(pages, None, total_s)
                    } else {
                        report(id, Progress::Refused("cancel: it is no longer waiting or running".into()))?;
                        continue;
                    };
                    report(id, Progress::Cancelled(g))?;
                }
                Arrival::NotYet => break,
                Arrival::Closed => closed = true,
            }
        }
        // Waiting requests join vacant slots, in order, while the pool has their pages, prefilled
        // chunk by chunk within the step's budget while sequences decode (those whose first token
        // is still to be picked do not yet).
        let decoding = running.iter().flatten().any(|r| !r.joining && r.prefilled.is_none());
        let mut spent = 0;
        let spend = |spent: usize| !decoding || spent == 0 || spent + chunk <= budget;
        loop {
            if let Some(s) = running.iter().position(|r| r.as_ref().is_some_and(|r| r.joining)) {
                if !spend(spent) {
                    break;
                }
                let (at, before) = (start.elapsed().as_secs_f64(), batch.joined_tokens());
                let finished = batch.continue_join()?;
                let took = start.elapsed().as_secs_f64() - at;
                prefill_s += took;
                let Some(r) = running[s].as_mut() else { break };
                r.prefill_s += took;
                spent += match finished {
                    Some(_) => r.request.prompt.len(),
                    None => batch.joined_tokens(),
                } - before;
                match finished {
                    Some((_, logits)) => {
                        (r.prefilled, r.joining) = (Some(logits), false);
                        r.prompt_scores = batch.take_prompt_scores();
                    }
                    None => continue,
                }
            }
            let Some((id, mut r, arrived_s)) = waiting.pop_front() else { break };
            let limit = r.prompt.len() + r.max_new;
            let too_long = r.prompt.len() > max_prompt || limit > rows;
            if r.prompt.is_empty() || too_long || room.is_some_and(|room| pages_of(limit) > room) {
                let pool = room.map_or(String::new(), |p| format!(" in {p} pages of 64"));
                let err = format!(
                    "{} + {} tokens: the batch holds prompts of 1..={max_prompt} tokens, sequences of {rows} tokens{pool}",
                    r.prompt.len(),
                    r.max_new
                );
                report(id, Progress::Refused(err))?;
                continue;
            }
            let vacant = running.iter().position(Option::is_none).filter(|_| spend(spent));
            // Each running request's slot and most tokens: the pages they may still take.
            let limits: Vec<(usize, usize)> = running
                .iter()
                .enumerate()
                .filter_map(|(s, r)| r.as_ref().map(|r| (s, r.request.prompt.len() + r.request.max_new)))
                .collect();
            let score = (r.echo && r.logprobs).then_some(r.top_logprobs);
            let fits = vacant.is_some_and(|s| batch.fits(s, &r.prompt, limit, &limits, score.is_none()));
            let (Some(s), true) = (vacant, fits) else {
                waiting.push_front((id, r, arrived_s));
                break;
            };
            let joined_s = start.elapsed().as_secs_f64();
            batch.start_join_scoring(s, &r.prompt, limit, score)?;
            r.sampler.start(&r.prompt);
            joined += usize::from(started);
            let queued_s = joined_s - arrived_s;
            let (tokens, prefilled, joining, reused) = (Vec::new(), None, true, batch.reused_tokens());
            let (prefill_s, logprobs, top, prompt_scores) = (0.0, Vec::new(), Vec::new(), Vec::new());
            running[s] = Some(Running {
                id,
                request: r,
                tokens,
                prefilled,
                joining,
                joined_s,
                queued_s,
                prefill_s,
                reused,
                logprobs,
                top,
                prompt_scores,
            });
        }
        if let Some(load) = o.load {
            let running = running.iter().flatten().count();
            let cache_usage = batch.pool_usage().unwrap_or(running as f64 / slots.max(1) as f64);
            load(Load { running, waiting: waiting.len(), cache_usage });
        }
        // Each sequence's next token (those decoded: picked together); those that end leave their
        // slot.
        let mut picked = vec![None; slots];
        {
            let decoded = running.iter_mut().enumerate().filter_map(|(s, r)| {
                let r = r.as_mut().filter(|r| !r.joining && r.prefilled.is_none())?;
                (r.tokens.len() < r.request.max_new).then_some((s, &mut r.request.sampler))
            });
            let mut wanted: Vec<_> = decoded.collect();
            let tokens = logits.pick_each(&mut wanted);
            for ((s, _), t) in wanted.iter().zip(tokens) {
                picked[*s] = Some(t);
            }
        }
        let mut active = vec![false; slots];
        for (s, slot) in running.iter_mut().enumerate() {
            let Some(r) = slot.as_mut().filter(|r| !r.joining) else { continue };
            if r.tokens.len() < r.request.max_new {
                let prefilled = r.prefilled.take();
                let t = match (&prefilled, picked[s]) {
                    (Some(l), _) => r.request.sampler.sample(l),
                    (None, Some(t)) => t,
                    (None, None) => return Err(format!("slot {s}: no token picked")),
                };
                if r.request.logprobs {
                    let row = match (&prefilled, &logits) {
                        (Some(l), _) => Some(l.as_slice()),
                        (None, Next::Logits(rows)) => rows.get(s).map(Vec::as_slice),
                        // Picked on the device: no step runs so while it asks for them.
                        (None, Next::Tokens(_)) => None,
                    };
                    r.logprobs.push(row.map_or(f32::NAN, |l| log_probability(l, t)));
                    if r.request.top_logprobs > 0 {
                        r.top.push(row.map_or(Vec::new(), |l| top_log_probabilities(l, r.request.top_logprobs)));
                    }
                    let lp = r.logprobs.last().copied().unwrap_or(f32::NAN);
                    report(r.id, Progress::Scored(lp, r.top.last().cloned().unwrap_or_default()))?;
                }
                r.tokens.push(t);
                report(r.id, Progress::Token(t))?;
                fed[s] = t;
            }
            let Some(ending) = r.request.ends(&r.tokens, eos.filter(|_| !r.request.ignore_eos)) else {
                active[s] = true;
                continue;
            };
            let pages = batch.pages(s);
            batch.finish(s);
            let Some(r) = slot.take() else { continue };
            let (id, total_s) = (r.id, start.elapsed().as_secs_f64() - r.joined_s);
            report(id, Progress::Ended(r.generation(pages, Some(ending), total_s)))?;
        }
        if active.iter().any(|&a| a) {
            // The device picks greedy tokens itself unless a request asks for log-probabilities.
            let greedy = running.iter().flatten().all(|r| r.request.sampler.plain_greedy() && !r.request.logprobs);
            logits = batch.decode(&fed, &active, greedy)?;
            started = true;
        } else if closed && waiting.is_empty() && running.iter().all(Option::is_none) {
            return Ok((joined, prefill_s));
        }
    }
}

/// What generates a sequence: a prompt's logits, then one token's at a time.
pub trait Generator {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String>;
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String>;
    /// As `decode`; with `greedy`, a session whose program picks tokens itself may give the token.
    fn decode_next(&mut self, token: u32, greedy: bool) -> Result<Next, String> {
        let _ = greedy;
        Ok(Next::Logits(vec![self.decode(token)?]))
    }
}

impl Generator for ArtifactSession<'_> {
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        ArtifactSession::prefill(self, tokens)
    }
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, String> {
        ArtifactSession::decode(self, token)
    }
    fn decode_next(&mut self, token: u32, greedy: bool) -> Result<Next, String> {
        ArtifactSession::decode_next(self, token, greedy)
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
    let mut next = Next::Logits(vec![session.prefill(prompt)?]);
    let prefill_s = start.elapsed().as_secs_f64();
    let greedy = sampler.plain_greedy();
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
            next = session.decode_next(token, greedy)?;
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
        let serving =
            Serving { slots, limits: &limits, max_prompt: longest, eos, prefill_budget, reuse_prefixes, load: None };
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
            let serving = Serving {
                slots: 1,
                limits: &[4],
                max_prompt: 2,
                eos: None,
                prefill_budget: None,
                reuse_prefixes: true,
                load: None,
            };
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
        let serving = Serving {
            slots,
            limits: &limits,
            max_prompt: longest,
            eos: None,
            prefill_budget: None,
            reuse_prefixes: true,
            load: None,
        };
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
            let serving = Serving {
                slots: 2,
                limits: &[15, 15],
                max_prompt: 3,
                eos: None,
                prefill_budget: None,
                reuse_prefixes: true,
                load: None,
            };
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
        let serving = Serving {
            slots: 1,
            limits: &[15],
            max_prompt: 3,
            eos: None,
            prefill_budget: None,
            reuse_prefixes: true,
            load: None,
        };
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
        let serving = Serving {
            slots: 3,
            limits: &[80, 80, 80],
            max_prompt: 5,
            eos: None,
            prefill_budget: None,
            reuse_prefixes: false,
            load: Some(&record),
        };
        serve(&toy, &serving, &mut next, &mut report).unwrap();
        let loads = loads.into_inner();
        let load = |running, waiting, pages: f64| Load { running, waiting, cache_usage: pages / 6.0 };
        assert_eq!(loads[0], load(3, 1, 3.0));
        assert!(loads.contains(&load(3, 1, 6.0)), "{loads:?}");
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
    /// its start, and its tokens are those it gets alone. `max_new` 0: scored, no token.
    #[test]
    fn echoed_prompts_are_scored_by_their_prefills_logits() {
        let prompt: Vec<u32> = (0..70).map(|i| (i * 5 % 11) as u32).collect();
        let single = toy_plain();
        let mut session = ArtifactSession::new(&single, 80).unwrap();
        let (rows, vocab) = session.prefill_rows(&prompt).unwrap();
        let want: Vec<f32> =
            (1..prompt.len()).map(|k| log_probability(&rows[(k - 1) * vocab..k * vocab], prompt[k])).collect();
        let alone = toy_alone(&[(prompt.clone(), 5, 0, None)], None).remove(0);
        for on_device in [false, true] {
            let mut t = Toy::paged();
            t.keeps = on_device;
            let t = if on_device { one_element(t) } else { t };
            let plain = Request::new(prompt.clone(), 5, toy_sampler(None));
            let echoed = Request { echo: true, logprobs: true, top_logprobs: 2, ..plain.clone() };
            let scored_only =
                Request { echo: true, logprobs: true, ..Request::new(prompt.clone(), 0, toy_sampler(None)) };
            let mut requests = vec![plain, echoed, scored_only].into_iter();
            let mut next = |idle: bool| match idle {
                true => requests.next().map_or(Arrival::Closed, Arrival::Request),
                false => Arrival::NotYet,
            };
            let mut ended: Vec<Option<Generation>> = vec![None; 3];
            let mut report = |id: usize, p: Progress| {
                if let Progress::Ended(g) = p {
                    ended[id] = Some(g);
                }
                Ok(())
            };
            let serving = Serving {
                slots: 1,
                limits: &[80],
                max_prompt: 70,
                eos: None,
                prefill_budget: None,
                reuse_prefixes: true,
                load: None,
            };
            serve(&t, &serving, &mut next, &mut report).unwrap();
            let [Some(plain), Some(echoed), Some(scored)] = ended.as_slice() else { panic!("all end") };
            assert!(plain.prompt_logprobs.is_empty());
            assert_eq!((echoed.reused, &echoed.tokens), (0, &alone), "device {on_device}: prefilled whole");
            assert_eq!(echoed.prompt_logprobs, want, "device {on_device}");
            assert_eq!(echoed.prompt_top_logprobs.len(), want.len());
            for (alts, k) in echoed.prompt_top_logprobs.iter().zip(1..) {
                assert_eq!(alts, &top_log_probabilities(&rows[(k - 1) * vocab..k * vocab], 2));
            }
            assert_eq!((scored.tokens.len(), &scored.prompt_logprobs), (0, &want), "device {on_device}");
            assert!(scored.prompt_top_logprobs.is_empty());
        }
    }

    /// The most probable tokens from a partial sort are a full sort's first ones (ties to the lower
    /// id), with [`log_probability`]'s values.
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
    }

    /// Picking the batch's tokens together (spread over the cores) gives each sequence the token
    /// its own sampler picks alone, greedy or not, from logits or from the device's tokens.
    #[test]
    fn tokens_picked_together_are_those_picked_one_by_one() {
        use v3c_models::reference::Sampler;
        let rows: Vec<Vec<f32>> =
            (0..9).map(|r| (0..5000).map(|j| ((r * 7919 + j * 104_729) % 1000) as f32 / 150.0).collect()).collect();
        let logits = Next::Logits(rows);
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
                let serving = Serving {
                    slots: 3,
                    limits: &[76; 3],
                    max_prompt: 66,
                    eos: None,
                    prefill_budget: None,
                    reuse_prefixes: reuse,
                    load: None,
                };
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
