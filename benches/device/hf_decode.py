#!/usr/bin/env python3
"""Decode tokens/s of Hugging Face transformers' DeepseekV3ForCausalLM on the device: the baseline
`v3r bench-decode` is compared with (benches/device/check.sh step 5).

The model is built from a config.json (prepare.sh writes the 4-layer full-width slice's) with random
bf16 weights on the GPU; for each (batch, context) a cache is prefilled with `context - 1` random tokens
per sequence, then one-token decode steps are timed with CUDA events (median). transformers' MLA keeps
full per-head K and V in its cache, so large batch x context products may not fit: such points are
reported as skipped, not failed. Writes JSON to --out; needs torch + transformers (else it says so and
exits 0 with {"skipped": why}).
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--points", default="1x4096,64x512", help="BATCHxCONTEXT,...")
    ap.add_argument("--reps", type=int, default=10)
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
        with torch.device("cuda"):
            model = DeepseekV3ForCausalLM(config).eval()
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
        json.dump({"skipped": f"building the model failed: {e}"[:500]}, open(args.out, "w"))
        print(f"hf_decode: skipped: building the model failed ({e})")
        return 0
    results = {"transformers": transformers.__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(), "points": []}
    for point in args.points.split(","):
        batch, context = (int(x) for x in point.split("x"))
        try:
            with torch.no_grad():
                ids = torch.randint(0, config.vocab_size, (batch, context - 1), device="cuda")
                out = model(input_ids=ids, use_cache=True)
                cache = out.past_key_values
                step = torch.randint(0, config.vocab_size, (batch, 1), device="cuda")
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for rep in range(args.reps + 1):
                    # Each step attends to context rows: the cache is cut back to context - 1 rows after it.
                    start.record()
                    model(input_ids=step, past_key_values=cache, use_cache=True)
                    end.record()
                    torch.cuda.synchronize()
                    if hasattr(cache, "crop"):
                        cache.crop(context - 1)
                    if rep > 0:
                        times.append(start.elapsed_time(end))
                times.sort()
                ms = times[len(times) // 2]
                results["points"].append({"batch": batch, "context": context, "median_ms": ms,
                                          "tokens_per_s": batch / (ms * 1e-3)})
                print(f"hf decode batch {batch} context {context}: {ms:.2f} ms per step, {batch / (ms * 1e-3):.1f} tokens/s")
            del out, cache
        except torch.cuda.OutOfMemoryError as e:
            results["points"].append({"batch": batch, "context": context, "skipped": f"out of memory: {e}"[:200]})
            print(f"hf decode batch {batch} context {context}: skipped (out of memory)")
        except Exception as e:  # noqa: BLE001 - one point failing leaves the others
            results["points"].append({"batch": batch, "context": context, "failed": str(e)[:500]})
            print(f"hf decode batch {batch} context {context}: failed ({e})")
        torch.cuda.empty_cache()
    json.dump(results, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
