//! The launch plan: what the compiler's `plan` stage writes and the backends execute. Plain data
//! (serde), defined here so the runtime never needs the compiler to read it.
//!
//! An entry plan is planned for the largest sizes of its two dynamic dims ([`Sizes`]: `rows`, the
//! tokens of a prefill or sequences of a decode, and `context`, the cache rows); each buffer's dims
//! are affine in them ([`Dim`]), so one plan runs any sizes up to the planned ones ([`EntryPlan::bind`]
//! finds them from the inputs). Every launch reads and writes buffers by id: inputs (by name),
//! weights (by checkpoint name), and intermediates placed in one arena at offsets chosen by liveness
//! (a buffer's bytes are reused once its last reader has run), sized for the planned sizes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped whenever the format changes incompatibly.
pub const PLAN_FORMAT_VERSION: u32 = 2;

/// Byte alignment of arena buffers.
pub const ARENA_ALIGN: u64 = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: u32,
    pub entries: Vec<EntryPlan>,
}

impl Plan {
    /// Why the plan cannot be run as written (what a hand-edited or corrupted `plan.json` whose hash
    /// was updated gets past the hashes with): per entry, each buffer's id its index, its shape its
    /// dims at the planned sizes, its bytes those of its shape and dtype (no count past 64 bits), an
    /// arena buffer aligned and inside the arena; every launch's arguments and results and every
    /// output a buffer of the entry; each bound an input's planned shape; the planned sizes within
    /// [`MAX_PLAN_ROWS`](crate::cli::MAX_PLAN_ROWS). Errors name the entry and the buffer, launch or
    /// input.
    pub fn check(&self) -> Result<(), String> {
        for e in &self.entries {
            e.check().map_err(|why| format!("entry {}: {why}", e.name))?;
        }
        Ok(())
    }
}

impl EntryPlan {
    fn check(&self) -> Result<(), String> {
        let most = crate::cli::MAX_PLAN_ROWS;
        if self.sizes.rows > most || self.sizes.context > most {
            return Err(format!(
                "planned for {} rows and {} cached rows, more than the {most} (2^24) v3c plans for",
                self.sizes.rows, self.sizes.context
            ));
        }
        let n = self.buffers.len();
        for (i, b) in self.buffers.iter().enumerate() {
            let what = || b.describe(i);
            if b.id != i {
                return Err(format!("{} has id {}", what(), b.id));
            }
            let shape: Option<Vec<usize>> = b.dims.iter().map(|d| d.checked_eval(self.sizes)).collect();
            if shape.as_ref() != Some(&b.shape) {
                return Err(format!(
                    "{}: shape {:?} is not its dims {:?} at {:?}",
                    what(),
                    b.shape,
                    b.dims,
                    self.sizes
                ));
            }
            match tensor_bytes(&b.shape, &b.dtype) {
                Some(bytes) if bytes == b.bytes => {}
                Some(bytes) => {
                    return Err(format!("{}: {} bytes, its {:?} {} has {bytes}", what(), b.bytes, b.shape, b.dtype))
                }
                None => return Err(format!("{}: no size for {:?} of element type '{}'", what(), b.shape, b.dtype)),
            }
            if let BufferKind::Arena { offset } = b.kind {
                if !offset.is_multiple_of(ARENA_ALIGN)
                    || offset.checked_add(b.bytes).is_none_or(|end| end > self.arena_bytes)
                {
                    return Err(format!(
                        "{}: {} bytes at offset {offset} of an arena of {} bytes (aligned to {ARENA_ALIGN})",
                        what(),
                        b.bytes,
                        self.arena_bytes
                    ));
                }
            }
        }
        for (i, l) in self.launches.iter().enumerate() {
            if let Some(id) = l.args.iter().chain(&l.results).find(|&&id| id >= n) {
                return Err(format!("launch {i} ({}) names buffer {id} of {n}", l.kernel));
            }
        }
        if let Some((name, id)) = self.outputs.iter().find(|(_, id)| *id >= n) {
            return Err(format!("output '{name}' is buffer {id} of {n}"));
        }
        for (name, shape) in &self.bounds {
            if self.input(name).is_none_or(|b| &b.shape != shape) {
                return Err(format!("the bound {shape:?} of '{name}' is not an input's planned shape"));
            }
        }
        Ok(())
    }
}

/// The sizes of an entry's dynamic dims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sizes {
    /// Tokens of a prefill, sequences of a decode.
    pub rows: usize,
    /// Tokens cached before a prefill, cache rows of a decode (per sequence).
    pub context: usize,
    /// Pages of a decode's page pool ([`PAGE_POOL`]; 0 elsewhere).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: usize,
}

impl Sizes {
    /// `rows` and `context`, no page pool.
    pub fn new(rows: usize, context: usize) -> Sizes {
        Sizes { rows, context, pages: 0 }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The input of a decode entry whose caches are a pool of 64-row pages (`kv_cache.* [pages, 64,
/// C]`): its block table `[sequences, context / 64]` (i32), sequence b's i-th page at row `table[b,
/// i]` of the pool.
pub const PAGE_POOL: &str = "block_table";

/// One dim of a buffer: `(constant + rows * R + context * C + pages * P) / div` for the entry's
/// sizes R, C and P (`div` 0 or 1: no division).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dim {
    pub constant: usize,
    pub rows: usize,
    pub context: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub div: usize,
}

impl Dim {
    pub fn fixed(n: usize) -> Dim {
        Dim { constant: n, ..Dim::default() }
    }
    pub const ROWS: Dim = Dim { constant: 0, rows: 1, context: 0, pages: 0, div: 0 };
    pub const CONTEXT: Dim = Dim { constant: 0, rows: 0, context: 1, pages: 0, div: 0 };
    pub const PAGES: Dim = Dim { constant: 0, rows: 0, context: 0, pages: 1, div: 0 };

    pub fn eval(&self, sizes: Sizes) -> usize {
        let n = self.constant + self.rows * sizes.rows + self.context * sizes.context + self.pages * sizes.pages;
        n / self.div.max(1)
    }

    /// [`Self::eval`], `None` where it would count past `usize` (a checked plan's dims at sizes up
    /// to its planned ones never do).
    pub fn checked_eval(&self, sizes: Sizes) -> Option<usize> {
        let terms = [(self.rows, sizes.rows), (self.context, sizes.context), (self.pages, sizes.pages)];
        let n = terms.iter().try_fold(self.constant, |n, &(k, s)| n.checked_add(k.checked_mul(s)?))?;
        Some(n / self.div.max(1))
    }

    /// The sum of two dims (a concatenation; undivided dims).
    pub fn plus(&self, other: &Dim) -> Dim {
        Dim {
            constant: self.constant + other.constant,
            rows: self.rows + other.rows,
            context: self.context + other.context,
            pages: self.pages + other.pages,
            div: 0,
        }
    }
}

/// How one dim of a kernel result follows from the kernel's inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DimRule {
    /// A known size.
    Const(usize),
    /// Dim `dim` of input `input`.
    Input { input: usize, dim: usize },
    /// The sum of two (a concatenation).
    Sum(Box<DimRule>, Box<DimRule>),
}

impl DimRule {
    /// The size for inputs of `inputs` shapes (`None`: no such input dim, or past `usize`).
    pub fn eval<S: AsRef<[usize]>>(&self, inputs: &[S]) -> Option<usize> {
        match self {
            DimRule::Const(n) => Some(*n),
            DimRule::Input { input, dim } => inputs.get(*input)?.as_ref().get(*dim).copied(),
            DimRule::Sum(a, b) => a.eval(inputs)?.checked_add(b.eval(inputs)?),
        }
    }

    /// The dim, affine in an entry's sizes, for inputs with dims `inputs` (the plan's form).
    pub fn eval_dims(&self, inputs: &[Vec<Dim>]) -> Option<Dim> {
        match self {
            DimRule::Const(n) => Some(Dim::fixed(*n)),
            DimRule::Input { input, dim } => inputs.get(*input)?.get(*dim).copied(),
            DimRule::Sum(a, b) => Some(a.eval_dims(inputs)?.plus(&b.eval_dims(inputs)?)),
        }
    }
}

/// A shape at `sizes`.
pub fn shape_at(dims: &[Dim], sizes: Sizes) -> Vec<usize> {
    dims.iter().map(|d| d.eval(sizes)).collect()
}

/// Appended to an output's name in a run's `wanted` list: that output's last row alone (shape
/// `[1, ..]`, or `[0, ..]` of an empty output), read back by itself and returned under the name
/// as asked. A prompt's chunk needs only its last token's logits to sample the next: a 64-row
/// chunk of DeepSeek-V3's logits is 33 MB to read back, its last row 517 KB.
pub const LAST_ROW: &str = "[-1]";

/// Appended to an output's name in a run's `wanted` list: none of its rows read back (returned
/// empty, `[0, ..]`), but the output computed where the run leaves out launches ([`ONLY_WANTED`]):
/// a decode step's logits that the device's argmax reads.
pub const NO_ROWS: &str = "[:0]";

/// In a run's `wanted` list: leave out the launches that feed only outputs neither wanted nor
/// carried ([`EntryPlan::needing`]). A prompt's chunk whose logits nobody reads skips the final
/// norm's and the heads' launches (DeepSeek-V3's head alone reads 1.85 GB of weights a chunk);
/// the outputs left out are not written (a device argmax of the run's logits is refused).
pub const ONLY_WANTED: &str = "[only wanted]";

/// The outputs a run keeps: those `wanted` names (whole or by [`LAST_ROW`]) and those it carries.
pub fn kept_outputs<'a>(wanted: &[&'a str], carry: &[&'a str]) -> Vec<&'a str> {
    let name = |w: &&'a str| w.strip_suffix(LAST_ROW).or_else(|| w.strip_suffix(NO_ROWS)).unwrap_or(w);
    wanted.iter().chain(carry).filter(|w| **w != ONLY_WANTED).map(name).collect()
}

/// The outputs a run wants by their last row alone ([`LAST_ROW`]; not also whole, by
/// [`NO_ROWS`] or carried): a run that leaves launches out ([`ONLY_WANTED`]) writes only that row
/// of them where the launches feeding them work row by row ([`EntryPlan::needing`]).
pub fn last_rows_only<'a>(wanted: &[&'a str], carry: &[&'a str]) -> Vec<&'a str> {
    let whole = |n: &str| wanted.iter().chain(carry).any(|w| *w == n || w.strip_suffix(NO_ROWS) == Some(n));
    let mut last: Vec<&str> = wanted.iter().filter_map(|w| w.strip_suffix(LAST_ROW)).filter(|n| !whole(n)).collect();
    last.sort_unstable();
    last.dedup();
    last
}

/// Whether a run of an entry wanting `wanted` and carrying `carry` writes all of output `name`
/// (every row): one leaving no launches out, or one keeping it other than by its last row alone.
pub fn writes_whole(name: &str, wanted: &[&str], carry: &[&str]) -> bool {
    !wanted.contains(&ONLY_WANTED)
        || (kept_outputs(wanted, carry).contains(&name) && !last_rows_only(wanted, carry).contains(&name))
}

/// What names a run's launches among an entry's runs (its plan, [`RunPlans::get`]): the entry's
/// name, with what a run leaving launches out keeps: `prefill (only kv_cache.0, logits[-1])`.
pub fn run_label(entry: &str, wanted: &[&str], carry: &[&str]) -> String {
    if !wanted.contains(&ONLY_WANTED) {
        return entry.to_string();
    }
    let (whole, last) = kept_and_last(wanted, carry);
    let last = last.iter().map(|n| format!("{n}{LAST_ROW}"));
    format!("{entry} (only {})", whole.into_iter().chain(last).collect::<Vec<_>>().join(", "))
}

/// The outputs a run keeps whole and those it keeps by their last row alone, each sorted.
fn kept_and_last(wanted: &[&str], carry: &[&str]) -> (Vec<String>, Vec<String>) {
    let last = last_rows_only(wanted, carry);
    let mut whole: Vec<String> =
        kept_outputs(wanted, carry).into_iter().filter(|n| !last.contains(n)).map(str::to_string).collect();
    whole.sort();
    whole.dedup();
    (whole, last.into_iter().map(str::to_string).collect())
}

/// The plans runs that leave launches out run ([`ONLY_WANTED`], [`EntryPlan::needing`]), each made
/// once per entry and set of kept outputs: a generation asks for the same one every decode step,
/// and making it copies the plan (DeepSeek-V3's decode: 627 launches, 2963 buffers; ~0.45 ms on
/// this project's 2-core build machine).
#[derive(Debug, Default)]
pub struct RunPlans(std::sync::Mutex<Vec<RunPlan>>);

/// An entry's name, the outputs a run keeps whole and by their last row (each sorted), the plan it
/// runs (`None`: all of it).
type RunPlan = (String, (Vec<String>, Vec<String>), Option<std::sync::Arc<EntryPlan>>);

impl RunPlans {
    /// What a run of `plan` wanting `wanted` and carrying `carry` runs where it leaves launches
    /// out; `None`: every launch, each whole.
    pub fn get(&self, plan: &EntryPlan, wanted: &[&str], carry: &[&str]) -> Option<std::sync::Arc<EntryPlan>> {
        if !wanted.contains(&ONLY_WANTED) {
            return None;
        }
        let kept = kept_and_last(wanted, carry);
        // A run that panicked holding the lock left the list as it was: whole entries only.
        let mut made = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, short)) = made.iter().find(|(e, k, _)| *e == plan.name && *k == kept) {
            return short.clone();
        }
        let (whole, last): (Vec<&str>, Vec<&str>) =
            (kept.0.iter().map(String::as_str).collect(), kept.1.iter().map(String::as_str).collect());
        let short = plan.needing(&whole, &last).map(std::sync::Arc::new);
        made.push((plan.name.clone(), kept, short.clone()));
        short
    }
}

/// What a `wanted` list asks of output `name`, of shape `shape`: the key to return it under, the
/// first row and the rows to read (rows of its first dim; the whole output where both forms are
/// asked); `None` where it is not wanted.
pub fn wanted_rows(wanted: &[&str], name: &str, shape: &[usize]) -> Option<(String, usize, usize)> {
    let rows = shape.first().copied().unwrap_or(1);
    if wanted.contains(&name) {
        return Some((name.to_string(), 0, rows));
    }
    let last = format!("{name}{LAST_ROW}");
    if wanted.contains(&last.as_str()) {
        return Some((last, rows.saturating_sub(1), rows.min(1)));
    }
    let none = format!("{name}{NO_ROWS}");
    wanted.contains(&none.as_str()).then_some((none, 0, 0))
}

/// As [`wanted_rows`], for reading the rows out of the output's memory (`shape` and `dtype` the
/// plan's, at the run's sizes): the key, the shape of the rows read, and their bytes' range within
/// the output.
pub fn wanted_bytes(
    wanted: &[&str],
    name: &str,
    mut shape: Vec<usize>,
    dtype: &str,
) -> Option<(String, Vec<usize>, std::ops::Range<usize>)> {
    let (key, first, rows) = wanted_rows(wanted, name, &shape)?;
    let all = tensor_bytes(&shape, dtype).unwrap_or(0) as usize;
    let row = all / shape.first().copied().unwrap_or(1).max(1);
    if let Some(r) = shape.first_mut() {
        *r = rows;
    }
    Some((key, shape, first * row..(first + rows) * row))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryPlan {
    pub name: String,
    /// The largest sizes the entry runs (its arena is laid out for them).
    pub sizes: Sizes,
    /// The shape each input has at the planned sizes, by input name.
    pub bounds: BTreeMap<String, Vec<usize>>,
    pub buffers: Vec<Buffer>,
    pub launches: Vec<Launch>,
    /// Output name -> buffer id.
    pub outputs: Vec<(String, usize)>,
    /// Bytes of the arena (the peak of live intermediates).
    pub arena_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub id: usize,
    pub kind: BufferKind,
    /// Its dims, affine in the entry's sizes.
    pub dims: Vec<Dim>,
    /// Its shape at the planned sizes (what `bytes` and the arena were sized for).
    pub shape: Vec<usize>,
    /// MLIR element type name (`f32`, `bf16`, `f8E4M3FN`, `i64`, `i32`).
    pub dtype: String,
    pub bytes: u64,
}

impl Buffer {
    /// `buffer <id>`, with the input's or weight's name: what errors call it (`id` its index).
    pub fn describe(&self, id: usize) -> String {
        match &self.kind {
            BufferKind::Input { name } => format!("buffer {id} (input '{name}')"),
            BufferKind::Weight { name } => format!("buffer {id} (weight '{name}')"),
            BufferKind::Arena { .. } => format!("buffer {id}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BufferKind {
    Input { name: String },
    Weight { name: String },
    Arena { offset: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: String,
    pub args: Vec<usize>,
    pub results: Vec<usize>,
    /// Whether the fused kernel works row by row: each row of its results follows from that row of
    /// each argument whose leading dim is the rows and from the whole of every other argument (a
    /// norm, a projection, a model head; not attention, nor the MoE's routed GEMMs). The compiler
    /// sets it from the kernel's ops; a run wanting only the last row of what such launches feed
    /// runs them on that row alone ([`EntryPlan::needing`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub row_wise: bool,
    /// Set in a run's plan only, never written ([`EntryPlan::needing`]): the launch runs on the
    /// last of its rows alone, each of its buffers whose leading dim is the rows seen as its last
    /// row ([`Launch::view`]).
    #[serde(skip)]
    pub last_row: bool,
}

impl Launch {
    /// A launch of `kernel` on `args`, writing `results`, not row-wise.
    pub fn new(kernel: impl Into<String>, args: Vec<usize>, results: Vec<usize>) -> Launch {
        Launch { kernel: kernel.into(), args, results, row_wise: false, last_row: false }
    }

    /// How the launch sees buffer `b` at `sizes`: its shape, and the byte offset of the rows it sees
    /// in the buffer (a last-row launch sees the last of a rows-led buffer's rows alone: `[1, ..]`,
    /// or `[0, ..]` of an empty one).
    pub fn view(&self, b: &Buffer, sizes: Sizes) -> (Vec<usize>, u64) {
        let mut shape = shape_at(&b.dims, sizes);
        if !self.last_row || b.dims.first() != Some(&Dim::ROWS) {
            return (shape, 0);
        }
        let rows = shape[0];
        shape[0] = rows.min(1);
        let row = tensor_bytes(&shape[1..], &b.dtype).unwrap_or(0);
        (shape, rows.saturating_sub(1) as u64 * row)
    }
}

/// How much of a buffer a run needs written ([`EntryPlan::needing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    No,
    LastRow,
    Whole,
}

/// Byte alignment of the rows a last-row launch starts at ([`EntryPlan::needing`]): the GPU
/// kernels' TMA descriptors and vector accesses take 16-byte aligned rows.
pub const ROW_ALIGN: u64 = 16;

impl EntryPlan {
    /// The plan with only the launches the outputs named in `kept` (whole) and `last_rows` (their
    /// last row) need, `None` where that is every launch, each whole. Walking back from the last
    /// launch, one is needed where it writes a buffer a needed launch reads or a kept output,
    /// writes anything but the arena (a decode's cache rows, in place), or writes nothing; then
    /// its arguments are needed. A row-wise launch ([`Launch::row_wise`]) whose results are needed
    /// by their last row alone runs on that row ([`Launch::last_row`]), and needs only the last
    /// row of its rows-led arguments: a prompt's chunk wanting its last token's logits runs the
    /// head (and, where nothing else reads it, the final norm) on one row; DeepSeek-V3's head over
    /// 4096 rows is 2 x 7.6 TFLOP (its f32 rows as bf16 hi + lo). The other outputs, and the other
    /// rows of those wanted by their last, are left unwritten.
    pub fn needing(&self, kept: &[&str], last_rows: &[&str]) -> Option<EntryPlan> {
        let mut need = vec![Need::No; self.buffers.len()];
        let raise = |need: &mut [Need], id: usize, to: Need| {
            if let Some(n) = need.get_mut(id) {
                *n = (*n).max(to);
            }
        };
        for (name, id) in &self.outputs {
            if kept.contains(&name.as_str()) {
                raise(&mut need, *id, Need::Whole);
            } else if last_rows.contains(&name.as_str()) {
                raise(&mut need, *id, Need::LastRow);
            }
        }
        let mut launches = Vec::new();
        for l in self.launches.iter().rev() {
            let side_effect = l.results.is_empty()
                || l.results
                    .iter()
                    .any(|&r| !matches!(self.buffers.get(r).map(|b| &b.kind), Some(BufferKind::Arena { .. })));
            let most = l.results.iter().map(|&r| need.get(r).copied().unwrap_or(Need::Whole)).max();
            if !side_effect && most.is_none_or(|n| n == Need::No) {
                continue;
            }
            let last_row = !side_effect && most == Some(Need::LastRow) && self.runs_on_rows(l);
            for &a in &l.args {
                let by_rows = last_row && self.buffers.get(a).is_some_and(|b| b.dims.first() == Some(&Dim::ROWS));
                raise(&mut need, a, if by_rows { Need::LastRow } else { Need::Whole });
            }
            launches.push(Launch { last_row, ..l.clone() });
        }
        if launches.len() == self.launches.len() && launches.iter().all(|l| !l.last_row) {
            return None;
        }
        launches.reverse();
        Some(EntryPlan { launches, ..self.clone() })
    }

    /// Whether launch `l` may run on its last row alone: row-wise, every result led by the rows,
    /// and every rows-led buffer it reads or writes rows of static width in whole [`ROW_ALIGN`]s.
    fn runs_on_rows(&self, l: &Launch) -> bool {
        let rows_led = |id: &usize| self.buffers.get(*id).is_some_and(|b| b.dims.first() == Some(&Dim::ROWS));
        let aligned = |id: &usize| {
            let b = &self.buffers[*id];
            let fixed = b.dims[1..].iter().all(|d| d.rows == 0 && d.context == 0 && d.pages == 0);
            fixed && tensor_bytes(&b.shape[1..], &b.dtype).is_some_and(|n| n % ROW_ALIGN == 0)
        };
        l.row_wise
            && !l.results.is_empty()
            && l.results.iter().all(rows_led)
            && l.args.iter().chain(&l.results).filter(|id| rows_led(id)).all(aligned)
    }

    /// The input buffer named `name`.
    pub fn input(&self, name: &str) -> Option<&Buffer> {
        self.buffers.iter().find(|b| matches!(&b.kind, BufferKind::Input { name: n } if n == name))
    }

    /// Whether the entry runs at `sizes`: every input dim that is a quotient (a block table's
    /// pages) divides evenly.
    pub fn check_sizes(&self, sizes: Sizes) -> Result<(), String> {
        for b in &self.buffers {
            let BufferKind::Input { name } = &b.kind else { continue };
            if let Some(d) = b.dims.iter().find(|d| d.div > 1 && Dim { div: 0, ..**d }.eval(sizes) % d.div != 0) {
                return Err(format!(
                    "input '{name}': {} rows of cache per sequence, not whole pages of {} rows",
                    sizes.context, d.div
                ));
            }
        }
        Ok(())
    }

    /// The sizes `inputs` (shapes by input name) are at: every input given, each dim matching its
    /// planned form, within the planned sizes. Errors name the input.
    pub fn bind(&self, inputs: &BTreeMap<String, Vec<usize>>) -> Result<Sizes, String> {
        let (mut rows, mut context, mut pages) = (None, None, None);
        let inputs_of_plan = self.buffers.iter().filter_map(|b| match &b.kind {
            BufferKind::Input { name } => Some((name, &b.dims)),
            _ => None,
        });
        let planned: Vec<(&String, &Vec<Dim>)> = inputs_of_plan.collect();
        for (name, dims) in &planned {
            let given = inputs.get(*name).ok_or_else(|| format!("input '{name}' not given"))?;
            if given.len() != dims.len() {
                return Err(format!("input '{name}': {} dims given, the plan has {}", given.len(), dims.len()));
            }
            // An input dim is a constant, the rows, the context or the pages (or a quotient of
            // one of these, checked below).
            for (d, &g) in dims.iter().zip(given) {
                // A block table's width gives the context in whole pages.
                let g = g * d.div.max(1);
                let slot = match (d.rows, d.context, d.pages) {
                    _ if d.constant != 0 => continue,
                    (1, 0, 0) if d.div <= 1 => &mut rows,
                    (0, 1, 0) => &mut context,
                    (0, 0, 1) if d.div <= 1 => &mut pages,
                    _ => continue,
                };
                match slot {
                    Some(v) if *v != g => {
                        return Err(format!("input '{name}': shape {given:?} disagrees with the other inputs' sizes"))
                    }
                    _ => *slot = Some(g),
                }
            }
        }
        let sizes = Sizes { rows: rows.unwrap_or(0), context: context.unwrap_or(0), pages: pages.unwrap_or(0) };
        if sizes.pages > self.sizes.pages {
            return Err(format!(
                "entry {}: a pool of {} pages given, the plan holds at most {} (its sequences at their longest)",
                self.name, sizes.pages, self.sizes.pages
            ));
        }
        if sizes.rows > self.sizes.rows || sizes.context > self.sizes.context {
            return Err(format!(
                "entry {}: {} rows and {} cached rows given, the plan holds at most {} and {} (compile with larger \
                 {} / --max-context)",
                self.name,
                sizes.rows,
                sizes.context,
                self.sizes.rows,
                self.sizes.context,
                if self.name == "decode" { "--max-batch" } else { "--max-rows" }
            ));
        }
        self.check_sizes(sizes)?;
        for (name, dims) in planned {
            let want = shape_at(dims, sizes);
            if inputs[name] != want {
                return Err(format!("input '{name}': shape {:?}, expected {want:?}", inputs[name]));
            }
        }
        Ok(sizes)
    }
}

/// Bytes per element of an MLIR element type name.
pub fn element_bytes(dtype: &str) -> Option<u64> {
    match dtype {
        "f32" | "i32" => Some(4),
        "bf16" | "f16" => Some(2),
        "f8E4M3FN" | "i8" => Some(1),
        "i64" => Some(8),
        _ => None,
    }
}

/// The element type of decode caches kept in fp8 (`v3c compile --kv-cache fp8`): each row of C
/// columns (the latent, then the 64-column RoPE key) stored as [`Fp8LatentRow`] says — for
/// DeepSeek-V3's 576 columns, 656 bytes (FlashMLA's fp8 cache row). The plan names the logical
/// shape `[B, S, C]`; kernels see the bytes, `[B, S, row bytes]` of `i8` ([`physical`]).
pub const LATENT_FP8: &str = "latent_fp8";

/// One row of a [`LATENT_FP8`] cache: the latent's `latent` columns in e4m3, one f32 scale per
/// 128 of them (a power of two: `v = e4m3 * scale` is exact, and the host's f32 copy of a row
/// quantizes back to the same bytes), padded to 16 bytes, then the RoPE key's 64 columns in bf16.
/// Every part starts 16-byte aligned, as TMA reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8LatentRow {
    pub latent: usize,
}

impl Fp8LatentRow {
    /// Columns of the RoPE key, kept in bf16.
    pub const ROPE: usize = 64;
    /// Latent columns per scale.
    pub const GROUP: usize = 128;

    /// The layout of rows of `cols` columns (None: the latent is not whole 128-column groups).
    pub fn of(cols: usize) -> Option<Fp8LatentRow> {
        let latent = cols.checked_sub(Self::ROPE)?;
        (latent > 0 && latent % Self::GROUP == 0).then_some(Fp8LatentRow { latent })
    }

    pub fn groups(&self) -> usize {
        self.latent / Self::GROUP
    }

    /// Byte offset of the scales (f32, one per group).
    pub fn scale_offset(&self) -> usize {
        self.latent
    }

    /// Byte offset of the RoPE key (bf16).
    pub fn rope_offset(&self) -> usize {
        self.latent + (4 * self.groups()).next_multiple_of(16)
    }

    /// Bytes of a row.
    pub fn bytes(&self) -> usize {
        self.rope_offset() + 2 * Self::ROPE
    }

    /// `row` (f32, `latent + 64` columns) as the bytes of a cache row.
    pub fn pack(&self, row: &[f32], out: &mut [u8]) {
        use v3c_models::dtype::{f32_to_bf16, f32_to_f8e4m3};
        for g in 0..self.groups() {
            let part = &row[g * Self::GROUP..][..Self::GROUP];
            let scale = pow2_scale(part.iter().fold(0f32, |m, v| m.max(v.abs())));
            // A power of two's reciprocal is exact: `v * inv` is `v / scale`, bit for bit.
            let inv = 1.0 / scale;
            for (o, v) in out[g * Self::GROUP..][..Self::GROUP].iter_mut().zip(part) {
                *o = f32_to_f8e4m3(v * inv);
            }
            out[self.scale_offset() + 4 * g..][..4].copy_from_slice(&scale.to_le_bytes());
        }
        for (c, v) in row[self.latent..][..Self::ROPE].iter().enumerate() {
            out[self.rope_offset() + 2 * c..][..2].copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
        }
    }

    /// A cache row's bytes as f32 values (`latent + 64`).
    pub fn unpack(&self, bytes: &[u8], row: &mut [f32]) {
        use v3c_models::dtype::{bf16_to_f32, f8e4m3_to_f32};
        for g in 0..self.groups() {
            let at = self.scale_offset() + 4 * g;
            let scale = f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            for (v, &b) in row[g * Self::GROUP..][..Self::GROUP].iter_mut().zip(&bytes[g * Self::GROUP..]) {
                *v = f8e4m3_to_f32(b) * scale;
            }
        }
        for (c, v) in row[self.latent..][..Self::ROPE].iter_mut().enumerate() {
            let at = self.rope_offset() + 2 * c;
            *v = bf16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
        }
    }
}

/// The scale of a group of |max| `amax` in an fp8 cache row: the least power of two `s` with
/// `amax <= 448 s` (`amax` floored at 1e-4), so `v / s` is within e4m3's range and its largest value
/// above 224. The latent kernels compute the same bits.
pub fn pow2_scale(amax: f32) -> f32 {
    let x = (amax.max(1e-4) / 448.0).to_bits();
    let exponent = (x >> 23) & 0xff;
    let up = u32::from(x & 0x7f_ffff != 0);
    let s = f32::from_bits((exponent + up) << 23);
    // The division may have rounded down onto a power of two.
    if amax > 448.0 * s {
        2.0 * s
    } else {
        s
    }
}

/// Bytes of a tensor of `shape` and `dtype` (a [`LATENT_FP8`] cache by its rows).
/// `None` also where the count would pass 64 bits.
pub fn tensor_bytes(shape: &[usize], dtype: &str) -> Option<u64> {
    let (per, dims) = match dtype {
        LATENT_FP8 => {
            let (cols, rows) = shape.split_last()?;
            (Fp8LatentRow::of(*cols)?.bytes() as u64, rows)
        }
        _ => (element_bytes(dtype)?, shape),
    };
    dims.iter().try_fold(per, |bytes, &n| bytes.checked_mul(n as u64))
}

/// A tensor as kernels see it: a [`LATENT_FP8`] cache `[.., C]` as its bytes `[.., row bytes]` of
/// `i8`; others as they are.
pub fn physical(mut shape: Vec<usize>, dtype: &str) -> Result<(Vec<usize>, &'static str), String> {
    match shape.last().copied().and_then(Fp8LatentRow::of) {
        Some(row) if dtype == LATENT_FP8 => {
            let last = shape.len() - 1;
            shape[last] = row.bytes();
            Ok((shape, "i8"))
        }
        _ => Ok((shape, crate::abi::element_name(dtype).ok_or_else(|| format!("a buffer of {dtype}"))?)),
    }
}

/// Places buffers with live ranges `[first, last]` (launch indices) and sizes in one arena,
/// reusing bytes whose buffers are dead. Returns offsets and the arena size. Largest first, each
/// at the lowest offset free over its whole range (buffers live at the same launch never share
/// bytes): the big, long-lived buffers (a prefill's logits) are not stranded above gaps the small
/// ones left, as placing in launch order strands them. Ties by first launch, then by index: the
/// same ranges give the same offsets.
pub fn place(ranges: &[(usize, usize, u64)]) -> (Vec<u64>, u64) {
    let align = |b: u64| b.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(align(ranges[i].2.max(1))), ranges[i].0, i));
    let mut offsets = vec![0u64; ranges.len()];
    // Placed so far: (offset, size, first use, last use).
    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::with_capacity(ranges.len());
    let mut peak = 0u64;
    let mut overlapping: Vec<(u64, u64)> = Vec::new();
    for i in order {
        let (first, last, bytes) = ranges[i];
        let size = align(bytes.max(1));
        overlapping.clear();
        overlapping
            .extend(placed.iter().filter(|&&(_, _, f, l)| f <= last && first <= l).map(|&(off, sz, _, _)| (off, sz)));
        overlapping.sort_unstable();
        let mut at = 0u64;
        for &(off, sz) in &overlapping {
            if at + size <= off {
                break;
            }
            at = at.max(off + sz);
        }
        offsets[i] = at;
        placed.push((at, size, first, last));
        peak = peak.max(at + size);
    }
    (offsets, peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_for_some_outputs_leaves_out_the_launches_only_others_need() {
        let buffer = |id: usize, kind: BufferKind| Buffer {
            id,
            kind,
            dims: vec![Dim::fixed(4)],
            shape: vec![4],
            dtype: "f32".into(),
            bytes: 16,
        };
        let arena = |id| buffer(id, BufferKind::Arena { offset: 16 * id as u64 });
        let cache = buffer(1, BufferKind::Input { name: "cache".into() });
        let x = buffer(0, BufferKind::Input { name: "x".into() });
        let launch = |kernel: &str, args: Vec<usize>, results: Vec<usize>| Launch::new(kernel, args, results);
        let plan = EntryPlan {
            name: "prefill".into(),
            sizes: Sizes { rows: 4, context: 0, pages: 0 },
            bounds: BTreeMap::new(),
            buffers: vec![x, cache, arena(2), arena(3), arena(4), arena(5), arena(6)],
            launches: vec![
                launch("norm", vec![0], vec![2]),
                launch("cache_write", vec![2], vec![1]),
                launch("proj", vec![2], vec![3]),
                // Writes 3 in place (an argument and a result): needed where 3 is.
                launch("residual", vec![3, 2], vec![3]),
                launch("head", vec![3], vec![4]),
                launch("mtp", vec![3], vec![5]),
                launch("mtp_head", vec![5], vec![6]),
                launch("barrier", vec![], vec![]),
            ],
            outputs: vec![("logits".into(), 4), ("cache".into(), 1), ("mtp_logits".into(), 6)],
            arena_bytes: 112,
        };
        let kernels = |kept: &[&str]| -> Vec<String> {
            plan.needing(kept, &[]).map_or(vec!["all".into()], |p| p.launches.into_iter().map(|l| l.kernel).collect())
        };
        assert_eq!(kernels(&["logits"]), ["norm", "cache_write", "proj", "residual", "head", "barrier"]);
        assert_eq!(kernels(&[]), ["norm", "cache_write", "barrier"]);
        assert_eq!(kernels(&["mtp_logits"]), ["norm", "cache_write", "proj", "residual", "mtp", "mtp_head", "barrier"]);
        assert_eq!(kernels(&["logits", "mtp_logits"]), ["all"]);
        // Made once per entry and set of kept outputs, however asked.
        let plans = RunPlans::default();
        let short = plans.get(&plan, &["logits[:0]", ONLY_WANTED], &["cache"]).unwrap();
        let again = plans.get(&plan, &[ONLY_WANTED, "cache", "logits"], &[]).unwrap();
        assert!(std::sync::Arc::ptr_eq(&short, &again));
        assert_eq!(short.launches.len(), 6);
        // By its last row: another run's plan (no launch of this one is row-wise, so the same
        // launches, each whole).
        let last = plans.get(&plan, &[ONLY_WANTED, "cache", "logits[-1]"], &[]).unwrap();
        assert!(!std::sync::Arc::ptr_eq(&short, &last));
        assert_eq!(last.launches, short.launches);
        assert!(plans.get(&plan, &["logits"], &[]).is_none(), "a run that does not ask leaves nothing out");
        assert!(plans.get(&plan, &["logits", "mtp_logits", ONLY_WANTED], &[]).is_none());
        assert_eq!(kept_outputs(&["logits[-1]", ONLY_WANTED], &["cache"]), ["logits", "cache"]);
        assert_eq!(kept_outputs(&["logits[:0]", "mtp_logits"], &[]), ["logits", "mtp_logits"]);
    }

    #[test]
    fn a_run_wanting_an_outputs_last_row_runs_the_row_wise_launches_feeding_it_on_that_row() {
        let buffer = |id: usize, kind: BufferKind, dims: Vec<Dim>, dtype: &str| {
            let shape = shape_at(&dims, Sizes::new(4, 0));
            let bytes = tensor_bytes(&shape, dtype).unwrap();
            Buffer { id, kind, dims, shape, dtype: dtype.into(), bytes }
        };
        let input = |name: &str| BufferKind::Input { name: name.into() };
        let weight = |name: &str| BufferKind::Weight { name: name.into() };
        let arena = |offset: u64| BufferKind::Arena { offset };
        let rows = |width: usize| vec![Dim::ROWS, Dim::fixed(width)];
        let row_wise = |kernel: &str, args: Vec<usize>, results: Vec<usize>| Launch {
            row_wise: true,
            ..Launch::new(kernel, args, results)
        };
        let plan = |vocab: usize| EntryPlan {
            name: "prefill".into(),
            sizes: Sizes::new(4, 0),
            bounds: BTreeMap::new(),
            buffers: vec![
                buffer(0, input("tokens"), vec![Dim::ROWS], "i64"),
                buffer(1, weight("embed"), vec![Dim::fixed(vocab), Dim::fixed(16)], "f32"),
                buffer(2, arena(0), rows(16), "f32"),
                buffer(3, arena(256), rows(16), "f32"),
                buffer(4, arena(512), rows(16), "bf16"),
                buffer(5, arena(768), rows(vocab), "f32"),
                buffer(6, weight("norm"), vec![Dim::fixed(16)], "f32"),
            ],
            launches: vec![
                row_wise("embed", vec![0, 1], vec![2]),
                Launch::new("attention", vec![2], vec![3]),
                row_wise("norm", vec![3, 6], vec![4]),
                row_wise("head", vec![4, 1], vec![5]),
            ],
            outputs: vec![("logits".into(), 5), ("hidden".into(), 3)],
            arena_bytes: 1024,
        };
        let narrowed = |plan: &EntryPlan, kept: &[&str], last: &[&str]| -> Vec<String> {
            let short = plan.needing(kept, last).expect("a plan left short");
            short.launches.iter().map(|l| format!("{}{}", l.kernel, if l.last_row { "[-1]" } else { "" })).collect()
        };
        let p = plan(8);
        assert_eq!(narrowed(&p, &[], &["logits"]), ["embed", "attention", "norm[-1]", "head[-1]"]);
        // The attention's result is the rows it mixes; a whole output stops the narrowing there.
        assert_eq!(narrowed(&p, &["hidden"], &["logits"]), ["embed", "attention", "norm[-1]", "head[-1]"]);
        assert!(p.needing(&["logits"], &[]).is_none());
        assert_eq!(narrowed(&p, &[], &["hidden"]), ["embed", "attention"]);
        // A row of 3 f32 (12 bytes) does not start 16-byte aligned: that head runs whole, and the
        // norm whose every row it reads with it: the whole plan.
        assert!(plan(3).needing(&[], &["logits"]).is_none());

        // How a last-row launch sees its buffers: the rows-led ones by their last row.
        let short = p.needing(&[], &["logits"]).unwrap();
        let head = &short.launches[3];
        let sizes = Sizes::new(3, 0);
        assert_eq!(head.view(&p.buffers[4], sizes), (vec![1, 16], 2 * 32));
        assert_eq!(head.view(&p.buffers[5], sizes), (vec![1, 8], 2 * 32));
        assert_eq!(head.view(&p.buffers[1], sizes), (vec![8, 16], 0));
        assert_eq!(head.view(&p.buffers[5], Sizes::new(0, 0)), (vec![0, 8], 0));
        assert_eq!(short.launches[1].view(&p.buffers[3], sizes), (vec![3, 16], 0));
        // `plan.json` never holds a run's narrowing.
        let json = serde_json::to_string(&short.launches).unwrap();
        assert!(json.contains(r#""row_wise":true"#) && !json.contains("last_row"), "{json}");
        let back: Vec<Launch> = serde_json::from_str(&json).unwrap();
        assert!(back.iter().all(|l| !l.last_row) && back[3].row_wise && !back[1].row_wise);

        // What a wanted list asks: the last row alone unless the output is also wanted whole,
        // by no rows (a device argmax reads every row) or carried.
        let plans = RunPlans::default();
        let last = plans.get(&p, &["logits[-1]", ONLY_WANTED], &[]).unwrap();
        assert!(last.launches[3].last_row);
        for (wanted, carry) in [
            (&["logits[-1]", "logits", ONLY_WANTED][..], &[][..]),
            (&["logits[-1]", "logits[:0]", ONLY_WANTED], &[]),
            (&["logits[-1]", ONLY_WANTED], &["logits"]),
        ] {
            assert!(plans.get(&p, wanted, carry).is_none(), "{wanted:?} carrying {carry:?}");
            assert!(writes_whole("logits", wanted, carry));
        }
        assert_eq!(last_rows_only(&["logits[-1]", "hidden[-1]", "hidden", ONLY_WANTED], &[]), ["logits"]);
        assert!(!writes_whole("logits", &["logits[-1]", ONLY_WANTED], &[]));
        assert!(writes_whole("logits", &["logits[-1]"], &[]), "a run leaving nothing out writes every row");
        assert!(!writes_whole("logits", &["hidden", ONLY_WANTED], &[]));
        assert_eq!(run_label("prefill", &["logits[-1]"], &[]), "prefill");
        assert_eq!(
            run_label("prefill", &["logits[-1]", ONLY_WANTED, "kv_cache.0"], &["kv_cache.1"]),
            "prefill (only kv_cache.0, kv_cache.1, logits[-1])"
        );
        assert_eq!(run_label("prefill", &["logits[:0]", ONLY_WANTED], &[]), "prefill (only logits)");
    }

    #[test]
    fn a_wanted_list_names_whole_outputs_or_their_last_row() {
        let wanted = ["logits[-1]", "kv_cache.0", "hidden[-1]"];
        assert_eq!(wanted_rows(&wanted, "logits", &[8, 100]), Some(("logits[-1]".into(), 7, 1)));
        assert_eq!(wanted_rows(&wanted, "kv_cache.0", &[8, 3]), Some(("kv_cache.0".into(), 0, 8)));
        assert_eq!(wanted_rows(&wanted, "hidden", &[0, 7]), Some(("hidden[-1]".into(), 0, 0)));
        assert_eq!(wanted_rows(&wanted, "mtp_logits", &[8, 100]), None);
        assert_eq!(wanted_rows(&["logits[:0]"], "logits", &[8, 100]), Some(("logits[:0]".into(), 0, 0)));
        assert_eq!(wanted_rows(&["logits", "logits[-1]"], "logits", &[8, 100]), Some(("logits".into(), 0, 8)));
        // The rows' bytes within the output.
        let last = wanted_bytes(&wanted, "logits", vec![8, 100], "f32");
        assert_eq!(last, Some(("logits[-1]".into(), vec![1, 100], 2800..3200)));
        let none = wanted_bytes(&["logits[:0]"], "logits", vec![8, 100], "bf16");
        assert_eq!(none, Some(("logits[:0]".into(), vec![0, 100], 0..0)));
        assert_eq!(
            wanted_bytes(&wanted, "kv_cache.0", vec![8, 3], "i64"),
            Some(("kv_cache.0".into(), vec![8, 3], 0..192))
        );
        let b = crate::host::HostBuffer { shape: vec![3, 2], data: crate::host::HostData::I32(vec![1, 2, 3, 4, 5, 6]) };
        assert_eq!(
            b.rows(2, 1),
            crate::host::HostBuffer { shape: vec![1, 2], data: crate::host::HostData::I32(vec![5, 6]) }
        );
        assert_eq!(b.rows(0, 3), b);
    }

    #[test]
    fn fp8_cache_rows_are_flashmla_sized_and_round_trip_exactly() {
        let row = Fp8LatentRow::of(576).unwrap();
        assert_eq!((row.scale_offset(), row.rope_offset(), row.bytes()), (512, 528, 656));
        assert_eq!(Fp8LatentRow::of(128 + 64).unwrap().bytes(), 128 + 16 + 128);
        assert!(Fp8LatentRow::of(96).is_none() && Fp8LatentRow::of(32).is_none());
        assert_eq!(tensor_bytes(&[2, 64, 576], LATENT_FP8), Some(2 * 64 * 656));
        assert_eq!(physical(vec![2, 64, 576], LATENT_FP8), Ok((vec![2, 64, 656], "i8")));
        // Every element type a plan's buffers may have is a buffer's; others are named.
        for dtype in ["f32", "i32", "bf16", "f16", "f8E4M3FN", "i8", "i64"] {
            assert!(element_bytes(dtype).is_some(), "{dtype}");
            assert_eq!(physical(vec![3], dtype), Ok((vec![3], dtype)));
        }
        assert_eq!(physical(vec![3], "f4E2M1FN"), Err("a buffer of f4E2M1FN".to_string()));
        // Groups of very different magnitudes, a zero group, the RoPE key.
        let values: Vec<f32> = (0..576)
            .map(|i| match i / 128 {
                0 => (i as f32 * 0.37).sin() * 3.0,
                1 => (i as f32).cos() * 1e-3,
                2 => 0.0,
                3 => 448.0 * 2f32.powi(20) * ((i % 7) as f32 - 3.0) / 3.0,
                _ => (i as f32 * 0.1).sin(),
            })
            .collect();
        let mut bytes = vec![0u8; 656];
        row.pack(&values, &mut bytes);
        let mut back = vec![0f32; 576];
        row.unpack(&bytes, &mut back);
        for g in 0..4 {
            let (a, b) = (&values[g * 128..][..128], &back[g * 128..][..128]);
            let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= amax / 16.0, "group {g}: error {err} of {amax}");
        }
        assert_eq!(
            &back[512..],
            &values[512..].iter().map(|&v| v3c_models::dtype::round_bf16(v)).collect::<Vec<_>>()[..]
        );
        // The f32 copy packs to the same bytes (what sessions rely on).
        let mut again = vec![0u8; 656];
        row.pack(&back, &mut again);
        assert_eq!(bytes, again);
        // Host buffers to the plan's bytes and back: [B, S, C] rows; rows of no fp8 layout refused.
        use crate::host::{HostBuffer, HostData};
        let cache = HostBuffer { shape: vec![1, 2, 576], data: HostData::F32([values.clone(), back].concat()) };
        let packed = crate::gpu::plan_bytes(&cache, LATENT_FP8).unwrap();
        assert_eq!(packed.len() as u64, tensor_bytes(&cache.shape, LATENT_FP8).unwrap());
        let host = crate::gpu::host_buffer(&packed, cache.shape.clone(), LATENT_FP8).unwrap();
        assert_eq!(crate::gpu::plan_bytes(&host, LATENT_FP8).unwrap(), packed);
        let narrow = HostBuffer { shape: vec![1, 100], data: HostData::F32(vec![0.0; 100]) };
        let err = crate::gpu::plan_bytes(&narrow, LATENT_FP8).unwrap_err();
        assert!(err.contains("fp8 cache rows of 100 columns"), "{err}");
        assert!(crate::gpu::host_buffer(&[0; 100], vec![1, 100], LATENT_FP8).is_err());
    }

    #[test]
    fn pow2_scales_are_the_least_that_fit() {
        for amax in [1e-9f32, 1e-4, 0.3, 1.0, 224.0, 448.0, 448.0001, 449.0, 896.0, 1e6, 3.4e30] {
            let s = pow2_scale(amax);
            assert_eq!(s.to_bits() & 0x7f_ffff, 0, "{amax}: {s} is not a power of two");
            let a = amax.max(1e-4);
            assert!(a <= 448.0 * s && a > 224.0 * s, "{amax}: scale {s}");
        }
    }

    #[test]
    fn dead_buffers_give_their_bytes_back() {
        // a lives 0..1, b 1..2, c 2..3: a and c can share; b overlaps both.
        let (offsets, peak) = place(&[(0, 1, 100), (1, 2, 100), (2, 3, 100)]);
        assert_eq!(offsets, vec![0, 256, 0]);
        assert_eq!(peak, 512);
    }

    /// The arena peaks at the most bytes live at one launch where placing in launch order does not:
    /// a (launch 0, 2 KiB) and b (0..2, 1 KiB) placed first put b above a, and c (launch 2, 4 KiB)
    /// then goes above b, though at launch 2 only b and c live. Largest first: c at 0, a at 0 too
    /// (never live with c), b above both.
    #[test]
    fn the_largest_buffers_are_placed_first() {
        let kib = 1024;
        let ranges = [(0, 0, 2 * kib), (0, 2, kib), (2, 2, 4 * kib)];
        let (offsets, peak) = place(&ranges);
        let live_most =
            (0..3).map(|t| ranges.iter().filter(|r| r.0 <= t && t <= r.1).map(|r| r.2).sum::<u64>()).max().unwrap();
        assert_eq!(live_most, 5 * kib);
        assert_eq!((offsets.clone(), peak), (vec![0, 4 * kib, 0], live_most));
        // No two buffers live at one launch share a byte.
        for (i, a) in ranges.iter().enumerate() {
            for (j, b) in ranges.iter().enumerate().skip(i + 1) {
                let (ai, bj) = (offsets[i]..offsets[i] + a.2, offsets[j]..offsets[j] + b.2);
                let disjoint = ai.end <= bj.start || bj.end <= ai.start;
                assert!(disjoint || a.1 < b.0 || b.1 < a.0, "{i} and {j}: {offsets:?}");
            }
        }
        assert_eq!(place(&ranges), (offsets, peak), "deterministic");
    }

    #[test]
    fn plans_round_trip_through_json() {
        let plan = Plan {
            format_version: PLAN_FORMAT_VERSION,
            entries: vec![EntryPlan {
                name: "decode".into(),
                sizes: Sizes::new(4, 16),
                bounds: [("tokens".to_string(), vec![4])].into(),
                buffers: vec![Buffer {
                    id: 0,
                    kind: BufferKind::Input { name: "tokens".into() },
                    dims: vec![Dim::ROWS],
                    shape: vec![4],
                    dtype: "i64".into(),
                    bytes: 32,
                }],
                launches: vec![Launch::new("embed_0", vec![0], vec![])],
                outputs: vec![],
                arena_bytes: 0,
            }],
        };
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
    }

    #[test]
    fn inputs_bind_the_sizes_up_to_the_planned_ones() {
        let input = |id, name: &str, dims: Vec<Dim>| Buffer {
            id,
            kind: BufferKind::Input { name: name.into() },
            shape: shape_at(&dims, Sizes::new(4, 16)),
            dims,
            dtype: "i64".into(),
            bytes: 0,
        };
        let plan = EntryPlan {
            name: "decode".into(),
            sizes: Sizes::new(4, 16),
            bounds: BTreeMap::new(),
            buffers: vec![
                input(0, "tokens", vec![Dim::ROWS]),
                input(1, "kv_cache.0", vec![Dim::ROWS, Dim::CONTEXT, Dim::fixed(8)]),
            ],
            launches: vec![],
            outputs: vec![],
            arena_bytes: 0,
        };
        let shapes = |t: Vec<usize>, c: Vec<usize>| -> BTreeMap<String, Vec<usize>> {
            [("tokens".to_string(), t), ("kv_cache.0".to_string(), c)].into()
        };
        assert_eq!(plan.bind(&shapes(vec![2], vec![2, 9, 8])), Ok(Sizes::new(2, 9)));
        assert!(plan.bind(&shapes(vec![3], vec![2, 9, 8])).unwrap_err().contains("disagrees"));
        assert!(plan.bind(&shapes(vec![2], vec![2, 9, 7])).unwrap_err().contains("expected [2, 9, 8]"));
        assert!(plan.bind(&shapes(vec![5], vec![5, 9, 8])).unwrap_err().contains("at most 4 and 16"));
        assert!(plan.bind(&[("tokens".to_string(), vec![1])].into()).unwrap_err().contains("'kv_cache.0' not given"));
        let sum = Dim::CONTEXT.plus(&Dim::ROWS);
        assert_eq!(sum.eval(Sizes::new(3, 5)), 8);
        // A pool of pages and its block table: the pages from the pool, the context from the
        // table's width in pages; more pages than planned refused; sizes off whole pages refused.
        let mut paged = plan.clone();
        paged.sizes = Sizes { pages: 8, ..Sizes::new(4, 128) };
        let table = vec![Dim::ROWS, Dim { div: 64, ..Dim::CONTEXT }];
        paged.buffers[1].dims = vec![Dim::PAGES, Dim::fixed(64), Dim::fixed(8)];
        paged.buffers.push(input(2, PAGE_POOL, table));
        let pool = |t: Vec<usize>, c: Vec<usize>, b: Vec<usize>| -> BTreeMap<String, Vec<usize>> {
            [("tokens".to_string(), t), ("kv_cache.0".to_string(), c), (PAGE_POOL.to_string(), b)].into()
        };
        assert_eq!(
            paged.bind(&pool(vec![2], vec![3, 64, 8], vec![2, 2])),
            Ok(Sizes { pages: 3, ..Sizes::new(2, 128) })
        );
        let err = paged.bind(&pool(vec![2], vec![9, 64, 8], vec![2, 2])).unwrap_err();
        assert!(err.contains("a pool of 9 pages given, the plan holds at most 8"), "{err}");
        assert!(paged.bind(&pool(vec![2], vec![3, 64, 8], vec![3, 2])).unwrap_err().contains("disagrees"));
        let err = paged.check_sizes(Sizes { pages: 1, ..Sizes::new(1, 17) }).unwrap_err();
        assert!(err.contains("'block_table': 17 rows of cache per sequence, not whole pages of 64"), "{err}");
    }
}
