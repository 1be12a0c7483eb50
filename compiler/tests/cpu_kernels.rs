//! CPU kernels (stage `fused` -> linalg -> LLVM -> JIT) against the reference implementations of
//! their ops (`v3c_models::interp::kernels`), on the kernels of the tiny model and awkward row
//! counts (1, 3, 50). Kernels without a CPU lowering yet must say `unsupported on cpu: v3.<op>`.

use std::collections::HashMap;

use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, OperationRef};
use melior::ir::{RegionLike, ValueLike};
use v3c_compiler::conversion::v3_to_cpu::{CpuError, CpuKernel, HostBuffer, HostData};
use v3c_compiler::pipeline::Driver;
use v3c_compiler::verify::Shape;
use v3c_models::dtype::{bf16_to_f32, f32_to_bf16};
use v3c_models::interp::kernels;
use v3c_models::{BuildOptions, Entry, ModelConfig};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }
}

fn buffer(shape: &Shape, rows: usize, rng: &mut Rng, vocab: usize) -> HostBuffer {
    let dims: Vec<usize> = shape.dims.iter().map(|d| d.unwrap_or(rows)).collect();
    let n: usize = dims.iter().product();
    let data = match shape.element.as_str() {
        "f32" => HostData::F32((0..n).map(|_| rng.next() * 4.0).collect()),
        "bf16" => HostData::Bf16((0..n).map(|_| f32_to_bf16(rng.next())).collect()),
        "i64" => HostData::I64((0..n).map(|i| ((i * 7919 + 13) % vocab) as i64).collect()),
        other => panic!("no test data for {other}"),
    };
    HostBuffer { shape: dims, data }
}

fn floats(b: &HostBuffer) -> Vec<f32> {
    match &b.data {
        HostData::F32(v) => v.clone(),
        HostData::Bf16(v) => v.iter().map(|&x| bf16_to_f32(x)).collect(),
        HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
    }
}

/// Evaluates a kernel function op by op with the reference kernels.
fn reference(kernel: &OperationRef, inputs: &[HostBuffer]) -> Vec<Vec<f32>> {
    let block = kernel.region(0).unwrap().first_block().unwrap();
    let mut env: HashMap<usize, (Vec<f32>, Vec<usize>)> = HashMap::new();
    for (i, b) in inputs.iter().enumerate() {
        env.insert(block.argument(i).unwrap().to_raw().ptr as usize, (floats(b), b.shape.clone()));
    }
    let mut op = block.first_operation();
    let mut outputs = Vec::new();
    while let Some(o) = op {
        op = o.next_in_block();
        let name = o.name().as_string_ref().as_str().unwrap().to_string();
        let args: Vec<(Vec<f32>, Vec<usize>)> =
            (0..o.operand_count()).map(|i| env[&(o.operand(i).unwrap().to_raw().ptr as usize)].clone()).collect();
        if name == "func.return" {
            outputs = args.into_iter().map(|a| a.0).collect();
            break;
        }
        let (value, shape) = match name.as_str() {
            "v3.add" => (args[0].0.iter().zip(&args[1].0).map(|(a, b)| a + b).collect(), args[0].1.clone()),
            "v3.silu_mul" => {
                (args[0].0.iter().zip(&args[1].0).map(|(a, b)| kernels::silu(*a) * b).collect(), args[0].1.clone())
            }
            "v3.linear" | "v3.lm_head" => {
                let (m, k, n) = (args[0].1[0], args[0].1[1], args[1].1[0]);
                (kernels::matmul_nt(&args[0].0, &args[1].0, m, k, n), vec![m, n])
            }
            "v3.rms_norm" => {
                let eps: f32 =
                    o.attribute("eps").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                (kernels::rms_norm(&args[0].0, &args[1].0, eps), args[0].1.clone())
            }
            "v3.embed" => {
                let d = args[0].1[1];
                let rows: Vec<f32> = args[1]
                    .0
                    .iter()
                    .flat_map(|&id| args[0].0[id as usize * d..(id as usize + 1) * d].to_vec())
                    .collect();
                (rows, vec![args[1].1[0], d])
            }
            other => panic!("reference for {other} missing"),
        };
        env.insert(o.result(0).unwrap().to_raw().ptr as usize, (value, shape));
    }
    outputs
}

#[test]
fn cpu_kernels_match_the_reference_on_awkward_sizes() {
    let context = v3c_compiler::mlir::new_context();
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    let module =
        Driver::quiet().run_model(&context, &config, &[Entry::Prefill], &BuildOptions::default(), "fused").unwrap();
    let body = module.body();
    let (mut compiled, mut unsupported) = (Vec::new(), Vec::new());
    let mut op = body.first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_err() {
            continue;
        }
        match CpuKernel::compile(&context, &f) {
            Ok(kernel) => compiled.push((f, kernel)),
            Err(CpuError::Unsupported(what)) => {
                assert!(what.starts_with("v3.") || what.contains("fp8") || what.contains("rank"), "{what}");
                unsupported.push(what);
            }
            Err(e) => panic!("{e}"),
        }
    }
    let names: Vec<&str> = compiled.iter().map(|(_, k)| k.name.as_str()).collect();
    for expected in ["embed_0", "rms_norm_0", "swiglu_0", "gemm_residual_0", "lm_head_0"] {
        assert!(names.contains(&expected), "{expected} not compiled; compiled {names:?}, unsupported {unsupported:?}");
    }
    let mut rng = Rng(42);
    for (f, kernel) in &compiled {
        for rows in [1usize, 3, 50] {
            let mut inputs: Vec<HostBuffer> =
                kernel.inputs.iter().map(|s| buffer(s, rows, &mut rng, config.vocab_size)).collect();
            let want = reference(f, &inputs);
            let mut outputs: Vec<HostBuffer> = kernel
                .outputs
                .iter()
                .map(|s| {
                    let dims: Vec<usize> = s.dims.iter().map(|d| d.unwrap_or(rows)).collect();
                    let n = dims.iter().product();
                    HostBuffer { shape: dims, data: HostData::F32(vec![f32::NAN; n]) }
                })
                .collect();
            kernel.run(&mut inputs, &mut outputs).unwrap();
            for (got, want) in outputs.iter().zip(&want) {
                let got = floats(got);
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(1.0f32, |a, b| a.max(b.abs()));
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(diff <= 1e-5 * scale, "{} rows={rows}: max |diff| {diff} (scale {scale})", kernel.name);
            }
        }
    }
    eprintln!("compiled {names:?}; unsupported {unsupported:?}");
    // Honest about what is not lowered yet.
    assert!(unsupported.iter().any(|u| u.contains("attention")), "{unsupported:?}");
}
