"""genesis_ext.models: the Models Genesis 3D U-Net (published architecture and key names), its BatchNorm modes, the
classifier, and safe, strict checkpoint loading. Small inputs keep the CPU cost low; a 64x64x32 shape check runs on
the meta device."""

from __future__ import annotations

import copy
import os
import pickle
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

from genesis_ext.models import (  # noqa: E402
    BatchStatsBatchNorm3d,
    CheckpointError,
    GenesisClassifier,
    GenesisEncoder,
    UNet3D,
    load_pretrained,
    save_checkpoint,
)

PUBLISHED_PARAMETERS = 19_073_665
PUBLISHED_ENTRIES = 106
SMALL = (2, 1, 16, 16, 8)

# Written out from the published network (its code and weights), not read off the model:
# (name, conv input channels, output channels) of every LUConv, and the transposed convs' channels.
ENCODER_LUCONVS = [
    ("down_tr64", (1, 32), (32, 64)),
    ("down_tr128", (64, 64), (64, 128)),
    ("down_tr256", (128, 128), (128, 256)),
    ("down_tr512", (256, 256), (256, 512)),
]
# up level: (name, channels kept by the transposed conv, skip channels, output channels)
DECODER_LEVELS = [("up_tr256", 512, 256, 256), ("up_tr128", 256, 128, 128), ("up_tr64", 128, 64, 64)]


def luconv_entries(prefix: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.conv1.weight", (cout, cin, 3, 3, 3)),
        (f"{prefix}.conv1.bias", (cout,)),
        (f"{prefix}.bn1.weight", (cout,)),
        (f"{prefix}.bn1.bias", (cout,)),
        (f"{prefix}.bn1.running_mean", (cout,)),
        (f"{prefix}.bn1.running_var", (cout,)),
        (f"{prefix}.bn1.num_batches_tracked", ()),
    ]


def expected_encoder(in_channels: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for name, *convs in ENCODER_LUCONVS:
        for i, (cin, cout) in enumerate(convs):
            entries += luconv_entries(f"{name}.ops.{i}", in_channels if (name, i) == ("down_tr64", 0) else cin, cout)
    return entries


def expected_unet(in_channels: int = 1, n_class: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    entries = expected_encoder(in_channels)
    for name, up, skip, out in DECODER_LEVELS:
        entries += [(f"{name}.up_conv.weight", (up, up, 2, 2, 2)), (f"{name}.up_conv.bias", (up,))]
        entries += luconv_entries(f"{name}.ops.0", up + skip, out) + luconv_entries(f"{name}.ops.1", out, out)
    return entries + [("out_tr.final_conv.weight", (n_class, 64, 1, 1, 1)), ("out_tr.final_conv.bias", (n_class,))]


def shapes(module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def randomised(model):
    """Every entry changed from its initial value (BN affine and running stats too), so a skipped load shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=g) + (0.5 if "running_var" in key else -0.5))
            else:
                value.fill_(7)
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def small_batch():
    return torch.rand(SMALL, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def _randomised_unet():
    return randomised(UNet3D())


@pytest.fixture
def trained_like(_randomised_unet):
    """A UNet3D with every weight and statistic randomised (a fresh copy: batch_stats forwards update statistics)."""
    return copy.deepcopy(_randomised_unet)


# ---------------------------------------------------------------------------------------------------- architecture


def test_parameter_count_and_entries():
    model = UNet3D()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS
    assert len(model.state_dict()) == PUBLISHED_ENTRIES
    expected = expected_unet()
    assert len(expected) == PUBLISHED_ENTRIES
    params = [s for k, s in expected if k.rsplit(".", 1)[1] in ("weight", "bias")]
    assert sum(torch.Size(s).numel() for s in params) == PUBLISHED_PARAMETERS


@pytest.mark.parametrize("batchnorm", ["batch_stats", "standard"])
def test_state_dict_keys_shapes_and_order_are_the_published_ones(batchnorm):
    # Order matters too: an optimizer state_dict (e.g. the published one) refers to parameters by position.
    assert shapes(UNet3D(batchnorm=batchnorm)) == expected_unet()
    assert shapes(UNet3D(in_channels=2, n_class=3, batchnorm=batchnorm)) == expected_unet(2, 3)


def test_encoder_and_classifier_keys():
    assert shapes(GenesisEncoder(in_channels=2)) == expected_encoder(2)
    head = [
        ("dense_1.weight", (1024, 512)),
        ("dense_1.bias", (1024,)),
        ("dense_2.weight", (5, 1024)),
        ("dense_2.bias", (5,)),
    ]
    assert shapes(GenesisClassifier(5)) == expected_encoder() + head


def test_batchnorm_layers_follow_the_mode():
    for mode, cls in (("batch_stats", BatchStatsBatchNorm3d), ("standard", torch.nn.BatchNorm3d)):
        norms = [m for m in UNet3D(batchnorm=mode).modules() if isinstance(m, torch.nn.BatchNorm3d)]
        assert len(norms) == 14 and all(type(m) is cls for m in norms)


def test_forward_shape_and_range(small_batch):
    torch.manual_seed(1)
    model = UNet3D(in_channels=2, n_class=3)
    x = torch.cat([small_batch, small_batch.flip(2)], 1)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 16, 16, 8) and y.dtype == torch.float32
    assert bool(((y > 0) & (y < 1)).all()) and float(y.std()) > 1e-3
    assert model.encode(x).shape == (2, 512, 2, 2, 1)


def spec_forward(state: dict, x):
    """The network of models_genesis.md §4 written as plain functions of a state_dict: the oracle for the module.
    BatchNorm uses the batch's statistics (the published behaviour)."""

    def luconv(prefix, h):
        h = torch.nn.functional.conv3d(h, state[prefix + ".conv1.weight"], state[prefix + ".conv1.bias"], padding=1)
        mean = h.mean(dim=(0, 2, 3, 4), keepdim=True)
        var = h.var(dim=(0, 2, 3, 4), unbiased=False, keepdim=True)
        scale = state[prefix + ".bn1.weight"].view(1, -1, 1, 1, 1)
        shift = state[prefix + ".bn1.bias"].view(1, -1, 1, 1, 1)
        return torch.relu((h - mean) / torch.sqrt(var + 1e-5) * scale + shift)

    skips = []
    h = x
    for level, (name, *_) in enumerate(ENCODER_LUCONVS):
        if level:
            h = torch.nn.functional.max_pool3d(h, 2)
        h = luconv(f"{name}.ops.1", luconv(f"{name}.ops.0", h))
        skips.append(h)
    for (name, *_), skip in zip(DECODER_LEVELS, reversed(skips[:-1])):
        up = torch.nn.functional.conv_transpose3d(
            h, state[name + ".up_conv.weight"], state[name + ".up_conv.bias"], stride=2
        )
        h = luconv(f"{name}.ops.1", luconv(f"{name}.ops.0", torch.cat([up, skip], 1)))
    logits = torch.nn.functional.conv3d(h, state["out_tr.final_conv.weight"], state["out_tr.final_conv.bias"])
    return torch.sigmoid(logits), skips[-1]


def test_forward_matches_the_spec_written_as_functions(small_batch, trained_like):
    state = {k: v.clone() for k, v in trained_like.state_dict().items()}
    with torch.no_grad():
        expected, bottleneck = spec_forward(state, small_batch)
        torch.testing.assert_close(trained_like(small_batch), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trained_like.encode(small_batch), bottleneck, rtol=1e-4, atol=1e-5)
    assert float(expected.std()) > 1e-3  # a non-trivial output, not a saturated constant


def test_published_cube_shapes_on_meta():
    with torch.device("meta"):
        model = UNet3D()
        x = torch.empty(6, 1, 64, 64, 32)
        assert model(x).shape == (6, 1, 64, 64, 32)
        assert model.encode(x).shape == (6, 512, 8, 8, 4)
        assert GenesisClassifier(2)(x).shape == (6, 2)


def test_classifier_forward(small_batch):
    torch.manual_seed(2)
    model = GenesisClassifier(3)
    logits = model(small_batch)
    assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all())
    # the head sits on the global average of the bottleneck
    pooled = model.encode(small_batch).mean(dim=(2, 3, 4))
    torch.testing.assert_close(logits, model.dense_2(torch.relu(model.dense_1(pooled))))
    # without a decoder, sizes need not be multiples of 8
    assert model(torch.rand(2, 1, 12, 20, 9)).shape == (2, 3)


# ------------------------------------------------------------------------------------------------------ BatchNorm


def test_batch_stats_layer_matches_the_formula():
    torch.manual_seed(4)
    bn = BatchStatsBatchNorm3d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 4, 5, 6) * 3 + 1
    mean = x.mean(dim=(0, 2, 3, 4))
    var = x.var(dim=(0, 2, 3, 4), unbiased=False)
    expected = (x - mean.view(1, 3, 1, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1, 1) + bn.eps) * bn.weight.view(
        1, 3, 1, 1, 1
    ) + bn.bias.view(1, 3, 1, 1, 1)
    n = x.numel() // 3
    for mode in ("train", "eval"):
        getattr(bn, mode)()
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)
        # running statistics: torch's momentum update with the unbiased variance, in eval mode too
        torch.testing.assert_close(bn.running_mean, 0.9 * rm + 0.1 * mean)
        torch.testing.assert_close(bn.running_var, 0.9 * rv + 0.1 * var * n / (n - 1))
    assert int(bn.num_batches_tracked) == 2

    cumulative = BatchStatsBatchNorm3d(3, momentum=None).eval()
    cumulative(x)
    cumulative(x + 2)
    torch.testing.assert_close(cumulative.running_mean, mean + 1)


def test_batch_stats_model_ignores_mode_and_updates_running_stats(small_batch):
    torch.manual_seed(5)
    model = UNet3D()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_train = model.train()(small_batch)
    after_train = {k: v.clone() for k, v in model.state_dict().items()}
    y_eval = model.eval()(small_batch)
    after_eval = model.state_dict()
    assert torch.equal(y_train, y_eval)
    for key in before:
        if "running" in key:
            assert not torch.equal(before[key], after_train[key]), key
            assert not torch.equal(after_train[key], after_eval[key]), key
        if "num_batches_tracked" in key:
            assert (int(after_train[key]), int(after_eval[key])) == (1, 2), key


def test_standard_batchnorm_uses_running_stats_in_eval(small_batch):
    torch.manual_seed(5)
    model = UNet3D(batchnorm="standard")
    y_train = model.train()(small_batch)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    y_eval = model.eval()(small_batch)
    assert not torch.allclose(y_train, y_eval, atol=1e-3)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------- input checks


def test_sizes_not_divisible_by_8_name_valid_sizes():
    model = UNet3D()
    with pytest.raises(ValueError, match=r"divisible by 8") as err:
        model(torch.rand(1, 1, 30, 64, 5))
    message = str(err.value)
    assert "X = 30 (use 24 or 32)" in message and "Z = 5 (use 8)" in message and "Y =" not in message
    assert "[1, 1, 30, 64, 5]" in message
    with pytest.raises(ValueError, match=r"Y = 20 \(use 16 or 24\)"):
        model(torch.rand(1, 1, 16, 20, 16))


def test_other_input_errors():
    model = UNet3D(in_channels=2)
    with pytest.raises(ValueError, match=r"5D batch"):
        model(torch.rand(2, 16, 16, 16))
    with pytest.raises(ValueError, match=r"expected 2 input channel"):
        model(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"GenesisClassifier: spatial sizes must be at least 8.*Z = 4 \(use 8\)"):
        GenesisClassifier(2)(torch.rand(2, 1, 16, 16, 4))
    with pytest.raises(ValueError, match=r"batchnorm must be one of"):
        UNet3D(batchnorm="frozen")
    with pytest.raises(ValueError, match=r"n_class must be a positive int"):
        UNet3D(n_class=0)
    with pytest.raises(ValueError, match=r"in_channels must be a positive int"):
        GenesisClassifier(2, in_channels=1.0)


# -------------------------------------------------------------------------------------- script / export / compile


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # deprecated in torch 2.13; still asked for
def test_jit_script_matches_eager(small_batch):
    torch.manual_seed(6)
    for model in (UNet3D().eval(), GenesisClassifier(3).eval()):
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(small_batch), model(small_batch), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scripted.encode(small_batch), model.encode(small_batch), rtol=1e-6, atol=1e-6)
    with pytest.raises(torch.jit.Error, match=r"Z = 12 \(use 8 or 16\)"):
        torch.jit.script(UNet3D())(torch.rand(1, 1, 16, 16, 12))


@pytest.mark.slow
def test_export_matches_eager_with_dynamic_sizes(small_batch):
    from torch.export import Dim

    torch.manual_seed(7)
    model = UNet3D().eval()
    eights = [Dim(f"{axis}8", min=2, max=32) for axis in "xyz"]  # spatial sizes 8*k, k >= 2
    dynamic = ({0: Dim("batch", min=2, max=64), 2: 8 * eights[0], 3: 8 * eights[1], 4: 8 * eights[2]},)
    exported = torch.export.export(model, (torch.rand(2, 1, 16, 24, 16),), dynamic_shapes=dynamic).module()
    for x in (torch.rand(2, 1, 16, 24, 16), torch.rand(3, 1, 16, 32, 24)):
        torch.testing.assert_close(exported(x), model(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"Z = 12 \(use 8 or 16\)"):
        torch.export.export(model, (torch.rand(2, 1, 16, 16, 12),))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method:DeprecationWarning")  # raised inside torch's inductor
def test_compile_fullgraph_matches_eager(small_batch):
    torch.manual_seed(8)
    model = UNet3D().eval()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(small_batch), model(small_batch), rtol=1e-5, atol=1e-5)
    # under fullgraph, torch reports the raised ValueError inside its own error; the message is ours
    with pytest.raises(Exception, match=r"Z = 12 \(use 8 or 16\)"):
        compiled(torch.rand(1, 1, 16, 16, 12))


# ------------------------------------------------------------------------------------------------------- weights


def published_checkpoint(model, path, *, legacy=False):
    """The published file's layout: 'module.'-prefixed state_dict, optimizer state and epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    state = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save(
        {"epoch": 42, "state_dict": state, "optimizer_state_dict": optimizer.state_dict()},
        path,
        _use_new_zipfile_serialization=not legacy,
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_published_format_round_trip(tmp_path, trained_like, legacy):
    path = tmp_path / "Genesis_Chest_CT.pt"
    published_checkpoint(trained_like, path, legacy=legacy)
    model = UNet3D()
    assert load_pretrained(model, path) is model
    assert_same_state(model, trained_like)
    built = load_pretrained(None, str(path))
    assert type(built) is UNet3D and built.batchnorm == "batch_stats"
    assert_same_state(built, trained_like)


def test_channels_are_read_off_the_checkpoint(tmp_path):
    source = randomised(UNet3D(in_channels=2, n_class=3))
    path = tmp_path / "c.pt"
    published_checkpoint(source, path)
    built = load_pretrained(None, path)
    assert (built.in_channels, built.n_class) == (2, 3)
    assert_same_state(built, source)


def test_our_format_round_trip(tmp_path, trained_like, small_batch):
    path = tmp_path / "ours.pt"
    optimizer = torch.optim.SGD(trained_like.parameters(), lr=0.1)
    save_checkpoint(torch.nn.DataParallel(trained_like), path, epoch=3, optimizer_state_dict=optimizer.state_dict())
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "epoch", "optimizer_state_dict", "integrity"} and raw["epoch"] == 3
    assert list(raw["state_dict"]) == [k for k, _ in expected_unet()]  # plain names, no wrapper prefix
    # sealed: the format version and a SHA-256 per tensor, named by its path in the file
    assert raw["integrity"]["format_version"] == 1
    assert list(raw["integrity"]["sha256"]) == [f"state_dict/{k}" for k, _ in expected_unet()]
    assert not list(tmp_path.glob("*.tmp"))
    model = load_pretrained(UNet3D(), path)
    assert_same_state(model, trained_like)
    torch.testing.assert_close(model(small_batch), trained_like(small_batch))
    for entry in ("state_dict", "integrity"):
        with pytest.raises(ValueError, match=f"'{entry}' is the checkpoint's own entry"):
            save_checkpoint(model, path, **{entry: {}})


@pytest.mark.parametrize("layout", ["bare", "model", "compiled", "into_wrapped"])
def test_other_layouts_and_wrappers(tmp_path, trained_like, layout):
    path = tmp_path / "w.pt"
    state = trained_like.state_dict()
    target = UNet3D()
    if layout == "bare":
        torch.save(state, path)
    elif layout == "model":
        torch.save({"model": state, "step": 10}, path)
    elif layout == "compiled":  # keys of a torch.compile'd model saved directly
        torch.save({"state_dict": {"_orig_mod." + k: v for k, v in state.items()}}, path)
    else:
        save_checkpoint(trained_like, path)
        target = torch.nn.DataParallel(target)
    loaded = load_pretrained(target, path)
    assert loaded is target
    assert_same_state(loaded.module if layout == "into_wrapped" else loaded, trained_like)


def test_mismatches_are_listed_and_nothing_is_loaded(tmp_path, trained_like):
    state = OrderedDict(("module." + k, v) for k, v in trained_like.state_dict().items())
    del state["module.up_tr128.ops.1.bn1.running_var"]
    state["module.up_tr128.extra.weight"] = torch.zeros(3)
    state["module.down_tr64.ops.0.conv1.weight"] = torch.zeros(32, 2, 3, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    model = UNet3D()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    message = str(err.value)
    assert str(path) in message and "nothing was loaded" in message
    assert "1 missing key(s) ['up_tr128.ops.1.bn1.running_var']" in message
    assert "1 unexpected key(s) ['up_tr128.extra.weight']" in message
    assert "'down_tr64.ops.0.conv1.weight': checkpoint (32, 2, 3, 3, 3) vs model (32, 1, 3, 3, 3)" in message
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_wrong_architecture_weights(tmp_path, trained_like):
    path = tmp_path / "unet.pt"
    save_checkpoint(trained_like, path)
    with pytest.raises(
        CheckpointError,
        match=r"out_tr.final_conv.weight': checkpoint \(1, 64, 1, 1, 1\) vs model "
        r"\(2, 64, 1, 1, 1\)",
    ):
        load_pretrained(UNet3D(n_class=2), path)
    # a whole-network load into the classifier: decoder unexpected, head missing (encoder_only is the way)
    with pytest.raises(
        CheckpointError,
        match=r"4 missing key\(s\) \['dense_1.weight'.*unexpected key\(s\) "
        r"\['up_tr256.up_conv.weight'",
    ):
        load_pretrained(GenesisClassifier(2), path)
    # a checkpoint of some other network lists (a bounded number of) missing keys
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match=r"106 missing key\(s\) \[.*and 94 more\]; 1 unexpected"):
        load_pretrained(UNet3D(), path)


def test_encoder_only_into_classifier(tmp_path, trained_like, small_batch):
    path = tmp_path / "Genesis_Chest_CT.pt"
    published_checkpoint(trained_like, path)
    torch.manual_seed(9)
    classifier = GenesisClassifier(3)
    head = {k: v.clone() for k, v in classifier.state_dict().items() if k.startswith("dense")}
    assert load_pretrained(classifier, path, encoder_only=True) is classifier
    source = trained_like.state_dict()
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, head[key] if key.startswith("dense") else source[key]), key
    assert classifier(small_batch).shape == (2, 3)

    encoder = load_pretrained(None, path, encoder_only=True)
    assert type(encoder) is GenesisEncoder
    torch.testing.assert_close(encoder(small_batch), trained_like.encode(small_batch))

    # the encoder is required in full; its absence is listed
    state = {k: v for k, v in source.items() if k != "down_tr512.ops.1.conv1.bias"}
    torch.save({"state_dict": state}, path)
    with pytest.raises(
        CheckpointError,
        match=r"encoder of GenesisClassifier.*1 missing key\(s\) "
        r"\['down_tr512.ops.1.conv1.bias'\]",
    ):
        load_pretrained(GenesisClassifier(3), path, encoder_only=True)


# --------------------------------------------------------------------------------------------------- bad files


class Payload:
    """Unpickling this runs a shell command: weights_only must refuse it before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "Genesis_Chest_CT.pt"
    with pytest.raises(FileNotFoundError, match=str(path)) as err:
        load_pretrained(UNet3D(), path)
    # says where the published weights come from
    assert "github.com/MrGiovanni/ModelsGenesis" in str(err.value) and "Genesis_Chest_CT.pt" in str(err.value)


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "text"])
def test_corrupt_files(tmp_path, trained_like, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))
    elif kind == "truncated":
        save_checkpoint(trained_like, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"is damaged: it is not a readable PyTorch checkpoint") as err:
        load_pretrained(UNet3D(), path)
    assert str(path) in str(err.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"holds no state_dict.*found list"):
        load_pretrained(UNet3D(), path)
    torch.save({"epoch": 1, "weights": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"holds no state_dict.*keys \['epoch', 'weights'\]"):
        load_pretrained(UNet3D(), path)


@pytest.mark.parametrize("obj", ["payload", "custom"])
def test_pickled_objects_are_refused_without_running_them(tmp_path, trained_like, obj):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pt"
    extra = Payload(marker) if obj == "payload" else Custom()
    torch.save({"state_dict": trained_like.state_dict(), "extra": extra}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*malicious\.pt.*GLOBAL"):
        load_pretrained(UNet3D(), path)
    assert not marker.exists()
    if obj == "payload":  # the payload is real: plain unpickling runs it
        pickle.loads(pickle.dumps(Payload(marker)))
        assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# integrity: damaged files are reported as damaged (naming the file and the tensor), non-finite weights refused


def flip_bit(path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def offset_of(path, tensor) -> int:
    """Where ``tensor``'s bytes lie in the file: inside its storage's record of torch.save's zip."""
    offset = path.read_bytes().find(tensor.detach().numpy().tobytes())
    assert offset > 0
    return offset


def damaged(path, match: str):
    """The CheckpointError of loading the damaged ``path``: it names the file, says "damaged" and ``match``."""
    with pytest.raises(CheckpointError, match=match) as err:
        load_pretrained(UNet3D(), path)
    message = str(err.value)
    assert str(path) in message and "damaged" in message
    assert "arbitrary code" not in message and "refused" not in message
    return message


NAME = "down_tr512.ops.1.conv1.weight"  # the largest tensor (27 MB at width 1)


def test_a_flipped_bit_in_a_tensor_is_damage_that_names_the_tensor(tmp_path, trained_like):
    path = tmp_path / "ours.pt"
    save_checkpoint(trained_like, path)
    flip_bit(path, offset_of(path, trained_like.state_dict()[NAME]) + 1000)
    damaged(path, f"tensor 'state_dict/{NAME}' does not match its SHA-256 checksum")


@pytest.mark.parametrize("where", ["tensor", "pickle"])
def test_4_kib_of_zeros_is_damage(tmp_path, trained_like, where):
    path = tmp_path / "ours.pt"
    save_checkpoint(trained_like, path)
    data = bytearray(path.read_bytes())
    start = offset_of(path, trained_like.state_dict()[NAME]) + 8192 if where == "tensor" else 0
    data[start : start + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    damaged(path, f"tensor 'state_dict/{NAME}'" if where == "tensor" else "zip record archive/data.pkl fails")


def test_a_flipped_bit_in_the_pickle_is_damage_not_malice(tmp_path, trained_like):
    """One bit of 'OrderedDict' flipped makes a class torch.load refuses ('GLOBAL collections.OrderedDiCt'): the
    zip's CRC-32 of the pickle says the file is damaged, not that it holds code."""
    path = tmp_path / "ours.pt"
    save_checkpoint(trained_like, path)
    flip_bit(path, path.read_bytes().find(b"OrderedDict") + 9, bit=5)
    damaged(path, "zip record archive/data.pkl fails its check.*Bad CRC-32")


def test_a_flipped_bit_that_torch_reads_without_complaint_is_damage(tmp_path, trained_like):
    """'cpu', the storages' recorded device, flipped to 'cpw': torch.load(map_location="cpu") ignores it, the CRC-32
    of the pickle does not. The published layout, without our seal, too."""
    path = tmp_path / "Genesis_Chest_CT.pt"
    published_checkpoint(trained_like, path)
    flip_bit(path, path.read_bytes().find(b"cpu") + 2, bit=1)
    assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == 42  # torch itself reads it
    damaged(path, "zip record Genesis_Chest_CT/data.pkl fails its check")


def test_a_flipped_bit_in_a_tensor_of_a_file_without_our_seal_is_damage(tmp_path, trained_like):
    """Files from elsewhere carry no seal, but torch.save's zip holds a CRC-32 per record: those are checked."""
    path = tmp_path / "Genesis_Chest_CT.pt"
    published_checkpoint(trained_like, path)
    flip_bit(path, offset_of(path, trained_like.state_dict()[NAME]) + 1000)
    damaged(path, r"zip record Genesis_Chest_CT/data/\d+ fails its check \(Bad CRC-32")


@pytest.mark.parametrize("file", ["ours", "plain"])
def test_one_nan_is_refused_and_named(tmp_path, trained_like, file):
    path = tmp_path / f"{file}.pt"
    model = copy.deepcopy(trained_like)
    with torch.no_grad():
        model.up_tr64.ops[1].conv1.bias[5] = float("nan")
    if file == "ours":
        save_checkpoint(model, path)
    else:
        torch.save(model.state_dict(), path)
    match = rf"{path}: 1 tensor\(s\) hold NaN or Inf values \['up_tr64.ops.1.conv1.bias'\]"
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(UNet3D(), path)


def test_all_nan_weights_are_refused(tmp_path):
    model = UNet3D(width=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    save_checkpoint(model, path)
    count = len(list(model.parameters()))  # every parameter; the BatchNorm statistics stay finite
    with pytest.raises(CheckpointError, match=rf"nan.pt: {count} tensor\(s\) hold NaN or Inf values \['down_tr64"):
        load_pretrained(None, path)


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path, trained_like):
    from genesis_ext.models.weights import seal

    checkpoint = seal({"state_dict": trained_like.state_dict()})
    checkpoint["integrity"]["format_version"] = 2
    path = tmp_path / "newer.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="format version 2, newer than this genesis_ext reads .1.: upgrade"):
        load_pretrained(UNet3D(), path)


# ---------------------------------------------------------------------------------------------------------------------
# width: a network small enough to study on a CPU; only the default is the published one


def test_width_scales_every_level_and_keeps_the_published_keys():
    small = UNet3D(width=0.25)
    assert small.channels == (16, 32, 64, 128) and UNet3D().channels == (64, 128, 256, 512)
    assert list(small.state_dict()) == list(UNet3D().state_dict())  # the same keys, other shapes
    ratio = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in UNet3D().parameters())
    assert 0.055 < ratio < 0.07  # about width**2
    x = torch.rand(2, 1, 16, 16, 16)
    assert small(x).shape == (2, 1, 16, 16, 16) and small.encode(x).shape == (2, 128, 2, 2, 2)
    assert torch.equal(torch.jit.script(small)(x), small(x))
    head = GenesisClassifier(3, width=0.25)
    assert head.dense_1.in_features == 128 and head.dense_1.out_features == 256 and head(x).shape == (2, 3)
    assert "width=0.25" in repr(small) and "width" not in repr(UNet3D())
    for bad in (0, -1, float("nan"), "1", True, 100):
        with pytest.raises(ValueError, match="width must be a number in"):
            UNet3D(width=bad)


def test_only_the_default_width_loads_the_published_weights(tmp_path):
    published = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in UNet3D().state_dict().items()}}, published)
    with pytest.raises(CheckpointError, match=r"width 0.5 has other shapes than the published one \(width 1\)"):
        load_pretrained(UNet3D(width=0.5), published)
    load_pretrained(UNet3D(), published)
    small = tmp_path / "small.pt"
    save_checkpoint(UNet3D(width=0.25, n_class=2), small)
    rebuilt = load_pretrained(None, small)  # the width is read off the checkpoint
    assert rebuilt.width == 0.25 and rebuilt.n_class == 2


# ---------------------------------------------------------------------------------------------------------- 2-D
def test_unet2d_is_the_3d_design_in_2d():
    """UNet2D: the same layers, key names and widths as UNet3D with 2-D convolutions; (N, C, H, W) in and out."""
    from genesis_ext.models import GenesisClassifier2D, UNet2D

    two, three = UNet2D(width=0.25), UNet3D(width=0.25)
    assert list(two.state_dict()) == list(three.state_dict())
    for (name, a), (_, b) in zip(two.state_dict().items(), three.state_dict().items()):
        assert a.shape == b.shape[:4] or a.shape == b.shape, name  # convs lose one kernel axis, the rest is equal
    x = torch.rand(2, 1, 32, 24)
    y = two(x).detach()
    assert y.shape == (2, 1, 32, 24) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.equal(torch.jit.script(two)(x), y)
    for bad, match in ((torch.rand(2, 1, 16, 16, 16), "4D batch"), (torch.rand(2, 1, 20, 16), "H = 20")):
        with pytest.raises(ValueError, match=match):
            two(bad)
    assert GenesisClassifier2D(3, width=0.25)(x).shape == (2, 3)


def test_a_2d_checkpoint_loads_as_the_2d_network(tmp_path):
    from genesis_ext.models import UNet2D

    torch.manual_seed(0)
    model = UNet2D(n_class=2, width=0.5)
    save_checkpoint(model, tmp_path / "two_d.pt")
    loaded = load_pretrained(None, tmp_path / "two_d.pt")
    assert type(loaded) is UNet2D and loaded.n_class == 2 and loaded.width == 0.5
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError):
        load_pretrained(UNet3D(n_class=2, width=0.5), tmp_path / "two_d.pt")
