//! A functional simulator of the PTX v3c generates for sm_90a, run on the host: the kernels' own
//! instructions, not a model of what they compute. It exists so that the GPU kernels' code — index
//! arithmetic, shared-memory layouts and swizzles, TMA boxes, mbarrier pipelines, warp
//! specialization, wgmma fragments — is checked on machines without a GPU, against the CPU backend
//! (`v3c emulate --ptx`).
//!
//! What it models:
//! - CTAs one after another (a cluster's CTAs together); threads each run until they must wait:
//!   `bar.sync` (all threads of the CTA not exited, or the count given), a warp's `shfl.sync`, a
//!   warpgroup's `wgmma.mma_async`, an mbarrier phase (`try_wait.parity`), `barrier.cluster`. A
//!   CTA (or cluster) where no thread can go on is reported as a deadlock, naming the threads,
//!   lines and what each waits for.
//! - Clusters (`.reqnctapercluster`): `%cluster_ctaid`, `mapa` into another CTA's shared memory,
//!   mbarrier arrivals there, TMA multicast to the CTAs of a mask.
//! - Global memory is the host's (addresses are host pointers); with [`Launch::regions`] every
//!   global access must fall inside one, else the launch fails naming the address. Shared memory is
//!   the kernel's static variables then the dynamic part, bounds-checked; generic addresses of it
//!   lie in a window at [`SHARED_WINDOW`].
//! - Mbarriers: arrival counts, transaction bytes and phases. TMA (`cp.async.bulk.tensor`, 2-d
//!   tiles): the box copied at once, zero outside the matrix, 128-byte swizzled by the shared
//!   address, its bytes completed on the mbarrier. Tensor maps are passed as parameters
//!   `TENSOR_MAP_BASE + 128 i` naming [`Launch::tensor_maps`]`[i]`.
//! - wgmma: m64nNk16 (bf16) and m64nNk32 (e4m3) with f32 accumulators, operands from shared-memory
//!   descriptors ([`layout`]), bf16's A from registers too. Issued when the warpgroup's 128 threads arrive, run when it waits
//!   for its group (`commit_group`, `wait_group N`) and nothing else can go on: operands and
//!   accumulators are read as late as the tensor cores may read them, so a kernel that changes
//!   either before waiting gets other results. A warpgroup that exits with wgmmas in flight fails.
//!
//! - Schedules: a CTA's threads run first to last, or with [`Checks::reversed`] last to first; a
//!   kernel that depends on an order it does not enforce may part between the two.
//! - Data races on shared memory, with [`Checks::races`]: happens-before by vector clocks over
//!   barriers, mbarrier phases (TMA copies' completed bytes included), the cluster barrier and
//!   wgmma issue and wait, so a race in the run is found whatever order the threads ran in;
//!   also a wgmma that reads bytes a thread wrote without a `fence.proxy.async` between.
//! - Data races on global memory between a launch's CTAs, with the same check (`global_race.rs`):
//!   unordered but for a GPU-scope fence then an atomic (released) and an atomic at that address
//!   (acquired), whatever order the CTAs ran in.
//!
//! What it does not: timing, memory ordering between CTAs of different clusters (they run in
//! turn; what it checks of it is the races above), races in global memory between a CTA's own
//! threads, the hardware's own rounding of wgmma's accumulation (sums
//! here are sequential f32; the tensor cores' fp8 accumulation keeps fewer bits) and of
//! `ex2.approx`/`lg2.approx` (exact functions here).

mod exec;
mod global_race;
pub mod layout;
pub mod parse;
mod race;

pub use parse::{Kernel, Module};

/// Generic addresses of a CTA's shared memory: this plus the shared offset.
pub const SHARED_WINDOW: u64 = 0xffff_8000_0000_0000;

/// Tensor map `i` of a launch is passed as this plus `128 * i`.
pub const TENSOR_MAP_BASE: u64 = 0xffff_f000_0000_0000;

/// A 2-d tensor map (what `cuTensorMapEncodeTiled` encodes for the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMap {
    pub addr: u64,
    pub rows: usize,
    pub cols: usize,
    pub element_bytes: usize,
    pub box_rows: usize,
    pub box_cols: usize,
    /// Bytes from one row to the next.
    pub pitch: usize,
    /// 128-byte swizzle; else none.
    pub swizzle: bool,
}

/// One kernel launch.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub grid: [u32; 2],
    pub threads: u32,
    pub dynamic_shared: usize,
    /// Parameter values in order (each written in its declared width).
    pub params: &'a [u64],
    pub tensor_maps: &'a [TensorMap],
    /// Where global memory may be accessed, as (start, bytes) sorted by start; `None`: anywhere.
    pub regions: Option<&'a [(u64, usize)]>,
    /// Instructions one CTA may execute before the launch is called endless.
    pub max_instructions: u64,
    pub checks: Checks,
}

/// How a launch runs, to check it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checks {
    /// Run a CTA's threads last to first (each as far as it goes before the next): another legal
    /// schedule, under which a kernel that leans on an order it does not enforce (a missing
    /// barrier) gives other results.
    pub reversed: bool,
    /// Look for data races on shared memory, by happens-before (whatever the schedule): an access
    /// not ordered after a conflicting one, or a wgmma that reads what a thread wrote without a
    /// proxy fence, fails the launch naming both; and on global memory between the launch's CTAs
    /// (whatever order they run in). Slower.
    pub races: bool,
}

/// What a launch executed, and how its threads' loads and stores met memory: warp-level requests
/// (a warp's lanes executing one load, store or atomic together), the 32-byte sectors of global
/// memory they touched against the distinct bytes they asked for (coalescing), and the wavefronts shared
/// memory takes for them (one without bank conflicts). TMA copies and wgmma operand reads are the
/// hardware's own and not counted. `accesses` holds the same counts per load, store or atomic
/// instruction (by its PTX line): where a kernel's uncoalesced or bank-conflicted accesses are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub ctas: u64,
    pub instructions: u64,
    pub global_requests: u64,
    pub global_sectors: u64,
    pub global_bytes: u64,
    pub shared_requests: u64,
    pub shared_wavefronts: u64,
    /// The fewest wavefronts the shared requests could take, their words spread over the 32
    /// banks: one a request of 4-byte lanes, four of 16-byte lanes (`ld.shared.v4`).
    pub shared_least_wavefronts: u64,
    /// The most instructions one thread executed (in a launch: the busiest thread of any CTA;
    /// summed over launches): a floor under the launch's time in dependent issues, where
    /// `instructions` counts the work of all threads.
    pub longest_thread: u64,
    /// The most global-load latencies one thread waited out (in a launch: the thread of any CTA
    /// that waited most; summed over launches). A thread issues in order: an instruction that
    /// names a register a global load (or atomic) has yet to fill waits for that load, and with it
    /// for every load issued before it; loads issued before the first such use overlap. In PTX
    /// order (ptxas may hoist loads or unroll loops and wait less): a floor under a latency-bound
    /// launch's time in DRAM round trips, where the kernel issues too few loads ahead.
    pub load_rounds: u64,
    pub accesses: std::collections::BTreeMap<usize, MemoryAccess>,
}

/// One memory instruction's warp-level requests over a launch (or the launches summed): in
/// shared memory with their wavefronts, in global memory with their sectors and the distinct
/// bytes they asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryAccess {
    /// The instruction as the PTX has it.
    pub text: String,
    pub shared: bool,
    pub requests: u64,
    pub sectors: u64,
    pub bytes: u64,
    pub wavefronts: u64,
    pub least_wavefronts: u64,
}

impl MemoryAccess {
    /// Sector bytes moved but not asked for (global), or wavefronts past the fewest its requests
    /// could take (shared, in wavefronts: bank conflicts): what the access wastes.
    pub fn waste(&self) -> u64 {
        if self.shared {
            self.wavefronts - self.least_wavefronts
        } else {
            32 * self.sectors - self.bytes
        }
    }
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.ctas += o.ctas;
        self.instructions += o.instructions;
        self.global_requests += o.global_requests;
        self.global_sectors += o.global_sectors;
        self.global_bytes += o.global_bytes;
        self.shared_requests += o.shared_requests;
        self.shared_wavefronts += o.shared_wavefronts;
        self.shared_least_wavefronts += o.shared_least_wavefronts;
        self.longest_thread += o.longest_thread;
        self.load_rounds += o.load_rounds;
        for (line, a) in &o.accesses {
            let mine = self
                .accesses
                .entry(*line)
                .or_insert_with(|| MemoryAccess { text: a.text.clone(), ..MemoryAccess::default() });
            mine.shared = a.shared;
            mine.requests += a.requests;
            mine.sectors += a.sectors;
            mine.bytes += a.bytes;
            mine.wavefronts += a.wavefronts;
            mine.least_wavefronts += a.least_wavefronts;
        }
    }

    /// Bytes asked for per byte of sectors moved (1: every sector byte used).
    pub fn global_efficiency(&self) -> f64 {
        self.global_bytes as f64 / (32 * self.global_sectors).max(1) as f64
    }

    /// Wavefronts per shared request (1 for 4-byte lanes without bank conflicts; 4 for 16-byte
    /// lanes).
    pub fn shared_wavefronts_per_request(&self) -> f64 {
        self.shared_wavefronts as f64 / self.shared_requests.max(1) as f64
    }

    /// Wavefronts per the fewest the shared requests could take (1: no bank conflicts, whatever
    /// the width of the lanes' accesses).
    pub fn shared_conflict_factor(&self) -> f64 {
        self.shared_wavefronts as f64 / self.shared_least_wavefronts.max(1) as f64
    }
}

/// Runs `kernel` as `launch` says.
///
/// # Safety
/// Every global address the kernel touches (from its parameters and the tensor maps) must be live
/// host memory it may read and write; when `launch.regions` is given, accesses outside those
/// regions are refused instead.
pub unsafe fn run(kernel: &Kernel, launch: &Launch) -> Result<Stats, String> {
    exec::run(kernel, launch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums 64 u32 by warp shuffles, the warps' sums through shared memory after a barrier.
    const SUM: &str = "
.visible .entry sum(
\t.param .u64 sum_param_0,
\t.param .u64 sum_param_1
)
.maxntid 64, 1, 1
{
\t.reg .pred %p<2>;
\t.reg .b32 %r<8>;
\t.reg .b64 %rd<8>;
\t.shared .align 4 .b8 part[8];
\tld.param.b64 %rd1, [sum_param_0];
\tld.param.b64 %rd2, [sum_param_1];
\tmov.u32 %r1, %tid.x;
\tmul.wide.u32 %rd3, %r1, 4;
\tadd.s64 %rd4, %rd1, %rd3;
\tld.global.b32 %r2, [%rd4];
\tshfl.sync.bfly.b32 %r3, %r2, 16, 31, -1;
\tadd.s32 %r2, %r2, %r3;
\tshfl.sync.bfly.b32 %r3, %r2, 8, 31, -1;
\tadd.s32 %r2, %r2, %r3;
\tshfl.sync.bfly.b32 %r3, %r2, 4, 31, -1;
\tadd.s32 %r2, %r2, %r3;
\tshfl.sync.bfly.b32 %r3, %r2, 2, 31, -1;
\tadd.s32 %r2, %r2, %r3;
\tshfl.sync.bfly.b32 %r3, %r2, 1, 31, -1;
\tadd.s32 %r2, %r2, %r3;
\tand.b32 %r4, %r1, 31;
\tsetp.ne.b32 %p1, %r4, 0;
\t@%p1 bra $L__skip;
\tshr.u32 %r5, %r1, 5;
\tmul.wide.u32 %rd5, %r5, 4;
\tmov.b64 %rd6, part;
\tadd.s64 %rd6, %rd6, %rd5;
\tst.shared.b32 [%rd6], %r2;
$L__skip:
\tbar.sync BARRIER;
\tsetp.ne.b32 %p1, %r1, 0;
\t@%p1 bra $L__end;
\tmov.b64 %rd6, part;
\tld.shared.b32 %r6, [%rd6];
\tld.shared.b32 %r7, [%rd6+4];
\tadd.s32 %r6, %r6, %r7;
\tst.global.b32 [%rd2], %r6;
$L__end:
\tret;
}";

    /// The sum of 1..=64 by [`SUM`] with `barrier` as its barrier instruction; `input_only`:
    /// global memory is the input alone; `reversed`: the threads run last to first.
    fn sum_with(barrier: &str, input_only: bool, reversed: bool) -> Result<u32, String> {
        sum_stats(barrier, input_only, reversed).map(|(v, _)| v)
    }

    /// [`sum_with`] and the launch's stats.
    fn sum_stats(barrier: &str, input_only: bool, reversed: bool) -> Result<(u32, Stats), String> {
        let module = Module::parse(&SUM.replace("bar.sync BARRIER", barrier))?;
        // The input 128-byte aligned (a warp's 128 bytes: 4 sectors).
        let mut storage = vec![0u32; 64 + 32];
        let skip = (128 - storage.as_ptr() as usize % 128) % 128 / 4;
        let input = &mut storage[skip..skip + 64];
        input.iter_mut().zip(1..).for_each(|(x, v)| *x = v);
        let mut out = [0u32; 1];
        let params = [input.as_ptr() as u64, out.as_mut_ptr() as u64];
        let only = [(input.as_ptr() as u64, 256)];
        let regions = input_only.then_some(&only[..]);
        let launch = Launch {
            grid: [1, 1],
            threads: 64,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[],
            regions,
            max_instructions: 1 << 20,
            checks: Checks { reversed, races: false },
        };
        // SAFETY: the parameters are the live input and output.
        let stats = unsafe { run(&module.kernels[0], &launch) }?;
        Ok((out[0], stats))
    }

    /// The sum's memory traffic: two warps each loading 128 contiguous bytes (4 sectors, all
    /// used), one 4-byte store; four one-lane shared accesses of one wavefront each.
    #[test]
    fn warp_requests_count_their_sectors_and_wavefronts() {
        let (_, s) = sum_stats("bar.sync 0", false, false).unwrap();
        assert_eq!((s.global_requests, s.global_sectors, s.global_bytes), (3, 9, 260));
        assert_eq!((s.shared_requests, s.shared_wavefronts), (4, 4));
    }

    /// A warp's one shared store, `store` (of `[%rd3]`, lane l's address l `stride` bytes into a
    /// 16-byte aligned buffer), run: its stats.
    fn one_shared_store(store: &str, stride: u32) -> Stats {
        let text = format!(
            ".visible .entry k()\n{{\n\t.reg .b32 %r<2>;\n\t.reg .b64 %rd<4>;\n\t.shared .align 16 .b8 buf[4096];\n\
             \tmov.u32 %r1, %tid.x;\n\tmul.wide.u32 %rd1, %r1, {stride};\n\tmov.b64 %rd2, buf;\n\
             \tadd.s64 %rd3, %rd2, %rd1;\n\t{store};\n\tret;\n}}"
        );
        let module = Module::parse(&text).unwrap();
        let launch = Launch {
            grid: [1, 1],
            threads: 32,
            dynamic_shared: 0,
            params: &[],
            tensor_maps: &[],
            regions: Some(&[]),
            max_instructions: 1000,
            checks: Checks::default(),
        };
        // SAFETY: no global memory.
        unsafe { run(&module.kernels[0], &launch) }.unwrap()
    }

    /// 32 lanes storing 128 bytes apart hit one bank: 32 wavefronts; 4 bytes apart: one.
    #[test]
    fn shared_stores_in_one_bank_take_a_wavefront_each() {
        let wavefronts = |stride: u32| {
            let s = one_shared_store("st.shared.b32 [%rd3], %r1", stride);
            (s.shared_requests, s.shared_wavefronts)
        };
        assert_eq!(wavefronts(128), (1, 32));
        assert_eq!(wavefronts(4), (1, 1));
        assert_eq!(wavefronts(8), (1, 2));
    }

    /// 32 lanes storing 16 bytes each: adjacent, 512 bytes in 4 wavefronts, the fewest they could
    /// take (no conflict); 32 bytes apart, 8 wavefronts of which 4 are conflicts.
    #[test]
    fn wide_shared_accesses_take_the_wavefronts_their_words_need() {
        let stats = |stride: u32| {
            let s = one_shared_store("st.shared.v4.b32 [%rd3], {%r1, %r1, %r1, %r1}", stride);
            let access = s.accesses.values().next().unwrap().clone();
            (s.shared_wavefronts, s.shared_least_wavefronts, s.shared_conflict_factor(), access.waste())
        };
        assert_eq!(stats(16), (4, 4, 1.0, 0));
        assert_eq!(stats(32), (8, 4, 2.0, 4));
    }

    /// A vector access must sit at a multiple of its whole size, as on the GPU (which faults with
    /// "misaligned address"): 8 bytes of `st.shared.v2.b32` at offset 4 is refused, at 8 taken.
    #[test]
    fn vector_accesses_must_be_aligned_to_their_size() {
        let store_at = |offset: u32| {
            let text = format!(
                ".visible .entry k()\n{{\n\t.reg .b32 %r<3>;\n\t.reg .b64 %rd<3>;\n\t.shared .align 16 .b8 buf[64];\n\
                 \tmov.b32 %r1, 1;\n\tmov.b32 %r2, 2;\n\tmov.b64 %rd1, buf;\n\tadd.s64 %rd2, %rd1, {offset};\n\
                 \tst.shared.v2.b32 [%rd2], {{%r1, %r2}};\n\tret;\n}}"
            );
            let module = Module::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            let launch = Launch {
                grid: [1, 1],
                threads: 1,
                dynamic_shared: 0,
                params: &[],
                tensor_maps: &[],
                regions: Some(&[]),
                max_instructions: 100,
                checks: Checks::default(),
            };
            // SAFETY: no global memory.
            unsafe { run(&module.kernels[0], &launch) }.map(|_| ())
        };
        assert!(store_at(8).is_ok());
        let e = store_at(4).unwrap_err();
        assert!(e.contains("misaligned address: a 8-byte access"), "{e}");
    }

    /// Runs kernel `text`'s one entry on one block of `threads` threads, its one parameter `out`.
    fn run_on_one_block(text: &str, threads: u32, out: u64) {
        let module = Module::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let params = [out];
        let launch = Launch {
            grid: [1, 1],
            threads,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[],
            regions: None,
            max_instructions: 10_000,
            checks: Checks::default(),
        };
        // SAFETY: the one parameter is the caller's live output, large enough for what it stores.
        unsafe { run(&module.kernels[0], &launch) }.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Shared-memory atomics of 64 threads: f64 adds (64 of 0.25 make 16) and an unsigned maximum.
    #[test]
    fn shared_atomics_add_doubles_and_take_maxima() {
        // Thread 0 writes both out after a barrier.
        let text = ".shared .align 8 .b8 sum[8];\n.shared .align 4 .b8 most[4];\n\
                    .visible .entry k(\n\t.param .u64 k_param_0\n)\n{\n\t.reg .pred %p<2>;\n\t.reg .b32 %r<4>;\n\t.reg .f64 %fd<3>;\n\t.reg .b64 %rd<3>;\n\
                    \tld.param.b64 %rd1, [k_param_0];\n\tmov.u32 %r1, %tid.x;\n\tmov.f64 %fd1, 0d3FD0000000000000;\n\
                    \tatom.shared.add.f64 %fd2, [sum], %fd1;\n\tatom.shared.max.u32 %r2, [most], %r1;\n\tbar.sync 0;\n\
                    \tsetp.ne.s32 %p1, %r1, 0;\n\t@%p1 bra $L_end;\n\tld.shared.f64 %fd2, [sum];\n\tld.shared.u32 %r3, [most];\n\
                    \tst.global.f64 [%rd1], %fd2;\n\tst.global.u32 [%rd1+8], %r3;\n$L_end:\n\tret;\n}";
        let mut out = [0u64; 2];
        run_on_one_block(text, 64, out.as_mut_ptr() as u64);
        assert_eq!(f64::from_bits(out[0]), 16.0, "64 adds of 0.25 in f64");
        assert_eq!(out[1] as u32, 63, "the largest id");
    }

    /// Funnel shifts of `hi:lo` (wrap: the count mod 32; clamp: at most 32), byte permutes, and the
    /// pair rounding to bf16 (the first operand in the high half, to nearest even), one thread each.
    #[test]
    fn funnel_shifts_and_bf16_pairs() {
        let run_one = |ins: &str, a: u32, b: u32, c: u32| -> u32 {
            let text = format!(
                ".visible .entry k(\n\t.param .u64 k_param_0\n)\n{{\n\t.reg .b32 %r<5>;\n\t.reg .f32 %f<3>;\n\t.reg .b64 %rd<2>;\n\
                 \tld.param.b64 %rd1, [k_param_0];\n\tmov.b32 %r1, {a};\n\tmov.b32 %r2, {b};\n\tmov.b32 %r3, {c};\n\
                 \tmov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\t{ins};\n\tst.global.b32 [%rd1], %r4;\n\tret;\n}}"
            );
            let mut out = [0u32; 1];
            run_on_one_block(&text, 1, out.as_mut_ptr() as u64);
            out[0]
        };
        let shf =
            |mode: &str, lo: u32, hi: u32, n: u32| run_one(&format!("shf.{mode}.b32 %r4, %r1, %r2, %r3"), lo, hi, n);
        assert_eq!(shf("l.wrap", 0x1234_5678, 0x9abc_def0, 16), 0xdef0_1234);
        assert_eq!(shf("l.wrap", 0x1234_5678, 0x9abc_def0, 48), 0xdef0_1234);
        assert_eq!(shf("l.clamp", 0x1234_5678, 0x9abc_def0, 40), 0x1234_5678);
        assert_eq!(shf("r.wrap", 0x1234_5678, 0x9abc_def0, 8), 0xf012_3456);
        assert_eq!(shf("r.clamp", 0x1234_5678, 0x9abc_def0, 33), 0x9abc_def0);
        // Byte permutes of b:a: the high halves of a and b (bf16 pairs packed), bytes reversed,
        // and a byte's sign replicated (selector 8 + 0: a's byte 0, 0x78, to 0; 8 + 3: 0x92, to 0xff).
        let prmt = |a: u32, b: u32, c: u32| run_one("prmt.b32 %r4, %r1, %r2, %r3", a, b, c);
        assert_eq!(prmt(0x1234_5678, 0x9abc_def0, 0x7632), 0x9abc_1234);
        assert_eq!(prmt(0x1234_5678, 0x9abc_def0, 0x0123), 0x7856_3412);
        assert_eq!(prmt(0x1234_5678, 0x9abc_def0, 0x4567), 0xf0de_bc9a);
        assert_eq!(prmt(0x9234_5678, 0x9abc_def0, 0x00b8), 0x7878_ff00);
        // Ties both: 1 + 2^-8 to the even 1.0 (high half), 1 + 3 * 2^-8 to the even 1 + 2^-6 (low).
        let pair = run_one("cvt.rn.bf16x2.f32 %r4, %f1, %f2", 0x3f80_8000, 0x3f81_8000, 0);
        assert_eq!(pair, 0x3f80_3f82);
    }

    fn sum(barrier: &str, input_only: bool) -> Result<u32, String> {
        sum_with(&format!("bar.sync {barrier}"), input_only, false)
    }

    #[test]
    fn warps_shuffle_and_meet_at_a_barrier() {
        assert_eq!(sum_with("bar.sync 0", false, true).unwrap(), 64 * 65 / 2);
        assert_eq!(sum("0", false).unwrap(), 64 * 65 / 2);
    }

    /// A warp's inclusive prefix sum by `shfl.sync.up` with its in-range predicate (`d|p`): lanes
    /// below the distance get p false and add nothing. (Before the predicate was parsed, `d|p`
    /// was one register and p never set: every lane added nothing.)
    #[test]
    fn shuffles_up_set_their_in_range_predicate() {
        let mut text = String::from(
            ".visible .entry scan(\n\t.param .u64 scan_param_0\n)\n.maxntid 32, 1, 1\n{\n\t.reg .pred %p<2>;\n\
             \t.reg .b32 %r<8>;\n\t.reg .b64 %rd<4>;\n\tld.param.b64 %rd1, [scan_param_0];\n\tmov.u32 %r1, %tid.x;\n\
             \tadd.s32 %r2, %r1, 1;\n",
        );
        for d in [1, 2, 4, 8, 16] {
            text.push_str(&format!(
                "\tshfl.sync.up.b32 %r3|%p1, %r2, {d}, 0, -1;\n\tselp.b32 %r4, %r3, 0, %p1;\n\tadd.s32 %r2, %r2, %r4;\n"
            ));
        }
        text.push_str(
            "\tmul.wide.u32 %rd2, %r1, 4;\n\tadd.s64 %rd3, %rd1, %rd2;\n\tst.global.b32 [%rd3], %r2;\n\tret;\n}",
        );
        let want: Vec<u32> = (1..=32).map(|l| l * (l + 1) / 2).collect();
        assert_eq!(lanes_out(&text, 32).unwrap(), want);
        let bad = text.replace("selp.b32 %r4, %r3, 0, %p1", "selp.b32 %r4|%p1, %r3, 0, %p1");
        let e = Module::parse(&bad).unwrap_err();
        assert!(e.contains("'d|p' outside shfl.sync"), "{e}");
    }

    /// The 32 words a one-CTA launch of `text` (its one parameter: them, `u32::MAX` until written)
    /// on `threads` threads leaves.
    fn lanes_out(text: &str, threads: u32) -> Result<Vec<u32>, String> {
        let module = Module::parse(text)?;
        let mut out = [u32::MAX; 32];
        let params = [out.as_mut_ptr() as u64];
        let only = [(out.as_ptr() as u64, 128)];
        let launch = Launch {
            grid: [1, 1],
            threads,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[],
            regions: Some(&only),
            max_instructions: 10_000,
            checks: Checks::default(),
        };
        // SAFETY: the one parameter is `out`, and accesses are held to it.
        unsafe { run(&module.kernels[0], &launch) }?;
        Ok(out.to_vec())
    }

    /// Loads issued before the first use of any overlap (one wait); a loop that uses each load
    /// before the next waits for every one; shared loads and stores wait for nothing; a register a
    /// pending load will fill waits when written over.
    #[test]
    fn load_rounds_count_the_waits_for_global_loads() {
        let rounds = |body: &str| -> u64 {
            let text = format!(
                ".visible .entry r(\n\t.param .u64 r_param_0\n)\n.maxntid 32, 1, 1\n{{\n\t.reg .pred %p<2>;\n\
                 \t.reg .b32 %r<20>;\n\t.reg .f32 %f<20>;\n\t.reg .b64 %rd<8>;\n\t.shared .align 4 .b8 s[256];\n\
                 \tld.param.b64 %rd1, [r_param_0];\n\tmov.u32 %r1, %tid.x;\n\tmul.wide.u32 %rd2, %r1, 4;\n\
                 \tadd.s64 %rd3, %rd1, %rd2;\n\tmov.b64 %rd4, s;\n\tcvt.u32.u64 %r2, %rd4;\n{body}\tret;\n}}"
            );
            let module = Module::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            let mut data = vec![1.0f32; 4 * 32 + 32];
            let params = [data.as_mut_ptr() as u64];
            let only = [(data.as_ptr() as u64, 4 * data.len())];
            let launch = Launch {
                grid: [2, 1],
                threads: 32,
                dynamic_shared: 0,
                params: &params,
                tensor_maps: &[],
                regions: Some(&only),
                max_instructions: 1 << 16,
                checks: Checks::default(),
            };
            // SAFETY: the one parameter is `data`, and accesses are held to it.
            unsafe { run(&module.kernels[0], &launch) }.unwrap_or_else(|e| panic!("{e}")).load_rounds
        };
        let loads: String = (0..4).map(|i| format!("\tld.global.f32 %f{}, [%rd3+{}];\n", i + 1, 128 * i)).collect();
        let batched = format!(
            "{loads}\tadd.f32 %f5, %f1, %f2;\n\tadd.f32 %f5, %f5, %f3;\n\tadd.f32 %f5, %f5, %f4;\n\
             \tst.global.f32 [%rd3+512], %f5;\n"
        );
        assert_eq!(rounds(&batched), 1, "four loads, then their sum");
        let serial: String = (0..4)
            .map(|i| format!("\tld.global.f32 %f{}, [%rd3+{}];\n\tadd.f32 %f6, %f6, %f{};\n", i + 1, 128 * i, i + 1))
            .collect();
        assert_eq!(rounds(&serial), 4, "each load used before the next");
        let shared = "\tst.shared.f32 [%r2], %f1;\n\tld.shared.f32 %f2, [%r2];\n\tadd.f32 %f3, %f2, %f2;\n";
        assert_eq!(rounds(shared), 0, "shared memory");
        let over = "\tld.global.f32 %f1, [%rd3];\n\tmov.f32 %f1, 0f3F800000;\n\tld.global.f32 %f2, [%rd3+4];\n";
        assert_eq!(rounds(over), 1, "a pending load's register written over");
    }

    /// A wgmma m64n8k16 with A from registers (each thread's bf16 pairs in the accumulator layout)
    /// gives what the same A from shared memory gives, and both the product of the matrices.
    #[test]
    fn a_wgmma_reads_a_from_registers_in_the_accumulator_layout() {
        // A(r, k) and B(n, k): small integers, exact in bf16 and in f32 sums.
        let a = |r: usize, k: usize| ((3 * r + 5 * k) % 11) as f32 - 5.0;
        let b = |n: usize, k: usize| ((7 * n + 2 * k) % 9) as f32 - 4.0;
        let mut text = String::from(
            ".visible .entry mma(\n\t.param .u64 mma_param_0\n)\n{\n\t.reg .pred %p<2>;\n\t.reg .b32 %r<80>;\n\
             \t.reg .f32 %f<40>;\n\t.reg .b64 %rd<20>;\n\t.shared .align 1024 .b8 buf[4096];\n\
             \tld.param.b64 %rd1, [mma_param_0];\n\tmov.u32 %r1, %tid.x;\n\tshr.u32 %r2, %r1, 5;\n\
             \tand.b32 %r3, %r1, 31;\n\tshr.u32 %r4, %r3, 2;\n\tand.b32 %r5, %r3, 3;\n\tmov.b64 %rd2, buf;\n\
             \tcvt.u32.u64 %r6, %rd2;\n\tmul.lo.u32 %r7, %r2, 16;\n\tadd.s32 %r7, %r7, %r4;\n\tshl.b32 %r8, %r5, 1;\n",
        );
        // Word i of the thread: row 16w + g + 8 (i mod 2), columns 8 (i / 2) + 2q and the next; A
        // also stored K-major without swizzle (8 x 16-byte rows 128 B apart, K's halves 1024 B).
        for i in 0..4 {
            let (r, c, x, lo, hi, fl, fh, off) =
                (20 + 8 * i, 21 + 8 * i, 22 + 8 * i, 23 + 8 * i, 24 + 8 * i, 2 * i + 10, 2 * i + 11, 25 + 8 * i);
            text.push_str(&format!(
                "\tadd.s32 %r{r}, %r7, {row};\n\tadd.s32 %r{c}, %r8, {col};\n\tmul.lo.u32 %r{x}, %r{r}, 3;\n\
                 \tmad.lo.u32 %r{x}, %r{c}, 5, %r{x};\n\trem.u32 %r{lo}, %r{x}, 11;\n\tadd.s32 %r{x}, %r{x}, 5;\n\
                 \trem.u32 %r{hi}, %r{x}, 11;\n\tsub.s32 %r{lo}, %r{lo}, 5;\n\tsub.s32 %r{hi}, %r{hi}, 5;\n\
                 \tcvt.rn.f32.s32 %f{fl}, %r{lo};\n\tcvt.rn.f32.s32 %f{fh}, %r{hi};\n\
                 \tcvt.rn.bf16x2.f32 %r{w}, %f{fh}, %f{fl};\n\tmul.lo.u32 %r{off}, %r{r}, 16;\n\
                 \tand.b32 %r{x}, %r{c}, 7;\n\tmad.lo.u32 %r{off}, %r{x}, 2, %r{off};\n\tshr.u32 %r{x}, %r{c}, 3;\n\
                 \tmad.lo.u32 %r{off}, %r{x}, 1024, %r{off};\n\tadd.s32 %r{off}, %r{off}, %r6;\n\
                 \tst.shared.b32 [%r{off}], %r{w};\n",
                row = 8 * (i % 2),
                col = 8 * (i / 2),
                w = 60 + i
            ));
        }
        // B (8 x 16) by threads 0..63: n = t / 8, columns 2 (t mod 8) and the next, at 2048 + 16 n,
        // K's halves 128 B apart.
        text.push_str(
            "\tsetp.ge.u32 %p1, %r1, 64;\n\t@%p1 bra $L__b;\n\tshr.u32 %r50, %r1, 3;\n\tand.b32 %r51, %r1, 7;\n\
             \tshl.b32 %r51, %r51, 1;\n\tmul.lo.u32 %r52, %r50, 7;\n\tmad.lo.u32 %r52, %r51, 2, %r52;\n\
             \trem.u32 %r53, %r52, 9;\n\tadd.s32 %r52, %r52, 2;\n\trem.u32 %r54, %r52, 9;\n\tsub.s32 %r53, %r53, 4;\n\
             \tsub.s32 %r54, %r54, 4;\n\tcvt.rn.f32.s32 %f20, %r53;\n\tcvt.rn.f32.s32 %f21, %r54;\n\
             \tcvt.rn.bf16x2.f32 %r55, %f21, %f20;\n\tmul.lo.u32 %r56, %r50, 16;\n\tand.b32 %r57, %r51, 7;\n\
             \tmad.lo.u32 %r56, %r57, 2, %r56;\n\tshr.u32 %r57, %r51, 3;\n\tmad.lo.u32 %r56, %r57, 128, %r56;\n\
             \tadd.s32 %r56, %r56, %r6;\n\tst.shared.b32 [%r56+2048], %r55;\n$L__b:\n\
             \tfence.proxy.async.shared::cta;\n\tbar.sync 0;\n\
             \tand.b64 %rd3, %rd2, 262143;\n\tshr.u64 %rd3, %rd3, 4;\n\tor.b64 %rd4, %rd3, 34359738368;\n\
             \tor.b64 %rd5, %rd4, 4194304;\n\tadd.s64 %rd6, %rd4, 128;\n\tor.b64 %rd6, %rd6, 524288;\n\
             \twgmma.fence.sync.aligned;\n\tsetp.ne.b32 %p1, 0, 0;\n\
             \twgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%f1, %f2, %f3, %f4}, %rd5, %rd6, %p1, 1, 1, 0, 0;\n\
             \twgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%f5, %f6, %f7, %f8}, {%r60, %r61, %r62, %r63}, %rd6, %p1, 1, 1, 0;\n\
             \twgmma.commit_group.sync.aligned;\n\twgmma.wait_group.sync.aligned 0;\n\tmul.wide.u32 %rd7, %r1, 32;\n\
             \tadd.s64 %rd8, %rd1, %rd7;\n",
        );
        for j in 0..8 {
            text.push_str(&format!("\tst.global.f32 [%rd8+{}], %f{};\n", 4 * j, j + 1));
        }
        text.push_str("\tret;\n}");
        let module = Module::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let mut out = vec![f32::NAN; 128 * 8];
        let params = [out.as_mut_ptr() as u64];
        let only = [(out.as_ptr() as u64, 4 * out.len())];
        let launch = Launch {
            grid: [1, 1],
            threads: 128,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[],
            regions: Some(&only),
            max_instructions: 1 << 20,
            checks: Checks { reversed: false, races: true },
        };
        // SAFETY: the one parameter is `out`, and accesses are held to it.
        unsafe { run(&module.kernels[0], &launch) }.unwrap_or_else(|e| panic!("{e}"));
        for t in 0..128 {
            let (w, l) = (t / 32, t % 32);
            for q in 0..4 {
                let (row, col) = (16 * w + l / 4 + 8 * (q / 2), 2 * (l % 4) + q % 2);
                let want: f32 = (0..16).map(|k| a(row, k) * b(col, k)).sum();
                assert_eq!(out[8 * t + q], want, "shared A, thread {t}, D({row}, {col})");
                assert_eq!(out[8 * t + 4 + q], want, "registers' A, thread {t}, D({row}, {col})");
            }
        }
    }

    /// A shuffle whose member mask names a lane that has exited, or one the block does not have,
    /// fails the launch (on the hardware the others would wait, or read what no one wrote); a mask
    /// of the lanes that shuffle does not.
    #[test]
    fn shuffles_need_every_lane_their_mask_names() {
        let shuffle = |mask: &str, exit_from: u32, threads: u32| -> Result<Vec<u32>, String> {
            let text = format!(
                ".visible .entry part(\n\t.param .u64 part_param_0\n)\n.maxntid 32, 1, 1\n{{\n\t.reg .pred %p<2>;\n\
                 \t.reg .b32 %r<4>;\n\t.reg .b64 %rd<4>;\n\tld.param.b64 %rd1, [part_param_0];\n\tmov.u32 %r1, %tid.x;\n\
                 \tsetp.ge.u32 %p1, %r1, {exit_from};\n\t@%p1 ret;\n\tshfl.sync.bfly.b32 %r2, %r1, 1, 31, {mask};\n\
                 \tmul.wide.u32 %rd2, %r1, 4;\n\tadd.s64 %rd3, %rd1, %rd2;\n\tst.global.b32 [%rd3], %r2;\n\tret;\n}}"
            );
            lanes_out(&text, threads)
        };
        let half: Vec<u32> = (0..16).map(|l| l ^ 1).chain([u32::MAX; 16]).collect();
        assert_eq!(shuffle("65535", 16, 32).unwrap(), half);
        let e = shuffle("-1", 16, 32).unwrap_err();
        assert!(e.contains("member mask 0xffffffff names lane 16, which has exited"), "{e}");
        let e = shuffle("-1", 32, 16).unwrap_err();
        assert!(e.contains("names lane 16, which does not exist in the block"), "{e}");
        assert_eq!(shuffle("-1", 32, 32).unwrap(), (0..32).map(|l| l ^ 1).collect::<Vec<u32>>());
    }

    #[test]
    fn a_barrier_that_waits_for_more_threads_than_run_is_a_deadlock_named_by_line() {
        let e = sum("1, 96", false).unwrap_err();
        let want = "deadlocked: thread 0 at line 37 'bar.sync 1, 96' waits at barrier 1 for 96 threads";
        assert!(e.contains(want), "{e}");
    }

    /// Without the barrier, thread 0 reads the second warp's sum before that warp wrote it when the
    /// threads run first to last; last to first, after. The two schedules part.
    #[test]
    fn a_missing_barrier_gives_another_sum_when_the_threads_run_in_the_other_order() {
        let forward = sum_with("membar.gl", false, false).unwrap();
        let reversed = sum_with("membar.gl", false, true).unwrap();
        assert_eq!(reversed, 64 * 65 / 2);
        assert_ne!(forward, reversed);
    }

    /// Runs the one kernel of `text` in one CTA of 64 threads, checked for races under
    /// `reversed`'s schedule, global memory inside `regions` only.
    fn run_checked(text: &str, params: &[u64], regions: &[(u64, usize)], reversed: bool) -> Result<(), String> {
        let module = Module::parse(text)?;
        let launch = Launch {
            grid: [1, 1],
            threads: 64,
            dynamic_shared: 0,
            params,
            tensor_maps: &[],
            regions: Some(regions),
            max_instructions: 1 << 20,
            checks: Checks { reversed, races: true },
        };
        // SAFETY: every global access is checked against the regions.
        unsafe { run(&module.kernels[0], &launch) }.map(|_| ())
    }

    /// [`SUM`] with `barrier`, checked for races under `reversed`'s schedule.
    fn sum_checked(barrier: &str, reversed: bool) -> Result<u32, String> {
        let input: Vec<u32> = (1..=64).collect();
        let mut out = [0u32; 1];
        let params = [input.as_ptr() as u64, out.as_mut_ptr() as u64];
        let regions = [(input.as_ptr() as u64, 256), (out.as_ptr() as u64, 4)];
        run_checked(&SUM.replace("bar.sync BARRIER", barrier), &params, &regions, reversed)?;
        Ok(out[0])
    }

    /// Without the barrier the race is found whichever order the threads run in, naming both
    /// accesses: thread 0's read of the second warp's sum and thread 32's write of it.
    #[test]
    fn a_missing_barrier_is_a_race_under_either_schedule() {
        assert_eq!(sum_checked("bar.sync 0", false).unwrap(), 64 * 65 / 2);
        assert_eq!(sum_checked("bar.sync 0", true).unwrap(), 64 * 65 / 2);
        // First to last, thread 0 reads before the second warp writes; last to first, after.
        let forward = sum_checked("membar.gl", false).unwrap_err();
        assert!(
            forward.contains(
                "thread 32, line 35 'st.shared.b32 [%rd6], %r2': data race on shared byte 4: this write is \
                              not ordered after thread 0's read at line 42 'ld.shared.b32 %r7, [%rd6+4]'"
            ),
            "{forward}"
        );
        let reversed = sum_checked("membar.gl", true).unwrap_err();
        assert!(
            reversed.contains(
                "thread 0, line 42 'ld.shared.b32 %r7, [%rd6+4]': data race on shared byte 4: this read is \
                               not ordered after thread 32's write at line 35"
            ),
            "{reversed}"
        );
    }

    /// Thread 0 writes a word and arrives on an mbarrier; thread 32 reads the word after waiting
    /// for the phase (`WAIT`), or without.
    const HANDOFF: &str = "
.visible .entry handoff(
\t.param .u64 handoff_param_0
)
.maxntid 64, 1, 1
{
\t.reg .pred %p<4>;
\t.reg .b32 %r<4>;
\t.reg .b64 %rd<6>;
\t.shared .align 8 .b8 bar[8];
\t.shared .align 4 .b8 word[4];
\tld.param.b64 %rd1, [handoff_param_0];
\tmov.u32 %r1, %tid.x;
\tmov.b64 %rd2, bar;
\tmov.b64 %rd3, word;
\tsetp.ne.b32 %p1, %r1, 0;
\t@%p1 bra $L__after_init;
\tmbarrier.init.shared.b64 [%rd2], 1;
$L__after_init:
\tbar.sync 0;
\t@%p1 bra $L__consumer;
\tst.shared.b32 [%rd3], 42;
\tmbarrier.arrive.shared.b64 %rd4, [%rd2];
\tret;
$L__consumer:
\tsetp.ne.b32 %p2, %r1, 32;
\t@%p2 bra $L__end;
$L__wait:
WAIT
\tld.shared.b32 %r2, [%rd3];
\tst.global.b32 [%rd1], %r2;
$L__end:
\tret;
}";

    fn handoff(wait: &str, reversed: bool) -> Result<u32, String> {
        let mut out = [0u32; 1];
        let params = [out.as_mut_ptr() as u64];
        let regions = [(out.as_ptr() as u64, 4)];
        run_checked(&HANDOFF.replace("WAIT", wait), &params, &regions, reversed)?;
        Ok(out[0])
    }

    /// An mbarrier phase orders the arrival's write before the waiter's read; without the wait,
    /// the read races with the write (found first to last, and last to first).
    #[test]
    fn an_mbarrier_phase_orders_a_handoff_and_skipping_its_wait_is_a_race() {
        let wait = "\tmbarrier.try_wait.parity.shared.b64 %p3, [%rd2], 0, 100;\n\t@!%p3 bra $L__wait;";
        assert_eq!(handoff(wait, false).unwrap(), 42);
        assert_eq!(handoff(wait, true).unwrap(), 42);
        for reversed in [false, true] {
            let e = handoff("", reversed).unwrap_err();
            assert!(e.contains("data race on shared byte 8"), "{e}");
        }
    }

    /// Thread 0 stores a global word, thread 32 loads it after `barrier`: `bar.sync` orders the two
    /// (the word arrives under either schedule); without it, the load races with the store,
    /// found whichever runs first.
    #[test]
    fn a_ctas_threads_race_on_global_memory_without_a_barrier() {
        let handoff = |barrier: &str, reversed: bool| -> Result<u32, String> {
            let text = format!(
                ".visible .entry g(\n\t.param .u64 g_param_0\n)\n.maxntid 64, 1, 1\n{{\n\t.reg .pred %p<3>;\n\
                 \t.reg .b32 %r<4>;\n\t.reg .b64 %rd<4>;\n\tld.param.b64 %rd1, [g_param_0];\n\tmov.u32 %r1, %tid.x;\n\
                 \tsetp.ne.b32 %p1, %r1, 0;\n\t@%p1 bra $L__skip;\n\tst.global.b32 [%rd1], 42;\n$L__skip:\n\t{barrier}\n\
                 \tsetp.ne.b32 %p2, %r1, 32;\n\t@%p2 bra $L__end;\n\tld.global.b32 %r2, [%rd1];\n\
                 \tst.global.b32 [%rd1+4], %r2;\n$L__end:\n\tret;\n}}"
            );
            let mut out = [0u32; 2];
            let params = [out.as_mut_ptr() as u64];
            let regions = [(out.as_ptr() as u64, 8)];
            run_checked(&text, &params, &regions, reversed)?;
            Ok(out[1])
        };
        assert_eq!(handoff("bar.sync 0;", false).unwrap(), 42);
        assert_eq!(handoff("bar.sync 0;", true).unwrap(), 42);
        let forward = handoff("membar.gl;", false).unwrap_err();
        assert!(
            forward.contains("thread 32, line 18 'ld.global.b32 %r2, [%rd1]': data race on global byte 0x")
                && forward.contains("this read is not ordered after thread 0's write at line 13"),
            "{forward}"
        );
        let reversed = handoff("membar.gl;", true).unwrap_err();
        assert!(
            reversed.contains("thread 0, line 13 'st.global.b32 [%rd1], 42': data race on global byte 0x")
                && reversed.contains("this write is not ordered after thread 32's read at line 18"),
            "{reversed}"
        );
    }

    /// A kernel whose thread 0 of each CTA runs `body` (`%r2` its CTA, `%rd1` and `%rd2` the two
    /// parameters), on a grid of `ctas`, checked for races; the first 16 words of `words` are the
    /// first parameter, the last word the second.
    fn across_ctas(body: &str, ctas: u32, words: &mut [u32; 17]) -> Result<(), String> {
        let text = format!(
            ".visible .entry cross(\n\t.param .u64 cross_param_0,\n\t.param .u64 cross_param_1\n)\n.maxntid 32, 1, 1\n\
             {{\n\t.reg .pred %p<3>;\n\t.reg .b32 %r<8>;\n\t.reg .b64 %rd<8>;\n\tld.param.b64 %rd1, [cross_param_0];\n\
             \tld.param.b64 %rd2, [cross_param_1];\n\tmov.u32 %r1, %tid.x;\n\tsetp.ne.b32 %p1, %r1, 0;\n\
             \t@%p1 bra $L__end;\n\tmov.u32 %r2, %ctaid.x;\n{body}\n$L__end:\n\tret;\n}}"
        );
        let module = Module::parse(&text)?;
        let (data, counter) = words.split_at_mut(16);
        let params = [data.as_mut_ptr() as u64, counter.as_mut_ptr() as u64];
        let regions = [(data.as_ptr() as u64, 68)];
        let launch = Launch {
            grid: [ctas, 1],
            threads: 32,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[],
            regions: Some(&regions),
            max_instructions: 1 << 16,
            checks: Checks { reversed: false, races: true },
        };
        // SAFETY: every global access is checked against the region, the 17 words.
        unsafe { run(&module.kernels[0], &launch) }.map(|_| ())
    }

    /// Split-K's hand-off: each of 4 CTAs writes its partial, fences, counts itself in with an
    /// atomic; the last sums the partials. Without the fence, its reads of the others' partials
    /// are races.
    #[test]
    fn the_last_cta_may_read_what_the_others_released_through_a_fence_and_an_atomic() {
        let last = |fence: &str| {
            let mut words = [0u32; 17];
            let body = format!(
                "\tmul.wide.u32 %rd3, %r2, 4;\n\tadd.s64 %rd4, %rd1, %rd3;\n\tadd.s32 %r3, %r2, 1;\n\
                 \tst.global.b32 [%rd4], %r3;\n{fence}\n\tatom.global.add.u32 %r4, [%rd2], 1;\n\
                 \tsetp.ne.b32 %p2, %r4, 3;\n\t@%p2 bra $L__end;\n\tld.global.b32 %r5, [%rd1];\n\
                 \tld.global.b32 %r6, [%rd1+4];\n\tadd.s32 %r5, %r5, %r6;\n\tld.global.b32 %r6, [%rd1+8];\n\
                 \tadd.s32 %r5, %r5, %r6;\n\tld.global.b32 %r6, [%rd1+12];\n\tadd.s32 %r5, %r5, %r6;\n\
                 \tst.global.b32 [%rd1+32], %r5;"
            );
            across_ctas(&body, 4, &mut words).map(|()| (words[8], words[16]))
        };
        assert_eq!(last("\tmembar.gl;").unwrap(), (10, 4));
        assert_eq!(last("\tfence.acq_rel.gpu;").unwrap(), (10, 4));
        for fence in ["", "\tmembar.cta;"] {
            let e = last(fence).unwrap_err();
            assert!(
                e.contains("CTA (3, 0) thread 0, line 24 'ld.global.b32 %r5, [%rd1]': data race on global byte 0x")
                    && e.contains(
                        "this read is not ordered after CTA (0, 0)'s write at line 19 'st.global.b32 [%rd4], %r3'"
                    ),
                "{e}"
            );
        }
    }

    /// CTAs writing one word race; writing neighbouring 2-byte halves of words do not; a CTA
    /// writing what another read races whichever ran first.
    #[test]
    fn ctas_sharing_global_bytes_race() {
        let mut words = [0u32; 17];
        let e = across_ctas("\tst.global.b32 [%rd1], %r2;", 2, &mut words).unwrap_err();
        assert!(
            e.contains("CTA (1, 0) thread 0, line 16 'st.global.b32 [%rd1], %r2': data race on global byte")
                && e.contains("this write is not ordered after CTA (0, 0)'s write at line 16"),
            "{e}"
        );
        let halves = "\tmul.wide.u32 %rd3, %r2, 2;\n\tadd.s64 %rd4, %rd1, %rd3;\n\tst.global.b16 [%rd4], %r2;";
        across_ctas(halves, 8, &mut words).unwrap();
        assert_eq!(words[..4], [0x1_0000, 0x3_0002, 0x5_0004, 0x7_0006]);
        let read_then_write = "\tsetp.ne.b32 %p2, %r2, 0;\n\t@%p2 bra $L__writer;\n\tld.global.b32 %r3, [%rd1+4];\n\
                               \tst.global.b32 [%rd1+32], %r3;\n\tbra.uni $L__end;\n$L__writer:\n\tst.global.b32 [%rd1+4], %r2;";
        let e = across_ctas(read_then_write, 2, &mut words).unwrap_err();
        assert!(
            e.contains("CTA (1, 0) thread 0") && e.contains("this write is not ordered after CTA (0, 0)'s read"),
            "{e}"
        );
        // Two CTAs reading it, then a third writing.
        let readers = read_then_write
            .replace("%p2, %r2, 0", "%p2, %r2, 1")
            .replace("setp.ne", "setp.gt")
            .replace("\tst.global.b32 [%rd1+32], %r3;\n", "");
        let e = across_ctas(&readers, 3, &mut words).unwrap_err();
        assert!(
            e.contains("CTA (2, 0) thread 0") && e.contains("not ordered after several CTAs' reads (one at line"),
            "{e}"
        );
    }

    /// CTA 0's thread 0 stores a word of a [2, 32] f32 matrix (1, 2, ..) at byte `write`; CTA 1's
    /// copies row 0 into shared memory by TMA and returns its first word. Unordered, the copy's read of row 0
    /// races with the store; a store into row 1 is outside the box.
    fn tma_after_a_store(write: usize) -> Result<u32, String> {
        let text = format!(
            ".visible .entry tma(\n\t.param .u64 tma_param_0,\n\t.param .u64 tma_param_1,\n\t.param .u64 tma_param_2\n)\n\
             .maxntid 32, 1, 1\n{{\n\t.reg .pred %p<4>;\n\t.reg .b32 %r<8>;\n\t.reg .b64 %rd<8>;\n\
             \t.shared .align 128 .b8 box[128];\n\t.shared .align 8 .b8 bar[8];\n\
             \tld.param.b64 %rd1, [tma_param_0];\n\tld.param.b64 %rd2, [tma_param_1];\n\tld.param.b64 %rd3, [tma_param_2];\n\
             \tmov.u32 %r1, %tid.x;\n\tsetp.ne.b32 %p1, %r1, 0;\n\t@%p1 bra $L__end;\n\tmov.u32 %r2, %ctaid.x;\n\
             \tsetp.ne.b32 %p2, %r2, 0;\n\t@%p2 bra $L__reader;\n\tst.global.b32 [%rd1+{write}], 7;\n\tbra.uni $L__end;\n\
             $L__reader:\n\tmov.b64 %rd4, bar;\n\tmov.b64 %rd5, box;\n\tmbarrier.init.shared.b64 [%rd4], 1;\n\
             \tmbarrier.arrive.expect_tx.shared.b64 %rd6, [%rd4], 128;\n\tmov.u32 %r3, 0;\n\
             \tcp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%rd5], [%rd2, {{%r3, %r3}}], [%rd4];\n\
             $L__wait:\n\tmbarrier.try_wait.parity.shared.b64 %p3, [%rd4], 0, 100;\n\t@!%p3 bra $L__wait;\n\
             \tld.shared.b32 %r4, [%rd5];\n\tst.global.b32 [%rd3], %r4;\n$L__end:\n\tret;\n}}"
        );
        let module = Module::parse(&text)?;
        let mut matrix: Vec<f32> = (1..=64).map(|i| i as f32).collect();
        let mut out = [0u32; 1];
        let map = TensorMap {
            addr: matrix.as_ptr() as u64,
            rows: 2,
            cols: 32,
            element_bytes: 4,
            box_rows: 1,
            box_cols: 32,
            pitch: 128,
            swizzle: false,
        };
        let params = [matrix.as_mut_ptr() as u64, TENSOR_MAP_BASE, out.as_mut_ptr() as u64];
        let mut regions = [(matrix.as_ptr() as u64, 256), (out.as_ptr() as u64, 4)];
        regions.sort_unstable();
        let launch = Launch {
            grid: [2, 1],
            threads: 32,
            dynamic_shared: 0,
            params: &params,
            tensor_maps: &[map],
            regions: Some(&regions),
            max_instructions: 1 << 16,
            checks: Checks { reversed: false, races: true },
        };
        // SAFETY: every global access is checked against the regions (the copy against the map's
        // matrix, inside the first).
        unsafe { run(&module.kernels[0], &launch) }?;
        Ok(out[0])
    }

    #[test]
    fn a_tma_copy_reading_what_another_cta_writes_races() {
        assert_eq!(tma_after_a_store(128).unwrap(), 1f32.to_bits());
        let e = tma_after_a_store(4).unwrap_err();
        assert!(
            e.contains("CTA (1, 0) thread 0, line 30 'cp.async.bulk.tensor")
                && e.contains("data race on global byte 0x")
                && e.contains(
                    "this read is not ordered after CTA (0, 0)'s write at line 22 'st.global.b32 [%rd1+4], 7'"
                ),
            "{e}"
        );
    }

    #[test]
    fn global_accesses_outside_the_regions_are_refused_by_address() {
        // The store of the sum is refused.
        let e = sum("0", true).unwrap_err();
        assert!(e.contains("outside every allocation") && e.contains("st.global.b32"), "{e}");
    }
}
