"""One engine open to its first token in a fresh process, as a redeployed server starts:
`python -m kiln.bench.restart ENGINE_DIR DEVICE` prints one JSON line, the seconds from LLM(...) to the first token
and where the kernel choices came from (kiln.kernels.choices: read from disk, or timed). kiln bench runs it for its
"engine load to first token" (kiln.bench.offline.restart_to_first_token)."""

from __future__ import annotations

import json
import sys

import torch

from kiln.bench.offline import open_to_first_token
from kiln.kernels import choices


def main(argv: list[str] | None = None) -> None:
    engine_dir, device = argv or sys.argv[1:]
    llm, seconds = open_to_first_token(engine_dir, torch.device(device))
    llm.shutdown()
    print(json.dumps({"load_to_first_token_s": seconds, "kernel_choices": dict(choices.counts)}), flush=True)


if __name__ == "__main__":
    main()
