"""``genesis-ext export``: weights for nnU-Net v2 (``--nnunet PLANS.json --out FILE``) or a MONAI bundle
(``--monai-bundle DIR``). Imports torch only when the verb runs."""

from __future__ import annotations

import argparse
import sys

from .._cli_options import add_overwrite
from .._util import TORCH_MISSING


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="a checkpoint of genesis-ext pretrain or finetune")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument(
        "--nnunet",
        metavar="PLANS.json",
        help="nnU-Net v2 plans (nnUNetPlans.json): write --out for nnUNetv2_train ... -pretrained_weights FILE "
        "(encoder and decoder; nnU-Net initialises its segmentation layers)",
    )
    to.add_argument(
        "--monai-bundle",
        metavar="DIR",
        help="write a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt) to DIR",
    )
    p.add_argument("--configuration", help="--nnunet: the plans' configuration (default 3d_fullres; 2d for 2-D)")
    p.add_argument("--out", help="--nnunet: the file to write (e.g. genesis_pretrained.pth)")
    add_overwrite(p)


def run(args) -> int:
    try:
        if args.nnunet is not None:
            return _nnunet(args)
        return _bundle(args)
    except ImportError as err:
        if err.name != "torch":
            raise
        print(f"genesis-ext export {TORCH_MISSING}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as err:  # ExportError, CheckpointError, BackboneError
        print(f"genesis-ext export: {err}", file=sys.stderr)
    return 2


def _nnunet(args) -> int:
    if args.out is None:
        raise ValueError("--nnunet needs --out FILE: the weights file nnUNetv2_train -pretrained_weights reads")
    from .nnunet import export_nnunet

    done = export_nnunet(args.weights, args.nnunet, args.out, args.configuration, args.overwrite)
    print(
        f"wrote {done['out']}: {len(done['loaded'])} tensors nnU-Net loads, {len(done['fresh'])} segmentation-layer "
        f"tensors it initialises. Fine-tune: nnUNetv2_train DATASET {done['configuration']} FOLD -p PLANS "
        f"-pretrained_weights {done['out']}"
    )
    return 0


def _bundle(args) -> int:
    if args.out is not None or args.configuration is not None:
        raise ValueError("--monai-bundle DIR is the destination; --out and --configuration are for --nnunet")
    from .monai_bundle import export_bundle

    done = export_bundle(args.weights, args.monai_bundle, args.overwrite)
    print(f"wrote the MONAI bundle {done['dir']} ({done['task']}); run it: {done['run']}")
    return 0
