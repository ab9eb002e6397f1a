#!/usr/bin/env bash
# The first GPU calls for the kernels written without a GPU (twenty-ninth to thirty-third sessions): their tests,
# then their speed beside the paths they replace, each in one `kiln bench` run.
#
#   bash scripts/gpu_first_run.sh OUT_DIR [PART ...]
#   # parts: tests block-sq w4a8 fp8-lm-head block attention side-stream per-token flash moe moe-grouped fusions
#   #   moe-profile mla fp8-words gpt-oss w4-profile moe-e4m3-words norm-probe w4-timeline prefill speculative
#   #   prompt-logprobs prefill-codes word-tiles fp8-long h100-lines fp8-profile int-only pending-norms
#   #   (default: all)
#
# A device call runs at most 10 minutes, so give each call parts that fit: `block tests` (about 8 minutes on an
# H200), `w4a8` alone (up to 8), `attention side-stream` (about 8), `per-token` (about 5). block-sq and
# fp8-lm-head ran in the thirty-first session.
# - tests: FP8_BLOCK_SCALES' group quantization, GEMM and GEMV; SmoothQuant's int8 pass and GEMM (every tile and
#   torch._int_mm, bit for bit); W4A8_AWQ's FP8 path from 256 rows; both new engines against their CPU emulation;
#   GPTQ calibrated and rounded on the GPU (int4 and e4m3 codes); the norms writing FP8's, SmoothQuant's and
#   FP8_BLOCK_SCALES' inputs (the last new in the thirty-second session), and FP8_PER_CHANNEL_PER_TOKEN's (new in the
#   thirty-third, with the norm and activation kernel tests, whose argument became one InputQuant); int8 weight
#   codes of -128 (compressed-tensors imports carry them) and the int4 kernels on fractional zeros (GGUF's Q4_1 and
#   Q4_K kept at 4 bits), new in the thirty-fourth.
#   (Thirty-first session, H200: all pass, after two reference fixes and the engine test's rewrite.)
# - block-sq: FP8_BLOCK_SCALES and W8A8_SQ_PER_CHANNEL beside FP8 and bf16, batch-1 decode and offline-3000.
# - w4a8: W4A8_AWQ (prompt matmuls on FP8 tensor cores) beside W4A16 (dequantized to bf16 for cuBLAS) on one
#   2048-token prompt and batch-1 decode. AWQ's scale search on 8B shapes has never been timed: capped at 8 minutes.
# - fp8-lm-head: FP8 with its lm_head in FP8 too (--quantize-lm-head) beside bf16, batch-1 decode: issue 5's 1.7x
#   needs the lm_head's bytes halved (docs/quantization.md); last measured in the fifth session.
# - block: FP8_BLOCK_SCALES after the thirty-second session (weight scales column-major, a 128 x 128 tile, inputs
#   written by the norms and SiLU-and-mul): its GEMM's tiles and GEMV's splits beside bf16
#   (scripts/bench_fp8_group_gemm.py, about 1.5 minutes), then the engine beside bf16 (about 4 minutes).
# - attention: the twenty-eighth session's attention kernels (the TMA prompt kernel over cache codes, the decode
#   tiles' register caps and prefetch): their tests, then both attention benches (about 3 minutes). Forty-fourth
#   session, H100: 287 pass; the TMA kernel over e4m3 codes no faster than the plain one (0.491 against 0.495 ms),
#   over int8 codes 11% faster; the 64-key tile capped at 96 registers 4-8% faster (now the default), the
#   prefetch slower everywhere (docs/performance.md).
# - prefill-codes (forty-fourth session): fresh prompts' attention over codes widened to 16 bits first
#   (KILN_PREFILL_CODES=widened) beside the plain kernel and the TMA one over the codes
#   (scripts/bench_prefill_attention.py --codes), then 400 prefill-1000 requests with an FP8 cache under plain and
#   widened (scripts/ab_runtime_setting.py; about 5 minutes). The codes cost 0.495 ms a layer for 4 x 2048 fresh
#   tokens against 0.338 for 16-bit keys on the H100. Forty-fifth session, H100: widened 0.391 (e4m3) and 0.372
#   (int8) ms, the 400 requests 24.91 s against plain's 25.64: widened is now the default.
# - side-stream: decode attention on the side stream or not, with the FP8 cache, in one process (about 5 minutes).
# - flash: fresh prompts' attention by torch's FlashAttention-2 (KILN_PREFILL_ATTENTION=flash, thirty-fifth
#   session): its tests, the kernel beside the default (scripts/bench_prefill_attention.py --quick), then 400
#   prefill-1000 requests under each (about 5 minutes).
# - moe: the MoE kernel tests (decode by pair, new in the thirty-sixth session, among them) and the MoE quantization
#   GPU tests, then an MoE engine's speed, 16 of Qwen3-30B-A3B's layers (21 GB in bf16), with its experts in
#   W8A16, W4A16 and FP8 (int8, int4 and e4m3 codes) beside bf16: batch-1 decode against the top-k roofline, and
#   batch 64 (about 7 minutes). The thirty-sixth session's H100 run, before decode by pair: bf16 at 37% of the
#   roofline, W4A16 at 20% (0.94x bf16); the forty-first's (H100, int4 and int8 words): 223 tests pass, bf16 782.3
#   tokens/s (81%), W8A16 1.21x, W4A16 1.40x, FP8_PER_CHANNEL_PER_TOKEN 1.15x.
# - moe-grouped: the same W4A16 and bf16 engines with decode by pair off (KILN_MOE_BY_PAIR=0), the A/B's other
#   half (about 4 minutes).
# - moe-e4m3-words (fortieth session): the pair GEMVs' sweep (FP8 experts by tiles and by words among them), then
#   FP8_PER_CHANNEL_PER_TOKEN experts by words beside bf16 (the other half of the A/B is `moe`'s FP8 line before
#   the forty-first session, when the words won on the H100, 1.19x bf16 against 1.15x, and became the default)
#   (about 4 minutes).
# - fusions (thirty-eighth session: also attention sinks in every paged kernel and gpt-oss's expert biases and
#   clamped GLU in both MoE kernels, the latent cache's wide tiles, and Granite, OLMo 3 and gpt-oss greedy tokens):
#   the thirty-seventh session's decode launches cut (the MoE router's softmax and top-k in one kernel,
#   Qwen3's q and k norms inside the rotary launch; the routing and pair GEMVs launched with PDL): their kernel
#   tests (an MoE decode chain replayed in a CUDA graph with PDL among them), Qwen3's, Qwen3-MoE's, GLM-4.5's
#   (sigmoid routing in the same kernel), Gemma 3's (q/k norms of 1 + w in the rotary launch) and DeepSeek-V3's
#   (latent attention, new: 48-wide keys through the paged kernels) greedy tokens
#   against transformers, then Qwen3-8B's batch-1 decode against its roofline (about 5 minutes). Then `moe` again
#   for the MoE engine after them (s37 before: bf16 49% of the roofline, W4A16 28%, H200).
# - moe-profile: decode by pair's GEMV tiles timed on Qwen3-30B-A3B's experts (scripts/bench_moe_pair_gemv.py: set
#   kiln.kernels.moe.PAIR_TILE to a clear winner), then 4 of its layers, bf16 and W4A16, batch-1 decode under
#   torch.profiler: its kernels by GPU time (about 5 minutes). Fortieth session, H100: int4 and int8 experts now go
#   by words of codes (PAIR_WORD_TILE, swept; the whole MoE by pair 15.4 us in W4A16, 22.2 in W8A16, 33.1 in bf16);
#   the tile kernel's PAIR_TILE (bf16 and FP8 experts) was swept again (two runs agreed; bf16's whole MoE about 4 us
#   faster, untimed in an engine): next, `moe` for the engines.
# - mla: the latent cache's kernel tests (576-wide rows, 16 and 128 query heads, 1-byte codes read as pairs: new in
#   the thirty-eighth session, the codes not yet run on a GPU) and DeepSeek-V3's greedy tokens on the GPU, then
#   13 of DeepSeek-V2-Lite's 27 layers (latent attention, 64 experts), batch-1 decode and batch 64 with the bf16
#   and the FP8 latent cache (about 5 minutes; s38 and s39, all 27 layers, bf16 latent cache: 243.4 and 245.9 tok/s,
#   44% of the roofline). All 27 layers (31 GB) with the FP8 cache filled the 64 GB disk in s39: the source, the
#   calibrated checkpoint and its engine are each the model's size.
# - fp8-words (thirty-ninth session): the e4m3 GEMV on int64 words of codes (the tuner times it beside the CUDA-core
#   and MMA kernels per shape and logs each kind's best) and, where it wins fc_gate, SiLU-and-mul and down's e4m3
#   input as its epilogue (and rotary with the cache write where it wins the fused QKV): the tests, then FP8 with an
#   FP8 lm_head beside bf16, batch-1 decode. Fortieth session, H100: 25 pass, the words won every shape, 321.2
#   against 188.7 tok/s (1.70x). About 4 minutes.
# - gpt-oss: gpt-oss-20b's shapes, 12 of 24 layers (sinks, alternating windows, 32 experts with biases), batch-1
#   decode and batch 64 (about 3 minutes; forty-first session, H100: 499.5 tokens/s, 90% of the roofline).
# - w4-profile (fortieth session, for issue 4's W4A16 2.5x, at 2.30x with the bf16 lm_head and 83% of its roofline):
#   each format's GEMV per Llama-3-8B shape on the H100 (bf16, int4, int8), then W4A16 batch-1 decode under
#   torch.profiler, its kernels by GPU time (about 3 minutes; forty-first session: docs/performance.md).
# - norm-probe (forty-first session, not yet run: the session's device time ran out, and in the forty-second its
#   first try failed on the LLM leak fixed then): W4A16 batch-1 decode as it
#   is, then with every RMSNorm left out (scripts/probe_norm_cost.py): the most that folding the norms into the
#   GEMVs could save a step, before anyone builds it (issue 4's W4A16 needs 2.30 -> 2.12 ms a step; about 3 minutes).
# - w4-timeline (forty-first session): W4A16 batch-1 decode under torch.profiler with PDL off (KILN_PDL=0), so each
#   kernel's time is its own (with PDL a kernel's time includes its wait for the one before: w4-profile's kernels
#   summed to 1.22 s over a 0.59 s run), and the same run's tokens/s, PDL's share (about 3 minutes; forty-second
#   session, H100: 393.8 tok/s without PDL against 433.8 with it; per step int4 GEMVs 1.46 ms, lm_head 0.33, QKV with
#   rotary 0.27, attention 0.19, norms 0.11: docs/performance.md).
# - prefill (forty-first session): bf16 prefill-1000 on the H100, issue 3's 70% line, last run on an H100 in the
#   third session (55%); since then only on H200s (66-67%) (about 3 minutes).
# - speculative (forty-second session): its GPU test (a draft's tokens are decode rows, in the decode graphs), then
#   speculative decoding by n-gram lookup on Llama-3-8B's shapes, batch 1 (scripts/bench_speculative.py): plain
#   greedy decoding, then steps checking k = 3 and 7 draft tokens (4 and 8 rows: decode graph sizes) that are all
#   wrong (the floor: what checking costs) and all right (the plain run's own continuation: the ceiling, while the
#   tokens stay plain decoding's; in bf16 random weights' near ties part them). How often real drafts are right was
#   measured on SmolLM2 (about 5 minutes; the first run, checking drafts as a prefill chunk: 0.72x plain at 0%).
# - word-tiles (forty-sixth session): the (16, 128, 4) tile of the int4 and int8 GEMVs, added untimed (one word of
#   16 outputs a thread, about 11% fewer instructions a weight): W4A16 and W8A16 batch-1 decode beside bf16, the
#   tuner's choices printed (kiln: tuned ...) show whether it wins a shape (about 5 minutes; forty-sixth session
#   without it: W4A16 436.8, W8A16 306.9, bf16 190.4).
# - fp8-long: FP8 weights with the FP8 KV cache on long-1000 (TensorRT-LLM's 1000/1000, 15,220 tok/s), issue 5's
#   line never run on an H100 (H200, twenty-eighth session: 15,408.9; about 4 minutes).
# - h100-lines: the standing table's H100 lines last run many sessions ago, bf16: prefix-64 (a follower's TTFT <= 25%
#   of the first's: 27% in the fourth session, 23% on an H200 in the seventh) and ttft-2048 (<= 1.3x its floor:
#   1.23x in the third), then prefill-1000 with the FP8 cache under the profiler (its kernels after the widened
#   codes: where issue 3's 70% stands, for the next lever; about 6 minutes).
# - fp8-profile: FP8 weights with the FP8 KV cache under the profiler on TensorRT-LLM's two missed workloads,
#   offline-3000 (128/128, 91% of its figure in the forty-sixth session) and prefill-1000 (2048/128, 87%): where their
#   time goes now, kernel by kernel (about 5 minutes).
# (int-dot, forty-seventh session: the int4 GEMVs by integer dot products A/B'd against the float ones in the
#  forty-eighth, 454.7 against 425.2 tokens/s, and made the only int4 sums: docs/performance.md.)
# - int-only (forty-eighth session): the int4 GEMVs' integer sums with x loaded as two 8-column tiles (no shared
#   memory or barrier in the loop): the int4 GEMV, epilogue and MoE words tests, then W4A16 batch-1 decode beside
#   bf16, and with the int4 lm_head (--quantize-lm-head; about 9 minutes, the tests 5). Forty-eighth session, H100:
#   101 pass; 2.49x bf16 (471.3 against 189.6), 2.77x with the int4 lm_head.
# - pending-norms (forty-ninth session): the RMSNorms between layers carried by the int4 GEMVs (the output
#   projections add the residual and sum its squares, the next GEMV applies the 1/rms; DecoderLayer.defer_norms):
#   the kernel and runtime tests, then W4A16 batch-1 decode beside bf16, and again with KILN_DEFER_NORMS=0 (the norm
#   kernels).
# (fold-norms, forty-fifth session: the norms folded into the W4A16/W8A16 GEMVs, timed slower in the forty-sixth
#  and removed: docs/performance.md.)
# - per-token: FP8_PER_CHANNEL_PER_TOKEN, its inputs now written by the norms and SiLU-and-mul, beside FP8 and bf16,
#   batch-1 decode and offline-3000 (about 5 minutes).
# (Thirty-second session: block-sq's SmoothQuant line re-run with fused inputs; w4a8 ran out of its 230 s in AWQ's
# search, which is why it now has 480 s and calibrates on 8 windows, a quarter of the default: its speed does not
# depend on the scales.)
# Each part writes OUT_DIR/PART.txt (and the bench's PART.json). pytest may come from wheels in .whl/.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_first_run.sh OUT_DIR [PART ...]}
shift
parts=${*:-tests block-sq w4a8 fp8-lm-head block attention side-stream per-token flash moe moe-grouped fusions
  moe-profile mla fp8-words gpt-oss w4-profile moe-e4m3-words norm-probe w4-timeline prefill speculative
  prompt-logprobs prefill-codes word-tiles fp8-long h100-lines fp8-profile int-only pending-norms}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # kiln from this tree, for the scripts too
if ! python -c "import pytest" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/kiln-site
fi
bench="python -m kiln bench --synthetic llama-3-8b --dtype bfloat16 --baseline none"
# 16 of Qwen3-30B-A3B's 48 layers: the saved model and one engine at a time fit the device's 64 GB disk
moe_bench="python -m kiln bench --synthetic qwen3-30b-a3b --synthetic-layers 16 --dtype bfloat16 --baseline none
  --workloads decode-1,offline-64"
bench_mla="python -m kiln bench --synthetic deepseek-v2-lite --synthetic-layers 13 --dtype bfloat16 --baseline none"
for part in $parts; do
  case $part in
    tests) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels/test_rmsnorm_kernel.py \
             tests/kernels/test_activation_kernel.py
           KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/quantization/test_gpu_quant2.py \
             -k "group or block or int8 or w4a8 or gptq or fused"
           KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels/test_quant_gemm_kernel.py \
             tests/kernels/test_gemv_kernel.py -k "w8a16 or fractional or int8_codes" ;;
    block-sq) $bench --quant-algo FP8,FP8_BLOCK_SCALES,W8A8_SQ_PER_CHANNEL --workloads decode-1,offline-3000 \
                --output-json "$out/$part.json" ;;
    w4a8) timeout 480 $bench --skip-unquantized --calib-size 8 --quant-algo W4A16,W4A8_AWQ \
            --workloads ttft-2048,decode-1 --output-json "$out/$part.json" ;;
    fp8-lm-head) $bench --quant-algo FP8 --quantize-lm-head --workloads decode-1 --output-json "$out/$part.json" ;;
    block) python scripts/bench_fp8_group_gemm.py
           $bench --quant-algo FP8_BLOCK_SCALES --workloads decode-1,offline-3000 --output-json "$out/$part.json" ;;
    attention) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= -n 8 \
                 tests/kernels/test_paged_attention_kernel.py
               python scripts/bench_prefill_attention.py
               python scripts/bench_decode_attention.py ;;
    side-stream) python scripts/ab_runtime_setting.py KILN_DECODE_ATTENTION_STREAM off,high,first \
                   --kv-cache-quant-algo FP8 --requests 400 ;;
    flash) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= \
             tests/kernels/test_paged_attention_kernel.py -k "prefill_kernel_matches_reference"
           python scripts/bench_prefill_attention.py --quick
           python scripts/ab_runtime_setting.py KILN_PREFILL_ATTENTION triton,flash --requests 400 ;;
    moe) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels/test_moe_kernel.py \
           tests/quantization/test_moe_weight_only.py -k "gpu or quantized_experts or kernel or gptq"
         $moe_bench --quant-algo W8A16,W4A16,FP8_PER_CHANNEL_PER_TOKEN --output-json "$out/$part.json" ;;
    moe-grouped) KILN_MOE_BY_PAIR=0 $moe_bench --quant-algo W4A16 --output-json "$out/$part.json" ;;
    moe-e4m3-words) python scripts/bench_moe_pair_gemv.py
                    KILN_MOE_WORDS=int4,int8,e4m3 $moe_bench --quant-algo FP8_PER_CHANNEL_PER_TOKEN \
                      --output-json "$out/$part.json" ;;
    fusions) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels/test_rotary_kernel.py \
               tests/kernels/test_moe_kernel.py tests/kernels/test_pdl.py \
               -k "norms or route or matches_reference or pdl or gpt_oss"
             KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= \
               tests/kernels/test_paged_attention_kernel.py -k "sinks or latent"
             KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/runtime/test_gpu_runtime.py \
               -k "greedy_tokens_equal_transformers and not llama and not mistral"  # (every family but those)
             python -m kiln bench --synthetic qwen3-8b --dtype bfloat16 --baseline none --workloads decode-1 \
               --output-json "$out/$part.json" ;;
    mla) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= \
           tests/kernels/test_paged_attention_kernel.py tests/quantization/test_kv_cache_quant.py -k "latent"
         KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/runtime/test_gpu_runtime.py \
           -k "greedy_tokens_equal_transformers and deepseek"
         $bench_mla --workloads decode-1,offline-64 --kv-cache-quant-algo NONE,FP8 --output-json "$out/$part.json" ;;
    moe-profile) python scripts/bench_moe_pair_gemv.py
                 python -m kiln bench --synthetic qwen3-30b-a3b --synthetic-layers 4 --dtype bfloat16 \
                   --baseline none --quant-algo W4A16 --workloads decode-1 --profile ;;
    fp8-words) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels/test_gemv_kernel.py \
                 tests/runtime/test_gpu_runtime.py -k "fp8" -s
               python scripts/bench_decode_gemv.py --formats bf16,fp8,fp8-tok
               $bench --quant-algo FP8 --quantize-lm-head --workloads decode-1 --output-json "$out/$part.json" ;;
    w4-profile) python scripts/bench_decode_gemv.py --formats bf16,int4,int8
                $bench --quant-algo W4A16 --workloads decode-1 --profile --output-json "$out/$part.json" ;;
    gpt-oss) python -m kiln bench --synthetic gpt-oss-20b --synthetic-layers 12 --dtype bfloat16 --baseline none \
               --workloads decode-1,offline-64 --output-json "$out/$part.json" ;;
    norm-probe) python scripts/probe_norm_cost.py --synthetic llama-3-8b --dtype bfloat16 --baseline none \
                  --quant-algo W4A16 --skip-unquantized --workloads decode-1 ;;
    w4-timeline) KILN_PDL=0 $bench --quant-algo W4A16 --skip-unquantized --workloads decode-1 --profile \
                   --output-json "$out/$part.json" ;;
    prefill) $bench --workloads prefill-1000 --output-json "$out/$part.json" ;;
    speculative) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= tests/runtime/test_gpu_runtime.py \
                   -k speculative
                 python scripts/bench_speculative.py --synthetic llama-3-8b --dtype bfloat16 --drafts wrong,oracle \
                   --draft-lens 3,7 ;;
    prompt-logprobs) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= \
                       tests/runtime/test_gpu_runtime.py -k "prompt_logprobs" ;;
    h100-lines) $bench --workloads prefix-64,ttft-2048 --output-json "$out/$part.json"
                $bench --kv-cache-quant-algo FP8 --skip-unquantized --workloads prefill-1000 --profile \
                  --output-json "$out/$part-prefill-profile.json" ;;
    fp8-profile) $bench --quant-algo FP8 --kv-cache-quant-algo FP8 --skip-unquantized --workloads offline-3000 \
                   --profile --output-json "$out/$part-offline-3000.json"
                 $bench --quant-algo FP8 --kv-cache-quant-algo FP8 --skip-unquantized --workloads prefill-1000 \
                   --profile --output-json "$out/$part-prefill-1000.json" ;;
    int-only) KILN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -o addopts= \
                tests/kernels/test_quant_gemm_kernel.py tests/kernels/test_moe_kernel.py -k "w4a16 or read_words"
              $bench --quant-algo W4A16 --workloads decode-1 --output-json "$out/$part.json"
              $bench --quant-algo W4A16 --quantize-lm-head --skip-unquantized --workloads decode-1 \
                --output-json "$out/$part-lm-head.json" ;;
    pending-norms) KILN_AUTOTUNE=0 timeout 200 python -m pytest -q -p no:cacheprovider -o addopts= \
                     tests/kernels/test_quant_gemm_kernel.py tests/runtime/test_gpu_runtime.py \
                     -k "pending_norm or norms_in_the_gemvs or epilogue"
                   KILN_DEFER_NORMS=1 $bench --quant-algo W4A16 --workloads decode-1 --output-json "$out/$part.json"
                   KILN_DEFER_NORMS=0 $bench --quant-algo W4A16 --skip-unquantized --workloads decode-1 \
                     --output-json "$out/$part-off.json" ;;
    word-tiles) $bench --quant-algo W4A16,W8A16 --workloads decode-1 --output-json "$out/$part.json" ;;
    fp8-long) $bench --quant-algo FP8 --kv-cache-quant-algo FP8 --skip-unquantized --workloads long-1000 \
                --output-json "$out/$part.json" ;;
    prefill-codes) python scripts/bench_prefill_attention.py --codes
                   python scripts/ab_runtime_setting.py KILN_PREFILL_CODES plain,widened --kv-cache-quant-algo FP8 \
                     --requests 400 ;;
    per-token) $bench --quant-algo FP8,FP8_PER_CHANNEL_PER_TOKEN --workloads decode-1,offline-3000 \
                 --output-json "$out/$part.json" ;;
    *) echo "unknown part $part: use tests, block-sq, w4a8, fp8-lm-head, block, attention, side-stream, per-token," \
         "flash, moe, moe-grouped, fusions, moe-profile, mla, fp8-words, gpt-oss, w4-profile, moe-e4m3-words," \
         "norm-probe, w4-timeline, prefill, speculative, prompt-logprobs, prefill-codes, word-tiles," \
         "fp8-long, h100-lines, fp8-profile, int-only or pending-norms" >&2
       exit 2 ;;
  esac 2>&1 | tee "$out/$part.txt"
done
