"""DeformConfig: every field is checked where it is declared, nothing that can hang a kernel or overflow an index gets
through, and the Python and C++ field lists cannot drift."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import re
import sys
import warnings
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

import genesis_ext
from genesis_ext import _C, DeformConfig
from genesis_ext.config import MAX_BLOCKS, MAX_SHUFFLE_COVERAGE
from genesis_ext.streams import Purpose

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(local_rate=1.5), r"DeformConfig\.local_rate must be a number in \[0, 1\], got 1.5"),
        (dict(nonlinear_rate=-0.1), r"DeformConfig\.nonlinear_rate must be a number in \[0, 1\]"),
        (dict(flip_rate=float("nan")), r"DeformConfig\.flip_rate must be a number in \[0, 1\], got nan"),
        (dict(paint_rate=True), r"DeformConfig\.paint_rate must be a number in \[0, 1\], got True"),
        (dict(hole_continue=2), r"DeformConfig\.hole_continue must be a number in \[0, 1\]"),
        (dict(window_continue="0.9"), r"DeformConfig\.window_continue must be a number"),
        (
            dict(inpaint_rate=0.5, outpaint_rate=0.8),
            "outpaint_rate must be 1 - inpaint_rate; got inpaint_rate=0.5, outpaint_rate=0.8",
        ),
        (dict(outpaint_rate=1.0, inpaint_rate=0.2), "outpaint_rate must be 1 - inpaint_rate"),
        (dict(num_blocks=0), rf"DeformConfig\.num_blocks must be an integer in \[1, {MAX_BLOCKS}\], got 0"),
        (dict(block_div=0), r"DeformConfig\.block_div must be an integer in \[1, 32767\], got 0"),
        (dict(max_holes=9), r"DeformConfig\.max_holes must be an integer in \[0, 8\]"),
        (dict(max_flips=-1), r"DeformConfig\.max_flips must be an integer in \[0, 8\]"),
        (dict(max_windows=0), r"DeformConfig\.max_windows must be an integer in \[1, 8\]"),
        (dict(hole_div_min=2), "hole_div_min must be >= hole_div_max"),
        (dict(cut_min_num=5), "need 0 <= cut_min_num <= cut_max_num <= cut_den"),
        (dict(margin=-1), r"DeformConfig\.margin must be an integer in \[0, 32767\]"),
        (dict(flip_compat=1), r"DeformConfig\.flip_compat must be a bool, got 1"),
        # values that used to be accepted and then hang the ops for minutes (found by fuzzing), and non-integers
        (dict(num_blocks=2**31), r"DeformConfig\.num_blocks must be an integer in \[1, 1000000\], got 2147483648"),
        (dict(num_blocks=2**40), r"DeformConfig\.num_blocks must be an integer"),
        (dict(num_blocks=float("nan")), r"DeformConfig\.num_blocks must be an integer .*got nan"),
        (dict(num_blocks=2.5), r"DeformConfig\.num_blocks must be an integer .*got 2.5"),
        (dict(num_blocks=100.0), r"DeformConfig\.num_blocks must be an integer .*got 100.0"),
        (dict(block_div=10**9), r"DeformConfig\.block_div must be an integer in \[1, 32767\], got 1000000000"),
        (dict(block_div=float("nan")), r"DeformConfig\.block_div must be an integer"),
        (dict(block_div=float("inf")), r"DeformConfig\.block_div must be an integer .*got inf"),
        (dict(hole_div_min=10**9), r"DeformConfig\.hole_div_min must be an integer in \[1, 32767\]"),
        (dict(margin=10**9), r"DeformConfig\.margin must be an integer in \[0, 32767\]"),
        (dict(margin=float("nan")), r"DeformConfig\.margin must be an integer"),
        (dict(max_holes=True), r"DeformConfig\.max_holes must be an integer .*got True"),
        (
            dict(cut_min_num=0),
            r"outpaint fits no axis of up to 32767 voxels with cut_min_num=0, cut_max_num=4, "
            r"cut_den=7, margin=3",
        ),
        (dict(cut_max_num=7), r"outpaint fits no axis of up to 32767 voxels with cut_min_num=3, cut_max_num=7"),
        (dict(cut_den=10**9), r"DeformConfig\.cut_den must be an integer in \[1, 32767\]"),
        (
            dict(hole_div_max=1, hole_div_min=1),
            r"inpaint fits no axis of up to 32767 voxels with hole_div_min=1, "
            r"hole_div_max=1, margin=3",
        ),
        (dict(margin=16384), r"inpaint fits no axis"),
        (dict(blur_sigma_max=5.5), r"DeformConfig\.blur_sigma_max must be a number in \[0\.1, 5\]"),
        (dict(blur_sigma_min=0.0), r"DeformConfig\.blur_sigma_min must be a number in \[0\.1, 5\]"),
        (dict(blur_sigma_min=2.0, blur_sigma_max=1.0), r"need blur_sigma_min <= blur_sigma_max, got 2\.0 > 1\.0"),
        (dict(blur_rate=float("nan")), r"DeformConfig\.blur_rate must be a number in \[0, 1\]"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        DeformConfig(**changes)
    with pytest.raises(ValueError, match=match):
        DeformConfig.official().replace(**changes)


def test_replace_sets_the_complementary_painting_rate():
    assert DeformConfig().replace(inpaint_rate=0.5).outpaint_rate == 0.5
    assert DeformConfig().replace(outpaint_rate=1.0).inpaint_rate == 0.0
    with pytest.raises(ValueError, match="outpaint_rate must be 1 - inpaint_rate"):
        DeformConfig(inpaint_rate=0.5)  # the constructor takes both as given
    with pytest.raises(ValueError, match=r"DeformConfig\.inpaint_rate must be a number in \[0, 1\], got 1.5"):
        DeformConfig().replace(inpaint_rate=1.5)


def test_config_accepts_boundary_values_and_normalises_types():
    for rate in (0, 0.0, 1, 1.0, np.float32(0.5), np.int64(1)):
        c = DeformConfig(local_rate=rate, nonlinear_rate=rate, paint_rate=rate, flip_rate=rate)
        assert type(c.local_rate) is float and c.local_rate == float(rate)
    c = DeformConfig(num_blocks=np.int32(MAX_BLOCKS), block_div=np.int64(2), flip_compat=np.bool_(True))
    assert (type(c.num_blocks), type(c.block_div), type(c.flip_compat)) == (int, int, bool)
    assert DeformConfig(inpaint_rate=1.0, outpaint_rate=0.0).inpaint_rate == 1.0
    assert DeformConfig(cut_min_num=0, margin=0).min_axis_length("outpaint") == 1  # a whole-axis window is legal
    assert DeformConfig.official() == DeformConfig() and DeformConfig.official(flip_compat=True).flip_compat
    vec = DeformConfig().to_vector()
    assert len(vec) == len(dataclasses.fields(DeformConfig)) == len(_C.CONFIG_FIELDS)
    assert all(isinstance(v, float) for v in vec)


def test_python_and_core_declare_the_same_fields():
    """_C.CONFIG_FIELDS comes from csrc/deformations.h, the list the C++ struct and its reader are generated from;
    genesis_ext refuses to import when the two differ (checked at import, so here only the match is shown)."""
    ctype = {float: "double", int: "int32_t", bool: "bool"}
    python = [(f.name, ctype[f.metadata.get("type", bool)]) for f in dataclasses.fields(DeformConfig)]
    assert [tuple(f) for f in _C.CONFIG_FIELDS] == python
    # the core reads the vector by position: a scrambled config comes back from the kernels' own parameter draw
    config = DeformConfig(max_holes=8, hole_continue=1.0, max_windows=1, margin=0, hole_div_min=4, hole_div_max=4)
    p = genesis_ext.sample_params(1, (40, 40, 40), seed=1, config=config, with_blocks=False)
    assert p["n_holes"][0] == 8 and (p["holes"][0, :, 1] == 10).all()  # 8 holes of 40 // 4 = 10 voxels per axis


def test_one_registry_of_random_streams(monkeypatch):
    """The purposes of docs/randomness.md's table, streams.Purpose and the compiled core's GENESIS_PURPOSES
    (csrc/philox.h) are one list; genesis_ext refuses to import when Python and C++ differ."""
    rows = re.findall(r"^\| ([A-Z_]+) \| (\d+) \|", (REPO / "docs" / "randomness.md").read_text(), re.M)
    documented = {name: int(value) for name, value in rows}
    assert documented == {p.name: int(p) for p in Purpose} == dict(_C.PURPOSES)
    monkeypatch.setattr(_C, "PURPOSES", {**_C.PURPOSES, "USER": 13})
    with pytest.raises(ImportError, match="streams.Purpose .* differs from the compiled core's purposes"):
        genesis_ext.ops._check_core_declarations()


def test_python_and_the_core_draw_one_stream_version(monkeypatch):
    """A core built from other stream rules than genesis_ext.streams says (an old build beside new Python) would
    record one version while drawing another: genesis_ext refuses to import."""
    assert _C.STREAM_VERSION == genesis_ext.streams.STREAM_VERSION
    monkeypatch.setattr(_C, "STREAM_VERSION", 1)
    with pytest.raises(ImportError, match="the compiled core draws stream version 1: rebuild"):
        genesis_ext.ops._check_core_declarations()


def _resolve(dotted: str):
    """The object a dotted name names: its longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        return functools.reduce(getattr, parts[k:], obj)
    raise ImportError(dotted)


# old name -> new name, for one release
RENAMED = {
    "genesis_ext.deformation.USER_PURPOSE": "genesis_ext.streams.Purpose.USER",
    "genesis_ext.config.PRESETS": "genesis_ext.config.ABLATIONS",
    "genesis_ext.train.pretraining.PRESETS": "genesis_ext.train.pretraining.RECIPES",
    "genesis_ext.train.PRESETS": "genesis_ext.train.RECIPES",
    "genesis_ext.data.cubes.CUBE": "genesis_ext.data.cubes.PUBLISHED_CUBE",
    "genesis_ext.data.CUBE": "genesis_ext.data.PUBLISHED_CUBE",
    "genesis_ext.demo.CUBE": "genesis_ext.data.cubes.PUBLISHED_CUBE",
    **{
        f"genesis_ext.demo.{n}": f"genesis_ext.data.sample.{n}"
        for n in ("SAMPLE_DIR", "SAMPLE_FILES", "load_ct", "random_cubes")
    },
}
RENAMED_MODULES = {
    "genesis_ext.deformation": "genesis_ext.user_deformations",
    "genesis_ext.data.batch": "genesis_ext.data.extraction",
}


@pytest.mark.parametrize("old, new", RENAMED.items(), ids=list(RENAMED))
def test_renamed_names_still_import_with_a_deprecation_warning(old, new):
    module, _, name = old.rpartition(".")
    with warnings.catch_warnings():  # a renamed module's own warning (test below)
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"^{re.escape(old)} is deprecated, use {re.escape(new)}$"):
        value = getattr(module, name)
    assert value is _resolve(new)
    with pytest.raises(AttributeError, match="has no attribute 'NO_SUCH_NAME'"):
        module.NO_SUCH_NAME


@pytest.mark.parametrize("old, new", RENAMED_MODULES.items(), ids=list(RENAMED_MODULES))
def test_renamed_modules_still_import_with_a_deprecation_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported before: import it again, so that it warns
    with pytest.warns(DeprecationWarning, match=f"^{re.escape(old)} is deprecated, use {re.escape(new)}$"):
        shim = importlib.import_module(old)
    module = importlib.import_module(new)
    assert shim.__all__ == module.__all__ and all(getattr(shim, n) is getattr(module, n) for n in module.__all__)


@pytest.mark.parametrize("deformation", ["local", "inpaint", "outpaint"])
def test_min_axis_length_is_the_first_length_that_fits_and_all_longer_fit(deformation):
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 60:
        den = int(rng.integers(1, 12))
        kw = dict(
            block_div=int(rng.integers(1, 40)),
            hole_div_max=int(rng.integers(1, 8)),
            margin=int(rng.integers(0, 6)),
            cut_den=den,
            cut_max_num=int(rng.integers(0, den + 1)),
        )
        kw.update(
            hole_div_min=kw["hole_div_max"] + int(rng.integers(0, 8)),
            cut_min_num=int(rng.integers(0, kw["cut_max_num"] + 1)),
        )
        try:
            config = DeformConfig(**kw)
        except ValueError:
            continue
        n = config.min_axis_length(deformation)
        fits = [config._fits(deformation, s) for s in range(1, 600)]
        assert fits.index(True) + 1 == n and all(fits[n - 1 :]), (kw, n)
        checked += 1


def _config_or_none(changes):
    """The published config with `changes`, or None when it refuses them with a ValueError naming DeformConfig."""
    try:
        return DeformConfig.official().replace(**changes)
    except ValueError as e:
        assert str(e).startswith("DeformConfig")
        hypothesis.event("config rejected")
        return None


def _refused_for_the_shape(error: ValueError) -> bool:
    """The two refusals a valid config can meet on a given sample shape: a size rule, or the shuffle's work."""
    return "is too small for" in str(error) or "local shuffling would move each voxel" in str(error)


# hypothesis: any value in any field, including what a user can mistype or a sweep can produce
_ANY = st.one_of(
    st.integers(-3, 12),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.sampled_from([0.5, 1e-9, 1.0 - 1e-12, 2**31]),
)


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(
    changes=st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(DeformConfig)]), _ANY, max_size=4)
)
@hypothesis.example(changes={"num_blocks": MAX_BLOCKS, "paint_rate": 0.0})  # a shuffle the batch is too small for
def test_any_field_values_give_a_valid_config_or_a_clear_error(changes):
    """Either ValueError naming what is wrong, or a config the kernels run on (bounded work: the pair on a small batch
    finishes or raises the size-rule ValueError)."""
    config = _config_or_none(changes)
    if config is None:
        return
    x = np.random.default_rng(0).random((2, 1, 12, 16, 20), dtype=np.float32)
    try:
        deformed, target = genesis_ext.genesis_pair(x, seed=3, config=config)
    except ValueError as e:
        assert _refused_for_the_shape(e)
        hypothesis.event("batch too small for the config")
        return
    hypothesis.event("pair ran")
    assert deformed.shape == target.shape == x.shape and np.isfinite(deformed).all()


def test_spatial_sizes_beyond_the_index_type_fail_before_any_allocation():
    """An expanded view (no memory behind it) of more than 2**31 elements per sample: a clear error, nothing copied."""
    torch = pytest.importorskip("torch")
    x = torch.zeros(1, 1, 1, 1, 1).expand(2, 2, 2048, 2048, 512)
    with pytest.raises(ValueError, match="a sample must have fewer than 2\\*\\*31 elements"):
        genesis_ext.genesis_pair(x, seed=0)
    with pytest.raises(ValueError, match="a sample must have fewer than 2\\*\\*31 elements"):
        genesis_ext.flip(torch.empty(1, 1, 2**11, 2**11, 2**10, device="meta"), seed=0)


# The paper's ablation table: the deformations each preset combines.
ABLATION = {
    "none": "",
    "NL": "NL",
    "LS": "LS",
    "OP": "OP",
    "IP": "IP",
    "NL+LS": "NL LS",
    "NL+OP": "NL OP",
    "NL+IP": "NL IP",
    "LS+OP": "LS OP",
    "LS+IP": "LS IP",
    "NL+LS+OP": "NL LS OP",
    "NL+LS+IP": "NL LS IP",
    "genesis": "NL LS OP IP",
}


def test_presets_are_the_published_recipe_and_the_12_ablations():
    assert set(DeformConfig.presets()) == set(ABLATION) and len(DeformConfig.presets()) == 13
    assert DeformConfig.preset("genesis") == DeformConfig.official()
    assert DeformConfig.preset("nl+ls") == DeformConfig.preset("LS+NL") == DeformConfig.preset(" NL + LS ")
    assert DeformConfig.preset("NL+LS+OP+IP") == DeformConfig.official()
    assert DeformConfig.preset("IP", flip_compat=True).flip_compat
    for bad in ("NL+XX", "all", "", "NL+NL+LS+OP+IP+FLIP"):
        with pytest.raises(ValueError, match="unknown preset .* choose one of genesis, none, NL"):
            DeformConfig.preset(bad)
    for not_a_name in (None, 1, ("NL",)):  # str(None) == "None" once selected "none", the flips-only preset
        with pytest.raises(TypeError, match=r"name must be a str, one of genesis, none, NL.*; got "):
            DeformConfig.preset(not_a_name)


SHAPES = [(64, 64, 32), (32, 32, 16), (160, 160, 160)]


def test_no_preset_comes_near_the_shuffle_work_bound():
    """Every preset at the published cube, the CPU-sized one and a large one moves each voxel at most 2.5 times on
    average, their worst shape (the smallest 2-D image, 10x10) 100 times: far below MAX_SHUFFLE_COVERAGE (256)."""
    torch = pytest.importorskip("torch")
    cases = list(itertools.product(DeformConfig.presets(), SHAPES))
    assert max(DeformConfig.preset(name).shuffle_coverage(shape) for name, shape in cases) < 2.5
    assert DeformConfig().shuffle_coverage((10, 10)) == 100 < MAX_SHUFFLE_COVERAGE
    for name, shape in cases:  # the ops agree (a meta tensor: shape metadata only)
        genesis_ext.local_shuffle(torch.empty(1, 1, *shape, device="meta"), seed=0, config=DeformConfig.preset(name))


def test_a_shuffle_far_beyond_the_cubes_voxels_is_refused_before_any_work():
    """DeformConfig(num_blocks=1_000_000, block_div=1) is within every field's range and took 108 s for one
    64x64x32 cube: the ops refuse it from the shape alone (a meta tensor has no data), naming the fields, the bound
    and the fix; the pair only when the shuffle can fire."""
    torch = pytest.importorskip("torch")
    config = DeformConfig(num_blocks=1_000_000, block_div=1)
    x = torch.empty(1, 1, 64, 64, 32, device="meta")
    match = (
        r"with num_blocks=1000000 and block_div=1, local shuffling would move each voxel of a \(64, 64, 32\) sample "
        r"132,966 times on average .*the bound is 256 .*Lower num_blocks or raise block_div"
    )
    for op in ("local_shuffle", "genesis_pair"):
        with pytest.raises(ValueError, match=match):
            getattr(genesis_ext, op)(x, seed=0, config=config)
    genesis_ext.genesis_pair(x, seed=0, config=config.replace(local_rate=0.0))
    # 10x10 images take one-voxel blocks: num_blocks / 100 moves per voxel, so the bound falls at 25,600 blocks
    image = np.random.default_rng(0).random((1, 1, 10, 10), dtype=np.float32)
    genesis_ext.local_shuffle(image, seed=0, config=DeformConfig(num_blocks=25_600), spatial_dims=2)
    with pytest.raises(ValueError, match=r"\(10, 10\) sample 257 times on average"):
        genesis_ext.local_shuffle(image, seed=0, config=DeformConfig(num_blocks=25_700), spatial_dims=2)


@pytest.mark.parametrize("name", list(ABLATION))
def test_preset_gate_frequencies_on_10000_samples(name):
    """The gates the kernels draw (sample_params) fire at each preset's rates: a present deformation at its published
    probability (NL 0.9, LS 0.5, painting 0.9; IP alone: every painted sample in-painted, OP alone: none, both: 0.2),
    an absent one never; within 4 sigma."""
    parts = ABLATION[name].split()
    n = 10_000
    p = genesis_ext.sample_params(n, (64, 64, 32), seed=20191013, config=DeformConfig.preset(name), with_blocks=False)
    painted = p["paint"]
    expected = {
        "nonlinear": 0.9 * ("NL" in parts),
        "local": 0.5 * ("LS" in parts),
        "paint": 0.9 * ("IP" in parts or "OP" in parts),
    }
    for gate, rate in expected.items():
        freq = p[gate].mean()
        assert abs(freq - rate) <= 4 * np.sqrt(rate * (1 - rate) / n), (name, gate, freq, rate)
    if painted.any():
        inpaint = 0.2 if {"IP", "OP"} <= set(parts) else float("IP" in parts)
        freq = p["inpaint"][painted].mean()
        assert abs(freq - inpaint) <= 4 * np.sqrt(inpaint * (1 - inpaint) / painted.sum()), (name, freq, inpaint)


def _typed(f: dataclasses.Field):
    """Values of f's declared type, mostly inside and sometimes just outside its range."""
    kind, (lo, hi) = f.metadata.get("type", bool), f.metadata.get("range", (None, None))
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.one_of(st.integers(max(lo, 0), min(hi, 40)), st.integers(lo - 1, lo + 2), st.integers(hi - 1, hi + 1))
    return st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 1.0 + 1e-9, -1e-9]))


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_typed_field_values_run_every_op_or_raise_clearly(data):
    fields = dataclasses.fields(DeformConfig)
    names = data.draw(st.lists(st.sampled_from([f.name for f in fields]), max_size=6, unique=True))
    changes = {f.name: data.draw(_typed(f), label=f.name) for f in fields if f.name in names}
    config = _config_or_none(changes)  # replace() sets the complement of a lone painting rate
    if config is None:
        return
    x = np.random.default_rng(1).random((2, 1, 24, 20, 16), dtype=np.float32)
    for op in ("genesis_pair", "local_shuffle", "inpaint", "outpaint"):
        try:
            out = getattr(genesis_ext, op)(x, seed=4, offset=9, config=config)
        except ValueError as e:
            assert _refused_for_the_shape(e)
            hypothesis.event(f"{op}: batch too small")
            continue
        hypothesis.event(f"{op} ran")
        for o in out if isinstance(out, tuple) else (out,):
            assert o.shape == x.shape and np.isfinite(o).all()
