"""The CUDA kernels of csrc/cuda, executed on the CPU by HIP-CPU (genesis_ext._C_emu), against the CPU kernels, bit
for bit, on the case lists test_cuda.py runs on a real GPU (kernel_cases.py).

This runs the kernels' logic: tiles, scratch layout, shared-memory ownership, atomics, barriers, launch grids, batch
splits. It cannot show nvcc's code generation, real warps' memory effects, speed, graphs or streams (docs/emulation.md).
The whole module skips, with the reason, where _C_emu was not built (it needs HIP-CPU and TBB).

Thread order: HIP-CPU runs a block's threads as fibres one after another between barriers. A result must not depend
on that order, nor on how many host threads run the blocks: test_parity_in_reversed_order_on_one_core runs this
module again with the fibres reversed (HIP_CPU_REVERSE_THREADS=1, read once per process) on a single core.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import genesis_ext
from genesis_ext import _emulated

from kernel_cases import (
    ALL_OPS,
    BIG_CASES,
    CASES,
    LARGE_CASES,
    LARGE_OPS,
    MULTI_LAUNCH_CASE,
    MULTI_LAUNCH_OPS,
    N_SEED_OFFSETS,
    NONFINITE_CASES,
    NONFINITE_OFFSETS,
    SCRAMBLED,
    SPLIT_CHUNKS,
    assert_philox_outputs,
    bit_mismatch,
    branch_covering_seed,
    case_input,
    case_seed_offsets,
    make_input,
    outputs,
    philox_inputs,
    with_special_values,
)

pytestmark = pytest.mark.skipif(_emulated.UNAVAILABLE is not None, reason=str(_emulated.UNAVAILABLE))

REVERSED = os.environ.get("HIP_CPU_REVERSE_THREADS", "") not in ("", "0")


def assert_same(got, want, what):
    got, want = outputs(got), outputs(want)
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        message = bit_mismatch(g, w, f"{what}, output {k}")
        if message:
            pytest.fail(message)


def emulated(op, x, **kw):
    """The emulated CUDA kernel on a batch x of 2 or 3 spatial dims (the tests know which)."""
    return _emulated.deform(op, x, spatial_dims=x.ndim - 2, **kw)


def assert_matches_cpu(op, x, what, **kw):
    """The emulated CUDA kernel on x equals the CPU kernel on x."""
    assert_same(emulated(op, x, **kw), getattr(genesis_ext, op)(x, spatial_dims=x.ndim - 2, **kw), what)


@pytest.mark.parametrize("k", range(N_SEED_OFFSETS), ids=lambda k: f"seed{k}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("op", ALL_OPS)
def test_emulated_equals_cpu(op, case, k):
    name, shape, config = case
    seed, offset = case_seed_offsets(op, name)[k]
    assert_matches_cpu(
        op, case_input(name, shape), f"{op} {name} seed={seed} offset={offset}", seed=seed, offset=offset, config=config
    )


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("op", ALL_OPS)
def test_emulated_is_deterministic_and_batch_independent(op, case):
    """A second identical call gives the same bits, and sample n depends only on (seed, offset + n)."""
    name, shape, config = case
    x = case_input(name, shape)
    seed, offset = case_seed_offsets(op, name)[-1]
    kw = dict(seed=seed, offset=offset, config=config)
    first = outputs(emulated(op, x, **kw))
    assert_same(emulated(op, x, **kw), first, f"{op} {name}: a second identical call")
    if shape[0] > 1:
        tail = emulated(op, x[1:], seed=seed, offset=offset + 1, config=config)
        assert_same(tail, tuple(f[1:] for f in first), f"{op} {name}: batch x[1:] at offset + 1")


@pytest.mark.slow
@pytest.mark.parametrize("case", BIG_CASES, ids=[c[0] for c in BIG_CASES])
@pytest.mark.parametrize("op", ALL_OPS)
def test_emulated_equals_cpu_batch_257(op, case):
    name, shape, config, offset = case
    seed = branch_covering_seed(shape[0], shape[2:], config, offset=offset)
    assert_matches_cpu(
        op, make_input(shape, seed=17), f"{op} batch-257 {name}", seed=seed, offset=offset, config=config
    )


@pytest.mark.slow
@pytest.mark.parametrize("op", MULTI_LAUNCH_OPS)
def test_emulated_equals_cpu_over_several_launches(op):
    name, shape, config, offset = MULTI_LAUNCH_CASE
    assert_matches_cpu(op, make_input(shape, seed=3), f"{op} {name}", seed=77, offset=offset, config=config)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.filterwarnings("ignore::genesis_ext.data.intensity.IntensityWarning")  # +-3e38 among the values
def test_emulated_equals_cpu_with_nonfinite_values(op):
    for shape, config in NONFINITE_CASES:
        x = with_special_values(make_input(shape, seed=5), seed=6)
        for offset in NONFINITE_OFFSETS:
            assert_matches_cpu(
                op, x, f"{op} non-finite {shape} offset={offset}", seed=606, offset=offset, config=config
            )


@pytest.mark.parametrize("op", ALL_OPS)
def test_uneven_batch_split_equals_the_whole_batch(op):
    x = make_input((sum(SPLIT_CHUNKS), 2, 23, 41, 17), seed=8)
    seed = branch_covering_seed(len(x), x.shape[2:], SCRAMBLED, offset=50)
    whole = outputs(getattr(genesis_ext, op)(x, seed=seed, offset=50, config=SCRAMBLED, spatial_dims=3))
    start = 0
    for size in SPLIT_CHUNKS:
        part = emulated(op, x[start : start + size], seed=seed, offset=50 + start, config=SCRAMBLED)
        assert_same(part, tuple(w[start : start + size] for w in whole), f"{op} chunk [{start}, {start + size})")
        start += size


def test_emulated_philox_known_answers_and_cpu_equality():
    ctr, key = philox_inputs()
    assert_philox_outputs(_emulated.philox(ctr, key), ctr, key)


@pytest.mark.parametrize("case", LARGE_CASES, ids=[c[0] for c in LARGE_CASES])
@pytest.mark.parametrize("op", LARGE_OPS)
def test_emulated_equals_cpu_at_large_cubes(op, case):
    """Blocks of any size run (no permutation array, no cap): the published rule at 128x128x64 and 160^3."""
    name, shape, config = case
    for seed, offset in case_seed_offsets(op, name)[:2]:
        assert_matches_cpu(
            op, case_input(name, shape), f"{op} {name} seed={seed}", seed=seed, offset=offset, config=config
        )


def test_build_info_of_the_emulated_module():
    info = _emulated._C_emu.build_info()
    assert info["with_cuda"] and info["cuda_archs"] == "hip-cpu"
    assert info["cuda_devices"] == 1 and info["cuda_unavailable_reason"] == ""


# ---------------------------------------------------------------------------------------------------------------------
# Thread order


def _probe(barrier: bool, tag: int) -> np.ndarray:
    blocks, threads = 3, 64
    out = np.full(blocks * threads, -1, dtype=np.int32)
    _emulated._C_emu.barrier_probe(out.ctypes.data, blocks, threads, tag, barrier)
    return out.reshape(blocks, threads) - tag


def test_the_reversed_order_catches_a_missing_barrier():
    """The probe works: without its barrier, a kernel whose thread 0 writes what all threads read is right in the
    normal fibre order (why one order is not enough) and wrong in the reversed one (this module's second run, below);
    with the barrier, right in both."""
    expected = np.arange(3)[:, None]
    assert int((_probe(True, tag=500) != expected).sum()) == 0
    stale = int((_probe(False, tag=700) != expected).sum())
    assert stale == (3 * 63 if REVERSED else 0), f"{stale} of 192 threads read a stale word"


def test_kernels_on_one_stream_run_in_launch_order():
    """HIP-CPU runs a kernel queued on the null stream beside the one before it when the host pauses between the
    launches (a CI failure: the Gaussian kernel's noise overwritten by the deform kernel's copy). launch() waits under
    HIP-CPU; 1,000 fill-then-increment rounds with host pauses of 0-96 µs must all end in order."""
    out = np.zeros(8 * 64, dtype=np.int32)
    assert _emulated._C_emu.launch_order_probe(out.ctypes.data, 8, 64, 1000) == 0


@pytest.mark.slow
def test_parity_in_reversed_order_on_one_core(capsys):
    """This module again, in a fresh process with the fibres reversed and TBB confined to one core (the suite itself
    runs in the normal order on every core): any difference is a race or a missing barrier. Its progress dots are
    passed through to the terminal (it takes about 15 minutes on one core)."""
    if REVERSED:
        pytest.skip("already running in the reversed order")
    env = dict(os.environ, HIP_CPU_REVERSE_THREADS="1")
    one_core = min(os.sched_getaffinity(0))
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
        env=env,
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {one_core}),
    )
    watchdog = threading.Timer(1800, run.kill)
    watchdog.start()
    lines = []
    with capsys.disabled():
        print("\n[reversed fibre order on one core, a subprocess]", flush=True)
        for line in run.stdout:
            lines.append(line)
            print(line, end="", flush=True)
    watchdog.cancel()
    output = "".join(lines)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert run.wait() == 0, output[-7000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 100 and "failed" not in summary, summary
