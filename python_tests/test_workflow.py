"""The whole workflow through the command line, at a tiny size: extract -> pretrain -> finetune -> predict -> evaluate,
on the bundled sample CT and (when present) the shared abdominal CT with its organ masks. Each verb reads what the one
before it wrote, as a user's shell session would; README.md and docs/finetuning.md show the same commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")
pytest.importorskip("scipy")

from conftest import REPO  # noqa: E402

from genesis_ext.cli import main  # noqa: E402

SAMPLE = REPO / "data" / "sample"
ABDOMEN = REPO.parent / "shared" / "data" / "abdomen-ct"
ABDOMEN_MR = REPO.parent / "shared" / "data" / "abdomen-mr"
TINY_PRETRAIN = ["--width", "0.125", "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1", "--quiet",
                 "--no-tensorboard", "--preview-every", "0"]  # fmt: skip
TINY_FINETUNE = ["--patch", "32", "32", "16", "--epochs", "1", "--batch-size", "2", "--patches-per-volume", "2",
                 "--quiet"]  # fmt: skip


def _pretrained(tmp_path: Path) -> Path:
    """genesis-ext extract + pretrain on the bundled CT: the weights the fine-tuning starts from."""
    store, run = tmp_path / "cubes", tmp_path / "pretrain"
    extract = ["extract", *map(str, sorted(SAMPLE.glob("*.nii.gz"))), "--out", str(store), "--cube", "32", "32", "16",
               "--per-volume", "6", "--filter", "foreground", "--quiet"]  # fmt: skip
    assert main(extract) == 0
    assert main(["pretrain", "--data", str(store), "--out", str(run), *TINY_PRETRAIN]) == 0
    return run / "checkpoints" / "last.pt"


def _evaluate(pred: Path, ref: Path, out: Path, *labels: str) -> list[dict]:
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out), *labels, "--quiet"]) == 0
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def _same_grid(prediction: Path, image: Path) -> np.ndarray:
    """The prediction's array, after checking that it lies on the image's own grid (shape and affine)."""
    pred, img = nib.load(str(prediction)), nib.load(str(image))
    assert pred.shape == img.shape and np.allclose(pred.affine, img.affine, atol=1e-4)
    return np.asarray(pred.dataobj)


def test_workflow_on_the_bundled_ct(seg_data, tmp_path, capsys):
    """One sample crop with its lung mask trains (a Decathlon dataset.json), from our own pre-trained weights; the other
    crop, held out, is segmented and scored. The lung (HU < -400) is learnable in 60 steps, so the held-out Dice must
    be high (0.94 measured), and evaluate's Dice must be the one counted here from the files."""
    weights = _pretrained(tmp_path)
    train, held_out = sorted(p.name for p in (seg_data / "images").iterdir())

    def dataset(case: str) -> Path:
        entry = {"image": str(seg_data / "images" / case), "label": str(seg_data / "labels" / case)}
        path = tmp_path / f"{case}.json"
        path.write_text(json.dumps({"labels": {"0": "background", "1": "lung"}, "training": [entry]}))
        return path

    run = tmp_path / "finetune"
    finetune = ["finetune", "--task", "segmentation", "--data", str(dataset(train)), "--val-data",
                str(dataset(held_out)), "--out", str(run), "--weights", str(weights), "--patch", "32", "32", "16",
                "--epochs", "15", "--batch-size", "4", "--patches-per-volume", "16", "--lr", "3e-3",
                "--quiet"]  # fmt: skip
    assert main(finetune) == 0
    assert "val_dice=" in capsys.readouterr().out
    predicted, image = tmp_path / "predicted", seg_data / "images" / held_out
    assert main(["predict", "--weights", str(run / "last.pt"), str(image), "--out", str(predicted), "--quiet"]) == 0
    labels = _same_grid(predicted / held_out, image)
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / held_out).write_bytes((seg_data / "labels" / held_out).read_bytes())
    (row,) = _evaluate(predicted, refs, tmp_path / "scores.csv", "--labels", "lung")
    reference = np.asarray(nib.load(str(refs / held_out)).dataobj) > 0
    counted = 2 * np.sum((labels == 1) & reference) / (np.sum(labels == 1) + np.sum(reference))
    assert row["label"] == "lung" and float(row["dice"]) == pytest.approx(counted) and counted > 0.8
    assert set(np.unique(labels)) == {0, 1}


@pytest.mark.skipif(not (ABDOMEN / "ct.nii.gz").is_file(), reason="the shared abdominal CT is not present")
def test_workflow_on_the_abdominal_ct(tmp_path):
    """Liver and spleen as one softmax task from a folder of masks per case, the whole abdominal CT predicted on its
    own grid and scored per class."""
    weights = _pretrained(tmp_path)
    data = tmp_path / "abdomen"
    (data / "images").mkdir(parents=True)
    (data / "labels" / "case").mkdir(parents=True)
    (data / "images" / "case.nii.gz").symlink_to(ABDOMEN / "ct.nii.gz")
    for organ in ("liver", "spleen"):
        (data / "labels" / "case" / f"{organ}.nii.gz").symlink_to(ABDOMEN / "masks" / f"{organ}.nii.gz")
    run = tmp_path / "finetune"
    finetune = ["finetune", "--task", "segmentation", "--data", str(data), "--out", str(run), "--weights",
                str(weights), "--labels", "liver,spleen", "--val-fraction", "0", *TINY_FINETUNE]  # fmt: skip
    assert main(finetune) == 0
    record = torch.load(run / "last.pt", weights_only=True)["model_record"]
    assert record["labels"] == {"liver": 1, "spleen": 2} and record["activation"] == "softmax"
    predicted = tmp_path / "predicted"
    image = ABDOMEN / "ct.nii.gz"
    assert main(["predict", "--weights", str(run / "last.pt"), str(image), "--out", str(predicted), "--quiet"]) == 0
    labels = _same_grid(predicted / "ct.nii.gz", image)
    assert set(np.unique(labels)) <= {0, 1, 2}
    reference = np.zeros(labels.shape, dtype=np.uint8)
    for value, organ in enumerate(("liver", "spleen"), start=1):
        reference[np.asarray(nib.load(str(ABDOMEN / "masks" / f"{organ}.nii.gz")).dataobj) > 0.5] = value
    refs = tmp_path / "refs"
    refs.mkdir()
    nib.save(nib.Nifti1Image(reference, nib.load(str(image)).affine), str(refs / "ct.nii.gz"))
    rows = _evaluate(predicted, refs, tmp_path / "scores.csv", "--labels", "liver,spleen")
    assert [r["label"] for r in rows] == ["liver", "spleen"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


@pytest.mark.skipif(not (ABDOMEN_MR / "mr.nii.gz").is_file(), reason="the shared abdominal MRI is not present")
def test_workflow_on_the_abdominal_mr(tmp_path):
    """MR end to end: extract with --modality mr pads the 20-slice scan to 32-slice cubes, pre-training records the
    modality, fine-tuning takes it from the weights (a liver model from the label map's value 5) and prediction
    windows the scan by its own body percentiles, on the scan's own grid."""
    store, pre, run, predicted = (tmp_path / name for name in ("cubes", "pretrain", "finetune", "predicted"))
    extract = ["extract", str(ABDOMEN_MR), "--out", str(store), "--modality", "mr", "--cube", "32", "32", "32", "--pad",
               "--per-volume", "6", "--quiet"]  # fmt: skip
    assert main(extract) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["params"]["modality"] == "mr" and manifest["params"]["filter"]["name"] == "body"
    (volume,) = manifest["volumes"]  # labels.nii.gz is skipped as a label map
    assert volume["padded"] == [[0, 0], [0, 0], [6, 6]] and volume["count"] == 6
    assert main(["pretrain", "--data", str(store), "--out", str(pre), *TINY_PRETRAIN]) == 0
    weights = torch.load(pre / "checkpoints" / "last.pt", weights_only=True)
    assert weights["modality"] == "mr" and weights["intensity"]["region"] == "body"
    data = tmp_path / "abdomen"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "images" / "case.nii.gz").symlink_to(ABDOMEN_MR / "mr.nii.gz")
    label_map = nib.load(str(ABDOMEN_MR / "labels.nii.gz"))  # 24 classes; the liver (5) alone is the task
    liver = (np.asarray(label_map.dataobj) == 5).astype(np.uint8) * 5
    nib.save(nib.Nifti1Image(liver, label_map.affine), str(data / "labels" / "case.nii.gz"))
    finetune = ["finetune", "--task", "segmentation", "--data", str(data), "--out", str(run), "--weights",
                str(pre / "checkpoints" / "last.pt"), "--labels", "liver=5", "--val-fraction", "0",
                *TINY_FINETUNE]  # fmt: skip
    assert main(finetune) == 0
    record = torch.load(run / "last.pt", weights_only=True)["model_record"]
    assert record["modality"] == "mr" and record["intensity"] == weights["intensity"]
    image = ABDOMEN_MR / "mr.nii.gz"
    assert main(["predict", "--weights", str(run / "last.pt"), str(image), "--out", str(predicted), "--quiet"]) == 0
    assert set(np.unique(_same_grid(predicted / "mr.nii.gz", image))) <= {0, 5}


@pytest.mark.skipif(not (ABDOMEN_MR / "mr.nii.gz").is_file(), reason="the shared abdominal MRI is not present")
def test_workflow_with_two_channels(tmp_path):
    """Two co-registered channels (the MRI and a synthetic second sequence of the same anatomy: another contrast) as
    nnU-Net names them (case_0000, case_0001) through extract, pre-training and fine-tuning (a dataset.json listing
    both files, as MONAI reads it); prediction of the same case as a 4-D NIfTI and as the two files agrees."""
    image = nib.load(str(ABDOMEN_MR / "mr.nii.gz"))
    first = np.asarray(image.dataobj, dtype=np.float32)
    second = np.sqrt(np.clip(first, 0, None)) * 10  # a nonlinear remap of the same anatomy
    images, stacked = tmp_path / "images", tmp_path / "stacked"
    images.mkdir()
    stacked.mkdir()
    for c, data in enumerate((first, second)):
        nib.save(nib.Nifti1Image(data, image.affine), str(images / f"case_{c:04d}.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([first, second], -1), image.affine), str(stacked / "case.nii.gz"))
    labels = np.asarray(nib.load(str(ABDOMEN_MR / "labels.nii.gz")).dataobj)
    nib.save(nib.Nifti1Image((labels == 5).astype(np.uint8), image.affine), str(tmp_path / "liver.nii.gz"))
    store, pre, run = tmp_path / "cubes", tmp_path / "pretrain", tmp_path / "finetune"
    extract = ["extract", str(images), "--out", str(store), "--modality", "mr", "--channels", "2", "--cube", "32", "32",
               "32", "--pad", "--per-volume", "6", "--quiet"]  # fmt: skip
    assert main(extract) == 0
    (volume,) = json.loads((store / "manifest.json").read_text())["volumes"]
    assert volume["key"] == "case" and len(volume["windows"]) == 2
    assert np.load(store / volume["shard"]).shape == (6, 2, 32, 32, 32)
    assert main(["pretrain", "--data", str(store), "--out", str(pre), *TINY_PRETRAIN]) == 0
    weights = pre / "checkpoints" / "last.pt"
    assert torch.load(weights, weights_only=True)["state_dict"]["down_tr64.ops.0.conv1.weight"].shape[1] == 2
    dataset = tmp_path / "dataset.json"
    entry = {"image": [f"images/case_{c:04d}.nii.gz" for c in range(2)], "label": "liver.nii.gz"}
    dataset.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": [entry]}))
    finetune = ["finetune", "--task", "segmentation", "--data", str(dataset), "--out", str(run), "--weights",
                str(weights), "--val-fraction", "0", *TINY_FINETUNE]  # fmt: skip
    assert main(finetune) == 0
    assert torch.load(run / "last.pt", weights_only=True)["model_record"]["in_channels"] == 2
    probabilities = {}
    for name, inputs in (("files", images), ("4-D", stacked / "case.nii.gz")):
        out = tmp_path / name
        predict = ["predict", "--weights", str(run / "last.pt"), str(inputs), "--out", str(out), "--probabilities"]
        assert main([*predict, "--quiet"]) == 0
        _same_grid(out / "case.nii.gz", ABDOMEN_MR / "mr.nii.gz")
        probabilities[name] = np.asarray(nib.load(str(out / "case_probabilities.nii.gz")).dataobj)
    assert np.ptp(probabilities["files"]) > 0 and np.array_equal(probabilities["files"], probabilities["4-D"])
