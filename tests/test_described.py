"""The Restorer works from a described model's capabilities (sizes, scale, knobs), not from its
class: models that are not IQPIR networks (fully convolutional, upscalers, quality-only) plug
in as a DescribedModel, and a new kind of file as one DETECTORS entry."""

from __future__ import annotations

import pytest
import torch

import iqpir
from iqpir.inference import Restorer, files
from iqpir.inference.files import DescribedModel


class Upscale(torch.nn.Module):
    """Nearest-neighbour x k: with it, seamless blending gives the nearest upscale exactly."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=self.k, mode="nearest")


class AnySize(torch.nn.Module):
    """model(x, quality): any size that is a multiple of 4; records the sizes it was given."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x, quality):
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0, x.shape
        self.sizes.append(tuple(x.shape[-2:]))
        return x * quality[:, None, None, None]


def test_an_upscaler_is_tiled_at_its_scale(one_thread):
    described = DescribedModel(Upscale(2), kind="spandrel", image_size=32, scale=2, call="image")
    r = Restorer(described, device="cpu", dtype="float32", batch_size=3)
    assert r.scale == 2 and not (r.supports_quality or r.supports_alpha or r.supports_fidelity)
    for h, w in ((32, 32), (50, 77), (20, 45)):
        img = torch.rand(3, h, w)
        want = torch.nn.functional.interpolate(img[None], scale_factor=2, mode="nearest")[0]
        torch.testing.assert_close(r.restore_one(img), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="^this spandrel model has no quality condition"):
        r.restore(torch.rand(3, 32, 32), quality=0.5)


def test_a_model_of_any_size_gets_whole_images_padded_to_its_multiple(one_thread):
    net = AnySize()
    no_codebook = {"alpha": "is not a codebook model: --alpha needs a dual-codebook (IQPIR) model",
                   "fidelity": "has no CFT blocks: --fidelity needs CodeFormer-style weights"}
    described = DescribedModel(net, kind="plugin", image_size=None, size_multiple=4, quality=True, call="image",
                               refusals=no_codebook)
    r = Restorer(described, device="cpu", dtype="float32")
    img = torch.rand(3, 50, 77)
    torch.testing.assert_close(r.restore_one(img, quality=0.5), img * 0.5)
    assert net.sizes == [(52, 80)]  # one pass, padded up to multiples of 4
    out = r.restore(torch.rand(2, 3, 20, 24), quality=0.25)
    assert out.shape == (2, 3, 20, 24)
    for knob, value in (("alpha", {"alpha": 0.5}), ("fidelity", {"fidelity": 0.5})):
        with pytest.raises(ValueError) as err:
            r.restore(img, **value)
        assert str(err.value) == f"this plugin model {no_codebook[knob]}" and "\n" not in str(err.value)
    # With a tile size, the same network runs on blended tiles (memory bounded by the tile).
    tiled = Restorer(described, device="cpu", dtype="float32", tile=32)
    net.sizes.clear()
    torch.testing.assert_close(tiled.restore_one(img, quality=0.5), img * 0.5, atol=1e-6, rtol=0)
    assert set(net.sizes) == {(32, 32)}
    with pytest.raises(ValueError, match="multiple of 4"):
        Restorer(described, device="cpu", tile=30)


def test_a_new_kind_of_file_is_one_detector_entry(monkeypatch, tmp_path):
    seen = []

    def describe_fake(path, use_ema):
        seen.append((str(path), use_ema))
        return DescribedModel(Upscale(4), kind="spandrel", image_size=16, scale=4, call="image")

    monkeypatch.setitem(files.DETECTORS, "fake", (lambda p: str(p).endswith(".fake"), describe_fake))
    restorer = iqpir.load(tmp_path / "x.fake", device="cpu", dtype="float32")
    assert seen == [(str(tmp_path / "x.fake"), True)]
    assert restorer.restore(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match="no such run folder or checkpoint file") as err:
        iqpir.load(tmp_path / "missing")
    assert "Use the published weights" in str(err.value) and "packaged default model" in str(err.value)
