"""torch.library integration: the custom ops pass torch's own checks and work under torch.compile / torch.export."""

from __future__ import annotations

import numpy as np
import pytest

import genesis_ext
from genesis_ext import DeformConfig, GenesisPair

torch = pytest.importorskip("torch")

OPS = genesis_ext.ops.OPS


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op = getattr(torch.ops.genesis_ext, name)
    g = torch.Generator().manual_seed(0)
    config = DeformConfig().to_vector()
    samples = [
        (torch.rand(2, 1, 23, 41, 17, generator=g), torch.tensor([5, 0]), config),
        (torch.rand(1, 3, 64, 64, generator=g), torch.tensor([2**62, 2**40]), config),  # 2D
        # non-contiguous; -7: the int64 of the uint64 seed 2**64 - 7
        (torch.rand(2, 2, 17, 41, 23, generator=g).permute(0, 1, 4, 3, 2), torch.tensor([-7, 3]), config),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


def test_custom_op_equals_the_functional_api(rng):
    x = torch.from_numpy(rng.random((2, 1, 64, 64, 32), dtype=np.float32))
    seed = 2**64 - 5  # carried as the int64 with the same bits
    xd, tg = torch.ops.genesis_ext.genesis_pair(x, torch.tensor([seed - 2**64, 7]), DeformConfig().to_vector())
    xd2, tg2 = genesis_ext.genesis_pair(x, seed=seed, offset=7)
    assert torch.equal(xd, xd2) and torch.equal(tg, tg2)
    xd3, _ = genesis_ext.genesis_pair(x.numpy(), seed=seed, offset=7)
    assert np.array_equal(xd.numpy(), xd3)


def test_torch_compile_fullgraph_matches_eager(rng):
    """One compiled training step's data path: pair, then a loss; graph breaks are errors (fullgraph)."""
    config = DeformConfig()

    def step(x, offset: int):
        xd, target = genesis_ext.genesis_pair(x, seed=1234, offset=offset, config=config)
        return xd * 2 - 1, ((xd - target) ** 2).mean(dim=(1, 2, 3, 4))

    x = torch.from_numpy(rng.random((3, 1, 64, 64, 32), dtype=np.float32))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for offset in (0, 3):
        (eager_x, eager_loss), (got_x, got_loss) = step(x, offset), compiled(x, offset)
        assert torch.equal(got_x, eager_x), offset  # the op itself is bit-identical
        torch.testing.assert_close(got_loss, eager_loss, rtol=1e-5, atol=0)  # inductor may reorder the reduction
    assert not torch.equal(compiled(x, 0)[0], compiled(x, 3)[0])


def test_torch_compile_with_advancing_offsets_compiles_once(rng):
    """docs/usage.md recipe: the running offset as a one-element CPU tensor reaches the custom op as a tensor, so dynamo
    does not guard on its value: 20 training steps with advancing offsets, one compilation, eager results."""
    from torch._dynamo.utils import counters

    model = torch.nn.Conv3d(1, 1, 3, padding=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager_model = torch.nn.Conv3d(1, 1, 3, padding=1)
    eager_model.load_state_dict(model.state_dict())
    eager_optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.1)

    def step(net, opt, x, offset):
        xd, target = genesis_ext.genesis_pair(x, seed=1234, offset=offset)
        loss = ((net(xd) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=False)  # backward and optimizer step: graph breaks are allowed here
    pair_only = torch.compile(lambda x, offset: genesis_ext.genesis_pair(x, seed=1234, offset=offset), fullgraph=True)
    x = torch.from_numpy(rng.random((2, 1, 24, 24, 16), dtype=np.float32))
    graphs_after_first_step = None
    for k in range(20):
        offset = torch.tensor(2 * k)
        got, want = compiled(model, optimizer, x, offset), step(eager_model, eager_optimizer, x, offset)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        xd, target = pair_only(x, offset)
        eager = genesis_ext.genesis_pair(x, seed=1234, offset=2 * k)
        assert torch.equal(xd, eager[0]) and torch.equal(target, eager[1])
        if k == 0:
            graphs_after_first_step = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step  # compiled once: no recompiles


def test_pair_module_compiles_once_over_20_steps():
    """docs/usage.md: torch.compile(GenesisPair(...), fullgraph=True). Its running index is a tensor buffer, so
    advancing it recompiles nothing (a Python int recompiled at every step and failed at dynamo's recompile limit): 20
    training steps under a recompile limit of 1, one graph, every pair and the index equal to the eager module's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(5)
    compiled_pair, eager_pair = GenesisPair(seed=1234), GenesisPair(seed=1234)
    compiled = torch.compile(compiled_pair, fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for step in range(20):
            x = torch.rand(2, 1, 24, 24, 16, generator=g)
            (got_x, got_target), (want_x, want_target) = compiled(x), eager_pair(x)
            assert torch.equal(got_x, want_x) and torch.equal(got_target, want_target), step
    assert counters["stats"]["unique_graphs"] == 1
    assert int(compiled_pair.next_index) == int(eager_pair.next_index) == 40


def test_seed_and_offset_tensors_are_checked(rng):
    x = torch.from_numpy(rng.random((1, 1, 24, 24, 16), dtype=np.float32))
    assert torch.equal(
        genesis_ext.flip(x, seed=torch.tensor(3), offset=torch.tensor(5)), genesis_ext.flip(x, seed=3, offset=5)
    )
    with pytest.raises(TypeError, match="the offset tensor must hold one int64 or int32 on the CPU"):
        genesis_ext.flip(x, seed=3, offset=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="offset tensor must hold one int64"):
        genesis_ext.flip(x, seed=3, offset=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*63\), got -1"):
        genesis_ext.flip(x, seed=3, offset=torch.tensor(-1))


def test_torch_export(rng):
    class Deform(torch.nn.Module):
        def forward(self, x):
            return genesis_ext.local_shuffle(x, seed=9, offset=0)

    x = torch.from_numpy(rng.random((2, 1, 64, 64, 32), dtype=np.float32))
    exported = torch.export.export(Deform(), (x,))
    assert "genesis_ext.local_shuffle" in str(exported.graph)
    assert torch.equal(exported.module()(x), Deform()(x))
