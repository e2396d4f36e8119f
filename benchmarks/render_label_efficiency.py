"""Label efficiency, rendered: the CSV of ``bench_label_efficiency.py`` as a markdown table and a plot.

    python benchmarks/render_label_efficiency.py docs/results/label_efficiency.csv           # the .md and .png
    python benchmarks/render_label_efficiency.py docs/results/label_efficiency.csv --check   # CI: 1 if .md is stale

Measured (per task and label budget): the final mean Dice over the task's classes of ``last.pt`` on the held-out
test part, mean ± sample standard deviation over the seeds, for training from scratch and from the pre-trained
weights; their difference paired by seed (pretrained - scratch, mean ± sd); and the steps each start needs to reach
Dice D, D = 0.9 x the best seed-mean final Dice of the task: the first logged step at which the seed-mean test Dice
curve reaches D ("—": never). Writes ``OUT_DIR/label_efficiency.md`` and ``OUT_DIR/label_efficiency.png`` (final
mean Dice against the labelled share of the training part, one panel per task, one line per start). ``--check``
writes nothing and exits 1 when the committed ``.md`` differs from what the CSV renders.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # results_page beside this file (pytest's importlib mode adds none)
from results_page import parse, write_or_check  # noqa: E402

FIELDS = ("task", "class", "budget_slabs", "budget_fraction", "start", "seed", "step", "dice", "hd95_mm", "final",
          "seconds", "width", "patch", "slab_depth", "steps", "lr_schedule", "batchnorm", "weights",
          "weights_sha256")  # fmt: skip
TYPES = {"budget_slabs": int, "seed": int, "step": int, "steps": int, "slab_depth": int, "budget_fraction": float,
         "dice": float, "hd95_mm": float, "seconds": float, "width": float, "final": lambda v: v == "True"}  # fmt: skip
SETTINGS = ("width", "patch", "slab_depth", "steps", "lr_schedule", "batchnorm", "weights", "weights_sha256")
STARTS = ("scratch", "pretrained")
TARGET_SHARE = 0.9  # D = this x the task's best seed-mean final Dice


def read_rows(path) -> list[dict]:
    """The CSV's rows with numbers and flags parsed."""
    with open(path, newline="") as f:
        return [{k: TYPES.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than two values)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def cell(values, sign: bool = False) -> str:
    if not len(values):
        return "—"
    mean, sd = mean_sd(values)
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return text if math.isnan(sd) else f"{text} ± {sd:.3f}"


def finals(rows: list[dict]) -> dict:
    """{(task, budget, start): {seed: final mean Dice}}."""
    out: dict = {}
    for r in rows:
        if r["final"] and r["class"] == "mean":
            out.setdefault((r["task"], r["budget_slabs"], r["start"]), {})[r["seed"]] = r["dice"]
    return out


def shares(rows: list[dict]) -> dict:
    """{(task, budget): the labelled share of the training part}."""
    return {(r["task"], r["budget_slabs"]): r["budget_fraction"] for r in rows}


def target(final: dict, task: str) -> float:
    """D of ``task``: TARGET_SHARE x its best seed-mean final Dice."""
    return TARGET_SHARE * max(np.mean(list(seeds.values())) for key, seeds in final.items() if key[0] == task)


def steps_to(rows: list[dict], key: tuple, goal: float) -> str:
    """The first logged step at which the seed-mean test Dice curve of ``key`` reaches ``goal``, or "—"."""
    curve: dict = {}
    for r in rows:
        if not r["final"] and r["class"] == "mean" and (r["task"], r["budget_slabs"], r["start"]) == key:
            curve.setdefault(r["step"], []).append(r["dice"])
    reached = [step for step, dice in sorted(curve.items()) if np.mean(dice) >= goal]
    return str(reached[0]) if reached else "—"


def both(final: dict, task: str, budget: int) -> tuple[list[float], list[float]]:
    """The final Dice of scratch and of pretrained over the seeds both starts ran, in seed order (a seed only one
    start ran is left out of every column, so the means and the paired difference describe the same runs)."""
    scratch, pretrained = (final.get((task, budget, s), {}) for s in STARTS)
    seeds = sorted(set(scratch) & set(pretrained))
    return [scratch[s] for s in seeds], [pretrained[s] for s in seeds]


def paired(final: dict, task: str, budget: int) -> list[float]:
    """pretrained − scratch final Dice of each seed both starts ran."""
    scratch, pretrained = both(final, task, budget)
    return [p - s for s, p in zip(scratch, pretrained)]


def interval(diffs: list[float]) -> tuple[float, float] | None:
    """The 95 % confidence interval of the mean paired difference (Student's t, seeds as samples); None under two."""
    from scipy.stats import t

    if len(diffs) < 2:
        return None
    mean, sd = mean_sd(diffs)
    half = float(t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return mean - half, mean + half


def verdict(diffs: list[float]) -> str:
    """Which start is better by the 95 % interval of the paired difference, or "no clear difference"."""
    ci = interval(diffs)
    if ci is None:
        return "—"
    return "pre-trained better" if ci[0] > 0 else "scratch better" if ci[1] < 0 else "no clear difference"


def table_row(rows: list[dict], final: dict, task: str, budget: int) -> str:
    scratch, pretrained = both(final, task, budget)
    diffs = paired(final, task, budget)
    ci = interval(diffs)
    share = shares(rows)[task, budget]
    goal = target(final, task)
    reach = [steps_to(rows, (task, budget, s), goal) for s in STARTS]
    cells = [task, str(budget), f"{share:.0%}", str(len(diffs)), cell(scratch), cell(pretrained),
             cell(diffs, sign=True), f"{ci[0]:+.3f} … {ci[1]:+.3f}" if ci else "—", verdict(diffs), f"{goal:.3f}",
             *reach]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def glance(rows: list[dict], final: dict) -> list[str]:
    """The compact table README.md shows (its rows must stay lines of this page: python_tests/test_docs.py)."""
    lines = ["| task | labelled | scratch | pre-trained | pre-trained − scratch (95 % interval) | verdict |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for task, budget in dict.fromkeys(k[:2] for k in final):
        diffs = paired(final, task, budget)
        ci = interval(diffs)
        means = [f"{np.mean(v):.2f}" if v else "—" for v in both(final, task, budget)]
        difference = f"{np.mean(diffs):+.2f} ({ci[0]:+.2f} … {ci[1]:+.2f})" if ci else "—"
        lines.append(f"| {task} | {shares(rows)[task, budget]:.0%} | {' | '.join(means)} | {difference} | "
                     f"{verdict(diffs)} |")  # fmt: skip
    return lines


def summary(final: dict) -> list[str]:
    """One line per verdict: the (task, budget) cells it holds."""
    cells: dict = {}
    for task, budget in dict.fromkeys(k[:2] for k in final):
        cells.setdefault(verdict(paired(final, task, budget)), []).append(f"{task} {budget}")
    order = ("pre-trained better", "scratch better", "no clear difference", "—")
    return [f"- {v}: {len(cells[v])} ({', '.join(cells[v])})" for v in order if v in cells]


def settings_line(rows: list[dict]) -> str:
    values = {k: sorted({str(r[k]) for r in rows} - {""}) for k in SETTINGS}  # scratch rows: no weights
    seeds = sorted({r["seed"] for r in rows})
    text = ", ".join(f"{k} {'/'.join(v)}" for k, v in values.items() if v)
    return f"Settings: {text}; seeds {', '.join(map(str, seeds))}."


def markdown(rows: list[dict]) -> str:
    """The table (see the module docstring), with the runs' settings above it."""
    lines = ["# Label efficiency: pre-trained vs scratch fine-tuning", ""]
    if not rows:
        return "\n".join([*lines, "No runs.", ""])
    final = finals(rows)
    done = {start: sum(r["final"] and r["class"] == "mean" and r["start"] == start for r in rows) for start in STARTS}
    lines += [
        settings_line(rows),
        f"Runs finished: {', '.join(f'{start} {n}' for start, n in done.items())}.",
        "",
        "Final mean Dice of last.pt on the test part (mean ± sd over the seeds both starts ran); difference paired "
        "by seed, with its 95 % confidence interval (Student's t over the seeds) and the verdict it gives (a start is "
        "better only where the interval excludes 0); steps to D: first logged step at which the seed-mean test Dice "
        "reaches D = 0.9 x the task's best final Dice. Made by `benchmarks/bench_label_efficiency.py` (settings "
        "above) and "
        "`benchmarks/render_label_efficiency.py`.",
        "",
        "| task | budget (slabs) | labelled share | seeds | scratch | pretrained | pretrained − scratch | "
        "95 % interval | verdict | D | steps to D: scratch | steps to D: pretrained |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for task in dict.fromkeys(k[0] for k in final):
        lines += [table_row(rows, final, task, budget) for budget in sorted({k[1] for k in final if k[0] == task})]
    lines += ["", "Verdicts over the task and budget (slabs) cells:", "", *summary(final)]
    lines += ["", "## At a glance", "", "Seed means; the README shows this table.", "", *glance(rows, final)]
    return "\n".join([*lines, ""])


def plot(rows: list[dict]) -> np.ndarray | None:
    """Final mean Dice (mean over the seeds both starts ran) against the labelled share, one panel per task; None
    without Pillow."""
    from genesis_ext.train.logs import curve_image

    final, share, panels = finals(rows), shares(rows), []
    for task in dict.fromkeys(k[0] for k in final):
        cells = [k[:2] for k in dict.fromkeys(k[:2] for k in final) if k[0] == task]
        means = {cell: both(final, *cell) for cell in cells}
        series = {start: sorted((100 * share[c], float(np.mean(means[c][i]))) for c in cells if means[c][i])
                  for i, start in enumerate(STARTS)}  # fmt: skip
        xlabel = "labelled share of the training part (%)"
        image = curve_image(series, {}, f"{task}: final mean Dice", xlabel=xlabel, ylabel="mean over seeds",
                            y_range=(0.0, 1.0))  # fmt: skip
        if image is None:
            return None
        panels.append(image)
    return np.concatenate(panels) if panels else None


def main(argv=None) -> int:
    from genesis_ext.train.logs import save_png

    args = parse(__doc__.split("\n\n")[0], "label_efficiency.csv of bench_label_efficiency.py", argv)
    rows = read_rows(args.csv)
    status = write_or_check(args.out_dir / "label_efficiency.md", markdown(rows), args.check)
    image = None if args.check else plot(rows)
    if image is not None:
        save_png(image, args.out_dir / "label_efficiency.png")
    return status


if __name__ == "__main__":
    sys.exit(main())


def test_table_numbers_come_from_the_csv(tmp_path):
    """A hand-written CSV of two seeds: the table's mean ± sd, paired difference, D and steps to D are the values
    computed by hand."""
    base = dict.fromkeys(FIELDS, "")
    base.update(task="t", budget_slabs=1, budget_fraction=0.5, hd95_mm="nan", seconds=1, width=0.25, patch="32x32x16",
                slab_depth=4, steps=20, lr_schedule="poly", batchnorm="running", weights="w.pt",
                weights_sha256="abc")  # fmt: skip
    dice = {  # (start, seed): (step 10, step 20 = final)
        ("scratch", 0): (0.5, 0.5),
        ("scratch", 1): (0.6, 0.7),
        ("pretrained", 0): (0.7, 0.6),
        ("pretrained", 1): (0.7, 0.9),
    }
    rows = [{**base, "class": "mean", "start": start, "seed": seed, "step": step, "dice": d, "final": final}
            for (start, seed), (d10, d20) in dice.items()
            for step, d, final in ((10, d10, False), (20, d20, False), (20, d20, True))]  # fmt: skip
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(read_rows(tmp_path / "t.csv")).splitlines()
    line = next(line for line in text if line.startswith("| t |"))
    # scratch 0.5, 0.7: mean 0.6, sd sqrt(0.02) = 0.1414; pretrained 0.6, 0.9: 0.75, sqrt(0.045) = 0.2121;
    # paired 0.1, 0.2: +0.15, sqrt(0.005) = 0.0707, 95 % interval 0.15 ± 12.706 x 0.0707 / sqrt(2) = 0.15 ± 0.6353
    # (t of 1 degree of freedom: 12.706), which holds 0: no clear difference; D = 0.9 x 0.75 = 0.675; seed-mean
    # curves: scratch 0.55 at 10, 0.6 at 20 (never); pretrained 0.7 at 10
    expected = ("| t | 1 | 50% | 2 | 0.600 ± 0.141 | 0.750 ± 0.212 | +0.150 ± 0.071 | -0.485 … +0.785 | "
                "no clear difference | 0.675 | — | 10 |")  # fmt: skip
    assert line == expected
    assert "- no clear difference: 1 (t 1)" in text
    assert text[-1] == "| t | 50% | 0.60 | 0.75 | +0.15 (-0.49 … +0.79) | no clear difference |"


def test_verdict_needs_an_interval_that_excludes_zero():
    # three seeds: t of 2 degrees of freedom is 4.303
    assert verdict([0.10, 0.11, 0.12]) == "pre-trained better"  # 0.11 ± 4.303 x 0.01 / sqrt(3) = 0.11 ± 0.0248
    assert verdict([-0.10, -0.11, -0.12]) == "scratch better"
    assert verdict([0.10, -0.05, 0.12]) == "no clear difference"
    assert verdict([0.3]) == "—"
