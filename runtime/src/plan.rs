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

/// The sizes of an entry's dynamic dims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sizes {
    /// Tokens of a prefill, sequences of a decode.
    pub rows: usize,
    /// Tokens cached before a prefill, cache rows of a decode.
    pub context: usize,
}

/// One dim of a buffer: `constant + rows * R + context * C` for the entry's sizes R and C.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dim {
    pub constant: usize,
    pub rows: usize,
    pub context: usize,
}

impl Dim {
    pub fn fixed(n: usize) -> Dim {
        Dim { constant: n, rows: 0, context: 0 }
    }
    pub const ROWS: Dim = Dim { constant: 0, rows: 1, context: 0 };
    pub const CONTEXT: Dim = Dim { constant: 0, rows: 0, context: 1 };

    pub fn eval(&self, sizes: Sizes) -> usize {
        self.constant + self.rows * sizes.rows + self.context * sizes.context
    }

    /// The sum of two dims (a concatenation).
    pub fn plus(&self, other: &Dim) -> Dim {
        Dim {
            constant: self.constant + other.constant,
            rows: self.rows + other.rows,
            context: self.context + other.context,
        }
    }
}

/// A shape at `sizes`.
pub fn shape_at(dims: &[Dim], sizes: Sizes) -> Vec<usize> {
    dims.iter().map(|d| d.eval(sizes)).collect()
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
}

impl EntryPlan {
    /// The sizes `inputs` (shapes by input name) are at: every input given, each dim matching its
    /// planned form, within the planned sizes. Errors name the input.
    pub fn bind(&self, inputs: &BTreeMap<String, Vec<usize>>) -> Result<Sizes, String> {
        let mut rows = None;
        let mut context = None;
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
            // An input dim is a constant, the rows or the context.
            for (d, &g) in dims.iter().zip(given) {
                let slot = match (d.rows, d.context) {
                    (1, 0) if d.constant == 0 => &mut rows,
                    (0, 1) if d.constant == 0 => &mut context,
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
        let sizes = Sizes { rows: rows.unwrap_or(0), context: context.unwrap_or(0) };
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

/// Places buffers with live ranges `[first, last]` (launch indices) and sizes in one arena,
/// first fit by offset, reusing bytes whose buffers are dead. Returns offsets and the arena size.
pub fn place(ranges: &[(usize, usize, u64)]) -> (Vec<u64>, u64) {
    let align = |b: u64| b.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].0, std::cmp::Reverse(ranges[i].2)));
    let mut offsets = vec![0u64; ranges.len()];
    // Live placements: (offset, size, last use).
    let mut live: Vec<(u64, u64, usize)> = Vec::new();
    let mut peak = 0u64;
    for i in order {
        let (first, last, bytes) = ranges[i];
        live.retain(|&(_, _, end)| end >= first);
        live.sort();
        let size = align(bytes.max(1));
        let mut at = 0u64;
        for &(off, sz, _) in &live {
            if at + size <= off {
                break;
            }
            at = at.max(off + sz);
        }
        offsets[i] = at;
        live.push((at, size, last));
        peak = peak.max(at + size);
    }
    (offsets, peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_buffers_give_their_bytes_back() {
        // a lives 0..1, b 1..2, c 2..3: a and c can share; b overlaps both.
        let (offsets, peak) = place(&[(0, 1, 100), (1, 2, 100), (2, 3, 100)]);
        assert_eq!(offsets, vec![0, 256, 0]);
        assert_eq!(peak, 512);
    }

    #[test]
    fn plans_round_trip_through_json() {
        let plan = Plan {
            format_version: PLAN_FORMAT_VERSION,
            entries: vec![EntryPlan {
                name: "decode".into(),
                sizes: Sizes { rows: 4, context: 16 },
                bounds: [("tokens".to_string(), vec![4])].into(),
                buffers: vec![Buffer {
                    id: 0,
                    kind: BufferKind::Input { name: "tokens".into() },
                    dims: vec![Dim::ROWS],
                    shape: vec![4],
                    dtype: "i64".into(),
                    bytes: 32,
                }],
                launches: vec![Launch { kernel: "embed_0".into(), args: vec![0], results: vec![] }],
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
            shape: shape_at(&dims, Sizes { rows: 4, context: 16 }),
            dims,
            dtype: "i64".into(),
            bytes: 0,
        };
        let plan = EntryPlan {
            name: "decode".into(),
            sizes: Sizes { rows: 4, context: 16 },
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
        assert_eq!(plan.bind(&shapes(vec![2], vec![2, 9, 8])), Ok(Sizes { rows: 2, context: 9 }));
        assert!(plan.bind(&shapes(vec![3], vec![2, 9, 8])).unwrap_err().contains("disagrees"));
        assert!(plan.bind(&shapes(vec![2], vec![2, 9, 7])).unwrap_err().contains("expected [2, 9, 8]"));
        assert!(plan.bind(&shapes(vec![5], vec![5, 9, 8])).unwrap_err().contains("at most 4 and 16"));
        assert!(plan.bind(&[("tokens".to_string(), vec![1])].into()).unwrap_err().contains("'kv_cache.0' not given"));
        let sum = Dim::CONTEXT.plus(&Dim::ROWS);
        assert_eq!(sum.eval(Sizes { rows: 3, context: 5 }), 8);
    }
}
