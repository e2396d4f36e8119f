"""A bench_ops.py run as rows: kernel vs NumPy reference, milliseconds per cube, written to a CSV that
``render_ops.py`` renders into docs/results/ops_cpu.md.

    python -m pytest benchmarks/bench_ops.py -q --benchmark-only --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json --csv docs/results/ops_cpu.csv
    python benchmarks/render_ops.py docs/results/ops_cpu.csv

Per-cube time = mean time of one call / batch size. The reference runs one cube per call (single-threaded NumPy).
Each row carries the machine and the date of the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

FIELDS = ("op", "impl", "batch", "threads", "ms_per_cube", "rounds", "machine", "cores", "date")


def rows(report: dict) -> list[dict]:
    """One row per benchmark of a pytest-benchmark report of bench_ops.py."""
    cpu = report.get("machine_info", {}).get("cpu", {})
    machine = cpu.get("brand_raw") or report.get("machine_info", {}).get("processor", "unknown CPU")
    run = {"machine": machine, "cores": cpu.get("count", ""), "date": report.get("datetime", "")[:10]}
    out = []
    for b in report["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        per_cube = round(stats["mean"] * 1e3 / info["batch"], 4)
        out.append({**{k: info[k] for k in ("op", "impl", "batch", "threads")}, "ms_per_cube": per_cube,
                    "rounds": stats["rounds"], **run})  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="pytest-benchmark JSON of bench_ops.py")
    p.add_argument("--csv", type=Path, default=Path("bench.csv"), help="the rows (default: bench.csv)")
    args = p.parse_args(argv)
    table = rows(json.loads(args.report.read_text()))
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(table)
    print(f"{len(table)} rows in {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
