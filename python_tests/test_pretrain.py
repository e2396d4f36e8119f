"""Pre-training (genesis_ext.train, ``genesis-ext pretrain``) on tiny real-CT cubes: logs and checkpoints, exact
resume after SIGKILL, DDP (2 gloo processes, on one node or as two nodes) == one process with the same micro-batches,
and bad inputs.

Cubes are 16x16x16 (the smallest size the default DeformConfig and the U-Net both accept), batches of 2, a few steps:
the U-Net at full width costs ~0.6 s per step on one CPU thread at this size."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_pretrain_config  # noqa: E402
from test_models import flip_bit, offset_of  # noqa: E402

from genesis_ext import DeformConfig  # noqa: E402
from genesis_ext.data import ExtractSettings, Foreground, run_extract  # noqa: E402
from genesis_ext.models import CheckpointError, UNet3D, load_pretrained, save_checkpoint  # noqa: E402
from genesis_ext.models.backbones import build_backbone  # noqa: E402
from genesis_ext.models.weights import atomic_save, seal  # noqa: E402
from genesis_ext.streams import STREAM_VERSION  # noqa: E402
from genesis_ext.train import NonFiniteLossError, PretrainConfig, load_training_state, pretrain, read_csv  # noqa: E402
from genesis_ext.train.pretraining import _epoch_positions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
CUBE = (16, 16, 16)
# A tiny run: 3 epochs of 2 steps of batch 2, one thread, no progress bars.
TINY = [
    "--batch-size",
    "2",
    "--steps-per-epoch",
    "2",
    "--epochs",
    "3",
    "--threads",
    "1",
    "--quiet",
    "--val-fraction",
    "0.2",
]


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "genesis_ext.cli", "pretrain", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _run_cli(args, timeout=240):
    p = _cli(args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _losses(run: Path):
    return [
        (r["epoch"], r["step"], r["samples"], r["lr"], r["train_loss"], r["val_loss"], r["best_val"], r["bad_epochs"])
        for r in read_csv(run / "metrics.csv")
    ]


@pytest.fixture(scope="module")
def uninterrupted(cubes, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    rc, out, err = _run_cli(["--data", cubes, "--out", run, *TINY])
    assert rc == 0, err
    return run


def test_epoch_order_is_a_function_of_seed_and_epoch():
    train = np.arange(10, 30)
    a = _epoch_positions(train, 0, 3, 50)
    assert np.array_equal(a, _epoch_positions(train, 0, 3, 50))
    assert not np.array_equal(a, _epoch_positions(train, 0, 4, 50))
    assert sorted(a[:20]) == list(train)  # each pass over the data is a permutation


@pytest.mark.slow
def test_run_writes_logs_checkpoints_and_previews(uninterrupted):
    run = uninterrupted
    rows = read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    for name in (
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "preview.png",
        "previews/epoch_0003.png",
        "curve.png",
        "config.json",
        "baselines.json",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    state = load_training_state(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["sample_offset"] == 3 * 2 * 2
    assert state["best_val"] == min(r["val_loss"] for r in rows)
    load_pretrained(UNet3D(), run / "checkpoints" / "best.pt")  # the weights load like published ones
    import json

    base = json.loads((run / "baselines.json").read_text())
    assert base["identity"] > base["mean"] > 0
    assert min(r["val_loss"] for r in rows) < base["identity"]  # a sanity check only: even untrained weights beat it
    # the per-branch losses split the total by the painting branch of each fixed validation pair
    from genesis_ext import sample_params
    from genesis_ext.train.pretraining import BRANCHES, branches

    branch = branches(sample_params(4, CUBE, seed=2, with_blocks=False), 2)
    counts = {b: int((branch == b).sum()) for b in BRANCHES}
    assert sum(counts.values()) == 4 and max(counts.values()) < 4  # 4 validation cubes, more than one branch

    def combined(parts: dict, prefix: str) -> float:
        for b in BRANCHES:
            assert (parts[f"{prefix}_{b}"] is None) == (counts[b] == 0)
        return sum(counts[b] * parts[f"{prefix}_{b}"] for b in BRANCHES if counts[b]) / 4

    for r in rows:
        assert combined(r, "val") == pytest.approx(r["val_loss"], rel=1e-6)
    for prefix in ("identity", "mean"):
        assert combined(base, prefix) == pytest.approx(base[prefix], rel=1e-9)


def test_val_repeats_deforms_each_held_out_cube_repeatedly_with_consecutive_offsets(cubes, tmp_path):
    import json

    from genesis_ext import genesis_pair
    from genesis_ext.data import CubeStoreDataset
    from genesis_ext.train.pretraining import _Split

    cfg = _cfg(cubes, tmp_path / "run", val_repeats=3)
    pretrain(cfg)
    ds = CubeStoreDataset([str(cubes)])
    val = _Split(len(ds), cfg.resolved(), False).val
    x = torch.stack([torch.as_tensor(np.asarray(ds[int(i)])) for i in val]).float()
    xd, target = genesis_pair(x.repeat(3, 1, 1, 1, 1), seed=cfg.val_seed, offset=0)  # pair j: offset j
    base = json.loads((tmp_path / "run" / "baselines.json").read_text())
    assert base["identity"] == pytest.approx(float(((xd - target) ** 2).mean()), rel=1e-6)


# The CLI run, killed with SIGKILL at a known point: the second step of the third epoch (epoch 2's checkpoint is on
# disk, epoch 3 is half done). A Trainer subclass kills its own process there, so no timing is involved.
_KILLED_RUN = """
import os, signal, sys
import genesis_ext.train.pretraining as P
from genesis_ext.cli import main

class KillAt(P.PretrainTrainer):
    def make_batch(self, batch, epoch, step):
        if (epoch, step) == (2, 1):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().make_batch(batch, epoch, step)

P.PretrainTrainer = KillAt
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_validation_is_fixed_and_resume_after_sigkill_reproduces_losses(cubes, uninterrupted, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--data", cubes, "--out", run, *TINY]
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, *map(str, args)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_training_state(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_csv(run / "metrics.csv")] == [1, 2]
    rc, out, err = _run_cli([*args, "--resume"])
    assert rc == 0, err
    assert "resumed after epoch 2" in out + err
    assert _losses(run) == _losses(uninterrupted)  # exact equality: same bits on CPU with fixed threads


def _ddp_args(cubes) -> list[str]:
    """The run every DDP test launches: 2 epochs of 2 global batches of 2, one micro-batch of 1 per process."""
    return ["--data", str(cubes), *TINY, "--epochs", "2", "--preview-every", "0", "--no-tensorboard"]


@pytest.fixture(scope="module")
def accumulate_2(cubes, tmp_path_factory) -> Path:
    """One process with --accumulate 2: what every two-process launch must equal (trained once per module)."""
    run = tmp_path_factory.mktemp("accumulate_2") / "run"
    rc, out, err = _run_cli([*_ddp_args(cubes), "--out", run, "--accumulate", "2"])
    assert rc == 0, err
    return run


def _torchrun(launch: list[str], cubes, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "genesis_ext.cli", "pretrain",
            *_ddp_args(cubes), "--out", str(out)]  # fmt: skip


def _run_together(commands: list[list[str]], timeout: float = 300) -> list[tuple[int, str]]:
    """Run the commands at once; (return code, stdout + stderr) of each. Whatever still runs when the timeout passes or
    the test fails is stopped (its log says so), so a launcher left waiting for a dead peer leaves no orphans. Output
    goes to files: a full pipe cannot stall a peer."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for c, log in zip(commands, logs)]  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        late = {p.pid for p in procs if p.poll() is None}
    finally:
        for p in procs:
            _stop_launcher(p)
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read() + (f"\n[stopped after {timeout} s]" if p.pid in late else "")))
        log.close()
    return results


def _stop_launcher(p: subprocess.Popen) -> None:
    """SIGTERM, which torchrun passes on to its workers (each in a session of its own, out of our reach) and waits for;
    SIGKILL if it has not ended in 30 s."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _free_port() -> int:
    """A port the system reports free (bound to port 0); released before torchrun binds it, a race we accept."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_run(run: Path, expected: Path) -> None:
    """The same losses in every row of metrics.csv and the same final weights, bit for bit."""
    assert _losses(run) == _losses(expected)
    a = load_training_state(expected / "checkpoints" / "last.pt")["state_dict"]
    b = load_training_state(run / "checkpoints" / "last.pt")["state_dict"]
    for k in a:
        if "running_" not in k and "num_batches" not in k:  # BN buffers: DDP keeps rank 0's; never used
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_with_the_same_micro_batches(cubes, accumulate_2, tmp_path):
    ((rc, log),) = _run_together([_torchrun(["--standalone", "--nproc_per_node", "2"], cubes, tmp_path / "ddp")])
    assert rc == 0, log[-3000:]
    assert "2 process(es) x 1 micro-batch(es) of 1" in log
    _assert_same_run(tmp_path / "ddp", accumulate_2)


@pytest.mark.slow
def test_ddp_trains_an_nnunet_network_like_one_process(cubes, tmp_path):
    """DistributedDataParallel over a dynamic-network-architectures U-Net, whose unused deep-supervision heads take
    no gradient: two gloo processes equal one with --accumulate 2."""
    pytest.importorskip("dynamic_network_architectures")
    rc, _, err = _run_cli([*_ddp_args(cubes), "--arch", "resenc-s", "--out", tmp_path / "one", "--accumulate", "2"])
    assert rc == 0, err
    command = _torchrun(["--standalone", "--nproc_per_node", "2"], cubes, tmp_path / "ddp")
    ((rc, log),) = _run_together([[*command, "--arch", "resenc-s"]])
    assert rc == 0, log[-3000:]
    _assert_same_run(tmp_path / "ddp", tmp_path / "one")


@pytest.mark.slow
def test_torchrun_on_two_nodes_matches_one_process_with_the_same_micro_batches(cubes, accumulate_2, tmp_path):
    """Two torchrun launchers, as on two machines: --nnodes 2, one process each, meeting at a c10d rendezvous on
    127.0.0.1 (ranks assigned by the rendezvous; gloo chosen on the CPU). Both name the same --out: rank 0 writes."""
    launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", f"two-nodes-{os.getpid()}"]  # fmt: skip
    nodes = _run_together([_torchrun(launch, cubes, tmp_path / "ddp") for _ in range(2)])
    for rc, log in nodes:
        assert rc == 0, log[-3000:]
    assert "2 process(es) x 1 micro-batch(es) of 1" in "".join(log for _, log in nodes)
    _assert_same_run(tmp_path / "ddp", accumulate_2)


def _cfg(data, out, **kw):
    return tiny_pretrain_config(data, out, **({"threads": 1} | kw))


def test_bad_inputs(cubes, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no training data"):
        pretrain(_cfg(empty, tmp_path / "r0"))
    with pytest.raises(FileNotFoundError):
        pretrain(_cfg(tmp_path / "missing", tmp_path / "r0"))
    with pytest.raises(ValueError, match="batch size 64 is larger than the 16 training cubes"):
        pretrain(_cfg(cubes, tmp_path / "r0", batch_size=64))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrain(_cfg(cubes, tmp_path / "r1", resume=True))
    bad = tmp_path / "r2" / "checkpoints" / "last.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is damaged: it is not a readable PyTorch checkpoint"):
        pretrain(_cfg(cubes, tmp_path / "r2", resume=True))
    # the CLI turns them into one-line messages and exit status 2
    rc, out, err = _run_cli(["--data", empty, "--out", tmp_path / "r3", "--quiet"])
    assert rc == 2 and "no training data" in err and "Traceback" not in err
    rc, out, err = _run_cli(["--data", cubes, "--out", tmp_path / "r2", "--quiet", "--resume"])
    assert rc == 2 and "is damaged" in err and "Traceback" not in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cubes, tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg(cubes, run, steps_per_epoch=3))
    good = (run / "checkpoints" / "last.pt").read_bytes()
    nan_cubes = tmp_path / "nan"
    nan_cubes.mkdir()
    n = len(read_csv(run / "metrics.csv"))
    assert n == 1
    from genesis_ext.data import CubeStore

    count = len(CubeStore(str(cubes)))
    np.save(nan_cubes / "cubes.npy", np.full((count, *CUBE), np.nan, dtype=np.float32))
    # the loss is read every 2 steps: the error names the first bad step, not the step of the read
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* epoch 2, step 1/3.*last good checkpoint"):
        pretrain(_cfg(nan_cubes, run, epochs=2, steps_per_epoch=3, log_every=2, resume=True, resume_anyway=True))
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert load_training_state(run / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_reading_the_loss_every_step_changes_nothing(cubes, uninterrupted, tmp_path):
    """The uninterrupted run reads the loss once per epoch (2 steps < --log-every 10); reading it every step must
    give the same run."""
    run = tmp_path / "run"
    rc, out, err = _run_cli(["--data", cubes, "--out", run, *TINY, "--log-every", "1"])
    assert rc == 0, err
    assert _losses(run) == _losses(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet3d", "resenc-s"])
def test_bf16_compile_and_channels_last_train_like_fp32(cubes, tmp_path, arch):
    """The GPU options of the loop, run on the CPU: bf16 autocast, torch.compile and channels-last 3D, for the
    published U-Net and an nnU-Net network. The first step sees the same weights and pairs as the fp32 eager run, so
    its loss differs only by bf16 rounding."""
    if arch != "unet3d":
        pytest.importorskip("dynamic_network_architectures")
    eager = pretrain(_cfg(cubes, tmp_path / "fp32", amp="off", arch=arch))
    fast = pretrain(_cfg(cubes, tmp_path / "fast", amp="bf16", compile=True, channels_last=True, arch=arch))
    a, b = eager.history[0], fast.history[0]
    assert b["train_loss"] != a["train_loss"]  # bf16 really ran
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.01)  # measured: 0.09% (unet3d)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.02)  # measured: 0.36% (unet3d)
    network = build_backbone(arch, 1, 1, 3)
    load_pretrained(network, tmp_path / "fast" / "checkpoints" / "last.pt")  # plain keys, no _orig_mod. prefix


@pytest.mark.cuda
def test_cuda_compiled_bf16_run_trains_like_the_cpu_run(cubes, tmp_path):
    """On CUDA the loop defaults to bf16 autocast and channels-last; with --compile too, the first step (same
    weights, bit-identical pairs from the CUDA kernels) gives the CPU fp32 loss up to bf16 and cuDNN rounding."""
    cpu = pretrain(_cfg(cubes, tmp_path / "cpu", amp="off", device="cpu"))
    gpu = pretrain(_cfg(cubes, tmp_path / "gpu", device="cuda", compile=True))
    a, b = cpu.history[0], gpu.history[0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.05)
    load_pretrained(UNet3D(), gpu.last_checkpoint)  # a CUDA run's checkpoint loads on the CPU


def test_a_fresh_run_refuses_to_overwrite_a_run(uninterrupted, cubes):
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(_cfg(cubes, uninterrupted))


def test_presets_and_cli_verb():
    from genesis_ext.cli import build_parser
    from genesis_ext.train import RECIPES

    official = PretrainConfig(data=["x"], out="y", preset="official").resolved()
    assert (
        official.optimizer,
        official.lr,
        official.momentum,
        official.batch_size,
        official.lr_step_epochs,
        official.lr_gamma,
        official.patience,
    ) == ("sgd", 1.0, 0.9, 6, 40, 0.5, 50)
    default = PretrainConfig(data=["x"], out="y").resolved()
    assert default.optimizer == RECIPES["default"]["optimizer"] and default.batch_size == 6
    assert PretrainConfig(data=["x"], out="y", lr=0.1).resolved().lr == 0.1
    with pytest.raises(ValueError, match="unknown preset"):
        PretrainConfig(data=["x"], out="y", preset="nope").resolved()
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--preset", "official", "--resume"])
    assert args.preset == "official" and args.resume is True and args.resume_anyway is False
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--resume", "--resume-anyway"])
    assert args.resume is True and args.resume_anyway is True
    with pytest.raises(ValueError, match=r"resume_anyway \(--resume-anyway\) goes with resume \(--resume\)"):
        PretrainConfig(data=["x"], out="y", resume_anyway=True).resolved()


# ---------------------------------------------------------------------------------------------------------------------
# Tests that fail when training is broken (an optimizer step removed, a learning rate of 1e-30, the schedule's state
# dropped on resume, --compile ignored): each checks an effect, not a log line.


def _batch_loss(model, x) -> float:
    model.eval()
    with torch.no_grad():
        return float(((model(x) - x) ** 2).mean())


def test_training_lowers_the_loss_of_a_fixed_batch_and_moves_every_parameter(tmp_path):
    """Eight Adam steps on one fixed batch (a store of two real CT cubes, batch 2, no deformation but flips: the
    network learns to reproduce them) bring its loss clearly below the untrained network's, and every trainable
    tensor changes. Fails without the optimizer step or with lr=1e-30."""
    from genesis_ext import DeformConfig
    from genesis_ext.data import CubeStoreDataset

    store = tmp_path / "two"
    run_extract([str(SAMPLE)], str(store), ExtractSettings(cube=CUBE, count=1, filter=Foreground()), progress=False)
    cfg = _cfg(
        store,
        tmp_path / "run",
        steps_per_epoch=8,
        seed=5,
        val_data=[store],
        deform=DeformConfig.preset("none", flip_rate=0.0),
    )
    pretrain(cfg)
    torch.manual_seed(5)
    untrained = UNet3D()  # the run's initial weights: the same seed, the same constructor
    trained = load_pretrained(UNet3D(), tmp_path / "run" / "checkpoints" / "last.pt")
    ds = CubeStoreDataset([str(store)])
    x = torch.stack([torch.as_tensor(np.asarray(ds[i])) for i in range(len(ds))]).float()
    assert len(x) == 2
    before, after = _batch_loss(untrained, x), _batch_loss(trained, x)
    assert after < 0.7 * before, (before, after)
    initial = dict(untrained.named_parameters())
    unchanged = [name for name, p in trained.named_parameters() if torch.equal(p, initial[name])]
    assert not unchanged, unchanged


def test_resume_across_schedule_steps_matches_the_uninterrupted_run(cubes, tmp_path):
    """The learning rate halves every second epoch (StepLR) and early stopping counts epochs without improvement; a
    run stopped after epoch 1 and resumed to epoch 3 crosses the schedule step after epoch 2 and still gives the
    uninterrupted run's rows exactly (lr, losses, best and the bad-epoch count). Fails when the scheduler's state is
    not restored (checked: the resumed run then keeps lr 1e-3 in epoch 3). With a step every epoch StepLR's chained
    form would hide that."""
    kw = dict(steps_per_epoch=1, lr_step_epochs=2, lr_gamma=0.5, patience=5)
    whole = pretrain(_cfg(cubes, tmp_path / "whole", epochs=3, **kw))
    pretrain(_cfg(cubes, tmp_path / "parts", epochs=1, **kw))
    pretrain(_cfg(cubes, tmp_path / "parts", epochs=3, resume=True, **kw))
    assert [r["lr"] for r in whole.history] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert _losses(tmp_path / "parts") == _losses(tmp_path / "whole")


def test_compile_really_compiles(cubes, tmp_path):
    """--compile hands the network to torch.compile: dynamo captures graphs during the run (none without it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pretrain(_cfg(cubes, tmp_path / "eager"))
    assert counters["stats"]["unique_graphs"] == 0
    pretrain(_cfg(cubes, tmp_path / "compiled", compile=True))
    assert counters["stats"]["unique_graphs"] > 0


def test_a_narrow_network_pretrains_and_its_checkpoint_says_its_width(cubes, tmp_path):
    run = pretrain(_cfg(cubes, tmp_path / "run", width=0.25))
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000  # the loss curve with both baselines
    model = load_pretrained(None, run.last_checkpoint)
    assert model.width == 0.25 and model.channels == (16, 32, 64, 128)
    rc, out, err = _run_cli(["--data", cubes, "--out", tmp_path / "cli", *TINY, "--epochs", "1", "--width", "0.25"])
    assert rc == 0, err
    assert load_pretrained(None, tmp_path / "cli" / "checkpoints" / "last.pt").width == 0.25


# ---------------------------------------------------------------------------------------------------------------------
# Nothing silently wrong: a damaged or non-finite checkpoint, or a run resumed with other settings, is refused with a
# message that names the file, the tensor or each differing setting, and the fix.

# the command line of _cfg(..., width=0.25)
SMALL = (
    "--width 0.25 --batch-size 2 --steps-per-epoch 1 --val-fraction 0.2 --threads 1 --preview-every 0 "
    "--no-tensorboard --quiet"
).split()


@pytest.fixture(scope="module")
def small_run(cubes, tmp_path_factory) -> Path:
    """A finished one-epoch run at width 0.25 (checkpoints/last.pt and best.pt); tests change only copies of it."""
    run = tmp_path_factory.mktemp("small") / "run"
    pretrain(_cfg(cubes, run, width=0.25))
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _checkpoints(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}


def test_resume_and_init_refuse_a_damaged_checkpoint(cubes, small_run, tmp_path):
    """One bit flipped inside a tensor's bytes: --resume and --init say "damaged" and name the file and the tensor
    (the Python API and the command line, exit status 2 without a traceback)."""
    run = _copy(small_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    name = "down_tr128.ops.0.conv1.weight"
    flip_bit(last, offset_of(last, load_training_state(last)["state_dict"][name]) + 100)
    match = rf"last.pt is damaged: tensor 'state_dict/{name}' does not match .*--resume .*best.pt"
    with pytest.raises(CheckpointError, match=match):
        pretrain(_cfg(cubes, run, width=0.25, epochs=2, resume=True))
    rc, out, err = _run_cli(["--data", cubes, "--out", run, *SMALL, "--epochs", "2", "--resume"])
    assert rc == 2 and f"last.pt is damaged: tensor 'state_dict/{name}'" in err and "Traceback" not in err
    rc, out, err = _run_cli(["--data", cubes, "--out", tmp_path / "init", *SMALL, "--init", last])
    assert rc == 2 and f"last.pt is damaged: tensor 'state_dict/{name}'" in err and "Traceback" not in err


def test_resume_and_init_refuse_non_finite_weights(cubes, small_run, tmp_path):
    """One Inf in the weights of a checkpoint of ours (sealed with it: not damage) and an all-NaN network are refused,
    naming the tensors. Inf in Adam's state is no reason to refuse: a healthy bf16 run wrote one (exp_avg_sq after a
    huge gradient; test_bf16_compile_and_channels_last_train_like_fp32)."""
    run = _copy(small_run, tmp_path / "run")
    state = load_training_state(run / "checkpoints" / "last.pt")
    state["state_dict"]["up_tr64.ops.1.conv1.bias"][3] = float("inf")
    atomic_save(seal(state), run / "checkpoints" / "last.pt")
    match = r"last.pt: 1 tensor\(s\) hold NaN or Inf values \['up_tr64.ops.1.conv1.bias'\]"
    with pytest.raises(CheckpointError, match=match):
        pretrain(_cfg(cubes, run, width=0.25, epochs=2, resume=True))
    state = load_training_state(small_run / "checkpoints" / "last.pt")
    state["optimizer"]["state"][0]["exp_avg_sq"][0] = float("inf")
    atomic_save(seal(state), run / "checkpoints" / "last.pt")
    assert pretrain(_cfg(cubes, run, width=0.25, epochs=2, resume=True)).epochs == 2
    model = UNet3D(width=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(model, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan.pt: 64 tensor\(s\) hold NaN or Inf values"):
        pretrain(_cfg(cubes, tmp_path / "init", width=0.25, init_weights=tmp_path / "nan.pt"))


def test_resume_with_other_settings_is_refused_and_lists_them(cubes, small_run, tmp_path):
    """Other --data and deformations: refused, each difference listed, nothing written; --resume-anyway continues
    (the same cubes, moved). Another width: refused even with --resume-anyway."""
    run = _copy(small_run, tmp_path / "run")
    moved = _copy(cubes, tmp_path / "moved")
    before = _checkpoints(run)
    with pytest.raises(ValueError) as err:
        pretrain(_cfg(moved, run, width=0.25, epochs=2, resume=True, deform=DeformConfig.preset("NL")))
    message = str(err.value)
    for line in (
        f"data: [{str(cubes)!r}] recorded vs [{str(moved)!r}] now",
        "deform.local_rate: 0.5 recorded vs 0.0 now",
        "deform.paint_rate: 0.9 recorded vs 0.0 now",
        "--resume-anyway (resume_anyway=True) to continue with the new data, deform.local_rate",
    ):
        assert line in message, message
    match = r"width: 0.25 recorded vs 0.5 now\n(.|\n)*--resume-anyway cannot change width"
    with pytest.raises(ValueError, match=match):
        pretrain(_cfg(cubes, run, width=0.5, epochs=2, resume=True, resume_anyway=True))
    assert _checkpoints(run) == before
    result = pretrain(_cfg(moved, run, width=0.25, epochs=2, resume=True, resume_anyway=True))
    assert result.epochs == 2 and [r["epoch"] for r in read_csv(run / "metrics.csv")] == [1, 2]
    # the checkpoint now records the moved cubes; the same folder written another way is the same data
    result = pretrain(_cfg(tmp_path / "run" / ".." / "moved", run, width=0.25, epochs=3, resume=True))
    assert result.epochs == 3
    # another batch size moves the sample offsets: accepted with --resume-anyway too
    result = pretrain(_cfg(moved, run, width=0.25, epochs=4, batch_size=4, resume=True, resume_anyway=True))
    assert result.epochs == 4


def test_resume_with_other_settings_from_the_command_line(uninterrupted, cubes):
    """The measured cases: --resume with other deformations continued and overwrote best.pt, another --width printed
    torch's traceback. Now: exit status 2, each difference and the fix listed, the checkpoints untouched."""
    before = _checkpoints(uninterrupted)
    args = ["--data", cubes, "--out", uninterrupted, *TINY, "--resume", "--width", "0.25", "--deformations", "NL"]
    rc, out, err = _run_cli(args)
    assert rc == 2 and "Traceback" not in err, err
    for line in ("width: 1.0 recorded vs 0.25 now", "deform.paint_rate: 0.9 recorded vs 0.0 now", "--resume-anyway"):
        assert line in err, err
    # --resume-anyway accepts the other deformations, not the other width
    rc, out, err = _run_cli([*args, "--resume-anyway"])
    assert rc == 2 and "width: 1.0 recorded vs 0.25 now" in err and "--resume-anyway cannot change width" in err, err
    assert "deform.paint_rate" not in err, err
    assert _checkpoints(uninterrupted) == before


def test_sample_params_record_the_stream_version():
    """The parameters say which version of the random streams drew them (docs/randomness.md, "Stream versions")."""
    from genesis_ext import sample_params

    assert STREAM_VERSION == 2
    for with_blocks in (True, False):
        p = sample_params(2, CUBE, seed=5, offset=3, with_blocks=with_blocks)
        assert p["stream_version"] == STREAM_VERSION and type(p["stream_version"]) is int


def test_resume_refuses_a_run_of_another_stream_version(cubes, small_run, tmp_path):
    """A run's pairs are drawn with its stream version, recorded in its checkpoints and config.json. --resume of a
    checkpoint that records another version, or none (written before versions were recorded: version 1), is refused
    naming both versions and the fix, with --resume-anyway too (Python API and command line), nothing written. Its
    weights still start a new run (--init); restoring the version lets the run resume."""
    import json

    run = _copy(small_run, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    state = load_training_state(last)
    assert state["stream_version"] == STREAM_VERSION and state["config"]["stream_version"] == STREAM_VERSION
    assert json.loads((run / "config.json").read_text())["stream_version"] == STREAM_VERSION
    unrecorded = {k: v for k, v in state.items() if k != "stream_version"}  # as a release before versions wrote it
    unrecorded["config"] = {k: v for k, v in state["config"].items() if k != "stream_version"}
    cases = {
        "none": (unrecorded, "records no random stream version: it was written before versions were recorded, with "
                 "version 1"),
        "newer": ({**state, "stream_version": STREAM_VERSION + 1}, f"was written with random stream version "
                  f"{STREAM_VERSION + 1}"),
    }  # fmt: skip
    for name, (faked, said) in cases.items():
        atomic_save(seal(faked), last)
        before = _checkpoints(run), (run / "config.json").read_bytes(), (run / "metrics.csv").read_bytes()
        for anyway in (False, True):
            with pytest.raises(ValueError) as err:
                pretrain(_cfg(cubes, run, width=0.25, epochs=2, resume=True, resume_anyway=anyway))
            message = str(err.value)
            for part in (
                f"{last} {said}; this genesis_ext draws stream version {STREAM_VERSION}",
                "--resume-anyway cannot change this",
                f"Start a new run in another --out (from these weights: --init {last})",
                "the genesis_ext release that wrote it",
            ):
                assert part in message, (name, message)
        assert (_checkpoints(run), (run / "config.json").read_bytes(), (run / "metrics.csv").read_bytes()) == before
    rc, out, err = _run_cli(["--data", cubes, "--out", run, *SMALL, "--epochs", "2", "--resume", "--resume-anyway"])
    assert rc == 2 and "Traceback" not in err and f"stream version {STREAM_VERSION + 1}" in err, err
    # the weights are weights: they start a new run
    assert pretrain(_cfg(cubes, tmp_path / "new", width=0.25, init_weights=last)).epochs == 1
    atomic_save(seal(state), last)
    assert pretrain(_cfg(cubes, run, width=0.25, epochs=2, resume=True)).epochs == 2
