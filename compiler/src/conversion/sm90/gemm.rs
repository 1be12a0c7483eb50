//! The Hopper GEMM template: `out[M, N] = A[M, K] . B[N, K]^T` (both operands K-major, as the
//! model's activations and `[out, in]` weights are), as one `gpu.func` in a `gpu.module`.
//!
//! Per thread block (one consumer warpgroup, 128 threads): a `block_m x block_n` output tile.
//! Thread 0 streams `block_m x 128 B` tiles of A and `block_n x 128 B` tiles of B through TMA
//! (`cp.async.bulk.tensor`, 128-byte swizzle) into a ring of `stages` shared-memory buffers, each
//! with its mbarrier (`arrive.expect_tx`); the warpgroup waits on the barrier's phase, issues
//! `wgmma.mma_async` (m64 x block_n x k16 for bf16, k32 for e4m3) from shared-memory descriptors,
//! and refills the buffer it just consumed. fp8: each 128-wide K block accumulates into a fresh
//! block accumulator that is promoted into the main f32 accumulator with the A row scale x the B
//! block scale (1x128 activation, 128x128 weight scaling), as DeepSeek-V3 prescribes. The epilogue
//! writes the accumulator fragments straight to global memory (bounds-checked: ragged M and N).
//!
//! What is not here yet (the config says so when asked): producer/consumer warp specialization,
//! more than one consumer warpgroup, persistent tile scheduling, clusters, grouped (MoE) GEMMs.

use std::fmt::Write as _;

use crate::target::GpuTarget;

/// Element type of A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmInput {
    Bf16,
    /// e4m3 with 1x128 A scales `[M, ceil(K/128)]` and 128x128 B scales `[ceil(N/128), ceil(K/128)]`.
    Fp8,
}

/// Element type of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmOutput {
    F32,
    Bf16,
}

/// One GEMM kernel configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmConfig {
    pub input: GemmInput,
    pub output: GemmOutput,
    /// Output tile rows: a multiple of 64 (one wgmma is 64 rows).
    pub block_m: usize,
    /// Output tile columns: a multiple of 16 from 16 to 256 (the wgmma N).
    pub block_n: usize,
    /// Shared-memory pipeline depth (buffers in flight).
    pub stages: usize,
}

/// Bytes of K per pipeline stage: one 128-byte swizzle row per tile row.
const ROW_BYTES: usize = 128;
/// Registers a thread keeps for itself beyond the accumulators (addresses, loop state, epilogue).
const REGISTER_HEADROOM: usize = 64;
/// Static shared memory beside the dynamic ring: the mbarriers, padded so that the dynamic region
/// starts 1024-byte aligned (what ptxas reports for these kernels).
pub const STATIC_SHARED_BYTES: usize = 1024;

impl GemmConfig {
    fn element_bytes(&self) -> usize {
        match self.input {
            GemmInput::Bf16 => 2,
            GemmInput::Fp8 => 1,
        }
    }

    /// K elements per pipeline stage (128 bytes).
    pub fn block_k(&self) -> usize {
        ROW_BYTES / self.element_bytes()
    }

    /// The wgmma K of one instruction (32 bytes of K).
    fn wgmma_k(&self) -> usize {
        32 / self.element_bytes()
    }

    /// Bytes of one pipeline stage (an A tile and a B tile).
    pub fn stage_bytes(&self) -> usize {
        (self.block_m + self.block_n) * ROW_BYTES
    }

    /// Dynamic shared memory the kernel needs.
    pub fn shared_memory_bytes(&self) -> usize {
        self.stages * self.stage_bytes()
    }

    /// f32 accumulator registers per thread: fp8 keeps a block and a main accumulator.
    pub fn accumulator_registers(&self) -> usize {
        let one = (self.block_m / 64) * (self.block_n / 2);
        match self.input {
            GemmInput::Bf16 => one,
            GemmInput::Fp8 => 2 * one,
        }
    }

    /// Threads per block: one warpgroup.
    pub fn threads(&self) -> usize {
        128
    }

    /// A stable name for the kernel of this configuration.
    pub fn kernel_name(&self) -> String {
        let input = match self.input {
            GemmInput::Bf16 => "bf16",
            GemmInput::Fp8 => "fp8",
        };
        let output = match self.output {
            GemmOutput::F32 => "f32",
            GemmOutput::Bf16 => "bf16",
        };
        format!("gemm_{input}_{output}_{}x{}x{}_s{}", self.block_m, self.block_n, self.block_k(), self.stages)
    }

    /// The configuration a [`GemmConfig::kernel_name`] names (`gemm_fp8_bf16_64x128x128_s6`).
    pub fn from_name(name: &str) -> Option<GemmConfig> {
        let rest = name.strip_prefix("gemm_")?;
        let mut parts = rest.split('_');
        let input = match parts.next()? {
            "bf16" => GemmInput::Bf16,
            "fp8" => GemmInput::Fp8,
            _ => return None,
        };
        let output = match parts.next()? {
            "f32" => GemmOutput::F32,
            "bf16" => GemmOutput::Bf16,
            _ => return None,
        };
        let dims: Vec<usize> = parts.next()?.split('x').map(|d| d.parse().ok()).collect::<Option<_>>()?;
        let stages = parts.next()?.strip_prefix('s')?.parse().ok()?;
        let [block_m, block_n, block_k] = dims[..] else { return None };
        let config = GemmConfig { input, output, block_m, block_n, stages };
        (parts.next().is_none() && config.block_k() == block_k).then_some(config)
    }

    /// Rejects configurations that cannot be generated or would not fit `target` (shared memory,
    /// registers), before any code is generated. The message names the limit.
    pub fn validate(&self, target: &GpuTarget) -> Result<(), String> {
        let name = self.kernel_name();
        if self.block_m == 0 || !self.block_m.is_multiple_of(64) || self.block_m > 256 {
            return Err(format!("{name}: block_m {} is not a multiple of 64 in 64..=256", self.block_m));
        }
        if self.block_n < 16 || !self.block_n.is_multiple_of(16) || self.block_n > 256 {
            return Err(format!("{name}: block_n {} is not a multiple of 16 in 16..=256", self.block_n));
        }
        if self.input == GemmInput::Fp8 && !128usize.is_multiple_of(self.block_n) && !self.block_n.is_multiple_of(128) {
            return Err(format!(
                "{name}: fp8 block_n {} must divide or be a multiple of the 128-wide weight scale block",
                self.block_n
            ));
        }
        if self.input == GemmInput::Fp8 && self.block_n > 128 {
            return Err(format!(
                "{name}: fp8 block_n {} spans more than one weight scale block (not generated yet)",
                self.block_n
            ));
        }
        if self.stages < 2 || self.stages > 8 {
            return Err(format!("{name}: {} stages (2..=8 supported)", self.stages));
        }
        let smem = self.shared_memory_bytes() + STATIC_SHARED_BYTES;
        if smem > target.max_shared_memory_per_block as usize {
            return Err(format!(
                "{name}: needs {smem} bytes of shared memory, {} has {} per block",
                target.name, target.max_shared_memory_per_block
            ));
        }
        let regs = self.accumulator_registers() + REGISTER_HEADROOM;
        if regs > target.max_registers_per_thread as usize {
            return Err(format!(
                "{name}: {} accumulator registers per thread (+{REGISTER_HEADROOM}) exceed {}'s {}",
                self.accumulator_registers(),
                target.name,
                target.max_registers_per_thread
            ));
        }
        Ok(())
    }
}

/// `!llvm.struct<(f32, ...)>` of `n` f32: one wgmma accumulator fragment.
fn fragment_type(n: usize) -> String {
    format!("!llvm.struct<({})>", vec!["f32"; n].join(", "))
}

/// The kernel's `gpu.module` text (one `gpu.func`, `kernel`): arguments `%a_map`, `%b_map`
/// (CUtensorMap pointers: 2-D, K innermost, box `[128 B of K, block rows]`, 128-byte swizzle,
/// out-of-bounds zero fill), `%out` (`memref<?x?xT>`, [M, N]), fp8 only `%a_scale`, `%b_scale`,
/// then `%k` (K in elements).
pub fn emit(config: &GemmConfig, target: &GpuTarget) -> Result<String, String> {
    config.validate(target)?;
    let c = config;
    let name = c.kernel_name();
    let (bm, bn, bk, stages) = (c.block_m, c.block_n, c.block_k(), c.stages);
    let m_tiles = bm / 64;
    let frag_n = bn / 2;
    let frag = fragment_type(frag_n);
    let (in_el, wgmma_el) = match c.input {
        GemmInput::Bf16 => ("bf16", "bf16"),
        GemmInput::Fp8 => ("f8E4M3FN", "e4m3"),
    };
    let out_el = match c.output {
        GemmOutput::F32 => "f32",
        GemmOutput::Bf16 => "bf16",
    };
    let fp8 = c.input == GemmInput::Fp8;
    let a_bytes = bm * ROW_BYTES;
    let tx = c.stage_bytes();
    let k_steps = bk / c.wgmma_k();
    let mut t = String::new();
    let ws = "#gpu.address_space<workgroup>";
    let _ = writeln!(t, "!bar = !nvgpu.mbarrier.group<memorySpace = {ws}, num_barriers = {stages}>");
    let _ = writeln!(t, "!amap = !nvgpu.tensormap.descriptor<tensor = memref<{bm}x{bk}x{in_el}, 3>, swizzle = swizzle_128b, l2promo = none, oob = zero, interleave = none>");
    let _ = writeln!(t, "!bmap = !nvgpu.tensormap.descriptor<tensor = memref<{bn}x{bk}x{in_el}, 3>, swizzle = swizzle_128b, l2promo = none, oob = zero, interleave = none>");
    let _ = writeln!(t, "module attributes {{gpu.container_module}} {{");
    let _ = writeln!(t, "gpu.module @kernels {{");
    let scale_args = if fp8 { ", %a_scale: memref<?x?xf32>, %b_scale: memref<?x?xf32>" } else { "" };
    let _ = writeln!(
        t,
        "gpu.func @{name}(%a_ptr: !llvm.ptr, %b_ptr: !llvm.ptr, %out: memref<?x?x{out_el}>{scale_args}, %k: index) kernel attributes {{known_block_size = array<i32: 128, 1, 1>}} {{"
    );
    // Constants and indices.
    let mut consts = vec![0usize, 1, 2, 4, 8, 16, 32, 64, 128, stages, bm, bn, bk, a_bytes, tx];
    consts.sort();
    consts.dedup();
    for v in consts {
        let _ = writeln!(t, "  %c{v} = arith.constant {v} : index");
    }
    let _ = writeln!(
        t,
        "  %ticks = arith.constant 10000000 : index
  %desc_hi = arith.constant {desc_hi} : i64
  %addr_mask = arith.constant 262143 : i64
  %c4_i64 = arith.constant 4 : i64
  %zero = arith.constant 0.0 : f32
  %a_map = builtin.unrealized_conversion_cast %a_ptr : !llvm.ptr to !amap
  %b_map = builtin.unrealized_conversion_cast %b_ptr : !llvm.ptr to !bmap
  %tid = gpu.thread_id x
  %bx = gpu.block_id x
  %by = gpu.block_id y
  %row0 = arith.muli %by, %c{bm} : index
  %col0 = arith.muli %bx, %c{bn} : index
  %k_tiles = arith.ceildivui %k, %c{bk} : index
  %smem = gpu.dynamic_shared_memory : memref<?xi8, {ws}>
  %smem_base_idx = memref.extract_aligned_pointer_as_index %smem : memref<?xi8, {ws}> -> index
  %smem_base = arith.index_cast %smem_base_idx : index to i64
  %bars = nvgpu.mbarrier.create -> !bar
  %leader = arith.cmpi eq, %tid, %c0 : index
  scf.if %leader {{
    scf.for %s = %c0 to %c{stages} step %c1 {{
      nvgpu.mbarrier.init %bars[%s], %c1 : !bar
    }}
    nvgpu.tma.prefetch.descriptor %a_map : !amap
    nvgpu.tma.prefetch.descriptor %b_map : !bmap
  }}
  gpu.barrier",
        // 128-byte swizzle (mode 1 in bits 62-63), stride byte offset 1024 B (8 rows x 128 B) in
        // bits 32-45 (16-byte units); the start address goes in bits 0-13 (16-byte units).
        desc_hi = (1u64 << 62) | (64u64 << 32),
    );
    // TMA issue of K tile %kt into stage %st (thread 0 only; the caller guards).
    let load = |kt: &str, st: &str| {
        format!(
            "%ld_a_off = arith.muli {st}, %c{tx} : index
%ld_b_off = arith.addi %ld_a_off, %c{a_bytes} : index
%ld_a = memref.view %smem[%ld_a_off][] : memref<?xi8, {ws}> to memref<{bm}x{bk}x{in_el}, {ws}>
%ld_b = memref.view %smem[%ld_b_off][] : memref<?xi8, {ws}> to memref<{bn}x{bk}x{in_el}, {ws}>
%ld_k0 = arith.muli {kt}, %c{bk} : index
nvgpu.mbarrier.arrive.expect_tx %bars[{st}], %c{tx} : !bar
nvgpu.tma.async.load %a_map[%ld_k0, %row0], %bars[{st}] to %ld_a : !amap, !bar -> memref<{bm}x{bk}x{in_el}, {ws}>
nvgpu.tma.async.load %b_map[%ld_k0, %col0], %bars[{st}] to %ld_b : !bmap, !bar -> memref<{bn}x{bk}x{in_el}, {ws}>"
        )
    };
    let _ = writeln!(
        t,
        "  %prologue = arith.minui %k_tiles, %c{stages} : index
  scf.if %leader {{
    scf.for %s = %c0 to %prologue step %c1 {{
{}
    }}
  }}",
        indent(&load("%s", "%s"), 6)
    );
    // Accumulators: zero fragments.
    let mut zero = String::from("  %frag0 = llvm.mlir.poison : FRAG\n");
    for e in 0..frag_n {
        let _ = writeln!(zero, "  %frag{} = llvm.insertvalue %zero, %frag{e}[{e}] : FRAG", e + 1);
    }
    t.push_str(&zero.replace("FRAG", &frag));
    let accs: Vec<String> = (0..m_tiles).map(|i| format!("%acc{i}")).collect();
    let iter_args: Vec<String> = accs.iter().map(|a| format!("{a}_in = %frag{frag_n}")).collect();
    let types = vec![frag.clone(); m_tiles].join(", ");
    let _ = writeln!(
        t,
        "  %res:{m_tiles} = scf.for %kt = %c0 to %k_tiles step %c1 iter_args({}) -> ({types}) {{",
        iter_args.join(", ")
    );
    let _ = writeln!(
        t,
        "    %st = arith.remui %kt, %c{stages} : index
    %round = arith.divui %kt, %c{stages} : index
    %par = arith.remui %round, %c2 : index
    %parity = arith.index_cast %par : index to i1
    nvgpu.mbarrier.try_wait.parity %bars[%st], %parity, %ticks : !bar
    %a_off = arith.muli %st, %c{tx} : index
    %a_off64 = arith.index_cast %a_off : index to i64
    %a_addr = arith.addi %smem_base, %a_off64 : i64
    %b_addr = arith.addi %a_addr, %c{a_bytes}_i64 : i64"
    );
    // Descriptors: base per A row tile and for B; each k step adds 32 bytes (2 units).
    let desc = |name: &str, addr: &str| {
        format!(
            "    %{name}_m = arith.andi {addr}, %addr_mask : i64\n    %{name}_s = arith.shrui %{name}_m, %c4_i64 : i64\n    %{name} = arith.ori %desc_hi, %{name}_s : i64"
        )
    };
    for i in 0..m_tiles {
        let _ = writeln!(t, "    %a_addr{i} = arith.addi %a_addr, %c{}_i64 : i64", i * 64 * ROW_BYTES);
        let _ = writeln!(t, "{}", desc(&format!("da{i}"), &format!("%a_addr{i}")));
    }
    let _ = writeln!(t, "{}", desc("db", "%b_addr"));
    let _ = writeln!(t, "    nvvm.wgmma.fence.aligned");
    // The wgmma chain: bf16 accumulates into the running accumulators; fp8 starts a fresh block
    // accumulator each K block (scale-out zero on the first step).
    let mut cur: Vec<String> =
        if fp8 { vec![String::new(); m_tiles] } else { accs.iter().map(|a| format!("{a}_in")).collect() };
    for ks in 0..k_steps {
        if ks > 0 {
            let _ = writeln!(t, "    %koff{ks} = arith.constant {} : i64", 2 * ks);
        }
        for (i, cur_i) in cur.iter_mut().enumerate() {
            let (da, db) = if ks == 0 {
                (format!("%da{i}"), "%db".to_string())
            } else {
                let _ = writeln!(t, "    %da{i}_{ks} = arith.addi %da{i}, %koff{ks} : i64");
                if i == 0 {
                    let _ = writeln!(t, "    %db_{ks} = arith.addi %db, %koff{ks} : i64");
                }
                (format!("%da{i}_{ks}"), format!("%db_{ks}"))
            };
            let (input, scale_out) =
                if fp8 && ks == 0 { (format!("%frag{frag_n}"), "zero") } else { (cur_i.clone(), "one") };
            let out = format!("%w{i}_{ks}");
            let _ = writeln!(
                t,
                "    {out} = nvvm.wgmma.mma_async {da}, {db}, {input}, <m = 64, n = {bn}, k = {wk}>, D[<f32>, <{scale_out}>, <wrapped>], A[<{wgmma_el}>, <one>, <row>], B[<{wgmma_el}>, <one>, <col>] : {frag} -> {frag}",
                wk = c.wgmma_k()
            );
            *cur_i = out;
        }
    }
    let _ = writeln!(t, "    nvvm.wgmma.commit.group.sync.aligned\n    nvvm.wgmma.wait.group.sync.aligned 0");
    // fp8 promotion: main += block * a_scale[row, kt] * b_scale[col0 / 128, kt].
    let results: Vec<String> = if fp8 {
        let _ = writeln!(
            t,
            "    %lane = arith.remui %tid, %c32 : index
    %warp = arith.divui %tid, %c32 : index
    %wrow = arith.muli %warp, %c16 : index
    %lrow = arith.divui %lane, %c4 : index
    %trow = arith.addi %wrow, %lrow : index
    %nb = arith.divui %col0, %c128 : index
    %sb = memref.load %b_scale[%nb, %kt] : memref<?x?xf32>
    %m_rows = memref.dim %a_scale, %c0 : memref<?x?xf32>"
        );
        let mut out = Vec::new();
        for i in 0..m_tiles {
            // The two rows this thread holds in row tile i: trow and trow + 8.
            for (h, off) in [(0, 0), (1, 8)] {
                let _ = writeln!(
                    t,
                    "    %r{i}_{h}a = arith.addi %row0, %trow : index
    %r{i}_{h}o = arith.constant {} : index
    %r{i}_{h} = arith.addi %r{i}_{h}a, %r{i}_{h}o : index
    %r{i}_{h}_in = arith.cmpi ult, %r{i}_{h}, %m_rows : index
    %sa{i}_{h} = scf.if %r{i}_{h}_in -> (f32) {{
      %v = memref.load %a_scale[%r{i}_{h}, %kt] : memref<?x?xf32>
      scf.yield %v : f32
    }} else {{
      scf.yield %zero : f32
    }}
    %s{i}_{h} = arith.mulf %sa{i}_{h}, %sb : f32",
                    i * 64 + off
                );
            }
            let acc_in = format!("{}_in", accs[i]);
            let mut prev = acc_in.clone();
            for e in 0..frag_n {
                let h = (e % 4) / 2;
                let _ = writeln!(
                    t,
                    "    %bv{i}_{e} = llvm.extractvalue {blk}[{e}] : {frag}
    %mv{i}_{e} = llvm.extractvalue {acc_in}[{e}] : {frag}
    %pv{i}_{e} = llvm.intr.fma(%bv{i}_{e}, %s{i}_{h}, %mv{i}_{e}) : (f32, f32, f32) -> f32
    %p{i}_{e} = llvm.insertvalue %pv{i}_{e}, {prev}[{e}] : {frag}",
                    blk = cur[i],
                );
                prev = format!("%p{i}_{e}");
            }
            out.push(prev);
        }
        out
    } else {
        cur.clone()
    };
    // Refill the stage just consumed with K tile kt + stages, once every warp's wgmma has read it
    // (wgmma.wait_group covers the issuing warp only: the block barrier covers the warpgroup).
    let _ = writeln!(
        t,
        "    gpu.barrier
    %kn = arith.addi %kt, %c{stages} : index
    %more = arith.cmpi ult, %kn, %k_tiles : index
    %refill = arith.andi %leader, %more : i1
    scf.if %refill {{
{}
    }}
    scf.yield {} : {types}
  }}",
        indent(&load("%kn", "%st"), 6),
        results.join(", ")
    );
    // Epilogue: fragment element e of row tile i sits at row 64 i + 16 warp + lane / 4 + 8 ((e % 4) / 2),
    // column 8 (e / 4) + 2 (lane % 4) + e % 2.
    let _ = writeln!(
        t,
        "  %m = memref.dim %out, %c0 : memref<?x?x{out_el}>
  %n = memref.dim %out, %c1 : memref<?x?x{out_el}>
  %e_lane = arith.remui %tid, %c32 : index
  %e_warp = arith.divui %tid, %c32 : index
  %e_wrow = arith.muli %e_warp, %c16 : index
  %e_lrow = arith.divui %e_lane, %c4 : index
  %e_trow = arith.addi %e_wrow, %e_lrow : index
  %e_lcol0 = arith.remui %e_lane, %c4 : index
  %e_lcol = arith.muli %e_lcol0, %c2 : index"
    );
    let _ = writeln!(
        t,
        "  %e_row_base = arith.addi %row0, %e_trow : index\n  %e_col_base = arith.addi %col0, %e_lcol : index"
    );
    for i in 0..m_tiles {
        for e in 0..frag_n {
            let row_off = i * 64 + 8 * ((e % 4) / 2);
            let col_off = 8 * (e / 4) + e % 2;
            let store = match c.output {
                GemmOutput::F32 => format!("memref.store %v{i}_{e}, %out[%r{i}_{e}, %q{i}_{e}] : memref<?x?xf32>"),
                GemmOutput::Bf16 => format!(
                    "%h{i}_{e} = arith.truncf %v{i}_{e} : f32 to bf16\n    memref.store %h{i}_{e}, %out[%r{i}_{e}, %q{i}_{e}] : memref<?x?xbf16>"
                ),
            };
            let _ = writeln!(
                t,
                "  %ro{i}_{e} = arith.constant {row_off} : index
  %co{i}_{e} = arith.constant {col_off} : index
  %r{i}_{e} = arith.addi %e_row_base, %ro{i}_{e} : index
  %q{i}_{e} = arith.addi %e_col_base, %co{i}_{e} : index
  %ir{i}_{e} = arith.cmpi ult, %r{i}_{e}, %m : index
  %ic{i}_{e} = arith.cmpi ult, %q{i}_{e}, %n : index
  %in{i}_{e} = arith.andi %ir{i}_{e}, %ic{i}_{e} : i1
  scf.if %in{i}_{e} {{
    %v{i}_{e} = llvm.extractvalue %res#{i}[{e}] : {frag}
    {store}
  }}"
            );
        }
    }
    let _ = writeln!(t, "  gpu.return\n}}\n}}\n}}");
    // i64 copies of index constants used with descriptor arithmetic.
    let mut i64_consts = String::new();
    for v in (0..m_tiles).map(|i| i * 64 * ROW_BYTES).chain([a_bytes]) {
        let line = format!("  %c{v}_i64 = arith.constant {v} : i64\n");
        if !i64_consts.contains(&line) {
            i64_consts.push_str(&line);
        }
    }
    let anchor = "  %ticks = arith.constant";
    Ok(t.replacen(anchor, &format!("{i64_consts}{anchor}"), 1))
}

fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}")).collect::<Vec<_>>().join("\n")
}
