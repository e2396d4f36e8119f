"""Accuracy of the Bézier intensity map (bezier_remap) against the exact float64 map of genesis_ext.reference.

The kernels evaluate a per-sample table of cubic Hermite cells and solve the cubic exactly in cells where the table
would not be accurate (near vertical tangents). The contract is 1e-5 max-abs error against the exact map, over every
float32 input in [0, 1]. Curves come from sample_params (control points cannot be set directly), so the adversarial
ones (near-vertical tangents at 0, at 1, or inside) are found by searching sample indices.
"""

from __future__ import annotations

import numpy as np

import genesis_ext
from genesis_ext import DeformConfig
from genesis_ext import reference as R

TOL = 1e-5
SEED = 2019
# Only the Bézier draws matter here; no holes keeps sample_params light for the adversarial search.
CONFIG = DeformConfig(max_holes=0, max_windows=1)
F32 = np.float32


def special_values():
    """Exact ends, the smallest positives (subnormal, normal), values next to 0.5 and 1, cell edges and their
    float32 neighbours (the table has 256 cells)."""
    edges = np.arange(257, dtype=F32) / F32(256)
    near = np.concatenate([np.nextafter(edges, F32(0)), np.nextafter(edges, F32(1))])
    tiny = np.array(
        [
            np.finfo(F32).smallest_subnormal,
            np.finfo(F32).tiny,
            1e-30,
            1e-12,
            1e-8,
            1e-7,
            6e-8,
            np.finfo(F32).eps,
            1e-6,
            1e-4,
        ],
        dtype=F32,
    )
    top = F32(1) - np.array([np.finfo(F32).epsneg, 2 * np.finfo(F32).epsneg, 1e-7, 1e-6, 1e-4], dtype=F32)
    return np.concatenate([edges, near, tiny, top, [F32(0.5) - F32(3e-8), F32(0.5) + F32(3e-8)]])


def value_grid(n_grid, n_random, rng):
    """float32 values in [0, 1]: j / n_grid for every j, random float32s, and special_values()."""
    grid = (np.arange(n_grid + 1, dtype=np.float64) / n_grid).astype(F32)
    values = np.concatenate([grid, rng.random(n_random, dtype=F32), special_values()])
    values = np.clip(values, 0, 1)
    assert values.min() == 0 and values.max() == 1 and (values > 0).any()
    return values


def max_errors(values, seed, indices, chunk=64):
    """Per curve (sample index): max |kernel - exact| over `values`. Consecutive indices run as one batch."""
    indices = np.asarray(indices)
    width = 256
    padded = np.concatenate([values, np.full((-len(values)) % width, F32(0.5))])
    plane = padded.reshape(1, 1, -1, width)
    errors = np.empty(len(indices))
    where = np.empty(len(indices), dtype=F32)
    runs = np.split(np.arange(len(indices)), np.nonzero(np.diff(indices) != 1)[0] + 1)
    for run in runs:
        for start in range(0, len(run), chunk):
            part = run[start : start + chunk]
            x = np.ascontiguousarray(np.broadcast_to(plane, (len(part),) + plane.shape[1:]))
            out = genesis_ext.bezier_remap(
                x, seed=seed, offset=int(indices[part[0]]), config=CONFIG, spatial_dims=x.ndim - 2
            )
            params = genesis_ext.sample_params(
                len(part), (64, 64), seed=seed, offset=int(indices[part[0]]), config=CONFIG, with_blocks=False
            )
            for j, k in enumerate(part):
                got = out[j].reshape(-1)[: len(values)].astype(np.float64)
                exact = R.bezier_map(values, params["bezier"][j], params["increasing"][j])
                err = np.abs(got - exact)
                errors[k], where[k] = err.max(), values[err.argmax()]
    return errors, where


def adversarial_indices(seed, search=2_000_000, per_kind=24):
    """Sample indices whose control points give near-vertical tangents of Bx (f' unbounded):
    x1 ~ 0 (at v = 0), x2 ~ 1 (at v = 1), x1 ~ 1 with x2 ~ 0 (inside, at v ~ 0.5: Bx'(1/2) = 3/4 (1 - x1 + x2)),
    both at one end, and both ends at once."""
    found = {}
    step = 250_000
    for start in range(0, search, step):
        p = genesis_ext.sample_params(step, (64, 64), seed=seed, offset=start, config=CONFIG, with_blocks=False)
        x1, _, x2, _ = p["bezier"].T
        kinds = {
            "vertical at 0": x1 < 1e-3,
            "vertical at 1": x2 > 1 - 1e-3,
            "vertical inside": x1 - x2 > 0.99,
            "flat start (x1, x2 ~ 0)": (x1 < 1e-3) & (x2 < 1e-2),
            "flat end (x1, x2 ~ 1)": (x1 > 0.99) & (x2 > 1 - 1e-3),
            "vertical at both ends": (x1 < 2e-3) & (x2 > 1 - 2e-3),
        }
        for kind, mask in kinds.items():
            found.setdefault(kind, []).extend((start + np.nonzero(mask)[0]).tolist())
    for kind, hits in found.items():
        assert hits, f"no sample with {kind} in {search} indices"
    return {kind: hits[:per_kind] for kind, hits in found.items()}


def test_bezier_random_curves(rng):
    """2,000 curves of the official recipe, 16k+ values each (64+ per table cell, plus cell edges and specials)."""
    values = value_grid(2**14, 4096, rng)
    errors, where = max_errors(values, SEED, np.arange(2000))
    worst = int(errors.argmax())
    print(
        f"\nBézier, 2000 random curves x {len(values)} values: max error {errors.max():.3e} "
        f"(sample {worst}, v = {where[worst]!r}); median of per-curve max {np.median(errors):.3e}"
    )
    assert errors.max() <= TOL, (worst, where[worst], errors.max())


def test_bezier_adversarial_curves_dense(rng):
    """Near-vertical tangents, plus some random curves, on 131k values each (every j / 2^17 and more)."""
    found = adversarial_indices(SEED)
    values = value_grid(2**17, 8192, rng)
    lines = []
    worst_all = 0.0
    for kind, indices in list(found.items()) + [("random", list(range(5000, 5032)))]:
        errors, where = max_errors(values, SEED, indices)
        k = int(errors.argmax())
        worst_all = max(worst_all, errors[k])
        lines.append(
            f"  {kind:26s} {len(indices):3d} curves: max error {errors[k]:.3e} at v = {where[k]!r} "
            f"(sample {indices[k]})"
        )
        assert errors.max() <= TOL, (kind, indices[k], where[k], errors[k])
    print("\nBézier, adversarial curves x", len(values), "values:\n" + "\n".join(lines))
    assert worst_all > 0  # the comparison is live (a float32 result is never exactly the float64 map everywhere)


def test_bezier_map_shape_and_monotonicity(rng):
    """f is monotone (non-decreasing or non-increasing by branch) and maps [0, 1] onto [0, 1]."""
    values = np.linspace(0, 1, 4097, dtype=F32)
    x = np.ascontiguousarray(np.broadcast_to(values.reshape(1, 1, 1, -1), (200, 1, 1, values.size)))
    out = genesis_ext.bezier_remap(x, seed=77, spatial_dims=x.ndim - 2).reshape(200, -1).astype(np.float64)
    p = genesis_ext.sample_params(200, (64, 64), seed=77, config=CONFIG, with_blocks=False)
    assert p["increasing"].any() and not p["increasing"].all()
    assert (out >= -TOL).all() and (out <= 1 + TOL).all()
    slope = np.diff(out, axis=1) * np.where(p["increasing"], 1, -1)[:, None]
    assert (slope >= -2 * TOL).all()
    start = np.where(p["increasing"], 0.0, 1.0)
    assert np.abs(out[:, 0] - start).max() <= TOL and np.abs(out[:, -1] - (1 - start)).max() <= TOL


def test_decreasing_branch_is_not_one_minus_increasing(rng):
    """Spec §1.1: decreasing f(v) = By(1 - Bx^-1(v)), not 1 - f_increasing(v)."""
    p = genesis_ext.sample_params(64, (64, 64), seed=5, config=CONFIG, with_blocks=False)
    asymmetric = np.abs(p["bezier"][:, 1] + p["bezier"][:, 3] - 1) > 0.2  # y1 + y2 = 1 would make them equal
    n = int(np.nonzero(~p["increasing"] & asymmetric)[0][0])
    values = rng.random(4096, dtype=F32)
    out = genesis_ext.bezier_remap(values.reshape(1, 1, 64, 64), seed=5, offset=n, config=CONFIG, spatial_dims=2)
    out = out.reshape(-1)
    wrong = 1 - R.bezier_map(values, p["bezier"][n], True)
    right = R.bezier_map(values, p["bezier"][n], False)
    assert np.abs(out - right).max() <= TOL
    assert np.abs(out - wrong).max() > 100 * TOL
