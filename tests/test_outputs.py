"""Nothing lost on real collections: one output per input, verified writes, every file accounted for."""

from __future__ import annotations

import errno
import json
import os
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

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A stage-2 run folder holding a random tiny (32x32) restorer."""
    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2"])
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": build_restorer(cfg.model).state_dict()},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    return run


def _photo(path: Path, seed: int, size: int = 36) -> Path:
    """A small distinct picture at `path` (its format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _restore(run_dir, *args: str) -> int:
    return main(["restore", *args, "--checkpoint", str(run_dir), "--device", "cpu"])


def _files(folder: Path) -> list[str]:
    """The restored files under `folder` (not the hidden log, not the restore.json report)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.name != "restore.json")


# --------------------------------------------------------------------------------------
# One output per input
# --------------------------------------------------------------------------------------


def test_glob_roots_are_the_fixed_prefix():
    assert io.glob_root("in/**/*.jpg") == Path("in")
    assert io.glob_root("in/20*/IMG_*.jpg") == Path("in")
    assert io.glob_root("*.png") == Path(".")
    assert io.glob_root("a/b/c?.png") == Path("a/b")


def test_same_names_under_a_glob_are_mirrored_and_resumed_by_path(run_dir, tmp_path, capsys):
    for year, seed in (("2019", 1), ("2020", 2)):
        _photo(tmp_path / "in" / year / "IMG_0001.png", seed)
    out = tmp_path / "out"
    assert _restore(run_dir, str(tmp_path / "in" / "**" / "*.png"), "--out", str(out)) == 0
    assert _files(out) == ["2019/IMG_0001.png", "2020/IMG_0001.png"]
    assert "2 restored, 0 skipped" in capsys.readouterr().err
    a, b = (io.load_rgb(out / y / "IMG_0001.png") for y in ("2019", "2020"))
    assert not torch.equal(a, b)  # each photo's own restoration, not one written twice
    # a rerun finds both done, each by its own path
    assert _restore(run_dir, str(tmp_path / "in" / "**" / "*.png"), "--out", str(out)) == 0
    assert "0 restored, 2 skipped" in capsys.readouterr().err


@pytest.mark.parametrize("faces", [False, True])
def test_the_progress_bar_counts_only_the_files_restored(run_dir, tmp_path, capsys, faces):
    """A rerun that finds 2 of 3 outputs done restores 1: its bar (and so its rate) is over 1 file."""
    flags = ["--faces", "--detector", "hog"] if faces else []
    for i in range(2):
        _photo(tmp_path / "in" / f"{i}.png", i)
    assert _restore(run_dir, str(tmp_path / "in"), "--out", str(tmp_path / "out"), *flags) == 0
    _photo(tmp_path / "in" / "2.png", 2)
    capsys.readouterr()
    assert _restore(run_dir, str(tmp_path / "in"), "--out", str(tmp_path / "out"), *flags) == 0
    err = capsys.readouterr().err
    assert "1/1 [" in err and "/3 [" not in err, err
    assert "2 skipped" in err


def test_files_given_by_name_keep_the_structure_they_share(run_dir, tmp_path):
    """What a shell makes of an unquoted glob: many files, mirrored below the folder they share."""
    srcs = [_photo(tmp_path / "in" / year / "IMG_0001.png", i) for i, year in enumerate(("2019", "2020"))]
    plan = io.plan_outputs([str(s) for s in srcs], tmp_path / "out")
    assert [dst.relative_to(tmp_path / "out").as_posix() for _, dst in plan.pairs] == [
        "2019/IMG_0001.png", "2020/IMG_0001.png"]
    one = io.plan_outputs([str(srcs[0])], tmp_path / "out")
    assert one.pairs == [(srcs[0], tmp_path / "out" / "IMG_0001.png")]


@pytest.mark.parametrize("case", ["two-folders", "format"])
def test_inputs_that_would_share_an_output_are_refused_before_any_work(case, run_dir, tmp_path, capsys):
    if case == "two-folders":
        files = [_photo(tmp_path / "a" / "x.png", 1), _photo(tmp_path / "b" / "x.png", 2)]
        inputs, extra, clash = [f.parent for f in files], [], "x.png"
    else:
        files = inputs = [_photo(tmp_path / "in" / "y.jpg", 1), _photo(tmp_path / "in" / "y.png", 2)]
        extra, clash = ["--format", "png"], "y.png"
    out = tmp_path / "out"
    assert _restore(run_dir, *map(str, inputs), "--out", str(out), *extra) == 2
    err = capsys.readouterr().err
    assert f"{out / clash} <- {files[0]}, {files[1]}" in err, err
    assert not out.exists()  # refused before any work
    assert main(["degrade", *map(str, inputs), "--out", str(out)]) == (2 if case == "two-folders" else 0)
    if case == "format":  # without --format each keeps its own name
        assert _restore(run_dir, *map(str, inputs), "--out", str(tmp_path / "own")) == 0
        assert _files(tmp_path / "own") == ["y.jpg", "y.png"]


def test_clips_whose_outputs_share_a_container_clash(tmp_path):
    from iqpir.inference import photos

    for name in ("a.avi", "a.mp4"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"not read by the plan")
    with pytest.raises(io.OutputClash, match="a.mp4 <- "):
        photos._plan([str(tmp_path / "in" / "a.avi"), str(tmp_path / "in" / "a.mp4")], tmp_path / "out")


def test_faces_report_names_each_same_named_photos_own_output(run_dir, tmp_path):
    pytest.importorskip("dlib")
    from iqpir.inference.photos import restore_face_files

    for year, seed in (("2019", 1), ("2020", 2)):
        _photo(tmp_path / "in" / year / "IMG_0001.png", seed, size=48)
    out = tmp_path / "out"
    report = restore_face_files([str(tmp_path / "in" / "*" / "*.png")], run_dir, out, device="cpu",
                                progress=False, detector="hog")
    assert len(report.done) == 2 and not report.failed
    entries = json.loads((out / "restore.json").read_text())
    assert sorted((Path(e["input"]).parent.name, Path(e["output"]).relative_to(out).as_posix()) for e in entries) == [
        ("2019", "2019/IMG_0001.png"), ("2020", "2020/IMG_0001.png")]


# --------------------------------------------------------------------------------------
# Verified atomic writes; a rerun finishes the rest
# --------------------------------------------------------------------------------------


def test_a_full_disk_stops_with_one_line_leaves_no_partial_file_and_a_rerun_finishes(run_dir, tmp_path, monkeypatch,
                                                                                      capsys):
    for i in range(4):
        _photo(tmp_path / "in" / f"{i}.png", i)
    out = tmp_path / "out"
    full = {"on": False}
    real_write, real_add = io._write_all, io.OutputLog.add

    def write_all(fd, data):  # a disk that fills up: part of the file goes down, then ENOSPC
        if full["on"]:
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    def add(self, written):  # the disk is full once two outputs are finished
        real_add(self, written)
        full["on"] = len(self.entries) >= 2

    monkeypatch.setattr(io, "_write_all", write_all)
    monkeypatch.setattr(io.OutputLog, "add", add)
    assert _restore(run_dir, str(tmp_path / "in"), "--out", str(out)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "no space left" in line]
    assert len(lines) == 1 and f"cannot write {out / '2.png'}" in lines[0] and "free in" in lines[0], err
    assert "1 input not started" in err and "Traceback" not in err
    assert _files(out) == ["0.png", "1.png"]  # the finished ones, whole; nothing of the third
    assert not [p for p in out.rglob("*.tmp")]
    before = {f: (out / f).read_bytes() for f in _files(out)}
    for f in before:
        io.read_image(out / f)
    monkeypatch.undo()
    assert _restore(run_dir, str(tmp_path / "in"), "--out", str(out)) == 0
    assert "2 restored, 2 skipped, 0 failed" in capsys.readouterr().err
    assert _files(out) == ["0.png", "1.png", "2.png", "3.png"]
    assert all((out / f).read_bytes() == data for f, data in before.items())


@pytest.mark.parametrize("damage", ["short", "flipped"])
def test_a_file_that_does_not_read_back_as_written_is_refused_and_removed(damage, tmp_path, monkeypatch):
    def lying_disk(fd, data):  # reports success, keeps something else
        data = bytes(data)
        os.write(fd, data[: len(data) // 2] if damage == "short" else data[:-1] + bytes([data[-1] ^ 1]))

    monkeypatch.setattr(io, "_write_all", lying_disk)
    with pytest.raises(io.WriteError, match="read back"):
        io.write_image(tmp_path / "a.png", torch.rand(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_nothing_and_stale_temps_are_cleaned(tmp_path, monkeypatch):
    real = io._write_all

    def interrupted(fd, data):
        os.write(fd, bytes(data[:10]))
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.write_image(tmp_path / "a.png", torch.rand(3, 8, 8))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(io, "_write_all", real)
    (tmp_path / ".a.png.0123abcd.tmp").write_bytes(b"left by a killed run")
    (tmp_path / ".b.png.0123abcd.tmp").write_bytes(b"another file's, not this write's to clean")
    io.write_image(tmp_path / "a.png", torch.rand(3, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.png.0123abcd.tmp", "a.png"]


def test_a_rerun_redoes_outputs_that_are_not_complete(run_dir, tmp_path, capsys):
    for i in range(3):
        _photo(tmp_path / "in" / f"{i}.jpg", i)
    out = tmp_path / "out"
    args = (str(tmp_path / "in"), "--out", str(out))
    assert _restore(run_dir, *args) == 0
    whole = (out / "0.jpg").read_bytes()
    (out / "0.jpg").write_bytes(whole[: len(whole) // 2])  # a logged output damaged since
    capsys.readouterr()
    assert _restore(run_dir, *args) == 0
    assert "1 restored, 2 skipped" in capsys.readouterr().err
    assert (out / "0.jpg").read_bytes() == whole
    # outputs the log does not know (an earlier version's): kept when whole, redone when cut short
    (out / io.OutputLog.NAME).unlink()
    one = (out / "1.jpg").read_bytes()
    (out / "1.jpg").write_bytes(one[: len(one) // 2])
    assert _restore(run_dir, *args) == 0
    assert "1 restored, 2 skipped" in capsys.readouterr().err
    assert (out / "1.jpg").read_bytes() == one


# --------------------------------------------------------------------------------------
# A non-finite output is an error for its file, never a black image
# --------------------------------------------------------------------------------------


def test_a_non_finite_output_fails_its_file_and_writes_nothing(run_dir, tmp_path, monkeypatch, capsys):
    from iqpir.inference.restorer import Restorer

    real_init = Restorer.__init__

    class NaNForBrightTiles:  # the engine, giving NaN for the tiles of a bright picture only
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def __call__(self, tiles, *knobs):
            out = self.engine(tiles, *knobs)
            bright = tiles.flatten(1).mean(1) > 0.9
            return torch.where(bright[:, None, None, None], torch.full_like(out, float("nan")), out)

    def poisoned(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.engine = NaNForBrightTiles(self.engine)

    monkeypatch.setattr(Restorer, "__init__", poisoned)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 40), "white").save(tmp_path / "in" / "white.png")
    _photo(tmp_path / "in" / "dark.png", 1)
    out = tmp_path / "out"
    for aligned in ([], ["--aligned"]):
        assert _restore(run_dir, str(tmp_path / "in"), "--out", str(out), *aligned) == 1
        err = capsys.readouterr().err
        assert f"failed: {tmp_path / 'in' / 'white.png'}: the model gave" in err and "non-finite" in err, err
        assert _files(out) == ["dark.png"]  # the other file restored, nothing for the broken one


# --------------------------------------------------------------------------------------
# Every file accounted for
# --------------------------------------------------------------------------------------


def test_files_that_are_not_images_are_counted_by_extension_and_named_with_verbose(run_dir, tmp_path, capsys):
    src = tmp_path / "camera"
    _photo(src / "IMG_0001.jpg", 1)
    (src / "IMG_0002.HEIC").write_bytes(b"ftypheic not decoded here")
    (src / "sub").mkdir()
    Image.new("P", (8, 8)).save(src / "sub" / "anim.gif")
    (src / ".DS_Store").write_bytes(b"hidden: not counted")
    out = tmp_path / "out"
    assert _restore(run_dir, str(src), "--out", str(out), "--verbose") == 0
    err = capsys.readouterr().err
    summary = next(line for line in err.splitlines() if line.startswith("iqpir restore: 1 restored"))
    assert "2 ignored (.gif 1, .heic 1" in summary, summary
    if not io._heif_available():
        assert "pillow-heif" in summary
    assert f"ignored: {src / 'IMG_0002.HEIC'}" in err and f"ignored: {src / 'sub' / 'anim.gif'}" in err
    assert ".DS_Store" not in err


def test_an_unreadable_folder_is_named_and_fails_the_run(run_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    _photo(src / "a.png", 1)
    _photo(src / "locked" / "b.png", 2)
    locked = str(src / "locked")
    real = os.scandir

    def scandir(path="."):  # what a folder without read permission gives (chmod does not stop root)
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert _restore(run_dir, str(src), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "1 restored, 0 skipped, 1 failed" in err
    assert f"failed: {locked}: cannot read the folder (Permission denied)" in err
    assert _files(out) == ["a.png"]


@pytest.mark.parametrize("kind", ["gif", "webp", "png", "tiff"])
def test_a_file_of_several_frames_is_refused_not_cut_to_its_first(kind, run_dir, tmp_path, capsys):
    frames = [Image.new("RGB", (36, 36), (60 * i, 0, 0)) for i in range(3)]
    src = tmp_path / f"anim.{kind}"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(src), "n_frames", 1) == 3
    out = tmp_path / "out"
    assert _restore(run_dir, str(src), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "holds 3 " in err and "extract" in err, err
    assert not out.exists() or _files(out) == []
    frames[0].save(tmp_path / "still.gif")  # one frame: read as any image
    assert _restore(run_dir, str(tmp_path / "still.gif"), "--out", str(out)) == 0


# --------------------------------------------------------------------------------------
# SIGTERM is Ctrl-C: finished work kept, the exit status names the signal
# --------------------------------------------------------------------------------------

# Runs `iqpir ARGS...` in a fresh process that sends itself SIGNAL when it starts reading its
# third image (by then two are finished), so the test does not depend on timing.
_SELF_SIGNAL = """
import os, signal, sys
from iqpir import io
from iqpir.iqa import table
real, calls = io.read_image, []
def read(path):
    calls.append(path)
    if len(calls) == 3:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(path)
io.read_image = table.read_image = read
from iqpir.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_signalled(signame: str, *args: str):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _SELF_SIGNAL, signame, *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_keeps_the_scored_rows_and_says_so_in_the_exit_status(signame, code, tmp_path):
    for i in range(4):
        _photo(tmp_path / "in" / f"{i}.png", i, size=64)
    csv = tmp_path / "scores.csv"
    args = ("score", str(tmp_path / "in"), "--metrics", "piqe", "--batch-size", "1", "--out", str(csv), "--device", "cpu")
    proc = _run_signalled(signame, *args)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 2, rows  # the header and the two images scored before the signal
    assert main(list(args)) == 0  # the rerun scores the rest
    assert len(csv.read_text().splitlines()) == 1 + 4


def test_sigterm_during_restore_keeps_the_finished_outputs(run_dir, tmp_path):
    for i in range(4):
        _photo(tmp_path / "in" / f"{i}.png", i)
    out = tmp_path / "out"
    proc = _run_signalled("SIGTERM", "restore", str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(run_dir),
                          "--device", "cpu")
    assert proc.returncode == 143, proc.stderr
    assert "terminated" in proc.stderr and "Traceback" not in proc.stderr
    assert _files(out) == ["0.png", "1.png"] and not [p for p in out.rglob("*.tmp")]
    assert len(io.OutputLog(out).entries) == 2


# --------------------------------------------------------------------------------------
# Metadata kept
# --------------------------------------------------------------------------------------


def test_exif_icc_and_xmp_travel_to_the_output_with_the_orientation_reset(run_dir, tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Camera maker", "Model 1", 6  # make, model, orientation
    exif.get_ifd(0x8769)[0x9003] = "2019:07:01 12:00:00"  # DateTimeOriginal
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    src = tmp_path / "in" / "shot.jpg"
    src.parent.mkdir()
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 48, 3), dtype=np.uint8))
    stored.save(src, exif=exif, icc_profile=icc, xmp=xmp, quality=90)
    for strip, out in (([], tmp_path / "out"), (["--strip-metadata"], tmp_path / "stripped")):
        assert _restore(run_dir, str(src), "--out", str(out), *strip) == 0
        with Image.open(out / "shot.jpg") as img:
            assert img.size == (36, 48)  # the pixels upright (orientation 6 turned them) ...
            got = img.getexif()
            assert got.get(0x0112, 1) == 1  # ... so no viewer turns them again
            assert img.info.get("icc_profile") == icc  # the colours' meaning is always kept
            if strip:
                assert 0x010F not in got and "xmp" not in img.info
            else:
                assert (got[0x010F], got[0x0110]) == ("Camera maker", "Model 1")
                assert got.get_ifd(0x8769)[0x9003] == "2019:07:01 12:00:00"
                assert img.info.get("xmp") == xmp


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, capsys):
    """A checkpoint whose weights hold NaN (a diverged run, a damaged file) is refused in one line
    naming the tensor, before any output: it would write black photos and report them done."""
    cfg = C.load(preset="tiny", overrides=[*SMALL_MODEL, "train.stage=2"])
    model = build_restorer(cfg.model)
    state = model.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = float("nan")
    run = tmp_path / "run"
    ckpt.save_checkpoint(ckpt.checkpoint_stem(run, 1), {"model": state},
                         {"config": C.to_dict(cfg), "step": 1, "arch": "restorer"})
    _photo(tmp_path / "in" / "a.png", 0)
    assert _restore(run, str(tmp_path / "in"), "--out", str(tmp_path / "out")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and repr(name) in err[0] and "NaN" in err[0], err
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []
