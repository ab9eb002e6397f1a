"""A PNG of a `kiln bench` report: output tokens/s per workload and system (log scale), and the TTFT
p50 of each kiln system. Needs matplotlib (`pip install matplotlib`); the JSON report does not.

    python -m kiln.bench.plot results.json results.png
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from kiln.checkpoint.atomic import atomic_write_bytes
from kiln.errors import ConfigError


def plot_results(report: dict, png_path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'kiln-llm[bench]' (or matplotlib); the JSON "
                          "report does not") from None
    results = report["results"]
    workloads = list(dict.fromkeys(r["scenario"] for r in results))
    systems = list(dict.fromkeys(r["system"] for r in results))
    width = 0.8 / len(systems)
    fig, (speed, ttft) = plt.subplots(1, 2, figsize=(14, 5))
    for i, system in enumerate(systems):
        rows = {r["scenario"]: r for r in results if r["system"] == system}
        xs = [w + i * width for w in range(len(workloads))]
        speed.bar(xs, [rows[w]["output_tokens_per_s"] if w in rows else 0 for w in workloads], width, label=system)
        ttft.bar(xs, [rows[w]["ttft_s"]["p50"] * 1000 if w in rows and rows[w]["ttft_s"] else 0 for w in workloads],
                 width, label=system)
    for ax, title in ((speed, "output tokens/s"), (ttft, "time to first token p50 (ms)")):
        ax.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads, rotation=20)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"kiln bench: {report.get('device')} ({report.get('date')}, {report.get('commit')})", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, png.getvalue())
    return Path(png_path)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(plot_results(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]))


if __name__ == "__main__":
    main()
