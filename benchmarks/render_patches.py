"""The large-patch benchmark, rendered: bench_patches.py's CSV as docs/results/patches_cpu.md.

    python benchmarks/render_patches.py docs/results/patches_cpu.csv           # writes the .md
    python benchmarks/render_patches.py docs/results/patches_cpu.csv --check   # CI: 1 if .md is stale

Per cube size: the pair's time per cube and per voxel and its peak memory, the training step's time and memory at
each width, the pair's share of a step, and the published shuffle rule's largest block with whether the CUDA kernels,
run on the CPU by HIP-CPU, took that size. Every figure is the CSV's or computed here from it.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # results_page beside this file (pytest's importlib mode adds none)
from results_page import parse, write_or_check  # noqa: E402

COMMANDS = ("python benchmarks/bench_patches.py --csv docs/results/patches_cpu.csv",
            "python benchmarks/render_patches.py docs/results/patches_cpu.csv")  # fmt: skip
SUMMARY_WIDTH = 0.25  # the width of the summary's step: the one measured at every size
MEMORY = {  # the CSV's memory column: how bench_patches.py measured
    "VmHWM": "Memory: the process's resident set just before the timed calls (`VmRSS`: Python, torch, the cubes, "
    "after the untimed pair) and its peak during them (`VmHWM`, reset to the resident set before the timed calls "
    "through `/proc/self/clear_refs`); *added* is the difference. Memory the allocator keeps after a call counts "
    "too, so *added* can exceed what one call holds at once (the two output batches and an int32 index per voxel "
    "and thread).",
    "ru_maxrss": "Memory: the process's peak resident set (`ru_maxrss`: Python, torch, the cubes and the calls); "
    "*added* is its rise over the peak before the timed calls (a lower bound).",
}
ONE_CUBE = (
    " A step's pair makes one cube: a second thread does not help (the CPU kernel splits a batch by cube) "
    "and that cube's draws set the cost, so it costs more per cube, and varies more, than at the pairs' batch."
)
INTS = ("batch", "repeats", "block_voxels", "threads", "cores")
FLOATS = ("width", "pair_ms", "train_ms", "base_mib", "peak_mib", "resample", "load")
CUDA = ("takes", "not checked")  # the CSV's cuda column: the emulated kernels made a pair of the size, or are not built
EXACT_MAX_VOXELS = 128  # docs/randomness.md: blocks up to this size get an exact permutation, larger ones a Feistel one
SHUFFLE = "../randomness.md#local-shuffle-permutations"


def read_rows(path, ints=INTS, floats=FLOATS) -> list[dict]:
    """The CSV's rows, the columns ``ints`` and ``floats`` parsed (a blank cell: None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ints + floats:
            r[k] = None if r[k] == "" else (int if k in ints else float)(r[k])
    return rows


def check_cuda(pairs: list[dict]) -> None:
    """A CSV whose cuda column says other than CUDA (the previous release's wrote "refuses" where blocks exceeded its
    1,024-voxel cap) is not a run of this tree: rerun bench_patches.py."""
    stale = [f"{p['cube']}: {p.get('cuda')!r}" for p in pairs if p.get("cuda") not in CUDA]
    if stale:
        raise SystemExit(f"the CSV's cuda column holds {', '.join(stale)}, not one of {CUDA}: a run of a release "
                         "with the CUDA block cap? Rerun benchmarks/bench_patches.py")  # fmt: skip


def voxels(cube: str) -> int:
    x, y, z = map(int, cube.split("x"))
    return x * y * z


def fig(value: float) -> str:
    """Three significant figures, thousands separated: 1.60, 16.4, 164, 1,640."""
    return f"{value:,.0f}" if value >= 100 else f"{value:#.3g}"


def share(step: dict) -> str:
    return f"{100 * step['pair_ms'] / (step['pair_ms'] + step['train_ms']):.2f} %"


def summary(pairs: list[dict], steps: list[dict]) -> list[str]:
    step_of = {s["cube"]: s for s in steps if s["width"] == SUMMARY_WIDTH}
    lines = [f"| cube | pair ms/cube | ns/voxel | pair MiB added | step s (width {SUMMARY_WIDTH:g}) | pair share | "
             "largest shuffle block | CUDA kernels |",
             "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for p in pairs:
        per_cube, s = p["pair_ms"] / p["batch"], step_of[p["cube"]]
        lines.append(f"| {p['cube']} | {fig(per_cube)} | {fig(1e6 * per_cube / voxels(p['cube']))} | "
                     f"{fig(p['peak_mib'] - p['base_mib'])} | {fig((s['pair_ms'] + s['train_ms']) / 1e3)} | "
                     f"{share(s)} | {p['largest_block']} | {p['cuda']} |")  # fmt: skip
    return lines


def pair_table(pairs: list[dict]) -> list[str]:
    lines = ["| cube | CT resampled by | batch | ms per call | ms/cube | ns/voxel | peak MiB | added MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in pairs:
        per_cube = p["pair_ms"] / p["batch"]
        lines.append(f"| {p['cube']} | {p['resample']:.2f} | {p['batch']} | {fig(p['pair_ms'])} | {fig(per_cube)} | "
                     f"{fig(1e6 * per_cube / voxels(p['cube']))} | {fig(p['peak_mib'])} | "
                     f"{fig(p['peak_mib'] - p['base_mib'])} |")  # fmt: skip
    return lines


def step_table(steps: list[dict]) -> list[str]:
    lines = ["| cube | width | batch | pair ms | forward, backward, Adam: s | pair share | peak MiB | added MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in steps:
        lines.append(f"| {s['cube']} | {s['width']:g} | {s['batch']} | {fig(s['pair_ms'])} | "
                     f"{fig(s['train_ms'] / 1e3)} | {share(s)} | {fig(s['peak_mib'])} | "
                     f"{fig(s['peak_mib'] - s['base_mib'])} |")  # fmt: skip
    return lines


def block_table(pairs: list[dict]) -> list[str]:
    lines = ["| cube | largest block (S // 10 per axis) | voxels | its permutation | CUDA kernels |",
             "|---|---|---:|---|---|"]  # fmt: skip
    for p in pairs:
        kind = "exact" if p["block_voxels"] <= EXACT_MAX_VOXELS else "Feistel"
        lines.append(f"| {p['cube']} | {p['largest_block']} | {p['block_voxels']:,} | {kind} | {p['cuda']} |")
    return lines


def full_width(steps: list[dict]) -> str:
    """Why the published width 1.0 runs at one size only, from the two widths' steps there."""
    at = {s["width"]: s for s in steps if s["cube"] == steps[0]["cube"]}
    if set(at) != {SUMMARY_WIDTH, 1.0}:
        return "The published width 1.0 was not timed."
    narrow, full = at[SUMMARY_WIDTH], at[1.0]
    added = [s["peak_mib"] - s["base_mib"] for s in (full, narrow)]
    return (
        f"The published width 1.0 is timed at {full['cube']} only, to keep the run to minutes: there its step takes "
        f"{full['train_ms'] / narrow['train_ms']:.1f}x the time and adds {added[0] / added[1]:.1f}x the memory of "
        f"a width-{SUMMARY_WIDTH:g} step."
    )


def joined(items: list[str]) -> str:
    """a; a and b; a, b and c."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def emulated(pairs: list[dict]) -> str:
    """What this run's emulated CUDA kernels showed."""
    took = [p["cube"] for p in pairs if p["cuda"] == "takes"]
    unchecked = [p["cube"] for p in pairs if p["cuda"] == "not checked"]
    said = []
    if took:
        said.append(f"made a pair at {joined(took)} after the timings")
    if unchecked:
        said.append(
            f"were not built for this run, so {joined(unchecked)} {'is' if len(unchecked) == 1 else 'are'} "
            "*not checked*"
        )
    return "Here the CUDA kernels, run on the CPU by HIP-CPU (`genesis_ext._C_emu`), " + "; ".join(said) + "."


def markdown(rows: list[dict]) -> str:
    pairs = [r for r in rows if r["kind"] == "pair"]
    steps = [r for r in rows if r["kind"] == "step"]
    check_cuda(pairs)
    first, loads = rows[0], [r["load"] for r in rows]
    resampled = ", ".join(f"{p['cube']} by {p['resample']:.2f}" for p in pairs if p["resample"] > 1) or "none"
    lines = [
        "# Large patches on the CPU: pairs, training steps and memory",
        "",
        "<!-- Rendered by benchmarks/render_patches.py from patches_cpu.csv: edit the script, not this file. -->",
        "",
        f"Measured {first['date']} on {first['machine']}, a shared virtual machine of {first['cores']} logical cores "
        f"(no GPU), with {first['threads']} threads; other jobs ran beside it (the 1-minute load average was "
        f"{min(loads):.1f} to {max(loads):.1f} as the measurements started), so a figure can differ twofold between "
        "runs under other loads: compare within a run. Every time is the median of a few timed calls (the pair: "
        f"{pairs[0]['repeats']} calls after an untimed one; a step: {steps[0]['repeats']} steps, the first included), "
        "each size and width in a fresh process.",
        "",
        "```bash",
        *COMMANDS,
        "```",
        "",
        "Cubes are cut at seeded random positions from the bundled chest CT (`data/sample`, two crops of about 120³ "
        "voxels). Where a cube does not fit, both volumes were first resampled (trilinear) by the smallest factor "
        f"that fits it ({resampled}): the same anatomy on a finer grid, no padding. {MEMORY[first['memory']]}",
        "",
        "## Summary",
        "",
        f"Pairs at batch {pairs[0]['batch']}; a step is one pre-training step of batch {steps[0]['batch']} "
        "(`genesis_pair`, the U-Net's forward and backward pass, an Adam step), and the pair's share is its part of "
        "that step. The largest shuffle block is the published rule's (sides up to a tenth of each axis); the CUDA "
        f"kernels take blocks of any size (issue 25, [local-shuffle permutations]({SHUFFLE})): *takes* where they, run "
        "on the CPU by HIP-CPU, made a pair of that size for this run; *not checked* where they were not built.",
        "",
        *summary(pairs, steps),
        "",
        "## Pairs",
        "",
        *pair_table(pairs),
        "",
        "## Training steps",
        "",
        full_width(steps) + (ONE_CUBE if steps[0]["batch"] == 1 else ""),
        "",
        *step_table(steps),
        "",
        "## The shuffle rule and the CUDA kernels",
        "",
        "Since issue 25 the CUDA kernels hold no permutation: each voxel computes its own source in its block, "
        f"exactly in blocks of up to {EXACT_MAX_VOXELS} voxels and by a Feistel bijection in larger ones "
        f"([local-shuffle permutations]({SHUFFLE})), so they take blocks of every size; the previous release's kernels "
        "refused blocks of more than 1,024 voxels, the published rule's at 160x160x160 among them. No GPU was used: "
        f"this page holds no GPU timing. {emulated(pairs)}",
        "",
        *block_table(pairs),
        "",
        "The rows: [patches_cpu.csv](patches_cpu.csv).",
    ]
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    args = parse(__doc__.split("\n\n")[0], "patches_cpu.csv (bench_patches.py's rows)", argv)
    return write_or_check(args.out_dir / "patches_cpu.md", markdown(read_rows(args.csv)), args.check)


if __name__ == "__main__":
    sys.exit(main())
