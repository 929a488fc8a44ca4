"""Degradation pipelines, folder datasets and `iqpir degrade` (offline, CPU, small images)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqpir.cli import main as cli_main
from iqpir.config import DegradationConfig
from iqpir.data import (
    DEGRADATIONS,
    HQFolderDataset,
    PairedFolderDataset,
    collate,
    degrade,
    degrade_files,
    score_key,
)
from iqpir.data.degradations import gaussian_kernel, random_bfr_kernel
from iqpir.io import read_image

PRESETS = sorted(DEGRADATIONS)


def _smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) smooth random images at 8-bit levels (so rounding is exact)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).mul(255).round().div(255)


def _write_png(path: Path, h: int, w: int, seed: int, alpha: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 4 if alpha else 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="RGBA" if alpha else "RGB").save(path)
    return path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Degradations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_degradation_is_seeded_and_in_range(preset: str) -> None:
    cfg = DegradationConfig()
    x = _smooth_images(2, 48, 40)
    a = degrade(x, cfg, preset, _gen(1))
    b = degrade(x, cfg, preset, _gen(1))
    c = degrade(x, cfg, preset, _gen(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)  # bit-equal under the same seed
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, a.mul(255).round().div(255))  # 8-bit levels
    assert not torch.equal(a, x)
    assert torch.equal(x, _smooth_images(2, 48, 40))  # the input is not modified


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_equals_samples_in_order(preset: str) -> None:
    """A batch draws per sample, in order: the batch size does not change the data."""
    cfg = DegradationConfig()
    x = _smooth_images(2, 32, 32, seed=3)
    batch = degrade(x, cfg, preset, _gen(5))
    g = _gen(5)
    one = torch.cat([degrade(x[i : i + 1], cfg, preset, g) for i in range(2)])
    assert torch.allclose(batch, one, atol=1 / 255 + 1e-6)
    assert (batch != one).float().mean() < 0.01  # conv batching may move a rare value by one level
    twins = degrade(x[:1].repeat(2, 1, 1, 1), cfg, preset, _gen(5))
    assert not torch.equal(twins[0], twins[1])  # each sample draws its own parameters (and noise)


# sha256 (first 16 hex digits) of the 8-bit output of one seeded call. A change in the order or
# number of random draws changes every seeded run's data and shows here. The JPEG-free presets
# only (libjpeg versions may round differently). Re-pin, and say why in the commit, only when
# the change of data is intended or torch changed its generators.
PINNED = {"backlit": "799a17322b59b495", "lowlight": "aebced88693a9557", "underwater": "e2ec19dd03de710f"}


@pytest.mark.parametrize("preset", sorted(PINNED))
def test_seeded_output_is_pinned(preset: str) -> None:
    y = degrade(_smooth_images(2, 24, 20, seed=4), DegradationConfig(), preset, _gen(11))
    digest = hashlib.sha256((y * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    assert digest == PINNED[preset]


def test_int_seed_and_unknown_preset() -> None:
    cfg = DegradationConfig(preset="lowlight")
    x = _smooth_images(1, 16, 16)
    assert torch.equal(degrade(x, cfg, generator=3), degrade(x, cfg, "lowlight", _gen(3)))
    with pytest.raises(ValueError, match="unknown degradation preset"):
        degrade(x, cfg, "fog", _gen(0))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        degrade(x[0], cfg, "bfr", _gen(0))


def test_bfr_kernel_sums_to_one_and_is_symmetric() -> None:
    cfg = DegradationConfig().bfr
    for seed in range(6):
        k = random_bfr_kernel(cfg, _gen(seed))
        assert k.shape == (41, 41)
        assert abs(k.sum().item() - 1.0) < 1e-9
        assert torch.allclose(k, k.flip(0, 1))  # point-symmetric: correlation == convolution
    k = gaussian_kernel(41, 3.0, 3.0)
    assert torch.allclose(k, k.T)
    aniso = gaussian_kernel(41, 8.0, 1.0, 0.0)
    assert aniso[20, :].sum() > aniso[:, 20].sum()  # sigma_x spreads along x (columns)
    rotated = gaussian_kernel(41, 8.0, 1.0, np.pi / 2)
    assert torch.allclose(rotated, aniso.T, atol=1e-12)


def test_bfr_small_image_and_identity_like_settings() -> None:
    # smaller than half the kernel: replicate padding instead of reflect
    cfg = DegradationConfig()
    x = _smooth_images(1, 12, 9)
    y = degrade(x, cfg, "bfr", _gen(0))
    assert y.shape == x.shape
    # no blur worth the name, no downsampling, no noise, the best JPEG: close to the input
    mild = dataclasses.replace(
        cfg.bfr, blur_sigma=[0.05, 0.05], downsample=[1.0, 1.0], noise=[0.0, 0.0], jpeg_quality=[100, 100]
    )
    x = _smooth_images(2, 32, 32)
    y = degrade(x, dataclasses.replace(cfg, bfr=mild), "bfr", _gen(0))
    # (JPEG's 4:2:0 chroma subsampling, libjpeg's default as in cv2, still moves colour edges)
    assert (y - x).abs().mean() < 1.5 / 255


def test_zero_strength_is_identity() -> None:
    x = _smooth_images(3, 24, 20)
    cfg = DegradationConfig()
    cfg.lowlight = dataclasses.replace(cfg.lowlight, exposure=[1.0, 1.0], gamma=[1.0, 1.0], shot_noise=[0.0, 0.0], read_noise=[0.0, 0.0])
    cfg.underwater = dataclasses.replace(cfg.underwater, depth=[0.0, 0.0])
    cfg.backlit = dataclasses.replace(cfg.backlit, subject_gain=[1.0, 1.0], background_gain=[1.0, 1.0])
    for preset in ("lowlight", "underwater", "backlit"):
        y = degrade(x, cfg, preset, _gen(0))
        assert (y - x).abs().max() <= 1e-6, preset


def test_degradations_do_what_they_say() -> None:
    x = _smooth_images(4, 32, 32, seed=7) * 0.8 + 0.1
    cfg = DegradationConfig()
    assert degrade(x, cfg, "lowlight", _gen(0)).mean() < 0.5 * x.mean()
    uw = degrade(x, cfg, "underwater", _gen(0))
    # red is attenuated most: the red share of the image falls
    assert (uw[:, 0].mean() / uw.mean()) < (x[:, 0].mean() / x.mean())
    # backlit: one gain below 1 on the subject, one above 1 on the background
    flat = torch.full((1, 3, 64, 64), 0.5)
    bl = degrade(flat, cfg, "backlit", _gen(0))
    assert bl.min() < 0.3 and bl.max() > 0.55


def test_bad_config_range_is_named() -> None:
    cfg = DegradationConfig()
    cfg.lowlight = dataclasses.replace(cfg.lowlight, gamma=[2.0, 1.0])
    with pytest.raises(ValueError, match="lowlight.gamma"):
        degrade(_smooth_images(1, 8, 8), cfg, "lowlight", _gen(0))


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


@pytest.fixture()
def hq_folder(tmp_path: Path) -> Path:
    root = tmp_path / "hq"
    _write_png(root / "a.png", 40, 48, 0)
    _write_png(root / "b.png", 20, 30, 1)  # smaller than the crop: upscaled
    _write_png(root / "sub" / "c.png", 64, 64, 2)
    return root


def _scores(root: Path) -> dict[str, float]:
    return {score_key(p): 0.1 * (i + 1) for i, p in enumerate(sorted(root.rglob("*.png")))}


def test_hq_dataset_sample_is_deterministic(hq_folder: Path) -> None:
    ds = HQFolderDataset(hq_folder, 32, "crop", True, DegradationConfig(), "bfr", _scores(hq_folder), seed=0)
    assert len(ds) == 3
    s1, s2 = ds.sample(1, 5), ds.sample(1, 5)
    assert s1["hq"].shape == (3, 32, 32) and s1["lq"].shape == (3, 32, 32)
    assert torch.equal(s1["hq"], s2["hq"]) and torch.equal(s1["lq"], s2["lq"])
    assert s1["quality"].dtype == torch.float32 and s1["quality"].shape == ()
    assert s1["path"] == score_key(ds.paths[1])
    assert not torch.equal(ds.sample(1, 6)["lq"], s1["lq"])
    assert torch.equal(ds[2]["lq"], ds.sample(2, 0)["lq"])
    assert torch.equal(ds[-1]["hq"], ds[2]["hq"])
    with pytest.raises(IndexError):
        ds.sample(3, 0)
    other = HQFolderDataset(hq_folder, 32, "crop", True, DegradationConfig(), "bfr", _scores(hq_folder), seed=1)
    assert not torch.equal(other.sample(1, 5)["lq"], s1["lq"])
    cached = HQFolderDataset(hq_folder, 32, "crop", True, DegradationConfig(), "bfr", _scores(hq_folder), 0, cache=True)
    for _ in range(2):
        assert torch.equal(cached.sample(1, 5)["lq"], s1["lq"])


def test_hq_dataset_flip_both_ways_and_crop_positions(hq_folder: Path) -> None:
    ds = HQFolderDataset(hq_folder, 32, "crop", True, None, None, 0.9)
    full = ds._load(ds.paths[0])  # 40 x 48
    flips, offsets = set(), set()
    for epoch in range(24):
        hq = ds.sample(0, epoch)["hq"]
        found = False
        for top in range(full.shape[1] - 31):
            for left in range(full.shape[2] - 31):
                crop = full[:, top : top + 32, left : left + 32]
                for flipped in (False, True):
                    if torch.equal(hq, crop.flip(-1) if flipped else crop):
                        flips.add(flipped)
                        offsets.add((top, left))
                        found = True
        assert found
    assert flips == {False, True}
    assert len(offsets) > 5
    no_flip = HQFolderDataset(hq_folder, 32, "crop", False, None, None, 0.9)
    for epoch in range(8):
        hq = no_flip.sample(0, epoch)["hq"]
        assert any(
            torch.equal(hq, full[:, t : t + 32, l : l + 32]) for t in range(full.shape[1] - 31) for l in range(full.shape[2] - 31)
        )
    # without a degradation, lq is hq
    s = ds.sample(0, 0)
    assert torch.equal(s["lq"], s["hq"]) and s["quality"].item() == pytest.approx(0.9)


def test_hq_dataset_resize_mode_and_small_images(hq_folder: Path) -> None:
    ds = HQFolderDataset(hq_folder, 32, "resize", False, DegradationConfig(), "lowlight", 1.0)
    for i in range(len(ds)):
        s = ds.sample(i, 0)
        assert s["hq"].shape == (3, 32, 32) and s["lq"].shape == (3, 32, 32)
        assert 0 <= s["hq"].min() and s["hq"].max() <= 1
    crop = HQFolderDataset(hq_folder, 32, "crop", True, None, None, 1.0)
    assert crop.sample(1, 0)["hq"].shape == (3, 32, 32)  # b.png is 20 x 30: upscaled to fit


def test_quality_lookup_and_missing_score(hq_folder: Path) -> None:
    scores = _scores(hq_folder)
    ds = HQFolderDataset(hq_folder, 16, "crop", True, None, None, scores)
    for i, p in enumerate(ds.paths):
        assert ds.sample(i, 0)["quality"].item() == pytest.approx(scores[score_key(p)])
    missing = dict(scores)
    del missing[score_key(hq_folder / "sub" / "c.png")]
    with pytest.raises(KeyError, match="c.png"):
        HQFolderDataset(hq_folder, 16, "crop", True, None, None, missing)
    # a callable is asked lazily, by resolved path
    asked = []
    ds = HQFolderDataset(hq_folder, 16, "crop", True, None, None, lambda p: asked.append(p) or 0.25)
    assert ds.sample(0, 0)["quality"].item() == 0.25 and asked == [score_key(ds.paths[0])]
    with pytest.raises(TypeError, match="quality is required"):
        HQFolderDataset(hq_folder, 16, "crop", True, None, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        HQFolderDataset(hq_folder, 16, "crop", True, None, None, 3.0).sample(0, 0)


def test_collate(hq_folder: Path) -> None:
    ds = HQFolderDataset(hq_folder, 16, "crop", True, DegradationConfig(), "underwater", 0.5)
    batch = collate([ds.sample(i, 1) for i in range(3)])
    assert batch["hq"].shape == (3, 3, 16, 16) and batch["lq"].shape == (3, 3, 16, 16)
    assert batch["quality"].shape == (3,) and batch["quality"].dtype == torch.float32
    assert batch["path"] == [score_key(p) for p in ds.paths]


def test_paired_dataset_matches_by_name(tmp_path: Path) -> None:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    for i, name in enumerate(["x", "y", "z"]):
        _write_png(hq / f"{name}.png", 40, 40, i)
    # LQ: the same content halved, in another (lossless) format, plus one unmatched file
    lq.mkdir()
    for name in ["x", "y"]:
        arr = np.asarray(Image.open(hq / f"{name}.png"))
        Image.fromarray((arr // 2).astype(np.uint8)).save(lq / f"{name}.bmp")
    _write_png(lq / "extra.png", 40, 40, 9)
    with pytest.warns(UserWarning, match="2 unmatched"):
        ds = PairedFolderDataset(lq, hq, 24, "crop", True, 0.7, seed=0)
    assert len(ds) == 2 and [p.stem for _, p in ds.pairs] == ["x", "y"]
    seen_flip = set()
    for epoch in range(10):
        s = ds.sample(0, epoch)
        assert s["hq"].shape == (3, 24, 24) == s["lq"].shape
        # the same crop and flip on both: lq == hq // 2 at 8-bit levels
        expect = (s["hq"] * 255).round().div(2).floor()
        assert torch.equal((s["lq"] * 255).round(), expect)
        full = read_image(hq / "x.png").rgb
        seen_flip.add(not any(torch.equal(s["hq"], full[:, t : t + 24, l : l + 24]) for t in range(17) for l in range(17)))
        assert torch.equal(ds.sample(0, epoch)["lq"], s["lq"])
    assert seen_flip == {False, True}
    assert ds.sample(1, 0)["path"] == score_key(hq / "y.png")
    assert ds.sample(1, 0)["quality"].item() == pytest.approx(0.7)
    empty = tmp_path / "other"
    _write_png(empty / "q.png", 8, 8, 0)
    with pytest.raises(ValueError, match="matches"):
        PairedFolderDataset(empty, hq, 8, "crop", True, 1.0)


# --------------------------------------------------------------------------------------
# degrade_files and the CLI
# --------------------------------------------------------------------------------------


def test_degrade_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _write_png(src / "a.png", 24, 32, 0)
    _write_png(src / "sub" / "b.png", 20, 20, 1, alpha=True)
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(src / "c.jpg", quality=95)
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    cfg = DegradationConfig()
    report = degrade_files([src], out, cfg, "bfr", seed=0, progress=False)
    names = sorted(p.relative_to(out).as_posix() for p in report.done)
    assert names == ["a.png", "c.jpg", "sub/b.png"]
    assert [Path(p).name for p, _ in report.failed] == ["broken.png"]
    assert "broken.png" in report.summary()
    b = read_image(out / "sub" / "b.png")
    assert b.alpha is not None and torch.equal(b.alpha, read_image(src / "sub" / "b.png").alpha)
    assert b.rgb.shape == (3, 20, 20)
    # same image + seed -> same bytes, whatever the other inputs
    out2 = tmp_path / "out2"
    degrade_files([src / "a.png"], out2, cfg, "bfr", seed=0, progress=False)
    assert (out2 / "a.png").read_bytes() == (out / "a.png").read_bytes()
    out3 = tmp_path / "out3"
    degrade_files([src / "a.png"], out3, cfg, "bfr", seed=1, progress=False)
    assert (out3 / "a.png").read_bytes() != (out / "a.png").read_bytes()


def test_each_file_of_a_degrade_run_gets_its_own_draw(tmp_path: Path) -> None:
    """Noise only (no blur, scaling or JPEG): with one shared draw, two mid-grey files would get the
    same noise; with a draw per file (seeded by its content) they get different noise, and a file
    degraded again with the same seed gets the same bytes."""
    src = tmp_path / "in"
    src.mkdir()
    for name, grey in (("a.png", 120), ("b.png", 136)):
        Image.fromarray(np.full((32, 32, 3), grey, np.uint8)).save(src / name)
    cfg = DegradationConfig()
    cfg.bfr.blur_sigma, cfg.bfr.downsample = [0.1, 0.1], [1.0, 1.0]
    cfg.bfr.noise, cfg.bfr.jpeg_quality = [8.0, 8.0], [100, 100]
    degrade_files([src], tmp_path / "out", cfg, "bfr", seed=0, progress=False)
    noise = {n: np.asarray(Image.open(tmp_path / "out" / n), np.int16) - np.asarray(Image.open(src / n), np.int16)
             for n in ("a.png", "b.png")}
    assert noise["a.png"].std() > 3 and noise["b.png"].std() > 3  # the noise is there
    assert (noise["a.png"] != noise["b.png"]).mean() > 0.5
    degrade_files([src / "b.png"], tmp_path / "again", cfg, "bfr", seed=0, progress=False)
    assert (tmp_path / "again" / "b.png").read_bytes() == (tmp_path / "out" / "b.png").read_bytes()


def test_degrade_files_refuses_to_mix_with_inputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _write_png(src / "a.png", 8, 8, 0)
    cfg = DegradationConfig()
    with pytest.raises(ValueError, match="is the input folder"):
        degrade_files([src], src, cfg, "lowlight", progress=False)
    with pytest.raises(ValueError, match="inside the input folder"):
        degrade_files([src], src / "lq", cfg, "lowlight", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        degrade_files([src / "a.png"], src, cfg, "lowlight", progress=False)
    assert sorted(p.name for p in src.rglob("*")) == ["a.png"]


def test_cli_degrade_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    _write_png(src / "a.png", 16, 16, 0)
    assert cli_main(["degrade", str(src), "--out", str(tmp_path / "ok"), "--preset", "underwater"]) == 0
    assert (tmp_path / "ok" / "a.png").is_file()
    (src / "bad.png").write_bytes(b"")
    assert cli_main(["degrade", str(src), "--out", str(tmp_path / "o2"), "--preset", "backlit", "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "1 failed" in err
    assert (tmp_path / "o2" / "a.png").is_file()
    assert cli_main(["degrade", str(src), "--out", str(src)]) == 2
