"""Compile kiln's Triton kernels for an H100 (sm_90) on a machine without a GPU, down to cubin.

The Triton interpreter (TRITON_INTERPRET=1) checks a kernel's arithmetic on the CPU but not that it compiles:
a `return` inside a constexpr `if`, say, runs under the interpreter and fails in the compiler. This script
catches that class of error before device time is spent. It needs triton installed (not a kiln dependency):

    pip install --no-deps --target /tmp/triton_site triton==3.6.0
    PYTHONPATH=/tmp/triton_site:. python scripts/compile_kernels.py

Each case names a kernel, one set of its constexprs and the element types of the pointers that are not bf16;
add one when a kernel or its specializations change. Scalars are int32 unless listed in FLOAT_SCALARS. Kernels
that take USE_PDL are compiled with it on, as an H100 runs them.
"""

from __future__ import annotations

import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels import (activation, fp8_group_gemm, fp8_quant, gated_gemm, gemv, int8_gemm, moe, paged_attention,
                          paged_attention_kernels, quant_gemm, rmsnorm, rotary)

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_SCALARS = {"eps", "scale_log2", "scaling", "limit"}
CODES = {"fp8": "*fp8e4nv", "int8": "*i8", "fp8 groups": "*fp8e4nv", "fp8 rows": "*fp8e4nv",
         "fp8 prequant": "*fp8e4nv"}  # a quantized output's pointer type
# a norm's or activation's output -> its FP8_GROUP for a program of `block` inputs
OUT_GROUP = {"16-bit": lambda block: 0, "fp8": lambda block: 0, "int8": lambda block: 0,
             "fp8 groups": lambda block: 128, "fp8 rows": lambda block: block, "fp8 prequant": lambda block: 0}


def signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton's signature of `fn`: the types given (pointers, tensor descriptors), other pointers `*bf16`, floats
    by name, other scalars int32. A scalar given a value in `constexprs` is compiled as that constant, as Triton
    specializes an integer argument equal to 1 at run time (a unit stride)."""
    def kind(p):
        if p.is_constexpr or p.name in constexprs:
            return "constexpr"
        if p.name in pointers:
            return pointers[p.name]
        if p.name.endswith("_ptr"):
            return "*bf16"
        return "fp32" if p.name in FLOAT_SCALARS else "i32"
    return {p.name: kind(p) for p in fn.params}


ATTENTION = dict(HAS_WINDOW=True, HAS_SCALE=False, CODES_FP16=False, IEEE=False, BLOCK_D=128, HAS_SINK=False)
CASES = [  # (label, kernel, constexprs, pointer types)
    *[(f"rotary write={w} quant={q} heads={h} norm={n}", rotary._rotary_kernel,
       dict(WRITE_CACHE=w, QUANT=q, QMAX=m, NORM=n, BLOCK_H=h, BLOCK_D=64),
       dict(pos_ptr="*i64", slot_ptr="*i64", freq_ptr="*fp32", kc_ptr=c, vc_ptr=c, kvs_ptr="*bf16" if q else "*fp32"))
      for w, q, c, m in ((False, 0, "*bf16", 0.0), (True, 0, "*bf16", 0.0), (True, 1, "*i8", 127.0),
                         (True, 2, "*fp8e4nv", 448.0)) for h in (1, 32) for n in (0, 1, 2)],
    *[(f"gemv {label}", gemv._gemv_kernel.fn,
       dict(K=4096, HAS_X_SCALE=xs, HAS_W_SCALE=ws, QUANTIZE_X=qx, BLOCK_N=4, BLOCK_K=1024, INT8_BY_BITS=bits),
       pointers)
      for label, xs, ws, qx, bits, pointers in (
          ("bf16", False, False, False, False, {}),
          ("fp8", True, True, False, False, dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", xs_ptr="*fp32")),
          ("fp8 static, quantizing x", False, True, True, False, dict(w_ptr="*fp8e4nv")),
          ("w8a16", False, True, False, False, dict(w_ptr="*i8")),
          ("w8a16 int8 by bits", False, True, False, True, dict(w_ptr="*i8")),
          ("w8a8 (int8 codes of x)", True, True, False, True, dict(x_ptr="*i8", w_ptr="*i8", xs_ptr="*fp32")))],
    *[(f"fp8 words gemv {n}x{kw} bits={bits}", gemv._fp8_words_gemv_kernel,
       dict(K=4096, EVEN_N=True, BLOCK_N=n, BLOCK_KW=kw, BY_BITS=bits),
       dict(x_ptr="*fp8e4nv", w_ptr="*i64", xs_ptr="*fp32", ws_ptr="*fp32"))
      for _, n, kw, _, bits in gemv.FP8_WORD_TILES],
    ("fp8 words gemv silu", gemv._fp8_words_gemv_kernel,
     dict(K=4096, EVEN_N=True, BLOCK_N=4, BLOCK_KW=256, BY_BITS=False, GATED=True, FP8_OUT=True,
          ACT_DTYPE=triton.language.bfloat16),
     dict(x_ptr="*fp8e4nv", w_ptr="*i64", y_ptr="*fp8e4nv", xs_ptr="*fp32", ws_ptr="*fp32", os_ptr="*bf16",
          rs_ptr="*fp32")),
    *[(f"fp8 dot gemv {n}x{kb} split={split}", gemv._fp8_dot_gemv_kernel,
       dict(K=4096, BLOCK_N=n, BLOCK_K=kb, SPLIT=split),
       dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", xs_ptr="*fp32", ws_ptr="*fp32"))
      for n, kb, split in ((64, 256, 1), (64, 256, 2), (128, 128, 2))],
    *[(f"fp8 quant static={s}", fp8_quant._quantize_rows_kernel, dict(STATIC=s, BLOCK=4096),
       dict(q_ptr="*fp8e4nv", scale_ptr="*fp32")) for s in (False, True)],
    # out: the 16-bit norm, e4m3 over a static scale, int8 over the row's, e4m3 over a scale per 128 inputs or per
    # row (one group as wide as the program: InputQuant.kernel_flags)
    *[(f"rms_norm residual={r} out={q}", rmsnorm._rms_norm_kernel,
       dict(HAS_RESIDUAL=r, FP8_OUT=q == "fp8", INT8_OUT=q == "int8", FP8_GROUP=OUT_GROUP[q](4096), BLOCK=4096),
       dict(out_ptr=CODES[q], row_scale_ptr="*fp32") if q in CODES else {})
      for r in (False, True) for q in ("16-bit", "fp8", "int8", "fp8 groups", "fp8 rows")],
    # (int8: SmoothQuant's, proj's prequant scale multiplied in; fp8 prequant: W4A8_AWQ's)
    *[(f"silu_and_mul out={q}", activation._silu_and_mul_kernel,
       dict(FP8_OUT=q in ("fp8", "fp8 prequant"), INT8_OUT=q == "int8", FP8_GROUP=OUT_GROUP[q](block),
            PREQUANT=q in ("int8", "fp8 prequant"), BLOCK=block),
       dict(out_ptr=CODES[q], row_scale_ptr="*fp32") if q in CODES else {})
      for q, block in (("16-bit", 1024), ("fp8", 1024), ("int8", 16384), ("fp8 groups", 1024),
                       ("fp8 rows", 16384), ("fp8 prequant", 1024))],
    *[(f"decode split kv={c}{'' if fp16 == (c == '*fp8e4nv') else ' codes in the query dtype'}",
       paged_attention_kernels.decode_split_kernel,
       dict(ATTENTION, PAGE=32, HAS_SCALE=c != "*bf16", CODES_FP16=fp16, ONE_SPLIT=False, FUSED_MERGE=False,
            BLOCK_G=16, BLOCK_N=64),
       dict(k_ptr=c, v_ptr=c, bt_ptr="*i32", ctx_ptr="*i32", part_ptr="*fp32", lse_ptr="*fp32"))
      for c, fp16 in (("*bf16", False), ("*i8", False), ("*fp8e4nv", True), ("*fp8e4nv", False))],
    ("decode split fused merge", paged_attention_kernels.decode_split_kernel,
     dict(ATTENTION, PAGE=32, HAS_SCALE=False, ONE_SPLIT=False, FUSED_MERGE=True, BLOCK_G=16, BLOCK_N=64),
     dict(bt_ptr="*i32", ctx_ptr="*i32", part_ptr="*fp32", lse_ptr="*fp32", count_ptr="*i32")),
    *[(f"decode code pairs int8={i8} one_split={one}{' prefetch' if pf else ''}",
       paged_attention_kernels.decode_code_pairs_kernel,
       {**{c: v for c, v in ATTENTION.items() if c not in ("CODES_FP16", "IEEE")}, "PAGE": 32, "HAS_SCALE": True,
        "ONE_SPLIT": one, "FUSED_MERGE": not one, "BLOCK_G": 16, "BLOCK_N": 64, "INT8": i8, "PREFETCH": pf,
        "HAS_SINK": one and pf},
       dict(k_ptr="*i16", v_ptr="*i16", bt_ptr="*i32", ctx_ptr="*i32", part_ptr="*bf16" if one else "*fp32",
            lse_ptr="*fp32", count_ptr="*i32")) for i8 in (False, True) for one in (True, False)
      for pf in (False, True)],
    *[(f"decode one split sinks={sink}", paged_attention_kernels.decode_split_kernel,
       dict(ATTENTION, PAGE=32, HAS_SCALE=False, ONE_SPLIT=True, FUSED_MERGE=False, BLOCK_G=16, BLOCK_N=64,
            HAS_SINK=sink),
       dict(bt_ptr="*i32", ctx_ptr="*i32", lse_ptr="*fp32")) for sink in (False, True)],
    ("decode latent rows (576 wide)", paged_attention_kernels.decode_split_kernel,
     dict(ATTENTION, PAGE=32, HAS_WINDOW=False, ONE_SPLIT=False, FUSED_MERGE=False, BLOCK_G=16, BLOCK_D=1024,
          **{k: v for k, v in paged_attention.WIDE_DECODE_CONFIG.items() if k.isupper()}),
     dict(bt_ptr="*i32", ctx_ptr="*i32", part_ptr="*fp32", lse_ptr="*fp32")),
    *[(f"merge splits sinks={sink}", paged_attention_kernels.merge_kernel,
       dict(FP8_OUT=False, FP8_GROUP=0, BLOCK_S=64, BLOCK_D=128, HAS_SINK=sink),
       dict(part_ptr="*fp32", lse_ptr="*fp32", fp8_scale_ptr="*fp32", row_scale_ptr="*fp32"))
      for sink in (False, True)],
    *[(f"merge splits to e4m3 group={g}", paged_attention_kernels.merge_kernel,
       dict(FP8_OUT=g == 0, FP8_GROUP=g, BLOCK_S=64, BLOCK_D=128, HAS_SINK=False),
       dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*fp8e4nv", row_scale_ptr="*fp32")) for g in (0, 128, 64)],
    *[(f"varlen prefill lazy={lazy} sinks={lazy}", paged_attention_kernels.prefill_kernel,
       dict(ATTENTION, BLOCK_M=64, BLOCK_N=64, EVEN_D=True, LAZY=lazy, HAS_SINK=lazy), dict(cu_ptr="*i32"))
      for lazy in (False, True)],
    *[(f"varlen prefill tma {m}x{n}", paged_attention_kernels.prefill_tma_kernel,
       dict(HAS_WINDOW=False, HAS_SCALE=False, CODES_FP16=False, BLOCK_M=m, BLOCK_N=n, BLOCK_D=128, LAZY=True,
            HAS_SINK=m == 128),
       dict(cu_ptr="*i32", kvs_ptr="*fp32", k_desc=f"tensordesc<bf16[{n}, 128]>",
            v_desc=f"tensordesc<bf16[{n}, 128]>"))
      for m, n in ((64, 64), (128, 64), (128, 128))],
    *[(f"varlen prefill tma {code} codes", paged_attention_kernels.prefill_tma_kernel,
       dict(HAS_WINDOW=False, HAS_SCALE=True, CODES_FP16=code == "fp8e4nv", BLOCK_M=64, BLOCK_N=64, BLOCK_D=128,
            LAZY=False, HAS_SINK=False),
       dict(cu_ptr="*i32", kvs_ptr="*fp32", k_desc=f"tensordesc<{code}[64, 128]>",
            v_desc=f"tensordesc<{code}[64, 128]>"))
      for code in ("fp8e4nv", "i8")],
    ("varlen prefill latent rows (576 wide)", paged_attention_kernels.prefill_kernel,
     dict(ATTENTION, HAS_WINDOW=False, BLOCK_D=1024, EVEN_D=False, LAZY=False,
          **{k: v for k, v in paged_attention.WIDE_PREFILL_CONFIG.items() if k.isupper()}), dict(cu_ptr="*i32")),
    *[(f"paged prefill one_split={one}", paged_attention_kernels.paged_prefill_kernel,
       dict(ATTENTION, PAGE=32, ONE_SPLIT=one, BLOCK_M=64, BLOCK_N=64, EVEN_D=True, LAZY=True),
       dict(cu_ptr="*i32", ctx_ptr="*i32", bt_ptr="*i32", o_ptr="*bf16" if one else "*fp32", lse_ptr="*fp32"))
      for one in (True, False)],
    *[(f"w4 {name} zero={z}", kernel, dict(K=4096, GROUP=128, HAS_ZERO=z, **blocks),
       dict(w_ptr="*i64" if name.startswith("gemv") else "*u8", sq_in_ptr="*fp32", sq_out_ptr="*fp32"))
      for name, kernel, blocks in (("gemv", quant_gemm._w4_gemv_kernel,
                                    dict(EVEN_N=True, BLOCK_N=4, BLOCK_KW=128, NORM_PARTS=0)),
                                   ("gemv silu", quant_gemm._w4_gemv_kernel,
                                    dict(EVEN_N=False, BLOCK_N=4, BLOCK_KW=128, GATED=True, NORM_PARTS=0)),
                                   ("gemv add-norm", quant_gemm._w4_gemv_kernel,
                                    dict(EVEN_N=True, BLOCK_N=8, BLOCK_KW=256, NORM_PARTS=0, ADD_NORM=True)),
                                   ("gemv silu pending norm", quant_gemm._w4_gemv_kernel,
                                    dict(EVEN_N=True, BLOCK_N=4, BLOCK_KW=128, GATED=True, NORM_PARTS=512)),
                                   ("dequant", quant_gemm._w4_dequant_kernel,
                                    dict(SCALED=True, BLOCK_N=8, BLOCK_KB=256)))
      for z in (False, True)],
    *[(f"w4 centered e4m3 codes zero={z}", quant_gemm._w4_dequant_kernel,
       dict(K=4096, GROUP=128, HAS_ZERO=z, SCALED=False, BLOCK_N=8, BLOCK_KB=256),
       dict(w_ptr="*u8", s_ptr="*u8", out_ptr="*fp8e4nv")) for z in (False, True)],
    *[(f"w4 gemv rotary quant={q}{' pending norm' if parts else ''}", quant_gemm._w4_qkv_rotary_kernel,
       dict(K=4096, GROUP=128, HAS_ZERO=False, HEAD=128, QUANT=q, QMAX=m, BLOCK_N=8, BLOCK_KW=256, NORM_PARTS=parts),
       dict(w_ptr="*i64", pos_ptr="*i64", slot_ptr="*i64", freq_ptr="*fp32", kc_ptr=c, vc_ptr=c,
            kvs_ptr="*bf16" if q else "*fp32", sq_in_ptr="*fp32"))
      for q, c, m, parts in ((0, "*bf16", 0.0, 0), (1, "*i8", 127.0, 0), (0, "*bf16", 0.0, 512))],
    *[(f"w8 gemv rotary quant={q}", quant_gemm._w8_qkv_rotary_kernel,
       dict(K=4096, HEAD=128, QUANT=q, QMAX=m, BLOCK_N=2, BLOCK_KW=256),
       dict(w_ptr="*i64", pos_ptr="*i64", slot_ptr="*i64", freq_ptr="*fp32", kc_ptr=c, vc_ptr=c,
            kvs_ptr="*bf16" if q else "*fp32"))
      for q, c, m in ((0, "*bf16", 0.0), (2, "*fp8e4nv", 448.0))],
    *[(f"fp8 words gemv rotary quant={q}", quant_gemm._fp8_qkv_rotary_kernel,
       dict(K=4096, HEAD=128, QUANT=q, QMAX=m, BY_BITS=False, BLOCK_N=4, BLOCK_KW=256),
       dict(x_ptr="*fp8e4nv", xs_ptr="*fp32", w_ptr="*i64", ws_ptr="*fp32", pos_ptr="*i64", slot_ptr="*i64",
            freq_ptr="*fp32", kc_ptr=c, vc_ptr=c, kvs_ptr="*bf16" if q else "*fp32"))
      for q, c, m in ((0, "*bf16", 0.0), (2, "*fp8e4nv", 448.0))],
    *[(f"w4 gemm zero={z} split={split} {m}x{n}{' weights left' if left else ''}{' x as is' if as_is else ''}",
       quant_gemm._w4_gemm_kernel,
       dict(GROUP=g, HAS_ZERO=z, EVEN_K=g == 128, SPLIT=split, BLOCK_M=m, BLOCK_N=n, WEIGHTS_LEFT=left,
            X_AS_IS=as_is),
       dict(w_ptr="*u8", out_ptr="*bf16" if split == 1 else "*fp32"))
      for z, split, m, n, g, left in ((False, 1, 16, 64, 128, False), (True, 1, 64, 128, 128, False),
                                      (False, 4, 64, 256, 128, False), (True, 2, 128, 128, 128, False),
                                      (True, 1, 32, 64, 32, False), (False, 1, 64, 64, 128, True),
                                      (True, 4, 64, 64, 128, True), (False, 1, 16, 128, 32, True))
      for as_is in (False, True)],
    *[(f"gated gemm {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} stages={c['num_stages']}"
       f"{' persistent' if c['PERSISTENT'] else ''}",
       gated_gemm._silu_and_mul_gemm_kernel,
       {k: v for k, v in c.items() if k.isupper()},
       dict(x_desc=f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_K']}]>",
            w_desc=f"tensordesc<bf16[{c['BLOCK_N']}, {c['BLOCK_K']}]>",
            y_desc=f"tensordesc<bf16[{c['BLOCK_M']}, {c['BLOCK_N']}]>"))
      for c in gated_gemm.GATED_GEMM_CONFIGS],
    ("sum splits", gemv._sum_splits_kernel, dict(SPLIT=4, BLOCK=1024), dict(part_ptr="*fp32")),
    *[(f"w8 gemv gated={g}", quant_gemm._w8_gemv_kernel, dict(K=4096, EVEN_N=True, BLOCK_N=8, BLOCK_KW=256, GATED=g),
       dict(w_ptr="*i64")) for g in (False, True)],
    ("w8 gemm", quant_gemm._w8_gemm_kernel, dict(K=4096, BLOCK_M=16, BLOCK_N=64, BLOCK_KB=64), dict(w_ptr="*i8")),
    # (the weight scales column-major, as Fp8BlockMethod.prepare stores them; the activations' row-major)
    *[(f"fp8 group gemm group={g} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}", fp8_group_gemm._fp8_group_gemm_kernel,
       dict(GROUP=g, stride_wsn=1, stride_xsg=1, **c.kwargs), dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", xs_ptr="*fp32"))
      for c in fp8_group_gemm._CONFIGS for g in (64, 128)],
    *[(f"fp8 group gemv group={g} split={split}", fp8_group_gemm._fp8_group_gemv_kernel,
       dict(GROUP=g, BLOCK_N=fp8_group_gemm.GEMV_TILE[0], SPLIT=split, stride_wsn=1, stride_xsg=1),
       dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", xs_ptr="*fp32", y_ptr="*bf16" if split == 1 else "*fp32"))
      for g in (64, 128) for split in (1, 4)],
    *[(f"fp8 quantize groups group={g}", fp8_quant._quantize_groups_kernel, dict(GROUP=g, BLOCK=4096),
       dict(q_ptr="*fp8e4nv", scale_ptr="*fp32")) for g in (64, 128)],
    *[(f"int8 gemm {bm}x{bn}x{bk}", int8_gemm._int8_gemm_kernel, dict(EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
       dict(x_ptr="*i8", w_ptr="*i8", xs_ptr="*fp32")) for bm, bn, bk, _, _ in int8_gemm._tiles(128)],
    *[(f"int8 quantize rows prequant={p}", int8_gemm._quantize_int8_kernel, dict(PREQUANT=p, BLOCK=4096),
       dict(q_ptr="*i8", scale_ptr="*fp32")) for p in (False, True)],
    *[(f"moe grouped gemm codes={codes} {ptr} zero={zero} {bm}x{bn}x{bk}", moe._grouped_gemm_kernel,
       dict(K=4096, A_ROWS_PER_TOKEN=1, GATED=True, ACT=0, WEIGHTED=False, FP32=False, CODES=codes,
            GROUP=128 if codes == 2 else 4096, HAS_ZERO=zero, HAS_BIAS=bm == 16, CLAMP=bm == 16, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk),
       dict(w_ptr="*fp32", pairs_ptr="*i32", block_expert_ptr="*i32",
            **{"*i8": dict(b_ptr="*i8", bg_ptr="*i8"), "*fp8e4nv": dict(b_ptr="*fp8e4nv", bg_ptr="*fp8e4nv"),
               "*u8": dict(b_ptr="*u8", bg_ptr="*u8"), None: {}}[ptr]))
      for codes, zero, ptr in ((0, False, None), (1, False, "*i8"), (1, False, "*fp8e4nv"), (2, False, "*u8"),
                               (2, True, "*u8"))
      for bm, bn, bk in ((16, 64, 128), (64, 128, 64))],
    # decode's GEMV a (token, slot) pair: fc_gate (gated) and proj (weighted by the routing), each format
    *[(f"moe pair gemv codes={codes} {ptr} zero={zero} gated={gated} step={step}", moe._pair_gemv_kernel,
       dict(K=2048, A_ROWS_PER_TOKEN=8 if gated else 1, GATED=gated, ACT=0 if gated else -1, WEIGHTED=not gated,
            CODES=codes, GROUP=128 if codes == 2 else 2048, HAS_ZERO=zero, HAS_BIAS=zero, CLAMP=zero and gated,
            BLOCK_N=moe.pair_tile(gated, codes)[0], BLOCK_K=step,
            SUB_K=min(step, 128) if codes == 2 else step),
       dict(w_ptr="*bf16", experts_ptr="*i64",
            **{"*i8": dict(b_ptr="*i8", bg_ptr="*i8"), "*fp8e4nv": dict(b_ptr="*fp8e4nv", bg_ptr="*fp8e4nv"),
               "*u8": dict(b_ptr="*u8", bg_ptr="*u8"), None: {}}[ptr]))
      for codes, zero, ptr in ((0, False, None), (1, False, "*i8"), (1, False, "*fp8e4nv"), (2, False, "*u8"),
                               (2, True, "*u8"))
      for gated in (True, False)
      for step in sorted({moe.pair_tile(gated, codes)[1], 512 if codes == 2 else 256})],  # (int4: 4 groups a step)
    # int4, int8 and e4m3 experts' GEMV a pair on words of codes: Qwen3-30B-A3B's fc_gate (2,048 inputs) and proj (768)
    *[(f"moe pair words {fmt} zero={zero} bits={bits} gated={gated}",
       moe._pair_words_kernel,
       dict(K=2048 if gated else 768, A_ROWS_PER_TOKEN=8 if gated else 1, GATED=gated, ACT=0 if gated else -1,
            WEIGHTED=not gated, CODES=codes, GROUP=128 if codes == 2 else (2048 if gated else 768), HAS_ZERO=zero,
            HAS_BIAS=False, CLAMP=False, EVEN_N=True,
            BLOCK_N=moe.PAIR_WORD_TILE["gated" if gated else "plain", fmt][0],
            BLOCK_KW=moe.PAIR_WORD_TILE["gated" if gated else "plain", fmt][1], BY_BITS=bits),
       dict(w_ptr="*i64", wt_ptr="*bf16", experts_ptr="*i64"))
      for fmt, codes, zero, bits in (("int4", 2, False, False), ("int4", 2, True, False), ("int8", 1, False, False),
                                     ("e4m3", 3, False, False), ("e4m3", 3, False, True))
      for gated in (True, False)],
    # the routing: Qwen3-MoE's softmax over 128 experts and top 8, Mixtral's 8 and 2; DeepSeek-V3's sigmoid over 256
    # in 8 groups (4 kept), GLM-4.5's over 160 in one
    *[(f"moe route experts={e} top_k={k} sigmoid={s} groups={g}", moe._route_kernel,
       dict(TOP_K=k, NORMALIZE=True, SIGMOID=s, GROUPS=g, TOPK_GROUPS=max(g // 2, 1), BLOCK_E=e, BLOCK_G=g,
            BLOCK_K=k), dict(experts_ptr="*i64", logits_ptr="*fp32" if s else "*bf16"))
      for e, k, s, g in ((128, 8, False, 1), (8, 2, False, 1), (256, 8, True, 8), (256, 8, True, 1))],
]


def main() -> None:
    failed = 0
    for label, fn, constexprs, pointers in CASES:
        if any(p.name == "USE_PDL" for p in fn.params):  # as they run on an H100: with PDL (kiln.kernels.pdl)
            constexprs = {"USE_PDL": True, **constexprs}
        start = time.perf_counter()
        try:
            source = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
            triton.compile(source, target=TARGET)
            print(f"ok      {label} ({time.perf_counter() - start:.1f} s)")  # what a first open pays per variant
        except Exception as e:  # a compile error: report it and go on to the next kernel
            failed += 1
            print(f"FAILED  {label}: {type(e).__name__}: {str(e)[-400:]}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
