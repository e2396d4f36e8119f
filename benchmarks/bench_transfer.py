"""Transfer on real labels: segmentation fine-tuning from random weights against fine-tuning from our pre-trained
weights, same steps and seeds, on the two real masks of ../shared/data (TotalSegmentator's thoracic aorta and
pulmonary artery, each with its contrast CT crop).

    python benchmarks/bench_transfer.py --weights learning_out/default/checkpoints/best.pt --out transfer_out

Each volume is cut in two halves (``STRUCTURES`` says along which axis, and why): the network trains on patches of
the first half and is scored on fixed patches of the second (``FinetuneConfig.val_data``). For every structure, seed
and start (scratch, pretrained) one fine-tuning run of the same settings (U-Net width read off ``--weights``, Adam
lr 1e-3, batch 4, ``--patch`` patches, half of them centred on the structure) is validated every ``--eval-every``
steps: the Dice at threshold 0.5 over the test half's patches. Writes ``OUT/transfer.csv`` (one row per run and
evaluation) and prints the table for README: Dice at each evaluation, mean ± standard deviation over the seeds. It
reports; it asserts nothing about the Dice.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from genesis_ext.train import read_csv
from genesis_ext.train.finetune import FinetuneConfig, run_finetune

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "totalsegmentator"
# (CT, mask, the axis the volume is cut along). The aorta is cut head / feet: both halves hold the descending aorta
# beside the spine (a left / right cut leaves the ascending aorta on one side, the descending on the other: measured,
# scratch runs then reach Dice 0.88 on their own half and 0.00 on the other). The pulmonary artery lies wholly in the
# upper half, so it is cut left / right, each side holding one of its branches.
STRUCTURES = {
    "aorta": (SHARED / "aorta_report" / "ct_cropped.nii.gz", SHARED / "aorta_report" / "aorta.nii.gz", 2),
    "pulmonary_artery": (
        SHARED / "pulmonary_report" / "ct_cropped.nii.gz",
        SHARED / "pulmonary_report" / "pulmonary_artery.nii.gz",
        0,
    ),
}
STARTS = ("scratch", "pretrained")
FIELDS = ("structure", "start", "seed", "step", "val_dice", "val_iou", "val_loss", "train_loss")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="our pre-trained checkpoint (e.g. bench_learning's)")
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps per run (default 400)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations (default 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--patch", type=int, nargs=3, default=[32, 32, 16], metavar=("X", "Y", "Z"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--val-patches", type=int, default=64, help="fixed test patches per structure (default 64)")
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=list(STRUCTURES))
    p.add_argument("--sources", nargs=2, type=Path, metavar=("CT", "MASK"), help="another CT and mask (cut along Z)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("transfer_out"))
    return p.parse_args(argv)


def halves(ct: Path, mask: Path, axis: int, out: Path) -> tuple[Path, Path]:
    """The volume and its mask cut in two along ``axis``: OUT/train (first half), OUT/test (second half), each an
    images/ + labels/ folder for ``genesis-ext finetune``."""
    import nibabel as nib

    image, label = nib.load(str(ct)), nib.load(str(mask))
    hu, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
    mid = hu.shape[axis] // 2
    for part, half in (("train", slice(0, mid)), ("test", slice(mid, None))):
        sl = tuple(half if a == axis else slice(None) for a in range(3))
        for kind, img, data in (("images", image, hu), ("labels", label, lab)):
            folder = out / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data[sl]), img.affine), str(folder / "case.nii.gz"))
    return out / "train", out / "test"


def finetune(train: Path, test: Path, start: str, seed: int, args, run: Path) -> list[dict]:
    steps_per_epoch = args.eval_every
    cfg = FinetuneConfig(
        task="segmentation",
        data=str(train),
        val_data=str(test),
        out=str(run),
        weights=str(args.weights) if start == "pretrained" else None,
        width=_width(args.weights),
        patch=tuple(args.patch),
        epochs=max(1, args.steps // steps_per_epoch),
        batch_size=args.batch_size,
        patches_per_volume=steps_per_epoch * args.batch_size,
        val_patches_per_volume=args.val_patches,
        seed=seed,
        progress=False,
    )
    run_finetune(cfg, log=lambda *_: None)
    return read_csv(run / "log.csv")


def _width(weights: Path) -> float:
    from genesis_ext.models import load_pretrained

    return float(load_pretrained(None, weights).width)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sources = {"custom": (*args.sources, 2)} if args.sources else {k: STRUCTURES[k] for k in args.structures}
    rows = []
    for name, (ct, mask, axis) in sources.items():
        train, test = halves(ct, mask, axis, args.out / "data" / name)
        for seed in args.seeds:
            for start in STARTS:
                run = args.out / "runs" / f"{name}_{start}_{seed}"
                for r in finetune(train, test, start, seed, args, run):
                    rows.append({"structure": name, "start": start, "seed": seed, **{k: r.get(k) for k in FIELDS[3:]}})
                print(f"{name} {start} seed {seed}: Dice {rows[-1]['val_dice']:.3f} after {rows[-1]['step']} steps")
    with open(args.out / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    """Dice at each evaluation step, mean ± standard deviation over the seeds, per structure and start."""
    steps = sorted({r["step"] for r in rows})
    print("| structure | start | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|---|" + "---:|" * len(steps))
    for name in dict.fromkeys(r["structure"] for r in rows):
        for start in STARTS:
            cells = []
            for s in steps:
                dice = [r["val_dice"] for r in rows if (r["structure"], r["start"], r["step"]) == (name, start, s)]
                cells.append(f"{np.mean(dice):.3f} ± {np.std(dice):.3f}" if dice else "")
            print(f"| {name} | {start} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())


def test_smoke(tmp_path):
    """CI: both starts for 4 steps on a sample CT crop and a thresholded mask, tiny sizes; outputs exist (no threshold
    on the Dice)."""
    import nibabel as nib
    import torch

    from genesis_ext.models import UNet3D, save_checkpoint

    ct = REPO / "data" / "sample" / "pulmonary_ct.nii.gz"
    img = nib.load(str(ct))
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) < -400).astype(np.uint8), img.affine), str(mask))
    torch.manual_seed(0)
    save_checkpoint(UNet3D(width=0.125), tmp_path / "pre.pt")
    argv = ["--weights", str(tmp_path / "pre.pt"), "--sources", str(ct), str(mask), "--steps", "4", "--eval-every",
            "2", "--seeds", "0", "--patch", "16", "16", "16", "--val-patches", "2", "--threads", "1", "--out",
            str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "transfer.csv")))
    assert {r["start"] for r in rows} == set(STARTS) and len(rows) == 4
