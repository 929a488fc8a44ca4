"""Inference: checkpoint -> restorer, seamless tiles, every input format, nothing overwritten."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import SMALL_MODEL

import iqpir
from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.cli import main
from iqpir.inference.restorer import Restorer, blend_window, tile_starts
from iqpir.models import build_restorer


class Identity(torch.nn.Module):
    """Stands in for the network where only the tiling arithmetic is under test."""

    class Out:
        def __init__(self, restored):
            self.restored = restored

    def forward(self, lq, quality, alpha=None):
        return self.Out(lq * 1.0)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A stage-2 run folder with a random tiny (32x32) restorer."""
    cfg = C.load(preset="tiny", overrides=[
        *SMALL_MODEL, "train.stage=2",
    ])
    torch.manual_seed(0)
    model = build_restorer(cfg.model)
    run = tmp_path_factory.mktemp("run")
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": model.state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return run


def test_tile_starts_cover_the_image():
    for length in (32, 33, 50, 100, 257):
        starts = tile_starts(length, 32, 8)
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            covered[s : s + 32] = True
        assert covered.all() and starts[-1] == max(0, length - 32)


def test_tiles_blend_without_seams():
    """With an identity network, the blended output equals the input exactly (any size)."""
    r = Restorer(Identity(), image_size=32, device="cpu", batch_size=3)
    for h, w in ((32, 32), (50, 77), (20, 45), (96, 33)):
        img = torch.rand(3, h, w)
        torch.testing.assert_close(r.restore_one(img), img, atol=1e-6, rtol=0)
    assert blend_window(32, 8).min() > 0 and blend_window(32, 16).min() > 0


def test_blend_window_ramp_values():
    """Raised-cosine ramps (1 - cos(pi (k + 1/2) / n)) / 2; at half-tile overlap, the Hann window."""
    w = blend_window(16, 4)
    ramp = torch.tensor([0.0380602, 0.3086583, 0.6913417, 0.9619398, *[1.0] * 8, 0.9619398, 0.6913417, 0.3086583,
                         0.0380602])
    torch.testing.assert_close(w, ramp[:, None] * ramp[None, :], rtol=0, atol=1e-6)
    hann = torch.sin(torch.pi * (torch.arange(16) + 0.5) / 16) ** 2
    torch.testing.assert_close(blend_window(16, 8), hann[:, None] * hann[None, :], rtol=0, atol=1e-6)
    # neighbours `tile - overlap` apart sum to 1 across their overlap
    for overlap in (4, 8):
        r = blend_window(16, overlap)[8] if overlap < 8 else hann
        torch.testing.assert_close(r[16 - overlap :] + r[:overlap], torch.ones(overlap), rtol=0, atol=1e-6)


class PositionDependent(torch.nn.Module):
    """Output = input + a bias set by where a pixel falls in its tile, as real networks have one
    (zero padding at tile borders, learned position embeddings, per-position quality maps):
    `tilt` rises across the tile, so neighbouring tiles disagree by tilt * stride / s where they
    overlap; `border` brightens the outer s/16 pixels of the tile. Records its calls. Its
    `quantizer` makes it a dual-codebook model (one that takes an alpha) to the Restorer."""

    def __init__(self, s: int, tilt: float = 0.0, border: float = 0.0):
        super().__init__()
        self.quantizer = SimpleNamespace(alpha=0.8, hq=True)
        u = (torch.arange(s) + 0.5) / s
        edge = torch.zeros(s)
        edge[: s // 16] = edge[s - s // 16 :] = 1.0
        bias = tilt * (u[None, :] + u[:, None]) / 2 + border * torch.maximum(edge[None, :], edge[:, None])
        self.register_buffer("bias", bias)
        self.calls: list[tuple[torch.Tensor, float | None]] = []

    def forward(self, lq, quality, alpha=None):
        self.calls.append((quality.clone(), alpha))
        return Identity.Out(lq + self.bias)


@pytest.mark.parametrize("size", [(70, 150), (150, 70), (33, 97)])
def test_tiles_blend_position_dependent_outputs_smoothly(size):
    """Where tiles disagree, the blend spreads the disagreement over half a tile, and a tile's
    border pixels (where networks do worst) barely count.

    Measured (max over these sizes) with the default half-tile Hann blend: the tilt's largest
    step between neighbouring pixels is 1.0x its slope within a tile, the border bias shows at
    4.7%; with the former quarter-tile overlap 4.6x and 17% (the grid at the tile stride);
    with a box window 15x and 89%."""
    s, tilt, border = 32, 0.2, 0.3
    img = torch.full((3, *size), 0.25)
    model = PositionDependent(s, tilt=tilt)
    extra = Restorer(model, image_size=s, device="cpu").restore_one(img) - img
    own_slope = tilt / (2 * s)  # per pixel, along each axis, within a tile
    jump = max(extra.diff(dim=1).abs().max(), extra.diff(dim=2).abs().max())
    assert jump <= 1.5 * own_slope, float(jump / own_slope)
    model = PositionDependent(s, border=border)
    extra = Restorer(model, image_size=s, device="cpu").restore_one(img) - img
    assert extra.abs().max() <= 0.06 * border, float(extra.abs().max() / border)


def test_tiled_path_passes_quality_and_alpha():
    model = PositionDependent(32)
    r = Restorer(model, image_size=32, device="cpu", batch_size=2)
    r.restore_one(torch.rand(3, 50, 77), quality=0.3, alpha=0.45)
    assert len(model.calls) > 4
    for quality, alpha in model.calls:
        assert torch.equal(quality, torch.full_like(quality, 0.3)) and alpha == 0.45
    model.calls.clear()
    r.restore(torch.rand(3, 32, 32), quality=0.7)  # a whole tile: one call, alpha the knob rule's (the model's)
    [(quality, alpha)] = model.calls
    assert quality.tolist() == pytest.approx([0.7]) and alpha == r.default_alpha == 0.8


def test_tiles_report_their_progress():
    """A large photo is many tiles: progress(done, total) after each batch, so a bar can move."""
    model = PositionDependent(32)
    r = Restorer(model, image_size=32, device="cpu", batch_size=3)
    seen = []
    r.restore_one(torch.rand(3, 50, 77), quality=0.3, progress=lambda done, total: seen.append((done, total)))
    total = sum(len(q) for q, _ in model.calls)
    assert seen[-1] == (total, total) and total > 4
    assert [d for d, _ in seen] == list(range(3, total, 3)) + [total]


def test_api_restores_tensors_and_pil(checkpoint_dir):
    # float32: batches equal single crops exactly (bf16 kernels may block a batch differently)
    restorer = iqpir.load(checkpoint_dir, device="cpu", dtype="float32")
    x = torch.rand(2, 3, 32, 32)
    out = restorer.restore(x, quality=1.0)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    # a batch of aligned crops equals the crops one by one
    torch.testing.assert_close(out[1], restorer.restore(x[1], quality=1.0), atol=1e-5, rtol=0)
    pil = restorer.restore(Image.new("RGB", (45, 20), (120, 30, 200)), quality=0.5)
    assert isinstance(pil, Image.Image) and pil.size == (45, 20)
    assert not torch.equal(restorer.restore(x, quality=0.0), out)  # the condition matters
    with pytest.raises(ValueError, match="quality"):
        restorer.restore(x, quality=1.5)


def test_stage1_checkpoint_is_refused(tmp_path):
    cfg = C.load(preset="tiny", overrides=["model.image_size=32", "train.stage=1"])
    from iqpir.models import build_vqgan

    ckpt.save_checkpoint(tmp_path / "s1", {"model": build_vqgan(cfg.model).state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "vqgan"})
    with pytest.raises(ValueError, match="stage-1"):
        iqpir.load(tmp_path / "s1")


def _write_formats(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 77, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "deep.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "exif.jpg", exif=exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "grey.png").read_bytes()[:60])


def test_cli_restore_formats_and_failures(checkpoint_dir, tmp_path, capsys):
    src = tmp_path / "in"
    _write_formats(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    code = main(["restore", str(src), "--checkpoint", str(checkpoint_dir), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1  # three broken files
    for bad in ("empty.png", "notes.png", "truncated.png"):
        assert bad in err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # inputs untouched
    assert Image.open(out / "alpha.png").mode == "RGBA"
    assert np.asarray(Image.open(out / "alpha.png"))[..., 3].max() == 77  # alpha carried over
    assert Image.open(out / "exif.jpg").size == (40, 50)  # EXIF rotation applied
    for name in ("rgb.jpg", "grey.png", "palette.png", "cmyk.jpg", "deep.png"):
        assert Image.open(out / name).size == (50, 40), name
    # a second run keeps existing outputs; the input folder as output is refused
    mtime = (out / "rgb.jpg").stat().st_mtime_ns
    main(["restore", str(src / "rgb.jpg"), "--checkpoint", str(checkpoint_dir), "--out", str(out), "--device", "cpu"])
    assert (out / "rgb.jpg").stat().st_mtime_ns == mtime and "--overwrite" in capsys.readouterr().err
    assert main(["restore", str(src), "--checkpoint", str(checkpoint_dir), "--out", str(src)]) == 2
    assert "overwritten" in capsys.readouterr().err
