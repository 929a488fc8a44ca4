"""Plug-and-play quality conditioning (iqpir.plugin): the documented contract."""

from __future__ import annotations

import pytest
import torch

from iqpir.data import HQFolderDataset
from iqpir.plugin import PluginRecipe, QualityConditioned, UNet, fit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_head(unet: UNet) -> UNet:
    """The U-Net's head starts at zero (identity network); tests need a non-trivial one."""
    torch.nn.init.normal_(unet.head.weight, std=0.05)
    return unet


def wrapped(zero_init=False, size=None, kind="binned", feature="bottleneck"):
    unet = randomise_head(UNet(channels=8, levels=3))
    return QualityConditioned(unet, feature=feature, channels=unet.feature_channels(feature), size=size,
                              kind=kind, zero_init=zero_init)


def capture(module):
    seen = []
    return seen, module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))


@pytest.mark.parametrize("size", [None, 4, 8])
def test_embedding_added_exactly_at_the_feature(size):
    model = wrapped(size=size)
    lq = torch.rand(2, 3, 32, 32)
    q = torch.tensor([0.15, 0.95])
    # the hook registered after the wrapper's sees the conditioned output; a plain call the plain one
    seen, h = capture(model.network.bottleneck)
    model(lq, q)
    model.network(lq)
    h.remove()
    conditioned, plain = seen
    expected = model.condition(q, 2, 8, 8)
    assert conditioned.shape == (2, 32, 8, 8)
    torch.testing.assert_close(conditioned - plain, expected.detach(), atol=1e-6, rtol=0)
    assert expected.abs().sum() > 0
    # binned: one map per bin; the two samples are in different bins
    assert not torch.allclose(expected[0], expected[1])


def test_per_channel_vector_and_resized_map_adapt_to_the_input_size():
    vec = wrapped(size=None)
    s = vec.condition(0.5, 1, 5, 7)
    assert s.shape == (1, 32, 5, 7) and torch.equal(s[..., 0, 0], s[..., 4, 6])
    grid = wrapped(size=8)
    assert grid.condition(0.5, 1, 12, 12).shape == (1, 32, 12, 12)
    out = grid(torch.rand(1, 3, 48, 40), 0.5)  # feature map 12x10, not 8x8
    assert out.shape == (1, 3, 48, 40)


def test_quality_changes_the_output_and_network_outside_is_plain():
    model = wrapped()
    lq = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        lo, hi, plain = model(lq, 0.0), model(lq, 1.0), model.network(lq)
    assert (lo - hi).abs().max() > 1e-4
    assert not torch.allclose(lo, plain)


@pytest.mark.parametrize("kind", ["binned", "continuous"])
def test_zero_init_equals_the_plain_network(kind):
    model = wrapped(zero_init=True, kind=kind, size=4)
    lq = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(lq, torch.tensor([0.0, 1.0])), model.network(lq), atol=0, rtol=0)


def test_gradients_reach_the_embedding_even_from_zero_init():
    model = wrapped(zero_init=True)
    out = model(torch.rand(2, 3, 32, 32), torch.tensor([0.3, 0.9]))
    out.square().mean().backward()
    g = model.embedding.maps.grad
    assert g is not None and g[3].abs().sum() > 0 and g[9].abs().sum() > 0
    assert g[0].abs().sum() == 0  # bins not used by the batch get nothing


def test_missing_or_misused_feature_raises_clearly():
    unet = UNet(channels=8)
    with pytest.raises(ValueError, match="not a submodule.*bottleneck"):
        QualityConditioned(unet, feature="botleneck", channels=32)
    with pytest.raises(ValueError, match="expects"):
        QualityConditioned(unet, feature="bottleneck", channels=7)(torch.rand(1, 3, 16, 16), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        QualityConditioned(unet, feature="bottleneck", channels=32)(torch.rand(1, 3, 16, 16), 1.5)


def test_unet_any_size_and_identity_at_init():
    unet = UNet(channels=8, levels=3)
    x = torch.rand(1, 3, 30, 37)
    torch.testing.assert_close(unet(x), x)


class _Quality:
    """A stand-in differentiable quality model: mean brightness (the real one is niqe_diff)."""

    differentiable = True

    def __call__(self, images):
        return images.mean(dim=(1, 2, 3))


def test_recipe_returns_named_finite_losses_and_fit_trains(tmp_path):
    from iqpir import io

    for i in range(2):
        io.write_image(tmp_path / f"{i}.png", torch.rand(3, 40, 40))
    ds = HQFolderDataset(tmp_path, size=32, quality=0.8, degradation=None)
    model = wrapped(zero_init=True)
    recipe = PluginRecipe(model, quality=_Quality(), quality_start_step=1)
    batch = {"lq": torch.rand(2, 3, 32, 32), "hq": torch.rand(2, 3, 32, 32), "quality": torch.tensor([0.2, 1.0])}
    terms = recipe.losses(batch, step=0)
    assert set(terms) == {"l1", "quality"} and float(terms["quality"]) == 0.0
    terms = recipe.losses(batch, step=1)
    assert all(torch.isfinite(v.detach()) for v in terms.values()) and terms["quality"].item() > 0
    plain = PluginRecipe(UNet(channels=8))
    assert set(plain.losses(batch, 0)) == {"l1"}
    before = model.embedding.maps.detach().clone()
    hist = fit(recipe, ds, steps=3, batch_size=2, lr=1e-2)
    assert len(hist) == 3 and all("loss" in h for h in hist)
    assert not torch.equal(before, model.embedding.maps)


def test_recipe_rejects_a_non_differentiable_quality_model():
    class NotDiff:
        differentiable = False

    with pytest.raises(ValueError, match="differentiable"):
        PluginRecipe(UNet(channels=8), quality=NotDiff())


def test_any_network_with_a_named_feature():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 3, 3, padding=1))
    model = QualityConditioned(net, feature="0", channels=6, kind="continuous", zero_init=False)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(model(x, 0.1), model(x, 0.9))
        assert model(x, 0.5).shape == x.shape


def test_feature_that_is_not_a_feature_map_raises():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0]

    with pytest.raises(TypeError, match="one \\(B, C, h, w\\) tensor"):
        QualityConditioned(Net(), feature="pair", channels=3)(torch.rand(1, 3, 8, 8), 0.5)


def test_several_features_each_get_their_own_condition():
    unet = randomise_head(UNet(channels=8, levels=3))
    feats = ["bottleneck", "decoders.0.2", "decoders.1.2"]
    chans = [unet.feature_channels("bottleneck"), unet.feature_channels("decoders.0"), unet.feature_channels("decoders.1")]
    model = QualityConditioned(unet, feats, chans, zero_init=False)
    lq, q = torch.rand(2, 3, 32, 32), torch.tensor([0.15, 0.95])
    modules = dict(unet.named_modules())
    for i, name in enumerate(feats):
        # one hook before the wrapper's sees the feature as computed, one after it as conditioned
        raw, after = [], []
        h1 = modules[name].register_forward_hook(lambda m, a, o: raw.append(o.detach().clone()), prepend=True)
        h2 = modules[name].register_forward_hook(lambda m, a, o: after.append(o.detach().clone()))
        model(lq, q)
        h1.remove()
        h2.remove()
        b, c, hh, ww = raw[0].shape
        assert c == chans[i]
        expected = model.condition(q, b, hh, ww, index=i).detach()
        assert expected.abs().sum() > 0
        torch.testing.assert_close(after[0] - raw[0], expected, atol=1e-6, rtol=0)
    assert len(model.embeddings()) == 3 and model.embeddings()[0] is model.embedding
    with pytest.raises(ValueError, match="one channel count per feature"):
        QualityConditioned(unet, feats, chans[:2])


def test_a_feature_that_does_not_run_is_an_error():
    unet = UNet(channels=8, levels=3)
    model = QualityConditioned(unet, ["bottleneck", "stem"], [32, 8])
    unet.forward = lambda x: unet.bottleneck(torch.zeros(x.shape[0], 32, 4, 4))  # skips the stem
    with pytest.raises(RuntimeError, match="did not run"):
        model(torch.rand(1, 3, 16, 16), 0.5)


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_unet_at_lower_resolution_is_the_identity_at_init_at_any_size(unshuffle):
    unet = UNet(channels=8, levels=3, unshuffle=unshuffle)
    assert unet.multiple == unshuffle * 4
    x = torch.rand(1, 3, 30, 37)
    torch.testing.assert_close(unet(x), x)
    randomise_head(unet)
    assert unet(x).shape == x.shape


def test_the_default_network_is_conditioned_in_every_decoder():
    from iqpir.plugin import conditioned_unet

    model = conditioned_unet(channels=8, levels=3)
    assert model.features == ["bottleneck", "decoders.0.2", "decoders.1.2"]
    for emb in model.embeddings():
        torch.nn.init.normal_(emb.maps, std=0.5)
    randomise_head(model.network)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x, 0.0) - model(x, 1.0)).abs().max() > 1e-3
