"""Functional Models Genesis deformations on batches, for torch tensors (CPU and CUDA), numpy and cupy arrays.

Every op takes a float batch ``(N, C, X, Y, Z)`` (or ``(N, C, H, W)``), returns new arrays of the same type, dtype,
shape and device, and never modifies its input. The kernels compute in float32 (other float dtypes are converted to
float32 and the results back). Sample ``n`` is deformed with the parameters of global sample index
``offset + n`` drawn from ``seed`` (docs/randomness.md), so a sample's result does not depend on the batch it is in.
All channels of a voxel move together. Non-contiguous inputs are accepted (copied to contiguous memory first).

Non-finite values are data, not errors, and behave the same on every device (detecting them on a GPU would need a
host synchronisation): flips and shuffles move them, painting overwrites them with noise, and the Bézier map sends
NaN to NaN, -Inf and values below 0 to f(0), +Inf and values above 1 to f(1).

CUDA data (torch CUDA tensors, cupy arrays) is deformed by the CUDA kernels on the caller's current stream and
device, with outputs and scratch from the caller's allocator, without synchronising the host: bit for bit the CPU
result. Torch tensors go through ``torch.ops.genesis_ext.*`` custom ops (with fake implementations), so the ops work
under ``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Sequence

import numpy as np

try:  # first: the extension then shares torch's OpenMP runtime
    import torch
except ImportError:  # numpy-only installs
    torch = None

from . import _C
from .config import MAX_SHUFFLE_COVERAGE, PAIR_STAGES, SINGLE_OPS, DeformConfig
from .streams import STREAM_VERSION, Purpose
from .user_deformations import PixelDeformation, check_deformations, pair_with


def _check_core_declarations() -> None:
    """DeformConfig and the compiled core (csrc/deformations.h) declare the same fields, in the same order and of
    the same types (the kernels read the config vector by position), the same single ops, and the same random
    streams' purposes (streams.Purpose, csrc/philox.h)."""
    ctype = {float: "double", int: "int32_t", bool: "bool"}
    python = tuple((f.name, ctype[f.metadata.get("type", bool)]) for f in dataclasses.fields(DeformConfig))
    core = tuple(tuple(f) for f in _C.CONFIG_FIELDS)
    if python != core:
        raise ImportError(
            f"genesis_ext: DeformConfig's fields {python} differ from the compiled core's {core}: "
            "rebuild the extension (pip install .) or align genesis_ext/config.py and "
            "csrc/deformations.h"
        )
    core_ops = set(_C.OPS) - {"genesis_pair"}
    if core_ops != set(SINGLE_OPS):
        raise ImportError(
            f"genesis_ext: config.PAIR_STAGES declares the single ops {sorted(SINGLE_OPS)}, the compiled core "
            f"{sorted(core_ops)}: rebuild the extension or align genesis_ext/config.py and csrc/deformations.h"
        )
    python_purposes = {p.name: int(p) for p in Purpose}
    if python_purposes != dict(_C.PURPOSES):
        raise ImportError(
            f"genesis_ext: streams.Purpose {python_purposes} differs from the compiled core's purposes "
            f"{dict(_C.PURPOSES)}: rebuild the extension or align genesis_ext/streams.py and csrc/philox.h"
        )
    if _C.STREAM_VERSION != STREAM_VERSION:
        raise ImportError(
            f"genesis_ext: streams.STREAM_VERSION is {STREAM_VERSION}, the compiled core draws stream version "
            f"{_C.STREAM_VERSION}: rebuild the extension (pip install .) or align genesis_ext/streams.py and "
            "csrc/philox.h"
        )


_check_core_declarations()
_SEED_LIMIT = 1 << 64
_OFFSET_LIMIT = 1 << 63
_OPS = dict(_C.OPS)  # name -> the core's op code (csrc/deform.h GENESIS_OPS)
OPS = ("genesis_pair", *SINGLE_OPS)  # every op's name: the fused pair and one single op per deformation
_forked = False
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_forked", True))


def _num_threads() -> int:
    # GNU libgomp hangs in a forked child whose parent ran OpenMP: forked children run single-threaded.
    if _forked:
        return 1
    if torch is not None:
        return torch.get_num_threads()
    return len(os.sched_getaffinity(0))


def _is_counter_tensor(value) -> bool:
    return torch is not None and isinstance(value, torch.Tensor)


def _check_last_index(offset: int, batch: int) -> None:
    """Every sample's global index offset + n is below 2**63 (docs/randomness.md), as the reference requires."""
    if offset + batch > _OFFSET_LIMIT:
        raise ValueError(
            f"genesis_ext: a batch of {batch} from offset {offset} reaches sample index {offset + batch - 1}; "
            f"every index offset + n must be below 2**63: pass an offset of at most 2**63 - {batch}"
        )


def _check_seed(seed: Any, offset: Any, batch: int = 1) -> None:
    """seed and offset: ints in range, or one-element integer CPU tensors (their values are checked when the op
    runs: reading them here would make torch.compile guard on them); the batch's last index is in range too."""
    for name, value, limit in (("seed", seed, _SEED_LIMIT), ("offset", offset, _OFFSET_LIMIT)):
        if _is_counter_tensor(value):
            if value.numel() != 1 or value.device.type != "cpu" or value.dtype not in (torch.int64, torch.int32):
                raise TypeError(
                    f"genesis_ext: the {name} tensor must hold one int64 or int32 on the CPU, got "
                    f"{value.dtype} of shape {tuple(value.shape)} on {value.device}"
                )
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(
                f"genesis_ext: {name} must be an int, got {type(value).__name__} (a one-element "
                "integer CPU tensor works too)"
            )
        if not 0 <= int(value) < limit:
            raise ValueError(f"genesis_ext: {name} must be in [0, 2**{limit.bit_length() - 1}), got {value}")
    if not _is_counter_tensor(offset):
        _check_last_index(int(offset), batch)


def _check_layout(op: str, shape: tuple, spatial_dims: Any) -> None:
    """A 5-D input is a 3-D batch (N, C, X, Y, Z); a 4-D one is a 2-D batch (N, C, H, W) only when the caller says so
    (spatial_dims=2): it could as well be one 3-D sample (C, X, Y, Z), and guessing would deform it wrongly."""
    if spatial_dims is not None and (isinstance(spatial_dims, bool) or spatial_dims not in (2, 3)):
        raise ValueError(f"genesis_ext.{op}: spatial_dims must be 2, 3 or None, got {spatial_dims!r}")
    if len(shape) == (4 if spatial_dims == 2 else 5):
        return
    if len(shape) == 4 and spatial_dims is None:
        raise ValueError(
            f"genesis_ext.{op}: a 4-D input {shape} is ambiguous: a batch of 2-D images (N, C, H, W) or "
            "one 3-D sample (C, X, Y, Z). Pass spatial_dims=2 for a 2-D batch; for one 3-D sample add "
            "the batch axis (x[None]) or use genesis_ext.monai.GenesisPaird"
        )
    layout = "(N, C, H, W)" if spatial_dims == 2 else "(N, C, X, Y, Z)"
    raise ValueError(
        f"genesis_ext.{op}: expected a batch {layout} (spatial_dims={spatial_dims}), got shape {shape} "
        f"({len(shape)} dims)"
    )


def _validate(
    op: str, x: Any, seed: Any, offset: Any, config: DeformConfig | None, spatial_dims: Any = None
) -> DeformConfig:
    """Check everything about a call before any work is done; returns the config to use."""
    if config is None:
        config = DeformConfig()
    elif not isinstance(config, DeformConfig):
        raise TypeError(f"genesis_ext.{op}: config must be a DeformConfig or None, got {type(config).__name__}")
    is_torch = torch is not None and isinstance(x, torch.Tensor)
    if not is_torch and not isinstance(x, np.ndarray) and not _is_cupy(x):
        raise TypeError(
            f"genesis_ext.{op}: expected a torch.Tensor, numpy.ndarray or cupy.ndarray, got {type(x).__name__}"
        )
    on_cuda = _is_cupy(x) or (is_torch and x.device.type == "cuda")
    if is_torch and x.device.type not in ("cpu", "cuda", "meta"):
        raise NotImplementedError(f"genesis_ext.{op}: {x.device.type} tensors are not supported; use CPU or CUDA")
    if on_cuda and not _C.WITH_CUDA:
        raise RuntimeError(
            f"genesis_ext.{op}: this genesis_ext was built without CUDA kernels; reinstall with "
            "nvcc available (GENESIS_CUDA=ON) or move the batch to the CPU"
        )
    if not _is_float(x):
        raise TypeError(
            f"genesis_ext.{op}: expected floating-point data (float32, float64, float16 or bfloat16), got "
            f"{x.dtype}; convert it first, e.g. x.float() (CT in HU: window it to [0, 1] first, as "
            "genesis_ext.data does)"
        )
    _check_layout(op, tuple(x.shape), spatial_dims)
    n, c, *spatial = (int(s) for s in x.shape)
    if n == 0:
        raise ValueError(f"genesis_ext.{op}: empty batch (N = 0)")
    if c == 0 or min(spatial) == 0:
        raise ValueError(f"genesis_ext.{op}: every axis needs length >= 1, got shape {tuple(x.shape)}")
    if c * math.prod(spatial) >= 1 << 31:  # math, not numpy: dynamo would trace np.prod
        raise ValueError(f"genesis_ext.{op}: a sample must have fewer than 2**31 elements, got shape {tuple(x.shape)}")
    rules = config.size_rules(op)
    for rule in rules:
        need = config.min_axis_length(rule)
        if min(spatial) < need:
            raise ValueError(
                f"genesis_ext.{op}: spatial size {tuple(spatial)} is too small for {rule} with this "
                f"config: every spatial axis needs length >= {need}"
            )
    if "local" in rules:
        _check_shuffle_work(op, config, spatial)
    _check_seed(seed, offset, n)
    return config


def _check_shuffle_work(op: str, config: DeformConfig, spatial: list[int]) -> None:
    """Refuse a shuffle that would cost far more than the sample's voxels (108 s for one 64x64x32 cube with
    num_blocks=1_000_000, block_div=1); the shape is host metadata, so this never waits for a GPU."""
    coverage = config.shuffle_coverage(spatial)
    if coverage > MAX_SHUFFLE_COVERAGE:
        raise ValueError(
            f"genesis_ext.{op}: with num_blocks={config.num_blocks} and block_div={config.block_div}, local "
            f"shuffling would move each voxel of a {tuple(spatial)} sample {coverage:,.0f} times on average "
            f"(num_blocks x mean block volume / voxels); the bound is {MAX_SHUFFLE_COVERAGE} (the published recipe: "
            f"{DeformConfig().shuffle_coverage(spatial):.1f} at this size). Lower num_blocks or raise block_div"
        )


_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _is_float(x) -> bool:
    return str(x.dtype).replace("torch.", "") in _FLOAT_DTYPES


def _signed(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (torch custom ops carry int64)."""
    return seed - _SEED_LIMIT if seed >= _SEED_LIMIT // 2 else seed


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "__cuda_array_interface__")


def _kernel(
    op: str,
    x_ptr: int,
    out_ptr: int,
    target_ptr: int,
    shape,
    seed: int,
    offset: int,
    config_vec: list[float],
    cuda: tuple | None,
    core=_C,
) -> None:
    """Run the op's kernel on contiguous buffers; cuda = (scratch pointer, scratch bytes, device, stream) or None.
    core: the extension module (the tests pass genesis_ext._emulated's)."""
    args = (
        _OPS[op],
        x_ptr,
        out_ptr,
        target_ptr,
        int(shape[0]),
        int(shape[1]),
        [int(s) for s in shape[2:]],
        seed % _SEED_LIMIT,
        offset,
        config_vec,
    )
    if cuda is None:
        core.deform_cpu(*args, _num_threads())
    else:
        core.deform_cuda(*args, *cuda)


def _scratch_bytes(op: str, shape, config_vec: list[float], core=_C) -> int:
    return core.cuda_scratch_bytes(_OPS[op], int(shape[0]), [int(s) for s in shape[2:]], config_vec)


def _run_numpy(op: str, x: np.ndarray, with_target: bool, seed: int, offset: int, config_vec: list[float]):
    out = np.empty_like(x)
    target = np.empty_like(x) if with_target else None
    _kernel(
        op,
        x.ctypes.data,
        out.ctypes.data,
        0 if target is None else target.ctypes.data,
        x.shape,
        seed,
        offset,
        config_vec,
        None,
    )
    return out if target is None else (out, target)


def _run_cupy(op: str, x, with_target: bool, seed: int, offset: int, config_vec: list[float]):
    """cupy arrays: outputs and scratch from cupy's memory pool, kernels on cupy's current stream."""
    import cupy

    with x.device:
        x = cupy.ascontiguousarray(x)
        out = cupy.empty_like(x)
        target = cupy.empty_like(x) if with_target else None
        size = _scratch_bytes(op, x.shape, config_vec)
        scratch = cupy.empty(size, dtype=cupy.uint8)
        _kernel(
            op,
            x.data.ptr,
            out.data.ptr,
            0 if target is None else target.data.ptr,
            x.shape,
            seed,
            offset,
            config_vec,
            (scratch.data.ptr, size, x.device.id, cupy.cuda.get_current_stream().ptr),
        )
    return out if target is None else (out, target)


def _run_torch(op: str, x: "torch.Tensor", with_target: bool, seed: int, offset: int, config_vec: list[float]):
    """torch tensors: outputs and scratch from torch's allocator, CUDA kernels on torch's current stream."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    target = torch.empty_like(out) if with_target else None
    cuda = None
    if x.is_cuda:
        size = _scratch_bytes(op, x.shape, config_vec)
        scratch = torch.empty(size, dtype=torch.uint8, device=x.device)  # freed into the same stream's pool
        cuda = (scratch.data_ptr(), size, x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
    _kernel(
        op,
        x.data_ptr(),
        out.data_ptr(),
        0 if target is None else target.data_ptr(),
        x.shape,
        seed,
        offset,
        config_vec,
        cuda,
    )
    return out if target is None else (out, target)


def _counter(seed, offset) -> "torch.Tensor":
    """The custom ops' (seed, offset) argument: an int64 CPU tensor [seed as the int64 of the same bits, offset]. From
    tensors it is traced, not read, so torch.compile does not guard on the values (no recompiles as they advance)."""
    parts = [
        v.reshape(()).to(torch.int64) if _is_counter_tensor(v) else torch.tensor(int(v), dtype=torch.int64)
        for v in (seed if _is_counter_tensor(seed) else _signed(int(seed)), offset)
    ]
    return torch.stack(parts)


def _host_ints(seed, offset, batch: int) -> tuple[int, int]:
    """(seed, offset) as Python ints from ints or one-element CPU tensors (the eager paths; reading a CPU tensor
    never waits for a GPU), checked: what _check_seed could not read at trace time."""
    seed, offset = (int(v.reshape(()).item()) if _is_counter_tensor(v) else int(v) for v in (seed, offset))
    if not 0 <= offset < _OFFSET_LIMIT:
        raise ValueError(f"genesis_ext: offset must be in [0, 2**63), got {offset}")
    _check_last_index(offset, batch)
    return seed % _SEED_LIMIT, offset


def _counter_values(counter: "torch.Tensor", batch: int) -> tuple[int, int]:
    return _host_ints(*counter.tolist(), batch)


def _register_torch_op(name: str):
    """torch.ops.genesis_ext.<name>(x, counter, config_vector) (counter: _counter), with a fake implementation for
    tracing."""
    with_target = name == "genesis_pair"
    result = "(Tensor, Tensor)" if with_target else "Tensor"

    def impl(x, counter, config):
        return _run_torch(name, x, with_target, *_counter_values(counter, int(x.shape[0])), config)

    def fake(x, counter, config):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return (out, torch.empty_like(out)) if with_target else out

    op = torch.library.custom_op(
        f"genesis_ext::{name}", impl, mutates_args=(), schema=f"(Tensor x, Tensor counter, float[] config) -> {result}"
    )
    op.register_fake(fake)
    return op


_TORCH_OPS = {name: _register_torch_op(name) for name in _OPS} if torch is not None else {}


def _apply(op: str, x, seed: int, offset: int, config: DeformConfig | None, spatial_dims: int | None):
    config = _validate(op, x, seed, offset, config, spatial_dims)
    vec = config.to_vector()
    dtype = x.dtype  # the kernels compute in float32; other float dtypes are converted there and back
    if isinstance(x, np.ndarray):
        seed, offset = _host_ints(seed, offset, x.shape[0])
        result = _run_numpy(op, np.ascontiguousarray(x, dtype=np.float32), op == "genesis_pair", seed, offset, vec)
    elif _is_cupy(x):
        seed, offset = _host_ints(seed, offset, x.shape[0])
        result = _run_cupy(op, x.astype("float32", copy=False), op == "genesis_pair", seed, offset, vec)
    else:
        result = _TORCH_OPS[op](x.float(), _counter(seed, offset), vec)
    if str(dtype).endswith("float32"):
        return result
    return tuple(_as_dtype(r, dtype) for r in result) if isinstance(result, tuple) else _as_dtype(result, dtype)


def _as_dtype(a, dtype):
    """An op's float32 result in the input's dtype (rounded to nearest for float16 and bfloat16)."""
    return a.to(dtype) if torch is not None and isinstance(a, torch.Tensor) else a.astype(dtype)


_CONTRACT = """
    Args:
        x: float batch ``(N, C, X, Y, Z)``, or ``(N, C, H, W)`` with ``spatial_dims=2`` (a 4-D input without it is
            refused: it could be one 3-D sample ``(C, X, Y, Z)``): torch tensor (CPU or CUDA), numpy array or cupy
            array; results come back as the same type, dtype and device. Not modified. The kernels compute in
            float32: float64 input is rounded to float32 first, float16 and bfloat16 outputs are rounded from the
            float32 result.
        seed: int in [0, 2**64). offset: global index of sample 0 (int in [0, 2**63)); sample n uses offset + n,
            which must be below 2**63 too (the last sample's index: offset + N <= 2**63).
            Either may be a one-element int64 CPU tensor instead (a seed tensor holds the int64 with the seed's
            bits): under torch.compile the op then receives it as a tensor and nothing recompiles as it advances.
        config: DeformConfig (default: the published recipe); supplies the size rules{extra}.
    Raises TypeError (type, non-float dtype) or ValueError (ndim, empty batch, axes too small for the config, a
    local shuffle far costlier than the sample's voxels (``genesis_ext.config.MAX_SHUFFLE_COVERAGE``), seeds, indices);
    RuntimeError for CUDA data without usable CUDA kernels.
"""


def _single_op(name: str, doc: str):
    """genesis_ext.<name>: the single op applying one deformation to every sample, as declared in config.PAIR_STAGES."""

    def op(x, *, seed: int, offset: int = 0, config: DeformConfig | None = None, spatial_dims: int | None = None):
        return _apply(name, x, seed, offset, config, spatial_dims)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc + "\n" + _CONTRACT.format(extra=" and rates" if name == "flip" else "")
    return op


for _stage in PAIR_STAGES.values():
    for _name, _doc in _stage.ops.items():
        globals()[_name] = _single_op(_name, _doc)


def _check_unit_range(x: np.ndarray) -> None:
    from .data.intensity import IntensityWarning, unit_range_problem  # here: genesis_ext.data imports nibabel

    if problem := unit_range_problem(x):
        warnings.warn(f"genesis_ext.genesis_pair: {problem}", IntensityWarning, stacklevel=3)


def genesis_pair(
    x,
    *,
    seed: int,
    offset: int = 0,
    config: DeformConfig | None = None,
    spatial_dims: int | None = None,
    deformations: Sequence[PixelDeformation] = (),
):
    """One Models Genesis training pair per sample, fused in one pass: returns ``(x_deformed, target)``.

    Per sample: flip (input and target alike) -> local shuffle (w.p. ``local_rate``) -> Bézier map (w.p.
    ``nonlinear_rate``) -> Gaussian blur (w.p. ``blur_rate``) -> Gaussian noise (w.p. ``gaussian_noise_rate``) ->
    painting (w.p. ``paint_rate``;
    in-painting w.p. ``inpaint_rate``, else out-painting).
    ``target`` is the flipped, otherwise undeformed input: the regression target. Sample n equals the composition
    of the single ops (``flip``, ``local_shuffle``, ...) applied where its gates fire.
    ``deformations``: user pixel-level deformations (``genesis_ext.PixelDeformation``), each after the built-in stage it
    names; the pair then runs in segments around them (genesis_ext.user_deformations).
    A NumPy batch far outside [0, 1] (CT in HU, raw MR signal) gets an ``IntensityWarning`` naming the window to
    apply: its pairs would be useless (the Bézier map and the painting assume [0, 1]), though the kernels deform any
    float values exactly. Tensors are not scanned (no host pass, no sync); the MONAI transforms refuse such samples.
    """
    if isinstance(x, np.ndarray):
        _check_unit_range(x)
    if not deformations:
        return _apply("genesis_pair", x, seed, offset, config, spatial_dims)
    deformations = check_deformations(deformations)
    config = _validate("genesis_pair", x, seed, offset, config, spatial_dims)
    return pair_with(
        x,
        deformations,
        lambda y, c: _apply("genesis_pair", y, seed, offset, c, spatial_dims),
        seed=int(seed),
        offset=int(offset),
        config=config,
    )


genesis_pair.__doc__ += _CONTRACT.format(extra=" and rates")


def sample_params(
    batch: int,
    spatial_shape,
    *,
    seed: int,
    offset: int = 0,
    config: DeformConfig | None = None,
    with_blocks: bool = True,
) -> dict[str, np.ndarray]:
    """The per-sample parameters the kernels use for samples ``offset .. offset+batch-1``, as numpy arrays.

    Derived by the same shared C++ code as the kernels, so ``genesis_ext.reference`` can replay exactly what a kernel
    did. Keys (d = number of spatial axes): ``index`` (batch,), the gates ``nonlinear``, ``local``, ``paint``,
    ``inpaint``, ``gaussian``, ``blur`` (batch,) bool, ``noise_std`` and ``blur_sigma`` (batch,) float32 (the Gaussian
    noise's standard deviation, the blur's sigma), ``flip`` (batch, d) bool (net flip per axis), ``bezier`` (batch, 4)
    float64 (x1, y1, x2, y2), ``increasing`` (batch,) bool, ``n_holes`` / ``n_windows`` (batch,), ``holes`` (batch,
    max_holes, 2, d) and ``windows`` (batch, max_windows, 2, d) int32 with [..., 0, :] the origin and [..., 1, :] the
    size (unused slots 0), and with ``with_blocks`` the shuffle blocks ``blocks`` (batch, num_blocks, 2, d). The noise
    values and block permutations are functions of (seed, index) too: see docs/randomness.md. ``stream_version`` (an
    int, not an array: skip it when slicing the arrays per sample) is ``genesis_ext.streams.STREAM_VERSION``, the
    version of the rules that turned (seed, index) into these parameters and permutations; another version gives
    other deformations at the same seed.
    """
    if config is None:
        config = DeformConfig()
    spatial = [int(s) for s in spatial_shape]
    if len(spatial) not in (2, 3) or min(spatial) < 1:
        raise ValueError(f"genesis_ext.sample_params: spatial_shape must be 2 or 3 positive lengths, got {spatial}")
    if int(batch) < 1:
        raise ValueError(f"genesis_ext.sample_params: batch must be >= 1, got {batch}")
    _check_seed(seed, offset, int(batch))
    params = _C.sample_params(int(batch), spatial, int(seed), int(offset), config.to_vector(), bool(with_blocks))
    params["index"] = np.arange(int(offset), int(offset) + int(batch), dtype=np.int64)
    params["stream_version"] = STREAM_VERSION
    return params
