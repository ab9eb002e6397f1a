"""What the RMSNorm launches cost a decode step: one `kiln bench` run as it is, then the same run with every
Triton RMSNorm left out (its input passed on as the norm's output and as the new residual: no kernel at all). The
tokens of the second run are garbage; its time is what the step would take if the norms cost nothing, the most
that folding them into the GEMVs around them could save. On an NVIDIA GPU:

    python scripts/probe_norm_cost.py --synthetic llama-3-8b --dtype bfloat16 --baseline none \
        --quant-algo W4A16 --skip-unquantized --workloads decode-1

(Norms that write quantized inputs, out_quant, are not left out: use a 16-bit-input format.)
"""

import sys

import kiln.layers.normalization as normalization
from kiln import cli


def _no_norm(x, weight, eps, residual=None, out_quant=None):
    assert out_quant is None, "probe_norm_cost: this format's norms write quantized inputs"
    return x if residual is None else (x, x)


if __name__ == "__main__":
    args = ["bench", *sys.argv[1:]]
    cli.main(args)
    print("# again, every RMSNorm left out", flush=True)
    normalization.rms_norm = _no_norm
    cli.main(args)
