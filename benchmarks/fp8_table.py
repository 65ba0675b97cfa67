"""The table of benchmarks/fp8_recipes.sh: one row per recipe directory under OUT (bf16 first), tokens/s and its
ratio to bf16 beside the order of the rewards, against float32 transformers (python -m reward_server.check) and in
the start-up fidelity gate against the unquantized bf16 model (reward_server_quantization_* metrics).

    python benchmarks/fp8_table.py /tmp/fp8
"""

import json
import re
import sys
from pathlib import Path

ORDER = ("bf16", "fp8", "fp8_tensor", "fp8_mlp", "fp8_skip_ends", "fp8_mlp_skip_ends")


def tokens_per_s(d: Path):
    """perf.py's row: | label | concurrency | requests/s | tokens/s | ... (the last concurrency)."""
    rows = [line.split("|")[1:-1] for line in (d / "perf.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| label")] if (d / "perf.md").exists() else []
    return (int(rows[-1][1]), float(rows[-1][3])) if rows else (None, None)


def checks(d: Path):
    """{label: check's served-vs-float32 figures} from label<N>.json (the GPU's key, or the CPU's float32)."""
    out = {}
    for f in sorted(d.glob("label*.json")):
        text = f.read_text().strip()
        if text:
            report = json.loads(text.splitlines()[-1])
            out[report["label"]] = {**report.get("served_vs_float32", report.get("float32", {})),
                                    "bf16": report.get("bfloat16_vs_float32")}
    return out


def gate(d: Path):
    figures = {}
    if (d / "gate.prom").exists():
        for line in (d / "gate.prom").read_text().splitlines():
            found = re.match(r'reward_server_quantization_(\w+)\{label="([^"]+)"\} (\S+)', line)
            if found:
                figures.setdefault(found.group(2), {})[found.group(1)] = float(found.group(3))
    seconds = None
    if (d / "gate.txt").exists():
        found = re.search(r" in ([\d.]+) s: ", (d / "gate.txt").read_text())
        seconds = float(found.group(1)) if found else None
    return figures, seconds


def per_label(values: dict, key: str, fmt: str) -> str:
    shown = [fmt.format(v[key]) for _, v in sorted(values.items()) if v.get(key) is not None]
    return " / ".join(shown) or "-"


def main(out: str) -> None:
    root = Path(out)
    found = [d for d in root.iterdir() if d.is_dir() and (d / "ready_s").exists()]
    found.sort(key=lambda d: (ORDER.index(d.name) if d.name in ORDER else len(ORDER), d.name))
    base = next((tokens_per_s(d)[1] for d in found if d.name == "bf16"), None)
    print("| recipe | clients | tokens/s | x bf16 | ready s | gate s | gate Spearman vs bf16 | gate pairs % | "
          "Spearman vs fp32 | pairs vs fp32 % | mean abs diff vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in found:
        clients, tps = tokens_per_s(d)
        ratio = f"{tps / base:.2f}" if tps and base else "-"
        figures, seconds = gate(d)
        c = checks(d)
        pct = {k: {**v, "pair_agreement": 100 * v["pair_agreement"]} for k, v in c.items() if "pair_agreement" in v}
        gpct = {k: {**v, "pairs_alike": 100 * v["pairs_alike"]} for k, v in figures.items() if "pairs_alike" in v}
        print(f"| {d.name} | {clients or '-'} | {f'{tps:,.0f}' if tps else '-'} | {ratio} | "
              f"{(d / 'ready_s').read_text().strip()} | {seconds if seconds is not None else '-'} | "
              f"{per_label(figures, 'spearman', '{:.4f}')} | {per_label(gpct, 'pairs_alike', '{:.1f}')} | "
              f"{per_label(c, 'spearman', '{:.4f}')} | {per_label(pct, 'pair_agreement', '{:.1f}')} | "
              f"{per_label(c, 'label_mean_abs_diff', '{:.3g}')} |")
    plain = {k: v["bf16"] for d in found if d.name == "bf16" for k, v in checks(d).items() if v.get("bf16")}
    if plain:
        pairs = {k: {"p": 100 * v["pair_agreement"]} for k, v in plain.items()}
        print(f"\nPlain bf16 transformers vs float32, per label: Spearman {per_label(plain, 'spearman', '{:.4f}')}, "
              f"pairs ordered alike {per_label(pairs, 'p', '{:.1f}')} %.")
    print("\nPer label (0 / 1 ...). Gate: the server's start-up sample, quantized vs unquantized bf16 (worst rank); "
          "fp32: python -m reward_server.check on the workload, served vs float32 transformers.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fp8")
