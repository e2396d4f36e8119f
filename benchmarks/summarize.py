"""Markdown table of a bench_ops.py run: kernel vs numpy reference, milliseconds per cube.

    python -m pytest benchmarks -q --benchmark-only --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json

Per-cube time = mean time of one call / batch size. The reference runs one cube per call (single-threaded numpy);
speedup = reference ms/cube / kernel ms/cube.
"""

from __future__ import annotations

import json
import sys

OPS = ("genesis_pair", "bezier_remap", "local_shuffle", "inpaint", "outpaint", "flip")


def table(report: dict) -> str:
    kernel, ref = {}, {}
    for b in report["benchmarks"]:
        info = b["extra_info"]
        per_cube_ms = b["stats"]["mean"] * 1e3 / info["batch"]
        if info["impl"] == "reference":
            ref[info["op"]] = per_cube_ms
        else:
            kernel[info["op"], info["batch"], info["threads"]] = per_cube_ms
    lines = [
        "| op | batch | threads | kernel ms/cube | reference ms/cube | speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    order = {op: i for i, op in enumerate(OPS)}
    for (op, batch, threads), k_ms in sorted(kernel.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        r_ms = ref.get(op)
        r_text = f"{r_ms:.2f}" if r_ms is not None else "–"
        speedup = "–" if r_ms is None else f"{r_ms / k_ms:.1f}x" if r_ms < 10 * k_ms else f"{r_ms / k_ms:.0f}x"
        lines.append(f"| {op} | {batch} | {threads} | {k_ms:.3f} | {r_text} | {speedup} |")
    cpu = report.get("machine_info", {}).get("cpu", {})
    machine = cpu.get("brand_raw") or report.get("machine_info", {}).get("processor", "unknown CPU")
    cores = cpu.get("count")
    lines.append("")
    lines.append(
        f"Machine: {machine}" + (f", {cores} logical cores" if cores else "") + f"; {report.get('datetime', '')[:10]}."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
