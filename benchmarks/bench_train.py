"""Training-step benchmark: genesis_pair on the training device + UNet3D forward/backward + optimiser step.

    python -m pytest benchmarks/bench_train.py -q --benchmark-only    # CPU: one step, 32x32x16 cubes, batch 2
    python benchmarks/bench_train.py                                  # CPU report (steps/s, cubes/s)
    python benchmarks/bench_train.py --device cuda --amp --channels-last --compile --cube 64 64 32 --batch 6
                                                                      # GPU report, with the numpy-reference baseline

The report prints steps/s, cubes/s and the share of step time spent making training pairs, for (a) genesis_pair on
the device and (b) a baseline that feeds the same model from the numpy reference generator
(``genesis_ext.reference.genesis_pair_batch`` on the host, then a copy to the device). Inputs: real CT cubes cut
from the bundled data/sample volumes (``genesis_ext.data.sample.random_cubes``). Each phase is timed between device
synchronisations, so the shares add up; ``--steps`` timed steps follow ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

try:
    import pytest
except ImportError:  # the script runs without pytest
    pytest = None


def _cubes(n, cube, seed=2019):
    from genesis_ext.data.sample import SAMPLE_DIR, SAMPLE_FILES, load_ct, random_cubes

    paths = [SAMPLE_DIR / f for f in SAMPLE_FILES]
    batch, _ = random_cubes([load_ct(p) for p in paths], n, np.random.default_rng(seed), size=tuple(cube))
    return batch


def _setup(device, cube, batch, amp, channels_last, compile_):
    import torch

    from genesis_ext.models import UNet3D

    torch.manual_seed(0)
    model = UNet3D().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fwd = torch.compile(model) if compile_ else model
    pool = torch.from_numpy(_cubes(4 * batch, cube))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(k, reference=False):
        """One training step on batch k; returns (seconds making pairs, seconds of the whole step)."""
        import genesis_ext
        from genesis_ext import reference as ref

        x = pool[(k % 4) * batch : (k % 4 + 1) * batch]
        sync()
        t0 = time.perf_counter()
        if reference:
            xd, target = (
                torch.from_numpy(a).to(device, non_blocking=True)
                for a in ref.genesis_pair_batch(x.numpy(), 1, k * batch)
            )
        else:
            xd, target = genesis_ext.genesis_pair(x.to(device, non_blocking=True), seed=1, offset=k * batch)
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last_3d)
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fwd(xd)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        sync()
        return t1 - t0, time.perf_counter() - t0

    return step


def measure(
    device="cpu",
    cube=(32, 32, 16),
    batch=2,
    steps=3,
    warmup=1,
    amp=False,
    channels_last=False,
    compile_=False,
    reference=True,
) -> dict:
    import torch

    device = torch.device(device)
    step = _setup(device, cube, batch, amp, channels_last, compile_)
    result = {
        "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "threads": torch.get_num_threads(),
        "cube": list(cube),
        "batch": batch,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile_,
    }
    for name, use_ref in (
        (("genesis_pair", False), ("numpy_reference", True)) if reference else (("genesis_pair", False),)
    ):
        for k in range(warmup):
            step(k, use_ref)
        times = [step(warmup + k, use_ref) for k in range(steps)]
        pair, total = (sum(t[i] for t in times) for i in (0, 1))
        result[name] = {
            "steps_per_s": steps / total,
            "cubes_per_s": steps * batch / total,
            "pair_share": pair / total,
            "ms_per_step": 1e3 * total / steps,
        }
    return result


if pytest is not None:

    def test_train_step_cpu(benchmark):
        import torch

        step = _setup(torch.device("cpu"), (32, 32, 16), 2, False, False, False)
        step(0)
        counter = iter(range(1, 10**6))
        benchmark.pedantic(lambda: step(next(counter)), rounds=3, iterations=1)
        if benchmark.stats is not None:
            mean = benchmark.stats.stats.mean
            benchmark.extra_info.update(steps_per_s=1 / mean, cubes_per_s=2 / mean)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cube", nargs=3, type=int, default=[32, 32, 16])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the numpy-reference baseline")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    r = measure(
        a.device, tuple(a.cube), a.batch, a.steps, a.warmup, a.amp, a.channels_last, a.compile, not a.no_reference
    )
    print(
        f"{r['device']} ({r['threads']} threads), cube {'x'.join(map(str, r['cube']))}, batch {r['batch']}, "
        f"amp {r['amp']}, channels_last {r['channels_last']}, compile {r['compile']}"
    )
    for name in ("genesis_pair", "numpy_reference"):
        if name in r:
            m = r[name]
            print(
                f"  {name:16s} {m['steps_per_s']:8.3f} steps/s  {m['cubes_per_s']:8.2f} cubes/s  "
                f"{m['ms_per_step']:9.1f} ms/step  pairs {100 * m['pair_share']:5.1f}% of the step"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
