//! MLA attention on the tensor cores: decode (absorbed form, FlashMLA's problem) over a paged bf16
//! latent cache with split K over long contexts and the combine step, and causal prefill as flash
//! attention ([`MlaPrefillConfig`]).
//!
//! The attention kernel ([`MlaDecodeConfig`], [`emit`]): one block per (sequence, 64 query rows, K
//! split). Query rows are the absorbed queries `[q_abs | q_pe]` (`kv + rope` wide, bf16), 64 per block
//! (the wgmma M: all heads of a sequence in 1 or 2 blocks); the cache is `[pages * 64, kv + rope]`
//! bf16, 64 rows per page, a sequence's pages named by its row of the block table (pages need not be
//! contiguous or in order). Per block:
//! - the query tile is loaded once (TMA, 128-byte swizzle, 64-column boxes), the split's pages stream
//!   through a ring of `stages` page buffers (TMA into mbarrier-tracked buffers, refilled after a block
//!   barrier);
//! - warpgroup 0 computes `S = Q K^T` for the page's 64 keys (wgmma m64n64k16 over the `kv + rope`
//!   columns, both operands K-major from shared memory), masks the keys past the sequence (a page
//!   every row sees whole skips the masks: [`interior_or_masked`]), and runs
//!   the online softmax in f32 (exp2 of scores pre-scaled by `scale * log2 e`, row maxima across the
//!   4 lanes sharing a row, the thread's partial row sums, reduced across the quad at the end); it
//!   writes `P` (bf16, the 128-byte-swizzled K-major layout wgmma reads) and each row's rescale
//!   factor (f32, 256 B) to shared memory — FlashMLA's division of the work: one m64n64 a k16 step
//!   reads the query's 2 KiB once for 64 keys, where each warpgroup scoring half the keys (m64n32)
//!   read it twice for the same multiply-adds;
//! - after a proxy fence and a block barrier both warpgroups rescale their accumulators by those
//!   factors and multiply the whole `P` by the page's values — the first `kv` columns of the same
//!   buffer, read MN-major (transposed B) — each into its half of the output columns (`kv / 2`
//!   columns: `kv / 128` accumulators of m64n64, multiplied as one `wgmma m64n(kv / 2)k16` a k16
//!   step);
//! - the split's normalized output `o_part [splits, rows, kv]` (f32) and its log-sum-exp `lse
//!   [splits, rows]` (natural log; `-inf` and zeros for a split without keys) are written.
//!
//! On a sequence's last page the rows past its length are zeroed in shared memory first (a masked
//! key's P of 0 would still multiply whatever the cache holds there).
//!
//! Clusters (`cluster` 2, DeepSeek-V3's 128 heads: two blocks of 64 query rows a sequence, which
//! read the same pages): the pair runs as a cluster; each block's leader loads every other box of a
//! page (from its rank's) by TMA multicast into both blocks' buffers — half the L2-to-SM traffic and
//! TMA issue a block, and the page read once. A consumed buffer is released on both blocks' empty
//! barriers (one arrival from each block's leader, the peer's through `mapa`), and a leader refills
//! it only when both have; a cluster barrier after the barriers' initialization and another before
//! the blocks leave.
//!
//! [`crate::conversion::sm90::rows::RowOp::MlaCombine`] then merges the splits:
//! `out = sum_z exp(lse_z - max) o_z / sum_z exp(lse_z - max)`.
//!
//! Several new tokens per sequence (MTP's speculative decoding) are causal among themselves: token t
//! of T sees the keys before `len - T + t + 1`.
//!
//! DeepSeek-V3.2's sparse attention (`_sel`, [`MlaDecodeConfig::selected`]): each query token is a
//! sequence whose keys are the rows its selection names, gathered by the block's threads from f32
//! rows into the page buffers (no TMA can gather rows) — prefill's queries from the same rows (a
//! bf16 copy of them, `_sel16`: half the bytes, copied as they are), decode's each from its
//! sequence's cache.
//!
//! The fp8 cache option (`fp8_cache`): the latent stored as e4m3 with one f32 scale per row and
//! 128 columns (the rope part bf16) — 40% less cache traffic; each page is decoded (`cvt.rn.f16x2.e4m3x2`),
//! scaled and rounded to bf16 into one shared buffer the tensor cores read (wgmma reads e4m3 only
//! K-major, and `P V` needs the values transposed).
//!
//! With a ring of two page buffers or more (bf16 cache), warpgroup 0 may run a page ahead: it scores
//! page `j + 1` while both multiply page `j`'s P by its values, its online softmax overlapping the
//! tensor cores' `P V` ([`MlaDecodeConfig::pipelined`]) — but a buffer is then busy for two steps,
//! and two buffers load no page ahead. DeepSeek-V3's default is the serial loop over two buffers
//! ([`MlaDecodeConfig::serial`]), which loads a page ahead; the tuner measures both. Not yet: warp
//! specialization (a producer warp), both warpgroups scoring (FlashMLA's later "seesaw" schedule),
//! and a second P buffer (it does not fit beside DeepSeek-V3's two 72 KiB page buffers).

use std::fmt::Write;

use super::gemm::{
    arrive_on_peer, constants, fragment_coordinates, fragment_offset, indent, lane0_broadcast, STATIC_SHARED_BYTES,
    WORKGROUP,
};
use crate::target::GpuTarget;

/// Rows of a cache page (the block size of the paged cache), and query rows per block.
pub const PAGE: usize = 64;
/// Columns per TMA box and shared-memory chunk: 128 bytes of bf16 (one 128-byte swizzle row).
const CHUNK: usize = 64;
/// Bytes of one 64 x 64 bf16 chunk.
const CHUNK_BYTES: usize = PAGE * CHUNK * 2;
/// Threads: two consumer warpgroups.
const THREADS: usize = 256;

/// One MLA decode attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDecodeConfig {
    /// Latent (value) width: a multiple of 128 up to 512 (each warpgroup owns `kv / 2` columns).
    pub kv: usize,
    /// RoPE key width after the latent: a positive multiple of 64.
    pub rope: usize,
    /// Page buffers in the ring (1 to 4, as shared memory allows).
    pub stages: usize,
    /// The fp8 cache: the latent as e4m3 with one f32 scale per row and 128 columns (the rope part
    /// stays bf16), converted to bf16 in shared memory page by page before the tensor cores read it.
    pub fp8_cache: bool,
    /// Blocks per cluster along x (1 or 2). With 2, the blocks of a sequence's query rows 0..63 and
    /// 64..127 (and so on) share each page: each loads half of its boxes and multicasts them into
    /// both — half the L2-to-SM traffic and TMA issue a block. Launches must pair such blocks: an
    /// even number of 64-row blocks a sequence ([`Self::cluster_for`]).
    pub cluster: usize,
    /// The serial page loop with a ring of two or more bf16 page buffers (`_serial`): warpgroup 0
    /// scores the page both then multiply, so a buffer is busy for one step and the ring loads
    /// `stages - 1` pages ahead, where the pipelined loop ([`Self::pipelined`]) holds a page for
    /// two steps (scored in one, multiplied in the next) and loads `stages - 2` ahead: with
    /// DeepSeek-V3's two buffers, none — every page's load waited for in full. A ring of one buffer
    /// and the fp8 cache always run the serial loop (the flag is refused there: it would name the
    /// same kernel twice).
    pub serial: bool,
    /// DeepSeek-V3.2's attention over each query's selected rows (`_sel`): no paged cache — the
    /// keys are f32 rows (`[S, C]`, `C >= kv + rope`; decode: each sequence's cache rows, `[B, S,
    /// C]`) and each sequence (one query token's heads) reads the rows its row of the selection
    /// (`[T, K]` i32, ascending, -1 padded) names, in that order. The threads gather a page of 64
    /// selected rows, rounded to bf16, into a ring of two buffers — warpgroup 1 the next page
    /// while warpgroup 0 scores this one — where the tensor cores read them as they read a cache
    /// page ([`Emitter::selected_loop`]). Two buffers, the bf16 layout, no cluster (nothing to
    /// multicast: no TMA loads a page), not `_serial`.
    pub selected: bool,
    /// The selected rows are bf16 (`_sel16`: prefill's copy of the key rows, `[S, C]` bf16), copied
    /// into the page buffers as they are — half the bytes of the f32 rows, no rounding on the way.
    /// Only with [`Self::selected`].
    pub bf16_rows: bool,
}

impl MlaDecodeConfig {
    /// DeepSeek-V3.2's attention over the selected rows ([`Self::selected`]): V3's widths.
    pub const DEEPSEEK_V32_SELECTED: MlaDecodeConfig = MlaDecodeConfig {
        kv: 512,
        rope: 64,
        stages: 2,
        fp8_cache: false,
        cluster: 1,
        serial: false,
        selected: true,
        bf16_rows: false,
    };

    /// DeepSeek-V3's: 512 latent + 64 rope columns, two page buffers in the serial loop, a bf16
    /// cache, its 128 heads' two blocks a sequence in a cluster (the cost model's pick).
    pub const DEEPSEEK_V3: MlaDecodeConfig = MlaDecodeConfig {
        kv: 512,
        rope: 64,
        stages: 2,
        fp8_cache: false,
        cluster: 2,
        serial: true,
        selected: false,
        bf16_rows: false,
    };

    /// The cluster a launch of `heads` query rows per token takes: 2 when a sequence's rows fill
    /// an even number of 64-row blocks whatever its tokens (heads a multiple of 128), else 1.
    pub fn cluster_for(heads: usize) -> usize {
        if heads > 0 && heads.is_multiple_of(2 * PAGE) {
            2
        } else {
            1
        }
    }

    /// `mla_decode_kv512_r64_p64_s2_cl2_serial` (`_cl2`: clusters of 2; `_serial`: the serial loop
    /// of a deeper ring, [`Self::serial`]; `_fp8`: the fp8 cache; `_sel`: the selected rows,
    /// [`Self::selected`], `_sel16` of bf16 rows, [`Self::bf16_rows`]).
    pub fn kernel_name(&self) -> String {
        let fp8 = if self.fp8_cache { "_fp8" } else { "" };
        let sel = match (self.selected, self.bf16_rows) {
            (false, false) => "",
            (true, false) => "_sel",
            (_, true) => "_sel16",
        };
        let serial = if self.serial { "_serial" } else { "" };
        let cluster = if self.cluster != 1 { format!("_cl{}", self.cluster) } else { String::new() };
        format!("mla_decode_kv{}_r{}_p{PAGE}_s{}{cluster}{serial}{fp8}{sel}", self.kv, self.rope, self.stages)
    }

    /// The configuration a [`Self::kernel_name`] names.
    pub fn from_name(name: &str) -> Option<MlaDecodeConfig> {
        let rest = name.strip_prefix("mla_decode_kv")?;
        let (kv, rest) = rest.split_once("_r")?;
        let (rope, rest) = rest.split_once(&format!("_p{PAGE}_s"))?;
        let (rest, selected, bf16_rows) = match (rest.strip_suffix("_sel16"), rest.strip_suffix("_sel")) {
            (Some(rest), _) => (rest, true, true),
            (None, Some(rest)) => (rest, true, false),
            (None, None) => (rest, false, false),
        };
        let (rest, fp8_cache) = match rest.strip_suffix("_fp8") {
            Some(rest) => (rest, true),
            None => (rest, false),
        };
        let (rest, serial) = match rest.strip_suffix("_serial") {
            Some(rest) => (rest, true),
            None => (rest, false),
        };
        let number = |s: &str| s.parse::<usize>().ok().filter(|_| s.bytes().all(|b| b.is_ascii_digit()));
        let (stages, cluster) = match rest.split_once("_cl") {
            Some((stages, cluster)) => (stages, number(cluster)?),
            None => (rest, 1),
        };
        let (kv, rope, stages) = (number(kv)?, number(rope)?, number(stages)?);
        let config = MlaDecodeConfig { kv, rope, stages, fp8_cache, cluster, serial, selected, bf16_rows };
        (config.kernel_name() == name).then_some(config)
    }

    /// The selected rows' element type ([`Self::bf16_rows`]).
    fn rows_element(&self) -> &'static str {
        if self.bf16_rows {
            "bf16"
        } else {
            "f32"
        }
    }

    /// Columns of a query or cache row.
    pub fn dim(&self) -> usize {
        self.kv + self.rope
    }

    /// 64-column chunks of a row.
    fn chunks(&self) -> usize {
        self.dim() / CHUNK
    }

    /// Output columns per warpgroup, in 64-column accumulators.
    fn accumulators(&self) -> usize {
        self.kv / 2 / CHUNK
    }

    fn query_bytes(&self) -> usize {
        self.chunks() * CHUNK_BYTES
    }

    /// A page buffer: the page's rows as bf16 chunks, or (fp8 cache) the e4m3 latent (`kv` bytes a
    /// row, in 128-column boxes of 8 KiB) then the bf16 rope chunks.
    fn stage_bytes(&self) -> usize {
        if self.fp8_cache {
            PAGE * self.kv + (self.rope / CHUNK) * CHUNK_BYTES
        } else {
            self.chunks() * CHUNK_BYTES
        }
    }

    /// Latent chunks (64 columns) of a row.
    fn latent_chunks(&self) -> usize {
        self.kv / CHUNK
    }

    /// Offset of the bf16 latent the fp8 cache's page converts into (one buffer, reused).
    fn converted_offset(&self) -> usize {
        self.query_bytes() + self.stages * self.stage_bytes()
    }

    /// Offset of `P` (64 x 64 bf16) in shared memory.
    fn p_offset(&self) -> usize {
        self.converted_offset() + if self.fp8_cache { self.latent_chunks() * CHUNK_BYTES } else { 0 }
    }

    /// Offset of the rows' statistics warpgroup 0 shares (f32 `[64]`: a page's rescale factors,
    /// at the end the rows' sums), after `P`.
    fn exchange_offset(&self) -> usize {
        self.p_offset() + CHUNK_BYTES
    }

    /// Whether the page loop overlaps the next page's `S` with this one's `P V`
    /// ([`Emitter::pipelined_loop`]): a ring of two buffers or more (the next page is in one while
    /// this one is multiplied) of the bf16 cache (the fp8 cache's pages are converted into one
    /// buffer both products read), unless [`Self::serial`].
    pub fn pipelined(&self) -> bool {
        self.stages >= 2 && !self.fp8_cache && !self.serial && !self.selected
    }

    /// Pages the ring loads ahead of the one the block waits for next: a buffer is refilled when
    /// its page is multiplied, and waited for `stages - 1` steps later (the serial loop) or, a page
    /// ahead, `stages - 2` (the pipelined loop's next page is scored in the step before its own).
    pub fn loads_ahead(&self) -> usize {
        self.stages - 1 - usize::from(self.pipelined())
    }

    /// Dynamic shared memory: the query tile, the page ring, (fp8 cache) the converted latent, `P`,
    /// the rows' statistics.
    pub fn shared_memory_bytes(&self) -> usize {
        self.exchange_offset() + PAGE * 4
    }

    pub fn threads(&self) -> usize {
        THREADS
    }

    /// The launch grid: one block per (sequence, 64 query rows) along x, K splits along y.
    pub fn grid(&self, sequences: usize, rows_per_sequence: usize, splits: usize) -> (usize, usize) {
        (sequences * rows_per_sequence.div_ceil(PAGE), splits)
    }

    /// Why this configuration cannot be generated for `target`, if it cannot.
    pub fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        let name = self.kernel_name();
        if self.kv == 0 || !self.kv.is_multiple_of(2 * CHUNK) || self.kv > 512 {
            return Err(format!(
                "{name}: a latent width of {} (a multiple of 128 up to 512: each of the two warpgroups \
                 accumulates kv / 2 columns in registers)",
                self.kv
            ));
        }
        if self.rope == 0 || !self.rope.is_multiple_of(CHUNK) {
            return Err(format!("{name}: a rope width of {} (a positive multiple of 64)", self.rope));
        }
        if !(1..=4).contains(&self.stages) {
            return Err(format!("{name}: {} page buffers (1 to 4)", self.stages));
        }
        if !(1..=2).contains(&self.cluster) {
            return Err(format!("{name}: clusters of {} blocks (1 or 2)", self.cluster));
        }
        if self.serial && (self.stages < 2 || self.fp8_cache) {
            return Err(format!(
                "{name}: `_serial` with {} (its page loop is the serial one already: name it without)",
                if self.fp8_cache { "the fp8 cache" } else { "one page buffer" }
            ));
        }
        if self.selected && (self.stages != 2 || self.fp8_cache || self.cluster != 1 || self.serial) {
            return Err(format!(
                "{name}: the selected rows' kernel takes two page buffers of bf16 rows, no cluster and its own loop \
                 (`_s2_sel`)"
            ));
        }
        if self.bf16_rows && !self.selected {
            return Err(format!("{name}: bf16 rows without the selected rows' kernel (`_sel16`)"));
        }
        let what = format!(
            "query tile, {} page buffers of {} B, {}P, row statistics, barriers",
            self.stages,
            self.stage_bytes(),
            if self.fp8_cache { "the converted latent, " } else { "" }
        );
        check_shared_memory(&name, self.shared_memory_bytes(), &what, target)
    }
}

/// The kernel's `gpu.module` text. Arguments, in order: `%q_ptr`, `%kv_ptr` (CUtensorMap pointers:
/// 2-D bf16 `[rows, kv + rope]`, box `[64 columns, 64 rows]`, 128-byte swizzle, out-of-bounds zero
/// fill; the queries `[sequences * rows_per_sequence, ..]`, the cache `[pages * 64, ..]`),
/// `%block_table` (i32 `[sequences, max_pages]`), `%seqlens` (i32 `[sequences]`), `%o_part` (f32
/// `[splits, sequences * rows_per_sequence, kv]`, 8-byte aligned: stored in column pairs), `%lse` (f32 `[splits, sequences *
/// rows_per_sequence]`), `%rows_per_sequence` (index: tokens x heads), `%heads` (index: query rows
/// per token), `%scale` (f32, the softmax scale). A sequence's rows are its new tokens' heads, token
/// by token: token t of T sees the keys before position `len - T + t + 1` (T = 1: all of them; T > 1:
/// MTP's speculative tokens, causal among themselves). Launch:
/// [`MlaDecodeConfig::threads`] threads, [`MlaDecodeConfig::shared_memory_bytes`] of dynamic shared
/// memory, [`MlaDecodeConfig::grid`] blocks.
///
/// With the fp8 cache, `%kv_ptr` maps the e4m3 latent `[pages * 64, kv]` (bytes: box `[128, 64
/// rows]`, no swizzle) and two arguments follow it: `%rope_ptr` (the bf16 rope part `[pages * 64,
/// rope]`, mapped like the bf16 cache) and `%kv_scale` (f32 `[pages * 64, kv / 128]`).
///
/// The selected rows' kernel ([`MlaDecodeConfig::selected`]) takes `%keys` (f32 `[rows, C]`) and
/// `%selected` (i32 `[sequences, K]`) for `%kv_ptr`, the table and the lengths, and `%seq_rows`
/// (index, last: the key rows a sequence's entries count from are `seq * seq_rows`) — one token a
/// sequence.
pub fn emit(config: &MlaDecodeConfig, target: &GpuTarget) -> Result<String, String> {
    config.validate(target)?;
    Ok(Emitter { c: *config }.module())
}

struct Emitter {
    c: MlaDecodeConfig,
}

/// One m64n64 f32 accumulator fragment (32 values per thread).
const FRAG: &str = "!llvm.struct<(f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, \
                    f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32, f32)>";

/// Values of one fragment per thread.
const FRAG_N: usize = 32;

impl Emitter {
    /// The page buffers' empty barriers expect one arrival per block of a cluster (each block's
    /// leader releases a page on both); a block alone has none (a block barrier frees a page).
    fn empty_arrivals(&self) -> Option<usize> {
        (self.c.cluster > 1).then_some(self.c.cluster)
    }

    fn module(&self) -> String {
        let c = &self.c;
        let fp8_args = if c.fp8_cache { "%rope_ptr: !llvm.ptr, %kv_scale: memref<?x?xf32>, " } else { "" };
        let tmap8 = "!tmap8 = !nvgpu.tensormap.descriptor<tensor = memref<64x128xi8, 3>, swizzle = none, l2promo = none, oob = zero, interleave = none>\n";
        let seq_rows = if c.selected { ", %seq_rows: index" } else { "" };
        let keys = match c.selected {
            true => format!("%keys: memref<?x?x{}>, %selected: memref<?x?xi32>", c.rows_element()),
            false => format!("%kv_ptr: !llvm.ptr, {fp8_args}%block_table: memref<?x?xi32>, %seqlens: memref<?xi32>"),
        };
        let head = module_head(
            &c.kernel_name(),
            c.stages,
            c.cluster,
            self.empty_arrivals(),
            if c.fp8_cache { tmap8 } else { "" },
            &format!(
                "%q_ptr: !llvm.ptr, {keys}, %o_part: memref<?x?x?xf32>, %lse: memref<?x?xf32>, \
                 %rows_per_sequence: index, %heads: index, %scale: f32{seq_rows}"
            ),
        );
        let mut body = format!("{}{}{}", self.prelude(), self.main_loop(), self.epilogue());
        if c.cluster > 1 {
            // No block leaves while its peer may still multicast into its shared memory or arrive
            // on its barriers.
            body.push_str("  nvvm.cluster.arrive\n  nvvm.cluster.wait\n");
        }
        module_text(&head, &body)
    }

    /// Block coordinates, the split's pages, shared memory and barriers, the query tile's and the
    /// first pages' loads, and the thread's place in the accumulator layout.
    fn prelude(&self) -> String {
        let c = &self.c;
        let ws = WORKGROUP;
        let (stages, chunks) = (c.stages, c.chunks());
        let mut t = format!(
            "{consts}  %q_map = builtin.unrealized_conversion_cast %q_ptr : !llvm.ptr to !tmap
{kv_maps}  %tid = gpu.thread_id x
  %bx = gpu.block_id x
  %z = gpu.block_id y
  %splits = gpu.grid_dim y
  %row_blocks = arith.ceildivui %rows_per_sequence, %c{PAGE} : index
  %seq = arith.divui %bx, %row_blocks : index
  %rb = arith.remui %bx, %row_blocks : index
  %r_first = arith.muli %rb, %c{PAGE} : index
  %seq_row0 = arith.muli %seq, %rows_per_sequence : index
  %row0 = arith.addi %seq_row0, %r_first : index
{len}  %pages = arith.ceildivui %len, %c{PAGE} : index
  %per = arith.ceildivui %pages, %splits : index
  %p0_raw = arith.muli %z, %per : index
  %p0 = arith.minui %p0_raw, %pages : index
  %p1_raw = arith.addi %p0_raw, %per : index
  %p1 = arith.minui %p1_raw, %pages : index
  %np = arith.subi %p1, %p0 : index
{cluster}{barriers}",
            consts = kernel_constants(),
            len = if c.selected {
                SELECTED_COUNT
            } else {
                "  %len_i = memref.load %seqlens[%seq] : memref<?xi32>\n  %len = arith.index_cast %len_i : i32 to index\n"
            },
            // The cluster's blocks: this one's rank, the other's, both in the multicasts' mask.
            cluster = if c.cluster > 1 {
                "  %rank_i32 = nvvm.read.ptx.sreg.cluster.ctaid.x : i32
  %rank = arith.index_cast %rank_i32 : i32 to index
  %rank0 = arith.cmpi eq, %rank, %c0 : index
  %peer_i32 = arith.subi %c1_i32, %rank_i32 : i32
  %mcast = arith.constant 3 : i16
"
            } else {
                ""
            },
            barriers = shared_memory_and_barriers(
                stages,
                c.cluster,
                self.empty_arrivals(),
                c.query_bytes(),
                match (c.selected, c.fp8_cache) {
                    (true, _) => &[][..],
                    (false, true) => &[("%kv_map", "!tmap8"), ("%rope_map", "!tmap")][..],
                    (false, false) => &[("%kv_map", "!tmap")][..],
                }
            ),
            kv_maps = if c.selected {
                ""
            } else if c.fp8_cache {
                "  %kv_map = builtin.unrealized_conversion_cast %kv_ptr : !llvm.ptr to !tmap8\n  %rope_map = builtin.unrealized_conversion_cast %rope_ptr : !llvm.ptr to !tmap\n"
            } else {
                "  %kv_map = builtin.unrealized_conversion_cast %kv_ptr : !llvm.ptr to !tmap\n"
            },
        );
        for k in 0..chunks {
            let _ = writeln!(
                t,
                "    %qv{k} = memref.view %smem[%c{off}][] : memref<?xi8, {ws}> to memref<{PAGE}x{CHUNK}xbf16, {ws}>
    nvgpu.tma.async.load %q_map[%c{col}, %row0], %bars[%c{stages}] to %qv{k} : !tmap, !bar -> memref<{PAGE}x{CHUNK}xbf16, {ws}>",
                off = k * CHUNK_BYTES,
                col = k * CHUNK
            );
        }
        if c.selected {
            // The threads gather the pages ([`Self::selected_loop`]).
            t.push_str("  }\n");
        } else {
            let _ = writeln!(
                t,
                "    %pro = arith.minui %np, %c{stages} : index
    scf.for %j = %c0 to %pro step %c1 {{
{}
    }}
  }}",
                indent(&self.load_page("%j", "%j"), 6)
            );
        }
        let _ = writeln!(
            t,
            "{coords}  %trow = arith.addi %trow0, %c0 : index
  %is_wg0 = arith.cmpi eq, %cw, %c0 : index
  %tokens = arith.divui %rows_per_sequence, %heads : index
  %len_t = arith.subi %len, %tokens : index
  %mrow0 = arith.addi %r_first, %trow : index
  %mrow1 = arith.addi %mrow0, %c8 : index
  %tok0 = arith.divui %mrow0, %heads : index
  %tok1 = arith.divui %mrow1, %heads : index
  %lim0_a = arith.addi %len_t, %tok0 : index
  %lim0_b = arith.addi %lim0_a, %c1 : index
  %lim0 = arith.minui %lim0_b, %len : index
  %lim1_a = arith.addi %len_t, %tok1 : index
  %lim1_b = arith.addi %lim1_a, %c1 : index
  %lim1 = arith.minui %lim1_b, %len : index
  %wtok = arith.divui %r_first, %heads : index
  %wlim_a = arith.addi %len_t, %wtok : index
  %wlim_b = arith.addi %wlim_a, %c1 : index
  %wlim = arith.minui %wlim_b, %len : index
  %cw_bytes = arith.muli %cw, %c{half} : index
  %cw_bytes64 = arith.index_cast %cw_bytes : index to i64
  %p_addr = arith.addi %smem_base, %c{p_off}_i64 : i64
  %xview = memref.view %smem[%c{x_off}][] : memref<?xi8, {ws}> to memref<{PAGE}xf32, {ws}>
  %first_lane = arith.cmpi eq, %lcol0, %c0 : index
  %shares_rows = arith.andi %is_wg0, %first_lane : i1
{dp}
{zero}",
            coords = uniform_fragment_coordinates(),
            half = c.accumulators() * CHUNK_BYTES,
            p_off = c.p_offset(),
            x_off = c.exchange_offset(),
            dp = desc("%dp", "%p_addr", "%desc_k"),
            zero = zero_fragment(),
        );
        if c.pipelined() {
            // The last page's "next scores": nothing seen.
            t.push_str(&filled_fragment("nfrag", "%ninf"));
        }
        // Every thread waits for the query tile (the barrier's first phase).
        let _ = writeln!(
            t,
            "  nvgpu.mbarrier.try_wait.parity %bars[%c{stages}], %parity0, %ticks : !bar",
            stages = c.stages
        );
        t
    }

    /// TMA loads of the split's page `j` (its `j`-th page) into ring buffer `j mod stages` (one
    /// thread). In a cluster, block `rank` loads every other box, from its `rank`-th, multicast into
    /// both blocks' buffers (each block's barrier expects the whole page).
    fn load_page(&self, j: &str, i: &str) -> String {
        let c = &self.c;
        let ws = WORKGROUP;
        let mut t = format!(
            "%lp_st = arith.remui {i}, %c{stages} : index
%lp_page = arith.addi %p0, {j} : index
%lp_blk_i = memref.load %block_table[%seq, %lp_page] : memref<?x?xi32>
%lp_blk = arith.index_cast %lp_blk_i : i32 to index
%lp_row = arith.muli %lp_blk, %c{PAGE} : index
%lp_st_off = arith.muli %lp_st, %c{stage_bytes} : index
%lp_base = arith.addi %lp_st_off, %c{q_bytes} : index
nvgpu.mbarrier.arrive.expect_tx %bars[%lp_st], %c{stage_bytes} : !bar
",
            stages = c.stages,
            stage_bytes = c.stage_bytes(),
            q_bytes = c.query_bytes()
        );
        let mcast = if c.cluster > 1 { " multicast_mask = %mcast" } else { "" };
        // One box: its name, tensor map (and type), column, byte offset in the buffer, memref type.
        let bf16_box = format!("{PAGE}x{CHUNK}xbf16");
        let load = |name: &str, map: &str, map_ty: &str, col: usize, off: usize, ty: &str| {
            format!(
                "%lp_o{name} = arith.addi %lp_base, %c{off} : index
%lp_{name} = memref.view %smem[%lp_o{name}][] : memref<?xi8, {ws}> to memref<{ty}, {ws}>
nvgpu.tma.async.load {map}[%c{col}, %lp_row], %bars[%lp_st] to %lp_{name}{mcast} : {map_ty}, !bar -> memref<{ty}, {ws}>
"
            )
        };
        let boxes: Vec<String> = if c.fp8_cache {
            // The e4m3 latent in 128-byte boxes, then the bf16 rope chunks.
            let latent = (0..c.kv / 128).map(|b| {
                load(&format!("b8_{b}"), "%kv_map", "!tmap8", b * 128, b * PAGE * 128, &format!("{PAGE}x128xi8"))
            });
            let rope = (0..c.rope / CHUNK).map(|r| {
                load(&format!("r{r}"), "%rope_map", "!tmap", r * CHUNK, PAGE * c.kv + r * CHUNK_BYTES, &bf16_box)
            });
            latent.chain(rope).collect()
        } else {
            (0..c.chunks())
                .map(|k| load(&format!("v{k}"), "%kv_map", "!tmap", k * CHUNK, k * CHUNK_BYTES, &bf16_box))
                .collect()
        };
        if c.cluster == 1 {
            t.push_str(&boxes.concat());
            return t;
        }
        let share = |rank: usize| -> String { boxes.iter().skip(rank).step_by(c.cluster).cloned().collect() };
        let _ = writeln!(t, "scf.if %rank0 {{\n{}\n}} else {{\n{}\n}}", indent(&share(0), 2), indent(&share(1), 2));
        t
    }

    /// fp8 cache: the page's e4m3 latent (ring buffer `%st`) decoded, scaled by its row's 1x128
    /// scales and rounded to bf16 into the converted buffer, in the 128-byte-swizzled chunks the
    /// tensor cores read (rows past the sequence's length as zeros); then a proxy fence and a block
    /// barrier. Each thread converts 16-byte units of a row: one 16-byte load, 8 pairs through
    /// `cvt.rn.f16x2.e4m3x2`, each pair rounded to bf16 together (`cvt.rn.bf16x2.f32`), and the 16
    /// columns stored as the two 16-byte units of the swizzled chunk they land in.
    fn convert_page(&self) -> String {
        let c = &self.c;
        let units_per_row = c.kv / 16;
        let mut t = format!(
            "%cv_valid = arith.select %zero_tail, %tail, %c{PAGE} : index
%cv_src_off = arith.addi %st_off, %c{q_bytes} : index
%cv_src_off64 = arith.index_cast %cv_src_off : index to i64
%cv_src = arith.addi %smem_base, %cv_src_off64 : i64
%cv_dst = arith.addi %smem_base, %c{dst_off}_i64 : i64
%cv_zero_unit = arith.constant dense<0> : vector<4xi32>
scf.for %u = %tid to %c{units} step %c{THREADS} {{
  %cv_r = arith.divui %u, %c{units_per_row} : index
  %cv_uc = arith.remui %u, %c{units_per_row} : index
  %cv_in = arith.cmpi ult, %cv_r, %cv_valid : index
  %cv_grp = arith.divui %cv_uc, %c8 : index
  %cv_col0 = arith.muli %cv_uc, %c16 : index
  %cv_col1 = arith.addi %cv_col0, %c8 : index
{dst0}
{dst1}
  %cv_rbase = arith.muli %cv_r, %c128 : index
  %cv_k = arith.divui %u, %c{THREADS} : index
  %cv_k4 = arith.muli %cv_k, %c4 : index
  %cv_run = arith.divui %sc_lane, %c8 : index
  %cv_from = arith.addi %cv_k4, %cv_run : index
  %cv_from32 = arith.index_cast %cv_from : index to i32
  %cv_sc, %cv_sc_ok = gpu.shuffle idx %sc_in, %cv_from32, %c32_i32 : f32
  %cv_units:2 = scf.if %cv_in -> (vector<4xi32>, vector<4xi32>) {{
    %cv_u8 = arith.remui %cv_uc, %c8 : index
    %cv_sb0 = arith.muli %cv_grp, %c{box_bytes} : index
    %cv_sba = arith.addi %cv_sb0, %cv_rbase : index
    %cv_sb2 = arith.muli %cv_u8, %c16 : index
    %cv_sb = arith.addi %cv_sba, %cv_sb2 : index
    %cv_sb64 = arith.index_cast %cv_sb : index to i64
    %cv_sa = arith.addi %cv_src, %cv_sb64 : i64
    %cv_sp = llvm.inttoptr %cv_sa : i64 to !llvm.ptr<3>
    %cv_in16 = llvm.load %cv_sp {{alignment = 16 : i64}} : !llvm.ptr<3> -> vector<4xi32>
    %cv_w0 = llvm.mlir.poison : vector<4xi32>
    %cv_w1 = llvm.mlir.poison : vector<4xi32>
",
            q_bytes = c.query_bytes(),
            dst_off = c.converted_offset(),
            units = PAGE * units_per_row,
            box_bytes = PAGE * 128,
            dst0 = indent(&swizzled_pointer("cv_p0", "%cv_dst", "%cv_r", "%cv_col0"), 2),
            dst1 = indent(&swizzled_pointer("cv_p1", "%cv_dst", "%cv_r", "%cv_col1"), 2),
        );
        for p in 0..8 {
            // Pair p: bytes 2p, 2p + 1 of the unit (half p mod 2 of its word p / 2) -> columns col0
            // + 2p, + 1: word p mod 4 of the destination's unit p / 4.
            let (out, slot) = (p / 4, p % 4);
            let _ = writeln!(
                t,
                "    %cv_word{p} = llvm.extractelement %cv_in16[%c{word}_i32 : i32] : vector<4xi32>
    %cv_sh{p} = arith.shrui %cv_word{p}, %c{shift}_i32 : i32
    %cv_h{p} = arith.trunci %cv_sh{p} : i32 to i16
    %cv_x{p} = llvm.inline_asm \"cvt.rn.f16x2.e4m3x2 $0, $1;\", \"=r,h\" %cv_h{p} : (i16) -> i32
    %cv_lo{p} = arith.trunci %cv_x{p} : i32 to i16
    %cv_hs{p} = arith.shrui %cv_x{p}, %c16_i32 : i32
    %cv_hi{p} = arith.trunci %cv_hs{p} : i32 to i16
    %cv_fl{p} = arith.bitcast %cv_lo{p} : i16 to f16
    %cv_fh{p} = arith.bitcast %cv_hi{p} : i16 to f16
    %cv_el{p} = arith.extf %cv_fl{p} : f16 to f32
    %cv_eh{p} = arith.extf %cv_fh{p} : f16 to f32
    %cv_vl{p} = arith.mulf %cv_el{p}, %cv_sc : f32
    %cv_vh{p} = arith.mulf %cv_eh{p}, %cv_sc : f32
    %cv_v{p}a = llvm.mlir.poison : vector<2xf32>
    %cv_v{p}b = llvm.insertelement %cv_vl{p}, %cv_v{p}a[%c0_i32 : i32] : vector<2xf32>
    %cv_v{p} = llvm.insertelement %cv_vh{p}, %cv_v{p}b[%c1_i32 : i32] : vector<2xf32>
    %cv_b{p} = arith.truncf %cv_v{p} : vector<2xf32> to vector<2xbf16>
    %cv_pair{p} = llvm.bitcast %cv_b{p} : vector<2xbf16> to i32
    %cv_w{out}_{next} = llvm.insertelement %cv_pair{p}, %cv_w{out}{prev}[%c{slot}_i32 : i32] : vector<4xi32>",
                word = p / 2,
                shift = 16 * (p % 2),
                next = slot + 1,
                prev = if slot == 0 { String::new() } else { format!("_{slot}") },
            );
        }
        t.push_str(
            "    scf.yield %cv_w0_4, %cv_w1_4 : vector<4xi32>, vector<4xi32>
  } else {
    scf.yield %cv_zero_unit, %cv_zero_unit : vector<4xi32>, vector<4xi32>
  }
  llvm.store %cv_units#0, %cv_p0ptr {alignment = 16 : i64} : vector<4xi32>, !llvm.ptr<3>
  llvm.store %cv_units#1, %cv_p1ptr {alignment = 16 : i64} : vector<4xi32>, !llvm.ptr<3>
}
nvvm.fence.proxy {kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}
gpu.barrier
",
        );
        t
    }

    /// The page-independent part of the fp8-cache scale a lane loads each page ([`Self::lane_scale`]),
    /// once before the page loop: `%sc_r` and `%sc_grp`, the row within the page and the 128-column
    /// group of scale `s` = the lane (lanes past the warp's `kv / 16` repeat the last). A thread
    /// converts units (16 columns of a row) `tid + 256 k`, so at step k a warp's 32 lanes convert 4
    /// runs of 8 units, each run one row's 128-column group: one scale a run, `4 k + lane / 8` of the
    /// warp's — lane `s` loads scale `s`, and a unit shuffles its run's from that lane
    /// ([`Self::convert_page`]).
    fn lane_scale_place(&self) -> String {
        let units_per_row = self.c.kv / 16;
        format!(
            "%sc_lane = arith.remui %tid, %c32 : index
%sc_s = arith.minui %sc_lane, %c{last} : index
%sc_warp = arith.divui %tid, %c32 : index
%sc_k = arith.divui %sc_s, %c4 : index
%sc_run = arith.remui %sc_s, %c4 : index
%sc_uw = arith.muli %sc_warp, %c32 : index
%sc_uk = arith.muli %sc_k, %c{THREADS} : index
%sc_ur = arith.muli %sc_run, %c8 : index
%sc_u0 = arith.addi %sc_uw, %sc_uk : index
%sc_u = arith.addi %sc_u0, %sc_ur : index
%sc_r = arith.divui %sc_u, %c{units_per_row} : index
%sc_uc = arith.remui %sc_u, %c{units_per_row} : index
%sc_grp = arith.divui %sc_uc, %c8 : index",
            last = units_per_row - 1,
        )
    }

    /// `name`: this lane's one fp8-cache scale of the split's page `page` (an index value), at
    /// [`Self::lane_scale_place`]'s row and group of the page.
    fn lane_scale(&self, page: &str, name: &str) -> String {
        let n = name.trim_start_matches('%');
        format!(
            "%{n}_page = arith.addi %p0, {page} : index
%{n}_blk_i = memref.load %block_table[%seq, %{n}_page] : memref<?x?xi32>
%{n}_blk = arith.index_cast %{n}_blk_i : i32 to index
%{n}_row0 = arith.muli %{n}_blk, %c{PAGE} : index
%{n}_row = arith.addi %{n}_row0, %sc_r : index
%{n} = memref.load %kv_scale[%{n}_row, %sc_grp] : memref<?x?xf32>"
        )
    }

    /// The page loop: [`Self::pipelined_loop`] where a ring of two or more bf16 page buffers lets
    /// warpgroup 0 score the next page while this one's values are multiplied, else
    /// [`Self::serial_loop`].
    fn main_loop(&self) -> String {
        if self.c.selected {
            self.selected_loop()
        } else if self.c.pipelined() {
            self.pipelined_loop()
        } else {
            self.serial_loop()
        }
    }

    /// Warpgroup 0's `S = Q K^T` over a whole page (wgmma m64n64k16) whose bf16 buffer is at
    /// `page` (the fp8 cache: its latent chunks are the converted ones at `%conv_addr`, its rope
    /// chunks follow the e4m3 latent in the page buffer); the fragment's name.
    fn scores(&self, t: &mut String, page: &'static str) -> String {
        let c = &self.c;
        let key = |k: usize| match (c.fp8_cache, k < c.latent_chunks()) {
            (true, true) => ("%conv_addr", k * CHUNK_BYTES),
            (true, false) => (page, PAGE * c.kv + (k - c.latent_chunks()) * CHUNK_BYTES),
            (false, _) => (page, k * CHUNK_BYTES),
        };
        qk_products(t, "", c.chunks(), &|k| ("%smem_base", k * CHUNK_BYTES), &key)
    }

    /// Warpgroup 0's whole page `j` (its buffer at `%page_addr`, which `setup` may define): S, the
    /// online softmax, P and the rows' rescale factors stored; yields the rows' maxima and partial
    /// sums as `<name>:4` (warpgroup 1: `stats_in`'s, after `other`: its work meanwhile).
    fn score_page(&self, name: &str, j: &str, stats_in: &str, setup: &str, other: &str) -> String {
        let mut scores = indent(setup, 4) + "\n";
        let s = self.scores(&mut scores, "%page_addr");
        let stores = format!("{}{}", store_p(&format!("%c{}", self.c.p_offset())), store_rows("%alpha"));
        scores.push_str(&indent(&format!("{}{stores}", self.softmax(&s, j)), 4));
        format!(
            "{name}:4 = scf.if %is_wg0 -> (f32, f32, f32, f32) {{
{scores}
  scf.yield %m0, %m1, %l0, %l1 : f32, f32, f32, f32
}} else {{
{other}
  scf.yield {stats_in} : f32, f32, f32, f32
}}",
            other = indent(other, 2),
        )
    }

    /// The page loop, one page after the other: per page warpgroup 0 scores it ([`Self::score_page`])
    /// while warpgroup 1 waits; after a proxy fence and a block barrier both rescale their
    /// accumulators and multiply P by their halves of the values; the ring buffer is refilled after
    /// the next barrier. Carries the output accumulators, and per row half (rows `trow`, `trow + 8`)
    /// the running maximum (log2 domain) and the thread's partial sum. The fp8 cache's (each page
    /// converted into the one bf16 buffer both products read) and a ring of one buffer's.
    ///
    /// The fp8 cache's scales come a page ahead: each lane loads its one scale of page `j + 1`
    /// ([`Self::lane_scale`]) while page `j` is scored and multiplied, carried into the next step
    /// (page 0's before the loop), where the conversion shuffles each unit's from its lane.
    fn serial_loop(&self) -> String {
        let c = &self.c;
        let accs = c.accumulators();
        let (mut iter, mut types) = loop_carried(accs, NO_KEYS_YET);
        let mut t = String::new();
        if c.fp8_cache {
            let _ = writeln!(
                t,
                "{}
  %sc_any = arith.cmpi ugt, %np, %c0 : index
  %sc_first = scf.if %sc_any -> (f32) {{
{}
    scf.yield %sc_page0 : f32
  }} else {{
    %sc_none = arith.constant 0.0 : f32
    scf.yield %sc_none : f32
  }}",
                indent(&self.lane_scale_place(), 2),
                indent(&self.lane_scale("%c0", "%sc_page0"), 4)
            );
            iter.push("%sc_in = %sc_first".into());
            types.push("f32".into());
        }
        t.push_str(&tile_loop_head("%np", &iter, &types, c.stages, c.stage_bytes(), c.query_bytes()));
        t.push_str(&indent(&lane0_broadcast("%page_addr", "%stage_addr"), 4));
        t.push_str(&indent(&self.zero_tail("%j", "%st_off", false), 4));
        if c.fp8_cache {
            t.push_str(&indent(&self.convert_page(), 4));
            let _ = writeln!(t, "\n    %conv_addr = arith.addi %smem_base, %c{}_i64 : i64", c.converted_offset());
            // The next page's scale (the last page's again on the last step: a page the split has).
            let _ = writeln!(
                t,
                "    %sc_nj = arith.addi %j, %c1 : index
    %sc_lastj = arith.subi %np, %c1 : index
    %sc_pj = arith.minui %sc_nj, %sc_lastj : index
{}",
                indent(&self.lane_scale("%sc_pj", "%sc_next"), 4)
            );
        }
        let _ = writeln!(
            t,
            "{}
    nvvm.fence.proxy {{kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}}
    gpu.barrier
{}",
            indent(&self.score_page("%stats", "%j", "%m0_in, %m1_in, %l0_in, %l1_in", "", ""), 4),
            indent(&load_rows("%ra"), 4)
        );
        // Both warpgroups: the accumulators rescaled, then P V into each one's half of the
        // values' columns.
        let (rescaled, mut o) = rescale(accs, "%ra");
        t.push_str(&indent(&rescaled, 4));
        let values = if c.fp8_cache { "%conv_addr" } else { "%page_addr" };
        let _ = writeln!(t, "\n    %v_addr = arith.addi {values}, %cw_bytes64 : i64");
        pv_products(&mut t, "%v_addr", 0, &mut o);
        o.extend((0..4).map(|i| format!("%stats#{i}")));
        if c.fp8_cache {
            o.push("%sc_next".into());
        }
        t.push_str(&tile_loop_tail("%np", c.stages, &self.refill_page(), &o, &types));
        t
    }

    /// The page loop over the selected rows ([`MlaDecodeConfig::selected`]): the block gathers page
    /// 0 into buffer 0 before the loop; at page `j` warpgroup 0 scores it ([`Self::score_page`])
    /// while warpgroup 1 gathers page `j + 1` into the other buffer ([`Self::gather_page`]); after
    /// a proxy fence (the gathered rows are generic-proxy stores the tensor cores read) and a block
    /// barrier both rescale their accumulators and multiply P by their halves of the values, then
    /// a block barrier frees the buffer for page `j + 2`. Rows past the selection are gathered as
    /// zeros (their P of 0 then multiplies zeros), so no tail is zeroed.
    fn selected_loop(&self) -> String {
        let c = &self.c;
        let accs = c.accumulators();
        let (iter, types) = loop_carried(accs, NO_KEYS_YET);
        let fence = "nvvm.fence.proxy {kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}";
        let mut t = format!(
            "  %has_pages = arith.cmpi ugt, %np, %c0 : index
  scf.if %has_pages {{
{first}
  }}
  {fence}
  gpu.barrier
  %res:{n} = scf.for %j = %c0 to %np step %c1 iter_args({iter}) -> ({types}) {{
    %st = arith.remui %j, %c2 : index
    %st_off = arith.muli %st, %c{stage_bytes} : index
    %st_off64 = arith.index_cast %st_off : index to i64
    %st_rel = arith.addi %st_off64, %c{q_bytes}_i64 : i64
    %stage_addr = arith.addi %smem_base, %st_rel : i64
{page_addr}
",
            first = indent(&self.gather_page("%c0", "%c0", "%tid", THREADS), 4),
            n = types.len(),
            iter = iter.join(", "),
            types = types.join(", "),
            stage_bytes = c.stage_bytes(),
            q_bytes = c.query_bytes(),
            page_addr = indent(&lane0_broadcast("%page_addr", "%stage_addr"), 4),
        );
        let next = format!(
            "%nj = arith.addi %j, %c1 : index
%has_next = arith.cmpi ult, %nj, %np : index
scf.if %has_next {{
  %nst = arith.subi %c1, %st : index
  %nst_off = arith.muli %nst, %c{stage_bytes} : index
  %wg_tid = arith.subi %tid, %c{half} : index
{gather}
}}",
            stage_bytes = c.stage_bytes(),
            half = THREADS / 2,
            gather = indent(&self.gather_page("%nj", "%nst_off", "%wg_tid", THREADS / 2), 2),
        );
        let _ = writeln!(
            t,
            "{}
    {fence}
    gpu.barrier
{}",
            indent(&self.score_page("%stats", "%j", "%m0_in, %m1_in, %l0_in, %l1_in", "", &next), 4),
            indent(&load_rows("%ra"), 4)
        );
        let (rescaled, mut o) = rescale(accs, "%ra");
        t.push_str(&indent(&rescaled, 4));
        t.push_str("\n    %v_addr = arith.addi %page_addr, %cw_bytes64 : i64\n");
        pv_products(&mut t, "%v_addr", 0, &mut o);
        o.extend((0..4).map(|i| format!("%stats#{i}")));
        t.push_str(
            "    nvvm.wgmma.commit.group.sync.aligned
    nvvm.wgmma.wait.group.sync.aligned 0
    gpu.barrier
",
        );
        t.push_str(&loop_yield(&o, &types));
        t
    }

    /// The split's page `j` of selected rows gathered by `threads` threads (`tid` their index from
    /// 0) into the page buffer `buf_off` bytes into the ring: row r of the page is the keys' row the
    /// selection names at position `64 (p0 + j) + r` (zeros past the selection's `%len`), rounded
    /// to bf16 (`cvt.rn.bf16x2.f32`) in the 128-byte-swizzled chunks a page of the cache has.
    /// A thread takes 4 columns at a time (one 16-byte load; a warp reads 512 contiguous bytes of
    /// a row), several at once — every load first, each independent of the others (the selection's
    /// entry read at a clamped position, a key of 0 where it is past the selection, the value then
    /// replaced by zeros) — then the 8-byte stores. bf16 rows ([`MlaDecodeConfig::bf16_rows`]): 8
    /// columns a load, stored as they are (16 bytes, one unit of the swizzle).
    fn gather_page(&self, j: &str, buf_off: &str, tid: &str, threads: usize) -> String {
        let c = &self.c;
        let lanes = if c.bf16_rows { 8 } else { 4 };
        let quads = c.dim() / lanes;
        let per_thread = PAGE * quads / threads;
        // Loads in flight a thread: bf16 rows' 36 and 18 a thread take batches of 6.
        let batches: &[usize] = if c.bf16_rows { &[8, 6, 4, 2, 1] } else { &[8, 4, 2, 1] };
        let unroll = batches.iter().copied().find(|u| per_thread.is_multiple_of(*u)).unwrap_or(1);
        let elem = c.rows_element();
        let mut t = format!(
            "%gp_first_p = arith.addi %p0, {j} : index
%gp_first = arith.muli %gp_first_p, %c{PAGE} : index
%gp_off64 = arith.index_cast {buf_off} : index to i64
%gp_rel = arith.addi %gp_off64, %c{q_bytes}_i64 : i64
%gp_base = arith.addi %smem_base, %gp_rel : i64
%gp_last = arith.subi %sel_k, %c1 : index
scf.for %gi = %c0 to %c{per_thread} step %c{unroll} {{
",
            q_bytes = c.query_bytes(),
        );
        for k in 0..unroll {
            let _ = writeln!(
                t,
                "  %gu{k}_i = arith.addi %gi, %c{k} : index
  %gu{k}_t = arith.muli %gu{k}_i, %c{threads} : index
  %gu{k} = arith.addi {tid}, %gu{k}_t : index
  %gr{k} = arith.divui %gu{k}, %c{quads} : index
  %gq{k} = arith.remui %gu{k}, %c{quads} : index
  %gpos{k} = arith.addi %gp_first, %gr{k} : index
  %gin{k} = arith.cmpi ult, %gpos{k}, %len : index
  %gposc{k} = arith.minui %gpos{k}, %gp_last : index
  %gkey{k}_i = memref.load %selected[%seq, %gposc{k}] : memref<?x?xi32>
  %gkey{k}_n = arith.maxsi %gkey{k}_i, %c0_i32 : i32
  %gkey{k}_r = arith.index_cast %gkey{k}_n : i32 to index
  %gkey{k} = arith.addi %key_row0, %gkey{k}_r : index
  %gcol{k} = arith.muli %gq{k}, %c{lanes} : index
  %gv{k} = vector.load %keys[%gkey{k}, %gcol{k}] {{alignment = 16 : i64}} : memref<?x?x{elem}>, vector<{lanes}x{elem}>"
            );
        }
        // What a thread stores: 4 bf16 (8 bytes) rounded from f32, or 8 as they are (16 bytes).
        let (stored, zero, bytes) = match c.bf16_rows {
            true => ("vector<4xi32>", "%gzero16", 16),
            false => ("i64", "%c0_i64", 8),
        };
        if c.bf16_rows {
            t.push_str("  %gzero16 = arith.constant dense<0> : vector<4xi32>\n");
        }
        for k in 0..unroll {
            let value = match c.bf16_rows {
                true => format!("  %gw{k}_v = llvm.bitcast %gv{k} : vector<8xbf16> to vector<4xi32>"),
                false => format!(
                    "  %gb{k} = arith.truncf %gv{k} : vector<4xf32> to vector<4xbf16>
  %gw{k}_v = llvm.bitcast %gb{k} : vector<4xbf16> to i64"
                ),
            };
            let _ = writeln!(
                t,
                "{value}
  %gw{k} = arith.select %gin{k}, %gw{k}_v, {zero} : {stored}
{to}
  llvm.store %gw{k}, %gp{k}ptr {{alignment = {bytes} : i64}} : {stored}, !llvm.ptr<3>",
                to = indent(
                    &swizzled_pointer(&format!("gp{k}"), "%gp_base", &format!("%gr{k}"), &format!("%gcol{k}")),
                    2
                )
            );
        }
        t.push_str("}");
        t
    }

    /// The page loop with warpgroup 0 a page ahead (FlashMLA's overlap of the next page's `S` with
    /// this one's `P V`). Before the loop warpgroup 0 scores page 0 ([`Self::score_page`]). Page
    /// `j`: after a proxy fence and a block barrier (P and the rescale factors of page `j` stored)
    /// both warpgroups rescale their accumulators; warpgroup 1 multiplies P by its half of the
    /// values at once, while warpgroup 0 first computes the next page's `S` (waiting for its
    /// buffer: the ring holds two pages or more), then issues its own `P V` and runs the next
    /// page's online softmax while the tensor cores multiply — the softmax, which the serial loop
    /// leaves the tensor cores idle for, hides behind `P V`. After the products and a block
    /// barrier (every warp done with P, the factors and the buffer) warpgroup 0 stores the next
    /// page's P and factors, and the buffer is refilled. On the last page there is no next one:
    /// warpgroup 0's softmax takes a fragment of -inf (factors 1, P of 0, nothing read).
    fn pipelined_loop(&self) -> String {
        let c = &self.c;
        let accs = c.accumulators();
        let first_page =
            format!("{}\n{}", first_tile_inputs(c.query_bytes()), lane0_broadcast("%page_addr", "%first_addr"));
        let mut t = format!(
            "  %has_pages = arith.cmpi ugt, %np, %c0 : index
  scf.if %has_pages {{
    nvgpu.mbarrier.try_wait.parity %bars[%c0], %parity0, %ticks : !bar
{zero}
  }}
{first}
",
            zero = indent(&self.zero_tail("%c0", "%c0", false), 4),
            first = indent(&self.score_page("%first", "%c0", &NO_KEYS_YET.join(", "), &first_page, ""), 2),
        );
        let (iter, types) = loop_carried(accs, ["%first#0", "%first#1", "%first#2", "%first#3"]);
        t.push_str(&tile_loop_head("%np", &iter, &types, c.stages, c.stage_bytes(), c.query_bytes()));
        t.push_str(&indent(&lane0_broadcast("%page_addr", "%stage_addr"), 4));
        // Page 0's tail was zeroed before warpgroup 0 scored it; a later page's is zeroed here,
        // after the barrier that followed its scores.
        t.push_str(&indent(&self.zero_tail("%j", "%st_off", true), 4));
        let (rescaled, o) = rescale(accs, "%ra");
        let _ = writeln!(
            t,
            "    nvvm.fence.proxy {{kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}}
    gpu.barrier
{}{}
    %v_addr = arith.addi %page_addr, %cw_bytes64 : i64
    %nj = arith.addi %j, %c1 : index
    %has_next = arith.cmpi ult, %nj, %np : index",
            indent(&load_rows("%ra"), 4),
            indent(&rescaled, 4),
        );
        // Warpgroup 0: the next page's S, then its own P V issued, the softmax while it runs.
        let mut next = String::new();
        let s = self.scores(&mut next, "%next_addr");
        let mut wg0 = indent(&next_scores(c.stages, c.stage_bytes(), c.query_bytes(), &next, &s), 2) + "\n";
        let mut o0 = o.clone();
        pv_products(&mut wg0, "%v_addr", 0, &mut o0);
        let _ = writeln!(wg0, "    nvvm.wgmma.commit.group.sync.aligned\n{}", indent(&self.softmax("%sn", "%nj"), 4));
        let mut o1 = o;
        let mut wg1 = String::new();
        pv_products(&mut wg1, "%v_addr", 0, &mut o1);
        let stats = SOFTMAX_RESULTS.map(String::from);
        let pe = (0..FRAG_N).map(|e| format!("%pe{e}"));
        o0.extend(stats.into_iter().chain(pe));
        let passed = ["%m0_in", "%m1_in", "%l0_in", "%l1_in"].map(String::from);
        o1.extend(passed.into_iter().chain(std::iter::repeat_n("%fpoison".to_string(), 2 + FRAG_N)));
        let mut it_types = types.clone();
        it_types.extend(std::iter::repeat_n("f32".to_string(), 2 + FRAG_N));
        let it_types = it_types.join(", ");
        let it = |i: usize| format!("%it#{i}");
        let mut p_store = String::new();
        store_tile(&mut p_store, &format!("%c{}", c.p_offset()), &|e| it(accs + 6 + e));
        let _ = writeln!(
            t,
            "    %fpoison = llvm.mlir.poison : f32
    %it:{n} = scf.if %is_wg0 -> ({it_types}) {{
{wg0}
    nvvm.wgmma.wait.group.sync.aligned 0
    scf.yield {o0} : {it_types}
    }} else {{
{wg1}
    nvvm.wgmma.commit.group.sync.aligned
    nvvm.wgmma.wait.group.sync.aligned 0
    scf.yield {o1} : {it_types}
    }}
    gpu.barrier
    scf.if %is_wg0 {{
{p_store}
    }}
{rows}",
            n = types.len() + 2 + FRAG_N,
            wg0 = indent(&wg0, 2),
            wg1 = indent(&wg1, 2),
            o0 = o0.join(", "),
            o1 = o1.join(", "),
            p_store = indent(&p_store, 6),
            rows = indent(&store_row_values("alpha_n", [&it(accs + 4), &it(accs + 5)]), 4),
        );
        let yields: Vec<String> = (0..types.len()).map(it).collect();
        t.push_str(&refill_ring(c.stages, &self.refill_page(), "%np"));
        t.push_str(&loop_yield(&yields, &types));
        t
    }

    /// The leader's refill of the buffer just consumed with page `%jn`. In a cluster the peer
    /// multicasts into this block's buffer and this one into the peer's: the buffer is released on
    /// both blocks' empty barriers (`stages + 1 + %st`), and the load waits until both have released
    /// it (the barrier's phase of this round, `%parity`).
    fn refill_page(&self) -> String {
        let c = &self.c;
        let load = self.load_page("%jn", "%jn");
        if c.cluster == 1 {
            return load;
        }
        format!(
            "%e_bar = arith.addi %st, %c{first} : index
%released = nvgpu.mbarrier.arrive %bars[%e_bar] : !bar -> !nvgpu.mbarrier.token
%empty_addr = nvgpu.mbarrier.get %bars[%e_bar] : !bar -> i32
{arrive}
nvgpu.mbarrier.try_wait.parity %bars[%e_bar], %parity, %ticks : !bar
{load}",
            first = c.stages + 1,
            arrive = arrive_on_peer("%empty_addr", "%peer_i32")
        )
    }

    /// On the sequence's last page, rows past its length are zeroed in the page buffer (whatever the
    /// cache holds there, NaN included, must not reach `P V`, where a masked key's P of 0 would
    /// still multiply it); then a proxy fence and a block barrier before the wgmma read it.
    /// The split's page `j`, in the buffer `st_off` bytes into the ring; `after_first`: only
    /// when it is not the split's first page.
    fn zero_tail(&self, j: &str, st_off: &str, after_first: bool) -> String {
        let c = &self.c;
        let ws = WORKGROUP;
        let words = c.stage_bytes() / 4;
        let zero_tail = match after_first {
            true => format!(
                "%zt_later = arith.cmpi ugt, {j}, %c0 : index
%zt_last = arith.andi %is_last, %has_tail : i1
%zero_tail = arith.andi %zt_last, %zt_later : i1"
            ),
            false => "%zero_tail = arith.andi %is_last, %has_tail : i1".to_string(),
        };
        format!(
            "%pages_m1 = arith.subi %pages, %c1 : index
%this_page = arith.addi %p0, {j} : index
%is_last = arith.cmpi eq, %this_page, %pages_m1 : index
%tail = arith.remui %len, %c{PAGE} : index
%has_tail = arith.cmpi ne, %tail, %c0 : index
{zero_tail}
scf.if %zero_tail {{
  %zt_off = arith.addi {st_off}, %c{q_bytes} : index
  %zt = memref.view %smem[%zt_off][] : memref<?xi8, {ws}> to memref<{words}xi32, {ws}>
  %zt_zero = arith.constant 0 : i32
  scf.for %w = %tid to %c{words} step %c{THREADS} {{
    %w_in_chunk = arith.remui %w, %c{chunk_words} : index
    %w_row = arith.divui %w_in_chunk, %c32 : index
    %w_past = arith.cmpi uge, %w_row, %tail : index
    scf.if %w_past {{
      memref.store %zt_zero, %zt[%w] : memref<{words}xi32, {ws}>
    }}
  }}
  nvvm.fence.proxy {{kind = #nvvm.proxy_kind<async.shared>, space = #nvvm.shared_space<cta>}}
  gpu.barrier
}}
",
            q_bytes = c.query_bytes(),
            chunk_words = CHUNK_BYTES / 4,
        )
    }

    /// Warpgroup 0's online softmax (see [`online_softmax`]) of the scores `s` of the split's
    /// page `j`, behind [`interior_or_masked`]: a page whose keys the block's first row sees
    /// (`%wlim`; every page but a sequence's last, and MTP's tokens' causal diagonal) skips the
    /// masks.
    fn softmax(&self, s: &str, j: &str) -> String {
        let prelude = format!(
            "%page = arith.addi %p0, {j} : index
%page_key = arith.muli %page, %c{PAGE} : index
%key_t = arith.addi %page_key, %lcol : index
%page_end = arith.addi %page_key, %c{PAGE} : index
%interior = arith.cmpi ule, %page_end, %wlim : index
"
        );
        prelude + &online_softmax_unless_interior(s, ["%lim0", "%lim1"], Some("%interior"))
    }

    /// Row sums across the quad, normalization, and the split's output and log-sum-exp (natural log).
    fn epilogue(&self) -> String {
        let c = &self.c;
        let accs = c.accumulators();
        let mut t = String::new();
        // The rows' sums: the quad's, warpgroup 0's shared with warpgroup 1 (after the page loop's
        // last barrier: its rescale factors are read).
        for h in 0..2 {
            let l = format!("%res#{}", accs + 2 + h);
            let _ = writeln!(
                t,
                "  %ls{h}a, %ls{h}a_ok = gpu.shuffle xor {l}, %c1_i32, %c32_i32 : f32
  %lq{h}a = arith.addf {l}, %ls{h}a : f32
  %ls{h}b, %ls{h}b_ok = gpu.shuffle xor %lq{h}a, %c2_i32, %c32_i32 : f32
  %lq{h} = arith.addf %lq{h}a, %ls{h}b : f32"
            );
        }
        let _ = writeln!(t, "{}  gpu.barrier\n{}", indent(&store_rows("%lq"), 2), indent(&load_rows("%lt"), 2));
        for h in 0..2 {
            let m = format!("%res#{}", accs + h);
            let _ = writeln!(
                t,
                "  %has{h} = arith.cmpf ogt, %lt{h}, %zero : f32
  %one{h} = arith.constant 1.0 : f32
  %safe{h} = arith.select %has{h}, %lt{h}, %one{h} : f32
  %inv0_{h} = arith.divf %one{h}, %safe{h} : f32
  %inv{h} = arith.select %has{h}, %inv0_{h}, %zero : f32
  %lg{h} = {lg2}
  %lsum{h} = arith.addf {m}, %lg{h} : f32
  %lnat{h} = arith.mulf %lsum{h}, %ln2 : f32
  %lse{h} = arith.select %has{h}, %lnat{h}, %ninf : f32
  %orow{h} = arith.addi %trow, %c{off} : index
  %orr{h} = arith.addi %r_first, %orow{h} : index
  %oin{h} = arith.cmpi ult, %orr{h}, %rows_per_sequence : index
  %og{h} = arith.addi %row0, %orow{h} : index",
                lg2 = lg2(&format!("%safe{h}")),
                off = 8 * h
            );
        }
        let _ = writeln!(
            t,
            "  %col_wg = arith.muli %cw, %c{half_cols} : index
  %col_t = arith.addi %col_wg, %lcol : index",
            half_cols = c.kv / 2
        );
        for h in 0..2 {
            let _ = writeln!(
                t,
                "  %wl{h} = arith.andi %shares_rows, %oin{h} : i1
  scf.if %wl{h} {{
    memref.store %lse{h}, %lse[%z, %og{h}] : memref<?x?xf32>
  }}"
            );
        }
        t.push_str(&store_fragment_pairs("%o_part", true, "%col_t", accs, &normalized_output));
        t
    }
}

/// MLA prefill attention (the naive form: per head, queries and keys `qk` wide, values `v` wide),
/// causal, as a flash-attention kernel on the tensor cores: one block per (128 queries, head), two
/// warpgroups of 64 query rows each; the head's key and value tiles (64 keys) stream through a ring
/// of `stages` buffers by TMA; per tile each warpgroup computes `S = Q K^T` (wgmma, K-major), the
/// causal online softmax (query t at absolute position `S - T + t` sees keys `0..=S - T + t`), P
/// rounded to bf16 in its registers and `O += P V` (P wgmma's A from them, V the transposed B),
/// then writes `O / l` (f32). A tile's buffer is released on its empty mbarrier, not at a block
/// barrier: the warpgroups need not run in lockstep ([`release_and_refill`]).
/// With a ring of two buffers or more the forward runs a tile ahead: the next tile's softmax
/// while this tile's `P V` multiplies ([`MlaPrefillConfig::pipelined`]).
///
/// Layout (head-major, 2-D): `q [H * T, qk]`, `k [H * S, qk]`, `v [H * S, v]` bf16 (tensor maps: box 64
/// columns x 64 rows, 128-byte swizzle, zero fill), `out [H * T, v]` f32 (8-byte aligned); arguments `%q_ptr`, `%k_ptr`,
/// `%v_ptr`, `%out`, `%t_len`, `%s_len` (index), `%scale` (f32). Grid `(ceil(T / 128), H)` — or as
/// many blocks along x alone (block `head * ceil(T / 128) + i` takes query tile `ceil(T / 128) - 1 -
/// i`: the last tiles, which see the most keys, start first; the runtime's 1-D launches).
///
/// Training's forms ([`FlashMode`]): `_lse` also writes each query row's base-2 log-sum-exp of its
/// scaled scores (`%lse`, f32 `[H * T]`, after `%out`) for the backward; the gradient kernels
/// (`mla_grad{q,k,v}_*`, [`GradOf`]) take `q`, `k`, `v`, `dout [H * T, v]` (bf16 tensor maps), `lse`
/// and `D = rowsum(dout * out)` (f32 `[H * T]`) and write one gradient (f32): dQ `[H * T, qk]`, dK
/// `[H * S, qk]` or dV `[H * S, v]` — see [`emit_prefill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaPrefillConfig {
    /// Query/key head width (DeepSeek-V3: 128 nope + 64 rope): a positive multiple of 64.
    pub qk: usize,
    /// Value head width: a positive multiple of 64, at most 256.
    pub v: usize,
    /// Key/value tile buffers in the ring (1 to 4, as shared memory allows).
    pub stages: usize,
    /// Inference's forward, training's forward with the log-sum-exps, or a gradient.
    pub mode: FlashMode,
}

/// What a flash-attention kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlashMode {
    /// `out = softmax(scale Q K^T) V` (inference's prefill).
    Forward,
    /// The forward and each query row's log-sum-exp (training: the backward's softmax statistics).
    Lse,
    /// One gradient of the forward's inputs.
    Grad(GradOf),
}

/// The input a gradient kernel differentiates for: its block's 128 rows are that input's (queries
/// for dQ, keys for dK and dV); the other side's tiles stream through the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GradOf {
    Queries,
    Keys,
    Values,
}

impl GradOf {
    fn letter(self) -> char {
        match self {
            GradOf::Queries => 'q',
            GradOf::Keys => 'k',
            GradOf::Values => 'v',
        }
    }
}

impl MlaPrefillConfig {
    /// DeepSeek-V3's heads: 192-wide queries and keys, 128-wide values, two tile buffers.
    pub const DEEPSEEK_V3: MlaPrefillConfig = MlaPrefillConfig { qk: 192, v: 128, stages: 2, mode: FlashMode::Forward };

    /// `mla_prefill_qk192_v128_s2` (`_lse`), `mla_grad{q,k,v}_qk192_v128_s2`.
    pub fn kernel_name(&self) -> String {
        let (qk, v, s) = (self.qk, self.v, self.stages);
        match self.mode {
            FlashMode::Forward => format!("mla_prefill_qk{qk}_v{v}_s{s}"),
            FlashMode::Lse => format!("mla_prefill_qk{qk}_v{v}_s{s}_lse"),
            FlashMode::Grad(of) => format!("mla_grad{}_qk{qk}_v{v}_s{s}", of.letter()),
        }
    }

    pub fn from_name(name: &str) -> Option<MlaPrefillConfig> {
        let (mode, rest) = if let Some(rest) = name.strip_prefix("mla_prefill_qk") {
            match rest.strip_suffix("_lse") {
                Some(rest) => (FlashMode::Lse, rest),
                None => (FlashMode::Forward, rest),
            }
        } else {
            let rest = name.strip_prefix("mla_grad")?;
            let of =
                [GradOf::Queries, GradOf::Keys, GradOf::Values].into_iter().find(|of| rest.starts_with(of.letter()))?;
            (FlashMode::Grad(of), rest[1..].strip_prefix("_qk")?)
        };
        let (qk, rest) = rest.split_once("_v")?;
        let (v, stages) = rest.split_once("_s")?;
        let config = MlaPrefillConfig { qk: qk.parse().ok()?, v: v.parse().ok()?, stages: stages.parse().ok()?, mode };
        (config.kernel_name() == name).then_some(config)
    }

    /// How the runtime launches it ([`v3c_runtime::abi::MlaPrefillAbi`]).
    pub fn flash_kind(&self) -> v3c_runtime::abi::FlashKind {
        use v3c_runtime::abi::FlashKind;
        match self.mode {
            FlashMode::Forward => FlashKind::Forward,
            FlashMode::Lse => FlashKind::Lse,
            FlashMode::Grad(GradOf::Queries) => FlashKind::GradQ,
            FlashMode::Grad(GradOf::Keys) => FlashKind::GradK,
            FlashMode::Grad(GradOf::Values) => FlashKind::GradV,
        }
    }

    fn qk_chunks(&self) -> usize {
        self.qk / CHUNK
    }

    fn v_chunks(&self) -> usize {
        self.v / CHUNK
    }

    /// Chunks of a warpgroup's own tiles: the queries (forward, dQ: and the output gradient), the
    /// keys (dK: and the values; dV).
    fn own_chunks(&self) -> usize {
        match self.mode {
            FlashMode::Grad(GradOf::Queries | GradOf::Keys) => self.qk_chunks() + self.v_chunks(),
            _ => self.qk_chunks(),
        }
    }

    /// Both warpgroups' own tiles.
    fn query_bytes(&self) -> usize {
        2 * self.own_chunks() * CHUNK_BYTES
    }

    /// A ring buffer: a tile of keys and values (forward, dQ), or of queries and the output
    /// gradient (dK, dV).
    fn stage_bytes(&self) -> usize {
        (self.qk_chunks() + self.v_chunks()) * CHUNK_BYTES
    }

    /// Dynamic shared memory: the warpgroups' own tiles, the ring (P and dS stay in registers),
    /// dK's and dV's staged column statistics.
    pub fn shared_memory_bytes(&self) -> usize {
        self.stats_offset() + self.stats_bytes()
    }

    /// Where the staged column statistics start: after the own tiles and the ring.
    fn stats_offset(&self) -> usize {
        self.query_bytes() + self.stages * self.stage_bytes()
    }

    /// dK's and dV's streamed queries' statistics (`-lse`, dK: and D), staged per tile for the
    /// warpgroup's threads ([`GradEmitter::probabilities`]): per warpgroup, two tiles' (by
    /// parity) 64 `-lse` then 64 D, f32.
    fn stats_bytes(&self) -> usize {
        match self.mode {
            FlashMode::Grad(GradOf::Keys | GradOf::Values) => 2 * STATS_PER_WARPGROUP * 4,
            _ => 0,
        }
    }

    /// Whether the tile loop runs a tile ahead, the next tile's softmax (dV: its P) overlapping
    /// this one's `P V` (dV: `P^T dout`) ([`PrefillEmitter::pipelined_loop`],
    /// [`GradEmitter::pipelined_loop`]): the forward kernels and dV with a ring of two buffers or
    /// more (the next tile is in one while this one is multiplied). dQ and dK keep one tile at a
    /// time: the next tile's S and dP beside dS's product do not fit dK's registers.
    pub fn pipelined(&self) -> bool {
        self.stages >= 2 && matches!(self.mode, FlashMode::Forward | FlashMode::Lse | FlashMode::Grad(GradOf::Values))
    }

    /// Tiles the ring loads ahead of the one the block waits for next: `stages - 1`, or `stages -
    /// 2` a tile ahead (the next tile is scored in the step before its own, its buffer busy for two).
    pub fn loads_ahead(&self) -> usize {
        self.stages - 1 - usize::from(self.pipelined())
    }

    pub fn threads(&self) -> usize {
        THREADS
    }

    /// One block per 128 rows (queries; keys for dK and dV) and head.
    pub fn grid(&self, rows: usize, heads: usize) -> (usize, usize) {
        (rows.div_ceil(2 * PAGE), heads)
    }

    pub fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        let name = self.kernel_name();
        if self.qk == 0 || !self.qk.is_multiple_of(CHUNK) {
            return Err(format!("{name}: a query/key width of {} (a positive multiple of 64)", self.qk));
        }
        if self.v == 0 || !self.v.is_multiple_of(CHUNK) || self.v > 256 {
            return Err(format!("{name}: a value width of {} (a multiple of 64 up to 256)", self.v));
        }
        if !(1..=4).contains(&self.stages) {
            return Err(format!("{name}: {} tile buffers (1 to 4)", self.stages));
        }
        let what = format!("own tiles, {} ring buffers of {} B, barriers", self.stages, self.stage_bytes());
        check_shared_memory(&name, self.shared_memory_bytes(), &what, target)
    }
}

/// Staged statistics of one warpgroup: two tiles (by parity) of 64 `-lse` and 64 D.
const STATS_PER_WARPGROUP: usize = 2 * 2 * PAGE;

/// The prefill kernel's `gpu.module` text (see [`MlaPrefillConfig`]).
pub fn emit_prefill(config: &MlaPrefillConfig, target: &GpuTarget) -> Result<String, String> {
    config.validate(target)?;
    Ok(match config.mode {
        FlashMode::Grad(of) => GradEmitter { c: *config, of }.module(),
        _ => PrefillEmitter { c: *config }.module(),
    })
}

struct PrefillEmitter {
    c: MlaPrefillConfig,
}

impl PrefillEmitter {
    fn module(&self) -> String {
        let c = &self.c;
        let (stages, qc) = (c.stages, c.qk_chunks());
        let head = module_head(
            &c.kernel_name(),
            stages,
            1,
            Some(THREADS),
            "",
            &format!(
                "%q_ptr: !llvm.ptr, %k_ptr: !llvm.ptr, %v_ptr: !llvm.ptr, %out: memref<?x?xf32>, {lse}%t_len: index, \
                 %s_len: index, %scale: f32",
                lse = if c.mode == FlashMode::Lse { "%lse: memref<?xf32>, " } else { "" }
            ),
        );
        let mut t = format!(
            "{consts}{block}  %q_first = arith.muli %bx, %c128 : index
  %q_head = arith.muli %head, %t_len : index
  %q_row0 = arith.addi %q_head, %q_first : index
  %k_row0 = arith.muli %head, %s_len : index
  %past = arith.subi %s_len, %t_len : index
  %q_end0 = arith.addi %q_first, %c128 : index
  %q_end = arith.minui %q_end0, %t_len : index
  %key_end0 = arith.addi %past, %q_end : index
  %key_end = arith.minui %key_end0, %s_len : index
  %nt = arith.ceildivui %key_end, %c{PAGE} : index
  %tile0 = arith.constant 0 : index
{barriers}",
            consts = kernel_constants(),
            block = block_of(&["q", "k", "v"], "%t_len", true),
            barriers = shared_memory_and_barriers(
                stages,
                1,
                Some(THREADS),
                c.query_bytes(),
                &[("%k_map", "!tmap"), ("%v_map", "!tmap")]
            ),
        );
        let own: Vec<(&str, usize)> = (0..qc).map(|k| ("%q_map", k * CHUNK)).collect();
        t.push_str(&own_tile_loads(&own, "%q_row0", stages));
        t.push_str(&ring_prologue(&self.load_tile("%j"), stages));
        // This warpgroup's query rows and their absolute positions.
        t.push_str(&warpgroup_place("%q_first", qc * CHUNK_BYTES));
        if c.pipelined() {
            // The last tile's "next scores": nothing seen.
            t.push_str(&filled_fragment("nfrag", "%ninf"));
        }
        // Row h sees the keys below min(its position + 1, S).
        for h in 0..2 {
            let _ = writeln!(
                t,
                "  %qpos{h} = arith.addi %past, %r{h} : index
  %qend{h} = arith.addi %qpos{h}, %c1 : index
  %qlim{h} = arith.minui %qend{h}, %s_len : index"
            );
        }
        t.push_str(WARPGROUP_KEY_LIMIT);
        let _ = writeln!(t, "  nvgpu.mbarrier.try_wait.parity %bars[%c{stages}], %parity0, %ticks : !bar");
        t.push_str(&self.main_loop());
        t.push_str(&self.epilogue());
        module_text(&head, &t)
    }

    /// TMA loads of key/value tile `j` into ring buffer `j mod stages` (one thread).
    fn load_tile(&self, j: &str) -> String {
        let c = &self.c;
        let maps = |k: usize| if k < c.qk_chunks() { "%k_map" } else { "%v_map" };
        ring_load(c, j, "%k_row0", &maps)
    }

    /// The key/value tile loop: [`Self::pipelined_loop`] with a ring of two buffers or more, else
    /// [`Self::serial_loop`].
    fn main_loop(&self) -> String {
        if self.c.pipelined() {
            self.pipelined_loop()
        } else {
            self.serial_loop()
        }
    }

    /// Per tile: S, the masked online softmax, the accumulators rescaled, `P V` with P from
    /// registers; the buffer released, and refilled ([`release_and_refill`]).
    fn serial_loop(&self) -> String {
        let c = &self.c;
        let (qc, accs) = (c.qk_chunks(), c.v_chunks());
        let (iter, types) = loop_carried(accs, NO_KEYS_YET);
        let mut t = tile_loop_head("%nt", &iter, &types, c.stages, c.stage_bytes(), c.query_bytes());
        let s = qk_products(&mut t, "", qc, &|k| ("%own_addr", k * CHUNK_BYTES), &|k| ("%stage_addr", k * CHUNK_BYTES));
        // The softmax's causal and length masks: key <= the row's position, key < S.
        let (rescaled, mut o) = rescale(accs, "%alpha");
        let (softmax, p) = self.softmax(&s, "%j", "%pbw", true);
        let _ = writeln!(t, "{}\n{}", indent(&softmax, 4), indent(&rescaled, 4));
        pv_products_from_registers(&mut t, &p, "%stage_addr", qc * CHUNK_BYTES, &mut o);
        o.extend(["%m0", "%m1", "%l0", "%l1"].map(String::from));
        t.push_str(&release_tile_tail(c.stages, &self.load_tile("%jn"), &o, &types));
        t
    }

    /// The scores `s` of key tile `j` masked (causal, and below S) and through the online softmax
    /// ([`online_softmax`]), P packed into bf16 pairs `<words><w>` (returned; after the branch:
    /// packed words out of a branch are moves into the next `P V`'s registers, which ptxas
    /// answers by serializing the wgmma pipeline). With `interior`, behind
    /// [`interior_or_masked`]: the tiles whose keys every row of the warpgroup sees (`%wlim`, its
    /// first row's limit) skip the masks.
    fn softmax(&self, s: &str, j: &str, words: &str, interior: bool) -> (String, Vec<String>) {
        let mut t =
            format!("%tile_key = arith.muli {j}, %c{PAGE} : index\n%key_t = arith.addi %tile_key, %lcol : index\n");
        if interior {
            let _ = writeln!(
                t,
                "%tile_end = arith.addi %tile_key, %c{PAGE} : index\n%interior = arith.cmpi ule, %tile_end, %wlim : index"
            );
        }
        t.push_str(&online_softmax_unless_interior(s, ["%qlim0", "%qlim1"], interior.then_some("%interior")));
        let (packed, p) = pack_fragment(words, &|e| format!("%pe{e}"));
        (t + &packed, p)
    }

    /// The tile loop a tile ahead (FlashAttention-3's overlap of the softmax with the other
    /// product, P in registers). Before the loop each warpgroup scores key tile 0 and packs its P
    /// into bf16 pairs (16 words a thread, carried by the loop). Tile `j`: the next tile's `S`
    /// (waiting for its buffer: the ring holds two tiles or more); `P V` issued with P from the
    /// registers and, while the tensor cores multiply, the next tile's online softmax and its P
    /// packed; the accumulators rescaled by its factors; the buffer released and refilled
    /// ([`release_and_refill`]). The last tile's "next scores" are a fragment of -inf
    /// (factors 1, P of 0).
    fn pipelined_loop(&self) -> String {
        let c = &self.c;
        let (qc, accs) = (c.qk_chunks(), c.v_chunks());
        // Tile 0, in buffer 0; the rows' statistics before it, those of no key.
        let (first, s) = first_tile_scores(c);
        // (Tile 0 masked: one tile a block.)
        let (softmax, p0) = self.softmax(&s, "%c0", "%pf", false);
        let words = p0.len();
        let first_types = format!("f32, f32, f32, f32, {}", vec!["i32"; words].join(", "));
        let mut t = format!(
            "  %has_tiles = arith.cmpi ugt, %nt, %c0 : index
  %first:{n} = scf.if %has_tiles -> ({first_types}) {{
{first}
{softmax}
    scf.yield %m0, %m1, %l0, %l1, {p0} : {first_types}
  }} else {{
    scf.yield {none}, {zeros} : {first_types}
  }}
",
            n = 4 + words,
            softmax = indent(&softmax, 4),
            p0 = p0.join(", "),
            none = NO_KEYS_YET.join(", "),
            zeros = vec!["%c0_i32"; words].join(", "),
        );
        let (iter, types) = loop_carried(accs, ["%first#0", "%first#1", "%first#2", "%first#3"]);
        let (p, types) = pipelined_loop_head(c, &mut t, iter, types, 4, words);
        let mut o: Vec<String> = (0..accs).map(|n| format!("%o{n}_in")).collect();
        pv_products_from_registers(&mut t, &p, "%stage_addr", qc * CHUNK_BYTES, &mut o);
        let (rescaled, mut o) = rescale_of(&o, "%alpha");
        let (softmax, pn) = self.softmax("%sn", "%nj", "%pn", true);
        let _ = writeln!(
            t,
            "    nvvm.wgmma.commit.group.sync.aligned
{}
    nvvm.wgmma.wait.group.sync.aligned 0
{}",
            indent(&softmax, 4),
            indent(&rescaled, 4),
        );
        t.push_str(&release_and_refill(c.stages, &self.load_tile("%jn")));
        o.extend(["%m0", "%m1", "%l0", "%l1"].map(String::from));
        o.extend(pn);
        t.push_str(&loop_yield(&o, &types));
        t
    }

    /// `out[row] = O / l` for the warpgroup's rows below T.
    fn epilogue(&self) -> String {
        let accs = self.c.v_chunks();
        let mut t = String::new();
        for h in 0..2 {
            let l = format!("%res#{}", accs + 2 + h);
            let _ = writeln!(
                t,
                "  %ls{h}a, %ls{h}a_ok = gpu.shuffle xor {l}, %c1_i32, %c32_i32 : f32
  %lt{h}a = arith.addf {l}, %ls{h}a : f32
  %ls{h}b, %ls{h}b_ok = gpu.shuffle xor %lt{h}a, %c2_i32, %c32_i32 : f32
  %lt{h} = arith.addf %lt{h}a, %ls{h}b : f32
  %one{h} = arith.constant 1.0 : f32
  %inv{h} = arith.divf %one{h}, %lt{h} : f32
  %oin{h} = arith.cmpi ult, %r{h}, %t_len : index
  %og{h} = arith.addi %q_head, %r{h} : index"
            );
            if self.c.mode == FlashMode::Lse {
                // The row's base-2 log-sum-exp: its maximum plus log2 of its sum (one lane of
                // the four sharing the row writes it).
                let _ = writeln!(
                    t,
                    "  %lg{h} = {lg}
  %lse{h} = arith.addf %res#{m}, %lg{h} : f32
  %lfirst{h} = arith.cmpi eq, %lcol0, %c0 : index
  %lw{h} = arith.andi %oin{h}, %lfirst{h} : i1
  scf.if %lw{h} {{
    memref.store %lse{h}, %lse[%og{h}] : memref<?xf32>
  }}",
                    lg = lg2(&format!("%lt{h}")),
                    m = accs + h
                );
            }
        }
        t.push_str(&store_fragment_pairs("%out", false, "%lcol", accs, &normalized_output));
        t
    }
}

/// The gradient kernels of [`FlashMode::Grad`] (FlashAttention-2's backward, each gradient in a
/// kernel of its own so that a thread's accumulators fit its registers and no two blocks add into
/// one row: deterministic, no atomics). A block takes 128 rows of one head of the input it
/// differentiates for (two warpgroups of 64: queries for dQ, keys for dK and dV), its own tiles
/// loaded once (dQ: the queries and the output gradient; dK: the keys and values; dV: the keys);
/// the other side streams through the ring in 64-row tiles (dQ: keys and values, from key 0 to the
/// last any of its queries sees; dK and dV: queries and the output gradient, from the first that
/// sees its first key). Per tile each warpgroup recomputes its scores `S` (wgmma; for dK and dV
/// transposed, `K Q^T`), `P = 2^(scale log2(e) S - lse)` (the forward's base-2 log-sum-exp of the
/// query row; 0 where masked), and
/// - dV: `dV += P^T dout` (P^T from registers in bf16: its rows are the block's, as the product's
///   A; dout the transposed B);
/// - dQ, dK: `dP = dout V^T` (`V dout^T`), `dS = P (dP - D)` with `D = rowsum(dout * out)` of the
///   query row, then `dQ += dS K` (`dK += dS^T Q`), dS (dS^T) from registers in bf16;
///
/// and writes its rows' gradient in f32, dQ and dK times the scale. Arguments: `%q_ptr`, `%k_ptr`,
/// `%v_ptr`, `%do_ptr` (tensor maps as the forward's, `dout [H * T, v]`), `%lse`, `%dd` (f32 `[H *
/// T]`), `%out` (the gradient, f32, 8-byte aligned), `%t_len`, `%s_len`, `%scale`. Grid `ceil(rows / 128) x H` (rows: T
/// for dQ, S for dK and dV), as the forward's.
struct GradEmitter {
    c: MlaPrefillConfig,
    of: GradOf,
}

impl GradEmitter {
    fn module(&self) -> String {
        let c = &self.c;
        let (stages, qc, vc) = (c.stages, c.qk_chunks(), c.v_chunks());
        let own = c.own_chunks();
        let queries = self.of == GradOf::Queries;
        let head = module_head(
            &c.kernel_name(),
            stages,
            1,
            Some(THREADS),
            "",
            "%q_ptr: !llvm.ptr, %k_ptr: !llvm.ptr, %v_ptr: !llvm.ptr, %do_ptr: !llvm.ptr, %lse: memref<?xf32>, \
             %dd: memref<?xf32>, %out: memref<?x?xf32>, %t_len: index, %s_len: index, %scale: f32",
        );
        // Own rows: queries (dQ) or keys; the streamed side: keys and values, or queries and dout.
        let (rows_len, own_head, other_head) =
            if queries { ("%t_len", "%q_head", "%k_head") } else { ("%s_len", "%k_head", "%q_head") };
        let first_tile = if queries {
            "  %tile0 = arith.constant 0 : index
  %r_end0 = arith.addi %r_first, %c128 : index
  %r_end = arith.minui %r_end0, %t_len : index
  %key_end0 = arith.addi %past, %r_end : index
  %key_end = arith.minui %key_end0, %s_len : index
  %nt = arith.ceildivui %key_end, %c64 : index"
        } else {
            // The first query seeing key r_first: r_first - past (0 if that is negative).
            "  %rp = arith.maxui %r_first, %past : index
  %q_seen = arith.subi %rp, %past : index
  %tile0 = arith.divui %q_seen, %c64 : index
  %q_tiles = arith.ceildivui %t_len, %c64 : index
  %nt = arith.subi %q_tiles, %tile0 : index"
        };
        // Each warpgroup's own tiles: its rows' qk columns (queries, keys), then (dQ, dK) their v.
        let (first, second) = match self.of {
            GradOf::Queries => ("%q_map", Some("%do_map")),
            GradOf::Keys => ("%k_map", Some("%v_map")),
            GradOf::Values => ("%k_map", None),
        };
        let mut own_maps: Vec<(&str, usize)> = (0..qc).map(|k| (first, k * CHUNK)).collect();
        own_maps.extend(second.into_iter().flat_map(|m| (0..vc).map(move |k| (m, k * CHUNK))));
        let mut t = format!(
            "{consts}{block}  %r_first = arith.muli %bx, %c128 : index
  %q_head = arith.muli %head, %t_len : index
  %k_head = arith.muli %head, %s_len : index
  %own_row0 = arith.addi {own_head}, %r_first : index
  %past = arith.subi %s_len, %t_len : index
  %t_last = arith.subi %t_len, %c1 : index
{first_tile}
{barriers}",
            consts = kernel_constants(),
            // The blocks with the most tiles first (the last queries see the most keys; the first
            // keys, the most queries).
            block = block_of(&["q", "k", "v", "do"], rows_len, queries),
            barriers = shared_memory_and_barriers(
                stages,
                1,
                Some(THREADS),
                c.query_bytes(),
                &[("%k_map", "!tmap"), ("%v_map", "!tmap"), ("%do_map", "!tmap")]
            ),
        );
        t.push_str(&own_tile_loads(&own_maps, "%own_row0", stages));
        t.push_str(&ring_prologue(&self.load_tile("%j", other_head), stages));
        // This thread's own rows r0, r1 (relative to the head) and the warpgroup's tiles.
        t.push_str(&warpgroup_place("%r_first", own * CHUNK_BYTES));
        t.push('\n');
        if c.pipelined() {
            // The last tile's "next scores": no query sees the keys.
            t.push_str(&filled_fragment("nfrag", "%ninf"));
        }
        if queries {
            // A query row's statistics, once: lse and D (rows past T read row T - 1's, unused).
            for h in 0..2 {
                let _ = writeln!(
                    t,
                    "  %rc{h} = arith.minui %r{h}, %t_last : index
  %ri{h} = arith.addi %q_head, %rc{h} : index
  %lse_r{h} = memref.load %lse[%ri{h}] : memref<?xf32>
  %nlse_r{h} = arith.negf %lse_r{h} : f32
  %d_r{h} = memref.load %dd[%ri{h}] : memref<?xf32>
  %qpos{h} = arith.addi %past, %r{h} : index
  %qend{h} = arith.addi %qpos{h}, %c1 : index
  %qlim{h} = arith.minui %qend{h}, %s_len : index"
                );
            }
            t.push_str(WARPGROUP_KEY_LIMIT);
        } else {
            // A key row is visible to the queries from position r - past on.
            for h in 0..2 {
                let _ = writeln!(t, "  %kfirst{h} = arith.subi %r{h}, %past : index");
            }
            // The warpgroup's last key row (its queries: those from this less the past on).
            let _ = writeln!(t, "  %wk_last = arith.addi %wr0, %c{} : index", PAGE - 1);
            // The staged statistics: thread `%ctid` of the warpgroup loads column `%ctid mod 64`'s
            // -lse (below 64) or D (dK, from 64 on) of each tile; reads at its own columns.
            let _ = writeln!(
                t,
                "  %stv = memref.view %smem[%c{off}][] : memref<?xi8, {ws}> to memref<{n}xf32, {ws}>
  %sx_col = arith.remui %ctid, %c{PAGE} : index
  %sx_lse = arith.cmpi ult, %ctid, %c{PAGE} : index
  %sx_wg = arith.muli %cw, %c{STATS_PER_WARPGROUP} : index
  %sx_wr = arith.addi %sx_wg, %ctid : index
  %sx_rd = arith.addi %sx_wg, %lcol : index
  %sx_bar0 = arith.index_cast %cw : index to i32
  %sx_bar = arith.addi %sx_bar0, %c1_i32 : i32",
                off = c.stats_offset(),
                ws = WORKGROUP,
                n = 2 * STATS_PER_WARPGROUP,
            );
        }
        let _ = writeln!(t, "  nvgpu.mbarrier.try_wait.parity %bars[%c{stages}], %parity0, %ticks : !bar");
        t.push_str(&self.main_loop(other_head));
        t.push_str(&self.epilogue(rows_len, own_head));
        module_text(&head, &t)
    }

    /// TMA loads of the streamed tile `%tile0 + j` (64 rows from `head` on) into ring buffer `j mod
    /// stages` (one thread): keys then values (dQ), queries then dout (dK, dV).
    fn load_tile(&self, j: &str, head: &str) -> String {
        let qc = self.c.qk_chunks();
        let (first, second) = if self.of == GradOf::Queries { ("%k_map", "%v_map") } else { ("%q_map", "%do_map") };
        ring_load(&self.c, j, head, &|k| if k < qc { first } else { second })
    }

    /// The tile loop: [`Self::pipelined_loop`] for dV with a ring of two buffers or more, else
    /// [`Self::serial_loop`].
    fn main_loop(&self, other_head: &str) -> String {
        if self.c.pipelined() {
            self.pipelined_loop(other_head)
        } else {
            self.serial_loop(other_head)
        }
    }

    /// `P` (`%pe<e>`) of the scores `s` of streamed tile `tile` (relative to `%tile0`), masked
    /// (causal, and inside both lengths), with `interior` unless the tile is interior to the
    /// warpgroup's ([`interior_or_masked`]): the body's text, each element's D (`%d_r<h>` or `%d_c<col>`:
    /// dQ's and dK's `dP - D`), and the streamed columns whose statistics it loads (dK, dV:
    /// staged, `%si<col>` where its -lse is, D 64 floats on).
    fn probabilities(
        &self,
        s: &str,
        tile: &str,
        interior: bool,
    ) -> (String, Vec<String>, std::collections::BTreeSet<usize>) {
        let queries = self.of == GradOf::Queries;
        let mut body = format!(
            "%tile_t = arith.addi {tile}, %tile0 : index
%tile_r = arith.muli %tile_t, %c{PAGE} : index
%tile_col = arith.addi %tile_r, %lcol : index
"
        );
        if !queries {
            body.push_str(&self.stage_statistics());
        }
        let mut d_of = Vec::new();
        let mut column_stats = std::collections::BTreeSet::new();
        let mut lse_of = Vec::new();
        for e in 0..FRAG_N {
            let (r, col) = fragment_offset(0, e);
            let h = r / 8;
            if queries {
                lse_of.push(format!("%nlse_r{h}"));
                d_of.push(format!("%d_r{h}"));
            } else {
                if column_stats.insert(col) {
                    // A streamed query's -lse, staged (`%si<col>`: where).
                    let _ = writeln!(
                        body,
                        "%si{col} = arith.addi %sx_at, %c{col} : index
%nlse_c{col} = memref.load %stv[%si{col}] : memref<{n}xf32, {ws}>",
                        n = 2 * STATS_PER_WARPGROUP,
                        ws = WORKGROUP,
                    );
                }
                lse_of.push(format!("%nlse_c{col}"));
                d_of.push(format!("%d_c{col}"));
            }
        }
        // Visible: key <= past + query (and both inside their lengths), as 32-bit compares of the
        // element's column (see [`below_limits`]): dQ's keys below min(position + 1, S); dK's and
        // dV's queries from their key's first on (`%rel<h>` from below) and below T (`%hi`).
        // Each element's exponent, one fused multiply-add (the same on both sides of the branch).
        for (e, lse) in lse_of.iter().enumerate() {
            let _ = writeln!(
                body,
                "%sv{e} = llvm.extractvalue {s}[{e}] : {FRAG}
%xl{e} = llvm.intr.fma(%sv{e}, %scale_log2, {lse}) : (f32, f32, f32) -> f32"
            );
        }
        let p = |masked: bool| {
            let mut t = String::new();
            if masked && queries {
                t.push_str(&below_limits(["%qlim0", "%qlim1"], "%tile_col"));
            } else if masked {
                t.push_str(&below_limits(["%kfirst0", "%kfirst1"], "%tile_col"));
                t.push_str(
                    "%hi_ix = arith.subi %t_len, %tile_col : index\n%hi = arith.index_cast %hi_ix : index to i32\n",
                );
            }
            for e in 0..FRAG_N {
                let (r, col) = fragment_offset(0, e);
                let h = r / 8;
                if !masked {
                    let _ = writeln!(t, "%pe{e} = {}", ex2(&format!("%xl{e}")));
                    continue;
                }
                let mask = if queries {
                    below(e)
                } else {
                    format!(
                        "%vis{e} = arith.cmpi sge, %c{col}_i32, %rel{h} : i32
%inside{e} = arith.cmpi slt, %c{col}_i32, %hi : i32
%in{e} = arith.andi %vis{e}, %inside{e} : i1"
                    )
                };
                let _ = writeln!(
                    t,
                    "{mask}
%pe0_{e} = {ex2}
%pe{e} = arith.select %in{e}, %pe0_{e}, %zero : f32",
                    ex2 = ex2(&format!("%xl{e}"))
                );
            }
            t
        };
        if interior {
            // Interior: dQ's keys all below the warpgroup's first row's limit; dK's and dV's
            // queries all at or past its last key's first (`%wk_last`: that key's row, less the
            // past) and below T.
            let _ = writeln!(body, "%tile_end = arith.addi %tile_r, %c{PAGE} : index");
            body.push_str(if queries {
                "%interior = arith.cmpi ule, %tile_end, %wlim : index\n"
            } else {
                "%tile_pos = arith.addi %tile_r, %past : index
%tile_vis = arith.cmpi uge, %tile_pos, %wk_last : index
%tile_in = arith.cmpi ule, %tile_end, %t_len : index
%interior = arith.andi %tile_vis, %tile_in : i1
"
            });
            let results: Vec<String> = (0..FRAG_N).map(|e| format!("%pe{e}")).collect();
            body.push_str(&interior_or_masked("%interior", &results, &["f32"; FRAG_N], &p));
        } else {
            body.push_str(&p(true));
        }
        (body, d_of, column_stats)
    }

    /// dV's tile loop a tile ahead, as the forward's ([`PrefillEmitter::pipelined_loop`]): before
    /// the loop each warpgroup scores streamed tile 0 and packs its P^T (16 words a thread, carried
    /// by the loop); tile `j`: the next tile's S (waiting for its buffer), `dV += P^T dout` issued
    /// with this tile's P^T from the registers and, while the tensor cores multiply, the next
    /// tile's P computed and packed; the buffer released and refilled. The last tile's "next
    /// scores" are a fragment of -inf (P of 0; its columns' statistics read but masked).
    fn pipelined_loop(&self, other_head: &str) -> String {
        let c = &self.c;
        let (qc, accs) = (c.qk_chunks(), c.v_chunks());
        let (first, s) = first_tile_scores(c);
        // (Tile 0 masked: one tile a block, most often the causal diagonal's.)
        let (p_first, _, _) = self.probabilities(&s, "%c0", false);
        let (packed, p0) = pack_fragment("%pf", &|e| format!("%pe{e}"));
        let words = p0.len();
        let first_types = vec!["i32"; words].join(", ");
        let mut t = format!(
            "  %has_tiles = arith.cmpi ugt, %nt, %c0 : index
  %first:{words} = scf.if %has_tiles -> ({first_types}) {{
{first}
{p_first}
{packed}
    scf.yield {p0} : {first_types}
  }} else {{
    scf.yield {zeros} : {first_types}
  }}
",
            p_first = indent(&p_first, 4),
            packed = indent(&packed, 4),
            p0 = p0.join(", "),
            zeros = vec!["%c0_i32"; words].join(", "),
        );
        let iter: Vec<String> = (0..accs).map(|n| format!("%o{n}_in = %frag{FRAG_N}")).collect();
        let (p, types) = pipelined_loop_head(c, &mut t, iter, vec![FRAG.to_string(); accs], 0, words);
        let mut o: Vec<String> = (0..accs).map(|n| format!("%o{n}_in")).collect();
        pv_products_from_registers(&mut t, &p, "%stage_addr", qc * CHUNK_BYTES, &mut o);
        let (p_next, _, _) = self.probabilities("%sn", "%nj", true);
        let (packed, pn) = pack_fragment("%pn", &|e| format!("%pe{e}"));
        let _ = writeln!(
            t,
            "    nvvm.wgmma.commit.group.sync.aligned
{}
{}
    nvvm.wgmma.wait.group.sync.aligned 0",
            indent(&p_next, 4),
            indent(&packed, 4),
        );
        t.push_str(&release_and_refill(c.stages, &self.load_tile("%jn", other_head)));
        o.extend(pn);
        t.push_str(&loop_yield(&o, &types));
        t
    }

    /// dK's and dV's statistics of the streamed tile (`%tile_r` its first query row): each
    /// thread loads one (-lse, or dK's D; a column past T reads row T - 1's, masked) into its
    /// warpgroup's half of the tile's parity, and the warpgroup waits on its named barrier (1 +
    /// `%cw`); `%sx_at` is where the thread's columns' -lse are. One barrier a tile suffices: a
    /// parity is written again two tiles on, after every thread of the warpgroup has passed the
    /// next tile's barrier, so read this one's. (The loads and their index arithmetic per column
    /// made a third of dK's loop.)
    fn stage_statistics(&self) -> String {
        let (n, ws) = (2 * STATS_PER_WARPGROUP, WORKGROUP);
        let d = if self.of == GradOf::Keys {
            format!(
                " else {{
  %sx_d = memref.load %dd[%sx_i] : memref<?xf32>
  memref.store %sx_d, %stv[%sx_w] : memref<{n}xf32, {ws}>
}}"
            )
        } else {
            String::new()
        };
        format!(
            "%sx_par = arith.remui %tile_t, %c2 : index
%sx_off = arith.muli %sx_par, %c{half} : index
%sx_q = arith.addi %tile_r, %sx_col : index
%sx_qc = arith.minui %sx_q, %t_last : index
%sx_i = arith.addi %q_head, %sx_qc : index
%sx_w = arith.addi %sx_wr, %sx_off : index
scf.if %sx_lse {{
  %sx_l = memref.load %lse[%sx_i] : memref<?xf32>
  %sx_nl = arith.negf %sx_l : f32
  memref.store %sx_nl, %stv[%sx_w] : memref<{n}xf32, {ws}>
}}{d}
nvvm.barrier id = %sx_bar number_of_threads = %c128_i32
%sx_at = arith.addi %sx_rd, %sx_off : index
",
            half = STATS_PER_WARPGROUP / 2,
        )
    }

    /// Per tile: S, P; then (dQ, dK) dP and dS; the gradient's product with dS (P) from
    /// registers; the buffer released and refilled ([`release_and_refill`]).
    fn serial_loop(&self, other_head: &str) -> String {
        let c = &self.c;
        let (qc, vc) = (c.qk_chunks(), c.v_chunks());
        let queries = self.of == GradOf::Queries;
        let accs = if self.of == GradOf::Values { vc } else { qc };
        let iter: Vec<String> = (0..accs).map(|n| format!("%o{n}_in = %frag{FRAG_N}")).collect();
        let types = vec![FRAG.to_string(); accs];
        let mut t = tile_loop_head("%nt", &iter, &types, c.stages, c.stage_bytes(), c.query_bytes());
        // S (own rows x streamed rows) over the qk columns, P from it; then (dQ, dK) dP over the v
        // columns, and dS (S is dead by then: fewer live registers).
        let s = qk_products(&mut t, "", qc, &|k| ("%own_addr", k * CHUNK_BYTES), &|k| ("%stage_addr", k * CHUNK_BYTES));
        let (body, d_of, column_stats) = self.probabilities(&s, "%j", true);
        let _ = writeln!(t, "{}", indent(&body, 4));
        let mut body = String::new();
        let ds = self.of != GradOf::Values;
        if ds {
            let at = |k: usize| (qc + k) * CHUNK_BYTES;
            let dp = qk_products(&mut t, "g", vc, &|k| ("%own_addr", at(k)), &|k| ("%stage_addr", at(k)));
            if !queries {
                // The streamed queries' D, read once dP is there (not live across its products).
                for col in &column_stats {
                    let _ = writeln!(
                        body,
                        "%sd{col} = arith.addi %si{col}, %c{PAGE} : index
%d_c{col} = memref.load %stv[%sd{col}] : memref<{n}xf32, {ws}>",
                        n = 2 * STATS_PER_WARPGROUP,
                        ws = WORKGROUP,
                    );
                }
            }
            for (e, d) in d_of.iter().enumerate() {
                let _ = writeln!(
                    body,
                    "%dpv{e} = llvm.extractvalue {dp}[{e}] : {FRAG}
%dpd{e} = arith.subf %dpv{e}, {d} : f32
%ds{e} = arith.mulf %pe{e}, %dpd{e} : f32"
                );
            }
        }
        // dS (P), rows the thread's own: A of the next product from registers.
        let value = |e: usize| if ds { format!("%ds{e}") } else { format!("%pe{e}") };
        let (packed, p) = pack_fragment("%pbw", &value);
        body.push_str(&packed);
        let _ = writeln!(t, "{}", indent(&body, 4));
        // dQ += dS K, dK += dS^T Q: the ring's first columns; dV += P^T dout: its last.
        let mut o: Vec<String> = (0..accs).map(|n| format!("%o{n}_in")).collect();
        let b_offset = if self.of == GradOf::Values { qc * CHUNK_BYTES } else { 0 };
        // As many chunks as one instruction takes (DeepSeek-V3's dK: its m64n192 fits the
        // registers since dS is no longer stored; with it, it spilled, and dK took a chunk at a
        // time).
        pv_products_from_registers(&mut t, &p, "%stage_addr", b_offset, &mut o);
        t.push_str(&release_tile_tail(c.stages, &self.load_tile("%jn", other_head), &o, &types));
        t
    }

    /// `out[own row] = acc` (dQ, dK: times the scale) for the rows inside their length.
    fn epilogue(&self, rows_len: &str, own_head: &str) -> String {
        let accs = if self.of == GradOf::Values { self.c.v_chunks() } else { self.c.qk_chunks() };
        let scaled = self.of != GradOf::Values;
        let mut t = String::new();
        for h in 0..2 {
            let _ = writeln!(
                t,
                "  %oin{h} = arith.cmpi ult, %r{h}, {rows_len} : index
  %og{h} = arith.addi {own_head}, %r{h} : index"
            );
        }
        t.push_str(&store_fragment_pairs("%out", false, "%lcol", accs, &|n, e, t| {
            let _ = writeln!(t, "  %fv{n}_{e} = llvm.extractvalue %res#{n}[{e}] : {FRAG}");
            if !scaled {
                return format!("%fv{n}_{e}");
            }
            let _ = writeln!(t, "  %fo{n}_{e} = arith.mulf %fv{n}_{e}, %scale : f32");
            format!("%fo{n}_{e}")
        }));
        t
    }
}

/// TMA loads (one thread) of a flash kernel's streamed tile `%tile0 + j`, its 64 rows from `head`
/// on, into ring buffer `j mod stages` (after the own tiles): its first `qk` columns, then `v`, 64
/// at a time from the tensor maps `map(chunk)`.
fn ring_load(c: &MlaPrefillConfig, j: &str, head: &str, map: &dyn Fn(usize) -> &'static str) -> String {
    let ws = WORKGROUP;
    let qc = c.qk_chunks();
    let mut t = format!(
        "%lt_st = arith.remui {j}, %c{stages} : index
%lt_t = arith.addi {j}, %tile0 : index
%lt_r = arith.muli %lt_t, %c{PAGE} : index
%lt_row = arith.addi {head}, %lt_r : index
%lt_st_off = arith.muli %lt_st, %c{stage_bytes} : index
%lt_base = arith.addi %lt_st_off, %c{q_bytes} : index
nvgpu.mbarrier.arrive.expect_tx %bars[%lt_st], %c{stage_bytes} : !bar
",
        stages = c.stages,
        stage_bytes = c.stage_bytes(),
        q_bytes = c.query_bytes()
    );
    for k in 0..qc + c.v_chunks() {
        let col = if k < qc { k * CHUNK } else { (k - qc) * CHUNK };
        let _ = writeln!(
            t,
            "%lt_off{k} = arith.addi %lt_base, %c{off} : index
%lt_v{k} = memref.view %smem[%lt_off{k}][] : memref<?xi8, {ws}> to memref<{PAGE}x{CHUNK}xbf16, {ws}>
nvgpu.tma.async.load {map}[%c{col}, %lt_row], %bars[%lt_st] to %lt_v{k} : !tmap, !bar -> memref<{PAGE}x{CHUNK}xbf16, {ws}>",
            off = k * CHUNK_BYTES,
            map = map(k)
        );
    }
    t
}

/// A flash kernel's block: its tensor maps (`%<name>_map` of each `%<name>_ptr`), `%tid`, the
/// block's linear index `%lin` over a grid of `%tiles` (128 of `rows_len`'s rows) per head, its
/// `%head` and row tile `%bx` — counted from the last tile when `last_first` (the causal
/// triangle's longest blocks start first and do not trail the launch).
fn block_of(maps: &[&str], rows_len: &str, last_first: bool) -> String {
    let mut t: String = maps
        .iter()
        .map(|m| format!("  %{m}_map = builtin.unrealized_conversion_cast %{m}_ptr : !llvm.ptr to !tmap\n"))
        .collect();
    let _ = writeln!(
        t,
        "  %tid = gpu.thread_id x
  %bid_x = gpu.block_id x
  %bid_y = gpu.block_id y
  %grid_x = gpu.grid_dim x
  %lin0 = arith.muli %bid_y, %grid_x : index
  %lin = arith.addi %lin0, %bid_x : index
  %tiles = arith.ceildivui {rows_len}, %c128 : index
  %head = arith.divui %lin, %tiles : index"
    );
    t.push_str(if last_first {
        "  %bx_up = arith.remui %lin, %tiles : index
  %tiles_last = arith.subi %tiles, %c1 : index
  %bx = arith.subi %tiles_last, %bx_up : index
"
    } else {
        "  %bx = arith.remui %lin, %tiles : index\n"
    });
    t
}

/// The ring's first `stages` tiles loaded (`load` of tile `%j`, at most `%nt`), closing the leader's
/// branch [`shared_memory_and_barriers`] opened.
fn ring_prologue(load: &str, stages: usize) -> String {
    format!(
        "    %pro = arith.minui %nt, %c{stages} : index
    scf.for %j = %c0 to %pro step %c1 {{
{}
    }}
  }}
",
        indent(load, 6)
    )
}

/// TMA loads (the leader, on barrier `stages`) of both warpgroups' own tiles: 64 rows each from
/// `row0` (warpgroup w's at `row0 + 64 w`), chunk k of a warpgroup's from `maps[k]` (map, column).
fn own_tile_loads(maps: &[(&str, usize)], row0: &str, stages: usize) -> String {
    let ws = WORKGROUP;
    let mut t = String::new();
    for w in 0..2 {
        for (k, (map, col)) in maps.iter().enumerate() {
            let _ = writeln!(
                t,
                "    %or{w}_{k} = arith.addi {row0}, %c{row} : index
    %ov{w}_{k} = memref.view %smem[%c{off}][] : memref<?xi8, {ws}> to memref<{PAGE}x{CHUNK}xbf16, {ws}>
    nvgpu.tma.async.load {map}[%c{col}, %or{w}_{k}], %bars[%c{stages}] to %ov{w}_{k} : !tmap, !bar -> memref<{PAGE}x{CHUNK}xbf16, {ws}>",
                row = w * PAGE,
                off = (w * maps.len() + k) * CHUNK_BYTES,
            );
        }
    }
    t
}

/// A thread's place (from `%tid`): its fragment coordinates, its own rows `%r0`, `%r1` (`first`
/// plus the warpgroup's 64 plus its fragment rows), its warpgroup's own tiles at `%own_addr`
/// (`tile_bytes` each), a zero accumulator fragment.
fn warpgroup_place(first: &str, tile_bytes: usize) -> String {
    format!(
        "{coords}  %trow = arith.addi %trow0, %c0 : index
  %wr = arith.muli %cw, %c64 : index
  %wr0 = arith.addi {first}, %wr : index
  %r0 = arith.addi %wr0, %trow0 : index
  %r1 = arith.addi %r0, %c8 : index
  %own_tile = arith.muli %cw, %c{tile_bytes} : index
  %own_tile64 = arith.index_cast %own_tile : index to i64
  %own_addr = arith.addi %smem_base, %own_tile64 : i64
{zero}",
        coords = uniform_fragment_coordinates(),
        zero = zero_fragment(),
    )
}

/// Why `dynamic` bytes of shared memory (`what` they hold) and the static barriers do not fit a block
/// on `target`, if they do not.
fn check_shared_memory(name: &str, dynamic: usize, what: &str, target: &GpuTarget) -> Result<(), String> {
    let need = dynamic + STATIC_SHARED_BYTES;
    if need > target.max_shared_memory_per_block as usize {
        return Err(format!(
            "{name}: needs {need} B of shared memory ({what}), {} has {}",
            target.name, target.max_shared_memory_per_block
        ));
    }
    Ok(())
}

/// The module around an attention kernel: the barrier group (`stages` ring buffers + the query
/// tile's; with `empty_arrivals`, as many again after them: the buffers' empty barriers), the bf16
/// tensor map type (`extra_types` after it), and the `gpu.func` head with `args` (in a cluster of
/// `cluster` blocks).
fn module_head(
    name: &str,
    stages: usize,
    cluster: usize,
    empty_arrivals: Option<usize>,
    extra_types: &str,
    args: &str,
) -> String {
    let ws = WORKGROUP;
    let barriers = if empty_arrivals.is_some() { 2 * stages + 1 } else { stages + 1 };
    let cluster_dim = match cluster {
        1 => String::new(),
        n => format!(", nvvm.cluster_dim = array<i32: {n}, 1, 1>"),
    };
    format!(
        "!bar = !nvgpu.mbarrier.group<memorySpace = {ws}, num_barriers = {barriers}>
!tmap = !nvgpu.tensormap.descriptor<tensor = memref<{PAGE}x{CHUNK}xbf16, 3>, swizzle = swizzle_128b, l2promo = none, oob = zero, interleave = none>
{extra_types}module attributes {{gpu.container_module}} {{
gpu.module @kernels {{
gpu.func @{name}({args}) kernel attributes {{known_block_size = array<i32: {THREADS}, 1, 1>{cluster_dim}}} {{
"
    )
}

/// Element e of the final accumulator n (`%res#n`) over its row's sum (times `%inv<h>`, h its row
/// half), written into `t`; its name.
fn normalized_output(n: usize, e: usize, t: &mut String) -> String {
    let h = fragment_offset(0, e).0 / 8;
    let _ = writeln!(
        t,
        "  %fv{n}_{e} = llvm.extractvalue %res#{n}[{e}] : {FRAG}
  %fo{n}_{e} = arith.mulf %fv{n}_{e}, %inv{h} : f32"
    );
    format!("%fo{n}_{e}")
}

/// Stores a thread's output fragments (`accs` accumulators of a warpgroup's 64 rows) to the
/// row-major f32 `memref`: `[rows, cols]`, or with `split` `[splits, rows, cols]` at split `%z`;
/// the fragments' two row halves to rows `%og0` / `%og1` where `%oin0` / `%oin1`, element e of
/// accumulator n to column `col` + `n * CHUNK` + its own. `value(n, e, t)` writes the element's f32
/// into `t` and names it. Elements e, e + 1 (e even) are adjacent columns of one row: stored as a
/// pair in one 8-byte store, so `memref` is 8-byte aligned and `cols` even.
fn store_fragment_pairs(
    memref: &str,
    split: bool,
    col: &str,
    accs: usize,
    value: &dyn Fn(usize, usize, &mut String) -> String,
) -> String {
    let (ty, rows_dim) = if split { ("memref<?x?x?xf32>", 1) } else { ("memref<?x?xf32>", 0) };
    let mut t = format!(
        "  %op_base = memref.extract_aligned_pointer_as_index {memref} : {ty} -> index
  %op_cols = memref.dim {memref}, %c{cols_dim} : {ty}
",
        cols_dim = rows_dim + 1
    );
    let first_row = if split {
        let _ = writeln!(
            t,
            "  %op_rows = memref.dim {memref}, %c{rows_dim} : {ty}
  %op_split = arith.muli %z, %op_rows : index"
        );
        "%op_split"
    } else {
        "%c0"
    };
    for h in 0..2 {
        let _ = writeln!(
            t,
            "  %op_row{h} = arith.addi {first_row}, %og{h} : index
  %op_el{h} = arith.muli %op_row{h}, %op_cols : index
  %op_col{h} = arith.addi %op_el{h}, {col} : index
  %op_off{h} = arith.muli %op_col{h}, %c4 : index
  %op_at{h} = arith.addi %op_base, %op_off{h} : index"
        );
    }
    let mut stores = [String::new(), String::new()];
    for n in 0..accs {
        for e in (0..FRAG_N).step_by(2) {
            let (r, k) = fragment_offset(0, e);
            let (v0, v1) = (value(n, e, &mut t), value(n, e + 1, &mut t));
            let _ = writeln!(
                t,
                "  %fp{n}_{e}a = llvm.mlir.poison : vector<2xf32>
  %fp{n}_{e}b = llvm.insertelement {v0}, %fp{n}_{e}a[%c0_i32 : i32] : vector<2xf32>
  %fp{n}_{e} = llvm.insertelement {v1}, %fp{n}_{e}b[%c1_i32 : i32] : vector<2xf32>"
            );
            let _ = writeln!(
                stores[r / 8],
                "    %fa{n}_{e} = arith.addi %op_at{h}, %c{bytes} : index
    %fa{n}_{e}_64 = arith.index_cast %fa{n}_{e} : index to i64
    %fa{n}_{e}_p = llvm.inttoptr %fa{n}_{e}_64 : i64 to !llvm.ptr<1>
    llvm.store %fp{n}_{e}, %fa{n}_{e}_p {{alignment = 8 : i64}} : vector<2xf32>, !llvm.ptr<1>",
                h = r / 8,
                bytes = 4 * (n * CHUNK + k)
            );
        }
    }
    for (h, stores) in stores.iter().enumerate() {
        let _ = write!(t, "  scf.if %oin{h} {{\n{stores}  }}\n");
    }
    t
}

/// The module text: the head, the constants the body uses, the body, the closing braces.
fn module_text(head: &str, body: &str) -> String {
    format!("{head}{}{body}  gpu.return\n}}\n}}\n}}\n", constants(body))
}

/// Constants every attention kernel uses: the barrier wait's tick budget, the first phase's parity,
/// f32 0 / -inf / log2 e / ln 2, the scores' log2-domain scale, and the wgmma descriptors' high bits.
fn kernel_constants() -> String {
    format!(
        "  %ticks = arith.constant 10000000 : index
  %parity0 = arith.constant false
  %true = arith.constant true
  %zero = arith.constant 0.0 : f32
  %ninf = arith.constant 0xFF800000 : f32
  %log2e = arith.constant 1.44269504 : f32
  %ln2 = arith.constant 0.693147182 : f32
  %scale_log2 = arith.mulf %scale, %log2e : f32
  %desc_k = arith.constant {desc_k} : i64
  %desc_mn = arith.constant {desc_mn} : i64
  %addr_mask = arith.constant 262143 : i64
",
        // K-major operands (the query, the keys, P): 128-byte swizzle (mode 1, bits 62-63), stride
        // byte offset 1024 B (8 rows of 128 B; bits 32-45, 16-byte units). MN-major (the values):
        // the same swizzle, 1024 B between groups of 8 keys (stride), 8192 B between 64-column
        // chunks (leading, bits 16-29; unused by the 64-wide instructions).
        desc_k = (1u64 << 62) | (64u64 << 32),
        desc_mn = (1u64 << 62) | (64u64 << 32) | ((CHUNK_BYTES as u64 / 16) << 16),
    )
}

/// Dynamic shared memory (`%smem`, its address `%smem_base`), the barriers initialized by the
/// leader thread (which prefetches the query's and `maps`' tensor maps), a block barrier, then the
/// leader's branch opened with the query tile's expected bytes on barrier `stages`. With
/// `empty_arrivals`, the buffers' empty barriers (`stages + 1 ..`) expect that many arrivals (a
/// cluster's blocks, or a block's threads). In a cluster (`cluster` > 1) a cluster barrier makes
/// every block's initialized barriers visible before any multicasts.
fn shared_memory_and_barriers(
    stages: usize,
    cluster: usize,
    empty_arrivals: Option<usize>,
    query_bytes: usize,
    maps: &[(&str, &str)],
) -> String {
    let ws = WORKGROUP;
    let mut prefetch: String =
        maps.iter().map(|(map, ty)| format!("    nvgpu.tma.prefetch.descriptor {map} : {ty}\n")).collect();
    if let Some(arrivals) = empty_arrivals {
        prefetch = format!(
            "    scf.for %s = %c{first} to %c{end} step %c1 {{
      nvgpu.mbarrier.init %bars[%s], %c{arrivals} : !bar
    }}
{fence}{prefetch}",
            first = stages + 1,
            end = 2 * stages + 1,
            fence = if cluster > 1 { "    nvvm.fence.mbarrier.init\n" } else { "" },
        );
    }
    let cluster_wait = if cluster > 1 { "  nvvm.cluster.arrive\n  nvvm.cluster.wait\n" } else { "" };
    format!(
        "  %smem = gpu.dynamic_shared_memory : memref<?xi8, {ws}>
  %smem_base_idx = memref.extract_aligned_pointer_as_index %smem : memref<?xi8, {ws}> -> index
  %smem_base = arith.index_cast %smem_base_idx : index to i64
  %bars = nvgpu.mbarrier.create -> !bar
  %leader = arith.cmpi eq, %tid, %c0 : index
  scf.if %leader {{
    scf.for %s = %c0 to %c{nbars} step %c1 {{
      nvgpu.mbarrier.init %bars[%s], %c1 : !bar
    }}
    nvgpu.tma.prefetch.descriptor %q_map : !tmap
{prefetch}  }}
  gpu.barrier
{cluster_wait}  scf.if %leader {{
    nvgpu.mbarrier.arrive.expect_tx %bars[%c{stages}], %c{query_bytes} : !bar
",
        nbars = stages + 1
    )
}

/// `%<p>ptr`: the shared-memory address (from `base`, an i64) of bf16 column `col` (index) of row
/// `row` of a page in the 128-byte-swizzled 64-column chunks the tensor cores read: its chunk's
/// (`col / 64`), the row's 128 bytes in it, the 16-byte unit `(col mod 64) / 8` xor `row mod 8`,
/// the column's bytes in the unit.
fn swizzled_pointer(p: &str, base: &str, row: &str, col: &str) -> String {
    format!(
        "%{p}chunk = arith.divui {col}, %c{CHUNK} : index
%{p}ccol = arith.remui {col}, %c{CHUNK} : index
%{p}unit = arith.divui %{p}ccol, %c8 : index
%{p}within = arith.remui %{p}ccol, %c8 : index
%{p}rm8 = arith.remui {row}, %c8 : index
%{p}sw = arith.xori %{p}unit, %{p}rm8 : index
%{p}cb = arith.muli %{p}chunk, %c{CHUNK_BYTES} : index
%{p}rb = arith.muli {row}, %c128 : index
%{p}ub = arith.muli %{p}sw, %c16 : index
%{p}eb = arith.muli %{p}within, %c2 : index
%{p}o1 = arith.addi %{p}cb, %{p}rb : index
%{p}o2 = arith.addi %{p}o1, %{p}ub : index
%{p}o = arith.addi %{p}o2, %{p}eb : index
%{p}o64 = arith.index_cast %{p}o : index to i64
%{p}a = arith.addi {base}, %{p}o64 : i64
%{p}ptr = llvm.inttoptr %{p}a : i64 to !llvm.ptr<3>"
    )
}

/// The selected rows' kernel's `%len`: how many of the sequence's selection (its row of
/// `%selected`, `%sel_k` wide) are kept — the entries before the first -1, found by binary search
/// (the kept ones lead, ascending); and `%key_row0`, the key row its entries count from (its
/// sequence's cache rows, `%seq_rows` a sequence; 0 where every query selects from the same rows).
const SELECTED_COUNT: &str = "  %sel_k = memref.dim %selected, %c1 : memref<?x?xi32>
  %sel_n:2 = scf.while (%lo = %c0, %hi = %sel_k) : (index, index) -> (index, index) {
    %sel_go = arith.cmpi ult, %lo, %hi : index
    scf.condition(%sel_go) %lo, %hi : index, index
  } do {
  ^bb0(%blo: index, %bhi: index):
    %bsum = arith.addi %blo, %bhi : index
    %bmid = arith.divui %bsum, %c2 : index
    %bv = memref.load %selected[%seq, %bmid] : memref<?x?xi32>
    %bkept = arith.cmpi sge, %bv, %c0_i32 : i32
    %bmid1 = arith.addi %bmid, %c1 : index
    %nlo = arith.select %bkept, %bmid1, %blo : index
    %nhi = arith.select %bkept, %bhi, %bmid : index
    scf.yield %nlo, %nhi : index, index
  }
  %len = arith.addi %sel_n#0, %c0 : index
  %key_row0 = arith.muli %seq, %seq_rows : index
";

/// The rows' maxima and partial sums before any key: -inf, -inf, 0, 0.
const NO_KEYS_YET: [&str; 4] = ["%ninf", "%ninf", "%zero", "%zero"];

/// What a loop a tile ahead scores its first tile from, before the loop: its buffer's address
/// `%first_addr` (the ring's first, after the `query_bytes` of queries) and, as
/// [`online_softmax`]'s inputs `%m<h>_in`, `%l<h>_in`, the statistics of no key.
/// Tile 0's scores before a loop a tile ahead: the wait for buffer 0, the tile's inputs and `S`
/// (returned with the name of its fragment).
fn first_tile_scores(c: &MlaPrefillConfig) -> (String, String) {
    let mut first = format!(
        "  nvgpu.mbarrier.try_wait.parity %bars[%c0], %parity0, %ticks : !bar\n{}\n",
        indent(&first_tile_inputs(c.query_bytes()), 2)
    );
    let s = qk_products(&mut first, "", c.qk_chunks(), &|k| ("%own_addr", k * CHUNK_BYTES), &|k| {
        ("%first_addr", k * CHUNK_BYTES)
    });
    (first, s)
}

/// The head of a tile loop a tile ahead (the forward's and dV's): the loop carries `iter`
/// (of `types`) and then this tile's P, `words` packed words from `%first#{first_p}` on; in
/// its body, tile `j + 1`'s index `%nj` and its scores `%sn` ([`next_scores`]). Returns the P
/// words' names and all the carried types.
fn pipelined_loop_head(
    c: &MlaPrefillConfig,
    t: &mut String,
    mut iter: Vec<String>,
    mut types: Vec<String>,
    first_p: usize,
    words: usize,
) -> (Vec<String>, Vec<String>) {
    let p: Vec<String> = (0..words).map(|w| format!("%pc{w}_in")).collect();
    iter.extend(p.iter().enumerate().map(|(w, name)| format!("{name} = %first#{}", first_p + w)));
    types.extend(std::iter::repeat_n("i32".to_string(), words));
    t.push_str(&tile_loop_head("%nt", &iter, &types, c.stages, c.stage_bytes(), c.query_bytes()));
    let mut next = String::new();
    let s = qk_products(&mut next, "", c.qk_chunks(), &|k| ("%own_addr", k * CHUNK_BYTES), &|k| {
        ("%next_addr", k * CHUNK_BYTES)
    });
    let _ = writeln!(
        t,
        "    %nj = arith.addi %j, %c1 : index
    %has_next = arith.cmpi ult, %nj, %nt : index
{}",
        indent(&next_scores(c.stages, c.stage_bytes(), c.query_bytes(), &next, &s), 4)
    );
    (p, types)
}

fn first_tile_inputs(query_bytes: usize) -> String {
    format!(
        "%first_addr = arith.addi %smem_base, %c{query_bytes}_i64 : i64
%m0_in = arith.constant 0xFF800000 : f32
%m1_in = arith.constant 0xFF800000 : f32
%l0_in = arith.constant 0.0 : f32
%l1_in = arith.constant 0.0 : f32"
    )
}

/// A zero m64n64 accumulator fragment, `%frag32` (built up from `%frag0`).
fn zero_fragment() -> String {
    filled_fragment("frag", "%zero")
}

/// An m64n64 fragment of `value` everywhere, `%<name>32` (built up from `%<name>0`).
fn filled_fragment(name: &str, value: &str) -> String {
    let mut t = format!("  %{name}0 = llvm.mlir.poison : {FRAG}\n");
    for e in 0..FRAG_N {
        let _ = writeln!(t, "  %{name}{} = llvm.insertvalue {value}, %{name}{e}[{e}] : {FRAG}", e + 1);
    }
    t
}

/// The tile loop's carried values: `accs` output accumulators (zero), the two row halves' maxima
/// and partial sums (from `stats`: before any key -inf, -inf, 0, 0); (`iter_args` entries, their
/// types).
fn loop_carried(accs: usize, stats: [&str; 4]) -> (Vec<String>, Vec<String>) {
    let mut iter: Vec<String> = (0..accs).map(|n| format!("%o{n}_in = %frag{FRAG_N}")).collect();
    let names = ["%m0_in", "%m1_in", "%l0_in", "%l1_in"];
    iter.extend(names.iter().zip(stats).map(|(name, init)| format!("{name} = {init}")));
    let mut types = vec![FRAG.to_string(); accs];
    types.extend(["f32"; 4].map(String::from));
    (iter, types)
}

/// The tile loop's head: `count` tiles; tile `%j` waits for ring buffer `%st` (its barrier's phase
/// parity), whose address is `%stage_addr` (`%st_off` from the ring's start, after the queries).
fn tile_loop_head(count: &str, iter: &[String], types: &[String], stages: usize, stage: usize, query: usize) -> String {
    format!(
        "  %res:{n} = scf.for %j = %c0 to {count} step %c1 iter_args({iter}) -> ({types}) {{
{wait}
",
        n = types.len(),
        iter = iter.join(", "),
        types = types.join(", "),
        wait = indent(&ring_wait("", "%j", stages, stage, query), 4),
    )
}

/// The wait for tile `j`'s ring buffer `%<p>st` of `stages` (its barrier's phase parity
/// `%<p>parity`), whose address is `%<p>stage_addr` (`%<p>st_off` from the ring's start, after the
/// `query` bytes of queries); `p` prefixes the names.
fn ring_wait(p: &str, j: &str, stages: usize, stage: usize, query: usize) -> String {
    format!(
        "%{p}st = arith.remui {j}, %c{stages} : index
%{p}round = arith.divui {j}, %c{stages} : index
%{p}par = arith.remui %{p}round, %c2 : index
%{p}parity = arith.index_cast %{p}par : index to i1
nvgpu.mbarrier.try_wait.parity %bars[%{p}st], %{p}parity, %ticks : !bar
%{p}st_off = arith.muli %{p}st, %c{stage} : index
%{p}st_off64 = arith.index_cast %{p}st_off : index to i64
%{p}st_rel = arith.addi %{p}st_off64, %c{query}_i64 : i64
%{p}stage_addr = arith.addi %smem_base, %{p}st_rel : i64"
    )
}

/// `S = Q K^T` for one tile of 64 keys (an m64n64 fragment): per 64-column chunk k the query's at
/// `q(k)` and the keys' at `key(k)` (a base address SSA value and a byte offset; both K-major,
/// 128-byte swizzled), 4 k16 steps each. Returns the S fragment's name. `p` prefixes the SSA names
/// (a second product in the same body).
fn qk_products(
    t: &mut String,
    p: &str,
    chunks: usize,
    q: &dyn Fn(usize) -> (&'static str, usize),
    key: &dyn Fn(usize) -> (&'static str, usize),
) -> String {
    let mut s = format!("%frag{FRAG_N}");
    // The operands' descriptors: one a distinct base address, every operand's its low word plus
    // the operand's offset.
    let mut bases: Vec<&str> = Vec::new();
    for (base, _) in (0..chunks).flat_map(|k| [q(k), key(k)]) {
        if !bases.contains(&base) {
            let _ = writeln!(t, "{}", indent(&desc(&format!("%{p}db{}", bases.len()), base, "%desc_k"), 4));
            bases.push(base);
        }
    }
    let operand = |(base, off): (&str, usize)| {
        let i = bases.iter().position(|&b| b == base).expect("a base of the product");
        (format!("%{p}db{i}"), off / 16)
    };
    let _ = writeln!(t, "    nvvm.wgmma.fence.aligned");
    for k in 0..chunks {
        let ((qb, qu), (kb, ku)) = (operand(q(k)), operand(key(k)));
        for ks in 0..4 {
            // 16 columns further: 32 bytes of each 128-byte swizzled row.
            let (da, db) = (format!("%{p}dq{k}_{ks}"), format!("%{p}dk{k}_{ks}"));
            let _ = writeln!(t, "{}", indent(&desc_at(&da, &qb, qu + 2 * ks), 4));
            let _ = writeln!(t, "{}", indent(&desc_at(&db, &kb, ku + 2 * ks), 4));
            let scale_out = if k == 0 && ks == 0 { "zero" } else { "one" };
            let out = format!("%{p}s{k}_{ks}");
            let _ = writeln!(
                t,
                "    {out} = nvvm.wgmma.mma_async {da}, {db}, {s}, <m = 64, n = {PAGE}, k = 16>, D[<f32>, <{scale_out}>, <wrapped>], A[<bf16>, <one>, <row>], B[<bf16>, <one>, <col>] : {FRAG} -> {FRAG}"
            );
            s = out;
        }
    }
    let _ = writeln!(t, "    nvvm.wgmma.commit.group.sync.aligned\n    nvvm.wgmma.wait.group.sync.aligned 0");
    s
}

/// `O += P V` for one tile: P (`%dp`, K-major) times the 64-column value chunks at `v_base +
/// v_offset + n * 8 KiB` (MN-major: the transposed B, the descriptor's leading offset stepping
/// from chunk to chunk), 4 k16 steps of keys; `o` are the chunks' m64n64 accumulators (renamed to
/// their results). A step multiplies as many chunks at a time as one `wgmma m64n(64 group)k16`
/// takes ([`widest_group`]; DeepSeek-V3's decode: m64n256 over a warpgroup's 4 chunks; 4 m64n64
/// read P's 2 KiB from shared memory 4 times): their fragments joined into the wide one's and
/// split back (an m64nN fragment is the m64n64 ones in column order).
fn pv_products(t: &mut String, v_base: &str, v_offset: usize, o: &mut [String]) {
    pv_products_of(t, None, v_base, v_offset, o)
}

/// The most of `chunks` 64-column chunks one wgmma multiplies (N up to 256), the same number each.
fn widest_group(chunks: usize) -> usize {
    (1..=4).rev().find(|g| chunks.is_multiple_of(*g)).unwrap_or(1)
}

/// [`pv_products`] with P (A) from this thread's registers: `p`, the 16 words [`pack_fragment`]
/// makes of its 64 x 64 fragment (words 4 ks..4 ks + 4 are k step ks's A: the accumulator's layout
/// of those 16 columns is the A operand's), not from shared memory — no stores, no proxy fence and
/// no barrier between the softmax and the product.
fn pv_products_from_registers(t: &mut String, p: &[String], v_base: &str, v_offset: usize, o: &mut [String]) {
    pv_products_of(t, Some(p), v_base, v_offset, o)
}

/// The words `{name}{w}` (i32, w < 16) of a 64 x 64 f32 fragment's values (`value(e)`) rounded to
/// bf16 in pairs: word w holds elements 2w (low half) and 2w + 1 (high), adjacent columns of one
/// row.
fn pack_fragment(name: &str, value: &dyn Fn(usize) -> String) -> (String, Vec<String>) {
    let mut t = String::new();
    let mut words = Vec::new();
    for w in 0..FRAG_N / 2 {
        let word = format!("{name}{w}");
        t.push_str(&pack_pair(&word, &value(2 * w), &value(2 * w + 1)));
        words.push(word);
    }
    (t, words)
}

/// `word` (i32) = the f32 values `lo`, `hi` rounded to bf16 (`cvt.rn.bf16x2.f32`), `lo` in the
/// low half.
fn pack_pair(word: &str, lo: &str, hi: &str) -> String {
    format!(
        "{word}_a = llvm.mlir.poison : vector<2xf32>
{word}_b = llvm.insertelement {lo}, {word}_a[%c0_i32 : i32] : vector<2xf32>
{word}_c = llvm.insertelement {hi}, {word}_b[%c1_i32 : i32] : vector<2xf32>
{word}_h = arith.truncf {word}_c : vector<2xf32> to vector<2xbf16>
{word} = llvm.bitcast {word}_h : vector<2xbf16> to i32
"
    )
}

/// One `wgmma.mma_async` m64n`n`k16 (bf16, B `desc_b`: MN-major where `trans_b`, else K-major) with
/// A the four words `a` of this thread, accumulating into `acc` (a struct of n / 2 f32):
/// `nvvm.wgmma.mma_async` takes A's descriptor only, so the instruction as inline PTX — the form
/// the NVVM lowering gives its own — the accumulators tied to the results.
pub(super) fn wgmma_registers_a(out: &str, a: &[String], desc_b: &str, acc: &str, n: usize, trans_b: bool) -> String {
    let regs = n / 2;
    let wide = format!("!llvm.struct<({})>", vec!["f32"; regs].join(", "));
    let mut t = String::new();
    let mut accs = Vec::new();
    for r in 0..regs {
        let _ = writeln!(t, "{out}_i{r} = llvm.extractvalue {acc}[{r}] : {wide}");
        accs.push(format!("{out}_i{r}"));
    }
    let d: Vec<String> = (0..regs).map(|r| format!("${r}")).collect();
    let asm = format!(
        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\nwgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{d}}}, {{${a0}, ${a1}, ${a2}, ${a3}}}, ${b}, p, 1, 1, {trans};\\n}}",
        d = d.join(", "),
        a0 = regs,
        a1 = regs + 1,
        a2 = regs + 2,
        a3 = regs + 3,
        b = regs + 4,
        trans = u8::from(trans_b),
    );
    let constraints: Vec<String> = std::iter::repeat_n("=f".to_string(), regs)
        .chain(std::iter::repeat_n("r".to_string(), 4))
        .chain(["l".to_string()])
        .chain((0..regs).map(|r| r.to_string()))
        .collect();
    let _ = writeln!(
        t,
        "{out} = llvm.inline_asm has_side_effects \"{asm}\", \"{c}\" {a}, {desc_b}, {accs} : (i32, i32, i32, i32, i64, {f}) -> {wide}",
        c = constraints.join(","),
        a = a.join(", "),
        accs = accs.join(", "),
        f = vec!["f32"; regs].join(", "),
    );
    t
}

/// [`pv_products`] (`p` None: P from shared memory) and [`pv_products_from_registers`].
fn pv_products_of(t: &mut String, p: Option<&[String]>, v_base: &str, v_offset: usize, o: &mut [String]) {
    let group = widest_group(o.len());
    let n = 64 * group;
    let wide = format!("!llvm.struct<({})>", vec!["f32"; n / 2].join(", "));
    let mut accs: Vec<String> = Vec::new();
    let _ = writeln!(t, "{}", indent(&desc("%dvb", v_base, "%desc_mn"), 4));
    for (g, chunks) in o.chunks(group).enumerate() {
        if group == 1 {
            accs.push(chunks[0].clone());
            continue;
        }
        let _ = writeln!(t, "    %pvw{g}_0 = llvm.mlir.poison : {wide}");
        for (c, o_c) in chunks.iter().enumerate() {
            for e in 0..FRAG_N {
                let w = c * FRAG_N + e;
                let _ = writeln!(
                    t,
                    "    %pvx{g}_{w} = llvm.extractvalue {o_c}[{e}] : {FRAG}
    %pvw{g}_{} = llvm.insertvalue %pvx{g}_{w}, %pvw{g}_{w}[{w}] : {wide}",
                    w + 1
                );
            }
        }
        accs.push(format!("%pvw{g}_{}", n / 2));
    }
    let _ = writeln!(t, "    nvvm.wgmma.fence.aligned");
    for ks in 0..4 {
        let dp = format!("%dp_{ks}");
        if p.is_none() {
            let _ = writeln!(t, "{}", indent(&desc_at(&dp, "%dp", 2 * ks), 4));
        }
        for (g, acc) in accs.iter_mut().enumerate() {
            // The group's first chunk, 16 keys further a step: two 8-key groups of 1024 B (64
            // units of 16 B each).
            let dv = format!("%dv{g}_{ks}");
            let units = (v_offset + g * group * CHUNK_BYTES) / 16 + 128 * ks;
            let _ = writeln!(t, "{}", indent(&desc_at(&dv, "%dvb", units), 4));
            let out = format!("%pv{g}_{ks}");
            match p {
                Some(words) => {
                    let asm = wgmma_registers_a(&out, &words[4 * ks..4 * ks + 4], &dv, acc, n, true);
                    let _ = writeln!(t, "{}", indent(&asm, 4));
                }
                None => {
                    let _ = writeln!(
                        t,
                        "    {out} = nvvm.wgmma.mma_async {dp}, {dv}, {acc}, <m = 64, n = {n}, k = 16>, D[<f32>, <one>, <wrapped>], A[<bf16>, <one>, <row>], B[<bf16>, <one>, <row>] : {wide} -> {wide}"
                    );
                }
            }
            *acc = out;
        }
    }
    for (g, (chunks, acc)) in o.chunks_mut(group).zip(&accs).enumerate() {
        if group == 1 {
            chunks[0] = acc.clone();
            continue;
        }
        for (c, o_c) in chunks.iter_mut().enumerate() {
            let _ = writeln!(t, "    %pvo{g}_{c}_0 = llvm.mlir.poison : {FRAG}");
            for e in 0..FRAG_N {
                let w = c * FRAG_N + e;
                let _ = writeln!(
                    t,
                    "    %pvy{g}_{w} = llvm.extractvalue {acc}[{w}] : {wide}
    %pvo{g}_{c}_{} = llvm.insertvalue %pvy{g}_{w}, %pvo{g}_{c}_{e}[{e}] : {FRAG}",
                    e + 1
                );
            }
            *o_c = format!("%pvo{g}_{c}_{FRAG_N}");
        }
    }
}

/// Decode's page loop end: the products done, a block barrier (every warp has read the buffer and
/// P), the leader refills the buffer with tile `%j + stages` (`load`) when there is one, the
/// carried values yielded.
fn tile_loop_tail(count: &str, stages: usize, load: &str, yields: &[String], types: &[String]) -> String {
    format!(
        "    nvvm.wgmma.commit.group.sync.aligned
    nvvm.wgmma.wait.group.sync.aligned 0
    gpu.barrier
{}{}",
        refill_ring(stages, load, count),
        loop_yield(yields, types)
    )
}

/// After the tile's last block barrier: the leader refills the buffer with tile `%j + stages`
/// (`load`) when there is one.
fn refill_ring(stages: usize, load: &str, count: &str) -> String {
    format!(
        "    %jn = arith.addi %j, %c{stages} : index
    %more = arith.cmpi ult, %jn, {count} : index
    %refill = arith.andi %leader, %more : i1
    scf.if %refill {{
{load}
    }}
",
        load = indent(load, 6),
    )
}

/// A flash kernel's tile loop end: the products done, the buffer released and refilled
/// ([`release_and_refill`]), the carried values yielded.
fn release_tile_tail(stages: usize, load: &str, yields: &[String], types: &[String]) -> String {
    format!(
        "    nvvm.wgmma.commit.group.sync.aligned
    nvvm.wgmma.wait.group.sync.aligned 0
{}{}",
        release_and_refill(stages, load),
        loop_yield(yields, types)
    )
}

/// A flash kernel's release of tile `%j`'s buffer `%st` once its products are done (every
/// thread's wgmmas waited for): every thread arrives on the buffer's empty barrier (`stages + 1 +
/// %st`, one arrival a thread); when there is a tile `%j + stages` (of `%nt`) for the buffer,
/// the leader's warpgroup waits for the round's phase (`%parity`: both warpgroups done) and the
/// leader refills it (`load`). No block barrier: the other warpgroup runs on into its next tiles
/// (the leader's waits for it, as it would at the barrier, only when it refills). The whole
/// warpgroup waits, not the leader alone: its index is uniform (a spin loop in the leader's
/// branch made ptxas treat the loop's addresses as divergent, and build every descriptor in
/// vector registers again).
fn release_and_refill(stages: usize, load: &str) -> String {
    format!(
        "    %e_bar = arith.addi %st, %c{first} : index
    %released = nvgpu.mbarrier.arrive %bars[%e_bar] : !bar -> !nvgpu.mbarrier.token
    %jn = arith.addi %j, %c{stages} : index
    %more = arith.cmpi ult, %jn, %nt : index
    %wg_leads = arith.cmpi eq, %cw, %c0 : index
    %wg_refills = arith.andi %wg_leads, %more : i1
    scf.if %wg_refills {{
      nvgpu.mbarrier.try_wait.parity %bars[%e_bar], %parity, %ticks : !bar
      scf.if %leader {{
{load}
      }}
    }}
",
        first = stages + 1,
        load = indent(load, 8),
    )
}

/// The tile loop's end: the carried values yielded.
fn loop_yield(yields: &[String], types: &[String]) -> String {
    format!("    scf.yield {} : {}\n  }}\n", yields.join(", "), types.join(", "))
}

/// `%sn`: the next tile's scores when there is one (`%has_next`: tile `%nj` of a ring of
/// `stages` buffers of `stage_bytes` after the `query_bytes` of queries) — after waiting for its
/// buffer, `products` (ending in the fragment `s`) from its address `%next_addr` —, else a
/// fragment of -inf (`%nfrag32`: the softmax then sees no key: factors 1, P of 0).
fn next_scores(stages: usize, stage_bytes: usize, query_bytes: usize, products: &str, s: &str) -> String {
    format!(
        "%sn = scf.if %has_next -> ({FRAG}) {{
{wait}
{broadcast}
{products}
  scf.yield {s} : {FRAG}
}} else {{
  scf.yield %nfrag{FRAG_N} : {FRAG}
}}",
        wait = indent(&ring_wait("n", "%nj", stages, stage_bytes, query_bytes), 2),
        broadcast = indent(&lane0_broadcast("%next_addr", "%nstage_addr"), 2),
    )
}

/// The online softmax of one 64 x 64 score fragment `s` in f32: `mask(e)` defines `%in<e>` (element
/// e's key is visible to its row: rows `%trow + 8 h` with h = [`fragment_offset`]'s row half; see
/// [`below_limits`]; no mask: an interior tile, see [`interior_or_masked`]), the masked scores' row
/// maxima scaled into the log2 domain by `%scale_log2` (positive: the maximum of the scaled scores,
/// rounding and all), each score's exponent `score * scale_log2 - max` one fused multiply-add
/// (`%scale_log2`); the row maxima across the 4 lanes sharing a row, the new maxima `%m0`, `%m1`
/// from `%m<h>_in` (a row that has seen no key yet keeps the maximum -inf and subtracts 0 instead:
/// P of 0, not NaN — a decode split whose pages all lie past a speculative token's position, say),
/// the rows' rescale factors `%alpha0`, `%alpha1` (for [`rescale`]), the thread's partial sums
/// `%l0`, `%l1` from `%l<h>_in`, and P (`%pe<e>`, for [`store_p`]).
fn online_softmax(s: &str, mask: Option<&dyn Fn(usize) -> String>) -> String {
    let mut t = String::new();
    let half = |e: usize| fragment_offset(0, e).0 / 8;
    for e in 0..FRAG_N {
        let _ = writeln!(t, "%sv{e} = llvm.extractvalue {s}[{e}] : {FRAG}");
        if let Some(mask) = mask {
            let _ = writeln!(t, "{}\n%x{e} = arith.select %in{e}, %sv{e}, %ninf : f32", mask(e));
        }
    }
    // An interior tile's scores as they are (every key visible to every row).
    let x = |e: usize| if mask.is_some() { format!("%x{e}") } else { format!("%sv{e}") };
    for h in 0..2 {
        let members = || (0..FRAG_N).filter(move |&e| half(e) == h);
        let mut acc = "%ninf".to_string();
        for e in members() {
            let _ = writeln!(t, "%mx{h}_{e} = arith.maximumf {acc}, {} : f32", x(e));
            acc = format!("%mx{h}_{e}");
        }
        let _ = writeln!(
            t,
            "%sh{h}a, %sh{h}a_ok = gpu.shuffle xor {acc}, %c1_i32, %c32_i32 : f32
%rm{h}a = arith.maximumf {acc}, %sh{h}a : f32
%sh{h}b, %sh{h}b_ok = gpu.shuffle xor %rm{h}a, %c2_i32, %c32_i32 : f32
%rmr{h} = arith.maximumf %rm{h}a, %sh{h}b : f32
%rm{h} = arith.mulf %rmr{h}, %scale_log2 : f32
%m{h} = arith.maximumf %m{h}_in, %rm{h} : f32
%none{h} = arith.cmpf oeq, %m{h}, %ninf : f32
%mb{h} = arith.select %none{h}, %zero, %m{h} : f32
%md{h} = arith.subf %m{h}_in, %mb{h} : f32
%alpha{h} = {ex2_md}
%nmb{h} = arith.negf %mb{h} : f32",
            ex2_md = ex2(&format!("%md{h}"))
        );
        let mut sum = "%zero".to_string();
        for e in members() {
            let _ = writeln!(
                t,
                "%xd{e} = llvm.intr.fma({}, %scale_log2, %nmb{h}) : (f32, f32, f32) -> f32\n%pe{e} = {}",
                x(e),
                ex2(&format!("%xd{e}"))
            );
            let _ = writeln!(t, "%ps{h}_{e} = arith.addf {sum}, %pe{e} : f32");
            sum = format!("%ps{h}_{e}");
        }
        let _ = writeln!(t, "%lr{h} = arith.mulf %l{h}_in, %alpha{h} : f32\n%l{h} = arith.addf %lr{h}, {sum} : f32");
    }
    t
}

/// What [`online_softmax`] defines beside P: the rows' maxima, partial sums and rescale factors.
const SOFTMAX_RESULTS: [&str; 6] = ["%m0", "%m1", "%l0", "%l1", "%alpha0", "%alpha1"];

/// `%wlim`: the keys the warpgroup's first row sees, min(its position + 1, S); rows are in
/// ascending positions, so every row of the warpgroup sees every key below it.
const WARPGROUP_KEY_LIMIT: &str = "  %wq = arith.addi %past, %wr0 : index
  %wq_end = arith.addi %wq, %c1 : index
  %wlim = arith.minui %wq_end, %s_len : index
";

/// `body(masked)` twice, behind a branch on `interior` (i1: every element of the tile visible to
/// its row, decided for the whole warpgroup, so no warp diverges): the interior tiles skip the
/// per-element masks (FlashAttention-3's split of the masking iterations from the others), the
/// tiles on the causal diagonal or across a length take them. Both bodies define `results` (of
/// `types`), which the branch then defines.
fn interior_or_masked(interior: &str, results: &[String], types: &[&str], body: &dyn Fn(bool) -> String) -> String {
    let (names, types) = (results.join(", "), types.join(", "));
    format!(
        "{names} = scf.if {interior} -> ({types}) {{
{}
  scf.yield {names} : {types}
}} else {{
{}
  scf.yield {names} : {types}
}}
",
        indent(&body(false), 2),
        indent(&body(true), 2)
    )
}

/// [`online_softmax`] of `s` masked by the rows' limits `lims` (keys below them, from `%key_t`),
/// or with `interior` behind [`interior_or_masked`], which then defines its results.
fn online_softmax_unless_interior(s: &str, lims: [&str; 2], interior: Option<&str>) -> String {
    let body = |masked: bool| {
        if masked {
            below_limits(lims, "%key_t") + &online_softmax(s, Some(&below))
        } else {
            online_softmax(s, None)
        }
    };
    let Some(interior) = interior else { return body(true) };
    let mut results: Vec<String> = SOFTMAX_RESULTS.map(String::from).into();
    results.extend((0..FRAG_N).map(|e| format!("%pe{e}")));
    interior_or_masked(interior, &results, &vec!["f32"; results.len()], &body)
}

/// Masks as 32-bit compares of constants: element e's key is `key_t` plus its column c_e (a
/// constant of the fragment layout), so `key < lim` is `c_e < lim - key_t`. Defines `%rel0`,
/// `%rel1` (i32: `lims[h] - key_t`, negative when the row sees none of the tile) — not a 64-bit
/// add and compare an element. [`below`] is then one element's mask.
fn below_limits(lims: [&str; 2], key_t: &str) -> String {
    let mut t = String::new();
    for (h, lim) in lims.iter().enumerate() {
        let _ = writeln!(
            t,
            "%rel{h}_ix = arith.subi {lim}, {key_t} : index
%rel{h} = arith.index_cast %rel{h}_ix : index to i32"
        );
    }
    t
}

/// `%in<e>`: element e's key below its row's limit ([`below_limits`]).
fn below(e: usize) -> String {
    let (r, col) = fragment_offset(0, e);
    format!("%in{e} = arith.cmpi slt, %c{col}_i32, %rel{h} : i32", h = r / 8)
}

/// The `accs` accumulators `%o<n>_in` rescaled (see [`rescale_of`]).
fn rescale(accs: usize, alpha: &str) -> (String, Vec<String>) {
    let inputs: Vec<String> = (0..accs).map(|n| format!("%o{n}_in")).collect();
    rescale_of(&inputs, alpha)
}

/// The accumulators `inputs` rescaled by their rows' factors `<alpha>0`, `<alpha>1` (rows
/// `%trow`, `%trow + 8`); their names returned. A thread whose two rows kept their maxima
/// (factors exactly 1, as most rows once their largest scores are behind them) skips the
/// multiplications: the products would be the accumulators themselves.
fn rescale_of(inputs: &[String], alpha: &str) -> (String, Vec<String>) {
    let half = |e: usize| fragment_offset(0, e).0 / 8;
    let accs = inputs.len();
    let types = vec![FRAG; accs].join(", ");
    let (mut kept, mut rescaled) = (Vec::new(), Vec::new());
    let mut multiply = String::new();
    for (n, input) in inputs.iter().enumerate() {
        let mut cur = input.clone();
        for e in 0..FRAG_N {
            let _ = writeln!(
                multiply,
                "  %ov{n}_{e} = llvm.extractvalue {input}[{e}] : {FRAG}
  %oa{n}_{e} = arith.mulf %ov{n}_{e}, {alpha}{h} : f32
  %oi{n}_{e} = llvm.insertvalue %oa{n}_{e}, {cur}[{e}] : {FRAG}",
                h = half(e)
            );
            cur = format!("%oi{n}_{e}");
        }
        kept.push(input.clone());
        rescaled.push(cur);
    }
    let t = format!(
        "%alpha_one = arith.constant 1.0 : f32
%kept0 = arith.cmpf oeq, {alpha}0, %alpha_one : f32
%kept1 = arith.cmpf oeq, {alpha}1, %alpha_one : f32
%kept = arith.andi %kept0, %kept1 : i1
%rescaled:{accs} = scf.if %kept -> ({types}) {{
  scf.yield {kept} : {types}
}} else {{
{multiply}  scf.yield {rescaled} : {types}
}}
",
        kept = kept.join(", "),
        rescaled = rescaled.join(", ")
    );
    (t, (0..accs).map(|n| format!("%rescaled#{n}")).collect())
}

/// Decode's warpgroup 0 shares a value per row (`<src>0`, `<src>1`: rows `%trow`, `%trow + 8`)
/// with warpgroup 1: each of its quads' first lane stores its rows' into `%xview` ([`load_rows`] reads
/// them after a block barrier; the next store comes after another).
fn store_rows(src: &str) -> String {
    store_row_values(&src[1..], [&format!("{src}0"), &format!("{src}1")])
}

/// [`store_rows`] of the values `rows` (SSA names prefixed `name`).
fn store_row_values(name: &str, rows: [&str; 2]) -> String {
    let ws = WORKGROUP;
    let mut t = "scf.if %shares_rows {\n".to_string();
    for (h, value) in rows.iter().enumerate() {
        let _ = writeln!(
            t,
            "  %{name}_sr{h} = arith.addi %trow, %c{off} : index
  memref.store {value}, %xview[%{name}_sr{h}] : memref<{PAGE}xf32, {ws}>",
            off = 8 * h
        );
    }
    t.push_str("}\n");
    t
}

/// The values [`store_rows`] shared, for the thread's rows, as `<dst>0`, `<dst>1`.
fn load_rows(dst: &str) -> String {
    let ws = WORKGROUP;
    let mut t = String::new();
    for h in 0..2 {
        let _ = writeln!(
            t,
            "{dst}_q{h} = arith.addi %trow, %c{off} : index
{dst}{h} = memref.load %xview[{dst}_q{h}] : memref<{PAGE}xf32, {ws}>",
            off = 8 * h
        );
    }
    t
}

/// P of [`online_softmax`] stored at byte `p_off` of `%smem` (see [`store_tile`]).
fn store_p(p_off: &str) -> String {
    let mut t = String::new();
    store_tile(&mut t, p_off, &|e| format!("%pe{e}"));
    t
}

/// A 64 x 64 fragment's values (`value(e)`: element e's f32) stored as bf16 at byte `p_off` of
/// `%smem` in the 128-byte-swizzled K-major layout wgmma reads as A: element (r, k) at r * 64 + ((k / 8) xor (r mod 8)) * 8 + k mod 8. A
/// thread's elements e, e + 1 (e even) are columns k, k + 1 (k even) of one row, in one 16-byte
/// unit: rounded together (`cvt.rn.bf16x2.f32`) and stored as one 4-byte word.
fn store_tile(t: &mut String, p_off: &str, value: &dyn Fn(usize) -> String) {
    let ws = WORKGROUP;
    let _ = writeln!(
        t,
        "%pview = memref.view %smem[{p_off}][] : memref<?xi8, {ws}> to memref<{words}xi32, {ws}>",
        words = PAGE * CHUNK / 2
    );
    for e in (0..FRAG_N).step_by(2) {
        let (r, k) = fragment_offset(0, e);
        let _ = writeln!(
            t,
            "  %pr{e} = arith.addi %trow, %c{r} : index
  %pk{e} = arith.addi %lcol, %c{k} : index
  %pu{e} = arith.divui %pk{e}, %c8 : index
  %pm{e} = arith.remui %pr{e}, %c8 : index
  %px{e} = arith.xori %pu{e}, %pm{e} : index
  %pw{e} = arith.remui %pk{e}, %c8 : index
  %prow{e} = arith.muli %pr{e}, %c64 : index
  %punit{e} = arith.muli %px{e}, %c8 : index
  %pi0_{e} = arith.addi %prow{e}, %punit{e} : index
  %pi{e} = arith.addi %pi0_{e}, %pw{e} : index
  %pj{e} = arith.divui %pi{e}, %c2 : index
{pack}
  memref.store %pbits{e}, %pview[%pj{e}] : memref<{words}xi32, {ws}>",
            pack = indent(&pack_pair(&format!("%pbits{e}"), &value(e), &value(e + 1)), 2),
            words = PAGE * CHUNK / 2
        );
    }
}

/// `name` = the wgmma descriptor (i64) of the shared-memory address `addr` (its bits 4-17 in bits
/// 0-13) with `high`'s fixed fields, and `{name}_lo` its low word (i32), from which [`desc_at`]
/// derives the descriptors of the addresses after it.
fn desc(name: &str, addr: &str, high: &str) -> String {
    format!(
        "{name}_m = arith.andi {addr}, %addr_mask : i64
{name}_s = arith.shrui {name}_m, %c4_i64 : i64
{name}_a = arith.trunci {name}_s : i64 to i32
{name}_fixed = arith.trunci {high} : i64 to i32
{name}_lo = arith.ori {name}_a, {name}_fixed : i32
{}",
        desc_word(name)
    )
}

/// `name` = the descriptor of the address `units` x 16 bytes after `base`'s (a [`desc`]): its
/// low word plus `units` (the address field of a shared-memory address below 256 KiB takes the add
/// without a carry), the high word's fields constants — one 32-bit add an operand, not 64-bit
/// arithmetic on both words.
fn desc_at(name: &str, base: &str, units: usize) -> String {
    format!("{name}_lo = arith.addi {base}_lo, %c{units}_i32 : i32\n{}", desc_word(name))
}

/// `name` (i64) from its low word `{name}_lo` and the high word every descriptor here shares
/// (`%desc_k`'s: the swizzle mode and the stride offset).
fn desc_word(name: &str) -> String {
    format!("{name}_w = arith.extui {name}_lo : i32 to i64\n{name} = arith.ori %desc_k, {name}_w : i64")
}

/// [`fragment_coordinates`] with the warpgroup index `%cw` broadcast from lane 0 (`shfl.sync.idx`,
/// as CUTLASS's `canonical_warp_group_idx`): ptxas then knows it is the same across a warp and
/// keeps what derives from it — the own tiles', P's and the values' wgmma descriptors — in uniform
/// registers, where from `%tid / 128` it built them in vector registers and moved each to uniform
/// ones (`R2UR`) before every `HGMMA`.
fn uniform_fragment_coordinates() -> String {
    let (cw, rest) = fragment_coordinates().split_once('\n').expect("lines");
    assert!(cw.trim_start().starts_with("%cw = arith.divui %tid, %c128"), "{cw}");
    format!(
        "  %cw_t = arith.divui %tid, %c128 : index
  %cw_t32 = arith.index_cast %cw_t : index to i32
  %cw_u32, %cw_ok = gpu.shuffle idx %cw_t32, %c0_i32, %c32_i32 : i32
  %cw = arith.index_cast %cw_u32 : i32 to index
{rest}"
    )
}

/// `2^x` (the SFU's approximation; 2^-inf = 0).
fn ex2(x: &str) -> String {
    format!("llvm.inline_asm \"ex2.approx.ftz.f32 $0, $1;\", \"=f,f\" {x} : (f32) -> f32")
}

/// `log2(x)` (the SFU's approximation).
fn lg2(x: &str) -> String {
    format!("llvm.inline_asm \"lg2.approx.ftz.f32 $0, $1;\", \"=f,f\" {x} : (f32) -> f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::SM90A;

    #[test]
    fn names_round_trip_and_limits_are_named() {
        let c = MlaDecodeConfig::DEEPSEEK_V3;
        assert_eq!(c.kernel_name(), "mla_decode_kv512_r64_p64_s2_cl2_serial");
        let single = MlaDecodeConfig { cluster: 1, fp8_cache: true, serial: false, ..c };
        assert_eq!(single.kernel_name(), "mla_decode_kv512_r64_p64_s2_fp8");
        let ahead = MlaDecodeConfig { serial: false, ..c };
        assert_eq!(ahead.kernel_name(), "mla_decode_kv512_r64_p64_s2_cl2");
        let configs =
            [c, single, ahead, MlaDecodeConfig { fp8_cache: true, ..ahead }, MlaDecodeConfig { cluster: 1, ..c }];
        for config in configs {
            assert_eq!(MlaDecodeConfig::from_name(&config.kernel_name()), Some(config));
            assert!(config.validate(&SM90A).is_ok(), "{}", config.kernel_name());
        }
        // The serial loop loads a page ahead in two buffers, the loop a page ahead none.
        assert_eq!((c.loads_ahead(), ahead.loads_ahead(), single.loads_ahead()), (1, 0, 1));
        assert_eq!((c.pipelined(), ahead.pipelined()), (false, true));
        // `_serial` names only a loop that would otherwise be pipelined.
        for (serial, what) in [
            (MlaDecodeConfig { stages: 1, ..c }, "one page buffer"),
            (MlaDecodeConfig { fp8_cache: true, ..c }, "the fp8 cache"),
        ] {
            let err = serial.validate(&SM90A).unwrap_err();
            assert!(err.contains(&format!("`_serial` with {what}")), "{err}");
        }
        for bad in [
            "mla_decode_kv512_r64_p32_s2",
            "mla_decode_kv512_r64_p64_s",
            "mla_decode_kv+512_r64_p64_s2",
            "mla_decode_kv512_r64_p64_s2_cl1",
            "mla_decode_kv512_r64_p64_s2_fp8_cl2",
            "mla_decode_kv512_r64_p64_s2_serial_cl2",
        ] {
            assert_eq!(MlaDecodeConfig::from_name(bad), None, "{bad}");
        }
        // Clusters pair a sequence's 64-row blocks: an even number of them at any token count.
        let clusters: Vec<usize> = [128, 256, 64, 16, 192, 0].map(MlaDecodeConfig::cluster_for).into();
        assert_eq!(clusters, [2, 2, 1, 1, 1, 1]);
        let err = MlaDecodeConfig { cluster: 4, ..c }.validate(&SM90A).unwrap_err();
        assert!(err.contains("clusters of 4 blocks (1 or 2)"), "{err}");
        // 3 x 72 KiB + 8 KiB + 256 B fits the 227 KiB of an H100/H200 block; three page buffers do not.
        assert_eq!(c.shared_memory_bytes(), 229_632);
        assert!(c.validate(&SM90A).is_ok());
        let err = MlaDecodeConfig { stages: 3, ..c }.validate(&SM90A).unwrap_err();
        assert!(err.contains("needs 304384 B of shared memory"), "{err}");
        let err = MlaDecodeConfig { kv: 448, ..c }.validate(&SM90A).unwrap_err();
        assert!(err.contains("a latent width of 448"), "{err}");
        let err = MlaDecodeConfig { rope: 32, ..c }.validate(&SM90A).unwrap_err();
        assert!(err.contains("a rope width of 32"), "{err}");
        assert_eq!(c.grid(5, 128, 3), (10, 3));
        assert_eq!(c.grid(2, 16, 1), (2, 1));
        // The selected rows' kernel: two buffers, no cluster, its own loop (a buffer gathered a
        // page ahead).
        let sel = MlaDecodeConfig::DEEPSEEK_V32_SELECTED;
        assert_eq!(sel.kernel_name(), "mla_decode_kv512_r64_p64_s2_sel");
        assert_eq!(MlaDecodeConfig::from_name(&sel.kernel_name()), Some(sel));
        assert_eq!((sel.pipelined(), sel.loads_ahead(), sel.shared_memory_bytes()), (false, 1, 229_632));
        assert!(sel.validate(&SM90A).is_ok());
        for bad in [
            MlaDecodeConfig { stages: 1, ..sel },
            MlaDecodeConfig { cluster: 2, ..sel },
            MlaDecodeConfig { serial: true, ..sel },
            MlaDecodeConfig { fp8_cache: true, ..sel },
        ] {
            let err = bad.validate(&SM90A).unwrap_err();
            assert!(err.contains("the selected rows' kernel takes two page buffers"), "{err}");
        }
        assert_eq!(MlaDecodeConfig::from_name("mla_decode_kv512_r64_p64_s2_sel_fp8"), None);
    }
}
