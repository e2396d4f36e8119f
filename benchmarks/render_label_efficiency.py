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

import argparse
import csv
import difflib
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
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


def table_row(rows: list[dict], final: dict, task: str, budget: int) -> str:
    scratch, pretrained = (final.get((task, budget, s), {}) for s in STARTS)
    paired = [pretrained[s] - scratch[s] for s in sorted(set(scratch) & set(pretrained))]
    share = shares(rows)[task, budget]
    goal = target(final, task)
    reach = [steps_to(rows, (task, budget, s), goal) for s in STARTS]
    cells = [task, str(budget), f"{share:.0%}", cell(list(scratch.values())), cell(list(pretrained.values())),
             cell(paired, sign=True), f"{goal:.3f}", *reach]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


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
        "Final mean Dice of last.pt on the test part (mean ± sd over seeds); difference paired by seed; steps to D: "
        "first logged step at which the seed-mean test Dice reaches D = 0.9 x the task's best final Dice. Made by "
        "`benchmarks/bench_label_efficiency.py` (settings above) and `benchmarks/render_label_efficiency.py`.",
        "",
        "| task | budget (slabs) | labelled share | scratch | pretrained | pretrained − scratch | D | "
        "steps to D: scratch | steps to D: pretrained |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in dict.fromkeys(k[0] for k in final):
        lines += [table_row(rows, final, task, budget) for budget in sorted({k[1] for k in final if k[0] == task})]
    return "\n".join([*lines, ""])


def plot(rows: list[dict]) -> np.ndarray | None:
    """Final mean Dice (seed mean) against the labelled share, one panel per task; None without Pillow."""
    from genesis_ext.train.logs import curve_image

    final, share, panels = finals(rows), shares(rows), []
    for task in dict.fromkeys(k[0] for k in final):
        series = {
            start: sorted((100 * share[k[:2]], float(np.mean(list(seeds.values()))))
                          for k, seeds in final.items() if (k[0], k[2]) == (task, start))
            for start in STARTS
        }  # fmt: skip
        xlabel = "labelled share of the training part (%)"
        image = curve_image(series, {}, f"{task}: final mean Dice", xlabel=xlabel, ylabel="mean over seeds",
                            y_range=(0.0, 1.0))  # fmt: skip
        if image is None:
            return None
        panels.append(image)
    return np.concatenate(panels) if panels else None


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="label_efficiency.csv of bench_label_efficiency.py")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if OUT_DIR's .md is not the CSV's")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from genesis_ext.train.logs import save_png

    args = parse(argv)
    rows = read_rows(args.csv)
    text, md = markdown(rows), args.out_dir / "label_efficiency.md"
    if args.check:
        old = md.read_text() if md.exists() else ""
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(md), "rendered"))
        return int(old != text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    image = plot(rows)
    if image is not None:
        save_png(image, args.out_dir / "label_efficiency.png")
    print(text)
    return 0


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
    line = markdown(read_rows(tmp_path / "t.csv")).splitlines()[-1]
    # scratch 0.5, 0.7: mean 0.6, sd sqrt(0.02) = 0.1414; pretrained 0.6, 0.9: 0.75, sqrt(0.045) = 0.2121;
    # paired 0.1, 0.2: +0.15, sqrt(0.005) = 0.0707; D = 0.9 x 0.75 = 0.675; seed-mean curves: scratch 0.55 at 10,
    # 0.6 at 20 (never); pretrained 0.7 at 10
    expected = "| t | 1 | 50% | 0.600 ± 0.141 | 0.750 ± 0.212 | +0.150 ± 0.071 | 0.675 | — | 10 |"
    assert line == expected
