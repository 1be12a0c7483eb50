//! MLIR contexts and text IR in and out, with MLIR's own diagnostics turned into error values.
//!
//! `Module::parse` verifies while parsing and returns `None` on failure; the diagnostics that say why
//! go to a handler. [`parse_module`] attaches one for the duration of the parse and returns every
//! diagnostic (with its location) in the error. [`verify`] does the same for an existing module.
//!
//! [`translate_to_llvm_ir`] turns a module in the LLVM dialect (plus NVVM etc.) into LLVM IR text, the
//! input of [`crate::target::emit_ptx`].
//!
//! Not handled here: the `v3` dialect (loaded from IRDL by `v3c-dialects`), pass pipelines.

use std::cell::RefCell;
use std::rc::Rc;

use melior::dialect::DialectRegistry;
use melior::ir::attribute::{BoolAttribute, IntegerAttribute, StringAttribute};
use melior::ir::operation::OperationLike;
use melior::ir::r#type::TypeLike;
use melior::ir::{Attribute, AttributeLike, Module};
use melior::utility::{register_all_dialects, register_all_llvm_translations};
use melior::Context;

/// A parse or verification failure, with every diagnostic MLIR emitted (location: message).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MlirError {
    #[error("MLIR parse failed: {}", .diagnostics.join("; "))]
    Parse { source_name: String, diagnostics: Vec<String> },
    #[error("{what}: MLIR verification failed: {}", .diagnostics.join("; "))]
    Verify { what: String, diagnostics: Vec<String> },
    #[error("{what}: translation to LLVM IR failed: {}", .diagnostics.join("; "))]
    Translate { what: String, diagnostics: Vec<String> },
}

/// A context with every upstream dialect registered and loaded, and the LLVM IR translations.
pub fn new_context() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    context
}

/// Collects the diagnostics MLIR emits while `f` runs.
fn with_diagnostics<T>(context: &Context, f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let diagnostics = Rc::new(RefCell::new(Vec::new()));
    let sink = diagnostics.clone();
    let id = context.attach_diagnostic_handler(move |d| {
        sink.borrow_mut().push(format!("{}: {}", d.location(), d));
        true
    });
    let value = f();
    context.detach_diagnostic_handler(id);
    let collected = diagnostics.borrow().clone();
    (value, collected)
}

/// MLIR names text parsed from memory `"-"`: rewrites a leading `loc("-":L:C): message` into
/// `source_name:L:C: message` so diagnostics point at the real file.
pub fn name_source(diagnostic: &str, source_name: &str) -> String {
    match diagnostic.strip_prefix("loc(\"-\":").and_then(|rest| rest.split_once("): ")) {
        Some((line_col, message)) => format!("{source_name}:{line_col}: {message}"),
        None => diagnostic.to_string(),
    }
}

/// An attribute as the passes read it: a string's value (unquoted), a bool's `true`/`false`, an
/// integer's number; anything else as MLIR prints it. The common kinds are read through MLIR's API:
/// printing builds an `AsmState`, which sorts every loaded dialect each time (on a 512-layer model,
/// reading each op's fusion tag that way was a noticeable share of the compile).
pub fn attribute_text(a: Attribute) -> String {
    if let Ok(s) = StringAttribute::try_from(a) {
        return s.value().to_string();
    }
    if let Ok(b) = BoolAttribute::try_from(a) {
        return b.value().to_string();
    }
    let t = a.r#type().to_raw();
    // SAFETY: `t` is a live type; these only inspect it.
    let plain_integer = unsafe {
        mlir_sys::mlirTypeIsAIndex(t)
            || (mlir_sys::mlirTypeIsAInteger(t)
                && mlir_sys::mlirIntegerTypeIsSignless(t)
                && mlir_sys::mlirIntegerTypeGetWidth(t) <= 64)
    };
    if let (true, Ok(i)) = (plain_integer, IntegerAttribute::try_from(a)) {
        // Integers print as `4 : i64`: the number, then the type.
        return format!("{} : {}", i.value(), crate::verify::element_name(a.r#type()));
    }
    a.to_string().trim_matches('"').to_string()
}

/// An integer attribute's value (any signedness and width up to 64, or `index`; not a bool), read
/// through MLIR's API as [`attribute_text`] does: None for any other attribute.
pub fn int_value(a: Attribute) -> Option<i64> {
    if BoolAttribute::try_from(a).is_ok() {
        return None;
    }
    IntegerAttribute::try_from(a).ok().map(|i| i.value())
}

/// A bool attribute's value; None for any other attribute.
pub fn bool_value(a: Attribute) -> Option<bool> {
    BoolAttribute::try_from(a).ok().map(|b| b.value())
}

/// Whether a routing op (`moe_route`, `moe_dispatch`, `route_logits_grad`, `balance_loss*`) is
/// DeepSeek-V2's softmax routing: its attribute `scoring = "softmax"` (absent: V3's sigmoid).
pub fn softmax_scoring(op: &melior::ir::operation::OperationRef) -> bool {
    op.attribute("scoring").is_ok_and(|a| a.to_string() == "\"softmax\"")
}

/// Parses (and thereby verifies) `text`; `source_name` names the input in errors (a file name).
pub fn parse_module<'c>(context: &'c Context, text: &str, source_name: &str) -> Result<Module<'c>, MlirError> {
    let (module, diagnostics) = with_diagnostics(context, || Module::parse(context, text));
    let diagnostics: Vec<String> = diagnostics.into_iter().map(|d| name_source(&d, source_name)).collect();
    module.ok_or_else(|| MlirError::Parse {
        source_name: source_name.to_string(),
        diagnostics: if diagnostics.is_empty() { vec!["no diagnostic emitted".into()] } else { diagnostics },
    })
}

/// Verifies `module` (created in `context`); `what` names it in errors (a stage or pass name).
pub fn verify(context: &Context, module: &Module, what: &str) -> Result<(), MlirError> {
    let (ok, diagnostics) = with_diagnostics(context, || module.as_operation().verify());
    if ok {
        Ok(())
    } else {
        Err(MlirError::Verify { what: what.to_string(), diagnostics })
    }
}

/// Translates `module` (only LLVM-dialect-translatable ops left, e.g. `llvm`, `nvvm`) to LLVM IR text.
/// `what` names the module in errors.
pub fn translate_to_llvm_ir(context: &Context, module: &Module, what: &str) -> Result<String, MlirError> {
    use mlir_sys::{
        mlirTranslateModuleToLLVMIR, LLVMContextCreate, LLVMContextDispose, LLVMDisposeMessage, LLVMDisposeModule,
        LLVMPrintModuleToString,
    };
    let (text, diagnostics) = with_diagnostics(context, || {
        // SAFETY: the module is a live, verified operation; the LLVM context and module are created,
        // printed and disposed here and never escape. A null module means translation failed (the
        // reason went to the diagnostic handler).
        unsafe {
            let llvm_context = LLVMContextCreate();
            let llvm_module = mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), llvm_context);
            let text = if llvm_module.is_null() {
                None
            } else {
                let raw = LLVMPrintModuleToString(llvm_module);
                let text = std::ffi::CStr::from_ptr(raw).to_string_lossy().into_owned();
                LLVMDisposeMessage(raw);
                LLVMDisposeModule(llvm_module);
                Some(text)
            };
            LLVMContextDispose(llvm_context);
            text
        }
    });
    text.ok_or_else(|| MlirError::Translate { what: what.to_string(), diagnostics })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_read_through_the_api_are_as_printed() {
        let context = new_context();
        for text in [
            "\"mla_latent#3\"",
            "true",
            "false",
            "4 : i64",
            "-7 : i32",
            "12 : index",
            "1 : i1",
            "3 : ui8",
            "2.500000e+00 : f32",
            "[1, 2]",
            "{a = 1 : i64}",
        ] {
            let a = Attribute::parse(&context, text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(attribute_text(a), a.to_string().trim_matches('"'), "{text}");
            // The values the passes read: what parsing the printed number gave (bools as bools).
            let printed = a.to_string();
            let number: Option<i64> = printed.split(':').next().and_then(|n| n.trim().parse().ok());
            assert_eq!(int_value(a), number, "{text}");
            let truth = ["true", "false"].iter().position(|t| printed == *t).map(|i| i == 0);
            assert_eq!(bool_value(a), truth, "{text}");
        }
    }

    #[test]
    fn parses_and_verifies_a_function() {
        let context = new_context();
        let text = "func.func @add(%a: f32, %b: f32) -> f32 {\n  %c = arith.addf %a, %b : f32\n  return %c : f32\n}\n";
        let module = parse_module(&context, text, "add.mlir").unwrap();
        verify(&context, &module, "test").unwrap();
        assert!(module.as_operation().to_string().contains("arith.addf"));
    }

    #[test]
    fn non_llvm_ops_do_not_translate() {
        let context = new_context();
        let text = "func.func @f(%a: f32) -> f32 {\n  %b = arith.addf %a, %a : f32\n  return %b : f32\n}\n";
        let module = parse_module(&context, text, "f.mlir").unwrap();
        let err = translate_to_llvm_ir(&context, &module, "f.mlir").unwrap_err();
        assert!(err.to_string().starts_with("f.mlir: translation to LLVM IR failed:"), "{err}");
    }

    #[test]
    fn parse_errors_carry_location_and_reason() {
        let context = new_context();
        let text = "func.func @f(%a: f32) -> f32 {\n  %c = arith.addf %a, %a : i32\n  return %c : f32\n}\n";
        let err = parse_module(&context, text, "bad.mlir").unwrap_err();
        let msg = err.to_string();
        // The diagnostic points at line 2 of the named source (the mistyped addf).
        assert!(msg.starts_with("MLIR parse failed: bad.mlir:2:"), "{msg}");
    }
}
