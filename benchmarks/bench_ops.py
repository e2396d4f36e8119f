"""CPU benchmarks: each op and the fused pair, kernel vs the numpy reference, on real chest-CT cubes.

    python -m pytest benchmarks -q --benchmark-only --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json          # markdown table: ms per cube and speedup
    python -m pytest benchmarks -q --benchmark-disable # each benchmark once, as a test

Input: 16 cubes of 64x64x32 cut from the bundled CT (data/sample, HU window [-1000, 1000] -> [0, 1]). Sample k of
the batch has global index k (seed SEED). Batch-1 runs cycle through the 16 cubes, cube k with offset k, so every
per-cube figure averages the same 16 cubes. Each benchmark also checks its output against the reference (exact,
except the Bézier map: within 1e-5).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import genesis_ext  # noqa: E402
from genesis_ext import reference  # noqa: E402
from genesis_ext.data.cubes import PUBLISHED_CUBE  # noqa: E402
from genesis_ext.data.sample import SAMPLE_DIR, SAMPLE_FILES, load_ct, random_cubes  # noqa: E402

SEED = 2019
N_CUBES = 16
OPS = genesis_ext.ops.OPS
BEZIER_TOL = 1e-5  # the kernels' contract for the Bézier map (ops.bezier_remap)


@functools.cache
def ct_cubes() -> np.ndarray:
    """(16, 1, 64, 64, 32) float32 cubes at seeded random positions inside the sample CT volumes."""
    paths = [SAMPLE_DIR / f for f in SAMPLE_FILES]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"sample CT not found in {SAMPLE_DIR} (benchmarks run from a source checkout)")
    batch, _ = random_cubes([load_ct(p) for p in paths], N_CUBES, np.random.default_rng(SEED))
    return batch


@functools.cache
def params() -> dict:
    return genesis_ext.sample_params(N_CUBES, PUBLISHED_CUBE, seed=SEED)


def reference_op(op: str, x: np.ndarray, k: int):
    """The numpy reference of `op` on cube x (1, 1, X, Y, Z) with global index k, from the kernels' own parameters
    (genesis_ext.sample_params) and the reference's per-sample functions; the pair derives everything itself."""
    if op == "genesis_pair":
        return reference.genesis_pair_batch(x, SEED, offset=k)
    p = {key: value[k] for key, value in params().items() if key != "stream_version"}  # sample k's of each array
    return reference.single_op(op, x[0], SEED, k, p).astype(np.float32)[None]


@functools.cache
def expected(op: str):
    """Reference result for all 16 cubes (a batch array, or (deformed, target) for the pair)."""
    cubes = ct_cubes()
    results = [reference_op(op, cubes[k : k + 1], k) for k in range(N_CUBES)]
    if op == "genesis_pair":
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
    return np.concatenate(results)


def assert_matches(op: str, got, want, exact) -> None:
    """Kernel and reference agree: exactly, except where the Bézier map ran (within BEZIER_TOL). `exact`: per cube,
    whether no Bézier map ran on it."""
    if op == "genesis_pair":
        (got, got_target), (want, want_target) = got, want
        np.testing.assert_array_equal(np.asarray(got_target), np.asarray(want_target))
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(got[exact], want[exact])
    np.testing.assert_allclose(got, want, rtol=0, atol=BEZIER_TOL)


def check(op: str, got, k0: int) -> None:
    """Assert that `got` (the kernel's result for cubes k0, k0+1, ...) matches the reference."""
    n = len(got[0] if op == "genesis_pair" else got)
    want = expected(op)
    want = (want[0][k0 : k0 + n], want[1][k0 : k0 + n]) if op == "genesis_pair" else want[k0 : k0 + n]
    assert_matches(op, got, want, exact_cubes(op)[k0 : k0 + n])


def exact_cubes(op: str) -> np.ndarray:
    if op == "bezier_remap":
        return np.zeros(N_CUBES, dtype=bool)
    if op == "genesis_pair":
        return ~params()["nonlinear"]
    return np.ones(N_CUBES, dtype=bool)


def _cycle_cubes(batch: int):
    """pedantic() setup: the arguments of the next round (batch 16: the whole batch; batch 1: the next cube)."""
    cubes = torch.from_numpy(ct_cubes())
    if batch == N_CUBES:
        return lambda: ((cubes,), {"offset": 0})
    ks = itertools.cycle(range(N_CUBES))

    def setup():
        k = next(ks)
        return (cubes[k : k + 1],), {"offset": k}

    return setup


@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("batch", [1, N_CUBES], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", OPS)
def test_kernel(benchmark, op, batch, threads):
    fn = getattr(genesis_ext, op)
    benchmark.group = op
    benchmark.extra_info.update(op=op, impl="kernel", batch=batch, threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rounds = 3 * N_CUBES if batch == 1 else 10
        benchmark.pedantic(
            lambda x, offset: fn(x, seed=SEED, offset=offset), setup=_cycle_cubes(batch), rounds=rounds, warmup_rounds=2
        )
        cubes = torch.from_numpy(ct_cubes())
        if batch == 1:
            for k in range(N_CUBES):
                check(op, fn(cubes[k : k + 1], seed=SEED, offset=k), k)
        else:
            check(op, fn(cubes, seed=SEED), 0)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("op", OPS)
def test_reference(benchmark, op):
    benchmark.group = op
    benchmark.extra_info.update(op=op, impl="reference", batch=1, threads=1)
    cubes, seen = ct_cubes(), []
    ks = itertools.cycle(range(N_CUBES))

    def setup():
        k = next(ks)
        seen.append(k)
        return (op, cubes[k : k + 1], k), {}

    results = []
    benchmark.pedantic(lambda *a: results.append(reference_op(*a)), setup=setup, rounds=N_CUBES)
    # Every cube the reference ran agrees with the kernel.
    kernel = getattr(genesis_ext, op)(cubes, seed=SEED)
    for k, r in zip(seen, results):
        got = (kernel[0][k : k + 1], kernel[1][k : k + 1]) if op == "genesis_pair" else kernel[k : k + 1]
        assert_matches(op, got, r, exact_cubes(op)[k : k + 1])


GAMMA = genesis_ext.PixelDeformation(
    "gamma", lambda x, u: x.clamp(min=0) ** (0.5 + u[:, :1].view(-1, 1, 1, 1, 1)), rate=0.5, after="bezier_remap"
)


@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"t{t}")
def test_pair_with_user_deformation(benchmark, threads):
    """The pair with one user deformation (docs/usage.md's gamma, in torch, after the Bézier map): two kernel segments
    around it. Group genesis_pair+user; compare with genesis_pair's batch-16 rows of the same run."""
    benchmark.group = "genesis_pair+user"
    benchmark.extra_info.update(op="genesis_pair+user", impl="kernel", batch=N_CUBES, threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cubes = torch.from_numpy(ct_cubes())
        pair = functools.partial(genesis_ext.genesis_pair, seed=SEED, deformations=[GAMMA])
        benchmark.pedantic(
            lambda x, offset: pair(x, offset=offset), setup=_cycle_cubes(N_CUBES), rounds=10, warmup_rounds=2
        )
        got, target = genesis_ext.genesis_pair(cubes, seed=SEED, deformations=[GAMMA])
        fused, fused_target = genesis_ext.genesis_pair(cubes, seed=SEED)
        gate, _ = GAMMA.draws(SEED, 0, N_CUBES)
        assert torch.equal(target, fused_target) and torch.equal(got[~torch.from_numpy(gate)], fused[~gate])
    finally:
        torch.set_num_threads(previous)
