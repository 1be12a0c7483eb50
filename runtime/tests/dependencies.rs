//! The runtime must never link MLIR or LLVM (it ships next to an artifact to a GPU box and must stay
//! a few MB). This asks cargo for the runtime's whole normal dependency tree and checks it.

use std::process::Command;

#[test]
fn runtime_links_no_mlir_or_llvm() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", "v3c-runtime", "-e", "normal,build", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("cudarc"), "unexpected tree:\n{tree}");
    for forbidden in ["melior", "mlir-sys", "inkwell", "llvm-sys", "tblgen"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{forbidden} "))),
            "v3c-runtime depends on {forbidden}:\n{tree}"
        );
    }
}
