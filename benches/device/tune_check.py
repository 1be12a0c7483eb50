#!/usr/bin/env python3
"""Measure the GEMM candidates `v3c tune --emit-candidates DIR` wrote and write the tuning database.

Run by benches/device/check.sh on the GPU machine (python3 + torch): for every problem in
DIR/candidates.json (a kernel signature at decode or prefill M), fresh inputs of its shape, the default
configuration's output as the reference, then each candidate: its output must match the default's
(relative error <= 1e-3 for fp8, 1e-2 for bf16) or it is rejected; the median of many timed launches
(CUDA events, warm-up, L2 flushed before each) with the others. The database (compiler/src/tune/db.rs
format) is merged into --out: entries keyed by compiler version, GPU, kernel signature and M bucket.

Attention problems (the MLA kernels' ring depths) and reductions (row kernels' widths) are left to `v3r tune`. Grouped (MoE) problems carry their routing (routed and shared experts, top-k): the tokens are routed at
random, the shared experts take every token, as gemm_check.py's grouped timing does.

`--self-test` needs no GPU: it writes a database from made-up timings and checks its layout.
"""
import argparse
import datetime
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm_check as gc  # noqa: E402  (the driver, inputs and launch helpers)

DB_FORMAT_VERSION = 1


def entry(candidates, problem, gpu, cc, timings, rejected, measured_on):
    """One database entry (the fields of DbEntry in compiler/src/tune/db.rs)."""
    return {
        "compiler_version": candidates["compiler_version"],
        "gpu": gpu,
        "compute_capability": list(cc),
        "kernel": problem["kernel"],
        "m_bucket": problem["m_bucket"],
        "candidates_sha256": problem["candidates_sha256"],
        "default_config": problem["default"],
        "timings": [[name, ms] for name, ms in sorted(timings.items())],
        "rejected": sorted(rejected),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "measured_on": measured_on,
    }


def merge(path, entries):
    """Adds `entries` to the database at `path` (replacing same-key ones), sorted as v3c writes it."""
    db = {"format_version": DB_FORMAT_VERSION, "entries": []}
    if os.path.exists(path):
        db = json.load(open(path))
        if db.get("format_version") != DB_FORMAT_VERSION:
            raise SystemExit(f"tune_check: {path}: format_version {db.get('format_version')}, this writes {DB_FORMAT_VERSION}")
    key = lambda e: (e["gpu"], e["kernel"], e["m_bucket"], e["compiler_version"])
    new = {key(e) for e in entries}
    db["entries"] = sorted([e for e in db["entries"] if key(e) not in new] + entries, key=key)
    tmp = path + ".tmp"
    json.dump(db, open(tmp, "w"), indent=2)
    os.replace(tmp, path)
    return db


def gpu_short_name(device_name):
    """`NVIDIA H200` -> `H200` (the cost model's device names)."""
    for known in ["H200", "H100", "H800", "H20"]:
        if known in device_name:
            return known
    return device_name.replace("NVIDIA ", "")


def grouped_inputs(problem, cfg):
    """Inputs of a grouped (MoE) problem: `m` tokens routed to `top_k` of `routed` experts at random
    plus every token to each shared expert (their groups follow the routed ones); random e4m3 or bf16
    operands and scales as gemm_check.time_grouped makes them. Returns (inputs, output rows)."""
    import torch
    g = problem["grouped"]
    tokens, n, k = problem["m"], problem["n"], problem["k"]
    routed, shared, top_k = g["routed"], g["shared"], g["top_k"]
    if cfg["grouping"] not in ("gather", "contig"):
        raise SystemExit(f"tune_check: {cfg['name']}: grouping {cfg['grouping']} is not measured here")
    groups = routed + shared
    choice = torch.rand(tokens, routed, device="cuda").topk(top_k, dim=1).indices
    counts = torch.bincount(choice.flatten(), minlength=routed).cpu()
    counts = torch.cat([counts, torch.full((shared,), tokens)])
    rows = int(counts.sum())
    order = torch.argsort(choice.flatten(), stable=True)
    perm = torch.cat([order // top_k] + [torch.arange(tokens, device="cuda")] * shared).to(torch.int32)
    fp8 = cfg["input"] == "fp8"
    a_rows = tokens if cfg["grouping"] == "gather" else rows
    inputs = {"a": gc.random_operand(a_rows, k, fp8), "b": gc.random_operand(groups * n, k, fp8), "groups": groups,
              "rows": rows, "tokens": tokens, "cap": 0, "perm": perm, "counts": counts.to(torch.int32).cuda(),
              "offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).cuda(),
              "row_scale": torch.rand(rows, device="cuda")}
    if fp8:
        inputs["a_scale"] = torch.rand(a_rows, math.ceil(k / 128), device="cuda") * 1e-2
        inputs["b_scale"] = torch.rand(groups * n // 128, math.ceil(k / 128), device="cuda") * 1e-2
    return inputs, (tokens if cfg["scatter"] else rows)


def measure(args):
    import torch
    candidates = json.load(open(os.path.join(args.dir, "candidates.json")))
    drv = gc.Driver()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gpu = gpu_short_name(torch.cuda.get_device_name())
    cc = torch.cuda.get_device_capability()
    measured_on = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # larger than L2
    entries = []
    for problem in candidates["problems"]:
        if problem.get("attention") or problem.get("rows"):
            # The attention kernels' ring depths, the reductions' widths: `v3r tune` measures them
            # (this fallback does GEMMs).
            print(f"{problem['kernel']} M {problem['m']}: skipped (v3r tune measures it)")
            continue
        m, n, k = problem["m"], problem["n"], problem["k"]
        names = [c["name"] for c in problem["candidates"]]
        cfgs = {nm: gc.parse(nm) for nm in names}
        funcs = {nm: drv.load(open(os.path.join(args.dir, "kernels", nm + ".ptx")).read(), nm) for nm in names}
        grouped = problem.get("grouped")
        if grouped:
            inputs, out_rows = grouped_inputs(problem, cfgs[problem["default"]])
            tol = 1e-3 if cfgs[problem["default"]]["input"] == "fp8" else 1e-2
        else:
            inputs, _, tol = gc.make_inputs(cfgs[problem["default"]], m, n, k)
            out_rows = m
        outputs, timings, rejected = {}, {}, []
        for nm in [problem["default"]] + [x for x in names if x != problem["default"]]:
            cfg = cfgs[nm]
            out = gc.Output(cfg, out_rows, n)
            if cfg["scatter"]:
                out.data.zero_()  # the kernel adds into it
            if grouped:
                launch = gc.prepare_grouped(drv, cfg, inputs, out, n, k, sms)
            else:
                launch = gc.prepare(drv, cfg, m, n, k, inputs, out, sms)
            gc.run(drv, funcs[nm], cfg, launch)
            torch.cuda.synchronize()
            value = out.value()
            outputs[nm] = value
            ref = outputs[problem["default"]]
            rel = float((value - ref).norm() / ref.norm()) if torch.isfinite(value).all() else float("inf")
            if not rel <= tol:
                rejected.append(nm)
                print(f"{problem['kernel']:40s} M {m:5d}  {nm:52s} REJECTED (differs from the default by {rel:.2e})")
                continue

            def once():
                flush.zero_()
                gc.run(drv, funcs[nm], cfg, launch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for rep in range(args.reps + 2):
                flush.zero_()
                start.record()
                gc.run(drv, funcs[nm], cfg, launch)
                end.record()
                torch.cuda.synchronize()
                if rep >= 2:
                    times.append(start.elapsed_time(end))
            times.sort()
            timings[nm] = times[len(times) // 2]
            flop_rows = inputs["rows"] if grouped else m
            tf = 2 * flop_rows * n * k / (timings[nm] * 1e-3) / 1e12
            # The cost model's estimate next to the measurement: how far the ranking can be trusted.
            est = next((c.get("estimate_us") for c in problem["candidates"] if c["name"] == nm), None)
            model = f"  (cost model {est:.1f} us, measured/estimate {timings[nm] * 1e3 / est:.2f})" if est else ""
            print(f"{problem['kernel']:40s} M {m:5d}  {nm:52s} {timings[nm]:9.4f} ms  {tf:7.1f} TFLOP/s{model}")
        entries.append(entry(candidates, problem, gpu, cc, timings, rejected, measured_on))
    db = merge(args.out, entries)
    print(f"tune_check: {len(entries)} entries written to {args.out} ({len(db['entries'])} in the database)")


def self_test():
    import tempfile
    cands = {"compiler_version": "0.1.0", "problems": [{"kernel": "gemm fp8->f32 n2112 k7168", "m": 64, "m_bucket": 64,
             "candidates_sha256": "ab" * 32, "default": "gemm_fp8_f32_64x64x128_s5_splitk"}]}
    p = cands["problems"][0]
    e1 = entry(cands, p, "H200", (9, 0), {"gemm_fp8_f32_64x64x128_s5_splitk": 0.02, "gemm_fp8_f32_128x64x128_s5_splitk": 0.018},
               ["gemm_fp8_f32_64x128x128_s4_splitk"], "self-test")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tuning.json")
        merge(path, [e1])
        db = merge(path, [dict(e1, timings=[["gemm_fp8_f32_64x64x128_s5_splitk", 0.019]])])  # same key: replaced
        assert len(db["entries"]) == 1 and db["entries"][0]["timings"] == [["gemm_fp8_f32_64x64x128_s5_splitk", 0.019]]
        merge(path, [dict(e1, gpu="H100")])
        db = json.load(open(path))
        assert [e["gpu"] for e in db["entries"]] == ["H100", "H200"], "sorted by key as v3c writes it"
        fields = {"compiler_version", "gpu", "compute_capability", "kernel", "m_bucket", "candidates_sha256",
                  "default_config", "timings", "rejected", "measured_at", "measured_on"}
        assert set(db["entries"][0]) == fields, set(db["entries"][0]) ^ fields
        if len(sys.argv) > 2:  # `--self-test OUT`: keep the file (for `v3c tune --report` by hand)
            json.dump(db, open(sys.argv[2], "w"), indent=2)
    assert gpu_short_name("NVIDIA H200") == "H200" and gpu_short_name("NVIDIA H20") == "H20"
    print("tune_check self-test: database entries, merging and key order as v3c reads them")


def main():
    if "--self-test" in sys.argv:
        self_test()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="directory written by `v3c tune --emit-candidates`")
    ap.add_argument("--out", required=True, help="tuning database to write (merged)")
    ap.add_argument("--reps", type=int, default=20)
    measure(ap.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
