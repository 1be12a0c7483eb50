#!/usr/bin/env bash
# The one prepared GPU check (shared/design/GPU-CHECKS.md). Run on a machine with a Hopper GPU:
#   bash benches/device/check.sh
# Prepare on the build machine (the GPU machine has no Rust): `bash benches/device/prepare.sh` puts v3r,
# the PTX of the template kernels, a small fp8 model with its sm_90a artifacts and the CPU backend's and the
# host emulation's results for it, a 4-layer full-width slice's artifact and the tuning candidates into
# .device/ (git-ignored, ~59 MB) and packs it as .device.tar.xz (~12 MB); carry that (a device call
# carries 64 MiB with the working tree): this script unpacks it. Results go to $OUT (else ./device-out/): check.log, doctor.json,
# ceilings.json, e2e*.json/txt (e2e_bf16.json: the built-in tiny model's bf16 checkpoint), dump_compare.json, hf_gpu_*.json (transformers' fixtures), gemm_<kernel>.json, rows_<kernel>.json, mla.json,
# decode_slice*.json (decode_slice_kernels.json: the slice's decode kernels one by one), v32_slice_kernels.json, prefill_slice*.json, serve_slice*.json, serve_sampled*.json, serve_logprobs*.json, e2e_logprobs*.jsonl, train_slice_*.json, tuning.json, perplexity*.json, shared_serve.jsonl.
#
# Steps, in this order (correctness first; every step bounded by what is left of 570 s):
# 1. v3r doctor + the device's two ceilings (copy bandwidth, bf16 matmul via torch);
# 3. end to end on the small model: `v3r logits` against the CPU backend's (argmax per row, 5e-2); 3c.
#    transformers' fixtures (tests/fixtures/hf/gpu_*: the f32 graph within 1e-2 of transformers' logits,
#    fp8 argmax-equal to the fp8 reference where the margins are clear); the
#    prefill and two decode steps dumped launch by launch against the host emulation (dump_compare.py
#    names the first launch that differs), `v3r run` of two prompts as a batch and `v3r run
#    --speculative` and two requests in turn to `v3r serve --speculative` against the CPU backend's
#    greedy tokens (attention on the CUDA-core rows; sampled: the caches on the device against through
#    the host; sampled at a temperature: tokens drawn on the device against drawn on the host), then
#    the default tensor-core attention (flash prefill, split-K decode): logits (5e-2, argmax) and
#    launch by launch, its pool of pages (a batch, and three prompts two at a time — the third
#    joining the running batch — as each alone, by `v3r run --batch 2` and `v3r serve`); 3d.
#    DeepSeek-V3.2's sparse attention (the small model with an indexer): logits and greedy tokens
#    against the CPU backend's; 3b. `v3r train` of the tiny model's sm_90a
#    training-step artifacts (f32 and the FP8 recipe; AdamW on the device; and with 64-wide heads,
#    attention on the flash kernels: f32wide) against the cpu artifacts' loss logs, tokens/s;
#    4. its kernels timed (`v3r bench-kernels`);
# 2. the GEMM template kernels vs torch (gemm_check.py: correctness, then TFLOP/s); 2c. the row kernels
#    (rows_check.py); 2d. MLA attention on the tensor cores (mla_check.py; training's flash kernels too);
# 5. decode steps of a 4-layer full-width slice (random weights) by `v3r bench-decode`, its decode
#    kernels one by one (`v3r bench-kernels`; and DeepSeek-V3.2's slice's), its prefill in chunks of 1024 and 4096 tokens (`v3r
#    bench-prefill`; at 4096 also with `--all-launches`, the head over every row; at 128 and 512 with
#    and without `--plan-rows-kernels`, the GEMMs' 4096-row kernels; and transformers' 4096), a serving
#    load on it (`v3r bench-serve`: requests joining a running batch, then with `--every-slot` — idle
#    slots' rows run too, the former steps; and prompts sharing a system
#    prompt, its rows reused or not), and transformers'
#    on the same device (hf_decode.py); 5b. training steps of a 2-layer full-width slice (`v3r
#    bench-train`, FP8 recipe and f32 with AdamW on the device, FP8 with it on the host); 2b. tuning
#    (`v3r tune`, tune_check.py if it fails), then the training step's flash attention kernels' ring
#    depths (`v3r tune`, into the same database).
# Never changes clocks, power, MIG, persistence or compute mode.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-$root/device-out}"
mkdir -p "$out"
log="$out/check.log"
: > "$log"
# .device/ travels packed (prepare.sh): unpacked here unless already, from this archive.
pack="$root/.device.tar.xz"
if [ -f "$pack" ] && ! cmp -s "$root/.device/.unpacked" <(stat -c '%s %Y' "$pack"); then
  rm -rf "$root/.device"
  if python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$pack" "$root" 2>>"$log"; then
    stat -c '%s %Y' "$pack" > "$root/.device/.unpacked"
  else
    echo "check: cannot unpack $pack (see $log)" | tee -a "$log"
  fi
fi
table=()
note() { echo "$*" | tee -a "$log"; }
# Seconds a step may take: at most $1, and never past 570 s into the run (a device call has 600 s).
budget() { local left=$((570 - SECONDS)); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
row() { table+=("$(printf '%-28s %-10s %s' "$1" "$2" "$3")"); }
# CHECK_STEPS="3 2c 2b" runs only those steps (their names as in the headers: 1b 3 2 2c 2d 5 5b 2b; step 3
# takes 3c, 3b and 4 along; 1, the doctor, always runs) — e.g. a second call for what the first ran out
# of time for. Unset: every step.
want() { [ -z "${CHECK_STEPS:-}" ] || [[ " $CHECK_STEPS " == *" $1 "* ]]; }

# Logits (safetensors `logits` [rows, vocab]) against expected ones: argmax equal on every row and
# max |diff| within $4 of the largest expected |logit|; the figures into the JSON file $3.
compare_logits() {
  python3 - "$@" <<'PY' 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"
import array, json, struct, sys
def logits(path):
    b = open(path, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    t = h["logits"]; s, e = t["data_offsets"]; a = array.array("f"); a.frombytes(b[8 + n + s:8 + n + e])
    return t["shape"], a
(shape, got), (_, want) = logits(sys.argv[1]), logits(sys.argv[2])
rows, vocab = shape
diff = max(abs(x - y) for x, y in zip(got, want)); scale = max(abs(y) for y in want)
argmax = lambda a, r: max(range(vocab), key=lambda i: a[r * vocab + i])
same = sum(argmax(got, r) == argmax(want, r) for r in range(rows))
res = {"rows": rows, "max_abs_diff": diff, "max_abs_expected": scale, "rel": diff / scale, "argmax_equal_rows": same}
json.dump(res, open(sys.argv[3], "w"), indent=1)
print(f"logits: max |diff| {diff:.3e} ({diff / scale:.2e} of max |logit|), argmax equal on {same}/{rows} rows")
sys.exit(0 if same == rows and diff / scale <= float(sys.argv[4]) else 1)
PY
}

# Launch by launch: the prefill and two greedy decode steps of artifact .device/e2e/$1 on the GPU
# (`v3r run --max-new-tokens 3` under V3R_DUMP_DIR) against the host emulation's dump of the same
# (.device/e2e/$2, `v3c emulate --decode-steps 2` in prepare.sh), as table row $3; the GPU's buffers
# come back next to the comparison only where they differ.
launch_by_launch() {
  local dump="$2" label="$3" suffix="${2#dump}"
  rm -rf "${out:?}/$dump"
  if [ -d "$e2e/$dump" ] && V3R_DUMP_DIR="$out/$dump" timeout 60 "$v3r" run "$e2e/$1" --weights "$e2e/ckpt" \
      --prompt-tokens "$(cat "$e2e/prompt1.txt")" --max-new-tokens 3 --ignore-eos >>"$log" 2>&1; then
    if python3 "$root/benches/device/dump_compare.py" "$out/$dump" "$e2e/$dump" --out "$out/dump_compare$suffix.json" \
        2>&1 | tee -a "$log"; then
      row "$label" "ok" "every buffer as emulated (dump_compare$suffix.json)"
      rm -rf "${out:?}/$dump"
    else
      row "$label" "DIFFERS" "$(tail -1 "$log" | sed 's/.*first difference: //')"
    fi
  else
    row "$label" "FAILED" "no dump (check.log)"
  fi
}

v3r="${V3R:-}"
for c in "$root/.device/v3r" "$root/target/release/v3r"; do
  [ -z "$v3r" ] && [ -x "$c" ] && v3r="$c"
done

note "== 1. doctor"
if [ -n "$v3r" ]; then
  "$v3r" doctor | tee -a "$log"
  "$v3r" doctor --json > "$out/doctor.json" 2>>"$log"
  if grep -q '"compute_capability":\[9,0\]' "$out/doctor.json"; then row "v3r doctor" "ok" "Hopper found"; else row "v3r doctor" "NO GPU" "see doctor.json"; fi
else
  note "v3r not found (.device/v3r, target/release/v3r or \$V3R): build it on the build machine and carry .device"
  row "v3r doctor" "MISSING" "no v3r binary"
fi

note "== 1b. ceilings (torch)"
if ! want 1b; then
  note "(step 1b not in CHECK_STEPS)"
elif python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  python3 - "$out/ceilings.json" <<'PY' 2>&1 | tee -a "$log"
import json, sys, torch
def median_ms(fn, reps=30):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5): fn()
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort(); return times[len(times) // 2]
n = 1 << 30  # 1 GiB copies: far larger than L2
src = torch.randn(n // 4, device="cuda"); dst = torch.empty_like(src)
copy_ms = median_ms(lambda: dst.copy_(src))
copy_tbs = 2 * n / (copy_ms * 1e-3) / 1e12  # bytes read + written
m = k = nn = 8192
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16); b = torch.randn(k, nn, device="cuda", dtype=torch.bfloat16)
mm_ms = median_ms(lambda: torch.matmul(a, b))
mm_tf = 2 * m * k * nn / (mm_ms * 1e-3) / 1e12
res = {"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbs, "bf16_matmul_8192_TFLOPs": mm_tf,
       "torch": torch.__version__}
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(f"copy {copy_tbs:.2f} TB/s (read+write), bf16 matmul 8192^3 {mm_tf:.0f} TFLOP/s on {res['device']}")
PY
  if [ -s "$out/ceilings.json" ]; then row "ceilings" "ok" "$(python3 -c "import json;d=json.load(open('$out/ceilings.json'));print(f\"copy {d['copy_TBps']:.2f} TB/s, bf16 mm {d['bf16_matmul_8192_TFLOPs']:.0f} TFLOP/s\")")"; else row "ceilings" "FAILED" "see check.log"; fi
else
  note "torch with CUDA not available: ceilings skipped"
  row "ceilings" "SKIPPED" "no torch+CUDA"
fi

note "== 3. end to end: a small fp8 model's sm_90a artifact run by v3r, against the CPU backend"
e2e="$root/.device/e2e"
if ! want 3; then
  note "(step 3 not in CHECK_STEPS)"
elif [ -d "$e2e/sm90" ] && [ -n "$v3r" ] && grep -q '"compute_capability":\[9,0\]' "$out/doctor.json" 2>/dev/null; then
  # Logits of a 12-token prompt (one prefill), every launch synchronized so a faulting kernel is named.
  if V3R_SYNC_EACH=1 timeout 60 "$v3r" logits "$e2e/sm90" --weights "$e2e/ckpt" --tokens "$(cat "$e2e/prompt1.txt")" \
      --out "$out/e2e_logits.safetensors" 2>&1 | tee -a "$log"; then
    if compare_logits "$out/e2e_logits.safetensors" "$e2e/expected_logits.safetensors" "$out/e2e.json" 5e-2
    then row "3. end to end logits" "ok" "$(python3 -c "import json;d=json.load(open('$out/e2e.json'));print(f\"rel {d['rel']:.1e}, argmax {d['argmax_equal_rows']}/{d['rows']}\")")"
    else row "3. end to end logits" "FAILED" "see e2e.json, check.log"; fi
  else
    row "3. end to end logits" "FAILED" "v3r logits failed (check.log names the kernel)"
  fi
  # The f32 graph of a bf16 checkpoint (the built-in tiny model: GEMMs as bf16 hi + lo, grouped too):
  # within 1e-3 of the CPU backend's logits (the host emulation: 3.8e-6).
  if [ -d "$e2e/bf16/sm90" ] && V3R_SYNC_EACH=1 timeout 60 "$v3r" logits "$e2e/bf16/sm90" --weights "$e2e/bf16/ckpt" \
      --tokens "$(cat "$e2e/bf16/prompt.txt")" --out "$out/e2e_bf16_logits.safetensors" 2>&1 | tee -a "$log"; then
    if compare_logits "$out/e2e_bf16_logits.safetensors" "$e2e/bf16/expected_logits.safetensors" "$out/e2e_bf16.json" 1e-3
    then row "3. bf16 checkpoint logits" "ok" "$(python3 -c "import json;d=json.load(open('$out/e2e_bf16.json'));print(f\"rel {d['rel']:.1e}, argmax {d['argmax_equal_rows']}/{d['rows']}\")")"
    else row "3. bf16 checkpoint logits" "FAILED" "see e2e_bf16.json, check.log"; fi
  else
    row "3. bf16 checkpoint logits" "FAILED" "v3r logits failed or no .device/e2e/bf16 (check.log)"
  fi
  # 3d. DeepSeek-V3.2 (sparse attention: the indexer's scores, top keys, the attention over the
  # selected rows): the small model's logits with the attention on the CUDA-core rows against the
  # CPU backend's (fp8: 5e-2 and argmax, as the V3 model's; the f32 graph of its bf16 checkpoint:
  # 1e-3 — the host emulation of both: 6e-6 of the largest) and on the tensor cores (the default:
  # bf16 cache rows, keys, queries and P) against the host emulation's of that artifact; 16 greedy tokens
  # (decode's indexer over the growing cache) from each artifact, against the CPU backend's and the
  # emulation's (fp8: 13 of 16 equal to the CPU backend's).
  for v in fp8 bf16; do
    d="$e2e/v32/$v" label="3d. V3.2 sparse, $v"
    tol=$([ "$v" = fp8 ] && echo 5e-2 || echo 1e-3)
    logits() { V3R_SYNC_EACH=1 timeout 60 "$v3r" logits "$d/$1" --weights "$d/ckpt" \
        --tokens "$(cat "$e2e/bf16/prompt.txt")" --out "$out/v32_${v}_$1_logits.safetensors" 2>&1 | tee -a "$log" \
        && compare_logits "$out/v32_${v}_$1_logits.safetensors" "$2" "$out/v32_${v}_$1.json" "$tol"; }
    if [ -d "$d/sm90" ] && logits sm90rows "$d/expected_logits.safetensors" \
        && logits sm90 "$d/emulated_logits.safetensors"; then
      detail=$(python3 -c "import json;r,t=(json.load(open(f'$out/v32_${v}_{k}.json')) for k in ('sm90rows','sm90'));print(f\"rows rel {r['rel']:.1e}, argmax {r['argmax_equal_rows']}/{r['rows']}; tensor cores vs emulated rel {t['rel']:.1e}\")")
      tokens() { timeout 60 "$v3r" run "$d/$1" --weights "$d/ckpt" --prompt-tokens "$(cat "$e2e/v32/prompt.txt")" \
          --max-new-tokens 16 --ignore-eos > "$out/v32_${v}_$1_tokens.txt" 2>>"$log" \
          && cmp -s "$out/v32_${v}_$1_tokens.txt" "$2"; }
      if tokens sm90rows "$d/expected_tokens.txt" && tokens sm90 "$d/emulated_tokens.txt"; then
        row "$label" "ok" "logits $detail; 16/16 greedy tokens (rows: the CPU backend's; tensor cores: emulated)"
      else row "$label" "DIFFERS" "logits $detail; tokens: v32_${v}_*_tokens.txt vs the expected"; fi
    else
      row "$label" "FAILED" "v3r logits failed or differ (v32_${v}_*.json, check.log), or no .device/e2e/v32"
    fi
  done
  # 3c. Transformers' logits (tests/fixtures/hf, prepare.sh): the f32 graph (bf16 checkpoint) within
  # 1e-2 of them, argmax equal on every row; fp8 no further from them than twice the fp8 reference,
  # argmax equal to that reference on every row whose top-two margin is over twice their largest
  # difference (fp8 rounding ties flip bytes that spread to a few percent: the host's PTX simulation,
  # 7e-2) — and beside it, the host emulation of the same artifact. v2_grouped_yarn_bf16 is DeepSeek-V2
  # (transformers' DeepseekV2ForCausalLM: softmax routing), held as bf16.
  for f in gpu_bf16 gpu_fp8_v3dims v2_grouped_yarn_bf16; do
    h="$root/.device/hf/$f" label="3c. transformers, ${f#gpu_}"
    if [ -d "$h/sm90" ] && V3R_SYNC_EACH=1 timeout 60 "$v3r" logits "$h/sm90" --weights "$h/ckpt" --tokens "$(cat "$h/tokens.txt")" \
        --out "$out/hf_${f}_logits.safetensors" 2>&1 | tee -a "$log"; then
      if verdict=$(python3 - "$out/hf_${f}_logits.safetensors" "$h" "$out/hf_$f.json" <<'PY' 2>&1
import array, json, os, struct, sys
def logits(path):
    b = open(path, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    t = h["logits"]; s, e = t["data_offsets"]; a = array.array("f"); a.frombytes(b[8 + n + s:8 + n + e])
    return t["shape"][1], list(a)
vocab, gpu = logits(sys.argv[1])
_, hf = logits(os.path.join(sys.argv[2], "hf_logits.safetensors"))
_, emulated = logits(os.path.join(sys.argv[2], "emulated_logits.safetensors"))
rows = lambda v: [v[r * vocab:(r + 1) * vocab] for r in range(len(v) // vocab)]
diff = lambda a, b: max(abs(x - y) for x, y in zip(a, b))
argmax = lambda r: max(range(len(r)), key=lambda i: (r[i], -i))
lead = lambda r: (lambda s: s[0] - s[1])(sorted(r, reverse=True))
res = {"rows": len(gpu) // vocab, "to_transformers": diff(gpu, hf), "max_abs_transformers": max(map(abs, hf)),
       "to_emulation": diff(gpu, emulated),
       "argmax_equal_transformers": sum(argmax(a) == argmax(b) for a, b in zip(rows(gpu), rows(hf)))}
ref_path = os.path.join(sys.argv[2], "fp8_reference.safetensors")
if os.path.exists(ref_path):
    _, ref = logits(ref_path)
    res.update(fp8_reference_to_transformers=diff(ref, hf), to_fp8_reference=diff(gpu, ref))
    clear = [(a, b) for a, b in zip(rows(gpu), rows(ref)) if lead(b) > 2 * res["to_fp8_reference"]]
    res.update(clear_rows=len(clear), argmax_equal_clear_rows=sum(argmax(a) == argmax(b) for a, b in clear))
    ok = (res["to_transformers"] <= 2 * res["fp8_reference_to_transformers"] and clear
          and res["argmax_equal_clear_rows"] == len(clear))
    print(f"{res['to_transformers']:.2e} from transformers (fp8 reference {res['fp8_reference_to_transformers']:.2e}), "
          f"argmax = fp8 reference on {res['argmax_equal_clear_rows']}/{len(clear)} clear rows, "
          f"{res['to_emulation']:.1e} from the emulation")
else:
    ok = res["to_transformers"] <= 1e-2 and res["argmax_equal_transformers"] == res["rows"]
    print(f"{res['to_transformers']:.2e} from transformers, argmax {res['argmax_equal_transformers']}/{res['rows']}, "
          f"{res['to_emulation']:.1e} from the emulation")
json.dump(res, open(sys.argv[3], "w"), indent=1)
sys.exit(0 if ok else 1)
PY
      ); then row "$label" "ok" "$verdict"; else row "$label" "DIFFERS" "$verdict"; fi
      note "$label: $verdict"
    else
      row "$label" "FAILED" "v3r logits failed or no .device/hf/$f (check.log)"
    fi
  done
  # Launch by launch: every launch's buffers on the GPU against the host emulation's (prepare.sh).
  launch_by_launch sm90 dump "3. launch by launch"
  # Attention on the tensor cores (sm90tc, the default lowering): prefill as flash attention after
  # kv_b's fp8 GEMM of the e4m3 latent, decode split K over bf16 pages; q, k, v and P in bf16 — the
  # prompt's logits within 5e-2 of the CPU backend's f32 attention and argmax-equal (the host
  # emulation: 1.8e-2), then a prefill and two decode steps launch by launch against that emulation.
  if [ -d "$e2e/sm90tc" ] && V3R_SYNC_EACH=1 timeout 60 "$v3r" logits "$e2e/sm90tc" --weights "$e2e/ckpt" \
      --tokens "$(cat "$e2e/prompt1.txt")" --out "$out/e2e_tc_logits.safetensors" 2>&1 | tee -a "$log"; then
    if compare_logits "$out/e2e_tc_logits.safetensors" "$e2e/expected_logits.safetensors" "$out/e2e_tc.json" 5e-2
    then row "3. tensor-core prefill logits" "ok" "$(python3 -c "import json;d=json.load(open('$out/e2e_tc.json'));print(f\"rel {d['rel']:.1e}, argmax {d['argmax_equal_rows']}/{d['rows']}\")")"
    else row "3. tensor-core prefill logits" "FAILED" "see e2e_tc.json, check.log"; fi
  else
    row "3. tensor-core prefill logits" "FAILED" "v3r logits failed or no .device/e2e/sm90tc (check.log names the kernel)"
  fi
  launch_by_launch sm90tc dump_tc "3. tensor-core attention, launch by launch"
  # The same over fp8 cache rows (sm90fp8c, --kv-cache fp8): the latent rows quantizing into them
  # (decode write, prefill append), prefill's GEMM operand and keys out of them, the decode
  # attention's three views of them.
  launch_by_launch sm90fp8c dump_fp8c "3. fp8 caches, launch by launch"
  # The pool of pages (sm90tc): two prompts as one batch, 100 new tokens each — the longer prompt's caches
  # on the pool's first page, the other's moved there device to device, each sequence's next page taken as
  # it crosses row 64 (interleaved) — must give each prompt's greedy tokens run alone (its pages in order):
  # the same kernels on the same rows, the same splits.
  pool_run() { timeout 60 "$v3r" run "$e2e/sm90tc" --weights "$e2e/ckpt" "$@" --max-new-tokens 100 --ignore-eos 2>>"$log"; }
  if pool_run --prompt-tokens "$(cat "$e2e/prompt1.txt")" --prompt-tokens "$(cat "$e2e/prompt2.txt")" > "$out/pool_batch.txt" \
      && pool_run --prompt-tokens "$(cat "$e2e/prompt1.txt")" > "$out/pool_alone.txt" \
      && pool_run --prompt-tokens "$(cat "$e2e/prompt2.txt")" >> "$out/pool_alone.txt"; then
    if cmp -s "$out/pool_batch.txt" "$out/pool_alone.txt"; then row "3. pool of pages" "ok" "a batch's 200 tokens = each prompt's alone"
    else row "3. pool of pages" "DIFFERS" "pool_batch.txt vs pool_alone.txt"; fi
    # Two at a time: the third prompt (the first again) joins the running batch — prefilled into
    # the pool's scratch pages, moved device to device to the pages the others gave back, then
    # decoded with the caches left on the device — and must give its tokens alone too.
    printf '%s\n%s\n%s\n' "$(cat "$e2e/prompt1.txt")" "$(cat "$e2e/prompt2.txt")" "$(cat "$e2e/prompt1.txt")" > "$out/queue_prompts.txt"
    if pool_run --prompts-file "$out/queue_prompts.txt" --batch 2 > "$out/queue_tokens.txt"; then
      if cmp -s "$out/queue_tokens.txt" <(cat "$out/pool_alone.txt"; head -1 "$out/pool_alone.txt"); then
        row "3. joining a running batch" "ok" "3 prompts 2 at a time = each alone"
      else row "3. joining a running batch" "DIFFERS" "queue_tokens.txt vs pool_alone.txt"; fi
    else
      row "3. joining a running batch" "FAILED" "v3r run --batch 2 failed (check.log)"
    fi
    # Three requests to `v3r serve` on stdin — the first prompt asking for 30 tokens only, then the
    # second prompt twice: the third joins when the first ends, while the second still runs (its
    # two prefill chunks of 16 rows on either side of one of the second's decode steps, its rows
    # reclaimed in the scratch pages); each a JSON line back as it ends: the first 30 of the first
    # prompt's tokens alone, then the second's all, twice.
    ids() { tr ' ' ',' < "$1"; }
    printf '{"prompt": [%s], "max_new_tokens": 30}\n{"prompt": [%s]}\n{"prompt": [%s]}\n' "$(ids "$e2e/prompt1.txt")" \
      "$(ids "$e2e/prompt2.txt")" "$(ids "$e2e/prompt2.txt")" > "$out/serve_requests.jsonl"
    if timeout 60 "$v3r" serve "$e2e/sm90tc" --weights "$e2e/ckpt" --batch 2 --max-new-tokens 100 --ignore-eos \
        < "$out/serve_requests.jsonl" > "$out/serve.jsonl" 2>>"$log"; then
      python3 -c 'import json, sys
r = sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda v: v["id"])
print("\n".join(" ".join(map(str, v.get("tokens", ["error:", v.get("error")]))) for v in r))' "$out/serve.jsonl" > "$out/serve_tokens.txt"
      if cmp -s "$out/serve_tokens.txt" <(head -1 "$out/pool_alone.txt" | cut -d' ' -f1-30; tail -1 "$out/pool_alone.txt"; tail -1 "$out/pool_alone.txt"); then
        row "3. v3r serve" "ok" "a request joining mid-run = alone"
      else row "3. v3r serve" "DIFFERS" "serve.jsonl vs pool_alone.txt"; fi
    else
      row "3. v3r serve" "FAILED" "v3r serve failed (check.log)"
    fi
    # Log-probabilities scored on the device (rows_scores_*, the host's bits): a greedy request
    # asking for its tokens' and the 5 most probable ones', a sampled one for its tokens', and an
    # echoed prompt scored with one alternative — against --pick-on-host (every row read back, scored on the
    # host): the same tokens and values.
    printf '{"prompt": [%s], "max_new_tokens": 12, "logprobs": true, "top_logprobs": 5}\n{"prompt": [%s], "max_new_tokens": 12, "logprobs": true, "temperature": 0.8, "seed": 3}\n{"prompt": [%s], "max_new_tokens": 4, "logprobs": true, "top_logprobs": 1, "echo": true}\n' \
      "$(ids "$e2e/prompt1.txt")" "$(ids "$e2e/prompt2.txt")" "$(ids "$e2e/prompt2.txt")" > "$out/logprob_requests.jsonl"
    scored=(serve "$e2e/sm90tc" --weights "$e2e/ckpt" --batch 2 --ignore-eos)
    if timeout 60 "$v3r" "${scored[@]}" < "$out/logprob_requests.jsonl" > "$out/e2e_logprobs.jsonl" 2>>"$log" \
        && timeout 60 "$v3r" "${scored[@]}" --pick-on-host < "$out/logprob_requests.jsonl" \
          > "$out/e2e_logprobs_host.jsonl" 2>>"$log"; then
      if verdict=$(python3 - "$out/e2e_logprobs.jsonl" "$out/e2e_logprobs_host.jsonl" <<'PY'
import json, sys
keys = ("tokens", "logprobs", "top_logprobs", "prompt_logprobs", "prompt_top_logprobs")
dev, host = ([{k: v.get(k) for k in keys} for v in sorted((json.loads(l) for l in open(p)), key=lambda v: v["id"])]
             for p in sys.argv[1:3])
n = sum(len(v["logprobs"] or []) + len(v["prompt_logprobs"] or []) for v in dev)
print(f"{n} log-probabilities, {'equal' if dev == host else 'DIFFERENT'} to --pick-on-host's")
sys.exit(0 if dev == host and n > 0 else 1)
PY
      ); then row "3. logprobs scored on the device" "ok" "$verdict"; else row "3. logprobs scored on the device" "DIFFERS" "$verdict"; fi
    else
      row "3. logprobs scored on the device" "FAILED" "v3r serve with logprobs failed (check.log)"
    fi
  else
    row "3. pool of pages" "FAILED" "v3r run failed (check.log)"
  fi
  # Shared pages on the device: a 72-token prompt decoding while a second one sharing its first 70
  # tokens joins — holding the first's page 0 (not a copy; its rows also copied into the scratch rows
  # the rest's prefill continues from) — each must get its tokens alone, the second reporting 64
  # prompt tokens shared.
  python3 -c "import sys; a = [(i * 37 + 5) % 509 + 3 for i in range(72)]; b = a[:70] + [7, 8, 9, 10, 11]
print(' '.join(map(str, a))); print(' '.join(map(str, b)))" > "$out/shared_prompts.txt"
  shared_alone() { timeout 60 "$v3r" run "$e2e/sm90tc" --weights "$e2e/ckpt" --prompt-tokens "$1" --max-new-tokens 20 \
    --ignore-eos 2>>"$log"; }
  if { shared_alone "$(sed -n 1p "$out/shared_prompts.txt")"; shared_alone "$(sed -n 2p "$out/shared_prompts.txt")"; } \
      > "$out/shared_alone.txt"; then
    python3 -c 'import json, sys
for l in open(sys.argv[1]): print(json.dumps({"prompt": list(map(int, l.split())), "max_new_tokens": 20}))' \
      "$out/shared_prompts.txt" > "$out/shared_requests.jsonl"
    if timeout 60 "$v3r" serve "$e2e/sm90tc" --weights "$e2e/ckpt" --batch 2 --ignore-eos \
        < "$out/shared_requests.jsonl" > "$out/shared_serve.jsonl" 2>>"$log"; then
      if verdict=$(python3 - "$out/shared_serve.jsonl" "$out/shared_alone.txt" <<'PY'
import json, sys
got = sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda v: v["id"])
alone = [list(map(int, l.split())) for l in open(sys.argv[2])]
same = [g.get("tokens") == a for g, a in zip(got, alone)]
shared = [g.get("reused_prompt_tokens") for g in got]
print(f"tokens as alone {same}, prompt tokens shared {shared}")
sys.exit(0 if all(same) and len(same) == 2 and shared == [0, 64] else 1)
PY
      ); then row "3. shared pages" "ok" "$verdict"; else row "3. shared pages" "DIFFERS" "$verdict"; fi
    else
      row "3. shared pages" "FAILED" "v3r serve failed (check.log)"
    fi
  else
    row "3. shared pages" "FAILED" "v3r run failed (check.log)"
  fi
  # Perplexity: 256 tokens in windows of 64 every 32 through the tensor-core artifact (bf16 attention)
  # against a cpu artifact's (prepare.sh): mean negative log-likelihood within 2% relative.
  if [ -s "$e2e/expected_ppl.json" ] && timeout 60 "$v3r" perplexity "$e2e/sm90tc" --weights "$e2e/ckpt" \
      --data "$e2e/ppl_tokens.txt" --window 64 --stride 32 --json > "$out/perplexity.json" 2>>"$log"; then
    if verdict=$(python3 - "$out/perplexity.json" "$e2e/expected_ppl.json" <<'PY'
import json, sys
got, want = (json.load(open(p)) for p in sys.argv[1:3])
rel = abs(got["mean_nll"] - want["mean_nll"]) / want["mean_nll"]
print(f"ppl {got['perplexity']:.3f} vs cpu {want['perplexity']:.3f} (NLL rel {rel:.1e}), {got['tokens_per_s']:.0f} tok/s")
sys.exit(0 if rel < 0.02 else 1)
PY
    ); then row "3. perplexity" "ok" "$verdict"; else row "3. perplexity" "DIFFERS" "$verdict"; fi
    # The same windows scored on the host (--score-on-host: every row's logits read back): the device's
    # scoring kernel gives the host's bits, so the same NLL exactly; and the two speeds.
    if timeout 60 "$v3r" perplexity "$e2e/sm90tc" --weights "$e2e/ckpt" --data "$e2e/ppl_tokens.txt" \
        --window 64 --stride 32 --json --score-on-host > "$out/perplexity_host.json" 2>>"$log"; then
      if verdict=$(python3 - "$out/perplexity.json" "$out/perplexity_host.json" <<'PY'
import json, sys
dev, host = (json.load(open(p)) for p in sys.argv[1:3])
same = dev["mean_nll"] == host["mean_nll"] and dev["scored_on_device"] and not host["scored_on_device"]
print(f"NLL {dev['mean_nll']!r} vs {host['mean_nll']!r} on the host; {dev['tokens_per_s']:.0f} vs {host['tokens_per_s']:.0f} tok/s")
sys.exit(0 if same else 1)
PY
      ); then row "3. perplexity scored on the device" "ok" "$verdict"; else row "3. perplexity scored on the device" "DIFFERS" "$verdict"; fi
    else
      row "3. perplexity scored on the device" "FAILED" "v3r perplexity --score-on-host failed (check.log)"
    fi
  else
    row "3. perplexity" "FAILED" "v3r perplexity failed or no expected_ppl.json (check.log)"
  fi
  # Greedy generation: two prompts as one batch (the second prefilled in two chunks), 16 tokens each.
  if timeout 60 "$v3r" run "$e2e/sm90" --weights "$e2e/ckpt" --prompt-tokens "$(cat "$e2e/prompt1.txt")" \
      --prompt-tokens "$(cat "$e2e/prompt2.txt")" --max-new-tokens 16 --ignore-eos > "$out/e2e_tokens.txt" 2>>"$log"; then
    same=$(paste -d' ' "$out/e2e_tokens.txt" "$e2e/expected_tokens.txt" | awk '{n = NF / 2; for (i = 1; i <= n; i++) if ($i == $(i + n)) s++} END {print s + 0}')
    note "e2e tokens: $same of 32 equal to the CPU backend's"; tail -1 "$log"
    if [ "$same" = 32 ]; then row "3. end to end tokens" "ok" "32/32 greedy tokens"
    else
      # Caches through the host instead of carried and moved on the device: tells the two apart.
      V3R_CARRY=0 timeout 60 "$v3r" run "$e2e/sm90" --weights "$e2e/ckpt" --prompt-tokens "$(cat "$e2e/prompt1.txt")" \
        --prompt-tokens "$(cat "$e2e/prompt2.txt")" --max-new-tokens 16 --ignore-eos > "$out/e2e_tokens_host.txt" 2>>"$log" || true
      host=$(paste -d' ' "$out/e2e_tokens_host.txt" "$e2e/expected_tokens.txt" | awk '{n = NF / 2; for (i = 1; i <= n; i++) if ($i == $(i + n)) s++} END {print s + 0}')
      row "3. end to end tokens" "DIFFERS" "$same/32 (e2e_tokens.txt); with V3R_CARRY=0 $host/32"
    fi
  else
    # Again launch by launch (no CUDA graph), synchronized: tells a graph problem from a kernel's, and
    # names the kernel.
    note "v3r run failed; again with V3R_GRAPHS=0 V3R_SYNC_EACH=1"
    if V3R_GRAPHS=0 V3R_SYNC_EACH=1 timeout 60 "$v3r" run "$e2e/sm90" --weights "$e2e/ckpt" \
        --prompt-tokens "$(cat "$e2e/prompt1.txt")" --prompt-tokens "$(cat "$e2e/prompt2.txt")" --max-new-tokens 16 \
        --ignore-eos > "$out/e2e_tokens_nograph.txt" 2>>"$log"; then
      row "3. end to end tokens" "FAILED" "with graphs only (e2e_tokens_nograph.txt has the tokens without)"
    else
      row "3. end to end tokens" "FAILED" "v3r run failed, graphs or not (check.log)"
    fi
  fi
  # Speculative decoding: the first prompt's greedy tokens with one MTP draft a pass (verified two
  # tokens at a time) and with three (chained through the MTP module's hidden state).
  for drafts in 1 3; do
    name="3. speculative, $drafts draft(s)" file="$out/e2e_speculative$drafts.txt"
    if timeout 60 "$v3r" run "$e2e/sm90spec" --weights "$e2e/ckpt" --prompt-tokens "$(cat "$e2e/prompt1.txt")" \
        --max-new-tokens 16 --ignore-eos --speculative --draft-tokens "$drafts" > "$file" 2>>"$log"; then
      tail -1 "$log"
      if [ "$(cat "$file")" = "$(head -1 "$e2e/expected_tokens.txt")" ]; then
        row "$name" "ok" "16/16 greedy tokens (acceptance, tokens a pass in check.log)"
      else
        row "$name" "DIFFERS" "$(basename "$file") vs the CPU backend's"
      fi
    else
      row "$name" "FAILED" "v3r run --speculative --draft-tokens $drafts failed (check.log)"
    fi
  done
  # Speculative serving: the first prompt twice to `v3r serve --speculative`, one request after the
  # other on one loaded program — each its greedy tokens (the second from fresh caches: nothing of
  # the first's left on the device).
  printf '{"prompt": "%s", "max_new_tokens": 16}\n' "$(cat "$e2e/prompt1.txt")" "$(cat "$e2e/prompt1.txt")" \
    > "$out/spec_serve_requests.jsonl"
  if timeout 60 "$v3r" serve "$e2e/sm90spec" --weights "$e2e/ckpt" --speculative --draft-tokens 2 --ignore-eos \
      < "$out/spec_serve_requests.jsonl" > "$out/spec_serve.jsonl" 2>>"$log"; then
    tail -1 "$log"
    python3 -c 'import json, sys
r = sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda v: v["id"])
print("\n".join(" ".join(map(str, v.get("tokens", ["error:", v.get("error")]))) for v in r))' "$out/spec_serve.jsonl" \
      > "$out/spec_serve_tokens.txt"
    if cmp -s "$out/spec_serve_tokens.txt" <(head -1 "$e2e/expected_tokens.txt"; head -1 "$e2e/expected_tokens.txt"); then
      row "3. speculative serving" "ok" "2 requests in turn, each 16/16 greedy tokens (acceptance in check.log)"
    else
      row "3. speculative serving" "DIFFERS" "spec_serve_tokens.txt vs the CPU backend's"
    fi
  else
    row "3. speculative serving" "FAILED" "v3r serve --speculative failed (check.log)"
  fi
  # Speculative sampling (--temperature): the caches kept on the device (the default) and moved
  # through the host (V3R_CARRY=0) make the same draws on the same caches: the same tokens.
  spec_sampled=(run "$e2e/sm90spec" --weights "$e2e/ckpt" --prompt-tokens "$(cat "$e2e/prompt1.txt")"
    --max-new-tokens 16 --ignore-eos --speculative --temperature 0.8 --top-p 0.95 --seed 5)
  if timeout 60 "$v3r" "${spec_sampled[@]}" > "$out/e2e_speculative_sampled.txt" 2>>"$log" \
      && V3R_CARRY=0 timeout 60 "$v3r" "${spec_sampled[@]}" > "$out/e2e_speculative_sampled_host.txt" 2>>"$log"; then
    if cmp -s "$out/e2e_speculative_sampled.txt" "$out/e2e_speculative_sampled_host.txt"; then
      row "3. speculative sampling" "ok" "$(wc -w < "$out/e2e_speculative_sampled.txt") tokens, caches on the device = through the host"
    else
      row "3. speculative sampling" "DIFFERS" "e2e_speculative_sampled.txt vs _host.txt (V3R_CARRY=0)"
    fi
  else
    row "3. speculative sampling" "FAILED" "v3r run --speculative --temperature failed (check.log)"
  fi
  # Sampling on the device (rows_sample_*, the host sampler's draws bit for bit): two prompts as a
  # batch at --temperature 0.8, every token weighed, then top-p 0.9, then top-k 20 with top-p 0.9, then
  # min-p 0.05 alone and with top-p 0.9, the tokens drawn on the device against those drawn on the host
  # from the logits read back (--pick-on-host): the same logits, so the same tokens.
  for shape in "every" "p0.9" "k20p0.9" "m0.05" "p0.9m0.05"; do
    case "$shape" in
      every) flags=() ;;
      p0.9) flags=(--top-p 0.9) ;;
      k20p0.9) flags=(--top-k 20 --top-p 0.9) ;;
      m0.05) flags=(--min-p 0.05) ;;
      *) flags=(--top-p 0.9 --min-p 0.05) ;;
    esac
    name="3. sampled on the device, $shape" file="$out/e2e_sampled_$shape"
    sampled=(run "$e2e/sm90" --weights "$e2e/ckpt" --prompt-tokens "$(cat "$e2e/prompt1.txt")"
      --prompt-tokens "$(cat "$e2e/prompt2.txt")" --max-new-tokens 16 --ignore-eos --temperature 0.8 --seed 9 "${flags[@]}")
    if timeout 60 "$v3r" "${sampled[@]}" > "$file.txt" 2>>"$log" \
        && timeout 60 "$v3r" "${sampled[@]}" --pick-on-host > "${file}_host.txt" 2>>"$log"; then
      distinct=$(tr ' ' '\n' < "$file.txt" | sort -u | wc -l)
      if cmp -s "$file.txt" "${file}_host.txt"; then
        row "$name" "ok" "32 tokens ($distinct distinct) = drawn on the host (--pick-on-host)"
      else
        row "$name" "DIFFERS" "$(basename "$file").txt vs _host.txt (--pick-on-host)"
      fi
    else
      row "$name" "FAILED" "v3r run --temperature failed (check.log)"
    fi
  done
    note "== 3b. training: v3r train of the tiny model's sm_90a training-step artifacts against the cpu artifact's"
  # Losses step by step within $3 relative of the cpu artifact's ($2) in the run's loss log ($1).
  losses_match() {
    python3 - "$1" "$2" "$3" <<'PY' 2>&1 | tee -a "$log"
import csv, sys
got = [float(r["loss"]) for r in csv.DictReader(open(sys.argv[1]))]
want = [float(r["loss"]) for r in csv.DictReader(open(sys.argv[2]))]
worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
print(f"training losses {['%.5f' % x for x in got]} vs cpu {['%.5f' % x for x in want]}: worst {worst:.1e}")
sys.exit(0 if len(got) == len(want) and worst <= float(sys.argv[3]) else 1)
PY
  }
  for m in f32 fp8 f32wide; do
    exp="$root/.device/train/${m}_expected/loss.csv"
    # f32: bf16 hi/lo tensor-core matmuls, ~1e-5 of the CPU's; the FP8 recipe's e4m3 roundings may
    # flip on last-bit differences: 2e-2; f32wide (64-wide heads): attention and its gradient on the
    # flash kernels in bf16 (emulated: losses within 9.1e-6 of the CPU backend's over 3 steps): 1e-3.
    tol=1e-3; [ "$m" = fp8 ] && tol=2e-2
    ckpt="$root/.device/train/ckpt"; [ "$m" = f32wide ] && ckpt="$root/.device/train/ckpt_f32wide"
    train_run() { # $1: the run's directory name, then extra flags
      local dir="$1"; shift
      timeout "$(budget 60)" "$v3r" train "$root/.device/train/${m}_sm_90a" --weights "$ckpt" \
        --data "$root/.device/train/data.txt" --steps 4 --batch 2 --seq 32 --out "$out/$dir" "$@" 2>&1 | tee -a "$log"
    }
    if [ -f "$exp" ] && train_run "train_$m"; then
      if losses_match "$out/train_$m/loss.csv" "$exp" "$tol"; then
        row "3b. training $m" "ok" "$(grep -o '[0-9]* tokens/s' "$log" | tail -1), AdamW on the device, losses as the cpu artifact's"
        continue
      fi
      row "3b. training $m" "DIFFERS" "train_$m/loss.csv vs the cpu artifact's; train_dump_$m (check.log)"
      # One step on one window with every launch's buffers dumped; on the build machine:
      #   v3c emulate .device/train/${m}_sm_90a --weights .device/train/ckpt(_f32wide) --tokens "$(cat .device/train/window.txt)" \
      #     --out /tmp/e.safetensors --dump /tmp/d && python3 benches/device/dump_compare.py $OUT/train_dump_$m /tmp/d
      V3R_DUMP_DIR="$out/train_dump_$m" timeout "$(budget 60)" "$v3r" train "$root/.device/train/${m}_sm_90a" \
        --weights "$ckpt" --data "$root/.device/train/window.txt" --steps 1 --batch 1 --seq 32 \
        --out "$out/train1_$m" >>"$log" 2>&1 || note "the dumped training step failed too (check.log)"
    else
      row "3b. training $m" "FAILED" "v3r train failed or no .device/train (check.log)"
      [ -f "$exp" ] || continue
    fi
    # The same run with AdamW on the host: which of the step and the optimizer on the device is at fault.
    if train_run "train_host_$m" --host-optimizer && losses_match "$out/train_host_$m/loss.csv" "$exp" "$tol"; then
      row "3b. training $m, host AdamW" "ok" "the step agrees: the device optimizer is at fault"
    else
      row "3b. training $m, host AdamW" "DIFFERS" "the step itself (check.log)"
    fi
  done
  note "== 4. the small model's kernels timed (v3r bench-kernels)"
  if timeout 60 "$v3r" bench-kernels "$e2e/sm90" --weights "$e2e/ckpt" --reps 10 --out "$out/e2e_kernels.json" 2>&1 | tee -a "$log"; then
    row "4. kernel timing" "ok" "e2e_kernels.json"
  else
    row "4. kernel timing" "FAILED" "see check.log"
  fi
else
  note "no .device/e2e (benches/device/prepare.sh), no v3r or no Hopper GPU: skipped"
  row "3. end to end" "SKIPPED" "no .device/e2e, v3r or Hopper"
fi

note "== 2. GEMM template kernels vs torch (correctness, then timing)"
if ! want 2; then
  note "(step 2 not in CHECK_STEPS)"
elif [ -d "$root/.device/gemm" ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  # One process per kernel under its own timeout: a kernel that hangs (a pipeline deadlock) is killed
  # with its process and the others still run.
  # The step stops starting kernels after 240 s (a device call has 600 s; the other steps need some).
  # In prepare.sh's order (order.txt: the open A/B first), else by name.
  bad=0; total=0; step_end=$((SECONDS + $(budget 240)))
  if [ -f "$root/.device/gemm/order.txt" ]; then mapfile -t kernels < "$root/.device/gemm/order.txt"
  else kernels=(); for ptx in "$root"/.device/gemm/*.ptx; do kernels+=("$(basename "$ptx" .ptx)"); done; fi
  for k in "${kernels[@]}"; do
    total=$((total + 1))
    if [ "$SECONDS" -ge "$step_end" ]; then
      bad=$((bad + 1)); note "$k: SKIPPED (step 2 time budget spent)"; continue
    fi
    if ! timeout "$(budget 90)" python3 "$root/benches/device/gemm_check.py" --ptx-dir "$root/.device/gemm" --kernel "$k" \
        --out "$out/gemm_$k.json" 2>&1 | tee -a "$log"; then
      bad=$((bad + 1)); note "$k: FAILED or timed out (90 s)"
    fi
  done
  if [ "$bad" = 0 ]; then row "2. GEMM kernels" "ok" "$total kernels"; else row "2. GEMM kernels" "FAILED" "$bad of $total (check.log, gemm_*.json)"; fi
else
  note "no .device/gemm (run benches/device/prepare.sh on the build machine) or no torch+CUDA: skipped"
  row "2. GEMM kernels" "SKIPPED" "no .device/gemm or no GPU"
fi

note "== 2c. row kernels vs torch (benches/device/rows_check.py: correctness, then GB/s)"
if ! want 2c; then
  note "(step 2c not in CHECK_STEPS)"
elif [ -d "$root/.device/rows" ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  # One process for every row kernel (they hold no pipeline that could hang), 120 s at most.
  total=$(ls "$root"/.device/rows/*.ptx | wc -l)
  if [ "$(budget 100)" -gt 10 ] && timeout "$(budget 100)" python3 "$root/benches/device/rows_check.py" --ptx-dir "$root/.device/rows" --all \
      --ceilings "$out/ceilings.json" --out-dir "$out" 2>&1 | tee -a "$log"; then
    row "2c. row kernels" "ok" "$total kernels"
  else
    row "2c. row kernels" "FAILED" "see check.log, rows_*.json"
  fi
else
  note "no .device/rows (run benches/device/prepare.sh on the build machine) or no torch+CUDA: skipped"
  row "2c. row kernels" "SKIPPED" "no .device/rows or no GPU"
fi

note "== 2d. MLA attention vs torch (benches/device/mla_check.py: decode paged + split K, then GB/s; causal prefill, then TFLOP/s; training's flash forward + dQ/dK/dV vs autograd, then vs SDPA fwd+bwd)"
if ! want 2d; then
  note "(step 2d not in CHECK_STEPS)"
elif [ -d "$root/.device/mla" ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
  if [ "$(budget 80)" -gt 10 ] && timeout "$(budget 80)" python3 "$root/benches/device/mla_check.py" --ptx-dir "$root/.device/mla" \
      --ceilings "$out/ceilings.json" --out "$out/mla.json" 2>&1 | tee -a "$log"; then
    row "2d. MLA attention" "ok" "mla.json"
  else
    row "2d. MLA attention" "FAILED" "see check.log, mla.json"
  fi
else
  note "no .device/mla (run benches/device/prepare.sh on the build machine) or no torch+CUDA: skipped"
  row "2d. MLA attention" "SKIPPED" "no .device/mla or no GPU"
fi

note "== 5. decode: a 4-layer full-width slice (random fp8 weights) by v3r, and transformers on the same device"
slice="$root/.device/slice"
left=$((570 - SECONDS))
if ! want 5; then
  note "(step 5 not in CHECK_STEPS)"
elif [ -d "$slice/sm90" ] && [ -n "$v3r" ] && [ "$left" -ge 150 ] && grep -q '"compute_capability":\[9,0\]' "$out/doctor.json" 2>/dev/null; then
  if timeout "$(budget 150)" "$v3r" bench-decode "$slice/sm90" --random-weights 1 --batch 1,64 --context 512,4096 --reps 10 \
      --out "$out/decode_slice.json" 2>&1 | tee -a "$log"; then
    row "5. decode (v3r)" "ok" "$(grep -o 'batch *64[^,]*' "$log" | tail -1)"
  else
    row "5. decode (v3r)" "FAILED" "see check.log"
  fi
  # Where a decode step's time goes: each kernel of the decode entry at the plan's 64 x 4096, timed
  # after an L2-evicting memset (zero inputs: every token routes to the same 8 experts).
  left=$((570 - SECONDS))
  if [ "$left" -ge 240 ]; then
    if timeout 60 "$v3r" bench-kernels "$slice/sm90" --random-weights 1 --entry decode --reps 10 \
        --out "$out/decode_slice_kernels.json" 2>&1 | tee -a "$log"; then
      row "5. decode kernels (v3r)" "ok" "$(grep -o 'entry decode: [0-9.]* ms per run' "$log" | tail -1) (decode_slice_kernels.json)"
    else
      row "5. decode kernels (v3r)" "FAILED" "see check.log"
    fi
  fi
  # DeepSeek-V3.2's slice (prepare.sh): its prefill (4096 tokens) and decode (64 x 4096) kernels one
  # by one over bf16 cache rows, the attention gathering each query's selected rows (`_sel16`: the
  # cost model's 3.9 ms a layer for prefill, 65.2 us for decode; on an H200) and the indexer's
  # scores (on the tensor cores: `_mma_bf16`, the cost model's 214.6 us a layer for prefill, 18.0 us
  # for decode) and top keys.
  left=$((570 - SECONDS))
  if [ -d "$root/.device/slice32/sm90" ] && [ "$left" -ge 240 ]; then
    if timeout 60 "$v3r" bench-kernels "$root/.device/slice32/sm90" --random-weights 1 --reps 5 \
        --out "$out/v32_slice_kernels.json" 2>&1 | tee -a "$log"; then
      row "5. V3.2 kernels (v3r)" "ok" "$(grep -oE '(mla_decode_kv512_r64_p64_s2_sel[16]*|rows_indexscores_[a-z0-9_]*) *[0-9]* launches *[0-9.]* ms each' "$log" | tail -4 | sed 's/  */ /g' | paste -sd';') (one line an entry: v32_slice_kernels.json)"
    else
      row "5. V3.2 kernels (v3r)" "FAILED" "see check.log"
    fi
  fi
  # fp8 decode caches (--kv-cache fp8): the attention streams 656 bytes a cached row instead of 1152.
  left=$((570 - SECONDS))
  if [ -d "$slice/sm90fp8c" ] && [ "$left" -ge 180 ]; then
    if timeout 60 "$v3r" bench-decode "$slice/sm90fp8c" --random-weights 1 --batch 1,64 --context 4096 --reps 10 \
        --out "$out/decode_slice_fp8c.json" 2>&1 | tee -a "$log"; then
      row "5. decode, fp8 caches (v3r)" "ok" "$(grep -o 'batch *64[^,]*' "$log" | tail -1)"
    else
      row "5. decode, fp8 caches (v3r)" "FAILED" "see check.log"
    fi
  fi
  # Prefill: chunks of 4096 and 1024 tokens from an empty cache, and 1024 after 3072 cached rows (a
  # 4096-token prompt's last chunk), by the slice compiled for 4096-token chunks; transformers' 4096.
  left=$((570 - SECONDS))
  if [ -d "$slice/sm90p" ] && [ "$left" -ge 240 ]; then
    if timeout 60 "$v3r" bench-prefill "$slice/sm90p" --random-weights 1 --tokens 1024,4096 --reps 5 \
        --out "$out/prefill_slice.json" 2>&1 | tee -a "$log" \
        && timeout 45 "$v3r" bench-prefill "$slice/sm90p" --random-weights 1 --tokens 1024 --context 3072 --reps 5 \
          --out "$out/prefill_slice_late.json" 2>&1 | tee -a "$log"; then
      row "5. prefill (v3r)" "ok" "$(grep -o 'prefill  4096 tokens after     0 cached: .*' "$log" | tail -1)"
      # The A/B of the head on the last row alone: every launch over the whole chunk.
      if [ $((570 - SECONDS)) -ge 300 ] \
          && timeout 45 "$v3r" bench-prefill "$slice/sm90p" --random-weights 1 --tokens 4096 --reps 5 --all-launches \
          --out "$out/prefill_slice_all.json" 2>&1 | tee -a "$log"; then
        row "5. prefill, every launch whole (v3r)" "ok" "$(grep -o 'prefill  4096 tokens after     0 cached: .*' "$log" | tail -1) (prefill_slice_all.json)"
      fi
      # The A/B of the GEMM kernels picked for fewer rows: short chunks, then the same with the
      # kernels picked for 4096 rows.
      if [ $((570 - SECONDS)) -ge 280 ] \
          && timeout 45 "$v3r" bench-prefill "$slice/sm90p" --random-weights 1 --tokens 128,512 --reps 5 \
          --out "$out/prefill_slice_short.json" 2>&1 | tee -a "$log" \
          && timeout 45 "$v3r" bench-prefill "$slice/sm90p" --random-weights 1 --tokens 128,512 --reps 5 \
          --plan-rows-kernels --out "$out/prefill_slice_short_planrows.json" 2>&1 | tee -a "$log"; then
        row "5. prefill, short chunks: own kernels, then 4096's (v3r)" "ok" \
          "$(grep -o 'prefill   128 tokens after     0 cached: [^,]*' "$log" | tail -2 | tr '\n' ' ')(prefill_slice_short*.json)"
      fi
    else
      row "5. prefill (v3r)" "FAILED" "see check.log"
    fi
    if [ $((570 - SECONDS)) -ge 240 ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
      timeout 60 python3 "$root/benches/device/hf_decode.py" --config "$slice/config/config.json" --points "" \
        --prefill 4096 --out "$out/prefill_slice_hf.json" 2>&1 | tee -a "$log"
      row "5. prefill (transformers)" "done" "$(grep -o 'hf prefill 4096 tokens: .*' "$log" | tail -1)"
    fi
  fi
  # Serving: 64 requests (prompts of 128..1024 tokens, 64 new each) through 32 slots, each joining
  # the running batch as a sequence ends; only while the steps after it keep their time.
  left=$((570 - SECONDS))
  if [ "$left" -ge 330 ]; then
    if timeout 60 "$v3r" bench-serve "$slice/sm90" --random-weights 1 --requests 64 --batch 32 --prompt-tokens 128..1024 \
        --new-tokens 64 --out "$out/serve_slice.json" 2>&1 | tee -a "$log"; then
      row "5. serving (v3r)" "ok" "$(grep -o '[0-9.]* tokens/s, [0-9.]* requests/s' "$log" | tail -1) (serve_slice.json)"
      # The A/B of leaving idle slots out of the decode steps (the default): every slot's row run.
      if [ $((570 - SECONDS)) -ge 300 ] && timeout 60 "$v3r" bench-serve "$slice/sm90" --random-weights 1 --requests 64 \
          --batch 32 --prompt-tokens 128..1024 --new-tokens 64 --every-slot --out "$out/serve_slice_every.json" 2>&1 \
          | tee -a "$log"; then
        row "5. serving, every slot (v3r)" "ok" "$(grep -o '[0-9.]* tokens/s, [0-9.]* requests/s' "$log" | tail -1) (serve_slice_every.json; decode_rows_run against serve_slice.json's)"
      fi
      # The same load on the artifact `v3c compile` now makes by default: prompts prefilled in
      # one chunk of up to 4096 tokens instead of 64-token chunks (time to first token).
      if [ -d "$slice/sm90p" ] && [ $((570 - SECONDS)) -ge 300 ] && timeout 60 "$v3r" bench-serve "$slice/sm90p" \
          --random-weights 1 --requests 64 --batch 32 --prompt-tokens 128..1024 --new-tokens 64 \
          --out "$out/serve_slice_chunks.json" 2>&1 | tee -a "$log"; then
        row "5. serving, 4096-token chunks (v3r)" "ok" "$(grep -o '[0-9.]* tokens/s, [0-9.]* requests/s' "$log" | tail -1) (serve_slice_chunks.json: TTFT against serve_slice.json's)"
      fi
    else
      row "5. serving (v3r)" "FAILED" "see check.log"
    fi
  fi
  # A serving load twice, with the flags that differ (`serve_ab NAME FILE "A/B" FLAG_B LOAD...`):
  # LOAD as it is into FILE.json, then with FLAG_B into FILE_B_SUFFIX.json (FILE_host for
  # --pick-on-host, FILE_off for --no-prefix-reuse), where 300 s of the run are left.
  serve_ab() {
    local name=$1 file=$2 what=$3 flag=$4 suffix=$5
    shift 5
    [ "$((570 - SECONDS))" -ge 300 ] || return 0
    if timeout 45 "$v3r" bench-serve "$slice/sm90" --random-weights 1 "$@" --out "$out/$file.json" 2>&1 | tee -a "$log" \
        && timeout 45 "$v3r" bench-serve "$slice/sm90" --random-weights 1 "$@" "$flag" \
          --out "$out/${file}_$suffix.json" 2>&1 | tee -a "$log"; then
      row "$name" "ok" "$what: $file.json, ${file}_$suffix.json"
    else
      row "$name" "FAILED" "see check.log"
    fi
  }
  # Sampled serving (--temperature 0.8, every token weighed): tokens drawn on the device against
  # the logits read back and drawn on the host (--pick-on-host), 32 requests through 32 slots.
  serve_ab "5. sampled serving (v3r)" serve_sampled "device vs host picks" --pick-on-host host \
    --requests 32 --batch 32 --prompt-tokens 128..512 --new-tokens 64 --temperature 0.8
  # Serving requests that ask for log-probabilities (--logprobs 1: the tokens' and the most probable
  # one's): scored on the device against every step's logits read back (--pick-on-host).
  serve_ab "5. serving with logprobs (v3r)" serve_logprobs "scored on the device vs host" --pick-on-host host \
    --requests 32 --batch 32 --prompt-tokens 128..512 --new-tokens 64 --temperature 0.8 --logprobs 1
  # Serving prompts that share a 448-token system prompt: its cache rows copied from a served
  # request's pages (the default) against prefilled by every request (--no-prefix-reuse).
  serve_ab "5. serving, shared prefix (v3r)" serve_shared "reuse on vs off" --no-prefix-reuse off \
    --requests 32 --batch 16 --prompt-tokens 512..1024 --shared-prefix 448 --new-tokens 32
  left=$((570 - SECONDS))
  if [ "$left" -ge 120 ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
    # Both of v3r's points (the cache prefilled 1024 rows at a time; the JSON written after each point).
    timeout "$(budget 150)" python3 "$root/benches/device/hf_decode.py" --config "$slice/config/config.json" \
      --points 1x4096,64x4096 --out "$out/decode_slice_hf.json" 2>&1 | tee -a "$log"
    # Ours over theirs at the points both measured.
    ratio=$(python3 - "$out/decode_slice.json" "$out/decode_slice_hf.json" <<'PY' 2>>"$log"
import json, sys
ours = {(p["batch"], p["context"]): p["tokens_per_s"] for p in json.load(open(sys.argv[1]))["steps"]}
hf = json.load(open(sys.argv[2]))
pairs = [(p["batch"], p["context"], ours[(p["batch"], p["context"])] / p["tokens_per_s"])
         for p in hf.get("points", []) if "tokens_per_s" in p and (p["batch"], p["context"]) in ours]
print(", ".join(f"{b}x{c}: {r:.2f}x" for b, c, r in pairs) or hf.get("skipped", "no common point"))
PY
)
    note "decode tokens/s, v3r over transformers: $ratio"
    row "5. decode (transformers)" "done" "v3r/transformers $ratio"
  else
    row "5. decode (transformers)" "SKIPPED" "no time left or no torch+CUDA"
  fi
else
  note "no .device/slice, no v3r, no Hopper or under 150 s left: skipped"
  row "5. decode" "SKIPPED" "no .device/slice, Hopper or time"
fi

note "== 5b. training: a 2-layer full-width slice (random f32 masters) by v3r bench-train"
# Whole optimizer steps of DeepSeek-V3's first two layers (dense) at 1 x 256 tokens, AdamW on the
# device (the default: parameters and moments stay there): the FP8 recipe, then f32; then the FP8
# recipe with --host-optimizer (parameters uploaded, gradients read back, AdamW on the host) for the
# ratio. Each only while the tuning after it keeps 200 s.
for m in fp8 f32 fp8-host; do
  art="$root/.device/train_slice/${m%-host}"
  flags=()
  [ "$m" = fp8-host ] && flags=(--host-optimizer)
  if ! want 5b; then
    note "(step 5b not in CHECK_STEPS)"
  elif [ -d "$art" ] && [ -n "$v3r" ] && [ $((570 - SECONDS)) -ge 200 ] && grep -q '"compute_capability":\[9,0\]' "$out/doctor.json" 2>/dev/null; then
    if timeout "$(budget 100)" "$v3r" bench-train "$art" --random-weights 1 --batch 1 --seq 256 --steps 3 "${flags[@]}" \
        --out "$out/train_slice_$m.json" 2>&1 | tee -a "$log"; then
      row "5b. training slice $m" "ok" "$(grep -o '[0-9.]* tokens/s' "$log" | tail -1) (train_slice_$m.json)"
    else
      row "5b. training slice $m" "FAILED" "see check.log"
    fi
  else
    row "5b. training slice $m" "SKIPPED" "no .device/train_slice, Hopper or time"
  fi
done

note "== 2b. tuning: the full model's GEMM candidates measured (v3r tune; tune_check.py if it fails)"
if ! want 2b; then
  note "(step 2b not in CHECK_STEPS)"
elif [ -f "$root/.device/tune/candidates.json" ] && [ -n "$v3r" ] && grep -q '"compute_capability":\[9,0\]' "$out/doctor.json" 2>/dev/null; then
  # Whatever is left of a 570 s run (a device call has 600 s), at most 240 s; under 40 s, nothing.
  left=$(budget 240)
  [ "$left" -lt 40 ] && { note "under 40 s left: tuning skipped"; left=0; }
  # v3r launches through the runtime's own GEMM parameter code and checks each problem's default
  # configuration against the host's product first.
  if [ "$left" -gt 0 ] && timeout "$left" "$v3r" tune "$root/.device/tune" --out "$out/tuning.json" 2>&1 | tee -a "$log"; then
    row "2b. tuning" "ok" "tuning.json by v3r tune (copy to tuning/ and commit)"
  else
    left=$(budget 240)
    if [ "$left" -ge 40 ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log" && \
        timeout "$left" python3 "$root/benches/device/tune_check.py" --dir "$root/.device/tune" --out "$out/tuning.json" 2>&1 | tee -a "$log"; then
      row "2b. tuning" "PARTIAL" "v3r tune failed (check.log); tuning.json by tune_check.py"
    else
      row "2b. tuning" "FAILED" "see check.log"
    fi
  fi
else
  note "no .device/tune (benches/device/prepare.sh), no v3r or no Hopper: skipped"
  row "2b. tuning" "SKIPPED" "no .device/tune or no GPU"
fi

note "== 2b. tuning: the training step's flash attention (forward, log-sum-exps, dQ, dK, dV) at 4096-token windows"
if ! want 2b; then
  note "(step 2b not in CHECK_STEPS)"
elif [ -f "$root/.device/tune_train/candidates.json" ] && [ -n "$v3r" ] && grep -q '"compute_capability":\[9,0\]' "$out/doctor.json" 2>/dev/null; then
  left=$(budget 120)
  # Each default against the host's attention (gradient) rows first, every other depth against it.
  if [ "$left" -ge 40 ] && timeout "$left" "$v3r" tune "$root/.device/tune_train" --out "$out/tuning.json" 2>&1 | tee -a "$log"; then
    row "2b. tuning (training)" "ok" "the flash kernels' depths into tuning.json"
  else
    row "2b. tuning (training)" "FAILED" "see check.log (or under 40 s left)"
  fi
else
  row "2b. tuning (training)" "SKIPPED" "no .device/tune_train or no GPU"
fi

note ""
note "== summary ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown))"
for r in "${table[@]}"; do note "$r"; done
