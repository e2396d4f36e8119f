"""Label efficiency: the Models Genesis promise that fine-tuning from pre-trained weights reaches a better target-task
result with fewer labels than training from scratch, measured on real CT with the package's own user path.

    python benchmarks/bench_label_efficiency.py --weights PRETRAINED.pt --out label_efficiency_out --jobs 2
    python benchmarks/render_label_efficiency.py label_efficiency_out/label_efficiency.csv

The first writes ``OUT/label_efficiency.csv`` (and the runs under ``OUT/runs``); the second renders it as
``docs/results/label_efficiency.md`` and ``.png``.

Tasks (``tasks``; the data folder of ``--data``): ``liver`` and ``abdomen`` (liver, spleen, kidneys, stomach: one
softmax task, Dice + cross-entropy) on the abdominal CT at 3 mm; ``aorta`` and ``pulmonary_artery`` on the chest CT
crops at 1.5 mm (binary tasks: the default loss for one class). Each task's volume is first cropped along z to the
slices that hold its classes (a labelled slab without the structure would teach nothing), then cut along one axis into a
training part and a disjoint test part, both written as NIfTI under ``OUT/data/<task>`` (``images/`` and ``labels/``: a
label map per case for one class, a folder of masks per case for several). The abdominal tasks are cut along z at the
slice that maximises the smallest share, over the task's classes, of a class's voxels on either side, each part at least
a patch deep (a thinner test part would be predicted through padding never seen in training: the liver's best-balanced
cut left 10 slices). The aorta is cut head / feet in the middle: both parts hold the descending aorta beside the spine
(a left / right cut leaves the ascending aorta on one side and the descending on the other). The pulmonary artery lies
in one z range, so it is cut left / right in the middle, each side holding one of its branches.

Budgets: axial slabs of ``--slab-depth`` slices of the training part (``FinetuneConfig.label_budget``, ``budget_unit``
"slabs": sparse labels; the slices of the other slabs stay in the image as context, out of the loss); ``--budgets``
counts or shares of the part's slabs (counts a task does not have are dropped). For every task, budget,
seed and start (``scratch``; ``pretrained``: ``--weights``, whose U-Net width both starts use) one run of ``--steps``
Adam steps (lr 1e-3 with ``--lr-schedule``, default poly, batch 4, ``--patch``). No model selection: the test part is
passed as validation data only to log the Dice curve every ``--eval-every`` steps (one epoch), and the final score is
``last.pt`` through the user path: ``genesis_ext.inference.predict`` on the test image, then
``genesis_ext.evaluation.evaluate_predictions`` against the test label map: Dice and HD95 per class and their mean. The
final Dice must equal the last logged one (the same sliding window); a warning says when it does not.

``OUT/label_efficiency.csv``: one row per run, class (and ``mean``) and evaluation step; the final rows carry HD95 and
the whole run's seconds (training, predict, evaluate), the curve rows the seconds up to their evaluation. A run whose
rows are in the CSV is skipped, so an interrupted benchmark continues where it stopped; the CSV is rewritten whole
(temporary file, then rename) after every run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STARTS = ("scratch", "pretrained")
TASK_NAMES = ("liver", "abdomen", "aorta", "pulmonary_artery")
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")
BATCH = 4
LR = 1e-3


def _render_module():
    """render_label_efficiency.py beside this file (imported by path: pytest's importlib mode adds no folder)."""
    spec = importlib.util.spec_from_file_location("render_label_efficiency", Path(__file__).with_name(
        "render_label_efficiency.py"))  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()
test_render_numbers = render.test_table_numbers_come_from_the_csv  # collected here: conftest collects bench_*.py


@dataclass(frozen=True)
class Task:
    """A CT volume, one binary mask per class, the axis of the cut and how it is placed (``balanced``: the
    largest smallest class share on either side; else the middle)."""

    name: str
    image: Path
    masks: dict
    axis: int
    balanced: bool


def tasks(root: Path) -> dict:
    abdomen, chest = root / "abdomen-ct", root / "totalsegmentator"
    organ = {name: abdomen / "masks" / f"{name}.nii.gz" for name in ORGANS}
    aorta, pulmonary = chest / "aorta_report", chest / "pulmonary_report"
    found = [
        Task("liver", abdomen / "ct.nii.gz", {"liver": organ["liver"]}, 2, True),
        Task("abdomen", abdomen / "ct.nii.gz", organ, 2, True),
        Task("aorta", aorta / "ct_cropped.nii.gz", {"aorta": aorta / "aorta.nii.gz"}, 2, False),
        Task("pulmonary_artery", pulmonary / "ct_cropped.nii.gz",
             {"pulmonary_artery": pulmonary / "pulmonary_artery.nii.gz"}, 0, False),
    ]  # fmt: skip
    return {t.name: t for t in found}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="the pre-trained checkpoint (its width is used)")
    p.add_argument("--steps", type=int, default=400, help="Adam steps per run (default 400)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between logged test Dice (default 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--patch", type=int, nargs=3, default=[32, 32, 16], metavar=("X", "Y", "Z"))
    p.add_argument(
        "--budgets",
        nargs="+",
        default=["10%", "25%", "50%", "100%"],
        help="labelled slabs of the training part: counts (2) or shares (25%%, 0.25) (default 10%% 25%% 50%% 100%%)",
    )
    p.add_argument("--slab-depth", type=int, default=4, help="slices per labelled slab (default 4)")
    p.add_argument("--batchnorm", choices=("running", "batch_stats"), default="running")
    p.add_argument("--lr-schedule", choices=("poly", "constant"), default="poly", help="default poly (nnU-Net's)")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    p.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS, help="default: both")
    p.add_argument("--sources", nargs=2, type=Path, metavar=("CT", "MASK"), help="one other task (cut along z)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the real data's folder")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--out", type=Path, default=Path("label_efficiency_out"))
    args = p.parse_args(argv)
    if args.steps % args.eval_every:
        p.error(f"--steps {args.steps} must be a multiple of --eval-every {args.eval_every}")
    return args


# ------------------------------------------------------------------------------------------------------ the data
@dataclass(frozen=True)
class Prepared:
    """A task's written parts: ``train`` and ``test`` folders, the test label map, the classes, the training
    part's slab count."""

    task: str
    train: Path
    test: Path
    reference: Path
    classes: dict
    slabs: int


def class_shares(masks: dict, axis: int, cut: int) -> dict:
    """Each class's share of its voxels below ``cut`` along ``axis``."""
    shares = {}
    for name, mask in masks.items():
        profile = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        shares[name] = float(profile[:cut].sum() / profile.sum())
    return shares


def balanced_cut(masks: dict, axis: int, span: tuple[int, int], least: int) -> int:
    """The cut in ``span`` (the part of the axis kept) that maximises the smallest share of a class's voxels on either
    side, leaving each part at least ``least`` voxels (the patch: a test part thinner than the patch would be
    predicted through padding the network never saw in training)."""
    cuts = range(span[0] + least, span[1] - least + 1)
    if not cuts:
        raise ValueError(f"{span[1] - span[0]} slices cannot be cut into two parts of at least {least}")
    smallest = [min(min(s, 1 - s) for s in class_shares(masks, axis, c).values()) for c in cuts]
    return cuts[int(np.argmax(smallest))]


def z_extent(masks: dict) -> tuple[int, int]:
    """The z range [lo, hi) of the slices that hold any class."""
    z = np.flatnonzero(np.any([m.any(axis=(0, 1)) for m in masks.values()], axis=0))
    return int(z[0]), int(z[-1]) + 1


def part_slices(shape, axis: int, cut: int, zrange: tuple[int, int]) -> tuple[tuple, tuple]:
    """The training (below ``cut``) and test slicings of the volume cropped to ``zrange`` along z."""
    parts = []
    for lo, hi in ((0, cut), (cut, shape[axis])):
        sl = [slice(None), slice(None), slice(*zrange)]
        if axis == 2:
            lo, hi = max(lo, zrange[0]), min(hi, zrange[1])
        sl[axis] = slice(lo, hi)
        parts.append(tuple(sl))
    return parts[0], parts[1]


def write_part(folder: Path, image, masks: dict, sl: tuple, case: str) -> None:
    """``image`` and ``masks`` sliced by ``sl`` (nibabel's slicer: the affine follows) into ``folder``: one class as a
    label map, several as a folder of masks."""
    import nibabel as nib

    part = image.slicer[sl]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    nib.save(part, str(folder / "images" / f"{case}.nii.gz"))
    if len(masks) == 1:
        save_label_map(next(iter(masks.values()))[sl], part.affine, folder / "labels" / f"{case}.nii.gz")
        return
    for name, mask in masks.items():
        save_label_map(mask[sl], part.affine, folder / "labels" / case / f"{name}.nii.gz")


def save_label_map(data: np.ndarray, affine, path: Path) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), affine), str(path))


def prepare(task: Task, out: Path, depth: int, least: int) -> Prepared:
    """The task's volume cropped, cut and written (see the module docstring); prints the cut and the class shares."""
    import nibabel as nib

    image = nib.load(str(task.image))
    masks = {name: np.asarray(nib.load(str(path)).dataobj) > 0.5 for name, path in task.masks.items()}
    zrange = z_extent(masks)
    span = zrange if task.axis == 2 else (0, image.shape[task.axis])
    cut = balanced_cut(masks, task.axis, span, least) if task.balanced else image.shape[task.axis] // 2
    train_sl, test_sl = part_slices(image.shape, task.axis, cut, zrange)
    folder = out / "data" / task.name
    write_part(folder / "train", image, masks, train_sl, task.name)
    write_part(folder / "test", image, masks, test_sl, task.name)
    classes = {name: k for k, name in enumerate(masks, start=1)}
    reference = folder / "test_label_map.nii.gz"
    save_label_map(sum(k * masks[n][test_sl] for n, k in classes.items()), image.slicer[test_sl].affine, reference)
    train_z = image.slicer[train_sl].shape[2]
    slabs = max(1, train_z // depth)
    where = f"z cropped to [{zrange[0]}, {zrange[1]}), cut along {'xyz'[task.axis]} at {cut}"
    print(f"{task.name}: {where}; {describe(class_shares(masks, task.axis, cut))}; training part {train_z} slices = "
          f"{slabs} slab(s) of {depth}")  # fmt: skip
    return Prepared(task.name, folder / "train", folder / "test", reference, classes, slabs)


def describe(shares: dict) -> str:
    """The smallest class share on either side, and each class's shares."""
    smallest = min(min(s, 1 - s) for s in shares.values())
    each = ", ".join(f"{n} {s:.3f} / {1 - s:.3f}" for n, s in shares.items())
    return f"smallest class share {smallest:.3f}; shares train / test: {each}"


def budgets(wanted: list[str], slabs: int) -> list[int]:
    """The slab counts of ``wanted`` (counts, or shares of the training part's ``slabs``, at least one) the task has,
    distinct, in order."""
    from genesis_ext.data.labelled import parse_budget

    counts = {b if isinstance(b, int) else max(1, round(b * slabs)) for b in map(parse_budget, wanted)}
    return sorted(c for c in counts if 1 <= c <= slabs)


# ------------------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Job:
    data: Prepared
    budget: int
    start: str
    seed: int

    @property
    def key(self) -> tuple:
        return (self.data.task, self.budget, self.start, self.seed)

    @property
    def name(self) -> str:
        return f"{self.data.task}_b{self.budget}_{self.start}_s{self.seed}"


def config(job: Job, args, width: float):
    """The run's FinetuneConfig: ``--eval-every`` steps per epoch (the training part is one case)."""
    from genesis_ext.train.finetuning import FinetuneConfig

    return FinetuneConfig(
        task="segmentation",
        data=str(job.data.train),
        val_data=str(job.data.test),
        out=str(args.out / "runs" / job.name),
        weights=str(args.weights) if job.start == "pretrained" else None,
        width=width,
        patch=tuple(args.patch),
        labels=dict(job.data.classes),
        batchnorm=args.batchnorm,
        lr_schedule=args.lr_schedule,
        epochs=args.steps // args.eval_every,
        batch_size=BATCH,
        lr=LR,
        patches_per_volume=BATCH * args.eval_every,
        label_budget=job.budget,
        budget_unit="slabs",
        slab_depth=args.slab_depth,
        seed=job.seed,
        progress=False,
    )


def run_job(job: Job, args, settings: dict) -> list[dict]:
    """Fine-tune, predict the test image with last.pt, evaluate it; the run's CSV rows."""
    import torch

    from genesis_ext.evaluation import evaluate_predictions
    from genesis_ext.inference.predict import predict
    from genesis_ext.train import read_csv
    from genesis_ext.train.finetuning import finetune

    torch.set_num_threads(args.threads)
    cfg = config(job, args, settings["width"])
    run = Path(cfg.out)
    shutil.rmtree(run, ignore_errors=True)  # an interrupted run starts over
    t0 = time.perf_counter()
    summary = finetune(cfg, log=lambda *_: None)
    image = job.data.test / "images" / f"{job.data.task}.nii.gz"
    (prediction,) = predict(summary["checkpoint"], [image], run / "prediction", progress=False)
    evaluation = evaluate_predictions(prediction, job.data.reference, job.data.classes)
    seconds = time.perf_counter() - t0
    base = {"task": job.data.task, "budget_slabs": job.budget, "budget_fraction": job.budget / job.data.slabs,
            "start": job.start, "seed": job.seed, **_of_start(settings, job.start)}  # fmt: skip
    return curve_rows(read_csv(run / "log.csv"), base, job.data.classes) + final_rows(
        evaluation.summary, base, args.steps, seconds
    )


def curve_rows(log: list[dict], base: dict, classes: dict) -> list[dict]:
    """The logged test Dice per class and their mean at every evaluation; seconds: the run's time so far."""
    rows, elapsed = [], 0.0
    for entry in log:
        elapsed += entry["seconds"]
        dice = {"mean": entry["val_dice"], **{name: entry[f"val_dice_{name}"] for name in classes}}
        for name, value in dice.items():
            rows.append({**base, "class": name, "step": entry["step"], "dice": value, "hd95_mm": math.nan,
                         "final": False, "seconds": round(elapsed, 3)})  # fmt: skip
    return rows


def final_rows(summary: dict, base: dict, steps: int, seconds: float) -> list[dict]:
    """The evaluation of last.pt: Dice and HD95 per class and their mean; seconds: the whole run's."""
    scores = {name: (c["dice"]["mean"], c["hd95_mm"]["mean"]) for name, c in summary["classes"].items()}
    scores["mean"] = (summary["mean"]["dice"], summary["mean"]["hd95_mm"])
    return [
        {**base, "class": name, "step": steps, "dice": d, "hd95_mm": h, "final": True, "seconds": round(seconds, 3)}
        for name, (d, h) in scores.items()
    ]


# ------------------------------------------------------------------------------------------------------ the table
def run_settings(args) -> dict:
    """The settings every row records: the run's, and the pre-trained weights' name and SHA-256 prefix (blank in the
    scratch rows, which do not use them)."""
    from genesis_ext.models.weights import read_weights

    first = read_weights(args.weights)[0]["down_tr64.ops.0.conv1.weight"]
    digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()[:12]
    return {"width": int(first.shape[0]) / 32, "patch": "x".join(map(str, args.patch)), "slab_depth": args.slab_depth,
            "steps": args.steps, "lr_schedule": args.lr_schedule, "batchnorm": args.batchnorm,
            "weights": args.weights.name, "weights_sha256": digest}  # fmt: skip


def _of_start(settings: dict, start: str) -> dict:
    return settings if start == "pretrained" else {**settings, "weights": "", "weights_sha256": ""}


def read_rows(path: Path, settings: dict) -> list[dict]:
    """The rows already in the CSV (none when absent); refuses rows of other settings (scratch rows: other than the
    weights, which they do not use)."""
    if not path.exists():
        return []
    rows = render.read_rows(path)
    for row in rows:
        expected = _of_start(settings, row["start"])
        other = {k: row[k] for k in expected if str(row[k]) != str(expected[k])}
        if other:
            raise SystemExit(f"{path} holds runs of other settings {other} (now {expected}); choose another --out")
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, render.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def check_final(rows: list[dict], job: Job) -> float:
    """The final mean Dice; warns when it differs from the last logged one by more than 1e-6."""
    mean = [r for r in rows if r["class"] == "mean"]
    final = next(r["dice"] for r in mean if r["final"])
    logged = max((r for r in mean if not r["final"]), key=lambda r: r["step"])["dice"]
    if not (abs(final - logged) <= 1e-6 or (math.isnan(final) and math.isnan(logged))):
        print(f"WARNING {job.name}: predict + evaluate Dice {final:.6f} != last logged val_dice {logged:.6f}")
    return final


def report(rows: list[dict], job: Job) -> None:
    final = check_final(rows, job)
    hd95 = next(r["hd95_mm"] for r in rows if r["final"] and r["class"] == "mean")
    seconds = next(r["seconds"] for r in rows if r["final"])
    print(f"{job.name}: Dice {final:.4f}, HD95 {hd95:.1f} mm ({seconds:.0f} s)", flush=True)


def run_all(jobs: list[Job], args, settings: dict, rows: list[dict], csv_path: Path) -> None:
    """Every job, one after the other or ``--jobs`` at once; the CSV rewritten after each."""

    def finished(job, new):
        rows.extend(new)
        write_rows(csv_path, rows)
        report(new, job)

    if args.jobs <= 1:
        for job in jobs:
            finished(job, run_job(job, args, settings))
        return
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job, args, settings): job for job in jobs}
        for future in as_completed(futures):
            finished(futures[future], future.result())


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sources:
        chosen = [Task("custom", args.sources[0], {"custom": args.sources[1]}, 2, True)]
    else:
        chosen = [tasks(args.data)[name] for name in args.tasks]
    settings = run_settings(args)
    csv_path = args.out / "label_efficiency.csv"
    rows = read_rows(csv_path, settings)
    done = {(r["task"], r["budget_slabs"], r["start"], r["seed"]) for r in rows if r["final"]}
    jobs = []
    for task in chosen:
        data = prepare(task, args.out, args.slab_depth, args.patch[2])
        counts = budgets(args.budgets, data.slabs)
        print("  budgets: " + ", ".join(f"{c} slab(s) = {c / data.slabs:.0%} of the training part" for c in counts))
        jobs += [Job(data, c, start, seed) for c in counts for seed in args.seeds for start in args.starts]
    todo = [job for job in jobs if job.key not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {csv_path}", flush=True)
    run_all(todo, args, settings, rows, csv_path)
    print(render.markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_smoke(tmp_path):
    """CI: a thresholded mask on a crop of the bundled CT, a random width-0.125 checkpoint, 4 steps, budgets of one
    slab and of all, both starts: the rows exist and render writes the table and the plot (no threshold on the Dice)."""
    import nibabel as nib
    import torch

    from genesis_ext.models import UNet3D, save_checkpoint

    image = nib.load(str(REPO / "data" / "sample" / "pulmonary_ct.nii.gz")).slicer[37:85, 27:75, 24:88]
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    mask = (np.asarray(image.dataobj) < -400).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, image.affine), str(tmp_path / "mask.nii.gz"))
    torch.manual_seed(1)  # not the run's seed 0, whose scratch initialisation these weights would then be
    save_checkpoint(UNet3D(width=0.125), tmp_path / "pre.pt")
    argv = ["--weights", str(tmp_path / "pre.pt"), "--sources", str(tmp_path / "ct.nii.gz"),
            str(tmp_path / "mask.nii.gz"), "--steps", "4", "--eval-every", "2", "--seeds", "0", "--patch", "16", "16",
            "16", "--budgets", "1", "100%", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    rows = render.read_rows(tmp_path / "out" / "label_efficiency.csv")
    finals = {
        (r["start"], r["budget_slabs"], r["budget_fraction"]) for r in rows if r["final"] and r["class"] == "mean"
    }
    slabs = max(b for _, b, _ in finals)
    assert slabs > 1 and finals == {(s, b, b / slabs) for s in STARTS for b in (1, slabs)}
    assert {r["step"] for r in rows if not r["final"]} == {2, 4}
    assert render.main([str(tmp_path / "out" / "label_efficiency.csv"), "--out-dir", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "label_efficiency.md").stat().st_size and (tmp_path / "docs" / "label_efficiency.png")
