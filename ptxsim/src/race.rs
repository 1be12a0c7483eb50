//! Data races on shared memory, and on global memory between the threads of a cluster, found by
//! happens-before (vector clocks), whatever order the threads happen to run in.
//!
//! Every thread of a cluster has a vector clock; so has each warpgroup's tensor cores (the agent
//! that reads wgmma operands). Synchronization moves clocks:
//! - `bar.sync`: the threads that meet there all learn each other's clocks;
//! - an mbarrier: an arrival (or a TMA copy's completed bytes, as of the issuing thread) releases
//!   the arriving clock into the phase; a `try_wait` that sees the phase complete acquires it;
//! - `barrier.cluster`: `arrive` releases, `wait` acquires;
//! - a wgmma is issued as of every issuing thread's clock and read its operands then (or later); its
//!   threads learn the read when `wait_group` returns.
//!
//! Shuffles synchronize values, not memory: a warp that exchanges data through shared memory
//! needs a barrier (`bar.warp.sync` is not emitted by v3c; `bar.sync` is).
//!
//! Every shared byte keeps its last write and the reads since that no later read is known to
//! follow. A read must come after the last write; a write after the last write and every such
//! read; the tensor cores' read of bytes a thread wrote (the generic proxy) also needs that thread's
//! `fence.proxy.async` between the write and the wgmma's issue. The first access that breaks one
//! of these fails the launch, naming both accesses. Atomics on shared memory are not checked.
//!
//! Global bytes a cluster's threads load and store are kept the same way (for as long as the
//! cluster runs; between clusters, [`crate::global_race`]): `bar.sync` and mbarriers order them as
//! they order shared memory. Global atomics are not checked here.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes the checks' keys (addresses, bytes) by a multiplication: they are looked up for every byte
/// a checked launch touches, where the standard hasher's cost showed.
#[derive(Default)]
pub(crate) struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

/// A map keyed by addresses, hashed by [`AddressHasher`].
pub(crate) type AddressMap<K, V> = HashMap<K, V, BuildHasherDefault<AddressHasher>>;

/// Who accessed a byte and when: the accessor (a thread of the cluster, or past them a
/// warpgroup's tensor cores), its own clock then, and the instruction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Epoch {
    pub who: u32,
    /// 0: no access.
    pub clock: u32,
    pub pc: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    write: Epoch,
    /// The write was a TMA copy's (the async proxy), not a thread's store.
    write_async: bool,
    /// The latest read; `reads` holds more when reads are unordered among themselves.
    read: Epoch,
    concurrent: bool,
}

/// What an access is, for the checks and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
    /// A TMA copy's write, as of the issuing thread.
    AsyncWrite,
    /// The tensor cores' operand read, as of the clock the wgmma was issued at.
    TensorRead,
}

/// A byte the check keeps: of a cluster CTA's shared memory, or of global memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Byte {
    Shared { cta: usize, offset: usize },
    Global(u64),
}

/// A race found: the byte, the access now and the one it is not ordered after.
#[derive(Debug, Clone)]
pub(crate) struct Race {
    pub byte: Byte,
    pub now: (Access, Epoch),
    pub before: (Access, Epoch),
    /// The earlier write was ordered, but no proxy fence came between it and the tensor cores.
    pub unfenced: bool,
}

pub(crate) struct Races {
    /// Threads of the cluster (agents past them: warpgroup `g`'s tensor cores are `threads + g`).
    threads: usize,
    clocks: Vec<Vec<u32>>,
    cells: Vec<Vec<Cell>>,
    global: AddressMap<u64, Cell>,
    reads: AddressMap<Byte, Vec<Epoch>>,
    /// Per thread, the clocks at which it executed `fence.proxy.async` (ascending).
    fences: Vec<Vec<u32>>,
    /// Per mbarrier (CTA, offset): the arrivals of its current phase, and its completed phases.
    mbarriers: HashMap<(usize, usize), (Vec<u32>, Vec<u32>)>,
    cluster: HashMap<u64, Vec<u32>>,
}

fn join(into: &mut [u32], from: &[u32]) {
    for (a, &b) in into.iter_mut().zip(from) {
        *a = (*a).max(b);
    }
}

impl Races {
    pub fn new(threads: usize, ctas: usize, shared_bytes: usize) -> Races {
        let agents = threads + threads / 128;
        let clocks = (0..agents)
            .map(|t| {
                let mut c = vec![0; agents];
                c[t] = 1;
                c
            })
            .collect();
        Races {
            threads,
            clocks,
            cells: vec![vec![Cell::default(); shared_bytes]; ctas],
            global: AddressMap::default(),
            reads: AddressMap::default(),
            fences: vec![Vec::new(); threads],
            mbarriers: HashMap::new(),
            cluster: HashMap::new(),
        }
    }

    fn epoch(&self, who: usize, pc: usize) -> Epoch {
        Epoch { who: who as u32, clock: self.clocks[who][who], pc: pc as u32 }
    }

    /// Thread `t`'s next events come after what it has released.
    fn tick(&mut self, t: usize) {
        self.clocks[t][t] += 1;
    }

    /// Threads `ts` meet (a barrier): each learns all the others' clocks.
    pub fn meet(&mut self, ts: &[usize]) {
        let mut all = vec![0; self.clocks.len()];
        for &t in ts {
            join(&mut all, &self.clocks[t]);
        }
        for &t in ts {
            self.clocks[t].copy_from_slice(&all);
            self.tick(t);
        }
    }

    pub fn fence_proxy(&mut self, t: usize) {
        let c = self.clocks[t][t];
        self.fences[t].push(c);
        self.tick(t);
    }

    pub fn mbarrier_init(&mut self, cta: usize, at: usize) {
        let n = self.clocks.len();
        self.mbarriers.insert((cta, at), (vec![0; n], vec![0; n]));
    }

    /// Thread `t` arrives (or completes bytes of a copy it issued); `completed`: the phase is.
    pub fn arrive(&mut self, t: usize, cta: usize, at: usize, completed: bool) {
        let n = self.clocks.len();
        let (pending, done) = self.mbarriers.entry((cta, at)).or_insert_with(|| (vec![0; n], vec![0; n]));
        join(pending, &self.clocks[t]);
        if completed {
            join(done, pending);
            pending.fill(0);
        }
        self.tick(t);
    }

    /// Thread `t` saw the mbarrier's phase complete.
    pub fn acquire(&mut self, t: usize, cta: usize, at: usize) {
        if let Some((_, done)) = self.mbarriers.get(&(cta, at)) {
            let done = done.clone();
            join(&mut self.clocks[t], &done);
        }
    }

    pub fn cluster_arrive(&mut self, t: usize, phase: u64) {
        let n = self.clocks.len();
        join(self.cluster.entry(phase).or_insert_with(|| vec![0; n]), &self.clocks[t]);
        self.tick(t);
    }

    pub fn cluster_wait(&mut self, t: usize, phase: u64) {
        if let Some(c) = self.cluster.get(&phase) {
            let c = c.clone();
            join(&mut self.clocks[t], &c);
        }
    }

    /// The clock a wgmma of warpgroup `g` is issued as of: every issuing thread's.
    pub fn issue_clock(&self, g: usize) -> Vec<u32> {
        let mut all = vec![0; self.clocks.len()];
        for t in g * 128..g * 128 + 128 {
            join(&mut all, &self.clocks[t]);
        }
        all
    }

    /// Warpgroup `g`'s wgmmas issued as of `issued` read `offsets` of CTA `cta` (issued at `pc`);
    /// its threads, through `wait_group`, know.
    pub fn tensor_read(
        &mut self,
        g: usize,
        cta: usize,
        offsets: &[usize],
        pc: usize,
        issued: &[u32],
    ) -> Result<(), Race> {
        let agent = self.threads + g;
        let own = self.clocks[agent][agent];
        self.clocks[agent].copy_from_slice(issued);
        self.clocks[agent][agent] = own + 1;
        for &offset in offsets {
            self.check(agent, Byte::Shared { cta, offset }, 1, pc, Access::TensorRead)?;
        }
        let c = self.clocks[agent][agent];
        for t in g * 128..g * 128 + 128 {
            self.clocks[t][agent] = self.clocks[t][agent].max(c);
        }
        Ok(())
    }

    /// Whether `e` is ordered before what `view` knows.
    fn before(e: Epoch, view: &[u32]) -> bool {
        e.clock == 0 || view[e.who as usize] >= e.clock
    }

    /// Whether thread `w`'s write at `clock` was followed by its proxy fence that `view` knows.
    fn fenced(&self, w: Epoch, view: &[u32]) -> bool {
        let fences = &self.fences[w.who as usize];
        let i = fences.partition_point(|&f| f < w.clock);
        fences.get(i).is_some_and(|&f| f <= view[w.who as usize])
    }

    fn cell(&mut self, b: Byte) -> &mut Cell {
        match b {
            Byte::Shared { cta, offset } => &mut self.cells[cta][offset],
            Byte::Global(addr) => self.global.entry(addr).or_default(),
        }
    }

    /// `who`'s access at `pc` of `bytes` from `at`, checked and kept.
    pub fn check(&mut self, who: usize, at: Byte, bytes: usize, pc: usize, access: Access) -> Result<(), Race> {
        let now = self.epoch(who, pc);
        for i in 0..bytes {
            let byte = match at {
                Byte::Shared { cta, offset } => Byte::Shared { cta, offset: offset + i },
                Byte::Global(addr) => Byte::Global(addr + i as u64),
            };
            let cell = *self.cell(byte);
            let view = &self.clocks[who];
            let race = |before: (Access, Epoch), unfenced: bool| Race { byte, now: (access, now), before, unfenced };
            let w = cell.write;
            if w.who != now.who && !Self::before(w, view) {
                let was = if cell.write_async { Access::AsyncWrite } else { Access::Write };
                return Err(race((was, w), false));
            }
            if access == Access::TensorRead && w.clock != 0 && !cell.write_async && !self.fenced(w, view) {
                return Err(race((Access::Write, w), true));
            }
            let writes = matches!(access, Access::Write | Access::AsyncWrite);
            if writes {
                let reads =
                    if cell.concurrent { self.reads.get(&byte).cloned().unwrap_or_default() } else { vec![cell.read] };
                if let Some(r) = reads.into_iter().find(|r| r.who != now.who && !Self::before(*r, view)) {
                    let was = if r.who as usize >= self.threads { Access::TensorRead } else { Access::Read };
                    return Err(race((was, r), false));
                }
                if cell.concurrent {
                    self.reads.remove(&byte);
                }
                *self.cell(byte) = Cell { write: now, write_async: access == Access::AsyncWrite, ..Cell::default() };
            } else if cell.concurrent {
                let view = &self.clocks[who];
                let set = self.reads.entry(byte).or_default();
                set.retain(|r| r.who != now.who && !Self::before(*r, view));
                set.push(now);
            } else if cell.read.who == now.who || Self::before(cell.read, view) {
                self.cell(byte).read = now;
            } else {
                let c = self.cell(byte);
                c.concurrent = true;
                self.reads.insert(byte, vec![cell.read, now]);
            }
        }
        Ok(())
    }
}
