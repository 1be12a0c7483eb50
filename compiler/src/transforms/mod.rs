//! Transforms on the `v3` dialect. Each pass is a thin wrapper, run inside MLIR's PassManager, around
//! a public function that does the work (the function is what tests and other passes call):
//! - `absorb-mla` ([`absorb_mla`]): decode attention in the absorbed form over the latent cache;
//! - `fuse-mla-projections` ([`fuse_mla_projections`]): the MLA front end as three kernels;
//! - `fuse-moe` ([`fuse_moe`]): routing + permutation, gather/scatter grouped GEMMs, the shared
//!   expert as more experts, the residual add in the down GEMM;
//! - `fuse-epilogues` ([`fuse_epilogues`]): SwiGLU dual GEMMs, residual adds (and the MoE combine)
//!   into GEMM epilogues, fp8 quantization into RMSNorm;
//! - `form-kernels` ([`form_kernels`]): every op into exactly one kernel function, deduplicated.
//!
//! Fusion passes only tag groups (`{v3.fusion = ...}`, see [`op_graph`]); `form-kernels` outlines them.

pub mod absorb_mla;
pub mod form_kernels;
pub mod fuse_epilogues;
pub mod fuse_mla_projections;
pub mod fuse_moe;
pub mod op_graph;

use std::sync::{Arc, Mutex};

use melior::ir::operation::OperationRef;
use melior::ir::r#type::TypeId;
use melior::ir::Module;
use melior::pass::{create_external, ExternalPass, PassManager};
use melior::Context;

/// A pass's TypeId is the address of its static; the (unread) byte keeps the statics distinct
/// objects (zero-sized statics may share one address).
#[repr(align(8))]
struct PassId(#[allow(dead_code)] u8);
static FORM_KERNELS_ID: PassId = PassId(0);
static FUSE_MLA_ID: PassId = PassId(1);
static FUSE_EPILOGUES_ID: PassId = PassId(2);
static ABSORB_MLA_ID: PassId = PassId(3);
static FUSE_MOE_ID: PassId = PassId(4);

/// A pass failure, with the pass's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pass}: {message}")]
pub struct PassError {
    pub pass: String,
    pub message: String,
}

/// The passes, in pipeline order: (name, what it does).
pub const PASSES: &[(&str, &str)] = &[
    ("absorb-mla", "decode attention in the absorbed form (W_UK into the query, W_UV into the output)"),
    (
        "fuse-mla-projections",
        "q_a/kv_a as one GEMM, the latent norms + RoPE + cache write as one kernel, q_b with RoPE",
    ),
    (
        "fuse-moe",
        "routing + permutation, gather grouped gate/up + SwiGLU, scatter grouped down + combine, shared experts as experts",
    ),
    ("fuse-epilogues", "SwiGLU dual GEMMs, residual adds and the MoE combine into GEMM epilogues, norm + fp8 quantize"),
    ("form-kernels", "every v3 op into exactly one deduplicated kernel function"),
];

/// The passes of the `fused` stage, in order.
pub const FUSED_STAGE: &[&str] = &["absorb-mla", "fuse-mla-projections", "fuse-moe", "fuse-epilogues", "form-kernels"];

/// A fusion pass: reads each entry's ops, extends the groups earlier passes tagged with `plan`,
/// and writes the tags back.
pub fn tag_groups(
    context: &Context,
    module_op: &OperationRef,
    pass: &str,
    plan: fn(&op_graph::OpGraph, &mut op_graph::Groups),
) -> Result<(), PassError> {
    for_each_entry(module_op, pass, |entry| {
        if let Some(g) = op_graph::OpGraph::read(entry) {
            let mut groups = op_graph::Groups::from_tags(&g);
            plan(&g, &mut groups);
            groups.tag(context, &g);
        }
        Ok(())
    })
}

/// Runs `f` on every entry function (not kernel functions) of `module_op`.
pub fn for_each_entry(
    module_op: &OperationRef,
    pass: &str,
    mut f: impl FnMut(&OperationRef) -> Result<(), PassError>,
) -> Result<(), PassError> {
    use melior::ir::block::BlockLike;
    use melior::ir::operation::OperationLike;
    use melior::ir::RegionLike;
    let body = module_op
        .region(0)
        .ok()
        .and_then(|r| r.first_block())
        .ok_or_else(|| PassError { pass: pass.into(), message: "expected a module with a body".into() })?;
    let mut op = body.first_operation();
    while let Some(o) = op {
        op = o.next_in_block();
        if o.region(0).is_ok() && !form_kernels::is_kernel(&o) {
            f(&o)?;
        }
    }
    Ok(())
}

/// Runs the named passes on `module` through a PassManager (which verifies after each pass).
pub fn run_passes(context: &Context, module: &mut Module, passes: &[&str]) -> Result<(), PassError> {
    let manager = PassManager::new(context);
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    for &name in passes {
        type Work = fn(&Context, &OperationRef) -> Result<(), PassError>;
        let (id, work): (&'static PassId, Work) = match name {
            "absorb-mla" => (&ABSORB_MLA_ID, absorb_mla::absorb_mla),
            "fuse-mla-projections" => (&FUSE_MLA_ID, fuse_mla_projections::fuse_mla_projections),
            "fuse-moe" => (&FUSE_MOE_ID, fuse_moe::fuse_moe),
            "fuse-epilogues" => (&FUSE_EPILOGUES_ID, fuse_epilogues::fuse_epilogues),
            "form-kernels" => (&FORM_KERNELS_ID, |c, op| {
                form_kernels::form_kernels(c, op).map_err(|e| PassError { pass: "form-kernels".into(), message: e.0 })
            }),
            other => {
                let known: Vec<&str> = PASSES.iter().map(|p| p.0).collect();
                return Err(PassError {
                    pass: other.into(),
                    message: format!("unknown pass (known: {})", known.join(", ")),
                });
            }
        };
        let about = PASSES.iter().find(|p| p.0 == name).map_or("", |p| p.1);
        let failure = failure.clone();
        let pass = create_external(
            move |op: OperationRef, pass: ExternalPass| {
                let started = std::time::Instant::now();
                let done = work(context, &op);
                tracing::debug!(pass = name, ms = started.elapsed().as_secs_f64() * 1e3, "pass done");
                if let Err(e) = done {
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    pass.signal_failure();
                }
            },
            TypeId::create(id),
            name,
            name,
            about,
            "builtin.module",
            &[],
        );
        manager.add_pass(pass);
    }
    let result = manager.run(module);
    let message = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (result, message) {
        (Ok(()), None) => Ok(()),
        (_, Some(message)) => Err(PassError { pass: passes.join(","), message }),
        (Err(e), None) => Err(PassError { pass: passes.join(","), message: e.to_string() }),
    }
}
