"""Large patches on the CPU: genesis_pair and a pre-training step at 64x64x32, 128x128x64 and 160x160x160.

    python benchmarks/bench_patches.py --csv docs/results/patches_cpu.csv   # about 5 minutes on 2 cores
    python benchmarks/render_patches.py docs/results/patches_cpu.csv

Per cube size, each measurement in a fresh process (so its peak memory is its own):

- pair: one ``genesis_pair`` call on a batch of cubes (``--batch``), the median of ``--repeats`` calls after an untimed
  one, each with new deformations (offsets 0, batch, 2 batch, ...);
- step: pre-training steps of ``UNet3D`` at each width of PLAN on ``--step-batch`` cubes: ``genesis_pair``, then
  forward, MSE, backward and an Adam step, each part timed, the median of ``--step-repeats`` steps (the first
  included) after an untimed pair;
- memory: the process's resident set just before the timed calls (Python, torch, the cubes, after the untimed pair)
  and its peak during them, whose difference is what the calls add. On Linux the peak (VmHWM) is reset to the
  resident set before the timed calls (``/proc/self/clear_refs``), so what came before does not count; elsewhere both
  are ``ru_maxrss``, the peak so far, and the difference is a lower bound.

Also, without a GPU, the published shuffle rule's largest block at each size (sides ``S // block_div`` per axis) and
whether the CUDA kernels take that size: where ``genesis_ext._C_emu`` is built, the CUDA kernels themselves, run on the
CPU by HIP-CPU, make one pair of it after the timings (its worker threads would run beside them); elsewhere "not
checked". Since issue 25 they take blocks of any size (docs/randomness.md, local-shuffle permutations); the previous
release's kernels refused blocks of more than 1,024 voxels, the published rule's at 160x160x160 among them.

Cubes are cut at seeded random positions from the bundled chest CT (data/sample, two crops of about 120^3 voxels).
Where a cube does not fit, both volumes are first resampled (trilinear) by the smallest factor that fits it: larger
cubes see the same anatomy on a finer grid, never padding.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (cube, widths of the training step): the published width 1.0 only at 64x64x32; its step costs about 7x a width-0.25
# one here, which would be minutes per step at the larger sizes
PLAN = (((64, 64, 32), (0.25, 1.0)), ((128, 128, 64), (0.25,)), ((160, 160, 160), (0.25,)))
SEED = 2019
FIELDS = ("kind", "cube", "width", "batch", "repeats", "pair_ms", "train_ms", "base_mib", "peak_mib", "resample",
          "largest_block", "block_voxels", "cuda", "memory", "load", "threads", "machine", "cores", "date")  # fmt: skip


def largest_block(cube, block_div: int) -> tuple[int, ...]:
    """The largest shuffle block of the published rule: sides randint(1, S // block_div) per axis."""
    return tuple(max(1, s // block_div) for s in cube)


def emulated_cuda_takes(cube) -> bool:
    """Whether the CUDA kernels, run on the CPU by HIP-CPU, make a pair of one zero cube of this size with the
    published config (False where genesis_ext._C_emu is not built). A refusal raises: the kernels take blocks of any
    size since issue 25, so it means a stale build or a regression (a release with the block cap raised ValueError)."""
    from genesis_ext import DeformConfig, _emulated

    if _emulated.UNAVAILABLE:
        return False
    x = np.zeros((1, 1, *cube), np.float32)
    try:
        _emulated.deform("genesis_pair", x, seed=0, config=DeformConfig())
    except ValueError as e:
        raise RuntimeError(f"the emulated CUDA kernels refuse the published shuffle rule at {cube}: {e}") from e
    return True


def shuffle_rule(cube) -> dict:
    """The published rule's largest block at this size and whether the CUDA kernels take this size: "takes" where the
    emulated kernels made a pair of it, "not checked" where they are not built."""
    from genesis_ext import DeformConfig

    block = largest_block(cube, DeformConfig().block_div)
    return {"largest_block": "x".join(map(str, block)), "block_voxels": math.prod(block),
            "cuda": "takes" if emulated_cuda_takes(cube) else "not checked"}  # fmt: skip


def fitting_volumes(volumes: list[np.ndarray], cube) -> tuple[list[np.ndarray], float]:
    """The volumes, resampled (trilinear) by the smallest factor that fits ``cube`` in each, and the factor (1: as
    they are)."""
    import torch

    factor = max(1.0, *(c / s for v in volumes for s, c in zip(v.shape, cube)))
    if factor == 1.0:
        return volumes, factor
    resampled = []
    for v in volumes:
        size = tuple(max(c, math.ceil(s * factor)) for s, c in zip(v.shape, cube))
        t = torch.nn.functional.interpolate(torch.from_numpy(v)[None, None], size=size, mode="trilinear")
        resampled.append(t[0, 0].numpy())
    return resampled, factor


PROC = Path("/proc/self")


def _status_mib(field: str) -> float:
    return int(re.search(rf"^{field}:\s+(\d+) kB", (PROC / "status").read_text(), re.M).group(1)) / 2**10


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def start_peak() -> float:
    """The resident set now, to which the peak is reset (Linux); elsewhere the peak so far (ru_maxrss). MiB."""
    if not (PROC / "clear_refs").exists():
        return _maxrss_mib()
    (PROC / "clear_refs").write_text("5")  # 5: reset the peak resident set (VmHWM) to the current one
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """The peak resident set since start_peak. MiB."""
    return _status_mib("VmHWM") if (PROC / "clear_refs").exists() else _maxrss_mib()


def measure_pair(x, repeats: int) -> dict:
    import genesis_ext

    n, times = x.shape[0], []
    genesis_ext.genesis_pair(x, seed=1, offset=0)  # untimed: the first call pays a one-off set-up (time and memory)
    base = start_peak()
    for k in range(1, repeats + 1):
        t0 = time.perf_counter()
        genesis_ext.genesis_pair(x, seed=1, offset=k * n)
        times.append(time.perf_counter() - t0)
    return {"pair_ms": 1e3 * statistics.median(times), "base_mib": base, "peak_mib": peak_mib()}


def measure_step(x, width: float, repeats: int) -> dict:
    import torch

    import genesis_ext
    from genesis_ext.models import UNet3D

    n = x.shape[0]
    genesis_ext.genesis_pair(x, seed=1, offset=0)  # untimed: the first call pays a one-off set-up (time and memory)
    base = start_peak()
    torch.manual_seed(0)
    model = UNet3D(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pair, train = [], []
    for k in range(1, repeats + 1):
        t0 = time.perf_counter()
        xd, target = genesis_ext.genesis_pair(x, seed=1, offset=k * n)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(xd), target).backward()
        opt.step()
        pair.append(t1 - t0)
        train.append(time.perf_counter() - t1)
    return {"pair_ms": 1e3 * statistics.median(pair), "train_ms": 1e3 * statistics.median(train), "base_mib": base,
            "peak_mib": peak_mib()}  # fmt: skip


def child(args) -> int:
    """One measurement in this fresh process; its result as JSON on the last line of stdout."""
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "pair":
        result = measure_pair(torch.from_numpy(np.load(args.cubes)), args.repeats)
    else:
        x = torch.from_numpy(np.load(args.cubes)[: args.step_batch])
        result = measure_step(x, args.width, args.step_repeats)
    print(json.dumps(result))
    return 0


def in_fresh_process(kind: str, cubes: Path, args, width: float = 1.0) -> dict:
    options = {"child": kind, "cubes": cubes, "threads": args.threads, "repeats": args.repeats,
               "step-batch": args.step_batch, "step-repeats": args.step_repeats, "width": width}  # fmt: skip
    cmd = [sys.executable, __file__, *(f"--{k}={v}" for k, v in options.items())]
    load = os.getloadavg()[0]  # the machine's 1-minute load average as the measurement starts: others' jobs too
    return {"load": load, **child_result(cmd)}


def child_result(cmd: list[str], env: dict | None = None) -> dict:
    """Run a measurement's command in a fresh process; its result, the JSON on the last line of its stdout."""
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"the measurement {' '.join(map(str, cmd))} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def machine() -> dict:
    """The CPU's model name (Linux; else what platform says), the logical cores and today's date."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"machine": names[0] if names else platform.processor() or "unknown CPU", "cores": os.cpu_count(),
            "date": datetime.date.today().isoformat()}  # fmt: skip


def run(args) -> list[dict]:
    from genesis_ext.data.sample import SAMPLE_DIR, SAMPLE_FILES, load_ct, random_cubes

    volumes = [load_ct(SAMPLE_DIR / f) for f in SAMPLE_FILES]
    memory = "VmHWM" if (PROC / "clear_refs").exists() else "ru_maxrss"  # how start_peak and peak_mib measure
    common = {**machine(), "threads": args.threads, "memory": memory}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cube, widths in PLAN:
            fitted, factor = fitting_volumes(volumes, cube)
            batch, _ = random_cubes(fitted, max(args.batch, args.step_batch), np.random.default_rng(SEED), size=cube)
            path = Path(tmp) / "cubes.npy"
            np.save(path, batch)
            size = {"cube": "x".join(map(str, cube)), "resample": f"{factor:.2f}", **common}
            pair = {"kind": "pair", "batch": len(batch), "repeats": args.repeats, **size}
            rows.append({**pair, **in_fresh_process("pair", path, args)})
            print(rows[-1], flush=True)
            for width in widths:
                step = in_fresh_process("step", path, args, width)
                rows.append({"kind": "step", "width": width, "batch": args.step_batch, "repeats": args.step_repeats,
                             **size, **step})  # fmt: skip
                print(rows[-1], flush=True)
    # Last: HIP-CPU's worker threads outlive a kernel in this process, and would run beside a measurement.
    for r in rows:
        if r["kind"] == "pair":
            r.update(shuffle_rule(tuple(int(s) for s in r["cube"].split("x"))))
    return rows


def write_csv(rows: list[dict], path: Path, fields=FIELDS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=Path("patches_cpu.csv"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=4, help="cubes per timed pair call")
    p.add_argument("--repeats", type=int, default=7, help="timed pair calls")
    p.add_argument("--step-batch", type=int, default=1, help="cubes per training step")
    p.add_argument("--step-repeats", type=int, default=3, help="timed training steps")
    p.add_argument("--child", choices=("pair", "step"), help=argparse.SUPPRESS)
    p.add_argument("--cubes", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    write_csv(run(args), args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_the_published_shuffle_rule_gives_blocks_of_up_to_16_cubed_at_160_cubed():
    """At 160^3 the published rule (block_div 10) gives blocks of up to 16x16x16 = 4,096 voxels; at 64x64x32, 6x6x3."""
    from genesis_ext import DeformConfig

    assert DeformConfig().block_div == 10
    assert largest_block((160, 160, 160), 10) == (16, 16, 16) and largest_block((64, 64, 32), 10) == (6, 6, 3)


def test_the_emulated_cuda_kernels_take_the_published_rule_at_160_cubed():
    """The CUDA kernels, run on the CPU by HIP-CPU, make a pair of a 160^3 cube with the published config (blocks of
    up to 16x16x16). The previous release's refused it (ValueError: blocks of more than 1,024 voxels)."""
    import pytest

    from genesis_ext import _emulated

    if _emulated.UNAVAILABLE:
        pytest.skip(_emulated.UNAVAILABLE)
    rule = shuffle_rule((160, 160, 160))
    assert rule == {"largest_block": "16x16x16", "block_voxels": 4096, "cuda": "takes"}
