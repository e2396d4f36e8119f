"""The CPU kernels against the numpy oracle (genesis_ext.reference), voxel by voxel, and the ops' contract.

Exactness: everything the kernels do is integer geometry, permutations, copies and Philox noise, so every voxel must
equal the oracle bit for bit, except the Bézier map, which must be within 1e-5 of the exact float64 map.
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import box_union

import genesis_ext
from genesis_ext import DeformConfig
from genesis_ext import reference as R
from genesis_ext.config import PAIR_STAGES
from genesis_ext.data.intensity import IntensityWarning

from kernel_cases import ALL_OPS, EDGE, SCRAMBLED, SINGLE_OPS, outputs

torch = pytest.importorskip("torch")

BEZIER_TOL = 1e-5
BLUR_TOL = 1e-5  # the float32 blur against the float64 blur, relative to the largest |value| (gaussian_blur's doc)


def run(op, x, **kw):
    """genesis_ext.<op>(x, **kw), saying which layout a 4-D or 5-D batch has (spatial_dims: the tests know it)."""
    if getattr(x, "ndim", None) in (4, 5):
        kw.setdefault("spatial_dims", x.ndim - 2)
    return getattr(genesis_ext, op)(x, **kw)


def channels_of(base):
    """(N, 1, *S) -> (N, 3, *S) with channels (x, 2x, -x): all exact in float32, and only 1/3 of them in [0, 1]."""
    return np.ascontiguousarray(np.concatenate([base, 2 * base, -base], axis=1))


def paint_mask(p, spatial, kind):
    """Voxels that become noise: kind 'inpaint' (inside the holes) or 'outpaint' (outside the windows)."""
    if kind == "inpaint":
        return box_union(spatial, p["holes"], p["n_holes"])
    return ~box_union(spatial, p["windows"], p["n_windows"])


def oracle_single(op, x, seed, offset, config):
    """The oracle of a single op on a batch: every sample gets the op unconditionally (its gate is ignored).
    bezier_remap returns the exact float64 map; the rest float32."""
    out = np.empty(x.shape, dtype=np.float64 if op == "bezier_remap" else np.float32)
    for n in range(x.shape[0]):
        out[n] = R.single_op(op, x[n], seed, offset + n, R.derive_params(seed, offset + n, x.shape[2:], config))
    return out


def assert_bezier_close(got, exact, tol=BEZIER_TOL):
    """Within tol of the exact map, NaN exactly where the exact map is NaN."""
    assert got.dtype == np.float32 and got.shape == exact.shape
    nan = np.isnan(exact)
    assert np.array_equal(np.isnan(got), nan)
    err = np.abs(got[~nan].astype(np.float64) - exact[~nan])
    assert err.max(initial=0.0) <= tol, f"error {err.max():.3g} > {tol}"


def assert_pair_matches_oracle(xd, tg, x, seed, index, config):
    """One sample (C, *S) of genesis_pair against reference.genesis_pair."""
    p = R.derive_params(seed, index, x.shape[1:], config)
    ref_xd, ref_tg = R.genesis_pair(x, seed, index, config, params=p)
    assert np.array_equal(tg, ref_tg, equal_nan=True)
    if not p["nonlinear"]:
        assert np.array_equal(xd, ref_xd, equal_nan=True)
        return
    painted = np.zeros(x.shape[1:], dtype=bool)
    if p["paint"]:
        painted = paint_mask(p, x.shape[1:], "inpaint" if p["inpaint"] else "outpaint")
    painted = np.broadcast_to(painted, x.shape)
    # painting noise is exact and not intensity-mapped
    assert np.array_equal(xd[painted], ref_xd[painted], equal_nan=True)
    # the rest: the reference's stages in float32 after the exact float64 map; the table map's error (BEZIER_TOL)
    # carried through the later stages, plus their float32 roundings (a blur's: BLUR_TOL)
    scale = max(1.0, float(np.nanmax(np.abs(ref_xd), initial=0.0)))
    tol = BEZIER_TOL + (BLUR_TOL if p["blur"] else 2.0**-21) * scale
    assert_bezier_close(xd[~painted], ref_xd[~painted].astype(np.float64), tol)


def branch_indices(seed, spatial, config, per_branch, offset=0, search=2000):
    """Global indices of samples covering every branch of the pair: (local, nonlinear, paint kind), `per_branch`
    each, found from sample_params. Paint kind: 0 none, 1 in-painting, 2 out-painting."""
    p = genesis_ext.sample_params(search, spatial, seed=seed, offset=offset, config=config, with_blocks=False)
    kind = np.where(p["paint"], np.where(p["inpaint"], 1, 2), 0)
    chosen = []
    for local in (False, True):
        for nonlinear in (False, True):
            for k in (0, 1, 2):
                hits = np.nonzero((p["local"] == local) & (p["nonlinear"] == nonlinear) & (kind == k))[0]
                assert len(hits) >= per_branch, (local, nonlinear, k)
                chosen += [offset + int(h) for h in hits[:per_branch]]
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# Kernels vs oracle

# (id, spatial shape, channels, config, seed, offset)
CASES = [
    ("official", (64, 64, 32), 1, DeformConfig.official(), 1234, 0),
    ("official-big-seed", (64, 64, 32), 1, DeformConfig.official(flip_compat=True), 2**64 - 3, 2**32 - 2),
    ("odd", (23, 41, 17), 1, DeformConfig(), 7, 40),
    ("odd-c3-scrambled", (23, 41, 17), 3, SCRAMBLED, 2**63 + 1, 5),
    ("2d-c3", (64, 64), 3, DeformConfig(), 99, 2**40),
    ("odd-c2-edge", (23, 41, 17), 2, EDGE, 3, 0),
    ("2d-edge", (40, 24), 1, EDGE, 2**64 - 1, 12),
]


def make_case_input(spatial, channels, n, rng):
    if channels == 3:
        return channels_of(rng.random((n, 1, *spatial), dtype=np.float32))
    return rng.random((n, channels, *spatial), dtype=np.float32)


@pytest.mark.parametrize("op", SINGLE_OPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_single_op_matches_oracle(op, case, rng):
    _, spatial, channels, config, seed, offset = case
    x = make_case_input(spatial, channels, 4, rng)
    got = run(op, x, seed=seed, offset=offset, config=config)
    expected = oracle_single(op, x, seed, offset, config)
    if op == "bezier_remap":
        assert_bezier_close(got, expected)
    else:
        assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert not np.array_equal(got, x)  # the op did something on these samples


@pytest.mark.parametrize("op", ("local_shuffle", "flip"))
def test_channels_move_together(op, rng):
    x = channels_of(rng.random((4, 1, 23, 41, 17), dtype=np.float32))
    out = run(op, x, seed=3, offset=0, config=SCRAMBLED)
    assert np.array_equal(out[:, 1], 2 * out[:, 0]) and np.array_equal(out[:, 2], -out[:, 0])
    assert not np.array_equal(out, x)


def test_painting_noise_is_independent_per_channel(rng):
    x = channels_of(rng.random((2, 1, 64, 64, 32), dtype=np.float32))
    out = run("inpaint", x, seed=8)
    for n in range(2):
        mask = paint_mask(R.derive_params(8, n, (64, 64, 32)), (64, 64, 32), "inpaint")
        assert mask.any()
        noise = out[n][:, mask]
        assert ((noise >= 0) & (noise < 1)).all()
        assert (noise[0] != noise[1]).mean() > 0.99 and (noise[0] != noise[2]).mean() > 0.99


def test_pair_matches_oracle_on_every_branch(rng):
    """Two samples of each of the 12 branches (local x nonlinear x {no paint, in-, out-painting}) of the official
    recipe, each run as a one-sample batch at its own global index."""
    seed = 31337
    x = rng.random((1, 64, 64, 32), dtype=np.float32)
    for index in branch_indices(seed, (64, 64, 32), DeformConfig(), per_branch=2):
        xd, tg = run("genesis_pair", x[None], seed=seed, offset=index)
        assert xd.shape == tg.shape == (1, 1, 64, 64, 32)
        assert_pair_matches_oracle(xd[0], tg[0], x, seed, index, DeformConfig())


def test_pair_matches_oracle_on_ct(ct_cubes):
    """Real chest CT through every branch: one cube per branch, cycling over the cubes."""
    seed = 2024
    for k, index in enumerate(branch_indices(seed, (64, 64, 32), DeformConfig(), per_branch=1, offset=500)):
        x = ct_cubes[k % len(ct_cubes)]
        xd, tg = run("genesis_pair", x[None], seed=seed, offset=index)
        assert_pair_matches_oracle(xd[0], tg[0], x, seed, index, DeformConfig())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pair_batch_matches_oracle(case, rng):
    _, spatial, channels, config, seed, offset = case
    x = make_case_input(spatial, channels, 4, rng)
    xd, tg = run("genesis_pair", x, seed=seed, offset=offset, config=config)
    for n in range(x.shape[0]):
        assert_pair_matches_oracle(xd[n], tg[n], x[n], seed, offset + n, config)


def test_pair_channels_move_together(rng):
    """Target always, and the input where no Bézier map or painting changes values, keep channels (x, 2x, -x)."""
    seed, config = 5, DeformConfig(nonlinear_rate=0.0, paint_rate=0.0, local_rate=0.5, flip_rate=0.6)
    x = channels_of(rng.random((6, 1, 23, 41, 17), dtype=np.float32))
    xd, tg = run("genesis_pair", x, seed=seed, config=config)
    for out in (xd, tg):
        assert np.array_equal(out[:, 1], 2 * out[:, 0]) and np.array_equal(out[:, 2], -out[:, 0])
    p = genesis_ext.sample_params(6, (23, 41, 17), seed=seed, config=config, with_blocks=False)
    assert p["local"].any() and p["flip"].any()
    for n in range(6):
        assert np.array_equal(xd[n], tg[n]) == (not p["local"][n])


@pytest.mark.parametrize(
    "spatial, channels, config",
    [
        ((64, 64, 32), 1, DeformConfig()),
        ((23, 41, 17), 3, SCRAMBLED),
        ((64, 64), 2, DeformConfig.official(flip_compat=True)),
        ((23, 41, 17), 2, EDGE),
    ],
    ids=["official", "odd-c3-scrambled", "2d-c2-compat", "odd-c2-edge"],
)
def test_pair_is_composition_of_single_ops(spatial, channels, config, rng):
    """For every branch: x_deformed == the single ops chained on the running result (flip first: shuffle blocks live
    in the flipped frame), each with the same (seed, offset). Bit-exact, the Bézier map included."""
    seed = 4242
    x = rng.random((1, channels, *spatial), dtype=np.float32)
    for index in branch_indices(seed, spatial, config, per_branch=2, offset=10**6):
        p = genesis_ext.sample_params(1, spatial, seed=seed, offset=index, config=config, with_blocks=False)
        kw = dict(seed=seed, offset=index, config=config)
        chain = run("flip", x, **kw)
        target = chain.copy()
        for stage, declared in PAIR_STAGES.items():  # the declared order, each stage where its gate fired
            if declared.gate is not None and p[declared.gate][0]:
                op = ("inpaint" if p["inpaint"][0] else "outpaint") if stage == "painting" else stage
                chain = run(op, chain, **kw)
        xd, tg = run("genesis_pair", x, **kw)
        assert np.array_equal(tg, target), index
        assert np.array_equal(xd, chain), index


@pytest.mark.parametrize("shape", [(3, 2, 5, 7, 1), (3, 2, 1, 1, 1), (4, 1, 1, 9), (2, 3, 1, 1)])
@pytest.mark.parametrize("op", ("bezier_remap", "flip"))
def test_shape_free_ops_on_degenerate_axes(op, shape, rng):
    """bezier_remap and flip have no size rules: axes of length 1 work (a flip along them is the identity)."""
    config = DeformConfig(flip_rate=0.9)
    x = rng.random(shape, dtype=np.float32)
    got = run(op, x, seed=21, offset=0, config=config)
    # the oracle draws no geometry it cannot fit; flips and Bézier curves do not depend on these rates
    expected = oracle_single(op, x, 21, 0, config.replace(local_rate=0.0, paint_rate=0.0))
    if op == "bezier_remap":
        assert_bezier_close(got, expected)
    else:
        assert np.array_equal(got, expected)


def test_pure_autoencoder_sample_returns_flipped_input(rng):
    config = DeformConfig(nonlinear_rate=0.0, local_rate=0.0, paint_rate=0.0)
    x = rng.random((6, 2, 16, 16, 16), dtype=np.float32)
    xd, tg = run("genesis_pair", x, seed=1, config=config)
    assert np.array_equal(xd, tg) and xd is not tg
    assert np.array_equal(tg, oracle_single("flip", x, 1, 0, config))


# ---------------------------------------------------------------------------------------------------------------------
# Contract: types, inputs untouched, strides, determinism, batch independence, threads, fork


@pytest.mark.parametrize("op", ALL_OPS)
def test_numpy_and_torch_in_same_type_out_and_agree(op, rng):
    x = rng.random((2, 2, 23, 41, 17), dtype=np.float32)
    out_np = run(op, x, seed=11, offset=3)
    out_t = run(op, torch.from_numpy(x), seed=11, offset=3)
    outs_np = out_np if op == "genesis_pair" else (out_np,)
    outs_t = out_t if op == "genesis_pair" else (out_t,)
    assert isinstance(out_np, tuple) == isinstance(out_t, tuple) == (op == "genesis_pair")
    for a, b in zip(outs_np, outs_t):
        assert type(a) is np.ndarray and a.dtype == np.float32 and a.shape == x.shape and a.flags.c_contiguous
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float32 and b.device.type == "cpu"
        assert tuple(b.shape) == x.shape and b.is_contiguous()
        assert np.array_equal(a, b.numpy())


@pytest.mark.parametrize("op", ALL_OPS)
def test_inputs_are_not_modified(op, rng):
    x = rng.random((3, 1, 64, 64, 32), dtype=np.float32)
    keep = x.copy()
    run(op, x, seed=2, offset=0)
    assert np.array_equal(x, keep)
    t = torch.from_numpy(keep.copy())
    out = run(op, t, seed=2, offset=0)
    assert torch.equal(t, torch.from_numpy(keep))
    for o in out if isinstance(out, tuple) else (out,):
        assert o.data_ptr() != t.data_ptr()


def _noncontiguous_views(rng):
    """(view, description) pairs, all float32 (N, C, X, Y, Z) views that are not C-contiguous."""
    base = rng.random((3, 2, 17, 41, 23), dtype=np.float32)
    wide = rng.random((3, 2, 23, 82, 17), dtype=np.float32)
    tbase = torch.from_numpy(base.copy())
    return [
        (base.transpose(0, 1, 4, 3, 2), "numpy transposed"),
        (wide[:, :, :, ::2], "numpy strided"),
        (np.flip(base.transpose(0, 1, 4, 3, 2), axis=2), "numpy negative strides"),
        (np.asfortranarray(base.transpose(0, 1, 4, 3, 2)), "numpy fortran"),
        (tbase.permute(0, 1, 4, 3, 2), "torch permuted"),
        (torch.from_numpy(wide.copy())[:, :, :, ::2], "torch strided"),
        (torch.from_numpy(base.copy()).permute(1, 0, 4, 3, 2).transpose(0, 1), "torch batch/channel swapped"),
    ]


@pytest.mark.parametrize("op", ALL_OPS)
def test_noncontiguous_inputs_equal_contiguous_copies(op, rng):
    for view, what in _noncontiguous_views(rng):
        is_torch = isinstance(view, torch.Tensor)
        assert tuple(view.shape) == (3, 2, 23, 41, 17)
        assert not (view.is_contiguous() if is_torch else view.flags.c_contiguous), what
        copy = view.contiguous() if is_torch else np.ascontiguousarray(view)
        a = run(op, view, seed=17, offset=1)
        b = run(op, copy, seed=17, offset=1)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            u, v = (u.numpy(), v.numpy()) if is_torch else (u, v)
            assert np.array_equal(u, v), (op, what)


@pytest.mark.parametrize("op", ALL_OPS)
def test_deterministic_and_seed_dependent(op, rng):
    x = rng.random((3, 1, 64, 64, 32), dtype=np.float32)
    first = run(op, x, seed=123, offset=9)
    again = run(op, x, seed=123, offset=9)
    other_seed = run(op, x, seed=124, offset=9)
    other_offset = run(op, x, seed=123, offset=10)
    as_tuple = (lambda r: r) if op == "genesis_pair" else (lambda r: (r,))
    for a, b in zip(as_tuple(first), as_tuple(again)):
        assert np.array_equal(a, b)
    # every sample's deformed output changes with the seed (flip, inpaint: a sample may be unflipped or get no hole)
    changed = [not np.array_equal(a, b) for a, b in zip(as_tuple(first)[0], as_tuple(other_seed)[0])]
    assert all(changed) if op not in ("flip", "inpaint") else any(changed)
    assert not np.array_equal(as_tuple(first)[0], as_tuple(other_offset)[0])
    # sample n uses global index offset + n: x[1:] at offset 10 is samples 1, 2 of the call at offset 9
    shifted = as_tuple(run(op, x[1:], seed=123, offset=10))[0]
    assert np.array_equal(shifted, as_tuple(first)[0][1:])


def test_batch_split_independence(rng):
    x = rng.random((8, 1, 64, 64, 32), dtype=np.float32)
    seed = 2**63 + 99
    xd, tg = run("genesis_pair", x, seed=seed, offset=0)
    xd_a, tg_a = run("genesis_pair", x[:3], seed=seed, offset=0)
    xd_b, tg_b = run("genesis_pair", x[3:], seed=seed, offset=3)
    assert np.array_equal(xd, np.concatenate([xd_a, xd_b])) and np.array_equal(tg, np.concatenate([tg_a, tg_b]))
    for k in (0, 5, 7):
        xd_k, tg_k = run("genesis_pair", x[k : k + 1], seed=seed, offset=k)
        assert np.array_equal(xd_k[0], xd[k]) and np.array_equal(tg_k[0], tg[k])
    # a sample's result depends only on (seed, global index), not on the data of its batch neighbours
    y = x.copy()
    y[[0, 1, 2, 4, 5, 6, 7]] = rng.random((7, 1, 64, 64, 32), dtype=np.float32)
    xd_y, tg_y = run("genesis_pair", y, seed=seed, offset=0)
    assert np.array_equal(xd_y[3], xd[3]) and np.array_equal(tg_y[3], tg[3])


def test_result_does_not_depend_on_thread_count(rng):
    x = rng.random((5, 1, 64, 64, 32), dtype=np.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run("genesis_pair", x, seed=77)
        torch.set_num_threads(max(2, threads))
        multi = run("genesis_pair", x, seed=77)
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(single, multi))


def _pair_in_child(x):
    return run("genesis_pair", x, seed=5, offset=2)


def test_forked_child_runs_without_hanging(rng):
    """DataLoader workers are forked children of a parent that has used OpenMP (GNU libgomp hangs there unless the
    child runs single-threaded)."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = rng.random((4, 1, 64, 64, 32), dtype=np.float32)
    expected = run("genesis_pair", x, seed=5, offset=2)  # the parent's OpenMP pool is now alive
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_pair_in_child, (x,)).get(timeout=120)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_extreme_seed_and_offset(rng):
    x = rng.random((1, 1, 64, 64, 32), dtype=np.float32)
    for seed, offset in [(2**64 - 1, 2**63 - 1), (np.uint64(2**64 - 1), np.int64(2**63 - 1))]:
        xd, tg = run("genesis_pair", x, seed=seed, offset=offset)
        assert_pair_matches_oracle(xd[0], tg[0], x[0], 2**64 - 1, 2**63 - 1, DeformConfig())
        t_xd, t_tg = run("genesis_pair", torch.from_numpy(x), seed=seed, offset=offset)  # int64 in the schema
        assert np.array_equal(t_xd.numpy(), xd) and np.array_equal(t_tg.numpy(), tg)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite values (ops.py: data, not errors)


def test_bezier_nonfinite_and_out_of_range_values(rng):
    special = np.array([np.nan, np.inf, -np.inf, -0.5, 1.5, -0.0, 0.0, 1.0, 3e38, -3e38], dtype=np.float32)
    x = np.concatenate([special, rng.random(54, dtype=np.float32)]).reshape(1, 1, 8, 8)
    x = np.ascontiguousarray(np.repeat(x, 6, axis=0))
    out = run("bezier_remap", x, seed=10).reshape(6, -1)
    p = genesis_ext.sample_params(6, (8, 8), seed=10, with_blocks=False)
    assert p["increasing"].any() and not p["increasing"].all()
    for n in range(6):
        o = out[n]
        assert np.isnan(o[0]) and np.isfinite(o[1:]).all()
        at0, at1 = o[6], o[7]
        assert abs(at0 - (0.0 if p["increasing"][n] else 1.0)) <= BEZIER_TOL
        assert abs(at1 - (1.0 if p["increasing"][n] else 0.0)) <= BEZIER_TOL
        for k in (2, 3, 5, 9):  # -Inf, -0.5, -0.0, -3e38: the value at 0
            assert o[k] == at0, k
        for k in (1, 4, 8):  # +Inf, 1.5, 3e38: the value at 1
            assert o[k] == at1, k
        assert_bezier_close(o[10:], R.bezier_map(x[n].reshape(-1)[10:], p["bezier"][n], p["increasing"][n]))


def _with_nonfinite(x, rng):
    x = x.copy()
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=flat.size // 10, replace=False)
    flat[idx[0::3]] = np.nan
    flat[idx[1::3]] = np.inf
    flat[idx[2::3]] = -np.inf
    return x


@pytest.mark.parametrize("op", ("local_shuffle", "flip"))
def test_moves_carry_nonfinite_values(op, rng):
    x = _with_nonfinite(rng.random((2, 2, 23, 41, 17), dtype=np.float32), rng)
    out = run(op, x, seed=12, config=SCRAMBLED)
    assert np.array_equal(out, oracle_single(op, x, 12, 0, SCRAMBLED), equal_nan=True)
    for n in range(2):  # values are copied, never made: every output value occurs in the sample's input
        assert np.isin(out[n], x[n]).sum() + np.isnan(out[n]).sum() == out[n].size
        assert np.isnan(out[n]).any() and np.isinf(out[n]).any()


FLOAT_DTYPES = [
    ("numpy", "float64"),
    ("numpy", "float16"),
    ("torch", "float64"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
]


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("lib, dtype", FLOAT_DTYPES, ids=[f"{lib}-{d}" for lib, d in FLOAT_DTYPES])
def test_float_dtypes_compute_in_float32_and_come_back_in_their_dtype(op, lib, dtype, rng):
    """float64, float16 and bfloat16 batches: the float32 kernels' result on the input converted to float32, returned
    in the input's dtype (rounded to nearest), as the same type; the input is untouched."""
    x32 = _with_nonfinite(rng.random((2, 2, 23, 41, 17), dtype=np.float32), rng)
    x = x32.astype(dtype) if lib == "numpy" else torch.from_numpy(x32).to(getattr(torch, dtype))
    keep = x.copy() if lib == "numpy" else x.clone()
    got = outputs(run(op, x, seed=5, offset=3, config=SCRAMBLED))
    as32 = x.astype(np.float32) if lib == "numpy" else x.float()
    want = outputs(run(op, as32, seed=5, offset=3, config=SCRAMBLED))
    for g, w in zip(got, want):
        assert type(g) is type(x) and str(g.dtype).endswith(dtype) and g.shape == x.shape
        w = w.astype(dtype) if lib == "numpy" else w.to(x.dtype)
        g64 = np.asarray(g.astype(np.float64) if lib == "numpy" else g.double().numpy())
        w64 = np.asarray(w.astype(np.float64) if lib == "numpy" else w.double().numpy())
        assert np.array_equal(g64, w64, equal_nan=True), (op, lib, dtype)
    if lib == "numpy":
        assert np.array_equal(x, keep, equal_nan=True), "the input was modified"
    else:
        assert torch.equal(x.nan_to_num(7), keep.nan_to_num(7)), "the input was modified"


def test_gaussian_noise_keeps_nonfinite_values(rng):
    """NaN stays NaN and ±Inf keeps its sign (x + std * z); finite values get exactly the reference's noise."""
    x = _with_nonfinite(rng.random((2, 2, 23, 41, 17), dtype=np.float32), rng)
    out = run("gaussian_noise", x, seed=12, config=SCRAMBLED)
    assert np.array_equal(np.isnan(out), np.isnan(x)) and np.array_equal(out[np.isinf(x)], x[np.isinf(x)])
    assert np.array_equal(out, oracle_single("gaussian_noise", x, 12, 0, SCRAMBLED), equal_nan=True)
    finite = np.isfinite(x)
    assert (out[finite] != x[finite]).mean() > 0.99  # noise on (almost) every finite value


@pytest.mark.parametrize("op", ("inpaint", "outpaint"))
def test_painting_overwrites_nonfinite_values(op, rng):
    x = np.full((2, 2, 64, 64, 32), np.nan, dtype=np.float32)
    x[:, 1] = np.inf
    out = run(op, x, seed=13)
    for n in range(2):
        mask = np.broadcast_to(paint_mask(R.derive_params(13, n, (64, 64, 32)), (64, 64, 32), op), x.shape[1:])
        assert ((out[n][mask] >= 0) & (out[n][mask] < 1)).all()
        assert np.array_equal(out[n][~mask], x[n][~mask], equal_nan=True)
    assert np.array_equal(out, oracle_single(op, x, 13, 0, DeformConfig()), equal_nan=True)


def test_pair_with_nonfinite_values(rng):
    x = _with_nonfinite(rng.random((1, 64, 64, 32), dtype=np.float32), rng)
    seed = 606
    for index in branch_indices(seed, (64, 64, 32), DeformConfig(), per_branch=1):
        xd, tg = run("genesis_pair", x[None], seed=seed, offset=index)
        assert_pair_matches_oracle(xd[0], tg[0], x, seed, index, DeformConfig())


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: np.zeros((2, 1, 64, 64, 32), dtype=np.bool_), TypeError, r"expected floating-point data .*got bool"),
        (
            lambda: np.zeros((2, 1, 64, 64, 32), dtype=np.int32),
            TypeError,
            r"expected floating-point data .*got int32; convert it first, e.g. x.float\(\)",
        ),
        (
            lambda: torch.zeros(2, 1, 64, 64, 32, dtype=torch.uint8),
            TypeError,
            r"expected floating-point data \(float32, float64, float16 or bfloat16\), got torch.uint8",
        ),
        (lambda: torch.zeros(2, 1, 64, 64, 32, dtype=torch.int64), TypeError, "expected floating-point data"),
        (lambda: np.zeros((64, 64, 32), dtype=np.float32), ValueError, r"expected a batch .* \(3 dims\)"),
        (lambda: np.zeros((1, 2, 1, 64, 64, 32), dtype=np.float32), ValueError, r"expected a batch .* \(6 dims\)"),
        (lambda: torch.zeros(64, 64, 32), ValueError, r"expected a batch .* \(3 dims\)"),
        (lambda: np.zeros((0, 1, 64, 64, 32), dtype=np.float32), ValueError, r"empty batch \(N = 0\)"),
        (lambda: torch.zeros(0, 1, 64, 64, 32), ValueError, r"empty batch \(N = 0\)"),
        (lambda: np.zeros((2, 0, 64, 64, 32), dtype=np.float32), ValueError, "every axis needs length >= 1"),
        (
            lambda: np.zeros((2, 1, 64, 64, 32), dtype=np.float32).tolist(),
            TypeError,
            "expected a torch.Tensor, numpy.ndarray or cupy.ndarray, got list",
        ),
        (lambda: 3.0, TypeError, "expected a torch.Tensor, numpy.ndarray or cupy.ndarray, got float"),
    ],
    ids=[
        "np-bool",
        "np-int32",
        "torch-uint8",
        "torch-int64",
        "ndim3",
        "ndim6",
        "torch-ndim3",
        "empty",
        "torch-empty",
        "no-channels",
        "list",
        "scalar",
    ],
)
def test_bad_inputs_raise(op, make, exc, match):
    with pytest.raises(exc, match=rf"genesis_ext\.{op}: {match}"):
        run(op, make(), seed=0)


def test_a_4d_input_needs_its_layout_said():
    """(1, 64, 64, 32) could be one 3-D sample (C, X, Y, Z) or a 2-D batch (N, C, H, W): no guess (it used to be taken
    as a 2-D batch without a word); spatial_dims=2 says it is one; the wrong layout for a shape is refused."""
    sample = np.random.default_rng(0).random((1, 64, 64, 32), dtype=np.float32)
    with pytest.raises(
        ValueError,
        match=r"genesis_ext.genesis_pair: a 4-D input \(1, 64, 64, 32\) is ambiguous: .*"
        r"Pass spatial_dims=2 for a 2-D batch; for one 3-D sample add the batch axis",
    ):
        genesis_ext.genesis_pair(sample, seed=0)
    as_3d = genesis_ext.genesis_pair(sample[None], seed=0)[0][0]
    as_2d = genesis_ext.genesis_pair(sample, seed=0, spatial_dims=2)[0]
    assert as_3d.shape == as_2d.shape and not np.array_equal(as_3d, as_2d)  # two different deformations
    with pytest.raises(ValueError, match=r"expected a batch \(N, C, X, Y, Z\) \(spatial_dims=3\), got shape"):
        genesis_ext.flip(sample, seed=0, spatial_dims=3)
    with pytest.raises(ValueError, match=r"expected a batch \(N, C, H, W\) \(spatial_dims=2\), got shape"):
        genesis_ext.flip(sample[None], seed=0, spatial_dims=2)
    with pytest.raises(ValueError, match="spatial_dims must be 2, 3 or None, got 4"):
        genesis_ext.flip(sample[None], seed=0, spatial_dims=4)


@pytest.mark.parametrize(
    "op, shape, config, rule, need",
    [
        ("local_shuffle", (9, 64, 32), None, "local", 10),
        ("local_shuffle", (64, 64, 9), None, "local", 10),
        ("local_shuffle", (64, 9), None, "local", 10),
        ("inpaint", (64, 7, 32), None, "inpaint", 8),
        ("outpaint", (64, 64, 13), None, "outpaint", 14),
        ("outpaint", (13, 64), None, "outpaint", 14),
        ("genesis_pair", (64, 64, 13), None, "outpaint", 14),
        ("genesis_pair", (9, 64, 32), DeformConfig(inpaint_rate=1.0, outpaint_rate=0.0), "local", 10),
        ("genesis_pair", (7, 64, 32), DeformConfig(local_rate=0.0, inpaint_rate=1.0, outpaint_rate=0.0), "inpaint", 8),
        ("local_shuffle", (19, 64, 32), DeformConfig(block_div=20), "local", 20),
    ],
)
def test_too_small_for_size_rules(op, shape, config, rule, need):
    x = np.random.default_rng(0).random((1, 1, *shape), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"genesis_ext\.{op}: spatial size .* too small for {rule} .* >= {need}"):
        run(op, x, seed=0, config=config)
    # one voxel more on the short axis fits
    grown = tuple(need if s < need else s for s in shape)
    run(op, np.random.default_rng(0).random((1, 1, *grown), dtype=np.float32), seed=0, config=config)


def test_size_rules_follow_the_config():
    """Deformations that cannot fire impose no size rule on the pair, and shape-free ops take any size."""
    x = np.random.default_rng(1).random((2, 1, 9, 9, 5), dtype=np.float32)
    quiet = DeformConfig(local_rate=0.0, paint_rate=0.0)
    xd, tg = run("genesis_pair", x, seed=1, config=quiet)
    assert_pair_matches_oracle(xd[0], tg[0], x[0], 1, 0, quiet)
    tiny = np.random.default_rng(2).random((2, 1, 1, 1, 1), dtype=np.float32)
    for op in ("bezier_remap", "flip"):
        assert run(op, tiny, seed=0).shape == tiny.shape


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
        (dict(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (dict(seed=1.0), TypeError, "seed must be an int, got float"),
        (dict(seed=True), TypeError, "seed must be an int, got bool"),
        (dict(seed="1"), TypeError, "seed must be an int, got str"),
        (dict(seed=None), TypeError, "seed must be an int, got NoneType"),
        (dict(seed=1, offset=-1), ValueError, r"offset must be in \[0, 2\*\*63\), got -1"),
        (dict(seed=1, offset=2**63), ValueError, r"offset must be in \[0, 2\*\*63\)"),
        (dict(seed=1, offset=2.0), TypeError, "offset must be an int, got float"),
        (dict(seed=1, config={"local_rate": 0.5}), TypeError, "config must be a DeformConfig or None, got dict"),
    ],
)
@pytest.mark.parametrize("op", ALL_OPS)
def test_bad_seed_offset_config_raise(op, kwargs, exc, match):
    x = np.random.default_rng(0).random((1, 1, 64, 64, 32), dtype=np.float32)
    with pytest.raises(exc, match=match):
        run(op, x, **kwargs)
    with pytest.raises(exc, match=match):
        run(op, torch.from_numpy(x), **kwargs)


def test_seed_is_keyword_only():
    x = np.zeros((1, 1, 64, 64, 32), dtype=np.float32)
    with pytest.raises(TypeError):
        genesis_ext.genesis_pair(x, 1)
    with pytest.raises(TypeError):
        genesis_ext.genesis_pair(x)


@pytest.mark.skipif(
    not genesis_ext.build_info()["with_cuda"] or genesis_ext.build_info()["cuda_devices"] > 0,
    reason="needs a CUDA build on a machine without a usable CUDA device",
)
def test_cuda_kernels_without_a_device_raise_a_clear_error():
    reason = genesis_ext.build_info()["cuda_unavailable_reason"]
    assert reason
    config = DeformConfig().to_vector()
    with pytest.raises(RuntimeError, match=rf"genesis_ext CUDA: {reason}"):
        genesis_ext._C.deform_cuda(0, 0, 0, 0, 1, 1, [64, 64, 32], 0, 0, config, 0, 0, 0, 0)


def test_meta_tensors_give_shapes_only():
    x = torch.empty(2, 3, 23, 41, 17, device="meta")
    out = run("local_shuffle", x, seed=0)
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float32
    xd, tg = run("genesis_pair", x, seed=0)
    assert xd.shape == tg.shape == x.shape and xd.device.type == tg.device.type == "meta"


@pytest.mark.cuda
def test_cuda_tensors_give_the_cpu_result(rng):
    x = rng.random((2, 1, 64, 64, 32), dtype=np.float32)
    out = run("genesis_pair", torch.from_numpy(x).cuda(), seed=3)
    expected = run("genesis_pair", x, seed=3)
    assert all(np.array_equal(a.cpu().numpy(), b) for a, b in zip(out, expected))


def test_gaussian_blur_is_close_to_the_float64_blur(rng):
    """The float32 blur (bit-identical to reference.gaussian_blur, test_single_op_matches_oracle) is within
    BLUR_TOL * max|x| of the same blur in float64, for every sigma of the range (radius 1 to 15), 2-D and 3-D."""
    config = DeformConfig(blur_sigma_min=0.1, blur_sigma_max=5.0)
    for shape in ((6, 2, 23, 41, 17), (6, 1, 40, 24)):
        x = channels_of(rng.random((shape[0], 1, *shape[2:]), dtype=np.float32))
        out = run("gaussian_blur", x, seed=17, config=config)
        sigmas = genesis_ext.sample_params(shape[0], shape[2:], seed=17, config=config)["blur_sigma"]
        for n, sigma in enumerate(sigmas):
            exact = R.gaussian_blur(x[n], sigma, dtype=np.float64)
            assert np.abs(out[n] - exact).max() <= BLUR_TOL * np.abs(x[n]).max()


@pytest.mark.parametrize("shape", [(1, 1, 1, 100), (2, 2, 3, 64), (1, 1, 1, 1, 100), (1, 1, 2, 1, 70)])
def test_gaussian_blur_of_thin_samples_matches_the_reference(shape, rng):
    """Samples whose last axis is much longer than the rest (a row of 100 in 2-D): the CPU's line buffer held the
    last 3-D axis plus the edges, so a 2-D row overran it (heap corruption, exit 134). Bit for bit the reference."""
    config = DeformConfig(blur_sigma_min=4.0, blur_sigma_max=5.0)  # radius 12 to 15: the widest edges
    x = rng.random(shape, dtype=np.float32)
    out = run("gaussian_blur", x, seed=0, config=config)
    sigmas = genesis_ext.sample_params(shape[0], shape[2:], seed=0, config=config)["blur_sigma"]
    for n, sigma in enumerate(sigmas):
        assert np.array_equal(out[n], R.gaussian_blur(x[n], sigma))


def test_gaussian_blur_spreads_nonfinite_values_within_its_radius():
    """A NaN voxel makes exactly the box of half-width `radius` around it NaN (one pass per axis); an Inf voxel
    makes its box non-finite; everything else is the reference's blur."""
    config = DeformConfig(blur_sigma_min=0.4, blur_sigma_max=0.6)  # radius 2
    x = np.full((1, 1, 15, 16, 17), 0.5, dtype=np.float32)
    x[0, 0, 7, 8, 9] = np.nan
    x[0, 0, 1, 1, 1] = np.inf
    out = run("gaussian_blur", x, seed=2, config=config)
    r = len(R.blur_weights(genesis_ext.sample_params(1, x.shape[2:], seed=2, config=config)["blur_sigma"][0])) - 1
    assert r == 2
    box = np.zeros(x.shape[2:], dtype=bool)
    box[7 - r : 8 + r, 8 - r : 9 + r, 9 - r : 10 + r] = True
    assert np.array_equal(np.isnan(out[0, 0]), box)
    corner = ~np.isfinite(out[0, 0]) & ~box
    assert corner[: 1 + r + 1, : 1 + r + 1, : 1 + r + 1].all() and corner.sum() == (1 + r + 1) ** 3
    assert np.array_equal(out, oracle_single("gaussian_blur", x, 2, 0, config), equal_nan=True)


def test_a_batch_whose_indices_would_cross_2_63_is_refused_as_the_reference_refuses_it(rng):
    """Every global index offset + n is below 2**63 (docs/randomness.md): the ops used to take a batch reaching past
    it, which the reference refuses. Both now refuse it, for int and tensor offsets, and agree up to the last index."""
    x = rng.random((3, 1, 24, 24, 16), dtype=np.float32)
    offset = 2**63 - 2  # samples 2**63 - 2, 2**63 - 1, 2**63
    match = rf"a batch of 3 from offset {offset} reaches sample index {2**63}; .* an offset of at most 2\*\*63 - 3"
    for batch, off in [(x, offset), (torch.from_numpy(x), offset), (torch.from_numpy(x), torch.tensor(offset))]:
        with pytest.raises(ValueError, match=match):
            genesis_ext.genesis_pair(batch, seed=1, offset=off, spatial_dims=3)
    with pytest.raises(ValueError, match=match):
        genesis_ext.sample_params(3, (24, 24, 16), seed=1, offset=offset)
    with pytest.raises(ValueError, match=r"sample index must be in \[0, 2\*\*63\)"):
        R.genesis_pair_batch(x, seed=1, offset=offset)
    deformed, target = run("genesis_pair", x[:2], seed=1, offset=offset)  # the last two indices: both agree
    assert_pair_matches_oracle(deformed[1], target[1], x[1], 1, 2**63 - 1, DeformConfig())


def test_genesis_pair_warns_of_a_numpy_batch_in_hounsfield_units():
    """Real CT cubes left in HU: the deformed input would be clamped to [0, 1] and the target left in HU. The warning
    names the window; the same cubes windowed pass, and values a little outside [0, 1] stay the kernels' to carry."""
    nib = pytest.importorskip("nibabel")
    path = Path(__file__).resolve().parents[1] / "data" / "sample" / "aorta_ct.nii.gz"
    hu = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)[None, None, 20:84, 20:84, 40:72].copy()
    with pytest.warns(IntensityWarning, match="genesis_pair: intensities .* far outside \\[0, 1\\].*CT_WINDOW"):
        genesis_ext.genesis_pair(hu, seed=0)
    windowed = (np.clip(hu, -1000, 1000) + 1000) / 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityWarning)
        genesis_ext.genesis_pair(windowed, seed=0)
        genesis_ext.genesis_pair(windowed * 2.5 - 0.75, seed=0)  # [-0.75, 1.75]: within the slack
