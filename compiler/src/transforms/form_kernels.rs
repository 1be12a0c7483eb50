//! `form-kernels`: every `v3` op of an entry point lands in exactly one kernel, a private
//! `func.func` tagged `{v3.kernel = "<root op>"}` that the entry calls (`func.call` = one launch).
//! Kernels with identical bodies (same ops, attributes and types) are one function called many
//! times: the 58 MoE layers of DeepSeek-V3 share their kernels.
//!
//! Level in: entry functions of the `v3` stage (and of the fusion passes, which pre-group ops).
//! Level out: entry functions made only of `func.call`s to kernel functions, plus those functions.
//! Grouping rule: a kernel has one root op; view ops (`reshape`, `split`) whose operand comes from a
//! kernel join that kernel (they move no data). Every other op is the root of its own kernel until
//! a fusion pass (MLA projections, MoE, fp8 epilogues) groups it with others.
//! Invariants: groups are convex (no value leaves a kernel and comes back into it), so the call can
//! stand where the group's last op stood; the pass never changes what the entry computes.
//!
//! Not handled here: choosing tile configurations or lowering the kernels (conversions do that).

use std::collections::{BTreeMap, HashMap, HashSet};

use melior::dialect::func;
use melior::ir::attribute::{FlatSymbolRefAttribute, StringAttribute, TypeAttribute};
use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::r#type::FunctionType;
use melior::ir::{Block, Identifier, Location, Operation, Region, RegionLike, Type, Value, ValueLike};
use melior::Context;

use super::op_graph::FUSION_ATTR;
use mlir_sys::{
    mlirOpOperandGetNextUse, mlirOpOperandGetOwner, mlirOpOperandIsNull, mlirOpResultGetOwner, mlirOperationClone,
    mlirOperationDestroy, mlirOperationGetNumOperands, mlirOperationGetNumResults, mlirOperationGetOperand,
    mlirOperationGetResult, mlirOperationRemoveFromParent, mlirOperationSetOperand, mlirValueGetFirstUse,
    mlirValueIsAOpResult, mlirValueReplaceAllUsesOfWith, MlirOperation, MlirValue,
};

/// Why kernels could not be formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("form-kernels: {0}")]
pub struct FormKernelsError(pub String);

/// Op names that only re-describe their operand (no data movement): they join their producer's kernel.
fn is_view(name: &str) -> bool {
    name == v3c_dialects::ops::qualified("reshape") || name == v3c_dialects::ops::qualified("split")
}

fn op_name(op: &OperationRef) -> String {
    op.name().as_string_ref().as_str().unwrap_or_default().to_string()
}

fn key(op: MlirOperation) -> usize {
    op.ptr as usize
}

fn value_key(v: MlirValue) -> usize {
    v.ptr as usize
}

/// The op that defines `v`, if it is an op result.
pub(super) fn defining_op(v: MlirValue) -> Option<MlirOperation> {
    // SAFETY: `v` is a live value of the module being transformed.
    unsafe { mlirValueIsAOpResult(v).then(|| mlirOpResultGetOwner(v)) }
}

pub(super) fn operands(op: MlirOperation) -> Vec<MlirValue> {
    // SAFETY: `op` is a live operation; indices are in range.
    unsafe { (0..mlirOperationGetNumOperands(op)).map(|i| mlirOperationGetOperand(op, i)).collect() }
}

pub(super) fn results(op: MlirOperation) -> Vec<MlirValue> {
    // SAFETY: as above.
    unsafe { (0..mlirOperationGetNumResults(op)).map(|i| mlirOperationGetResult(op, i)).collect() }
}

pub(super) fn users(v: MlirValue) -> Vec<MlirOperation> {
    let mut out = Vec::new();
    // SAFETY: walking the use list of a live value.
    unsafe {
        let mut u = mlirValueGetFirstUse(v);
        while !mlirOpOperandIsNull(u) {
            out.push(mlirOpOperandGetOwner(u));
            u = mlirOpOperandGetNextUse(u);
        }
    }
    out
}

/// Does `a` come before `b` in their (common) block?
fn comes_before(a: MlirOperation, b: MlirOperation) -> bool {
    // SAFETY: both ops are live and in the same block.
    unsafe { mlir_sys::mlirOperationIsBeforeInBlock(a, b) }
}

/// Is `func` a kernel function (already formed), rather than an entry point?
pub fn is_kernel(func: &OperationRef) -> bool {
    func.attribute(v3c_dialects::KERNEL_ATTR).is_ok()
}

/// Forms kernels in every entry function of `module_op` (a `builtin.module`).
pub fn form_kernels(context: &Context, module_op: &OperationRef) -> Result<(), FormKernelsError> {
    let body = module_op
        .region(0)
        .ok()
        .and_then(|r| r.first_block())
        .ok_or_else(|| FormKernelsError("expected a module with a body".into()))?;
    let mut entries = Vec::new();
    let mut op = body.first_operation();
    while let Some(o) = op {
        if o.region(0).is_ok() && !is_kernel(&o) {
            entries.push(o.to_raw());
        }
        op = o.next_in_block();
    }
    let mut kernels = Kernels { by_body: HashMap::new(), counts: BTreeMap::new() };
    for entry in entries {
        // SAFETY: `entry` is a live op of `module_op`.
        let entry = unsafe { OperationRef::from_raw(entry) };
        form_in_entry(context, &body, &entry, &mut kernels)?;
    }
    Ok(())
}

/// Kernel functions created so far: printed body (with a neutral name) -> symbol.
struct Kernels {
    by_body: HashMap<String, String>,
    counts: BTreeMap<String, usize>,
}

fn form_in_entry(
    context: &Context,
    module_body: &melior::ir::BlockRef,
    entry: &OperationRef,
    kernels: &mut Kernels,
) -> Result<(), FormKernelsError> {
    let block = entry
        .region(0)
        .ok()
        .and_then(|r| r.first_block())
        .ok_or_else(|| FormKernelsError("entry function without a body".into()))?;
    // Group v3 ops: fusion groups tagged by earlier passes, else a root and the views that hang off it.
    let mut groups: Vec<Vec<MlirOperation>> = Vec::new();
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    let mut by_tag: HashMap<String, usize> = HashMap::new();
    let mut order = Order::default();
    let mut op = block.first_operation();
    while let Some(o) = op {
        order.0.insert(key(o.to_raw()), order.0.len());
        let name = op_name(&o);
        if v3c_dialects::is_v3_op(&name) {
            let raw = o.to_raw();
            let tag = o.attribute(FUSION_ATTR).ok().map(crate::mlir::attribute_text);
            let producer_group =
                operands(raw).first().and_then(|v| defining_op(*v)).and_then(|p| group_of.get(&key(p)).copied());
            let g = match (tag, producer_group) {
                (Some(tag), _) => *by_tag.entry(tag).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                }),
                (None, Some(g)) if is_view(&name) => g,
                _ => {
                    groups.push(Vec::new());
                    groups.len() - 1
                }
            };
            groups[g].push(raw);
            group_of.insert(key(raw), g);
        }
        op = o.next_in_block();
    }
    for members in &groups {
        outline(context, module_body, entry, members, kernels, &mut order)?;
    }
    Ok(())
}

/// The entry block's ops in order, kept as launches replace groups: MLIR's own order
/// (`mlirOperationIsBeforeInBlock`) is recomputed over the whole block after every insertion, which
/// made forming kernels quadratic in the ops of an entry.
#[derive(Default)]
struct Order(HashMap<usize, usize>);

impl Order {
    /// Whether `a` comes before `b` in the block.
    fn before(&self, a: MlirOperation, b: MlirOperation) -> bool {
        match (self.0.get(&key(a)), self.0.get(&key(b))) {
            (Some(a), Some(b)) => a < b,
            _ => comes_before(a, b),
        }
    }

    /// `new` was inserted right before `anchor`, which is about to go: it takes its place.
    fn replace(&mut self, anchor: MlirOperation, new: MlirOperation) {
        if let Some(at) = self.0.get(&key(anchor)).copied() {
            self.0.insert(key(new), at);
        }
    }
}

fn outline(
    context: &Context,
    module_body: &melior::ir::BlockRef,
    entry: &OperationRef,
    members: &[MlirOperation],
    kernels: &mut Kernels,
    order: &mut Order,
) -> Result<(), FormKernelsError> {
    let inside: HashSet<usize> = members.iter().map(|m| key(*m)).collect();
    let mut inputs: Vec<MlirValue> = Vec::new();
    let mut seen: HashSet<usize> = HashSet::new();
    for &m in members {
        for v in operands(m) {
            let internal = defining_op(v).is_some_and(|d| inside.contains(&key(d)));
            if !internal && seen.insert(value_key(v)) {
                inputs.push(v);
            }
        }
    }
    let outputs: Vec<MlirValue> = members
        .iter()
        .flat_map(|&m| results(m))
        .filter(|&v| users(v).iter().any(|u| !inside.contains(&key(*u))))
        .collect();
    // SAFETY: wrapping live values of the entry function.
    let wrap = |v: MlirValue| unsafe { Value::from_raw(v) };
    let input_types: Vec<Type> = inputs.iter().map(|&v| wrap(v).r#type()).collect();
    let output_types: Vec<Type> = outputs.iter().map(|&v| wrap(v).r#type()).collect();
    // SAFETY: `members[0]` is live.
    let root = unsafe { OperationRef::from_raw(members[0]) };
    let root_name = op_name(&root);
    // A fusion group is named by its kind (`mla_latent#3` -> `mla_latent`), a single op by its name.
    let kind = match root.attribute(FUSION_ATTR) {
        Ok(tag) => crate::mlir::attribute_text(tag).split('#').next().unwrap_or_default().to_string(),
        Err(_) => root_name.trim_start_matches(v3c_dialects::DIALECT).trim_start_matches('.').to_string(),
    };
    let location = Location::unknown(context);

    // The kernel body: clones of the members, operands remapped to block arguments / clones.
    let kernel_block = Block::new(&input_types.iter().map(|t| (*t, location)).collect::<Vec<_>>());
    let mut mapped: HashMap<usize, MlirValue> = HashMap::new();
    for (i, &v) in inputs.iter().enumerate() {
        let arg: Value = kernel_block.argument(i).map_err(|e| FormKernelsError(e.to_string()))?.into();
        mapped.insert(value_key(v), arg.to_raw());
    }
    for &m in members {
        // SAFETY: cloning a live op gives an owned, unattached op; its operands are then pointed at
        // values of the kernel block before it is inserted.
        let clone = unsafe { mlirOperationClone(m) };
        let tag = melior::StringRef::new(FUSION_ATTR);
        // SAFETY: removing a discardable attribute from the owned clone (absent is fine).
        unsafe { mlir_sys::mlirOperationRemoveAttributeByName(clone, tag.to_raw()) };
        for (i, v) in operands(m).iter().enumerate() {
            let new = mapped
                .get(&value_key(*v))
                .copied()
                .ok_or_else(|| FormKernelsError(format!("{root_name}: operand {i} of a member is defined after it")))?;
            unsafe { mlirOperationSetOperand(clone, i as isize, new) };
        }
        let clone = kernel_block.append_operation(unsafe { Operation::from_raw(clone) });
        for (old, new) in results(m).into_iter().zip(results(clone.to_raw())) {
            mapped.insert(value_key(old), new);
        }
    }
    let returned: Vec<Value> = outputs.iter().map(|v| wrap(mapped[&value_key(*v)])).collect();
    kernel_block.append_operation(func::r#return(&returned, location));
    drop(returned);

    let count = kernels.counts.get(&kind).copied().unwrap_or(0);
    let candidate = format!("{kind}_{count}");
    let region = Region::new();
    region.append_block(kernel_block);
    let function = func::func(
        context,
        StringAttribute::new(context, &candidate),
        TypeAttribute::new(FunctionType::new(context, &input_types, &output_types).into()),
        region,
        &[
            (Identifier::new(context, "sym_visibility"), StringAttribute::new(context, "private").into()),
            (Identifier::new(context, v3c_dialects::KERNEL_ATTR), StringAttribute::new(context, &kind).into()),
        ],
        location,
    );
    let body_key = function.to_string().replacen(&format!("@{candidate}("), "@kernel(", 1);
    let symbol = match kernels.by_body.get(&body_key) {
        Some(existing) => existing.clone(),
        None => {
            module_body.insert_operation_before(*entry, function);
            kernels.counts.insert(kind, count + 1);
            kernels.by_body.insert(body_key, candidate.clone());
            candidate
        }
    };

    // The launch, where the group's last op stood; then the group goes.
    let call = func::call(
        context,
        FlatSymbolRefAttribute::new(context, &symbol),
        &inputs.iter().map(|&v| wrap(v)).collect::<Vec<_>>(),
        &output_types,
        location,
    );
    // Where the launch goes: before the first member when everything the group reads exists there,
    // else where the last member stood (then nothing outside may read the group's results earlier).
    let first = members[0];
    let defined_before_first = |v: MlirValue| match defining_op(v) {
        None => true,
        Some(d) => inside.contains(&key(d)) || order.before(d, first),
    };
    let anchor = if inputs.iter().all(|&v| defined_before_first(v)) {
        first
    } else {
        *members.last().expect("groups are never empty")
    };
    let parent =
        entry.region(0).ok().and_then(|r| r.first_block()).ok_or_else(|| FormKernelsError("no body".into()))?;
    // SAFETY: `anchor` is a live op of `parent`.
    let call = parent.insert_operation_before(unsafe { OperationRef::from_raw(anchor) }, call);
    order.replace(anchor, call.to_raw());
    for (i, &old) in outputs.iter().enumerate() {
        let new = call.result(i).map_err(|e| FormKernelsError(e.to_string()))?;
        // SAFETY: both values are live; every use of `old` outside the group moves to the call.
        unsafe { mlirValueReplaceAllUsesOfWith(old, new.to_raw()) };
    }
    for &m in members.iter().rev() {
        // Its address may be another op's next.
        order.0.remove(&key(m));
        // SAFETY: the member's results have no users left (replaced above, or used only by later
        // members already destroyed); it is detached, then destroyed.
        unsafe {
            mlirOperationRemoveFromParent(m);
            mlirOperationDestroy(m);
        }
    }
    Ok(())
}

/// Launch counts of one entry point after `form-kernels`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EntryLaunches {
    pub entry: String,
    /// All `func.call`s of the entry.
    pub launches: usize,
    /// Launches per decoder layer (by the weights a launch reads, or its producers' layer).
    pub per_layer: BTreeMap<usize, usize>,
    /// Launches outside any layer (embedding, final norm, head).
    pub outside_layers: usize,
}

/// Counts launches per entry and per layer, and the distinct kernel functions.
pub fn launch_report(module_op: &OperationRef) -> (Vec<EntryLaunches>, usize) {
    let mut reports = Vec::new();
    let mut kernels = 0;
    let Some(body) = module_op.region(0).ok().and_then(|r| r.first_block()) else { return (reports, 0) };
    let mut op = body.first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if is_kernel(&f) {
            kernels += 1;
            continue;
        }
        let Some(block) = f.region(0).ok().and_then(|r| r.first_block()) else { continue };
        let names = f.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
        // Layer of each argument, from its `v3.param` name.
        let arg_attrs: Vec<String> = match f.attribute("arg_attrs") {
            Ok(attrs) => attrs.to_string().split("}, {").map(str::to_string).collect(),
            Err(_) => Vec::new(),
        };
        let arg_layers: Vec<Option<usize>> = arg_attrs.iter().map(|a| layer_of_param(a)).collect();
        let arg_is_param: Vec<bool> = arg_attrs.iter().map(|a| a.contains(v3c_dialects::PARAM_ATTR)).collect();
        let mut value_layer: HashMap<usize, usize> = HashMap::new();
        let mut report = EntryLaunches { entry: names, ..Default::default() };
        let mut c = block.first_operation();
        while let Some(call) = c {
            c = call.next_in_block();
            if call.attribute("callee").is_err() {
                continue;
            }
            report.launches += 1;
            let raw = call.to_raw();
            // A launch belongs to the layer of the weights it reads; one that reads no weight (an add,
            // a concat) to the layer of what it consumes; one reading only global weights to none.
            let (mut param_layer, mut reads_param, mut producer_layer) = (None, false, None);
            for v in operands(raw) {
                // SAFETY: `v` is a live operand value.
                if unsafe { mlir_sys::mlirValueIsABlockArgument(v) } {
                    let n = unsafe { mlir_sys::mlirBlockArgumentGetArgNumber(v) } as usize;
                    if arg_is_param.get(n).copied().unwrap_or(false) {
                        reads_param = true;
                        param_layer = param_layer.max(arg_layers.get(n).copied().flatten());
                    }
                } else {
                    producer_layer = producer_layer.max(value_layer.get(&value_key(v)).copied());
                }
            }
            let layer = if reads_param { param_layer } else { producer_layer };
            match layer {
                Some(l) => {
                    *report.per_layer.entry(l).or_insert(0) += 1;
                    for r in results(raw) {
                        value_layer.insert(value_key(r), l);
                    }
                }
                None => report.outside_layers += 1,
            }
        }
        reports.push(report);
    }
    (reports, kernels)
}

impl std::fmt::Display for EntryLaunches {
    /// `decode: 1834 launches; layers 0..3: 27 each; layers 3..62: 31 each; 3 outside layers`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} launches", self.entry, self.launches)?;
        // Runs of consecutive layers with the same count.
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (&layer, &n) in &self.per_layer {
            match runs.last_mut() {
                Some((_, end, count)) if *end == layer && *count == n => *end = layer + 1,
                _ => runs.push((layer, layer + 1, n)),
            }
        }
        for (start, end, n) in runs {
            if end == start + 1 {
                write!(f, "; layer {start}: {n}")?;
            } else {
                write!(f, "; layers {start}..{end}: {n} each")?;
            }
        }
        write!(f, "; {} outside layers", self.outside_layers)
    }
}

/// `{v3.param = "model.layers.12.mlp..."}` -> 12.
fn layer_of_param(attr_text: &str) -> Option<usize> {
    let name = attr_text.split(&format!("{} = \"", v3c_dialects::PARAM_ATTR)).nth(1)?;
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_come_from_parameter_names() {
        assert_eq!(layer_of_param("[{v3.param = \"model.layers.12.mlp.gate.weight\"}"), Some(12));
        assert_eq!(layer_of_param("{v3.param = \"model.norm.weight\"}"), None);
        assert_eq!(layer_of_param("{v3.input = \"tokens\"}"), None);
    }
}
