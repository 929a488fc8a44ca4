"""iqpir.metrics: PSNR/SSIM against scikit-image, UCIQE/UIQM direction, evaluate_folder, CSV, CLI."""

from __future__ import annotations

import csv
import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest
import torch

from iqpir import metrics as M
from iqpir.cli import main as cli_main
from iqpir.io import write_image

from skimage import data as skdata  # the dev extra: a missing scikit-image must fail, not skip the file
from skimage import metrics as skmetrics


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """(256, 256, 3) float32 in [0, 1]: the astronaut photo downsampled 2x (keeps tests fast)."""
    a = skdata.astronaut().astype(np.float32) / 255.0
    return a.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    a = skdata.coffee().astype(np.float32) / 255.0  # 400 x 600
    return a[::2, ::2][:192, :256]


def _noisy(a: np.ndarray, sigma: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(a + rng.normal(0, sigma, a.shape), 0, 1).astype(np.float32)


def _blue_green_cast(x: torch.Tensor) -> torch.Tensor:
    """An underwater look: red absorbed, contrast halved, a blue-green veil added."""
    gain = torch.tensor([0.35, 0.8, 0.9]).view(1, 3, 1, 1)
    veil = torch.tensor([0.0, 0.25, 0.3]).view(1, 3, 1, 1)
    return (0.6 * gain * x + veil).clamp(0, 1)


# --------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------


def test_psnr_identical_is_inf(astronaut):
    x = _to_tensor(astronaut)
    assert torch.isinf(M.psnr(x, x)).all()
    assert torch.isinf(M.psnr(x, x, y_channel=True)).all()


def test_psnr_constant_offset_closed_form():
    x = torch.full((2, 3, 16, 16), 0.4)
    # MSE = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB exactly.
    assert torch.allclose(M.psnr(x, x + 0.1), torch.tensor([20.0, 20.0]), atol=1e-5)
    # data_range is the peak: doubling it adds 20 log10(2) dB.
    assert abs(M.psnr(x, x + 0.1, data_range=2.0)[0].item() - (20.0 + 20 * math.log10(2))) < 1e-5


def test_psnr_matches_skimage(astronaut):
    b = _noisy(astronaut)
    ours = M.psnr(_to_tensor(b), _to_tensor(astronaut)).item()
    ref = skmetrics.peak_signal_noise_ratio(astronaut.astype(np.float64), b.astype(np.float64), data_range=1)
    assert abs(ours - ref) < 1e-5, (ours, ref)  # float64 inside; the rest is the float32 result
    # crop_border removes the same pixels as slicing the arrays.
    ours_c = M.psnr(_to_tensor(b), _to_tensor(astronaut), crop_border=4).item()
    ref_c = skmetrics.peak_signal_noise_ratio(astronaut[4:-4, 4:-4], b[4:-4, 4:-4], data_range=1.0)
    assert abs(ours_c - ref_c) < 1e-4


# --------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------


def test_ssim_identical_is_one(astronaut):
    x = _to_tensor(astronaut)
    assert torch.allclose(M.ssim(x, x), torch.ones(1), atol=1e-6)


def test_ssim_matches_skimage(astronaut):
    for sigma in (0.01, 0.1):
        b = _noisy(astronaut, sigma=sigma)
        ours = M.ssim(_to_tensor(b), _to_tensor(astronaut)).item()
        ref = skmetrics.structural_similarity(
            astronaut.astype(np.float64),
            b.astype(np.float64),
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert abs(ours - ref) < 1e-5, (sigma, ours, ref)


def test_ssim_too_small_is_an_error():
    x = torch.rand(1, 3, 8, 32)
    with pytest.raises(ValueError, match="11x11"):
        M.ssim(x, x)


def test_batched_equals_per_image_loop(astronaut, coffee):
    a = astronaut[:128, :128]
    c = coffee[:128, :128]
    x = torch.cat([_to_tensor(a), _to_tensor(c), _to_tensor(a[::-1].copy())])
    y = torch.cat([_to_tensor(_noisy(arr, seed=i)) for i, arr in enumerate((a, c, a))])
    psnr_y = lambda u, v: M.psnr(u, v, y_channel=True)  # noqa: E731
    ssim_y = lambda u, v: M.ssim(u, v, y_channel=True)  # noqa: E731
    for fn in (M.psnr, M.ssim, psnr_y, ssim_y):
        batched = fn(x, y)
        loop = torch.cat([fn(x[i : i + 1], y[i : i + 1]) for i in range(3)])
        assert batched.shape == (3,)
        assert torch.allclose(batched, loop, atol=1e-5)
    for fn in (M.uciqe, M.uiqm):
        batched = fn(x)
        loop = torch.cat([fn(x[i : i + 1]) for i in range(3)])
        assert torch.allclose(batched, loop, atol=1e-5)


def test_y_channel_matches_hand_computed_y(astronaut):
    b = _noisy(astronaut)

    def y_of(arr):  # MATLAB rgb2ycbcr luma on [0, 1] input, back to [0, 1]
        arr = arr.astype(np.float64)
        return (16.0 + 65.481 * arr[..., 0] + 128.553 * arr[..., 1] + 24.966 * arr[..., 2]) / 255.0

    ya, yb = y_of(astronaut), y_of(b)
    ours_p = M.psnr(_to_tensor(b), _to_tensor(astronaut), y_channel=True).item()
    ours_s = M.ssim(_to_tensor(b), _to_tensor(astronaut), y_channel=True).item()
    ref_p = skmetrics.peak_signal_noise_ratio(ya, yb, data_range=1.0)
    ref_s = skmetrics.structural_similarity(
        ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    assert abs(ours_p - ref_p) < 1e-4
    assert abs(ours_s - ref_s) < 1e-5
    # ... and the Y path is not the RGB path.
    assert abs(ours_p - M.psnr(_to_tensor(b), _to_tensor(astronaut)).item()) > 0.1
    assert abs(ours_s - M.ssim(_to_tensor(b), _to_tensor(astronaut)).item()) > 1e-3
    # Studio swing: black -> 16/255, white -> 235/255.
    ends = M.rgb_to_y(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1)).flatten()
    assert torch.allclose(ends, torch.tensor([16 / 255, 235 / 255]), atol=1e-6)


def test_inputs_are_validated():
    with pytest.raises(ValueError):
        M.psnr(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError):
        M.psnr(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError):
        M.uiqm(torch.rand(1, 3, 16, 16) * 255)


# --------------------------------------------------------------------------------------
# UCIQE and UIQM
# --------------------------------------------------------------------------------------


def test_lab_matches_skimage(astronaut):
    from skimage.color import rgb2lab

    ours = M.rgb_to_lab(_to_tensor(astronaut).double())[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - rgb2lab(astronaut.astype(np.float64))).max() < 1e-3


@pytest.mark.parametrize("fn", [M.uciqe, M.uiqm], ids=["uciqe", "uiqm"])
def test_underwater_metrics_rank_a_colour_cast_lower(fn, astronaut, coffee):
    for img in (astronaut, coffee):
        x = _to_tensor(img)
        cast = _blue_green_cast(x)
        good, bad = fn(x).item(), fn(cast).item()
        assert math.isfinite(good) and math.isfinite(bad)
        # Higher is better: the original must beat the cast, low-contrast version clearly.
        assert good > bad + 0.05, (good, bad)


def test_uiqm_terms_behave():
    flat = torch.full((1, 3, 32, 32), 0.5)
    rgb255 = flat.double() * 255
    # A grey flat image: no colour (UICM 0), no edges (UISM 0), no contrast (UIConM 0).
    assert abs(M._uicm(rgb255).item()) < 1e-9
    assert abs(M._uism(rgb255, 8).item()) < 1e-9
    assert abs(M._uiconm(rgb255, 8).item()) < 1e-9
    # Black images are defined too (0/0 guarded).
    assert torch.isfinite(M.uiqm(torch.zeros(1, 3, 20, 20))).all()
    assert torch.isfinite(M.uciqe(torch.zeros(1, 3, 20, 20))).all()


def _two_level_block(hi: float, lo: float, size: int = 8) -> torch.Tensor:
    """One size x size grey block, left half `hi`, right half `lo` (8-bit values), as (1, 3, H, W) * 255."""
    t = torch.full((1, 3, size, size), lo, dtype=torch.float64)
    t[..., : size // 2] = hi
    return t


def test_uiqm_terms_hand_computed():
    # UIConM of one 8x8 block with I_max = 100, I_min = 50 (PLIP, gamma = k = 1026):
    # m = (1026 * 50 / 976) / (150 - 100 * 50 / 1026); one block -> c = 1 and 1 (x) s = s.
    m = (1026 * 50 / 976) / (150 - 5000 / 1026)
    assert M._uiconm(_two_level_block(100, 50), 8).item() == pytest.approx(-m * math.log(m), rel=1e-9)
    # More local contrast (below m = 1/e) gives a larger UIConM: the sign is the one that rewards contrast.
    assert M._uiconm(_two_level_block(100, 50), 8) > M._uiconm(_two_level_block(100, 90), 8) > 0
    # UICM of a uniform colour: mu_RG = 100, mu_YB = (200 + 100)/2 - 50 = 100, no variance.
    rgb = torch.tensor([200.0, 100.0, 50.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 12, 12)
    assert M._uicm(rgb).item() == pytest.approx(-0.0268 * math.sqrt(2) * 100, rel=1e-9)
    # UISM of a vertical step: only the blocks on the edge have I_max > 1, and they have I_min < 1.
    step = _two_level_block(200, 0, size=16)
    assert M._uism(step, 8).item() > 0
    assert M._uism(torch.full((1, 3, 16, 16), 200.0, dtype=torch.float64), 8).item() == 0


def test_uiqm_colour_and_sharpness_terms_drop_for_a_cast(astronaut):
    x = _to_tensor(astronaut)
    good, bad = x.double() * 255, _blue_green_cast(x).double() * 255
    assert M._uicm(good).item() > M._uicm(bad).item() + 1  # colourfulness
    assert M._uism(good, 8).item() > M._uism(bad, 8).item() + 0.5  # sharpness


def test_uciqe_contrast_term_uses_percentiles():
    # Half black, half white: L* spans 0..100, so con_l = 1; no chroma, no saturation.
    x = torch.zeros(1, 3, 10, 10)
    x[..., 5:] = 1.0
    assert abs(M.uciqe(x).item() - 0.2745) < 1e-4


# --------------------------------------------------------------------------------------
# FID helper and the table
# --------------------------------------------------------------------------------------


def test_frechet_distance_against_scipy():
    from scipy import linalg as scipy_linalg  # installed with scikit-image (the dev extra)

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    scale = torch.diag(torch.linspace(0.5, 2, 6, dtype=torch.float64))
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) @ scale + 0.3
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca + cb - 2 * covmean)
    assert abs(M.frechet_distance(a, b) - ref) < 1e-6 * max(1.0, abs(ref))
    assert abs(M.frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError):
        M.frechet_distance(a[:1], b)


def test_markdown_table_marks_best_per_dataset():
    rows = [
        {"method": "A", "dataset": "D1", "n_images": 3, "psnr": 25.0, "niqe": 4.0, "custom": 1.0},
        {"method": "B", "dataset": "D1", "n_images": 3, "psnr": 26.0, "niqe": 5.0, "custom": 2.0},
        {"method": "C", "dataset": "D2", "n_images": 3, "psnr": 20.0, "niqe": 6.0},
        {"method": "D", "dataset": "D1", "n_images": 3, "psnr": "", "niqe": 4.0},
    ]
    table = M.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| Method | Dataset | N | PSNR ↑ | NIQE ↓ | CUSTOM |"
    assert lines[2] == "| A | D1 | 3 | 25.00 | **4.000** | 1.000 |"
    assert lines[3] == "| B | D1 | 3 | **26.00** | 5.000 | 2.000 |"
    assert lines[4] == "| C | D2 | 3 | 20.00 | 6.000 | - |"  # alone in its dataset: best of nothing
    assert lines[5] == "| D | D1 | 3 | - | **4.000** | - |"  # ties are all bold
    # Directions can be given (an NR-IQA scorer's lower_better); one group over all rows.
    t2 = M.markdown_table(rows, {"custom": "higher"}, group_by=None).splitlines()
    assert t2[0].endswith("CUSTOM ↑ |") and "**2.000**" in t2[3] and "**20.00**" not in t2[4]


# --------------------------------------------------------------------------------------
# evaluate_folder, CSV and CLI
# --------------------------------------------------------------------------------------


class _FakeScorer:
    """Stands in for an iqpir.iqa scorer: the mean brightness, lower is better."""

    name = "fakeiqa"
    native_range = (0.0, 1.0)
    lower_better = True
    differentiable = True

    def __call__(self, images):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture
def fake_iqa(monkeypatch):
    import iqpir.iqa

    def build_scorer(name, device="cpu", weights_dir=None):
        if name != "fakeiqa":
            raise KeyError(f"unknown NR-IQA model {name!r}")
        return _FakeScorer()

    monkeypatch.setattr(iqpir.iqa, "build_scorer", build_scorer, raising=False)


def _folders(tmp_path, astronaut, coffee, extra=True):
    ref, res = tmp_path / "gt", tmp_path / "restorer-a"
    imgs = {"face": astronaut[:64, :64], "cup": coffee[:48, :64], "face2": astronaut[64:128, 64:128]}
    for stem, arr in imgs.items():
        t = _to_tensor(arr)[0]
        write_image(ref / f"{stem}.png", t)
        write_image(res / f"{stem}.png", torch.from_numpy(_noisy(arr, 0.03)).permute(2, 0, 1))
    if extra:
        write_image(res / "orphan.png", _to_tensor(astronaut[:32, :32])[0])  # no reference
        (res / "broken.png").write_bytes(b"this is not a png")  # unreadable
        write_image(res / "small.png", _to_tensor(coffee[:40, :40])[0])  # size mismatch
        write_image(ref / "small.png", _to_tensor(coffee[:48, :48])[0])
    return res, ref


def test_evaluate_folder_with_reference(tmp_path, astronaut, coffee, fake_iqa, capsys):
    res, ref = _folders(tmp_path, astronaut, coffee)
    out = tmp_path / "results" / "table.csv"
    rep = M.evaluate_folder(res, reference=ref, metrics=["psnr", "ssim", "fakeiqa"], dataset="toy", out=out)
    assert [p.name for p in rep.done] == ["cup.png", "face.png", "face2.png"]
    assert any("broken.png" in p for p, _ in rep.failed)
    skipped = dict((p.split("/")[-1], why) for p, why in rep.skipped)
    assert "orphan" in skipped["orphan.png"] and "no reference" in skipped["orphan.png"]
    assert "differs from reference" in skipped["small.png"]
    assert rep.row["method"] == "restorer-a" and rep.row["n_images"] == 3
    assert rep.row["psnr"] == pytest.approx(np.mean([v["psnr"] for v in rep.per_image.values()]))
    assert 25 < rep.row["psnr"] < 40 and 0 < rep.row["ssim"] < 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "orphan.png" in err and "small.png" in err
    # the minute of loading LPIPS/FID/pyiqa models is announced before it starts (issue 25)
    assert err.index("evaluate: loading psnr, ssim, fakeiqa") < err.index("metrics ready") < err.index("broken.png")

    # A second, better method: two rows, and the best per column is bold.
    res_b = tmp_path / "restorer-b"
    for p in ref.glob("*.png"):
        if p.stem != "small":
            (res_b / p.name).parent.mkdir(exist_ok=True)
            (res_b / p.name).write_bytes(p.read_bytes())  # perfect restorations: psnr = inf
    rep_b = M.evaluate_folder(res_b, reference=ref, metrics=["psnr", "ssim", "fakeiqa"], 
                              dataset="toy", out=out)
    assert rep_b.failed == [] and rep_b.row["psnr"] == math.inf
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["restorer-a", "restorer-b"]
    assert list(rows[0]) == ["method", "dataset", "n_images", "psnr", "ssim", "fakeiqa"]
    lines = rep_b.table.splitlines()
    assert lines[0] == "| Method | Dataset | N | PSNR ↑ | SSIM ↑ | FAKEIQA ↓ |"
    a_cells, b_cells = lines[2].split(" | "), lines[3].split(" | ")
    assert b_cells[3] == "**inf**" and b_cells[4] == "**1.000**"
    assert not a_cells[3].startswith("**") and not a_cells[4].startswith("**")
    # fakeiqa is lower-better (the scorer says so): the noisier restorer-a is "better" on it.
    fa = float(a_cells[5].strip(" |*"))
    fb = float(b_cells[5].strip(" |*"))
    assert (fa < fb) == a_cells[5].startswith("**")


def test_evaluate_header_merge_keeps_everything(tmp_path, astronaut, coffee):
    res, ref = _folders(tmp_path, astronaut, coffee, extra=False)
    out = tmp_path / "results.csv"
    out.write_text("method,dataset,n_images,psnr,ssim,musiq\nold,toy,10,24.5,0.81,70.1\n")
    rep = M.evaluate_folder(res, reference=ref, metrics=["psnr", "uciqe"], name="new", out=out, quiet=True)
    assert rep.failed == []
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        cols, rows = reader.fieldnames, list(reader)
    assert cols == ["method", "dataset", "n_images", "psnr", "ssim", "musiq", "uciqe"]
    assert rows[0] == {"method": "old", "dataset": "toy", "n_images": "10", "psnr": "24.5", "ssim": "0.81",
                       "musiq": "70.1", "uciqe": ""}
    assert rows[1]["method"] == "new" and rows[1]["ssim"] == "" and float(rows[1]["uciqe"]) > 0
    assert "| old |" in rep.table and "| new |" in rep.table and "MUSIQ ↑" in rep.table


def test_evaluate_no_reference_and_missing_weights_notes(tmp_path, astronaut, coffee, monkeypatch, capsys):
    res, ref = _folders(tmp_path, astronaut, coffee, extra=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    rep = M.evaluate_folder(res, metrics=["uiqm", "uciqe"], out=tmp_path / "nr.csv")
    assert rep.failed == [] and rep.row["n_images"] == 3 and "uiqm" in rep.row
    # FR metrics need a reference.
    with pytest.raises(ValueError, match="reference"):
        M.evaluate_folder(res, metrics=["psnr"], out=tmp_path / "x.csv", quiet=True)
    # LPIPS/FID without local weights: one line each, column left out, PSNR still computed.
    capsys.readouterr()
    rep = M.evaluate_folder(res, reference=ref, metrics=["psnr", "lpips", "fid"], out=tmp_path / "fr.csv")
    err = capsys.readouterr().err
    lp = [line for line in err.splitlines() if line.startswith("lpips skipped:")]
    fid = [line for line in err.splitlines() if line.startswith("fid skipped:")]
    assert len(lp) == 1 and len(fid) == 1 and str(tmp_path / "torch-home") in lp[0] + fid[0]
    assert "lpips" not in rep.row and "fid" not in rep.row and "psnr" in rep.row
    assert "lpips" not in (tmp_path / "fr.csv").read_text().splitlines()[0]


def test_evaluate_lpips_when_package_and_weights_present(tmp_path, astronaut, coffee, monkeypatch):
    # A stand-in lpips package: checks the wiring (weights lookup, [0, 1] input, column), not LPIPS itself.
    fake = types.ModuleType("lpips")
    fake.__spec__ = importlib.machinery.ModuleSpec("lpips", None)

    class LPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()
            assert net == "alex"

        def forward(self, a, b, normalize=False):
            assert normalize
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    fake.LPIPS = LPIPS
    monkeypatch.setitem(sys.modules, "lpips", fake)
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / M.LPIPS_BACKBONE_FILE).write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(home))
    res, ref = _folders(tmp_path, astronaut, coffee, extra=False)
    rep = M.evaluate_folder(res, reference=ref, metrics=["lpips"], out=tmp_path / "r.csv", quiet=True)
    assert rep.notes == [] and 0 < rep.row["lpips"] < 0.1
    assert "LPIPS ↓" in rep.table


def test_evaluate_default_metrics_with_the_real_nr_iqa_module(tmp_path, astronaut, coffee):
    ref, res = tmp_path / "gt", tmp_path / "method"
    for stem, arr in {"a": astronaut[:192], "c": coffee}.items():  # NIQE needs >= 2 patches of 96 px
        write_image(ref / f"{stem}.png", _to_tensor(arr)[0])
        write_image(res / f"{stem}.png", torch.from_numpy(_noisy(arr, 0.05)).permute(2, 0, 1))
    out = tmp_path / "r.csv"
    rep = M.evaluate_folder(res, reference=ref, out=out, dataset="toy", quiet=True)
    assert rep.failed == [], rep.failed
    assert list(rep.row) == ["method", "dataset", "n_images", "psnr", "ssim", "niqe", "piqe"]
    assert rep.row["niqe"] > 0 and 0 <= rep.row["piqe"] <= 100
    assert rep.table.splitlines()[0] == "| Method | Dataset | N | PSNR ↑ | SSIM ↑ | NIQE ↓ | PIQE ↓ |"
    rep_nr = M.evaluate_folder(ref, out=out, name="gt", dataset="toy", quiet=True)  # no reference: niqe, piqe
    assert list(rep_nr.row)[3:] == ["niqe", "piqe"]
    # Both rows in one table; the lower NIQE of the two is the bold one.
    rows = rep_nr.table.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| method", "| gt"]
    best = 0 if rep.row["niqe"] < rep_nr.row["niqe"] else 1
    assert rows[best].split(" | ")[5].startswith("**") and not rows[1 - best].split(" | ")[5].startswith("**")


def test_unknown_metric_is_an_error(tmp_path, astronaut, coffee, fake_iqa):
    res, ref = _folders(tmp_path, astronaut, coffee, extra=False)
    with pytest.raises(ValueError, match="nosuchmetric"):
        M.evaluate_folder(res, metrics=["nosuchmetric"], out=tmp_path / "x.csv", quiet=True)
    assert not (tmp_path / "x.csv").exists()


def test_cli_evaluate_exit_codes(tmp_path, astronaut, coffee, capsys):
    res, ref = _folders(tmp_path, astronaut, coffee, extra=False)
    out = tmp_path / "cli.csv"
    args = ["evaluate", str(res), "--reference", str(ref), "--metrics", "psnr,ssim", "--name", "m1"]
    args += ["--out", str(out)]
    assert cli_main(args) == 0
    assert "| m1 |" in capsys.readouterr().out
    assert cli_main(args + ["--y-channel"]) == 0
    assert "PSNR-Y ↑" in capsys.readouterr().out
    (res / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert cli_main(args) == 1
    assert "broken.png" in capsys.readouterr().err
    assert cli_main(["evaluate", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert cli_main(["evaluate", str(res), "--metrics", "psnr", "--out", str(out)]) == 2  # no reference
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_a_metric_that_cannot_score_small_images_leaves_only_its_column_out(tmp_path, astronaut, capsys):
    """NIQE needs two 96x96 blocks: on 80-px images PSNR, SSIM and PIQE are still written."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small images: one thread is faster on busy shared cores
    try:
        for folder, noise in (("gt", 0.0), ("res", 0.03)):
            for i in range(2):
                arr = astronaut[i * 80 : (i + 1) * 80, :80]
                img = _noisy(arr, noise) if noise else np.ascontiguousarray(arr)
                write_image(tmp_path / folder / f"{i}.png", torch.from_numpy(img).permute(2, 0, 1))
        rc = cli_main(["evaluate", str(tmp_path / "res"), "--reference", str(tmp_path / "gt"),
                       "--out", str(tmp_path / "r.csv")])  # default metrics: psnr, ssim, niqe, piqe
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert rc == 0
    with open(tmp_path / "r.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["n_images"] == "2" and "niqe" not in row
    assert float(row["psnr"]) > 20 and 0 < float(row["ssim"]) < 1 and float(row["piqe"]) > 0
    assert "niqe left out of the row" in err and err.count("too small for NIQE: 80x80 px") == 2
