//! The reference implementation of every op, on plain f32 slices: obviously correct first, fast only
//! where it is free (matmuls split rows across threads).

use crate::config::Scoring;
use crate::dtype::{f32_to_f8e4m3, f8e4m3_to_f32, F8E4M3_MAX};
use crate::graph::{AttentionForm, Routing};

/// `y[m, n] = sum_k x[m, k] * w[n, k]` for x [m, k], w [n, k].
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    let work = m * n * k;
    let threads = if work > 1 << 20 { std::thread::available_parallelism().map_or(1, |p| p.get()).min(m) } else { 1 };
    let rows_per = m.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (chunk_index, out) in y.chunks_mut(rows_per * n).enumerate() {
            s.spawn(move || {
                let row0 = chunk_index * rows_per;
                for (r, yrow) in out.chunks_mut(n).enumerate() {
                    let xrow = &x[(row0 + r) * k..(row0 + r + 1) * k];
                    for (j, yv) in yrow.iter_mut().enumerate() {
                        let wrow = &w[j * k..(j + 1) * k];
                        *yv = dot(xrow, wrow);
                    }
                }
            });
        }
    });
    y
}

/// The column ranges a router logit's sum is cut into ([`router_logits`]).
pub const ROUTER_SPLITS: usize = 16;

/// Router logits `x gate^T` (`x` [t, d], `gate` [e, d]) -> [t, e], in the order every backend
/// that routes as the reference does follows, bit for bit: the `d` columns cut into
/// [`ROUTER_SPLITS`] consecutive ranges of `d.div_ceil(ROUTER_SPLITS)` columns (the last ones
/// shorter, or empty), each range's products summed in column order from 0, then the ranges' sums
/// in range order from 0. A GPU sums the ranges in parallel (decode's few tokens spread over many
/// SMs) and still picks the same experts.
pub fn router_logits(x: &[f32], gate: &[f32], t: usize, d: usize, e: usize) -> Vec<f32> {
    let width = d.div_ceil(ROUTER_SPLITS).max(1);
    let mut y = vec![0.0f32; t * e];
    for (xrow, yrow) in x.chunks(d).zip(y.chunks_mut(e)) {
        for (g, out) in gate.chunks(d).zip(yrow.iter_mut()) {
            *out = xrow
                .chunks(width)
                .zip(g.chunks(width))
                .fold(0.0f32, |total, (xs, gs)| total + xs.iter().zip(gs).fold(0.0f32, |part, (a, b)| part + a * b));
        }
    }
    y
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Block-scaled fp8 GEMM (spec section 7): for each K block kb of `group` channels,
/// `acc += (sum_k xq[m,k] * wq[n,k]) * xs[m, kb] * ws[n / block_n, kb]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_fp8(
    xq: &[u8],
    xs: &[f32],
    wq: &[u8],
    ws: &[f32],
    m: usize,
    k: usize,
    n: usize,
    group: usize,
    block_n: usize,
    ws_cols: usize,
) -> Vec<f32> {
    let kb_count = k.div_ceil(group);
    let xf: Vec<f32> = xq.iter().map(|&b| f8e4m3_to_f32(b)).collect();
    let wf: Vec<f32> = wq.iter().map(|&b| f8e4m3_to_f32(b)).collect();
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for kb in 0..kb_count {
                let (lo, hi) = (kb * group, ((kb + 1) * group).min(k));
                let partial = dot(&xf[i * k + lo..i * k + hi], &wf[j * k + lo..j * k + hi]);
                acc += partial * xs[i * kb_count + kb] * ws[(j / block_n) * ws_cols + kb];
            }
            y[i * n + j] = acc;
        }
    }
    y
}

/// The FP8 training block (DeepSeek-V3's recipe): 1x128 activation tiles, 128x128 weight blocks.
pub const FP8_TILE: usize = 128;

/// `[rows, cols]` -> `[cols, rows]`.
pub fn transpose<T: Copy + Default>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Fprop: `y [m, n] = x [m, k] . w [n, k]^T`, x quantized 1x128 along k, w 128x128.
pub fn fp8_fprop(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let (xq, xs) = quantize_fp8(x, k, FP8_TILE);
    let (wq, ws) = crate::init::quantize_weight(w, n, k, [FP8_TILE, FP8_TILE]);
    matmul_fp8(&xq, &xs, &wq, &ws, m, k, n, FP8_TILE, FP8_TILE, k.div_ceil(FP8_TILE))
}

/// Dgrad: `dx [m, k] = dy [m, n] . w [n, k]`, dy quantized 1x128 along n, w in the same 128x128
/// blocks as the Fprop (read transposed: the same bits, the block scales transposed).
pub fn fp8_dgrad(dy: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let (dq, ds) = quantize_fp8(dy, n, FP8_TILE);
    let (wq, ws) = crate::init::quantize_weight(w, n, k, [FP8_TILE, FP8_TILE]);
    let (wtq, wts) = (transpose(&wq, n, k), transpose(&ws, n.div_ceil(FP8_TILE), k.div_ceil(FP8_TILE)));
    matmul_fp8(&dq, &ds, &wtq, &wts, m, n, k, FP8_TILE, FP8_TILE, n.div_ceil(FP8_TILE))
}

/// Wgrad: `dw [n, k] = dy [m, n]^T . x [m, k]`, the contraction over the m tokens: dy and x each
/// quantized in 128x1 tiles (128 tokens of one channel; 1x128 rows of their transposes).
pub fn fp8_wgrad(dy: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let (aq, a_s) = quantize_fp8(&transpose(dy, m, n), m, FP8_TILE);
    let (bq, b_s) = quantize_fp8(&transpose(x, m, k), m, FP8_TILE);
    // One scale per row of x^T and 128-token block: a "block" of one row.
    matmul_fp8(&aq, &a_s, &bq, &b_s, n, m, k, FP8_TILE, 1, m.div_ceil(FP8_TILE))
}

/// An f32 master weight `[n, k]` in the recipe's 128x128 e4m3 blocks: (bits, block scales).
pub fn quantize_master(w: &[f32], n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    crate::init::quantize_weight(w, n, k, [FP8_TILE, FP8_TILE])
}

/// The backward pass of fp8 routed experts (`moe_experts` with fp8 activations on f32 master
/// weights), expert by expert over the tokens routed to it: the forward recomputed with Fprop
/// (SwiGLU included), then Wgrad and Dgrad for the down projection, SwiGLU's gradient in f32, and
/// Wgrad and Dgrad for gate and up. `routing` = (indices [t, k], weights [t, k], k); `params` the
/// experts' gate, up, down weights in order, `shapes` theirs. Returns (dx, d weights, d params).
pub fn moe_experts_grad_fp8(
    x: &[f32],
    (idx, w, k): (&[i32], &[f32], usize),
    dy: &[f32],
    params: &[&[f32]],
    shapes: &[&[usize]],
) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let d = shapes[0][1];
    let t = x.len() / d;
    let mut dx = vec![0.0f32; x.len()];
    let mut dwts = vec![0.0f32; w.len()];
    let mut dparams: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0f32; p.len()]).collect();
    for e in 0..params.len() / 3 {
        // The (token, slot) pairs routed to expert e, in token order.
        let pairs: Vec<(usize, usize)> = (0..t)
            .flat_map(|tok| (0..k).map(move |s| (tok, s)))
            .filter(|&(tok, s)| idx[tok * k + s] == e as i32)
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let m = pairs.len();
        let (wg, wu, wd) = (params[3 * e], params[3 * e + 1], params[3 * e + 2]);
        let inter = shapes[3 * e][0];
        let xe: Vec<f32> = pairs.iter().flat_map(|&(tok, _)| x[tok * d..(tok + 1) * d].iter().copied()).collect();
        let g = fp8_fprop(&xe, wg, m, d, inter);
        let u = fp8_fprop(&xe, wu, m, d, inter);
        let h: Vec<f32> = g.iter().zip(&u).map(|(a, b)| silu(*a) * b).collect();
        let y = fp8_fprop(&h, wd, m, inter, d);
        let mut dye = vec![0.0f32; m * d];
        for (r, &(tok, s)) in pairs.iter().enumerate() {
            let g_out = &dy[tok * d..(tok + 1) * d];
            dwts[tok * k + s] = dot(g_out, &y[r * d..(r + 1) * d]);
            let wt = w[tok * k + s];
            dye[r * d..(r + 1) * d].iter_mut().zip(g_out).for_each(|(o, gv)| *o = gv * wt);
        }
        dparams[3 * e + 2] = fp8_wgrad(&dye, &h, m, inter, d);
        let dh = fp8_dgrad(&dye, wd, m, inter, d);
        let (dg, du) = silu_mul_grad(&g, &u, &dh);
        dparams[3 * e] = fp8_wgrad(&dg, &xe, m, d, inter);
        dparams[3 * e + 1] = fp8_wgrad(&du, &xe, m, d, inter);
        let dxg = fp8_dgrad(&dg, wg, m, d, inter);
        let dxu = fp8_dgrad(&du, wu, m, d, inter);
        for (r, &(tok, _)) in pairs.iter().enumerate() {
            for c in 0..d {
                dx[tok * d + c] += dxg[r * d + c] + dxu[r * d + c];
            }
        }
    }
    (dx, dwts, dparams)
}

/// 1 x `group` quantization of rows of length k: (bits, scales [rows, ceil(k / group)]).
pub fn quantize_fp8(x: &[f32], k: usize, group: usize) -> (Vec<u8>, Vec<f32>) {
    let rows = x.len() / k;
    let groups = k.div_ceil(group);
    let mut bits = vec![0u8; x.len()];
    let mut scales = vec![0.0f32; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            let (lo, hi) = (r * k + g * group, r * k + ((g + 1) * group).min(k));
            let amax = x[lo..hi].iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let s = amax.max(1e-4) / F8E4M3_MAX;
            scales[r * groups + g] = s;
            for i in lo..hi {
                bits[i] = f32_to_f8e4m3(x[i] / s);
            }
        }
    }
    (bits, scales)
}

/// RMSNorm over rows of length d: `w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
        let mean = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for i in 0..d {
            yr[i] = w[i] * (xr[i] * inv);
        }
    }
    y
}

/// `torch.nn.LayerNorm` over rows of `w.len()`: `(x - mean) / sqrt(var + eps) * w + b`, the variance
/// biased (divided by the row's width), both means in f32.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
        }
    }
    y
}

/// The lightning indexer's scores of one query against the keys of `rows` (each `width` wide, its
/// key the last `di` columns): `sum_h w[h] / sqrt(heads) * relu(q[h] . key / sqrt(di))`, heads summed
/// in order, as transformers' `DeepseekV32Indexer` (its Hadamard rotation and fp8 rounding left out,
/// as there).
pub fn index_scores(q: &[f32], w: &[f32], rows: &[f32], width: usize, di: usize) -> Vec<f32> {
    let heads = w.len();
    let (qk_scale, w_scale) = ((di as f32).powf(-0.5), (heads as f32).powf(-0.5));
    rows.chunks(width)
        .map(|row| &row[width - di..])
        .map(|k| {
            (0..heads).fold(0.0f32, |acc, h| {
                let s = (dot(&q[h * di..(h + 1) * di], k) * qk_scale).max(0.0);
                acc + w[h] * w_scale * s
            })
        })
        .collect()
}

/// A query's selection from the scores of the keys it may see: the `top_k` highest (equal scores:
/// the earlier key), or every key while there are at most `top_k`; ascending, padded with -1 to
/// `top_k` entries.
pub fn select_top_keys(scores: &[f32], top_k: usize) -> Vec<i32> {
    let mut keys: Vec<usize> = (0..scores.len()).collect();
    if keys.len() > top_k {
        keys.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        keys.truncate(top_k);
        keys.sort_unstable();
    }
    let mut out: Vec<i32> = keys.into_iter().map(|k| k as i32).collect();
    out.resize(top_k, -1);
    out
}

/// Mean cross-entropy of rows of `logits` (`v` columns) against `targets`, and its gradient
/// `(softmax - onehot) / rows`; sums in f64.
pub fn cross_entropy(logits: &[f32], targets: &[i64], v: usize) -> (f32, Vec<f32>) {
    let rows = targets.len();
    let mut loss = 0.0f64;
    let mut grad = vec![0.0f32; logits.len()];
    for (r, &t) in targets.iter().enumerate() {
        let row = &logits[r * v..(r + 1) * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        loss += lse - row[t as usize] as f64;
        for (j, g) in grad[r * v..(r + 1) * v].iter_mut().enumerate() {
            let p = ((row[j] as f64 - max).exp() / sum) - if j == t as usize { 1.0 } else { 0.0 };
            *g = (p / rows as f64) as f32;
        }
    }
    ((loss / rows as f64) as f32, grad)
}

/// `a' @ b'` of row-major matrices (`a` has `cols.0` columns as stored, `b` `cols.1`), ' the
/// transposes in `t`; result [m, n] over the inner dim k.
pub fn matmul_t(
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    t: (bool, bool),
    cols: (usize, usize),
) -> Vec<f32> {
    let at = |i: usize, p: usize| if t.0 { a[p * cols.0 + i] } else { a[i * cols.0 + p] };
    let bt = |p: usize, j: usize| if t.1 { b[j * cols.1 + p] } else { b[p * cols.1 + j] };
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
        }
    }
    out
}

/// Gradients of naive-form [`mla`] over one sequence (query i sees keys `0..=visible[i]`): the
/// forward recomputed, then `(d q_nope, d q_pe, d latent, d kv_b)` for `d_out` [T, H, dv].
#[allow(clippy::too_many_arguments)]
pub fn mla_grad(
    q_nope: &[f32],
    q_pe: &[f32],
    latent: &[f32],
    kv_b: &[f32],
    d_out: &[f32],
    visible: &[usize],
    s: usize,
    dims: MlaDims,
    scale: f32,
) -> [Vec<f32>; 4] {
    let MlaDims { heads: h, nope: dn, rope: dr, v: dv, kv_lora: kv } = dims;
    let c = kv + dr;
    let per_head = dn + dv;
    let hp = h * per_head;
    let ckv: Vec<f32> = (0..s).flat_map(|j| latent[j * c..j * c + kv].iter().copied()).collect();
    let kvb = matmul_nt(&ckv, kv_b, s, kv, hp);
    let (mut dqn, mut dqp) = (vec![0.0f32; q_nope.len()], vec![0.0f32; q_pe.len()]);
    let mut dlat = vec![0.0f32; latent.len()];
    let mut dkvb = vec![0.0f32; s * hp];
    for head in 0..h {
        for (i, &last) in visible.iter().enumerate() {
            let qn = &q_nope[(i * h + head) * dn..(i * h + head + 1) * dn];
            let qp = &q_pe[(i * h + head) * dr..(i * h + head + 1) * dr];
            let g = &d_out[(i * h + head) * dv..(i * h + head + 1) * dv];
            let n_keys = last + 1;
            let row = |j: usize| &kvb[j * hp + head * per_head..j * hp + (head + 1) * per_head];
            let mut p: Vec<f32> = (0..n_keys)
                .map(|j| (dot(qn, &row(j)[..dn]) + dot(qp, &latent[j * c + kv..(j + 1) * c])) * scale)
                .collect();
            softmax_in_place(&mut p);
            let dp: Vec<f32> = (0..n_keys).map(|j| dot(g, &row(j)[dn..])).collect();
            let mean: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for j in 0..n_keys {
                let ds = p[j] * (dp[j] - mean) * scale;
                let base = j * hp + head * per_head;
                for d in 0..dn {
                    dqn[(i * h + head) * dn + d] += ds * kvb[base + d];
                    dkvb[base + d] += ds * qn[d];
                }
                for r in 0..dr {
                    dqp[(i * h + head) * dr + r] += ds * latent[j * c + kv + r];
                    dlat[j * c + kv + r] += ds * qp[r];
                }
                for e in 0..dv {
                    dkvb[base + dn + e] += p[j] * g[e];
                }
            }
        }
    }
    // kvb = ckv . kv_b^T: d ckv = d kvb . kv_b, d kv_b = d kvb^T . ckv.
    let dckv = matmul_t(&dkvb, kv_b, (s, hp, kv), (false, false), (hp, kv));
    for j in 0..s {
        for k in 0..kv {
            dlat[j * c + k] += dckv[j * kv + k];
        }
    }
    let dkv_b = matmul_t(&dkvb, &ckv, (hp, s, kv), (true, false), (hp, kv));
    [dqn, dqp, dlat, dkv_b]
}

/// Gradients of [`route`] for one row: the d logits `[E]` for the routing-weight gradient `dw` of
/// the selected experts `idx` (zero for the others: the selection passes no gradient).
pub fn route_grad(logits: &[f32], idx: &[usize], dw: &[f32], r: &Routing) -> Vec<f32> {
    if r.scoring == Scoring::Softmax {
        // w_k = f s_{i_k}: ds_{i_k} = f dw_k, then through the softmax, dl_j = s_j (ds_j - sum_m ds_m s_m).
        let s = softmax_scores(logits);
        let ds: Vec<f32> = dw.iter().map(|g| r.routed_scaling_factor * g).collect();
        let cross = idx.iter().zip(&ds).fold(0.0f32, |a, (&i, d)| a + d * s[i]);
        let mut dl: Vec<f32> = s.iter().map(|v| -v * cross).collect();
        for (&i, d) in idx.iter().zip(&ds) {
            dl[i] += s[i] * d;
        }
        return dl;
    }
    let s: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
    let sel: Vec<f32> = idx.iter().map(|&i| s[i]).collect();
    let f = r.routed_scaling_factor;
    // d selected scores: w_k = f s_k / S (normalized) or f s_k.
    let ds: Vec<f32> = if r.norm_topk_prob {
        let sum: f32 = sel.iter().sum::<f32>() + 1e-20;
        let cross: f32 = dw.iter().zip(&sel).map(|(g, v)| g * v).sum();
        dw.iter().map(|g| f * (g / sum - cross / (sum * sum))).collect()
    } else {
        dw.iter().map(|g| f * g).collect()
    };
    let mut dl = vec![0.0f32; logits.len()];
    for (k, &i) in idx.iter().enumerate() {
        dl[i] += ds[k] * s[i] * (1.0 - s[i]);
    }
    dl
}

/// The sequence-wise balance loss over `t` tokens (see `Op::BalanceLoss`) from the router logits
/// [T, E] and the selected experts [T, K], and its gradient with respect to the logits.
///
/// Softmax scoring (DeepSeek-V2): the affinities are `exp(l - max)` (normalized by their sum as the
/// sigmoid's are), and their gradient to the logits is `s_j` times the gradient to `s_j`: the sum
/// `sum_m ds_m s_m` that the softmax's Jacobian subtracts is 0 here (`sum_m (f_m - weighted) s_m`).
pub fn balance_loss(logits: &[f32], idx: &[i32], e: usize, k: usize, alpha: f32, scoring: Scoring) -> (f32, Vec<f32>) {
    let t = logits.len() / e;
    let mut f = vec![0.0f64; e];
    for &i in idx {
        f[i as usize] += e as f64 / (k * t) as f64;
    }
    let mut loss = 0.0f64;
    let mut dl = vec![0.0f32; logits.len()];
    for tok in 0..t {
        let row = &logits[tok * e..(tok + 1) * e];
        let s: Vec<f64> = match scoring {
            Scoring::Sigmoid => row.iter().map(|&l| 1.0 / (1.0 + (-l as f64).exp())).collect(),
            Scoring::Softmax => {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
                row.iter().map(|&l| (l as f64 - max).exp()).collect()
            }
        };
        let sum: f64 = s.iter().sum();
        // loss += alpha / T * sum_i f_i s_i / sum; d/ds_j = alpha / T * (f_j - sum_i f_i s_i / sum) / sum.
        let weighted: f64 = f.iter().zip(&s).map(|(a, b)| a * b).sum::<f64>() / sum;
        loss += alpha as f64 / t as f64 * weighted;
        for j in 0..e {
            let ds = alpha as f64 / t as f64 * (f[j] - weighted) / sum;
            let g = ds * s[j];
            dl[tok * e + j] = match scoring {
                Scoring::Sigmoid => g * (1.0 - s[j]),
                Scoring::Softmax => g,
            } as f32;
        }
    }
    (loss as f32, dl)
}

/// Gradients of `y = w * (x / rms(x))` per row (as [`rms_norm`] computes it): with
/// `r = 1 / sqrt(mean(x^2) + eps)`, `dw = sum_rows dy * x * r` and
/// `dx = r * (dy * w) - x * r^3 / D * sum_d (dy * w * x)`.
pub fn rms_norm_grad(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let (mut dx, mut dw) = (vec![0.0f32; x.len()], vec![0.0f32; d]);
    for ((xr, gr), dxr) in x.chunks(d).zip(dy.chunks(d)).zip(dx.chunks_mut(d)) {
        let mean = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (mean + eps).sqrt();
        let dot: f32 = (0..d).map(|i| gr[i] * w[i] * xr[i]).sum();
        for i in 0..d {
            dw[i] += gr[i] * xr[i] * r;
            dxr[i] = r * gr[i] * w[i] - xr[i] * r * r * r / d as f32 * dot;
        }
    }
    (dx, dw)
}

/// Gradients of `silu(g) * u`: `dg = dy * u * s * (1 + g * (1 - s))` with `s = sigmoid(g)`,
/// `du = dy * silu(g)`.
pub fn silu_mul_grad(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0f32; g.len()];
    let mut du = vec![0.0f32; g.len()];
    for i in 0..g.len() {
        let s = 1.0 / (1.0 + (-g[i]).exp());
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        du[i] = dy[i] * silu(g[i]);
    }
    (dg, du)
}

/// Rotates vectors of `dim` values in place: interleaved pairs (2i, 2i+1) or halves (i, i + dim/2).
pub fn rotate(v: &mut [f32], cos: &[f32], sin: &[f32], interleave: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleave { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x, y) = (v[a], v[b]);
        v[a] = x * cos[i] - y * sin[i];
        v[b] = y * cos[i] + x * sin[i];
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}

/// Shapes of one MLA call.
#[derive(Debug, Clone, Copy)]
pub struct MlaDims {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv_lora: usize,
}

/// MLA for `t` queries of one sequence against `s` latent rows; query i may see rows
/// `0..=visible[i]`. q_nope [t, H, dn], q_pe [t, H, dr], latent [s, kv + dr], kv_b [H (dn + dv), kv].
/// Returns [t, H, dv].
#[allow(clippy::too_many_arguments)]
pub fn mla(
    q_nope: &[f32],
    q_pe: &[f32],
    latent: &[f32],
    kv_b: &[f32],
    visible: &[usize],
    s: usize,
    dims: MlaDims,
    scale: f32,
    form: AttentionForm,
) -> Vec<f32> {
    let MlaDims { heads: h, nope: dn, rope: dr, v: dv, kv_lora: kv } = dims;
    let t = visible.len();
    let c = kv + dr;
    let per_head = dn + dv;
    let mut out = vec![0.0f32; t * h * dv];
    // Naive form: keys and values per head from the latent, computed once for all queries.
    let kvb = match form {
        AttentionForm::Naive => {
            let ckv: Vec<f32> = (0..s).flat_map(|j| latent[j * c..j * c + kv].iter().copied()).collect();
            Some(matmul_nt(&ckv, kv_b, s, kv, h * per_head))
        }
        AttentionForm::Absorbed => None,
    };
    for head in 0..h {
        let w_uk = |d: usize| &kv_b[(head * per_head + d) * kv..(head * per_head + d + 1) * kv];
        let w_uv = |e: usize| &kv_b[(head * per_head + dn + e) * kv..(head * per_head + dn + e + 1) * kv];
        for (i, &last) in visible.iter().enumerate() {
            let qn = &q_nope[(i * h + head) * dn..(i * h + head + 1) * dn];
            let qp = &q_pe[(i * h + head) * dr..(i * h + head + 1) * dr];
            let n_keys = last + 1;
            let mut scores = vec![0.0f32; n_keys];
            let o = &mut out[(i * h + head) * dv..(i * h + head + 1) * dv];
            match &kvb {
                Some(kvb) => {
                    for (j, sc) in scores.iter_mut().enumerate() {
                        let row = &kvb[j * h * per_head + head * per_head..j * h * per_head + (head + 1) * per_head];
                        let k_pe = &latent[j * c + kv..(j + 1) * c];
                        *sc = (dot(qn, &row[..dn]) + dot(qp, k_pe)) * scale;
                    }
                    softmax_in_place(&mut scores);
                    for (j, p) in scores.iter().enumerate() {
                        let v = &kvb[j * h * per_head + head * per_head + dn..j * h * per_head + (head + 1) * per_head];
                        for e in 0..dv {
                            o[e] += p * v[e];
                        }
                    }
                }
                None => {
                    // q_abs = q_nope @ W_UK[head]  ([dn] x [dn, kv] -> [kv])
                    let mut q_abs = vec![0.0f32; kv];
                    for (d, qv) in qn.iter().enumerate() {
                        for (a, w) in q_abs.iter_mut().zip(w_uk(d)) {
                            *a += qv * w;
                        }
                    }
                    for (j, sc) in scores.iter_mut().enumerate() {
                        let row = &latent[j * c..(j + 1) * c];
                        *sc = (dot(&q_abs, &row[..kv]) + dot(qp, &row[kv..])) * scale;
                    }
                    softmax_in_place(&mut scores);
                    let mut o_lat = vec![0.0f32; kv];
                    for (j, p) in scores.iter().enumerate() {
                        for (a, l) in o_lat.iter_mut().zip(&latent[j * c..j * c + kv]) {
                            *a += p * l;
                        }
                    }
                    for (e, ov) in o.iter_mut().enumerate() {
                        *ov = dot(&o_lat, w_uv(e));
                    }
                }
            }
        }
    }
    out
}

/// A token's softmax over its router logits, as every backend computes it: `exp(l - max)` over the
/// sum of those in expert order.
pub fn softmax_scores(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let ex: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum = ex.iter().fold(0.0f32, |a, &v| a + v);
    ex.iter().map(|v| v / sum).collect()
}

/// Routing for one token (spec section 4): returns (expert indices, weights), best first.
/// DeepSeek-V3 ([`Scoring::Sigmoid`]): selection on sigmoid + `bias`, a group scored by its top
/// two. DeepSeek-V2 ([`Scoring::Softmax`], `bias` empty): selection on the softmax, a group scored
/// by its best.
pub fn route(logits: &[f32], bias: &[f32], r: &Routing) -> (Vec<usize>, Vec<f32>) {
    let e = logits.len();
    let per_group = e / r.n_group;
    let (s, sb) = match r.scoring {
        Scoring::Sigmoid => {
            let s: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
            let sb = s.iter().zip(bias).map(|(a, b)| a + b).collect();
            (s, sb)
        }
        Scoring::Softmax => {
            let s = softmax_scores(logits);
            (s.clone(), s)
        }
    };
    let mut group_scores: Vec<(f32, usize)> = (0..r.n_group)
        .map(|g| {
            let mut v: Vec<f32> = sb[g * per_group..(g + 1) * per_group].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            let score = match r.scoring {
                Scoring::Sigmoid => v[0] + v.get(1).copied().unwrap_or(0.0),
                Scoring::Softmax => v[0],
            };
            (score, g)
        })
        .collect();
    group_scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let kept: Vec<usize> = group_scores[..r.topk_group].iter().map(|&(_, g)| g).collect();
    let mut candidates: Vec<usize> = (0..e).filter(|i| kept.contains(&(i / per_group))).collect();
    candidates.sort_by(|&a, &b| sb[b].total_cmp(&sb[a]).then(a.cmp(&b)));
    candidates.truncate(r.top_k);
    let mut w: Vec<f32> = candidates.iter().map(|&i| s[i]).collect();
    if r.norm_topk_prob {
        let sum: f32 = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|x| *x /= sum);
    }
    w.iter_mut().for_each(|x| *x *= r.routed_scaling_factor);
    (candidates, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layer_norm_matches_a_hand_computed_case() {
        // Row [1, 2, 3, 6]: mean 3, biased variance (4 + 1 + 0 + 9) / 4 = 3.5.
        let y = layer_norm(&[1.0, 2.0, 3.0, 6.0], &[1.0, 2.0, 1.0, 0.5], &[0.0, 1.0, -1.0, 0.25], 0.0);
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, -2.0 / s + 1.0, -1.0, 1.5 / s + 0.25];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn the_indexer_keeps_the_best_keys_in_key_order() {
        // Fewer keys than top_k: every one, padded.
        assert_eq!(select_top_keys(&[0.5, -1.0], 4), [0, 1, -1, -1]);
        // More: the best, listed by key; a tie goes to the earlier key.
        assert_eq!(select_top_keys(&[0.1, 3.0, 0.2, 3.0, 2.0, 0.2], 3), [1, 3, 4]);
        assert_eq!(select_top_keys(&[0.1, 3.0, 0.2, 3.0, 0.2], 3), [1, 2, 3]);
        // Scores: two heads of width 2, weights 1 and -2 over sqrt(2); relu per head.
        let q = [1.0, 0.0, 0.0, 1.0];
        // Rows of 3: one leading latent column, then the key.
        let scores = index_scores(&q, &[1.0, -2.0], &[9.0, 2.0, -1.0, -9.0, 1.0, 1.0], 3, 2);
        let (qk, w) = (0.5f32.sqrt(), 0.5f32.sqrt());
        let want = [w * 2.0 * qk, w * qk - 2.0 * w * qk];
        assert!((scores[0] - want[0]).abs() < 1e-6 && (scores[1] - want[1]).abs() < 1e-6, "{scores:?}");
    }

    #[test]
    fn matmul_matches_a_hand_computed_case() {
        // x [2, 3], w [2, 3]
        let y = matmul_nt(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1.0, 0.0, -1.0, 0.5, 0.5, 0.5], 2, 3, 2);
        assert_eq!(y, vec![-2.0, 3.0, -2.0, 7.5]);
    }

    #[test]
    fn router_logits_sum_splits_in_order() {
        // 40 columns: splits of 3, the 14th of 1 and the last two empty.
        let (t, d, e) = (2, 40, 3);
        let x: Vec<f32> = (0..t * d).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37).collect();
        let g: Vec<f32> = (0..e * d).map(|i| ((i * 53 % 29) as f32 - 14.0) * 0.11).collect();
        let y = router_logits(&x, &g, t, d, e);
        for (r, c) in (0..t).flat_map(|r| (0..e).map(move |c| (r, c))) {
            let (xr, gr) = (&x[r * d..(r + 1) * d], &g[c * d..(c + 1) * d]);
            let mut total = 0f32;
            for s in 0..ROUTER_SPLITS {
                let (lo, hi) = ((3 * s).min(d), (3 * s + 3).min(d));
                total += (lo..hi).fold(0f32, |a, i| a + xr[i] * gr[i]);
            }
            assert_eq!(y[r * e + c].to_bits(), total.to_bits(), "row {r} expert {c}");
            // The same value as any other order, up to rounding.
            assert!((y[r * e + c] - dot(xr, gr)).abs() <= 1e-4 * (1.0 + total.abs()));
        }
        // A split of one column each: the sequential sum itself.
        let (x1, g1) = (&x[..16], &g[..16]);
        let seq = x1.iter().zip(g1).fold(0f32, |a, (p, q)| a + p * q);
        assert_eq!(router_logits(x1, g1, 1, 16, 1)[0].to_bits(), seq.to_bits());
    }

    #[test]
    fn interleaved_and_half_rotation_give_the_same_dot_products() {
        // The same pairs rotated in two layouts: dot products between rotated vectors agree.
        let (cos, sin) = (vec![0.6, 0.8f32.cos()], vec![0.8, 0.8f32.sin()]);
        let q = [1.0f32, 2.0, 3.0, 4.0];
        let k = [0.5f32, -1.0, 2.0, 0.25];
        let (mut qi, mut ki) = (q, k);
        rotate(&mut qi, &cos, &sin, true);
        rotate(&mut ki, &cos, &sin, true);
        // De-interleave: (x0, x2, x1, x3) pairs (0,2) and (1,3) in the half layout.
        let de = |v: [f32; 4]| [v[0], v[2], v[1], v[3]];
        let (mut qh, mut kh) = (de(q), de(k));
        rotate(&mut qh, &cos, &sin, false);
        rotate(&mut kh, &cos, &sin, false);
        assert!((dot(&qi, &ki) - dot(&qh, &kh)).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn routing_invariants(logits in prop::collection::vec(-4.0f32..4.0, 16), bias in prop::collection::vec(-0.5f32..0.5, 16),
                              top_k in 1usize..=8, norm in any::<bool>()) {
            // 4 groups of 4, keep 2 groups: at most 8 experts are reachable.
            let r = Routing { top_k, n_group: 4, topk_group: 2, norm_topk_prob: norm, routed_scaling_factor: 2.5, scoring: Scoring::Sigmoid };
            let (idx, w) = route(&logits, &bias, &r);
            prop_assert_eq!(idx.len(), top_k);
            let mut uniq = idx.clone(); uniq.sort(); uniq.dedup();
            prop_assert_eq!(uniq.len(), top_k);
            let mut groups: Vec<usize> = idx.iter().map(|i| i / 4).collect(); groups.sort(); groups.dedup();
            prop_assert!(groups.len() <= 2);
            if norm {
                prop_assert!((w.iter().sum::<f32>() - 2.5).abs() < 1e-4);
            }
            prop_assert!(w.iter().all(|x| *x > 0.0));
        }

        #[test]
        fn softmax_routing_picks_the_best_scores_in_the_best_groups(logits in prop::collection::vec(-4.0f32..4.0, 16), top_k in 1usize..=4) {
            // DeepSeek-V2's group_limited_greedy: 4 groups of 4, a group scored by its best expert.
            let r = Routing { top_k, n_group: 4, topk_group: 2, norm_topk_prob: false, routed_scaling_factor: 1.5, scoring: Scoring::Softmax };
            let (idx, w) = route(&logits, &[], &r);
            let s = softmax_scores(&logits);
            prop_assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let best = |g: usize| s[g * 4..g * 4 + 4].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut order: Vec<usize> = (0..4).collect();
            order.sort_by(|&a, &b| best(b).total_cmp(&best(a)).then(a.cmp(&b)));
            let mut want: Vec<usize> = (0..16).filter(|i| order[..2].contains(&(i / 4))).collect();
            want.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            prop_assert_eq!(&idx[..], &want[..top_k]);
            for (i, wi) in idx.iter().zip(&w) { prop_assert_eq!(*wi, s[*i] * 1.5); }
            // greedy: one group, the plain top k of the softmax.
            let greedy = Routing { n_group: 1, topk_group: 1, ..r };
            let (gi, _) = route(&logits, &[], &greedy);
            let mut all: Vec<usize> = (0..16).collect();
            all.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            prop_assert_eq!(&gi[..], &all[..top_k]);
        }

        #[test]
        fn naive_and_absorbed_mla_agree(seed in 0u64..1000) {
            let dims = MlaDims { heads: 2, nope: 4, rope: 2, v: 3, kv_lora: 5 };
            let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut rnd = |n: usize| (0..n).map(|_| { state = state.wrapping_mul(6364136223846793005).wrapping_add(1); ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5 }).collect::<Vec<f32>>();
            let (t, s) = (3, 5);
            let (qn, qp, lat, kvb) = (rnd(t * 2 * 4), rnd(t * 2 * 2), rnd(s * 7), rnd(2 * 7 * 5));
            let visible = [2, 3, 4];
            let a = mla(&qn, &qp, &lat, &kvb, &visible, s, dims, 0.3, AttentionForm::Naive);
            let b = mla(&qn, &qp, &lat, &kvb, &visible, s, dims, 0.3, AttentionForm::Absorbed);
            for (x, y) in a.iter().zip(&b) { prop_assert!((x - y).abs() < 1e-5, "{} vs {}", x, y); }
        }
    }

    #[test]
    fn balance_loss_is_alpha_when_routing_follows_uniform_affinities() {
        // Equal logits: P_i = 1/E for all i, and sum_i f_i = E, so the loss is alpha whatever the routing.
        let (loss, _) = balance_loss(&[0.3; 12], &[0, 1, 0, 2, 0, 3], 4, 2, 0.5, Scoring::Sigmoid);
        assert!((loss - 0.5).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn balance_loss_gradient_matches_finite_differences() {
        let (t, e, k, alpha) = (4, 8, 2, 1.0);
        let logits: Vec<f32> = (0..t * e).map(|i| ((i * 37 % 23) as f32 / 23.0 - 0.5) * 4.0).collect();
        let idx = [0, 3, 3, 5, 0, 3, 7, 1];
        for scoring in [Scoring::Sigmoid, Scoring::Softmax] {
            let (_, grad) = balance_loss(&logits, &idx, e, k, alpha, scoring);
            let max = grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            assert!(max > 1e-3, "{max}");
            for i in 0..logits.len() {
                let h = 1e-2;
                let at = |d: f32| {
                    let mut l = logits.clone();
                    l[i] += d;
                    balance_loss(&l, &idx, e, k, alpha, scoring).0 as f64
                };
                let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
                assert!((fd - grad[i]).abs() < 1e-3 * max + 1e-6, "{scoring:?} logit {i}: {fd} vs {}", grad[i]);
            }
        }
    }

    /// Softmax routing's gradient (DeepSeek-V2) against finite differences of `sum_k dw_k w_k` with
    /// the selection held (every logit moves every softmax score).
    #[test]
    fn softmax_route_gradient_matches_finite_differences() {
        let logits: Vec<f32> = (0..8).map(|i| ((i * 37 % 23) as f32 / 23.0 - 0.5) * 3.0).collect();
        let r = Routing {
            top_k: 3,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.5,
            scoring: Scoring::Softmax,
        };
        let (idx, _) = route(&logits, &[], &r);
        let dw = [0.7f32, -1.3, 0.4];
        let grad = route_grad(&logits, &idx, &dw, &r);
        let objective = |l: &[f32]| -> f64 {
            let s = softmax_scores(l);
            idx.iter().zip(&dw).map(|(&i, g)| (*g as f64) * 1.5 * s[i] as f64).sum()
        };
        for i in 0..logits.len() {
            let h = 1e-3;
            let (mut up, mut down) = (logits.clone(), logits.clone());
            up[i] += h;
            down[i] -= h;
            let fd = ((objective(&up) - objective(&down)) / (2.0 * h as f64)) as f32;
            assert!((fd - grad[i]).abs() < 2e-3, "logit {i}: {fd} vs {}", grad[i]);
        }
        assert!(grad.iter().all(|g| *g != 0.0), "every logit gets a gradient: {grad:?}");
    }

    /// The FP8 training GEMMs equal the product of their dequantized operands (so the tiles are the
    /// recipe's: 1x128 along the contraction for activations and gradients, 128x128 weight blocks,
    /// 128x1 for Wgrad), and stay within a few percent of the f32 product.
    #[test]
    fn fp8_training_gemms_use_the_recipe_tiles() {
        let (m, k, n) = (200, 300, 130);
        let mut seed = 5u64;
        let mut rnd = |len: usize, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // Rows and columns of very different magnitudes: the tiles matter.
                    let v = ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * scale;
                    v * if i % 7 == 0 { 30.0 } else { 1.0 }
                })
                .collect()
        };
        let (x, w, dy) = (rnd(m * k, 2.0), rnd(n * k, 0.1), rnd(m * n, 1.0));
        fn deq(bits: &[u8], scale: impl Fn(usize, usize) -> f32, rows: usize, cols: usize) -> Vec<f64> {
            (0..rows * cols).map(|i| f8e4m3_to_f32(bits[i]) as f64 * scale(i / cols, i % cols) as f64).collect()
        }
        let mm = |a: &[f64], b: &[f64], rows: usize, inner: usize, cols: usize| -> Vec<f64> {
            // a [rows, inner] . b [cols, inner]^T
            (0..rows * cols)
                .map(|i| (0..inner).map(|t| a[(i / cols) * inner + t] * b[(i % cols) * inner + t]).sum())
                .collect()
        };
        let close = |got: &[f32], want: &[f64], tol: f64, what: &str| {
            let err: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
            assert!(err <= tol * norm, "{what}: relative error {}", err / norm);
        };
        let t = FP8_TILE;
        let (xq, xs) = quantize_fp8(&x, k, t);
        let (wq, ws) = crate::init::quantize_weight(&w, n, k, [t, t]);
        let xd = deq(&xq, |r, c| xs[r * k.div_ceil(t) + c / t], m, k);
        let wd = deq(&wq, |r, c| ws[(r / t) * k.div_ceil(t) + c / t], n, k);
        close(&fp8_fprop(&x, &w, m, k, n), &mm(&xd, &wd, m, k, n), 1e-6, "fprop");
        let (dq, ds) = quantize_fp8(&dy, n, t);
        let dyd = deq(&dq, |r, c| ds[r * n.div_ceil(t) + c / t], m, n);
        let wtd = transpose(&wd, n, k);
        close(&fp8_dgrad(&dy, &w, m, k, n), &mm(&dyd, &wtd, m, n, k), 1e-6, "dgrad");
        // Wgrad: dy^T and x^T quantized along the tokens.
        let (dtq, dts) = quantize_fp8(&transpose(&dy, m, n), m, t);
        let (xtq, xts) = quantize_fp8(&transpose(&x, m, k), m, t);
        let dytd = deq(&dtq, |r, c| dts[r * m.div_ceil(t) + c / t], n, m);
        let xtd = deq(&xtq, |r, c| xts[r * m.div_ceil(t) + c / t], k, m);
        close(&fp8_wgrad(&dy, &x, m, k, n), &mm(&dytd, &xtd, n, m, k), 1e-6, "wgrad");
        // Against the f32 products: e4m3's 3 mantissa bits, a few percent.
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, w64, dy64) = (f64s(&x), f64s(&w), f64s(&dy));
        close(&fp8_fprop(&x, &w, m, k, n), &mm(&x64, &w64, m, k, n), 0.05, "fprop vs f32");
        close(&fp8_dgrad(&dy, &w, m, k, n), &mm(&dy64, &transpose(&w64, n, k), m, n, k), 0.05, "dgrad vs f32");
        let wgrad32 = mm(&transpose(&dy64, m, n), &transpose(&x64, m, k), n, m, k);
        close(&fp8_wgrad(&dy, &x, m, k, n), &wgrad32, 0.05, "wgrad vs f32");
    }

    #[test]
    fn fp8_gemm_with_unit_scales_is_exact_on_representable_values() {
        let (xq, xs) = quantize_fp8(&[448.0, -224.0, 1.0, 0.5], 4, 128);
        assert_eq!(xs, vec![1.0]);
        let w = [f32_to_f8e4m3(1.0), f32_to_f8e4m3(2.0), 0, 0];
        let y = matmul_fp8(&xq, &xs, &w, &[1.0], 1, 4, 1, 128, 128, 1);
        assert_eq!(y, vec![448.0 - 448.0]);
    }
}
