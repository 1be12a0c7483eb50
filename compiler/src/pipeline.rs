//! The staged pipeline driver. The pipeline is data: an ordered list of named stages, each a function
//! from the previous stage's output. Only this driver verifies, times and dumps between stages:
//! - after every stage the module is verified (MLIR's verifier, then [`crate::verify::verify_shapes`]);
//! - every stage runs under a tracing span and its time is logged at info level (`-v`);
//! - with `V3C_DUMP_DIR` set, stage NN is written to `$V3C_DUMP_DIR/<model>/<NN>-<stage>.mlir`;
//! - a run can start from IR text of a stage (`v3c dump-ir --from FILE --stage NAME`).
//!
//! Stage names are stable: users type them and dump folders and snapshots use them. Stages that later
//! issues add are listed in [`PLANNED_STAGES`] so asking for them gives a clear "not yet" error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use melior::ir::Module;
use melior::Context;
use v3c_models::{BuildOptions, Entry, ModelConfig};

use crate::import::{import, ImportError};
use crate::mlir::{parse_module, verify, MlirError};

/// A pipeline stage users can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub name: &'static str,
    pub about: &'static str,
}

/// The stages that exist, in order.
pub const STAGES: &[Stage] = &[
    Stage { name: "v3", about: "the model graph imported into the v3 dialect" },
    Stage { name: "fused", about: "ops grouped into deduplicated kernel functions, entries as launch lists" },
    Stage { name: "cpu", about: "every kernel as a function on memrefs in linalg/scf, ready for LLVM and the JIT" },
];

/// Stages later issues add, in order after [`STAGES`].
pub const PLANNED_STAGES: &[&str] = &["gpu", "nvvm", "ptx"];

/// The last stage: plain data rather than IR (`dump-ir --stage plan` prints JSON).
pub const PLAN_STAGE: &str = "plan";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("stage '{0}' is not implemented yet (available: {avail})", avail = STAGES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "))]
    NotYet(String),
    #[error("unknown stage '{0}' (stages: {all})", all = STAGES.iter().map(|s| s.name).chain(PLANNED_STAGES.iter().copied()).collect::<Vec<_>>().join(", "))]
    UnknownStage(String),
    #[error(transparent)]
    Mlir(#[from] MlirError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Graph(#[from] v3c_models::graph::GraphError),
    #[error(transparent)]
    Dialect(#[from] v3c_dialects::DialectError),
    #[error(transparent)]
    Pass(#[from] crate::transforms::PassError),
    #[error(transparent)]
    Cpu(#[from] crate::conversion::v3_to_cpu::CpuError),
    #[error("{what}: shape verification failed: {}", .errors.join("; "))]
    Shapes { what: String, errors: Vec<String> },
    #[error("{path}: cannot write dump: {source}")]
    Dump { path: String, source: std::io::Error },
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
}

/// Looks a stage up by name.
pub fn stage_index(name: &str) -> Result<usize, PipelineError> {
    if name == PLAN_STAGE {
        return Err(PipelineError::NotYet(format!(
            "{name} (not an IR stage: it is data; use `v3c dump-ir --stage plan`)"
        )));
    }
    if let Some(i) = STAGES.iter().position(|s| s.name == name) {
        return Ok(i);
    }
    if PLANNED_STAGES.contains(&name) {
        return Err(PipelineError::NotYet(name.into()));
    }
    Err(PipelineError::UnknownStage(name.into()))
}

/// Runs stages and does the verifying, timing and dumping between them.
pub struct Driver {
    /// Where this run's dumps go (`$V3C_DUMP_DIR/<model>`), if anywhere.
    dump_dir: Option<PathBuf>,
}

/// A file-system-safe label for a model (`deepseek-v3`, or a checkpoint directory's name).
pub fn model_label(model: &str) -> String {
    let base = Path::new(model).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| model.into());
    base.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

impl Driver {
    /// Dumps go to `$V3C_DUMP_DIR/<label>` when the variable is set.
    pub fn from_env(label: &str) -> Driver {
        Driver { dump_dir: std::env::var_os("V3C_DUMP_DIR").map(|d| PathBuf::from(d).join(model_label(label))) }
    }

    /// Writes a non-IR stage output (the plan) beside the IR dumps, as `<NN>-<stage>.<ext>`.
    pub fn dump_data(&self, stage: &str, ext: &str, text: &str) -> Result<(), PipelineError> {
        let Some(dir) = &self.dump_dir else { return Ok(()) };
        let path = dir.join(format!("{:02}-{stage}.{ext}", STAGES.len()));
        let err = |source| PipelineError::Dump { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::write(&path, text).map_err(err)
    }

    /// No dumps.
    pub fn quiet() -> Driver {
        Driver { dump_dir: None }
    }

    fn finish_stage(
        &self,
        context: &Context,
        module: &Module,
        index: usize,
        started: Instant,
        source_name: Option<&str>,
    ) -> Result<(), PipelineError> {
        let stage = STAGES[index].name;
        verify(context, module, stage)?;
        crate::verify::verify_shapes(module).map_err(|errors| PipelineError::Shapes {
            what: stage.into(),
            errors: errors.iter().map(|e| crate::mlir::name_source(e, source_name.unwrap_or("-"))).collect(),
        })?;
        tracing::info!(stage, ms = started.elapsed().as_secs_f64() * 1e3, "stage done (verified)");
        if let Some(dir) = &self.dump_dir {
            let path = dir.join(format!("{index:02}-{stage}.mlir"));
            let err = |source| PipelineError::Dump { path: path.display().to_string(), source };
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::write(&path, module.as_operation().to_string()).map_err(err)?;
        }
        Ok(())
    }

    /// Builds `entries` of `config` and runs the pipeline up to and including stage `until`.
    pub fn run_model<'c>(
        &self,
        context: &'c Context,
        config: &ModelConfig,
        entries: &[Entry],
        options: &BuildOptions,
        until: &str,
    ) -> Result<Module<'c>, PipelineError> {
        let last = stage_index(until)?;
        let span = tracing::info_span!("stage", name = "v3");
        let _enter = span.enter();
        let started = Instant::now();
        let graphs = entries
            .iter()
            .map(|&e| v3c_models::build(config, e, options).map(|g| (e.name(), g)))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<(&str, &v3c_models::Graph)> = graphs.iter().map(|(n, g)| (*n, g)).collect();
        let mut module = import(context, &refs)?;
        self.finish_stage(context, &module, 0, started, None)?;
        drop(_enter);
        self.run_stages(context, &mut module, 1, last, crate::transforms::FUSED_STAGE)?;
        Ok(module)
    }

    /// Imports graphs already built (a training step: the forward graph, its loss and backward
    /// pass, see `v3c_models::train`) and runs the pipeline up to `until`. Their `fused` stage only
    /// forms kernels: the fusion passes assume inference graphs, where a fused group's
    /// intermediates have no other users (the backward pass reads forward activations).
    pub fn run_graphs<'c>(
        &self,
        context: &'c Context,
        graphs: &[(&str, &v3c_models::Graph)],
        until: &str,
    ) -> Result<Module<'c>, PipelineError> {
        let last = stage_index(until)?;
        let started = Instant::now();
        let mut module = import(context, graphs)?;
        self.finish_stage(context, &module, 0, started, None)?;
        self.run_stages(context, &mut module, 1, last, &["form-kernels"])?;
        Ok(module)
    }

    /// Parses IR text of stage `stage` (`source_name` names it in errors), verifies it as that stage's
    /// output, and runs the remaining stages up to `until`.
    pub fn run_text<'c>(
        &self,
        context: &'c Context,
        text: &str,
        source_name: &str,
        stage: &str,
        until: &str,
    ) -> Result<Module<'c>, PipelineError> {
        let first = stage_index(stage)?;
        let last = stage_index(until)?;
        v3c_dialects::load(context)?;
        let started = Instant::now();
        let mut module = parse_module(context, text, source_name)?;
        self.finish_stage(context, &module, first, started, Some(source_name))?;
        self.run_stages(context, &mut module, first + 1, last, crate::transforms::FUSED_STAGE)?;
        Ok(module)
    }

    /// Runs stages `from..=to` (by index) on `module`, `fused` as the passes `fusion`.
    fn run_stages<'c>(
        &self,
        context: &'c Context,
        module: &mut Module<'c>,
        from: usize,
        to: usize,
        fusion: &[&str],
    ) -> Result<(), PipelineError> {
        for index in from..=to {
            let span = tracing::info_span!("stage", name = STAGES[index].name);
            let _enter = span.enter();
            let started = Instant::now();
            match STAGES[index].name {
                "fused" => crate::transforms::run_passes(context, module, fusion)?,
                "cpu" => *module = cpu_stage(context, module)?,
                other => return Err(PipelineError::NotYet(other.into())),
            }
            self.finish_stage(context, module, index, started, None)?;
        }
        Ok(())
    }

    /// [`Driver::run_text`] on a file.
    pub fn run_file<'c>(
        &self,
        context: &'c Context,
        path: &Path,
        stage: &str,
        until: &str,
    ) -> Result<Module<'c>, PipelineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PipelineError::Read { path: path.display().to_string(), source })?;
        self.run_text(context, &text, &path.display().to_string(), stage, until)
    }
}

/// Stage `cpu`: the module of every kernel of the `fused` module lowered for the CPU (functions on
/// memrefs, linalg/scf). Entry launch lists stay with the `fused` stage (the plan executes them).
fn cpu_stage<'c>(context: &'c Context, fused: &Module<'c>) -> Result<Module<'c>, PipelineError> {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    let mut text = String::from("module {\n");
    let mut op = fused.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if crate::transforms::form_kernels::is_kernel(&f) {
            let lowered = crate::conversion::v3_to_cpu::lower_kernel(&f)?;
            text.push_str(&lowered.text);
        }
    }
    text.push_str("}\n");
    Ok(parse_module(context, &text, "cpu stage")?)
}
