"""Training on a user's folder: unscorable images are left out and named, score tables are
matched by content, small images train, and the run says where it stands."""

from __future__ import annotations

import shutil

import pytest
import torch

from iqpir import config as C
from iqpir.cli import main
from iqpir.io import write_image
from iqpir.iqa.table import score_files
from iqpir.training.loop import quality_coverage, train
from train_helpers import SMALL_MODEL

# 32x32 crops, 8x8 latent, PIQE as the prior: a run of one step takes about a second.
SMALL = [
    *SMALL_MODEL,
    "train.batch_size=2", "train.log_every=1", "train.ckpt_every=100",
    "iqa.metrics=[piqe]", "data.mode=crop",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(*extra: str) -> C.RunConfig:
    return C.load(preset="tiny", overrides=[*SMALL, "train.stage=1", "train.steps=1", *extra])


def _photos(folder, n: int = 3, size: int = 48):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        img = torch.stack([xx, yy * (i + 1) / n, (xx + yy) / 2]) + 0.1 * torch.rand(3, size, size, generator=g)
        write_image(folder / f"img{i}.png", img.clamp(0, 1))
    return folder


def _training_paths(run) -> set[str]:
    from iqpir.training.data import build_dataset, quality_table
    from iqpir.training.distributed import DistInfo

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    c = cfg()
    table = quality_table(c, run["data"], None, run["out"], run.get("scores"), info)
    return {p.name for p in build_dataset(c, run["data"], None, table.quality).paths}


def test_an_unreadable_training_image_is_named_and_left_out(tmp_path, capsys):
    data = _photos(tmp_path / "data")
    good = (data / "img0.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    result = train(cfg(), data, tmp_path / "run", device="cpu", progress=False)
    assert result.completed
    err = capsys.readouterr().err
    assert "truncated.png" in err and "left out" in err
    assert _training_paths({"data": data, "out": tmp_path / "run"}) == {"img0.png", "img1.png", "img2.png"}


def test_a_score_table_of_a_copied_folder_is_matched_by_content(tmp_path, capsys):
    original = _photos(tmp_path / "original")
    table = tmp_path / "scores.csv"
    score_files([str(original)], ["piqe"], str(table), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    write_image(copy / "new.png", torch.rand(3, 48, 48))  # not in the table
    capsys.readouterr()
    assert main(["train", "configs/tiny-stage1.yaml", "--data", str(copy), "--scores", str(table),
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "1",
                 *sum((["--set", s] for s in SMALL), [])]) == 0
    err = capsys.readouterr().err
    assert "new.png" in err and "left out" in err and f"iqpir score {copy} --out {table}" in err
    paths = _training_paths({"data": copy, "out": tmp_path / "run", "scores": table})
    assert paths == {"img0.png", "img1.png", "img2.png"}


def test_no_scored_image_at_all_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not a png")
    assert main(["train", "configs/tiny-stage1.yaml", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--device", "cpu", *sum((["--set", s] for s in SMALL), [])]) == 2
    err = capsys.readouterr().err
    assert "has a quality score" in err and "a.png" in err and "Traceback" not in err


def test_images_too_small_for_niqe_train_with_the_default_prior(tmp_path):
    """NIQE needs two 96-px blocks; a run's own scoring upsamples small images as the loss does."""
    data = _photos(tmp_path / "data", n=2, size=64)
    result = train(cfg("iqa.metrics=[niqe,piqe]"), data, tmp_path / "run", device="cpu", progress=False)
    assert result.completed


def test_resume_to_a_step_already_reached_says_so(tmp_path, capsys):
    data = _photos(tmp_path / "data", n=2)
    run = tmp_path / "run"
    args = ["train", "configs/tiny-stage1.yaml", "--data", str(data), "--out", str(run), "--device", "cpu",
            *sum((["--set", s] for s in SMALL), [])]
    assert main([*args, "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "done, step 2" in err and "step_00000002" in err  # where the checkpoint is
    assert main([*args, "--steps", "2", "--resume"]) == 0
    assert "already at step 2" in capsys.readouterr().err
    assert main([*args, "--steps", "1", "--resume"]) == 2
    assert "past --steps 1" in capsys.readouterr().err


def test_a_mistyped_stage1_run_is_named(tmp_path, capsys):
    data = _photos(tmp_path / "data", n=2)
    assert main(["train", "configs/tiny-stage2.yaml", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--stage1", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert f"--stage1 {tmp_path / 's3'}: no such run folder" in err


def test_the_empty_bin_warning_names_flags_that_exist():
    m = C.from_preset("tiny").model
    (msg,) = quality_coverage(m, [0.31, 0.45])
    assert "--set iqa.normalization=minmax" in msg and "--set model.quality_embedding=continuous" in msg
    assert "score with --normalization" not in msg


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """The CLI tests name configs/ relative to the repository root."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
