"""genesis_ext.evaluation: Dice and HD95 on hand-made masks (expected values worked out by hand, or by a brute force
written here), evaluate_predictions on label maps written with nibabel, its errors, and ``genesis-ext evaluate``.

Real data: the abdomen CT's liver mask from the data folder beside the repository (skipped if absent).
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import numpy as np
import pytest

from genesis_ext.cli import main
from genesis_ext.evaluation import EvaluationError, dice, evaluate_predictions, hd95, per_class_scores

nib = pytest.importorskip("nibabel")
pytest.importorskip("scipy")

from conftest import REPO  # noqa: E402

LIVER_MASK = REPO.parent / "shared" / "data" / "abdomen-ct" / "masks" / "liver.nii.gz"
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])  # spacing 2 x 2 x 3 mm
LABELS = {"liver": 1, "spleen": 2}


def box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices] = True
    return mask


def write(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


# ---------------------------------------------------------------------------------------------------------- dice
def test_dice_of_hand_made_masks():
    a = box((4, 4, 4), slice(0, 2), slice(0, 2), slice(0, 2))  # 8 voxels
    b = box((4, 4, 4), slice(0, 2), slice(0, 1), slice(0, 2))  # 4 voxels, all inside a
    assert dice(a, b) == pytest.approx(2 * 4 / (8 + 4))
    c = np.zeros((4, 4, 4), dtype=bool)
    c[0, 0, 0] = c[3, 3, 3] = True  # 2 voxels, 1 in a
    assert dice(a, c) == pytest.approx(2 * 1 / (8 + 2))
    assert dice(c, a) == pytest.approx(2 * 1 / (8 + 2))
    assert dice(a, a) == 1.0


def test_dice_is_nan_when_both_are_empty_and_zero_when_one_is():
    empty = np.zeros((3, 3, 3), dtype=bool)
    one = box((3, 3, 3), slice(1, 2), slice(1, 2), slice(1, 2))
    assert math.isnan(dice(empty, empty))
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0


def test_dice_refuses_masks_of_different_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3, 3\).*\(3, 3, 4\)"):
        dice(np.ones((3, 3, 3)), np.ones((3, 3, 4)))


# ---------------------------------------------------------------------------------------------------------- hd95
def test_hd95_of_boxes_offset_along_z_is_in_mm():
    # 4^3 boxes 2 voxels apart in z. From one to the other: its far face (16 voxels) is 2 slices = 6 mm away, the
    # near ring 3 mm, the rest 0 or 1 mm: 16 of 56 surface voxels at 6 mm, so the 95th percentile is 6 mm each way
    a = box((10, 10, 12), slice(2, 6), slice(2, 6), slice(2, 6))
    b = box((10, 10, 12), slice(2, 6), slice(2, 6), slice(4, 8))
    assert hd95(a, b, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert hd95(b, a, (1.0, 1.0, 3.0)) == pytest.approx(6.0)


def test_hd95_uses_the_spacing_of_each_axis():
    a = box((12, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    along_x = box((12, 10, 10), slice(4, 8), slice(2, 6), slice(2, 6))  # the same offset of 2 voxels, along x
    along_z = box((12, 10, 10), slice(2, 6), slice(2, 6), slice(4, 8))
    assert hd95(a, along_x, (0.5, 1.0, 3.0)) == pytest.approx(1.0)
    assert hd95(a, along_z, (0.5, 1.0, 3.0)) == pytest.approx(6.0)


def test_hd95_of_two_single_voxels_is_their_distance():
    a, b = np.zeros((5, 6, 7), dtype=bool), np.zeros((5, 6, 7), dtype=bool)
    a[2, 1, 1] = True
    b[2, 4, 3] = True  # 3 voxels along y (1 mm), 2 along z (2 mm): (0, 3, 4) mm
    assert hd95(a, b, (0.7, 1.0, 2.0)) == pytest.approx(5.0)


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    # a: one voxel; b: the same voxel and one 4 voxels (8 mm) away. a -> b: [0]; b -> a: [0, 8] -> 95th percentile
    # 0.95 * 8 = 7.6 (pooled [0, 0, 8] would give 7.2)
    a, b = np.zeros((3, 9, 3), dtype=bool), np.zeros((3, 9, 3), dtype=bool)
    a[1, 2, 1] = b[1, 2, 1] = b[1, 6, 1] = True
    assert hd95(a, b, (1.0, 2.0, 1.0)) == pytest.approx(7.6)


def test_hd95_is_a_percentile_not_the_maximum():
    # b = a (a 4^3 box, 56 surface voxels) plus one voxel 5 slices above it: 1 of 57 distances is not 0
    a = box((8, 8, 14), slice(2, 6), slice(2, 6), slice(2, 6))
    b = a.copy()
    b[2, 2, 10] = True
    assert hd95(a, b, (1.0, 1.0, 1.0)) == 0.0


def test_hd95_is_nan_when_either_mask_is_empty():
    empty = np.zeros((4, 4, 4), dtype=bool)
    one = box((4, 4, 4), slice(1, 3), slice(1, 3), slice(1, 3))
    assert math.isnan(hd95(one, empty, (1, 1, 1)))
    assert math.isnan(hd95(empty, one, (1, 1, 1)))
    assert math.isnan(hd95(empty, empty, (1, 1, 1)))


def surface_brute_force(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour in the background or outside the array, by padding and shifting."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def hd95_brute_force(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Every pair of surface voxels: the nearest distance from each, the 95th percentile each way, the larger."""
    pa = np.argwhere(surface_brute_force(a)) * np.asarray(spacing)
    pb = np.argwhere(surface_brute_force(b)) * np.asarray(spacing)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(axis=-1))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_a_brute_force_on_random_blobs(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    blobs = ndimage.gaussian_filter(rng.normal(size=(2, *shape)), sigma=(0, 1.5, 1.5, 1.5)) > 0.05
    a, b = blobs[0], blobs[1]
    if seed % 2:  # blobs well inside a larger array too (the crop), and touching its edges (the edge rule)
        a, b = np.pad(a, ((3, 5), (0, 2), (4, 1))), np.pad(b, ((3, 5), (0, 2), (4, 1)))
    spacing = (0.8, 1.3, 2.5)
    assert a.any() and b.any() and not np.array_equal(a, b)
    assert hd95(a, b, spacing) == pytest.approx(hd95_brute_force(a, b, spacing), rel=1e-9)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI warns about its own deprecated argument
def test_hd95_agrees_with_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a, b = rng.random((2, 16, 13, 11)) < 0.35
    spacing = (0.7, 1.1, 3.0)
    expected = monai_metrics.compute_hausdorff_distance(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], percentile=95, spacing=spacing
    )
    assert hd95(a, b, spacing) == pytest.approx(float(expected), rel=1e-5)


def test_per_class_scores_of_two_label_maps():
    ref = np.zeros((6, 6, 6), dtype=np.int16)
    pred = np.zeros((6, 6, 6), dtype=np.int16)
    ref[0:2, 0:2, 0:2] = 1
    pred[0:2, 0:2, 0:1] = 1  # 4 of the 8, one slice (3 mm) short
    pred[5, 5, 5] = 2  # spleen predicted, absent from the reference
    scores = per_class_scores(pred, ref, {"liver": 1, "spleen": 2, "kidney": 3}, (1.0, 1.0, 3.0))
    assert list(scores) == ["liver", "spleen", "kidney"]
    liver = scores["liver"]
    assert (liver["dice"], liver["hd95"]) == (pytest.approx(8 / 12), pytest.approx(3.0))
    assert (liver["ref_voxels"], liver["pred_voxels"]) == (8, 4)
    assert scores["spleen"]["dice"] == 0.0 and math.isnan(scores["spleen"]["hd95"])
    assert (scores["spleen"]["ref_voxels"], scores["spleen"]["pred_voxels"]) == (0, 1)
    assert math.isnan(scores["kidney"]["dice"]) and math.isnan(scores["kidney"]["hd95"])


# ----------------------------------------------------------------------------------------------- evaluate_predictions
SHAPE = (8, 8, 8)


def two_cases(root):
    """ref/ and pred/ with two cases (2 x 2 x 3 mm voxels).
    case1: liver 8 voxels, predicted exactly (Dice 1, HD95 0); spleen 8 voxels, predicted 4 of them, one slice short
    (Dice 8/12, HD95 3 mm). case2: liver 8 voxels, predicted nowhere (Dice 0, HD95 NaN); no spleen anywhere (NaN)."""
    ref1, pred1, ref2 = (np.zeros(SHAPE, dtype=np.uint8) for _ in range(3))
    ref1[1:3, 1:3, 1:3] = 1
    ref1[5:7, 5:7, 5:7] = 2
    pred1[1:3, 1:3, 1:3] = 1
    pred1[5:7, 5:7, 5:6] = 2
    ref2[2:4, 2:4, 2:4] = 1
    write(root / "ref" / "case1.nii.gz", ref1)
    write(root / "ref" / "case2.nii.gz", ref2)
    write(root / "pred" / "case1.nii.gz", pred1)
    write(root / "pred" / "case2.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    return root / "pred", root / "ref"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_directories_rows_summary_and_csv(tmp_path):
    pred, ref = two_cases(tmp_path)
    out = tmp_path / "metrics.csv"
    result = evaluate_predictions(pred, ref, LABELS, out_csv=out)
    rows = read_csv(out)
    assert list(rows[0]) == ["case", "label", "value", "dice", "hd95_mm", "ref_voxels", "pred_voxels"]
    assert [(r["case"], r["label"], r["value"], r["ref_voxels"], r["pred_voxels"]) for r in rows] == [
        ("case1", "liver", "1", "8", "8"),
        ("case1", "spleen", "2", "8", "4"),
        ("case2", "liver", "1", "8", "0"),
        ("case2", "spleen", "2", "0", "0"),
    ]
    expected = [(1.0, 0.0), (8 / 12, 3.0), (0.0, math.nan), (math.nan, math.nan)]
    for row, (d, h) in zip(rows, expected):
        assert float(row["dice"]) == pytest.approx(d, nan_ok=True)
        assert float(row["hd95_mm"]) == pytest.approx(h, nan_ok=True)
    assert len(result.rows) == 4 and result.out_csv == out

    liver, spleen = result.summary["classes"]["liver"], result.summary["classes"]["spleen"]
    assert liver["dice"] == {"mean": 0.5, "sd": pytest.approx(math.sqrt(0.5)), "n": 2, "nan": 0}
    assert (liver["hd95_mm"]["mean"], liver["hd95_mm"]["n"], liver["hd95_mm"]["nan"]) == (0.0, 1, 1)
    assert spleen["dice"]["mean"] == pytest.approx(8 / 12) and spleen["dice"]["nan"] == 1
    assert spleen["hd95_mm"]["mean"] == pytest.approx(3.0) and math.isnan(spleen["hd95_mm"]["sd"])
    assert result.summary["mean"] == {"dice": pytest.approx((0.5 + 8 / 12) / 2), "hd95_mm": pytest.approx(1.5)}
    assert result.summary["cases"] == 2
    table = "\n".join(result.lines())
    assert "liver" in table and "0.5000 ± 0.7071" in table and "0.5833" in table


def test_evaluate_names_classes_by_value_without_labels(tmp_path):
    pred, ref = two_cases(tmp_path)
    result = evaluate_predictions(pred, ref)
    assert list(result.summary["classes"]) == ["label_1", "label_2"]
    assert [r["label"] for r in result.rows] == ["label_1", "label_2"] * 2
    assert result.summary["classes"]["label_2"]["value"] == 2


def test_evaluate_two_files_of_different_names(tmp_path):
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[2:5, 2:4, 2:4] = 1  # 12 voxels
    pred = np.zeros(SHAPE, dtype=np.int32)
    pred[2:4, 2:4, 2:4] = 1  # 8 of them
    result = evaluate_predictions(
        write(tmp_path / "model_out.nii.gz", pred), write(tmp_path / "truth.nii.gz", ref), {"liver": 1}
    )
    (row,) = result.rows
    assert row["case"] == "truth" and row["dice"] == pytest.approx(2 * 8 / 20)
    assert row["hd95_mm"] == pytest.approx(2.0)  # the missing x slice: 2 mm away
    assert result.out_csv is None


def test_a_reference_without_prediction_is_named(tmp_path):
    pred, ref = two_cases(tmp_path)
    (pred / "case2.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=r"no prediction for 1 of 2 reference\(s\): .*case2\.nii\.gz"):
        evaluate_predictions(pred, ref, LABELS)


def test_a_prediction_without_reference_is_named(tmp_path):
    pred, ref = two_cases(tmp_path)
    write(pred / "case3.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(EvaluationError, match=r"no reference for 1 prediction\(s\): .*pred/case3\.nii\.gz"):
        evaluate_predictions(pred, ref, LABELS)


def test_a_prediction_on_another_grid_is_refused_naming_both_files_and_shapes(tmp_path):
    pred, ref = two_cases(tmp_path)
    write(pred / "case2.nii.gz", np.zeros((8, 8, 9), dtype=np.uint8))
    with pytest.raises(EvaluationError) as err:
        evaluate_predictions(pred, ref, LABELS)
    message = str(err.value)
    assert str(pred / "case2.nii.gz") in message and str(ref / "case2.nii.gz") in message
    assert "(8, 8, 9)" in message and "(8, 8, 8)" in message and "resample" in message


def test_a_prediction_shifted_in_space_is_refused_and_a_tiny_difference_is_not(tmp_path):
    pred, ref = two_cases(tmp_path)
    shifted = AFFINE.copy()
    shifted[2, 3] = 0.5  # half a millimetre along z
    write(pred / "case2.nii.gz", np.zeros(SHAPE, dtype=np.uint8), shifted)
    with pytest.raises(EvaluationError, match=r"case2\.nii\.gz.*same shape \(8, 8, 8\).*0\.5 mm apart"):
        evaluate_predictions(pred, ref, LABELS)
    shifted[2, 3] = 1e-4
    write(pred / "case2.nii.gz", np.zeros(SHAPE, dtype=np.uint8), shifted)
    assert len(evaluate_predictions(pred, ref, LABELS).rows) == 4


def test_label_values_outside_the_classes_are_named_with_the_file(tmp_path):
    pred, ref = two_cases(tmp_path)
    with pytest.raises(EvaluationError, match=r"ref/case1\.nii\.gz: label values \[2\] .*--labels liver=1,label_2=2"):
        evaluate_predictions(pred, ref, {"liver": 1})
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[0, 0, 0] = 7
    write(pred / "case2.nii.gz", data)
    with pytest.raises(EvaluationError, match=r"pred/case2\.nii\.gz: label values \[7\].*--labels"):
        evaluate_predictions(pred, ref, LABELS)
    with pytest.raises(EvaluationError, match=r"pred/case2\.nii\.gz: label values \[7\].*--labels"):
        evaluate_predictions(pred, ref)  # 7 is in no reference


def test_a_map_of_fractions_is_not_a_label_map(tmp_path):
    pred, ref = two_cases(tmp_path)
    write(pred / "case1.nii.gz", np.full(SHAPE, 0.5, dtype=np.float32))
    with pytest.raises(EvaluationError, match=r"pred/case1\.nii\.gz: is not a label map .*0\.5"):
        evaluate_predictions(pred, ref, LABELS)


def test_the_csv_is_not_written_on_error_nor_replaced_without_overwrite(tmp_path):
    pred, ref = two_cases(tmp_path)
    out = tmp_path / "out" / "metrics.csv"
    write(pred / "case2.nii.gz", np.zeros((8, 8, 9), dtype=np.uint8))  # the second case fails
    with pytest.raises(EvaluationError):
        evaluate_predictions(pred, ref, LABELS, out_csv=out)
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))

    two_cases(tmp_path)
    out.parent.mkdir(exist_ok=True)
    out.write_text("keep me\n")
    with pytest.raises(EvaluationError, match=r"metrics\.csv: exists; .*overwrite"):
        evaluate_predictions(pred, ref, LABELS, out_csv=out)
    assert out.read_text() == "keep me\n"
    evaluate_predictions(pred, ref, LABELS, out_csv=out, overwrite=True)
    assert len(read_csv(out)) == 4


def test_importing_evaluation_loads_no_torch():
    code = "import sys, genesis_ext.evaluation; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------------------- real data
def test_liver_mask_against_itself_and_shifted_one_slice(tmp_path):
    if not LIVER_MASK.exists():
        pytest.skip(f"{LIVER_MASK} not found")
    image = nib.load(str(LIVER_MASK))
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), 3.0)  # 3 mm voxels
    liver = np.asarray(image.dataobj) > 0
    same = evaluate_predictions(LIVER_MASK, LIVER_MASK, {"liver": 1})
    assert (same.rows[0]["dice"], same.rows[0]["hd95_mm"]) == (1.0, 0.0)

    shifted = np.zeros_like(liver)
    shifted[:, :, 1:] = liver[:, :, :-1]
    pred = write(tmp_path / "liver_shifted.nii.gz", shifted.astype(np.uint8), image.affine)
    (row,) = evaluate_predictions(pred, LIVER_MASK, {"liver": 1}).rows
    # every surface voxel of one is on the other's surface or one slice (3 mm) from it, far more than 5% the latter
    assert row["hd95_mm"] == 3.0
    both = np.count_nonzero(liver & shifted)
    assert row["dice"] == pytest.approx(2 * both / (liver.sum() + shifted.sum()))
    assert (row["ref_voxels"], row["pred_voxels"]) == (liver.sum(), shifted.sum())


# ------------------------------------------------------------------------------------------------------------- CLI
def test_cli_evaluate_prints_the_table_and_writes_the_csv(tmp_path, capsys):
    pred, ref = two_cases(tmp_path)
    out = tmp_path / "m.csv"
    argv = ["evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", "liver,spleen", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "liver" in printed and "spleen" in printed and "mean over classes" in printed
    assert f"wrote {out}" in printed and len(read_csv(out)) == 4
    assert main([*argv, "--quiet"]) == 2  # the CSV exists now
    assert main([*argv, "--quiet", "--overwrite", "--labels", "liver=1,spleen=2"]) == 0


def test_cli_evaluate_returns_2_for_a_grid_mismatch(tmp_path, capsys):
    pred, ref = two_cases(tmp_path)
    write(pred / "case1.nii.gz", np.zeros((8, 9, 8), dtype=np.uint8))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genesis-ext evaluate: prediction ") and str(pred / "case1.nii.gz") in err
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", "liver=one"]) == 2
