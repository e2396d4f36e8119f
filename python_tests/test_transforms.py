"""genesis_ext.GenesisPair and GenesisDeform: the ops as modules, with a running sample index that a state_dict
carries, so a resumed run continues the stream exactly."""

from __future__ import annotations

import numpy as np
import pytest

import genesis_ext
from genesis_ext import DeformConfig, GenesisDeform, GenesisPair

torch = pytest.importorskip("torch")


def batches(n, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 1, 32, 32, 16, generator=g) for _ in range(n)]


def test_pair_module_continues_the_stream_and_resumes_exactly():
    config = DeformConfig(gaussian_noise_rate=0.5)
    xs = batches(5)
    pair = GenesisPair(config, seed=7)
    assert list(pair.parameters()) == [] and pair.training
    got = [pair(x) for x in xs[:3]]
    for k, (xd, target) in enumerate(got):  # batch k holds global samples 4k .. 4k+3
        want = genesis_ext.genesis_pair(xs[k], seed=7, offset=4 * k, config=config)
        assert torch.equal(xd, want[0]) and torch.equal(target, want[1])
    state = pair.state_dict()
    resumed = GenesisPair(config, seed=0)
    resumed.load_state_dict(state)  # seed and running index come back
    for x in xs[3:]:
        a, b = pair(x), resumed(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert resumed.get_extra_state() == {"seed": 7} and int(resumed.next_index) == 20
    assert state["next_index"].dtype == torch.int64  # the running index is a tensor in the state_dict


def test_running_index_stays_on_the_cpu_and_old_checkpoints_resume():
    """Moving the module leaves the index on the CPU (the ops read it there, never from a GPU); a checkpoint from
    when the index was a Python int in the extra state resumes at that index."""
    pair = GenesisPair(seed=7).to("meta").half()
    assert pair.next_index.device.type == "cpu" and pair.next_index.dtype == torch.int64
    old = GenesisPair(seed=0)
    old.load_state_dict({"_extra_state": {"seed": 7, "next_index": 12}})
    x = batches(1)[0]
    assert int(old.next_index) == 12 and torch.equal(old(x)[0], genesis_ext.genesis_pair(x, seed=7, offset=12)[0])


def test_pair_module_eval_mode_and_explicit_offsets_do_not_advance():
    x = batches(1)[0]
    pair = GenesisPair(seed=3).eval()
    first, again = pair(x), pair(x)
    assert torch.equal(first[0], again[0])  # fixed validation pairs
    pair.train()
    explicit = pair(x, offset=100)
    assert torch.equal(explicit[0], genesis_ext.genesis_pair(x, seed=3, offset=100)[0])
    assert int(pair.next_index) == 0
    assert torch.equal(pair(x)[0], first[0]) and int(pair.next_index) == 4


def test_deform_module_applies_its_op_with_probability_prob():
    xs = batches(50, size=8, seed=1)
    noise = GenesisDeform("gaussian_noise", seed=11, prob=0.3)
    fired = []
    for k, x in enumerate(xs):
        out = noise(x)
        full = genesis_ext.gaussian_noise(x, seed=11, offset=8 * k)
        for n in range(len(x)):  # each sample is either untouched or exactly the op's result
            untouched, deformed = torch.equal(out[n], x[n]), torch.equal(out[n], full[n])
            assert untouched != deformed
            fired.append(deformed)
    rate = np.mean(fired)
    assert abs(rate - 0.3) <= 4 * np.sqrt(0.3 * 0.7 / len(fired)), rate
    # the coin of sample i depends on (seed, i, op) only: another batch split gives the same samples
    again = GenesisDeform("gaussian_noise", seed=11, prob=0.3)
    whole = again(torch.cat(xs[:2]))
    assert torch.equal(
        whole,
        torch.cat(
            [
                GenesisDeform("gaussian_noise", seed=11, prob=0.3)(xs[0], offset=0),
                GenesisDeform("gaussian_noise", seed=11, prob=0.3)(xs[1], offset=8),
            ]
        ),
    )


def test_deform_module_with_a_probability_on_numpy_batches():
    """NumPy batches, the ops' other input type: the same samples fire as for torch, and a NumPy array comes back."""
    xs = batches(3, size=8, seed=2)
    noise, twin = GenesisDeform("gaussian_noise", seed=4, prob=0.5), GenesisDeform("gaussian_noise", seed=4, prob=0.5)
    for x in xs:
        out = noise(x.numpy())
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert np.array_equal(out, twin(x).numpy())
    assert 0 < sum(np.array_equal(out[n], xs[-1][n].numpy()) for n in range(8)) < 8  # some samples fired, some not


def test_modules_in_a_sequential_and_bad_arguments():
    model = torch.nn.Sequential(GenesisDeform("flip", seed=1), GenesisDeform("bezier_remap", seed=2, prob=0.5))
    x = batches(1)[0]
    assert model(x).shape == x.shape
    with pytest.raises(ValueError, match="unknown op 'blur'; choose one of"):
        GenesisDeform("blur")
    with pytest.raises(ValueError, match=r"prob must be a number in \[0, 1\], got 1.5"):
        GenesisDeform("flip", prob=1.5)
    with pytest.raises(TypeError, match="config must be a DeformConfig"):
        GenesisPair(config={"local_rate": 0.5})
    with pytest.raises(ValueError, match="seed must be in"):
        GenesisPair(seed=-1)
