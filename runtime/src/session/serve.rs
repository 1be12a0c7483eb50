//! The serving loop ([`serve`]): requests taken as they arrive, each joining the running batch when
//! a slot and pages are free, their progress reported token by token.

use super::*;

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

/// What [`serve`] reports to: a request's number and its progress.
pub type Report<'r> = dyn FnMut(usize, Progress) -> Result<(), String> + 'r;

/// A request [`serve`] is generating, in its slot.
pub(super) struct Running {
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
    /// Request `id`, joining (or starting) `joined_s` after the start having waited `queued_s`,
    /// its first `reused` prompt tokens' cache rows shared.
    fn new(id: usize, request: Request, joined_s: f64, queued_s: f64, reused: usize) -> Running {
        let (tokens, prefilled, joining, prefill_s) = (Vec::new(), None, true, 0.0);
        let (logprobs, top, prompt_scores) = (Vec::new(), Vec::new(), Vec::new());
        Running {
            id,
            request,
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
        }
    }

    /// Takes token `t` and reports it — where it asks for them, first its log-probabilities
    /// under the logits it was picked from (`scored`).
    fn take(&mut self, t: u32, scored: Scored, report: &mut Report) -> Result<(), String> {
        if self.request.logprobs {
            let k = self.request.top_logprobs;
            let (lp, top) = match scored {
                Scored::Row(l) => scores(l, t, k),
                Scored::Device(s) => s.log_probabilities(k),
                Scored::Not => (f32::NAN, Vec::new()),
            };
            self.logprobs.push(lp);
            if k > 0 {
                self.top.push(top.clone());
            }
            report(self.id, Progress::Scored(lp, top))?;
        }
        self.tokens.push(t);
        report(self.id, Progress::Token(t))
    }

    /// Whether its tokens so far end it, and how (`eos`: the model's end token).
    fn ending(&self, eos: Option<u32>) -> Option<Ending> {
        self.request.ends(&self.tokens, eos.filter(|_| !self.request.ignore_eos))
    }

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
            speculation: None,
        }
    }

    /// Its generation as [`Running::generation`] gives it, generated speculatively with its
    /// drafts faring as `drafts` say.
    fn speculated(self, drafts: Speculated, ending: Option<Ending>, total_s: f64) -> Generation {
        Generation { speculation: Some(drafts), ..self.generation(None, ending, total_s) }
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
    /// Speculative decoding with this many MTP drafts a pass of the main model (an artifact
    /// compiled with `v3c compile --speculative`): requests are generated one at a time
    /// ([`crate::speculative::Speculator`]; `slots`, `limits` and the prefill budget do not apply).
    pub speculative: Option<usize>,
    /// Decode steps run every slot's row, idle ones too ([`ArtifactBatch::every_slot`]).
    pub every_slot: bool,
}

impl<'l> Serving<'l> {
    /// `slots` sequences at most, of `limits` and prompts of `max_prompt` tokens, ending at `eos`:
    /// no prefill budget, no prefix reuse, no load told, not speculative, the active rows run.
    pub fn new(slots: usize, limits: &'l [usize], max_prompt: usize, eos: Option<u32>) -> Serving<'l> {
        let (prefill_budget, reuse_prefixes, load, speculative) = (None, false, None, None);
        Serving { slots, limits, max_prompt, eos, prefill_budget, reuse_prefixes, load, speculative, every_slot: false }
    }
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
    /// Decode steps so far, the rows they ran and of those the rows fed a token
    /// ([`ServeRun`]'s).
    pub decode_steps: usize,
    pub rows_run: usize,
    pub rows_fed: usize,
}

/// Serves requests as they arrive with at most `o.slots` sequences decoding together: `next(idle)`
/// gives the next request (`idle`: nothing runs, so it may wait for one), numbered in arrival
/// order; each joins the running batch in a vacant slot ([`ArtifactBatch::join`]), in order, once
/// the pool has pages for all its tokens beside those the running sequences may still fill and the
/// step's prefill budget allows, and is prefilled chunk by chunk between decode steps (while none
/// decodes, without a budget); each ends at `eos` or its `max_new` tokens. `report(id, ...)` gets
/// each token as it is picked, then the generation (its times from when it joined) — or why the
/// batch cannot hold the request. Returns how many requests joined after the first decode step,
/// the seconds in prefills and the rows the decode steps ran ([`ServeRun`]).
pub fn serve(
    program: &dyn Program,
    o: &Serving,
    next: &mut dyn FnMut(bool) -> Arrival,
    report: &mut Report,
) -> Result<ServeRun, String> {
    if let Some(drafts) = o.speculative {
        return serve_speculative(program, o, drafts, next, report);
    }
    let (slots, limits, max_prompt, eos) = (o.slots, o.limits, o.max_prompt, o.eos);
    let start = std::time::Instant::now();
    let chunk = program.entry_plan("prefill")?.sizes.rows.max(1);
    let budget = o.prefill_budget.unwrap_or(chunk);
    let mut batch = ArtifactBatch::open(program, slots, limits, max_prompt)?;
    batch.reuse_prefixes(o.reuse_prefixes);
    batch.every_slot = o.every_slot;
    let (room, rows) = (batch.room(), batch.layout.rows);
    let vocab = vocabulary(program);
    let mut running: Vec<Option<Running>> = (0..slots).map(|_| None).collect();
    let mut fed = vec![0u32; slots];
    // The requests waiting to join: their numbers and when they arrived.
    let mut waiting: std::collections::VecDeque<(usize, Request, f64)> = Default::default();
    let (mut arrived, mut closed) = (0, false);
    let (mut prefill_s, mut joined, mut started) = (0.0, 0, false);
    let mut logits = Next::Tokens(Vec::new());
    // The last step's picks scored on the device, by slot (where a request asked and they were).
    let mut step_scores: Option<Vec<Option<Scores>>> = None;
    loop {
        // Every request and cancellation there is (waiting for one while nothing runs or waits).
        while !closed {
            let now = start.elapsed().as_secs_f64();
            match next(waiting.is_empty() && running.iter().all(Option::is_none)) {
                Arrival::Request(r) => queue(r, vocab, now, (&mut arrived, &mut waiting), report)?,
                Arrival::Cancel(id) => {
                    let g = if let Some(g) = cancel_waiting(&mut waiting, id, now) {
                        g
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
            running[s] = Some(Running::new(id, r, joined_s, joined_s - arrived_s, batch.reused_tokens()));
        }
        if let Some(load) = o.load {
            let running = running.iter().flatten().count();
            let cache_usage = batch.pool_usage().unwrap_or(running as f64 / slots.max(1) as f64);
            let (decode_steps, rows_run, rows_fed) = batch.rows_decoded();
            load(Load { running, waiting: waiting.len(), cache_usage, decode_steps, rows_run, rows_fed });
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
                let scored = match (&prefilled, &logits) {
                    (Some(l), _) => Scored::Row(l.as_slice()),
                    (None, Next::Logits(rows)) => rows.get(s).map_or(Scored::Not, Scored::Row),
                    // Picked on the device: scored there where it asked.
                    (None, Next::Tokens(_)) => match step_scores.as_ref().and_then(|v| v.get(s)?.as_ref()) {
                        Some(score) => Scored::Device(score),
                        None => Scored::Not,
                    },
                };
                r.take(t, scored, report)?;
                fed[s] = t;
            }
            let Some(ending) = r.ending(eos) else {
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
            // The device picks greedy or drawn tokens itself unless a request asks for
            // log-probabilities it cannot score there (more alternatives than its scoring kernel gives).
            let (draws, scoring) = (batch.device_sample(), batch.device_scores());
            let on_host = |r: &Request| r.logprobs && !(scoring && r.top_logprobs <= crate::lowering::SCORES_TOP);
            let wanted = running.iter_mut().zip(&active).map(|(r, &a)| {
                r.as_mut().filter(|_| a).map(|r| {
                    let host = on_host(&r.request);
                    (&mut r.request.sampler, host)
                })
            });
            let pick = Pick::of(draws, wanted);
            logits = batch.decode(&fed, &active, &pick)?;
            // Tokens picked on the device for requests asking for log-probabilities: scored
            // there, before another run takes the step's logits' place.
            let asking =
                running.iter().zip(&active).filter_map(|(r, &a)| r.as_ref().filter(|r| a && r.request.logprobs));
            let alternatives = asking.map(|r| r.request.top_logprobs).max();
            step_scores = match (&logits, alternatives) {
                (Next::Tokens(t), Some(k)) => Some(batch.score_last(t, k)?),
                _ => None,
            };
            started = true;
        } else if closed && waiting.is_empty() && running.iter().all(Option::is_none) {
            let (decode_steps, rows_run, rows_fed) = batch.rows_decoded();
            return Ok(ServeRun { joined, prefill_s, decode_steps, rows_run, rows_fed });
        }
    }
}

/// What a [`serve`] run did, beside its requests' generations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServeRun {
    /// Requests that joined a running batch (as others ended).
    pub joined: usize,
    /// Seconds in prefills.
    pub prefill_s: f64,
    /// Decode steps of the batch (none: speculative serving's passes).
    pub decode_steps: usize,
    /// Rows those steps ran ([`ArtifactBatch::rows_decoded`]: at most `slots` a step), and of them
    /// the rows of sequences fed a token.
    pub rows_run: usize,
    pub rows_fed: usize,
}

/// Requests waiting to be served: each one's number, the request and when it arrived (seconds
/// after the start).
type Waiting = std::collections::VecDeque<(usize, Request, f64)>;

/// Queues request `r`, numbered `arrived` (then counted), arriving `now` (its wait counted from
/// when it came, where it says) — or refuses it at once for a token id past the model's
/// vocabulary `vocab` (a step would fail for the whole batch).
fn queue(
    r: Request,
    vocab: Option<usize>,
    now: f64,
    (arrived, waiting): (&mut usize, &mut Waiting),
    report: &mut Report,
) -> Result<(), String> {
    let id = *arrived;
    *arrived += 1;
    if let Some(e) = vocab.and_then(|v| r.outside(v)) {
        return report(id, Progress::Refused(e));
    }
    let arrived_s = r.arrived.map_or(now, |t| now - t.elapsed().as_secs_f64());
    waiting.push_back((id, r, arrived_s));
    Ok(())
}

/// Request `id` taken off the waiting ones, cancelled `now`: its (empty) generation — None
/// where it is not waiting.
fn cancel_waiting(waiting: &mut Waiting, id: usize, now: f64) -> Option<Generation> {
    let (_, _, arrived_s) = waiting.remove(waiting.iter().position(|w| w.0 == id)?)?;
    Some(Generation { queued_s: now - arrived_s, ending: None, ..Generation::alone(Vec::new(), false, 0.0, 0.0) })
}

/// [`serve`] with MTP drafts, `drafts` a pass ([`Serving::speculative`]): requests generated one
/// at a time in arrival order, each pass of the main model
/// ([`crate::speculative::Speculator::pass`]) yielding one token or more; arrivals and
/// cancellations are taken between passes.
fn serve_speculative(
    program: &dyn Program,
    o: &Serving,
    drafts: usize,
    next: &mut dyn FnMut(bool) -> Arrival,
    report: &mut Report,
) -> Result<ServeRun, String> {
    use crate::speculative::{sequence_limit, Speculator};
    let start = std::time::Instant::now();
    // What the artifact cannot do is said before any request is taken.
    crate::speculative::check(program, drafts)?;
    let limit = sequence_limit(program, drafts)?;
    let vocab = vocabulary(program);
    let mut waiting = Waiting::new();
    let (mut arrived, mut closed, mut prefill_s) = (0, false, 0.0);
    let mut current: Option<(Running, Speculator)> = None;
    loop {
        while !closed {
            let now = start.elapsed().as_secs_f64();
            match next(waiting.is_empty() && current.is_none()) {
                Arrival::Request(r) => queue(r, vocab, now, (&mut arrived, &mut waiting), report)?,
                Arrival::Cancel(id) => {
                    let g = match (cancel_waiting(&mut waiting, id, now), current.take()) {
                        (Some(g), running) => {
                            current = running;
                            g
                        }
                        (None, Some((r, speculator))) if r.id == id => {
                            let total_s = now - r.joined_s;
                            r.speculated(speculator.counts, None, total_s)
                        }
                        (None, running) => {
                            current = running;
                            report(id, Progress::Refused("cancel: it is no longer waiting or running".into()))?;
                            continue;
                        }
                    };
                    report(id, Progress::Cancelled(g))?;
                }
                Arrival::NotYet => break,
                Arrival::Closed => closed = true,
            }
        }
        if let Some(load) = o.load {
            let running = usize::from(current.is_some());
            load(Load { running, waiting: waiting.len(), cache_usage: running as f64, ..Load::default() });
        }
        // A pass for the running request, or the next request's start.
        let now = || start.elapsed().as_secs_f64();
        if let Some((r, speculator)) = current.as_mut() {
            let (_, ending) = speculate(r, o.eos, report, |sampler, emit| speculator.pass(sampler, emit))?;
            let (Some(ending), Some((r, speculator))) = (ending, current.take_if(|_| ending.is_some())) else {
                continue;
            };
            let (id, total_s) = (r.id, now() - r.joined_s);
            report(id, Progress::Ended(r.speculated(speculator.counts, Some(ending), total_s)))?;
            continue;
        }
        let Some((id, r, arrived_s)) = waiting.pop_front() else {
            match closed {
                true => return Ok(ServeRun { prefill_s, ..ServeRun::default() }),
                false => continue,
            }
        };
        if r.prompt.is_empty() || r.prompt.len() + r.max_new > limit {
            let e = format!(
                "{} + {} tokens: with {drafts} MTP draft(s) a pass the artifact holds sequences of 1..={limit} tokens",
                r.prompt.len(),
                r.max_new
            );
            report(id, Progress::Refused(e))?;
            continue;
        }
        let joined_s = now();
        let mut r = Running::new(id, r, joined_s, joined_s - arrived_s, 0);
        r.joining = false;
        let prompt = r.request.prompt.clone();
        let score = r.request.echo && r.request.logprobs;
        let (started, ending) = speculate(&mut r, o.eos, report, |sampler, emit| {
            Speculator::start(program, &prompt, drafts, score, sampler, emit)
        })?;
        (r.prefill_s, prefill_s) = (started.prefill_s, prefill_s + started.prefill_s);
        if score {
            // Row i predicts the prompt's token i + 1.
            let k = r.request.top_logprobs;
            r.prompt_scores =
                scores_of(started.prompt_logits.iter().map(Vec::as_slice).zip(prompt[1..].iter().copied()), k);
        }
        match (ending, started.speculator) {
            (Some(ending), _) => {
                let total_s = now() - joined_s;
                report(id, Progress::Ended(r.speculated(Speculated::default(), Some(ending), total_s)))?;
            }
            (None, Some(speculator)) => current = Some((r, speculator)),
            (None, None) => return Err("a speculative generation stopped without an end".into()),
        }
    }
}

/// Runs `step` (a [`crate::speculative::Speculator`]'s start or pass) for the running request
/// `r` with its sampler, its tokens taken and reported as they come: the step's result, and how
/// the request ends where it does (`eos`: the model's end token).
fn speculate<T>(
    r: &mut Running,
    eos: Option<u32>,
    report: &mut Report,
    step: impl FnOnce(&mut v3c_models::reference::Sampler, &mut crate::speculative::Emit) -> Result<T, String>,
) -> Result<(T, Option<Ending>), String> {
    let placeholder = v3c_models::reference::Sampler::new(0.0, 1.0, 0);
    let mut sampler = std::mem::replace(&mut r.request.sampler, placeholder);
    let mut ending = None;
    let out = step(&mut sampler, &mut |t, row| {
        // A request for no tokens (its prompt scored, say) takes none: the start picks one anyway.
        if r.tokens.len() < r.request.max_new {
            r.take(t, Scored::Row(row), report)?;
        }
        ending = r.ending(eos);
        Ok(ending.is_some())
    });
    r.request.sampler = sampler;
    Ok((out?, ending))
}

/// What a token's log-probabilities are taken from ([`Running::take`]): the logits it was picked
/// from, the device's scores of them (and of the most probable tokens there), or nothing (NaN).
#[derive(Debug, Clone, Copy)]
enum Scored<'a> {
    Row(&'a [f32]),
    Device(&'a Scores),
    Not,
}
