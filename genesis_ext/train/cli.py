"""Arguments and entries of ``genesis-ext pretrain`` and ``finetune`` (torch is imported only when a verb runs)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

from .._cli_options import (
    add_arch_options,
    add_device_options,
    add_dims,
    add_labels,
    add_log_every,
    add_max_minutes,
    add_modality,
    add_quiet,
    add_resume_options,
    add_schedule_options,
    add_seed,
)
from .._util import TORCH_MISSING, positive_int
from ..config import ABLATIONS, DeformConfig
from ..data.cubes import PUBLISHED_CUBE
from .errors import NonFiniteLossError

TASKS = ("segmentation", "classification")


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    _add_pretrain_inputs(p)
    _add_optimisation(p.add_argument_group("optimisation (default: from the preset)"))
    _add_data_and_randomness(p.add_argument_group("data and randomness"))
    _add_execution(p.add_argument_group("execution"))


def _add_pretrain_inputs(p) -> None:
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="a cube store (genesis-ext extract), .npy cube arrays, or CT volumes/directories (cut on the fly)",
    )
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.csv, tensorboard/, previews")
    p.add_argument(
        "--preset",
        choices=["default", "official"],
        default="default",
        help="official: published SGD lr 1.0 momentum 0.9, batch 6, lr halved every 40 epochs, early stop "
        "after 50; default: the same with Adam lr 1e-3 (official SGD lr 1.0 can collapse)",
    )
    p.add_argument(
        "--deformations",
        choices=ABLATIONS,
        default="genesis",
        metavar="PRESET",
        help="the deformations of each pair: genesis (the published recipe, default) or one of the paper's "
        "ablations, each deformation at its published rate: " + ", ".join(ABLATIONS[1:]),
    )


def _add_optimisation(g) -> None:
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float, help="SGD momentum / Adam beta1")
    g.add_argument("--batch-size", type=positive_int, help="global batch size")
    g.add_argument("--epochs", type=positive_int, help="at most this many epochs")
    g.add_argument("--steps-per-epoch", type=positive_int, help="default: training cubes // batch size")
    add_schedule_options(g)
    g.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="U-Net channel multiplier (default 1: the published network, the only one the published weights fit; "
        "e.g. 0.25 to study pre-training on a CPU)",
    )
    add_dims(g, "UNet2D on axial patches from extract --dims 2, cubes of one slice")
    add_arch_options(g, "unet3d, the published U-Net")


def _add_data_and_randomness(g) -> None:
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the cubes (default 0.1)")
    g.add_argument("--val-data", nargs="+", metavar="PATH", help="separate validation data instead")
    g.add_argument(
        "--val-repeats",
        type=positive_int,
        default=1,
        help="fixed deformations per held-out cube (default 1; more: a steadier validation loss)",
    )
    add_seed(g, "the initialisation, split and batch order")
    g.add_argument("--deform-seed", type=int, default=1, help="training deformations (default 1)")
    g.add_argument("--val-seed", type=int, default=2, help="fixed validation deformations (default 2)")
    g.add_argument(
        "--cube",
        nargs=3,
        type=positive_int,
        default=list(PUBLISHED_CUBE),
        metavar=("X", "Y", "Z"),
        help="volume inputs: cube size (default 64 64 32)",
    )
    g.add_argument("--per-volume", type=positive_int, default=32, help="volume inputs: cubes per volume and epoch")
    add_modality(g, "what the cube stores record, else ct; volume inputs are windowed by it")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")


def _add_execution(g) -> None:
    add_device_options(g, device_default=None, training=True)
    g.add_argument("--threads", type=positive_int, help="torch CPU threads")
    add_max_minutes(g)
    g.add_argument(
        "--collapse-steps",
        type=int,
        default=1000,
        metavar="N",
        help="warn (once; training goes on) when the validation loss has stayed at or above the constant-mean "
        "baseline for N training steps (whole epochs), or at once when the output is constant (default 1000; 0: no "
        "check)",
    )
    g.add_argument("--preview-every", type=int, default=1, help="epochs between PNG previews (0: none)")
    add_log_every(g)
    add_resume_options(
        g,
        last="OUT/checkpoints/last.pt",
        anyway="the data, deformation, validation, seed or batch settings differ from the checkpoint's (e.g. data "
        "that moved); best.pt and early stopping then compare validation losses across both. The width, dims, "
        "optimizer, lr, momentum and lr schedule must still match",
    )
    g.add_argument(
        "--init", dest="init_weights", metavar="WEIGHTS", help="start from these weights (e.g. Genesis_Chest_CT.pt)"
    )
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    _add_trainer(g, "PretrainTrainer")
    add_quiet(g)


def _add_trainer(g, base: str) -> None:
    g.add_argument(
        "--trainer",
        metavar="MODULE:CLASS",
        help=f"a subclass of {base} that changes a stage (e.g. the loss): an importable module or a .py file, then "
        "the class name (e.g. my_trainers.py:L1Pretrainer)",
    )


def arch_from_args(args):
    """--arch, --arch-kwargs, --plans and --configuration as a config's ``arch`` (None where none is given)."""
    from ..models.backbones import arch_from_plans

    if args.plans is not None:
        if args.arch not in (None, "nnunet") or args.arch_kwargs:
            raise ValueError("--plans gives the network (nnunet): leave out --arch and --arch-kwargs")
        return arch_from_plans(args.plans, args.configuration or ("2d" if args.dims == 2 else "3d_fullres"))
    if args.configuration is not None:
        raise ValueError("--configuration names a configuration of --plans: pass --plans too")
    kwargs = {}
    if args.arch_kwargs:
        try:
            kwargs = json.loads(args.arch_kwargs)
        except ValueError as err:
            raise ValueError(
                f"--arch-kwargs is not JSON ({err}): give an object, e.g. '{{\"init_filters\": 16}}'"
            ) from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--arch-kwargs must be a JSON object, got {args.arch_kwargs!r}")
        if args.arch is None:
            raise ValueError("--arch-kwargs goes with --arch: name the architecture they are for")
    return None if args.arch is None else {"name": args.arch, "kwargs": kwargs}


def config_from_args(cls, args, **values):
    """The config dataclass ``cls`` from parsed arguments: every field with an argument of its name (argparse ``dest``),
    then ``values`` (conversions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**({k: v for k, v in vars(args).items() if k in names} | values))


def load_trainer(spec: str | None, base: type) -> type | None:
    """The class ``MODULE:CLASS`` names (MODULE importable, or a .py file), checked to be a subclass of ``base``."""
    if spec is None:
        return None
    module_name, _, class_name = spec.rpartition(":")
    if not module_name or not class_name:
        raise ValueError(f"--trainer {spec!r}: give MODULE:CLASS (e.g. my_trainers.py:L1Pretrainer)")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loader is None or not Path(module_name).is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # whatever the user's module raises on import (ImportError, SyntaxError, ...)
        raise ValueError(f"--trainer {spec!r}: cannot import {module_name} ({type(err).__name__}: {err})") from err
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise ValueError(f"--trainer {spec!r}: {module_name} has no class named {class_name}")
    if not issubclass(found, base):
        raise ValueError(
            f"--trainer {spec!r}: {class_name} is a subclass of {found.__mro__[1].__name__}, not of {base.__name__}; "
            f"give a subclass of {base.__name__} here"
        )
    return found


def _run_verb(verb: str, work: Callable[[], int]) -> int:
    """``work()`` (which imports torch) as the ``genesis-ext VERB`` exit status: 2 with the message on stderr for bad
    input or a missing torch, 3 for a non-finite loss."""
    try:
        return work()
    except ImportError as err:
        if err.name != "torch":
            raise
        print(f"genesis-ext {verb} {TORCH_MISSING}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"genesis-ext {verb}: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:  # CheckpointError, VolumeError, FinetuneError, LabelledDataError
        print(f"genesis-ext {verb}: {err}", file=sys.stderr)
        return 2


def run_pretrain(args) -> int:
    """The ``genesis-ext pretrain`` verb."""

    def work() -> int:
        from .pretraining import PretrainConfig, PretrainTrainer, pretrain

        deform = DeformConfig.preset(args.deformations)
        arch = arch_from_args(args) or "unet3d"
        cfg = config_from_args(PretrainConfig, args, deform=deform, cube=tuple(args.cube), arch=arch)
        result = pretrain(cfg, trainer=load_trainer(args.trainer, PretrainTrainer))
        print(
            f"best validation loss {result.best_val:.5f} (identity baseline {result.baselines.get('identity', 0):.5f}, "
            f"mean baseline {result.baselines.get('mean', 0):.5f}); checkpoint {result.last_checkpoint}"
        )
        if result.collapsed_since:
            print(f"collapsed since epoch {result.collapsed_since}: see the warning in the log for what to try")
        return 0

    return _run_verb("pretrain", work)


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    _add_finetune_inputs(p)
    _add_finetune_segmentation(p.add_argument_group("segmentation"))
    _add_finetune_training(p.add_argument_group("training"))


def _add_finetune_inputs(p) -> None:
    p.add_argument(
        "--task",
        choices=TASKS,
        required=True,
        help="segmentation (U-Net; whole-volume validation) or classification (encoder + published head)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="segmentation: a directory with images/ and labels/ (label maps, or a folder of masks per case), a "
        "CSV with an image,label header (or image and one mask column per class), or a MONAI/Decathlon "
        "dataset.json; classification: a CSV with a path,label header (.npy cubes in [0, 1] or volumes). Paths in "
        "a CSV or JSON are relative to it",
    )
    p.add_argument("--out", required=True, help="run directory: log.csv, last.pt, best.pt, metrics.json")
    p.add_argument(
        "--weights",
        help="pre-trained weights (published Genesis_Chest_CT.pt or genesis-ext pretrain's) or a fine-tuned "
        "checkpoint (default: from scratch); classification loads the encoder only",
    )
    p.add_argument(
        "--patch",
        nargs="+",
        type=positive_int,
        metavar="N",
        help="patch (segmentation) or cube (classification) size, multiples of 8: X Y Z (default: 64 64 32), or "
        "X Y with --dims 2 (default: 64 64)",
    )
    add_dims(p, "UNet2D on axial patches, e.g. weights from pretrain --dims 2")
    add_arch_options(p, "the --weights' network, else unet3d")
    p.add_argument(
        "--width",
        type=float,
        help="U-Net channel multiplier (default: the --weights checkpoint's, else 1, the published network)",
    )
    p.add_argument(
        "--batchnorm",
        choices=("running", "batch_stats"),
        default="running",
        help="running: BatchNorm evaluates with running statistics (default); batch_stats: with each batch's own, "
        "as the published network does",
    )
    add_modality(p, "the --weights' modality, else ct")
    p.add_argument(
        "--window",
        nargs=2,
        type=float,
        default=None,
        metavar=("LO", "HI"),
        help="a fixed intensity window of the images in their units, mapped to [0, 1] (default: the modality's; ct: "
        "-1000 1000 HU)",
    )


def _add_finetune_segmentation(g) -> None:
    add_labels(
        g, "the dataset.json's labels, the mask names, else one class: label > 0.5 (with masks, names pick the masks)"
    )
    g.add_argument(
        "--loss",
        choices=("dice", "dice_ce"),
        help="dice: sigmoid and soft Dice, as published (default for one class); dice_ce: softmax, Dice + "
        "cross-entropy, as nnU-Net (default for several)",
    )
    g.add_argument(
        "--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"), help="mm (default: the training images' median)"
    )
    g.add_argument(
        "--patches-per-volume",
        type=positive_int,
        default=16,
        help="random training patches per training volume (or labelled slab) and epoch (default 16)",
    )
    g.add_argument(
        "--fg-fraction", type=float, default=0.5, help="share of patches centred on a foreground voxel (default 0.5)"
    )
    g.add_argument(
        "--val-data",
        help="separate validation volumes (a directory, CSV or dataset.json like --data); then every --data "
        "volume trains",
    )
    g.add_argument(
        "--overlap", type=float, default=0.5, help="validation sliding window: overlap of windows (default 0.5)"
    )
    g.add_argument(
        "--label-budget",
        help="keep this many (a count: 2) or this share (0.25 or 25%%) of the training cases (or slabs) labelled; "
        "seeded",
    )
    g.add_argument(
        "--budget-unit",
        choices=("cases", "slabs"),
        default="cases",
        help="what --label-budget counts: cases (default) or axial slabs (the slices of the others stay in the images "
        "but out of the loss)",
    )
    g.add_argument(
        "--slab-depth", type=positive_int, help="--budget-unit slabs: slices per slab (default: the patch's depth)"
    )


def _add_finetune_training(g) -> None:
    g.add_argument("--epochs", type=positive_int, default=10, help="default 10")
    g.add_argument("--batch-size", type=positive_int, default=4, help="default 4")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam (default) or sgd (momentum 0.9)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of volumes (segmentation) or cubes (classification, stratified) held out for validation, "
        "seeded (default 0.2; 0: no validation)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum / Adam beta1 (default 0.9)")
    g.add_argument(
        "--lr-schedule",
        choices=("poly", "step", "constant"),
        help="poly: lr x (1 - epoch/epochs)^0.9 as nnU-Net (default); step: halve it every --lr-step-epochs (the "
        "default when that is given); constant",
    )
    add_schedule_options(g)
    add_max_minutes(g)
    add_device_options(g, amp_default="off", training=True)
    add_log_every(g)
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    add_seed(g, "the split, patches, batches and initialisation")
    add_resume_options(g, last="OUT/last.pt", anyway="the data settings differ")
    _add_trainer(g, "the task's trainer (SegmentationTrainer or ClassificationTrainer)")
    add_quiet(g)


def run_finetune(args) -> int:
    """The ``genesis-ext finetune`` verb."""

    def work() -> int:
        from ..data.labelled import parse_budget
        from .finetuning import ClassificationTrainer, FinetuneConfig, SegmentationTrainer, finetune

        cfg = config_from_args(
            FinetuneConfig,
            args,
            patch=None if args.patch is None else tuple(args.patch),
            spacing=None if args.spacing is None else tuple(args.spacing),
            window=None if args.window is None else tuple(args.window),
            label_budget=None if args.label_budget is None else parse_budget(args.label_budget),
            arch=arch_from_args(args),
        )
        base = SegmentationTrainer if args.task == "segmentation" else ClassificationTrainer
        summary = finetune(cfg, trainer=load_trainer(args.trainer, base))
        final = summary["final"]
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if k.startswith("val_") and isinstance(v, float))
        print(f"finished {summary['epochs']} epoch(s): {metrics or 'no validation data'}")
        print(f"log: {summary['log']}")
        print(f"checkpoints: {summary['checkpoint']}, {summary['best_checkpoint']} (epoch {summary['best_epoch']})")
        return 0

    return _run_verb("finetune", work)
