"""NR-IQA scorers, the quality ensemble and `iqpir score` (offline, CPU).

Published values: tests/assets/README.md (LIVE NIQE release, MATLAB piqe, TID2013 I04/I06).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iqpir.io import file_digest, load_rgb, write_image
from iqpir.iqa import QualityEnsemble, available_metrics, build_scorer, normalize
from iqpir.iqa.base import Scorer
from iqpir.iqa.table import quality_for, read_score_table, score_files

ASSETS = Path(__file__).parent / "assets"
PUBLISHED = {  # image: (NIQE, PIQE)
    "I04": (3.65492152353770, 21.62),
    "I06": (3.23547743716998, 35.86),
}


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    return {k: load_rgb(ASSETS / f"{k}.png")[None] for k in PUBLISHED}


@pytest.fixture(scope="module")
def niqe():
    return build_scorer("niqe")


@pytest.fixture(scope="module")
def piqe():
    return build_scorer("piqe")


def _blur(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    r = 6
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    y = F.pad(x, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3).clamp(0, 1)


# --------------------------------------------------------------------------------------
# Built-in scorers against the published MATLAB numbers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_niqe_matches_live_release(images, niqe, name):
    value = float(niqe(images[name])[0])
    # The reproduction is exact to float32 precision (I04 2e-9 relative, I06 1.8e-5), so the
    # bound guards the MATLAB details: rgb2gray's weights and rounding, imresize, nancov/pinv
    # (Rec. 601 grey weights alone move I06 by 1.9e-4).
    assert value == pytest.approx(PUBLISHED[name][0], rel=1e-4)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_piqe_matches_matlab(images, piqe, name):
    value = float(piqe(images[name])[0])
    # Published with two decimals: half a unit of the last place plus float margin (measured
    # +0.0044 on I04 and +0.0045 on I06; dropping the +1 of the pooling formula moves I06 by 0.08).
    assert value == pytest.approx(PUBLISHED[name][1], abs=0.006)


def test_scorer_protocol_and_registry(niqe, piqe):
    assert available_metrics() == ["niqe", "piqe", "niqe_diff"]
    for s in (niqe, piqe, build_scorer("niqe_diff")):
        assert isinstance(s, Scorer)
        assert s.lower_better
        lo, hi = s.native_range
        assert lo < hi
    assert not niqe.differentiable and not piqe.differentiable
    assert build_scorer("niqe_diff").differentiable


def test_batched_equals_per_image(images):
    crop = (..., slice(0, 192), slice(0, 288))  # 2x3 NIQE blocks, 12x18 PIQE blocks: enough here
    batch = torch.cat([images["I04"][crop], images["I06"][crop], images["I04"].flip(-1)[crop]])
    for name in ("niqe", "piqe"):
        # cpu_chunk=8: the whole batch in one vectorised pass (what GPUs run); 2: passes of 2 + 1.
        together = build_scorer(name, cpu_chunk=8)(batch)
        grouped = build_scorer(name, cpu_chunk=2)(batch)
        single = build_scorer(name)
        alone = torch.cat([single(batch[i : i + 1]) for i in range(batch.shape[0])])
        assert together.shape == (3,)
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grouped, alone, rtol=1e-5, atol=1e-5)


def test_niqe_crops_to_whole_blocks_and_rejects_small_images(images, niqe):
    x = images["I04"]
    padded = F.pad(x, (0, 50, 0, 40), value=0.3)  # extra rows/columns beyond whole 96-blocks
    assert float(niqe(padded)[0]) == pytest.approx(float(niqe(x)[0]), rel=1e-6)
    with pytest.raises(ValueError, match="96x96"):
        niqe(x[..., :64, :])


def test_piqe_pads_like_matlab(images, piqe):
    """Sizes that are not multiples of 16 are padded at the bottom/right by replicating edge
    pixels (MATLAB piqe): a 380x500 crop of real content scores as its explicitly padded copy."""
    crop = images["I04"][..., :380, :500]
    padded = F.pad(crop, (0, 12, 0, 4), mode="replicate")  # to 384 x 512
    assert float(piqe(crop)[0]) == pytest.approx(float(piqe(padded)[0]), abs=1e-9)
    assert float(piqe(crop)[0]) != pytest.approx(float(piqe(F.pad(crop, (0, 12, 0, 4), mode="reflect"))[0]), abs=1e-3)
    flat = torch.full((1, 3, 40, 50), 0.5)
    assert float(piqe(flat)[0]) == pytest.approx(100.0)  # no active block: the worst score


# --------------------------------------------------------------------------------------
# Differentiable NIQE
# --------------------------------------------------------------------------------------


def test_niqe_diff_close_to_niqe_with_finite_gradient(images, niqe):
    diff = build_scorer("niqe_diff")
    for name in PUBLISHED:
        x = images[name].clone().requires_grad_(True)
        value = diff(x)
        # Measured: I04 +0.02%, I06 -0.06% (TID2013 I03/I08/I19: +0.03/+0.00/+0.13%).
        assert float(value.detach()) == pytest.approx(float(niqe(images[name])[0]), rel=5e-3)
        (grad,) = torch.autograd.grad(value.sum(), x)
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_niqe_diff_gradient_steps_raise_quality(images, niqe, kind):
    x0 = images["I04"][..., :192, :288]
    if kind == "blur":
        start = _blur(x0)
    else:
        g = torch.Generator().manual_seed(0)
        start = (x0 + 0.05 * torch.randn(x0.shape, generator=g)).clamp(0, 1)
    q = QualityEnsemble(["niqe_diff"])
    assert q.differentiable
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-3)  # about 0.25 grey levels per step
    for _ in range(5):
        loss = 1 - q(x).mean()  # the stage-2 quality loss
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    before = normalize(niqe, niqe(start))
    after = normalize(niqe, niqe(x.detach()))
    assert float(after) > float(before) + 0.02


# --------------------------------------------------------------------------------------
# Normalisation and the ensemble
# --------------------------------------------------------------------------------------


class _Fake:
    def __init__(self, name, rng, lower, diff=False, value=None):
        self.name, self.native_range, self.lower_better, self.differentiable = name, rng, lower, diff
        self.value = value

    def __call__(self, images):
        return torch.full((images.shape[0],), float(self.value), dtype=torch.float32)

    def to(self, device):
        return self


def test_normalize_edges():
    hi_better = _Fake("a", (0.0, 100.0), False)
    lo_better = _Fake("b", (0.0, 100.0), True)
    raw = torch.tensor([-10.0, 0.0, 25.0, 100.0, 150.0, float("nan")])
    torch.testing.assert_close(normalize(hi_better, raw), torch.tensor([0.0, 0.0, 0.25, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(normalize(lo_better, raw), torch.tensor([1.0, 1.0, 0.75, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(
        normalize(lo_better, torch.tensor([3.0, 5.0]), 3.0, 5.0), torch.tensor([1.0, 0.0])
    )
    assert torch.equal(normalize(hi_better, torch.tensor([2.0]), 2.0, 2.0), torch.tensor([0.5]))
    with pytest.raises(ValueError):
        normalize(hi_better, raw, low=1.0)


def test_ensemble_is_mean_of_normalised_scores(images, niqe, piqe):
    ens = QualityEnsemble(["niqe", "piqe"])
    assert ens.constants == {"niqe": niqe.native_range, "piqe": piqe.native_range}
    assert not ens.differentiable
    x = torch.cat([images["I04"], images["I06"]])
    raw = ens.raw(x)
    expected = (normalize(niqe, niqe(x)) + normalize(piqe, piqe(x))) / 2
    torch.testing.assert_close(ens.normalize_raw(raw), expected)
    s = ens(x)
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 1)).all())

    fakes = [_Fake("a", (0.0, 10.0), False, value=5.0), _Fake("b", (0.0, 1.0), True, value=0.2)]
    e2 = QualityEnsemble(["a", "b"], scorers=fakes)
    torch.testing.assert_close(e2(torch.zeros(3, 3, 8, 8)), torch.full((3,), (0.5 + 0.8) / 2))
    e3 = QualityEnsemble(["a", "b"], normalization="minmax", scorers=fakes)
    with pytest.raises(ValueError, match="minmax"):
        e3(torch.zeros(1, 3, 8, 8))
    e3.fit_minmax({"a": [4.0, 6.0], "b": [0.0, 0.4]})
    torch.testing.assert_close(e3(torch.zeros(1, 3, 8, 8)), torch.tensor([(0.5 + 0.5) / 2]))


# --------------------------------------------------------------------------------------
# Score tables and `iqpir score`
# --------------------------------------------------------------------------------------


@pytest.fixture()
def image_dir(tmp_path, images) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    write_image(d / "a.png", images["I04"][0])
    write_image(d / "sub" / "b.png", images["I06"][0])
    write_image(d / "c.png", _blur(images["I04"][..., :192, :288])[0])  # another size, batched apart
    return d


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (file_digest(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_score_cli_writes_resumes_and_reports_broken_files(image_dir, tmp_path, capsys):
    from iqpir.cli import main

    (image_dir / "broken.png").write_bytes(b"not an image")
    before = _snapshot(image_dir)
    out = tmp_path / "out" / "scores.csv"
    rc = main(["score", str(image_dir), "--metrics", "niqe,piqe", "--out", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err and "3 scored" in err
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:4] == ["path", "niqe", "piqe", "quality"] and rows[0][4] == "content_hash"
    assert sorted(r[0] for r in rows[1:]) == ["../imgs/a.png", "../imgs/c.png", "../imgs/sub/b.png"]
    table = read_score_table(out)
    a = quality_for(table, image_dir / "a.png")
    assert table.raw[str((image_dir / "a.png").resolve())]["niqe"] == pytest.approx(
        PUBLISHED["I04"][0], rel=1e-3
    )
    assert 0 <= a <= 1 and quality_for(table, image_dir / "c.png") < a  # the blurred copy is worse
    with pytest.raises(KeyError, match="nothere.png"):
        quality_for(table, image_dir / "nothere.png")

    # Resume: nothing new is scored; the broken file is still named and still fails.
    report = score_files([str(image_dir)], ["niqe", "piqe"], str(out), progress=False)
    assert report.done == [] and len(report.skipped) == 3 and len(report.failed) == 1
    assert "broken.png" in report.failed[0][0]
    # A changed file is rescored (its content hash differs); globs and folders mix.
    write_image(image_dir / "c.png", _blur(load_rgb(image_dir / "a.png")[None][..., :192, :288], 1.0)[0])
    report = score_files(
        [str(image_dir / "*.png"), str(image_dir / "sub")], ["niqe", "piqe"], str(out), progress=False
    )
    assert [p.name for p in report.done] == ["c.png"] and len(report.skipped) == 2
    after = {k: v for k, v in _snapshot(image_dir).items() if not k.endswith("c.png")}
    assert after == {k: v for k, v in before.items() if not k.endswith("c.png")}  # inputs unmodified

    with pytest.raises(ValueError, match="holds metrics"):
        score_files([str(image_dir)], ["piqe"], str(out), progress=False)


def test_minmax_constants_round_trip(image_dir, tmp_path):
    out = tmp_path / "mm.csv"
    files = [str(image_dir / "a.png"), str(image_dir / "sub" / "b.png")]
    score_files(files, ["niqe", "piqe"], str(out), normalization="minmax", progress=False)
    t = read_score_table(out)
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["normalization"] == "minmax" and t.normalization == "minmax"
    for m in ("niqe", "piqe"):
        vals = [r[m] for r in t.raw.values()]
        assert t.constants[m] == pytest.approx((min(vals), max(vals)))
    # The ensemble with the table's constants reproduces the table's quality.
    ens = QualityEnsemble(["niqe", "piqe"], normalization="minmax", constants=t.constants)
    x = load_rgb(image_dir / "a.png")[None]
    assert float(ens(x)[0]) == pytest.approx(quality_for(t, image_dir / "a.png"), abs=1e-6)
    # Resuming with a new, worse image widens the range and rewrites every row's quality.
    score_files([str(image_dir)], ["niqe", "piqe"], str(out), normalization="minmax", progress=False)
    t2 = read_score_table(out)
    assert len(t2.quality) == 3
    assert t2.constants["niqe"][1] > t.constants["niqe"][1]
    assert quality_for(t2, image_dir / "c.png") == pytest.approx(0.0, abs=1e-6)
    assert quality_for(t2, image_dir / "a.png") != pytest.approx(quality_for(t, image_dir / "a.png"))


# --------------------------------------------------------------------------------------
# The optional pyiqa backend
# --------------------------------------------------------------------------------------


_FAKE_PYIQA = textwrap.dedent(
    """
    import os
    import torch

    DEFAULT_CACHE_DIR = os.path.join(torch.hub.get_dir(), "pyiqa")

    def download_url_to_file(url, dst, hash_prefix=None, progress=True):
        raise AssertionError("a real download was attempted")

    def load_file_from_url(url, model_dir=None, progress=True, file_name=None):
        model_dir = model_dir or DEFAULT_CACHE_DIR
        cached = os.path.join(model_dir, file_name or os.path.basename(url))
        if not os.path.exists(cached):
            download_url_to_file(url, cached, hash_prefix=None, progress=progress)
        return cached
    """
)


@pytest.fixture()
def fake_pyiqa(monkeypatch, tmp_path):
    """A stand-in with pyiqa's download mechanics (module-level download function, cache dir)."""
    dl = types.ModuleType("pyiqa.utils.download_util")
    exec(_FAKE_PYIQA, dl.__dict__)
    dl.DEFAULT_CACHE_DIR = str(tmp_path / "torch-home" / "hub" / "pyiqa")

    class Net(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None] * 100

    class Inference(torch.nn.Module):
        lower_better = False
        score_range = "~0, ~100"
        metric_mode = "NR"

        def __init__(self):
            super().__init__()
            self.net = Net()

    def create_metric(name, device=None, **kwargs):
        path = dl.load_file_from_url("https://example.invalid/weights/fake_ckpt-123.pth")
        assert os.path.exists(path)
        return Inference()

    pyiqa = types.ModuleType("pyiqa")
    pyiqa.create_metric = create_metric
    pyiqa.list_models = lambda metric_mode=None: ["fakemetric"]
    utils = types.ModuleType("pyiqa.utils")
    utils.download_util = dl
    pyiqa.utils = utils
    monkeypatch.setitem(sys.modules, "pyiqa", pyiqa)
    monkeypatch.setitem(sys.modules, "pyiqa.utils", utils)
    monkeypatch.setitem(sys.modules, "pyiqa.utils.download_util", dl)
    return dl


def test_missing_weights_message_names_file_and_folder(fake_pyiqa, tmp_path):
    from iqpir.iqa.pyiqa_backend import MissingWeightsError

    with pytest.raises(MissingWeightsError) as info:
        build_scorer("fakemetric")
    msg = str(info.value)
    assert "fake_ckpt-123.pth" in msg and fake_pyiqa.DEFAULT_CACHE_DIR in msg and "\n" not in msg
    assert isinstance(info.value, FileNotFoundError)  # the CLI reports it in one line, exit 2

    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(MissingWeightsError, match=str(weights)):
        build_scorer("fakemetric", weights_dir=str(weights))
    (weights / "fake_ckpt-123.pth").write_bytes(b"x")
    scorer = build_scorer("fakemetric", weights_dir=str(weights))
    assert scorer.native_range == (0.0, 100.0) and not scorer.lower_better
    torch.testing.assert_close(scorer(torch.full((2, 3, 8, 8), 0.5)), torch.tensor([50.0, 50.0]))
    assert fake_pyiqa.DEFAULT_CACHE_DIR.endswith(os.path.join("hub", "pyiqa"))  # restored


def test_unknown_metric_without_pyiqa_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"iqpir\[iqa\]"):
        build_scorer("musiq")


def test_real_pyiqa_random_weights_and_missing_weights(monkeypatch, tmp_path):
    pytest.importorskip("pyiqa")
    from iqpir.iqa.pyiqa_backend import MissingWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="musiq_koniq_ckpt"):
        build_scorer("musiq", weights_dir=str(tmp_path / "w"))
    scorer = build_scorer("musiq", pretrained=False)
    assert scorer.differentiable and scorer.native_range == (0.0, 100.0)
    s = scorer(torch.rand(2, 3, 224, 224))
    assert s.shape == (2,) and torch.isfinite(s).all()


# --------------------------------------------------------------------------------------
# What a new user hits: small images, typos in metric names, a table's settings
# --------------------------------------------------------------------------------------



@pytest.mark.usefixtures("one_thread")
def test_niqe_names_the_least_size_it_needs(images, niqe):
    from iqpir.iqa import ImageTooSmall

    x = images["I04"]
    with pytest.raises(ImageTooSmall, match=r"too small for NIQE: 160x160 px.*192x96"):
        niqe(x[..., :160, :160])  # one 96-px block: no covariance of the block features
    assert torch.isfinite(niqe(x[..., :96, :192])).all()  # two blocks are enough


@pytest.mark.usefixtures("one_thread")
def test_an_image_niqe_cannot_score_does_not_sink_its_batch(images, niqe):
    """A flat image has no complete block features (NaN, as MATLAB); the rest of its batch is scored."""
    x = images["I04"][..., :96, :192]
    flat = torch.full_like(x, 0.5)
    vectorised = build_scorer("niqe", cpu_chunk=3)  # one pass over the three, as on a GPU
    batch = vectorised(torch.cat([x, flat, x]))
    assert torch.isnan(batch[1]) and torch.isfinite(batch[[0, 2]]).all()
    torch.testing.assert_close(batch[[0, 2]], niqe(x).expand(2), rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_small_images_fail_named_or_are_scored_upsampled(images, tmp_path):
    from iqpir.iqa import upsample_small

    folder = tmp_path / "small"
    small = F.interpolate(images["I06"], size=(75, 100), mode="bilinear", antialias=True).clamp(0, 1)
    write_image(folder / "s.png", small[0])
    write_image(folder / "big.png", images["I04"][0, :, :192, :200])
    report = score_files([str(folder)], ["niqe"], str(tmp_path / "t.csv"), progress=False)
    (path, why), = report.failed
    assert path.endswith("s.png") and "too small for NIQE" in why and "--upsample-small" in why
    assert [p.name for p in report.done] == ["big.png"]

    with pytest.raises(ValueError, match="without --upsample-small"):  # a table keeps its rule
        score_files([str(folder)], ["niqe"], str(tmp_path / "t.csv"), progress=False, upsample_small=True)
    report = score_files([str(folder)], ["niqe"], str(tmp_path / "u.csv"), progress=False, upsample_small=True)
    assert not report.failed and len(report.done) == 2
    table = read_score_table(tmp_path / "u.csv")
    up = upsample_small(load_rgb(folder / "s.png")[None])
    assert tuple(up.shape[-2:]) == (192, 256)
    assert table.raw[str((folder / "s.png").resolve())]["niqe"] == pytest.approx(float(build_scorer("niqe")(up)[0]), rel=1e-6)
    big = load_rgb(folder / "big.png")[None]  # scored as it is, not resized
    assert table.raw[str((folder / "big.png").resolve())]["niqe"] == pytest.approx(float(build_scorer("niqe")(big)[0]), rel=1e-6)
    side = json.loads(Path(str(tmp_path / "u.csv") + ".json").read_text())
    assert table.upsample_small and "upsampled" in side["small_images"]


@pytest.mark.usefixtures("one_thread")
def test_a_typo_in_a_metric_name_is_an_error_with_a_suggestion(monkeypatch, tmp_path, capsys):
    from iqpir.cli import main

    monkeypatch.setitem(sys.modules, "pyiqa", None)  # as if pyiqa were not installed
    with pytest.raises(ValueError, match="did you mean 'piqe'"):
        build_scorer("piqee")
    with pytest.raises(ValueError, match="full-reference"):
        build_scorer("ssim")
    write_image(tmp_path / "a.png", torch.rand(3, 32, 32))
    assert main(["score", str(tmp_path / "a.png"), "--metrics", "niqe,piqee", "--out", str(tmp_path / "t.csv")]) == 2
    assert "did you mean 'piqe'" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()
    assert main(["evaluate", str(tmp_path), "--reference", str(tmp_path), "--metrics", "psnr,ssm",
                 "--out", str(tmp_path / "r.csv")]) == 2
    assert "did you mean 'ssim'" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_table_keeps_its_normalisation_and_names_rows_of_deleted_files(tmp_path, capsys):
    from iqpir.cli import main

    out = tmp_path / "mm.csv"
    files = [str(write_image(tmp_path / f"{i}.png", torch.rand(3, 32, 48))) for i in "ab"]
    score_files(files, ["piqe"], str(out), normalization="minmax", progress=False)
    before = out.read_bytes()
    assert main(["score", *files, "--metrics", "piqe", "--out", str(out)]) == 2  # default --normalization fixed
    assert "--normalization minmax" in capsys.readouterr().err
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="upsample-small"):
        score_files(files, ["piqe"], str(out), normalization="minmax", upsample_small=True, progress=False)

    (tmp_path / "a.png").unlink()
    report = score_files(files[1:], ["piqe"], str(out), normalization="minmax", progress=False)
    assert len(report.skipped) == 1
    err = capsys.readouterr().err
    assert "1 row of files that no longer exist" in err and "a.png" in err


def test_builtin_scorers_score_one_image_at_a_time_on_cpu():
    """Measured side by side (benchmarks/bench_niqe.py): per image beat vectorised groups on CPU."""
    assert build_scorer("niqe").cpu_chunk == 1 and build_scorer("piqe").cpu_chunk == 1


def test_a_typo_is_refused_without_importing_pyiqa(monkeypatch, tmp_path):
    """An installed pyiqa takes 10-20 s to import: a name close to one it lists is a typo, said at
    once from its config file; only a name far from all of them asks pyiqa itself (issue 25)."""
    from iqpir.iqa import UnknownMetric, check_metric_name

    pkg = tmp_path / "pyiqa"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("pyiqa imported")\n')
    (pkg / "default_model_configs.py").write_text(textwrap.dedent("""
        from collections import OrderedDict
        MEAN = (0.5, 0.5, 0.5)
        DEFAULT_CONFIGS = OrderedDict({
            'zonkiqa_nr': {'metric_opts': {'type': 'Zonk', 'mean': MEAN}, 'metric_mode': 'NR'},
            'zonkiqa_fr': {'metric_opts': {'type': 'Zonk'}, 'metric_mode': 'FR'},
        })
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyiqa", raising=False)
    check_metric_name("zonkiqa_nr")  # listed: accepted, pyiqa not imported
    for typo, close in (("zonkiqa_n", "zonkiqa_nr"), ("musiqq", "musiq")):
        with pytest.raises(UnknownMetric, match=f"did you mean '{close}'"):
            check_metric_name(typo)
    with pytest.raises(UnknownMetric):
        check_metric_name("zonkiqa_fr")  # full-reference: close to the NR one, never accepted
    with pytest.raises(RuntimeError, match="pyiqa imported"):
        check_metric_name("quite_another_thing")  # nothing close: pyiqa decides
