"""User deformations (genesis_ext.PixelDeformation) in the training pair, on real CT cubes: placed where they say, the
fused pair unchanged around them, their gates and uniforms a function of (seed, sample, name), and every misuse a
clear error that leaves the batch untouched."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import genesis_ext
from genesis_ext import DeformConfig, GenesisPair, PixelDeformation
from genesis_ext import reference as R
from genesis_ext.user_deformations import PAIR_ORDER

torch = pytest.importorskip("torch")

# every built-in stage can fire, so every segment boundary is exercised
CONFIG = DeformConfig(blur_rate=0.5, gaussian_noise_rate=0.5, blur_sigma_max=1.0)


def identity(x, u):
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


@pytest.fixture(scope="module")
def cubes(ct_cubes):
    return torch.from_numpy(ct_cubes[:, :, :32, :32, :16].copy())  # 8 real cubes, small enough to be quick


@pytest.mark.parametrize("after", PAIR_ORDER)
def test_identity_deformation_leaves_the_fused_pair_bit_identical(after, cubes):
    """The pair runs in segments around a user deformation; with an identity fn that equals the fused kernel."""
    fused = genesis_ext.genesis_pair(cubes, seed=3, offset=11, config=CONFIG)
    got = genesis_ext.genesis_pair(
        cubes, seed=3, offset=11, config=CONFIG, deformations=[PixelDeformation("identity", identity, after=after)]
    )
    assert torch.equal(got[0], fused[0]) and torch.equal(got[1], fused[1])
    numpy_got = genesis_ext.genesis_pair(
        cubes.numpy(),
        seed=3,
        offset=11,
        config=CONFIG,
        deformations=[PixelDeformation("identity", identity, after=after)],
    )
    assert np.array_equal(numpy_got[0], fused[0].numpy())


def test_deformation_runs_where_it_says(cubes):
    """Halving after the Gaussian noise keeps the painting noise exact; after painting it halves that too."""
    config = DeformConfig.preset("NL+IP")  # in-painting only: painted voxels are easy to find
    halve = {
        after: PixelDeformation("halve", lambda x, u: x * 0.5, after=after) for after in ("gaussian_noise", "painting")
    }
    fused, _ = genesis_ext.genesis_pair(cubes, seed=5, config=config)
    before_paint, _ = genesis_ext.genesis_pair(cubes, seed=5, config=config, deformations=[halve["gaussian_noise"]])
    after_paint, _ = genesis_ext.genesis_pair(cubes, seed=5, config=config, deformations=[halve["painting"]])
    assert torch.equal(after_paint, fused * 0.5)
    p = genesis_ext.sample_params(len(cubes), cubes.shape[2:], seed=5, config=config)
    for n in range(len(cubes)):
        painted = np.zeros(cubes.shape[2:], dtype=bool)
        for origin, size in p["holes"][n][: p["n_holes"][n]] if p["paint"][n] else []:
            painted[tuple(slice(o, o + s) for o, s in zip(origin, size))] = True
        painted = torch.from_numpy(painted)
        assert torch.equal(before_paint[n, 0][painted], fused[n, 0][painted])
        assert torch.equal(before_paint[n, 0][~painted], fused[n, 0][~painted] * 0.5)
    assert p["paint"].any()


def test_gates_and_uniforms_are_the_named_stream_of_each_sample(cubes):
    """fn sees only the samples whose gate fired, with their own uniforms: words 0 and 1.. of stream
    (seed, i, USER = 12, crc32(name)) of docs/randomness.md. The result does not depend on how the batch is split."""
    seen = []

    def record(x, u):
        seen.append(u.clone())
        return x + u[:, :1].view(-1, 1, 1, 1, 1)

    shift = PixelDeformation("shift", record, rate=0.6, uniforms=3)
    whole, _ = genesis_ext.genesis_pair(cubes, seed=9, offset=40, deformations=[shift])
    words = R.sample_words(9, 40, len(cubes), 12, zlib.crc32(b"shift"), 4)
    gate = R.uniform(words[:, 0]) < 0.6
    assert 0 < gate.sum() < len(cubes)
    assert np.array_equal(seen[-1].numpy(), R.uniform(words[gate, 1:]).astype(np.float32))  # after the probe call
    parts = [
        genesis_ext.genesis_pair(cubes[k : k + 3], seed=9, offset=40 + k, deformations=[shift])[0]
        for k in range(0, len(cubes), 3)
    ]
    assert torch.equal(torch.cat(parts), whole)
    plain, _ = genesis_ext.genesis_pair(cubes, seed=9, offset=40)
    changed = (whole != plain).flatten(1).any(1).numpy()
    assert np.array_equal(changed, gate)


def test_gate_frequency_on_10000_samples():
    gate, u = PixelDeformation("freq", identity, rate=0.3, uniforms=2).draws(seed=1, offset=0, n=10_000)
    assert abs(gate.mean() - 0.3) <= 4 * np.sqrt(0.3 * 0.7 / 10_000)
    assert u.shape == (10_000, 2) and u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.04
    other, _ = PixelDeformation("other", identity, rate=0.3).draws(seed=1, offset=0, n=10_000)
    assert (gate != other).mean() > 0.3  # another name, another stream


def test_readme_gamma_example_in_a_module(cubes):
    gamma = PixelDeformation(
        "gamma", lambda x, u: x.clamp(min=0) ** (0.5 + u[:, :1].view(-1, 1, 1, 1, 1)), rate=0.5, after="bezier_remap"
    )
    pair = GenesisPair(DeformConfig(), seed=2, deformations=[gamma])
    first = pair(cubes)
    state = pair.state_dict()
    again = GenesisPair(DeformConfig(), seed=0, deformations=[gamma])
    again.load_state_dict(state)
    assert torch.equal(pair(cubes)[0], again(cubes)[0])
    assert torch.equal(first[0], genesis_ext.genesis_pair(cubes, seed=2, deformations=[gamma])[0])
    assert "gamma" in repr(pair)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda x, u: x.flip(-1), "moves voxels"),
        (lambda x, u: x.roll(3, dims=2), "moves voxels"),
        (lambda x, u: x.transpose(2, 3) if x.shape[2] == x.shape[3] else x.flip(2), "moves voxels"),
        (lambda x, u: x.mul_(2.0), "must not modify its input"),
        (lambda x, u: x[:, :, 1:], "must return a Tensor of shape"),
        (lambda x, u: x.double(), "dtype torch.float32"),
        (lambda x, u: x.numpy(), "must return a Tensor"),
    ],
)
def test_bad_user_deformations_name_themselves_and_leave_the_batch(fn, match, cubes):
    before = cubes.clone()
    with pytest.raises(ValueError, match=f"PixelDeformation 'bad': .*{match}"):
        genesis_ext.genesis_pair(cubes, seed=1, deformations=[PixelDeformation("bad", fn)])
    assert torch.equal(cubes, before)


def test_numpy_deformation_that_writes_into_its_input_is_refused(cubes):
    def scale_in_place(x, u):
        x *= 2
        return x

    with pytest.raises(ValueError, match="PixelDeformation 'inplace': fn must not modify its input"):
        genesis_ext.genesis_pair(
            cubes.numpy().copy(), seed=1, deformations=[PixelDeformation("inplace", scale_in_place)]
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(after="blur"),
            ValueError,
            r"PixelDeformation 'd': after must be one of flip, local_shuffle, .*got 'blur'",
        ),
        (dict(rate=1.5), ValueError, r"PixelDeformation 'd': rate must be a number in \[0, 1\], got 1.5"),
        (dict(rate=float("nan")), ValueError, "rate must be a number"),
        (dict(uniforms=-1), ValueError, r"uniforms must be an integer in \[0, 1024\]"),
        (dict(fn=3), TypeError, "fn must be callable"),
        (dict(name=""), ValueError, "name must be a non-empty string"),
    ],
)
def test_deformation_declarations_are_checked(kwargs, error, match):
    args = dict(name="d", fn=identity) | kwargs
    with pytest.raises(error, match=match):
        PixelDeformation(**args)


def test_deformation_lists_are_checked(cubes):
    d = PixelDeformation("d", identity)
    with pytest.raises(ValueError, match="names must be unique"):
        genesis_ext.genesis_pair(cubes, seed=0, deformations=[d, PixelDeformation("d", identity)])
    with pytest.raises(TypeError, match="deformations must be PixelDeformation objects, got function"):
        genesis_ext.genesis_pair(cubes, seed=0, deformations=[identity])


def test_names_whose_crc32_collide_are_refused_where_they_meet():
    """A deformation's stream is crc32 of its name: "plumless" and "buckeroo" (a known CRC-32 collision) would draw
    the same gates and uniforms, so a pair or a module given both refuses, naming both."""
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    pair = [PixelDeformation("plumless", identity), PixelDeformation("buckeroo", identity)]
    match = "user deformations 'plumless' and 'buckeroo' have the same CRC-32 .*rename one of them"
    x = torch.rand(1, 1, 32, 32, 16)
    with pytest.raises(ValueError, match=match):
        genesis_ext.genesis_pair(x, seed=0, deformations=pair)
    with pytest.raises(ValueError, match=match):
        GenesisPair(seed=0, deformations=pair)
    genesis_ext.genesis_pair(x, seed=0, deformations=pair[:1] + [PixelDeformation("plumles", identity)])
