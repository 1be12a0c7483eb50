#!/usr/bin/env python3
"""Correctness and speed of v3c's sm_90a GEMM template kernels on the device, against torch.

Run by benches/device/check.sh on the GPU machine (python3 + torch, no Rust). The PTX comes from the build
machine (benches/device/prepare.sh writes .device/gemm/<kernel>.ptx); the CUDA driver JIT-compiles it.
Kernels are launched through the driver API (ctypes on libcuda): module load, CUtensorMap encoding (2-D,
K innermost, 128-byte swizzle, out-of-bounds zero fill) copied to device memory, cuLaunchKernel with the
kernel's dynamic shared memory.

Kernel ABI (compiler/src/conversion/sm90/gemm.rs, `emit`): (a_map*, b_map*, out memref [M, N] as 7 scalars
(allocated, aligned, offset, size0, size1, stride0, stride1), fp8 only a_scale and b_scale memrefs [.., ..]
as 7 scalars each, `_res` the residual [M, N] (7), `_splitk` the f32 workspace [splits, M, N] (9), the i32
tile counters [tiles] (5, zeroed once) and splits, then k). out = A[M, K] . B[N, K]^T (+ residual). `_a2`: a
second A's tensor map after B's, out = (A + A2) . B^T with B read once (f32 activations as bf16 hi + lo: the
check splits f32 rows so and holds the output to the f32 activations' product).
Launch: 128 threads per consumer warpgroup (`_wg2`: two) plus 128 for the producer (`_ws`); a 1-D grid of
one block per unit (tile x K split), `_persist`: min(units, SM count); `_cl2`: the kernel declares clusters of
2 (two adjacent row tiles share the B tile; its tensor map's box is half the B tile), grid in whole clusters.

Checks (shared/design/GPU-CHECKS.md): fresh random inputs, output poisoned with NaN and checked fully written,
relative error ||out - ref|| / ||ref|| vs an f32 reference: bf16 <= 1e-2; fp8 vs an fp8-faithful reference
(the same e4m3 operands, f32 promotion per 128-wide K block with the 1x128 / 128x128 scales) <= 1e-3.

`--self-test` needs no GPU: it checks the fp8-faithful reference and the quantizers on the CPU.
"""
import argparse
import ctypes
import json
import math
import os
import re
import sys

import torch

NAME = re.compile(r"^gemm_(bf16|fp8)_(f32|bf16|fp8)_(\d+)x(\d+)x(\d+)_s(\d+)((?:_[a-z0-9]+)*)$")
# An mbarrier wait's optional suspend-time hint (its 4th operand): the template passes 10 ms (the
# upstream MLIR tests' value), which ptxas turns into NANOSLEEP.SYNCS on the retry path; CUTLASS waits
# without one. The timed shapes run both forms (an A/B of the same kernel otherwise).
SUSPEND_HINT = re.compile(r"(mbarrier\.try_wait\.parity[.\w:]*\s+[^,;]+,\s*\[[^\]]+\],\s*[^,;]+),\s*[^,;]+;")


def without_suspend_hint(ptx):
    """The PTX with every mbarrier wait's suspend-time hint dropped, and how many it dropped."""
    return SUSPEND_HINT.subn(r"\1;", ptx)
E4M3_MAX = 448.0


def parse(name):
    m = NAME.match(name)
    if not m:
        raise SystemExit(f"gemm_check: {name}: not a template kernel name")
    inp, out, bm, bn, bk, stages, rest = m.groups()
    bm, bn, bk, stages = int(bm), int(bn), int(bk), int(stages)
    opts = rest.split("_")[1:]
    consumers = next((int(o[2:]) for o in opts if o.startswith("wg")), 1)
    cluster = next((int(o[2:]) for o in opts if o.startswith("cl")), 1)
    ws = "ws" in opts
    dual = "a2" in opts
    return {"name": name, "input": inp, "output": out, "bm": bm, "bn": bn, "bk": bk, "stages": stages,
            "smem": stages * ((1 + dual) * bm + bn) * 128, "dual_a": dual, "threads": 128 * (consumers + ws), "persistent": "persist" in opts,
            "split_k": "splitk" in opts, "residual": "res" in opts, "swiglu": "swiglu" in opts,
            "row_scale": "rowscale" in opts, "cluster": cluster, "scatter": "scatter" in opts,
            "grouping": next((o for o in opts if o in ("contig", "gather", "masked")), None)}


def quantize_rows(x, group=128):
    """1 x group e4m3 quantization of rows: (e4m3 tensor, f32 scales [rows, ceil(k / group)])."""
    rows, k = x.shape
    blocks = math.ceil(k / group)
    pad = torch.zeros(rows, blocks * group, dtype=torch.float32, device=x.device)
    pad[:, :k] = x
    g = pad.view(rows, blocks, group)
    s = g.abs().amax(dim=2).clamp(min=1e-4) / E4M3_MAX
    q = (g / s[:, :, None]).to(torch.float8_e4m3fn).view(rows, blocks * group)[:, :k]
    return q.contiguous(), s


def quantize_blocks(w, block=128):
    """128 x 128 e4m3 weight quantization: (e4m3 tensor, f32 scales [ceil(n / 128), ceil(k / 128)])."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    pad = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    pad[:n, :k] = w
    g = pad.view(nb, block, kb, block)
    s = g.abs().amax(dim=(1, 3)).clamp(min=1e-4) / E4M3_MAX
    q = (g / s[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * block, kb * block)[:n, :k]
    return q.contiguous(), s


def fp8_reference(aq, a_s, bq, b_s):
    """The kernel's arithmetic in f32: per 128-wide K block, (A_b . B_b^T) * a_scale[:, b] * b_scale[n / 128, b],
    accumulated block by block."""
    m, k = aq.shape
    n = bq.shape[0]
    a, b = aq.float(), bq.float()
    out = torch.zeros(m, n, dtype=torch.float32, device=aq.device)
    col_scale = b_s.repeat_interleave(128, dim=0)[:n]  # [n, kb]
    for kb in range(math.ceil(k / 128)):
        lo, hi = kb * 128, min(k, (kb + 1) * 128)
        out += (a[:, lo:hi] @ b[:, lo:hi].T) * a_s[:, kb:kb + 1] * col_scale[:, kb][None, :]
    return out


def self_test():
    torch.manual_seed(0)
    # A second A: the kernel's name, its shared memory (two A tiles a stage), and hi + lo rows whose
    # bf16 products sum to the f32 rows' within the check's tolerance.
    cfg = parse("gemm_bf16_f32_64x256x64_s2_a2")
    assert cfg["dual_a"] and cfg["smem"] == 2 * (2 * 64 + 256) * 128, cfg
    inputs, ref, tol = make_inputs(cfg, 5, 40, 300, device="cpu")
    dual = inputs["a"].float() @ inputs["b"].float().T + inputs["a2"].float() @ inputs["b"].float().T
    rel = ((dual - ref).norm() / ref.norm()).item()
    assert rel < tol / 10, f"hi + lo products vs the f32 rows' product: {rel}"
    hi_only = ((inputs["a"].float() @ inputs["b"].float().T - ref).norm() / ref.norm()).item()
    assert hi_only > tol, f"hi alone is within {hi_only}: the check would not see a dropped lo"

    for m, n, k in [(3, 5, 200), (130, 129, 300)]:
        a, w = torch.randn(m, k) * 3, torch.randn(n, k) * 0.05
        aq, a_s = quantize_rows(a)
        bq, b_s = quantize_blocks(w)
        ref = fp8_reference(aq, a_s, bq, b_s).double()
        # The same product from fully dequantized operands in float64.
        a_deq = aq.double() * a_s.double().repeat_interleave(128, dim=1)[:, :k]
        w_deq = bq.double() * b_s.double().repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)[:, :k]
        exact = a_deq @ w_deq.T
        rel = ((ref - exact).norm() / exact.norm()).item()
        assert rel < 1e-6, f"fp8 reference vs float64 dequantized product: {rel}"
        quant = ((a_deq - a.double()).norm() / a.double().norm()).item()
        assert quant < 0.05, f"1x128 quantization error {quant}"
    # The grouped reference, row by row from the kernel's inputs: sorted row p of group g is its A row
    # (gathered: token perm[p]; masked: slot g * cap + i) times group g's rows of the stacked B.
    for name in ["gemm_fp8_f32_128x128x128_s6_wg2_ws_gather_rowscale", "gemm_bf16_bf16_64x128x64_s8_ws_masked_swiglu",
                 "gemm_fp8_f32_128x128x128_s6_ws_contig", "gemm_fp8_f32_128x128x128_s6_ws_contig_rowscale_scatter"]:
        cfg = parse(name)
        inputs, ref, _, n = grouped_problem(cfg, 128, 256, "cpu")
        offsets, fp8 = inputs["offsets"].tolist(), cfg["input"] == "fp8"
        mine = torch.zeros(inputs["rows"], 128)
        for grp in range(inputs["groups"]):
            for p in range(offsets[grp], offsets[grp + 1]):
                r = {"masked": grp * inputs["cap"] + p - offsets[grp], "gather": int(inputs["perm"][p])}.get(
                    cfg["grouping"], p)
                a = inputs["a"].view(torch.float8_e4m3fn)[r].float() if fp8 else inputs["a"][r].float()
                w = inputs["b"].view(torch.float8_e4m3fn) if fp8 else inputs["b"]
                w = w[grp * n:(grp + 1) * n].float()
                if fp8:
                    a = a * inputs["a_scale"][r].repeat_interleave(128)[:a.shape[0]]
                    ws = inputs["b_scale"][grp * n // 128:(grp + 1) * n // 128]
                    w = w * ws.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :w.shape[1]]
                y = w @ a
                if cfg["swiglu"]:
                    y = y.view(-1, 2, cfg["bn"] // 2)
                    y = (torch.nn.functional.silu(y[:, 0]) * y[:, 1]).reshape(-1)
                if cfg["row_scale"]:
                    y = y * (inputs["row_scale"][r] if cfg["grouping"] == "masked" else inputs["row_scale"][p])
                mine[p] = y
        if cfg["scatter"]:
            mine = torch.zeros(inputs["tokens"], 128).index_add_(0, inputs["perm"].long(), mine)
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-4), f"{name}: grouped reference"
    # fp8 outputs are compared with the reference quantized 1x128: close to it, and exact on a grid value.
    ref = torch.randn(5, 300)
    deq, tol = expected(parse("gemm_bf16_fp8_128x128x64_s6_wg2_ws"), ref, 1e-2)
    assert tol == 2e-2 and ((deq - ref).norm() / ref.norm()).item() < 0.05
    grid = torch.tensor([[448.0, -224.0, 0.0, 1.0]])
    assert torch.equal(expected(parse("gemm_bf16_fp8_128x128x64_s6"), grid, 1e-2)[0], grid)
    waits = ("\tmbarrier.try_wait.parity.shared.b64 P1, [%r24], %r25, %r26; \n"
             "\tmbarrier.try_wait.parity.shared::cta.b64 P1, [%r7+8], %r9;\n")
    stripped, n = without_suspend_hint(waits)
    assert n == 1 and stripped == waits.replace(", %r26;", ";"), stripped
    print("gemm_check self-test: fp8-faithful reference == float64 dequantized product; quantizers sane; "
          "grouped references agree row by row; suspend hints dropped")


class Driver:
    """The few CUDA driver calls the check needs."""

    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        torch.cuda.init()
        torch.empty(1, device="cuda")  # a current context (torch's primary context)

    def check(self, rc, what):
        if rc != 0:
            msg = ctypes.c_char_p()
            self.cu.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what}: CUDA error {rc} ({msg.value.decode() if msg.value else '?'})")

    def load(self, ptx, name):
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.cu.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(ptx.encode() + b"\0")),
                   f"{name}: cuModuleLoadData")
        self.check(self.cu.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), f"{name}: get function")
        return func

    def tensor_map(self, t, box_rows, box_k, dtype_code, swizzle=3):
        """A 2-D CUtensorMap for a row-major [rows, k] tensor (rows may be further apart than k elements:
        a column slice), copied to device memory (returns the tensor holding it; its data_ptr is the
        kernel argument). `swizzle`: 3 = 128-byte, 0 = none."""
        rows, k = t.shape
        elem = t.element_size()
        assert t.stride(1) == 1, "a tensor map's columns are contiguous"
        tmap = (ctypes.c_uint8 * 128)()
        gdim = (ctypes.c_uint64 * 2)(k, rows)
        gstride = (ctypes.c_uint64 * 1)(t.stride(0) * elem)
        box = (ctypes.c_uint32 * 2)(box_k, box_rows)
        estride = (ctypes.c_uint32 * 2)(1, 1)
        # interleave none (0), the swizzle, L2 promotion none (0), out-of-bounds fill zero (0).
        rc = self.cu.cuTensorMapEncodeTiled(ctypes.byref(tmap), dtype_code, 2, ctypes.c_void_p(t.data_ptr()), gdim,
                                            gstride, box, estride, 0, swizzle, 0, 0)
        self.check(rc, "cuTensorMapEncodeTiled")
        dev = torch.empty(128, dtype=torch.uint8, device="cuda")
        dev.copy_(torch.frombuffer(bytearray(tmap), dtype=torch.uint8))
        return dev

    def launch(self, func, grid, threads, smem, args, name):
        self.check(self.cu.cuFuncSetAttribute(func, 8, smem), f"{name}: max dynamic shared memory")  # attr 8
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = self.cu.cuLaunchKernel(func, grid, 1, 1, threads, 1, 1, smem, stream, params, None)
        self.check(rc, f"{name}: cuLaunchKernel")


def memref_args(t):
    """A contiguous tensor as the lowered memref's scalars: pointers, offset, sizes, strides."""
    p = t.data_ptr()
    return ([ctypes.c_uint64(p), ctypes.c_uint64(p), ctypes.c_int64(0)] + [ctypes.c_int64(d) for d in t.shape]
            + [ctypes.c_int64(st) for st in t.stride()])


class Output:
    """A kernel's output buffer, poisoned (NaN; fp8: the e4m3 NaN byte 0x7f and NaN scales) so that
    unwritten elements show; `value()` gives f32 values (fp8: dequantized with the 1x128 scales)."""

    def __init__(self, cfg, rows, cols):
        self.fp8 = cfg["output"] == "fp8"
        if self.fp8:
            self.data = torch.full((rows, cols), 0x7F, device="cuda", dtype=torch.uint8)
            self.scale = torch.full((rows, math.ceil(cols / 128)), float("nan"), device="cuda")
        else:
            dtype = torch.float32 if cfg["output"] == "f32" else torch.bfloat16
            self.data = torch.full((rows, cols), float("nan"), device="cuda", dtype=dtype)

    def args(self):
        return memref_args(self.data) + (memref_args(self.scale) if self.fp8 else [])

    def value(self):
        if not self.fp8:
            return self.data.float()
        scale = self.scale.repeat_interleave(128, dim=1)[:, :self.data.shape[1]]
        return self.data.view(torch.float8_e4m3fn).float() * scale


def expected(cfg, ref, tol):
    """What a kernel's output is compared with: the reference, or for fp8 outputs the reference
    quantized the same way (1x128, s = max(amax, 1e-4) / 448). An element whose f32 value sits on a
    rounding boundary may round to its neighbour (one e4m3 step, ~6%): hence 2e-2 for fp8 outputs; bf16
    outputs are held to 1e-2 as the bf16 GEMMs are."""
    if cfg["output"] == "bf16":
        # bf16 outputs round each element to 8 bits of mantissa: ~1.7e-3 relative (seen on the H200
        # for fp8 operands as for bf16 ones), over the fp8 reference's 1e-3.
        return ref, max(tol, 1e-2)
    if cfg["output"] != "fp8":
        return ref, tol
    q, s = quantize_rows(ref)
    return q.float() * s.repeat_interleave(128, dim=1)[:, :ref.shape[1]], max(tol, 2e-2)


def splits_for(cfg, m, n, k, sms):
    """K splits for a split-K kernel: enough units to cover the SMs, at most one per K tile."""
    if not cfg["split_k"]:
        return 1
    tiles = math.ceil(m / cfg["bm"]) * math.ceil(n / cfg["bn"])
    return max(1, min(math.ceil(k / cfg["bk"]), sms // tiles))


def prepare(drv, cfg, m, n, k, inputs, out, sms):
    """Kernel arguments for one problem (the tensor maps live in the returned list's tensors)."""
    bf16 = cfg["input"] == "bf16"
    code = 9 if bf16 else 0  # CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 / UINT8
    a_map = drv.tensor_map(inputs["a"], cfg["bm"], cfg["bk"], code)
    # A cluster's blocks each load (and multicast) 1 / cluster of the B tile's rows.
    b_map = drv.tensor_map(inputs["b"], cfg["bn"] // cfg["cluster"], cfg["bk"], code)
    args = [ctypes.c_uint64(a_map.data_ptr()), ctypes.c_uint64(b_map.data_ptr())]
    keep = [a_map, b_map]
    if cfg["dual_a"]:
        a2_map = drv.tensor_map(inputs["a2"], cfg["bm"], cfg["bk"], code)
        args.append(ctypes.c_uint64(a2_map.data_ptr()))
        keep.append(a2_map)
    args += out.args()
    if not bf16:
        args += memref_args(inputs["a_scale"]) + memref_args(inputs["b_scale"])
    if cfg["residual"]:
        args += memref_args(inputs["residual"])
    tiles = math.ceil(m / cfg["bm"]) * math.ceil(n / cfg["bn"])
    splits = splits_for(cfg, m, n, k, sms)
    if cfg["split_k"]:
        ws = torch.empty(splits, m, n, device="cuda", dtype=torch.float32)
        counters = torch.zeros(tiles, device="cuda", dtype=torch.int32)
        args += memref_args(ws) + memref_args(counters) + [ctypes.c_int64(splits)]
        keep += [ws, counters]
    args.append(ctypes.c_int64(k))
    # Units per cluster: `cluster` adjacent row tiles of one tile column (GemmConfig::grid).
    cl = cfg["cluster"]
    units = math.ceil(math.ceil(m / cfg["bm"]) / cl) * math.ceil(n / cfg["bn"]) * splits
    grid = (min(units, sms // cl) if cfg["persistent"] else units) * cl
    return {"args": args, "grid": grid, "splits": splits, "keep": keep}


def grouped_problem(cfg, n_out, k, device, groups=9, tokens=37, cap=64, seed=0):
    """A grouped (MoE) problem for a `_contig`, `_gather` or `_masked` kernel, its reference, and its
    kernel arguments' tensors. Group g (expert) owns `counts[g]` rows (some zero); B stacks the groups'
    [N, K] weights (SwiGLU: per block_n rows, block_n / 2 gate rows then the matching up rows)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, cap + 1, (groups,), generator=g)
    counts[1] = 0
    rows = int(counts.sum())
    n = 2 * n_out if cfg["swiglu"] else n_out
    w = (torch.randn(groups * n, k, generator=g) * 0.05).to(device)
    tok = torch.randint(0, tokens, (rows,), generator=g).to(device)  # gather: token of each sorted row
    x = (torch.randn(tokens if cfg["grouping"] == "gather" else rows, k, generator=g) * 2).to(device)
    row_w = torch.rand(rows, generator=g).to(device)
    fp8 = cfg["input"] == "fp8"
    if fp8:
        xq, x_s = quantize_rows(x)
        wq, w_s = quantize_blocks(w)
        xf = xq.float() * x_s.repeat_interleave(128, dim=1)[:, :k]
        wf = wq.float() * w_s.repeat_interleave(128, dim=0)[:w.shape[0]].repeat_interleave(128, dim=1)[:, :k]
        a_dev, b_dev = xq.view(torch.uint8), wq.view(torch.uint8)
    else:
        xf, wf = x.to(torch.bfloat16).float(), w.to(torch.bfloat16).float()
        a_dev, b_dev = x.to(torch.bfloat16), w.to(torch.bfloat16)
    a_rows = xf[tok] if cfg["grouping"] == "gather" else xf  # [rows, k] in group-sorted order
    ref = torch.empty(rows, n_out, device=device)
    start = 0
    for grp in range(groups):
        c = int(counts[grp])
        y = a_rows[start:start + c] @ wf[grp * n:(grp + 1) * n].T
        if cfg["swiglu"]:
            h = cfg["bn"] // 2
            y = y.view(c, n // cfg["bn"], 2, h)
            y = (torch.nn.functional.silu(y[:, :, 0]) * y[:, :, 1]).reshape(c, n_out)
        ref[start:start + c] = y
        start += c
    if cfg["row_scale"]:
        ref = ref * row_w[:, None]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).to(device)
    inputs = {"b": b_dev, "row_scale": row_w, "offsets": offsets, "perm": tok.to(torch.int32),
              "counts": counts.to(torch.int32).to(device), "cap": cap, "groups": groups, "rows": rows, "tokens": tokens}
    if cfg["scatter"]:
        # Each sorted row adds into its token's row (the MoE combine).
        ref = torch.zeros(tokens, n_out, device=device).index_add_(0, tok, ref)
    if cfg["grouping"] == "masked":
        # Group g's rows live at [g * cap, g * cap + counts[g]) of A and of the output.
        slot = torch.cat([torch.arange(int(c)) + grp * cap for grp, c in enumerate(counts)]).to(device)
        a_m = torch.zeros(groups * cap, k, device=device, dtype=a_dev.dtype)
        a_m[slot] = a_dev
        inputs["a"], inputs["slot"] = a_m, slot
        if fp8:
            s_m = torch.zeros(groups * cap, x_s.shape[1], device=device)
            s_m[slot] = x_s
            inputs["a_scale"] = s_m
        inputs["row_scale"] = torch.zeros(groups * cap, device=device).index_copy(0, slot, row_w)
    else:
        inputs["a"] = a_dev
        if fp8:
            inputs["a_scale"] = x_s.contiguous()
    if fp8:
        inputs["b_scale"] = w_s.contiguous()
    return inputs, ref, (1e-3 if fp8 else 1e-2), n


def prepare_grouped(drv, cfg, inputs, out, n, k, sms):
    if cfg["dual_a"]:
        # (The full model's grouped GEMMs are fp8; `v3r tune` and the simulated tests check these.)
        raise SystemExit(f"gemm_check: {cfg['name']}: grouped kernels with a second A are not launched here")
    code = 9 if cfg["input"] == "bf16" else 0
    a_map = drv.tensor_map(inputs["a"], 1 if cfg["grouping"] == "gather" else cfg["bm"], cfg["bk"], code)
    b_map = drv.tensor_map(inputs["b"], cfg["bn"], cfg["bk"], code)
    args = [ctypes.c_uint64(a_map.data_ptr()), ctypes.c_uint64(b_map.data_ptr())] + out.args()
    if cfg["input"] == "fp8":
        args += memref_args(inputs["a_scale"]) + memref_args(inputs["b_scale"])
    if cfg["grouping"] == "masked":
        args += memref_args(inputs["counts"]) + [ctypes.c_int64(inputs["cap"])]
        rows = inputs["groups"] * inputs["cap"]
    else:
        args += memref_args(inputs["offsets"])
        if cfg["grouping"] == "gather" or cfg["scatter"]:
            args += memref_args(inputs["perm"])
        rows = inputs["rows"]
    if cfg["row_scale"]:
        args += memref_args(inputs["row_scale"])
    args.append(ctypes.c_int64(k))
    units = (math.ceil(rows / cfg["bm"]) + inputs["groups"]) * math.ceil(n / cfg["bn"])
    grid = min(units, sms) if cfg["persistent"] else units
    return {"args": args, "grid": grid, "splits": 1, "keep": [a_map, b_map]}


def check_grouped(drv, func, cfg, sms):
    """Correctness of a grouped kernel on two problem sizes; returns result records."""
    results = []
    for n_out, k in [(256, 512), (384, 1040)]:
        inputs, ref, tol, n = grouped_problem(cfg, n_out, k, "cuda")
        ref, tol = expected(cfg, ref, tol)
        rows = inputs["groups"] * inputs["cap"] if cfg["grouping"] == "masked" else inputs["rows"]
        out = Output(cfg, inputs["tokens"] if cfg["scatter"] else rows, n_out)
        if cfg["scatter"]:
            out.data.zero_()  # the kernel adds into it
        launch = prepare_grouped(drv, cfg, inputs, out, n, k, sms)
        run(drv, func, cfg, launch)
        torch.cuda.synchronize()
        o = out.value()
        untouched = True
        if cfg["grouping"] == "masked":
            keep = torch.zeros(rows, dtype=torch.bool, device="cuda")
            keep[inputs["slot"]] = True
            untouched = bool(torch.isnan(o[~keep]).all())  # rows past a group's count are not written
            o = o[inputs["slot"]]
        written = bool(torch.isfinite(o).all())
        rel = float((o - ref).norm() / ref.norm()) if written else float("nan")
        ok = written and untouched and rel <= tol
        results.append({"kernel": cfg["name"], "rows": inputs["rows"], "n": n_out, "k": k, "groups": inputs["groups"],
                        "rel_err": rel, "tolerance": tol, "fully_written": written, "ok": ok})
        print(f"{cfg['name']:52s} {inputs['rows']:5d} rows x{n_out:5d}x{k:5d} in {inputs['groups']} groups  "
              f"rel err {rel:.2e} (<= {tol:g})  {'ok' if ok else 'FAIL'}")
    return results


def random_operand(rows, cols, fp8):
    """Timing operands: random e4m3 bytes (no NaN encodings) or bf16 values."""
    if fp8:
        mag = torch.randint(0, 0x7E, (rows, cols), device="cuda", dtype=torch.uint8)
        sign = torch.randint(0, 2, (rows, cols), device="cuda", dtype=torch.uint8) << 7
        return mag | sign
    return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)


def time_grouped(drv, func, cfg, sms, tokens=4096, experts=256, top_k=8):
    """DeepSeek-V3's MoE shapes, 256 routed experts + the shared one as group 257: gate/up (gathered, or
    contiguous without routing weights: N 2 x 2048, K 7168), down (contiguous with routing weights: N 7168,
    K 2048) over 4096 tokens x 9; decode (masked) 64 tokens.
    Reports TFLOP/s and the bandwidth of the expert weights the launch reads."""
    groups = experts + 1
    decode = cfg["grouping"] == "masked"
    if decode:
        tokens = 64
    choice = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=1).indices
    counts = torch.bincount(choice.flatten(), minlength=experts).cpu()
    counts = torch.cat([counts, torch.tensor([tokens])])  # the shared expert takes every token
    down = cfg["grouping"] == "contig" and (cfg["row_scale"] or cfg["scatter"])
    n, k = (7168, 2048) if down else (4096, 7168)
    n_out = n // 2 if cfg["swiglu"] else n
    fp8 = cfg["input"] == "fp8"
    rows = int(counts.sum())
    cap = 64
    a_rows = groups * cap if decode else (tokens if cfg["grouping"] == "gather" else rows)
    order = torch.argsort(choice.flatten(), stable=True)
    perm = torch.cat([(order // top_k), torch.arange(tokens, device="cuda")]).to(torch.int32)
    inputs = {"a": random_operand(a_rows, k, fp8), "b": random_operand(groups * n, k, fp8), "groups": groups,
              "rows": rows, "tokens": tokens, "cap": cap, "perm": perm, "counts": counts.to(torch.int32).cuda(),
              "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).cuda()}
    if fp8:
        inputs["a_scale"] = torch.rand(a_rows, math.ceil(k / 128), device="cuda") * 1e-2
        inputs["b_scale"] = torch.rand(groups * n // 128, math.ceil(k / 128), device="cuda") * 1e-2
    inputs["row_scale"] = torch.rand(a_rows if decode else rows, device="cuda")
    out = Output(cfg, tokens if cfg["scatter"] else (a_rows if decode else rows), n_out)
    launch = prepare_grouped(drv, cfg, inputs, out, n, k, sms)
    ms = median_ms(lambda: run(drv, func, cfg, launch))
    active = int((counts > 0).sum())
    flops = 2 * rows * n * k
    weight_bytes = active * n * k * (1 if fp8 else 2)
    rec = {"kernel": cfg["name"], "rows": rows, "groups": groups, "active_groups": active, "n": n, "k": k, "ms": ms,
           "TFLOPs": flops / (ms * 1e-3) / 1e12, "weight_GBps": weight_bytes / (ms * 1e-3) / 1e9, "grid": launch["grid"]}
    print(f"{cfg['name']:52s} {rows:6d} rows in {active}/{groups} groups x{n:5d}x{k:5d}  {rec['TFLOPs']:7.1f} TFLOP/s, "
          f"weights {rec['weight_GBps']:7.0f} GB/s")
    return rec


def run(drv, func, cfg, launch):
    drv.launch(func, launch["grid"], cfg["threads"], cfg["smem"], launch["args"], cfg["name"])


def split_bf16(x):
    """f32 rows as bf16 hi + lo (round to nearest even), as rows_splitbf16 writes them."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def make_inputs(cfg, m, n, k, device="cuda"):
    a = torch.randn(m, k, device=device) * 2
    w = torch.randn(n, k, device=device) * 0.05
    if cfg["dual_a"]:
        # f32 activations as hi + lo: the product of the f32 rows to ~2^-16 (held to 1e-4).
        hi, lo = split_bf16(a)
        w16 = w.to(torch.bfloat16)
        inputs, ref, tol = {"a": hi, "a2": lo, "b": w16}, a @ w16.float().T, 1e-4
    elif cfg["input"] == "bf16":
        a16, w16 = a.to(torch.bfloat16), w.to(torch.bfloat16)
        inputs, ref, tol = {"a": a16, "b": w16}, a16.float() @ w16.float().T, 1e-2
    else:
        aq, a_s = quantize_rows(a)
        bq, b_s = quantize_blocks(w)
        inputs = {"a": aq.view(torch.uint8), "b": bq.view(torch.uint8), "a_scale": a_s.contiguous(),
                  "b_scale": b_s.contiguous()}
        ref, tol = fp8_reference(aq, a_s, bq, b_s), 1e-3
    if cfg["residual"]:
        out_dtype = torch.float32 if cfg["output"] == "f32" else torch.bfloat16  # fp8 outputs take no residual
        inputs["residual"] = torch.randn(m, n, device=device).to(out_dtype)
        ref = ref + inputs["residual"].float()
    return inputs, ref, tol


# Evicts L2 before each timed launch, and keeps the stream busy while the host enqueues it.
_FLUSH = []
# GPU cycles the stream waits after the flush (about 0.5 ms): the host's launches (tens of µs each
# through ctypes) are queued behind it, so that none of their overhead falls between the events.
HOLD_CYCLES = 1_000_000


def median_ms(fn, reps=20):
    """Median GPU time of `fn`'s launches in ms, as the runtime's `v3r tune` measures (after a 256 MiB
    memset that evicts L2: the inputs come from DRAM), with the stream held until the host has queued
    them: the time between the events is the kernels', not the host's launch overhead. (Timed right
    behind the start event, run 1's 64x2112x7168 decode GEMMs took 79 µs at best here, where `v3r
    tune`, whose launches queue behind its flush, measured 21 µs: most likely the ctypes launch.)"""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    hold = getattr(torch.cuda, "_sleep", None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        _FLUSH[0].zero_()
        if hold is not None:
            hold(HOLD_CYCLES)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ptx-dir", help="directory of <kernel>.ptx files")
    ap.add_argument("--kernel", help="check only this kernel (check.sh runs each in its own process, under a timeout)")
    ap.add_argument("--out", default="gemm_results.json")
    ap.add_argument("--self-test", action="store_true", help="check the references on the CPU and exit")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return 0
    drv = Driver()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(1234)
    results, failed = [], 0
    # K a multiple of 16 (TMA row pitch); 528 leaves a ragged last K block, 200 and 1 ragged M tiles.
    shapes = [(64, 2112, 7168), (128, 576, 1536), (200, 384, 528), (1, 256, 256)]
    timed = [(4096, 7168, 16384), (64, 2112, 7168)]
    # The head's decode shape (f32 activations as bf16 hi + lo): timed for the dual-A kernels (the weights
    # read once) and for the plain dense bf16 -> f32 ones, the head's former form, one GEMM a half (two
    # launches: about twice a plain kernel's time) — the A/B of the second A.
    head = [(64, 129280, 7168)]
    # The router's gate at prefill (f32 activations as hi + lo, N = 256 experts): checked and timed for the
    # dual-A kernels; rows_check times the CUDA-core pieces it replaces (`rows_routelogits_*_b8`) at 8192 rows.
    gate = [(8192, 256, 7168)]
    for path in sorted(os.listdir(args.ptx_dir)):
        if not path.endswith(".ptx") or (args.kernel and path != args.kernel + ".ptx"):
            continue
        cfg = parse(path[:-4])
        ptx = open(os.path.join(args.ptx_dir, path)).read()
        func = drv.load(ptx, cfg["name"])
        spin_ptx, hints = without_suspend_hint(ptx)
        spin = drv.load(spin_ptx, cfg["name"]) if hints else None
        if cfg["grouping"]:
            recs = check_grouped(drv, func, cfg, sms)
            failed += sum(not r["ok"] for r in recs)
            results += recs
            results.append(time_grouped(drv, func, cfg, sms))
            continue
        for m, n, k in shapes + (gate if cfg["dual_a"] else []):
            inputs, ref, tol = make_inputs(cfg, m, n, k)
            ref, tol = expected(cfg, ref, tol)
            out = Output(cfg, m, n)
            launch = prepare(drv, cfg, m, n, k, inputs, out, sms)
            run(drv, func, cfg, launch)
            torch.cuda.synchronize()
            o = out.value()
            written = bool(torch.isfinite(o).all())
            rel = float((o - ref).norm() / ref.norm()) if written else float("nan")
            ok = written and rel <= tol
            extra = ""
            if cfg["split_k"] and written:
                # The last unit of each tile resets its counter; a second launch gives the same bits.
                first = out.data.clone()
                run(drv, func, cfg, launch)
                torch.cuda.synchronize()
                counters_zero = bool((launch["keep"][-1] == 0).all())
                same = bool(torch.equal(first, out.data))
                ok = ok and counters_zero and same
                extra = f"  splits {launch['splits']}, counters reset {counters_zero}, deterministic {same}"
            failed += not ok
            results.append({"kernel": cfg["name"], "m": m, "n": n, "k": k, "rel_err": rel, "tolerance": tol,
                            "fully_written": written, "ok": ok, "splits": launch["splits"]})
            print(f"{cfg['name']:44s} {m:5d}x{n:5d}x{k:5d}  rel err {rel:.2e} (<= {tol:g}){extra}  {'ok' if ok else 'FAIL'}")
        plain_bf16 = cfg["input"] == "bf16" and cfg["output"] == "f32" and not cfg["residual"]
        for m, n, k in timed + (head if cfg["dual_a"] or plain_bf16 else []) + (gate if cfg["dual_a"] else []):
            inputs, _, _ = make_inputs(cfg, m, n, k)
            out = Output(cfg, m, n)
            launch = prepare(drv, cfg, m, n, k, inputs, out, sms)
            ms = median_ms(lambda: run(drv, func, cfg, launch))
            a16, b16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            torch_ms = median_ms(lambda: a16 @ b16.T)
            tf, torch_tf = 2 * m * n * k / (ms * 1e-3) / 1e12, 2 * m * n * k / (torch_ms * 1e-3) / 1e12
            # The weights' (B's) bytes over the time: what bounds the decode shapes.
            weight_gbps = n * k * (2 if cfg["input"] == "bf16" else 1) / (ms * 1e-3) / 1e9
            rec = {"kernel": cfg["name"], "m": m, "n": n, "k": k, "ms": ms, "TFLOPs": tf,
                   "torch_bf16_TFLOPs": torch_tf, "splits": launch["splits"], "grid": launch["grid"],
                   "weight_GBps": weight_gbps}
            ab = ""
            if spin is not None:
                # The same kernel waiting without the suspend hint: the same bits, then its time.
                run(drv, func, cfg, launch)
                torch.cuda.synchronize()
                first = out.data.clone()
                run(drv, spin, cfg, launch)
                torch.cuda.synchronize()
                same = bool(torch.equal(first, out.data))
                spin_ms = median_ms(lambda: run(drv, spin, cfg, launch))
                rec.update({"no_suspend_hint_ms": spin_ms, "no_suspend_hint_same_bits": same})
                ab = f"; without the suspend hint {ms / spin_ms:.3f}x as fast, same bits {same}"
                failed += not same
            results.append(rec)
            print(f"{cfg['name']:44s} {m:5d}x{n:5d}x{k:5d}  {tf:7.1f} TFLOP/s (torch bf16 {torch_tf:7.1f}, ratio "
                  f"{tf / torch_tf:.2f}), weights {weight_gbps:6.0f} GB/s{ab}")
    json.dump(results, open(args.out, "w"), indent=1)
    print(f"gemm_check: {failed} failed of {sum(1 for r in results if 'ok' in r)} correctness runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
