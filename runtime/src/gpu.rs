//! Running a GPU artifact, device-independent part: the plan's fused-kernel launches expanded
//! through `lowering.json` into template kernel launches (parameters, grids, tensor maps) and
//! device copies, over addresses the executor ([`crate::cuda`]) allocated. Nothing here touches a
//! device, so the whole expansion is checked on machines without one (every launch's parameters
//! against its kernel's PTX, tensor maps against TMA's rules, grids against the problem).
//!
//! Memory an entry needs beyond the plan's arena and the checkpoint's weights:
//! - prepared weights ([`PreparedWeight`]): a dense GEMM over several weights reads them
//!   concatenated along N (their 128-row scale blocks too); a grouped GEMM reads the experts'
//!   weights stacked per group (`crate::prepare::grouped_b`). Made once at load.
//! - RoPE cos/sin tables, one per distinct table spec, rows for every position the plan reaches.
//! - a temporaries region: the fused kernel being run lays its temporaries out there (fused kernels
//!   run one after the other on one stream, so they share it).
//! - split-K scratch: one workspace and one counter array shared by the split-K GEMMs (run in
//!   order; each leaves its counters zero).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use crate::abi::{element_name, memref, memref_into, Buf, GemmOperands, KernelAbi, KernelLaunch, SplitScratch};
use crate::artifact::Artifact;
use crate::host::{HostBuffer, HostData};
use crate::lowering::{Blocks, FusedLowering, LaunchSpec, OperandSpec, Regime, RopeTableSpec};
use crate::plan::{shape_at, BufferKind, EntryPlan, Sizes, ARENA_ALIGN};
use crate::prepare::Stacked;

fn align(bytes: usize) -> usize {
    bytes.div_ceil(ARENA_ALIGN as usize) * ARENA_ALIGN as usize
}

fn element_bytes(element: &str) -> Result<usize, String> {
    crate::plan::element_bytes(element).map(|b| b as usize).ok_or_else(|| format!("element type {element}"))
}

/// A weight re-laid out at load for the kernels that read it (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedWeight {
    /// The name it is bound under: the source weights' names joined (`a+b`, `grouped:a+b+..`).
    pub key: String,
    pub kind: PreparedKind,
    /// The prepared B: `[rows, k]` of `element`, and its scales `[rows / 128 (ragged up), k / 128]`.
    pub rows: usize,
    pub k: usize,
    pub element: String,
    pub scaled: bool,
}

impl PreparedWeight {
    /// The weights it is made from (and their scales).
    pub fn sources(&self) -> Vec<String> {
        match &self.kind {
            PreparedKind::Concat(parts) => {
                parts.iter().flat_map(|(w, s)| std::iter::once(w.clone()).chain(s.clone())).collect()
            }
            PreparedKind::Grouped { weights, .. } => weights
                .iter()
                .flat_map(|w| {
                    [Some(w.routed.clone()), w.routed_scale.clone(), w.shared.clone(), w.shared_scale.clone()]
                        .into_iter()
                        .flatten()
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PreparedKind {
    /// Weights (and their scales) concatenated along N, in order.
    Concat(Vec<(String, Option<String>)>),
    /// Grouped per expert: the grouped GEMM's spec with its weights by name.
    Grouped { spec: crate::lowering::GroupedSpec, weights: Vec<GroupedNames> },
}

/// One weight of a grouped GEMM, by checkpoint name (routed experts stacked, shared ones).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedNames {
    pub routed: String,
    pub routed_scale: Option<String>,
    pub shared: Option<String>,
    pub shared_scale: Option<String>,
    pub rows: usize,
}

/// The device addresses of everything an entry's launches touch.
#[derive(Debug, Clone, Default)]
pub struct Bindings {
    pub inputs: HashMap<String, u64>,
    pub weights: HashMap<String, u64>,
    /// Prepared weights by key: (B, its scales).
    pub prepared: HashMap<String, (u64, Option<u64>)>,
    /// RoPE tables by [`rope_key`].
    pub rope: HashMap<String, u64>,
    pub arena: u64,
    pub temps: u64,
    /// Bytes at `temps` ([`Expander::temp_bytes`]): a run whose temporaries need more is refused.
    pub temps_bytes: usize,
    pub workspace: u64,
    pub counters: u64,
}

/// What the executor does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Kernel(KernelLaunch),
    /// `rows` rows of `width` bytes from `src` (rows `src_pitch` apart) to `dst` (`dst_pitch`).
    Copy2D {
        src: u64,
        src_pitch: usize,
        dst: u64,
        dst_pitch: usize,
        width: usize,
        rows: usize,
    },
}

/// The key a RoPE table is bound under (its spec, exactly).
pub fn rope_key(spec: &RopeTableSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}

/// A GPU artifact's launches, ready to expand per entry and sizes.
pub struct Expander<'a> {
    pub artifact: &'a Artifact,
    abis: HashMap<&'a str, &'a KernelAbi>,
    fused: HashMap<&'a str, &'a FusedLowering>,
    /// Per fused kernel with a RoPE table, the key its table is bound under ([`rope_key`]: made
    /// once, not per launch).
    rope_keys: HashMap<&'a str, String>,
    /// Per fused kernel, which temporaries need memory in each regime
    /// ([`FusedLowering::temps_used_in`], by [`Regime::index`]: made once, not per launch).
    temps_used: HashMap<&'a str, [Vec<bool>; 2]>,
}

impl<'a> Expander<'a> {
    pub fn new(artifact: &'a Artifact) -> Result<Expander<'a>, String> {
        let dir = artifact.dir.display();
        let lowering = artifact.lowering.as_ref().ok_or_else(|| format!("{dir}: not a GPU artifact (no lowering)"))?;
        let mut abis = HashMap::new();
        for k in &artifact.manifest.kernels {
            let abi = k.abi.as_ref().ok_or_else(|| {
                format!(
                    "{dir}/manifest.json: kernel {} has no abi (an artifact from an older v3c: compile it again)",
                    k.name
                )
            })?;
            abis.insert(k.name.as_str(), abi);
        }
        let fused = lowering.kernels.iter().map(|f| (f.fused.as_str(), f)).collect();
        let rope_keys = lowering
            .kernels
            .iter()
            .filter_map(|f| Some((f.fused.as_str(), rope_key(f.rope_table.as_ref()?))))
            .collect();
        let temps_used = lowering
            .kernels
            .iter()
            .map(|f| (f.fused.as_str(), [Regime::Decode, Regime::Prefill].map(|r| f.temps_used_in(r))))
            .collect();
        Ok(Expander { artifact, abis, fused, rope_keys, temps_used })
    }

    /// Rows of every RoPE table: a position for each the plans reach.
    fn rope_rows(&self) -> usize {
        self.artifact.plan.entries.iter().map(|e| e.sizes.context + e.sizes.rows).max().unwrap_or(0).max(1)
    }

    pub fn entry(&self, name: &str) -> Result<&'a EntryPlan, String> {
        self.artifact.plan.entries.iter().find(|e| e.name == name).ok_or_else(|| format!("no entry '{name}'"))
    }

    fn lowering_of(&self, fused: &str) -> Result<&'a FusedLowering, String> {
        self.fused.get(fused).copied().ok_or_else(|| format!("fused kernel {fused} has no lowering"))
    }

    /// Which temporaries of fused kernel `fused` need memory in `regime`.
    fn temps_used(&self, fused: &str, regime: Regime) -> Result<&[bool], String> {
        let used = self.temps_used.get(fused).ok_or_else(|| format!("fused kernel {fused} has no lowering"))?;
        Ok(&used[regime.index()])
    }

    /// The launch of the artifact's argmax kernel over `logits` (`[rows, vocab]` f32) into `idx`
    /// (`rows` i32), or None when the artifact has none.
    pub fn argmax_launch(&self, logits: &Buf, idx: u64) -> Result<Option<KernelLaunch>, String> {
        let kernel = self.artifact.lowering.as_ref().and_then(|l| l.argmax.as_ref());
        self.pick_launch("argmax kernel", kernel, logits, &[(idx, "i32")])
    }

    /// The launch of the artifact's sampling kernel over `logits` (`[rows, vocab]` f32), with its
    /// draws at `[temperature, top_p, top_k, min_p, uniform]` (`rows` f32, f32, i32, f32 and f64
    /// bits as i64 each), into `idx` (`rows` i32), or None when the artifact has none.
    pub fn sample_launch(&self, logits: &Buf, draws: [u64; 5], idx: u64) -> Result<Option<KernelLaunch>, String> {
        let kernel = self.artifact.lowering.as_ref().and_then(|l| l.sample.as_ref());
        let [temperature, top_p, top_k, min_p, uniform] = draws;
        let per_row =
            [(temperature, "f32"), (top_p, "f32"), (top_k, "i32"), (min_p, "f32"), (uniform, "i64"), (idx, "i32")];
        self.pick_launch("sampling kernel", kernel, logits, &per_row)
    }

    /// The launch of the artifact's scoring kernel over `logits` (`[rows, vocab]` f32) for the
    /// tokens at `token` (`rows` i32) into `[sum, max, logit, top_id, top_logit]` (`rows` i64 —
    /// an f64's bits —, f32 and f32 each; `[rows, SCORES_TOP]` i32 and f32), or None when the
    /// artifact has none.
    pub fn scores_launch(&self, logits: &Buf, token: u64, outs: [u64; 5]) -> Result<Option<KernelLaunch>, String> {
        let kernel = self.artifact.lowering.as_ref().and_then(|l| l.scores.as_ref());
        let [sum, max, logit, top_id, top_logit] = outs;
        let top = crate::lowering::SCORES_TOP;
        let operands = [(token, "i32", 0), (sum, "i64", 0), (max, "f32", 0), (logit, "f32", 0)];
        let operands = operands.into_iter().chain([(top_id, "i32", top), (top_logit, "f32", top)]);
        self.rows_launch("scoring kernel", kernel, logits, &operands.collect::<Vec<_>>())
    }

    /// The launch of a row kernel picking tokens (`what`, `kernel` if the artifact has it) over
    /// `logits` and a vector of `rows` elements at each of `per_row` (address, element type).
    fn pick_launch(
        &self,
        what: &str,
        kernel: Option<&String>,
        logits: &Buf,
        per_row: &[(u64, &'static str)],
    ) -> Result<Option<KernelLaunch>, String> {
        let operands: Vec<_> = per_row.iter().map(|&(addr, element)| (addr, element, 0)).collect();
        self.rows_launch(what, kernel, logits, &operands)
    }

    /// The launch of a row kernel over `logits` (`what`, `kernel` if the artifact has it), a block
    /// a row, and at each of `operands` (address, element type, columns) `rows` elements (0
    /// columns) or `[rows, columns]`.
    fn rows_launch(
        &self,
        what: &str,
        kernel: Option<&String>,
        logits: &Buf,
        operands: &[(u64, &'static str, usize)],
    ) -> Result<Option<KernelLaunch>, String> {
        let Some(kernel) = kernel else { return Ok(None) };
        let Some(KernelAbi::Memrefs { ranks }) = self.abis.get(kernel.as_str()) else {
            return Err(format!("{what} {kernel}: not a row kernel"));
        };
        let want: Vec<usize> =
            std::iter::once(2).chain(operands.iter().map(|&(_, _, c)| if c == 0 { 1 } else { 2 })).collect();
        if *ranks != want {
            return Err(format!("{what} {kernel}: takes memrefs of ranks {ranks:?}, launched with {want:?}"));
        }
        let rows = logits.shape_at_rank(2)?[0];
        let operands: Vec<Buf> = operands
            .iter()
            .map(|&(addr, element, c)| {
                let shape = if c == 0 { vec![rows] } else { vec![rows, c] };
                Buf { addr, shape, element }
            })
            .collect();
        let mut params = memref(logits, 2)?;
        for b in &operands {
            params.extend(memref(b, b.shape.len())?);
        }
        Ok(Some(KernelLaunch {
            kernel: kernel.clone(),
            grid: rows,
            grid_y: 1,
            params,
            tensor_maps: Vec::new(),
            operands: std::iter::once(logits.clone()).chain(operands).collect(),
        }))
    }

    /// Every prepared weight the entries' GEMMs read, once each.
    pub fn prepared_weights(&self) -> Result<Vec<PreparedWeight>, String> {
        let mut out: Vec<PreparedWeight> = Vec::new();
        for entry in &self.artifact.plan.entries {
            for l in &entry.launches {
                let f = self.lowering_of(&l.kernel)?;
                for spec in &f.launches {
                    if let Some(p) = prepared_of(entry, l, spec)? {
                        if !out.iter().any(|o| o.key == p.key) {
                            out.push(p);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The weights some kernel reads as the checkpoint has them (row kernels' operands, a GEMM's
    /// single weight); the others only feed prepared weights and need no device memory of their own.
    pub fn direct_weights(&self) -> Result<std::collections::BTreeSet<String>, String> {
        let mut direct = std::collections::BTreeSet::new();
        for entry in &self.artifact.plan.entries {
            for l in &entry.launches {
                let f = self.lowering_of(&l.kernel)?;
                for spec in &f.launches {
                    // Operand positions that reach their kernel through a prepared weight.
                    let mut through_prepared = Vec::new();
                    if let (Some(gs), Some(_)) = (&spec.gemm, prepared_of(entry, l, spec)?) {
                        match &gs.grouped {
                            Some(gr) => {
                                for w in &gr.weights {
                                    through_prepared.extend(
                                        [Some(w.routed), w.routed_scale, w.shared, w.shared_scale]
                                            .into_iter()
                                            .flatten(),
                                    );
                                }
                            }
                            None => through_prepared
                                .extend(gs.weights.iter().flat_map(|&(w, s)| std::iter::once(w).chain(s))),
                        }
                    }
                    for (i, o) in spec.operands.iter().enumerate() {
                        let OperandSpec::Arg(a) = *o else { continue };
                        let Some(&id) = l.args.get(a) else { continue };
                        if let BufferKind::Weight { name } = &entry.buffers[id].kind {
                            if !through_prepared.contains(&i) {
                                direct.insert(name.clone());
                            }
                        }
                    }
                }
            }
        }
        Ok(direct)
    }

    /// Every RoPE table the entries read (spec, rows: every position the plans reach).
    pub fn rope_tables(&self) -> Vec<(RopeTableSpec, usize)> {
        let mut out: Vec<(RopeTableSpec, usize)> = Vec::new();
        let positions = self.rope_rows();
        for f in self.fused.values() {
            if let Some(t) = &f.rope_table {
                if !out.iter().any(|(o, _)| rope_key(o) == rope_key(t)) {
                    out.push((t.clone(), positions));
                }
            }
        }
        out.sort_by_key(|(t, _)| rope_key(t));
        out
    }

    /// Bytes of the temporaries region: the most any fused kernel lays out at the planned rows.
    pub fn temp_bytes(&self) -> Result<usize, String> {
        let mut most = 0;
        for entry in &self.artifact.plan.entries {
            for l in &entry.launches {
                most = most.max(self.temp_layout(entry, l)?.2);
            }
        }
        Ok(most)
    }

    /// Launch `l`'s temporaries laid out at its entry's planned sizes on any device (the most any
    /// run needs, [`FusedLowering::temp_layout`]): their bytes, offsets and the region they need.
    fn temp_layout(
        &self,
        entry: &EntryPlan,
        l: &crate::plan::Launch,
    ) -> Result<(Vec<usize>, Vec<usize>, usize), String> {
        let f = self.lowering_of(&l.kernel)?;
        let arg = |i: usize| -> Result<Vec<usize>, String> {
            let id = *l.args.get(i).ok_or_else(|| format!("{}: argument {i} missing", l.kernel))?;
            let b = entry.buffers.get(id).ok_or_else(|| format!("buffer {id} is not in the plan"))?;
            Ok(shape_at(&b.dims, entry.sizes))
        };
        let mut bytes = Vec::new();
        // Temporaries only the other regime's launches name take no bytes here.
        let used = self.temps_used(&l.kernel, Regime::of_entry(&entry.name))?;
        for (t, &used) in f.temps.iter().zip(used) {
            let shape = t.shape(entry.sizes.rows, &arg, 0)?;
            bytes.push(if used { align(shape.iter().product::<usize>() * element_bytes(&t.dtype)?) } else { 0 });
        }
        let (offsets, total) = f.temp_layout(&bytes);
        Ok((bytes, offsets, total))
    }

    /// The actions of entry `entry` at `sizes` over `bindings` on a device with `sms` SMs, and
    /// the split-K scratch they need (the caller provides at least that much at `bindings`).
    pub fn expand(
        &self,
        entry: &EntryPlan,
        sizes: Sizes,
        bindings: &Bindings,
        sms: usize,
    ) -> Result<(Vec<Action>, SplitScratch), String> {
        entry.check_sizes(sizes)?;
        let mut actions = Vec::new();
        let mut scratch = SplitScratch::default();
        let regime = Regime::of_entry(&entry.name);
        let decode = regime == Regime::Decode;
        // Every RoPE table has the rows of every position the plans reach (see `rope_tables`).
        let rope_rows = self.rope_rows();
        for (li, l) in entry.launches.iter().enumerate() {
            let f = self.lowering_of(&l.kernel)?;
            let at = |what: String| format!("{} launch {li} ({}): {what}", entry.name, l.kernel);
            let buffer = |id: usize| -> Result<Buf, String> {
                let b = entry.buffers.get(id).ok_or_else(|| at(format!("buffer {id} is not in the plan")))?;
                let addr = match &b.kind {
                    BufferKind::Input { name } => {
                        *bindings.inputs.get(name).ok_or_else(|| at(format!("input {name} is not bound")))?
                    }
                    // Weights that only feed prepared ones have no memory of their own (0): no
                    // kernel may be handed one (checked below).
                    BufferKind::Weight { name } => bindings.weights.get(name).copied().unwrap_or(0),
                    BufferKind::Arena { offset } => bindings.arena + offset,
                };
                // A last-row launch sees the last of the rows alone.
                let (shape, offset) = l.view(b, sizes);
                let (shape, element) = crate::plan::physical(shape, &b.dtype).map_err(at)?;
                Ok(Buf { addr: addr + offset, shape, element })
            };
            // The fused kernel's temporaries, laid out in the shared region as at the planned sizes
            // (temporaries whose launches do not overlap may share bytes).
            let (room, offsets, total) = self.temp_layout(entry, l).map_err(at)?;
            if total > bindings.temps_bytes {
                return Err(at(format!(
                    "its temporaries need {total} B at the planned sizes, the region holds {} B",
                    bindings.temps_bytes
                )));
            }
            let mut temps = Vec::new();
            let arg = |i: usize| -> Result<Vec<usize>, String> {
                Ok(buffer(*l.args.get(i).ok_or_else(|| at(format!("argument {i} missing")))?)?.shape)
            };
            let used = self.temps_used(&l.kernel, regime).map_err(at)?;
            for (i, t) in f.temps.iter().enumerate() {
                let element = element_name(&t.dtype).ok_or_else(|| at(format!("temporary {i} of {}", t.dtype)))?;
                if !used[i] {
                    // Only the other regime's launches name it: no memory, no launch here.
                    temps.push(Buf { addr: bindings.temps, shape: vec![0], element });
                    continue;
                }
                let shape = t.shape(if l.last_row { sizes.rows.min(1) } else { sizes.rows }, &arg, sms)?;
                let bytes = shape.iter().product::<usize>() * element_bytes(&t.dtype)?;
                if bytes > room[i] {
                    return Err(at(format!(
                        "temporary {i} needs {bytes} B at {sizes:?} on {sms} SMs, {} B at the planned sizes",
                        room[i]
                    )));
                }
                temps.push(Buf { addr: bindings.temps + offsets[i] as u64, shape, element });
            }
            for (si, spec) in f.launches.iter().enumerate().filter(|(_, spec)| spec.runs_in(regime)) {
                let at = |what: String| at(format!("step {si}: {what}"));
                let mut ops = Vec::new();
                for o in &spec.operands {
                    ops.push(match *o {
                        OperandSpec::Arg(i) => {
                            buffer(*l.args.get(i).ok_or_else(|| at(format!("argument {i} missing")))?)?
                        }
                        OperandSpec::Result(i) => {
                            buffer(*l.results.get(i).ok_or_else(|| at(format!("result {i} missing")))?)?
                        }
                        OperandSpec::Temp(i) => {
                            temps.get(i).cloned().ok_or_else(|| at(format!("temporary {i} missing")))?
                        }
                        OperandSpec::TempRows { temp, first, rows } => {
                            let t: &Buf = temps.get(temp).ok_or_else(|| at(format!("temporary {temp} missing")))?;
                            let (all, cols) = (t.shape[0], t.shape[1]);
                            if first + rows > all {
                                return Err(at(format!("rows {first}..{} of a temporary of {all}", first + rows)));
                            }
                            let offset = (first * cols * element_bytes(&t.element)?) as u64;
                            Buf { addr: t.addr + offset, shape: vec![rows, cols], element: t.element }
                        }
                        OperandSpec::TempRowsOf { temp, arg } => {
                            let t: &Buf = temps.get(temp).ok_or_else(|| at(format!("temporary {temp} missing")))?;
                            let x = buffer(*l.args.get(arg).ok_or_else(|| at(format!("argument {arg} missing")))?)?;
                            let rows = x.shape_at_rank(2).map_err(at)?[0];
                            if rows > t.shape[0] {
                                return Err(at(format!("{rows} rows of a temporary of {}", t.shape[0])));
                            }
                            Buf { addr: t.addr, shape: vec![rows, t.shape[1]], element: t.element }
                        }
                        OperandSpec::RopeTable => {
                            let t = f.rope_table.as_ref().ok_or_else(|| at("no RoPE table".into()))?;
                            let key =
                                self.rope_keys.get(l.kernel.as_str()).ok_or_else(|| at("no RoPE table".into()))?;
                            let addr =
                                *bindings.rope.get(key).ok_or_else(|| at("the RoPE table is not bound".into()))?;
                            Buf { addr, shape: vec![rope_rows, t.dim], element: "f32".into() }
                        }
                    });
                }
                // A GEMM picked per prefill rows: the kernel for this run's rows.
                let kernel = spec.kernel.for_run(regime, if l.last_row { sizes.rows.min(1) } else { sizes.rows });
                let abi = self.abis.get(kernel).ok_or_else(|| at(format!("kernel {kernel} is not in the manifest")))?;
                match abi {
                    KernelAbi::Memrefs { ranks } => {
                        if ranks.len() != ops.len() {
                            return Err(at(format!(
                                "{kernel} takes {} operands, the lowering gives {}",
                                ranks.len(),
                                ops.len()
                            )));
                        }
                        let mut params = Vec::with_capacity(ranks.iter().map(|r| 3 + 2 * r).sum());
                        for (b, &r) in ops.iter().zip(ranks) {
                            memref_into(&mut params, b, r).map_err(|e| at(format!("{kernel}: {e}")))?;
                        }
                        let grid = match spec.blocks {
                            Blocks::One => 1,
                            Blocks::Rows { operand, per_row, rows_per_block, decode_rows_per_block } => {
                                let b =
                                    ops.get(operand).ok_or_else(|| at(format!("rows operand {operand} missing")))?;
                                let per_block = match (decode, decode_rows_per_block) {
                                    (true, Some(n)) => n,
                                    _ => rows_per_block,
                                };
                                b.shape_at_rank(ranks[operand]).map_err(at)?[0].div_ceil(per_block.max(1)) * per_row
                            }
                            Blocks::GemmUnits | Blocks::AttentionTiles => {
                                return Err(at(format!("{kernel}: a row kernel with {:?}", spec.blocks)))
                            }
                        };
                        if let Some(i) = ops.iter().position(|b| b.addr == 0) {
                            return Err(at(format!("{kernel}: operand {i} has no memory (a weight left unbound)")));
                        }
                        if grid > 0 {
                            actions.push(Action::Kernel(KernelLaunch {
                                kernel: kernel.to_string(),
                                grid,
                                grid_y: 1,
                                params,
                                tensor_maps: Vec::new(),
                                operands: ops.clone(),
                            }));
                        }
                    }
                    KernelAbi::MlaDecode(a) => {
                        let att = spec
                            .attention
                            .ok_or_else(|| at(format!("{kernel}: an attention launch without its parameters")))?;
                        if let ([q, keys, selected, o_part, lse], true) = (&ops[..], a.selected) {
                            if q.elements() == 0 {
                                continue;
                            }
                            let l = a.launch_selected(kernel, [q, keys, selected, o_part, lse], att.heads, att.scale);
                            actions.push(Action::Kernel(l.map_err(at)?));
                            continue;
                        }
                        let [q, cache, table, seqlens, o_part, lse] = &ops[..] else {
                            return Err(at(format!(
                                "{kernel}: {} operands (q, cache, table, lengths, o, lse)",
                                ops.len()
                            )));
                        };
                        if q.elements() == 0 {
                            continue;
                        }
                        let l = a.launch(kernel, [q, cache, table, seqlens, o_part, lse], att.heads, att.scale);
                        actions.push(Action::Kernel(l.map_err(at)?));
                    }
                    KernelAbi::MlaPrefill(a) => {
                        let att = spec
                            .attention
                            .ok_or_else(|| at(format!("{kernel}: an attention launch without its parameters")))?;
                        let ops: Vec<&Buf> = ops.iter().collect();
                        if ops.first().is_some_and(|q| q.elements() == 0) {
                            continue;
                        }
                        actions.push(Action::Kernel(a.launch(kernel, &ops, att.heads, att.scale).map_err(at)?));
                    }
                    KernelAbi::Gemm(g) => {
                        let gs = spec
                            .gemm
                            .as_ref()
                            .ok_or_else(|| at(format!("{kernel}: a GEMM launch without its roles")))?;
                        let op = |i: usize| ops.get(i).ok_or_else(|| at(format!("GEMM operand {i} missing")));
                        let a = op(gs.a)?;
                        if a.elements() == 0 {
                            continue;
                        }
                        let a_scale = gs.a_scale.map(op).transpose()?;
                        // B: the one weight itself, or the prepared one.
                        let (b, b_scale) = match prepared_of(entry, l, spec).map_err(at)? {
                            None => {
                                let (w, s) = gs.weights.first().ok_or_else(|| at("a GEMM without weights".into()))?;
                                (op(*w)?.clone(), s.map(op).transpose()?.cloned())
                            }
                            Some(p) => {
                                let (addr, scale) = *bindings
                                    .prepared
                                    .get(&p.key)
                                    .ok_or_else(|| at(format!("prepared weight {} is not bound", p.key)))?;
                                let element = element_name(&p.element)
                                    .ok_or_else(|| at(format!("prepared weight {} of {}", p.key, p.element)))?;
                                let b = Buf { addr, shape: vec![p.rows, p.k], element };
                                let s = match (p.scaled, scale) {
                                    (true, Some(addr)) => Some(Buf {
                                        addr,
                                        shape: vec![p.rows.div_ceil(128), p.k.div_ceil(128)],
                                        element: "f32".into(),
                                    }),
                                    _ => None,
                                };
                                (b, s)
                            }
                        };
                        let out = ops.last().ok_or_else(|| at("a GEMM without output".into()))?;
                        let grouped = gs.grouped.as_ref();
                        let operands = GemmOperands {
                            a,
                            a2: gs.a2.map(op).transpose()?,
                            a_scale,
                            b: &b,
                            b_scale: b_scale.as_ref(),
                            out,
                            residual: gs.residual.map(op).transpose()?,
                            offsets: grouped.map(|gr| op(gr.offsets)).transpose()?,
                            perm: grouped.map(|gr| op(gr.perm)).transpose()?,
                            row_scale: grouped.and_then(|gr| gr.row_scale).map(op).transpose()?,
                            k_range: gs.k_range.map(op).transpose()?,
                            workspace: Some(bindings.workspace),
                            counters: Some(bindings.counters),
                        };
                        let used = [
                            Some(operands.a),
                            operands.a2,
                            operands.a_scale,
                            Some(operands.b),
                            operands.b_scale,
                            Some(operands.out),
                        ];
                        let more =
                            [operands.residual, operands.offsets, operands.perm, operands.row_scale, operands.k_range];
                        if used.iter().chain(&more).flatten().any(|b| b.addr == 0) {
                            return Err(at(format!("{kernel}: an operand has no memory (a weight left unbound)")));
                        }
                        // A second A the kernel would not read (or one it would miss) is a product
                        // left out: refused, not launched.
                        if gs.a2.is_some() != g.dual_a {
                            return Err(at(format!(
                                "{kernel}: the lowering binds {} second A, the kernel {}",
                                if gs.a2.is_some() { "a" } else { "no" },
                                if g.dual_a { "reads one" } else { "reads none" }
                            )));
                        }
                        let launch = g.launch(kernel, &operands, sms).map_err(at)?;
                        let p = crate::abi::GemmProblem {
                            m: if g.grouping == "gather" {
                                operands.perm.map_or(0, Buf::elements)
                            } else {
                                a.shape_at_rank(2).map_err(at)?[0]
                            },
                            n: b.shape[0] / grouped.map_or(1, |gr| gr.groups.max(1)),
                            // A's width: the weight's K, or (Wgrad) the run's tokens.
                            k: a.shape_at_rank(2).map_err(at)?[1],
                            groups: grouped.map_or(1, |gr| gr.groups),
                        };
                        let need = g.scratch(p, sms);
                        scratch.workspace_bytes = scratch.workspace_bytes.max(need.workspace_bytes);
                        scratch.counters = scratch.counters.max(need.counters);
                        actions.push(Action::Kernel(launch));
                        // Several results: column ranges of the output, copied out.
                        if !gs.results.is_empty() {
                            let o = out.shape_at_rank(2).map_err(at)?;
                            let width = element_bytes(&out.element)?;
                            for (ri, &(start, end)) in gs.results.iter().enumerate() {
                                let dst =
                                    buffer(*l.results.get(ri).ok_or_else(|| at(format!("result {ri} missing")))?)?;
                                let d = dst.shape_at_rank(2).map_err(at)?;
                                if d != [o[0], end - start] || dst.element != out.element {
                                    return Err(at(format!(
                                        "result {ri} is {d:?} {}, columns {start}..{end} of {o:?}",
                                        dst.element
                                    )));
                                }
                                actions.push(Action::Copy2D {
                                    src: out.addr + (start * width) as u64,
                                    src_pitch: o[1] * width,
                                    dst: dst.addr,
                                    dst_pitch: d[1] * width,
                                    width: d[1] * width,
                                    rows: o[0],
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok((actions, scratch))
    }
}

/// What [`Expander::check`] found: template launches checked, distinct kernels among them, and the
/// device memory the artifact needs (bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpansionCheck {
    pub launches: usize,
    /// Prefill runs checked beside the planned sizes: at each row count below which a GEMM
    /// launches another kernel ([`crate::lowering::KernelChoice::prefill_bounds`]).
    pub smaller_runs: usize,
    pub kernels: usize,
    pub weight_bytes: usize,
    pub prepared_bytes: usize,
    pub arena_bytes: usize,
    pub input_bytes: usize,
    /// The fused kernels' temporaries (the most any lays out; sized for the most attention splits).
    pub temp_bytes: usize,
    /// The kernels each entry launched (a launch of one regime only in that regime's entries).
    pub launched: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl Expander<'_> {
    /// Expands every entry — at its planned sizes and at `more` — over made-up addresses (as the
    /// executor binds them: only weights kernels read directly), and holds every kernel launch
    /// against its kernel's PTX: as many 8-byte parameters as the `.entry` declares, a non-empty
    /// grid within CUDA's limits; tensor maps are checked against TMA's rules by the expansion itself. Needs no device.
    pub fn check(&self, more: &[(&str, Sizes)]) -> Result<ExpansionCheck, String> {
        let artifact = self.artifact;
        let direct = self.direct_weights()?;
        let mut next = 0x7f00_0000_0000u64;
        let mut addr = || {
            next += 1 << 32;
            next
        };
        let mut b = Bindings::default();
        let mut report = ExpansionCheck::default();
        let mut inputs: HashMap<&str, u64> = HashMap::new();
        for e in &artifact.plan.entries {
            report.arena_bytes = report.arena_bytes.max(e.arena_bytes as usize);
            for buf in &e.buffers {
                match &buf.kind {
                    BufferKind::Input { name } => {
                        b.inputs.entry(name.clone()).or_insert_with(&mut addr);
                        let v = inputs.entry(name).or_default();
                        *v = (*v).max(buf.bytes);
                    }
                    BufferKind::Weight { name } if direct.contains(name) => {
                        if !b.weights.contains_key(name) {
                            report.weight_bytes += buf.bytes as usize;
                            b.weights.insert(name.clone(), addr());
                        }
                    }
                    BufferKind::Weight { .. } | BufferKind::Arena { .. } => {}
                }
            }
        }
        report.input_bytes = inputs
            .values()
            .try_fold(0u64, |sum, &b| sum.checked_add(b))
            .ok_or("the inputs (the caches) at the planned sizes have more bytes than 64 bits count")?
            as usize;
        report.temp_bytes = self.temp_bytes()?;
        for p in self.prepared_weights()? {
            report.prepared_bytes += p.rows * p.k * element_bytes(&p.element)?;
            if p.scaled {
                report.prepared_bytes += 4 * p.rows.div_ceil(128) * p.k.div_ceil(128);
            }
            b.prepared.insert(p.key.clone(), (addr(), Some(addr())));
        }
        for (t, _) in self.rope_tables() {
            b.rope.insert(rope_key(&t), addr());
        }
        (b.arena, b.temps, b.workspace, b.counters) = (addr(), addr(), addr(), addr());
        b.temps_bytes = report.temp_bytes;
        let mut declared: HashMap<&str, usize> = HashMap::new();
        for k in &artifact.manifest.kernels {
            let path = artifact.path(&k.file);
            let ptx = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            declared.insert(&k.name, crate::abi::ptx_entry_params(&ptx, &k.name)?);
        }
        let mut planned: Vec<(&str, Sizes)> =
            artifact.plan.entries.iter().map(|e| (e.name.as_str(), e.sizes)).collect();
        // And each prefill entry at the rows below which its GEMMs launch smaller kernels.
        let bounds: std::collections::BTreeSet<usize> =
            (self.fused.values()).flat_map(|f| f.launches.iter().flat_map(|l| l.kernel.prefill_bounds())).collect();
        for e in artifact.plan.entries.iter().filter(|e| Regime::of_entry(&e.name) == Regime::Prefill) {
            let below = bounds.iter().filter(|&&rows| rows < e.sizes.rows);
            let before = planned.len();
            planned.extend(below.map(|&rows| (e.name.as_str(), Sizes { rows, ..e.sizes })));
            report.smaller_runs += planned.len() - before;
        }
        let mut kernels = std::collections::BTreeSet::new();
        for &(entry, at) in planned.iter().chain(more) {
            let plan = self.entry(entry)?;
            let (actions, _) = self.expand(plan, at, &b, 132).map_err(|e| format!("{entry} at {at:?}: {e}"))?;
            for a in actions {
                let Action::Kernel(k) = a else { continue };
                let want = declared.get(k.kernel.as_str()).copied().unwrap_or(0);
                if k.params.len() != want || k.grid == 0 {
                    return Err(format!(
                        "{entry} at {at:?}: {} launched with {} parameters on {} blocks; its PTX declares {want}",
                        k.kernel,
                        k.params.len(),
                        k.grid
                    ));
                }
                // CUDA's limits on a grid (x below 2^31, y at most 65535).
                if k.grid > i32::MAX as usize || k.grid_y > u16::MAX as usize {
                    return Err(format!(
                        "{entry} at {at:?}: {} needs a grid of {} x {} blocks, beyond CUDA's {} x {}",
                        k.kernel,
                        k.grid,
                        k.grid_y,
                        i32::MAX,
                        u16::MAX
                    ));
                }
                report.launches += 1;
                report.launched.entry(entry.to_string()).or_default().insert(k.kernel.clone());
                kernels.insert(k.kernel);
            }
        }
        // The argmax kernel on the decode logits at the planned rows.
        let vocab = artifact.manifest.model.config["vocab_size"].as_u64().unwrap_or(0) as usize;
        let rows = artifact.plan.entries.iter().map(|e| e.sizes.rows).max().unwrap_or(1).max(1);
        let logits = Buf { addr: addr(), shape: vec![rows, vocab], element: "f32".into() };
        let argmax = self.argmax_launch(&logits, addr())?;
        let sample = self.sample_launch(&logits, [addr(), addr(), addr(), addr(), addr()], addr())?;
        let scores = self.scores_launch(&logits, addr(), [addr(), addr(), addr(), addr(), addr()])?;
        // A training step's optimizer kernels, over a tensor of three blocks.
        let optimizer = match crate::optimizer::OptimizerKernels::of(artifact)? {
            Some(o) => o.samples(3 * 4096 + 7, &mut addr)?,
            None => Vec::new(),
        };
        for k in argmax.into_iter().chain(sample).chain(scores).chain(optimizer) {
            let want = declared.get(k.kernel.as_str()).copied().unwrap_or(0);
            if k.params.len() != want {
                return Err(format!(
                    "{}: launched with {} parameters; its PTX declares {want}",
                    k.kernel,
                    k.params.len()
                ));
            }
            report.launches += 1;
            kernels.insert(k.kernel);
        }
        report.kernels = kernels.len();
        Ok(report)
    }
}

/// The prepared weight a GEMM step reads, if it needs one (several dense weights, or grouped).
fn prepared_of(
    entry: &EntryPlan,
    l: &crate::plan::Launch,
    spec: &LaunchSpec,
) -> Result<Option<PreparedWeight>, String> {
    let Some(gs) = &spec.gemm else { return Ok(None) };
    let name = |operand: usize| -> Result<(String, Vec<usize>, String), String> {
        let OperandSpec::Arg(i) = spec.operands.get(operand).copied().ok_or("a weight operand out of range")? else {
            return Err(format!("GEMM weight operand {operand} is not a kernel argument"));
        };
        let id = *l.args.get(i).ok_or("a weight argument out of range")?;
        let b = &entry.buffers[id];
        match &b.kind {
            BufferKind::Weight { name } => Ok((name.clone(), b.shape.clone(), b.dtype.clone())),
            _ => Err(format!("GEMM weight operand {operand} is not a weight")),
        }
    };
    // A grouped GEMM over weights laid out per group at load; with none, its B is its one weight
    // operand, stacked per group by the launches before it.
    if let Some(gr) = gs.grouped.as_ref().filter(|gr| !gr.weights.is_empty()) {
        let mut names = Vec::new();
        let mut element = String::new();
        for w in &gr.weights {
            let (routed, _, el) = name(w.routed)?;
            element = el;
            names.push(GroupedNames {
                routed,
                routed_scale: w.routed_scale.map(|s| name(s).map(|n| n.0)).transpose()?,
                shared: w.shared.map(|s| name(s).map(|n| n.0)).transpose()?,
                shared_scale: w.shared_scale.map(|s| name(s).map(|n| n.0)).transpose()?,
                rows: w.rows,
            });
        }
        let n: usize = gr.weights.iter().map(|w| w.rows).sum();
        let key = format!("grouped:{}", names.iter().map(|w| w.routed.as_str()).collect::<Vec<_>>().join("+"));
        let scaled = names.iter().all(|w| w.routed_scale.is_some());
        return Ok(Some(PreparedWeight {
            key,
            rows: gr.groups * n,
            k: gs.k,
            element,
            scaled,
            kind: PreparedKind::Grouped { spec: gr.clone(), weights: names },
        }));
    }
    if gs.weights.len() < 2 {
        return Ok(None);
    }
    let mut parts = Vec::new();
    let (mut rows, mut element) = (0, String::new());
    for (i, &(w, s)) in gs.weights.iter().enumerate() {
        let (wn, shape, el) = name(w)?;
        let scale = s.map(|s| name(s).map(|n| n.0)).transpose()?;
        if scale.is_some() && i + 1 < gs.weights.len() && shape[0] % 128 != 0 {
            return Err(format!(
                "{wn}: {} rows, not whole 128-row scale blocks (it is concatenated before others)",
                shape[0]
            ));
        }
        rows += shape[0];
        element = el;
        parts.push((wn, scale));
    }
    let key = parts.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join("+");
    let scaled = parts.iter().all(|(_, s)| s.is_some());
    Ok(Some(PreparedWeight { key, kind: PreparedKind::Concat(parts), rows, k: gs.k, element, scaled }))
}

/// A prepared weight's bytes from the source weights' bytes (`source(name)`: the plan's element
/// type, little-endian): B and, scaled, its f32 scales.
pub fn prepare_weight<'a>(
    p: &PreparedWeight,
    source: &dyn Fn(&str) -> Result<Stacked<'a>, String>,
) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    let mut b = Vec::with_capacity(p.rows * p.k * element_bytes(&p.element)?);
    let s = prepare_weight_into(p, source, &mut |piece| {
        b.extend_from_slice(piece);
        Ok(())
    })?;
    Ok((b, s))
}

/// [`prepare_weight`]'s B handed to `piece` in order, as the sources' bytes it is made of (each
/// written where it goes, no host copy of the whole), checked to be `rows * k` elements; its scales
/// returned.
pub fn prepare_weight_into<'a>(
    p: &PreparedWeight,
    source: &dyn Fn(&str) -> Result<Stacked<'a>, String>,
    piece: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<Option<Vec<u8>>, String> {
    // A source as one run of bytes (a stacked one's experts joined: scales, small).
    let whole = |s: Stacked<'a>| -> Cow<'a, [u8]> {
        match s {
            Stacked::Whole(b) => Cow::Borrowed(b),
            Stacked::Each(experts) => Cow::Owned(experts.concat()),
        }
    };
    let f32s =
        |b: &[u8]| -> Vec<f32> { b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let expected = p.rows * p.k * element_bytes(&p.element)?;
    let mut made = 0;
    let mut counted = |b: &[u8]| {
        made += b.len();
        if made > expected {
            return Err(format!("{}: more than the {expected} bytes of B", p.key));
        }
        piece(b)
    };
    let scales = match &p.kind {
        PreparedKind::Concat(parts) => {
            let mut s = Vec::new();
            for (w, scale) in parts {
                match source(w)? {
                    Stacked::Whole(b) => counted(b)?,
                    Stacked::Each(experts) => experts.iter().try_for_each(|b| counted(b))?,
                }
                if let Some(scale) = scale {
                    s.extend_from_slice(&whole(source(scale)?));
                }
            }
            p.scaled.then_some(s)
        }
        PreparedKind::Grouped { spec, weights } => {
            if !(p.element == "f8E4M3FN" && p.scaled || p.element == "bf16" && !p.scaled) {
                return Err(format!(
                    "{}: grouped weights of {}{} (block-scaled e4m3 or bf16 are laid out per expert)",
                    p.key,
                    p.element,
                    if p.scaled { " with scales" } else { "" }
                ));
            }
            // The routed experts as the source has them; the shared ones, and every scale, whole.
            let mut routed: BTreeMap<String, (Stacked<'a>, Vec<f32>)> = BTreeMap::new();
            let mut shared: BTreeMap<String, (Cow<'a, [u8]>, Vec<f32>)> = BTreeMap::new();
            for w in weights {
                let get = |n: &Option<String>| -> Result<Vec<f32>, String> {
                    n.as_ref().map(|n| source(n).map(|s| f32s(&whole(s)))).transpose().map(Option::unwrap_or_default)
                };
                routed.insert(w.routed.clone(), (source(&w.routed)?, get(&w.routed_scale)?));
                if let Some(sh) = &w.shared {
                    shared.insert(sh.clone(), (whole(source(sh)?), get(&w.shared_scale)?));
                }
            }
            let views: Vec<crate::prepare::GroupedWeight> = weights
                .iter()
                .map(|w| crate::prepare::GroupedWeight {
                    routed: routed[&w.routed].0,
                    routed_scale: &routed[&w.routed].1,
                    shared: w.shared.as_ref().map(|s| &shared[s].0[..]),
                    shared_scale: w.shared.as_ref().map(|s| shared[s].1.as_slice()),
                    rows: w.rows,
                })
                .collect();
            let s = crate::prepare::grouped_pieces(spec, p.k, element_bytes(&p.element)?, &views, &mut counted)?;
            p.scaled.then(|| bytes(&s))
        }
    };
    if made != expected {
        return Err(format!("{}: {made} bytes of B made, expected {expected}", p.key));
    }
    Ok(scales)
}

/// Bytes of a host buffer as the plan's element type, and the reverse.
/// The weights bound to memory of their own (those only read re-laid out have none), sorted.
pub fn rebindable_weights(bindings: &Bindings) -> Vec<String> {
    let mut names: Vec<String> =
        bindings.weights.iter().filter(|(_, &addr)| addr != 0).map(|(n, _)| n.clone()).collect();
    names.sort();
    names
}

/// Where weight `name` is bound and its new value `weight` as the bytes to write there: how a
/// training run rebinds trained parameters between steps.
pub fn rebind(
    bindings: &Bindings,
    artifact: &Artifact,
    name: &str,
    weight: &HostBuffer,
) -> Result<(u64, Vec<u8>), String> {
    let addr = *bindings.weights.get(name).ok_or_else(|| format!("the plan binds no weight '{name}'"))?;
    if addr == 0 {
        return Err(format!("weight {name} is only read re-laid out (prepared at load): it cannot be rebound"));
    }
    Ok((addr, planned_weight_bytes(artifact, name, weight)?))
}

/// Weight `name` of `artifact`'s plan as the bytes its buffer holds (shape checked against the
/// plan's): how a GPU step rebinds trained parameters.
pub fn planned_weight_bytes(artifact: &Artifact, name: &str, w: &HostBuffer) -> Result<Vec<u8>, String> {
    let planned = artifact
        .plan
        .entries
        .iter()
        .flat_map(|e| &e.buffers)
        .find(|b| matches!(&b.kind, BufferKind::Weight { name: n } if n == name))
        .ok_or_else(|| format!("the plan binds no weight '{name}'"))?;
    if planned.shape != w.shape {
        return Err(format!("weight {name}: shape {:?}, the plan's is {:?}", w.shape, planned.shape));
    }
    plan_bytes(w, &planned.dtype).map_err(|e| format!("weight {name}: {e}"))
}

pub fn plan_bytes(b: &HostBuffer, element: &str) -> Result<Vec<u8>, String> {
    Ok(match (&b.data, element) {
        (HostData::F32(v), crate::plan::LATENT_FP8) => {
            let cols = b.shape.last().copied().unwrap_or(0);
            let row = crate::plan::Fp8LatentRow::of(cols).ok_or_else(|| {
                format!("fp8 cache rows of {cols} columns (a latent of whole 128-column groups, then 64)")
            })?;
            let mut out = vec![0u8; v.len() / cols * row.bytes()];
            for (r, o) in v.chunks_exact(cols).zip(out.chunks_exact_mut(row.bytes())) {
                row.pack(r, o);
            }
            out
        }
        (HostData::F32(v), "f32") => le_bytes(v, f32::to_le_bytes),
        (HostData::F32(v), "bf16") => v.iter().flat_map(|&x| v3c_models::dtype::f32_to_bf16(x).to_le_bytes()).collect(),
        (HostData::Bf16(v), "bf16") => le_bytes(v, u16::to_le_bytes),
        (HostData::I64(v), "i64") => le_bytes(v, i64::to_le_bytes),
        (HostData::I32(v), "i32") => le_bytes(v, i32::to_le_bytes),
        (HostData::F8(v), "f8E4M3FN") => v.clone(),
        (_, other) => return Err(format!("a {} buffer where the plan has {other}", b.element())),
    })
}

/// `values`' little-endian bytes: their memory as it is on a little-endian host (one copy; value
/// by value through `bytes` otherwise).
fn le_bytes<T: Plain, const N: usize>(values: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        // SAFETY: the values' own memory, read as bytes (`Plain`: no padding) while borrowed.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }.to_vec()
    } else {
        values.iter().flat_map(|&x| bytes(x)).collect()
    }
}

/// Values with no padding whose every bit pattern is one (what a buffer's bytes may be read
/// straight into, and its memory read as bytes).
trait Plain: Copy + Default {}
impl Plain for f32 {}
impl Plain for i32 {}
impl Plain for i64 {}
impl Plain for u16 {}
impl Plain for u8 {}

/// `bytes` bytes into values of `T`, `read` filling them in place.
fn read_plain<T: Plain>(bytes: usize, read: impl FnOnce(&mut [u8]) -> Result<(), String>) -> Result<Vec<T>, String> {
    let size = std::mem::size_of::<T>();
    if !bytes.is_multiple_of(size) {
        return Err(format!("{bytes} bytes are not a whole number of {size}-byte values"));
    }
    let mut v = vec![T::default(); bytes / size];
    // SAFETY: the slice covers exactly the vector's initialized values, as bytes; any bytes `read`
    // leaves there are a valid `T` (`Plain`), and `v` is not touched while the slice lives.
    read(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), bytes) })?;
    Ok(v)
}

/// As [`host_buffer`] of the `bytes` bytes `read` fills, read straight into the buffer's values
/// (little-endian, as the device's) where the plan's bytes are theirs: no byte copy to convert, which
/// a decode step's logits would cost every step (33 MB for 64 rows of DeepSeek-V3's).
pub fn read_host_buffer(
    shape: Vec<usize>,
    element: &str,
    bytes: usize,
    read: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<HostBuffer, String> {
    let plain = cfg!(target_endian = "little");
    let data = match element {
        "f32" if plain => HostData::F32(read_plain(bytes, read)?),
        "i32" if plain => HostData::I32(read_plain(bytes, read)?),
        "i64" if plain => HostData::I64(read_plain(bytes, read)?),
        "bf16" if plain => HostData::Bf16(read_plain(bytes, read)?),
        "f8E4M3FN" => HostData::F8(read_plain(bytes, read)?),
        _ => {
            let mut host = vec![0u8; bytes];
            read(&mut host)?;
            return converted_buffer(&host, shape, element);
        }
    };
    Ok(HostBuffer { shape, data })
}

/// The buffer of the plan's `bytes` (of `element`) at `shape`.
pub fn host_buffer(bytes: &[u8], shape: Vec<usize>, element: &str) -> Result<HostBuffer, String> {
    read_host_buffer(shape, element, bytes.len(), |host| {
        host.copy_from_slice(bytes);
        Ok(())
    })
}

/// As [`host_buffer`], value by value (an fp8 cache's rows unpacked; any host's byte order).
fn converted_buffer(bytes: &[u8], shape: Vec<usize>, element: &str) -> Result<HostBuffer, String> {
    let w4 = |c: &[u8]| [c[0], c[1], c[2], c[3]];
    let data = match element {
        "f32" => HostData::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(w4(c))).collect()),
        "i32" => HostData::I32(bytes.chunks_exact(4).map(|c| i32::from_le_bytes(w4(c))).collect()),
        "i64" => {
            HostData::I64(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
        }
        "bf16" => HostData::Bf16(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
        "f8E4M3FN" => HostData::F8(bytes.to_vec()),
        crate::plan::LATENT_FP8 => {
            let cols = shape.last().copied().unwrap_or(0);
            let row = crate::plan::Fp8LatentRow::of(cols).ok_or_else(|| format!("fp8 cache rows of {cols} columns"))?;
            let mut v = vec![0f32; bytes.len() / row.bytes() * cols];
            for (b, r) in bytes.chunks_exact(row.bytes()).zip(v.chunks_exact_mut(cols)) {
                row.unpack(b, r);
            }
            HostData::F32(v)
        }
        other => return Err(format!("an output of {other}")),
    };
    Ok(HostBuffer { shape, data })
}

/// Where [`bind`] puts what it loads: device memory (the CUDA executor), or host memory (the
/// tests' emulation of the launches). Addresses must be 256-byte aligned and stay valid.
pub trait Memory {
    /// `bytes` of memory (contents undefined).
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<u64, String>;
    /// A copy of `bytes`.
    fn upload(&mut self, bytes: &[u8], what: &str) -> Result<u64, String>;
    /// `bytes` copied to `addr`, within an allocation of this memory.
    fn write(&mut self, addr: u64, bytes: &[u8], what: &str) -> Result<(), String>;
}

/// Loads everything an artifact's entries touch into `mem`: the weights in the plan's
/// element types, the prepared weights, the RoPE tables, one arena for the largest entry, the
/// inputs at their largest planned sizes, the temporaries region. Returns the bindings (no split-K
/// scratch yet: [`Expander::expand`] says how much a run needs) and each input's bytes.
pub fn bind(
    expander: &Expander,
    weights: &Weights,
    mem: &mut dyn Memory,
    progress: &mut dyn FnMut(&str),
) -> Result<(Bindings, HashMap<String, usize>), String> {
    let artifact = expander.artifact;
    // Weights stream through: uploaded as read (a checkpoint's straight from its mapped files)
    // when a kernel reads them as they are; a prepared weight's sources (concatenated, grouped per
    // expert) read as it is made and kept only until the last prepared weight made from them, its
    // B written piece by piece into its allocation. (Until 2026-12-06 every source was read first
    // and held until all were prepared, copied again to be prepared, and each prepared weight built
    // on the host: a MoE model's experts three times over in host memory.)
    let direct = expander.direct_weights()?;
    let prepared = expander.prepared_weights()?;
    let mut planned: BTreeMap<&String, (&Vec<usize>, &String)> = BTreeMap::new();
    for e in &artifact.plan.entries {
        for b in &e.buffers {
            if let BufferKind::Weight { name } = &b.kind {
                planned.entry(name).or_insert((&b.shape, &b.dtype));
            }
        }
    }
    let mut bindings = Bindings::default();
    // How many prepared weights are still to be made from each source (a source read for the
    // first of them, dropped after the last).
    let distinct_sources = |p: &PreparedWeight| p.sources().into_iter().collect::<std::collections::BTreeSet<String>>();
    let mut uses: HashMap<String, usize> = HashMap::new();
    for p in &prepared {
        for s in distinct_sources(p) {
            *uses.entry(s).or_default() += 1;
        }
    }
    // A weight as read: bytes, or a checkpoint's experts where they lie in its files.
    let read = |name: &str, shape: &[usize], dtype: &str| -> Result<Held, String> {
        match weights.experts(name, shape, dtype) {
            Some(experts) => Ok(Held::Experts(experts)),
            None => weights.bytes(name, shape, dtype).map(Held::Bytes),
        }
    };
    let mut host: HashMap<String, Held> = HashMap::new();
    for (name, (shape, dtype)) in &planned {
        if !direct.contains(*name) {
            continue;
        }
        progress(&format!("reading {name}"));
        let held = read(name, shape, dtype)?;
        let addr = match &held {
            Held::Bytes(bytes) => mem.upload(bytes, name)?,
            Held::Experts(experts) => {
                let addr = mem.alloc(experts.iter().map(|e| e.len()).sum(), name)?;
                let mut at = addr;
                for e in experts {
                    mem.write(at, e, name)?;
                    at += e.len() as u64;
                }
                addr
            }
        };
        bindings.weights.insert((*name).clone(), addr);
        if uses.contains_key(*name) {
            host.insert((*name).clone(), held);
        }
    }
    for p in prepared {
        let sources = distinct_sources(&p);
        for s in &sources {
            if !host.contains_key(s) {
                let (shape, dtype) =
                    planned.get(s).ok_or_else(|| format!("{}: its source {s} is not a weight of the plan", p.key))?;
                progress(&format!("reading {s}"));
                host.insert(s.clone(), read(s, shape, dtype)?);
            }
        }
        progress(&format!("preparing {}", p.key));
        let source = |n: &str| match host.get(n) {
            Some(Held::Bytes(b)) => Ok(Stacked::Whole(&b[..])),
            Some(Held::Experts(experts)) => Ok(Stacked::Each(&experts[..])),
            None => Err(format!("weight {n} was not read")),
        };
        // B written piece by piece where it goes (no host copy of the whole).
        let b = mem.alloc(p.rows * p.k * element_bytes(&p.element)?, &p.key)?;
        let mut at = b;
        let s = prepare_weight_into(&p, &source, &mut |piece| {
            mem.write(at, piece, &p.key)?;
            at += piece.len() as u64;
            Ok(())
        })?;
        let s = s.map(|s| mem.upload(&s, &p.key)).transpose()?;
        bindings.prepared.insert(p.key.clone(), (b, s));
        for source in sources {
            let left = uses.get_mut(&source).expect("counted above");
            *left -= 1;
            if *left == 0 {
                host.remove(&source);
            }
        }
    }
    for (spec, rows) in expander.rope_tables() {
        let table: Vec<u8> = crate::prepare::rope_table(&spec, rows).iter().flat_map(|x| x.to_le_bytes()).collect();
        bindings.rope.insert(rope_key(&spec), mem.upload(&table, "a RoPE table")?);
    }
    let arena_bytes = artifact.plan.entries.iter().map(|e| e.arena_bytes as usize).max().unwrap_or(0);
    bindings.arena = mem.alloc(arena_bytes, "the arena")?;
    bindings.temps_bytes = expander.temp_bytes()?;
    bindings.temps = mem.alloc(bindings.temps_bytes, "the temporaries")?;
    let mut input_bytes: HashMap<String, usize> = HashMap::new();
    for e in &artifact.plan.entries {
        for b in &e.buffers {
            if let BufferKind::Input { name } = &b.kind {
                let v = input_bytes.entry(name.clone()).or_default();
                *v = (*v).max(b.bytes as usize);
            }
        }
    }
    let mut inputs: Vec<(&String, &usize)> = input_bytes.iter().collect();
    inputs.sort();
    for (name, &bytes) in inputs {
        bindings.inputs.insert(name.clone(), mem.alloc(bytes, &format!("input {name}"))?);
    }
    Ok((bindings, input_bytes))
}

/// A weight [`bind`] read: its bytes, or a checkpoint's experts of a stacked weight as they lie in
/// its mapped files (one tensor an expert: not joined on the host).
enum Held<'c> {
    Bytes(Cow<'c, [u8]>),
    Experts(Vec<&'c [u8]>),
}

/// Where an artifact's weights come from.
pub enum Weights<'a> {
    /// A checkpoint in the Hugging Face layout (checked against the plan by the caller).
    Checkpoint(&'a v3c_models::checkpoint::Checkpoint),
    /// Made-up values of the right shapes and types, from a seed: for timing without a
    /// checkpoint (a full-width slice of DeepSeek-V3 is tens of GiB). The outputs mean nothing.
    Random(u64),
    /// A trainer's f32 parameters (checkpoint names; stacked experts bound as their stack): a
    /// training step's weights without reading the checkpoint again.
    Params(&'a std::collections::HashMap<String, v3c_models::tensor::Tensor>),
}

impl Weights<'_> {
    /// A stacked weight's experts (`name` with `.experts.*.`, `shape` `[E, ...]`) as a checkpoint
    /// stores them in the plan's type, one tensor an expert, borrowed from its mapped files; None
    /// otherwise ([`Self::bytes`] then).
    pub fn experts(&self, name: &str, shape: &[usize], dtype: &str) -> Option<Vec<&[u8]>> {
        match self {
            Weights::Checkpoint(ckpt) => stored_experts(ckpt, name, shape, dtype),
            _ => None,
        }
    }

    /// Weight `name` of `shape` as the plan's element type `dtype`, little-endian: borrowed from
    /// the checkpoint's mapped file where it stores one tensor so (uploaded from there, no copy).
    pub fn bytes(&self, name: &str, shape: &[usize], dtype: &str) -> Result<Cow<'_, [u8]>, String> {
        match self {
            Weights::Checkpoint(ckpt) => {
                if let Some(bytes) = stored_as_planned(ckpt, name, shape, dtype) {
                    return Ok(bytes);
                }
                let w = crate::cpu::load_weight(ckpt, name, shape, dtype).map_err(|e| e.to_string())?;
                plan_bytes(&w, dtype).map(Cow::Owned).map_err(|e| format!("{name}: {e}"))
            }
            Weights::Random(seed) => Ok(Cow::Owned(random_weight(name, shape.iter().product(), dtype, *seed))),
            Weights::Params(params) => {
                let w = crate::training::bound_weight(name, params).map_err(|e| e.to_string())?;
                if w.shape != shape {
                    return Err(format!("weight {name}: shape {:?}, the plan's is {shape:?}", w.shape));
                }
                plan_bytes(&w, dtype).map(Cow::Owned).map_err(|e| format!("{name}: {e}"))
            }
        }
    }
}

/// A weight's bytes straight from the checkpoint when it stores them in the plan's type (e4m3 bits,
/// f32 block scales, bf16 tensors; stacked experts one after the other) — no conversion, no dequantized
/// copy, and one tensor not copied at all; None when a conversion is needed (the loader's path then).
fn stored_as_planned<'c>(
    ckpt: &'c v3c_models::checkpoint::Checkpoint,
    name: &str,
    shape: &[usize],
    dtype: &str,
) -> Option<Cow<'c, [u8]>> {
    if name.contains(".experts.*.") {
        return stored_experts(ckpt, name, shape, dtype).map(|experts| Cow::Owned(experts.concat()));
    }
    stored(ckpt, name, shape, dtype).map(Cow::Borrowed)
}

/// A stacked weight's experts (`name` with `.experts.*.`, `shape` `[E, ...]`), each as the
/// checkpoint stores it in the plan's type.
fn stored_experts<'c>(
    ckpt: &'c v3c_models::checkpoint::Checkpoint,
    name: &str,
    shape: &[usize],
    dtype: &str,
) -> Option<Vec<&'c [u8]>> {
    if !name.contains(".experts.*.") {
        return None;
    }
    let (count, each) = (*shape.first()?, &shape[1..]);
    (0..count).map(|e| stored(ckpt, &name.replace(".experts.*.", &format!(".experts.{e}.")), each, dtype)).collect()
}

/// Tensor `name`'s bytes as the checkpoint stores them, if in the plan's type `dtype` and of
/// `shape`'s size.
fn stored<'c>(
    ckpt: &'c v3c_models::checkpoint::Checkpoint,
    name: &str,
    shape: &[usize],
    dtype: &str,
) -> Option<&'c [u8]> {
    let want = match dtype {
        "f8E4M3FN" => "F8_E4M3",
        "bf16" => "BF16",
        "f32" => "F32",
        _ => return None,
    };
    let (bytes, stored, stored_shape) = ckpt.raw(name)?;
    (stored == want && stored_shape.iter().product::<usize>() == shape.iter().product::<usize>()).then_some(bytes)
}

/// `n` made-up elements of `dtype` for weight `name`: e4m3 bytes of magnitude below 2 (never NaN),
/// block scales of 1e-3, norm weights of 1, other floats uniform in +-0.02 (biases 0).
pub fn random_weight(name: &str, n: usize, dtype: &str, seed: u64) -> Vec<u8> {
    let mut state =
        name.bytes().fold(seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let uniform = |r: u64| ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
    let is_norm = name.ends_with("norm.weight");
    match dtype {
        "f8E4M3FN" => {
            let mut out = Vec::with_capacity(n + 8);
            while out.len() < n {
                // Clearing the exponent's top bit keeps |x| < 2 and away from NaN (S.1111.111).
                out.extend((next() & 0xBFBF_BFBF_BFBF_BFBF).to_le_bytes());
            }
            out.truncate(n);
            out
        }
        "f32" if name.ends_with("_scale_inv") => 1e-3f32.to_le_bytes().repeat(n),
        "f32" if name.ends_with("bias") => vec![0; 4 * n],
        "f32" if is_norm => 1f32.to_le_bytes().repeat(n),
        "bf16" if is_norm => v3c_models::dtype::f32_to_bf16(1.0).to_le_bytes().repeat(n),
        // Each element's bytes written in place (a whole embedding is ~1e9 of them).
        "f32" => {
            let mut out = vec![0u8; 4 * n];
            for e in out.chunks_exact_mut(4) {
                e.copy_from_slice(&uniform(next()).to_le_bytes());
            }
            out
        }
        "bf16" => {
            let mut out = vec![0u8; 2 * n];
            for e in out.chunks_exact_mut(2) {
                e.copy_from_slice(&v3c_models::dtype::f32_to_bf16(uniform(next())).to_le_bytes());
            }
            out
        }
        other => vec![0; n * crate::plan::element_bytes(other).unwrap_or(4) as usize],
    }
}

impl Bindings {
    /// Where a plan's buffer lies once loaded.
    pub fn address(&self, kind: &BufferKind) -> Result<u64, String> {
        Ok(match kind {
            BufferKind::Arena { offset } => self.arena + offset,
            BufferKind::Input { name } => *self.inputs.get(name).ok_or_else(|| format!("input {name} is not bound"))?,
            BufferKind::Weight { name } => {
                *self.weights.get(name).ok_or_else(|| format!("weight {name} is not bound"))?
            }
        })
    }

    /// Whether `addr` is where a weight (as stored or re-laid out) lives.
    pub fn is_weight(&self, addr: u64) -> bool {
        self.weights.values().any(|&a| a == addr) || self.prepared.values().any(|&(b, s)| b == addr || s == Some(addr))
    }
}

/// The label of the `n`-th dumped run of `entry` (`prefill0`, `decode0`, `decode1`, ...): a session's
/// runs, numbered per entry, name the same dumps on the GPU and in the emulation.
pub fn dump_label(entry: &str, n: usize) -> String {
    format!("{entry}{n}")
}

/// Writes the buffers of launch `seq` of `entry` (all but weights) into `dir`, as `read` gives
/// their bytes, one file each (`{entry}-{seq:04}-{kernel}-{operand}.bin`), and appends a line per
/// file to `dir/index.jsonl` (entry, seq, kernel, operand, file, shape, element). `v3r` does it on
/// the GPU under `V3R_DUMP_DIR`, `v3c emulate --dump` on the host: `benches/device/dump_compare.py`
/// finds the first launch where the two part.
pub fn dump_launch(
    dir: &std::path::Path,
    entry: &str,
    seq: usize,
    k: &KernelLaunch,
    bindings: &Bindings,
    read: &dyn Fn(&Buf) -> Result<Vec<u8>, String>,
) -> Result<(), String> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let index = dir.join("index.jsonl");
    let mut lines = String::new();
    for (i, b) in k.operands.iter().enumerate() {
        if bindings.is_weight(b.addr) {
            continue;
        }
        let file = format!("{entry}-{seq:04}-{}-{i}.bin", k.kernel);
        let path = dir.join(&file);
        std::fs::write(&path, read(b)?).map_err(|e| format!("{}: {e}", path.display()))?;
        let line = serde_json::json!({
            "entry": entry, "seq": seq, "kernel": k.kernel, "operand": i, "file": file,
            "shape": b.shape, "element": b.element,
        });
        lines.push_str(&format!("{line}\n"));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&index)
        .map_err(|e| format!("{}: {e}", index.display()))?;
    f.write_all(lines.as_bytes()).map_err(|e| format!("{}: {e}", index.display()))
}

/// What each input's device buffer holds after the runs so far (shape, element): what a later run
/// may take as resident — decode's caches as the last step left them, a prefill's carried over
/// ([`crate::cuda::GpuArtifact::run_carrying`]), rows moved between them. The GPU executor and
/// the host emulation keep the same books.
#[derive(Debug, Default)]
pub struct HeldInputs {
    held: HashMap<String, (Vec<usize>, String)>,
}

impl HeldInputs {
    /// Nothing held (a failed run leaves the buffers in no known state).
    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// Every input named in `resident` holds what a run of `entry` on `inputs` reads: the element
    /// its plan gives the input, rows of the input's width, no more rows than the given shape
    /// has (a prefill's `[P, C]` is the first P rows of a one-sequence decode's `[1, S, C]`, or
    /// of a pool whose table gives the sequence pages 0, 1, ... in order; the rows past P are
    /// written before they are read).
    pub fn check_resident(
        &self,
        entry: &str,
        plan: &EntryPlan,
        inputs: &HashMap<String, HostBuffer>,
        resident: &[&str],
    ) -> Result<(), String> {
        for name in resident {
            let element = plan.input(name).map(|b| b.dtype.as_str());
            let given = inputs.get(*name).map(|b| b.shape.as_slice());
            let fits = match (self.held.get(*name), element, given) {
                (Some((shape, e)), Some(element), Some(given)) => {
                    let rows = |s: &[usize]| s.split_last().map(|(w, r)| (*w, r.iter().product::<usize>()));
                    e == element
                        && matches!((rows(shape), rows(given)), (Some((a, n)), Some((b, m))) if a == b && n <= m)
                }
                _ => false,
            };
            if !fits {
                return Err(format!(
                    "{entry}: input {name} is not on the device as the run reads it (holds {:?}, the run gives {:?} of {})",
                    self.held.get(*name),
                    given.unwrap_or_default(),
                    element.unwrap_or("no such input")
                ));
            }
        }
        Ok(())
    }

    /// After a run of `plan` on `inputs`: each input's buffer holds it.
    pub fn ran(&mut self, plan: &EntryPlan, inputs: &HashMap<String, HostBuffer>) {
        for (name, b) in inputs {
            if let Some(p) = plan.input(name) {
                self.held.insert(name.clone(), (b.shape.clone(), p.dtype.clone()));
            }
        }
    }

    /// Output `name` of a run of `entry` at `sizes` carried into the input of that name (`room`
    /// bytes): where it lies in the arena and its bytes, now held by the input.
    pub fn carry(
        &mut self,
        entry: &str,
        plan: &EntryPlan,
        sizes: Sizes,
        name: &str,
        room: usize,
    ) -> Result<(u64, usize), String> {
        let (_, id) = plan
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("{entry}: no output {name} to carry"))?;
        let b = &plan.buffers[*id];
        let (BufferKind::Arena { offset }, Some(input)) = (&b.kind, plan.input(name)) else {
            return Err(format!("{entry}: output {name} is not a new buffer of an input's name"));
        };
        let shape = shape_at(&b.dims, sizes);
        let bytes = crate::plan::tensor_bytes(&shape, &b.dtype).unwrap_or(0) as usize;
        if b.dtype != input.dtype || bytes > room {
            return Err(format!(
                "{entry}: output {name} ({bytes} bytes of {}) does not fit its input ({room} bytes of {})",
                b.dtype, input.dtype
            ));
        }
        self.held.insert(name.to_string(), (shape, b.dtype.clone()));
        Ok((*offset, bytes))
    }

    /// Input `name`'s first `rows` rows hold what a run carried there or rows moved there, though
    /// runs since gave the input as a larger shape (decode steps over a pool whose first pages no
    /// sequence holds: a prefill's scratch rows, untouched): the caller's word, held within what
    /// the input holds.
    pub fn reclaim(&mut self, name: &str, rows: usize) -> Result<(), String> {
        let (shape, element) = self.held.get(name).cloned().ok_or_else(|| format!("input {name} holds nothing"))?;
        let (&width, outer) = shape.split_last().ok_or_else(|| format!("input {name} holds a scalar"))?;
        let held: usize = outer.iter().product();
        if rows > held {
            return Err(format!("input {name}: {rows} rows reclaimed of the {held} it holds"));
        }
        self.held.insert(name.to_string(), (vec![rows, width], element));
        Ok(())
    }

    /// Rows `from..from + n` of what input `name` holds (`room` bytes) to rows `to..to + n`, which
    /// must not overlap them: the bytes of a row; the input then holds rows up to the last moved.
    pub fn moved(&mut self, name: &str, from: usize, to: usize, n: usize, room: usize) -> Result<usize, String> {
        let (shape, element) = self.held.get(name).cloned().ok_or_else(|| format!("input {name} holds nothing"))?;
        let width = *shape.last().ok_or_else(|| format!("input {name} holds a scalar"))?;
        let row = crate::plan::tensor_bytes(&[1, width], &element).unwrap_or(0) as usize;
        if row == 0 || (to + n) * row > room || (from + n) * row > room || (from < to + n && to < from + n) {
            return Err(format!(
                "input {name}: rows {from}..{} to {to}..{} of {row} bytes (the buffer holds {room} bytes)",
                from + n,
                to + n
            ));
        }
        let rows: usize = shape[..shape.len() - 1].iter().product();
        self.held.insert(name.to_string(), (vec![rows.max(to + n), width], element));
        Ok(row)
    }
}

/// Input shapes by name: what a staged run is staged for.
pub type InputShapes = BTreeMap<String, Vec<usize>>;

/// Runs staged on a device ([`crate::cuda::GpuArtifact`]: expanded actions and their uploaded
/// tensor maps), up to [`STAGED_PER_ENTRY`] per entry — for the input shapes each ran at, the least
/// recently used given up first — so that one entry's runs between another's (a serving batch's
/// decode steps between a joining prompt's prefill chunks, a training run's windows between
/// evaluations), and a batch's decode steps at each of its row counts
/// ([`crate::session`]'s steps run the active sequences' rows), are not expanded and uploaded anew
/// each time.
#[derive(Debug)]
pub struct StagedRuns<S> {
    /// The least recently kept first.
    runs: Vec<(String, InputShapes, std::rc::Rc<S>)>,
}

/// Staged runs kept per entry: a 64-slot batch's decode steps run at 7 row counts (powers of two).
pub const STAGED_PER_ENTRY: usize = 8;

impl<S> Default for StagedRuns<S> {
    fn default() -> Self {
        StagedRuns { runs: Vec::new() }
    }
}

impl<S> StagedRuns<S> {
    /// Takes out entry `entry`'s run: `Ok` when one was staged for `shapes` (the caller keeps it
    /// again once the run's inputs are uploaded: a failed upload stages anew); `Err` with the
    /// entry's least recently used run where it has [`STAGED_PER_ENTRY`], which the run being
    /// staged replaces (its buffers to reuse), else none.
    pub fn take(&mut self, entry: &str, shapes: &InputShapes) -> Result<std::rc::Rc<S>, Option<std::rc::Rc<S>>> {
        if let Some(i) = self.runs.iter().position(|(e, s, _)| e == entry && s == shapes) {
            return Ok(self.runs.remove(i).2);
        }
        let of_entry: Vec<usize> = (0..self.runs.len()).filter(|&i| self.runs[i].0 == entry).collect();
        match of_entry[..] {
            [oldest, ..] if of_entry.len() >= STAGED_PER_ENTRY => Err(Some(self.runs.remove(oldest).2)),
            _ => Err(None),
        }
    }

    /// Keeps `run` as entry `entry`'s, staged for `shapes` (the most recently used), replacing one
    /// staged for them and giving up the entry's least recently used beyond [`STAGED_PER_ENTRY`].
    pub fn keep(&mut self, entry: &str, shapes: InputShapes, run: std::rc::Rc<S>) {
        self.runs.retain(|(e, s, _)| !(e == entry && *s == shapes));
        while self.runs.iter().filter(|(e, _, _)| e == entry).count() >= STAGED_PER_ENTRY {
            let oldest = self.runs.iter().position(|(e, _, _)| e == entry).expect("counted");
            self.runs.remove(oldest);
        }
        self.runs.push((entry.to_string(), shapes, run));
    }

    /// Forgets every run: what they point at moved (split-K scratch grown) or failed.
    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// The entries with a run kept.
    pub fn entries(&self) -> Vec<&str> {
        let mut entries: Vec<&str> = self.runs.iter().map(|(e, _, _)| e.as_str()).collect();
        entries.sort_unstable();
        entries.dedup();
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading a buffer's bytes straight into its values gives what converting them does, for
    /// every element type (the fp8 cache's packed rows through the bytes); a read's error and a
    /// byte count no whole number of values are errors; no bytes, an empty buffer.
    #[test]
    fn buffers_read_in_place_are_those_converted() {
        let bytes: Vec<u8> = (0..96u32).map(|i| (i.wrapping_mul(37) % 251) as u8).collect();
        for element in ["f32", "i32", "i64", "bf16", "f8E4M3FN"] {
            let shape = vec![2, 96 / 2 / crate::plan::tensor_bytes(&[1], element).unwrap() as usize];
            let read = read_host_buffer(shape.clone(), element, 96, |b| {
                b.copy_from_slice(&bytes);
                Ok(())
            })
            .unwrap();
            let converted = converted_buffer(&bytes, shape.clone(), element).unwrap();
            assert_eq!(read.shape, converted.shape, "{element}");
            assert_eq!(plan_bytes(&read, element).unwrap(), bytes, "{element}");
            assert_eq!(plan_bytes(&converted, element).unwrap(), bytes, "{element}");
            let empty = read_host_buffer(vec![0, shape[1]], element, 0, |b| match b.is_empty() {
                true => Ok(()),
                false => Err(format!("{} bytes", b.len())),
            });
            assert!(plan_bytes(&empty.unwrap(), element).unwrap().is_empty(), "{element}");
        }
        let row = crate::plan::Fp8LatentRow::of(576).unwrap();
        let values: Vec<f32> = (0..576).map(|i| (i as f32 - 300.0) / 7.0).collect();
        let mut packed = vec![0u8; row.bytes()];
        row.pack(&values, &mut packed);
        let cache = read_host_buffer(vec![1, 576], crate::plan::LATENT_FP8, packed.len(), |b| {
            b.copy_from_slice(&packed);
            Ok(())
        })
        .unwrap();
        assert_eq!(plan_bytes(&cache, crate::plan::LATENT_FP8).unwrap(), packed);
        let err = read_host_buffer(vec![1], "f32", 4, |_| Err("reading output logits: gone".into())).unwrap_err();
        assert_eq!(err, "reading output logits: gone");
        let err = read_host_buffer(vec![1], "i64", 12, |_| Ok(())).unwrap_err();
        assert!(err.contains("12 bytes are not a whole number of 8-byte values"), "{err}");
    }

    fn shapes(rows: usize) -> InputShapes {
        [("tokens".to_string(), vec![rows])].into_iter().collect()
    }

    /// Decode's runs survive prefill chunks staged between its steps; each entry keeps a run per
    /// shapes up to [`STAGED_PER_ENTRY`], giving up the least recently used (whose buffers the new
    /// run takes); a taken run not kept again is staged anew.
    #[test]
    fn each_entry_keeps_its_recent_staged_runs() {
        let mut runs = StagedRuns::default();
        runs.keep("decode", shapes(4), std::rc::Rc::new(4));
        // The chunks' runs: the second 8-row chunk's is the first's; the 3-row one is staged
        // afresh beside it.
        for (chunk, kept) in [(8, None), (8, Some(8)), (3, None), (8, Some(8)), (3, Some(3))] {
            let prefill = runs.take("prefill", &shapes(chunk));
            let got = prefill.as_ref().ok().map(|r| **r);
            assert_eq!(got, kept, "a {chunk}-row chunk");
            assert!(prefill.as_ref().err().is_none_or(Option::is_none), "nothing to give up");
            runs.keep("prefill", shapes(chunk), prefill.unwrap_or_else(|_| std::rc::Rc::new(chunk)));
            let decode = runs.take("decode", &shapes(4)).expect("decode's run, kept through the prefill");
            runs.keep("decode", shapes(4), decode);
        }
        assert_eq!(runs.entries(), vec!["decode", "prefill"]);
        // Decode at 1, 2, 8, 16, ... rows: the 4-row run (the least recently used) is given up for
        // the run past the limit, which takes its buffers.
        for (k, rows) in [1, 2, 8, 16, 32, 64, 128, 256].into_iter().enumerate() {
            let taken = runs.take("decode", &shapes(rows));
            let full = k + 1 == STAGED_PER_ENTRY;
            assert_eq!(taken, Err(full.then(|| std::rc::Rc::new(4))), "{rows} rows");
            runs.keep("decode", shapes(rows), std::rc::Rc::new(rows));
        }
        assert_eq!(runs.take("decode", &shapes(4)).err(), Some(Some(std::rc::Rc::new(1))), "1 row, now the oldest");
        runs.keep("decode", shapes(4), std::rc::Rc::new(40));
        assert_eq!(runs.take("decode", &shapes(2)), Ok(std::rc::Rc::new(2)));
        assert_eq!(runs.take("decode", &shapes(2)), Err(None), "taken out, not kept again");
        assert_eq!(runs.take("prefill", &shapes(3)), Ok(std::rc::Rc::new(3)), "other entries keep theirs");
        runs.clear();
        assert!(runs.entries().is_empty());
    }
}
