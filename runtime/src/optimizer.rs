//! A training step's optimizer on the device (the artifact's [`OptimizerSpec`] kernels): the
//! trained parameters' f32 masters are the step's own weight buffers, updated in place; AdamW's
//! moments (bf16) and the windows' summed gradients live beside them. Per step the host sends the
//! tokens and the scalars, and reads the loss, the routed experts and one f32 per `chunk`
//! gradient elements (the squares' parts, for the clipping norm) — not the parameters and
//! gradients that a host optimizer moves both ways every step.
//!
//! The same launches run on a GPU ([`crate::cuda::GpuArtifact`]) and on the host through the
//! kernels' CPU lowering (`v3c_compiler::emulate`), which is how the tests check them.

use std::collections::HashMap;

use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
use v3c_models::tensor::Tensor;
use v3c_models::train::AdamWStep;

use crate::abi::{memref, Buf, KernelAbi, KernelLaunch};
use crate::artifact::Artifact;
use crate::gpu::Bindings;
use crate::lowering::{OptimizerSpec, ADAMW_HYPER};
use crate::plan::{BufferKind, EntryPlan};

/// Memory and launches beside an artifact's entries, where it runs them.
pub trait Device {
    /// `bytes` of zeroed memory, kept as long as the device.
    fn alloc_zeroed(&mut self, bytes: usize, what: &str) -> Result<u64, String>;
    fn write(&mut self, addr: u64, bytes: &[u8], what: &str) -> Result<(), String>;
    fn read(&mut self, addr: u64, bytes: usize, what: &str) -> Result<Vec<u8>, String>;
    /// Runs `launches` in order and waits for them.
    fn launch(&mut self, launches: &[KernelLaunch]) -> Result<(), String>;
    /// Where the loaded artifact's buffers are.
    fn bindings(&self) -> &Bindings;
    /// Bytes still free to allocate (None: not known).
    fn free_bytes(&self) -> Option<usize> {
        None
    }
}

/// The launches of an artifact's optimizer kernels.
#[derive(Debug, Clone)]
pub struct OptimizerKernels {
    spec: OptimizerSpec,
}

impl OptimizerKernels {
    /// The artifact's optimizer kernels, each checked to be a row kernel of the memrefs the
    /// launches pass; None when it has none (AdamW then runs on the host).
    pub fn of(artifact: &Artifact) -> Result<Option<OptimizerKernels>, String> {
        let Some(spec) = artifact.lowering.as_ref().and_then(|l| l.optimizer.clone()) else { return Ok(None) };
        for (name, ranks) in spec.kernels() {
            let abi = artifact.manifest.kernels.iter().find(|k| k.name == name).and_then(|k| k.abi.as_ref());
            match abi {
                Some(KernelAbi::Memrefs { ranks: r }) if r[..] == *ranks => {}
                other => {
                    return Err(format!("optimizer kernel {name}: takes {other:?}, not memrefs of ranks {ranks:?}"))
                }
            }
        }
        Ok(Some(OptimizerKernels { spec }))
    }

    /// Blocks over a tensor of `n` elements (and parts the squares give it).
    pub fn blocks(&self, n: usize) -> usize {
        n.div_ceil(self.spec.chunk)
    }

    fn launch(&self, kernel: &str, n: usize, ops: &[&Buf]) -> Result<KernelLaunch, String> {
        let mut params = Vec::new();
        for b in ops {
            params.extend(memref(b, 1)?);
        }
        Ok(KernelLaunch {
            kernel: kernel.to_string(),
            grid: self.blocks(n),
            grid_y: 1,
            params,
            tensor_maps: Vec::new(),
            operands: ops.iter().map(|b| (*b).clone()).collect(),
        })
    }

    /// `acc = g` (`first`) or `acc += g`, over `n` f32.
    pub fn accumulate(&self, g: u64, acc: u64, n: usize, first: bool) -> Result<KernelLaunch, String> {
        let kernel = if first { &self.spec.accumulate_first } else { &self.spec.accumulate };
        self.launch(kernel, n, &[&flat(g, n, "f32"), &flat(acc, n, "f32")])
    }

    /// The squares of `g` (`n` f32) summed per block into `part` ([`OptimizerKernels::blocks`] f32).
    pub fn squares(&self, g: u64, part: u64, n: usize) -> Result<KernelLaunch, String> {
        self.launch(&self.spec.squares, n, &[&flat(g, n, "f32"), &flat(part, self.blocks(n), "f32")])
    }

    /// AdamW over `n` elements: master `w`, gradient `g` (f32), moments `m`, `v` (bf16), scalars
    /// `hyper` ([`ADAMW_HYPER`] f32).
    pub fn adamw(&self, [w, g, m, v, hyper]: [u64; 5], n: usize) -> Result<KernelLaunch, String> {
        let ops = [flat(w, n, "f32"), flat(g, n, "f32"), flat(m, n, "bf16"), flat(v, n, "bf16")];
        self.launch(&self.spec.adamw, n, &[&ops[0], &ops[1], &ops[2], &ops[3], &flat(hyper, ADAMW_HYPER, "f32")])
    }

    /// One launch of each kernel over `n` elements at made-up addresses (for checking them
    /// against their PTX).
    pub fn samples(&self, n: usize, addr: &mut dyn FnMut() -> u64) -> Result<Vec<KernelLaunch>, String> {
        Ok(vec![
            self.accumulate(addr(), addr(), n, true)?,
            self.accumulate(addr(), addr(), n, false)?,
            self.squares(addr(), addr(), n)?,
            self.adamw([addr(), addr(), addr(), addr(), addr()], n)?,
        ])
    }
}

fn flat(addr: u64, n: usize, element: &'static str) -> Buf {
    Buf { addr, shape: vec![n], element }
}

/// One trained parameter on the device.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    /// Its f32 master: the step's weight buffer (or an expert's part of the stacked one).
    master: u64,
    /// Where each run of the step leaves its gradient.
    grad: u64,
    /// Its bytes' offset in the moments' region (m, then v: 2 bytes an element each) and in the
    /// summed gradients' (4 bytes), 256-byte aligned.
    moments_at: u64,
    acc_at: u64,
}

impl Slot {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn m(&self, moments: u64) -> u64 {
        moments + self.moments_at
    }

    fn v(&self, moments: u64) -> u64 {
        moments + self.moments_at + 2 * self.elements() as u64
    }
}

/// The optimizer's state on a device: every trained parameter's slot, the squares' parts and the
/// scalars' region.
pub struct DeviceAdamW {
    kernels: OptimizerKernels,
    slots: Vec<Slot>,
    /// Every slot's bf16 moments: one allocation.
    moments: u64,
    /// Every slot's summed gradient (f32; made for the first step of several windows) and its bytes.
    acc: Option<u64>,
    acc_bytes: usize,
    /// Per slot, its first part in `parts`.
    part_at: Vec<usize>,
    parts: u64,
    /// `[slots, ADAMW_HYPER]` f32.
    hyper: u64,
    /// The last window's gradients were summed into `acc` (a step of several windows).
    summed: bool,
}

impl DeviceAdamW {
    /// Places `trained` (names and shapes) on `device`: masters found among the weights
    /// `plan` binds as f32 (experts' in their stacks), gradients at the plan's `grad.<name>`
    /// outputs, moments `m`, `v` uploaded as bf16.
    pub fn new(
        kernels: OptimizerKernels,
        device: &mut dyn Device,
        plan: &EntryPlan,
        trained: &[(String, Vec<usize>)],
        m: &HashMap<String, Vec<f32>>,
        v: &HashMap<String, Vec<f32>>,
    ) -> Result<DeviceAdamW, String> {
        // Every slot's place in the regions, then the moments' region checked against the free memory
        // before anything is allocated: a clear refusal rather than an allocation failing halfway.
        let mut slots = Vec::new();
        let (mut part_at, mut parts, mut moment_bytes, mut acc_bytes) = (Vec::new(), 0, 0usize, 0usize);
        for (name, shape) in trained {
            let n: usize = shape.iter().product();
            let master = master_address(device.bindings(), plan, name, shape)?;
            let grad_name = format!("grad.{name}");
            let (_, id) = plan
                .outputs
                .iter()
                .find(|(o, _)| *o == grad_name)
                .ok_or_else(|| format!("the training step has no output {grad_name}"))?;
            let b = &plan.buffers[*id];
            if b.dtype != "f32" || b.shape != *shape {
                return Err(format!(
                    "{grad_name}: {:?} {} in the plan, the parameter is {shape:?} f32",
                    b.shape, b.dtype
                ));
            }
            let grad = device.bindings().address(&b.kind)?;
            let (moments_at, acc_at) = (moment_bytes as u64, acc_bytes as u64);
            moment_bytes += (4 * n).next_multiple_of(256);
            acc_bytes += (4 * n).next_multiple_of(256);
            part_at.push(parts);
            parts += kernels.blocks(n);
            slots.push(Slot { name: name.clone(), shape: shape.clone(), master, grad, moments_at, acc_at });
        }
        if let Some(free) = device.free_bytes().filter(|&f| moment_bytes > f) {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            return Err(format!(
                "AdamW on the device needs {:.1} GiB for its bf16 moments ({} trained tensors), {:.1} GiB are free \
                 (train with --host-optimizer, or a smaller model)",
                gib(moment_bytes),
                slots.len(),
                gib(free)
            ));
        }
        let moments = device.alloc_zeroed(moment_bytes.max(1), "AdamW's moments")?;
        for s in &slots {
            let n = s.elements();
            for (all, which, at) in [(m, "m", s.m(moments)), (v, "v", s.v(moments))] {
                let values = all.get(&s.name).ok_or_else(|| format!("no moment {which} for {}", s.name))?;
                if values.len() != n {
                    return Err(format!("moment {which} of {}: {} values for {n} elements", s.name, values.len()));
                }
                let bytes: Vec<u8> = values.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect();
                device.write(at, &bytes, &format!("moment {which} of {}", s.name))?;
            }
        }
        let parts_addr = device.alloc_zeroed(4 * parts.max(1), "the gradients' squares")?;
        let hyper = device.alloc_zeroed(4 * ADAMW_HYPER * slots.len().max(1), "AdamW's scalars")?;
        Ok(DeviceAdamW {
            kernels,
            slots,
            moments,
            acc: None,
            acc_bytes,
            part_at,
            parts: parts_addr,
            hyper,
            summed: false,
        })
    }

    /// After window `index` of `windows` ran: its gradients summed into the step's (none to sum
    /// for a step of one window: AdamW reads the run's own).
    pub fn window_done(&mut self, device: &mut dyn Device, index: usize, windows: usize) -> Result<(), String> {
        self.summed = windows > 1;
        if !self.summed {
            return Ok(());
        }
        let acc = match self.acc {
            Some(a) => a,
            None => {
                if let Some(free) = device.free_bytes().filter(|&f| self.acc_bytes > f) {
                    return Err(format!(
                        "steps of {windows} windows: AdamW on the device sums their gradients in {:.1} GiB more, {:.1} \
                         GiB are free (one window a step needs none)",
                        self.acc_bytes as f64 / (1u64 << 30) as f64,
                        free as f64 / (1u64 << 30) as f64
                    ));
                }
                *self.acc.insert(device.alloc_zeroed(self.acc_bytes.max(1), "the summed gradients")?)
            }
        };
        let mut launches = Vec::new();
        for s in &self.slots {
            if s.elements() > 0 {
                launches.push(self.kernels.accumulate(s.grad, acc + s.acc_at, s.elements(), index == 0)?);
            }
        }
        device.launch(&launches)
    }

    /// The step's gradient of slot `s`.
    fn gradient(&self, s: &Slot) -> u64 {
        match (self.summed, self.acc) {
            (true, Some(acc)) => acc + s.acc_at,
            _ => s.grad,
        }
    }

    /// Per trained parameter, the sum of its step gradient's squares (the device's per-block f32
    /// parts added in f64, in order).
    pub fn grad_squares(&self, device: &mut dyn Device) -> Result<Vec<f64>, String> {
        let mut launches = Vec::new();
        for (s, &at) in self.slots.iter().zip(&self.part_at) {
            if s.elements() > 0 {
                launches.push(self.kernels.squares(self.gradient(s), self.parts + 4 * at as u64, s.elements())?);
            }
        }
        device.launch(&launches)?;
        let total =
            self.part_at.last().zip(self.slots.last()).map_or(0, |(a, s)| a + self.kernels.blocks(s.elements()));
        let bytes = device.read(self.parts, 4 * total, "the gradients' squares")?;
        let parts: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(self
            .slots
            .iter()
            .zip(&self.part_at)
            .map(|(s, &at)| parts[at..at + self.kernels.blocks(s.elements())].iter().map(|&p| p as f64).sum())
            .collect())
    }

    /// AdamW on every slot (`steps` in order) from `grad_scale` times its step gradient.
    pub fn adamw(&self, device: &mut dyn Device, grad_scale: f32, steps: &[AdamWStep]) -> Result<(), String> {
        if steps.len() != self.slots.len() {
            return Err(format!("{} AdamW steps for {} trained parameters", steps.len(), self.slots.len()));
        }
        let hyper: Vec<u8> = steps.iter().flat_map(|s| s.hyper(grad_scale)).flat_map(f32::to_le_bytes).collect();
        device.write(self.hyper, &hyper, "AdamW's scalars")?;
        let mut launches = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.elements() > 0 {
                let h = self.hyper + (4 * ADAMW_HYPER * i) as u64;
                let (m, v) = (s.m(self.moments), s.v(self.moments));
                launches.push(self.kernels.adamw([s.master, self.gradient(s), m, v, h], s.elements())?);
            }
        }
        device.launch(&launches)
    }

    /// The trained parameters (f32) and moments as the device holds them.
    pub fn download(
        &self,
        device: &mut dyn Device,
        params: &mut HashMap<String, Tensor>,
        m: &mut HashMap<String, Vec<f32>>,
        v: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(), String> {
        for s in &self.slots {
            let n = s.elements();
            let w = device.read(s.master, 4 * n, &s.name)?;
            let w = w.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            params.insert(s.name.clone(), Tensor::f32(s.shape.clone(), w));
            for (addr, into, which) in [(s.m(self.moments), &mut *m, "m"), (s.v(self.moments), &mut *v, "v")] {
                let bytes = device.read(addr, 2 * n, &format!("moment {which} of {}", s.name))?;
                into.insert(
                    s.name.clone(),
                    bytes.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
                );
            }
        }
        Ok(())
    }
}

/// Where parameter `name` (of `shape`) is kept as the f32 master the step reads: its weight buffer,
/// or expert e's part of a stacked `...experts.*...` one.
fn master_address(bindings: &Bindings, plan: &EntryPlan, name: &str, shape: &[usize]) -> Result<u64, String> {
    let (bound, index) = match expert_of(name) {
        Some((stacked, e)) => (stacked, Some(e)),
        None => (name.to_string(), None),
    };
    let b = plan
        .buffers
        .iter()
        .find(|b| matches!(&b.kind, BufferKind::Weight { name: n } if *n == bound))
        .ok_or_else(|| format!("parameter {name}: the training step binds no weight {bound}"))?;
    let addr = bindings.weights.get(&bound).copied().unwrap_or(0);
    if addr == 0 {
        return Err(format!(
            "parameter {name}: weight {bound} is only read re-laid out, so AdamW cannot update it in place"
        ));
    }
    let n: usize = shape.iter().product();
    let (want, offset) = match index {
        Some(e) => {
            let fits = b.shape.first().is_some_and(|&experts| e < experts) && b.shape[1..] == *shape;
            (fits, (4 * n * e) as u64)
        }
        None => (b.shape == shape, 0),
    };
    if b.dtype != "f32" || !want {
        return Err(format!("parameter {name} {shape:?}: weight {bound} is {:?} {} in the plan", b.shape, b.dtype));
    }
    Ok(addr + offset)
}

/// `model.layers.3.mlp.experts.17.up_proj.weight` -> (`model.layers.3.mlp.experts.*.up_proj.weight`, 17).
fn expert_of(name: &str) -> Option<(String, usize)> {
    let (head, tail) = name.split_once(".experts.")?;
    let (index, rest) = tail.split_once('.')?;
    let e = index.parse().ok()?;
    Some((format!("{head}.experts.*.{rest}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_are_found_in_their_stacks() {
        assert_eq!(
            expert_of("model.layers.3.mlp.experts.17.up_proj.weight"),
            Some(("model.layers.3.mlp.experts.*.up_proj.weight".to_string(), 17))
        );
        assert_eq!(expert_of("model.layers.3.mlp.shared_experts.up_proj.weight"), None);
        assert_eq!(expert_of("model.layers.3.mlp.gate.weight"), None);
    }
}
