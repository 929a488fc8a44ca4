"""Files in and out, as a user meets them: readable modes, grey stays grey, one output rule."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir import io
from iqpir.cli import main
from iqpir.models import build_restorer
from train_helpers import SMALL_MODEL

TINY_RESTORER = [
    *SMALL_MODEL, "train.stage=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A stage-2 run folder holding a random tiny (32x32) restorer."""
    cfg = C.load(preset="tiny", overrides=TINY_RESTORER)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": build_restorer(cfg.model).state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return run


@pytest.fixture
def umask():
    """Set a umask for one test and put the old one back."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _grey_ramp(h: int = 24, w: int = 40) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 97 % 256).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Item 3: outputs get the umask's mode, not mkstemp's 0600
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    want = 0o666 & ~mask
    written = [
        io.write_image(tmp_path / "a.png", torch.rand(3, 8, 8)),
        io.write_image(tmp_path / "b.jpg", torch.rand(3, 8, 8)),
        io.atomic_write_text(tmp_path / "c.csv", "x\n"),
    ]
    stem = ckpt.save_checkpoint(ckpt.checkpoint_stem(tmp_path / "run", 3), {"w": torch.ones(2)}, {"step": 3})
    written += [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]
    for path in written:
        assert _mode(path) == want, f"{path.name}: {oct(_mode(path))} != {oct(want)}"
    # a replaced file gets the mode too, and no temporary file is left behind
    io.atomic_write_text(tmp_path / "c.csv", "y\n")
    assert _mode(tmp_path / "c.csv") == want
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def boom(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "x.txt", boom)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# Item 4: grey in, grey out; 16-bit in, 16-bit out
# --------------------------------------------------------------------------------------


def test_read_image_records_grey_and_bit_depth(tmp_path):
    grey = _grey_ramp()
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257 + 1).save(tmp_path / "g16.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    kinds = {n: (io.read_image(tmp_path / n).grey, io.read_image(tmp_path / n).bits) for n in ("g8.png", "g16.png", "rgb.png")}
    assert kinds == {"g8.png": (True, 8), "g16.png": (True, 16), "rgb.png": (False, 8)}


def test_sixteen_bit_grey_round_trips_exactly(tmp_path):
    deep = (np.arange(30 * 20).reshape(30, 20) * 109).astype(np.uint16)  # every level, not multiples of 257
    Image.fromarray(deep).save(tmp_path / "in.png")
    img = io.read_image(tmp_path / "in.png")
    for name in ("out.png", "out.tif"):
        io.write_image(tmp_path / name, img.rgb, grey=img.grey, bits=img.bits)
        back = Image.open(tmp_path / name)
        assert back.mode == "I;16", name
        np.testing.assert_array_equal(np.asarray(back).astype(np.int64), deep.astype(np.int64))
    io.write_image(tmp_path / "out.jpg", img.rgb, grey=True, bits=16)  # JPEG: 8-bit grey
    assert Image.open(tmp_path / "out.jpg").mode == "L"


def test_grey_output_is_the_luma_of_colour(tmp_path):
    colour = torch.rand(3, 10, 12)
    io.write_image(tmp_path / "y.png", colour, grey=True)
    y = np.asarray(Image.open(tmp_path / "y.png")).astype(np.float64)
    want = (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]).mul(255).round().numpy()
    assert Image.open(tmp_path / "y.png").mode == "L"
    assert np.abs(y - want).max() <= 1


def test_restore_and_degrade_keep_grey_and_depth(run_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    grey = _grey_ramp(40, 36)
    Image.fromarray(grey).save(src / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(src / "g16.png")
    Image.fromarray(np.stack([grey, grey[::-1], grey], -1)).save(src / "rgb.png")
    common = ["--device", "cpu"]
    assert main(["restore", str(src), "--checkpoint", str(run_dir), "--out", str(tmp_path / "r"), *common]) == 0
    assert main(["degrade", str(src), "--out", str(tmp_path / "d"), "--preset", "bfr"]) == 0
    for folder in ("r", "d"):
        modes = {n: Image.open(tmp_path / folder / n).mode for n in ("g8.png", "g16.png", "rgb.png")}
        assert modes == {"g8.png": "L", "g16.png": "I;16", "rgb.png": "RGB"}, folder
        assert Image.open(tmp_path / folder / "g16.png").size == (36, 40)


def test_restorer_api_keeps_a_grey_pil_image_grey(run_dir):
    import iqpir

    restorer = iqpir.load(run_dir, device="cpu")
    out = restorer.restore(Image.fromarray(_grey_ramp(32, 32)))
    assert out.mode == "L" and out.size == (32, 32)
    deep = restorer.restore(Image.fromarray(_grey_ramp(32, 32).astype(np.uint16) * 257))
    assert deep.mode == "I;16"


# --------------------------------------------------------------------------------------
# Item 8: one output-folder rule for restore and degrade; hidden folders are not inputs
# --------------------------------------------------------------------------------------


def test_hidden_files_and_folders_are_not_inputs(tmp_path):
    for rel in ("a.png", "sub/b.png", ".ipynb_checkpoints/a-checkpoint.png", "sub/.cache/c.png", ".d.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_grey_ramp(8, 8)).save(tmp_path / rel)
    found, missing = io.collect_inputs([tmp_path])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == ["a.png", "sub/b.png"]
    # a hidden file named explicitly is still used (the user asked for it)
    assert io.collect_inputs([tmp_path / ".d.png"])[0] == [tmp_path / ".d.png"]


@pytest.mark.parametrize("command", ["restore", "degrade"])
def test_an_output_folder_inside_the_inputs_is_refused_every_time(command, run_dir, tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(_grey_ramp(36, 36)).save(src / "a.png")
    extra = ["--checkpoint", str(run_dir), "--device", "cpu"] if command == "restore" else []
    for out in (src, src / "restored", src / ".hidden"):
        assert main([command, str(src), "--out", str(out), *extra]) == 2
        assert "input folder" in capsys.readouterr().err
    assert sorted(p.name for p in src.rglob("*")) == ["a.png"]  # nothing written


@pytest.mark.parametrize("command", ["restore", "degrade"])
def test_existing_outputs_are_kept_unless_overwrite(command, run_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_grey_ramp(36, 36)).save(src / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    Image.fromarray(_grey_ramp(8, 8)).save(out / "a.png")  # a whole image: kept (a broken one is redone)
    kept = (out / "a.png").read_bytes()
    extra = ["--checkpoint", str(run_dir), "--device", "cpu"] if command == "restore" else []
    assert main([command, str(src), "--out", str(out), *extra]) == 0
    assert (out / "a.png").read_bytes() == kept
    assert "--overwrite" in capsys.readouterr().err
    assert main([command, str(src), "--out", str(out), "--overwrite", *extra]) == 0
    assert Image.open(out / "a.png").size == (36, 36)


def test_failures_are_named_once_and_the_summary_line_names_the_output(run_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_grey_ramp(36, 36)).save(src / "a.png")
    (src / "z-broken.png").write_bytes(b"\x89PNG not really")
    for command, extra in (("restore", ["--checkpoint", str(run_dir), "--device", "cpu"]), ("degrade", [])):
        out = tmp_path / f"out-{command}"
        assert main([command, str(src), "--out", str(out), *extra]) == 1
        err = capsys.readouterr().err
        broken = str(src / "z-broken.png")
        assert err.count(broken) == 1, err  # named once, not "PATH: PATH: ..."
        summary = next(line for line in err.splitlines() if line.startswith(f"iqpir {command}:"))
        assert summary.endswith(f"-> {out}"), summary
        assert not any(line.strip().startswith("failed:") and "->" in line for line in err.splitlines())


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_lossy_files_honour_their_quality(tmp_path, suffix):
    """A quality that does not reach the encoder (a format-name typo) leaves both files alike."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=64, mode="bilinear")[0]
    low, high = tmp_path / f"low{suffix}", tmp_path / f"high{suffix}"
    io.write_image(low, image, quality=20)
    io.write_image(high, image, quality=95)
    assert low.stat().st_size < 0.7 * high.stat().st_size
    err = {p: float((io.load_rgb(p) - image).abs().mean()) for p in (low, high)}
    assert err[low] > 1.5 * err[high]
