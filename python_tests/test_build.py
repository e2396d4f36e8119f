"""The compiled core: what was built, the Philox generator, and the per-sample parameters it derives.

The parameter test is the foundation of every kernel-vs-oracle test: ``sample_params`` runs the same shared C++
``derive_params`` as the kernels, and it must equal ``genesis_ext.reference.derive_params`` (numpy, written from
docs/randomness.md) bit for bit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import genesis_ext
from genesis_ext import _C, DeformConfig
from genesis_ext import reference as R

from kernel_cases import PHILOX_KAT, SCRAMBLED

REPO = Path(__file__).resolve().parents[1]

SEEDS = [0, 1, 20190613, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**63 + 12345, 2**64 - 1]
OFFSETS = [0, 2**32 - 2, 2**62 + 7, 2**63 - 3]  # 2**32 - 2: the batch crosses into the counter's high word


def test_build_info_keys_and_types():
    info = genesis_ext.build_info()
    assert set(info) == {"with_cuda", "cuda_archs", "with_openmp", "cuda_devices", "cuda_unavailable_reason"}
    assert isinstance(info["with_cuda"], bool) and isinstance(info["with_openmp"], bool)
    assert isinstance(info["cuda_archs"], str) and isinstance(info["cuda_unavailable_reason"], str)
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    if not info["with_cuda"]:
        assert info["cuda_devices"] == 0 and info["cuda_archs"] == "" and info["cuda_unavailable_reason"]
    else:
        assert info["cuda_archs"]
        # a reason is given exactly when no device can be used
        assert (info["cuda_devices"] == 0) == bool(info["cuda_unavailable_reason"])
    assert genesis_ext.build_info() is not genesis_ext.build_info()  # a fresh dict: callers may modify it


@pytest.mark.parametrize("ctr, key, expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(_C.philox4x32_10(list(ctr), list(key))) == expected


def test_philox_core_matches_reference_generator(rng):
    ctr = rng.integers(0, 2**32, size=(200, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=(200, 2), dtype=np.uint64).astype(np.uint32)
    expected = R.philox4x32_10(ctr, key)
    got = np.array([_C.philox4x32_10(c.tolist(), k.tolist()) for c, k in zip(ctr, key)], dtype=np.uint32)
    assert np.array_equal(got, expected)


def _device_buffers(arrays):
    """numpy uint32 arrays -> (device arrays, pointer getter, stream handle, to_numpy), with torch or cupy."""
    try:
        import torch

        if torch.cuda.is_available():
            dev = [torch.from_numpy(a.view(np.int32)).cuda() for a in arrays]
            return (
                dev,
                lambda t: t.data_ptr(),
                torch.cuda.current_stream().cuda_stream,
                lambda t: (torch.cuda.synchronize(), t.cpu().numpy().view(np.uint32))[1],
            )
    except ImportError:
        pass
    cupy = pytest.importorskip("cupy", reason="needs a CUDA-enabled torch or cupy to allocate device buffers")
    dev = [cupy.asarray(a) for a in arrays]
    return (
        dev,
        lambda t: t.data.ptr,
        cupy.cuda.get_current_stream().ptr,
        lambda t: (cupy.cuda.get_current_stream().synchronize(), cupy.asnumpy(t))[1],
    )


@pytest.mark.cuda
def test_cuda_philox_matches_cpu(rng):
    n = 4096
    ctr = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    for j, (c, k, _) in enumerate(PHILOX_KAT):
        ctr[j], key[j] = c, k
    (d_ctr, d_key, d_out), ptr, stream, to_numpy = _device_buffers(
        [ctr, key, np.full((n, 4), 0xDEADBEEF, dtype=np.uint32)]
    )  # poisoned: an unwritten word shows
    _C.cuda_philox4x32_10(ptr(d_ctr), ptr(d_key), ptr(d_out), n, 0, stream)
    got = to_numpy(d_out).reshape(n, 4)
    assert np.array_equal(got, R.philox4x32_10(ctr, key))
    for j, (_, _, expected) in enumerate(PHILOX_KAT):
        assert tuple(int(v) for v in got[j]) == expected


# ---------------------------------------------------------------------------------------------------------------------
# sample_params (C++) == reference.derive_params (numpy), exactly

# every key of the reference's parameters (reference.derive_params: the twin of the kernels' declared draws)
PARAM_KEYS = tuple(R.derive_params(0, 0, (64, 64, 32), DeformConfig()))


def _assert_params_equal(seed, offset, batch, spatial, config):
    got = genesis_ext.sample_params(batch, spatial, seed=seed, offset=offset, config=config)
    assert set(PARAM_KEYS) | {"index", "stream_version"} == set(got)
    assert np.array_equal(got["index"], np.arange(offset, offset + batch))
    d = len(spatial)
    assert got["flip"].shape == (batch, d) and got["bezier"].shape == (batch, 4)
    assert got["holes"].shape == (batch, config.max_holes, 2, d)
    assert got["windows"].shape == (batch, config.max_windows, 2, d)
    assert got["blocks"].shape == (batch, config.num_blocks, 2, d)
    for n in range(batch):
        ref = R.derive_params(seed, offset + n, spatial, config)
        for key in PARAM_KEYS:
            a, b = np.asarray(got[key][n]), np.asarray(ref[key])
            # exact: integers, booleans, and uniforms (u >> 8) * 2^-24 are exact in float64
            assert a.shape == b.shape and np.array_equal(a, b), (seed, offset + n, spatial, key, a, b)


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_params_match_reference_official_3d(seed):
    for offset in OFFSETS:
        _assert_params_equal(seed, offset, 3, (64, 64, 32), DeformConfig.official())


@pytest.mark.parametrize(
    "spatial, config",
    [
        ((23, 41, 17), DeformConfig()),
        ((23, 41, 17), SCRAMBLED),
        ((64, 64), DeformConfig()),
        ((64, 64), SCRAMBLED),
        ((64, 64, 32), DeformConfig.official(flip_compat=True)),
        ((64, 64), DeformConfig.official(flip_compat=True)),
        ((23, 41, 17), SCRAMBLED.replace(flip_compat=True)),
    ],
    ids=["odd", "odd-scrambled", "2d", "2d-scrambled", "compat", "2d-compat", "odd-scrambled-compat"],
)
def test_sample_params_match_reference_shapes_and_configs(spatial, config):
    for seed, offset in [(0, 0), (7, 1000), (2**63 + 5, 2**32 - 3), (2**64 - 1, 2**63 - 4), (123456789, 17)]:
        _assert_params_equal(seed, offset, 4, spatial, config)


def test_sample_params_cover_every_branch():
    """The equality tests above are only meaningful if the samples they compare take different branches."""
    p = genesis_ext.sample_params(64, (64, 64, 32), seed=0, offset=0, with_blocks=False)
    for key in ("nonlinear", "local", "paint", "inpaint", "increasing"):
        assert p[key].any() and not p[key].all(), key
    assert p["flip"].any(axis=0).all() and not p["flip"].all(axis=0).any()
    assert len(np.unique(p["n_holes"])) >= 3 and len(np.unique(p["n_windows"])) >= 3
    assert "blocks" not in p  # with_blocks=False skips the 10,000 blocks per sample


def test_sample_params_are_a_function_of_the_global_index():
    whole = genesis_ext.sample_params(10, (64, 64, 32), seed=99, offset=0)
    part = genesis_ext.sample_params(4, (64, 64, 32), seed=99, offset=6)
    for key in PARAM_KEYS:
        assert np.array_equal(whole[key][6:], part[key]), key
    other = genesis_ext.sample_params(10, (64, 64, 32), seed=100, offset=0)
    assert not np.array_equal(whole["bezier"], other["bezier"])
    assert not np.array_equal(whole["blocks"], other["blocks"])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (dict(seed=2**64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
        (dict(seed=1.0), TypeError, "seed must be an int"),
        (dict(seed=1, offset=2**63), ValueError, r"offset must be in \[0, 2\*\*63\)"),
        (dict(seed=1, offset=-2), ValueError, "offset must be in"),
    ],
)
def test_sample_params_rejects_bad_seed_and_offset(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        genesis_ext.sample_params(2, (64, 64, 32), **kwargs)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, (64, 64, 32)), "batch must be >= 1"),
        ((2, (64, 64, 32, 4)), "spatial_shape must be 2 or 3 positive lengths"),
        ((2, (64,)), "spatial_shape must be 2 or 3 positive lengths"),
        ((2, (64, 0, 32)), "spatial_shape must be 2 or 3 positive lengths"),
    ],
)
def test_sample_params_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        genesis_ext.sample_params(*args, seed=0)


def _cuda_resources():
    spec = importlib.util.spec_from_file_location("cuda_resources", REPO / "benchmarks" / "cuda_resources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cuda_resource_report_fails_on_spills_and_launches_that_cannot_fit():
    """benchmarks/cuda_resources.py (CI's sm_90 report) reads ptxas' report and fails what the launch cannot afford."""
    res = _cuda_resources()
    ptxas = """ptxas info    : Compiling entry function '_ZN7genesis4cuda12_GLOBAL__N_114prepare_kernelEv' for 'sm_90'
ptxas info    : Function properties for _ZN7genesis4cuda12_GLOBAL__N_114prepare_kernelEv
    552 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 62 registers, used 1 barriers, 552 bytes cumulative stack size, 6608 bytes smem
ptxas info    : Compiling entry function '_ZN7genesis4cuda12_GLOBAL__N_113philox_kernelEv' for 'sm_90'
ptxas info    : Function properties for _ZN7genesis4cuda12_GLOBAL__N_113philox_kernelEv
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_ZN7genesis4cuda12_GLOBAL__N_110new_kernelEv' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""
    kernels = res.parse(ptxas)
    assert [(k.name, k.registers, k.stack, k.smem) for k in kernels] == [
        ("prepare_kernel", 62, 552, 6608),
        ("philox_kernel", 255, 16, 0),
        ("new_kernel", 8, 0, 0),
    ]
    rows, problems = res.judge(kernels)
    assert "50%" in rows[1] and "registers" in rows[1]  # 62 registers x 256 threads: 4 blocks, 32 of 64 warps
    assert problems == [
        "philox_kernel: spills 8 bytes stored, 8 loaded",
        "new_kernel: no launch size in LAUNCH_THREADS",
    ]
    big = res.Kernel("deform_kernel<1024, unsigned short>", registers=40, smem=60 * 1024)
    assert res.judge([big])[1] == [
        "deform_kernel<1024, unsigned short>: cannot launch 256 threads per block (shared memory)"
    ]


def test_cli_parsing_imports_neither_torch_nor_the_extension():
    """`genesis-ext --help` and every verb's parser stay light (issue: --help took 1-9 s importing torch)."""
    import subprocess

    code = (
        "import sys\nfrom genesis_ext.cli import build_parser\nbuild_parser()  # every verb's arguments\n"
        "print(sorted(m for m in ('torch', 'genesis_ext._C', 'genesis_ext.ops') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    version = subprocess.run([sys.executable, "-m", "genesis_ext.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"genesis-ext {genesis_ext.__version__}"


@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
def test_training_verbs_without_torch_say_what_to_install(verb, tmp_path):
    import subprocess

    args = {
        "pretrain": ["--data", str(tmp_path), "--out", str(tmp_path / "run")],
        "finetune": ["--task", "segmentation", "--data", str(tmp_path), "--out", str(tmp_path / "run")],
    }[verb]
    code = (
        "import sys\nsys.modules['torch'] = None  # as if torch were not installed\n"
        f"from genesis_ext.cli import main\nsys.exit(main({[verb, *args]!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "needs PyTorch, which is not installed: pip install 'genesis-ext[train]'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
