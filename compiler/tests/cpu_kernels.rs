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
use v3c_models::graph::AttentionForm;
use v3c_models::interp::kernels;
use v3c_models::{BuildOptions, Entry, ModelConfig};
use v3c_runtime::signature::BufferType;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }
}

/// Random data for one kernel input: floats in [-2, 2), ids/positions below `rows` (and the
/// vocabulary), expert indices below `experts`.
fn buffer(shape: &BufferType, rows: usize, rng: &mut Rng, vocab: usize, experts: usize) -> HostBuffer {
    let dims: Vec<usize> = shape.dims.iter().map(|d| d.unwrap_or(rows)).collect();
    let n: usize = dims.iter().product();
    let data = match shape.element.as_str() {
        "f32" => HostData::F32((0..n).map(|_| rng.next() * 4.0).collect()),
        "bf16" => HostData::Bf16((0..n).map(|_| f32_to_bf16(rng.next())).collect()),
        // ids and positions: in the vocabulary and inside caches whose dynamic dims are `rows`.
        "i64" => HostData::I64((0..n).map(|i| ((i * 7919 + 13) % rows.min(vocab)) as i64).collect()),
        "i32" => HostData::I32((0..n).map(|i| ((i * 5 + (i / 3)) % experts) as i32).collect()),
        // e4m3 bits without the NaN codes.
        "f8E4M3FN" => HostData::F8((0..n).map(|_| ((rng.next() + 0.5) * 255.0) as u8 & 0xfe).collect()),
        other => panic!("no test data for {other}"),
    };
    HostBuffer { shape: dims, data }
}

/// Runs `kernel` on `inputs` into outputs poisoned with NaN (f32, or e4m3's NaN code), shaped as
/// the reference's `want`.
fn run_on_nan(kernel: &CpuKernel, inputs: &mut [HostBuffer], want: &[(Vec<f32>, Vec<usize>)]) -> Vec<HostBuffer> {
    let mut outputs: Vec<HostBuffer> = want
        .iter()
        .zip(&kernel.signature.outputs)
        .map(|((v, shape), declared)| HostBuffer {
            shape: shape.clone(),
            data: match declared.element.as_str() {
                "f8E4M3FN" => HostData::F8(vec![0x7f; v.len()]),
                _ => HostData::F32(vec![f32::NAN; v.len()]),
            },
        })
        .collect();
    // SAFETY: the outputs have exactly the shapes the kernel computes (the reference's).
    unsafe { kernel.run(inputs, &mut outputs) }.unwrap();
    outputs
}

fn floats(b: &HostBuffer) -> Vec<f32> {
    match &b.data {
        HostData::F32(v) => v.clone(),
        HostData::Bf16(v) => v.iter().map(|&x| bf16_to_f32(x)).collect(),
        HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        HostData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        HostData::F8(v) => v.iter().map(|&x| v3c_models::dtype::f8e4m3_to_f32(x)).collect(),
    }
}

/// The shape of result `r` of `o` with its dynamic dim (the tokens) set to `tokens`.
fn result_shape_of(o: &OperationRef, r: usize, tokens: usize) -> Vec<usize> {
    let s = Shape::parse(&o.result(r).unwrap().r#type().to_string()).unwrap();
    s.dims.iter().map(|d| d.unwrap_or(tokens)).collect()
}

/// (offsets, rows, weights) of a permutation given per expert its (token, weight) rows, as f32
/// values (what `reference` passes around).
fn permutation_buffers(per_expert: &[Vec<(usize, f32)>]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut offsets = vec![0.0f32];
    let (mut rows, mut weights) = (Vec::new(), Vec::new());
    for list in per_expert {
        rows.extend(list.iter().map(|&(t, _)| t as f32));
        weights.extend(list.iter().map(|&(_, w)| w));
        offsets.push(rows.len() as f32);
    }
    (offsets, rows, weights)
}

/// A valid permutation for `tokens` tokens: each picks `top_k` distinct routed experts (spread so
/// some experts get none and some many), then `shared` shared experts take every token.
fn random_permutation(tokens: usize, experts: usize, shared: usize, top_k: usize, rng: &mut Rng) -> [HostBuffer; 3] {
    let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts + shared];
    for t in 0..tokens {
        let start = ((rng.next() + 0.5) * experts as f32) as usize % experts;
        for j in 0..top_k {
            // Experts start, start + 1, ... skipping the last expert: it stays unpicked.
            let e = (start + j) % (experts - 1).max(1);
            per_expert[e].push((t, rng.next() + 0.75));
        }
    }
    for list in &mut per_expert[experts..] {
        list.extend((0..tokens).map(|t| (t, 1.0)));
    }
    let (offsets, rows, weights) = permutation_buffers(&per_expert);
    let width = top_k + shared;
    [
        HostBuffer { shape: vec![offsets.len()], data: HostData::I32(offsets.iter().map(|&v| v as i32).collect()) },
        HostBuffer { shape: vec![tokens, width], data: HostData::I32(rows.iter().map(|&v| v as i32).collect()) },
        HostBuffer { shape: vec![tokens, width], data: HostData::F32(weights) },
    ]
}

/// `outputs` with every element set to a value no kernel writes from valid inputs (NaN; for e4m3
/// bits 0x7f, NaN too).
fn poisoned(outputs: &[HostBuffer]) -> Vec<HostBuffer> {
    outputs
        .iter()
        .map(|b| HostBuffer {
            shape: b.shape.clone(),
            data: match &b.data {
                HostData::F8(v) => HostData::F8(vec![0x7f; v.len()]),
                HostData::I32(v) => HostData::I32(vec![i32::MIN; v.len()]),
                other => {
                    HostData::F32(vec![f32::NAN; floats(&HostBuffer { shape: vec![], data: other.clone() }).len()])
                }
            },
        })
        .collect()
}

/// Which elements of `b` were written (differ from the poison).
fn written(b: &HostBuffer) -> Vec<bool> {
    match &b.data {
        HostData::F8(v) => v.iter().map(|&x| x != 0x7f).collect(),
        HostData::I32(v) => v.iter().map(|&x| x != i32::MIN).collect(),
        _ => floats(b).iter().map(|x| !x.is_nan()).collect(),
    }
}

/// A partitioned kernel's two shares, each run alone on poisoned outputs, write disjoint sets of
/// elements that together are every element, with exactly the values of the whole `outputs` (so
/// they can run concurrently).
fn check_shares(kernel: &CpuKernel, inputs: &mut [HostBuffer], whole: &[HostBuffer]) {
    let mut owner: Vec<Vec<Option<usize>>> = whole.iter().map(|b| vec![None; written(b).len()]).collect();
    for part in 0..2 {
        let mut outs = poisoned(whole);
        let views: Vec<v3c_compiler::conversion::v3_to_cpu::RawBuffer> =
            inputs.iter_mut().chain(outs.iter_mut()).map(|b| b.raw()).collect();
        // SAFETY: the buffers have the shapes of the whole run and outlive the call.
        unsafe { kernel.run_part(&views, part, 2) }.unwrap();
        for (o, (got, want)) in outs.iter().zip(whole).enumerate() {
            let (w, gv, wv) = (written(got), floats(got), floats(want));
            for i in 0..w.len() {
                if !w[i] {
                    continue;
                }
                assert!(
                    owner[o][i].is_none(),
                    "{}: output {o}[{i}] written by shares {owner:?} and {part}",
                    kernel.name,
                    owner = owner[o][i]
                );
                owner[o][i] = Some(part);
                assert_eq!(gv[i].to_bits(), wv[i].to_bits(), "{}: share {part} output {o}[{i}]", kernel.name);
            }
        }
    }
    for (o, owners) in owner.iter().enumerate() {
        assert!(owners.iter().all(Option::is_some), "{}: output {o} not fully written by the shares", kernel.name);
    }
}

/// Evaluates a kernel function op by op with the reference kernels: (values, shape) per result.
fn reference(kernel: &OperationRef, inputs: &[HostBuffer]) -> Vec<(Vec<f32>, Vec<usize>)> {
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
            outputs = args;
            break;
        }
        let result_shape = |r: usize| -> Vec<usize> {
            let s = Shape::parse(&o.result(r).unwrap().r#type().to_string()).unwrap();
            let known: usize = s.dims.iter().flatten().product();
            let total: usize = args[0].0.len();
            s.dims.iter().map(|d| d.unwrap_or(if known == 0 { 0 } else { total / known })).collect()
        };
        let results: Vec<(Vec<f32>, Vec<usize>)> = match name.as_str() {
            "v3.add" => vec![(args[0].0.iter().zip(&args[1].0).map(|(a, b)| a + b).collect(), args[0].1.clone())],
            "v3.silu_mul" => vec![(
                args[0].0.iter().zip(&args[1].0).map(|(a, b)| kernels::silu(*a) * b).collect(),
                args[0].1.clone(),
            )],
            "v3.linear" | "v3.lm_head" => {
                let (m, k, n) = (args[0].1[0], args[0].1[1], args[1].1[0]);
                vec![(kernels::matmul_nt(&args[0].0, &args[1].0, m, k, n), vec![m, n])]
            }
            "v3.rms_norm" => {
                let eps: f32 =
                    o.attribute("eps").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                vec![(kernels::rms_norm(&args[0].0, &args[1].0, eps), args[0].1.clone())]
            }
            "v3.layer_norm" => {
                let eps: f32 =
                    o.attribute("eps").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                vec![(kernels::layer_norm(&args[0].0, &args[1].0, &args[2].0, eps), args[0].1.clone())]
            }
            "v3.embed" => {
                let d = args[0].1[1];
                let rows: Vec<f32> = args[1]
                    .0
                    .iter()
                    .flat_map(|&id| args[0].0[id as usize * d..(id as usize + 1) * d].to_vec())
                    .collect();
                vec![(rows, vec![args[1].1[0], d])]
            }
            "v3.reshape" => vec![(args[0].0.clone(), result_shape(0))],
            "v3.quantize_fp8" => {
                let group: usize =
                    o.attribute("group").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                let k = *args[0].1.last().unwrap();
                let (q, scales) = kernels::quantize_fp8(&args[0].0, k, group);
                let mut scale_shape = args[0].1.clone();
                *scale_shape.last_mut().unwrap() = k.div_ceil(group);
                let decoded = q.iter().map(|&b| v3c_models::dtype::f8e4m3_to_f32(b)).collect();
                vec![(decoded, args[0].1.clone()), (scales, scale_shape)]
            }
            "v3.split" => {
                let axis: usize =
                    o.attribute("axis").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                let shape = &args[0].1;
                let (outer, inner): (usize, usize) =
                    (shape[..axis].iter().product(), shape[axis + 1..].iter().product());
                let mut start = 0;
                (0..o.result_count())
                    .map(|r| {
                        let mut s = shape.clone();
                        s[axis] = Shape::parse(&o.result(r).unwrap().r#type().to_string()).unwrap().dims[axis].unwrap();
                        let mut v = Vec::new();
                        for i in 0..outer {
                            v.extend_from_slice(
                                &args[0].0
                                    [(i * shape[axis] + start) * inner..(i * shape[axis] + start + s[axis]) * inner],
                            );
                        }
                        start += s[axis];
                        (v, s)
                    })
                    .collect()
            }
            "v3.concat" => {
                let axis: usize =
                    o.attribute("axis").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                let (a, b) = (&args[0], &args[1]);
                let (outer, inner): (usize, usize) = (a.1[..axis].iter().product(), a.1[axis + 1..].iter().product());
                let mut v = Vec::new();
                for i in 0..outer {
                    v.extend_from_slice(&a.0[i * a.1[axis] * inner..(i + 1) * a.1[axis] * inner]);
                    v.extend_from_slice(&b.0[i * b.1[axis] * inner..(i + 1) * b.1[axis] * inner]);
                }
                let mut s = a.1.clone();
                s[axis] += b.1[axis];
                vec![(v, s)]
            }
            "v3.gather_rows" => {
                // Each query's selected rows' first `width` columns (zeros past its selection),
                // and its last valid slot.
                let width: usize =
                    o.attribute("width").unwrap().to_string().split(':').next().unwrap().trim().parse().unwrap();
                let (keys, selected) = (&args[0], &args[1]);
                let (t, k, c) = (selected.1[0], selected.1[1], *keys.1.last().unwrap());
                let per_query = keys.1.len() == 3;
                let (mut rows, mut last) = (vec![0.0f32; t * k * width], Vec::new());
                for i in 0..t {
                    let picks = &selected.0[i * k..(i + 1) * k];
                    let base = if per_query { i * keys.1[1] } else { 0 };
                    for (slot, &j) in picks.iter().enumerate().filter(|(_, &j)| j >= 0.0) {
                        let from = (base + j as usize) * c;
                        rows[(i * k + slot) * width..(i * k + slot + 1) * width]
                            .copy_from_slice(&keys.0[from..from + width]);
                    }
                    last.push(picks.iter().filter(|&&j| j >= 0.0).count() as f32 - 1.0);
                }
                vec![(rows, vec![t, k, width]), (last, vec![t])]
            }
            "v3.cache_write" => {
                let (cache, entries, positions) = (&args[0], &args[1], &args[2]);
                let (sl, c) = (cache.1[1], cache.1[2]);
                let mut v = cache.0.clone();
                for (b, &p) in positions.0.iter().enumerate() {
                    let p = p as usize;
                    v[(b * sl + p) * c..(b * sl + p + 1) * c].copy_from_slice(&entries.0[b * c..(b + 1) * c]);
                }
                vec![(v, cache.1.clone())]
            }
            "v3.rope" => {
                let attr = |n: &str| o.attribute(n).unwrap().to_string();
                let inv: Vec<f32> = attr("inv_freq")
                    .trim_start_matches("array<f32:")
                    .trim_end_matches('>')
                    .split(',')
                    .map(|x| x.trim().parse().unwrap())
                    .collect();
                let factor: f32 = attr("attention_factor").split(':').next().unwrap().trim().parse().unwrap();
                let interleave = attr("interleave") == "true";
                let dim = 2 * inv.len();
                let mut x = args[0].0.clone();
                let per_row = x.len() / args[1].0.len().max(1);
                for (row, &p) in args[1].0.iter().enumerate() {
                    let (cos, sin) = v3c_models::rope::cos_sin(&inv, factor, p as i64);
                    for v in x[row * per_row..(row + 1) * per_row].chunks_mut(dim) {
                        kernels::rotate(v, &cos, &sin, interleave);
                    }
                }
                vec![(x, args[0].1.clone())]
            }
            "v3.attention" | "v3.attention_decode" => {
                let attr = |n: &str| o.attribute(n).unwrap().to_string();
                let scale: f32 = attr("scale").split(':').next().unwrap().trim().parse().unwrap();
                let kv: usize = attr("kv_lora_rank").split(':').next().unwrap().trim().parse().unwrap();
                let form =
                    if attr("form").contains("absorbed") { AttentionForm::Absorbed } else { AttentionForm::Naive };
                let (qn, qp, lat) = (&args[0], &args[1], &args[2]);
                let kvb_at = if name == "v3.attention" { 3 } else { 4 };
                // An e4m3 kv_b: each value times its 128 x 128 block's scale.
                let dequantized = args.get(kvb_at + 1).map(|(scales, sshape)| {
                    let (kvb, cols) = (&args[kvb_at].0, args[kvb_at].1[1]);
                    let values = kvb
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v * scales[(i / cols / 128) * sshape[1] + (i % cols) / 128]);
                    (values.collect::<Vec<f32>>(), args[kvb_at].1.clone())
                });
                let kvb = dequantized.as_ref().unwrap_or(&args[kvb_at]);
                let (heads, nope, rope) = (qn.1[1], qn.1[2], qp.1[2]);
                let dims = kernels::MlaDims { heads, nope, rope, v: kvb.1[0] / heads - nope, kv_lora: kv };
                let n = qn.1[0];
                if name == "v3.attention" {
                    let s = lat.1[0];
                    let visible: Vec<usize> = (0..n).map(|i| s - n + i).collect();
                    vec![(
                        kernels::mla(&qn.0, &qp.0, &lat.0, &kvb.0, &visible, s, dims, scale, form),
                        vec![n, heads, dims.v],
                    )]
                } else {
                    let (s, c) = (lat.1[1], lat.1[2]);
                    let mut out = Vec::new();
                    for (b, &p) in args[3].0.iter().enumerate() {
                        out.extend(kernels::mla(
                            &qn.0[b * heads * nope..(b + 1) * heads * nope],
                            &qp.0[b * heads * rope..(b + 1) * heads * rope],
                            &lat.0[b * s * c..(b + 1) * s * c],
                            &kvb.0,
                            &[p as usize],
                            s,
                            dims,
                            scale,
                            form,
                        ));
                    }
                    vec![(out, vec![n, heads, dims.v])]
                }
            }
            "v3.moe_dispatch" => {
                let attr = |n: &str| o.attribute(n).unwrap().to_string();
                let num = |n: &str| attr(n).split(':').next().unwrap().trim().parse::<f32>().unwrap();
                let r = v3c_models::graph::Routing {
                    top_k: num("top_k") as usize,
                    n_group: num("n_group") as usize,
                    topk_group: num("topk_group") as usize,
                    norm_topk_prob: attr("norm_topk_prob") == "true",
                    routed_scaling_factor: num("routed_scaling_factor"),
                    scoring: match o.attribute("scoring") {
                        Ok(_) => v3c_models::config::Scoring::Softmax,
                        Err(_) => v3c_models::config::Scoring::Sigmoid,
                    },
                };
                let shared = num("num_shared") as usize;
                let no_bias = (Vec::new(), Vec::new());
                let (x, gate, bias) = (&args[0], &args[1], args.get(2).unwrap_or(&no_bias));
                let (e, d) = (gate.1[0], gate.1[1]);
                let t = x.1[0];
                let logits = kernels::matmul_nt(&x.0, &gate.0, t, d, e);
                let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e + shared];
                for (tok, row) in logits.chunks(e).enumerate() {
                    let (i, ws) = kernels::route(row, &bias.0, &r);
                    for (ex, w) in i.into_iter().zip(ws) {
                        per_expert[ex].push((tok, w));
                    }
                }
                for list in &mut per_expert[e..] {
                    list.extend((0..t).map(|tok| (tok, 1.0)));
                }
                let (offsets, rows, weights) = permutation_buffers(&per_expert);
                let width = r.top_k + shared;
                vec![(offsets, vec![e + shared + 1]), (rows, vec![t, width]), (weights, vec![t, width])]
            }
            "v3.moe_gate_up" => {
                let (x, offsets, rows, gate, up) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
                let (experts, inter, d) = (gate.1[0], gate.1[1], gate.1[2]);
                let h_rows = rows.0.len();
                let mut h = vec![0.0f32; h_rows * inter];
                for e in 0..offsets.0.len() - 1 {
                    let (g, u) = if e < experts {
                        (&gate.0[e * inter * d..(e + 1) * inter * d], &up.0[e * inter * d..(e + 1) * inter * d])
                    } else {
                        let s = e - experts;
                        (&args[5].0[s * inter * d..(s + 1) * inter * d], &args[6].0[s * inter * d..(s + 1) * inter * d])
                    };
                    for r in offsets.0[e] as usize..offsets.0[e + 1] as usize {
                        let t = rows.0[r] as usize;
                        let xr = &x.0[t * d..(t + 1) * d];
                        let gv = kernels::matmul_nt(xr, g, 1, d, inter);
                        let uv = kernels::matmul_nt(xr, u, 1, d, inter);
                        for i in 0..inter {
                            h[r * inter + i] = kernels::silu(gv[i]) * uv[i];
                        }
                    }
                }
                vec![(h, result_shape_of(&o, 0, rows.1[0]))]
            }
            "v3.moe_down" => {
                let (h, offsets, rows, weights, down) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
                let (experts, d, inter) = (down.1[0], down.1[1], down.1[2]);
                let t = rows.1[0];
                let shared = offsets.0.len() - 1 - experts;
                let mut y = vec![0.0f32; t * d];
                for e in 0..experts + shared {
                    let w: Vec<f32> = if e < experts {
                        down.0[e * d * inter..(e + 1) * d * inter].to_vec()
                    } else {
                        // Column block s of the shared expert's [D, S*I] down weight.
                        let s = e - experts;
                        (0..d * inter)
                            .map(|k| args[5].0[(k / inter) * shared * inter + s * inter + k % inter])
                            .collect()
                    };
                    for r in offsets.0[e] as usize..offsets.0[e + 1] as usize {
                        let tok = rows.0[r] as usize;
                        let out = kernels::matmul_nt(&h.0[r * inter..(r + 1) * inter], &w, 1, inter, d);
                        for (yv, ov) in y[tok * d..(tok + 1) * d].iter_mut().zip(out) {
                            *yv += weights.0[r] * ov;
                        }
                    }
                }
                if let Some(residual) = args.get(5 + (shared > 0) as usize) {
                    y.iter_mut().zip(&residual.0).for_each(|(a, b)| *a += b);
                }
                vec![(y, vec![t, d])]
            }
            other => panic!("reference for {other} missing"),
        };
        for (r, value) in results.into_iter().enumerate() {
            env.insert(o.result(r).unwrap().to_raw().ptr as usize, value);
        }
    }
    outputs
}

#[test]
fn cpu_kernels_match_the_reference_on_awkward_sizes() {
    let context = v3c_compiler::mlir::new_context();
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    let module = Driver::quiet().run_model(&context, &config, &Entry::ALL, &BuildOptions::default(), "fused").unwrap();
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
    for expected in [
        "embed_0",
        "rms_norm_0",
        "swiglu_0",
        "gemm_residual_0",
        "lm_head_0",
        "mla_projections_0",
        "mla_q_up_0",
        "mla_latent_0",
        "mla_latent_1",
        "concat_0",
        "attention_0",
        "attention_decode_0",
        "moe_dispatch_0",
        "moe_gate_up_0",
        "moe_down_0",
    ] {
        assert!(names.contains(&expected), "{expected} not compiled; compiled {names:?}, unsupported {unsupported:?}");
    }
    let mut rng = Rng(42);
    for (f, kernel) in &compiled {
        for rows in [1usize, 3, 50] {
            let mut inputs: Vec<HostBuffer> = kernel
                .signature
                .inputs
                .iter()
                .map(|s| buffer(s, rows, &mut rng, config.vocab_size, config.n_routed_experts))
                .collect();
            // Grouped GEMMs read a permutation: (offsets, rows[, row weights]) after the activations.
            if kernel.signature.partitioned {
                let width = kernel.signature.inputs[2].dims[1].unwrap();
                let (total, experts) =
                    (kernel.signature.inputs[1].dims[0].unwrap() - 1, kernel.signature.inputs[4].dims[0].unwrap());
                let perm = random_permutation(rows, experts, total - experts, width - (total - experts), &mut rng);
                let n = if kernel.name.starts_with("moe_down") { 3 } else { 2 };
                for (slot, b) in inputs[1..1 + n].iter_mut().zip(perm) {
                    *slot = b;
                }
            }
            let want = reference(f, &inputs);
            // Outputs poisoned with NaN, shaped as the reference computes them.
            let mut outputs: Vec<HostBuffer> = want
                .iter()
                .zip(&kernel.signature.outputs)
                .map(|((v, shape), declared)| HostBuffer {
                    shape: shape.clone(),
                    data: match declared.element.as_str() {
                        "i32" => HostData::I32(vec![-1; v.len()]),
                        _ => HostData::F32(vec![f32::NAN; v.len()]),
                    },
                })
                .collect();
            // The kernel's own shape inference agrees with the reference's shapes.
            let in_shapes: Vec<Vec<usize>> = inputs.iter().map(|b| b.shape.clone()).collect();
            let inferred = kernel.output_shapes(&in_shapes).unwrap();
            assert_eq!(inferred, want.iter().map(|w| w.1.clone()).collect::<Vec<_>>(), "{}", kernel.name);
            // SAFETY: output buffers have exactly the shapes the kernel computes (the reference's).
            unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
            if kernel.signature.partitioned {
                check_shares(kernel, &mut inputs, &outputs);
            }
            for (got, (want, _)) in outputs.iter().zip(&want) {
                let got = floats(got);
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(1.0f32, |a, b| a.max(b.abs()));
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, max_or_nan);
                assert!(diff <= 1e-5 * scale, "{} rows={rows}: max |diff| {diff} (scale {scale})", kernel.name);
            }
        }
    }
    eprintln!("compiled {names:?}; unsupported {unsupported:?}");
    // Honest about what is not lowered yet: exactly these ops.
    let mut missing = unsupported.clone();
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "every kernel of the tiny model lowers: {missing:?}");
}

/// MLA attention kernels (prefill naive and absorbed, decode absorbed) equal the reference
/// interpreter bit for bit in f32: every product runs in the reference's order. Dims that are not
/// multiples of 16 (tail tiles), more than 256 queries (two query chunks), one query and one key.
#[test]
fn attention_kernels_match_the_reference_bit_for_bit() {
    let context = v3c_compiler::mlir::new_context();
    let tiny = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    let mut awkward = tiny.clone();
    (awkward.num_attention_heads, awkward.kv_lora_rank, awkward.qk_nope_head_dim) = (3, 40, 24);
    (awkward.qk_rope_head_dim, awkward.v_head_dim) = (8, 20);
    // Value and latent widths of whole 16-lane tiles: W_UV transposed in registers.
    let mut even = tiny.clone();
    (even.num_attention_heads, even.kv_lora_rank, even.v_head_dim) = (2, 32, 32);
    // The same in fp8 precision (an e4m3 kv_b, the output quantized): absorbed, dequantized per head.
    let mut even8 = even.clone();
    even8.quantization = Some(v3c_models::config::Fp8Quantization { weight_block: [128, 128] });
    let f32p = v3c_models::Precision::F32;
    let mut checked = Vec::new();
    for (config, form, precision) in [
        (&tiny, None, f32p),
        (&tiny, Some(AttentionForm::Absorbed), f32p),
        (&awkward, None, f32p),
        (&even, None, f32p),
        (&even8, None, v3c_models::Precision::Fp8),
    ] {
        let options = BuildOptions { attention_form: form, precision, ..Default::default() };
        let module = Driver::quiet().run_model(&context, config, &Entry::ALL, &options, "fused").unwrap();
        let mut op = module.body().first_operation();
        let mut rng = Rng(7);
        while let Some(f) = op {
            op = f.next_in_block();
            let name = f.attribute("sym_name").map(|a| a.to_string()).unwrap_or_default();
            if !name.trim_matches('"').starts_with("attention") {
                continue;
            }
            let kernel = CpuKernel::compile(&context, &f).unwrap();
            for rows in [1usize, 17, 300] {
                let mut inputs: Vec<HostBuffer> =
                    kernel.signature.inputs.iter().map(|s| buffer(s, rows, &mut rng, config.vocab_size, 1)).collect();
                let want = reference(&f, &inputs);
                let outputs = run_on_nan(&kernel, &mut inputs, &want);
                for (got, (want, _)) in outputs.iter().zip(&want) {
                    let got = floats(got);
                    let differ = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(
                        differ,
                        0,
                        "{} ({form:?}) rows={rows}: {differ} of {} values differ",
                        kernel.name,
                        got.len()
                    );
                }
            }
            checked.push(format!("{}/{form:?}", kernel.name));
        }
    }
    assert_eq!(checked.len(), 10, "{checked:?}");
}

/// On the CPU backend, prefill of T tokens then decode of k more (absorbed MLA over the latent cache)
/// gives the logits of one prefill of T + k (naive MLA), and both match the reference interpreter.
#[test]
fn cpu_incremental_decode_matches_full_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 5).unwrap();
    let model = v3c_models::reference::Model::open(&ckpt, v3c_models::Precision::F32).unwrap();
    let tokens = [7u32, 300, 2, 45, 99, 1, 250, 12];
    let full = v3c_compiler::cpu_backend::logits(&model, &tokens, 0, None).unwrap().logits;
    let reference = model.logits(&tokens, 0).unwrap().logits;
    let v = config.vocab_size;
    let (full, reference) = (full.as_f32().unwrap(), reference.as_f32().unwrap());
    let diff = full.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, max_or_nan);
    assert!(diff < 1e-4, "cpu vs reference prefill: {diff}");
    let context = v3c_compiler::mlir::new_context();
    let mut session = v3c_compiler::cpu_backend::CpuSession::new(&context, &model, tokens.len(), None).unwrap();
    let split = 3;
    let mut rows = vec![session.prefill(&tokens[..split]).unwrap()];
    for &t in &tokens[split..] {
        rows.push(session.decode(t).unwrap());
    }
    for (r, row) in rows.iter().enumerate() {
        let want = &full[(split - 1 + r) * v..(split + r) * v];
        let diff = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, max_or_nan);
        assert!(diff < 1e-4, "position {}: decode vs prefill differ by {diff}", split - 1 + r);
    }
    assert!(session.decode(1).unwrap_err().to_string().contains("session is full"));
}

/// A decode batch of sequences with different lengths gives each sequence the logits it gets alone.
#[test]
fn cpu_batched_decode_of_different_lengths_equals_each_alone() {
    use std::collections::HashMap;
    use v3c_compiler::cpu_backend::{CpuProgram, CpuSession};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 9).unwrap();
    let model = v3c_models::reference::Model::open(&ckpt, v3c_models::Precision::F32).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let (max_len, c) = (12usize, config.latent_dim());
    let prompts: [&[u32]; 2] = [&[5, 6, 7, 8, 9], &[100, 3]];
    let next = [11u32, 42];
    // Each alone: prefill, then decode the next token; keep the caches after prefill.
    let mut alone = Vec::new();
    let mut caches: Vec<HashMap<String, Vec<f32>>> = Vec::new();
    for (p, &n) in prompts.iter().zip(&next) {
        let mut s = CpuSession::new(&context, &model, max_len, None).unwrap();
        s.prefill(p).unwrap();
        // Re-run the prefill through the program to read the caches it produced.
        let program =
            CpuProgram::new(&context, &config, &[Entry::Prefill], true, v3c_models::Precision::F32, &model.checkpoint)
                .unwrap();
        let mut inputs = HashMap::new();
        inputs.insert(
            "tokens".to_string(),
            HostBuffer { shape: vec![p.len()], data: HostData::I64(p.iter().map(|&x| x as i64).collect()) },
        );
        inputs.insert(
            "positions".to_string(),
            HostBuffer { shape: vec![p.len()], data: HostData::I64((0..p.len() as i64).collect()) },
        );
        let names: Vec<String> = (0..config.num_hidden_layers).map(|l| format!("kv_cache.{l}")).collect();
        for n in &names {
            inputs.insert(n.clone(), HostBuffer { shape: vec![0, c], data: HostData::F32(Vec::new()) });
        }
        let out = program.run("prefill", &inputs, &names.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        caches.push(names.iter().map(|n| (n.clone(), floats(&out[n]))).collect());
        alone.push(s.decode(n).unwrap());
    }
    // Together: one decode launch list over B = 2 with per-sequence positions.
    let program =
        CpuProgram::new(&context, &config, &[Entry::Decode], true, v3c_models::Precision::F32, &model.checkpoint)
            .unwrap();
    let mut inputs = HashMap::new();
    inputs.insert(
        "tokens".to_string(),
        HostBuffer { shape: vec![2], data: HostData::I64(next.iter().map(|&x| x as i64).collect()) },
    );
    inputs.insert(
        "positions".to_string(),
        HostBuffer { shape: vec![2], data: HostData::I64(prompts.iter().map(|p| p.len() as i64).collect()) },
    );
    for l in 0..config.num_hidden_layers {
        let name = format!("kv_cache.{l}");
        let mut cache = vec![0.0f32; 2 * max_len * c];
        for (b, seq) in caches.iter().enumerate() {
            let rows = &seq[&name];
            cache[b * max_len * c..b * max_len * c + rows.len()].copy_from_slice(rows);
        }
        inputs.insert(name, HostBuffer { shape: vec![2, max_len, c], data: HostData::F32(cache) });
    }
    let out = program.run("decode", &inputs, &["logits"]).unwrap();
    let logits = floats(&out["logits"]);
    let v = config.vocab_size;
    for (b, want) in alone.iter().enumerate() {
        let diff = logits[b * v..(b + 1) * v].iter().zip(want).map(|(a, w)| (a - w).abs()).fold(0.0f32, max_or_nan);
        assert!(diff < 1e-5, "sequence {b}: batched vs alone differ by {diff}");
    }
    // A position outside the cache is refused before any kernel runs.
    inputs.insert("positions".to_string(), HostBuffer { shape: vec![2], data: HostData::I64(vec![3, max_len as i64]) });
    let err = program.run("decode", &inputs, &["logits"]).unwrap_err().to_string();
    assert!(err.starts_with(&format!("position {max_len} is outside kv_cache.")), "{err}");
}

/// Kernels of an fp8 checkpoint in f32 precision read e4m3 weights with block scales and match the
/// reference GEMM on dequantized weights (ragged 128-blocks: the tiny model's dims are not multiples).
#[test]
fn fp8_weight_kernels_match_the_dequantized_reference() {
    let context = v3c_compiler::mlir::new_context();
    let mut config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    config.quantization = Some(v3c_models::config::Fp8Quantization { weight_block: [128, 128] });
    let module =
        Driver::quiet().run_model(&context, &config, &[Entry::Prefill], &BuildOptions::default(), "fused").unwrap();
    let mut checked = 0;
    let mut op = module.body().first_operation();
    let mut rng = Rng(7);
    while let Some(f) = op {
        op = f.next_in_block();
        if f.attribute(v3c_dialects::KERNEL_ATTR).is_err() {
            continue;
        }
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        // GEMM + residual kernels with an fp8 weight: (x, w, w_scale, h) -> h + x @ W^T.
        let fits = kernel.name.starts_with("gemm_residual")
            && kernel.signature.inputs.len() == 4
            && kernel.signature.inputs[1].element == "f8E4M3FN"
            && kernel.signature.inputs[0].dims.len() == 2;
        if !fits {
            continue;
        }
        for rows in [1usize, 5] {
            let (k, n) = (kernel.signature.inputs[0].dims[1].unwrap(), kernel.signature.inputs[1].dims[0].unwrap());
            let x: Vec<f32> = (0..rows * k).map(|_| rng.next() * 4.0).collect();
            // Valid e4m3 codes (no NaN): 0x00..=0x7e with random sign.
            let bits: Vec<u8> =
                (0..n * k).map(|i| ((i * 37 + 11) % 0x7f) as u8 | if i % 3 == 0 { 0x80 } else { 0 }).collect();
            let (sn, sk) = (n.div_ceil(128), k.div_ceil(128));
            let scales: Vec<f32> = (0..sn * sk).map(|i| 0.01 + 0.003 * i as f32).collect();
            let weight: Vec<f32> = (0..n * k)
                .map(|i| v3c_models::dtype::f8e4m3_to_f32(bits[i]) * scales[(i / k / 128) * sk + (i % k) / 128])
                .collect();
            let residual: Vec<f32> = (0..rows * n).map(|_| rng.next()).collect();
            let want: Vec<f32> =
                kernels::matmul_nt(&x, &weight, rows, k, n).iter().zip(&residual).map(|(o, h)| h + o).collect();
            let mut inputs = vec![
                HostBuffer { shape: vec![rows, k], data: HostData::F32(x) },
                HostBuffer { shape: vec![n, k], data: HostData::F8(bits) },
                HostBuffer { shape: vec![sn, sk], data: HostData::F32(scales) },
                HostBuffer { shape: vec![rows, n], data: HostData::F32(residual) },
            ];
            let mut outputs = vec![HostBuffer { shape: vec![rows, n], data: HostData::F32(vec![f32::NAN; rows * n]) }];
            // SAFETY: the output has the shape the kernel computes.
            unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
            let got = floats(&outputs[0]);
            let scale = want.iter().fold(1e-6f32, |a, b| a.max(b.abs()));
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, max_or_nan);
            assert!(diff <= 1e-5 * scale, "{} rows={rows}: {diff}", kernel.name);
        }
        checked += 1;
    }
    assert!(checked >= 1, "expected fp8-weight GEMM + residual kernels, checked {checked}");
}

/// The fp8 grouped MoE kernels (gathered e4m3 rows x block-scaled expert weights, SwiGLU, 1 x 128
/// quantization of the permuted rows; the down GEMM scattered onto the residual) compute exactly
/// what the reference kernels compute on the same bits, with intermediate sizes that are not
/// multiples of 128, and the shared expert as expert E; shares write disjoint parts.
#[test]
fn fp8_grouped_moe_kernels_match_the_reference() {
    // 176: two partitions and a ragged last group; 48: one group, the second partition empty.
    // 256 x 256: whole 128-blocks of K (the transposed weight decode), two partitions.
    for (hidden, inter) in [(160, 176), (96, 48), (256, 256)] {
        fp8_grouped_moe_case(hidden, inter, true);
    }
    // f32 activations on fp8 weights (the f32 oracle precision): weights dequantized as read.
    fp8_grouped_moe_case(160, 176, false);
}

fn fp8_grouped_moe_case(hidden: usize, inter: usize, fp8_activations: bool) {
    let precision = if fp8_activations { v3c_models::Precision::Fp8 } else { v3c_models::Precision::F32 };
    let context = v3c_compiler::mlir::new_context();
    let mut config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    config.quantization = Some(v3c_models::config::Fp8Quantization { weight_block: [128, 128] });
    config.hidden_size = hidden;
    config.moe_intermediate_size = inter;
    let module = Driver::quiet()
        .run_model(&context, &config, &[Entry::Prefill], &BuildOptions { precision, ..Default::default() }, "fused")
        .unwrap();
    let kernel = |prefix: &str| {
        let mut op = module.body().first_operation();
        while let Some(f) = op {
            op = f.next_in_block();
            let name = f.attribute("sym_name").map(|a| a.to_string()).unwrap_or_default();
            if name.trim_matches('"').starts_with(prefix) {
                return CpuKernel::compile(&context, &f).unwrap();
            }
        }
        panic!("no {prefix} kernel");
    };
    let (gate_up, down) =
        (kernel(if fp8_activations { "moe_gate_up_quantize" } else { "moe_gate_up" }), kernel("moe_down"));
    assert!(gate_up.signature.partitioned && down.signature.partitioned);
    let (d, inter, experts) = (config.hidden_size, config.moe_intermediate_size, config.n_routed_experts);
    let (db, ib, k) = (d.div_ceil(128), inter.div_ceil(128), config.num_experts_per_tok);
    let mut rng = Rng(11);
    let bits = |rng: &mut Rng, n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| (((rng.next() + 0.5) * 126.0) as u8).min(0x7e) | if rng.next() > 0.0 { 0x80 } else { 0 })
            .collect()
    };
    // Expert weights [E, N, K] and the shared expert's [N, K], with their block scales.
    let stack = |n: usize, kk: usize, count: usize, rng: &mut Rng| {
        let s: Vec<f32> =
            (0..count * n.div_ceil(128) * kk.div_ceil(128)).map(|i| 0.002 + 0.0007 * (i % 13) as f32).collect();
        (bits(rng, count * n * kk), s)
    };
    let (gw, gs) = stack(inter, d, experts + 1, &mut rng);
    let (uw, us) = stack(inter, d, experts + 1, &mut rng);
    let (dw, ds) = stack(d, inter, experts + 1, &mut rng);
    // Expert e's slice of a stack (the shared expert is the last).
    let slice = |v: &[u8], e: usize, n: usize| v[e * n..(e + 1) * n].to_vec();
    let sslice = |v: &[f32], e: usize, n: usize| v[e * n..(e + 1) * n].to_vec();
    for tokens in [1usize, 3, 50] {
        let [offsets, rows, row_w] = random_permutation(tokens, experts, 1, k, &mut rng);
        let xq = bits(&mut rng, tokens * d);
        let xs: Vec<f32> = (0..tokens * db).map(|i| 0.01 + 0.003 * (i % 7) as f32).collect();
        let xf: Vec<f32> = (0..tokens * d).map(|_| rng.next() * 4.0).collect();
        let (HostData::I32(off), HostData::I32(rv), HostData::F32(wv)) = (&offsets.data, &rows.data, &row_w.data)
        else {
            unreachable!()
        };
        let width = k + 1;
        // Reference: h per permuted row, its 1 x 128 quantization, then the down GEMM + combine.
        let mut h = vec![0.0f32; tokens * width * inter];
        let mut y = vec![0.0f32; tokens * d];
        let residual: Vec<f32> = (0..tokens * d).map(|_| rng.next()).collect();
        let e_of = |r: usize| (0..=experts).find(|&e| (off[e] as usize..off[e + 1] as usize).contains(&r)).unwrap();
        for r in 0..tokens * width {
            let (e, t) = (e_of(r), rv[r] as usize);
            let (xr, xsr) = (&xq[t * d..(t + 1) * d], &xs[t * db..(t + 1) * db]);
            let (gn, gsn) = (inter * d, ib * db);
            let (g, u) = if fp8_activations {
                (
                    kernels::matmul_fp8(xr, xsr, &slice(&gw, e, gn), &sslice(&gs, e, gsn), 1, d, inter, 128, 128, db),
                    kernels::matmul_fp8(xr, xsr, &slice(&uw, e, gn), &sslice(&us, e, gsn), 1, d, inter, 128, 128, db),
                )
            } else {
                let xf = &xf[t * d..(t + 1) * d];
                (
                    kernels::matmul_nt(
                        xf,
                        &dequantized(&slice(&gw, e, gn), &sslice(&gs, e, gsn), inter, d),
                        1,
                        d,
                        inter,
                    ),
                    kernels::matmul_nt(
                        xf,
                        &dequantized(&slice(&uw, e, gn), &sslice(&us, e, gsn), inter, d),
                        1,
                        d,
                        inter,
                    ),
                )
            };
            for i in 0..inter {
                h[r * inter + i] = kernels::silu(g[i]) * u[i];
            }
        }
        let (hq, hs) = kernels::quantize_fp8(&h, inter, 128);
        for e in 0..=experts {
            for r in off[e] as usize..off[e + 1] as usize {
                let t = rv[r] as usize;
                let o = if fp8_activations {
                    kernels::matmul_fp8(
                        &hq[r * inter..(r + 1) * inter],
                        &hs[r * ib..(r + 1) * ib],
                        &slice(&dw, e, d * inter),
                        &sslice(&ds, e, ib * db),
                        1,
                        inter,
                        d,
                        128,
                        128,
                        ib,
                    )
                } else {
                    let w = dequantized(&slice(&dw, e, d * inter), &sslice(&ds, e, ib * db), d, inter);
                    kernels::matmul_nt(&h[r * inter..(r + 1) * inter], &w, 1, inter, d)
                };
                for (yv, ov) in y[t * d..(t + 1) * d].iter_mut().zip(o) {
                    *yv += wv[r] * ov;
                }
            }
        }
        let y: Vec<f32> = residual.iter().zip(&y).map(|(a, b)| a + b).collect();
        let f8 = |shape: Vec<usize>, v: Vec<u8>| HostBuffer { shape, data: HostData::F8(v) };
        let f32b = |shape: Vec<usize>, v: Vec<f32>| HostBuffer { shape, data: HostData::F32(v) };
        let (routed, shared) = (experts * inter * d, inter * d);
        let (rs, ss) = (experts * ib * db, ib * db);
        let mut inputs = if fp8_activations {
            vec![f8(vec![tokens, d], xq.clone()), f32b(vec![tokens, db], xs.clone())]
        } else {
            vec![f32b(vec![tokens, d], xf.clone())]
        };
        inputs.extend([
            offsets.clone(),
            rows.clone(),
            f8(vec![experts, inter, d], gw[..routed].to_vec()),
            f8(vec![experts, inter, d], uw[..routed].to_vec()),
            f32b(vec![experts, ib, db], gs[..rs].to_vec()),
            f32b(vec![experts, ib, db], us[..rs].to_vec()),
            f8(vec![inter, d], gw[routed..routed + shared].to_vec()),
            f8(vec![inter, d], uw[routed..routed + shared].to_vec()),
            f32b(vec![ib, db], gs[rs..rs + ss].to_vec()),
            f32b(vec![ib, db], us[rs..rs + ss].to_vec()),
        ]);
        let want = if fp8_activations {
            vec![f8(vec![tokens, width, inter], hq.clone()), f32b(vec![tokens, width, ib], hs.clone())]
        } else {
            vec![f32b(vec![tokens, width, inter], h.clone())]
        };
        let mut got = poisoned(&want);
        // SAFETY: outputs shaped as the kernel computes them.
        unsafe { gate_up.run(&mut inputs, &mut got) }.unwrap();
        assert_eq!(got, want, "{}, {tokens} tokens: differs from the reference", gate_up.name);
        check_shares(&gate_up, &mut inputs, &want);
        let mut inputs = want.clone();
        inputs.extend([
            offsets.clone(),
            rows.clone(),
            row_w.clone(),
            f8(vec![experts, d, inter], dw[..experts * d * inter].to_vec()),
            f32b(vec![experts, db, ib], ds[..rs].to_vec()),
            f8(vec![d, inter], dw[experts * d * inter..].to_vec()),
            f32b(vec![db, ib], ds[rs..].to_vec()),
            f32b(vec![tokens, d], residual.clone()),
        ]);
        let want = [f32b(vec![tokens, d], y)];
        let mut got = poisoned(&want);
        // SAFETY: as above.
        unsafe { down.run(&mut inputs, &mut got) }.unwrap();
        assert_eq!(got, want, "moe_down, {tokens} tokens: differs from the reference");
        check_shares(&down, &mut inputs, &want);
    }
}

/// Dequantized values of an fp8 weight [n, k] with 128 x 128 block scales.
fn dequantized(bits: &[u8], scales: &[f32], n: usize, k: usize) -> Vec<f32> {
    let kb = k.div_ceil(128);
    (0..n * k).map(|i| v3c_models::dtype::f8e4m3_to_f32(bits[i]) * scales[(i / k / 128) * kb + (i % k) / 128]).collect()
}

/// Executing the plan (one arena, offsets by liveness, caches in place) gives exactly what the
/// launch-by-launch execution of the fused IR gives, for a prefill and for a batched decode.
#[test]
fn executing_the_plan_equals_executing_the_launch_list() {
    use std::collections::HashMap;
    use v3c_compiler::cpu_backend::CpuProgram;
    use v3c_compiler::plan::PlanSizes;
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 21).unwrap();
    let model = v3c_models::reference::Model::open(&ckpt, v3c_models::Precision::F32).unwrap();
    let context = v3c_compiler::mlir::new_context();
    let program =
        CpuProgram::new(&context, &config, &Entry::ALL, false, v3c_models::Precision::F32, &model.checkpoint).unwrap();
    let c = config.latent_dim();
    let ids = |v: Vec<i64>| HostBuffer { shape: vec![v.len()], data: HostData::I64(v) };
    let caches: Vec<String> =
        (0..config.num_hidden_layers).map(|l| format!("kv_cache.{l}")).chain(["kv_cache.mtp".to_string()]).collect();

    // Prefill of 5 tokens after 2 cached ones.
    let mut prefill = HashMap::new();
    prefill.insert("tokens".to_string(), ids(vec![3, 9, 27, 81, 243]));
    prefill.insert("positions".to_string(), ids(vec![2, 3, 4, 5, 6]));
    prefill.insert("mtp_tokens".to_string(), ids(vec![9, 27, 81, 243, 0]));
    let mut rng = Rng(3);
    for name in &caches {
        prefill.insert(
            name.clone(),
            HostBuffer { shape: vec![2, c], data: HostData::F32((0..2 * c).map(|_| rng.next()).collect()) },
        );
    }
    // Decode of 2 sequences over 6-row caches.
    let mut decode = HashMap::new();
    decode.insert("tokens".to_string(), ids(vec![5, 7]));
    decode.insert("positions".to_string(), ids(vec![1, 4]));
    decode.insert("mtp_tokens".to_string(), ids(vec![11, 13]));
    for name in &caches {
        decode.insert(
            name.clone(),
            HostBuffer { shape: vec![2, 6, c], data: HostData::F32((0..12 * c).map(|_| rng.next()).collect()) },
        );
    }
    for (entry, inputs, sizes) in
        [("prefill", &prefill, PlanSizes::new(5, 2)), ("decode", &decode, PlanSizes::new(2, 6))]
    {
        let plan = program.plan(sizes).unwrap();
        let entry_plan = plan.entries.iter().find(|e| e.name == entry).unwrap();
        let mut wanted: Vec<&str> = vec!["logits", "mtp_logits"];
        wanted.extend(caches.iter().map(String::as_str));
        let walked = program.run(entry, inputs, &wanted).unwrap();
        let planned = program.run_plan(entry_plan, inputs, &wanted).unwrap();
        for name in &wanted {
            assert_eq!(walked[*name], planned[*name], "{entry}: {name}");
        }
        assert!(entry_plan.arena_bytes > 0);
    }
    // Inputs may be smaller than planned (the decode plan for 2 x 6 runs 1 sequence over 3 rows)...
    let plan = program.plan(PlanSizes::new(2, 6)).unwrap();
    let mut one = HashMap::new();
    one.insert("tokens".to_string(), ids(vec![9]));
    one.insert("positions".to_string(), ids(vec![2]));
    one.insert("mtp_tokens".to_string(), ids(vec![3]));
    for name in &caches {
        one.insert(
            name.clone(),
            HostBuffer { shape: vec![1, 3, c], data: HostData::F32((0..3 * c).map(|_| rng.next()).collect()) },
        );
    }
    let decode_plan = plan.entries.iter().find(|e| e.name == "decode").unwrap();
    let mut wanted: Vec<&str> = vec!["logits"];
    wanted.extend(caches.iter().map(String::as_str));
    let walked = program.run("decode", &one, &wanted).unwrap();
    let planned = program.run_plan(decode_plan, &one, &wanted).unwrap();
    for name in &wanted {
        assert_eq!(walked[*name], planned[*name], "decode at smaller sizes: {name}");
    }
    // ... but not larger.
    let plan = program.plan(PlanSizes::new(4, 2)).unwrap();
    let err = program.run_plan(&plan.entries[0], &prefill, &["logits"]).unwrap_err().to_string();
    assert!(err.contains("5 rows and 2 cached rows given, the plan holds at most 4 and 2"), "{err}");
}

/// The GEMM template at awkward sizes (1, 3, 50, 783: K not a multiple of the vector width, so the
/// scalar tail runs) against the reference matmul, f32 and bf16 weights, plus the residual epilogue.
#[test]
fn gemm_template_matches_the_reference_on_awkward_shapes() {
    use melior::ir::operation::OperationLike;
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let mut rng = Rng(11);
    for (m, k, n) in
        [(1usize, 783usize, 3usize), (3, 50, 783), (50, 3, 50), (783, 17, 1), (2, 128, 129), (50, 96, 48), (8, 32, 8)]
    {
        for element in ["f32", "bf16"] {
            let text = format!(
                "func.func private @gemm(%x: tensor<?x{k}xf32>, %w: tensor<{n}x{k}x{element}>, %h: tensor<?x{n}xf32>) -> tensor<?x{n}xf32> attributes {{v3.kernel = \"gemm_residual\"}} {{
  %y = \"v3.linear\"(%x, %w) {{operandSegmentSizes = array<i32: 1, 0, 1, 0>}} : (tensor<?x{k}xf32>, tensor<{n}x{k}x{element}>) -> tensor<?x{n}xf32>
  %r = \"v3.add\"(%h, %y) : (tensor<?x{n}xf32>, tensor<?x{n}xf32>) -> tensor<?x{n}xf32>
  return %r : tensor<?x{n}xf32>
}}"
            );
            let module = v3c_compiler::mlir::parse_module(&context, &text, "gemm.mlir").unwrap();
            let f = module.body().first_operation().unwrap();
            let kernel = CpuKernel::compile(&context, &f).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| rng.next()).collect();
            let h: Vec<f32> = (0..m * n).map(|_| rng.next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.next()).collect();
            let (w_data, w_values) = if element == "f32" {
                (HostData::F32(w.clone()), w)
            } else {
                let bits: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
                let values = bits.iter().map(|&b| bf16_to_f32(b)).collect();
                (HostData::Bf16(bits), values)
            };
            let want: Vec<f32> =
                kernels::matmul_nt(&x, &w_values, m, k, n).iter().zip(&h).map(|(y, r)| r + y).collect();
            let mut inputs = vec![
                HostBuffer { shape: vec![m, k], data: HostData::F32(x) },
                HostBuffer { shape: vec![n, k], data: w_data },
                HostBuffer { shape: vec![m, n], data: HostData::F32(h) },
            ];
            let mut outputs = vec![HostBuffer { shape: vec![m, n], data: HostData::F32(vec![f32::NAN; m * n]) }];
            // SAFETY: the output has the shape the kernel computes.
            unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
            let got = floats(&outputs[0]);
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, max_or_nan);
            // Lanes sum in a different order than the reference: allow rounding of a k-term sum.
            assert!(diff <= 1e-6 * (k as f32).sqrt() * 8.0, "m={m} k={k} n={n} {element}: {diff}");
            let _ = f.name();
        }
    }
}

/// Long enough prefills run row-independent kernels on two threads (row halves): still the
/// reference's logits.
#[test]
fn row_split_launches_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 33).unwrap();
    let model = v3c_models::reference::Model::open(&ckpt, v3c_models::Precision::F32).unwrap();
    let tokens: Vec<u32> = (0..41u32).map(|i| (i * 97 + 5) % 320).collect();
    let cpu = v3c_compiler::cpu_backend::logits(&model, &tokens, 0, None).unwrap();
    let reference = model.logits(&tokens, 0).unwrap();
    let (a, b) = (cpu.logits.as_f32().unwrap(), reference.logits.as_f32().unwrap());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, max_or_nan);
    assert!(diff < 1e-4, "{diff}");
    let (a, b) = (cpu.mtp_logits.unwrap(), reference.mtp_logits.unwrap());
    let diff = a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0f32, max_or_nan);
    assert!(diff < 1e-4, "mtp {diff}");
}

#[test]
fn kernels_from_the_cache_compute_what_the_jit_computes() {
    use v3c_compiler::kernel_cache::KernelCache;
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    v3c_models::init::write_random_checkpoint(&config, &ckpt, 21).unwrap();
    let model = v3c_models::reference::Model::open(&ckpt, v3c_models::Precision::F32).unwrap();
    let cache = KernelCache::new(dir.path().join("cache"));
    let tokens = [3u32, 77, 310, 9, 1];
    let jit = v3c_compiler::cpu_backend::logits(&model, &tokens, 0, None).unwrap();
    // Cold: every kernel JIT-compiled and stored; warm: every kernel loaded from the cache.
    let context = v3c_compiler::mlir::new_context();
    let compile = |cache: &KernelCache| {
        let mut from_cache = Vec::new();
        v3c_compiler::cpu_backend::compile_model(
            &context,
            &config,
            &[Entry::Prefill],
            !model.has_mtp,
            v3c_models::Precision::F32,
            Some(cache),
            &mut |_, _, k| from_cache.push(k.from_cache),
        )
        .unwrap();
        from_cache
    };
    let cold = compile(&cache);
    assert!(!cold.is_empty() && cold.iter().all(|&hit| !hit), "cold compile hit the cache: {cold:?}");
    let entries = std::fs::read_dir(cache.dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "so"))
        .count();
    assert_eq!(entries, cold.len(), "one cache entry per kernel");
    let warm = compile(&cache);
    assert!(warm.iter().all(|&hit| hit), "warm compile missed the cache: {warm:?}");
    let cached = v3c_compiler::cpu_backend::logits(&model, &tokens, 0, Some(&cache)).unwrap();
    assert_eq!(
        cached.logits.as_f32().unwrap(),
        jit.logits.as_f32().unwrap(),
        "cached machine code differs from the JIT's"
    );
    // A corrupt entry is a miss: rebuilt, replaced, and the results stay right.
    let victim = std::fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "so"))
        .unwrap();
    std::fs::write(&victim, b"garbage").unwrap();
    let after = compile(&cache);
    assert_eq!(after.iter().filter(|&&hit| !hit).count(), 1, "exactly the corrupt entry is rebuilt: {after:?}");
    assert!(std::fs::metadata(&victim).unwrap().len() > 1000, "the corrupt entry was replaced");
    let again = v3c_compiler::cpu_backend::logits(&model, &tokens, 0, Some(&cache)).unwrap();
    assert_eq!(again.logits.as_f32().unwrap(), jit.logits.as_f32().unwrap());
}

/// Rank-one inputs (x[r, 0] = r + 1, w[c, 0] = 10 (c + 1), zero elsewhere) make y[r, c] = 10 (r + 1) (c + 1)
/// and tell every output tile from its transpose. Caught: with MLIR's transfer-permutation patterns in
/// the GEMM transform script, tiles off the diagonal came out transposed (all-ones tests passed).
#[test]
fn gemm_tiles_are_placed_not_transposed() {
    use melior::ir::operation::OperationLike;
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    for (m, k, n) in [(8usize, 32usize, 8usize), (9, 48, 12), (5, 16, 6)] {
        let text = format!(
            "func.func private @gemm(%x: tensor<?x{k}xf32>, %w: tensor<{n}x{k}xf32>) -> tensor<?x{n}xf32> attributes {{v3.kernel = \"linear\"}} {{
  %y = \"v3.linear\"(%x, %w) {{operandSegmentSizes = array<i32: 1, 0, 1, 0>}} : (tensor<?x{k}xf32>, tensor<{n}x{k}xf32>) -> tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}"
        );
        let module = v3c_compiler::mlir::parse_module(&context, &text, "gemm.mlir").unwrap();
        let f = module.body().first_operation().unwrap();
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        let x: Vec<f32> = (0..m * k).map(|i| if i % k == 0 { (i / k + 1) as f32 } else { 0.0 }).collect();
        let w: Vec<f32> = (0..n * k).map(|i| if i % k == 0 { (10 * (i / k + 1)) as f32 } else { 0.0 }).collect();
        let mut inputs = vec![
            HostBuffer { shape: vec![m, k], data: HostData::F32(x) },
            HostBuffer { shape: vec![n, k], data: HostData::F32(w) },
        ];
        let mut outputs = vec![HostBuffer { shape: vec![m, n], data: HostData::F32(vec![f32::NAN; m * n]) }];
        // SAFETY: the output has the shape the kernel computes.
        unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
        let got = floats(&outputs[0]);
        for r in 0..m {
            for c in 0..n {
                assert_eq!(got[r * n + c], (10 * (r + 1) * (c + 1)) as f32, "{m}x{k}x{n}: y[{r}, {c}]");
            }
        }
        let _ = f.name();
    }
}

/// The row templates (RMSNorm, RoPE both ways, the embedding gather, reshapes, split, concat, add,
/// silu_mul) tiled and vectorized by the transform script: no tagged op is left after it, the
/// norm's sum of squares is an ordered `vector.reduction` (no fused multiply-add), and the kernels
/// compute the reference's values — bit for bit for the norm (its sum is the reference's
/// sequential one) and the copies, at widths with 16, 8 and 1 lanes. Caught on the way: a buffer
/// inside a kernel took its dynamic rows from its op's first operand, and for an embedding that is
/// the table (50 rows, static): the kernel's later ops ran 50 rows past 5-row buffers.
#[test]
fn row_templates_are_vectorized_and_match_the_reference() {
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let inv: Vec<String> = (0..16).map(|i| format!("{:.9e}", 1.0f32 / 10000f32.powf(i as f32 / 16.0))).collect();
    let mut texts = Vec::new();
    for w in [7168usize, 200, 3] {
        texts.push(format!(
            "func.func private @norm_{w}(%x: tensor<?x{w}xf32>, %w: tensor<{w}xbf16>) -> tensor<?x{w}xf32> attributes {{v3.kernel = \"rms_norm\"}} {{
  %y = \"v3.rms_norm\"(%x, %w) {{eps = 9.99999997E-7 : f32}} : (tensor<?x{w}xf32>, tensor<{w}xbf16>) -> tensor<?x{w}xf32>
  return %y : tensor<?x{w}xf32>
}}"
        ));
    }
    for interleave in [true, false] {
        texts.push(format!(
            "func.func private @views_{interleave}(%t: tensor<50x128xbf16>, %ids: tensor<?xi64>, %p: tensor<?xi64>, %g: tensor<?x64xf32>) -> (tensor<?x128xf32>, tensor<?x64xf32>) attributes {{v3.kernel = \"views\"}} {{
  %x = \"v3.embed\"(%t, %ids) : (tensor<50x128xbf16>, tensor<?xi64>) -> tensor<?x128xf32>
  %r = \"v3.reshape\"(%x) : (tensor<?x128xf32>) -> tensor<?x4x32xf32>
  %ro = \"v3.rope\"(%r, %p) {{attention_factor = 1.250000e+00 : f32, dim = 32 : i64, interleave = {interleave}, inv_freq = array<f32: {}>, theta = 1.000000e+04 : f64}} : (tensor<?x4x32xf32>, tensor<?xi64>) -> tensor<?x4x32xf32>
  %f = \"v3.reshape\"(%ro) : (tensor<?x4x32xf32>) -> tensor<?x128xf32>
  %s:2 = \"v3.split\"(%f) {{axis = 1 : i64, sizes = array<i64: 72, 56>}} : (tensor<?x128xf32>) -> (tensor<?x72xf32>, tensor<?x56xf32>)
  %c = \"v3.concat\"(%s#1, %s#0) {{axis = 1 : i64}} : (tensor<?x56xf32>, tensor<?x72xf32>) -> tensor<?x128xf32>
  %a = \"v3.add\"(%c, %x) : (tensor<?x128xf32>, tensor<?x128xf32>) -> tensor<?x128xf32>
  %h:2 = \"v3.split\"(%a) {{axis = 1 : i64, sizes = array<i64: 64, 64>}} : (tensor<?x128xf32>) -> (tensor<?x64xf32>, tensor<?x64xf32>)
  %m = \"v3.silu_mul\"(%h#1, %g) : (tensor<?x64xf32>, tensor<?x64xf32>) -> tensor<?x64xf32>
  return %a, %m : tensor<?x128xf32>, tensor<?x64xf32>
}}",
            inv.join(", ")
        ));
    }
    let mut rng = Rng(11);
    for text in &texts {
        let module = v3c_compiler::mlir::parse_module(&context, text, "rows.mlir").unwrap();
        let f = module.body().first_operation().unwrap();
        let lowered = v3c_compiler::conversion::v3_to_cpu::lower_kernel(&f).unwrap();
        let name = f.attribute("sym_name").unwrap().to_string();
        let after = v3c_compiler::conversion::v3_to_cpu::transformed(&context, &lowered.text, &name)
            .unwrap()
            .as_operation()
            .to_string();
        assert!(!after.contains("v3c.rows") && !after.contains("linalg."), "{name}: row ops left untiled:\n{after}");
        assert!(after.contains("vector.transfer_read") || after.contains("vector.load"), "{name}: not vectorized");
        if name.contains("norm") && !name.contains("norm_3") {
            assert!(after.contains("vector.reduction <add>"), "{name}: the sum of squares is no vector reduction");
        }
        if name.contains("norm") {
            assert!(!after.contains("fma"), "{name}: fused multiply-adds change the reference's sums");
        }
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        for rows in [1usize, 5] {
            let mut inputs: Vec<HostBuffer> =
                kernel.signature.inputs.iter().map(|s| buffer(s, rows, &mut rng, 50, 1)).collect();
            if name.contains("views") {
                // Positions far from zero: large angles.
                inputs[2] = HostBuffer {
                    shape: vec![rows],
                    data: HostData::I64((0..rows as i64).map(|r| 4000 + 37 * r).collect()),
                };
            }
            let want = reference(&f, &inputs);
            let outputs = run_on_nan(&kernel, &mut inputs, &want);
            for (got, (want, _)) in outputs.iter().zip(&want) {
                let got = floats(got);
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, max_or_nan);
                if name.contains("norm") {
                    assert_eq!(&got, want, "{name} rows={rows}: not the reference's bits");
                } else {
                    let scale = want.iter().fold(1.0f32, |a, b| a.max(b.abs()));
                    assert!(diff <= 1e-5 * scale, "{name} rows={rows}: max |diff| {diff} (scale {scale})");
                }
            }
        }
    }
}

/// The block-scaled fp8 GEMM (tiled and vectorized by the transform script, 16 output columns a
/// lane each) gives the reference's `matmul_fp8` bit for bit: partial K blocks (200, 64), column
/// counts with a narrower tail tile (40, 7) or none (16, 160), 1 to 50 rows.
#[test]
fn fp8_gemm_template_matches_the_reference_bit_for_bit() {
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let mut rng = Rng(5);
    for (m, k, n) in [(1usize, 128usize, 16usize), (3, 200, 40), (50, 384, 160), (5, 64, 7), (9, 256, 23)] {
        let (kb, nb) = (k.div_ceil(128), n.div_ceil(128));
        let text = format!(
            "func.func private @fp8_gemm(%x: tensor<?x{k}xf8E4M3FN>, %xs: tensor<?x{kb}xf32>, %w: tensor<{n}x{k}xf8E4M3FN>, %ws: tensor<{nb}x{kb}xf32>) -> tensor<?x{n}xf32> attributes {{v3.kernel = \"linear\"}} {{
  %y = \"v3.linear\"(%x, %xs, %w, %ws) {{operandSegmentSizes = array<i32: 1, 1, 1, 1>}} : (tensor<?x{k}xf8E4M3FN>, tensor<?x{kb}xf32>, tensor<{n}x{k}xf8E4M3FN>, tensor<{nb}x{kb}xf32>) -> tensor<?x{n}xf32>
  return %y : tensor<?x{n}xf32>
}}"
        );
        let module = v3c_compiler::mlir::parse_module(&context, &text, "fp8_gemm.mlir").unwrap();
        let f = module.body().first_operation().unwrap();
        let lowered = v3c_compiler::conversion::v3_to_cpu::lower_kernel(&f).unwrap();
        let after = v3c_compiler::conversion::v3_to_cpu::transformed(&context, &lowered.text, "fp8_gemm")
            .unwrap()
            .as_operation()
            .to_string();
        assert!(
            !after.contains("linalg.") && !after.contains("fma"),
            "{m}x{k}x{n}: untiled ops or fused multiply-adds"
        );
        // Whole 128-blocks of K: the weights' transposed decode reads rows and transposes them
        // in registers, no gathers.
        assert!(!k.is_multiple_of(128) || !after.contains("vector.gather"), "{m}x{k}x{n}: gathers left");
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        // e4m3 bits without the NaN codes; positive scales.
        let mut bits = |count: usize| -> Vec<u8> {
            (0..count)
                .map(|_| ((rng.next() + 0.5) * 255.0) as u8)
                .map(|b| if b & 0x7f == 0x7f { b - 1 } else { b })
                .collect()
        };
        let (xq, wq) = (bits(m * k), bits(n * k));
        let mut scales = |count: usize| -> Vec<f32> { (0..count).map(|_| 0.01 + (rng.next() + 0.5) * 0.1).collect() };
        let (xs, ws) = (scales(m * kb), scales(nb * kb));
        let want = kernels::matmul_fp8(&xq, &xs, &wq, &ws, m, k, n, 128, 128, kb);
        let mut inputs = vec![
            HostBuffer { shape: vec![m, k], data: HostData::F8(xq) },
            HostBuffer { shape: vec![m, kb], data: HostData::F32(xs) },
            HostBuffer { shape: vec![n, k], data: HostData::F8(wq) },
            HostBuffer { shape: vec![nb, kb], data: HostData::F32(ws) },
        ];
        let mut outputs = vec![HostBuffer { shape: vec![m, n], data: HostData::F32(vec![f32::NAN; m * n]) }];
        // SAFETY: the output has the shape the kernel computes.
        unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
        let got = floats(&outputs[0]);
        let differing = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{m}x{k}x{n}: {differing} outputs differ from the reference's bits");
    }
}

/// 1 x 128 quantization (tiled and vectorized templates: a max per group, the scales, the e4m3
/// encoding inlined) gives the reference's `quantize_fp8` bit for bit, with partial last groups
/// (200, 96) and values spanning many binades (subnormal e4m3 codes included).
#[test]
fn quantize_template_matches_the_reference_bit_for_bit() {
    let context = v3c_compiler::mlir::new_context();
    v3c_dialects::load(&context).unwrap();
    let mut rng = Rng(9);
    for k in [7168usize, 200, 96, 128] {
        let g = k.div_ceil(128);
        let text = format!(
            "func.func private @quantize(%x: tensor<?x{k}xf32>) -> (tensor<?x{k}xf8E4M3FN>, tensor<?x{g}xf32>) attributes {{v3.kernel = \"quantize_fp8\"}} {{
  %q:2 = \"v3.quantize_fp8\"(%x) {{group = 128 : i64}} : (tensor<?x{k}xf32>) -> (tensor<?x{k}xf8E4M3FN>, tensor<?x{g}xf32>)
  return %q#0, %q#1 : tensor<?x{k}xf8E4M3FN>, tensor<?x{g}xf32>
}}"
        );
        let module = v3c_compiler::mlir::parse_module(&context, &text, "quantize.mlir").unwrap();
        let f = module.body().first_operation().unwrap();
        let lowered = v3c_compiler::conversion::v3_to_cpu::lower_kernel(&f).unwrap();
        let after = v3c_compiler::conversion::v3_to_cpu::transformed(&context, &lowered.text, "quantize")
            .unwrap()
            .as_operation()
            .to_string();
        assert!(!after.contains("linalg.") && !after.contains("func.call"), "k={k}: untiled ops or helper calls left");
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        for rows in [1usize, 5] {
            let x: Vec<f32> = (0..rows * k).map(|i| rng.next() * 10f32.powi((i % 9) as i32 - 4)).collect();
            let (want_bits, want_scales) = kernels::quantize_fp8(&x, k, 128);
            let mut inputs = vec![HostBuffer { shape: vec![rows, k], data: HostData::F32(x) }];
            let mut outputs = vec![
                HostBuffer { shape: vec![rows, k], data: HostData::F8(vec![0x7f; rows * k]) },
                HostBuffer { shape: vec![rows, g], data: HostData::F32(vec![f32::NAN; rows * g]) },
            ];
            // SAFETY: the outputs have the shapes the kernel computes.
            unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
            assert_eq!(outputs[0].data, HostData::F8(want_bits), "k={k} rows={rows}: bits");
            assert_eq!(outputs[1].data, HostData::F32(want_scales), "k={k} rows={rows}: scales");
        }
    }
}

/// The larger of a running max of differences and the next one, NaN once either is NaN (an
/// unwritten output poisoned with NaN, or a NaN result, must fail a tolerance check, which
/// `f32::max` would hide by ignoring NaN).
fn max_or_nan(m: f32, d: f32) -> f32 {
    if m.is_nan() || d.is_nan() {
        f32::NAN
    } else {
        m.max(d)
    }
}

/// An expected output: its values (ids as floats) and shape.
type Expected = (Vec<f32>, Vec<usize>);

/// DeepSeek-V3.2's sparse-attention kernels (the cache row with the indexer key's `layer_norm` and
/// RoPE, which `fuse-mla-projections` puts in the latent's kernel, `sparse_index` in
/// prefill and decode, the attention over each query's selected rows of a shared and of
/// per-sequence latents: `gather_rows` fused into it) equal the reference interpreter's functions
/// bit for bit: the sums run in its order, and equal scores (a repeated key;
/// keys every head scores below zero, relu's zeros) go to the earlier key. Queries seeing fewer
/// keys than `top_k`, exactly as many, and more; decode's positions anywhere in their caches.
#[test]
fn sparse_attention_kernels_match_the_reference_bit_for_bit() {
    let context = v3c_compiler::mlir::new_context();
    let mut config = ModelConfig::preset("deepseek-v3-tiny").unwrap();
    let (heads, width, top_k) = (4usize, 24usize, 3usize);
    config.indexer = Some(v3c_models::config::SparseIndexer { n_heads: heads, head_dim: width, topk: top_k });
    let module = Driver::quiet().run_model(&context, &config, &Entry::ALL, &BuildOptions::default(), "fused").unwrap();
    let mut rng = Rng(5);
    let mut rand = |n: usize| (0..n).map(|_| rng.next() * 4.0).collect::<Vec<f32>>();
    let f32s = |shape: Vec<usize>, v: Vec<f32>| HostBuffer { shape, data: HostData::F32(v) };
    let mut seen = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(f) = op {
        op = f.next_in_block();
        let Ok(name) = f.attribute("sym_name") else { continue };
        let name = name.to_string().trim_matches('"').to_string();
        let kind = ["mla_latent", "sparse_index", "sparse_attention"].into_iter().find(|k| name.starts_with(k));
        let (Some(kind), true) = (kind, f.attribute(v3c_dialects::KERNEL_ATTR).is_ok()) else { continue };
        let kernel = CpuKernel::compile(&context, &f).unwrap();
        let sig = &kernel.signature;
        let decode = sig.inputs.len() == 4 && kind == "sparse_index"
            || sig.inputs[0].dims.len() == 3 && kind == "sparse_attention";
        seen.push((kind, decode));
        let (t, s) = (5usize, 9usize);
        let (mut inputs, want): (Vec<HostBuffer>, Vec<Expected>) = match kind {
            "mla_latent" => {
                // The latent's norm and RoPE, the key's LayerNorm and RoPE in halves, at positions
                // anywhere; the weights in their checkpoint types.
                let inputs: Vec<HostBuffer> = sig
                    .inputs
                    .iter()
                    .map(|input| {
                        let shape: Vec<usize> = input.dims.iter().map(|d| d.unwrap_or(t)).collect();
                        let values = rand(shape.iter().product());
                        match input.element.as_str() {
                            "i64" => HostBuffer { shape, data: HostData::I64(vec![0, 3, 7, 1, 12]) },
                            "bf16" => HostBuffer {
                                shape,
                                data: HostData::Bf16(values.iter().map(|&x| f32_to_bf16(x)).collect()),
                            },
                            _ => f32s(shape, values),
                        }
                    })
                    .collect();
                assert!(sig.inputs.len() == 7 && sig.outputs[0].dims[1] == Some(config.cache_dim()), "{name}");
                (inputs.clone(), reference(&f, &inputs))
            }
            "sparse_index" => {
                let (mut q, mut w) = (rand(t * heads * width), rand(t * heads));
                // Keys 3 and 5 equal (equal scores). Query 4: every head one direction u and its
                // weights positive, and its keys but the first -u: every head's dot below zero, so
                // all but key 0 score relu's exact zero, and the cut falls among them.
                // The cache rows: the latent, then the key (the last `width` columns).
                let per_seq = if decode { t } else { 1 };
                let c = sig.inputs[2].dims.last().copied().flatten().unwrap();
                let lead = c - width;
                let mut keys = rand(per_seq * s * c);
                let u = q[4 * heads * width..4 * heads * width + width].to_vec();
                for h in 0..heads {
                    q[(4 * heads + h) * width..(4 * heads + h + 1) * width].copy_from_slice(&u);
                    w[4 * heads + h] = w[4 * heads + h].abs() + 0.1;
                }
                for b in 0..per_seq {
                    let row = |j: usize| (b * s + j) * c + lead;
                    let three = keys[row(3)..row(3) + width].to_vec();
                    keys[row(5)..row(5) + width].copy_from_slice(&three);
                    if b == 4 || !decode {
                        for j in 1..s {
                            for d in 0..width {
                                keys[row(j) + d] = -u[d];
                            }
                        }
                    }
                }
                // Decode: sequence b at position 0, 2, 3, 8, 5 (fewer, as many, more keys than top_k).
                let positions: Vec<i64> = vec![0, 2, 3, 8, 5];
                let mut want = Vec::new();
                for i in 0..t {
                    let (base, last) = if decode { (i * s, positions[i] as usize) } else { (0, s - t + i) };
                    let seen = &keys[base * c..(base + last + 1) * c];
                    let scores = kernels::index_scores(
                        &q[i * heads * width..(i + 1) * heads * width],
                        &w[i * heads..(i + 1) * heads],
                        seen,
                        c,
                        width,
                    );
                    want.extend(kernels::select_top_keys(&scores, top_k).into_iter().map(|k| k as f32));
                }
                let mut inputs = vec![f32s(vec![t, heads, width], q), f32s(vec![t, heads], w)];
                if decode {
                    inputs.push(f32s(vec![t, s, c], keys));
                    inputs.push(HostBuffer { shape: vec![t], data: HostData::I64(positions) });
                } else {
                    inputs.push(f32s(vec![s, c], keys));
                }
                (inputs, vec![(want, vec![t, top_k])])
            }
            _ => {
                // The cache rows (c columns: the latent, then the indexer key), each query's
                // selection (-1 padded), then the attention's own inputs (queries, kv_b).
                let c = sig.inputs[0].dims.last().copied().flatten().unwrap();
                let per_seq = if decode { t } else { 1 };
                let lat_shape = if decode { vec![t, s, c] } else { vec![s, c] };
                let selected: Vec<i32> = vec![0, -1, -1, 2, 4, 8, 1, 3, -1, 0, 1, 2, 7, 8, -1];
                let mut inputs = vec![
                    f32s(lat_shape, rand(per_seq * s * c)),
                    HostBuffer { shape: vec![t, top_k], data: HostData::I32(selected) },
                ];
                for input in &sig.inputs[2..] {
                    let shape: Vec<usize> = input.dims.iter().map(|d| d.unwrap_or(t)).collect();
                    let values = rand(shape.iter().product());
                    inputs.push(match input.element.as_str() {
                        "bf16" => {
                            HostBuffer { shape, data: HostData::Bf16(values.iter().map(|&x| f32_to_bf16(x)).collect()) }
                        }
                        _ => f32s(shape, values),
                    });
                }
                (inputs.clone(), reference(&f, &inputs))
            }
        };
        let mut outputs: Vec<HostBuffer> = want
            .iter()
            .zip(&sig.outputs)
            .map(|((v, shape), declared)| HostBuffer {
                shape: shape.clone(),
                data: match declared.element.as_str() {
                    "i32" => HostData::I32(vec![-7; v.len()]),
                    "i64" => HostData::I64(vec![-7; v.len()]),
                    _ => HostData::F32(vec![f32::NAN; v.len()]),
                },
            })
            .collect();
        // SAFETY: the outputs have exactly the shapes the kernel computes (the reference's).
        unsafe { kernel.run(&mut inputs, &mut outputs) }.unwrap();
        for (got, (want, _)) in outputs.iter().zip(&want) {
            assert_eq!(floats(got), *want, "{name}");
        }
        if kind == "sparse_index" {
            // Query 4's picks: key 0, then the earliest of the keys tied at zero.
            assert_eq!(&want[0].0[4 * top_k..5 * top_k], &[0.0, 1.0, 2.0], "{name}");
        }
    }
    seen.sort();
    seen.dedup();
    let expected = [
        ("mla_latent", false),
        ("sparse_attention", false),
        ("sparse_attention", true),
        ("sparse_index", false),
        ("sparse_index", true),
    ];
    assert_eq!(seen, expected);
}
