"""torch.library integration: the custom ops pass torch's own checks and work under torch.compile / torch.export."""
from __future__ import annotations

import numpy as np
import pytest

import genesis_ext
from genesis_ext import DeformConfig

torch = pytest.importorskip("torch")

OPS = genesis_ext.ops.OPS


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op = getattr(torch.ops.genesis_ext, name)
    g = torch.Generator().manual_seed(0)
    config = DeformConfig().to_vector()
    samples = [
        (torch.rand(2, 1, 23, 41, 17, generator=g), 5, 0, config),
        (torch.rand(1, 3, 64, 64, generator=g), 2**62, 2**40, config),  # 2D; int64 seed of a uint64 >= 2**63
        (torch.rand(2, 2, 17, 41, 23, generator=g).permute(0, 1, 4, 3, 2), -7, 3, config),  # non-contiguous
    ]
    for args in samples:
        torch.library.opcheck(op, args)


def test_custom_op_equals_the_functional_api(rng):
    x = torch.from_numpy(rng.random((2, 1, 64, 64, 32), dtype=np.float32))
    seed = 2**64 - 5  # carried as the int64 with the same bits
    xd, tg = torch.ops.genesis_ext.genesis_pair(x, seed - 2**64, 7, DeformConfig().to_vector())
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


def test_torch_export(rng):
    class Deform(torch.nn.Module):
        def forward(self, x):
            return genesis_ext.local_shuffle(x, seed=9, offset=0)

    x = torch.from_numpy(rng.random((2, 1, 64, 64, 32), dtype=np.float32))
    exported = torch.export.export(Deform(), (x,))
    assert "genesis_ext.local_shuffle" in str(exported.graph)
    assert torch.equal(exported.module()(x), Deform()(x))
