"""Collapse detection in pre-training ("the model only outputs a constant", issue 23): a run whose output is constant,
or whose validation loss stays at or above the constant-mean baseline for ``collapse_steps`` steps, says so once in
the log, in ``metrics.csv`` (``val_spread``, ``collapsed``), in curve.png's title and in its final summary; a resumed
run keeps an ongoing collapse; a run that learns is not reported.

Tiny runs on the real-CT cubes of ``conftest.cubes`` (16^3, width 0.25, batches of 2, one thread): seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_pretrain_config  # noqa: E402

from genesis_ext import DeformConfig  # noqa: E402
from genesis_ext.train import PretrainTrainer, read_csv  # noqa: E402
from genesis_ext.train.pretraining import COLLAPSE_SPREAD  # noqa: E402

WARNING = "WARNING: collapse since epoch"
TINY = dict(width=0.25, threads=1, steps_per_epoch=2)


def _pretrain_cli(*args) -> str:
    """``genesis-ext pretrain`` with ``args``; its stdout (it must succeed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "genesis_ext.cli", "pretrain", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _fit(cfg) -> PretrainTrainer:
    trainer = PretrainTrainer(cfg.resolved())
    trainer.fit()
    return trainer


def test_a_constant_output_is_reported_at_once_and_a_resumed_run_keeps_it(cubes, tmp_path):
    """SGD at lr 50 saturates the output to a constant (spread 0) from the first epoch. --collapse-steps 20 (10
    epochs) is longer than the run: only the spread can report it. The warning comes once, with what to try; the
    resumed run neither repeats it nor restarts the count (a run that forgot would warn again, "since epoch 4")."""
    run = tmp_path / "run"
    args = ["--data", cubes, "--out", run, "--batch-size", "2", "--steps-per-epoch", "2", "--val-fraction", "0.2"]
    args += ["--width", "0.25", "--preset", "official", "--lr", "50", "--collapse-steps", "20", "--threads", "1"]
    args += ["--quiet", "--no-tensorboard", "--preview-every", "0"]
    out = _pretrain_cli(*args, "--epochs", "3")
    warnings = [line for line in out.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1 and warnings[0].startswith(f"{WARNING} 1:"), out
    assert "output spread 0.000" in warnings[0] and "--preset default" in warnings[0] and "--filter" in warnings[0]
    assert "COLLAPSED since epoch 1" in out  # pretrain()'s summary line
    assert "collapsed since epoch 1" in out.splitlines()[-1]  # the CLI's last line, from PretrainResult
    rows = read_csv(run / "metrics.csv")
    assert [r["collapsed"] for r in rows] == [1, 1, 1]
    assert all(r["val_spread"] < COLLAPSE_SPREAD for r in rows)

    out = _pretrain_cli(*args, "--epochs", "4", "--resume")
    assert WARNING not in out and "collapsed since epoch 1" in out.splitlines()[-1], out
    assert [r["collapsed"] for r in read_csv(run / "metrics.csv")] == [1, 1, 1, 1]


def test_a_run_at_the_mean_baseline_is_reported_after_collapse_steps(cubes, tmp_path, capsys):
    """3 epochs of 2 Adam steps leave the validation loss far above the constant-mean baseline (about 4.5x) while the
    output still varies: the loss alone reports it, at the second epoch (collapse_steps=4: two epochs of 2
    steps), as since the first."""
    cfg = tiny_pretrain_config(cubes, tmp_path / "run", epochs=3, collapse_steps=4, **TINY)
    trainer = _fit(cfg)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert all(r["val_loss"] >= trainer.base["mean"] and r["val_spread"] > COLLAPSE_SPREAD for r in rows)
    assert [r["collapsed"] for r in rows] == [0, 1, 1]
    assert capsys.readouterr().out.count(f"{WARNING} 1:") == 1
    assert trainer.collapsed_since == 1 and "COLLAPSED since epoch 1" in trainer.title  # curve.png's title


def test_a_run_that_learns_is_not_reported(cubes, tmp_path, capsys):
    """Flips only (the identity restores them), 4 Adam steps per epoch at lr 3e-3: above the constant-mean baseline
    for 3 epochs, below it from the fourth (measured 0.0090 against 0.0122), so collapse_steps=16 (4 epochs) never
    reports it."""
    flips = dict(deform=DeformConfig.preset("none"), lr=3e-3, steps_per_epoch=4)
    cfg = tiny_pretrain_config(cubes, tmp_path / "run", epochs=5, collapse_steps=16, **(TINY | flips))
    trainer = _fit(cfg)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert rows[0]["val_loss"] >= trainer.base["mean"] > rows[-1]["val_loss"]  # it did start above the baseline
    assert [r["collapsed"] for r in rows] == [0] * 5
    assert all(r["val_spread"] > COLLAPSE_SPREAD for r in rows)
    assert "collapse" not in capsys.readouterr().out.lower()
    assert trainer.collapsed_since is None and "COLLAPSED" not in trainer.title


def test_a_collapse_holds_until_loss_and_spread_both_recover():
    """The rule on given numbers (baseline 1.0, collapse_steps=3 of one step per epoch): the loss stretch reports at
    its third epoch; a
    constant output keeps it on although the loss fell; it ends once both recover, and a constant output reports
    again at once. collapse_steps=0: no check."""
    lines = []
    watch = SimpleNamespace(
        cfg=SimpleNamespace(collapse_steps=3), steps=1, base={"mean": 1.0}, log=lines.append, stuck_since=None,
        collapsed_since=None,
    )  # fmt: skip
    epochs = [(2.0, 0.5), (2.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 0.5), (0.5, 0.001), (0.5, 0.5)]
    flags = [PretrainTrainer._watch_collapse(watch, e, *v) for e, v in enumerate(epochs, 1)]
    assert flags == [False, False, True, True, False, True, False]
    starts = [f"{WARNING} 1:", "collapse over at epoch 5:", f"{WARNING} 6:", "collapse over at epoch 7:"]
    assert len(lines) == len(starts) and all(line.startswith(s) for line, s in zip(lines, starts)), lines
    watch.cfg.collapse_steps, watch.stuck_since, watch.collapsed_since = 0, None, None
    assert not any(PretrainTrainer._watch_collapse(watch, e, 2.0, 0.0) for e in range(1, 5))
