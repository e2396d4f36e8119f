"""Arguments and entries of ``genesis-ext pretrain`` and ``finetune`` (torch is imported only when a verb runs)."""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS, DeformConfig


def positive_int(text: str) -> int:
    """argparse type of the verbs' counts and sizes."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


TASKS = ("segmentation", "classification")
DEFAULT_PATCH = (64, 64, 32)
TORCH_MISSING = "needs PyTorch, which is not installed: pip install 'genesis-ext[train]'"


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
        choices=PRESETS,
        default="genesis",
        metavar="PRESET",
        help="the deformations of each pair: genesis (the published recipe, default) or one of the paper's "
        "ablations, each deformation at its published rate: " + ", ".join(PRESETS[1:]),
    )


def _add_optimisation(g) -> None:
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float, help="SGD momentum / Adam beta1")
    g.add_argument("--batch-size", type=positive_int, help="global batch size")
    g.add_argument("--epochs", type=positive_int, help="at most this many epochs")
    g.add_argument("--steps-per-epoch", type=positive_int, help="default: training cubes // batch size")
    g.add_argument("--lr-step-epochs", type=positive_int, help="halve the lr every this many epochs")
    g.add_argument("--patience", type=positive_int, help="early stop after this many epochs without improvement")
    g.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per process and step (default 1)")
    g.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="U-Net channel multiplier (default 1: the published network, the only one the published weights fit; "
        "e.g. 0.25 to study pre-training on a CPU)",
    )
    g.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=3,
        help="2: Models Genesis 2D (UNet2D on axial patches from extract --dims 2, cubes of one slice); default 3",
    )


def _add_data_and_randomness(g) -> None:
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the cubes (default 0.1)")
    g.add_argument("--val-data", nargs="+", metavar="PATH", help="separate validation data instead")
    g.add_argument(
        "--val-repeats",
        type=positive_int,
        default=1,
        help="fixed deformations per held-out cube (default 1; more: a steadier validation loss)",
    )
    g.add_argument("--seed", type=int, default=0, help="init, split and batch order (default 0)")
    g.add_argument("--deform-seed", type=int, default=1, help="training deformations (default 1)")
    g.add_argument("--val-seed", type=int, default=2, help="fixed validation deformations (default 2)")
    g.add_argument(
        "--cube",
        nargs=3,
        type=positive_int,
        default=[64, 64, 32],
        metavar=("X", "Y", "Z"),
        help="volume inputs: cube size (default 64 64 32)",
    )
    g.add_argument("--per-volume", type=positive_int, default=32, help="volume inputs: cubes per volume and epoch")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")


def _add_execution(g) -> None:
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="auto: bf16 on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=positive_int, help="torch CPU threads")
    g.add_argument("--max-minutes", type=float, help="stop at the first epoch end after this much time")
    g.add_argument("--preview-every", type=int, default=1, help="epochs between PNG previews (0: none)")
    g.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        help="steps between host reads of the training loss (step logs, non-finite check; default 10)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CKPT",
        help="continue from OUT/checkpoints/last.pt (or CKPT); refused, with each difference listed, when the "
        "checkpoint was written with other settings (data, deformations, validation, seeds, batch, model, optimizer)",
    )
    g.add_argument(
        "--resume-anyway",
        action="store_true",
        help="with --resume: continue although the data, deformation, validation, seed or batch settings differ from "
        "the checkpoint's (e.g. data that moved); best.pt and early stopping then compare validation losses across "
        "both. The width, dims, optimizer, lr, momentum and lr schedule must still match",
    )
    g.add_argument("--init", metavar="WEIGHTS", help="start from these weights (e.g. Genesis_Chest_CT.pt)")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def run_pretrain(args) -> int:
    try:
        from ..models import CheckpointError
        from .pretraining import NonFiniteLossError, PretrainConfig, pretrain
    except ImportError as e:
        if e.name != "torch":
            raise
        print(f"genesis-ext pretrain {TORCH_MISSING}", file=sys.stderr)
        return 2

    cfg = PretrainConfig(
        data=args.data,
        out=args.out,
        preset=args.preset,
        deform=DeformConfig.preset(args.deformations),
        dims=args.dims,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        lr_step_epochs=args.lr_step_epochs,
        patience=args.patience,
        accumulate=args.accumulate,
        val_fraction=args.val_fraction,
        val_data=args.val_data,
        val_repeats=args.val_repeats,
        seed=args.seed,
        deform_seed=args.deform_seed,
        val_seed=args.val_seed,
        cube=tuple(args.cube),
        per_volume=args.per_volume,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        width=args.width,
        threads=args.threads,
        max_minutes=args.max_minutes,
        preview_every=args.preview_every,
        log_every=args.log_every,
        resume=args.resume,
        resume_anyway=args.resume_anyway,
        init_weights=args.init,
        tensorboard=not args.no_tensorboard,
        progress=not args.quiet,
    )
    try:
        result = pretrain(cfg)
    except NonFiniteLossError as e:
        print(f"genesis-ext pretrain: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"genesis-ext pretrain: {e}", file=sys.stderr)
        return 2
    print(
        f"best validation loss {result.best_val:.5f} (identity baseline {result.baselines.get('identity', 0):.5f}, "
        f"mean baseline {result.baselines.get('mean', 0):.5f}); checkpoint {result.last_checkpoint}"
    )
    return 0


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    _add_finetune_inputs(p)
    _add_finetune_training(p)


def _add_finetune_inputs(p) -> None:
    p.add_argument(
        "--task",
        choices=TASKS,
        required=True,
        help="segmentation (U-Net, soft Dice) or classification (encoder + published head, cross-entropy)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="segmentation: a directory with images/ and labels/ (matched by file name) or a CSV with an "
        "image,label header; classification: a CSV with a path,label header (.npy cubes in [0, 1] or "
        "volume files in HU). Paths in a CSV are relative to it",
    )
    p.add_argument("--out", required=True, help="run directory: log.csv, last.pt, best.pt, metrics.json")
    p.add_argument(
        "--weights",
        default=None,
        help="published Genesis_Chest_CT.pt or a checkpoint of ours (default: "
        "from scratch); classification loads the encoder only",
    )
    p.add_argument(
        "--patch",
        nargs="+",
        type=positive_int,
        default=None,
        metavar="N",
        help="patch (segmentation) or cube (classification) size, multiples of 8: X Y Z (default: 64 64 32), or "
        "X Y with --dims 2 (default: 64 64)",
    )
    p.add_argument(
        "--dims",
        type=int,
        choices=(2, 3),
        default=3,
        help="2: Models Genesis 2D (UNet2D on axial patches, e.g. weights from pretrain --dims 2); default 3",
    )
    p.add_argument(
        "--n-class",
        type=positive_int,
        default=1,
        help="segmentation: output channels; 1: label > 0.5 is foreground; >1: channel k is label == k+1 (default 1)",
    )
    p.add_argument(
        "--width",
        type=float,
        default=None,
        help="U-Net channel multiplier (default: the --weights checkpoint's, else 1, the published network)",
    )


def _add_finetune_training(p) -> None:
    p.add_argument("--epochs", type=positive_int, default=10, help="default 10")
    p.add_argument("--batch-size", type=positive_int, default=4, help="default 4")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam (default) or sgd (momentum 0.9)")
    p.add_argument(
        "--patches-per-volume",
        type=positive_int,
        default=16,
        help="segmentation: random training patches per training volume per epoch (default 16)",
    )
    p.add_argument(
        "--val-patches-per-volume",
        type=positive_int,
        default=16,
        help="segmentation: fixed validation patches per validation volume (default 16)",
    )
    p.add_argument(
        "--fg-fraction",
        type=float,
        default=0.5,
        help="segmentation: share of patches centred on a foreground voxel (default 0.5)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of volumes (segmentation) or cubes (classification, stratified) held out for "
        "validation, seeded (default 0.2; 0: no validation)",
    )
    p.add_argument(
        "--val-data",
        default=None,
        help="segmentation: separate validation volumes (a directory or CSV like --data); then every --data "
        "volume trains",
    )
    p.add_argument(
        "--window",
        nargs=2,
        type=float,
        default=[-1000.0, 1000.0],
        metavar=("LO", "HI"),
        help="intensity window of the images in their units, mapped to [0, 1] (default: -1000 1000 HU)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, patches, batches and initialisation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
