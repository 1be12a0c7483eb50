#!/usr/bin/env python3
"""Correctness and speed of v3c's sm_90a row kernels on the device, against torch.

Run by benches/device/check.sh (step 2c) on the GPU machine; the PTX comes from the build machine
(benches/device/prepare.sh writes .device/rows/<kernel>.ptx) and the CUDA driver JIT-compiles it.

Kernel ABI (compiler/src/conversion/sm90/rows.rs, `RowKernel::arguments`), each memref as its scalars
(allocated, aligned, offset, sizes, strides):
  rows_embed_<w>_d<D>_t<T>: table [V, D] (<w>), ids [rows] (i64), out [rows, D] (f32)
  rows_rmsnorm_<w>_d<D>_t<T>_eps<E>[_y][_q]: x [rows, D] (f32), w [D] (<w>), then `_y`: y [rows, D] (f32),
      `_q`: q [rows, D] (e4m3 bytes) and scale [rows, ceil(D / 128)] (f32)
  rows_latent_<w>_d<D>_r<R>_t<T>_eps<E>[_il]_write: latent [B, D], w [D], k_pe [B, R], positions [B] (i64),
      cache [B, S, D + R] (written in place at each position), rope [positions, R] (cos | sin); grid B
  rows_latent_..._append: the same with cache [P, D + R], then out [P + T, D + R]; grid P + T
  rows_latent_..._writebf16 / _appendbf16: the same over bf16 caches (each new value rounded to nearest even);
      the decode write's cache is a pool of 64-row pages [pages, 64, D + R] and a block table [B, pages per
      sequence] (i32) comes last: row p of sequence b is row p % 64 of page table[b, p / 64]
  rows_latent_..._writefp8 / _appendfp8: the same into fp8 rows, cache [pages, 64, row bytes] + table / [P, row
      bytes] (u8):
      D e4m3 bytes, D / 128 power-of-two f32 scales (padded to 16 bytes), R bf16 (runtime/src/plan.rs,
      Fp8LatentRow: 656 bytes for 512 + 64); checked decoded, within one e4m3 step of the reference, scales
      the least powers of two that fit (appended: the cached rows' bytes unchanged)
  rows_splitrope_h<H>_n<N>_r<R>_t<T>[_il]: y [rows, H (N + R)], positions [rows], rope [positions, R],
      q_nope [rows, H, N], q_pe [rows, H, R]
  rows_silumul_d<D>_t<T>_(q|y): x [rows, 2D] (gate | up), then y [rows, D] or q, scale as above
  rows_copy_d<D>_t<T>: x [rows, D], y [rows, D]
  rows_splitbf16_d<D>_t<T>: x [rows, D] (f32), hi [rows, D], lo [rows, D] (bf16)
  rows_concat_d<D>_b<B>_t<T>: x1 [rows, D], x2 [rows, B], y [rows, D + B]
  rows_mlakeys_h<H>_n<N>_r<R>_v<V>_kv<D>_t<T>[_bf16][_c16|_c8]: kv [rows, H (N + V)] (f32, `_bf16`: bf16), cache
      [rows, D + R] (f32; `_c16`: bf16; `_c8`: fp8 rows, u8), then k [H rows, N + R], vv [H rows, V] (bf16):
      head h's row h rows + s is [kv[s, h, :N] | the cache row's rope key], vv its values (MLA prefill)
  rows_mlaqueries_h<H>_n<N>_r<R>_t<T>: q_nope [rows, H, N], q_pe [rows, H, R], q [H rows, N + R] (bf16)
  rows_argmax_d<D>_t<T>: x [rows, D] (f32), idx [rows] (i32): f32 total order, ties to the lower index
  rows_sample_d<D>_t<T>: x [rows, D] (f32), temperature [rows], top_p [rows] (f32), top_k [rows] (i32, 0: none),
      min_p [rows] (f32, 0: none), uniform [rows] (i64: an f64 draw's bits), idx [rows] (i32): the host sampler's
      draw (models/src/sampling.rs, `draw_plain`: every token weighed, else over the top k and/or the top-p
      nucleus and/or the tokens of at least min-p of the largest weight), exactly: its exp
      polynomial in f32, its f64 sums in its order (`sample_reference`); -1 where the temperature is not above
      0; -2 where the kernel leaves a row to the host (more than its 2048 candidates, or a NaN weight)
  rows_routelogits_<w>_d<D>_e<E>_t<T>[_b<B>]: x [rows, D], gate [E, D], then parts [rows, 16 E]: per split s of
      the 16 ranges of ceil(D / 16) columns, expert e's sum at column s E + e; grid ceil(rows / B) x 16 x
      ceil(E / 64); B tokens a block (prefill's 8, decode's 4), else one
  rows_route_e<E>_k<K>_g<G>_kg<KG>_s<S>[_norm]_t<T>[_b<B>]: parts [rows, 16 E] (as above), bias [E], then
      idx [rows, K] (i32), w [rows, K]: each logit the 16 parts' sum
  rows_dispatch_e<E>_s<S>_t<T>: idx [rows, K], w [rows, K], offsets [E + S + 1], sorted [rows, K + S] (i32),
      rw [rows, K + S]; one block (grid 1)
  rows_gatherfp8_d<D>_t<T>: x [rows, D] (e4m3 bytes), x_scale [rows, D / 128], sorted [rows, 9] (i32 tokens),
      then q [9 rows, D], scale [9 rows, D / 128]: each sorted row its token's bytes and scales, exact; grid
      9 rows (the fp8 MoE's rows in expert order before its contiguous grouped GEMM)
  rows_mladecode_h<H>_n<N>_r<R>_v<V>_kv<KV>_c<C>_s<S>_t<T>: q_nope [B, H, N], q_pe [B, H, R], cache
      [B, slots, KV + R], positions [B], kv_b [H (N + V), KV] (e4m3), kv_b_scale [.., ..], q [B, H V] (e4m3),
      scale [B, H]; grid B x H. The CUDA-core baseline: timed at 64 sequences of 64 cache slots only.
Launch: one block of T threads per row, no dynamic shared memory.

Checks: outputs poisoned (NaN, 0x7F bytes) and fully written. y against torch in float64 within 1e-5
relative per element (the kernel sums squares as a tree over threads); scales within 1e-5 relative; e4m3
bytes equal to torch's conversion of the reference except at rare rounding ties (at most 1 %, each within
one e4m3 step, subnormals' 2^-9 included: the failing bytes are named); embeddings exact, ids outside the table give rows of zeros.
Timing: median of 50 launches at 64 rows (a decode batch) and 8192 rows (a prefill; 1024 sequences for
the latent decode write), as GB/s moved
(bytes read + written) and, with --ceilings, as a fraction of the device's measured copy bandwidth.

`--self-test` needs no GPU: it checks the name parser and the references on the CPU.
"""
import argparse
import ctypes
import json
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_check import E4M3_MAX, Driver, median_ms, memref_args  # noqa: E402

NAME = re.compile(r"^rows_(embed|rmsnorm)_(bf16|f32)_d(\d+)_t(\d+)(?:_eps([0-9a-z]+))?(_y)?(_q)?$")
SPLITROPE = re.compile(r"^rows_splitrope_h(\d+)_n(\d+)_r(\d+)_t(\d+)(_il)?$")
SILUMUL = re.compile(r"^rows_silumul_d(\d+)_t(\d+)_(q|y)$")
COPY = re.compile(r"^rows_copy_d(\d+)_t(\d+)$")
GATHERFP8 = re.compile(r"^rows_gatherfp8_d(\d+)_t(\d+)$")
ROUTE = re.compile(r"^rows_route_e(\d+)_k(\d+)_g(\d+)_kg(\d+)_s([0-9a-z]+?)(_norm)?_t(\d+)(?:_b(\d+))?(?:_p(\d+))?$")
ROUTELOGITS = re.compile(r"^rows_routelogits_(bf16|f32)_d(\d+)_e(\d+)_t(\d+)(?:_b(\d+))?$")
SPLITS = 16  # the router's column ranges (models/src/interp/kernels.rs, ROUTER_SPLITS)
EXPERT_TILE = 64  # experts a routelogits block sums
DISPATCH = re.compile(r"^rows_dispatch_e(\d+)_s(\d+)_t(\d+)$")
MLADECODE = re.compile(r"^rows_mla(decode|prefill)_h(\d+)_n(\d+)_r(\d+)_v(\d+)_kv(\d+)_c(\d+)_s([0-9a-z]+?)_t(\d+)$")
SPLIT = re.compile(r"^rows_splitbf16_d(\d+)_t(\d+)$")
CONCAT = re.compile(r"^rows_concat_d(\d+)_b(\d+)_t(\d+)$")
ARGMAX = re.compile(r"^rows_argmax_d(\d+)_t(\d+)$")
SAMPLE = re.compile(r"^rows_sample_d(\d+)_t(\d+)$")
SCORES = re.compile(r"^rows_scores_d(\d+)_t(\d+)$")
MLAKEYS = re.compile(r"^rows_mlakeys_h(\d+)_n(\d+)_r(\d+)_v(\d+)_kv(\d+)_t(\d+)(_bf16)?(?:_c(16|8))?$")
MLAQUERIES = re.compile(r"^rows_mlaqueries_h(\d+)_n(\d+)_r(\d+)_t(\d+)$")
LATENT = re.compile(r"^rows_latent_(bf16|f32)_d(\d+)_r(\d+)_t(\d+)_eps([0-9a-z]+)(_il)?_(append|write)(bf16|fp8)?$")
GROUP = 128
SLOTS = 64  # cache rows per sequence of the decode (write) problems
GATHER_WIDTH = 9  # experts a token takes in the gather problems (DeepSeek-V3: 8 routed + 1 shared)


def parse(name):
    m = MLADECODE.match(name)
    if m:
        kind, h, n, r, v, kv, c, sc, t = m.groups()
        return {"name": name, "op": "mladecode", "prefill": kind == "prefill", "heads": int(h), "nope": int(n), "rope": int(r), "v": int(v),
                "d": int(kv), "context": int(c), "scale": float(sc.replace("m", "-").replace("p", ".")),
                "threads": int(t), "weight": "f8E4M3FN", "keep": False, "quantize": True}
    m = MLAKEYS.match(name)
    if m:
        h, n, r, v, kv, t, bf16, c = m.groups()
        return {"name": name, "op": "mlakeys", "heads": int(h), "nope": int(n), "rope": int(r), "v": int(v),
                "d": int(kv), "threads": int(t), "weight": "bf16" if bf16 else "f32",
                "cache": {None: "f32", "16": "bf16", "8": "fp8"}[c], "keep": False, "quantize": False}
    m = MLAQUERIES.match(name)
    if m:
        h, n, r, t = map(int, m.groups())
        return {"name": name, "op": "mlaqueries", "heads": h, "nope": n, "rope": r, "d": h * (n + r), "threads": t,
                "weight": "f32", "keep": False, "quantize": False}
    m = ROUTELOGITS.match(name)
    if m:
        w, d, e, t, b = m.groups()
        return {"name": name, "op": "routelogits", "weight": w, "d": int(d), "experts": int(e), "threads": int(t),
                "tokens": int(b or 1), "keep": False, "quantize": False}
    m = ROUTE.match(name)
    if m:
        e, k, g, kg, sc, norm, t, b, p = m.groups()
        return {"name": name, "op": "route", "weight": "f32", "d": int(e), "experts": int(e), "top_k": int(k),
                "n_group": int(g), "topk_group": int(kg), "scale": float(sc.replace("m", "-").replace("p", ".")),
                "norm": bool(norm), "threads": int(t), "tokens": int(b or 1), "pieces": int(p or SPLITS),
                "keep": False, "quantize": False}
    m = DISPATCH.match(name)
    if m:
        e, sh, t = map(int, m.groups())
        return {"name": name, "op": "dispatch", "experts": e, "shared": sh, "d": e + sh, "threads": t,
                "weight": "f32", "top_k": 8, "keep": False, "quantize": False}
    m = SPLIT.match(name)
    if m:
        return {"name": name, "op": "splitbf16", "d": int(m.group(1)), "threads": int(m.group(2)), "weight": "f32",
                "keep": False, "quantize": False}
    m = CONCAT.match(name)
    if m:
        return {"name": name, "op": "concat", "d": int(m.group(1)), "second": int(m.group(2)),
                "threads": int(m.group(3)), "weight": "f32", "keep": False, "quantize": False}
    m = SCORES.match(name)
    if m:
        return {"name": name, "op": "scores", "d": int(m.group(1)), "threads": int(m.group(2)), "weight": "f32",
                "keep": False, "quantize": False}
    m = SAMPLE.match(name)
    if m:
        return {"name": name, "op": "sample", "d": int(m.group(1)), "threads": int(m.group(2)), "weight": "f32",
                "keep": False, "quantize": False}
    m = ARGMAX.match(name)
    if m:
        return {"name": name, "op": "argmax", "d": int(m.group(1)), "threads": int(m.group(2)), "weight": "f32",
                "keep": False, "quantize": False}
    m = GATHERFP8.match(name)
    if m:
        return {"name": name, "op": "gatherfp8", "d": int(m.group(1)), "threads": int(m.group(2)), "weight": "f32",
                "keep": False, "quantize": False}
    m = COPY.match(name)
    if m:
        return {"name": name, "op": "copy", "d": int(m.group(1)), "threads": int(m.group(2)), "weight": "f32",
                "keep": False, "quantize": False}
    m = SPLITROPE.match(name)
    if m:
        h, n, r, t, il = m.groups()
        h, n, r = int(h), int(n), int(r)
        return {"name": name, "op": "splitrope", "heads": h, "nope": n, "rope": r, "d": h * (n + r), "threads": int(t),
                "interleave": bool(il), "weight": "f32", "keep": False, "quantize": False}
    m = SILUMUL.match(name)
    if m:
        d, t, mode = m.groups()
        return {"name": name, "op": "silumul", "d": int(d), "threads": int(t), "weight": "f32",
                "keep": mode == "y", "quantize": mode == "q"}
    m = LATENT.match(name)
    if m:
        w, d, r, t, eps, il, mode, cache = m.groups()
        return {"name": name, "op": "latent", "weight": w, "d": int(d), "rope": int(r), "threads": int(t),
                "eps": float(eps.replace("m", "-").replace("p", ".")), "interleave": bool(il),
                "append": mode == "append", "bf16_cache": cache == "bf16", "fp8_cache": cache == "fp8",
                "keep": False, "quantize": False}
    m = NAME.match(name)
    if not m:
        raise SystemExit(f"rows_check: {name}: not a row kernel name")
    op, w, d, t, eps, y, q = m.groups()
    if (op == "rmsnorm") != (eps is not None) or (op == "embed" and (y or q)) or (op == "rmsnorm" and not (y or q)):
        raise SystemExit(f"rows_check: {name}: not a row kernel name")
    eps = float(eps.replace("m", "-").replace("p", ".")) if eps else None
    return {"name": name, "op": op, "weight": w, "d": int(d), "threads": int(t), "eps": eps, "keep": bool(y),
            "quantize": bool(q)}


def dtype(w):
    return torch.bfloat16 if w == "bf16" else torch.float32


def rms_norm_reference(x, w, eps):
    """The reference interpreter's formula, in float64: w * (x * (1 / sqrt(mean(x^2) + eps)))."""
    x64 = x.double()
    inv = 1.0 / torch.sqrt((x64 * x64).mean(dim=1, keepdim=True) + eps)
    return w.double()[None, :] * (x64 * inv)


def quantize_reference(y):
    """1 x 128 e4m3 quantization of f32 rows as the reference does it: (e4m3 bytes, scales)."""
    rows, d = y.shape
    groups = math.ceil(d / GROUP)
    pad = torch.zeros(rows, groups * GROUP, dtype=torch.float32, device=y.device)
    pad[:, :d] = y
    g = pad.view(rows, groups, GROUP)
    s = g.abs().amax(dim=2).clamp(min=1e-4) / E4M3_MAX
    q = (g / s[:, :, None]).to(torch.float8_e4m3fn).view(rows, groups * GROUP)[:, :d]
    return q.contiguous().view(torch.uint8), s


def rope_table(cfg, positions=256):
    """cos then sin per position, as the runtime builds it (f32 of float64 cos/sin of f32 angles)."""
    r = cfg["rope"]
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    angle = (torch.arange(positions, dtype=torch.float32)[:, None] * inv[None, :]).double()
    return torch.cat([angle.cos().float(), angle.sin().float()], dim=1).contiguous()


def rotate(cfg, k, positions, table):
    """RoPE of rows k [rows, r] at positions from the table, float64."""
    half = cfg["rope"] // 2
    cos, sin = table[positions.long(), :half].double(), table[positions.long(), half:].double()
    k = k.double()
    a, b = (k[:, 0::2], k[:, 1::2]) if cfg["interleave"] else (k[:, :half], k[:, half:])
    rot = torch.empty_like(k)
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if cfg["interleave"]:
        rot[:, 0::2], rot[:, 1::2] = ra, rb
    else:
        rot[:, :half], rot[:, half:] = ra, rb
    return rot


def fp8_row_bytes(d, rope):
    """An fp8 cache row's layout (runtime/src/plan.rs, Fp8LatentRow): scales' offset, rope key's, row bytes."""
    rope_at = d + -(-4 * (d // GROUP) // 16) * 16
    return d, rope_at, rope_at + 2 * rope


def fp8_rows_decoded(d, rope, rows):
    """Packed fp8 cache rows [..., row bytes] (u8) as float64 values [..., d + rope], and their scales."""
    scales_at, rope_at, _ = fp8_row_bytes(d, rope)
    flat = rows.reshape(-1, rows.shape[-1]).contiguous()
    if flat.shape[0] == 0:  # torch cannot view no rows as another dtype
        empty = torch.zeros(0, d + rope, dtype=torch.float64, device=rows.device)
        return empty, torch.zeros(0, d // GROUP, dtype=torch.float64, device=rows.device)
    s = flat[:, scales_at:scales_at + 4 * (d // GROUP)].contiguous().view(torch.float32).double()
    lat = flat[:, :d].contiguous().view(torch.float8_e4m3fn).double().view(-1, d // GROUP, GROUP) * s[:, :, None]
    rope_v = flat[:, rope_at:].contiguous().view(torch.bfloat16).double()
    return torch.cat([lat.view(-1, d), rope_v], dim=1), s


def fp8_pack_reference(d, rope, values):
    """float rows [n, d + rope] packed as the runtime packs them (the least power-of-two scale with
    amax <= 448 s per 128 columns, amax floored at 1e-4)."""
    n = values.shape[0]
    latent = values[:, :d].float().view(n, d // GROUP, GROUP)
    amax = latent.abs().amax(dim=2)
    mant, exp = torch.frexp(amax.clamp(min=1e-4) / E4M3_MAX)
    s = torch.ldexp(torch.ones_like(mant), torch.where(mant == 0.5, exp - 1, exp))
    s = torch.where(amax > E4M3_MAX * s, 2 * s, s)
    scales_at, rope_at, row = fp8_row_bytes(d, rope)
    out = torch.zeros(n, row, dtype=torch.uint8, device=values.device)
    out[:, :d] = (latent / s[:, :, None]).to(torch.float8_e4m3fn).view(torch.uint8).view(n, d)
    out[:, scales_at:scales_at + 4 * (d // GROUP)] = s.contiguous().view(torch.uint8).view(n, -1)
    out[:, rope_at:] = values[:, d:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, -1)
    return out


def latent_reference(cfg, latent, w, k_pe, positions, table):
    """Rows of concat(rms_norm(latent) * w, rope(k_pe)) in float64 from the f32 table."""
    r, half = cfg["rope"], cfg["rope"] // 2
    y = rms_norm_reference(latent, w.float(), cfg["eps"])
    cos, sin = table[positions.long(), :half].double(), table[positions.long(), half:].double()
    k = k_pe.double()
    if cfg["interleave"]:
        a, b = k[:, 0::2], k[:, 1::2]
    else:
        a, b = k[:, :half], k[:, half:]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    rot = torch.empty_like(k)
    if cfg["interleave"]:
        rot[:, 0::2], rot[:, 1::2] = ra, rb
    else:
        rot[:, :half], rot[:, half:] = ra, rb
    return torch.cat([y, rot], dim=1)


def quantize_weight_blocks(w, block=128):
    """128 x 128 e4m3 blocks: (bytes as uint8, scales)."""
    rows, cols = w.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    pad = torch.zeros(rb * block, cb * block)
    pad[:rows, :cols] = w
    g = pad.view(rb, block, cb, block)
    s = g.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = (g / s[:, None, :, None]).to(torch.float8_e4m3fn).view(rb * block, cb * block)[:rows, :cols]
    return q.contiguous().view(torch.uint8), s


def route_parts_reference(cfg, x, gate):
    """The router logits' pieces in float64: [rows, SPLITS * E], split s of expert e at column s E + e."""
    d, width = x.shape[1], -(-x.shape[1] // SPLITS)
    parts = torch.zeros(x.shape[0], SPLITS, gate.shape[0], dtype=torch.float64, device=x.device)
    for s in range(SPLITS):
        lo, hi = min(s * width, d), min((s + 1) * width, d)
        parts[:, s] = x[:, lo:hi].double() @ gate[:, lo:hi].double().T
    return parts.view(x.shape[0], -1)


def route_reference(cfg, parts, bias):
    """DeepSeek-V3's routing in float64 from the logits' pieces (`cfg["pieces"]` a logit; 1: whole logits,
    prefill's gate GEMM's; stable sorts: ties to the lower index): (experts, weights)."""
    e, g, per = cfg["experts"], cfg["n_group"], cfg["experts"] // cfg["n_group"]
    s = torch.sigmoid(parts.double().view(parts.shape[0], cfg["pieces"], e).sum(dim=1))
    sb = s + bias.double()[None, :]
    top2 = sb.view(-1, g, per).sort(dim=2, descending=True, stable=True).values[:, :, :2].sum(dim=2)
    groups = top2.sort(dim=1, descending=True, stable=True).indices[:, :cfg["topk_group"]]
    keep = torch.zeros(parts.shape[0], g, dtype=torch.bool, device=parts.device).scatter_(1, groups, True)
    masked = torch.where(keep.repeat_interleave(per, dim=1), sb, torch.full_like(sb, float("-inf")))
    idx = masked.sort(dim=1, descending=True, stable=True).indices[:, :cfg["top_k"]]
    w = s.gather(1, idx)
    if cfg["norm"]:
        w = w / (w.sum(dim=1, keepdim=True) + 1e-20)
    return idx, w * cfg["scale"]


def dispatch_reference(cfg, idx, w):
    """The counting sort: offsets, token and weight per sorted row (tokens in order per expert)."""
    rows, k = idx.shape
    tokens, weights, offsets = [], [], [0]
    idx_l, w_l = idx.tolist(), w.tolist()
    for e in range(cfg["experts"] + cfg["shared"]):
        for t in range(rows):
            if e >= cfg["experts"]:
                tokens.append(t), weights.append(1.0)
            for j in range(k):
                if e < cfg["experts"] and idx_l[t][j] == e:
                    tokens.append(t), weights.append(w_l[t][j])
        offsets.append(len(tokens))
    return offsets, tokens, weights


def mla_decode_reference(cfg, q_nope, q_pe, cache, positions, kv_b, kv_scale):
    """Absorbed MLA in float64 from the dequantized kv_b: [B, H * v]. Decode: sequence b sees its cache
    rows 0..=positions[b]; prefill (cache is the latent [S, C], positions None): query b sees 0..=S - B + b."""
    h, n, v, kv = cfg["heads"], cfg["nope"], cfg["v"], cfg["d"]
    w = kv_b.view(torch.float8_e4m3fn).double() * kv_scale.double().repeat_interleave(128, 0)[: kv_b.shape[0]] \
        .repeat_interleave(128, 1)[:, :kv]
    w = w.view(h, n + v, kv)
    out = []
    for b in range(q_nope.shape[0]):
        if positions is None:
            keys = cache.shape[0] - q_nope.shape[0] + b + 1
            lat = cache[:keys].double()
        else:
            keys = int(positions[b]) + 1
            lat = cache[b, :keys].double()
        q_abs = torch.einsum("hn,hnc->hc", q_nope[b].double(), w[:, :n])
        s = (q_abs @ lat[:, :kv].T + q_pe[b].double() @ lat[:, kv:].T) * cfg["scale"]
        o = torch.softmax(s, dim=1) @ lat[:, :kv]
        out.append(torch.einsum("hc,hvc->hv", o, w[:, n:]).reshape(-1))
    return torch.stack(out)


def problem(cfg, rows, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = cfg["d"]
    if cfg["op"] == "mladecode":
        h, n, r, v = cfg["heads"], cfg["nope"], cfg["rope"], cfg["v"]
        slots = SLOTS
        kv_rows = h * (n + v)
        kv_b, kv_scale = quantize_weight_blocks(torch.randn(kv_rows, d, generator=gen) * 0.05)
        p = {"q_nope": torch.randn(rows, h, n, generator=gen).to(device),
             "q_pe": torch.randn(rows, h, r, generator=gen).to(device),
             "kv_b": kv_b.to(device), "kv_b_scale": kv_scale.to(device)}
        if cfg["prefill"]:
            p["cache"] = torch.randn(rows + 5, d + r, generator=gen).to(device)  # 5 rows cached before
        else:
            p["cache"] = torch.randn(rows, slots, d + r, generator=gen).to(device)
            p["positions"] = torch.randint(0, slots, (rows,), generator=gen, dtype=torch.int64).to(device)
        return p
    if cfg["op"] == "routelogits":
        return {"x": torch.randn(rows, d, generator=gen).to(device),
                "gate": (torch.randn(cfg["experts"], d, generator=gen) * 0.02).to(dtype(cfg["weight"])).to(device)}
    if cfg["op"] == "route":
        # Pieces of logits of about a full-width router's spread (the sum of 16 of them; whole logits 4x).
        spread = 0.3 * (SPLITS / cfg["pieces"]) ** 0.5
        return {"parts": (torch.randn(rows, cfg["pieces"] * cfg["experts"], generator=gen) * spread).to(device),
                "bias": (torch.randn(cfg["experts"], generator=gen) * 0.01).to(device)}
    if cfg["op"] == "dispatch":
        k = cfg["top_k"]
        idx = torch.stack([torch.randperm(cfg["experts"], generator=gen)[:k] for _ in range(rows)]).to(torch.int32)
        return {"idx": idx.to(device), "w": torch.rand(rows, k, generator=gen).to(device)}
    if cfg["op"] == "splitrope":
        return {"y": (torch.randn(rows, d, generator=gen) * 3).to(device), "rope": rope_table(cfg).to(device),
                "positions": torch.randint(0, 256, (rows,), generator=gen, dtype=torch.int64).to(device)}
    if cfg["op"] == "silumul":
        return {"x": (torch.randn(rows, 2 * d, generator=gen) * 4).to(device)}
    if cfg["op"] in ("copy", "splitbf16"):
        return {"x": (torch.randn(rows, d, generator=gen) * 30).to(device)}
    if cfg["op"] == "mlakeys":
        h, n, r, v = cfg["heads"], cfg["nope"], cfg["rope"], cfg["v"]
        kv = (torch.randn(rows, h * (n + v), generator=gen) * 9).to(dtype(cfg["weight"]))
        cache = torch.randn(rows, d + r, generator=gen) * 2
        cache = {"f32": cache, "bf16": cache.to(torch.bfloat16)}.get(cfg["cache"])
        if cache is None:
            cache = fp8_pack_reference(d, r, torch.randn(rows, d + r, generator=gen) * 2)
        return {"kv": kv.to(device), "cache": cache.to(device)}
    if cfg["op"] == "mlaqueries":
        h = cfg["heads"]
        return {"q_nope": (torch.randn(rows, h, cfg["nope"], generator=gen) * 9).to(device),
                "q_pe": (torch.randn(rows, h, cfg["rope"], generator=gen) * 9).to(device)}
    if cfg["op"] == "gatherfp8":
        # `rows` tokens, each in GATHER_WIDTH experts: the sorted rows name tokens out of order, repeated.
        sorted_rows = torch.stack([torch.randperm(rows, generator=gen) for _ in range(GATHER_WIDTH)], dim=1)
        return {"x": torch.randint(0, 256, (rows, d), generator=gen, dtype=torch.uint8).to(device),
                "x_scale": torch.rand(rows, d // GROUP, generator=gen).to(device),
                "sorted": sorted_rows.reshape(rows, GATHER_WIDTH).to(torch.int32).to(device)}
    if cfg["op"] == "sample":
        # Logits of several spreads, temperatures (0: not sampled), draws over [0, 1) and at its ends;
        # every other row top-p (0.9, 0.95, 0.5) over logits with a few standing out, as a model's.
        x = torch.randn(rows, d, generator=gen) * torch.tensor([2.0, 6.0, 15.0])[torch.arange(rows) % 3, None]
        t = torch.tensor([0.7, 1.0, 0.3, 1.5, 0.0])[torch.arange(rows) % 5]
        p = torch.ones(rows)
        k = torch.zeros(rows, dtype=torch.int32)
        m = torch.zeros(rows)
        for r in range(1, rows, 2):
            p[r] = [0.9, 0.95, 0.5, 1.0][r // 2 % 4]
            k[r] = [0, 0, 50, 5, 1, 0][r // 2 % 6]
            m[r] = [0.0, 0.1, 0.0, 0.05, 0.3][r // 2 % 5]
            spikes = torch.randint(0, d, ([1, 6, 40, 300][r // 2 % 4],), generator=gen)
            x[r, spikes] += 12.0 + torch.rand(len(spikes), generator=gen) * 4
        # Min-p alone on every third even row (its tokens in id order).
        m[2::6] = 0.1
        u = torch.rand(rows, generator=gen, dtype=torch.float64)
        u[0] = 0.0
        if rows > 1:
            u[1] = 1.0 - 2.0 ** -53
        return {"x": x.to(device), "temperature": t.to(device), "top_p": p.to(device), "top_k": k.to(device),
                "min_p": m.to(device), "uniform": u.view(torch.int64).to(device)}
    if cfg["op"] == "scores":
        # Logits of several spreads, masked tokens (-inf), a NaN row, an all -inf row; tokens inside the
        # row and past it (-1, D: a NaN logit).
        x = torch.randn(rows, d, generator=gen) * torch.tensor([1.0, 5.0, 30.0])[torch.arange(rows) % 3, None]
        x[3::7, ::5] = float("-inf")
        if rows > 1:
            x[1, d // 3] = float("nan")
        if rows > 2:
            x[2] = float("-inf")
        token = torch.randint(0, d, (rows,), generator=gen, dtype=torch.int32)
        token[5::11] = -1
        token[6::11] = d
        return {"x": x.to(device), "token": token.to(device)}
    if cfg["op"] == "argmax":
        x = torch.randn(rows, d, generator=gen) * 30
        x[0, 3] = x[0, d - 2] = 1e4  # a tie: the lower index
        if rows > 1:
            x[1, d // 2] = float("nan")  # NaN orders above every number
        if rows > 2:
            x[2] = float("-inf")
        return {"x": x.to(device)}
    if cfg["op"] == "concat":
        return {"x1": torch.randn(rows, d, generator=gen).to(device),
                "x2": torch.randn(rows, cfg["second"], generator=gen).to(device)}
    if cfg["op"] == "latent":
        c = d + cfg["rope"]
        new = rows if not cfg["append"] else max(1, rows // 2)
        p = {"latent": torch.randn(new, d, generator=gen) * 3, "k_pe": torch.randn(new, cfg["rope"], generator=gen),
             "w": (torch.randn(d, generator=gen) * 0.2 + 1.0).to(dtype(cfg["weight"])), "rope": rope_table(cfg)}
        if cfg["append"]:
            p["positions"] = torch.arange(rows - new, rows, dtype=torch.int64)
            p["cache"] = torch.randn(rows - new, c, generator=gen)
        else:
            p["positions"] = torch.randint(0, SLOTS, (new,), generator=gen, dtype=torch.int64)
            p["cache"] = torch.randn(new, SLOTS, c, generator=gen)
        if cfg["bf16_cache"]:
            p["cache"] = p["cache"].to(torch.bfloat16)
        if cfg["fp8_cache"] and cfg["append"]:
            p["cache"] = fp8_pack_reference(d, cfg["rope"], p["cache"])
        elif cfg["fp8_cache"]:
            row = fp8_row_bytes(d, cfg["rope"])[2]
            p["cache"] = torch.randint(0, 256, (new, SLOTS, row), generator=gen, dtype=torch.uint8)
        if not cfg["append"] and (cfg["bf16_cache"] or cfg["fp8_cache"]):
            # A pool of pages (SLOTS = 64: one per sequence), handed out in a shuffled order.
            p["table"] = torch.randperm(new, generator=gen).to(torch.int32).view(new, 1)
        return {k: v.to(device) for k, v in p.items()}
    if cfg["op"] == "embed":
        vocab = 1000
        table = (torch.randn(vocab, d, generator=gen)).to(dtype(cfg["weight"]))
        ids = torch.randint(0, vocab, (rows,), generator=gen, dtype=torch.int64)
        ids[: min(rows, 2)] = torch.tensor([-1, vocab])[: min(rows, 2)]  # outside the table: zeros
        return {"table": table.to(device), "ids": ids.to(device)}
    x = torch.randn(rows, d, generator=gen) * (10.0 ** (torch.arange(rows) % 4 - 2)).float()[:, None]
    if d > GROUP:
        x[0, :GROUP] = 0.0  # a group of zeros: the 1e-4 floor of its scale
    w = (torch.randn(d, generator=gen) * 0.2 + 1.0).to(dtype(cfg["weight"]))
    return {"x": x.to(device), "w": w.to(device)}


def outputs(cfg, rows, device):
    d, out = cfg["d"], {}
    if cfg["op"] == "mladecode":
        hv = cfg["heads"] * cfg["v"]
        return {"q": torch.full((rows, hv), 0x7F, dtype=torch.uint8, device=device),
                "scale": torch.full((rows, cfg["heads"]), float("nan"), device=device)}
    if cfg["op"] == "routelogits":
        return {"parts": torch.full((rows, SPLITS * cfg["experts"]), float("nan"), device=device)}
    if cfg["op"] == "route":
        return {"idx": torch.full((rows, cfg["top_k"]), -1, dtype=torch.int32, device=device),
                "w_out": torch.full((rows, cfg["top_k"]), float("nan"), device=device)}
    if cfg["op"] == "dispatch":
        width = cfg["top_k"] + cfg["shared"]
        return {"offsets": torch.full((cfg["d"] + 1,), -1, dtype=torch.int32, device=device),
                "sorted": torch.full((rows, width), -1, dtype=torch.int32, device=device),
                "rw": torch.full((rows, width), float("nan"), device=device)}
    if cfg["op"] == "copy":
        return {"y": torch.full((rows, d), float("nan"), device=device)}
    if cfg["op"] in ("mlakeys", "mlaqueries"):
        h, n, r = cfg["heads"], cfg["nope"], cfg["rope"]
        nan = lambda cols: torch.full((h * rows, cols), float("nan"), dtype=torch.bfloat16, device=device)
        return {"k": nan(n + r), "vv": nan(cfg["v"])} if cfg["op"] == "mlakeys" else {"q": nan(n + r)}
    if cfg["op"] == "gatherfp8":
        return {"q": torch.full((rows * GATHER_WIDTH, d), 0x7F, dtype=torch.uint8, device=device),
                "scale": torch.full((rows * GATHER_WIDTH, d // GROUP), float("nan"), device=device)}
    if cfg["op"] in ("argmax", "sample"):
        return {"idx": torch.full((rows,), -2, dtype=torch.int32, device=device)}
    if cfg["op"] == "scores":
        return {"sum": torch.full((rows,), -1, dtype=torch.int64, device=device),
                "max": torch.full((rows,), float("nan"), device=device),
                "logit": torch.full((rows,), 7.0, device=device),
                "top_id": torch.full((rows, SCORES_TOP), -7, dtype=torch.int32, device=device),
                "top_logit": torch.full((rows, SCORES_TOP), 7.0, device=device)}
    if cfg["op"] == "splitbf16":
        return {"hi": torch.full((rows, d), float("nan"), dtype=torch.bfloat16, device=device),
                "lo": torch.full((rows, d), float("nan"), dtype=torch.bfloat16, device=device)}
    if cfg["op"] == "concat":
        return {"y": torch.full((rows, d + cfg["second"]), float("nan"), device=device)}
    if cfg["op"] == "splitrope":
        h = cfg["heads"]
        out["q_nope"] = torch.full((rows, h, cfg["nope"]), float("nan"), device=device)
        out["q_pe"] = torch.full((rows, h, cfg["rope"]), float("nan"), device=device)
        return out
    if cfg["op"] == "latent":
        if cfg["append"] and cfg["fp8_cache"]:
            out["out"] = torch.full((rows, fp8_row_bytes(d, cfg["rope"])[2]), 0xA5, dtype=torch.uint8, device=device)
        elif cfg["append"]:
            element = torch.bfloat16 if cfg["bf16_cache"] else torch.float32
            out["out"] = torch.full((rows, d + cfg["rope"]), float("nan"), dtype=element, device=device)
        return out
    if cfg["op"] == "embed":
        out["out"] = torch.full((rows, d), float("nan"), device=device)
    if cfg["keep"]:
        out["y"] = torch.full((rows, d), float("nan"), device=device)
    if cfg["quantize"]:
        out["q"] = torch.full((rows, d), 0x7F, dtype=torch.uint8, device=device)
        out["scale"] = torch.full((rows, math.ceil(d / GROUP)), float("nan"), device=device)
    return out


def arguments(cfg, inputs, outs):
    key = "mlaprefill" if cfg["op"] == "mladecode" and cfg["prefill"] else cfg["op"]
    order = {"embed": ["table", "ids", "out"], "latent": ["latent", "w", "k_pe", "positions", "cache", "rope", "table", "out"],
             "splitrope": ["y", "positions", "rope", "q_nope", "q_pe"], "copy": ["x", "y"], "gatherfp8": ["x", "x_scale", "sorted", "q", "scale"], "route": ["parts", "bias", "idx", "w_out"],
             "routelogits": ["x", "gate", "parts"],
             "mladecode": ["q_nope", "q_pe", "cache", "positions", "kv_b", "kv_b_scale", "q", "scale"],
             "mlaprefill": ["q_nope", "q_pe", "cache", "kv_b", "kv_b_scale", "q", "scale"],
             "dispatch": ["idx", "w", "offsets", "sorted", "rw"],
             "splitbf16": ["x", "hi", "lo"], "concat": ["x1", "x2", "y"], "argmax": ["x", "idx"], "sample": ["x", "temperature", "top_p", "top_k", "min_p", "uniform", "idx"],
             "scores": ["x", "token", "sum", "max", "logit", "top_id", "top_logit"],
             "mlakeys": ["kv", "cache", "k", "vv"], "mlaqueries": ["q_nope", "q_pe", "q"]}.get(
        key, ["x", "w", "y", "q", "scale"])
    args = []
    for name in order:
        t = inputs.get(name, outs.get(name))
        if t is not None:
            args += memref_args(t)
    return args


def check(cfg, inputs, outs):
    """Errors (strings) of the kernel's outputs against the references."""
    errors = []
    if cfg["op"] == "mladecode":
        want = mla_decode_reference(cfg, inputs["q_nope"], inputs["q_pe"], inputs["cache"], inputs.get("positions"),
                                    inputs["kv_b"], inputs["kv_b_scale"])
        return quantized_errors(want, outs)
    if cfg["op"] == "routelogits":
        want = route_parts_reference(cfg, inputs["x"], inputs["gate"].float())
        # Sequential f32 sums of up to 448 products: within 1e-5 of the sum of their magnitudes.
        bound = route_parts_reference(cfg, inputs["x"].abs(), inputs["gate"].float().abs()) * 1e-5 + 1e-30
        got = outs["parts"].double()
        if not torch.isfinite(got).all():
            errors.append("routelogits: pieces left unwritten")
        elif ((got - want).abs() > bound).any():
            errors.append(f"routelogits: pieces off by up to {float((got - want).abs().max()):.3g}")
        return errors
    if cfg["op"] == "route":
        want_idx, want_w = route_reference(cfg, inputs["parts"], inputs["bias"])
        same = (outs["idx"].long() == want_idx).all(dim=1)
        # ex2.approx in the sigmoid may reorder near ties: rarely, and never more than that.
        if same.float().mean().item() < 0.99:
            errors.append(f"route: {int((~same).sum())} of {same.numel()} tokens chose other experts")
        if same.any():
            got, want = outs["w_out"][same].double(), want_w[same]
            if ((got - want).abs() > 1e-5 * want.abs() + 1e-7).any():
                errors.append("route: weights off by more than 1e-5")
        return errors
    if cfg["op"] == "dispatch":
        offsets, tokens, weights = dispatch_reference(cfg, inputs["idx"], inputs["w"])
        if outs["offsets"].tolist() != offsets:
            errors.append("dispatch: offsets differ")
        if outs["sorted"].flatten().tolist() != tokens:
            errors.append("dispatch: tokens of the sorted rows differ")
        if outs["rw"].flatten().tolist() != weights:
            errors.append("dispatch: weights of the sorted rows differ")
        return errors
    if cfg["op"] == "copy":
        return [] if torch.equal(outs["y"], inputs["x"]) else ["copy: rows differ"]
    if cfg["op"] in ("mlakeys", "mlaqueries"):
        for name, want in mla_heads_reference(cfg, inputs).items():
            if not torch.equal(outs[name], want):
                errors.append(f"{name}: {(outs[name] != want).sum().item()} of {want.numel()} values differ")
        return errors
    if cfg["op"] == "gatherfp8":
        tok = inputs["sorted"].flatten().long()
        errors = [] if torch.equal(outs["q"], inputs["x"][tok]) else ["gatherfp8: bytes differ"]
        return errors + ([] if torch.equal(outs["scale"], inputs["x_scale"][tok]) else ["gatherfp8: scales differ"])
    if cfg["op"] == "sample":
        want, nuclei = sample_reference(inputs["x"], inputs["temperature"], inputs["uniform"], inputs["top_p"],
                                        inputs["top_k"], inputs["min_p"], nuclei=True)
        got = outs["idx"].cpu().tolist()
        nan = torch.isnan(inputs["x"]).any(dim=1).tolist()
        # -2: left to the host, only for rows with a NaN, else for rows whose top k share their bins with
        # more than the kernel sorts, min-p rows (no top-k) whose weights in min-p's bin or above are more,
        # or other rows whose list is big.
        bad = [r for r, (a, b) in enumerate(zip(got, want))
               if a != b and not (a == -2 and (nan[r] or crowded(inputs, r, nuclei[r])))]
        return [f"sample: rows {bad[:8]} differ (got {[got[r] for r in bad[:4]]}, host {[want[r] for r in bad[:4]]})"] if bad else []
    if cfg["op"] == "scores":
        import numpy as np
        want_sum, want_max, want_logit, want_id, want_top = scores_reference(inputs["x"], inputs["token"])
        got_sum = outs["sum"].cpu().numpy().view("float64")
        bits = lambda a: a.view(np.uint64 if a.dtype.itemsize == 8 else np.uint32)
        same = lambda a, b: (bits(a) == bits(b)) | (np.isnan(a) & np.isnan(b))
        errors = []
        for what, got, want in [("sum", got_sum, want_sum), ("max", outs["max"].cpu().numpy(), want_max),
                                ("logit", outs["logit"].cpu().numpy(), want_logit)]:
            bad = np.flatnonzero(~same(got, want))
            if len(bad):
                errors.append(f"scores: {what} of rows {bad[:8].tolist()} differ (got {got[bad[:3]].tolist()}, "
                              f"host {want[bad[:3]].tolist()})")
        got_id, got_top = outs["top_id"].cpu().numpy(), outs["top_logit"].cpu().numpy()
        # The most probable tokens: the same ids, and where there is one the same logit's bits.
        bad = np.flatnonzero((got_id != want_id).any(axis=1) | ((got_id >= 0) & ~same(got_top, want_top)).any(axis=1))
        if len(bad):
            errors.append(f"scores: most probable tokens of rows {bad[:8].tolist()} differ "
                          f"(got {got_id[bad[0]].tolist()}, host {want_id[bad[0]].tolist()})")
        return errors
    if cfg["op"] == "argmax":
        want = argmax_reference(inputs["x"])
        bad = (outs["idx"].long() != want).sum().item()
        return [f"argmax: {bad} rows differ"] if bad else []
    if cfg["op"] == "concat":
        want = torch.cat([inputs["x1"], inputs["x2"]], dim=1)
        return [] if torch.equal(outs["y"], want) else ["concat: rows differ"]
    if cfg["op"] == "splitbf16":
        hi = inputs["x"].to(torch.bfloat16)  # round to nearest even, as the kernel
        lo = (inputs["x"] - hi.float()).to(torch.bfloat16)
        errors = []
        if not torch.equal(outs["hi"], hi):
            errors.append("hi: not x rounded to bf16")
        if not torch.equal(outs["lo"], lo):
            errors.append("lo: not the rest rounded to bf16")
        return errors
    if cfg["op"] == "splitrope":
        rows, h, n, r = inputs["y"].shape[0], cfg["heads"], cfg["nope"], cfg["rope"]
        heads = inputs["y"].view(rows, h, n + r)
        if not torch.equal(outs["q_nope"], heads[:, :, :n]):
            errors.append("q_nope: not the nope columns")
        pos = inputs["positions"].repeat_interleave(h)
        want = rotate(cfg, heads[:, :, n:].reshape(rows * h, r), pos, inputs["rope"]).view(rows, h, r)
        bad = ((outs["q_pe"].double() - want).abs() > 1e-5 * want.abs() + 1e-6) | outs["q_pe"].isnan()
        if bad.any():
            errors.append(f"q_pe: {bad.sum().item()} of {bad.numel()} values off")
        return errors
    if cfg["op"] == "silumul":
        d = cfg["d"]
        x = inputs["x"].double()
        y = torch.nn.functional.silu(x[:, :d]) * x[:, d:]
        if cfg["keep"]:
            # ex2.approx on the GPU: a few ulp.
            bad = ((outs["y"].double() - y).abs() > 1e-5 * y.abs() + 1e-6) | outs["y"].isnan()
            if bad.any():
                errors.append(f"y: {bad.sum().item()} of {bad.numel()} values off")
        if cfg["quantize"]:
            errors += quantized_errors(y, outs)
        return errors
    if cfg["op"] == "latent":
        want = latent_reference(cfg, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
        if cfg["append"]:
            cached = inputs["cache"].shape[0]
            if not torch.equal(outs["out"][:cached], inputs["cache"]):
                errors.append("the cached rows are not copied unchanged")
            got = outs["out"][cached:]
        else:
            # The kernel writes the cache in place: `check` sees it after the launch (a pool: the
            # sequences' pages through the table).
            b = torch.arange(want.shape[0], device=want.device)
            if "table" in inputs:
                b = inputs["table"][:, 0].long()
            got = inputs["cache"][b, inputs["positions"]]
        if cfg["fp8_cache"]:
            d, g = cfg["d"], cfg["d"] // GROUP
            got, s = fp8_rows_decoded(d, cfg["rope"], got)
            amax = want[:, :d].abs().view(-1, g, GROUP).amax(dim=2).clamp(min=1e-4)
            pow2 = torch.frexp(s)[0] == 0.5
            fits = (amax <= E4M3_MAX * s * (1 + 1e-5)) & (amax > E4M3_MAX / 2 * s * (1 - 1e-5))
            if not bool((pow2 & fits).all()):
                errors.append(f"fp8 scales: {(~(pow2 & fits)).sum().item()} of {s.numel()} not the least power "
                              "of two that fits")
        got = got.double()
        # fma contraction on the GPU may round the rope's products once: 1e-5 relative, 1e-6 absolute
        # (bf16 caches: then rounded to nearest even, the f32 difference may cross a tie: 2^-8; fp8
        # rows: the latent within one e4m3 step, 2^-3, of the reference, the rope key as bf16's).
        rel = 2.0 ** -8 if cfg["bf16_cache"] or cfg["fp8_cache"] else 1e-5
        rel = torch.full_like(want, rel)
        if cfg["fp8_cache"]:
            rel[:, :cfg["d"]] = 2.0 ** -3
        bad = ((got - want).abs() > rel * want.abs() + 1e-6) | got.isnan()
        if bad.any():
            errors.append(f"latent rows: {bad.sum().item()} of {bad.numel()} values off")
        return errors
    if cfg["op"] == "embed":
        table, ids = inputs["table"].float(), inputs["ids"]
        ok = (ids >= 0) & (ids < table.shape[0])
        want = torch.where(ok[:, None], table[ids.clamp(0, table.shape[0] - 1)], torch.zeros_like(outs["out"]))
        if not torch.equal(outs["out"], want):
            errors.append(f"embed: {(outs['out'] != want).sum().item()} values differ")
        return errors
    y = rms_norm_reference(inputs["x"], inputs["w"].float(), cfg["eps"])
    if cfg["keep"]:
        got = outs["y"].double()
        bad = ((got - y).abs() > 1e-5 * y.abs() + 1e-30) | got.isnan()
        if bad.any():
            errors.append(f"y: {bad.sum().item()} of {bad.numel()} values off by more than 1e-5 relative")
    if cfg["quantize"]:
        errors += quantized_errors(y, outs)
    return errors


def quantized_errors(y, outs):
    """The kernel's 1x128 e4m3 bytes and scales against the reference quantization of y."""
    errors = []
    q, s = quantize_reference(y.float())
    bad = ((outs["scale"] - s).abs() > 1e-5 * s) | outs["scale"].isnan()
    if bad.any():
        errors.append(f"scale: {bad.sum().item()} of {bad.numel()} off by more than 1e-5 relative")
    differ = outs["q"] != q
    if differ.sum().item() * 100 > differ.numel():
        errors.append(f"q: {differ.sum().item()} of {differ.numel()} bytes differ (more than 1 %)")
    far = e4m3_steps_apart(outs["q"], q) > 1
    if far.any():
        at = far.nonzero()[0].tolist()
        a, b = outs["q"][tuple(at)].item(), q[tuple(at)].item()
        value = lambda byte: torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
        errors.append(f"q: {int(far.sum())} bytes more than one e4m3 step from the reference (first at "
                      f"{tuple(at)}: 0x{a:02x} = {value(a):g} for 0x{b:02x} = {value(b):g})")
    return errors


def e4m3_steps_apart(a, b):
    """How many e4m3 steps apart bytes a and b (uint8 tensors of one shape) are, at least: |a - b| over
    the step of the e4m3 grid at the smaller magnitude — 2^(e - 3) in binade [2^e, 2^(e + 1)), 2^-9
    among the subnormals (below 2^-6), where a bound relative to the value (1/8) takes a one-step flip
    near zero for many. Neighbours, across a binade or zero too, are exactly 1 apart. NaN bytes are
    infinitely far."""
    x, y = (t.view(torch.float8_e4m3fn).double() for t in (a, b))
    m = torch.minimum(x.abs(), y.abs())
    step = torch.pow(2.0, torch.floor(torch.log2(m.clamp(min=2.0 ** -6))) - 3)
    steps = (x - y).abs() / step
    return torch.where(x.isnan() | y.isnan(), torch.full_like(steps, math.inf), steps)


def mla_heads_reference(cfg, inputs):
    """MLA prefill's head-major bf16 rows (row h rows + s of head h), rounded to nearest even as the
    kernels round: keys [kv nope | the cache row's rope key] and values (mlakeys), or queries [q_nope |
    q_pe] (mlaqueries)."""
    h, n, r = cfg["heads"], cfg["nope"], cfg["rope"]
    heads_major = lambda t: t.to(torch.bfloat16).permute(1, 0, 2).reshape(-1, t.shape[2])
    if cfg["op"] == "mlaqueries":
        return {"q": heads_major(torch.cat([inputs["q_nope"], inputs["q_pe"]], dim=2))}
    rows = inputs["kv"].shape[0]
    kv = inputs["kv"].view(rows, h, n + cfg["v"])
    cache = inputs["cache"]
    if cfg["cache"] == "fp8":
        rope_at = fp8_row_bytes(cfg["d"], r)[1]
        rope = cache[:, rope_at:rope_at + 2 * r].contiguous().view(torch.bfloat16)
    else:
        rope = cache[:, cfg["d"]:cfg["d"] + r].to(torch.bfloat16)
    keys = torch.cat([kv[:, :, :n].to(torch.bfloat16), rope[:, None, :].expand(rows, h, r)], dim=2)
    return {"k": heads_major(keys), "vv": heads_major(kv[:, :, n:])}


# The host sampler's exp (models/src/sampling.rs, EXP_F32), as bits: log2 e, ln 2 in two parts, the
# rounding constant 1.5 2^23, the clamps, then the polynomial's coefficients.
EXP_F32_BITS = [0x3FB8AA3B, 0x3F318000, 0xB95E8083, 0x4B400000, 0xC2D00000, 0x42B20000,
                0x39506968, 0x3AB743CE, 0x3C088908, 0x3D2AA9C1, 0x3E2AAAAA, 0x3F000000]


def exp_host(x):
    """`sampling::exp` over a float32 array, operation for operation (numpy's float32 ops round each
    result; none is fused): the clamps, n = round(x log2 e) by adding and subtracting 1.5 2^23, the
    reduction by n ln 2 in two parts, Horner's rule, 2^n as two powers of two, NaN kept."""
    import numpy as np
    log2e, ln2_hi, ln2_lo, rnd, low, high, *poly = np.array(EXP_F32_BITS, dtype=np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        c = np.where(x < low, low, x)
        c = np.where(c > high, high, c)
        t = c * log2e + rnd
        n = t - rnd
        r = (c - n * ln2_hi) - n * ln2_lo
        p = np.full_like(r, poly[0])
        for k in poly[1:]:
            p = p * r + k
        er = (p * r) * r + r + np.float32(1.0)
        ni = t.view(np.int32) - np.int32(0x4B400000)
        a = ni >> 1
        b = ni - a
        pow2 = lambda k: ((k + 127).astype(np.uint32) << np.uint32(23)).view(np.float32)
        y = er * pow2(a) * pow2(b)
    return np.where(np.isnan(x), x, y).astype(np.float32)


def _draw_at(pairs, u):
    """The host's `draw_at` over (token, weight) pairs in their order: blocks of 256 summed in 8 running
    f64 sums (then the rest), the blocks added, r = u * total, blocks passed while r >= their sum, the
    block's pairs walked (r < w picks, else r -= w), on to the next where rounding runs past one; the last
    pair's token past the end."""
    import numpy as np
    sums = [_draw_at_block_sum(np.array([w for _, w in pairs[b0:b0 + 256]], dtype=np.float64))
            for b0 in range(0, len(pairs), 256)]
    total = 0.0
    for s in sums:
        total += s
    r = float(u) * total
    for b, s in enumerate(sums):
        if r >= s:
            r -= s
            continue
        for tok, w in pairs[b * 256:b * 256 + 256]:
            if r < float(w):
                return tok
            r -= float(w)
    return pairs[-1][0] if pairs else 0


# The host's exp64 (models/src/sampling.rs, EXP_F64): log2 e, ln 2 in two parts, the rounding constant
# 1.5 2^52, the clamps, then the polynomial's coefficients (1/13! .. 1/2!).
EXP_F64 = dict(log2e=1.4426950408889634, ln2_hi=0.6931471803691238, ln2_lo=1.9082149292705877e-10,
               round=6755399441055744.0, low=-746.0, high=710.0,
               poly=[1.6059043836821613e-10, 2.08767569878681e-9, 2.505210838544172e-8, 2.755731922398589e-7,
                     2.7557319223985893e-6, 2.48015873015873e-5, 1.984126984126984e-4, 1.388888888888889e-3,
                     8.333333333333333e-3, 4.1666666666666664e-2, 1.6666666666666666e-1, 0.5])
SCORE_LANES = 256
SCORES_TOP = 20


def exp64_host(x):
    """`sampling::exp64` over a float64 array, operation for operation (numpy's float64 ops round each result;
    none is fused): the clamps, n by adding and subtracting 1.5 2^52, the reduction by n ln 2 in two parts,
    Horner's rule, 2^n as 2^a 2^(n - a) from the bits of k + round, NaN kept."""
    import numpy as np
    e = EXP_F64
    rnd = np.float64(e["round"])
    with np.errstate(all="ignore"):
        c = np.where(x < e["low"], e["low"], x)
        c = np.where(c > e["high"], e["high"], c)
        n = (c * e["log2e"] + rnd) - rnd
        r = (c - n * e["ln2_hi"]) - n * e["ln2_lo"]
        p = np.full_like(r, e["poly"][0])
        for k in e["poly"][1:]:
            p = p * r + k
        er = (p * r) * r + r + 1.0
        a = ((n * 0.5 - 0.25) + rnd) - rnd
        rbits = np.array([rnd]).view(np.int64)[0]
        pow2 = lambda k: (((k + rnd).view(np.int64) - rbits + 1023) << 52).view(np.float64)
        y = er * pow2(a) * pow2(n - a)
    return np.where(np.isnan(x), x, y)


def scores_reference(x, token):
    """`sampling::RowScore::of` per row: the largest logit (NaNs passed over, -inf for none), `exp_sum` — column
    c's exp64(f64(l - max)) into running sum c % 256 in column order, then the sums pairwise (i + h into i, h =
    128 .. 1) — and the token's logit (NaN past the row); and `top_k(row, 20)`: the 20 largest in f32's total
    order (NaN above infinity, -0 below +0), ties to the lower id (-1 past the row's tokens). numpy arrays:
    sums (f64), maxima, logits (f32), ids [rows, 20] (i32), their logits [rows, 20] (f32)."""
    import numpy as np
    x = x.detach().cpu().numpy().astype(np.float32)
    tokens = token.detach().cpu().numpy().astype(np.int64)
    rows, d = x.shape
    sums, maxes, logits = np.zeros(rows), np.zeros(rows, dtype=np.float32), np.zeros(rows, dtype=np.float32)
    top_ids = np.full((rows, SCORES_TOP), -1, dtype=np.int32)
    top_logits = np.zeros((rows, SCORES_TOP), dtype=np.float32)
    for i, (row, t) in enumerate(zip(x, tokens)):
        m = np.where(np.isnan(row), np.float32(-np.inf), row).max()
        with np.errstate(all="ignore"):
            terms = exp64_host((row - m).astype(np.float32).astype(np.float64))
        padded = np.zeros(-(-d // SCORE_LANES) * SCORE_LANES)
        padded[:d] = terms
        lanes = np.cumsum(padded.reshape(-1, SCORE_LANES), axis=0)[-1]
        while len(lanes) > 1:
            lanes = lanes[:len(lanes) // 2] + lanes[len(lanes) // 2:]
        sums[i], maxes[i] = lanes[0], m
        logits[i] = row[t] if 0 <= t < d else np.float32(np.nan)
        bits = row.view(np.int32).astype(np.int64)
        key = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # f32 total order as integers
        order = np.lexsort((np.arange(d), -key))[:SCORES_TOP]
        top_ids[i, :len(order)], top_logits[i, :len(order)] = order, row[order]
    return sums, maxes, logits, top_ids, top_logits


def crowded(inputs, r, listed):
    """Whether the kernel may leave row r (a list of `listed` tokens before min-p) to the host: with a top k,
    where they share their weights' bins (bits' top 12) with more than the 2048 candidates it sorts; with
    min-p (no top k), where more weights lie in min-p's bin or above; else where the list is over 64."""
    import numpy as np
    k = int(inputs["top_k"][r])
    d = inputs["x"].shape[1]
    min_p = np.float32(inputs["min_p"][r].item()) if "min_p" in inputs else np.float32(0)
    if not 0 < k < d and not min_p > 0:
        return listed > 64
    row = inputs["x"][r].detach().cpu().numpy().astype(np.float32)
    t = np.float32(inputs["temperature"][r].item())
    with np.errstate(all="ignore"):
        bins = np.sort(exp_host((row - row.max()) / t).view(np.uint32) >> 20)[::-1]
    floor = bins[k - 1] if 0 < k < d else np.array([min_p], dtype=np.float32).view(np.uint32)[0] >> 20
    return int((bins >= floor).sum()) > min(2048, 1 << (d - 1).bit_length())


def sample_reference(x, temperature, uniform, top_p=None, top_k=None, min_p=None, nuclei=False):
    """`sampling::draw_plain` of each row (-1 where its temperature is not above 0): the largest logit
    (NaNs passed over), weights exp((l - m) / t) in f32; with every token weighed the draw over them in id
    order; with min-p alone, over those of at least min-p in id order; with a top-k below the row's width,
    the k most probable (ties: the lower id) and, at top-p below 1, of those the nucleus of their own draw
    total; else the row's nucleus: the tokens most probable first while their f64 sum in that order falls
    short of top-p times the row's total (its blocks' sums, as the draw takes them), and the one that
    reaches it (never: the k whole; the row's, -2); of the list, those of at least min-p; the draw over it
    in that order. With `nuclei`, also each row's list size before min-p (0 with every token weighed)."""
    import numpy as np
    x = x.detach().cpu().numpy().astype(np.float32)
    ts = temperature.detach().cpu().numpy().astype(np.float32)
    ps = np.ones(len(ts), dtype=np.float32) if top_p is None else top_p.detach().cpu().numpy().astype(np.float32)
    ks = np.zeros(len(ts), dtype=np.int64) if top_k is None else top_k.detach().cpu().numpy().astype(np.int64)
    ms = np.zeros(len(ts), dtype=np.float32) if min_p is None else min_p.detach().cpu().numpy().astype(np.float32)
    us = uniform.detach().cpu().view(torch.float64).numpy()
    rows, d = x.shape
    out, sizes = [], []
    for row, t, p, k, mp, u in zip(x, ts, ps, ks, ms, us):
        if not t > 0:
            out.append(-1)
            sizes.append(0)
            continue
        finite = np.where(np.isnan(row), np.float32(-np.inf), row)
        m = finite.max() if d else np.float32(-np.inf)
        with np.errstate(all="ignore"):
            w = exp_host((row - m) / t)
        topk = 0 < k < d
        if p >= 1 and not topk and not mp > 0:
            out.append(_draw_at(list(enumerate(w.astype(np.float64))), u))
            sizes.append(0)
            continue
        if np.isnan(w).any():
            out.append(-2)
            sizes.append(d)
            continue
        if p >= 1 and not topk:
            # Min-p alone: every token's weight in id order, thinned.
            out.append(_draw_at([(i, float(v)) for i, v in enumerate(w) if v >= mp], u))
            sizes.append(d)
            continue
        order = np.lexsort((np.arange(d), -w.astype(np.float64)))  # most probable first, ties: lower id
        if topk:
            pairs = [(int(i), float(w[i])) for i in order[:k]]
            total = 0.0
            for b0 in range(0, len(pairs), 256):
                total += _draw_at_block_sum(np.array([v for _, v in pairs[b0:b0 + 256]]))
        else:
            pairs = [(int(i), float(w[i])) for i in order]
            total = 0.0
            for b0 in range(0, d, 256):
                total += _draw_at_block_sum(w[b0:b0 + 256])
        kept = pairs
        if p < 1:
            want = float(np.float64(p)) * total
            acc, kept = 0.0, []
            for i, v in pairs:
                acc += v
                kept.append((i, v))
                if acc >= want:
                    break
            if acc < want and not topk:
                out.append(-2)
                sizes.append(len(kept))
                continue
        sizes.append(len(kept))
        out.append(_draw_at([(i, v) for i, v in kept if v >= mp], u))
    return (out, sizes) if nuclei else out


def _draw_at_block_sum(blk):
    """One block's sum as `weight_sum` takes it: 8 running f64 sums over whole chunks of 8, in order,
    then the rest."""
    import numpy as np
    blk = blk.astype(np.float64)
    full = len(blk) // 8
    lanes = np.cumsum(blk[:full * 8].reshape(full, 8), axis=0)[-1] if full else np.zeros(8)
    s = 0.0
    for lane in lanes:
        s += float(lane)
    for v in blk[full * 8:]:
        s += float(v)
    return s


def argmax_reference(x):
    """Per row, the index of the largest value in f32's total order (Rust's total_cmp: NaN above +inf,
    -0 below +0), the first one on ties (torch.argmax over the integer keys returns the first maximum)."""
    bits = x.contiguous().view(torch.int32).long()
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return key.argmax(dim=1)


def bytes_moved(cfg, rows):
    d, wb = cfg["d"], 2 if cfg["weight"] == "bf16" else 4
    if cfg["op"] == "mladecode":
        # The visible cache rows (f32 here), read once per head block: what a sequence's cache costs.
        return rows * (SLOTS // 2) * (d + cfg["rope"]) * 4
    if cfg["op"] == "routelogits":
        return rows * d * 4 + cfg["experts"] * d * wb + rows * SPLITS * cfg["experts"] * 4
    if cfg["op"] == "route":
        return rows * cfg["pieces"] * cfg["experts"] * 4 + rows * cfg["top_k"] * 8
    if cfg["op"] == "dispatch":
        return rows * cfg["top_k"] * 8 + rows * (cfg["top_k"] + cfg["shared"]) * 8
    if cfg["op"] == "copy":
        return 2 * rows * d * 4
    if cfg["op"] == "mlakeys":
        h, n, r, v = cfg["heads"], cfg["nope"], cfg["rope"], cfg["v"]
        kv_bytes = rows * h * (n + v) * wb
        rope_bytes = rows * r * {"f32": 4, "bf16": 2, "fp8": 2}[cfg["cache"]]
        return kv_bytes + rope_bytes + rows * h * (n + r + v) * 2
    if cfg["op"] == "mlaqueries":
        return rows * d * (4 + 2)
    if cfg["op"] == "gatherfp8":
        return 2 * rows * GATHER_WIDTH * (d + d // GROUP * 4) + rows * GATHER_WIDTH * 4
    if cfg["op"] == "argmax":
        return rows * d * 4 + rows * 4
    if cfg["op"] == "scores":
        # The logits once (read twice: the maximum, then the terms), the tokens and the results.
        return rows * d * 4 + rows * (20 + 8 * SCORES_TOP)
    if cfg["op"] == "sample":
        # The logits once (the kernel reads them twice: the maximum, then the weights, the second
        # mostly from L2), the draws and the tokens.
        return rows * d * 4 + rows * 20
    if cfg["op"] == "splitbf16":
        return rows * d * (4 + 2 + 2)
    if cfg["op"] == "concat":
        return 2 * rows * (d + cfg["second"]) * 4
    if cfg["op"] == "splitrope":
        return 2 * rows * d * 4 + rows * 8
    if cfg["op"] == "silumul":
        out = rows * d * 4 if cfg["keep"] else rows * d + rows * math.ceil(d / GROUP) * 4
        return rows * 2 * d * 4 + out
    if cfg["op"] == "latent":
        c, cb = d + cfg["rope"], 2 if cfg["bf16_cache"] else 4
        new = rows if not cfg["append"] else max(1, rows // 2)
        written = new * fp8_row_bytes(d, cfg["rope"])[2] if cfg["fp8_cache"] else new * c * cb
        moved = new * (d + cfg["rope"] + cfg["rope"]) * 4 + new * 8 + d * wb + written
        return moved + (2 * (rows - new) * c * cb if cfg["append"] else 0)
    if cfg["op"] == "embed":
        return rows * d * (wb + 4) + rows * 8
    total = rows * d * 4 + d * wb
    if cfg["keep"]:
        total += rows * d * 4
    if cfg["quantize"]:
        total += rows * d + rows * math.ceil(d / GROUP) * 4
    return total


def run(drv, func, cfg, rows):
    inputs, outs = problem(cfg, rows, "cuda"), outputs(cfg, rows, "cuda")
    args = arguments(cfg, inputs, outs)
    drv.launch(func, grid(cfg, rows), cfg["threads"], 0, args, cfg["name"])
    torch.cuda.synchronize()
    return inputs, outs, args


def grid(cfg, rows):
    """Blocks per launch: one per row (routing: per `tokens` rows, its logits per split and expert tile too),
    one for the dispatch's sort."""
    if cfg["op"] == "mladecode":
        return rows * cfg["heads"]
    if cfg["op"] == "routelogits":
        return -(-rows // cfg["tokens"]) * SPLITS * -(-cfg["experts"] // EXPERT_TILE)
    if cfg["op"] == "route":
        return -(-rows // cfg["tokens"])
    if cfg["op"] == "gatherfp8":
        return rows * GATHER_WIDTH
    return 1 if cfg["op"] == "dispatch" else rows


def median_us(drv, func, cfg, rows, args, reps=50):
    """The kernel's median GPU time in µs (`gemm_check.median_ms`: L2 evicted, the host's launch
    overhead outside the events)."""
    return 1e3 * median_ms(lambda: drv.launch(func, grid(cfg, rows), cfg["threads"], 0, args, cfg["name"]), reps)


def self_test():
    cfg = parse("rows_rmsnorm_bf16_d1000_t128_eps1em6_y_q")
    assert cfg["eps"] == 1e-6 and cfg["keep"] and cfg["quantize"] and cfg["d"] == 1000
    assert parse("rows_embed_bf16_d7168_t256")["op"] == "embed"
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0], [float("nan"), 1e30, 0.0, 1.0], [-0.0, 0.0, -1.0, -0.0],
                      [float("-inf")] * 4])
    assert argmax_reference(x).tolist() == [1, 0, 1, 0], "total order, first maximum"
    assert problem(parse("rows_argmax_d300_t64"), 3, "cpu")["x"].shape == (3, 300)
    # Sampling's reference: exp within 2 ulp of the true value (the host's bound), 1 at 0, 0 far
    # below; a draw of 0 picks the first token, draws spread as the weights do.
    import numpy as np
    z = np.linspace(-85, 85, 20001, dtype=np.float32)
    e = exp_host(z).astype(np.float64)
    assert np.all(np.abs(e - np.exp(z.astype(np.float64))) <= 3e-7 * np.exp(z.astype(np.float64))), "exp"
    assert exp_host(np.float32([0.0, -200.0]))[0] == 1.0 and exp_host(np.float32([-200.0]))[0] == 0.0
    sp = parse("rows_sample_d1003_t64")
    assert sp["op"] == "sample" and sp["d"] == 1003
    inputs = problem(sp, 5, "cpu")
    picks, sizes = sample_reference(inputs["x"], inputs["temperature"], inputs["uniform"], inputs["top_p"],
                                    inputs["top_k"], inputs["min_p"], nuclei=True)
    assert picks[4] == -1 and all(0 <= p < 1003 for p in picks[:4]), picks
    assert sizes[1] >= 1 and sizes[0] == 0, sizes
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    draws = torch.arange(4000, dtype=torch.float64).add(0.5).div(4000)
    counts = [0] * 4
    for u in draws:
        counts[sample_reference(logits, torch.tensor([1.0]), u.reshape(1).view(torch.int64))[0]] += 1
    want = torch.tensor([0.0, 1.0, 2.0, 3.0]).softmax(0) * 4000
    assert all(abs(c - w) <= 2 for c, w in zip(counts, want.tolist())), (counts, want)
    assert sample_reference(logits, torch.tensor([1.0]), torch.tensor([0.0], dtype=torch.float64).view(torch.int64)) == [0]
    # Scores: softmax's denominator near torch's logsumexp (l - max is taken in f32, as the host does), the
    # NaN row's NaN, the tokens' logits.
    sc = parse("rows_scores_d1003_t256")
    assert sc["op"] == "scores" and sc["threads"] == 256
    inputs = problem(sc, 12, "cpu")
    sums, maxes, token_logits, top_ids, top_logits = scores_reference(inputs["x"], inputs["token"])
    assert top_ids[0, 0] == int(inputs["x"][0].argmax()) and top_logits[0, 0] == maxes[0]
    assert np.all(np.diff(top_logits[0]) <= 0)
    lse = torch.logsumexp(inputs["x"].double(), dim=1).numpy()
    for r in (0, 3, 4):
        assert abs(np.log(sums[r]) + maxes[r] - lse[r]) <= 1e-6, (r, sums[r], lse[r])
    assert np.isnan(sums[1]) and np.isnan(token_logits[5]) and np.isnan(token_logits[6])
    assert token_logits[0] == inputs["x"][0, inputs["token"][0]]
    assert exp64_host(np.array([0.0]))[0] == 1.0 and np.all(np.abs(exp64_host(np.linspace(-700, 700, 10001)) /
                                                                   np.exp(np.linspace(-700, 700, 10001)) - 1) < 1e-15)
    # Min-p 0.3 keeps the tokens of weights e^-1 and 1, drawn in id order as their weights go.
    counts = [0] * 4
    for u in draws:
        pick = sample_reference(logits, torch.tensor([1.0]), u.reshape(1).view(torch.int64), min_p=torch.tensor([0.3]))
        counts[pick[0]] += 1
    kept = torch.tensor([0.0, 0.0, np.exp(-1.0), 1.0])
    want = kept / kept.sum() * 4000
    assert all(abs(c - w) <= 2 for c, w in zip(counts, want.tolist())), (counts, want)
    inputs = problem(cfg, 5, "cpu")
    y = rms_norm_reference(inputs["x"], inputs["w"].float(), cfg["eps"])
    ms = (y / inputs["w"].double()).pow(2).mean(dim=1)
    x2 = inputs["x"].double().pow(2).mean(dim=1)
    assert torch.allclose(ms, x2 / (x2 + cfg["eps"]), rtol=1e-9), "normalized rows: mean square x^2 / (x^2 + eps)"
    q, s = quantize_reference(y.float())
    assert abs(s[0, 0].item() - 1e-4 / E4M3_MAX) < 1e-12, "a group of zeros takes the floor scale"
    deq = q.view(torch.float8_e4m3fn).float() * s.repeat_interleave(GROUP, dim=1)[:, :1000]
    assert ((deq - y.float()).norm() / y.float().norm()).item() < 0.05
    outs = {"y": y.float(), "q": q.clone(), "scale": s.clone()}
    assert check(cfg, inputs, outs) == [], "the references pass their own check"
    outs["q"][1, 3] ^= 0x40
    assert check(cfg, inputs, outs), "a wrong byte is caught"
    # One e4m3 step, wherever on the grid: across a binade (0x38 = 1 and 0x37 = 0.9375), among the
    # subnormals (0x02 = 2^-8 and 0x03 = 3 * 2^-9, 33 % apart), to zero and across it (-0 and 2^-9);
    # two steps (1 and 0.875, 3 * 2^-9 and 2^-9, 2^-9 and -2^-9) are not; NaN (0x7F) is never.
    steps = e4m3_steps_apart(torch.tensor([0x38, 0x02, 0x01, 0x80, 0x38, 0x03, 0x01, 0x7F], dtype=torch.uint8),
                             torch.tensor([0x37, 0x03, 0x00, 0x01, 0x36, 0x01, 0x81, 0x7E], dtype=torch.uint8))
    assert steps.tolist()[:6] == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0], steps
    assert steps[6] == 2.0 and steps[7] == math.inf, steps
    outs["q"][1, 3] ^= 0x40
    small = (outs["q"] & 0x7F) < 0x08
    assert small.any(), "the test rows have subnormal bytes"
    at = small.nonzero()[0].tolist()
    byte = outs["q"][tuple(at)].item()
    outs["q"][tuple(at)] = byte + 1 if byte & 0x07 != 0x07 else byte - 1  # one subnormal step
    assert check(cfg, inputs, outs) == [], "a subnormal byte one step off passes"
    outs["q"][tuple(at)] = byte + 4 if byte & 0x07 < 4 else byte - 4  # four subnormal steps
    assert check(cfg, inputs, outs), "a subnormal byte several steps off is caught"
    outs["q"][tuple(at)] = byte
    emb = parse("rows_embed_f32_d64_t32")
    inputs = problem(emb, 4, "cpu")
    table, ids = inputs["table"], inputs["ids"]
    out = torch.stack([table[i] if 0 <= i < table.shape[0] else torch.zeros(64) for i in ids.tolist()])
    assert check(emb, inputs, {"out": out}) == []
    lat = parse("rows_latent_bf16_d512_r64_t64_eps1em6_il_write")
    assert lat["interleave"] and not lat["append"] and lat["rope"] == 64
    inputs = problem(lat, 3, "cpu")
    want = latent_reference(lat, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
    k = inputs["k_pe"].double()
    assert torch.allclose(want[:, 512:].norm(dim=1), k.norm(dim=1), rtol=1e-6), "rope rotates (norms kept)"
    cache = inputs["cache"].clone()
    cache[torch.arange(3), inputs["positions"]] = want.float()
    assert check(lat, {**inputs, "cache": cache}, {}) == []
    cache[1, inputs["positions"][1], 600 - 77] += 1.0
    assert check(lat, {**inputs, "cache": cache}, {}), "a wrong cache value is caught"
    app = parse("rows_latent_f32_d512_r64_t64_eps1em6_append")
    inputs = problem(app, 6, "cpu")
    want = latent_reference(app, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
    assert check(app, inputs, {"out": torch.cat([inputs["cache"], want.float()])}) == []
    # bf16 caches: rounded rows pass, a value a few bf16 steps off does not.
    app16 = parse("rows_latent_bf16_d512_r64_t64_eps1em6_il_appendbf16")
    assert app16["bf16_cache"] and app16["append"] and not app["bf16_cache"]
    inputs = problem(app16, 6, "cpu")
    assert inputs["cache"].dtype == torch.bfloat16
    want = latent_reference(app16, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
    out16 = torch.cat([inputs["cache"], want.to(torch.bfloat16)])
    assert check(app16, inputs, {"out": out16}) == []
    out16[-1, 3] = (out16[-1, 3].float() * 1.05).to(torch.bfloat16)
    assert check(app16, inputs, {"out": out16}), "a wrong bf16 cache value is caught"
    lat16 = parse("rows_latent_bf16_d512_r64_t64_eps1em6_il_writebf16")
    inputs = problem(lat16, 3, "cpu")
    want = latent_reference(lat16, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
    cache = inputs["cache"].clone()
    pages = inputs["table"][:, 0].long()
    assert sorted(pages.tolist()) == [0, 1, 2]
    cache[pages, inputs["positions"]] = want.to(torch.bfloat16)
    assert check(lat16, {**inputs, "cache": cache}, {}) == []
    unpaged = inputs["cache"].clone()
    unpaged[torch.arange(3), inputs["positions"]] = want.to(torch.bfloat16)
    if not torch.equal(pages, torch.arange(3)):
        assert check(lat16, {**inputs, "cache": unpaged}, {}), "rows written past the table are caught"
    lat8 = parse("rows_latent_bf16_d512_r64_t64_eps1em6_il_writefp8")
    assert lat8["fp8_cache"] and not lat8["bf16_cache"] and fp8_row_bytes(512, 64) == (512, 528, 656)
    inputs = problem(lat8, 3, "cpu")
    assert inputs["cache"].shape == (3, SLOTS, 656) and inputs["cache"].dtype == torch.uint8
    want = latent_reference(lat8, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
    cache = inputs["cache"].clone()
    pages = inputs["table"][:, 0].long()
    cache[pages, inputs["positions"]] = fp8_pack_reference(512, 64, want)
    assert check(lat8, {**inputs, "cache": cache}, {}) == []
    bad = cache.clone()
    bad[pages[1], inputs["positions"][1], 5] ^= 0x08  # one e4m3 byte off by a factor of 2
    assert check(lat8, {**inputs, "cache": bad}, {}), "a wrong fp8 byte is caught"
    bad = cache.clone()
    bad[pages[0], inputs["positions"][0], 512] += 1  # group 0's scale no longer a power of two
    assert check(lat8, {**inputs, "cache": bad}, {}), "a wrong fp8 scale is caught"
    app8 = parse("rows_latent_bf16_d512_r64_t64_eps1em6_il_appendfp8")
    inputs = problem(app8, 6, "cpu")
    assert inputs["cache"].shape == (3, 656) and inputs["cache"].dtype == torch.uint8
    assert outputs(app8, 6, "cpu")["out"].shape == (6, 656)
    want = latent_reference(app8, inputs["latent"], inputs["w"], inputs["k_pe"], inputs["positions"], inputs["rope"])
    out8 = torch.cat([inputs["cache"], fp8_pack_reference(512, 64, want)])
    assert check(app8, inputs, {"out": out8}) == []
    out8[1, 7] ^= 1
    assert check(app8, inputs, {"out": out8}), "a changed cached row is caught"
    sr = parse("rows_splitrope_h4_n8_r6_t32_il")
    inputs = problem(sr, 3, "cpu")
    heads = inputs["y"].view(3, 4, 14)
    pe = rotate(sr, heads[:, :, 8:].reshape(12, 6), inputs["positions"].repeat_interleave(4), inputs["rope"])
    outs = {"q_nope": heads[:, :, :8].clone(), "q_pe": pe.float().view(3, 4, 6)}
    assert check(sr, inputs, outs) == []
    outs["q_pe"][2, 3, 5] += 0.5
    assert check(sr, inputs, outs), "a wrong rope value is caught"
    sw = parse("rows_silumul_d300_t64_q")
    inputs = problem(sw, 2, "cpu")
    x = inputs["x"].double()
    q, s = quantize_reference((torch.nn.functional.silu(x[:, :300]) * x[:, 300:]).float())
    assert check(sw, inputs, {"q": q, "scale": s}) == []
    # MLA prefill's head-major rows: the references' layout, and a wrong value caught.
    for name in ("rows_mlakeys_h3_n8_r64_v12_kv128_t32_bf16_c8", "rows_mlakeys_h3_n8_r64_v12_kv128_t32_c16",
                 "rows_mlakeys_h3_n8_r64_v12_kv128_t32", "rows_mlaqueries_h3_n8_r64_t32"):
        mk = parse(name)
        inputs = problem(mk, 5, "cpu")
        want = mla_heads_reference(mk, inputs)
        if mk["op"] == "mlakeys":
            assert mk["weight"] == ("bf16" if "_bf16" in name else "f32") and want["vv"].shape == (15, 12)
            kv = inputs["kv"].view(5, 3, 20)
            assert torch.equal(want["k"][2 * 5 + 4, :8], kv[4, 2, :8].to(torch.bfloat16)), "head 2, row 4"
            assert torch.equal(want["vv"][5 + 1], kv[1, 1, 8:].to(torch.bfloat16))
            rope = mla_heads_reference(dict(mk, cache="f32"), {**inputs, "cache": torch.randn(5, 128 + 64)})["k"]
            assert not torch.equal(rope, want["k"]), "the rope key comes from the cache"
        else:
            assert torch.equal(want["q"][5 + 2, 8:], inputs["q_pe"][2, 1].to(torch.bfloat16)), "head 1, row 2"
        assert check(mk, inputs, {k: v.clone() for k, v in want.items()}) == []
        bad = {k: v.clone() for k, v in want.items()}
        first = next(iter(bad))
        bad[first][4, 3] += 1.0
        assert check(mk, inputs, bad), f"{name}: a wrong value is caught"
    cp = parse("rows_copy_d7168_t256")
    inputs = problem(cp, 2, "cpu")
    assert check(cp, inputs, {"y": inputs["x"].clone()}) == [] and check(cp, inputs, {"y": inputs["x"] + 1})
    rl = parse("rows_routelogits_bf16_d7168_e256_t256")
    rl4 = parse("rows_routelogits_bf16_d7168_e256_t256_b4")
    assert rl["tokens"] == 1 and rl4["tokens"] == 4 and grid(rl, 17) == 17 * 64 and grid(rl4, 17) == 5 * 64
    small_logits = dict(rl, d=100, experts=16)
    inputs = problem(small_logits, 3, "cpu")
    parts = route_parts_reference(small_logits, inputs["x"], inputs["gate"].float())
    full = inputs["x"].double() @ inputs["gate"].double().T
    assert torch.allclose(parts.view(3, SPLITS, 16).sum(dim=1), full), "the pieces sum to the logits"
    assert check(small_logits, inputs, {"parts": parts.float()}) == []
    assert check(small_logits, inputs, {"parts": parts.float() + 1e-3}), "a wrong piece is caught"
    rt = parse("rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256")
    assert rt["scale"] == 2.5 and rt["norm"] and rt["top_k"] == 8 and rt["tokens"] == 1
    rt8 = parse("rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8")
    assert rt8["tokens"] == 8 and rt8["norm"] and grid(rt8, 17) == 3 and grid(rt, 17) == 17
    whole = parse("rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8_p1")
    assert whole["pieces"] == 1 and rt8["pieces"] == SPLITS and whole["tokens"] == 8
    small_whole = dict(whole, d=16, experts=16, n_group=4, topk_group=2, top_k=4)
    inputs = problem(small_whole, 5, "cpu")
    assert inputs["parts"].shape == (5, 16)
    idx, w = route_reference(small_whole, inputs["parts"], inputs["bias"])
    assert check(small_whole, inputs, {"idx": idx.int(), "w_out": w.float()}) == []
    assert check(small_whole, inputs, {"idx": idx.flip(1).int(), "w_out": w.float()}), "other experts are caught"
    small = dict(rt, d=16, experts=16, n_group=4, topk_group=2, top_k=4)
    inputs = problem(small, 5, "cpu")
    idx, w = route_reference(small, inputs["parts"], inputs["bias"])
    assert torch.allclose(w.sum(dim=1), torch.full((5,), 2.5, dtype=torch.float64)), "normalized and scaled"
    groups = (idx // 4).tolist()
    assert all(len(set(gs)) <= 2 for gs in groups), "at most topk_group groups"
    assert check(small, inputs, {"idx": idx.int(), "w_out": w.float()}) == []
    dp = dict(parse("rows_dispatch_e256_s1_t256"), experts=8, d=9, top_k=2)
    inputs = problem(dp, 4, "cpu")
    offsets, tokens, weights = dispatch_reference(dp, inputs["idx"], inputs["w"])
    assert offsets[-1] == 4 * 3 and sorted(tokens) == sorted(list(range(4)) * 3)
    mp = dict(parse("rows_mlaprefill_h128_n128_r64_v128_kv512_c8192_s1p3523377em1_t128"), heads=2, nope=16, rope=8, d=64)
    assert mp["prefill"]
    inputs = problem(mp, 3, "cpu")
    want = mla_decode_reference(mp, inputs["q_nope"], inputs["q_pe"], inputs["cache"], None, inputs["kv_b"],
                                inputs["kv_b_scale"])
    q, s = quantize_reference(want.float())
    assert check(mp, inputs, {"q": q, "scale": s}) == []
    md = dict(parse("rows_mladecode_h128_n128_r64_v128_kv512_c8192_s1p3523377em1_t128"), heads=2, nope=16, rope=8, d=64)
    inputs = problem(md, 3, "cpu")
    want = mla_decode_reference(md, inputs["q_nope"], inputs["q_pe"], inputs["cache"], inputs["positions"],
                                inputs["kv_b"], inputs["kv_b_scale"])
    assert want.shape == (3, 2 * 128) and torch.isfinite(want).all()
    q, s = quantize_reference(want.float())
    assert check(md, inputs, {"q": q, "scale": s}) == []
    ga = parse("rows_gatherfp8_d7168_t256")
    assert ga["op"] == "gatherfp8" and grid(ga, 3) == 27
    small = dict(ga, d=256)
    inputs = problem(small, 4, "cpu")
    tok = inputs["sorted"].flatten().long()
    assert sorted(tok.tolist()) == sorted(list(range(4)) * GATHER_WIDTH)
    outs = {"q": inputs["x"][tok], "scale": inputs["x_scale"][tok]}
    assert check(small, inputs, outs) == []
    outs["q"][5, 7] ^= 1
    assert check(small, inputs, outs) == ["gatherfp8: bytes differ"], "a wrong byte is caught"
    sp = parse("rows_splitbf16_d300_t64")
    inputs = problem(sp, 2, "cpu")
    hi = inputs["x"].to(torch.bfloat16)
    lo = (inputs["x"] - hi.float()).to(torch.bfloat16)
    assert ((hi.float() + lo.float() - inputs["x"]).abs() <= inputs["x"].abs() * 2 ** -16).all()
    assert check(sp, inputs, {"hi": hi, "lo": lo}) == []
    print("rows_check self-test: names parse; references normalize, quantize and rotate; the check catches a wrong "
          "byte, a wrong cache value and a wrong rope value")


def check_kernel(drv, ptx_dir, name, copy):
    """Correctness at 1, 3 and 64 rows, then timing; the result as a dict (never raises for a kernel's own
    failure: a launch error is reported as its error)."""
    result = {"kernel": name, "errors": [], "timing": []}
    try:
        cfg = parse(name)
        func = drv.load(open(os.path.join(ptx_dir, name + ".ptx")).read(), name)
        for rows in (1, 3, 64):
            inputs, outs, _ = run(drv, func, cfg, rows)
            result["errors"] += [f"{rows} rows: {e}" for e in check(cfg, inputs, outs)]
        # Decode's in-place write: caches of 64 slots per sequence, so at most 1024 sequences (151 MB).
        for rows in (64,) if cfg["op"] == "mladecode" else (
                64, 1024 if cfg["op"] == "latent" and not cfg["append"] else 8192):
            _, _, args = run(drv, func, cfg, rows)
            us = median_us(drv, func, cfg, rows, args)
            gbps = bytes_moved(cfg, rows) / (us * 1e-6) / 1e9
            entry = {"rows": rows, "median_us": round(us, 2), "GBps": round(gbps, 1)}
            if copy:
                entry["of_copy_bandwidth"] = round(gbps / (copy * 1e3), 3)
            result["timing"].append(entry)
    except (RuntimeError, SystemExit, OSError) as e:
        result["errors"].append(str(e))
    result["ok"] = not result["errors"]
    timing = ", ".join(f"{t['rows']} rows {t['median_us']} us ({t['GBps']} GB/s"
                       + (f", {t['of_copy_bandwidth']:.0%} of copy" if "of_copy_bandwidth" in t else "") + ")"
                       for t in result["timing"])
    print(f"{name}: {'ok' if result['ok'] else 'FAILED: ' + '; '.join(result['errors'])}; {timing}", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptx-dir", help="directory with <kernel>.ptx")
    ap.add_argument("--kernel", action="append", help="kernel name (file stem in --ptx-dir); repeatable")
    ap.add_argument("--all", action="store_true", help="every kernel in --ptx-dir, in one process")
    ap.add_argument("--out-dir", help="write rows_<kernel>.json here")
    ap.add_argument("--ceilings", help="ceilings.json from check.sh step 1b (copy bandwidth)")
    ap.add_argument("--self-test", action="store_true", help="check the references on the CPU (no GPU)")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return 0
    if not a.ptx_dir or not (a.kernel or a.all):
        ap.error("--ptx-dir and --kernel NAME (or --all) are required (or --self-test)")
    names = sorted(f[:-4] for f in os.listdir(a.ptx_dir) if f.endswith(".ptx")) if a.all else a.kernel
    copy = None
    if a.ceilings and os.path.exists(a.ceilings):
        copy = json.load(open(a.ceilings)).get("copy_TBps")
    drv = Driver()
    failed = 0
    for name in names:
        result = check_kernel(drv, a.ptx_dir, name, copy)
        failed += not result["ok"]
        if a.out_dir:
            json.dump(result, open(os.path.join(a.out_dir, f"rows_{name}.json"), "w"), indent=1)
    print(f"rows_check: {len(names) - failed} of {len(names)} row kernels ok")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
