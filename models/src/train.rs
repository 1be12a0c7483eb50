//! Training on the reference interpreter (the oracle of training): the DeepSeek-V3 prefill graph
//! with a mean cross-entropy loss and its backward pass ([`crate::autodiff`]), gradient
//! accumulation over the sequences of a batch, clipping by global norm, AdamW (f32 master weights,
//! moments rounded to bf16 as stored), a linear warm-up then cosine learning rate, and the
//! auxiliary-loss-free balancing: after each step every MoE layer's routing bias moves by
//! `gamma * sign(mean(c) - c)` for its per-expert loads `c`.

use std::collections::HashMap;

use crate::autodiff::backward;
use crate::config::ModelConfig;
use crate::deepseek_v3::{build, BuildOptions, Entry};
use crate::dtype::{bf16_to_f32, f32_to_bf16, DType};
use crate::graph::{Builder, Dim, Graph, GraphError, Op};
use crate::interp::{InterpError, Interpreter};
use crate::tensor::Tensor;

/// Optimizer and schedule settings (DeepSeek-V3's recipe shapes, small defaults for tiny models).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub lr: f32,
    /// Final learning rate as a fraction of `lr` at the end of the cosine.
    pub min_lr_ratio: f32,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay on matrices (not on norms and biases).
    pub weight_decay: f32,
    /// Gradients are scaled down when their global norm exceeds this.
    pub clip_norm: f32,
    /// Bias update speed of the loss-free balancing.
    pub bias_update: f32,
    /// Weight (lambda) of the MTP loss when the model has an MTP module (0: not trained).
    pub mtp_weight: f32,
    /// Weight (alpha) of the complementary sequence-wise balance loss of each MoE layer, over the
    /// tokens of each window (0: off; DeepSeek-V3 uses 1e-4).
    pub balance_alpha: f32,
    /// DeepSeek-V3's FP8 recipe: every projection GEMM in e4m3 (Fprop, Dgrad, Wgrad; weights
    /// quantized 128x128 from the f32 masters each step), the rest in f32.
    pub fp8: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            total_steps: 200,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_norm: 1.0,
            bias_update: 1e-3,
            mtp_weight: 0.3,
            balance_alpha: 1e-4,
            fp8: false,
        }
    }
}

impl TrainConfig {
    /// The learning rate of step `step` (0-based): linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f32 / span as f32).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
    }
}

/// What one optimizer step saw.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub step: usize,
    /// Mean loss over the batch's sequences.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// Per MoE layer (by its bias parameter), tokens routed to each expert in this step.
    pub expert_load: Vec<(String, Vec<usize>)>,
}

impl StepReport {
    /// Max over mean of the expert loads, the worst layer (1.0 is perfectly balanced).
    pub fn max_mean_load(&self) -> f32 {
        self.expert_load
            .iter()
            .map(|(_, c)| {
                let mean = c.iter().sum::<usize>() as f32 / c.len().max(1) as f32;
                *c.iter().max().unwrap_or(&0) as f32 / mean.max(f32::MIN_POSITIVE)
            })
            .fold(0.0, f32::max)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error("{0}")]
    Invalid(String),
    /// A compiled backend failed to run the training graph.
    #[error("{0}")]
    Backend(String),
}

/// What runs the training graph of a [`Trainer`]: the reference interpreter ([`Reference`]) or a
/// compiled backend (the compiler's CPU backend implements it). Per optimizer step, [`load`] gets
/// the current parameters once, then [`run`] runs one window.
///
/// [`load`]: StepBackend::load
/// [`run`]: StepBackend::run
pub trait StepBackend {
    /// Takes the parameters (checkpoint names, f32) the next windows run with.
    fn load(&mut self, graph: &Graph, params: &HashMap<String, Tensor>) -> Result<(), TrainError>;
    /// Runs the training graph on `inputs` (by input name) and returns the outputs in `wanted`.
    fn run(&mut self, inputs: &HashMap<String, Tensor>, wanted: &[&str])
        -> Result<HashMap<String, Tensor>, TrainError>;
    /// The backend's own optimizer, when it keeps the parameters and moments where it runs the
    /// step (a GPU's memory); None: the trainer's AdamW on the host.
    fn device_optimizer(&mut self) -> Option<&mut dyn DeviceOptimizer> {
        None
    }
}

/// A backend that keeps the trained parameters and AdamW's moments where it runs the step (a
/// GPU's memory), so that a step moves little more than its tokens and scalars: the windows'
/// gradients summed there, their squares summed per block (the trainer adds the parts for the
/// clipping norm), AdamW ([`AdamWStep::apply`]) there. The [`Trainer`] uploads its state once
/// and reads it back when asked ([`Trainer::fetch`]).
pub trait DeviceOptimizer {
    /// Takes every parameter (`trained`: those with gradients, in the order the other calls use)
    /// and the moments of the trained ones.
    fn upload(
        &mut self,
        graph: &Graph,
        params: &HashMap<String, Tensor>,
        trained: &[String],
        m: &HashMap<String, Vec<f32>>,
        v: &HashMap<String, Vec<f32>>,
    ) -> Result<(), TrainError>;
    /// Runs window `index` of a step of `windows` on `inputs`: the outputs in `wanted` (no
    /// gradients), the window's gradients added to the step's on the device.
    fn run_window(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        wanted: &[&str],
        index: usize,
        windows: usize,
    ) -> Result<HashMap<String, Tensor>, TrainError>;
    /// Per trained parameter, the sum of the squares of the step's summed gradient.
    fn grad_squares(&mut self) -> Result<Vec<f64>, TrainError>;
    /// AdamW on every trained parameter (`steps` in order) from `grad_scale` times the summed
    /// gradient.
    fn adamw(&mut self, grad_scale: f32, steps: &[AdamWStep]) -> Result<(), TrainError>;
    /// Replaces parameter `name`, one no gradient trains (a routing bias), by `params[name]`.
    fn set_param(&mut self, name: &str, params: &HashMap<String, Tensor>) -> Result<(), TrainError>;
    /// The trained parameters and their moments as the device holds them.
    fn download(
        &mut self,
        params: &mut HashMap<String, Tensor>,
        m: &mut HashMap<String, Vec<f32>>,
        v: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(), TrainError>;
}

/// The reference interpreter as a [`StepBackend`]: the oracle of training.
#[derive(Default)]
pub struct Reference {
    interp: Option<Interpreter>,
}

impl StepBackend for Reference {
    fn load(&mut self, graph: &Graph, params: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        self.interp = Some(Interpreter::with_params(graph.clone(), params.clone())?);
        Ok(())
    }

    fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        wanted: &[&str],
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let interp = self.interp.as_ref().ok_or_else(|| TrainError::Invalid("no parameters loaded".into()))?;
        Ok(interp.run(inputs, wanted)?)
    }
}

/// A model being trained: parameters, optimizer state, the training graph.
pub struct Trainer {
    pub config: ModelConfig,
    pub train: TrainConfig,
    graph: Graph,
    pub params: HashMap<String, Tensor>,
    /// AdamW moments per parameter (bf16 values, kept as f32) and the steps taken.
    pub m: HashMap<String, Vec<f32>>,
    pub v: HashMap<String, Vec<f32>>,
    pub step: usize,
    /// Per MoE layer: the routing bias parameter (softmax routing: the gate's name, no parameter)
    /// and the graph output of its expert indices.
    routes: Vec<(String, String)>,
    trained: Vec<String>,
    /// The MTP module is trained (loss = next-token CE + mtp_weight x MTP CE).
    pub mtp: bool,
    /// The trained parameters and moments live on a backend's device since its first step there:
    /// `params`, `m` and `v` hold them only as of the last [`Trainer::fetch`].
    resident: bool,
}

fn bf16_round(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

impl Trainer {
    /// A trainer over `params` (checkpoint names, f32) for `config`'s prefill graph (no MTP).
    pub fn new(
        config: &ModelConfig,
        params: HashMap<String, Tensor>,
        train: TrainConfig,
    ) -> Result<Trainer, TrainError> {
        let TrainingGraph { graph, routes, trained, mtp } = training_graph(config, &train)?;
        for (name, _, _, _) in graph.params() {
            if !params.contains_key(name) {
                return Err(TrainError::Invalid(format!("parameter {name} not given")));
            }
        }
        let zeros = |name: &String| vec![0.0f32; params[name].len()];
        let m = trained.iter().map(|n| (n.clone(), zeros(n))).collect();
        let v = trained.iter().map(|n| (n.clone(), zeros(n))).collect();
        Ok(Trainer {
            config: config.clone(),
            train,
            graph,
            params,
            m,
            v,
            step: 0,
            routes,
            trained,
            mtp,
            resident: false,
        })
    }

    /// Tokens a training window holds beyond the sequence: its next-token targets need one, the
    /// MTP targets (t + 2) one more.
    pub fn window_extra(&self) -> usize {
        1 + usize::from(self.mtp)
    }

    /// The training graph: the forward pass, the loss, and `grad.<parameter>` outputs (what a
    /// compiled [`StepBackend`] compiles).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// One optimizer step over `batch` on the reference interpreter (see [`Trainer::step_on`]).
    pub fn step(&mut self, batch: &[Vec<i64>]) -> Result<StepReport, TrainError> {
        self.step_on(&mut Reference::default(), batch)
    }

    /// The inputs of the training graph for one window of tokens.
    pub fn window_inputs(&self, window: &[i64]) -> Result<HashMap<String, Tensor>, TrainError> {
        let extra = self.window_extra();
        if window.len() <= extra {
            return Err(TrainError::Invalid(format!("a window needs more than {extra} tokens")));
        }
        let t = window.len() - extra;
        let ids = |from: usize| Tensor::i64(vec![t], window[from..from + t].to_vec());
        let mut inputs = HashMap::new();
        inputs.insert("tokens".to_string(), ids(0));
        inputs.insert("targets".to_string(), ids(1));
        inputs.insert("positions".to_string(), Tensor::i64(vec![t], (0..t as i64).collect()));
        let empty_cache = || Tensor::f32(vec![0, self.config.cache_dim()], vec![]);
        for l in 0..self.config.num_hidden_layers {
            inputs.insert(format!("kv_cache.{l}"), empty_cache());
        }
        if self.mtp {
            inputs.insert("mtp_tokens".to_string(), ids(1));
            inputs.insert("mtp_targets".to_string(), ids(2));
            inputs.insert("kv_cache.mtp".to_string(), empty_cache());
        }
        Ok(inputs)
    }

    /// One optimizer step over `batch` (windows of a sequence's tokens plus
    /// [`Trainer::window_extra`] more), the training graph run by `backend`: gradients averaged
    /// over the sequences, clipped, AdamW, then the balancing bias update. A backend with its own
    /// optimizer ([`StepBackend::device_optimizer`]) gets the state on its first step and keeps it
    /// ([`Trainer::fetch`] reads it back).
    pub fn step_on(&mut self, backend: &mut dyn StepBackend, batch: &[Vec<i64>]) -> Result<StepReport, TrainError> {
        if batch.is_empty() {
            return Err(TrainError::Invalid("an empty batch".into()));
        }
        if let Some(device) = backend.device_optimizer() {
            return self.step_on_device(device, batch);
        }
        if self.resident {
            return Err(TrainError::Invalid(
                "the parameters live on another backend's device: fetch them before stepping on this one".into(),
            ));
        }
        backend.load(&self.graph, &self.params)?;
        let mut grads: HashMap<String, Vec<f64>> = HashMap::new();
        let mut totals = WindowTotals::new(self);
        let grad_names: Vec<String> = self.trained.iter().map(|n| format!("grad.{n}")).collect();
        let mut wanted: Vec<&str> = grad_names.iter().map(String::as_str).collect();
        wanted.extend(totals.wanted(self));
        for window in batch {
            let inputs = self.window_inputs(window)?;
            let out = backend.run(&inputs, &wanted)?;
            totals.add(self, &out)?;
            for name in &self.trained {
                let key = format!("grad.{name}");
                let g = out.get(&key).ok_or_else(|| missing(&key))?.as_f32().unwrap_or(&[]);
                let acc = grads.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
                let each = per_thread(acc.len());
                run_jobs(
                    acc.chunks_mut(each)
                        .zip(g.chunks(each))
                        .map(|(acc, g)| {
                            move || {
                                for (a, x) in acc.iter_mut().zip(g) {
                                    *a += *x as f64;
                                }
                            }
                        })
                        .collect(),
                );
            }
        }
        let n = batch.len() as f64;
        // Squares summed in fixed chunks of each gradient, then those sums in the trainer's order:
        // the same bits on every run and machine.
        let norm = self
            .trained
            .iter()
            .map(|name| {
                let g = &grads[name];
                let mut partial = vec![0.0f64; g.len().div_ceil(SUM_CHUNK)];
                let each = per_thread(partial.len() * SUM_CHUNK) / SUM_CHUNK + 1;
                run_jobs(
                    partial
                        .chunks_mut(each)
                        .zip(g.chunks(each * SUM_CHUNK))
                        .map(|(sums, g)| {
                            move || {
                                for (s, g) in sums.iter_mut().zip(g.chunks(SUM_CHUNK)) {
                                    *s = g.iter().map(|x| (x / n).powi(2)).sum::<f64>();
                                }
                            }
                        })
                        .collect(),
                );
                partial.iter().sum::<f64>()
            })
            .sum::<f64>()
            .sqrt();
        let (clip, steps) = self.adamw_steps(norm);
        for (name, adamw) in self.trained.iter().zip(steps) {
            let g = &grads[name];
            let p = self.params.get_mut(name).expect("checked at construction");
            let shape = p.shape.clone();
            let mut w = p.as_f32().unwrap_or(&[]).to_vec();
            let (m, v) = (self.m.get_mut(name).expect("moments"), self.v.get_mut(name).expect("moments"));
            let each = per_thread(w.len());
            // Element by element (threads take disjoint ranges: the same bits as one thread).
            let ranges = w.chunks_mut(each).zip(m.chunks_mut(each)).zip(v.chunks_mut(each)).zip(g.chunks(each));
            run_jobs(
                ranges
                    .map(|(((w, m), v), g)| {
                        move || {
                            for i in 0..w.len() {
                                adamw.apply((g[i] / n * clip) as f32, &mut w[i], &mut m[i], &mut v[i]);
                            }
                        }
                    })
                    .collect(),
            );
            *p = Tensor::f32(shape, w);
        }
        self.balance(&totals.loads);
        Ok(totals.report(self, n, norm))
    }

    /// [`Trainer::step_on`] with the backend's device holding the state: the windows' gradients
    /// summed there, the norm from its squares, AdamW there; the routing biases (no gradient trains
    /// them) updated here and sent.
    fn step_on_device(
        &mut self,
        device: &mut dyn DeviceOptimizer,
        batch: &[Vec<i64>],
    ) -> Result<StepReport, TrainError> {
        if !self.resident {
            device.upload(&self.graph, &self.params, &self.trained, &self.m, &self.v)?;
            self.resident = true;
        }
        let mut totals = WindowTotals::new(self);
        let wanted = totals.wanted(self);
        for (i, window) in batch.iter().enumerate() {
            let inputs = self.window_inputs(window)?;
            let out = device.run_window(&inputs, &wanted, i, batch.len())?;
            totals.add(self, &out)?;
        }
        let n = batch.len() as f64;
        let squares = device.grad_squares()?;
        if squares.len() != self.trained.len() {
            return Err(TrainError::Backend(format!(
                "the device gave {} gradients' squares for {} trained parameters",
                squares.len(),
                self.trained.len()
            )));
        }
        let norm = (squares.iter().sum::<f64>() / (n * n)).sqrt();
        let (clip, steps) = self.adamw_steps(norm);
        device.adamw((clip / n) as f32, &steps)?;
        for bias in self.balance(&totals.loads) {
            device.set_param(&bias, &self.params)?;
        }
        Ok(totals.report(self, n, norm))
    }

    /// The mean loss (the objective the steps minimize: the next-token loss with the MTP and
    /// balance terms as weighted) over `windows` with the parameters as they are: nothing is
    /// updated (no optimizer step, no bias moved, the step count kept). On a backend that keeps
    /// the parameters on its device, they are uploaded first if they are not there yet.
    pub fn evaluate(&mut self, backend: &mut dyn StepBackend, windows: &[Vec<i64>]) -> Result<f32, TrainError> {
        if windows.is_empty() {
            return Err(TrainError::Invalid("no windows to evaluate".into()));
        }
        let loss_of = |out: &HashMap<String, Tensor>| -> Result<f64, TrainError> {
            Ok(out.get("loss").ok_or_else(|| missing("loss"))?.as_f32().unwrap_or(&[f32::NAN])[0] as f64)
        };
        let mut total = 0.0f64;
        if let Some(device) = backend.device_optimizer() {
            if !self.resident {
                device.upload(&self.graph, &self.params, &self.trained, &self.m, &self.v)?;
                self.resident = true;
            }
            for window in windows {
                // A one-window step's gradients stay where the step left them; the next step's
                // first window replaces them.
                total += loss_of(&device.run_window(&self.window_inputs(window)?, &["loss"], 0, 1)?)?;
            }
        } else {
            if self.resident {
                return Err(TrainError::Invalid(
                    "the parameters live on another backend's device: fetch them before evaluating on this one".into(),
                ));
            }
            backend.load(&self.graph, &self.params)?;
            for window in windows {
                total += loss_of(&backend.run(&self.window_inputs(window)?, &["loss"])?)?;
            }
        }
        Ok((total / windows.len() as f64) as f32)
    }

    /// Reads the parameters and moments back from `backend`'s device when they live there (see
    /// [`DeviceOptimizer`]): `params`, `m` and `v` are then current.
    pub fn fetch(&mut self, backend: &mut dyn StepBackend) -> Result<(), TrainError> {
        if !self.resident {
            return Ok(());
        }
        let device = backend
            .device_optimizer()
            .ok_or_else(|| TrainError::Invalid("the parameters live on a device this backend does not hold".into()))?;
        device.download(&mut self.params, &mut self.m, &mut self.v)
    }

    /// The clipping factor for the gradients' global `norm`, and this step's AdamW per trained
    /// parameter (the step counted).
    fn adamw_steps(&mut self, norm: f64) -> (f64, Vec<AdamWStep>) {
        let clip = if norm > self.train.clip_norm as f64 { self.train.clip_norm as f64 / norm } else { 1.0 };
        let lr = self.train.lr_at(self.step);
        self.step += 1;
        let (b1, b2) = (self.train.beta1, self.train.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        let steps = self
            .trained
            .iter()
            .map(|name| {
                let matrix = self.params.get(name).is_some_and(|p| p.shape.len() >= 2);
                let weight_decay = if matrix { self.train.weight_decay } else { 0.0 };
                AdamWStep { lr, b1, b2, c1, c2, eps: self.train.eps, weight_decay }
            })
            .collect();
        (clip, steps)
    }

    /// The balancing bias update of every MoE layer from its expert `loads`; the biases' names.
    fn balance(&mut self, loads: &[Vec<usize>]) -> Vec<String> {
        let mut moved = Vec::new();
        for ((bias, _), c) in self.routes.iter().zip(loads) {
            if let Some(p) = self.params.get_mut(bias) {
                let shape = p.shape.clone();
                let w = balance_bias(p.as_f32().unwrap_or(&[]), c, self.train.bias_update);
                *p = Tensor::f32(shape, w);
                moved.push(bias.clone());
            }
        }
        moved
    }
}

fn missing(name: &str) -> TrainError {
    TrainError::Backend(format!("the training graph returned no '{name}'"))
}

/// What a step's windows add up to besides gradients: the loss and each MoE layer's expert loads.
struct WindowTotals {
    loss: f64,
    loads: Vec<Vec<usize>>,
}

impl WindowTotals {
    fn new(t: &Trainer) -> WindowTotals {
        WindowTotals { loss: 0.0, loads: vec![vec![0; t.config.n_routed_experts]; t.routes.len()] }
    }

    /// The outputs they are read from.
    fn wanted<'a>(&self, t: &'a Trainer) -> Vec<&'a str> {
        std::iter::once("loss").chain(t.routes.iter().map(|(_, o)| o.as_str())).collect()
    }

    fn add(&mut self, t: &Trainer, out: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        self.loss += out.get("loss").ok_or_else(|| missing("loss"))?.as_f32().unwrap_or(&[0.0])[0] as f64;
        let experts = t.config.n_routed_experts;
        for (layer, (_, o)) in t.routes.iter().enumerate() {
            for e in out.get(o.as_str()).ok_or_else(|| missing(o))?.as_ids().unwrap_or_default() {
                if (e as usize) < experts {
                    self.loads[layer][e as usize] += 1;
                }
            }
        }
        Ok(())
    }

    fn report(self, t: &Trainer, n: f64, norm: f64) -> StepReport {
        let expert_load = t.routes.iter().map(|(b, _)| b.clone()).zip(self.loads).collect();
        StepReport {
            step: t.step,
            loss: (self.loss / n) as f32,
            grad_norm: norm as f32,
            lr: t.train.lr_at(t.step - 1),
            expert_load,
        }
    }
}

/// One AdamW step's scalars for one parameter: `apply` is the arithmetic of every optimizer here
/// (the trainer's on the host, the device kernel's, whose scalars [`AdamWStep::hyper`] gives).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub b1: f32,
    pub b2: f32,
    /// The bias corrections `1 - b1^t`, `1 - b2^t` of step t (from 1).
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    /// Decoupled weight decay (0 for norms and biases).
    pub weight_decay: f32,
}

impl AdamWStep {
    /// Updates one element from its gradient `g` (already averaged and clipped): the moments
    /// rounded to bf16 (nearest even) as stored, then the master weight.
    #[inline]
    pub fn apply(&self, g: f32, w: &mut f32, m: &mut f32, v: &mut f32) {
        let AdamWStep { lr, b1, b2, c1, c2, eps, weight_decay } = *self;
        *m = bf16_round(b1 * *m + (1.0 - b1) * g);
        *v = bf16_round(b2 * *v + (1.0 - b2) * g * g);
        let update = (*m / c1) / ((*v / c2).sqrt() + eps);
        *w -= lr * (update + weight_decay * *w);
    }

    /// The device kernel's scalars, in its order: the gradient's scale `grad_scale` (clip /
    /// windows: the kernel reads the summed gradient), lr, b1, 1 - b1, b2, 1 - b2, c1, c2, eps,
    /// the weight decay.
    pub fn hyper(&self, grad_scale: f32) -> [f32; 10] {
        let AdamWStep { lr, b1, b2, c1, c2, eps, weight_decay } = *self;
        [grad_scale, lr, b1, 1.0 - b1, b2, 1.0 - b2, c1, c2, eps, weight_decay]
    }
}

/// A training graph and what a trainer needs to know about it.
pub struct TrainingGraph {
    /// Forward pass, loss (output `loss`), expert indices of each MoE layer (`route.<i>`) and the
    /// backward pass (`grad.<parameter>`).
    pub graph: Graph,
    /// Per MoE layer: the routing bias parameter (softmax routing: the gate's name, no parameter)
    /// and the graph output of its expert indices.
    pub routes: Vec<(String, String)>,
    /// The parameters that get gradients.
    pub trained: Vec<String>,
    /// The MTP module is trained (loss = next-token CE + mtp_weight x MTP CE).
    pub mtp: bool,
}

/// The training graph of `config` under `train` (its loss weights and precision): the prefill
/// graph with f32 weights, the next-token (and MTP) cross-entropy, the balance losses, and
/// [`backward`].
pub fn training_graph(config: &ModelConfig, train: &TrainConfig) -> Result<TrainingGraph, TrainError> {
    if let Some(i) = config.indexer {
        return Err(TrainError::Invalid(format!(
            "{}: training DeepSeek Sparse Attention (an indexer picking {} keys a query) is not supported yet: \
             no gradient through the key selection and the gathered rows' attention",
            config.name, i.topk
        )));
    }
    let mtp = config.num_nextn_predict_layers > 0 && train.mtp_weight > 0.0;
    let options =
        BuildOptions { dense_f32_weights: true, skip_mtp: !mtp, fp8_training: train.fp8, ..Default::default() };
    let forward = build(config, Entry::Prefill, &options)?;
    let logits = forward.output("logits").ok_or_else(|| TrainError::Invalid("the graph has no logits".into()))?;
    let mtp_logits = forward.output("mtp_logits");
    // The expert indices of every MoE layer, as outputs, for the balancing rule.
    let mut routes = Vec::new();
    let mut routed = Vec::new();
    for node in &forward.nodes {
        if let Op::MoeRoute(_) = node.op {
            // The layer's bias; softmax routing has none to update, so its loads are kept under the
            // gate's name (not a parameter: the balancing update passes it by).
            let named = |i: usize| match node.inputs.get(i).map(|&v| &forward.producer(v).op) {
                Some(Op::Param { name, .. }) => Some(name.clone()),
                _ => None,
            };
            let label = named(2).or_else(|| named(1).map(|gate| gate.trim_end_matches(".weight").to_string()));
            if let Some(label) = label {
                routes.push((label, node.outputs[0]));
            }
            routed.push((node.inputs[0], node.inputs[1], node.outputs[0]));
        }
    }
    let mut b = Builder::extend(forward);
    let targets = b.input("targets", vec![Dim::dynamic("T")], DType::I64)?;
    let mut loss = b.cross_entropy(logits, targets)?;
    if let (true, Some(ml)) = (mtp, mtp_logits) {
        let mtp_targets = b.input("mtp_targets", vec![Dim::dynamic("T")], DType::I64)?;
        let mtp_loss = b.cross_entropy_weighted(ml, mtp_targets, train.mtp_weight)?;
        loss = b.add(loss, mtp_loss)?;
    }
    if train.balance_alpha > 0.0 {
        for (x, gate, indices) in routed {
            let balance = b.balance_loss(x, gate, indices, train.balance_alpha, config.scoring)?;
            loss = b.add(loss, balance)?;
        }
    }
    b.output("loss", loss)?;
    let mut named_routes = Vec::new();
    for (i, (bias, v)) in routes.into_iter().enumerate() {
        let out = format!("route.{i}");
        b.output(&out, v)?;
        named_routes.push((bias, out));
    }
    let graph = backward(b.finish(), loss)?;
    let trained: Vec<String> =
        graph.outputs.iter().filter_map(|(n, _)| n.strip_prefix("grad.").map(str::to_string)).collect();
    Ok(TrainingGraph { graph, routes: named_routes, trained, mtp })
}

/// Auxiliary-loss-free balancing: `b_e += gamma * sign(mean(c) - c_e)` — overloaded experts'
/// biases go down, underloaded ones up, balanced ones stay.
pub fn balance_bias(bias: &[f32], loads: &[usize], gamma: f32) -> Vec<f32> {
    let mean = loads.iter().sum::<usize>() as f32 / loads.len().max(1) as f32;
    let sign = |d: f32| {
        if d > 0.0 {
            1.0
        } else if d < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    bias.iter().zip(loads).map(|(b, &c)| b + gamma * sign(mean - c as f32)).collect()
}

/// The parameters `config`'s training graph needs, from `checkpoint`, as f32 (bf16 widened, fp8
/// dequantized).
pub fn load_params(
    config: &ModelConfig,
    checkpoint: &crate::checkpoint::Checkpoint,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut params = HashMap::new();
    for (name, ty, format, _) in params_graph(config)?.params() {
        let t = checkpoint.load(name, ty, format).map_err(|e| TrainError::Invalid(e.to_string()))?;
        params.insert(name.to_string(), t);
    }
    Ok(params)
}

/// The parameters `config`'s training graph needs, each made by `values(name, element count)`: f32
/// tensors of the checkpoint's shapes without a checkpoint (made-up weights for timing a step).
pub fn params_from(
    config: &ModelConfig,
    values: &mut dyn FnMut(&str, usize) -> Vec<f32>,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut params = HashMap::new();
    for (name, ty, _, _) in params_graph(config)?.params() {
        let shape: Vec<usize> = ty
            .shape
            .iter()
            .map(|d| d.clone().fixed().ok_or_else(|| TrainError::Invalid(format!("parameter {name}: a dynamic dim"))))
            .collect::<Result<_, _>>()?;
        let data = values(name, shape.iter().product());
        params.insert(name.to_string(), Tensor::f32(shape, data));
    }
    Ok(params)
}

/// The graph whose parameters a trainer holds (f32 masters, checkpoint names).
fn params_graph(config: &ModelConfig) -> Result<Graph, TrainError> {
    let options = BuildOptions { dense_f32_weights: true, ..Default::default() };
    Ok(build(config, Entry::Prefill, &options)?)
}

/// Elements per partial sum of the gradient norm: fixed, so the sum's bits do not depend on the
/// machine's threads.
const SUM_CHUNK: usize = 1 << 16;

/// How many of `n` elements each thread takes (all of them below a size not worth threads).
fn per_thread(n: usize) -> usize {
    if n < 4 * SUM_CHUNK {
        return n.max(1);
    }
    n.div_ceil(std::thread::available_parallelism().map_or(1, |t| t.get()))
}

/// Runs `jobs`, on threads of their own when there are several.
fn run_jobs<F: FnOnce() + Send>(jobs: Vec<F>) {
    if jobs.len() <= 1 {
        jobs.into_iter().for_each(|job| job());
        return;
    }
    std::thread::scope(|s| {
        for job in jobs {
            s.spawn(job);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_attention_models_are_refused_by_name() {
        let e = training_graph(&crate::deepseek_v3::tests::v32_tiny(), &TrainConfig::default()).err().unwrap();
        assert!(
            e.to_string().contains("training DeepSeek Sparse Attention (an indexer picking 3 keys a query)"),
            "{e}"
        );
    }

    /// The tiny DeepSeek-V3 without MTP and a random checkpoint of it (seed `seed`), kept in the
    /// returned directory.
    fn tiny_checkpoint(seed: u64) -> (ModelConfig, crate::checkpoint::Checkpoint, tempfile::TempDir) {
        let mut j: serde_json::Value = serde_json::from_str(crate::config::DEEPSEEK_V3_TINY_JSON).unwrap();
        j["num_nextn_predict_layers"] = 0.into();
        let config = ModelConfig::from_json_str(&j.to_string(), "tiny").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        crate::init::write_random_checkpoint(&config, &ckpt, seed).unwrap();
        let checkpoint = crate::checkpoint::Checkpoint::open(&ckpt).unwrap();
        (config, checkpoint, dir)
    }

    /// A tiny DeepSeek-V3 (with MoE layers) trained on a repeating pattern: the loss falls well below
    /// its start, and the balancing bias narrows the expert loads.
    #[test]
    fn a_tiny_model_learns_a_repeating_pattern() {
        let (config, checkpoint, _dir) = tiny_checkpoint(3);
        let params = load_params(&config, &checkpoint).unwrap();
        let train = TrainConfig { total_steps: 40, warmup_steps: 5, lr: 1e-2, bias_update: 1e-2, ..Default::default() };
        let mut trainer = Trainer::new(&config, params, train).unwrap();
        let pattern: Vec<i64> = vec![5, 9, 2, 7, 11, 3];
        let extra = trainer.window_extra();
        let seq =
            |offset: usize| -> Vec<i64> { (0..8 + extra).map(|i| pattern[(offset + i) % pattern.len()]).collect() };
        let mut reports = Vec::new();
        for step in 0..40 {
            reports.push(trainer.step(&[seq(step % 6), seq((step + 3) % 6)]).unwrap());
        }
        let first = reports[0].loss;
        let last = reports[35..].iter().map(|r| r.loss).sum::<f32>() / 5.0;
        for r in reports.iter().step_by(10) {
            eprintln!(
                "step {}: loss {:.4}, grad norm {:.3}, lr {:.4}, max/mean load {:.2}",
                r.step,
                r.loss,
                r.grad_norm,
                r.lr,
                r.max_mean_load()
            );
        }
        assert!(last < 0.25 * first, "loss {first} -> {last}");
        assert!(reports.iter().all(|r| r.grad_norm.is_finite()));
        assert!(!reports[0].expert_load.is_empty(), "the tiny model has MoE layers");
        let load = |r: &[StepReport]| r.iter().map(StepReport::max_mean_load).sum::<f32>() / r.len() as f32;
        assert!(
            load(&reports[35..]) < load(&reports[..5]),
            "max/mean load {} -> {}",
            load(&reports[..5]),
            load(&reports[35..])
        );
    }

    /// FP8 training (the recipe's e4m3 Fprop/Dgrad/Wgrad on every projection) learns the pattern
    /// as f32 training does.
    #[test]
    fn fp8_training_learns_a_repeating_pattern() {
        let (config, checkpoint, _dir) = tiny_checkpoint(3);
        let pattern: Vec<i64> = vec![5, 9, 2, 7, 11, 3];
        let run = |fp8: bool| {
            let params = load_params(&config, &checkpoint).unwrap();
            let train = TrainConfig { total_steps: 30, warmup_steps: 3, lr: 1e-2, fp8, ..Default::default() };
            let mut trainer = Trainer::new(&config, params, train).unwrap();
            assert_eq!(trainer.graph.nodes.iter().any(|n| n.op.name() == "fp8_linear_wgrad"), fp8);
            // The routed experts train in fp8 too.
            let fp8_experts =
                |n: &crate::graph::Node| matches!(n.op, crate::graph::Op::MoeExpertsGrad { fp8: true, .. });
            assert_eq!(trainer.graph.nodes.iter().any(fp8_experts), fp8);
            let seq = |o: usize| -> Vec<i64> { (0..9).map(|i| pattern[(o + i) % pattern.len()]).collect() };
            let losses: Vec<f32> =
                (0..30).map(|s| trainer.step(&[seq(s % 6), seq((s + 3) % 6)]).unwrap().loss).collect();
            eprintln!("fp8 {fp8}: loss {:.3} -> {:.4}", losses[0], losses[29]);
            (losses[0], losses[25..].iter().sum::<f32>() / 5.0)
        };
        let ((first32, last32), (first8, last8)) = (run(false), run(true));
        assert!((first8 - first32).abs() < 0.05 * first32, "first losses {first32} vs {first8}");
        assert!(last8 < 0.1 * first8, "fp8: loss {first8} -> {last8}");
        assert!(last32 < 0.1 * first32, "f32: loss {first32} -> {last32}");
    }

    /// The balance loss alone (no bias updates) evens out the expert loads: the same run with
    /// alpha 0 keeps them more uneven.
    #[test]
    fn the_balance_loss_evens_the_expert_loads() {
        let (config, checkpoint, _dir) = tiny_checkpoint(5);
        let pattern: Vec<i64> = vec![5, 9, 2, 7, 11, 3, 42, 17, 8, 1];
        let run = |alpha: f32| {
            let params = load_params(&config, &checkpoint).unwrap();
            let train = TrainConfig {
                total_steps: 20,
                warmup_steps: 2,
                lr: 1e-2,
                bias_update: 0.0,
                balance_alpha: alpha,
                ..Default::default()
            };
            let mut trainer = Trainer::new(&config, params, train).unwrap();
            let seq = |offset: usize| -> Vec<i64> { (0..16).map(|i| pattern[(offset + i) % pattern.len()]).collect() };
            let loads: Vec<f32> =
                (0..20).map(|step| trainer.step(&[seq(step), seq(step + 5)]).unwrap().max_mean_load()).collect();
            eprintln!("alpha {alpha}: max/mean load {loads:.2?}");
            loads[15..].iter().sum::<f32>() / 5.0
        };
        let (without, with) = (run(0.0), run(0.3));
        assert!(with < 0.9 * without, "max/mean load {without} without the balance loss, {with} with it");
    }

    #[test]
    fn the_bias_moves_loads_toward_the_mean() {
        // Mean load 4: expert 0 is overloaded (down), 1-3 underloaded (up).
        let b = balance_bias(&[0.0, 0.5, -0.5, 0.1], &[9, 1, 3, 3], 0.01);
        let want = [-0.01, 0.51, -0.49, 0.11];
        assert!(b.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-6), "{b:?}");
        assert_eq!(balance_bias(&[0.2, -0.2], &[5, 5], 0.01), vec![0.2, -0.2], "balanced loads stay");
    }

    #[test]
    fn the_schedule_warms_up_then_decays() {
        let c = TrainConfig { lr: 1.0, warmup_steps: 4, total_steps: 14, min_lr_ratio: 0.1, ..Default::default() };
        assert_eq!(c.lr_at(0), 0.25);
        assert_eq!(c.lr_at(3), 1.0);
        assert!((c.lr_at(9) - 0.55).abs() < 1e-6, "{}", c.lr_at(9));
        assert!((c.lr_at(14) - 0.1).abs() < 1e-6 && (c.lr_at(100) - 0.1).abs() < 1e-6);
    }
}
