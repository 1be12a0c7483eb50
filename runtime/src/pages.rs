//! Decode caches as a pool of 64-row pages ([`crate::plan::PAGE_POOL`]): where the tensor-core
//! attention reads them, a decode entry's caches are `[pages, 64, C]` pools shared by the batch's
//! sequences, and a block table `[sequences, context / 64]` says which page holds each sequence's
//! i-th 64 rows. [`PagePool`] hands pages out as sequences grow and takes them back when they end;
//! [`DecodeCaches`] lays the prefilled rows into the pool and gives each step its table.
//!
//! A table entry of -1 is a page the sequence does not hold: the latent row writes nothing there
//! (a finished sequence fed again writes nowhere), the attention never reads past a sequence's
//! length.

use crate::host::{HostBuffer, HostData};
use crate::plan::PAGE_POOL;

/// Rows of a page.
pub const PAGE_ROWS: usize = crate::abi::PAGE_ROWS;

/// Pages of a pool, handed to sequences as they grow. A page may be held by several holders at
/// once — sequences sharing a prompt's whole pages ([`PagePool::share_pinned`]), kept prefixes
/// ([`PagePool::keep`]), a join's pinned prefix ([`PagePool::pin`]) — and is free again when the
/// last lets it go. Shared pages are only read: a sequence writes rows past its prompt, and the
/// pages it shares are whole pages of its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PagePool {
    /// Free pages, the next one handed out last.
    free: Vec<u32>,
    /// Per sequence, its pages in order.
    held: Vec<Vec<u32>>,
    /// Per page, its holders.
    refs: Vec<u32>,
    /// Pages pinned for joins under way, by id.
    pinned: Vec<(u64, Vec<u32>)>,
    pages: usize,
    /// The first pages, never handed out.
    scratch: usize,
    /// Pages an ended sequence left behind for later ones to copy from (a prompt's prefix:
    /// [`PagePool::keep`]), by id, the least recently used first: given back, oldest first, when a
    /// sequence needs pages the free ones lack.
    kept: std::collections::VecDeque<(u64, Vec<u32>)>,
    next_id: u64,
}

impl PagePool {
    /// A pool of `pages` pages for `sequences` sequences, none held.
    pub fn new(pages: usize, sequences: usize) -> PagePool {
        PagePool::with_scratch(pages, sequences, 0)
    }

    /// As [`PagePool::new`], after `scratch` pages no sequence is handed (the pool's first: where a
    /// device's prefill leaves a joining sequence's rows before they move to its pages).
    pub fn with_scratch(pages: usize, sequences: usize, scratch: usize) -> PagePool {
        let (first, pages) = (scratch as u32, scratch + pages);
        PagePool {
            free: (first..pages as u32).rev().collect(),
            held: vec![Vec::new(); sequences],
            refs: vec![0; pages],
            pinned: Vec::new(),
            pages,
            scratch,
            kept: Default::default(),
            next_id: 0,
        }
    }

    /// Pages in the pool (its scratch pages included).
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The pool's first pages, which no sequence is handed.
    pub fn scratch(&self) -> usize {
        self.scratch
    }

    /// Pages no sequence holds and none kept.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Pages kept ([`PagePool::keep`]) and not yet given back (each once).
    pub fn kept_pages(&self) -> usize {
        let mut pages: Vec<u32> = self.kept.iter().flat_map(|k| k.1.iter().copied()).collect();
        pages.sort_unstable();
        pages.dedup();
        pages.len()
    }

    /// Pages a sequence may still take: the free ones and those only kept prefixes hold (given
    /// back when needed).
    pub fn available(&self) -> usize {
        let mut needed = vec![false; self.pages];
        for &p in self.held.iter().flatten().chain(self.pinned.iter().flat_map(|p| &p.1)) {
            needed[p as usize] = true;
        }
        let kept_only = (0..self.pages).filter(|&p| self.refs[p] > 0 && !needed[p]).count();
        self.free.len() + kept_only
    }

    /// Of `pages`, those only kept prefixes hold (holding them takes them from
    /// [`PagePool::available`]).
    pub fn kept_only(&self, pages: &[u32]) -> usize {
        let needed = |p: u32| self.held.iter().flatten().chain(self.pinned.iter().flat_map(|q| &q.1)).any(|&q| q == p);
        pages.iter().filter(|&&p| self.refs[p as usize] > 0 && !needed(p)).count()
    }

    /// One holder fewer for each of `pages`: those none holds are free again.
    fn let_go(&mut self, pages: impl IntoIterator<Item = u32>) {
        for p in pages {
            let r = &mut self.refs[p as usize];
            if *r > 0 {
                *r -= 1;
                if *r == 0 {
                    self.free.push(p);
                }
            }
        }
    }

    /// Holds `pages` (held already by another holder) for a join under way until
    /// [`PagePool::share_pinned`] or [`PagePool::unpin`]; the pin's id.
    pub fn pin(&mut self, pages: &[u32]) -> u64 {
        for &p in pages {
            self.refs[p as usize] += 1;
        }
        self.next_id += 1;
        self.pinned.push((self.next_id, pages.to_vec()));
        self.next_id
    }

    /// Lets a pin's pages go.
    pub fn unpin(&mut self, id: u64) {
        if let Some(at) = self.pinned.iter().position(|p| p.0 == id) {
            let (_, pages) = self.pinned.remove(at);
            self.let_go(pages);
        }
    }

    /// Sequence `s`, holding no pages, takes a pin's pages as its first ones (its prompt's first
    /// rows, shared with their other holders).
    pub fn share_pinned(&mut self, s: usize, id: u64) -> Result<(), String> {
        let at = self.pinned.iter().position(|p| p.0 == id).ok_or_else(|| format!("no pin {id}"))?;
        let held = self.held.get_mut(s).ok_or_else(|| format!("sequence {s} is not in the pool"))?;
        if !held.is_empty() {
            return Err(format!("sequence {s} holds pages already"));
        }
        *held = self.pinned.remove(at).1;
        Ok(())
    }

    /// Pages sequence `s` holds.
    pub fn holds(&self, s: usize) -> usize {
        self.held.get(s).map_or(0, Vec::len)
    }

    /// Makes sequence `s` hold pages for its rows `0..rows` (taking the pages it lacks; none when
    /// the pool has too few).
    pub fn reserve(&mut self, s: usize, rows: usize) -> Result<(), String> {
        let want = rows.div_ceil(PAGE_ROWS);
        let held = self.held.get(s).ok_or_else(|| format!("sequence {s} is not in the pool"))?.len();
        let lacking = want.saturating_sub(held);
        // Kept pages go back, the least recently used first, where the free ones fall short.
        while lacking > self.free.len() {
            let Some((_, pages)) = self.kept.pop_front() else { break };
            self.let_go(pages.into_iter().rev());
        }
        if lacking > self.free.len() {
            return Err(format!(
                "sequence {s}: {rows} rows need page {} of its own, and the pool's {} are taken",
                held + self.free.len() + 1,
                self.pages
            ));
        }
        let taken: Vec<u32> = (0..lacking).filter_map(|_| self.free.pop()).collect();
        for &p in &taken {
            self.refs[p as usize] = 1;
        }
        self.held[s].extend(taken);
        Ok(())
    }

    /// Sequence `s` lets its pages go (each free again unless another holder has it).
    pub fn release(&mut self, s: usize) {
        if let Some(held) = self.held.get_mut(s) {
            let pages: Vec<u32> = held.drain(..).rev().collect();
            self.let_go(pages);
        }
    }

    /// Sequence `s` ends, its first `pages` pages kept (rows other sequences may copy: see
    /// [`PagePool::kept`]), the others given back; the id of the kept ones (None: none kept).
    pub fn keep(&mut self, s: usize, pages: usize) -> Option<u64> {
        let held = self.held.get_mut(s)?;
        let kept: Vec<u32> = held.drain(..pages.min(held.len())).collect();
        self.release(s);
        if kept.is_empty() {
            return None;
        }
        self.next_id += 1;
        self.kept.push_back((self.next_id, kept));
        Some(self.next_id)
    }

    /// The pages kept under `id`, in order, unless given back since; now the most recently used.
    pub fn kept(&mut self, id: u64) -> Option<&[u32]> {
        let at = self.kept.iter().position(|k| k.0 == id)?;
        let entry = self.kept.remove(at)?;
        self.kept.push_back(entry);
        self.kept.back().map(|k| k.1.as_slice())
    }

    /// Whether pages are kept under `id`.
    pub fn keeps(&self, id: u64) -> bool {
        self.kept.iter().any(|k| k.0 == id)
    }

    /// Lets the pages kept under `id` go.
    pub fn unkeep(&mut self, id: u64) {
        if let Some(at) = self.kept.iter().position(|k| k.0 == id) {
            if let Some((_, pages)) = self.kept.remove(at) {
                self.let_go(pages.into_iter().rev());
            }
        }
    }

    /// Sequence `s`'s pages, in order.
    pub fn pages_held(&self, s: usize) -> &[u32] {
        self.held.get(s).map_or(&[], Vec::as_slice)
    }

    /// Where sequence `s`'s rows `0..n` lie, as runs of consecutive pages: (the sequence's first
    /// row of the run, the pool's, rows).
    pub fn runs(&self, s: usize, n: usize) -> Result<Vec<(usize, usize, usize)>, String> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for first in (0..n).step_by(PAGE_ROWS) {
            let at = self.row(s, first).ok_or_else(|| format!("sequence {s} holds no page for row {first}"))?;
            let rows = PAGE_ROWS.min(n - first);
            match runs.last_mut() {
                Some((from, to, len)) if *from + *len == first && *to + *len == at => *len += rows,
                _ => runs.push((first, at, rows)),
            }
        }
        Ok(runs)
    }

    /// The pool row holding sequence `s`'s row `row`, if it holds it.
    pub fn row(&self, s: usize, row: usize) -> Option<usize> {
        let page = *self.held.get(s)?.get(row / PAGE_ROWS)?;
        Some(page as usize * PAGE_ROWS + row % PAGE_ROWS)
    }

    /// The block table `[sequences, width]` (i32): each sequence's pages, -1 past them.
    pub fn table(&self, width: usize) -> Result<HostBuffer, String> {
        self.table_of(&(0..self.held.len()).collect::<Vec<_>>(), width)
    }

    /// The block table of sequences `sequences` only, a row each in their order: a step that
    /// runs some of the batch's rows.
    pub fn table_of(&self, sequences: &[usize], width: usize) -> Result<HostBuffer, String> {
        let mut t = vec![-1i32; sequences.len() * width];
        for (row, &s) in sequences.iter().enumerate() {
            let held = self.held.get(s).ok_or_else(|| format!("sequence {s} of {}", self.held.len()))?;
            if held.len() > width {
                return Err(format!("sequence {s} holds {} pages, the table has {width} columns", held.len()));
            }
            for (i, &p) in held.iter().enumerate() {
                t[row * width + i] = p as i32;
            }
        }
        Ok(HostBuffer { shape: vec![sequences.len(), width], data: HostData::I32(t) })
    }
}

/// The decode caches of a batch as a decode entry takes them: per sequence `[B, S, C]` rows, or
/// (an entry with a [`PAGE_POOL`] input) pools of pages with their block table.
#[derive(Debug, Clone)]
pub struct DecodeCaches {
    /// Rows of a sequence's caches (a multiple of 64 when paged: the table's width in rows).
    pub rows: usize,
    pub width: usize,
    pub sequences: usize,
    pub pool: Option<PagePool>,
}

impl DecodeCaches {
    /// Caches for sequences of at most `limits[i]` tokens in caches of `rows` rows each; `paged`:
    /// one pool of as many pages as the sequences may fill.
    pub fn new(limits: &[usize], rows: usize, width: usize, paged: bool) -> DecodeCaches {
        let pages = limits.iter().map(|l| l.div_ceil(PAGE_ROWS)).sum();
        DecodeCaches::with_pool(limits.len(), rows, width, paged.then_some((pages, 0)))
    }

    /// Caches for `sequences` sequences of caches of `rows` rows each; `pool`: one pool of
    /// (pages, scratch pages before them) instead ([`PagePool::with_scratch`]).
    pub fn with_pool(sequences: usize, rows: usize, width: usize, pool: Option<(usize, usize)>) -> DecodeCaches {
        let pool = pool.map(|(pages, scratch)| PagePool::with_scratch(pages, sequences, scratch));
        DecodeCaches { rows, width, sequences, pool }
    }

    /// Whether `inputs` of a decode entry (its bounds) take a pool of pages.
    pub fn paged_entry(bounds: &std::collections::BTreeMap<String, Vec<usize>>) -> bool {
        bounds.contains_key(PAGE_POOL)
    }

    /// One cache holding each sequence's prefilled rows (`prefilled[i]`, `[n_i, width]` f32
    /// row-major), pages taken for them.
    pub fn lay_out(&mut self, prefilled: &[&[f32]]) -> Result<HostBuffer, String> {
        let mut all = self.held();
        all.data = HostData::F32(vec![0.0f32; all.shape.iter().product()]);
        for (i, rows) in prefilled.iter().enumerate() {
            self.lay_into(&mut all, i, rows)?;
        }
        Ok(all)
    }

    /// Sequence `i`'s prefilled rows (`[n, width]` f32 row-major) into `cache` (laid out as
    /// [`DecodeCaches::lay_out`] does), its pages taken.
    pub fn lay_into(&mut self, cache: &mut HostBuffer, i: usize, rows: &[f32]) -> Result<(), String> {
        let w = self.width.max(1);
        let n = rows.len() / w;
        let runs = self.place_runs(i, n)?;
        let HostData::F32(all) = &mut cache.data else { return Err("caches are not f32 on the host".into()) };
        for (from, to, len) in runs {
            all.get_mut(to * w..(to + len) * w)
                .ok_or_else(|| format!("sequence {i}: rows {to}..{} past the caches", to + len))?
                .copy_from_slice(&rows[from * w..(from + len) * w]);
        }
        Ok(())
    }

    /// Sequence `i`'s rows `0..n` placed (their pages taken: a pool hands out its lowest free pages
    /// in order): where they lie, as runs of consecutive rows — (the sequence's first row of the
    /// run, the caches', rows).
    pub fn place_runs(&mut self, i: usize, n: usize) -> Result<Vec<(usize, usize, usize)>, String> {
        match &mut self.pool {
            None if i < self.sequences && n <= self.rows => Ok(vec![(0, i * self.rows, n)]),
            None => {
                Err(format!("sequence {i}: {n} rows in caches of {} sequences x {} rows", self.sequences, self.rows))
            }
            Some(pool) => {
                pool.reserve(i, n)?;
                pool.runs(i, n)
            }
        }
    }

    /// Sequence `i`'s rows `0..n` placed (their pages taken: a pool hands out its lowest free
    /// pages in order) — where they lie, contiguous: their first row. A device that holds them at
    /// the caches' first rows moves them there (`Program::move_rows`).
    pub fn place(&mut self, i: usize, n: usize) -> Result<usize, String> {
        match self.place_runs(i, n)?[..] {
            [] => Ok(if self.pool.is_some() { 0 } else { i * self.rows }),
            [(_, first, _)] => Ok(first),
            _ => Err(format!("sequence {i}: its {n} rows on pages out of order")),
        }
    }

    /// The caches as a device holds them, by shape only (`[sequences, rows, C]` or `[pages, 64, C]`).
    pub fn held(&self) -> HostBuffer {
        let shape = match &self.pool {
            None => vec![self.sequences, self.rows, self.width],
            Some(pool) => vec![pool.pages(), PAGE_ROWS, self.width],
        };
        HostBuffer { shape, data: HostData::F32(Vec::new()) }
    }

    /// One cache whose first `n` rows (one sequence's) a device already holds in order — a prefill
    /// carried its caches over ([`crate::session::Program::run_carrying`]) — by its shape only:
    /// the sequence's pages taken (the pool's first, in order: the rows lie where the pool keeps
    /// them).
    pub fn lay_out_held(&mut self, n: usize) -> Result<HostBuffer, String> {
        if self.sequences != 1 || self.place(0, n)? != 0 {
            return Err(format!("{} sequences' rows held in order on a device", self.sequences));
        }
        Ok(self.held())
    }

    /// Before a step writing row `positions[i]` of each sequence where `active[i]`: the pages for
    /// it; the block table to give the step, of the sequences `rows` (the step's rows, in order;
    /// None: not paged).
    pub fn step(&mut self, positions: &[usize], active: &[bool], rows: &[usize]) -> Result<Option<HostBuffer>, String> {
        let Some(pool) = &mut self.pool else { return Ok(None) };
        for (i, (&p, &a)) in positions.iter().zip(active).enumerate() {
            if a {
                pool.reserve(i, p + 1)?;
            }
        }
        pool.table_of(rows, self.rows / PAGE_ROWS).map(Some)
    }

    /// The pages sequence `i` holds and the pool's (None: caches per sequence, no pool).
    pub fn pages_of(&self, i: usize) -> Option<(usize, usize)> {
        self.pool.as_ref().map(|p| (p.holds(i), p.pages()))
    }

    /// Sequence `i` has ended: its pages back to the pool.
    pub fn finish(&mut self, i: usize) {
        if let Some(pool) = &mut self.pool {
            pool.release(i);
        }
    }

    /// Sequence `i`'s first `n` rows of `cache` (a [`DecodeCaches::lay_out`] cache the steps
    /// updated), `[n, width]` row-major.
    pub fn rows_of(&self, cache: &[f32], i: usize, n: usize) -> Result<Vec<f32>, String> {
        let w = self.width;
        let mut out = Vec::with_capacity(n * w);
        for r in 0..n {
            let at = match &self.pool {
                None => i * self.rows + r,
                Some(pool) => pool.row(i, r).ok_or_else(|| format!("sequence {i} holds no page for row {r}"))?,
            };
            out.extend_from_slice(cache.get(at * w..(at + 1) * w).ok_or("a cache shorter than its rows")?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages are handed out as sequences grow (interleaved: the table has holes in the pool's
    /// order), given back at the end, and reused; a full pool is refused by name.
    #[test]
    fn sequences_take_pages_as_they_grow_and_give_them_back() {
        let mut pool = PagePool::new(5, 3);
        pool.reserve(0, 64).unwrap();
        pool.reserve(1, 1).unwrap();
        pool.reserve(0, 65).unwrap();
        pool.reserve(2, 100).unwrap();
        assert_eq!(pool.free(), 0);
        let HostData::I32(t) = pool.table(3).unwrap().data else { panic!() };
        assert_eq!(t, vec![0, 2, -1, 1, -1, -1, 3, 4, -1]);
        // Some sequences' rows, in the order asked.
        let HostData::I32(t) = pool.table_of(&[2, 0], 3).unwrap().data else { panic!() };
        assert_eq!(t, vec![3, 4, -1, 0, 2, -1]);
        assert!(pool.table_of(&[3], 3).unwrap_err().contains("sequence 3 of 3"));
        assert_eq!(pool.row(0, 64), Some(2 * 64));
        assert_eq!(pool.row(2, 99), Some(4 * 64 + 35));
        assert_eq!(pool.row(1, 64), None);
        let err = pool.reserve(1, 65).unwrap_err();
        assert!(err.contains("sequence 1: 65 rows need page 2") && err.contains("pool's 5 are taken"), "{err}");
        pool.release(0);
        pool.reserve(1, 129).unwrap();
        let HostData::I32(t) = pool.table(3).unwrap().data else { panic!() };
        assert_eq!(t, vec![-1, -1, -1, 1, 0, 2, 3, 4, -1]);
        assert!(pool.table(1).unwrap_err().contains("holds 3 pages, the table has 1"));
    }

    /// Prefilled rows laid into pages and read back; the steps' tables; contiguous caches alike.
    #[test]
    fn prefilled_rows_go_to_their_pages_and_come_back() {
        let w = 3;
        let a: Vec<f32> = (0..70 * w).map(|v| v as f32).collect();
        let b: Vec<f32> = (0..5 * w).map(|v| -(v as f32)).collect();
        for paged in [false, true] {
            let mut caches = DecodeCaches::new(&[130, 70], 192, w, paged);
            let all = caches.lay_out(&[&a, &b]).unwrap();
            let HostData::F32(v) = &all.data else { panic!() };
            assert_eq!(all.shape, if paged { vec![3 + 2, 64, w] } else { vec![2, 192, w] });
            assert_eq!(caches.rows_of(v, 0, 70).unwrap(), a);
            assert_eq!(caches.rows_of(v, 1, 5).unwrap(), b);
            let table = caches.step(&[70, 64], &[true, true], &[0, 1]).unwrap();
            match table {
                None => assert!(!paged),
                Some(t) => {
                    assert_eq!(t.shape, vec![2, 3]);
                    let HostData::I32(t) = t.data else { panic!() };
                    assert_eq!(t, vec![0, 1, -1, 2, 3, -1], "sequence 1 took its second page at row 64");
                }
            }
        }
    }

    proptest::proptest! {
        /// Any sequence of growth, endings (some keeping their first pages) and joins sharing the
        /// first pages of a sequence or kept prefix (some pinned and let go, as a cancelled join):
        /// every page's holder count is its holders (sequences, kept prefixes, pins), the free
        /// pages those with none; no sequence holds a page twice; each sequence's table row its
        /// pages in order then -1, each held row on its own page; kept pages stay as they were
        /// until given back, and are given back only where a sequence lacks pages; a sequence is
        /// refused pages only when fewer are available than it lacks.
        #[test]
        fn pages_are_counted_by_their_holders_and_tables_say_where(
            pages in 1usize..24,
            ops in proptest::collection::vec(
                (0usize..4, 0usize..300, 0usize..10, 0usize..3), 0..80),
        ) {
            let mut pool = PagePool::new(pages, 4);
            let mut rows = [0usize; 4];
            let mut kept: Vec<(u64, Vec<u32>)> = Vec::new();
            for (s, n, action, keep) in ops {
                match action {
                    // An ending.
                    0 | 1 => {
                        let before = pool.pages_held(s).to_vec();
                        if let Some(id) = pool.keep(s, keep) {
                            kept.push((id, before[..keep.min(before.len())].to_vec()));
                        }
                        proptest::prop_assert_eq!(pool.holds(s), 0);
                        rows[s] = 0;
                    }
                    // A join sharing another sequence's or a kept prefix's first pages.
                    2 | 3 if rows[s] == 0 => {
                        let source: Vec<u32> = match (action, kept.last()) {
                            (3, Some((id, _))) => pool.kept(*id).map_or(Vec::new(), <[u32]>::to_vec),
                            _ => pool.pages_held((s + 1) % 4).to_vec(),
                        };
                        let shared = &source[..keep.min(source.len())];
                        let id = pool.pin(shared);
                        if n % 5 == 0 {
                            pool.unpin(id);
                        } else {
                            pool.share_pinned(s, id).unwrap();
                            rows[s] = shared.len() * PAGE_ROWS;
                        }
                    }
                    _ => {
                        let (available, lacking) = (pool.available(), n.div_ceil(PAGE_ROWS).saturating_sub(pool.holds(s)));
                        let (free, before) = (pool.free(), pool.kept_pages());
                        match pool.reserve(s, n) {
                            Ok(()) => rows[s] = rows[s].max(n),
                            Err(_) => proptest::prop_assert!(lacking > available, "refused {lacking} of {available}"),
                        }
                        if lacking <= free {
                            proptest::prop_assert_eq!(pool.kept_pages(), before, "kept pages given back needlessly");
                        }
                    }
                }
                kept.retain(|(id, _)| pool.keeps(*id));
                for (id, pages) in &kept {
                    proptest::prop_assert_eq!(pool.kept(*id), Some(pages.as_slice()));
                }
                let width = rows.iter().map(|r| r.div_ceil(PAGE_ROWS)).max().unwrap_or(0);
                let HostData::I32(t) = pool.table(width).unwrap().data else { unreachable!() };
                let mut holders = vec![0u32; pages];
                for (q, &r) in rows.iter().enumerate() {
                    let held = r.div_ceil(PAGE_ROWS);
                    proptest::prop_assert_eq!(pool.holds(q), held);
                    let row = &t[q * width..(q + 1) * width];
                    for (i, &p) in row.iter().enumerate() {
                        if i < held {
                            proptest::prop_assert!(p >= 0 && (p as usize) < pages && !row[..i].contains(&p));
                            holders[p as usize] += 1;
                        } else {
                            proptest::prop_assert_eq!(p, -1);
                        }
                    }
                    for r in (0..r).step_by(17) {
                        let at = pool.row(q, r).unwrap();
                        proptest::prop_assert_eq!(at, t[q * width + r / PAGE_ROWS] as usize * PAGE_ROWS + r % PAGE_ROWS);
                    }
                }
                let held_by_sequences = holders.clone();
                for (_, pages) in &kept {
                    for &p in pages {
                        holders[p as usize] += 1;
                    }
                }
                proptest::prop_assert_eq!(&pool.refs, &holders);
                proptest::prop_assert!(pool.pinned.is_empty());
                let mut free = pool.free.clone();
                free.sort_unstable();
                let unheld: Vec<u32> = (0..pages as u32).filter(|&p| holders[p as usize] == 0).collect();
                proptest::prop_assert_eq!(free, unheld);
                let kept_only = (0..pages).filter(|&p| holders[p] > 0 && held_by_sequences[p] == 0).count();
                proptest::prop_assert_eq!(pool.available(), pool.free() + kept_only);
            }
        }
    }
}
