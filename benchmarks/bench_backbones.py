"""The backbones side by side on this machine's CPU: parameters, a pre-training step's time and peak memory, and a
short learning check.

    python benchmarks/bench_backbones.py --out docs/results/backbones
    python benchmarks/render_backbones.py docs/results/backbones.csv

Per architecture (``genesis_ext.models.backbones``): its parameters with one input and one output channel; the time
of a pre-training step (``genesis_pair`` of a batch of 2 cubes, the network, MSE, backward, Adam) and the process's
peak resident memory, each cube size in a fresh process (``--steps`` timed steps after one untimed); and, for the
networks small enough for a CPU, a learning check: ``genesis-ext pretrain``'s default recipe for ``--train-steps``
steps on cubes of the bundled chest CT (``data/sample``), the final validation loss against the constant-mean
baseline of the same validation pairs (a ratio below 1: the network restores better than the mean). Writes
``OUT.csv`` (one row per architecture and cube; the learning check on the 64x64x32 row) and ``OUT.md`` (rendered).
A benchmark reports; it sets no threshold.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench_patches beside this file (pytest's importlib mode adds none)
from bench_patches import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
# (label, architecture, the cubes its step is timed at, whether the learning check runs on this CPU)
ARCHS = [
    ("unet3d", {"name": "unet3d", "kwargs": {}}, [(64, 64, 32)], False),
    ("unet3d --width 0.25", {"name": "unet3d", "kwargs": {"width": 0.25}}, [(64, 64, 32), (128, 128, 64)], True),
    ("resenc-l", {"name": "resenc-l", "kwargs": {}}, [(64, 64, 32)], False),
    ("resenc-s", {"name": "resenc-s", "kwargs": {}}, [(64, 64, 32), (128, 128, 64)], True),
    ("plain-s", {"name": "plain-s", "kwargs": {}}, [(64, 64, 32), (128, 128, 64)], True),
    ("segresnet", {"name": "segresnet", "kwargs": {}}, [(64, 64, 32), (128, 128, 64)], True),
]
FIELDS = ("arch", "name", "kwargs", "parameters", "cube", "batch", "threads", "step_s", "step_spread", "peak_mib",
          "train_steps", "val_loss", "mean_baseline", "ratio", "ratio_curve")  # fmt: skip

# One measurement in a fresh process: its peak RSS is that cube's alone.
_STEP = r"""
import json, resource, sys, time, torch
from genesis_ext import genesis_pair
from genesis_ext.models.backbones import backbone, build_backbone
arch, cube, batch, steps, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
net = build_backbone(arch, 1, 1, 3, sigmoid=backbone(arch).own_sigmoid)
opt = torch.optim.Adam(net.parameters(), 1e-3)
x = torch.rand(batch, 1, *cube)
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    deformed, target = genesis_pair(x, seed=1, offset=i * batch)
    loss = torch.nn.functional.mse_loss(net(deformed).float(), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"times": times[1:], "peak_mib": peak}))
"""


def parameters(arch: dict) -> int:
    import torch

    from genesis_ext.models.backbones import build_backbone

    with torch.device("meta"):
        return sum(p.numel() for p in build_backbone(arch, 1, 1, 3).parameters())


def step(arch: dict, cube, batch: int, steps: int, threads: int) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _STEP, json.dumps([arch, list(cube), batch, steps, threads])],
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(run.stdout.strip().splitlines()[-1])
    times = sorted(found["times"])
    median = times[len(times) // 2]
    return {"step_s": median, "step_spread": (times[-1] - times[0]) / 2 / median, "peak_mib": found["peak_mib"]}


def learning(arch: dict, train_steps: int, threads: int, work: Path) -> dict:
    """The default recipe's validation loss after ``train_steps`` steps, the constant-mean baseline, and the ratio of
    the two after each epoch of 50 steps (the curve, space-separated)."""
    from genesis_ext.train import PretrainConfig, pretrain

    width = arch["kwargs"].get("width", 1.0)
    plain = {"name": arch["name"], "kwargs": {k: v for k, v in arch["kwargs"].items() if k != "width"}}
    epochs = max(1, train_steps // 50)
    cfg = PretrainConfig(data=[str(SAMPLE)], out=str(work), arch=plain, width=width, batch_size=2, seed=0,
                         steps_per_epoch=train_steps // epochs, epochs=epochs, threads=threads, collapse_steps=0,
                         preview_every=0, tensorboard=False, progress=False, val_repeats=2)  # fmt: skip
    result = pretrain(cfg)
    val = float(result.history[-1]["val_loss"])
    mean = float(result.baselines["mean"])
    curve = " ".join(f"{float(row['val_loss']) / mean:.3f}" for row in result.history)
    return {"train_steps": epochs * (train_steps // epochs), "val_loss": val, "mean_baseline": mean,
            "ratio": val / mean, "ratio_curve": curve}  # fmt: skip


def run(out: Path, steps: int, train_steps: int, threads: int, only: list[str] | None) -> list[dict]:
    rows = []
    for label, arch, cubes, learns in ARCHS:
        if only and label not in only:
            continue
        n = parameters(arch)
        for k, cube in enumerate(cubes):
            row = {"arch": label, "name": arch["name"], "kwargs": json.dumps(arch["kwargs"]), "parameters": n,
                   "cube": "x".join(map(str, cube)), "batch": 2, "threads": threads}  # fmt: skip
            row |= step(arch, cube, 2, steps, threads)
            if learns and k == 0 and train_steps:
                with tempfile.TemporaryDirectory() as work:
                    row |= learning(arch, train_steps, threads, Path(work) / "run")
            print(json.dumps(row), flush=True)
            rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    meta = {**machine(), "steps": steps, "train_steps": train_steps, "threads": threads}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("build/backbones"), help="OUT.csv, OUT.json (default build/backbones)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per cube (default 3)")
    p.add_argument("--train-steps", type=int, default=400, help="learning check steps (default 400; 0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--only", nargs="+", metavar="ARCH", help="these rows' labels only")
    args = p.parse_args(argv)
    run(args.out, args.steps, args.train_steps, args.threads, args.only)


def test_smoke(tmp_path, monkeypatch):
    """Two small networks, one timed step each, a 4-step learning check: the CSV has their rows."""
    small = [
        (label, arch, [(32, 32, 16)], learns) for label, arch, _, learns in ARCHS if label in ("resenc-s", "plain-s")
    ]
    monkeypatch.setattr(sys.modules[__name__], "ARCHS", small)
    rows = run(tmp_path / "b", steps=1, train_steps=4, threads=1, only=None)
    assert [r["arch"] for r in rows] == ["resenc-s", "plain-s"]
    assert rows[0]["parameters"] > 1e6 and rows[0]["ratio"] > 0 and len(rows[0]["ratio_curve"].split()) == 1
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


if __name__ == "__main__":
    main()
