#!/usr/bin/env python3
"""Decode tokens/s of Hugging Face transformers' DeepseekV3ForCausalLM on the device: the baseline
`v3r bench-decode` is compared with (benches/device/check.sh step 5); with --prefill, a prompt's prefill
tokens/s too (`v3r bench-prefill`'s baseline).

The model is built from a config.json (prepare.sh writes the 4-layer full-width slice's) with random
bf16 weights on the GPU; for each (batch, context) a cache is prefilled with `context - 1` random tokens
per sequence — in chunks of --chunk tokens, the logits of each chunk's last row only (the whole prefill's
logits at 64 x 4095 rows would be 67 GB) — then one-token decode steps are timed with CUDA events
(median). Versions of transformers whose MLA keeps full per-head K and V in the cache (86 GB at 64 x 4096
for the slice) may not fit: such points are reported as skipped, not failed. Writes JSON to --out; needs
torch + transformers (else it says so and exits 0 with {"skipped": why}).

--device cpu with a small config checks the script itself on a machine without a GPU (no timing worth
quoting).
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--points", default="1x4096,64x4096", help="BATCHxCONTEXT,... (empty: no decode point)")
    ap.add_argument("--prefill", default="", help="TOKENS,...: one sequence's prefill of that many tokens from an "
                    "empty cache, timed as v3r bench-prefill times a chunk: the head over the last row, then "
                    "over every row")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk, tokens per sequence")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script with a small config")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        import transformers
    except Exception as e:  # noqa: BLE001 - any import failure means no baseline
        json.dump({"skipped": f"transformers unavailable: {e}"}, open(args.out, "w"))
        print(f"hf_decode: skipped: transformers unavailable ({e})")
        return 0
    cfg = json.load(open(args.config))
    cfg.pop("quantization_config", None)  # random bf16 weights: no fp8 checkpoint to dequantize
    try:
        config = DeepseekV3Config(**cfg)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(args.device):
            model = DeepseekV3ForCausalLM(config).eval()
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
        json.dump({"skipped": f"building the model failed: {e}"[:500]}, open(args.out, "w"))
        print(f"hf_decode: skipped: building the model failed ({e})")
        return 0
    gpu = args.device == "cuda"
    results = {"transformers": transformers.__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if gpu else args.device, "points": []}
    for point in filter(None, args.points.split(",")):
        batch, context = (int(x) for x in point.split("x"))
        cache = None
        try:
            with torch.no_grad():
                ids = torch.randint(0, config.vocab_size, (batch, context - 1), device=args.device)
                cache = prefill(model, ids, args.chunk)
                if cache_rows(cache) != context - 1:
                    raise RuntimeError(f"the prefilled cache holds {cache_rows(cache)} rows, not {context - 1}")
                step = torch.randint(0, config.vocab_size, (batch, 1), device=args.device)
                times = []
                for rep in range(args.reps + 1):
                    # Each step attends to context rows: the cache is cut back by its row after it (a
                    # negative crop: transformers 5.2x refuses a length).
                    ms = timed_ms(lambda: model(input_ids=step, past_key_values=cache, use_cache=True), gpu)
                    if cache_rows(cache) != context:
                        raise RuntimeError(f"a step left {cache_rows(cache)} cache rows, not {context}")
                    cache.crop(-1)
                    if rep > 0:
                        times.append(ms)
                times.sort()
                ms = times[len(times) // 2]
                results["points"].append({"batch": batch, "context": context, "median_ms": ms,
                                          "tokens_per_s": batch / (ms * 1e-3), "chunk": args.chunk})
                print(f"hf decode batch {batch} context {context}: {ms:.2f} ms per step, {batch / (ms * 1e-3):.1f} tokens/s",
                      flush=True)
        except torch.cuda.OutOfMemoryError as e:
            results["points"].append({"batch": batch, "context": context, "skipped": f"out of memory: {e}"[:200]})
            print(f"hf decode batch {batch} context {context}: skipped (out of memory)")
        except Exception as e:  # noqa: BLE001 - one point failing leaves the others
            results["points"].append({"batch": batch, "context": context, "failed": str(e)[:500]})
            print(f"hf decode batch {batch} context {context}: failed ({e})")
        del cache
        if gpu:
            torch.cuda.empty_cache()
        # After each point: a run cut short by its time limit keeps the points it measured.
        json.dump(results, open(args.out, "w"), indent=1)
    results["prefill"] = []
    for tokens in (int(t) for t in filter(None, args.prefill.split(","))):
        try:
            # The head over the last row (`logits_to_keep=1`, what a server's last chunk needs and
            # v3r's runs), then over every row (0), as v3r's chunk ran it until 2026-12-06.
            point = {"tokens": tokens, "context": 0}
            for keep, key in ((1, ""), (0, "_all_rows")):
                with torch.no_grad():
                    ids = torch.randint(0, config.vocab_size, (1, tokens), device=args.device)
                    times = []
                    for rep in range(args.reps + 1):
                        ms = timed_ms(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=keep), gpu)
                        if rep > 0:
                            times.append(ms)
                times.sort()
                ms = times[len(times) // 2]
                point.update({f"median_ms{key}": ms, f"tokens_per_s{key}": tokens / (ms * 1e-3)})
            results["prefill"].append(point)
            print(f"hf prefill {tokens} tokens: {point['median_ms']:.2f} ms, {point['tokens_per_s']:.1f} tokens/s "
                  f"(the head over every row: {point['median_ms_all_rows']:.2f} ms)", flush=True)
        except torch.cuda.OutOfMemoryError as e:
            results["prefill"].append({"tokens": tokens, "skipped": f"out of memory: {e}"[:200]})
            print(f"hf prefill {tokens} tokens: skipped (out of memory)")
        except Exception as e:  # noqa: BLE001 - one point failing leaves the others
            results["prefill"].append({"tokens": tokens, "failed": str(e)[:500]})
            print(f"hf prefill {tokens} tokens: failed ({e})")
        if gpu:
            torch.cuda.empty_cache()
        json.dump(results, open(args.out, "w"), indent=1)
    json.dump(results, open(args.out, "w"), indent=1)
    return 0


def prefill(model, ids, chunk):
    """The cache after `ids` [batch, rows], prefilled `chunk` rows at a time, each chunk's logits of its
    last row only (`logits_to_keep`)."""
    cache = None
    for at in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, at:at + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        del out
    return cache


def cache_rows(cache):
    return cache.get_seq_length()


def timed_ms(fn, gpu):
    """Milliseconds fn takes: CUDA events on the GPU, the wall clock on the CPU."""
    import time
    import torch
    if not gpu:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


if __name__ == "__main__":
    sys.exit(main())
