"""Tokens/s of perf.py rows against a baseline: reads the rows benchmarks/perf.py printed (labels "workload: server")
and prints them with each row's ratio to the baseline row of the same workload and concurrency (the first such
row, or the one whose server is --base). Used by scaling.sh and fidelity.sh.

    python benchmarks/versus.py perf.md [--base "server.stats_log_s=10"]
"""

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("perf_md", help="perf.py's table rows, one file")
    p.add_argument("--base", help="the baseline server's label (default: each workload's first)")
    a = p.parse_args()
    # perf.py's later columns (perf_analyzer's own figure) are not compared
    rows = [[c.strip() for c in line.split("|")[1:7]] for line in open(a.perf_md)
            if line.startswith("| ") and not line.startswith("| label")]
    base = {}
    for label, conc, _, tok, _, _ in rows:
        workload, server = label.split(": ", 1)
        if a.base is None or server == a.base:
            base.setdefault((workload, conc), float(tok))
    print("| workload | server | concurrency | tokens/s | vs baseline | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for label, conc, _, tok, p50, p99 in rows:
        workload, server = label.split(": ", 1)
        ref = base.get((workload, conc))
        ratio = f"{float(tok) / ref:.2f}" if ref else "no baseline"
        print(f"| {workload} | {server} | {conc} | {float(tok):,.0f} | {ratio} | {p50} | {p99} |")


if __name__ == "__main__":
    main()
