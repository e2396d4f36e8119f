"""Restoration MSE of a pre-training checkpoint on its run's held-out cubes, per painting branch, against the
identity and mean baselines: the table in docs/training.md.

    python benchmarks/eval_pretrain.py RUN_DIR [--checkpoint best|last|PATH] [--repeats 12] [--data PATH ...]

The held-out cubes are the run's own (its seed, ``val_fraction`` or ``val_data`` from ``RUN_DIR/config.json``; data
paths relative to the current directory unless ``--data`` is given). Each is deformed ``--repeats`` times, with
deformation seeds ``--seed`` .. ``--seed + repeats - 1`` (offsets = positions in the held-out list), so the pairs
differ from the run's own validation pairs and are the same for every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from genesis_ext import DeformConfig, sample_params
from genesis_ext.models import load_pretrained
from genesis_ext.train.pretraining import (
    BRANCHES,
    PretrainConfig,
    _dataset,
    _Split,
    branches,
    mean_baseline,
    pair_errors,
)


def held_out_cubes(run: Path, data=None) -> tuple[torch.Tensor, DeformConfig]:
    stored = json.loads((run / "config.json").read_text())
    cfg = PretrainConfig(
        data=data or stored["data"],
        out=run,
        seed=stored["seed"],
        val_fraction=stored["val_fraction"],
        val_data=None if data else stored["val_data"],
        cube=tuple(stored["cube"]),
        per_volume=stored["per_volume"],
    ).resolved()
    dataset = _dataset(cfg.data, cfg)
    if cfg.val_data is not None:
        val_dataset = _dataset(cfg.val_data, cfg)
        items = np.arange(len(val_dataset))
    else:
        val_dataset, items = dataset, _Split(len(dataset), cfg, False).val
    cubes = torch.stack([torch.as_tensor(np.asarray(val_dataset[int(i)])) for i in items]).float()
    return cubes, DeformConfig(**stored["deform"])


def evaluate(
    model: torch.nn.Module, cubes: torch.Tensor, deform: DeformConfig, repeats: int, seed: int, batch: int = 6
) -> dict:
    """Per-pair MSE of the model, of the identity output and of the targets' mean; and each pair's branch."""
    model.eval()
    runs = [
        pair_errors([cubes[i : i + batch] for i in range(0, len(cubes), batch)], seed + k, deform, model)
        for k in range(repeats)
    ]
    errors = {key: np.concatenate([r[key] for r in runs]) for key in ("model", "identity", "sum", "sumsq")}
    errors["voxels"] = runs[0]["voxels"]
    branch = [
        branches(sample_params(len(cubes), cubes.shape[2:], seed=seed + k, config=deform, with_blocks=False), seed + k)
        for k in range(repeats)
    ]
    return {
        "model": errors["model"],
        "identity": errors["identity"],
        "mean": mean_baseline(errors),
        "branch": np.concatenate(branch),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a pre-training run directory")
    p.add_argument("--checkpoint", default="best", help="best, last or a checkpoint path (default: best)")
    p.add_argument("--repeats", type=int, default=12, help="deformations per held-out cube (default 12)")
    p.add_argument("--seed", type=int, default=1000, help="first deformation seed (default 1000)")
    p.add_argument("--data", nargs="+", help="the run's data, if its recorded paths do not resolve from here")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = a.run / "checkpoints" / f"{a.checkpoint}.pt" if a.checkpoint in ("best", "last") else Path(a.checkpoint)
    cubes, deform = held_out_cubes(a.run, a.data)
    model = load_pretrained(None, ckpt)  # a UNet3D of the run's width, read off the checkpoint
    epoch = torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch")
    r = evaluate(model, cubes, deform, a.repeats, a.seed)
    print(f"{ckpt} (epoch {epoch}): {len(r['model'])} pairs ({len(cubes)} held-out cubes x {a.repeats} deformations)")
    for name in ("all", *BRANCHES):
        k = np.ones(len(r["branch"]), bool) if name == "all" else r["branch"] == name
        if k.any():
            m, i, c = (r[key][k].mean() for key in ("model", "identity", "mean"))
            print(f"  {name:9s} n={k.sum():4d}  model {m:.5f}  identity {i:.5f}  mean {c:.5f}  model/mean {m / c:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
