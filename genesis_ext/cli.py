"""The ``genesis-ext`` command: one verb per stage of the workflow.

    genesis-ext extract INPUT... --out DIR      real CT (NIfTI, DICOM, MetaImage, NRRD) -> a cube store
    genesis-ext pretrain --data DATA --out DIR  pre-train the 3D U-Net (checkpoints, logs, previews in DIR)
    genesis-ext finetune --task segmentation|classification --data DATA --out DIR [--weights W]
    genesis-ext evaluate --pred PRED --ref REF [--labels liver=1,spleen=2] [--out CSV]  Dice, HD95 per class
    genesis-ext predict --weights CKPT INPUT... --out DIR  segment CT volumes: label maps on each input's grid
    genesis-ext export --weights CKPT --nnunet PLANS.json --out FILE | --monai-bundle DIR

A verb is a ``(help, add_arguments, run)`` entry in :data:`VERBS`; ``run(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import __version__
from ._cli_options import add_dims, add_modality, add_quiet, add_seed
from ._util import positive_int


def _add_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="volume files (.nii, .nii.gz, .mhd, .mha, .nrrd, .dcm) or directories, searched recursively "
        "(every DICOM series in a directory is one volume)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory (a cube store; an existing one made with the same options is continued, and its "
        "damaged or missing shards are extracted again)",
    )
    g = p.add_argument_group("cubes")
    g.add_argument(
        "--cube",
        nargs="+",
        type=positive_int,
        default=None,
        metavar="N",
        help="cube size in voxels: X Y Z (default: 64 64 32), or X Y with --dims 2 (default: 64 64)",
    )
    add_dims(g, "axial 2-D patches (X, Y), stored as cubes of one slice (X, Y, 1)")
    g.add_argument("--per-volume", type=positive_int, default=32, help="cubes per volume, at most (default: 32)")
    g.add_argument(
        "--candidates",
        type=positive_int,
        default=None,
        help="random candidates tried per volume, at most (default: 50 x --per-volume)",
    )
    g.add_argument(
        "--margins",
        nargs="+",
        default=["auto"],
        metavar="M",
        help="'auto' (the published 100/100/30-voxel margins scaled to the volume, default) or three "
        "voxel counts X Y Z (e.g. 100 100 30, as published)",
    )
    add_seed(g, "the cubes: each volume's cubes depend only on it and the file")
    g = p.add_argument_group("filter")
    g.add_argument(
        "--filter",
        choices=["official-lung", "foreground", "body", "none"],
        default=None,
        help="official-lung: the published 'mostly lung' rule (default for ct); foreground: mostly above "
        "--foreground-level of the window; body: mostly inside the body, no threshold in input units (default for "
        "mr); none: keep every candidate",
    )
    g.add_argument("--lung-threshold", type=float, default=-150.0, help="official-lung: HU threshold (default -150)")
    g.add_argument(
        "--lung-max-fraction",
        type=float,
        default=0.15,
        help="official-lung: largest score fraction kept (default 0.15)",
    )
    g.add_argument(
        "--foreground-level",
        type=float,
        default=0.05,
        help="foreground: a voxel is foreground above this level of the window, 0..1 (default 0.05, i.e. "
        "-900 HU in the default window)",
    )
    g.add_argument(
        "--foreground-fraction",
        type=float,
        default=0.6,
        help="foreground, body: smallest fraction of the cube kept (default 0.6)",
    )
    g = p.add_argument_group("intensity")
    add_modality(g, "the inputs' DICOM Modality tag, else ct")
    w = g.add_mutually_exclusive_group()
    w.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="intensity window in input units mapped to [0, 1] (default: -1000 1000 HU)",
    )
    w.add_argument(
        "--window-percentile",
        nargs=2,
        type=float,
        metavar=("P_LO", "P_HI"),
        help="per-volume window from these intensity percentiles of all voxels, e.g. 0.5 99.5 (--modality mr "
        "takes them over the body's voxels)",
    )
    g.add_argument(
        "--pad",
        action="store_true",
        help="pad a volume thinner than the cube with background (the window's low value), evenly on both sides "
        "(default: skip it, naming the axis)",
    )
    g.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        metavar=("X", "Y", "Z"),
        help="resample to this spacing in mm first (default: native spacing, as published)",
    )
    g = p.add_argument_group("which volumes (label maps beside the scans are always skipped, with their reason)")
    g.add_argument(
        "--include",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="only sources whose path relative to their input matches one of these globs, e.g. 'imagesTr/*'",
    )
    g.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="leave out sources matching these globs")
    g.add_argument(
        "--channels",
        type=positive_int,
        default=1,
        help="co-registered images per case (default 1): a 4-D NIfTI, or nnU-Net's <case>_0000.nii.gz, "
        "<case>_0001.nii.gz, ... files; each channel is windowed on its own, all are cut at the same places",
    )
    g = p.add_argument_group("output and execution")
    g.add_argument(
        "--format",
        choices=["store", "published"],
        default="store",
        help="store: one array per volume (default); published: one bat_<n>_s_<X>x<Y>x<Z>_<subset>.npy "
        "array per INPUT, as the published script writes",
    )
    g.add_argument("--jobs", type=positive_int, default=None, help="parallel workers (default: all cores)")
    g.add_argument(
        "--executor",
        choices=["thread", "process"],
        default="thread",
        help="workers as threads (default: loading and NumPy release the GIL) or spawned processes",
    )
    add_quiet(g)


def _extract_cube(cube, dims: int) -> tuple:
    """The cube size of ``extract --cube ... --dims``: three sizes, or two and a last axis of 1 for 2-D patches."""
    from .data.cubes import published_cube, slice_cube

    if cube is None:
        return published_cube(dims)
    if dims == 2 and len(cube) == 2:
        return slice_cube(cube)
    if len(cube) != 3 or (dims == 2 and cube[2] != 1):
        want = "X Y Z" if dims == 3 else "X Y (or X Y 1)"
        raise SystemExit(f"genesis-ext extract: --cube takes {want} with --dims {dims}, got {' '.join(map(str, cube))}")
    return tuple(cube)


def _run_extract(args) -> int:
    from .data import Body, ExtractSettings, Foreground, NoFilter, OfficialLung, PercentileWindow, Window, run_extract
    from .data.modality import ModalityWarning

    if args.margins == ["auto"]:
        margins = "auto"
    else:
        try:
            margins = tuple(int(m) for m in args.margins)
        except ValueError:
            margins = ()
        if len(margins) != 3 or min(margins) < 0:
            raise SystemExit(f"genesis-ext extract: --margins takes 'auto' or three voxel counts, got {args.margins}")
    if args.filter == "official-lung" and args.modality not in (None, "ct"):
        raise SystemExit(
            f"genesis-ext extract: --filter official-lung thresholds Hounsfield units; with --modality "
            f"{args.modality} use --filter body, foreground or none"
        )
    filt = {
        None: lambda: None,  # the modality's filter
        "official-lung": lambda: OfficialLung(args.lung_threshold, args.lung_max_fraction),
        "foreground": lambda: Foreground(args.foreground_level, args.foreground_fraction),
        "body": lambda: Body(args.foreground_fraction),
        "none": NoFilter,
    }[args.filter]()
    try:
        window = (
            PercentileWindow(*args.window_percentile)
            if args.window_percentile
            else Window(*args.window)
            if args.window
            else None  # the modality's window
        )
    except ValueError as err:
        raise SystemExit(f"genesis-ext extract: {err}") from None
    settings = ExtractSettings(
        cube=_extract_cube(args.cube, args.dims),
        count=args.per_volume,
        max_candidates=args.candidates,
        filter=filt,
        window=window,
        margins=margins,
        spacing=tuple(args.spacing) if args.spacing else None,
        seed=args.seed,
        modality=args.modality,
        pad=args.pad,
        channels=args.channels,
    )
    try:
        with warnings.catch_warnings():  # the summary below lists them, each once
            warnings.simplefilter("ignore", ModalityWarning)
            summary = run_extract(
                args.inputs,
                args.out,
                settings,
                jobs=args.jobs,
                executor=args.executor,
                fmt=args.format,
                progress=args.progress,
                include=args.include,
                exclude=args.exclude,
            )
    except (ValueError, OSError) as err:  # e.g. --out holds a store made with other options, or is a file
        print(f"genesis-ext extract: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    for path in summary.outputs:
        print(f"wrote {path}")
    print(f"cube store: {os.path.abspath(args.out)}")
    return 0 if summary.written + summary.kept > 0 else 1


def _train_cli():
    from .train import cli  # argument parsers only: no torch

    return cli


def _evaluate():
    from .evaluation import evaluate  # numpy and scipy only

    return evaluate


def _predict():
    from .inference import predict  # imports without torch; predicting needs it

    return predict


def _export():
    from .export import cli  # argument parsing only: no torch

    return cli


VERBS = {
    "extract": ("cut training cubes from CT volumes into a cube store", _add_extract, _run_extract),
    "pretrain": (
        "Models Genesis self-supervised pre-training of the 3D U-Net",
        lambda p: _train_cli().add_pretrain_arguments(p),
        lambda args: _train_cli().run_pretrain(args),
    ),
    "finetune": (
        "fine-tune on a segmentation or classification task (published or our weights)",
        lambda p: _train_cli().add_finetune_arguments(p),
        lambda args: _train_cli().run_finetune(args),
    ),
    "evaluate": (
        "score predicted label maps against references: Dice and HD95 per class",
        lambda p: _evaluate().add_arguments(p),
        lambda args: _evaluate().run(args),
    ),
    "predict": (
        "segment CT volumes with a fine-tuned checkpoint (label maps on each input's own grid)",
        lambda p: _predict().add_arguments(p),
        lambda args: _predict().run(args),
    ),
    "export": (
        "hand weights to nnU-Net v2 (-pretrained_weights) or write a MONAI bundle",
        lambda p: _export().add_arguments(p),
        lambda args: _export().run(args),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genesis-ext", description="Models Genesis pre-training tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help_text, add_arguments, _) in VERBS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return VERBS[args.verb][2](args)


if __name__ == "__main__":
    sys.exit(main())
