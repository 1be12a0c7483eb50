#!/usr/bin/env python3
"""Correctness and speed of v3c's tensor-core MLA decode attention (sm_90a) on the device, against torch.

Run by benches/device/check.sh on the GPU machine (python3 + torch, no Rust). benches/device/prepare.sh writes
the PTX of the attention kernels (`mla_decode_kv<KV>_r<R>_p64_s<S>[_cl2][_serial][_fp8]`; `_cl2`: clusters of 2
blocks, compiled in — a sequence's two 64-head blocks share each page, each loading half of it by TMA multicast —
so only cases with heads a multiple of 128 run on it; `_serial`: the page loop that scores and multiplies a page
in the same step, the ring loading a page ahead, where the loop without it scores the next page during this one's
P V and loads none ahead with two buffers: the same ABI) and of the split combine (`rows_mlacombine_d<KV>_t<T>`) into
.device/mla/.

Kernel ABI (compiler/src/conversion/sm90/mla.rs, `emit`): (q_map*, kv_map*, block_table i32 [B, max_pages] (7
scalars), seqlens i32 [B] (5), o_part f32 [splits, B * H, KV] (9), lse f32 [splits, B * H] (7),
rows_per_sequence (i64: tokens x heads), heads (i64), scale (f32)); 256 threads, grid (B * ceil(H / 64), splits); dynamic shared memory
as the PTX's first line says (prepare.sh keeps the compiler's `// ----- stage ptx: NAME (256 threads, N B dynamic
shared memory)`; without it (1 + S) * 64 * (KV + R) * 2 + 8704: P and the warpgroups' row statistics). Tensor maps: 2-D bf16, box 64 columns x 64 rows, 128-byte swizzle,
zero fill; the queries [B * H, KV + R], the cache [pages * 64, KV + R]. The fp8-cache variant (`_fp8`, `v3c
compile --kv-cache fp8`) reads the runtime's packed rows (KV e4m3 bytes, KV / 128 power-of-two f32 scales padded
to 16 bytes, R bf16: 656 bytes for 512 + 64) through three views: kv_map (UINT8, box 128 bytes x 64 rows, no
swizzle, the row's pitch), then rope_map* (bf16 at the rope key's offset, the row's pitch) and the scales' memref
[pages * 64, KV / 128] (7 scalars, rows a cache row apart) after it. The combine is a row kernel:
(o_part (9), lse (7), out f32 [B * H, KV] (7)), one block per row.

Checks: paged caches whose pages are scattered over a pool with holes (unused pages poisoned with NaN, as is
the last page past each sequence's length), sequence lengths 1..20000 (partial pages, one page, many), head
counts 128 and 16 (a block's rows past the heads masked), 1..39 splits (some empty). Output vs a float64
reference of softmax(q K^T * scale) K[:, :KV] on the same bf16 values: relative error (Frobenius) <= 1e-2
(P is rounded to bf16 before P V), and every element finite. Timing: batch 64 x context 4096 and batch 1 x
context 32768 (the runtime's splits), 128 heads:
median of 20 (attention + combine) vs torch (pages gathered, bmm, softmax, bmm), as GB/s of unique cache bytes
against the copy bandwidth of step 1b.

The prefill kernel (`mla_prefill_qk<QK>_v<V>_s<S>`, flash attention, causal; ABI: q_map*, k_map*, v_map* (2-D
bf16, head-major: q [H * T, QK], k [H * S, QK], v [H * S, V]), out f32 [H * T, V] (7 scalars), T, S (i64), scale
(f32); 256 threads, grid (ceil(T / 128), H), dynamic shared memory 2 * QK * 128 + S * 64 * (QK + V) * 2 + 16384
bytes): query t sees keys 0..=S - T + t. Checked against float64 causal attention for T = S and for T < S
(a continuation), T not a multiple of 128, then timed at T = S = 4096 x 128 heads vs torch's
scaled_dot_product_attention (causal) as TFLOP/s.

Training's flash kernels (`mla_prefill_qk<QK>_v<V>_s<S>_lse`: the forward, its out's memref then lse f32 [H * T]
(5 scalars: each query row's base-2 log-sum-exp of its scaled scores); `mla_grad{q,k,v}_qk<QK>_v<V>_s<S>`: q_map*,
k_map*, v_map*, dout_map* (dout [H * T, V] bf16), lse (5), D f32 [H * T] (5: rowsum(dout * out)), the gradient
(7: dQ [H * T, QK], dK [H * S, QK], dV [H * S, V], f32), T, S, scale; grid (ceil(rows / 128), H), rows T for dQ
and S for dK, dV; dynamic shared memory 2 * own * 8192 + S * (QK + V) / 64 * 8192 + 16384, own = (QK + V) / 64
for dQ, dK and QK / 64 for dV): out and lse against float64 causal attention, dQ, dK, dV against autograd's
gradients of sum(dout * out) in float64 (relative error <= 2e-2: P and dS go to the tensor cores in bf16), then
forward + backward at T = S = 4096 x 128 heads timed against torch SDPA's (causal, bf16, autograd).

`--self-test` needs no GPU: it checks the split/combine arithmetic of the reference on the CPU.
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
from gemm_check import Driver, median_ms, memref_args, without_suspend_hint  # noqa: E402


def dynamic_shared(ptx, fallback):
    """The kernel's dynamic shared memory as the compiler's header line says (prepare.sh keeps it),
    else `fallback` (the layout's formula)."""
    declared = re.search(r"\(\d+ threads, (\d+) B dynamic shared memory\)", ptx)
    return int(declared[1]) if declared else fallback


ATTN = re.compile(r"^mla_decode_kv(\d+)_r(\d+)_p64_s(\d+)(_cl2)?(_serial)?(_fp8)?$")
E4M3_MAX = 448.0
PREFILL = re.compile(r"^mla_prefill_qk(\d+)_v(\d+)_s(\d+)$")
# Training's flash kernels: the forward with log-sum-exps, the three gradients.
TRAIN = re.compile(r"^mla_(?:prefill(?=.*_lse$)|grad([qkv]))_qk(\d+)_v(\d+)_s(\d+)(_lse)?$")
COMBINE = re.compile(r"^rows_mlacombine_d(\d+)_t(\d+)$")
PAGE = 64


def reference(q, cache, table, lens, heads, kv, scale, tokens=1):
    """float64 attention per sequence over its pages, token t of T seeing keys < len - T + t + 1:
    [B * T * H, kv]."""
    out = []
    for b, n in enumerate(lens):
        pages = table[b, :math.ceil(n / PAGE)].long()
        rows = (pages[:, None] * PAGE + torch.arange(PAGE, device=pages.device)[None, :]).reshape(-1)[:n]
        k = cache[rows].double()
        for t in range(tokens):
            first = (b * tokens + t) * heads
            visible = n - tokens + t + 1
            p = torch.softmax(q[first:first + heads].double() @ k[:visible].T * scale, dim=-1)
            out.append(p @ k[:visible, :kv])
    return torch.cat(out)


def split_reference(q, k, kv, scale, bounds):
    """Each split's normalized output and natural-log lse, as the kernel writes them (CPU, float64)."""
    parts, lses = [], []
    for k0, k1 in bounds:
        if k0 == k1:
            parts.append(torch.zeros(q.shape[0], kv, dtype=torch.float64))
            lses.append(torch.full((q.shape[0],), float("-inf"), dtype=torch.float64))
            continue
        s = q @ k[k0:k1].T * scale
        m = s.max(dim=1).values
        e = torch.exp(s - m[:, None])
        l = e.sum(dim=1)
        parts.append(e @ k[k0:k1, :kv] / l[:, None])
        lses.append(m + torch.log(l))
    return torch.stack(parts), torch.stack(lses)


def combine(parts, lses):
    m = lses.max(dim=0).values
    w = torch.exp(lses - m[None, :])
    return (w[:, :, None] * parts).sum(dim=0) / w.sum(dim=0)[:, None]


def self_test():
    # The runtime's splits, as runtime/src/lowering.rs's tests have them (132 SMs).
    got = [runtime_splits(b, h, ctx, 132) for b, h, ctx in [(64, 128, 4096), (1, 128, 4096), (1, 128, 32768),
                                                             (17, 128, 4096), (1, 16, 1 << 20)]]
    assert got == [1, 8, 64, 7, 128], got
    torch.manual_seed(0)
    q, k = torch.randn(5, 96, dtype=torch.float64), torch.randn(300, 96, dtype=torch.float64)
    full = torch.softmax(q @ k.T * 0.1, dim=-1) @ k[:, :64]
    per = math.ceil(math.ceil(300 / PAGE) / 3)
    bounds = [(min(z * per * PAGE, 300), min((z + 1) * per * PAGE, 300)) for z in range(4)]
    parts, lses = split_reference(q, k, 64, 0.1, bounds)
    assert bounds[-1][0] == bounds[-1][1], "the last split is empty"
    assert torch.allclose(combine(parts, lses), full, atol=1e-12)
    # The paged problem: every sequence's pages distinct, the reference finite (it reads no NaN page or tail).
    lens = [1, 64, 65, 300]
    q, cache, table, _ = problem(4, 64, 64, lens, seed=1, device="cpu")
    used = [p for b, n in enumerate(lens) for p in table[b, :math.ceil(n / PAGE)].tolist()]
    assert len(used) == len(set(used)), "pages shared between sequences"
    ref = reference(q, cache, table, lens, 4, 64, 0.1)
    assert ref.shape == (16, 64) and bool(torch.isfinite(ref).all())
    # Two speculative tokens: the first sees one key fewer than the second, which sees them all.
    q2, cache2, table2, _ = problem(2, 64, 64, [70], seed=2, device="cpu", tokens=2)
    r2 = reference(q2, cache2, table2, [70], 2, 64, 0.1, tokens=2)
    rows = (table2[0, :2].long()[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)[:70]
    k2 = cache2[rows].double()
    assert torch.allclose(r2[0:2], torch.softmax(q2[0:2].double() @ k2[:69].T * 0.1, dim=-1) @ k2[:69, :64])
    assert torch.allclose(r2[2:4], torch.softmax(q2[2:4].double() @ k2.T * 0.1, dim=-1) @ k2[:, :64])
    assert bool(torch.isnan(cache[table[2, 1].item() * PAGE + 1]).all()), "the tail past 65 rows is NaN"
    # The fp8 cache: rows of e4m3 latent, power-of-two scales per 128 columns, bf16 rope (the runtime's
    # 656-byte rows for 512 + 64) stand for values within e4m3's step; a NaN row stays NaN (the kernel
    # must not read it); the rope part passes through; the scales are the least powers of two that fit.
    import types
    c16 = torch.randn(6, 256 + 64).bfloat16()
    c16[1, :128] *= 1000
    c16[5] = float("nan")
    packed, deq = Mla.quantize_cache(types.SimpleNamespace(kv=256, rope=64), c16)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 256 + 16 + 128)
    assert fp8_row_bytes(512, 64) == (512, 528, 656)
    err = (deq[:5, :256] - c16[:5, :256].float()).abs().max() / c16[:5, :256].float().abs().max()
    assert err < 0.07, f"e4m3 round trip off by {err}"
    assert torch.equal(deq[:5, 256:], c16[:5, 256:].float()) and bool(torch.isnan(deq[5]).all())
    s = packed[:5, 256:264].contiguous().view(torch.float32)
    amax = c16[:5, :256].float().view(5, 2, 128).abs().amax(dim=2)
    assert bool((torch.frexp(s)[0] == 0.5).all()), "scales are powers of two"
    assert bool((amax <= 448 * s).all() and (amax > 224 * s).all()), "the least power of two that fits"
    # The causal prefill reference: a continuation's first query sees the past and itself only.
    q, k, v = torch.randn(2 * 3, 8), torch.randn(2 * 5, 8), torch.randn(2 * 5, 4)
    out = prefill_reference(q, k, v, 2, 3, 5, 0.5)
    p = torch.softmax(q[0:1].double() @ k[0:3].double().T * 0.5, dim=-1)
    assert torch.allclose(out[0:1], p @ v[0:3].double()), "query 0 of 3 after 2 past keys sees keys 0..=2"
    assert torch.allclose(out[5:6], torch.softmax(q[5:6].double() @ k[5:10].double().T * 0.5, dim=-1)
                          @ v[5:10].double()), "the last query sees every key of its head"
    assert bool(torch.isfinite(cache[table[2, 1].item() * PAGE]).all()), "row 64 of a 65-row sequence is set"
    # Training's reference: its forward is the prefill reference, lse the base-2 log-sum-exp, and a
    # key no query sees gets no gradient.
    dout = torch.randn(2 * 3, 4)
    ref = attention_grads(q, k, v, dout, 2, 3, 5, 0.5)
    assert torch.allclose(ref[0], out), "training's forward is the prefill's"
    sc = q[0:1].double() @ k[0:3].double().T * 0.5
    assert torch.allclose(ref[1][0], torch.logsumexp(sc, dim=-1)[0] / math.log(2))
    # Autograd against a central difference of sum(dout * out) in one element of q, k and v each.
    for which, (row, col) in [(0, (1, 2)), (1, (4, 0)), (2, (7, 3))]:
        xs = [q.double(), k.double(), v.double()]
        loss = []
        for eps in (1e-6, -1e-6):
            ys = [x.clone() for x in xs]
            ys[which][row, col] += eps
            loss.append((prefill_reference(*ys, 2, 3, 5, 0.5) * dout.double()).sum().item())
        fd = (loss[0] - loss[1]) / 2e-6
        assert abs(fd - ref[2 + which][row, col].item()) < 1e-6, f"gradient {which} at {row, col}"
    assert TRAIN.match("mla_gradk_qk192_v128_s2")[1] == "k" and TRAIN.match("mla_prefill_qk192_v128_s2_lse")[5]
    assert not TRAIN.match("mla_prefill_qk192_v128_s2")
    print("mla_check self-test: split partials + lse combine == attention over all keys (an empty split included); "
          "paged problems read no NaN page or tail")


def fp8_row_bytes(kv, rope):
    """An fp8 cache row's layout (runtime/src/plan.rs, Fp8LatentRow): the scales' offset, the rope key's, the
    row's bytes."""
    rope_at = kv + -(-4 * (kv // 128) // 16) * 16
    return kv, rope_at, rope_at + 2 * rope


def problem(heads, kv, rope, lens, seed, device="cuda", tokens=1):
    """q [B * H, kv + rope], a cache pool with holes, its block table; unused pages and tails are NaN. The
    latent's magnitudes differ by row and 128-column group (powers of two 1/4 to 4), so the fp8 cache's scales
    do too: a unit converted with another row's or group's scale shows."""
    g = torch.Generator(device=device).manual_seed(seed)
    dim = kv + rope
    rows = torch.arange(PAGE, device=device)[:, None]
    groups = (torch.arange(dim, device=device) // 128)[None, :]
    magnitude = torch.where(groups < kv // 128, torch.exp2(((rows * 3 + groups) % 5 - 2).float()), 1.0)
    need = [math.ceil(n / PAGE) for n in lens]
    pool = 2 * sum(need) + 3
    cache = torch.full((pool * PAGE, dim), float("nan"), device=device, dtype=torch.bfloat16)
    order = torch.randperm(pool, generator=g, device=device)
    table = torch.full((len(lens), max(need)), pool - 1, dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(lens):
        pages = order[at:at + need[b]]
        at += need[b]
        table[b, :need[b]] = pages.int()
        for i, p in enumerate(pages.tolist()):
            valid = min(PAGE, n - i * PAGE)
            values = torch.randn(valid, dim, generator=g, device=device) * magnitude[:valid]
            cache[p * PAGE:p * PAGE + valid] = values.bfloat16()
    q = torch.randn(len(lens) * tokens * heads, dim, generator=g, device=device).bfloat16()
    return q, cache, table, torch.tensor(lens, dtype=torch.int32, device=device)


class Mla:
    def __init__(self, drv, ptx_dir, attn, comb):
        self.drv = drv
        m = ATTN.match(attn)
        self.kv, self.rope, self.stages, self.fp8 = int(m[1]), int(m[2]), int(m[3]), bool(m[6])
        # Clusters of 2 (compiled in): a sequence's 64-row blocks paired, so heads a multiple of 128.
        self.cluster = 2 if m[4] else 1
        self.threads_c = int(COMBINE.match(comb)[2])
        attn_ptx = open(os.path.join(ptx_dir, attn + ".ptx")).read()
        self.attn = drv.load(attn_ptx, attn)
        self.comb = drv.load(open(os.path.join(ptx_dir, comb + ".ptx")).read(), comb)
        self.names = (attn, comb)
        dim = self.kv + self.rope
        if self.fp8:
            # Query tile, page ring (e4m3 latent + bf16 rope), the converted bf16 latent, P, row statistics.
            fallback = PAGE * dim * 2 + self.stages * PAGE * (self.kv + 2 * self.rope) + PAGE * self.kv * 2 + 8704
        else:
            fallback = (1 + self.stages) * PAGE * dim * 2 + 8704
        self.smem = dynamic_shared(attn_ptx, fallback)
        self.drv.check(self.drv.cu.cuFuncSetAttribute(self.attn, 8, self.smem), f"{attn}: max dynamic shared memory")
        # The same kernel with its mbarrier waits' suspend hints dropped (timed next to it).
        spin_ptx, hints = without_suspend_hint(attn_ptx)
        self.attn_spin = drv.load(spin_ptx, attn) if hints else None
        if self.attn_spin is not None:
            self.drv.check(self.drv.cu.cuFuncSetAttribute(self.attn_spin, 8, self.smem), f"{attn}: max dynamic shared memory")

    def launch(self, func, grid, threads, smem, args, name):
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = self.drv.cu.cuLaunchKernel(func, grid[0], grid[1], 1, threads, 1, 1, smem, stream, params, None)
        self.drv.check(rc, f"{name}: cuLaunchKernel")

    def quantize_cache(self, cache):
        """The fp8 cache of a bf16 one as the runtime packs it (runtime/src/plan.rs, Fp8LatentRow): per row,
        the latent as e4m3 with one scale per 128 columns — the least power of two s with amax <= 448 s
        (amax floored at 1e-4; NaN rows stay NaN) — then the scales (f32, padded to 16 bytes), then the rope
        part in bf16; and the float cache those values stand for."""
        n = cache.shape[0]
        latent = cache[:, :self.kv].float().view(n, self.kv // 128, 128)
        amax = latent.abs().amax(dim=2)
        mant, exp = torch.frexp(amax.clamp(min=1e-4) / E4M3_MAX)
        s = torch.ldexp(torch.ones_like(mant), torch.where(mant == 0.5, exp - 1, exp))
        s = torch.where(amax > E4M3_MAX * s, 2 * s, s)
        s = torch.where(torch.isnan(latent).any(dim=2), torch.full_like(s, float("nan")), s)
        q8 = (latent / s[:, :, None]).to(torch.float8_e4m3fn)
        deq = torch.cat([(q8.float() * s[:, :, None]).view(n, self.kv), cache[:, self.kv:].float()], 1)
        scales_at, rope_at, row = fp8_row_bytes(self.kv, self.rope)
        packed = torch.zeros(n, row, dtype=torch.uint8, device=cache.device)
        packed[:, :self.kv] = q8.view(torch.uint8).view(n, self.kv)
        packed[:, scales_at:scales_at + 4 * (self.kv // 128)] = s.contiguous().view(torch.uint8).view(n, -1)
        packed[:, rope_at:] = cache[:, self.kv:].contiguous().view(torch.uint8).view(n, -1)
        return packed, deq

    def prepare(self, q, cache, table, lens, heads, splits, scale, tokens=1):
        """A callable running attention + combine; its output tensor (poisoned with NaN first). With the
        fp8 cache, `cache` is its packed rows, seen three ways as the runtime sees them (runtime/src/abi.rs):
        the e4m3 latent (UINT8 map, no swizzle) and the bf16 rope key (128-byte swizzle), both with the row's
        pitch, and the scales as an f32 memref whose rows are a cache row apart."""
        rows = q.shape[0]
        q_map = self.drv.tensor_map(q, PAGE, PAGE, 9)
        if self.fp8:
            scales_at, rope_at, _ = fp8_row_bytes(self.kv, self.rope)
            kv_map = self.drv.tensor_map(cache[:, :self.kv], PAGE, 128, 0, swizzle=0)  # UINT8, no swizzle
            rope_map = self.drv.tensor_map(cache[:, rope_at:].view(torch.bfloat16), PAGE, PAGE, 9)
            scales = cache[:, scales_at:scales_at + 4 * (self.kv // 128)].view(torch.float32)
            extra = [ctypes.c_uint64(rope_map.data_ptr())] + memref_args(scales)
        else:
            kv_map = self.drv.tensor_map(cache, PAGE, PAGE, 9)
            rope_map, extra = None, []
        o_part = torch.full((splits, rows, self.kv), float("nan"), device="cuda")
        lse = torch.full((splits, rows), float("nan"), device="cuda")
        out = torch.full((rows, self.kv), float("nan"), device="cuda")
        args = ([ctypes.c_uint64(q_map.data_ptr()), ctypes.c_uint64(kv_map.data_ptr())] + extra + memref_args(table)
                + memref_args(lens) + memref_args(o_part) + memref_args(lse)
                + [ctypes.c_int64(tokens * heads), ctypes.c_int64(heads), ctypes.c_float(scale)])
        cargs = memref_args(o_part) + memref_args(lse) + memref_args(out)
        grid = (len(lens) * math.ceil(tokens * heads / PAGE), splits)
        keep = (q_map, kv_map, rope_map, cache, o_part, lse)

        def attention():
            self.launch(self.attn, grid, 256, self.smem, args, self.names[0])

        def run():
            attention()
            self.launch(self.comb, (rows, 1), self.threads_c, 0, cargs, self.names[1])
        run.keep = keep
        run.attention = attention
        return run, out


def prefill_reference(q, k, v, heads, t, s, scale):
    """float64 causal attention per head (query i at position s - t + i): [H * T, V]."""
    out = []
    for h in range(heads):
        qh, kh, vh = q[h * t:(h + 1) * t].double(), k[h * s:(h + 1) * s].double(), v[h * s:(h + 1) * s].double()
        sc = qh @ kh.T * scale
        pos = torch.arange(t, device=q.device)[:, None] + (s - t)
        sc = sc.masked_fill(torch.arange(s, device=q.device)[None, :] > pos, float("-inf"))
        out.append(torch.softmax(sc, dim=-1) @ vh)
    return torch.cat(out)


class Prefill:
    def __init__(self, drv, ptx_dir, name):
        m = PREFILL.match(name)
        self.qk, self.v, self.stages = int(m[1]), int(m[2]), int(m[3])
        self.drv, self.name = drv, name
        ptx = open(os.path.join(ptx_dir, name + ".ptx")).read()
        self.func = drv.load(ptx, name)
        self.smem = dynamic_shared(ptx, 2 * self.qk * 128 + self.stages * 64 * (self.qk + self.v) * 2 + 16384)
        drv.check(drv.cu.cuFuncSetAttribute(self.func, 8, self.smem), f"{name}: max dynamic shared memory")

    def prepare(self, q, k, v, heads, t, s, scale):
        maps = [self.drv.tensor_map(x, PAGE, PAGE, 9) for x in (q, k, v)]
        out = torch.full((heads * t, self.v), float("nan"), device="cuda")
        args = ([ctypes.c_uint64(m.data_ptr()) for m in maps] + memref_args(out)
                + [ctypes.c_int64(t), ctypes.c_int64(s), ctypes.c_float(scale)])
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])

        def run():
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            rc = self.drv.cu.cuLaunchKernel(self.func, math.ceil(t / 128), heads, 1, 256, 1, 1, self.smem, stream,
                                            params, None)
            self.drv.check(rc, f"{self.name}: cuLaunchKernel")
        run.keep = (maps, args, params)
        return run, out


def attention_grads(q, k, v, dout, heads, t, s, scale):
    """float64 causal attention per head (query i at position s - t + i) and autograd's gradients of
    sum(dout * out): out [H * T, V], lse [H * T] (base 2), dq, dk, dv."""
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    outs, lses = [], []
    for h in range(heads):
        sc = q64[h * t:(h + 1) * t] @ k64[h * s:(h + 1) * s].T * scale
        pos = torch.arange(t, device=q.device)[:, None] + (s - t)
        sc = sc.masked_fill(torch.arange(s, device=q.device)[None, :] > pos, float("-inf"))
        lses.append(torch.logsumexp(sc, dim=-1) / math.log(2))
        outs.append(torch.softmax(sc, dim=-1) @ v64[h * s:(h + 1) * s])
    out = torch.cat(outs)
    (out * dout.double()).sum().backward()
    return out.detach(), torch.cat(lses).detach(), q64.grad, k64.grad, v64.grad


class Flash:
    """One of training's flash kernels (TRAIN), launched as the runtime does (runtime/src/abi.rs)."""

    def __init__(self, drv, ptx_dir, name):
        m = TRAIN.match(name)
        self.grad, self.qk, self.v, self.stages = m[1], int(m[2]), int(m[3]), int(m[4])
        self.drv, self.name = drv, name
        ptx = open(os.path.join(ptx_dir, name + ".ptx")).read()
        self.func = drv.load(ptx, name)
        own = (self.qk + self.v) // 64 if self.grad in ("q", "k") else self.qk // 64
        self.smem = dynamic_shared(ptx, 2 * own * 8192 + self.stages * (self.qk + self.v) // 64 * 8192 + 16384)
        drv.check(drv.cu.cuFuncSetAttribute(self.func, 8, self.smem), f"{name}: max dynamic shared memory")

    def prepare(self, maps, memrefs, rows, heads, t, s, scale):
        tmaps = [self.drv.tensor_map(x, PAGE, PAGE, 9) for x in maps]
        args = ([ctypes.c_uint64(m.data_ptr()) for m in tmaps] + [a for x in memrefs for a in memref_args(x)]
                + [ctypes.c_int64(t), ctypes.c_int64(s), ctypes.c_float(scale)])
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])

        def run():
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            rc = self.drv.cu.cuLaunchKernel(self.func, math.ceil(rows / 128), heads, 1, 256, 1, 1, self.smem, stream,
                                            params, None)
            self.drv.check(rc, f"{self.name}: cuLaunchKernel")
        run.keep = (tmaps, args, params, maps, memrefs)
        return run


def training_step(kernels, q, k, v, dout, heads, t, s, scale):
    """Forward (lse) then dQ, dK, dV with the kernels {"lse": .., "q": .., "k": .., "v": ..}: a callable and
    its outputs (out, lse, dq, dk, dv; poisoned with NaN first). D is rowsum(dout * out) in torch (the
    runtime's rows_flashdout)."""
    nan = lambda *shape: torch.full(shape, float("nan"), device="cuda")
    fw = kernels["lse"]
    out, lse = nan(heads * t, fw.v), nan(heads * t)
    d = nan(heads * t)
    grads = {"q": nan(heads * t, fw.qk), "k": nan(heads * s, fw.qk), "v": nan(heads * s, fw.v)}
    runs = [fw.prepare([q, k, v], [out, lse], t, heads, t, s, scale)]
    for g, rows in [("q", t), ("k", s), ("v", s)]:
        runs.append(kernels[g].prepare([q, k, v, dout], [lse, d, grads[g]], rows, heads, t, s, scale))

    def run():
        runs[0]()
        d.copy_((dout.float() * out).sum(dim=-1))
        for r in runs[1:]:
            r()
    run.keep = runs
    return run, (out, lse, grads["q"], grads["k"], grads["v"])


def check_training(drv, ptx_dir, names, result):
    kernels = {}
    for name in names:
        m = TRAIN.match(name)
        kernels[m[1] or "lse"] = Flash(drv, ptx_dir, name)
    if sorted(kernels) != ["k", "lse", "q", "v"]:
        raise RuntimeError(f"training flash kernels {names}: need the _lse forward and dQ, dK, dV")
    qk, vd = kernels["lse"].qk, kernels["lse"].v
    scale = 1 / math.sqrt(qk)
    cases = result.setdefault("training_cases", [])
    for i, (heads, t, s) in enumerate([(2, 1, 1), (3, 37, 37), (2, 130, 130), (1, 100, 300), (4, 300, 301)]):
        g = torch.Generator(device="cuda").manual_seed(200 + i)
        q, k = (torch.randn(heads * n, qk, generator=g, device="cuda").bfloat16() for n in (t, s))
        v = torch.randn(heads * s, vd, generator=g, device="cuda").bfloat16()
        dout = torch.randn(heads * t, vd, generator=g, device="cuda").bfloat16()
        run, got = training_step(kernels, q, k, v, dout, heads, t, s, scale)
        run()
        torch.cuda.synchronize()
        ref = attention_grads(q, k, v, dout, heads, t, s, scale)
        errs = {}
        for what, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, ref):
            finite = bool(torch.isfinite(a).all())
            # A gradient that is zero (one query over one key: dQ, dK vanish) is held absolutely.
            norm = b.norm().item() or 1.0
            errs[what] = ((a.double() - b).norm() / norm).item() if finite else float("nan")
        ok = all(e <= 2e-2 for e in errs.values())
        result["ok"] &= ok
        cases.append({"heads": heads, "t": t, "s": s, "rel_err": errs, "ok": ok})
        shown = " ".join(f"{w} {e:.2e}" for w, e in errs.items())
        print(f"training flash: heads {heads} T {t} S {s}: {shown} {'ok' if ok else 'FAILED'}")
    if not result["ok"]:
        return
    heads, t = 128, 4096
    g = torch.Generator(device="cuda").manual_seed(8)
    q, k = (torch.randn(heads * t, qk, generator=g, device="cuda").bfloat16() for _ in range(2))
    v, dout = (torch.randn(heads * t, vd, generator=g, device="cuda").bfloat16() for _ in range(2))
    run, _ = training_step(kernels, q, k, v, dout, heads, t, t, scale)
    ms = median_ms(run, reps=5)
    qs, ks, vs = (x.view(1, heads, t, -1).detach().clone().requires_grad_() for x in (q, k, v))
    gs = dout.view(1, heads, t, -1)

    def sdpa():
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        torch.autograd.grad(o, (qs, ks, vs), gs)
    sdpa_ms = median_ms(sdpa, reps=5)
    # Causal: half the pairs; forward 2 products, backward (dQ, dK, dV as three kernels) 8.
    flops = 2 * heads * t * (t + 1) / 2 * ((qk + vd) + 2 * (qk + vd) + qk + qk + vd)
    result["training_timing"] = {"heads": heads, "t": t, "median_ms": ms, "sdpa_ms": sdpa_ms,
                                 "TFLOPs": flops / (ms * 1e-3) / 1e12}
    print(f"training flash: T = S = {t} x {heads} heads, forward + dQ + dK + dV: {ms:.2f} ms "
          f"({flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s counting recomputation); torch SDPA fwd + bwd {sdpa_ms:.2f} ms "
          f"({sdpa_ms / ms:.2f}x)")


def check_prefill(drv, ptx_dir, name, result):
    pf = Prefill(drv, ptx_dir, name)
    scale = 1 / math.sqrt(pf.qk)
    for i, (heads, t, s) in enumerate([(2, 1, 1), (3, 37, 37), (2, 100, 300), (1, 200, 200), (1, 128, 5000),
                                       (4, 300, 301)]):
        g = torch.Generator(device="cuda").manual_seed(100 + i)
        q = torch.randn(heads * t, pf.qk, generator=g, device="cuda").bfloat16()
        k = torch.randn(heads * s, pf.qk, generator=g, device="cuda").bfloat16()
        v = torch.randn(heads * s, pf.v, generator=g, device="cuda").bfloat16()
        run, out = pf.prepare(q, k, v, heads, t, s, scale)
        run()
        torch.cuda.synchronize()
        ref = prefill_reference(q, k, v, heads, t, s, scale)
        finite = bool(torch.isfinite(out).all())
        rel = ((out.double() - ref).norm() / ref.norm()).item() if finite else float("nan")
        ok = finite and rel <= 1e-2
        result["ok"] &= ok
        result["prefill_cases"].append({"kernel": name, "heads": heads, "t": t, "s": s, "rel_err": rel, "ok": ok})
        print(f"{name}: heads {heads} T {t} S {s}: rel err {rel:.2e} {'ok' if ok else 'FAILED'}")
    if not result["ok"]:
        return
    heads, t = 128, 4096
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(heads * t, pf.qk, generator=g, device="cuda").bfloat16()
    k = torch.randn(heads * t, pf.qk, generator=g, device="cuda").bfloat16()
    v = torch.randn(heads * t, pf.v, generator=g, device="cuda").bfloat16()
    run, _ = pf.prepare(q, k, v, heads, t, t, scale)
    ms = median_ms(run)
    qs, ks, vs = (x.view(1, heads, t, -1) for x in (q, k, v))
    sdpa_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                                  scale=scale))
    flops = 2 * heads * t * (t + 1) / 2 * (pf.qk + pf.v)
    result.setdefault("prefill_timings", []).append({"kernel": name, "heads": heads, "t": t, "median_ms": ms,
                                                     "sdpa_ms": sdpa_ms, "TFLOPs": flops / (ms * 1e-3) / 1e12})
    print(f"{name}: T = S = {t} x {heads} heads causal: {ms:.3f} ms ({flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s); "
          f"torch SDPA {sdpa_ms:.3f} ms ({sdpa_ms / ms:.2f}x)")


def two_wave_splits(batch, heads, ctx, sms):
    """Enough splits for two waves of blocks, at most 128 and one per 8 pages: the runtime's bound (and its
    choice before 2026-12-05)."""
    most = max(1, min(128, math.ceil(math.ceil(ctx / PAGE) / 8)))
    blocks = max(1, batch * math.ceil(heads / PAGE))
    return max(1, min(most, math.ceil(2 * min(sms, 144) / blocks)))


def runtime_splits(batch, heads, ctx, sms):
    """The splits the runtime picks (runtime/src/lowering.rs attention_splits): of those up to the two waves'
    bound, the fewest with the least makespan, waves of blocks (one an SM) x (pages a split + 1)."""
    pages = max(1, math.ceil(ctx / PAGE))
    blocks = max(1, batch * math.ceil(heads / PAGE))
    sms = min(sms, 144)
    span = lambda s: math.ceil(blocks * s / sms) * (math.ceil(pages / s) + 1)  # noqa: E731
    return min(range(1, two_wave_splits(batch, heads, ctx, sms) + 1), key=lambda s: (span(s), s))


def check_decode(mla, result, copy):
    """The decode kernel (bf16 or fp8 cache) + combine on the paged problems, then its timing."""
    attn, comb = mla.names
    cases_of_this = []
    scale = 1 / math.sqrt(192)
    # (heads, lens, splits, tokens): tokens > 1 is MTP's speculative decoding (causal among the new tokens).
    cases = [(128, [1, 63, 64, 65, 1000], 1, 1), (128, [5000, 2, 300], 4, 1), (16, [4096, 129], 8, 1),
             (128, [700], 3, 1), (128, [64, 65], 8, 1), (16, [2, 65, 1000], 2, 2), (128, [130, 64], 3, 2),
             (16, [20000, 70], 39, 1)]
    for i, (heads, lens, splits, tokens) in enumerate(cases):
        if heads % (PAGE * mla.cluster):
            continue
        q, cache, table, lt = problem(heads, mla.kv, mla.rope, lens, seed=i, tokens=tokens)
        if mla.fp8:
            fp8_cache, cache = mla.quantize_cache(cache)
            run, out = mla.prepare(q, fp8_cache, table, lt, heads, splits, scale, tokens)
        else:
            run, out = mla.prepare(q, cache, table, lt, heads, splits, scale, tokens)
        run()
        torch.cuda.synchronize()
        ref = reference(q, cache, table, lens, heads, mla.kv, scale, tokens)
        finite = bool(torch.isfinite(out).all())
        rel = ((out.double() - ref).norm() / ref.norm()).item() if finite else float("nan")
        ok = finite and rel <= 1e-2
        cases_of_this.append({"kernel": attn, "heads": heads, "lens": lens, "splits": splits, "tokens": tokens,
                              "rel_err": rel, "ok": ok})
        print(f"{attn}: heads {heads} lens {lens} splits {splits} tokens {tokens}: rel err {rel:.2e} "
              f"{'ok' if ok else 'FAILED'}")
    result["cases"] += cases_of_this
    result["ok"] &= all(c["ok"] for c in cases_of_this)
    if not all(c["ok"] for c in cases_of_this):
        return
    # FlashMLA's point (64 x 4096), then one long sequence (the splits spread it over every SM).
    for heads, batch, ctx in [(128, 64, 4096), (128, 1, 32768)]:
        q, cache, table, lt = problem(heads, mla.kv, mla.rope, [ctx] * batch, seed=99)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        splits = runtime_splits(batch, heads, ctx, sms)
        if mla.fp8:
            # torch's baseline reads the bf16 cache: what the fp8 one halves.
            fp8_cache, _ = mla.quantize_cache(cache)
            run, out = mla.prepare(q, fp8_cache, table, lt, heads, splits, scale)
        else:
            run, out = mla.prepare(q, cache, table, lt, heads, splits, scale)
        ms = median_ms(run)
        # The attention kernel alone: what of the time the combine takes.
        attention_ms = median_ms(run.attention)
        # The former rule's splits (two waves), where they differ: the A/B of the makespan rule.
        former = {}
        bound = two_wave_splits(batch, heads, ctx, sms)
        if bound != splits:
            if mla.fp8:
                run_b, _ = mla.prepare(q, fp8_cache, table, lt, heads, bound, scale)
            else:
                run_b, _ = mla.prepare(q, cache, table, lt, heads, bound, scale)
            former = {"two_wave_splits": bound, "two_wave_ms": median_ms(run_b)}
        spin = {}
        if mla.attn_spin is not None:
            # The kernel waiting without the suspend hint: the same bits, then its time.
            run()
            torch.cuda.synchronize()
            first = out.clone()
            mla.attn, hinted = mla.attn_spin, mla.attn
            run()
            torch.cuda.synchronize()
            spin = {"no_suspend_hint_ms": median_ms(run), "no_suspend_hint_same_bits": bool(torch.equal(first, out))}
            mla.attn = hinted
            result["ok"] &= spin["no_suspend_hint_same_bits"]
        pages = table.long()
        rows = (pages[:, :, None] * PAGE + torch.arange(PAGE, device="cuda")).reshape(batch, -1)

        def torch_ref():
            k = cache[rows]  # [B, ctx, dim]
            s = torch.bmm(q.view(batch, heads, -1), k.transpose(1, 2)).float() * scale
            return torch.bmm(torch.softmax(s, dim=-1).bfloat16(), k[:, :, :mla.kv])
        torch_ms = median_ms(torch_ref)
        row_bytes = fp8_row_bytes(mla.kv, mla.rope)[2] if mla.fp8 else (mla.kv + mla.rope) * 2
        unique = batch * ctx * row_bytes + q.numel() * 2 + out.numel() * 4
        gbs = unique / (ms * 1e-3) / 1e9
        result.setdefault("timing", {})[f"{attn} {batch}x{ctx}"] = {
            "batch": batch, "context": ctx, "heads": heads, "splits": splits, "median_ms": ms,
            "attention_ms": attention_ms, "torch_ms": torch_ms,
            "GBps": gbs, "fraction_of_copy": gbs / (copy * 1e3) if copy else None, **spin, **former}
        frac = f", {100 * gbs / (copy * 1e3):.0f}% of copy" if copy else ""
        ab = (f"; without the suspend hint {spin['no_suspend_hint_ms']:.3f} ms, same bits "
              f"{spin['no_suspend_hint_same_bits']}" if spin else "")
        ab += (f"; {former['two_wave_splits']} splits (two waves) {former['two_wave_ms']:.3f} ms" if former else "")
        print(f"{attn} + {comb}: batch {batch} x context {ctx}, {heads} heads, {splits} splits: {ms:.3f} ms "
              f"(attention alone {attention_ms:.3f}) "
              f"({gbs:.0f} GB/s{frac}); torch gather+bmm {torch_ms:.3f} ms ({torch_ms / ms:.2f}x){ab}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptx-dir", help="directory with the two kernels' .ptx")
    ap.add_argument("--out", help="write mla.json here")
    ap.add_argument("--ceilings", help="ceilings.json from check.sh step 1b (copy bandwidth)")
    ap.add_argument("--self-test", action="store_true", help="check the reference's split arithmetic on the CPU")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return 0
    if not a.ptx_dir:
        ap.error("--ptx-dir is required (or --self-test)")
    stems = [f[:-4] for f in os.listdir(a.ptx_dir) if f.endswith(".ptx")]
    comb = next(s for s in stems if COMBINE.match(s))
    drv = Driver()
    result = {"kernels": [comb], "cases": [], "prefill_cases": [], "ok": True}
    copy = json.load(open(a.ceilings)).get("copy_TBps") if a.ceilings and os.path.exists(a.ceilings) else None
    for attn in sorted(s for s in stems if ATTN.match(s)):
        result["kernels"].append(attn)
        try:
            check_decode(Mla(drv, a.ptx_dir, attn, comb), result, copy)
        except RuntimeError as e:
            result["ok"] = False
            print(f"{attn}: FAILED: {e}")
    # Each prefill kernel (the ring depths the cost model and the tuner pick between).
    for prefill in sorted(s for s in stems if PREFILL.match(s)):
        result["kernels"].append(prefill)
        try:
            check_prefill(drv, a.ptx_dir, prefill, result)
        except RuntimeError as e:
            result["ok"] = False
            print(f"{prefill}: FAILED: {e}")
    training = sorted(s for s in stems if TRAIN.match(s))
    if training:
        result["kernels"] += training
        try:
            check_training(drv, a.ptx_dir, training, result)
        except RuntimeError as e:
            result["ok"] = False
            print(f"training flash kernels: FAILED: {e}")
    if a.out:
        json.dump(result, open(a.out, "w"), indent=1)
    print(f"mla_check: {'ok' if result['ok'] else 'FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
