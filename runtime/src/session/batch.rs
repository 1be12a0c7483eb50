//! Several sequences as one batch ([`ArtifactBatch`]): each prefilled alone, one decode launch per
//! step over all, their pages of a pool held and given back; requests that wait join a running
//! batch as sequences end ([`generate_batch`], [`generate_queue`]).

use super::*;

/// Several sequences generated together on a `cpu` artifact: each prompt prefilled on its own (in
/// chunks, as [`ArtifactSession`] does), then one decode launch per step over all of them — each row its
/// sequence's next token at its own position over its own cache rows. A sequence that has stopped
/// stays in the batch (its row is computed and ignored) so that the others keep their rows.
pub struct ArtifactBatch<'a> {
    pub(super) program: &'a dyn Program,
    pub(super) caches: Vec<String>,
    /// Per cache input: as `layout` lays them out.
    pub(super) state: HashMap<String, HostBuffer>,
    /// `[sequences, rows, width]` (rows: [`cache_rows`] of the longest limit), or one pool of the
    /// pages the sequences may fill.
    pub(super) layout: DecodeCaches,
    pub(super) positions: Vec<usize>,
    /// Most tokens of each sequence (prompt and generated).
    pub(super) limits: Vec<usize>,
    pub(super) has_mtp: bool,
    /// The caches are on the program's device as the last decode step left them.
    pub(super) resident: bool,
    /// Prefills leave their caches on the program's device, and the steps take them there.
    pub(super) on_device: bool,
    /// Per slot: it holds no sequence (none joined it, or its sequence finished).
    pub(super) vacant: Vec<bool>,
    /// Sequences may join ([`ArtifactBatch::open`]).
    pub(super) joinable: bool,
    /// A prompt being prefilled into a slot.
    pub(super) joining: Option<Joining<'a>>,
    /// Per slot (where prefixes are reused): the tokens whose cache rows its pages hold — its
    /// prompt once placed, then each token a decode step fed it (else empty).
    pub(super) sequences: Vec<Vec<u32>>,
    /// Sequences' prefixes whose cache pages outlived them ([`PagePool::keep`]): the tokens their
    /// rows hold and the one after (which the MTP layer's last row read), and their pages' id.
    pub(super) kept: Vec<(Vec<u32>, u64)>,
    /// A joining prompt starting as a running or ended sequence's did holds that one's whole
    /// pages of cache rows they share instead of prefilling them
    /// ([`ArtifactBatch::reuse_prefixes`]).
    pub(super) reuse: bool,
    /// The prompt scores of the join that ended last, where it asked for them
    /// ([`ArtifactBatch::start_join_scoring`]), until taken.
    pub(super) scored: Vec<(f32, Vec<(u32, f32)>)>,
    /// Decode steps run, their rows, and of those the active sequences' ([`ArtifactBatch::rows_decoded`]).
    pub(super) steps: usize,
    pub(super) rows_run: usize,
    pub(super) rows_fed: usize,
    /// The sequences the last decode step ran, as its rows in order ([`step_rows`]).
    pub(super) last_rows: Vec<usize>,
    /// Decode steps run every slot's row, as over caches per sequence, instead of the active
    /// ones' ([`step_rows`]): the A/B of what idle rows cost (`v3r bench-serve --every-slot`).
    pub every_slot: bool,
}

/// Whole pages of rows a sequence whose prompt is `prompt` may copy from one whose prompt was
/// `source`: a cache row depends on the tokens up to it and (the MTP layer's) the one after, so
/// the pages whose rows and following token both prompts share — at least one of `prompt`'s
/// tokens left to prefill, for its logits.
pub(super) fn shared_pages(prompt: &[u32], source: &[u32]) -> usize {
    let common = prompt.iter().zip(source).take_while(|(a, b)| a == b).count();
    common.saturating_sub(1) / crate::pages::PAGE_ROWS
}

/// A prompt being prefilled into slot `slot`, chunk by chunk ([`ArtifactBatch::start_join`]).
pub(super) struct Joining<'a> {
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
pub(super) fn pool_pages(program: &dyn Program) -> Result<Option<usize>, String> {
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
            steps: 0,
            rows_run: 0,
            rows_fed: 0,
            last_rows: Vec::new(),
            every_slot: false,
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
            // Scored where the program runs (the same bits): the token's log-probability, and the
            // most probable tokens' where asked for.
            let kept = j.score.is_some_and(|top| device_scored(self.program, top));
            let want = match (j.score.is_some(), j.next + 1 == j.chunks) {
                (true, _) if kept => ChunkLogits::Kept,
                (true, _) => ChunkLogits::All,
                (false, true) => ChunkLogits::Last,
                (false, false) => ChunkLogits::None,
            };
            let (rows, vocab) = j.session.prefill_chunk(&j.prompt[j.reused..], j.next, want)?;
            j.next += 1;
            match j.score {
                Some(top) if kept => {
                    // Row r (position at + r) predicts the prompt's token at + r + 1.
                    let n = j.session.position - at;
                    let next = |r: usize| j.prompt.get(at + r + 1).map_or(-1, |&t| i32::try_from(t).unwrap_or(-1));
                    let scores = self.program.scores_last("prefill", &(0..n).map(next).collect::<Vec<_>>(), top)?;
                    let scored = scores.iter().take(n).enumerate().filter(|(r, _)| j.prompt.get(at + r + 1).is_some());
                    j.scores.extend(scored.map(|(_, s)| s.log_probabilities(top)));
                    if j.next == j.chunks && n > 0 {
                        last = self.program.logits_row_last("prefill", n - 1)?;
                    }
                }
                Some(top) => {
                    let prompt = &j.prompt;
                    let scored = rows
                        .chunks(vocab.max(1))
                        .enumerate()
                        .filter_map(|(r, row)| Some((row, *prompt.get(at + r + 1)?)));
                    j.scores.extend(scores_of(scored, top));
                }
                None => {}
            }
            if vocab > 0 {
                last = rows[rows.len() - vocab..].to_vec();
            }
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
                steps: 0,
                rows_run: 0,
                rows_fed: 0,
                last_rows: Vec::new(),
                every_slot: false,
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

    /// Whether the batch's program draws sampled tokens itself ([`Program::device_sample`]).
    pub fn device_sample(&self) -> bool {
        self.program.device_sample()
    }

    /// Whether a decode step's picked tokens may be scored where the program runs
    /// ([`ArtifactBatch::score_last`]): their log-probabilities, and the most probable tokens'.
    pub fn device_scores(&self) -> bool {
        self.program.device_scores()
    }

    /// The last decode step's logits scored on the device for `tokens` (by sequence, as
    /// [`Next::Tokens`] gives them), with `alternatives` most probable tokens: per sequence the
    /// step ran, its [`Scores`]; None for the others. The step's logits must still be where it
    /// left them (no run since).
    pub fn score_last(&self, tokens: &[u32], alternatives: usize) -> Result<Vec<Option<Scores>>, String> {
        let row_tokens: Vec<i32> =
            self.last_rows.iter().map(|&s| tokens.get(s).map_or(-1, |&t| i32::try_from(t).unwrap_or(-1))).collect();
        let mut scores = self.program.scores_last("decode", &row_tokens, alternatives)?.into_iter();
        let mut out = vec![None; tokens.len()];
        for &s in &self.last_rows {
            if let (Some(at), Some(score)) = (out.get_mut(s), scores.next()) {
                *at = Some(score);
            }
        }
        Ok(out)
    }

    /// Feeds `tokens[i]` to sequence i at its next position, for the sequences where `active[i]`
    /// (the others are fed again at their last position: computed, ignored); returns every
    /// sequence's logits, or (as `pick`, per sequence, says) its token.
    pub fn decode(&mut self, tokens: &[u32], active: &[bool], pick: &Pick) -> Result<Next, String> {
        let n = self.positions.len();
        if tokens.len() != n || active.len() != n {
            return Err(format!("{} tokens and {} flags for {n} sequences", tokens.len(), active.len()));
        }
        if let Some(i) = (0..n).find(|&i| active[i] && self.positions[i] >= self.limits[i]) {
            return Err(format!("sequence {i} is full ({} tokens)", self.limits[i]));
        }
        let rows = step_rows(active, self.layout.pool.is_some() && !self.every_slot);
        let at = |i: usize| if active[i] { self.positions[i] } else { self.positions[i].saturating_sub(1) } as i64;
        let table = self.layout.step(&self.positions, active, &rows)?;
        let mut inputs = std::mem::take(&mut self.state);
        if let Some(t) = table {
            inputs.insert(PAGE_POOL.into(), t);
        }
        inputs.insert("tokens".into(), ids(rows.iter().map(|&i| tokens[i] as i64).collect()));
        inputs.insert("positions".into(), ids(rows.iter().map(|&i| at(i)).collect()));
        if self.has_mtp {
            inputs.insert("mtp_tokens".into(), ids(vec![0; rows.len()]));
        }
        let caches: Vec<&str> = self.caches.iter().map(String::as_str).collect();
        // The steps may leave the caches on the device unless joining sequences' rows are laid
        // into them on the host.
        let keep = self.on_device || !self.joinable;
        let stepped = step_keeping(self.program, &mut inputs, &caches, &mut self.resident, &pick.rows(&rows), keep);
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
        self.steps += 1;
        self.rows_run += rows.len();
        self.rows_fed += active.iter().filter(|&&a| a).count();
        let next = if rows.len() == n { next } else { next.spread(&rows, n) };
        self.last_rows = rows;
        Ok(next)
    }

    /// Decode steps so far, the rows they ran, and of those the rows of sequences fed a token
    /// (the others computed and ignored: [`step_rows`]).
    pub fn rows_decoded(&self) -> (usize, usize, usize) {
        (self.steps, self.rows_run, self.rows_fed)
    }
}

/// The sequences (slots) of a batch a decode step runs, as its rows in order, given which are fed
/// a token (`active`). Caches per sequence: all of them (row i reads and writes sequence i's
/// caches). A pool of pages: the active ones — each row finds its pages through its row of the
/// block table — and as few others (fed again at their last position, ignored, as a full batch's
/// would be) as bring their count up to a power of two: a device stages a step (its launches and
/// tensor maps, its CUDA graph) per row count, so a batch of 64 slots runs at most 7 of them
/// however its sequences come and go. What the step skips is the rows' attention over their
/// context and the experts only their tokens route to.
pub(super) fn step_rows(active: &[bool], paged: bool) -> Vec<usize> {
    let n = active.len();
    let fed = active.iter().filter(|&&a| a).count();
    let run = if paged { fed.max(1).next_power_of_two().min(n) } else { n };
    let mut others = run - fed;
    let mut rows = Vec::with_capacity(run);
    for (i, &a) in active.iter().enumerate() {
        if a || others > 0 {
            others -= usize::from(!a);
            rows.push(i);
        }
    }
    rows
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
    let mut logits = Next::Logits(LogitRows::of(logits));
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
            // Greedy or drawn: a program that picks tokens itself does (the logits stay there).
            let wanted = samplers.iter_mut().zip(&active).map(|(s, &a)| a.then_some((s, false)));
            let pick = Pick::of(batch.device_sample(), wanted);
            logits = batch.decode(&next, &active, &pick)?;
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
pub(super) fn pages_of(limit: usize) -> usize {
    limit.div_ceil(crate::pages::PAGE_ROWS)
}

/// Runs of rows (a sequence's first row, the caches', rows) from row `from` of the sequence on.
pub(super) fn clip_runs(runs: &[(usize, usize, usize)], from: usize) -> Vec<(usize, usize, usize)> {
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
    let serving = Serving { prefill_budget, reuse_prefixes, ..Serving::new(slots, &limits, longest, eos) };
    let ServeRun { joined, prefill_s, .. } = serve(program, &serving, &mut next, &mut finished)?;
    let generations = done.into_iter().collect::<Option<Vec<_>>>().ok_or("a request was never served")?;
    let total_s = start.elapsed().as_secs_f64();
    Ok(Served { generations, slots, joined, prefill_s, total_s })
}

/// Whether a prompt scored with `top` alternatives a token is scored where `program` runs
/// ([`Program::scores_last`]: the host's values), its logits not read back.
fn device_scored(program: &dyn Program, top: usize) -> bool {
    program.device_scores() && top <= crate::lowering::SCORES_TOP
}
