"""Fine-tuning (genesis_ext.train.finetuning, ``genesis-ext finetune``) on real chest CT with simple real labels.

Segmentation: lung masks by thresholding (HU < -400; the sample crops lie inside the body) of the two sample CT crops;
classification: cubes cut from them, labelled by whether their mean HU is below -300 (a real, if trivial, label).
Runs on CPU with tiny patches; a run takes about a second.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from conftest import tiny_finetune_config  # noqa: E402
from test_models import flip_bit, offset_of  # noqa: E402

from genesis_ext.cli import main as cli_main  # noqa: E402
from genesis_ext.data import CT_WINDOW, Window  # noqa: E402
from genesis_ext.data.labelled import segmentation_pairs  # noqa: E402
from genesis_ext.evaluation.metrics import dice_iou, multiclass_auc, roc_auc  # noqa: E402
from genesis_ext.models import CheckpointError, GenesisClassifier, UNet3D, save_checkpoint  # noqa: E402
from genesis_ext.models.weights import atomic_save, seal  # noqa: E402
from genesis_ext.train import load_training_state  # noqa: E402
from genesis_ext.train.finetuning import FinetuneConfig, FinetuneError, finetune  # noqa: E402
from genesis_ext.train.losses import dice_loss  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
VOLUMES = sorted(SAMPLE.glob("*.nii.gz"))
pytestmark = pytest.mark.skipif(len(VOLUMES) < 2, reason="data/sample/*.nii.gz (two CT crops) not found")
PATCH = ["32", "32", "16"]


def _cls_args(data, out, *extra):
    """genesis-ext finetune arguments of a classification run on 16^3 cubes, quiet, with ``extra``."""
    return ["finetune", "--task", "classification", "--data", str(data), "--out", str(out), "--patch", "16", "16",
            "16", *extra, "--quiet"]  # fmt: skip


def _seg_args(data, out, *extra):
    return [
        "finetune",
        "--task",
        "segmentation",
        "--data",
        str(data),
        "--out",
        str(out),
        "--patch",
        *PATCH,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--patches-per-volume",
        "2",
        "--val-fraction",
        "0.5",
        "--quiet",
        *extra,
    ]


def _log_rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------------- loss, metrics
def test_dice_loss_matches_hand_computation():
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    p = torch.tensor([0.9, 0.2, 0.4, 0.0, 0.7])
    # sum(y p) = 0.9 + 0.2 + 0.7 = 1.8; sum y = 3; sum p = 2.2 -> 1 - (3.6 + 1) / (3 + 2.2 + 1)
    expected = 1.0 - 4.6 / 6.2
    assert float(dice_loss(p.view(1, 1, 5), y.view(1, 1, 5))) == pytest.approx(expected, abs=1e-6)
    assert float(dice_loss(y, y)) == pytest.approx(0.0, abs=1e-7)
    assert float(dice_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(0.0)  # empty vs empty: smooth term
    with pytest.raises(ValueError):
        dice_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def test_dice_iou_counts():
    assert dice_iou(6, 2, 2) == pytest.approx((12 / 16, 6 / 10))
    assert dice_iou(0, 0, 0) == (1.0, 1.0)
    assert dice_iou(0, 3, 1) == (0.0, 0.0)


def _auc_brute(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.random(n) < 0.4
        labels[0], labels[1] = True, False
        scores = np.round(rng.random(n) + 0.3 * labels, 1)  # rounding makes ties
        assert roc_auc(scores, labels) == pytest.approx(_auc_brute(scores, labels), abs=1e-12)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_multiclass_auc_is_macro_one_vs_rest():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 2, 1, 2])
    expected = np.mean([_auc_brute(probs[:, k], labels == k) for k in range(3)])
    assert multiclass_auc(probs, labels) == pytest.approx(expected)
    assert multiclass_auc(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1])) == 1.0


# ------------------------------------------------------------------------------------------------------ segmentation
@pytest.mark.slow
def test_segmentation_from_scratch_cli(seg_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_seg_args(seg_data, out, "--epochs", "2")) == 0
    assert "val_dice=" in capsys.readouterr().out
    rows = _log_rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        for k in ("train_loss", "val_loss", "val_dice", "val_dice_foreground"):
            assert math.isfinite(float(r[k])), r
        assert 0.0 <= float(r["val_dice"]) <= 1.0 and r["val_dice"] == r["val_dice_foreground"]
        assert 0.0 <= float(r["train_loss"]) <= 1.0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["final"]["epoch"] == 2 and summary["weights"] is None
    # the checkpoints are ours: they load back strictly into a UNet3D
    from genesis_ext.models import load_pretrained

    for name in ("last.pt", "best.pt"):
        load_pretrained(UNet3D(batchnorm="standard"), out / name)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_segmentation_from_our_and_published_checkpoints(seg_data, tmp_path, capsys):
    torch.manual_seed(1)
    model = UNet3D()
    ours = tmp_path / "ours.pt"
    save_checkpoint(model, ours, epoch=3)
    published = tmp_path / "Genesis_Chest_CT.pt"
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "epoch": 7,
        },
        published,
    )
    for weights in (ours, published):
        out = tmp_path / weights.stem
        assert cli_main(_seg_args(seg_data, out, "--weights", str(weights))) == 0
        assert f"loaded {weights} (whole U-Net)" in capsys.readouterr().out
        (row,) = _log_rows(out)
        assert 0.0 <= float(row["val_dice"]) <= 1.0


@pytest.mark.slow
def test_segmentation_runs_are_seeded(seg_data, tmp_path):
    a = finetune(tiny_finetune_config(seg_data, tmp_path / "a"), log=lambda *_: None)["final"]
    b = finetune(tiny_finetune_config(seg_data, tmp_path / "b"), log=lambda *_: None)["final"]
    assert a["train_loss"] == b["train_loss"] and a["val_dice"] == b["val_dice"]


def test_segmentation_other_n_class_loads_all_but_the_output_layer(seg_data, tmp_path):
    torch.manual_seed(2)
    ckpt = tmp_path / "two_class.pt"
    save_checkpoint(UNet3D(n_class=2), ckpt)
    lines = []
    finetune(tiny_finetune_config(seg_data, tmp_path / "run", weights=str(ckpt)), log=lines.append)
    assert any("except its output layer (this task has 1 outputs)" in line for line in lines), lines


def test_segmentation_two_classes(seg_data, tmp_path):
    """Label values 1 (lung, HU < -400) and 2 (bone / contrast, HU > 300): softmax over three output channels
    (background first), a Dice per class in the log."""
    root = tmp_path / "multi"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for f in sorted((seg_data / "images").iterdir()):
        img = nib.load(str(f))
        hu = np.asarray(img.dataobj)
        label = np.where(hu < -400, 1, np.where(hu > 300, 2, 0)).astype(np.uint8)
        nib.save(img, str(root / "images" / f.name))
        nib.save(nib.Nifti1Image(label, img.affine), str(root / "labels" / f.name))
    summary = finetune(
        FinetuneConfig(
            task="segmentation",
            data=str(root),
            out=str(tmp_path / "run"),
            labels="lung,dense",
            patch=(16, 16, 16),
            epochs=1,
            batch_size=2,
            patches_per_volume=3,
            val_fraction=0.5,
            progress=False,
        ),
        log=lambda *_: None,
    )
    final = summary["final"]
    assert 0.0 <= final["val_dice"] <= 1.0
    assert final["val_dice"] == pytest.approx((final["val_dice_lung"] + final["val_dice_dense"]) / 2)
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["state_dict"]["out_tr.final_conv.weight"].shape[0] == 3
    assert checkpoint["model_record"]["labels"] == {"lung": 1, "dense": 2}
    assert checkpoint["model_record"]["activation"] == "softmax"


def test_segmentation_csv_pairs(seg_data, tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text(
        "image,label\n" + "".join(f"{seg_data}/images/{f.name},{seg_data}/labels/{f.name}\n" for f in VOLUMES)
    )
    assert segmentation_pairs(table) == segmentation_pairs(seg_data)


# ---------------------------------------------------------------------------------------------------- classification
@pytest.mark.slow
def test_classification_cli(cls_data, tmp_path, capsys):
    out = tmp_path / "cls"
    weights = tmp_path / "unet.pt"
    save_checkpoint(UNet3D(), weights)  # a U-Net checkpoint: its encoder starts the classifier
    args = _cls_args(
        cls_data, out, "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.35", "--weights", str(weights)
    )
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "loaded the encoder of" in text and "val_auc=" in text
    rows = _log_rows(out)
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= float(r["val_auc"]) <= 1.0 and 0.0 <= float(r["val_accuracy"]) <= 1.0
        assert math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"]))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["classes"] == ["high", "low"]
    ckpt = torch.load(out / "best.pt", weights_only=True)
    GenesisClassifier(2).load_state_dict(ckpt["state_dict"])
    assert ckpt["classes"] == ["high", "low"]


# --------------------------------------------------------------------------------------------------------- bad input
def _fails(args, capsys, *needles):
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_and_corrupt_checkpoints(seg_data, tmp_path, capsys):
    _fails(_seg_args(seg_data, tmp_path / "a", "--weights", str(tmp_path / "nope.pt")), capsys, "no checkpoint file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint at all" * 10)
    _fails(_seg_args(seg_data, tmp_path / "b", "--weights", str(corrupt)), capsys, "not a readable PyTorch checkpoint")
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(UNet3D(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    _fails(_seg_args(seg_data, tmp_path / "c", "--weights", str(truncated)), capsys, "is damaged", "not a readable")


def test_damaged_and_non_finite_weights(seg_data, cls_data, tmp_path, capsys):
    """--weights with one bit flipped inside a tensor, or one NaN in a plain state_dict: refused with the file and the
    tensor named, for both tasks."""
    name = "down_tr64.ops.1.conv1.weight"
    model = UNet3D(width=0.25)
    flipped = tmp_path / "flipped.pt"
    save_checkpoint(model, flipped)
    flip_bit(flipped, offset_of(flipped, model.state_dict()[name]) + 40)
    damaged = (f"{flipped} is damaged: tensor 'state_dict/{name}' does not match its SHA-256 checksum",)
    _fails(_seg_args(seg_data, tmp_path / "a", "--weights", str(flipped)), capsys, *damaged)
    _fails(_cls_args(cls_data, tmp_path / "b", "--weights", str(flipped)), capsys, *damaged)
    state = model.state_dict()
    state[name][0, 0, 1, 1, 1] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    _fails(_seg_args(seg_data, tmp_path / "c", "--weights", str(tmp_path / "nan.pt")), capsys, f"['{name}']", "NaN")


def test_fine_tuning_resume_refuses_other_settings(seg_data, tmp_path):
    """Resume with the volumes moved and another patch size: refused, each difference listed, until
    resume_anyway=True; another width is refused even then (the checkpoint's shapes hold it)."""
    quiet = dict(log=lambda *_: None)
    run = tmp_path / "run"
    finetune(tiny_finetune_config(seg_data, run, width=0.25), **quiet)
    moved = tmp_path / "moved"
    shutil.copytree(seg_data, moved)
    resumed = dict(width=0.25, epochs=2, resume=True, patch=(16, 16, 8))
    with pytest.raises(ValueError) as err:
        finetune(tiny_finetune_config(moved, run, **resumed), **quiet)
    for line in (
        f"data: {str(seg_data)!r} recorded vs {str(moved)!r} now",
        "patch: [16, 16, 16] recorded vs [16, 16, 8]",
    ):
        assert line in str(err.value), str(err.value)
    with pytest.raises(ValueError, match=r"width: 0.25 recorded vs 0.5 now\n(.|\n)*cannot change width"):
        finetune(tiny_finetune_config(seg_data, run, width=0.5, epochs=2, resume=True, resume_anyway=True), **quiet)
    summary = finetune(tiny_finetune_config(moved, run, resume_anyway=True, **resumed), **quiet)
    assert summary["epochs"] == 2 and [r["epoch"] for r in _log_rows(run)] == ["1", "2"]
    with pytest.raises(FinetuneError, match="resume_anyway goes with resume"):
        finetune(tiny_finetune_config(seg_data, tmp_path / "new", resume_anyway=True), **quiet)


def test_fine_tuning_resume_compares_the_width_read_off_the_weights(seg_data, tmp_path):
    """width None takes the --weights checkpoint's: the run records the width it built (0.25), and a resume that
    would build another (1, without those weights) lists it."""
    quiet = dict(log=lambda *_: None)
    weights = tmp_path / "w.pt"
    save_checkpoint(UNet3D(width=0.25), weights)
    finetune(tiny_finetune_config(seg_data, tmp_path / "run", weights=str(weights)), **quiet)
    with pytest.raises(ValueError, match=r"width: 0.25 recorded vs 1.0 now"):
        finetune(tiny_finetune_config(seg_data, tmp_path / "run", epochs=2, resume=True), **quiet)
    # checkpoints written before the width as built was recorded say None: the shapes decide
    state = load_training_state(tmp_path / "run" / "last.pt")
    atomic_save(seal({**state, "config": {**state["config"], "width": None}}), tmp_path / "run" / "last.pt")
    resumed = dict(weights=str(weights), epochs=2, resume=True)
    assert finetune(tiny_finetune_config(seg_data, tmp_path / "run", **resumed), **quiet)["epochs"] == 2


def test_classification_resume_refuses_other_class_names(cls_data, tmp_path):
    """The same number of classes under other names would train the head's outputs on other labels: refused."""
    quiet = dict(log=lambda *_: None)
    run = tmp_path / "run"
    finetune(tiny_finetune_config(cls_data, run, task="classification", width=0.25, batch_size=4), **quiet)
    names = {"high": "dense", "low": "airy"}  # sorted the other way round: the head's outputs would swap labels
    rows = [line.split(",") for line in cls_data.read_text().splitlines()[1:]]
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("path,label\n" + "".join(f"{cls_data.parent / p},{names[label]}\n" for p, label in rows))
    cfg = tiny_finetune_config(
        renamed, run, task="classification", width=0.25, batch_size=4, epochs=2, resume=True, resume_anyway=True
    )
    with pytest.raises(ValueError, match=r"classes: \['high', 'low'\] recorded vs \['airy', 'dense'\] now"):
        finetune(cfg, **quiet)


def test_wrong_architecture_weights(seg_data, cls_data, tmp_path, capsys):
    classifier = tmp_path / "classifier.pt"
    save_checkpoint(GenesisClassifier(3), classifier)  # an encoder + head, no decoder: not a U-Net
    _fails(_seg_args(seg_data, tmp_path / "a", "--weights", str(classifier)), capsys, "does not fit", "missing key")
    two_channel = tmp_path / "two_channel.pt"
    save_checkpoint(UNet3D(in_channels=2), two_channel)
    _fails(_seg_args(seg_data, tmp_path / "b", "--weights", str(two_channel)), capsys, "shape mismatch")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3, 3)}}, other)
    _fails(
        _cls_args(cls_data, tmp_path / "c", "--weights", str(other)),
        capsys,
        "does not fit the encoder",
    )


def test_empty_and_malformed_data(tmp_path, capsys, seg_data):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    _fails(_seg_args(empty, tmp_path / "a"), capsys, "no image/label pairs")
    _fails(_seg_args(tmp_path / "missing", tmp_path / "b"), capsys, "no such file or directory")
    bare = tmp_path / "bare"
    bare.mkdir()
    _fails(_seg_args(bare, tmp_path / "c"), capsys, "images/", "labels/")
    table = tmp_path / "empty.csv"
    table.write_text("path,label\n")
    _fails(
        ["finetune", "--task", "classification", "--data", str(table), "--out", str(tmp_path / "d"), "--quiet"],
        capsys,
        "no rows",
    )
    # a label whose shape differs from its image
    bad = tmp_path / "mismatch"
    (bad / "images").mkdir(parents=True)
    (bad / "labels").mkdir()
    f = VOLUMES[0]
    img = nib.load(str(f))
    nib.save(img, str(bad / "images" / f.name))
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), img.affine), str(bad / "labels" / f.name))
    _fails(_seg_args(bad, tmp_path / "e", "--val-fraction", "0"), capsys, "differs from its image")
    # an image without its label
    (bad / "images" / "extra.nii.gz").write_bytes((bad / "images" / f.name).read_bytes())
    _fails(_seg_args(bad, tmp_path / "f"), capsys, "without a partner", "extra")


def test_batch_size_larger_than_data(seg_data, cls_data, tmp_path, capsys):
    # 1 training volume x 2 patches per epoch < batch 4
    _fails(_seg_args(seg_data, tmp_path / "a", "--batch-size", "4"), capsys, "--batch-size 4 is larger than the 2")
    _fails(
        _cls_args(cls_data, tmp_path / "b", "--batch-size", "500"),
        capsys,
        "--batch-size 500 is larger",
    )


def test_bad_options(seg_data, tmp_path, capsys):
    _fails(_seg_args(seg_data, tmp_path / "a", "--patch", "20", "32", "16"), capsys, "multiple of 8")
    _fails(_seg_args(seg_data, tmp_path / "b", "--val-fraction", "1.0"), capsys, "--val-fraction")
    # one volume cannot be split into training and validation volumes
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    (one / "labels").mkdir()
    for sub in ("images", "labels"):
        (one / sub / VOLUMES[0].name).write_bytes((seg_data / sub / VOLUMES[0].name).read_bytes())
    with pytest.raises(FinetuneError, match="at least 2"):
        finetune(
            FinetuneConfig(
                task="segmentation",
                data=str(one),
                out=str(tmp_path / "c"),
                patch=(16, 16, 16),
                val_fraction=0.2,
                progress=False,
            ),
            log=lambda *_: None,
        )


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError) and issubclass(FinetuneError, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# What --weights loads, checked on the weights themselves (not the log): one epoch of one Adam step (lr 1e-3) moves
# each weight by about 1e-3, far less than a checkpoint's weights differ from a fresh initialisation (measured: at
# least 0.015 per conv tensor), so a loaded tensor ends within a quarter of that distance and a fresh one does not.


def _conv_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith("weight") and v.dim() > 1}


def _distance(run: Path, ckpt: Path) -> dict:
    """max |trained - checkpoint| per conv weight the two share (by name and shape)."""
    trained = _conv_weights(torch.load(run / "last.pt", weights_only=True)["state_dict"])
    source = _conv_weights(torch.load(ckpt, weights_only=True)["state_dict"])
    return {
        k: float((trained[k] - v).abs().max())
        for k, v in source.items()
        if k in trained and v.shape == trained[k].shape
    }


def _finetune(data, out, weights, **kw):
    weights = None if weights is None else str(weights)
    finetune(tiny_finetune_config(data, out, weights=weights, **kw), log=lambda *_: None)
    return Path(out)


def test_weights_modes_load_what_they_say(seg_data, cls_data, tmp_path):
    torch.manual_seed(123)  # not the fine-tuning run's seed: its fresh weights differ from the checkpoint's
    unet = tmp_path / "unet.pt"
    save_checkpoint(UNet3D(), unet)
    two = tmp_path / "two_class.pt"
    save_checkpoint(UNet3D(n_class=2), two)

    scratch = _distance(_finetune(seg_data, tmp_path / "scratch", None), unet)  # nothing loaded: the yardstick

    def loaded(distances):
        return sorted(k for k, d in distances.items() if d < 0.25 * scratch[k])

    whole = _distance(_finetune(seg_data, tmp_path / "whole", unet), unet)
    assert len(whole) == 18 and loaded(whole) == sorted(whole)  # every conv, the output layer included
    but_output = _distance(_finetune(seg_data, tmp_path / "but_output", two), two)
    assert loaded(but_output) == sorted(k for k in whole if k != "out_tr.final_conv.weight")
    encoder = _distance(_finetune(cls_data, tmp_path / "encoder", unet, task="classification"), unet)
    assert loaded(encoder) == sorted(k for k in whole if k.startswith("down_tr"))


def test_each_class_of_a_label_map_gets_its_own_index(tmp_path):
    """Classes lung=1, dense=2: the target's class k is label == value of the k-th class."""
    from genesis_ext.data import Window
    from genesis_ext.data.labelled import LabelledPair, load_seg_case

    f = VOLUMES[0]
    img = nib.load(str(f))
    hu = np.asarray(img.dataobj)
    label = np.where(hu < -400, 1, np.where(hu > 300, 2, 0)).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, img.affine), str(tmp_path / "label.nii.gz"))
    pair = LabelledPair("case", f, tmp_path / "label.nii.gz")
    case = load_seg_case(pair, {"dense": 2, "lung": 1}, Window(-1000.0, 1000.0))
    assert np.array_equal(case.target == 1, label == 2) and np.array_equal(case.target == 2, label == 1)
    assert (case.target == 1).any() and (case.target == 2).any()


# ---------------------------------------------------------------------------------------------------------------------
# The data forms, --weights of another task or shape, --trainer, label budgets, the model record and BatchNorm in
# validation, on the tiny configs (width 0.25: a run takes about a second).
QUIET = dict(log=lambda *_: None)


def _lung_and_dense(seg_data, root: Path, dense_value: int = 2) -> list[tuple[Path, Path]]:
    """seg_data's images with label maps lung (HU < -400) = 1, dense (HU > 300) = ``dense_value``, in root/images
    and root/labels: the (image, label) files."""
    files = []
    for f in sorted((seg_data / "images").iterdir()):
        img = nib.load(str(f))
        hu = np.asarray(img.dataobj)
        label = np.where(hu < -400, 1, np.where(hu > 300, dense_value, 0)).astype(np.uint8)
        files.append((root / "images" / f.name, root / "labels" / f.name))
        files[-1][0].parent.mkdir(parents=True, exist_ok=True)
        files[-1][1].parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(files[-1][0]))
        nib.save(nib.Nifti1Image(label, img.affine), str(files[-1][1]))
    return files


def test_fine_tuning_from_a_decathlon_dataset_json_records_its_classes(seg_data, tmp_path):
    files = _lung_and_dense(seg_data, tmp_path / "data", dense_value=4)  # non-consecutive values
    spec = {
        "name": "lungs",
        "labels": {"0": "background", "1": "lung", "4": "dense"},
        "training": [{"image": f"./images/{i.name}", "label": f"./labels/{k.name}"} for i, k in files],
    }
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(spec))
    cfg = tiny_finetune_config(tmp_path / "data" / "dataset.json", tmp_path / "run", width=0.25)
    summary = finetune(cfg, **QUIET)
    assert summary["labels"] == {"lung": 1, "dense": 4}
    assert set(summary["final"]) >= {"val_dice", "val_dice_lung", "val_dice_dense"}
    record = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model_record"]
    assert record["labels"] == {"lung": 1, "dense": 4} and list(record["labels"]) == ["lung", "dense"]
    assert record["activation"] == "softmax"  # two classes: dice_ce


def test_labels_missing_a_value_of_a_label_map_exit_2_naming_the_file(seg_data, tmp_path, capsys):
    files = _lung_and_dense(seg_data, tmp_path / "data")
    _fails(
        _seg_args(tmp_path / "data", tmp_path / "a", "--labels", "lung"),  # dense (2) is in the maps
        capsys,
        "holds label values [2] outside the classes {'lung': 1}",
        "--labels",
    )
    err = _fails(_seg_args(tmp_path / "data", tmp_path / "b", "--labels", "lung=1,dense=3"), capsys, "[2]")
    assert any(str(label) in err for _, label in files), err
    assert not (tmp_path / "a" / "last.pt").exists() and not (tmp_path / "b" / "last.pt").exists()


def test_weights_of_a_classification_checkpoint_are_refused_for_segmentation(seg_data, cls_data, tmp_path, capsys):
    """A classifier fine-tuned here (its model record says task classification) given to a segmentation run."""
    finetune(tiny_finetune_config(cls_data, tmp_path / "cls", task="classification", width=0.25, batch_size=4), **QUIET)
    ckpt = tmp_path / "cls" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["model_record"]["task"] == "classification"
    _fails(
        _seg_args(seg_data, tmp_path / "seg", "--weights", str(ckpt)),
        capsys,
        f"--weights {ckpt} is a classification checkpoint; this run fine-tunes segmentation",
    )
    assert not (tmp_path / "seg" / "last.pt").exists()


def test_a_fine_tuned_segmentation_checkpoint_starts_a_classification(seg_data, cls_data, tmp_path):
    """The other way round is a usable start: a segmentation U-Net's encoder is the classifier's."""
    finetune(tiny_finetune_config(seg_data, tmp_path / "seg", width=0.25), **QUIET)
    lines = []
    weights = str(tmp_path / "seg" / "last.pt")
    cfg = tiny_finetune_config(cls_data, tmp_path / "cls", task="classification", batch_size=4, weights=weights)
    finetune(cfg, log=lines.append)
    assert f"loaded the encoder of {weights}; the classification head is freshly initialised" in lines


def test_weights_of_another_input_or_dimensionality_are_refused(seg_data, tmp_path, capsys):
    from genesis_ext.models import UNet2D

    two_channel, flat, deep = tmp_path / "two_channel.pt", tmp_path / "unet2d.pt", tmp_path / "unet3d.pt"
    save_checkpoint(UNet3D(in_channels=2, width=0.25), two_channel)
    save_checkpoint(UNet2D(width=0.25), flat)
    save_checkpoint(UNet3D(width=0.25), deep)
    fix = "pass weights of this network: the same --dims, input channels and --width, or none"
    _fails(
        _seg_args(seg_data, tmp_path / "a", "--weights", str(two_channel)),
        capsys,
        f"checkpoint {two_channel} does not fit the UNet3D",
        "'down_tr64.ops.0.conv1.weight': checkpoint (8, 2, 3, 3, 3) vs model (8, 1, 3, 3, 3)",
        fix,
    )
    _fails(
        _seg_args(seg_data, tmp_path / "b", "--weights", str(flat)),
        capsys,
        f"checkpoint {flat} does not fit the UNet3D",
        "'down_tr64.ops.0.conv1.weight': checkpoint (8, 1, 3, 3) vs model (8, 1, 3, 3, 3)",
        "shape mismatch",
        fix,
    )
    _fails(
        _seg_args(seg_data, tmp_path / "c", "--weights", str(deep), "--dims", "2", "--patch", "16", "16"),
        capsys,
        f"checkpoint {deep} does not fit the UNet2D",
        "'down_tr64.ops.0.conv1.weight': checkpoint (8, 1, 3, 3, 3) vs model (8, 1, 3, 3)",
        fix,
    )


# --trainer: docs/training.md's example, written to a file as a user would
MY_TRAINERS = """
import torch

from genesis_ext.train import PretrainTrainer
from genesis_ext.train.finetuning import ClassificationTrainer, SegmentationTrainer


class L1Pretrainer(PretrainTrainer):
    def loss(self, output, target):
        return torch.nn.functional.l1_loss(output.float(), target)


class LoggingSegmentation(SegmentationTrainer):
    def setup(self):
        super().setup()
        self.log(f"LoggingSegmentation: {len(self.train_cases)} training case(s)")


class LoggingClassification(ClassificationTrainer):
    pass


NOT_A_CLASS = 3
"""


def _pretrain_loss(cubes, out: Path, *extra) -> float:
    """The training loss of one step of pre-training (batch 2, width 0.25, seeded) through the command line."""
    args = ["pretrain", "--data", str(cubes), "--out", str(out), "--width", "0.25", "--batch-size", "2",
            "--steps-per-epoch", "1", "--epochs", "1", "--val-fraction", "0.2", "--preview-every", "0",
            "--no-tensorboard", "--quiet", *extra]  # fmt: skip
    assert cli_main(args) == 0
    with open(out / "metrics.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    return float(row["train_loss"])


def test_pretrain_trainer_from_a_file_changes_the_loss(cubes, tmp_path, capsys):
    """The same first step (seed, batch, initial network) under MSE and under the file's L1: the residuals d lie in
    [-1, 1] (sigmoid outputs, targets in [0, 1]), so mean d^2 < mean |d| <= sqrt(mean d^2), and only an L1 loss
    of those residuals lands there."""
    (tmp_path / "my_trainers.py").write_text(MY_TRAINERS)
    mse = _pretrain_loss(cubes, tmp_path / "mse")
    l1 = _pretrain_loss(cubes, tmp_path / "l1", "--trainer", f"{tmp_path / 'my_trainers.py'}:L1Pretrainer")
    assert mse < l1 <= math.sqrt(mse) * (1 + 1e-6), (mse, l1)


def test_finetune_trainer_from_a_file_is_used(seg_data, tmp_path, capsys):
    (tmp_path / "my_trainers.py").write_text(MY_TRAINERS)
    args = _seg_args(seg_data, tmp_path / "run", "--width", "0.25", "--trainer",
                     f"{tmp_path / 'my_trainers.py'}:LoggingSegmentation")  # fmt: skip
    assert cli_main(args) == 0
    assert "LoggingSegmentation: 1 training case(s)" in capsys.readouterr().out
    assert (tmp_path / "run" / "last.pt").exists()


def test_bad_trainer_specs_exit_2(seg_data, cls_data, tmp_path, capsys):
    from genesis_ext.train.cli import load_trainer
    from genesis_ext.train.finetuning import SegmentationTrainer

    mine = tmp_path / "my_trainers.py"
    mine.write_text(MY_TRAINERS)
    for spec, needles in (
        (str(mine), ["give MODULE:CLASS"]),
        (f"{mine}:", ["give MODULE:CLASS"]),
        (f"{tmp_path / 'nope.py'}:L1Pretrainer", ["cannot import", f"no file {tmp_path / 'nope.py'}"]),
        ("no_such_module_for_genesis:Trainer", ["cannot import no_such_module_for_genesis"]),
        (f"{mine}:Missing", [f"{mine} has no class named Missing"]),
        (f"{mine}:NOT_A_CLASS", ["has no class named NOT_A_CLASS"]),
        (f"{mine}:L1Pretrainer", ["L1Pretrainer is a subclass of PretrainTrainer, not of SegmentationTrainer"]),
        (f"{mine}:LoggingClassification", ["is a subclass of ClassificationTrainer, not of SegmentationTrainer"]),
    ):
        _fails(_seg_args(seg_data, tmp_path / "run", "--trainer", spec), capsys, f"--trainer {spec!r}", *needles)
    _fails(
        _cls_args(cls_data, tmp_path / "run", "--trainer", f"{mine}:LoggingSegmentation"),
        capsys,
        "is a subclass of SegmentationTrainer, not of ClassificationTrainer",
    )
    pretrain_args = ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]
    _fails([*pretrain_args, "--trainer", f"{mine}:LoggingSegmentation"], capsys, "not of PretrainTrainer")
    assert not (tmp_path / "run").exists()  # refused before anything ran
    # an importable module names its class the same way
    assert load_trainer("genesis_ext.train.finetuning:SegmentationTrainer", SegmentationTrainer) is SegmentationTrainer
    with pytest.raises(FinetuneError, match="is not a subclass of SegmentationTrainer"):
        finetune(tiny_finetune_config(seg_data, tmp_path / "api"), trainer=object, **QUIET)


def test_label_budget_of_slabs_trains_on_the_slabs_kept(seg_data, tmp_path):
    """The training case is 32 slices deep. Slabs of 16 slices: a budget of 0.5 keeps one, 1.0 or 2 both (the case
    as it is); slabs of 4 (--slab-depth): a budget of 3 keeps 12 slices labelled. The images stay whole."""
    from genesis_ext.data.labelled import IGNORE
    from genesis_ext.train.finetuning import SegmentationTrainer

    lines = []
    summary = finetune(
        tiny_finetune_config(seg_data, tmp_path / "run", width=0.25, label_budget=0.5, budget_unit="slabs"),
        log=lines.append,
    )
    assert summary["epochs"] == 1
    assert any("1 training case(s), 16 labelled slice(s) (2 patches of (16, 16, 16) per epoch)" in x for x in lines)
    for budget, depth, labelled in ((0.5, None, 16), (1.0, None, 32), (2, None, 32), (3, 4, 12)):
        cfg = tiny_finetune_config(seg_data, tmp_path / f"b{budget}", label_budget=budget, budget_unit="slabs",
                                   slab_depth=depth)  # fmt: skip
        trainer = SegmentationTrainer(cfg, **QUIET)
        trainer.setup()
        (case,) = trainer.train_cases
        assert case.image.shape[-1] == 32 and int((case.target != IGNORE).all(axis=(0, 1)).sum()) == labelled, budget
    with pytest.raises(FinetuneError, match="has 2 slabs"):
        SegmentationTrainer(tiny_finetune_config(seg_data, tmp_path / "c", label_budget=3, budget_unit="slabs"),
                            **QUIET).setup()  # fmt: skip


@pytest.mark.parametrize("loss", ["dice", "dice_ce"])
def test_losses_leave_unlabelled_voxels_out(loss):
    """A target whose second half is IGNORE gives the loss of the first half alone, whatever the output there."""
    from genesis_ext.data.labelled import IGNORE
    from genesis_ext.train.losses import LOSSES

    fn = LOSSES[loss]
    gen = torch.Generator().manual_seed(0)
    channels = 2 if loss == "dice" else 3
    output = torch.rand(2, channels, 6, 5, 8, generator=gen)
    target = torch.randint(0, 3, (2, 6, 5, 8), generator=gen)
    target[..., 4:] = IGNORE
    expected = fn(output[..., :4], target[..., :4])
    assert float(fn(output, target)) == pytest.approx(float(expected), rel=1e-6)
    output[..., 4:] = torch.rand(2, channels, 6, 5, 4, generator=gen) * 10
    assert float(fn(output, target)) == pytest.approx(float(expected), rel=1e-6)


def _record(run: Path):
    from genesis_ext.models import ModelRecord

    checkpoint = torch.load(run / "last.pt", weights_only=True)
    record = ModelRecord.from_dict(checkpoint["model_record"], source=run / "last.pt")
    assert record.to_dict() == checkpoint["model_record"]  # round trip
    model = record.build_model()
    model.load_state_dict(checkpoint["state_dict"])  # strictly: the record describes the network saved
    best = torch.load(run / "best.pt", weights_only=True)["model_record"]
    assert best == checkpoint["model_record"]
    return record, model


def test_the_model_record_describes_the_run(seg_data, tmp_path):
    two = tmp_path / "two"
    _lung_and_dense(seg_data, two)
    finetune(tiny_finetune_config(two, tmp_path / "softmax", width=0.25, labels="lung,dense", window=(-500, 700)),
             **QUIET)  # fmt: skip
    record, model = _record(tmp_path / "softmax")
    assert (record.task, record.dims, record.in_channels, record.width) == ("segmentation", 3, 1, 0.25)
    assert record.labels == {"lung": 1, "dense": 2} and record.activation == "softmax" and record.n_outputs == 3
    assert record.batchnorm == "standard"  # --batchnorm running, the default
    assert record.patch == (16, 16, 16) and record.window == Window(-500.0, 700.0) and record.modality == "ct"
    assert record.spacing == (1.5, 1.5, 1.5)  # the sample crops' spacing, no --spacing given
    assert model.out_tr.final_conv.out_channels == 3
    finetune(tiny_finetune_config(seg_data, tmp_path / "sigmoid", width=0.25, batchnorm="batch_stats",
                                  spacing=(2.0, 2.0, 3.0)), **QUIET)  # fmt: skip
    record, model = _record(tmp_path / "sigmoid")
    assert record.labels == {"foreground": 1} and record.activation == "sigmoid" and record.n_outputs == 1
    assert record.batchnorm == "batch_stats" and record.spacing == (2.0, 2.0, 3.0) and record.window == CT_WINDOW
    finetune(tiny_finetune_config(seg_data, tmp_path / "flat", width=0.25, dims=2, patch=(16, 16)), **QUIET)
    record, _ = _record(tmp_path / "flat")
    assert record.dims == 2 and record.patch == (16, 16, 1)


@pytest.mark.parametrize("batchnorm", ["running", "batch_stats"])
def test_validation_uses_running_batchnorm_statistics_by_default(batchnorm, seg_data, tmp_path):
    """With "running" (the default) the eval network is torch's BatchNorm: a patch's output does not depend on the
    patches beside it, nor the whole-volume probabilities of validation on the sliding window's batch size. With
    "batch_stats" (published) both do."""
    from genesis_ext.models.unet3d import BatchStatsBatchNorm3d
    from genesis_ext.train.finetuning import SegmentationTrainer

    changes = {} if batchnorm == "running" else {"batchnorm": "batch_stats"}
    cfg = tiny_finetune_config(seg_data, tmp_path / "run", width=0.25, **changes)
    assert cfg.batchnorm == "running" or changes
    trainer = SegmentationTrainer(cfg, **QUIET)
    trainer.fit()
    norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 14
    expected = torch.nn.BatchNorm3d if batchnorm == "running" else BatchStatsBatchNorm3d
    assert all(type(m) is expected for m in norms)
    model = trainer.model.eval()
    x = torch.from_numpy(np.random.default_rng(0).random((3, 1, 16, 16, 16), dtype=np.float32))
    with torch.no_grad():
        alone, together = model(x[:1]), model(x)[:1]
    image = trainer.val_cases[0].image
    trainer.cfg.batch_size = 1
    one = trainer.predict_probabilities(image)
    trainer.cfg.batch_size = 4
    four = trainer.predict_probabilities(image)
    independent = torch.allclose(alone, together, atol=1e-5) and torch.allclose(one, four, atol=1e-5)
    assert independent == (batchnorm == "running"), float((alone - together).abs().max())
    if batchnorm == "batch_stats":
        assert not torch.allclose(alone, together, atol=1e-3) and not torch.allclose(one, four, atol=1e-3)


def test_weights_are_read_once(seg_data, tmp_path, monkeypatch):
    """--weights is read and verified once per run (the width, the task check and the load all use that read)."""
    from genesis_ext.models import weights as weights_module

    path = tmp_path / "w.pt"
    save_checkpoint(UNet3D(width=0.25), path)
    reads = []
    real = weights_module.read_checkpoint
    monkeypatch.setattr(weights_module, "read_checkpoint", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    finetune(tiny_finetune_config(seg_data, tmp_path / "run", weights=str(path)), **QUIET)
    assert reads == [str(path)]


@pytest.mark.parametrize("verb", ["finetune", "pretrain"])
def test_every_option_of_a_verb_sets_its_config_field(verb):
    """Configs are built from the parsed arguments by field name: an option without a field would be dropped
    silently, a field without an option cannot be set from the command line (only these few, on purpose)."""
    import argparse
    import dataclasses

    from genesis_ext.train import cli
    from genesis_ext.train.pretraining import PretrainConfig

    arch = {"arch_kwargs", "plans", "configuration"}  # arch_from_args makes them the config's arch
    add, config, converted, python_only = {
        "finetune": (cli.add_finetune_arguments, FinetuneConfig, {"trainer", *arch}, {"channels_last", "lr_gamma"}),
        "pretrain": (cli.add_pretrain_arguments, PretrainConfig, {"trainer", "deformations", *arch},
                     {"channels_last", "lr_gamma", "deform", "volume_filter"}),
    }[verb]  # fmt: skip
    parser = argparse.ArgumentParser()
    add(parser)
    options = {a.dest for a in parser._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(config)}
    assert options - fields == converted and fields - options == python_only


def test_fine_tuning_decays_the_lr_as_nnunet_by_default(seg_data, tmp_path):
    """poly: epoch e (from 0) trains at lr x (1 - e / epochs)^0.9, so the last weights settle; --lr-step-epochs
    alone means the step schedule, and constant keeps the lr."""
    width = dict(width=0.25)
    runs = {
        "poly": ({}, [1e-3 * (1 - e / 3) ** 0.9 for e in range(3)]),
        "step": ({"lr_step_epochs": 2}, [1e-3, 1e-3, 5e-4]),
        "constant": ({"lr_schedule": "constant"}, [1e-3] * 3),
    }
    for name, (changes, expected) in runs.items():
        out = tmp_path / name
        finetune(tiny_finetune_config(seg_data, out, epochs=3, val_fraction=0.0, **width, **changes), **QUIET)
        assert [float(r["lr"]) for r in _log_rows(out)] == pytest.approx(expected), name
    with pytest.raises(FinetuneError, match="--lr-schedule step needs --lr-step-epochs"):
        finetune(tiny_finetune_config(seg_data, tmp_path / "bad", lr_schedule="step"), **QUIET)
