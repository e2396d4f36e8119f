"""The options several ``genesis-ext`` verbs share, each declared once (name, type, choices, default, help) so that
the verbs cannot drift apart; a verb passes only what differs (its defaults, what its seed seeds). No torch here."""

from __future__ import annotations

from ._util import positive_int

AMP_MODES = ("auto", "bf16", "off")  # auto: bf16 on CUDA (on CPUs it is slower and less exact)


def add_quiet(p) -> None:
    """``--quiet``: no progress bars (``args.progress`` false). extract, pretrain, finetune, evaluate, predict."""
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")


def add_overwrite(p) -> None:
    """``--overwrite``. evaluate, predict."""
    p.add_argument("--overwrite", action="store_true", help="replace the outputs already at --out")


def add_seed(p, what: str) -> None:
    """``--seed`` (default 0), the seed of ``what``. extract, pretrain, finetune."""
    p.add_argument("--seed", type=int, default=0, help=f"seed of {what} (default 0)")


def add_dims(p, what: str) -> None:
    """``--dims`` 3 or 2 (Models Genesis 2D: ``what``). extract, pretrain, finetune."""
    p.add_argument("--dims", type=int, choices=(2, 3), default=3, help=f"2: Models Genesis 2D ({what}); default 3")


def add_device_options(p, *, device_default: str | None = "auto", amp_default: str = "auto", training=False) -> None:
    """``--device`` and ``--amp`` (and ``--compile`` when ``training``). pretrain, finetune, predict."""
    p.add_argument(
        "--device",
        default=device_default,  # None (pretrain) means auto too
        help="auto (a GPU when torch sees one, else the CPU; default), cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=amp_default,
        help=f"bf16 autocast: auto (on CUDA), bf16 or off (default {amp_default})",
    )
    if training:
        p.add_argument("--compile", action="store_true", help="torch.compile the model")


MODALITY_HELP = (
    "ct: Hounsfield units, the published [-1000, 1000] HU window; mr: each volume clipped to the 0.5th-99.5th "
    "percentiles of its body's voxels and scaled to [0, 1]"
)


def add_modality(p, default: str) -> None:
    """``--modality`` (``genesis_ext.data.modality.MODALITIES``; None: ``default`` says what decides). extract,
    pretrain, finetune."""
    from .data.modality import MODALITIES  # NumPy only

    p.add_argument("--modality", choices=tuple(MODALITIES), default=None, help=f"{MODALITY_HELP} (default: {default})")


def add_labels(p, default: str) -> None:
    """``--labels``, the classes of a label map (``genesis_ext.data.labelled.parse_labels``). finetune, evaluate."""
    p.add_argument(
        "--labels",
        metavar="NAME=VALUE,...",
        help="the classes: name=value,... (liver=1,spleen=2) or names for the values 1, 2, ... in order "
        f"(liver,spleen); default: {default}",
    )


def add_schedule_options(g) -> None:
    """``--lr-step-epochs``, ``--patience``, ``--accumulate``. pretrain, finetune."""
    g.add_argument("--lr-step-epochs", type=positive_int, help="halve the lr every this many epochs")
    g.add_argument(
        "--patience", type=positive_int, help="early stop after this many epochs without a better validation score"
    )
    g.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per process and step (default 1)")


def add_max_minutes(g) -> None:
    """``--max-minutes``. pretrain, finetune."""
    g.add_argument("--max-minutes", type=float, help="stop at the first epoch end after this much time")


def add_log_every(g) -> None:
    """``--log-every``. pretrain, finetune."""
    g.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        help="steps between host reads of the training loss (step logs, non-finite check; default 10)",
    )


def add_resume_options(g, *, last: str, anyway: str) -> None:
    """``--resume [CKPT]`` (``last`` without CKPT) and ``--resume-anyway`` (``anyway``: what it lets differ, and
    what must still match). pretrain, finetune."""
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CKPT",
        help=f"continue from {last} (or CKPT); refused, with each difference listed, when the checkpoint was written "
        "with other settings",
    )
    g.add_argument("--resume-anyway", action="store_true", help=f"with --resume: continue although {anyway}")


# genesis_ext.models.backbones.BACKBONES' names (that module needs torch; test_cli checks that this list matches)
ARCH_NAMES = ("unet3d", "resenc-l", "resenc-s", "plain-s", "nnunet", "segresnet")


def add_arch_options(p, default: str) -> None:
    """``--arch``, ``--arch-kwargs``, ``--plans`` and ``--configuration``: the network. pretrain, finetune."""
    p.add_argument(
        "--arch",
        metavar="NAME",
        help=f"the network: {', '.join(n for n in ARCH_NAMES if n != 'nnunet')}, or MODULE:FACTORY (a function "
        f"(in_channels, out_channels, dims, **kwargs) -> nn.Module); nnunet with --plans (default: {default})",
    )
    p.add_argument(
        "--arch-kwargs",
        metavar="JSON",
        help="the architecture's arguments as a JSON object, e.g. '{\"features_per_stage\": [8, 16, 32, 64]}'",
    )
    p.add_argument(
        "--plans",
        metavar="PLANS.json",
        help="the network of an nnU-Net v2 plans file (nnUNetPlans.json of nnUNetv2_plan_and_preprocess): weights "
        "that genesis-ext export --nnunet hands to nnUNetv2_train -pretrained_weights",
    )
    p.add_argument("--configuration", help="the plans' configuration (default 3d_fullres; 2d with --dims 2)")
