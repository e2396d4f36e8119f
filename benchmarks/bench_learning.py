"""Learning parity: the published recipe and our default preset, trained side by side on the same cubes from the same
initial weights for the same number of steps, scored on the same validation pairs.

    python benchmarks/bench_learning.py --steps 2000 --width 0.25 --cube 32 32 16 --out learning_out
    python benchmarks/bench_learning.py --steps 16000 --eval-every 100 --threads 1 --jobs 2 --out learning_out

The second is the run of docs/results/learning_parity.md: both recipes at once, one thread each, each logging to
``OUT/<recipe>.log``. Run again with more ``--steps`` to continue both runs from their last checkpoints (the
continuation equals an uninterrupted run).

(A) ``official``: SGD lr 1.0, momentum 0.9, batch 6, the published deformation probabilities; (B) ``default``: Adam
lr 1e-3, batch 6, the same deformations (``genesis_ext.train.pretraining.RECIPES``). Cubes are cut from the chest CT
of ../shared/data (popi-4dct and lung-pet-ct-dx, the published lung filter) into ``OUT/cubes``; both runs hold out
the same fixed, seeded share of them and deform it with the same validation seed, and start from the same seed.
Writes ``OUT/official/`` and ``OUT/default/`` (each a pre-training run: ``metrics.csv``, ``curve.png``, checkpoints),
``OUT/learning.csv`` (one row per recipe and evaluation: step, validation MSE, per painting branch),
``OUT/learning_baselines.json`` (the validation pairs' baselines and pairs per branch),
``OUT/learning.png`` (validation MSE of both against the steps, with the identity and constant-mean baselines),
``OUT/branches_<recipe>.png`` (per deformation branch: out-painted, in-painted, shuffled, Bézier-only, none, each over
its own constant-mean baseline), and prints a summary: the final and best MSE, per branch, the mean per
window of ``--window`` steps, and whether each curve has settled (its last window within 2 % of the one before).
``benchmarks/render_learning_parity.py`` renders the page from the CSV and the JSON. A speed or loss threshold is not
this script's business: it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from genesis_ext.data import ExtractSettings, OfficialLung, run_extract
from genesis_ext.train import PretrainConfig, pretrain, read_csv
from genesis_ext.train.logs import curve_image, save_png
from genesis_ext.train.pretraining import BRANCHES

sys.path.insert(0, str(Path(__file__).parent))  # the renderer beside this file (pytest's importlib mode adds no folder)
from render_learning_parity import SETTLED, window_means  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO.parent / "shared" / "data" / name for name in ("popi-4dct", "lung-pet-ct-dx")]
RECIPES = ("official", "default")
FIELDS = ("recipe", "step", "val_loss", *(f"val_{b}" for b in BRANCHES), "train_loss", "lr")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps of each recipe (default 2000)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations (default 50)")
    p.add_argument("--width", type=float, default=0.25, help="U-Net channel multiplier (default 0.25)")
    p.add_argument("--cube", type=int, nargs=3, default=[32, 32, 16], metavar=("X", "Y", "Z"))
    p.add_argument("--per-volume", type=int, default=340, help="cubes cut per volume, at most (default 340)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, split and batch order (default 0)")
    p.add_argument("--deform-seed", type=int, default=1, help="seed of the training deformations (default 1)")
    p.add_argument("--val-repeats", type=int, default=4, help="validation deformations per held-out cube")
    p.add_argument("--threads", type=int, default=None, help="threads per recipe")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="recipes trained at once, each in its own process logging to OUT/<recipe>.log",
    )
    p.add_argument("--data", nargs="+", type=Path, default=SOURCES, help="CT volumes or folders")
    p.add_argument("--out", type=Path, default=Path("learning_out"))
    p.add_argument("--window", type=int, default=1000, help="steps per window of the settling check (default 1000)")
    return p.parse_args(argv)


def cubes(args) -> Path:
    store = args.out / "cubes"
    settings = ExtractSettings(cube=tuple(args.cube), count=args.per_volume, filter=OfficialLung(), seed=args.seed)
    summary = run_extract([str(d) for d in args.data], str(store), settings, progress=False)
    print(f"cubes: {summary.cubes} new from {summary.written} volumes (store {store})", file=sys.stderr)
    return store


def train(recipe: str, store: Path, args) -> Path:
    run = args.out / recipe
    cfg = PretrainConfig(
        data=[str(store)],
        out=str(run),
        preset=recipe,
        width=args.width,
        epochs=max(1, args.steps // args.eval_every),
        steps_per_epoch=args.eval_every,
        lr_step_epochs=10**6,  # the published schedule halves the lr every 40 epochs of the full data: not reached
        patience=10**6,
        val_repeats=args.val_repeats,
        seed=args.seed,
        deform_seed=args.deform_seed,
        threads=args.threads,
        preview_every=0,
        tensorboard=False,
        progress=False,
        resume=(run / "checkpoints" / "last.pt").exists(),
    )
    pretrain(cfg)
    return run


def train_logged(recipe: str, store: Path, args) -> Path:
    """``train`` with its output appended to OUT/<recipe>.log: the lines of parallel runs do not interleave."""
    with open(args.out / f"{recipe}.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return train(recipe, store, args)


def train_all(store: Path, args) -> list:
    """Train every recipe: one after the other, or ``--jobs`` at once in spawned processes (the
    published run: one thread each on the 2-core machine)."""
    if args.jobs <= 1:
        return [train(recipe, store, args) for recipe in RECIPES]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(args.jobs, len(RECIPES)), mp_context=spawn) as pool:
        return list(pool.map(functools.partial(train_logged, store=store, args=args), RECIPES))


def main(argv=None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    store = cubes(args)
    runs, base = {}, None
    for recipe, run in zip(RECIPES, train_all(store, args)):
        runs[recipe] = [
            {"recipe": recipe, **{k: r[k] for k in FIELDS if k in r}} for r in read_csv(run / "metrics.csv")
        ]
        base = json.loads((run / "baselines.json").read_text())  # the same validation pairs in both runs
    with open(args.out / "learning.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(r for rows in runs.values() for r in rows)
    (args.out / "learning_baselines.json").write_text(json.dumps(base, indent=2))  # beside the CSV, for the renderer
    series = {f"{recipe}: validation": [(r["step"], r["val_loss"]) for r in rows] for recipe, rows in runs.items()}
    image = curve_image(series, {"identity": base["identity"], "constant mean": base["mean"]}, "learning parity")
    if image is not None:
        save_png(image, args.out / "learning.png")
    for recipe, rows in runs.items():
        branch_plot(rows, base, recipe, args.out / f"branches_{recipe}.png")
    report(runs, base, args)
    return 0


def report(runs: dict, base: dict, args) -> None:
    """Print the tables from ``runs`` (recipe -> its rows): final and best MSE, the final MSE per branch, the
    window means and the settling check."""
    per = args.window // args.eval_every
    print(
        f"| recipe | steps | final val MSE | best val MSE | best / mean baseline |  (identity {base['identity']:.4f}, "
        f"mean {base['mean']:.4f})"
    )
    for recipe, mine in runs.items():
        best = min(r["val_loss"] for r in mine)
        print(
            f"| {recipe} | {mine[-1]['step']} | {mine[-1]['val_loss']:.4f} | {best:.4f} | {best / base['mean']:.3f} |"
        )
    print("final validation MSE per branch / that branch's constant-mean baseline (pairs):")
    for recipe, mine in runs.items():
        last = mine[-1]
        cells = [
            f"{b} {last[f'val_{b}'] / base[f'mean_{b}']:.3f}" for b in BRANCHES if last.get(f"val_{b}") is not None
        ]
        print(f"  {recipe}: " + ", ".join(cells))
    print(f"mean validation MSE per window of {args.window} steps (ending at the step given):")
    for recipe, mine in runs.items():
        print(f"  {recipe}: " + ", ".join(f"{step}: {mean:.5f}" for step, mean in window_means(mine, per)))
    print(f"settling: mean validation MSE over the last {args.window} steps against the {args.window} before")
    for recipe, mine in runs.items():
        check = settling(mine, per)
        if check is None:
            print(f"  {recipe}: too few evaluations")
            continue
        before, last, change = check
        verdict = "settled" if abs(change) <= SETTLED else "still moving"
        print(f"  {recipe}: {before:.5f} -> {last:.5f} ({change:+.1%}): {verdict}")


def settling(rows: list, per: int) -> tuple[float, float, float] | None:
    """Mean validation MSE over the last ``per`` evaluations and the ``per`` before, and the relative change.

    A curve has settled when the change is within ``SETTLED`` (2 %). At 272 validation pairs one evaluation scatters
    by about 3 % around its neighbours, so the difference of two 10-evaluation means by about 1.3 %: 2 % is the smallest
    change that noise rarely makes. Runs of fewer evaluations use half of them per window; ``None`` under two.
    """
    if len(rows) < 2:
        return None
    (_, before), (_, last) = window_means(rows, min(per, len(rows) // 2))[-2:]
    return before, last, (last - before) / before


def branch_plot(rows: list, base: dict, recipe: str, path: Path) -> None:
    """One recipe's validation MSE per deformation branch over the branch's constant-mean baseline (1: the mean)."""
    series = {
        b: [(r["step"], r[f"val_{b}"] / base[f"mean_{b}"]) for r in rows]
        for b in BRANCHES
        if base.get(f"mean_{b}") and all(r.get(f"val_{b}") is not None for r in rows)
    }
    title = f"{recipe}: validation MSE per branch / the branch's constant-mean baseline"
    image = curve_image(series, {"constant mean": 1.0}, title, ylabel="ratio")
    if image is not None:
        save_png(image, path)


if __name__ == "__main__":
    sys.exit(main())


TINY = ["--steps", "4", "--eval-every", "2", "--width", "0.125", "--cube", "16", "16", "16", "--per-volume", "10"]


def test_smoke(tmp_path):
    """CI: both recipes for 4 steps on the bundled CT at a tiny size, one after the other and then in two processes:
    the outputs exist and the parallel run's rows are the sequential run's (no threshold on the loss)."""
    data = ["--threads", "1", "--data", str(REPO / "data" / "sample")]
    assert main([*TINY, *data, "--out", str(tmp_path / "seq")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "seq" / "learning.csv")))
    assert [r["recipe"] for r in rows] == ["official"] * 2 + ["default"] * 2
    assert (tmp_path / "seq" / "learning.png").stat().st_size > 1000
    assert main([*TINY, *data, "--jobs", "2", "--out", str(tmp_path / "jobs")]) == 0
    assert list(csv.DictReader(open(tmp_path / "jobs" / "learning.csv"))) == rows
    assert "stopped (epochs) after epoch 2" in (tmp_path / "jobs" / "default.log").read_text()


def test_settling_tells_a_flat_curve_from_a_falling_one():
    import pytest

    flat = [{"step": 100 * i, "val_loss": 0.007 * (1 + 0.02 * (-1) ** i)} for i in range(1, 41)]
    falling = [{"step": 100 * i, "val_loss": 0.01 - 0.0001 * i} for i in range(1, 41)]
    assert abs(settling(flat, 10)[2]) <= SETTLED
    assert settling(falling, 10)[2] < -SETTLED
    assert settling(falling[:3], 10)[:2] == (falling[1]["val_loss"], falling[2]["val_loss"])
    assert settling(falling[:1], 10) is None
    means = window_means(falling, 15)
    assert [step for step, _ in means] == [1000, 2500, 4000]
    assert [mean for _, mean in means] == pytest.approx([0.01 - 0.0001 * 5.5, 0.01 - 0.0001 * 18, 0.01 - 0.0001 * 33])
