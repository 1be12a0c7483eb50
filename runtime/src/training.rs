//! A training run, shared by `v3c train` (reference interpreter or the compiler's CPU backend) and
//! `v3r train` (a compiled artifact): windows of `seq` tokens plus their targets sampled from a
//! token file, one optimizer step per `batch` of them ([`v3c_models::train::Trainer`] on any
//! [`StepBackend`]); `loss.csv` written as it goes and, at the end, the checkpoint
//! (`config.json` + `model.safetensors`, f32, checkpoint names), the optimizer state
//! ([`OPTIMIZER_STATE`]: moments and step, for `--resume`) and `expert_load.csv` (tokens per expert
//! per MoE layer).

use std::path::Path;
use std::time::Instant;

use std::collections::HashMap;

use v3c_models::checkpoint::{save_tensors, Checkpoint};
use v3c_models::config::ModelConfig;
use v3c_models::tensor::{Tensor, TensorData};
use v3c_models::train::{load_params, DeviceOptimizer, StepBackend, TrainConfig, TrainError, Trainer};

use crate::host::{HostBuffer, HostData};

/// What a run trains on, how long, and where it writes.
pub struct RunOptions<'a> {
    pub model_dir: &'a Path,
    pub data: &'a Path,
    pub steps: usize,
    pub out: &'a Path,
    pub batch: usize,
    pub seq: usize,
    pub lr: f32,
    pub seed: u64,
    pub resume: bool,
    /// Also write the checkpoint and optimizer state every this many steps (0: at the end only).
    pub save_every: usize,
    pub mtp_weight: f32,
    pub balance_alpha: f32,
    pub fp8: bool,
    pub optimizer: OptimizerOptions,
    pub eval: Option<EvalOptions<'a>>,
    /// Read `data` and the held-out data as text with this tokenizer ([`read_text_file`]).
    pub tokenizer: Option<&'a Path>,
}

/// AdamW's settings a run may change (the others: [`TrainConfig::default`]).
#[derive(Debug, Clone, Copy)]
pub struct OptimizerOptions {
    pub weight_decay: f32,
    /// The global gradient norm a step is clipped to.
    pub clip_norm: f32,
    /// Steps of the learning rate's linear warm-up (None: a tenth of the run's steps).
    pub warmup_steps: Option<usize>,
}

impl Default for OptimizerOptions {
    fn default() -> Self {
        let d = TrainConfig::default();
        OptimizerOptions { weight_decay: d.weight_decay, clip_norm: d.clip_norm, warmup_steps: None }
    }
}

/// A held-out loss measured during a run: `windows` windows evenly spaced over the token ids in
/// `data`, before the first step, every `every` steps (0: never between) and after the last.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions<'a> {
    pub data: &'a Path,
    pub every: usize,
    pub windows: usize,
}

/// Token ids from `path`: text (UTF-8 without control characters but whitespace) is
/// whitespace-separated integers, anything else little-endian u32; each checked against the
/// vocabulary (the message names the file and the position). A text's word that is not an integer
/// is named; such a text was read as u32 when its length was a multiple of 4 (`1 2 -3 4`: "token 0
/// is 540155953").
pub fn read_token_file(path: &Path, vocab: usize) -> Result<Vec<i64>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes).ok().filter(|t| t.chars().all(|c| c.is_whitespace() || !c.is_control()));
    let ids: Vec<i64> = match text {
        Some(text) => text
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| w.parse::<i64>().map_err(|e| format!("{}: token {i} '{w}': {e}", path.display())))
            .collect::<Result<_, _>>()?,
        None if bytes.len() % 4 == 0 => {
            bytes.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
        }
        None => {
            return Err(format!(
                "{}: neither whitespace-separated token ids nor little-endian u32 ({} bytes)",
                path.display(),
                bytes.len()
            ))
        }
    };
    if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= vocab) {
        return Err(format!("{}: token {i} is {t}, outside the vocabulary (0..{vocab})", path.display()));
    }
    Ok(ids)
}

/// Training text as token ids: a `.jsonl` file is a document a line (`{"text": ...}`; blank lines
/// skipped), any other file one document; each document is encoded with the tokenizer's template
/// (its BOS first) and the documents concatenated. Errors name the file and line.
pub fn read_text_file(path: &Path, tokenizer: &crate::tokenizer::Tokenizer, vocab: usize) -> Result<Vec<i64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ids = Vec::new();
    if path.extension().is_some_and(|e| e == "jsonl") {
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
            let document = v.get("text").and_then(serde_json::Value::as_str);
            let document = document.ok_or_else(|| format!("{}:{}: no \"text\" string", path.display(), i + 1))?;
            ids.extend(tokenizer.encode(document, true).into_iter().map(i64::from));
        }
    } else {
        ids.extend(tokenizer.encode(&text, true).into_iter().map(i64::from));
    }
    if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(format!(
            "{}: token {i} is {t}, outside the model's vocabulary (0..{vocab}): a tokenizer of another model?",
            path.display()
        ));
    }
    Ok(ids)
}

/// Where a training run keeps its optimizer state (beside, not among, the checkpoint's files).
pub const OPTIMIZER_STATE: &str = "optimizer/state.safetensors";

/// A run validated and loaded, nothing written yet: the trainer (optimizer state restored when
/// resuming), the checkpoint it started from and the data.
pub struct Run {
    pub config: ModelConfig,
    pub trainer: Trainer,
    checkpoint: Checkpoint,
    data: Vec<i64>,
    done: usize,
    /// Held-out windows ([`EvalOptions`]; none without).
    eval: Vec<Vec<i64>>,
}

/// Each flag's value is a finite number >= 0 (a learning rate, a loss weight), or the error names
/// the first that is not.
pub fn nonnegative(flags: &[(&str, f32)]) -> Result<(), String> {
    match flags.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
        Some((flag, v)) => Err(format!("{flag} {v}: must be a finite number >= 0")),
        None => Ok(()),
    }
}

impl Run {
    /// Checks the options, loads the checkpoint (`--out` when resuming), the data and the optimizer
    /// state. One-line errors naming the flag or file.
    pub fn prepare(o: &RunOptions) -> Result<Run, String> {
        if o.steps == 0 || o.batch == 0 || o.seq == 0 {
            return Err("--steps, --batch and --seq must be positive".into());
        }
        let opt = &o.optimizer;
        nonnegative(&[
            ("--lr", o.lr),
            ("--mtp-weight", o.mtp_weight),
            ("--balance-alpha", o.balance_alpha),
            ("--weight-decay", opt.weight_decay),
            ("--clip-norm", opt.clip_norm),
        ])?;
        if opt.clip_norm == 0.0 {
            return Err("--clip-norm 0: gradients are clipped to a positive norm".into());
        }
        if o.eval.is_some_and(|e| e.windows == 0) {
            return Err("--eval-windows must be positive".into());
        }
        let source = if o.resume { o.out } else { o.model_dir };
        if !o.resume && o.out.exists() {
            return Err(format!("{}: already exists (choose a new directory, or --resume a run)", o.out.display()));
        }
        let config = ModelConfig::from_path(source).map_err(|e| e.to_string())?;
        let checkpoint = Checkpoint::open(source).map_err(|e| e.to_string())?;
        let params = load_params(&config, &checkpoint).map_err(|e| e.to_string())?;
        let tokenizer = match o.tokenizer {
            Some(path) => Some(crate::tokenizer::Tokenizer::from_path(path)?),
            None => None,
        };
        let read = |path: &Path| match &tokenizer {
            Some(t) => read_text_file(path, t, config.vocab_size),
            None => read_token_file(path, config.vocab_size),
        };
        let data = read(o.data)?;
        // Optimizer state of a resumed run.
        let (done, moments) = if o.resume {
            let state = Checkpoint::open_file(&o.out.join(OPTIMIZER_STATE)).map_err(|e| e.to_string())?;
            let step = state.read("step").map_err(|e| e.to_string())?.as_ids().unwrap_or_default()[0] as usize;
            (step, Some(state))
        } else {
            (0, None)
        };
        let train = TrainConfig {
            lr: o.lr,
            total_steps: done + o.steps,
            warmup_steps: opt.warmup_steps.unwrap_or((done + o.steps) / 10).max(1),
            weight_decay: opt.weight_decay,
            clip_norm: opt.clip_norm,
            mtp_weight: o.mtp_weight,
            balance_alpha: o.balance_alpha,
            fp8: o.fp8,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(&config, params, train).map_err(|e| e.to_string())?;
        let window = o.seq + trainer.window_extra();
        if data.len() < window {
            return Err(format!("{}: {} tokens, fewer than a window of {window}", o.data.display(), data.len()));
        }
        // The held-out windows, evenly spaced, the same at every evaluation.
        let eval = match o.eval {
            None => Vec::new(),
            Some(e) => {
                let ids = read(e.data)?;
                if ids.len() < window {
                    return Err(format!("{}: {} tokens, fewer than a window of {window}", e.data.display(), ids.len()));
                }
                let span = ids.len() - window;
                let at = |k: usize| if e.windows > 1 { k * span / (e.windows - 1) } else { 0 };
                (0..e.windows).map(|k| ids[at(k)..at(k) + window].to_vec()).collect()
            }
        };
        if let Some(state) = &moments {
            trainer.step = done;
            for (name, m) in trainer.m.iter_mut() {
                *m = state.read(&format!("m.{name}")).map_err(|e| e.to_string())?.as_f32().unwrap_or(&[]).to_vec();
            }
            for (name, v) in trainer.v.iter_mut() {
                *v = state.read(&format!("v.{name}")).map_err(|e| e.to_string())?.as_f32().unwrap_or(&[]).to_vec();
            }
        }
        Ok(Run { config, trainer, checkpoint, data, done, eval })
    }

    /// Trains `o.steps` steps with `backend` running the training graph (named `backend_name` in
    /// the report), then writes the checkpoint, optimizer state and expert loads.
    pub fn execute(self, o: &RunOptions, backend: &mut dyn StepBackend, backend_name: &str) -> Result<(), String> {
        let Run { config, mut trainer, checkpoint, data, mut done, eval } = self;
        let window = o.seq + trainer.window_extra();
        if !o.resume {
            std::fs::create_dir_all(o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
            std::fs::write(o.out.join("loss.csv"), "step,loss,grad_norm,lr,max_mean_expert_load\n")
                .map_err(|e| format!("{}: {e}", o.out.display()))?;
        }
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(o.out.join("loss.csv"))
            .map_err(|e| format!("{}/loss.csv: {e}", o.out.display()))?;
        // The held-out loss at step `done`, appended to eval.csv.
        let eval_path = o.out.join("eval.csv");
        if !eval.is_empty() && !eval_path.exists() {
            std::fs::write(&eval_path, "step,eval_loss\n").map_err(|e| format!("{}: {e}", eval_path.display()))?;
        }
        // Seconds spent evaluating (not training: left out of tokens/s).
        let eval_s = std::cell::Cell::new(0.0);
        let evaluate =
            |trainer: &mut Trainer, backend: &mut dyn StepBackend, done: usize| -> Result<Option<f32>, String> {
                if eval.is_empty() {
                    return Ok(None);
                }
                let at = Instant::now();
                let loss = trainer.evaluate(backend, &eval).map_err(|e| e.to_string())?;
                eval_s.set(eval_s.get() + at.elapsed().as_secs_f64());
                let line = format!("{done},{loss}\n");
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&eval_path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
                    .map_err(|e| format!("{}: {e}", eval_path.display()))?;
                Ok(Some(loss))
            };
        let mut eval_loss = evaluate(&mut trainer, backend, done)?;
        let bar = indicatif::ProgressBar::new(o.steps as u64).with_style(
            indicatif::ProgressStyle::with_template("training [{bar:30}] {pos}/{len} steps {msg}")
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
        );
        let mut rng = o.seed ^ 0x9E37_79B9_7F4A_7C15 ^ (done as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let mut totals: Vec<(String, Vec<usize>)> = Vec::new();
        let mut saver = Saver { out: o.out, config: &config, checkpoint: &checkpoint, kept: None };
        let started = Instant::now();
        // Ctrl-C stops the run after the step under way, saved (a second one ends it at once).
        let interrupt = crate::interrupt::Interrupt::install(&[libc::SIGINT]);
        for _ in 0..o.steps {
            let batch: Vec<Vec<i64>> = (0..o.batch)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let start = (rng % (data.len() - window + 1) as u64) as usize;
                    data[start..start + window].to_vec()
                })
                .collect();
            let r = trainer.step_on(backend, &batch).map_err(|e| e.to_string())?;
            done = r.step;
            use std::io::Write as _;
            writeln!(log, "{},{},{},{},{}", r.step, r.loss, r.grad_norm, r.lr, r.max_mean_load())
                .map_err(|e| format!("{}/loss.csv: {e}", o.out.display()))?;
            for (layer, loads) in &r.expert_load {
                match totals.iter_mut().find(|(l, _)| l == layer) {
                    Some((_, t)) => t.iter_mut().zip(loads).for_each(|(a, b)| *a += b),
                    None => totals.push((layer.clone(), loads.clone())),
                }
            }
            bar.inc(1);
            let taken = bar.position() as usize;
            if o.save_every > 0 && taken % o.save_every == 0 && taken < o.steps {
                trainer.fetch(backend).map_err(|e| e.to_string())?;
                saver.save(&trainer, done, &totals)?;
                // (Printed around the bar: `println` prints nothing when it is hidden, off a terminal.)
                bar.suspend(|| {
                    eprintln!("saved the checkpoint and optimizer state at step {done} in {}", o.out.display())
                });
            }
            let every = o.eval.map_or(0, |e| e.every);
            if every > 0 && taken % every == 0 && taken < o.steps {
                eval_loss = evaluate(&mut trainer, backend, done)?;
            }
            let tokens = (taken * o.batch * o.seq) as f64;
            let held_out = eval_loss.map_or(String::new(), |l| format!(" (held out {l:.4})"));
            bar.set_message(format!(
                "loss {:.4}{held_out}, {:.0} tokens/s",
                r.loss,
                tokens / (started.elapsed().as_secs_f64() - eval_s.get()).max(1e-9)
            ));
            if interrupt.happened() && taken < o.steps {
                bar.finish_and_clear();
                trainer.fetch(backend).map_err(|e| e.to_string())?;
                saver.save(&trainer, done, &totals)?;
                return Err(format!(
                    "interrupted after step {done}: its checkpoint and optimizer state are in {} (--resume continues)",
                    o.out.display()
                ));
            }
        }
        bar.finish_and_clear();
        let elapsed = started.elapsed().as_secs_f64() - eval_s.get();
        if let Some(loss) = evaluate(&mut trainer, backend, done)? {
            eprintln!(
                "held-out loss after step {done}: {loss:.4} ({} windows; eval.csv in {})",
                eval.len(),
                o.out.display()
            );
        }
        // Parameters and moments kept on a device come back for the checkpoint.
        trainer.fetch(backend).map_err(|e| e.to_string())?;
        saver.save(&trainer, done, &totals)?;
        eprintln!(
            "trained {} steps (now at step {done}) in {:.1} s on the {} backend ({}, {:.0} tokens/s); wrote {}",
            o.steps,
            elapsed,
            backend_name,
            if o.fp8 { "FP8 GEMMs" } else { "f32" },
            (o.steps * o.batch * o.seq) as f64 / elapsed.max(1e-9),
            o.out.display()
        );
        Ok(())
    }
}

/// Writes a run's checkpoint (`config.json` + `model.safetensors`: every parameter, f32, and the
/// checkpoint's tensors the training graph does not use, read once), its optimizer state and its
/// expert loads; each file written beside and renamed into place, so that a run stopped while
/// saving leaves the previous save whole.
struct Saver<'a> {
    out: &'a Path,
    config: &'a ModelConfig,
    checkpoint: &'a Checkpoint,
    kept: Option<Vec<(String, Tensor)>>,
}

impl Saver<'_> {
    fn save(&mut self, trainer: &Trainer, done: usize, totals: &[(String, Vec<usize>)]) -> Result<(), String> {
        let out = self.out;
        // The weights are no longer block-scaled fp8, so the config no longer says so (a compiler
        // would otherwise pick the fp8 graph for f32 tensors).
        let mut hf = self.config.to_hf_json();
        if let Some(m) = hf.as_object_mut() {
            m.remove("quantization_config");
        }
        let config_text = serde_json::to_string_pretty(&hf).map_err(|e| e.to_string())? + "\n";
        write_then_rename(&out.join("config.json"), |p| std::fs::write(p, &config_text).map_err(|e| e.to_string()))?;
        // Tensors the training graph does not use (the MTP module) are kept as they were; fp8 weights
        // were trained dequantized, so their block scales are dropped with them.
        let checkpoint = self.checkpoint;
        let kept = self.kept.get_or_insert_with(|| {
            let mut kept = Vec::new();
            for name in checkpoint.tensor_names() {
                let scale_of_trained = name.strip_suffix("_scale_inv").is_some_and(|w| trainer.params.contains_key(w));
                if trainer.params.contains_key(name) || scale_of_trained {
                    continue;
                }
                match checkpoint.read(name) {
                    Ok(t) => kept.push((name.to_string(), t)),
                    Err(e) => eprintln!("warning: {name} is not copied to the trained checkpoint: {e}"),
                }
            }
            kept
        });
        let mut names: Vec<&String> = trainer.params.keys().collect();
        names.sort();
        let mut tensors: Vec<(&str, &Tensor)> = names.iter().map(|n| (n.as_str(), &trainer.params[*n])).collect();
        tensors.extend(kept.iter().map(|(n, t)| (n.as_str(), t)));
        write_then_rename(&out.join("model.safetensors"), |p| save_tensors(p, &tensors).map_err(|e| e.to_string()))?;
        let mut state: Vec<(String, Tensor)> = vec![("step".into(), Tensor::i64(vec![1], vec![done as i64]))];
        for (prefix, moments) in [("m", &trainer.m), ("v", &trainer.v)] {
            for (name, values) in moments {
                state.push((
                    format!("{prefix}.{name}"),
                    Tensor::f32(trainer.params[name].shape.clone(), values.clone()),
                ));
            }
        }
        let state_refs: Vec<(&str, &Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let state_path = out.join(OPTIMIZER_STATE);
        if let Some(parent) = state_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        write_then_rename(&state_path, |p| save_tensors(p, &state_refs).map_err(|e| e.to_string()))?;
        let mut loads = String::from("layer_bias,expert,tokens\n");
        for (layer, counts) in totals {
            for (e, c) in counts.iter().enumerate() {
                loads.push_str(&format!("{layer},{e},{c}\n"));
            }
        }
        write_then_rename(&out.join("expert_load.csv"), |p| std::fs::write(p, &loads).map_err(|e| e.to_string()))
    }
}

/// `write` into `path` with `.tmp` appended, then the file renamed to `path`.
fn write_then_rename(path: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The training step's entry point name in plans and artifacts.
pub const TRAIN_ENTRY: &str = "train_step";

/// A training window's inputs as host buffers.
pub fn host_inputs(inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, HostBuffer>, TrainError> {
    let mut host = HashMap::new();
    for (name, t) in inputs {
        let data = match &t.data {
            TensorData::F32(v) => HostData::F32(v.clone()),
            TensorData::I64(v) => HostData::I64(v.clone()),
            TensorData::I32(v) => HostData::I32(v.clone()),
            _ => return Err(TrainError::Backend(format!("input {name}: {} is not a host tensor", t.describe()))),
        };
        host.insert(name.clone(), HostBuffer { shape: t.shape.clone(), data });
    }
    Ok(host)
}

/// A training step's outputs (loss, gradients, expert indices) as tensors.
pub fn output_tensors(out: HashMap<String, HostBuffer>) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut tensors = HashMap::new();
    for (name, b) in out {
        let t = match b.data {
            HostData::F32(v) => Tensor::f32(b.shape, v),
            HostData::I64(v) => Tensor::i64(b.shape, v),
            HostData::I32(v) => Tensor::i64(b.shape, v.into_iter().map(i64::from).collect()),
            _ => return Err(TrainError::Backend(format!("output {name}: not f32 or integers"))),
        };
        tensors.insert(name, t);
    }
    Ok(tensors)
}

/// The weight a compiled step binds to `name`, from the trainer's parameters: the parameter itself,
/// or for `...experts.*...` every expert's stacked in order.
pub fn bound_weight(name: &str, params: &HashMap<String, Tensor>) -> Result<HostBuffer, TrainError> {
    let f32s = |name: &str| -> Result<(&[usize], &[f32]), TrainError> {
        let t = params.get(name).ok_or_else(|| TrainError::Backend(format!("parameter {name} not given")))?;
        let values =
            t.as_f32().ok_or_else(|| TrainError::Backend(format!("{name}: trained parameters must be f32")))?;
        Ok((&t.shape, values))
    };
    if !name.contains(".experts.*.") {
        let (shape, values) = f32s(name)?;
        return Ok(HostBuffer { shape: shape.to_vec(), data: HostData::F32(values.to_vec()) });
    }
    let (mut shape, mut data, mut e) = (Vec::new(), Vec::new(), 0);
    while let Some(expert) =
        Some(name.replace(".experts.*.", &format!(".experts.{e}."))).filter(|n| params.contains_key(n))
    {
        let (s, v) = f32s(&expert)?;
        shape = s.to_vec();
        data.extend_from_slice(v);
        e += 1;
    }
    shape.insert(0, e);
    Ok(HostBuffer { shape, data: HostData::F32(data) })
}

/// A loaded artifact that runs entries on weights it can rebind: the cpu artifact, a GPU artifact
/// on its device, or that artifact's host emulation (`v3c_compiler::emulate`).
pub trait EntryRunner {
    /// The artifact's directory (for messages).
    fn dir(&self) -> String;
    /// The GPU artifact it runs (None: a cpu artifact).
    fn artifact(&self) -> Option<&crate::artifact::Artifact> {
        None
    }
    fn entry_plan(&self, entry: &str) -> Result<&crate::plan::EntryPlan, String>;
    /// The weights its plan binds.
    fn weight_names(&self) -> Vec<String>;
    /// Replaces weight `name` (of the shape the plan binds).
    fn set_weight(&mut self, name: &str, weight: HostBuffer) -> Result<(), String>;
    fn run(
        &mut self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String>;
    /// The device it runs on, for work beside the entries (the optimizer); None: the host's
    /// memory is the runner's (the cpu artifact).
    fn device(&mut self) -> Option<&mut dyn crate::optimizer::Device> {
        None
    }
}

impl EntryRunner for crate::cpu::CpuArtifact {
    fn dir(&self) -> String {
        self.artifact.dir.display().to_string()
    }

    fn entry_plan(&self, entry: &str) -> Result<&crate::plan::EntryPlan, String> {
        crate::cpu::CpuArtifact::entry_plan(self, entry)
    }

    fn weight_names(&self) -> Vec<String> {
        crate::cpu::CpuArtifact::weight_names(self)
    }

    fn set_weight(&mut self, name: &str, weight: HostBuffer) -> Result<(), String> {
        crate::cpu::CpuArtifact::set_weight(self, name, weight)
    }

    fn run(
        &mut self,
        entry: &str,
        inputs: &HashMap<String, HostBuffer>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostBuffer>, String> {
        crate::cpu::CpuArtifact::run(self, entry, inputs, wanted)
    }
}

/// A training-step artifact (`v3c compile --train`) as the trainer's [`StepBackend`]: each window
/// runs the plan; the parameters are bound as its weights at every optimizer step.
pub struct ArtifactStep<R: EntryRunner = crate::cpu::CpuArtifact> {
    artifact: R,
    /// The artifact's optimizer kernels, when AdamW runs on its device ([`ArtifactStep::on_device`]).
    kernels: Option<crate::optimizer::OptimizerKernels>,
    /// Their state there, from the first step.
    state: Option<crate::optimizer::DeviceAdamW>,
}

impl<R: EntryRunner> ArtifactStep<R> {
    /// Checks that `artifact` computes what `trainer` asks for (its loss and every gradient) and
    /// holds windows of `seq` tokens.
    pub fn new(artifact: R, trainer: &Trainer, seq: usize) -> Result<ArtifactStep<R>, String> {
        let dir = artifact.dir();
        let plan = artifact.entry_plan(TRAIN_ENTRY).map_err(|e| format!("{dir}: {e} (compile with --train)"))?;
        for (name, _) in &trainer.graph().outputs {
            if !plan.outputs.iter().any(|(n, _)| n == name) {
                return Err(format!("{dir}: the training step has no output '{name}' (compiled for other settings?)"));
            }
        }
        // A window's graph has `seq` token rows (its targets and MTP tokens are shifted copies).
        let planned = plan.sizes.rows;
        if seq > planned {
            return Err(format!("--seq {seq}: {dir} is planned for windows of up to {planned} tokens (--max-rows)"));
        }
        Ok(ArtifactStep { artifact, kernels: None, state: None })
    }

    /// The same step with the trainer's state on the artifact's device: the optimizer's kernels
    /// the artifact carries (`v3c compile --train` for a GPU) run there, the parameters stay.
    pub fn on_device(mut self) -> Result<ArtifactStep<R>, String> {
        let dir = self.artifact.dir();
        if self.artifact.device().is_none() {
            return Err(format!("{dir}: runs on the host: there is no device to keep the optimizer on"));
        }
        let artifact = self.artifact.artifact().ok_or_else(|| format!("{dir}: not a GPU artifact"))?;
        let kernels = crate::optimizer::OptimizerKernels::of(artifact)?.ok_or_else(|| {
            format!(
                "{dir}: has no optimizer kernels (compiled by an older v3c; recompile, or train with --host-optimizer)"
            )
        })?;
        self.kernels = Some(kernels);
        Ok(self)
    }

    /// Whether AdamW runs on the artifact's device.
    pub fn optimizes_on_device(&self) -> bool {
        self.kernels.is_some()
    }

    fn device_state(
        &mut self,
    ) -> Result<(&mut dyn crate::optimizer::Device, &crate::optimizer::DeviceAdamW), TrainError> {
        let state = self.state.as_ref().ok_or_else(|| TrainError::Invalid("no state uploaded to the device".into()))?;
        let device =
            self.artifact.device().ok_or_else(|| TrainError::Backend("the artifact lost its device".into()))?;
        Ok((device, state))
    }
}

impl<R: EntryRunner> v3c_models::train::DeviceOptimizer for ArtifactStep<R> {
    fn upload(
        &mut self,
        graph: &v3c_models::Graph,
        params: &HashMap<String, Tensor>,
        trained: &[String],
        m: &HashMap<String, Vec<f32>>,
        v: &HashMap<String, Vec<f32>>,
    ) -> Result<(), TrainError> {
        StepBackend::load(self, graph, params)?;
        let kernels = self.kernels.clone().ok_or_else(|| TrainError::Invalid("no optimizer kernels".into()))?;
        let shapes = trained
            .iter()
            .map(|n| {
                Ok((
                    n.clone(),
                    params.get(n).ok_or_else(|| TrainError::Invalid(format!("no parameter {n}")))?.shape.clone(),
                ))
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let plan = self.artifact.entry_plan(TRAIN_ENTRY).map_err(TrainError::Backend)?.clone();
        let device = self.artifact.device().ok_or_else(|| TrainError::Backend("the artifact has no device".into()))?;
        let state =
            crate::optimizer::DeviceAdamW::new(kernels, device, &plan, &shapes, m, v).map_err(TrainError::Backend)?;
        self.state = Some(state);
        Ok(())
    }

    fn run_window(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        wanted: &[&str],
        index: usize,
        windows: usize,
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let out = StepBackend::run(self, inputs, wanted)?;
        let state = self.state.as_mut().ok_or_else(|| TrainError::Invalid("no state uploaded to the device".into()))?;
        let device =
            self.artifact.device().ok_or_else(|| TrainError::Backend("the artifact lost its device".into()))?;
        state.window_done(device, index, windows).map_err(TrainError::Backend)?;
        Ok(out)
    }

    fn grad_squares(&mut self) -> Result<Vec<f64>, TrainError> {
        let (device, state) = self.device_state()?;
        state.grad_squares(device).map_err(TrainError::Backend)
    }

    fn adamw(&mut self, grad_scale: f32, steps: &[v3c_models::train::AdamWStep]) -> Result<(), TrainError> {
        let (device, state) = self.device_state()?;
        state.adamw(device, grad_scale, steps).map_err(TrainError::Backend)
    }

    fn set_param(&mut self, name: &str, params: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        let w = bound_weight(name, params)?;
        self.artifact.set_weight(name, w).map_err(TrainError::Backend)
    }

    fn download(
        &mut self,
        params: &mut HashMap<String, Tensor>,
        m: &mut HashMap<String, Vec<f32>>,
        v: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(), TrainError> {
        let (device, state) = self.device_state()?;
        state.download(device, params, m, v).map_err(TrainError::Backend)
    }
}

impl<R: EntryRunner> StepBackend for ArtifactStep<R> {
    fn load(&mut self, _graph: &v3c_models::Graph, params: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        for name in self.artifact.weight_names() {
            let w = bound_weight(&name, params)?;
            self.artifact.set_weight(&name, w).map_err(TrainError::Backend)?;
        }
        Ok(())
    }

    fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        wanted: &[&str],
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let host = host_inputs(inputs)?;
        let out = self.artifact.run(TRAIN_ENTRY, &host, wanted).map_err(TrainError::Backend)?;
        output_tensors(out)
    }

    fn device_optimizer(&mut self) -> Option<&mut dyn v3c_models::train::DeviceOptimizer> {
        if self.kernels.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

/// Made-up f32 parameters for `config`'s training step from `seed` (the values
/// [`crate::gpu::random_weight`] gives the weights of `v3r bench-decode --random-weights`): for
/// timing a step without a checkpoint; what it learns means nothing.
pub fn random_params(config: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>, String> {
    let mut values = |name: &str, n: usize| -> Vec<f32> {
        let bytes = crate::gpu::random_weight(name, n, "f32", seed);
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    v3c_models::train::params_from(config, &mut values).map_err(|e| e.to_string())
}

/// One timed optimizer step of [`bench_steps`], in milliseconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepTiming {
    pub step: usize,
    pub loss: f32,
    /// The whole optimizer step.
    pub step_ms: f64,
    /// Binding the parameters as the artifact's weights (for a GPU artifact: their upload; with
    /// AdamW on the device, the first step's upload of the parameters and moments only).
    pub bind_ms: f64,
    /// The artifact's runs of the training step (every window; a GPU artifact's gradients read
    /// back, or with AdamW on the device, summed there).
    pub run_ms: f64,
    /// The rest: the gradients' norm and clipping, AdamW (on the host, or its launches on the
    /// device) and the balancing bias.
    pub optimizer_ms: f64,
}

/// A [`StepBackend`] that times what it delegates.
struct Timed<'a> {
    inner: &'a mut dyn StepBackend,
    bind: f64,
    run: f64,
}

impl Timed<'_> {
    fn device(&mut self) -> Result<&mut dyn DeviceOptimizer, TrainError> {
        self.inner.device_optimizer().ok_or_else(|| TrainError::Invalid("the backend has no device optimizer".into()))
    }
}

/// A device optimizer's calls timed as the host's: its upload as binding, its windows as runs.
impl DeviceOptimizer for Timed<'_> {
    fn upload(
        &mut self,
        graph: &v3c_models::Graph,
        params: &HashMap<String, Tensor>,
        trained: &[String],
        m: &HashMap<String, Vec<f32>>,
        v: &HashMap<String, Vec<f32>>,
    ) -> Result<(), TrainError> {
        let start = Instant::now();
        let r = self.device()?.upload(graph, params, trained, m, v);
        self.bind += start.elapsed().as_secs_f64() * 1e3;
        r
    }

    fn run_window(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        wanted: &[&str],
        index: usize,
        windows: usize,
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let start = Instant::now();
        let r = self.device()?.run_window(inputs, wanted, index, windows);
        self.run += start.elapsed().as_secs_f64() * 1e3;
        r
    }

    fn grad_squares(&mut self) -> Result<Vec<f64>, TrainError> {
        self.device()?.grad_squares()
    }

    fn adamw(&mut self, grad_scale: f32, steps: &[v3c_models::train::AdamWStep]) -> Result<(), TrainError> {
        self.device()?.adamw(grad_scale, steps)
    }

    fn set_param(&mut self, name: &str, params: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        self.device()?.set_param(name, params)
    }

    fn download(
        &mut self,
        params: &mut HashMap<String, Tensor>,
        m: &mut HashMap<String, Vec<f32>>,
        v: &mut HashMap<String, Vec<f32>>,
    ) -> Result<(), TrainError> {
        self.device()?.download(params, m, v)
    }
}

impl StepBackend for Timed<'_> {
    fn device_optimizer(&mut self) -> Option<&mut dyn DeviceOptimizer> {
        match self.inner.device_optimizer() {
            Some(_) => Some(self),
            None => None,
        }
    }

    fn load(&mut self, graph: &v3c_models::Graph, params: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        let start = Instant::now();
        let r = self.inner.load(graph, params);
        self.bind += start.elapsed().as_secs_f64() * 1e3;
        r
    }

    fn run(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        wanted: &[&str],
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let start = Instant::now();
        let r = self.inner.run(inputs, wanted);
        self.run += start.elapsed().as_secs_f64() * 1e3;
        r
    }
}

/// `steps` optimizer steps of `trainer` on `backend`, each over `batch` windows of `seq` tokens
/// (plus the targets') drawn uniformly from the vocabulary by `seed`, timed part by part.
pub fn bench_steps(
    trainer: &mut Trainer,
    backend: &mut dyn StepBackend,
    batch: usize,
    seq: usize,
    steps: usize,
    seed: u64,
    progress: &mut dyn FnMut(&StepTiming),
) -> Result<Vec<StepTiming>, String> {
    if batch == 0 || seq == 0 || steps == 0 {
        return Err("--batch, --seq and --steps must be positive".into());
    }
    let (window, vocab) = (seq + trainer.window_extra(), trainer.config.vocab_size as u64);
    let mut rng = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut timings = Vec::new();
    for _ in 0..steps {
        let windows: Vec<Vec<i64>> = (0..batch)
            .map(|_| {
                (0..window)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        ((rng >> 11) % vocab) as i64
                    })
                    .collect()
            })
            .collect();
        let mut timed = Timed { inner: &mut *backend, bind: 0.0, run: 0.0 };
        let start = Instant::now();
        let r = trainer.step_on(&mut timed, &windows).map_err(|e| e.to_string())?;
        let step_ms = start.elapsed().as_secs_f64() * 1e3;
        let t = StepTiming {
            step: r.step,
            loss: r.loss,
            step_ms,
            bind_ms: timed.bind,
            run_ms: timed.run,
            optimizer_ms: (step_ms - timed.bind - timed.run).max(0.0),
        };
        progress(&t);
        timings.push(t);
    }
    Ok(timings)
}

#[cfg(test)]
mod tests {
    use super::read_token_file;

    /// Text is read as ids whatever its length (a text of a multiple of 4 bytes was read as u32),
    /// its words that are not ids named; u32 files are read as such; either is checked against the
    /// vocabulary.
    #[test]
    fn token_files_are_text_or_u32_and_name_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("v3r-token-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let read = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            read_token_file(&path, 320)
                .map_err(|e| e.strip_prefix(&format!("{}: ", path.display())).unwrap().to_string())
        };
        assert_eq!(read("ids.txt", b"1 2\n 30\t4\n"), Ok(vec![1, 2, 30, 4]));
        assert_eq!(read("neg.txt", b"1 2 -3 4"), Err("token 2 is -3, outside the vocabulary (0..320)".into()));
        assert_eq!(read("float.txt", b"1 2.5 3 4"), Err("token 1 '2.5': invalid digit found in string".into()));
        assert_eq!(read("wide.txt", "7 ３".as_bytes()), Err("token 1 '３': invalid digit found in string".into()));
        let u32s: Vec<u8> = [5u32, 0, 319].iter().flat_map(|t| t.to_le_bytes()).collect();
        assert_eq!(read("ids.bin", &u32s), Ok(vec![5, 0, 319]));
        assert_eq!(
            read("big.bin", &320u32.to_le_bytes()),
            Err("token 0 is 320, outside the vocabulary (0..320)".into())
        );
        assert_eq!(
            read("odd.bin", &[1, 0, 0]),
            Err("neither whitespace-separated token ids nor little-endian u32 (3 bytes)".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
