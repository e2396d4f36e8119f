"""The local shuffle and the pair's stages on the CPU, against an earlier release in the same run.

    python benchmarks/bench_shuffle.py --baseline DIR                       # build/shuffle_cpu.{csv,md}
    python benchmarks/render_shuffle.py docs/results/shuffle_cpu.csv       # the committed page, from its CSV

At 64x64x32 (batch 16), 128x128x64 (batch 4) and 160x160x160 (batch 2), with 1 and 2 threads
(``torch.set_num_threads``, which the ops pass to the kernels), the ms per cube of each stage of the published pair
as its single op (``local_shuffle``, ``bezier_remap``, ``inpaint``, ``outpaint``: applied to every sample; ``flip``:
its own draws, as in the pair), of ``genesis_pair`` itself (published rates, ``DeformConfig()``), and of two copies
of the same batch, the floor: ``copy_`` into a batch allocated once (``copy``) and ``clone`` into a new one
(``clone``, what every op pays to return its result).

Each (implementation, cube, threads) measurement runs in a fresh process, so the working tree's ``genesis_ext`` and
the baseline's (``--baseline``: a folder holding an earlier release's ``genesis_ext`` with its compiled ``_C``) never
share one; the implementations alternate within each of ``--rounds`` rounds (the first goes second in the next), so a
change of load hits both. In a process, each stage makes one untimed call, then cycles through the same ``--draws``
deformations (offsets batch, 2 batch, ...: the same for both implementations) until ``--min-time`` seconds have
passed; its figure is the mean time of those calls per cube. The page gives the median of the rounds and their
spread, and the new/baseline ratio as the median of the rounds' ratios (each round's two figures were measured one
after the other).

Cubes are cut at seeded random positions from the bundled chest CT (data/sample), resampled where a cube does not fit
it, as bench_patches.py does; every process of a size deforms the same float32 batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # bench_patches beside this file (pytest's importlib mode adds none)
from bench_patches import SEED, child_result, fitting_volumes, machine, write_csv  # noqa: E402
from render_shuffle import FIELDS, STAGES, markdown, read_rows  # noqa: E402
from results_page import write_or_check  # noqa: E402

PLAN = (((64, 64, 32), 16), ((128, 128, 64), 4), ((160, 160, 160), 2))  # (cube, batch): 0.1 to 0.6 s a pair call
COPIES = ("copy", "clone")  # the floor, after the ops (STAGES)


def pair_shares(genesis_ext, cube, batch: int, draws: int) -> dict[str, float]:
    """The share of the pair's timed samples (offsets batch .. batch * (draws + 1) - 1) each stage deforms, from their
    gates: at a batch of 2 it can be far from the gate's rate. The flip op draws its flips as the pair does, so all of
    its cost is the pair's."""
    p = genesis_ext.sample_params(batch * draws, cube, seed=SEED, offset=batch, with_blocks=False)
    paint, inpaint = p["paint"], p["paint"] & p["inpaint"]
    return {"flip": 1.0, "local_shuffle": p["local"].mean(), "bezier_remap": p["nonlinear"].mean(),
            "inpaint": inpaint.mean(), "outpaint": (paint & ~inpaint).mean()}  # fmt: skip


def import_from(folder: str) -> None:
    """Make ``import genesis_ext`` find the copy in ``folder``: the editable install's finder, first on the meta
    path, would otherwise answer with the working tree's."""
    sys.meta_path[:] = [f for f in sys.meta_path if "Redirecting" not in type(f).__name__]
    sys.path.insert(0, folder)


def timed(call, batch: int, draws: int, min_time: float) -> dict:
    """ms per cube of ``call(offset)``: one untimed call, then whole cycles of ``draws`` offsets until ``min_time``
    seconds have passed; the mean of those calls."""
    call(0)
    calls, total = 0, 0.0
    while total < min_time or calls == 0:
        for k in range(1, draws + 1):
            t0 = time.perf_counter()
            call(k * batch)
            total += time.perf_counter() - t0
            calls += 1
    return {"ms_per_cube": 1e3 * total / calls / batch, "calls": calls}


def child(args) -> int:
    """One (implementation, cube, threads) measurement in this fresh process: its result as JSON on stdout's last
    line."""
    if args.impl_path:
        import_from(args.impl_path)
    import torch

    import genesis_ext

    (threads,) = args.threads  # one count, the measurement's
    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(args.cubes))
    into = torch.empty_like(x)
    calls = {op: (lambda offset, f=getattr(genesis_ext, op): f(x, seed=SEED, offset=offset)) for op in STAGES}
    calls["copy"] = lambda offset: into.copy_(x)
    calls["clone"] = lambda offset: x.clone()
    stages = {name: timed(call, len(x), args.draws, args.min_time) for name, call in calls.items()}
    rates = {k: float(v) for k, v in pair_shares(genesis_ext, x.shape[2:], len(x), args.draws).items()}
    print(json.dumps({"module": genesis_ext.__file__, "version": genesis_ext.__version__, "rates": rates,
                      "stages": stages, "threads": torch.get_num_threads()}))  # fmt: skip
    return 0


def measure(impl: str, folder: Path | None, cubes: Path, threads: int, args) -> dict:
    """One child's result, checked to come from the implementation asked for."""
    options = {"cubes": cubes, "threads": threads, "draws": args.draws, "min-time": args.min_time}
    cmd = [sys.executable, __file__, "--child", *(f"--{k}={v}" for k, v in options.items())]
    cmd += [f"--impl-path={folder}"] if folder else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = child_result(cmd, env)
    module = Path(result["module"]).resolve()
    from_baseline = args.baseline is not None and module.is_relative_to(args.baseline.resolve())
    if from_baseline != (folder is not None) or result["threads"] != threads:
        raise RuntimeError(f"the {impl} measurement ran genesis_ext from {module} on {result['threads']} threads")
    return result


def run(args, command: str) -> list[dict]:
    from genesis_ext.data.sample import SAMPLE_DIR, SAMPLE_FILES, load_ct, random_cubes

    volumes = [load_ct(SAMPLE_DIR / f) for f in SAMPLE_FILES]
    impls = [("new", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    common = {**machine(), "command": command}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for cube, batch in args.cube:
                fitted, factor = fitting_volumes(volumes, cube)
                path = Path(tmp) / "cubes.npy"
                np.save(path, random_cubes(fitted, batch, np.random.default_rng(SEED), size=cube)[0])
                size = {"cube": "x".join(map(str, cube)), "batch": batch, "threads": threads,
                        "resample": f"{factor:.2f}", **common}  # fmt: skip
                for r in range(args.rounds):
                    for impl, folder in impls if r % 2 == 0 else impls[::-1]:
                        load_average = os.getloadavg()[0]  # as the measurement starts: others' jobs count too
                        result = measure(impl, folder, path, threads, args)
                        for stage, figures in result["stages"].items():
                            rows.append({**size, "impl": impl, "round": r, "stage": stage, **figures,
                                         "rate": result["rates"].get(stage, ""), "load": load_average,
                                         "version": result["version"], "module": result["module"]})  # fmt: skip
                        said = ", ".join(f"{s} {f['ms_per_cube']:.3g}" for s, f in result["stages"].items())
                        print(f"{size['cube']} x{batch}, {threads} threads, round {r}, {impl}: {said} ms/cube",
                              flush=True)  # fmt: skip
                        write_csv(rows, args.out.with_suffix(".csv"), FIELDS)  # so far: a cut run keeps its rows
    return rows


def cube_and_batch(text: str) -> tuple[tuple[int, ...], int]:
    """'160x160x160:2' -> ((160, 160, 160), 2); the batch defaults to 2."""
    size, _, batch = text.partition(":")
    return tuple(int(s) for s in size.split("x")), int(batch or 2)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("build/shuffle_cpu"), help="writes OUT.csv and OUT.md")
    p.add_argument("--baseline", type=Path, help="a folder holding an earlier release's genesis_ext, timed beside")
    p.add_argument("--rounds", type=int, default=5, help="measurements of each implementation, alternating")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cube", type=cube_and_batch, nargs="+", default=list(PLAN), help="XxYxZ:BATCH ...")
    p.add_argument("--draws", type=int, default=4, help="deformations each stage cycles through")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per stage, at least")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cubes", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--impl-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.baseline and not (args.baseline / "genesis_ext").is_dir():
        p.error(f"--baseline {args.baseline}: no genesis_ext package in it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(args, shlex.join(["python", "benchmarks/bench_shuffle.py", *argv]))
    write_csv(rows, args.out.with_suffix(".csv"), FIELDS)
    return write_or_check(args.out.with_suffix(".md"), markdown(read_rows(args.out.with_suffix(".csv"))), False)


if __name__ == "__main__":
    sys.exit(main())


def test_the_page_names_the_largest_stage_and_pairs_the_rounds():
    """Rendered from made-up rows: the ratio is the median of each round's own new / baseline (not of the medians),
    and the sentence names the stage whose rate-weighted time beyond the copy is largest at the largest cube."""
    ms = {"local_shuffle": 9.0, "bezier_remap": 4.0, "inpaint": 2.0, "outpaint": 2.0, "flip": 1.5,
          "genesis_pair": 8.0, "copy": 0.5, "clone": 1.0}  # fmt: skip
    rates = {"flip": 1.0, "local_shuffle": 0.5, "bezier_remap": 0.9, "inpaint": 0.18, "outpaint": 0.72}
    run = {"batch": 2, "resample": 1.0, "calls": 4, "version": "0", "module": "m", "machine": "CPU", "cores": 2,
           "date": "2026-01-01", "command": "python benchmarks/bench_shuffle.py"}  # fmt: skip
    rows = []
    for cube, scale in (("32x32x16", 1.0), ("64x64x64", 8.0)):
        for k, (new, old) in enumerate(((1.0, 2.0), (2.0, 2.5), (1.5, 5.0))):  # ratios 0.5, 0.8, 0.3
            for impl, load in (("new", new), ("baseline", old)):
                rows += [{**run, "impl": impl, "cube": cube, "threads": 1, "round": k, "stage": s, "load": 0.5,
                          "ms_per_cube": v * scale * (load if s == "genesis_pair" else 1.0),
                          "rate": rates.get(s)} for s, v in ms.items()]  # fmt: skip
    page = markdown(rows)
    # new 12 (8 to 16), baseline 20 (16 to 40): the ratio of the medians would be 0.60
    assert "| **pair** (`genesis_pair`) | 12.0 (±33 %) | 20.0 (±60 %) | 0.50 (0.30–0.80) |" in page
    # at 64x64x64, beyond the copy (8) x rate: shuffle 0.5 x 64 = 32, Bézier 0.9 x 24 = 21.6, the others less
    assert "the largest stage is the local shuffle: 32.0 ms per cube" in page
    assert "then the Bézier map (21.6 ms)" in page
