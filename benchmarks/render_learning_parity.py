"""Learning parity, rendered: the CSV of ``bench_learning.py`` (``OUT/learning.csv``) as a markdown page.

    python benchmarks/render_learning_parity.py docs/results/learning_parity.csv           # writes the .md
    python benchmarks/render_learning_parity.py docs/results/learning_parity.csv --check   # CI: 1 if .md is stale

Every number on the page is computed here from the CSV (one row per recipe and evaluation: step, validation MSE,
the MSE per deformation branch) and from its baselines beside it (``<csv stem>_baselines.json``: the validation
pairs' identity and constant-mean MSE, overall and per branch, and the pairs per branch; ``bench_learning.py``
writes both):
the validation MSE at fixed steps with its ratio to the constant-mean baseline, the best and its step; the mean over
windows of ``WINDOW`` steps and the settling rule (the last window within ``SETTLED`` of the one before, as
``bench_learning.settling``); the comparisons of the two recipes; the final MSE per branch over the branch's own
constant-mean baseline. Writes ``OUT_DIR/learning_parity.md`` (the plots beside it are ``bench_learning.py``'s
``learning.png`` and ``branches_<recipe>.png`` of the same run). ``--check`` writes nothing and exits 1 with a diff
when the committed ``.md`` differs from what the CSV renders.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # results_page beside this file (pytest's importlib mode adds none)
from results_page import parse, write_or_check  # noqa: E402

RECIPES = ("official", "default")
BRANCHES = ("outpaint", "inpaint", "shuffle", "bezier", "none")  # genesis_ext.train.pretraining.BRANCHES
BRANCH_NAMES = {"outpaint": "out-painted", "inpaint": "in-painted", "shuffle": "shuffled", "bezier": "Bézier-only",
                "none": "flips only"}  # fmt: skip
STEPS = (500, 1000, 2000, 4000, 8000, 12000, 16000)  # the columns of the first table
WINDOW = 1000  # steps per window (bench_learning --window)
SETTLED = 0.02  # bench_learning.SETTLED: a curve has settled when its last window is within 2 % of the one before
LATE = 4000  # the last steps compared on their own

COMMAND = ("python benchmarks/bench_learning.py --steps 16000 --eval-every 100 --width 0.25 --cube 32 32 16 "
           "--threads 1 --jobs 2 --out learning_out")  # fmt: skip


def read_rows(path) -> dict:
    """{recipe: its rows in step order}, numbers parsed."""
    runs: dict = {recipe: [] for recipe in RECIPES}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            runs.setdefault(row["recipe"], []).append(
                {k: (row[k] if k == "recipe" else int(row[k]) if k == "step" else float(row[k])) for k in row}
            )
    return {recipe: sorted(rows, key=lambda r: r["step"]) for recipe, rows in runs.items()}


def read_baselines(csv_path) -> dict:
    """The validation pairs' baselines beside the CSV: ``<stem>_baselines.json``."""
    path = Path(csv_path)
    return json.loads(path.with_name(f"{path.stem}_baselines.json").read_text())


def window_means(rows: list, per: int) -> list:
    """(last step, mean validation MSE) of ``rows`` cut into consecutive windows of ``per`` evaluations, the last
    window ending at the last row (the first may be shorter): ``bench_learning.window_means``."""
    per = max(1, per)
    chunks = [rows[max(0, end - per) : end] for end in range(len(rows), 0, -per)][::-1]
    return [(chunk[-1]["step"], sum(r["val_loss"] for r in chunk) / len(chunk)) for chunk in chunks]


def scatter(rows: list) -> float:
    """The relative scatter of one evaluation: the standard deviation of its departure from the mean of its two
    neighbours, relative to it, over sqrt(1.5) (the departure of independent noise e is e - (e' + e'')/2)."""
    v = [r["val_loss"] for r in rows]
    d = [(v[i] - (v[i - 1] + v[i + 1]) / 2) / v[i] for i in range(1, len(v) - 1)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((x - mean) ** 2 for x in d) / len(d) / 1.5)


def first_step(rows: list, level: float) -> int | None:
    """The first step at which the validation MSE is at or below ``level``."""
    return next((r["step"] for r in rows if r["val_loss"] <= level), None)


def change(new: float, old: float) -> str:
    return f"{(new - old) / old:+.1%}".replace("%", " %")


def pct(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}%}".replace("%", " %")


def mse(value: float, base: dict) -> str:
    """An MSE and its ratio to the constant-mean baseline."""
    return f"{value:.5f} ({value / base['mean']:.2f})"


def at_step(rows: list) -> dict:
    return {r["step"]: r for r in rows}


def settings(runs: dict, base: dict) -> list:
    steps = {recipe: rows[-1]["step"] for recipe, rows in runs.items()}
    every = runs["official"][1]["step"] - runs["official"][0]["step"]
    lr = {recipe: sorted({r["lr"] for r in rows}) for recipe, rows in runs.items()}
    constant = all(len(v) == 1 for v in lr.values())
    pairs = sum(base["pairs"].values())
    return [
        "`benchmarks/bench_learning.py` trains two pre-training recipes side by side: `official`, the published recipe "
        f"(SGD lr {lr['official'][0]}, momentum 0.9, batch 6, the published deformation probabilities), and "
        f"`default`, ours (Adam lr {lr['default'][0]}, otherwise the same). Both use the same 680 lung cubes of "
        "32x32x16 cut from the chest CT of the optional real data (Lung-PET-CT-Dx and POPI, the published lung filter; "
        f"see [data](../data.md)), the same initial weights, the same {pairs} validation pairs (68 held-out cubes x 4 "
        f"deformations), the same {steps['official']:,} steps and a U-Net of width 0.25, evaluated every {every} "
        f"steps. The learning rate stays {'constant' if constant else 'as the CSV gives it'}: the published schedule "
        "halves it every 40 epochs of the published training set, which holds over ten thousand cubes (up to 32 per "
        "LUNA16 scan), roughly 100,000 steps at batch 6, far beyond this run.",
        "",
        "Measured 2026-12-05 on the 2-core CPU, one thread per recipe with both recipes at once (about 0.45 s per "
        "step; 2 hours for both). One seed, one run each. A run resumed with more `--steps` continues from its last "
        "checkpoint and reproduces the uninterrupted run exactly (tested).",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        f"Baselines on the validation pairs: returning the deformed input (identity) {base['identity']:.3f}; "
        f"returning the targets' mean (constant mean) {base['mean']:.5f}. Ratios below are to the constant-mean "
        "baseline.",
    ]


def table(runs: dict, base: dict) -> list:
    head = [f"{s:,}" + (" (final)" if s == max(STEPS) else "") for s in STEPS]
    lines = [
        "| validation MSE (ratio to the constant-mean baseline) | " + " | ".join(head) + " | best |",
        "|---|" + "---:|" * (len(STEPS) + 1),
    ]
    for recipe, rows in runs.items():
        by = at_step(rows)
        best = min(rows, key=lambda r: r["val_loss"])
        cells = [mse(by[s]["val_loss"], base) if s in by else "—" for s in STEPS]
        cells.append(f"{mse(best['val_loss'], base)}, step {best['step']:,}")
        name = "`official` (the published recipe)" if recipe == "official" else f"`{recipe}` (ours)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def windows(runs: dict, per: int) -> list:
    means = {recipe: window_means(rows, per) for recipe, rows in runs.items()}
    lines = [
        f"| mean validation MSE over the {WINDOW:,} steps ending at | "
        + " | ".join(f"`{recipe}` | change" for recipe in runs)
        + " |",
        "|---:|" + "---:|---:|" * len(runs),
    ]
    for i, (step, _) in enumerate(means["official"]):
        cells = []
        for recipe in runs:
            value = means[recipe][i][1]
            cells += [f"{value:.5f}", change(value, means[recipe][i - 1][1]) if i else ""]
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return lines


def settling_lines(runs: dict, per: int) -> list:
    means = {recipe: window_means(rows, per) for recipe, rows in runs.items()}
    noise = {recipe: scatter(rows) for recipe, rows in runs.items()}
    diff = {recipe: noise[recipe] * math.sqrt(2 / per) for recipe in runs}
    last = {recipe: (m[-2][1], m[-1][1]) for recipe, m in means.items()}
    verdict = {r: "settled" if abs(b - a) / a <= SETTLED else "still moving" for r, (a, b) in last.items()}
    early = [(m[i][1] - m[i - 1][1]) / m[i - 1][1] for m in means.values() for i, (s, _) in enumerate(m)
             if 2000 < s <= 4000]  # fmt: skip
    n_late = LATE // WINDOW
    late = {r: (m[-1][1] - m[-1 - n_late][1]) / m[-1 - n_late][1] for r, m in means.items()}
    return [
        f"One evaluation scatters by {' and '.join(pct(noise[r]) for r in runs)} (`{'`, `'.join(runs)}`) around its "
        "neighbours (the standard deviation of its departure from the mean of the two neighbours, relative to it, over "
        f"sqrt(1.5)), so the script compares means over windows of {WINDOW:,} steps ({per} evaluations each); the "
        f"difference of two window means then scatters by about {' and '.join(pct(diff[r]) for r in runs)}. A curve "
        f"is settled when its last window is within {pct(SETTLED, 0)} of the one before.",
        "",
        *windows(runs, per),
        "",
        "- The last windows change by "
        + " and ".join(f"{change(b, a)} (`{r}`)" for r, (a, b) in last.items())
        + ": "
        + (
            f"both curves are {verdict['official']} by that rule."
            if len(set(verdict.values())) == 1
            else "; ".join(f"`{r}` {v}" for r, v in verdict.items()) + "."
        ),
        f"- Between steps 2,000 and 4,000 the windows fell by {pct(-max(early))} to {pct(-min(early))} per "
        f"{WINDOW:,} steps.",
        f"- Over the last {LATE:,} steps the window mean fell by "
        + " and ".join(f"{pct(-late[r])} (`{r}`)" for r in runs)
        + ", "
        + " and ".join(pct(1 - (1 + late[r]) ** (1 / n_late)) for r in runs)
        + f" per {WINDOW:,} steps on average: both still creep down at this constant learning rate.",
    ]


def comparison(runs: dict, base: dict, per: int) -> list:
    pub, ours = runs["official"], runs["default"]
    pairs = list(zip(pub, ours))
    assert all(p["step"] == o["step"] for p, o in pairs), "the recipes were evaluated at different steps"
    lower = sum(o["val_loss"] < p["val_loss"] for p, o in pairs)
    n_late = LATE // (pub[1]["step"] - pub[0]["step"])
    lower_late = sum(o["val_loss"] < p["val_loss"] for p, o in pairs[-n_late:])
    final, best = pub[-1]["val_loss"], min(pub, key=lambda r: r["val_loss"])
    pub_final_at, ours_final_at = first_step(pub, final), first_step(ours, final)
    ours_best_at = first_step(ours, best["val_loss"])
    w_pub, w_ours = window_means(pub, per)[-1][1], window_means(ours, per)[-1][1]
    at = {s: (at_step(pub)[s]["val_loss"], at_step(ours)[s]["val_loss"]) for s in (LATE, pub[-1]["step"])}
    ratios = {r: rows[-1]["val_loss"] / base["mean"] for r, rows in runs.items()}
    ends = (
        f"Both recipes end at {ratios['official']:.2f}x the constant-mean baseline."
        if f"{ratios['official']:.2f}" == f"{ratios['default']:.2f}"
        else f"The published recipe ends at {ratios['official']:.2f}x the constant-mean baseline, ours at "
        f"{ratios['default']:.2f}x."
    )

    def reached(step):
        return f"step {step:,}" if step is not None else "no step"

    return [
        ends,
        "",
        f"- Ours is lower at {lower} of the {len(pairs)} evaluations.",
        f"- Ours reaches the published recipe's final loss ({final:.5f}) at {reached(ours_final_at)}; the published "
        f"recipe first reaches it at {reached(pub_final_at)}"
        + (f", {pub_final_at - ours_final_at:,} steps later." if None not in (pub_final_at, ours_final_at) else "."),
        f"- Ours reaches the published recipe's best ({best['val_loss']:.5f}) at {reached(ours_best_at)}, against "
        f"step {best['step']:,}.",
        f"- Over the last {LATE:,} steps ours is lower at {lower_late} of those {n_late} evaluations, and its last "
        f"window is {pct((w_pub - w_ours) / w_pub)} lower.",
        "- At "
        + " and at ".join(f"{s:,} steps ours is {pct(abs(o - p) / p)} {'lower' if o < p else 'higher'}"
                          for s, (p, o) in at.items())
        + " than the published recipe: Adam's advantage is speed early on, not a lower floor.",
    ]  # fmt: skip


def branches(runs: dict, base: dict) -> list:
    pairs = base["pairs"]
    total = sum(pairs.values())
    lines = [
        "Per deformation branch, the final validation MSE over that branch's own constant-mean baseline (the "
        f"validation pairs split {', '.join(f'{pairs[b]} {BRANCH_NAMES[b]}' for b in BRANCHES)}):",
        "",
        "| final MSE / the branch's mean baseline | " + " | ".join(BRANCH_NAMES[b] for b in BRANCHES) + " |",
        "|---|" + "---:|" * len(BRANCHES),
    ]
    for recipe, rows in runs.items():
        last = rows[-1]
        lines.append(
            f"| `{recipe}` | " + " | ".join(f"{last[f'val_{b}'] / base[f'mean_{b}']:.2f}" for b in BRANCHES) + " |"
        )
    return [
        *lines,
        "",
        f"Out-painting, {pct(pairs['outpaint'] / total, 0)} of the pairs, is where both stay nearest the baseline: "
        "about two thirds of the cube is noise and cannot be restored from the window. Every branch where the anatomy "
        f"is still in the input is learnt. The {pairs['none']} flips-only pairs are too few to rank the recipes on.",
    ]


def markdown(runs: dict, base: dict) -> str:
    """The page (see the module docstring)."""
    per = WINDOW // (runs["official"][1]["step"] - runs["official"][0]["step"])
    lines = [
        "# Learning parity: the published recipe against ours",
        "",
        "<!-- Rendered by benchmarks/render_learning_parity.py from learning_parity.csv: edit the script, not this "
        "file. -->",
        "",
        *settings(runs, base),
        "",
        "## Validation MSE",
        "",
        *table(runs, base),
        "",
        "![validation MSE of both recipes against the steps](learning_parity.png)",
        "",
        "## Both curves settle",
        "",
        *settling_lines(runs, per),
        "",
        "## Ours against the published recipe",
        "",
        *comparison(runs, base, per),
        "",
        "## Per deformation branch",
        "",
        *branches(runs, base),
        "",
        "Per-branch curves: [official](learning_branches_official.png), [default](learning_branches_default.png); "
        "the rows: [learning_parity.csv](learning_parity.csv); the baselines: "
        "[learning_parity_baselines.json](learning_parity_baselines.json).",
    ]
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    args = parse(__doc__.split("\n\n")[0], "learning_parity.csv (bench_learning.py's learning.csv)", argv)
    text = markdown(read_rows(args.csv), read_baselines(args.csv))
    return write_or_check(args.out_dir / "learning_parity.md", text, args.check)


if __name__ == "__main__":
    sys.exit(main())
