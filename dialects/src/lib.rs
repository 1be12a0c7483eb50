//! `v3c-dialects`: the `v3` MLIR dialect and one typed Rust builder per op.
//!
//! The dialect is defined in IRDL (`dialects/irdl/v3.irdl.mlir`, embedded at build time) and loaded
//! into a context with [`load`]. Op-name strings live only in this crate ([`ops`]); the rest of the
//! project calls the builders. IRDL ops print in generic form (`"v3.linear"(...)`).

pub mod ops;

use melior::ir::Module;
use melior::Context;

/// The IRDL source of the `v3` dialect.
pub const IRDL_SOURCE: &str = include_str!("../irdl/v3.irdl.mlir");

/// Name of the dialect and the prefix of its ops.
pub const DIALECT: &str = "v3";

/// Function-argument attribute naming the checkpoint tensor an argument binds to.
pub const PARAM_ATTR: &str = "v3.param";
/// Function-argument attribute naming a graph input (tokens, positions, caches).
pub const INPUT_ATTR: &str = "v3.input";
/// Function-result attribute naming a graph output.
pub const OUTPUT_ATTR: &str = "v3.output";
/// Function attribute marking a kernel function and naming its root op.
pub const KERNEL_ATTR: &str = "v3.kernel";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialectError {
    #[error("the v3 dialect's IRDL definition does not parse or load (dialects/irdl/v3.irdl.mlir)")]
    Load,
    #[error("{op}: cannot build: {reason}")]
    Build { op: String, reason: String },
}

/// Loads the `v3` dialect into `context` (once; later calls do nothing).
pub fn load(context: &Context) -> Result<(), DialectError> {
    if context.is_registered_operation(&format!("{DIALECT}.linear")) {
        return Ok(());
    }
    let module = Module::parse(context, IRDL_SOURCE).ok_or(DialectError::Load)?;
    if !melior::utility::load_irdl_dialects(&module) {
        return Err(DialectError::Load);
    }
    Ok(())
}

/// Is `name` (e.g. `v3.linear`) an op of the dialect?
pub fn is_v3_op(name: &str) -> bool {
    name.strip_prefix(DIALECT).is_some_and(|rest| rest.starts_with('.'))
}
