"""The CPU op benchmark, rendered: summarize.py's CSV as docs/results/ops_cpu.md.

    python benchmarks/render_ops.py docs/results/ops_cpu.csv           # writes the .md
    python benchmarks/render_ops.py docs/results/ops_cpu.csv --check   # CI: 1 if .md is stale

Per op, batch and thread count: the kernel's ms per cube, the NumPy reference's (one cube per call, one thread) and
their ratio.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # results_page beside this file (pytest's importlib mode adds none)
from results_page import parse, write_or_check  # noqa: E402

ORDER = ("genesis_pair", "bezier_remap", "local_shuffle", "inpaint", "outpaint", "flip")  # then by name
COMMANDS = ("python -m pytest benchmarks/bench_ops.py -q --benchmark-only --benchmark-json=bench.json",
            "python benchmarks/summarize.py bench.json --csv docs/results/ops_cpu.csv",
            "python benchmarks/render_ops.py docs/results/ops_cpu.csv")  # fmt: skip


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "batch": int(r["batch"]), "threads": int(r["threads"]), "ms_per_cube": float(r["ms_per_cube"])}
                for r in csv.DictReader(f)]  # fmt: skip


def speedup(reference: float | None, kernel: float) -> str:
    if reference is None:
        return "–"
    ratio = reference / kernel
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def markdown(rows: list[dict]) -> str:
    reference = {r["op"]: r["ms_per_cube"] for r in rows if r["impl"] == "reference"}
    kernel = [r for r in rows if r["impl"] == "kernel"]
    rank = {op: i for i, op in enumerate(ORDER)}
    kernel.sort(key=lambda r: (rank.get(r["op"], len(ORDER)), r["op"], r["batch"], r["threads"]))
    first = rows[0]
    lines = [
        "# The ops on the CPU: kernels against the NumPy reference",
        "",
        "<!-- Rendered by benchmarks/render_ops.py from ops_cpu.csv: edit the script, not this file. -->",
        "",
        f"Measured {first['date']} on {first['machine']} ({first['cores']} logical cores, no GPU), one run; ms per "
        "64x64x32 cube of the bundled chest CT (mean time of a call / batch). The reference is this package's NumPy "
        "oracle, one cube per call on one thread. On this shared virtual machine a figure can move by a third between "
        "runs minutes apart: compare ratios within one run.",
        "",
        "```bash",
        *COMMANDS,
        "```",
        "",
        "| op | batch | threads | kernel ms/cube | reference ms/cube | speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in kernel:
        ref = reference.get(r["op"])
        ref_text = f"{ref:.2f}" if ref is not None else "–"
        lines.append(f"| {r['op']} | {r['batch']} | {r['threads']} | {r['ms_per_cube']:.3f} | {ref_text} | "
                     f"{speedup(ref, r['ms_per_cube'])} |")  # fmt: skip
    lines += ["", "The rows: [ops_cpu.csv](ops_cpu.csv)."]
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    args = parse(__doc__.split("\n\n")[0], "ops_cpu.csv (summarize.py's rows)", argv)
    return write_or_check(args.out_dir / "ops_cpu.md", markdown(read_rows(args.csv)), args.check)


if __name__ == "__main__":
    sys.exit(main())


def test_speedup_and_order():
    rows = [
        {"op": "flip", "impl": "kernel", "batch": 1, "threads": 1, "ms_per_cube": 0.5, "machine": "m", "cores": "2",
         "date": "d"},
        {"op": "genesis_pair", "impl": "kernel", "batch": 16, "threads": 2, "ms_per_cube": 1.0, "machine": "m",
         "cores": "2", "date": "d"},
        {"op": "genesis_pair", "impl": "reference", "batch": 1, "threads": 1, "ms_per_cube": 53.78, "machine": "m",
         "cores": "2", "date": "d"},
    ]  # fmt: skip
    table = [line for line in markdown(rows).splitlines() if line.startswith("| ") and "---" not in line][1:]
    # written out: 53.78 / 1.0 = 54x (two digits from 10x); flip has no reference row; the pair comes first
    assert table == ["| genesis_pair | 16 | 2 | 1.000 | 53.78 | 54x |", "| flip | 1 | 1 | 0.500 | – | – |"]
