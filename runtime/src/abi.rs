//! How a GPU kernel of an artifact takes its arguments and how many blocks it runs: what the
//! compiler records per kernel in the manifest ([`KernelAbi`]) and the host-side arithmetic the
//! runtime does from it — kernel parameters, grid, the TMA descriptors a GEMM reads, its split-K
//! workspace. Pure functions over addresses: the GPU executor ([`crate::gpu`]) feeds them device
//! addresses, the tests check them against the kernels' PTX on machines without a GPU.
//!
//! Every sm_90a kernel parameter is 8 bytes: a memref argument is lowered to its descriptor's
//! scalars — allocated pointer, aligned pointer, offset, sizes, strides (`3 + 2 x rank` values) — and
//! an `index` argument to one i64. A GEMM's first two parameters are device pointers to 128-byte
//! `CUtensorMap`s (A's and B's), which the executor encodes and uploads.

use serde::{Deserialize, Serialize};

/// A kernel's calling convention, recorded by the compiler in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KernelAbi {
    /// Row kernels: one memref per operand, of these ranks, in order; one block per row of the
    /// launch's rows operand (`crate::lowering::Blocks`).
    Memrefs { ranks: Vec<usize> },
    /// The GEMM template (`compiler/src/conversion/sm90/gemm.rs`, `emit`).
    Gemm(GemmAbi),
    /// MLA prefill flash attention (`compiler/src/conversion/sm90/mla.rs`, `emit_prefill`).
    MlaPrefill(MlaPrefillAbi),
    /// MLA decode attention over a paged bf16 cache, split K (`mla.rs`, `emit`).
    MlaDecode(MlaDecodeAbi),
}

impl KernelAbi {
    /// Why no kernel the compiler emits takes this convention (a manifest edited with its hashes
    /// left valid): a GEMM's tile dims, boxes and cluster from 1 (they divide the problem) and its
    /// element types and grouping ones the template has; the attention kernels' widths as their
    /// templates require (multiples of 64; decode's latent of 128). Row kernels' memrefs are held
    /// against their PTX by the pre-flight expansion.
    pub fn check(&self) -> Result<(), String> {
        let multiple = |what: &str, n: usize, of: usize| match n > 0 && n.is_multiple_of(of) {
            true => Ok(()),
            false => Err(format!("{what} {n} (a positive multiple of {of})")),
        };
        match self {
            KernelAbi::Memrefs { .. } => Ok(()),
            KernelAbi::Gemm(g) => {
                let dims = [
                    ("block_m", g.block_m),
                    ("block_n", g.block_n),
                    ("block_k", g.block_k),
                    ("cluster", g.cluster),
                    ("a_box_rows", g.a_box_rows),
                    ("b_box_rows", g.b_box_rows),
                ];
                if let Some((name, n)) = dims.iter().find(|(_, n)| *n == 0) {
                    return Err(format!("a GEMM's {name} of {n}"));
                }
                let known = ["bf16", "fp8"].contains(&g.input.as_str())
                    && ["f32", "bf16", "fp8"].contains(&g.output.as_str())
                    && ["dense", "contiguous", "gather", "masked"].contains(&g.grouping.as_str());
                if !known {
                    return Err(format!("a GEMM of {} -> {}, {} grouping", g.input, g.output, g.grouping));
                }
                if g.dual_a && (g.input != "bf16" || g.grouping == "masked") {
                    return Err(format!(
                        "a dual-A GEMM of {} inputs, {} grouping (bf16, not masked)",
                        g.input, g.grouping
                    ));
                }
                Ok(())
            }
            KernelAbi::MlaPrefill(a) => multiple("a query/key width of", a.qk, 64)
                .and_then(|_| multiple("a value width of", a.v, 64))
                .map_err(|why| format!("flash attention with {why}")),
            KernelAbi::MlaDecode(a) => multiple("a latent width of", a.kv, 128)
                .and_then(|_| multiple("a rope width of", a.rope, 64))
                .and_then(|_| match (a.selected, a.fp8_cache, a.bf16_rows) {
                    (true, true, _) => Err("both the selected rows and the fp8 cache (it gathers rows)".to_string()),
                    (false, _, true) => Err("bf16 rows without the selected rows".to_string()),
                    _ => Ok(()),
                })
                .map_err(|why| format!("decode attention with {why}")),
        }
    }
}

/// The decode attention kernel's widths: rows of `kv + rope` (the latent then the rope key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlaDecodeAbi {
    pub kv: usize,
    pub rope: usize,
    /// The cache's rows are [`crate::plan::LATENT_FP8`]'s bytes (the kernel's `_fp8` variant).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fp8_cache: bool,
    /// DeepSeek-V3.2's kernel over each query's selected rows (`_sel`): no pages — f32 key rows
    /// and the selection ([`Self::launch_selected`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub selected: bool,
    /// The selected rows' kernel reads bf16 key rows (`_sel16`), not f32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16_rows: bool,
}

impl MlaDecodeAbi {
    /// The launch over `[q, cache, block_table, seqlens, o_part, lse]`: absorbed queries `[B R,
    /// kv + rope]` (bf16; R rows per sequence: its tokens x heads), the pool of pages `[pages, 64,
    /// kv + rope]` (bf16), the block table `[B, max_pages]` and lengths `[B]` (i32), the splits'
    /// outputs `[Z, B R, kv]` and log-sum-exps `[Z, B R]` (f32): tensor maps of q and the cache (64 x
    /// 64 boxes), the memrefs, R, the heads, the scale's bits; `B ceil(R / 64)` x Z blocks.
    ///
    /// With the fp8 cache, the cache is its rows' bytes (`i8`, [`crate::plan::Fp8LatentRow`]) seen
    /// three ways: the e4m3 latent (a tensor map of 64 x 128-byte boxes, no swizzle), the bf16 RoPE
    /// key (64 x 64 boxes), both with the row's pitch, and the scales as an f32 memref `[rows,
    /// kv / 128]` whose rows are a cache row apart.
    pub fn launch(&self, kernel: &str, ops: [&Buf; 6], heads: usize, scale: f32) -> Result<KernelLaunch, String> {
        let fail = |what: String| format!("{kernel}: {what}");
        let [q, cache, table, seqlens, o_part, lse] = ops;
        let width = self.kv + self.rope;
        let fp8_row = match self.fp8_cache {
            true => Some(
                crate::plan::Fp8LatentRow::of(width)
                    .filter(|r| r.latent == self.kv)
                    .ok_or_else(|| fail(format!("an fp8 cache of rows of {} + {}", self.kv, self.rope)))?,
            ),
            false => None,
        };
        let (cache_element, cache_cols) = fp8_row.map_or(("bf16", width), |r| ("i8", r.bytes()));
        let (qs, cs) = (q.shape_at_rank(2).map_err(fail)?, cache.shape_at_rank(2).map_err(fail)?);
        let b = seqlens.elements();
        let (os, ls) = (o_part.shape_at_rank(3).map_err(fail)?, lse.shape_at_rank(2).map_err(fail)?);
        let fine = q.element == "bf16"
            && cache.element == cache_element
            && table.element == "i32"
            && seqlens.element == "i32"
            && qs[1] == width
            && cs[1] == cache_cols
            && b > 0
            && qs[0] % b == 0
            && heads > 0
            && (qs[0] / b) % heads == 0
            && os == [os[0], qs[0], self.kv]
            && ls == [os[0], qs[0]]
            && os[0] > 0
            && table.shape_at_rank(2).map_err(fail)?[0] == b;
        if !fine {
            return Err(fail(format!(
                "q {qs:?} {}, cache {cs:?} {}, table {:?}, {b} lengths, o_part {os:?}, lse {ls:?} for rows of {width} and \
                 {heads} heads",
                q.element, cache.element, table.shape
            )));
        }
        // The caches: a pool `[pages, 64, C]` (or its rows, `[pages * 64, C]`) the block table addresses.
        let pool = match cache.shape[..] {
            [_, rows, _] => rows == PAGE_ROWS,
            [rows, _] => rows % PAGE_ROWS == 0,
            _ => false,
        };
        if !pool {
            return Err(fail(format!("caches {:?}: a pool of pages of {PAGE_ROWS} rows is read", cache.shape)));
        }
        let rows = qs[0] / b;
        let mut maps = vec![TensorMapSpec::new(q.addr, [qs[0], width], "bf16", [PREFILL_BOX; 2])];
        let mut params = vec![Param::TensorMap(0), Param::TensorMap(1)];
        match fp8_row {
            None => maps.push(TensorMapSpec::new(cache.addr, [cs[0], width], "bf16", [PREFILL_BOX; 2])),
            Some(row) => {
                let latent = TensorMapSpec::new(cache.addr, [cs[0], self.kv], "i8", [PREFILL_BOX, 128]);
                maps.push(TensorMapSpec { pitch: row.bytes(), swizzle: false, ..latent });
                let rope = TensorMapSpec::new(
                    cache.addr + row.rope_offset() as u64,
                    [cs[0], self.rope],
                    "bf16",
                    [PREFILL_BOX; 2],
                );
                maps.push(TensorMapSpec { pitch: row.bytes(), ..rope });
                let scales = cache.addr + row.scale_offset() as u64;
                params.extend([Param::TensorMap(2), Param::Value(cache.addr), Param::Value(scales), Param::Value(0)]);
                params.extend([cs[0], row.groups(), row.bytes() / 4, 1].map(|v| Param::Value(v as u64)));
            }
        }
        for m in &maps {
            m.check().map_err(fail)?;
        }
        for (buf, rank) in [(table, 2), (seqlens, 1), (o_part, 3), (lse, 2)] {
            memref_into(&mut params, buf, rank).map_err(fail)?;
        }
        params.extend([
            Param::Value(rows as u64),
            Param::Value(heads as u64),
            Param::Value(u64::from(scale.to_bits())),
        ]);
        Ok(KernelLaunch {
            kernel: kernel.to_string(),
            grid: b * rows.div_ceil(PREFILL_BOX),
            grid_y: os[0],
            params,
            tensor_maps: maps,
            operands: ops.iter().map(|b| (*b).clone()).collect(),
        })
    }
}

impl MlaDecodeAbi {
    /// The launch over `[q, keys, selected, o_part, lse]` of the kernel over each query's selected
    /// rows: absorbed queries `[T H, kv + rope]` (bf16; a query's H heads its rows), the key rows
    /// `[S, C]` every query selects from (prefill), or each query's own `[T, S, C]` (decode: its
    /// sequence's cache) (f32, or bf16 with [`Self::bf16_rows`]; `C >= kv + rope` and a whole
    /// number of 16 bytes: rows are read 16 bytes at a time), the selection `[T, K]` (i32: rows of the keys, ascending, -1 padded), the splits'
    /// outputs `[Z, T H, kv]` and log-sum-exps `[Z, T H]` (f32): the queries' tensor map (64 x 64
    /// boxes), the memrefs, H, the heads, the scale's bits, the rows a query's keys start apart
    /// (S, or 0); `T ceil(H / 64)` x Z blocks.
    pub fn launch_selected(
        &self,
        kernel: &str,
        ops: [&Buf; 5],
        heads: usize,
        scale: f32,
    ) -> Result<KernelLaunch, String> {
        let fail = |what: String| format!("{kernel}: {what}");
        let [q, keys, selected, o_part, lse] = ops;
        let width = self.kv + self.rope;
        let (qs, ks, ss) = (
            q.shape_at_rank(2).map_err(fail)?,
            keys.shape_at_rank(2).map_err(fail)?,
            selected.shape_at_rank(2).map_err(fail)?,
        );
        let (os, ls) = (o_part.shape_at_rank(3).map_err(fail)?, lse.shape_at_rank(2).map_err(fail)?);
        let t = ss[0];
        // Decode's caches: query t reads cache t (a cache for every query; more are not read).
        let seq_rows = match keys.shape[..] {
            [b, s, _] if b >= t => s,
            _ => 0,
        };
        let (element, per_16_bytes) = if self.bf16_rows { ("bf16", 8) } else { ("f32", 4) };
        let fine = self.selected
            && (keys.shape.len() == 2 || seq_rows > 0)
            && !self.fp8_cache
            && q.element == "bf16"
            && keys.element == element
            && selected.element == "i32"
            && qs[1] == width
            && ks[1] >= width
            && ks[1] % per_16_bytes == 0
            && heads > 0
            && qs[0] == t * heads
            && os == [os[0], qs[0], self.kv]
            && ls == [os[0], qs[0]]
            && os[0] > 0;
        if !fine {
            return Err(fail(format!(
                "q {qs:?} {}, keys {:?} {}, selection {ss:?} {}, o_part {os:?}, lse {ls:?} for rows of {width} \
                 and {heads} heads",
                q.element, keys.shape, keys.element, selected.element
            )));
        }
        let map = TensorMapSpec::new(q.addr, [qs[0], width], "bf16", [PREFILL_BOX; 2]);
        map.check().map_err(fail)?;
        let mut params = vec![Param::TensorMap(0)];
        for (buf, rank) in [(keys, 2), (selected, 2), (o_part, 3), (lse, 2)] {
            memref_into(&mut params, buf, rank).map_err(fail)?;
        }
        params.extend([
            Param::Value(heads as u64),
            Param::Value(heads as u64),
            Param::Value(u64::from(scale.to_bits())),
            Param::Value(seq_rows as u64),
        ]);
        Ok(KernelLaunch {
            kernel: kernel.to_string(),
            grid: t * heads.div_ceil(PREFILL_BOX),
            grid_y: os[0],
            params,
            tensor_maps: vec![map],
            operands: ops.iter().map(|b| (*b).clone()).collect(),
        })
    }
}

/// The prefill attention kernel's widths: q and k rows of `qk`, v rows of `v` (bf16, head-major),
/// and which of the flash kernels it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlaPrefillAbi {
    pub qk: usize,
    pub v: usize,
    #[serde(default, skip_serializing_if = "FlashKind::is_forward")]
    pub kind: FlashKind,
}

/// What a flash-attention kernel computes (`compiler/src/conversion/sm90/mla.rs`, `FlashMode`):
/// inference's forward, training's forward with its rows' log-sum-exps, or one gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlashKind {
    #[default]
    Forward,
    Lse,
    GradQ,
    GradK,
    GradV,
}

impl FlashKind {
    fn is_forward(&self) -> bool {
        *self == FlashKind::Forward
    }

    /// Its operands' names, in order.
    pub fn operands(self) -> &'static [&'static str] {
        match self {
            FlashKind::Forward => &["q", "k", "v", "out"],
            FlashKind::Lse => &["q", "k", "v", "out", "lse"],
            _ => &["q", "k", "v", "dout", "lse", "D", "out"],
        }
    }

    /// One of the gradients (dQ, dK, dV).
    pub fn gradient(self) -> bool {
        matches!(self, FlashKind::GradQ | FlashKind::GradK | FlashKind::GradV)
    }

    /// A gradient of the keys' side (its blocks take 128 keys, not queries).
    fn per_key(self) -> bool {
        matches!(self, FlashKind::GradK | FlashKind::GradV)
    }
}

/// Query rows per block of the prefill kernel, and the rows and columns of its TMA boxes.
const PREFILL_QUERIES: usize = 128;
const PREFILL_BOX: usize = 64;

/// Rows of a page of the decode attention's paged cache.
pub const PAGE_ROWS: usize = 64;

impl MlaPrefillAbi {
    /// The launch over head-major `q [H T, qk]`, `k [H S, qk]`, `v [H S, v]` (bf16) into `out [H
    /// T, v]` (f32): tensor maps of q, k, v (64 x 64 boxes), out's memref, T, S, the scale (an
    /// f32 parameter: its bits in the low half); `ceil(T / 128) x H` blocks along x.
    ///
    /// Training's kernels ([`FlashKind`]): `_lse` also takes `lse [H T]` (f32, its memref after
    /// out's); a gradient takes `q, k, v, dout [H T, v]` (tensor maps), `lse`, `D` (f32 `[H T]`)
    /// and its gradient `out` (f32: dQ `[H T, qk]`, dK `[H S, qk]`, dV `[H S, v]`), memrefs in that
    /// order; dK's and dV's blocks take 128 keys (`ceil(S / 128) x H`).
    pub fn launch(&self, kernel: &str, ops: &[&Buf], heads: usize, scale: f32) -> Result<KernelLaunch, String> {
        let fail = |what: String| format!("{kernel}: {what}");
        let names = self.kind.operands();
        if ops.len() != names.len() {
            return Err(fail(format!("{} operands ({})", ops.len(), names.join(", "))));
        }
        let (q, k, v) = (ops[0], ops[1], ops[2]);
        let grad = ops.len() == 7;
        let out = ops[if grad { 6 } else { 3 }];
        let shape = |b: &Buf| b.shape_at_rank(2).map_err(fail);
        let (qs, ks, vs, os) = (shape(q)?, shape(k)?, shape(v)?, shape(out)?);
        let mut read = vec![("q", q), ("k", k), ("v", v)];
        if grad {
            read.push(("dout", ops[3]));
        }
        for (name, b) in &read {
            if b.element != "bf16" {
                return Err(fail(format!("{name} is {}, the kernel reads bf16", b.element)));
            }
        }
        if heads == 0 || qs[0] % heads != 0 || ks[0] % heads != 0 {
            return Err(fail(format!("q of {} rows and k of {} are not {heads} heads", qs[0], ks[0])));
        }
        let (t, s) = (qs[0] / heads, ks[0] / heads);
        let out_shape = match self.kind {
            FlashKind::Forward | FlashKind::Lse => [qs[0], self.v],
            FlashKind::GradQ => [qs[0], self.qk],
            FlashKind::GradK => [ks[0], self.qk],
            FlashKind::GradV => [ks[0], self.v],
        };
        let mut expected = vec![qs[1] == self.qk, ks[1] == self.qk, vs == [ks[0], self.v], os == out_shape];
        // The statistics: one f32 per query row.
        let stats: Vec<&Buf> = match self.kind {
            FlashKind::Forward => Vec::new(),
            FlashKind::Lse => vec![ops[4]],
            _ => vec![ops[4], ops[5]],
        };
        expected.extend(stats.iter().map(|b| b.element == "f32" && b.elements() == qs[0]));
        if grad {
            expected.push(ops[3].shape_at_rank(2).map_err(fail)? == [qs[0], self.v]);
        }
        if expected.contains(&false) || t > s || out.element != "f32" {
            return Err(fail(format!(
                "q {qs:?}, k {ks:?}, v {vs:?}, out {os:?} {} for heads of {} and {} ({heads} heads, queries after                  the keys' start)",
                out.element, self.qk, self.v
            )));
        }
        let map =
            |b: &Buf, cols: usize, rows: usize| TensorMapSpec::new(b.addr, [rows, cols], "bf16", [PREFILL_BOX; 2]);
        let mut maps = vec![map(q, self.qk, qs[0]), map(k, self.qk, ks[0]), map(v, self.v, ks[0])];
        if grad {
            maps.push(map(ops[3], self.v, qs[0]));
        }
        for m in &maps {
            m.check().map_err(fail)?;
        }
        let mut params: Vec<Param> = (0..maps.len()).map(Param::TensorMap).collect();
        if !grad {
            memref_into(&mut params, out, 2).map_err(fail)?;
        }
        for b in stats {
            memref_into(&mut params, b, 1).map_err(fail)?;
        }
        if grad {
            memref_into(&mut params, out, 2).map_err(fail)?;
        }
        params.extend([Param::Value(t as u64), Param::Value(s as u64), Param::Value(u64::from(scale.to_bits()))]);
        let rows = if self.kind.per_key() { s } else { t };
        Ok(KernelLaunch {
            kernel: kernel.to_string(),
            grid: rows.div_ceil(PREFILL_QUERIES) * heads,
            grid_y: 1,
            params,
            tensor_maps: maps,
            operands: ops.iter().map(|b| (*b).clone()).collect(),
        })
    }
}

/// The fields of a GEMM configuration the host needs to launch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmAbi {
    /// `bf16` or `fp8` (A and B).
    pub input: String,
    /// `f32`, `bf16` or `fp8`.
    pub output: String,
    pub block_m: usize,
    pub block_n: usize,
    /// K elements per pipeline stage (128 bytes of K).
    pub block_k: usize,
    /// Blocks per cluster along M (1: none).
    pub cluster: usize,
    pub persistent: bool,
    pub split_k: bool,
    pub residual: bool,
    /// `dense`, `contiguous`, `gather` or `masked`.
    pub grouping: String,
    pub swiglu: bool,
    pub row_scale: bool,
    pub scatter: bool,
    /// Rows of the TMA boxes: A's (1 for a gather: one token row per load) and B's (a cluster's
    /// blocks each load their share of the B tile).
    pub a_box_rows: usize,
    pub b_box_rows: usize,
    /// fp8: B's scales are per row, 1x128 along K as A's (`[N, ceil(K/128)]`: Wgrad's `x^T`), not
    /// per 128x128 block (`[ceil(N/128), ceil(K/128)]`: a weight's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub b_row_scales: bool,
    /// K's range `[start, end)` comes from the device (`k_range`, two i32): the K tiles summed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub k_range: bool,
    /// A second A of A's shape, multiplied by the same B into the same output (`(A + A2) B^T`, B
    /// read once: f32 activations as bf16 hi + lo): its tensor map follows B's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dual_a: bool,
}

impl GemmAbi {
    /// Row of B's scales that B row `row` reads.
    pub fn b_scale_row(&self, row: usize) -> usize {
        if self.b_row_scales {
            row
        } else {
            row / 128
        }
    }
}

/// A buffer at a (device) address, row-major and contiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub shape: Vec<usize>,
    /// MLIR element type name (`f32`, `bf16`, `f8E4M3FN`, `i32`, `i64`; [`element_name`]).
    pub element: &'static str,
}

/// The element type names buffers and tensor maps take, as the one `&'static str` each (staging a
/// run copies thousands of buffers: no string of their own each); None for a name of none.
pub fn element_name(name: &str) -> Option<&'static str> {
    Some(match name {
        "f32" => "f32",
        "i32" => "i32",
        "bf16" => "bf16",
        "f16" => "f16",
        "f8E4M3FN" => "f8E4M3FN",
        "i8" => "i8",
        "i64" => "i64",
        "u8" => "u8",
        _ => return None,
    })
}

impl Buf {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Its shape seen at `rank`: leading dims collapsed (a `[T, 9, 2048]` result as `[T * 9, 2048]`).
    pub fn shape_at_rank(&self, rank: usize) -> Result<Vec<usize>, String> {
        let (leading, rest) = self.split_at_rank(rank)?;
        let mut shape = Vec::with_capacity(rank);
        shape.push(leading);
        shape.extend_from_slice(rest);
        Ok(shape)
    }

    /// [`Buf::shape_at_rank`] without a copy: the collapsed leading dim, and the dims after it.
    fn split_at_rank(&self, rank: usize) -> Result<(usize, &[usize]), String> {
        if rank == 0 || self.shape.len() < rank {
            return Err(format!("a buffer of shape {:?} cannot be seen as rank {rank}", self.shape));
        }
        let cut = self.shape.len() - rank;
        Ok((self.shape[..=cut].iter().product(), &self.shape[cut + 1..]))
    }
}

/// One 8-byte kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Value(u64),
    /// The device address of the launch's tensor map number `i` (filled in by the executor).
    TensorMap(usize),
}

/// The descriptor scalars of a memref of `rank` over `buf`.
pub fn memref(buf: &Buf, rank: usize) -> Result<Vec<Param>, String> {
    let mut p = Vec::with_capacity(3 + 2 * rank);
    memref_into(&mut p, buf, rank)?;
    Ok(p)
}

/// [`memref`]'s scalars appended to `params` (staging a run appends thousands: no vector of
/// their own each).
pub fn memref_into(params: &mut Vec<Param>, buf: &Buf, rank: usize) -> Result<(), String> {
    let (leading, rest) = buf.split_at_rank(rank)?;
    let dim = |k: usize| if k == 0 { leading } else { rest[k - 1] } as u64;
    params.reserve(3 + 2 * rank);
    params.extend([Param::Value(buf.addr), Param::Value(buf.addr), Param::Value(0)]);
    params.extend((0..rank).map(|k| Param::Value(dim(k))));
    // Row-major strides: the product of the dims after each.
    params.extend((0..rank).map(|k| Param::Value((k + 1..rank).map(dim).product())));
    Ok(())
}

/// A 2-D tiled TMA descriptor over a row-major `[rows, cols]` tensor whose rows are `pitch` bytes
/// apart: boxes of `box_rows x box_cols`, 128-byte swizzle (or none), zero fill out of bounds (what
/// the kernels' `!nvgpu.tensormap.descriptor` types say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMapSpec {
    pub addr: u64,
    pub rows: usize,
    pub cols: usize,
    /// `bf16` or `f8E4M3FN` / `i8` (encoded as 8-bit unsigned: TMA copies bytes).
    pub element: &'static str,
    pub box_rows: usize,
    pub box_cols: usize,
    /// Bytes from one row to the next (`cols` elements where the rows are contiguous).
    pub pitch: usize,
    /// 128-byte swizzle (the GEMM and attention tiles); `false`: none.
    pub swizzle: bool,
}

impl TensorMapSpec {
    /// A map over contiguous rows, boxes 128-byte swizzled.
    pub fn new(
        addr: u64,
        [rows, cols]: [usize; 2],
        element: &'static str,
        [box_rows, box_cols]: [usize; 2],
    ) -> TensorMapSpec {
        let mut t = TensorMapSpec { addr, rows, cols, element, box_rows, box_cols, pitch: 0, swizzle: true };
        t.pitch = cols * t.element_bytes();
        t
    }

    pub fn element_bytes(&self) -> usize {
        if self.element == "bf16" {
            2
        } else {
            1
        }
    }

    /// What `cuTensorMapEncodeTiled` would refuse, said before calling it: a global address not
    /// 16-byte aligned, a row pitch not a multiple of 16 bytes, box dims outside 1..=256, a box
    /// row wider than the 128-byte swizzle.
    pub fn check(&self) -> Result<(), String> {
        let pitch = self.pitch;
        if pitch < self.cols * self.element_bytes() {
            return Err(format!("tensor map: rows of {} {} in a pitch of {pitch} B", self.cols, self.element));
        }
        if !self.addr.is_multiple_of(16) {
            return Err(format!("tensor map: address {:#x} is not 16-byte aligned", self.addr));
        }
        if !pitch.is_multiple_of(16) {
            return Err(format!(
                "tensor map: rows of {} {} ({pitch} B) are not a multiple of 16 bytes",
                self.cols, self.element
            ));
        }
        if !(1..=256).contains(&self.box_rows) || !(1..=256).contains(&self.box_cols) {
            return Err(format!("tensor map: box {}x{} outside 1..=256", self.box_rows, self.box_cols));
        }
        if self.box_cols * self.element_bytes() > 128 {
            return Err(format!(
                "tensor map: a box row of {} B exceeds the 128-byte swizzle",
                self.box_cols * self.element_bytes()
            ));
        }
        if self.rows == 0 || self.cols == 0 {
            return Err(format!("tensor map: an empty [{}, {}] tensor", self.rows, self.cols));
        }
        Ok(())
    }
}

/// One kernel launch, ready for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLaunch {
    pub kernel: String,
    pub grid: usize,
    /// Blocks along y (1 but for split-K attention: its splits).
    pub grid_y: usize,
    pub params: Vec<Param>,
    pub tensor_maps: Vec<TensorMapSpec>,
    /// The buffers the launch reads and writes, in the lowering's operand order (for dumps: what
    /// `V3R_DUMP_DIR` writes after each launch).
    pub operands: Vec<Buf>,
}

/// The split-K scratch a GEMM launch uses: `[splits, M, N]` f32 partials and one i32 counter per
/// output tile (zero before the first launch; the kernel leaves them zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitScratch {
    pub workspace_bytes: usize,
    pub counters: usize,
}

/// Where a GEMM's operands are, by role (see `crate::lowering::GemmSpec`). `b` and `b_scale` are
/// the weights as the kernel reads them (concatenated along N, or grouped per expert).
#[derive(Debug, Clone)]
pub struct GemmOperands<'a> {
    pub a: &'a Buf,
    /// The second A of a dual-A kernel (`GemmAbi::dual_a`).
    pub a2: Option<&'a Buf>,
    pub a_scale: Option<&'a Buf>,
    pub b: &'a Buf,
    pub b_scale: Option<&'a Buf>,
    pub out: &'a Buf,
    pub residual: Option<&'a Buf>,
    /// Grouped: group boundaries `[groups + 1]`, the token of each sorted row, its weight.
    pub offsets: Option<&'a Buf>,
    pub perm: Option<&'a Buf>,
    pub row_scale: Option<&'a Buf>,
    /// A K range from the device: `[start, end)` (two i32).
    pub k_range: Option<&'a Buf>,
    /// Split K: the workspace and counters (as large as [`GemmAbi::scratch`] says).
    pub workspace: Option<u64>,
    pub counters: Option<u64>,
}

/// K splits of a split-K GEMM of `tiles` output tiles and `k_tiles` K tiles on `sms` SMs: enough
/// units to cover the SMs, but at most one per K tile and at most `ceil(sqrt(k_tiles))` — a tile's
/// last unit sums the splits' partial tiles in turn, so past about that many the serial sum costs
/// more than the K tiles the splits take off each unit (a skinny problem, DeepSeek-V3.2's indexer
/// projections of 64 and 128 columns over 7168, took 56 to 112 splits for its 1 or 2 tiles). The
/// rule the cost model assumes (`compiler/src/tune`).
pub fn split_count(tiles: usize, k_tiles: usize, sms: usize) -> usize {
    let k_tiles = k_tiles.max(1);
    let root = (1..=k_tiles).find(|s| s * s >= k_tiles).unwrap_or(k_tiles);
    sms.div_ceil(tiles.max(1)).min(root).clamp(1, k_tiles)
}

/// Problem sizes of a GEMM launch: `m` rows of A (grouped: sorted rows), `n` columns of B per
/// group, `k`, and the groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmProblem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub groups: usize,
}

impl GemmAbi {
    fn grouped(&self) -> bool {
        self.grouping != "dense"
    }

    /// K splits on `sms` SMs ([`split_count`]).
    pub fn splits(&self, p: GemmProblem, sms: usize) -> usize {
        if !self.split_k {
            return 1;
        }
        let tiles = p.m.div_ceil(self.block_m) * p.n.div_ceil(self.block_n);
        split_count(tiles, p.k.div_ceil(self.block_k), sms)
    }

    /// Blocks to launch (the compiler's `GemmConfig::grid` / `grouped_grid`).
    pub fn grid(&self, p: GemmProblem, sms: usize) -> usize {
        if self.grouped() {
            let units = (p.m.div_ceil(self.block_m) + p.groups) * p.n.div_ceil(self.block_n);
            return if self.persistent { units.min(sms).max(1) } else { units.max(1) };
        }
        let cl = self.cluster.max(1);
        let units = p.m.div_ceil(self.block_m).div_ceil(cl) * p.n.div_ceil(self.block_n) * self.splits(p, sms);
        let clusters = if self.persistent { units.min(sms / cl) } else { units };
        clusters.max(1) * cl
    }

    /// The split-K scratch of problem `p`.
    pub fn scratch(&self, p: GemmProblem, sms: usize) -> SplitScratch {
        if !self.split_k {
            return SplitScratch::default();
        }
        let splits = self.splits(p, sms);
        SplitScratch {
            workspace_bytes: splits * p.m * p.n * 4,
            counters: p.m.div_ceil(self.block_m) * p.n.div_ceil(self.block_n),
        }
    }

    /// The launch of this GEMM over `ops`: parameters in the template's order, tensor maps, grid.
    pub fn launch(&self, kernel: &str, ops: &GemmOperands, sms: usize) -> Result<KernelLaunch, String> {
        let fail = |what: String| format!("{kernel}: {what}");
        let in_el = if self.input == "fp8" { "f8E4M3FN" } else { "bf16" };
        let a = ops.a.shape_at_rank(2).map_err(fail)?;
        let b = ops.b.shape_at_rank(2).map_err(fail)?;
        let out = ops.out.shape_at_rank(2).map_err(fail)?;
        for (name, buf) in [("A", ops.a), ("B", ops.b)] {
            if buf.element != in_el {
                return Err(fail(format!("{name} is {}, the kernel reads {in_el}", buf.element)));
            }
        }
        let k = a[1];
        if b[1] != k {
            return Err(fail(format!("A is [{}, {k}] but B is {:?}", a[0], b)));
        }
        let (m, groups) = if self.grouped() {
            let offsets = ops.offsets.ok_or_else(|| fail("a grouped GEMM without offsets".into()))?;
            let groups = offsets.elements().saturating_sub(1);
            // Sorted rows: the gathered GEMM's permutation, else A's rows.
            let m = match (self.grouping.as_str(), ops.perm) {
                ("gather", Some(perm)) => perm.elements(),
                ("gather", None) => return Err(fail("a gathering GEMM without its permutation".into())),
                _ => a[0],
            };
            (m, groups.max(1))
        } else {
            (a[0], 1)
        };
        // The operands the kernel indexes by: what they must be (a plan or lowering that binds
        // another buffer to one of them would have the kernel read or write outside it).
        let expect = |b: Option<&Buf>, what: &str, element: &str, elements: Option<usize>| match b {
            Some(b) if b.element != element || elements.is_some_and(|n| b.elements() != n) => Err(fail(format!(
                "{what} is {:?} {}, the kernel reads {}{element}",
                b.shape,
                b.element,
                elements.map_or(String::new(), |n| format!("{n} "))
            ))),
            _ => Ok(()),
        };
        if self.grouped() {
            expect(ops.offsets, "the group offsets", "i32", Some(groups + 1))?;
            expect(ops.perm, "the permutation", "i32", (self.grouping != "gather").then_some(m))?;
        }
        expect(ops.row_scale.filter(|_| self.row_scale), "the row scale", "f32", Some(m))?;
        if b[0] % groups != 0 {
            return Err(fail(format!("B has {} rows, not a multiple of its {groups} groups", b[0])));
        }
        let n = b[0] / groups;
        let n_out = if self.swiglu { n / 2 } else { n };
        let p = GemmProblem { m, n, k, groups };
        let out_rows = if self.scatter { out[0] } else { m };
        if out != [out_rows, n_out] {
            return Err(fail(format!("the output is {out:?}, expected [{out_rows}, {n_out}]")));
        }
        let residual = ops.residual.filter(|_| self.residual);
        expect(residual, "the residual", &ops.out.element, Some(ops.out.elements()))?;
        let mut maps = vec![
            TensorMapSpec::new(ops.a.addr, [a[0], k], in_el, [self.a_box_rows, self.block_k]),
            TensorMapSpec::new(ops.b.addr, [b[0], k], in_el, [self.b_box_rows, self.block_k]),
        ];
        match (self.dual_a, ops.a2) {
            (true, Some(a2)) => {
                if a2.element != in_el || a2.shape_at_rank(2).map_err(fail)? != a {
                    return Err(fail(format!("the second A is {:?} {}, A is {a:?} {in_el}", a2.shape, a2.element)));
                }
                maps.push(TensorMapSpec::new(a2.addr, [a[0], k], in_el, [self.a_box_rows, self.block_k]));
            }
            (true, None) => return Err(fail("a dual-A GEMM without its second A".into())),
            (false, _) => {}
        }
        for t in &maps {
            t.check().map_err(fail)?;
        }
        let mut params: Vec<Param> = (0..maps.len()).map(Param::TensorMap).collect();
        memref_into(&mut params, ops.out, 2).map_err(fail)?;
        if self.output == "fp8" {
            return Err(fail("fp8 outputs (with their scales) are not launched by the runtime yet".into()));
        }
        if self.input == "fp8" {
            let a_scale = ops.a_scale.ok_or_else(|| fail("an fp8 GEMM without A's scales".into()))?;
            let b_scale = ops.b_scale.ok_or_else(|| fail("an fp8 GEMM without B's scales".into()))?;
            memref_into(&mut params, a_scale, 2).map_err(fail)?;
            memref_into(&mut params, b_scale, 2).map_err(fail)?;
        }
        fn need<'b>(b: Option<&'b Buf>, kernel: &str, what: &str) -> Result<&'b Buf, String> {
            b.ok_or_else(|| format!("{kernel}: no {what} operand"))
        }
        match self.grouping.as_str() {
            "dense" => {}
            "contiguous" => {
                memref_into(&mut params, need(ops.offsets, kernel, "offsets")?, 1).map_err(fail)?;
                if self.scatter {
                    memref_into(&mut params, need(ops.perm, kernel, "permutation")?, 1).map_err(fail)?;
                }
            }
            "gather" => {
                memref_into(&mut params, need(ops.offsets, kernel, "offsets")?, 1).map_err(fail)?;
                memref_into(&mut params, need(ops.perm, kernel, "permutation")?, 1).map_err(fail)?;
            }
            other => return Err(fail(format!("{other} grouping is not launched by the runtime yet"))),
        }
        if self.k_range {
            let range = need(ops.k_range, kernel, "K range")?;
            if range.elements() != 2 || range.element != "i32" {
                return Err(fail(format!("a K range of {:?} {} (two i32 wanted)", range.shape, range.element)));
            }
            memref_into(&mut params, range, 1).map_err(fail)?;
        }
        if self.row_scale {
            memref_into(&mut params, need(ops.row_scale, kernel, "row scale")?, 1).map_err(fail)?;
        }
        if self.residual {
            memref_into(&mut params, need(ops.residual, kernel, "residual")?, 2).map_err(fail)?;
        }
        if self.split_k {
            let splits = self.splits(p, sms);
            let s = self.scratch(p, sms);
            let ws = Buf {
                addr: ops.workspace.ok_or_else(|| fail("no split-K workspace".into()))?,
                shape: vec![splits, m, n_out],
                element: "f32".into(),
            };
            let counters = Buf {
                addr: ops.counters.ok_or_else(|| fail("no split-K counters".into()))?,
                shape: vec![s.counters],
                element: "i32".into(),
            };
            memref_into(&mut params, &ws, 3).map_err(fail)?;
            memref_into(&mut params, &counters, 1).map_err(fail)?;
            params.push(Param::Value(splits as u64));
        }
        params.push(Param::Value(k as u64));
        let operands = [
            Some(ops.a),
            ops.a2.filter(|_| self.dual_a),
            ops.a_scale,
            Some(ops.b),
            ops.b_scale,
            ops.residual,
            ops.offsets,
            ops.perm,
            ops.row_scale,
            ops.k_range,
            Some(ops.out),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(KernelLaunch {
            kernel: kernel.to_string(),
            grid: self.grid(p, sms),
            grid_y: 1,
            params,
            tensor_maps: maps,
            operands,
        })
    }
}

/// The parameters an sm_90a PTX entry declares, or why one is neither 8 bytes nor an f32 (which
/// the runtime passes as the low half of its 8-byte slot): how the tests hold the runtime's
/// parameter lists against what the compiler emitted.
pub fn ptx_entry_params(ptx: &str, kernel: &str) -> Result<usize, String> {
    let start = ptx.find(&format!(".entry {kernel}(")).ok_or_else(|| format!("{kernel}: no .entry in the PTX"))?;
    let rest = &ptx[start..];
    let end = rest.find(')').ok_or_else(|| format!("{kernel}: unterminated parameter list"))?;
    let mut count = 0;
    for line in rest[..end].lines().filter(|l| l.contains(".param")) {
        if !(line.contains(".u64") || line.contains(".b64") || line.contains(".s64") || line.contains(".f32")) {
            return Err(format!("{kernel}: a parameter that is neither 8 bytes nor f32: {}", line.trim()));
        }
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, shape: &[usize], element: &'static str) -> Buf {
        Buf { addr, shape: shape.to_vec(), element }
    }

    #[test]
    fn memrefs_collapse_leading_dims() {
        let b = buf(0x1000, &[3, 9, 16], "f32");
        assert_eq!(b.shape_at_rank(2).unwrap(), vec![27, 16]);
        assert_eq!(b.shape_at_rank(3).unwrap(), vec![3, 9, 16]);
        assert!(b.shape_at_rank(4).unwrap_err().contains("cannot be seen as rank 4"));
        let p: Vec<u64> = memref(&b, 2)
            .unwrap()
            .into_iter()
            .map(|p| match p {
                Param::Value(v) => v,
                Param::TensorMap(_) => unreachable!(),
            })
            .collect();
        assert_eq!(p, vec![0x1000, 0x1000, 0, 27, 16, 16, 1]);
    }

    fn abi(name_opts: &[&str]) -> GemmAbi {
        GemmAbi {
            input: "fp8".into(),
            output: "f32".into(),
            block_m: 128,
            block_n: 64,
            block_k: 128,
            cluster: 1,
            persistent: name_opts.contains(&"persist"),
            split_k: name_opts.contains(&"splitk"),
            residual: name_opts.contains(&"res"),
            grouping: ["contiguous", "gather"].iter().find(|g| name_opts.contains(g)).unwrap_or(&"dense").to_string(),
            swiglu: false,
            row_scale: name_opts.contains(&"rowscale"),
            scatter: name_opts.contains(&"scatter"),
            a_box_rows: if name_opts.contains(&"gather") { 1 } else { 128 },
            b_box_rows: 64,
            b_row_scales: name_opts.contains(&"b1x128"),
            k_range: name_opts.contains(&"krange"),
            dual_a: false,
        }
    }

    /// Conventions no template emits are refused by name (before, a GEMM's block_m of 0 divided
    /// by zero when its grid was computed).
    #[test]
    fn kernel_conventions_are_checked() {
        assert_eq!(KernelAbi::Gemm(abi(&["gather", "splitk"])).check(), Ok(()));
        let zero = KernelAbi::Gemm(GemmAbi { block_m: 0, ..abi(&[]) });
        assert_eq!(zero.check(), Err("a GEMM's block_m of 0".to_string()));
        let odd = KernelAbi::Gemm(GemmAbi { grouping: "sorted".into(), ..abi(&[]) });
        assert_eq!(odd.check(), Err("a GEMM of fp8 -> f32, sorted grouping".to_string()));
        let decode = |kv, rope| {
            KernelAbi::MlaDecode(MlaDecodeAbi { kv, rope, fp8_cache: false, selected: false, bf16_rows: false }).check()
        };
        assert_eq!(decode(512, 64), Ok(()));
        assert_eq!(
            decode(96, 64),
            Err("decode attention with a latent width of 96 (a positive multiple of 128)".into())
        );
        assert!(decode(512, 0).unwrap_err().contains("a rope width of 0"));
        let both =
            KernelAbi::MlaDecode(MlaDecodeAbi { kv: 512, rope: 64, fp8_cache: true, selected: true, bf16_rows: false })
                .check();
        assert!(both.unwrap_err().contains("both the selected rows and the fp8 cache"));
        let paged16 = MlaDecodeAbi { kv: 512, rope: 64, fp8_cache: false, selected: false, bf16_rows: true };
        assert!(KernelAbi::MlaDecode(paged16).check().unwrap_err().contains("bf16 rows without the selected rows"));
        let flash = |qk, v| KernelAbi::MlaPrefill(MlaPrefillAbi { qk, v, kind: FlashKind::GradK }).check();
        assert_eq!(flash(192, 128), Ok(()));
        assert!(flash(192, 0).unwrap_err().contains("flash attention with a value width of 0"));
    }

    /// An fp8 GEMM's operands: A, B, their scales and the output, nothing else.
    fn fp8_operands<'a>(a: &'a Buf, s: &'a Buf, b: &'a Buf, bs: &'a Buf, out: &'a Buf) -> GemmOperands<'a> {
        GemmOperands {
            a,
            a2: None,
            a_scale: Some(s),
            b,
            b_scale: Some(bs),
            out,
            residual: None,
            offsets: None,
            perm: None,
            row_scale: None,
            k_range: None,
            workspace: None,
            counters: None,
        }
    }

    #[test]
    fn a_k_range_is_passed_after_the_scales() {
        let g = abi(&["b1x128", "krange"]);
        // One expert's Wgrad: dW [320, 256] over pairs laid out per expert (K = 512 padded pairs).
        let (a, s) = (buf(0x10000, &[320, 512], "f8E4M3FN"), buf(0x20000, &[320, 4], "f32"));
        let (b, bs) = (buf(0x30000, &[256, 512], "f8E4M3FN"), buf(0x40000, &[256, 4], "f32"));
        let (out, range) = (buf(0x50000, &[320, 256], "f32"), buf(0x60000, &[2, 1], "i32"));
        let ops = GemmOperands { k_range: Some(&range), ..fp8_operands(&a, &s, &b, &bs, &out) };
        let l = g.launch("k", &ops, 132).unwrap();
        // maps, out, a_scale, b_scale (7 each), the range (5), k.
        assert_eq!(l.params.len(), 2 + 7 * 3 + 5 + 1);
        assert_eq!(l.params[2 + 7 * 3..2 + 7 * 3 + 4], [0x60000, 0x60000, 0, 2].map(Param::Value));
        assert_eq!(*l.params.last().unwrap(), Param::Value(512));
        let three = buf(0x60000, &[3], "i32");
        let bad = GemmOperands { k_range: Some(&three), ..ops.clone() };
        assert!(g.launch("k", &bad, 132).unwrap_err().contains("a K range of [3] i32"));
        let none = GemmOperands { k_range: None, ..ops };
        assert!(g.launch("k", &none, 132).unwrap_err().contains("no K range operand"));
    }

    /// A dual-A GEMM: the second A's tensor map follows B's, of A's shape and type; without it, or
    /// with another shape, the launch is refused.
    #[test]
    fn a_second_a_is_a_third_tensor_map() {
        let g = GemmAbi { input: "bf16".into(), dual_a: true, block_k: 64, ..abi(&["res"]) };
        let (hi, lo) = (buf(0x10000, &[3, 256], "bf16"), buf(0x20000, &[3, 256], "bf16"));
        let (b, out) = (buf(0x30000, &[320, 256], "bf16"), buf(0x50000, &[3, 320], "f32"));
        // (A bf16 GEMM reads no scales: none passed.)
        let ops = GemmOperands {
            a2: Some(&lo),
            a_scale: None,
            b_scale: None,
            residual: Some(&out),
            ..fp8_operands(&hi, &hi, &b, &b, &out)
        };
        let l = g.launch("k", &ops, 132).unwrap();
        // maps (3), out (7), residual (7), k.
        assert_eq!(l.params[..3], [Param::TensorMap(0), Param::TensorMap(1), Param::TensorMap(2)]);
        assert_eq!(l.params.len(), 3 + 7 * 2 + 1);
        assert_eq!((l.tensor_maps[2].addr, l.tensor_maps[2].rows, l.tensor_maps[2].cols), (0x20000, 3, 256));
        assert_eq!(l.operands[1], lo);
        let short = buf(0x20000, &[2, 256], "bf16");
        let bad = GemmOperands { a2: Some(&short), ..ops.clone() };
        assert!(g.launch("k", &bad, 132).unwrap_err().contains("the second A is [2, 256] bf16, A is [3, 256] bf16"));
        let none = GemmOperands { a2: None, ..ops };
        assert!(g.launch("k", &none, 132).unwrap_err().contains("without its second A"));
        let fp8 = KernelAbi::Gemm(GemmAbi { dual_a: true, ..abi(&[]) });
        assert!(fp8.check().unwrap_err().contains("a dual-A GEMM of fp8 inputs"));
    }

    #[test]
    fn dense_split_k_gemm_parameters_follow_the_template_order() {
        let g = abi(&["splitk", "res"]);
        let (a, s) = (buf(0x10000, &[3, 256], "f8E4M3FN"), buf(0x20000, &[3, 2], "f32"));
        let (b, bs) = (buf(0x30000, &[320, 256], "f8E4M3FN"), buf(0x40000, &[3, 2], "f32"));
        let (out, res) = (buf(0x50000, &[3, 320], "f32"), buf(0x60000, &[3, 320], "f32"));
        let ops = GemmOperands {
            residual: Some(&res),
            workspace: Some(0x70000),
            counters: Some(0x80000),
            ..fp8_operands(&a, &s, &b, &bs, &out)
        };
        let l = g.launch("k", &ops, 132).unwrap();
        // maps, out (7), a_scale (7), b_scale (7), residual (7), ws (9), counters (5), splits, k.
        assert_eq!(l.params.len(), 2 + 7 * 4 + 9 + 5 + 2);
        // 1 x 5 tiles; 132 SMs want 27 splits, K has 2 tiles.
        assert_eq!(g.splits(GemmProblem { m: 3, n: 320, k: 256, groups: 1 }, 132), 2);
        // 1 x 2 tiles over 56 K tiles: 66 splits would cover the SMs, 8 (the root) are taken;
        // 33 tiles (DeepSeek-V3's decode q_a/kv_a) take the 4 that cover them.
        assert_eq!(g.splits(GemmProblem { m: 64, n: 128, k: 7168, groups: 1 }, 132), 8);
        assert_eq!(g.splits(GemmProblem { m: 64, n: 2112, k: 7168, groups: 1 }, 132), 4);
        assert_eq!((split_count(1, 1, 132), split_count(1, 0, 132), split_count(200, 9, 132)), (1, 1, 1));
        assert_eq!(l.grid, 10);
        assert_eq!(*l.params.last().unwrap(), Param::Value(256));
        assert_eq!(l.tensor_maps[1].rows, 320);
        let wrong = buf(0x50000, &[3, 300], "f32");
        let bad = GemmOperands { out: &wrong, ..ops.clone() };
        assert!(g.launch("k", &bad, 132).unwrap_err().contains("expected [3, 320]"));
        let misaligned = buf(0x30008, &[320, 256], "f8E4M3FN");
        let bad = GemmOperands { b: &misaligned, ..ops };
        assert!(g.launch("k", &bad, 132).unwrap_err().contains("not 16-byte aligned"));
    }

    #[test]
    fn grouped_gemms_count_sorted_rows_and_groups() {
        let g = abi(&["persist", "gather"]);
        let a = buf(0x10000, &[5, 256], "f8E4M3FN");
        let s = buf(0x20000, &[5, 2], "f32");
        // 8 routed experts + 1 shared, gate and up: 256 rows each.
        let b = buf(0x30000, &[9 * 256, 256], "f8E4M3FN");
        let bs = buf(0x40000, &[18, 2], "f32");
        let offsets = buf(0x50000, &[10], "i32");
        let perm = buf(0x60000, &[20], "i32");
        let out = buf(0x70000, &[20, 256], "f32");
        let ops = GemmOperands { offsets: Some(&offsets), perm: Some(&perm), ..fp8_operands(&a, &s, &b, &bs, &out) };
        let l = g.launch("k", &ops, 132).unwrap();
        assert_eq!(l.params.len(), 2 + 7 * 3 + 5 * 2 + 1);
        // (ceil(20 / 128) + 9 groups) x 4 column tiles, under the 132 SMs.
        assert_eq!(l.grid, 40);
        assert_eq!(l.tensor_maps[0].box_rows, 1);
    }

    #[test]
    fn ptx_parameter_lists_are_counted() {
        let ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{";
        assert_eq!(ptx_entry_params(ptx, "k"), Ok(2));
        let odd = ".visible .entry k(\n\t.param .u32 k_param_0\n)\n{";
        assert!(ptx_entry_params(odd, "k").unwrap_err().contains("neither 8 bytes nor f32"));
        assert!(ptx_entry_params(ptx, "j").is_err());
        let scale = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .f32 k_param_1\n)\n{";
        assert_eq!(ptx_entry_params(scale, "k"), Ok(2));
    }

    /// Decode attention: q's and the pool's tensor maps, the table, lengths, split outputs and lse
    /// as memrefs, rows per sequence, heads, the scale's bits; `B ceil(R / 64)` x splits blocks.
    #[test]
    fn decode_attention_launches_over_pages_and_splits() {
        let a = MlaDecodeAbi { kv: 512, rope: 64, fp8_cache: false, selected: false, bf16_rows: false };
        let (b, heads, splits, pages) = (3, 128, 4, 10);
        let q = buf(0x1000, &[b * heads, 576], "bf16");
        let cache = buf(0x2000, &[b * pages, 64, 576], "bf16");
        let table = buf(0x3000, &[b, pages], "i32");
        let seqlens = buf(0x4000, &[b], "i32");
        let o_part = buf(0x5000, &[splits, b * heads, 512], "f32");
        let lse = buf(0x6000, &[splits, b * heads], "f32");
        let l = a.launch("mla", [&q, &cache, &table, &seqlens, &o_part, &lse], heads, 0.25).unwrap();
        assert_eq!((l.grid, l.grid_y), (b * 2, splits));
        assert_eq!(l.params.len(), 2 + 7 + 5 + 9 + 7 + 3);
        assert_eq!((l.tensor_maps[1].rows, l.tensor_maps[1].cols), (b * pages * 64, 576));
        let tail: Vec<Param> = l.params[l.params.len() - 3..].to_vec();
        assert_eq!(tail, [Param::Value(128), Param::Value(128), Param::Value(u64::from(0.25f32.to_bits()))]);
        // An lse of other splits than the outputs', an f32 cache: refused.
        let bad_lse = buf(0x6000, &[splits + 1, b * heads], "f32");
        assert!(a.launch("mla", [&q, &cache, &table, &seqlens, &o_part, &bad_lse], heads, 0.25).is_err());
        let f32_cache = buf(0x2000, &[b * pages, 64, 576], "f32");
        assert!(a.launch("mla", [&q, &f32_cache, &table, &seqlens, &o_part, &lse], heads, 0.25).is_err());
        // Caches per sequence rather than a pool of pages: refused.
        let contiguous = buf(0x2000, &[b, pages * 64, 576], "bf16");
        let err = a.launch("mla", [&q, &contiguous, &table, &seqlens, &o_part, &lse], heads, 0.25).unwrap_err();
        assert!(err.contains("a pool of pages of 64 rows"), "{err}");
    }

    /// The attention over selected rows: q's tensor map alone, the keys (prefill's rows `[S, C]`, or
    /// decode's caches `[T, S, C]`: each query's own S rows, passed last), selection, split outputs
    /// and lse as memrefs; `T ceil(H / 64)` x splits blocks. Keys of bf16 (f32 for `_sel16`), rows
    /// not 16-byte multiples, fewer caches than queries, the fp8 cache: refused.
    #[test]
    fn the_selected_rows_attention_launches_over_key_rows() {
        let a = MlaDecodeAbi { kv: 512, rope: 64, fp8_cache: false, selected: true, bf16_rows: false };
        let (t, heads, splits, s, k) = (3, 128, 2, 300, 2048);
        let q = buf(0x1000, &[t * heads, 576], "bf16");
        let selected = buf(0x3000, &[t, k], "i32");
        let o_part = buf(0x5000, &[splits, t * heads, 512], "f32");
        let lse = buf(0x6000, &[splits, t * heads], "f32");
        for (shape, seq_rows) in [(vec![s, 704], 0), (vec![t, s, 704], s)] {
            let keys = buf(0x2000, &shape, "f32");
            let l = a.launch_selected("mla", [&q, &keys, &selected, &o_part, &lse], heads, 0.25).unwrap();
            assert_eq!((l.grid, l.grid_y, l.tensor_maps.len()), (t * 2, splits, 1));
            assert_eq!(l.params.len(), 1 + 7 + 7 + 9 + 7 + 4);
            // The keys seen as rows: [T S, C] for decode's caches.
            assert_eq!(
                l.params[4..6],
                [Param::Value((shape[0] * shape.get(2).map_or(1, |_| s)) as u64), Param::Value(704)]
            );
            assert_eq!(l.params[l.params.len() - 1], Param::Value(seq_rows as u64));
        }
        for (keys, element) in [(vec![s, 704], "bf16"), (vec![s, 702], "f32"), (vec![t - 1, s, 704], "f32")] {
            let keys = buf(0x2000, &keys, element);
            assert!(a.launch_selected("mla", [&q, &keys, &selected, &o_part, &lse], heads, 0.25).is_err(), "{keys:?}");
        }
        let fp8 = MlaDecodeAbi { fp8_cache: true, ..a };
        let keys = buf(0x2000, &[s, 704], "f32");
        assert!(fp8.launch_selected("mla", [&q, &keys, &selected, &o_part, &lse], heads, 0.25).is_err());
        // `_sel16`: bf16 rows, 8 columns to 16 bytes; f32 rows refused.
        let rows16 = MlaDecodeAbi { bf16_rows: true, ..a };
        let keys = buf(0x2000, &[s, 576], "bf16");
        let l = rows16.launch_selected("mla", [&q, &keys, &selected, &o_part, &lse], heads, 0.25).unwrap();
        assert_eq!(l.params[4..6], [Param::Value(s as u64), Param::Value(576)]);
        for (cols, element) in [(576, "f32"), (580, "bf16")] {
            let keys = buf(0x2000, &[s, cols], element);
            let refused = rows16.launch_selected("mla", [&q, &keys, &selected, &o_part, &lse], heads, 0.25);
            assert!(refused.is_err(), "{cols} {element}");
        }
    }

    /// The fp8 cache: one buffer of 656-byte rows seen as the latent's and the RoPE key's tensor
    /// maps (the row's pitch) and the scales' memref (rows 164 floats apart); a bf16 cache refused.
    #[test]
    fn fp8_decode_attention_reads_one_buffer_of_packed_rows() {
        let a = MlaDecodeAbi { kv: 512, rope: 64, fp8_cache: true, selected: false, bf16_rows: false };
        let (b, heads, splits, pages) = (2, 16, 3, 4);
        let q = buf(0x1000, &[b * heads, 576], "bf16");
        let cache = buf(0x20000, &[b * pages, 64, 656], "i8");
        let table = buf(0x3000, &[b, pages], "i32");
        let seqlens = buf(0x4000, &[b], "i32");
        let o_part = buf(0x5000, &[splits, b * heads, 512], "f32");
        let lse = buf(0x6000, &[splits, b * heads], "f32");
        let l = a.launch("mla_fp8", [&q, &cache, &table, &seqlens, &o_part, &lse], heads, 0.5).unwrap();
        let rows = b * pages * 64;
        let m = &l.tensor_maps;
        assert_eq!((m[1].addr, m[1].rows, m[1].cols, m[1].pitch, m[1].swizzle), (0x20000, rows, 512, 656, false));
        assert_eq!((m[1].box_rows, m[1].box_cols, m[1].element), (64, 128, "i8"));
        assert_eq!((m[2].addr, m[2].rows, m[2].cols, m[2].pitch, m[2].swizzle), (0x20000 + 528, rows, 64, 656, true));
        let scales: Vec<Param> = [0x20000, 0x20000 + 512, 0, rows, 4, 164, 1].map(|v| Param::Value(v as u64)).to_vec();
        assert_eq!(&l.params[..4], &[Param::TensorMap(0), Param::TensorMap(1), Param::TensorMap(2), scales[0]]);
        assert_eq!(&l.params[3..10], &scales[..]);
        assert_eq!(l.params.len(), 3 + 7 + 7 + 5 + 9 + 7 + 3);
        let bf16_cache = buf(0x20000, &[b * pages, 64, 576], "bf16");
        assert!(a.launch("mla_fp8", [&q, &bf16_cache, &table, &seqlens, &o_part, &lse], heads, 0.5).is_err());
    }

    /// Prefill attention: three tensor maps (64 x 64 bf16 boxes), out's memref, T, S and the
    /// scale's bits; ceil(T / 128) x heads blocks; shapes that are not the heads' refused.
    #[test]
    fn prefill_attention_launches_from_head_major_buffers() {
        let a = MlaPrefillAbi { qk: 192, v: 128, kind: FlashKind::Forward };
        let (heads, t, s) = (3, 200, 260);
        let (q, k, v) = (
            buf(0x1000, &[heads * t, 192], "bf16"),
            buf(0x2000, &[heads * s, 192], "bf16"),
            buf(0x3000, &[heads * s, 128], "bf16"),
        );
        let out = buf(0x4000, &[heads * t, 128], "f32");
        let l = a.launch("mla", &[&q, &k, &v, &out], heads, 0.5).unwrap();
        assert_eq!(l.grid, 2 * heads);
        assert_eq!(l.tensor_maps.len(), 3);
        assert_eq!((l.tensor_maps[2].rows, l.tensor_maps[2].cols, l.tensor_maps[2].box_rows), (heads * s, 128, 64));
        let tail: Vec<Param> = l.params[l.params.len() - 3..].to_vec();
        assert_eq!(tail, [Param::Value(200), Param::Value(260), Param::Value(u64::from(0.5f32.to_bits()))]);
        assert_eq!(l.params.len(), 3 + 7 + 3);
        let err = a.launch("mla", &[&q, &k, &v, &out], 7, 0.5).unwrap_err();
        assert!(err.contains("are not 7 heads"), "{err}");
        let wide = buf(0x4000, &[heads * t, 192], "f32");
        assert!(a.launch("mla", &[&q, &k, &v, &wide], heads, 0.5).is_err());
        let f32_keys = buf(0x2000, &[heads * s, 192], "f32");
        assert!(a.launch("mla", &[&q, &f32_keys, &v, &out], heads, 0.5).unwrap_err().contains("k is f32"));
        // More queries than keys: not a causal continuation.
        let long = buf(0x1000, &[heads * (s + 1), 192], "bf16");
        let out_long = buf(0x4000, &[heads * (s + 1), 128], "f32");
        assert!(a.launch("mla", &[&long, &k, &v, &out_long], heads, 0.5).is_err());
    }

    /// Training's flash kernels: `_lse` with its statistics' memref after out's; the gradients
    /// with four tensor maps (dout the fourth), lse's and D's memrefs, then the gradient's; dK and
    /// dV gridded over the keys. Wrong shapes and operand counts refused by name.
    #[test]
    fn training_flash_kernels_launch_with_their_statistics() {
        let (heads, t, s) = (2, 130, 130);
        let (q, k, v, dout) = (
            buf(0x1000, &[heads * t, 192], "bf16"),
            buf(0x2000, &[heads * s, 192], "bf16"),
            buf(0x3000, &[heads * s, 128], "bf16"),
            buf(0x5000, &[heads * t, 128], "bf16"),
        );
        let (out, lse, dd) = (
            buf(0x4000, &[heads * t, 128], "f32"),
            buf(0x6000, &[heads * t, 1], "f32"),
            buf(0x7000, &[heads * t], "f32"),
        );
        let kind = |kind| MlaPrefillAbi { qk: 192, v: 128, kind };
        let l = kind(FlashKind::Lse).launch("lse", &[&q, &k, &v, &out, &lse], heads, 0.5).unwrap();
        assert_eq!((l.tensor_maps.len(), l.params.len(), l.grid), (3, 3 + 7 + 5 + 3, 2 * heads));
        assert_eq!(l.params[3 + 7 + 1], Param::Value(0x6000));
        for (k_, width, rows, grid) in [
            (FlashKind::GradQ, 192, heads * t, 2 * heads),
            (FlashKind::GradK, 192, heads * s, 2 * heads),
            (FlashKind::GradV, 128, heads * s, 2 * heads),
        ] {
            let g = buf(0x8000, &[rows, width], "f32");
            let l = kind(k_).launch("grad", &[&q, &k, &v, &dout, &lse, &dd, &g], heads, 0.5).unwrap();
            assert_eq!((l.tensor_maps.len(), l.params.len(), l.grid), (4, 4 + 5 + 5 + 7 + 3, grid));
            assert_eq!(
                (l.params[4 + 1], l.params[4 + 5 + 1], l.params[4 + 10 + 1]),
                (Param::Value(0x6000), Param::Value(0x7000), Param::Value(0x8000))
            );
            let wrong = buf(0x8000, &[rows, width + 64], "f32");
            assert!(kind(k_).launch("grad", &[&q, &k, &v, &dout, &lse, &dd, &wrong], heads, 0.5).is_err());
        }
        // More keys than queries: dK's blocks cover the keys.
        let k_long = buf(0x2000, &[heads * 300, 192], "bf16");
        let v_long = buf(0x3000, &[heads * 300, 128], "bf16");
        let dk = buf(0x8000, &[heads * 300, 192], "f32");
        let l = kind(FlashKind::GradK).launch("dk", &[&q, &k_long, &v_long, &dout, &lse, &dd, &dk], heads, 0.5);
        assert_eq!(l.unwrap().grid, 3 * heads);
        let err = kind(FlashKind::GradQ).launch("dq", &[&q, &k, &v, &out], heads, 0.5).unwrap_err();
        assert!(err.contains("4 operands (q, k, v, dout, lse, D, out)"), "{err}");
        let short = buf(0x7000, &[heads * t - 1], "f32");
        let dq = buf(0x8000, &[heads * t, 192], "f32");
        assert!(kind(FlashKind::GradQ).launch("dq", &[&q, &k, &v, &dout, &lse, &short, &dq], heads, 0.5).is_err());
    }
}
