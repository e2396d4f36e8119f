"""The CUDA kernels against the CPU kernels, bit for bit, and the CUDA contract: the caller's device, stream and
allocator, no host synchronisation, CUDA-graph capture, torch.compile, torch and cupy inputs.

The CPU kernels are checked against the numpy oracle (test_ops.py), so CPU == CUDA extends that to the GPU. Every
comparison is of float32 bit patterns (NaN compared as NaN: only the Bézier map makes new NaNs, from NaN inputs).
The parity cases are kernel_cases.py's, which test_emulated.py also runs on the same kernels under HIP-CPU.
Every test here is marked ``cuda``: conftest skips them, with the reason, where genesis_ext has no usable device.

Environment switches (set by benchmarks/gpu_check.sh):
- ``GENESIS_UNDER_SANITIZER=1``: compute-sanitizer serialises kernel launches, so the "returned before the stream
  finished" checks are not asserted (their results still are).
- ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (torch's own switch, used for memcheck): no block reuse to check.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import genesis_ext
from genesis_ext import _C, DeformConfig

import kernel_cases as cases
from kernel_cases import (
    ALL_OPS,
    BIG_CASES,
    CASES,
    EDGE,
    LARGE_CASES,
    LARGE_OPS,
    MULTI_LAUNCH_CASE,
    MULTI_LAUNCH_OPS,
    NONFINITE_CASES,
    NONFINITE_OFFSETS,
    OFFICIAL,
    SCRAMBLED,
    SPLIT_CHUNKS,
    assert_philox_outputs,
    branch_covering_seed,
    case_input,
    case_seed_offsets,
    outputs,
    philox_inputs,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.cuda

# torch.cuda._sleep cycles: ~0.5 s on an H100; an op call must return (and enqueue everything) well within this.
SLEEP_CYCLES = 1 << 30
UNDER_SANITIZER = os.environ.get("GENESIS_UNDER_SANITIZER") == "1"
CACHING_ALLOCATOR = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") in ("", "0")

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def dev():
    """cuda:0 through torch (the tests allocate and compare with torch)."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device (a CPU-only torch build?); the CUDA tests need a CUDA-enabled torch")
    return torch.device("cuda", 0)


def run(op, x, **kw):
    """genesis_ext.<op>(x, **kw), saying which layout a 4-D or 5-D batch has (spatial_dims: the tests know it)."""
    if getattr(x, "ndim", None) in (4, 5):
        kw.setdefault("spatial_dims", x.ndim - 2)
    return getattr(genesis_ext, op)(x, **kw)


def as_torch_cpu(a) -> "torch.Tensor":
    """A torch CPU tensor with the values of a (torch tensor on any device, numpy or cupy array)."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    import cupy

    return torch.from_numpy(cupy.asnumpy(a))


def assert_identical(got, want, what: str) -> None:
    """Same shape and float32 bits, NaN where NaN (kernel_cases.bit_mismatch)."""
    message = cases.bit_mismatch(as_torch_cpu(got).numpy(), as_torch_cpu(want).numpy(), what)
    if message:
        pytest.fail(message)


def assert_matches_cpu(op, got, x_cpu, what, **kw) -> None:
    """`got` (the result of `op` on a device copy of x_cpu) equals the CPU kernel's result on x_cpu."""
    want = outputs(run(op, x_cpu, **kw))
    got = outputs(got)
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert_identical(g, w, f"{what} output {k}")


def assert_device_outputs(result, x) -> None:
    """New, contiguous float32 tensors of x's shape on x's device."""
    for o in outputs(result):
        assert isinstance(o, torch.Tensor) and o.device == x.device and o.dtype == torch.float32
        assert o.shape == x.shape and o.is_contiguous()
        assert o.data_ptr() != x.data_ptr()


def uniform(shape, seed) -> "torch.Tensor":
    """float32 CPU tensor of uniform [0, 1) values (fixed seed)."""
    return torch.from_numpy(cases.uniform(shape, seed))


def make_input(shape, seed) -> "torch.Tensor":
    return torch.from_numpy(cases.make_input(shape, seed))


def with_special_values(x: "torch.Tensor", seed) -> "torch.Tensor":
    return torch.from_numpy(cases.with_special_values(x.numpy(), seed))


def warm_up(dev, ops=ALL_OPS):
    """Run each op once and wait: the kernels are loaded (lazy module loading may synchronise) before a test relies
    on calls returning while the GPU is busy."""
    x = uniform((1, 1, *OFFICIAL), 0).to(dev)
    for op in ops:
        run(op, x, seed=0)
    torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------------------------------
# CPU == CUDA, bit for bit


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_equals_cpu(op, case, dev):
    name, shape, config = case
    x = torch.from_numpy(case_input(name, shape))
    xd = x.to(dev)
    pairs = case_seed_offsets(op, name)
    for seed, offset in pairs:
        kw = dict(seed=seed, offset=offset, config=config)
        got = run(op, xd, **kw)
        assert_device_outputs(got, xd)
        assert_matches_cpu(op, got, x, f"{op} {name} seed={seed} offset={offset}", **kw)
    # deterministic on the device, and sample n depends only on (seed, offset + n)
    seed, offset = pairs[-1]
    kw = dict(seed=seed, offset=offset, config=config)
    first, again = outputs(run(op, xd, **kw)), outputs(run(op, xd, **kw))
    for a, b in zip(first, again):
        assert_identical(a, b, f"{op} {name}: a second identical call")
    if shape[0] > 1:
        tail = outputs(run(op, xd[1:], seed=seed, offset=offset + 1, config=config))
        for a, b in zip(first, tail):
            assert_identical(a[1:], b, f"{op} {name}: batch x[1:] at offset + 1")


@pytest.mark.parametrize("case", BIG_CASES, ids=[c[0] for c in BIG_CASES])
@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_equals_cpu_batch_257(op, case, dev):
    """More samples than a typical grid dimension or block count, with a seed whose batch takes every pair branch."""
    name, shape, config, offset = case
    seed = branch_covering_seed(shape[0], shape[2:], config, offset=offset)
    x = make_input(shape, seed=17)
    kw = dict(seed=seed, offset=offset, config=config)
    got = run(op, x.to(dev), **kw)
    assert_matches_cpu(op, got, x, f"{op} batch-257 {name}", **kw)


@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_equals_cpu_with_nonfinite_values(op, dev):
    """NaN, ±Inf, ±0, subnormals and values outside [0, 1] are data: moved, mapped or painted over as on the CPU."""
    for shape, config in NONFINITE_CASES:
        x = with_special_values(make_input(shape, seed=5), seed=6)
        for offset in NONFINITE_OFFSETS:
            kw = dict(seed=606, offset=offset, config=config)
            assert_matches_cpu(op, run(op, x.to(dev), **kw), x, f"{op} non-finite {shape} offset={offset}", **kw)


@pytest.mark.parametrize("op", MULTI_LAUNCH_OPS)
def test_cuda_equals_cpu_over_several_launches(op, dev):
    name, shape, config, offset = MULTI_LAUNCH_CASE
    x = make_input(shape, seed=3)
    kw = dict(seed=77, offset=offset, config=config)
    assert_matches_cpu(op, run(op, x.to(dev), **kw), x, f"{op} {name}", **kw)


@pytest.mark.parametrize("op", ALL_OPS)
def test_uneven_batch_split_equals_the_whole_batch(op, dev):
    x = make_input((sum(SPLIT_CHUNKS), 2, 23, 41, 17), seed=8)
    seed = branch_covering_seed(len(x), x.shape[2:], SCRAMBLED, offset=50)
    xd = x.to(dev)
    whole = outputs(run(op, x, seed=seed, offset=50, config=SCRAMBLED))
    start = 0
    for size in SPLIT_CHUNKS:
        part = outputs(run(op, xd[start : start + size], seed=seed, offset=50 + start, config=SCRAMBLED))
        for k, (p, w) in enumerate(zip(part, whole)):
            assert_identical(p, w[start : start + size], f"{op} chunk [{start}, {start + size}), output {k}")
        start += size


def test_huge_batch_over_2_31_elements(dev):
    """A batch of more than 2**31 elements (8 GiB): element indices need 64 bits. Checks samples at the start, the
    middle and the end (past element 2**31) against the CPU kernel on those samples alone."""
    per_sample = OFFICIAL[0] * OFFICIAL[1] * OFFICIAL[2]
    n = (1 << 31) // per_sample + 3
    need = 3 * n * per_sample * 4 + (1 << 30)  # input, two outputs, 1 GiB for scratch
    free, _ = torch.cuda.mem_get_info(dev)
    if free < need:
        pytest.skip(
            f"not enough free GPU memory for the >2**31-element batch: {free / 2**30:.1f} GiB free, "
            f"{need / 2**30:.1f} GiB needed"
        )
    x = torch.rand((n, 1, *OFFICIAL), device=dev, generator=torch.Generator(dev).manual_seed(31))
    seed, offset = 2**63 + 77, 5
    check = (0, n // 2, n - 2, n - 1)
    for op in ALL_OPS:
        got = outputs(run(op, x, seed=seed, offset=offset))
        for k in check:
            x_k = x[k : k + 1].cpu()
            want = outputs(run(op, x_k, seed=seed, offset=offset + k))
            for j, (g, w) in enumerate(zip(got, want)):
                assert_identical(g[k : k + 1], w, f"{op} huge batch: sample {k} of {n}, output {j}")
        del got
    del x
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Every output voxel is written: dirty memory from the caching allocator


@pytest.mark.parametrize("op", ALL_OPS)
def test_every_voxel_written_into_dirty_memory(op, dev):
    """The ops allocate their own outputs, so poison what the allocator will hand out next: NaN-filled blocks of the
    outputs' size (and of other sizes, for scratch) are freed just before the call. Inputs have no NaN, so a NaN in
    the result is an unwritten voxel; equality with the CPU catches any other stale value."""
    config = DeformConfig()
    x = uniform((64, 1, *OFFICIAL), 41)
    xd = x.to(dev)
    seed = branch_covering_seed(64, OFFICIAL, config)
    torch.cuda.synchronize(dev)
    # blocks of one output's size and of two (outputs may share one allocation), and small ones (scratch)
    poison = [torch.full_like(xd, float("nan")) for _ in range(3)]
    poison.append(torch.full((2, *xd.shape), float("nan"), device=dev))
    poison += [torch.full((size,), float("nan"), device=dev) for size in (1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 22)]
    poisoned = {p.data_ptr() for p in poison}
    del poison
    got = outputs(run(op, xd, seed=seed, config=config))
    _assert_written(op, got, poisoned, "into poisoned memory")
    assert_matches_cpu(op, got, x, f"{op} into poisoned memory", seed=seed, config=config)

    # the same through the op's own previous outputs: poison them, free them, run again on a same-size new input
    poisoned = {t.fill_(float("nan")).data_ptr() for t in got}
    del got
    y = uniform((64, 1, *OFFICIAL), 42)
    yd = y.to(dev)
    again = outputs(run(op, yd, seed=seed + 1, offset=64, config=config))
    _assert_written(op, again, poisoned, "into its own freed outputs")
    assert_matches_cpu(op, again, y, f"{op} into its own freed outputs", seed=seed + 1, offset=64, config=config)


def _assert_written(op, got, poisoned, what):
    if CACHING_ALLOCATOR:  # only meaningful if the allocator really handed out a poisoned block
        assert any(t.data_ptr() in poisoned for t in got), f"{op} {what}: no output reused a poisoned block"
    for k, t in enumerate(got):
        assert not torch.isnan(t).any(), f"{op} {what}: NaN in output {k} of a NaN-free input: an unwritten voxel"


@pytest.mark.parametrize("op", ALL_OPS)
def test_outputs_come_from_the_caching_allocator(op, dev):
    """Outputs are torch allocations (counted by torch.cuda.memory_allocated), and the call leaves nothing else
    allocated behind (scratch is freed through the allocator, not cudaMalloc'ed by the core)."""
    if UNDER_SANITIZER or not CACHING_ALLOCATOR:
        pytest.skip("memory accounting needs torch's caching allocator and no sanitizer (it allocates device memory)")
    x = uniform((16, 1, *OFFICIAL), 3).to(dev)
    warm_up(dev, (op,))
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    free_before = torch.cuda.mem_get_info(dev)[0]
    reserved_before = torch.cuda.memory_reserved(dev)
    got = outputs(run(op, x, seed=9))
    torch.cuda.synchronize(dev)
    out_bytes = sum({o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in got}.values())
    assert torch.cuda.memory_allocated(dev) - before == out_bytes
    # device memory the process took outside torch's pool (cudaMalloc in the core): none (2 MiB slack for the driver)
    taken = free_before - torch.cuda.mem_get_info(dev)[0]
    grown = torch.cuda.memory_reserved(dev) - reserved_before
    assert taken <= grown + (2 << 20), f"{op}: {taken - grown} bytes of device memory allocated outside torch"
    del got


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: strides, untouched, requires_grad, validation


def _noncontiguous_views(dev):
    """(view, description): float32 (N, C, X, Y, Z) CUDA views that are not contiguous (or start mid-storage)."""
    base = uniform((3, 2, 17, 41, 23), 1).to(dev)
    wide = uniform((3, 2, 23, 82, 17), 2).to(dev)
    one = uniform((3, 1, 23, 41, 17), 3).to(dev)
    long = uniform((5, 2, 23, 41, 17), 4).to(dev)
    return [
        (base.permute(0, 1, 4, 3, 2), "permuted"),
        (wide[:, :, :, ::2], "strided"),
        (base.permute(1, 0, 4, 3, 2).transpose(0, 1), "batch/channel swapped"),
        (one.expand(3, 2, 23, 41, 17), "expanded channels (stride 0)"),
        (long[2:], "batch slice (storage offset)"),
    ]


@pytest.mark.parametrize("op", ALL_OPS)
def test_noncontiguous_cuda_inputs(op, dev):
    for view, what in _noncontiguous_views(dev):
        assert tuple(view.shape) == (3, 2, 23, 41, 17), what
        assert not view.is_contiguous() or view.storage_offset() > 0, what
        got = run(op, view, seed=17, offset=1, config=SCRAMBLED)
        assert_device_outputs(got, view)
        assert_matches_cpu(op, got, view.cpu(), f"{op} {what}", seed=17, offset=1, config=SCRAMBLED)


@pytest.mark.parametrize("op", ALL_OPS)
def test_inputs_are_not_modified(op, dev):
    x = uniform((4, 2, *OFFICIAL), 8).to(dev)
    keep = x.clone()
    got = run(op, x, seed=2, offset=0)
    torch.cuda.synchronize(dev)
    assert_identical(x, keep, f"{op}: the input after the call")
    assert_device_outputs(got, x)


@pytest.mark.parametrize("op", ALL_OPS)
def test_inputs_requiring_grad_behave_as_on_cpu(op, dev):
    """Same values, same requires_grad on the outputs, and backward fails (or works) as it does on the CPU."""
    x = uniform((2, 1, *OFFICIAL), 9)
    behaviours = []
    for device in ("cpu", dev):
        xg = x.to(device).requires_grad_(True)
        got = outputs(run(op, xg, seed=4))
        assert_identical(got[0], outputs(run(op, x, seed=4))[0], f"{op} requires_grad on {device}")
        try:
            got[0].sum().backward()
            backward = "ok"
        except RuntimeError as e:
            backward = type(e).__name__
        behaviours.append(([o.requires_grad for o in got], backward))
    assert behaviours[0] == behaviours[1], behaviours


def test_validation_errors_match_cpu(dev):
    """The ops validate before routing: the same errors for CUDA tensors as for CPU ones."""
    cases = [
        (torch.zeros(2, 1, *OFFICIAL, dtype=torch.int32), TypeError, "expected floating-point data"),
        (torch.zeros(64, 64, 32), ValueError, r"expected a batch .* \(3 dims\)"),
        (torch.zeros(0, 1, *OFFICIAL), ValueError, r"empty batch \(N = 0\)"),
        (torch.zeros(1, 1, 64, 64, 9), ValueError, r"spatial size \(64, 64, 9\) is too small for local"),
    ]
    for x, exc, match in cases:
        for device in ("cpu", dev):
            with pytest.raises(exc, match=rf"genesis_ext\.genesis_pair: {match}"):
                run("genesis_pair", x.to(device), seed=0)
    with pytest.raises(ValueError, match="seed must be in"):
        run("local_shuffle", torch.zeros(1, 1, *OFFICIAL, device=dev), seed=-1)


# ---------------------------------------------------------------------------------------------------------------------
# The caller's stream, no host synchronisation


@pytest.mark.parametrize("op", ALL_OPS)
def test_runs_on_the_current_stream_without_host_sync(op, dev):
    """On a side stream s: sleep, overwrite the input, run the op. The result must be that of the NEW input (so the
    kernels ran on s, after the copy), and the call must return while s is still sleeping (no host sync)."""
    warm_up(dev, (op,))
    old = uniform((16, 1, *OFFICIAL), 10)
    new = uniform((16, 1, *OFFICIAL), 11)
    x, new_d = old.to(dev), new.to(dev)
    torch.cuda.synchronize(dev)
    s = torch.cuda.Stream(dev)
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.copy_(new_d)
        got = run(op, x, seed=21, offset=3)
        pending = not s.query()
    default_idle = torch.cuda.default_stream(dev).query()
    s.synchronize()
    if not UNDER_SANITIZER:
        assert pending, f"{op} returned after its stream had finished: the call synchronised with the device"
        assert default_idle, f"{op} queued work on the default stream"
    assert_matches_cpu(op, got, new, f"{op} on a side stream", seed=21, offset=3)


@pytest.mark.parametrize("op", ("genesis_pair", "local_shuffle"))
def test_concurrent_streams_keep_their_own_arguments(op, dev):
    """Two calls with different shapes, configs and seeds on two streams, the first delayed so that the second runs
    first: no state (parameters, config, scratch) is shared between calls."""
    warm_up(dev, (op,))
    xa, xb = make_input((3, 2, 23, 41, 17), 12), make_input((2, 1, *OFFICIAL), 13)
    da, db = xa.to(dev), xb.to(dev)
    torch.cuda.synchronize(dev)
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    with torch.cuda.stream(s1):
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        a = run(op, da, seed=1, offset=0, config=SCRAMBLED)
    with torch.cuda.stream(s2):
        b = run(op, db, seed=2, offset=9, config=EDGE.replace(block_div=4))
    torch.cuda.synchronize(dev)
    assert_matches_cpu(op, a, xa, f"{op} on stream 1", seed=1, offset=0, config=SCRAMBLED)
    assert_matches_cpu(op, b, xb, f"{op} on stream 2", seed=2, offset=9, config=EDGE.replace(block_div=4))


def test_non_zero_device_index(dev):
    """Inputs on cuda:1 while cuda:0 is current: outputs on cuda:1, computed on cuda:1's current stream."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices (found {torch.cuda.device_count()})")
    d1 = torch.device("cuda", 1)
    x = uniform((4, 1, *OFFICIAL), 14)
    with torch.cuda.device(0):
        for op in ALL_OPS:
            got = run(op, x.to(d1), seed=5, offset=2)
            assert_device_outputs(got, x.to(d1))
            assert_matches_cpu(op, got, x, f"{op} on cuda:1", seed=5, offset=2)
    warm_up(d1)
    new = uniform((4, 1, *OFFICIAL), 15)
    x1, new1 = x.to(d1), new.to(d1)
    torch.cuda.synchronize(d1)
    s = torch.cuda.Stream(d1)
    with torch.cuda.device(d1), torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        x1.copy_(new1)
        got = run("genesis_pair", x1, seed=5)
        pending = not s.query()
    s.synchronize()
    assert pending or UNDER_SANITIZER
    assert_matches_cpu("genesis_pair", got, new, "genesis_pair on a side stream of cuda:1", seed=5)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs, torch.compile, the custom ops


@pytest.mark.parametrize("op", ALL_OPS)
def test_cuda_graph_capture_and_replay(op, dev):
    """Captured once with a static input; every replay recomputes from the static input's current contents."""
    a, b = uniform((8, 1, *OFFICIAL), 16), uniform((8, 1, *OFFICIAL), 17)
    static_x = a.to(dev)
    kw = dict(seed=99, offset=8)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch's docs do
        for _ in range(2):
            run(op, static_x, **kw)
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = run(op, static_x, **kw)
    g.replay()
    torch.cuda.synchronize(dev)
    assert_matches_cpu(op, static_out, a, f"{op} graph replay", **kw)
    static_x.copy_(b.to(dev))
    g.replay()
    torch.cuda.synchronize(dev)
    assert_matches_cpu(op, static_out, b, f"{op} graph replay with a new input", **kw)
    eager = run(op, static_x, **kw)
    for s_o, e_o in zip(outputs(static_out), outputs(eager)):
        assert_identical(s_o, e_o, f"{op} graph replay vs eager")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph_on_cuda(mode, dev):
    """A compiled data step (the pair, then an elementwise op inductor generates) equals eager, bit for bit on the
    pair's outputs. reduce-overhead runs the compiled step through CUDA graphs."""
    config = DeformConfig()

    def step(x, offset: int):
        xd, target = run("genesis_pair", x, seed=1234, offset=offset, config=config)
        return xd, target, xd * 2 - 1

    x = uniform((4, 1, *OFFICIAL), 18).to(dev)
    compiled = torch.compile(step, fullgraph=True, backend="inductor", mode=mode)
    for offset in (0, 4, 0):
        torch.compiler.cudagraph_mark_step_begin()
        got = [t.clone() for t in compiled(x, offset)]  # cudagraph outputs are overwritten by the next replay
        eager = step(x, offset)
        assert_identical(got[0], eager[0], f"compiled ({mode}) x_deformed, offset {offset}")
        assert_identical(got[1], eager[1], f"compiled ({mode}) target, offset {offset}")
        torch.testing.assert_close(got[2], eager[2], rtol=0, atol=1e-6)
    assert_matches_cpu("genesis_pair", tuple(got[:2]), x.cpu(), f"compiled ({mode}) vs CPU", seed=1234, offset=0)


@pytest.mark.parametrize("name", ALL_OPS)
def test_opcheck_cuda(name, dev):
    op = getattr(torch.ops.genesis_ext, name)
    config = DeformConfig().to_vector()
    samples = [
        (uniform((2, 1, 23, 41, 17), 19).to(dev), 5, 0, config),
        (uniform((1, 3, 64, 64), 20).to(dev), 2**62, 2**40, config),  # 2D; int64 seed of a uint64 >= 2**63
        (uniform((2, 2, 17, 41, 23), 21).to(dev).permute(0, 1, 4, 3, 2), -7, 3, config),  # non-contiguous
    ]
    for args in samples:
        torch.library.opcheck(op, args)


def test_custom_op_equals_the_functional_api(dev):
    x = uniform((2, 1, *OFFICIAL), 22).to(dev)
    seed = 2**64 - 5  # carried as the int64 with the same bits
    xd, tg = torch.ops.genesis_ext.genesis_pair(x, seed - 2**64, 7, SCRAMBLED.to_vector())
    xd2, tg2 = run("genesis_pair", x, seed=seed, offset=7, config=SCRAMBLED)
    assert xd.device == x.device
    assert_identical(xd, xd2, "custom op vs API x_deformed")
    assert_identical(tg, tg2, "custom op vs API target")
    assert_matches_cpu("genesis_pair", (xd, tg), x.cpu(), "custom op vs CPU", seed=seed, offset=7, config=SCRAMBLED)


# ---------------------------------------------------------------------------------------------------------------------
# cupy


@pytest.mark.parametrize("op", ALL_OPS)
def test_cupy_equals_torch_cuda_and_cpu(op, dev):
    cp = pytest.importorskip("cupy")
    x = make_input((3, 3, 23, 41, 17), 23).numpy()
    kw = dict(seed=2**63 + 3, offset=11, config=SCRAMBLED)
    with cp.cuda.Device(0):
        xc = cp.asarray(x)
        pool = cp.get_default_memory_pool()
        used = pool.used_bytes()
        got = run(op, xc, **kw)
        for o in outputs(got):
            assert isinstance(o, cp.ndarray) and o.dtype == cp.float32 and o.shape == x.shape
            assert o.device.id == 0 and o.flags.c_contiguous and o.data.ptr != xc.data.ptr
        # outputs come from cupy's memory pool
        assert pool.used_bytes() - used >= sum(o.nbytes for o in outputs(got))
        assert_matches_cpu(op, got, x, f"{op} cupy vs CPU (numpy)", **kw)
        via_torch = run(op, torch.from_numpy(x).to(dev), **kw)
        for k, (c, t) in enumerate(zip(outputs(got), outputs(via_torch))):
            assert_identical(c, t, f"{op} cupy vs torch CUDA, output {k}")
        # a non-contiguous cupy view; the input is not modified
        view = cp.ascontiguousarray(xc.transpose(0, 1, 4, 3, 2)).transpose(0, 1, 4, 3, 2)
        assert not view.flags.c_contiguous
        keep = view.copy()
        got_view = run(op, view, **kw)
        cp.cuda.get_current_stream().synchronize()
        assert bool((view == keep).all())
        assert_matches_cpu(op, got_view, x, f"{op} cupy non-contiguous", **kw)


def test_cupy_runs_on_the_current_stream_without_host_sync(dev):
    """As test_runs_on_the_current_stream_without_host_sync, with cupy's current stream (torch sleeps on it through
    an ExternalStream)."""
    cp = pytest.importorskip("cupy")
    warm_up(dev)
    old, new = uniform((16, 1, *OFFICIAL), 24).numpy(), uniform((16, 1, *OFFICIAL), 25).numpy()
    with cp.cuda.Device(0):
        x, new_c = cp.asarray(old), cp.asarray(new)
        cp.cuda.Device(0).synchronize()
        s = cp.cuda.Stream(non_blocking=True)
        with s, torch.cuda.stream(torch.cuda.ExternalStream(s.ptr, device=dev)):
            torch.cuda._sleep(SLEEP_CYCLES)
            x[...] = new_c
            got = run("genesis_pair", x, seed=26)
            pending = not s.done
        s.synchronize()
    if not UNDER_SANITIZER:
        assert pending, "genesis_pair (cupy) returned after its stream had finished: the call synchronised"
    assert_matches_cpu("genesis_pair", got, new, "genesis_pair (cupy) on a side stream", seed=26)


# ---------------------------------------------------------------------------------------------------------------------
# The build and the device Philox generator


def test_build_info_reports_the_devices(dev):
    info = genesis_ext.build_info()
    assert info["with_cuda"] and info["cuda_archs"]
    assert info["cuda_devices"] == torch.cuda.device_count() and info["cuda_unavailable_reason"] == ""


def test_cuda_philox_known_answers_and_cpu_equality(dev):
    """_C.cuda_philox4x32_10 on the device: the three Random123 vectors and 1000 random (counter, key) pairs equal
    the CPU core (_C.philox4x32_10); the output buffer is poisoned so an unwritten word shows."""
    ctr, key = philox_inputs()
    n = len(ctr)
    d_ctr, d_key = (torch.from_numpy(a.view(np.int32)).to(dev) for a in (ctr, key))
    d_out = torch.full((n, 4), int(np.uint32(0xDEADBEEF).view(np.int32)), dtype=torch.int32, device=dev)
    _C.cuda_philox4x32_10(
        d_ctr.data_ptr(), d_key.data_ptr(), d_out.data_ptr(), n, dev.index, torch.cuda.current_stream(dev).cuda_stream
    )
    got = d_out.cpu().numpy().view(np.uint32)  # a copy on the current stream: ordered after the kernel
    assert_philox_outputs(got, ctr, key)


@pytest.mark.parametrize("case", LARGE_CASES, ids=[c[0] for c in LARGE_CASES])
@pytest.mark.parametrize("op", LARGE_OPS)
def test_cuda_equals_cpu_at_large_cubes(dev, op, case):
    """Blocks of any size run: the published rule at 128x128x64 and 160^3 (blocks up to 4,096 voxels)."""
    name, shape, config = case
    x = torch.from_numpy(case_input(name, shape))
    for seed, offset in case_seed_offsets(op, name)[:2]:
        kw = dict(seed=seed, offset=offset, config=config)
        assert_matches_cpu(op, run(op, x.to(dev), **kw), x, f"{op} {name} seed={seed}", **kw)


def test_user_deformation_in_the_pair_on_cuda_equals_cpu(dev):
    """A user deformation gets the same gates and uniforms on CUDA (drawn on the host, copied), runs on the batch's
    device, and the segments around it are the CUDA kernels: with an exact fn (a halving) the result is the CPU's."""
    halve = genesis_ext.PixelDeformation("halve", lambda x, u: x * 0.5, rate=0.5, after="bezier_remap")
    config = SCRAMBLED
    x = torch.rand(6, 2, 23, 41, 17)
    cpu = run("genesis_pair", x, seed=8, offset=3, config=config, deformations=[halve])
    gpu = run("genesis_pair", x.to(dev), seed=8, offset=3, config=config, deformations=[halve])
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
