"""See one batch of Models Genesis training pairs made from real chest CT, then pre-train on it for a few minutes.

    python -m genesis_ext.demo [--out DIR] [--seed S] [--count N] [--inputs FILE ...] [--train-steps N]

Loads CT volumes with ``genesis_ext.data`` (values in HU; default: the two bundled crops in data/sample; any
file or DICOM directory ``load_volume`` reads), cuts ``--count`` random 64x64x32 cubes (seeded) with
``extract_cubes`` (HU window [-1000, 1000] -> [0, 1], ``foreground`` filter, margins scaled to the volume; each cube
from a uniformly chosen volume), runs ``genesis_ext.genesis_pair`` on the batch and writes ``genesis_pairs.png``: one
row per cube with its mid-Z slice as original, deformed input and target, and a caption naming the deformations that
fired (read from ``genesis_ext.sample_params``). Needs nibabel and Pillow.

Then (unless ``--train-steps 0``) the real job, small: ``genesis-ext extract`` of the same volumes into
``DIR/cubes`` (``--train-cube``, default 32x32x16 so that a CPU takes seconds per step, not minutes; the published
"mostly lung" filter) and
``genesis-ext pretrain`` (default preset) into ``DIR/run`` for ``--train-steps`` steps (default 550, about 3 minutes
on a 2-core CPU; a fixed count, so the result does not depend on the machine's load; the time taken is printed):
``DIR/run/checkpoints/{last,best}.pt``, ``metrics.csv``, TensorBoard logs and ``preview.png`` (deformed input |
target | restoration). Needs torch for this part.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from genesis_ext._util import deprecated_aliases
from genesis_ext.applied import applied, deformation_names
from genesis_ext.data import Foreground, extract_cubes, load_volume, sample
from genesis_ext.data.cubes import PUBLISHED_CUBE
from genesis_ext.data.intensity import CT_WINDOW

SCALE = 3  # pixels per voxel in the figure
DEMO_WIDTH = 0.25  # a U-Net of 1/16 the published parameters: enough steps in minutes of CPU to beat the baselines
DEMO_STEPS = 550  # about 3 minutes on the 2-core CPU with one thread (docs/install.md, the demo)
DEMO_EPOCH_STEPS = 10

# the sample data helpers moved to the data layer (genesis_ext.data.sample), the published cube to data.cubes
__getattr__ = deprecated_aliases(
    __name__,
    {
        "CUBE": ("genesis_ext.data.cubes.PUBLISHED_CUBE", lambda: PUBLISHED_CUBE),
        **{
            name: (f"genesis_ext.data.sample.{name}", lambda name=name: getattr(sample, name))
            for name in ("SAMPLE_DIR", "SAMPLE_FILES", "load_ct", "random_cubes")
        },
    },
)


def pipeline_cubes(volumes, count: int, rng: np.random.Generator, size=PUBLISHED_CUBE):
    """``count`` cubes through ``genesis_ext.data.extract_cubes`` (HU window, ``foreground`` filter, auto margins),
    each from a uniformly chosen volume. Returns the batch (count, 1, *size) float32 and a list of
    (volume index, origin); raises ValueError if a volume cannot give its share."""
    picks = rng.integers(len(volumes), size=count)
    batch = np.empty((count, 1, *size), dtype=np.float32)
    where = [None] * count
    for k, volume in enumerate(volumes):
        slots = np.flatnonzero(picks == k)
        if not len(slots):
            continue
        try:
            got = extract_cubes(
                volume.data, cube=size, count=len(slots), filter=Foreground(), window=CT_WINDOW, rng=rng
            )
        except ValueError as err:  # a label map, a volume smaller than the cube: say which file
            raise ValueError(f"{volume.source}: {err}") from err
        if len(got.cubes) < len(slots):
            raise ValueError(f"{volume.source}: only {len(got.cubes)} of {len(slots)} cubes pass the foreground filter")
        batch[slots, 0] = got.cubes
        for n, origin in zip(slots, got.origins):
            where[n] = (k, tuple(int(o) for o in origin))
    return batch, where


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable font: Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _tile(cube: np.ndarray):
    """Mid-Z slice of a (1, X, Y, Z) cube as a grey image, X to the right and Y down (radiological view for LPS)."""
    from PIL import Image

    sl = cube[0, :, :, cube.shape[3] // 2].T
    img = Image.fromarray((np.clip(np.nan_to_num(sl), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def render(original, deformed, target, captions: list[str], title: str):
    """PNG grid: a header, then per sample a caption of two lines over three tiles (original, input, target)."""
    from PIL import Image, ImageDraw

    head_font, font = _font(16), _font(14)
    tile_w, tile_h = PUBLISHED_CUBE[0] * SCALE, PUBLISHED_CUBE[1] * SCALE
    gap, cap_h, head_h = 8, 40, 56
    width = 3 * tile_w + 4 * gap
    height = head_h + len(captions) * (cap_h + tile_h + gap)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 6), title, fill="black", font=head_font)
    for col, name in enumerate(("original cube", "input (deformed)", "target")):
        draw.text((gap + col * (tile_w + gap), 32), name, fill="black", font=head_font)
    y = head_h
    for n, caption in enumerate(captions):
        draw.text((gap, y + 4), caption, fill=(30, 30, 140), font=font)
        y += cap_h
        for col, batch in enumerate((original, deformed, target)):
            sheet.paste(_tile(batch[n]), (gap + col * (tile_w + gap), y))
        y += tile_h + gap
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genesis_ext.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cube positions and the deformations")
    parser.add_argument("--count", type=int, default=8, help="number of cubes (default: 8)")
    parser.add_argument(
        "--inputs",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="CT volumes in HU: NIfTI, MetaImage, NRRD or DICOM series directories "
        "(default: the bundled data/sample crops)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=DEMO_STEPS,
        help=f"then extract cubes and pre-train for this many steps, rounded up to whole epochs of "
        f"{DEMO_EPOCH_STEPS} (default: {DEMO_STEPS}, about 3 minutes on a 2-core CPU; 0: skip)",
    )
    parser.add_argument(
        "--train-cube",
        type=int,
        nargs=3,
        default=[32, 32, 16],
        metavar=("X", "Y", "Z"),
        help="cube size of the pre-training part (default: 32 32 16)",
    )
    parser.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=3,
        help="3: pre-train the 3D U-Net on cubes (default); 2: Models Genesis 2D, UNet2D on axial patches "
        "(the first two --train-cube sizes), into OUT/run2d",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    if args.train_steps < 0:
        parser.error("--train-steps must be >= 0")

    inputs = args.inputs or [sample.SAMPLE_DIR / f for f in sample.SAMPLE_FILES]
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        hint = (
            ""
            if args.inputs
            else (" (the sample data ships with the source tree: run from a checkout or pass --inputs)")
        )
        print(f"genesis_ext.demo: not found: {', '.join(missing)}{hint}", file=sys.stderr)
        return 2

    try:
        volumes = [load_volume(p) for p in inputs]
        batch, where = pipeline_cubes(volumes, args.count, np.random.default_rng(args.seed))
    except ValueError as err:
        print(f"genesis_ext.demo: {err}", file=sys.stderr)
        return 2

    from genesis_ext.ops import genesis_pair, sample_params  # torch and the extension: only now

    start = time.perf_counter()
    deformed, target = genesis_pair(batch, seed=args.seed)
    ms = (time.perf_counter() - start) * 1e3
    records = applied(sample_params(args.count, PUBLISHED_CUBE, seed=args.seed, with_blocks=False), args.seed)

    captions = []
    for n, (k, origin) in enumerate(where):
        at = ",".join(map(str, origin))
        caption = f"{n}: {Path(inputs[k]).name.split('.')[0]} @({at})\n" + records[n].caption()
        mid = PUBLISHED_CUBE[2] // 2
        deformed_at_all = any(name != "flip" for name in records[n].fired)
        if deformed_at_all and np.array_equal(deformed[n, ..., mid], target[n, ..., mid], equal_nan=True):
            caption += " - not in this slice"
        captions.append(caption)
    title = f"genesis_ext.genesis_pair, seed {args.seed}: mid-Z slice of each 64x64x32 cube"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "genesis_pairs.png"
    render(batch, deformed, target, captions, title).save(path)

    counts = {name: sum(name in r for r in records) for name in ("flip", *deformation_names())}
    fired_text = ", ".join(f"{name} {c}/{args.count}" for name, c in counts.items() if c)
    print(f"wrote {path}")
    print(
        f"{args.count} cubes {'x'.join(map(str, PUBLISHED_CUBE))} from {len(volumes)} volume(s) in {ms:.1f} ms "
        f"({ms / args.count:.2f} ms/cube on the CPU); "
        f"fired: {fired_text}"
    )
    if args.train_steps > 0:
        return pretrain_demo(inputs, args.out, args.train_steps, tuple(args.train_cube), args.seed, args.dims)
    return 0


def pretrain_demo(inputs, out: Path, steps: int, cube, seed: int, dims: int = 3) -> int:
    """``genesis-ext extract`` of ``inputs`` into ``out/cubes``, then ``genesis-ext pretrain`` into ``out/run`` for
    ``steps`` steps in whole epochs (default preset, batch 4, 10 steps per epoch, 20% held out with 4 deformations
    each, a preview every epoch); prints the time it took. A second call with more steps continues the run. ``dims``
    2: axial patches of the first two sizes of ``cube`` into ``out/cubes2d`` and ``out/run2d`` (Models Genesis 2D).
    """
    from genesis_ext.cli import main as cli

    cube_args = [str(c) for c in cube[:dims]]
    suffix = "" if dims == 3 else "2d"
    cubes, run = out / f"cubes{suffix}", out / f"run{suffix}"
    # lung cubes (the published filter): on soft-tissue cubes a decreasing Bézier map is hard to tell from an
    # increasing one, and the network long predicts little more than the mean (docs/training.md)
    status = cli(
        [
            "extract",
            *map(str, inputs),
            "--out",
            str(cubes),
            "--dims",
            str(dims),
            "--filter",
            "official-lung",
            "--cube",
            *cube_args,
            "--per-volume",
            "128",
            "--seed",
            str(seed),
            "--quiet",
        ]
    )
    if status != 0:
        return status
    resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []  # a second demo continues
    start = time.perf_counter()
    status = cli(
        [
            "pretrain",
            "--data",
            str(cubes),
            "--out",
            str(run),
            "--dims",
            str(dims),
            "--batch-size",
            "4",
            "--steps-per-epoch",
            str(DEMO_EPOCH_STEPS),
            "--val-fraction",
            "0.2",
            "--val-repeats",
            "4",
            "--epochs",
            str(-(-steps // DEMO_EPOCH_STEPS)),
            "--seed",
            str(seed),
            "--width",
            str(DEMO_WIDTH),
            *resume,
        ]
    )
    if status == 0:
        print(f"pre-training to step {steps}: {time.perf_counter() - start:.0f} s")
        print(learning_verdict(run))
    return status


def learning_verdict(run: Path) -> str:
    """Whether the run's validation loss went below the constant-mean baseline (the loss of predicting the targets'
    mean), from its metrics.csv and baselines.json."""
    import json

    from genesis_ext.train import read_csv

    rows, base = read_csv(run / "metrics.csv"), json.loads((run / "baselines.json").read_text())
    best = min(rows, key=lambda r: r["val_loss"])
    ratio = best["val_loss"] / base["mean"]
    below = "below" if ratio < 1 else "not yet below"
    return (
        f"learning: best validation loss {best['val_loss']:.5f} after {best['step']} steps, {ratio:.2f}x the "
        f"constant-mean baseline {base['mean']:.5f}: {below} it (identity baseline {base['identity']:.5f}); "
        f"curves: {run / 'curve.png'}"
    )


if __name__ == "__main__":
    sys.exit(main())
