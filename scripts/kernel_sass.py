"""What a kiln Triton kernel costs per loop step on an H100, read from its sm_90 machine code, on a machine
without a GPU: the instructions of the kernel's longest loop by opcode, its registers and spills.

A memory-bound kernel (a GEMV) is only as fast as the memory if its loop issues few enough instructions per
byte it loads: the int4 GEMV that unpacked bytes issued 7.3 instructions per weight in its loop and streamed
1-2 TB/s; its int32-word form issues 3.4-3.6. Counting them here costs no device time:

    pip install --no-deps --target /tmp/triton_site triton==3.6.0
    PYTHONPATH=/tmp/triton_site:. python scripts/kernel_sass.py "w4 gemv" [--num-warps 4] [--set BLOCK_N=16] [--sass]

The label picks the cases of scripts/compile_kernels.py whose label contains it. Pointers are compiled as
16-byte aligned, as Triton specializes them at run time (without it no load is vectorized).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.compiler import ASTSource

from compile_kernels import CASES, TARGET, signature

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # nvdisasm and cuobjdump ship with Triton
OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
BACK_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


# Integer arguments that are multiples of 16 on real shapes (Llama's dims, KB = in / 2, G = in / 128, a token's
# stride in a fused QKV or a cache): Triton specializes such arguments at run time, which lets it vectorize and
# pipeline the loads they index. A stride missing here compiles as a scalar of unknown alignment: the prefill
# kernel then looked like 255 registers and 309 spills, against 243 and none as it runs.
MULTIPLES_OF_16 = {"N", "K", "n", "KB", "G", "inter", "stride_xm", "stride_wn", "x_stride", "res_stride", "head_size",
                   "q_sb", "q_sh", "k_sblk", "k_stok", "k_sh", "v_sblk", "v_stok", "v_sh", "o_sb", "o_sh",
                   "q_st", "k_st", "v_st", "o_st", "q_tok_stride", "k_tok_stride", "v_tok_stride", "q_head_stride",
                   "k_head_stride", "v_head_stride", "kc_tok_stride", "kc_head_stride", "vc_tok_stride",
                   "vc_head_stride", "stride_xsm", "stride_wsg"}


def aligned_pointers(fn) -> dict:
    """Triton's run-time specialization of 16-byte aligned pointers and multiple-of-16 shapes, as attributes."""
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
            if not p.is_constexpr and (p.name.endswith("_ptr") or p.name in MULTIPLES_OF_16)}


def disassemble(fn, constexprs: dict, pointers: dict, num_warps: int, num_stages: int,
                maxnreg: int | None = None) -> tuple[str, str]:
    """(the kernel's SASS, its registers per thread and shared memory per program); maxnreg caps the registers
    (Triton's launch option)."""
    options = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    kernel = triton.compile(ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs,
                                      attrs=aligned_pointers(fn)), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    registers = re.search(r"REG:(\d+)", usage).group(1)
    return sass, f"{registers} registers, {kernel.metadata.shared} bytes shared"


def longest_loop(sass: str) -> collections.Counter:
    """Opcodes between a label and the farthest branch back to it (empty when the loop was unrolled away)."""
    lines = sass.splitlines()
    labels = {line.rstrip(":"): i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:", line)}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := BACK_BRANCH.search(line)) and labels.get(m.group(1), i) < i]
    if not spans:
        return collections.Counter()
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return collections.Counter(m.group(1) for line in lines[start:end + 1] if (m := OPCODE.search(line)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", help="a substring of scripts/compile_kernels.py case labels")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--num-stages", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                        help="override a case's constexpr (a tile: --set BLOCK_N=16 --set BLOCK_KW=128)")
    parser.add_argument("--maxnreg", type=int, help="cap the registers a thread (more programs an SM)")
    parser.add_argument("--sass", action="store_true", help="also print the whole disassembly")
    args = parser.parse_args()
    overrides = {name: int(value) for name, value in (item.split("=", 1) for item in args.set)}
    cases = [case for case in CASES if args.label in case[0]]
    if not cases:
        raise SystemExit(f"no case of scripts/compile_kernels.py has {args.label!r} in its label")
    for label, fn, constexprs, pointers in cases:
        constexprs = {**constexprs, **overrides}
        sass, registers = disassemble(fn, constexprs, pointers, args.num_warps, args.num_stages, args.maxnreg)
        loop = longest_loop(sass)
        spills = sass.count("STL")
        top = ", ".join(f"{op} {n}" for op, n in loop.most_common(10))
        mma = {op: n for op, n in collections.Counter(OPCODE.findall(sass)).items() if "MMA" in op}
        print(f"{label}: {constexprs}\n  {registers}, {spills} spill stores; longest loop "
              f"{sum(loop.values())} instructions per step: {top}" + (f"; tensor-core ops {mma}" if mma else ""))
        if args.sass:
            print(sass)


if __name__ == "__main__":
    main()
