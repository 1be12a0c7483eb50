//! Stage `plan`: the launch list of every entry of a `fused` module, with buffers bound by name and
//! intermediates placed in one arena by liveness (`v3c_runtime::plan`, which the backends execute).
//!
//! Dynamic dims are planned for the largest sizes ([`PlanSizes`]): `rows` (tokens of a prefill,
//! sequences of a decode) and `context` (tokens already cached before a prefill, cache rows of a
//! decode); every buffer's dims are affine in them, kernel result dims following from their
//! inputs' by [`crate::shapes`], so the plan runs any smaller sizes too.

use std::collections::{BTreeMap, HashMap};

use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::{Module, RegionLike, ValueLike};
use v3c_runtime::plan::{
    element_bytes, place, shape_at, Buffer, BufferKind, Dim, EntryPlan, Launch, Plan, Sizes, PAGE_POOL,
    PLAN_FORMAT_VERSION,
};

use crate::shapes::{kernel_in_place, kernel_row_wise, kernel_shape_rules, DimRule};
use crate::verify::Shape;

/// The sizes dynamic dims are planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSizes {
    pub rows: usize,
    pub context: usize,
    /// Sequences of a decode entry (None: `rows`), so that prompts are prefilled in long chunks
    /// without planning a decode of as many sequences.
    pub batch: Option<usize>,
}

impl PlanSizes {
    /// `rows` for every entry, `context` cached.
    pub fn new(rows: usize, context: usize) -> PlanSizes {
        PlanSizes { rows, context, batch: None }
    }

    /// `rows 64 / context 4096`, `rows 1024 (decode: 64 sequences) / context 4096`.
    pub fn describe(&self) -> String {
        match self.batch {
            Some(b) if b != self.rows => {
                format!("rows {} (decode: {b} sequences) / context {}", self.rows, self.context)
            }
            _ => format!("rows {} / context {}", self.rows, self.context),
        }
    }

    /// The sizes entry `entry` is planned for.
    pub fn of_entry(&self, entry: &str) -> Sizes {
        let rows = if entry == "decode" { self.batch.unwrap_or(self.rows) } else { self.rows };
        Sizes::new(rows, self.context)
    }
}

/// Dims of an entry input from its name and type.
fn input_dims(name: &str, ty: &Shape) -> Vec<Dim> {
    let cache = name.starts_with("kv_cache.");
    ty.dims
        .iter()
        .enumerate()
        .map(|(d, n)| match n {
            Some(n) => Dim::fixed(*n),
            // Prefill caches [P, C]: P tokens already cached. Decode caches [B, S, C].
            None if cache && ty.dims.len() == 2 => Dim::CONTEXT,
            None if cache && d == 1 => Dim::CONTEXT,
            None => Dim::ROWS,
        })
        .collect()
}

/// Plans every entry function of `module` (stage `fused`).
pub fn build_plan(module: &Module, sizes: PlanSizes) -> Result<Plan, String> {
    let planned = sizes;
    let mut rules: HashMap<String, Vec<Vec<DimRule>>> = HashMap::new();
    let mut in_place: HashMap<String, Vec<Option<usize>>> = HashMap::new();
    let mut row_wise: HashMap<String, bool> = HashMap::new();
    let mut entries = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        let name = f.attribute("sym_name").map(crate::mlir::attribute_text).unwrap_or_default();
        if crate::transforms::form_kernels::is_kernel(&f) {
            rules.insert(name.clone(), kernel_shape_rules(&f)?);
            in_place.insert(name.clone(), kernel_in_place(&f));
            row_wise.insert(name, kernel_row_wise(&f));
            continue;
        }
        let sizes = planned.of_entry(&name);
        let block = f.region(0).ok().and_then(|r| r.first_block()).ok_or("entry without a body")?;
        let attrs = f.attribute("arg_attrs").map(|a| a.to_string()).unwrap_or_default();
        let arg_attrs: Vec<&str> = attrs.split("}, {").collect();
        let quoted = |text: &str, key: &str| {
            text.split(&format!("{key} = \"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_string)
        };
        let mut buffers: Vec<Buffer> = Vec::new();
        let mut by_value: HashMap<usize, usize> = HashMap::new();
        let mut bounds = BTreeMap::new();
        let new_buffer =
            |buffers: &mut Vec<Buffer>, kind: BufferKind, dims: Vec<Dim>, dtype: &str| -> Result<usize, String> {
                let per = element_bytes(dtype).ok_or_else(|| format!("no size for element type {dtype}"))?;
                let id = buffers.len();
                let shape = shape_at(&dims, sizes);
                let bytes = shape.iter().try_fold(per, |b, &n| b.checked_mul(n as u64)).ok_or_else(|| {
                    format!("{name}: a buffer of {shape:?} {dtype} at {sizes:?} has more bytes than 64 bits count")
                })?;
                buffers.push(Buffer { id, kind, dims, shape, dtype: dtype.to_string(), bytes });
                Ok(id)
            };
        for i in 0..block.argument_count() {
            let arg = block.argument(i).map_err(|e| e.to_string())?;
            let ty = Shape::of(arg.r#type()).ok_or("entry argument is not a tensor")?;
            let attr = arg_attrs.get(i).copied().unwrap_or("");
            let (kind, dims) = match (quoted(attr, v3c_dialects::INPUT_ATTR), quoted(attr, v3c_dialects::PARAM_ATTR)) {
                (Some(input), _) => {
                    let dims = input_dims(&input, &ty);
                    bounds.insert(input.clone(), shape_at(&dims, sizes));
                    (BufferKind::Input { name: input }, dims)
                }
                (None, Some(param)) => {
                    (BufferKind::Weight { name: param }, ty.dims.iter().map(|d| Dim::fixed(d.unwrap_or(0))).collect())
                }
                _ => return Err(format!("{name}: argument {i} is neither an input nor a parameter")),
            };
            let id = new_buffer(&mut buffers, kind, dims, &ty.element)?;
            by_value.insert(arg.to_raw().ptr as usize, id);
        }
        let mut launches = Vec::new();
        let mut outputs = Vec::new();
        let mut call = block.first_operation();
        while let Some(c) = call {
            call = c.next_in_block();
            let operands: Vec<usize> = (0..c.operand_count())
                .map(|k| c.operand(k).map(|v| by_value[&(v.to_raw().ptr as usize)]).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?;
            let Ok(callee) = c.attribute("callee") else {
                let res = f.attribute("res_attrs").map(|a| a.to_string()).unwrap_or_default();
                for (k, attr) in res.split("}, {").enumerate() {
                    let out = quoted(attr, v3c_dialects::OUTPUT_ATTR).unwrap_or_default();
                    outputs.push((out, operands[k]));
                }
                break;
            };
            let kernel = callee.to_string().trim_start_matches('@').to_string();
            let input_dims: Vec<Vec<Dim>> = operands.iter().map(|&b| buffers[b].dims.clone()).collect();
            let kernel_rules = rules.get(&kernel).ok_or_else(|| format!("{name}: kernel {kernel} unknown"))?;
            let mut results = Vec::new();
            let updates = in_place.get(&kernel).cloned().unwrap_or_default();
            for (k, rule) in kernel_rules.iter().enumerate() {
                // An in-place update (cache write) is the updated input's own buffer.
                if let Some(j) = updates.get(k).copied().flatten() {
                    let id = operands[j];
                    by_value.insert(c.result(k).map_err(|e| e.to_string())?.to_raw().ptr as usize, id);
                    results.push(id);
                    continue;
                }
                let dims = rule
                    .iter()
                    .map(|r| r.eval_dims(&input_dims))
                    .collect::<Option<Vec<Dim>>>()
                    .ok_or_else(|| format!("{kernel}: result {k} shape"))?;
                let ty = Shape::of(c.result(k).map_err(|e| e.to_string())?.r#type()).ok_or("result is not a tensor")?;
                let id = new_buffer(&mut buffers, BufferKind::Arena { offset: 0 }, dims, &ty.element)?;
                by_value.insert(c.result(k).map_err(|e| e.to_string())?.to_raw().ptr as usize, id);
                results.push(id);
            }
            let row_wise = row_wise.get(&kernel).copied().unwrap_or(false);
            launches.push(Launch { row_wise, ..Launch::new(kernel, operands, results) });
        }
        let mut entry = EntryPlan { name, sizes, bounds, buffers, launches, outputs, arena_bytes: 0 };
        place_arena(&mut entry);
        entries.push(entry);
    }
    Ok(Plan { format_version: PLAN_FORMAT_VERSION, entries })
}

/// Places `entry`'s arena buffers by liveness: a buffer lives from its launch to its last reader
/// (outputs to the end).
fn place_arena(entry: &mut EntryPlan) {
    let EntryPlan { buffers, launches, outputs, .. } = entry;
    let end = launches.len();
    let mut range: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (i, l) in launches.iter().enumerate() {
        // Results updated in place stay the input buffers they are.
        for &r in l.results.iter().filter(|&&r| matches!(buffers[r].kind, BufferKind::Arena { .. })) {
            range.insert(r, (i, i));
        }
        for a in &l.args {
            if let Some(r) = range.get_mut(a) {
                r.1 = i;
            }
        }
    }
    for (_, b) in outputs.iter() {
        if let Some(r) = range.get_mut(b) {
            r.1 = end;
        }
    }
    let ids: Vec<usize> = range.keys().copied().collect();
    let spans: Vec<(usize, usize, u64)> = ids.iter().map(|id| (range[id].0, range[id].1, buffers[*id].bytes)).collect();
    let (offsets, arena_bytes) = place(&spans);
    for (id, offset) in ids.iter().zip(offsets) {
        buffers[*id].kind = BufferKind::Arena { offset };
    }
    entry.arena_bytes = arena_bytes;
}

/// Makes entry `entry`'s caches (`kv_cache.* [B, S, C]`, updated in place) one pool of `page`-row
/// pages each, `[pages, page, C]`, addressed through a block table: a new input
/// ([`v3c_runtime::plan::PAGE_POOL`], `[B, S / page]` i32) passed as the last argument of every
/// launch of `kernels` (the latent row writing the new rows through it, the attention reading
/// through it). The pool is planned for every sequence at the planned context (`B S / page`
/// pages); sessions give the pages they use.
pub fn page_decode_caches(plan: &mut Plan, entry: &str, kernels: &[String], page: usize) -> Result<(), String> {
    let e =
        plan.entries.iter_mut().find(|e| e.name == entry).ok_or_else(|| format!("the plan has no {entry} entry"))?;
    if e.sizes.context % page != 0 {
        return Err(format!("entry {entry}: caches of {} rows are not whole pages of {page}", e.sizes.context));
    }
    e.sizes.pages = e.sizes.rows * e.sizes.context / page;
    let sizes = e.sizes;
    let mut caches = 0;
    for b in e.buffers.iter_mut() {
        let BufferKind::Input { name } = &b.kind else { continue };
        if !name.starts_with("kv_cache.") {
            continue;
        }
        let name = name.clone();
        let [rows, context, width] = b.dims[..] else {
            return Err(format!("entry {entry}: cache {name} of dims {:?} (want [sequences, rows, width])", b.dims));
        };
        if rows != Dim::ROWS || context != Dim::CONTEXT || width.rows + width.context + width.pages != 0 {
            return Err(format!("entry {entry}: cache {name} of dims {:?}", b.dims));
        }
        b.dims = vec![Dim::PAGES, Dim::fixed(page), width];
        b.shape = shape_at(&b.dims, sizes);
        b.bytes = v3c_runtime::plan::tensor_bytes(&b.shape, &b.dtype)
            .ok_or_else(|| format!("cache {name} of element type {}", b.dtype))?;
        caches += 1;
    }
    if caches == 0 {
        return Err(format!("entry {entry} has no caches"));
    }
    let id = e.buffers.len();
    let dims = vec![Dim::ROWS, Dim { div: page, ..Dim::CONTEXT }];
    let shape = shape_at(&dims, sizes);
    let bytes = shape.iter().product::<usize>() as u64 * 4;
    e.buffers.push(Buffer {
        id,
        kind: BufferKind::Input { name: PAGE_POOL.into() },
        dims,
        shape,
        dtype: "i32".into(),
        bytes,
    });
    e.bounds.insert(PAGE_POOL.into(), e.buffers[id].shape.clone());
    let bounds: Vec<(String, Vec<usize>)> =
        e.bounds.keys().filter_map(|n| e.input(n).map(|b| (n.clone(), b.shape.clone()))).collect();
    e.bounds.extend(bounds);
    let mut taken = 0;
    for l in e.launches.iter_mut().filter(|l| kernels.contains(&l.kernel)) {
        l.args.push(id);
        taken += 1;
    }
    if taken == 0 {
        return Err(format!("entry {entry}: no launch of {} takes the block table", kernels.join(", ")));
    }
    Ok(())
}

/// Makes entry `entry`'s caches (`kv_cache.*` inputs and outputs) buffers of `element` (the
/// sm_90a lowering's bf16 caches), its arena placed again for their bytes.
pub fn set_cache_element(plan: &mut Plan, entry: &str, element: &str) -> Result<(), String> {
    let e =
        plan.entries.iter_mut().find(|e| e.name == entry).ok_or_else(|| format!("the plan has no {entry} entry"))?;
    let mut ids: Vec<usize> = e.outputs.iter().filter(|(n, _)| n.starts_with("kv_cache.")).map(|(_, id)| *id).collect();
    ids.extend(e.buffers.iter().filter_map(|b| match &b.kind {
        BufferKind::Input { name } if name.starts_with("kv_cache.") => Some(b.id),
        _ => None,
    }));
    if ids.is_empty() {
        return Err(format!("entry {entry} has no caches"));
    }
    for id in ids {
        let b = &mut e.buffers[id];
        b.bytes = v3c_runtime::plan::tensor_bytes(&b.shape, element)
            .ok_or_else(|| format!("caches {:?} of element type {element}", b.shape))?;
        b.dtype = element.to_string();
    }
    place_arena(e);
    Ok(())
}
