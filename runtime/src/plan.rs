//! The launch plan: what the compiler's `plan` stage writes and the backends execute. Plain data
//! (serde), defined here so the runtime never needs the compiler to read it.
//!
//! An entry plan is planned for concrete sizes of its dynamic dims (`bounds`: the shape of every
//! input); every launch reads and writes buffers by id: inputs (by name), weights (by checkpoint
//! name), and intermediates placed in one arena at offsets chosen by liveness (a buffer's bytes are
//! reused once its last reader has run).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped whenever the format changes incompatibly.
pub const PLAN_FORMAT_VERSION: u32 = 1;

/// Byte alignment of arena buffers.
pub const ARENA_ALIGN: u64 = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: u32,
    pub entries: Vec<EntryPlan>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryPlan {
    pub name: String,
    /// The shape each input was planned for, by input name.
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
                bounds: [("tokens".to_string(), vec![4])].into(),
                buffers: vec![Buffer {
                    id: 0,
                    kind: BufferKind::Input { name: "tokens".into() },
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
}
