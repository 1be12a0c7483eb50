//! Parse + verify of a generated MLIR module shaped like a model's IR: one function per decoder
//! layer (61, as DeepSeek-V3), each a chain of tensor ops. Tracks the cost every pipeline stage pays
//! when the driver re-parses a dump (`v3c dump-ir --from`) or verifies between stages.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use v3c_compiler::mlir;

/// `layers` functions, each `ops` elementwise ops over tensor<?x7168xf32>.
fn generated_module(layers: usize, ops: usize) -> String {
    let mut text = String::from("module {\n");
    for l in 0..layers {
        text.push_str(&format!(
            "  func.func @layer_{l}(%x: tensor<?x7168xf32>, %w: tensor<?x7168xf32>) -> tensor<?x7168xf32> {{\n"
        ));
        let mut prev = "%x".to_string();
        for i in 0..ops {
            let op = if i % 2 == 0 { "arith.addf" } else { "arith.mulf" };
            text.push_str(&format!("    %v{i} = {op} {prev}, %w : tensor<?x7168xf32>\n"));
            prev = format!("%v{i}");
        }
        text.push_str(&format!("    return {prev} : tensor<?x7168xf32>\n  }}\n"));
    }
    text.push_str("}\n");
    text
}

fn parse_and_verify(c: &mut Criterion) {
    let context = mlir::new_context();
    let text = generated_module(61, 40);
    let mut group = c.benchmark_group("mlir");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("parse_verify_61x40", |b| {
        b.iter(|| {
            let module = mlir::parse_module(&context, &text, "generated.mlir").expect("parse");
            mlir::verify(&context, &module, "generated").expect("verify");
        })
    });
    group.finish();
}

criterion_group!(benches, parse_and_verify);
criterion_main!(benches);
