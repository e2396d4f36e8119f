"""docs/results/backbones.md from bench_backbones.py's CSV and JSON: every figure is the CSV's.

python benchmarks/render_backbones.py docs/results/backbones.csv
python benchmarks/render_backbones.py docs/results/backbones.csv --check   # CI: 1 if .md is stale
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_page import parse, write_or_check  # noqa: E402


def _number(value: str, digits: int = 3) -> str:
    return "" if value in ("", None) else f"{float(value):.{digits}g}"


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# The backbones on a CPU",
        "",
        "<!-- Rendered by benchmarks/render_backbones.py from backbones.csv: edit the script, not this file. -->",
        "",
        f"Measured {meta['date']} on {meta['machine']} (a shared virtual machine of {meta['cores']} logical cores, no "
        f"GPU), {meta['threads']} torch threads, by:",
        "",
        "```bash",
        "python benchmarks/bench_backbones.py --out docs/results/backbones",
        "python benchmarks/render_backbones.py docs/results/backbones.csv",
        "```",
        "",
        f"A step: `genesis_pair` of a batch of {rows[0]['batch']} cubes, the network, MSE, backward and an Adam step; "
        f"the median of {meta['steps']} timed steps after one untimed (± half their range), each cube size in a fresh "
        "process, whose peak resident memory is given. The learning check: `genesis-ext pretrain`'s default recipe "
        f"for {meta['train_steps']} steps on 64x64x32 cubes of the bundled chest CT (`data/sample`), batches of 2; the "
        "final validation MSE, its ratio to the constant-mean baseline of the same validation pairs (below 1: the "
        "network restores better than a constant), and that ratio after each 50 steps. Networks too slow for that on "
        "this CPU have no learning check.",
        "",
        "| architecture | parameters | cube | step (s) | peak memory (MiB) | final val MSE | / mean baseline | "
        "every 50 steps |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spread = f" (±{float(r['step_spread']) * 100:.0f} %)"
        curve = ", ".join(_number(v, 2) for v in (r.get("ratio_curve") or "").split())
        lines.append(
            f"| `{r['arch']}` | {int(r['parameters']):,} | {r['cube']} | {_number(r['step_s'])}{spread} | "
            f"{float(r['peak_mib']):,.0f} | {_number(r['val_loss'])} | {_number(r['ratio'])} | {curve} |"
        )
    lines += ["", "The rows: [backbones.csv](backbones.csv).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(__doc__.split("\n\n")[0], "backbones.csv (bench_backbones.py's rows; its .json beside it)", argv)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    meta = json.loads(args.csv.with_suffix(".json").read_text())
    return write_or_check(args.out_dir / "backbones.md", render(rows, meta), args.check)


def test_every_row_and_figure_comes_from_the_csv():
    rows = [
        {"arch": "resenc-s", "parameters": "2437299", "cube": "64x64x32", "batch": "2", "step_s": "1.234",
         "step_spread": "0.05", "peak_mib": "812.3", "val_loss": "0.0123", "ratio": "0.456",
         "ratio_curve": "1.234 0.871 0.456"},
        {"arch": "resenc-l", "parameters": "102348965", "cube": "64x64x32", "batch": "2", "step_s": "11.0",
         "step_spread": "0.1", "peak_mib": "1934", "val_loss": "", "ratio": "", "ratio_curve": ""},
    ]  # fmt: skip
    meta = {"date": "2026-12-07", "machine": "AMD EPYC", "cores": 2, "threads": 2, "steps": 3, "train_steps": 150}
    page = render(rows, meta)
    assert "| `resenc-s` | 2,437,299 | 64x64x32 | 1.23 (±5 %) | 812 | 0.0123 | 0.456 | 1.2, 0.87, 0.46 |" in page
    assert "| `resenc-l` | 102,348,965 | 64x64x32 | 11 (±10 %) | 1,934 |  |  |  |" in page


if __name__ == "__main__":
    sys.exit(main())
