//! Running a kernel: CTAs one after another; in a CTA every thread runs on its own until it reaches
//! something it must wait for (a barrier, a warp or warpgroup collective, an mbarrier phase), then
//! the next; collectives complete when every thread they name has arrived.

use std::collections::HashMap;

use crate::global_race::{Agent, GlobalAccess, GlobalRace, GlobalRaces};
use crate::parse::{
    Arith, AtomOp, Cmp, CmpBase, Instr, IntRound, Kernel, Kind, Logic, Op, Opnd, ShflMode, Space, Special, Ty, Unary,
    SINK,
};
use crate::race::{Access, Byte, Epoch, Race, Races};
use crate::{Launch, MemoryAccess, Stats, SHARED_WINDOW, TENSOR_MAP_BASE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Run,
    /// At `bar.sync id` (expecting `count` threads; 0: every thread not exited).
    Bar {
        id: u64,
        count: u64,
    },
    /// At a warp or warpgroup collective (this pc).
    Shfl(usize),
    Wgmma(usize),
    /// At `wgmma.wait_group` (this pc).
    WgmmaWait(usize),
    /// Spinning on an mbarrier phase: (CTA of the cluster, shared offset, parity).
    Mbar(usize, usize, u64),
    /// At `barrier.cluster.wait` for this phase's arrivals.
    Cluster(u64),
    Done,
}

impl State {
    /// What a thread in this state waits for.
    fn waiting(self) -> String {
        match self {
            State::Bar { id, count: 0 } => format!("waits at barrier {id} for every thread"),
            State::Bar { id, count } => format!("waits at barrier {id} for {count} threads"),
            State::Shfl(_) => "waits for its warp".into(),
            State::Wgmma(_) => "waits for its warpgroup".into(),
            State::WgmmaWait(_) => "waits for its warpgroup's wgmmas".into(),
            State::Mbar(_, at, parity) => {
                format!("waits on the mbarrier at shared {at} for the phase of parity {parity}")
            }
            State::Cluster(phase) => format!("waits at the cluster barrier (phase {phase})"),
            State::Run => "runs".into(),
            State::Done => "has exited".into(),
        }
    }
}

struct Thread {
    pc: usize,
    regs: Vec<u64>,
    state: State,
    /// `barrier.cluster.arrive`s so far (the phase its next wait waits for).
    cluster_phase: u64,
    /// Instructions it executed.
    executed: u64,
    /// Global-load latencies it has waited out ([`crate::Stats::load_rounds`]), and per register
    /// the count its value needs: a global load sets its destinations' to `rounds + 1`.
    rounds: u32,
    ready: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Mbarrier {
    expected: i64,
    pending: i64,
    tx: i64,
    phase: u64,
}

impl Mbarrier {
    fn complete_if_done(&mut self) {
        if self.pending <= 0 && self.tx == 0 {
            self.phase += 1;
            self.pending = self.expected;
        }
    }
}

/// The CTAs of one cluster (one CTA without clusters) being run together: their threads one
/// after another (thread `t` of the cluster is thread `t % n` of CTA `t / n`), each CTA's shared
/// memory and mbarriers.
struct Cta<'a> {
    k: &'a Kernel,
    launch: &'a Launch<'a>,
    /// Threads per CTA.
    n: usize,
    ctaids: Vec<[u64; 2]>,
    threads: Vec<Thread>,
    shared: Vec<Vec<u8>>,
    params: Vec<u8>,
    mbarriers: Vec<HashMap<usize, Mbarrier>>,
    /// `barrier.cluster` arrivals by phase.
    cluster_arrivals: HashMap<u64, usize>,
    /// Each warpgroup's wgmmas issued and not yet complete, and its commits so far.
    in_flight: HashMap<usize, Vec<InFlight>>,
    commits: HashMap<usize, u64>,
    executed: u64,
    /// Memory accesses by warp-level request: (warp, pc, the lanes' n-th execution of it) -> the
    /// space and each lane's (address, bytes); each thread's executions of each memory
    /// instruction so far (`memory_index` numbers them).
    requests: HashMap<(usize, usize, u32), (Space, Vec<(u64, usize)>)>,
    executions: Vec<u32>,
    memory_index: &'a [Option<usize>],
    memory_instructions: usize,
    /// Happens-before bookkeeping, when the launch checks for races; the clocks wgmmas in flight
    /// were issued as of, by their `InFlight::id`.
    races: Option<Races>,
    /// Global memory's happens-before between the launch's CTAs, when it checks for races (one
    /// for the launch, lent to each CTA as it runs).
    global: Option<GlobalRaces>,
    issued: HashMap<u64, Vec<u32>>,
    issues: u64,
}

/// A wgmma issued by a warpgroup, what it read at issue (descriptors, scales, transposes), to run
/// when the warpgroup waits for it: the operands are read from shared memory then, and the
/// accumulators are the registers as they are then — as the tensor cores may read them any time
/// before the wait, a kernel that changes either in between gets other results here.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    pc: usize,
    /// The warpgroup's issues so far.
    id: u64,
    /// The commit group it belongs to (the warpgroup's commits before it).
    group: u64,
    /// A's descriptor; `None`: A in registers (bf16 only; `wgmma ... {d}, {a0, a1, a2, a3}, desc_b,
    /// scale_d, scale_a, scale_b, trans_b`), read with the accumulators.
    desc_a: Option<u64>,
    desc_b: u64,
    scale_d: bool,
    neg_a: bool,
    neg_b: bool,
    trans_a: bool,
    trans_b: bool,
}

/// A `shared::cluster` address of CTA `rank`'s shared memory (what `mapa` gives): the offset
/// below bit 24, the rank + 1 above it. Offsets alone are the thread's own CTA.
const CLUSTER_RANK_SHIFT: u32 = 24;

/// The registers a load or store moves (a vector's, or one).
fn lanes(data: &Opnd) -> usize {
    if let Opnd::Vector(r) = data {
        r.len()
    } else {
        1
    }
}

fn mask(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

fn f32v(v: u64) -> f32 {
    f32::from_bits(v as u32)
}

fn f32b(x: f32) -> u64 {
    u64::from(x.to_bits())
}

fn e4m3_satfinite(x: f32) -> u8 {
    if !x.is_nan() && x.abs() >= 448.0 {
        return if x < 0.0 { 0xfe } else { 0x7e };
    }
    v3c_models::dtype::f32_to_f8e4m3(x)
}

impl Cta<'_> {
    fn err(&self, t: usize, pc: usize, msg: impl std::fmt::Display) -> String {
        let line = self.k.instrs.get(pc).map_or(0, |i| i.line);
        let text = self.k.text.get(pc).map_or("", String::as_str);
        let [x, y] = self.ctaids[(t / self.n).min(self.ctaids.len() - 1)];
        format!("{}: CTA ({x}, {y}) thread {}, line {line} '{text}': {msg}", self.k.name, t % self.n)
    }

    fn special(&self, t: usize, s: Special) -> u64 {
        match s {
            Special::Tid(0) => (t % self.n) as u64,
            Special::Tid(_) => 0,
            Special::Ntid(0) => self.n as u64,
            Special::Ntid(_) => 1,
            Special::Ctaid(d) => self.ctaids[t / self.n].get(d).copied().unwrap_or(0),
            Special::ClusterCtaid(0) => (t / self.n) as u64,
            Special::ClusterCtaid(_) => 0,
            Special::ClusterNctaid(0) => self.ctaids.len() as u64,
            Special::ClusterNctaid(_) => 1,
            Special::Nctaid(0) => u64::from(self.launch.grid[0]),
            Special::Nctaid(1) => u64::from(self.launch.grid[1]),
            Special::Nctaid(_) => 1,
            Special::LaneId => (t % 32) as u64,
            Special::WarpId => ((t % self.n) / 32) as u64,
        }
    }

    fn value(&self, t: usize, o: &Opnd) -> Result<u64, String> {
        Ok(match o {
            Opnd::Reg(r) => self.reg(t, *r),
            Opnd::Imm(v) => *v,
            Opnd::Special(s) => self.special(t, *s),
            _ => return Err(format!("{o:?} is not a value")),
        })
    }

    fn address(&self, t: usize, o: &Opnd) -> Result<u64, String> {
        match o {
            Opnd::Addr { base, disp } => {
                let b = base.map_or(0, |r| self.threads[t].regs[r as usize]);
                Ok(b.wrapping_add(*disp as u64))
            }
            _ => Err(format!("{o:?} is not an address")),
        }
    }

    /// A register's value (`_` reads as 0).
    fn reg(&self, t: usize, r: u32) -> u64 {
        if r == SINK {
            0
        } else {
            self.threads[t].regs[r as usize]
        }
    }

    /// Writes a register (`_`: nowhere).
    fn write(&mut self, t: usize, r: u32, v: u64) {
        if r != SINK {
            self.threads[t].regs[r as usize] = v;
        }
    }

    fn set(&mut self, t: usize, o: &Opnd, v: u64) -> Result<(), String> {
        match o {
            Opnd::Reg(r) => {
                self.write(t, *r, v);
                Ok(())
            }
            _ => Err(format!("{o:?} is not a register")),
        }
    }

    fn check_global(&self, addr: u64, bytes: usize) -> Result<(), String> {
        if let Some(regions) = self.launch.regions {
            let end = addr.checked_add(bytes as u64).ok_or("address overflows")?;
            let i = regions.partition_point(|r| r.0 <= addr);
            let ok = i > 0 && {
                let (s, n) = regions[i - 1];
                end <= s + n as u64
            };
            if !ok {
                return Err(format!("global access of {bytes} B at {addr:#x} outside every allocation"));
            }
        }
        Ok(())
    }

    /// The CTA (of the cluster) and offset a shared address of thread `t` names: a generic
    /// address in the window, a `shared::cta` offset (its own CTA), a `shared::cluster` address.
    fn cluster_shared(&self, t: usize, addr: u64, bytes: usize) -> Result<(usize, usize), String> {
        let addr = if addr >= SHARED_WINDOW { addr - SHARED_WINDOW } else { addr };
        let (cta, off) = match addr >> CLUSTER_RANK_SHIFT {
            0 => (t / self.n, addr as usize),
            r => ((r - 1) as usize, (addr & ((1 << CLUSTER_RANK_SHIFT) - 1)) as usize),
        };
        let len = self.shared.get(cta).map_or(0, Vec::len);
        if off + bytes > len {
            return Err(format!(
                "shared access of {bytes} B at offset {off} of the cluster's CTA {cta}: past its {len} B of shared \
                 memory (or no such CTA in a cluster of {})",
                self.shared.len()
            ));
        }
        Ok((cta, off))
    }

    /// The CTA and shared offset of a generic or shared address, if it is one.
    fn shared_offset(&self, t: usize, space: Space, addr: u64, bytes: usize) -> Result<Option<(usize, usize)>, String> {
        match space {
            Space::Shared => self.cluster_shared(t, addr, bytes).map(Some),
            Space::Generic if addr >= SHARED_WINDOW => self.cluster_shared(t, addr, bytes).map(Some),
            _ => Ok(None),
        }
    }

    /// A load's or store's address and element bytes, the access (of `data`'s elements) counted.
    fn access(
        &mut self,
        t: usize,
        pc: usize,
        space: Space,
        ty: Ty,
        at: &Opnd,
        data: &Opnd,
    ) -> Result<(u64, usize), String> {
        let addr = self.address(t, at)?;
        let bytes = (ty.bits as usize / 8).max(1);
        let whole = bytes * lanes(data);
        // As the hardware: an access of N bytes (a vector's all) at a multiple of N, or a fault.
        if addr % whole as u64 != 0 {
            return Err(format!("misaligned address: a {whole}-byte access at {addr:#x}"));
        }
        self.record(t, pc, space, addr, whole);
        Ok((addr, bytes))
    }

    /// When the launch checks for races: thread `t`'s access at `pc` of `bytes` at `addr`, if
    /// shared memory, checked and kept.
    fn shadow(
        &mut self,
        t: usize,
        pc: usize,
        space: Space,
        addr: u64,
        bytes: usize,
        access: Access,
    ) -> Result<(), String> {
        if self.races.is_none() {
            return Ok(());
        }
        match self.shared_offset(t, space, addr, bytes)? {
            Some((cta, offset)) => self.race(t, pc, Byte::Shared { cta, offset }, bytes, access),
            None if matches!(space, Space::Global | Space::Generic) => {
                self.race(t, pc, Byte::Global(addr), bytes, access)?;
                let what = if access == Access::Read { GlobalAccess::Read } else { GlobalAccess::Write };
                self.global_race(pc, addr, bytes, what)
            }
            None => Ok(()),
        }
    }

    /// The access at `pc` of global bytes `addr..addr + bytes` checked against the other
    /// CTAs' (when the launch checks for races) and kept.
    fn global_race(&mut self, pc: usize, addr: u64, bytes: usize, what: GlobalAccess) -> Result<(), String> {
        let Some(g) = &mut self.global else { return Ok(()) };
        g.access(addr, bytes, pc, what).map_err(|race| self.describe_global(&race))
    }

    /// A race on global memory, as what this access is not ordered after.
    fn describe_global(&self, race: &GlobalRace) -> String {
        let name = |access: GlobalAccess| match access {
            GlobalAccess::Read => "read",
            GlobalAccess::Write => "write",
            GlobalAccess::Atomic => "atomic",
        };
        let (access, mark) = race.before;
        let line = self.k.instrs.get(mark.pc as usize).map_or(0, |i| i.line);
        let text = self.k.text.get(mark.pc as usize).map_or("", String::as_str);
        let grid_x = Agent::from(self.launch.grid[0]);
        let who = match mark.agent {
            Agent::MAX => "several CTAs' reads (one".to_string(),
            a => format!("CTA ({}, {})'s {}", (a - 1) % grid_x, (a - 1) / grid_x, name(access)),
        };
        let close = if mark.agent == Agent::MAX { ")" } else { "" };
        format!(
            "data race on global byte {:#x}: this {} is not ordered after {who} at line {line} '{text}'{close} (no \
             GPU-scope fence and atomic hand-off between the CTAs)",
            race.addr,
            name(race.now)
        )
    }

    /// `who`'s access of `bytes` from `at` checked for races among the cluster's threads (when
    /// the launch checks) and kept.
    fn race(&mut self, who: usize, pc: usize, at: Byte, bytes: usize, access: Access) -> Result<(), String> {
        let Some(r) = &mut self.races else { return Ok(()) };
        r.check(who, at, bytes, pc, access).map_err(|race| self.describe(&race))
    }

    /// A race, as what this access is not ordered after.
    fn describe(&self, race: &Race) -> String {
        let name = |access: Access| match access {
            Access::Read => "read",
            Access::Write => "write",
            Access::AsyncWrite => "TMA copy's write",
            Access::TensorRead => "wgmma's operand read",
        };
        let what = |(access, e): (Access, Epoch)| -> String {
            let line = self.k.instrs.get(e.pc as usize).map_or(0, |i| i.line);
            let text = self.k.text.get(e.pc as usize).map_or("", String::as_str);
            let t = e.who as usize;
            let who = if t >= self.threads.len() {
                format!("warpgroup {}'s", t - self.threads.len())
            } else if self.ctaids.len() > 1 {
                format!("thread {} of CTA {}'s", t % self.n, t / self.n)
            } else {
                format!("thread {t}'s")
            };
            format!("{who} {} at line {line} '{text}'", name(access))
        };
        let byte = match race.byte {
            Byte::Shared { cta, offset } if self.ctaids.len() > 1 => format!("shared byte {offset} of CTA {cta}"),
            Byte::Shared { offset, .. } => format!("shared byte {offset}"),
            Byte::Global(addr) => format!("global byte {addr:#x}"),
        };
        if race.unfenced {
            format!(
                "the {} of {byte} follows {} without a fence.proxy.async between that write and the wgmma",
                name(race.now.0),
                what(race.before)
            )
        } else {
            format!(
                "data race on {byte}: this {} is not ordered after {} (no barrier, mbarrier phase or cluster barrier \
                 between them)",
                name(race.now.0),
                what(race.before)
            )
        }
    }

    /// Counts thread `t`'s access at `pc` into its warp's request.
    fn record(&mut self, t: usize, pc: usize, space: Space, addr: u64, bytes: usize) {
        let Some(i) = self.memory_index[pc] else { return };
        let space = match space {
            Space::Generic if addr >= SHARED_WINDOW => Space::Shared,
            Space::Generic => Space::Global,
            s => s,
        };
        if space == Space::Param {
            return;
        }
        let n = &mut self.executions[t * self.memory_instructions + i];
        let key = (t / 32, pc, *n);
        *n += 1;
        self.requests.entry(key).or_insert_with(|| (space, Vec::new())).1.push((addr, bytes));
    }

    /// The requests' sectors and wavefronts.
    fn memory_stats(&self, stats: &mut Stats) {
        for (&(_, pc, _), (space, lanes)) in &self.requests {
            let access = stats.accesses.entry(self.k.instrs[pc].line).or_insert_with(|| MemoryAccess {
                text: self.k.text[pc].clone(),
                shared: *space == Space::Shared,
                ..MemoryAccess::default()
            });
            access.requests += 1;
            let words = |step: u64| -> std::collections::HashSet<u64> {
                lanes
                    .iter()
                    .flat_map(|&(a, b)| (a / step..(a + b.max(1) as u64).div_ceil(step)).collect::<Vec<u64>>())
                    .collect()
            };
            match space {
                Space::Shared => {
                    let mut banks = [0u64; 32];
                    let words = words(4);
                    for w in &words {
                        banks[(w % 32) as usize] += 1;
                    }
                    let wavefronts = banks.iter().copied().max().unwrap_or(1).max(1);
                    // 32 banks of a word each: the fewest wavefronts the request's words could take.
                    let least = (words.len() as u64).div_ceil(32).max(1);
                    stats.shared_requests += 1;
                    stats.shared_wavefronts += wavefronts;
                    stats.shared_least_wavefronts += least;
                    access.wavefronts += wavefronts;
                    access.least_wavefronts += least;
                }
                _ => {
                    let sectors = words(32).len() as u64;
                    stats.global_requests += 1;
                    stats.global_sectors += sectors;
                    access.sectors += sectors;
                    // Distinct bytes (lanes reading the same address share them).
                    let mut ranges: Vec<(u64, u64)> = lanes.iter().map(|&(a, b)| (a, a + b as u64)).collect();
                    ranges.sort_unstable();
                    let (mut bytes, mut end) = (0u64, 0u64);
                    for (a, b) in ranges {
                        let a = a.max(end);
                        if b > a {
                            bytes += b - a;
                            end = b;
                        }
                    }
                    stats.global_bytes += bytes;
                    access.bytes += bytes;
                }
            }
        }
    }

    fn load(&self, t: usize, space: Space, addr: u64, bytes: usize) -> Result<u64, String> {
        let mut b = [0u8; 8];
        if space == Space::Param {
            let a = addr as usize;
            if a + bytes > self.params.len() {
                return Err(format!("parameter read at {a} past {} B", self.params.len()));
            }
            b[..bytes].copy_from_slice(&self.params[a..a + bytes]);
        } else if let Some((cta, off)) = self.shared_offset(t, space, addr, bytes)? {
            b[..bytes].copy_from_slice(&self.shared[cta][off..off + bytes]);
        } else {
            self.check_global(addr, bytes)?;
            // SAFETY: the launch's promise that global addresses are live host memory (checked
            // against its regions when it names them).
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, b.as_mut_ptr(), bytes) };
        }
        Ok(u64::from_le_bytes(b))
    }

    fn store(&mut self, t: usize, space: Space, addr: u64, bytes: usize, v: u64) -> Result<(), String> {
        let b = v.to_le_bytes();
        if space == Space::Param {
            return Err("a store to parameter space".into());
        }
        if let Some((cta, off)) = self.shared_offset(t, space, addr, bytes)? {
            self.shared[cta][off..off + bytes].copy_from_slice(&b[..bytes]);
        } else {
            self.check_global(addr, bytes)?;
            // SAFETY: as in `load`.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), addr as *mut u8, bytes) };
        }
        Ok(())
    }

    /// Runs thread `t` until it waits, exits or errs.
    fn run_thread(&mut self, t: usize) -> Result<(), String> {
        let k = self.k;
        while self.threads[t].state == State::Run {
            let pc = self.threads[t].pc;
            let Some(ins) = k.instrs.get(pc) else {
                self.threads[t].state = State::Done;
                break;
            };
            self.executed += 1;
            self.threads[t].executed += 1;
            if self.executed > self.launch.max_instructions {
                return Err(self.err(
                    t,
                    pc,
                    format!(
                        "more than {} instructions in one CTA: a loop that never ends?",
                        self.launch.max_instructions
                    ),
                ));
            }
            if let Some((p, neg)) = ins.guard {
                if (self.threads[t].regs[p as usize] != 0) == neg {
                    self.threads[t].pc += 1;
                    continue;
                }
            }
            self.threads[t].pc += 1;
            self.wait_for_loads(t, ins);
            self.exec(t, pc).map_err(|e| self.err(t, pc, e))?;
        }
        Ok(())
    }

    /// In-order issue: an instruction naming a register a global load has yet to fill (to read
    /// it, or to write it over) waits for that load's round ([`crate::Stats::load_rounds`]).
    fn wait_for_loads(&mut self, t: usize, ins: &Instr) {
        fn regs(o: &Opnd, out: &mut Vec<u32>) {
            match o {
                Opnd::Reg(r) => out.push(*r),
                Opnd::Addr { base: Some(r), .. } => out.push(*r),
                Opnd::Vector(rs) => out.extend(rs),
                Opnd::Tensor { map, coords } => {
                    out.push(*map);
                    coords.iter().for_each(|c| regs(c, out));
                }
                _ => {}
            }
        }
        let mut named = Vec::new();
        ins.args.iter().for_each(|o| regs(o, &mut named));
        let th = &mut self.threads[t];
        let need = named.iter().filter_map(|&r| th.ready.get(r as usize)).copied().max().unwrap_or(0);
        th.rounds = th.rounds.max(need);
    }

    /// A global load (or atomic) into the registers of `dest`: their values arrive a round later.
    fn loaded_from_global(&mut self, t: usize, dest: &Opnd) {
        let th = &mut self.threads[t];
        let next = th.rounds + 1;
        match dest {
            Opnd::Reg(r) if (*r as usize) < th.ready.len() => th.ready[*r as usize] = next,
            Opnd::Vector(rs) => {
                for &r in rs {
                    if let Some(x) = th.ready.get_mut(r as usize) {
                        *x = next;
                    }
                }
            }
            _ => {}
        }
    }

    fn exec(&mut self, t: usize, pc: usize) -> Result<(), String> {
        let ins = &self.k.instrs[pc];
        let a = &ins.args;
        let arg = |i: usize| a.get(i).ok_or_else(|| format!("operand {i} missing"));
        match &ins.op {
            Op::Nop => {}
            Op::Mov(ty) => match (arg(0)?, arg(1)?) {
                // Unpacking into equal parts, low first (`mov.b32 {lo, hi}, r`).
                (Opnd::Vector(parts), src) => {
                    let (v, parts) = (self.value(t, src)?, parts.clone());
                    let bits = ty.map(|t| t.bits).ok_or("an unpacking mov without a type")?;
                    let each = bits / parts.len().max(1) as u32;
                    for (i, r) in parts.into_iter().enumerate() {
                        self.write(t, r, mask(v >> (each * i as u32), each));
                    }
                }
                (d, Opnd::Vector(parts)) => {
                    let bits = ty.map(|t| t.bits).ok_or("a packing mov without a type")?;
                    let each = bits / parts.len().max(1) as u32;
                    let mut v = 0u64;
                    for (i, &r) in parts.iter().enumerate() {
                        v |= mask(self.reg(t, r), each) << (each * i as u32);
                    }
                    let d = d.clone();
                    self.set(t, &d, v)?;
                }
                (d, src) => {
                    let v = self.value(t, src)?;
                    let d = d.clone();
                    self.set(t, &d, v)?;
                }
            },
            Op::Arith(op, ty) => {
                let v = self.arith(t, *op, *ty, a)?;
                self.set(t, arg(0)?, v)?;
            }
            Op::MinMaxNan(max) => {
                let (x, y) = (f32v(self.value(t, arg(1)?)?), f32v(self.value(t, arg(2)?)?));
                let r = if x.is_nan() || y.is_nan() {
                    f32::NAN
                } else if *max {
                    x.max(y)
                } else {
                    x.min(y)
                };
                self.set(t, arg(0)?, f32b(r))?;
            }
            Op::Logic(op, ty) => {
                let x = self.value(t, arg(1)?)?;
                let bits = if ty.kind == Kind::Pred { 1 } else { ty.bits };
                let r = match op {
                    Logic::Not => !x,
                    Logic::And => x & self.value(t, arg(2)?)?,
                    Logic::Or => x | self.value(t, arg(2)?)?,
                    Logic::Xor => x ^ self.value(t, arg(2)?)?,
                };
                self.set(t, arg(0)?, mask(r, bits))?;
            }
            Op::Shl(ty) => {
                let (x, s) = (self.value(t, arg(1)?)?, self.value(t, arg(2)?)? as u32);
                let r = if s >= ty.bits { 0 } else { x << s };
                self.set(t, arg(0)?, mask(r, ty.bits))?;
            }
            Op::Shr(ty) => {
                let (x, s) = (self.value(t, arg(1)?)?, (self.value(t, arg(2)?)? as u32).min(ty.bits));
                let r = if ty.kind == Kind::S {
                    (sext(x, ty.bits) >> s.min(63)) as u64
                } else if s >= ty.bits {
                    0
                } else {
                    mask(x, ty.bits) >> s
                };
                self.set(t, arg(0)?, mask(r, ty.bits))?;
            }
            Op::Bfe(ty) => {
                let x = mask(self.value(t, arg(1)?)?, ty.bits);
                let pos = (self.value(t, arg(2)?)? & 0xff) as u32;
                let len = (self.value(t, arg(3)?)? & 0xff) as u32;
                let r = if len == 0 || pos >= ty.bits {
                    if ty.kind == Kind::S && sext(x, ty.bits) < 0 && len != 0 {
                        u64::MAX
                    } else {
                        0
                    }
                } else {
                    let len = len.min(ty.bits - pos);
                    let f = mask(x >> pos, len);
                    if ty.kind == Kind::S {
                        sext(f, len) as u64
                    } else {
                        f
                    }
                };
                self.set(t, arg(0)?, mask(r, ty.bits))?;
            }
            Op::Prmt => {
                let (a, b) = (mask(self.value(t, arg(1)?)?, 32), mask(self.value(t, arg(2)?)?, 32));
                let c = self.value(t, arg(3)?)?;
                let bytes = (b << 32) | a;
                let mut r = 0u64;
                for i in 0..4 {
                    let select = (c >> (4 * i)) & 0xf;
                    let byte = (bytes >> (8 * (select & 7))) & 0xff;
                    let byte = match (select & 8 != 0, byte & 0x80 != 0) {
                        (false, _) => byte,
                        (true, sign) => 0xff * u64::from(sign),
                    };
                    r |= byte << (8 * i);
                }
                self.set(t, arg(0)?, r)?;
            }
            Op::Shf { left, wrap } => {
                let (lo, hi) = (mask(self.value(t, arg(1)?)?, 32), mask(self.value(t, arg(2)?)?, 32));
                let n = mask(self.value(t, arg(3)?)?, 32);
                let n = if *wrap { n & 31 } else { n.min(32) };
                let both = (hi << 32) | lo;
                let r = if *left { (both << n) >> 32 } else { both >> n };
                self.set(t, arg(0)?, mask(r, 32))?;
            }
            Op::Setp(c, ty) => {
                let (x, y) = (self.value(t, arg(1)?)?, self.value(t, arg(2)?)?);
                let r = compare(*c, *ty, x, y);
                self.set(t, arg(0)?, u64::from(r))?;
            }
            Op::Selp(_) => {
                let p = self.value(t, arg(3)?)?;
                let v = if p != 0 { self.value(t, arg(1)?)? } else { self.value(t, arg(2)?)? };
                self.set(t, arg(0)?, v)?;
            }
            Op::Cvt { to, from, round, sat } => {
                let x = self.value(t, arg(1)?)?;
                let r = convert(*to, *from, *round, *sat, x)?;
                self.set(t, arg(0)?, r)?;
            }
            Op::CvtE4m3x2 => {
                let (hi, lo) = (f32v(self.value(t, arg(1)?)?), f32v(self.value(t, arg(2)?)?));
                let r = (u64::from(e4m3_satfinite(hi)) << 8) | u64::from(e4m3_satfinite(lo));
                self.set(t, arg(0)?, r)?;
            }
            Op::CvtE4m3x2ToF16x2 => {
                let x = self.value(t, arg(1)?)?;
                let half = |b: u8| u64::from(f32_to_f16(v3c_models::dtype::f8e4m3_to_f32(b)));
                self.set(t, arg(0)?, half(x as u8) | (half((x >> 8) as u8) << 16))?;
            }
            Op::CvtF32x2ToBf16x2 => {
                let bf16 = |x: u64| u64::from(v3c_models::dtype::f32_to_bf16(f32::from_bits(x as u32)));
                let (a, b) = (self.value(t, arg(1)?)?, self.value(t, arg(2)?)?);
                self.set(t, arg(0)?, (bf16(a) << 16) | bf16(b))?;
            }
            Op::Cvta { to_generic, shared } => {
                let x = self.value(t, arg(1)?)?;
                let r = match (to_generic, shared) {
                    (true, true) => x + SHARED_WINDOW,
                    (false, true) => {
                        if x < SHARED_WINDOW {
                            return Err(format!("{x:#x} is not a generic shared address"));
                        }
                        x - SHARED_WINDOW
                    }
                    _ => x,
                };
                self.set(t, arg(0)?, r)?;
            }
            Op::Ld(space, ty) => {
                let (addr, bytes) = self.access(t, pc, *space, *ty, arg(1)?, arg(0)?)?;
                self.shadow(t, pc, *space, addr, bytes * lanes(arg(0)?), Access::Read)?;
                if *space != Space::Param && self.shared_offset(t, *space, addr, bytes)?.is_none() {
                    let dest = arg(0)?.clone();
                    self.loaded_from_global(t, &dest);
                }
                match arg(0)? {
                    Opnd::Vector(regs) => {
                        for (i, r) in regs.clone().into_iter().enumerate() {
                            let v = self.load(t, *space, addr + (i * bytes) as u64, bytes)?;
                            self.write(t, r, v);
                        }
                    }
                    d => {
                        let v = self.load(t, *space, addr, bytes)?;
                        let v = if ty.kind == Kind::S { mask(sext(v, ty.bits) as u64, 64) } else { v };
                        let d = d.clone();
                        self.set(t, &d, v)?;
                    }
                }
            }
            Op::St(space, ty) => {
                let (addr, bytes) = self.access(t, pc, *space, *ty, arg(0)?, arg(1)?)?;
                self.shadow(t, pc, *space, addr, bytes * lanes(arg(1)?), Access::Write)?;
                match arg(1)? {
                    Opnd::Vector(regs) => {
                        for (i, r) in regs.clone().into_iter().enumerate() {
                            let v = self.reg(t, r);
                            self.store(t, *space, addr + (i * bytes) as u64, bytes, v)?;
                        }
                    }
                    v => {
                        let v = self.value(t, &v.clone())?;
                        self.store(t, *space, addr, bytes, v)?;
                    }
                }
            }
            Op::Atom(space, op, ty) => {
                let addr = self.address(t, arg(1)?)?;
                let bytes = ty.bits as usize / 8;
                self.record(t, pc, *space, addr, bytes);
                let old = self.load(t, *space, addr, bytes)?;
                if self.shared_offset(t, *space, addr, bytes)?.is_none() {
                    let dest = arg(0)?.clone();
                    self.loaded_from_global(t, &dest);
                }
                let x = self.value(t, arg(2)?)?;
                let new = match (op, ty.kind) {
                    (AtomOp::Add, Kind::F) if ty.bits == 64 => (f64::from_bits(old) + f64::from_bits(x)).to_bits(),
                    (AtomOp::Add, Kind::F) => f32b(f32v(old) + f32v(x)),
                    (AtomOp::Add, _) => old.wrapping_add(x),
                    (AtomOp::Exch, _) => x,
                    (AtomOp::Cas, _) => {
                        if mask(old, ty.bits) == mask(x, ty.bits) {
                            self.value(t, arg(3)?)?
                        } else {
                            old
                        }
                    }
                    (AtomOp::Min | AtomOp::Max, Kind::S) => {
                        let (o, v) = (sext(old, ty.bits), sext(x, ty.bits));
                        (if (*op == AtomOp::Max) == (v > o) { v } else { o }) as u64
                    }
                    (AtomOp::Min | AtomOp::Max, _) => {
                        let (o, v) = (mask(old, ty.bits), mask(x, ty.bits));
                        if (*op == AtomOp::Max) == (v > o) {
                            v
                        } else {
                            o
                        }
                    }
                };
                self.store(t, *space, addr, bytes, mask(new, ty.bits))?;
                self.set(t, arg(0)?, old)?;
                if self.shared_offset(t, *space, addr, bytes)?.is_none() && *space != Space::Param {
                    self.global_race(pc, addr, bytes, GlobalAccess::Atomic)?;
                }
            }
            Op::Unary(u) => {
                let x = f32v(self.value(t, arg(1)?)?);
                let r = match u {
                    Unary::Ex2 => x.exp2(),
                    Unary::Lg2 => x.log2(),
                    Unary::Rcp => 1.0 / x,
                    Unary::Sqrt => x.sqrt(),
                    Unary::Rsqrt => 1.0 / x.sqrt(),
                };
                self.set(t, arg(0)?, f32b(r))?;
            }
            Op::Bra => match arg(0)? {
                Opnd::Label(l) => self.threads[t].pc = *l,
                o => return Err(format!("branch to {o:?}")),
            },
            Op::Ret => self.threads[t].state = State::Done,
            Op::Bar => {
                let id = self.value(t, arg(0)?)?;
                let count = match a.get(1) {
                    Some(c) => self.value(t, c)?,
                    None => 0,
                };
                self.threads[t].pc = pc;
                self.threads[t].state = State::Bar { id, count };
            }
            Op::Shfl(_) => {
                // Waits for the warp; `release` computes it and moves the pc on.
                self.threads[t].pc = pc;
                self.threads[t].state = State::Shfl(pc);
            }
            Op::Wgmma(_) => {
                self.threads[t].pc = pc;
                self.threads[t].state = State::Wgmma(pc);
            }
            Op::WgmmaCommit => {
                if (t % self.n) % 128 == 0 {
                    *self.commits.entry(t / 128).or_insert(0) += 1;
                }
            }
            Op::WgmmaWait => {
                self.threads[t].pc = pc;
                self.threads[t].state = State::WgmmaWait(pc);
            }
            Op::MbarInit => {
                let (cta, at) = self.mbar_offset(t, arg(0)?)?;
                let n = self.value(t, arg(1)?)? as i64;
                self.mbarriers[cta].insert(at, Mbarrier { expected: n, pending: n, tx: 0, phase: 0 });
                if let Some(r) = &mut self.races {
                    r.mbarrier_init(cta, at);
                }
            }
            Op::MbarArrive { expect_tx } => {
                let (cta, at) = self.mbar_offset(t, arg(1)?)?;
                let tx = if *expect_tx { self.value(t, arg(2)?)? as i64 } else { 0 };
                let m = self.mbarrier(cta, at)?;
                m.tx += tx;
                m.pending -= 1;
                let state = m.phase;
                m.complete_if_done();
                let completed = m.phase != state;
                if let Some(r) = &mut self.races {
                    r.arrive(t, cta, at, completed);
                }
                self.set(t, arg(0)?, state)?;
            }
            Op::MbarWait => {
                let (cta, at) = self.mbar_offset(t, arg(1)?)?;
                let parity = self.value(t, arg(2)?)? & 1;
                if self.mbarrier(cta, at)?.phase & 1 != parity {
                    if let Some(r) = &mut self.races {
                        r.acquire(t, cta, at);
                    }
                    self.set(t, arg(0)?, 1)?;
                } else {
                    self.threads[t].pc = pc;
                    self.threads[t].state = State::Mbar(cta, at, parity);
                }
            }
            Op::Tma { multicast } => self.tma(t, pc, a, *multicast)?,
            Op::GpuFence => {
                if let Some(g) = &mut self.global {
                    g.fence();
                }
            }
            Op::ProxyFence => {
                if let Some(r) = &mut self.races {
                    r.fence_proxy(t);
                }
            }
            Op::Mapa => {
                let (addr, rank) = (self.value(t, arg(1)?)?, self.value(t, arg(2)?)?);
                if rank as usize >= self.shared.len() {
                    return Err(format!("mapa to CTA {rank} of a cluster of {}", self.shared.len()));
                }
                let off = addr & ((1 << CLUSTER_RANK_SHIFT) - 1);
                self.set(t, arg(0)?, ((rank + 1) << CLUSTER_RANK_SHIFT) | off)?;
            }
            Op::ClusterArrive => {
                let phase = self.threads[t].cluster_phase;
                *self.cluster_arrivals.entry(phase).or_insert(0) += 1;
                if let Some(r) = &mut self.races {
                    r.cluster_arrive(t, phase);
                }
                self.threads[t].cluster_phase += 1;
            }
            Op::ClusterWait => {
                self.threads[t].pc = pc;
                self.threads[t].state = State::Cluster(self.threads[t].cluster_phase.saturating_sub(1));
            }
        }
        Ok(())
    }

    /// The CTA and shared offset of an mbarrier operand.
    fn mbar_offset(&self, t: usize, o: &Opnd) -> Result<(usize, usize), String> {
        let (cta, off) = self.cluster_shared(t, self.address(t, o)?, 8)?;
        if off % 8 != 0 {
            return Err(format!("mbarrier at shared {off}: not 8-byte aligned"));
        }
        Ok((cta, off))
    }

    /// The mbarrier at shared offset `at` of the cluster's CTA `cta`, initialized.
    fn mbarrier(&mut self, cta: usize, at: usize) -> Result<&mut Mbarrier, String> {
        self.mbarriers[cta]
            .get_mut(&at)
            .ok_or_else(|| format!("the mbarrier at shared {at} of the cluster's CTA {cta} is not initialized"))
    }

    fn arith(&self, t: usize, op: Arith, ty: Ty, a: &[Opnd]) -> Result<u64, String> {
        let v = |i: usize| -> Result<u64, String> {
            self.value(t, a.get(i).ok_or_else(|| format!("operand {i} missing"))?)
        };
        let bits = ty.bits;
        if ty.kind == Kind::F && bits == 64 {
            let f = |i: usize| -> Result<f64, String> { Ok(f64::from_bits(v(i)?)) };
            let x = f(1)?;
            let r = match op {
                Arith::Add => x + f(2)?,
                Arith::Sub => x - f(2)?,
                Arith::MulLo => x * f(2)?,
                Arith::Fma => x.mul_add(f(2)?, f(3)?),
                Arith::Div => x / f(2)?,
                Arith::Min => x.min(f(2)?),
                Arith::Max => x.max(f(2)?),
                Arith::Neg => -x,
                Arith::Abs => x.abs(),
                _ => return Err(format!("{op:?} on f64")),
            };
            return Ok(r.to_bits());
        }
        if ty.kind == Kind::F {
            if bits != 32 {
                return Err(format!("f{bits} arithmetic"));
            }
            let x = f32v(v(1)?);
            let r = match op {
                Arith::Add => x + f32v(v(2)?),
                Arith::Sub => x - f32v(v(2)?),
                Arith::MulLo => x * f32v(v(2)?),
                Arith::Fma => x.mul_add(f32v(v(2)?), f32v(v(3)?)),
                Arith::Div => x / f32v(v(2)?),
                Arith::Min => x.min(f32v(v(2)?)),
                Arith::Max => x.max(f32v(v(2)?)),
                Arith::Neg => -x,
                Arith::Abs => x.abs(),
                _ => return Err(format!("{op:?} on f32")),
            };
            return Ok(f32b(r));
        }
        let signed = ty.kind == Kind::S;
        let x = v(1)?;
        Ok(match op {
            Arith::Add => mask(x.wrapping_add(v(2)?), bits),
            Arith::Sub => mask(x.wrapping_sub(v(2)?), bits),
            Arith::MulLo => mask(x.wrapping_mul(v(2)?), bits),
            Arith::MadLo => mask(x.wrapping_mul(v(2)?).wrapping_add(v(3)?), bits),
            Arith::MulHi => {
                let y = v(2)?;
                if signed {
                    let p = i128::from(sext(x, bits)) * i128::from(sext(y, bits));
                    mask((p >> bits) as u64, bits)
                } else {
                    let p = u128::from(mask(x, bits)) * u128::from(mask(y, bits));
                    mask((p >> bits) as u64, bits)
                }
            }
            Arith::MulWide | Arith::MadWide => {
                let y = v(2)?;
                let p = if signed {
                    (sext(x, bits).wrapping_mul(sext(y, bits))) as u64
                } else {
                    mask(x, bits).wrapping_mul(mask(y, bits))
                };
                let p = if op == Arith::MadWide { p.wrapping_add(v(3)?) } else { p };
                mask(p, (2 * bits).min(64))
            }
            Arith::Div | Arith::Rem => {
                let y = v(2)?;
                if mask(y, bits) == 0 {
                    return Err("integer division by zero".into());
                }
                let r = if signed {
                    let (p, q) = (sext(x, bits), sext(y, bits));
                    (if op == Arith::Div { p.wrapping_div(q) } else { p.wrapping_rem(q) }) as u64
                } else {
                    let (p, q) = (mask(x, bits), mask(y, bits));
                    if op == Arith::Div {
                        p / q
                    } else {
                        p % q
                    }
                };
                mask(r, bits)
            }
            Arith::Min | Arith::Max => {
                let y = v(2)?;
                let max = op == Arith::Max;
                if signed {
                    let (p, q) = (sext(x, bits), sext(y, bits));
                    mask((if max { p.max(q) } else { p.min(q) }) as u64, bits)
                } else {
                    let (p, q) = (mask(x, bits), mask(y, bits));
                    if max {
                        p.max(q)
                    } else {
                        p.min(q)
                    }
                }
            }
            Arith::Neg => mask(x.wrapping_neg(), bits),
            Arith::Abs => mask(sext(x, bits).unsigned_abs(), bits),
            Arith::Fma => return Err("fma on integers".into()),
        })
    }

    /// `cp.async.bulk.tensor`: the box at the coordinates, out-of-bounds elements zero, written to
    /// shared memory (128-byte swizzled on the shared address when the map says so), then its
    /// bytes completed on the mbarrier.
    fn tma(&mut self, t: usize, pc: usize, a: &[Opnd], multicast: bool) -> Result<(), String> {
        let (dst, src, bar) = match a {
            [dst, src, bar] if !multicast => (dst, src, bar),
            [dst, src, bar, _] if multicast => (dst, src, bar),
            _ => return Err("cp.async.bulk.tensor: operands".into()),
        };
        let Opnd::Tensor { map, coords } = src else { return Err("no tensor operand".into()) };
        let map_addr = self.threads[t].regs[*map as usize];
        let idx = map_addr.checked_sub(TENSOR_MAP_BASE).map(|d| (d / 128) as usize);
        let m = idx
            .and_then(|i| self.launch.tensor_maps.get(i))
            .ok_or_else(|| format!("{map_addr:#x} is not one of the launch's tensor maps"))?;
        if coords.len() != 2 {
            return Err(format!("a {}-d tensor copy (2-d only)", coords.len()));
        }
        let (c0, c1) = (sext(self.value(t, &coords[0])?, 32), sext(self.value(t, &coords[1])?, 32));
        let eb = m.element_bytes;
        let row_bytes = m.box_cols * eb;
        let total = m.box_rows * row_bytes;
        let (own, dst) = self.cluster_shared(t, self.address(t, dst)?, total)?;
        if dst % 128 != 0 {
            return Err(format!("tensor copy of {total} B to shared {dst}: not 128-byte aligned"));
        }
        if m.swizzle && row_bytes > 128 {
            return Err(format!("a 128-byte swizzled box with {row_bytes}-byte rows"));
        }
        // The box, as shared memory holds it; each row's bytes inside the matrix read (checked
        // against the other CTAs' writes as one read of the issuing thread's CTA).
        let mut boxed = vec![0u8; total];
        let (lo, hi) = (c0.max(0), (c0 + m.box_cols as i64).min(m.cols as i64));
        for r in 0..m.box_rows {
            let gr = c1 + r as i64;
            if gr >= 0 && (gr as usize) < m.rows && lo < hi {
                let first = m.addr + (gr as usize * m.pitch + lo as usize * eb) as u64;
                self.global_race(pc, first, (hi - lo) as usize * eb, GlobalAccess::Read)?;
            }
            for c in 0..m.box_cols {
                let gc = c0 + c as i64;
                let mut off = dst + r * row_bytes + c * eb;
                if m.swizzle {
                    off ^= ((off >> 7) & 7) << 4;
                }
                let inside = gr >= 0 && (gr as usize) < m.rows && gc >= 0 && (gc as usize) < m.cols;
                if inside {
                    let src = m.addr + (gr as usize * m.pitch + gc as usize * eb) as u64;
                    self.check_global(src, eb)?;
                    // SAFETY: inside the map's matrix (checked against the regions when given).
                    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, boxed[off - dst..].as_mut_ptr(), eb) };
                }
            }
        }
        // The CTAs it lands in (the same offsets in each), completing bytes on their mbarriers.
        let (_, at) = self.mbar_offset(t, bar)?;
        let ctas: Vec<usize> = if multicast {
            let mask = self.value(t, &a[3])?;
            (0..self.shared.len()).filter(|r| mask >> r & 1 == 1).collect()
        } else {
            vec![own]
        };
        for cta in ctas {
            self.race(t, pc, Byte::Shared { cta, offset: dst }, total, Access::AsyncWrite)?;
            self.shared[cta][dst..dst + total].copy_from_slice(&boxed);
            let mb = self.mbarrier(cta, at)?;
            let phase = mb.phase;
            mb.tx -= total as i64;
            mb.complete_if_done();
            let completed = mb.phase != phase;
            if let Some(r) = &mut self.races {
                r.arrive(t, cta, at, completed);
            }
        }
        Ok(())
    }

    /// Completes what every waiting thread needs: barriers, shuffles, wgmmas, mbarrier phases.
    fn release(&mut self) -> Result<bool, String> {
        let mut progressed = false;
        let n = self.threads.len();
        // Barriers, per CTA.
        // (Who met, for the race check's clocks.)
        let (checking, mut met) = (self.races.is_some(), Vec::new());
        for (c, threads) in self.threads.chunks_mut(self.n).enumerate() {
            let live = threads.iter().filter(|th| th.state != State::Done).count() as u64;
            let mut at_bar: HashMap<u64, (u64, u64)> = HashMap::new();
            for th in threads.iter() {
                if let State::Bar { id, count } = th.state {
                    let e = at_bar.entry(id).or_insert((0, count));
                    e.0 += 1;
                }
            }
            for (id, (arrived, count)) in at_bar {
                let need = if count == 0 { live } else { count };
                if arrived >= need {
                    let mut these = Vec::new();
                    for (i, th) in threads.iter_mut().enumerate() {
                        if matches!(th.state, State::Bar { id: i, .. } if i == id) {
                            th.state = State::Run;
                            th.pc += 1;
                            if checking {
                                these.push(c * self.n + i);
                            }
                        }
                    }
                    if checking {
                        met.push(these);
                    }
                    progressed = true;
                }
            }
        }
        if let Some(r) = &mut self.races {
            for these in &met {
                r.meet(these);
            }
        }
        // The cluster barrier: every thread not exited has arrived for the phase.
        let live = self.threads.iter().filter(|th| th.state != State::Done).count();
        for (t, th) in self.threads.iter_mut().enumerate() {
            if let State::Cluster(phase) = th.state {
                if self.cluster_arrivals.get(&phase).copied().unwrap_or(0) >= live {
                    th.state = State::Run;
                    th.pc += 1;
                    progressed = true;
                    if let Some(r) = &mut self.races {
                        r.cluster_wait(t, phase);
                    }
                }
            }
        }
        // Mbarrier phases.
        for th in &mut self.threads {
            if let State::Mbar(cta, at, parity) = th.state {
                if self.mbarriers[cta].get(&at).is_some_and(|m| m.phase & 1 != parity) {
                    th.state = State::Run;
                    progressed = true;
                }
            }
        }
        // Warps at a shuffle.
        for w in 0..n.div_ceil(32) {
            let lanes = w * 32..(w * 32 + 32).min(n);
            let live: Vec<usize> = lanes.clone().filter(|&l| self.threads[l].state != State::Done).collect();
            let Some(&first) = live.first() else { continue };
            let State::Shfl(pc) = self.threads[first].state else { continue };
            if live.iter().all(|&l| self.threads[l].state == State::Shfl(pc)) {
                self.shuffle(w, pc, &live)?;
                progressed = true;
            }
        }
        // Warpgroups at a wgmma: issued.
        for g in 0..n / 128 {
            let State::Wgmma(pc) = self.threads[g * 128].state else { continue };
            if (g * 128..g * 128 + 128).all(|l| self.threads[l].state == State::Wgmma(pc)) {
                self.issue(g, pc).map_err(|e| self.err(g * 128, pc, e))?;
                progressed = true;
            }
        }
        // Warpgroups waiting for their wgmmas: only when nothing else can go on (the latest the
        // tensor cores may read their operands), the groups waited for run.
        if !progressed {
            for g in 0..n / 128 {
                let State::WgmmaWait(pc) = self.threads[g * 128].state else { continue };
                if (g * 128..g * 128 + 128).all(|l| self.threads[l].state == State::WgmmaWait(pc)) {
                    let keep = self.value(g * 128, &self.k.instrs[pc].args[0]).map_err(|e| self.err(g * 128, pc, e))?;
                    let commits = self.commits.get(&g).copied().unwrap_or(0);
                    let ops = self.in_flight.remove(&g).unwrap_or_default();
                    let (done, rest): (Vec<InFlight>, Vec<InFlight>) =
                        ops.into_iter().partition(|op| op.group + keep < commits);
                    for op in done {
                        self.complete(g, &op).map_err(|e| self.err(g * 128, op.pc, e))?;
                    }
                    if !rest.is_empty() {
                        self.in_flight.insert(g, rest);
                    }
                    for l in g * 128..g * 128 + 128 {
                        self.threads[l].pc = pc + 1;
                        self.threads[l].state = State::Run;
                    }
                    progressed = true;
                }
            }
        }
        Ok(progressed)
    }

    fn shuffle(&mut self, w: usize, pc: usize, live: &[usize]) -> Result<(), String> {
        let ins = &self.k.instrs[pc];
        let Op::Shfl(mode) = ins.op else { return Err("not a shuffle".into()) };
        let base = w * 32;
        let lanes = (self.threads.len() - base).min(32);
        let src_vals = (0..lanes).map(|l| self.value(base + l, &ins.args[1])).collect::<Result<Vec<u64>, String>>()?;
        // Every lane the member mask names must execute this shuffle: on the hardware a lane that
        // has exited (or a block's lane that does not exist) leaves the others waiting, or reading
        // what no one wrote.
        if let Some(m) = ins.args.get(4) {
            for &t in live {
                let members = self.value(t, m).map_err(|e| self.err(t, pc, e))? as u32;
                if let Some(l) = (0..32).find(|&l| members >> l & 1 == 1 && !live.contains(&(base + l))) {
                    let why = if l < lanes { "has exited" } else { "does not exist in the block" };
                    return Err(self.err(
                        t,
                        pc,
                        format!("shfl.sync's member mask {members:#010x} names lane {l}, which {why}"),
                    ));
                }
            }
        }
        let mut results = Vec::new();
        for &t in live {
            let lane = t - base;
            let b = self.value(t, &ins.args[2]).map_err(|e| self.err(t, pc, e))? as usize;
            let c = self.value(t, &ins.args[3]).map_err(|e| self.err(t, pc, e))? as usize;
            let (clamp, segmask) = (c & 0x1f, (c >> 8) & 0x1f);
            let (min_lane, max_lane) = (lane & segmask, (lane & segmask) | (clamp & !segmask));
            let (j, ok) = match mode {
                ShflMode::Bfly => {
                    let j = lane ^ b;
                    (j, j <= max_lane)
                }
                ShflMode::Down => {
                    let j = lane + b;
                    (j, j <= max_lane)
                }
                ShflMode::Up => {
                    let j = lane.wrapping_sub(b);
                    (j, lane >= b && j >= min_lane)
                }
                ShflMode::Idx => {
                    let j = min_lane | (b & !segmask);
                    (j, j <= max_lane)
                }
            };
            let src = if ok && j < lanes && self.threads[base + j].state != State::Done { j } else { lane };
            results.push((t, src_vals[src], ok));
        }
        for (t, v, ok) in results {
            let ins = &self.k.instrs[pc];
            let (dst, pred) = (ins.args[0].clone(), ins.args.get(5).cloned());
            self.set(t, &dst, mask(v, 32)).map_err(|e| self.err(t, pc, e))?;
            if let Some(p) = pred {
                self.set(t, &p, u64::from(ok)).map_err(|e| self.err(t, pc, e))?;
            }
            self.threads[t].pc = pc + 1;
            self.threads[t].state = State::Run;
        }
        Ok(())
    }

    /// A warpgroup's wgmma issued: what it reads at issue recorded, the threads on.
    fn issue(&mut self, g: usize, pc: usize) -> Result<(), String> {
        let ins = &self.k.instrs[pc];
        let Op::Wgmma(mma) = ins.op else { return Err("not a wgmma".into()) };
        let a = &ins.args;
        let Some(Opnd::Vector(d)) = a.first() else { return Err("wgmma: no accumulator registers".into()) };
        if d.len() != mma.n / 2 {
            return Err(format!("wgmma m64n{}: {} accumulator registers, not {}", mma.n, d.len(), mma.n / 2));
        }
        // A in registers: a thread's 4 words of bf16 pairs, and no A transpose among the flags.
        let registers_a = match a.get(1) {
            Some(Opnd::Vector(r)) if mma.input_bytes == 2 && mma.k == 16 && r.len() == 4 => true,
            Some(Opnd::Vector(r)) => {
                return Err(format!("wgmma with A in {} registers: only bf16 k16's 4 are simulated", r.len()));
            }
            _ => false,
        };
        let t0 = g * 128;
        let flag = |i: usize| -> Result<Option<u64>, String> { a.get(i).map(|o| self.value(t0, o)).transpose() };
        let (trans_a, trans_b) = match registers_a {
            true => (None, flag(6)?),
            false => (flag(6)?, flag(7)?),
        };
        let op = InFlight {
            pc,
            id: self.issues + 1,
            group: self.commits.get(&g).copied().unwrap_or(0),
            desc_a: if registers_a { None } else { Some(self.value(t0, &a[1])?) },
            desc_b: self.value(t0, &a[2])?,
            scale_d: self.value(t0, &a[3])? != 0,
            neg_a: flag(4)?.is_some_and(|v| sext(v, 32) < 0),
            neg_b: flag(5)?.is_some_and(|v| sext(v, 32) < 0),
            trans_a: trans_a.unwrap_or(0) != 0,
            trans_b: trans_b.unwrap_or(0) != 0,
        };
        self.issues = op.id;
        if let Some(r) = &self.races {
            self.issued.insert(op.id, r.issue_clock(g));
        }
        self.in_flight.entry(g).or_default().push(op);
        for t in t0..t0 + 128 {
            self.threads[t].pc = pc + 1;
            self.threads[t].state = State::Run;
        }
        Ok(())
    }

    /// A (64 x 16 bf16) from the registers `a` of warpgroup threads `t0..t0 + 128`, as they are now:
    /// warp w holds rows 16w..16w + 16; lane l's word i the columns 8 (i / 2) + 2 (l mod 4) (low
    /// half) and the next (high half) of row 16w + l / 4 + 8 (i mod 2) — an m64nNk16 accumulator's
    /// layout for 16 of its columns, so that a product's f32 fragment packed in pairs is the next
    /// one's A.
    fn registers_a(&self, t0: usize, a: &Opnd) -> Result<Vec<f32>, String> {
        let Opnd::Vector(regs) = a else { return Err("wgmma: A is not a register vector".into()) };
        let mut out = vec![0f32; 64 * 16];
        for lt in 0..128 {
            let (w, l) = (lt / 32, lt % 32);
            for (i, &reg) in regs.iter().enumerate() {
                let word = self.threads[t0 + lt].regs[reg as usize] as u32;
                let row = 16 * w + l / 4 + 8 * (i % 2);
                let col = 8 * (i / 2) + 2 * (l % 4);
                out[row * 16 + col] = v3c_models::dtype::bf16_to_f32(word as u16);
                out[row * 16 + col + 1] = v3c_models::dtype::bf16_to_f32((word >> 16) as u16);
            }
        }
        Ok(out)
    }

    /// A warpgroup's wgmma run: its operands read from shared memory (or A from its registers)
    /// now, into the accumulators.
    fn complete(&mut self, g: usize, op: &InFlight) -> Result<(), String> {
        let ins = &self.k.instrs[op.pc];
        let Op::Wgmma(mma) = ins.op else { return Err("not a wgmma".into()) };
        let Some(Opnd::Vector(d)) = ins.args.first() else { return Err("wgmma: no accumulator registers".into()) };
        let t0 = g * 128;
        let InFlight { desc_a, desc_b, scale_d, neg_a, neg_b, trans_a, trans_b, .. } = *op;
        let checking = self.races.is_some();
        let mut offsets = Vec::new();
        let mut read = |desc: u64, rows: usize, trans: bool| -> Result<Vec<f32>, String> {
            let mut out = vec![0f32; rows * mma.k];
            for r in 0..rows {
                for kk in 0..mma.k {
                    let off = crate::layout::element(desc, r, kk, mma.input_bytes, trans)?;
                    if checking {
                        offsets.extend(off..off + mma.input_bytes);
                    }
                    let shared = &self.shared[t0 / self.n];
                    if off + mma.input_bytes > shared.len() {
                        return Err(format!("wgmma operand read at shared {off} past {} B", shared.len()));
                    }
                    out[r * mma.k + kk] = if mma.input_bytes == 2 {
                        v3c_models::dtype::bf16_to_f32(u16::from_le_bytes([shared[off], shared[off + 1]]))
                    } else {
                        v3c_models::dtype::f8e4m3_to_f32(shared[off])
                    };
                }
            }
            Ok(out)
        };
        let am = match desc_a {
            Some(desc) => read(desc, 64, trans_a)?,
            None => self.registers_a(t0, &ins.args[1])?,
        };
        let bm = read(desc_b, mma.n, trans_b)?;
        if let (Some(r), Some(issued)) = (&mut self.races, self.issued.remove(&op.id)) {
            offsets.sort_unstable();
            offsets.dedup();
            let cta = t0 / self.n;
            r.tensor_read(g, cta, &offsets, op.pc, &issued).map_err(|race| self.describe(&race))?;
        }
        let (sa, sb) = (if neg_a { -1.0 } else { 1.0 }, if neg_b { -1.0 } else { 1.0 });
        for lt in 0..128 {
            let t = t0 + lt;
            let (w, l) = (lt / 32, lt % 32);
            for (j, &reg) in d.iter().enumerate() {
                let (i, q) = (j / 4, j % 4);
                let row = 16 * w + l / 4 + 8 * (q / 2);
                let col = 8 * i + 2 * (l % 4) + (q % 2);
                let mut acc = if scale_d { f32v(self.threads[t].regs[reg as usize]) } else { 0.0 };
                for kk in 0..mma.k {
                    acc += sa * am[row * mma.k + kk] * sb * bm[col * mma.k + kk];
                }
                self.threads[t].regs[reg as usize] = f32b(acc);
            }
        }
        Ok(())
    }
}

fn compare(c: Cmp, ty: Ty, x: u64, y: u64) -> bool {
    use std::cmp::Ordering;
    let base = |b: CmpBase, o: Ordering| match b {
        CmpBase::Eq => o == Ordering::Equal,
        CmpBase::Ne => o != Ordering::Equal,
        CmpBase::Lt => o == Ordering::Less,
        CmpBase::Le => o != Ordering::Greater,
        CmpBase::Gt => o == Ordering::Greater,
        CmpBase::Ge => o != Ordering::Less,
    };
    // None: unordered (a NaN).
    let order = match (ty.kind, ty.bits) {
        (Kind::F, 64) => f64::from_bits(x).partial_cmp(&f64::from_bits(y)),
        (Kind::F, _) => f32v(x).partial_cmp(&f32v(y)),
        (Kind::S, _) => Some(sext(x, ty.bits).cmp(&sext(y, ty.bits))),
        _ => Some(mask(x, ty.bits).cmp(&mask(y, ty.bits))),
    };
    match (c, order) {
        (Cmp::Num, o) => o.is_some(),
        (Cmp::Nan, o) => o.is_none(),
        // Ordered comparisons (`ne` too) are false on a NaN, unordered ones true.
        (Cmp::Ordered(b), Some(o)) | (Cmp::Unordered(b), Some(o)) => base(b, o),
        (Cmp::Ordered(_), None) => false,
        (Cmp::Unordered(_), None) => true,
    }
}

/// f16 bits -> f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let (exp, man) = (i32::from((h >> 10) & 0x1f), f32::from(h & 0x3ff));
    match exp {
        0 => sign * man * 2f32.powi(-24),
        31 if man == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + man / 1024.0) * 2f32.powi(e - 15),
    }
}

/// f32 -> f16 bits, round to nearest even (through f64: exact for f32 inputs).
fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7e00;
    }
    let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
    let a = f64::from(x.abs());
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 2f64.powi(-14) {
        // Subnormal: multiples of 2^-24.
        return sign | (a * 2f64.powi(24)).round_ties_even() as u16;
    }
    let e = a.log2().floor() as i32;
    let e = if 2f64.powi(e) > a { e - 1 } else { e };
    let m = (a / 2f64.powi(e) - 1.0) * 1024.0;
    let m = m.round_ties_even() as u32;
    let (e, m) = if m == 1024 { (e + 1, 0) } else { (e, m) };
    if e > 15 {
        return sign | 0x7c00;
    }
    sign | (((e + 15) as u16) << 10) | m as u16
}

fn convert(to: Ty, from: Ty, round: Option<IntRound>, sat: bool, x: u64) -> Result<u64, String> {
    use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
    let float = |t: Ty| matches!(t.kind, Kind::F | Kind::Bf16);
    let as_f64 = |x: u64| -> Result<f64, String> {
        Ok(match (from.kind, from.bits) {
            (Kind::F, 64) => f64::from_bits(x),
            (Kind::F, 32) => f64::from(f32v(x)),
            (Kind::F, 16) => f64::from(f16_to_f32(x as u16)),
            (Kind::Bf16, _) => f64::from(bf16_to_f32(x as u16)),
            _ => return Err(format!("cvt from {from:?}")),
        })
    };
    let from_f32 = |f: f32| -> Result<u64, String> {
        Ok(match (to.kind, to.bits) {
            (Kind::F, 32) => f32b(f),
            (Kind::F, 16) => u64::from(f32_to_f16(f)),
            (Kind::Bf16, _) => u64::from(f32_to_bf16(f)),
            _ => return Err(format!("cvt to {to:?}")),
        })
    };
    Ok(match (float(to), float(from)) {
        (false, false) => {
            let v = if from.kind == Kind::S { sext(x, from.bits) as u64 } else { mask(x, from.bits) };
            mask(v, to.bits)
        }
        (true, true) => {
            let f = as_f64(x)?;
            let f = if sat { f.clamp(0.0, 1.0) } else { f };
            if (to.kind, to.bits) == (Kind::F, 64) {
                f.to_bits()
            } else {
                from_f32(f as f32)?
            }
        }
        (true, false) => {
            let v: i128 =
                if from.kind == Kind::S { i128::from(sext(x, from.bits)) } else { i128::from(mask(x, from.bits)) };
            if (to.kind, to.bits) == (Kind::F, 64) {
                (v as f64).to_bits()
            } else {
                from_f32(v as f32)?
            }
        }
        (false, true) => {
            let f = as_f64(x)?;
            let f = match round.ok_or("float to integer without a rounding mode")? {
                IntRound::Zero => f.trunc(),
                IntRound::Nearest => f.round_ties_even(),
                IntRound::Down => f.floor(),
                IntRound::Up => f.ceil(),
            };
            let f = if f.is_nan() { 0.0 } else { f };
            let v = if to.kind == Kind::S {
                let (lo, hi) = (-(2f64.powi(to.bits as i32 - 1)), 2f64.powi(to.bits as i32 - 1) - 1.0);
                f.clamp(lo, hi) as i64 as u64
            } else {
                f.clamp(0.0, 2f64.powi(to.bits as i32) - 1.0) as u64
            };
            mask(v, to.bits)
        }
    })
}

/// Runs every CTA of a launch.
pub fn run(k: &Kernel, launch: &Launch) -> Result<Stats, String> {
    let threads = launch.threads as usize;
    if let Some(max) = k.max_threads {
        if threads > max {
            return Err(format!("{}: {threads} threads, the kernel allows {max}", k.name));
        }
    }
    if launch.params.len() != k.params.len() {
        return Err(format!(
            "{}: {} parameters given, the kernel takes {}",
            k.name,
            launch.params.len(),
            k.params.len()
        ));
    }
    let mut params = vec![0u8; k.param_bytes];
    for (&(off, n), v) in k.params.iter().zip(launch.params) {
        params[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
    let shared_bytes = k.dynamic_offset + launch.dynamic_shared;
    let cluster = k.cluster.max(1);
    // The memory instructions, numbered.
    let mut memory_instructions = 0;
    let memory_index: Vec<Option<usize>> = k
        .instrs
        .iter()
        .map(|i| {
            matches!(i.op, Op::Ld(..) | Op::St(..) | Op::Atom(..)).then(|| {
                memory_instructions += 1;
                memory_instructions - 1
            })
        })
        .collect();
    if launch.grid[0] as usize % cluster != 0 {
        return Err(format!("{}: a grid of {} CTAs in clusters of {cluster}", k.name, launch.grid[0]));
    }
    let mut stats = Stats::default();
    let mut global = launch.checks.races.then(GlobalRaces::default);
    for y in 0..launch.grid[1] {
        for x0 in (0..launch.grid[0]).step_by(cluster) {
            let mut cta = Cta {
                k,
                launch,
                n: threads,
                ctaids: (0..cluster as u32).map(|i| [u64::from(x0 + i), u64::from(y)]).collect(),
                threads: (0..threads * cluster)
                    .map(|_| Thread {
                        pc: 0,
                        regs: vec![0; k.registers],
                        state: State::Run,
                        cluster_phase: 0,
                        executed: 0,
                        rounds: 0,
                        ready: vec![0; k.registers],
                    })
                    .collect(),
                shared: vec![vec![0; shared_bytes]; cluster],
                params: params.clone(),
                mbarriers: vec![HashMap::new(); cluster],
                cluster_arrivals: HashMap::new(),
                in_flight: HashMap::new(),
                commits: HashMap::new(),
                executed: 0,
                requests: HashMap::new(),
                executions: vec![0; threads * cluster * memory_instructions],
                memory_index: &memory_index,
                memory_instructions,
                races: launch.checks.races.then(|| Races::new(threads * cluster, cluster, shared_bytes)),
                global: global.take().map(|mut g| {
                    g.begin(y * launch.grid[0] + x0 + 1);
                    g
                }),
                issued: HashMap::new(),
                issues: 0,
            };
            loop {
                let mut progressed = false;
                let order: Vec<usize> = match launch.checks.reversed {
                    true => (0..cta.threads.len()).rev().collect(),
                    false => (0..cta.threads.len()).collect(),
                };
                for t in order {
                    if cta.threads[t].state == State::Run {
                        cta.run_thread(t)?;
                        progressed = true;
                    }
                }
                progressed |= cta.release()?;
                if cta.threads.iter().all(|th| th.state == State::Done) {
                    if let Some((g, ops)) = cta.in_flight.iter().find(|(_, ops)| !ops.is_empty()) {
                        let line = k.instrs[ops[0].pc].line;
                        return Err(format!(
                            "{}: CTA ({x0}, {y}): warpgroup {g} exited with {} wgmma in flight (the first at line {line}) \
                             never waited for",
                            k.name,
                            ops.len()
                        ));
                    }
                    break;
                }
                if !progressed {
                    let waiting: Vec<String> = cta
                        .threads
                        .iter()
                        .enumerate()
                        .filter(|(_, th)| th.state != State::Done)
                        .take(4)
                        .map(|(t, th)| {
                            let line = k.instrs.get(th.pc).map_or(0, |i| i.line);
                            let text = k.text.get(th.pc).map_or("", String::as_str);
                            let who = if cluster > 1 {
                                format!("CTA {} thread {}", t / threads, t % threads)
                            } else {
                                format!("thread {t}")
                            };
                            format!("{who} at line {line} '{text}' {}", th.state.waiting())
                        })
                        .collect();
                    let at = if cluster > 1 {
                        format!("the cluster at CTA ({x0}, {y})")
                    } else {
                        format!("CTA ({x0}, {y})")
                    };
                    return Err(format!(
                        "{}: {at} deadlocked: {}{}",
                        k.name,
                        waiting.join(", "),
                        if waiting.len() == 4 { ", ..." } else { "" }
                    ));
                }
            }
            global = cta.global.take();
            stats.instructions += cta.executed;
            let longest = cta.threads.iter().map(|th| th.executed).max().unwrap_or(0);
            stats.longest_thread = stats.longest_thread.max(longest);
            let rounds = cta.threads.iter().map(|th| u64::from(th.rounds)).max().unwrap_or(0);
            stats.load_rounds = stats.load_rounds.max(rounds);
            cta.memory_stats(&mut stats);
            stats.ctas += cluster as u64;
        }
    }
    Ok(stats)
}
