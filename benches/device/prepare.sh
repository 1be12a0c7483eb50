#!/usr/bin/env bash
# On the build machine: everything benches/device/check.sh needs on the GPU machine, into the git-ignored
# .device/ (carry it along): the runtime `v3r` and the PTX of the sm_90a template kernels under test.
#   bash benches/device/prepare.sh && (on the GPU machine) bash benches/device/check.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cargo build --release -q -p v3c-runtime -p v3c-compiler
rm -rf .device/gemm && mkdir -p .device/gemm
cp target/release/v3r .device/
# GEMM template kernels, in the order check.sh step 2 checks and times them (order.txt; the step has a
# time budget, so the open questions go first). First the A/B of K-pipelining (`_kp`: the next K tile's
# wgmma chain issued before the last one is waited for): the prefill picks since ptxas's register counts
# replaced the model's (2026-12-06: fp8 128x128 with two consumers and its residual form, 256x64, the
# contiguous MoE gate/up, the head's bf16 dual-A 128x192 with one consumer) each beside its plain or
# former twin, then decode's split-K picks and twins. Then bf16 and fp8 block-scaled, f32 and bf16
# outputs (plain forms), the scheduling variants, kernels `v3c compile --target sm_90a` picked for the
# full model with the cost model before its H200 run-1 fit (decode: 64-row tiles, split K for the MLA
# projections; prefill: two consumers + producer; +residual) and the fitted model's picks (prefill:
# 128x64 tiles, two consumers, no producer, two blocks an SM; decode's o_proj split K; bf16 prefill
# 128x256), the grouped (MoE) forms: gathered tokens, contiguous sorted rows (with routing weights),
# masked; fp8 outputs (1x128 scales written by the epilogue), a cluster of two (B multicast), the head's
# dual-A kernels (f32 activations as bf16 hi + lo, the weights read once) for decode and prefill and the
# decode one's plain twin (the head's former form ran one a half), the router gate's prefill GEMM
# (dual-A, N = 256; before, CUDA-core pieces: rows_routelogits).
gemm_kernels=(
  gemm_fp8_f32_128x128x128_s5_wg2_kp gemm_fp8_f32_128x128x128_s5_wg2 gemm_fp8_f32_128x64x128_s4_wg2
  gemm_fp8_f32_128x128x128_s5_wg2_res_kp gemm_fp8_f32_128x128x128_s5_wg2_ws_res
  gemm_fp8_f32_256x64x128_s5_wg2_kp gemm_fp8_f32_256x64x128_s5_wg2_ws
  gemm_fp8_f32_128x128x128_s4_wg2_ws_persist_contig_kp gemm_fp8_f32_128x128x128_s3_wg2_ws_persist_contig
  gemm_bf16_f32_128x192x64_s4_a2_kp gemm_bf16_f32_128x192x64_s4_wg2_a2_kp gemm_bf16_f32_128x192x64_s4_wg2_ws_a2
  gemm_fp8_f32_64x64x128_s8_splitk_kp gemm_fp8_f32_64x64x128_s5_splitk_kp gemm_fp8_f32_64x64x128_s5_splitk
  gemm_fp8_f32_64x64x128_s5_splitk_res_kp gemm_fp8_f32_64x64x128_s5_splitk_res
  gemm_fp8_f32_128x64x128_s4_wg2_kp gemm_bf16_bf16_128x128x64_s4_wg2_ws_persist_r8_kp
  gemm_bf16_f32_64x128x64_s5_a2_kp gemm_bf16_f32_128x64x64_s5_wg2_ws_a2
  gemm_bf16_bf16_128x128x64_s4 gemm_bf16_f32_64x256x64_s4 gemm_fp8_bf16_64x128x128_s6 gemm_fp8_f32_128x64x128_s4
  gemm_bf16_bf16_128x128x64_s4_wg2_ws_persist_r8 gemm_bf16_f32_64x128x64_s6_splitk
  gemm_fp8_f32_64x64x128_s8_res gemm_bf16_f32_128x256x64_s4_wg2_ws
  gemm_fp8_f32_128x128x128_s6_wg2_ws_persist_gather
  gemm_fp8_f32_128x128x128_s6_wg2_ws_persist_contig_rowscale
  gemm_fp8_f32_64x128x128_s8_ws_masked_rowscale gemm_bf16_bf16_128x128x64_s6_wg2_ws_gather_swiglu
  gemm_fp8_f32_128x128x128_s6_wg2_ws_persist_contig_rowscale_scatter
  gemm_bf16_fp8_128x128x64_s6_wg2_ws gemm_fp8_fp8_128x128x128_s6_wg2_ws_persist_contig
  gemm_fp8_f32_128x128x128_s6_wg2_ws_persist_r8_cl2 gemm_bf16_f32_64x256x64_s2_a2 gemm_bf16_f32_64x256x64_s2
)
printf '%s\n' "${gemm_kernels[@]}" > .device/gemm/order.txt
for k in "${gemm_kernels[@]}"; do
  target/release/v3c dump-ir --stage ptx --kernel "$k" \
    | awk '/^\/\/ ----- stage ptx/ {p = 1; next} /^\/\/ ptxas:/ {p = 0} p' > ".device/gemm/$k.ptx"
  grep -q "\.entry $k(" ".device/gemm/$k.ptx" || { echo "prepare: no PTX entry for $k" >&2; exit 1; }
done
# Row kernels: the four the full model's fp8 graph maps (embedding, the norms with their quantization; the
# widths the cost model picks for decode and prefill too), then ragged forms (a width that is no multiple of 128 or of the block, f32 weights, a small block), then
# MLA's latent-cache rows (decode write, prefill append; interleaved and half-split rope; f32, bf16 and fp8
# caches), then the row steps of the multi-launch lowerings (MLA's query split + RoPE; SwiGLU, quantized and
# f32), greedy sampling's argmax over the vocabulary, the fp8 MoE's rows copied into expert order, MLA prefill's head-major
# keys, values (bf16 and fp8 caches) and queries; MLA attention (decode, prefill), and decode with a 16-key capacity
# (the 64-row caches go through shared memory in up to 4 chunks).
rm -rf .device/rows && mkdir -p .device/rows
for k in rows_embed_bf16_d7168_t256 rows_rmsnorm_bf16_d7168_t256_eps1em6_q rows_rmsnorm_bf16_d7168_t256_eps1em6_y_q \
  rows_rmsnorm_bf16_d7168_t256_eps1em6_y rows_rmsnorm_bf16_d1536_t256_eps1em6_y_q rows_rmsnorm_f32_d1000_t64_eps1em5_y_q \
  rows_rmsnorm_bf16_d7168_t1024_eps1em6_y_q rows_rmsnorm_bf16_d1536_t512_eps1em6_q rows_rmsnorm_bf16_d1536_t128_eps1em6_q \
  rows_rmsnorm_bf16_d512_t32_eps1em6_y rows_latent_bf16_d512_r64_t64_eps1em6_il_write \
  rows_latent_bf16_d512_r64_t64_eps1em6_il_append rows_latent_f32_d512_r64_t64_eps1em6_write \
  rows_latent_bf16_d512_r64_t64_eps1em6_il_writebf16 rows_latent_bf16_d512_r64_t64_eps1em6_il_appendbf16 \
  rows_latent_bf16_d512_r64_t64_eps1em6_il_writefp8 rows_latent_bf16_d512_r64_t64_eps1em6_il_appendfp8 \
  rows_rmsnorm_bf16_d7168_t1024_eps1em6_q rows_rmsnorm_bf16_d7168_t512_eps1em6_y \
  rows_splitrope_h128_n128_r64_t256_il rows_silumul_d18432_t256_q rows_silumul_d2048_t256_q rows_silumul_d2048_t256_y \
  rows_copy_d7168_t256 rows_splitbf16_d7168_t256 rows_concat_d7168_b7168_t256 rows_argmax_d129280_t256 rows_argmax_d129280_t1024 \
  rows_sample_d129280_t512 rows_sample_d129280_t256 rows_scores_d129280_t256 \
  rows_routelogits_bf16_d7168_e256_t256_b4 rows_routelogits_bf16_d7168_e256_t256_b8 \
  rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256 rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8 \
  rows_route_e256_k8_g8_kg4_s2p5e0_norm_t256_b8_p1 \
  rows_dispatch_e256_s1_t256 rows_gatherfp8_d7168_t256 rows_mlaqueries_h128_n128_r64_t256 \
  rows_mlakeys_h128_n128_r64_v128_kv512_t256_bf16_c16 rows_mlakeys_h128_n128_r64_v128_kv512_t256_bf16_c8 \
  rows_mladecode_h128_n128_r64_v128_kv512_c8192_s1p3523377em1_t128 \
  rows_mlaprefill_h128_n128_r64_v128_kv512_c8192_s1p3523377em1_t128 \
  rows_mladecode_h16_n128_r64_v128_kv512_c16_s1p3523377em1_t128; do
  target/release/v3c dump-ir --stage ptx --kernel "$k" \
    | awk '/^\/\/ ----- stage ptx/ {p = 1; next} /^\/\/ ptxas:/ {p = 0} p' > ".device/rows/$k.ptx"
  grep -q "\.entry $k(" ".device/rows/$k.ptx" || { echo "prepare: no PTX entry for $k" >&2; exit 1; }
done
# MLA attention on the tensor cores: decode (paged bf16 or fp8 cache, split K; the 128 heads' two blocks of a
# sequence apart or in a cluster sharing each page by multicast — the compiler's default; the bf16 cache's page loop
# serial, loading a page ahead — the default — or scoring the next page during this one's P V, loading none ahead)
# with its split combine, causal
# prefill at the ring depths the cost model ranks first (4) and the template's former default (2); `v3r tune`
# (step 2b) checks every depth against the default; training's flash forward (_lse) and its dQ, dK, dV kernels
# at the depths the cost model picks (4, 3, 3, 4) and at 2.
rm -rf .device/mla && mkdir -p .device/mla
for k in mla_decode_kv512_r64_p64_s2 mla_decode_kv512_r64_p64_s2_fp8 mla_decode_kv512_r64_p64_s2_cl2 \
  mla_decode_kv512_r64_p64_s2_serial mla_decode_kv512_r64_p64_s2_cl2_serial \
  mla_decode_kv512_r64_p64_s2_cl2_fp8 rows_mlacombine_d512_t512 mla_prefill_qk192_v128_s2 \
  mla_prefill_qk192_v128_s4 mla_prefill_qk192_v128_s2_lse mla_gradq_qk192_v128_s2 mla_gradk_qk192_v128_s2 \
  mla_gradv_qk192_v128_s2 mla_prefill_qk192_v128_s4_lse mla_gradq_qk192_v128_s3 mla_gradk_qk192_v128_s3 \
  mla_gradv_qk192_v128_s4; do
  target/release/v3c dump-ir --stage ptx --kernel "$k" \
    | awk '/^\/\/ ----- stage ptx/ {p = 1; print; next} /^\/\/ ptxas:/ {p = 0} p' > ".device/mla/$k.ptx"
  grep -q "\.entry $k(" ".device/mla/$k.ptx" || { echo "prepare: no PTX entry for $k" >&2; exit 1; }
done
# Tuning candidates for the full model's GEMM kernels (cost model's top 3 per problem, spill-free).
rm -rf .device/tune
target/release/v3c tune --model deepseek-v3 --emit-candidates .device/tune --top 3
# End to end: a small fp8 model with DeepSeek-V3's head dims (2 heads, hidden 256, 2 layers of which 1 MoE
# with 8 experts, an MTP module; random weights) compiled for sm_90a, and what the CPU backend (equal to the
# reference interpreter) gives for it: the logits of a prompt, and greedy tokens for two prompts (one
# prefilled in two chunks).
rm -rf .device/e2e && mkdir -p .device/e2e/config
target/release/v3c init-weights --model deepseek-v3-tiny --out .device/e2e/tiny >/dev/null 2>&1
python3 - .device/e2e/tiny/config.json .device/e2e/config/config.json <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, kv_lora_rank=128, q_lora_rank=128,
         qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_attention_heads=2, num_key_value_heads=2,
         vocab_size=512, num_hidden_layers=2)
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
rm -rf .device/e2e/tiny
target/release/v3c init-weights --model .device/e2e/config --out .device/e2e/ckpt --fp8 --seed 3 >/dev/null 2>&1
# Attention on the CUDA-core rows (the reference's f32 numerics: tokens comparable with the CPU
# backend's), and (sm90tc) on the tensor cores — the default: prefill as flash attention after kv_b's
# fp8 GEMM of the e4m3 latent, decode as split-K attention over bf16 pages; q, k, v and P in bf16.
target/release/v3c compile --model .device/e2e/ckpt --target sm_90a --max-rows 16 --max-context 128 \
  --prefill-attention rows --decode-attention rows --out .device/e2e/sm90 --force 2>/dev/null
target/release/v3c compile --model .device/e2e/ckpt --target sm_90a --max-rows 16 --max-context 128 \
  --out .device/e2e/sm90tc --force 2>/dev/null
# (sm90fp8c) The same with decode's caches in fp8 rows (--kv-cache fp8: e4m3 latent, power-of-two scales,
# bf16 rope key; the latent row quantizes, the attention decodes each page).
target/release/v3c compile --model .device/e2e/ckpt --target sm_90a --max-rows 16 --max-context 128 \
  --kv-cache fp8 --out .device/e2e/sm90fp8c --force 2>/dev/null
# The built-in tiny model's bf16 checkpoint (MoE layers, MTP): the f32 graph on sm_90a (bf16 hi + lo
# GEMMs, grouped too) and the CPU backend's logits for a prompt.
mkdir -p .device/e2e/bf16
target/release/v3c init-weights --model deepseek-v3-tiny --out .device/e2e/bf16/ckpt --seed 8 >/dev/null 2>&1
target/release/v3c compile --model .device/e2e/bf16/ckpt --target sm_90a --max-rows 16 --max-context 64 \
  --out .device/e2e/bf16/sm90 --force 2>/dev/null
echo "3 17 42 5 9 11 2 250 31" > .device/e2e/bf16/prompt.txt
target/release/v3c logits --model-dir .device/e2e/bf16/ckpt --tokens "$(cat .device/e2e/bf16/prompt.txt)" --backend cpu \
  --out .device/e2e/bf16/expected_logits.safetensors 2>/dev/null
# DeepSeek-V3.2 (sparse attention, check.sh 3d): the same small model with a lightning indexer of 4
# heads picking 4 of each query's keys (tests/gpu_launches.rs's), as an fp8 and a bf16 checkpoint,
# compiled for sm_90a, with the CPU backend's logits for a 9-token prompt (most queries see more than 4
# keys) and its 16 greedy tokens after a 12-token prompt (decode's indexer over the growing cache).
mkdir -p .device/e2e/v32/config
python3 - .device/e2e/config/config.json .device/e2e/v32/config/config.json <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], index_n_heads=4,
         index_head_dim=128, index_topk=4)
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
echo "3 90 27 311 243 7 100 5 64 2 19 400" > .device/e2e/v32/prompt.txt
for v in fp8 bf16; do
  flag=$([ "$v" = fp8 ] && echo --fp8 || true)
  target/release/v3c init-weights --model .device/e2e/v32/config --out .device/e2e/v32/$v/ckpt $flag --seed 4 >/dev/null 2>&1
  # The attention on the tensor cores (the default: the kernel gathering each query's selected rows)
  # and on the CUDA-core rows (the reference's f32: logits and tokens comparable with the CPU
  # backend's).
  target/release/v3c compile --model .device/e2e/v32/$v/ckpt --target sm_90a --max-rows 16 --max-context 64 \
    --out .device/e2e/v32/$v/sm90 --force 2>/dev/null
  target/release/v3c compile --model .device/e2e/v32/$v/ckpt --target sm_90a --max-rows 16 --max-context 64 \
    --prefill-attention rows --decode-attention rows --out .device/e2e/v32/$v/sm90rows --force 2>/dev/null
  precision=$([ "$v" = fp8 ] && echo fp8 || echo f32)
  target/release/v3c logits --model-dir .device/e2e/v32/$v/ckpt --tokens "$(cat .device/e2e/bf16/prompt.txt)" \
    --backend cpu --precision "$precision" --out .device/e2e/v32/$v/expected_logits.safetensors 2>/dev/null
  target/release/v3c run --model-dir .device/e2e/v32/$v/ckpt --prompt-tokens "$(cat .device/e2e/v32/prompt.txt)" \
    --max-new-tokens 16 --backend cpu --precision "$precision" --ignore-eos > .device/e2e/v32/$v/expected_tokens.txt 2>/dev/null
  # The host emulation's logits and tokens through the tensor-core attention (bf16 keys, queries, P).
  target/release/v3c emulate .device/e2e/v32/$v/sm90 --weights .device/e2e/v32/$v/ckpt \
    --tokens "$(cat .device/e2e/bf16/prompt.txt)" --out .device/e2e/v32/$v/emulated_logits.safetensors >/dev/null 2>&1
  target/release/v3c emulate .device/e2e/v32/$v/sm90 --weights .device/e2e/v32/$v/ckpt \
    --tokens "$(cat .device/e2e/v32/prompt.txt)" --decode-steps 16 --out .device/e2e/v32/$v/emulated.safetensors 2>&1 \
    | sed -n 's/^emulated decode step [0-9]*: token \([0-9]*\).*/\1/p' | paste -sd' ' > .device/e2e/v32/$v/emulated_tokens.txt
done
# Transformers' own logits through sm_90a (check.sh 3c): the HF fixtures the sm_90a lowering takes —
# `gpu_bf16` (the f32 graph), `gpu_fp8_v3dims` (fp8, DeepSeek-V3's head dims) and
# `v2_grouped_yarn_bf16` (DeepSeek-V2: softmax routing, the f32 graph) — compiled with the
# defaults, with their checkpoints, tokens and transformers' logits (expected.safetensors), the fp8
# reference's logits (`v3c logits --precision fp8`) and the host emulation's of the artifact.
rm -rf .device/hf && mkdir -p .device/hf
for f in gpu_bf16 gpu_fp8_v3dims v2_grouped_yarn_bf16; do
  src=tests/fixtures/hf/$f dst=.device/hf/$f
  mkdir -p "$dst/ckpt"
  cp "$src/config.json" "$src/model.safetensors" "$dst/ckpt/"
  cp "$src/expected.safetensors" "$dst/hf_logits.safetensors"
  python3 - "$src/expected.safetensors" > "$dst/tokens.txt" <<'PY'
import array, json, struct, sys
b = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
for key in ("tokens", "positions"):
    s, e = h[key]["data_offsets"]; a = array.array("q"); a.frombytes(b[8 + n + s:8 + n + e])
    if key == "tokens":
        print(" ".join(map(str, a)))
    elif a[0] != 0:
        sys.exit(f"prepare: {sys.argv[1]} starts at position {a[0]}; v3r logits prefills from 0")
PY
  target/release/v3c compile --model "$dst/ckpt" --target sm_90a --max-rows 16 --max-context 64 --out "$dst/sm90" \
    --force 2>/dev/null
  target/release/v3c emulate "$dst/sm90" --weights "$dst/ckpt" --tokens "$(cat "$dst/tokens.txt")" \
    --out "$dst/emulated_logits.safetensors" 2>/dev/null
  if [ "$f" = gpu_fp8_v3dims ]; then
    target/release/v3c logits --model-dir "$dst/ckpt" --tokens "$(cat "$dst/tokens.txt")" --backend cpu \
      --precision fp8 --out "$dst/fp8_reference.safetensors" 2>/dev/null
  fi
done
# The same model with its MTP module as a draft entry, for `v3r run --speculative` (greedy: the tokens
# must be the plain greedy ones).
target/release/v3c compile --model .device/e2e/ckpt --target sm_90a --max-rows 16 --max-context 128 --speculative \
  --prefill-attention rows --decode-attention rows --out .device/e2e/sm90spec --force 2>/dev/null
echo "3 90 27 311 243 7 100 5 64 2 19 400" > .device/e2e/prompt1.txt
echo "8 1 77 500 23 42 9 9 13 250 31 6 17 88 120 3 55 71 2 10" > .device/e2e/prompt2.txt
target/release/v3c logits --model-dir .device/e2e/ckpt --tokens "$(cat .device/e2e/prompt1.txt)" --backend cpu \
  --precision fp8 --out .device/e2e/expected_logits.safetensors 2>/dev/null
# The host emulation of the artifact's launches on the first prompt — its prefill and two greedy decode
# steps, as `v3r run --max-new-tokens 3` takes them — every launch's buffers dumped: on the GPU,
# `V3R_DUMP_DIR` makes v3r dump the same and dump_compare.py names the first launch that differs.
target/release/v3c emulate .device/e2e/sm90 --weights .device/e2e/ckpt --tokens "$(cat .device/e2e/prompt1.txt)" \
  --decode-steps 2 --out .device/e2e/emulated_logits.safetensors --dump .device/e2e/dump 2>/dev/null
# The tensor-core attention's emulation (flash prefill and split-K decode from the kernels' parameters,
# bf16 P): the first prompt's prefill and two greedy decode steps, launch by launch, for `v3r run
# --max-new-tokens 3` under V3R_DUMP_DIR.
target/release/v3c emulate .device/e2e/sm90tc --weights .device/e2e/ckpt --tokens "$(cat .device/e2e/prompt1.txt)" \
  --decode-steps 2 --out .device/e2e/emulated_tc_logits.safetensors --dump .device/e2e/dump_tc 2>/dev/null
target/release/v3c emulate .device/e2e/sm90fp8c --weights .device/e2e/ckpt --tokens "$(cat .device/e2e/prompt1.txt)" \
  --decode-steps 2 --out .device/e2e/emulated_fp8c_logits.safetensors --dump .device/e2e/dump_fp8c 2>/dev/null
for p in 1 2; do
  target/release/v3c run --model-dir .device/e2e/ckpt --prompt-tokens "$(cat .device/e2e/prompt$p.txt)" \
    --max-new-tokens 16 --backend cpu --precision fp8 --ignore-eos 2>/dev/null
done > .device/e2e/expected_tokens.txt
# Perplexity: 256 tokens in windows of 64 every 32 through a cpu artifact of the same model (the
# reference's numerics; the artifact itself stays here), for `v3r perplexity` of sm90tc on the GPU.
python3 -c "print(' '.join(str((i * 37 + 11) % 509 + 3) for i in range(256)))" > .device/e2e/ppl_tokens.txt
rm -rf target/ppl-cpu
target/release/v3c compile --model .device/e2e/ckpt --target cpu --max-rows 16 --max-context 128 \
  --out target/ppl-cpu --force 2>/dev/null
target/release/v3r perplexity target/ppl-cpu --weights .device/e2e/ckpt --data .device/e2e/ppl_tokens.txt \
  --window 64 --stride 32 --json > .device/e2e/expected_ppl.json 2>/dev/null
rm -rf target/ppl-cpu
# Training: the tiny model (MoE layers + MTP) as sm_90a training-step artifacts, f32 (matmuls as bf16
# hi/lo tensor-core GEMMs) and the FP8 recipe (projections on the fp8 GEMM template), and as cpu ones, with the cpu
# artifacts' loss logs for 4 steps of 2 x 32 tokens on a repeating-pattern corpus (the reference for `v3r
# train` on the GPU).
rm -rf .device/train && mkdir -p .device/train
target/release/v3c init-weights --model deepseek-v3-tiny --out .device/train/ckpt --seed 5 >/dev/null 2>&1
python3 -c "print(' '.join(str((i * 7) % 97 + 3) for i in range(4096)))" > .device/train/data.txt
# One window (32 tokens + the targets and the MTP's: 34): what check.sh trains on with V3R_DUMP_DIR
# when the losses differ; `v3c emulate --dump` of the same on this machine is what dump_compare.py
# compares that against.
cut -d' ' -f1-34 .device/train/data.txt > .device/train/window.txt
for precision in f32 fp8; do
  for t in sm_90a cpu; do
    target/release/v3c compile --model .device/train/ckpt --target "$t" --train --max-rows 32 --precision "$precision" \
      --out ".device/train/${precision}_$t" --force 2>/dev/null
  done
  target/release/v3r train ".device/train/${precision}_cpu" --weights .device/train/ckpt --data .device/train/data.txt \
    --steps 4 --batch 2 --seq 32 --out ".device/train/${precision}_expected" 2>/dev/null
  # Only the loss log travels (the run's checkpoint and optimizer state, and the cpu artifact, stay).
  find ".device/train/${precision}_expected" -mindepth 1 ! -name loss.csv -delete
  rm -rf ".device/train/${precision}_cpu"
done
# `built_in_config CONST OUT KEY=VALUE...`: the built-in config `CONST` of models/src/config.rs with
# those keys set (values as JSON), written to OUT.
built_in_config() {
  local name=$1 out=$2
  shift 2
  python3 - models/src/config.rs "$name" "$out" "$@" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
c = json.loads(re.search(r'pub const %s: &str = r#"(.*?)"#;' % sys.argv[2], text, re.S).group(1))
c.update({k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])})
json.dump(c, open(sys.argv[3], "w"), indent=1)
PY
}
# The same model with 64-wide heads (nope, rope, values: widths the flash kernels take), f32: its
# sm_90a step runs attention and its gradient on the flash kernels in bf16 (`f32wide`; the cpu
# artifact's attention is f32).
mkdir -p .device/train/wide_config
built_in_config DEEPSEEK_V3_TINY_JSON .device/train/wide_config/config.json qk_nope_head_dim=64 qk_rope_head_dim=64 v_head_dim=64
target/release/v3c init-weights --model .device/train/wide_config --out .device/train/ckpt_f32wide --seed 5 >/dev/null 2>&1
for t in sm_90a cpu; do
  target/release/v3c compile --model .device/train/ckpt_f32wide --target "$t" --train --max-rows 32 \
    --out ".device/train/f32wide_$t" --force 2>/dev/null
done
grep -q mla_gradq .device/train/f32wide_sm_90a/manifest.json || { echo "prepare: f32wide has no flash kernels" >&2; exit 1; }
target/release/v3r train .device/train/f32wide_cpu --weights .device/train/ckpt_f32wide --data .device/train/data.txt \
  --steps 4 --batch 2 --seq 32 --out .device/train/f32wide_expected 2>/dev/null
find .device/train/f32wide_expected -mindepth 1 ! -name loss.csv -delete
rm -rf .device/train/f32wide_cpu .device/train/wide_config
# Decode benchmark: a 4-layer full-width slice of DeepSeek-V3 (3 dense layers, 1 MoE layer with 256
# experts; no MTP) compiled for sm_90a at 64 sequences x 4096 cache rows. No checkpoint travels (tens of
# GiB): `v3r bench-decode --random-weights` makes weights up on the device; hf_decode.py builds the same
# slice in transformers.
rm -rf .device/slice && mkdir -p .device/slice/config
built_in_config DEEPSEEK_V3_JSON .device/slice/config/config.json num_hidden_layers=4 num_nextn_predict_layers=0
target/release/v3c compile --model .device/slice/config --target sm_90a --max-rows 64 --max-context 4096 \
  --out .device/slice/sm90 --force 2>/dev/null
# The same with fp8 decode caches (656-byte rows instead of 1152).
target/release/v3c compile --model .device/slice/config --target sm_90a --max-rows 64 --max-context 4096 \
  --kv-cache fp8 --out .device/slice/sm90fp8c --force 2>/dev/null
# Prefill benchmark: the slice's prefill in chunks of up to 4096 tokens (`v3r bench-prefill`; ~20 GiB
# of device memory with the weights), the decode plan kept at 64 sequences.
target/release/v3c compile --model .device/slice/config --target sm_90a --max-rows 4096 --max-batch 64 \
  --max-context 4096 --out .device/slice/sm90p --force 2>/dev/null
# DeepSeek-V3.2's slice (check.sh 5, "V3.2 kernels"): the same 4 layers with its lightning indexer,
# for prefill chunks of 4096 tokens and decode at 64 sequences x 4096 cache rows; its kernels timed
# one by one (the indexer's scores and top keys, the attention gathering the selected rows).
rm -rf .device/slice32 && mkdir -p .device/slice32/config
built_in_config DEEPSEEK_V3_2_JSON .device/slice32/config/config.json num_hidden_layers=4 num_nextn_predict_layers=0
target/release/v3c compile --model .device/slice32/config --target sm_90a --max-rows 4096 --max-batch 64 \
  --max-context 4096 --out .device/slice32/sm90 --force 2>/dev/null
# Training benchmark: DeepSeek-V3's first two layers (both dense: first_k_dense_replace 2 here) at full
# width, no MTP, as sm_90a training-step artifacts for windows of 256 tokens (the FP8 recipe and f32);
# `v3r bench-train --random-weights` makes up the f32 masters on the GPU machine (12 GiB).
rm -rf .device/train_slice && mkdir -p .device/train_slice/config
built_in_config DEEPSEEK_V3_JSON .device/train_slice/config/config.json num_hidden_layers=2 first_k_dense_replace=2 num_nextn_predict_layers=0
for precision in fp8 f32; do
  target/release/v3c compile --model .device/train_slice/config --target sm_90a --train --max-rows 256 \
    --precision "$precision" --out ".device/train_slice/$precision" --force 2>/dev/null
done
# Its flash attention kernels' candidates (the step's forward, the forward with log-sum-exps, dQ, dK, dV
# at DeepSeek-V3's heads, 4096-token windows): every ring depth that fits and does not spill, for check.sh
# 2b's second `v3r tune`.
rm -rf .device/tune_train
target/release/v3c tune --model .device/train_slice/config --train --precision fp8 --only mla_ --top 4 \
  --emit-candidates .device/tune_train
# Packed: a device call carries 64 MiB with the working tree, and .device/ alone is near that
# (~59 MB: artifacts' cubins, emulation dumps); xz makes it ~12 MB. check.sh unpacks it there.
tar -C "$root" -cf - .device | xz -T2 -6 > .device.tar.xz.tmp && mv .device.tar.xz.tmp .device.tar.xz
packed=$(stat -c %s .device.tar.xz)
tree=$(git -C "$root" ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
if [ $((packed + tree)) -gt $((60 * 1024 * 1024)) ]; then
  echo "prepare: .device.tar.xz ($packed bytes) and the tracked tree ($tree) are over a device call's 64 MiB" >&2
  exit 1
fi
echo "prepare: .device/ holds v3r and $(ls .device/gemm .device/rows .device/mla | grep -c ptx) kernels ($(du -sh .device | cut -f1)), packed as .device.tar.xz ($((packed / 1024 / 1024)) MiB); carry .device.tar.xz to the GPU machine"
