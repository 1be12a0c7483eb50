//! `absorb-mla`: decode-time MLA runs in the absorbed form (spec section 3): W_UK folds into the
//! query (q_abs = q_nope `W_UK[h]`) and W_UV into the output (o = o_lat `W_UV[h]^T`), so attention reads
//! the 576-wide latent cache directly instead of expanding it per cached token.
//!
//! Level: `v3` ops of an entry. Rewrites every `attention_decode` built in the naive form to the
//! absorbed form (the two agree to rounding; the reference checks it). W_UK and W_UV are row
//! blocks of `kv_b_proj` ([h (dn + dv), kv]): the kernels read them as views, no weight is re-laid
//! out per step. Prefill `attention` keeps the naive form, which is cheaper with many queries.

use melior::ir::attribute::{AttributeLike, StringAttribute};
use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::RegionLike;
use melior::Context;

use super::PassError;

/// Rewrites naive decode attention to the absorbed form in every entry of `module_op`.
pub fn absorb_mla(context: &Context, module_op: &OperationRef) -> Result<(), PassError> {
    let decode_op = v3c_dialects::ops::qualified("attention_decode");
    super::for_each_entry(module_op, "absorb-mla", |entry| {
        let Some(block) = entry.region(0).ok().and_then(|r| r.first_block()) else { return Ok(()) };
        let mut op = block.first_operation();
        while let Some(o) = op {
            op = o.next_in_block();
            if o.name().as_string_ref().as_str().ok() != Some(decode_op.as_str()) {
                continue;
            }
            let naive = o.attribute("form").map(|a| a.to_string() == "\"naive\"").unwrap_or(false);
            if naive {
                let absorbed = StringAttribute::new(context, "absorbed");
                let name = melior::StringRef::new("form");
                // SAFETY: replacing an attribute of a live op of the entry block.
                unsafe { mlir_sys::mlirOperationSetAttributeByName(o.to_raw(), name.to_raw(), absorbed.to_raw()) };
            }
        }
        Ok(())
    })
}
