"""The local shuffle and the pair's stages, rendered: bench_shuffle.py's CSV as docs/results/shuffle_cpu.md.

    python benchmarks/render_shuffle.py docs/results/shuffle_cpu.csv           # writes the .md
    python benchmarks/render_shuffle.py docs/results/shuffle_cpu.csv --check   # CI: 1 if .md is stale

Per thread count: each stage's ms per cube (its single op, applied to every sample), the pair's and the copy floor's,
new against the baseline with their ratio; then where the new pair's time goes, stage by stage beyond its copies.
Every figure is the CSV's or computed here from it.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # results_page beside this file (pytest's importlib mode adds none)
from render_patches import fig, voxels  # noqa: E402
from render_patches import read_rows as patches_rows  # noqa: E402
from results_page import parse, write_or_check  # noqa: E402

FIELDS = ("impl", "cube", "batch", "threads", "round", "stage", "ms_per_cube", "calls", "rate", "load", "resample",
          "version", "module", "machine", "cores", "date", "command")  # fmt: skip
STAGES = ("local_shuffle", "bezier_remap", "inpaint", "outpaint", "flip", "genesis_pair")  # the ops timed
NAMES = {"local_shuffle": "local shuffle", "bezier_remap": "Bézier map", "inpaint": "in-painting",
         "outpaint": "out-painting", "flip": "flip", "genesis_pair": "**pair** (`genesis_pair`)",
         "copy": "copy into an allocated batch (the floor)", "clone": "copy into a new batch"}  # fmt: skip
RENDER = "python benchmarks/render_shuffle.py docs/results/shuffle_cpu.csv"
INTS = ("batch", "threads", "round", "calls", "cores")
FLOATS = ("ms_per_cube", "rate", "load", "resample")


def read_rows(path) -> list[dict]:
    """The CSV's rows, numbers parsed (a blank cell: None)."""
    return patches_rows(path, INTS, FLOATS)


class Run:
    """The rows of one run, by (implementation, stage, cube, threads): each round's ms per cube."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.cubes = list(dict.fromkeys(r["cube"] for r in rows))
        self.threads = list(dict.fromkeys(r["threads"] for r in rows))
        self.baseline = any(r["impl"] == "baseline" for r in rows)
        self.rounds: dict[tuple, dict[int, float]] = {}
        for r in rows:
            self.rounds.setdefault((r["impl"], r["stage"], r["cube"], r["threads"]), {})[r["round"]] = r["ms_per_cube"]
        self.rate = {(r["stage"], r["cube"]): r["rate"] for r in rows if r["impl"] == "new" and r["rate"] is not None}

    def median(self, impl: str, stage: str, cube: str, threads: int) -> float:
        return statistics.median(self.rounds[impl, stage, cube, threads].values())

    def spread(self, impl: str, stage: str, cube: str, threads: int) -> str:
        """'1.23 (±4 %)': the median of the rounds, and half their range as a share of it."""
        ms = list(self.rounds[impl, stage, cube, threads].values())
        median = statistics.median(ms)
        return fig(median) if len(ms) == 1 else f"{fig(median)} (±{50 * (max(ms) - min(ms)) / median:.0f} %)"

    def ratios(self, stage: str, cube: str, threads: int) -> list[float]:
        """new / baseline in each round (the two measured one after the other)."""
        new, old = (self.rounds[impl, stage, cube, threads] for impl in ("new", "baseline"))
        return [new[k] / old[k] for k in sorted(new.keys() & old.keys())]

    def ratio(self, stage: str, cube: str, threads: int) -> str:
        """'0.52 (0.50–0.55)': the median of the rounds' ratios and their range."""
        r = self.ratios(stage, cube, threads)
        median = f"{statistics.median(r):.2f}"
        return median if len(r) == 1 else f"{median} ({min(r):.2f}–{max(r):.2f})"

    def beyond_copy(self, stage: str, cube: str, threads: int) -> float:
        """The new stage's part of a pair's cube: its op's time beyond a copy into a new batch, times the share of
        the pair's samples it deforms."""
        clone = self.median("new", "clone", cube, threads)
        return self.rate[stage, cube] * (self.median("new", stage, cube, threads) - clone)


def stage_table(run: Run, threads: int) -> list[str]:
    if run.baseline:
        head = "".join(f" {c}: new | baseline | new / baseline |" for c in run.cubes)
        rule = "---:|---:|---:|" * len(run.cubes)
    else:
        head, rule = "".join(f" {c} |" for c in run.cubes), "---:|" * len(run.cubes)
    lines = [f"| ms per cube |{head}", f"|---|{rule}"]
    for stage in (*STAGES, "copy", "clone"):
        cells = []
        for c in run.cubes:
            cells.append(run.spread("new", stage, c, threads))
            if run.baseline:
                cells += [run.spread("baseline", stage, c, threads), run.ratio(stage, c, threads)]
        lines.append(f"| {NAMES[stage]} | " + " | ".join(cells) + " |")
    return lines


def parts(run: Run, cube: str, threads: int) -> dict[str, float]:
    """The new pair's ms per cube by part: its two new arrays, then each stage beyond its copy, times its share of the
    pair's timed samples."""
    return {"arrays": 2 * run.median("new", "clone", cube, threads),
            **{s: run.beyond_copy(s, cube, threads) for s in STAGES if (s, cube) in run.rate}}  # fmt: skip


def parts_table(run: Run, threads: int) -> list[str]:
    head = "| ms per cube of the pair (share of it; × the stage's share of the samples) |"
    lines = [head + "".join(f" {c} |" for c in run.cubes), "|---|" + "---:|" * len(run.cubes)]
    pair = {c: run.median("new", "genesis_pair", c, threads) for c in run.cubes}
    by_cube = {c: parts(run, c, threads) for c in run.cubes}
    labels = {"arrays": "its two new arrays (2 copies into a new batch)"}
    labels.update({s: f"{NAMES[s]} beyond its copy" for s in STAGES if (s, run.cubes[0]) in run.rate})
    for part, label in labels.items():
        share = {c: "" if part == "arrays" else f"; × {run.rate[part, c]:.2f}" for c in run.cubes}
        cells = [f"{fig(by_cube[c][part])} ({100 * by_cube[c][part] / pair[c]:.0f} %{share[c]})" for c in run.cubes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sums = [f"{fig(sum(by_cube[c].values()))} ({100 * sum(by_cube[c].values()) / pair[c]:.0f} %)" for c in run.cubes]
    lines.append("| sum of the parts | " + " | ".join(sums) + " |")
    lines.append("| the pair, measured | " + " | ".join(fig(pair[c]) for c in run.cubes) + " |")
    return lines


def thread_words(threads: int) -> str:
    return f"{threads} thread" + ("s" if threads != 1 else "")


def verdict(run: Run, threads: int) -> str:
    """What the largest cube's figures say: the pair against the baseline and the floor, and its largest stage beyond
    the copies, the next speed step."""
    cube = max(run.cubes, key=voxels)
    pair = run.median("new", "genesis_pair", cube, threads)
    copy, clone = (run.median("new", s, cube, threads) for s in ("copy", "clone"))
    stages = sorted(((v, s) for s, v in parts(run, cube, threads).items() if s != "arrays"), reverse=True)
    (top, name), rest = stages[0], stages[1:]
    before = ""
    if run.baseline:
        before = (f" (the baseline's {fig(run.median('baseline', 'genesis_pair', cube, threads))}: new / baseline "
                  f"{run.ratio('genesis_pair', cube, threads)})")  # fmt: skip
    each = run.median("new", name, cube, threads) - clone
    then = f", then the {NAMES[rest[0][1]]} ({fig(rest[0][0])} ms)" if rest else ""
    return (
        f"At {cube} with {thread_words(threads)} the pair takes {fig(pair)} ms per cube{before}; a copy of the cube "
        f"takes {fig(copy)} ms into an allocated batch and {fig(clone)} ms into a new one, and the pair makes two new "
        f"arrays. Beyond the copies, the largest stage is the {NAMES[name]}: {fig(top)} ms per cube of the pair "
        f"({100 * top / pair:.0f} %; its op {fig(each)} ms per cube beyond the copy, × {run.rate[name, cube]:.2f})"
        f"{then}."
    )


def markdown(rows: list[dict]) -> str:
    run, first = Run(rows), rows[0]
    loads = [r["load"] for r in rows]
    rounds = max(r["round"] for r in rows) + 1
    batches = ", ".join(f"{c} in batches of {r['batch']}" + (f" (the CT resampled by {r['resample']:.2f})"
                        if r["resample"] > 1 else "") for c, r in {r["cube"]: r for r in rows}.items())  # fmt: skip
    new_version = next(r["version"] for r in rows if r["impl"] == "new")
    compared = "the working tree's `genesis_ext` alone (no baseline was given)"
    if run.baseline:
        old_version = next(r["version"] for r in rows if r["impl"] == "baseline")
        compared = (f"the working tree's `genesis_ext` {new_version} (*new*) against an earlier release's, "
                    f"`genesis_ext` {old_version} from the `--baseline` folder (*baseline*), alternating")  # fmt: skip
    lines = [
        "# The local shuffle and the pair's stages on the CPU",
        "",
        "<!-- Rendered by benchmarks/render_shuffle.py from shuffle_cpu.csv: edit the script, not this file. -->",
        "",
        f"Measured {first['date']} on {first['machine']}, a shared virtual machine of {first['cores']} logical cores "
        f"(no GPU): {compared}, each measurement in a fresh process, {rounds} rounds. Other jobs ran beside it (the "
        f"1-minute load average was {min(loads):.1f} to {max(loads):.1f} as the measurements started): compare "
        "within a run, and read the copies' new / baseline ratio (the same code on both sides) as the noise.",
        "",
        "```bash",
        first["command"],
        RENDER,
        "```",
        "",
        f"Float32 cubes of the bundled chest CT (`data/sample`), {batches}. Each figure is ms per cube: the mean "
        "time of a call over whole cycles of the same few deformations after an untimed call, divided by the batch; "
        "the median of the rounds (± half their range, as a share of the median). The new / baseline ratio is the "
        "median of the rounds' ratios (the two figures of a round were measured one after the other), with their "
        "range. The stages are the single ops, which deform every sample (the flip draws its own flips, as in the "
        "pair); the pair is `genesis_pair` at the published rates (`DeformConfig()`); the floor is a plain copy of "
        "the batch (`copy_` into a batch allocated once) and `clone` (a new batch, as every op returns).",
    ]
    for threads in run.threads:
        lines += ["", f"## {thread_words(threads)}", "", *stage_table(run, threads)]
    lines += [
        "",
        "## Where the new pair's time goes",
        "",
        "A single op's time beyond a copy into a new batch is its stage's own work; times the share of the pair's "
        "timed samples the stage deforms (from their gates: at a batch of 2 the share can be far from the published "
        "rate), it estimates the stage's part of a pair. The pair "
        "returns two new arrays (the deformed batch and the target), at least two copies. The sum of the parts "
        "against the measured pair says how much the fused pass saves over the ops one by one.",
    ]
    for threads in run.threads:
        lines += ["", f"### {thread_words(threads)}", "", *parts_table(run, threads), "", verdict(run, threads)]
    lines += ["", "The rows: [shuffle_cpu.csv](shuffle_cpu.csv)."]
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    args = parse(__doc__.split("\n\n")[0], "shuffle_cpu.csv (bench_shuffle.py's rows)", argv)
    return write_or_check(args.out_dir / "shuffle_cpu.md", markdown(read_rows(args.csv)), args.check)


if __name__ == "__main__":
    sys.exit(main())
