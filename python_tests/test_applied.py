"""genesis_ext.applied: the record of what each sample got names every stage that fired, a user deformation
included, and the MONAI record, the demo's captions and pre-training's branches are read from it."""

from __future__ import annotations

import pytest

import genesis_ext
from genesis_ext import DeformConfig, PixelDeformation
from genesis_ext import reference as R
from genesis_ext.applied import Applied, applied, deformation_names

SPATIAL = (32, 32, 16)
# every stage fires about half the time, both painting kinds among them
CONFIG = DeformConfig(
    flip_rate=0.5, local_rate=0.5, nonlinear_rate=0.5, paint_rate=0.5, gaussian_noise_rate=0.5, blur_rate=0.5
)
GAMMA = PixelDeformation("gamma", lambda x, u: x, rate=0.5, after="bezier_remap")


def expected_fired(p: dict, gamma_gate: bool) -> tuple[str, ...]:
    """Written out from the pair's order (flip, shuffle, Bézier, [gamma], blur, noise, painting) and the reference's
    own parameters, not from genesis_ext.applied."""
    names = ["flip"] if p["flip"].any() else []
    names += ["local_shuffle"] if p["local"] else []
    names += ["bezier_remap"] if p["nonlinear"] else []
    names += ["gamma"] if gamma_gate else []
    names += ["gaussian_blur"] if p["blur"] else []
    names += ["gaussian_noise"] if p["gaussian"] else []
    names += [("inpaint" if p["inpaint"] else "outpaint")] if p["paint"] else []
    return tuple(names)


def test_every_stage_and_a_user_deformation_appear_when_they_fire():
    n, seed, offset = 96, 7, 1000
    params = genesis_ext.sample_params(n, SPATIAL, seed=seed, offset=offset, config=CONFIG, with_blocks=False)
    records = applied(params, seed, [GAMMA])
    gamma_gate = GAMMA.draws(seed, offset, n)[0]
    for k, record in enumerate(records):
        p = R.derive_params(seed, offset + k, SPATIAL, CONFIG)
        assert (record.seed, record.index) == (seed, offset + k)
        assert record.fired == expected_fired(p, bool(gamma_gate[k])), k
        assert record.flip == tuple(bool(f) for f in p["flip"])
    seen = {name for r in records for name in r.fired}
    assert seen == {"flip", *deformation_names([GAMMA])}  # every name fired somewhere in 96 samples
    assert deformation_names([GAMMA]) == (
        "local_shuffle",
        "bezier_remap",
        "gamma",
        "gaussian_blur",
        "gaussian_noise",
        "inpaint",
        "outpaint",
    )


def test_caption_names_what_each_fired_deformation_drew():
    params = genesis_ext.sample_params(64, SPATIAL, seed=3, config=CONFIG, with_blocks=False)
    records = applied(params, 3)
    k = next(k for k, r in enumerate(records) if {"gaussian_noise", "gaussian_blur", "bezier_remap"} <= set(r.fired))
    caption = records[k].caption()
    assert f"gaussian_noise (std {float(params['noise_std'][k]):.3f})" in caption
    assert f"gaussian_blur (sigma {float(params['blur_sigma'][k]):.2f})" in caption
    assert ("bezier_remap (increasing)" if params["increasing"][k] else "bezier_remap (decreasing)") in caption
    assert Applied(0, 0, (), (False, False, False)).caption() == "none"


def test_monai_record_names_blur_noise_and_user_deformations():
    pytest.importorskip("monai")
    torch = pytest.importorskip("torch")
    from monai.data import MetaTensor

    from genesis_ext.monai import GenesisPaird

    transform = GenesisPaird(["image"], config=CONFIG, seed=5, deformations=[GAMMA])
    transform.set_random_state(11)
    seen = set()
    for _ in range(24):
        record = transform({"image": MetaTensor(torch.rand(1, *SPATIAL))})["image"].meta["genesis_ext"]
        p = R.derive_params(5, record["index"], SPATIAL, CONFIG)
        fired = expected_fired(p, bool(GAMMA.draws(5, record["index"], 1)[0][0]))
        assert set(record) == {"seed", "index", "flip", *deformation_names([GAMMA])}
        assert {name for name in deformation_names([GAMMA]) if record[name]} == set(fired) - {"flip"}
        assert record["flip"] == [bool(f) for f in p["flip"]]
        seen |= set(fired)
    assert seen == {"flip", *deformation_names([GAMMA])}
