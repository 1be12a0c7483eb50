#!/usr/bin/env python3
"""Finds the first launch where two dumps of the same artifact run part: the GPU's (`V3R_DUMP_DIR=DIR v3r
logits ...`) and the host emulation's (`v3c emulate ... --dump DIR`, made by benches/device/prepare.sh).

Both write, after every template launch, the launch's buffers but weights (`{entry}-{seq}-{kernel}-{operand}.bin`)
with an `index.jsonl` line each. Buffers are compared in launch order: floats (f32, bf16, e4m3) by relative
error ||gpu - emulated|| / ||emulated|| (NaN or Inf in either fails), integers exactly; fp8 cache rows (`i8`
buffers: `v3c compile --kv-cache fp8`) decoded — e4m3 latent times its power-of-two scales, the bf16 rope key. The emulation sums in
another order than the tensor cores (and split K, and f32 atomics in scattered MoE rows), so small errors are
expected: the default tolerance is 1e-2 (5e-2 for e4m3, one step of which is ~6%). Routing indices can
legitimately differ after near ties; what differs first is what to look at.

Prints one line per launch that fails (the first ten) and a summary; writes JSON with --out. Exit 0 when every
buffer matches, 1 otherwise. Needs only the Python standard library. `--self-test` checks the decoders.
"""
import argparse
import array
import json
import math
import os
import sys


def e4m3(byte):
    s = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return float("nan")
    if e == 0:
        return s * m / 8.0 * 2.0 ** -6
    return s * (1.0 + m / 8.0) * 2.0 ** (e - 7)


E4M3 = [e4m3(b) for b in range(256)]


def bf16(h):
    f = array.array("f")
    f.frombytes((h << 16).to_bytes(4, "little"))
    return f[0]


def fp8_rows(raw, row):
    """Packed fp8 cache rows (runtime/src/plan.rs, Fp8LatentRow: kv e4m3 bytes, kv / 128 f32 scales padded to
    16 bytes, 64 bf16) of `row` bytes each, decoded; rows whose scales are not finite read as zeros (never
    written: the attention masks them)."""
    kv = next((k for k in range(128, row, 128) if k + -(-4 * (k // 128) // 16) * 16 + 128 == row), None)
    if kv is None:
        raise SystemExit(f"dump_compare: i8 rows of {row} bytes are no fp8 cache rows")
    rope_at, out = kv + -(-4 * (kv // 128) // 16) * 16, []
    for at in range(0, len(raw), row):
        r = raw[at:at + row]
        scales = array.array("f")
        scales.frombytes(r[kv:kv + 4 * (kv // 128)])
        if not all(math.isfinite(x) for x in scales):
            out += [0.0] * (kv + 64)
            continue
        out += [E4M3[b] * scales[c // 128] for c, b in enumerate(r[:kv])]
        rope = array.array("H")
        rope.frombytes(r[rope_at:])
        out += [bf16(h) for h in rope]
    return out


def values(path, element, shape=()):
    raw = open(path, "rb").read()
    if element == "f32":
        a = array.array("f")
        a.frombytes(raw)
        return list(a), True
    if element == "bf16":
        a = array.array("H")
        a.frombytes(raw)
        return [bf16(h) for h in a], True
    if element == "i8":
        return fp8_rows(raw, shape[-1]), True
    if element == "f8E4M3FN":
        return [E4M3[b] for b in raw], True
    if element == "i32":
        a = array.array("i")
        a.frombytes(raw)
        return list(a), False
    if element == "i64":
        a = array.array("q")
        a.frombytes(raw)
        return list(a), False
    raise SystemExit(f"dump_compare: {path}: element type {element}")


def index(d):
    path = os.path.join(d, "index.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"dump_compare: {path}: missing (not a dump directory)")
    return {(e["entry"], e["seq"], e["operand"]): e for e in map(json.loads, open(path))}


def compare(gpu, emu, tol, fp8_tol):
    a, b = index(gpu), index(emu)
    failures, checked = [], 0
    for key in sorted(b):
        e = b[key]
        if key not in a:
            failures.append({**e, "problem": "not in the GPU dump"})
            continue
        g = a[key]
        if g["shape"] != e["shape"] or g["element"] != e["element"]:
            failures.append({**e, "problem": f"GPU {g['shape']} {g['element']} vs {e['shape']} {e['element']}"})
            continue
        x, is_float = values(os.path.join(gpu, g["file"]), g["element"], g["shape"])
        y, _ = values(os.path.join(emu, e["file"]), e["element"], e["shape"])
        checked += 1
        if is_float:
            bad = sum(1 for v in x if not math.isfinite(v)) + sum(1 for v in y if not math.isfinite(v))
            diff = math.sqrt(sum((p - q) ** 2 for p, q in zip(x, y) if math.isfinite(p) and math.isfinite(q)))
            norm = math.sqrt(sum(q * q for q in y if math.isfinite(q)))
            rel = diff / norm if norm > 0 else diff
            limit = fp8_tol if e["element"] in ("f8E4M3FN", "i8") else tol
            if bad or rel > limit:
                failures.append({**e, "problem": f"relative error {rel:.3e} (limit {limit:g}), {bad} non-finite"})
        else:
            differ = sum(1 for p, q in zip(x, y) if p != q)
            if differ:
                failures.append({**e, "problem": f"{differ} of {len(y)} integers differ"})
    return failures, checked


def self_test():
    assert E4M3[0x38] == 1.0 and E4M3[0xB8] == -1.0 and math.isnan(E4M3[0x7F])
    assert E4M3[0x7E] == 448.0 and E4M3[0x01] == 2.0 ** -9
    # An fp8 cache row of 128 + 64 columns (272 bytes): 1.0 x 0.5, scale 0.5 (bytes 128..131), rope 2.0.
    row = bytes([0x38] * 128) + array.array("f", [0.5]).tobytes() + bytes(12) + bytes([0, 0x40] * 64)
    assert fp8_rows(row, 272) == [0.5] * 128 + [2.0] * 64
    assert fp8_rows(bytes([0x38] * 128) + bytes([0xFF] * 16) + bytes(128), 272) == [0.0] * 192
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for side, v in (("g", 1.0), ("e", 1.001)):
            os.makedirs(os.path.join(d, side))
            array.array("f", [v, 2.0]).tofile(open(os.path.join(d, side, "x.bin"), "wb"))
            array.array("i", [3, 4 if side == "g" else 5]).tofile(open(os.path.join(d, side, "y.bin"), "wb"))
            with open(os.path.join(d, side, "index.jsonl"), "w") as f:
                f.write(json.dumps({"entry": "prefill", "seq": 0, "kernel": "k", "operand": 0, "file": "x.bin",
                                    "shape": [2], "element": "f32"}) + "\n")
                f.write(json.dumps({"entry": "prefill", "seq": 1, "kernel": "r", "operand": 0, "file": "y.bin",
                                    "shape": [2], "element": "i32"}) + "\n")
        failures, checked = compare(os.path.join(d, "g"), os.path.join(d, "e"), 1e-2, 5e-2)
        assert checked == 2 and [f["kernel"] for f in failures] == ["r"], failures
    print("dump_compare self-test: decoders and comparison")


def main():
    if "--self-test" in sys.argv:
        self_test()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gpu", help="V3R_DUMP_DIR of the GPU run")
    ap.add_argument("emulated", help="--dump of `v3c emulate`")
    ap.add_argument("--tolerance", type=float, default=1e-2)
    ap.add_argument("--fp8-tolerance", type=float, default=5e-2)
    ap.add_argument("--out")
    args = ap.parse_args()
    failures, checked = compare(args.gpu, args.emulated, args.tolerance, args.fp8_tolerance)
    for f in failures[:10]:
        print(f"{f['entry']} launch {f['seq']} {f['kernel']} operand {f['operand']} {f['shape']}: {f['problem']}")
    first = failures[0] if failures else None
    summary = (f"first difference: {first['entry']} launch {first['seq']} ({first['kernel']})" if first
               else "every buffer matches")
    print(f"dump_compare: {checked} buffers compared, {len(failures)} differ; {summary}")
    if args.out:
        json.dump({"checked": checked, "failures": failures}, open(args.out, "w"), indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
