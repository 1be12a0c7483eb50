//! MLA decode's products with kv_b on the tensor cores, as row kernels (static shared memory, the
//! threads staging both operands as bf16 — e4m3 weights convert exactly —, no TMA): the absorbed
//! queries ([`Absorb`]) and the heads' up-projection with its 1x128 quantization ([`UpV`]).
//!
//! The absorbed queries ([`super::RowOp::MlaAbsorbMma`]): `q[b H + h]
//! = bf16([s * (bf16(q_nope[b, h]) W_UK_h) | q_pe[b, h]])`, a block per (64 tokens, head, 128
//! latent columns; 64 where the latent is an odd number of 64-column chunks). The CUDA-core row
//! ([`super::RowOp::MlaAbsorb`]) spends `nope` FMAs per output on 128 threads; here one
//! warpgroup's `wgmma m64n64k16` chain does a chunk's 64 x 64 outputs.
//!
//! The block stages, in 128-byte-swizzled shared memory (1024-byte aligned inside one static array):
//! - A, once: its 64 tokens' `q_nope` rows of head h rounded to bf16, K-major, `nope / 64` chunks
//!   of 64 rows x 128 B (rows past the batch are left as they are: a row of A makes only its own
//!   row of outputs, and those are not stored);
//! - B, per chunk: the head's nope rows of kv_b at the chunk's 64 columns, `W_UK_h[k, n .. n +
//!   64]`, as bf16 — e4m3 decoded exactly (every e4m3 value is a bf16), the 128 x 128 block's
//!   scale left out — read as they lie: MN-major (`nope` rows of 64 columns, 128 B each; the
//!   transposed B), the next chunk's words loaded into registers before this one is staged;
//!
//! then per chunk multiplies (f32 accumulators) and stores each output times the chunk's one scale
//! (the head's nope rows and the 64 columns lie in one 128 x 128 block: `(nope + v) % 128 == 0`,
//! `nope <= 128`), rounded to bf16. The blocks of the first columns also copy the rope query.
//!
//! Numerics differ from the CUDA-core row's (which multiplies the f32 query by each scaled weight):
//! the query is rounded to bf16 first and the scale applied to the sum. The CPU lowering computes
//! exactly that (each output one sequential f32 sum over k, as `ptxsim` runs wgmma), so the two
//! lowerings agree but for the tensor cores' own accumulation order on the device.

use std::fmt::Write;

use super::{amax_step, decode_e4m3, group_scale, round_bf16, Lowering, BF16_CONSTANTS};
use crate::conversion::sm90::gemm::{fragment_coordinates, fragment_offset};

/// Tokens (the wgmma M) and latent columns (N) a block takes.
pub const TILE: usize = 64;
/// Bytes of one swizzled 64-column bf16 chunk row, and of the swizzle pattern's 8 rows.
pub(super) const ROW_BYTES: usize = 128;
pub(super) const PATTERN_BYTES: usize = 8 * ROW_BYTES;

/// The shape a block's operands take: `nope` rows of the head (the K of the product).
#[derive(Debug, Clone, Copy)]
pub struct Absorb {
    pub nope: usize,
    pub rope: usize,
    /// bf16 kv_b (the f32 graph's), else e4m3 with 128 x 128 block scales.
    pub bf16_weight: bool,
}

impl Absorb {
    fn a_bytes(&self) -> usize {
        TILE * self.nope * 2
    }

    fn b_bytes(&self) -> usize {
        self.nope * TILE * 2
    }

    /// The one shared array (f32 words): A, B and the slack that aligns them to 1024 bytes.
    pub fn shared(&self) -> Vec<(&'static str, usize)> {
        vec![("sh_mma", (self.a_bytes() + self.b_bytes() + PATTERN_BYTES) / 4)]
    }

    /// Why a head of these widths cannot take this kernel, if it cannot.
    pub fn check(&self, v: usize, d: usize) -> Result<(), String> {
        if !(self.nope == 64 || self.nope == 128) {
            return Err(format!("nope heads of {} (64 or 128: 64-column chunks, within one 128-row block)", self.nope));
        }
        if !(self.nope + v).is_multiple_of(128) {
            return Err(format!("nope + v heads of {} (whole 128-row blocks of kv_b)", self.nope + v));
        }
        if d == 0 || !d.is_multiple_of(TILE) {
            return Err(format!("a latent of {d} columns (a multiple of {TILE})"));
        }
        if !self.rope.is_multiple_of(2) {
            return Err(format!("rope heads of {} (even: the outputs stored as bf16 pairs)", self.rope));
        }
        Ok(())
    }

    /// Latent columns a block takes: two 64-column chunks where the latent has an even number of
    /// them (A staged once for both; DeepSeek-V3's 512: 4 blocks a head and 64 tokens), else one.
    pub fn columns(d: usize) -> usize {
        if d.is_multiple_of(2 * TILE) {
            2 * TILE
        } else {
            TILE
        }
    }

    /// The block's tokens `%b0 ..` (of `%n_b`), head `%h` (its kv_b rows from `%head_row`) and
    /// columns `%n0 ..` (`%mm_cols` of them): blocks run the columns of a head, then its heads,
    /// then the token tiles.
    pub fn prologue(&self, d: usize) -> String {
        format!(
            "%mm_nb = arith.constant {nb} : index
%mm_cols = arith.constant {cols} : index
%mm_per_tile = arith.muli %cH, %mm_nb : index
%tile = arith.divui %row, %mm_per_tile : index
%mm_rest = arith.remui %row, %mm_per_tile : index
%h = arith.divui %mm_rest, %mm_nb : index
%mm_col_block = arith.remui %mm_rest, %mm_nb : index
%mm_tile = arith.constant {TILE} : index
%b0 = arith.muli %tile, %mm_tile : index
%n0 = arith.muli %mm_col_block, %mm_cols : index
%n_b = memref.dim %q_nope, %c0 : memref<?x?x?xf32>
%head_row = arith.muli %h, %cPerHead : index
",
            nb = d / Self::columns(d),
            cols = Self::columns(d)
        )
    }

    /// The output scale `%mm_s` of latent column `col` (1 for bf16 weights): its 128 x 128 block's,
    /// one for the head's nope rows.
    fn scale(&self, col: &str) -> String {
        if self.bf16_weight {
            return "%mm_s = arith.constant 1.0 : f32\n".into();
        }
        format!(
            "%mm_rb = arith.divui %head_row, %c128 : index
%mm_cb = arith.divui {col}, %c128 : index
%mm_s = memref.load %kv_b_scale[%mm_rb, %mm_cb] : memref<?x?xf32>
"
        )
    }

    /// Token `%t` of the block (`%bt`, `%tok_in`: within the batch) and its query value `k` of
    /// head h rounded to bf16: `%{out}` (bf16), `%{out}_f` (as f32), `%{out}_top` (its bits, i32).
    fn query(&self, k: &str, out: &str) -> String {
        format!(
            "{out}_raw = memref.load %q_nope[%bt_safe, %h, {k}] : memref<?x?x?xf32>
{out}_x = arith.select %tok_in, {out}_raw, %zero : f32
{}",
            round_bf16(&format!("{out}_x"), out)
        )
    }

    /// The phases: on the GPU, A staged (and the rope query copied), then per 64-column chunk B
    /// staged, the products and the stores; on the CPU each output's sum in order over k, then the
    /// rope query.
    pub fn phases(&self, d: usize, lowering: Lowering, sh_mma: &str) -> Vec<String> {
        let rope = format!(
            "%mm_first = arith.cmpi eq, %n0, %c0 : index
scf.if %mm_first {{
  %mm_rope_all = arith.constant {all} : index
  scf.for %i = %tid to %mm_rope_all step %cT {{
    %t = arith.divui %i, %cRope : index
    %r = arith.remui %i, %cRope : index
    %bt = arith.addi %b0, %t : index
    %tok_in = arith.cmpi ult, %bt, %n_b : index
    scf.if %tok_in {{
      %pe = memref.load %q_pe[%bt, %h, %r] : memref<?x?x?xf32>
{round}      %qrow0 = arith.muli %bt, %cH : index
      %qrow = arith.addi %qrow0, %h : index
      %col = arith.addi %cD, %r : index
      memref.store %pb, %qa[%qrow, %col] : memref<?x?xbf16>
    }}
  }}
}}
",
            all = TILE * self.rope,
            round = round_bf16("%pe", "%pb"),
        );
        if lowering == Lowering::Cpu {
            let weight = weight(self.bf16_weight, "%wrow", "%wcol", "%w", lowering);
            let sum = format!(
                "{BF16_CONSTANTS}%mm_outs = arith.constant {outs} : index
scf.for %i = %tid to %mm_outs step %cT {{
  %t = arith.divui %i, %mm_cols : index
  %n = arith.remui %i, %mm_cols : index
  %bt = arith.addi %b0, %t : index
  %tok_in = arith.cmpi ult, %bt, %n_b : index
  %bt_safe = arith.select %tok_in, %bt, %c0 : index
  scf.if %tok_in {{
    %wcol = arith.addi %n0, %n : index
{scale}    %acc = scf.for %k = %c0 to %cNope step %c1 iter_args(%s = %zero) -> (f32) {{
{query}      %wrow = arith.addi %head_row, %k : index
{weight}      %p = arith.mulf %q_f, %w_f : f32
      %sn = arith.addf %s, %p : f32
      scf.yield %sn : f32
    }}
    %qv = arith.mulf %acc, %mm_s : f32
    %qrow0 = arith.muli %bt, %cH : index
    %qrow = arith.addi %qrow0, %h : index
{round}    memref.store %qb, %qa[%qrow, %wcol] : memref<?x?xbf16>
  }}
}}
",
                outs = TILE * Self::columns(d),
                scale = indent(&self.scale("%wcol"), 4),
                query = indent(&self.query("%k", "%q"), 6),
                weight = indent(&weight, 6),
                round = indent(&round_bf16("%qv", "%qb"), 4),
            );
            return vec![format!("{sum}{rope}")];
        }
        vec![self.stage(sh_mma, &rope), self.multiply(sh_mma)]
    }

    /// The GPU's first phase: A (the batch's rows only: a row of A makes only its own row of
    /// outputs, and those of rows past the batch are not stored) staged, the rope query copied,
    /// then a proxy fence (the tensor cores read what threads wrote).
    fn stage(&self, sh_mma: &str, rope: &str) -> String {
        // Query values k, k + 1 of token t's head h: one 8-byte load.
        let query = |t: &str, k: &str, out: &str| {
            format!(
                "{out}_bt = arith.addi %b0, {t} : index
{out}_r0 = arith.muli {out}_bt, %cH : index
{out}_r = arith.addi {out}_r0, %h : index
{out}_e0 = arith.muli {out}_r, %cNope : index
{out}_e = arith.addi {out}_e0, {k} : index
{out}_b = arith.muli {out}_e, %mm_c4 : index
{out}_at = arith.addi %q_base, {out}_b : index
{load}{out}_0 = llvm.extractelement {out}_v[%mm_c0_i32 : i32] : vector<2xf32>
{out}_1 = llvm.extractelement {out}_v[%mm_c1_i32 : i32] : vector<2xf32>
",
                load = global_load(&format!("{out}_at"), "vector<2xf32>", 8, &format!("{out}_v"))
            )
        };
        format!(
            "{BF16_CONSTANTS}{aligned}%a_left = arith.subi %n_b, %b0 : index
%a_rows = arith.minui %a_left, %mm_tile : index
%q_base = memref.extract_aligned_pointer_as_index %q_nope : memref<?x?x?xf32> -> index
{a}{rope}{FENCE}",
            aligned = aligned(sh_mma),
            a = stage_rows("a", self.nope, "%a_rows", &query, sh_mma),
        )
    }

    /// The GPU's second phase, a loop over the block's 64-column chunks: B (the head's nope rows of
    /// kv_b at the chunk's columns, MN-major) staged from registers — the next chunk's words loaded
    /// first, in flight through this chunk's staging, products and stores —, a barrier, the
    /// chunk's `nope / 16` wgmmas (A K-major by 64-column chunks), each thread's 32 outputs scaled
    /// and stored as 16 bf16 pairs, and a barrier before the next staging overwrites B.
    fn multiply(&self, sh_mma: &str) -> String {
        let frag = fragment(TILE);
        let rows = self.nope;
        let mut t = aligned(sh_mma);
        // Descriptors' high bits: 128-byte swizzle (bits 62-63), 1024 B between 8-row groups
        // (stride, bits 32-45, 16-byte units); MN-major B's leading offset (bits 16-29) is unused
        // by a 64-wide instruction.
        let _ = write!(
            t,
            "%mm_desc = arith.constant {desc} : i64
%mm_mask = arith.constant 262143 : i64
%mm_c4_i64 = arith.constant 4 : i64
%mm_addr = arith.index_cast %mm_al : index to i64
%mm_b_off = arith.constant {a_bytes} : index
%mm_last_chunk = arith.subi %mm_cols, %mm_tile : index
%qa_base = memref.extract_aligned_pointer_as_index %qa : memref<?x?xbf16> -> index
%qa_cols = arith.addi %cD, %cRope : index
{places}%c2 = arith.constant 2 : index
%c4 = arith.constant 4 : index
%c16 = arith.constant 16 : index
%c32 = arith.constant 32 : index
{coords}",
            desc = (1u64 << 62) | ((PATTERN_BYTES as u64 / 16) << 32),
            a_bytes = self.a_bytes(),
            places = weight_places("b", rows, "%head_row", "%n0", self.bf16_weight),
            coords = fragment_coordinates(),
        );
        for s in 0..self.nope / 16 {
            // A: chunk s / 4, 32 bytes a k16 step within its 128-byte rows; B: 16 rows a step.
            t.push_str(&descriptor(&format!("%da{s}"), (s / 4) * TILE * ROW_BYTES + (s % 4) * 32));
            t.push_str(&descriptor(&format!("%db{s}"), self.a_bytes() + s * 16 * ROW_BYTES));
        }
        let mut body = format!(
            "{stage}{FENCE}gpu.barrier
%nc = arith.addi %n0, %chunk : index
{scale}%frag0 = llvm.mlir.poison : {frag}
",
            stage = stage_weight_words("b", rows, "%rb", self.bf16_weight, sh_mma),
            scale = self.scale("%nc"),
        );
        for e in 0..32 {
            let _ = writeln!(body, "%frag{} = llvm.insertvalue %zero, %frag{e}[{e}] : {frag}", e + 1);
        }
        body.push_str("nvvm.wgmma.fence.aligned\n");
        let mut acc = "%frag32".to_string();
        for s in 0..self.nope / 16 {
            let scale_out = if s == 0 { "zero" } else { "one" };
            let _ = writeln!(
                body,
                "%mma{s} = nvvm.wgmma.mma_async %da{s}, %db{s}, {acc}, <m = 64, n = 64, k = 16>, D[<f32>, <{scale_out}>, <wrapped>], A[<bf16>, <one>, <row>], B[<bf16>, <one>, <row>] : {frag} -> {frag}"
            );
            acc = format!("%mma{s}");
        }
        body.push_str("nvvm.wgmma.commit.group.sync.aligned\nnvvm.wgmma.wait.group.sync.aligned 0\n");
        // Elements e, e + 1: adjacent columns of one row, one 4-byte store.
        for e in (0..32).step_by(2) {
            let (r, c) = fragment_offset(0, e);
            let _ = write!(
                body,
                "scf.execute_region {{
  %acc0 = llvm.extractvalue {acc}[{e}] : {frag}
  %acc1 = llvm.extractvalue {acc}[{e1}] : {frag}
  %er = arith.constant {r} : index
  %ec = arith.constant {c} : index
  %t = arith.addi %trow0, %er : index
  %n = arith.addi %lcol, %ec : index
  %bt = arith.addi %b0, %t : index
  %tok_in = arith.cmpi ult, %bt, %n_b : index
  scf.if %tok_in {{
    %qv0 = arith.mulf %acc0, %mm_s : f32
    %qv1 = arith.mulf %acc1, %mm_s : f32
    %pk = {pack}
    %qrow0 = arith.muli %bt, %cH : index
    %qrow = arith.addi %qrow0, %h : index
    %qcol = arith.addi %nc, %n : index
    %qe0 = arith.muli %qrow, %qa_cols : index
    %qe = arith.addi %qe0, %qcol : index
    %qb = arith.muli %qe, %mm_c2 : index
    %qat = arith.addi %qa_base, %qb : index
{store}  }}
  scf.yield
}}
",
                e1 = e + 1,
                pack = bf16x2("%qv1", "%qv0"),
                store = indent(&global_store("%qat", "%pk", "i32", 4), 4),
            );
        }
        let words = rows / 8;
        let ty = weight_word(self.bf16_weight).0;
        let types = vec![ty; words].join(", ");
        let carried: Vec<String> = (0..words).map(|i| format!("%rb{i} = %fb{i}")).collect();
        let yields: Vec<String> = (0..words).map(|i| format!("%nb{i}")).collect();
        let _ = write!(
            t,
            "{first}%chunks:{words} = scf.for %chunk = %c0 to %mm_cols step %mm_tile iter_args({carried}) -> ({types}) {{
  %next0 = arith.addi %chunk, %mm_tile : index
  %next = arith.minui %next0, %mm_last_chunk : index
{next}{body}  gpu.barrier
  scf.yield {yields} : {types}
}}
",
            first = weight_loads("b", "f", rows, "%c0", self.bf16_weight),
            carried = carried.join(", "),
            next = indent(&weight_loads("b", "n", rows, "%next", self.bf16_weight), 2),
            body = indent(&body, 2),
            yields = yields.join(", "),
        );
        t
    }
}

/// MLA decode's up-projection on the tensor cores ([`super::RowOp::MlaUpVMma`]): a block per (64
/// tokens, head) multiplies the heads' latent outputs `o [B H, kv]` by the head's value rows of
/// kv_b (`W_UV_h`, `v` = 128 rows: one m64n128 accumulator) in 64-column chunks of the latent:
/// per chunk A (the tokens' `o` times the chunk's 128 x 128 block scale, rounded to bf16) and B
/// (the 128 rows' 64 weights as bf16, e4m3 decoded exactly), both K-major and swizzled, then 4
/// wgmmas, with block barriers around them (one buffer: 24 KiB). The outputs are then each head's
/// 1x128 group quantized (a row's |max| across the 4 lanes that hold it) or, the f32 graph's (bf16
/// kv_b), stored as they are.
#[derive(Debug, Clone, Copy)]
pub struct UpV {
    pub v: usize,
    /// bf16 kv_b (the f32 graph's: f32 outputs), else e4m3 with 128 x 128 block scales (1x128
    /// quantized outputs).
    pub bf16_weight: bool,
}

/// A thread's rows of A (every 4th of the 64) go in groups of this many, each group loaded and
/// staged only when its first row is in the batch.
const A_GROUP: usize = 4;

/// Bytes of A's chunk (64 tokens x 64 columns of bf16), after which B's lies.
const UPV_A_BYTES: usize = TILE * ROW_BYTES;

/// An m64nN accumulator fragment's type (`n / 2` f32 a thread).
fn fragment(n: usize) -> String {
    format!("!llvm.struct<({})>", vec!["f32"; n / 2].join(", "))
}

impl UpV {
    /// The one shared array (f32 words): a chunk of A and of B and the aligning slack.
    pub fn shared(&self) -> Vec<(&'static str, usize)> {
        vec![("sh_mma", (UPV_A_BYTES + self.v * ROW_BYTES + PATTERN_BYTES) / 4)]
    }

    /// Why a head of these widths cannot take this kernel, if it cannot.
    pub fn check(&self, nope: usize, d: usize) -> Result<(), String> {
        if self.v != 128 {
            return Err(format!("v heads of {} (128: one m64n128 accumulator, one quantization group)", self.v));
        }
        if !nope.is_multiple_of(128) {
            return Err(format!("nope heads of {nope} (the value rows in one 128-row block of kv_b)"));
        }
        if d == 0 || !d.is_multiple_of(TILE) {
            return Err(format!("a latent of {d} columns (a multiple of {TILE})"));
        }
        Ok(())
    }

    /// The head outputs' rows argument (its first dim the tokens).
    fn rows(&self) -> (&'static str, &'static str) {
        if self.bf16_weight {
            ("out", "memref<?x?xf32>")
        } else {
            ("q", "memref<?x?xi8>")
        }
    }

    /// The block's tokens `%b0 ..` (of `%n_b`) and head `%h` (its value rows from `%vrow0`).
    pub fn prologue(&self) -> String {
        let (rows, ty) = self.rows();
        format!(
            "%tile = arith.divui %row, %cH : index
%h = arith.remui %row, %cH : index
%mm_tile = arith.constant {TILE} : index
%b0 = arith.muli %tile, %mm_tile : index
%n_b = memref.dim %{rows}, %c0 : {ty}
%head_row = arith.muli %h, %cPerHead : index
%vrow0 = arith.addi %head_row, %cNope : index
"
        )
    }

    /// The scale of the value rows' block at latent column `col` into `%{out}` (1 for bf16).
    fn scale(&self, col: &str, out: &str) -> String {
        if self.bf16_weight {
            return format!("{out} = arith.constant 1.0 : f32\n");
        }
        format!(
            "{out}_r = arith.divui %vrow0, %c128 : index
{out}_c = arith.divui {col}, %c128 : index
{out} = memref.load %kv_b_scale[{out}_r, {out}_c] : memref<?x?xf32>
"
        )
    }

    /// The phases: one on the GPU (the chunk loop, then the outputs); on the CPU each token's
    /// outputs, one sequential f32 sum over the latent each (twice where they are quantized: for
    /// the |max|, then for the bytes).
    pub fn phases(&self, lowering: Lowering, sh_mma: &str) -> Vec<String> {
        if lowering == Lowering::Gpu {
            return vec![self.gpu(sh_mma)];
        }
        // Output e of token `%bt` (o row `%orow`) into `%{out}`.
        let value = |out: &str| {
            format!(
                "%{out}_vrow = arith.addi %vrow0, %e : index
%{out} = scf.for %a = %c0 to %cD step %c1 iter_args(%{out}_s = %zero) -> (f32) {{
{scale}  %{out}_o = memref.load %o[%orow, %a] : memref<?x?xf32>
  %{out}_os = arith.mulf %{out}_o, %{out}_sc : f32
{round}{weight}  %{out}_p = arith.mulf %{out}_ob_f, %{out}_w_f : f32
  %{out}_n = arith.addf %{out}_s, %{out}_p : f32
  scf.yield %{out}_n : f32
}}
",
                scale = indent(&self.scale("%a", &format!("%{out}_sc")), 2),
                round = round_bf16(&format!("%{out}_os"), &format!("%{out}_ob")),
                weight =
                    indent(&weight(self.bf16_weight, &format!("%{out}_vrow"), "%a", &format!("%{out}_w"), lowering), 2),
            )
        };
        let outputs = if self.bf16_weight {
            format!(
                "%col0 = arith.muli %h, %cV : index
scf.for %e = %c0 to %cV step %c1 {{
{value}  %col = arith.addi %col0, %e : index
  memref.store %y, %out[%bt, %col] : memref<?x?xf32>
}}
",
                value = indent(&value("y"), 2)
            )
        } else {
            format!(
                "%col0 = arith.muli %h, %cV : index
%amax = scf.for %e = %c0 to %cV step %c1 iter_args(%mx = %zero) -> (f32) {{
{value}{step}  scf.yield %mx2 : f32
}}
{scale}memref.store %s, %scale[%bt, %h] : memref<?x?xf32>
scf.for %e = %c0 to %cV step %c1 {{
{value2}  %qv = arith.divf %y, %s : f32
{encode}  %col = arith.addi %col0, %e : index
  memref.store %byte, %q[%bt, %col] : memref<?x?xi8>
}}
",
                value = indent(&value("m"), 2),
                step = indent(&amax_step("%m", "%mx", "%mx2"), 2),
                scale = group_scale("%amax", "%s"),
                value2 = indent(&value("y"), 2),
                encode = super::encode_e4m3(lowering, "%qv", "%byte"),
            )
        };
        vec![format!(
            "{BF16_CONSTANTS}scf.for %t = %tid to %mm_tile step %cT {{
  %bt = arith.addi %b0, %t : index
  %tok_in = arith.cmpi ult, %bt, %n_b : index
  scf.if %tok_in {{
    %orow0 = arith.muli %bt, %cH : index
    %orow = arith.addi %orow0, %h : index
{outputs}  }}
}}
",
            outputs = indent(&outputs, 4)
        )]
    }

    /// The GPU's phase: per 64-column chunk of the latent, A and B staged from registers, a
    /// barrier, the chunk's 4 wgmmas (m64n128k16, both operands K-major) waited for, a barrier (the
    /// buffer is reused); then the outputs. A thread's loads of the next chunk (16 pairs of `o`, 16
    /// words of weights: vector and 32-bit loads, the buffers 8-byte aligned as the runtime's are)
    /// are issued before it stages this one, so that they are in flight through the staging, the
    /// products and the barriers (the last chunk loads itself again). `o`'s rows past the batch are
    /// skipped 4 at a time (a warp-uniform branch; `A_GROUP`).
    fn gpu(&self, sh_mma: &str) -> String {
        let frag = fragment(self.v);
        let regs = self.v / 2;
        // Rows a thread stages: A's 64 token rows 4 at a time (32 column pairs), B's v weight rows
        // 8 at a time (16 units of 4 columns).
        let (a_iters, b_iters) = (TILE / 4, self.v / 8);
        let b_ty = weight_word(self.bf16_weight).0;
        let mut t = format!(
            "{BF16_CONSTANTS}{aligned}%a_left = arith.subi %n_b, %b0 : index
%a_rows = arith.minui %a_left, %mm_tile : index
%a_last = arith.subi %a_rows, %mm_c1 : index
%a_none = llvm.mlir.poison : vector<2xf32>
%mm_b_off = arith.constant {UPV_A_BYTES} : index
%mm_desc = arith.constant {desc} : i64
%mm_mask = arith.constant 262143 : i64
%mm_c4_i64 = arith.constant 4 : i64
%mm_addr = arith.index_cast %mm_al : index to i64
%mm_c32 = arith.constant 32 : index
%mm_last_chunk = arith.subi %cD, %mm_tile : index
%o_base = memref.extract_aligned_pointer_as_index %o : memref<?x?xf32> -> index
%a_kp = arith.remui %tid, %mm_c32 : index
%a_first = arith.divui %tid, %mm_c32 : index
%a_k = arith.muli %a_kp, %mm_c2 : index
{a_place}{b_places}%frag0 = llvm.mlir.poison : {frag}
",
            aligned = aligned(sh_mma),
            desc = (1u64 << 62) | ((PATTERN_BYTES as u64 / 16) << 32),
            a_place = column_place("a", "%mm_c0", "%a_k"),
            b_places = weight_places("b", self.v, "%vrow0", "%mm_c0", self.bf16_weight),
        );
        for e in 0..regs {
            let _ = writeln!(t, "%frag{} = llvm.insertvalue %zero, %frag{e}[{e}] : {frag}", e + 1);
        }
        // Each staged row's byte address in `o` at column 0 (`%a_at{i}`; rows past the batch read
        // its last row again). A warp's rows go in groups of 4 (`%a_in{g}`: whether the group's
        // first row is in the batch, a uniform branch); groups past the batch are neither loaded
        // nor staged (a row of A makes only its own row of outputs, and those are not stored): at
        // batch 1, warp 0 stages 4 rows of the 64 and the others none.
        for g in 0..a_iters / A_GROUP {
            let _ = writeln!(
                t,
                "%a_g{g}_k = arith.constant {row} : index
%a_g{g} = arith.addi %a_first, %a_g{g}_k : index
%a_in{g} = arith.cmpi ult, %a_g{g}, %a_rows : index",
                row = 4 * A_GROUP * g
            );
        }
        for i in 0..a_iters {
            let _ = write!(
                t,
                "%a_t{i}_k = arith.constant {row} : index
%a_t{i} = arith.addi %a_first, %a_t{i}_k : index
%a_tc{i} = arith.minui %a_t{i}, %a_last : index
%a_bt{i} = arith.addi %b0, %a_tc{i} : index
%a_r0_{i} = arith.muli %a_bt{i}, %cH : index
%a_r{i} = arith.addi %a_r0_{i}, %h : index
%a_e0_{i} = arith.muli %a_r{i}, %cD : index
%a_e{i} = arith.addi %a_e0_{i}, %a_k : index
%a_b{i} = arith.muli %a_e{i}, %mm_c4 : index
%a_at{i} = arith.addi %o_base, %a_b{i} : index
",
                row = 4 * i
            );
        }
        // A chunk's loads from column `col` into `%{tag}a{i}` (vector<2xf32>), `%{tag}b{i}`.
        let fetch = |tag: &str, col: &str| -> String {
            let mut f = format!("%{tag}_ca = arith.muli {col}, %mm_c4 : index\n");
            for g in 0..a_iters / A_GROUP {
                let rows: Vec<usize> = (A_GROUP * g..A_GROUP * (g + 1)).collect();
                let names: Vec<String> = rows.iter().map(|i| format!("%{tag}a{i}_v")).collect();
                let types = vec!["vector<2xf32>"; A_GROUP].join(", ");
                let mut loads = String::new();
                for i in &rows {
                    let _ = write!(
                        loads,
                        "%{tag}a{i}_at = arith.addi %a_at{i}, %{tag}_ca : index\n{}",
                        global_load(&format!("%{tag}a{i}_at"), "vector<2xf32>", 8, &format!("%{tag}a{i}_v"))
                    );
                }
                let _ = write!(
                    f,
                    "%{tag}ag{g}:{A_GROUP} = scf.if %a_in{g} -> ({types}) {{
{loads}  scf.yield {names} : {types}
}} else {{
  scf.yield {none} : {types}
}}
",
                    loads = indent(&loads, 2),
                    names = names.join(", "),
                    none = vec!["%a_none"; A_GROUP].join(", "),
                );
                for (j, i) in rows.iter().enumerate() {
                    let _ = writeln!(f, "%{tag}a{i} = llvm.bitcast %{tag}ag{g}#{j} : vector<2xf32> to vector<2xf32>");
                }
            }
            f + &weight_loads("b", tag, self.v, col, self.bf16_weight)
        };
        let carried: Vec<String> = (0..a_iters)
            .map(|i| format!("%ra{i} = %fa{i}"))
            .chain((0..b_iters).map(|i| format!("%rb{i} = %fb{i}")))
            .collect();
        let types: Vec<String> = std::iter::once(frag.clone())
            .chain((0..a_iters).map(|_| "vector<2xf32>".to_string()))
            .chain((0..b_iters).map(|_| b_ty.to_string()))
            .collect();
        // The chunk's staging from the registers: A's pairs times the block scale, rounded; B's
        // words as bf16 pairs.
        let mut stage = String::new();
        for i in 0..a_iters {
            if i % A_GROUP == 0 {
                let _ = writeln!(stage, "scf.if %a_in{} {{", i / A_GROUP);
            }
            let store = row_store("a", &format!("%a_t{i}"), &["%pk"], sh_mma);
            let _ = write!(
                stage,
                "scf.execute_region {{
%x0_raw = llvm.extractelement %ra{i}[%mm_c0_i32 : i32] : vector<2xf32>
%x1_raw = llvm.extractelement %ra{i}[%mm_c1_i32 : i32] : vector<2xf32>
%x0 = arith.mulf %x0_raw, %chunk_s : f32
%x1 = arith.mulf %x1_raw, %chunk_s : f32
%pk = {pack}
{store}scf.yield
}}
",
                pack = bf16x2("%x1", "%x0"),
            );
            if i % A_GROUP == A_GROUP - 1 {
                stage.push_str("}\n");
            }
        }
        stage.push_str(&stage_weight_words("b", self.v, "%rb", self.bf16_weight, sh_mma));
        let mut products = String::new();
        for s in 0..4 {
            // k16 step s: 32 bytes into both operands' 128-byte rows.
            products.push_str(&descriptor(&format!("%da{s}"), s * 32));
            products.push_str(&descriptor(&format!("%db{s}"), UPV_A_BYTES + s * 32));
        }
        let mut acc = "%acc_in".to_string();
        products.push_str("nvvm.wgmma.fence.aligned\n");
        for s in 0..4 {
            let _ = writeln!(
                products,
                "%mma{s} = nvvm.wgmma.mma_async %da{s}, %db{s}, {acc}, <m = 64, n = {n}, k = 16>, D[<f32>, <one>, <wrapped>], A[<bf16>, <one>, <row>], B[<bf16>, <one>, <col>] : {frag} -> {frag}",
                n = self.v
            );
            acc = format!("%mma{s}");
        }
        let yields: Vec<String> = std::iter::once(acc)
            .chain((0..a_iters).map(|i| format!("%na{i}")))
            .chain((0..b_iters).map(|i| format!("%nb{i}")))
            .collect();
        let _ = write!(
            t,
            "{first}%loop:{n} = scf.for %chunk0 = %c0 to %cD step %mm_tile iter_args(%acc_in = %frag{regs}, {carried}) -> ({types}) {{
  %next0 = arith.addi %chunk0, %mm_tile : index
  %next = arith.minui %next0, %mm_last_chunk : index
{next}{scale}{stage}{FENCE}  gpu.barrier
{products}  nvvm.wgmma.commit.group.sync.aligned
  nvvm.wgmma.wait.group.sync.aligned 0
  gpu.barrier
  scf.yield {yields} : {types}
}}
%c2 = arith.constant 2 : index
%c4 = arith.constant 4 : index
%c16 = arith.constant 16 : index
%c32 = arith.constant 32 : index
{coords}%col0 = arith.muli %h, %cV : index
%out_base = memref.extract_aligned_pointer_as_index %{out} : {out_ty} -> index
%out_cols = arith.muli %cH, %cV : index
",
            out = self.rows().0,
            out_ty = self.rows().1,
            first = fetch("f", "%c0"),
            n = types.len(),
            carried = carried.join(", "),
            types = types.join(", "),
            next = indent(&fetch("n", "%next"), 2),
            scale = indent(&self.scale("%chunk0", "%chunk_s"), 2),
            stage = indent(&stage, 2),
            products = indent(&products, 2),
            yields = yields.join(", "),
            coords = fragment_coordinates(),
        );
        // Row halves: rows trow0 and trow0 + 8, each thread's v / 4 columns of them.
        for half in 0..2 {
            let elements: Vec<usize> = (0..regs).filter(|e| fragment_offset(0, *e).0 == 8 * half).collect();
            let _ = write!(
                t,
                "%row_off{half} = arith.constant {off} : index
%row{half} = arith.addi %trow0, %row_off{half} : index
%bt{half} = arith.addi %b0, %row{half} : index
%in{half} = arith.cmpi ult, %bt{half}, %n_b : index
",
                off = 8 * half
            );
            for &e in &elements {
                let _ = writeln!(t, "%v{e} = llvm.extractvalue %loop#0[{e}] : {frag}");
            }
            // Elements e, e + 1 (e even) are adjacent columns of the row: stored as one pair, at
            // byte `%at` of the row's `bytes`-wide elements (the outputs' rows of H v of them).
            let place = |e: usize, bytes: usize| {
                format!(
                    "  %ec = arith.constant {c} : index
  %c_a = arith.addi %lcol, %ec : index
  %col = arith.addi %col0, %c_a : index
  %el0 = arith.muli %bt{half}, %out_cols : index
  %el = arith.addi %el0, %col : index
  %eb = arith.constant {bytes} : index
  %off = arith.muli %el, %eb : index
  %at = arith.addi %out_base, %off : index
",
                    c = fragment_offset(0, e).1
                )
            };
            if self.bf16_weight {
                for pair in elements.chunks(2) {
                    let _ = write!(
                        t,
                        "scf.if %in{half} {{
  %pv0 = llvm.mlir.poison : vector<2xf32>
  %pv1 = llvm.insertelement %v{e0}, %pv0[%mm_c0_i32 : i32] : vector<2xf32>
  %pv = llvm.insertelement %v{e1}, %pv1[%mm_c1_i32 : i32] : vector<2xf32>
{place}{store}}}
",
                        e0 = pair[0],
                        e1 = pair[1],
                        place = place(pair[0], 4),
                        store = indent(&global_store("%at", "%pv", "vector<2xf32>", 8), 2),
                    );
                }
                continue;
            }
            // The row's |max|: the thread's columns in order, then across its quad (max is
            // exact: any order gives the reference's).
            let mut mx = "%zero".to_string();
            for &e in &elements {
                t.push_str(&amax_step(&format!("%v{e}"), &mx, &format!("%mx{e}")));
                mx = format!("%mx{e}");
            }
            for lane in [1, 2] {
                let _ = write!(
                    t,
                    "%q{half}_o{lane} = arith.constant {lane} : i32
%q{half}_w{lane} = arith.constant 32 : i32
%q{half}_x{lane}, %q{half}_ok{lane} = gpu.shuffle xor {mx}, %q{half}_o{lane}, %q{half}_w{lane} : f32
%q{half}_gt{lane} = arith.cmpf ogt, %q{half}_x{lane}, {mx} : f32
%q{half}_m{lane} = arith.select %q{half}_gt{lane}, %q{half}_x{lane}, {mx} : f32
"
                );
                mx = format!("%q{half}_m{lane}");
            }
            let _ = write!(
                t,
                "{scale}%first{half} = arith.cmpi eq, %lcol0, %c0 : index
%writes{half} = arith.andi %in{half}, %first{half} : i1
scf.if %writes{half} {{
  memref.store %s{half}, %scale[%bt{half}, %h] : memref<?x?xf32>
}}
",
                scale = group_scale(&mx, &format!("%s{half}"))
            );
            for pair in elements.chunks(2) {
                let _ = write!(
                    t,
                    "scf.if %in{half} {{
  %qv0 = arith.divf %v{e0}, %s{half} : f32
  %qv1 = arith.divf %v{e1}, %s{half} : f32
  %bytes = nvvm.convert.f32x2.to.f8x2 %qv1, %qv0 {{rnd = #nvvm.fp_rnd_mode<rn>, sat = #nvvm.sat_mode<satfinite>}} : i16 (f8E4M3FN)
{place}{store}}}
",
                    e0 = pair[0],
                    e1 = pair[1],
                    place = place(pair[0], 1),
                    store = indent(&global_store("%at", "%bytes", "i16", 2), 2),
                );
            }
        }
        t
    }
}

/// kv_b's element (`row`, `col`) as f32 (`{out}_f`), unscaled: an e4m3 weight decoded (exact: every
/// e4m3 value is a bf16, as the GPU stages it), a bf16 one widened.
fn weight(bf16_weight: bool, row: &str, col: &str, out: &str, lowering: Lowering) -> String {
    if bf16_weight {
        return format!(
            "{out}_raw = memref.load %kv_b[{row}, {col}] : memref<?x?xbf16>
{out}_f = arith.extf {out}_raw : bf16 to f32
"
        );
    }
    format!(
        "{out}_byte = memref.load %kv_b[{row}, {col}] : memref<?x?xi8>
{}",
        decode_e4m3(&format!("{out}_byte"), &format!("{out}_f"), lowering)
    )
}

/// `{name}`: the wgmma descriptor of the operand at byte `offset` of the aligned tile (`%mm_addr`):
/// `%mm_desc` (its high bits) with the address's 16-byte units.
pub(super) fn descriptor(name: &str, offset: usize) -> String {
    format!(
        "{name}_off = arith.constant {offset} : i64
{name}_a = arith.addi %mm_addr, {name}_off : i64
{name}_m = arith.andi {name}_a, %mm_mask : i64
{name}_s = arith.shrui {name}_m, %mm_c4_i64 : i64
{name} = arith.ori %mm_desc, {name}_s : i64
"
    )
}

/// A proxy fence: the threads' shared-memory writes before the tensor cores' reads.
pub(super) const FENCE: &str =
    "nvvm.fence.proxy {kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}\n";

/// `%mm_al`: the first 1024-byte boundary in `sh_mma` (a shared address), `%mm_w0` its word index
/// there, and the constants the phases share.
pub(super) fn aligned(sh_mma: &str) -> String {
    format!(
        "%mm_c2 = arith.constant 2 : index
%mm_c16_i32 = arith.constant 16 : i32
%mm_c0_i32 = arith.constant 0 : i32
%mm_c1_i32 = arith.constant 1 : i32
%mm_c0 = arith.constant 0 : index
%mm_c1 = arith.constant 1 : index
%mm_c3 = arith.constant 3 : index
%mm_c4 = arith.constant 4 : index
%mm_c8 = arith.constant 8 : index
%mm_c16 = arith.constant 16 : index
%mm_c64 = arith.constant 64 : index
%mm_row_bytes = arith.constant {ROW_BYTES} : index
%mm_chunk_bytes = arith.constant {chunk} : index
%mm_pattern = arith.constant {PATTERN_BYTES} : index
%mm_pattern_m1 = arith.constant {last} : index
%mm_base = memref.extract_aligned_pointer_as_index %sh_mma : {sh_mma} -> index
%mm_up = arith.addi %mm_base, %mm_pattern_m1 : index
%mm_patterns = arith.divui %mm_up, %mm_pattern : index
%mm_al = arith.muli %mm_patterns, %mm_pattern : index
%mm_skip = arith.subi %mm_al, %mm_base : index
%mm_w0 = arith.divui %mm_skip, %mm_c4 : index
",
        chunk = TILE * ROW_BYTES,
        last = PATTERN_BYTES - 1,
    )
}

/// Stages `cols` columns (64, 128 or 256) of rows `0 .. rows` as A (K-major, 64-column chunks of
/// 64 rows x 128 B from the aligned tile's start), rounded to bf16: `pair(t, k, out)` defines
/// `{out}_0`, `{out}_1` (f32), columns `k`, `k + 1` of row `t`. A thread keeps one pair of columns
/// (one `cvt.rn.bf16x2.f32` and one 32-bit store a row) and steps through the rows, so that only the
/// row's part of a place is computed in the loop. Names start with `%{p}`.
fn stage_rows(p: &str, cols: usize, rows: &str, pair: &dyn Fn(&str, &str, &str) -> String, sh_mma: &str) -> String {
    let pairs = cols / 2;
    format!(
        "%{p}_pairs = arith.constant {pairs} : index
%{p}_step = arith.constant {step} : index
%{p}_kp = arith.remui %tid, %{p}_pairs : index
%{p}_t0 = arith.divui %tid, %{p}_pairs : index
%{p}_k = arith.muli %{p}_kp, %mm_c2 : index
%{p}_chunk = arith.divui %{p}_k, %mm_c64 : index
%{p}_kc = arith.remui %{p}_k, %mm_c64 : index
%{p}_cb = arith.muli %{p}_chunk, %mm_chunk_bytes : index
{place}scf.for %{p}_t = %{p}_t0 to {rows} step %{p}_step {{
{v}  %{p}_pk = {pack}
{store}}}
",
        step = 128 / pairs,
        place = column_place(p, &format!("%{p}_cb"), &format!("%{p}_kc")),
        v = indent(&pair(&format!("%{p}_t"), &format!("%{p}_k"), &format!("%{p}_v")), 2),
        pack = bf16x2(&format!("%{p}_v_1"), &format!("%{p}_v_0")),
        store = indent(&row_store(p, &format!("%{p}_t"), &[&format!("%{p}_pk")], sh_mma), 2),
    )
}

/// A 4-column word of kv_b as loaded (e4m3: an i32; bf16: a `vector<2xi32>`) and its bytes.
fn weight_word(bf16_weight: bool) -> (&'static str, usize) {
    if bf16_weight {
        ("vector<2xi32>", 8)
    } else {
        ("i32", 4)
    }
}

/// A thread's share of a 64-column chunk of kv_b's rows `row0 .. row0 + rows` (a multiple of 8),
/// staged as B (64-column chunk rows of 128 B, swizzled, from `%mm_b_off` of the aligned tile): 4
/// adjacent columns (one word; two bf16 pairs: half a 16-byte unit) of every 8th row from
/// `%{p}_first`, their [`column_place`], and each row `%{p}_r{i}`'s byte address `%{p}_at{i}` in
/// kv_b at column `col0 + %{p}_n` (a chunk at `c` adds `c` weights: [`weight_loads`]). Defines
/// `%kvb_base`, `%mm_w_bytes`.
fn weight_places(p: &str, rows: usize, row0: &str, col0: &str, bf16_weight: bool) -> String {
    let mut t = format!(
        "%kvb_base = memref.extract_aligned_pointer_as_index %kv_b : memref<?x?x{w}> -> index
%mm_w_bytes = arith.constant {bytes} : index
%{p}_np = arith.remui %tid, %mm_c16 : index
%{p}_first = arith.divui %tid, %mm_c16 : index
%{p}_n = arith.muli %{p}_np, %mm_c4 : index
%{p}_col = arith.addi {col0}, %{p}_n : index
{place}",
        w = if bf16_weight { "bf16" } else { "i8" },
        bytes = if bf16_weight { 2 } else { 1 },
        place = column_place(p, "%mm_b_off", &format!("%{p}_n")),
    );
    for i in 0..rows / 8 {
        let _ = write!(
            t,
            "%{p}_r{i}_k = arith.constant {row} : index
%{p}_r{i} = arith.addi %{p}_first, %{p}_r{i}_k : index
%{p}_row{i} = arith.addi {row0}, %{p}_r{i} : index
%{p}_e0_{i} = arith.muli %{p}_row{i}, %cD : index
%{p}_e{i} = arith.addi %{p}_e0_{i}, %{p}_col : index
%{p}_b{i} = arith.muli %{p}_e{i}, %mm_w_bytes : index
%{p}_at{i} = arith.addi %kvb_base, %{p}_b{i} : index
",
            row = 8 * i
        );
    }
    t
}

/// The [`weight_places`]' words of the chunk at latent column `col`: `%{tag}{p}{i}`.
fn weight_loads(p: &str, tag: &str, rows: usize, col: &str, bf16_weight: bool) -> String {
    let (ty, bytes) = weight_word(bf16_weight);
    let mut t = format!("%{tag}{p}_cb = arith.muli {col}, %mm_w_bytes : index\n");
    for i in 0..rows / 8 {
        let at = format!("%{tag}{p}{i}_at");
        let _ = write!(
            t,
            "{at} = arith.addi %{p}_at{i}, %{tag}{p}_cb : index\n{}",
            global_load(&at, ty, bytes, &format!("%{tag}{p}{i}"))
        );
    }
    t
}

/// Stages the [`weight_places`]' words `{regs}{i}` as bf16 (e4m3 decoded exactly: every e4m3 value
/// is a bf16; the block's scale left out), each word's two pairs in one 8-byte store.
fn stage_weight_words(p: &str, rows: usize, regs: &str, bf16_weight: bool, sh_mma: &str) -> String {
    let mut t = String::new();
    for i in 0..rows / 8 {
        let _ = write!(
            t,
            "scf.execute_region {{
{words}{store}scf.yield
}}
",
            words = bf16_pairs(&format!("{regs}{i}"), bf16_weight, "%w"),
            store = row_store(p, &format!("%{p}_r{i}"), &["%w0", "%w1"], sh_mma),
        );
    }
    t
}

/// `{out}`, of type `ty`, loaded from the global byte address `at` (an index, `align`-aligned).
fn global_load(at: &str, ty: &str, align: usize, out: &str) -> String {
    format!(
        "{out}_64 = arith.index_cast {at} : index to i64
{out}_p = llvm.inttoptr {out}_64 : i64 to !llvm.ptr<1>
{out} = llvm.load {out}_p {{alignment = {align} : i64}} : !llvm.ptr<1> -> {ty}
"
    )
}

/// Stores `value`, of type `ty`, at the global byte address `at` (an index, `align`-aligned).
fn global_store(at: &str, value: &str, ty: &str, align: usize) -> String {
    format!(
        "{at}_64 = arith.index_cast {at} : index to i64
{at}_p = llvm.inttoptr {at}_64 : i64 to !llvm.ptr<1>
llvm.store {value}, {at}_p {{alignment = {align} : i64}} : {ty}, !llvm.ptr<1>
"
    )
}

/// The two bf16 pairs (`{out}0`, `{out}1`, i32) of 4 adjacent weights as loaded in `word`: bf16
/// (a `vector<2xi32>`) as they are; e4m3 (an i32: bytes 0, 1 then 2, 3) each byte pair through
/// `cvt.rn.f16x2.e4m3x2`, widened and rounded back to bf16 at once (exact).
fn bf16_pairs(word: &str, bf16_weight: bool, out: &str) -> String {
    if bf16_weight {
        return format!(
            "{out}0 = llvm.extractelement {word}[%mm_c0_i32 : i32] : vector<2xi32>
{out}1 = llvm.extractelement {word}[%mm_c1_i32 : i32] : vector<2xi32>
"
        );
    }
    let mut t = String::new();
    for j in 0..2 {
        let q = format!("{out}{j}");
        let _ = write!(
            t,
            "{q}_sh = arith.constant {shift} : i32
{q}_w = arith.shrui {word}, {q}_sh : i32
{q}_h = arith.trunci {q}_w : i32 to i16
{q}_x = llvm.inline_asm \"cvt.rn.f16x2.e4m3x2 $0, $1;\", \"=r,h\" {q}_h : (i16) -> i32
{q}_lo16 = arith.trunci {q}_x : i32 to i16
{q}_hi32 = arith.shrui {q}_x, %mm_c16_i32 : i32
{q}_hi16 = arith.trunci {q}_hi32 : i32 to i16
{q}_lo_h = arith.bitcast {q}_lo16 : i16 to f16
{q}_hi_h = arith.bitcast {q}_hi16 : i16 to f16
{q}_lo = arith.extf {q}_lo_h : f16 to f32
{q}_hi = arith.extf {q}_hi_h : f16 to f32
{q} = {pack}
",
            shift = 16 * j,
            pack = bf16x2(&format!("{q}_hi"), &format!("{q}_lo"))
        );
    }
    t
}

/// The loop-invariant part of a bf16 pair's place at columns `col`, `col + 1` of a 64-column
/// chunk at byte `chunk` of the aligned tile: `%{p}_unit` (16-byte unit before the swizzle) and
/// `%{p}_base` (the chunk and the pair's bytes within its unit).
pub(super) fn column_place(p: &str, chunk: &str, col: &str) -> String {
    format!(
        "%{p}_unit = arith.divui {col}, %mm_c8 : index
%{p}_in = arith.remui {col}, %mm_c8 : index
%{p}_inb = arith.muli %{p}_in, %mm_c2 : index
%{p}_base = arith.addi {chunk}, %{p}_inb : index
"
    )
}

/// Stores one 32-bit word, or two consecutive ones of a 16-byte unit, at their [`column_place`] `p`
/// in chunk row `row`, 128-byte swizzled: byte `base + 128 row + 16 (unit ^ row % 8)` on.
pub(super) fn row_store(p: &str, row: &str, words: &[&str], sh_mma: &str) -> String {
    let mut t = format!(
        "%sw_row = arith.muli {row}, %mm_row_bytes : index
%sw_r8 = arith.remui {row}, %mm_c8 : index
%sw_x = arith.xori %{p}_unit, %sw_r8 : index
%sw_xb = arith.muli %sw_x, %mm_c16 : index
%sw_0 = arith.addi %{p}_base, %sw_row : index
%sw_1 = arith.addi %sw_0, %sw_xb : index
"
    );
    match words {
        // One 8-byte store: a warp's two rows of 128 B take two wavefronts, no bank conflict (two
        // 4-byte stores of them take two each).
        [lo, hi] => {
            let _ = write!(
                t,
                "%sw_addr = arith.addi %mm_al, %sw_1 : index
%sw_64 = arith.index_cast %sw_addr : index to i64
%sw_p = llvm.inttoptr %sw_64 : i64 to !llvm.ptr<3>
%sw_v0 = llvm.mlir.poison : vector<2xi32>
%sw_v1 = llvm.insertelement {lo}, %sw_v0[%mm_c0_i32 : i32] : vector<2xi32>
%sw_v = llvm.insertelement {hi}, %sw_v1[%mm_c1_i32 : i32] : vector<2xi32>
llvm.store %sw_v, %sw_p {{alignment = 8 : i64}} : vector<2xi32>, !llvm.ptr<3>
"
            );
        }
        _ => {
            let _ = write!(
                t,
                "%sw_w = arith.divui %sw_1, %mm_c4 : index
%sw_at = arith.addi %mm_w0, %sw_w : index
%sw_f = arith.bitcast {word} : i32 to f32
memref.store %sw_f, %sh_mma[%sw_at] : {sh_mma}
",
                word = words[0]
            );
        }
    }
    t
}

/// Two f32 rounded to bf16 (to nearest even) in one i32, `hi` in the high half (the GPU's
/// `cvt.rn.bf16x2.f32`).
pub(super) fn bf16x2(hi: &str, lo: &str) -> String {
    format!("llvm.inline_asm \"cvt.rn.bf16x2.f32 $0, $1, $2;\", \"=r,f,f\" {hi}, {lo} : (f32, f32) -> i32")
}

pub(super) fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}
