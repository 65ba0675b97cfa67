"""Plot tokens/s and latency against concurrency from perf.py's markdown tables (needs matplotlib, which the
server does not).

    python benchmarks/plot.py docs/results/2026-11-26-baseline-h100/perf_rlhf.md \
        docs/results/2026-11-26-baseline-h100/perf_naive.md \
        --inprocess docs/results/2026-11-26-baseline-h100/inprocess.json --out docs/performance.png
"""

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_tables(paths):
    series = defaultdict(list)
    for path in paths:
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 6 and cells[1].isdigit():
                label, conc, _, tps, p50, p99 = cells[:6]
                series[label].append((int(conc), float(tps), float(p50), float(p99)))
    return series


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="+")
    p.add_argument("--inprocess", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    series = read_tables(a.tables)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in series.items():
        rows.sort()
        conc = [r[0] for r in rows]
        ax1.plot(conc, [r[1] for r in rows], "o-", label=label)
        ax2.plot(conc, [r[2] for r in rows], "o-", label=f"{label} p50")
        ax2.plot(conc, [r[3] for r in rows], "x--", label=f"{label} p99")
    if a.inprocess:
        for row in json.load(open(a.inprocess)):
            ax1.axhline(row["tokens_per_s"], linestyle=":", color="gray")
            ax1.annotate(f"in-process {row['name'].split(' budget')[0]}", (1, row["tokens_per_s"]), fontsize=7)
    for ax, ylabel in ((ax1, "tokens/s"), (ax2, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax1.set_ylim(bottom=0)
    fig.suptitle("8B Llama-shaped reward model, bf16, one H100 (RLHF workload, perf_analyzer)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)


if __name__ == "__main__":
    main()
