//! One sequence on an artifact ([`ArtifactSession`]): its prompt prefilled in chunks, then a decode
//! step per token over its caches.

use super::*;

/// A sequence being generated.
pub struct ArtifactSession<'a> {
    pub(super) program: &'a dyn Program,
    /// Cache inputs of the entries (`kv_cache.<layer>`, `kv_cache.mtp`).
    pub(super) caches: Vec<String>,
    /// Width of a cache row (the latent plus the rope key).
    pub(super) width: usize,
    /// The caches: `[position, width]` while prefilling, then as `layout` lays them out.
    pub(super) state: HashMap<String, HostBuffer>,
    /// Once decoding: how the decode entry takes the caches (rows per sequence, or a pool of pages).
    pub(super) layout: Option<DecodeCaches>,
    pub(super) position: usize,
    pub(super) max_len: usize,
    /// Rows of the decode caches: `max_len` rounded up as the program asks
    /// ([`Program::cache_rows_multiple`]).
    pub(super) rows: usize,
    pub(super) has_mtp: bool,
    /// The caches are on the program's device as the last decode step left them.
    pub(super) resident: bool,
    /// The caches are on the program's device as the last prefill chunk carried them over (the
    /// host keeps their shape only).
    pub(super) carried: bool,
    /// The last prefill chunk leaves the caches on the device for the decode steps (a program that
    /// carries outputs over, whose prefill and decode caches have one element); else it reads
    /// them back.
    pub(crate) decode_on_device: bool,
}

/// Rows of decode caches for sequences of `max_len` tokens: `max_len` in whole multiples of what
/// `program` asks, within its decode plan's caches.
pub(super) fn cache_rows(program: &dyn Program, max_len: usize) -> Result<usize, String> {
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

pub(super) fn ids(v: Vec<i64>) -> HostBuffer {
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

    /// Feeds the prompt (in chunks the prefill plan holds); returns the logits of its last token,
    /// the only ones read back (no chunk's but the last's, and of it the last row).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let chunks = self.prefill_chunks(tokens)?;
        let mut last = Vec::new();
        for k in 0..chunks {
            let want = if k + 1 == chunks { ChunkLogits::Last } else { ChunkLogits::None };
            (last, _) = self.prefill_chunk(tokens, k, want)?;
        }
        Ok(last)
    }

    /// As [`ArtifactSession::prefill`], returning the logits of every prompt token (`[tokens,
    /// vocab]` row-major) and the vocabulary size.
    pub fn prefill_rows(&mut self, tokens: &[u32]) -> Result<(Vec<f32>, usize), String> {
        let chunks = self.prefill_chunks(tokens)?;
        let (mut logits, mut vocab) = (Vec::new(), 0);
        for k in 0..chunks {
            let (rows, v) = self.prefill_chunk(tokens, k, ChunkLogits::All)?;
            logits.extend_from_slice(&rows);
            vocab = v;
        }
        Ok((logits, vocab))
    }

    /// Feeds `tokens` (the prompt) and scores each of its rows where the program runs
    /// ([`Program::scores_last`]: only the scores read back): row i for `tokens[i + 1]`, the last
    /// row for none (a NaN logit). None where the program scores no tokens itself.
    pub fn prefill_scores(&mut self, tokens: &[u32]) -> Result<Option<Vec<RowScore>>, String> {
        if !self.program.device_scores() {
            return Ok(None);
        }
        let chunks = self.prefill_chunks(tokens)?;
        let chunk = self.program.entry_plan("prefill")?.sizes.rows;
        let mut scores = Vec::with_capacity(tokens.len());
        for k in 0..chunks {
            self.prefill_chunk(tokens, k, ChunkLogits::Kept)?;
            let rows = (k * chunk..((k + 1) * chunk).min(tokens.len())).map(|i| match tokens.get(i + 1) {
                Some(&t) => i32::try_from(t).unwrap_or(-1),
                None => -1,
            });
            let rows: Vec<i32> = rows.collect();
            let got = self.program.scores_last("prefill", &rows, 0)?;
            if got.len() != rows.len() {
                return Err(format!("prefill scored {} rows of {}", got.len(), rows.len()));
            }
            scores.extend(got.into_iter().map(|s| s.row));
        }
        Ok(Some(scores))
    }

    /// How many chunks of the prefill plan's rows feed `tokens` after the rows the session holds
    /// (refused where the session or the plan cannot hold them).
    pub(super) fn prefill_chunks(&self, tokens: &[u32]) -> Result<usize, String> {
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
    /// chunks in order); returns the logits `want` asks for (row-major) and the vocabulary size
    /// (none and 0 for [`ChunkLogits::None`]).
    pub(super) fn prefill_chunk(
        &mut self,
        tokens: &[u32],
        k: usize,
        want: ChunkLogits,
    ) -> Result<(Vec<f32>, usize), String> {
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
        let last_row = format!("logits{}", crate::plan::LAST_ROW);
        let no_rows = format!("logits{}", crate::plan::NO_ROWS);
        // Only the launches these need: not the MTP module's past its cache row, whose logits a
        // prompt's chunk never reads, nor without logits the model's head.
        let (mut wanted, carried): (Vec<&str>, &[&str]) = match carry {
            true => (vec![crate::plan::ONLY_WANTED], &caches),
            false => (caches.iter().copied().chain([crate::plan::ONLY_WANTED]).collect(), &[]),
        };
        match want {
            ChunkLogits::All => wanted.push("logits"),
            ChunkLogits::Last => wanted.push(&last_row),
            ChunkLogits::None => {}
            ChunkLogits::Kept => wanted.push(&no_rows),
        }
        let ran = self.program.run_carrying("prefill", &inputs, &wanted, resident, carried);
        let mut out = ran.inspect_err(|_| restore(&mut self.state, &mut inputs, &self.caches))?;
        let rows = match want {
            ChunkLogits::None | ChunkLogits::Kept => None,
            ChunkLogits::All => Some(out.remove("logits").ok_or("the entry has no logits")?),
            // A program that reads back whole outputs only gives every row.
            ChunkLogits::Last => Some(match out.remove(&last_row) {
                Some(b) => b,
                None => {
                    let all = out.remove("logits").ok_or("the entry has no logits")?;
                    let n = all.shape.first().copied().unwrap_or(0);
                    all.rows(n.saturating_sub(1), n.min(1))
                }
            }),
        };
        let (v, vocab) = match rows {
            None => (Vec::new(), 0),
            Some(HostBuffer { data: HostData::F32(v), shape }) if shape.len() == 2 => (v, shape[1]),
            Some(_) => return Err("logits are not f32 [tokens, vocab]".into()),
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
        match self.decode_next(token, &Pick::Host)? {
            Next::Logits(l) => l.into_last().ok_or_else(|| "decode gave no logits".into()),
            Next::Tokens(_) => Err("decode gave a token for logits".into()),
        }
    }

    /// As [`ArtifactSession::decode`]; `pick` (greedy, or draws) lets a program that picks tokens
    /// itself return the next token instead of the logits.
    pub fn decode_next(&mut self, token: u32, pick: &Pick) -> Result<Next, String> {
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
        let table = self.layout.as_mut().map(|l| l.step(&[self.position], &[true], &[0])).transpose()?.flatten();
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
        let stepped = step(self.program, &mut inputs, &caches, &mut self.resident, pick);
        let (mut out, next) = stepped.inspect_err(|_| restore(&mut self.state, &mut inputs, &self.caches))?;
        for c in &self.caches {
            let cache = out.remove(c).or_else(|| inputs.remove(c)).ok_or_else(|| format!("decode gave no {c}"))?;
            self.state.insert(c.clone(), kept_shape(cache, self.resident));
        }
        self.position += 1;
        Ok(next)
    }
}
