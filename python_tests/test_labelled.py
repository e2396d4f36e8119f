"""The labelled-data readers of fine-tuning (genesis_ext.data.labelled): the three forms of segmentation data
(directory, CSV, dataset.json), the classes, what a case becomes on the network's grid (class indices, resampling),
the refusals of labels that do not fit their images, label budgets and splits.

Small NIfTI files written here (12 x 10 x 8 voxels, 1.5 mm, an affine with an origin away from 0); no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from genesis_ext.data import Window  # noqa: E402
from genesis_ext.data.intensity import resample_nearest  # noqa: E402
from genesis_ext.data.io import Volume, load_volume  # noqa: E402
from genesis_ext.data.labelled import (  # noqa: E402
    FOREGROUND,
    IGNORE,
    LabelledDataError,
    LabelledPair,
    SegCase,
    apply_budget,
    check_labels,
    load_seg_case,
    parse_budget,
    parse_labels,
    sample_patches,
    segmentation_pairs,
    split_indices,
)

SHAPE = (12, 10, 8)
# nibabel's affines are RAS+; -1.5, -1.5 on x, y is LPS+ already, so load_volume keeps the arrays' axes as written
# (no flips) and its affine is diag(1.5, 1.5, 1.5) with the origin (-10, 20, 30) mm (x and y negated: RAS -> LPS)
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, -20.0], [0, 0, 1.5, 30.0], [0, 0, 0, 1]])
LPS_ORIGIN = np.array([-10.0, 20.0, 30.0])
CT = Window(-1000.0, 1000.0)


def write(path: Path, data, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def image_data(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 1000, shape).astype(np.float32)


def label_map(shape=SHAPE, **boxes) -> np.ndarray:
    """A uint8 label map: value v inside the box x0:x1 (whole y and z) given as name=(x0, x1, v)."""
    out = np.zeros(shape, dtype=np.uint8)
    for x0, x1, v in boxes.values():
        out[x0:x1] = v
    return out


def liver_spleen(seed: int = 0):
    """A case with liver (value 1) at x 1:4 and spleen (value 2) at x 6:9: (image, label map, liver mask, spleen
    mask)."""
    labels = label_map(liver=(1, 4, 1), spleen=(6, 9, 2))
    return image_data(seed), labels, (labels == 1).astype(np.uint8), (labels == 2).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two cases written in every form: images/, labels/ (label maps), masks/caseN/{liver,spleen}.nii.gz, a CSV of
    each kind and two dataset.json files (Decathlon and nnU-Net v2 labels), all in one root."""
    root = tmp_path / "data"
    for k, name in enumerate(("case1", "case2")):
        image, labels, liver, spleen = liver_spleen(k)
        write(root / "images" / f"{name}.nii.gz", image)
        write(root / "labels" / f"{name}.nii.gz", labels)
        write(root / "masks" / "labels" / name / "liver.nii.gz", liver)
        write(root / "masks" / "labels" / name / "spleen.nii.gz", spleen)
    (root / "masks" / "images").symlink_to(root / "images")
    (root / "maps.csv").write_text("image,label\n" + "".join(f"images/{n}.nii.gz,labels/{n}.nii.gz\n" for n in CASES))
    (root / "masks.csv").write_text(
        "image,liver,spleen\n"
        + "".join(f"images/{n}.nii.gz,masks/labels/{n}/liver.nii.gz,masks/labels/{n}/spleen.nii.gz\n" for n in CASES)
    )
    training = [{"image": f"./images/{n}.nii.gz", "label": f"./labels/{n}.nii.gz"} for n in CASES]
    decathlon = {"name": "Toy", "labels": {"0": "background", "1": "liver", "2": "spleen"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(decathlon))
    (root / "nnunet.json").write_text(json.dumps({**decathlon, "labels": {"background": 0, "liver": 1, "spleen": 2}}))
    return root


CASES = ("case1", "case2")
LIVER_SPLEEN = {"liver": 1, "spleen": 2}


# ------------------------------------------------------------------------------------------------ segmentation_pairs
def test_directory_of_label_maps(dataset):
    pairs, classes = segmentation_pairs(dataset)
    assert [p.name for p in pairs] == list(CASES)
    assert [(p.image, p.labels) for p in pairs] == [
        (dataset / "images" / f"{n}.nii.gz", dataset / "labels" / f"{n}.nii.gz") for n in CASES
    ]
    assert classes == FOREGROUND == {"foreground": 1}  # no classes given: the published binary task
    assert segmentation_pairs(dataset, LIVER_SPLEEN)[1] == LIVER_SPLEEN


def test_directory_of_mask_folders_takes_the_classes_from_the_mask_names(dataset):
    root = dataset / "masks"
    pairs, classes = segmentation_pairs(root)
    assert classes == LIVER_SPLEEN  # sorted mask names, values 1, 2
    assert [p.name for p in pairs] == list(CASES)
    for p in pairs:
        assert p.labels == {c: root / "labels" / p.name / f"{c}.nii.gz" for c in ("liver", "spleen")}
    assert segmentation_pairs(root, {"spleen": 1})[1] == {"spleen": 1}  # a subset of the masks
    # values given with --labels are what predict writes: kept
    assert segmentation_pairs(root, {"spleen": 6, "liver": 1})[1] == {"spleen": 6, "liver": 1}
    with pytest.raises(LabelledDataError, match=r"case case1 has no mask for \['kidney'\]"):
        segmentation_pairs(root, {"liver": 1, "kidney": 2})
    (root / "labels" / "case2" / "spleen.nii.gz").unlink()
    with pytest.raises(LabelledDataError, match=r"case case2 has no mask for \['spleen'\]"):
        segmentation_pairs(root)


def test_directory_mixing_label_maps_and_mask_folders_is_refused(dataset):
    labels = dataset / "masks" / "labels"
    (labels / "case2" / "liver.nii.gz").rename(labels / "case2.nii.gz")  # case2: a label map; case1: masks
    (labels / "case2" / "spleen.nii.gz").unlink()
    (labels / "case2").rmdir()
    with pytest.raises(LabelledDataError, match="mixes label maps and folders of masks"):
        segmentation_pairs(dataset / "masks")


def test_csv_of_label_maps_and_of_mask_columns_give_the_directories_cases(dataset):
    assert segmentation_pairs(dataset / "maps.csv") == segmentation_pairs(dataset)
    pairs, classes = segmentation_pairs(dataset / "masks.csv")
    assert classes == LIVER_SPLEEN
    assert [p.name for p in pairs] == list(CASES)
    for p, q in zip(pairs, segmentation_pairs(dataset / "masks")[0]):
        assert p.labels == q.labels and p.image == dataset / "images" / f"{p.name}.nii.gz"
    # a CSV's classes are its columns, in their order
    lines = (dataset / "masks.csv").read_text().splitlines()
    swapped = [",".join((a, c, b)) for a, b, c in (line.split(",") for line in lines)]
    (dataset / "swapped.csv").write_text("\n".join(swapped) + "\n")
    assert segmentation_pairs(dataset / "swapped.csv")[1] == {"spleen": 1, "liver": 2}


def test_dataset_json_decathlon_and_nnunet_labels(dataset):
    maps = segmentation_pairs(dataset)[0]
    for name in ("dataset.json", "nnunet.json"):
        pairs, classes = segmentation_pairs(dataset / name)
        assert pairs == maps, name  # the same cases and files as the directory
        assert classes == LIVER_SPLEEN and list(classes) == ["liver", "spleen"], name  # background dropped
    background_only = dataset / "binary.json"
    spec = json.loads((dataset / "dataset.json").read_text())
    background_only.write_text(json.dumps({**spec, "labels": {"0": "background"}}))
    assert segmentation_pairs(background_only)[1] == FOREGROUND  # no class but background: label > 0.5
    # --labels wins over the json's
    assert segmentation_pairs(dataset / "dataset.json", {"spleen": 2})[1] == {"spleen": 2}
    # every form describing the same data with the same classes loads the same targets
    targets = []
    for data in ("dataset.json", "nnunet.json", "masks", "masks.csv", "maps.csv"):
        pairs, classes = segmentation_pairs(dataset / data, LIVER_SPLEEN)
        targets.append([load_seg_case(p, classes, CT).target for p in pairs])
    for other in targets[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(targets[0], other))


def test_dataset_json_errors_name_the_file(dataset):
    spec = json.loads((dataset / "dataset.json").read_text())
    bad = dataset / "bad.json"
    bad.write_text(json.dumps({**spec, "training": [*spec["training"], {"image": "images/x.nii.gz", "label": "y"}]}))
    with pytest.raises(LabelledDataError) as err:
        segmentation_pairs(bad)
    assert str(bad) in str(err.value) and str(dataset / "images" / "x.nii.gz") in str(err.value)
    assert "does not exist" in str(err.value)

    bad.write_text('{"training": [')
    with pytest.raises(LabelledDataError, match="cannot read as JSON") as err:
        segmentation_pairs(bad)
    assert str(bad) in str(err.value)

    bad.write_text(json.dumps({"labels": spec["labels"], "training": 5}))
    with pytest.raises(LabelledDataError, match='needs "training"'):
        segmentation_pairs(bad)

    bad.write_text(json.dumps({"labels": spec["labels"], "validation": spec["training"]}))
    with pytest.raises(LabelledDataError, match='needs "training"') as err:
        segmentation_pairs(bad)
    assert str(bad) in str(err.value)

    for entry in (
        {"image": "images/case1.nii.gz"},  # no label
        {"image": "images/case1.nii.gz", "label": None},  # a test case
        {"image": [], "label": "labels/case1.nii.gz"},  # no channel
        {"image": ["images/case1.nii.gz", 3], "label": "labels/case1.nii.gz"},  # a channel that is not a path
    ):
        bad.write_text(json.dumps({**spec, "training": [entry]}))
        with pytest.raises(LabelledDataError, match='needs "training"'):
            segmentation_pairs(bad)

    for labels in (["liver"], {"0": "background", "1": "liver", "2": "liver"}, {"liver": 300}):
        bad.write_text(json.dumps({**spec, "labels": labels}))
        with pytest.raises(LabelledDataError) as err:
            segmentation_pairs(bad)
        assert str(bad) in str(err.value) and '"labels"' in str(err.value), labels


def test_csv_errors_name_the_file_and_line(dataset):
    table = dataset / "bad.csv"
    table.write_text("image,label\nimages/case1.nii.gz,\n")
    with pytest.raises(LabelledDataError, match=r"bad.csv: line 2 has an empty 'label'"):
        segmentation_pairs(table)
    table.write_text("image\nimages/case1.nii.gz\n")
    with pytest.raises(LabelledDataError, match="'label' column"):
        segmentation_pairs(table)
    table.write_text("image,label\nimages/case1.nii.gz,labels/nope.nii.gz\n")
    with pytest.raises(LabelledDataError, match=r"bad.csv: .*nope.nii.gz does not exist"):
        segmentation_pairs(table)


# ---------------------------------------------------------------------------------------------------- load_seg_case
def _pair(tmp_path, image, labels, name="case") -> LabelledPair:
    """A case written to tmp_path: ``labels`` a label map (array) or {class: mask array}."""
    img = write(tmp_path / "images" / f"{name}.nii.gz", image)
    if isinstance(labels, dict):
        return LabelledPair(name, img, {c: write(tmp_path / name / f"{c}.nii.gz", m) for c, m in labels.items()})
    return LabelledPair(name, img, write(tmp_path / "labels" / f"{name}.nii.gz", labels))


def test_label_map_values_become_class_indices_in_the_order_of_the_classes(tmp_path):
    labels = label_map(liver=(1, 4, 1), spleen=(6, 9, 6))  # non-consecutive values
    pair = _pair(tmp_path, image_data(), labels)
    case = load_seg_case(pair, {"liver": 1, "spleen": 6}, CT)
    assert case.target.dtype == np.uint8 and case.target.shape == SHAPE
    expected = np.select([labels == 1, labels == 6], [1, 2], 0)
    assert np.array_equal(case.target, expected)
    swapped = load_seg_case(pair, {"spleen": 6, "liver": 1}, CT)  # spleen is now the first class
    assert np.array_equal(swapped.target, np.select([labels == 6, labels == 1], [1, 2], 0))
    # the image is windowed to [0, 1]; foreground centres are the voxels of any class
    assert np.allclose(case.image, (np.clip(image_data(), -1000, 1000) + 1000) / 2000, atol=1e-6)
    assert case.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert len(case.fg) == np.count_nonzero(expected)
    assert np.all(expected[tuple(case.fg.T)] > 0)
    assert case.name == "case"


def test_masks_become_class_indices_in_the_order_of_the_classes(tmp_path):
    image, labels, liver, spleen = liver_spleen()
    pair = _pair(tmp_path, image, {"liver": liver, "spleen": spleen})
    assert np.array_equal(load_seg_case(pair, {"liver": 1, "spleen": 2}, CT).target, labels)
    assert np.array_equal(
        load_seg_case(pair, {"spleen": 1, "liver": 2}, CT).target, np.select([spleen > 0, liver > 0], [1, 2])
    )
    assert np.array_equal(load_seg_case(pair, {"spleen": 1}, CT).target, spleen)  # masks not listed are not read


def test_label_values_outside_the_classes_are_refused(tmp_path):
    labels = label_map(liver=(1, 4, 1), spleen=(6, 9, 6), kidney=(10, 11, 3))
    pair = _pair(tmp_path, image_data(), labels)
    with pytest.raises(LabelledDataError) as err:
        load_seg_case(pair, {"liver": 1, "spleen": 6}, CT)
    message = str(err.value)
    assert str(pair.labels) in message and "[3]" in message and "--labels" in message, message
    negative = label_map(liver=(1, 4, 1)).astype(np.int16)
    negative[0, 0, 0] = -1
    pair = _pair(tmp_path, image_data(), negative, name="negative")
    with pytest.raises(LabelledDataError, match=r"holds label values \[-1\]"):
        load_seg_case(pair, {"liver": 1}, CT)


def test_a_label_map_must_hold_whole_numbers_and_the_binary_default_thresholds(tmp_path):
    soft = np.zeros(SHAPE, dtype=np.float32)
    soft[2:5] = 0.7  # e.g. a probability map or an interpolated label
    soft[5:7] = 0.3
    pair = _pair(tmp_path, image_data(), soft)
    with pytest.raises(LabelledDataError) as err:
        load_seg_case(pair, {"liver": 1}, CT)
    assert f"{pair.labels}: is not a label map" in str(err.value)
    # no classes given: one class, label > 0.5 (the published binary task)
    case = load_seg_case(pair, FOREGROUND, CT)
    assert np.array_equal(case.target, (soft > 0.5).astype(np.uint8))
    many = label_map(a=(0, 2, 1), b=(4, 6, 7))
    pair = _pair(tmp_path, image_data(), many, name="many")
    assert np.array_equal(load_seg_case(pair, FOREGROUND, CT).target, (many > 0).astype(np.uint8))


def test_overlapping_masks_are_refused_naming_both_classes(tmp_path):
    image, _, liver, spleen = liver_spleen()
    liver[6, 0, 0] = 1  # one voxel of the spleen is also liver
    pair = _pair(tmp_path, image, {"liver": liver, "spleen": spleen})
    with pytest.raises(LabelledDataError) as err:
        load_seg_case(pair, {"liver": 1, "spleen": 2}, CT)
    message = str(err.value)
    assert "'spleen' overlaps that of 'liver' at 1 voxels" in message and str(pair.labels["spleen"]) in message
    # three masks: the one overlapped is named, not the one before it
    kidney = np.zeros(SHAPE, np.uint8)
    kidney[10:12] = 1
    kidney[8, 0, 0] = 1  # inside the spleen
    pair = _pair(tmp_path, image, {"liver": label_map(liver=(1, 4, 1)), "spleen": spleen, "kidney": kidney}, "three")
    with pytest.raises(LabelledDataError, match="'kidney' overlaps that of 'spleen' at 1 voxels"):
        load_seg_case(pair, {"liver": 1, "spleen": 2, "kidney": 3}, CT)


def test_labels_on_another_grid_are_refused_naming_both_files(tmp_path):
    image, labels, liver, _ = liver_spleen()
    small = labels[:, :, :6]
    for pair in (_pair(tmp_path, image, small, "map"), _pair(tmp_path, image, {"liver": liver[:, :, :6]}, "masks")):
        with pytest.raises(LabelledDataError) as err:
            load_seg_case(pair, {"liver": 1, "spleen": 2} if pair.name == "map" else {"liver": 1}, CT)
        message = str(err.value)
        label_path = pair.labels if pair.name == "map" else pair.labels["liver"]
        for needle in (str(label_path), str(pair.image), "(12, 10, 6)", "(12, 10, 8)", "differs from its image"):
            assert needle in message, message
    shifted = AFFINE.copy()
    shifted[2, 3] += 3.0  # one slice (1.5 mm) would already be too far; two here
    pair = _pair(tmp_path, image, labels, "shifted")
    write(pair.labels, labels, shifted)
    with pytest.raises(LabelledDataError) as err:
        load_seg_case(pair, LIVER_SPLEEN, CT)
    message = str(err.value)
    for needle in (str(pair.labels), str(pair.image), "affine", "resample"):
        assert needle in message, message
    write(pair.labels, labels, AFFINE + 1e-4)  # float noise of a re-saved header: accepted
    assert np.array_equal(load_seg_case(pair, LIVER_SPLEEN, CT).target, labels)


# ------------------------------------------------------------------------------------------------------- resampling
def test_load_seg_case_resamples_image_and_labels_to_the_spacing(tmp_path):
    labels = label_map(liver=(1, 4, 1), spleen=(6, 9, 6))
    pair = _pair(tmp_path, image_data(), labels)
    case = load_seg_case(pair, {"liver": 1, "spleen": 6}, CT, spacing=(3.0, 3.0, 3.0))
    assert case.image.shape == (1, 6, 5, 4) and case.target.shape == (6, 5, 4)  # one channel
    assert case.spacing == (3.0, 3.0, 3.0)
    assert case.target.dtype == np.uint8 and set(np.unique(case.target).tolist()) == {0, 1, 2}  # class indices
    # nearest neighbour: new voxel i sits at old x = 2 i + 0.5, rounded half to even: 2 i
    assert np.array_equal(case.target, np.select([labels == 1, labels == 6], [1, 2], 0)[::2, ::2, ::2])
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    same = load_seg_case(pair, {"liver": 1, "spleen": 6}, CT, spacing=(1.505, 1.5, 1.5))  # within 1 %: as is
    assert same.target.shape == SHAPE


def test_resample_nearest_keeps_the_dtype_and_moves_the_affine(tmp_path):
    labels = label_map(liver=(1, 4, 1), spleen=(6, 9, 6))
    volume = load_volume(write(tmp_path / "labels.nii.gz", labels))
    assert volume.affine[:3, 3] == pytest.approx(LPS_ORIGIN)
    mapped = Volume(labels, volume.spacing, volume.affine)
    out = resample_nearest(mapped, (3.0, 3.0, 3.0))
    assert out.data.dtype == np.uint8 and out.shape == (6, 5, 4) and out.spacing == (3.0, 3.0, 3.0)
    assert set(np.unique(out.data).tolist()) <= {0, 1, 6}
    # by hand: the new voxels are 3 mm, two old ones; the first new voxel's centre is halfway between the centres of
    # old voxels 0 and 1 on every axis: 0.75 mm past the old first centre (-10, 20, 30) mm
    assert np.allclose(out.affine[:3, :3], np.diag([3.0, 3.0, 3.0]))
    assert np.allclose(out.affine @ [0, 0, 0, 1], [-9.25, 20.75, 30.75, 1])
    assert np.allclose(out.affine @ [1, 2, 3, 1], [-9.25 + 3, 20.75 + 6, 30.75 + 9, 1])
    up = resample_nearest(mapped, (0.75, 1.5, 1.5))  # finer along x: each old voxel twice
    assert up.shape == (24, 10, 8) and np.array_equal(up.data, np.repeat(labels, 2, axis=0))
    assert np.allclose(up.affine @ [0, 0, 0, 1], [-10.375, 20, 30, 1])  # a quarter of an old voxel before its centre


# --------------------------------------------------------------------------------------------------------- budgets
def _case(name: str, depth: int) -> SegCase:
    target = np.zeros((4, 4, depth), dtype=np.uint8)
    target[1:3, 1:3, :] = 1
    image = np.broadcast_to(np.arange(depth, dtype=np.float32), (1, 4, 4, depth)).copy()  # the slice index
    return SegCase(name, image, target, (1.0, 1.0, 1.0), np.argwhere(target).astype(np.int32))


def _labelled_slices(cases) -> list[tuple[str, list[int]]]:
    """(case name, the slices that keep labels) of each case a budget kept, read off its target."""
    return [(c.name, [int(z) for z in np.flatnonzero((c.target != IGNORE).all(axis=(0, 1)))]) for c in cases]


def test_budget_of_cases(rng):
    cases = [_case(f"c{i}", 8) for i in range(5)]
    for budget, n in ((1.0, 5), (0.4, 2), (0.5, 2), (0.01, 1), (1e-9, 1), (3, 3), (5, 5)):
        kept = apply_budget(cases, budget, "cases", 16, np.random.default_rng(1))
        assert len(kept) == n, budget
        assert all(any(k is c for c in cases) for k in kept)  # whole cases, unchanged
        names = [k.name for k in kept]
        assert names == sorted(names) and len(set(names)) == n  # in the data's order, no repeats
    # seeded: the same rng seed keeps the same cases; other seeds other cases
    choices = {tuple(k.name for k in apply_budget(cases, 2, "cases", 16, np.random.default_rng(s))) for s in range(20)}
    assert len(choices) > 3
    a, b = (apply_budget(cases, 2, "cases", 16, np.random.default_rng(7)) for _ in range(2))
    assert [c.name for c in a] == [c.name for c in b]
    for bad, needle in ((6, "has 5 cases; give 1 to 5"), (0, "give 1 to 5"), (2.5, "a share in"), (0.0, "a share in"),
                        (-1.0, "a share in"), (float("nan"), "a share in"), (True, "a share in")):  # fmt: skip
        with pytest.raises(LabelledDataError, match=needle):
            apply_budget(cases, bad, "cases", 16, rng)
    assert len(apply_budget(cases, 1, "cases", 16, rng)) == 1  # the count 1: one case; the share 1.0: all of them
    with pytest.raises(LabelledDataError, match="--budget-unit"):
        apply_budget(cases, 1, "slices", 16, rng)


def test_parse_budget_tells_counts_from_shares():
    assert [parse_budget(t) for t in ("1", "3", "0.25", "25%", "1.0", "100%")] == [1, 3, 0.25, 0.25, 1.0, 1.0]
    assert [type(parse_budget(t)) for t in ("1", "1.0")] == [int, float]
    with pytest.raises(LabelledDataError, match="give a count"):
        parse_budget("a quarter")


def test_budget_of_slabs_by_hand(rng):
    """A case 40 slices deep in slabs of 16: [0, 16) and [16, 40) (the last slab takes the remainder); a case of 10
    slices: one slab [0, 10). The slices of the slabs not chosen become IGNORE, the image stays whole, the foreground
    centres lie on labelled slices only, and a case without a chosen slab is left out."""
    deep, thin = _case("deep", 40), _case("thin", 10)
    seen = set()
    for seed in range(30):
        (kept,) = apply_budget([deep, thin], 0.01, "slabs", 16, np.random.default_rng(seed))  # one slab of three
        name, z = _labelled_slices([kept])[0]
        seen.add((name, z[0], z[-1] + 1))
        original = deep if name == "deep" else thin
        assert np.array_equal(kept.image, original.image)  # context kept
        assert np.array_equal(kept.target[..., z], original.target[..., z])
        assert set(kept.fg[:, 2].tolist()) == set(z)  # foreground centres on labelled slices only
        if name == "deep":  # part of a case: its labelled slices recorded (a whole case: None, all of them)
            assert kept.labelled_z.tolist() == z
        else:
            assert kept is thin
    assert seen == {("deep", 0, 16), ("deep", 16, 40), ("thin", 0, 10)}
    every = apply_budget([deep, thin], 1.0, "slabs", 16, rng)  # every slab: the cases themselves
    assert every[0] is deep and every[1] is thin
    with pytest.raises(LabelledDataError, match="has 3 slabs"):
        apply_budget([deep, thin], 4, "slabs", 16, rng)


def test_budget_of_slabs_is_seeded():
    case = _case("c", 64)  # slabs [0, 16), [16, 32), [32, 48), [48, 64)
    layouts = set()
    for seed in range(40):
        kept = _labelled_slices(apply_budget([case], 2, "slabs", 16, np.random.default_rng(seed)))
        assert kept == _labelled_slices(apply_budget([case], 2, "slabs", 16, np.random.default_rng(seed)))  # seeded
        ((name, z),) = kept
        assert len(z) == 32 and all(z[k] // 16 == z[k + 1] // 16 or z[k + 1] % 16 == 0 for k in range(31))
        layouts.add(tuple(z[::16]))
    assert len(layouts) == 6  # all C(4, 2) choices


def test_patches_of_a_budgeted_case_centre_on_labelled_slices():
    """With labels on slices 16..31 of 64 only, every patch (foreground-centred or not) has its centre slice there,
    so no patch is wholly unlabelled."""
    case = _case("c", 64).keep_slices(np.arange(16, 32))
    x, y = sample_patches(case, (4, 4, 8), 200, np.random.default_rng(0), fg_fraction=0.5)
    centres = x[:, 0, 0, 0, 4]  # the image holds the slice index
    assert set(centres.tolist()) <= set(range(16, 32)) and len(set(centres.tolist())) > 8
    assert (y[:, :, :, 4] != IGNORE).all()


# ----------------------------------------------------------------------------------------------------------- classes
def test_parse_labels():
    assert parse_labels("liver=1,spleen=2") == {"liver": 1, "spleen": 2}
    assert parse_labels("liver, spleen") == {"liver": 1, "spleen": 2}
    assert parse_labels("aorta=7") == {"aorta": 7}
    assert list(parse_labels("spleen=6,liver=1")) == ["spleen", "liver"]  # the order given is the channel order
    assert parse_labels(None) is None
    for bad in ("liver=1,spleen", "liver=x", "liver=0", "a=1,b=1", "liver,liver", "liver,,spleen", "a=256"):
        with pytest.raises(LabelledDataError):
            parse_labels(bad)


def test_check_labels():
    assert check_labels({"liver": np.int64(3)}) == {"liver": 3} and type(check_labels({"a": np.int64(3)})["a"]) is int
    for bad in ({}, {"": 1}, {"a": 0}, {"a": 1.0}, {"a": True}, {"a": 1, "b": 1}, {"a": 256}, {1: 1}):
        with pytest.raises(LabelledDataError):
            check_labels(bad)


# ------------------------------------------------------------------------------------------------------------ splits
def test_split_indices():
    train, val = split_indices(10, 0.2, np.random.default_rng(0))
    assert len(val) == 2 and len(train) == 8 and sorted([*train, *val]) == list(range(10))
    again = split_indices(10, 0.2, np.random.default_rng(0))
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len({tuple(split_indices(10, 0.2, np.random.default_rng(s))[1]) for s in range(10)}) > 1
    assert [len(v) for _, v in (split_indices(n, 0.01, np.random.default_rng(0)) for n in (2, 3, 50))] == [1, 1, 1]
    train, val = split_indices(5, 0.0, np.random.default_rng(0))
    assert list(train) == [0, 1, 2, 3, 4] and len(val) == 0
    strata = np.array([0] * 8 + [1] * 4)
    train, val = split_indices(12, 0.25, np.random.default_rng(0), strata=strata)
    assert sorted(strata[val].tolist()) == [0, 0, 1]  # a quarter of each label
    for n, fraction, needle in ((1, 0.2, "at least 2"), (4, 1.0, r"\[0, 1\)"), (4, -0.1, r"\[0, 1\)")):
        with pytest.raises(LabelledDataError, match=needle):
            split_indices(n, fraction, np.random.default_rng(0))


def test_training_spacing_reads_nifti_headers_only(tmp_path, monkeypatch):
    """The median spacing of the images, as load_volume gives it (reoriented to LPS), without reading their voxels."""
    from genesis_ext.data import labelled

    pairs = []
    for k, zooms in enumerate(((1.0, 2.0, 3.0), (1.0, 2.0, 5.0), (1.5, 2.0, 3.0))):
        affine = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])[[1, 0, 2, 3]]  # x and y swapped in the file
        image = tmp_path / f"c{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine), str(image))
        pairs.append(LabelledPair(f"c{k}", image, image))
    expected = tuple(np.median([load_volume(p.image).spacing for p in pairs], axis=0))
    assert expected == (2.0, 1.0, 3.0)  # reoriented: the file's second axis is x
    monkeypatch.setattr(labelled, "load_volume", None)  # no loading allowed
    assert labelled.training_spacing(pairs) == expected
