"""GPU benchmark: each op and the fused pair on the CUDA kernels, against a device-to-device copy, the CPU kernels
and the numpy reference.

    python benchmarks/gpu_bench.py [--batches 16 64 256] [--reps 50] [--json out.json] [--markdown out.md]

Per op and batch size N of (N, 1, 64, 64, 32) float32 cubes:
- device time: CUDA events around every call, median over --reps calls after --warmup calls. The host enqueues the
  timed calls while the GPU is held by a sleep kernel, so launch overhead cannot leave the GPU idle between calls
  (the sleep is lengthened until it outlasts the enqueueing). "host us/call" is that enqueue time per call: what a
  call costs the CPU, and the floor of the per-call time when the GPU is faster.
- inputs rotate over enough distinct batches to total >= --l2-multiple x the GPU's L2 cache, and the last outputs are
  kept alive just as long, so outputs rotate too: every call reads and writes DRAM, not L2.
- GB/s counts each input byte read once and each output byte written once (the pair writes two outputs). The copy
  baseline, `dst.copy_(src)` over the same number of bytes read + written, with the same rotation, is measured in the
  same run; "of copy" is the op's bandwidth over the copy's.
- every op's GPU result is compared bit for bit with the CPU kernel on the same batch (the script exits 1 if not).
Baselines: the CPU kernel (torch CPU tensor, batch --cpu-batch, all usable cores) and the numpy reference
(genesis_ext.reference, one cube per call, mean over --ref-cubes cubes; single ops from the kernels' sample_params,
as benchmarks/bench_ops.py).
Target: genesis_pair at batch >= 64 reaches >= 70 % of the copy bandwidth.
Input: cubes cut from the bundled chest CT (data/sample; needs nibabel), else uniform random values (--data).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import genesis_ext
from genesis_ext import reference
from genesis_ext.data.cubes import PUBLISHED_CUBE

OPS = ("genesis_pair", "bezier_remap", "local_shuffle", "inpaint", "outpaint", "flip")
CUBE_BYTES = 4 * math.prod(PUBLISHED_CUBE)
N_CUBES = 16  # distinct CT cubes; batches cycle through them
SEED = 2019
TARGET = 0.70  # genesis_pair at batch >= TARGET_BATCH: fraction of the copy bandwidth
TARGET_BATCH = 64
SLEEP_CYCLES = 1 << 24  # initial length of the sleep that holds the GPU while the host enqueues (~10 ms)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="GPU batch sizes")
    p.add_argument("--reps", type=int, default=50, help="timed calls per (op, batch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--l2-multiple", type=float, default=4.0, help="rotating inputs total this many x the L2 size")
    p.add_argument("--cpu-batch", type=int, default=16, help="batch of the CPU-kernel baseline (0: skip it)")
    p.add_argument("--cpu-reps", type=int, default=5)
    p.add_argument("--ref-cubes", type=int, default=N_CUBES, help="cubes timed on the numpy reference per op (0: skip)")
    p.add_argument("--data", choices=("ct", "random"), default="ct", help="ct falls back to random without nibabel")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--json", help="write all figures to this JSON file")
    p.add_argument("--markdown", help="write the tables to this markdown file")
    return p.parse_args(argv)


def load_cubes(kind: str) -> tuple[np.ndarray, str]:
    """(N_CUBES, 1, 64, 64, 32) float32 in [0, 1] and a description."""
    if kind == "ct":
        try:
            from genesis_ext.data.sample import SAMPLE_DIR, SAMPLE_FILES, load_ct, random_cubes

            paths = [SAMPLE_DIR / f for f in SAMPLE_FILES]
            if all(p.is_file() for p in paths):
                batch, _ = random_cubes([load_ct(p) for p in paths], N_CUBES, np.random.default_rng(SEED))
                return batch, f"{N_CUBES} chest-CT cubes from data/sample, cycled"
            why = f"no CT in {SAMPLE_DIR}"
        except ImportError as e:
            why = f"cannot load CT ({e})"
        print(f"note: {why}; using uniform random cubes", file=sys.stderr)
    cubes = np.random.default_rng(SEED).random((N_CUBES, 1, *PUBLISHED_CUBE), dtype=np.float32)
    return cubes, f"{N_CUBES} uniform random cubes, cycled"


def n_outputs(op: str) -> int:
    return 2 if op == "genesis_pair" else 1


def outputs(result):
    return result if isinstance(result, tuple) else (result,)


def time_device(call, reps: int, warmup: int, keep: int, dev) -> tuple[float, float]:
    """(median device ms per call, host us per call) of call(r) for r = 0 .. reps-1. The last `keep` results stay
    alive, so the allocator hands out `keep` rotating output blocks."""
    alive = collections.deque(maxlen=keep)
    for r in range(warmup):
        alive.append(call(r))
    torch.cuda.synchronize(dev)
    cycles = SLEEP_CYCLES
    while True:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        slept = torch.cuda.Event()
        torch.cuda._sleep(cycles)
        slept.record()
        t0 = time.perf_counter()
        for r in range(reps):
            starts[r].record()
            alive.append(call(r))
            ends[r].record()
        host = (time.perf_counter() - t0) / reps
        starved = slept.query()  # the sleep ended before the host had enqueued every call
        torch.cuda.synchronize(dev)
        if not starved or cycles >= 1 << 32:
            break
        cycles *= 4
    if starved:
        print("warning: the host could not enqueue ahead of the GPU; device times include idle gaps", file=sys.stderr)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), host * 1e6


def copy_ms(traffic: int, args, dev, l2_bytes: int) -> float:
    """Median device ms of dst.copy_(src) moving `traffic` bytes (traffic / 2 read, traffic / 2 written), sources
    rotating over >= l2_multiple x L2, destinations freshly allocated like the ops' outputs."""
    n = max(2, math.ceil(args.l2_multiple * l2_bytes / (traffic // 2)))
    srcs = [torch.rand(traffic // 8, device=dev) for _ in range(n)]
    ms, _ = time_device(lambda r: torch.empty_like(srcs[r % n]).copy_(srcs[r % n]), args.reps, args.warmup, n, dev)
    return ms


def batch_rows(batch: int, args, cubes_d, dev, l2_bytes: int) -> list[dict]:
    batch_bytes = batch * CUBE_BYTES
    pool_n = max(2, math.ceil(args.l2_multiple * l2_bytes / batch_bytes))
    pool = [cubes_d[torch.arange(j * batch, (j + 1) * batch, device=dev) % N_CUBES].contiguous() for j in range(pool_n)]
    copies, rows = {}, []
    for op in OPS:
        fn = getattr(genesis_ext, op)
        traffic = batch_bytes * (1 + n_outputs(op))
        if traffic not in copies:
            copies[traffic] = copy_ms(traffic, args, dev, l2_bytes)
        ms, host_us = time_device(
            lambda r: fn(pool[r % pool_n], seed=SEED, offset=r * batch), args.reps, args.warmup, pool_n, dev
        )
        got = outputs(fn(pool[0], seed=SEED, offset=0))
        want = outputs(fn(pool[0].cpu(), seed=SEED, offset=0))
        equal = all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
        gbps, copy_gbps = traffic / ms / 1e6, traffic / copies[traffic] / 1e6
        rows.append(
            dict(
                op=op,
                batch=batch,
                device_ms=ms,
                host_us=host_us,
                cubes_per_s=batch / ms * 1e3,
                gb_per_s=gbps,
                copy_gb_per_s=copy_gbps,
                of_copy=gbps / copy_gbps,
                bytes=traffic,
                pool=pool_n,
                cpu_equal=equal,
            )
        )
        print(
            f"  {op:14s} batch {batch:4d}: {ms:8.4f} ms  {gbps:7.1f} GB/s  copy {copy_gbps:7.1f} GB/s  "
            f"{gbps / copy_gbps:6.1%}  host {host_us:6.1f} us  cpu==cuda {equal}",
            file=sys.stderr,
        )
    return rows


def gpu_rows(args, cubes: np.ndarray, dev, l2_bytes: int) -> list[dict]:
    cubes_d = torch.from_numpy(cubes).to(dev)
    rows = []
    for batch in args.batches:
        rows += batch_rows(batch, args, cubes_d, dev, l2_bytes)
        torch.cuda.empty_cache()  # this batch's pool and outputs are freed: give the memory back to the device
    return rows


def cpu_rows(args, cubes: np.ndarray) -> list[dict]:
    threads = len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        x = torch.from_numpy(cubes[np.arange(args.cpu_batch) % N_CUBES])
        for op in OPS:
            fn = getattr(genesis_ext, op)
            fn(x, seed=SEED)
            times = []
            for r in range(args.cpu_reps):
                t0 = time.perf_counter()
                fn(x, seed=SEED, offset=r * args.cpu_batch)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            rows.append(
                dict(
                    op=op,
                    impl="CPU kernel",
                    batch=args.cpu_batch,
                    threads=threads,
                    ms_per_cube=ms / args.cpu_batch,
                    cubes_per_s=args.cpu_batch / ms * 1e3,
                )
            )
    finally:
        torch.set_num_threads(previous)
    return rows


def reference_op(op: str, x: np.ndarray, k: int, params: dict):
    """The numpy reference of `op` on cube x (1, 1, X, Y, Z) with global index k (as benchmarks/bench_ops.py)."""
    if op == "genesis_pair":
        return reference.genesis_pair_batch(x, SEED, offset=k)
    s = x[0]
    if op == "bezier_remap":
        return reference.bezier_map(s, params["bezier"][k], params["increasing"][k]).astype(np.float32)
    if op == "local_shuffle":
        blocks = params["blocks"][k]
        return reference.local_shuffle(s, blocks, reference.block_permutations(SEED, k, blocks))
    if op == "inpaint":
        return reference.inpaint(s, params["holes"][k], params["n_holes"][k], reference.noise(SEED, k, s.shape))
    if op == "outpaint":
        return reference.outpaint(s, params["windows"][k], params["n_windows"][k], reference.noise(SEED, k, s.shape))
    return reference.flip(s, params["flip"][k])


def reference_rows(args, cubes: np.ndarray) -> list[dict]:
    n = args.ref_cubes
    params = genesis_ext.sample_params(n, PUBLISHED_CUBE, seed=SEED)
    rows = []
    for op in OPS:
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            reference_op(op, cubes[k % N_CUBES][None], k, params)
            times.append(time.perf_counter() - t0)
        ms = statistics.fmean(times) * 1e3  # a mean: the cost depends on which deformations fire on a cube
        rows.append(dict(op=op, impl="numpy reference", batch=1, threads=1, ms_per_cube=ms, cubes_per_s=1e3 / ms))
    return rows


def markdown(meta: dict, gpu: list[dict], baselines: list[dict], target: list[dict]) -> str:
    lines = [
        f"## genesis_ext GPU benchmark: {meta['device']}",
        "",
        f"- {meta['device_details']}; torch {meta['torch']} (CUDA {meta['torch_cuda']}); Python {meta['python']}",
        f"- build_info: {meta['build_info']}",
        f"- input: {meta['data']}; float32 (N, 1, 64, 64, 32); seed {SEED}, offset r*N on call r",
        f"- device time: median of {meta['reps']} calls (CUDA events, host enqueues ahead), {meta['warmup']} "
        f"warm-up; inputs and outputs rotate over >= {meta['l2_multiple']:g} x L2 "
        f"({meta['l2_bytes'] / 2**20:.0f} MiB)",
        "- GB/s: input read once + outputs written once; copy: `dst.copy_(src)` of the same bytes, same rotation",
        "",
        "| op | batch | device ms/call | host us/call | cubes/s | GB/s | copy GB/s | of copy | CPU == CUDA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in gpu:
        lines.append(
            f"| {r['op']} | {r['batch']} | {r['device_ms']:.4f} | {r['host_us']:.1f} | "
            f"{r['cubes_per_s']:,.0f} | {r['gb_per_s']:.0f} | {r['copy_gb_per_s']:.0f} | "
            f"{r['of_copy']:.0%} | {'yes' if r['cpu_equal'] else '**NO**'} |"
        )
    if baselines:
        best = {op: max(r["cubes_per_s"] for r in gpu if r["op"] == op) for op in OPS}
        lines += [
            "",
            "| op | impl | batch | threads | ms/cube | cubes/s | GPU (best batch) speed-up |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in baselines:
            lines.append(
                f"| {r['op']} | {r['impl']} | {r['batch']} | {r['threads']} | {r['ms_per_cube']:.3f} | "
                f"{r['cubes_per_s']:,.1f} | {best[r['op']] / r['cubes_per_s']:,.0f}x |"
            )
    lines += [""]
    for t in target:
        lines.append(
            f"- **Target** genesis_pair batch {t['batch']}: {t['of_copy']:.0%} of the copy bandwidth "
            f"(target >= {TARGET:.0%}): **{'met' if t['met'] else 'MISSED'}**"
        )
    if not target:
        lines.append(f"- **Target** not evaluated: no batch >= {TARGET_BATCH} in --batches")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    info = genesis_ext.build_info()
    if not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device", file=sys.stderr)
        return 2
    if not info["with_cuda"] or info["cuda_devices"] < 1:
        print(f"gpu_bench: genesis_ext has no usable CUDA kernels: {info}", file=sys.stderr)
        return 2
    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    props = torch.cuda.get_device_properties(dev)
    l2_bytes = int(getattr(props, "L2_cache_size", 0)) or 50 * 2**20  # H100: 50 MiB
    cubes, data = load_cubes(args.data)
    meta = dict(
        device=torch.cuda.get_device_name(dev),
        device_details=f"cc {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB, L2 {l2_bytes / 2**20:.0f} MiB",
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        python=platform.python_version(),
        build_info=info,
        data=data,
        reps=args.reps,
        warmup=args.warmup,
        l2_multiple=args.l2_multiple,
        l2_bytes=l2_bytes,
        cpu_threads=len(os.sched_getaffinity(0)),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    print(f"device: {meta['device']} ({meta['device_details']})\nbuild_info: {info}", file=sys.stderr)

    gpu = gpu_rows(args, cubes, dev, l2_bytes)
    baselines = (cpu_rows(args, cubes) if args.cpu_batch > 0 else []) + (
        reference_rows(args, cubes) if args.ref_cubes > 0 else []
    )
    target = [
        dict(batch=r["batch"], of_copy=r["of_copy"], met=r["of_copy"] >= TARGET)
        for r in gpu
        if r["op"] == "genesis_pair" and r["batch"] >= TARGET_BATCH
    ]
    table = markdown(meta, gpu, baselines, target)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, gpu=gpu, baselines=baselines, target=target), f, indent=1)
    mismatched = [(r["op"], r["batch"]) for r in gpu if not r["cpu_equal"]]
    if mismatched:
        print(f"gpu_bench: CUDA results differ from the CPU kernel for {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
