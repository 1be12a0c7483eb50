//! Data races on global memory between the CTAs of one launch (clusters: a cluster is one agent),
//! found by happens-before, whatever order the hardware would run the CTAs in.
//!
//! CTAs of a launch are unordered, except through the one pattern a kernel may use to hand data
//! from one CTA to another within a launch: a release (a GPU-scope fence — `membar.gl`,
//! `fence.sc.gpu`, `fence.acq_rel.gpu` — then an atomic on some address) and an acquire (an atomic
//! on that address, then reading what the releasing CTA wrote before its fence): split-K's
//! "the last CTA of a tile sums the partial tiles". So every CTA has a vector clock over CTAs
//! (sparse: most know only themselves), and each atomic address keeps what was released to it.
//! The simulator runs CTAs one after another, so one clock is live at a time.
//!
//! Every global byte keeps its last write (a store, or an atomic) and a read since: the one CTA that
//! read it, or that several did. A read must be ordered after the last write; a store after the
//! last write and the reads; an atomic after the last store and the reads (atomics among
//! themselves never race). A read ordered after the kept one replaces it; bytes read by several
//! CTAs unordered among themselves, then written, are reported whatever the writer's ordering
//! (which CTAs read is not kept). TMA copies' global reads count as reads of the issuing CTA.
//! Within a CTA, threads' global accesses are checked with its shared-memory races, in
//! [`crate::race`] (TMA copies' global reads are not).

use std::collections::HashMap;

use crate::race::AddressMap;

/// Bytes per shadow page.
const PAGE: u64 = 4096;

/// A CTA (the cluster's first) in a launch: `y * grid_x + x`, plus one (0: none).
pub(crate) type Agent = u32;

/// Several CTAs read the byte.
const SEVERAL: Agent = Agent::MAX;

/// One access remembered: who (0: none, [`SEVERAL`]), in which of its epochs (its accesses
/// between two releases), at which instruction; and whether a write was an atomic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    pub agent: Agent,
    pub epoch: u32,
    pub pc: u32,
    pub atomic: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    write: Mark,
    read: Mark,
}

/// What an access of global memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GlobalAccess {
    Read,
    Write,
    Atomic,
}

/// A race: the byte, this access and the earlier one it is not ordered after.
#[derive(Debug, Clone)]
pub(crate) struct GlobalRace {
    pub addr: u64,
    pub now: GlobalAccess,
    pub before: (GlobalAccess, Mark),
}

#[derive(Default)]
pub(crate) struct GlobalRaces {
    pages: AddressMap<u64, Box<[Cell]>>,
    /// The CTA running, its epoch and what it has acquired (CTA -> the epochs of its released).
    agent: Agent,
    epoch: u32,
    known: HashMap<Agent, u32>,
    /// A GPU-scope fence since the CTA's last release.
    fenced: bool,
    /// Per atomic address: what CTAs released to it.
    released: AddressMap<u64, HashMap<Agent, u32>>,
}

fn join(into: &mut HashMap<Agent, u32>, from: &HashMap<Agent, u32>) {
    for (&a, &e) in from {
        let x = into.entry(a).or_insert(0);
        *x = (*x).max(e);
    }
}

impl GlobalRaces {
    /// CTA `agent` (non-zero) starts: it knows nothing of the others.
    pub fn begin(&mut self, agent: Agent) {
        self.agent = agent;
        self.epoch = 1;
        self.known.clear();
        self.fenced = false;
    }

    /// The running CTA executed a GPU-scope fence.
    pub fn fence(&mut self) {
        self.fenced = true;
    }

    /// The running CTA's access at `pc` of `bytes` at `addr`: checked against the bytes' last
    /// write and reads, then kept. An atomic also releases (after a fence) and acquires.
    pub fn access(&mut self, addr: u64, bytes: usize, pc: usize, what: GlobalAccess) -> Result<(), GlobalRace> {
        let (agent, known) = (self.agent, &self.known);
        let now = Mark { agent, epoch: self.epoch, pc: pc as u32, atomic: what == GlobalAccess::Atomic };
        // Whether `m` is ordered before what the running CTA does now (its own marks are: its
        // epochs only grow).
        let ordered = |m: &Mark| m.agent == 0 || m.agent == agent || known.get(&m.agent).is_some_and(|&e| e >= m.epoch);
        for a in addr..addr + bytes as u64 {
            let page = self.pages.entry(a / PAGE).or_insert_with(|| vec![Cell::default(); PAGE as usize].into());
            let c = &mut page[(a % PAGE) as usize];
            let race = |before: Mark, access| GlobalRace { addr: a, now: what, before: (access, before) };
            let write_kind = if c.write.atomic { GlobalAccess::Atomic } else { GlobalAccess::Write };
            let write_conflicts = what != GlobalAccess::Atomic || !c.write.atomic;
            if write_conflicts && !ordered(&c.write) {
                return Err(race(c.write, write_kind));
            }
            if what != GlobalAccess::Read && (c.read.agent == SEVERAL || !ordered(&c.read)) {
                return Err(race(c.read, GlobalAccess::Read));
            }
            if what == GlobalAccess::Read {
                // A read ordered after the kept one replaces it: whatever is ordered after this
                // one is after that one too.
                let after = c.read.agent != SEVERAL && ordered(&c.read);
                c.read = if after { now } else { Mark { agent: SEVERAL, ..c.read } };
            } else {
                c.write = now;
                c.read = Mark::default();
            }
        }
        if what == GlobalAccess::Atomic {
            let to = self.released.entry(addr).or_default();
            if self.fenced {
                join(to, &self.known);
                let own = to.entry(self.agent).or_insert(0);
                *own = (*own).max(self.epoch);
                self.epoch += 1;
                self.fenced = false;
            }
            let from = self.released.get(&addr).cloned().unwrap_or_default();
            join(&mut self.known, &from);
        }
        Ok(())
    }
}
