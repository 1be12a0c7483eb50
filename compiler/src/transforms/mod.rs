//! Transforms on the `v3` dialect. Each pass is a thin wrapper, run inside MLIR's PassManager, around
//! a public function that does the work (the function is what tests and other passes call):
//! - `form-kernels` ([`form_kernels`]): every op into exactly one kernel function, deduplicated.
//!
//! The fusion passes (MLA projections, absorbed decode, MoE gather/scatter, fp8 epilogues) group ops
//! before `form-kernels` outlines the groups; they arrive with the rest of the fusion work.

pub mod form_kernels;

use std::sync::{Arc, Mutex};

use melior::ir::operation::OperationRef;
use melior::ir::r#type::TypeId;
use melior::ir::Module;
use melior::pass::{create_external, ExternalPass, PassManager};
use melior::Context;

#[repr(align(8))]
struct PassId;
static FORM_KERNELS_ID: PassId = PassId;

/// A pass failure, with the pass's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pass}: {message}")]
pub struct PassError {
    pub pass: String,
    pub message: String,
}

/// The names users can give to `--passes` style options, in pipeline order.
pub const PASSES: &[&str] = &["form-kernels"];

/// Runs the named passes on `module` through a PassManager (which verifies after each pass).
pub fn run_passes(context: &Context, module: &mut Module, passes: &[&str]) -> Result<(), PassError> {
    let manager = PassManager::new(context);
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    for &name in passes {
        match name {
            "form-kernels" => {
                let failure = failure.clone();
                let pass = create_external(
                    move |op: OperationRef, pass: ExternalPass| {
                        if let Err(e) = form_kernels::form_kernels(context, &op) {
                            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                            pass.signal_failure();
                        }
                    },
                    TypeId::create(&FORM_KERNELS_ID),
                    "form-kernels",
                    "form-kernels",
                    "every v3 op into exactly one deduplicated kernel function",
                    "builtin.module",
                    &[],
                );
                manager.add_pass(pass);
            }
            other => {
                return Err(PassError {
                    pass: other.into(),
                    message: format!("unknown pass (known: {})", PASSES.join(", ")),
                })
            }
        }
    }
    let result = manager.run(module);
    let message = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (result, message) {
        (Ok(()), None) => Ok(()),
        (_, Some(message)) => Err(PassError { pass: passes.join(","), message }),
        (Err(e), None) => Err(PassError { pass: passes.join(","), message: e.to_string() }),
    }
}
