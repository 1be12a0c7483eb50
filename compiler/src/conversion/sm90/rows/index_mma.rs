//! DeepSeek-V3.2's indexer scores on the tensor cores ([`super::SparseRow::IndexScores`] with
//! `mma`): a block (one warpgroup) per (query, part of its keys) multiplies 64 keys at a time by
//! the query's heads — `wgmma m64nNk16`, A the keys from the thread's registers (M: 64 keys), B the
//! query's heads from shared memory (N: the heads, padded to a multiple of 8), K the key's columns —
//! then reduces each key's row of the accumulators over the heads: `sum_h w_h / sqrt(H) relu(q_h .
//! k / sqrt(D))`. A thread holds two keys' values of every 4th pair of heads, so a key's score is
//! the thread's partial sums joined by two shuffles within a quad: no shared memory, no barrier.
//!
//! The products keep f32's accuracy with bf16 operands split in two (`x = hi + lo`, `hi` = x rounded
//! to bf16, `lo` = the rest rounded; the pair carries 16 of f32's 24 bits): `q . k ~ qh.kh + ql.kh +
//! qh.kl` (the dropped `ql.kl` is 2^-16 of the product), three wgmmas a 16-column step. The CUDA-core
//! loop spends about 2.6 instructions a multiply-add on every (query, key, head, column); here the
//! tensor cores take them, and the threads only load, split and reduce.
//!
//! Layout. B (the query): its `N` head rows rounded to hi and lo, each K-major in 64-column chunks
//! of rows of 128 B, 128-byte swizzled (zeros past the heads and the key's columns), the lo copy
//! after the hi one, staged once a block. A (the keys): a thread's words are those of the wgmma A
//! fragment — rows `g` and `g + 8` of its warp's 16 (g = lane / 4), columns `2 (lane % 4)` and `+ 8`
//! of each 16 — read from the keys in place (the last D columns of the cache rows), split in
//! registers. A part takes the query's 64-key tiles `part, part + parts, ...` (decode's few queries
//! still fill the SMs); keys past the scored ones are read as the last one (their rows are not
//! stored).
//!
//! Numerics. Each (key, head) product is one f32 sum in the order the wgmmas run (per step: hi.hi,
//! hi.lo, lo.hi, each over its 16 columns), as `ptxsim` runs wgmma; the heads' terms `w_h / sqrt(H)
//! * relu(dot / sqrt(D))` are summed per lane in ascending head order (the lane's heads `8 j + 2 q +
//! e`), and the four lanes' sums as `(s0 + s1) + (s2 + s3)`. The CPU lowering computes exactly
//! that: its scores are this kernel's (not the reference's, whose every product is of the f32
//! values); the GPU's accumulation order within a wgmma and its fused multiply-adds differ by
//! rounding.
//!
//! bf16 keys (`bf16_keys`: the caches' rows in bf16): a key is its own hi (its lo is zero), so a
//! step is two wgmmas (hi.hi, hi.lo: the query's both halves against the key) and a thread reads
//! each of its words as one 4-byte load of two adjacent columns — half the bytes and loads, no
//! conversion.

use std::fmt::Write;

use super::mla_mma::{aligned, bf16x2, column_place, descriptor, indent, row_store, FENCE, PATTERN_BYTES, ROW_BYTES};
use super::{round_bf16, Lowering};
use crate::conversion::sm90::gemm::{fragment_coordinates, fragment_offset};
use crate::conversion::sm90::mla::wgmma_registers_a;

/// Keys a tile (the wgmma M) and threads a block (one warpgroup).
pub const TILE: usize = 64;
pub const THREADS: usize = 128;
/// Static shared memory a block may take.
const STATIC_SHARED: usize = 48 * 1024;

/// The indexer's shape on the tensor cores: `heads` query heads of `d` columns.
#[derive(Debug, Clone, Copy)]
pub struct IndexMma {
    pub heads: usize,
    pub d: usize,
    /// The keys are bf16 rows: two products a step, the keys' words loaded as they are.
    pub bf16_keys: bool,
}

impl IndexMma {
    /// The wgmma's N: the heads padded to a multiple of 8.
    pub fn n(&self) -> usize {
        self.heads.next_multiple_of(8)
    }

    /// 16-column steps of the product (columns past `d` are zeros).
    pub fn steps(&self) -> usize {
        self.d.div_ceil(16)
    }

    /// Products a 16-column step: hi.hi, hi.lo, lo.hi (bf16 keys: no lo.hi).
    pub fn products(&self) -> usize {
        if self.bf16_keys {
            2
        } else {
            3
        }
    }

    /// Multiply-adds the tensor cores run for a tile of keys: [`Self::products`] of 64 keys x `n`
    /// heads x the steps' columns.
    pub fn tile_macs(&self) -> usize {
        self.products() * TILE * self.n() * 16 * self.steps()
    }

    /// Bytes of a key's value in the rows.
    pub fn key_bytes(&self) -> usize {
        if self.bf16_keys {
            2
        } else {
            4
        }
    }

    /// Iterations of a thread's staging loop (one pair of columns of a head each).
    pub fn stage_iterations(&self) -> usize {
        self.n() * self.chunks() * 32 / THREADS
    }

    /// 64-column chunks of the staged query: a power of two (a thread's pair of columns the same
    /// in every head it stages).
    fn chunks(&self) -> usize {
        self.d.div_ceil(64).next_power_of_two()
    }

    /// Bytes of one copy (hi or lo) of the staged query: its chunks of `n` rows of 128 B.
    fn copy_bytes(&self) -> usize {
        self.chunks() * self.n() * ROW_BYTES
    }

    /// The one shared array (f32 words): both copies and the slack that aligns them to 1024 B.
    pub fn shared(&self) -> Vec<(&'static str, usize)> {
        vec![("sh_mma", (2 * self.copy_bytes() + PATTERN_BYTES) / 4)]
    }

    /// Why this shape cannot take the kernel, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.heads == 0 || self.n() > 256 {
            return Err(format!("{} heads (1 to 256: the wgmma's N)", self.heads));
        }
        if self.d == 0 || self.d > 256 {
            return Err(format!("keys of {} columns (1 to 256)", self.d));
        }
        let bytes = 2 * self.copy_bytes() + PATTERN_BYTES;
        if bytes > STATIC_SHARED {
            return Err(format!(
                "{} heads of {} columns take {bytes} B of shared memory (at most {STATIC_SHARED})",
                self.heads, self.d
            ));
        }
        Ok(())
    }

    /// The phases (prologue values: `%qrow`, `%part`, `%nscored`, `%koff`): on the GPU the query
    /// staged, then the tiles' products and scores; on the CPU each key's score in the GPU's order.
    pub(super) fn phases(&self, decode: bool, lowering: Lowering, sh_mma: &str) -> Vec<String> {
        let busy = format!(
            "%tile_keys = arith.constant {TILE} : index
%part_first = arith.muli %part, %tile_keys : index
%busy = arith.cmpi ult, %part_first, %nscored : index
"
        );
        let elem = if self.bf16_keys { "bf16" } else { "f32" };
        // The element's place in the keys, and the keys' type.
        let at = |r: &str, col: &str| match decode {
            true => (format!("%keys[%qrow, {r}, {col}]"), format!("memref<?x?x?x{elem}>")),
            false => (format!("%keys[{r}, {col}]"), format!("memref<?x?x{elem}>")),
        };
        // A key's value as f32 (bf16 widened exactly).
        let key = |r: &str, col: &str, out: &str| {
            let (place, ty) = at(r, col);
            match self.bf16_keys {
                true => format!("{out}_b = memref.load {place} : {ty}\n{out} = arith.extf {out}_b : bf16 to f32\n"),
                false => format!("{out} = memref.load {place} : {ty}\n"),
            }
        };
        // bf16 keys: columns `col`, `col + 1` as one word (`col` even), the lower in the low half.
        let pair = |r: &str, col: &str, out: &str| {
            let (place, ty) = at(r, col);
            format!(
                "{out}_v = vector.load {place} {{alignment = 4 : i64}} : {ty}, vector<2xbf16>
{out} = llvm.bitcast {out}_v : vector<2xbf16> to i32
"
            )
        };
        match lowering {
            Lowering::Cpu => vec![format!("{busy}{}", self.cpu_scores(&key))],
            Lowering::Gpu => vec![
                format!("{busy}scf.if %busy {{\n{}}}\n", indent(&self.stage(sh_mma), 2)),
                format!("{busy}scf.if %busy {{\n{}}}\n", indent(&self.scores(&key, &pair, sh_mma), 2)),
            ],
        }
    }

    /// The query's heads as B, hi then lo: a thread keeps one pair of columns (its place in a
    /// chunk row, its bounds) and steps through the heads `128 / pairs` at a time.
    fn stage(&self, sh_mma: &str) -> String {
        let half = self.chunks() * 32;
        let pair = |c: usize| {
            format!(
                "%kin{c} = arith.andi %kc_in{c}, %hin : i1
%qv{c}0 = memref.load %q[%qrow, %hs, %ks{c}] : memref<?x?x?xf32>
%qv{c} = arith.select %kin{c}, %qv{c}0, %zero : f32
"
            )
        };
        let bounds = |c: usize| {
            format!(
                "%k{c} = arith.addi %k, %c{c}_ix : index
%kc_in{c} = arith.cmpi ult, %k{c}, %cD : index
%ks{c} = arith.select %kc_in{c}, %k{c}, %c0 : index
"
            )
        };
        format!(
            "{aligned}%c0_ix = arith.constant 0 : index
%c1_ix = arith.constant 1 : index
%st_half = arith.constant {half} : index
%st_step = arith.constant {step} : index
%st_rows = arith.constant {rows} : index
%hi_mask = arith.constant -65536 : i32
%c16_i32s = arith.constant 16 : i32
%kp = arith.remui %tid, %st_half : index
%h0 = arith.divui %tid, %st_half : index
%k = arith.muli %kp, %mm_c2 : index
{b0}{b1}%chunk = arith.divui %k, %mm_c64 : index
%kc = arith.remui %k, %mm_c64 : index
%st_chunk_bytes = arith.constant {chunk_bytes} : index
%st_copy = arith.constant {copy} : index
%cb_hi = arith.muli %chunk, %st_chunk_bytes : index
%cb_lo = arith.addi %cb_hi, %st_copy : index
{place_hi}{place_lo}scf.for %h = %h0 to %st_rows step %st_step {{
  %hin = arith.cmpi ult, %h, %cH : index
  %hs = arith.select %hin, %h, %c0 : index
{pair0}{pair1}  %hw = {hi}
{split}  %lw = {lo}
  scf.execute_region {{
{store_hi}    scf.yield
  }}
  scf.execute_region {{
{store_lo}    scf.yield
  }}
}}
{FENCE}",
            aligned = aligned(sh_mma),
            step = THREADS / half,
            rows = self.n(),
            chunk_bytes = self.n() * ROW_BYTES,
            copy = self.copy_bytes(),
            b0 = bounds(0),
            b1 = bounds(1),
            place_hi = column_place("qh", "%cb_hi", "%kc"),
            place_lo = column_place("ql", "%cb_lo", "%kc"),
            pair0 = indent(&pair(0), 2),
            pair1 = indent(&pair(1), 2),
            hi = bf16x2("%qv1", "%qv0"),
            split = indent(&split_word("%hw", "%qv0", "%qv1", "%r"), 2),
            lo = bf16x2("%r1", "%r0"),
            store_hi = indent(&row_store("qh", "%h", &["%hw"], sh_mma), 4),
            store_lo = indent(&row_store("ql", "%h", &["%lw"], sh_mma), 4),
        )
    }

    /// The tiles of the block's part: keys as A from registers, [`Self::products`] wgmmas a step,
    /// the heads' terms summed per lane, the quad's sums joined, the scores stored. `key` loads an
    /// f32 key value, `pair` (bf16 keys) a word of two.
    fn scores(
        &self,
        key: &dyn Fn(&str, &str, &str) -> String,
        pair: &dyn Fn(&str, &str, &str) -> String,
        sh_mma: &str,
    ) -> String {
        let (n, steps) = (self.n(), self.steps());
        let frag = format!("!llvm.struct<({})>", vec!["f32"; n / 2].join(", "));
        let mut t = aligned(sh_mma);
        let _ = write!(
            t,
            "%c4 = arith.constant 4 : index
%c16 = arith.constant 16 : index
%c32 = arith.constant 32 : index
%c128 = arith.constant 128 : index
%c8 = arith.constant 8 : index
%c1_i32s = arith.constant 1 : i32
%c2_i32s = arith.constant 2 : i32
%c16_i32s = arith.constant 16 : i32
%c32_i32s = arith.constant 32 : i32
%hi_mask = arith.constant -65536 : i32
%mm_desc = arith.constant {desc} : i64
%mm_mask = arith.constant 262143 : i64
%mm_c4_i64 = arith.constant 4 : i64
%mm_addr = arith.index_cast %mm_al : index to i64
{coords}%tiles = arith.ceildivui %nscored, %tile_keys : index
%last_key = arith.subi %nscored, %c1 : index
%quad_first = arith.cmpi eq, %lcol0, %c0 : index
%quad_second = arith.cmpi eq, %lcol0, %c1 : index
",
            desc = (1u64 << 62) | ((PATTERN_BYTES as u64 / 16) << 32),
            coords = fragment_coordinates().replace("\n  ", "\n").trim_start(),
        );
        for s in 0..steps {
            let at = (s / 4) * n * ROW_BYTES + (s % 4) * 32;
            t.push_str(&descriptor(&format!("%dh{s}"), at));
            t.push_str(&descriptor(&format!("%dl{s}"), self.copy_bytes() + at));
        }
        // The weights of this lane's heads, times 1 / sqrt(H) (zero past the heads).
        for j in 0..n / 8 {
            for e in 0..2 {
                let _ = write!(
                    t,
                    "%wh{j}_{e}_c = arith.constant {c} : index
%wh{j}_{e} = arith.addi %lcol, %wh{j}_{e}_c : index
%win{j}_{e} = arith.cmpi ult, %wh{j}_{e}, %cH : index
%whs{j}_{e} = arith.select %win{j}_{e}, %wh{j}_{e}, %c0 : index
%wv{j}_{e} = memref.load %w[%qrow, %whs{j}_{e}] : memref<?x?xf32>
%wsc{j}_{e} = arith.mulf %wv{j}_{e}, %w_scale : f32
%ws{j}_{e} = arith.select %win{j}_{e}, %wsc{j}_{e}, %zero : f32
",
                    c = 8 * j + e
                );
            }
        }
        // The tile's rows of this thread: keys `%ka` and `%kb` (8 on), read as the last scored key
        // past it.
        let mut body = String::from(
            "%key0 = arith.muli %tile, %tile_keys : index
%ka = arith.addi %key0, %trow0 : index
%kb = arith.addi %ka, %c8 : index
%ka_in = arith.cmpi ult, %ka, %nscored : index
%kb_in = arith.cmpi ult, %kb, %nscored : index
%ra = arith.select %ka_in, %ka, %last_key : index
%rb = arith.select %kb_in, %kb, %last_key : index
%col_l = arith.addi %koff, %lcol : index
",
        );
        let mut words = Vec::new();
        for s in 0..steps {
            // Words 0..4 of the step: (row a, columns 2q..), (row b, 2q..), (a, 2q + 8..), (b, 2q + 8..).
            for (w, (row, half)) in [("a", 0), ("b", 0), ("a", 1), ("b", 1)].into_iter().enumerate() {
                let p = format!("%x{s}_{w}");
                let first = 16 * s + 8 * half;
                let _ = writeln!(
                    body,
                    "{p}_c = arith.constant {first} : index\n{p}_col = arith.addi %col_l, {p}_c : index"
                );
                if self.bf16_keys {
                    // The word as it is (hi), no lo: both columns are inside the key or neither
                    // (`first` and the key's width even).
                    if first + 8 > self.d {
                        let _ = write!(
                            body,
                            "{p}_lc0 = arith.addi %lcol, {p}_c : index
{p}_in = arith.cmpi ult, {p}_lc0, %cD : index
{p}_at = arith.select {p}_in, {p}_col, %koff : index
{load}{p}_h = arith.select {p}_in, {p}_raw, %c0_i32 : i32
",
                            load = pair(&format!("%r{row}"), &format!("{p}_at"), &format!("{p}_raw")),
                        );
                    } else {
                        body.push_str(&pair(&format!("%r{row}"), &format!("{p}_col"), &format!("{p}_h")));
                    }
                    words.push(p);
                    continue;
                }
                let mut vals = Vec::new();
                for e in 0..2 {
                    let v = format!("{p}_v{e}");
                    let col = format!("{p}_col{e}");
                    let _ = writeln!(
                        body,
                        "{col}_k = arith.constant {e} : index\n{col} = arith.addi {p}_col, {col}_k : index"
                    );
                    if first + 8 > self.d {
                        // The key's columns end in this step: zeros past them (read at its first).
                        let _ = write!(
                            body,
                            "{v}_lc0 = arith.addi %lcol, {p}_c : index
{v}_lc = arith.addi {v}_lc0, {col}_k : index
{v}_in = arith.cmpi ult, {v}_lc, %cD : index
{v}_at = arith.select {v}_in, {col}, %koff : index
{load}{v} = arith.select {v}_in, {v}_raw, %zero : f32
",
                            load = key(&format!("%r{row}"), &format!("{v}_at"), &format!("{v}_raw")),
                        );
                    } else {
                        body.push_str(&key(&format!("%r{row}"), &col, &v));
                    }
                    vals.push(v);
                }
                let _ = writeln!(body, "{p}_h = {}", bf16x2(&vals[1], &vals[0]));
                body.push_str(&split_word(&format!("{p}_h"), &vals[0], &vals[1], &format!("{p}_r")));
                let _ = writeln!(body, "{p}_l = {}", bf16x2(&format!("{p}_r1"), &format!("{p}_r0")));
                words.push(p);
            }
        }
        let _ = writeln!(body, "%acc_z0 = llvm.mlir.poison : {frag}");
        for e in 0..n / 2 {
            let _ = writeln!(body, "%acc_z{} = llvm.insertvalue %zero, %acc_z{e}[{e}] : {frag}", e + 1);
        }
        body.push_str("nvvm.wgmma.fence.aligned\n");
        let mut acc = format!("%acc_z{}", n / 2);
        for s in 0..steps {
            let w = &words[4 * s..4 * s + 4];
            let hi: Vec<String> = w.iter().map(|p| format!("{p}_h")).collect();
            let lo: Vec<String> = w.iter().map(|p| format!("{p}_l")).collect();
            let products = [(&hi, format!("%dh{s}")), (&hi, format!("%dl{s}")), (&lo, format!("%dh{s}"))];
            for (i, (a, b)) in products.into_iter().take(self.products()).enumerate() {
                let out = format!("%mma{s}_{i}");
                body.push_str(&wgmma_registers_a(&out, a, &b, &acc, n, false));
                acc = out;
            }
        }
        body.push_str("nvvm.wgmma.commit.group.sync.aligned\nnvvm.wgmma.wait.group.sync.aligned 0\n");
        // Each row's terms in ascending head order, from +0.
        let mut sums = ["%zero".to_string(), "%zero".to_string()];
        for e in 0..n / 2 {
            let (r, c) = fragment_offset(0, e);
            let row = usize::from(r == 8);
            let p = format!("%e{e}");
            let _ = write!(
                body,
                "{p}_x = llvm.extractvalue {acc}[{e}] : {frag}
{p}_s = arith.mulf {p}_x, %qk_scale : f32
{p}_pos = arith.cmpf ogt, {p}_s, %zero : f32
{p}_r = arith.select {p}_pos, {p}_s, %zero : f32
{p}_t = arith.mulf %ws{j}_{c2}, {p}_r : f32
{p}_sum = arith.addf {sum}, {p}_t : f32
",
                j = c / 8,
                c2 = c % 2,
                sum = sums[row],
            );
            sums[row] = format!("{p}_sum");
        }
        for (row, (name, has, lane)) in
            [("a", "%ka_in", "%quad_first"), ("b", "%kb_in", "%quad_second")].iter().enumerate()
        {
            let _ = write!(
                body,
                "%{name}_x1, %{name}_x1_ok = gpu.shuffle xor {s}, %c1_i32s, %c32_i32s : f32
%{name}_p = arith.addf {s}, %{name}_x1 : f32
%{name}_x2, %{name}_x2_ok = gpu.shuffle xor %{name}_p, %c2_i32s, %c32_i32s : f32
%{name}_score = arith.addf %{name}_p, %{name}_x2 : f32
%{name}_put = arith.andi {has}, {lane} : i1
scf.if %{name}_put {{
  memref.store %{name}_score, %scores[%qrow, %k{name}] : memref<?x?xf32>
}}
",
                s = sums[row],
            );
        }
        let _ = write!(t, "scf.for %tile = %part to %tiles step %cParts {{\n{}}}\n", indent(&body, 2));
        t
    }

    /// The CPU lowering: keys `part 64 + tid (tid < 64) + 64 parts i` of the query, each score in
    /// the GPU kernel's order.
    fn cpu_scores(&self, key: &dyn Fn(&str, &str, &str) -> String) -> String {
        let n = self.n();
        // The (key, head) product: per step hi.hi, hi.lo, lo.hi over its 16 columns.
        let product = |which: &str, from: &str, to: &str, k_part: &str, q_part: &str| {
            format!(
                "{to} = scf.for %kk = %c0 to %c16 step %c1 iter_args(%x = {from}) -> (f32) {{
  %col = arith.addi %s16, %kk : index
  %cin = arith.cmpi ult, %col, %cD : index
  %cs = arith.select %cin, %col, %c0 : index
  %kcol = arith.addi %koff, %cs : index
{load}  %kv = arith.select %cin, %kv0, %zero : f32
{kround}  %kl_x = arith.subf %kv, %kh_f : f32
{klround}  %qin = arith.andi %cin, %hin : i1
  %qv0 = memref.load %q[%qrow, %hs, %cs] : memref<?x?x?xf32>
  %qv = arith.select %qin, %qv0, %zero : f32
{qround}  %ql_x = arith.subf %qv, %qh_f : f32
{qlround}  %pr = arith.mulf {k_part}, {q_part} : f32
  %xn = arith.addf %x, %pr : f32
  scf.yield %xn : f32
}}
// {which}
",
                load = indent(&key("%k", "%kcol", "%kv0"), 2),
                kround = round_bf16("%kv", "%kh"),
                klround = round_bf16("%kl_x", "%kl"),
                qround = round_bf16("%qv", "%qh"),
                qlround = round_bf16("%ql_x", "%ql"),
            )
        };
        // (bf16 keys: no lo.hi, the keys' lo being zero.)
        let dot = format!(
            "%dot = scf.for %s = %c0 to %c_steps step %c1 iter_args(%a = %zero) -> (f32) {{
  %s16 = arith.muli %s, %c16 : index
{hh}{hl}{lh}  scf.yield {last} : f32
}}
",
            hh = indent(&product("hi.hi", "%a", "%a1", "%kh_f", "%qh_f"), 2),
            hl = indent(&product("hi.lo", "%a1", "%a2", "%kh_f", "%ql_f"), 2),
            lh = match self.bf16_keys {
                true => String::new(),
                false => indent(&product("lo.hi", "%a2", "%a3", "%kl_f", "%qh_f"), 2),
            },
            last = if self.bf16_keys { "%a2" } else { "%a3" },
        );
        // Lane q's sum over its heads 8 j + 2 q + e, j then e ascending.
        let mut lanes = String::new();
        for q in 0..4 {
            let _ = write!(
                lanes,
                "%lane{q} = scf.for %j = %c0 to %c_groups step %c1 iter_args(%sq = %zero) -> (f32) {{
  %h8 = arith.muli %j, %c8 : index
  %hq = arith.addi %h8, %c{q2}_ix : index
  %pair = scf.for %e = %c0 to %c2 step %c1 iter_args(%se = %sq) -> (f32) {{
    %h = arith.addi %hq, %e : index
    %hin = arith.cmpi ult, %h, %cH : index
    %hs = arith.select %hin, %h, %c0 : index
{dot}{term}    scf.yield %sn : f32
  }}
  scf.yield %pair : f32
}}
",
                q2 = 2 * q,
                dot = indent(&dot, 4),
                term = indent(
                    "%wv0 = memref.load %w[%qrow, %hs] : memref<?x?xf32>
%wsc = arith.mulf %wv0, %w_scale : f32
%ws = arith.select %hin, %wsc, %zero : f32
%sc = arith.mulf %dot, %qk_scale : f32
%pos = arith.cmpf ogt, %sc, %zero : f32
%rl = arith.select %pos, %sc, %zero : f32
%tm = arith.mulf %ws, %rl : f32
%sn = arith.addf %se, %tm : f32
",
                    4
                ),
            );
        }
        format!(
            "%c16_i32 = arith.constant 16 : i32
%c7fff_i32 = arith.constant 32767 : i32
%c8 = arith.constant 8 : index
%c16 = arith.constant 16 : index
%c0_ix = arith.constant 0 : index
%c2_ix = arith.constant 2 : index
%c4_ix = arith.constant 4 : index
%c6_ix = arith.constant 6 : index
%c_steps = arith.constant {steps} : index
%c_groups = arith.constant {groups} : index
%tile_stride = arith.muli %tile_keys, %cParts : index
%lower_half = arith.cmpi ult, %tid, %tile_keys : index
scf.if %lower_half {{
  %k0 = arith.addi %part_first, %tid : index
  scf.for %k = %k0 to %nscored step %tile_stride {{
{lanes}    %s01 = arith.addf %lane0, %lane1 : f32
    %s23 = arith.addf %lane2, %lane3 : f32
    %score = arith.addf %s01, %s23 : f32
    memref.store %score, %scores[%qrow, %k] : memref<?x?xf32>
  }}
}}
",
            steps = self.steps(),
            groups = n / 8,
            lanes = indent(&lanes, 4),
        )
    }
}

/// The rest of the f32 values `v0`, `v1` after their bf16 pair `word` (v0 in the low half):
/// `{out}0`, `{out}1` (exact: a bf16 keeps the top of the value's bits). Uses `%c16_i32s` and
/// `%hi_mask` (-65536).
fn split_word(word: &str, v0: &str, v1: &str, out: &str) -> String {
    format!(
        "{out}_w0 = arith.shli {word}, %c16_i32s : i32
{out}_w1 = arith.andi {word}, %hi_mask : i32
{out}_f0 = arith.bitcast {out}_w0 : i32 to f32
{out}_f1 = arith.bitcast {out}_w1 : i32 to f32
{out}0 = arith.subf {v0}, {out}_f0 : f32
{out}1 = arith.subf {v1}, {out}_f1 : f32
"
    )
}
