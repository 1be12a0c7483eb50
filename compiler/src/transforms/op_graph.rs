//! A read-only Rust view of one entry function's ops (names, operand sources, users, the checkpoint
//! names of parameter arguments) that the fusion passes analyse, and the one write they make: tagging
//! the ops of a fusion group with `{v3.fusion = "<kind>#<n>"}`. `form-kernels` turns each tagged group
//! into one kernel.
//!
//! Groups must be schedulable as one launch ([`OpGraph::schedulable`]): every value a group reads from
//! outside is defined before the group's first op, or nothing outside the group reads its results
//! before its last op.

use std::collections::{BTreeMap, HashMap};

use melior::ir::attribute::{AttributeLike, StringAttribute};
use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::RegionLike;
use melior::Context;
use mlir_sys::{
    mlirBlockArgumentGetArgNumber, mlirOpResultGetOwner, mlirOpResultGetResultNumber, mlirOperationGetNumOperands,
    mlirOperationGetNumResults, mlirOperationGetOperand, mlirOperationSetAttributeByName, mlirValueIsABlockArgument,
    mlirValueIsAOpResult, MlirOperation,
};

/// Where an operand comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Result `.1` of op `.0` (index into [`OpGraph::ops`]).
    Op(usize, usize),
    /// Argument of the entry function.
    Arg(usize),
}

/// One op of the entry block.
#[derive(Debug, Clone)]
pub struct OpNode {
    pub raw: MlirOperation,
    /// Bare `v3` op name (`linear`), or the full name for other dialects (`func.return`).
    pub name: String,
    pub operands: Vec<Source>,
    /// Users of each result (op indices, in block order, repeated per use).
    pub users: Vec<Vec<usize>>,
    /// The fusion group this op was tagged with by an earlier pass.
    pub fusion: Option<String>,
}

/// The ops of one entry block, in order.
pub struct OpGraph {
    pub ops: Vec<OpNode>,
    /// Checkpoint name of each function argument that is a parameter.
    pub arg_params: Vec<Option<String>>,
}

/// The attribute that tags fusion groups.
pub const FUSION_ATTR: &str = "v3.fusion";

impl OpGraph {
    /// Reads the first block of `entry` (a `func.func`).
    pub fn read(entry: &OperationRef) -> Option<OpGraph> {
        let block = entry.region(0).ok()?.first_block()?;
        let mut index: HashMap<usize, usize> = HashMap::new();
        let mut ops: Vec<OpNode> = Vec::new();
        let mut op = block.first_operation();
        while let Some(o) = op {
            let full = o.name().as_string_ref().as_str().unwrap_or_default().to_string();
            let name = full.strip_prefix("v3.").map(str::to_string).unwrap_or(full);
            let raw = o.to_raw();
            index.insert(raw.ptr as usize, ops.len());
            // SAFETY: reading operands/results of a live op.
            let (n_operands, n_results) =
                unsafe { (mlirOperationGetNumOperands(raw), mlirOperationGetNumResults(raw)) };
            let operands = (0..n_operands)
                .map(|i| unsafe {
                    let v = mlirOperationGetOperand(raw, i);
                    if mlirValueIsABlockArgument(v) {
                        Source::Arg(mlirBlockArgumentGetArgNumber(v) as usize)
                    } else if mlirValueIsAOpResult(v) {
                        let owner = mlirOpResultGetOwner(v);
                        Source::Op(
                            index.get(&(owner.ptr as usize)).copied().unwrap_or(usize::MAX),
                            mlirOpResultGetResultNumber(v) as usize,
                        )
                    } else {
                        Source::Arg(usize::MAX)
                    }
                })
                .collect();
            let fusion = o.attribute(FUSION_ATTR).ok().map(crate::mlir::attribute_text);
            ops.push(OpNode { raw, name, operands, users: vec![Vec::new(); n_results as usize], fusion });
            op = o.next_in_block();
        }
        for i in 0..ops.len() {
            for k in 0..ops[i].operands.len() {
                if let Source::Op(p, r) = ops[i].operands[k] {
                    if let Some(u) = ops.get_mut(p).and_then(|n| n.users.get_mut(r)) {
                        u.push(i);
                    }
                }
            }
        }
        let arg_params = match entry.attribute("arg_attrs") {
            Ok(a) => a
                .to_string()
                .split("}, {")
                .map(|s| {
                    s.split(&format!("{} = \"", v3c_dialects::PARAM_ATTR))
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .map(str::to_string)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        Some(OpGraph { ops, arg_params })
    }

    /// The op producing operand `k` of op `i`, if an op (not an argument).
    pub fn producer(&self, i: usize, k: usize) -> Option<usize> {
        match self.ops[i].operands.get(k)? {
            Source::Op(p, _) if *p < self.ops.len() => Some(*p),
            _ => None,
        }
    }

    /// All users of all results of op `i`.
    pub fn all_users(&self, i: usize) -> Vec<usize> {
        let mut u: Vec<usize> = self.ops[i].users.iter().flatten().copied().collect();
        u.sort();
        u.dedup();
        u
    }

    /// The checkpoint name of the parameter read as operand `k` of op `i`, if it is one.
    pub fn param(&self, i: usize, k: usize) -> Option<&str> {
        match self.ops[i].operands.get(k)? {
            Source::Arg(a) => self.arg_params.get(*a).and_then(|p| p.as_deref()),
            _ => None,
        }
    }

    /// Can `members` (indices in block order) run as one launch? See the module docs.
    pub fn schedulable(&self, members: &[usize]) -> bool {
        let (Some(&first), Some(&last)) = (members.first(), members.last()) else { return false };
        let inside = |i: usize| members.contains(&i);
        let inputs_early = members.iter().all(|&m| {
            self.ops[m].operands.iter().all(|s| match s {
                Source::Op(p, _) => inside(*p) || *p < first,
                Source::Arg(_) => true,
            })
        });
        if inputs_early {
            return true;
        }
        members.iter().all(|&m| self.all_users(m).iter().all(|&u| inside(u) || u > last))
    }
}

/// Fusion groups planned by a pass: kind and member op indices (block order).
#[derive(Debug, Default)]
pub struct Groups {
    groups: Vec<(String, Vec<usize>)>,
    group_of: BTreeMap<usize, usize>,
}

impl Groups {
    /// Starts from the groups earlier passes tagged.
    pub fn from_tags(graph: &OpGraph) -> Groups {
        let mut g = Groups::default();
        let mut by_tag: HashMap<String, usize> = HashMap::new();
        for (i, op) in graph.ops.iter().enumerate() {
            if let Some(tag) = &op.fusion {
                let kind = tag.split('#').next().unwrap_or_default().to_string();
                let id = *by_tag.entry(tag.clone()).or_insert_with(|| {
                    g.groups.push((kind, Vec::new()));
                    g.groups.len() - 1
                });
                g.groups[id].1.push(i);
                g.group_of.insert(i, id);
            }
        }
        g
    }

    pub fn group_of(&self, op: usize) -> Option<usize> {
        self.group_of.get(&op).copied()
    }

    pub fn members(&self, group: usize) -> &[usize] {
        &self.groups[group].1
    }

    /// Adds a group of ungrouped ops if it is schedulable; returns its id.
    pub fn try_new(&mut self, graph: &OpGraph, kind: &str, ops: &[usize]) -> Option<usize> {
        if ops.iter().any(|o| self.group_of.contains_key(o)) {
            return None;
        }
        let mut members = ops.to_vec();
        members.sort();
        members.dedup();
        if !graph.schedulable(&members) {
            return None;
        }
        self.groups.push((kind.to_string(), members.clone()));
        let id = self.groups.len() - 1;
        for m in members {
            self.group_of.insert(m, id);
        }
        Some(id)
    }

    /// Adds ungrouped `ops` to `group` if the result stays schedulable.
    pub fn try_extend(&mut self, graph: &OpGraph, group: usize, ops: &[usize]) -> bool {
        if ops.iter().any(|o| self.group_of.contains_key(o)) {
            return false;
        }
        let mut members = self.groups[group].1.clone();
        members.extend_from_slice(ops);
        members.sort();
        members.dedup();
        if !graph.schedulable(&members) {
            return false;
        }
        for &o in ops {
            self.group_of.insert(o, group);
        }
        self.groups[group].1 = members;
        true
    }

    /// Writes `{v3.fusion = "<kind>#<n>"}` on every member (n unique within the entry).
    pub fn tag(&self, context: &Context, graph: &OpGraph) {
        for (n, (kind, members)) in self.groups.iter().enumerate() {
            let tag = StringAttribute::new(context, &format!("{kind}#{n}"));
            for &m in members {
                let name = melior::StringRef::new(FUSION_ATTR);
                // SAFETY: setting a discardable attribute on a live op of the entry block.
                unsafe { mlirOperationSetAttributeByName(graph.ops[m].raw, name.to_raw(), tag.to_raw()) };
            }
        }
    }
}
