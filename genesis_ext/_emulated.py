"""The CUDA kernels of csrc/cuda executed on the CPU by HIP-CPU (module ``_C_emu``): the route the tests take to run
them without a GPU. Private, not part of the API. Built only when CMake is given ``GENESIS_HIP_CPU`` (CI does; users'
wheels do not). docs/emulation.md says what this proves and what it cannot.

Each call validates like the public ops, runs ``deform_cuda`` on host memory and waits for it. Outputs and scratch
start poisoned and sit between guard zones, so an unwritten voxel shows as a difference from the CPU kernel and a
write outside a buffer (or into the input) raises here.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .config import DeformConfig

try:
    from . import _C_emu
except ImportError as e:
    _C_emu = None
    UNAVAILABLE = (
        f"genesis_ext._C_emu is not built ({e}); build it with libtbb-dev installed and "
        "-Ccmake.define.GENESIS_HIP_CPU=<HIP-CPU folder>, e.g. ../shared/third_party/hip-cpu"
    )
else:
    UNAVAILABLE = None

_GUARD = 4096  # bytes on each side of every buffer
_POISON = 0xA5  # float32 0xA5A5A5A5 = -2.87e-16: no kernel output


class _Fenced:
    """nbytes of host memory between two guard zones, every byte _POISON."""

    def __init__(self, nbytes: int):
        self.raw = np.full(nbytes + 2 * _GUARD, _POISON, dtype=np.uint8)
        self.body = self.raw[_GUARD : _GUARD + nbytes]
        self.ptr = self.body.ctypes.data

    def check(self, what: str) -> None:
        for side, zone in (("before", self.raw[:_GUARD]), ("after", self.raw[_GUARD + self.body.size :])):
            bad = np.flatnonzero(zone != _POISON)
            if bad.size:
                raise AssertionError(f"{what}: {bad.size} bytes written {side} the buffer (of {self.body.size} bytes)")


def _core():
    if _C_emu is None:
        raise RuntimeError(UNAVAILABLE)
    return _C_emu


def deform(
    op: str,
    x: np.ndarray,
    *,
    seed: int,
    offset: int = 0,
    config: DeformConfig | None = None,
    spatial_dims: int | None = None,
):
    """``genesis_ext.<op>(x, seed=, offset=, config=)`` computed by the CUDA kernels under HIP-CPU: numpy float32 in,
    numpy out (``(x_deformed, target)`` for ``genesis_pair``)."""
    core = _core()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"genesis_ext._emulated.deform takes numpy arrays, got {type(x).__name__}")
    config = ops._validate(op, x, seed, offset, config, spatial_dims)
    x = np.ascontiguousarray(x)
    vec = config.to_vector()
    outs = [_Fenced(x.nbytes) for _ in range(2 if op == "genesis_pair" else 1)]
    scratch_size = ops._scratch_bytes(op, x.shape, vec, core=core)
    scratch = _Fenced(scratch_size)
    before = x.copy()
    ops._kernel(
        op,
        x.ctypes.data,
        outs[0].ptr,
        outs[1].ptr if len(outs) > 1 else 0,
        x.shape,
        int(seed),
        int(offset),
        vec,
        (scratch.ptr, scratch_size, 0, 0),
        core=core,
    )
    core.cuda_synchronize(0)
    for k, buf in enumerate(outs):
        buf.check(f"{op}: output {k}")
    scratch.check(f"{op}: scratch")
    if not np.array_equal(x.view(np.uint32), before.view(np.uint32)):
        raise AssertionError(f"{op}: the kernel modified its input")
    results = tuple(buf.body.view(np.float32).reshape(x.shape) for buf in outs)
    return results if len(results) > 1 else results[0]


def philox(ctr: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of n counters (n, 4) and keys (n, 2), uint32, by the CUDA known-answer kernel under HIP-CPU."""
    core = _core()
    ctr = np.ascontiguousarray(ctr, dtype=np.uint32)
    key = np.ascontiguousarray(key, dtype=np.uint32)
    n = ctr.shape[0]
    if ctr.shape != (n, 4) or key.shape != (n, 2):
        raise ValueError(f"expected counters (n, 4) and keys (n, 2), got {ctr.shape} and {key.shape}")
    out = _Fenced(16 * n)
    core.cuda_philox4x32_10(ctr.ctypes.data, key.ctypes.data, out.ptr, n, 0, 0)
    core.cuda_synchronize(0)
    out.check("philox")
    return out.body.view(np.uint32).reshape(n, 4).copy()
