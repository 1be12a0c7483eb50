//! What a session runs its entries on ([`Program`]: a `cpu` artifact or a GPU one) and the
//! steps every session takes through it: one run of an entry, its logits or tokens ([`Next`]), the
//! caches kept between runs.

use super::*;
pub use v3c_models::sampling::Draw;

/// Which logits a run of a prompt's chunk reads back: a prompt's last chunk needs its last row to
/// sample the next token, the chunks before it none; scoring a prompt (perplexity, `v3r logits`,
/// echoed log-probabilities) needs every row — or, scored where the program runs
/// ([`Program::scores_last`]), none read back though every row is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkLogits {
    All,
    Last,
    None,
    /// Every row computed and left where the program keeps them.
    Kept,
}

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
    /// As [`Program::run`], the outputs that are inputs updated in place (decode's caches) left in
    /// `inputs` rather than returned: a program on the host runs on the caller's buffers instead of
    /// copies in and out of them. On an error `inputs` still holds every input (those the run
    /// updates in no known state).
    fn run_in_place(
        &self,
        entry: &str,
        inputs: &mut HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        let mut out = self.run(entry, inputs, wanted)?;
        for name in wanted {
            if inputs.contains_key(*name) {
                if let Some(b) = out.remove(*name) {
                    inputs.insert(name.to_string(), b);
                }
            }
        }
        Ok(out)
    }
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
    /// Whether [`Program::sample_last`] draws sampled tokens where the program runs (GPU artifacts
    /// with sampling and argmax kernels: the logits are then not read back).
    fn device_sample(&self) -> bool {
        false
    }
    /// The token of each `logits` row r of the last run of `entry`, drawn where the program keeps
    /// them as [`v3c_models::sampling::draw_plain`] draws it with `draws[r]` (bit for bit), or the
    /// argmax where its temperature is not above 0.
    fn sample_last(&self, entry: &str, draws: &[Draw]) -> Result<Vec<u32>, String> {
        let _ = draws;
        Err(format!("{entry}: this program draws no tokens itself"))
    }
    /// Row `r` of the `logits` of the last run of `entry`, read back from where the program keeps
    /// them (after a run that left them there: [`ChunkLogits::Kept`]).
    fn logits_row_last(&self, entry: &str, r: usize) -> Result<Vec<f32>, String> {
        let _ = r;
        Err(format!("{entry}: this program keeps no logits"))
    }
    /// Whether [`Program::scores_last`] scores tokens where the program runs (GPU artifacts with a
    /// scoring kernel: the logits are then not read back).
    fn device_scores(&self) -> bool {
        false
    }
    /// Each `logits` row r of the last run of `entry` scored for `tokens[r]` where the program
    /// keeps them: [`RowScore::of`] (bit for bit; a negative token: a NaN logit), and the row's
    /// `alternatives` most probable tokens with their logits (the host's `top_k`; at most
    /// [`crate::lowering::SCORES_TOP`]).
    fn scores_last(&self, entry: &str, tokens: &[i32], alternatives: usize) -> Result<Vec<Scores>, String> {
        let _ = (tokens, alternatives);
        Err(format!("{entry}: this program scores no tokens itself"))
    }
    /// Milliseconds of each of `reps` runs of `entry` on `inputs` after one warm-up, outputs left
    /// where they are (the GPU times its launches with CUDA events, inputs uploaded once); the
    /// launches those of a run wanting `wanted` (outputs named with [`crate::plan::NO_ROWS`],
    /// [`crate::plan::ONLY_WANTED`]: what a generation's step runs).
    fn time_entry(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        reps: usize,
    ) -> Result<Vec<f64>, String> {
        time_runs(reps, || self.run(entry, inputs, wanted).map(drop))
    }
}

/// Milliseconds of each of `reps` calls of `run` after one warm-up call.
pub(super) fn time_runs(reps: usize, mut run: impl FnMut() -> Result<(), String>) -> Result<Vec<f64>, String> {
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
    fn run_in_place(
        &self,
        entry: &str,
        inputs: &mut HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cpu::CpuArtifact::run_in_place(self, entry, inputs, wanted)
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
    fn time_entry(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        reps: usize,
    ) -> Result<Vec<f64>, String> {
        crate::cpu::CpuArtifact::run_keeping(self, entry, inputs, wanted, &[])?;
        let kept = self.kept_inputs();
        let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
        time_runs(reps, || crate::cpu::CpuArtifact::run_keeping(self, entry, inputs, wanted, &kept).map(drop))
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
    fn time_entry(
        &self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
        reps: usize,
    ) -> Result<Vec<f64>, String> {
        crate::cuda::GpuArtifact::time_entry(self, entry, inputs, wanted, reps)
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
        !self.picks_on_host() && self.artifact.lowering.as_ref().is_some_and(|l| l.argmax.is_some())
    }
    fn cache_rows_multiple(&self) -> usize {
        self.artifact.lowering.as_ref().and_then(|l| l.cache_rows_multiple).unwrap_or(1)
    }
    fn argmax_last(&self, entry: &str) -> Result<Vec<u32>, String> {
        crate::cuda::GpuArtifact::argmax_last(self, entry)?.ok_or_else(|| format!("{entry}: no argmax kernel"))
    }
    fn device_sample(&self) -> bool {
        !self.picks_on_host()
            && self.artifact.lowering.as_ref().is_some_and(|l| l.argmax.is_some() && l.sample.is_some())
    }
    fn sample_last(&self, entry: &str, draws: &[Draw]) -> Result<Vec<u32>, String> {
        crate::cuda::GpuArtifact::sample_last(self, entry, draws)?
            .ok_or_else(|| format!("{entry}: no sampling or argmax kernel"))
    }
    fn device_scores(&self) -> bool {
        !self.picks_on_host() && self.artifact.lowering.as_ref().is_some_and(|l| l.scores.is_some())
    }
    fn logits_row_last(&self, entry: &str, r: usize) -> Result<Vec<f32>, String> {
        crate::cuda::GpuArtifact::logits_row_last(self, entry, r)
    }
    fn scores_last(&self, entry: &str, tokens: &[i32], alternatives: usize) -> Result<Vec<Scores>, String> {
        crate::cuda::GpuArtifact::scores_last(self, entry, tokens, alternatives)?
            .ok_or_else(|| format!("{entry}: no scoring kernel"))
    }
}

/// One decode step: the caches uploaded and read back — or, on a program that keeps inputs, left
/// on the device after the first step (`resident` says whether they are there): only the logits
/// come back (the session's host copies of the caches go stale).
pub(super) fn step(
    program: &dyn Program,
    inputs: &mut HashMap<String, HostBuffer>,
    caches: &[&str],
    resident: &mut bool,
    pick: &Pick,
) -> Result<(HashMap<String, HostBuffer>, Next), String> {
    step_keeping(program, inputs, caches, resident, pick, true)
}

/// As [`step`]; without `keep`, the caches come back every step (the session needs them on the
/// host: a batch that lays joining sequences' rows there) — updated in `inputs`
/// ([`Program::run_in_place`]; a host program's steps then copy no cache), in f32.
pub(super) fn step_keeping(
    program: &dyn Program,
    inputs: &mut HashMap<String, HostBuffer>,
    caches: &[&str],
    resident: &mut bool,
    pick: &Pick,
    keep: bool,
) -> Result<(HashMap<String, HostBuffer>, Next), String> {
    // Only the launches the logits and caches need: not the MTP module's past its cache row (its
    // logits are a speculative session's, which runs its own entries).
    if !program.keeps_inputs() || !keep {
        let wanted: Vec<&str> = caches.iter().copied().chain(["logits", crate::plan::ONLY_WANTED]).collect();
        let mut out = f32_caches(program.run_in_place("decode", inputs, &wanted)?);
        for c in caches {
            if let Some(b) = inputs.remove(*c) {
                inputs.insert(c.to_string(), b.into_f32());
            }
        }
        let next = Next::logits_of(&mut out)?.drawn(pick);
        return Ok((out, next));
    }
    let kept: &[&str] = if *resident { caches } else { &[] };
    // A failed step leaves the device caches in no known state: the next one uploads them.
    *resident = false;
    // Greedy, or drawn, on a program that picks tokens itself: the logits stay where they are.
    let on_device = match pick {
        Pick::Host => false,
        Pick::Greedy => program.device_argmax(),
        Pick::Draws(_) => program.device_sample(),
    };
    let logits = if on_device { format!("logits{}", crate::plan::NO_ROWS) } else { "logits".to_string() };
    let wanted = [logits.as_str(), crate::plan::ONLY_WANTED];
    let mut out = program.run_keeping("decode", &*inputs, &wanted, kept)?;
    *resident = true;
    let next = match (on_device, pick) {
        (true, Pick::Draws(draws)) => Next::Tokens(program.sample_last("decode", draws)?),
        (true, _) => Next::Tokens(program.argmax_last("decode")?),
        (false, _) => Next::logits_of(&mut out)?.drawn(pick),
    };
    Ok((out, next))
}

/// A row of logits scored where the program keeps it ([`Program::scores_last`]): what its token's
/// log-probability needs, and its most probable tokens with their logits, most probable first.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub row: RowScore,
    pub top: Vec<(u32, f32)>,
}

impl Scores {
    /// The token's log-probability and its first `k` alternatives' `(token, log-probability)`:
    /// what the host's [`scores`] gives from the row.
    pub fn log_probabilities(&self, k: usize) -> (f32, Vec<(u32, f32)>) {
        let of = |l: f32| RowScore { logit: l, ..self.row }.log_probability();
        (self.row.log_probability(), self.top.iter().take(k).map(|&(t, l)| (t, of(l))).collect())
    }
}

/// How a decode step's next tokens are picked.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// On the host, by each sequence's sampler from its logits (read back).
    Host,
    /// Every sequence plain greedy: the argmax, on the device where the program picks tokens.
    Greedy,
    /// Per row of the step, a temperature, top-p, top-k and a uniform draw in [0, 1), taken from
    /// the row's sampler (a temperature of 0: greedy, or a row whose token nobody takes): the
    /// token [`v3c_models::sampling::draw_plain`] draws, on the device where the program draws
    /// ([`Program::device_sample`]), else on the host from the logits — the same token.
    Draws(Vec<Draw>),
}

impl Pick {
    /// The pick of a step whose sequences' tokens are taken by `wanted` (per sequence: None where
    /// nobody takes its token; else its sampler, and whether the host wants its logits anyway,
    /// e.g. for log-probabilities), on a program that draws tokens itself where `draws`: greedy
    /// where every sampler is plain greedy; draws where each is that or samples at a temperature,
    /// top-k, top-p and min-p with nothing else changing its choice
    /// ([`v3c_models::sampling::Sampler::device_draw`]: their uniform draws are taken now); else
    /// the host's.
    pub fn of<'a>(
        draws: bool,
        wanted: impl IntoIterator<Item = Option<(&'a mut v3c_models::reference::Sampler, bool)>>,
    ) -> Pick {
        let mut wanted: Vec<_> = wanted.into_iter().collect();
        if wanted.iter().flatten().any(|(_, logits)| *logits) {
            return Pick::Host;
        }
        if wanted.iter().flatten().all(|(s, _)| s.plain_greedy()) {
            return Pick::Greedy;
        }
        let drawable = |s: &v3c_models::reference::Sampler| s.plain_greedy() || s.device_drawable();
        if !draws || !wanted.iter().flatten().all(|(s, _)| drawable(s)) {
            return Pick::Host;
        }
        Pick::Draws(
            wanted
                .iter_mut()
                .map(|w| match w {
                    Some((s, _)) => s.device_draw().unwrap_or_default(),
                    None => Draw::default(),
                })
                .collect(),
        )
    }

    /// This pick for a step that runs sequences `rows` (row r: sequence `rows[r]`).
    pub fn rows(&self, rows: &[usize]) -> Pick {
        match self {
            Pick::Draws(d) => Pick::Draws(rows.iter().map(|&i| d.get(i).copied().unwrap_or_default()).collect()),
            p => p.clone(),
        }
    }
}

/// What a decode step gives per sequence: its logits, or (greedy, picked on the device) its token.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Logits(LogitRows),
    Tokens(Vec<u32>),
}

/// Rows of logits, one sequence's each, in the one buffer they were read back in: a decode step
/// of 64 sequences over DeepSeek-V3's vocabulary is 33 MB, not copied row by row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogitRows {
    data: Vec<f32>,
    width: usize,
    /// Per sequence, the row of `data` holding its logits (None: the step did not run it), where
    /// a step ran some of a batch's sequences ([`LogitRows::spread`]); else row i is sequence i's.
    rows_of: Option<Vec<Option<usize>>>,
}

impl LogitRows {
    /// The rows of `width` values each that `data` holds one after another.
    pub fn new(data: Vec<f32>, width: usize) -> LogitRows {
        LogitRows { data, width, rows_of: None }
    }

    /// `rows` (of one width) in one buffer; a single row is moved, not copied.
    pub fn of(mut rows: Vec<Vec<f32>>) -> LogitRows {
        let width = rows.first().map_or(0, Vec::len);
        if rows.len() == 1 {
            return LogitRows::new(rows.pop().unwrap_or_default(), width);
        }
        LogitRows::new(rows.concat(), width)
    }

    /// The rows of a step that ran sequences `ran` (row r: sequence `ran[r]`) as the rows of
    /// `sequences` sequences, those not run without logits (not copied).
    pub fn spread(self, ran: &[usize], sequences: usize) -> LogitRows {
        let mut rows_of = vec![None; sequences];
        for (r, &s) in ran.iter().enumerate().filter(|&(r, _)| r < self.stored()) {
            if let Some(at) = rows_of.get_mut(s) {
                *at = Some(r);
            }
        }
        LogitRows { rows_of: Some(rows_of), ..self }
    }

    /// Rows held in the buffer.
    fn stored(&self) -> usize {
        self.data.len().checked_div(self.width).unwrap_or(0)
    }

    /// Sequences: those of the step (with or without logits, [`LogitRows::spread`]).
    pub fn len(&self) -> usize {
        self.rows_of.as_ref().map_or_else(|| self.stored(), Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence `i`'s row, if it has one.
    pub fn get(&self, i: usize) -> Option<&[f32]> {
        let r = match &self.rows_of {
            None => i,
            Some(rows_of) => (*rows_of.get(i)?)?,
        };
        (r < self.stored()).then(|| &self.data[r * self.width..(r + 1) * self.width])
    }

    /// The last sequence's row (moved when it is the only one stored).
    pub fn into_last(mut self) -> Option<Vec<f32>> {
        let last = self.len().checked_sub(1)?;
        if self.stored() == 1 && self.get(last).is_some() {
            return Some(std::mem::take(&mut self.data));
        }
        self.get(last).map(<[f32]>::to_vec)
    }
}

impl std::ops::Index<usize> for LogitRows {
    type Output = [f32];
    fn index(&self, i: usize) -> &[f32] {
        self.get(i).unwrap_or_else(|| panic!("row {i} of {} rows of logits", self.len()))
    }
}

impl Next {
    /// A step's picks that ran sequences `ran` (row r: sequence `ran[r]`) as those of `sequences`
    /// sequences, indexed by sequence (those not run: token 0, no logits).
    pub fn spread(self, ran: &[usize], sequences: usize) -> Next {
        match self {
            Next::Logits(rows) => Next::Logits(rows.spread(ran, sequences)),
            Next::Tokens(t) => {
                let mut all = vec![0; sequences];
                for (&s, t) in ran.iter().zip(t) {
                    if let Some(at) = all.get_mut(s) {
                        *at = t;
                    }
                }
                Next::Tokens(all)
            }
        }
    }

    /// Logits as [`Pick::Draws`] picks from them on the host (each row's draw, or its argmax
    /// where its temperature is not above 0): the tokens a program drawing them itself gives.
    /// Other picks leave the logits to the samplers.
    pub(super) fn drawn(self, pick: &Pick) -> Next {
        let (Next::Logits(rows), Pick::Draws(draws)) = (&self, pick) else { return self };
        let token = |r: usize, d: &Draw| match rows.get(r) {
            Some(row) if d.temperature > 0.0 => v3c_models::sampling::draw_plain(row, d),
            Some(row) => v3c_models::sampling::argmax(row).map_or(0, |i| i as u32),
            None => 0,
        };
        Next::Tokens(draws.iter().enumerate().map(|(r, d)| token(r, d)).collect())
    }

    /// The logits taken out of a run's outputs (moved, not copied).
    fn logits_of(out: &mut HashMap<String, HostBuffer>) -> Result<Next, String> {
        let logits = out.remove("logits").ok_or("the entry has no logits")?;
        let vocab = logits.shape.last().copied().unwrap_or(0);
        let HostData::F32(v) = logits.data else { return Err("logits are not f32".into()) };
        Ok(Next::Logits(LogitRows::new(v, vocab)))
    }

    /// Sequence `i`'s next token: picked on the device (counted by `sampler` as its pick), or by
    /// `sampler` from its logits.
    pub fn pick(&self, i: usize, sampler: &mut v3c_models::reference::Sampler) -> u32 {
        match self {
            Next::Tokens(t) => {
                sampler.note(t[i]);
                t[i]
            }
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
pub(super) fn kept_shape(cache: HostBuffer, resident: bool) -> HostBuffer {
    match (resident, cache.data) {
        (true, HostData::F32(_)) => HostBuffer { shape: cache.shape, data: HostData::F32(Vec::new()) },
        (_, data) => HostBuffer { shape: cache.shape, data },
    }
}

/// Puts the caches of a step's inputs back into the state after a failed step (the state is
/// moved into the inputs for the step).
pub(super) fn restore(
    state: &mut HashMap<String, HostBuffer>,
    inputs: &mut HashMap<String, HostBuffer>,
    caches: &[String],
) {
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
